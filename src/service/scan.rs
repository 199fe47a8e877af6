//! `Scan` and `ScanFile`: receiving files and answering with verdicts.
//!
//! A `Scan` stream is driven by one task that reads requests in order and
//! keeps the stream's open files. A file's scan runs in a task of its own,
//! so the stream goes on while the engine works; but before a complete file
//! is handed over, the reader waits for a place in the engine's queue. While
//! the queue is full the reader stops reading, and HTTP/2 flow control
//! holds the agent back: nothing is buffered without bound.
//!
//! Each begun file holds one of its session's in-flight places until its
//! final reply. When the stream ends, for whatever reason, its open files
//! are dropped: their memory is freed and their spool files deleted.
//!
//! Requests for the same content coalesce (see [`crate::cache::flight`]):
//! a hash-first begin whose content another request is uploading or
//! scanning waits for that verdict instead of asking for the content, and
//! received content whose digest is being scanned waits for that scan.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
};

use tokio::{
    sync::{OwnedSemaphorePermit, mpsc},
    time::Instant,
};
use tonic::{Code, Status, Streaming};

use super::{
    Counters, ServiceState, parse_digest, shut_down,
    upload::{Received, Upload, UploadError},
};
use crate::{
    cache::{
        CachedVerdict, Digest, Flight, Join,
        flight::{Landing, Subscriber, UPLOAD_WAIT, Waiter},
    },
    engine::{Engine, ScanJob, ScanOutcome, ScanSlot},
    proto::{
        ContentRequest, FileBegin, FileChunk, FileError, FileVerdict, ScanReply, ScanRequest,
        scan_reply, scan_request,
    },
    sessions::Session,
};

type Replies = mpsc::Sender<Result<ScanReply, Status>>;

/// A begun file of a Scan stream.
struct OpenFile {
    session: Arc<Session>,
    name: String,
    size: u64,
    /// The content received so far; `None` while the file waits for
    /// another request's verdict (nothing is reserved for content that may
    /// never be needed).
    upload: Option<Upload>,
    /// The flight this file leads: its agent was asked for the content,
    /// and requests for the same content wait for its verdict.
    flight: Option<Flight>,
    /// The wait this file is in, when another request has its content.
    wait: Option<Wait>,
    _in_flight: OwnedSemaphorePermit,
}

/// A hash-first begin waiting for another request's verdict.
struct Wait {
    /// Identifies the wait in the flight's message (a file id may be
    /// reused once its file is over; a tag never is).
    tag: u64,
    digest: Digest,
}

/// One Scan stream: its open files and where its replies go.
struct ScanStream {
    state: Arc<ServiceState>,
    open: HashMap<u64, OpenFile>,
    replies: Replies,
    /// Flights tell waiting files here how they ended; at most one message
    /// per waiting file, so the channel is bounded by the session's files
    /// in flight.
    landings: mpsc::UnboundedSender<(u64, Landing)>,
    /// Waiting files by tag, and their deadlines in order.
    waiting: HashMap<u64, u64>,
    deadlines: VecDeque<(Instant, u64)>,
    next_tag: u64,
}

/// Drives one Scan stream to its end.
pub(super) async fn run(
    state: Arc<ServiceState>,
    mut requests: Streaming<ScanRequest>,
    replies: Replies,
) {
    let (landings, mut landed) = mpsc::unbounded_channel();
    let mut shutdown = state.shutdown.clone();
    let idle_timeout = state.idle_timeout;
    let mut stream = ScanStream {
        state,
        open: HashMap::new(),
        replies,
        landings,
        waiting: HashMap::new(),
        deadlines: VecDeque::new(),
        next_tag: 0,
    };
    loop {
        let next_deadline = stream.deadlines.front().map(|&(deadline, _)| deadline);
        let request = tokio::select! {
            request = tokio::time::timeout(idle_timeout, requests.message()) => request,
            Some((tag, landing)) = landed.recv() => {
                let reply = stream.landed(tag, landing);
                if stream.send(reply).await.is_err() {
                    break;
                }
                continue;
            }
            () = sleep_until(next_deadline) => {
                let replies = stream.expire();
                let mut sent = Ok(());
                for reply in replies {
                    sent = sent.and(stream.send(Some(reply)).await);
                }
                if sent.is_err() {
                    break;
                }
                continue;
            }
            () = shut_down(&mut shutdown) => break,
        };
        let request = match request {
            Ok(Ok(Some(request))) => request,
            Ok(Ok(None)) => break,
            Ok(Err(status)) => {
                tracing::debug!(%status, "scan stream broken");
                break;
            }
            Err(_) => {
                let idle = Status::deadline_exceeded(format!(
                    "no request for {idle_timeout:?}; the stream is closed"
                ));
                let _ = stream.replies.send(Err(idle)).await;
                break;
            }
        };
        let Some(kind) = request.kind else { continue };
        let reply = match kind {
            scan_request::Kind::Begin(begin) => stream.begin(begin),
            scan_request::Kind::Chunk(chunk) => stream.chunk(chunk),
            scan_request::Kind::End(end) => stream.end(end.file_id).await,
            scan_request::Kind::Cancel(cancel) => stream
                .open
                .remove(&cancel.file_id)
                .map(|_| file_error(cancel.file_id, Code::Cancelled, "cancelled by the agent")),
        };
        if stream.send(reply).await.is_err() {
            break;
        }
    }
    // The open files are dropped with `stream`: unfinished uploads release
    // everything, and flights they led end without a verdict.
}

