//! Scan workers: the per-thread state that makes a scan cheap.
//!
//! Building a YARA-X scanner allocates its WASM store and match tables, far
//! more work than scanning a small file. So each thread that scans keeps, in
//! a thread-local [`Worker`], one scanner bound to the ruleset it was built
//! for, and a read buffer that is reused from file to file. A scanner is
//! rebuilt only when the engine's ruleset has changed since (compared by
//! pointer, which costs nothing).
//!
//! A scanner borrows its rules; to keep it across calls the worker owns both
//! through [`self_cell`], with the rules behind an `Arc` so that a ruleset
//! replaced in the engine lives on exactly as long as a worker still scans
//! with it.

use std::{
    any::Any,
    cell::RefCell,
    fs::File,
    io::Read,
    panic::{self, AssertUnwindSafe},
    path::Path,
    sync::Arc,
    time::Instant,
};

use yara_x::{ScanError, Scanner};

use super::{Limits, ScanOutcome, mapped};
use crate::{
    signatures::{EXTERNALS, Ruleset},
    verdict::{Detection, FailReason, Verdict},
};

/// Files up to this size are read into the worker's buffer; larger ones are
/// memory-mapped. Reading small files is faster than mapping them, and the
/// buffer a worker keeps is bounded by this size.
const READ_LIMIT: u64 = 32 << 20;

type BorrowedScanner<'a> = Scanner<'a>;

self_cell::self_cell!(
    /// A YARA-X scanner together with the rules it scans with.
    struct BoundScanner {
        owner: Arc<Ruleset>,
        #[not_covariant]
        dependent: BorrowedScanner,
    }
);

impl BoundScanner {
    fn build(ruleset: &Arc<Ruleset>) -> Self {
        BoundScanner::new(Arc::clone(ruleset), |ruleset| {
            let mut scanner = Scanner::new(ruleset.rules());
            // Verdicts need which rules matched, not every match of every
            // pattern: stop searching a pattern once it is found.
            scanner.fast_scan(true);
            scanner
        })
    }
}

/// The state a scan thread keeps between scans.
#[derive(Default)]
struct Worker {
    scanner: Option<BoundScanner>,
    /// Whether the current rules declare the external variables (rules
    /// pre-compiled elsewhere may not).
    externals: bool,
    buffer: Vec<u8>,
}

thread_local! {
    static WORKER: RefCell<Worker> = RefCell::new(Worker::default());
}

/// Drops this thread's scanner, so that the rules it holds can be freed. The
/// next scan builds one for the current rules.
pub(super) fn release_stale_scanner() {
    WORKER.with(|w| w.borrow_mut().scanner = None);
}

/// Scans in-memory content.
pub(super) fn scan_bytes(
    ruleset: &Arc<Ruleset>,
    limits: Limits,
    data: &[u8],
    name: Option<&Path>,
) -> ScanOutcome {
    let started = Instant::now();
    let size = data.len() as u64;
    let (digest, verdict) = if size > limits.max_scan_size {
        (None, too_large(size, limits))
    } else {
        let verdict = with_worker(|worker| worker.scan(ruleset, limits, data, name));
        (Some(blake3::hash(data)), verdict)
    };
    ScanOutcome {
        verdict,
        size,
        digest,
        rules_version: ruleset.version_arc(),
        elapsed: started.elapsed(),
    }
}

/// Scans a file: read into the worker's buffer when small, memory-mapped
/// when large.
pub(super) fn scan_file(
    ruleset: &Arc<Ruleset>,
    limits: Limits,
    path: &Path,
    name: Option<&Path>,
) -> ScanOutcome {
    let started = Instant::now();
    let name = Some(name.unwrap_or(path));
    let (size, digest, verdict) = match open_regular(path) {
        Err(verdict) => (0, None, verdict),
        Ok((_, size)) if size > limits.max_scan_size => (size, None, too_large(size, limits)),
        Ok((file, size)) if size <= READ_LIMIT => {
            with_worker(|worker| worker.scan_read(ruleset, limits, file, size, name))
        }
        Ok((file, size)) => {
            let scanned = mapped::with_mapped(&file, size, |data| {
                let verdict = with_worker(|worker| worker.scan(ruleset, limits, data, name));
                (blake3::hash(data), verdict)
            });
            match scanned {
                Ok((digest, verdict)) => (size, Some(digest), verdict),
                Err(err) => (size, None, Verdict::failed(FailReason::Io, err.to_string())),
            }
        }
    };
    ScanOutcome {
        verdict,
        size,
        digest,
        rules_version: ruleset.version_arc(),
        elapsed: started.elapsed(),
    }
}

/// Opens `path` if it is a regular file (a FIFO or device would block or
/// never end), returning it with its size.
fn open_regular(path: &Path) -> Result<(File, u64), Verdict> {
    let io_failure = |err: std::io::Error| Verdict::failed(FailReason::Io, err.to_string());
    let file = File::open(path).map_err(io_failure)?;
    let metadata = file.metadata().map_err(io_failure)?;
    if !metadata.is_file() {
        return Err(Verdict::failed(FailReason::Io, "not a regular file"));
    }
    Ok((file, metadata.len()))
}

