//! `Scan` and `ScanFile`: receiving files and answering with verdicts.
//!
//! A `Scan` stream is driven by one task that reads requests in order and
//! keeps the stream's open files. A complete file is handed to the engine,
//! and the stream goes on while it is scanned: the scan thread sends the
//! verdict itself (see `VerdictDue`; a thread that counts as stuck has its
//! failure sent for it), with no task waiting for it. But
//! before a file is handed over, the reader waits for a place in the
//! engine's queue. While the queue is full the reader stops reading, and
//! HTTP/2 flow control holds the agent back: nothing is buffered without
//! bound.
//!
//! Each begun file whose verdict is not cached holds one of its session's
//! in-flight places (its VM's, shared with the VM's earlier sessions) until
//! its final reply is made (a scan's verdict: until that is queued for the
//! agent); one whose verdict is cached, or whose content the engine
//! refuses (see `Engine::refused_content`), is answered at once, without a
//! place. Each owes its VM a verdict: one that goes without (refused, failed,
//! cancelled, cut off) spoils the VM's full scan under way. Replies wait
//! for the agent to take them for at most the idle timeout. When the
//! stream ends, for whatever reason, its open files are dropped: their
//! memory is freed and their spool files deleted.
//!
//! Requests for the same content coalesce (see [`crate::cache::flight`]):
//! a hash-first begin whose content another request is uploading or
//! scanning waits for that verdict instead of asking for the content, and
//! received content whose digest is being scanned waits for that scan.

