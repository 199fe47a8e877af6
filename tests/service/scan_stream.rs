//! The Scan stream and ScanFile: uploads in memory and on the spool, bad input failing its file alone, bounds on messages, idle streams.

use super::*;

/// Files of up to 64 KiB, spooled beyond 16 KiB, in a spool of 256 KiB of
/// which a VM's files may take 64.
fn spool_share_of_one_large_file(config: &mut Config) {
    config.uploads.memory_threshold = 16 << 10;
    config.uploads.max_file_size = 64 << 10;
    config.uploads.spool_budget = 256 << 10;
    config.uploads.spool_budget_per_vm = Some(64 << 10);
}

/// One VM's files take at most its share of the spool, however many it
/// begins and however often its agent reconnects: another VM's file still
/// fits, and the VM's next file does once one of its own ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_vm_takes_no_more_than_its_share_of_the_spool() {
    let server = TestServer::start(spool_share_of_one_large_file).await;
    let (earlier, _first) = session_of(&server, hello()).await;
    let (tx, mut replies) = scan_stream(&server).await;
    // A file whose content never comes holds 48 KiB of the VM's 64.
    let large = content(3, 48 << 10);
    tx.send(begin(&earlier, 1, &large, None)).await.unwrap();
    tx.send(begin(&earlier, 2, &large, None)).await.unwrap();
    next_error(
        &mut replies,
        2,
        Code::ResourceExhausted,
        "VM's files take its whole share",
    )
    .await;
    // Its agent connects again: the share stays the VM's, still held.
    let (later, _second) = session_of(&server, hello()).await;
    tx.send(begin(&later, 3, &large, None)).await.unwrap();
    next_error(&mut replies, 3, Code::ResourceExhausted, "share").await;
    assert_eq!(server.state.uploads.spool_usage().bytes, 48 << 10);

    // Another VM's file fits in the room left.
    let (other, _keep) = session_id(&server).await;
    let (other_tx, mut other_replies) = scan_stream(&server).await;
    send_whole(&other_tx, &other, 1, &large).await;
    let (id, kind) = next(&mut other_replies).await;
    assert_eq!((id, verdict_rules(&kind)), (1, vec![]));

    // The VM's share comes back as its file ends.
    tx.send(cancel(1)).await.unwrap();
    let (id, kind) = next(&mut replies).await;
    assert_eq!((id, error_code(&kind)), (1, Code::Cancelled));
    send_whole(&tx, &later, 4, &large).await;
    let (id, kind) = next(&mut replies).await;
    assert_eq!((id, verdict_rules(&kind)), (4, vec![]));
    assert_eq!(server.state.uploads.spool_usage().refused, 2);
}

/// The client scans a folder of files each taking most of its VM's share
/// of the spool: the server takes them a few at a time and refuses the
/// others, which the client sends again, and every file gets its verdict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_scans_files_larger_than_its_share_allows_at_once() {
    let server = TestServer::start(spool_share_of_one_large_file).await;
    let dir = tempfile::tempdir().unwrap();
    let paths: Vec<_> = (0..6)
        .map(|seed| {
            let path = dir.path().join(format!("large-{seed}.bin"));
            std::fs::write(&path, content(seed, 48 << 10)).unwrap();
            path
        })
        .collect();
    let agent = Agent::connect(&AgentOptions::for_host(server.url()))
        .await
        .unwrap();
    let outcomes = scan_files(&agent, &paths, HashFirst::Never).await;
    assert_eq!(outcomes.len(), 6);
    for (name, outcome) in outcomes {
        assert_eq!(outcome.verdict.kind(), "clean", "{name}: {outcome:?}");
    }
    assert!(server.state.uploads.spool_usage().refused >= 1);
}

