//! Opening the files the server reads: the files it scans (the local
//! scan's, `lightagent`'s) and the files an operator names (the
//! configuration, the signatures, TLS certificates and keys, tokens).
//!
//! Only a regular file is opened ([`open_regular`]), so that a FIFO, a
//! pipe (`/dev/stdin`) or a device, named by mistake or put in a file's
//! place, fails with an error that says so rather than hang the read for
//! ever, act on being opened, or never end (`/dev/zero`). A file a walk
//! met is opened as the walk saw it ([`Found`], [`open_found`]): a link
//! swapped in for it since is not followed. The files an
//! operator names are read whole, within a size ([`read`]): a
//! configuration, TLS files and tokens of at most [`SMALL_FILE_LIMIT`]
//! (tokens less), rule sources of at most 64 MiB. Those read again on
//! SIGHUP and before each report are read off the runtime's threads,
//! within a bound (`OffThread`).

use std::{
    fs::File,
    io::{self, Read},
    os::{fd::AsRawFd, unix::fs::OpenOptionsExt},
    path::{Path, PathBuf},
    sync::LazyLock,
    time::{Duration, Instant},
};

use crate::kernelfs::is_kernel_file;

/// A file of the kernel's file systems larger than this is a device's
/// memory or the kernel's, not a file: it is not opened (see
/// [`open_regular`]).
const KERNEL_FILE_LIMIT: u64 = 32 << 20;

/// How a local file to scan was found, which decides what opening it may
/// meet (see [`open_found`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// Named by whoever asked for the scan (a path on the command line): a
    /// link is followed, wherever it leads.
    Named,
    /// Met by a walk, as a regular file: a link put in its place since
    /// (by a user who may write to the walked folder) is not followed.
    Walked,
    /// Met by a walk below a folder off the kernel's file systems, which
    /// the walk does not enter: a file of theirs met all the same (through
    /// a folder's link swapped in since) is not opened either.
    WalkedOffKernel,
}

/// A local file to scan, and how it was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalFile {
    pub path: PathBuf,
    pub found: Found,
}

impl From<PathBuf> for LocalFile {
    /// A file named by whoever asked for the scan.
    fn from(path: PathBuf) -> Self {
        LocalFile {
            path,
            found: Found::Named,
        }
    }
}

impl From<&Path> for LocalFile {
    fn from(path: &Path) -> Self {
        path.to_owned().into()
    }
}

impl From<&PathBuf> for LocalFile {
    fn from(path: &PathBuf) -> Self {
        path.clone().into()
    }
}

impl LocalFile {
    /// Opens it, as [`open_found`] does.
    pub fn open(&self, wait: Duration) -> io::Result<(File, u64)> {
        open_found(&self.path, self.found, wait)
    }
}

/// The most a small file an operator names (a configuration, a TLS
/// certificate chain or key, a CA bundle) may hold.
pub const SMALL_FILE_LIMIT: u64 = 4 << 20;

/// Opens `path` to be read whole if it is a regular file (a FIFO or
/// device would block or never end), returning it with its size.
///
/// The path is first resolved without opening what it names (`O_PATH`),
/// and only a regular file found there is opened, through that resolution
/// (`/proc/self/fd`), never by its path again. A scan running as root
/// walks folders other users write to: one of them may put a symbolic
/// link, or a folder's link, in place of a file the walk saw, pointing at
/// a device whose open alone acts (`/dev/watchdog` arms the machine's
/// watchdog) or at a FIFO, which would hold the scan. Without `/proc` the
/// path is opened directly (then checked, as before).
///
/// Opened without blocking: a regular file under another process's lease
/// (a file server's oplock) refuses such an open, which tells the holder
/// to let go; it is opened again until the lease is gone or `wait` has
/// passed (reads of most regular files do not heed the flag; those of the
/// few that would block, `/proc/kmsg` say, fail instead).
///
/// A file of the kernel's file systems (see [`crate::kernelfs`]) of
/// more than `KERNEL_FILE_LIMIT` (32 MiB) is refused once open, unread:
/// it is a device's memory or the kernel's (the `resource0` of a PCI
/// device in `/sys`, `/proc/kcore`), which a scan must not read or map.
/// Only a walk named such a folder meets one.
pub fn open_regular(path: &Path, wait: Duration) -> io::Result<(File, u64)> {
    open_found(path, Found::Named, wait)
}

