//! [`Agent::scan`]: many files in flight on one `Scan` stream.
//!
//! Four parts work together, each on its own:
//!
//! - the **preparer**, a thread of its own, takes local files as they
//!   come (from a walk, say) and reads them a few ahead of their
//!   announcement: it hashes a file to be announced by its digest, and
//!   only looks up the size of one to be sent at once;
//! - the **announcer** keeps the server's limit of files in flight and
//!   sends the begins, many to a message;
//! - the **content sender**, a thread of its own as reads block, streams
//!   the content of each file the server asks for, or that goes out with
//!   its begin, one file after the other;
//! - the **reply loop** settles each file with its verdict, and learns from
//!   the replies what the server knows ([`Familiarity`]).
//!
//! **Hash first, while it pays.** A file announced by its digest is never
//! sent when the server knows its content (another VM scanned it, or an
//! earlier scan), and that is what the SharedCache is for. But when the
//! server knows none of them (a cold cache, new signatures), hashing first
//! only costs the agent a second read of each file and a round trip.
//! Under [`HashFirst::Auto`] the agent watches what the server knew of its
//! last files, and sends content at once while it knew almost none of
//! them; a file sent that way whose content the server turns out to know
//! still counts, so the agent goes back to digests as soon as they pay.
//! Whichever way a file goes, the server hashes what it receives itself.

use std::{
    collections::VecDeque,
    io::Read,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use slab::Slab;
use tokio::{
    sync::{Semaphore, mpsc},
    task::JoinHandle,
};
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::Code;

use super::{Agent, ClientError, FileSource, Files, PreparedFile};
use crate::{
    engine::{ScanOutcome, open_regular},
    proto::{
        FileBegin, FileCancel, FileChunk, FileEnd, FileError, FileRequest, LatestVersion, Limits,
        ScanReply, ScanRequest, file_reply,
    },
    verdict::{FailReason, Verdict},
};

/// Chunks read ahead of the stream: enough to keep it busy, few enough
/// that the client's memory stays small (8 chunks of the preferred size).
const CONTENT_QUEUE: usize = 8;

/// The most begins sent in one message. Begins ready together (files
/// prepared beforehand, a server quick to answer) go out together: fewer
/// messages mean fewer wake-ups and socket writes on both sides.
const MAX_BEGINS: usize = 256;

/// Local files the preparer may have ready ahead of the announcer (and
/// one more, waiting for room). Few: a file is prepared for the way of
/// announcing it chosen when it is prepared, and the choice may change
/// meanwhile.
const PREPARED_AHEAD: usize = 16;

/// How the agent announces files it has not hashed beforehand.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum HashFirst {
    /// By their digest while the server knows some of the agent's files,
    /// with their content while it knows almost none (fewer than 1 in 8
    /// of the agent's last 64 files).
    #[default]
    Auto,
    /// Always by their digest: content the server knows is never sent.
    Always,
    /// Always with their content, unhashed: the server hashes it. (A file
    /// over the server's size limit goes as a begin alone, to be refused.)
    Never,
}

impl Agent {
    /// Scans `files` through the server, many in flight on one stream, and
    /// hands each result to `on_result` (whether it came from the cache is
    /// in the outcome). Local files are announced as `hash_first` says;
    /// prepared ones, hashed already, always by their digest. Every file
    /// gets its one outcome, a failure for each file left when the scan
    /// breaks; the scan returns once all have theirs.
    ///
    /// A stream the server ends, or will not open, for want of room
    /// (`RESOURCE_EXHAUSTED`: its budget for messages in flight is spent)
    /// is opened again, after a pause, for the files still without an
    /// outcome, as a file refused for want of room is announced again: see
    /// [`Retries`].
    pub async fn scan<F>(
        &self,
        files: Files,
        hash_first: HashFirst,
        on_result: F,
    ) -> Result<(), ClientError>
    where
        F: Fn(&Path, ScanOutcome) + Send + Sync + 'static,
    {
        let limits = self.welcome.limits.unwrap_or_default();
        let max_file_size = match limits.max_file_size {
            0 => u64::MAX,
            limit => limit,
        };
        let familiarity = Familiarity::new(hash_first);
        let sources = Sources::start(files, familiarity.content_first(), max_file_size);
        let mut scan = Scan {
            familiarity,
            latest: LatestVersion::default(),
            answered: 0,
            max_file_size,
            on_result: Arc::new(on_result),
        };
        let mut left = Left {
            files: Vec::new(),
            rest: Some(sources),
        };
        let mut refusals = Refusals::default();
        loop {
            let Broken {
                err,
                opened,
                left: unanswered,
            } = match self.scan_stream(&limits, &mut scan, left).await {
                Ok(()) => return Ok(()),
                Err(broken) => broken,
            };
            let refused = matches!(&err, ClientError::Status(status)
                if status.code() == Code::ResourceExhausted);
            if refused && refusals.again(scan.answered) {
                tracing::debug!(%err, "scan stream refused; opening another");
                tokio::time::sleep(refusals.pause()).await;
                left = unanswered;
                continue;
            }
            // Every file gets its outcome, a failure: a full scan with no
            // file answered is not clean.
            let detail = match opened {
                true => format!("the scan ended before this file was answered: {err}"),
                false => format!("the scan stream could not be opened: {err}"),
            };
            unanswered.fail_all(&detail, &*scan.on_result).await;
            return Err(err);
        }
    }

