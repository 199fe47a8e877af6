//! The `scanserver` command line: `scan` output and exit status, `rules
//! check`, and `serve` with the operator commands and the receiver.

mod common;

use std::{fs, path::Path, process::Command};

use common::*;

/// `scanserver`, with none of the caller's `SCANSERVER_*` settings nor
/// systemd's (tests run under a service manager would otherwise have it
/// notified, and watchdogs fed), and `cache` as its rules cache.
fn scanserver(cache: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_scanserver"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("SCANSERVER_") {
            command.env_remove(name);
        }
    }
    for name in [
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "CACHE_DIRECTORY",
    ] {
        command.env_remove(name);
    }
    command
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("SCANSERVER_RULES_CACHE", cache);
    command
}

/// `scanserver scan --json PATH`, run to its end.
fn scan_json(cache: &Path, path: &Path) -> std::process::Output {
    scanserver(cache)
        .args(["scan", "--json"])
        .arg(path)
        .output()
        .unwrap()
}

fn json_lines(stdout: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("every stdout line is JSON"))
        .collect()
}

#[test]
fn scan_json_reports_eicar_infected_the_rest_clean_and_exits_1() {
    let cache = tempfile::tempdir().unwrap();
    let tree = tempfile::tempdir().unwrap();
    fs::create_dir(tree.path().join("sub")).unwrap();
    fs::write(tree.path().join("sub/eicar.com"), EICAR).unwrap();
    fs::write(tree.path().join("notes.txt"), "nothing to see").unwrap();
    fs::copy("/bin/sh", tree.path().join("sh")).unwrap();

    let output = scan_json(cache.path(), tree.path());
    assert_eq!(
        output.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines = json_lines(&output.stdout);
    assert_eq!(lines.len(), 3);
    for line in &lines {
        let path = line["path"].as_str().unwrap();
        let expected = if path.ends_with("eicar.com") {
            "infected"
        } else {
            "clean"
        };
        assert_eq!(line["verdict"], expected, "{line}");
        assert_eq!(line["blake3"].as_str().unwrap().len(), 64);
        assert!(line["size"].as_u64().is_some() && line["elapsed_us"].as_u64().is_some());
        let rules = line["rules"].as_array().unwrap();
        assert_eq!(rules.is_empty(), expected == "clean", "{line}");
    }
    let eicar = lines.iter().find(|l| l["verdict"] == "infected").unwrap();
    assert_eq!(eicar["rules"][0], "EICAR_Test_File");
    assert_eq!(eicar["blake3"], blake3::hash(EICAR).to_hex().as_str());
    assert!(String::from_utf8_lossy(&output.stderr).contains("1 infected"));
}

#[test]
fn scan_text_lists_findings_and_a_summary() {
    let cache = tempfile::tempdir().unwrap();
    let tree = tempfile::tempdir().unwrap();
    fs::write(tree.path().join("a.txt"), "hello").unwrap();
    let output = scanserver(cache.path())
        .arg("scan")
        .arg(tree.path())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.starts_with("scanned 1 files"), "{stdout}");
    assert!(
        stdout.contains("0 infected, 0 failed") && stdout.contains("MB/s"),
        "{stdout}"
    );

    fs::write(tree.path().join("eicar.com"), EICAR).unwrap();
    let output = scanserver(cache.path())
        .arg("scan")
        .arg(tree.path())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("eicar.com: EICAR_Test_File FOUND"),
        "{stdout}"
    );
}

#[test]
fn a_file_that_cannot_be_scanned_exits_2_with_its_reason() {
    let cache = tempfile::tempdir().unwrap();
    let tree = tempfile::tempdir().unwrap();
    fs::write(tree.path().join("big.bin"), vec![0u8; 200_000]).unwrap();
    let output = scanserver(cache.path())
        .args(["scan", "--json", "--max-size", "4096"])
        .arg(tree.path())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let line = &json_lines(&output.stdout)[0];
    assert_eq!(line["verdict"], "failed");
    assert_eq!(line["reason"], "too_large");

    // Something found outweighs a failure: exit status 1.
    fs::write(tree.path().join("eicar.com"), EICAR).unwrap();
    let output = scanserver(cache.path())
        .args(["scan", "--max-size", "4096"])
        .arg(tree.path())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("big.bin: FAILED too_large"), "{stdout}");
    // The file refused was not read: the summary leaves its 0.2 MB out.
    assert!(
        stdout.contains("scanned 2 files, 0.0 MB: 1 infected, 1 failed"),
        "{stdout}"
    );

    // A path named that is neither file nor folder fails; one below a
    // folder is passed over.
    let fifo = make_fifo(&tree.path().join("fifo"));
    let output = scan_json(cache.path(), &fifo);
    assert_eq!(output.status.code(), Some(2));
    let line = &json_lines(&output.stdout)[0];
    assert_eq!(
        (&line["verdict"], &line["reason"]),
        (&"failed".into(), &"io".into())
    );
    fs::remove_file(tree.path().join("big.bin")).unwrap();
    let output = scan_json(cache.path(), tree.path());
    assert_eq!(
        output.status.code(),
        Some(1),
        "EICAR, and the FIFO passed over"
    );
    assert_eq!(json_lines(&output.stdout).len(), 1);
}

