//! The Light Agent client: a session with a Protection Server, and scans of
//! local files through it, hash first.
//!
//! [`Agent::connect`] opens the session (Hello, then a task that sends
//! heartbeats for as long as the agent lives). [`Agent::scan`] scans files
//! on one `Scan` stream with many files in flight: each file is hashed
//! locally and announced with its digest; its content is streamed only when
//! the server asks for it.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use std::io::Read;

use bytes::Bytes;
use slab::Slab;
use tokio::{
    sync::{Semaphore, mpsc},
    task::JoinHandle,
};
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::{
    engine::ScanOutcome,
    proto::{
        AgentMessage, FileBegin, FileCancel, FileChunk, FileEnd, FileRequest, FileVerdict,
        Heartbeat, Hello, LatestVersion, LookupRequest, PROTOCOL_VERSION, RejectReason, ScanReply,
        ScanRequest, ServerMessage, TaskEvent, TaskKind, TaskState, Welcome, agent_message,
        file_reply, file_request, protection_server_client::ProtectionServerClient, server_message,
    },
    verdict::{FailReason, Verdict},
};

/// Largest gRPC message exchanged.
const MAX_MESSAGE_SIZE: usize = 16 << 20;

/// Chunks read ahead of the stream: enough to keep it busy, few enough
/// that the client's memory stays small (8 chunks of the preferred size).
const CONTENT_QUEUE: usize = 8;

/// The most begins sent in one message. Begins ready together (files
/// prepared beforehand, a server quick to answer) go out together: fewer
/// messages mean fewer wake-ups and socket writes on both sides.
const MAX_BEGINS: usize = 256;

/// Errors of the client as a whole (a single file's failure is a verdict).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("the server answered {}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    #[error("the server rejected the session ({reason:?}): {message}")]
    Rejected {
        reason: RejectReason,
        message: String,
    },
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// TLS settings towards the server.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// CA certificate (PEM) the server's certificate must chain to.
    pub ca: Option<PathBuf>,
    /// Client certificate and key (PEM), for mutual TLS.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// The name to verify the server's certificate against.
    pub domain: Option<String>,
}

/// Who the agent is and how it reaches the server.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// `http://host:port`, or `https://host:port` with [`ClientTls`].
    pub server: String,
    pub tls: Option<ClientTls>,
    pub agent_id: String,
    pub vm_id: String,
    pub vm_name: String,
    pub os: String,
    pub connection_tags: Vec<String>,
    pub require_encryption: bool,
}

impl AgentOptions {
    /// Options for this host: the VM id is the machine id, the VM name the
    /// host name.
    pub fn for_host(server: impl Into<String>) -> Self {
        let read = |path: &str| {
            std::fs::read_to_string(path)
                .ok()
                .map(|s| s.trim().to_owned())
        };
        let host = read("/etc/hostname")
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into());
        let machine = read("/etc/machine-id")
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| host.clone());
        AgentOptions {
            server: server.into(),
            tls: None,
            agent_id: format!("lightagent-{host}"),
            vm_id: machine,
            vm_name: host,
            os: std::env::consts::OS.to_owned(),
            connection_tags: Vec::new(),
            require_encryption: false,
        }
    }
}

/// A file to scan through the server.
#[derive(Debug, Clone)]
pub enum FileSource {
    /// A local file: hashed just before it is announced, read again if the
    /// server asks for its content.
    Path(PathBuf),
    /// Content read and hashed beforehand, as an agent with its own digest
    /// cache has it (`lightagent bench`).
    Prepared(Arc<PreparedFile>),
}

impl FileSource {
    fn path(&self) -> &Path {
        match self {
            FileSource::Path(path) => path,
            FileSource::Prepared(file) => &file.path,
        }
    }
}

impl From<PathBuf> for FileSource {
    fn from(path: PathBuf) -> Self {
        FileSource::Path(path)
    }
}