    /// Scans the files `left` (those held first) on one stream, until each
    /// has its outcome, or the stream breaks.
    async fn scan_stream<F>(
        &self,
        limits: &Limits,
        scan: &mut Scan<F>,
        left: Left,
    ) -> Result<(), Broken>
    where
        F: Fn(&Path, ScanOutcome) + Send + Sync + 'static,
    {
        let in_flight = Window::new(limits.max_files_in_flight.clamp(1, 1024) as usize);
        let places = Arc::clone(&in_flight.places);
        let chunk_size = limits.preferred_chunk_size.clamp(4 << 10, 4 << 20) as usize;
        // Begins and content wait in queues of their own, merged onto the
        // stream: a begin never queues behind megabytes of another file's
        // content, so the server's requests for content keep coming while
        // content goes out. A begin that goes with its content goes in the
        // content's queue, ahead of it.
        let (requests, begins) = mpsc::channel(256);
        let (content_requests, chunks) = mpsc::channel(CONTENT_QUEUE);
        let outgoing = ReceiverStream::new(begins).merge(ReceiverStream::new(chunks));
        let replies = match self.client.clone().scan(outgoing).await {
            Ok(replies) => replies.into_inner(),
            Err(status) => {
                let err = status.into();
                return Err(Broken {
                    err,
                    opened: false,
                    left,
                });
            }
        };
        let (uploads, to_upload) = mpsc::unbounded_channel();
        let (told, sent) = mpsc::unbounded_channel::<Sent>();
        let failed = Arc::new(LastFailed::default());
        let failed_for_sender = Arc::clone(&failed);
        let sender = tokio::task::spawn_blocking(move || {
            send_content(
                to_upload,
                content_requests,
                told,
                &failed_for_sender,
                chunk_size,
            )
        });
        let max_file_size = scan.max_file_size;
        let on_result = Arc::clone(&scan.on_result);
        let mut settle = Settle {
            pending: Arc::default(),
            uploads,
            failed,
            retries: Retries {
                session_id: self.welcome.session_id.clone(),
                requests: requests.clone(),
                waiting: VecDeque::new(),
            },
            scan,
        };
        let announcer = Announcer {
            session_id: self.welcome.session_id.clone(),
            max_file_size,
            pending: Arc::clone(&settle.pending),
            requests,
            uploads: settle.uploads.clone(),
        };
        // The files go to the announcer held: should its task be dropped
        // before it first runs, they are in `unannounced` all the same.
        let unannounced = Unannounced::default();
        let held = Held {
            again: left.files.into_iter(),
            rest: left.rest,
            current: None,
            ready: Vec::new(),
            unannounced: Arc::clone(&unannounced),
        };
        let mut producer = AbortOnDrop(tokio::spawn(announcer.run(held, in_flight, on_result)));
        if let Err(err) = settle.run(replies, sent, &mut producer, &places).await {
            // Once the announcer has stopped, what it held is in
            // `unannounced`. (A task that has finished was dropped
            // already; its handle may have given its result to `run`, and
            // must not be awaited again.)
            if !producer.0.is_finished() {
                producer.0.abort();
                let _ = (&mut producer.0).await;
            }
            let mut left = std::mem::take(&mut *unannounced.lock().expect("unannounced"));
            left.files.extend(settle.unanswered());
            return Err(Broken {
                err,
                opened: true,
                left,
            });
        }
        // The content sender ends once no one can hand it more files.
        drop(settle);
        let _ = sender.await;
        Ok(())
    }
}

/// A stream that broke: why, whether it had opened, and the files still
/// without an outcome.
struct Broken {
    err: ClientError,
    opened: bool,
    left: Left,
}

/// What a scan keeps from one stream to the next.
struct Scan<F> {
    familiarity: Familiarity,
    latest: LatestVersion,
    /// Files answered so far (verdicts and failures), for [`Refusals`].
    answered: u64,
    /// The server's limit: a larger file is refused as too large.
    max_file_size: u64,
    on_result: Arc<F>,
}

/// What the reply loop needs to settle the files of one stream.
struct Settle<'a, F> {
    pending: Pending,
    /// Files whose content the server asked for, to the content sender.
    uploads: mpsc::UnboundedSender<Upload>,
    failed: Arc<LastFailed>,
    /// Files refused for want of room, to be announced again.
    retries: Retries,
    scan: &'a mut Scan<F>,
}

