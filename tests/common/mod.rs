//! Helpers shared by the integration tests: the shipped ruleset, engines,
//! a server on loopback and agent sessions, and builders for small but well-formed PE and ELF files, so that rules
//! using the `pe` and `elf` modules are tested on real structures.

#![allow(dead_code)]

use std::{
    collections::VecDeque,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;

use scanserver::{
    admin::AdminClient,
    config::Config,
    engine::{Engine, EngineConfig, ScanJob},
    proto::{
        AgentMessage, FileBegin, FileCancel, FileChunk, FileEnd, FileReply, FileVerdict, Hello,
        PROTOCOL_VERSION, ScanReply, ScanRequest, ServerMessage, agent_message, file_reply,
        file_request, protection_server_client::ProtectionServerClient, server_message,
    },
    server::Server,
    service::ServiceState,
    signatures::Ruleset,
    status::Svm,
    tls::Tls,
    verdict::Verdict,
};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// The EICAR test string.
pub const EICAR: &[u8] = br"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";

pub fn project_path(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// The shipped signatures, compiled (no cache).
pub fn shipped_ruleset() -> Ruleset {
    Ruleset::load(&project_path("signatures"), None).expect("shipped signatures compile")
}

/// An engine over the shipped signatures, two threads.
pub fn shipped_engine() -> Arc<Engine> {
    engine_with(
        shipped_ruleset(),
        EngineConfig {
            threads: 2,
            ..EngineConfig::default()
        },
    )
}

pub fn engine_with(ruleset: Ruleset, config: EngineConfig) -> Arc<Engine> {
    Arc::new(Engine::new(ruleset, &config).expect("engine starts"))
}

/// Makes a FIFO at `path`, and returns the path.
pub fn make_fifo(path: &Path) -> PathBuf {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path; mkfifo only creates the node.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    path.to_owned()
}

/// A rule that cannot finish on anything but tiny input.
pub const SLOW_RULE: &str = r#"
rule slow {
    condition:
        for all i in (0 .. filesize - 1) : (
            for all j in (0 .. filesize - 1) : ( uint8(i) + uint8(j) < 1000 )
        )
}
"#;

/// A ruleset compiled from one source text, in a temporary folder.
pub fn ruleset_from_source(source: &str) -> Ruleset {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.yar"), source).unwrap();
    Ruleset::load(dir.path(), None).expect("test rules compile")
}

/// The identifiers of the rules that matched `data` (named `name`).
pub fn matching_rules(engine: &Engine, data: &[u8], name: &str) -> Vec<String> {
    let outcome = engine.scan(&ScanJob::bytes(data.to_vec(), Some(name.to_owned())));
    match outcome.verdict {
        Verdict::Clean => vec![],
        Verdict::Infected(detections) => detections.into_iter().map(|d| d.rule).collect(),
        Verdict::Failed(failure) => panic!("scan of {name} failed: {failure}"),
    }
}

/// A server on a free loopback port, stopped when dropped.
pub struct TestServer {
    pub addr: std::net::SocketAddr,
    pub admin: scanserver::admin::AdminAddr,
    pub metrics: Option<std::net::SocketAddr>,
    pub state: Arc<ServiceState>,
    pub svm: Arc<Svm>,
    pub reloader: Arc<scanserver::reload::Reloader>,
    pub tls: Option<Arc<Tls>>,
    pub spool: tempfile::TempDir,
    _state: Option<tempfile::TempDir>,
    stop: oneshot::Sender<()>,
    running: tokio::task::JoinHandle<()>,
}

impl TestServer {
    /// A server with the shipped signatures, its own spool folder and (unless
    /// `configure` names one) its own state folder.
    pub async fn start(configure: impl FnOnce(&mut Config)) -> TestServer {
        let spool = tempfile::tempdir().unwrap();
        let state_dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.server.state_dir = Some(state_dir.path().to_owned());
        config.server.listen = "127.0.0.1:0".parse().unwrap();
        config.server.admin_listen = "127.0.0.1:0".parse().unwrap();
        // The shipped signatures are as old as the checkout; tests about
        // their age set this themselves.
        config.rules.max_age = std::time::Duration::from_secs(100 * 365 * 86400);
        config.engine.threads = 2;
        config.uploads.spool_dir = Some(spool.path().to_owned());
        config.rules.path = project_path("signatures");
        // Test sessions send no heartbeats: at the default interval, one
        // would end 30 s after it opened, however slow the test's machine.
        // Tests about heartbeats set this themselves.
        config.server.heartbeat_interval = std::time::Duration::from_secs(3600);
        configure(&mut config);
        // Reloads compile into the state folder in use, not the user's cache.
        let used = config.server.state_dir.clone().unwrap();
        config
            .rules
            .cache_dir
            .get_or_insert_with(|| used.join("rules"));
        // Compiled, not from the cache, as reloads will find them.
        let ruleset = Ruleset::load(&config.rules.path, None).expect("the rules compile");
        let engine = Arc::new(scanserver::engine::Engine::new(ruleset, &config.engine).unwrap());
        let server = Server::bind(&config, engine).await.unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let (addr, admin, metrics) = (
            server.local_addr(),
            server.admin_addr(),
            server.metrics_addr(),
        );
        let (state, svm) = (Arc::clone(server.state()), Arc::clone(server.svm()));
        let reloader = Arc::clone(server.reloader());
        let tls = server.tls().cloned();
        let running = tokio::spawn(async move {
            server
                .run(async move {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        TestServer {
            addr,
            admin,
            metrics,
            state,
            svm,
            reloader,
            tls,
            spool,
            _state: (used == state_dir.path()).then_some(state_dir),
            stop,
            running,
        }
    }

    /// Shuts the server down and waits until it is done.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.running.await.unwrap();
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client of the server's admin service.
    pub async fn admin_client(&self) -> AdminClient {
        scanserver::admin::connect(
            &self.admin.to_string(),
            None,
            scanserver::admin::REQUEST_TIMEOUT,
        )
        .await
        .unwrap()
    }

    pub async fn client(&self) -> ProtectionServerClient<Channel> {
        ProtectionServerClient::new(self.channel().await)
    }

    /// A client of the standard health service, on a connection of its own.
    pub async fn health_client(&self) -> tonic_health::pb::health_client::HealthClient<Channel> {
        tonic_health::pb::health_client::HealthClient::new(self.channel().await)
    }

    async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub fn spooled_files(&self) -> usize {
        std::fs::read_dir(self.spool.path()).unwrap().count()
    }
}

pub fn hello() -> Hello {
    Hello {
        agent_id: "agent-1".into(),
        vm_id: "vm-1".into(),
        vm_name: "desktop-1".into(),
        os: "Windows 11".into(),
        agent_version: "1.0.0".into(),
        protocol_version: PROTOCOL_VERSION,
        connection_tags: vec!["vdi".into()],
        require_encryption: false,
    }
}

/// Opens Connect with `hello` as its first message; returns the sender of
/// further agent messages (the session lasts as long as it does) and the
/// server's messages.
pub async fn connect(
    server: &TestServer,
    hello: Hello,
) -> (mpsc::Sender<AgentMessage>, tonic::Streaming<ServerMessage>) {
    let (tx, rx) = mpsc::channel(8);
    tx.send(AgentMessage {
        kind: Some(agent_message::Kind::Hello(hello)),
    })
    .await
    .unwrap();
    let incoming = server
        .client()
        .await
        .connect(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, incoming)
}

/// Sends `hello` on Connect; returns the first server message and the
/// sender that keeps the session open.
pub async fn open_session(
    server: &TestServer,
    hello: Hello,
) -> (server_message::Kind, mpsc::Sender<AgentMessage>) {
    let (tx, mut incoming) = connect(server, hello).await;
    let first = incoming.message().await.unwrap().unwrap().kind.unwrap();
    tokio::spawn(async move { while let Ok(Some(_)) = incoming.message().await {} });
    (first, tx)
}

/// The session `hello` opens, and the agent's side of its stream.
pub async fn session_of(server: &TestServer, hello: Hello) -> (String, mpsc::Sender<AgentMessage>) {
    match open_session(server, hello).await {
        (server_message::Kind::Welcome(welcome), keep) => (welcome.session_id, keep),
        (other, _) => panic!("expected a welcome, got {other:?}"),
    }
}

/// Waits, for up to 10 s, until `read` gives `wanted`.
pub async fn until_read<T: PartialEq + std::fmt::Debug>(
    what: &str,
    read: impl Fn() -> T,
    wanted: T,
) {
    for _ in 0..1000 {
        if read() == wanted {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{what}: {:?}, not {wanted:?}", read());
}

/// A Scan stream: a request sender and the replies.
pub async fn scan_stream(server: &TestServer) -> (mpsc::Sender<ScanRequest>, Replies) {
    let (tx, rx) = mpsc::channel(256);
    let replies = server
        .client()
        .await
        .scan(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, Replies::new(replies))
}

/// The replies of a Scan stream, one file's reply at a time (the server
/// sends them in batches).
pub struct Replies {
    stream: tonic::Streaming<ScanReply>,
    batch: VecDeque<FileReply>,
    /// The signatures version of the message the batch came in.
    pub version: String,
}

impl Replies {
    pub fn new(stream: tonic::Streaming<ScanReply>) -> Self {
        Replies {
            stream,
            batch: VecDeque::new(),
            version: String::new(),
        }
    }

    /// The next message of the stream; every reply before it must have
    /// been taken.
    pub async fn message(&mut self) -> Result<Option<ScanReply>, tonic::Status> {
        assert!(self.batch.is_empty(), "replies left: {:?}", self.batch);
        self.stream.message().await
    }
}

/// The next reply of a Scan stream: its file id and kind.
pub async fn next(replies: &mut Replies) -> (u64, file_reply::Kind) {
    while replies.batch.is_empty() {
        let message = tokio::time::timeout(Duration::from_secs(20), replies.message())
            .await
            .expect("a reply in time")
            .unwrap()
            .expect("the stream is open");
        assert!(!message.replies.is_empty(), "a message without replies");
        replies.batch.extend(message.replies);
        replies.version = message.signatures_version;
    }
    let reply = replies.batch.pop_front().unwrap();
    (reply.file_id, reply.kind.unwrap())
}

/// The first reply to a Scan stream of just `requests`.
pub async fn first_reply(server: &TestServer, requests: Vec<ScanRequest>) -> file_reply::Kind {
    let replies = server
        .client()
        .await
        .scan(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    next(&mut Replies::new(replies)).await.1
}

/// The code of a reply that must be an error.
pub fn error_code(kind: &file_reply::Kind) -> tonic::Code {
    match kind {
        file_reply::Kind::Error(e) => tonic::Code::from(e.code),
        other => panic!("expected an error, got {other:?}"),
    }
}

/// The verdict of a reply that must be one.
pub fn file_verdict(kind: file_reply::Kind) -> FileVerdict {
    match kind {
        file_reply::Kind::Verdict(verdict) => verdict,
        other => panic!("expected a verdict, got {other:?}"),
    }
}

/// A FileBegin for `data`, hash first when `digest` is given.
pub fn begin(session: &str, id: u64, data: &[u8], digest: Option<&[u8]>) -> ScanRequest {
    ScanRequest::from(file_request::Kind::Begin(FileBegin {
        file_id: id,
        session_id: session.to_owned(),
        path: format!("C:\\Users\\u\\file{id}.bin"),
        size: data.len() as u64,
        blake3: digest.map(Bytes::copy_from_slice).unwrap_or_default(),
    }))
}

pub fn chunk(id: u64, offset: u64, data: &[u8]) -> ScanRequest {
    ScanRequest::from(file_request::Kind::Chunk(FileChunk {
        file_id: id,
        ..scan_file_chunk(offset, data, "")
    }))
}

/// A chunk of a `ScanFile` call (the first names the file).
pub fn scan_file_chunk(offset: u64, data: &[u8], path: &str) -> FileChunk {
    FileChunk {
        offset,
        data: Bytes::copy_from_slice(data),
        path: path.to_owned(),
        ..FileChunk::default()
    }
}

pub fn end(id: u64) -> ScanRequest {
    ScanRequest::from(file_request::Kind::End(FileEnd { file_id: id }))
}

pub fn cancel(id: u64) -> ScanRequest {
    ScanRequest::from(file_request::Kind::Cancel(FileCancel { file_id: id }))
}

/// Sends file `id` whole on a Scan stream: its begin (with no digest, so
/// that its content follows at once), its content in one chunk, its end.
pub async fn send_whole(tx: &mpsc::Sender<ScanRequest>, session: &str, id: u64, data: &[u8]) {
    for request in [begin(session, id, data, None), chunk(id, 0, data), end(id)] {
        tx.send(request).await.unwrap();
    }
}

/// One message of all the requests of `messages`.
pub fn batch(messages: Vec<ScanRequest>) -> ScanRequest {
    ScanRequest {
        requests: messages.into_iter().flat_map(|m| m.requests).collect(),
    }
}

/// A minimal 32-bit Windows PE: a code section and a data section holding an
/// import table and any extra bytes.
#[derive(Default)]
pub struct PeBuilder {
    dll: bool,
    imports: Vec<(String, Vec<String>)>,
    data: Vec<u8>,
}

impl PeBuilder {
    pub fn exe() -> Self {
        PeBuilder::default()
    }

    pub fn dll() -> Self {
        PeBuilder {
            dll: true,
            ..PeBuilder::default()
        }
    }

    pub fn import(mut self, dll: &str, functions: &[&str]) -> Self {
        self.imports.push((
            dll.to_owned(),
            functions.iter().map(|f| f.to_string()).collect(),
        ));
        self
    }

    pub fn data(mut self, bytes: &[u8]) -> Self {
        self.data.extend_from_slice(bytes);
        self.data.push(0);
        self
    }

    pub fn build(&self) -> Vec<u8> {
        const TEXT_RVA: u32 = 0x1000;
        const DATA_RVA: u32 = 0x2000;
        let data = self.data_section(DATA_RVA);
        let data_raw = align(data.len() as u32, 0x200);

        let mut pe = vec![0u8; 0x200];
        pe[0..2].copy_from_slice(b"MZ");
        put32(&mut pe, 0x3C, 0x40);
        pe[0x40..0x44].copy_from_slice(b"PE\0\0");
        // COFF header.
        let coff = 0x44;
        put16(&mut pe, coff, 0x14C);
        put16(&mut pe, coff + 2, 2);
        put32(&mut pe, coff + 4, 0x5F5E_1000);
        put16(&mut pe, coff + 16, 224);
        put16(&mut pe, coff + 18, if self.dll { 0x2102 } else { 0x0102 });
        // Optional header (PE32).
        let opt = coff + 20;
        put16(&mut pe, opt, 0x10B);
        put32(&mut pe, opt + 4, 0x200);
        put32(&mut pe, opt + 8, data_raw);
        put32(&mut pe, opt + 16, TEXT_RVA);
        put32(&mut pe, opt + 20, TEXT_RVA);
        put32(&mut pe, opt + 24, DATA_RVA);
        put32(&mut pe, opt + 28, 0x40_0000);
        put32(&mut pe, opt + 32, 0x1000);
        put32(&mut pe, opt + 36, 0x200);
        put16(&mut pe, opt + 40, 4);
        put16(&mut pe, opt + 48, 4);
        put32(
            &mut pe,
            opt + 56,
            DATA_RVA + align(data.len() as u32, 0x1000),
        );
        put32(&mut pe, opt + 60, 0x200);
        put16(&mut pe, opt + 68, 2);
        put32(&mut pe, opt + 72, 0x10_0000);
        put32(&mut pe, opt + 76, 0x1000);
        put32(&mut pe, opt + 80, 0x10_0000);
        put32(&mut pe, opt + 84, 0x1000);
        put32(&mut pe, opt + 92, 16);
        if !self.imports.is_empty() {
            put32(&mut pe, opt + 96 + 8, DATA_RVA);
            put32(&mut pe, opt + 96 + 12, 20 * (self.imports.len() as u32 + 1));
        }
        // Section headers.
        let sections = opt + 224;
        section_header(
            &mut pe,
            sections,
            b".text",
            TEXT_RVA,
            0x200,
            0x200,
            0x6000_0020,
        );
        section_header(
            &mut pe,
            sections + 40,
            b".data",
            DATA_RVA,
            data_raw,
            0x400,
            0xC000_0040,
        );
        // .text: `xor eax, eax; ret`.
        let mut text = vec![0u8; 0x200];
        text[..3].copy_from_slice(&[0x31, 0xC0, 0xC3]);
        pe.extend_from_slice(&text);
        pe.extend_from_slice(&data);
        pe.resize(0x400 + data_raw as usize, 0);
        pe
    }

    /// The data section: import descriptors, their lookup and address
    /// tables, names, then the extra data.
    fn data_section(&self, base: u32) -> Vec<u8> {
        let mut sec = vec![0u8; 20 * (self.imports.len() + 1)];
        for (i, (dll, functions)) in self.imports.iter().enumerate() {
            let name_rva = base + sec.len() as u32;
            sec.extend_from_slice(dll.as_bytes());
            sec.push(0);
            pad2(&mut sec);
            let mut hint_rvas = Vec::new();
            for function in functions {
                hint_rvas.push(base + sec.len() as u32);
                sec.extend_from_slice(&[0, 0]);
                sec.extend_from_slice(function.as_bytes());
                sec.push(0);
                pad2(&mut sec);
            }
            let table = |sec: &mut Vec<u8>| {
                let rva = base + sec.len() as u32;
                for hint in &hint_rvas {
                    sec.extend_from_slice(&hint.to_le_bytes());
                }
                sec.extend_from_slice(&[0; 4]);
                rva
            };
            let lookup_rva = table(&mut sec);
            let address_rva = table(&mut sec);
            put32(&mut sec, i * 20, lookup_rva);
            put32(&mut sec, i * 20 + 12, name_rva);
            put32(&mut sec, i * 20 + 16, address_rva);
        }
        sec.extend_from_slice(&self.data);
        sec
    }
}

/// A minimal 64-bit x86-64 ELF file of the given type followed by `payload`.
pub fn elf(elf_type: ElfType, payload: &[u8]) -> Vec<u8> {
    let mut elf = vec![0u8; 64];
    elf[0..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2; // 64-bit
    elf[5] = 1; // little endian
    elf[6] = 1; // version
    put16(&mut elf, 16, elf_type as u16);
    put16(&mut elf, 18, 0x3E); // x86-64
    put32(&mut elf, 20, 1);
    elf[24..32].copy_from_slice(&0x40_1000u64.to_le_bytes());
    put16(&mut elf, 52, 64); // header size
    put16(&mut elf, 54, 56); // program header entry size
    put16(&mut elf, 58, 64); // section header entry size
    elf.extend_from_slice(payload);
    elf
}

#[derive(Clone, Copy)]
pub enum ElfType {
    Relocatable = 1,
    Exec = 2,
    Dyn = 3,
}

fn section_header(
    pe: &mut [u8],
    at: usize,
    name: &[u8],
    rva: u32,
    raw_size: u32,
    raw_at: u32,
    flags: u32,
) {
    pe[at..at + name.len()].copy_from_slice(name);
    put32(pe, at + 8, raw_size);
    put32(pe, at + 12, rva);
    put32(pe, at + 16, raw_size);
    put32(pe, at + 20, raw_at);
    put32(pe, at + 36, flags);
}

fn put16(buf: &mut [u8], at: usize, value: u16) {
    buf[at..at + 2].copy_from_slice(&value.to_le_bytes());
}

fn put32(buf: &mut [u8], at: usize, value: u32) {
    buf[at..at + 4].copy_from_slice(&value.to_le_bytes());
}

fn pad2(buf: &mut Vec<u8>) {
    if buf.len() % 2 == 1 {
        buf.push(0);
    }
}

fn align(value: u32, to: u32) -> u32 {
    value.div_ceil(to).max(1) * to
}

/// The rules of a reply that must be a verdict (none when clean).
pub fn verdict_rules(kind: &file_reply::Kind) -> Vec<String> {
    match kind {
        file_reply::Kind::Verdict(v) => match v.verdict.as_ref().unwrap().kind.as_ref().unwrap() {
            scanserver::proto::verdict::Kind::Infected(i) => {
                i.detections.iter().map(|d| d.rule.clone()).collect()
            }
            scanserver::proto::verdict::Kind::Clean(_) => vec![],
            scanserver::proto::verdict::Kind::Failed(f) => panic!("failed: {f:?}"),
        },
        other => panic!("expected a verdict, got {other:?}"),
    }
}

/// Begins file `id` (`data`) announcing `digest`, and checks that the
/// server asks for its content.
pub async fn begin_asked_for_content(
    tx: &mpsc::Sender<ScanRequest>,
    replies: &mut Replies,
    session: &str,
    id: u64,
    data: &[u8],
    digest: &blake3::Hash,
) {
    tx.send(begin(session, id, data, Some(digest.as_bytes())))
        .await
        .unwrap();
    let (answered, kind) = next(replies).await;
    assert!(
        answered == id && matches!(kind, file_reply::Kind::SendContent(_)),
        "{answered}: {kind:?}"
    );
}

/// The gRPC header of a message of `len` bytes.
pub fn grpc_header(len: usize) -> Vec<u8> {
    let mut header = vec![0];
    header.extend_from_slice(&(len as u32).to_be_bytes());
    header
}

/// The gRPC framing of `message`.
pub fn framed(message: &impl prost::Message) -> Bytes {
    let encoded = message.encode_to_vec();
    let mut framed = grpc_header(encoded.len());
    framed.extend_from_slice(&encoded);
    framed.into()
}

/// A raw HTTP/2 call of `method` on a connection of its own, from the
/// loopback address `from`, of whose response the server may send `window`
/// bytes before the client reads them (HTTP/2's stream window): its
/// response, and its request stream.
pub async fn raw_call(
    server: &TestServer,
    from: [u8; 4],
    method: &str,
    window: u32,
) -> (h2::client::ResponseFuture, h2::SendStream<Bytes>) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((from, 0).into()).unwrap();
    let tcp = socket.connect(server.addr).await.unwrap();
    let (h2, connection) = h2::client::Builder::new()
        .initial_window_size(window)
        .handshake::<_, Bytes>(tcp)
        .await
        .unwrap();
    tokio::spawn(connection);
    h2.ready()
        .await
        .unwrap()
        .send_request(grpc_request(server, method), false)
        .unwrap()
}

/// The headers of a call of `method` of the Protection service.
pub fn grpc_request(server: &TestServer, method: &str) -> http::Request<()> {
    http::Request::post(format!(
        "http://{}/{}/{method}",
        server.addr,
        scanserver::proto::protection_server_server::SERVICE_NAME
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(())
    .unwrap()
}
