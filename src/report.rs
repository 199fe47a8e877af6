//! Printing scan results, shared by `scanserver scan` and `lightagent scan`
//! so that both speak the same way.
//!
//! * Text, in the manner of clamscan: one line per infected file with the
//!   rules that matched, one per failed file with its reason; clean files are
//!   not listed. A summary line ends the run.
//! * JSON: one object per file per line on stdout (see [`FileLine`]); the
//!   summary goes to stderr so stdout stays machine-readable.
//!
//! The exit status follows clamscan: 0 when nothing was found, 1 when
//! something was found, 2 when nothing was found but some file could not be
//! scanned (a failure is never silently clean), or the results could not
//! all be written (a full disk under `> results.json`: lines lost may have
//! named infected files). A closed stdout (`| head`) is what its reader
//! asked for, and not a failure.

use std::{
    fmt,
    io::{self, BufWriter, IsTerminal, Stdout, Write},
    path::Path,
    sync::{
        Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::{
    engine::ScanOutcome,
    verdict::{Detection, Verdict},
};

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

impl Format {
    /// JSON when `json` (the `--json` flag), text otherwise.
    pub fn json_if(json: bool) -> Self {
        if json { Format::Json } else { Format::Text }
    }
}

/// One file's line of JSON output.
#[derive(Serialize)]
pub struct FileLine<'a> {
    pub path: &'a str,
    pub size: u64,
    /// The content's blake3 digest in hex; null when it was not read.
    pub blake3: Option<String>,
    /// `clean`, `infected` or `failed`.
    pub verdict: &'static str,
    /// For a failed verdict: `timeout`, `too_large`, `io` or `engine`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    /// For a failed verdict: what went wrong.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<&'a str>,
    /// Identifiers of the rules that matched.
    pub rules: Vec<&'a str>,
    /// The matching rules in full (namespace, tags, threat, severity).
    pub detections: &'a [Detection],
    /// Whether the verdict came from the server's cache (`lightagent` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cached: Option<bool>,
    pub elapsed_us: u64,
}

/// Prints results as they come, from any thread, and keeps the totals.
pub struct Reporter {
    format: Format,
    out: Mutex<BufWriter<Stdout>>,
    progress: Option<ProgressBar>,
    started: Instant,
    files: AtomicU64,
    bytes: AtomicU64,
    infected: AtomicU64,
    failed: AtomicU64,
    /// The first error writing the results, a closed stdout excepted.
    lost: OnceLock<io::Error>,
}

impl Reporter {
    /// A reporter printing in `format`. A progress indicator is shown on
    /// stderr only for text output on a terminal.
    pub fn new(format: Format) -> Self {
        let progress = (format == Format::Text && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} {elapsed} {msg}")
                    .expect("the progress template is valid"),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Reporter {
            format,
            out: Mutex::new(BufWriter::new(std::io::stdout())),
            progress,
            started: Instant::now(),
            files: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            infected: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            lost: OnceLock::new(),
        }
    }

    /// Records and prints one file's result.
    pub fn file(&self, path: &Path, outcome: &ScanOutcome, cached: Option<bool>) {
        let files = self.files.fetch_add(1, Ordering::Relaxed) + 1;
        // Megabytes and MB/s count the files that did not fail: a file
        // refused for its size, say, was never read.
        let scanned = match outcome.verdict {
            Verdict::Clean => outcome.size,
            Verdict::Infected(_) => {
                self.infected.fetch_add(1, Ordering::Relaxed);
                outcome.size
            }
            Verdict::Failed(_) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                0
            }
        };
        let bytes = self.bytes.fetch_add(scanned, Ordering::Relaxed) + scanned;
        let line = match self.format {
            Format::Json => Some(json_line(path, outcome, cached)),
            Format::Text => text_line(path, &outcome.verdict),
        };
        if let Some(line) = line {
            let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
            let write = |out: &mut BufWriter<Stdout>| {
                let mut written = writeln!(out, "{line}");
                if self.format == Format::Text {
                    written = written.and_then(|()| out.flush());
                }
                keep_error(&self.lost, written);
            };
            match &self.progress {
                Some(bar) => bar.suspend(|| write(&mut out)),
                None => write(&mut out),
            }
        }
        if let Some(bar) = &self.progress {
            bar.set_message(format!("{files} files, {}", Megabytes(bytes)));
        }
    }

    /// Ends the run: prints the summary and returns it.
    pub fn finish(self) -> Summary {
        if let Some(bar) = &self.progress {
            bar.finish_and_clear();
        }
        let mut out = self.out.into_inner().unwrap_or_else(|e| e.into_inner());
        let mut summary = Summary {
            files: self.files.into_inner(),
            bytes: self.bytes.into_inner(),
            infected: self.infected.into_inner(),
            failed: self.failed.into_inner(),
            elapsed: self.started.elapsed(),
            output_failed: false,
        };
        let written = match self.format {
            Format::Text => writeln!(out, "{summary}"),
            Format::Json => {
                eprintln!("{summary}");
                Ok(())
            }
        };
        keep_error(&self.lost, written.and_then(|()| out.flush()));
        summary.output_failed = match self.lost.into_inner() {
            Some(err) => {
                eprintln!(
                    "error: cannot write the results ({err}): some are missing from the output"
                );
                true
            }
            None => false,
        };
        summary
    }
}

