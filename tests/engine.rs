//! The scan engine: limits, failures, files, the async queue and rule swaps.

mod common;

use std::{fs, io::Write, sync::Arc, time::Duration};

use common::*;
use scanserver::{
    engine::{Content, Engine, EngineConfig, ScanJob},
    verdict::{FailReason, Verdict},
};

fn reason(verdict: &Verdict) -> Option<FailReason> {
    verdict.failure().map(|f| f.reason)
}

#[test]
fn a_scan_past_the_timeout_fails_with_timeout() {
    let config = EngineConfig {
        threads: 1,
        scan_timeout: Duration::from_secs(1),
        ..EngineConfig::default()
    };
    let engine = engine_with(ruleset_from_source(SLOW_RULE), config);
    let outcome = engine.scan(&ScanJob::bytes(vec![1u8; 200_000], None));
    assert_eq!(
        reason(&outcome.verdict),
        Some(FailReason::Timeout),
        "{:?}",
        outcome.verdict
    );
    assert!(!outcome.verdict.is_clean());
    // The worker recovers: the next scan of small data completes.
    let outcome = engine.scan(&ScanJob::bytes(vec![1u8; 10], None));
    assert!(
        matches!(outcome.verdict, Verdict::Infected(_)),
        "{:?}",
        outcome.verdict
    );
}

/// YARA-X ends a scan at a tick of its one-second clock: a scan of a
/// moment over a tick must not fail with a timeout of one second. Small
/// scans, one after the other, for longer than two ticks.
#[test]
fn a_short_scan_over_a_tick_of_yara_x_clock_does_not_time_out() {
    let config = EngineConfig {
        threads: 1,
        scan_timeout: Duration::from_secs(1),
        ..EngineConfig::default()
    };
    let engine = engine_with(shipped_ruleset(), config);
    let started = std::time::Instant::now();
    let mut scans = 0u64;
    while started.elapsed() < Duration::from_millis(2500) {
        scans += 1;
        let data = [&scans.to_le_bytes()[..], &[0; 4096]].concat();
        let outcome = engine.scan(&ScanJob::bytes(data, None));
        assert!(
            outcome.verdict.is_clean(),
            "scan {scans}: {:?}",
            outcome.verdict
        );
    }
}

#[test]
fn content_over_the_size_limit_fails_with_too_large() {
    let config = EngineConfig {
        max_scan_size: 1000,
        ..EngineConfig::default()
    };
    let engine = engine_with(shipped_ruleset(), config);
    let outcome = engine.scan(&ScanJob::bytes(vec![0u8; 1001], None));
    assert_eq!(reason(&outcome.verdict), Some(FailReason::TooLarge));
    assert_eq!(outcome.size, 1001);

    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(&[0u8; 4096]).unwrap();
    let outcome = engine.scan(&ScanJob::file(file.path()));
    assert_eq!(reason(&outcome.verdict), Some(FailReason::TooLarge));
    assert!(outcome.digest.is_none());

    // Neither reached the scanner: no scan is counted, nor their bytes.
    let metrics = engine.metrics();
    assert_eq!((metrics.scans.get(), metrics.scanned_bytes.get()), (0, 0));

    let outcome = engine.scan(&ScanJob::bytes(vec![0u8; 1000], None));
    assert_eq!(outcome.verdict, Verdict::Clean);
    assert_eq!(
        (metrics.scans.get(), metrics.scanned_bytes.get()),
        (1, 1000)
    );
}

#[test]
fn unreadable_paths_fail_with_io() {
    let engine = shipped_engine();
    let dir = tempfile::tempdir().unwrap();
    // A FIFO in a file's place is refused, not waited on for a writer
    // (which would hang the scan: the test gives it 20 s).
    let fifo = make_fifo(&dir.path().join("fifo"));
    for path in [dir.path().join("missing"), dir.path().to_owned(), fifo] {
        let (engine, job) = (Arc::clone(&engine), ScanJob::file(&path));
        let (done, outcome) = std::sync::mpsc::channel();
        std::thread::spawn(move || done.send(engine.scan(&job)));
        let outcome = outcome
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("the scan ends");
        assert_eq!(
            reason(&outcome.verdict),
            Some(FailReason::Io),
            "{}",
            path.display()
        );
    }
    assert_eq!(engine.metrics().scans.get(), 0, "nothing was read");
}