/// A file that says it holds 0 bytes and holds more than a chunk (as
/// `/proc/kallsyms` does) is scanned when it goes with its content: its
/// begin gives the size of what it holds. It goes so even when files go
/// by digest first: such a file may hold something else at each read (as
/// `/proc/PID/stat` does), and is read once, as the local scan reads it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_says_it_is_empty_is_sent_whole_with_its_content() {
    let server = TestServer::start(|c| c.uploads.chunk_size = 4 << 10).await;
    let agent = Agent::connect(&AgentOptions::for_host(server.url()))
        .await
        .unwrap();
    let kallsyms = PathBuf::from("/proc/kallsyms");
    assert_eq!(std::fs::metadata(&kallsyms).unwrap().len(), 0);
    for hash_first in [HashFirst::Never, HashFirst::Always] {
        let outcomes = scan_files(&agent, std::slice::from_ref(&kallsyms), hash_first).await;
        let [(_, outcome)] = &outcomes[..] else {
            panic!("{outcomes:?}")
        };
        assert_eq!(outcome.verdict.kind(), "clean", "{outcome:?}");
        assert!(outcome.size > 4 << 10, "{outcome:?}");
    }
    assert_eq!(
        Counters::get(&server.state.counters.content_requests),
        0,
        "never announced by digest alone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_whose_content_stalls_fails_while_its_stream_goes_on() {
    let server = TestServer::start(|c| c.server.idle_timeout = Duration::from_secs(2)).await;
    let (session, _keep) = session_id(&server).await;
    let (tx, mut replies) = scan_stream(&server).await;
    let data = b"content that never comes".repeat(10);
    let digest = blake3::hash(&data);
    begin_asked_for_content(&tx, &mut replies, &session, 1, &data, &digest).await;
    let flights = server.state.engine.cache().flights();
    assert_eq!(
        flights.len(),
        1,
        "the file leads the flight for its content"
    );
    // While the agent sends another file's content, slowly, over more than
    // two idle timeouts, the file waits its turn.
    let slow = b"sent one piece at a time".repeat(10);
    tx.send(begin(&session, 2, &slow, None)).await.unwrap();
    for (n, piece) in slow.chunks(24).enumerate() {
        tokio::time::sleep(Duration::from_millis(500)).await;
        tx.send(chunk(2, (n * 24) as u64, piece)).await.unwrap();
    }
    tx.send(end(2)).await.unwrap();
    let (id, kind) = next(&mut replies).await;
    assert_eq!(
        (id, verdict_rules(&kind)),
        (2, vec![]),
        "file 1 still waits"
    );
    // The agent keeps its stream busy, but sends no content: empty
    // messages, and empty chunks of the stalled file itself.
    let busy = {
        let tx = tx.clone();
        tokio::spawn(async move {
            for n in 0.. {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let request = match n % 2 {
                    0 => ScanRequest::default(),
                    _ => chunk(1, 0, b""),
                };
                if tx.send(request).await.is_err() {
                    break;
                }
            }
        })
    };
    let (id, kind) = next(&mut replies).await;
    assert_eq!((id, error_code(&kind)), (1, Code::DeadlineExceeded));
    assert!(flights.is_empty(), "its flight ended with it");
    // The stream goes on.
    send_whole(&tx, &session, 3, EICAR).await;
    let (id, kind) = next(&mut replies).await;
    assert_eq!(
        (id, verdict_rules(&kind)),
        (3, vec!["EICAR_Test_File".to_owned()])
    );
    busy.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eicar_is_found_through_scan_and_scan_file() {
    let server = TestServer::start(|_| {}).await;
    let (session, _keep) = session_id(&server).await;
    let (tx, mut replies) = scan_stream(&server).await;
    // Without a digest the content follows the begin at once.
    tx.send(begin(&session, 1, EICAR, None)).await.unwrap();
    tx.send(chunk(1, 0, &EICAR[..30])).await.unwrap();
    tx.send(chunk(1, 30, &EICAR[30..])).await.unwrap();
    tx.send(end(1)).await.unwrap();
    let (id, kind) = next(&mut replies).await;
    assert_eq!(id, 1);
    assert_eq!(verdict_rules(&kind), ["EICAR_Test_File"]);
    let file_reply::Kind::Verdict(verdict) = kind else {
        unreachable!()
    };
    assert_eq!(&verdict.blake3[..], blake3::hash(EICAR).as_bytes());
    assert!(!verdict.cached);

    let chunks = tokio_stream::iter(vec![
        scan_file_chunk(0, &EICAR[..10], "eicar.com"),
        scan_file_chunk(10, &EICAR[10..], ""),
    ]);
    let verdict = server
        .client()
        .await
        .scan_file(chunks)
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        verdict.verdict.unwrap().kind.unwrap(),
        proto::verdict::Kind::Infected(i) if i.detections[0].rule == "EICAR_Test_File"
    ));
}

