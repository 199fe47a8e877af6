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

use std::{collections::HashMap, sync::Arc, time::Instant};

use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tonic::{Code, Status, Streaming};

use super::{
    Counters, ServiceState, parse_digest, shut_down,
    upload::{Received, Upload, UploadError},
};
use crate::{
    engine::ScanJob,
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
    upload: Upload,
    _in_flight: OwnedSemaphorePermit,
}

/// Drives one Scan stream to its end.
pub(super) async fn run(
    state: Arc<ServiceState>,
    mut requests: Streaming<ScanRequest>,
    replies: Replies,
) {
    let mut open: HashMap<u64, OpenFile> = HashMap::new();
    let mut shutdown = state.shutdown.clone();
    loop {
        let request = tokio::select! {
            request = tokio::time::timeout(state.idle_timeout, requests.message()) => request,
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
                    "no request for {:?}; the stream is closed",
                    state.idle_timeout
                ));
                let _ = replies.send(Err(idle)).await;
                break;
            }
        };
        let Some(kind) = request.kind else { continue };
        let reply = match kind {
            scan_request::Kind::Begin(begin) => begin_file(&state, &mut open, begin),
            scan_request::Kind::Chunk(chunk) => add_chunk(&state, &mut open, chunk),
            scan_request::Kind::End(end) => {
                end_file(&state, &mut open, end.file_id, &replies).await
            }
            scan_request::Kind::Cancel(cancel) => open
                .remove(&cancel.file_id)
                .map(|_| file_error(cancel.file_id, Code::Cancelled, "cancelled by the agent")),
        };
        if let Some(reply) = reply
            && replies.send(Ok(reply)).await.is_err()
        {
            break;
        }
    }
    // `open` is dropped here: unfinished uploads release everything.
}

/// Opens a file: answers at once from the cache when the agent gave a
/// digest the server knows, otherwise asks for the content (or, without a
/// digest, expects it).
fn begin_file(
    state: &ServiceState,
    open: &mut HashMap<u64, OpenFile>,
    begin: FileBegin,
) -> Option<ScanReply> {
    let id = begin.file_id;
    let fail = |code, message: String| Some(file_error(id, code, &message));
    if open.contains_key(&id) {
        return fail(
            Code::InvalidArgument,
            format!("file id {id} is already open on this stream"),
        );
    }
    let session = match state.session(&begin.session_id) {
        Ok(session) => session,
        Err(status) => return fail(status.code(), status.message().to_owned()),
    };
    session.touch();
    let claimed = match parse_digest(&begin.blake3) {
        Ok(claimed) => claimed,
        Err(message) => return fail(Code::InvalidArgument, message),
    };
    if let Some(digest) = claimed
        && let Some(hit) = state.engine.cached(&digest, Some(begin.path.as_ref()))
    {
        Counters::add(&state.counters.hash_hits, 1);
        session.record_file(begin.size, hit.verdict.detections().len());
        let verdict = FileVerdict::cached(&hit.verdict, &digest, &hit.rules_version);
        return Some(reply(id, scan_reply::Kind::Verdict(verdict)));
    }
    let Ok(in_flight) = Arc::clone(&session.files_in_flight).try_acquire_owned() else {
        let limit = state.uploads.config().files_in_flight;
        return fail(
            Code::ResourceExhausted,
            format!(
                "more than {limit} files in flight on this session; wait for verdicts before beginning more"
            ),
        );
    };
    let upload = match state.uploads.begin(Some(begin.size), claimed) {
        Ok(upload) => upload,
        Err(err) => return fail(err.code(), err.to_string()),
    };
    open.insert(
        id,
        OpenFile {
            session,
            name: begin.path,
            upload,
            _in_flight: in_flight,
        },
    );
    claimed.map(|_| {
        Counters::add(&state.counters.content_requests, 1);
        reply(id, scan_reply::Kind::SendContent(ContentRequest {}))
    })
}

fn add_chunk(
    state: &ServiceState,
    open: &mut HashMap<u64, OpenFile>,
    chunk: FileChunk,
) -> Option<ScanReply> {
    let id = chunk.file_id;
    let Some(file) = open.get_mut(&id) else {
        return Some(file_error(
            id,
            Code::InvalidArgument,
            &format!("chunk for file id {id}, which is not open"),
        ));
    };
    Counters::add(&state.counters.bytes_received, chunk.data.len() as u64);
    match file.upload.push(chunk.offset, &chunk.data) {
        Ok(()) => None,
        Err(err) => {
            open.remove(&id);
            Some(upload_error(id, &err))
        }
    }
}

/// Closes a file: verifies it, waits for a place in the engine's queue, and
/// scans it in a task of its own that sends the verdict.
async fn end_file(
    state: &Arc<ServiceState>,
    open: &mut HashMap<u64, OpenFile>,
    id: u64,
    replies: &Replies,
) -> Option<ScanReply> {
    let Some(file) = open.remove(&id) else {
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
        _in_flight,
    } = file;
    let received = match upload.finish() {
        Ok(received) => received,
        Err(err) => return Some(upload_error(id, &err)),
    };
    let slot = state.engine.reserve().await;
    let replies = replies.clone();
    tokio::spawn(async move {
        let verdict = scan_received(slot, received, name, &session).await;
        let _ = replies
            .send(Ok(reply(id, scan_reply::Kind::Verdict(verdict))))
            .await;
        drop(_in_flight);
    });
    None
}

/// Scans received content under the digest the server computed.
async fn scan_received(
    slot: crate::engine::ScanSlot,
    received: Received,
    name: String,
    session: &Session,
) -> FileVerdict {
    let size = received.size;
    let (content, digest, guard) = received.into_parts();
    let job = ScanJob {
        content,
        name: Some(name),
        digest: Some(digest),
    };
    let outcome = slot.scan(job).await;
    drop(guard);
    session.record_file(size, outcome.verdict.detections().len());
    FileVerdict::from_outcome(&outcome)
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
    let (content, digest, guard) = received.into_parts();
    let name = name.filter(|n| !n.is_empty());
    let outcome = state
        .engine
        .submit(ScanJob {
            content,
            name,
            digest: Some(digest),
        })
        .await;
    drop(guard);
    tracing::debug!(elapsed = ?started.elapsed(), verdict = outcome.verdict.kind(), "ScanFile");
    Ok(FileVerdict::from_outcome(&outcome))
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