use std::{
    collections::{HashMap, HashSet, VecDeque, hash_map::Entry},
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use parking_lot::Mutex;
use tokio::{
    runtime::Handle,
    sync::Semaphore,
    time::{Duration, Instant, Sleep},
};
use tonic::{Code, Status, Streaming};

use super::{
    Counters, ServiceState, check_path, parse_digest,
    replies::{MESSAGE_BYTES, NoSlot, Replies, weight},
    upload::{Received, Upload, UploadError},
};
use crate::{
    cache::{
        CacheKey, CachedVerdict, Digest, Flight, Join,
        flight::{
            FlightId, LEAD_PROGRESS, Landing, Landings, Notice, Pending, Subscription, UPLOAD_WAIT,
            Waiter,
        },
    },
    connections::{AddressPlace, Ends, PerAddress},
    engine::{Content, Engine, Refusal, Refused, ScanOutcome, ScanSlot},
    intake::{self, PEER_SHARE},
    metrics::Tally,
    proto::{
        ContentRequest, FileBegin, FileChunk, FileError, FileReply, FileVerdict, ScanReply,
        ScanRequest, file_reply, file_request,
    },
    sessions::{FilePlace, NoPlace, Session, Subject, log_malware_found},
    shutdown::shut_down,
};

/// The most replies one `ScanReply` carries: a batch of begins refused
/// one by one must not pile up its replies in memory.
const MAX_REPLIES: usize = 1024;

/// Verdicts handed over from another request's scan are held back up to
/// this long, and go out together. In a boot storm each scan's verdict is
/// handed to every VM waiting for it, a scan landing every fraction of a
/// millisecond: taken as they land, they would wake each VM's stream for
/// every one of them, and make as many messages of a few verdicts, with
/// their socket writes on both ends (see [`Landings`]). They go sooner
/// when as many are in as one agent can have files in flight (the
/// configured `files_in_flight`), when none of the stream's files
/// waits any more, and with the replies to a request message. A file's own
/// verdict, a cache hit and a request for content are never held: a failed
/// scan's waiters are asked for their content at once, and the held
/// verdicts go with them.
const HOLD_FOR: Duration = Duration::from_millis(16);

/// The shortest time the stream's handling counts as having waited (for
/// the engine's queue, for room): shorter, it took no more than its work.
const A_WAIT: Duration = Duration::from_millis(1);

/// A begun file of a Scan stream.
struct OpenFile {
    owed: VerdictOwed,
    name: String,
    size: u64,
    /// The content received so far; `None` while the file waits for
    /// another request's verdict (nothing is reserved for content that may
    /// never be needed). Boxed: an upload's hasher is 2 KiB, and a storm
    /// moves open files in and out of the stream's map for every verdict.
    upload: Option<Box<Upload>>,
    /// Whether the file was open when the stream last looked for stalled
    /// files (see [`ScanStream::fail_stalled`]).
    seen_at_last_look: bool,
    standing: Standing,
    _in_flight: FilePlace,
}

/// The ids of files failed before their agent was done sending them (a
/// refused begin, a chunk that failed its file, an upload that stalled),
/// whose remaining chunks and end may still be on their way: those are
/// dropped without a word. An error for each would be a second final reply
/// under the id, which the agent, free to use the id again once it had the
/// first, would take for the final reply of its next file of that id. A
/// new begin under the id, or the agent's end for it, takes the id off; at
/// most [`ANSWERED_KEPT`] are kept, the oldest forgotten first (a chunk
/// for one of those gets an error again).
#[derive(Default)]
struct Answered {
    /// Each id kept, with the number it was noted under.
    ids: HashMap<u64, u64, foldhash::fast::RandomState>,
    /// The ids in the order they were noted; an entry whose number is no
    /// longer its id's (forgotten, or noted again since) is left to age out.
    order: VecDeque<(u64, u64)>,
    noted: u64,
}

/// The most ids [`Answered`] keeps: an agent sends its chunks in order,
/// and stops sending a file once it has its error, so only the files
/// failed in the last round trip may still have chunks on their way.
const ANSWERED_KEPT: usize = 1024;

impl Answered {
    /// Keeps `id` if `reply` is an error: its file had its final reply.
    fn note(&mut self, id: u64, reply: Option<&FileReply>) {
        let Some(file_reply::Kind::Error(_)) = reply.and_then(|r| r.kind.as_ref()) else {
            return;
        };
        if self.order.len() == ANSWERED_KEPT
            && let Some((oldest, noted)) = self.order.pop_front()
            && self.ids.get(&oldest) == Some(&noted)
        {
            self.ids.remove(&oldest);
        }
        self.noted += 1;
        self.ids.insert(id, self.noted);
        self.order.push_back((id, self.noted));
    }

    fn holds(&self, id: u64) -> bool {
        self.ids.contains_key(&id)
    }

    /// Takes `id` off; whether it was kept.
    fn forget(&mut self, id: u64) -> bool {
        !self.ids.is_empty() && self.ids.remove(&id).is_some()
    }
}

/// The verdict a begun file owes its session's VM. Settled by the verdict;
/// a file that goes without one (refused, failed, cancelled, cut off with
/// its stream) counts as a failed scan for the VM, so that a full scan
/// under way cannot prove the VM clean without having seen it. A file
/// refused for want of room is [forgiven](Self::forgive): it is sent
/// again.
struct VerdictOwed(Option<Arc<Session>>);

impl VerdictOwed {
    fn to(session: &Arc<Session>) -> Self {
        VerdictOwed(Some(Arc::clone(session)))
    }

    /// Lets the VM off: the file was refused for want of room, or given up
    /// for want of its content, and its agent is told to send it again;
    /// the file sent again owes the verdict (and one the agent gives up on
    /// counts in its task's failed files). Its scan did not fail: nothing
    /// was scanned yet.
    fn forgive(&mut self) {
        self.0 = None;
    }

    /// Lets the VM off if the server asks for the file again
    /// (`sent_again`: see [`Self::forgive`]).
    fn forgive_if(&mut self, sent_again: bool) {
        if sent_again {
            self.forgive();
        }
    }

    /// The session of the file's VM; `None` once it is let off.
    fn session(&self) -> Option<&Arc<Session>> {
        self.0.as_ref()
    }

    /// The share of the spool the file's VM has.
    fn spool_share(&self) -> Option<&Arc<Semaphore>> {
        self.session().map(|session| &session.spool_share)
    }

    /// Settles the verdict on `size` bytes at `path`.
    fn settle(mut self, size: u64, path: &str, verdict: &FileVerdict) {
        if let Some(session) = self.0.take() {
            session.record_file(size, path, verdict);
        }
    }

    /// Settles the verdict on `size` bytes at `path` in `settled`, which
    /// counts it with others made on the stream.
    fn settle_in(mut self, settled: &mut Settled, size: u64, path: &str, verdict: &FileVerdict) {
        if let Some(session) = self.0.take() {
            settled.add(session, size, path, verdict);
        }
    }
}

/// Verdicts a Scan stream settled that are not counted yet: counted for
/// their session together, before their replies go out (see
/// [`ScanStream::send_weighed`]), rather than one by one. A boot storm
/// settles a hundred thousand verdicts a second on a stream's own thread,
/// and each counted alone took atomic operations on counters every
/// thread shares (the server's metrics, the session's figures).
#[derive(Default)]
struct Settled {
    session: Option<Arc<Session>>,
    bytes: u64,
    tally: Tally,
}

impl Settled {
    /// Adds the verdict on `size` bytes at `path` of `session`'s VM. A
    /// verdict of another session counts those of the last one first.
    fn add(&mut self, session: Arc<Session>, size: u64, path: &str, verdict: &FileVerdict) {
        if !matches!(&self.session, Some(last) if Arc::ptr_eq(last, &session)) {
            self.record();
            self.session = Some(session);
        }
        let session = self.session.as_ref().expect("set above");
        session.tally(&mut self.tally, Subject::Path(path), verdict);
        self.bytes += size;
    }

    /// Counts the verdicts added so far.
    fn record(&mut self) {
        if let Some(session) = self.session.take() {
            session.record(std::mem::take(&mut self.bytes), &self.tally);
            self.tally = Tally::default();
        }
    }
}

impl Drop for Settled {
    fn drop(&mut self) {
        self.record();
    }
}

impl Drop for VerdictOwed {
    fn drop(&mut self) {
        if let Some(session) = self.0.take() {
            session.scan_failed();
        }
    }
}

/// Where a begun file stands on its verdict, before its content is in.
enum Standing {
    /// No digest was announced: the content follows; nothing was looked up.
    Unannounced,
    /// The digest was not in the cache and nobody else has the content: the
    /// file leads the flight for it (others wait for its verdict), and gives
    /// the lead up when less than [`LEAD_PROGRESS`] more of its content
    /// than `received` bytes (and not all of it) came by `until` (see
    /// [`ScanStream::expire`]).
    Leads {
        flight: Flight,
        until: Instant,
        received: u64,
    },
    /// Another request has the content: the file waits for its verdict.
    Waits(Wait),
    /// The wait ended without a verdict (the other request failed or took
    /// too long), or the file gave its lead up: its own content is scanned,
    /// without waiting again (it leads a flight for it, if none is under
    /// way, once its content is in).
    OnItsOwn,
}

/// A hash-first begin waiting for another request's verdict. Its
/// subscription to the flight is tagged with the file id.
#[derive(Clone, Copy)]
struct Wait {
    key: CacheKey,
    /// The flight waited for (there may be others for the key, before or
    /// after it).
    flight: FlightId,
    digest: Digest,
    /// When the file stops waiting and has its own content scanned.
    deadline: Instant,
}

/// A stream's open files, by id.
type OpenFiles = HashMap<u64, OpenFile, foldhash::fast::RandomState>;

/// One Scan stream: its open files and where its replies go.
struct ScanStream {
    state: Arc<ServiceState>,
    /// Hashed with foldhash, seeded at random for each process: quicker
    /// than the standard SipHash, and the map is bounded by the sessions'
    /// files in flight, however the agent picks its file ids.
    open: OpenFiles,
    /// Files that ended and wait for a scan's verdict: off `open`, but
    /// their ids are still taken.
    scanning: Arc<Scanning>,
    /// Files failed before the agent was done sending them.
    answered: Answered,
    /// Verdicts settled on the stream, counted as their replies go out.
    settled: Settled,
    /// The agent's requests, until the stream ends: dropped before its
    /// final replies, which may wait for the agent, so that their buffers
    /// (and what HTTP/2 and the intake hold for them) go at once.
    requests: Option<Streaming<ScanRequest>>,
    replies: Replies,
    /// Flights tell waiting files here how they ended. A file that stops
    /// waiting withdraws its subscription, and the notices are taken before
    /// each request message, so they stay bounded (see [`Landings`]).
    landings: Arc<Landings>,
    /// The notices taken from `landings`, kept for the next ones.
    notices: Vec<Notice>,
    /// Whether the stream's hold timer (`Timers::flush`) is set, for the
    /// landed verdicts held since they were last taken (taking them ends
    /// the hold).
    holding: bool,
    /// No wait ends before this; `None` when no file waits. Past it, the
    /// open files are looked over for waits to end.
    next_expiry: Option<Instant>,
    /// Whether content arrived, or the stream waited on the server's side
    /// (for the engine's queue, for room among its replies), since it last
    /// looked for stalled files.
    moved: bool,
    /// The digest of the client's certificate, which the sessions its
    /// begins name must have been opened with (see `ServiceState::session`).
    caller: Option<Digest>,
    /// The signatures version of the stream's messages, which answers to
    /// hash-first begins leave out when it is theirs (see `FileVerdict`).
    /// The current one when the stream last took its landed verdicts,
    /// which it does before it makes any other reply: the replies made
    /// until the next take, and the messages they go in, agree on it.
    version: Arc<str>,
    /// What the stream ends with when it broke, or the server shuts down:
    /// sent after the verdicts of its scans under way, as tonic ends a
    /// stream at its first error.
    ending: Option<Status>,
}

/// Drives one Scan stream, whose client presented the certificate of digest
/// `caller` (mutual TLS), to its end.
pub(super) async fn run(
    state: Arc<ServiceState>,
    requests: Streaming<ScanRequest>,
    caller: Option<Digest>,
    replies: Replies,
) {
    let mut shutdown = state.shutdown.clone();
    let mut timers = Timers::new(state.idle_timeout);
    let mut stream = ScanStream::new(state, caller, requests, replies);
    // One registration with the shutdown watch for the stream's life, as
    // for the timers: the watch is shared by every stream.
    let shutdown = shut_down(&mut shutdown);
    tokio::pin!(shutdown);
    // Until the stream ends, which it does once its requests are dropped.
    while let Some(requests) = stream.requests.as_mut() {
        timers.wake_at(stream.next_expiry);
        let event = tokio::select! {
            request = requests.message() => Event::Request(request),
            () = stream.landings.woken() => Event::Landed,
            () = &mut timers.flush, if stream.holding => Event::HoldOver,
            () = &mut timers.wake, if stream.next_expiry.is_some() => Event::WaitsDue,
            () = &mut timers.idle => Event::Idle,
            () = &mut shutdown => Event::ShuttingDown,
        };
        if stream.on(event, &mut timers).await.is_err() {
            break;
        }
    }
    // The open files are dropped with `stream`: unfinished uploads release
    // everything, and flights they led end without a verdict. The replies
    // queued, and the verdicts of scans still under way, go as the agent
    // takes them, or are dropped if it takes none for the idle timeout;
    // then the stream's status, if it has one to end with.
    let (left, scanning) = (stream.replies.left_behind(), Arc::clone(&stream.scanning));
    let ending = stream
        .ending
        .take()
        .map(|status| (status, stream.replies.clone()));
    let idle = stream.state.idle_timeout;
    drop(stream);
    let owing = || !scanning.owed().ids.is_empty();
    let taken = left.until_taken(idle, owing);
    // A stream that ends as the server shuts down has its ending
    // (UNAVAILABLE), so `shutdown`, which has resolved, is not polled again.
    if ending.is_some() {
        // The status goes last, whatever comes meanwhile. Scans under way
        // reply within the grace period at shutdown, after which the
        // connection goes, and the wait with it.
        taken.await;
    } else {
        tokio::select! {
            () = taken => {}
            () = &mut shutdown => {}
        }
    }
    if let Some((status, replies)) = ending
        && let Ok(slot) = replies.try_reserve(status.message().len().max(1))
    {
        slot.send(Err(status));
    }
}

/// What woke a Scan stream's task.
enum Event {
    /// A request message; the end of the requests (`None`); or a broken
    /// stream, or a message the server would not decode.
    Request(Result<Option<ScanRequest>, Status>),
    /// A flight that some of the stream's files wait for landed.
    Landed,
    /// The verdicts held since the first of them landed are due.
    HoldOver,
    /// The first wait's deadline is past.
    WaitsDue,
    /// The idle timer fired: the stream may have been idle for the idle
    /// timeout (see [`ScanStream::idle`]).
    Idle,
    /// The server is shutting down.
    ShuttingDown,
}

/// A Scan stream's three timers, made for the stream's life: a timer made
/// anew for every message costs a lock (the runtime's timer wheel) per
/// message of a storm. The idle timer is re-armed only when it fires:
/// activity since then (`last_active`) moves it on instead of ending the
/// stream.
struct Timers {
    last_active: Instant,
    idle: Pin<Box<Sleep>>,
    /// Set to the first wait's deadline (see `ScanStream::next_expiry`).
    wake: Pin<Box<Sleep>>,
    /// Set when landed verdicts begin to be held (see `HOLD_FOR`).
    flush: Pin<Box<Sleep>>,
}

impl Timers {
    fn new(idle_timeout: Duration) -> Self {
        Timers {
            last_active: Instant::now(),
            idle: Box::pin(tokio::time::sleep(idle_timeout)),
            wake: Box::pin(tokio::time::sleep(UPLOAD_WAIT)),
            flush: Box::pin(tokio::time::sleep(HOLD_FOR)),
        }
    }

    /// Sets the wake-up for the first wait's deadline, if any.
    fn wake_at(&mut self, expiry: Option<Instant>) {
        if let Some(expiry) = expiry.filter(|&e| e != self.wake.deadline()) {
            self.wake.as_mut().reset(expiry);
        }
    }

    /// Restarts the idle time.
    fn active(&mut self) {
        self.last_active = Instant::now();
    }
}

impl ScanStream {
    fn new(
        state: Arc<ServiceState>,
        caller: Option<Digest>,
        requests: Streaming<ScanRequest>,
        replies: Replies,
    ) -> Self {
        ScanStream {
            requests: Some(requests),
            version: state.engine.ruleset().version_arc(),
            ending: None,
            // Held verdicts make a message at once when there are as many
            // as one agent can be waiting for (see `HOLD_FOR`).
            landings: Landings::new(state.uploads.config().files_in_flight as usize),
            state,
            open: HashMap::default(),
            scanning: Arc::default(),
            answered: Answered::default(),
            settled: Settled::default(),
            replies,
            notices: Vec::new(),
            holding: false,
            next_expiry: None,
            moved: false,
            caller,
        }
    }

    /// Does what `event` calls for. Fails when the stream is over: the
    /// agent is gone, or the stream ended (every open file then had its
    /// final reply, if the agent still listened).
    async fn on(&mut self, event: Event, timers: &mut Timers) -> Result<(), ()> {
        match event {
            Event::Request(Ok(Some(request))) => {
                self.handle(request).await?;
                // Whatever the stream did last (a request handled, a reply
                // sent by its task, a wait for the engine's queue) restarts
                // the idle time; so do verdicts still owed (see `idle`).
                timers.active();
            }
            Event::Request(Ok(None)) => {
                // The agent will send nothing more: files still open can
                // never complete, and each gets its final reply.
                let message = "the agent ended its requests with this file still open";
                let _ = self.fail_open_files(Code::Cancelled, message, false).await;
                return Err(());
            }
            Event::Request(Err(status)) => {
                self.broken(status).await;
                return Err(());
            }
            Event::Landed => {
                match self.landings.pending() {
                    Pending::Due => {
                        let landed = self.take_landed();
                        self.send_all(landed).await?;
                    }
                    Pending::Hold if !self.holding => {
                        timers.flush.as_mut().reset(Instant::now() + HOLD_FOR);
                        self.holding = true;
                    }
                    // Taken meanwhile, or held already.
                    Pending::Hold | Pending::Nothing => {}
                }
                timers.active();
            }
            Event::HoldOver => {
                let landed = self.take_landed();
                self.send_all(landed).await?;
            }
            Event::WaitsDue => {
                // Requests for content are never held: they go at once, and
                // the verdicts held so far with them.
                let mut replies = self.take_landed();
                replies.extend(self.expire());
                self.send_all(replies).await?;
                timers.active();
            }
            Event::Idle => self.idle(timers).await?,
            Event::ShuttingDown => {
                // Scans already running still reply, within the grace period.
                let message = "the server is shutting down; send this file to another SVM";
                let _ = self
                    .fail_open_files(Code::Unavailable, message, false)
                    .await;
                self.ending = Some(Status::unavailable(
                    "the server is shutting down; send the files left to another SVM",
                ));
                return Err(());
            }
        }
        Ok(())
    }

    /// The idle timer fired: the stream ends if it was idle for the idle
    /// timeout, owing no reply, or if a verdict was given up on for want
    /// of the agent taking it (see [`Owed::unread`]); otherwise the timer
    /// is set again, and the stalled files fail (see
    /// [`ScanStream::fail_stalled`]).
    async fn idle(&mut self, timers: &mut Timers) -> Result<(), ()> {
        // Replies the server still owes keep the stream open: an agent that
        // sent all its files waits in silence for them. Each comes within
        // its bounds: a scan's verdict (or the verdict of the scan a file
        // follows) within those of the scan and of its reply, a waiting
        // begin's answer within `UPLOAD_WAIT`. The idle time counts from
        // the last verdict sent.
        let (owing, given_back, unread) = {
            let owed = self.scanning.owed();
            (!owed.ids.is_empty(), owed.given_back, owed.unread)
        };
        if unread {
            return self.unread();
        }
        if owing || self.next_expiry.is_some() {
            timers.active();
        } else if let Some(at) = given_back.filter(|&at| at > timers.last_active) {
            timers.last_active = at;
        }
        let idle_timeout = self.state.idle_timeout;
        if timers.last_active.elapsed() < idle_timeout {
            timers
                .idle
                .as_mut()
                .reset(timers.last_active + idle_timeout);
            let stalled = self.fail_stalled();
            return self.send_all(stalled).await;
        }
        Counters::add(&self.state.counters.idle_streams, 1);
        let message = format!(
            "no request and no waiting file answered for {idle_timeout:?}; the stream is closed, open a new one"
        );
        let _ = self
            .fail_open_files(Code::DeadlineExceeded, &message, true)
            .await;
        // Best effort: an agent that reads nothing is not waited for.
        if let Ok(slot) = self.replies.try_reserve(message.len()) {
            slot.send(Err(Status::deadline_exceeded(message)));
        }
        Err(())
    }

    /// The stream broke, or brought a message the server would not decode:
    /// its open files fail, and the stream ends with why, if the agent
    /// still listens (ended without a status, the stream would look
    /// complete), once the verdicts of the files it scans are sent. Its
    /// files are let off only when the server itself asks for them again
    /// (its intake had no room for the stream's messages): a status code
    /// alone may be the agent's doing, as tonic maps the reason of an
    /// HTTP/2 reset to one.
    async fn broken(&mut self, status: Status) {
        tracing::debug!(%status, "scan stream broken");
        let (code, message) = (status.code(), status.message().to_owned());
        let forgive = intake::asks_to_send_again(&status);
        if self.fail_open_files(code, &message, forgive).await.is_ok() {
            self.ending = Some(status);
        }
    }

    /// Handles the requests of one message in order, and sends their
    /// replies, with the verdicts held so far, in as few messages as their
    /// number allows: at the end of the message, or every [`MAX_REPLIES`]
    /// (or [`MESSAGE_BYTES`] of weight), or before an end (which may wait
    /// for a place in the engine's queue: the replies ready before it do
    /// not wait with it). Fails when the agent is gone.
    async fn handle(&mut self, request: ScanRequest) -> Result<(), ()> {
        let mut replies = self.take_landed();
        // What `replies` weigh (see `replies::weight`): sent before they
        // make a heavy message, as verdicts may carry many detections.
        let mut weighing = replies.iter().map(weight).sum();
        let mut context = MessageContext::default();
        for kind in request.requests.into_iter().filter_map(|r| r.kind) {
            let reply = match kind {
                file_request::Kind::Begin(begin) => {
                    let id = begin.file_id;
                    self.answered.forget(id);
                    let reply = self.begin(begin, &mut context);
                    self.answered.note(id, reply.as_ref());
                    reply
                }
                file_request::Kind::Chunk(chunk) => {
                    let id = chunk.file_id;
                    let reply = self.chunk(chunk);
                    self.answered.note(id, reply.as_ref());
                    reply
                }
                file_request::Kind::End(end) => {
                    // Both the replies (room among them) and the end (a
                    // place in the queue) may wait.
                    let started = Instant::now();
                    let weighed = std::mem::take(&mut weighing);
                    self.send_weighed(std::mem::take(&mut replies), weighed)
                        .await?;
                    let reply = self.end(end.file_id).await;
                    if started.elapsed() >= A_WAIT {
                        context.waited();
                    }
                    reply
                }
                file_request::Kind::Cancel(cancel) => {
                    let id = cancel.file_id;
                    let reply = (self.close(id))
                        .map(|_| file_error(id, Code::Cancelled, "cancelled by the agent"));
                    // Chunks of it (or its end) may follow, sent before
                    // the agent cancelled.
                    self.answered.note(id, reply.as_ref());
                    reply
                }
            };
            weighing += reply.as_ref().map_or(0, weight);
            replies.extend(reply);
            if replies.len() >= MAX_REPLIES || weighing >= MESSAGE_BYTES {
                let weighed = std::mem::take(&mut weighing);
                self.send_weighed(std::mem::take(&mut replies), weighed)
                    .await?;
                context.waited();
            }
        }
        self.send_weighed(replies, weighing).await
    }

    /// Ends the stream of an agent that took none of its replies for the
    /// idle timeout: its open files, and the replies waiting, are dropped
    /// with it.
    fn unread(&self) -> Result<(), ()> {
        let idle = self.state.idle_timeout;
        self.replies.abandon(idle);
        tracing::warn!(
            ?idle,
            "an agent took none of its replies; its Scan stream is closed"
        );
        Err(())
    }

    /// Sends `replies`, at most [`MAX_REPLIES`] (or [`MESSAGE_BYTES`] of
    /// weight) to a message. Fails when the agent is gone, or has taken
    /// none of its replies for the idle timeout: an agent that stops
    /// reading must not keep its open files, and the flights other VMs wait
    /// on, for ever.
    async fn send_all(&mut self, replies: Vec<FileReply>) -> Result<(), ()> {
        let weighs = replies.iter().map(weight).sum();
        self.send_weighed(replies, weighs).await
    }

    /// [`Self::send_all`] for `replies` known to weigh `total`: weighed
    /// again one by one only when they make more than one message.
    async fn send_weighed(
        &mut self,
        mut replies: Vec<FileReply>,
        mut total: usize,
    ) -> Result<(), ()> {
        // Counted before the agent can have them: a full scan it ends on
        // their replies finds its failures counted.
        self.settled.record();
        while !replies.is_empty() {
            let (mut count, mut weighs) = (replies.len(), total);
            if count > MAX_REPLIES || weighs > MESSAGE_BYTES {
                (count, weighs) = (0, 0);
                for reply in replies.iter().take(MAX_REPLIES) {
                    let more = weight(reply);
                    if count > 0 && weighs + more > MESSAGE_BYTES {
                        break;
                    }
                    (count, weighs) = (count + 1, weighs + more);
                }
            }
            total = total.saturating_sub(weighs);
            let rest = replies.split_off(count);
            // A timer only when the buffer is full: one for every message
            // would cost the runtime's timer wheel a lock each (see `Timers`).
            let slot = match self.replies.try_reserve(weighs) {
                Ok(slot) => slot,
                Err(NoSlot::Closed) => return Err(()),
                Err(NoSlot::Full) => {
                    self.moved = true;
                    let (idle, waiting_since) = (self.state.idle_timeout, Instant::now());
                    let reserved = self.replies.reserve_within(weighs, idle).await;
                    Self::held_up(&mut self.open, waiting_since.elapsed());
                    match reserved {
                        Ok(reserved) => reserved.ok_or(())?,
                        Err(_) => return self.unread(),
                    }
                }
            };
            let signatures_version = self.version.to_string();
            slot.send(Ok(ScanReply {
                replies,
                signatures_version,
            }));
            replies = rest;
        }
        Ok(())
    }

    /// The replies to the flights landed since they were last taken:
    /// verdicts, and requests for content for files whose flight failed.
    /// A notice that fits no waiting file (it was cancelled, or ended its
    /// wait) is dropped. Taking them ends the hold, and takes the current
    /// signatures version for the replies to come (see `version`).
    fn take_landed(&mut self) -> Vec<FileReply> {
        self.holding = false;
        let current = self.state.engine.ruleset();
        if *self.version != *current.version() {
            self.version = current.version_arc();
        }
        let mut notices = std::mem::take(&mut self.notices);
        self.landings.take(&mut notices);
        let replies = notices.drain(..).filter_map(|n| self.landed(n)).collect();
        self.notices = notices;
        replies
    }

    /// Gives every open file its final reply: an error (the stream ends,
    /// and its requests are dropped first), letting its VM off if `forgive`
    /// (the server asks for the file again: see [`VerdictOwed::forgive`]).
    /// Verdicts landed go first. A wait that ended without a verdict gets
    /// the error too (see [`Self::resolve`]).
    ///
    /// Waits are not withdrawn one by one, as a cancel withdraws its file's:
    /// each would look through its flight's subscribers under the lock all
    /// flights share, and when thousands of agents drop off in the middle
    /// of a storm, every one of their files waits on a flight that all the
    /// others wait on too (time quadratic in the agents). The stream's
    /// landings are closed, and a flight passes over subscribers whose
    /// stream is closed or gone.
    async fn fail_open_files(
        &mut self,
        code: Code,
        message: &str,
        forgive: bool,
    ) -> Result<(), ()> {
        self.requests = None;
        self.landings.close();
        let mut replies = self.take_landed();
        replies.extend(self.open.drain().map(|(id, mut file)| {
            file.owed.forgive_if(forgive);
            file_error(id, code, message)
        }));
        self.send_all(replies).await
    }

    /// Fails the files waiting for content when none at all arrived since
    /// the stream last looked, an idle timeout ago or more, while their
    /// agent kept the stream alive with other requests. Kept, each would
    /// hold its place in flight and its memory, and make every other
    /// request for its content wait for a verdict that never comes. A
    /// stream that received any content meanwhile fails nothing (an agent
    /// may send its files one at a time, and the last of a storm's wait
    /// long for their turn), nor does one that waited on the server's side
    /// (its reader could not take content then). Looked for when the idle
    /// timer fires: the chunks pay one flag for it.
    fn fail_stalled(&mut self) -> Vec<FileReply> {
        let moved = std::mem::take(&mut self.moved);
        let mut stalled = Vec::new();
        for (&id, file) in &mut self.open {
            if file.upload.is_some() {
                if file.seen_at_last_look && !moved {
                    stalled.push(id);
                }
                file.seen_at_last_look = true;
            }
        }
        let idle = self.state.idle_timeout;
        let message = format!("no content on this stream for {idle:?}; send the file again");
        let replies: Vec<_> = stalled
            .into_iter()
            .filter_map(|id| {
                let mut file = self.close(id)?;
                file.owed.forgive();
                Some(file_error(id, Code::DeadlineExceeded, &message))
            })
            .collect();
        for reply in &replies {
            self.answered.note(reply.file_id, Some(reply));
        }
        replies
    }

    /// Takes a file off the stream, withdrawing its wait if it has one.
    fn close(&mut self, id: u64) -> Option<OpenFile> {
        let file = self.open.remove(&id)?;
        if let Standing::Waits(wait) = &file.standing {
            self.stop_waiting(id, wait);
        }
        Some(file)
    }

    fn stop_waiting(&self, id: u64, wait: &Wait) {
        let flights = self.state.engine.cache().flights();
        flights.unsubscribe(&wait.key, wait.flight, id, &self.landings);
    }

    /// Opens a file: answers at once from the cache when the agent gave a
    /// digest the server knows, waits when that content is under way for
    /// another request, and otherwise asks for the content (or, without a
    /// digest, expects it).
    fn begin(&mut self, begin: FileBegin, context: &mut MessageContext) -> Option<FileReply> {
        let id = begin.file_id;
        if self.close(id).is_some() {
            // One final reply for the id: this error ends both files.
            let message = format!("file id {id} is already open on this stream: both are dropped");
            return Some(file_error(id, Code::InvalidArgument, &message));
        }
        let (owed, claimed) = match self.admit(&begin, context) {
            Ok(admitted) => admitted,
            Err(reply) => return Some(reply),
        };
        let looked_up = claimed.map(|digest| {
            let engine = &self.state.engine;
            let key = engine.cache_key(&digest, Some(begin.path.as_ref()));
            (digest, key, engine.cache().get(&key))
        });
        // A verdict known already is the file's final reply at once: it
        // takes no place in flight.
        if let Some((_, _, Some(hit))) = &looked_up {
            return self.known(id, owed, begin.size, &begin.path, hit, false);
        }
        // Content the engine refuses is not asked for (see
        // `Engine::refused_content`). Content that stuck a scan thread
        // fails the file; content whose scans timed out lately gets the
        // failure its scan would, at once, taking no place in flight
        // either. A begin for content another thread has long been on is
        // not refused: that thread may still come back with a verdict. It
        // waits for it as for any scan under way, or is asked for its
        // content (whose scan is refused while that thread is on the same).
        if let Some((digest, key, None)) = &looked_up
            && let Some(refusal) = self.state.engine.refused_content(digest, key)
        {
            return Some(self.refuse(id, owed, begin.size, &begin.path, *digest, refusal));
        }
        let file = match self.open_file(begin, owed) {
            Ok(file) => file,
            Err(reply) => return Some(reply),
        };
        let Some((digest, key, _)) = looked_up else {
            return self.open_for_content(id, file, None, Standing::Unannounced);
        };
        let cache = self.state.engine.cache();
        // Leads and waits begin in order: the first to end is still the
        // one the stream looks out for.
        let deadline = context.now() + UPLOAD_WAIT;
        self.next_expiry.get_or_insert(deadline);
        match cache.flights().join_or_subscribe(key, &self.landings, id) {
            Subscription::Lead(flight) => match cache.landed_meanwhile(flight) {
                Ok(hit) => self.known(id, file.owed, file.size, &file.name, &hit, false),
                Err(flight) => {
                    let leads = Standing::Leads {
                        flight,
                        until: deadline,
                        received: 0,
                    };
                    self.open_for_content(id, file, Some(digest), leads)
                }
            },
            Subscription::Waits(flight) => {
                let wait = Wait {
                    key,
                    flight,
                    digest,
                    deadline,
                };
                let standing = Standing::Waits(wait);
                self.open.insert(id, OpenFile { standing, ..file });
                None
            }
        }
    }

    /// The reply to a begin of `size` bytes at `path` whose content's
    /// verdict is known (found in the cache, or handed over by the flight
    /// it waited for: `coalesced`): the verdict, settled for the file's VM
    /// in `settled` (counted before it goes out).
    fn known(
        &mut self,
        id: u64,
        owed: VerdictOwed,
        size: u64,
        path: &str,
        hit: &CachedVerdict,
        coalesced: bool,
    ) -> Option<FileReply> {
        let verdict = FileVerdict::hash_first(hit, coalesced, &self.version);
        owed.settle_in(&mut self.settled, size, path, &verdict);
        Some(reply(id, verdict_reply(verdict)))
    }

    /// The final reply to file `id`, of `size` bytes at `path`, whose
    /// content of `digest` the engine refuses (see
    /// `Engine::refused_content`): content that stuck a scan thread fails
    /// the file (`FAILED_PRECONDITION`); content whose scans timed out
    /// lately gets the failure its scan would.
    fn refuse(
        &mut self,
        id: u64,
        owed: VerdictOwed,
        size: u64,
        path: &str,
        digest: Digest,
        refusal: Refusal,
    ) -> FileReply {
        if refusal.kind != Refused::TimedOut {
            return file_error(id, Code::FailedPrecondition, &refusal.why);
        }
        let verdict = refused_verdict(&self.state.engine, refusal, size, digest);
        owed.settle_in(&mut self.settled, size, path, &verdict);
        reply(id, verdict_reply(verdict))
    }

    /// The checks every begin passes: a new file id, a known session, a
    /// well-formed digest, a size within the limit. Returns the verdict
    /// the file owes and the digest it was announced with, or the reply
    /// refusing it.
    fn admit(
        &self,
        begin: &FileBegin,
        context: &mut MessageContext,
    ) -> Result<(VerdictOwed, Option<Digest>), FileReply> {
        let id = begin.file_id;
        let fail = |code, message: String| file_error(id, code, &message);
        let session = context
            .session(&self.state, &begin.session_id, self.caller.as_ref())
            .map_err(|status| fail(status.code(), status.message().to_owned()))?;
        // From here on, a refused file spoils its VM's full scan (but
        // for want of room: see `VerdictOwed::forgive`).
        let owed = VerdictOwed::to(session);
        if self.scanning.holds(id) {
            let message = format!(
                "file id {id} is still being scanned on this stream; use it again once its verdict came"
            );
            return Err(fail(Code::InvalidArgument, message));
        }
        let claimed = parse_digest(&begin.blake3).map_err(|m| fail(Code::InvalidArgument, m))?;
        check_path(&begin.path)
            .map_err(|status| fail(status.code(), status.message().to_owned()))?;
        self.state
            .uploads
            .check_size(begin.size)
            .map_err(|err| upload_error(id, &err))?;
        Ok((owed, claimed))
    }

    /// The file `begin` announced, not open yet, with the place in flight
    /// it takes until its final reply; or the reply refusing it, when its
    /// VM, or the server, has no place free.
    fn open_file(&self, begin: FileBegin, mut owed: VerdictOwed) -> Result<OpenFile, FileReply> {
        let place = match owed.session() {
            Some(session) => session.take_place(begin.path.len()),
            None => Err(NoPlace::Vm),
        };
        let in_flight = match place {
            Ok(in_flight) => in_flight,
            Err(no_place) => {
                owed.forgive();
                let message = self.no_place(no_place);
                return Err(file_error(begin.file_id, Code::ResourceExhausted, &message));
            }
        };
        Ok(OpenFile {
            owed,
            name: begin.path,
            size: begin.size,
            upload: None,
            seen_at_last_look: false,
            standing: Standing::Unannounced,
            _in_flight: in_flight,
        })
    }

    /// Why a file found no place in flight, as its agent is told.
    fn no_place(&self, no_place: NoPlace) -> String {
        let uploads = self.state.uploads.config();
        match no_place {
            NoPlace::Vm => format!(
                "more than {} files of this VM in flight (on this session and the VM's earlier ones); wait for verdicts before beginning more",
                uploads.files_in_flight
            ),
            NoPlace::Server => "the server has as many files in flight as all the agents it takes may have (server.max_agents times uploads.files_in_flight); wait for verdicts, or send the file to another SVM".to_owned(),
            NoPlace::Paths => format!(
                "the paths of the files in flight on the server take all of the {} bytes it keeps for them (uploads.path_budget); wait for verdicts, or send the file to another SVM",
                uploads.path_budget
            ),
        }
    }

    /// Opens `file` to receive its content (checked against `digest`, when
    /// announced); asks for it unless it follows on its own.
    fn open_for_content(
        &mut self,
        id: u64,
        mut file: OpenFile,
        digest: Option<Digest>,
        standing: Standing,
    ) -> Option<FileReply> {
        let vm_share = file.owed.spool_share();
        let upload = match self.state.uploads.begin(Some(file.size), digest, vm_share) {
            Ok(upload) => Box::new(upload),
            Err(err) => {
                file.owed.forgive_if(err.asks_to_send_again());
                return Some(upload_error(id, &err));
            }
        };
        let asks = digest.is_some();
        let file = OpenFile {
            upload: Some(upload),
            standing,
            ..file
        };
        self.open.insert(id, file);
        asks.then(|| {
            Counters::add(&self.state.counters.content_requests, 1);
            reply(id, file_reply::Kind::SendContent(ContentRequest {}))
        })
    }

    /// A waiting file's flight landed: its reply is the verdict, or, when
    /// the flight failed, a request for this file's own content. `None`
    /// for a notice that fits no waiting file.
    fn landed(&mut self, notice: Notice) -> Option<FileReply> {
        let id = notice.tag;
        let Entry::Occupied(entry) = self.open.entry(id) else {
            return None;
        };
        let digest = match &entry.get().standing {
            Standing::Waits(wait) if wait.flight == notice.flight => wait.digest,
            _ => return None,
        };
        let file = entry.remove();
        self.resolve(id, file, digest, notice.landing)
    }

    /// Waits past their deadline end: they are withdrawn, and those files'
    /// own content is asked for (whoever was to send it is too slow). Leads
    /// less than [`LEAD_PROGRESS`] of whose content came in the last
    /// [`UPLOAD_WAIT`] give the lead up (a complete upload leads no more):
    /// the flight's waiters go on without it, and so do requests for
    /// the same content that come later, rather than each waiting for an
    /// agent that may never send it, or send it a byte at a time (the time
    /// the stream waited on the server's side, reading nothing, is not
    /// counted against a lead: see [`Self::held_up`]). The
    /// open files are few (bounded by their sessions' files in flight), so
    /// they are looked over rather than kept in a queue of deadlines.
    fn expire(&mut self) -> Vec<FileReply> {
        let now = Instant::now();
        let mut due = Vec::new();
        let mut next_expiry = None;
        for (&id, file) in &mut self.open {
            let came = file.upload.as_ref().map_or(0, |upload| upload.received());
            let deadline = match &mut file.standing {
                Standing::Waits(wait) => wait.deadline,
                Standing::Leads {
                    until, received, ..
                } => {
                    let progress = came >= *received + LEAD_PROGRESS || came >= file.size;
                    if *until <= now && came > *received && progress {
                        (*until, *received) = (now + UPLOAD_WAIT, came);
                    }
                    *until
                }
                _ => continue,
            };
            if deadline > now {
                next_expiry =
                    Some(next_expiry.map_or(deadline, |next: Instant| next.min(deadline)));
            } else if let Standing::Waits(wait) = file.standing {
                due.push((id, wait));
            } else {
                file.standing = Standing::OnItsOwn;
            }
        }
        self.next_expiry = next_expiry;
        let mut replies = Vec::with_capacity(due.len());
        for (id, wait) in due {
            self.stop_waiting(id, &wait);
            if let Some(file) = self.open.remove(&id) {
                replies.extend(self.resolve(id, file, wait.digest, None));
            }
        }
        replies
    }

    /// The stream waited `waited` on the server's side (for a place in the
    /// engine's queue, or room among its replies), reading nothing: the
    /// leads' content may be waiting unread, and their deadlines move on
    /// by as much. A wait under a millisecond (a place free at once, as
    /// nearly every file finds one) is not worth a walk over the open files
    /// after every file: deadlines of seconds do not feel it.
    fn held_up(open: &mut OpenFiles, waited: Duration) {
        if waited < A_WAIT {
            return;
        }
        for file in open.values_mut() {
            if let Standing::Leads { until, .. } = &mut file.standing {
                *until += waited;
            }
        }
    }

    /// Ends the wait of `file` (id `id`, taken off the stream, waiting for
    /// content with `digest`) with `landing`. Without a verdict of the
    /// current signatures (the scan waited for may have been under way
    /// when they were replaced), the file's own content is asked for,
    /// unless the engine refuses the content now (the scan waited for
    /// timed out a second time, say); but a stream that takes no more
    /// requests leaves the file open for its error (opened for content, it
    /// would take memory or a spool file for nothing, and might be refused
    /// for want of them, an outcome that is not the stream's).
    fn resolve(
        &mut self,
        id: u64,
        file: OpenFile,
        digest: Digest,
        landing: Landing,
    ) -> Option<FileReply> {
        let engine = &self.state.engine;
        let landing = landing.filter(|landed| engine.is_current(landed));
        let Some(landed) = landing else {
            // What was waited for may have made the content refused.
            let key = engine.cache_key(&digest, Some(file.name.as_ref()));
            if let Some(refusal) = engine.refused_content(&digest, &key) {
                let OpenFile {
                    owed, size, name, ..
                } = file;
                return Some(self.refuse(id, owed, size, &name, digest, refusal));
            }
            if self.requests.is_none() {
                let standing = Standing::OnItsOwn;
                self.open.insert(id, OpenFile { standing, ..file });
                return None;
            }
            return self.open_for_content(id, file, Some(digest), Standing::OnItsOwn);
        };
        self.known(id, file.owed, file.size, &file.name, &landed, true)
    }

    /// Adds a chunk to its file. A chunk for a file that already had its
    /// final reply, or is being scanned, is dropped without a word (see
    /// [`Answered`]).
    fn chunk(&mut self, chunk: FileChunk) -> Option<FileReply> {
        let id = chunk.file_id;
        let Some(upload) = self.open.get_mut(&id).and_then(|f| f.upload.as_mut()) else {
            if self.close(id).is_none() && (self.answered.holds(id) || self.scanning.holds(id)) {
                return None;
            }
            let message = format!(
                "chunk for file id {id}, which is not open or whose content was not asked for"
            );
            return Some(file_error(id, Code::InvalidArgument, &message));
        };
        Counters::add(&self.state.counters.bytes_received, chunk.data.len() as u64);
        match upload.push(chunk.offset, &chunk.data) {
            // Content taken is the stream's progress: an empty chunk, or
            // one refused, is none (sent now and then, it would keep every
            // stalled file of the stream open).
            Ok(()) => {
                self.moved |= !chunk.data.is_empty();
                None
            }
            Err(err) => {
                if let Some(mut file) = self.close(id) {
                    file.owed.forgive_if(err.asks_to_send_again());
                }
                Some(upload_error(id, &err))
            }
        }
    }

    /// Closes a file: verifies it and has it judged. A scan waits for a
    /// place in the engine's queue here, in the reader: that is the
    /// backpressure. The verdict is sent by whoever makes it: the scan
    /// thread, or a task following another request's scan.
    async fn end(&mut self, id: u64) -> Option<FileReply> {
        let Some(file) = self.close(id) else {
            // The agent is done with a file answered already: dropped
            // without a word, as its chunks were.
            if self.answered.forget(id) || self.scanning.holds(id) {
                return None;
            }
            let message = format!("end of file id {id}, which is not open");
            return Some(file_error(id, Code::InvalidArgument, &message));
        };
        let OpenFile {
            owed,
            name,
            upload,
            standing,
            _in_flight: in_flight,
            ..
        } = file;
        let Some(upload) = upload else {
            let message = format!("end of file id {id}, whose content was not asked for");
            return Some(file_error(id, Code::InvalidArgument, &message));
        };
        let received = match (*upload).finish() {
            Ok(received) => received,
            Err(err) => return Some(upload_error(id, &err)),
        };
        let size = received.size;
        let engine = Arc::clone(&self.state.engine);
        // The wait for the queue may be long, and the stream reads no
        // content meanwhile: it is no stall of the files waiting for theirs
        // (an empty file's end, which brought none, is no progress).
        let waiting_since = Instant::now();
        let judging = Judging::start(&engine, &received, &name, standing).await;
        let waited = waiting_since.elapsed();
        self.moved |= waited >= A_WAIT;
        Self::held_up(&mut self.open, waited);
        if let Judging::Known(hit) = &judging {
            let verdict = FileVerdict::known(hit, &received.digest, false);
            owed.settle_in(&mut self.settled, size, &name, &verdict);
            return Some(reply(id, verdict_reply(verdict)));
        }
        let due = VerdictDue {
            id,
            size,
            path: name.clone(),
            taken: Some(Scanning::take(&self.scanning, id)),
            owed: Some(owed),
            replies: self.replies.clone(),
            runtime: Handle::current(),
            idle_timeout: self.state.idle_timeout,
            in_flight: Some(in_flight),
        };
        judging.deliver(due, engine, received, name);
        None
    }
}

/// A file's verdict on its way to the agent, from the task or the scan
/// thread that made it. Dropped unsent (its scan was lost), it fails the
/// file rather than leave the agent waiting.
struct VerdictDue {
    id: u64,
    size: u64,
    /// The file's path, as its begin gave it.
    path: String,
    /// The file's id, given back just before its reply is queued.
    taken: Option<TakenId>,
    owed: Option<VerdictOwed>,
    replies: Replies,
    runtime: Handle,
    /// How long the reply may wait for the agent to take replies.
    idle_timeout: Duration,
    /// The file's place in flight, given back just before its reply is
    /// queued: an agent that has the reply may begin another file at once.
    in_flight: Option<FilePlace>,
}

impl VerdictDue {
    /// Settles the file with `verdict` and sends it.
    fn send(mut self, verdict: FileVerdict) {
        if let Some(owed) = self.owed.take() {
            owed.settle(self.size, &self.path, &verdict);
        }
        self.reply(verdict_reply(verdict));
    }

    /// Queues `kind` on the stream: at once while its reply buffer has
    /// room (from any thread, without blocking), by a task otherwise. The
    /// task keeps the file's place in flight until the reply is queued, so
    /// an agent that does not take its replies cannot begin more files and
    /// these tasks are as few as its places; after the idle timeout the
    /// reply is dropped, the place given back, and the stream ends (see
    /// [`Owed::unread`]).
    fn reply(&mut self, kind: file_reply::Kind) {
        let (place, taken) = (self.in_flight.take(), self.taken.take());
        let reply = reply(self.id, kind);
        let weighs = weight(&reply);
        // The verdict of content carries its own signatures version.
        let message = Ok(ScanReply {
            replies: vec![reply],
            signatures_version: String::new(),
        });
        match self.replies.try_reserve(weighs) {
            Ok(slot) => {
                drop((place, taken));
                slot.send(message);
            }
            Err(NoSlot::Full) => {
                let (replies, idle) = (self.replies.clone(), self.idle_timeout);
                self.runtime.spawn(async move {
                    match replies.reserve_within(weighs, idle).await {
                        Ok(Some(slot)) => {
                            drop((place, taken));
                            slot.send(message);
                        }
                        Ok(None) => {}
                        Err(_) => taken.map_or((), TakenId::given_up),
                    }
                });
            }
            Err(NoSlot::Closed) => {}
        }
    }
}

/// The ids of a stream's files waiting for a scan's verdict (see
/// [`ScanStream::scanning`]). The agent may name a file again once its
/// final reply came, and the proto's "open" lasts until then: a verdict
/// must not arrive under an id the agent has given to another file. The
/// stream and the verdict's sender each change it once per scanned file;
/// the stream looks in it for every begin, chunk and end while it holds
/// any id.
#[derive(Default)]
struct Scanning {
    owed: Mutex<Owed>,
    /// How many ids `owed` holds: the stream looks at every begin's id,
    /// and most find none held without taking the lock the scan threads
    /// take too. Only the stream adds ids, so it never finds none where
    /// one of its own is.
    held: AtomicUsize,
}

/// What [`Scanning`] keeps.
#[derive(Default)]
struct Owed {
    ids: HashSet<u64, foldhash::fast::RandomState>,
    /// When an id was last given back (its verdict sent, or given up on):
    /// the stream's idle time counts from then too.
    given_back: Option<Instant>,
    /// A verdict was given up on: its agent took none of the stream's
    /// replies for the idle timeout. The stream ends at its next idle
    /// look, as it would had it waited for room itself: kept, it would go
    /// on without the verdict, a file the agent waits on for ever.
    unread: bool,
}

impl Scanning {
    fn owed(&self) -> parking_lot::MutexGuard<'_, Owed> {
        self.owed.lock()
    }

    /// Takes `id` until the returned guard is dropped.
    fn take(scanning: &Arc<Scanning>, id: u64) -> TakenId {
        let mut owed = scanning.owed();
        if owed.ids.insert(id) {
            scanning.held.fetch_add(1, Ordering::Relaxed);
        }
        drop(owed);
        TakenId {
            scanning: Arc::clone(scanning),
            id,
        }
    }

    fn holds(&self, id: u64) -> bool {
        self.held.load(Ordering::Relaxed) > 0 && self.owed().ids.contains(&id)
    }
}

