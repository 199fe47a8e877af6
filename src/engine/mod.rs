//! The scan engine: the current rules, a pool of scan workers, and the
//! limits every scan obeys.
//!
//! One [`Engine`] serves every entry point (the gRPC service, the local
//! `scanserver scan`, benchmarks):
//!
//! * Its rules can be replaced atomically while scans run
//!   ([`Engine::replace_ruleset`]): a scan uses the ruleset that was current
//!   when it started, and reports that ruleset's version with its verdict.
//! * Scans run on a rayon pool (all cores by default). Each worker keeps its
//!   own YARA-X scanner for the current rules (see `worker`); no scanner is
//!   built per file.
//! * Files are read into the worker's reusable buffer, or memory-mapped when
//!   large (see `mapped`).
//! * The async entry points ([`Engine::reserve`], [`Engine::submit`]) go
//!   through a bounded queue: a flood of work waits for a slot (and its
//!   caller stops reading more) instead of growing memory without bound.
//! * A thread busy with one job for far longer than the scan timeout
//!   allows is counted as stuck ([`Engine::stuck_threads`], see `stuck`),
//!   and the content it scans is refused from then on.
//! * Content whose scans time out twice in a row is not scanned again for a
//!   while (see `timeouts`): in a boot storm, its copies would otherwise
//!   take every scan thread in turn, each for a whole timeout.
//! * Verdicts are remembered in the [`SharedCache`] under the digest the
//!   engine computed (or the server computed while receiving): content seen
//!   before is not scanned again.

mod mapped;
mod stuck;
mod timeouts;
mod worker;

use mapped::{MappedBudget, MappedShare};
use stuck::{Busy, Handoff, StuckContents};
pub use stuck::{MAX_STUCK_CONTENTS, STUCK_AFTER_TIMEOUTS, STUCK_CONTENTS_FILE};
use timeouts::{REFUSED_FOR, TimedOutContents};

use std::{
    fs::File,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::{
    cache::{CacheKey, CachedVerdict, Digest, SharedCache},
    files::LocalFile,
    metrics::Metrics,
    signatures::Ruleset,
    verdict::{FailReason, Verdict},
};

/// The revision of how this engine makes a verdict from content, its name
/// and the signatures: the external variables worked out from the name,
/// the scanner's options, what counts as a detection. Raise it with any
/// such change: verdicts saved by a build of another revision (the cache's
/// snapshot) are then set aside instead of served, as the signatures
/// version alone would not tell them apart.
pub const VERDICT_REVISION: u32 = 1;

/// Engine settings; the `[engine]` table of the configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Scan threads; 0 means one per core.
    pub threads: usize,
    /// A scan running longer than this fails with `timeout`.
    #[serde(with = "humantime_serde")]
    pub scan_timeout: Duration,
    /// Content larger than this (in bytes) fails with `too_large`.
    pub max_scan_size: u64,
    /// Scans submitted through [`Engine::submit`] that may be queued or
    /// running at once; further submissions wait.
    pub queue_capacity: usize,
    /// Memory budget of the verdict cache, in bytes.
    pub cache_budget: u64,
    /// Bytes of large files that scans may have memory-mapped at once (a
    /// file larger than this is scanned alone); what bounds the resident
    /// memory that concurrent large scans add.
    pub mapped_budget: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            threads: 0,
            scan_timeout: Duration::from_secs(10),
            max_scan_size: 256 << 20,
            queue_capacity: 64,
            cache_budget: 256 << 20,
            mapped_budget: 256 << 20,
        }
    }
}

/// Errors setting up the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot start the scan thread pool: {0}")]
    Pool(#[from] rayon::ThreadPoolBuildError),
    #[error("queue_capacity must be at least 1")]
    ZeroQueue,
}

/// What to scan.
#[derive(Debug)]
pub enum Content {
    /// Content in memory (cheap to clone).
    Bytes(Bytes),
    /// A local file, read or memory-mapped by the worker.
    File(LocalFile),
    /// A file the server just wrote (a spooled upload), by the handle it
    /// was written with, and the `size` it received and hashed: always
    /// memory-mapped, as its pages are still in the page cache and mapping
    /// them spares a copy.
    Spooled { file: File, size: u64 },
}

