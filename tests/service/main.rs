//! The Light Agent service over real gRPC on loopback: sessions, Scan,
//! ScanFile, Lookup, health, TLS and mutual TLS. One test binary, a module
//! per concern:
//!
//! * `sessions`: hellos accepted and rejected, a VM's places in flight,
//!   sessions replaced, lost and cut off;
//! * `scan_stream`: the Scan stream and ScanFile, uploads in memory and on
//!   the spool, bad input failing its file alone, bounds on messages, idle
//!   streams;
//! * `hash_first`: known digests answered without content, on Scan streams
//!   and through Lookup;
//! * `coalescing`: requests for content under way wait for its one scan,
//!   and recover when it fails or stalls;
//! * `client`: the `lightagent` client against a real server;
//! * `transport`: health, TLS and mutual TLS, renewed certificates, bounds
//!   on connections;
//! * `shutdown`: graceful shutdown;
//! * `status`: what the SVM's status says of the agent listener.
//!
//! What several of them use is here; what one uses is with it.

#[path = "../common/mod.rs"]
mod common;

mod client;
mod coalescing;
mod hash_first;
mod scan_stream;
mod sessions;
mod shutdown;
mod status;
mod transport;

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;

use common::*;
use scanserver::{
    client::{Agent, AgentOptions, ClientError, ClientTls, Files, HashFirst, ResultSink},
    config::{Config, TlsConfig},
    engine::{ScanJob, ScanOutcome},
    proto::{
        self, AgentMessage, FileBegin, FileChunk, FileErrorReason, Health, Hello, LookupRequest,
        RejectReason, ScanRequest, SvmReason, file_reply, file_request,
        protection_server_client::ProtectionServerClient, server_message,
    },
    server::ServerError,
    service::Counters,
    tls::TlsError,
    verdict::FailReason,
};
use tokio::sync::mpsc;
use tonic::{Code, transport::Channel};
use tonic_health::pb::health_check_response::ServingStatus;

async fn session_id(server: &TestServer) -> (String, mpsc::Sender<AgentMessage>) {
    // Each of its own VM: a VM has one session, a newer one replaces it.
    static VMS: AtomicU64 = AtomicU64::new(0);
    let vm = VMS.fetch_add(1, Ordering::Relaxed);
    let hello = Hello {
        vm_id: format!("vm-{vm}"),
        ..hello()
    };
    session_of(server, hello).await
}

/// A Lookup of one digest.
async fn look_up(server: &TestServer, session: &str, digest: &blake3::Hash) -> proto::LookupReply {
    let request = LookupRequest {
        session_id: session.to_owned(),
        digests: vec![Bytes::copy_from_slice(digest.as_bytes())],
    };
    server
        .client()
        .await
        .lookup(request)
        .await
        .unwrap()
        .into_inner()
}

/// Why the verdict `kind` failed; it must be a failure.
fn failure_reason(kind: file_reply::Kind) -> proto::FailureReason {
    match file_verdict(kind).verdict.unwrap().kind.unwrap() {
        proto::verdict::Kind::Failed(failed) => failed.reason(),
        other => panic!("a failure, not {other:?}"),
    }
}