fn too_large(size: u64, limits: Limits) -> Verdict {
    Verdict::failed(
        FailReason::TooLarge,
        format!(
            "{size} bytes is over the maximum scan size of {} bytes",
            limits.max_scan_size
        ),
    )
}

/// Runs `f` with this thread's worker. A panic inside (a bug in a module
/// parsing hostile input, say) fails the scan instead of the thread, and the
/// worker, whose scanner may be left inconsistent, starts afresh.
fn with_worker<T: Failable>(f: impl FnOnce(&mut Worker) -> T) -> T {
    let result =
        WORKER.with(|worker| panic::catch_unwind(AssertUnwindSafe(|| f(&mut worker.borrow_mut()))));
    result.unwrap_or_else(|payload| {
        WORKER.with(|worker| *worker.borrow_mut() = Worker::default());
        T::from_panic(panic_message(&*payload))
    })
}

/// Results that a panic in the scan turns into an engine failure.
trait Failable {
    fn from_panic(message: String) -> Self;
}

impl Failable for Verdict {
    fn from_panic(message: String) -> Self {
        Verdict::failed(FailReason::Engine, format!("the scan panicked: {message}"))
    }
}

impl Failable for (u64, Option<blake3::Hash>, Verdict) {
    fn from_panic(message: String) -> Self {
        (0, None, Verdict::from_panic(message))
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

impl Worker {
    /// Reads a small file into the reusable buffer, then hashes and scans it.
    fn scan_read(
        &mut self,
        ruleset: &Arc<Ruleset>,
        limits: Limits,
        file: File,
        size: u64,
        name: Option<&Path>,
    ) -> (u64, Option<blake3::Hash>, Verdict) {
        let mut buffer = std::mem::take(&mut self.buffer);
        buffer.clear();
        // A file that grows while it is read is scanned as it was when
        // opened; one that shrinks is simply shorter.
        let read = file.take(size).read_to_end(&mut buffer);
        let result = match read {
            Ok(_) => {
                let verdict = self.scan(ruleset, limits, &buffer, name);
                (buffer.len() as u64, Some(blake3::hash(&buffer)), verdict)
            }
            Err(err) => (size, None, Verdict::failed(FailReason::Io, err.to_string())),
        };
        self.buffer = buffer;
        result
    }

    /// Scans `data` with the scanner for `ruleset`, building it if needed.
    fn scan(
        &mut self,
        ruleset: &Arc<Ruleset>,
        limits: Limits,
        data: &[u8],
        name: Option<&Path>,
    ) -> Verdict {
        let stale = self
            .scanner
            .as_ref()
            .is_none_or(|s| !Arc::ptr_eq(s.borrow_owner(), ruleset));
        if stale {
            let mut scanner = BoundScanner::build(ruleset);
            self.externals =
                scanner.with_dependent_mut(|_, s| s.set_global(EXTERNALS[0], "").is_ok());
            self.scanner = Some(scanner);
        }
        let externals = self.externals;
        let scanner = self.scanner.as_mut().expect("scanner was just built");
        scanner.with_dependent_mut(|_, scanner| {
            scanner.set_timeout(limits.timeout);
            if externals {
                set_externals(scanner, name);
            }
            match scanner.scan(data) {
                Ok(results) => {
                    let detections: Vec<_> = results
                        .matching_rules()
                        .map(|r| Detection::from_rule(&r))
                        .collect();
                    if detections.is_empty() {
                        Verdict::Clean
                    } else {
                        Verdict::Infected(detections)
                    }
                }
                Err(ScanError::Timeout) => Verdict::failed(
                    FailReason::Timeout,
                    format!("scan exceeded the timeout of {:?}", limits.timeout),
                ),
                Err(err) => Verdict::failed(FailReason::Engine, err.to_string()),
            }
        })
    }
}

/// Sets the external variables for the file being scanned, THOR-style:
/// `filename` is the base name, `filepath` the folder, `extension` the
/// lower-case extension with its dot. `filetype` and `owner` stay empty.
/// Values persist in a scanner, so every one is set on every scan.
fn set_externals(scanner: &mut Scanner<'_>, name: Option<&Path>) {
    let filename = name.and_then(Path::file_name).map(|s| s.to_string_lossy());
    let filepath = name.and_then(Path::parent).map(|s| s.to_string_lossy());
    let extension = name
        .and_then(Path::extension)
        .map(|e| format!(".{}", e.to_string_lossy().to_lowercase()))
        .unwrap_or_default();
    for (ident, value) in [
        ("filename", filename.as_deref().unwrap_or_default()),
        ("filepath", filepath.as_deref().unwrap_or_default()),
        ("extension", extension.as_str()),
    ] {
        scanner
            .set_global(ident, value)
            .expect("externals are declared as strings");
    }
}
