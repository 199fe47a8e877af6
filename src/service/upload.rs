//! Receiving one file's content from an agent.
//!
//! Content is hashed (blake3) as it arrives, so the digest the verdict is
//! cached under is always the server's own. Small files stay in memory,
//! within a budget shared by all uploads (a file of unknown size takes its
//! share as it grows); larger ones, or any file once the budget is spent, go
//! to a temporary file in the spool folder, which the engine memory-maps for
//! the scan. Spooled files share a budget of disk in turn, and a number of
//! files (each holds a descriptor until its scan ends, and small files
//! spooled once the memory budget is spent would otherwise run the process
//! out of descriptors long before the disk budget): a file that does not
//! fit fails with RESOURCE_EXHAUSTED rather than wait, since the room it
//! would wait for may be held by files whose content comes on the same
//! stream, behind it. Spool writes go to the page cache, on the runtime's threads.
//! Every check fails the file with a clear error: a chunk out of order, more
//! or less content than declared, a digest that differs from the one the
//! agent claimed, a file over the size limit. Dropping an [`Upload`] or a
//! [`Received`] at any point (cancel, end of stream, disconnect) frees its
//! memory and deletes its temporary file.

use std::{
    fs,
    io::{self, Write},
    os::unix::fs::OpenOptionsExt,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use tempfile::{NamedTempFile, TempPath};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Code;

use crate::{
    cache::Digest,
    config::UploadConfig,
    engine::{Content, ScanJob},
    proto::{FileError, FileErrorReason},
    state::private_dir,
};

/// Why a file's upload failed; the file gets this error, the stream goes on.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("chunk at offset {got} out of order: expected offset {expected}")]
    OutOfOrder { expected: u64, got: u64 },
    #[error("more content than the {declared} bytes declared")]
    TooMuch { declared: u64 },
    #[error("{received} bytes received, {declared} declared")]
    SizeMismatch { declared: u64, received: u64 },
    #[error("the content's blake3 digest {computed} differs from the digest sent with the file")]
    DigestMismatch { computed: String },
    #[error("file of {size} bytes is over the server's limit of {limit} bytes")]
    TooLarge { size: u64, limit: u64 },
    #[error("cannot spool the file: {0}")]
    Spool(#[from] io::Error),
    #[error(
        "the spool is full ({budget} bytes of uploads on disk): send the file again later, or to another SVM"
    )]
    SpoolFull { budget: u64 },
    #[error(
        "this VM's files take its whole share of the spool ({share} bytes of uploads on disk): send the file again once one of them has its verdict"
    )]
    VmSpoolFull { share: u64 },
    #[error(
        "the spool holds as many files as it may ({limit} uploads on disk): send the file again later, or to another SVM"
    )]
    SpoolFiles { limit: u32 },
}

impl UploadError {
    /// The gRPC status code the error is reported with.
    pub fn code(&self) -> Code {
        match self {
            UploadError::TooLarge { .. } => Code::FailedPrecondition,
            UploadError::Spool(err) if out_of_room(err) => Code::ResourceExhausted,
            UploadError::Spool(_) => Code::Internal,
            UploadError::SpoolFull { .. }
            | UploadError::VmSpoolFull { .. }
            | UploadError::SpoolFiles { .. } => Code::ResourceExhausted,
            _ => Code::InvalidArgument,
        }
    }

    /// Whether the file is refused for want of room, which may pass: its
    /// agent is told to send it again.
    pub fn asks_to_send_again(&self) -> bool {
        self.code() == Code::ResourceExhausted
    }
}

/// Whether a spool error is for want of room (a full disk or quota, no
/// file descriptor left), which may pass: the file is worth sending again.
fn out_of_room(err: &io::Error) -> bool {
    let codes = [libc::ENOSPC, libc::EDQUOT, libc::EMFILE, libc::ENFILE];
    err.raw_os_error().is_some_and(|code| codes.contains(&code))
}

