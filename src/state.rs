//! The server's state folder: what it keeps across restarts.
//!
//! * The verdict cache's snapshot (see [`crate::cache::snapshot`]): loaded
//!   at start for the current signatures, written by a background task at
//!   an interval when the cache changed, and once more at shutdown.
//! * The protected VMs and their security tags (see [`crate::vms`]): saved
//!   about a second after each change (longer for a large registry: see
//!   `settle_after`), at the same interval (for the last-seen times of
//!   connected VMs), and at shutdown.
//!
//! A save that fails is tried again at the next interval (or change), and
//! the SVM's status says so meanwhile (`STATE_NOT_SAVED`: see [`Unsaved`]):
//! what the file holds would be lost at a restart. So does a save still
//! going on after [`SAVE_STALL`] (a file system that stopped answering),
//! until it ends.
//!
//! The folder is created private to the server's user (0700): the server
//! trusts what it finds there. So are the other folders whose content it
//! trusts (the spool, the compiled-rules cache): see [`private_dir`].

use std::{
    collections::BTreeMap,
    fmt, fs,
    io::{self, Write},
    os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use parking_lot::Mutex;
use tokio::{
    sync::{Semaphore, watch},
    time::Instant,
};

use crate::{cache::snapshot, engine::Engine, shutdown::shut_down, vms::Vms};

/// Makes sure the folder at `path` can be trusted with what the server
/// keeps there: one that is missing is created (with its parents) private
/// to this user (0700); one that exists must be a folder of this user that
/// no other can write to. An existing folder is never changed (`--state-dir
/// /var/lib` must not lock a system folder), and one that is not safe is
/// refused with what to do, rather than used: another user able to swap a
/// spooled upload or a compiled-rules file would choose verdicts.
///
/// The folders above it are checked too (as OpenSSH checks those of
/// `authorized_keys`): each must belong to root or this user, and one that
/// others may write to must be sticky (`/tmp`), or they could rename this
/// folder away and put one of theirs in its place; a folder above may be
/// writable by the server's own group. Every folder and symbolic link the
/// way to it goes through is checked (see `route_to`): those named in
/// `path` (the server goes on using `path`), those in the targets of its
/// links, and those above the real folder; the links must be root's or
/// this user's.
pub fn private_dir(path: &Path) -> io::Result<()> {
    // The folders to make: each made is then flushed to disk in the folder
    // above it, or a power loss soon after could lose it, with all the
    // state saved in it.
    let missing: Vec<&Path> = path
        .ancestors()
        .take_while(|dir| !dir.as_os_str().is_empty() && fs::symlink_metadata(dir).is_err())
        .collect();
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true).mode(0o700);
    builder.create(path)?;
    for made in missing {
        // A folder the server may write in but not read (mode 0711, say)
        // cannot be opened to be flushed: left to the file system.
        match sync_folder(made.parent().unwrap_or(Path::new("/"))) {
            Err(err) if err.kind() != io::ErrorKind::PermissionDenied => return Err(err),
            _ => {}
        }
    }
    let metadata = fs::metadata(path)?;
    let server = Owner::current();
    let refuse = |why: String| {
        let message = format!(
            "{} {why}; give the server a folder of its own (created if missing), \
             or make this one its user's (uid {}) and writable by it alone",
            path.display(),
            server.user
        );
        Err(io::Error::new(io::ErrorKind::PermissionDenied, message))
    };
    if !metadata.is_dir() {
        return refuse("is not a folder".into());
    }
    if let Some(why) = server.unsafe_folder(&metadata, false) {
        return refuse(why);
    }
    // The folder itself was checked above, as the server's own.
    let real = fs::canonicalize(path)?;
    for (above, step) in route_to(path)?.iter().filter(|(at, _)| *at != real) {
        let why = if step.is_symlink() {
            (!server.may_own(step.uid()))
                .then(|| format!("is a symbolic link of uid {}", step.uid()))
        } else {
            server.unsafe_folder(step, true)
        };
        if let Some(why) = why {
            let message = format!(
                "{} goes through {}, which {why}: another user could put a folder of theirs in its place; \
                 make that one root's or uid {}'s and not writable by others (or sticky, as /tmp is), \
                 or give the server a folder elsewhere",
                path.display(),
                above.display(),
                server.user
            );
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, message));
        }
    }
    Ok(())
}

