//! The content sender: the content of each file to upload, in chunks, one
//! file after the other, on a thread of its own as reads block.

use std::{
    io::Read,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::prepare::Unreadable;
use crate::{
    client::FileSource,
    files::{LEASE_WAIT, shrank},
    proto::{FileBegin, FileCancel, FileChunk, FileEnd, FileRequest, ScanRequest},
};

/// A file whose content is to be sent: one the server asked for, or one
/// that goes with its begin.
pub(super) struct Upload {
    pub(super) id: u64,
    pub(super) source: FileSource,
    /// Its size as announced.
    pub(super) size: u64,
    pub(super) begin: Option<FileBegin>,
    /// Set once the file has its final reply (the server failed it, say,
    /// or refused it for want of room, to be announced again): what is
    /// left of its content is not sent, nor read.
    pub(super) over: Arc<AtomicBool>,
}

impl Upload {
    /// An upload of file `id`, and the switch that ends it early (see
    /// [`Upload::over`]).
    pub(super) fn new(
        id: u64,
        source: FileSource,
        size: u64,
        begin: Option<FileBegin>,
    ) -> (Upload, Arc<AtomicBool>) {
        let over = Arc::new(AtomicBool::new(false));
        let upload = Upload {
            id,
            source,
            size,
            begin,
            over: Arc::clone(&over),
        };
        (upload, over)
    }
}

/// Why the content sender stopped sending a file.
enum Stop {
    /// The file could not be read; the server knew of it, and was told to
    /// cancel it, if `cancelled`.
    Unread {
        err: std::io::Error,
        cancelled: bool,
    },
    /// The file, asked for by its digest, holds less than when it was
    /// hashed: it changed since (truncated to be rewritten, say), and was
    /// cancelled.
    Changed,
    /// The stream is gone.
    Closed,
}

/// What the content sender tells the reply loop of a file, before the
/// server can reply to it.
pub(super) enum Sent {
    /// It could not be read.
    Unread(Unread),
    /// It went with its begin, announced with `size` bytes where its
    /// metadata said otherwise when it was prepared (it changed since, or
    /// is one of /proc, which say 0): its outcome gives that size, as a
    /// local scan's gives the size read (see [`PendingFile::sent`]).
    Resized { id: u64, size: u64 },
    /// It was asked for by its digest, and changed since it was hashed:
    /// the server was told to cancel it, and it is to be announced again
    /// with its content.
    Changed { id: u64 },
}

/// A file the content sender could not read.
pub(super) struct Unread {
    pub(super) id: u64,
    /// The server knew of the file, and was told to cancel it.
    pub(super) cancelled: bool,
    pub(super) why: Unreadable,
}

/// Streams the content of each file to upload, in chunks, then its end;
/// on a thread of its own, as reading files blocks. A file that cannot be
/// read, or goes with its begin holding another size than it was
/// announced with, is `told` of before its cancel or end goes out.
pub(super) fn send_content(
    mut uploads: mpsc::UnboundedReceiver<Upload>,
    requests: mpsc::Sender<ScanRequest>,
    told: mpsc::UnboundedSender<Sent>,
    chunk_size: usize,
    max_file_size: u64,
) {
    let mut outbox = Outbox {
        requests,
        batch: Vec::new(),
        bytes: 0,
        limit: chunk_size,
    };
    while let Some(Upload {
        id,
        source,
        size,
        begin,
        over,
    }) = uploads.blocking_recv()
    {
        let with_begin = begin.is_some();
        let mut opened = 0;
        let sent = match &source {
            // Answered while it waited its turn: nothing of it goes.
            _ if over.load(Ordering::Relaxed) => Ok(0),
            FileSource::Prepared(file) => {
                outbox.file(id, begin, slices(&file.content, chunk_size), &over)
            }
            FileSource::Path(local) => match (local.open(LEASE_WAIT), begin) {
                (Err(err), begin) => outbox.file(id, begin, std::iter::once(Err(err)), &over),
                // Asked for by its digest: what the digest is of, the size
                // announced (one that grew is sent as it was hashed). One
                // that shrank since holds something else.
                (Ok((_, size_now)), None) if size_now < size => outbox.changed(id),
                (Ok((file, size_now)), None) => {
                    opened = size_now;
                    let chunks = FileChunks::new(file, chunk_size, (size > 0).then_some(size));
                    outbox.file(id, None, chunks, &over)
                }
                (Ok((file, size_now)), Some(begin)) => {
                    opened = size_now;
                    outbox.with_begin(id, begin, (file, opened), max_file_size, &over)
                }
            },
        };
        // Files waiting to go join this one's last message; with nothing
        // waiting, it goes now. A cancel goes at once: the server counts
        // the file in flight until it takes it.
        let flush = match sent {
            Ok(sent) => {
                if with_begin && sent != size {
                    let _ = told.send(Sent::Resized { id, size: sent });
                }
                uploads.is_empty()
            }
            Err(Stop::Unread { err, cancelled }) => {
                let why = Unreadable { err, size: opened };
                let file = Unread { id, cancelled, why };
                let _ = told.send(Sent::Unread(file));
                cancelled || uploads.is_empty()
            }
            Err(Stop::Changed) => {
                let _ = told.send(Sent::Changed { id });
                true
            }
            Err(Stop::Closed) => return,
        };
        if flush && outbox.flush().is_err() {
            return;
        }
    }
}

/// The content sender's next message. Small files (or the ends of large
/// ones) that go one after the other share a message, up to a chunk's
/// size: a message of its own for each would cost both ends a wake-up and
/// a socket operation per file.
struct Outbox {
    requests: mpsc::Sender<ScanRequest>,
    batch: Vec<FileRequest>,
    /// Content bytes in `batch`.
    bytes: usize,
    limit: usize,
}

impl Outbox {
    /// Adds a file's chunks, then its end (which goes out with the next
    /// flush, not before); and its `begin` first, if it goes with the
    /// content. Returns the bytes sent. A file that cannot be read is
    /// cancelled, if the server knows of it. A file that has its final
    /// reply already (`over`) gets no more of its content.
    fn file(
        &mut self,
        id: u64,
        mut begin: Option<FileBegin>,
        chunks: impl Iterator<Item = std::io::Result<Bytes>>,
        over: &AtomicBool,
    ) -> Result<u64, Stop> {
        // The begin waits for the first chunk: a file that cannot be read
        // at all is then never heard of.
        let mut offset = 0u64;
        for data in chunks {
            let data = match data {
                Ok(data) => data,
                Err(err) => {
                    let cancelled = begin.is_none();
                    if cancelled {
                        self.push(FileCancel { file_id: id }.into(), 0)?;
                    }
                    return Err(Stop::Unread { err, cancelled });
                }
            };
            if over.load(Ordering::Relaxed) {
                return Ok(offset);
            }
            if let Some(begin) = begin.take() {
                self.push(begin.into(), 0)?;
            }
            let length = data.len();
            let chunk = FileChunk {
                file_id: id,
                offset,
                data,
                ..FileChunk::default()
            };
            offset += length as u64;
            self.push(chunk.into(), length)?;
        }
        if let Some(begin) = begin {
            self.push(begin.into(), 0)?;
        }
        self.push(FileEnd { file_id: id }.into(), 0)?;
        Ok(offset)
    }

    /// Adds a local file that goes with its `begin`, opened (with the size
    /// it has now). Only a digest would hold the server to the size the
    /// file had when it was prepared, and a begin with content has none:
    /// the file goes as it is now, so that one that grew since (a
    /// download, a file being rewritten) is not scanned for its start
    /// alone. One that has grown
    /// over the server's limit goes as a begin alone, to be refused; one
    /// that says it holds 0 bytes (as those of /proc do) is read whole
    /// first, as the begin must give the size of what it holds. Returns
    /// the bytes sent, or the size of a file that goes alone.
    fn with_begin(
        &mut self,
        id: u64,
        mut begin: FileBegin,
        (file, opened): (std::fs::File, u64),
        max_file_size: u64,
        over: &AtomicBool,
    ) -> Result<u64, Stop> {
        if opened > max_file_size {
            begin.size = opened;
            self.push(begin.into(), 0)?;
            return Ok(opened);
        }
        if opened == 0 {
            return match read_unsized(file, max_file_size) {
                Ok(content) => {
                    begin.size = content.len() as u64;
                    self.file(id, Some(begin), slices(&content, self.limit), over)
                }
                Err(err) => self.file(id, Some(begin), std::iter::once(Err(err)), over),
            };
        }
        begin.size = opened;
        let chunks = FileChunks::new(file, self.limit, Some(opened));
        self.file(id, Some(begin), chunks, over)
    }

    /// Cancels file `id`, asked for by its digest, which changed since it
    /// was hashed: none of what it holds now goes under that digest.
    fn changed(&mut self, id: u64) -> Result<u64, Stop> {
        self.push(FileCancel { file_id: id }.into(), 0)?;
        Err(Stop::Changed)
    }

    /// Adds a request of `bytes` content. The batch so far goes first if
    /// the request would take it over the limit: a chunk that fills a
    /// message waits for the next request, which may be its file's end.
    fn push(&mut self, request: FileRequest, bytes: usize) -> Result<(), Stop> {
        if self.bytes + bytes > self.limit {
            self.flush()?;
        }
        self.batch.push(request);
        self.bytes += bytes;
        Ok(())
    }

    fn flush(&mut self) -> Result<(), Stop> {
        if self.batch.is_empty() {
            return Ok(());
        }
        self.bytes = 0;
        let message = ScanRequest {
            requests: std::mem::take(&mut self.batch),
        };
        self.requests
            .blocking_send(message)
            .map_err(|_| Stop::Closed)
    }
}

/// The most a file that says it holds 0 bytes is read, as `scanserver
/// scan` reads such a file: whole, into memory.
const UNSIZED_LIMIT: u64 = 32 << 20;

/// What a file that says it holds 0 bytes holds, up to [`UNSIZED_LIMIT`]
/// and the server's `max_file_size`. One that holds more is too large
/// (`FileTooLarge`), as the local scan says.
fn read_unsized(file: std::fs::File, max_file_size: u64) -> std::io::Result<Bytes> {
    let limit = UNSIZED_LIMIT.min(max_file_size);
    let mut content = Vec::new();
    file.take(limit + 1).read_to_end(&mut content)?;
    if content.len() as u64 > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::FileTooLarge,
            format!("the file says it holds 0 bytes, and holds more than {limit}"),
        ));
    }
    Ok(content.into())
}

