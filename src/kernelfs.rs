//! The kernel's own file systems (`/proc`, `/sys` and their kind): views
//! of the kernel, not files to protect. A walk below a folder does not
//! enter them (see `localscan::walk`), and a large file on one is not
//! opened (see [`crate::files::open_regular`]).

use std::{ffi::CString, mem::MaybeUninit, os::unix::ffi::OsStrExt, path::Path};

/// The kernel's file systems, by their `statfs` magic numbers: proc,
/// sysfs, debugfs, tracefs, securityfs, cgroup, cgroup2, bpf, pstore,
/// configfs, efivarfs, devpts, selinuxfs, binfmt_misc, fusectl and nsfs.
/// Reading their files is not harmless: most claim sizes they do not hold
/// (each would fail as a file that shrank), some reads have side effects
/// (a device's memory mapped through `/sys/devices/.../resource0`, the
/// kernel's messages taken from `/proc/kmsg`) and some block (the
/// `/proc/PID/maps` of a process stuck in the kernel). tmpfs is not one of
/// them: `/dev/shm` and `/run` hold files like any other.
pub const KERNEL_FILE_SYSTEMS: [u32; 16] = [
    0x9fa0,      // proc
    0x6265_6572, // sysfs
    0x6462_6720, // debugfs
    0x7472_6163, // tracefs
    0x7363_6673, // securityfs
    0x0027_e0eb, // cgroup
    0x6367_7270, // cgroup2
    0xcafe_4a11, // bpf
    0x6165_676c, // pstore
    0x6265_6570, // configfs
    0xde5e_81e4, // efivarfs
    0x1cd1,      // devpts
    0xf97c_ff8c, // selinuxfs
    0x4249_4e4d, // binfmt_misc
    0x6573_5543, // fusectl
    0x6e73_6673, // nsfs
];

/// Whether `path` is on one of [`KERNEL_FILE_SYSTEMS`]; false when that
/// cannot be told (the walk then reports what it cannot read).
pub fn on_kernel_file_system(path: &Path) -> bool {
    let Ok(path) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `path` is a C string, and `stat` has room for the result.
    kernels(|stat| unsafe { libc::statfs(path.as_ptr(), stat) })
}

/// Whether the open `file` is on one of [`KERNEL_FILE_SYSTEMS`]; false
/// when that cannot be told.
pub fn is_kernel_file(file: &std::fs::File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is open for the call, and `stat` has room
    // for the result.
    kernels(|stat| unsafe { libc::fstatfs(file.as_raw_fd(), stat) })
}

/// Whether the file system `statfs` (a `statfs` or `fstatfs` call) tells
/// of is one of [`KERNEL_FILE_SYSTEMS`].
fn kernels(statfs: impl FnOnce(*mut libc::statfs) -> libc::c_int) -> bool {
    let mut stat = MaybeUninit::<libc::statfs>::uninit();
    if statfs(stat.as_mut_ptr()) != 0 {
        return false;
    }
    // SAFETY: the call succeeded, and filled `stat`. The magic numbers are
    // 32 bits; `f_type`'s width and sign vary.
    let kind = unsafe { stat.assume_init() }.f_type as u32;
    KERNEL_FILE_SYSTEMS.contains(&kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernels_file_systems_are_told_from_others() {
        assert!(on_kernel_file_system(Path::new("/proc/self")));
        // A namespace's file, as `ip netns` and container runtimes
        // bind-mount them under `/run`.
        assert!(on_kernel_file_system(Path::new("/proc/self/ns/net")));
        let dir = tempfile::tempdir().unwrap();
        assert!(!on_kernel_file_system(dir.path()));
        assert!(!on_kernel_file_system(&dir.path().join("missing")));
        // Files resolved without opening them (`O_PATH`): `fstatfs` takes
        // those too.
        let resolved = |path: &Path| {
            use std::os::unix::fs::OpenOptionsExt;
            let mut options = std::fs::OpenOptions::new();
            options.read(true).custom_flags(libc::O_PATH);
            options.open(path).unwrap()
        };
        assert!(is_kernel_file(&resolved(Path::new("/proc/self/status"))));
        let file = dir.path().join("file");
        std::fs::write(&file, b"content").unwrap();
        assert!(!is_kernel_file(&resolved(&file)));
    }
}