/// As many symbolic links as Linux follows on one path.
const MAX_LINKS: usize = 40;

/// Every folder and symbolic link the way to `path` goes through, in the
/// order the kernel goes through them, with their metadata: each
/// component named, and, for a symbolic link, those of its target in turn
/// (a link to a link included).
fn route_to(path: &Path) -> io::Result<Vec<(PathBuf, fs::Metadata)>> {
    use std::path::Component;
    let root = PathBuf::from("/");
    let mut steps = vec![(root.clone(), fs::symlink_metadata(&root)?)];
    let mut to_go: Vec<_> = std::path::absolute(path)?
        .components()
        .map(|c| c.as_os_str().to_owned())
        .rev()
        .collect();
    // Where the walk is: a real folder (links resolved), so that `..`
    // goes where the kernel's does.
    let mut at = root;
    let mut links = 0;
    while let Some(name) = to_go.pop() {
        match Path::new(&name).components().next() {
            Some(Component::RootDir) => at = PathBuf::from("/"),
            Some(Component::ParentDir) => {
                at.pop();
            }
            Some(Component::Normal(_)) => {
                let next = at.join(&name);
                let metadata = fs::symlink_metadata(&next)?;
                if metadata.is_symlink() {
                    links += 1;
                    if links > MAX_LINKS {
                        let message = format!("{}: too many symbolic links", path.display());
                        return Err(io::Error::other(message));
                    }
                    let target = fs::read_link(&next)?;
                    to_go.extend(target.components().map(|c| c.as_os_str().to_owned()).rev());
                } else {
                    at.clone_from(&next);
                }
                steps.push((next, metadata));
            }
            Some(Component::CurDir | Component::Prefix(_)) | None => {}
        }
    }
    Ok(steps)
}

/// The user and group the server runs as.
struct Owner {
    user: u32,
    group: u32,
}

impl Owner {
    fn current() -> Owner {
        // SAFETY: geteuid and getegid have no preconditions and cannot fail.
        unsafe {
            Owner {
                user: libc::geteuid(),
                group: libc::getegid(),
            }
        }
    }

    /// Whether a folder above the server's, or a symbolic link on the way,
    /// may belong to `uid`.
    fn may_own(&self, uid: u32) -> bool {
        uid == self.user || uid == 0
    }

    /// Why the folder of `metadata` would let another user replace what it
    /// holds, if it would. A folder above the server's own (`above`) may be
    /// root's, writable by the server's group, and writable by others when
    /// it is sticky.
    fn unsafe_folder(&self, metadata: &fs::Metadata, above: bool) -> Option<String> {
        let (owner, mode) = (metadata.uid(), metadata.mode());
        let owned = if above {
            self.may_own(owner)
        } else {
            owner == self.user
        };
        if !owned {
            return Some(format!("belongs to uid {owner}"));
        }
        let mode_shown = mode & 0o7777;
        let group = metadata.gid();
        if mode & 0o002 != 0 && !(above && mode & 0o1000 != 0) {
            Some(format!("is writable by all users (mode {mode_shown:o})"))
        } else if mode & 0o020 != 0 && !(above && group == self.group) {
            Some(format!(
                "is writable by group {group} (mode {mode_shown:o})"
            ))
        } else {
            None
        }
    }
}

/// The file a server holds locked in its state folder.
const LOCK_FILE: &str = "lock";

/// How the temporary files of [`replace_file`] are named.
const TEMPORARY_PREFIX: &str = ".partial-";

/// The state folder's files that its keepers save.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum StateFile {
    /// The verdict cache's snapshot.
    VerdictCache,
    /// The registry of protected VMs and their security tags.
    Vms,
}

impl fmt::Display for StateFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StateFile::VerdictCache => "verdict cache",
            StateFile::Vms => "protected VMs",
        })
    }
}

/// How long a state file's save may go on before it counts as failed (see
/// [`Unsaved::save`]): a save of the largest registry of VMs takes a few
/// seconds on a disk that answers.
pub const SAVE_STALL: Duration = Duration::from_secs(60);

