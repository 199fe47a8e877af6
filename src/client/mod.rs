//! The Light Agent client: a session with a Protection Server, and scans of
//! local files through it.
//!
//! [`Agent::connect`] opens the session (Hello, then a task that sends
//! heartbeats for as long as the agent lives), and [`Agent::close`] ends it
//! in order. [`Agent::scan`] (in the submodule `scan`) scans files on one
//! `Scan` stream with many files in flight, each announced by its digest
//! (its content goes only if the server asks for it) while the server knows
//! some of them, and with its content at once while it knows almost none.
//! Its results go to a closure, or, with [`Agent::scan_into`], to a
//! [`ResultSink`] that can hold the scan up while it has no room (a
//! printer whose output is not read) without holding up the session.

mod scan;

pub use scan::{HashFirst, ResultSink};

use std::{
    borrow::Cow,
    io::Read,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::{
    files::{self, LEASE_WAIT, LocalFile},
    proto::{
        AgentMessage, FileVerdict, Heartbeat, Hello, LookupRequest, PROTOCOL_VERSION, RejectReason,
        ServerMessage, TaskEvent, TaskKind, TaskState, Welcome, agent_message,
        protection_server_client::ProtectionServerClient, server_message,
    },
};

/// Largest gRPC message exchanged.
const MAX_MESSAGE_SIZE: usize = 16 << 20;

/// Errors of the client as a whole (a single file's failure is a verdict).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the server at {server}: {source} ({hint})")]
    Connect {
        server: String,
        source: tonic::transport::Error,
        /// What to check, by what failed: the TLS handshake, or the
        /// connection itself.
        hint: &'static str,
    },
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
    /// The server took no connection, or did not answer the session's
    /// Hello, within [`CONNECT_TIMEOUT`].
    #[error("{0}")]
    TimedOut(String),
    /// The server ended the agent's session (a newer session of the same
    /// VM id replaced it, say): a scan under way stops, its files left
    /// failing with why.
    #[error("the server ended this agent's session: {0}")]
    SessionEnded(String),
    /// The server ended a Scan stream without a status (it closes a stream
    /// idle for its idle timeout so when it has no room left to say why):
    /// the files still to come go on a new stream, with those announced as
    /// it ended, as after an idle stream's end.
    #[error("the server ended the scan stream without a status")]
    StreamEnded,
    /// Settings that cannot work (TLS files for an `http://` server).
    #[error("{0}")]
    Settings(String),
    /// The thread that walks and hashes the local files ended before their
    /// end (it panicked).
    #[error(
        "the files to scan stopped coming before their end (the client's file walk failed, see above): those left were not scanned"
    )]
    WalkFailed,
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
        let host = crate::host_name().unwrap_or_else(|| "localhost".into());
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

/// The files of one scan through the server.
pub enum Files {
    /// Local files, taken in order as the scan goes, a few ahead of the
    /// stream, on a thread of their own (the iterator may block: a walk of
    /// a tree). The client holds the files in flight, never the whole
    /// tree: a full scan of a disk of millions of files needs no more
    /// memory than a scan of one folder.
    Local(Box<dyn Iterator<Item = LocalFile> + Send>),
    /// Content read and hashed beforehand, as an agent with its own digest
    /// cache has it (`lightagent bench`).
    Prepared(Vec<Arc<PreparedFile>>),
}

impl Files {
    /// Local files, from any iterator of them (a walk's, or paths named
    /// by the caller): see [`Files::Local`].
    pub fn local<I>(files: I) -> Files
    where
        I: IntoIterator,
        I::Item: Into<LocalFile> + 'static,
        I::IntoIter: Send + 'static,
    {
        Files::Local(Box::new(files.into_iter().map(Into::into)))
    }
}

/// One file of a scan, as the scan holds it.
#[derive(Debug, Clone)]
enum FileSource {
    /// A local file: hashed ahead of its announcement and read again if
    /// the server asks for its content, or read once to go with its begin.
    Path(LocalFile),
    /// Content read and hashed beforehand, as an agent with its own digest
    /// cache has it (`lightagent bench`).
    Prepared(Arc<PreparedFile>),
}

impl FileSource {
    fn path(&self) -> &Path {
        match self {
            FileSource::Path(file) => &file.path,
            FileSource::Prepared(file) => &file.path,
        }
    }

