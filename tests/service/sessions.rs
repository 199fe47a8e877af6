//! Sessions: hellos accepted and rejected, a VM's places in flight, sessions replaced, lost and cut off.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hellos_are_accepted_or_rejected_with_a_reason() {
    let server = TestServer::start(|c| c.server.allowed_tags = vec!["vdi".into()]).await;
    let (welcome, _keep) = open_session(&server, hello()).await;
    let server_message::Kind::Welcome(welcome) = welcome else {
        panic!("{welcome:?}")
    };
    assert!(!welcome.session_id.is_empty());
    assert_eq!(
        welcome.signatures_version,
        server.state.engine.ruleset().version()
    );
    assert_eq!(server.state.sessions.len(), 1);

    let cases = [
        (
            Hello {
                protocol_version: 99,
                ..hello()
            },
            RejectReason::IncompatibleVersion,
        ),
        (
            Hello {
                connection_tags: vec!["server".into()],
                ..hello()
            },
            RejectReason::TagNotAllowed,
        ),
        (
            Hello {
                require_encryption: true,
                ..hello()
            },
            RejectReason::EncryptionRequired,
        ),
        (
            Hello {
                vm_id: String::new(),
                ..hello()
            },
            RejectReason::InvalidHello,
        ),
        (
            Hello {
                vm_name: "x".repeat(257),
                ..hello()
            },
            RejectReason::InvalidHello,
        ),
        (
            Hello {
                agent_id: "agent\n2026-12-01T00:00:00Z ERROR forged".into(),
                ..hello()
            },
            RejectReason::InvalidHello,
        ),
        (
            Hello {
                connection_tags: vec!["t".into(); 17],
                ..hello()
            },
            RejectReason::InvalidHello,
        ),
        (
            Hello {
                connection_tags: vec!["t".repeat(257)],
                ..hello()
            },
            RejectReason::InvalidHello,
        ),
    ];
    for (hello, reason) in cases {
        let (reply, _) = open_session(&server, hello).await;
        let server_message::Kind::Rejection(rejection) = reply else {
            panic!("{reply:?}")
        };
        assert_eq!(rejection.reason(), reason);
        assert!(!rejection.message.is_empty());
    }
    let full = TestServer::start(|c| c.server.max_agents = 0).await;
    let (reply, _) = open_session(&full, hello()).await;
    assert!(
        matches!(reply, server_message::Kind::Rejection(r) if r.reason() == RejectReason::Capacity)
    );
}

