//! Which scan threads are stuck: busy with one job far longer than the
//! scan timeout allows.
//!
//! YARA-X stops a scan at the timeout, but a job is more than the scan: it
//! reads and hashes its content, and a bug in a module's parser, or a read
//! from a spool on a disk that hangs, could keep its thread for ever.
//! Nothing would fail: that file would never get its verdict, and on a
//! two-core SVM two such files would stop all scanning while the status
//! said OK. A thread cannot be stopped from outside, so the engine tells:
//! each scan thread notes when it began its job, and
//! [`Engine::stuck_threads`](super::Engine::stuck_threads) counts the
//! threads busy for longer than [`STUCK_AFTER_TIMEOUTS`] scan timeouts.
//! The SVM's status says so (SCAN_THREADS_STUCK while some threads still
//! scan, ALL_SCAN_THREADS_STUCK once none does), for operators to restart
//! the server and agents to pick another SVM. A server's job keeps who its
//! outcome is for with it ([`Job::then`]): the look that finds it stuck
//! tells them of a failure (`engine`), so that the file gets its reply and
//! its agent its place back; the thread, should it come back, tells no
//! one. (The status looks every second.)
//!
//! What sticks a thread is most likely the content it scans, and agents
//! send it again: to another thread (a VM whose wait for that scan ended
//! sends its own copy), and after the restart that the service manager's
//! watchdog makes once every thread is stuck, to the new server, which it
//! would stick in turn. One file, from one VM, would keep the SVM from
//! scanning for every VM. So the digest of content that stuck a thread is
//! remembered ([`StuckContents`]): it is refused from then on, its file
//! failing with `engine` (never clean), and in the state folder, after a
//! restart too. A new version of the server may scan it: the list is set
//! aside when another version made it. Content whose thread comes back
//! after all (slow, this once) is refused for the rest of the run, but no
//! longer kept: it brought about no restart. And content another thread
//! has been on for two scan timeouts is not scanned a second time at once
//! ([`Busy::on_longer_than`]): it would stick that thread too before the
//! first counts as stuck.
//!
//! A local scan's job may also wait for a file's lease or for room in the
//! mapped budget; a server's jobs wait for nothing (spooled uploads get
//! their room before they are dispatched). Only the server's jobs, whose
//! digest is known before they start, are remembered.

use std::{
    collections::HashMap,
    io,
    path::{Path, PathBuf},
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use super::{ScanOutcome, mapped::MappedShare};
use crate::{cache::Digest, files, state};

/// A job running this many scan timeouts is stuck: its scan would have
/// been stopped after one, and reading and hashing even the largest file
/// allowed takes a small part of another.
pub const STUCK_AFTER_TIMEOUTS: u32 = 3;

/// When each of the pool's threads began the job it runs, and the digest
/// of its content when known.
pub(super) struct Busy {
    slots: Box<[Slot]>,
    epoch: Instant,
}

#[derive(Default)]
struct Slot {
    /// Milliseconds from `epoch` to the start of the job, plus one; 0
    /// while the thread runs none. What a look reads first: only a job
    /// running long is looked at further.
    began: AtomicU64,
    /// The job, read as one (contended only by such a look, and by a
    /// copy's look for a scan of its content: see [`Busy::on_for`]).
    job: Mutex<Job>,
}

#[derive(Default)]
struct Job {
    /// As `began` is.
    began: u64,
    digest: Option<Digest>,
    /// Its digest was handed out as that of content sticking its thread.
    noted: bool,
    /// Its content's share of the mapped budget, taken before it began:
    /// given back when it ends, or once it counts as stuck (see
    /// [`Busy::longer_than`]).
    share: Option<MappedShare>,
    /// Who is told its outcome (a server's job): told by the thread when
    /// it ends, or, once it counts as stuck, by the look that finds it so,
    /// with a failure (see [`Busy::longer_than`]). Whoever takes it first
    /// tells: once.
    then: Option<Handoff>,
}

/// What a job's outcome is handed to.
pub(super) type Handoff = Box<dyn FnOnce(ScanOutcome) + Send>;

/// The jobs a look found running for too long (see [`Busy::longer_than`]).
pub(super) struct LongJobs {
    pub count: usize,
    /// The digests of their contents, each once.
    pub digests: Vec<Digest>,
    /// Who their outcomes were to be handed to, and their contents'
    /// digests, to be told of a failure now: their threads may never end.
    pub handoffs: Vec<(Handoff, Option<Digest>)>,
}

/// Marks its thread busy until it ends ([`BusyGuard::end`]) or is dropped
/// (unwinding included).
pub(super) struct BusyGuard<'a>(&'a Slot);