/// The state files whose last save failed, and why, until they save again:
/// the SVM's status reads it (`STATE_NOT_SAVED`). A full disk, or a file
/// system gone read-only, would otherwise show only in the log, and the
/// security tags set since the last save would be lost at a restart.
#[derive(Debug)]
pub struct Unsaved {
    failures: Mutex<BTreeMap<StateFile, String>>,
    /// One save of each file at a time (see [`Unsaved::save`]).
    cache_turn: Arc<Semaphore>,
    vms_turn: Arc<Semaphore>,
}

impl Default for Unsaved {
    fn default() -> Self {
        Unsaved {
            failures: Mutex::default(),
            cache_turn: Arc::new(Semaphore::new(1)),
            vms_turn: Arc::new(Semaphore::new(1)),
        }
    }
}

impl Unsaved {
    /// Whether any file's last save failed.
    pub fn any(&self) -> bool {
        !self.failures.lock().is_empty()
    }

    /// Whether the last save of `file` failed.
    pub fn failed(&self, file: StateFile) -> bool {
        self.failures.lock().contains_key(&file)
    }

    /// Each file whose last save failed, with why.
    pub fn failures(&self) -> Vec<(StateFile, String)> {
        let failures = self.failures.lock();
        failures.iter().map(|(f, why)| (*f, why.clone())).collect()
    }

    /// Runs `save` of `file` (at `path`) on a blocking thread, and records
    /// its outcome. A save that has not ended after [`SAVE_STALL`] counts
    /// as failed until it does: a disk or network file system that stopped
    /// answering holds the save for as long as it does not, and the status
    /// must say the file is not being saved (`STATE_NOT_SAVED`) meanwhile.
    /// The save is watched by a task of its own, so that its outcome is
    /// recorded even when the caller stops waiting for it (an admin
    /// client gone).
    ///
    /// Saves of one file take turns, and a save waits for its turn as a
    /// task: a save that does not end holds one blocking thread, not one
    /// for every tag command run meanwhile (each would wait on a thread of
    /// the blocking pool, which reports, reloads and listings need too). A
    /// caller that stops waiting for its turn leaves nothing behind.
    pub async fn save<F>(
        self: &Arc<Self>,
        file: StateFile,
        path: &Path,
        save: F,
    ) -> Result<(), String>
    where
        F: FnOnce() -> Result<(), String> + Send + 'static,
    {
        let turns = match file {
            StateFile::VerdictCache => &self.cache_turn,
            StateFile::Vms => &self.vms_turn,
        };
        let turn = Arc::clone(turns).acquire_owned().await;
        let turn = turn.expect("the turns are never closed");
        let (unsaved, path) = (Arc::clone(self), path.to_owned());
        let watched = tokio::spawn(async move {
            let mut saving = tokio::task::spawn_blocking(move || {
                let _turn = turn;
                save()
            });
            let joined = match tokio::time::timeout(SAVE_STALL, &mut saving).await {
                Ok(joined) => joined,
                Err(_) => {
                    let stalled = format!(
                        "a save has gone on for {} s without an end (a disk or network file system that does not answer?)",
                        SAVE_STALL.as_secs()
                    );
                    unsaved.record(file, &path, Err(stalled));
                    saving.await
                }
            };
            let result = joined.unwrap_or_else(|err| Err(err.to_string()));
            unsaved.record(file, &path, result.clone());
            result
        });
        watched.await.unwrap_or_else(|err| Err(err.to_string()))
    }

    /// Records the outcome of a save of `file`, and logs a failure (once
    /// while it lasts with the same why, again when why changes: a stall,
    /// then the error it ended in; then as it ends).
    fn record(&self, file: StateFile, path: &Path, result: Result<(), String>) {
        let mut failures = self.failures.lock();
        match result {
            Ok(()) => {
                if failures.remove(&file).is_some() {
                    tracing::info!(path = %path.display(), "saved the {file} again");
                }
            }
            Err(why) => {
                if failures.insert(file, why.clone()).as_ref() != Some(&why) {
                    tracing::warn!(path = %path.display(), "cannot save the {file}: {why}");
                }
            }
        }
    }
}

/// The server's state folder, one server's at a time: two writing the same
/// snapshot and registry of VMs would undo each other's.
#[derive(Debug, Clone)]
pub struct StateDir {
    path: PathBuf,
    /// Locked while any clone lives.
    _lock: Arc<fs::File>,
    unsaved: Arc<Unsaved>,
}

