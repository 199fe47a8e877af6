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

use super::{
    Limits, ScanOutcome, TIMEOUT_TICK,
    mapped::{self, MappedBudget},
};
use crate::{
    cache::{CacheKey, Digest, SharedCache},
    files::{self, LocalFile},
    metrics::Metrics,
    signatures::{NameExternals, Ruleset},
    verdict::{Detection, FailReason, Verdict},
};

/// Files up to this size are read into the worker's buffer; larger ones are
/// memory-mapped. Reading small files is faster than mapping them, and the
/// buffer a worker keeps is bounded by this size.
const READ_LIMIT: u64 = 32 << 20;

/// The largest buffer a worker keeps for its next file: one read for a
/// larger file is let go once scanned. Kept at the read limit, the buffers
/// of a many-core SVM would hold a gigabyte that no budget counts.
const KEPT_BUFFER: usize = 4 << 20;

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

/// What one scan needs besides the content.
pub(super) struct Context<'a> {
    pub ruleset: Arc<Ruleset>,
    pub limits: Limits,
    pub cache: &'a SharedCache,
    pub metrics: &'a Metrics,
    /// The content's name, for the external variables.
    pub name: Option<&'a Path>,
    /// The digest, when the server computed it already.
    pub digest: Option<Digest>,
    /// The budget a mapped scan takes its share of.
    pub mapped: &'a MappedBudget,
    /// The job's slot holds its share of the mapped budget already (a
    /// spooled upload's, see `ScanSlot`): the scan maps without waiting.
    pub share_held: bool,
}