impl<F: Fn(&Path, ScanOutcome)> Settle<'_, F> {
    /// Settles files as their replies come, giving their places in flight
    /// back, until the announcer is done and no file is left pending.
    async fn run(
        &mut self,
        mut replies: tonic::Streaming<ScanReply>,
        mut sent: mpsc::UnboundedReceiver<Sent>,
        producer: &mut AbortOnDrop<Result<(), ClientError>>,
        places: &Semaphore,
    ) -> Result<(), ClientError> {
        let mut produced = false;
        loop {
            if produced
                && self.retries.waiting.is_empty()
                && self.pending.lock().expect("pending").is_empty()
            {
                return Ok(());
            }
            // What the content sender tells of a file is taken before the
            // server's reply to it can be: it was told before the server
            // could reply (before the file's cancel or end went out).
            let over = tokio::select! {
                biased;
                Some(told) = sent.recv() => self.told(told),
                message = replies.message() => self.answered(message?.ok_or_else(|| {
                    ClientError::Protocol("the server ended the stream with files unanswered".into())
                })?),
                // An announcer that failed found its stream gone (the
                // transport dropped the requests as the call ended), with
                // the begins it sent last pending, never to be answered:
                // the stream's end, next, says why (a refusal to take up
                // again, say). One that panicked returns at once.
                result = &mut producer.0, if !produced => {
                    produced = true;
                    if let Err(err) = result {
                        return Err(ClientError::Protocol(err.to_string()));
                    }
                    continue;
                }
                () = self.retries.next_due(), if !self.retries.waiting.is_empty() => {
                    let max_file_size = self.scan.max_file_size;
                    self.retries.announce_due(&self.pending, &self.uploads, max_file_size);
                    continue;
                }
            };
            places.add_permits(over);
            self.scan.answered += over as u64;
        }
    }

    /// Takes every file still without an outcome once the stream broke:
    /// those pending, and those waiting to be announced again. A file the
    /// agent could not read is over: it fails for that.
    fn unanswered(&mut self) -> Vec<PendingFile> {
        let mut files: Vec<_> = self.pending.lock().expect("pending").drain().collect();
        files.extend(self.retries.waiting.drain(..).map(|(_, file)| file));
        files.retain_mut(|file| match file.unread.take() {
            Some(err) => {
                let outcome = failed_outcome(unreadable(&err), file.size_read(), file.started);
                (self.scan.on_result)(file.source.path(), outcome);
                false
            }
            None => true,
        });
        files
    }

    /// Takes the replies of one message: a file asked for goes to the
    /// content sender, a file answered to `on_result`, a file failed to
    /// `failed`. Returns how many files are over (their places in flight
    /// are free again). `on_result` is called once the pending files are
    /// unlocked: it may take its time (printing, say), and the announcer
    /// and the content sender need them meanwhile.
    fn answered(&mut self, message: ScanReply) -> usize {
        let mut over = Vec::with_capacity(message.replies.len());
        let mut files = self.pending.lock().expect("pending");
        for reply in message.replies {
            let id = reply.file_id;
            let answer = match reply.kind {
                Some(file_reply::Kind::SendContent(_)) => {
                    if let Some(file) = files.get_mut(id) {
                        file.asked = true;
                        self.scan.familiarity.record(false);
                        let upload = Upload {
                            id,
                            source: file.source.clone(),
                            size: file.size,
                            begin: None,
                        };
                        let _ = self.uploads.send(upload);
                    }
                    continue;
                }
                Some(file_reply::Kind::Verdict(verdict)) => Ok(verdict),
                Some(file_reply::Kind::Error(error)) => {
                    self.failed.0.store(id, Ordering::Relaxed);
                    // A file the agent could not read is over, whatever
                    // the server says of it.
                    let answered = self.scan.answered;
                    let retried = error.code == Code::ResourceExhausted as i32
                        && files
                            .get_mut(id)
                            .is_some_and(|f| f.unread.is_none() && f.refusals.again(answered));
                    if retried {
                        let file = files.remove(id).expect("pending");
                        self.retries.later(file);
                        continue;
                    }
                    Err(error)
                }
                None => continue,
            };
            let Some(mut file) = files.remove(id) else {
                continue;
            };
            // A file cancelled because it could not be read fails for that.
            let answer = answer.map_err(|error| match file.unread.take() {
                Some(err) => unreadable(&err),
                None => self.refused(file.size_read(), error),
            });
            if let (Ok(verdict), false) = (&answer, file.asked) {
                self.scan
                    .familiarity
                    .record(verdict.cached || verdict.coalesced);
            }
            over.push((file, answer));
        }
        drop(files);
        let count = over.len();
        for (file, answer) in over {
            let elapsed = file.started.elapsed();
            let outcome = match answer {
                Ok(verdict) => verdict.to_outcome(
                    file.size_read(),
                    elapsed,
                    file.digest,
                    &message.signatures_version,
                    &mut self.scan.latest,
                ),
                Err(verdict) => file.failed(verdict),
            };
            (self.scan.on_result)(file.source.path(), outcome);
        }
        count
    }

    /// The verdict for a file the server failed: `too_large` when the
    /// server refused it for its size (as `scanserver scan` says of such a
    /// file), `engine` with the server's message otherwise.
    fn refused(&self, size: u64, error: FileError) -> Verdict {
        let too_large =
            error.code == Code::FailedPrecondition as i32 && size > self.scan.max_file_size;
        let reason = if too_large {
            FailReason::TooLarge
        } else {
            FailReason::Engine
        };
        Verdict::failed(reason, error.message)
    }

    /// Takes what the content sender tells of a file. Returns how many
    /// files are over.
    fn told(&mut self, told: Sent) -> usize {
        match told {
            Sent::Unread(file) => self.unread(file),
            Sent::Resized { id, size } => {
                if let Some(file) = self.pending.lock().expect("pending").get_mut(id) {
                    file.sent = Some(size);
                }
                0
            }
        }
    }

    /// Takes a file the content sender could not read. One the server
    /// never heard of is over at once. One it was told to cancel keeps its
    /// place in flight until the server's reply: the server counts it
    /// until it takes the cancel. Returns how many files are over.
    fn unread(&mut self, Unread { id, err, cancelled }: Unread) -> usize {
        let mut files = self.pending.lock().expect("pending");
        if cancelled {
            if let Some(file) = files.get_mut(id) {
                file.unread = Some(err);
            }
            return 0;
        }
        let Some(file) = files.remove(id) else {
            return 0;
        };
        drop(files);
        let outcome = failed_outcome(unreadable(&err), file.size_read(), file.started);
        (self.scan.on_result)(file.source.path(), outcome);
        1
    }
}

/// Files the server refused for want of room (RESOURCE_EXHAUSTED: its
/// places in flight held by files of the VM's earlier session, say, or its
/// spool or the VM's share of it full), each announced again after a pause
/// that doubles from [`Self::FIRST`] up to [`Self::LONGEST`]. A file fails
/// with the server's error once refused [`Self::MOST`] times in a row (33
/// seconds of pauses) with none of the agent's files answered
/// meanwhile: see [`Refusals`]. Such a refusal says nothing of the file,
/// and room comes back as other files end. A file waiting here keeps its
/// place in flight; it takes a new id, so that late replies about the
/// refused one (errors for chunks already sent with its begin) are not
/// taken for it.
struct Retries {
    session_id: String,
    requests: mpsc::Sender<ScanRequest>,
    /// Files and when they are due, in the order they were refused (not
    /// of their due times: pauses differ with files' retries). Few: at most
    /// the files in flight.
    waiting: VecDeque<(Instant, PendingFile)>,
}

impl Retries {
    /// The pause before a file is announced again the first time.
    const FIRST: Duration = Duration::from_millis(100);
    /// The longest pause, however many times a file was refused.
    const LONGEST: Duration = Duration::from_secs(2);
    /// Times in a row a file is announced again, with no file answered
    /// meanwhile, before it fails: pauses of 33 s in all, longer than the
    /// server takes to give back the places of a connection that died
    /// (within 30 s), which an agent that reconnects at once finds taken.
    const MOST: u32 = 20;

    /// Announces `file` again after its pause.
    fn later(&mut self, mut file: PendingFile) {
        let pause = file.refusals.pause();
        self.waiting.push_back((Instant::now() + pause, file));
    }

    /// Resolves when the earliest file waiting is due.
    async fn next_due(&self) {
        if let Some(due) = self.waiting.iter().map(|(due, _)| *due).min() {
            tokio::time::sleep_until(due.into()).await;
        }
    }