    /// Its path as a begin names it.
    fn name(&self) -> Cow<'_, str> {
        match self {
            FileSource::Path(file) => file.path.to_string_lossy(),
            FileSource::Prepared(file) => Cow::Borrowed(&file.name),
        }
    }
}

/// A file's content with its digest, in memory.
#[derive(Debug)]
pub struct PreparedFile {
    path: PathBuf,
    pub content: Bytes,
    pub digest: blake3::Hash,
    /// The path as a begin names it, made once: a storm of many agents
    /// announces each file once for each agent.
    name: String,
}

impl PreparedFile {
    /// Reads and hashes the file `local`: a regular file (a FIFO put in
    /// its place would be waited on for ever), opened as the local scan
    /// opens files.
    pub fn read(local: LocalFile) -> std::io::Result<PreparedFile> {
        let (mut file, size) = local.open(LEASE_WAIT)?;
        let mut content = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        file.read_to_end(&mut content)?;
        let content = Bytes::from(content);
        let digest = blake3::hash(&content);
        Ok(PreparedFile::new(local.path, content, digest))
    }

    /// Where the file was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file at `path` with `content`, announced by `digest` (which a
    /// benchmark may make up: the server checks it only against content
    /// it is sent).
    pub fn new(path: PathBuf, content: Bytes, digest: blake3::Hash) -> PreparedFile {
        PreparedFile {
            name: path.to_string_lossy().into_owned(),
            path,
            content,
            digest,
        }
    }
}

/// How long [`Agent::close`] waits for the server to end the session.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// An open session with a Protection Server.
///
/// Dropped, it stops reading the server's side of the session at once:
/// nothing tells whether the server took the last events sent, and a
/// process that exits next may not even have sent them. [`Agent::close`]
/// ends the session in order and waits for the server to take them.
pub struct Agent {
    client: ProtectionServerClient<Channel>,
    welcome: Welcome,
    /// The session's one strong sender: dropping it ends the agent's side
    /// of the `Connect` stream (the heartbeat task holds a weak one).
    to_server: mpsc::Sender<AgentMessage>,
    /// The task that sends heartbeats and reads the server's messages until
    /// the server ends its side; `None` once [`Agent::close`] took it.
    session: Option<JoinHandle<()>>,
    /// Why the server ended the session, once it has.
    ended: watch::Receiver<Option<String>>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(session) = &self.session {
            session.abort();
        }
    }
}