/// One piece of work for the engine.
#[derive(Debug)]
pub struct ScanJob {
    pub content: Content,
    /// The file's name on the machine it came from, for the `filename`,
    /// `filepath` and `extension` external variables. For
    /// [`Content::File`] without a name, the file's own path is used.
    pub name: Option<String>,
    /// The content's digest, when the server already computed it while
    /// receiving the content. Never a digest a client claimed: the verdict
    /// is cached under it.
    pub digest: Option<Digest>,
}

impl ScanJob {
    /// A file scanned under its own path.
    pub fn file(file: impl Into<LocalFile>) -> Self {
        ScanJob {
            content: Content::File(file.into()),
            name: None,
            digest: None,
        }
    }

    /// In-memory content, optionally with the name it has elsewhere.
    pub fn bytes(data: impl Into<Bytes>, name: Option<String>) -> Self {
        ScanJob {
            content: Content::Bytes(data.into()),
            name,
            digest: None,
        }
    }
}

/// The result of one scan.
#[derive(Debug, Clone)]
pub struct ScanOutcome {
    pub verdict: Verdict,
    /// The content's size in bytes (0 when the file could not be opened).
    pub size: u64,
    /// The blake3 digest of the content, computed by the engine; `None` when
    /// the content was not read (missing file, too large).
    pub digest: Option<blake3::Hash>,
    /// The version of the ruleset the verdict was made with.
    pub rules_version: Arc<str>,
    /// The verdict came from the cache; nothing was scanned.
    pub cached: bool,
    /// The verdict came from a scan of the same content made at the same
    /// time for another request; nothing was scanned for this one.
    pub coalesced: bool,
    /// Time spent reading, hashing and scanning.
    pub elapsed: Duration,
}

impl ScanOutcome {
    /// The verdict as the cache keeps it; `None` for a failure, which is
    /// never cached.
    pub fn to_cached(&self) -> Option<Arc<CachedVerdict>> {
        self.verdict.failure().is_none().then(|| {
            Arc::new(CachedVerdict {
                verdict: self.verdict.clone(),
                rules_version: Arc::clone(&self.rules_version),
            })
        })
    }

    /// The outcome of content that was never scanned (it could not be read,
    /// or the scan was lost): a failure, with no digest.
    pub fn failed(verdict: Verdict, size: u64, elapsed: Duration, rules_version: Arc<str>) -> Self {
        debug_assert!(verdict.failure().is_some(), "only failures skip the scan");
        ScanOutcome {
            verdict,
            size,
            digest: None,
            rules_version,
            cached: false,
            coalesced: false,
            elapsed,
        }
    }
}

/// How long past its timeout a scan may run: YARA-X counts scan time in
/// whole seconds, ticked by one clock for every scan, and ends a scan at
/// the tick its timeout falls in, anywhere up to a second before the
/// timeout; it is asked for one second more, so that no scan is stopped
/// before its timeout (see `worker`).
pub const TIMEOUT_TICK: Duration = Duration::from_secs(1);

/// Limits every scan obeys.
#[derive(Debug, Clone, Copy)]
struct Limits {
    timeout: Duration,
    max_scan_size: u64,
}

/// Why content is not scanned, and the failure its files get instead (see
/// [`Engine::refusal`]).
#[derive(Debug, Clone)]
pub struct Refusal {
    pub kind: Refused,
    /// What its files' failure says.
    pub why: String,
}

/// What content is refused for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// It stuck a scan thread: never scanned again by this server (or its
    /// scan was given up, with the thread that stuck).
    Stuck,
    /// Another thread has been on it for two scan timeouts: not scanned a
    /// second time at once.
    Busy,
    /// Its scans timed out twice in a row lately: not scanned for a while
    /// (see `timeouts`).
    TimedOut,
}

