//! Reporting to the Integration Server, and a reference receiver.
//!
//! The [`Reporter`] sends the SVM's report ([`Svm::report`]) when the
//! server starts, then every interval (300 s by default, each one
//! stretched or shortened by up to [`JITTER`]), and at once when the SVM's
//! status or a VM's status or tags change, at most once every [`MIN_GAP`].
//! A report that fails is retried after 1 s, 2 s, 4 s ... up to
//! [`MAX_BACKOFF`], each wait cut by up to half at random; it runs on its
//! own task and never holds up a scan.
//!
//! SVMs often report at the same moment for a common cause: started
//! together, the same signatures turning outdated, an Integration Server
//! back after an outage (every SVM's retry gets through within a minute).
//! So after a report that was not a scheduled one, the next scheduled one
//! comes at a random point of the interval's second half: the SVMs spread
//! over half an interval, and stay spread, where a few seconds of jitter
//! would leave them in step. The first failure turns
//! the SVM Warning (`NO_CONNECTION_TO_INTEGRATION_SERVER`), the next
//! delivery OK again: that delivery already says so (a report that arrives
//! cannot say the Integration Server is unreachable), and no other report
//! of the recovery follows. When the server shuts down, a last report
//! (trigger `SHUTDOWN`, the SVM `SHUTTING_DOWN`) is sent at once, once:
//! without it the Integration Server would go on sending agents to an SVM
//! that is gone, until its reports were missed for long enough.
//!
//! The token and TLS files are read again before each report, so that a
//! token or certificate rotated on disk is used from the next report on,
//! without a restart; files that cannot be used leave the earlier ones in
//! use, with a warning (see `Credentials`).
//!
//! [`Receiver`] is the other side: a minimal Integration Server that hands
//! each report on (`scanserver receiver` prints them as JSON lines).

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use rustls_pki_types::{CertificateDer, pem::PemObject};
use serde::Deserialize;
use tokio::{sync::mpsc, time::Instant};
use tonic::{
    Request, Response, Status,
    service::interceptor::InterceptedService,
    transport::{Channel, Endpoint},
};

use crate::{
    auth::{BearerToken, RequireToken, RequiredToken, SendToken, TokenError},
    client::tls_config,
    files::{self, NotRead, OffThread, READ_WAIT},
    proto::{
        ReportAck, ReportTrigger, SvmReason, SvmReport, VmInfo,
        integration_server_client::IntegrationServerClient,
        integration_server_server::{IntegrationServer, IntegrationServerServer},
    },
    shutdown::shut_down,
    status::{Svm, SvmStatus, WhichVms},
};

/// How much each interval is stretched or shortened at random, at most.
pub const JITTER: f64 = 0.02;

/// The least time between two reports sent because something changed.
pub const MIN_GAP: Duration = Duration::from_secs(5);

/// The longest wait before retrying a failed report (never longer than
/// the interval).
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// How long one report may take, connection included; the Integration
/// Server is told (`grpc-timeout`).
pub const REPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the connection to the Integration Server stays idle before
/// the kernel probes it (TCP keepalive).
const REPORT_KEEPALIVE: Duration = Duration::from_secs(60);

/// The most a report's VMs may take, encoded: gRPC servers take messages
/// of up to 4 MiB unless told otherwise, and a report always too large for
/// its receiver would never be delivered (an SVM whose pool gets new VM ids
/// at every boot may remember tens of thousands that lost their
/// connection). See `keep_within_budget`.
pub const REPORT_VMS_BUDGET: usize = 3 << 20;

/// The `[reporting]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReportingConfig {
    /// The Integration Server's URL (`http://host:port`, or `https://` with
    /// `tls`). Unset: the SVM does not report.
    pub integration_server: Option<String>,
    /// Time between regular reports.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// A file holding the bearer token sent with every report.
    pub token_file: Option<PathBuf>,
    /// TLS towards the Integration Server.
    pub tls: Option<ReportingTls>,
}

