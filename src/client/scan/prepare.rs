//! The preparer: local files taken as they come (from a walk, say) and
//! read a few ahead of their announcement, on a thread of its own.

use std::{
    io::Read,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use tokio::sync::mpsc;

use super::ResultSink;
use crate::{
    client::{ClientError, Files, PreparedFile},
    engine::ScanOutcome,
    files::{LEASE_WAIT, LocalFile, shrank},
};

/// Local files the preparer may have ready ahead of the announcer (and
/// one more, waiting for room). Few: a file is prepared for the way of
/// announcing it chosen when it is prepared, and the choice may change
/// meanwhile.
const PREPARED_AHEAD: usize = 16;

/// A local file ready to be announced: its size, and its digest when it
/// is announced by digest.
#[derive(Debug)]
pub(super) struct Ready {
    pub(super) size: u64,
    pub(super) digest: Option<blake3::Hash>,
}

/// A local file that could not be read (by the preparer or the content
/// sender): why, and its size when opened (0 when it could not be), as the
/// local scan gives it.
pub(super) struct Unreadable {
    pub(super) err: std::io::Error,
    pub(super) size: u64,
}

impl From<std::io::Error> for Unreadable {
    /// A file that could not be opened.
    fn from(err: std::io::Error) -> Self {
        Unreadable { err, size: 0 }
    }
}

/// The files still to announce, in order.
pub(super) enum Sources {
    /// Local files, from the preparer.
    Local {
        prepared: mpsc::Receiver<Prepared>,
        /// Set once the scan has broken: the preparer hands on the files
        /// left without reading them, to be failed.
        stopped: Arc<AtomicBool>,
        /// Set by the preparer once it has handed on every file: a channel
        /// closed without it (the preparer panicked) is no end of the
        /// files, which must not pass for a scan of them all.
        finished: Arc<AtomicBool>,
    },
    /// Files read and hashed beforehand, at hand.
    Prepared(std::vec::IntoIter<Arc<PreparedFile>>),
}

impl Sources {
    /// Starts preparing local files (see [`Preparer`]).
    pub(super) fn start(
        files: Files,
        content_first: Arc<AtomicBool>,
        max_file_size: u64,
    ) -> Sources {
        let paths = match files {
            Files::Prepared(files) => return Sources::Prepared(files.into_iter()),
            Files::Local(paths) => paths,
        };
        let (ready, prepared) = mpsc::channel(PREPARED_AHEAD);
        let stopped = Arc::new(AtomicBool::new(false));
        let finished = Arc::new(AtomicBool::new(false));
        let preparer = Preparer {
            paths,
            content_first,
            stopped: Arc::clone(&stopped),
            finished: Arc::clone(&finished),
            max_file_size,
            ready,
        };
        tokio::task::spawn_blocking(move || preparer.run());
        Sources::Local {
            prepared,
            stopped,
            finished,
        }
    }

    /// How many files are still to come: as many as the preparer has
    /// ready once it has taken the last file, and more than any limit
    /// before.
    pub(super) fn left(&self) -> usize {
        match self {
            Sources::Local { prepared, .. } if prepared.is_closed() => prepared.len(),
            Sources::Local { .. } => usize::MAX,
            Sources::Prepared(files) => files.len(),
        }
    }

    /// Whether the files came to their end, once the preparer's channel
    /// is closed; an error if it closed before (the preparer panicked).
    pub(super) fn ended(&self) -> Result<(), ClientError> {
        match self {
            Sources::Local { finished, .. } if !finished.load(Ordering::Acquire) => {
                Err(ClientError::WalkFailed)
            }
            _ => Ok(()),
        }
    }

    /// Hands every file left to `on_result` with the outcome `failed`
    /// makes, in order, without reading them (those already read too), and
    /// returns once the preparer has let go of its files.
    pub(super) async fn fail_all(
        self,
        on_result: &impl ResultSink,
        failed: impl Fn() -> ScanOutcome,
    ) {
        match self {
            Sources::Local {
                mut prepared,
                stopped,
                ..
            } => {
                stopped.store(true, Ordering::Relaxed);
                while let Some(file) = prepared.recv().await {
                    on_result.room().await;
                    on_result.put(&file.local.path, failed());
                }
            }
            Sources::Prepared(files) => {
                for file in files {
                    on_result.room().await;
                    on_result.put(&file.path, failed());
                }
            }
        }
    }
}

/// A local file as the preparer hands it on.
pub(super) struct Prepared {
    pub(super) local: LocalFile,
    /// Its size and digest, or why it could not be read; `None` for a file
    /// left unread because the scan had broken.
    pub(super) ready: Option<Result<Ready, Unreadable>>,
}

/// Prepares local files, in order, on a thread of its own, a few
/// ([`PREPARED_AHEAD`]) ahead of the announcer: one thread hashing file
/// after file, rather than a task handed to a thread for each file. It
/// takes the files as it goes, so that a walk of a large tree goes on
/// while the first files are scanned, and is never held whole.
struct Preparer {
    paths: Box<dyn Iterator<Item = LocalFile> + Send>,
    /// Whether the next file goes with its content (only its size is
    /// needed) or by its digest; see [`Familiarity`].
    content_first: Arc<AtomicBool>,
    /// Whether the scan has broken: see [`Sources::fail_all`].
    stopped: Arc<AtomicBool>,
    /// Set once every file was handed on (see [`Sources::ended`]).
    finished: Arc<AtomicBool>,
    /// The server's limit: a larger file is not hashed, only announced,
    /// to be refused (reading a disk image in full for nothing could take
    /// longer than the server waits for the stream).
    max_file_size: u64,
    ready: mpsc::Sender<Prepared>,
}

impl Preparer {
    /// Prepares each file until none is left, or no one takes them. The
    /// files (and whatever the walk holds) are let go before the channel
    /// closes: whoever sees it closed holds the last of them.
    fn run(self) {
        let Preparer {
            paths,
            content_first,
            stopped,
            finished,
            max_file_size,
            ready,
        } = self;
        for local in paths {
            let prepared = (!stopped.load(Ordering::Relaxed)).then(|| {
                if !content_first.load(Ordering::Relaxed) {
                    return hash_file(&local, max_file_size);
                }
                // A file to go with its content needs only its size, but
                // one over the limit is opened, as the local scan opens it
                // before refusing it: one it cannot open fails as
                // unreadable, not as too large (the kernel's `/proc/kcore`
                // says it holds terabytes).
                match std::fs::metadata(&local.path) {
                    Ok(metadata) if metadata.len() <= max_file_size => Ok(Ready {
                        size: metadata.len(),
                        digest: None,
                    }),
                    Ok(_) => hash_file(&local, max_file_size),
                    Err(err) => Err(Unreadable::from(err)),
                }
            });
            let file = Prepared {
                local,
                ready: prepared,
            };
            if ready.blocking_send(file).is_err() {
                return;
            }
        }
        finished.store(true, Ordering::Release);
    }
}

/// A file's size and blake3 digest; only its size when it is over
/// `max_file_size`, or says it holds 0 bytes. What is hashed is what will
/// be sent: the size the file has when opened (one that grows meanwhile is
/// sent as it was; one that shrinks fails, as the local scan fails it). A
/// file that says it holds 0 bytes (as those of /proc do) may hold
/// something else at each read: it goes with its content, read once, as
/// the local scan reads it.
fn hash_file(local: &LocalFile, max_file_size: u64) -> Result<Ready, Unreadable> {
    let (file, size) = local.open(LEASE_WAIT)?;
    if size > max_file_size || size == 0 {
        return Ok(Ready { size, digest: None });
    }
    hash_opened(file, size).map_err(|err| Unreadable { err, size })
}

/// The digest of the `size` bytes `file` held when it was opened.
fn hash_opened(file: std::fs::File, size: u64) -> std::io::Result<Ready> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(file.take(size))?;
    if hasher.count() != size {
        return Err(shrank(hasher.count(), size));
    }
    Ok(Ready {
        size,
        digest: Some(hasher.finalize()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file over the server's limit is opened even when it is to go with
    /// its content, as the local scan opens it: one that cannot be opened
    /// (here a folder, which only a regular file can be) is unreadable,
    /// not too large.
    #[test]
    fn a_file_over_the_limit_that_cannot_be_opened_is_unreadable() {
        let folder = tempfile::tempdir().unwrap();
        let empty = folder.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        // A limit of one byte, which a folder with a file in it is over
        // on every file system (each says a different size).
        let max_file_size = 1;
        assert!(std::fs::metadata(folder.path()).unwrap().len() > max_file_size);
        let (ready, mut prepared) = mpsc::channel(2);
        let preparer = Preparer {
            paths: Box::new(
                [folder.path().to_owned(), empty]
                    .into_iter()
                    .map(LocalFile::from),
            ),
            content_first: Arc::new(AtomicBool::new(true)),
            stopped: Arc::default(),
            finished: Arc::default(),
            max_file_size,
            ready,
        };
        std::thread::spawn(|| preparer.run());
        let over = prepared.blocking_recv().unwrap().ready.unwrap();
        let Err(unreadable) = over else {
            panic!("taken as readable");
        };
        assert_eq!(unreadable.size, 0, "{}", unreadable.err);
        let within = prepared.blocking_recv().unwrap().ready.unwrap();
        assert!(matches!(
            within,
            Ok(Ready {
                size: 0,
                digest: None
            })
        ));
    }

    /// A file that shrank while it was hashed fails, as the local scan
    /// fails it: its digest would be that of a part of it, which the
    /// server may know as clean.
    #[test]
    fn a_file_that_shrank_while_hashed_fails() {
        let mut file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut file, &[7; 40]).unwrap();
        let hashed = |size| {
            let mut file = file.try_clone().unwrap();
            std::io::Seek::rewind(&mut file).unwrap();
            hash_opened(file, size)
        };
        let whole = hashed(40).unwrap();
        assert_eq!(whole.size, 40);
        assert_eq!(whole.digest, Some(blake3::hash(&[7; 40])));
        // Opened when it held 100 bytes; it holds 40 now.
        let err = hashed(100).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
        assert_eq!(
            err.to_string(),
            "the file shrank while it was read (40 of 100 bytes)"
        );
    }
}
