//! Hash-first verdicts: known digests answered without content, on Scan streams and through Lookup.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_digest_is_answered_without_content() {
    let server = TestServer::start(|_| {}).await;
    let (session, _keep) = session_id(&server).await;
    let (tx, mut replies) = scan_stream(&server).await;
    let data = b"some document content".repeat(100);
    let digest = blake3::hash(&data);

    begin_asked_for_content(&tx, &mut replies, &session, 1, &data, &digest).await;
    tx.send(chunk(1, 0, &data)).await.unwrap();
    tx.send(end(1)).await.unwrap();
    assert!(verdict_rules(&next(&mut replies).await.1).is_empty());

    let received = Counters::get(&server.state.counters.bytes_received);
    let requested = Counters::get(&server.state.counters.content_requests);
    tx.send(begin(&session, 2, &data, Some(digest.as_bytes())))
        .await
        .unwrap();
    let (id, kind) = next(&mut replies).await;
    let file_reply::Kind::Verdict(verdict) = kind else {
        panic!("{kind:?}")
    };
    assert_eq!(id, 2);
    assert!(verdict.cached);
    assert!(verdict.blake3.is_empty() && verdict.signatures_version.is_empty());
    assert_eq!(replies.version, server.state.engine.ruleset().version());
    assert_eq!(
        Counters::get(&server.state.counters.bytes_received),
        received,
        "no content was sent"
    );
    assert_eq!(
        Counters::get(&server.state.counters.content_requests),
        requested
    );

    let lookup = server
        .client()
        .await
        .lookup(LookupRequest {
            session_id: session.clone(),
            digests: vec![
                Bytes::copy_from_slice(digest.as_bytes()),
                Bytes::copy_from_slice(blake3::hash(b"never seen").as_bytes()),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(lookup.results[0].verdict.as_ref().is_some_and(|v| v.cached));
    assert!(lookup.results[1].verdict.is_none());
}

/// A file id names one file from its begin to its final reply. While a
/// file ended is being scanned, a begin reusing its id is refused: the
/// scan's verdict must not be taken for the new file's. A begin naming a
/// file still open drops both, with one error. Every file gets one final
/// reply, whatever else the agent sends under its id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_id_is_taken_until_its_final_reply() {
    // YARA-X stops a scan at its timeout's next whole second: with 2 s, a
    // slow scan runs at least 1 s.
    let server = TestServer::start(|c| c.engine.scan_timeout = Duration::from_secs(2)).await;
    server.state.replace_ruleset(ruleset_from_source(SLOW_RULE));
    let (session, _keep) = session_id(&server).await;
    let (tx, mut replies) = scan_stream(&server).await;
    let slow = vec![1u8; 200_000];
    let requests = vec![
        begin(&session, 1, &slow, None),
        chunk(1, 0, &slow),
        end(1),
        begin(&session, 1, b"x", None),
    ];
    tx.send(batch(requests)).await.unwrap();
    let (id, refused) = next(&mut replies).await;
    assert_eq!(
        (id, error_code(&refused)),
        (1, tonic::Code::InvalidArgument)
    );
    assert!(
        format!("{refused:?}").contains("still being scanned"),
        "{refused:?}"
    );
    let (id, timed_out) = next(&mut replies).await;
    let verdict = file_verdict(timed_out).verdict.unwrap().kind.unwrap();
    assert_eq!(id, 1);
    assert!(
        matches!(verdict, proto::verdict::Kind::Failed(_)),
        "{verdict:?}"
    );
    // Answered: the id is free again.
    let requests = vec![begin(&session, 1, b"x", None), chunk(1, 0, b"x"), end(1)];
    tx.send(batch(requests)).await.unwrap();
    let (id, verdict) = next(&mut replies).await;
    let verdict = file_verdict(verdict).verdict.unwrap().kind.unwrap();
    // The slow rule matches what it has time to look at.
    assert!(
        id == 1 && matches!(verdict, proto::verdict::Kind::Infected(_)),
        "{verdict:?}"
    );

    // One final reply per file: what the agent still sends of a file that
    // had its error is dropped without a word (a second reply under the id
    // would be taken for the next file's), and a chunk or an end for a
    // file being scanned too.
    let requests = vec![
        begin(&session, 2, b"abc", None),
        begin(&session, 2, b"abc", None),
        chunk(2, 0, b"abc"),
        end(2),
        begin(&session, 3, b"abcd", None),
        chunk(3, 2, b"cd"),
        chunk(3, 0, b"ab"),
        end(3),
        begin(&session, 4, &slow, None),
        chunk(4, 0, &slow),
        end(4),
        chunk(4, slow.len() as u64, b"y"),
        end(4),
        begin(&session, 5, b"z", None),
        chunk(5, 0, b"z"),
        end(5),
    ];
    tx.send(batch(requests)).await.unwrap();
    let invalid = tonic::Code::InvalidArgument;
    next_error(&mut replies, 2, invalid, "both are dropped").await;
    next_error(&mut replies, 3, invalid, "out of order").await;
    let mut verdicts = vec![next(&mut replies).await, next(&mut replies).await];
    verdicts.sort_by_key(|(id, _)| *id);
    for ((id, reply), expected) in verdicts.into_iter().zip([4, 5]) {
        assert_eq!(id, expected);
        file_verdict(reply);
    }
    // A chunk for a file never begun still gets its error.
    tx.send(batch(vec![chunk(6, 0, b"?")])).await.unwrap();
    next_error(&mut replies, 6, invalid, "not open").await;
    server.stop().await;
}

/// A begin whose verdict is cached is its file's final reply at once: it
/// takes no place in flight, and is answered while the VM's places are all
/// taken. Its verdict counts for the session all the same.
#[tokio::test]
async fn a_known_digest_is_answered_while_the_vm_has_no_place_free() {
    let server = TestServer::start(|c| c.uploads.files_in_flight = 1).await;
    let (session, _keep) = session_id(&server).await;
    let (tx, mut replies) = scan_stream(&server).await;
    let known = b"a document seen before".repeat(10);
    let digest = blake3::hash(&known);
    begin_asked_for_content(&tx, &mut replies, &session, 1, &known, &digest).await;
    tx.send(batch(vec![chunk(1, 0, &known), end(1)]))
        .await
        .unwrap();
    assert_eq!(next(&mut replies).await.0, 1);

    // File 2 takes the VM's one place, waiting for its content.
    let unknown = b"content never sent";
    let unknown_digest = blake3::hash(unknown);
    begin_asked_for_content(&tx, &mut replies, &session, 2, unknown, &unknown_digest).await;
    tx.send(begin(&session, 3, &known, Some(digest.as_bytes())))
        .await
        .unwrap();
    let (id, kind) = next(&mut replies).await;
    assert_eq!(id, 3);
    assert!(file_verdict(kind).cached);
    // Counted before it went out: an agent that ends a full scan on it
    // finds the scan's files counted.
    let counted = server.state.sessions.get(&session).unwrap();
    let figure = |figure: &AtomicU64| figure.load(Ordering::Relaxed);
    assert_eq!(figure(&counted.files), 2);
    assert_eq!(figure(&counted.bytes), 2 * known.len() as u64);

    // Content the server does not know still needs a place.
    let other = b"other content";
    let other_digest = blake3::hash(other);
    tx.send(begin(&session, 4, other, Some(other_digest.as_bytes())))
        .await
        .unwrap();
    next_error(&mut replies, 4, tonic::Code::ResourceExhausted, "in flight").await;
    // The cached verdict kept no place: file 2's, once cancelled, is free.
    tx.send(cancel(2)).await.unwrap();
    next_error(&mut replies, 2, tonic::Code::Cancelled, "cancelled").await;
    begin_asked_for_content(&tx, &mut replies, &session, 5, other, &other_digest).await;
}

/// Files in flight are counted until answered, when the session that
/// began them has ended too (its agent closed Connect first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_in_flight_outlive_the_session_that_began_them() {
    let server = TestServer::start(|_| {}).await;
    let (session, keep) = session_id(&server).await;
    let (tx, mut replies) = scan_stream(&server).await;
    let data = b"content to come";
    tx.send(begin(&session, 1, data, None)).await.unwrap();
    let in_flight = || server.state.sessions.files_in_flight();
    until_read("files in flight", in_flight, 1).await;
    drop(keep);
    until_read("sessions", || server.state.sessions.len(), 0).await;
    assert_eq!(in_flight(), 1, "the file is still owed its verdict");
    tx.send(batch(vec![chunk(1, 0, data), end(1)]))
        .await
        .unwrap();
    let (id, verdict) = next(&mut replies).await;
    assert_eq!((id, file_verdict(verdict).detection_count()), (1, 0));
    assert_eq!(in_flight(), 0);
}