impl ScanStream {
    async fn send(&self, reply: Option<ScanReply>) -> Result<(), ()> {
        match reply {
            Some(reply) => self.replies.send(Ok(reply)).await.map_err(drop),
            None => Ok(()),
        }
    }

    /// Opens a file: answers at once from the cache when the agent gave a
    /// digest the server knows, waits when that content is under way for
    /// another request, and otherwise asks for the content (or, without a
    /// digest, expects it).
    fn begin(&mut self, begin: FileBegin) -> Option<ScanReply> {
        let id = begin.file_id;
        let fail = |code, message: String| Some(file_error(id, code, &message));
        if self.open.contains_key(&id) {
            return fail(
                Code::InvalidArgument,
                format!("file id {id} is already open on this stream"),
            );
        }
        let session = match self.state.session(&begin.session_id) {
            Ok(session) => session,
            Err(status) => return fail(status.code(), status.message().to_owned()),
        };
        session.touch();
        let claimed = match parse_digest(&begin.blake3) {
            Ok(claimed) => claimed,
            Err(message) => return fail(Code::InvalidArgument, message),
        };
        let engine = &self.state.engine;
        let key =
            claimed.map(|digest| (digest, engine.cache_key(&digest, Some(begin.path.as_ref()))));
        if let Some((digest, key)) = &key
            && let Some(hit) = engine.cache().get(key)
        {
            Counters::add(&self.state.counters.hash_hits, 1);
            session.record_file(begin.size, hit.verdict.detections().len());
            return Some(reply(
                id,
                verdict_reply(FileVerdict::known(&hit, digest, false)),
            ));
        }
        let Ok(in_flight) = Arc::clone(&session.files_in_flight).try_acquire_owned() else {
            let limit = self.state.uploads.config().files_in_flight;
            return fail(
                Code::ResourceExhausted,
                format!(
                    "more than {limit} files in flight on this session; wait for verdicts before beginning more"
                ),
            );
        };
        let mut file = OpenFile {
            session,
            name: begin.path,
            size: begin.size,
            upload: None,
            flight: None,
            wait: None,
            _in_flight: in_flight,
        };
        let reply = match key {
            Some((digest, key)) => {
                let tag = self.next_tag;
                let subscriber = Subscriber {
                    tag,
                    to: self.landings.clone(),
                };
                match engine.cache().flights().join_or_subscribe(key, subscriber) {
                    Some(flight) => {
                        file.flight = Some(flight);
                        Some(self.request_content(id))
                    }
                    None => {
                        self.next_tag += 1;
                        file.wait = Some(Wait { tag, digest });
                        self.waiting.insert(tag, id);
                        self.deadlines
                            .push_back((Instant::now() + UPLOAD_WAIT, tag));
                        None
                    }
                }
            }
            None => None,
        };
        if file.flight.is_some() || claimed.is_none() {
            match self.state.uploads.begin(Some(file.size), claimed) {
                Ok(upload) => file.upload = Some(upload),
                Err(err) => return fail(err.code(), err.to_string()),
            }
        }
        self.open.insert(id, file);
        reply
    }