impl Refusal {
    /// The reason its files' failure gives.
    pub fn reason(&self) -> FailReason {
        match self.kind {
            Refused::TimedOut => FailReason::Timeout,
            Refused::Stuck | Refused::Busy => FailReason::Engine,
        }
    }
}

/// The scan engine. Share it behind an [`Arc`].
pub struct Engine {
    ruleset: ArcSwap<Ruleset>,
    pool: rayon::ThreadPool,
    limits: Limits,
    queue: Arc<Semaphore>,
    queue_capacity: usize,
    mapped: MappedBudget,
    busy: Busy,
    stuck: Arc<StuckContents>,
    timed_out: TimedOutContents,
    cache: SharedCache,
    metrics: Arc<Metrics>,
}

/// A reserved place in the engine's queue, with the share of the mapped
/// budget its content needs: the scan it is used for starts without
/// waiting. See [`Engine::reserve`].
pub struct ScanSlot {
    engine: Arc<Engine>,
    permit: OwnedSemaphorePermit,
    /// A spooled file's share of the mapped budget.
    mapped: Option<MappedShare>,
}

impl ScanSlot {
    /// Runs `job` on the engine's pool and hands its outcome to `then`, on
    /// the scan thread, once the slot is free again; or, should the thread
    /// count as stuck first, a failure, on another thread, while the job
    /// still holds its slot and content (see [`Engine::stuck_threads`]).
    /// Nothing waits for the scan: a caller that finishes its work there (a
    /// verdict sent on a channel, say) spares the runtime a task and a
    /// wake-up per scan.
    pub fn scan_then(self, job: ScanJob, then: impl FnOnce(ScanOutcome) + Send + 'static) {
        let ScanSlot {
            engine,
            permit,
            mapped,
        } = self;
        // A share for other content than the job's (too small) is given
        // back: the scan takes its own.
        let mapped = mapped.filter(|share| match job.content {
            Content::Spooled { size, .. } => share.covers(size),
            Content::Bytes(_) | Content::File(_) => false,
        });
        let worker_engine = Arc::clone(&engine);
        engine.pool.spawn(move || {
            let (outcome, then) = worker_engine.scan_on_worker(&job, mapped, Some(Box::new(then)));
            // The content (a spooled file's handle) is let go before
            // `then`, which gives back what kept it (its spool place); but
            // for a job that counted as stuck, told before it ended.
            drop((job, permit));
            // (None if the job counted as stuck: `then` was told then.)
            if let Some(then) = then {
                then(outcome);
            }
        });
    }

    /// Runs `job` on the engine's pool and resolves to its outcome.
    /// `after` runs with the outcome before it is handed back, as `then`
    /// does in [`Self::scan_then`], whether or not the caller still waits:
    /// what it holds (what keeps the job's content, say) lives until the
    /// scan ends (or counts as stuck), and what it does (tell others of the
    /// outcome) is done even for a caller that stopped waiting.
    pub async fn scan(
        self,
        job: ScanJob,
        after: impl FnOnce(&ScanOutcome) + Send + 'static,
    ) -> ScanOutcome {
        let (tx, rx) = oneshot::channel();
        let engine = Arc::clone(&self.engine);
        self.scan_then(job, move |outcome| {
            after(&outcome);
            let _ = tx.send(outcome);
        });
        // The worker always sends; a closed channel would mean the job was
        // lost, which must not read as clean.
        rx.await.unwrap_or_else(|_| {
            let verdict = Verdict::failed(FailReason::Engine, "the scan was lost");
            ScanOutcome::failed(verdict, 0, Duration::ZERO, engine.ruleset().version_arc())
        })
    }
}