/// A begin is checked against its session as it is handled, not as its
/// message arrived: one after an end that waited for room in the scan
/// queue, while the session ended, is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_begin_after_a_wait_is_refused_if_its_session_ended_meanwhile() {
    let server = TestServer::start(|c| c.engine.queue_capacity = 1).await;
    let (session, keep) = session_id(&server).await;
    let (tx, mut replies) = scan_stream(&server).await;
    // The scan queue is full: file 1's end waits for room.
    let held = ScanJob::bytes(b"held".to_vec(), None);
    let slot = server.state.engine.reserve(&held.content).await;
    let data = b"content whose end waits";
    let requests = vec![
        begin(&session, 1, data, None),
        chunk(1, 0, data),
        end(1),
        begin(&session, 2, data, None),
    ];
    tx.send(batch(requests)).await.unwrap();
    // Waited for until file 1's end leads the flight for its content, and
    // so waits for room in the queue. Its content being in is not enough:
    // a slow stream may not be at the end yet, which then waits for
    // nothing, and begin 2 goes with the session its message looked up.
    let flights = server.state.engine.cache().flights();
    until_read("file 1's end under way", || flights.is_empty(), false).await;
    drop(keep);
    until_read("sessions", || server.state.sessions.len(), 0).await;
    // The end waits longer than what counts as a wait (a millisecond).
    tokio::time::sleep(Duration::from_millis(10)).await;
    drop(slot);
    // File 2's refusal goes out with the message's replies, file 1's
    // verdict when its scan is done: in either order.
    let mut answers = [next(&mut replies).await, next(&mut replies).await];
    answers.sort_by_key(|(id, _)| *id);
    let [(1, verdict), (2, refused)] = answers else {
        panic!("one reply for each file: {answers:?}");
    };
    assert_eq!(file_verdict(verdict).detection_count(), 0);
    assert_eq!(
        error_code(&refused),
        Code::FailedPrecondition,
        "{refused:?}"
    );
}

