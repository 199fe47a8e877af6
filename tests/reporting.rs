//! Reports to the Integration Server, the SVM and VM status, security tags
//! and the admin service: a real receiver on loopback, and tokio's paused
//! clock where the test is about time.
//!
//! Under a paused clock, tokio jumps to the next timer whenever the runtime
//! has nothing to do, including while a request is on the wire. The tests
//! therefore wait for the receiver from a blocking task (which holds the
//! clock still), and move the clock a second at a time.

mod common;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, mpsc as std_mpsc},
    thread,
    time::Duration,
};

use common::*;
use scanserver::{
    admin,
    auth::{BearerToken, SendToken},
    config::Config,
    engine::{Content, ScanJob},
    proto::{
        AgentMessage, AgentStatus, AgentsRequest, ComponentState, Health, IntegrityEvent,
        IntegrityKind, NetworkAttackEvent, ReportAck, ReportTrigger, ScanRequest, SvmReason,
        SvmReport, TagRequest, TaskEvent, TaskKind, TaskState, VmInfo, VmReason, agent_message,
        file_reply, file_request,
        integration_server_server::{IntegrationServer, IntegrationServerServer},
        server_message,
    },
    reporting::{JITTER, MIN_GAP, REPORT_TIMEOUT, Receiver, Reporter},
    sessions::{AgentIdentity, Sessions},
    status::{Svm, SvmStatus, WhichVms},
    vms::{self, Ending, SecurityTag, Vms},
};
use tokio::sync::{mpsc, oneshot, watch};

/// A receiver's TLS: its certificate and key (PEM), and the CA clients'
/// certificates must chain to, if any.
#[derive(Clone)]
struct ServedTls {
    cert: String,
    key: String,
    client_ca: Option<String>,
}

/// An Integration Server on its own thread and runtime (real time), so that
/// a test's paused clock does not stop it.
struct TestReceiver {
    addr: SocketAddr,
    reports: Arc<Mutex<std_mpsc::Receiver<SvmReport>>>,
    forward: std_mpsc::Sender<SvmReport>,
    /// The bearer token reports must carry, if any.
    token: Option<String>,
    /// TLS, when served with it.
    tls: Option<ServedTls>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
    /// Its port, bound (not listening) for as long as the receiver lives:
    /// stopped, it refuses connections, and no other test's socket takes
    /// the port before it listens again.
    held: Option<tokio::net::TcpSocket>,
}

/// A socket that may share its port with others of this user that set the
/// same option (SO_REUSEPORT).
fn port_sharing_socket() -> tokio::net::TcpSocket {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_reuseport(true).unwrap();
    socket
}

impl TestReceiver {
    fn start() -> TestReceiver {
        Self::with_token(None)
    }

    fn with_token(token: Option<&str>) -> TestReceiver {
        let (forward, reports) = std_mpsc::channel();
        let mut receiver = TestReceiver {
            addr: "127.0.0.1:0".parse().unwrap(),
            reports: Arc::new(Mutex::new(reports)),
            forward,
            token: token.map(str::to_owned),
            tls: None,
            stop: None,
            thread: None,
            held: None,
        };
        receiver.listen();
        let held = port_sharing_socket();
        held.bind(receiver.addr).unwrap();
        receiver.held = Some(held);
        receiver
    }

    /// Serves on `self.addr` (a free port the first time, the same port
    /// after a stop).
    fn listen(&mut self) {
        let (bound_tx, bound_rx) = std_mpsc::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let (addr, forward, token) = (self.addr, self.forward.clone(), self.token.clone());
        let tls = self.tls.clone().map(|tls| {
            use tonic::transport::{Certificate, Identity, ServerTlsConfig};
            let config = ServerTlsConfig::new().identity(Identity::from_pem(tls.cert, tls.key));
            match tls.client_ca {
                Some(ca) => config.client_ca_root(Certificate::from_pem(ca)),
                None => config,
            }
        });
        let thread = thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            runtime.block_on(async move {
                let socket = port_sharing_socket();
                socket.bind(addr).unwrap();
                let listener = socket.listen(1024).unwrap();
                bound_tx.send(listener.local_addr().unwrap()).unwrap();
                let (tx, mut rx) = mpsc::channel(16);
                tokio::spawn(async move {
                    while let Some(report) = rx.recv().await {
                        let _ = forward.send(report);
                    }
                });
                let mut builder = tonic::transport::Server::builder();
                if let Some(tls) = tls {
                    builder = builder.tls_config(tls).unwrap();
                }
                let serve = builder
                    .add_service(Receiver::service(
                        tx,
                        token.as_deref().map(|t| BearerToken::new(t).unwrap()),
                    ))
                    .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
                // Stopped, the receiver vanishes: the runtime goes, and with
                // it every connection.
                tokio::select! {
                    result = serve => result.unwrap(),
                    _ = stopped => {}
                }
            });
        });
        self.addr = bound_rx.recv().unwrap();
        self.stop = Some(stop);
        self.thread = Some(thread);
    }

    fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The next report, waiting up to `wait` of real time without letting
    /// a paused clock move.
    async fn next(&self, wait: Duration) -> Option<SvmReport> {
        let reports = Arc::clone(&self.reports);
        tokio::task::spawn_blocking(move || reports.lock().unwrap().recv_timeout(wait).ok())
            .await
            .unwrap()
    }
}