    /// Announces the files that are due: by digest in one message, or with
    /// their content through the content sender, as the announcer does.
    /// A message the stream has no room for now waits for the next turn
    /// (awaiting it here would stop the reply loop that makes room).
    fn announce_due(
        &mut self,
        pending: &Pending,
        uploads: &mpsc::UnboundedSender<Upload>,
        max_file_size: u64,
    ) {
        let now = Instant::now();
        let (mut begins, mut ids) = (Vec::new(), Vec::new());
        let mut files = pending.lock().expect("pending");
        let (due, later) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition::<Vec<_>, _>(|(due, _)| *due <= now);
        self.waiting = later.into();
        for (_, mut file) in due {
            file.announced();
            let mut begin = file_begin(&self.session_id, &file.source, file.size, file.digest);
            if file.digest.is_some() || file.size > max_file_size {
                begin.file_id = files.insert(file);
                ids.push(begin.file_id);
                begins.push(FileRequest::from(begin));
            } else {
                let _ = uploads.send(files.insert_upload(begin, file));
            }
        }
        if begins.is_empty() {
            return;
        }
        let message = ScanRequest { requests: begins };
        if self.requests.try_send(message).is_err() {
            let soon = now + Self::FIRST;
            for id in ids {
                if let Some(file) = files.remove(id) {
                    self.waiting.push_back((soon, file));
                }
            }
        }
    }
}

/// The begin announcing `source` (its id still to be given), by `digest`
/// when it has one.
fn file_begin(
    session_id: &str,
    source: &FileSource,
    size: u64,
    digest: Option<blake3::Hash>,
) -> FileBegin {
    FileBegin {
        file_id: 0,
        session_id: session_id.to_owned(),
        path: source.path().to_string_lossy().into_owned(),
        size,
        blake3: digest
            .map(|digest| Bytes::copy_from_slice(digest.as_bytes()))
            .unwrap_or_default(),
    }
}

/// The verdict for a file that could not be read.
fn unreadable(err: &std::io::Error) -> Verdict {
    Verdict::failed(FailReason::Io, format!("cannot read the file: {err}"))
}

fn failed_outcome(verdict: Verdict, size: u64, started: Instant) -> ScanOutcome {
    ScanOutcome::failed(verdict, size, started.elapsed(), "".into())
}

/// The outcome of a file never sent to the server, failed for `detail`.
fn unanswered(detail: &str) -> ScanOutcome {
    failed_outcome(
        Verdict::failed(FailReason::Engine, detail),
        0,
        Instant::now(),
    )
}

/// What the server knew of the agent's last files, which decides, under
/// [`HashFirst::Auto`], whether the next local files go out with their
/// content at once.
///
/// A file counts as known when its begin was answered from the cache or
/// by a scan under way (coalesced), or when content sent at once turned
/// out to be known by the digest the server computed; as unknown when the
/// server asked for its content or scanned what it was sent.
///
/// The agent sends content at once while the server knew fewer than one
/// in eight of its last 64 files. Content the server knew costs it
/// receiving and hashing, on the SVM that every VM shares; a digest it did
/// not know costs the agent a second read of the file. So digests go first
/// unless they almost never pay, and from the start: a scan begins by
/// digest, and content goes at once only once 64 files have shown that
/// the server knows next to none.
struct Familiarity {
    /// One bit per file, the latest lowest: set when it was known.
    known: u64,
    /// Files counted, up to 64.
    counted: u32,
    auto: bool,
    content_first: Arc<AtomicBool>,
}

impl Familiarity {
    /// Files over which the choice is made.
    const WINDOW: u32 = u64::BITS;
    /// Fewer known files than this among the last [`Self::WINDOW`] send
    /// the next ones with their content.
    const KNOWN_ENOUGH: u32 = Self::WINDOW / 8;

    fn new(hash_first: HashFirst) -> Self {
        Familiarity {
            known: 0,
            counted: 0,
            auto: hash_first == HashFirst::Auto,
            content_first: Arc::new(AtomicBool::new(hash_first == HashFirst::Never)),
        }
    }

    /// Whether the next local files go with their content: read by the
    /// preparer as it prepares each of them.
    fn content_first(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.content_first)
    }

    fn record(&mut self, known: bool) {
        if !self.auto {
            return;
        }
        self.known = self.known << 1 | u64::from(known);
        self.counted = (self.counted + 1).min(Self::WINDOW);
        let content_first =
            self.counted == Self::WINDOW && self.known.count_ones() < Self::KNOWN_ENOUGH;
        self.content_first.store(content_first, Ordering::Relaxed);
    }
}

/// A local file ready to be announced: its size, and its digest when it
/// is announced by digest.
struct Ready {
    size: u64,
    digest: Option<blake3::Hash>,
}

/// The files still to announce, in order.
enum Sources {
    /// Local files, from the preparer.
    Local {
        prepared: mpsc::Receiver<Prepared>,
        /// Set once the scan has broken: the preparer hands on the files
        /// left without reading them, to be failed.
        stopped: Arc<AtomicBool>,
    },
    /// Files read and hashed beforehand, at hand.
    Prepared(std::vec::IntoIter<Arc<PreparedFile>>),
}

impl Sources {
    /// Starts preparing local files (see [`Preparer`]).
    fn start(files: Files, content_first: Arc<AtomicBool>, max_file_size: u64) -> Sources {
        let paths = match files {
            Files::Prepared(files) => return Sources::Prepared(files.into_iter()),
            Files::Local(paths) => paths,
        };
        let (ready, prepared) = mpsc::channel(PREPARED_AHEAD);
        let stopped = Arc::new(AtomicBool::new(false));
        let preparer = Preparer {
            paths,
            content_first,
            stopped: Arc::clone(&stopped),
            max_file_size,
            ready,
        };
        tokio::task::spawn_blocking(move || preparer.run());
        Sources::Local { prepared, stopped }
    }

    /// How many files are still to come: as many as the preparer has
    /// ready once it has taken the last file, and more than any limit
    /// before.
    fn left(&self) -> usize {
        match self {
            Sources::Local { prepared, .. } if prepared.is_closed() => prepared.len(),
            Sources::Local { .. } => usize::MAX,
            Sources::Prepared(files) => files.len(),
        }
    }