/// A file's content with its digest, in memory.
#[derive(Debug)]
pub struct PreparedFile {
    pub path: PathBuf,
    pub content: Bytes,
    pub digest: blake3::Hash,
}

impl PreparedFile {
    /// Reads and hashes the file at `path`.
    pub fn read(path: PathBuf) -> std::io::Result<PreparedFile> {
        let content = Bytes::from(std::fs::read(&path)?);
        let digest = blake3::hash(&content);
        Ok(PreparedFile {
            path,
            content,
            digest,
        })
    }
}

/// An open session with a Protection Server.
pub struct Agent {
    client: ProtectionServerClient<Channel>,
    welcome: Welcome,
    to_server: mpsc::Sender<AgentMessage>,
    session: JoinHandle<()>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.session.abort();
    }
}

impl Agent {
    /// Connects and opens a session.
    pub async fn connect(options: &AgentOptions) -> Result<Agent, ClientError> {
        let mut endpoint = Endpoint::from_shared(options.server.clone())?
            .tcp_nodelay(true)
            .initial_stream_window_size(4 << 20)
            .initial_connection_window_size(4 << 20);
        if let Some(tls) = &options.tls {
            endpoint = endpoint.tls_config(client_tls(tls)?)?;
        }
        let mut client = ProtectionServerClient::new(endpoint.connect().await?)
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE);
        let (to_server, outbox) = mpsc::channel(16);
        let hello = agent_message::Kind::Hello(Hello {
            agent_id: options.agent_id.clone(),
            vm_id: options.vm_id.clone(),
            vm_name: options.vm_name.clone(),
            os: options.os.clone(),
            agent_version: crate::VERSION.to_owned(),
            protocol_version: PROTOCOL_VERSION,
            connection_tags: options.connection_tags.clone(),
            require_encryption: options.require_encryption,
        });
        let _ = to_server.send(AgentMessage { kind: Some(hello) }).await;
        let mut incoming = client
            .connect(ReceiverStream::new(outbox))
            .await?
            .into_inner();
        let welcome = match incoming.message().await?.and_then(|m| m.kind) {
            Some(server_message::Kind::Welcome(welcome)) => welcome,
            Some(server_message::Kind::Rejection(rejection)) => {
                return Err(ClientError::Rejected {
                    reason: rejection.reason(),
                    message: rejection.message,
                });
            }
            other => {
                return Err(ClientError::Protocol(format!(
                    "expected a Welcome, got {other:?}"
                )));
            }
        };
        let interval = Duration::from_millis(welcome.heartbeat_interval_ms.max(100) as u64);
        let heartbeats = to_server.clone();
        let session = tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            let mut sequence = 0;
            loop {
                tokio::select! {
                    _ = ticker.tick() => {
                        sequence += 1;
                        let beat = agent_message::Kind::Heartbeat(Heartbeat { sequence });
                        if heartbeats.send(AgentMessage { kind: Some(beat) }).await.is_err() {
                            return;
                        }
                    }
                    message = incoming.message() => match message {
                        Ok(Some(ServerMessage { kind: Some(server_message::Kind::RestartSession(restart)) })) => {
                            tracing::warn!("the server asks this agent to restart its session: {}", restart.reason);
                        }
                        Ok(Some(_)) => {}
                        Ok(None) | Err(_) => return,
                    }
                }
            }
        });
        Ok(Agent {
            client,
            welcome,
            to_server,
            session,
        })
    }

    /// The server's Welcome: session id, versions, limits.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// Reports a scan task's start or end to the server.
    pub async fn report_task(
        &self,
        task_id: &str,
        kind: TaskKind,
        state: TaskState,
        detections: u32,
    ) {
        let event = agent_message::Kind::Task(TaskEvent {
            task_id: task_id.to_owned(),
            kind: kind as i32,
            state: state as i32,
            detections,
        });
        let _ = self
            .to_server
            .send(AgentMessage { kind: Some(event) })
            .await;
    }

    /// Verdicts the server knows for `digests` (None: unknown), complete
    /// with digest and signatures version.
    pub async fn lookup(
        &self,
        digests: &[blake3::Hash],
    ) -> Result<Vec<Option<FileVerdict>>, ClientError> {
        let request = LookupRequest {
            session_id: self.welcome.session_id.clone(),
            digests: digests
                .iter()
                .map(|d| Bytes::copy_from_slice(d.as_bytes()))
                .collect(),
        };
        let reply = self.client.clone().lookup(request).await?.into_inner();
        let version = reply.signatures_version;
        // Each verdict gets the digest and version the reply leaves out.
        let complete = |(result, digest): (crate::proto::LookupResult, &blake3::Hash)| {
            result.verdict.map(|mut verdict| {
                verdict.blake3 = Bytes::copy_from_slice(digest.as_bytes());
                verdict.signatures_version.clone_from(&version);
                verdict
            })
        };
        Ok(reply
            .results
            .into_iter()
            .zip(digests)
            .map(complete)
            .collect())
    }

    /// Scans `files` through the server, many in flight on one stream, and
    /// hands each result to `on_result` (whether it came from the cache is
    /// in the outcome).
    pub async fn scan<F>(&self, files: Vec<FileSource>, on_result: F) -> Result<(), ClientError>
    where
        F: Fn(&Path, ScanOutcome) + Send + Sync + 'static,
    {
        let limits = self.welcome.limits.unwrap_or_default();
        let in_flight = Window::new(limits.max_files_in_flight.clamp(1, 1024) as usize);
        let places = Arc::clone(&in_flight.places);
        let chunk_size = limits.preferred_chunk_size.clamp(4 << 10, 4 << 20) as usize;
        // Begins and content wait in queues of their own, merged onto the
        // stream: a begin never queues behind megabytes of another file's
        // content, so the server's requests for content keep coming while
        // content goes out.
        let (requests, begins) = mpsc::channel(256);
        let (content_requests, chunks) = mpsc::channel(CONTENT_QUEUE);
        let outbox = ReceiverStream::new(begins).merge(ReceiverStream::new(chunks));
        let mut replies = self.client.clone().scan(outbox).await?.into_inner();
        let pending: Pending = Arc::default();
        let on_result = Arc::new(on_result);
        // Content goes out one file after the other, not interleaved, so
        // that files complete (and their scans start) at a steady pace.
        let (content_tx, content_rx) = mpsc::unbounded_channel();
        let failed = Arc::new(LastFailed::default());
        let failed_for_sender = Arc::clone(&failed);
        let sender = tokio::task::spawn_blocking(move || {
            send_content(content_rx, content_requests, &failed_for_sender, chunk_size)
        });

        let mut producer = AbortOnDrop(tokio::spawn(announce(
            files,
            self.welcome.session_id.clone(),
            in_flight,
            Arc::clone(&pending),
            requests.clone(),
            Arc::clone(&on_result),
        )));
        let mut produced = false;
        let mut version = LatestVersion::default();
        loop {
            if produced && pending.lock().expect("pending").is_empty() {
                break;
            }
            let message = tokio::select! {
                message = replies.message() => message?.ok_or_else(|| {
                    ClientError::Protocol("the server ended the stream with files unanswered".into())
                })?,
                result = &mut producer.0, if !produced => {
                    produced = true;
                    result.map_err(|e| ClientError::Protocol(e.to_string()))??;
                    continue;
                }
            };
            let over = answered(
                message,
                &pending,
                &content_tx,
                &failed,
                &mut version,
                on_result.as_ref(),
            );
            places.add_permits(over);
        }
        drop(content_tx);
        let _ = sender.await;
        Ok(())
    }
}