/// Results that cannot all be written (a full disk, here `/dev/full`) may
/// have named an infected file: exit status 2, and why on stderr. A closed
/// stdout is what its reader asked for (`| head`): not an error.
#[test]
fn results_that_cannot_be_written_exit_2() {
    let cache = tempfile::tempdir().unwrap();
    let tree = tempfile::tempdir().unwrap();
    fs::write(tree.path().join("notes.txt"), "nothing to see").unwrap();
    for format in [&["scan", "--json"][..], &["scan"]] {
        let output = scanserver(cache.path())
            .args(format)
            .arg(tree.path())
            .stdout(fs::File::create("/dev/full").unwrap())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{format:?}: {stderr}");
        assert!(stderr.contains("cannot write the results"), "{stderr}");
    }
    let mut closed = scanserver(cache.path())
        .args(["scan", "--json"])
        .arg(tree.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(closed.stdout.take());
    assert_eq!(closed.wait().unwrap().code(), Some(0));
}

/// `--timeout` is checked as `engine.scan_timeout` is: below 1s, every
/// file would time out; over 1,000 years, it is no bound.
#[test]
fn a_scan_timeout_under_a_second_or_over_1000_years_is_refused() {
    let cache = tempfile::tempdir().unwrap();
    for (timeout, why) in [("0s", "must be at least 1s"), ("2000y", "must be at most")] {
        let output = scanserver(cache.path())
            .args(["scan", "--timeout", timeout, "Cargo.toml"])
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(why), "{stderr}");
    }
}

/// `lightagent` names the server it could not reach and what to set, and
/// tells an address without a scheme from a server that is not there.
/// Asked for an encrypted channel (or given a name to verify the server's
/// certificate against), it refuses a plain address before connecting:
/// the server's refusal is not what guards an agent from an impostor.
#[test]
fn lightagent_says_which_server_it_could_not_reach() {
    // A port bound and not listening: it refuses connections, and no other
    // test's server can take it meanwhile.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(([127, 0, 0, 1], 0).into()).unwrap();
    let port = socket.local_addr().unwrap().port();
    let run = |server: &str, args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_lightagent"))
            .args(["scan", "--server", server])
            .args(args)
            .arg("Cargo.toml")
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2));
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let bare = format!("127.0.0.1:{port}");
    let stderr = run(&bare, &[]);
    assert!(stderr.contains(&format!("write http://{bare}")), "{stderr}");
    let url = format!("http://{bare}");
    let stderr = run(&url, &[]);
    assert!(stderr.contains(&format!("at {url}")), "{stderr}");
    assert!(stderr.contains("--server"), "{stderr}");
    let stderr = run(&url, &["--require-encryption"]);
    assert!(stderr.contains("--require-encryption"), "{stderr}");
    assert!(
        !stderr.contains(&format!("at {url}")),
        "not connected: {stderr}"
    );
    let stderr = run(&url, &["--tls-domain", "svm.example"]);
    assert!(stderr.contains("which is not encrypted"), "{stderr}");
}

/// A FIFO or a device named as a file the server reads (its
/// configuration, a TLS certificate) stops the start with an error naming
/// it, rather than hang it or read it for ever.
#[test]
fn serve_refuses_settings_files_that_are_not_regular_files() {
    use std::time::{Duration, Instant};
    let cache = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let fifo = state.path().join("scanserver.toml");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a C string naming a path in a folder of our own.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let named = [
        vec!["--config".to_owned(), fifo.display().to_string()],
        ["--tls-cert", "/dev/zero", "--tls-key", "/dev/zero"]
            .map(String::from)
            .to_vec(),
    ];
    for args in named {
        let mut serving = scanserver(cache.path())
            .arg("serve")
            .args(&args)
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .arg("--state-dir")
            .arg(state.path())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let started = Instant::now();
        let status = loop {
            if let Some(status) = serving.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > Duration::from_secs(30) {
                let _ = serving.kill();
                panic!("serve {args:?} did not stop");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut serving.stderr.take().unwrap(), &mut stderr).unwrap();
        assert_eq!(status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(&args[1]), "{stderr}");
        assert!(stderr.contains("not a regular file"), "{stderr}");
    }
}

#[test]
fn scan_with_unloadable_rules_exits_2() {
    let cache = tempfile::tempdir().unwrap();
    let rules = tempfile::tempdir().unwrap();
    fs::write(rules.path().join("bad.yar"), "rule bad { condition: nope }").unwrap();
    let output = scanserver(cache.path())
        .args(["scan", "--rules"])
        .arg(rules.path())
        .arg("Cargo.toml")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("bad.yar:1:"));
}

