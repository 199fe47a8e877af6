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
    borrow::Cow,
    fmt,
    io::{self, IsTerminal, Write},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use base64::prelude::{BASE64_STANDARD, Engine};
use indicatif::{ProgressBar, ProgressState, ProgressStyle};
use parking_lot::{Condvar, Mutex};
use serde::Serialize;
use tokio::sync::Notify;

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
    /// The file's name; one that is not UTF-8 is written as text output
    /// writes it (its bytes that are not as `\xNN`, see `named`).
    pub path: &'a str,
    /// The file's name as bytes (base64), when it is not UTF-8: the name
    /// to find the file by.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_base64: Option<String>,
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
    output: Output,
    progress: Option<ProgressBar>,
    started: Instant,
    /// Shared with the progress indicator, which shows the first two.
    files: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    infected: AtomicU64,
    failed: AtomicU64,
}

impl Reporter {
    /// A reporter printing in `format`. A progress indicator is shown on
    /// stderr only for text output on a terminal.
    pub fn new(format: Format) -> Self {
        let (files, bytes) = (Arc::<AtomicU64>::default(), Arc::<AtomicU64>::default());
        let progress = (format == Format::Text && std::io::stderr().is_terminal()).then(|| {
            // Drawn by the indicator's own thread from the totals: the
            // threads that record results never take its lock, which a
            // write held up on the terminal (Ctrl-S) keeps, and which would
            // hold up `lightagent`'s runtime thread, its heartbeats with it.
            let (files, bytes) = (Arc::clone(&files), Arc::clone(&bytes));
            let done = move |_: &ProgressState, out: &mut dyn fmt::Write| {
                let (files, bytes) = (files.load(Ordering::Relaxed), bytes.load(Ordering::Relaxed));
                let _ = write!(out, "{files} files, {}", Megabytes(bytes));
            };
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} {elapsed} {done}")
                    .expect("the progress template is valid")
                    .with_key("done", done),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Reporter {
            format,
            // Lines written to a terminal hide the bar while they are; a
            // bar held hidden for a write that waits (on a pipe) would hold
            // up every file's update of it.
            output: Output::start(progress.clone().filter(|_| io::stdout().is_terminal())),
            progress,
            started: Instant::now(),
            files,
            bytes,
            infected: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }

    /// Records and prints one file's result. It waits while output piles
    /// up unwritten (1 MiB): output that no one reads (a pager left
    /// paused) holds up the scan, not memory.
    pub fn file(&self, path: &Path, outcome: &ScanOutcome, cached: Option<bool>) {
        self.record(path, outcome, cached, true);
    }

    /// Records and prints one file's result, and never waits: for a caller
    /// on an async runtime's thread, which awaits [`Reporter::room`]
    /// before it takes more results instead.
    pub fn file_without_waiting(&self, path: &Path, outcome: &ScanOutcome, cached: Option<bool>) {
        self.record(path, outcome, cached, false);
    }

    fn record(&self, path: &Path, outcome: &ScanOutcome, cached: Option<bool>, wait: bool) {
        self.files.fetch_add(1, Ordering::Relaxed);
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
        self.bytes.fetch_add(scanned, Ordering::Relaxed);
        match self.format {
            // Lines of JSON go out in blocks, for a program to read; text
            // lines (findings, failures) at once, for a person.
            Format::Json => self
                .output
                .push(&json_line(path, outcome, cached), false, wait),
            Format::Text => {
                if let Some(line) = text_line(path, &outcome.verdict) {
                    self.output.push(&line, true, wait);
                }
            }
        }
    }

    /// Resolves once the output waiting to be written (besides the block
    /// being written) is under 64 KiB: a caller on an async runtime's
    /// thread awaits it before it takes more results, so that output left
    /// unread (a pager left paused) holds up its results, not its thread.
    pub async fn room(&self) {
        self.output.room().await;
    }

    /// Ends the run: prints the summary and returns it.
    pub fn finish(mut self) -> Summary {
        if let Some(bar) = &self.progress {
            bar.finish_and_clear();
        }
        let lost = self.output.close();
        let mut summary = Summary {
            files: self.files.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            infected: self.infected.into_inner(),
            failed: self.failed.into_inner(),
            elapsed: self.started.elapsed(),
            output_failed: false,
        };
        let written = match self.format {
            Format::Text => {
                let mut out = std::io::stdout().lock();
                writeln!(out, "{summary}").and_then(|()| out.flush())
            }
            // A closed stderr (`2>&1 | head`) loses the summary, not the
            // exit status.
            Format::Json => {
                let _ = writeln!(std::io::stderr(), "{summary}");
                Ok(())
            }
        };
        let lost = lost.or_else(|| lost_output(written));
        summary.output_failed = match lost {
            Some(err) => {
                let _ = writeln!(
                    std::io::stderr(),
                    "error: cannot write the results ({err}): some are missing from the output"
                );
                true
            }
            None => false,
        };
        summary
    }
}

/// Lines of JSON wait until this much has piled up, then go out together,
/// as through a buffered writer.
const FLUSH_AT: usize = 8 << 10;

/// [`Reporter::room`] resolves while less than this waits to be written,
/// besides the block being written.
const ROOM: usize = 64 << 10;

/// [`Reporter::file`] waits while this much waits to be written, besides
/// the block being written.
const BLOCK_AT: usize = 1 << 20;

/// Stdout, written on a thread of its own. A write blocks as long as the
/// output is not read, and the thread that made a result may have more to
/// do meanwhile: `lightagent` takes results on the one thread that also
/// keeps its session and connection alive, and a server ends a session
/// whose heartbeats stop.
struct Output {
    shared: Arc<Shared>,
    /// The writing thread, which returns the first error writing.
    writer: Option<JoinHandle<Option<io::Error>>>,
}

/// What the writing thread and those who push lines share.
struct Shared {
    queue: Mutex<Queue>,
    /// Wakes the writing thread: lines are due, or the output closed.
    due: Condvar,
    /// Wakes pushers waiting at [`BLOCK_AT`]: the lines waiting were
    /// taken to be written.
    taken: Condvar,
    /// Wakes those awaiting [`ROOM`], as `taken` does.
    room: Notify,
}

#[derive(Default)]
struct Queue {
    lines: Vec<u8>,
    /// The lines are to be written now, not when more have piled up.
    due: bool,
    closed: bool,
}

impl Output {
    fn start(progress: Option<ProgressBar>) -> Output {
        let shared = Arc::new(Shared {
            queue: Mutex::default(),
            due: Condvar::new(),
            taken: Condvar::new(),
            room: Notify::new(),
        });
        let writing = Arc::clone(&shared);
        let writer = std::thread::Builder::new()
            .name("output".into())
            .spawn(move || writing.write_all(progress))
            .expect("a thread for the output starts");
        Output {
            shared,
            writer: Some(writer),
        }
    }

    /// Queues `line`, to be written with the next block, or now if `flush`;
    /// waits first while [`BLOCK_AT`] waits, if `wait`.
    fn push(&self, line: &str, flush: bool, wait: bool) {
        let shared = &*self.shared;
        let mut queue = shared.queue.lock();
        while wait && queue.lines.len() >= BLOCK_AT {
            shared.taken.wait(&mut queue);
        }
        queue.lines.extend_from_slice(line.as_bytes());
        queue.lines.push(b'\n');
        if (flush || queue.lines.len() >= FLUSH_AT) && !queue.due {
            queue.due = true;
            shared.due.notify_one();
        }
    }

    async fn room(&self) {
        loop {
            let taken = self.shared.room.notified();
            if self.shared.queue.lock().lines.len() < ROOM {
                return;
            }
            taken.await;
        }
    }

    /// Writes what is left, ends the writing thread, and returns the
    /// first error writing.
    fn close(&mut self) -> Option<io::Error> {
        let writer = self.writer.take()?;
        {
            let mut queue = self.shared.queue.lock();
            queue.closed = true;
            self.shared.due.notify_one();
        }
        writer
            .join()
            .unwrap_or_else(|_| Some(io::Error::other("the thread writing them failed")))
    }
}

impl Drop for Output {
    /// A reporter dropped unfinished (a panic) still writes what it took.
    fn drop(&mut self) {
        self.close();
    }
}

impl Shared {
    /// The writing thread: writes the lines as they are due, until the
    /// output closes, and returns the first error that lost results. Once
    /// a write failed (a full disk, a closed stdout), lines are dropped as
    /// they come, to make room (see [`Output::push`]): the run says that
    /// results are missing.
    fn write_all(&self, progress: Option<ProgressBar>) -> Option<io::Error> {
        let mut block = Vec::new();
        let mut written = Ok(());
        loop {
            let mut queue = self.queue.lock();
            while !queue.due && !queue.closed {
                self.due.wait(&mut queue);
            }
            let closed = queue.closed;
            std::mem::swap(&mut queue.lines, &mut block);
            queue.due = false;
            drop(queue);
            self.taken.notify_all();
            self.room.notify_waiters();
            if !block.is_empty() && written.is_ok() {
                let write = || {
                    let mut out = std::io::stdout().lock();
                    out.write_all(&block).and_then(|()| out.flush())
                };
                written = match &progress {
                    Some(bar) => bar.suspend(write),
                    None => write(),
                };
            }
            block.clear();
            if closed {
                return lost_output(written);
            }
        }
    }
}

/// The error of a write that lost results: any but a closed stdout,
/// whose reader asked for no more.
fn lost_output(written: io::Result<()>) -> Option<io::Error> {
    written
        .err()
        .filter(|err| err.kind() != io::ErrorKind::BrokenPipe)
}

fn json_line(path: &Path, outcome: &ScanOutcome, cached: Option<bool>) -> String {
    let bytes = path.as_os_str().as_encoded_bytes();
    let path = named(bytes);
    let failure = outcome.verdict.failure();
    let detections = outcome.verdict.detections();
    let line = FileLine {
        path: &path,
        path_base64: matches!(path, Cow::Owned(_)).then(|| BASE64_STANDARD.encode(bytes)),
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
    let said = match verdict {
        Verdict::Clean => return None,
        Verdict::Infected(detections) => {
            // Through a server, the names are the server's word: printed
            // as they are, a control character could forge a line.
            let rules: Vec<_> = detections.iter().map(|d| printable(&d.rule)).collect();
            format!("{} FOUND", rules.join(", "))
        }
        Verdict::Failed(failure) => {
            let detail = printable(&failure.detail);
            format!("FAILED {} ({detail})", failure.reason)
        }
    };
    let path = named(path.as_os_str().as_encoded_bytes());
    Some(format!("{}: {said}", printable(&path)))
}

/// A file's name as text: as it is when UTF-8; otherwise each byte that
/// is not written `\xNN`, and each backslash `\\` (replaced by `�`, two
/// such names would print the same, and neither be found by what was
/// printed). A UTF-8 name holding the text `\xff` still prints as one
/// holding that byte: JSON output's `path_base64` tells them apart.
fn named(bytes: &[u8]) -> Cow<'_, str> {
    if let Ok(text) = std::str::from_utf8(bytes) {
        return Cow::Borrowed(text);
    }
    use fmt::Write;
    let mut text = String::with_capacity(bytes.len() + 8);
    for chunk in bytes.utf8_chunks() {
        text.push_str(&chunk.valid().replace('\\', "\\\\"));
        for byte in chunk.invalid() {
            let _ = write!(text, "\\x{byte:02x}");
        }
    }
    Cow::Owned(text)
}

/// `text` with its control characters escaped (`\n`, `\u{1b}`): a file
/// name holding a line break must not forge a line of the report, nor
/// one holding a terminal's escape sequence hide one.
fn printable(text: &str) -> Cow<'_, str> {
    match text.contains(char::is_control) {
        false => Cow::Borrowed(text),
        true => Cow::Owned(
            text.chars()
                .map(|c| match c.is_control() {
                    true => c.escape_default().to_string(),
                    false => c.to_string(),
                })
                .collect(),
        ),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verdict::FailReason;

    /// A file name holding a line break or a terminal's escape sequence
    /// is printed escaped: it cannot forge or hide a line of the report.
    #[test]
    fn control_characters_in_names_are_escaped() {
        let forged = Path::new("x\n/usr/bin/ls: FAILED io (gone)\u{1b}[2K");
        let verdict = Verdict::failed(FailReason::Io, "cannot read\n");
        let line = text_line(forged, &verdict).unwrap();
        assert_eq!(
            line,
            "x\\n/usr/bin/ls: FAILED io (gone)\\u{1b}[2K: FAILED io (cannot read\\n)"
        );
        // Rule names a server sent are its word, and escaped as well.
        let found = Verdict::Infected(vec![crate::verdict::Detection {
            rule: "Evil\nC:\\x: FAILED io (gone)".to_owned(),
            namespace: String::new(),
            tags: vec![],
            threat: String::new(),
            severity: crate::verdict::Severity::High,
        }]);
        let line = text_line(Path::new("a"), &found).unwrap();
        assert_eq!(line, "a: Evil\\nC:\\x: FAILED io (gone) FOUND");
        let plain = Path::new("C:\\Windows\\notepad.exe");
        assert!(matches!(
            printable(&plain.to_string_lossy()),
            Cow::Borrowed(_)
        ));
    }

    /// A name that is not UTF-8 prints its other bytes as `\xNN`, so that
    /// two such names never print the same, and JSON gives it whole.
    #[test]
    fn names_that_are_not_utf8_are_shown_and_given_whole() {
        use std::os::unix::ffi::OsStrExt;
        let failed = Verdict::failed(FailReason::Io, "gone");
        let name = |bytes: &[u8]| Path::new(std::ffi::OsStr::from_bytes(bytes)).to_owned();
        let (first, second) = (name(b"payload\xff.so"), name(b"payload\\xff\xfe.so"));
        let line = text_line(&first, &failed).unwrap();
        assert_eq!(line, "payload\\xff.so: FAILED io (gone)");
        let other = text_line(&second, &failed).unwrap();
        assert_eq!(other, "payload\\\\xff\\xfe.so: FAILED io (gone)");

        let outcome = ScanOutcome::failed(failed, 0, Duration::ZERO, Arc::from("v"));
        let json: serde_json::Value =
            serde_json::from_str(&json_line(&first, &outcome, None)).unwrap();
        assert_eq!(json["path"], "payload\\xff.so");
        let exact = BASE64_STANDARD.decode(json["path_base64"].as_str().unwrap());
        assert_eq!(exact.unwrap(), b"payload\xff.so");
        let plain = json_line(Path::new("notes.txt"), &outcome, None);
        assert!(!plain.contains("path_base64"), "{plain}");
    }
}
