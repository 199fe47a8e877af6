//! SharedCache throughput: verdicts for content the server already knows.
//!
//! * `cache/get`: in-process lookups of 100,000 known digests from all
//!   cores at once (rayon).
//! * `grpc/lookup`: `Lookup` batches of 100,000 known digests through a
//!   real server on loopback, client included.
//! * `grpc/scan_stream`: hash-first begins for 20,000 known files on one
//!   `Scan` stream, answered from the cache, client included
//!   (`lightagent`'s own client code).
//!
//! Run: `cargo bench --bench cache`.

use std::{path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rayon::prelude::*;
use scanserver::{
    client::{Agent, AgentOptions, Files, HashFirst, PreparedFile},
    config::Config,
    engine::{Engine, EngineConfig},
    proto::{LookupRequest, protection_server_client::ProtectionServerClient},
    server::Server,
    signatures::Ruleset,
    verdict::Verdict,
};

const LOOKUP_BATCH: usize = 100_000;
const STREAM_FILES: usize = 20_000;

fn engine() -> Arc<Engine> {
    let rules = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("signatures");
    let ruleset = Ruleset::load(&rules, None).expect("the shipped signatures compile");
    Arc::new(Engine::new(ruleset, &EngineConfig::default()).expect("engine"))
}

/// `n` digests, each with a clean verdict in `engine`'s cache, both
/// without a name (as `Lookup` asks) and under the name [`file_name`] gives
/// it (as the Scan stream announces it); the same entry unless the rules
/// look at file names.
fn known_digests(engine: &Engine, n: usize) -> Vec<blake3::Hash> {
    let version = engine.ruleset().version_arc();
    (0..n)
        .map(|i| {
            let digest = blake3::hash(&i.to_le_bytes());
            for name in [None, Some(file_name(i))] {
                let key = engine.cache_key(&digest, name.as_deref());
                engine.cache().insert(key, Verdict::Clean, &version);
            }
            digest
        })
        .collect()
}

fn file_name(i: usize) -> PathBuf {
    PathBuf::from(format!("C:\\Windows\\System32\\file{i}.dll"))
}

fn in_process(c: &mut Criterion) {
    let engine = engine();
    let keys: Vec<_> = known_digests(&engine, LOOKUP_BATCH)
        .iter()
        .map(|d| engine.cache_key(d, None))
        .collect();
    let mut group = c.benchmark_group("cache");
    group.throughput(Throughput::Elements(keys.len() as u64));
    group.bench_function("get", |b| {
        b.iter(|| {
            let hits = keys
                .par_iter()
                .filter(|key| engine.cache().get(key).is_some())
                .count();
            assert_eq!(hits, keys.len());
        })
    });
    group.finish();
}

fn through_grpc(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let engine = engine();
    let digests = known_digests(&engine, LOOKUP_BATCH.max(STREAM_FILES));
    let state = tempfile::tempdir().expect("temporary folder");
    let (url, agent) = runtime.block_on(async {
        let mut config = Config::default();
        config.server.listen = "127.0.0.1:0".parse().expect("address");
        config.server.state_dir = Some(state.path().to_owned());
        let server = Server::bind(&config, Arc::clone(&engine))
            .await
            .expect("server");
        let url = format!("http://{}", server.local_addr());
        tokio::spawn(server.run(std::future::pending()));
        let agent = Agent::connect(&AgentOptions::for_host(url.clone()))
            .await
            .expect("session");
        (url, agent)
    });
    let mut client = runtime.block_on(lookup_client(&url));
    let request = LookupRequest {
        session_id: agent.welcome().session_id.clone(),
        digests: digests[..LOOKUP_BATCH]
            .iter()
            .map(|d| Bytes::copy_from_slice(d.as_bytes()))
            .collect(),
    };
    let files: Vec<_> = digests[..STREAM_FILES]
        .iter()
        .enumerate()
        .map(|(i, digest)| Arc::new(PreparedFile::new(file_name(i), Bytes::new(), *digest)))
        .collect();

    let mut group = c.benchmark_group("grpc");
    group.measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements(LOOKUP_BATCH as u64));
    group.bench_function("lookup", |b| {
        b.iter(|| {
            let reply = runtime
                .block_on(client.lookup(request.clone()))
                .expect("lookup")
                .into_inner();
            assert!(reply.results.iter().all(|r| r.verdict.is_some()));
        })
    });
    group.throughput(Throughput::Elements(STREAM_FILES as u64));
    group.bench_function("scan_stream", |b| {
        b.iter(|| {
            runtime
                .block_on(agent.scan(
                    Files::Prepared(files.clone()),
                    HashFirst::Always,
                    |_, outcome| assert!(outcome.cached),
                ))
                .expect("scan");
        })
    });
    group.finish();
}

/// A client with message limits large enough for 100,000-digest batches.
async fn lookup_client(url: &str) -> ProtectionServerClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    ProtectionServerClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

criterion_group!(benches, in_process, through_grpc);
criterion_main!(benches);
