//! [`Agent::scan`]: many files in flight on one `Scan` stream (one after
//! the other, when the server refuses a stream for want of room).
//!
//! Four parts work together, each on its own:
//!
//! - the **preparer** (`prepare`), a thread of its own, takes local files
//!   as they come (from a walk, say) and reads them a few ahead of their
//!   announcement: it hashes a file to be announced by its digest, and
//!   only looks up the size of one to be sent at once;
//! - the **announcer** (`announce`) keeps the server's limit of files in
//!   flight and sends the begins, many to a message;
//! - the **content sender** (`send`), a thread of its own as reads block,
//!   streams the content of each file the server asks for, or that goes
//!   out with its begin, one file after the other;
//! - the **reply loop** (here, with what the parts share: the files
//!   pending and the retries) settles each file with its verdict, and
//!   learns from the replies what the server knows ([`Familiarity`]).
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

mod announce;
mod prepare;
mod send;

use std::{
    collections::VecDeque,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use parking_lot::Mutex;
use slab::Slab;
use tokio::{
    sync::{Semaphore, mpsc, watch},
    task::JoinHandle,
};
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::Code;

use self::{
    announce::{Announcer, Held, Left, Unannounced, Window},
    prepare::{Ready, Sources, Unreadable},
    send::{Sent, Unread, Upload, send_content},
};
use super::{Agent, ClientError, FileSource, Files};
use crate::{
    engine::ScanOutcome,
    proto::{
        FileBegin, FileError, FileErrorReason, FileReply, FileRequest, FileVerdict, LatestVersion,
        Limits, ScanReply, ScanRequest, file_reply,
    },
    verdict::{FailReason, Verdict},
};

/// Chunks read ahead of the stream: enough to keep it busy, few enough
/// that the client's memory stays small (8 chunks of the preferred size).
const CONTENT_QUEUE: usize = 8;

/// Where [`Agent::scan_into`] hands each file's result: a sink that can
/// hold the scan up while it has no room (one printing to a pipe that is
/// not read, say).
pub trait ResultSink: Send + Sync + 'static {
    /// Takes one file's result. It is called on the runtime's thread,
    /// which also keeps the session and its connection alive: it must not
    /// block.
    fn put(&self, path: &Path, outcome: ScanOutcome);

    /// Resolves once the sink can take more results. The scan awaits it
    /// before it takes each reply message, and before each file it fails
    /// unsent; meanwhile the server keeps its verdicts (and the files
    /// their places in flight), and the session goes on. The server ends
    /// a stream whose replies go untaken for its idle timeout.
    fn room(&self) -> impl Future<Output = ()> + Send {
        std::future::ready(())
    }
}

/// A function as a sink, which always has room: see [`Agent::scan`].
struct Always<F>(F);