/// `content` in chunks of `chunk_size`, each a view of it.
fn slices(content: &Bytes, chunk_size: usize) -> impl Iterator<Item = std::io::Result<Bytes>> {
    (0..content.len())
        .step_by(chunk_size)
        .map(move |start| Ok(content.slice(start..content.len().min(start + chunk_size))))
}

/// A file read in chunks, each in a buffer of its own, which the stream
/// frees once it has sent it. A read fills the buffer's spare capacity
/// directly: nothing is zeroed first. The file's announced size is read,
/// no more (one that grew is sent as it was announced, and hashed), and
/// no less: one that shrank fails, as the local scan fails it, rather than
/// be judged by a part of it. A file announced empty (one of /proc, which
/// says so whatever it holds) is read to its end, which the server cuts
/// short if it is too large.
struct FileChunks {
    file: std::fs::File,
    chunk_size: usize,
    /// The announced size; `None` for a file announced empty.
    size: Option<u64>,
    read: u64,
    /// Whether it has failed: nothing more is read.
    failed: bool,
}

impl FileChunks {
    fn new(file: std::fs::File, chunk_size: usize, size: Option<u64>) -> Self {
        FileChunks {
            file,
            chunk_size,
            size,
            read: 0,
            failed: false,
        }
    }
}

impl Iterator for FileChunks {
    type Item = std::io::Result<Bytes>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let left = self.size.map_or(u64::MAX, |size| size - self.read);
        let limit = (self.chunk_size as u64).min(left);
        let mut chunk = Vec::with_capacity(limit as usize);
        let read = (&mut self.file).take(limit).read_to_end(&mut chunk);
        let shrunk = |read: usize| (read as u64) < limit && self.size.is_some();
        match read {
            Ok(read) if shrunk(read) => {
                self.failed = true;
                let size = self.size.unwrap_or_default();
                Some(Err(shrank(self.read + read as u64, size)))
            }
            Ok(0) => None,
            Ok(read) => {
                self.read += read as u64;
                Some(Ok(Bytes::from(chunk)))
            }
            Err(err) => {
                self.failed = true;
                Some(Err(err))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file is read up to its announced size, however much it holds
    /// now; one announced empty, to its end.
    #[test]
    fn a_file_is_read_up_to_its_announced_size() {
        let mut file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut file, &[7; 10]).unwrap();
        let read = |left| {
            use std::io::Seek;
            let mut file = file.try_clone().unwrap();
            file.rewind().unwrap();
            FileChunks::new(file, 4, left)
                .map(|c| c.map(|c| c.len()).map_err(|e| e.to_string()))
                .collect::<Vec<_>>()
        };
        assert_eq!(read(Some(6)), [Ok(4), Ok(2)], "grown since announced");
        assert_eq!(read(Some(10)), [Ok(4), Ok(4), Ok(2)], "as announced");
        assert_eq!(read(None), [Ok(4), Ok(4), Ok(2)], "announced empty");
        let shrank = Err("the file shrank while it was read (10 of 12 bytes)".to_owned());
        assert_eq!(read(Some(12)), [Ok(4), Ok(4), shrank], "shrunk");
    }

    /// A file that says it holds 0 bytes is read up to the server's limit
    /// of file size (or 32 MiB), as the local scan reads it; one that
    /// holds more is too large, as the local scan says.
    #[test]
    fn a_file_that_says_it_is_empty_is_read_within_the_limit() {
        let open = || std::fs::File::open("/proc/kallsyms").unwrap();
        let whole = read_unsized(open(), u64::MAX).unwrap();
        assert!(whole.len() > 1024);
        let err = read_unsized(open(), 1024).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::FileTooLarge);
        let verdict = super::super::unreadable(&err);
        let reason = verdict.failure().map(|f| f.reason);
        assert_eq!(reason, Some(crate::verdict::FailReason::TooLarge));
    }

