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
//!   own YARA-X scanner for the current rules (see [`worker`]); no scanner is
//!   built per file.
//! * Files are read into the worker's reusable buffer, or memory-mapped when
//!   large (see [`mapped`]).
//! * The async entry point ([`Engine::submit`]) goes through a bounded queue:
//!   a flood of work waits for a slot (or, with [`Engine::try_submit`], gets
//!   [`EngineBusy`] at once) instead of growing memory without bound.

mod mapped;
mod worker;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use serde::Deserialize;
use tokio::sync::{Semaphore, TryAcquireError, oneshot};

use crate::{
    signatures::Ruleset,
    verdict::{FailReason, Verdict},
};

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
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            threads: 0,
            scan_timeout: Duration::from_secs(10),
            max_scan_size: 256 << 20,
            queue_capacity: 64,
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

/// The scan queue is full; try again later.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the scan queue is full ({capacity} scans queued or running); retry later")]
pub struct EngineBusy {
    pub capacity: usize,
}

/// What to scan.
#[derive(Debug)]
pub enum Content {
    /// Content in memory (cheap to clone).
    Bytes(Bytes),
    /// A file, read or memory-mapped by the worker.
    File(PathBuf),
}

/// One piece of work for [`Engine::submit`].
#[derive(Debug)]
pub struct ScanJob {
    pub content: Content,
    /// The file's name on the machine it came from, for the `filename`,
    /// `filepath` and `extension` external variables. For
    /// [`Content::File`] without a name, the file's own path is used.
    pub name: Option<String>,
}

impl ScanJob {
    /// A file scanned under its own path.
    pub fn file(path: impl Into<PathBuf>) -> Self {
        ScanJob {
            content: Content::File(path.into()),
            name: None,
        }
    }

    /// In-memory content, optionally with the name it has elsewhere.
    pub fn bytes(data: impl Into<Bytes>, name: Option<String>) -> Self {
        ScanJob {
            content: Content::Bytes(data.into()),
            name,
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
    /// The version of the ruleset the scan used.
    pub rules_version: Arc<str>,
    /// Time spent reading, hashing and scanning.
    pub elapsed: Duration,
}

/// Limits every scan obeys.
#[derive(Debug, Clone, Copy)]
struct Limits {
    timeout: Duration,
    max_scan_size: u64,
}

/// The scan engine. Share it behind an [`Arc`].
pub struct Engine {
    ruleset: ArcSwap<Ruleset>,
    pool: rayon::ThreadPool,
    limits: Limits,
    queue: Arc<Semaphore>,
    queue_capacity: usize,
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
            .build()?;
        Ok(Engine {
            ruleset: ArcSwap::from_pointee(ruleset),
            pool,
            limits: Limits {
                timeout: config.scan_timeout,
                max_scan_size: config.max_scan_size,
            },
            queue: Arc::new(Semaphore::new(config.queue_capacity)),
            queue_capacity: config.queue_capacity,
        })
    }

    /// The current ruleset.
    pub fn ruleset(&self) -> Arc<Ruleset> {
        self.ruleset.load_full()
    }

    /// Makes `ruleset` current and returns the one it replaces. Scans that
    /// already started finish with the old rules; every later scan uses the
    /// new ones. Workers drop their scanners for the old rules right away,
    /// so its memory is freed once the last such scan ends.
    pub fn replace_ruleset(&self, ruleset: Ruleset) -> Arc<Ruleset> {
        let old = self.ruleset.swap(Arc::new(ruleset));
        self.pool
            .spawn_broadcast(|_| worker::release_stale_scanner());
        old
    }

    /// The number of scan threads.
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
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
        self.pool.install(|| self.scan_on_worker(job))
    }

    /// Scans every file `paths` yields, in parallel on the engine's pool,
    /// handing each result to `on_result` (from the worker that scanned it).
    /// Walking and scanning overlap: workers take the next path as they free
    /// up.
    pub fn scan_files<I, F>(&self, paths: I, on_result: F)
    where
        I: Iterator<Item = PathBuf> + Send,
        F: Fn(PathBuf, ScanOutcome) + Sync,
    {
        use rayon::iter::{ParallelBridge, ParallelIterator};
        self.pool.install(|| {
            paths.par_bridge().for_each(|path| {
                let outcome = self.scan_on_worker(&ScanJob::file(&path));
                on_result(path, outcome);
            })
        })
    }

    /// Queues `job` and resolves to its outcome. When the queue is full this
    /// waits for a free slot, which is how backpressure reaches the caller.
    pub async fn submit(self: &Arc<Self>, job: ScanJob) -> ScanOutcome {
        let permit = Arc::clone(&self.queue)
            .acquire_owned()
            .await
            .expect("the engine never closes its queue");
        self.run_queued(job, permit).await
    }

    /// Like [`submit`](Self::submit), but fails at once with [`EngineBusy`]
    /// when the queue is full.
    pub fn try_submit(
        self: &Arc<Self>,
        job: ScanJob,
    ) -> Result<impl Future<Output = ScanOutcome> + use<>, EngineBusy> {
        let permit = match Arc::clone(&self.queue).try_acquire_owned() {
            Ok(permit) => permit,
            Err(TryAcquireError::NoPermits) | Err(TryAcquireError::Closed) => {
                return Err(EngineBusy {
                    capacity: self.queue_capacity,
                });
            }
        };
        let engine = Arc::clone(self);
        Ok(async move { engine.run_queued(job, permit).await })
    }

    async fn run_queued(
        self: &Arc<Self>,
        job: ScanJob,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> ScanOutcome {
        let (tx, rx) = oneshot::channel();
        let engine = Arc::clone(self);
        self.pool.spawn(move || {
            let outcome = engine.scan_on_worker(&job);
            drop(permit);
            let _ = tx.send(outcome);
        });
        // The worker always sends; a closed channel would mean the job was
        // lost, which must not read as clean.
        rx.await.unwrap_or_else(|_| ScanOutcome {
            verdict: Verdict::failed(FailReason::Engine, "the scan was lost"),
            size: 0,
            digest: None,
            rules_version: self.ruleset().version_arc(),
            elapsed: Duration::ZERO,
        })
    }

    fn scan_on_worker(&self, job: &ScanJob) -> ScanOutcome {
        let ruleset = self.ruleset.load_full();
        let name = job.name.as_deref().map(Path::new);
        match &job.content {
            Content::Bytes(data) => worker::scan_bytes(&ruleset, self.limits, data, name),
            Content::File(path) => worker::scan_file(&ruleset, self.limits, path, name),
        }
    }
}