/// Takes the replies of one message: a file asked for goes to the content
/// sender, a file answered to `on_result`, a file failed to `failed`.
/// Returns how many files are over (their places in flight are free again).
/// `on_result` is called once the pending files are unlocked: it may take
/// its time (printing, say), and the content sender needs them meanwhile.
fn answered<F>(
    message: ScanReply,
    pending: &Pending,
    content: &mpsc::UnboundedSender<(u64, FileSource)>,
    failed: &LastFailed,
    version: &mut LatestVersion,
    on_result: &F,
) -> usize
where
    F: Fn(&Path, ScanOutcome),
{
    let mut over = Vec::with_capacity(message.replies.len());
    let mut files = pending.lock().expect("pending");
    for reply in message.replies {
        let id = reply.file_id;
        let answer = match reply.kind {
            Some(file_reply::Kind::SendContent(_)) => {
                if let Some(file) = files.get(id) {
                    let _ = content.send((id, file.source.clone()));
                }
                continue;
            }
            Some(file_reply::Kind::Verdict(verdict)) => Ok(verdict),
            Some(file_reply::Kind::Error(error)) => {
                failed.0.store(id, Ordering::Relaxed);
                Err(Verdict::failed(FailReason::Engine, error.message))
            }
            None => continue,
        };
        over.extend(files.remove(id).map(|file| (file, answer)));
    }
    drop(files);
    let count = over.len();
    for (file, answer) in over {
        let outcome = match answer {
            Ok(verdict) => verdict.to_outcome(file.size, file.started.elapsed(), version),
            Err(verdict) => failed_outcome(verdict, file.size, file.started),
        };
        on_result(file.source.path(), outcome);
    }
    count
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

/// The id of the file the server failed last. Content goes out one file
/// after the other, so the sender checks the file it is sending against
/// this alone, with no lock per chunk: a file the server has already
/// failed (it grew, say) gets no more of its content.
struct LastFailed(AtomicU64);

impl Default for LastFailed {
    fn default() -> Self {
        LastFailed(AtomicU64::new(u64::MAX))
    }
}

/// Files announced and not yet answered. A file's id is made of its place
/// here (the low 32 bits: a file is found by indexing, not hashing) and
/// the number of files begun before it: ids never repeat on a stream, so a
/// late reply about a file that is over (the server's error for a chunk
/// sent after it failed the file) is never taken for another file's.
#[derive(Default)]
struct PendingFiles {
    /// Each file with its id.
    files: Slab<(u64, PendingFile)>,
    begun: u64,
}

struct PendingFile {
    source: FileSource,
    size: u64,
    started: Instant,
}

impl PendingFiles {
    /// Adds `file`, and returns its id.
    fn insert(&mut self, file: PendingFile) -> u64 {
        let place = self.files.vacant_entry();
        let id = self.begun << 32 | place.key() as u64;
        self.begun += 1;
        place.insert((id, file));
        id
    }

    fn get(&self, id: u64) -> Option<&PendingFile> {
        match self.files.get(Self::place(id)) {
            Some((known, file)) if *known == id => Some(file),
            _ => None,
        }
    }

    fn remove(&mut self, id: u64) -> Option<PendingFile> {
        self.get(id)?;
        Some(self.files.remove(Self::place(id)).1)
    }

    fn place(id: u64) -> usize {
        (id & u64::from(u32::MAX)) as usize
    }

    fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

/// Hashes each file (unless it was prepared) and announces it with a
/// FileBegin, keeping at most the server's limit of files in flight.
/// Begins go out as soon as the announcer would otherwise wait (for a
/// place in flight, or to hash the next file), together with those ready
/// before them.
async fn announce<F>(
    files: Vec<FileSource>,
    session_id: String,
    mut in_flight: Window,
    pending: Pending,
    requests: mpsc::Sender<ScanRequest>,
    on_result: Arc<F>,
) -> Result<(), ClientError>
where
    F: Fn(&Path, ScanOutcome) + Send + Sync + 'static,
{
    let mut ready = Announced::default();
    let count = files.len();
    for (index, source) in files.into_iter().enumerate() {
        if !in_flight.try_take() {
            ready.send(&pending, &requests).await?;
            in_flight.take(count - index).await;
        }
        let started = Instant::now();
        let hashed = match &source {
            FileSource::Prepared(file) => Ok((file.content.len() as u64, file.digest)),
            FileSource::Path(path) => {
                ready.send(&pending, &requests).await?;
                let path = path.clone();
                tokio::task::spawn_blocking(move || hash_file(&path))
                    .await
                    .map_err(|e| ClientError::Protocol(e.to_string()))?
            }
        };
        let (size, digest) = match hashed {
            Ok(hashed) => hashed,
            Err(err) => {
                in_flight.put_back();
                let verdict = Verdict::failed(FailReason::Io, err.to_string());
                on_result(source.path(), failed_outcome(verdict, 0, started));
                continue;
            }
        };
        let begin = FileBegin {
            file_id: 0,
            session_id: session_id.clone(),
            path: source.path().to_string_lossy().into_owned(),
            size,
            blake3: Bytes::copy_from_slice(digest.as_bytes()),
        };
        let file = PendingFile {
            source,
            size,
            started,
        };
        ready.files.push((begin, file));
        if ready.files.len() == MAX_BEGINS {
            ready.send(&pending, &requests).await?;
        }
    }
    ready.send(&pending, &requests).await
}

/// The server's limit of files in flight, as places. The announcer takes
/// a place for each file it announces; the scan gives places back as
/// files are answered, for a whole reply message at once. Once all are
/// taken, they are taken back a group at a time (three quarters of the
/// limit): for files hashed beforehand (`lightagent bench`), verdicts
/// coming in a few at a time then make one message of begins per group,
/// not one per reply. Each message costs a socket write and a wake-up on
/// both ends, which a storm of many agents multiplies: with a quarter of
/// the limit, a 50-agent storm wrote a quarter more messages. (A file
/// hashed just before its begin sends the begins ready before it first:
/// its hashing takes longer than a message.)
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

    /// Puts back a place taken for a file that was not announced.
    fn put_back(&mut self) {
        self.spare += 1;
    }
}

/// Begins ready to go out, with their files.
#[derive(Default)]
struct Announced {
    files: Vec<(FileBegin, PendingFile)>,
}

impl Announced {
    /// Sends the begins in one message, their files pending first (the
    /// answers may come at once), each begin with its file's id.
    async fn send(
        &mut self,
        pending: &Pending,
        requests: &mpsc::Sender<ScanRequest>,
    ) -> Result<(), ClientError> {
        if self.files.is_empty() {
            return Ok(());
        }
        let message = {
            let mut pending = pending.lock().expect("pending");
            let begins = self.files.drain(..).map(|(mut begin, file)| {
                begin.file_id = pending.insert(file);
                file_request::Kind::Begin(begin).into()
            });
            ScanRequest {
                requests: begins.collect(),
            }
        };
        requests
            .send(message)
            .await
            .map_err(|_| ClientError::Protocol("the scan stream closed".into()))
    }
}

/// Streams the content of each file the server asks for, in chunks, then
/// its end; on a thread of its own, as reading files blocks.
fn send_content(
    mut files: mpsc::UnboundedReceiver<(u64, FileSource)>,
    requests: mpsc::Sender<ScanRequest>,
    failed: &LastFailed,
    chunk_size: usize,
) {
    while let Some((id, source)) = files.blocking_recv() {
        let sent = match &source {
            FileSource::Prepared(file) => {
                let content = &file.content;
                let chunks = (0..content.len())
                    .step_by(chunk_size)
                    .map(|start| Ok(content.slice(start..content.len().min(start + chunk_size))));
                send_file(id, chunks, &requests, failed)
            }
            FileSource::Path(path) => match std::fs::File::open(path) {
                Ok(file) => {
                    let chunks = FileChunks { file, chunk_size };
                    send_file(id, chunks, &requests, failed)
                }
                Err(_) => {
                    let cancel = file_request::Kind::Cancel(FileCancel { file_id: id });
                    requests.blocking_send(cancel.into()).map_err(drop)
                }
            },
        };
        if sent.is_err() {
            return;
        }
    }
}

/// Sends a file's chunks, then its end, in the message of its last chunk.
/// A read error ends the content early: the server sees fewer bytes than
/// announced and fails the file. A file the server has already failed
/// gets no more of its content.
fn send_file(
    id: u64,
    chunks: impl Iterator<Item = std::io::Result<Bytes>>,
    requests: &mpsc::Sender<ScanRequest>,
    failed: &LastFailed,
) -> Result<(), ()> {
    let mut offset = 0u64;
    let mut held = None;
    for data in chunks.map_while(Result::ok) {
        if failed.0.load(Ordering::Relaxed) == id {
            return Ok(());
        }
        let length = data.len() as u64;
        let chunk = FileChunk {
            file_id: id,
            offset,
            data,
            path: String::new(),
        };
        offset += length;
        if let Some(previous) = held.replace(file_request::Kind::Chunk(chunk)) {
            requests.blocking_send(previous.into()).map_err(drop)?;
        }
    }
    let end = file_request::Kind::End(FileEnd { file_id: id });
    let message = ScanRequest {
        requests: held
            .into_iter()
            .chain([end])
            .map(FileRequest::from)
            .collect(),
    };
    requests.blocking_send(message).map_err(drop)
}

/// A file read in chunks, each in a buffer of its own, which the stream
/// frees once it has sent it. A read fills the buffer's spare capacity
/// directly: nothing is zeroed first.
struct FileChunks {
    file: std::fs::File,
    chunk_size: usize,
}

impl Iterator for FileChunks {
    type Item = std::io::Result<Bytes>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut chunk = Vec::with_capacity(self.chunk_size);
        let limit = self.chunk_size as u64;
        match (&mut self.file).take(limit).read_to_end(&mut chunk) {
            Ok(0) => None,
            Ok(_) => Some(Ok(Bytes::from(chunk))),
            Err(err) => Some(Err(err)),
        }
    }
}