    /// A waiting file's flight landed: the verdict, or, when it failed, a
    /// request for this file's own content.
    fn landed(&mut self, tag: u64, landing: Landing) -> Option<ScanReply> {
        let id = self.waiting.remove(&tag)?;
        let file = self.open.get_mut(&id)?;
        let wait = file.wait.take_if(|wait| wait.tag == tag)?;
        let Some(landed) = landing else {
            return Some(self.own_content(id, wait.digest));
        };
        let file = self.open.remove(&id)?;
        file.session
            .record_file(file.size, landed.verdict.detections().len());
        Some(reply(
            id,
            verdict_reply(FileVerdict::known(&landed, &wait.digest, true)),
        ))
    }

    /// Waits past their deadline end: those files' own content is asked
    /// for (whoever was to send it is too slow).
    fn expire(&mut self) -> Vec<ScanReply> {
        let now = Instant::now();
        let mut replies = Vec::new();
        while let Some(&(deadline, tag)) = self.deadlines.front() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_front();
            if let Some(reply) = self.landed(tag, None) {
                replies.push(reply);
            }
        }
        replies
    }

    /// Asks for a waiting file's own content after all; it is received and
    /// scanned like any other (coalescing with scans under way, if any).
    fn own_content(&mut self, id: u64, digest: Digest) -> ScanReply {
        let file = self.open.get_mut(&id).expect("the file is open");
        match self.state.uploads.begin(Some(file.size), Some(digest)) {
            Ok(upload) => {
                file.upload = Some(upload);
                self.request_content(id)
            }
            Err(err) => {
                self.open.remove(&id);
                upload_error(id, &err)
            }
        }
    }

    fn request_content(&self, id: u64) -> ScanReply {
        Counters::add(&self.state.counters.content_requests, 1);
        reply(id, scan_reply::Kind::SendContent(ContentRequest {}))
    }

    fn chunk(&mut self, chunk: FileChunk) -> Option<ScanReply> {
        let id = chunk.file_id;
        let Some(upload) = self.open.get_mut(&id).and_then(|f| f.upload.as_mut()) else {
            self.open.remove(&id);
            return Some(file_error(
                id,
                Code::InvalidArgument,
                &format!(
                    "chunk for file id {id}, which is not open or whose content was not asked for"
                ),
            ));
        };
        Counters::add(&self.state.counters.bytes_received, chunk.data.len() as u64);
        match upload.push(chunk.offset, &chunk.data) {
            Ok(()) => None,
            Err(err) => {
                self.open.remove(&id);
                Some(upload_error(id, &err))
            }
        }
    }

    /// Closes a file: verifies it and has it judged. A scan waits for a
    /// place in the engine's queue here, in the reader: that is the
    /// backpressure. The scan itself runs in a task that sends the verdict.
    async fn end(&mut self, id: u64) -> Option<ScanReply> {
        let Some(file) = self.open.remove(&id) else {
            return Some(file_error(
                id,
                Code::InvalidArgument,
                &format!("end of file id {id}, which is not open"),
            ));
        };
        let OpenFile {
            session,
            name,
            upload,
            flight,
            _in_flight,
            ..
        } = file;
        let Some(upload) = upload else {
            return Some(file_error(
                id,
                Code::InvalidArgument,
                &format!("end of file id {id}, whose content was not asked for"),
            ));
        };
        let received = match upload.finish() {
            Ok(received) => received,
            Err(err) => return Some(upload_error(id, &err)),
        };
        let size = received.size;
        let engine = Arc::clone(&self.state.engine);
        let judging = match Plan::new(&engine, &received.digest, &name, flight) {
            Plan::Known(hit) => {
                session.record_file(size, hit.verdict.detections().len());
                let verdict = FileVerdict::known(&hit, &received.digest, false);
                return Some(reply(id, verdict_reply(verdict)));
            }
            Plan::Scan(flight) => Judging::Lead(engine.reserve().await, flight),
            Plan::Wait(waiter) => Judging::Follow(waiter),
        };
        let replies = self.replies.clone();
        tokio::spawn(async move {
            let verdict = judging.verdict(&engine, received, name).await;
            session.record_file(size, verdict.detection_count());
            let _ = replies.send(Ok(reply(id, verdict_reply(verdict)))).await;
            drop(_in_flight);
        });
        None
    }
}