/// A file id taken in [`Scanning`], given back when dropped, whichever
/// way its reply goes (queued, given up on, or its stream gone).
struct TakenId {
    scanning: Arc<Scanning>,
    id: u64,
}

impl TakenId {
    /// Gives the id back, its verdict given up on (see [`Owed::unread`]).
    fn given_up(self) {
        self.scanning.owed().unread = true;
    }
}

impl Drop for TakenId {
    fn drop(&mut self) {
        let mut owed = self.scanning.owed();
        if owed.ids.remove(&self.id) {
            self.scanning.held.fetch_sub(1, Ordering::Relaxed);
        }
        owed.given_back = Some(Instant::now());
    }
}

impl Drop for VerdictDue {
    fn drop(&mut self) {
        if self.owed.take().is_some() {
            let message =
                "the scan was lost to a fault of the server: the file counts as failed; scan it again for a verdict"
                    .to_owned();
            self.reply(file_reply::Kind::Error(FileError {
                code: Code::Internal as i32,
                message,
                ..FileError::default()
            }));
        }
    }
}

/// What the begins of one request message share, looked up once for the
/// message rather than once for each begin (a message holds hundreds of
/// begins in a boot storm): the session they name (an agent's begins name
/// its one session; looking it up is hearing from its agent), and the time
/// their waits count from.
#[derive(Default)]
struct MessageContext {
    session: Option<Arc<Session>>,
    at: Option<Instant>,
}