#[test]
fn rules_check_prints_version_and_count_or_errors() {
    let cache = tempfile::tempdir().unwrap();
    let output = scanserver(cache.path())
        .args(["rules", "check"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let expected = shipped_ruleset();
    assert!(
        stdout.contains(&format!("{} rules", expected.rule_count())),
        "{stdout}"
    );
    assert!(stdout.contains(expected.version()), "{stdout}");

    let rules = tempfile::tempdir().unwrap();
    fs::write(
        rules.path().join("bad.yar"),
        "rule bad {\n  condition:\n    nope\n}\n",
    )
    .unwrap();
    let output = scanserver(cache.path())
        .args(["rules", "check"])
        .arg(rules.path())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("bad.yar:3:5"), "{stderr}");
}

/// A single source file named without a folder is read from the working
/// folder (its parent is the empty path, which cannot be read).
#[test]
fn a_rules_file_named_without_its_folder_is_read_from_the_working_folder() {
    let cache = tempfile::tempdir().unwrap();
    let rules = tempfile::tempdir().unwrap();
    fs::write(
        rules.path().join("one.yar"),
        "rule one { strings: $a = \"one\" condition: $a }",
    )
    .unwrap();
    let output = scanserver(cache.path())
        .current_dir(rules.path())
        .args(["rules", "check", "one.yar"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(String::from_utf8_lossy(&output.stdout).contains("1 rules"));
}

/// A free loopback port, below the kernel's range of ports for `bind(0)`
/// and outgoing connections: free when asked, it stays so until the
/// server started with it binds it (no other test's socket is given it
/// meanwhile). Taken in turn from a start of this process's own, so that
/// two runs of the tests at once seldom try the same ports.
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let range = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let ephemeral: u16 = range
        .split_whitespace()
        .next()
        .and_then(|start| start.parse().ok())
        .unwrap_or(32768);
    // The ports below the range, from 10,000 on (or what the range leaves
    // above the privileged ones).
    let low = 10_000.min(ephemeral / 2).max(1024);
    assert!(ephemeral > low, "no ports below the ephemeral range");
    let span = u32::from(ephemeral - low);
    let start = std::process::id() % span;
    for _ in 0..span {
        let next = u32::from(NEXT.fetch_add(1, Ordering::Relaxed));
        let port = low + ((start + next) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port below {ephemeral}");
}

/// A child process killed when dropped (with the service manager it
/// tells, if it has one).
struct Running(std::process::Child, Option<ServiceManager>);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `scanserver serve` on loopback `port`, its admin listener on `admin`,
/// `state` as its state and spool folders, its log dropped, with the
/// options `configure` adds (or changes); returned once it is ready,
/// unless `configure` gives it a service manager of the test's.
fn serve(
    cache: &Path,
    state: &Path,
    port: u16,
    admin: &str,
    configure: impl FnOnce(&mut Command),
) -> Running {
    let mut command = scanserver(cache);
    command
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--admin-listen", admin])
        .stderr(std::process::Stdio::null());
    configure(&mut command);
    command
        .arg("--state-dir")
        .arg(state)
        .arg("--spool-dir")
        .arg(state.join("spool"));
    // Told by the server when it is ready (listening, its TLS files read,
    // its signals handled), unless the test listens itself.
    if command
        .get_envs()
        .any(|(name, value)| name == "NOTIFY_SOCKET" && value.is_some())
    {
        return Running(command.spawn().unwrap(), None);
    }
    let manager = ServiceManager::new();
    manager.manage(&mut command);
    let mut server = Running(command.spawn().unwrap(), None);
    while !manager.message(&mut server).starts_with("READY=1") {}
    server.1 = Some(manager);
    server
}

/// Sends `signal` to `server`.
fn signal(server: &Running, signal: libc::c_int) {
    // SAFETY: kill has no memory preconditions; the child is ours.
    assert_eq!(
        unsafe { libc::kill(server.0.id() as libc::pid_t, signal) },
        0
    );
}

/// A service manager's notification socket (`NOTIFY_SOCKET`), as
/// systemd's for a `Type=notify` service.
struct ServiceManager {
    socket: std::os::unix::net::UnixDatagram,
    dir: tempfile::TempDir,
}

impl ServiceManager {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = std::os::unix::net::UnixDatagram::bind(dir.path().join("notify")).unwrap();
        socket
            .set_read_timeout(Some(std::time::Duration::from_secs(1)))
            .unwrap();
        ServiceManager { socket, dir }
    }

    /// Has `serve` tell this manager (and no watchdog: `WATCHDOG_USEC`
    /// inherited from a service manager running the tests would add its
    /// messages).
    fn manage(&self, serve: &mut Command) {
        serve
            .env("NOTIFY_SOCKET", self.dir.path().join("notify"))
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID");
    }

    /// The next message `server` sends, within 2 minutes. One that exits
    /// first fails the test, with its log if its stderr is piped.
    fn message(&self, server: &mut Running) -> String {
        let mut buf = [0; 512];
        for _ in 0..120 {
            if let Ok(len) = self.socket.recv(&mut buf) {
                return String::from_utf8_lossy(&buf[..len]).into_owned();
            }
            if let Some(status) = server.0.try_wait().unwrap() {
                let mut log = String::new();
                if let Some(stderr) = server.0.stderr.as_mut() {
                    std::io::Read::read_to_string(stderr, &mut log).unwrap();
                }
                panic!("serve exited ({status}) without a word to its manager:\n{log}");
            }
        }
        panic!("no message from serve within 2 minutes");
    }

    /// Sends `server` a SIGHUP, and returns once it said it reloaded
    /// (`RELOADING=1`, then `READY=1`).
    fn reload(&self, server: &mut Running) {
        signal(server, libc::SIGHUP);
        let reloading = self.message(server);
        assert!(reloading.starts_with("RELOADING=1\n"), "{reloading}");
        let reloaded = self.message(server);
        assert!(reloaded.starts_with("READY=1\n"), "{reloaded}");
    }
}

/// `scanserver receiver` on `port`, its JSON lines sent to `lines`.
fn receiver(cache: &Path, port: u16, lines: std::sync::mpsc::Sender<String>) -> Running {
    let mut child = scanserver(cache)
        .args(["receiver", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    send_lines(child.stdout.take().unwrap(), lines);
    Running(child, None)
}

/// Sends each line `from` gives to `to`, from a thread of its own.
fn send_lines(from: impl std::io::Read + Send + 'static, to: std::sync::mpsc::Sender<String>) {
    use std::io::BufRead;
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(from).lines().map_while(Result::ok) {
            let _ = to.send(line);
        }
    });
}

/// A folder holding `eicar.com` and a clean `notes.txt`, and their paths.
fn eicar_and_clean() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let tree = tempfile::tempdir().unwrap();
    let (eicar, clean) = (tree.path().join("eicar.com"), tree.path().join("notes.txt"));
    fs::write(&eicar, EICAR).unwrap();
    fs::write(&clean, "nothing to see here").unwrap();
    (tree, eicar, clean)
}

/// Compiles the shipped signatures into `cache` (a scan of an empty
/// folder), so that a server started on it starts from the cache.
fn compile_signatures(cache: &Path) {
    let empty = tempfile::tempdir().unwrap();
    scanserver(cache)
        .arg("scan")
        .arg(empty.path())
        .output()
        .unwrap();
}

/// Waits until something listens on loopback `port`.
fn wait_for_listener(port: u16) {
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("nothing listens on port {port}");
}

/// Runs `scanserver status` until its output contains `expected`; returns
/// the output and exit status.
fn status_until(cache: &Path, admin: &str, expected: &str) -> (String, Option<i32>) {
    status_when(cache, admin, |text| text.contains(expected))
}

/// Runs `scanserver status` until its output is `wanted`; returns the
/// output and exit status.
fn status_when(cache: &Path, admin: &str, wanted: impl Fn(&str) -> bool) -> (String, Option<i32>) {
    let mut last = String::new();
    for _ in 0..100 {
        let output = scanserver(cache)
            .args(["status", "--admin", admin])
            .output()
            .unwrap();
        last = String::from_utf8_lossy(&output.stdout).into_owned();
        if wanted(&last) {
            return (last, output.status.code());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("`scanserver status` never said what was expected; last:\n{last}");
}

#[test]
fn serve_reports_to_an_integration_server_and_status_follows_it() {
    use std::time::Duration;
    let cache = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    compile_signatures(cache.path());

    // The shipped signatures are as old as the checkout.
    let config = state.path().join("scanserver.toml");
    fs::write(&config, "[rules]\nmax_age = \"100years\"\n").unwrap();
    let (listen, admin, integration) = (free_port(), free_port(), free_port());
    let admin = format!("127.0.0.1:{admin}");
    let (lines_tx, lines) = std::sync::mpsc::channel();
    let mut receiving = Some(receiver(cache.path(), integration, lines_tx.clone()));
    wait_for_listener(integration);
    let _server = serve(cache.path(), state.path(), listen, &admin, |serve| {
        serve
            .arg("--config")
            .arg(&config)
            .args([
                "--integration-server",
                &format!("http://127.0.0.1:{integration}"),
            ])
            .args(["--report-interval", "2s"]);
    });
    let first = lines
        .recv_timeout(Duration::from_secs(10))
        .expect("a first report");
    let first: serde_json::Value = serde_json::from_str(&first).unwrap();
    assert_eq!(first["trigger"], "REPORT_TRIGGER_START");
    assert_eq!(first["status"], "HEALTH_OK");
    let second = lines
        .recv_timeout(Duration::from_secs(5))
        .expect("a second report");
    let second: serde_json::Value = serde_json::from_str(&second).unwrap();
    assert_eq!(second["trigger"], "REPORT_TRIGGER_SCHEDULED");

    let (text, code) = status_until(cache.path(), &admin, "status OK");
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("integration server reporter"), "{text}");

    receiving.take();
    let (text, code) = status_until(cache.path(), &admin, "status WARNING");
    assert!(
        text.contains("reason: no connection to the Integration Server"),
        "{text}"
    );
    assert_eq!(code, Some(1));

    let _receiving = receiver(cache.path(), integration, lines_tx);
    let (text, code) = status_until(cache.path(), &admin, "status OK");
    assert!(!text.contains("reason:"), "{text}");
    assert_eq!(code, Some(0));
}

/// An agent listener that cannot accept connections (the server is out of
/// file descriptors) makes the SVM CRITICAL, with the agent listener saying
/// why: agents connecting are turned away unseen, and the Integration
/// Server must send them elsewhere. It stays so for a while once
/// connections get in again (see `connections::ACCEPT_FAILURE_SHOWN`).
#[test]
fn a_listener_out_of_descriptors_is_critical() {
    use std::{os::unix::process::CommandExt, time::Duration};

    use scanserver::{
        admin,
        proto::{StatusRequest, SvmReason},
    };
    let cache = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    compile_signatures(cache.path());
    let (listen, admin_addr) = (free_port(), format!("127.0.0.1:{}", free_port()));
    let _server = serve(cache.path(), state.path(), listen, &admin_addr, |serve| {
        let limit = libc::rlimit {
            rlim_cur: 48,
            rlim_max: 48,
        };
        // SAFETY: between fork and exec the closure only calls setrlimit,
        // which is async-signal-safe, on a struct it owns.
        unsafe {
            serve.pre_exec(move || match libc::setrlimit(libc::RLIMIT_NOFILE, &limit) {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            });
        }
    });
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        // Connected before the descriptors run out: its calls need none.
        let mut admin = admin::connect(&admin_addr, None, admin::REQUEST_TIMEOUT)
            .await
            .unwrap();
        let mut reason_until = async |wanted: bool| {
            for _ in 0..100 {
                let reply = admin.status(StatusRequest {}).await.unwrap().into_inner();
                let reasons = &reply.report.as_ref().unwrap().reasons;
                if reasons.contains(&(SvmReason::ConnectionsNotAccepted as i32)) == wanted {
                    return admin::render_status(&reply);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("CONNECTIONS_NOT_ACCEPTED never became {wanted}");
        };
        let text = reason_until(false).await;
        assert!(!text.contains("cannot accept"), "{text}");

        // More connections than the server has descriptors left.
        let flood: Vec<_> = (0..64)
            .map(|_| std::net::TcpStream::connect(("127.0.0.1", listen)).unwrap())
            .collect();
        let text = reason_until(true).await;
        assert!(text.contains("status CRITICAL"), "{text}");
        assert!(
            text.contains("reason: agent connections not accepted"),
            "{text}"
        );
        assert!(
            text.contains("cannot accept connections: Too many open files"),
            "{text}"
        );

        // Their connections closed, the server accepts again (a new
        // admin connection), and still says it failed to, for a while.
        drop(flood);
        let (cache, admin_addr) = (cache.path().to_owned(), admin_addr.clone());
        tokio::task::spawn_blocking(move || {
            status_until(
                &cache,
                &admin_addr,
                "reason: agent connections not accepted",
            )
        })
        .await
        .unwrap();
    });
}

/// `--admin-token-file`: the operator commands send the token the server
/// asks for, and are refused without it; a SIGHUP has the server read the
/// file again.
#[test]
fn the_operator_commands_send_the_admin_token_the_server_asks_for() {
    let cache = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let token = state.path().join("admin.token");
    fs::write(&token, "s3cret-admin-token\n").unwrap();
    let wrong = state.path().join("wrong.token");
    fs::write(&wrong, "another-token").unwrap();
    let (listen, admin) = (free_port(), free_port());
    let admin_addr = format!("127.0.0.1:{admin}");
    let manager = ServiceManager::new();
    let mut server = serve(cache.path(), state.path(), listen, &admin_addr, |serve| {
        serve.arg("--admin-token-file").arg(&token);
        manager.manage(serve);
    });
    let ready = manager.message(&mut server);
    assert!(ready.starts_with("READY=1\n"), "{ready}");
    let status = |token: Option<&Path>| {
        let mut command = scanserver(cache.path());
        command.args(["status", "--admin", &admin_addr]);
        if let Some(token) = token {
            command.arg("--admin-token-file").arg(token);
        }
        command.output().unwrap()
    };
    // Refused for the token (exit status 2 is also a server not reached).
    let refused = |output: std::process::Output| {
        assert_eq!(output.status.code(), Some(2));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("--admin-token-file FILE"), "{stderr}");
    };
    refused(status(None));
    refused(status(Some(&wrong)));
    let answered = status(Some(&token));
    let stdout = String::from_utf8_lossy(&answered.stdout);
    assert!(stdout.contains("agent listener"), "{stdout}");
    assert_ne!(answered.status.code(), Some(2), "{stdout}");

    // A token rotated is asked for once a SIGHUP has the server read it
    // again; the one before is refused. A token file that cannot be used
    // (emptied, say) leaves the token asked for as it was.
    let before = state.path().join("before.token");
    fs::copy(&token, &before).unwrap();
    fs::write(&token, "rotated-admin-token\n").unwrap();
    manager.reload(&mut server);
    assert_ne!(
        status(Some(&token)).status.code(),
        Some(2),
        "the new token refused"
    );
    refused(status(Some(&before)));
    let rotated = state.path().join("rotated.token");
    fs::copy(&token, &rotated).unwrap();
    fs::write(&token, "\n").unwrap();
    manager.reload(&mut server);
    assert_ne!(status(Some(&rotated)).status.code(), Some(2));
    refused(status(None));
    refused(status(Some(&before)));
}

/// The admin service on a Unix-domain socket: the commands reach it with
/// `--admin unix:PATH`, and only the server's user and group may (0660).
/// A server killed leaves its socket behind, which the next one replaces;
/// one stopped removes it.
#[test]
fn the_operator_commands_reach_the_admin_socket() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let cache = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let socket = state.path().join("run").join("admin.sock");
    let admin = format!("unix:{}", socket.display());
    let mut servers = Vec::new();
    for _ in 0..2 {
        // The previous server is killed first: its socket stays behind.
        servers.clear();
        servers.push(serve(
            cache.path(),
            state.path(),
            free_port(),
            &admin,
            |_| {},
        ));
        let (text, code) = status_until(cache.path(), &admin, "agent listener");
        assert_ne!(code, Some(2), "{text}");
        let metadata = fs::symlink_metadata(&socket).unwrap();
        assert!(metadata.file_type().is_socket());
        assert_eq!(metadata.permissions().mode() & 0o777, 0o660);
    }
    signal(&servers[0], libc::SIGTERM);
    let Running(server, _) = &mut servers[0];
    assert!(server.wait().unwrap().success());
    assert!(!socket.exists(), "a server that stops removes its socket");
}

/// `lightagent scan --task full` against `serve`: malware found tags the
/// VM; a clean full scan then untags it (so the task's end reached the
/// server before the agent's session closed), and one that failed a file
/// does not; a tag assigned by hand stays; and an agent that exits after
/// its scan leaves its VM closed, not "no connection to the SVM".
#[test]
fn lightagent_full_scans_tag_and_untag_their_vm() {
    let cache = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let (tree, eicar, clean) = eicar_and_clean();
    let (listen, admin) = (free_port(), format!("127.0.0.1:{}", free_port()));
    let _server = serve(cache.path(), state.path(), listen, &admin, |_| {});
    // Runs a full scan of `files`, which must exit with `code`.
    let full_scan = |files: &[&Path], code: i32| {
        let output = Command::new(env!("CARGO_BIN_EXE_lightagent"))
            .args(["scan", "--server", &format!("http://127.0.0.1:{listen}")])
            .args(["--vm-id", "vm-x", "--agent-id", "agent-x", "--task", "full"])
            .args(files)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(code), "{files:?}: {said}");
    };
    let operator = |args: &[&str]| {
        let output = scanserver(cache.path())
            .args(args)
            .args(["--admin", &admin])
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(0), "{args:?}: {said}");
        output.stdout
    };
    // vm-x's tags and reasons once the server has seen its agent's
    // session end (the agent may exit first).
    let vm_x = || {
        let listed = || {
            let reply: serde_json::Value =
                serde_json::from_slice(&operator(&["agents", "--json"])).unwrap();
            let vms = reply["vms"].as_array().unwrap();
            let vm = vms.iter().find(|vm| vm["vm_id"] == "vm-x").cloned();
            vm.expect("vm-x is listed")
        };
        let mut vm = listed();
        for _ in 0..200 {
            if vm["connected"] != true {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
            vm = listed();
        }
        assert_ne!(vm["connected"], true, "the session never ended: {vm}");
        // The strings of a list, each picked out of its item by `pick`.
        let strings = |list: &serde_json::Value,
                       pick: fn(&serde_json::Value) -> &serde_json::Value| {
            let items = list.as_array().into_iter().flatten();
            items
                .map(|item| pick(item).as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        };
        (
            strings(&vm["tags"], |tag| &tag["name"]),
            strings(&vm["reasons"], |reason| reason),
        )
    };

    full_scan(&[&eicar], 1);
    let (tags, reasons) = vm_x();
    assert_eq!(tags, ["ANTI_VIRUS.VirusFound.threat=high"]);
    assert!(
        !reasons.contains(&"VM_REASON_NO_CONNECTION_TO_SVM".to_owned()),
        "{reasons:?}"
    );

    operator(&["tags", "assign", "vm-x", "IDS_IPS.threat=high"]);
    full_scan(&[&clean], 0);
    let (tags, reasons) = vm_x();
    assert_eq!(tags, ["IDS_IPS.threat=high"]);
    assert_eq!(reasons, ["VM_REASON_NETWORK_ATTACK"]);

    // A full scan that could not read a file proves nothing clean, though
    // the server never heard of that file.
    full_scan(&[&eicar], 1);
    let missing = tree.path().join("gone.txt");
    full_scan(&[&clean, &missing], 2);
    let (tags, _) = vm_x();
    assert_eq!(
        tags,
        ["ANTI_VIRUS.VirusFound.threat=high", "IDS_IPS.threat=high"]
    );
}

/// Output left unread (a pager left paused) holds up `lightagent scan`,
/// not its session: its heartbeats go on, and once the output is read
/// every file has its verdict; so it does when the server gave up on the
/// Scan stream meanwhile (its idle timeout passed with no reply taken):
/// the files left go on a new one, those the server failed for want of
/// their content (asked for, the request left unread) among them.
#[test]
fn lightagent_output_left_unread_holds_up_the_scan_not_its_session() {
    let quick = "[server]\nheartbeat_interval = \"1s\"\nidle_timeout = \"2s\"\n[engine]\nscan_timeout = \"1s\"\n";
    // Settings, how files are announced, and how long output goes unread:
    // three missed heartbeats end a session, and five go by; files asked
    // for stop holding the stream open after `UPLOAD_WAIT` (10 s).
    let runs = [
        ("[server]\nheartbeat_interval = \"1s\"\n", "auto", 5),
        (quick, "auto", 5),
        (quick, "always", 14),
    ];
    // Lines enough (of 400 bytes and more: long names) to fill the pipe,
    // and far more than the agent lets wait to be written (64 KiB) before
    // it stops taking replies.
    let tree = tempfile::tempdir().unwrap();
    let files = 5000;
    for n in 0..files {
        let name = format!("{n:0>200}.txt");
        fs::write(tree.path().join(name), format!("file {n}")).unwrap();
    }
    for (settings, hash_first, unread) in runs {
        let cache = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let config = state.path().join("scanserver.toml");
        fs::write(&config, settings).unwrap();
        let (listen, admin) = (free_port(), format!("127.0.0.1:{}", free_port()));
        let _server = serve(cache.path(), state.path(), listen, &admin, |serve| {
            serve.arg("--config").arg(&config);
        });
        let agent = Command::new(env!("CARGO_BIN_EXE_lightagent"))
            .args([
                "scan",
                "--json",
                "--hash-first",
                hash_first,
                "--server",
                &format!("http://127.0.0.1:{listen}"),
            ])
            .arg(tree.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_secs(unread));
        let output = agent.wait_with_output().unwrap();
        let said = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(0), "{settings}: {said}");
        assert!(output.stdout.len() > 3 << 19, "{}", output.stdout.len());
        let lines = json_lines(&output.stdout);
        assert_eq!(lines.len(), files, "{settings}");
        let failed = lines.iter().find(|line| line["verdict"] != "clean");
        assert!(
            failed.is_none(),
            "{settings} {hash_first}: {failed:?} {said}"
        );
    }
}

