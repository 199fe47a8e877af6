//! The SVM's status and the figures about it that reports, `scanserver
//! status` and `/metrics` share.
//!
//! [`Svm`] gathers what the server knows of itself: the engine, the
//! connected agents and whether their listener accepts connections, the
//! protected VMs, the Integration Server reporter's
//! last result, the infrastructure probe's, the outcomes of the last
//! reloads of the signatures and TLS files, the TLS certificate's validity,
//! and the load over the last minute (sampled every second by [`Svm::monitor`]). Its status is
//! computed from those, never stored: OK, or as bad as the worst
//! [`SvmReason`] in force. Every change of status is published
//! ([`Svm::changes`]) so the reporter can tell the Integration Server at
//! once.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use parking_lot::Mutex;
use serde::Deserialize;
use tokio::sync::watch;

use crate::{
    config::Config,
    connections::Connections,
    engine::Engine,
    proto::{
        CacheStatistics, Component, ComponentState, Health, Load, SignaturesInfo, SvmIdentity,
        SvmReason, SvmReport, VmInfo,
    },
    sessions::Sessions,
    shutdown::{Periodic, shut_down},
    signatures::Ruleset,
    state::Unsaved,
    tls::{Tls, Validity},
    vms::{VmRecord, Vms, unix_ms},
};

/// The `[infrastructure]` table: where the SVM sits in the virtual
/// infrastructure.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InfrastructureConfig {
    pub datacenter: String,
    pub cluster: String,
    /// Hypervisor labels, passed on in reports as they are.
    pub labels: HashMap<String, String>,
    /// The infrastructure's endpoint (`host:port`, say the vCenter or the
    /// NSX Manager), probed with a TCP connect every report interval; the
    /// SVM is Critical while it does not answer. Unset: not probed.
    pub endpoint: Option<String>,
}

/// How long a probe's TCP connect may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long after a failed attempt the probe tries once more before it
/// counts the infrastructure unreachable: a connection lost to one blip
/// would otherwise make the SVM Critical, and turn agents away from it,
/// until the next probe.
pub const PROBE_CONFIRM: Duration = Duration::from_secs(2);

/// How often the infrastructure is probed while it is unreachable (or
/// every report interval, if shorter): its return shows within this, not
/// a report interval later.
pub const PROBE_RETRY: Duration = Duration::from_secs(10);

/// How long the scan queue must stay full to count as saturated, and the
/// window load figures are averaged over.
pub const LOAD_WINDOW: Duration = Duration::from_secs(60);

/// How long before the agent listener's certificate expires the SVM turns
/// Warning (CERTIFICATE_EXPIRES_SOON).
pub const CERTIFICATE_NOTICE: Duration = Duration::from_secs(14 * 86400);

/// The SVM's status: OK, or the worst of its reasons.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvmStatus {
    pub health: Health,
    pub reasons: Vec<SvmReason>,
}

impl SvmStatus {
    /// The status these reasons make.
    pub fn of(reasons: Vec<SvmReason>) -> Self {
        SvmStatus {
            health: worst(reasons.iter().map(|r| r.health())),
            reasons,
        }
    }
}

/// The worst of some healths; OK when there are none.
pub fn worst(healths: impl IntoIterator<Item = Health>) -> Health {
    healths
        .into_iter()
        .max_by_key(|h| *h as i32)
        .unwrap_or(Health::Ok)
}