/// The file's error, with what its agent can do about it: a file whose
/// content is not what its agent hashed most often changed since, and is
/// worth announcing again with its content.
impl From<&UploadError> for FileError {
    fn from(err: &UploadError) -> Self {
        let reason = match err {
            UploadError::DigestMismatch { .. } => FileErrorReason::DigestMismatch,
            _ => FileErrorReason::Unspecified,
        };
        FileError {
            code: err.code() as i32,
            message: err.to_string(),
            reason: reason as i32,
        }
    }
}

impl From<UploadError> for tonic::Status {
    fn from(err: UploadError) -> Self {
        tonic::Status::new(err.code(), err.to_string())
    }
}

/// Where uploads keep their content: the memory budget, the spool folder
/// and its budget.
pub struct UploadStore {
    config: UploadConfig,
    /// The memory budget, in KiB permits.
    memory: Arc<Semaphore>,
    spool: Spool,
}

/// The spool folder, and the disk and the number of files its uploads may
/// take.
#[derive(Clone)]
struct Spool {
    dir: Arc<Path>,
    /// The disk budget in KiB permits.
    budget: Arc<Semaphore>,
    budget_bytes: u64,
    /// Each VM's share of the budget, in bytes (the shares themselves are
    /// the VMs', see [`crate::sessions::Session::spool_share`]).
    share_per_vm: u64,
    /// A permit per spool file.
    files: Arc<Semaphore>,
    max_files: u32,
    /// Files refused for want of room, since start.
    refused: Arc<AtomicU64>,
    /// Of those, files refused for want of room in the spool as a whole
    /// (its budget, its files, its disk), not in their VM's share: what
    /// the SVM's status tells of (`SPOOL_FULL`).
    full: Arc<AtomicU64>,
}

/// How much of the spool budget is in use, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpoolUsage {
    pub bytes: u64,
    pub budget: u64,
    /// Spool files now, and the most there may be.
    pub files: u64,
    pub max_files: u64,
    /// Files refused for want of room, since start.
    pub refused: u64,
}

impl Spool {
    /// A share of `kib` KiB of the budget, and of `vm`'s share of it when
    /// the file is a VM's, if that much is left of both.
    fn share(&self, kib: u64, vm: Option<&Arc<Semaphore>>) -> Result<SpoolShare, UploadError> {
        let take = |from: &Arc<Semaphore>| {
            let kib = u32::try_from(kib).ok()?;
            Arc::clone(from).try_acquire_many_owned(kib).ok()
        };
        let vm = match vm {
            Some(vm) => Some(take(vm).ok_or_else(|| {
                self.refuse(UploadError::VmSpoolFull {
                    share: self.share_per_vm,
                })
            })?),
            None => None,
        };
        let all = take(&self.budget).ok_or_else(|| {
            self.refuse(UploadError::SpoolFull {
                budget: self.budget_bytes,
            })
        })?;
        Ok(SpoolShare { all, vm })
    }

    /// A place for one more spool file, if one is left.
    fn place(&self) -> Result<OwnedSemaphorePermit, UploadError> {
        Arc::clone(&self.files).try_acquire_owned().map_err(|_| {
            self.refuse(UploadError::SpoolFiles {
                limit: self.max_files,
            })
        })
    }

    /// The error of a spool file that could not be made or written: a
    /// refusal for want of room when the disk (or the descriptors) ran out,
    /// counted as the spool's others are.
    fn failed(&self, err: io::Error) -> UploadError {
        let room = out_of_room(&err);
        let err = UploadError::Spool(err);
        match room {
            true => self.refuse(err),
            false => err,
        }
    }

    /// Counts a refusal (for `scanserver_spool_full_total`) and returns it.
    fn refuse(&self, err: UploadError) -> UploadError {
        self.refused.fetch_add(1, Ordering::Relaxed);
        if !matches!(err, UploadError::VmSpoolFull { .. }) {
            self.full.fetch_add(1, Ordering::Relaxed);
        }
        err
    }
}