impl MessageContext {
    fn session(
        &mut self,
        state: &ServiceState,
        id: &str,
        caller: Option<&Digest>,
    ) -> Result<&Arc<Session>, Status> {
        let known = matches!(&self.session, Some(session) if session.id == id);
        if !known {
            let session = state.session(id, caller)?;
            session.touch();
            self.session = Some(session);
        }
        Ok(self.session.as_ref().expect("looked up"))
    }

    /// The time the message is handled at: read once, until its handling
    /// [waited](Self::waited).
    fn now(&mut self) -> Instant {
        *self.at.get_or_insert_with(Instant::now)
    }

    /// The message's handling waited (for the engine's queue, for room
    /// among the replies: seconds, maybe): the time is read again, and the
    /// session looked up again. A wait of a begin after it must not count
    /// from before, and end at once; nor may a begin after it take a place
    /// of a session that ended meanwhile (its agent gone, or replaced).
    fn waited(&mut self) {
        self.at = None;
        self.session = None;
    }
}

/// How received content gets its verdict.
enum Judging {
    /// The cache has it.
    Known(Arc<CachedVerdict>),
    /// A scan, with its place in the queue (none yet for a spooled file,
    /// see [`Judging::start`]), leading the flight for the content if
    /// there is one.
    Scan(Option<ScanSlot>, Option<Flight>),
    /// Another request is scanning the same content: wait for that, until
    /// the deadline.
    Follow(Waiter, Instant),
    /// The content is refused unscanned: why.
    Refused(Refusal),
}