impl Drop for TestReceiver {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An SVM with the shipped signatures and a reporter towards `receiver`,
/// without an agent listener: what the clock tests need.
async fn reporting_svm(
    receiver: &TestReceiver,
    configure: impl FnOnce(&mut Config),
) -> (Arc<Svm>, oneshot::Sender<()>) {
    reporting_svm_at(receiver.url(), configure).await
}

/// As [`reporting_svm`], reporting to `url`.
async fn reporting_svm_at(
    url: String,
    configure: impl FnOnce(&mut Config),
) -> (Arc<Svm>, oneshot::Sender<()>) {
    let mut config = Config::default();
    config.reporting.integration_server = Some(url);
    config.engine.threads = 2;
    config.rules.max_age = Duration::from_secs(100 * 365 * 86400);
    configure(&mut config);
    let engine = engine_with(shipped_ruleset(), config.engine.clone());
    let vms = Arc::new(Vms::in_memory());
    let sessions = Arc::new(Sessions::new(
        10,
        &config.uploads,
        Arc::clone(&vms),
        Arc::clone(engine.metrics()),
    ));
    let svm = Arc::new(Svm::new(
        &config,
        engine,
        sessions,
        vms,
        None,
        Arc::default(),
        Arc::default(),
    ));
    let reporter = Reporter::new(&config.reporting, Arc::clone(&svm))
        .unwrap()
        .unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let (shutdown, shutdown_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(reporter.run(shutdown_rx));
    // As the server stops: the status first, then the signal (between
    // the two, the reporter may see the change).
    let stopping = Arc::clone(&svm);
    tokio::spawn(async move {
        let _ = stopped.await;
        stopping.begin_shutdown();
        tokio::task::yield_now().await;
        let _ = shutdown.send(true);
    });
    (svm, stop)
}

/// Waits (holding the clock still) until the reporter has recorded the
/// outcome of `n` reports.
async fn reports_recorded(svm: &Arc<Svm>, n: u64) {
    let metrics = Arc::clone(svm.engine.metrics());
    tokio::task::spawn_blocking(move || {
        for _ in 0..1000 {
            let (delivered, failed) = metrics.reports();
            if delivered + failed >= n {
                return;
            }
            thread::sleep(Duration::from_millis(5));
        }
        panic!("the reporter recorded fewer than {n} reports");
    })
    .await
    .unwrap();
}

/// The first report of `svm`, once the reporter has recorded it delivered.
async fn first_report(receiver: &TestReceiver, svm: &Arc<Svm>) -> SvmReport {
    let report = receiver
        .next(Duration::from_secs(10))
        .await
        .expect("a first report");
    reports_recorded(svm, 1).await;
    report
}

/// Moves a paused clock a second at a time, up to `limit`, until a report
/// arrives; returns it with the time it took.
async fn next_report_within(
    receiver: &TestReceiver,
    limit: Duration,
) -> Option<(SvmReport, Duration)> {
    let started = tokio::time::Instant::now();
    while started.elapsed() <= limit {
        if let Some(report) = receiver.next(Duration::from_millis(150)).await {
            return Some((report, started.elapsed()));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    None
}

#[tokio::test(start_paused = true)]
async fn the_first_report_is_immediate_and_the_next_come_every_interval() {
    let receiver = TestReceiver::start();
    let started = tokio::time::Instant::now();
    let (svm, _stop) = reporting_svm(&receiver, |config| {
        config.reporting.interval = Duration::from_secs(60);
    })
    .await;

    let first = receiver
        .next(Duration::from_secs(10))
        .await
        .expect("a first report");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(first.sequence, 1);
    assert_eq!(first.trigger(), ReportTrigger::Start);
    assert_eq!(first.status(), Health::Ok);
    let signatures = first.signatures.as_ref().unwrap();
    assert_eq!(signatures.version, svm.engine.ruleset().version());
    assert!(signatures.rule_count > 0);
    assert!(first.load.is_some() && first.cache.is_some());
    reports_recorded(&svm, 1).await;

    // The first scheduled report comes within the second half of an
    // interval (the spread itself is checked on the draws, in the
    // reporter's unit tests), the next every interval.
    let interval = 60.0;
    tokio::time::sleep(Duration::from_secs_f64(interval / 2.0 - 1.0)).await;
    assert!(
        receiver.next(Duration::from_millis(200)).await.is_none(),
        "the first scheduled report came in the first half"
    );
    let (report, _) = next_report_within(&receiver, Duration::from_secs_f64(interval / 2.0 + 2.0))
        .await
        .expect("a first scheduled report");
    assert_eq!(report.sequence, 2);
    assert_eq!(report.trigger(), ReportTrigger::Scheduled);
    reports_recorded(&svm, 2).await;
    // The paused clock moves a second each time a report is looked for
    // (for 150 ms) and not there yet: a report slow on the wire (a busy
    // machine) comes a few seconds late.
    let earliest = Duration::from_secs_f64(interval * (1.0 - JITTER)) - Duration::from_secs(1);
    let latest = Duration::from_secs_f64(interval * (1.0 + JITTER)) + Duration::from_secs(4);
    for sequence in 3..=4 {
        tokio::time::sleep(earliest).await;
        assert!(
            receiver.next(Duration::from_millis(200)).await.is_none(),
            "report {sequence} came early"
        );
        let (report, after) = next_report_within(&receiver, latest - earliest)
            .await
            .unwrap_or_else(|| panic!("report {sequence} did not come"));
        assert_eq!(report.sequence, sequence);
        assert_eq!(report.trigger(), ReportTrigger::Scheduled);
        let interval = earliest + after;
        assert!(interval >= earliest && interval <= latest, "{interval:?}");
        reports_recorded(&svm, sequence).await;
    }
}

#[tokio::test(start_paused = true)]
async fn an_unreachable_receiver_turns_the_svm_warning_until_it_returns() {
    let mut receiver = TestReceiver::start();
    let (svm, _stop) = reporting_svm(&receiver, |config| {
        config.reporting.interval = Duration::from_secs(60);
    })
    .await;
    first_report(&receiver, &svm).await;
    assert_eq!(svm.status().health, Health::Ok);

    receiver.stop();
    // The next regular report fails.
    tokio::time::sleep(Duration::from_secs(62)).await;
    reports_recorded(&svm, 2).await;
    let status = svm.status();
    assert_eq!(status.health, Health::Warning);
    assert_eq!(status.reasons, [SvmReason::NoConnectionToIntegrationServer]);
    assert_eq!(
        SvmReason::NoConnectionToIntegrationServer.describe(),
        "no connection to the Integration Server"
    );

    // Retries back off: 1 s, 2 s, 4 s ... and the receiver is back.
    tokio::time::sleep(Duration::from_secs(20)).await;
    receiver.listen();
    let (retry, _) = next_report_within(&receiver, Duration::from_secs(60))
        .await
        .expect("a retry once the receiver is back");
    assert_eq!(retry.trigger(), ReportTrigger::Retry);
    // Delivered, the retry cannot say the Integration Server is unreachable.
    assert_eq!(retry.status(), Health::Ok);
    assert!(retry.reasons.is_empty());
    // The recovery it made is already reported: no report of it follows.
    reports_recorded(&svm, svm.engine.metrics().reports().1 + 2).await;
    assert!(
        next_report_within(&receiver, MIN_GAP * 2).await.is_none(),
        "a second report of the recovery"
    );
    assert_eq!(svm.status().health, Health::Ok);
    let (delivered, failed) = svm.engine.metrics().reports();
    assert!(
        failed >= 2 && delivered == 2,
        "{delivered} delivered, {failed} failed"
    );
}

/// A TCP proxy on its own thread and runtime (real time). [`Self::freeze`]
/// leaves the connections it carries open but silent, as a peer that
/// vanished without a word would (a failover, an expired NAT entry); the
/// connections it accepts afterwards are carried as before.
struct FreezingProxy {
    addr: SocketAddr,
    /// Bumped by a freeze: connections accepted before it carry nothing
    /// more.
    generation: watch::Sender<u64>,
    _stop: oneshot::Sender<()>,
}

impl FreezingProxy {
    fn start(to: SocketAddr) -> FreezingProxy {
        let (generation, generations) = watch::channel(0);
        let (bound_tx, bound_rx) = std_mpsc::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                bound_tx.send(listener.local_addr().unwrap()).unwrap();
                let accept = async {
                    while let Ok((client, _)) = listener.accept().await {
                        tokio::spawn(Self::carry(client, to, generations.clone()));
                    }
                };
                tokio::select! {
                    () = accept => {}
                    _ = stopped => {}
                }
            });
        });
        FreezingProxy {
            addr: bound_rx.recv().unwrap(),
            generation,
            _stop: stop,
        }
    }

    /// Carries `client` to `to` until a freeze, then holds both open and
    /// silent.
    async fn carry(
        mut client: tokio::net::TcpStream,
        to: SocketAddr,
        mut generation: watch::Receiver<u64>,
    ) {
        let born = *generation.borrow_and_update();
        let mut server = tokio::net::TcpStream::connect(to).await.unwrap();
        let frozen = async {
            let _ = generation.wait_for(|now| *now != born).await;
        };
        tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
            () = frozen => std::future::pending().await,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn freeze(&self) {
        self.generation.send_modify(|generation| *generation += 1);
    }
}

/// A report lists at most `REPORT_VMS_BUDGET` of VMs (tagged ones before
/// the others), and counts those it leaves out: a report too large for
/// its receiver would never be delivered.
#[tokio::test(start_paused = true)]
async fn a_report_keeps_its_vms_within_what_receivers_take() {
    use prost::Message;
    use scanserver::reporting::REPORT_VMS_BUDGET;
    const VMS: usize = 5_000;
    let receiver = TestReceiver::start();
    let (svm, _stop) = reporting_svm(&receiver, |_| {}).await;
    first_report(&receiver, &svm).await;
    // VMs with the longest names an agent may give, each of whose agent
    // lost its connection.
    let long = |what: &str, n: usize| format!("{what}-{n:05}-{}", "x".repeat(240));
    for n in 0..VMS {
        let session = svm
            .sessions
            .open(AgentIdentity {
                agent_id: long("agent", n),
                vm_id: long("vm", n),
                vm_name: long("name", n),
                os: "Windows".into(),
                agent_version: "1".into(),
                certificate: None,
            })
            .unwrap();
        svm.sessions.close(&session.id, Ending::Dropped);
    }
    let tagged = long("vm", VMS - 1);
    assert!(svm.vms.threat_found(&tagged));
    let (report, _) = next_report_within(&receiver, Duration::from_secs(60))
        .await
        .expect("a report of the change");
    let listed: usize = report.vms.iter().map(|vm| vm.encoded_len()).sum();
    assert!(listed <= REPORT_VMS_BUDGET, "{listed} bytes of VMs");
    assert!(report.vms_left_out > 0, "{} VMs listed", report.vms.len());
    assert_eq!(report.vms.len() + report.vms_left_out as usize, VMS);
    assert_eq!(report.vms[0].vm_id, tagged, "a tagged VM first");
}

/// An Integration Server that hands on the `grpc-timeout` each report came
/// with.
struct Deadlines(mpsc::UnboundedSender<Option<String>>);

#[tonic::async_trait]
impl IntegrationServer for Deadlines {
    async fn report(
        &self,
        request: tonic::Request<SvmReport>,
    ) -> Result<tonic::Response<ReportAck>, tonic::Status> {
        let timeout = request.metadata().get("grpc-timeout");
        let _ = (self.0).send(timeout.map(|t| t.to_str().unwrap().to_owned()));
        Ok(tonic::Response::new(ReportAck::default()))
    }
}

/// Reports say how long they are waited for (`grpc-timeout`), so that an
/// Integration Server behind drops those no one waits for any longer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_tell_the_integration_server_how_long_they_are_waited_for() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (deadlines, mut received) = mpsc::unbounded_channel();
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(IntegrationServerServer::new(Deadlines(deadlines)))
            .serve_with_incoming(incoming),
    );
    let (_svm, _stop) = reporting_svm_at(url, |_| {}).await;
    let timeout = tokio::time::timeout(Duration::from_secs(10), received.recv()).await;
    let timeout = timeout.expect("a report").unwrap().expect("a grpc-timeout");
    // Digits, then the unit (gRPC's spelling).
    let (digits, unit) = timeout.split_at(timeout.len() - 1);
    let nanos_per = match unit {
        "S" => 1_000_000_000,
        "m" => 1_000_000,
        "u" => 1_000,
        "n" => 1,
        _ => panic!("unexpected unit in {timeout}"),
    };
    let nanos: u64 = digits.parse::<u64>().unwrap() * nanos_per;
    assert_eq!(Duration::from_nanos(nanos), REPORT_TIMEOUT, "{timeout}");
}

/// A report that got no answer in time is sent again on a new connection:
/// the one it went on may lead to a peer that vanished without a word, and
/// would fail every report until TCP gave up on it.
#[tokio::test(start_paused = true)]
async fn a_report_without_an_answer_is_sent_again_on_a_new_connection() {
    let receiver = TestReceiver::start();
    let proxy = FreezingProxy::start(receiver.addr);
    let (svm, _stop) = reporting_svm_at(proxy.url(), |config| {
        config.reporting.interval = Duration::from_secs(60);
    })
    .await;
    first_report(&receiver, &svm).await;
    proxy.freeze();
    // The next regular report gets no answer within REPORT_TIMEOUT; its
    // retry, on a new connection, is delivered.
    let (retry, _) = next_report_within(&receiver, Duration::from_secs(120))
        .await
        .expect("a retry on a new connection");
    assert_eq!(retry.trigger(), ReportTrigger::Retry);
    reports_recorded(&svm, 3).await;
    let (delivered, failed) = svm.engine.metrics().reports();
    assert_eq!((delivered, failed), (2, 1));
}