    /// A file that goes with its begin goes with the size it has when the
    /// sender opens it, not the size it had when it was prepared: all of
    /// one that grew since is scanned (there is no digest to hold it to
    /// what was prepared), and one that grew over the server's limit goes
    /// alone, to be refused. Either way the reply loop learns the size.
    #[test]
    fn a_file_going_with_its_begin_goes_as_it_is_when_opened() {
        use crate::proto::file_request::Kind;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grown");
        std::fs::write(&path, vec![7; 3000]).unwrap();
        // The file held 10 bytes when it was prepared; it holds 3,000 now.
        let send = |max_file_size| {
            let begin = FileBegin {
                file_id: 1,
                size: 10,
                ..FileBegin::default()
            };
            let source = FileSource::Path(path.clone().into());
            let (uploads, to_upload) = mpsc::unbounded_channel();
            uploads
                .send(Upload::new(1, source, 10, Some(begin)).0)
                .unwrap();
            drop(uploads);
            let (requests, mut sent) = mpsc::channel(64);
            let (told, mut resized) = mpsc::unbounded_channel();
            send_content(to_upload, requests, told, 1 << 10, max_file_size);
            let (mut announced, mut bytes, mut ends) = (None, 0, 0);
            while let Ok(message) = sent.try_recv() {
                for request in message.requests {
                    match request.kind.unwrap() {
                        Kind::Begin(begin) => announced = Some(begin.size),
                        Kind::Chunk(chunk) => bytes += chunk.data.len(),
                        Kind::End(_) => ends += 1,
                        other => panic!("{other:?}"),
                    }
                }
            }
            let Ok(Sent::Resized { id: 1, size }) = resized.try_recv() else {
                panic!("the reply loop is told the size");
            };
            (announced, bytes, ends, size)
        };
        assert_eq!(send(3000), (Some(3000), 3000, 1, 3000), "sent whole");
        assert_eq!(send(2999), (Some(3000), 0, 0, 3000), "a begin alone");
    }

