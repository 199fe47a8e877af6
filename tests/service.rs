//! The Light Agent service over real gRPC on loopback: sessions, Scan,
//! ScanFile, Lookup, health, TLS and mutual TLS.

mod common;

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
    let data = content(7, 64 << 10);
    let engine = Arc::clone(&server.state.engine);
    let (room, on_it) = hold_a_scan_thread(&engine, blake3::hash(&data), data.len() as u64).await;
    let mut lw = LeadAndWaiter::start(&server, &data).await;
    // The lead's content keeps coming: it keeps its lead.
    lw.lead.send(chunk(1, 0, &data[..1])).await.unwrap();
    lw.waiter_is_asked_for_content().await;
    // The scans run on the engine's threads, which the paused clock would
    // not wait for.
    tokio::time::resume();
    lw.waiter.send(chunk(1, 0, &data)).await.unwrap();
    lw.waiter.send(end(1)).await.unwrap();
    let early = tokio::time::timeout(Duration::from_millis(500), next(&mut lw.waiter_replies));
    assert!(early.await.is_err(), "the copy was scanned on its own");
    lw.lead.send(chunk(1, 1, &data[1..])).await.unwrap();
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
    let asked_at = tokio::time::Instant::now();
    lw.waiter_is_asked_for_content().await;
    assert!(asked_at.elapsed() < Duration::from_secs(1), "asked at once");
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

/// Takes the next reply, which must be file `id`'s error of `code`, saying
/// `says`.
async fn next_error(replies: &mut Replies, id: u64, code: tonic::Code, says: &str) {
    let (got, reply) = next(replies).await;
    assert_eq!((got, error_code(&reply)), (id, code));
    assert!(format!("{reply:?}").contains(says), "{reply:?}");
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

/// The health service answers SERVING, and NOT_SERVING while the SVM
/// cannot scan: here while its one scan thread is stuck (a local scan of
/// a large file holds it, waiting for room in the mapped budget, held
/// here), then SERVING again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_service_answers_serving_while_the_svm_can_scan() {
    let server = TestServer::start(|c| {
        c.engine.threads = 1;
        c.engine.scan_timeout = Duration::from_secs(1);
        c.engine.mapped_budget = 1 << 20;
    })
    .await;
    until_health(&server, ServingStatus::Serving).await;
    let engine = Arc::clone(&server.state.engine);
    let spooled = scanserver::engine::Content::Spooled {
        file: tempfile::tempfile().unwrap(),
        size: 1 << 20,
    };
    let room = engine.reserve(&spooled).await;
    let large = tempfile::NamedTempFile::new().unwrap();
    large.as_file().set_len(33 << 20).unwrap();
    let path = large.path().to_owned();
    let held = std::thread::spawn(move || {
        engine.scan(&scanserver::engine::ScanJob::file(path));
    });
    until_health(&server, ServingStatus::NotServing).await;
    drop(room);
    held.join().unwrap();
    until_health(&server, ServingStatus::Serving).await;
}

/// Waits until the health service says `wanted` of the agent service and
/// of the server as a whole ("").
async fn until_health(server: &TestServer, wanted: ServingStatus) {
    let mut health = server.health_client().await;
    let mut said = Vec::new();
    for _ in 0..1000 {
        said.clear();
        for service in ["scanserver.v1.ProtectionServer", ""] {
            let request = tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            };
            said.push(health.check(request).await.unwrap().into_inner().status());
        }
        if said == [wanted, wanted] {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("health: {said:?}, not {wanted:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lightagent_client_scans_hash_first() {
    let server = TestServer::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("eicar.com"), EICAR).unwrap();
    std::fs::write(dir.path().join("big.bin"), vec![3u8; 12 << 20]).unwrap();
    std::fs::write(dir.path().join("note.txt"), "hello").unwrap();
    let files: Vec<PathBuf> = ["eicar.com", "big.bin", "note.txt"]
        .iter()
        .map(|f| dir.path().join(f))
        .collect();
    let agent = Agent::connect(&AgentOptions::for_host(server.url()))
        .await
        .unwrap();
    for round in 0..2 {
        let results = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = Arc::clone(&results);
        agent
            .scan(
                Files::local(files.clone()),
                HashFirst::Auto,
                move |path, outcome| {
                    sink.lock()
                        .unwrap()
                        .push((path.file_name().unwrap().to_owned(), outcome))
                },
            )
            .await
            .unwrap();
        let results = results.lock().unwrap();
        assert_eq!(results.len(), 3);
        for (name, outcome) in results.iter() {
            assert_eq!(
                outcome.verdict.kind(),
                if name == "eicar.com" {
                    "infected"
                } else {
                    "clean"
                }
            );
            assert_eq!(outcome.cached, round == 1, "{name:?} in round {round}");
            // Answers by digest leave out the digest and, in their message,
            // the version: the agent has both all the same.
            let data = std::fs::read(dir.path().join(name)).unwrap();
            assert_eq!(outcome.digest, Some(blake3::hash(&data)), "{name:?}");
            let version = server.state.engine.ruleset().version_arc();
            assert_eq!(outcome.rules_version, version, "{name:?}");
        }
    }
    assert_eq!(server.spooled_files(), 0);
}

/// A file that changed after the client hashed it, before the server
/// asked for its content, is announced again with its content, and what it
/// holds then is scanned, as the local scan scans what it reads: rewritten
/// in place (the server finds another digest), truncated and rewritten
/// shorter (the client finds it shorter than it was), or rewritten longer.
/// One that only grew is scanned as it was hashed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_changed_since_it_was_hashed_is_scanned_as_it_is_then() {
    let server = TestServer::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let before = [
        ("rewritten", vec![b'x'; EICAR.len()]),
        ("shrunk", vec![b'x'; 1000]),
        ("grown", vec![b'x'; 10]),
        ("appended", b"hello".to_vec()),
    ];
    for (name, content) in &before {
        std::fs::write(dir.path().join(name), content).unwrap();
    }
    // The files change once all of them are hashed (the walk is asked for
    // the next file), and only then does the client take the server's
    // requests for their content.
    let (open, gate) = tokio::sync::watch::channel(false);
    let root = dir.path().to_owned();
    let mut change = Some(move || {
        for name in ["rewritten", "shrunk", "grown"] {
            std::fs::write(root.join(name), EICAR).unwrap();
        }
        let mut appended = std::fs::OpenOptions::new()
            .append(true)
            .open(root.join("appended"))
            .unwrap();
        std::io::Write::write_all(&mut appended, b" world").unwrap();
        open.send(true).unwrap();
    });
    let walk = before
        .iter()
        .map(|(name, _)| dir.path().join(name))
        .collect::<Vec<_>>()
        .into_iter()
        .chain(std::iter::from_fn(move || {
            if let Some(change) = change.take() {
                change();
            }
            None
        }));
    let results = Arc::default();
    let sink = Gated {
        gate,
        results: Arc::clone(&results),
    };
    let agent = Agent::connect(&AgentOptions::for_host(server.url()))
        .await
        .unwrap();
    agent
        .scan_into(Files::local(walk), HashFirst::Always, sink)
        .await
        .unwrap();
    let mut results = std::mem::take(&mut *results.lock().unwrap());
    results.sort_by(|a, b| a.0.cmp(&b.0));
    let seen: Vec<_> = results
        .iter()
        .map(|(name, outcome)| (name.as_str(), outcome.verdict.kind(), outcome.size))
        .collect();
    let eicar = EICAR.len() as u64;
    assert_eq!(
        seen,
        [
            ("appended", "clean", 5),
            ("grown", "infected", eicar),
            ("rewritten", "infected", eicar),
            ("shrunk", "infected", eicar),
        ],
        "{results:?}"
    );
    for (name, outcome) in &results[1..] {
        assert_eq!(outcome.digest, Some(blake3::hash(EICAR)), "{name}");
    }
    assert_eq!(results[0].1.digest, Some(blake3::hash(b"hello")));
}