impl Judging {
    /// Decides for `received` content, given where its file stood. A scan
    /// of content in memory waits here for its place in the queue (the
    /// backpressure); a spooled file, which may first wait long for its
    /// share of the mapped budget behind other large files, waits on a
    /// task of its own (see [`Judging::deliver`]), so that its stream's
    /// other files go on meanwhile. (Spooled files waiting are bounded by
    /// the spool's places, and by the files each VM may have in flight.)
    async fn start(
        engine: &Arc<Engine>,
        received: &Received,
        name: &str,
        standing: Standing,
    ) -> Self {
        let key = engine.cache_key(&received.digest, Some(name.as_ref()));
        let cache = engine.cache();
        // Content refused is not scanned (see `Engine::refused_content`),
        // nor waited for: no scan of it lands anything. A verdict cached
        // before is still given.
        if let Some(refusal) = engine.refused_content(&received.digest, &key) {
            return cache
                .get(&key)
                .map_or(Judging::Refused(refusal), Judging::Known);
        }
        let flight = match standing {
            Standing::Leads { flight, .. } if *flight.key() == key => Some(flight),
            // Looked up when it began: a second look is not a new request.
            // A flight led under other signatures ends here, not after the
            // wait for the queue below: its waiters go on at once. Such a
            // file waited once already, or could not wait (a waiting file
            // has no content): it leads when nobody else does, and waits
            // only for a scan of its content under way on a thread.
            looked_up @ (Standing::OnItsOwn | Standing::Leads { .. } | Standing::Waits(_)) => {
                drop(looked_up);
                if let Some(hit) = cache.peek(&key) {
                    return Judging::Known(hit);
                }
                match cache.flights().join(key) {
                    Join::Lead(flight) => match cache.landed_meanwhile(flight) {
                        Ok(hit) => return Judging::Known(hit),
                        Err(flight) => Some(flight),
                    },
                    // Scanned on its own, unless a scan of the content is
                    // under way on a thread: that scan is waited for (see
                    // `Engine::second_copy_refused_in`).
                    Join::Wait(waiter) => match engine.second_copy_refused_in(&received.digest) {
                        Some(refused_in) => {
                            return Judging::Follow(waiter, Instant::now() + refused_in);
                        }
                        None => None,
                    },
                }
            }
            Standing::Unannounced => {
                if let Some(hit) = cache.get(&key) {
                    return Judging::Known(hit);
                }
                match cache.flights().join(key) {
                    Join::Lead(flight) => match cache.landed_meanwhile(flight) {
                        Ok(hit) => return Judging::Known(hit),
                        Err(flight) => Some(flight),
                    },
                    Join::Wait(waiter) => {
                        let refused_in = engine.second_copy_refused_in(&received.digest);
                        let waits = refused_in.unwrap_or_default().max(UPLOAD_WAIT);
                        return Judging::Follow(waiter, Instant::now() + waits);
                    }
                }
            }
        };
        let slot = match received.content {
            Content::Spooled { .. } => None,
            Content::Bytes(_) | Content::File(_) => Some(engine.reserve(&received.content).await),
        };
        Judging::Scan(slot, flight)
    }

