//! Memory-mapped scanning of large files, guarded against files that shrink
//! while they are mapped.
//!
//! Reading a page of a mapping that lies past the end of its file (because
//! another process truncated the file after it was mapped) raises `SIGBUS`,
//! which by default kills the whole server. The guard works like this:
//!
//! 1. While a thread reads a mapping through [`with_mapped`], the mapping's
//!    address range is recorded in a thread-local.
//! 2. A process-wide `SIGBUS` handler, installed once, looks at the faulting
//!    address. If it lies in the range recorded by the faulting thread, the
//!    handler maps anonymous zero pages over the rest of the range, from the
//!    vanished page on (`mmap` with `MAP_FIXED`, in one call: a page at a
//!    time, a scan reading here and there in a large truncated file would
//!    fault, and split the mapping, thousands of times), notes the fault,
//!    and returns: the read is retried and sees zeros, so the scan runs to
//!    its end, its result to be discarded.
//! 3. [`with_mapped`] then reports [`MappedError::Faulted`] instead of the
//!    scan's result, which is discarded. The size is also checked again after
//!    the scan, which catches a file that shrank without a fault
//!    ([`MappedError::Shrank`]); one that grew was scanned as it was when
//!    opened, as a file read into memory is.
//!
//! Mapped pages that are read count in the process's resident memory. So
//! that a few huge files scanned at once cannot add up to gigabytes, mapped
//! scans share a budget ([`MappedBudget`], the engine's `mapped_budget`): a
//! scan maps its file only once the shares of the others leave room for it
//! (a file larger than the budget takes all of it, and runs alone), in the
//! order the shares were asked for, so that smaller files cannot keep a
//! large one waiting for ever. A spooled upload takes its share before it
//! is handed to a scan thread (see `ScanSlot`), so that its wait parks a
//! task, not one of the few threads that small files are scanned on; a
//! local file's size is only known on its scan thread, which waits there
//! (as does a spooled file in a slot not reserved for it).
//!
//! A fault anywhere else is handed to the handler that was installed before
//! ours (the WASM runtime inside YARA-X installs one for its own traps), or,
//! if there was none, the default action is restored and the fault repeats,
//! so genuine crashes still crash. A `SIGBUS` that no fault raised (one sent
//! with `kill`) is ignored: handed on, it would have the default action
//! restored, and no access repeating to end the process, the guard would be
//! gone for the next truncated file.
//!
//! The handler and the scanning thread share the guarded range and the
//! fault flag through atomics: a plain cell, written in the handler while
//! the thread reads the mapping, could be assumed unchanged across the read
//! by the compiler.