/// [`open_regular`], for a file found as `how` says: one a walk met is
/// resolved without following a link in its place, and, when the walk
/// kept off the kernel's file systems, refused if it is on one of them.
/// (Each is looked at on what the path resolved to, which is what is
/// opened: a swap between the walk and the opening is found, not raced.)
pub fn open_found(path: &Path, how: Found, wait: Duration) -> io::Result<(File, u64)> {
    let no_follow = match how {
        Found::Named => 0,
        Found::Walked | Found::WalkedOffKernel => libc::O_NOFOLLOW,
    };
    let found = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | no_follow)
        .open(path)?;
    regular(&found)?;
    let met_outside = |file: &File| {
        let message = "a file of the kernel's file systems (sysfs, procfs, ...), met outside them: a link swapped in since the walk? Not read";
        match how == Found::WalkedOffKernel && is_kernel_file(file) {
            true => Err(io::Error::new(io::ErrorKind::InvalidInput, message)),
            false => Ok(()),
        }
    };
    met_outside(&found)?;
    static PROC: LazyLock<bool> = LazyLock::new(|| {
        let mounted = Path::new("/proc/self/fd").is_dir();
        if !mounted {
            tracing::warn!(
                "/proc is not mounted: files are opened by their paths, and a link swapped in for one is opened before it is refused"
            );
        }
        mounted
    });
    let reopened = PathBuf::from(format!("/proc/self/fd/{}", found.as_raw_fd()));
    // (A path of /proc/self/fd is a link by design: followed.)
    let (through, no_follow) = match *PROC {
        true => (reopened.as_path(), 0),
        false => (path, no_follow),
    };
    let open = || {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | no_follow)
            .open(through)
    };
    let deadline = Instant::now() + wait;
    let mut opened = open();
    while opened
        .as_ref()
        .is_err_and(|err| err.kind() == io::ErrorKind::WouldBlock)
        && Instant::now() < deadline
    {
        std::thread::sleep(LEASE_POLL);
        opened = open();
    }
    let file = opened?;
    let size = regular(&file)?;
    if !*PROC {
        // Opened by its path again: what it is now is what counts.
        met_outside(&file)?;
    }
    // Looked at on the file opened, whichever way it was.
    if size > KERNEL_FILE_LIMIT && is_kernel_file(&file) {
        let message = format!(
            "a file of the kernel's (sysfs, procfs, ...) of {size} bytes: a device's or the kernel's memory, not read"
        );
        return Err(io::Error::new(io::ErrorKind::InvalidInput, message));
    }
    Ok((file, size))
}

/// The size of `file` if it is a regular file; an error otherwise.
fn regular(file: &File) -> io::Result<u64> {
    let metadata = file.metadata()?;
    if !metadata.is_file() {
        let message = "not a regular file (a FIFO, a pipe, a device, a folder, or a link put in a walked file's place)";
        return Err(io::Error::new(io::ErrorKind::InvalidInput, message));
    }
    Ok(metadata.len())
}

/// How often a file under a lease is opened again.
const LEASE_POLL: Duration = Duration::from_millis(10);

/// How long a file under another process's lease is waited for when
/// opened outside a scan (by `lightagent`, or as a file a setting names),
/// as the local scan waits with its default timeout.
pub const LEASE_WAIT: Duration = Duration::from_secs(10);

/// The error of a file that held `read` of the `size` bytes it had when
/// opened: it shrank (truncated to be rewritten, say) while it was read.
/// Whoever reads a file to scan it fails it so: a verdict of what was read
/// would be that of a part of it.
pub fn shrank(read: u64, size: u64) -> io::Error {
    let message = format!("the file shrank while it was read ({read} of {size} bytes)");
    io::Error::new(io::ErrorKind::UnexpectedEof, message)
}

/// The bytes of the regular file `path`, if it holds at most `limit` bytes
/// (when read, too: it may grow meanwhile).
pub fn read(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    let (file, size) = open_within(path, limit)?;
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(limit.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(too_large(bytes.len() as u64, limit));
    }
    Ok(bytes)
}

/// The regular file `path` opened, and its size, if it holds at most
/// `limit` bytes.
pub fn open_within(path: &Path, limit: u64) -> io::Result<(File, u64)> {
    let (file, size) = open_regular(path, LEASE_WAIT)?;
    if size > limit {
        return Err(too_large(size, limit));
    }
    Ok((file, size))
}