impl SvmReason {
    /// The reason in words, as `scanserver status` prints it and the README
    /// lists it.
    pub fn describe(self) -> &'static str {
        match self {
            SvmReason::NoSignatures => "no signatures loaded",
            SvmReason::InfrastructureUnreachable => "virtual infrastructure unreachable",
            SvmReason::NoConnectionToIntegrationServer => "no connection to the Integration Server",
            SvmReason::SignaturesOutdated => "signatures outdated",
            SvmReason::ScanQueueSaturated => "scan queue saturated",
            SvmReason::SignaturesUpdateFailed => "signatures update failed",
            SvmReason::TlsUpdateFailed => "TLS update failed",
            SvmReason::CertificateExpiresSoon => "TLS certificate expires soon",
            SvmReason::CertificateExpired => "TLS certificate expired",
            SvmReason::CertificateNotYetValid => "TLS certificate not yet valid",
            SvmReason::ShuttingDown => "shutting down",
            SvmReason::ScanThreadsStuck => "scan threads stuck",
            SvmReason::AllScanThreadsStuck => "all scan threads stuck",
            SvmReason::StateNotSaved => "state not saved",
            SvmReason::ConnectionsNotAccepted => "agent connections not accepted",
            SvmReason::SpoolFull => "spool full",
            SvmReason::ScansTimingOut => "scans timing out",
            SvmReason::Unspecified => "unspecified",
        }
    }

    /// Whether the reason stops the SVM scanning for its agents (its gRPC
    /// health is NOT_SERVING while one holds): no rules to scan with, no
    /// scan thread free, a certificate agents refuse, or shutdown.
    pub fn stops_scans(self) -> bool {
        matches!(
            self,
            SvmReason::NoSignatures
                | SvmReason::CertificateExpired
                | SvmReason::CertificateNotYetValid
                | SvmReason::ShuttingDown
                | SvmReason::AllScanThreadsStuck
        )
    }

    /// How bad the reason is.
    pub fn health(self) -> Health {
        match self {
            SvmReason::NoSignatures
            | SvmReason::InfrastructureUnreachable
            | SvmReason::CertificateExpired
            | SvmReason::CertificateNotYetValid
            | SvmReason::ShuttingDown
            | SvmReason::AllScanThreadsStuck
            | SvmReason::ConnectionsNotAccepted => Health::Critical,
            SvmReason::NoConnectionToIntegrationServer
            | SvmReason::SignaturesOutdated
            | SvmReason::ScanQueueSaturated
            | SvmReason::ScanThreadsStuck
            | SvmReason::SignaturesUpdateFailed
            | SvmReason::TlsUpdateFailed
            | SvmReason::CertificateExpiresSoon
            | SvmReason::StateNotSaved
            | SvmReason::SpoolFull
            | SvmReason::ScansTimingOut
            | SvmReason::Unspecified => Health::Warning,
        }
    }
}

/// What the last attempt of a remote check (a report, a probe) found.
#[derive(Debug, Clone, Default)]
pub struct Reach {
    /// Configured at all.
    pub enabled: bool,
    /// `None` before the first attempt.
    pub reachable: Option<bool>,
    /// What went wrong at the last attempt, if it failed.
    pub error: Option<String>,
}

impl Reach {
    fn unreachable(&self) -> bool {
        self.enabled && self.reachable == Some(false)
    }
}

/// Who the SVM is, from the configuration.
#[derive(Debug, Clone)]
struct Identity {
    svm_id: String,
    name: String,
    addresses: Vec<String>,
    connection_tags: Vec<String>,
    infrastructure: InfrastructureConfig,
    listen: SocketAddr,
    encrypted: bool,
}

/// Which VMs a report lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhichVms {
    /// None: the SVM's own figures only (`scanserver status`).
    None,
    /// Connected ones, those not OK or tagged, and those awaited back
    /// (connected when the server stopped): what the Integration Server
    /// needs. (A report made as the server stops lists each VM connected
    /// then, whether its session has closed yet or not.)
    Notable,
    /// Every VM kept: those seen in the last 30 days, and tagged ones of
    /// any age.
    All,
}

/// What the server knows of itself. Shared behind an [`Arc`].
pub struct Svm {
    pub engine: Arc<Engine>,
    pub sessions: Arc<Sessions>,
    pub vms: Arc<Vms>,
    /// The agent listener's connections.
    pub connections: Arc<Connections>,
    identity: Identity,
    started: Instant,
    signatures_max_age: Duration,
    reporter: Mutex<Reach>,
    probe: Mutex<Reach>,
    load: Mutex<LoadMeter>,
    /// Why the last reload of the signatures failed, until one succeeds.
    signatures_update: Mutex<Option<String>>,
    /// Why the last reload of the agent listener's TLS files failed, until
    /// one succeeds.
    tls_update: Mutex<Option<String>>,
    /// The agent listener's TLS, if it has TLS.
    tls: Option<Arc<Tls>>,
    /// The state folder's files whose last save failed.
    unsaved: Arc<Unsaved>,
    /// Uploads the spool refused for want of room, since start (see
    /// `UploadStore::spool_refusals`).
    spool_refusals: Arc<AtomicU64>,
    /// Set once shutdown has begun.
    shutting_down: AtomicBool,
    status: watch::Sender<SvmStatus>,
}