/// A VM has one session: a newer one (its agent reconnected before the
/// earlier one timed out, say) replaces the earlier, which is told and
/// closed, and counts no more against the limit of agents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_session_of_a_vm_replaces_the_earlier() {
    let server = TestServer::start(|c| c.server.max_agents = 1).await;
    let welcome = |kind| match kind {
        Some(server_message::Kind::Welcome(welcome)) => welcome.session_id,
        other => panic!("expected a welcome, got {other:?}"),
    };
    let (_first_out, mut first) = connect(&server, hello()).await;
    let earlier = welcome(first.message().await.unwrap().unwrap().kind);
    let (_second_out, mut second) = connect(&server, hello()).await;
    let later = welcome(second.message().await.unwrap().unwrap().kind);
    let ended = loop {
        match first.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the earlier session ended without a word"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), Code::Aborted, "{ended:?}");
    assert_eq!(server.state.sessions.len(), 1);
    assert_eq!(server.svm.vms.session_of("vm-1"), Some(later));
    let reply = first_reply(&server, vec![begin(&earlier, 1, b"x", None)]).await;
    assert!(
        matches!(&reply, file_reply::Kind::Error(e) if e.code == Code::FailedPrecondition as i32),
        "{reply:?}"
    );
    let (other_vm, _) = open_session(
        &server,
        Hello {
            vm_id: "vm-2".into(),
            ..hello()
        },
    )
    .await;
    assert!(
        matches!(other_vm, server_message::Kind::Rejection(r) if r.reason() == RejectReason::Capacity),
        "another VM is over the limit of one agent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_agent_gets_no_places_in_flight_beyond_its_vm_s() {
    let server = TestServer::start(|c| c.uploads.files_in_flight = 2).await;
    let (earlier, _first) = session_of(&server, hello()).await;
    let (tx, mut replies) = scan_stream(&server).await;
    // Two files whose content never comes take the VM's two places.
    for id in 1..=3 {
        tx.send(begin(&earlier, id, b"pending", None))
            .await
            .unwrap();
    }
    let (id, kind) = next(&mut replies).await;
    assert_eq!((id, error_code(&kind)), (3, Code::ResourceExhausted));
    // The agent connects again: its new session has no places of its own
    // while the earlier session's files hold the VM's.
    let (later, _second) = session_of(&server, hello()).await;
    tx.send(begin(&later, 4, b"pending", None)).await.unwrap();
    let (id, kind) = next(&mut replies).await;
    assert_eq!((id, error_code(&kind)), (4, Code::ResourceExhausted));
    // A place given back is the new session's to take.
    tx.send(cancel(1)).await.unwrap();
    let (id, kind) = next(&mut replies).await;
    assert_eq!((id, error_code(&kind)), (1, Code::Cancelled));
    send_whole(&tx, &later, 5, EICAR).await;
    let (id, kind) = next(&mut replies).await;
    assert_eq!(
        (id, verdict_rules(&kind)),
        (5, vec!["EICAR_Test_File".to_owned()])
    );
}

/// Files keep their places after their session ends: an agent connecting
/// under ever new VM ids, and leaving files open on each, gets no more
/// places on the whole server than all the agents it takes may have
/// (`server.max_agents` times `uploads.files_in_flight`, here 2 × 2). Nor
/// may the paths of the files open take more than `uploads.path_budget`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_in_flight_are_bounded_on_the_whole_server() {
    let server = TestServer::start(|c| {
        c.server.max_agents = 2;
        c.server.max_connections = None;
        c.uploads.files_in_flight = 2;
        c.uploads.path_budget = 100 << 10;
    })
    .await;
    let (tx, mut replies) = scan_stream(&server).await;
    // Two VMs each leave two files whose content, asked for, never comes.
    for first in [1, 3] {
        let (session, keep) = session_id(&server).await;
        for id in first..first + 2 {
            let pending = format!("pending {id}");
            let digest = blake3::hash(pending.as_bytes());
            let begun = begin(&session, id, pending.as_bytes(), Some(digest.as_bytes()));
            tx.send(begun).await.unwrap();
            let (asked, kind) = next(&mut replies).await;
            assert_eq!(asked, id);
            assert!(matches!(kind, file_reply::Kind::SendContent(_)), "{kind:?}");
        }
        drop(keep);
        let closed = async {
            while !server.state.sessions.list().is_empty() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(20), closed)
            .await
            .expect("the session closed");
    }
    let (third, _keep) = session_id(&server).await;
    tx.send(begin(&third, 5, b"pending", None)).await.unwrap();
    next_error(
        &mut replies,
        5,
        Code::ResourceExhausted,
        "server.max_agents",
    )
    .await;
    tx.send(cancel(1)).await.unwrap();
    next_error(&mut replies, 1, Code::Cancelled, "cancelled").await;
    send_whole(&tx, &third, 6, EICAR).await;
    let (id, kind) = next(&mut replies).await;
    assert_eq!(
        (id, verdict_rules(&kind)),
        (6, vec!["EICAR_Test_File".to_owned()])
    );

    // A long path takes most of the budget for paths: another long one
    // finds no room until the first file's place is given back (places
    // are free: the files left open are cancelled).
    for id in 2..=4 {
        tx.send(cancel(id)).await.unwrap();
        next_error(&mut replies, id, Code::Cancelled, "cancelled").await;
    }
    let long = |id: u64| {
        let mut request = begin(&third, id, b"pending", None);
        if let Some(file_request::Kind::Begin(begin)) = &mut request.requests[0].kind {
            begin.path = format!("C:\\{}\\file{id}", "d".repeat(60 << 10));
        }
        request
    };
    tx.send(long(7)).await.unwrap();
    tx.send(long(8)).await.unwrap();
    next_error(
        &mut replies,
        8,
        Code::ResourceExhausted,
        "uploads.path_budget",
    )
    .await;
    tx.send(cancel(7)).await.unwrap();
    next_error(&mut replies, 7, Code::Cancelled, "cancelled").await;
    tx.send(long(9)).await.unwrap();
    tx.send(cancel(9)).await.unwrap();
    next_error(&mut replies, 9, Code::Cancelled, "cancelled").await;
}