/// Keeps the first error writing the results in `lost`, except a closed
/// stdout.
fn keep_error(lost: &OnceLock<io::Error>, written: io::Result<()>) {
    if let Err(err) = written
        && err.kind() != io::ErrorKind::BrokenPipe
    {
        let _ = lost.set(err);
    }
}

fn json_line(path: &Path, outcome: &ScanOutcome, cached: Option<bool>) -> String {
    let path = path.to_string_lossy();
    let failure = outcome.verdict.failure();
    let detections = outcome.verdict.detections();
    let line = FileLine {
        path: &path,
        size: outcome.size,
        blake3: outcome.digest.map(|d| d.to_hex().to_string()),
        verdict: outcome.verdict.kind(),
        reason: failure.map(|f| f.reason.as_str()),
        detail: failure.map(|f| f.detail.as_str()),
        rules: detections.iter().map(|d| d.rule.as_str()).collect(),
        detections,
        cached,
        elapsed_us: outcome.elapsed.as_micros() as u64,
    };
    serde_json::to_string(&line).expect("a file line always serializes")
}

fn text_line(path: &Path, verdict: &Verdict) -> Option<String> {
    match verdict {
        Verdict::Clean => None,
        Verdict::Infected(detections) => {
            let rules: Vec<_> = detections.iter().map(|d| d.rule.as_str()).collect();
            Some(format!("{}: {} FOUND", path.display(), rules.join(", ")))
        }
        Verdict::Failed(failure) => Some(format!(
            "{}: FAILED {} ({})",
            path.display(),
            failure.reason,
            failure.detail
        )),
    }
}

/// The totals of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub files: u64,
    /// The bytes of the files that did not fail.
    pub bytes: u64,
    pub infected: u64,
    pub failed: u64,
    pub elapsed: Duration,
    /// Some results could not be written.
    pub output_failed: bool,
}

impl Summary {
    /// The process exit status: 1 when something was found, otherwise 2 when
    /// some file failed or some result could not be written, otherwise 0.
    pub fn exit_code(&self) -> u8 {
        match (self.infected, self.failed, self.output_failed) {
            (1.., _, _) => 1,
            (0, 1.., _) | (0, 0, true) => 2,
            (0, 0, false) => 0,
        }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let seconds = self.elapsed.as_secs_f64();
        let rate = self.bytes as f64 / 1e6 / seconds.max(1e-9);
        write!(
            f,
            "scanned {} files, {}: {} infected, {} failed in {seconds:.2} s ({rate:.1} MB/s)",
            self.files,
            Megabytes(self.bytes),
            self.infected,
            self.failed,
        )
    }
}

/// A byte count shown in megabytes (10^6 bytes, as MB/s is).
struct Megabytes(u64);

impl fmt::Display for Megabytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.1} MB", self.0 as f64 / 1e6)
    }
}