    /// Has the verdict made and sent as `due`. A scan's verdict is sent
    /// from the scan thread (or, when the thread counts as stuck, its
    /// failure from the look that finds it so); a wait for another
    /// request's scan, or for a spooled file's place, needs a task.
    fn deliver(self, due: VerdictDue, engine: Arc<Engine>, received: Received, name: String) {
        match self {
            Judging::Scan(Some(slot), flight) => {
                let (job, guard) = received.into_job(name);
                slot.scan_then(job, move |outcome| {
                    drop(guard);
                    land(flight, &outcome);
                    due.send(FileVerdict::from_outcome(&outcome));
                });
            }
            judging => {
                tokio::spawn(async move {
                    due.send(judging.verdict(&engine, received, name).await);
                });
            }
        }
    }

    /// The verdict: known, scanned (and landed for the flight's waiters),
    /// or handed over by the scan waited for.
    async fn verdict(self, engine: &Arc<Engine>, received: Received, name: String) -> FileVerdict {
        match self {
            Judging::Known(hit) => FileVerdict::known(&hit, &received.digest, false),
            Judging::Scan(slot, flight) => {
                let slot = match slot {
                    Some(slot) => slot,
                    None => engine.reserve(&received.content).await,
                };
                scan_received(slot, received, name, flight).await
            }
            Judging::Follow(waiter, deadline) => {
                let landed = waiter.verdict(deadline).await;
                if let Some(landed) = landed.filter(|landed| engine.is_current(landed)) {
                    return FileVerdict::known(&landed, &received.digest, true);
                }
                // Another scan of the content (not the one waited for)
                // may have made its verdict meanwhile.
                let key = engine.cache_key(&received.digest, Some(name.as_ref()));
                if let Some(hit) = engine.cache().peek(&key) {
                    return FileVerdict::known(&hit, &received.digest, false);
                }
                // The scan waited for failed or took too long: this copy
                // of the content is scanned on its own (or refused, if
                // another thread is still on it: see `Engine::refusal`).
                let slot = engine.reserve(&received.content).await;
                scan_received(slot, received, name, None).await
            }
            Judging::Refused(refusal) => {
                refused_verdict(engine, refusal, received.size, received.digest)
            }
        }
    }
}

