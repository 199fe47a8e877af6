//! Signatures reloaded while serving, over real gRPC on loopback: agents
//! are told, nothing stale is served, broken signatures replace nothing,
//! and the periodic check finds new files on its own.

mod common;

use std::{path::Path, time::Duration};

use common::*;
use scanserver::{
    proto::{
        Hello, ReloadSignaturesRequest, ScanRequest, ServerMessage, StatusRequest, SvmReason,
        file_reply, server_message, verdict,
    },
    signatures::Ruleset,
};
use tokio::sync::mpsc;
use tonic::Code;

/// A rule that finds `marker`.
fn rule(name: &str, marker: &str) -> String {
    format!("rule {name} {{ strings: $m = \"{marker}\" condition: $m }}\n")
}

/// A server whose ruleset is the folder `rules` (one rule finding
/// "MARKER-A" to begin with), with `configure` applied.
async fn server_with_rules(
    rules: &Path,
    configure: impl FnOnce(&mut scanserver::config::Config),
) -> TestServer {
    std::fs::write(rules.join("a.yar"), rule("marker_a", "MARKER-A")).unwrap();
    let rules = rules.to_owned();
    TestServer::start(move |c| {
        c.rules.path = rules;
        configure(c);
    })
    .await
}

/// The next notice of a session's stream, heartbeats skipped.
async fn next_notice(incoming: &mut tonic::Streaming<ServerMessage>) -> server_message::Kind {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(20), incoming.message())
            .await
            .expect("a message in time")
            .unwrap()
            .expect("the session is open");
        match message.kind.unwrap() {
            server_message::Kind::Heartbeat(_) => continue,
            other => return other,
        }
    }
}

/// Scans `data` on a new Scan stream, hash first; checks that the server
/// asks for the content (it knows no verdict) and returns the rules that
/// matched and the verdict's signatures version.
async fn scan_unknown(server: &TestServer, session: &str, data: &[u8]) -> (Vec<String>, String) {
    let (tx, mut replies) = scan_stream(server).await;
    let digest = blake3::hash(data);
    begin_asked_for_content(&tx, &mut replies, session, 1, data, &digest).await;
    tx.send(chunk(1, 0, data)).await.unwrap();
    tx.send(end(1)).await.unwrap();
    let (_, kind) = next(&mut replies).await;
    let rules = verdict_rules(&kind);
    (rules, file_verdict(kind).signatures_version)
}