impl<F> ResultSink for Always<F>
where
    F: Fn(&Path, ScanOutcome) + Send + Sync + 'static,
{
    fn put(&self, path: &Path, outcome: ScanOutcome) {
        (self.0)(path, outcome)
    }
}

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
    /// Scans `files` through the server, as [`Agent::scan_into`] does,
    /// and hands each result to `on_result` as it comes.
    pub async fn scan<F>(
        &self,
        files: Files,
        hash_first: HashFirst,
        on_result: F,
    ) -> Result<(), ClientError>
    where
        F: Fn(&Path, ScanOutcome) + Send + Sync + 'static,
    {
        self.scan_into(files, hash_first, Always(on_result)).await
    }

    /// Scans `files` through the server, many in flight on one stream, and
    /// hands each result to the sink `on_result` (whether it came from the
    /// cache is in the outcome) when it has room. Local files are announced
    /// as `hash_first` says; prepared ones, hashed already, always by their
    /// digest. Every file gets its one outcome, a failure for each file
    /// left when the scan breaks; the scan returns once all have theirs.
    ///
    /// A stream the server ends, or will not open, for want of room
    /// (`RESOURCE_EXHAUSTED`: its budget for messages in flight is spent)
    /// is opened again for the files still without an outcome, after the
    /// pauses a file refused for want of room waits (100 ms, doubling up
    /// to 2 s; the scan fails at the refusal after 20 in a row with no
    /// file answered). So is a stream the server closes as idle
    /// (`DEADLINE_EXCEEDED`), at once, and one it ends without a status
    /// (which it does to an idle stream when it has no room left to say
    /// why), after such a pause.
    pub async fn scan_into<F>(
        &self,
        files: Files,
        hash_first: HashFirst,
        on_result: F,
    ) -> Result<(), ClientError>
    where
        F: ResultSink,
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
            // The server closes a stream that was idle for its idle
            // timeout, owing nothing: the agent had no file for it that
            // long (a slow walk, files each waited for under a lease); or
            // one whose replies the agent took none of for that long (its
            // output left unread); it ends such a stream without a status
            // when it has no room left to send one. The files still to come
            // go on a new stream, and so do those announced as it closed,
            // unanswered.
            // (Those count as refusals: a server that closed each stream
            // with files unanswered would otherwise be sent them for ever.)
            let idle = match &err {
                ClientError::Status(status) => status.code() == Code::DeadlineExceeded,
                ClientError::StreamEnded => true,
                _ => false,
            };
            let again = unanswered.files.is_empty() || refusals.again(scan.answered);
            if idle && opened && again {
                tracing::debug!(%err, "idle scan stream closed; opening another");
                // A stream ended without a status may have ended at once
                // (a proxy's doing, say): not opened again in a tight loop.
                if matches!(err, ClientError::StreamEnded) {
                    tokio::time::sleep(refusals.pause()).await;
                }
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
        F: ResultSink,
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
        let max_file_size = scan.max_file_size;
        let sender = tokio::task::spawn_blocking(move || {
            send_content(to_upload, content_requests, told, chunk_size, max_file_size)
        });
        let on_result = Arc::clone(&scan.on_result);
        let mut settle = Settle {
            pending: Arc::default(),
            uploads,
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
        let held = Held::new(left, Arc::clone(&unannounced));
        let mut producer = AbortOnDrop(tokio::spawn(announcer.run(held, in_flight, on_result)));
        let ended = self.ended.clone();
        if let Err(err) = settle
            .run(replies, sent, &mut producer, &places, ended)
            .await
        {
            // Once the announcer has stopped, what it held is in
            // `unannounced`. (A task that has finished was dropped
            // already; its handle may have given its result to `run`, and
            // must not be awaited again.)
            if !producer.0.is_finished() {
                producer.0.abort();
                let _ = (&mut producer.0).await;
            }
            let mut left = std::mem::take(&mut *unannounced.lock());
            left.files.extend(settle.take_unanswered());
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
    /// Files refused for want of room, to be announced again.
    retries: Retries,
    scan: &'a mut Scan<F>,
}

impl<F: ResultSink> Settle<'_, F> {
    /// Settles files as their replies come, giving their places in flight
    /// back, until the announcer is done and no file is left pending.
    async fn run(
        &mut self,
        mut replies: tonic::Streaming<ScanReply>,
        mut sent: mpsc::UnboundedReceiver<Sent>,
        producer: &mut AbortOnDrop<Result<(), ClientError>>,
        places: &Semaphore,
        mut ended: watch::Receiver<Option<String>>,
    ) -> Result<(), ClientError> {
        let mut produced = false;
        // The files stopped coming before their end: those announced are
        // answered, then the scan fails.
        let mut walk_failed = false;
        loop {
            // Output left unread holds up the replies, not the runtime's
            // thread: the session's heartbeats and the connection go on.
            self.scan.on_result.room().await;
            if produced && self.retries.waiting.is_empty() && self.pending.lock().is_empty() {
                return if walk_failed {
                    Err(ClientError::WalkFailed)
                } else {
                    Ok(())
                };
            }
            // What the content sender tells of a file is taken before the
            // server's reply to it can be: it was told before the server
            // could reply (before the file's cancel or end went out).
            let over = tokio::select! {
                biased;
                Some(told) = sent.recv() => self.told(told),
                message = replies.message() => match message? {
                    Some(message) => self.answered(message),
                    None => return Err(ClientError::StreamEnded),
                },
                // An announcer that failed found its stream gone (the
                // transport dropped the requests as the call ended), with
                // the begins it sent last pending, never to be answered:
                // the stream's end, next, says why (a refusal to take up
                // again, say). One that panicked returns at once.
                result = &mut producer.0, if !produced => {
                    produced = true;
                    match result {
                        Err(err) => return Err(ClientError::Protocol(err.to_string())),
                        Ok(Err(ClientError::WalkFailed)) => walk_failed = true,
                        Ok(_) => {}
                    }
                    continue;
                }
                () = self.retries.next_due(), if !self.retries.waiting.is_empty() => {
                    let max_file_size = self.scan.max_file_size;
                    self.retries.announce_due(&self.pending, &self.uploads, max_file_size);
                    continue;
                }
                // The session is over: files announced from now on would be
                // refused as of an unknown session, after being read for
                // nothing; those left fail with why.
                Ok(why) = ended.wait_for(Option::is_some) => {
                    return Err(ClientError::SessionEnded(why.clone().unwrap_or_default()));
                }
            };
            places.add_permits(over);
            self.scan.answered += over as u64;
        }
    }

    /// Takes every file still without an outcome once the stream broke:
    /// those pending, and those waiting to be announced again. A file the
    /// agent could not read is over: it fails for that.
    fn take_unanswered(&mut self) -> Vec<PendingFile> {
        let mut files: Vec<_> = self.pending.lock().drain().collect();
        files.extend(self.retries.waiting.drain(..).map(|(_, file)| file));
        files.retain_mut(|file| match file.unread.take() {
            Some(err) => {
                let outcome = failed_outcome(unreadable(&err), file.size_read(), file.announced);
                self.scan.on_result.put(file.source.path(), outcome);
                false
            }
            None => true,
        });
        files
    }

    /// Takes the replies of one message (see [`Settle::reply`]). Returns how
    /// many files are over (their places in flight are free again).
    /// `on_result` is called once the pending files are unlocked: the
    /// announcer and the content sender need them, and a sink's work
    /// (formatting a line, say) need not hold them up.
    fn answered(&mut self, message: ScanReply) -> usize {
        let pending = Arc::clone(&self.pending);
        let mut files = pending.lock();
        let mut over = Vec::with_capacity(message.replies.len());
        for reply in message.replies {
            over.extend(self.reply(&mut files, reply));
        }
        drop(files);
        let count = over.len();
        // One reading of the clock for the message's files: they were
        // answered together.
        let now = Instant::now();
        for (file, answer) in over {
            let elapsed = file
                .announced
                .map_or(Duration::ZERO, |at| now.saturating_duration_since(at));
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
            self.scan.on_result.put(file.source.path(), outcome);
        }
        count
    }

    /// Takes one file's reply: a file asked for goes to the content sender;
    /// one refused for want of room, or that changed since it was hashed,
    /// is announced again; one answered or failed is over, and returned
    /// with its answer.
    fn reply(
        &mut self,
        files: &mut PendingFiles,
        reply: FileReply,
    ) -> Option<(PendingFile, Result<FileVerdict, Verdict>)> {
        let id = reply.file_id;
        let answer = match reply.kind {
            Some(file_reply::Kind::SendContent(_)) => {
                // Content is asked for once an announcement, of a file
                // announced by its digest (one announced without is on its
                // way already): asked again, the agent does not read and
                // send it again.
                if let Some(file) = files.get_mut(id)
                    && file.digest.is_some()
                    && !file.asked
                {
                    file.asked = true;
                    self.scan.familiarity.record(false);
                    let (upload, over) = Upload::new(id, file.source.clone(), file.size, None);
                    file.upload = Some(over);
                    let _ = self.uploads.send(upload);
                }
                return None;
            }
            Some(file_reply::Kind::Verdict(verdict)) => Ok(verdict),
            Some(file_reply::Kind::Error(error)) => {
                // Refused for want of room, or given up for its content not
                // coming (asked for while the agent took no replies: its
                // output left unread): announced again. A file the agent
                // could not read is over, whatever the server says of it.
                let answered = self.scan.answered;
                let again = [Code::ResourceExhausted, Code::DeadlineExceeded];
                let retried = again.iter().any(|code| error.code == *code as i32)
                    && files
                        .get_mut(id)
                        .is_some_and(|f| f.unread.is_none() && f.refusals.again(answered));
                if retried {
                    self.retries.later(files.remove(id).expect("pending"));
                    return None;
                }
                // A file that changed after the agent hashed it (the server
                // found another digest, or the agent found it shorter and
                // cancelled it) goes again with its content: what it holds
                // now is scanned, as the local scan scans what it reads.
                // Once: a file announced without a digest cannot differ
                // from one.
                let mismatch = error.reason == FileErrorReason::DigestMismatch as i32;
                let changed = files.get_mut(id).is_some_and(|f| {
                    f.digest.is_some() && f.unread.is_none() && (mismatch || f.changed)
                });
                if changed {
                    let mut file = files.remove(id).expect("pending");
                    file.digest = None;
                    self.retries.now(file);
                    return None;
                }
                Err(error)
            }
            // A reply of a kind this agent does not know (a newer server's)
            // is no verdict: the file fails for it.
            None => Err(FileError {
                code: Code::Unknown as i32,
                message: "the server's reply for this file is of a kind this agent does not know"
                    .to_owned(),
                ..FileError::default()
            }),
        };
        let mut file = files.remove(id)?;
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
        Some((file, answer))
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
                if let Some(file) = self.pending.lock().get_mut(id) {
                    file.sent = Some(size);
                }
                0
            }
            Sent::Changed { id } => {
                if let Some(file) = self.pending.lock().get_mut(id) {
                    file.changed = true;
                }
                0
            }
        }
    }

    /// Takes a file the content sender could not read. One the server
    /// never heard of is over at once. One it was told to cancel keeps its
    /// place in flight until the server's reply: the server counts it
    /// until it takes the cancel. Returns how many files are over.
    fn unread(&mut self, unread: Unread) -> usize {
        let Unread {
            id,
            cancelled,
            why: Unreadable { err, size },
        } = unread;
        let mut files = self.pending.lock();
        let Some(file) = files.get_mut(id) else {
            return 0;
        };
        // Its outcome gives its size when opened (0 when it could not be),
        // as the local scan's does.
        file.sent = Some(size);
        if cancelled {
            file.unread = Some(err);
            return 0;
        }
        let file = files.remove(id).expect("found above");
        drop(files);
        let outcome = failed_outcome(unreadable(&err), file.size_read(), file.announced);
        self.scan.on_result.put(file.source.path(), outcome);
        1
    }
}

