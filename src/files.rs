//! The files an operator names: the configuration, the signatures, TLS
//! certificates and keys, tokens. Each is read only if it is a regular
//! file, and within a size (the configuration, TLS files and tokens; rule
//! sources), so that a FIFO, a pipe (`/dev/stdin`) or a device named by
//! mistake fails the read with an error that says so, rather than hang
//! it for ever, and every reload after it, or fill the memory
//! (`/dev/zero`).
//!
//! A file is looked at before it is opened, not opened without blocking:
//! that would fail a file under a file server's lease rather than wait for
//! it. (A FIFO put in its place between the look and the open still holds
//! the open until a writer comes; what it then gives is refused.)

use std::{
    fs::File,
    io::{self, Read},
    path::Path,
};

/// The most a small file an operator names (a configuration, a TLS
/// certificate chain or key, a CA bundle) may hold.
pub const SMALL_FILE_LIMIT: u64 = 4 << 20;

/// Opens the regular file `path` (following links), with its size.
pub fn open(path: &Path) -> io::Result<(File, u64)> {
    let not_regular = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file (a FIFO, a pipe, a device or a folder): name a regular file",
        )
    };
    if !std::fs::metadata(path)?.is_file() {
        return Err(not_regular());
    }
    let file = File::open(path)?;
    // The file as opened: another may have been put in its place.
    let metadata = file.metadata()?;
    if !metadata.is_file() {
        return Err(not_regular());
    }
    Ok((file, metadata.len()))
}

/// The bytes of the regular file `path`, if it holds at most `limit` bytes
/// (when read, too: it may grow meanwhile).
pub fn read(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    let too_large = |size: u64| {
        let message = format!(
            "{size} bytes, more than the {} such a file may hold",
            in_units(limit)
        );
        io::Error::new(io::ErrorKind::InvalidData, message)
    };
    let (file, size) = open(path)?;
    if size > limit {
        return Err(too_large(size));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(limit.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
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

#[cfg(test)]
mod tests {
    use super::*;

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