    /// A file that shrank between its opening and its reading (truncated
    /// to be rewritten, say) fails, unheard of by the server, rather than
    /// go as a whole file of the size read: its verdict would be that of a
    /// part of it.
    #[test]
    fn a_file_that_shrank_since_opened_fails() {
        let mut file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut file, &[7; 40]).unwrap();
        std::io::Seek::rewind(&mut file).unwrap();
        let (requests, mut sent) = mpsc::channel(64);
        let mut outbox = Outbox {
            requests,
            batch: Vec::new(),
            bytes: 0,
            limit: 1 << 10,
        };
        let begin = FileBegin {
            file_id: 1,
            size: 100,
            ..FileBegin::default()
        };
        let over = AtomicBool::new(false);
        // Opened when it held 100 bytes; it holds 40 now.
        let result = outbox.with_begin(1, begin, (file, 100), u64::MAX, &over);
        let Err(Stop::Unread { err, cancelled }) = result else {
            panic!("the file fails");
        };
        assert_eq!(
            err.to_string(),
            "the file shrank while it was read (40 of 100 bytes)"
        );
        assert!(!cancelled, "the server never heard of it");
        outbox.flush().ok();
        assert!(sent.try_recv().is_err(), "nothing of it went");
    }

    /// A file the sender cannot open is told of with size 0, as the local
    /// scan gives it, and never heard of by the server. One asked for by
    /// its digest that holds less than when it was hashed (truncated to be
    /// rewritten, say) is cancelled unread, and told of as changed: what it
    /// holds now is not what the digest is of.
    #[test]
    fn a_file_shrunk_since_hashed_is_cancelled_and_one_not_opened_is_told_of() {
        use crate::proto::file_request::Kind;
        let dir = tempfile::tempdir().unwrap();
        let shrunk = dir.path().join("shrunk");
        std::fs::write(&shrunk, [7; 40]).unwrap();
        let (uploads, to_upload) = mpsc::unbounded_channel();
        // Hashed when it held 100 bytes; it holds 40 now.
        let source = FileSource::Path(shrunk.into());
        uploads.send(Upload::new(1, source, 100, None).0).unwrap();
        let source = FileSource::Path(dir.path().join("gone").into());
        let begin = FileBegin::default();
        uploads
            .send(Upload::new(2, source, 10, Some(begin)).0)
            .unwrap();
        drop(uploads);
        let (requests, mut sent) = mpsc::channel(64);
        let (told, mut unread) = mpsc::unbounded_channel();
        send_content(to_upload, requests, told, 1 << 10, u64::MAX);
        let Ok(Sent::Changed { id: 1 }) = unread.try_recv() else {
            panic!("the shrunk file is told of as changed");
        };
        let Ok(Sent::Unread(gone)) = unread.try_recv() else {
            panic!("the file gone is told of");
        };
        let kind = gone.why.err.kind();
        assert_eq!(
            (gone.id, gone.why.size, kind),
            (2, 0, std::io::ErrorKind::NotFound)
        );
        assert!(!gone.cancelled, "the server never heard of it");
        let requests: Vec<_> = std::iter::from_fn(|| sent.try_recv().ok())
            .flat_map(|message| message.requests)
            .filter_map(|request| request.kind)
            .collect();
        assert!(
            matches!(requests[..], [Kind::Cancel(FileCancel { file_id: 1 })]),
            "{requests:?}"
        );
    }

    /// A file answered while its content goes out gets no more of it (and
    /// no end); one answered before its turn gets none; the next file's
    /// content goes all the same.
    #[test]
    fn an_upload_ends_once_its_file_is_answered() {
        use crate::proto::file_request::Kind;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("large");
        std::fs::write(&path, vec![7; 64 << 10]).unwrap();
        let source = || FileSource::Path(path.clone().into());
        let (first, cut) = Upload::new(1, source(), 64 << 10, None);
        let (second, before) = Upload::new(2, source(), 64 << 10, None);
        let (third, _) = Upload::new(3, source(), 64 << 10, None);
        before.store(true, Ordering::Relaxed);
        let (uploads, to_upload) = mpsc::unbounded_channel();
        for upload in [first, second, third] {
            uploads.send(upload).unwrap();
        }
        drop(uploads);
        let (requests, mut sent) = mpsc::channel(1);
        let (told, _told) = mpsc::unbounded_channel();
        let sender =
            std::thread::spawn(move || send_content(to_upload, requests, told, 1 << 10, u64::MAX));
        // One chunk a message: the sender is at most a few ahead.
        let mut files = vec![sent.blocking_recv().unwrap()];
        cut.store(true, Ordering::Relaxed);
        files.extend(std::iter::from_fn(|| sent.blocking_recv()));
        sender.join().unwrap();
        let (mut bytes, mut ends) = ([0; 4], [0; 4]);
        for request in files.into_iter().flat_map(|m| m.requests) {
            match request.kind.unwrap() {
                Kind::Chunk(chunk) => bytes[chunk.file_id as usize] += chunk.data.len(),
                Kind::End(end) => ends[end.file_id as usize] += 1,
                other => panic!("{other:?}"),
            }
        }
        assert!(bytes[1] < 8 << 10, "{bytes:?}");
        assert_eq!(bytes[2..], [0, 64 << 10]);
        assert_eq!(ends[1..], [0, 0, 1]);
    }
}