/// The last report comes once, even when a change is due as shutdown
/// begins (the status changes first, then the signal comes).
#[tokio::test(start_paused = true)]
async fn shutdown_makes_one_last_report() {
    let receiver = TestReceiver::start();
    let (svm, stop) = reporting_svm(&receiver, |_| {}).await;
    first_report(&receiver, &svm).await;
    // Long enough since the last report for a change to go at once.
    tokio::time::sleep(MIN_GAP * 2).await;
    drop(stop);
    let last = last_report(&receiver).await;
    assert_eq!(
        last.reasons().collect::<Vec<_>>(),
        [SvmReason::ShuttingDown]
    );
    assert!(
        receiver.next(Duration::from_millis(500)).await.is_none(),
        "one last report, no other"
    );
}

/// The last report goes on a new connection: the one the reports went on
/// may lead nowhere by then (a NAT entry expired while it was idle), and
/// the last report is not sent again.
#[tokio::test(start_paused = true)]
async fn the_last_report_goes_on_a_new_connection() {
    let receiver = TestReceiver::start();
    let proxy = FreezingProxy::start(receiver.addr);
    let (svm, stop) = reporting_svm_at(proxy.url(), |_| {}).await;
    first_report(&receiver, &svm).await;
    proxy.freeze();
    drop(stop);
    last_report(&receiver).await;
}

/// The next report, within 10 s: a last one, of the SVM shutting down.
async fn last_report(receiver: &TestReceiver) -> SvmReport {
    let last = receiver
        .next(Duration::from_secs(10))
        .await
        .expect("a last report");
    assert_eq!(last.trigger(), ReportTrigger::Shutdown);
    last
}

/// A server that shuts down sends its last report at once, and is done
/// only once it went: trigger SHUTDOWN, the SVM Critical, SHUTTING_DOWN;
/// and it lists the VM connected as the shutdown began, whether its
/// session has closed by then (awaited back) or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_report_says_the_svm_is_shutting_down() {
    let receiver = TestReceiver::start();
    let url = receiver.url();
    let server = TestServer::start(|c| c.reporting.integration_server = Some(url)).await;
    let first = receiver.next(Duration::from_secs(10)).await.unwrap();
    assert_eq!(first.trigger(), ReportTrigger::Start);
    let _agent = TestAgent::connect(&server, "vm-going").await;
    server.stop().await;
    let mut last = None;
    while let Some(report) = receiver.next(Duration::from_secs(1)).await {
        last = Some(report);
    }
    let last = last.expect("a report at shutdown");
    assert_eq!(last.trigger(), ReportTrigger::Shutdown);
    assert_eq!(last.status(), Health::Critical);
    assert_eq!(
        last.reasons().collect::<Vec<_>>(),
        [SvmReason::ShuttingDown]
    );
    let vm = last.vms.iter().find(|vm| vm.vm_id == "vm-going");
    let vm = vm.expect("the VM connected as the shutdown began is listed");
    assert!(vm.connected != vm.awaited, "{vm:?}");
}