/// A ScanFile call whose first chunk gives the file's size and digest is
/// held to them: a call ended part way gets no verdict of the part it sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scan_file_call_is_held_to_the_size_and_digest_it_gives() {
    let server = TestServer::start(|c| c.uploads.max_file_size = 1 << 20).await;
    let first = |size: Option<u64>, digest: &[u8]| FileChunk {
        size,
        blake3: Bytes::copy_from_slice(digest),
        ..scan_file_chunk(0, &EICAR[..30], "eicar.com")
    };
    let rest = || scan_file_chunk(30, &EICAR[30..], "");
    let size = Some(EICAR.len() as u64);
    let digest = blake3::hash(EICAR);
    let call = |chunks: Vec<FileChunk>| async {
        let mut client = server.client().await;
        client.scan_file(tokio_stream::iter(chunks)).await
    };

    let whole = call(vec![first(size, digest.as_bytes()), rest()]).await;
    assert!(matches!(
        whole.unwrap().into_inner().verdict.unwrap().kind.unwrap(),
        proto::verdict::Kind::Infected(i) if i.detections[0].rule == "EICAR_Test_File"
    ));
    let failures = [
        // Ended after its first 30 bytes.
        (
            vec![first(size, digest.as_bytes())],
            Code::InvalidArgument,
            "30 bytes received, 68 declared",
        ),
        (
            vec![first(None, &[7; 32]), rest()],
            Code::InvalidArgument,
            "digest",
        ),
        (
            vec![first(None, &[7; 3]), rest()],
            Code::InvalidArgument,
            "32 bytes, not 3",
        ),
        (
            vec![first(Some(2 << 20), &[])],
            Code::FailedPrecondition,
            "over the server's limit",
        ),
    ];
    for (chunks, code, says) in failures {
        let status = call(chunks).await.unwrap_err();
        assert_eq!(status.code(), code, "{status:?}");
        assert!(status.message().contains(says), "{status:?}");
    }
}