/// A symbolic link put in a walked file's place, to a FIFO (or a device),
/// is not opened: what the link leads to is looked at first. The FIFO's
/// writer, waiting for a reader, shows it: opened for reading, even
/// without blocking, the FIFO would let the writer through.
#[test]
fn a_link_swapped_in_for_a_file_is_not_opened_when_it_leads_to_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = make_fifo(&dir.path().join("fifo"));
    let walked = dir.path().join("walked");
    std::os::unix::fs::symlink(&fifo, &walked).unwrap();
    let (opened, writer) = std::sync::mpsc::channel();
    let path = fifo.clone();
    std::thread::spawn(move || {
        let file = std::fs::OpenOptions::new().write(true).open(&path);
        opened.send(file.is_ok()).unwrap();
    });
    // Time for the writer to wait in its open.
    std::thread::sleep(Duration::from_millis(200));
    let err = scanserver::files::open_regular(&walked, Duration::ZERO).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{err}");
    let waited = writer.recv_timeout(Duration::from_millis(300));
    assert!(waited.is_err(), "the FIFO was opened for reading");
    // Let the writer go.
    let _reader = std::fs::File::open(&fifo).unwrap();
    assert!(writer.recv().unwrap(), "the writer went on");
}

#[test]
fn files_are_scanned_read_or_mapped_with_their_digest() {
    let ruleset =
        ruleset_from_source(r#"rule tail { strings: $t = "NEEDLE-AT-THE-END" condition: $t }"#);
    let engine = engine_with(ruleset, EngineConfig::default());
    let dir = tempfile::tempdir().unwrap();
    // Small files are read; files over 32 MiB are memory-mapped.
    for size in [1000usize, 40 << 20] {
        let mut data = vec![b'.'; size];
        data.extend_from_slice(b"NEEDLE-AT-THE-END");
        let path = dir.path().join(format!("f{size}"));
        fs::write(&path, &data).unwrap();
        let outcome = engine.scan(&ScanJob::file(&path));
        assert_eq!(outcome.verdict.detections()[0].rule, "tail", "{size}");
        assert_eq!(outcome.size, data.len() as u64);
        assert_eq!(outcome.digest, Some(blake3::hash(&data)));
        assert_eq!(&*outcome.rules_version, engine.ruleset().version());
        // A mapped file is hashed and scanned in two reads, between which
        // another process may write to it: its verdict is not cached.
        let again = engine.scan(&ScanJob::file(&path));
        assert_eq!(again.cached, size < 32 << 20, "{size}");
    }
}

/// A file under another process's lease (a file server's oplock) is
/// opened once its holder lets go, as the lease's break asks it to; one
/// whose holder holds on past the scan timeout fails with `io`.
#[test]
fn a_file_under_a_lease_is_scanned_once_its_holder_lets_go() {
    use std::os::fd::AsRawFd;
    // Well past the 300 ms the holder keeps its lease below.
    let config = EngineConfig {
        scan_timeout: Duration::from_secs(3),
        ..EngineConfig::default()
    };
    let engine = engine_with(shipped_ruleset(), config);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("leased.com");
    fs::write(&path, EICAR).unwrap();
    let holder = fs::File::open(&path).unwrap();
    let lease = |kind: libc::c_int| {
        // SAFETY: fcntl on a descriptor this test owns.
        assert_eq!(
            unsafe { libc::fcntl(holder.as_raw_fd(), libc::F_SETLEASE, kind) },
            0
        );
    };
    // Told to let go with SIGIO, which would end the test.
    // SAFETY: ignoring a signal this test binary does not otherwise use.
    unsafe { libc::signal(libc::SIGIO, libc::SIG_IGN) };

    lease(libc::F_WRLCK);
    let outcome = std::thread::scope(|scope| {
        scope.spawn(|| {
            std::thread::sleep(Duration::from_millis(300));
            lease(libc::F_UNLCK);
        });
        engine.scan(&ScanJob::file(&path))
    });
    assert_eq!(outcome.verdict.detections()[0].rule, "EICAR_Test_File");

    lease(libc::F_WRLCK);
    let outcome = engine.scan(&ScanJob::file(&path));
    assert_eq!(
        reason(&outcome.verdict),
        Some(FailReason::Io),
        "{outcome:?}"
    );
    lease(libc::F_UNLCK);
}

/// Files of /proc (and /sys, and some FUSE file systems) say they hold 0
/// bytes, whatever they hold: they are read to their end, not taken for
/// empty.
#[test]
fn files_that_say_they_are_empty_are_read_to_their_end() {
    let ruleset = ruleset_from_source(r#"rule status { strings: $n = "VmRSS:" condition: $n }"#);
    let engine = engine_with(ruleset, EngineConfig::default());
    let status = std::path::Path::new("/proc/self/status");
    assert_eq!(fs::metadata(status).unwrap().len(), 0);
    let outcome = engine.scan(&ScanJob::file(status));
    assert_eq!(outcome.verdict.detections()[0].rule, "status");
    assert!(outcome.size > 0);
}

/// A spooled upload found shorter than what was received (and hashed)
/// fails: its verdict would be cached under the whole content's digest.
#[test]
fn a_spooled_upload_shorter_than_received_fails() {
    let engine = shipped_engine();
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(&[7u8; 100]).unwrap();
    let job = |size| ScanJob {
        content: Content::Spooled {
            file: file.try_clone().unwrap(),
            size,
        },
        name: None,
        digest: None,
    };
    assert_eq!(
        reason(&engine.scan(&job(1000)).verdict),
        Some(FailReason::Io)
    );
    let whole = engine.scan(&job(100));
    assert!(whole.verdict.is_clean(), "{:?}", whole.verdict);
    assert_eq!(whole.digest, Some(blake3::hash(&[7u8; 100])));
}

#[test]
fn parallel_file_scans_report_every_file() {
    let engine = shipped_engine();
    let dir = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for i in 0..50 {
        let path = dir.path().join(format!("{i}.txt"));
        fs::write(
            &path,
            if i % 10 == 0 {
                EICAR.to_vec()
            } else {
                vec![b'a'; i * 100]
            },
        )
        .unwrap();
        paths.push(path);
    }
    let results = std::sync::Mutex::new(Vec::new());
    engine.scan_all(paths.iter().map(ScanJob::file), |job, outcome| {
        let Content::File(file) = job.content else {
            unreachable!()
        };
        results
            .lock()
            .unwrap()
            .push((file.path, outcome.verdict.kind()));
    });
    let mut results = results.into_inner().unwrap();
    results.sort();
    assert_eq!(results.len(), 50);
    assert_eq!(
        results
            .iter()
            .filter(|(_, kind)| *kind == "infected")
            .count(),
        5
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_submissions_through_a_small_queue_each_get_their_verdict() {
    let config = EngineConfig {
        threads: 2,
        queue_capacity: 3,
        ..EngineConfig::default()
    };
    let engine = engine_with(shipped_ruleset(), config);
    let mut tasks = Vec::new();
    for i in 0..40 {
        let engine = Arc::clone(&engine);
        tasks.push(tokio::spawn(async move {
            let data = if i % 4 == 0 {
                EICAR.to_vec()
            } else {
                vec![b'x'; 200_000]
            };
            let outcome = engine.submit(ScanJob::bytes(data, None)).await;
            outcome.verdict.kind()
        }));
    }
    let mut infected = 0;
    for task in tasks {
        infected += (task.await.unwrap() == "infected") as usize;
    }
    assert_eq!(infected, 10);
    assert_eq!(engine.queue_depth(), 0);
}

#[tokio::test]
async fn a_full_queue_makes_the_next_scan_wait_for_a_place() {
    let config = EngineConfig {
        queue_capacity: 1,
        ..EngineConfig::default()
    };
    let engine = engine_with(shipped_ruleset(), config);
    let eicar = ScanJob::bytes(EICAR.to_vec(), None);
    let first = engine.reserve(&eicar.content).await;
    assert_eq!(engine.queue_depth(), 1);
    let waiting = tokio::spawn({
        let engine = Arc::clone(&engine);
        async move { engine.submit(ScanJob::bytes(b"x".to_vec(), None)).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiting.is_finished(), "the only place is taken");
    let outcome = first.scan(eicar, |_| {}).await;
    assert!(matches!(outcome.verdict, Verdict::Infected(_)));
    let outcome = waiting.await.unwrap();
    assert_eq!(
        outcome.verdict,
        Verdict::Clean,
        "scanned once the place was free"
    );
}

/// A spooled upload waits for its share of the mapped budget before it
/// takes a scan thread: while a large file waits for room, small files are
/// scanned.
#[tokio::test]
async fn a_spooled_file_waits_for_mapped_room_off_the_scan_threads() {
    let config = EngineConfig {
        threads: 1,
        mapped_budget: 1 << 20,
        ..EngineConfig::default()
    };
    let engine = engine_with(shipped_ruleset(), config);
    let spooled = |fill: u8| {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&[fill; 1 << 20]).unwrap();
        ScanJob {
            content: Content::Spooled {
                file,
                size: 1 << 20,
            },
            name: None,
            digest: None,
        }
    };
    let first = spooled(b'a');
    // Holds the whole budget, and no thread.
    let holder = engine.reserve(&first.content).await;
    let second = tokio::spawn({
        let engine = Arc::clone(&engine);
        let job = spooled(b'b');
        async move { engine.submit(job).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let small = tokio::time::timeout(
        Duration::from_secs(10),
        engine.submit(ScanJob::bytes(EICAR.to_vec(), None)),
    )
    .await
    .expect("a small file is scanned while a large one waits for room");
    assert!(matches!(small.verdict, Verdict::Infected(_)));
    assert!(!second.is_finished(), "the second file had no room");
    let outcome = holder.scan(first, |_| {}).await;
    assert_eq!(outcome.verdict, Verdict::Clean);
    assert_eq!(second.await.unwrap().verdict, Verdict::Clean);
}

#[test]
fn rules_are_replaced_while_scans_run() {
    let engine = shipped_engine();
    let old_version = engine.ruleset().version().to_owned();
    let (scanning, started) = std::sync::mpsc::channel();
    let seen = std::thread::scope(|scope| {
        let scanner = scope.spawn(|| {
            let mut seen = std::collections::BTreeMap::new();
            // Content unlike any scanned before, each time (EICAR, then
            // the count in spaces and tabs, as the test file may end): a
            // verdict from the cache would not be a scan under either
            // ruleset.
            for i in 0..1_000_000u32 {
                let count = (0..20).map(|bit| if i >> bit & 1 == 1 { b'\t' } else { b' ' });
                let content: Vec<u8> = EICAR.iter().copied().chain(count).collect();
                let outcome = engine.scan(&ScanJob::bytes(content, None));
                assert!(!outcome.cached);
                // Every scan is complete under one ruleset or the other,
                // and its verdict is that of the rules it names.
                let rule = match &outcome.verdict {
                    Verdict::Infected(_) => outcome.verdict.detections()[0].rule.clone(),
                    other => panic!("EICAR not found: {other:?}"),
                };
                let version = outcome.rules_version.to_string();
                let new_rules = version != old_version;
                assert_eq!(rule == "other", new_rules, "{rule} under {version}");
                *seen.entry(version).or_insert(0) += 1;
                let _ = scanning.send(());
                if new_rules {
                    break;
                }
            }
            seen
        });
        started.recv().unwrap();
        engine.replace_ruleset(ruleset_from_source(
            r#"rule other { strings: $e = "EICAR" condition: $e }"#,
        ));
        scanner.join().unwrap()
    });
    let new_version = engine.ruleset().version().to_owned();
    assert_ne!(old_version, new_version);
    assert!(seen.contains_key(&old_version), "{seen:?}");
    assert!(seen.contains_key(&new_version), "{seen:?}");
}

#[test]
fn verdicts_are_cached_by_content_and_by_name_only_when_rules_look_at_names() {
    let engine = shipped_engine();
    let first = engine.scan(&ScanJob::bytes(EICAR.to_vec(), Some("/a/eicar.com".into())));
    assert!(!first.cached);
    // Same content, another name: the shipped rules ignore names.
    let again = engine.scan(&ScanJob::bytes(EICAR.to_vec(), Some("/b/other.txt".into())));
    assert!(again.cached);
    assert_eq!(again.verdict, first.verdict);
    assert_eq!(again.digest, first.digest);
    assert!(engine.cached(&blake3::hash(EICAR), None).is_some());

    let by_name = ruleset_from_source(r#"rule exe { condition: extension == ".exe" }"#);
    assert!(by_name.name_sensitive());
    let engine = engine_with(by_name, EngineConfig::default());
    let exe = engine.scan(&ScanJob::bytes(b"x".to_vec(), Some("a.exe".into())));
    let txt = engine.scan(&ScanJob::bytes(b"x".to_vec(), Some("a.txt".into())));
    assert!(matches!(exe.verdict, Verdict::Infected(_)));
    assert_eq!((txt.verdict, txt.cached), (Verdict::Clean, false));
    let exe_again = engine.scan(&ScanJob::bytes(b"x".to_vec(), Some("a.exe".into())));
    assert!(exe_again.cached && matches!(exe_again.verdict, Verdict::Infected(_)));
}

#[test]
fn failures_are_not_cached_and_a_rules_change_empties_the_cache() {
    let config = EngineConfig {
        threads: 1,
        scan_timeout: Duration::from_secs(1),
        ..EngineConfig::default()
    };
    let engine = engine_with(ruleset_from_source(SLOW_RULE), config);
    let data = vec![1u8; 200_000];
    let outcome = engine.scan(&ScanJob::bytes(data.clone(), None));
    assert_eq!(reason(&outcome.verdict), Some(FailReason::Timeout));
    assert!(engine.cached(&blake3::hash(&data), None).is_none());

    let engine = shipped_engine();
    engine.scan(&ScanJob::bytes(EICAR.to_vec(), None));
    assert_eq!(engine.cache().len(), 1);
    engine.replace_ruleset(shipped_ruleset());
    assert!(engine.cache().is_empty());
    assert!(!engine.scan(&ScanJob::bytes(EICAR.to_vec(), None)).cached);
}

/// A server's scan whose thread sticks is told of a failure once the
/// thread counts as stuck: its file does not wait for a verdict for ever.
/// Told once: the thread's own outcome, when it comes back, goes to no one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scan_whose_thread_sticks_is_told_of_a_failure() {
    let config = EngineConfig {
        threads: 1,
        scan_timeout: Duration::from_secs(1),
        mapped_budget: 1 << 20,
        ..EngineConfig::default()
    };
    let engine = engine_with(shipped_ruleset(), config);
    let spooled = |size| {
        let file = tempfile::tempfile().unwrap();
        file.set_len(size).unwrap();
        Content::Spooled { file, size }
    };
    // The whole mapped budget, held: a spooled job given a place without
    // its share waits for that on its thread.
    let room = engine.reserve(&spooled(1 << 20)).await;
    let place = engine.reserve(&Content::Bytes(Default::default())).await;
    let digest = blake3::hash(b"content that sticks");
    let job = ScanJob {
        content: spooled(4096),
        name: None,
        digest: Some(digest),
    };
    let (told, mut outcomes) = tokio::sync::mpsc::unbounded_channel();
    place.scan_then(job, move |outcome| drop(told.send(outcome)));
    // Stuck after three scan timeouts and a tick: 4 s.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while engine.stuck_threads() == 0 {
        assert!(std::time::Instant::now() < deadline, "never stuck");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let outcome = tokio::time::timeout(Duration::from_secs(10), outcomes.recv())
        .await
        .expect("told of a failure")
        .expect("an outcome");
    assert_eq!(reason(&outcome.verdict), Some(FailReason::Engine));
    let detail = &outcome.verdict.failure().unwrap().detail;
    assert!(detail.contains("kept a scan thread busy"), "{detail}");
    assert_eq!(outcome.digest, Some(digest));
    assert!(outcomes.recv().await.is_none(), "told once");
    // The thread comes back once it has room.
    drop(room);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while engine.stuck_threads() != 0 {
        assert!(std::time::Instant::now() < deadline, "never back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Content that sticks a scan thread (here a spooled upload waiting on its
/// thread for room in the mapped budget, held: a real thread, really held)
/// is refused once the thread counts as stuck: another request for it
/// fails at once, never clean, and so it does after a restart with the
/// same state folder. Once its thread comes back, it is refused for the
/// rest of the run, but no longer kept for the next. A list another
/// version of the server made is set aside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_that_sticks_a_scan_thread_is_refused_after_restarts_too() {
    let state = tempfile::tempdir().unwrap();
    let file = state.path().join(scanserver::engine::STUCK_CONTENTS_FILE);
    let config = EngineConfig {
        threads: 2,
        scan_timeout: Duration::from_secs(1),
        mapped_budget: 1 << 20,
        ..EngineConfig::default()
    };
    let start = || {
        let engine = engine_with(shipped_ruleset(), config.clone());
        let loaded = engine.keep_stuck_contents_in(state.path()).unwrap();
        (engine, loaded)
    };
    let (engine, loaded) = start();
    assert_eq!(loaded, 0);
    let data = vec![0u8; 4096];
    let digest = blake3::hash(&data);
    let with_digest = |content| ScanJob {
        content,
        name: None,
        digest: Some(digest),
    };
    let spooled = tempfile::tempfile().unwrap();
    spooled.set_len(data.len() as u64).unwrap();
    let sticking = with_digest(Content::Spooled {
        file: spooled,
        size: data.len() as u64,
    });
    let room = engine
        .reserve(&Content::Spooled {
            file: tempfile::tempfile().unwrap(),
            size: 1 << 20,
        })
        .await;
    let stuck = {
        let engine = Arc::clone(&engine);
        std::thread::spawn(move || engine.scan(&sticking))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while engine.stuck_threads() == 0 || !file.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "never stuck, or not kept"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(engine.stuck_contents(), 1);
    // A copy received now would wait for the scan under way no longer:
    // the thread has been on it for over two scan timeouts.
    let refused_in = engine
        .second_copy_refused_in(&digest)
        .expect("a thread is on it");
    assert!(refused_in <= Duration::from_millis(10), "{refused_in:?}");
    assert_eq!(engine.second_copy_refused_in(&blake3::hash(b"other")), None);
    let scan_it = |engine: &Engine| engine.scan(&with_digest(Content::Bytes(data.clone().into())));
    let refused = |engine: &Engine| {
        let outcome = scan_it(engine);
        let failure = outcome.verdict.failure().expect("refused, never clean");
        assert_eq!(failure.reason, FailReason::Engine);
        assert!(
            failure.detail.contains("kept a scan thread busy"),
            "{}",
            failure.detail
        );
    };
    refused(&engine);
    let other = engine.scan(&ScanJob::bytes(b"other content".to_vec(), None));
    assert!(other.verdict.is_clean(), "other content is scanned");

    // Restarted while the thread is stuck (the watchdog's restart): refused.
    let (restarted, loaded) = start();
    assert_eq!(loaded, 1);
    refused(&restarted);

    // The thread comes back: refused for the rest of the run, not kept.
    drop(room);
    assert!(stuck.join().is_ok());
    refused(&engine);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while fs::read_to_string(&file)
        .unwrap()
        .contains(&digest.to_hex().to_string())
    {
        assert!(std::time::Instant::now() < deadline, "still kept");
        // The status's look, every second: saves again what a save under
        // way may have missed.
        engine.stuck_threads();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (engine, loaded) = start();
    assert_eq!(loaded, 0);
    assert!(scan_it(&engine).verdict.is_clean());

    // Made by another version, which may have stuck where this one does not.
    let other_version = format!(
        r#"{{"maker":"scanserver 0.0.0-other","digests":["{}"]}}"#,
        digest.to_hex()
    );
    fs::write(&file, other_version).unwrap();
    let (engine, loaded) = start();
    assert_eq!(loaded, 0);
    assert!(!file.exists(), "set aside");
    assert!(scan_it(&engine).verdict.is_clean());
}