impl Context<'_> {
    /// Scans in-memory content.
    pub fn scan_bytes(&self, data: &[u8]) -> ScanOutcome {
        let started = Instant::now();
        let size = data.len() as u64;
        if size > self.limits.max_scan_size {
            return self.outcome(started, size, Judged::failed(too_large(size, self.limits)));
        }
        let judged = with_worker(|worker| self.judge(worker, data, self.name));
        self.outcome(started, size, judged)
    }

    /// Scans a local file under its path (or the job's name): read into
    /// the worker's buffer when small, memory-mapped when large.
    pub fn scan_file(&self, file: &LocalFile) -> ScanOutcome {
        // A digest given would be trusted as the content's (`judge`): only
        // content the server received and hashed itself comes with one.
        debug_assert!(self.digest.is_none(), "a local file comes without a digest");
        let path = &file.path;
        let opened = file.open(self.limits.timeout);
        // Timed once open: a wait for another process's lease on the file
        // is not the scan's time (nor, below, one for mapped room).
        let started = Instant::now();
        match opened {
            Ok((file, 0)) => self.scan_unsized(started, &file, Some(self.name.unwrap_or(path))),
            Ok((file, size)) => {
                let name = Some(self.name.unwrap_or(path));
                self.scan_opened(&file, size, name, size <= READ_LIMIT)
            }
            Err(err) => {
                let verdict = Verdict::failed(FailReason::Io, err.to_string());
                self.outcome(started, 0, Judged::failed(verdict))
            }
        }
    }

    /// Scans a spooled upload through the handle it was written with (never
    /// opened again by its path, which a local user might have replaced),
    /// always memory-mapped: its pages are in the page cache. The `size`
    /// received is what is scanned; a file found shorter fails, as its
    /// verdict would be cached under the digest of the whole.
    pub fn scan_spooled(&self, file: &File, size: u64) -> ScanOutcome {
        let started = Instant::now();
        let failed = |message: String| {
            let verdict = Verdict::failed(FailReason::Io, message);
            self.outcome(started, size, Judged::failed(verdict))
        };
        match file.metadata() {
            Ok(metadata) if metadata.len() < size => failed(format!(
                "the spooled upload is {} bytes on disk, {size} were received",
                metadata.len()
            )),
            Ok(_) => self.scan_opened(file, size, self.name, false),
            Err(err) => failed(err.to_string()),
        }
    }

    /// Scans a regular file whose size reads as 0, as files of /proc, /sys
    /// and some FUSE file systems do whatever they hold: read to its end,
    /// never taken for empty unread. Such files are read into memory, so
    /// up to the read limit (32 MiB) only; one that holds more fails.
    fn scan_unsized(&self, started: Instant, file: &File, name: Option<&Path>) -> ScanOutcome {
        let limit = self.limits.max_scan_size.min(READ_LIMIT);
        let mut size = 0;
        let judged = with_worker(|worker| {
            let mut buffer = std::mem::take(&mut worker.buffer);
            buffer.clear();
            let judged = match file.take(limit + 1).read_to_end(&mut buffer) {
                Err(err) => Judged::failed(Verdict::failed(FailReason::Io, err.to_string())),
                Ok(read) if read as u64 > limit => Judged::failed(Verdict::failed(
                    FailReason::TooLarge,
                    format!("the file says it holds 0 bytes, and holds more than {limit}"),
                )),
                Ok(_) => self.judge(worker, &buffer, name),
            };
            size = buffer.len() as u64;
            // The buffer is kept for small files only.
            if buffer.capacity() <= KEPT_BUFFER {
                worker.buffer = buffer;
            }
            judged
        });
        self.outcome(started, size, judged)
    }

    /// Scans an open file of `size` bytes: `read` into the worker's buffer,
    /// or memory-mapped within the mapped budget (timed once it has room).
    fn scan_opened(&self, file: &File, size: u64, name: Option<&Path>, read: bool) -> ScanOutcome {
        if size > self.limits.max_scan_size {
            let verdict = too_large(size, self.limits);
            return self.outcome(Instant::now(), size, Judged::failed(verdict));
        }
        let _share = (!read && !self.share_held).then(|| self.mapped.share_blocking(size));
        let started = Instant::now();
        let judged = if read {
            with_worker(|worker| {
                let mut buffer = std::mem::take(&mut worker.buffer);
                let judged =
                    read_into(&mut buffer, file, size).map(|()| self.judge(worker, &buffer, name));
                // Kept for the next file if small (see `KEPT_BUFFER`).
                if buffer.capacity() <= KEPT_BUFFER {
                    worker.buffer = buffer;
                }
                judged
            })
        } else {
            mapped::with_mapped(file, size, |data| {
                with_worker(|worker| self.judge(worker, data, name))
            })
            .map(|judged| match self.digest {
                Some(_) => judged,
                None => judged.not_to_keep(),
            })
            .map_err(|err| err.to_string())
        };
        let judged =
            judged.unwrap_or_else(|err| Judged::failed(Verdict::failed(FailReason::Io, err)));
        self.outcome(started, size, judged)
    }

    /// The verdict on `data`: from the cache when its digest is known there,
    /// from a scan otherwise. A fresh verdict is cached by [`Self::outcome`],
    /// once the content is known to have been read whole.
    fn judge(&self, worker: &mut Worker, data: &[u8], name: Option<&Path>) -> Judged {
        let digest = self.digest.unwrap_or_else(|| blake3::hash(data));
        let key = CacheKey::new(&digest, &self.ruleset, name);
        // Content that comes with its digest was looked up by the service
        // already (and counted there); this second look catches a verdict
        // made in between.
        let hit = match self.digest {
            Some(_) => self.cache.peek(&key),
            None => self.cache.get(&key),
        };
        if let Some(hit) = hit {
            return Judged {
                digest: Some(digest),
                verdict: hit.verdict.clone(),
                origin: Origin::Cache,
            };
        }
        Judged {
            digest: Some(digest),
            verdict: worker.scan(&self.ruleset, self.limits, data, name),
            origin: Origin::Scan(key),
        }
    }

    /// The scan's outcome; a fresh verdict goes into the cache (failures
    /// excepted, see [`SharedCache::insert`]). Only content read whole and
    /// scanned to a verdict counts as a scan: not a file that could not be
    /// opened or read, or was too large, nor one that shrank while mapped
    /// or whose scan panicked.
    fn outcome(&self, started: Instant, size: u64, judged: Judged) -> ScanOutcome {
        let cached = matches!(judged.origin, Origin::Cache);
        if matches!(judged.origin, Origin::Scan(_) | Origin::Unkept) {
            self.metrics.scans.inc();
            self.metrics.scanned_bytes.inc_by(size);
            self.metrics
                .scan_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        if let Origin::Scan(key) = judged.origin {
            self.cache
                .insert(key, judged.verdict.clone(), &self.ruleset.version_arc());
        }
        ScanOutcome {
            verdict: judged.verdict,
            size,
            digest: judged.digest,
            rules_version: self.ruleset.version_arc(),
            cached,
            coalesced: false,
            elapsed: started.elapsed(),
        }
    }
}