/// A session whose agent sends nothing for three heartbeat intervals ends,
/// and its stream says why (DEADLINE_EXCEEDED), after the messages queued
/// for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_agent_loses_its_session_after_three_heartbeats() {
    let server =
        TestServer::start(|c| c.server.heartbeat_interval = Duration::from_millis(300)).await;
    // The session's stream stays open, but the agent never sends a heartbeat.
    let (_keep, mut incoming) = connect(&server, hello()).await;
    let ended = async {
        let mut heartbeats = 0;
        loop {
            match incoming.message().await {
                Ok(Some(proto::ServerMessage {
                    kind: Some(server_message::Kind::Heartbeat(_)),
                })) => heartbeats += 1,
                Ok(Some(_)) => {}
                other => return (heartbeats, other),
            }
        }
    };
    let (heartbeats, end) = tokio::time::timeout(Duration::from_secs(10), ended)
        .await
        .expect("the session ends after three missed heartbeats");
    // Three, unless the machine held the session's task up for an interval
    // or more (silence is counted in time, heartbeats in ticks).
    assert!(heartbeats >= 2, "{heartbeats}");
    let status = end.expect_err("ended by the server, saying why");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("three heartbeat"), "{status:?}");
    assert!(server.state.sessions.is_empty());
}

/// A message that is not protobuf of its type is the agent's fault: its
/// open files and its stream fail with INVALID_ARGUMENT, and the server
/// goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_message_fails_its_stream_with_invalid_argument() {
    let server = TestServer::start(|_| {}).await;
    let (session, _keep) = session_id(&server).await;
    let (response, mut body) = raw_call(&server, [127, 0, 0, 1], "Scan", 1 << 20).await;
    let data = b"some content";
    body.send_data(framed(&begin(&session, 1, data, None)), false)
        .unwrap();
    // Field 1 (requests) as a length-delimited entry longer than the rest.
    let mut malformed = grpc_header(3);
    malformed.extend_from_slice(&[0x0a, 0x7f, 0x00]);
    body.send_data(malformed.into(), true).unwrap();
    let response = response.await.unwrap();
    let mut replies = response.into_body();
    let mut received = Vec::new();
    while let Some(data) = replies.data().await {
        received.extend_from_slice(&data.unwrap());
    }
    let trailers = replies.trailers().await.unwrap().expect("trailers");
    assert_eq!(
        trailers["grpc-status"],
        (tonic::Code::InvalidArgument as i32).to_string()
    );
    let reply = <proto::ScanReply as prost::Message>::decode(&received[5..]).unwrap();
    let failed = reply.replies[0].kind.clone().unwrap();
    assert_eq!(
        (reply.replies[0].file_id, error_code(&failed)),
        (1, tonic::Code::InvalidArgument)
    );
    let again = vec![begin(&session, 1, EICAR, None), chunk(1, 0, EICAR), end(1)];
    let verdict = file_verdict(first_reply(&server, again).await);
    assert_eq!(verdict.detection_count(), 1, "the server goes on");
}