impl StateDir {
    /// Opens (creating it if needed) the state folder at `path`, unless
    /// another process holds it, and removes the temporary files a crash
    /// left there while replacing a state file.
    pub fn open(path: &Path) -> io::Result<StateDir> {
        private_dir(path)?;
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(path.join(LOCK_FILE))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(io::Error::new(
                    io::ErrorKind::ResourceBusy,
                    "another scanserver serves from it; give each server a state folder of its own",
                ));
            }
            Err(fs::TryLockError::Error(err)) => return Err(err),
        }
        for entry in fs::read_dir(path)?.flatten() {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(TEMPORARY_PREFIX)
            {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(StateDir {
            path: path.to_owned(),
            _lock: Arc::new(lock),
            unsaved: Arc::default(),
        })
    }

    /// The folder's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The files whose last save failed, as the status shows them.
    pub fn unsaved(&self) -> &Arc<Unsaved> {
        &self.unsaved
    }

    fn snapshot(&self) -> PathBuf {
        self.path.join(snapshot::FILE_NAME)
    }

    /// Loads the verdicts of the last run made with the engine's current
    /// signatures. A snapshot that cannot be trusted is set aside with a
    /// warning; the server starts with an empty cache.
    pub fn restore_cache(&self, engine: &Engine) {
        let ruleset = engine.ruleset();
        match engine.cache().load(&self.snapshot(), &ruleset) {
            Ok(0) => {}
            Ok(loaded) => tracing::info!(loaded, "verdict cache restored from the last run"),
            Err(err @ snapshot::SnapshotError::Io { .. }) => tracing::warn!(
                path = %self.snapshot().display(),
                "verdict snapshot not read, starting with an empty cache: {err}"
            ),
            Err(err) => tracing::warn!(
                path = %self.snapshot().display(),
                "verdict snapshot set aside, starting with an empty cache: {err}"
            ),
        }
    }

    /// Saves the verdict cache every `interval` (or ten times as long as
    /// the last save took, if longer) while it changes, and once more when
    /// `done` turns true (the server stopped serving); then returns.
    pub async fn keep_cache(
        self,
        engine: Arc<Engine>,
        interval: Duration,
        mut done: watch::Receiver<bool>,
    ) {
        // What was just restored needs no saving; a snapshot that could not
        // be read (a passing error) is not overwritten until the cache
        // changes.
        let mut saved = CacheMark::of(&engine);
        let mut ticker = tokio::time::interval(interval);
        ticker.tick().await;
        loop {
            let last = tokio::select! {
                _ = ticker.tick() => false,
                () = shut_down(&mut done) => true,
            };
            let now = CacheMark::of(&engine);
            let began = Instant::now();
            if now != saved && self.save_cache(&engine).await {
                saved = now;
            }
            if last {
                return;
            }
            // A save that took long (a large cache, a slow disk) is not
            // followed at once by the next: saves take at most a tenth of
            // the time, as the registry's do (see `settle_after`).
            ticker.reset_after(interval.max(began.elapsed() * 10));
        }
    }

    /// Saves `vms` after each change (once changes settle: see
    /// `settle_after`) and every `interval`, and once more when `done`
    /// turns true (the server stopped serving); then returns. `grace` after
    /// it starts, the VMs awaited since the last run that have not come
    /// back count as lost ([`Vms::lost_unless_back`]).
    pub async fn keep_vms(
        self,
        vms: Arc<Vms>,
        interval: Duration,
        grace: Duration,
        mut done: watch::Receiver<bool>,
    ) {
        let mut changes = vms.changes();
        let mut ticker = tokio::time::interval(interval);
        ticker.tick().await;
        let back_by = tokio::time::sleep(grace);
        tokio::pin!(back_by);
        let mut awaiting = true;
        let mut settle = settle_after(Duration::ZERO);
        // When the changes seen are saved: changes come in bursts (a boot
        // storm), saved once for all. A deadline, not a sleep, so that a stop
        // meanwhile is saved at once.
        let settled = tokio::time::sleep(settle);
        tokio::pin!(settled);
        // Records changed as the registry was opened are saved as changes.
        let mut changed = vms.changed_at_open();
        loop {
            let last = tokio::select! {
                // A stop first: the last save is not put off for another.
                biased;
                () = shut_down(&mut done) => true,
                () = &mut settled, if changed => false,
                _ = ticker.tick() => false,
                () = &mut back_by, if awaiting => {
                    // A change, when any VM is lost: saved as changes are.
                    awaiting = false;
                    vms.lost_unless_back();
                    continue;
                }
                Ok(()) = changes.changed(), if !changed => {
                    changed = true;
                    settled.as_mut().reset(Instant::now() + settle);
                    continue;
                }
            };
            changes.borrow_and_update();
            changed = false;
            let began = Instant::now();
            let _ = save_vms(&vms, &self.unsaved).await;
            settle = settle_after(began.elapsed());
            if last {
                return;
            }
            // A save after a change counts as the interval's.
            ticker.reset();
        }
    }

    /// Writes the snapshot off the async threads; false if that failed (it
    /// is tried again at the next tick).
    async fn save_cache(&self, engine: &Arc<Engine>) -> bool {
        let (engine, path) = (Arc::clone(engine), self.snapshot());
        let saving = path.clone();
        let save = move || {
            let entries = engine.cache().save(&saving, &engine.ruleset());
            let entries = entries.map_err(|err| err.to_string())?;
            tracing::debug!(entries, "verdict cache saved");
            Ok(())
        };
        let saved = self.unsaved.save(StateFile::VerdictCache, &path, save);
        saved.await.is_ok()
    }
}