/// A file's size and blake3 digest.
fn hash_file(path: &Path) -> std::io::Result<(u64, blake3::Hash)> {
    let mut hasher = blake3::Hasher::new();
    let file = std::fs::File::open(path)?;
    let size = std::io::copy(
        &mut std::io::BufReader::with_capacity(1 << 20, file),
        &mut hasher,
    )?;
    Ok((size, hasher.finalize()))
}

fn failed_outcome(verdict: Verdict, size: u64, started: Instant) -> ScanOutcome {
    ScanOutcome::failed(verdict, size, started.elapsed(), "".into())
}

/// The TLS settings for `tls`, its files read.
pub(crate) fn client_tls(tls: &ClientTls) -> Result<ClientTlsConfig, ClientError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| ClientError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let mut config = ClientTlsConfig::new();
    if let Some(ca) = &tls.ca {
        config = config.ca_certificate(Certificate::from_pem(read(ca)?));
    }
    if let Some((cert, key)) = &tls.identity {
        config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    if let Some(domain) = &tls.domain {
        config = config.domain_name(domain.clone());
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str) -> PendingFile {
        PendingFile {
            source: FileSource::Path(name.into()),
            size: 0,
            started: Instant::now(),
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
        assert!(pending.get(first).is_none(), "a late reply for the first");
        assert!(pending.remove(first).is_none());
        assert_eq!(pending.get(second).unwrap().source.path(), Path::new("b"));
        assert!(pending.remove(second).is_some());
        assert!(pending.is_empty());
    }
}