impl Busy {
    /// Room for a pool of `threads` threads.
    pub fn new(threads: usize) -> Busy {
        Busy {
            slots: (0..threads).map(|_| Slot::default()).collect(),
            epoch: Instant::now(),
        }
    }

    /// Notes that this thread begins a job on content of `digest`, holding
    /// `share`, its outcome to be handed to `then` (taken: see
    /// [`Job::then`]); `None` off the pool's threads (where `share` is
    /// dropped at once, and `then` left: only spooled uploads, scanned on
    /// the pool, take one before, and only the server's jobs have one).
    pub fn begin(
        &self,
        digest: Option<Digest>,
        share: Option<MappedShare>,
        then: &mut Option<Handoff>,
    ) -> Option<BusyGuard<'_>> {
        let slot = self.slots.get(rayon::current_thread_index()?)?;
        let began = self.millis() + 1;
        *slot.job.lock() = Job {
            began,
            digest,
            noted: false,
            share,
            then: then.take(),
        };
        slot.began.store(began, Ordering::Relaxed);
        Some(BusyGuard(slot))
    }

    /// How many threads have been busy with one job for longer than `age`,
    /// and the digests of those jobs' contents, where known and not given
    /// at an earlier look (noted: see [`BusyGuard::end`]). Those jobs give back their shares of the
    /// mapped budget: the budget's shares are handed out in order, so one
    /// held by a thread that never ends would keep every large upload after
    /// it waiting for ever. (Its mapping, if it made one, then stays
    /// outside the budget: at most one file per scan thread.) They also
    /// give up who their outcomes were for, to be told of a failure (see
    /// [`LongJobs::handoffs`]): a file whose scan never ends must not go
    /// without a reply, holding its agent's place, for ever.
    pub fn longer_than(&self, age: Duration) -> LongJobs {
        let (mut count, mut digests, mut handoffs) = (0, Vec::new(), Vec::new());
        let now = self.millis();
        for slot in self.slots_busy_for(age, now) {
            // Read again with the digest: the job may have ended since.
            let mut job = slot.job.lock();
            if !older_than(job.began, age, now) {
                continue;
            }
            count += 1;
            if job.share.take().is_some() {
                tracing::warn!(
                    "a stuck scan thread gives back its share of the mapped budget: large uploads go on without it"
                );
            }
            if let Some(then) = job.then.take() {
                handoffs.push((then, job.digest));
            }
            // Each job's content once: a look every second would log it
            // again and again once the refused contents are as many as
            // they may be.
            if let Some(digest) = job.digest.filter(|_| !job.noted) {
                job.noted = true;
                digests.push(digest);
            }
        }
        LongJobs {
            count,
            digests,
            handoffs,
        }
    }

    /// Whether a thread has been busy with content of `digest` for longer
    /// than `age`. Costs an atomic load per thread while none has been
    /// busy that long.
    pub fn on_longer_than(&self, digest: &Digest, age: Duration) -> bool {
        let now = self.millis();
        self.slots_busy_for(age, now).any(|slot| {
            let job = slot.job.lock();
            older_than(job.began, age, now) && job.digest.as_ref() == Some(digest)
        })
    }

    /// How long the thread on content of `digest` has been, if one is (the
    /// longest, if several are).
    pub fn on_for(&self, digest: &Digest) -> Option<Duration> {
        let now = self.millis();
        self.slots
            .iter()
            .filter(|slot| slot.began.load(Ordering::Relaxed) != 0)
            .filter_map(|slot| {
                let job = slot.job.lock();
                let on = job.began != 0 && job.digest.as_ref() == Some(digest);
                on.then(|| Duration::from_millis(now.saturating_sub(job.began - 1)))
            })
            .max()
    }

    /// The slots whose job has run for longer than `age` at `now`.
    fn slots_busy_for(&self, age: Duration, now: u64) -> impl Iterator<Item = &Slot> {
        self.slots
            .iter()
            .filter(move |slot| older_than(slot.began.load(Ordering::Relaxed), age, now))
    }

    fn millis(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}

