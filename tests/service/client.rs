//! The `lightagent` client against a real server: hash-first, content at once, walks, files that change or fail, streams refused and opened again.

use super::*;

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

/// A server of its own rules, which agents must cope with: it welcomes
/// every session, and answers Scan streams as `rules` says. It counts the
/// content it receives, and the Scan streams opened.
struct FakeServer {
    rules: Fake,
    received: Arc<AtomicU64>,
    streams: Arc<AtomicU64>,
}

#[derive(Clone, Copy)]
enum Fake {
    /// Asks twice for the content of each file announced by its digest, and
    /// answers each with a reply of no kind the agent knows (as a newer
    /// server's might be).
    UnknownReplies,
    /// Answers each file announced with a clean verdict, and ends each
    /// stream without a status after its first message (as the server ends
    /// a stream idle for its idle timeout when it has no room left to say
    /// so).
    EndsEachStream,
}

impl FakeServer {
    /// Serves `rules` on a port of loopback; returns its URL, and its
    /// counts of content received and of streams opened.
    fn start(rules: Fake) -> (String, Arc<AtomicU64>, Arc<AtomicU64>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let server = FakeServer {
            rules,
            received: Arc::default(),
            streams: Arc::default(),
        };
        let counters = (Arc::clone(&server.received), Arc::clone(&server.streams));
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(proto::protection_server_server::ProtectionServerServer::new(server))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        (format!("http://{addr}"), counters.0, counters.1)
    }

    /// The replies of `rules` to the requests of one message.
    fn replies(
        rules: Fake,
        requests: Vec<proto::FileRequest>,
        received: &AtomicU64,
    ) -> Vec<proto::FileReply> {
        let reply = |file_id, kind| proto::FileReply {
            file_id,
            kind: Some(kind),
        };
        let mut replies = Vec::new();
        for kind in requests.into_iter().filter_map(|r| r.kind) {
            match (rules, kind) {
                (Fake::UnknownReplies, file_request::Kind::Begin(begin)) => {
                    let asked = reply(
                        begin.file_id,
                        file_reply::Kind::SendContent(proto::ContentRequest {}),
                    );
                    replies.extend([asked.clone(), asked]);
                }
                (Fake::EndsEachStream, file_request::Kind::Begin(begin)) => {
                    let clean = proto::Verdict {
                        kind: Some(proto::verdict::Kind::Clean(proto::Clean {})),
                    };
                    let verdict = proto::FileVerdict {
                        verdict: Some(clean),
                        ..Default::default()
                    };
                    replies.push(reply(begin.file_id, file_reply::Kind::Verdict(verdict)));
                }
                (_, file_request::Kind::Chunk(chunk)) => {
                    received.fetch_add(chunk.data.len() as u64, Ordering::Relaxed);
                }
                (_, file_request::Kind::End(end)) => replies.push(proto::FileReply {
                    file_id: end.file_id,
                    kind: None,
                }),
                (_, file_request::Kind::Cancel(_)) => {}
            }
        }
        replies
    }
}

type Answers<T> =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl proto::protection_server_server::ProtectionServer for FakeServer {
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
        self.streams.fetch_add(1, Ordering::Relaxed);
        let mut requests = request.into_inner();
        let (rules, received) = (self.rules, Arc::clone(&self.received));
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            while let Ok(Some(request)) = requests.message().await {
                let replies = Self::replies(rules, request.requests, &received);
                let reply = proto::ScanReply {
                    replies,
                    ..Default::default()
                };
                if tx.send(Ok(reply)).await.is_err() || matches!(rules, Fake::EndsEachStream) {
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
    let (url, received, _) = FakeServer::start(Fake::UnknownReplies);
    let dir = tempfile::tempdir().unwrap();
    let paths: Vec<_> = (0..3)
        .map(|n| {
            let path = dir.path().join(format!("file-{n}"));
            std::fs::write(&path, content(n, 1000)).unwrap();
            path
        })
        .collect();
    let agent = Agent::connect(&AgentOptions::for_host(url)).await.unwrap();
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

/// A stream the server ends without a status once it owes the agent no
/// file (an idle stream closed when the server had no room left to say so)
/// is no failure: the files still to come go on a new stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_that_come_after_a_stream_ended_without_a_status_are_scanned() {
    let (url, _, streams) = FakeServer::start(Fake::EndsEachStream);
    let dir = tempfile::tempdir().unwrap();
    let names = ["first", "second", "third"];
    for name in names {
        std::fs::write(dir.path().join(name), name).unwrap();
    }
    // Each file after the first comes once the one before was answered,
    // and its stream ended.
    let (answered, was_answered) = std::sync::mpsc::channel::<()>();
    let root = dir.path().to_owned();
    let walk = names.into_iter().enumerate().map(move |(i, name)| {
        if i > 0 {
            was_answered.recv_timeout(Duration::from_secs(10)).unwrap();
        }
        root.join(name)
    });
    let agent = Agent::connect(&AgentOptions::for_host(url)).await.unwrap();
    let results = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = Arc::clone(&results);
    let scan = agent.scan(
        Files::local(walk),
        HashFirst::Always,
        move |path, outcome| {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            sink.lock().unwrap().push((name, outcome.verdict.kind()));
            let _ = answered.send(());
        },
    );
    tokio::time::timeout(Duration::from_secs(30), scan)
        .await
        .expect("the scan ends")
        .expect("and succeeds");
    let results = std::mem::take(&mut *results.lock().unwrap());
    let expected: Vec<_> = names.iter().map(|n| (n.to_string(), "clean")).collect();
    assert_eq!(results, expected);
    assert!(streams.load(Ordering::Relaxed) >= 2, "on new streams");
}