    /// Hands every file left to `fail`, in order, without reading them
    /// (those already read too), and returns once the preparer has let go
    /// of its files.
    async fn fail_all(self, fail: impl Fn(&Path)) {
        match self {
            Sources::Local {
                mut prepared,
                stopped,
            } => {
                stopped.store(true, Ordering::Relaxed);
                while let Some(file) = prepared.recv().await {
                    fail(&file.path);
                }
            }
            Sources::Prepared(files) => files.for_each(|file| fail(&file.path)),
        }
    }
}

/// A local file as the preparer hands it on.
struct Prepared {
    path: PathBuf,
    /// Its size and digest, or why it could not be read; `None` for a file
    /// left unread because the scan had broken.
    ready: Option<std::io::Result<Ready>>,
}

/// Prepares local files, in order, on a thread of its own, a few
/// ([`PREPARED_AHEAD`]) ahead of the announcer: one thread hashing file
/// after file, rather than a task handed to a thread for each file. It
/// takes the files as it goes, so that a walk of a large tree goes on
/// while the first files are scanned, and is never held whole.
struct Preparer {
    paths: Box<dyn Iterator<Item = PathBuf> + Send>,
    /// Whether the next file goes with its content (only its size is
    /// needed) or by its digest; see [`Familiarity`].
    content_first: Arc<AtomicBool>,
    /// Whether the scan has broken: see [`Sources::fail_all`].
    stopped: Arc<AtomicBool>,
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
            max_file_size,
            ready,
        } = self;
        for path in paths {
            let prepared = (!stopped.load(Ordering::Relaxed)).then(|| {
                if content_first.load(Ordering::Relaxed) {
                    std::fs::metadata(&path).map(|metadata| Ready {
                        size: metadata.len(),
                        digest: None,
                    })
                } else {
                    hash_file(&path, max_file_size)
                }
            });
            let file = Prepared {
                path,
                ready: prepared,
            };
            if ready.blocking_send(file).is_err() {
                return;
            }
        }
    }
}

/// How long a file under another process's lease is waited for (see
/// [`open_regular`]), as the local scan waits with its default timeout.
const LEASE_WAIT: Duration = Duration::from_secs(10);

/// A file's size and blake3 digest; only its size when it is over
/// `max_file_size`. What is hashed is what will be sent: the size the file
/// has when opened (one that grows meanwhile is sent as it was), or, for
/// a file that says it holds 0 bytes (as those of /proc do), what it holds,
/// up to one byte over the limit.
fn hash_file(path: &Path, max_file_size: u64) -> std::io::Result<Ready> {
    let (file, size) = open_regular(path, LEASE_WAIT)?;
    if size > max_file_size {
        return Ok(Ready { size, digest: None });
    }
    let limit = if size == 0 { max_file_size + 1 } else { size };
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(file.take(limit))?;
    Ok(Ready {
        size: hasher.count(),
        digest: Some(hasher.finalize()),
    })
}

/// A task that stops when its handle goes: a scan that ends early (the
/// server broke the stream) must not leave its announcer waiting forever.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

type Pending = Arc<Mutex<PendingFiles>>;

/// Where the announcer leaves the files it had not handed on (to the
/// server, or to `on_result`) when it stops early: with the pending ones,
/// they are failed, so that every file gets its one outcome.
type Unannounced = Arc<Mutex<Left>>;

/// Files without an outcome, to announce: those held (prepared already,
/// announced on a stream that broke, say), then the rest.
#[derive(Default)]
struct Left {
    files: Vec<PendingFile>,
    rest: Option<Sources>,
}

impl Left {
    /// Fails every file for `detail`, and returns once each has its
    /// outcome.
    async fn fail_all(self, detail: &str, on_result: &impl Fn(&Path, ScanOutcome)) {
        for file in self.files {
            let verdict = Verdict::failed(FailReason::Engine, detail);
            on_result(file.source.path(), file.failed(verdict));
        }
        if let Some(rest) = self.rest {
            rest.fail_all(|path| on_result(path, unanswered(detail)))
                .await;
        }
    }
}

/// The files the announcer holds: those held from an earlier stream and
/// those still to come, the one taken last, and those whose begins wait to
/// go. However it stops (done, failed, or aborted at any await, or before
/// it first ran), what it still holds goes to `unannounced`.
struct Held {
    again: std::vec::IntoIter<PendingFile>,
    /// `None` only once dropped.
    rest: Option<Sources>,
    current: Option<PendingFile>,
    ready: Vec<(FileBegin, PendingFile)>,
    unannounced: Unannounced,
}

impl Held {
    /// How many files are left, counting the one taken last.
    fn left(&self) -> usize {
        let rest = self.rest.as_ref().map_or(0, Sources::left);
        rest.saturating_add(self.again.len() + 1)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut left = self.unannounced.lock().expect("unannounced");
        left.files.extend(self.current.take());
        left.files
            .extend(self.ready.drain(..).map(|(_, file)| file));
        left.files.extend(self.again.by_ref());
        left.rest = self.rest.take();
    }
}

/// The id of the file the server failed last. Content goes out one file
/// after the other, so the sender checks the file it is sending against
/// this alone, with no lock per chunk: a file the server has just failed
/// (it grew, say) gets no more of its content. (Once another file's error
/// comes in, the rest of the file goes out, and the server drops it.)
struct LastFailed(AtomicU64);

impl Default for LastFailed {
    fn default() -> Self {
        LastFailed(AtomicU64::new(u64::MAX))
    }
}

/// Files announced and not yet answered. A file's id is made of its place
/// here (the low 32 bits: a file is found by indexing, not hashing) and
/// the number of files begun before it (modulo 2^32): ids do not repeat on
/// a stream, so a late reply about a file that is over (an error for a
/// chunk sent after the server failed the file, which it gives once it no
/// longer remembers that file) is never taken for another file's.
#[derive(Default)]
struct PendingFiles {
    /// Each file with its id.
    files: Slab<(u64, PendingFile)>,
    begun: u64,
}

struct PendingFile {
    source: FileSource,
    /// Its size as prepared (0 for a file whose metadata says so, read to
    /// its end), which each announcement of it gives.
    size: u64,
    /// What the content sender sent of a file announced with 0 bytes.
    /// Only its outcome says so: a file announced again is read anew.
    sent: Option<u64>,
    /// The digest its begin gave, which an answer to it leaves out.
    digest: Option<blake3::Hash>,
    started: Instant,
    /// The server asked for its content: it did not know it.
    asked: bool,
    /// Why the agent cancelled it: it could not read it.
    unread: Option<std::io::Error>,
    /// The server's refusals of it for want of room (see [`Retries`]).
    refusals: Refusals,
}