/// `serve` loads new signatures on SIGHUP and on `rules reload`; new ones
/// that do not load make `rules reload` exit 1 with their errors, turn
/// the SVM Warning, and the server goes on.
#[test]
fn sighup_and_rules_reload_load_new_signatures() {
    let cache = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let rules = tempfile::tempdir().unwrap();
    let rule = |name: &str| format!("rule {name} {{ strings: $m = \"{name}\" condition: $m }}\n");
    fs::write(rules.path().join("a.yar"), rule("marker_a")).unwrap();
    let (listen, admin) = (free_port(), free_port());
    let admin_addr = format!("127.0.0.1:{admin}");
    let server = serve(cache.path(), state.path(), listen, &admin_addr, |serve| {
        serve.arg("--rules").arg(rules.path());
    });
    let reload = || {
        scanserver(cache.path())
            .args(["rules", "reload", "--admin", &admin_addr])
            .output()
            .unwrap()
    };
    let unchanged = reload();
    let stdout = String::from_utf8_lossy(&unchanged.stdout);
    assert_eq!(unchanged.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.starts_with("signatures unchanged: version "),
        "{stdout}"
    );

    fs::write(rules.path().join("b.yar"), rule("marker_b")).unwrap();
    let check = scanserver(cache.path())
        .args(["rules", "check"])
        .arg(rules.path())
        .output()
        .unwrap();
    let checked = String::from_utf8_lossy(&check.stdout);
    let version = checked
        .split("version ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .unwrap_or_else(|| panic!("no version in {checked}"));
    signal(&server, libc::SIGHUP);
    let (text, _) = status_until(cache.path(), &admin_addr, &format!("version {version}"));
    assert!(text.contains("rules 2"), "{text}");

    fs::write(
        rules.path().join("c.yar"),
        "rule broken { condition: no_such_thing }\n",
    )
    .unwrap();
    let failed = reload();
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert_eq!(failed.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("c.yar:1:") && stderr.contains(&format!("signatures version {version}")),
        "{stderr}"
    );
    let (text, code) = status_until(cache.path(), &admin_addr, "signatures update failed");
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains(&format!("version {version}")), "{text}");
}