use std::{
    fs::File,
    io,
    sync::{
        Arc, Once, OnceLock,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use memmap2::{Advice, Mmap, MmapOptions};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Why a mapped scan produced no result.
#[derive(Debug, thiserror::Error)]
pub enum MappedError {
    #[error("cannot map the file: {0}")]
    Map(#[from] io::Error),
    #[error("the file shrank while it was being scanned")]
    Shrank,
    #[error(
        "a page of the file could not be read while it was being scanned (it shrank, or the disk or file server failed)"
    )]
    Faulted,
}

thread_local! {
    /// The address range this thread is reading through a mapping, from
    /// its start to its end; both 0 when none.
    static GUARDED_START: AtomicUsize = const { AtomicUsize::new(0) };
    static GUARDED_END: AtomicUsize = const { AtomicUsize::new(0) };
    /// Set by the signal handler when a page of the guarded range vanished.
    static FAULTED: AtomicBool = const { AtomicBool::new(false) };
}

/// Bytes that mapped scans may have mapped at once, handed out in turn:
/// in KiB, as permits of a fair semaphore (which serves waiters first come
/// first, however many permits each asks for).
pub(super) struct MappedBudget {
    kib: Arc<Semaphore>,
    limit_kib: u32,
}

/// A share of a [`MappedBudget`], given back when dropped.
pub(super) struct MappedShare {
    _permit: OwnedSemaphorePermit,
    /// The size it was asked for.
    size: u64,
}

impl MappedShare {
    /// Whether the share is room enough to map `size` bytes.
    pub fn covers(&self, size: u64) -> bool {
        size <= self.size
    }
}

impl MappedBudget {
    /// A budget of `bytes` (rounded up to whole KiB, at least one).
    pub fn new(bytes: u64) -> MappedBudget {
        let limit_kib = u32::try_from(bytes.div_ceil(1024).max(1)).unwrap_or(u32::MAX);
        MappedBudget {
            kib: Arc::new(Semaphore::new(limit_kib as usize)),
            limit_kib,
        }
    }

    /// Waits for the shares asked for before, then for room for `size`
    /// bytes (all of the budget for a file larger than it).
    pub async fn share(&self, size: u64) -> MappedShare {
        let kib =
            u32::try_from(size.div_ceil(1024)).map_or(self.limit_kib, |k| k.min(self.limit_kib));
        let permit = Arc::clone(&self.kib)
            .acquire_many_owned(kib)
            .await
            .expect("the mapped budget is never closed");
        MappedShare {
            _permit: permit,
            size,
        }
    }

    /// KiB of the budget no share holds now.
    #[cfg(test)]
    pub fn free_kib(&self) -> usize {
        self.kib.available_permits()
    }

    /// [`Self::share`], waited for on this thread. Never with a share of
    /// the same budget held: the two could be more than it holds.
    pub fn share_blocking(&self, size: u64) -> MappedShare {
        futures_executor::block_on(self.share(size))
    }
}

/// Maps the first `size` bytes of `file` and runs `read` over them, with the
/// shrink guard and the budget described in the module documentation.
/// The caller holds the file's share of the budget until it returns.
pub(super) fn with_mapped<R>(
    file: &File,
    size: u64,
    read: impl FnOnce(&[u8]) -> R,
) -> Result<R, MappedError> {
    install_handler();
    let len = usize::try_from(size).map_err(|_| MappedError::Shrank)?;
    // SAFETY: the file may be changed by others while mapped; a shrink is
    // caught by the SIGBUS guard, and other changes only alter the bytes
    // scanned, as they would with read(2).
    let map: Mmap = unsafe { MmapOptions::new().len(len).map(file)? };
    let _ = map.advise(Advice::Sequential);

    let result = {
        let _guard = Guard::enter(&map);
        read(&map)
    };
    if FAULTED.with(|faulted| faulted.swap(false, Ordering::SeqCst)) {
        return Err(MappedError::Faulted);
    }
    // A file that grew meanwhile was scanned as it was when opened, as a
    // file read is; one that shrank may have lost pages read as zeros.
    if file.metadata().map_or(true, |m| m.len() < size) {
        return Err(MappedError::Shrank);
    }
    Ok(result)
}

/// Records the mapping's range for the signal handler while it lives, and
/// clears it on every exit, unwinding included.
struct Guard;

impl Guard {
    fn enter(map: &Mmap) -> Guard {
        let start = map.as_ptr() as usize;
        FAULTED.with(|faulted| faulted.store(false, Ordering::SeqCst));
        // The start first, and the end last: in between, the range is
        // empty, never from 0.
        GUARDED_START.with(|guarded| guarded.store(start, Ordering::SeqCst));
        GUARDED_END.with(|end| end.store(start + map.len(), Ordering::SeqCst));
        Guard
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        GUARDED_END.with(|end| end.store(0, Ordering::SeqCst));
        GUARDED_START.with(|start| start.store(0, Ordering::SeqCst));
    }
}

/// The handler that was installed before ours.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

/// The size of a memory page, read before the handler is installed
/// (`sysconf` is not async-signal-safe).
static PAGE_SIZE: AtomicUsize = AtomicUsize::new(0);

fn install_handler() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // SAFETY: sysconf(3), and plain sigaction(2) calls with
        // zero-initialised structures.
        unsafe {
            PAGE_SIZE.store(
                libc::sysconf(libc::_SC_PAGESIZE) as usize,
                Ordering::Relaxed,
            );
            // The handler before ours is kept before ours is installed: a
            // fault that is not ours, in between, finds it to pass on to.
            let mut previous: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut previous) == 0 {
                let _ = PREVIOUS.set(previous);
            }
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
        }
    });
}