fn too_large(size: u64, limit: u64) -> io::Error {
    let message = format!(
        "{size} bytes, more than the {} such a file may hold",
        in_units(limit)
    );
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// `bytes` in MiB or KiB when a whole number of them, as limits are.
fn in_units(bytes: u64) -> String {
    match bytes {
        0 => "0 bytes".to_owned(),
        b if b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} bytes"),
    }
}

/// [`read`], as UTF-8 text.
pub fn read_to_string(path: &Path, limit: u64) -> io::Result<String> {
    String::from_utf8(read(path, limit)?)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8 text"))
}

/// How long the server waits for the files it reads again while serving
/// on SIGHUP (TLS files, the admin token) and before each report (the
/// reporting token and TLS files): past this, it goes on with those it has.
pub const READ_WAIT: Duration = Duration::from_secs(10);

/// Files read again while serving, on a blocking thread (a file on a share
/// may keep a read waiting, which must not be a runtime thread's wait),
/// and waited for within a bound. A read that takes longer is left to end
/// on its own, and no other starts until it has: each would hold one more
/// blocking thread on the same share. What it gave is kept for whoever
/// asks ([`OffThread::late`]).
pub(crate) struct OffThread<T> {
    /// The last read, until what it gave is taken; kept before it is
    /// waited for, so that a caller dropped while waiting leaves it here.
    pending: Option<tokio::task::JoinHandle<T>>,
}

impl<T> Default for OffThread<T> {
    fn default() -> Self {
        OffThread { pending: None }
    }
}

/// Why [`OffThread::read`] gave nothing.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NotRead {
    #[error(
        "an earlier read of them has not ended (a file on a share that hangs?): they are not read again until it has"
    )]
    StillReading,
    #[error("not read within {0:?} (a file on a share that hangs?): the earlier ones stay in use")]
    TooSlow(Duration),
    #[error("the read failed: {0}")]
    Failed(#[from] tokio::task::JoinError),
}