/// `ScanFile` calls are limited for the whole server (and to a share of
/// it from one address other than the SVM's own: see the unit test of
/// `ScanFileCalls`); a call that stalls is cut off after the idle timeout,
/// and gives its place back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_file_calls_are_limited_and_cut_off_when_stalled() {
    // Well under the 10 s a silent call waits for its first chunk.
    let idle = Duration::from_secs(3);
    let server = TestServer::start(|c| {
        c.uploads.files_in_flight = 4;
        // Under the idle timeout, as the settings must be.
        c.engine.scan_timeout = Duration::from_secs(2);
        c.server.idle_timeout = idle;
    })
    .await;
    // Calls that send nothing take no place: they are cut off on their own.
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(scan_file_call(&server).await);
    }
    // Calls that send a first chunk and then nothing take every place...
    let mut calls = Vec::new();
    for n in 1..=4u8 {
        let (tx, call) = scan_file_call(&server).await;
        let first = scan_file_chunk(0, &[n; 1000], &format!("stalled{n}.bin"));
        tx.send(first).await.unwrap();
        calls.push((tx, call));
    }
    let open = || server.state.scan_file_calls();
    until_read("the stalled calls' places", open, 4).await;
    // ...and one more finds none.
    let eicar = || tokio_stream::iter(vec![scan_file_chunk(0, EICAR, "eicar.com")]);
    let refused = server.client().await.scan_file(eicar()).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("more than 4"), "{refused:?}");
    // The stalled calls are cut off after the idle timeout...
    for (_tx, call) in calls {
        let status = tokio::time::timeout(idle * 3, call)
            .await
            .expect("cut off in time")
            .unwrap()
            .unwrap_err();
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    }
    // ...and their places are free again, while the silent calls still
    // wait for their first chunk.
    let verdict = server.client().await.scan_file(eicar()).await.unwrap();
    assert!(matches!(
        verdict.into_inner().verdict.unwrap().kind.unwrap(),
        proto::verdict::Kind::Infected(_)
    ));
    for (_tx, call) in silent {
        assert!(
            !call.is_finished(),
            "a silent call waits for its first chunk"
        );
        call.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_files_fail_alone_and_the_stream_goes_on() {
    let server = TestServer::start(|c| c.uploads.max_file_size = 1 << 20).await;
    let (session, _keep) = session_id(&server).await;
    let (tx, mut replies) = scan_stream(&server).await;

    // A digest that is not the content's.
    let lie = blake3::hash(b"something else");
    begin_asked_for_content(&tx, &mut replies, &session, 1, EICAR, &lie).await;
    tx.send(chunk(1, 0, EICAR)).await.unwrap();
    tx.send(end(1)).await.unwrap();
    let (_, kind) = next(&mut replies).await;
    assert_eq!(error_code(&kind), Code::InvalidArgument);
    let file_reply::Kind::Error(error) = &kind else {
        panic!("{kind:?}")
    };
    assert_eq!(error.reason(), FileErrorReason::DigestMismatch, "{error:?}");
    assert!(
        server.state.engine.cached(&lie, None).is_none(),
        "a lie is never cached"
    );

    // A chunk out of order: an error with nothing for an agent to do but
    // what its code says.
    tx.send(begin(&session, 2, b"0123456789", None))
        .await
        .unwrap();
    tx.send(chunk(2, 5, b"56789")).await.unwrap();
    let (_, kind) = next(&mut replies).await;
    assert_eq!(error_code(&kind), Code::InvalidArgument);
    let file_reply::Kind::Error(error) = &kind else {
        panic!("{kind:?}")
    };
    assert_eq!(error.reason(), FileErrorReason::Unspecified, "{error:?}");

    // Less content than declared.
    tx.send(begin(&session, 3, b"0123456789", None))
        .await
        .unwrap();
    tx.send(chunk(3, 0, b"01234")).await.unwrap();
    tx.send(end(3)).await.unwrap();
    assert_eq!(
        error_code(&next(&mut replies).await.1),
        Code::InvalidArgument
    );

    // Over the size limit.
    let huge = FileBegin {
        size: 2 << 20,
        ..file_begin(&session, 4)
    };
    tx.send(ScanRequest::from(file_request::Kind::Begin(huge)))
        .await
        .unwrap();
    assert_eq!(
        error_code(&next(&mut replies).await.1),
        Code::FailedPrecondition
    );

    // An unknown session.
    tx.send(begin("no-such-session", 5, b"x", None))
        .await
        .unwrap();
    assert_eq!(
        error_code(&next(&mut replies).await.1),
        Code::FailedPrecondition
    );

    // A session id no server gives, too long to be repeated back, and a
    // path over 96 KiB: refused, with short replies.
    tx.send(begin(&"s".repeat(1 << 20), 5, b"x", None))
        .await
        .unwrap();
    let refused = next(&mut replies).await.1;
    assert_eq!(error_code(&refused), Code::InvalidArgument);
    assert!(format!("{refused:?}").len() < 1000, "{refused:?}");
    let deep = FileBegin {
        path: "d\\".repeat(50 << 10),
        ..file_begin(&session, 5)
    };
    tx.send(ScanRequest::from(file_request::Kind::Begin(deep)))
        .await
        .unwrap();
    let refused = next(&mut replies).await.1;
    assert_eq!(error_code(&refused), Code::InvalidArgument);
    assert!(format!("{refused:?}").contains("path"), "{refused:?}");

    // Cancel releases the file. Its one final reply is the cancel's:
    // what the agent sent of it after (sent before it cancelled) is
    // dropped without a word.
    tx.send(begin(&session, 6, &vec![7u8; 100_000], None))
        .await
        .unwrap();
    tx.send(chunk(6, 0, &[7u8; 1000])).await.unwrap();
    tx.send(cancel(6)).await.unwrap();
    assert_eq!(error_code(&next(&mut replies).await.1), Code::Cancelled);
    tx.send(chunk(6, 1000, &[7u8; 1000])).await.unwrap();
    tx.send(end(6)).await.unwrap();

    // The stream still works.
    send_whole(&tx, &session, 7, EICAR).await;
    assert_eq!(
        verdict_rules(&next(&mut replies).await.1),
        ["EICAR_Test_File"]
    );
}

fn file_begin(session: &str, id: u64) -> FileBegin {
    FileBegin {
        file_id: id,
        session_id: session.to_owned(),
        path: "f".into(),
        size: 0,
        blake3: Bytes::new(),
    }
}

/// A spooled file waiting for room in the mapped budget (behind other
/// large files) waits on its own: the stream's other files go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spooled_file_waiting_for_mapped_room_holds_up_no_other_file() {
    let server = TestServer::start(|c| {
        c.uploads.memory_threshold = 1024;
        c.engine.mapped_budget = 1 << 20;
    })
    .await;
    let engine = &server.state.engine;
    let held = scanserver::engine::Content::Spooled {
        file: tempfile::tempfile().unwrap(),
        size: 1 << 20,
    };
    let room = engine.reserve(&held).await;
    let (session, _keep) = session_id(&server).await;
    let (tx, mut replies) = scan_stream(&server).await;
    send_whole(&tx, &session, 1, &vec![7u8; 2 << 20]).await;
    send_whole(&tx, &session, 2, EICAR).await;
    let (id, kind) = next(&mut replies).await;
    assert_eq!(
        (id, verdict_rules(&kind)),
        (2, vec!["EICAR_Test_File".to_owned()])
    );
    drop(room);
    let (id, kind) = next(&mut replies).await;
    assert_eq!((id, verdict_rules(&kind)), (1, vec![]), "clean");
}

