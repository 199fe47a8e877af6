//! Coalescing: requests for content under way wait for its one scan, and recover when it fails or stalls.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_requests_for_one_content_make_one_scan() {
    let server = TestServer::start(|_| {}).await;
    let data = Bytes::from(content(1, 4 << 20));
    let calls: Vec<_> = (0..100)
        .map(|_| {
            let (data, url) = (data.clone(), server.url());
            tokio::spawn(async move {
                let chunks = (0..data.len())
                    .step_by(256 << 10)
                    .map(move |start| FileChunk {
                        file_id: 0,
                        offset: start as u64,
                        data: data.slice(start..data.len().min(start + (256 << 10))),
                        path: "C:\\Windows\\System32\\same.dll".into(),
                        ..FileChunk::default()
                    });
                let channel = Channel::from_shared(url).unwrap().connect().await.unwrap();
                ProtectionServerClient::new(channel)
                    .max_decoding_message_size(16 << 20)
                    .scan_file(tokio_stream::iter(chunks))
                    .await
                    .unwrap()
                    .into_inner()
            })
        })
        .collect();
    let mut scanned = 0;
    let mut coalesced = 0;
    for call in calls {
        let verdict = call.await.unwrap();
        assert!(matches!(
            verdict.verdict.unwrap().kind.unwrap(),
            proto::verdict::Kind::Clean(_)
        ));
        assert!(!(verdict.cached && verdict.coalesced));
        scanned += usize::from(!verdict.cached && !verdict.coalesced);
        coalesced += usize::from(verdict.coalesced);
    }
    assert_eq!(scanned, 1, "exactly one scan for one content");
    let stats = server.state.engine.cache().stats();
    assert_eq!(stats.coalesced_waits, coalesced as u64);
    assert_eq!(stats.entries, 1);
    assert!(server.state.engine.cache().flights().is_empty());
}