/// The error of a reload that must fail.
async fn refused_reload(server: &TestServer) -> tonic::Status {
    server
        .admin_client()
        .await
        .reload_signatures(ReloadSignaturesRequest {})
        .await
        .unwrap_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_signatures_replace_the_old_and_nothing_stale_is_served() {
    let rules = tempfile::tempdir().unwrap();
    let server = server_with_rules(rules.path(), |_| {}).await;
    let (_keep, mut incoming) = connect(&server, hello()).await;
    let welcome = match next_notice(&mut incoming).await {
        server_message::Kind::Welcome(welcome) => welcome,
        other => panic!("expected a welcome, got {other:?}"),
    };
    let first = welcome.signatures_version.clone();
    let data = b"a file with MARKER-B in it".repeat(3);
    let (found, version) = scan_unknown(&server, &welcome.session_id, &data).await;
    assert!(found.is_empty(), "clean under the first rules: {found:?}");
    assert_eq!(version, first);

    let mut admin = server.admin_client().await;
    let unchanged = admin
        .reload_signatures(ReloadSignaturesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!unchanged.changed);
    assert_eq!(unchanged.signatures.unwrap().version, first);

    std::fs::write(rules.path().join("b.yar"), rule("marker_b", "MARKER-B")).unwrap();
    let reloaded = admin
        .reload_signatures(ReloadSignaturesRequest {})
        .await
        .unwrap()
        .into_inner();
    let signatures = reloaded.signatures.unwrap();
    assert!(reloaded.changed);
    assert_eq!(reloaded.previous_version, first);
    assert_ne!(signatures.version, first);
    assert_eq!(signatures.rule_count, 2);
    assert_eq!(server.state.engine.ruleset().version(), signatures.version);

    // The agent is told, and the clean verdict of the old rules is not
    // served: the content is asked for again, and found.
    match next_notice(&mut incoming).await {
        server_message::Kind::SignaturesChanged(notice) => {
            assert_eq!(notice.signatures_version, signatures.version);
            assert_eq!(notice.rule_count, 2);
        }
        other => panic!("expected a signatures notice, got {other:?}"),
    }
    let (found, version) = scan_unknown(&server, &welcome.session_id, &data).await;
    assert_eq!(found, ["marker_b"]);
    assert_eq!(version, signatures.version);
    assert!(
        !server
            .svm
            .status()
            .reasons
            .contains(&SvmReason::SignaturesUpdateFailed),
        "{:?}",
        server.svm.status()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signatures_that_do_not_load_replace_nothing() {
    let rules = tempfile::tempdir().unwrap();
    let server = server_with_rules(rules.path(), |_| {}).await;
    let first = server.state.engine.ruleset().version().to_owned();
    let broken = rules.path().join("broken.yar");
    std::fs::write(&broken, "rule fine { condition: true }\nrule broken {\n").unwrap();

    let refused = refused_reload(&server).await;
    let mut admin = server.admin_client().await;
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("broken.yar:3:1")
            && refused
                .message()
                .contains(&format!("signatures version {first}")),
        "names the error and the version kept: {}",
        refused.message()
    );
    assert_eq!(server.state.engine.ruleset().version(), first);
    let status = admin.status(StatusRequest {}).await.unwrap().into_inner();
    let report = status.report.unwrap();
    assert!(
        report
            .reasons
            .contains(&(SvmReason::SignaturesUpdateFailed as i32))
    );
    let component = status
        .components
        .iter()
        .find(|c| c.name == "signatures")
        .unwrap();
    assert!(
        component.detail.contains("the last reload failed: ")
            && component.detail.contains("broken.yar:3:1"),
        "{}",
        component.detail
    );

    // The old rules keep scanning.
    let (session, _keep) = session_of(&server, hello()).await;
    let (found, version) = scan_unknown(&server, &session, b"MARKER-A").await;
    assert_eq!(
        (found, version),
        (vec!["marker_a".to_owned()], first.clone())
    );

    // Back to the loaded version: nothing to reload, and nothing failed.
    std::fs::remove_file(&broken).unwrap();
    let reply = admin
        .reload_signatures(ReloadSignaturesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!reply.changed);
    assert!(
        server.svm.status().reasons.is_empty(),
        "{:?}",
        server.svm.status()
    );
}

/// Rules nested deeper than a parser should recurse (generated, or
/// broken) are refused with where they are, and the server goes on with
/// its rules: parsed on a runtime's thread, tens of thousands of levels
/// overflowed its stack, which aborted the whole server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_nested_too_deep_are_refused_and_the_server_goes_on() {
    let rules = tempfile::tempdir().unwrap();
    let server = server_with_rules(rules.path(), |_| {}).await;
    let first = server.state.engine.ruleset().version().to_owned();
    for (name, condition) in [
        ("not.yar", format!("{}$a", "not ".repeat(50_000))),
        ("chain.yar", vec!["1"; 50_000].join(" | ") + " == 0 and $a"),
    ] {
        let deep = format!("rule deep {{ strings: $a = \"abc\" condition: {condition} }}\n");
        std::fs::write(rules.path().join(name), deep).unwrap();
        let refused = refused_reload(&server).await;
        assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
        assert!(
            refused.message().contains(&format!("{name}:1:"))
                && refused.message().contains("nested more than 1000 levels"),
            "{}",
            refused.message()
        );
        std::fs::remove_file(rules.path().join(name)).unwrap();
    }
    assert_eq!(server.state.engine.ruleset().version(), first);
    let (session, _keep) = session_of(&server, hello()).await;
    let (found, _) = scan_unknown(&server, &session, b"MARKER-A").await;
    assert_eq!(found, ["marker_a"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ruleset_with_nothing_to_find_replaces_nothing() {
    let rules = tempfile::tempdir().unwrap();
    let server = server_with_rules(rules.path(), |_| {}).await;
    let first = server.state.engine.ruleset().version().to_owned();
    // An update cut short: only a private helper rule is left.
    std::fs::write(
        rules.path().join("a.yar"),
        "private rule helper { condition: true }\n",
    )
    .unwrap();
    let refused = refused_reload(&server).await;
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains("no rule that can match"),
        "{}",
        refused.message()
    );
    assert_eq!(server.state.engine.ruleset().version(), first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_periodic_check_loads_new_signatures_and_reports_broken_ones() {
    let rules = tempfile::tempdir().unwrap();
    let server = server_with_rules(rules.path(), |c| {
        c.rules.check_interval = Duration::from_millis(100);
    })
    .await;
    let (_keep, mut incoming) = connect(
        &server,
        Hello {
            vm_id: "vm-check".into(),
            ..hello()
        },
    )
    .await;
    assert!(matches!(
        next_notice(&mut incoming).await,
        server_message::Kind::Welcome(_)
    ));
    let first = server.state.engine.ruleset().version().to_owned();

    std::fs::write(rules.path().join("b.yar"), rule("marker_b", "MARKER-B")).unwrap();
    match next_notice(&mut incoming).await {
        server_message::Kind::SignaturesChanged(notice) => {
            assert_ne!(notice.signatures_version, first);
            assert_eq!(notice.rule_count, 2);
        }
        other => panic!("expected a signatures notice, got {other:?}"),
    }

    std::fs::write(rules.path().join("c.yar"), "rule broken {\n").unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !server
        .svm
        .status()
        .reasons
        .contains(&SvmReason::SignaturesUpdateFailed)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the failure is never reported"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        server.state.engine.ruleset().rule_count(),
        2,
        "still the last good rules"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_errors_are_abridged_in_the_answer() {
    let rules = tempfile::tempdir().unwrap();
    let server = server_with_rules(rules.path(), |_| {}).await;
    for i in 0..15 {
        // Spaces, which the gRPC message header percent-encodes.
        let long = "x ".repeat(1000);
        let source = format!("rule broken_{i} {{ condition: no_such_{i} or \"{long}\" }}\n");
        std::fs::write(rules.path().join(format!("broken_{i:02}.yar")), source).unwrap();
    }
    let refused = refused_reload(&server).await;
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    let message = refused.message();
    assert!(
        message.starts_with("15 errors in the ruleset; the first 10:")
            && message.contains("broken_00.yar:1:")
            && !message.contains("broken_14.yar")
            && message.len() < 5 << 10
            && message.ends_with(&format!(
                "the SVM goes on with signatures version {}",
                server.state.engine.ruleset().version()
            )),
        "{message}"
    );
}

/// Signatures of `slow` (a rule that takes its time) and of a rule
/// `marker`, finding "MARKER-N" where `condition` holds.
fn marker_rules(slow: &str, condition: &str) -> Ruleset {
    ruleset_from_source(&format!(
        "{slow}\nrule marker {{ strings: $m = \"MARKER-N\" condition: {condition} }}\n"
    ))
}

/// On a new Scan stream of `session`: file1.bin of `data`, sent whole (it
/// leads the scan of that content), then file2.bin announced by digest
/// (it waits for that scan); returns once the server has taken both.
async fn one_leads_one_waits(
    server: &TestServer,
    session: &str,
    data: &[u8],
) -> (mpsc::Sender<ScanRequest>, Replies) {
    let digest = blake3::hash(data);
    let flights = || server.state.engine.cache().flights().len();
    let in_flight = || server.state.sessions.files_in_flight();
    let (flights_before, files_before) = (flights(), in_flight());
    let (tx, replies) = scan_stream(server).await;
    send_whole(&tx, session, 1, data).await;
    until_read("scans under way", flights, flights_before + 1).await;
    tx.send(begin(session, 2, data, Some(digest.as_bytes())))
        .await
        .unwrap();
    until_read("files in flight", in_flight, files_before + 2).await;
    (tx, replies)
}

/// Once the signatures were replaced under [`one_leads_one_waits`]:
/// file1.bin's verdict, and that of file2.bin, which must have been asked
/// for its content (the scan thread lands the flight before it sends the
/// verdict: the two replies may come in either order), and got it.
async fn leader_and_waiter_verdicts(
    tx: &mpsc::Sender<ScanRequest>,
    replies: &mut Replies,
    data: &[u8],
) -> (file_reply::Kind, file_reply::Kind) {
    let mut two = [next(replies).await, next(replies).await];
    two.sort_by_key(|(id, _)| *id);
    let [(first, verdict), (second, asked)] = two;
    assert_eq!(first, 1);
    assert!(
        second == 2 && matches!(asked, file_reply::Kind::SendContent(_)),
        "{second}: {asked:?}"
    );
    tx.send(chunk(2, 0, data)).await.unwrap();
    tx.send(end(2)).await.unwrap();
    let (id, kind) = next(replies).await;
    assert_eq!(id, 2);
    (verdict, kind)
}

/// A scan that waited for a thread while the signatures were reloaded is
/// made with the new rules, under its own file's name: its verdict is not
/// handed to the files that waited for it, whose names the new rules may
/// judge otherwise. They are asked for their content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scan_made_with_newer_signatures_is_not_handed_to_its_waiters() {
    // One scan thread, kept busy by a slow scan (at least 2 s: YARA-X
    // stops it at its 3 s timeout's next whole second).
    let server = TestServer::start(|c| {
        c.engine.threads = 1;
        c.engine.scan_timeout = Duration::from_secs(3);
    })
    .await;
    server
        .state
        .replace_ruleset(marker_rules(SLOW_RULE, "$m and false"));
    let (session, _keep) = session_of(&server, hello()).await;
    let (busy, _busy_replies) = scan_stream(&server).await;
    send_whole(&busy, &session, 9, &vec![1u8; 200_000]).await;
    let flights = || server.state.engine.cache().flights().len();
    until_read("the slow scan under way", flights, 1).await;

    // The new rules find the marker in file2.bin only (compiled first:
    // the reload must come while the slow scan lasts).
    let new_rules = marker_rules(SLOW_RULE, "$m and filename == \"file2.bin\"");
    let new_version = new_rules.version().to_owned();
    // file1.bin leads the scan of the content, queued behind the slow
    // one; file2.bin waits for it.
    let data = b"MARKER-N".repeat(4);
    let (tx, mut replies) = one_leads_one_waits(&server, &session, &data).await;
    server.state.replace_ruleset(new_rules);

    // (The slow rule matches content this small.)
    let (first, second) = leader_and_waiter_verdicts(&tx, &mut replies, &data).await;
    assert_eq!(verdict_rules(&first), vec!["slow".to_owned()]);
    let file_reply::Kind::Verdict(first) = first else {
        unreachable!("a verdict, as its rules were read");
    };
    assert_eq!(
        first.signatures_version, new_version,
        "scanned after the reload"
    );
    assert_eq!(
        verdict_rules(&second),
        vec!["slow".to_owned(), "marker".to_owned()]
    );
}

/// A scan under way when the signatures are replaced ends with the rules
/// it began with, and its verdict goes to its own file, which says so; but
/// not to the files that waited for it, which the current rules judge:
/// they are asked for their content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scan_under_way_at_a_reload_is_not_handed_to_its_waiters() {
    let server = TestServer::start(|c| c.engine.scan_timeout = Duration::from_secs(60)).await;
    // The slow rule takes the square of the content's size: a few seconds
    // for this content, which it then finds clean.
    let slow = SLOW_RULE
        .replace("condition:", "condition: (")
        .replace(")\n}", ")) and filesize < 10\n}");
    server
        .state
        .replace_ruleset(marker_rules(&slow, "$m and false"));
    let old_version = server.state.engine.ruleset().version().to_owned();
    let (session, _keep) = session_of(&server, hello()).await;
    let mut data = b"MARKER-N".repeat(4);
    data.resize(12_000, b'.');
    // Compiled first: the reload must come while the scan lasts.
    let newer = marker_rules(&slow, "$m");
    let (tx, mut replies) = one_leads_one_waits(&server, &session, &data).await;
    // A scan thread is on the content; it reads the rules the instant
    // after it says so, which the pause leaves it.
    let digest = blake3::hash(&data);
    let on_it = || {
        server
            .state
            .engine
            .second_copy_refused_in(&digest)
            .is_some()
    };
    until_read("the scan under way", on_it, true).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.state.replace_ruleset(newer);
    let (first, second) = leader_and_waiter_verdicts(&tx, &mut replies, &data).await;
    let file_reply::Kind::Verdict(verdict) = first else {
        panic!("{first:?}");
    };
    assert_eq!(
        verdict.signatures_version, old_version,
        "the rules it began with"
    );
    assert!(matches!(
        verdict.verdict.and_then(|v| v.kind),
        Some(verdict::Kind::Clean(_))
    ));
    assert_eq!(verdict_rules(&second), vec!["marker".to_owned()]);
}

/// Reloads asked for while one runs are merged: twenty asked at once make
/// at most two reloads (the one that started first, and one after it that
/// reads the files again), whose outcomes the asks share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_asked_for_at_once_are_merged() {
    let rules = tempfile::tempdir().unwrap();
    let server = server_with_rules(rules.path(), |_| {}).await;
    // Rules that take a while to compile: the twenty asks are all made
    // while the first reload runs.
    let many: String = (0..500)
        .map(|n| rule(&format!("marker_b{n}"), &format!("MARKER-B-{n}")))
        .collect();
    std::fs::write(rules.path().join("b.yar"), many).unwrap();
    let asks: Vec<_> = (0..20)
        .map(|_| {
            let reloader = std::sync::Arc::clone(&server.reloader);
            tokio::spawn(async move { reloader.reload().await })
        })
        .collect();
    let mut reloads: Vec<scanserver::reload::Outcome> = Vec::new();
    for ask in asks {
        let outcome = ask.await.unwrap();
        assert!(outcome.is_ok(), "every ask is answered");
        if !reloads.iter().any(|r| std::sync::Arc::ptr_eq(r, &outcome)) {
            reloads.push(outcome);
        }
    }
    assert!(reloads.len() <= 2, "{} reloads ran", reloads.len());
    let changed = reloads
        .iter()
        .filter(|r| r.as_ref().as_ref().unwrap().changed);
    assert_eq!(changed.count(), 1, "the new rules are loaded once");
    assert_eq!(server.state.engine.ruleset().rule_count(), 501);
}

/// Files of the loaded signatures written again unchanged (an updater that
/// copies without keeping times) are as new as they say, as a restart would
/// find them; files whose time went back are as old.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_release_time_follows_files_written_again_unchanged() {
    use std::time::SystemTime;
    let rules = tempfile::tempdir().unwrap();
    let server = server_with_rules(rules.path(), |_| {}).await;
    let version = server.state.engine.ruleset().version_arc();
    let set_time = |time: SystemTime| {
        let file = std::fs::File::options()
            .append(true)
            .open(rules.path().join("a.yar"))
            .unwrap();
        file.set_modified(time).unwrap();
    };
    let released = || server.state.engine.ruleset().release_time();
    let near = |a: SystemTime, b: SystemTime| {
        let apart = a.duration_since(b).or_else(|e| Ok::<_, ()>(e.duration()));
        apart.unwrap() < Duration::from_secs(1)
    };
    let week_ago = SystemTime::now() - Duration::from_secs(7 * 24 * 3600);
    set_time(week_ago);
    server.reloader.reload().await.as_ref().as_ref().unwrap();
    assert!(near(released(), week_ago), "{:?}", released());
    let now = SystemTime::now();
    set_time(now);
    server.reloader.reload().await.as_ref().as_ref().unwrap();
    assert!(near(released(), now), "{:?}", released());
    assert_eq!(
        server.state.engine.ruleset().version_arc(),
        version,
        "not loaded again"
    );
}