impl UploadStore {
    /// The store of `config`, spooling to `spool_dir`: private to the
    /// server (see [`private_dir`]), and emptied of the spool files a crash
    /// may have left there.
    pub fn new(config: UploadConfig, spool_dir: &Path) -> io::Result<Self> {
        private_dir(spool_dir)?;
        let mut left = 0;
        for entry in std::fs::read_dir(spool_dir)?.flatten() {
            let name = entry.file_name();
            if name.to_string_lossy().starts_with(SPOOL_PREFIX)
                && std::fs::remove_file(entry.path()).is_ok()
            {
                left += 1;
            }
        }
        if left > 0 {
            tracing::info!(removed = left, dir = %spool_dir.display(), "removed spool files left by an earlier run");
        }
        let permits = |bytes: u64| {
            let kib = usize::try_from(bytes >> 10).unwrap_or(usize::MAX);
            Arc::new(Semaphore::new(kib.min(Semaphore::MAX_PERMITS)))
        };
        Ok(UploadStore {
            memory: permits(config.memory_budget),
            spool: Spool {
                dir: spool_dir.into(),
                budget: permits(config.spool_budget),
                budget_bytes: config.spool_budget,
                share_per_vm: config.spool_budget_per_vm(),
                files: Arc::new(Semaphore::new(config.spool_files as usize)),
                max_files: config.spool_files,
                refused: Arc::default(),
                full: Arc::default(),
            },
            config,
        })
    }

    pub fn config(&self) -> &UploadConfig {
        &self.config
    }

    /// How much of the spool budget is in use now.
    pub fn spool_usage(&self) -> SpoolUsage {
        let budget_kib = (self.spool.budget_bytes >> 10).min(Semaphore::MAX_PERMITS as u64);
        let free_kib = self.spool.budget.available_permits() as u64;
        let free_files = self.spool.files.available_permits() as u64;
        SpoolUsage {
            bytes: budget_kib.saturating_sub(free_kib) << 10,
            budget: self.spool.budget_bytes,
            files: u64::from(self.spool.max_files).saturating_sub(free_files),
            max_files: u64::from(self.spool.max_files),
            refused: self.spool.refused.load(Ordering::Relaxed),
        }
    }

    /// The count of files refused for want of room in the spool as a
    /// whole (not in their VM's share), since start, as it goes on.
    pub fn spool_refusals(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.spool.full)
    }

    /// Refuses a file of `size` bytes over the limit.
    pub fn check_size(&self, size: u64) -> Result<(), UploadError> {
        let limit = self.config.max_file_size;
        match size > limit {
            true => Err(UploadError::TooLarge { size, limit }),
            false => Ok(()),
        }
    }

    /// Starts receiving a file of `size` bytes (unknown: see [`Upload::declare`]),
    /// optionally with the digest the agent claims for it, for the VM
    /// whose spool share is `vm_share` (none for `ScanFile`). A file of
    /// unknown size starts with a share of one chunk, and takes more as it
    /// grows.
    pub fn begin(
        &self,
        size: Option<u64>,
        claimed: Option<Digest>,
        vm_share: Option<&Arc<Semaphore>>,
    ) -> Result<Upload, UploadError> {
        if let Some(size) = size {
            self.check_size(size)?;
        }
        let mut upload = Upload {
            declared: size,
            room_for_declared: size.is_some(),
            claimed,
            limit: self.config.max_file_size,
            received: 0,
            hasher: blake3::Hasher::new(),
            sink: Sink::Memory {
                buffer: Vec::new(),
                share: None,
            },
            memory: Arc::clone(&self.memory),
            memory_threshold: self.config.memory_threshold,
            spool: self.spool.clone(),
            vm_share: vm_share.cloned(),
        };
        let expected = size.unwrap_or(u64::from(self.config.chunk_size));
        if !upload.reserve(expected) {
            upload.spill(expected)?;
        }
        Ok(upload)
    }
}

/// How spool files' names begin.
const SPOOL_PREFIX: &str = "upload-";

/// A new spool file in `dir`, private to the server, deleted when dropped.
/// Made here rather than by `tempfile`'s builder, whose errors carry the
/// path instead of the system's error code: the code is what tells a full
/// disk or no descriptor left (worth sending the file again) from a fault
/// (see [`out_of_room`]), and agents are not told the server's paths.
fn spool_file(dir: &Path) -> io::Result<NamedTempFile> {
    let mut tries = 0;
    loop {
        let path = dir.join(format!("{SPOOL_PREFIX}{:016x}", fastrand::u64(..)));
        let opened = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path);
        match opened {
            Ok(file) => {
                return match TempPath::try_from_path(&path) {
                    Ok(kept) => Ok(NamedTempFile::from_parts(file, kept)),
                    Err(err) => {
                        let _ = fs::remove_file(&path);
                        Err(err)
                    }
                };
            }
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists && tries < 8 => tries += 1,
            Err(err) => return Err(err),
        }
    }
}

