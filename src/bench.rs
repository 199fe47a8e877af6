//! `lightagent bench`: a boot storm on demand.
//!
//! Simulated agents, each with its own connection and session, scan the
//! same set of files at the same moment, as hundreds of near-identical
//! virtual machines do when they boot. Files are read and hashed once, up
//! front, as an agent with its own digest cache would have them, so what
//! is measured is the server's work: hash-first answers, uploads, scans,
//! and the coalescing of requests for the same content.

use std::{collections::HashSet, path::PathBuf, sync::Arc, time::Instant};

use parking_lot::Mutex;
use serde::Serialize;

use crate::{
    client::{Agent, AgentOptions, ClientError, Files, HashFirst, PreparedFile},
    engine::ScanOutcome,
    localscan,
};

/// The files every simulated agent scans, read and hashed once.
pub struct FileSet {
    files: Vec<Arc<PreparedFile>>,
    unique: usize,
    bytes: u64,
}

impl FileSet {
    /// Reads and hashes the regular files below `paths`. Unreadable ones
    /// are reported to `skipped` and left out.
    pub fn read(paths: &[PathBuf], skipped: &(dyn Fn(PathBuf, String) + Sync)) -> FileSet {
        let files: Vec<_> = localscan::walk(paths.to_vec(), skipped)
            .filter_map(|file| match PreparedFile::read(file.clone()) {
                Ok(file) => Some(Arc::new(file)),
                Err(err) => {
                    skipped(file.path, err.to_string());
                    None
                }
            })
            .collect();
        let unique = files.iter().map(|f| f.digest).collect::<HashSet<_>>().len();
        let bytes = files.iter().map(|f| f.content.len() as u64).sum();
        FileSet {
            files,
            unique,
            bytes,
        }
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

/// One round of a storm, as the agents saw it.
#[derive(Debug, Clone, Serialize)]
pub struct RoundReport {
    pub round: usize,
    pub agents: usize,
    /// Verdicts asked for: agents × files.
    pub files: u64,
    /// Distinct contents in the file set.
    pub unique_contents: usize,
    /// Bytes of the file set, times the agents.
    pub bytes: u64,
    /// Verdicts the engine made for this round (neither cached nor
    /// coalesced).
    pub scans: u64,
    /// Verdicts answered from the cache.
    pub cache_hits: u64,
    /// Verdicts handed over from a scan under way for another agent.
    pub coalesced_waits: u64,
    /// Files that failed (their verdict is `failed`, or the server refused
    /// them).
    pub errors: u64,
    pub seconds: f64,
    pub files_per_second: f64,
    pub mb_per_second: f64,
    /// Time from announcing a file to its verdict.
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
}

/// What the agents of a round add up as verdicts arrive.
#[derive(Default)]
struct Tally {
    scans: u64,
    cache_hits: u64,
    coalesced_waits: u64,
    errors: u64,
    /// Each verdict's latency, in microseconds: a storm of many agents
    /// over a large file set keeps one per verdict until its end, and 4
    /// bytes for each is what a percentile to the microsecond needs.
    latencies: Vec<u32>,
}

impl Tally {
    fn with_capacity(files: usize) -> Self {
        Tally {
            latencies: Vec::with_capacity(files),
            ..Tally::default()
        }
    }

    fn count(&mut self, outcome: &ScanOutcome) {
        let counter = match () {
            _ if outcome.verdict.failure().is_some() => &mut self.errors,
            _ if outcome.coalesced => &mut self.coalesced_waits,
            _ if outcome.cached => &mut self.cache_hits,
            _ => &mut self.scans,
        };
        *counter += 1;
        let micros = outcome.elapsed.as_micros().min(u32::MAX.into()) as u32;
        self.latencies.push(micros);
    }

    fn add(&mut self, other: Tally) {
        self.scans += other.scans;
        self.cache_hits += other.cache_hits;
        self.coalesced_waits += other.coalesced_waits;
        self.errors += other.errors;
        self.latencies.extend(other.latencies);
    }
}

/// Runs round `round`: `agents` agents (identities derived from `options`)
/// connect, then all scan `set` at once.
pub async fn round(
    options: &AgentOptions,
    agents: usize,
    set: &FileSet,
    round: usize,
) -> Result<RoundReport, ClientError> {
    let mut connected = Vec::with_capacity(agents);
    for i in 0..agents {
        let mut options = options.clone();
        options.agent_id = format!("{}-bench-{i}", options.agent_id);
        options.vm_id = format!("{}-bench-{i}", options.vm_id);
        options.vm_name = format!("{}-bench-{i}", options.vm_name);
        connected.push(Agent::connect(&options).await?);
    }
    // Each agent counts its own verdicts (a lock shared by every agent
    // would be the bench's own bottleneck); the counts are added up after.
    let started = Instant::now();
    let scans: Vec<_> = connected
        .into_iter()
        .map(|agent| {
            let files = Files::Prepared(set.files.clone());
            let tally = Arc::new(Mutex::new(Tally::with_capacity(set.files.len())));
            let counting = Arc::clone(&tally);
            tokio::spawn(async move {
                agent
                    .scan(files, HashFirst::Always, move |_, outcome| {
                        counting.lock().count(&outcome)
                    })
                    .await?;
                let tally = std::mem::take(&mut *tally.lock());
                Ok::<_, ClientError>((tally, agent))
            })
        })
        .collect();
    let mut tally = Tally::default();
    let mut done = Vec::with_capacity(agents);
    for scan in scans {
        let (counted, agent) = scan
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))??;
        tally.add(counted);
        done.push(agent);
    }
    let seconds = started.elapsed().as_secs_f64();
    // Sessions end in order, after the measurement: the next round's
    // agents, with the same VM ids, must not find them still open (a VM's
    // newer session replaces its earlier one).
    let closing: Vec<_> = done
        .into_iter()
        .map(|agent| tokio::spawn(agent.close()))
        .collect();
    for close in closing {
        let _ = close.await;
    }
    tally.latencies.sort_unstable();
    let files = (set.len() * agents) as u64;
    let bytes = set.bytes * agents as u64;
    Ok(RoundReport {
        round,
        agents,
        files,
        unique_contents: set.unique,
        bytes,
        scans: tally.scans,
        cache_hits: tally.cache_hits,
        coalesced_waits: tally.coalesced_waits,
        errors: tally.errors,
        seconds,
        files_per_second: files as f64 / seconds,
        mb_per_second: bytes as f64 / 1e6 / seconds,
        latency_p50_ms: percentile(&tally.latencies, 0.50),
        latency_p99_ms: percentile(&tally.latencies, 0.99),
    })
}

/// The `q` quantile of sorted `micros`, in milliseconds.
fn percentile(micros: &[u32], q: f64) -> f64 {
    let Some(last) = micros.len().checked_sub(1) else {
        return 0.0;
    };
    let index = ((last as f64) * q).round() as usize;
    f64::from(micros[index]) / 1000.0
}

impl std::fmt::Display for RoundReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "round {}: {} agents, {} files ({} unique contents, {:.1} MB) in {:.3} s: \
             {:.0} files/s, {:.1} MB/s; scans {}, cache hits {}, coalesced {}, errors {}; \
             latency p50 {:.2} ms, p99 {:.2} ms",
            self.round,
            self.agents,
            self.files,
            self.unique_contents,
            self.bytes as f64 / 1e6,
            self.seconds,
            self.files_per_second,
            self.mb_per_second,
            self.scans,
            self.cache_hits,
            self.coalesced_waits,
            self.errors,
            self.latency_p50_ms,
            self.latency_p99_ms,
        )
    }
}