/// A Lookup that names the same infected content many times has it
/// counted (and logged) once for its VM: naming it again is not finding
/// more malware. Clean content named again counts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_counts_infected_content_once_however_often_named() {
    let server = TestServer::start(|_| {}).await;
    let (session, _keep) = session_id(&server).await;
    for data in [EICAR, b"clean".as_slice()] {
        let requests = vec![begin(&session, 1, data, None), chunk(1, 0, data), end(1)];
        file_verdict(first_reply(&server, requests).await);
    }
    let counted = || {
        let counted = server.state.sessions.get(&session).unwrap();
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        (get(&counted.files), get(&counted.detections))
    };
    let before = counted();
    let digest = |data: &[u8]| Bytes::copy_from_slice(blake3::hash(data).as_bytes());
    let mut digests = vec![digest(EICAR); 200];
    digests.extend(vec![digest(b"clean"); 400]);
    let reply = server
        .client()
        .await
        .lookup(LookupRequest {
            session_id: session.clone(),
            digests,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(reply.results.iter().all(|r| r.verdict.is_some()));
    let after = counted();
    assert_eq!((after.0 - before.0, after.1 - before.1), (401, 1));
}

/// A Lookup's answer is made from its request and held with it: the room
/// its message took (eight times its size) stays with the call while it
/// waits for a scan under way, and until its answer is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_keeps_the_room_for_its_answer_until_answered() {
    let server = TestServer::start(|_| {}).await;
    let (session, _keep) = session_id(&server).await;
    // Small enough that its chunk takes no room.
    let data = content(9, 16 << 10);
    let (lead, mut lead_replies) = leading_stream(&server, &session, &data).await;
    let request = LookupRequest {
        session_id: session.clone(),
        digests: vec![Bytes::copy_from_slice(blake3::hash(&data).as_bytes()); 1000],
    };
    let room = ((prost::Message::encoded_len(&request) * scanserver::intake::LOOKUP_WEIGHT)
        .div_ceil(1024) as u64)
        << 10;
    let mut client = server.client().await;
    let lookup = tokio::spawn(async move { client.lookup(request).await });
    until_room_held(&server, room).await;
    // The lead's scan lands: the Lookup is answered, and its room goes.
    lead.send(chunk(1, 0, &data)).await.unwrap();
    lead.send(end(1)).await.unwrap();
    file_verdict(next(&mut lead_replies).await.1);
    let answer = lookup.await.unwrap().unwrap().into_inner();
    assert_eq!(answer.results.len(), 1000);
    assert!(
        (answer.results.iter()).all(|r| r.verdict.as_ref().is_some_and(|v| v.coalesced)),
        "every copy answered by the scan it waited for"
    );
    until_room_held(&server, 0).await;
}