/// How received content gets its verdict.
enum Plan {
    /// The cache has it.
    Known(Arc<CachedVerdict>),
    /// Scan it, leading the flight for its content.
    Scan(Flight),
    /// Another request is scanning the same content: wait for that.
    Wait(Waiter),
}

impl Plan {
    /// The plan for content with `digest`; `led` is the flight the file
    /// already leads (it was asked for by a hash-first begin).
    fn new(engine: &Engine, digest: &Digest, name: &str, led: Option<Flight>) -> Plan {
        let key = engine.cache_key(digest, Some(name.as_ref()));
        if let Some(flight) = led.filter(|flight| *flight.key() == key) {
            return Plan::Scan(flight);
        }
        if let Some(hit) = engine.cache().get(&key) {
            return Plan::Known(hit);
        }
        match engine.cache().flights().join(key) {
            Join::Lead(flight) => Plan::Scan(flight),
            Join::Wait(waiter) => Plan::Wait(waiter),
        }
    }
}

/// A verdict under way: a scan with its place in the queue, or a wait.
enum Judging {
    Lead(ScanSlot, Flight),
    Follow(Waiter),
}

impl Judging {
    async fn verdict(self, engine: &Arc<Engine>, received: Received, name: String) -> FileVerdict {
        match self {
            Judging::Lead(slot, flight) => {
                let outcome = scan_received(slot, received, name).await;
                flight.land(outcome.to_cached());
                FileVerdict::from_outcome(&outcome)
            }
            Judging::Follow(waiter) => {
                let deadline = tokio::time::Instant::now() + UPLOAD_WAIT;
                if let Some(landed) = waiter.verdict(deadline).await {
                    return FileVerdict::known(&landed, &received.digest, true);
                }
                // The scan waited for failed or took too long: this copy
                // of the content is scanned on its own.
                let outcome = scan_received(engine.reserve().await, received, name).await;
                FileVerdict::from_outcome(&outcome)
            }
        }
    }
}

/// Scans received content under the digest the server computed.
async fn scan_received(slot: ScanSlot, received: Received, name: String) -> ScanOutcome {
    let (content, digest, guard) = received.into_parts();
    let name = Some(name).filter(|n| !n.is_empty());
    let outcome = slot
        .scan(ScanJob {
            content,
            name,
            digest: Some(digest),
        })
        .await;
    drop(guard);
    outcome
}

/// `ScanFile`: one file, its chunks in order, the first naming it.
pub(super) async fn scan_file(
    state: &ServiceState,
    mut chunks: Streaming<FileChunk>,
) -> Result<FileVerdict, Status> {
    let started = Instant::now();
    let mut upload = state.uploads.begin(None, None).map_err(Status::from)?;
    let mut name = None;
    while let Some(chunk) = chunks.message().await? {
        name.get_or_insert(chunk.path);
        Counters::add(&state.counters.bytes_received, chunk.data.len() as u64);
        upload
            .push(chunk.offset, &chunk.data)
            .map_err(Status::from)?;
    }
    let received = upload.finish().map_err(Status::from)?;
    let name = name.unwrap_or_default();
    let engine = &state.engine;
    let judging = match Plan::new(engine, &received.digest, &name, None) {
        Plan::Known(hit) => return Ok(FileVerdict::known(&hit, &received.digest, false)),
        Plan::Scan(flight) => Judging::Lead(engine.reserve().await, flight),
        Plan::Wait(waiter) => Judging::Follow(waiter),
    };
    let verdict = judging.verdict(engine, received, name).await;
    tracing::debug!(elapsed = ?started.elapsed(), "ScanFile");
    Ok(verdict)
}

/// Resolves at `deadline`, or never without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

fn verdict_reply(verdict: FileVerdict) -> scan_reply::Kind {
    scan_reply::Kind::Verdict(verdict)
}

fn reply(file_id: u64, kind: scan_reply::Kind) -> ScanReply {
    ScanReply {
        file_id,
        kind: Some(kind),
    }
}

fn file_error(file_id: u64, code: Code, message: &str) -> ScanReply {
    reply(
        file_id,
        scan_reply::Kind::Error(FileError {
            code: code as i32,
            message: message.to_owned(),
        }),
    )
}

fn upload_error(file_id: u64, err: &UploadError) -> ScanReply {
    file_error(file_id, err.code(), &err.to_string())
}