impl Svm {
    pub fn new(
        config: &Config,
        engine: Arc<Engine>,
        sessions: Arc<Sessions>,
        vms: Arc<Vms>,
        tls: Option<Arc<Tls>>,
        unsaved: Arc<Unsaved>,
        spool_refusals: Arc<AtomicU64>,
    ) -> Self {
        let server = &config.server;
        let identity = Identity {
            svm_id: server.svm_id.clone(),
            name: server.name.clone().unwrap_or_else(|| server.svm_id.clone()),
            addresses: server.addresses(),
            connection_tags: server.allowed_tags.clone(),
            infrastructure: config.infrastructure.clone(),
            listen: server.listen,
            encrypted: config.tls.is_some(),
        };
        let enabled = |enabled| {
            Mutex::new(Reach {
                enabled,
                ..Reach::default()
            })
        };
        let svm = Svm {
            engine,
            sessions,
            vms,
            connections: Arc::new(Connections::new(
                server.max_connections(),
                server.max_connections_per_address(),
                server.idle_timeout,
            )),
            started: Instant::now(),
            signatures_max_age: config.rules.max_age,
            reporter: enabled(config.reporting.integration_server.is_some()),
            probe: enabled(config.infrastructure.endpoint.is_some()),
            load: Mutex::new(LoadMeter::default()),
            signatures_update: Mutex::new(None),
            tls_update: Mutex::new(None),
            tls,
            unsaved,
            spool_refusals,
            shutting_down: AtomicBool::new(false),
            status: watch::channel(SvmStatus::of(Vec::new())).0,
            identity,
        };
        svm.refresh();
        svm
    }

    /// The status now.
    pub fn status(&self) -> SvmStatus {
        self.status_with(self.engine.stuck_threads())
    }

    /// The status now, with `stuck` scan threads (read once by a caller
    /// that shows the count beside the status).
    fn status_with(&self, stuck: usize) -> SvmStatus {
        let ruleset = self.engine.ruleset();
        let now = SystemTime::now();
        let certificate = self.certificate_validity();
        let certificate_left = certificate.map(|valid| {
            valid
                .not_after
                .duration_since(now)
                .unwrap_or(Duration::ZERO)
        });
        // One lock at a time, each let go before the next is taken (a
        // guard in the array below would live until it is built): no order
        // of taking them to keep in step with other code.
        let probe_unreachable = self.probe.lock().unreachable();
        let reporter_unreachable = self.reporter.lock().unreachable();
        let (saturated, spool_full) = {
            let load = self.load.lock();
            (load.saturated(), load.spool_full())
        };
        let signatures_update_failed = self.signatures_update.lock().is_some();
        let tls_update_failed = self.tls_update.lock().is_some();
        let unsaved = self.unsaved.any();
        let not_accepting = self.connections.accept_failure().is_some();
        let all_stuck = stuck >= self.engine.threads();
        let conditions = [
            (self.is_shutting_down(), SvmReason::ShuttingDown),
            (ruleset.rule_count() == 0, SvmReason::NoSignatures),
            (probe_unreachable, SvmReason::InfrastructureUnreachable),
            (
                reporter_unreachable,
                SvmReason::NoConnectionToIntegrationServer,
            ),
            (
                age(ruleset.release_time()) > self.signatures_max_age,
                SvmReason::SignaturesOutdated,
            ),
            (saturated, SvmReason::ScanQueueSaturated),
            (spool_full, SvmReason::SpoolFull),
            (
                self.engine.timed_out_contents() > 0,
                SvmReason::ScansTimingOut,
            ),
            (stuck > 0 && !all_stuck, SvmReason::ScanThreadsStuck),
            (stuck > 0 && all_stuck, SvmReason::AllScanThreadsStuck),
            (signatures_update_failed, SvmReason::SignaturesUpdateFailed),
            (tls_update_failed, SvmReason::TlsUpdateFailed),
            (unsaved, SvmReason::StateNotSaved),
            (not_accepting, SvmReason::ConnectionsNotAccepted),
            (
                certificate_left.is_some_and(|left| left.is_zero()),
                SvmReason::CertificateExpired,
            ),
            (
                certificate.is_some_and(|valid| now < valid.not_before),
                SvmReason::CertificateNotYetValid,
            ),
            (
                certificate_left.is_some_and(|left| !left.is_zero() && left < CERTIFICATE_NOTICE),
                SvmReason::CertificateExpiresSoon,
            ),
        ];
        SvmStatus::of(
            conditions
                .into_iter()
                .filter_map(|(holds, reason)| holds.then_some(reason))
                .collect(),
        )
    }

    /// Recomputes the status and publishes it if it changed.
    ///
    /// Computed under the channel's lock, so that of two refreshes at once
    /// the older status cannot be published last.
    pub fn refresh(&self) {
        self.status.send_if_modified(|status| {
            let now = self.status();
            let changed = *status != now;
            if changed {
                tracing::info!(health = ?now.health, reasons = ?now.reasons, "SVM status changed");
                *status = now;
            }
            changed
        });
    }