impl Agent {
    /// Connects and opens a session.
    pub async fn connect(options: &AgentOptions) -> Result<Agent, ClientError> {
        let channel = Self::channel(options).await?;
        let mut client = ProtectionServerClient::new(channel)
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
        // A server that took the connection, then never answers the Hello,
        // is given as long.
        let answer = async {
            let mut incoming = client
                .connect(ReceiverStream::new(outbox))
                .await?
                .into_inner();
            let first = incoming.message().await?;
            Ok::<_, tonic::Status>((incoming, first))
        };
        let (incoming, first) =
            in_time(answer, "the server did not answer the session's Hello").await?;
        let welcome = match first.and_then(|m| m.kind) {
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
        let (ending, ended) = watch::channel(None);
        let session = tokio::spawn(Self::keep_session(
            incoming,
            to_server.downgrade(),
            interval,
            ending,
        ));
        Ok(Agent {
            client,
            welcome,
            to_server,
            session: Some(session),
            ended,
        })
    }

    /// A connection to the server `options` name, with their TLS files.
    async fn channel(options: &AgentOptions) -> Result<Channel, ClientError> {
        let server = &options.server;
        // Checked here, before a word goes out: the server refuses such an
        // agent on a plain channel, but one that is not the SVM would not.
        if options.require_encryption && options.tls.is_none() {
            return Err(ClientError::Settings(format!(
                "--require-encryption: {server} is not encrypted; write the server's address as https://HOST:PORT, with --ca"
            )));
        }
        if !server.contains("://") {
            return Err(ClientError::Settings(format!(
                "the server's address `{server}` has no scheme: write http://{server} (or https://{server}, with --ca)"
            )));
        }
        let endpoint = Endpoint::from_shared(server.clone()).map_err(|err| {
            ClientError::Settings(format!("the server's address `{server}` is no URL: {err}"))
        })?;
        // Pinged as the server pings agents: an SVM gone without a word
        // (a failover, a host that lost power) ends the scan within
        // half a minute, not when TCP gives up, some 15 minutes later.
        let mut endpoint = endpoint
            .tcp_nodelay(true)
            .initial_stream_window_size(4 << 20)
            .initial_connection_window_size(4 << 20)
            .http2_keep_alive_interval(crate::server::KEEPALIVE_INTERVAL)
            .keep_alive_timeout(crate::server::KEEPALIVE_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT);
        if let Some(tls) = &options.tls {
            check_tls(&options.server, tls)?;
            endpoint = endpoint.tls_config(client_tls(tls)?).map_err(|err| {
                ClientError::Settings(format!(
                    "the TLS files (--ca, --cert, --key) cannot be used: {}",
                    crate::WithCauses(&err)
                ))
            })?;
        }
        let unreachable = |source| ClientError::Connect {
            server: server.clone(),
            hint: connect_hint(&source),
            source,
        };
        // `connect_timeout` bounds the TCP connection alone, not the TLS
        // handshake after it.
        in_time(
            async { endpoint.connect().await.map_err(unreachable) },
            &format!("cannot connect to the server at {server}: no connection"),
        )
        .await
    }

    /// The session's life once welcomed: a heartbeat every `interval`
    /// while the agent holds its side (`heartbeats`), and the server's
    /// messages read until it ends the stream; `ending` is told why, when
    /// the server ended the session itself.
    async fn keep_session(
        mut incoming: tonic::Streaming<ServerMessage>,
        heartbeats: mpsc::WeakSender<AgentMessage>,
        interval: Duration,
        ending: watch::Sender<Option<String>>,
    ) {
        let mut ticker = tokio::time::interval(interval);
        let mut sequence = 0;
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    sequence += 1;
                    let beat = agent_message::Kind::Heartbeat(Heartbeat { sequence });
                    // Gone once the agent closes: its side of the stream ends.
                    if let Some(heartbeats) = heartbeats.upgrade() {
                        let _ = heartbeats.send(AgentMessage { kind: Some(beat) }).await;
                    }
                }
                message = incoming.message() => match message {
                    Ok(Some(ServerMessage { kind: Some(server_message::Kind::RestartSession(restart)) })) => {
                        tracing::warn!("the server asks this agent to restart its session: {}", restart.reason);
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => return,
                    Err(status) => {
                        tracing::warn!("the server ended this agent's session: {}", status.message());
                        // Ended by the server (replaced by a newer
                        // session of the same VM id, silent too long,
                        // not read): a scan under way stops. (A
                        // connection that breaks, or a server that
                        // shuts down, ends the scan's stream as well,
                        // which says so itself.)
                        use tonic::Code::*;
                        if matches!(status.code(), Aborted | DeadlineExceeded | ResourceExhausted | InvalidArgument) {
                            let _ = ending.send(Some(status.message().to_owned()));
                        }
                        return;
                    }
                }
            }
        }
    }

    /// Ends the session in order: the agent's side of the stream ends after
    /// the events sent so far (a scan task's end, say), and the server,
    /// having taken them all, ends its side and counts the session closed,
    /// not dropped. Waits for that at most 5 seconds (`CLOSE_WAIT`), then
    /// cuts it.
    pub async fn close(mut self) {
        let session = self.session.take();
        // The last strong sender goes with `self`.
        drop(self);
        if let Some(mut session) = session
            && tokio::time::timeout(CLOSE_WAIT, &mut session)
                .await
                .is_err()
        {
            session.abort();
        }
    }

    /// Why the server ended the session, once it has (see
    /// [`ClientError::SessionEnded`]).
    pub fn session_ended(&self) -> Option<String> {
        self.ended.borrow().clone()
    }

    /// The server's Welcome: session id, versions, limits.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// Reports a scan task's start or end to the server; for its end, with
    /// its detections and the files it could not scan.
    pub async fn report_task(
        &self,
        task_id: &str,
        kind: TaskKind,
        state: TaskState,
        detections: u32,
        failed_files: u32,
    ) {
        let event = agent_message::Kind::Task(TaskEvent {
            task_id: task_id.to_owned(),
            kind: kind as i32,
            state: state as i32,
            detections,
            failed_files,
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
        if reply.results.len() != digests.len() {
            return Err(ClientError::Protocol(format!(
                "the server answered {} digests with {} results",
                digests.len(),
                reply.results.len()
            )));
        }
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
}

/// How long a connection to the server may take to open (its TLS handshake
/// included), and then the server to answer the session's Hello: a host
/// that drops packets would otherwise hold each attempt for the kernel's
/// two minutes of retries.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// `step` of opening a session, given up on after [`CONNECT_TIMEOUT`]
/// (`what` says what did not happen in time).
async fn in_time<T, E>(
    step: impl std::future::Future<Output = Result<T, E>>,
    what: &str,
) -> Result<T, ClientError>
where
    ClientError: From<E>,
{
    match tokio::time::timeout(CONNECT_TIMEOUT, step).await {
        Ok(done) => Ok(done?),
        Err(_) => Err(ClientError::TimedOut(format!(
            "{what} within {CONNECT_TIMEOUT:?}"
        ))),
    }
}

/// What to check when the connection to the server failed with `err`.
fn connect_hint(err: &tonic::transport::Error) -> &'static str {
    // A TLS failure comes as an I/O error carrying rustls's.
    let tls = crate::causes(err)
        .filter_map(|e| e.downcast_ref::<std::io::Error>())
        .any(|e| {
            e.get_ref()
                .is_some_and(|inner| inner.is::<tokio_rustls::rustls::Error>())
        });
    match tls {
        true => {
            "the TLS handshake failed: --ca must hold the CA that issued the server's certificate, and --tls-domain (the address's host by default) a name it was issued for; a server that asks for a client certificate needs --cert and --key"
        }
        false => {
            "is `scanserver serve` running there? set --server or LIGHTAGENT_SERVER to its address"
        }
    }
}

/// Refuses TLS settings that could not work: tonic speaks TLS only to an
/// `https://` address (and plain HTTP/2, silently, to an `http://` one),
/// and trusts no CA but the one given.
fn check_tls(server: &str, tls: &ClientTls) -> Result<(), ClientError> {
    if !server.starts_with("https://") {
        return Err(ClientError::Settings(format!(
            "TLS settings (a CA, a client certificate, a name to verify) are given for {server}, which is not encrypted: write the server's address as https://HOST:PORT"
        )));
    }
    if tls.ca.is_none() {
        return Err(ClientError::Settings(format!(
            "{server} needs the CA certificate (PEM) its certificate chains to (--ca FILE): no system trust store is used"
        )));
    }
    Ok(())
}

/// The TLS settings for `tls`, its files read.
pub(crate) fn client_tls(tls: &ClientTls) -> Result<ClientTlsConfig, ClientError> {
    let read = |path: &Path| {
        files::read(path, files::SMALL_FILE_LIMIT).map_err(|source| ClientError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let ca = tls.ca.as_deref().map(read).transpose()?;
    let identity = match &tls.identity {
        Some((cert, key)) => Some((read(cert)?, read(key)?)),
        None => None,
    };
    let identity = identity.as_ref().map(|(cert, key)| (&cert[..], &key[..]));
    Ok(tls_config(ca.as_deref(), identity, tls.domain.as_deref()))
}

/// Client TLS settings from the PEM contents of a CA's certificates, and
/// of a certificate and its key; `domain`, the name to verify the server's
/// certificate against.
pub(crate) fn tls_config(
    ca: Option<&[u8]>,
    identity: Option<(&[u8], &[u8])>,
    domain: Option<&str>,
) -> ClientTlsConfig {
    let mut config = ClientTlsConfig::new();
    if let Some(ca) = ca {
        config = config.ca_certificate(Certificate::from_pem(ca));
    }
    if let Some((cert, key)) = identity {
        config = config.identity(Identity::from_pem(cert, key));
    }
    if let Some(domain) = domain {
        config = config.domain_name(domain);
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_settings_need_an_https_address_and_a_ca() {
        let with_ca = ClientTls {
            ca: Some("ca.pem".into()),
            ..ClientTls::default()
        };
        let refused = |server, tls| matches!(check_tls(server, tls), Err(ClientError::Settings(_)));
        assert!(refused("http://svm:7405", &with_ca));
        assert!(refused("https://svm:7405", &ClientTls::default()));
        assert!(check_tls("https://svm:7405", &with_ca).is_ok());
    }
}