/// A file being received.
pub struct Upload {
    /// The size its content must have, when given.
    declared: Option<u64>,
    /// Whether room for the whole declared size is taken once the file
    /// spills to the spool (a Scan stream's file, of a VM with a share of
    /// the spool), or only as content comes (a `ScanFile` call's, whose
    /// size is the caller's word alone: see [`Upload::declare`]).
    room_for_declared: bool,
    claimed: Option<Digest>,
    limit: u64,
    received: u64,
    hasher: blake3::Hasher,
    sink: Sink,
    memory: Arc<Semaphore>,
    memory_threshold: u64,
    spool: Spool,
    /// The spool share of the file's VM, if it is a VM's.
    vm_share: Option<Arc<Semaphore>>,
}

enum Sink {
    /// In memory, within `share` of the budget (KiB permits).
    Memory {
        buffer: Vec<u8>,
        share: Option<OwnedSemaphorePermit>,
    },
    /// On disk, within `share` of the spool budget, in one of the spool's
    /// `place`s.
    Spool {
        file: NamedTempFile,
        share: SpoolShare,
        place: OwnedSemaphorePermit,
    },
}

/// A spooled file's share of the spool budget, and of its VM's share when
/// it is a VM's (KiB permits, as many of each).
struct SpoolShare {
    all: OwnedSemaphorePermit,
    vm: Option<OwnedSemaphorePermit>,
}

impl SpoolShare {
    fn kib(&self) -> u64 {
        self.all.num_permits() as u64
    }

    fn merge(&mut self, more: SpoolShare) {
        self.all.merge(more.all);
        if let (Some(vm), Some(more)) = (&mut self.vm, more.vm) {
            vm.merge(more);
        }
    }
}

impl Upload {
    /// Holds a file begun without a size to `size`: content of another
    /// size fails it, as a declared size does, but its room is taken only
    /// as its content comes. A `ScanFile` call has no VM, and so no share
    /// of the spool to keep its room within: a size said and not sent must
    /// not take the spool's room.
    pub fn declare(&mut self, size: u64) -> Result<(), UploadError> {
        if size > self.limit {
            return Err(UploadError::TooLarge {
                size,
                limit: self.limit,
            });
        }
        self.declared = Some(size);
        Ok(())
    }

    /// Adds the chunk at `offset`.
    pub fn push(&mut self, offset: u64, data: &[u8]) -> Result<(), UploadError> {
        if offset != self.received {
            return Err(UploadError::OutOfOrder {
                expected: self.received,
                got: offset,
            });
        }
        let total = self.received + data.len() as u64;
        if let Some(declared) = self.declared.filter(|&d| total > d) {
            return Err(UploadError::TooMuch { declared });
        }
        if total > self.limit {
            return Err(UploadError::TooLarge {
                size: total,
                limit: self.limit,
            });
        }
        self.hasher.update(data);
        self.write(data)?;
        self.received = total;
        Ok(())
    }

    /// Makes the memory share cover `bytes` (doubling it at least, to take
    /// from the budget rarely); false when the file is over the memory
    /// threshold or the budget is spent.
    fn reserve(&mut self, bytes: u64) -> bool {
        let Sink::Memory { buffer, share } = &mut self.sink else {
            return false;
        };
        let held = share.as_ref().map_or(0, |s| s.num_permits() as u64);
        if bytes <= held << 10 {
            return true;
        }
        if bytes > self.memory_threshold {
            return false;
        }
        let wanted = bytes.max(held << 11).min(self.memory_threshold);
        let Ok(more) = u32::try_from(wanted.div_ceil(1024) - held) else {
            return false;
        };
        let Ok(permit) = Arc::clone(&self.memory).try_acquire_many_owned(more) else {
            return false;
        };
        match share {
            Some(share) => share.merge(permit),
            None => *share = Some(permit),
        }
        // As much as the share covers: a later write within it must not
        // make the buffer grow (doubling) beyond what the budget counts.
        let covered = (held + u64::from(more)) << 10;
        buffer.reserve_exact(covered as usize - buffer.len());
        true
    }