    /// Marks the start of shutdown: the SVM is Critical (SHUTTING_DOWN)
    /// from now on, so that its last report sends its agents elsewhere.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
        self.refresh();
    }

    /// The state folder's files whose last save failed.
    pub(crate) fn unsaved(&self) -> &Arc<Unsaved> {
        &self.unsaved
    }

    /// Whether shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }

    /// A receiver that changes with the status.
    pub fn changes(&self) -> watch::Receiver<SvmStatus> {
        self.status.subscribe()
    }

    /// Records the result of a report to the Integration Server.
    pub fn reported(&self, result: Result<(), String>) {
        // Counted last: whoever sees the count sees the status it made.
        let delivered = result.is_ok();
        record(&self.reporter, result);
        self.refresh();
        self.engine.metrics().report(delivered);
    }

    /// Records the outcome of a reload of the signatures: the loaded ones
    /// are those on disk, or why not.
    pub fn signatures_reloaded(&self, result: Result<(), String>) {
        *self.signatures_update.lock() = result.err();
        self.refresh();
    }

    /// When the agent listener's certificate chain can be used (with TLS,
    /// and when it can be read).
    pub fn certificate_validity(&self) -> Option<Validity> {
        self.tls.as_ref().and_then(|tls| tls.validity())
    }

    /// Why the last reload of the agent listener's TLS files failed, if it
    /// did.
    pub fn tls_update_failure(&self) -> Option<String> {
        self.tls_update.lock().clone()
    }

    /// Records the outcome of a reload of the agent listener's TLS files:
    /// new connections use them, or why not.
    pub fn tls_reloaded(&self, result: Result<(), String>) {
        *self.tls_update.lock() = result.err();
        self.refresh();
    }

    /// Why the last reload of the signatures failed, if it did.
    pub fn signatures_update_failure(&self) -> Option<String> {
        self.signatures_update.lock().clone()
    }

    /// Probes the infrastructure endpoint (when configured) with a TCP
    /// connect, once more [`PROBE_CONFIRM`] after a failed one, and records
    /// the result: unreachable when neither got through.
    pub async fn probe(&self) {
        let Some(endpoint) = &self.identity.infrastructure.endpoint else {
            return;
        };
        let mut result = connect_to(endpoint).await;
        if result.is_err() {
            tokio::time::sleep(PROBE_CONFIRM).await;
            result = connect_to(endpoint).await;
        }
        if let Err(err) = &result {
            tracing::warn!("virtual infrastructure unreachable: {err}");
        }
        record(&self.probe, result);
        self.refresh();
    }

    /// Probes the infrastructure every `interval` (at once first), and
    /// every [`PROBE_RETRY`] while it is unreachable, until `shutdown`
    /// turns true.
    pub async fn keep_probing(
        self: Arc<Self>,
        interval: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) {
        if self.identity.infrastructure.endpoint.is_none() {
            return;
        }
        loop {
            self.probe().await;
            let unreachable = self.probe.lock().unreachable();
            let next = if unreachable {
                PROBE_RETRY.min(interval)
            } else {
                interval
            };
            tokio::select! {
                () = tokio::time::sleep(next) => {}
                () = shut_down(&mut shutdown) => return,
            }
        }
    }

    /// Samples the load every second and republishes the status, until
    /// `shutdown` turns true.
    pub async fn monitor(self: Arc<Self>, shutdown: watch::Receiver<bool>) {
        let mut ticks = Periodic::now_and_every(Duration::from_secs(1), shutdown);
        while ticks.next().await {
            let mut load = self.load.lock();
            load.note_spool_refusals(self.spool_refusals.load(Ordering::Relaxed));
            load.sample(&self.engine);
            drop(load);
            self.refresh();
        }
    }

    /// The report the Integration Server gets (without `sequence` and
    /// `trigger`, which the reporter sets), with the VMs `which` says.
    pub fn report(&self, which: WhichVms) -> SvmReport {
        let status = self.status();
        let vms = self.vm_infos(which);
        let ruleset = self.engine.ruleset();
        let cache = self.engine.cache().stats();
        let load = self.load.lock().load(&self.engine, &self.sessions);
        SvmReport {
            sequence: 0,
            sent_at_unix_ms: unix_ms(SystemTime::now()),
            trigger: 0,
            svm: Some(self.identity()),
            status: status.health as i32,
            reasons: status.reasons.into_iter().map(|r| r as i32).collect(),
            signatures: Some(signatures_info(&ruleset)),
            connected_agents: self.sessions.len() as u32,
            protected_vms_30d: self.vms.count() as u32,
            vms,
            load: Some(load),
            cache: Some(CacheStatistics::from(&cache)),
            vms_left_out: 0,
        }
    }

    fn identity(&self) -> SvmIdentity {
        let id = &self.identity;
        SvmIdentity {
            svm_id: id.svm_id.clone(),
            name: id.name.clone(),
            addresses: id.addresses.clone(),
            version: crate::VERSION.to_owned(),
            uptime_seconds: self.started.elapsed().as_secs(),
            datacenter: id.infrastructure.datacenter.clone(),
            cluster: id.infrastructure.cluster.clone(),
            hypervisor_labels: id.infrastructure.labels.clone(),
            connection_tags: id.connection_tags.clone(),
        }
    }

    /// The VMs `which` says.
    pub fn vm_infos(&self, which: WhichVms) -> Vec<VmInfo> {
        if which == WhichVms::None {
            return Vec::new();
        }
        let notable = which == WhichVms::Notable;
        let keep =
            |vm: &VmRecord| !notable || vm.session_id.is_some() || vm.awaited || vm.has_reasons();
        self.vms
            .list(keep)
            .iter()
            .map(|vm| self.vm_info(vm))
            .collect()
    }

    /// The VM `vm_id`, if known.
    pub fn vm(&self, vm_id: &str) -> Option<VmInfo> {
        self.vms.get(vm_id).map(|vm| self.vm_info(&vm))
    }

    fn vm_info(&self, vm: &VmRecord) -> VmInfo {
        let Some(id) = &vm.session_id else {
            return vm.info(None);
        };
        match self.sessions.get(id) {
            Some(session) => vm.info(Some(&session)),
            // Closed since `vm` was read: its record now says how it ended
            // (see `Sessions::close`), or names the session it has now.
            None => match self.vms.get(&vm.vm_id) {
                Some(now) => {
                    let session = now
                        .session_id
                        .as_deref()
                        .and_then(|id| self.sessions.get(id));
                    now.info(session.as_deref())
                }
                None => vm.info(None),
            },
        }
    }

    /// Each component with its state and key figures, for `scanserver
    /// status`. States follow the SVM's reasons: a component is as bad as
    /// the reason it is the cause of.
    pub fn components(&self) -> Vec<Component> {
        let stuck = self.engine.stuck_threads();
        let status = self.status_with(stuck);
        let state_for = |reason: SvmReason| match status.reasons.contains(&reason) {
            true if reason.health() == Health::Critical => ComponentState::Critical,
            true => ComponentState::Warning,
            false => ComponentState::Ok,
        };
        let ruleset = self.engine.ruleset();
        let cache = self.engine.cache().stats();
        let (delivered, failed) = self.engine.metrics().reports();
        let engine = state_for(SvmReason::ScanQueueSaturated)
            .max(state_for(SvmReason::ScanThreadsStuck))
            .max(state_for(SvmReason::AllScanThreadsStuck))
            .max(state_for(SvmReason::ScansTimingOut));
        let spool = state_for(SvmReason::SpoolFull);
        let signatures = state_for(SvmReason::NoSignatures)
            .max(state_for(SvmReason::SignaturesOutdated))
            .max(state_for(SvmReason::SignaturesUpdateFailed));
        let reporter = self.reporter.lock().clone();
        let probe = self.probe.lock().clone();
        let unsaved = self.unsaved.failures();
        let state_detail = if unsaved.is_empty() {
            "saved".to_owned()
        } else {
            let failures = unsaved
                .iter()
                .map(|(file, why)| format!("cannot save the {file}: {why}"));
            failures.collect::<Vec<_>>().join("; ")
        };
        vec![
            component(
                "scan engine",
                engine,
                self.engine_detail(&status, stuck),
                [
                    ("threads", self.engine.threads() as u64),
                    ("stuck threads", stuck as u64),
                    ("stuck contents", self.engine.stuck_contents() as u64),
                    (
                        "timed-out contents",
                        self.engine.timed_out_contents() as u64,
                    ),
                    ("queue depth", self.engine.queue_depth() as u64),
                    ("queue capacity", self.engine.queue_capacity() as u64),
                    ("scans", self.engine.metrics().scans.get()),
                ],
            ),
            component(
                "signatures",
                signatures,
                self.signatures_detail(&ruleset),
                [("rules", ruleset.rule_count() as u64)],
            ),
            component(
                "shared cache",
                ComponentState::Ok,
                format!("hit ratio {:.1}%", cache.hit_ratio * 100.0),
                [
                    ("entries", cache.entries),
                    ("bytes", cache.bytes),
                    ("hits", cache.hits),
                    ("misses", cache.misses),
                    ("coalesced waits", cache.coalesced_waits),
                ],
            ),
            component(
                "spool",
                spool,
                match spool {
                    ComponentState::Ok => "room for uploads".into(),
                    _ => "refused uploads for want of room within the last minute".into(),
                },
                [(
                    "uploads refused",
                    self.spool_refusals.load(Ordering::Relaxed),
                )],
            ),
            component(
                "state folder",
                state_for(SvmReason::StateNotSaved),
                state_detail,
                [],
            ),
            component(
                "agent listener",
                state_for(SvmReason::TlsUpdateFailed)
                    .max(state_for(SvmReason::CertificateExpiresSoon))
                    .max(state_for(SvmReason::CertificateExpired))
                    .max(state_for(SvmReason::CertificateNotYetValid))
                    .max(state_for(SvmReason::ConnectionsNotAccepted)),
                self.listener_detail(&status),
                [
                    ("connected agents", self.sessions.len() as u64),
                    ("protected VMs (30 days)", self.vms.count() as u64),
                ],
            ),
            reach_component(
                "integration server reporter",
                &reporter,
                state_for(SvmReason::NoConnectionToIntegrationServer),
                [("reports delivered", delivered), ("reports failed", failed)],
            ),
            reach_component(
                "infrastructure probe",
                &probe,
                state_for(SvmReason::InfrastructureUnreachable),
                [],
            ),
        ]
    }
}