/// Whether a job that `began` (0: none) has run for longer than `age` at
/// `now` (both in [`Busy`]'s milliseconds).
fn older_than(began: u64, age: Duration, now: u64) -> bool {
    let age = u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
    began != 0 && now.saturating_sub(began - 1) > age
}

impl BusyGuard<'_> {
    /// Ends the job: the digest of its content if that was noted as
    /// sticking the thread, which it did not for good; and who its outcome
    /// is for, unless a look took that (and told of a failure).
    pub fn end(self) -> (Option<Digest>, Option<Handoff>) {
        let slot = self.0;
        // What the drop would do, under the one lock that reads the job.
        std::mem::forget(self);
        slot.began.store(0, Ordering::Relaxed);
        let mut job = slot.job.lock();
        job.began = 0;
        job.share = None;
        (job.noted.then_some(job.digest).flatten(), job.then.take())
    }
}

impl Drop for BusyGuard<'_> {
    /// (Unwinding: who the outcome was for is let go, and told of a lost
    /// scan by dropping it, out of the slot's lock: that telling takes
    /// other locks.)
    fn drop(&mut self) {
        self.0.began.store(0, Ordering::Relaxed);
        let mut job = self.0.job.lock();
        job.began = 0;
        let held = (job.share.take(), job.then.take());
        drop(job);
        drop(held);
    }
}

/// The most contents refused for sticking a thread: past it, the next
/// ones are logged but scanned again.
pub const MAX_STUCK_CONTENTS: usize = 1024;

/// The most the file of contents refused is read: more than this version
/// writes (a digest takes 67 bytes of it), so a larger one was not made by
/// it, and is set aside unread.
const SAVED_LIMIT: u64 = MAX_STUCK_CONTENTS as u64 * 80 + 4096;

/// The file that keeps them in the state folder.
pub const STUCK_CONTENTS_FILE: &str = "stuck-contents.json";

/// Contents that stuck a scan thread, refused from then on.
#[derive(Default)]
pub(super) struct StuckContents {
    /// Each digest refused, and whether it is kept in the state folder:
    /// not once its thread came back (the content was slow to scan, or
    /// the disk was, this once: it is refused for the rest of the run, but
    /// a restart, which it did not bring about, gives it another chance).
    digests: RwLock<HashMap<Digest, bool>>,
    /// Whether there are any: what a scan looks at first.
    any: AtomicBool,
    /// Where they are kept, once set.
    file: OnceLock<PathBuf>,
    /// Held while saving: saves take their turns, each of the latest list.
    saving: Mutex<()>,
    /// The last save failed: tried again at the next look.
    unsaved: AtomicBool,
}

/// The file's content.
#[derive(Serialize, Deserialize)]
struct Saved {
    /// The version of the server that made it ([`MAKER`]).
    maker: String,
    /// Hex digests.
    digests: Vec<String>,
}

/// This version of the server, as a list it saves names its maker.
const MAKER: &str = concat!("scanserver ", env!("CARGO_PKG_VERSION"));

impl StuckContents {
    /// Whether content of `digest` stuck a thread.
    pub fn holds(&self, digest: &Digest) -> bool {
        self.any.load(Ordering::Relaxed) && self.digests.read().contains_key(digest)
    }

    pub fn len(&self) -> usize {
        self.digests.read().len()
    }

    /// Remembers `digests`, of contents that stuck a thread: those new are
    /// logged, and saved off the caller's thread (the status's look), as
    /// is a list whose last save failed.
    pub fn note(self: &Arc<Self>, digests: Vec<Digest>) {
        let mut added = false;
        if !digests.is_empty() {
            let mut known = self.digests.write();
            for digest in digests {
                if known.contains_key(&digest) {
                    continue;
                }
                if known.len() >= MAX_STUCK_CONTENTS {
                    tracing::error!(%digest, "content keeps a scan thread busy for over {STUCK_AFTER_TIMEOUTS} scan timeouts; {MAX_STUCK_CONTENTS} such contents are refused already, and it is not");
                    continue;
                }
                tracing::error!(
                    %digest,
                    "content kept a scan thread busy for over {STUCK_AFTER_TIMEOUTS} scan timeouts: it is refused from now on, after restarts too, until another version of the server runs (to scan it again, delete {STUCK_CONTENTS_FILE} in the state folder and restart)"
                );
                known.insert(digest, true);
                added = true;
            }
            self.any.store(!known.is_empty(), Ordering::Relaxed);
        }
        if added || self.unsaved.load(Ordering::Relaxed) {
            self.save();
        }
    }