/// `serve` reads its TLS files again on SIGHUP: files that cannot be used
/// turn the SVM Warning (and replace nothing) until usable ones are read.
#[test]
fn sighup_reads_the_tls_files_again() {
    let cache = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let (cert, key) = (
        state.path().join("server.pem"),
        state.path().join("server.key"),
    );
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    fs::write(&cert, certified.cert.pem()).unwrap();
    fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let (listen, admin) = (free_port(), free_port());
    let admin_addr = format!("127.0.0.1:{admin}");
    let server = serve(cache.path(), state.path(), listen, &admin_addr, |serve| {
        serve
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key);
    });
    let hangup = || signal(&server, libc::SIGHUP);
    fs::write(&key, "not a key").unwrap();
    hangup();
    let (text, _) = status_until(cache.path(), &admin_addr, "reason: TLS update failed");
    assert!(text.contains("server.key is not PEM"), "{text}");
    fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    hangup();
    let (text, _) = status_when(cache.path(), &admin_addr, |text| {
        !text.contains("TLS update failed")
    });
    assert!(text.contains("(TLS, certificate valid until "), "{text}");
}

/// Under systemd (`Type=notify` or `notify-reload`), `serve` says
/// `READY=1` once it answers agents, `RELOADING=1` then `READY=1` around
/// the reload a SIGHUP makes, and `STOPPING=1` when SIGTERM makes it shut
/// down.
#[test]
fn serve_tells_the_service_manager_it_is_ready_reloading_and_stopping() {
    let cache = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let manager = ServiceManager::new();
    let (port, admin) = (free_port(), format!("127.0.0.1:{}", free_port()));
    let mut server = serve(cache.path(), state.path(), port, &admin, |serve| {
        manager.manage(serve);
        serve.stderr(std::process::Stdio::piped());
    });
    let ready = manager.message(&mut server);
    let serving = format!("READY=1\nSTATUS=serving agents on 127.0.0.1:{port} with ");
    assert!(ready.starts_with(&serving), "{ready}");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        "ready means listening"
    );
    // A SIGHUP at once after READY=1 reloads (it is neither lost nor
    // fatal), and the manager hears when that is over.
    let monotonic_usec = || {
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `now` is a valid timespec for the call to fill.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
        now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1_000
    };
    let before = monotonic_usec();
    signal(&server, libc::SIGHUP);
    let reloading = manager.message(&mut server);
    let after = monotonic_usec();
    let began: u64 = reloading
        .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
        .and_then(|rest| rest.split('\n').next())
        .and_then(|usec| usec.parse().ok())
        .unwrap_or_else(|| panic!("{reloading}"));
    assert!((before..=after).contains(&began), "{reloading}");
    let reloaded = manager.message(&mut server);
    assert!(
        reloaded.starts_with("READY=1\nSTATUS=serving agents"),
        "{reloaded}"
    );
    signal(&server, libc::SIGTERM);
    let stopping = manager.message(&mut server);
    assert!(stopping.starts_with("STOPPING=1\n"), "{stopping}");
    assert!(server.0.wait().unwrap().success());
}