impl Svm {
    /// The scan engine's component's detail, with `status` and the count
    /// of `stuck` threads it was made with: what its reasons are.
    fn engine_detail(&self, status: &SvmStatus, stuck: usize) -> String {
        let holds = |reason| status.reasons.contains(&reason);
        let mut issues = Vec::new();
        if stuck > 0 {
            issues.push(format!(
                "{stuck} of {} scan threads busy with one file for over {:?}: restart the server",
                self.engine.threads(),
                self.engine.stuck_after()
            ));
        }
        if holds(SvmReason::ScanQueueSaturated) {
            issues.push("the scan queue has been full for a minute".into());
        }
        if holds(SvmReason::ScansTimingOut) {
            issues.push(format!(
                "{} contents refused unscanned, their scans having timed out twice in a row",
                self.engine.timed_out_contents()
            ));
        }
        match issues.is_empty() {
            true => "scanning".into(),
            false => issues.join("; "),
        }
    }

    /// The signatures' component's detail: `ruleset`'s version and age,
    /// and the last reload's failure, if it failed.
    fn signatures_detail(&self, ruleset: &Ruleset) -> String {
        let age = Duration::from_secs(age(ruleset.release_time()).as_secs());
        let mut detail = format!(
            "version {}, {} old",
            ruleset.version(),
            humantime::format_duration(age)
        );
        if let Some(failure) = self.signatures_update_failure() {
            detail += &format!("; the last reload failed: {failure}");
        }
        detail
    }

