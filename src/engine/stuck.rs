//! Which scan threads are stuck: busy with one job far longer than the
//! scan timeout allows.
//!
//! YARA-X stops a scan at the timeout, but a job is more than the scan: it
//! reads and hashes its content, and a bug in a module's parser, or a read
//! from a spool on a disk that hangs, could keep its thread for ever.
//! Nothing would fail: that file would never get its verdict, and on a
//! two-core SVM two such files would stop all scanning while the status
//! said OK. A thread cannot be stopped from outside, so the engine only
//! tells: each scan thread notes when it began its job, and
//! [`Engine::stuck_threads`](super::Engine::stuck_threads) counts the
//! threads busy for longer than [`STUCK_AFTER_TIMEOUTS`] scan timeouts.
//! The SVM's status says so (SCAN_THREADS_STUCK while some threads still
//! scan, ALL_SCAN_THREADS_STUCK once none does), for operators to restart
//! the server and agents to pick another SVM.
//!
//! A local scan's job may also wait for a file's lease or for room in the
//! mapped budget; a server's jobs wait for nothing (spooled uploads get
//! their room before they are dispatched).

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

/// A job running this many scan timeouts is stuck: its scan would have
/// been stopped after one, and reading and hashing even the largest file
/// allowed takes a small part of another.
pub const STUCK_AFTER_TIMEOUTS: u32 = 3;

/// When each of the pool's threads began the job it runs.
pub(super) struct Busy {
    /// Per thread: milliseconds from `epoch` to the start of its job, plus
    /// one; 0 while it runs none.
    began: Box<[AtomicU64]>,
    epoch: Instant,
}

/// Marks its thread busy until it is dropped (unwinding included).
pub(super) struct BusyGuard<'a>(&'a AtomicU64);

impl Busy {
    /// Room for a pool of `threads` threads.
    pub fn new(threads: usize) -> Busy {
        Busy {
            began: (0..threads).map(|_| AtomicU64::new(0)).collect(),
            epoch: Instant::now(),
        }
    }

    /// Notes that this thread begins a job; `None` off the pool's threads.
    pub fn begin(&self) -> Option<BusyGuard<'_>> {
        let slot = self.began.get(rayon::current_thread_index()?)?;
        slot.store(self.millis() + 1, Ordering::Relaxed);
        Some(BusyGuard(slot))
    }

    /// How many threads have been busy with one job for longer than `age`.
    pub fn longer_than(&self, age: Duration) -> usize {
        let now = self.millis();
        let age = u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
        self.began
            .iter()
            .map(|slot| slot.load(Ordering::Relaxed))
            .filter(|&began| began != 0 && now.saturating_sub(began - 1) > age)
            .count()
    }

    fn millis(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.0.store(0, Ordering::Relaxed);
    }
}