/// Under `WatchdogSec=` (`WATCHDOG_USEC`), `serve` feeds systemd's
/// watchdog at half its interval; not one meant for another process
/// (`WATCHDOG_PID`).
#[test]
fn serve_feeds_the_watchdog_meant_for_it() {
    use std::{
        os::unix::net::UnixDatagram,
        time::{Duration, Instant},
    };
    let cache = tempfile::tempdir().unwrap();
    for (watchdog_pid, fed) in [(None, true), (Some("1"), false)] {
        let state = tempfile::tempdir().unwrap();
        let socket = state.path().join("notify");
        let manager = UnixDatagram::bind(&socket).unwrap();
        manager
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let (port, admin) = (free_port(), format!("127.0.0.1:{}", free_port()));
        let _server = serve(cache.path(), state.path(), port, &admin, |serve| {
            serve
                .env("NOTIFY_SOCKET", &socket)
                .env("WATCHDOG_USEC", "400000");
            if let Some(pid) = watchdog_pid {
                serve.env("WATCHDOG_PID", pid);
            }
        });
        let mut buf = [0; 512];
        let mut messages = Vec::new();
        let mut pings = Vec::new();
        let mut ready_at = None;
        let deadline = Instant::now() + Duration::from_secs(120);
        while ready_at.is_none_or(|at: Instant| at.elapsed() < Duration::from_secs(2)) {
            assert!(Instant::now() < deadline, "no READY=1: {messages:?}");
            if let Ok(len) = manager.recv(&mut buf) {
                let message = String::from_utf8_lossy(&buf[..len]).into_owned();
                if message.starts_with("READY=1") {
                    ready_at = Some(Instant::now());
                }
                if message == "WATCHDOG=1" {
                    pings.push(Instant::now());
                }
                messages.push(message);
            }
        }
        if !fed {
            assert!(pings.is_empty(), "{messages:?}");
            continue;
        }
        // One every 200 ms (half the interval), where one every interval
        // would be 400 ms apart: the median gap tells them apart however
        // long the machine held the server up once or twice.
        assert!(pings.len() >= 3, "{messages:?}");
        let mut gaps: Vec<_> = pings.windows(2).map(|w| w[1] - w[0]).collect();
        gaps.sort();
        let median = gaps[gaps.len() / 2];
        assert!(median < Duration::from_millis(300), "{gaps:?}");
    }
}