impl Engine {
    /// Starts an engine with `ruleset` and its own pool of scan threads.
    pub fn new(ruleset: Ruleset, config: &EngineConfig) -> Result<Engine, EngineError> {
        if config.queue_capacity == 0 {
            return Err(EngineError::ZeroQueue);
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(config.threads)
            .thread_name(|i| format!("scan-{i}"))
            // Scans catch their own panics (see `worker`); a panic around
            // one loses only that job, which its caller reports as failed.
            .panic_handler(|_| tracing::error!("a scan job panicked; its file fails with `engine`"))
            .build()?;
        let cache = SharedCache::new(config.cache_budget, &ruleset);
        Ok(Engine {
            ruleset: ArcSwap::from_pointee(ruleset),
            busy: Busy::new(pool.current_num_threads()),
            stuck: Arc::default(),
            timed_out: TimedOutContents::default(),
            pool,
            limits: Limits {
                timeout: config.scan_timeout,
                max_scan_size: config.max_scan_size,
            },
            queue: Arc::new(Semaphore::new(config.queue_capacity)),
            queue_capacity: config.queue_capacity,
            mapped: MappedBudget::new(config.mapped_budget),
            cache,
            metrics: Arc::default(),
        })
    }

    /// The current ruleset.
    pub fn ruleset(&self) -> Arc<Ruleset> {
        self.ruleset.load_full()
    }

    /// Whether `verdict` was made with the signatures in use now: one made
    /// with those they replaced (its scan was under way) is not handed to
    /// requests that waited for it.
    pub fn is_current(&self, verdict: &CachedVerdict) -> bool {
        *verdict.rules_version == *self.ruleset.load().version()
    }

    /// Makes `ruleset` current and returns the one it replaces. Scans that
    /// already started finish with the old rules; every later scan uses the
    /// new ones. Workers drop their scanners for the old rules right away,
    /// so its memory is freed once the last such scan ends. The verdict
    /// cache is emptied here, entry by entry: a blocking call. One change
    /// at a time ([`crate::reload`] makes them in turn): two at once could
    /// leave the cache serving the signatures that lost.
    pub fn replace_ruleset(&self, ruleset: Ruleset) -> Arc<Ruleset> {
        // The cache serves keys of the new signatures from the moment they
        // are in use (keys made with the old ones then find nothing), and
        // is emptied after, which takes a while: a verdict of the new
        // signatures stored meanwhile may go with the old entries, and its
        // content is only scanned again.
        self.cache.serve(&ruleset);
        let old = self.ruleset.swap(Arc::new(ruleset));
        self.cache.clear();
        self.timed_out.clear();
        self.pool
            .spawn_broadcast(|_| worker::release_stale_scanner());
        old
    }

    /// The verdict cache.
    pub fn cache(&self) -> &SharedCache {
        &self.cache
    }

    /// The cache key for content with `digest` named `name`, under the
    /// current signatures.
    pub fn cache_key(&self, digest: &Digest, name: Option<&Path>) -> CacheKey {
        CacheKey::new(digest, &self.ruleset.load(), name)
    }

    /// The cached verdict for content with `digest` named `name`, under the
    /// current signatures.
    pub fn cached(&self, digest: &Digest, name: Option<&Path>) -> Option<Arc<CachedVerdict>> {
        self.cache.get(&self.cache_key(digest, name))
    }

    /// What the engine and the service count, for metrics and status.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The number of scan threads.
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// How long a job may keep its scan thread before the thread counts
    /// as stuck: [`STUCK_AFTER_TIMEOUTS`] scan timeouts, and the
    /// [`TIMEOUT_TICK`] a scan may run past its own.
    pub fn stuck_after(&self) -> Duration {
        self.limits.timeout.saturating_mul(STUCK_AFTER_TIMEOUTS) + TIMEOUT_TICK
    }

    /// Scan threads busy with one job for longer than
    /// [`Self::stuck_after`]. The contents they scan, where their digest is
    /// known, are refused from now on (see `stuck`), and those who wait
    /// for their outcomes (a server's files) are told of a failure now:
    /// the threads may never end.
    pub fn stuck_threads(&self) -> usize {
        let stuck_after = self.stuck_after();
        let long = self.busy.longer_than(stuck_after);
        self.stuck.note(long.digests);
        if !long.handoffs.is_empty() {
            let why = format!(
                "the scan kept a scan thread busy for over {stuck_after:?}, and was given up"
            );
            let failed = ScanOutcome {
                elapsed: stuck_after,
                ..self.refused(
                    Refusal {
                        kind: Refused::Stuck,
                        why,
                    },
                    0,
                )
            };
            let tell = move || {
                for (then, digest) in long.handoffs {
                    then(ScanOutcome {
                        digest,
                        ..failed.clone()
                    });
                }
            };
            // Told on a thread of their own: the look may be made under a
            // lock (the status's) that telling had better not be under.
            // Should no thread be had, they are dropped untold, which tells
            // them of a lost scan (a server's file gets INTERNAL).
            let spawned = std::thread::Builder::new()
                .name("stuck-told".into())
                .spawn(tell);
            if let Err(err) = spawned {
                tracing::error!("cannot start a thread to fail the files of stuck scans: {err}");
            }
        }
        long.count
    }

    /// Contents refused because they stuck a scan thread.
    pub fn stuck_contents(&self) -> usize {
        self.stuck.len()
    }

    /// Contents refused for now because their scans timed out twice in a
    /// row (see `timeouts`).
    pub fn timed_out_contents(&self) -> usize {
        self.timed_out.refused(Instant::now())
    }

    /// Loads the contents that stuck a scan thread in earlier runs from the
    /// state folder `dir`, and keeps those found from now on there (see
    /// `stuck`); returns how many were loaded.
    pub fn keep_stuck_contents_in(&self, dir: &Path) -> std::io::Result<usize> {
        self.stuck.keep_in(dir)
    }

    /// Scans submitted and not yet finished (queued or running).
    pub fn queue_depth(&self) -> usize {
        self.queue_capacity - self.queue.available_permits()
    }

    /// The queue's capacity.
    pub fn queue_capacity(&self) -> usize {
        self.queue_capacity
    }

    /// Scans one job on the engine's pool, blocking the calling thread.
    pub fn scan(&self, job: &ScanJob) -> ScanOutcome {
        self.pool.install(|| self.scan_on_worker(job, None, None).0)
    }

    /// Scans every job `jobs` yields, in parallel on the engine's pool,
    /// handing each outcome to `on_result` (on the worker that scanned it).
    /// Producing and scanning overlap: workers take the next job as they
    /// free up, so a directory walk feeds the scan as it goes.
    pub fn scan_all<I, F>(&self, jobs: I, on_result: F)
    where
        I: Iterator<Item = ScanJob> + Send,
        F: Fn(ScanJob, ScanOutcome) + Sync,
    {
        use rayon::iter::{ParallelBridge, ParallelIterator};
        self.pool.install(|| {
            jobs.par_bridge().for_each(|job| {
                let (outcome, _) = self.scan_on_worker(&job, None, None);
                on_result(job, outcome);
            })
        })
    }

    /// Waits for a place in the queue for `content`, and first, for a
    /// spooled file, for its share of the mapped budget: a large upload
    /// waits for room here, in a task, rather than on a scan thread that
    /// smaller files need meanwhile. Holding the slot before reading more
    /// input is how backpressure reaches a client: while the queue is full,
    /// the caller stops reading.
    ///
    /// The share comes before the place, so that the places, always freed
    /// by their scans, cannot all be held by waiters for shares held by
    /// waiters for places. Local files are the exception: one large enough
    /// to be mapped waits for its share on its scan thread, holding its
    /// place, so local files and spooled ones must not share the queue
    /// (the server never queues local files; [`Engine::scan_all`] and
    /// [`Engine::scan`] take no place).
    pub async fn reserve(self: &Arc<Self>, content: &Content) -> ScanSlot {
        let mapped = match content {
            Content::Spooled { size, .. } => Some(self.mapped.share(*size).await),
            Content::Bytes(_) | Content::File(_) => None,
        };
        let permit = Arc::clone(&self.queue)
            .acquire_owned()
            .await
            .expect("the engine never closes its queue");
        ScanSlot {
            engine: Arc::clone(self),
            permit,
            mapped,
        }
    }

    /// Queues `job`, waiting for a place when the queue is full, and
    /// resolves to its outcome.
    pub async fn submit(self: &Arc<Self>, job: ScanJob) -> ScanOutcome {
        self.reserve(&job.content).await.scan(job, |_| {}).await
    }

    /// Why content of `digest` named `name` is not scanned, if it is not:
    /// it is refused whatever the threads do ([`Engine::refused_content`]),
    /// or another thread has been on it for two scan timeouts already (a
    /// scan would have been stopped after one), and would be stuck with it
    /// before that thread counts as stuck. Looked at by the scan itself.
    pub fn refusal(&self, digest: &Digest, name: Option<&Path>) -> Option<Refusal> {
        let now = Instant::now();
        let timed_out = || {
            let key = self
                .timed_out
                .any(now)
                .then(|| self.cache_key(digest, name))?;
            self.timed_out_refusal(digest, &key, now)
        };
        let refused = self.stuck_refusal(digest).or_else(timed_out);
        refused.or_else(|| {
            let long = self.twice_at_once_after();
            self.busy.on_longer_than(digest, long).then(|| Refusal {
                kind: Refused::Busy,
                why: format!("content {digest} has kept another scan thread busy for over {long:?}: it is not scanned twice at once"),
            })
        })
    }

    /// The outcome of content of `size` bytes refused unscanned (see
    /// [`Engine::refusal`]).
    pub fn refused(&self, refusal: Refusal, size: u64) -> ScanOutcome {
        let verdict = Verdict::failed(refusal.reason(), refusal.why);
        ScanOutcome::failed(verdict, size, Duration::ZERO, self.ruleset().version_arc())
    }

    /// Why content of `digest`, under cache key `key`, is not scanned now,
    /// whatever the scan threads are on, if it is not: it stuck a scan
    /// thread, and is never scanned by this server (`engine`); or its
    /// scans timed out twice in a row lately, and it is not scanned for a
    /// while (`timeout`, see `timeouts`). Looked at by the service before
    /// it asks for such content (at a begin, and when a scan a file waited
    /// for landed nothing), and before it waits for a scan of content it
    /// received or a Lookup names: no new scan of it will start. (The
    /// refusal for content another thread is on, [`Engine::refusal`]'s
    /// other case, is not looked at there: that thread may still come back
    /// with a verdict.)
    pub fn refused_content(&self, digest: &Digest, key: &CacheKey) -> Option<Refusal> {
        let timed_out = || self.timed_out_refusal(digest, key, Instant::now());
        self.stuck_refusal(digest).or_else(timed_out)
    }

    /// The refusal of content of `digest` that stuck a scan thread.
    fn stuck_refusal(&self, digest: &Digest) -> Option<Refusal> {
        self.stuck.holds(digest).then(|| Refusal {
            kind: Refused::Stuck,
            why: format!(
                "content {digest} kept a scan thread busy for over {:?} before: it is not scanned again by this version of the server",
                self.stuck_after()
            ),
        })
    }

    /// The refusal, at `now`, of content of `digest` under `key` whose
    /// scans timed out twice in a row lately.
    fn timed_out_refusal(&self, digest: &Digest, key: &CacheKey, now: Instant) -> Option<Refusal> {
        let left = self.timed_out.refused_for(key, now)?;
        Some(Refusal {
            kind: Refused::TimedOut,
            why: format!(
                "the scans of content {digest} ran past the timeout of {:?} twice in a row: it is not scanned again for {}s, or until the signatures change",
                self.limits.timeout,
                left.as_secs().max(1)
            ),
        })
    }

    /// When a scan thread is on content of `digest` now: how long until
    /// another copy of it is refused (see [`Engine::refusal`]). A copy
    /// received meanwhile waits for that scan rather than start its own:
    /// a copy scanned before would stick a second thread, should the first
    /// be stuck.
    pub fn second_copy_refused_in(&self, digest: &Digest) -> Option<Duration> {
        let on_for = self.busy.on_for(digest)?;
        // Just past it: the refusal counts from over that long.
        Some(self.twice_at_once_after().saturating_sub(on_for) + Duration::from_millis(10))
    }

    /// How long another thread must have been on content before it is
    /// refused as a second scan at once: two scan timeouts and a
    /// [`TIMEOUT_TICK`] (a scan would have been stopped after one and the
    /// tick).
    fn twice_at_once_after(&self) -> Duration {
        self.limits.timeout.saturating_mul(2) + TIMEOUT_TICK
    }

    /// Scans `job` on this thread, one of the pool's, with its content's
    /// share of the mapped budget when its slot took one. The share is
    /// kept with the thread's job: a thread that sticks gives it back (see
    /// [`Engine::stuck_threads`]), and so `then`, who the outcome is for,
    /// which is handed back with the outcome unless the job counted as
    /// stuck meanwhile (it was told of a failure then).
    fn scan_on_worker(
        &self,
        job: &ScanJob,
        share: Option<MappedShare>,
        mut then: Option<Handoff>,
    ) -> (ScanOutcome, Option<Handoff>) {
        let name = job.name.as_deref().map(Path::new);
        if let Some(refusal) = job.digest.and_then(|digest| self.refusal(&digest, name)) {
            let size = match &job.content {
                Content::Bytes(data) => data.len() as u64,
                Content::Spooled { size, .. } => *size,
                Content::File(_) => 0,
            };
            return (self.refused(refusal, size), then);
        }
        let had_share = share.is_some();
        let began = Instant::now();
        let busy = self.busy.begin(job.digest, share, &mut then);
        // Off the pool's threads the share was let go: the file then takes
        // one as it maps, as a file scanned without a slot does.
        let share_held = had_share && busy.is_some();
        let ruleset = self.ruleset.load_full();
        let context = worker::Context {
            ruleset: Arc::clone(&ruleset),
            limits: self.limits,
            cache: &self.cache,
            metrics: &self.metrics,
            name,
            digest: job.digest,
            mapped: &self.mapped,
            share_held,
        };
        let outcome = match &job.content {
            Content::Bytes(data) => context.scan_bytes(data),
            Content::File(file) => context.scan_file(file),
            Content::Spooled { file, size } => context.scan_spooled(file, *size),
        };
        if let Some(busy) = busy {
            let (came_back, handoff) = busy.end();
            if let Some(digest) = came_back {
                self.stuck.came_back(&digest);
            }
            then = handoff;
        }
        if let Some(digest) = &job.digest {
            self.note_timeouts(digest, name, &ruleset, began, &outcome);
        }
        (outcome, then)
    }

    /// Notes whether the scan of content of `digest` (named `name`) with
    /// `ruleset`, begun at `began`, timed out, or ended in time (see
    /// `timeouts`). Not a scan with signatures replaced meanwhile: what
    /// it tells of is forgotten already.
    fn note_timeouts(
        &self,
        digest: &Digest,
        name: Option<&Path>,
        ruleset: &Ruleset,
        began: Instant,
        outcome: &ScanOutcome,
    ) {
        let now = Instant::now();
        let timed_out =
            (outcome.verdict.failure()).is_some_and(|f| f.reason == FailReason::Timeout);
        let in_time = outcome.verdict.failure().is_none() && self.timed_out.any(now);
        if !(timed_out || in_time) || ruleset.version_id() != self.ruleset.load().version_id() {
            return;
        }
        let key = CacheKey::new(digest, ruleset, name);
        if in_time {
            self.timed_out.note_in_time(&key, now);
        } else if self.timed_out.note_timeout(key, began, now) {
            tracing::warn!(
                "the scans of content {digest} ran past the timeout of {:?} twice in a row: its copies fail with `timeout` unscanned for {}s, or until the signatures change",
                self.limits.timeout,
                REFUSED_FOR.as_secs()
            );
        }
    }
}
