//! Prometheus metrics: what the engine and the service count, and the
//! `/metrics` endpoint (OpenMetrics text) on a listener of its own, off
//! unless `--metrics-listen` is given.
//!
//! The listener is often reachable from other hosts (Prometheus scrapes
//! it from its own), so it is bounded as the others are: at most
//! [`METRICS_CONNECTIONS`] connections at once
//! ([`METRICS_CONNECTIONS_PER_ADDRESS`] of them from one host other than
//! the SVM itself), one request each, each connection closed
//! [`METRICS_CONNECTION_TIME`] after its accept whatever it is doing. A
//! client that opens connections and sends nothing, or reads nothing,
//! takes a few descriptors for a few seconds, never the ones agents need,
//! nor, from one host, every scraper's place.
//!
//! Counters on the hot path are plain atomics, created once: recording a
//! verdict takes no lock (an engine scan's time goes into a histogram,
//! which takes one briefly, once per scan). Figures that already exist
//! elsewhere (the cache's statistics, connected agents, the queue) are read
//! when Prometheus scrapes, not copied as they change.

use std::{convert::Infallible, fmt, future::Future, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    collector::Collector,
    encoding::{
        DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
    },
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::ConstGauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::{
    connections::Connections,
    proto,
    service::{Counters, ServiceState},
    status::{Svm, signatures_info},
};

/// Connections the metrics listener serves at once; one more is closed
/// at its accept. Prometheus needs one per scrape.
pub const METRICS_CONNECTIONS: usize = 16;

/// Of [`METRICS_CONNECTIONS`], those one address may hold (but the SVM's
/// own: loopback, the listener's): one host opening connections and
/// sending nothing leaves the others room to scrape.
pub const METRICS_CONNECTIONS_PER_ADDRESS: usize = 4;

/// How long a metrics connection may last, from its accept: its request
/// and the whole response.
pub const METRICS_CONNECTION_TIME: Duration = Duration::from_secs(10);

/// What the server counts as it works. One per engine, shared.
#[derive(Debug)]
pub struct Metrics {
    /// Scans the engine ran (cache hits not included).
    pub scans: Counter,
    /// Bytes of content the engine scanned.
    pub scanned_bytes: Counter,
    /// Time per scan: reading, hashing and scanning.
    pub scan_seconds: Histogram,
    verdicts: Family<VerdictLabels, Counter>,
    /// `[kind][source]` (in the order of their declarations), the same
    /// counters as `verdicts`, held so that recording one needs no lookup.
    by_kind: [[Counter; 3]; 3],
    reports: Family<ReportLabels, Counter>,
    report_results: [Counter; 2],
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
enum VerdictKind {
    Clean,
    Infected,
    Failed,
}

/// Where a verdict given to an agent came from.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
enum Source {
    /// A scan made for this request.
    Scan,
    /// The SharedCache.
    Cache,
    /// A scan made at the same time for another request.
    Coalesced,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    verdict: VerdictKind,
    source: Source,
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
enum ReportResult {
    Success,
    Failure,
}

/// Label values in lower case, as Prometheus conventions have them.
macro_rules! label_values {
    ($($type:ty),*) => {$(
        impl EncodeLabelValue for $type {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
                use fmt::Write;
                encoder.write_str(&format!("{self:?}").to_lowercase())
            }
        }
    )*};
}

label_values!(VerdictKind, Source, ReportResult);

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReportLabels {
    result: ReportResult,
}

impl Default for Metrics {
    fn default() -> Self {
        let verdicts = Family::<VerdictLabels, Counter>::default();
        let by_kind = [
            VerdictKind::Clean,
            VerdictKind::Infected,
            VerdictKind::Failed,
        ]
        .map(|kind| {
            [Source::Scan, Source::Cache, Source::Coalesced].map(|source| {
                let labels = VerdictLabels {
                    verdict: kind,
                    source,
                };
                verdicts.get_or_create(&labels).clone()
            })
        });
        let reports = Family::<ReportLabels, Counter>::default();
        let report_results = [ReportResult::Success, ReportResult::Failure]
            .map(|result| reports.get_or_create(&ReportLabels { result }).clone());
        Metrics {
            scans: Counter::default(),
            scanned_bytes: Counter::default(),
            // 100 µs to about 26 s.
            scan_seconds: Histogram::new(exponential_buckets(0.0001, 4.0, 10)),
            verdicts,
            by_kind,
            reports,
            report_results,
        }
    }
}

impl Metrics {
    /// Counts a verdict given to an agent.
    pub fn verdict(&self, verdict: &proto::FileVerdict) {
        let mut tally = Tally::default();
        tally.add(verdict);
        self.record(&tally);
    }

    /// Counts the verdicts of a tally.
    pub fn record(&self, tally: &Tally) {
        for (counters, counts) in self.by_kind.iter().zip(&tally.by_kind) {
            for (counter, &n) in counters.iter().zip(counts).filter(|(_, n)| **n > 0) {
                counter.inc_by(n);
            }
        }
    }

    /// Counts a report to the Integration Server.
    pub fn report(&self, delivered: bool) {
        self.report_results[usize::from(!delivered)].inc();
    }

    /// Reports delivered and failed so far.
    pub fn reports(&self) -> (u64, u64) {
        let [ok, failed] = &self.report_results;
        (ok.get(), failed.get())
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "scanserver_scans",
            "Scans the engine ran to a verdict (not cache hits, nor content that could not be read whole)",
            self.scans.clone(),
        );
        registry.register(
            "scanserver_scanned_bytes",
            "Bytes of content the engine scanned",
            self.scanned_bytes.clone(),
        );
        registry.register(
            "scanserver_scan_duration_seconds",
            "Time per scan: reading, hashing and scanning",
            self.scan_seconds.clone(),
        );
        registry.register(
            "scanserver_verdicts",
            "Verdicts given to agents, by verdict and by where they came from",
            self.verdicts.clone(),
        );
        registry.register(
            "scanserver_reports",
            "Reports to the Integration Server, by result",
            self.reports.clone(),
        );
    }
}

/// Verdicts added up before they are counted, so that a batch (a Lookup
/// of 100,000 digests) costs one atomic operation per figure, not per
/// verdict.
#[derive(Debug, Default)]
pub struct Tally {
    by_kind: [[u64; 3]; 3],
    pub verdicts: u64,
    pub detections: u64,
    pub failures: u64,
}

impl Tally {
    pub fn add(&mut self, verdict: &proto::FileVerdict) {
        let kind = match verdict.verdict.as_ref().and_then(|v| v.kind.as_ref()) {
            Some(proto::verdict::Kind::Clean(_)) => VerdictKind::Clean,
            Some(proto::verdict::Kind::Infected(_)) => VerdictKind::Infected,
            Some(proto::verdict::Kind::Failed(_)) | None => VerdictKind::Failed,
        };
        let source = match (verdict.cached, verdict.coalesced) {
            (true, _) => Source::Cache,
            (false, true) => Source::Coalesced,
            (false, false) => Source::Scan,
        };
        self.by_kind[kind as usize][source as usize] += 1;
        self.verdicts += 1;
        self.detections += verdict.detection_count() as u64;
        self.failures += u64::from(kind == VerdictKind::Failed);
    }
}

/// Figures read from the server when Prometheus scrapes.
struct Live(Arc<Svm>, Arc<ServiceState>);

impl fmt::Debug for Live {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Live")
    }
}