/// `lightagent bench`: its agents' storm makes one scan per distinct
/// content, the next round is answered from the cache, and a storm in
/// which files failed exits 2, its figures printed all the same.
#[test]
fn lightagent_bench_counts_scans_hits_and_failures() {
    let cache = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let config = state.path().join("scanserver.toml");
    fs::write(&config, "[uploads]\nmax_file_size = 1024\n").unwrap();
    let (tree, _, _) = eicar_and_clean();
    fs::write(
        tree.path().join("copy.txt"),
        fs::read(tree.path().join("notes.txt")).unwrap(),
    )
    .unwrap();
    let (listen, admin) = (free_port(), format!("127.0.0.1:{}", free_port()));
    let _server = serve(cache.path(), state.path(), listen, &admin, |serve| {
        serve.arg("--config").arg(&config);
    });
    let bench = |files: &Path, rounds: &str| {
        let output = Command::new(env!("CARGO_BIN_EXE_lightagent"))
            .args(["bench", "--json", "--agents", "5", "--rounds", rounds])
            .args(["--server", &format!("http://127.0.0.1:{listen}")])
            .arg("--files")
            .arg(files)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&output.stderr).into_owned();
        (output.status.code(), json_lines(&output.stdout), said)
    };

    let (code, rounds, said) = bench(tree.path(), "2");
    assert_eq!(code, Some(0), "{said}");
    let (cold, warm) = (&rounds[0], &rounds[1]);
    assert_eq!(cold["files"], 15, "{cold}");
    assert_eq!(cold["unique_contents"], 2, "{cold}");
    assert_eq!(cold["scans"], 2, "one scan per distinct content: {cold}");
    assert_eq!(cold["errors"], 0, "{cold}");
    assert_eq!(
        cold["cache_hits"].as_u64().unwrap() + cold["coalesced_waits"].as_u64().unwrap(),
        13,
        "{cold}"
    );
    assert_eq!(
        (&warm["scans"], &warm["cache_hits"]),
        (&0.into(), &15.into()),
        "{warm}"
    );

    fs::write(tree.path().join("large.bin"), vec![7; 2048]).unwrap();
    let (code, rounds, said) = bench(tree.path(), "1");
    assert_eq!(code, Some(2), "{said}");
    assert_eq!(rounds[0]["errors"], 5, "{}", rounds[0]);
    assert!(said.contains("5 verdicts failed"), "{said}");
}