impl<T: Send + 'static> OffThread<T> {
    /// What `read` gives, run on a blocking thread and waited for up to
    /// `wait`; nothing while a read left by an earlier call still runs.
    /// What such a read gave once it ended, if not taken ([`Self::late`]),
    /// is dropped (it is logged if the read panicked).
    pub(crate) async fn read(
        &mut self,
        wait: Duration,
        read: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, NotRead> {
        if let Some(Err(err)) = self.late().await {
            tracing::error!("an earlier read of files failed: {err}");
        }
        if self.pending.is_some() {
            return Err(NotRead::StillReading);
        }
        let pending = self.pending.insert(tokio::task::spawn_blocking(read));
        let joined = tokio::time::timeout(wait, pending)
            .await
            .map_err(|_| NotRead::TooSlow(wait))?;
        self.pending = None;
        Ok(joined?)
    }

    /// What a read left by an earlier call gave, once it has ended.
    pub(crate) async fn late(&mut self) -> Option<Result<T, tokio::task::JoinError>> {
        match self.pending.take_if(|pending| pending.is_finished()) {
            Some(ended) => Some(ended.await),
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a read left behind gives, once it has ended.
    async fn late_of<T: Send + 'static>(reading: &mut OffThread<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(late) = reading.late().await {
                return late.unwrap();
            }
            assert!(Instant::now() < deadline, "the read never ended");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_read_too_slow_is_left_to_end_and_none_starts_meanwhile() {
        use std::sync::{
            Arc,
            atomic::{AtomicBool, Ordering},
            mpsc,
        };
        let mut reading = OffThread::default();
        assert_eq!(reading.read(READ_WAIT, || 1).await.unwrap(), 1);
        assert!(reading.late().await.is_none());
        let (release, released) = mpsc::channel::<()>();
        let wait = Duration::from_millis(50);
        let slow = reading.read(wait, move || released.recv().map_or(0, |()| 2));
        assert!(matches!(slow.await, Err(NotRead::TooSlow(w)) if w == wait));
        let started = Arc::new(AtomicBool::new(false));
        let starts = Arc::clone(&started);
        let meanwhile = reading.read(READ_WAIT, move || {
            starts.store(true, Ordering::SeqCst);
            4
        });
        assert!(matches!(meanwhile.await, Err(NotRead::StillReading)));
        assert!(reading.late().await.is_none(), "not ended yet");
        release.send(()).unwrap();
        assert_eq!(late_of(&mut reading).await, 2);
        assert!(!started.load(Ordering::SeqCst));

        // A caller dropped while it waited leaves the read behind, as one
        // that waited too long does.
        let (release, released) = mpsc::channel::<()>();
        let read = reading.read(READ_WAIT, move || released.recv().map_or(0, |()| 5));
        assert!(tokio::time::timeout(wait, read).await.is_err());
        assert!(matches!(
            reading.read(READ_WAIT, || 6).await,
            Err(NotRead::StillReading)
        ));
        release.send(()).unwrap();
        assert_eq!(late_of(&mut reading).await, 5);

        let panics = || -> i32 { panic!("a read that panics") };
        let failed = reading.read(READ_WAIT, panics).await;
        assert!(matches!(failed, Err(NotRead::Failed(_))), "{failed:?}");
        assert_eq!(reading.read(READ_WAIT, || 7).await.unwrap(), 7);
    }

    /// A walked file is opened as the walk saw it: a link swapped in for it
    /// since is not followed, and a file of the kernel's file systems met
    /// through a folder's link swapped in is not opened when the walk kept
    /// off them. Named, both are.
    #[test]
    fn a_walked_file_is_opened_as_the_walk_saw_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file.txt");
        std::fs::write(&file, b"text").unwrap();
        let swapped = dir.path().join("swapped");
        std::os::unix::fs::symlink(&file, &swapped).unwrap();
        // A folder's link into /proc, met as `proc/status`.
        std::os::unix::fs::symlink("/proc/self", dir.path().join("proc")).unwrap();
        let status = dir.path().join("proc/status");
        let opens = |path: &Path, how| open_found(path, how, LEASE_WAIT).map_err(|e| e.to_string());

        for how in [Found::Named, Found::Walked, Found::WalkedOffKernel] {
            assert!(opens(&file, how).is_ok(), "{how:?}");
        }
        assert!(opens(&swapped, Found::Named).is_ok());
        for how in [Found::Walked, Found::WalkedOffKernel] {
            let err = opens(&swapped, how).unwrap_err();
            assert!(err.starts_with("not a regular file"), "{how:?}: {err}");
        }
        assert!(opens(&status, Found::Named).is_ok());
        assert!(
            opens(&status, Found::Walked).is_ok(),
            "a walk of a kernel folder"
        );
        let err = opens(&status, Found::WalkedOffKernel).unwrap_err();
        assert!(err.contains("met outside them"), "{err}");
    }

    #[test]
    fn only_regular_files_within_their_limit_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cert.pem");
        std::fs::write(&file, b"-----BEGIN CERTIFICATE-----").unwrap();
        assert_eq!(read(&file, 1024).unwrap(), b"-----BEGIN CERTIFICATE-----");
        let link = dir.path().join("link.pem");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert_eq!(read(&link, 1024).unwrap().len(), 27, "links are followed");

        let err = read(&file, 10).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert_eq!(
            err.to_string(),
            "27 bytes, more than the 10 bytes such a file may hold"
        );
        assert_eq!(in_units(SMALL_FILE_LIMIT), "4 MiB");
        // A file that says it holds less than it gives (as the kernel's
        // do, or one growing as it is read) is held to the limit too.
        let status = Path::new("/proc/self/status");
        assert_eq!(std::fs::metadata(status).unwrap().len(), 0);
        let err = read(status, 64).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(read(status, 64 << 10).unwrap().len() > 64);

        // A FIFO would hold the read until a writer came; a device may
        // never end.
        let fifo = dir.path().join("fifo");
        let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a C string naming a path in a folder of our own.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        for odd in [fifo.as_path(), Path::new("/dev/zero"), dir.path()] {
            let err = read(odd, SMALL_FILE_LIMIT).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{}", odd.display());
            assert!(err.to_string().starts_with("not a regular file"), "{err}");
        }
        assert_eq!(
            read_to_string(&file, 1024).unwrap(),
            "-----BEGIN CERTIFICATE-----"
        );
        std::fs::write(&file, [0xff, 0xfe]).unwrap();
        assert!(read_to_string(&file, 1024).is_err());
    }
}