/// A verdict with the digest of the content it is about, if it was read.
struct Judged {
    digest: Option<Digest>,
    verdict: Verdict,
    origin: Origin,
}

/// Where a verdict came from.
enum Origin {
    /// The cache.
    Cache,
    /// A scan of the content, to be cached under this key.
    Scan(CacheKey),
    /// A scan of content that may not be that of its digest: a local file
    /// read twice through a live mapping, hashed then scanned, which
    /// another process may have written to in between. Cached, its verdict
    /// would be served for content it was not made on. (A spooled upload
    /// comes with the digest it was received under, and only the server
    /// writes to it.)
    Unkept,
    /// Nowhere: the content could not be read or scanned.
    Failure,
}

impl Judged {
    /// The verdict, of a scan not to be cached (see [`Origin::Unkept`]).
    fn not_to_keep(self) -> Self {
        let origin = match self.origin {
            Origin::Scan(_) => Origin::Unkept,
            other => other,
        };
        Judged { origin, ..self }
    }

    /// A failure before the content could be read.
    fn failed(verdict: Verdict) -> Self {
        Judged {
            digest: None,
            verdict,
            origin: Origin::Failure,
        }
    }
}

/// Reads the `size` bytes `file` had when opened into `buffer`. A file
/// that grows meanwhile is scanned as it was when opened; one that shrinks
/// (truncated to be rewritten, say) fails: its verdict would be that of a
/// part of it, as the mapped path's shrink guard also says.
fn read_into(buffer: &mut Vec<u8>, file: &File, size: u64) -> Result<(), String> {
    buffer.clear();
    // Room for exactly `size`: reading to the end then probes for more
    // without doubling the buffer (a 32 MiB file would have grown it to
    // 64 MiB, kept by the worker).
    buffer.reserve_exact(size as usize);
    file.take(size)
        .read_to_end(buffer)
        .map_err(|err| err.to_string())?;
    if buffer.len() as u64 != size {
        return Err(files::shrank(buffer.len() as u64, size).to_string());
    }
    Ok(())
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
fn with_worker<T: FromPanic>(f: impl FnOnce(&mut Worker) -> T) -> T {
    let result =
        WORKER.with(|worker| panic::catch_unwind(AssertUnwindSafe(|| f(&mut worker.borrow_mut()))));
    result.unwrap_or_else(|payload| {
        WORKER.with(|worker| *worker.borrow_mut() = Worker::default());
        T::from_panic(format!("the scan panicked: {}", panic_message(&*payload)))
    })
}

/// Results that a panic in the scan turns into an engine failure.
trait FromPanic {
    fn from_panic(message: String) -> Self;
}

impl FromPanic for Judged {
    fn from_panic(message: String) -> Self {
        Judged::failed(Verdict::failed(FailReason::Engine, message))
    }
}

impl<T: FromPanic> FromPanic for Result<T, String> {
    fn from_panic(message: String) -> Self {
        Ok(T::from_panic(message))
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
            self.scanner = Some(BoundScanner::build(ruleset));
        }
        let externals = ruleset.declares_externals();
        let scanner = self.scanner.as_mut().expect("scanner was just built");
        scanner.with_dependent_mut(|_, scanner| {
            // A timeout of N seconds ends a scan at the Nth tick of
            // YARA-X's clock after it began, anywhere from N - 1 to N
            // seconds later (with 1s, a scan of a few milliseconds over a
            // tick would fail): see `TIMEOUT_TICK`.
            scanner.set_timeout(limits.timeout + TIMEOUT_TICK);
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

/// Sets the external variables for the file being scanned (see
/// [`NameExternals`]). Values persist in a scanner, so every one is set on
/// every scan.
fn set_externals(scanner: &mut Scanner<'_>, name: Option<&Path>) {
    for (ident, value) in NameExternals::of(name).pairs() {
        scanner
            .set_global(ident, value)
            .expect("externals are declared as strings");
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Seek, Write};

    use super::*;

    /// A file read into the worker's buffer takes its size, not the next
    /// power of two (which a file just over a power of two would double).
    #[test]
    fn a_file_read_takes_room_for_its_size_only() {
        let size = (1 << 20) + 1;
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&vec![1; size]).unwrap();
        file.rewind().unwrap();
        let mut buffer = Vec::new();
        read_into(&mut buffer, &file, size as u64).unwrap();
        assert_eq!((buffer.len(), buffer.capacity()), (size, size));
    }
}
