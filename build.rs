//! Build script: compiles the protocol definitions in `proto/` with a
//! pure-Rust protobuf compiler (protox), so building needs nothing but
//! cargo, and records the YARA-X version the engine is built with.

use std::{env, fs, path::PathBuf};

const PROTOS: &[&str] = &[
    "scanserver/v1/verdict.proto",
    "scanserver/v1/protection.proto",
    "scanserver/v1/status.proto",
    "scanserver/v1/integration.proto",
    "scanserver/v1/admin.proto",
];

/// The messages that also have a JSON form: the status, report and admin
/// messages, and what they contain.
const JSON_TYPES: &[&str] = &[
    ".scanserver.v1.Health",
    ".scanserver.v1.SvmReason",
    ".scanserver.v1.VmReason",
    ".scanserver.v1.TagOrigin",
    ".scanserver.v1.SecurityTag",
    ".scanserver.v1.VmInfo",
    ".scanserver.v1.SvmReport",
    ".scanserver.v1.ReportTrigger",
    ".scanserver.v1.SvmIdentity",
    ".scanserver.v1.SignaturesInfo",
    ".scanserver.v1.Load",
    ".scanserver.v1.CacheStatistics",
    ".scanserver.v1.StatusReply",
    ".scanserver.v1.Component",
    ".scanserver.v1.ComponentState",
    ".scanserver.v1.AgentsReply",
    ".scanserver.v1.TagReply",
    ".scanserver.v1.ReloadSignaturesReply",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=Cargo.lock");

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler.include_source_info(true).open_files(PROTOS)?;
    // Reflection serves the descriptors, comments included.
    let descriptors = compiler.encode_file_descriptor_set();
    fs::write(out_dir.join("scanserver_descriptor.bin"), &descriptors)?;
    // No `connect(url)` constructor on clients: it would clash with the
    // `Connect` call. Clients are built on a channel.
    //
    // `bytes` fields decode as `Bytes`: a chunk's data is then a view into
    // the receive buffer, not a copy of it. Every service checks a
    // message's size in entries before decoding it (see `proto::codec`).
    tonic_prost_build::configure()
        .build_transport(false)
        .bytes(".")
        .codec_path("crate::proto::codec::BoundedCodec")
        .compile_fds(compiler.file_descriptor_set())?;
    // JSON (the proto3 mapping, with the .proto's field names) for reports,
    // `scanserver status --json` and the reference receiver.
    pbjson_build::Builder::new()
        .register_descriptors(&descriptors)?
        .preserve_proto_field_names()
        .emit_fields()
        .build(JSON_TYPES)?;

    println!(
        "cargo:rustc-env=SCANSERVER_YARA_X_VERSION={}",
        yara_x_version()?
    );
    Ok(())
}

/// The exact yara-x version from `Cargo.lock`: compiled rules and verdicts
/// are only valid for the engine version that produced them.
fn yara_x_version() -> Result<String, Box<dyn std::error::Error>> {
    let lock = fs::read_to_string("Cargo.lock")?;
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line == "name = \"yara-x\""
            && let Some(version) = lines.next().and_then(|l| l.strip_prefix("version = "))
        {
            return Ok(version.trim_matches('"').to_owned());
        }
    }
    Err("yara-x not found in Cargo.lock".into())
}