#[tokio::test(start_paused = true)]
async fn a_scan_queue_full_for_a_minute_turns_the_svm_warning() {
    let receiver = TestReceiver::start();
    let (svm, _stop) = reporting_svm(&receiver, |config| {
        config.engine.queue_capacity = 1;
    })
    .await;
    first_report(&receiver, &svm).await;
    let (shutdown, shutdown_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(Arc::clone(&svm).monitor(shutdown_rx));

    let job = ScanJob::bytes(b"queued".to_vec(), None);
    let slot = svm.engine.reserve(&job.content).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(
        svm.status().health,
        Health::Ok,
        "half a minute is not saturation"
    );
    tokio::time::sleep(Duration::from_secs(31)).await;
    assert_eq!(svm.status().reasons, [SvmReason::ScanQueueSaturated]);
    assert_eq!(svm.status().health, Health::Warning);
    drop(slot);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(svm.status().health, Health::Ok);
    let _ = shutdown.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_signatures_and_an_unreachable_infrastructure_are_reasons() {
    // Listening, and bound a second time without listening: once the
    // listener is gone, the port refuses connections, and no other test's
    // listener can take it meanwhile.
    let listening = port_sharing_socket();
    listening.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let endpoint = listening.local_addr().unwrap();
    let infrastructure = listening.listen(16).unwrap();
    let held = port_sharing_socket();
    held.bind(endpoint).unwrap();
    let server = TestServer::start(|config| {
        config.infrastructure.endpoint = Some(endpoint.to_string());
        config.rules.max_age = Duration::ZERO;
    })
    .await;
    let svm = &server.svm;
    svm.probe().await;
    assert_eq!(svm.status().reasons, [SvmReason::SignaturesOutdated]);
    assert_eq!(svm.status().health, Health::Warning);

    drop(infrastructure);
    svm.probe().await;
    assert_eq!(
        svm.status().reasons,
        [
            SvmReason::InfrastructureUnreachable,
            SvmReason::SignaturesOutdated
        ]
    );
    assert_eq!(svm.status().health, Health::Critical);

    // What `scanserver status` prints.
    let mut admin = server.admin_client().await;
    let reply = admin
        .status(scanserver::proto::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let text = admin::render_status(&reply);
    assert!(text.contains("status CRITICAL"), "{text}");
    assert!(
        text.contains("reason: virtual infrastructure unreachable"),
        "{text}"
    );
    assert!(text.contains("reason: signatures outdated"), "{text}");
    let probe = reply
        .components
        .iter()
        .find(|c| c.name == "infrastructure probe")
        .unwrap();
    assert!(probe.detail.contains("cannot connect"), "{probe:?}");
}

/// While the infrastructure is unreachable it is probed every
/// PROBE_RETRY, not every report interval; and a connect that fails once
/// is tried again before it counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_infrastructure_is_probed_again_soon_while_unreachable() {
    use scanserver::status::{PROBE_CONFIRM, PROBE_RETRY};
    // A port nothing listens on, for now: bound, so that no other test's
    // socket takes it meanwhile, but refusing connections until it listens.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let endpoint = socket.local_addr().unwrap();
    let server = TestServer::start(|config| {
        config.infrastructure.endpoint = Some(endpoint.to_string());
        config.reporting.interval = Duration::from_secs(300);
    })
    .await;
    let svm = Arc::clone(&server.svm);
    let unreachable = SvmReason::InfrastructureUnreachable;
    reason_within(&svm, unreachable, true, PROBE_CONFIRM * 3).await;

    // Back: seen within a retry (and its confirmation), not 300 s later.
    let back = socket.listen(16).unwrap();
    reason_within(&svm, unreachable, false, PROBE_RETRY + PROBE_CONFIRM * 2).await;

    // Gone for a moment, during one probe's first connect only.
    drop(back);
    let probing = tokio::spawn(async move { svm.probe().await });
    tokio::time::sleep(PROBE_CONFIRM / 4).await;
    let _back = tokio::net::TcpListener::bind(endpoint).await.unwrap();
    probing.await.unwrap();
    let reasons = server.svm.status().reasons;
    assert!(
        !reasons.contains(&SvmReason::InfrastructureUnreachable),
        "{reasons:?}"
    );
}

/// An agent session whose server messages are collected.
struct TestAgent {
    vm_id: String,
    session_id: String,
    out: mpsc::Sender<AgentMessage>,
    messages: mpsc::Receiver<server_message::Kind>,
}

impl TestAgent {
    async fn connect(server: &TestServer, vm_id: &str) -> TestAgent {
        let mut hello = hello();
        hello.vm_id = vm_id.to_owned();
        let (out, mut incoming) = connect(server, hello).await;
        let session_id = match incoming.message().await.unwrap().unwrap().kind.unwrap() {
            server_message::Kind::Welcome(welcome) => welcome.session_id,
            other => panic!("expected a welcome, got {other:?}"),
        };
        let (tx, messages) = mpsc::channel(16);
        tokio::spawn(async move {
            while let Ok(Some(message)) = incoming.message().await {
                if let Some(kind) = message.kind {
                    let _ = tx.send(kind).await;
                }
            }
        });
        TestAgent {
            vm_id: vm_id.to_owned(),
            session_id,
            out,
            messages,
        }
    }

    async fn tell(&self, kind: agent_message::Kind) {
        self.out
            .send(AgentMessage { kind: Some(kind) })
            .await
            .unwrap();
    }

    /// Reports a full scan, started and finished with `detections`.
    async fn full_scan(&self, detections: u32) {
        self.full_scan_event(TaskState::Started, 0).await;
        self.full_scan_event(TaskState::Finished, detections).await;
    }

    async fn full_scan_event(&self, state: TaskState, detections: u32) {
        self.full_scan_event_of("full-1", state, detections).await;
    }

    async fn full_scan_event_of(&self, task_id: &str, state: TaskState, detections: u32) {
        self.tell(agent_message::Kind::Task(TaskEvent {
            task_id: task_id.into(),
            kind: TaskKind::FullScan as i32,
            state: state as i32,
            detections,
            failed_files: 0,
        }))
        .await;
    }

    /// Has the VM tagged (EICAR found on it), then starts a full scan.
    async fn tagged_then_full_scan_started(&self, server: &TestServer) {
        assert_eq!(self.scan(server, EICAR).await, 1);
        self.full_scan_event(TaskState::Started, 0).await;
        self.handled(server).await;
    }

    /// Finishes the full scan with nothing found: the tag goes.
    async fn full_scan_finished_clean(&self, server: &TestServer) {
        self.full_scan_event(TaskState::Finished, 0).await;
        eventually(server, &self.vm_id, |vm| vm.tags.is_empty()).await;
    }

    /// Returns once the server has handled everything told before on the
    /// session: the agent reports losing the Integration Server, then
    /// regaining it, and each shows in the VM's reasons in turn.
    async fn handled(&self, server: &TestServer) {
        let unreachable = VmReason::NoConnectionToIntegrationServer;
        for connected in [false, true] {
            self.tell(agent_message::Kind::Status(AgentStatus {
                integration_server_connected: connected,
            }))
            .await;
            eventually(server, &self.vm_id, |vm| {
                reasons(vm).contains(&unreachable) != connected
            })
            .await;
        }
    }

    /// Begins a file on a Scan stream and cancels it: it goes without a
    /// verdict.
    async fn cancel_a_file(&self, server: &TestServer) {
        let cancel = file_request::Kind::Cancel(scanserver::proto::FileCancel { file_id: 1 });
        let requests = vec![
            begin(&self.session_id, 1, &[0; 10], None),
            ScanRequest::from(cancel),
        ];
        let reply = first_reply(server, requests).await;
        assert_eq!(error_code(&reply), tonic::Code::Cancelled);
    }

    /// Begins a file on a raw Scan call and, once the server asks for its
    /// content, resets the call with a reason that tonic maps to
    /// RESOURCE_EXHAUSTED, the code of the server's own "send it again":
    /// the file goes without a verdict all the same.
    async fn reset_a_file(&self, server: &TestServer) {
        let (response, mut body) = raw_call(server, [127, 0, 0, 1], "Scan", 1 << 20).await;
        let data = b"a file whose stream its agent resets";
        let digest = blake3::hash(data);
        let begun = begin(&self.session_id, 1, data, Some(digest.as_bytes()));
        body.send_data(framed(&begun), false).unwrap();
        let mut replies = response.await.unwrap().into_body();
        let asked = replies.data().await.expect("a reply").unwrap();
        let _ = replies.flow_control().release_capacity(asked.len());
        body.send_reset(h2::Reason::ENHANCE_YOUR_CALM);
        // The server failed the file once it has none open for the VM (a
        // file still open would keep the tag by itself).
        let session = server.state.sessions.get(&self.session_id).unwrap();
        until_read("files open", || session.files_open(), 0).await;
    }

    /// Begins a clean file on a Scan stream, then its file id again before
    /// its content: both are refused, and go without a verdict.
    async fn begin_a_file_twice(&self, server: &TestServer) {
        let data = [0; 10];
        let (tx, mut replies) = scan_stream(server).await;
        let requests = vec![
            begin(&self.session_id, 1, &data, None),
            begin(&self.session_id, 1, &data, None),
            chunk(1, 0, &data),
            end(1),
            begin(&self.session_id, 2, b"", None),
            end(2),
        ];
        tx.send(batch(requests)).await.unwrap();
        // One error for both begins (the file open is dropped with the
        // second); the chunk and the end of the file it failed are dropped
        // without a word: the next reply is the other file's verdict.
        let (id, refused) = next(&mut replies).await;
        assert_eq!(
            (id, error_code(&refused)),
            (1, tonic::Code::InvalidArgument)
        );
        let (id, verdict) = next(&mut replies).await;
        assert_eq!(id, 2);
        file_verdict(verdict);
    }

    /// Begins a file whose content waits, and another, refused for want of
    /// room (the VM's one place in flight is taken); sends the first's
    /// content, then the second again, whole: both get clean verdicts.
    async fn refused_for_room_then_sent_again(&self, server: &TestServer) {
        let data = [0; 10];
        let (tx, mut replies) = scan_stream(server).await;
        let session = &self.session_id;
        tx.send(batch(vec![
            begin(session, 1, &data, None),
            begin(session, 2, &data, None),
        ]))
        .await
        .unwrap();
        let (id, refused) = next(&mut replies).await;
        assert_eq!(
            (id, error_code(&refused)),
            (2, tonic::Code::ResourceExhausted)
        );
        tx.send(batch(vec![chunk(1, 0, &data), end(1)]))
            .await
            .unwrap();
        assert_eq!(
            file_verdict(next(&mut replies).await.1).detection_count(),
            0
        );
        send_whole(&tx, session, 2, &data).await;
        assert_eq!(
            file_verdict(next(&mut replies).await.1).detection_count(),
            0
        );
    }

    /// Scans `data` through a Scan stream; returns the number of detections.
    /// Opens a Scan stream and begins file 1 (`data`, its content to
    /// follow) on it; returns once the server counts it in flight.
    async fn begin_in_flight(
        &self,
        server: &TestServer,
        data: &[u8],
    ) -> (mpsc::Sender<ScanRequest>, Replies) {
        let (tx, replies) = scan_stream(server).await;
        tx.send(begin(&self.session_id, 1, data, None))
            .await
            .unwrap();
        until_files_in_flight(server, 1).await;
        (tx, replies)
    }

    async fn scan(&self, server: &TestServer, data: &[u8]) -> usize {
        let requests = vec![
            begin(&self.session_id, 1, data, None),
            chunk(1, 0, data),
            end(1),
        ];
        file_verdict(first_reply(server, requests).await).detection_count()
    }
}

/// Waits until `server` counts `files` in flight.
async fn until_files_in_flight(server: &TestServer, files: usize) {
    let in_flight = || server.state.sessions.files_in_flight();
    until_read("files in flight", in_flight, files).await;
}

/// Assigns (or removes) `tag` on VM `vm_id` through the admin service;
/// whether that changed anything.
async fn set_tag(
    server: &TestServer,
    vm_id: &str,
    tag: &str,
    assign: bool,
) -> Result<bool, tonic::Status> {
    let mut admin = server.admin_client().await;
    let request = TagRequest {
        vm_id: vm_id.into(),
        tag: tag.into(),
    };
    let reply = match assign {
        true => admin.assign_tag(request).await?,
        false => admin.remove_tag(request).await?,
    };
    Ok(reply.into_inner().changed)
}

/// The VM `vm_id` as the admin service lists it.
async fn vm_info(server: &TestServer, vm_id: &str) -> VmInfo {
    let mut admin = server.admin_client().await;
    let reply = admin.agents(AgentsRequest {}).await.unwrap().into_inner();
    reply
        .vms
        .into_iter()
        .find(|vm| vm.vm_id == vm_id)
        .expect("the VM is listed")
}

fn reasons(vm: &VmInfo) -> Vec<VmReason> {
    vm.reasons().collect()
}

fn tags(vm: &VmInfo) -> Vec<(String, i32)> {
    vm.tags.iter().map(|t| (t.name.clone(), t.origin)).collect()
}

/// Waits (real time) for a report in which `check` holds for VM `vm_id`.
async fn report_where(
    receiver: &TestReceiver,
    vm_id: &str,
    check: impl Fn(&VmInfo) -> bool,
) -> SvmReport {
    for _ in 0..20 {
        let Some(report) = receiver.next(Duration::from_secs(10)).await else {
            break;
        };
        if report.vms.iter().any(|vm| vm.vm_id == vm_id && check(vm)) {
            return report;
        }
    }
    panic!("no report showed the expected state of {vm_id}");
}

const VIRUS_FOUND: &str = "ANTI_VIRUS.VirusFound.threat=high";
const IDS_IPS: &str = "IDS_IPS.threat=high";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eicar_tags_the_vm_a_clean_full_scan_untags_it_and_manual_tags_stay() {
    let receiver = TestReceiver::start();
    let server = TestServer::start(|config| {
        config.reporting.integration_server = Some(receiver.url());
    })
    .await;
    let first = receiver
        .next(Duration::from_secs(10))
        .await
        .expect("a first report");
    // Made as the server started, not after the first interval.
    assert_eq!(first.trigger(), ReportTrigger::Start);
    // Agents are told the address bound (the settings asked for port 0).
    let addresses = &first.svm.as_ref().unwrap().addresses;
    assert_eq!(addresses, &[server.addr.to_string()]);

    let agent = TestAgent::connect(&server, "vm-x").await;
    assert_eq!(agent.scan(&server, EICAR).await, 1);
    let tagged = report_where(&receiver, "vm-x", |vm| !vm.tags.is_empty()).await;
    assert_eq!(tagged.trigger(), ReportTrigger::Change);
    assert_eq!(tagged.connected_agents, 1);
    let vm = tagged.vms.iter().find(|vm| vm.vm_id == "vm-x").unwrap();
    assert_eq!(tags(vm), [(VIRUS_FOUND.to_owned(), 1)]);
    assert_eq!(vm.status(), Health::Critical);
    assert_eq!(reasons(vm), [VmReason::ThreatFound]);
    let figures = (vm.files, vm.bytes, vm.detections);
    assert_eq!(figures, (1, EICAR.len() as u64, 1), "{vm:?}");

    // A full scan that found something keeps the tag; a clean one removes it.
    agent.full_scan(2).await;
    agent.handled(&server).await;
    assert_eq!(tags(&vm_info(&server, "vm-x").await).len(), 1);
    agent.full_scan(0).await;
    let untagged = report_where(&receiver, "vm-x", |vm| vm.tags.is_empty()).await;
    let vm = untagged.vms.iter().find(|vm| vm.vm_id == "vm-x").unwrap();
    assert_eq!(vm.status(), Health::Ok);

    // Assigned by hand, it survives a clean full scan.
    assert!(set_tag(&server, "vm-x", VIRUS_FOUND, true).await.unwrap());
    report_where(&receiver, "vm-x", |vm| !vm.tags.is_empty()).await;
    agent.full_scan(0).await;
    agent.handled(&server).await;
    assert_eq!(
        tags(&vm_info(&server, "vm-x").await),
        [(VIRUS_FOUND.to_owned(), 2)]
    );
}

/// Admin requests are small: one over 64 KiB is refused (OUT_OF_RANGE).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_request_over_64_kib_is_refused() {
    let server = TestServer::start(|_| {}).await;
    let vm_id = "v".repeat(100 << 10);
    let refused = set_tag(&server, &vm_id, VIRUS_FOUND, true).await;
    let refused = refused.expect_err("refused");
    assert_eq!(refused.code(), tonic::Code::OutOfRange, "{refused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_without_a_verdict_keeps_a_full_scan_from_clearing_the_tag() {
    let server = TestServer::start(|_| {}).await;
    let agent = TestAgent::connect(&server, "vm-z").await;
    for way in ["cancelled", "begun twice", "reset by its agent"] {
        agent.tagged_then_full_scan_started(&server).await;
        match way {
            "cancelled" => agent.cancel_a_file(&server).await,
            "begun twice" => agent.begin_a_file_twice(&server).await,
            _ => agent.reset_a_file(&server).await,
        }
        agent.full_scan_event(TaskState::Finished, 0).await;
        agent.handled(&server).await;
        assert_eq!(
            tags(&vm_info(&server, "vm-z").await),
            [(VIRUS_FOUND.to_owned(), 1)],
            "the full scan did not see every file (one {way})"
        );
        agent.full_scan(0).await;
        eventually(&server, "vm-z", |vm| vm.tags.is_empty()).await;
    }
}

/// A full scan that finishes while a file of the VM still waits for its
/// verdict has not seen it, and one whose task id is too long to keep is
/// not taken: the tag stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_scan_finished_with_files_in_flight_or_a_long_id_leaves_the_tag() {
    let server = TestServer::start(|_| {}).await;
    let agent = TestAgent::connect(&server, "vm-f").await;
    assert_eq!(agent.scan(&server, EICAR).await, 1);
    agent.full_scan_event(TaskState::Started, 0).await;
    let (tx, replies) = agent.begin_in_flight(&server, &[0; 10]).await;
    agent.full_scan_event(TaskState::Finished, 0).await;
    agent.handled(&server).await;
    let vm = vm_info(&server, "vm-f").await;
    assert_eq!(tags(&vm), [(VIRUS_FOUND.to_owned(), 1)], "a file in flight");
    drop((tx, replies));
    until_files_in_flight(&server, 0).await;

    let long = "t".repeat(300);
    agent.full_scan_event_of(&long, TaskState::Started, 0).await;
    agent
        .full_scan_event_of(&long, TaskState::Finished, 0)
        .await;
    agent.handled(&server).await;
    let vm = vm_info(&server, "vm-f").await;
    assert_eq!(tags(&vm), [(VIRUS_FOUND.to_owned(), 1)], "a long task id");
    agent.full_scan(0).await;
    eventually(&server, "vm-f", |vm| vm.tags.is_empty()).await;
}

/// The end of another task while files of the VM are in flight says
/// nothing of the full scan under way: once those files are answered, a
/// clean end of the full scan clears the tag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_task_ending_with_files_in_flight_leaves_the_full_scan_alone() {
    let server = TestServer::start(|_| {}).await;
    let agent = TestAgent::connect(&server, "vm-o").await;
    assert_eq!(agent.scan(&server, EICAR).await, 1);
    agent.full_scan_event(TaskState::Started, 0).await;
    let data = [0; 10];
    let (tx, mut replies) = agent.begin_in_flight(&server, &data).await;
    for (kind, state) in [
        (TaskKind::CustomScan, TaskState::Started),
        (TaskKind::CustomScan, TaskState::Finished),
        (TaskKind::OnAccess, TaskState::Finished),
    ] {
        agent
            .tell(agent_message::Kind::Task(TaskEvent {
                task_id: "other".into(),
                kind: kind as i32,
                state: state as i32,
                detections: 0,
                failed_files: 0,
            }))
            .await;
    }
    agent.handled(&server).await;
    tx.send(batch(vec![chunk(1, 0, &data), end(1)]))
        .await
        .unwrap();
    let (id, verdict) = next(&mut replies).await;
    assert_eq!((id, file_verdict(verdict).detection_count()), (1, 0));
    agent.full_scan_finished_clean(&server).await;
}