/// How long the registry's keeper lets changes gather before it saves
/// them, when its last save took `took`: a second, or ten times as long as
/// that save when it took longer than 100 ms, up to a minute. Each save
/// writes the whole registry (up to [`MAX_VMS`](crate::vms::MAX_VMS)
/// records, tens of MB), and a storm of VMs connecting changes it every
/// moment: saving it at most a tenth of the time keeps a large registry
/// from taking a thread and the disk for itself, while a small one is
/// still saved within about a second of a change, and a tag assigned
/// after a save that stalled is not left unsaved for long.
fn settle_after(took: Duration) -> Duration {
    (took * 10).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// Saves `vms` off the async threads; the outcome is recorded in
/// `unsaved` (the keeper's next save tries again after a failure), and
/// returned.
pub(crate) async fn save_vms(vms: &Arc<Vms>, unsaved: &Arc<Unsaved>) -> Result<(), String> {
    let saving = Arc::clone(vms);
    let save = move || saving.save().map_err(|err| err.to_string());
    let path = vms.path().unwrap_or(Path::new(""));
    unsaved.save(StateFile::Vms, path, save).await
}

/// What tells whether the cache changed since it was saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CacheMark {
    generation: u64,
    version: u64,
}

impl CacheMark {
    fn of(engine: &Engine) -> Self {
        CacheMark {
            generation: engine.cache().generation(),
            version: engine.ruleset().version_id(),
        }
    }
}

/// Sets aside a state file that cannot be trusted: renames it with
/// `.rejected` added to its name (replacing an older one), so that it is
/// kept for inspection but never loaded, nor saved over.
pub fn set_aside(path: &Path) {
    if let Err(err) = std::fs::rename(path, rejected(path)) {
        tracing::warn!(path = %path.display(), "cannot set aside the untrusted file: {err}");
    }
}

/// Sets a copy of the file at `path` aside, as `set_aside` does, keeping
/// the file itself (what could be read of it is used, and will be saved
/// over it). The copy is written as state files are (see
/// [`replace_file`]): on disk before the file is saved over, and an older
/// copy replaced only by a whole one.
pub fn set_aside_copy(path: &Path) {
    let copy = rejected(path);
    let copied = fs::File::open(path)
        .and_then(|mut file| replace_file(&copy, |out| io::copy(&mut file, out)));
    if let Err(err) = copied {
        tracing::warn!(path = %path.display(), "cannot set aside a copy of the file: {err}");
    }
}

/// Where an untrusted file is set aside: beside it, `.rejected` added.
fn rejected(path: &Path) -> std::path::PathBuf {
    let mut rejected = path.as_os_str().to_owned();
    rejected.push(".rejected");
    rejected.into()
}