/// A result sink that takes no reply until its gate opens.
struct Gated {
    gate: tokio::sync::watch::Receiver<bool>,
    results: Arc<std::sync::Mutex<Vec<(String, ScanOutcome)>>>,
}

impl ResultSink for Gated {
    fn put(&self, path: &Path, outcome: ScanOutcome) {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        self.results.lock().unwrap().push((name, outcome));
    }

    fn room(&self) -> impl Future<Output = ()> + Send {
        let mut gate = self.gate.clone();
        async move {
            let _ = gate.wait_for(|open| *open).await;
        }
    }
}

/// The client takes local files as they come, so that a full scan of a
/// large tree never holds the whole walk: the first file is answered while
/// the walk that gives the files is still under way. (A client that took
/// the whole walk first would wait here, and the walk would give up.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_scanned_while_their_walk_goes_on() {
    let server = TestServer::start(|_| {}).await;
    let waited = Arc::new(AtomicBool::new(false));
    let walked = Arc::clone(&waited);
    let results = scan_a_slow_walk(&server, HashFirst::Auto, move |answered| {
        walked.store(answered, Ordering::Relaxed);
    })
    .await;
    assert!(
        waited.load(Ordering::Relaxed),
        "the first file was answered before the walk gave the next"
    );
    assert_eq!(
        results,
        [
            ("note.txt".into(), "clean"),
            ("eicar.com".into(), "infected")
        ]
    );
}

/// A walk that gives nothing for longer than the server's idle timeout (a
/// slow network share, files each waited for under a lease) has its stream
/// closed as idle: the files that come after go on a new stream, rather
/// than failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_that_come_after_an_idle_stream_was_closed_are_scanned() {
    let server = TestServer::start(|c| c.server.idle_timeout = Duration::from_millis(300)).await;
    // Content sent at once: a begin by digest would keep the stream open
    // for as long as the server waits for its content.
    let results = scan_a_slow_walk(&server, HashFirst::Never, |answered| {
        assert!(answered);
        // Over five idle timeouts (not a multiple of one, when the stream
        // of the moment closes): the stream was closed meanwhile.
        std::thread::sleep(Duration::from_millis(1650));
    })
    .await;
    let idle_streams = Counters::get(&server.state.counters.idle_streams);
    assert!(idle_streams >= 1, "no stream was closed as idle");
    assert_eq!(
        results,
        [
            ("note.txt".into(), "clean"),
            ("eicar.com".into(), "infected")
        ]
    );
}

/// Scans a walk of two files through `server`, a clean one then EICAR,
/// which gives the second once the first was answered (or after 10 s) and
/// `between` has run, told whether it was; the files' names and verdicts,
/// in the order they came.
async fn scan_a_slow_walk(
    server: &TestServer,
    hash_first: HashFirst,
    between: impl FnOnce(bool) + Send + 'static,
) -> Vec<(String, &'static str)> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("note.txt"), "hello").unwrap();
    std::fs::write(dir.path().join("eicar.com"), EICAR).unwrap();
    let (answered, first_answered) = std::sync::mpsc::channel();
    let root = dir.path().to_owned();
    let mut between = Some(between);
    let walk = ["note.txt", "eicar.com"]
        .into_iter()
        .enumerate()
        .map(move |(i, name)| {
            if i == 1 {
                let answer = first_answered.recv_timeout(Duration::from_secs(10));
                between.take().unwrap()(answer.is_ok());
            }
            root.join(name)
        });
    let agent = Agent::connect(&AgentOptions::for_host(server.url()))
        .await
        .unwrap();
    let results = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = Arc::clone(&results);
    let scan = agent.scan(Files::local(walk), hash_first, move |path, outcome| {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        sink.lock().unwrap().push((name, outcome.verdict.kind()));
        let _ = answered.send(());
    });
    scan.await.unwrap();
    std::mem::take(&mut *results.lock().unwrap())
}

/// Opens a FIFO for writing when dropped, which lets go of a reader
/// blocked opening it: a test that failed waiting for such a reader then
/// ends, where the runtime would otherwise wait for its blocked thread for
/// ever.
struct Unblock(PathBuf);

impl Drop for Unblock {
    fn drop(&mut self) {
        use std::os::unix::fs::OpenOptionsExt;
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&self.0);
    }
}

/// A file that is no longer a regular file when the agent opens it (a
/// FIFO put in its place after the walk, which would block the open for
/// ever) fails as `io`, whichever way it is announced, and the scan ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_in_a_files_place_fails_and_the_scan_ends() {
    let server = TestServer::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("swapped");
    let name = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path it is given.
    assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
    std::fs::write(dir.path().join("note.txt"), "hello").unwrap();
    let _unblock = Unblock(fifo.clone());
    let files: Vec<PathBuf> = vec![fifo, dir.path().join("note.txt")];
    let agent = Agent::connect(&AgentOptions::for_host(server.url()))
        .await
        .unwrap();
    for hash_first in [HashFirst::Always, HashFirst::Never] {
        let results = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = Arc::clone(&results);
        let scan = agent.scan(
            Files::local(files.clone()),
            hash_first,
            move |path, outcome| {
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                sink.lock().unwrap().push((name, outcome.verdict.kind()));
            },
        );
        tokio::time::timeout(Duration::from_secs(30), scan)
            .await
            .expect("the scan ends")
            .unwrap();
        let mut results = results.lock().unwrap().clone();
        results.sort();
        assert_eq!(
            results,
            [("note.txt".into(), "clean"), ("swapped".into(), "failed")],
            "{hash_first:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_over_the_servers_limit_fails_as_too_large_as_a_local_scan_says() {
    let server = TestServer::start(|c| c.uploads.max_file_size = 1 << 20).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("big.bin"), vec![7u8; 2 << 20]).unwrap();
    std::fs::write(dir.path().join("eicar.com"), EICAR).unwrap();
    let files: Vec<PathBuf> = ["big.bin", "eicar.com"]
        .iter()
        .map(|f| dir.path().join(f))
        .collect();
    for (hash_first, name, outcome) in scan_each_way(&server, &files).await {
        match name.as_str() {
            "big.bin" => assert_eq!(
                outcome.verdict.failure().map(|f| f.reason),
                Some(FailReason::TooLarge),
                "{hash_first:?}"
            ),
            _ => assert_eq!(outcome.verdict.kind(), "infected", "{hash_first:?}"),
        }
    }
    assert_eq!(server.spooled_files(), 0);
}