/// A Lookup's answer that its client does not read keeps its room (until
/// the idle timeout, see below): it is handed to HTTP/2 a slice at a time,
/// as the client takes it, not whole (where it would wait for the client,
/// uncounted, once its body was gone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unread_lookup_answer_keeps_its_room() {
    let server = TestServer::start(|_| {}).await;
    let (response, _open) = unread_lookup(&server).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        server.state.intake.held() > 0,
        "the unread answer keeps its room"
    );
    let mut answer = response.into_body();
    while let Some(data) = answer.data().await {
        let _ = answer.flow_control().release_capacity(data.unwrap().len());
    }
    until_room_held(&server, 0).await;
}

/// A Lookup's answer whose client takes nothing of it for the idle
/// timeout is dropped, with its room: the client, reading on, finds it cut
/// short, and the call ended with DEADLINE_EXCEEDED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_answer_left_unread_is_dropped_after_the_idle_timeout() {
    let server = TestServer::start(|c| c.server.idle_timeout = Duration::from_secs(2)).await;
    let (response, _open) = unread_lookup(&server).await;
    until_room_held(&server, 0).await;
    let mut answer = response.into_body();
    let mut read = 0;
    while let Some(data) = answer.data().await {
        let data = data.unwrap();
        read += data.len();
        let _ = answer.flow_control().release_capacity(data.len());
    }
    assert!(read < 256 << 10, "cut short: {read} bytes");
    let trailers = answer.trailers().await.unwrap().expect("the call's status");
    assert_eq!(trailers["grpc-status"], "4", "DEADLINE_EXCEEDED");
}

/// The answer of a Lookup of 100,000 digests of known, clean content (about
/// a megabyte), from a client that reads 1 KiB of it, then nothing; with
/// what keeps the session and the request open.
async fn unread_lookup(
    server: &TestServer,
) -> (
    http::Response<h2::RecvStream>,
    (mpsc::Sender<AgentMessage>, h2::SendStream<Bytes>),
) {
    let (session, keep) = session_id(server).await;
    let data = b"known content";
    let requests = vec![begin(&session, 1, data, None), chunk(1, 0, data), end(1)];
    file_verdict(first_reply(server, requests).await);
    let request = LookupRequest {
        session_id: session,
        digests: vec![Bytes::copy_from_slice(blake3::hash(data).as_bytes()); 100_000],
    };
    let (response, mut body) = raw_call(server, [127, 0, 0, 1], "Lookup", 1 << 10).await;
    body.send_data(framed(&request), true).unwrap();
    (response.await.unwrap(), (keep, body))
}

