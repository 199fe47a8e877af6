//! The files an operator names: the configuration, the signatures, TLS
//! certificates and keys, tokens. Each is read only if it is a regular
//! file, and holds no more than its kind may, so that a FIFO or a device
//! named by mistake (or put in a file's place) fails the read with an
//! error that says so, rather than hang it for ever, and every reload
//! after it, or fill the memory (`/dev/zero`).
//!
//! A file is looked at before it is opened, not opened without blocking:
//! that would fail a file under a file server's lease rather than wait for
//! it.

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
    if !std::fs::metadata(path)?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    Ok((file, size))
}

/// The bytes of the regular file `path`, if it holds at most `limit` (a
/// file that grows meanwhile is read up to `limit`).
pub fn read(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    let (file, size) = open(path)?;
    if size > limit {
        let message = format!("{size} bytes, over the {limit} such a file may hold");
        return Err(io::Error::new(io::ErrorKind::InvalidData, message));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(limit).read_to_end(&mut bytes)?;
    Ok(bytes)
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
        assert!(err.to_string().contains("27 bytes, over the 10"), "{err}");

        // A FIFO would hold the read until a writer came; a device may
        // never end.
        let fifo = dir.path().join("fifo");
        let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a C string naming a path in a folder of our own.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        for odd in [fifo.as_path(), Path::new("/dev/zero"), dir.path()] {
            let err = read(odd, SMALL_FILE_LIMIT).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{}", odd.display());
            assert_eq!(err.to_string(), "not a regular file");
        }
        assert_eq!(
            read_to_string(&file, 1024).unwrap(),
            "-----BEGIN CERTIFICATE-----"
        );
        std::fs::write(&file, [0xff, 0xfe]).unwrap();
        assert!(read_to_string(&file, 1024).is_err());
    }
}