/// The verdict on `size` bytes of content of `digest` that the engine
/// refuses unscanned: the failure `refusal` gives.
fn refused_verdict(engine: &Engine, refusal: Refusal, size: u64, digest: Digest) -> FileVerdict {
    FileVerdict::from_outcome(&ScanOutcome {
        digest: Some(digest),
        ..engine.refused(refusal, size)
    })
}

/// Lands a scan's outcome for the waiters of the flight it led, if any. A
/// failure lands nothing: they go on without it. Nor does a verdict made
/// with other signatures than the flight's (reloaded while the scan waited
/// for a thread): the scan judged the leading file's name, and the new
/// rules may look at names where the flight's did not.
fn land(flight: Option<Flight>, outcome: &ScanOutcome) {
    if let Some(flight) = flight {
        let made_for_it = flight.key().is_of(&outcome.rules_version);
        flight.land(outcome.to_cached().filter(|_| made_for_it));
    }
}

/// Scans received content under the digest the server computed, and
/// lands the flight it leads, if any. What the scan needs goes with the job,
/// not with this future: a caller that stops waiting (its client
/// cancelled) neither releases the content's memory share or spool file
/// while the job waits for a scan thread, nor fails the flight's waiters
/// while the scan they wait for goes on.
async fn scan_received(
    slot: ScanSlot,
    received: Received,
    name: String,
    flight: Option<Flight>,
) -> FileVerdict {
    let (job, guard) = received.into_job(name);
    let outcome = slot
        .scan(job, move |outcome| {
            drop(guard);
            land(flight, outcome);
        })
        .await;
    FileVerdict::from_outcome(&outcome)
}