impl Collector for Live {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let svm = &self.0;
        let cache = svm.engine.cache().stats();
        let spool = self.1.uploads.spool_usage();
        let signatures = signatures_info(&svm.engine.ruleset());
        let gauges = [
            (
                "scanserver_signatures_rules",
                "Rules in the signatures loaded",
                signatures.rule_count,
            ),
            (
                "scanserver_signatures_age_seconds",
                "Time since the signatures loaded were released (their newest file)",
                signatures.age_seconds,
            ),
            (
                "scanserver_signatures_update_failed",
                "1 while the last reload of the signatures failed",
                u64::from(svm.signatures_update_failure().is_some()),
            ),
            (
                "scanserver_tls_update_failed",
                "1 while the last reload of the agent listener's TLS files failed",
                u64::from(svm.tls_update_failure().is_some()),
            ),
            (
                "scanserver_connected_agents",
                "Light Agents connected now",
                svm.sessions.len() as u64,
            ),
            (
                "scanserver_agent_connections",
                "Connections open on the agent listener",
                svm.connections.open() as u64,
            ),
            (
                "scanserver_agent_connections_max",
                "Connections the agent listener keeps open at once at most (server.max_connections)",
                svm.connections.max() as u64,
            ),
            (
                "scanserver_protected_vms",
                "VMs protected over the last 30 days",
                svm.vms.count() as u64,
            ),
            (
                "scanserver_scan_queue_depth",
                "Scans queued or running",
                svm.engine.queue_depth() as u64,
            ),
            (
                "scanserver_scan_queue_capacity",
                "Capacity of the scan queue",
                svm.engine.queue_capacity() as u64,
            ),
            (
                "scanserver_scan_threads_stuck",
                "Scan threads busy with one job for over three scan timeouts",
                svm.engine.stuck_threads() as u64,
            ),
            (
                "scanserver_stuck_contents",
                "Contents refused because they kept a scan thread busy for over three scan timeouts",
                svm.engine.stuck_contents() as u64,
            ),
            (
                "scanserver_timed_out_contents",
                "Contents refused for a while because their scans ran past the scan timeout twice in a row",
                svm.engine.timed_out_contents() as u64,
            ),
            (
                "scanserver_spool_bytes",
                "Disk that uploads spooled now take from the spool budget",
                spool.bytes,
            ),
            (
                "scanserver_spool_budget_bytes",
                "The spool budget: disk all spooled uploads may take together",
                spool.budget,
            ),
            (
                "scanserver_message_room_bytes",
                "Memory the agent listener's calls hold for messages (requests over 64 KiB, what is sent ahead of the message read beyond 64 KiB, Lookups and their answers, Scan replies waiting beyond a stream's first 64 KiB), with what is set aside for calls waiting for it",
                self.1.intake.held(),
            ),
            (
                "scanserver_message_budget_bytes",
                "The message budget: memory the agent listener's calls may hold for messages",
                self.1.intake.budget(),
            ),
            (
                "scanserver_scan_file_calls",
                "ScanFile calls holding a place now (from their first chunk to their verdict)",
                self.1.scan_file_calls() as u64,
            ),
            (
                "scanserver_spool_files",
                "Spooled uploads on disk now",
                spool.files,
            ),
            (
                "scanserver_spool_files_max",
                "Spooled uploads that may be on disk at once",
                spool.max_files,
            ),
            (
                "scanserver_cache_entries",
                "Verdicts in the SharedCache",
                cache.entries,
            ),
            (
                "scanserver_cache_bytes",
                "Memory the SharedCache's entries weigh",
                cache.bytes,
            ),
            (
                "scanserver_cache_budget_bytes",
                "The SharedCache's memory budget",
                cache.budget,
            ),
        ];
        let expiry = svm.certificate_validity().and_then(|valid| {
            let seconds = valid
                .not_after
                .duration_since(std::time::UNIX_EPOCH)
                .ok()?
                .as_secs();
            Some((
                "scanserver_tls_certificate_expiry_timestamp_seconds",
                "When the agent listener's TLS certificate chain expires: its first certificate to expire, roots aside (Unix time)",
                seconds,
            ))
        });
        for (name, help, value) in gauges.into_iter().chain(expiry) {
            let gauge = ConstGauge::new(value as i64);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        let counters = [
            (
                "scanserver_cache_hits",
                "Requests the SharedCache answered",
                cache.hits,
            ),
            (
                "scanserver_cache_misses",
                "Requests the SharedCache could not answer",
                cache.misses,
            ),
            (
                "scanserver_cache_coalesced_waits",
                "Requests that had the verdict of a scan of the same content under way",
                cache.coalesced_waits,
            ),
            (
                "scanserver_cache_evictions",
                "Verdicts evicted from the SharedCache",
                cache.evictions,
            ),
            (
                "scanserver_content_requests",
                "Files whose content the server asked agents for (hash-first begins it had no verdict for)",
                Counters::get(&self.1.counters.content_requests),
            ),
            (
                "scanserver_received_bytes",
                "Content bytes received from agents, through Scan and ScanFile",
                Counters::get(&self.1.counters.bytes_received),
            ),
            (
                "scanserver_scan_streams_idle",
                "Scan streams closed for nothing coming on them, and nothing owed on them, for server.idle_timeout",
                Counters::get(&self.1.counters.idle_streams),
            ),
            (
                "scanserver_spool_full",
                "Uploads refused because the spool had no room for them (its budget, its files, their VM's share, or its disk)",
                spool.refused,
            ),
            (
                "scanserver_agent_connections_refused",
                "Agent connections closed as they were accepted, every place being taken, or every place their address may take",
                svm.connections.refused(),
            ),
            (
                "scanserver_agent_connections_silent",
                "Agent connections closed for sending no HTTP/2 preface within 10 s",
                svm.connections.silent(),
            ),
            (
                "scanserver_tls_handshakes_failed",
                "TLS handshakes on the agent listener that failed or timed out (a client's certificate refused, or none sent where one is required, among them)",
                svm.connections.failed_handshakes(),
            ),
            (
                "scanserver_agent_connections_idle",
                "Agent connections closed for having no call under way for server.idle_timeout",
                svm.connections.idle_closed(),
            ),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(
                name,
                help,
                None,
                counter.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

/// The registry `/metrics` serves: `svm`'s metrics and live figures, and
/// the service's (`state`).
pub fn registry(svm: Arc<Svm>, state: Arc<ServiceState>) -> Registry {
    let mut registry = Registry::default();
    svm.engine.metrics().register(&mut registry);
    registry.register_collector(Box::new(Live(svm, state)));
    registry
}

/// Serves `/metrics` on `listener` until `shutdown` resolves, within the
/// bounds of [`METRICS_CONNECTIONS`], [`METRICS_CONNECTIONS_PER_ADDRESS`]
/// and [`METRICS_CONNECTION_TIME`].
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Registry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let registry = Arc::new(registry);
    let connections = Connections::metrics();
    tokio::pin!(shutdown);
    loop {
        let (stream, _, place) = tokio::select! {
            accepted = connections.accept(&listener) => accepted,
            () = &mut shutdown => return,
        };
        let registry = Arc::clone(&registry);
        let scrape = service_fn(move |request| {
            let response = scrape(&registry, &request);
            async move { Ok::<_, Infallible>(response) }
        });
        let connection = http1::Builder::new()
            .keep_alive(false)
            .serve_connection(TokioIo::new(stream), scrape);
        tokio::spawn(async move {
            let _place = place;
            let _ = tokio::time::timeout(METRICS_CONNECTION_TIME, connection).await;
        });
    }
}

/// The response to `request`: the metrics for `GET /metrics`.
fn scrape(registry: &Registry, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let status = |status: StatusCode| {
        let mut response = Response::new(Full::default());
        *response.status_mut() = status;
        response
    };
    if request.uri().path() != "/metrics" {
        return status(StatusCode::NOT_FOUND);
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = status(StatusCode::METHOD_NOT_ALLOWED);
        let allow = header::HeaderValue::from_static("GET, HEAD");
        response.headers_mut().insert(header::ALLOW, allow);
        return response;
    }
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, registry).is_err() {
        return status(StatusCode::INTERNAL_SERVER_ERROR);
    }
    let mut response = Response::new(Full::new(Bytes::from(text)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
    );
    response
}