    /// The job on content of `digest` came back after all: refused for the
    /// rest of the run, no longer kept. It may come back before it is
    /// noted (the look that found it long has not noted it yet): it is
    /// then remembered as not kept, and the note leaves it so.
    pub fn came_back(self: &Arc<Self>, digest: &Digest) {
        let was_kept = {
            let mut known = self.digests.write();
            let room = known.len() < MAX_STUCK_CONTENTS;
            let was_kept = match known.get_mut(digest) {
                Some(kept) => std::mem::replace(kept, false),
                None => {
                    if room {
                        tracing::error!(
                            %digest,
                            "content kept a scan thread busy for over {STUCK_AFTER_TIMEOUTS} scan timeouts, then let it go: it is refused for the rest of this run"
                        );
                        known.insert(*digest, false);
                    }
                    false
                }
            };
            self.any.store(!known.is_empty(), Ordering::Relaxed);
            was_kept
        };
        if was_kept {
            self.save();
        }
    }

    /// Saves the digests kept, on a thread of its own, unless a save is
    /// under way (it may have missed this change: it is tried again at
    /// the next look, as is a failed save).
    fn save(self: &Arc<Self>) {
        let Some(path) = self.file.get().cloned() else {
            return;
        };
        self.unsaved.store(true, Ordering::Relaxed);
        let contents = Arc::clone(self);
        // A thread that cannot be made leaves the list unsaved, for the
        // next look to try again.
        let saver = std::thread::Builder::new().name("stuck-contents".into());
        let spawned = saver.spawn(move || {
            let Some(_turn) = contents.saving.try_lock() else {
                return;
            };
            contents.unsaved.store(false, Ordering::Relaxed);
            let saved = Saved {
                maker: MAKER.to_owned(),
                digests: contents.digests.read()
                    .iter()
                    .filter(|(_, kept)| **kept)
                    .map(|(digest, _)| digest.to_hex().to_string())
                    .collect(),
            };
            let written = state::replace_file(&path, |out| {
                serde_json::to_writer(out, &saved).map_err(io::Error::other)
            });
            if let Err(err) = written {
                contents.unsaved.store(true, Ordering::Relaxed);
                tracing::warn!(path = %path.display(), "cannot save the contents that stuck a scan thread: {err}");
            }
        });
        if let Err(err) = spawned {
            tracing::warn!("cannot start saving the contents that stuck a scan thread: {err}");
        }
    }