impl Default for ReportingConfig {
    fn default() -> Self {
        ReportingConfig {
            integration_server: None,
            interval: Duration::from_secs(300),
            token_file: None,
            tls: None,
        }
    }
}

/// The `[reporting.tls]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportingTls {
    /// CA certificates (PEM) the Integration Server's certificate must
    /// chain to.
    pub ca: PathBuf,
    /// The SVM's client certificate and key (PEM), for mutual TLS.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The name to verify the server's certificate against [default: the
    /// URL's host].
    pub domain: Option<String>,
}

/// Errors setting up the reporter.
#[derive(Debug, thiserror::Error)]
pub enum ReportingError {
    #[error("invalid Integration Server URL `{url}`: {source}")]
    Url {
        url: String,
        source: tonic::transport::Error,
    },
    #[error("reporting.token_file: {0}")]
    Token(TokenError),
    #[error("reporting.tls.cert and reporting.tls.key go together: set both or neither")]
    HalfIdentity,
    #[error("cannot set up TLS towards the Integration Server")]
    Tls(#[source] tonic::transport::Error),
    #[error("{} (reporting.tls.ca) holds no PEM certificate, or malformed PEM", path.display())]
    NoCa { path: PathBuf },
    #[error("cannot read {} (reporting.tls): {source}", path.display())]
    TlsFile {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Sends the SVM's reports to the Integration Server.
pub struct Reporter {
    svm: Arc<Svm>,
    /// Sends the bearer token, if any, with every report.
    client: IntegrationServerClient<InterceptedService<Channel, SendToken>>,
    endpoint: Endpoint,
    token: SendToken,
    credentials: Credentials,
    interval: Duration,
    sequence: u64,
    /// VMs the last report left out (see [`REPORT_VMS_BUDGET`]), to warn
    /// when it begins to.
    vms_left_out: u32,
}

impl Reporter {
    /// A reporter for `config`, or `None` when no Integration Server is
    /// configured. Nothing is connected yet; the token and TLS files are
    /// read, and must be usable.
    pub fn new(
        config: &ReportingConfig,
        svm: Arc<Svm>,
    ) -> Result<Option<Reporter>, ReportingError> {
        let Some(url) = &config.integration_server else {
            // Not an error: a shared file may hold the credentials of SVMs
            // each given its own address by a flag.
            if config.token_file.is_some() || config.tls.is_some() {
                tracing::warn!(
                    "[reporting] token_file or tls is set, but no integration_server: the SVM does not report"
                );
            }
            return Ok(None);
        };
        let plain = Endpoint::from_shared(url.clone())
            .map_err(|source| ReportingError::Url {
                url: url.clone(),
                source,
            })?
            .connect_timeout(REPORT_TIMEOUT)
            // Kernel probes on a connection idle between reports keep a
            // NAT's or a load balancer's entry for it (often dropped after
            // 4 minutes idle, less than the interval), and find a peer
            // gone sooner.
            .tcp_keepalive(Some(REPORT_KEEPALIVE));
        if config.token_file.is_some() && in_clear_off_host(plain.uri()) {
            tracing::warn!(
                %url,
                "reports carry the reporting token in clear to another host: give an https:// URL and [reporting.tls]"
            );
        }
        let files = Arc::new(CredentialFiles {
            token_file: config.token_file.clone(),
            tls: config.tls.clone(),
        });
        let read = files.read()?;
        let (endpoint, token) = files.make(&plain, &read)?;
        Ok(Some(Reporter {
            svm,
            client: IntegrationServerClient::with_interceptor(
                endpoint.connect_lazy(),
                token.clone(),
            ),
            endpoint,
            token,
            credentials: Credentials {
                files,
                plain,
                seen: Seen {
                    in_use: read.digest(),
                    refused: None,
                },
                unread: None,
                reading: OffThread::default(),
            },
            interval: config.interval,
            sequence: 0,
            vms_left_out: 0,
        }))
    }

    /// Reads the token and TLS files again, and reports with new ones from
    /// now on (see [`Credentials`]).
    async fn refresh_credentials(&mut self) {
        if let Some((endpoint, token)) = self.credentials.changed().await {
            tracing::info!(
                "the reporting token or TLS files changed: reports go with them from now on"
            );
            (self.endpoint, self.token) = (endpoint, token);
            self.reconnect();
        }
    }

    /// Drops the channel for a new one, which connects with the next
    /// report. A report that got no answer in time leaves its connection
    /// as it was, and one whose peer vanished without a word (a failover,
    /// an expired NAT entry) would fail every report until TCP gave up on
    /// it, about 15 minutes later. (Pings would find it sooner, but gRPC
    /// servers close connections that ping more than every 5 minutes.)
    fn reconnect(&mut self) {
        let channel = self.endpoint.connect_lazy();
        self.client = IntegrationServerClient::with_interceptor(channel, self.token.clone());
    }

    /// Reports until `shutdown` turns true (a report under way then is
    /// dropped), then sends the last report.
    pub async fn run(mut self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        self.report_until(&mut shutdown).await;
        // Whatever ended serving (a signal, a listener that failed), the
        // last report says the SVM is going.
        self.svm.begin_shutdown();
        // On a connection of its own: the one the reports went on may
        // lead to a peer gone without a word (an expired NAT entry, a
        // failover), and the last report is not sent again.
        self.reconnect();
        self.send(ReportTrigger::Shutdown).await;
    }

    async fn report_until(&mut self, shutdown: &mut tokio::sync::watch::Receiver<bool>) {
        let mut status = self.svm.changes();
        let mut vms = self.svm.vms.changes();
        let mut trigger = ReportTrigger::Start;
        let mut due = Instant::now();
        let mut backoff = Duration::from_secs(1);
        let mut last_delivered: Option<Instant> = None;
        loop {
            let changed = tokio::select! {
                () = tokio::time::sleep_until(due) => false,
                Ok(()) = status.changed() => true,
                Ok(()) = vms.changed() => true,
                () = shut_down(shutdown) => return,
            };
            if changed {
                // While reports fail, the next retry carries the change.
                let Some(last) = last_delivered else { continue };
                tokio::select! {
                    () = tokio::time::sleep_until(last + MIN_GAP) => {}
                    () = shut_down(shutdown) => return,
                }
                trigger = ReportTrigger::Change;
            }
            // Changes made so far (while waiting, say) go in this report,
            // whatever its trigger: none of them calls for another.
            status.borrow_and_update();
            vms.borrow_and_update();
            // Shutdown begins with the status (`Svm::begin_shutdown`): a
            // change seen before the shutdown signal is the last report's.
            if self.svm.is_shutting_down() {
                return;
            }
            let sent = tokio::select! {
                sent = self.send(trigger) => sent,
                () = shut_down(shutdown) => return,
            };
            if let Some(carried) = sent {
                // The status this report carried is reported, whatever
                // changed it (a delivery after failures ends
                // `NO_CONNECTION_TO_INTEGRATION_SERVER` by itself): only
                // a status that differs makes another report. Checked on
                // the very value marked seen, so that a change made
                // meanwhile is not lost.
                if *status.borrow_and_update() != carried {
                    status.mark_changed();
                }
                last_delivered = Some(Instant::now());
                due = Instant::now() + next_scheduled(self.interval, trigger);
                backoff = Duration::from_secs(1);
                trigger = ReportTrigger::Scheduled;
            } else {
                last_delivered = None;
                due = Instant::now() + backoff.mul_f64(0.5 + 0.5 * fastrand::f64());
                backoff = (backoff * 2).min(MAX_BACKOFF).min(self.interval);
                trigger = ReportTrigger::Retry;
            }
        }
    }

    /// Sends one report; when the Integration Server acknowledged it,
    /// returns the status it carried.
    async fn send(&mut self, trigger: ReportTrigger) -> Option<SvmStatus> {
        // The last report goes at once, with what was in use.
        if trigger != ReportTrigger::Shutdown {
            self.refresh_credentials().await;
        }
        self.sequence += 1;
        // Made on a blocking thread: it lists every notable VM of the
        // registry (up to 100,000), which the runtime's threads should not
        // wait on. (A report that cannot be made is one that failed.)
        let svm = Arc::clone(&self.svm);
        let made = tokio::task::spawn_blocking(move || {
            let mut report = svm.report(WhichVms::Notable);
            let left_out = keep_within_budget(&mut report.vms);
            (report, left_out)
        });
        let (mut report, left_out) = match made.await {
            Ok(made) => made,
            Err(err) => {
                let failure = format!("cannot make the report: {err}");
                tracing::warn!(sequence = self.sequence, "{failure}");
                self.svm.reported(Err(failure));
                return None;
            }
        };
        // A report that arrives proves the Integration Server reachable:
        // it must not say otherwise (the status catches up once this one
        // is delivered).
        let unreachable = SvmReason::NoConnectionToIntegrationServer;
        let carried = SvmStatus::of(report.reasons().filter(|&r| r != unreachable).collect());
        report.status = carried.health as i32;
        report.reasons = carried.reasons.iter().map(|&r| r as i32).collect();
        report.sequence = self.sequence;
        report.trigger = trigger as i32;
        report.vms_left_out = left_out;
        if report.vms_left_out > 0 && self.vms_left_out == 0 {
            tracing::warn!(
                left_out = report.vms_left_out,
                listed = report.vms.len(),
                "reports list {} MiB of VMs at most: the others are left out (counted in vms_left_out)",
                REPORT_VMS_BUDGET >> 20
            );
        }
        self.vms_left_out = report.vms_left_out;
        // The Integration Server is told how long the SVM waits (the
        // `grpc-timeout` header): one that falls behind drops a report no
        // one waits for any longer, rather than work through every retry
        // it was sent meanwhile and fall further behind.
        let mut request = Request::new(report);
        request.set_timeout(REPORT_TIMEOUT);
        let answer = tokio::time::timeout(REPORT_TIMEOUT, self.client.report(request)).await;
        // Past either deadline (this one, or the channel's own from
        // `grpc-timeout`, or the Integration Server's) no answer came.
        let answer = answer.unwrap_or_else(|_| Err(Status::deadline_exceeded("")));
        let result = match answer {
            Ok(ack) => {
                let note = &ack.get_ref().message;
                if !note.is_empty() {
                    tracing::debug!(%note, "the Integration Server acknowledged the report");
                }
                Ok(())
            }
            Err(status) if status.code() == tonic::Code::Unavailable => Err(format!(
                "cannot reach the Integration Server: {}",
                crate::WithCauses(&status)
            )),
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
                ) =>
            {
                self.reconnect();
                Err(format!("no answer within {REPORT_TIMEOUT:?}"))
            }
            Err(status) => {
                let hint = match status.code() {
                    tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
                        " (check [reporting] token_file)"
                    }
                    tonic::Code::Unimplemented => {
                        " (check reporting.integration_server: it serves no reports)"
                    }
                    _ => "",
                };
                Err(format!(
                    "the Integration Server refused the report, {:?}: {}{hint}",
                    status.code(),
                    status.message()
                ))
            }
        };
        match &result {
            Ok(()) => tracing::debug!(sequence = self.sequence, ?trigger, "report delivered"),
            Err(err) => tracing::warn!(
                sequence = self.sequence,
                "cannot report to the Integration Server: {err}"
            ),
        }
        let delivered = result.is_ok();
        self.svm.reported(result);
        delivered.then_some(carried)
    }
}

/// Keeps `vms` within [`REPORT_VMS_BUDGET`], encoded: connected VMs first,
/// then those with a security tag, then the others, worst status first,
/// most recently seen first. Returns how many were left out.
fn keep_within_budget(vms: &mut Vec<VmInfo>) -> u32 {
    use std::cmp::Reverse;
    vms.sort_by_key(|vm| {
        let status = Reverse(vm.status);
        (
            !vm.connected,
            vm.tags.is_empty(),
            status,
            Reverse(vm.last_seen_unix_ms),
        )
    });
    let mut used = 0;
    let kept = vms
        .iter()
        .take_while(|vm| {
            // The field's key and length, and the VM.
            let len = prost::Message::encoded_len(*vm);
            used += 1 + prost::encoding::encoded_len_varint(len as u64) + len;
            used <= REPORT_VMS_BUDGET
        })
        .count();
    let left_out = vms.len() - kept;
    vms.truncate(kept);
    u32::try_from(left_out).unwrap_or(u32::MAX)
}

/// How long after a delivered report, sent for `trigger`, the next
/// scheduled one is due: an `interval` stretched or shortened by up to
/// [`JITTER`] after a scheduled one, a random point of its second half
/// after any other (see the module's doc).
fn next_scheduled(interval: Duration, trigger: ReportTrigger) -> Duration {
    match trigger {
        ReportTrigger::Scheduled => interval.mul_f64(1.0 + JITTER * (2.0 * fastrand::f64() - 1.0)),
        _ => interval.mul_f64(0.5 + 0.5 * fastrand::f64()),
    }
}

/// The token and TLS files reports go with, read again before each
/// report: a token or certificate rotated on disk is used from the next
/// report on, without a restart (which would end every agent's session).
/// Files that cannot be read or used leave the earlier ones in use, with a
/// warning (once for the same files, or the same failure to read them).
struct Credentials {
    files: Arc<CredentialFiles>,
    /// The Integration Server's endpoint, without TLS.
    plain: Endpoint,
    seen: Seen,
    /// Why the files could not be read last, once warned of.
    unread: Option<String>,
    /// Reads of the files, within [`READ_WAIT`]: a report does not wait
    /// for a read that takes longer (a file on a share that hangs), whose
    /// files the first report after it ended uses.
    reading: OffThread<Refreshed>,
}

/// The digests of the files in use, and of the last changed ones that
/// could not be used (not tried again until they change).
#[derive(Clone, Copy)]
struct Seen {
    in_use: blake3::Hash,
    refused: Option<blake3::Hash>,
}

/// What a read of the files found.
enum Refreshed {
    /// Those in use, or those refused last.
    Same,
    New(Box<Endpoint>, SendToken, blake3::Hash),
    Refused(ReportingError, blake3::Hash),
    Unread(ReportingError),
}

impl Credentials {
    /// The endpoint and token the files make, when they changed since
    /// those in use and can be used (see [`Credentials::reading`]).
    async fn changed(&mut self) -> Option<(Endpoint, SendToken)> {
        let (files, plain, seen) = (Arc::clone(&self.files), self.plain.clone(), self.seen);
        let read = move || files.refresh(&plain, seen);
        // A read that outlasted an earlier report's wait gives what it
        // found to the next report.
        let refreshed = match self.reading.late().await {
            Some(late) => late.map_err(NotRead::from),
            None => self.reading.read(READ_WAIT, read).await,
        };
        let refreshed = match refreshed {
            Ok(refreshed) => refreshed,
            Err(NotRead::StillReading) => return None,
            Err(err) => {
                tracing::warn!(
                    "the reporting token and TLS files: {err}; reports go with the earlier ones"
                );
                return None;
            }
        };
        if !matches!(refreshed, Refreshed::Unread(_)) {
            self.unread = None;
        }
        match refreshed {
            Refreshed::Same => None,
            Refreshed::New(endpoint, token, digest) => {
                self.seen = Seen {
                    in_use: digest,
                    refused: None,
                };
                Some((*endpoint, token))
            }
            Refreshed::Refused(err, digest) => {
                self.seen.refused = Some(digest);
                tracing::warn!(
                    "the reporting token or TLS files changed and cannot be used; reports go with the earlier ones: {}",
                    crate::WithCauses(&err)
                );
                None
            }
            Refreshed::Unread(err) => {
                let err = crate::WithCauses(&err).to_string();
                if self.unread.as_ref() != Some(&err) {
                    tracing::warn!("reports go with the earlier token and TLS files: {err}");
                    self.unread = Some(err);
                }
                None
            }
        }
    }
}

/// Where the reporting token and TLS files are.
struct CredentialFiles {
    token_file: Option<PathBuf>,
    tls: Option<ReportingTls>,
}

impl CredentialFiles {
    /// Reads the files and, unless they are those of `seen`, makes the
    /// endpoint (`plain`, with TLS) and token they make. Blocking.
    fn refresh(&self, plain: &Endpoint, seen: Seen) -> Refreshed {
        let read = match self.read() {
            Ok(read) => read,
            Err(err) => return Refreshed::Unread(err),
        };
        let digest = read.digest();
        if digest == seen.in_use || Some(digest) == seen.refused {
            return Refreshed::Same;
        }
        match self.make(plain, &read) {
            Ok((endpoint, token)) => Refreshed::New(Box::new(endpoint), token, digest),
            Err(err) => Refreshed::Refused(err, digest),
        }
    }