    /// The agent listener's component's detail, with `status`: its
    /// address, its certificate's validity, and what failed.
    fn listener_detail(&self, status: &SvmStatus) -> String {
        let tls = match (self.identity.encrypted, self.certificate_validity()) {
            (false, _) => String::new(),
            (true, None) => " (TLS)".to_owned(),
            (true, Some(valid)) if SystemTime::now() < valid.not_before => format!(
                " (TLS, certificate valid from {} until {})",
                humantime::format_rfc3339_seconds(valid.not_before),
                humantime::format_rfc3339_seconds(valid.not_after)
            ),
            (true, Some(valid)) => format!(
                " (TLS, certificate valid until {})",
                humantime::format_rfc3339_seconds(valid.not_after)
            ),
        };
        let tls_update_failure = self
            .tls_update_failure()
            .map(|failure| format!("; the last TLS reload failed: {failure}"))
            .unwrap_or_default();
        // Shown with the reason only: looked at again, the failure may
        // have aged out since the status was made, or a new one come.
        let accept_failure = self
            .connections
            .accept_failure()
            .filter(|_| status.reasons.contains(&SvmReason::ConnectionsNotAccepted))
            .map(|failure| format!("; cannot accept connections: {failure}"))
            .unwrap_or_default();
        format!(
            "listening on {}{tls}{tls_update_failure}{accept_failure}",
            self.identity.listen
        )
    }
}