/// How often the server refused a file (or a stream) for want of room.
#[derive(Debug, Default)]
struct Refusals {
    /// Times it was refused and sent again.
    times: u32,
    /// Times in a row with no file of the agent's answered in between.
    in_a_row: u32,
    /// Files the agent had had answered at its last refusal.
    answered_then: u64,
}

impl Refusals {
    /// Counts one more refusal, `answered` files into the scan; whether
    /// the file is to be announced again. Only refusals in a row with no
    /// file answered in between count towards [`Retries::MOST`]: while the
    /// agent's own files end, room comes back to its VM (its places in
    /// flight, its share of the spool), and a folder of large files is
    /// scanned a few at a time rather than failed.
    fn again(&mut self, answered: u64) -> bool {
        if answered > self.answered_then {
            self.in_a_row = 0;
        }
        self.answered_then = answered;
        self.in_a_row += 1;
        self.in_a_row <= Retries::MOST
    }

    /// The pause before announcing again once more: from
    /// [`Retries::FIRST`], doubling up to [`Retries::LONGEST`].
    fn pause(&mut self) -> Duration {
        let pause = (Retries::FIRST * (1 << self.times.min(16))).min(Retries::LONGEST);
        self.times += 1;
        pause
    }
}

impl PendingFile {
    /// A file about to be announced.
    fn new(source: FileSource, Ready { size, digest }: Ready) -> Self {
        PendingFile {
            source,
            size,
            digest,
            sent: None,
            started: Instant::now(),
            asked: false,
            unread: None,
            refusals: Refusals::default(),
        }
    }

    /// Marks it announced (again, for a file refused or left by a stream
    /// that broke): what was learnt of it then is forgotten, and its time
    /// runs from now.
    fn announced(&mut self) {
        self.started = Instant::now();
        self.asked = false;
        self.sent = None;
    }

    /// Its size as read: as sent, or as announced.
    fn size_read(&self) -> u64 {
        self.sent.unwrap_or(self.size)
    }

    /// Its outcome as failed with `verdict`. A file the agent hashed keeps
    /// its digest: it was read.
    fn failed(&self, verdict: Verdict) -> ScanOutcome {
        ScanOutcome {
            digest: self.digest,
            ..failed_outcome(verdict, self.size_read(), self.started)
        }
    }
}

impl PendingFiles {
    /// Adds `file`, announced by `begin` with its content, and returns what
    /// the content sender is to send of it.
    fn insert_upload(&mut self, mut begin: FileBegin, file: PendingFile) -> Upload {
        let source = file.source.clone();
        begin.file_id = self.insert(file);
        Upload {
            id: begin.file_id,
            source,
            size: begin.size,
            begin: Some(begin),
        }
    }

    /// Adds `file`, and returns its id.
    fn insert(&mut self, file: PendingFile) -> u64 {
        let place = self.files.vacant_entry();
        let id = self.begun << 32 | place.key() as u64;
        self.begun += 1;
        place.insert((id, file));
        id
    }

    fn get_mut(&mut self, id: u64) -> Option<&mut PendingFile> {
        match self.files.get_mut(Self::place(id)) {
            Some((known, file)) if *known == id => Some(file),
            _ => None,
        }
    }

    /// Takes every file.
    fn drain(&mut self) -> impl Iterator<Item = PendingFile> + '_ {
        self.files.drain().map(|(_, file)| file)
    }

    fn remove(&mut self, id: u64) -> Option<PendingFile> {
        self.get_mut(id)?;
        Some(self.files.remove(Self::place(id)).1)
    }

    fn place(id: u64) -> usize {
        (id & u64::from(u32::MAX)) as usize
    }

    fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

/// Announces files, keeping at most the server's limit in flight.
struct Announcer {
    session_id: String,
    /// The server's limit: a larger file is announced without its content,
    /// to be refused.
    max_file_size: u64,
    pending: Pending,
    requests: mpsc::Sender<ScanRequest>,
    /// Files that go with their content, to the content sender.
    uploads: mpsc::UnboundedSender<Upload>,
}

impl Announcer {
    /// Announces each file: by digest (its begin goes out with others in
    /// one message, as soon as the announcer would otherwise wait, for a
    /// place in flight or for the preparer), or with its content (its
    /// begin goes to the content sender, to go out with the content).
    async fn run<F>(
        self,
        mut held: Held,
        mut in_flight: Window,
        on_result: Arc<F>,
    ) -> Result<(), ClientError>
    where
        F: Fn(&Path, ScanOutcome) + Send + Sync + 'static,
    {
        while self.next(&mut held, &*on_result).await? {
            if !in_flight.try_take() {
                self.send(&mut held.ready).await?;
                in_flight.take(held.left()).await;
            }
            let mut file = held.current.take().expect("held until handed on");
            file.announced();
            let begin = file_begin(&self.session_id, &file.source, file.size, file.digest);
            if file.digest.is_some() || file.size > self.max_file_size {
                held.ready.push((begin, file));
                if held.ready.len() == MAX_BEGINS {
                    self.send(&mut held.ready).await?;
                }
            } else {
                self.upload(begin, file);
            }
        }
        self.send(&mut held.ready).await
    }