    /// Reads the files. Blocking.
    fn read(&self) -> Result<ReadCredentials, ReportingError> {
        let read = |path: &Path| {
            files::read(path, files::SMALL_FILE_LIMIT).map_err(|source| ReportingError::TlsFile {
                path: path.to_owned(),
                source,
            })
        };
        let tls = match &self.tls {
            None => None,
            Some(tls) => {
                let identity = match (&tls.cert, &tls.key) {
                    (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
                    (None, None) => None,
                    _ => return Err(ReportingError::HalfIdentity),
                };
                Some(TlsContents {
                    ca: read(&tls.ca)?,
                    identity,
                })
            }
        };
        let token = (self.token_file.as_deref())
            .map(BearerToken::read_file)
            .transpose()
            .map_err(ReportingError::Token)?;
        Ok(ReadCredentials { tls, token })
    }

    /// The endpoint (`plain`, with TLS if configured) and the token that
    /// `read` makes.
    fn make(
        &self,
        plain: &Endpoint,
        read: &ReadCredentials,
    ) -> Result<(Endpoint, SendToken), ReportingError> {
        let mut endpoint = plain.clone();
        if let (Some(settings), Some(contents)) = (&self.tls, &read.tls) {
            // tonic takes a CA file of no certificate (one caught half
            // written, say) as an empty set: every report would then fail.
            let certificates = CertificateDer::pem_slice_iter(&contents.ca)
                .try_fold(0, |count, certificate| certificate.map(|_| count + 1));
            if !certificates.is_ok_and(|count| count > 0) {
                return Err(ReportingError::NoCa {
                    path: settings.ca.clone(),
                });
            }
            let identity = (contents.identity.as_ref()).map(|(cert, key)| (&cert[..], &key[..]));
            let config = tls_config(Some(&contents.ca), identity, settings.domain.as_deref());
            endpoint = endpoint.tls_config(config).map_err(ReportingError::Tls)?;
        }
        let token = match (&self.token_file, &read.token) {
            (Some(path), Some(bytes)) => {
                Some(BearerToken::parse(bytes, path).map_err(ReportingError::Token)?)
            }
            _ => None,
        };
        Ok((endpoint, SendToken(token)))
    }
}

/// What the reporting token and TLS files hold.
struct ReadCredentials {
    tls: Option<TlsContents>,
    token: Option<Vec<u8>>,
}

/// What the `[reporting.tls]` files hold.
struct TlsContents {
    ca: Vec<u8>,
    /// The certificate and key.
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl ReadCredentials {
    /// A digest of it all: whether the files changed.
    fn digest(&self) -> blake3::Hash {
        let ca = self.tls.as_ref().map(|tls| &tls.ca);
        let identity = (self.tls.iter())
            .flat_map(|tls| &tls.identity)
            .flat_map(|(cert, key)| [cert, key]);
        let mut digest = blake3::Hasher::new();
        for part in [ca, self.token.as_ref()]
            .into_iter()
            .flatten()
            .chain(identity)
        {
            digest.update(&(part.len() as u64).to_le_bytes());
            digest.update(part);
        }
        digest.finalize()
    }
}

/// A minimal Integration Server: hands every report it accepts to a
/// channel (bounded: a reader that falls behind makes the SVM wait, then
/// time out and retry).
pub struct Receiver {
    reports: mpsc::Sender<SvmReport>,
}

impl Receiver {
    /// The receiver as a gRPC service; with a `token`, reports that do not
    /// carry it are refused before they reach it.
    pub fn service(
        reports: mpsc::Sender<SvmReport>,
        token: Option<BearerToken>,
    ) -> InterceptedService<IntegrationServerServer<Receiver>, RequireToken> {
        let token = RequireToken {
            token: RequiredToken::new(token),
            hint: "set reporting.token_file on the SVM",
        };
        // A report lists at most REPORT_VMS_BUDGET of VMs; the rest of it
        // is small. Larger messages are refused before they are buffered.
        let server = IntegrationServerServer::new(Receiver { reports })
            .max_decoding_message_size(2 * REPORT_VMS_BUDGET);
        InterceptedService::new(server, token)
    }
}

#[tonic::async_trait]
impl IntegrationServer for Receiver {
    async fn report(&self, request: Request<SvmReport>) -> Result<Response<ReportAck>, Status> {
        self.reports
            .send(request.into_inner())
            .await
            .map_err(|_| Status::unavailable("the receiver is shutting down"))?;
        Ok(Response::new(ReportAck::default()))
    }
}

/// Whether `uri` leads to another host without TLS: what is sent there
/// crosses the network in clear.
fn in_clear_off_host(uri: &http::Uri) -> bool {
    let host = uri.host().unwrap_or_default();
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    uri.scheme_str() != Some("https") && !loopback
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_url_to_another_host_is_in_clear() {
        for (url, in_clear) in [
            ("http://is.example:7407", true),
            ("http://10.0.0.5:7407", true),
            ("https://is.example:7407", false),
            ("http://127.0.0.1:7407", false),
            ("http://localhost:7407", false),
            ("http://[::1]:7407", false),
        ] {
            let uri: http::Uri = url.parse().unwrap();
            assert_eq!(in_clear_off_host(&uri), in_clear, "{url}");
        }
    }

    /// After a scheduled report, the next comes an interval later, within
    /// the jitter; after any other, anywhere in the interval's second half,
    /// so that SVMs in step spread out.
    #[test]
    fn reports_after_a_common_cause_spread_over_half_an_interval() {
        let interval = Duration::from_secs(300);
        let draws = |trigger| -> Vec<f64> {
            (0..1000)
                .map(|_| next_scheduled(interval, trigger).as_secs_f64() / 300.0)
                .collect()
        };
        let scheduled = draws(ReportTrigger::Scheduled);
        assert!(scheduled.iter().all(|&d| (d - 1.0).abs() <= JITTER));
        for trigger in [
            ReportTrigger::Start,
            ReportTrigger::Change,
            ReportTrigger::Retry,
        ] {
            let spread = draws(trigger);
            assert!(spread.iter().all(|&d| (0.5..=1.0).contains(&d)));
            let lowest = spread.iter().copied().fold(f64::MAX, f64::min);
            let highest = spread.iter().copied().fold(0.0, f64::max);
            assert!(lowest < 0.6 && highest > 0.9, "{lowest} to {highest}");
        }
    }
}