/// What reports and the admin service tell of `ruleset`.
pub fn signatures_info(ruleset: &Ruleset) -> SignaturesInfo {
    SignaturesInfo {
        version: ruleset.version().to_owned(),
        rule_count: ruleset.rule_count() as u64,
        released_at_unix_ms: unix_ms(ruleset.release_time()),
        age_seconds: age(ruleset.release_time()).as_secs(),
    }
}

fn component<const N: usize>(
    name: &str,
    state: ComponentState,
    detail: String,
    counts: [(&str, u64); N],
) -> Component {
    Component {
        name: name.to_owned(),
        state: state as i32,
        detail,
        counts: counts.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
    }
}

/// A component that reaches out (reporter, probe); `state` is the one its
/// reason gives.
fn reach_component<const N: usize>(
    name: &str,
    reach: &Reach,
    state: ComponentState,
    counts: [(&str, u64); N],
) -> Component {
    if !reach.enabled {
        return component(
            name,
            ComponentState::Disabled,
            "not configured".into(),
            counts,
        );
    }
    let detail = match reach.reachable {
        None => "starting".to_owned(),
        Some(true) => "reachable".to_owned(),
        Some(false) => reach.error.clone().unwrap_or_default(),
    };
    component(name, state, detail, counts)
}

/// One TCP connect to the infrastructure's `endpoint`, within
/// [`PROBE_TIMEOUT`].
async fn connect_to(endpoint: &str) -> Result<(), String> {
    match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(endpoint)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(err)) => Err(format!("cannot connect to {endpoint}: {err}")),
        Err(_) => Err(format!(
            "no answer from {endpoint} within {PROBE_TIMEOUT:?}"
        )),
    }
}

fn record(reach: &Mutex<Reach>, result: Result<(), String>) {
    let mut reach = reach.lock();
    reach.reachable = Some(result.is_ok());
    reach.error = result.err();
}

fn age(time: SystemTime) -> Duration {
    SystemTime::now().duration_since(time).unwrap_or_default()
}

/// One sample of the engine's counters and the process's CPU time.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Tokio's clock, which tests can pause and move.
    at: tokio::time::Instant,
    scans: u64,
    bytes: u64,
    cpu: Duration,
    queue_full: bool,
}

/// The longest time between two samples of one run of full samples.
const SAMPLE_GAP: Duration = Duration::from_secs(2);

/// The last minute of samples, one a second (at most 61 kept), and since
/// when the queue has been full.
#[derive(Debug, Default)]
struct LoadMeter {
    samples: VecDeque<Sample>,
    /// The first sample of the run of samples that found the queue full,
    /// up to the last. Kept apart from the window: which samples the
    /// window holds depends on how late each sample was taken, and the
    /// status must not flicker with that.
    full_since: Option<tokio::time::Instant>,
    /// Uploads the spool refused for want of room, at the last sample.
    spool_refused: u64,
    /// The last sample that found more of them.
    spool_refused_at: Option<tokio::time::Instant>,
}

impl LoadMeter {
    /// Notes `refused`, the uploads the spool refused so far for want of
    /// room: when it grew since the last note.
    fn note_spool_refusals(&mut self, refused: u64) {
        if refused > self.spool_refused {
            self.spool_refused_at = Some(tokio::time::Instant::now());
        }
        self.spool_refused = refused;
    }

    fn sample(&mut self, engine: &Engine) {
        let metrics = engine.metrics();
        self.push(Sample {
            at: tokio::time::Instant::now(),
            scans: metrics.scans.get(),
            bytes: metrics.scanned_bytes.get(),
            cpu: process::cpu_time(),
            queue_full: engine.queue_depth() >= engine.queue_capacity(),
        });
    }

    fn push(&mut self, now: Sample) {
        // A run of full samples is broken by one that is not, and by a gap
        // in the sampling (a paused VM, a stalled runtime): what the queue
        // did meanwhile is not known.
        let unbroken =
            (self.samples.back()).is_some_and(|last| now.at.duration_since(last.at) <= SAMPLE_GAP);
        let since = self.full_since.filter(|_| unbroken);
        self.full_since = now.queue_full.then(|| since.unwrap_or(now.at));
        self.samples.push_back(now);
        while self
            .samples
            .front()
            .is_some_and(|first| now.at.duration_since(first.at) > LOAD_WINDOW)
        {
            self.samples.pop_front();
        }
    }