    /// Takes the next file into `held.current`, with its size and digest;
    /// `false` once every file was taken. A local file comes from the
    /// preparer (the `ready` begins go first if it is behind); one it
    /// could not read fails at once, and the next is taken.
    async fn next(
        &self,
        held: &mut Held,
        on_result: &impl Fn(&Path, ScanOutcome),
    ) -> Result<bool, ClientError> {
        if let Some(file) = held.again.next() {
            held.current = Some(file);
            return Ok(true);
        }
        loop {
            let Some(rest) = held.rest.as_mut() else {
                return Ok(false);
            };
            let (source, ready) = match rest {
                Sources::Prepared(files) => {
                    let Some(file) = files.next() else {
                        return Ok(false);
                    };
                    let ready = Ready {
                        size: file.content.len() as u64,
                        digest: Some(file.digest),
                    };
                    (FileSource::Prepared(file), Some(Ok(ready)))
                }
                Sources::Local { prepared, .. } => {
                    let file = match prepared.try_recv() {
                        Ok(file) => file,
                        Err(mpsc::error::TryRecvError::Disconnected) => return Ok(false),
                        Err(mpsc::error::TryRecvError::Empty) => {
                            self.send(&mut held.ready).await?;
                            match prepared.recv().await {
                                Some(file) => file,
                                None => return Ok(false),
                            }
                        }
                    };
                    (FileSource::Path(file.path), file.ready)
                }
            };
            // Files go unread only once the scan has broken, and the
            // announcer has stopped by then; were one taken, it would
            // fail, not pass.
            let not_read = || Err(std::io::Error::other("not read: the scan had broken"));
            match ready.unwrap_or_else(not_read) {
                Ok(ready) => {
                    held.current = Some(PendingFile::new(source, ready));
                    return Ok(true);
                }
                Err(err) => {
                    let outcome = failed_outcome(unreadable(&err), 0, Instant::now());
                    on_result(source.path(), outcome);
                }
            }
        }
    }

    /// Sends the `ready` begins in one message, their files pending first
    /// (the answers may come at once), each begin with its file's id.
    async fn send(&self, ready: &mut Vec<(FileBegin, PendingFile)>) -> Result<(), ClientError> {
        if ready.is_empty() {
            return Ok(());
        }
        let message = {
            let mut pending = self.pending.lock().expect("pending");
            let begins = ready.drain(..).map(|(mut begin, file)| {
                begin.file_id = pending.insert(file);
                FileRequest::from(begin)
            });
            ScanRequest {
                requests: begins.collect(),
            }
        };
        self.requests
            .send(message)
            .await
            .map_err(|_| ClientError::Protocol("the scan stream closed".into()))
    }

    /// Hands a file that goes with its content to the content sender.
    fn upload(&self, begin: FileBegin, file: PendingFile) {
        let upload = self
            .pending
            .lock()
            .expect("pending")
            .insert_upload(begin, file);
        let _ = self.uploads.send(upload);
    }
}

/// The server's limit of files in flight, as places. The announcer takes
/// a place for each file it announces; the scan gives places back as
/// files are answered, for a whole reply message at once. Once all are
/// taken, they are taken back a group at a time (three quarters of the
/// limit): for files hashed beforehand (`lightagent bench`), verdicts
/// coming in a few at a time then make one message of begins per group,
/// not one per reply. Each message costs a socket write and a wake-up on
/// both ends, which a storm of many agents multiplies: with a quarter of
/// the limit, a 50-agent storm wrote a quarter more messages. (Begins
/// ready also go when the announcer waits for the preparer.)
struct Window {
    places: Arc<Semaphore>,
    group: usize,
    /// Places taken and not used yet.
    spare: usize,
}

impl Window {
    fn new(limit: usize) -> Self {
        Window {
            places: Arc::new(Semaphore::new(limit)),
            group: (limit * 3 / 4).max(1),
            spare: 0,
        }
    }

    /// Takes a place, if one is free now.
    fn try_take(&mut self) -> bool {
        if self.spare == 0 {
            let Ok(place) = self.places.try_acquire() else {
                return false;
            };
            place.forget();
            self.spare = 1;
        }
        self.spare -= 1;
        true
    }

    /// Takes a place, once a group of them is free (fewer when fewer than
    /// a group of files are left to announce).
    async fn take(&mut self, files_left: usize) {
        let group = self.group.min(files_left).max(1);
        let places = self.places.acquire_many(group as u32).await;
        places.expect("never closed").forget();
        self.spare += group - 1;
    }
}

/// A file whose content is to be sent: one the server asked for, or one
/// that goes with its begin.
struct Upload {
    id: u64,
    source: FileSource,
    /// Its size as announced.
    size: u64,
    begin: Option<FileBegin>,
}

/// Why the content sender stopped sending a file.
enum Stop {
    /// The file could not be read.
    Unread(Unread),
    /// The stream is gone.
    Closed,
}

/// What the content sender tells the reply loop of a file, before the
/// server can reply to it.
enum Sent {
    /// It could not be read.
    Unread(Unread),
    /// It held `size` bytes where its metadata said 0 (files of /proc say
    /// so): its outcome gives the size sent, as a local scan's gives the
    /// size read (see [`PendingFile::sent`]).
    Resized { id: u64, size: u64 },
}

/// A file the content sender could not read.
struct Unread {
    id: u64,
    err: std::io::Error,
    /// The server knew of the file, and was told to cancel it.
    cancelled: bool,
}