/// Files to announce again: those that changed since the agent hashed
/// them, at once, with their content (see [`Retries::now`]); and those the
/// server refused for want of room (RESOURCE_EXHAUSTED: its
/// places in flight held by files of the VM's earlier session, say, or its
/// spool or the VM's share of it full) or gave up on for want of their
/// content (DEADLINE_EXCEEDED), each announced again after a pause that
/// doubles from [`Self::FIRST`] up to [`Self::LONGEST`]. A file fails with
/// the server's error when refused once more after [`Self::MOST`] times in
/// a row (33 seconds of pauses) with none of the agent's files answered
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

    /// Announces `file` again at once (a file without a digest goes with
    /// its content).
    fn now(&mut self, file: PendingFile) {
        self.waiting.push_back((Instant::now(), file));
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
        let mut files = pending.lock();
        let (due, later) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition::<Vec<_>, _>(|(due, _)| *due <= now);
        self.waiting = later.into();
        for (_, mut file) in due {
            file.announced(now);
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
        path: source.name().into_owned(),
        size,
        // Owned, not a copy into a vector: encoding clones it, and a clone
        // of a vector's bytes allocates (once for each begin of a storm).
        blake3: digest
            .map(|digest| Bytes::from_owner(*digest.as_bytes()))
            .unwrap_or_default(),
    }
}