/// Content that stuck a scan thread is refused at its begin: its content
/// is not asked for (a spooled job waiting on its thread for mapped room,
/// held, sticks the thread here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_that_stuck_a_scan_thread_is_refused_at_its_begin() {
    let server = TestServer::start(|c| {
        c.engine.scan_timeout = Duration::from_secs(1);
        c.engine.mapped_budget = 1 << 20;
    })
    .await;
    let engine = Arc::clone(&server.state.engine);
    let data = vec![0u8; 4096];
    let digest = blake3::hash(&data);
    let (room, stuck) = hold_a_scan_thread(&engine, digest, data.len() as u64).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while engine.stuck_threads() == 0 {
        assert!(std::time::Instant::now() < deadline, "never stuck");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (session, _keep) = session_id(&server).await;
    let (tx, mut replies) = scan_stream(&server).await;
    tx.send(begin(&session, 1, &data, Some(digest.as_bytes())))
        .await
        .unwrap();
    match next(&mut replies).await {
        (1, file_reply::Kind::Error(e)) => {
            assert_eq!(e.code, Code::FailedPrecondition as i32);
            assert!(
                e.message.contains("kept a scan thread busy"),
                "{}",
                e.message
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(Counters::get(&server.state.counters.content_requests), 0);

    // A stuck scan's flight never lands (held here, as the stuck thread
    // holds it): the content sent whole is refused, and a Lookup of it
    // answered, at once, not once UPLOAD_WAIT has passed.
    let flights = engine.cache().flights();
    let scanserver::cache::flight::Join::Lead(_stuck_flight) =
        flights.join(engine.cache_key(&digest, None))
    else {
        panic!("no other flight for the content");
    };
    let started = std::time::Instant::now();
    send_whole(&tx, &session, 2, &data).await;
    match next(&mut replies).await {
        (2, file_reply::Kind::Verdict(v)) => {
            let failure = match v.verdict.and_then(|v| v.kind) {
                Some(proto::verdict::Kind::Failed(failure)) => failure,
                other => panic!("expected a failure, got {other:?}"),
            };
            assert!(
                failure.detail.contains("kept a scan thread busy"),
                "{failure:?}"
            );
        }
        other => panic!("expected a failed verdict, got {other:?}"),
    }
    let lookup = look_up(&server, &session, &digest).await;
    assert!(lookup.results[0].verdict.is_none(), "{lookup:?}");
    let upload_wait = scanserver::cache::flight::UPLOAD_WAIT;
    assert!(
        started.elapsed() < upload_wait / 2,
        "{:?}",
        started.elapsed()
    );
    drop(room);
    assert!(stuck.join().is_ok());
}

/// Content another scan thread has been on for over two scan timeouts,
/// but not yet three (when that thread counts as stuck), is not refused
/// at its begin: the thread may yet come back with a verdict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_a_thread_is_long_on_is_not_refused_at_its_begin() {
    let timeout = Duration::from_secs(4);
    let server = TestServer::start(|c| {
        c.engine.scan_timeout = timeout;
        c.engine.mapped_budget = 1 << 20;
    })
    .await;
    let engine = Arc::clone(&server.state.engine);
    let data = vec![3u8; 4096];
    let digest = blake3::hash(&data);
    let (room, on_it) = hold_a_scan_thread(&engine, digest, data.len() as u64).await;
    let (session, _keep) = session_id(&server).await;
    let (tx, mut replies) = scan_stream(&server).await;
    let deadline = std::time::Instant::now() + timeout * 5;
    while engine.second_copy_refused_in(&digest) != Some(Duration::from_millis(10)) {
        assert!(std::time::Instant::now() < deadline, "never on it for long");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(engine.stuck_threads(), 0, "not stuck yet");
    tx.send(begin(&session, 1, &data, Some(digest.as_bytes())))
        .await
        .unwrap();
    match next(&mut replies).await {
        (1, file_reply::Kind::SendContent(_)) => {}
        other => panic!("expected a request for the content, got {other:?}"),
    }
    drop(room);
    assert!(on_it.join().is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_vanishing_mid_file_leaves_no_spool_file() {
    let server = TestServer::start(|c| c.uploads.memory_threshold = 1024).await;
    let (session, _keep) = session_id(&server).await;
    let (tx, replies) = scan_stream(&server).await;
    let part = vec![1u8; 64 << 10];
    tx.send(begin(&session, 1, &vec![0; 10 << 20], None))
        .await
        .unwrap();
    tx.send(chunk(1, 0, &part)).await.unwrap();
    tx.send(chunk(1, part.len() as u64, &part)).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while server.spooled_files() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the large file is spooled"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(tx);
    drop(replies);
    while server.spooled_files() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the spool file is removed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_files_in_flight_on_one_stream() {
    let server = TestServer::start(|_| {}).await;
    let (session, _keep) = session_id(&server).await;
    let (tx, mut replies) = scan_stream(&server).await;
    let files: Vec<Vec<u8>> = (0..100u32)
        .map(|i| {
            if i % 10 == 0 {
                EICAR.to_vec()
            } else {
                format!("file {i} ").repeat(1000).into_bytes()
            }
        })
        .collect();
    // All begins in one message; then the chunks of all files interleave.
    let begins = files.iter().enumerate();
    let begins = begins.map(|(id, data)| begin(&session, id as u64, data, None));
    tx.send(batch(begins.collect())).await.unwrap();
    for half in 0..2 {
        for (id, data) in files.iter().enumerate() {
            let mid = data.len() / 2;
            let (offset, piece) = if half == 0 {
                (0, &data[..mid])
            } else {
                (mid, &data[mid..])
            };
            tx.send(chunk(id as u64, offset as u64, piece))
                .await
                .unwrap();
        }
    }
    for id in 0..100u64 {
        tx.send(end(id)).await.unwrap();
    }
    let mut infected = std::collections::BTreeSet::new();
    for _ in 0..100 {
        let (id, kind) = next(&mut replies).await;
        if !verdict_rules(&kind).is_empty() {
            infected.insert(id);
        }
    }
    assert_eq!(infected, (0..100).step_by(10).collect());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_of_many_begins_gets_every_reply_in_bounded_messages() {
    let server = TestServer::start(|_| {}).await;
    let (session, _keep) = session_id(&server).await;
    let (tx, mut replies) = scan_stream(&server).await;
    // 2,000 hash-first begins of unknown content: the first 128 (the
    // session's files in flight) are asked for their content, the others
    // refused; every one is answered.
    let begins = (0..2000u64).map(|id| {
        let data = id.to_le_bytes();
        begin(&session, id, &data, Some(blake3::hash(&data).as_bytes()))
    });
    tx.send(batch(begins.collect())).await.unwrap();
    let (mut asked, mut refused, mut messages) = (0, 0, 0);
    while asked + refused < 2000 {
        let message = replies.message().await.unwrap().unwrap();
        assert!((1..=1024).contains(&message.replies.len()));
        messages += 1;
        for reply in message.replies {
            match reply.kind.unwrap() {
                file_reply::Kind::SendContent(_) => asked += 1,
                kind => {
                    assert_eq!(error_code(&kind), Code::ResourceExhausted);
                    refused += 1;
                }
            }
        }
    }
    assert_eq!((asked, refused), (128, 1872));
    assert!(messages >= 2, "over 1,024 replies take two messages");
}

/// A stream that breaks ends with its error only after the verdicts of
/// the files it scans: tonic ends a stream at its first error, and every
/// file gets its final reply (here the scan waits behind a job held on the
/// engine's one thread).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_stream_sends_the_verdicts_of_its_scans_under_way_first() {
    let server = TestServer::start(|c| {
        c.engine.threads = 1;
        c.engine.mapped_budget = 1 << 20;
    })
    .await;
    let engine = Arc::clone(&server.state.engine);
    let (room, on_it) = hold_a_scan_thread(&engine, blake3::hash(b"held"), 4).await;
    let (session, _keep) = session_id(&server).await;
    let (tx, mut replies) = scan_stream(&server).await;
    tx.send(begin(&session, 2, EICAR, None)).await.unwrap();
    tx.send(chunk(2, 0, EICAR)).await.unwrap();
    tx.send(end(2)).await.unwrap();
    let flood = ScanRequest {
        requests: vec![proto::FileRequest::default(); 200_000],
    };
    tx.send(flood).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(room);
    let (id, kind) = next(&mut replies).await;
    assert_eq!(
        (id, verdict_rules(&kind)),
        (2, vec!["EICAR_Test_File".to_owned()])
    );
    let status = replies.message().await.expect_err("the stream fails");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(on_it.join().is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_that_would_blow_up_when_decoded_are_refused_before() {
    let server = TestServer::start(|_| {}).await;
    let (session, _keep) = session_id(&server).await;
    // 400 KB on the wire, some 20 MB once decoded, after a file begun.
    let flood = ScanRequest {
        requests: vec![proto::FileRequest::default(); 200_000],
    };
    let (tx, mut replies) = scan_stream(&server).await;
    tx.send(begin(&session, 1, EICAR, None)).await.unwrap();
    tx.send(flood).await.unwrap();
    // The open file fails with the stream's error, which then ends it.
    let (id, kind) = next(&mut replies).await;
    assert_eq!((id, error_code(&kind)), (1, Code::InvalidArgument));
    let status = replies.message().await.expect_err("the stream fails");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("entries"), "{status:?}");
    // Repeated fields further down: a hello of 40,000 connection tags,
    // over the 64 KiB of a Connect message, refused from its header.
    let mut big_hello = hello();
    big_hello.connection_tags = vec!["vdi-pool-7".into(); 40_000];
    let (_tx, mut incoming) = connect(&server, big_hello).await;
    let status = incoming.message().await.expect_err("the session fails");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    // The server goes on serving.
    let requests = vec![begin(&session, 1, EICAR, None), chunk(1, 0, EICAR), end(1)];
    let reply = first_reply(&server, requests).await;
    assert_eq!(verdict_rules(&reply), ["EICAR_Test_File"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_left_open_when_the_agent_ends_its_requests_is_cancelled() {
    let server = TestServer::start(|_| {}).await;
    let (session, _keep) = session_id(&server).await;
    let (tx, mut replies) = scan_stream(&server).await;
    // Half the content, then the agent closes its side of the stream.
    tx.send(begin(&session, 1, b"0123456789", None))
        .await
        .unwrap();
    tx.send(chunk(1, 0, b"01234")).await.unwrap();
    drop(tx);
    let (id, reply) = next(&mut replies).await;
    assert_eq!((id, error_code(&reply)), (1, Code::Cancelled));
    assert!(
        replies.message().await.unwrap().is_none(),
        "then the stream ends"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_scan_stream_is_closed() {
    let server = TestServer::start(|c| c.server.idle_timeout = Duration::from_millis(200)).await;
    let (_tx, mut replies) = scan_stream(&server).await;
    assert_closed_as_idle(&mut replies).await;
}

/// The server closes `replies` as idle within a few seconds.
async fn assert_closed_as_idle(replies: &mut Replies) {
    let status = tokio::time::timeout(Duration::from_secs(3), replies.message())
        .await
        .expect("the server closes the stream")
        .expect_err("with an error");
    assert_eq!(status.code(), Code::DeadlineExceeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scan_stream_in_use_is_not_closed_as_idle() {
    let server = TestServer::start(|c| c.server.idle_timeout = Duration::from_secs(1)).await;
    let (tx, mut replies) = scan_stream(&server).await;
    // A request every 150 ms for three idle timeouts: a cancel of a file
    // that is not open, which gets no reply.
    for _ in 0..20 {
        tx.send(cancel(1)).await.unwrap();
        let quiet = tokio::time::timeout(Duration::from_millis(150), replies.message()).await;
        assert!(
            quiet.is_err(),
            "the stream was closed while in use: {quiet:?}"
        );
    }
    // Then silence: closed once the idle timeout has passed.
    assert_closed_as_idle(&mut replies).await;
}

/// An agent that sent all its files waits in silence for their verdicts:
/// the stream is not closed as idle while the server still owes any, even
/// when they come later than the idle timeout (scans queued behind each
/// other, here on one scan thread).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scan_stream_owed_verdicts_is_not_closed_as_idle() {
    let server = TestServer::start(|c| {
        c.server.idle_timeout = Duration::from_millis(1500);
        c.engine.scan_timeout = Duration::from_secs(1);
        c.engine.threads = 1;
    })
    .await;
    server.state.replace_ruleset(ruleset_from_source(SLOW_RULE));
    let (session, _keep) = session_id(&server).await;
    let (tx, mut replies) = scan_stream(&server).await;
    let slow = vec![1u8; 200_000];
    let mut requests = Vec::new();
    for id in 1..=3 {
        let mut data = slow.clone();
        data[0] = id as u8;
        requests.extend([
            begin(&session, id, &data, None),
            chunk(id, 0, &data),
            end(id),
        ]);
    }
    tx.send(batch(requests)).await.unwrap();
    let started = std::time::Instant::now();
    let mut answered = Vec::new();
    for _ in 0..3 {
        let (id, reply) = next(&mut replies).await;
        file_verdict(reply);
        answered.push(id);
    }
    answered.sort();
    assert_eq!(answered, [1, 2, 3]);
    assert!(
        started.elapsed() > Duration::from_millis(1500),
        "the last verdict came after an idle timeout"
    );
    // Then silence: closed once the idle timeout has passed.
    assert_closed_as_idle(&mut replies).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_are_received_only_within_the_message_budget() {
    // A quarter of it, 32 MiB, for the calls of each address.
    let server = TestServer::start(|c| c.uploads.message_budget = 128 << 20).await;
    // Messages of 16 MiB begun and stalled, two from each of four
    // addresses, hold room for all of them: the whole budget.
    let mut stalled = Vec::new();
    for from in [2, 2, 3, 3, 4, 4, 5, 5] {
        stalled.push(begin_message(&server, [127, 0, 0, from], "Scan", 16 << 20, 1 << 20).await);
    }
    until_room_held(&server, 128 << 20).await;
    // From one of them, a call needing more room fails at once.
    let (full, _body) = begin_message(&server, [127, 0, 0, 2], "Lookup", 1 << 20, 1000).await;
    assert_eq!(grpc_status(full).await, Code::ResourceExhausted as i32);
    // From another address, one waits for room in turn.
    let (waiting, _body) = begin_message(&server, [127, 0, 0, 6], "Lookup", 2 << 20, 1000).await;
    let asked = tokio::time::Instant::now();
    // Small messages go on meanwhile: a session opens, a file is scanned.
    let (session, _keep) = session_id(&server).await;
    let (tx, mut replies) = scan_stream(&server).await;
    send_whole(&tx, &session, 1, EICAR).await;
    let (id, kind) = next(&mut replies).await;
    assert_eq!(
        (id, verdict_rules(&kind)),
        (1, vec!["EICAR_Test_File".to_owned()])
    );
    // The waiting call fails when no room came in time.
    assert_eq!(grpc_status(waiting).await, Code::ResourceExhausted as i32);
    assert!(asked.elapsed() >= scanserver::intake::ROOM_WAIT - Duration::from_secs(1));
    assert_eq!(server.state.intake.held(), 128 << 20);
    // The stalled calls go: their room is given back.
    drop(stalled);
    until_room_held(&server, 0).await;
}