    /// Moves the content to a spool file, with a share of the spool budget
    /// covering its declared size, or `bytes` (what arrived so far and the
    /// chunk at hand) when its size is unknown; its memory share is given
    /// back.
    fn spill(&mut self, bytes: u64) -> Result<(), UploadError> {
        let declared = self.declared.filter(|_| self.room_for_declared);
        let size = declared.unwrap_or(bytes).max(bytes);
        let place = self.spool.place()?;
        let share = self
            .spool
            .share(size.div_ceil(1024), self.vm_share.as_ref())?;
        let mut file = spool_file(&self.spool.dir).map_err(|e| self.spool.failed(e))?;
        if let Sink::Memory { buffer, .. } = &self.sink {
            (file.as_file_mut().write_all(buffer)).map_err(|e| self.spool.failed(e))?;
        }
        self.sink = Sink::Spool { file, share, place };
        Ok(())
    }

    fn write(&mut self, data: &[u8]) -> Result<(), UploadError> {
        let total = self.received + data.len() as u64;
        // Content that outgrows what the budget allows moves to the spool,
        // and gives its memory share back.
        if matches!(self.sink, Sink::Memory { .. }) && !self.reserve(total) {
            self.spill(total)?;
        }
        match &mut self.sink {
            Sink::Memory { buffer, .. } => buffer.extend_from_slice(data),
            Sink::Spool { file, share, .. } => {
                // A file of unknown size takes more of the spool budget as
                // it grows (doubling its share, to take from it rarely).
                let held = share.kib();
                if total > held << 10 {
                    let doubled = (held << 11).min(self.declared.unwrap_or(self.limit));
                    let wanted = total.max(doubled).div_ceil(1024);
                    share.merge(self.spool.share(wanted - held, self.vm_share.as_ref())?);
                }
                // Spool writes go to the page cache; they are short enough
                // to make on the runtime's threads.
                (file.as_file_mut().write_all(data)).map_err(|e| self.spool.failed(e))?;
            }
        }
        Ok(())
    }

    /// How many bytes arrived so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// All content arrived: checks its size and digest.
    pub fn finish(self) -> Result<Received, UploadError> {
        if let Some(declared) = self.declared.filter(|&d| d != self.received) {
            return Err(UploadError::SizeMismatch {
                declared,
                received: self.received,
            });
        }
        let digest = self.hasher.finalize();
        if self.claimed.is_some_and(|claimed| claimed != digest) {
            return Err(UploadError::DigestMismatch {
                computed: digest.to_hex().to_string(),
            });
        }
        let (content, guard) = match self.sink {
            Sink::Memory { buffer, share } => (
                Content::Bytes(Bytes::from(buffer)),
                ReceivedGuard {
                    _spool: None,
                    _memory: share,
                    _share: None,
                    _place: None,
                },
            ),
            Sink::Spool { file, share, place } => {
                let (file, path) = file.into_parts();
                let content = Content::Spooled {
                    file,
                    size: self.received,
                };
                let guard = ReceivedGuard {
                    _spool: Some(path),
                    _memory: None,
                    _share: Some(share),
                    _place: Some(place),
                };
                (content, guard)
            }
        };
        Ok(Received {
            content,
            digest,
            size: self.received,
            guard,
        })
    }
}

/// A complete, verified file, ready to scan. Dropping it releases its
/// memory or spool share and deletes its spool file.
pub struct Received {
    pub content: Content,
    pub digest: Digest,
    pub size: u64,
    guard: ReceivedGuard,
}

impl Received {
    /// The scan of this content, named `name` (none when empty), under
    /// the digest the server computed; the returned guard keeps the spool
    /// file and memory share until it is dropped, after the scan.
    pub fn into_job(self, name: String) -> (ScanJob, ReceivedGuard) {
        let job = ScanJob {
            content: self.content,
            name: Some(name).filter(|n| !n.is_empty()),
            digest: Some(self.digest),
        };
        (job, self.guard)
    }
}