/// The SIGBUS handler. Only async-signal-safe work: thread-local atomics
/// with constant initialisers, `mmap`, `sigaction`.
extern "C" fn on_sigbus(
    signal: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let (code, address) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    // Sent by a process (SI_USER, SI_QUEUE, SI_TKILL: codes of 0 and
    // below), not raised by a fault: nothing to repair, nor to pass on.
    if code <= 0 {
        return;
    }
    let start = GUARDED_START.with(|start| start.load(Ordering::SeqCst));
    let end = GUARDED_END.with(|end| end.load(Ordering::SeqCst));
    if start != 0 && (start..end).contains(&address) {
        let page = PAGE_SIZE.load(Ordering::Relaxed);
        let page_start = address & !(page - 1);
        let rest = (end - page_start).next_multiple_of(page);
        // SAFETY: the pages lie inside a mapping this thread owns and is
        // reading (mappings are whole pages); replacing them with zeros
        // keeps the reader's slice valid.
        let replaced = unsafe {
            libc::mmap(
                page_start as *mut libc::c_void,
                rest,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if replaced != libc::MAP_FAILED {
            FAULTED.with(|faulted| faulted.store(true, Ordering::SeqCst));
            return;
        }
    }
    forward(signal, info, context);
}

/// Hands a fault that is not ours to the previous handler, or restores the
/// default action so that the faulting access repeats and ends the process.
fn forward(signal: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    let previous = PREVIOUS.get();
    let handler = previous.map_or(libc::SIG_DFL, |p| p.sa_sigaction);
    // SAFETY: calling a handler the way the kernel would have, or resetting
    // the disposition with sigaction(2), which is async-signal-safe.
    unsafe {
        match (handler, previous) {
            (libc::SIG_DFL | libc::SIG_IGN, _) | (_, None) => {
                let mut default: libc::sigaction = std::mem::zeroed();
                default.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(signal, &default, std::ptr::null_mut());
            }
            (handler, Some(p)) if p.sa_flags & libc::SA_SIGINFO != 0 => {
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    std::mem::transmute(handler);
                f(signal, info, context);
            }
            (handler, Some(_)) => {
                let f: extern "C" fn(libc::c_int) = std::mem::transmute(handler);
                f(signal);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{io::Write, pin::Pin, pin::pin, time::Duration};

    use super::*;

    /// Whether `share` is still waiting after a moment (it is polled, so
    /// it takes its place in line).
    async fn waits(share: &mut Pin<&mut impl Future<Output = MappedShare>>) -> bool {
        tokio::time::timeout(Duration::from_millis(50), share.as_mut())
            .await
            .is_err()
    }

    /// `share`, which has room: a failure rather than a hang if not.
    async fn soon(share: impl Future<Output = MappedShare>) -> MappedShare {
        tokio::time::timeout(Duration::from_secs(10), share)
            .await
            .expect("the share has room")
    }

    #[tokio::test]
    async fn the_budget_is_handed_out_in_turn() {
        let budget = MappedBudget::new(100 << 10);
        let held = budget.share(50 << 10).await;
        let mut large = pin!(budget.share(60 << 10));
        let mut small = pin!(budget.share(50 << 10));
        assert!(waits(&mut large).await, "no room beside the share held");
        // The small one would fit beside the share held, but comes after
        // the large one.
        assert!(waits(&mut small).await, "a later share overtook");
        drop(held);
        let large = soon(large).await;
        assert!(waits(&mut small).await, "no room beside the large share");
        drop(large);
        drop(soon(small).await);
        // A file larger than the budget takes all of it.
        let whole = budget.share(1 << 30).await;
        let mut next = pin!(budget.share(1));
        assert!(waits(&mut next).await);
        drop(whole);
        soon(next).await;
    }

    #[test]
    fn a_file_that_shrinks_while_mapped_fails_instead_of_crashing() {
        let mut file = tempfile::tempfile().unwrap();
        let size = 8 << 20;
        file.write_all(&vec![b'x'; size]).unwrap();
        let result = with_mapped(&file, size as u64, |data| {
            let _ = data[0];
            file.set_len(4096).unwrap();
            // Touch every page, those past the new end included.
            data.iter().step_by(4096).map(|&b| b as u64).sum::<u64>()
        });
        assert!(matches!(result, Err(MappedError::Faulted)), "{result:?}");
    }

    /// A SIGBUS sent to the server (with `kill`) raised by no fault leaves
    /// the guard installed: a file that shrinks later still fails, rather
    /// than end the process.
    #[test]
    fn a_sigbus_sent_by_a_process_leaves_the_guard_installed() {
        install_handler();
        // SAFETY: raise(3) and a query with sigaction(2), on a structure
        // this test owns.
        let current = unsafe {
            assert_eq!(libc::raise(libc::SIGBUS), 0);
            let mut current: libc::sigaction = std::mem::zeroed();
            libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut current);
            current
        };
        assert_eq!(current.sa_sigaction, on_sigbus as *const () as usize);
    }

    /// A file that grows while mapped is scanned as it was when opened, as
    /// one read into memory is.
    #[test]
    fn a_file_that_grows_while_mapped_is_scanned_as_it_was() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&[7u8; 100_000]).unwrap();
        let mut writer = file.try_clone().unwrap();
        let sum = with_mapped(&file, 100_000, |data| {
            writer.write_all(&[1u8; 100_000]).unwrap();
            data.iter().map(|&b| b as u64).sum::<u64>()
        });
        assert_eq!(sum.unwrap(), 700_000);
    }

    #[test]
    fn an_unchanged_file_reads_normally() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&[7u8; 100_000]).unwrap();
        let sum = with_mapped(&file, 100_000, |data| {
            data.iter().map(|&b| b as u64).sum::<u64>()
        });
        assert_eq!(sum.unwrap(), 700_000);
    }
}