    /// The queue was full at every sample of a whole window: samples a
    /// second apart, the window's span a second less, and half a second
    /// allowed for how late each sample was taken.
    fn saturated(&self) -> bool {
        match (self.full_since, self.samples.back()) {
            (Some(since), Some(last)) => {
                last.at.duration_since(since) >= LOAD_WINDOW - Duration::from_millis(1500)
            }
            _ => false,
        }
    }

    /// The spool refused an upload for want of room within the window.
    fn spool_full(&self) -> bool {
        self.spool_refused_at
            .is_some_and(|at| at.elapsed() <= LOAD_WINDOW)
    }

    fn load(&self, engine: &Engine, sessions: &Sessions) -> Load {
        let rate = |f: fn(&Sample) -> f64| match (self.samples.front(), self.samples.back()) {
            (Some(first), Some(last)) if last.at > first.at => {
                (f(last) - f(first)) / last.at.duration_since(first.at).as_secs_f64()
            }
            _ => 0.0,
        };
        Load {
            scans_per_second: rate(|s| s.scans as f64),
            megabytes_per_second: rate(|s| s.bytes as f64) / 1e6,
            queue_depth: engine.queue_depth() as u32,
            queue_capacity: engine.queue_capacity() as u32,
            scans_in_flight: sessions.files_in_flight() as u32,
            cpu_percent: rate(|s| s.cpu.as_secs_f64()) * 100.0,
            memory_bytes: process::resident_memory(),
        }
    }
}

/// The server process's own figures.
mod process {
    use std::time::Duration;

    /// CPU time used by the process so far (user and system).
    pub fn cpu_time() -> Duration {
        // SAFETY: getrusage only writes the struct it is given.
        let usage = unsafe {
            let mut usage = std::mem::zeroed::<libc::rusage>();
            libc::getrusage(libc::RUSAGE_SELF, &mut usage);
            usage
        };
        let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
        time(usage.ru_utime) + time(usage.ru_stime)
    }

    /// Resident memory, in bytes (0 where it cannot be read).
    pub fn resident_memory() -> u64 {
        let pages = std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|statm| statm.split_whitespace().nth(1)?.parse::<u64>().ok())
            .unwrap_or(0);
        // SAFETY: sysconf has no preconditions.
        let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        pages * page_size.max(0) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The spool counts as full for a minute after it last refused an
    /// upload for want of room.
    #[tokio::test(start_paused = true)]
    async fn the_spool_is_full_for_a_minute_after_a_refusal() {
        let mut meter = LoadMeter::default();
        meter.note_spool_refusals(0);
        assert!(!meter.spool_full());
        meter.note_spool_refusals(1);
        assert!(meter.spool_full());
        tokio::time::sleep(LOAD_WINDOW).await;
        meter.note_spool_refusals(1);
        assert!(meter.spool_full(), "within the minute");
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!meter.spool_full(), "none in the last minute");
        meter.note_spool_refusals(3);
        assert!(meter.spool_full());
    }

    /// Samples a second apart, each taken a little late (as a ticker's
    /// are): the queue full at every one of them for a minute is
    /// saturation at every sample after, whatever the delays.
    #[test]
    fn a_queue_full_for_a_minute_stays_saturated_whatever_the_sampling_delays() {
        let start = tokio::time::Instant::now();
        let mut meter = LoadMeter::default();
        let mut seed = 7u64;
        let mut sample = |meter: &mut LoadMeter, second: u64, queue_full: bool| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let late = Duration::from_micros((seed >> 33) % 5_000);
            meter.push(Sample {
                at: start + Duration::from_secs(second) + late,
                scans: 0,
                bytes: 0,
                cpu: Duration::ZERO,
                queue_full,
            });
        };
        for second in 0..59 {
            sample(&mut meter, second, true);
            assert!(!meter.saturated(), "full for {second} s only");
        }
        for second in 59..300 {
            sample(&mut meter, second, true);
            assert!(meter.saturated(), "full for {second} s");
        }
        sample(&mut meter, 300, false);
        assert!(!meter.saturated(), "room in the queue again");
        sample(&mut meter, 301, true);
        assert!(!meter.saturated(), "full again for a moment");
        for second in 302..361 {
            sample(&mut meter, second, true);
        }
        assert!(meter.saturated(), "full for a minute again");
        sample(&mut meter, 400, true);
        assert!(!meter.saturated(), "not known to be full while not sampled");
    }
}