/// Content that takes the engine a moment to scan, unique per `seed`.
fn content(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

/// A Scan stream that has begun `data` hash first as file 1 of `session`
/// and been asked for its content: it leads the flight for `data`.
async fn leading_stream(
    server: &TestServer,
    session: &str,
    data: &[u8],
) -> (mpsc::Sender<ScanRequest>, Replies) {
    let (lead, mut replies) = scan_stream(server).await;
    let digest = blake3::hash(data);
    lead.send(begin(session, 1, data, Some(digest.as_bytes())))
        .await
        .unwrap();
    assert!(matches!(
        next(&mut replies).await.1,
        file_reply::Kind::SendContent(_)
    ));
    (lead, replies)
}

/// A ScanFile call under way, its chunks sent through the sender; the
/// task resolves to its outcome.
async fn scan_file_call(
    server: &TestServer,
) -> (
    mpsc::Sender<proto::FileChunk>,
    tokio::task::JoinHandle<Result<tonic::Response<proto::FileVerdict>, tonic::Status>>,
) {
    let (tx, rx) = mpsc::channel(1);
    let mut client = server.client().await;
    let call = tokio::spawn(async move {
        client
            .scan_file(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    (tx, call)
}

/// Takes the next reply, which must be file `id`'s error of `code`, saying
/// `says`.
async fn next_error(replies: &mut Replies, id: u64, code: tonic::Code, says: &str) {
    let (got, reply) = next(replies).await;
    assert_eq!((got, error_code(&reply)), (id, code));
    assert!(format!("{reply:?}").contains(says), "{reply:?}");
}

/// Scans `files` with `agent`, and returns each file's name and outcome.
async fn scan_files(
    agent: &Agent,
    files: &[PathBuf],
    hash_first: HashFirst,
) -> Vec<(String, scanserver::engine::ScanOutcome)> {
    let results = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = Arc::clone(&results);
    agent
        .scan(
            Files::local(files.to_vec()),
            hash_first,
            move |path, outcome| {
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                sink.lock().unwrap().push((name, outcome));
            },
        )
        .await
        .unwrap();
    std::mem::take(&mut *results.lock().unwrap())
}

/// A raw call (see [`raw_call`]) that sends the header of a gRPC message of
/// `len` bytes and `sent` bytes of it, and leaves the rest unsent while the
/// call is held.
async fn begin_message(
    server: &TestServer,
    from: [u8; 4],
    method: &str,
    len: usize,
    sent: usize,
) -> (h2::client::ResponseFuture, h2::SendStream<Bytes>) {
    let (response, mut body) = raw_call(server, from, method, 1 << 20).await;
    let mut message = grpc_header(len);
    message.resize(message.len() + sent, 0);
    body.send_data(message.into(), false).unwrap();
    (response, body)
}

/// The gRPC status of a raw call's response: in its headers, or in its
/// trailers.
async fn grpc_status(response: h2::client::ResponseFuture) -> i32 {
    let response = response.await.unwrap();
    let status = |headers: &http::HeaderMap| {
        headers
            .get("grpc-status")
            .map(|s| s.to_str().unwrap().parse().unwrap())
    };
    if let Some(code) = status(response.headers()) {
        return code;
    }
    let mut body = response.into_body();
    while body.data().await.is_some() {}
    status(&body.trailers().await.unwrap().expect("trailers")).expect("a grpc-status")
}

/// Waits until the calls of `server` hold `bytes` of room.
async fn until_room_held(server: &TestServer, bytes: u64) {
    until_read("room held", || server.state.intake.held(), bytes).await;
}

/// A scan of content of `digest` held on one of `engine`'s threads: a
/// spooled job waiting there for mapped room, which the returned slot (all
/// of a 1 MiB `mapped_budget`) keeps until it is dropped. Returns once the
/// thread is on it; join the thread after the slot is dropped.
async fn hold_a_scan_thread(
    engine: &Arc<scanserver::engine::Engine>,
    digest: blake3::Hash,
    size: u64,
) -> (scanserver::engine::ScanSlot, std::thread::JoinHandle<()>) {
    use scanserver::engine::{Content, ScanJob};
    let spooled = |size| {
        let file = tempfile::tempfile().unwrap();
        file.set_len(size).unwrap();
        Content::Spooled { file, size }
    };
    let room = engine.reserve(&spooled(1 << 20)).await;
    let held = ScanJob {
        content: spooled(size),
        name: None,
        digest: Some(digest),
    };
    let on_it = {
        let engine = Arc::clone(engine);
        std::thread::spawn(move || drop(engine.scan(&held)))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while engine.second_copy_refused_in(&digest).is_none() {
        assert!(std::time::Instant::now() < deadline, "never on it");
        std::thread::sleep(Duration::from_millis(10));
    }
    (room, on_it)
}

/// The agent listener's TLS with the certificate and key `server.pem` and
/// `server.key` in `dir`, asking for no client certificate, not read again.
fn served_tls(dir: &Path) -> TlsConfig {
    TlsConfig {
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
        client_ca: None,
        vm_id_in_certificate: false,
        check_interval: Duration::ZERO,
    }
}