/// Streams the content of each file to upload, in chunks, then its end;
/// on a thread of its own, as reading files blocks. A file that cannot be
/// read, or held more than its metadata said, is `told` of before its
/// cancel or end goes out.
fn send_content(
    mut uploads: mpsc::UnboundedReceiver<Upload>,
    requests: mpsc::Sender<ScanRequest>,
    told: mpsc::UnboundedSender<Sent>,
    failed: &LastFailed,
    chunk_size: usize,
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
    }) = uploads.blocking_recv()
    {
        let sent = match &source {
            FileSource::Prepared(file) => {
                let content = &file.content;
                let chunks = (0..content.len())
                    .step_by(chunk_size)
                    .map(|start| Ok(content.slice(start..content.len().min(start + chunk_size))));
                outbox.file(id, begin, chunks, failed)
            }
            FileSource::Path(path) => match open_regular(path, LEASE_WAIT) {
                Ok((file, _)) => {
                    let chunks = FileChunks {
                        file,
                        chunk_size,
                        left: (size > 0).then_some(size),
                    };
                    outbox.file(id, begin, chunks, failed)
                }
                Err(err) => outbox.file(id, begin, std::iter::once(Err(err)), failed),
            },
        };
        // Files waiting to go join this one's last message; with nothing
        // waiting, it goes now. A cancel goes at once: the server counts
        // the file in flight until it takes it.
        let flush = match sent {
            Ok(sent) => {
                if size == 0 && sent > 0 {
                    let _ = told.send(Sent::Resized { id, size: sent });
                }
                uploads.is_empty()
            }
            Err(Stop::Unread(file)) => {
                let flush = file.cancelled || uploads.is_empty();
                let _ = told.send(Sent::Unread(file));
                flush
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
    /// cancelled, if the server knows of it. A file the server has already
    /// failed gets no more of its content.
    fn file(
        &mut self,
        id: u64,
        mut begin: Option<FileBegin>,
        chunks: impl Iterator<Item = std::io::Result<Bytes>>,
        failed: &LastFailed,
    ) -> Result<u64, Stop> {
        // The begin waits for the first chunk: a file that cannot be read
        // at all is then never heard of. A file read whole in its first
        // chunk is announced with the size read, whatever its metadata
        // said (files of /proc report 0 bytes).
        let mut offset = 0u64;
        for data in chunks {
            let data = match data {
                Ok(data) => data,
                Err(err) => {
                    let cancelled = begin.is_none();
                    if cancelled {
                        self.push(FileCancel { file_id: id }.into(), 0)?;
                    }
                    return Err(Stop::Unread(Unread { id, err, cancelled }));
                }
            };
            if failed.0.load(Ordering::Relaxed) == id {
                return Ok(offset);
            }
            if let Some(mut begin) = begin.take() {
                if data.len() < self.limit {
                    begin.size = data.len() as u64;
                }
                self.push(begin.into(), 0)?;
            }
            let length = data.len();
            let chunk = FileChunk {
                file_id: id,
                offset,
                data,
                path: String::new(),
            };
            offset += length as u64;
            self.push(chunk.into(), length)?;
        }
        if let Some(begin) = begin {
            self.push(FileBegin { size: 0, ..begin }.into(), 0)?;
        }
        self.push(FileEnd { file_id: id }.into(), 0)?;
        Ok(offset)
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

/// A file read in chunks, each in a buffer of its own, which the stream
/// frees once it has sent it. A read fills the buffer's spare capacity
/// directly: nothing is zeroed first. The file's announced size is read,
/// no more (one that grew is sent as it was announced, and hashed); a
/// file announced empty (one of /proc, which says so whatever it holds)
/// is read to its end, which the server cuts short if it is too large.
struct FileChunks {
    file: std::fs::File,
    chunk_size: usize,
    /// What is left of the announced size; `None` for a file announced
    /// empty.
    left: Option<u64>,
}

impl Iterator for FileChunks {
    type Item = std::io::Result<Bytes>;

    fn next(&mut self) -> Option<Self::Item> {
        let limit = (self.chunk_size as u64).min(self.left.unwrap_or(u64::MAX));
        let mut chunk = Vec::with_capacity(limit as usize);
        match (&mut self.file).take(limit).read_to_end(&mut chunk) {
            Ok(0) => None,
            Ok(read) => {
                if let Some(left) = &mut self.left {
                    *left -= read as u64;
                }
                Some(Ok(Bytes::from(chunk)))
            }
            Err(err) => Some(Err(err)),
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
            let chunks = FileChunks {
                file,
                chunk_size: 4,
                left,
            };
            chunks.map(|c| c.unwrap().len()).collect::<Vec<_>>()
        };
        assert_eq!(read(Some(6)), [4, 2], "grown since announced");
        assert_eq!(read(None), [4, 4, 2], "announced empty");
        assert_eq!(
            read(Some(12)),
            [4, 4, 2],
            "shrunk: the server finds it short"
        );
    }

    fn file(name: &str) -> PendingFile {
        let ready = Ready {
            size: 0,
            digest: None,
        };
        PendingFile::new(FileSource::Path(name.into()), ready)
    }

    #[test]
    fn only_refusals_with_no_file_answered_between_them_count() {
        let mut refusals = Refusals::default();
        for _ in 0..Retries::MOST {
            assert!(refusals.again(0));
        }
        assert!(!refusals.again(0), "refused too often in a row");
        let mut refusals = Refusals::default();
        for answered in 0..3 * u64::from(Retries::MOST) {
            assert!(refusals.again(answered), "room comes back meanwhile");
        }
    }

    #[test]
    fn a_file_id_never_names_a_later_file() {
        let mut pending = PendingFiles::default();
        let first = pending.insert(file("a"));
        assert!(pending.remove(first).is_some());
        let second = pending.insert(file("b"));
        assert_eq!(PendingFiles::place(first), PendingFiles::place(second));
        assert_ne!(first, second);
        assert!(
            pending.get_mut(first).is_none(),
            "a late reply for the first"
        );
        assert!(pending.remove(first).is_none());
        assert_eq!(
            pending.get_mut(second).unwrap().source.path(),
            Path::new("b")
        );
        assert!(pending.remove(second).is_some());
        assert!(pending.is_empty());
    }

    fn record(familiarity: &mut Familiarity, known: bool, files: usize) {
        for _ in 0..files {
            familiarity.record(known);
        }
    }

    #[test]
    fn content_goes_first_only_while_the_server_knows_almost_nothing() {
        let mut familiarity = Familiarity::new(HashFirst::Auto);
        let content_first = familiarity.content_first();
        record(&mut familiarity, false, 63);
        assert!(
            !content_first.load(Ordering::Relaxed),
            "digests first until 64 files are counted"
        );
        familiarity.record(false);
        assert!(content_first.load(Ordering::Relaxed));
        record(&mut familiarity, true, 7);
        assert!(content_first.load(Ordering::Relaxed), "7 of 64 known");
        familiarity.record(true);
        assert!(!content_first.load(Ordering::Relaxed), "8 of 64 known");
        record(&mut familiarity, false, 56);
        assert!(
            !content_first.load(Ordering::Relaxed),
            "the 8 are among the last 64"
        );
        familiarity.record(false);
        assert!(
            content_first.load(Ordering::Relaxed),
            "one of them left the 64"
        );
    }

    #[test]
    fn always_and_never_do_not_change() {
        for (hash_first, content_first) in [(HashFirst::Always, false), (HashFirst::Never, true)] {
            let mut familiarity = Familiarity::new(hash_first);
            record(&mut familiarity, !content_first, 100);
            assert_eq!(
                familiarity.content_first().load(Ordering::Relaxed),
                content_first
            );
        }
    }
}