/// Keeps a received file's spool file, its share of the memory or spool
/// budget, and its place in the spool alive.
pub struct ReceivedGuard {
    _spool: Option<TempPath>,
    _memory: Option<OwnedSemaphorePermit>,
    _share: Option<SpoolShare>,
    _place: Option<OwnedSemaphorePermit>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(threshold: u64, dir: &Path) -> UploadStore {
        let config = UploadConfig {
            memory_threshold: threshold,
            max_file_size: 1 << 20,
            ..UploadConfig::default()
        };
        UploadStore::new(config, dir).unwrap()
    }

    fn files_in(dir: &Path) -> usize {
        std::fs::read_dir(dir).unwrap().count()
    }

    #[test]
    fn the_spool_folder_is_private_and_emptied_of_what_a_crash_left() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        drop(store(0, &spool));
        let mode = std::fs::metadata(&spool).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "created private");
        std::fs::write(spool.join("upload-left.bin"), b"x").unwrap();
        std::fs::write(spool.join("operator-notes.txt"), b"x").unwrap();
        drop(store(0, &spool));
        assert_eq!(files_in(&spool), 1, "only spool files are removed");
        // A folder others may write to could have its files swapped.
        std::fs::set_permissions(&spool, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = UploadStore::new(UploadConfig::default(), &spool)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("writable by all users"), "{err}");
    }

    /// A spool error keeps the system's error code, which tells want of
    /// room (a full disk: worth sending again) from a fault, and does not
    /// give agents the server's paths.
    #[test]
    fn a_spool_error_says_whether_it_is_for_want_of_room() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        let store = store(10, &spool);
        std::fs::remove_dir_all(&spool).unwrap();
        let err = store
            .begin(Some(100), None, None)
            .err()
            .expect("no spool folder");
        let UploadError::Spool(io) = &err else {
            panic!("{err}");
        };
        assert_eq!(io.raw_os_error(), Some(libc::ENOENT), "{err}");
        assert_eq!(err.code(), Code::Internal);
        assert!(!err.to_string().contains("spool/"), "{err}");
        assert_eq!(store.spool_usage().refused, 0, "not for want of room");
        let full = store
            .spool
            .failed(io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(full.code(), Code::ResourceExhausted);
        // A full disk is a full spool, for the metrics and the status.
        assert_eq!(store.spool_usage().refused, 1);
        assert_eq!(store.spool_refusals().load(Ordering::Relaxed), 1);
    }

    #[test]
    fn small_files_stay_in_memory_large_ones_are_spooled_and_cleaned_up() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(1000, dir.path());
        let mut small = store.begin(Some(10), None, None).unwrap();
        small.push(0, b"0123456789").unwrap();
        let received = small.finish().unwrap();
        assert!(matches!(received.content, Content::Bytes(_)));
        assert_eq!(received.digest, blake3::hash(b"0123456789"));

        let mut large = store.begin(Some(2000), None, None).unwrap();
        large.push(0, &[1; 1500]).unwrap();
        assert_eq!(files_in(dir.path()), 1);
        large.push(1500, &[1; 500]).unwrap();
        let received = large.finish().unwrap();
        assert!(matches!(received.content, Content::Spooled { .. }));
        drop(received);
        assert_eq!(files_in(dir.path()), 0, "the spool file is deleted");

        let mut abandoned = store.begin(Some(5000), None, None).unwrap();
        abandoned.push(0, &[1; 100]).unwrap();
        drop(abandoned);
        assert_eq!(
            files_in(dir.path()),
            0,
            "an abandoned upload leaves nothing"
        );
    }

    #[test]
    fn lies_and_disorder_fail_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(1000, dir.path());
        let mut upload = store.begin(Some(4), None, None).unwrap();
        upload.push(0, b"ab").unwrap();
        assert!(matches!(
            upload.push(5, b"cd"),
            Err(UploadError::OutOfOrder {
                expected: 2,
                got: 5
            })
        ));
        assert!(matches!(
            upload.push(2, b"cde"),
            Err(UploadError::TooMuch { declared: 4 })
        ));

        let short = store.begin(Some(4), None, None).unwrap();
        assert!(matches!(
            short.finish(),
            Err(UploadError::SizeMismatch { .. })
        ));

        let mut lying = store
            .begin(Some(2), Some(blake3::hash(b"xx")), None)
            .unwrap();
        lying.push(0, b"ab").unwrap();
        assert!(matches!(
            lying.finish(),
            Err(UploadError::DigestMismatch { .. })
        ));

        assert!(matches!(
            store.begin(Some(2 << 20), None, None),
            Err(UploadError::TooLarge { .. })
        ));
        let mut unknown_size = store.begin(None, None, None).unwrap();
        assert!(matches!(
            unknown_size.push(0, &vec![0; 2 << 20]),
            Err(UploadError::TooLarge { .. })
        ));
    }

    #[test]
    fn the_spool_budget_refuses_what_does_not_fit_until_room_is_made() {
        let dir = tempfile::tempdir().unwrap();
        let config = UploadConfig {
            memory_threshold: 1 << 10,
            spool_budget: 8 << 10,
            chunk_size: 4 << 10,
            ..UploadConfig::default()
        };
        let store = UploadStore::new(config, dir.path()).unwrap();
        let first = store.begin(Some(6 << 10), None, None).unwrap();
        assert!(matches!(first.sink, Sink::Spool { .. }));
        let refused = store
            .begin(Some(4 << 10), None, None)
            .err()
            .expect("no room");
        assert!(matches!(refused, UploadError::SpoolFull { budget: 8192 }));
        assert_eq!(refused.code(), Code::ResourceExhausted);
        assert_eq!(files_in(dir.path()), 1, "nothing spooled for it");
        drop(first);
        let mut second = store.begin(Some(4 << 10), None, None).unwrap();
        second.push(0, &[7; 4 << 10]).unwrap();

        // A file of unknown size starts with a share of one chunk, and
        // takes more as it grows.
        let mut growing = store.begin(None, None, None).unwrap();
        growing.push(0, &[7; 2 << 10]).unwrap();
        assert!(matches!(growing.sink, Sink::Spool { .. }));
        assert!(matches!(
            growing.push(2 << 10, &[7; 4 << 10]),
            Err(UploadError::SpoolFull { .. })
        ));
        let usage = store.spool_usage();
        assert_eq!((usage.bytes, usage.files, usage.refused), (8 << 10, 2, 2));
        drop((second, growing));
        let usage = store.spool_usage();
        assert_eq!((usage.bytes, usage.files), (0, 0), "all given back");
    }

    #[test]
    fn the_spool_refuses_files_beyond_its_number_until_one_ends() {
        let dir = tempfile::tempdir().unwrap();
        let config = UploadConfig {
            memory_threshold: 1 << 10,
            memory_budget: 0,
            spool_files: 2,
            ..UploadConfig::default()
        };
        let store = UploadStore::new(config, dir.path()).unwrap();
        // With the memory budget spent, even small files are spooled.
        let mut first = store.begin(Some(10), None, None).unwrap();
        let second = store.begin(Some(4 << 10), None, None).unwrap();
        let refused = store.begin(Some(10), None, None).err().expect("no place");
        assert!(matches!(refused, UploadError::SpoolFiles { limit: 2 }));
        assert_eq!(refused.code(), Code::ResourceExhausted);
        assert_eq!(files_in(dir.path()), 2, "nothing spooled for it");
        first.push(0, b"0123456789").unwrap();
        let (_job, guard) = first.finish().unwrap().into_job("first".into());
        drop(second);
        let third = store.begin(Some(10), None, None).unwrap();
        assert!(
            store.begin(Some(10), None, None).is_err(),
            "a received file keeps its place until its scan ends"
        );
        drop((guard, third));
        let usage = store.spool_usage();
        assert_eq!((usage.files, usage.max_files, usage.refused), (0, 2, 2));
    }

    #[test]
    fn a_file_of_unknown_size_never_takes_more_than_the_size_limit() {
        let dir = tempfile::tempdir().unwrap();
        let config = UploadConfig {
            memory_threshold: 1 << 10,
            max_file_size: 12 << 10,
            spool_budget: 12 << 10,
            chunk_size: 4 << 10,
            ..UploadConfig::default()
        };
        let store = UploadStore::new(config, dir.path()).unwrap();
        let mut largest = store.begin(None, None, None).unwrap();
        for offset in (0..12 << 10).step_by(2 << 10) {
            largest
                .push(offset, &[7; 2 << 10])
                .expect("within the budget");
        }
        assert_eq!(largest.finish().unwrap().size, 12 << 10);
    }

    /// A size a `ScanFile` call declares holds its content to it, but
    /// takes its room in the spool only as the content comes: a size said
    /// and not sent leaves the spool's room to others.
    #[test]
    fn a_declared_size_takes_room_only_as_content_comes() {
        let dir = tempfile::tempdir().unwrap();
        let config = UploadConfig {
            memory_threshold: 16 << 10,
            chunk_size: 4 << 10,
            max_file_size: 1 << 20,
            spool_budget: 1 << 20,
            ..UploadConfig::default()
        };
        let store = UploadStore::new(config, dir.path()).unwrap();
        let mut declared = store.begin(None, None, None).unwrap();
        declared.declare(1 << 20).unwrap();
        // Past the memory threshold: spooled, with room for what came.
        for offset in (0..20 << 10).step_by(4 << 10) {
            declared.push(offset, &[7; 4 << 10]).unwrap();
        }
        let held = store.spool_usage().bytes;
        assert!(held <= 64 << 10, "{held} bytes held for 20 KiB sent");
        // Another file still finds room.
        let mut other = store.begin(Some(256 << 10), None, None).unwrap();
        other.push(0, &[8; 256 << 10]).unwrap();
        // The declared size holds: less content fails at the end.
        let ended = declared.finish();
        assert!(matches!(ended, Err(UploadError::SizeMismatch { .. })));
        let mut over = store.begin(None, None, None).unwrap();
        assert!(matches!(
            over.declare(2 << 20),
            Err(UploadError::TooLarge { .. })
        ));
    }

    #[test]
    fn the_memory_budget_sends_files_to_the_spool_when_spent() {
        let dir = tempfile::tempdir().unwrap();
        let config = UploadConfig {
            memory_threshold: 8 << 10,
            memory_budget: 16 << 10,
            ..UploadConfig::default()
        };
        let store = UploadStore::new(config, dir.path()).unwrap();
        let first = store.begin(Some(8 << 10), None, None).unwrap();
        let second = store.begin(Some(8 << 10), None, None).unwrap();
        let third = store.begin(Some(8 << 10), None, None).unwrap();
        assert!(matches!(first.sink, Sink::Memory { .. }));
        assert!(matches!(second.sink, Sink::Memory { .. }));
        assert!(
            matches!(third.sink, Sink::Spool { .. }),
            "the budget is spent"
        );
        drop(first);
        let fourth = store.begin(Some(8 << 10), None, None).unwrap();
        assert!(
            matches!(fourth.sink, Sink::Memory { .. }),
            "a finished upload returns its share"
        );
    }

    /// Content of unknown size takes shares as it grows: its buffer never
    /// holds more memory than they count.
    #[test]
    fn a_growing_upload_holds_no_more_memory_than_its_share() {
        let dir = tempfile::tempdir().unwrap();
        let config = UploadConfig {
            memory_threshold: 1 << 20,
            chunk_size: 64 << 10,
            ..UploadConfig::default()
        };
        let store = UploadStore::new(config, dir.path()).unwrap();
        let mut upload = store.begin(None, None, None).unwrap();
        let mut received = 0;
        // Beyond twice the share it has, a chunk takes a share of its size.
        for chunk in [(128 << 10) + 1, 1, 3000, 300_000, 1] {
            upload.push(received, &vec![7; chunk]).unwrap();
            received += chunk as u64;
            let Sink::Memory { buffer, share } = &upload.sink else {
                panic!("in memory");
            };
            let counted = share.as_ref().map_or(0, |s| s.num_permits()) << 10;
            assert!(
                buffer.capacity() <= counted,
                "{} > {counted}",
                buffer.capacity()
            );
        }
    }
}