    /// Loads the contents kept in the state folder `dir` by this version
    /// of the server, and keeps them there from now on; a file that cannot
    /// be trusted, or that another version made, is set aside. Returns how
    /// many were loaded.
    pub fn keep_in(&self, dir: &Path) -> io::Result<usize> {
        let path = dir.join(STUCK_CONTENTS_FILE);
        let loaded = match files::read(&path, SAVED_LIMIT) {
            Ok(data) => match serde_json::from_slice::<Saved>(&data) {
                Ok(saved) if saved.maker == MAKER => {
                    let digests: Result<Vec<Digest>, _> =
                        saved.digests.iter().map(Digest::from_hex).collect();
                    digests.map_err(|err| err.to_string())
                }
                Ok(saved) => Err(format!("made by {}", saved.maker)),
                Err(err) => Err(err.to_string()),
            },
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            // Larger than this version ever writes.
            Err(err) if err.kind() == io::ErrorKind::InvalidData => Err(err.to_string()),
            Err(err) => return Err(err),
        };
        let digests = loaded.unwrap_or_else(|why| {
            tracing::warn!(path = %path.display(), "contents that stuck a scan thread set aside, none refused: {why}");
            state::set_aside(&path);
            Vec::new()
        });
        let mut known = self.digests.write();
        let before = known.len();
        let room = MAX_STUCK_CONTENTS.saturating_sub(before);
        known.extend(digests.into_iter().take(room).map(|d| (d, true)));
        self.any.store(!known.is_empty(), Ordering::Relaxed);
        let _ = self.file.set(path);
        Ok(known.len() - before)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl LongJobs {
        /// How many, and their digests.
        fn seen(self) -> (usize, Vec<Digest>) {
            (self.count, self.digests)
        }
    }

    /// A thread busy with content is found by its digest once busy longer
    /// than asked, and counted stuck with it, giving back its share of the
    /// mapped budget then; the job's end says so. How long it has been on
    /// the content is known while it is.
    #[test]
    fn a_busy_thread_is_found_by_its_digest() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let busy = Busy::new(1);
        let budget = super::super::mapped::MappedBudget::new(8 << 10);
        let share = futures_executor::block_on(budget.share(8 << 10));
        let (digest, other) = (blake3::hash(b"held"), blake3::hash(b"other"));
        let (began, release) = (std::sync::Barrier::new(2), std::sync::Barrier::new(2));
        std::thread::scope(|scope| {
            let job = scope.spawn(|| {
                pool.install(|| {
                    let job = busy.begin(Some(digest), Some(share), &mut None).unwrap();
                    began.wait();
                    release.wait();
                    job.end().0
                })
            });
            began.wait();
            std::thread::sleep(Duration::from_millis(20));
            let short = Duration::from_millis(5);
            assert!(busy.on_longer_than(&digest, short));
            assert!(!busy.on_longer_than(&other, short));
            assert!(!busy.on_longer_than(&digest, Duration::from_secs(3600)));
            // Read while the job runs, told once it is over (a failed
            // assertion here would leave it waiting for ever).
            let not_yet = busy.longer_than(Duration::from_secs(3600)).seen();
            let free_while_young = budget.free_kib();
            assert_eq!(busy.longer_than(short).seen(), (1, vec![digest]));
            let again = busy.longer_than(short).seen();
            assert_eq!(again, (1, vec![]), "each content once");
            let free_once_stuck = budget.free_kib();
            let on_for = busy.on_for(&digest).expect("on it");
            assert!(on_for >= Duration::from_millis(20), "{on_for:?}");
            assert_eq!(busy.on_for(&other), None);
            release.wait();
            assert_eq!(job.join().unwrap(), Some(digest), "noted, and back");
            assert_eq!(not_yet, (0, vec![]));
            assert_eq!(free_while_young, 0, "held while not stuck");
            assert_eq!(free_once_stuck, 8, "given back once stuck");
        });
        assert!(!busy.on_longer_than(&digest, Duration::ZERO), "over");
        assert_eq!(busy.on_for(&digest), None, "over");
        assert_eq!(busy.longer_than(Duration::ZERO).seen(), (0, vec![]));
    }

    /// Content whose thread came back between the look that found it long
    /// and that look's note is refused for the run, and not kept.
    #[test]
    fn content_back_before_its_note_is_not_kept() {
        let stuck = Arc::new(StuckContents::default());
        let (back, held) = (blake3::hash(b"back"), blake3::hash(b"held"));
        stuck.came_back(&back);
        stuck.note(vec![back, held]);
        assert!(stuck.holds(&back) && stuck.holds(&held));
        let known = stuck.digests.read();
        assert_eq!((known[&back], known[&held]), (false, true));
    }

    /// A file of contents refused that is larger than any this version
    /// writes is set aside unread; a list as large as it writes loads.
    #[test]
    fn a_file_of_contents_too_large_is_set_aside_unread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STUCK_CONTENTS_FILE);
        let digests: Vec<_> = (0..MAX_STUCK_CONTENTS as u32)
            .map(|n| blake3::hash(&n.to_le_bytes()).to_hex().to_string())
            .collect();
        let saved = Saved {
            maker: MAKER.to_owned(),
            digests,
        };
        std::fs::write(&path, serde_json::to_vec(&saved).unwrap()).unwrap();
        let loaded = StuckContents::default().keep_in(dir.path()).unwrap();
        assert_eq!(loaded, MAX_STUCK_CONTENTS);

        std::fs::write(&path, vec![b' '; SAVED_LIMIT as usize + 1]).unwrap();
        assert_eq!(StuckContents::default().keep_in(dir.path()).unwrap(), 0);
        assert!(!path.exists());
        assert!(
            dir.path()
                .join(format!("{STUCK_CONTENTS_FILE}.rejected"))
                .exists()
        );
    }
}
