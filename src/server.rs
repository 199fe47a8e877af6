//! The server: the agent listener (gRPC over TCP, optionally TLS or mutual
//! TLS) with the Protection service, the standard health service and server
//! reflection; the admin listener; the metrics listener; the background
//! tasks (Integration Server reporter, status monitor, infrastructure
//! probe, state keepers, the periodic check of the signatures, systemd's
//! watchdog); SIGHUP,
//! which reads the signatures, the TLS files and the admin token again;
//! and graceful shutdown.
//!
//! Shutdown, on the future given to [`Server::run`] (SIGTERM or Ctrl-C for
//! `scanserver serve`): the health service turns NOT_SERVING, the listeners
//! stop accepting, sessions and Scan streams are told to end, and scans in
//! flight may finish and reply, up to the configured grace period. Then the
//! connections still open are closed, and the verdict cache and the
//! protected VMs are saved.

use std::{future::Future, net::SocketAddr, path::PathBuf, pin::Pin, sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::watch};
use tonic::service::interceptor::InterceptedService;
use tonic_health::{
    ServingStatus,
    pb::health_server::{Health, HealthServer},
    server::HealthReporter,
};
use tower_layer::{Identity, Stack};

use crate::{
    admin::{self, AdminAddr, AdminService, AdminSocket},
    auth::{BearerToken, RequireToken, RequiredToken, TokenError},
    config::Config,
    connections::{self, CallsLayer, Connections},
    engine::Engine,
    files::{OffThread, READ_WAIT},
    intake::{IntakeLayer, MAX_MESSAGE_SIZE},
    metrics, notify,
    proto::{self, admin_server::AdminServer, protection_server_server::ProtectionServerServer},
    reload::Reloader,
    reporting::{Reporter, ReportingError},
    service::{ProtectionService, ServiceState},
    shutdown::{HealthUntilShutdown, shut_down},
    state::StateDir,
    status::{Svm, SvmStatus},
    tls::{Tls, TlsError},
    vms::Vms,
};

/// HTTP/2 flow-control windows. The defaults (64 KiB) throttle an upload
/// to one window per round trip (see BENCHMARKS.md for what larger windows
/// did on loopback); these also bound what a connection whose reader is
/// held back (the scan queue is full) makes the server buffer: 4 MiB per
/// connection. 16 MiB windows were faster, but broke the memory bound. A
/// stream's window is half a MiB short of its connection's: a stream held
/// back (waiting for room in the message budget, or for the scan queue)
/// cannot take the whole connection's window, which would stop the
/// agent's heartbeats on its session stream and end a live session. (Two
/// calls held back at once still can: lightagent holds one at most, its
/// Scan stream, and sends its Lookups and ScanFile calls after.)
const STREAM_WINDOW: u32 = CONNECTION_WINDOW - (512 << 10);
const CONNECTION_WINDOW: u32 = 4 << 20;

/// Largest HTTP/2 frame an agent may send. With the default (16 KiB) a
/// 256 KiB chunk arrives as 16 frames, each handled on its own. (64 KiB
/// frames cost the server a sixth more CPU on large files: see
/// BENCHMARKS.md.)
const MAX_FRAME_SIZE: u32 = 1 << 20;

/// Calls open at once on one agent connection; further ones wait for a
/// place (HTTP/2 flow control). An agent needs a few (Connect, a Scan
/// stream or two, a Lookup); without a limit, one connection could hold a
/// request in each of thousands of calls (see [`crate::intake`]).
const MAX_STREAMS: u32 = 64;

/// How long the connections still open at the end of the grace period are
/// given to close before the last saves are made all the same: closing
/// takes their tasks a moment, not a wait on their peers.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// HTTP/2 pings on every agent connection, and how long an answer may take.
/// A VM switched off or cut from the network sends no FIN or RST: without
/// pings, its connection's Scan streams would keep their open files, and
/// the flights other VMs wait on, until the idle timeout (5 minutes by
/// default). With them, such a connection is closed within half a minute.
/// `lightagent` pings the server likewise.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The agent listener's router: its calls' messages within the intake's
/// budget, and counted on their connections (see [`connections`]).
type AgentRouter =
    tonic::transport::server::Router<Stack<CallsLayer, Stack<IntakeLayer, Identity>>>;