/// An agent that stops taking its session's messages loses the session;
/// once it reads again, it finds the messages queued, then the status that
/// says why (RESOURCE_EXHAUSTED).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_does_not_read_its_session_loses_it() {
    // Silence would end the session after 750 ms: the agent's heartbeats,
    // every 50 ms, keep it from that however busy the machine.
    let server =
        TestServer::start(|c| c.server.heartbeat_interval = Duration::from_millis(250)).await;
    // Raw HTTP/2 that leaves the server no room to send until told: the
    // agent reads none of its session's messages.
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (h2, mut connection) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, Bytes>(tcp)
        .await
        .unwrap();
    let (read_again, reading) = tokio::sync::oneshot::channel::<()>();
    // Told, it opens its window (once its earlier settings are taken).
    let (mut reading, mut open) = (Some(reading), false);
    tokio::spawn(std::future::poll_fn(move |cx| {
        if let Some(told) = &mut reading
            && std::pin::Pin::new(told).poll(cx).is_ready()
        {
            (reading, open) = (None, true);
        }
        if open {
            open = connection.set_initial_window_size(1 << 20).is_err();
            if open {
                cx.waker().wake_by_ref();
            }
        }
        std::pin::Pin::new(&mut connection).poll(cx)
    }));
    let (response, mut body) = h2
        .ready()
        .await
        .unwrap()
        .send_request(grpc_request(&server, "Connect"), false)
        .unwrap();
    let hello = AgentMessage {
        kind: Some(proto::agent_message::Kind::Hello(hello())),
    };
    body.send_data(framed(&hello), false).unwrap();
    until_read("sessions", || server.state.sessions.len(), 1).await;
    // Its heartbeats keep coming, so only what it leaves unread can end the
    // session: the server's heartbeats, 16 of them waiting at most.
    let beating = tokio::spawn(async move {
        for sequence in 1.. {
            let heartbeat = AgentMessage {
                kind: Some(proto::agent_message::Kind::Heartbeat(proto::Heartbeat {
                    sequence,
                })),
            };
            if body.send_data(framed(&heartbeat), false).is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    until_read("sessions", || server.state.sessions.len(), 0).await;
    beating.abort();
    read_again.send(()).unwrap();
    let mut replies = response.await.unwrap().into_body();
    while let Some(data) = replies.data().await {
        let data = data.unwrap();
        let _ = replies.flow_control().release_capacity(data.len());
    }
    let trailers = replies.trailers().await.unwrap().expect("trailers");
    assert_eq!(
        trailers["grpc-status"],
        (Code::ResourceExhausted as i32).to_string(),
        "{trailers:?}"
    );
}

/// A scan whose session the server ends (a newer session of the same VM
/// replaced it) stops: the files left fail saying why, without being
/// announced as of a session the server no longer knows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scan_stops_when_its_session_is_replaced() {
    let server = TestServer::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let paths: Vec<PathBuf> = (0..2)
        .map(|i| {
            let path = dir.path().join(format!("file-{i}"));
            std::fs::write(&path, format!("harmless {i}")).unwrap();
            path
        })
        .collect();
    // The walk gives the first file, then waits for the test.
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let walk = paths.clone().into_iter().enumerate().map(move |(i, path)| {
        if i == 1 {
            let _ = wait.recv();
        }
        path
    });
    let options = AgentOptions {
        vm_id: "vm-replaced".into(),
        ..AgentOptions::for_host(server.url())
    };
    let first = Arc::new(Agent::connect(&options).await.unwrap());
    let (outcomes, mut received) = mpsc::unbounded_channel();
    let scanning = Arc::clone(&first);
    let scan = tokio::spawn(async move {
        scanning
            .scan(Files::local(walk), HashFirst::Auto, move |_, outcome| {
                let _ = outcomes.send(outcome);
            })
            .await
    });
    let outcome = received.recv().await.expect("the first file's outcome");
    assert!(outcome.verdict.is_clean(), "{:?}", outcome.verdict);
    let _second = Agent::connect(&options).await.unwrap();
    // Once the first agent knows its session ended, the walk goes on, to
    // hand over the files left.
    until_read("ended", || first.session_ended().is_some(), true).await;
    drop(go);
    let result = scan.await.unwrap();
    assert!(
        matches!(&result, Err(scanserver::client::ClientError::SessionEnded(why)) if why.contains("replaced")),
        "{result:?}"
    );
    let outcome = received.recv().await.expect("the second file's outcome");
    let failure = outcome.verdict.failure().expect("failed, never clean");
    assert!(failure.to_string().contains("replaced"), "{failure}");
}