/// Scans `files` through `server` with their content sent at once, then
/// announced by digest; returns each file's outcome with the way it went.
async fn scan_each_way(
    server: &TestServer,
    files: &[PathBuf],
) -> Vec<(HashFirst, String, scanserver::engine::ScanOutcome)> {
    let agent = Agent::connect(&AgentOptions::for_host(server.url()))
        .await
        .unwrap();
    let mut all = Vec::new();
    for hash_first in [HashFirst::Never, HashFirst::Always] {
        let results = scan_files(&agent, files, hash_first).await;
        assert_eq!(results.len(), files.len(), "{hash_first:?}");
        all.extend(results.into_iter().map(|(name, o)| (hash_first, name, o)));
    }
    all
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

/// A scan cut off in the middle gives every file one outcome: those not
/// answered fail, saying why. Cut by the server shutting down while the
/// agent still announces files, and by the connection breaking once it
/// has announced them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scan_cut_off_gives_every_file_one_outcome() {
    let server = TestServer::start(|_| {}).await;
    let url = server.url();
    let dir = tempfile::tempdir().unwrap();
    let outcomes = scan_cut_off(dir.path(), &url, 2000, 16 << 10, server.stop()).await;
    assert_every_file_has_one_outcome(&outcomes, 2000);
    for (path, outcome) in &outcomes {
        if let Some(failure) = outcome.verdict.failure() {
            assert!(
                failure.detail.contains("shutting down"),
                "{path:?}: {failure:?}"
            );
        }
    }

    let server = TestServer::start(|_| {}).await;
    let (proxy, link) = proxy(server.addr).await;
    // Once every file was announced (and asked for): the agent hashes
    // them as it goes, and one not hashed yet when the scan breaks fails
    // without a digest.
    let state = Arc::clone(&server.state);
    let cut = async move {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while Counters::get(&state.counters.content_requests) < 10 {
            assert!(std::time::Instant::now() < deadline, "never asked for all");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        link.abort()
    };
    let dir = tempfile::tempdir().unwrap();
    let url = format!("http://{proxy}");
    // Large enough that the nine other files are still on their way when
    // the first outcome has the link cut, however busy the machine.
    let outcomes = scan_cut_off(dir.path(), &url, 10, 4 << 20, cut).await;
    assert_every_file_has_one_outcome(&outcomes, 10);
    assert!(
        outcomes.iter().all(|(_, o)| o.digest.is_some()),
        "the first files of a scan go by their digest, and keep it"
    );
}

/// Scans `count` distinct files of `size` bytes, written in `dir`,
/// through the server at `url`, with `cut` run once the first outcome is
/// in; the scan must fail.
/// Returns every outcome.
async fn scan_cut_off(
    dir: &Path,
    url: &str,
    count: u64,
    size: usize,
    cut: impl Future<Output = ()> + Send + 'static,
) -> Vec<(std::path::PathBuf, scanserver::engine::ScanOutcome)> {
    let files: Vec<PathBuf> = (0..count)
        .map(|i: u64| {
            let path = dir.join(format!("{i}.bin"));
            let mut data = content(7, size);
            data[..8].copy_from_slice(&i.to_le_bytes());
            std::fs::write(&path, data).unwrap();
            path
        })
        .collect();
    let agent = Agent::connect(&AgentOptions::for_host(url)).await.unwrap();
    let (first, mut first_in) = tokio::sync::watch::channel(false);
    let cutting = tokio::spawn(async move {
        first_in.wait_for(|&seen| seen).await.unwrap();
        cut.await;
    });
    let results = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = Arc::clone(&results);
    let scanned = agent
        .scan(
            Files::local(files),
            HashFirst::Auto,
            move |path, outcome| {
                first.send_replace(true);
                sink.lock().unwrap().push((path.to_owned(), outcome));
            },
        )
        .await;
    cutting.await.unwrap();
    assert!(scanned.is_err(), "the scan was cut off");
    std::mem::take(&mut *results.lock().unwrap())
}

fn assert_every_file_has_one_outcome(
    outcomes: &[(std::path::PathBuf, scanserver::engine::ScanOutcome)],
    count: usize,
) {
    let paths: std::collections::HashSet<_> = outcomes.iter().map(|(path, _)| path).collect();
    assert_eq!(outcomes.len(), count);
    assert_eq!(paths.len(), count, "one outcome for each file");
    let failed: Vec<_> = outcomes
        .iter()
        .filter(|(_, o)| o.verdict.kind() == "failed")
        .collect();
    assert!(!failed.is_empty(), "files not answered fail");
    for (path, outcome) in failed.iter().filter(|(_, o)| o.digest.is_some()) {
        let digest = blake3::hash(&std::fs::read(path).unwrap());
        assert_eq!(
            outcome.digest,
            Some(digest),
            "a file hashed keeps its digest"
        );
    }
    assert!(
        outcomes.iter().all(|(_, o)| o.verdict.kind() != "infected"),
        "nothing here is malware"
    );
}

/// A TCP proxy to `target`: its address, and the task that links each
/// connection through; aborting it cuts them all.
async fn proxy(
    target: std::net::SocketAddr,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut links = tokio::task::JoinSet::new();
        while let Ok((mut inbound, _)) = listener.accept().await {
            links.spawn(async move {
                let mut outbound = tokio::net::TcpStream::connect(target).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lightagent_client_sends_content_at_once_while_the_server_knows_nothing() {
    let server = TestServer::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let mut size = 0;
    let files: Vec<PathBuf> = (0..400)
        .map(|i| {
            let path = dir.path().join(format!("{i}.txt"));
            let content = format!("file {i} ").repeat(100);
            size += content.len() as u64;
            std::fs::write(&path, content).unwrap();
            path
        })
        .collect();
    let agent = Agent::connect(&AgentOptions::for_host(server.url()))
        .await
        .unwrap();
    let asked = || Counters::get(&server.state.counters.content_requests);

    let results = scan_files(&agent, &files, HashFirst::Auto).await;
    assert_eq!(results.len(), 400);
    assert!(results.iter().all(|(_, o)| o.verdict.kind() == "clean"));
    // Files go by digest until 64 answers show the server knows none: at
    // most those 64, the files announced before the 64th answer was taken
    // (up to 128 in flight after files are over) and the 17 the preparer
    // had ready. The rest go with their content.
    let by_digest = asked();
    assert!(
        (64..=64 + 128 + 17).contains(&by_digest),
        "{by_digest} of 400 files were announced by digest"
    );
    assert_eq!(
        Counters::get(&server.state.counters.bytes_received),
        size,
        "each file was sent once"
    );

    // The server knows them all now: a second scan goes by digest.
    let results = scan_files(&agent, &files, HashFirst::Auto).await;
    assert!(results.iter().all(|(_, o)| o.cached));
    assert_eq!(asked(), by_digest, "no content was asked for");

    // Hash first always: every file of a new tree is asked for.
    let other = tempfile::tempdir().unwrap();
    let files: Vec<PathBuf> = (0..100)
        .map(|i| {
            let path = other.path().join(format!("{i}.bin"));
            std::fs::write(&path, format!("other {i} ").repeat(100)).unwrap();
            path
        })
        .collect();
    scan_files(&agent, &files, HashFirst::Always).await;
    assert_eq!(asked(), by_digest + 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_the_client_cannot_read_fails_alone_with_its_reason() {
    let server = TestServer::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("eicar.com"), EICAR).unwrap();
    // Its size can be read, its content cannot (EIO at offset 0).
    let unreadable = Path::new("/proc/self/mem");
    // Its metadata says 0 bytes; it has more.
    let misreported = Path::new("/proc/version");
    let files: Vec<PathBuf> = vec![
        unreadable.to_owned(),
        dir.path().join("eicar.com"),
        misreported.to_owned(),
    ];
    for (hash_first, name, outcome) in scan_each_way(&server, &files).await {
        if name == "version" {
            assert_eq!(outcome.verdict.kind(), "clean", "{hash_first:?}");
            // The size given is the size read, as a local scan gives it.
            let size = std::fs::read(misreported).unwrap().len() as u64;
            assert_eq!(outcome.size, size, "{hash_first:?}");
        } else if name == "mem" {
            // As the local scan says it.
            let local = server.state.engine.scan(&scanserver::engine::ScanJob {
                content: scanserver::engine::Content::File(unreadable.into()),
                name: None,
                digest: None,
            });
            assert_eq!(
                outcome.verdict.failure(),
                local.verdict.failure(),
                "{hash_first:?}"
            );
            assert_eq!(
                outcome.verdict.failure().map(|f| f.reason),
                Some(FailReason::Io),
                "{hash_first:?}"
            );
        } else {
            assert_eq!(outcome.verdict.kind(), "infected", "{hash_first:?}");
        }
    }
    assert_eq!(server.spooled_files(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_asked_for_and_gone_keeps_its_place_until_the_server_drops_it() {
    // One file in flight: the next file's begin must not reach the server
    // before it has taken the cancel of the file that could not be read.
    let server = TestServer::start(|c| c.uploads.files_in_flight = 1).await;
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    std::fs::write(path("first.txt"), "first").unwrap();
    std::fs::write(path("gone.txt"), "second").unwrap();
    std::fs::write(path("eicar.com"), EICAR).unwrap();
    let files: Vec<PathBuf> = ["first.txt", "gone.txt", "eicar.com"]
        .iter()
        .map(|name| path(name))
        .collect();
    let agent = Agent::connect(&AgentOptions::for_host(server.url()))
        .await
        .unwrap();
    let results = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = Arc::clone(&results);
    let gone = path("gone.txt");
    let state = Arc::clone(&server.state);
    // gone.txt is hashed ahead; it goes once first.txt is answered, so the
    // server asks for content the agent can no longer read. The agent
    // cancels it, and settles it once the server has dropped it.
    agent
        .scan(
            Files::local(files),
            HashFirst::Always,
            move |path, outcome| {
                if path.ends_with("first.txt") {
                    std::fs::remove_file(&gone).unwrap();
                }
                if path.ends_with("gone.txt") {
                    assert_eq!(state.sessions.files_in_flight(), 0);
                }
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                sink.lock().unwrap().push((name, outcome.verdict));
            },
        )
        .await
        .unwrap();
    let results = results.lock().unwrap();
    let verdict = |name: &str| &results.iter().find(|(n, _)| n == name).unwrap().1;
    assert_eq!(verdict("first.txt").kind(), "clean");
    assert!(
        matches!(
            verdict("gone.txt"),
            scanserver::verdict::Verdict::Failed(failure)
                if failure.reason == scanserver::verdict::FailReason::Io
        ),
        "{:?}",
        verdict("gone.txt")
    );
    assert_eq!(verdict("eicar.com").kind(), "infected");
}

/// An agent of `server` (over TLS) trusting the CA `certificates` made in
/// `dir`, without a certificate of its own.
fn tls_agent(dir: &Path, server: &TestServer) -> AgentOptions {
    AgentOptions {
        tls: Some(ClientTls {
            ca: Some(dir.join("ca.pem")),
            identity: None,
            domain: Some("localhost".into()),
        }),
        ..AgentOptions::for_host(format!("https://{}", server.addr))
    }
}

/// A CA, a server certificate for localhost and a client certificate, as
/// PEM files in `dir`.
fn certificates(dir: &Path) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    let names = [
        ("server", "localhost"),
        ("client", "agent-1"),
        ("other", "vm-2"),
    ];
    for (name, san) in names {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![san.to_owned()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let tls = |client_ca: bool| TlsConfig {
        cert: dir.path().join("server.pem"),
        key: dir.path().join("server.key"),
        client_ca: client_ca.then(|| dir.path().join("ca.pem")),
        vm_id_in_certificate: false,
        check_interval: std::time::Duration::ZERO,
    };
    let options = |server: &TestServer, identity: bool| AgentOptions {
        require_encryption: true,
        tls: Some(ClientTls {
            ca: Some(dir.path().join("ca.pem")),
            identity: identity
                .then(|| (dir.path().join("client.pem"), dir.path().join("client.key"))),
            domain: Some("localhost".into()),
        }),
        ..AgentOptions::for_host(format!("https://{}", server.addr))
    };

    let server = TestServer::start(|c| c.tls = Some(tls(false))).await;
    let agent = Agent::connect(&options(&server, false))
        .await
        .expect("TLS session");
    assert!(
        !agent.welcome().session_id.is_empty(),
        "encryption required and given"
    );

    let mutual = TestServer::start(|c| c.tls = Some(tls(true))).await;
    let agent = Agent::connect(&options(&mutual, true))
        .await
        .expect("mutual TLS session");
    let dir_files = tempfile::tempdir().unwrap();
    std::fs::write(dir_files.path().join("eicar.com"), EICAR).unwrap();
    let found = Arc::new(std::sync::Mutex::new(None));
    let sink = Arc::clone(&found);
    agent
        .scan(
            Files::local([dir_files.path().join("eicar.com")]),
            HashFirst::Auto,
            move |_, outcome| *sink.lock().unwrap() = Some(outcome.verdict.kind()),
        )
        .await
        .unwrap();
    assert_eq!(*found.lock().unwrap(), Some("infected"));

    let refused = Agent::connect(&options(&mutual, false)).await;
    assert!(
        matches!(
            refused,
            Err(ClientError::Connect { .. } | ClientError::Status(_))
        ),
        "a client without a certificate is refused"
    );
    // Counted (and logged) where operators see it: the agents refused
    // have no session to show for it.
    let failed = || mutual.svm.connections.failed_handshakes() > 0;
    until_read("a failed handshake counted", failed, true).await;
    assert_eq!(server.svm.connections.failed_handshakes(), 0);

    // VM ids taken from certificates: the client's is for "agent-1" only.
    let certified = TestServer::start(|c| {
        c.tls = Some(TlsConfig {
            vm_id_in_certificate: true,
            check_interval: std::time::Duration::ZERO,
            ..tls(true)
        })
    })
    .await;
    let as_vm = |vm_id: &str| AgentOptions {
        vm_id: vm_id.into(),
        ..options(&certified, true)
    };
    let agent = Agent::connect(&as_vm("agent-1")).await;
    let agent = agent.unwrap_or_else(|err| panic!("its own VM: {err}"));
    for other in ["vm-2", "Agent-1", "not a dns name"] {
        match Agent::connect(&as_vm(other)).await {
            Err(ClientError::Rejected { reason, message }) => {
                assert_eq!(reason, RejectReason::NotCertified, "{message}");
                assert!(message.contains(&format!("{other:?}")), "{message}");
            }
            other => panic!("another VM is refused, not {:?}", other.map(|_| ())),
        }
    }
    // Its session is its certificate's: another agent that learnt its id
    // (from a log, say) cannot use it.
    let read = |file: &str| std::fs::read(dir.path().join(file)).unwrap();
    let other_agent = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(read("ca.pem")))
        .identity(tonic::transport::Identity::from_pem(
            read("other.pem"),
            read("other.key"),
        ))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://{}", certified.addr))
        .unwrap()
        .tls_config(other_agent)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let lookup = |session_id: String| LookupRequest {
        session_id,
        digests: vec![Bytes::copy_from_slice(blake3::hash(b"x").as_bytes())],
    };
    let session = agent.welcome().session_id.clone();
    let refused = ProtectionServerClient::new(channel)
        .lookup(lookup(session))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(
        agent.lookup(&[blake3::hash(b"x")]).await.is_ok(),
        "its own agent can"
    );

    // Settings that make no identity stop the server before it starts,
    // naming the files and why.
    std::fs::write(dir.path().join("broken.key"), "not a key").unwrap();
    let state = tempfile::tempdir().unwrap();
    let mut config = scanserver::config::Config::default();
    config.server.state_dir = Some(state.path().to_owned());
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.server.admin_listen = "127.0.0.1:0".parse().unwrap();
    config.tls = Some(TlsConfig {
        key: dir.path().join("broken.key"),
        ..tls(false)
    });
    let refused = scanserver::server::Server::bind(&config, shipped_engine()).await;
    let err = refused.err().expect("unusable TLS settings are refused");
    let message = err.to_string();
    assert!(
        matches!(err, ServerError::Tls(TlsError::Pem { .. }))
            && message.contains("private key")
            && message.contains("broken.key"),
        "{message}"
    );
    // A key that is not the certificate's.
    config.tls = Some(TlsConfig {
        key: dir.path().join("client.key"),
        ..tls(false)
    });
    let refused = scanserver::server::Server::bind(&config, shipped_engine()).await;
    let err = refused
        .err()
        .expect("a key of another certificate is refused");
    let message = err.to_string();
    assert!(
        matches!(err, ServerError::Tls(TlsError::KeyMismatch { .. }))
            && message.contains("server.pem")
            && message.contains("client.key"),
        "{message}"
    );
}

/// Waits until `server` counts `open` agent connections.
async fn until_connections_open(server: &TestServer, open: usize) {
    until_read("connections open", || server.svm.connections.open(), open).await;
}

/// The admin listener's Unix socket has as many places as its TCP port:
/// one connection more is closed at once, and the others are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_socket_takes_a_bounded_number_of_connections() {
    use tokio::{io::AsyncReadExt, net::UnixStream};
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("admin.sock");
    let server = TestServer::start(|c| {
        c.server.admin_listen = scanserver::admin::AdminAddr::Unix(socket.clone());
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..scanserver::connections::ADMIN_CONNECTIONS {
        held.push(UnixStream::connect(&socket).await.unwrap());
    }
    let mut beyond = UnixStream::connect(&socket).await.unwrap();
    let mut buf = [0; 64];
    let until_closed = async { while let Ok(1..) = beyond.read(&mut buf).await {} };
    let closed = tokio::time::timeout(Duration::from_secs(5), until_closed).await;
    assert!(closed.is_ok(), "closed at once");
    drop(held);
    // Their places come back as the server sees them closed.
    let admin = server.admin.to_string();
    let timeout = scanserver::admin::REQUEST_TIMEOUT;
    for _ in 0..500 {
        if let Ok(mut client) = scanserver::admin::connect(&admin, None, timeout).await {
            let request = proto::StatusRequest::default();
            if client.status(request).await.is_ok() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the admin socket serves no one once its connections are closed");
}

/// An agent connection with no call under way for `server.idle_timeout`
/// is closed, its place given back (its client connects again for its
/// next call); one with a session open is kept, however quiet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_with_no_call_under_way_are_closed_once_idle() {
    let server = TestServer::start(|c| {
        c.engine.scan_timeout = Duration::from_secs(1);
        c.server.idle_timeout = Duration::from_secs(2);
    })
    .await;
    let (welcome, _session) = open_session(&server, hello()).await;
    assert!(matches!(welcome, server_message::Kind::Welcome(_)));
    let mut health = server.health_client().await;
    let check = tonic_health::pb::HealthCheckRequest::default();
    health.check(check.clone()).await.unwrap();
    until_connections_open(&server, 2).await;
    let open = || server.svm.connections.open();
    until_read("connections open once the health check's is idle", open, 1).await;
    assert_eq!(server.svm.connections.idle_closed(), 1);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(open(), 1, "the session's connection is kept");
    assert_eq!(server.svm.sessions.len(), 1);
    health.check(check).await.unwrap();
    assert_eq!(open(), 2);
}

/// Connections beyond `server.max_connections` are closed as they are
/// accepted (with TLS, before their handshake) and counted; a connection
/// that closes gives its place back, and so does one that never speaks
/// HTTP/2 once it has been cut off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_closed() {
    use tokio::io::AsyncReadExt;
    let server = TestServer::start(|c| c.server.max_connections = Some(2)).await;
    let endpoint = Channel::from_shared(server.url()).unwrap();
    let healthy = |channel: Channel| async move {
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        let check = health.check(tonic_health::pb::HealthCheckRequest::default());
        matches!(
            tokio::time::timeout(Duration::from_secs(10), check).await,
            Ok(Ok(_))
        )
    };
    // Whether the server closes `tcp` within `wait` (what it sends before,
    // its HTTP/2 settings, is passed over).
    let closed = |mut tcp: tokio::net::TcpStream, wait: Duration| async move {
        let mut buf = [0; 64];
        let until_closed = async { while let Ok(1..) = tcp.read(&mut buf).await {} };
        tokio::time::timeout(wait, until_closed).await.is_ok()
    };
    // The admin listener has places of its own, as many as operators
    // need: one more is closed at once, and agents are not affected.
    let admin = server.admin.to_string();
    let mut held = Vec::new();
    for _ in 0..scanserver::connections::ADMIN_CONNECTIONS {
        held.push(tokio::net::TcpStream::connect(&admin).await.unwrap());
    }
    let beyond = tokio::net::TcpStream::connect(&admin).await.unwrap();
    assert!(
        closed(beyond, Duration::from_secs(5)).await,
        "admin: closed at once"
    );
    drop(held);

    let first = endpoint.connect().await.unwrap();
    assert!(healthy(first.clone()).await);
    let silent = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    until_connections_open(&server, 2).await;
    let third = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    assert!(
        closed(third, Duration::from_secs(5)).await,
        "closed at once"
    );
    assert_eq!(server.svm.connections.refused(), 1);
    let cut_off = scanserver::connections::PREFACE_WAIT + Duration::from_secs(5);
    assert!(closed(silent, cut_off).await, "cut off without a preface");
    assert_eq!(server.svm.connections.silent(), 1);
    until_connections_open(&server, 1).await;
    assert!(
        healthy(endpoint.connect().await.unwrap()).await,
        "the place was given back"
    );
    assert!(healthy(first).await, "the others were left alone");

    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let tls = TlsConfig::new(dir.path().join("server.pem"), dir.path().join("server.key"));
    let server = TestServer::start(|c| {
        c.tls = Some(tls);
        c.server.max_connections = Some(1);
    })
    .await;
    let options = tls_agent(dir.path(), &server);
    let agent = Agent::connect(&options).await.expect("a TLS session");
    assert!(Agent::connect(&options).await.is_err(), "no place left");
    assert_eq!(server.svm.connections.refused(), 1);
    agent.close().await;
    until_connections_open(&server, 0).await;
    Agent::connect(&options)
        .await
        .expect("the place was given back");
}

/// Clients that connect and say nothing hold up no one's TLS handshake
/// while connection places are left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_clients_hold_up_no_tls_handshake() {
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let tls = TlsConfig::new(dir.path().join("server.pem"), dir.path().join("server.key"));
    let server = TestServer::start(|c| c.tls = Some(tls)).await;
    let mut silent = Vec::new();
    for _ in 0..300 {
        silent.push(tokio::net::TcpStream::connect(server.addr).await.unwrap());
    }
    let options = tls_agent(dir.path(), &server);
    let connected = tokio::time::timeout(Duration::from_secs(5), Agent::connect(&options)).await;
    assert!(matches!(connected, Ok(Ok(_))), "a session at once");
}

/// A renewed certificate, or a new client CA, is used once the files are
/// read again (by the periodic look at them, on SIGHUP for `scanserver
/// serve`, or by hand here); files that cannot be used replace nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewed_certificates_are_served_once_read_again() {
    let (first, renewed, served) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    certificates(first.path());
    certificates(renewed.path());
    let install = |from: &Path| {
        for file in ["server.pem", "server.key", "ca.pem"] {
            std::fs::copy(from.join(file), served.path().join(file)).unwrap();
        }
    };
    install(first.path());
    let server = TestServer::start(|c| {
        c.tls = Some(TlsConfig {
            cert: served.path().join("server.pem"),
            key: served.path().join("server.key"),
            client_ca: Some(served.path().join("ca.pem")),
            vm_id_in_certificate: false,
            check_interval: Duration::from_secs(1),
        })
    })
    .await;
    let tls = server.tls.as_ref().unwrap();
    // An agent trusting the server of `trusted` and presenting the client
    // certificate of `identity`, if any.
    let agent = |trusted: &Path, identity: Option<&Path>| AgentOptions {
        require_encryption: true,
        tls: Some(ClientTls {
            ca: Some(trusted.join("ca.pem")),
            identity: identity.map(|dir| (dir.join("client.pem"), dir.join("client.key"))),
            domain: Some("localhost".into()),
        }),
        ..AgentOptions::for_host(format!("https://{}", server.addr))
    };
    // A client that connects and never begins its handshake holds up no
    // one else's.
    let _silent = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    Agent::connect(&agent(first.path(), Some(first.path())))
        .await
        .expect("the first certificates are used");
    assert!(!tls.reload().unwrap(), "the same files change nothing");

    install(renewed.path());
    // Found by the look at the files every second, and loaded at the
    // second look.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while Agent::connect(&agent(renewed.path(), Some(renewed.path())))
        .await
        .is_err()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the renewed files are never served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!tls.reload().unwrap(), "they are loaded already");
    assert_eq!(server.svm.tls_update_failure(), None);
    for (trusted, identity, why) in [
        (
            first.path(),
            Some(renewed.path()),
            "the first certificate is no longer served",
        ),
        (
            renewed.path(),
            Some(first.path()),
            "the first client CA no longer admits",
        ),
        (
            renewed.path(),
            None,
            "a client certificate is still required",
        ),
    ] {
        // Refused in the handshake, or (TLS 1.3: the client's certificate
        // is checked after the client considers the handshake done) by
        // the connection closing at the first request; the listener is
        // up all along.
        let refused = Agent::connect(&agent(trusted, identity)).await.err();
        let refused = refused.map(|e| scanserver::WithCauses(&e).to_string());
        assert!(
            refused
                .as_ref()
                .is_some_and(|e| !e.contains("Connection refused")),
            "{why}: {refused:?}"
        );
    }
    Agent::connect(&agent(renewed.path(), Some(renewed.path())))
        .await
        .expect("the renewed certificates are used");

    std::fs::write(served.path().join("server.key"), "not a key").unwrap();
    let err = tls.reload().unwrap_err();
    assert!(err.to_string().contains("server.key"), "{err}");
    Agent::connect(&agent(renewed.path(), Some(renewed.path())))
        .await
        .expect("the renewed certificates are still used");
    // The periodic look reports them too, until the files served are back.
    let svm = &server.svm;
    let failure = |failed: bool| async move {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while svm.tls_update_failure().is_some() != failed {
            assert!(std::time::Instant::now() < deadline, "failed: {failed}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    failure(true).await;
    install(renewed.path());
    failure(false).await;
    // Files that stay unreadable (a renewal the server may not read) are a
    // failure too, after three looks.
    std::fs::remove_file(served.path().join("server.key")).unwrap();
    failure(true).await;
    let failure_now = svm.tls_update_failure().unwrap();
    assert!(failure_now.contains("server.key"), "{failure_now}");
    install(renewed.path());
    failure(false).await;
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

/// Files that stop coming before their end (the walk panicked) fail the
/// scan: the files never taken must not pass for scanned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_walk_that_breaks_off_fails_the_scan() {
    let server = TestServer::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first");
    std::fs::write(&first, b"harmless").unwrap();
    let walk = [Some(first), None]
        .into_iter()
        .map(|path| path.expect("a walk that breaks off"));
    let agent = Agent::connect(&AgentOptions::for_host(server.url()))
        .await
        .unwrap();
    let (outcomes, mut received) = mpsc::unbounded_channel();
    let result = agent
        .scan(Files::local(walk), HashFirst::Auto, move |_, outcome| {
            let _ = outcomes.send(outcome);
        })
        .await;
    assert!(
        matches!(result, Err(scanserver::client::ClientError::WalkFailed)),
        "{result:?}"
    );
    let outcome = received.recv().await.expect("the first file's outcome");
    assert!(outcome.verdict.is_clean(), "{:?}", outcome.verdict);
}

/// A Scan stream that cannot be opened (the server gone since the session
/// began) fails every file the agent was given, as a stream that breaks
/// does: a full scan with no file answered is never taken for a clean one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_file_fails_when_the_scan_stream_cannot_open() {
    let server = TestServer::start(|config| {
        config.server.shutdown_grace = Duration::from_millis(200);
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<PathBuf> = (0..3)
        .map(|i| {
            let path = dir.path().join(format!("file-{i}"));
            std::fs::write(&path, b"harmless").unwrap();
            path
        })
        .collect();
    let agent = Agent::connect(&AgentOptions::for_host(server.url()))
        .await
        .unwrap();
    server.stop().await;
    let (outcomes, mut received) = mpsc::unbounded_channel();
    let result = agent
        .scan(Files::local(files), HashFirst::Auto, move |_, outcome| {
            let _ = outcomes.send(outcome);
        })
        .await;
    assert!(result.is_err(), "{result:?}");
    let mut failed = 0;
    while let Ok(outcome) = received.try_recv() {
        let failure = outcome.verdict.failure().expect("failed, never clean");
        assert!(
            failure.to_string().contains("could not be opened"),
            "{failure}"
        );
        failed += 1;
    }
    assert_eq!(failed, 3, "one outcome per file");
}

/// The agent listener's certificate validity is part of the SVM's status:
/// expired, not valid yet (a reason that stops scans), or expiring within
/// 14 days, each is a reason of its own; a renewed one read again clears
/// it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_turns_the_svm_critical() {
    use scanserver::proto::SvmReason;
    let dir = tempfile::tempdir().unwrap();
    let now = time::OffsetDateTime::now_utc();
    let (past, expired, future) = (
        rcgen::date_time_ymd(2019, 1, 1),
        rcgen::date_time_ymd(2020, 1, 1),
        rcgen::date_time_ymd(2200, 1, 1),
    );
    let (later, soon) = (now + time::Duration::days(2), now + time::Duration::days(7));
    // The certificate `pem` (a chain) and its key, served from now on.
    let install = |pem: String, key: &rcgen::KeyPair| {
        std::fs::write(dir.path().join("server.pem"), pem).unwrap();
        std::fs::write(dir.path().join("server.key"), key.serialize_pem()).unwrap();
    };
    let write_valid = |not_before, not_after| {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.not_before = not_before;
        params.not_after = not_after;
        let key = rcgen::KeyPair::generate().unwrap();
        install(params.self_signed(&key).unwrap().pem(), &key);
    };
    let write = |not_after| write_valid(past, not_after);
    write(expired);
    let server = TestServer::start(|c| {
        c.tls = Some(TlsConfig {
            cert: dir.path().join("server.pem"),
            key: dir.path().join("server.key"),
            client_ca: None,
            vm_id_in_certificate: false,
            check_interval: std::time::Duration::ZERO,
        })
    })
    .await;
    let expires = server.svm.certificate_validity().unwrap().not_after;
    assert_eq!(
        humantime::format_rfc3339_seconds(expires).to_string(),
        "2020-01-01T00:00:00Z"
    );
    let status = server.svm.status();
    assert_eq!(
        status.reasons,
        [SvmReason::CertificateExpired],
        "{status:?}"
    );

    // The reasons once the files written are read again.
    let reloaded = || {
        assert!(server.tls.as_ref().unwrap().reload().unwrap());
        server.svm.status().reasons
    };
    write(soon);
    assert_eq!(reloaded(), [SvmReason::CertificateExpiresSoon]);
    write(future);
    assert_eq!(reloaded(), []);

    // Not valid yet (a certificate issued ahead of the SVM's clock): agents
    // refuse it as they do an expired one.
    write_valid(later, future);
    assert_eq!(reloaded(), [SvmReason::CertificateNotYetValid]);
    assert!(SvmReason::CertificateNotYetValid.stops_scans());
    write(future);
    assert_eq!(reloaded(), []);

    // Served with an intermediate CA and a root: the chain is valid from
    // the last start to the first end of the certificates agents check,
    // the server's own and the intermediate's. The root is a trust anchor,
    // whose validity clients do not check.
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let ca_params = |name: &str, (not_before, not_after)| {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.not_before = not_before;
        params.not_after = not_after;
        params
    };
    let chain_of = |root, intermediate| {
        let root = ca_params("root", root);
        let root = CertifiedIssuer::self_signed(root, KeyPair::generate().unwrap()).unwrap();
        let ca = ca_params("intermediate", intermediate);
        let ca = CertifiedIssuer::signed_by(ca, KeyPair::generate().unwrap(), &root).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params.not_after = future;
        let cert = params.signed_by(&key, &ca).unwrap();
        install(format!("{}{}{}", cert.pem(), ca.pem(), root.pem()), &key);
        reloaded()
    };
    assert_eq!(
        chain_of((past, expired), (past, soon)),
        [SvmReason::CertificateExpiresSoon],
        "the intermediate expires first; the root's expiry does not count"
    );
    assert_eq!(
        chain_of((later, future), (later, future)),
        [SvmReason::CertificateNotYetValid],
        "the intermediate starts last"
    );
    assert_eq!(
        chain_of((later, future), (past, future)),
        [],
        "the root's start does not count"
    );
}

/// A spool that refuses an upload for want of room (its budget taken, not
/// one VM's share) makes the SVM Warning, `SPOOL_FULL`; a VM's share taken
/// does not (that VM's files wait, others' go on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spool_that_refuses_uploads_makes_the_svm_warning() {
    let server = TestServer::start(|c| {
        c.uploads.memory_threshold = 16 << 10;
        c.uploads.spool_budget = 64 << 10;
        c.uploads.spool_budget_per_vm = Some(48 << 10);
    })
    .await;
    let (session, _keep) = session_id(&server).await;
    let (tx, mut replies) = scan_stream(&server).await;
    // Held, never sent: 40 KiB of the VM's 48 KiB share, and of the 64 KiB.
    tx.send(begin(&session, 1, &[1; 40 << 10], None))
        .await
        .unwrap();
    tx.send(begin(&session, 2, &[2; 40 << 10], None))
        .await
        .unwrap();
    next_error(&mut replies, 2, Code::ResourceExhausted, "share").await;
    // Two samples of the monitor, a second apart.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(server.svm.status().reasons.is_empty(), "a VM's share");

    let (other, _keep) = session_id(&server).await;
    let (other_tx, mut other_replies) = scan_stream(&server).await;
    other_tx
        .send(begin(&other, 1, &[3; 40 << 10], None))
        .await
        .unwrap();
    next_error(
        &mut other_replies,
        1,
        Code::ResourceExhausted,
        "spool is full",
    )
    .await;
    let reasons = || server.svm.status().reasons;
    until_read("the SVM Warning", reasons, vec![SvmReason::SpoolFull]).await;
    assert_eq!(server.svm.status().health, Health::Warning);
    let components = server.svm.components();
    let spool = components.iter().find(|c| c.name == "spool").unwrap();
    assert_eq!(spool.state(), proto::ComponentState::Warning, "{spool:?}");
}

/// The client announces again a file the server refused for want of room
/// (here, its spool is full), rather than fail it, and scans it once room
/// comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_sends_again_what_was_refused_for_want_of_room() {
    let server = TestServer::start(|c| {
        c.uploads.memory_threshold = 16 << 10;
        c.uploads.spool_budget = 64 << 10;
    })
    .await;
    // A file begun (without a digest: its content follows) and never sent
    // holds 48 KiB of the spool.
    let (session, _keep) = session_id(&server).await;
    let (holder, _replies) = scan_stream(&server).await;
    holder
        .send(begin(&session, 1, &[1; 48 << 10], None))
        .await
        .unwrap();
    let held = || server.state.uploads.spool_usage().bytes >= 48 << 10;
    until_read("the spool held", held, true).await;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("large.bin");
    std::fs::write(&path, content(9, 48 << 10)).unwrap();
    let agent = Agent::connect(&AgentOptions::for_host(server.url()))
        .await
        .unwrap();
    let verdict = Arc::new(std::sync::Mutex::new(None));
    let sink = Arc::clone(&verdict);
    let scan = agent.scan(Files::local([path]), HashFirst::Auto, move |_, outcome| {
        *sink.lock().unwrap() = Some(outcome.verdict.kind())
    });
    // Room comes back once the server has refused the agent's file.
    let release = async {
        let refused = || server.state.uploads.spool_usage().refused > 0;
        until_read("the agent's file refused", refused, true).await;
        drop(holder);
    };
    let (scanned, ()) = tokio::join!(scan, release);
    scanned.unwrap();
    assert_eq!(*verdict.lock().unwrap(), Some("clean"));
    assert!(server.state.uploads.spool_usage().refused >= 1);
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

/// A Scan stream the server ends for want of room in its message budget
/// is opened again after a pause, and its files go on the new one: none
/// fails for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_opens_a_stream_refused_for_want_of_room_again() {
    let server = TestServer::start(|c| c.uploads.message_budget = 32 << 20).await;
    // Two stalled messages from the agent's address hold its whole share.
    let mut stalled = Vec::new();
    for _ in 0..2 {
        stalled.push(begin_message(&server, [127, 0, 0, 1], "Scan", 16 << 20, 1 << 20).await);
    }
    until_room_held(&server, 32 << 20).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("large.bin"), content(5, 1 << 20)).unwrap();
    std::fs::write(dir.path().join("eicar.com"), EICAR).unwrap();
    let files = ["large.bin", "eicar.com"].map(|name| dir.path().join(name));
    let asked = || Counters::get(&server.state.counters.content_requests);
    // The room comes back once the large file's content was asked for
    // again (once for each file, then again for the large one): its chunks
    // were refused, and it was announced again on a new stream.
    let release = async {
        until_read("content asked for again", || asked() >= 3, true).await;
        drop(stalled);
    };
    let agent = Agent::connect(&AgentOptions::for_host(server.url()))
        .await
        .unwrap();
    let (scanned, ()) = tokio::join!(scan_files(&agent, &files, HashFirst::Always), release);
    let mut outcomes: Vec<_> = scanned
        .iter()
        .map(|(name, outcome)| (name.as_str(), outcome.verdict.kind()))
        .collect();
    outcomes.sort();
    assert_eq!(
        outcomes,
        [("eicar.com", "infected"), ("large.bin", "clean")]
    );
    assert_eq!(server.spooled_files(), 0);
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

/// A server that breaks the protocol in two ways: it asks twice for the
/// content of each file announced by its digest, and answers each with a
/// reply of no kind it knows (as a newer server's might be). It counts
/// the content it receives.
struct UnknownReplies {
    received: Arc<AtomicU64>,
}

type Answers<T> =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl proto::protection_server_server::ProtectionServer for UnknownReplies {
    type ConnectStream = Answers<proto::ServerMessage>;
    type ScanStream = Answers<proto::ScanReply>;

    async fn connect(
        &self,
        _: tonic::Request<tonic::Streaming<AgentMessage>>,
    ) -> Result<tonic::Response<Self::ConnectStream>, tonic::Status> {
        let welcome = server_message::Kind::Welcome(proto::Welcome {
            session_id: "session".into(),
            heartbeat_interval_ms: 10_000,
            ..Default::default()
        });
        let first = proto::ServerMessage {
            kind: Some(welcome),
        };
        let open =
            tokio_stream::StreamExt::chain(tokio_stream::once(Ok(first)), tokio_stream::pending());
        Ok(tonic::Response::new(Box::pin(open)))
    }

    async fn scan(
        &self,
        request: tonic::Request<tonic::Streaming<ScanRequest>>,
    ) -> Result<tonic::Response<Self::ScanStream>, tonic::Status> {
        let mut requests = request.into_inner();
        let received = Arc::clone(&self.received);
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            while let Ok(Some(request)) = requests.message().await {
                let mut replies = Vec::new();
                for kind in request.requests.into_iter().filter_map(|r| r.kind) {
                    match kind {
                        file_request::Kind::Begin(begin) => {
                            let asked = proto::FileReply {
                                file_id: begin.file_id,
                                kind: Some(file_reply::Kind::SendContent(proto::ContentRequest {})),
                            };
                            replies.extend([asked.clone(), asked]);
                        }
                        file_request::Kind::Chunk(chunk) => {
                            received.fetch_add(chunk.data.len() as u64, Ordering::Relaxed);
                        }
                        file_request::Kind::End(end) => replies.push(proto::FileReply {
                            file_id: end.file_id,
                            kind: None,
                        }),
                        file_request::Kind::Cancel(_) => {}
                    }
                }
                let reply = proto::ScanReply {
                    replies,
                    ..Default::default()
                };
                if tx.send(Ok(reply)).await.is_err() {
                    break;
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn lookup(
        &self,
        _: tonic::Request<LookupRequest>,
    ) -> Result<tonic::Response<proto::LookupReply>, tonic::Status> {
        Err(tonic::Status::unimplemented("not this server"))
    }

    async fn scan_file(
        &self,
        _: tonic::Request<tonic::Streaming<FileChunk>>,
    ) -> Result<tonic::Response<proto::FileVerdict>, tonic::Status> {
        Err(tonic::Status::unimplemented("not this server"))
    }
}

/// The agent obeys a server only as far as the protocol goes: a file whose
/// content is asked for twice is sent once, and a file answered with a
/// reply of a kind the agent does not know fails (it is no verdict), rather
/// than wait for ever for one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_sends_a_file_once_and_takes_no_unknown_reply_for_a_verdict() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Arc::default();
    let server = UnknownReplies {
        received: Arc::clone(&received),
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(proto::protection_server_server::ProtectionServerServer::new(server))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let dir = tempfile::tempdir().unwrap();
    let paths: Vec<_> = (0..3)
        .map(|n| {
            let path = dir.path().join(format!("file-{n}"));
            std::fs::write(&path, content(n, 1000)).unwrap();
            path
        })
        .collect();
    let agent = Agent::connect(&AgentOptions::for_host(format!("http://{addr}")))
        .await
        .unwrap();
    let scanned = scan_files(&agent, &paths, HashFirst::Always);
    let outcomes = tokio::time::timeout(Duration::from_secs(20), scanned)
        .await
        .expect("every file has its outcome");
    assert_eq!(outcomes.len(), 3);
    for (name, outcome) in &outcomes {
        assert_eq!(
            outcome.verdict.failure().map(|f| f.reason),
            Some(FailReason::Engine),
            "{name}: {outcome:?}"
        );
    }
    assert_eq!(
        received.load(Ordering::Relaxed),
        3000,
        "each file sent once"
    );
}
