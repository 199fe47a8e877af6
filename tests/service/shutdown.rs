//! Graceful shutdown: sessions end, the last saves are made, in time.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_sessions_saves_the_cache_and_returns_in_time() {
    // The state folder outlives the server, to be read after it stopped.
    let state = tempfile::tempdir().unwrap();
    let server = TestServer::start(|config| {
        config.server.state_dir = Some(state.path().to_owned());
        config.server.shutdown_grace = Duration::from_millis(500);
    })
    .await;

    let files = tempfile::tempdir().unwrap();
    let eicar = files.path().join("eicar.com");
    std::fs::write(&eicar, EICAR).unwrap();
    let agent = Agent::connect(&AgentOptions::for_host(server.url()))
        .await
        .unwrap();
    agent
        .scan(Files::local([eicar]), HashFirst::Auto, |_, outcome| {
            assert!(!outcome.verdict.detections().is_empty())
        })
        .await
        .unwrap();

    // Within the grace and the last saves: the session still open does
    // not hold it up.
    tokio::time::timeout(Duration::from_secs(5), server.stop())
        .await
        .expect("the server stops in time");
    // The verdict made before shutdown is in the snapshot.
    let restarted = shipped_engine();
    scanserver::state::StateDir::open(state.path())
        .unwrap()
        .restore_cache(&restarted);
    assert!(restarted.cached(&blake3::hash(EICAR), None).is_some());
}

/// A Connect still waiting for its Hello as the server stops ends at once,
/// told why: it neither holds up the shutdown for the Hello's 10 s nor is
/// welcomed into a server that is going away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_waiting_for_its_hello_ends_as_the_server_stops() {
    let server = TestServer::start(|config| {
        config.server.shutdown_grace = Duration::from_secs(30);
    })
    .await;
    let (_no_hello_yet, rx) = mpsc::channel::<AgentMessage>(1);
    let mut incoming = server
        .client()
        .await
        .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let stopping = tokio::spawn(server.stop());
    let status = tokio::time::timeout(Duration::from_secs(5), incoming.message())
        .await
        .expect("the Connect ends before its Hello is overdue")
        .expect_err("with a status");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .expect("the server stops without waiting for the Hello")
        .unwrap();
}

/// A connection still open when the grace period ends (a call its client
/// keeps open) is closed before the last saves are made, not left to end
/// with the process: nothing is answered that the saves do not hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_open_at_the_end_of_the_grace_period_are_closed_before_the_saves() {
    let server = TestServer::start(|config| {
        config.server.shutdown_grace = Duration::from_millis(300);
    })
    .await;
    let connections = Arc::clone(&server.svm.connections);
    // A ScanFile call that sent its first chunk, then nothing.
    let (tx, call) = scan_file_call(&server).await;
    tx.send(scan_file_chunk(0, &[1; 1000], "stalled.bin"))
        .await
        .unwrap();
    let received = || Counters::get(&server.state.counters.bytes_received);
    until_read("the call's first chunk received", received, 1000).await;
    tokio::time::timeout(Duration::from_secs(5), server.stop())
        .await
        .expect("the server stops");
    assert_eq!(connections.open(), 0, "closed before the server returned");
    let ended = tokio::time::timeout(Duration::from_secs(2), call)
        .await
        .expect("the call ended with its connection")
        .unwrap();
    assert!(ended.is_err(), "no verdict: {ended:?}");
}

/// A health Watch call (as gRPC's client-side health checking makes) is
/// told NOT_SERVING as the server stops, then ends: it does not hold the
/// shutdown for the grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_watch_ends_at_shutdown_without_holding_it_up() {
    let server = TestServer::start(|config| {
        config.server.shutdown_grace = Duration::from_secs(30);
    })
    .await;
    let mut watch = server
        .health_client()
        .await
        .watch(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().expect("a status");
    assert_eq!(first.status(), ServingStatus::Serving);
    let stopping = tokio::spawn(server.stop());
    let mut told = Vec::new();
    let until_ended = async {
        while let Some(status) = watch.message().await.expect("ended, not failed") {
            told.push(status.status());
        }
    };
    tokio::time::timeout(Duration::from_secs(5), until_ended)
        .await
        .expect("the Watch ends as the server stops");
    assert_eq!(told, [ServingStatus::NotServing]);
    tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .expect("the server stops without waiting out its grace period")
        .unwrap();
}