/// A storm of VMs on content whose scan times out: the copies that waited
/// for the first scan are not handed its failure, but once two scans of
/// the content timed out the others fail with `timeout` unscanned, rather
/// than take every scan thread in turn, each for a whole timeout. (A copy
/// that waited for a scan on a thread until it ran two timeouts fails
/// with `engine` instead, on a machine slow enough: failed either way.) Then a
/// begin for the content is answered at once, without its content, a
/// Lookup does not wait, and ScanFile fails it unscanned; new signatures
/// scan it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_on_content_that_times_out_runs_few_scans() {
    // YARA-X stops a scan at its timeout's next whole second: with 1 s, a
    // slow scan runs 1 to 2 s.
    let server = TestServer::start(|c| c.engine.scan_timeout = Duration::from_secs(1)).await;
    server.state.replace_ruleset(ruleset_from_source(SLOW_RULE));
    let data = Arc::new(vec![1u8; 200_000]);
    let digest = blake3::hash(&data);
    let mut agents = Vec::new();
    for _ in 0..12 {
        let (session, keep) = session_id(&server).await;
        let (tx, mut replies) = scan_stream(&server).await;
        let data = Arc::clone(&data);
        agents.push(tokio::spawn(async move {
            let _keep = keep;
            tx.send(begin(&session, 1, &data, Some(digest.as_bytes())))
                .await
                .unwrap();
            loop {
                match next(&mut replies).await {
                    (1, file_reply::Kind::SendContent(_)) => {
                        let requests = batch(vec![chunk(1, 0, &data), end(1)]);
                        tx.send(requests).await.unwrap();
                    }
                    (1, kind) => return failure_reason(kind),
                    other => panic!("{other:?}"),
                }
            }
        }));
    }
    for agent in agents {
        let reason = agent.await.unwrap();
        assert!(
            matches!(
                reason,
                proto::FailureReason::Timeout | proto::FailureReason::Engine
            ),
            "{reason:?}"
        );
    }
    // The first scan, and at most one more on each of the two threads
    // (copies scanned at once, before the second timeout was known).
    let scans = server.state.engine.metrics().scans.get();
    assert!((2..=3).contains(&scans), "{scans} scans for 12 copies");
    assert_eq!(server.state.engine.timed_out_contents(), 1);
    let status = server.svm.status();
    assert_eq!(status.reasons, [SvmReason::ScansTimingOut], "{status:?}");

    // Refused at its begin now: no content asked for, no scan.
    let (session, _keep) = session_id(&server).await;
    let requested = Counters::get(&server.state.counters.content_requests);
    let reply = first_reply(
        &server,
        vec![begin(&session, 7, &data, Some(digest.as_bytes()))],
    )
    .await;
    let verdict = file_verdict(reply);
    assert!(!verdict.cached, "a refusal is no cached verdict");
    let failed = match verdict.verdict.unwrap().kind.unwrap() {
        proto::verdict::Kind::Failed(failed) => failed,
        other => panic!("{other:?}"),
    };
    assert_eq!(failed.reason(), proto::FailureReason::Timeout);
    assert!(
        failed.detail.contains("twice in a row"),
        "{}",
        failed.detail
    );
    assert_eq!(
        Counters::get(&server.state.counters.content_requests),
        requested
    );
    let lookup = look_up(&server, &session, &digest).await;
    assert!(lookup.results[0].verdict.is_none(), "{lookup:?}");
    let chunks = tokio_stream::iter(vec![scan_file_chunk(0, &data, "slow.bin")]);
    let call = server.client().await.scan_file(chunks).await;
    let verdict = file_reply::Kind::Verdict(call.unwrap().into_inner());
    assert_eq!(failure_reason(verdict), proto::FailureReason::Timeout);
    assert_eq!(server.state.engine.metrics().scans.get(), scans);

    // New signatures: the content is scanned again.
    server.state.replace_ruleset(ruleset_from_source(
        "rule ones { strings: $a = { 01 01 01 01 } condition: $a }",
    ));
    assert_eq!(server.state.engine.timed_out_contents(), 0);
    assert!(server.svm.status().reasons.is_empty());
    let (tx, mut replies) = scan_stream(&server).await;
    begin_asked_for_content(&tx, &mut replies, &session, 8, &data, &digest).await;
    tx.send(batch(vec![chunk(8, 0, &data), end(8)]))
        .await
        .unwrap();
    let (_, kind) = next(&mut replies).await;
    assert_eq!(verdict_rules(&kind), ["ones"]);
    server.stop().await;
}