/// A file refused for want of room is sent again, as the agent is told to:
/// the refusal does not keep the full scan from clearing the tag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_refused_for_want_of_room_and_sent_again_leaves_a_full_scan_clean() {
    let server = TestServer::start(|c| c.uploads.files_in_flight = 1).await;
    let agent = TestAgent::connect(&server, "vm-r").await;
    agent.tagged_then_full_scan_started(&server).await;
    agent.refused_for_room_then_sent_again(&server).await;
    agent.full_scan_finished_clean(&server).await;
}

/// A file failed as its stream closed idle (DEADLINE_EXCEEDED: its content
/// never came) is sent again, as the agent is told to: that does not keep
/// the full scan from clearing the tag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_failed_with_an_idle_stream_and_sent_again_leaves_a_full_scan_clean() {
    without_content_then_sent_again("vm-i", false).await;
}

/// A file failed as stalled (DEADLINE_EXCEEDED: its content stopped
/// coming while its agent kept the stream busy) is sent again on the same
/// stream: neither does that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_file_sent_again_leaves_a_full_scan_clean() {
    without_content_then_sent_again("vm-s", true).await;
}

/// A full scan of VM `vm_id`, tagged, during which a file begun on a
/// stream never has its content sent and fails with DEADLINE_EXCEEDED (the
/// stream `kept_busy` by requests without content, or left idle), then is
/// sent again (on that stream, or on a new one once it closed): the full
/// scan finishes clean.
async fn without_content_then_sent_again(vm_id: &str, kept_busy: bool) {
    let server = TestServer::start(|c| {
        c.engine.scan_timeout = Duration::from_secs(1);
        c.server.idle_timeout = Duration::from_secs(2);
    })
    .await;
    let agent = TestAgent::connect(&server, vm_id).await;
    agent.tagged_then_full_scan_started(&server).await;
    let data = [0; 10];
    let (tx, mut replies) = scan_stream(&server).await;
    tx.send(begin(&agent.session_id, 1, &data, None))
        .await
        .unwrap();
    let busy = kept_busy.then(|| {
        let tx = tx.clone();
        tokio::spawn(async move {
            while tx.send(ScanRequest::default()).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    });
    let (id, failed) = next(&mut replies).await;
    assert_eq!(
        (id, error_code(&failed)),
        (1, tonic::Code::DeadlineExceeded)
    );
    if let Some(busy) = busy {
        send_whole(&tx, &agent.session_id, 1, &data).await;
        let (id, verdict) = next(&mut replies).await;
        assert_eq!((id, file_verdict(verdict).detection_count()), (1, 0));
        busy.abort();
    } else {
        drop(tx);
        assert_eq!(agent.scan(&server, &data).await, 0, "sent again");
    }
    agent.full_scan_finished_clean(&server).await;
}

/// A stream cut off for want of room in the message budget fails its open
/// files with RESOURCE_EXHAUSTED, which tells the agent to send them again:
/// that does not keep the full scan from clearing the tag either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_refused_room_for_its_message_leaves_a_full_scan_clean() {
    // The smallest budget, which is all this address's share.
    let server = TestServer::start(|c| c.uploads.message_budget = 32 << 20).await;
    let agent = TestAgent::connect(&server, "vm-m").await;
    agent.tagged_then_full_scan_started(&server).await;
    // Two streams keep the room of a 15 MiB message each (a chunk for no
    // open file, refused, but the stream goes on).
    let mut holders = Vec::new();
    for id in [101, 102] {
        let (tx, mut replies) = scan_stream(&server).await;
        tx.send(chunk(id, 0, &vec![0; 15 << 20])).await.unwrap();
        let (_, refused) = next(&mut replies).await;
        assert_eq!(error_code(&refused), tonic::Code::InvalidArgument);
        holders.push((tx, replies));
    }
    let data = vec![1; 4 << 20];
    let session = &agent.session_id;
    let (tx, mut replies) = scan_stream(&server).await;
    tx.send(begin(session, 1, &data, None)).await.unwrap();
    tx.send(batch(vec![chunk(1, 0, &data), end(1)]))
        .await
        .unwrap();
    let (id, refused) = next(&mut replies).await;
    assert_eq!(
        (id, error_code(&refused)),
        (1, tonic::Code::ResourceExhausted)
    );
    drop((tx, replies, holders));
    until_read("room held", || server.state.intake.held(), 0).await;
    let (tx, mut replies) = scan_stream(&server).await;
    send_whole(&tx, session, 1, &data).await;
    let (id, verdict) = next(&mut replies).await;
    assert_eq!((id, file_verdict(verdict).detection_count()), (1, 0));
    agent.full_scan_finished_clean(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_removed_by_hand_restarts_the_agents_session() {
    let server = TestServer::start(|_| {}).await;
    let mut agent = TestAgent::connect(&server, "vm-y").await;
    agent
        .tell(agent_message::Kind::NetworkAttack(NetworkAttackEvent {
            source_address: "203.0.113.9".into(),
            description: "port scan".into(),
        }))
        .await;
    let vm = eventually(&server, "vm-y", |vm| !vm.tags.is_empty()).await;
    assert_eq!(tags(&vm), [(IDS_IPS.to_owned(), 1)]);
    assert_eq!(reasons(&vm), [VmReason::NetworkAttack]);
    // Only an operator removes it.
    agent.full_scan(0).await;
    agent.handled(&server).await;
    assert_eq!(tags(&vm_info(&server, "vm-y").await).len(), 1);

    assert!(set_tag(&server, "vm-y", IDS_IPS, false).await.unwrap());
    assert!(!set_tag(&server, "vm-y", IDS_IPS, false).await.unwrap());
    let restart = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match agent.messages.recv().await {
                Some(server_message::Kind::RestartSession(restart)) => return restart,
                Some(_) => continue,
                None => panic!("the session ended without a restart request"),
            }
        }
    })
    .await
    .expect("a restart request");
    assert!(restart.reason.contains(IDS_IPS), "{}", restart.reason);

    // Unknown VMs and tags are refused with the right codes.
    let status = set_tag(&server, "vm-never-seen", IDS_IPS, true)
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    // An id too long to show whole in a status message is cut.
    let long = "v".repeat(40 << 10);
    let status = set_tag(&server, &long, IDS_IPS, true).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    assert!(status.message().len() < 1024, "{}", status.message().len());
    let status = set_tag(&server, "vm-y", "VirusFound", true)
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_agents_tell_sets_the_vm_status() {
    let server = TestServer::start(|_| {}).await;
    let agent = TestAgent::connect(&server, "vm-z").await;
    agent
        .tell(agent_message::Kind::Status(AgentStatus {
            integration_server_connected: false,
        }))
        .await;
    agent
        .tell(agent_message::Kind::Integrity(IntegrityEvent {
            kind: IntegrityKind::RegistryModified as i32,
            object: "HKLM\\Software\\Run".into(),
        }))
        .await;
    let expected = [
        VmReason::NoConnectionToIntegrationServer,
        VmReason::RegistryModified,
    ];
    let vm = eventually(&server, "vm-z", |vm| reasons(vm) == expected).await;
    assert_eq!(vm.status(), Health::Warning);

    agent
        .tell(agent_message::Kind::Status(AgentStatus {
            integration_server_connected: true,
        }))
        .await;
    agent.full_scan(0).await;
    let vm = eventually(&server, "vm-z", |vm| vm.reasons.is_empty()).await;
    assert_eq!(vm.status(), Health::Ok);
    assert!(vm.connected);

    // What the agent says of the Integration Server holds for its session:
    // a VM shut down meanwhile does not keep it.
    agent
        .tell(agent_message::Kind::Status(AgentStatus {
            integration_server_connected: false,
        }))
        .await;
    let unreachable = [VmReason::NoConnectionToIntegrationServer];
    eventually(&server, "vm-z", |vm| reasons(vm) == unreachable).await;
    drop(agent);
    let vm = eventually(&server, "vm-z", |vm| !vm.connected).await;
    assert!(vm.reasons.is_empty(), "{:?}", vm.reasons);
}

/// Polls the SVM's status until `reason` is in force (`wanted`) or not,
/// for at most `limit`; returns that status.
async fn reason_within(svm: &Svm, reason: SvmReason, wanted: bool, limit: Duration) -> SvmStatus {
    let started = tokio::time::Instant::now();
    while started.elapsed() < limit {
        let status = svm.status();
        if status.reasons.contains(&reason) == wanted {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "{reason:?} never in force == {wanted} within {limit:?}: {:?}",
        svm.status()
    );
}

/// Polls the admin service until `check` holds for VM `vm_id`.
async fn eventually(server: &TestServer, vm_id: &str, check: impl Fn(&VmInfo) -> bool) -> VmInfo {
    for _ in 0..250 {
        let vm = vm_info(server, vm_id).await;
        if check(&vm) {
            return vm;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "{vm_id} never reached the expected state: {:?}",
        vm_info(server, vm_id).await
    );
}

/// A state file that cannot be saved turns the SVM Warning
/// (STATE_NOT_SAVED), its component saying why, until it saves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_file_that_cannot_be_saved_shows_in_the_status() {
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().to_owned();
    let server =
        TestServer::start(|config| config.server.state_dir = Some(state_dir.clone())).await;
    // A folder in the registry's place, not empty: nothing renames over it.
    let registry = state_dir.join(scanserver::vms::FILE_NAME);
    let _ = std::fs::remove_file(&registry);
    std::fs::create_dir_all(registry.join("in-the-way")).unwrap();
    let (unsaved, limit) = (SvmReason::StateNotSaved, Duration::from_secs(5));
    let state_folder = || {
        let components = server.svm.components();
        components
            .into_iter()
            .find(|c| c.name == "state folder")
            .unwrap()
    };
    assert_eq!(state_folder().detail, "saved");

    // A VM connecting changes the registry, saved about a second later.
    let agent = TestAgent::connect(&server, "vm-s").await;
    let status = reason_within(&server.svm, unsaved, true, limit).await;
    assert_eq!(status.health, Health::Warning);
    let component = state_folder();
    assert_eq!(component.state(), ComponentState::Warning);
    assert!(
        component
            .detail
            .starts_with("cannot save the protected VMs"),
        "{}",
        component.detail
    );
    // An operator's tag that cannot be saved is not answered as done.
    let refused = set_tag(&server, "vm-s", IDS_IPS, true).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Internal);
    assert!(refused.message().contains("cannot be saved"), "{refused:?}");

    std::fs::remove_dir_all(&registry).unwrap();
    // The operator runs the refused command again: the tag is set already
    // (nothing changes), and the reply still waits for a save, which
    // clears the reason at once.
    assert!(!set_tag(&server, "vm-s", IDS_IPS, true).await.unwrap());
    assert!(registry.is_file(), "saved again");
    assert!(!server.svm.status().reasons.contains(&unsaved));
    assert_eq!(state_folder().detail, "saved");
    assert!(set_tag(&server, "vm-s", IDS_IPS, false).await.unwrap());
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protected_vms_and_their_tags_survive_a_restart() {
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().to_owned();
    let server =
        TestServer::start(|config| config.server.state_dir = Some(state_dir.clone())).await;
    let agent = TestAgent::connect(&server, "vm-1").await;
    let other = TestAgent::connect(&server, "vm-2").await;
    // An operator's tag is saved before the command is answered.
    assert!(set_tag(&server, "vm-2", IDS_IPS, true).await.unwrap());
    let saved = std::fs::read_to_string(state.path().join(vms::FILE_NAME)).unwrap();
    assert!(saved.contains(&format!("\"{IDS_IPS}\"")), "{saved}");
    assert_eq!(agent.scan(&server, EICAR).await, 1);
    drop(other);
    let before = eventually(&server, "vm-1", |vm| !vm.tags.is_empty()).await;
    assert!(before.first_seen_unix_ms > 0);
    server.stop().await;
    drop(agent);
    let saved = std::fs::read_to_string(state.path().join(vms::FILE_NAME)).unwrap();
    assert!(saved.contains(&format!("\"{VIRUS_FOUND}\"")), "{saved}");

    let server =
        TestServer::start(|config| config.server.state_dir = Some(state_dir.clone())).await;
    let report = server.svm.report(WhichVms::All);
    assert_eq!(report.protected_vms_30d, 2);
    assert_eq!(report.connected_agents, 0);
    let vm = report.vms.iter().find(|vm| vm.vm_id == "vm-1").unwrap();
    assert!(!vm.connected);
    assert_eq!(tags(vm), [(VIRUS_FOUND.to_owned(), 1)]);
    assert!(vm.last_seen_unix_ms > 0);
    assert_eq!(vm.first_seen_unix_ms, before.first_seen_unix_ms);
    server.stop().await;
}

#[test]
fn tag_rules_without_a_network() {
    let vms = Arc::new(Vms::in_memory());
    let sessions = Sessions::new(10, &Default::default(), Arc::clone(&vms), Arc::default());
    let session = sessions
        .open(AgentIdentity {
            agent_id: "a".into(),
            vm_id: "vm".into(),
            vm_name: "desk".into(),
            os: "Windows".into(),
            agent_version: "1".into(),
            certificate: None,
        })
        .unwrap();
    let tags = |vms: &Vms| {
        vms.get("vm")
            .unwrap()
            .tags
            .keys()
            .copied()
            .collect::<Vec<_>>()
    };

    // The automatic tag stays; `why` says what did not clear it.
    let still_tagged = |vms: &Vms, why: &str| {
        assert_eq!(tags(vms), [SecurityTag::VirusFound], "{why}");
    };
    let full_scan = |vms: &Vms, detections| {
        vms.task_started(&session, "task", TaskKind::FullScan);
        vms.task_finished(&session, "task", TaskKind::FullScan, detections, 0);
    };

    vms.threat_found("vm");
    assert_eq!(tags(&vms), [SecurityTag::VirusFound]);
    vms.task_started(&session, "task", TaskKind::CustomScan);
    vms.task_finished(&session, "task", TaskKind::CustomScan, 0, 0);
    still_tagged(&vms, "only a full scan clears it");
    vms.task_finished(&session, "task", TaskKind::FullScan, 0, 0);
    still_tagged(&vms, "a full scan never seen starting");
    vms.task_started(&session, "task", TaskKind::FullScan);
    vms.task_finished(&session, "another task", TaskKind::FullScan, 0, 0);
    still_tagged(
        &vms,
        "the end of another task than the full scan seen starting",
    );
    full_scan(&vms, 1);
    still_tagged(&vms, "a full scan that found something");
    vms.task_started(&session, "task", TaskKind::FullScan);
    vms.scan_failed("vm");
    vms.task_finished(&session, "task", TaskKind::FullScan, 0, 0);
    still_tagged(&vms, "a full scan with a failed scan");
    vms.task_started(&session, "task", TaskKind::FullScan);
    vms.task_finished(&session, "task", TaskKind::FullScan, 0, 1);
    still_tagged(&vms, "a full scan with a file the agent could not scan");
    vms.task_started(&session, "task", TaskKind::FullScan);
    vms.scan_failed("vm");
    vms.task_started(&session, "task", TaskKind::FullScan);
    vms.task_finished(&session, "task", TaskKind::FullScan, 0, 0);
    still_tagged(
        &vms,
        "a failed scan, then the same full scan reported started again",
    );
    full_scan(&vms, 0);
    assert!(tags(&vms).is_empty());

    // Modifications reported while a full scan runs are not cleared by its
    // end; those reported before are.
    vms.integrity("vm", IntegrityKind::FileModified);
    vms.task_started(&session, "task", TaskKind::FullScan);
    vms.integrity("vm", IntegrityKind::RegistryModified);
    vms.task_finished(&session, "task", TaskKind::FullScan, 0, 0);
    let vm = vms.get("vm").unwrap();
    assert!(!vm.file_modified && vm.registry_modified);
    full_scan(&vms, 0);
    let vm = vms.get("vm").unwrap();
    assert!(!vm.file_modified && !vm.registry_modified);

    // Malware found while a full scan runs is not cleared by its end.
    vms.task_started(&session, "task", TaskKind::FullScan);
    vms.threat_found("vm");
    vms.task_finished(&session, "task", TaskKind::FullScan, 0, 0);
    assert_eq!(tags(&vms), [SecurityTag::VirusFound]);
    full_scan(&vms, 0);
    assert!(tags(&vms).is_empty());

    vms.assign("vm", SecurityTag::VirusFound).unwrap();
    vms.threat_found("vm");
    full_scan(&vms, 0);
    assert_eq!(tags(&vms), [SecurityTag::VirusFound], "a manual tag stays");
    assert!(!vms.assign("vm", SecurityTag::VirusFound).unwrap());
    assert!(vms.remove("vm", SecurityTag::VirusFound).unwrap());
    assert!(vms.assign("vm-unknown", SecurityTag::IdsIps).is_err());

    vms.network_attack("vm");
    full_scan(&vms, 0);
    assert_eq!(tags(&vms), [SecurityTag::IdsIps]);

    // A dropped session is a reason; a closed one is not.
    sessions.close(&session.id, Ending::Dropped);
    let vm = vms.get("vm").unwrap();
    assert_eq!(
        vm.reasons(),
        [VmReason::NoConnectionToSvm, VmReason::NetworkAttack]
    );
    let again = sessions.open(session.agent.clone()).unwrap();
    sessions.close(&again.id, Ending::Closed);
    assert_eq!(vms.get("vm").unwrap().reasons(), [VmReason::NetworkAttack]);

    // Only the session that saw a full scan start can end it.
    let first = sessions.open(session.agent.clone()).unwrap();
    let second = sessions.open(session.agent.clone()).unwrap();
    vms.threat_found("vm");
    vms.task_started(&second, "task", TaskKind::FullScan);
    vms.task_finished(&first, "task", TaskKind::FullScan, 0, 0);
    assert!(tags(&vms).contains(&SecurityTag::VirusFound));
    vms.task_finished(&second, "task", TaskKind::FullScan, 0, 0);
    assert_eq!(tags(&vms), [SecurityTag::IdsIps]);
}

/// `GET /metrics` over plain HTTP/1.1.
async fn scrape(addr: SocketAddr) -> String {
    let response = metrics_request(addr, "GET").await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

/// The response to `method /metrics` over plain HTTP/1.1.
async fn metrics_request(addr: SocketAddr, method: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request =
        format!("{method} /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

/// The metrics listener, often open to other hosts, is bounded: clients
/// that open connections and send nothing take at most
/// `METRICS_CONNECTIONS` of them, for at most `METRICS_CONNECTION_TIME`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_metrics_clients_take_a_few_connections_for_a_few_seconds() {
    use scanserver::metrics::{METRICS_CONNECTION_TIME, METRICS_CONNECTIONS};
    use tokio::io::AsyncReadExt;
    let server = TestServer::start(|config| {
        config.server.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let addr = server.metrics.unwrap();
    let opened = std::time::Instant::now();
    let mut silent = Vec::new();
    for _ in 0..METRICS_CONNECTIONS {
        silent.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    // Accepted in turn: the one beyond them is closed at once.
    let mut beyond = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = [0; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), beyond.read(&mut buf)).await;
    assert_eq!(read.expect("closed at once").unwrap(), 0);
    // The silent ones are closed when their time is up, and scrapes work
    // again.
    for mut connection in silent {
        let read = tokio::time::timeout(METRICS_CONNECTION_TIME * 2, connection.read(&mut buf));
        assert!(matches!(read.await, Ok(Ok(0) | Err(_))), "closed");
    }
    assert!(opened.elapsed() >= METRICS_CONNECTION_TIME);
    assert!(scrape(addr).await.contains("scanserver_scans_total"));
}

/// An admin connection over TCP that makes no call is closed once idle:
/// tools connect for their call, and one that leaks connections (or a
/// local user who opens them) does not keep the places operators need.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_connection_with_no_call_is_closed_once_idle() {
    use scanserver::connections::ADMIN_IDLE;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = TestServer::start(|_| {}).await;
    let scanserver::admin::AdminAddr::Tcp(admin) = &server.admin else {
        panic!("the test server's admin listener is on TCP")
    };
    // Before the connection: the server's idle time runs from when it
    // took it, which a loaded machine may leave well before the preface.
    let opened = std::time::Instant::now();
    let mut idle = tokio::net::TcpStream::connect(admin).await.unwrap();
    idle.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0; 1024];
    let closed = async {
        // The server's own settings come first.
        while matches!(idle.read(&mut buf).await, Ok(n) if n > 0) {}
    };
    tokio::time::timeout(ADMIN_IDLE * 3, closed)
        .await
        .expect("closed once idle");
    assert!(opened.elapsed() >= ADMIN_IDLE);
    // A tool's call goes on as ever.
    let status = server
        .admin_client()
        .await
        .status(scanserver::proto::StatusRequest {})
        .await;
    assert!(status.is_ok(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_scans_verdicts_and_agents() {
    let server = TestServer::start(|config| {
        config.server.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let agent = TestAgent::connect(&server, "vm-m").await;
    assert_eq!(agent.scan(&server, EICAR).await, 1);
    assert_eq!(agent.scan(&server, EICAR).await, 1);
    assert_eq!(agent.scan(&server, b"harmless").await, 0);
    // Hash first: content with no verdict is asked for.
    let unknown = b"asked for";
    let digest = blake3::hash(unknown);
    let begin = begin(&agent.session_id, 1, unknown, Some(digest.as_bytes()));
    let asked = first_reply(&server, vec![begin]).await;
    assert!(
        matches!(asked, file_reply::Kind::SendContent(_)),
        "{asked:?}"
    );

    let refused = metrics_request(server.metrics.unwrap(), "POST").await;
    assert!(refused.starts_with("HTTP/1.1 405"), "{refused}");
    let allow = "\r\nallow: get, head\r\n";
    assert!(refused.to_ascii_lowercase().contains(allow), "{refused}");
    let text = scrape(server.metrics.unwrap()).await;
    for line in [
        "scanserver_scans_total 2",
        "scanserver_verdicts_total{verdict=\"infected\",source=\"scan\"} 1",
        "scanserver_verdicts_total{verdict=\"infected\",source=\"cache\"} 1",
        "scanserver_verdicts_total{verdict=\"clean\",source=\"scan\"} 1",
        "scanserver_scan_duration_seconds_count 2",
        "scanserver_connected_agents 1",
        "scanserver_agent_connections_max 2064",
        "scanserver_agent_connections_refused_total 0",
        "scanserver_spool_bytes 0",
        "scanserver_spool_budget_bytes 17179869184",
        "scanserver_spool_files 0",
        "scanserver_spool_files_max 4096",
        "scanserver_spool_full_total 0",
        "scanserver_stuck_contents 0",
        "scanserver_content_requests_total 1",
        &format!(
            "scanserver_received_bytes_total {}",
            2 * EICAR.len() + b"harmless".len()
        ),
        "scanserver_scan_streams_idle_total 0",
        "scanserver_scan_file_calls 0",
        "scanserver_protected_vms 1",
        "scanserver_cache_entries 2",
        "scanserver_cache_hits_total 1",
        &format!(
            "scanserver_signatures_rules {}",
            server.state.engine.ruleset().rule_count()
        ),
        "scanserver_signatures_update_failed 0",
    ] {
        assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
    }
    assert!(
        text.contains("scanserver_signatures_age_seconds "),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_carry_the_bearer_token() {
    let receiver = TestReceiver::with_token(Some("s3cret"));
    let (svm, stop) = reporting_svm(&receiver, |_| {}).await;
    reports_recorded(&svm, 1).await;
    assert!(receiver.next(Duration::from_millis(200)).await.is_none());
    assert_eq!(
        svm.status().reasons,
        [SvmReason::NoConnectionToIntegrationServer]
    );
    let text = admin::render_status(&scanserver::proto::StatusReply {
        report: Some(svm.report(WhichVms::None)),
        components: svm.components(),
    });
    assert!(text.contains("bearer token"), "{text}");
    drop(stop);

    let token = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token.path(), "s3cret\n").unwrap();
    let (svm, _stop) = reporting_svm(&receiver, |config| {
        config.reporting.token_file = Some(token.path().to_owned());
    })
    .await;
    first_report(&receiver, &svm).await;
    assert_eq!(svm.status().health, Health::Ok);
}

/// The token file is read again before each report: a rotated token is
/// used from the next report on, without a restart; a file that cannot be
/// used then leaves the earlier token in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_token_is_used_without_a_restart() {
    let receiver = TestReceiver::with_token(Some("s3cret"));
    let token = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token.path(), "before\n").unwrap();
    let path = token.path().to_owned();
    let (svm, _stop) = reporting_svm(&receiver, |config| {
        config.reporting.token_file = Some(path);
        config.reporting.interval = Duration::from_secs(2);
    })
    .await;
    reports_recorded(&svm, 1).await;
    assert!(receiver.next(Duration::from_millis(200)).await.is_none());
    std::fs::write(token.path(), "s3cret\n").unwrap();
    let report = receiver.next(Duration::from_secs(10)).await;
    assert!(report.is_some(), "a retry carries the new token");
    std::fs::write(token.path(), "not a token\n").unwrap();
    let report = receiver.next(Duration::from_secs(10)).await;
    assert!(report.is_some(), "the next report carries the token in use");
}

/// A CA's certificate (PEM), and a certificate for `name` it signed,
/// with its key.
fn signed_by_a_new_ca(name: &str) -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec![name.to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

/// Reports go over mutual TLS; when the Integration Server moves to a
/// certificate of another CA, and the SVM's `[reporting.tls]` files are
/// replaced with that CA and a certificate it signed, reports go on
/// without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_go_over_mutual_tls_and_renewed_files_are_used_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str| dir.path().join(name);
    // The SVM's files: the Integration Server's CA, and its own
    // certificate, which the Integration Server's CA signed.
    let issue = || {
        let (ca, server_cert, server_key) = signed_by_a_new_ca("localhost");
        let (svm_ca, svm_cert, svm_key) = signed_by_a_new_ca("svm-1");
        std::fs::write(file("ca.pem"), &ca).unwrap();
        std::fs::write(file("svm.pem"), &svm_cert).unwrap();
        std::fs::write(file("svm.key"), &svm_key).unwrap();
        ServedTls {
            cert: server_cert,
            key: server_key,
            client_ca: Some(svm_ca),
        }
    };
    let mut receiver = TestReceiver::start();
    receiver.stop();
    receiver.tls = Some(issue());
    receiver.listen();
    let url = format!("https://127.0.0.1:{}", receiver.addr.port());
    let (svm, _stop) = reporting_svm_at(url, |config| {
        config.reporting.interval = Duration::from_secs(2);
        config.reporting.tls = Some(scanserver::reporting::ReportingTls {
            ca: file("ca.pem"),
            cert: Some(file("svm.pem")),
            key: Some(file("svm.key")),
            domain: Some("localhost".into()),
        });
    })
    .await;
    first_report(&receiver, &svm).await;

    // Every certificate is renewed, by other CAs.
    receiver.stop();
    receiver.tls = Some(issue());
    receiver.listen();
    let report = receiver.next(Duration::from_secs(15)).await;
    assert!(report.is_some(), "reports go with the renewed files");
    // A CA file caught half written holds no certificate: the files in
    // use stay (tonic would take it as a CA of none, and every report
    // would fail).
    std::fs::write(file("ca.pem"), "").unwrap();
    for _ in 0..2 {
        let report = receiver.next(Duration::from_secs(15)).await;
        assert!(report.is_some(), "reports go with the files in use");
    }
}

/// Asks the reflection service at `addr` for its services, with `token`.
async fn list_services(addr: &str, token: Option<BearerToken>) -> Result<(), tonic::Status> {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ServerReflectionClient::with_interceptor(channel, SendToken(token));
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = client
        .server_reflection_info(tokio_stream::once(request))
        .await?
        .into_inner();
    let reply = replies.message().await?.expect("a reply");
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("expected a list of services, got {reply:?}");
    };
    assert!(
        list.service.iter().any(|s| s.name == "scanserver.v1.Admin"),
        "{list:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_service_asks_for_its_token_when_it_has_one() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, "s3cret\n").unwrap();
    let path = token_file.clone();
    let server = TestServer::start(|config| config.server.admin_token_file = Some(path)).await;
    let addr = server.admin.to_string();

    for token in [None, BearerToken::new("guess")] {
        let mut admin = admin::connect(&addr, token, admin::REQUEST_TIMEOUT)
            .await
            .unwrap();
        let refused = admin
            .status(scanserver::proto::StatusRequest {})
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        assert!(
            refused.message().contains("--admin-token-file"),
            "{refused:?}"
        );
        let request = TagRequest {
            vm_id: "vm-1".into(),
            tag: VIRUS_FOUND.into(),
        };
        let refused = admin.assign_tag(request).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    }
    let token = BearerToken::read(&token_file).unwrap();
    for wrong in [None, BearerToken::new("guess")] {
        let refused = list_services(&addr, wrong).await.unwrap_err();
        assert_eq!(
            refused.code(),
            tonic::Code::Unauthenticated,
            "reflection is behind the token too"
        );
    }
    list_services(&addr, Some(token.clone())).await.unwrap();
    let mut admin = admin::connect(&addr, Some(token), admin::REQUEST_TIMEOUT)
        .await
        .unwrap();
    assert!(
        admin
            .status(scanserver::proto::StatusRequest {})
            .await
            .unwrap()
            .into_inner()
            .report
            .is_some()
    );
    server.stop().await;
}

/// An SVM with no reporter, its engine over the shipped signatures.
fn bare_svm(config: &Config) -> Arc<Svm> {
    let engine = engine_with(shipped_ruleset(), config.engine.clone());
    let vms = Arc::new(Vms::in_memory());
    let metrics = Arc::clone(engine.metrics());
    let sessions = Arc::new(Sessions::new(
        10,
        &config.uploads,
        Arc::clone(&vms),
        metrics,
    ));
    Arc::new(Svm::new(
        config,
        engine,
        sessions,
        vms,
        None,
        Arc::default(),
        Arc::default(),
    ))
}

/// A scan thread busy with one job for over three scan timeouts is stuck:
/// the SVM is Warning while another thread scans, Critical once none does,
/// and OK again once the jobs end. (Local scans of a large file wait on
/// their thread for room in the mapped budget, held here: a real thread,
/// really held.)
#[tokio::test]
async fn stuck_scan_threads_turn_the_svm_warning_then_critical() {
    let mut config = Config::default();
    config.rules.max_age = Duration::from_secs(100 * 365 * 86400);
    config.engine.threads = 2;
    config.engine.scan_timeout = Duration::from_secs(1);
    config.engine.mapped_budget = 1 << 20;
    let svm = bare_svm(&config);
    let engine = Arc::clone(&svm.engine);
    let spooled = Content::Spooled {
        file: tempfile::tempfile().unwrap(),
        size: 1 << 20,
    };
    let room = engine.reserve(&spooled).await;
    let large = tempfile::NamedTempFile::new().unwrap();
    large.as_file().set_len(33 << 20).unwrap();
    let hold_a_thread = || {
        let (engine, path) = (Arc::clone(&engine), large.path().to_owned());
        thread::spawn(move || engine.scan(&ScanJob::file(path)))
    };
    let reasons = || svm.status().reasons;
    let first = hold_a_thread();
    until_read("reasons", reasons, vec![SvmReason::ScanThreadsStuck]).await;
    assert_eq!(svm.status().health, Health::Warning);
    assert_eq!(engine.stuck_threads(), 1);
    let second = hold_a_thread();
    until_read("reasons", reasons, vec![SvmReason::AllScanThreadsStuck]).await;
    assert_eq!(svm.status().health, Health::Critical);
    drop(room);
    // Back from their jobs (a verdict each; under load, scanning 33 MiB
    // may take longer than the 1 s timeout, which does not matter here).
    for held in [first, second] {
        assert!(held.join().is_ok());
    }
    assert_eq!(svm.status().reasons, []);
    assert_eq!(engine.stuck_threads(), 0);
}

/// The status is computed every second (and for each report) while an
/// operator asks for the components, on other threads: neither waits for
/// the other for ever, whatever locks each takes.
#[test]
fn the_status_and_the_components_computed_at_once_do_not_deadlock() {
    let svm = bare_svm(&Config::default());
    let (done, finished) = std::sync::mpsc::channel();
    for components in [false, true] {
        let (svm, done) = (Arc::clone(&svm), done.clone());
        std::thread::spawn(move || {
            for _ in 0..20_000 {
                match components {
                    true => drop(svm.components()),
                    false => svm.refresh(),
                }
            }
            done.send(()).unwrap();
        });
    }
    for _ in 0..2 {
        finished
            .recv_timeout(Duration::from_secs(60))
            .expect("both threads finish");
    }
}