/// `ScanFile`: one file, its chunks in order, the first naming it.
///
/// A call holds a share of the upload memory or a spool file until its
/// verdict, and calls have no session to limit them: calls open at once
/// are limited server-wide, and from one address (see [`ScanFileCalls`]).
/// A call takes its place with its first chunk, which must come within
/// [`FIRST_CHUNK_WAIT`] (calls that send nothing hold no place), and must
/// send the whole file within the idle timeout.
pub(super) async fn scan_file(
    state: &ServiceState,
    mut chunks: Streaming<FileChunk>,
    ends: Option<Ends>,
) -> Result<FileVerdict, Status> {
    let first = tokio::time::timeout(FIRST_CHUNK_WAIT, chunks.message())
        .await
        .map_err(|_| {
            let message = format!("no chunk within {FIRST_CHUNK_WAIT:?}; the call is cut off");
            Status::deadline_exceeded(message)
        })??;
    let _call = state.scan_file_calls.take(ends)?;
    let idle = state.idle_timeout;
    let cut_off =
        |_| Status::deadline_exceeded(format!("the file took over {idle:?}; the call is cut off"));
    let (received, name) = tokio::time::timeout(idle, receive_file(state, first, chunks))
        .await
        .map_err(cut_off)??;
    let engine = &state.engine;
    let judging = Judging::start(engine, &received, &name, Standing::Unannounced).await;
    let verdict = judging.verdict(engine, received, name.clone()).await;
    // No session: counted in the metrics, and logged, but for no VM.
    engine.metrics().verdict(&verdict);
    log_malware_found(
        &state.scan_file_malware_logs,
        None,
        Subject::Path(&name),
        &verdict,
    );
    Ok(verdict)
}

/// The `ScanFile` calls under way once their first chunk came: at most
/// `uploads.files_in_flight` for the whole server (calls have no session
/// to count their files in flight), and a quarter of those
/// ([`PEER_SHARE`]) from one address other than the SVM's own (see
/// [`PerAddress`]), so that one client stalling its calls cannot keep
/// every other client's out.
pub(super) struct ScanFileCalls {
    limit: usize,
    calls: Semaphore,
    per_address: Arc<PerAddress>,
}

/// A `ScanFile` call's place, given back when dropped.
pub(super) struct ScanFilePlace<'a> {
    _call: tokio::sync::SemaphorePermit<'a>,
    _address: Option<AddressPlace>,
}

impl ScanFileCalls {
    pub(super) fn new(limit: u32) -> Self {
        let limit = limit as usize;
        ScanFileCalls {
            limit,
            calls: Semaphore::new(limit),
            per_address: PerAddress::new((limit / PEER_SHARE).max(1)),
        }
    }

    /// The calls holding a place now.
    pub(super) fn open(&self) -> usize {
        self.limit - self.calls.available_permits()
    }

    /// A place for a call between `ends`, or why there is none.
    fn take(&self, ends: Option<Ends>) -> Result<ScanFilePlace<'_>, Status> {
        let address = match PerAddress::bound(ends) {
            Some(address) => Some(self.per_address.take(address).ok_or_else(|| {
                let share = self.per_address.max();
                Status::resource_exhausted(format!(
                    "more than {share} ScanFile calls at once from this address; wait for their verdicts, or send files on a Scan stream"
                ))
            })?),
            None => None,
        };
        let call = self.calls.try_acquire().map_err(|_| {
            Status::resource_exhausted(format!(
                "more than {} ScanFile calls at once; retry later, or send files on a Scan stream",
                self.limit
            ))
        })?;
        Ok(ScanFilePlace {
            _call: call,
            _address: address,
        })
    }
}

/// How long a `ScanFile` call may take to send its first chunk.
const FIRST_CHUNK_WAIT: Duration = Duration::from_secs(10);

/// Receives a `ScanFile` call's content from its `first` chunk (none: an
/// empty file) on, and the name the first chunk gives. The size and digest
/// the first chunk may give are checked as a Scan begin's are.
async fn receive_file(
    state: &ServiceState,
    first: Option<FileChunk>,
    mut chunks: Streaming<FileChunk>,
) -> Result<(Received, String), Status> {
    let (name, size, claimed) = match &first {
        Some(chunk) => (chunk.path.clone(), chunk.size, &chunk.blake3[..]),
        None => (String::new(), None, &[][..]),
    };
    check_path(&name)?;
    let claimed = parse_digest(claimed).map_err(Status::invalid_argument)?;
    if let Some(size) = size {
        // Refused for its size before it takes room (which it may not find).
        state.uploads.check_size(size).map_err(Status::from)?;
    }
    let mut upload = state
        .uploads
        .begin(None, claimed, None)
        .map_err(Status::from)?;
    if let Some(size) = size {
        upload.declare(size).map_err(Status::from)?;
    }
    let mut next = first;
    while let Some(chunk) = next {
        Counters::add(&state.counters.bytes_received, chunk.data.len() as u64);
        upload
            .push(chunk.offset, &chunk.data)
            .map_err(Status::from)?;
        next = chunks.message().await?;
    }
    let received = upload.finish().map_err(Status::from)?;
    Ok((received, name))
}

fn verdict_reply(verdict: FileVerdict) -> file_reply::Kind {
    file_reply::Kind::Verdict(verdict)
}

fn reply(file_id: u64, kind: file_reply::Kind) -> FileReply {
    FileReply {
        file_id,
        kind: Some(kind),
    }
}

fn file_error(file_id: u64, code: Code, message: &str) -> FileReply {
    reply(
        file_id,
        file_reply::Kind::Error(FileError {
            code: code as i32,
            message: message.to_owned(),
            ..FileError::default()
        }),
    )
}

fn upload_error(file_id: u64, err: &UploadError) -> FileReply {
    reply(file_id, file_reply::Kind::Error(err.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One address holds at most its share of the `ScanFile` calls; the
    /// SVM's own addresses (loopback, the listener's), and the others, are
    /// held to the server's limit alone.
    #[test]
    fn scan_file_calls_are_shared_among_addresses() {
        let calls = ScanFileCalls::new(8);
        let from = |remote: &str| {
            Some(Ends {
                local: "10.0.0.1:7405".parse().unwrap(),
                remote: remote.parse().unwrap(),
            })
        };
        let first = calls.take(from("10.0.0.9:1001")).unwrap();
        let _second = calls.take(from("10.0.0.9:1002")).unwrap();
        let refused = calls.take(from("10.0.0.9:1003")).err().unwrap();
        assert_eq!(refused.code(), Code::ResourceExhausted);
        assert!(
            refused.message().contains("from this address"),
            "{refused:?}"
        );
        let own: Vec<_> = ["127.0.0.1:1", "127.0.0.1:2", "[::1]:3", "10.0.0.1:4"]
            .iter()
            .map(|ends| calls.take(from(ends)).unwrap())
            .collect();
        let _other = calls.take(from("10.0.0.10:1001")).unwrap();
        assert_eq!(calls.open(), 7);
        let _last = calls.take(from("10.0.0.11:1001")).unwrap();
        let full = calls.take(from("10.0.0.12:1001")).err().unwrap();
        assert!(full.message().contains("more than 8"), "{full:?}");
        drop((first, own));
        assert_eq!(calls.open(), 3);
        assert!(calls.take(from("10.0.0.9:1004")).is_ok(), "given back");
    }
}