/// The verdict for a file that could not be read, with the error as the
/// local scan gives it: too large for the one that holds more than its
/// size said and may be read (see `send::read_unsized`).
fn unreadable(err: &std::io::Error) -> Verdict {
    let reason = match err.kind() {
        std::io::ErrorKind::FileTooLarge => FailReason::TooLarge,
        _ => FailReason::Io,
    };
    Verdict::failed(reason, err.to_string())
}

/// The outcome of a file failed with `verdict`, `announced` then (`None`:
/// never sent, so no time was spent on it).
fn failed_outcome(verdict: Verdict, size: u64, announced: Option<Instant>) -> ScanOutcome {
    let elapsed = announced.map_or(Duration::ZERO, |at| at.elapsed());
    ScanOutcome::failed(verdict, size, elapsed, "".into())
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

/// A task that stops when its handle goes: a scan that ends early (the
/// server broke the stream) must not leave its announcer waiting forever.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

type Pending = Arc<Mutex<PendingFiles>>;

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
    /// Its size as the content sender found it, when that differs from
    /// the size prepared (a file announced with 0 bytes, read to its end;
    /// one that changed since, or could not be read). Only its outcome
    /// says so: a file announced again is read anew.
    sent: Option<u64>,
    /// The digest its begin gave, which an answer to it leaves out.
    digest: Option<blake3::Hash>,
    /// When its begin was last handed on to go out (to the stream, or to
    /// the content sender): its time runs from then. Not read when it is
    /// taken, which cost a reading of the clock for every file.
    announced: Option<Instant>,
    /// The server asked for its content: it did not know it.
    asked: bool,
    /// Asked for, it was found to have shrunk since it was hashed, and
    /// cancelled: the server's reply to that has it announced again.
    changed: bool,
    /// Why the agent cancelled it: it could not read it.
    unread: Option<std::io::Error>,
    /// The server's refusals of it for want of room (see [`Retries`]).
    refusals: Refusals,
    /// What ends its upload under way, if its content is being sent: set
    /// once it leaves the pending files (see [`Upload::over`]).
    upload: Option<Arc<AtomicBool>>,
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
            announced: None,
            asked: false,
            changed: false,
            unread: None,
            refusals: Refusals::default(),
            upload: None,
        }
    }

    /// It leaves the pending files: what is left of its upload under way,
    /// if any, is not sent.
    fn left(mut self) -> Self {
        if let Some(over) = self.upload.take() {
            over.store(true, Ordering::Relaxed);
        }
        self
    }

    /// Marks it announced `at` the time its begin goes (again, for a file
    /// refused or left by a stream that broke): what was learnt of it then
    /// is forgotten, and its time runs from then.
    fn announced(&mut self, at: Instant) {
        self.announced = Some(at);
        self.asked = false;
        self.changed = false;
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
            ..failed_outcome(verdict, self.size_read(), self.announced)
        }
    }
}

impl PendingFiles {
    /// Adds `file`, announced by `begin` with its content, and returns what
    /// the content sender is to send of it.
    fn insert_upload(&mut self, mut begin: FileBegin, file: PendingFile) -> Upload {
        let source = file.source.clone();
        let id = self.insert(file);
        begin.file_id = id;
        let (upload, over) = Upload::new(id, source, begin.size, Some(begin));
        self.get_mut(id).expect("just inserted").upload = Some(over);
        upload
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
        self.files.drain().map(|(_, file)| file.left())
    }

    /// Takes file `id`: it has its final reply, or is to be announced
    /// again (as a new file).
    fn remove(&mut self, id: u64) -> Option<PendingFile> {
        self.get_mut(id)?;
        Some(self.files.remove(Self::place(id)).1.left())
    }

    fn place(id: u64) -> usize {
        (id & u64::from(u32::MAX)) as usize
    }

    fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str) -> PendingFile {
        let ready = Ready {
            size: 0,
            digest: None,
        };
        PendingFile::new(
            FileSource::Path(std::path::PathBuf::from(name).into()),
            ready,
        )
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