/// A Lookup is one message: a second on its request fails the call
/// (INVALID_ARGUMENT), rather than be read and dropped while the first
/// one's room waits for the request's end (each new message would restart
/// the wait for it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_of_two_messages_is_refused() {
    let server = TestServer::start(|_| {}).await;
    let (session, _keep) = session_id(&server).await;
    let request = LookupRequest {
        session_id: session,
        digests: vec![Bytes::copy_from_slice(&[7; 32])],
    };
    let (response, mut body) = raw_call(&server, [127, 0, 0, 1], "Lookup", 1 << 20).await;
    body.send_data(framed(&request), false).unwrap();
    body.send_data(framed(&request), true).unwrap();
    assert_eq!(grpc_status(response).await, Code::InvalidArgument as i32);
    until_room_held(&server, 0).await;
}

/// A VM has at most `LOOKUPS_AT_ONCE` Lookups answered at once (each may
/// hold 100,000 digests and wait for scans under way); one more is refused
/// with RESOURCE_EXHAUSTED, also on a new session of the same VM (its agent
/// reconnected), and the others are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_at_once_for_a_vm_are_bounded() {
    let server = TestServer::start(|_| {}).await;
    let vm = Hello {
        vm_id: "vm-looking-up".into(),
        ..hello()
    };
    let (session, _keep) = session_of(&server, vm.clone()).await;
    let (tx, mut replies) = scan_stream(&server).await;
    let data = b"content under way".to_vec();
    let digest = blake3::hash(&data);
    tx.send(begin(&session, 1, &data, Some(digest.as_bytes())))
        .await
        .unwrap();
    let (_, asked) = next(&mut replies).await;
    assert!(
        matches!(asked, file_reply::Kind::SendContent(_)),
        "{asked:?}"
    );
    let client = server.client().await;
    let lookup = |session: &String| {
        let request = LookupRequest {
            session_id: session.clone(),
            digests: vec![Bytes::copy_from_slice(digest.as_bytes())],
        };
        let mut client = client.clone();
        tokio::spawn(async move { client.lookup(request).await })
    };
    // They wait for the content under way.
    let waiting: Vec<_> = (0..scanserver::sessions::LOOKUPS_AT_ONCE)
        .map(|_| lookup(&session))
        .collect();
    let held = server.state.sessions.get(&session).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while held.lookups.available_permits() > 0 {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(waiting.iter().all(|call| !call.is_finished()));
    let refused = lookup(&session).await.unwrap().unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    let (again, _keep_again) = session_of(&server, vm).await;
    let refused = lookup(&again).await.unwrap().unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");

    tx.send(batch(vec![chunk(1, 0, &data), end(1)]))
        .await
        .unwrap();
    for answered in waiting {
        let answered = answered.await.unwrap().unwrap().into_inner();
        assert!(answered.results[0].verdict.is_some(), "{answered:?}");
    }
    assert!(matches!(
        next(&mut replies).await.1,
        file_reply::Kind::Verdict(_)
    ));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_gives_no_verdict_when_the_rules_look_at_names() {
    let server = TestServer::start(|_| {}).await;
    server.state.replace_ruleset(ruleset_from_source(
        r#"rule by_name { condition: filename == "invoice.pdf.exe" }"#,
    ));
    let (session, _keep) = session_id(&server).await;
    let data = b"an attachment".repeat(10);
    // Content sent without a name is clean, and cached so.
    let chunks = tokio_stream::iter(vec![scan_file_chunk(0, &data, "")]);
    let verdict = server.client().await.scan_file(chunks).await.unwrap();
    let verdict = verdict.into_inner().verdict.unwrap().kind.unwrap();
    assert!(
        matches!(verdict, proto::verdict::Kind::Clean(_)),
        "{verdict:?}"
    );
    // That is no verdict for a file the agent may have under any name.
    let lookup = server
        .client()
        .await
        .lookup(LookupRequest {
            session_id: session,
            digests: vec![Bytes::copy_from_slice(blake3::hash(&data).as_bytes())],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(lookup.results[0].verdict.is_none(), "{lookup:?}");
}