/// Malware found is logged, a warning per verdict, with the VM and the
/// file it was found in, the threats and rules, and where the verdict came
/// from; clean verdicts are not.
#[test]
fn malware_found_is_logged_with_its_vm_and_file() {
    let cache = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let (_tree, eicar, clean) = eicar_and_clean();
    let (listen, admin) = (free_port(), format!("127.0.0.1:{}", free_port()));
    let mut server = serve(cache.path(), state.path(), listen, &admin, |serve| {
        serve
            .args(["--log-format", "json"])
            .stderr(std::process::Stdio::piped());
    });
    let (lines_tx, lines) = std::sync::mpsc::channel();
    send_lines(server.0.stderr.take().unwrap(), lines_tx);
    for vm in ["vm-a", "vm-b"] {
        let output = Command::new(env!("CARGO_BIN_EXE_lightagent"))
            .args(["scan", "--server", &format!("http://127.0.0.1:{listen}")])
            .args(["--vm-id", vm, "--vm-name", &format!("{vm} desktop")])
            .args([&eicar, &clean])
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(1), "{output:?}");
    }
    let mut found = Vec::new();
    while found.len() < 2 {
        let line = lines
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("two lines of malware found");
        let entry: serde_json::Value = serde_json::from_str(&line).unwrap();
        if entry["fields"]["message"] == "malware found" {
            found.push(entry);
        }
    }
    for (entry, (vm, source)) in found.iter().zip([("vm-a", "scan"), ("vm-b", "cache")]) {
        let fields = &entry["fields"];
        assert_eq!(entry["level"], "WARN", "{entry}");
        assert_eq!(fields["vm"], vm, "{entry}");
        assert_eq!(fields["vm_name"], format!("{vm} desktop"), "{entry}");
        assert_eq!(fields["path"], eicar.to_str().unwrap(), "{entry}");
        assert_eq!(fields["rules"], "EICAR_Test_File", "{entry}");
        assert!(!fields["threats"].as_str().unwrap().is_empty(), "{entry}");
        assert_eq!(fields["source"], source, "{entry}");
    }
    signal(&server, libc::SIGTERM);
    assert!(server.0.wait().unwrap().success());
    let rest: Vec<String> = lines.iter().collect();
    assert!(
        !rest.iter().any(|line| line.contains("malware found")),
        "one line per verdict with malware: {rest:?}"
    );
}