/// Replaces the file at `path` with what `write` writes, atomically: the
/// content goes to a temporary file beside it, which is flushed to disk and
/// renamed over `path`, so a crash leaves the old file or the new one,
/// whole, never a mix.
pub fn replace_file<T>(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> io::Result<T>,
) -> io::Result<T> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut file = tempfile::Builder::new()
        .prefix(TEMPORARY_PREFIX)
        .tempfile_in(dir)?;
    let mut out = io::BufWriter::new(file.as_file_mut());
    let value = write(&mut out)?;
    out.flush()?;
    drop(out);
    file.as_file().sync_all()?;
    file.persist(path).map_err(|err| err.error)?;
    // The rename itself must reach the disk too: a save that may not have
    // is not done, and is tried again.
    sync_folder(dir)?;
    Ok(value)
}

/// Flushes the entries of the folder `dir` to disk: the names of files
/// renamed or folders made in it. (File systems that cannot sync a folder
/// say EINVAL or ENOTSUP, and have nothing to sync.)
fn sync_folder(dir: &Path) -> io::Result<()> {
    use io::ErrorKind::{InvalidInput, Unsupported};
    let dir = match dir.as_os_str().is_empty() {
        true => Path::new("."),
        false => dir,
    };
    match fs::File::open(dir).and_then(|dir| dir.sync_all()) {
        Err(err) if !matches!(err.kind(), InvalidInput | Unsupported) => Err(err),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::{
        os::unix::fs::PermissionsExt,
        sync::atomic::{AtomicUsize, Ordering},
    };

    use super::*;

    fn chmod(path: &Path, mode: u32) {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn refused(path: &Path, because: &str) {
        let err = private_dir(path).expect_err(because);
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{err}");
        assert!(err.to_string().contains(because), "{err}");
    }

    /// A small registry is saved about a second after a change; a large
    /// one, whose saves take long, at most a tenth of the time.
    #[test]
    fn a_registry_that_is_slow_to_save_is_saved_less_often() {
        let second = Duration::from_secs(1);
        assert_eq!(settle_after(Duration::ZERO), second);
        assert_eq!(settle_after(Duration::from_millis(100)), second);
        assert_eq!(
            settle_after(Duration::from_millis(450)),
            4_500 * second / 1_000
        );
        assert_eq!(
            settle_after(Duration::from_secs(30)),
            60 * second,
            "a stall"
        );
    }

    /// A save that does not end (a file system that stopped answering)
    /// shows as failed once it has taken `SAVE_STALL`, and no longer once
    /// it has ended, whether or not its caller still waits for it.
    #[tokio::test(start_paused = true)]
    async fn a_save_that_does_not_end_counts_as_failed_meanwhile() {
        let unsaved = Arc::new(Unsaved::default());
        // A save held until released, by a caller of its own.
        let held_save = || {
            let (release, held) = std::sync::mpsc::channel::<()>();
            let unsaved = Arc::clone(&unsaved);
            let caller = tokio::spawn(async move {
                let save = move || held.recv().map_err(|err| err.to_string());
                unsaved.save(StateFile::Vms, Path::new("vms"), save).await
            });
            (release, caller)
        };
        // (The clock does not move by itself while a blocking task runs.)
        let advance = |by| async move {
            let others_run = || async {
                for _ in 0..100 {
                    tokio::task::yield_now().await;
                }
            };
            others_run().await;
            tokio::time::advance(by).await;
            others_run().await;
        };
        let (release, caller) = held_save();
        advance(SAVE_STALL / 2).await;
        assert!(!unsaved.any(), "not yet");
        advance(SAVE_STALL / 2).await;
        assert!(unsaved.failed(StateFile::Vms));
        let failures = unsaved.failures();
        assert!(failures[0].1.contains("without an end"), "{failures:?}");
        release.send(()).unwrap();
        caller.await.unwrap().unwrap();
        assert!(!unsaved.any(), "saved in the end");

        let (release, caller) = held_save();
        advance(SAVE_STALL).await;
        assert!(unsaved.failed(StateFile::Vms));
        caller.abort();
        release.send(()).unwrap();
        for _ in 0..1000 {
            if !unsaved.any() {
                return;
            }
            tokio::task::yield_now().await;
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("a save whose caller went is recorded all the same");
    }

    #[tokio::test]
    async fn saves_that_wait_behind_one_that_does_not_end_hold_no_thread() {
        let unsaved = Arc::new(Unsaved::default());
        let started = Arc::new(AtomicUsize::new(0));
        let save = |held: Option<std::sync::mpsc::Receiver<()>>| {
            let started = Arc::clone(&started);
            move || {
                started.fetch_add(1, Ordering::SeqCst);
                held.map_or(Ok(()), |held| held.recv().map_err(|err| err.to_string()))
            }
        };
        let (release, held) = std::sync::mpsc::channel();
        let stalled = tokio::spawn({
            let (unsaved, save) = (Arc::clone(&unsaved), save(Some(held)));
            async move { unsaved.save(StateFile::Vms, Path::new("vms"), save).await }
        });
        while started.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Tag commands whose clients give up while the first save hangs.
        for _ in 0..10 {
            let waiting = unsaved.save(StateFile::Vms, Path::new("vms"), save(None));
            let gave_up = tokio::time::timeout(Duration::from_millis(20), waiting).await;
            assert!(gave_up.is_err(), "waits for its turn");
        }
        // The snapshot's saves take turns of their own.
        let other = unsaved.save(StateFile::VerdictCache, Path::new("snapshot"), save(None));
        other.await.unwrap();
        assert_eq!(
            started.load(Ordering::SeqCst),
            2,
            "none of the dropped ones ran"
        );
        release.send(()).unwrap();
        stalled.await.unwrap().unwrap();
        let next = unsaved.save(StateFile::Vms, Path::new("vms"), save(None));
        next.await.unwrap();
        assert_eq!(started.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn one_server_at_a_time_and_no_leftovers_of_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let err = StateDir::open(dir.path()).expect_err("held by the first");
        assert_eq!(err.kind(), io::ErrorKind::ResourceBusy, "{err}");
        let held = state.clone();
        drop(state);
        assert!(StateDir::open(dir.path()).is_err(), "held by a clone");

        // A crash while a state file was being replaced.
        replace_file(&dir.path().join("kept"), |out| out.write_all(b"whole")).unwrap();
        fs::write(dir.path().join(".partial-left"), b"half").unwrap();
        drop(held);
        let _reopened = StateDir::open(dir.path()).unwrap();
        let mut names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["kept", LOCK_FILE]);
    }

    #[test]
    fn a_folder_that_others_could_replace_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared");
        let state = shared.join("state");
        private_dir(&state).unwrap();
        // The group a new folder gets is not always the server's.
        std::os::unix::fs::chown(&shared, None, Some(Owner::current().group)).unwrap();
        chmod(&state, 0o770);
        refused(&state, "is writable by group");
        chmod(&state, 0o700);
        chmod(&shared, 0o777);
        refused(&state, "which is writable by all users (mode 777)");
        chmod(&shared, 0o1777);
        private_dir(&state).expect("sticky: others cannot rename what is not theirs");
        chmod(&shared, 0o770);
        private_dir(&state).expect("writable by the server's own group");

        let linked = dir.path().join("linked");
        std::os::unix::fs::symlink(&state, &linked).unwrap();
        chmod(&shared, 0o777);
        refused(&linked, "which is writable by all users (mode 777)");
        chmod(&shared, 0o755);
        private_dir(&linked).expect("a link of this user's to a safe folder");
        // A link to a link: the folder the second one is in is on the way
        // too.
        let open = dir.path().join("open");
        fs::create_dir(&open).unwrap();
        std::os::unix::fs::symlink(&state, open.join("second")).unwrap();
        let first = dir.path().join("first");
        std::os::unix::fs::symlink("open/second", &first).unwrap();
        private_dir(&first).expect("links of this user's, in safe folders");
        chmod(&open, 0o777);
        refused(&first, "open, which is writable by all users (mode 777)");
        chmod(&open, 0o755);
        // Only root can give a link away.
        if std::os::unix::fs::lchown(&linked, Some(4242), None).is_ok() {
            refused(&linked, "which is a symbolic link of uid 4242");
            refused(&linked.join(""), "which is a symbolic link of uid 4242");
        }
    }
}