/// Hash-first begins waiting for a scan that times out a second time are
/// refused when it does: their content is not asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_for_a_second_timeout_are_not_asked_for_their_content() {
    let server = TestServer::start(|c| c.engine.scan_timeout = Duration::from_secs(1)).await;
    server.state.replace_ruleset(ruleset_from_source(SLOW_RULE));
    let data = vec![1u8; 200_000];
    let digest = blake3::hash(&data);
    let (session, _keep) = session_id(&server).await;
    let first = first_reply(
        &server,
        vec![begin(&session, 1, &data, None), chunk(1, 0, &data), end(1)],
    )
    .await;
    assert_eq!(failure_reason(first), proto::FailureReason::Timeout);
    let (tx, mut replies) = scan_stream(&server).await;
    begin_asked_for_content(&tx, &mut replies, &session, 2, &data, &digest).await;
    let asked = Counters::get(&server.state.counters.content_requests);
    let waiters: Vec<_> = (3..7)
        .map(|id| begin(&session, id, &data, Some(digest.as_bytes())))
        .collect();
    tx.send(batch(waiters)).await.unwrap();
    tx.send(batch(vec![chunk(2, 0, &data), end(2)]))
        .await
        .unwrap();
    let mut answered = Vec::new();
    for _ in 2..7 {
        let (id, kind) = next(&mut replies).await;
        assert_eq!(failure_reason(kind), proto::FailureReason::Timeout, "{id}");
        answered.push(id);
    }
    answered.sort_unstable();
    assert_eq!(answered, [2, 3, 4, 5, 6]);
    assert_eq!(
        Counters::get(&server.state.counters.content_requests),
        asked
    );
    assert_eq!(server.state.engine.metrics().scans.get(), 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_first_begins_for_content_under_way_wait_for_its_verdict() {
    let server = TestServer::start(|_| {}).await;
    let data = content(2, 1 << 20);
    let digest = blake3::hash(&data);
    let mut agents = Vec::new();
    for i in 0..20 {
        let (session, keep) = session_id(&server).await;
        let (tx, mut replies) = scan_stream(&server).await;
        tx.send(begin(&session, 7, &data, Some(digest.as_bytes())))
            .await
            .unwrap();
        // The first is asked for the content (before the others begin:
        // streams are read in no set order); the others wait. A begin
        // refused at once, after theirs on the same stream, shows theirs
        // was taken before the content comes.
        if i == 0 {
            assert!(matches!(
                next(&mut replies).await,
                (7, file_reply::Kind::SendContent(_))
            ));
        } else {
            tx.send(begin("no-such-session", 8, b"", None))
                .await
                .unwrap();
            assert!(matches!(
                next(&mut replies).await,
                (8, file_reply::Kind::Error(_))
            ));
        }
        agents.push((tx, replies, keep));
    }
    let (lead_tx, lead_replies, _) = &mut agents[0];
    assert_eq!(Counters::get(&server.state.counters.content_requests), 1);
    lead_tx.send(chunk(7, 0, &data)).await.unwrap();
    lead_tx.send(end(7)).await.unwrap();
    let lead = file_verdict(next(lead_replies).await.1);
    assert!(!lead.cached && !lead.coalesced);
    assert_eq!(&lead.blake3[..], digest.as_bytes(), "the digest computed");
    let version = server.state.engine.ruleset().version().to_owned();
    assert_eq!(lead.signatures_version, version);
    for (_, replies, _) in &mut agents[1..] {
        let verdict = file_verdict(next(replies).await.1);
        assert!(verdict.coalesced, "handed the lead's verdict");
        // What the agent knows is left out: the begin's digest, and the
        // version its message carries.
        assert!(verdict.blake3.is_empty() && verdict.signatures_version.is_empty());
        assert_eq!(replies.version, version);
    }
    assert_eq!(Counters::get(&server.state.counters.content_requests), 1);
    assert_eq!(
        Counters::get(&server.state.counters.bytes_received),
        data.len() as u64,
        "the content was sent once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verdict_handed_over_is_not_held_for_the_other_waits() {
    let server = TestServer::start(|_| {}).await;
    let (first, second) = (content(5, 64 << 10), content(6, 64 << 10));
    let (session, _keep) = session_id(&server).await;
    let (lead, mut lead_replies) = leading_stream(&server, &session, &first).await;
    let _second_lead = leading_stream(&server, &session, &second).await;
    // One stream waits for both; only the first lead sends its content,
    // once the waits have begun (the stream's answer to a third begin,
    // after them, says so).
    let (waiter, mut waiter_replies) = scan_stream(&server).await;
    let third = content(7, 100);
    let begins = [(1, &first), (2, &second), (3, &third)]
        .map(|(id, data)| begin(&session, id, data, Some(blake3::hash(data).as_bytes())));
    waiter.send(batch(begins.to_vec())).await.unwrap();
    let (id, reply) = next(&mut waiter_replies).await;
    assert!(matches!((id, reply), (3, file_reply::Kind::SendContent(_))));
    let started = std::time::Instant::now();
    lead.send(batch(vec![chunk(1, 0, &first), end(1)]))
        .await
        .unwrap();
    assert!(!file_verdict(next(&mut lead_replies).await.1).coalesced);
    // Its verdict reaches the waiting stream after the hold at most, not
    // when the other wait ends (its lead never sends content: that wait
    // would end with a request for content after UPLOAD_WAIT).
    let (id, reply) = next(&mut waiter_replies).await;
    assert_eq!(id, 1);
    assert!(file_verdict(reply).coalesced);
    assert!(started.elapsed() < scanserver::cache::flight::UPLOAD_WAIT / 2);
}

/// Two agents, each on a Scan stream of its own, both about to scan `data`
/// hash first: the lead has begun it and been asked for its content; the
/// waiter is ready to begin it (and wait for the lead's verdict).
struct LeadAndWaiter {
    lead: mpsc::Sender<ScanRequest>,
    lead_replies: Replies,
    waiter: mpsc::Sender<ScanRequest>,
    waiter_replies: Replies,
    waiter_begin: ScanRequest,
    _sessions: [mpsc::Sender<AgentMessage>; 2],
}

impl LeadAndWaiter {
    async fn start(server: &TestServer, data: &[u8]) -> Self {
        let digest = blake3::hash(data);
        let (session_a, keep_a) = session_id(server).await;
        let (session_b, keep_b) = session_id(server).await;
        let (lead, lead_replies) = leading_stream(server, &session_a, data).await;
        let (waiter, waiter_replies) = scan_stream(server).await;
        LeadAndWaiter {
            lead,
            lead_replies,
            waiter,
            waiter_replies,
            waiter_begin: begin(&session_b, 1, data, Some(digest.as_bytes())),
            _sessions: [keep_a, keep_b],
        }
    }

    /// Sends the waiter's begin, which is asked for its content at once:
    /// the lead gave its lead up, and the waiter leads now.
    async fn waiter_leads_at_once(&mut self) {
        let asked_at = tokio::time::Instant::now();
        self.waiter_is_asked_for_content().await;
        assert!(asked_at.elapsed() < Duration::from_secs(1), "asked at once");
    }

    /// Sends the waiter's begin, and returns once it is asked for its
    /// content.
    async fn waiter_is_asked_for_content(&mut self) {
        self.waiter.send(self.waiter_begin.clone()).await.unwrap();
        let reply = next(&mut self.waiter_replies).await.1;
        assert!(
            matches!(reply, file_reply::Kind::SendContent(_)),
            "{reply:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_is_asked_for_its_content_when_the_lead_gives_up() {
    let server = TestServer::start(|_| {}).await;
    let data = content(3, 64 << 10);
    let mut lw = LeadAndWaiter::start(&server, &data).await;
    lw.waiter.send(lw.waiter_begin.clone()).await.unwrap();
    // The lead sends half its content, then cancels.
    lw.lead.send(chunk(1, 0, &data[..1000])).await.unwrap();
    lw.lead.send(cancel(1)).await.unwrap();
    assert_eq!(
        error_code(&next(&mut lw.lead_replies).await.1),
        Code::Cancelled
    );
    // The waiter is asked instead; its content is scanned.
    assert!(matches!(
        next(&mut lw.waiter_replies).await.1,
        file_reply::Kind::SendContent(_)
    ));
    lw.waiter.send(chunk(1, 0, &data)).await.unwrap();
    lw.waiter.send(end(1)).await.unwrap();
    let verdict = file_verdict(next(&mut lw.waiter_replies).await.1);
    assert!(!verdict.cached && !verdict.coalesced);
    assert!(server.state.engine.cache().flights().is_empty());
}

/// A server for a test under a paused clock: its sessions need no
/// heartbeat however far the clock jumps.
async fn paused_server() -> TestServer {
    TestServer::start(|c| c.server.heartbeat_interval = Duration::from_secs(3600)).await
}

#[tokio::test(start_paused = true)]
async fn a_waiter_is_asked_for_its_content_when_the_lead_stalls() {
    let server = paused_server().await;
    let data = content(4, 64 << 10);
    // The lead's stream and both sessions stay open while `lw` lives.
    let mut lw = LeadAndWaiter::start(&server, &data).await;
    // The lead never sends its content: the waiter is asked for its own
    // once its wait's deadline passes, and not before.
    let waiting_since = tokio::time::Instant::now();
    lw.waiter_is_asked_for_content().await;
    assert!(waiting_since.elapsed() >= scanserver::cache::flight::UPLOAD_WAIT);
    // The lead, none of whose content came, gave its lead up then: the same
    // content begun later leads at once, rather than waiting for the lead
    // again.
    let mut again = lw.waiter_begin.clone();
    let Some(file_request::Kind::Begin(begin)) = &mut again.requests[0].kind else {
        unreachable!()
    };
    begin.file_id = 2;
    let asked_at = tokio::time::Instant::now();
    lw.waiter.send(again).await.unwrap();
    let (id, reply) = next(&mut lw.waiter_replies).await;
    assert!(matches!(reply, file_reply::Kind::SendContent(_)) && id == 2);
    assert!(asked_at.elapsed() < Duration::from_secs(1), "asked at once");
    // The scan runs on the engine's threads, which the paused clock would
    // not wait for.
    tokio::time::resume();
    lw.waiter.send(chunk(1, 0, &data)).await.unwrap();
    lw.waiter.send(end(1)).await.unwrap();
    let reply = next(&mut lw.waiter_replies).await.1;
    assert!(verdict_rules(&reply).is_empty(), "scanned, and clean");
    let verdict = file_verdict(reply);
    assert!(!verdict.cached && !verdict.coalesced);
}

/// A waiter whose wait ended sends its own copy of the content. While a
/// scan thread is on that content (here a job of it held on its thread,
/// waiting for mapped room), the copy waits for the lead's scan rather
/// than start a second one: were the first thread stuck, a second scan
/// would stick another before the first counted as stuck.
#[tokio::test(start_paused = true)]
async fn a_copy_waits_for_a_scan_of_its_content_under_way() {
    let server = TestServer::start(|c| {
        c.server.heartbeat_interval = Duration::from_secs(3600);
        c.engine.threads = 2;
        c.engine.scan_timeout = Duration::from_secs(10);
        c.engine.mapped_budget = 1 << 20;
    })
    .await;
    use scanserver::cache::flight::LEAD_PROGRESS;
    let data = content(7, 2 * LEAD_PROGRESS as usize);
    let engine = Arc::clone(&server.state.engine);
    let (room, on_it) = hold_a_scan_thread(&engine, blake3::hash(&data), data.len() as u64).await;
    let mut lw = LeadAndWaiter::start(&server, &data).await;
    // The lead's content keeps coming: it keeps its lead.
    let (first, rest) = data.split_at(LEAD_PROGRESS as usize);
    lw.lead.send(chunk(1, 0, first)).await.unwrap();
    lw.waiter_is_asked_for_content().await;
    // The scans run on the engine's threads, which the paused clock would
    // not wait for.
    tokio::time::resume();
    lw.waiter.send(chunk(1, 0, &data)).await.unwrap();
    lw.waiter.send(end(1)).await.unwrap();
    let early = tokio::time::timeout(Duration::from_millis(500), next(&mut lw.waiter_replies));
    assert!(early.await.is_err(), "the copy was scanned on its own");
    lw.lead.send(chunk(1, LEAD_PROGRESS, rest)).await.unwrap();
    lw.lead.send(end(1)).await.unwrap();
    let lead = file_verdict(next(&mut lw.lead_replies).await.1);
    assert!(!lead.cached && !lead.coalesced);
    let copy = file_verdict(next(&mut lw.waiter_replies).await.1);
    assert!(copy.coalesced, "the copy waited for the lead's scan");
    drop(room);
    assert!(on_it.join().is_ok());
}

/// A lead whose content stops coming gives its lead up an UPLOAD_WAIT
/// later: a byte now and then does not hold the content's flight for
/// ever.
#[tokio::test(start_paused = true)]
async fn a_lead_whose_content_stops_coming_gives_its_lead_up() {
    use scanserver::cache::flight::UPLOAD_WAIT;
    let server = paused_server().await;
    let data = content(5, 64 << 10);
    let mut lw = LeadAndWaiter::start(&server, &data).await;
    lw.lead.send(chunk(1, 0, &data[..1])).await.unwrap();
    tokio::time::sleep(UPLOAD_WAIT * 2 + Duration::from_secs(1)).await;
    // Given up: another VM's begin of the same content leads at once.
    lw.waiter_leads_at_once().await;
}

/// A lead that sends its content a little at a time, less than
/// LEAD_PROGRESS in each UPLOAD_WAIT, gives its lead up as one whose content
/// stopped does: it would otherwise hold every request for the same content
/// waiting.
#[tokio::test(start_paused = true)]
async fn a_lead_that_trickles_its_content_gives_its_lead_up() {
    use scanserver::cache::flight::{LEAD_PROGRESS, UPLOAD_WAIT};
    let server = paused_server().await;
    let data = content(6, 2 * LEAD_PROGRESS as usize);
    let mut lw = LeadAndWaiter::start(&server, &data).await;
    let step = 64 << 10;
    let started = tokio::time::Instant::now();
    for (n, part) in data.chunks(step).take(8).enumerate() {
        lw.lead
            .send(chunk(1, (n * step) as u64, part))
            .await
            .unwrap();
        tokio::time::sleep(UPLOAD_WAIT / 3).await;
    }
    assert!(started.elapsed() > UPLOAD_WAIT * 2, "still uploading");
    // Given up: another VM's begin of the same content leads at once.
    lw.waiter_leads_at_once().await;
}

/// A lead all of whose content came, less than LEAD_PROGRESS, keeps its
/// lead while its end is on the way: later requests wait for its scan.
#[tokio::test(start_paused = true)]
async fn a_lead_whose_content_all_came_keeps_its_lead() {
    use scanserver::cache::flight::UPLOAD_WAIT;
    let server = paused_server().await;
    let data = content(8, 64 << 10);
    let mut lw = LeadAndWaiter::start(&server, &data).await;
    lw.lead.send(chunk(1, 0, &data)).await.unwrap();
    tokio::time::sleep(UPLOAD_WAIT + Duration::from_secs(1)).await;
    lw.waiter.send(lw.waiter_begin.clone()).await.unwrap();
    let asked = tokio::time::timeout(Duration::from_secs(5), next(&mut lw.waiter_replies));
    assert!(asked.await.is_err(), "the waiter waits for the lead");
    // The scan runs on an engine thread, which the paused clock would not
    // wait for.
    tokio::time::resume();
    lw.lead.send(end(1)).await.unwrap();
    let copy = file_verdict(next(&mut lw.waiter_replies).await.1);
    assert!(copy.coalesced, "the lead's verdict");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_takes_no_replies_lets_go_of_the_content_it_leads() {
    let idle = Duration::from_secs(3);
    let server = TestServer::start(|c| c.server.idle_timeout = idle).await;
    let data = content(7, 64 << 10);
    let started = std::time::Instant::now();
    let mut lw = LeadAndWaiter::start(&server, &data).await;
    // The lead stops reading and keeps sending refused begins until the
    // server's reply buffer and the HTTP/2 windows are full.
    let lead = lw.lead.clone();
    tokio::spawn(async move {
        for batch in 0..50 {
            if lead.send(refused_begins(2 + batch * 1000)).await.is_err() {
                break;
            }
        }
    });
    // The replies waiting beyond the stream's first 64 KiB hold room in
    // the message budget.
    let held = || server.state.intake.held();
    until_read("the replies' room", || held() > 3 << 20, true).await;
    // Another VM's begin for the content the lead was asked for: the lead's
    // stream is closed once it has taken no reply for the idle timeout, and
    // the waiter is asked for its own content then, not after the wait's
    // full UPLOAD_WAIT (nor closed as idle itself, which a wait ending
    // later would bring).
    lw.waiter_is_asked_for_content().await;
    // (A wait to its end would have taken UPLOAD_WAIT from its begin, made
    // after `started`.)
    let upload_wait = scanserver::cache::flight::UPLOAD_WAIT;
    let elapsed = started.elapsed();
    assert!(
        elapsed < upload_wait - Duration::from_secs(1),
        "{elapsed:?}"
    );
    lw.waiter.send(chunk(1, 0, &data)).await.unwrap();
    lw.waiter.send(end(1)).await.unwrap();
    let verdict = file_verdict(next(&mut lw.waiter_replies).await.1);
    assert!(!verdict.cached && !verdict.coalesced);
    // The lead's stream is gone, and its replies' room with it.
    let given_back = || server.state.intake.held() < 1 << 20;
    until_read("the replies' room given back", given_back, true).await;
}

/// A message of a thousand begins, from file id `first` on, naming an
/// unknown session (as long as a session id may be): each is refused with
/// a reply that quotes it.
fn refused_begins(first: u64) -> ScanRequest {
    let bogus = "x".repeat(scanserver::service::MAX_SESSION_ID_LEN);
    let ids = first..first + 1000;
    let requests = ids.flat_map(|id| begin(&bogus, id, b"", None).requests);
    ScanRequest {
        requests: requests.collect(),
    }
}

/// A stream whose agent ends its requests and takes none of the replies
/// left lets go of them, and of their room in the message budget, once
/// they have waited for the idle timeout: HTTP/2 would keep them for as
/// long as the agent keeps the stream open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_left_unread_after_a_stream_ends_are_let_go() {
    let idle = Duration::from_secs(4);
    let server = TestServer::start(|c| c.server.idle_timeout = idle).await;
    // A client that reads none of its replies (a window of 1 KiB).
    let (response, mut body) = raw_call(&server, [127, 0, 0, 1], "Scan", 1 << 10).await;
    for batch in 0..10 {
        body.send_data(framed(&refused_begins(batch * 1000)), false)
            .unwrap();
    }
    let held = || server.state.intake.held();
    until_read("the replies' room", || held() > 1 << 20, true).await;
    // The agent ends its requests; the replies wait for it.
    body.send_data(Bytes::new(), true).unwrap();
    tokio::time::sleep(idle / 4).await;
    assert!(held() > 1 << 20, "kept for the idle timeout");
    until_read("the replies' room given back", || held() == 0, true).await;
    drop(response);
}

/// An agent that takes none of its replies while its files' verdicts wait
/// for room among them cannot keep its stream going without those
/// verdicts by sending other requests: once one is given up on, the stream
/// ends, and the agent knows its files went without a reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ends_when_a_verdict_for_it_is_given_up_on() {
    const FILES: u64 = 600;
    let idle = Duration::from_secs(3);
    let server = TestServer::start(|c| {
        c.server.idle_timeout = idle;
        c.uploads.files_in_flight = 2 * FILES as u32;
    })
    .await;
    // Verdicts of 8 KiB: a few hundred fill the client's HTTP/2 window, the
    // server's HTTP/2 buffer and its reply buffer.
    let threat = "x".repeat(8 << 10);
    server.state.replace_ruleset(ruleset_from_source(&format!(
        r#"rule everything {{ meta: threat = "{threat}" condition: true }}"#
    )));
    let (session, _keep) = session_id(&server).await;
    let channel = Channel::from_shared(server.url())
        .unwrap()
        .initial_stream_window_size(64 << 10)
        .initial_connection_window_size(64 << 10)
        .connect()
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(16);
    let mut replies = ProtectionServerClient::new(channel)
        .scan(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    // Scanned one by one, their verdicts queued as they come, until room
    // runs out; none is refused.
    for id in 0..FILES {
        let data = id.to_le_bytes();
        let whole = vec![
            begin(&session, id, &data, None),
            chunk(id, 0, &data),
            end(id),
        ];
        tx.send(batch(whole)).await.unwrap();
    }
    // Then one more file, sent a byte at a time for as long as the stream
    // takes it: the stream receives content, and is never idle.
    let slow = FILES;
    tokio::spawn(async move {
        let _ = tx.send(begin(&session, slow, &[0; 1 << 20], None)).await;
        for offset in 0..(1 << 20) {
            if tx.send(chunk(slow, offset, &[0])).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    // Past the idle timeout of the verdicts waiting for room, the agent
    // reads: every file has its verdict, or the stream ended.
    tokio::time::sleep(idle * 3).await;
    let mut answered = std::collections::HashSet::new();
    let ended = loop {
        match tokio::time::timeout(idle * 2, replies.message()).await {
            Err(_) => break false,
            Ok(Ok(Some(message))) => answered.extend(message.replies.iter().map(|r| r.file_id)),
            Ok(_) => break true,
        }
    };
    assert!(
        ended || (0..FILES).all(|id| answered.contains(&id)),
        "{} of {FILES} files answered, and the stream still open",
        answered.len()
    );
    assert!(ended, "verdicts waited for room, and were given up on");
}
