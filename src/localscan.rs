//! The operator's local scan (`scanserver scan`): files and folders on this
//! machine, walked recursively and scanned in parallel by the same engine
//! the server uses.
//!
//! Folders are walked without following symbolic links (as `yr scan` and
//! clamscan do), and only regular files are scanned; a path named on the
//! command line is followed if it is a link. A folder that cannot be read is
//! reported as a failed entry, so it cannot pass for clean. The kernel's
//! own file systems (`/proc`, `/sys` and their kind, see
//! [`KERNEL_FILE_SYSTEMS`](crate::kernelfs::KERNEL_FILE_SYSTEMS)) are not
//! walked into: they hold views of the kernel, not files to protect.

use std::{path::PathBuf, time::Duration};

use walkdir::WalkDir;

use crate::{
    engine::{Content, Engine, ScanJob, ScanOutcome},
    files::{Found, LocalFile},
    kernelfs::on_kernel_file_system,
    report::{Format, Reporter, Summary},
    verdict::{FailReason, Verdict},
};

/// Scans `paths` (files or folders) with `engine`, printing each result in
/// `format`, and returns the totals.
pub fn run(engine: &Engine, paths: &[PathBuf], format: Format) -> Summary {
    let reporter = Reporter::new(format);
    let unreadable =
        |path: PathBuf, why: String| reporter.file(&path, &unreadable_outcome(why), None);
    let files = walk(paths.to_vec(), &unreadable);
    engine.scan_all(files.map(ScanJob::file), |job, outcome| {
        if let Content::File(file) = &job.content {
            reporter.file(&file.path, &outcome, None);
        }
    });
    reporter.finish()
}

/// The regular files below `paths`, walked in order without following
/// symbolic links (a path given itself is followed). Entries that cannot
/// be read go to `unreadable`, with why; so does a path given itself that
/// is neither a file nor a folder (a device, a FIFO: scanning it was asked
/// for, and did not happen). Such entries below a folder are left out, and
/// so are folders and files on the kernel's file systems below one that is
/// not (a network namespace's file bind-mounted under `/run`, say, which
/// says it is a regular file and fails every read; a path given on such a
/// file system is walked whole, as asked). Each file says how it was found
/// (see [`Found`]): one met below a folder is opened as the walk saw it.
pub fn walk<'a>(
    paths: Vec<PathBuf>,
    unreadable: impl Fn(PathBuf, String) + Send + Sync + 'a,
) -> impl Iterator<Item = LocalFile> + Send + 'a {
    paths
        .into_iter()
        .flat_map(|root| {
            let asked_for = on_kernel_file_system(&root);
            let walk = WalkDir::new(&root)
                .follow_links(false)
                .follow_root_links(true)
                .into_iter()
                .filter_entry(move |entry| {
                    // Links, devices, FIFOs and sockets are not scanned:
                    // what they are on is not asked.
                    let kind = entry.file_type();
                    asked_for
                        || !(kind.is_dir() || kind.is_file())
                        || !on_kernel_file_system(entry.path())
                });
            let below = match asked_for {
                true => Found::Walked,
                false => Found::WalkedOffKernel,
            };
            walk.map(move |entry| {
                let entry = entry
                    .map_err(|err| (err.path().unwrap_or(&root).to_owned(), err.to_string()))?;
                let found = if entry.depth() == 0 {
                    Found::Named
                } else {
                    below
                };
                Ok((entry, found))
            })
        })
        .filter_map(move |entry| match entry {
            Ok((entry, found)) if entry.file_type().is_file() => Some(LocalFile {
                path: entry.into_path(),
                found,
            }),
            Ok((entry, _)) if entry.depth() == 0 && !entry.file_type().is_dir() => {
                unreadable(entry.into_path(), "not a regular file or folder".into());
                None
            }
            Ok(_) => None,
            Err((path, why)) => {
                unreadable(path, why);
                None
            }
        })
}

/// The outcome reported for an entry that could not be read.
pub fn unreadable_outcome(why: String) -> ScanOutcome {
    let verdict = Verdict::failed(FailReason::Io, why);
    ScanOutcome::failed(verdict, 0, Duration::ZERO, "".into())
}

#[cfg(test)]
mod tests {
    use std::{ffi::CString, os::unix::ffi::OsStrExt, path::Path};

    use super::*;

    /// A namespace's file bind-mounted in a walked folder (as `ip netns`
    /// mounts them under `/run/netns`) is left out: it says it is a regular
    /// file, and no read of it succeeds. Mounting needs the right to (root,
    /// as in the CI's container); without it the test says it was skipped.
    #[test]
    fn a_kernel_file_mounted_in_a_walked_folder_is_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let (file, target) = (dir.path().join("a.txt"), dir.path().join("net"));
        std::fs::write(&file, b"a file").unwrap();
        std::fs::write(&target, b"").unwrap();
        let c_path = |path: &Path| CString::new(path.as_os_str().as_bytes()).unwrap();
        let (source, at) = (c_path(Path::new("/proc/self/ns/net")), c_path(&target));
        let null = std::ptr::null();
        // SAFETY: C strings and null pointers, as mount(2) takes them.
        if unsafe {
            libc::mount(
                source.as_ptr(),
                at.as_ptr(),
                null,
                libc::MS_BIND,
                null.cast(),
            )
        } != 0
        {
            eprintln!(
                "skipped: cannot mount here ({})",
                std::io::Error::last_os_error()
            );
            return;
        }
        struct Mounted(CString);
        impl Drop for Mounted {
            fn drop(&mut self) {
                // SAFETY: a C string naming the mount made above.
                unsafe { libc::umount2(self.0.as_ptr(), libc::MNT_DETACH) };
            }
        }
        let _mounted = Mounted(at);
        assert!(on_kernel_file_system(&target), "mounted");
        let unreadable = |path: PathBuf, why: String| panic!("{}: {why}", path.display());
        let walked: Vec<_> = walk(vec![dir.path().to_owned()], unreadable).collect();
        let expected = LocalFile {
            path: file,
            found: Found::WalkedOffKernel,
        };
        assert_eq!(walked, [expected]);
    }

    /// A folder named on such a file system is walked whole, as asked,
    /// folders below it included.
    #[test]
    fn a_folder_named_on_a_kernel_file_system_is_walked_whole() {
        let root = PathBuf::from("/proc/self");
        let deep = walk(vec![root], |_, _| {}).any(|file| file.path.starts_with("/proc/self/task"));
        assert!(deep);
    }
}