/// Lets the process open as many files as it may, and says at start when
/// that is short of what `max_connections`, `spool_files` and the rest need.
fn allow_open_files(config: &Config) {
    let wanted = (config.server.max_connections() as u64)
        .saturating_add(u64::from(config.uploads.spool_files))
        .saturating_add(connections::OTHER_FILES);
    match connections::raise_open_files() {
        Ok(allowed) if allowed < wanted => tracing::warn!(
            allowed,
            wanted,
            "the process may open fewer files than server.max_connections and uploads.spool_files need: raise its hard limit (LimitNOFILE= in the systemd unit, ulimit -Hn) or lower those settings"
        ),
        Ok(_) => {}
        Err(err) => tracing::warn!("cannot read or raise the open files limit: {err}"),
    }
}

/// Errors starting or running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(
        "cannot listen on {addr}: {source} (is another server running there? use {flag} to pick another address)"
    )]
    Bind {
        addr: SocketAddr,
        flag: &'static str,
        source: std::io::Error,
    },
    #[error(transparent)]
    Reporting(#[from] ReportingError),
    #[error("cannot listen on the admin socket {}: {source} (--admin-listen, server.admin_listen)", path.display())]
    AdminSocket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--admin-token-file / server.admin_token_file: {0}")]
    AdminToken(#[from] TokenError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot prepare the spool folder {}: {source} (use --spool-dir to pick another)", path.display())]
    Spool {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the state folder {}: {source} (use --state-dir to pick another)", path.display())]
    State {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// A bound, not yet running server.
pub struct Server {
    state: Arc<ServiceState>,
    svm: Arc<Svm>,
    reloader: Arc<Reloader>,
    reporter: Option<Reporter>,
    probe_interval: std::time::Duration,
    listener: TcpListener,
    /// Taken when the server runs.
    admin: Option<AdminListener>,
    admin_token: AdminToken,
    metrics: Option<TcpListener>,
    tls: Option<Arc<Tls>>,
    shutdown: watch::Sender<bool>,
    grace: std::time::Duration,
    state_dir: StateDir,
    snapshot_interval: std::time::Duration,
}

impl Server {
    /// Binds the agent, admin and (when configured) metrics listeners, and
    /// prepares the service around `engine`.
    pub async fn bind(config: &Config, engine: Arc<Engine>) -> Result<Server, ServerError> {
        allow_open_files(config);
        // The files the settings name are read before anything is bound:
        // unusable ones stop the server, naming the files, and leave
        // nothing behind (an admin socket's folder, say).
        let tls = config
            .tls
            .as_ref()
            .map(Tls::load)
            .transpose()?
            .map(Arc::new);
        let admin_token = AdminToken {
            file: config.server.admin_token_file.clone(),
            required: RequiredToken::new(
                (config.server.admin_token_file.as_deref())
                    .map(BearerToken::read)
                    .transpose()?,
            ),
        };
        let (listener, admin, metrics) = Self::bind_listeners(config).await?;
        // Without a token, the settings were refused (`Config::validate`).
        if let AdminAddr::Tcp(addr) = config.server.admin_listen
            && !addr.ip().is_loopback()
            && admin_token.file.is_some()
        {
            tracing::warn!(
                %addr,
                "the admin listener is reachable from other hosts without TLS: its token crosses the network in clear (keep it on loopback, and reach it through SSH)"
            );
        }
        let (state_dir, vms) = Self::open_state(config, &engine)?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let state =
            ServiceState::new(engine, config, Arc::clone(&vms), shutdown_rx).map_err(|source| {
                ServerError::Spool {
                    path: config.spool_dir(),
                    source,
                }
            })?;
        let state = Arc::new(state);
        // What agents are told, and the status shows, is the address bound
        // (the kernel's pick, for a port of 0).
        let mut bound = config.clone();
        if let Ok(addr) = listener.local_addr() {
            bound.server.listen = addr;
        }
        let svm = Arc::new(Svm::new(
            &bound,
            Arc::clone(&state.engine),
            Arc::clone(&state.sessions),
            vms,
            tls.clone(),
            Arc::clone(state_dir.unsaved()),
            state.uploads.spool_refusals(),
        ));
        let reloader = Arc::new(Reloader::new(
            &config.rules,
            Arc::clone(&state),
            Arc::clone(&svm),
        ));
        Ok(Server {
            state,
            reloader,
            reporter: Reporter::new(&config.reporting, Arc::clone(&svm))?,
            svm,
            probe_interval: config.reporting.interval,
            listener,
            admin: Some(admin),
            admin_token,
            metrics,
            tls,
            shutdown,
            grace: config.server.shutdown_grace,
            state_dir,
            snapshot_interval: config.server.snapshot_interval,
        })
    }

    /// The listeners the settings name, bound: the agents', the admin
    /// service's and, if any, the metrics'.
    async fn bind_listeners(
        config: &Config,
    ) -> Result<(TcpListener, AdminListener, Option<TcpListener>), ServerError> {
        let listener = bind(config.server.listen, "--listen").await?;
        let admin = match &config.server.admin_listen {
            AdminAddr::Tcp(addr) => AdminListener::Tcp(bind(*addr, "--admin-listen").await?),
            AdminAddr::Unix(path) => {
                AdminListener::Unix(AdminSocket::bind(path).map_err(|source| {
                    ServerError::AdminSocket {
                        path: path.clone(),
                        source,
                    }
                })?)
            }
        };
        let metrics = match config.server.metrics_listen {
            Some(addr) => Some(bind(addr, "--metrics-listen").await?),
            None => None,
        };
        Ok((listener, admin, metrics))
    }

    /// The state folder, opened, with what earlier runs left there: the
    /// cache's snapshot (loaded into `engine`), the contents that stuck a
    /// scan thread (refused by `engine`), the VMs protected.
    fn open_state(config: &Config, engine: &Engine) -> Result<(StateDir, Arc<Vms>), ServerError> {
        let path = config.server.state_dir();
        let state_dir =
            StateDir::open(&path).map_err(|source| ServerError::State { path, source })?;
        state_dir.restore_cache(engine);
        let stuck = engine.keep_stuck_contents_in(state_dir.path());
        match stuck.map_err(|source| ServerError::State {
            path: state_dir.path().join(crate::engine::STUCK_CONTENTS_FILE),
            source,
        })? {
            0 => {}
            refused => tracing::warn!(
                refused,
                "contents that stuck a scan thread in an earlier run are refused"
            ),
        }
        let vms = Vms::open(state_dir.path()).map_err(|source| ServerError::State {
            path: state_dir.path().join(crate::vms::FILE_NAME),
            source,
        })?;
        Ok((state_dir, Arc::new(vms)))
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The address the admin listener is bound to.
    pub fn admin_addr(&self) -> AdminAddr {
        match self
            .admin
            .as_ref()
            .expect("admin_addr is for a server that does not run yet")
        {
            AdminListener::Tcp(listener) => AdminAddr::Tcp(
                listener
                    .local_addr()
                    .expect("a bound listener has an address"),
            ),
            AdminListener::Unix(socket) => AdminAddr::Unix(socket.file.path().to_owned()),
        }
    }

    /// The address the metrics listener is bound to, if any.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The service's shared state (sessions, counters, engine).
    pub fn state(&self) -> &Arc<ServiceState> {
        &self.state
    }

    /// What the server knows of itself (status, VMs, load).
    pub fn svm(&self) -> &Arc<Svm> {
        &self.svm
    }

    /// What reloads its signatures.
    pub fn reloader(&self) -> &Arc<Reloader> {
        &self.reloader
    }

    /// The agent listener's TLS, if it has TLS.
    pub fn tls(&self) -> Option<&Arc<Tls>> {
        self.tls.as_ref()
    }

    /// Reads the TLS files, the admin token and the signatures once (for
    /// an update that finished while the server started, when `scanserver
    /// serve` ignores SIGHUP), then again on every SIGHUP, until shutdown
    /// begins (the server is stopping: new files would serve no one). The
    /// TLS and token files are read at once, within [`READ_WAIT`] (a file
    /// read later is used once read); the signatures by a task of their
    /// own, so that a SIGHUP while they compile does not wait for them,
    /// and the SIGHUPs that come meanwhile make one more reload, not one
    /// each. Outcomes are logged, and failures shown in the SVM's status.
    ///
    /// The handler is installed when this is called, not when the future
    /// is first polled, so that no SIGHUP after `READY=1` is lost. The
    /// service manager is told `RELOADING=1` on each SIGHUP and `READY=1`
    /// once the last reload asked for is over, whatever its outcome (the
    /// server serves on with the signatures it has): with
    /// `Type=notify-reload`, `systemctl reload` waits for the new
    /// signatures.
    pub fn reload_on_hangup(&self) -> impl Future<Output = ()> + Send + 'static {
        use tokio::signal::unix::{SignalKind, signal};
        let reloader = Arc::clone(&self.reloader);
        let mut files = HangupFiles {
            tls: self.tls.clone(),
            svm: Arc::clone(&self.svm),
            admin_token: self.admin_token.clone(),
            tls_reading: OffThread::default(),
            token_reading: OffThread::default(),
        };
        let mut shutdown = self.shutdown.subscribe();
        let hangups = signal(SignalKind::hangup());
        async move {
            let mut hangups = match hangups {
                Ok(hangups) => hangups,
                Err(err) => {
                    tracing::warn!(
                        "SIGHUP will not reload the signatures, the TLS files and the admin token: {err}"
                    );
                    return;
                }
            };
            // (Both were read as the server bound its listeners: what
            // changed since is read now.)
            files.read_again().await;
            // The SIGHUPs so far: the reload task reloads once at start,
            // then once for all those counted since its last reload began.
            let (counted, count) = watch::channel(0u64);
            tokio::spawn(reload_when_asked(reloader, count, shutdown.clone()));
            loop {
                tokio::select! {
                    biased;
                    () = shut_down(&mut shutdown) => return,
                    hangup = hangups.recv() => if hangup.is_none() { return },
                }
                tracing::info!(
                    "SIGHUP: reading the signatures, the TLS files and the admin token again"
                );
                // The TLS and token files first: the READY=1 that answers
                // this SIGHUP's RELOADING=1 comes after they are read (or
                // given up on).
                // Under the count's lock, the reload task cannot tell the
                // manager READY=1 between this RELOADING=1 and the count
                // that makes it reload once more.
                files.read_again().await;
                counted.send_modify(|count| {
                    notify::reloading();
                    *count += 1;
                });
            }
        }
    }

    /// Serves until `signal` resolves, then shuts down gracefully.
    pub async fn run(
        mut self,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let reporting = self.spawn_side_tasks();
        let health = ServingHealth::default();
        health.set(ServingStatus::Serving).await;
        tokio::spawn(follow_health(
            health.clone(),
            self.svm.changes(),
            self.shutdown.subscribe(),
        ));
        let health_service = HealthServer::new(HealthUntilShutdown::new(
            tonic_health::server::HealthService::from_health_reporter(health.reporter.clone()),
            self.shutdown.subscribe(),
        ));
        let router = self.agent_router(health_service)?;
        // The listeners are bound and the signatures loaded: connections
        // made from now on are served.
        notify::notify(&format!(
            "READY=1\nSTATUS=serving agents on {} with {} rules",
            self.local_addr(),
            self.state.engine.ruleset().rule_count()
        ));
        let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel();
        // The keepers make their last saves once serving is over, grace
        // period included: scans finishing in it change the cache and tags.
        let (served, served_rx) = watch::channel(false);
        // The state folder stays locked until both keepers are done.
        let state_dir = self.state_dir;
        let keeper = tokio::spawn(state_dir.clone().keep_cache(
            Arc::clone(&self.state.engine),
            self.snapshot_interval,
            served_rx.clone(),
        ));
        let vms_keeper = tokio::spawn(state_dir.clone().keep_vms(
            Arc::clone(&self.svm.vms),
            self.snapshot_interval,
            crate::vms::RECONNECT_GRACE,
            served_rx,
        ));
        let shutdown = self.shutdown;
        let svm = Arc::clone(&self.svm);
        let stop_accepting = async move {
            signal.await;
            // Listened for at once: a second signal that comes while the
            // first is being handled ends the grace period too.
            let second: SecondSignal = Box::pin(termination_signal());
            svm.begin_shutdown();
            tracing::info!("shutting down: no new connections, finishing scans in flight");
            notify::notify("STOPPING=1\nSTATUS=shutting down: finishing scans in flight");
            health.set(ServingStatus::NotServing).await;
            let _ = shutdown.send(true);
            let _ = signalled_tx.send(second);
        };
        let connections = Arc::clone(&self.svm.connections);
        let serve: Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>> =
            match self.tls {
                Some(tls) => Box::pin(router.serve_with_incoming_shutdown(
                    tls.incoming(self.listener, connections),
                    stop_accepting,
                )),
                None => Box::pin(router.serve_with_incoming_shutdown(
                    connections.incoming(self.listener),
                    stop_accepting,
                )),
            };
        let deadline = end_of_grace(signalled_rx, self.grace, Arc::clone(&self.svm.connections));
        let served_result = tokio::select! {
            result = serve => result,
            () = deadline => Ok(()),
        };
        // The keepers make their last save even when serving failed.
        let _ = served.send(true);
        let _ = keeper.await;
        let _ = vms_keeper.await;
        drop(state_dir);
        // The last report, sent when shutdown began, within its timeout.
        if let Some(reporting) = reporting {
            let _ = reporting.await;
        }
        served_result?;
        let stats = self.state.engine.cache().stats();
        tracing::info!(
            entries = stats.entries,
            hits = stats.hits,
            misses = stats.misses,
            coalesced = stats.coalesced_waits,
            saved = stats.persisted,
            "verdict cache at shutdown"
        );
        Ok(())
    }
}

impl Server {
    /// The agent listener's services (Protection, health and reflection),
    /// on HTTP/2 settings made for uploads, their calls' messages within
    /// one budget (see [`crate::intake`]).
    fn agent_router(&self, health: HealthServer<impl Health>) -> Result<AgentRouter, ServerError> {
        // The descriptors hold every service of the package; agents are shown
        // only what this listener serves.
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("scanserver.v1.ProtectionServer")
            .with_service_name("grpc.health.v1.Health")
            .build_v1()?;
        let service = ProtectionServerServer::new(ProtectionService::new(Arc::clone(&self.state)))
            .max_decoding_message_size(MAX_MESSAGE_SIZE);
        Ok(tonic::transport::Server::builder()
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME_SIZE)
            .max_concurrent_streams(Some(MAX_STREAMS))
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
            .layer(self.state.intake.clone())
            .layer(self.svm.connections.calls_layer())
            .add_service(health)
            .add_service(reflection)
            .add_service(service))
    }

    /// Starts what runs beside the agent listener, each until shutdown:
    /// the status monitor, the infrastructure probe, the reporter (whose
    /// task, which ends with the last report, is returned), the periodic
    /// checks of the signatures and TLS files, and the admin and metrics
    /// listeners; and systemd's watchdog, fed until the runtime ends.
    fn spawn_side_tasks(&mut self) -> Option<tokio::task::JoinHandle<()>> {
        let down = || {
            let mut shutdown = self.shutdown.subscribe();
            async move { shut_down(&mut shutdown).await }
        };
        tokio::spawn(Arc::clone(&self.svm).monitor(self.shutdown.subscribe()));
        if let Some(interval) = notify::watchdog_interval() {
            tokio::spawn(notify::feed_watchdog(Arc::clone(&self.svm), interval));
        }
        tokio::spawn(
            Arc::clone(&self.svm).keep_probing(self.probe_interval, self.shutdown.subscribe()),
        );
        let reporting = (self.reporter.take())
            .map(|reporter| tokio::spawn(reporter.run(self.shutdown.subscribe())));
        tokio::spawn(Arc::clone(&self.reloader).keep_checking(self.shutdown.subscribe()));
        if let Some(tls) = &self.tls {
            tokio::spawn(
                Arc::clone(tls).keep_checking(Arc::clone(&self.svm), self.shutdown.subscribe()),
            );
        }
        if let Some(listener) = self.admin.take() {
            // Every request on the admin listener needs the token, when
            // there is one: reflection too, though it tells only the schema.
            let token = RequireToken {
                token: self.admin_token.required.clone(),
                hint: admin::TOKEN_HINT,
            };
            let reflection = tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
                .with_service_name("scanserver.v1.Admin")
                .build_v1()
                .inspect_err(|err| tracing::warn!("admin listener without reflection: {err}"))
                .ok()
                .map(|reflection| {
                    let reflection =
                        reflection.max_decoding_message_size(admin::ADMIN_REQUEST_BYTES);
                    InterceptedService::new(reflection, token.clone())
                });
            // Bounded as agent connections are (see `connections`), closed
            // once idle, and pinged: a tool gone without a word lets go of
            // its place.
            let connections = Arc::new(connections::Connections::admin());
            let router = tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
                .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
                .max_concurrent_streams(Some(admin::ADMIN_STREAMS))
                .layer(connections.calls_layer())
                .add_service(InterceptedService::new(
                    AdminServer::new(AdminService::new(
                        Arc::clone(&self.svm),
                        Arc::clone(&self.reloader),
                    ))
                    .max_decoding_message_size(admin::ADMIN_REQUEST_BYTES),
                    token,
                ))
                .add_optional_service(reflection);
            let (serve, socket_file): (AdminServing, _) = match listener {
                AdminListener::Tcp(listener) => {
                    let incoming = connections.incoming(listener);
                    let serving = router.serve_with_incoming_shutdown(incoming, down());
                    (Box::pin(serving), None)
                }
                AdminListener::Unix(AdminSocket { listener, file }) => {
                    let incoming = connections.incoming(listener);
                    let serving = router.serve_with_incoming_shutdown(incoming, down());
                    (Box::pin(serving), Some(file))
                }
            };
            tokio::spawn(async move {
                if let Err(err) = serve.await {
                    tracing::error!("the admin listener failed: {err}");
                }
                // The socket's file goes when its listener has stopped.
                drop(socket_file);
            });
        }
        if let Some(listener) = self.metrics.take() {
            let registry = metrics::registry(Arc::clone(&self.svm), Arc::clone(&self.state));
            tokio::spawn(metrics::serve(listener, registry, down()));
        }
        reporting
    }
}

/// Reloads the signatures each time `asked` is notified, until shutdown.
/// Reloads the signatures once at start, then once for all the SIGHUPs
/// counted (in `hangups`) since the last reload began, until shutdown.
/// Once a reload asked for by SIGHUP is over and no other is due, the
/// service manager hears READY=1 (the reload at start tells it nothing:
/// [`Server::run`] says READY=1 once serving).
async fn reload_when_asked(
    reloader: Arc<Reloader>,
    mut hangups: watch::Receiver<u64>,
    mut shutdown: watch::Receiver<bool>,
) {
    hangups.mark_changed();
    loop {
        tokio::select! {
            biased;
            () = shut_down(&mut shutdown) => return,
            changed = hangups.changed() => if changed.is_err() { return },
        }
        let asked = *hangups.borrow_and_update();
        // Outcomes are logged, and failures shown in the status.
        let _ = reloader.reload().await;
        // Under the count's lock (see `reload_on_hangup`). A SIGHUP counted
        // meanwhile makes one more reload first; once shutdown has begun,
        // the manager was told STOPPING=1.
        let count = hangups.borrow();
        if asked > 0 && *count == asked && !*shutdown.borrow() {
            notify::notify("READY=1\nSTATUS=serving agents");
        }
    }
}

/// The admin service's listener (see [`AdminAddr`]).
enum AdminListener {
    Tcp(TcpListener),
    Unix(AdminSocket),
}

/// The token the admin service asks for, and the file it is read from
/// again on SIGHUP: a rotated token is asked for without a restart (which
/// would end every agent's session).
#[derive(Clone)]
struct AdminToken {
    file: Option<PathBuf>,
    required: RequiredToken,
}

impl AdminToken {
    /// Reads the file again, if there is one: the admin service asks for
    /// its token from now on. A file that cannot be used leaves the
    /// earlier token asked for, with an error in the log. Blocking.
    fn read_file(&self) {
        let Some(file) = &self.file else {
            return;
        };
        match BearerToken::read(file) {
            Ok(token) => {
                if self.required.replace(token) {
                    tracing::info!(
                        "admin token read again: the admin service asks for the new one"
                    );
                }
            }
            Err(err) => tracing::error!(
                "admin token not read again, the admin service asks for the earlier one: {err}"
            ),
        }
    }
}

/// The files a SIGHUP has the server read again, besides the signatures:
/// the agent listener's TLS files and the admin token file, each read on
/// its own (a share that hangs holds up the reads of its files alone).
struct HangupFiles {
    tls: Option<Arc<Tls>>,
    svm: Arc<Svm>,
    admin_token: AdminToken,
    tls_reading: OffThread<()>,
    token_reading: OffThread<()>,
}

impl HangupFiles {
    /// Reads the files again, each on a blocking thread, waiting up to
    /// [`READ_WAIT`]: a file on a share that hangs must not hold up the
    /// signatures' reload, nor keep the service manager told the server
    /// reloads. Files read later than that are used once read; until then,
    /// SIGHUPs do not read them again (the log says so).
    async fn read_again(&mut self) {
        let HangupFiles {
            tls,
            svm,
            admin_token,
            tls_reading,
            token_reading,
        } = self;
        let tls = tls.clone().map(|tls| {
            let svm = Arc::clone(svm);
            move || tls.reload_and_report(&svm)
        });
        let token = admin_token.clone();
        let (tls_read, token_read) = tokio::join!(
            async {
                match tls {
                    Some(read) => tls_reading.read(READ_WAIT, read).await,
                    None => Ok(()),
                }
            },
            token_reading.read(READ_WAIT, move || token.read_file()),
        );
        for (what, read) in [("TLS files", tls_read), ("admin token", token_read)] {
            if let Err(err) = read {
                tracing::error!("{what} not read again on this SIGHUP: {err}");
            }
        }
    }
}

/// A second signal, listened for once shutdown began.
type SecondSignal = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Resolves when the shutdown's grace period is over, once `signalled`
/// tells shutdown began: after `grace`, or at once on a second SIGTERM or
/// Ctrl-C (the first took their default actions away), having closed the
/// `connections` still open. The last saves are made all the same.
async fn end_of_grace(
    signalled: tokio::sync::oneshot::Receiver<SecondSignal>,
    grace: Duration,
    connections: Arc<Connections>,
) {
    let Ok(second) = signalled.await else {
        return std::future::pending::<()>().await;
    };
    tokio::select! {
        () = tokio::time::sleep(grace) => {
            tracing::warn!(
                ?grace,
                open = connections.open(),
                "shutdown grace period over; closing the connections still open, then making the last saves"
            );
        }
        () = second => {
            tracing::warn!(
                open = connections.open(),
                "second signal: closing the connections still open, then making the last saves"
            );
        }
    }
    // tonic leaves each connection to a task of its own, which would go on
    // answering until the process exits: closed first, nothing is
    // answered that the saves do not hold.
    if tokio::time::timeout(CLOSE_WAIT, connections.close_all())
        .await
        .is_err()
    {
        tracing::warn!(
            open = connections.open(),
            "connections not closed within {CLOSE_WAIT:?}; making the last saves all the same"
        );
    }
}

/// The admin service, serving on either kind of listener until shutdown.
type AdminServing = Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>>;

async fn bind(addr: SocketAddr, flag: &'static str) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, flag, source })
}

/// Resolves on SIGTERM or Ctrl-C (SIGINT). (SIGHUP reads the signatures
/// and TLS files again: see [`Server::reload_on_hangup`].) The handlers
/// are installed when this is called, within a runtime, not when the
/// future is first polled: a SIGTERM that comes once the server has told
/// systemd it is ready must shut it down gracefully, never kill it.
pub fn termination_signal() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{Signal, SignalKind, signal};
    let received = |installed: std::io::Result<Signal>| async move {
        match installed {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    let term = received(signal(SignalKind::terminate()));
    let interrupt = received(signal(SignalKind::interrupt()));
    async move {
        tokio::select! {
            () = term => {},
            () = interrupt => {},
        }
    }
}

/// The gRPC health of the agent service and of the server as a whole (the
/// name "", which stock probes ask for), set by the server as it starts,
/// as its status stops or allows scans, and as it shuts down: each change
/// told once. (tonic-health tells watchers of every status set, the same as
/// theirs too; shutdown sets NOT_SERVING as the SVM's status turns
/// SHUTTING_DOWN, and a Watch was told NOT_SERVING twice.)
#[derive(Clone, Default)]
struct ServingHealth {
    reporter: HealthReporter,
    /// The status set last; sets take turns.
    last: Arc<tokio::sync::Mutex<Option<ServingStatus>>>,
}

impl ServingHealth {
    /// Sets `status` for the Protection service and the server as a
    /// whole, unless it is theirs already.
    async fn set(&self, status: ServingStatus) {
        let mut last = self.last.lock().await;
        if *last == Some(status) {
            return;
        }
        *last = Some(status);
        let service = proto::protection_server_server::SERVICE_NAME;
        self.reporter.set_service_status(service, status).await;
        self.reporter.set_service_status("", status).await;
    }
}

/// Keeps the gRPC health of the agent service and of the server as a
/// whole in step with the SVM's status: NOT_SERVING while a reason stops its scans (see
/// [`crate::proto::SvmReason::stops_scans`]), so that load balancers and
/// probes send agents elsewhere, as reports to the Integration Server do.
async fn follow_health(
    health: ServingHealth,
    mut changes: watch::Receiver<SvmStatus>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let stopped = (changes.borrow_and_update().reasons.iter()).any(|r| r.stops_scans());
        let status = match stopped {
            false => ServingStatus::Serving,
            true => ServingStatus::NotServing,
        };
        // Set only if it differs from the health's (see `ServingHealth`).
        health.set(status).await;
        // A change first: shutdown publishes SHUTTING_DOWN before it
        // stops serving, and a SERVING being set as it began must be
        // followed by NOT_SERVING, not left last.
        tokio::select! {
            biased;
            changed = changes.changed() => if changed.is_err() { return },
            () = shut_down(&mut shutdown) => return,
        }
    }
}
