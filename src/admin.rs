//! The operator's admin service (`scanserver.v1.Admin`), on a listener of
//! its own (loopback TCP by default, or a Unix-domain socket; never the
//! agent port), and how `scanserver status`, `agents`, `tags` and `rules
//! reload` reach it and print its answers.
//!
//! The admin service changes security tags, which network policies act
//! on. On loopback TCP every local user can reach it (a token keeps them
//! out); a Unix-domain socket ([`AdminAddr::Unix`]) lets only the
//! server's user and group in, by the socket file's permissions, as
//! clamd's and Docker's control sockets do.

use std::{
    fmt, io,
    net::SocketAddr,
    os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    pin::Pin,
    str::FromStr,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use hyper_util::rt::TokioIo;
use tokio::{
    net::{UnixListener, UnixStream},
    sync::Semaphore,
};
use tonic::{
    Request, Response, Status,
    codegen::http::Uri,
    service::interceptor::InterceptedService,
    transport::{Channel, Endpoint},
};

use crate::{
    auth::{BearerToken, SendToken},
    proto::{
        AgentsReply, AgentsRequest, ComponentState, Health, ReloadSignaturesReply,
        ReloadSignaturesRequest, StatusReply, StatusRequest, SvmReason, TagReply, TagRequest,
        VmInfo, VmReason, admin_client, admin_server::Admin,
    },
    reload::Reloader,
    state::StateFile,
    status::{Svm, WhichVms, signatures_info},
    vms::{MAX_LISTING_SIZE, SecurityTag, TagError},
};

/// The default address of the admin listener.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:7406";

/// Where the admin service listens, and where the commands reach it:
/// `IP:PORT`, or `unix:PATH` for a Unix-domain socket (an absolute path).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(try_from = "String", into = "String")]
pub enum AdminAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl FromStr for AdminAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.strip_prefix("unix:") {
            Some(path) if Path::new(path).is_absolute() => Ok(AdminAddr::Unix(path.into())),
            Some(_) => Err("unix: needs the socket's absolute path, as in unix:/run/scanserver/admin.sock".into()),
            None => s.parse().map(AdminAddr::Tcp).map_err(|_| {
                format!("`{s}` is neither IP:PORT (127.0.0.1:7406) nor unix:PATH (unix:/run/scanserver/admin.sock)")
            }),
        }
    }
}

impl TryFrom<String> for AdminAddr {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<AdminAddr> for String {
    fn from(addr: AdminAddr) -> String {
        addr.to_string()
    }
}

impl fmt::Display for AdminAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdminAddr::Tcp(addr) => addr.fmt(f),
            AdminAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// The admin service's Unix-domain socket, bound.
pub struct AdminSocket {
    pub listener: UnixListener,
    pub file: SocketFile,
}

/// The socket's file, removed when this is dropped (the server stopped),
/// and the lock that makes it this server's meanwhile.
pub struct SocketFile {
    path: PathBuf,
    _lock: std::fs::File,
}

impl SocketFile {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        // Still ours: no other server binds while the lock is held.
        let _ = std::fs::remove_file(&self.path);
    }
}

impl AdminSocket {
    /// Binds a socket at `path` (absolute) that the server's user and
    /// group may connect to (0660), no one else. Its folder must be the
    /// server user's and writable by no other (it is created private if
    /// missing), or another user could put a socket of theirs in its
    /// place; see [`crate::state::private_dir`]. The server holds a lock
    /// on `PATH.lock` while it runs: a socket found without that lock is
    /// one a server left behind when it was killed, and is replaced; with
    /// it, another server runs there, and this start fails. A file that
    /// is not a socket is never removed.
    pub fn bind(path: &Path) -> io::Result<AdminSocket> {
        let folder = path.parent().unwrap_or(Path::new("/"));
        crate::state::private_dir(folder).map_err(|err| {
            let advice = "the socket's folder must be the server's user's: give it one of its own \
                          (with systemd, RuntimeDirectory=scanserver makes /run/scanserver)";
            io::Error::new(err.kind(), format!("{err}; {advice}"))
        })?;
        let lock = lock_file(path)?;
        match std::fs::symlink_metadata(path) {
            // Without the lock, only a server of a version that takes none
            // could answer on it.
            Ok(metadata)
                if metadata.file_type().is_socket()
                    && std::os::unix::net::UnixStream::connect(path).is_ok() =>
            {
                let message = format!(
                    "a server already listens on {}: stop it, or choose another path",
                    path.display()
                );
                return Err(io::Error::new(io::ErrorKind::AddrInUse, message));
            }
            Ok(metadata) if metadata.file_type().is_socket() => std::fs::remove_file(path)?,
            Ok(_) => {
                let message = format!(
                    "{} exists and is not a socket; remove it, or choose another path",
                    path.display()
                );
                return Err(io::Error::new(io::ErrorKind::AlreadyExists, message));
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(err),
        }
        // Bound in a folder of its own (0700) and given its mode there,
        // then moved into place: no one else may connect in between, and
        // a connection made then would outlive a later chmod.
        let staging = tempfile::Builder::new()
            .prefix(".admin-")
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir_in(folder)?;
        let staged = staging.path().join("socket");
        let listener = UnixListener::bind(&staged)?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o660))?;
        std::fs::rename(&staged, path)?;
        Ok(AdminSocket {
            listener,
            file: SocketFile {
                path: path.to_owned(),
                _lock: lock,
            },
        })
    }
}

/// Takes the lock on `PATH.lock` that a running server holds on its socket.
fn lock_file(path: &Path) -> io::Result<std::fs::File> {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&name)
        .map_err(|err| {
            io::Error::new(err.kind(), format!("{}: {err}", Path::new(&name).display()))
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            let message = format!(
                "another server listens on {} (it holds {}): stop it, or choose another path",
                path.display(),
                Path::new(&name).display()
            );
            Err(io::Error::new(io::ErrorKind::AddrInUse, message))
        }
        Err(std::fs::TryLockError::Error(err)) => Err(err),
    }
}

/// The admin service.
pub struct AdminService {
    svm: Arc<Svm>,
    reloader: Arc<Reloader>,
    /// Turns at building a listing of the VMs (see [`LISTINGS_AT_ONCE`]).
    listings: Arc<Semaphore>,
}

/// Listings of the VMs built at once: each is of up to 100,000 VMs (tens
/// of MB), built on a blocking thread; more calls wait their turn, so that
/// tools polling `agents` cannot take the SVM's memory and threads.
const LISTINGS_AT_ONCE: usize = 2;

/// Calls at once on one admin connection: a tool makes one at a time.
pub const ADMIN_STREAMS: u32 = 8;

/// The largest admin request: a tag command's VM id and tag, a reflection
/// query. tonic sets aside the length a message announces before it
/// comes, which a bound keeps from being 4 MiB a call.
pub const ADMIN_REQUEST_BYTES: usize = 64 << 10;

impl AdminService {
    pub fn new(svm: Arc<Svm>, reloader: Arc<Reloader>) -> Self {
        AdminService {
            svm,
            reloader,
            listings: Arc::new(Semaphore::new(LISTINGS_AT_ONCE)),
        }
    }

    /// The reply to a tag command on `vm_id`, once a change it made is
    /// saved: a tag the operator is told was assigned (or removed) must
    /// stay so after a crash. A command that changed nothing is saved too
    /// while the last save failed: it is often the refused command run
    /// again, whose change is still unsaved. The save's outcome shows in
    /// the status (`STATE_NOT_SAVED`) as the keeper's saves' do.
    async fn tag_reply(
        &self,
        vm_id: &str,
        changed: Result<bool, TagError>,
    ) -> Result<Response<TagReply>, Status> {
        let changed = changed.map_err(|err| Status::not_found(err.to_string()))?;
        if changed || self.svm.unsaved().failed(StateFile::Vms) {
            let saved = crate::state::save_vms(&self.svm.vms, self.svm.unsaved()).await;
            if let Err(err) = saved {
                return Err(Status::internal(format!(
                    "the tag is set as asked, but the protected VMs cannot be saved to the state folder ({err}): a restart before a save succeeds would undo it"
                )));
            }
        }
        let vm = self.svm.vm(vm_id);
        Ok(Response::new(TagReply { changed, vm }))
    }
}

/// The tag a request names, or INVALID_ARGUMENT.
fn requested_tag(request: &TagRequest) -> Result<SecurityTag, Status> {
    request.tag.parse().map_err(Status::invalid_argument)
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusReply>, Status> {
        let report = self.svm.report(WhichVms::None);
        Ok(Response::new(StatusReply {
            report: Some(report),
            components: self.svm.components(),
        }))
    }

    async fn agents(&self, _: Request<AgentsRequest>) -> Result<Response<AgentsReply>, Status> {
        let turn = Arc::clone(&self.listings).acquire_owned().await;
        let svm = Arc::clone(&self.svm);
        // The turn goes with the listing, which a caller that gives up
        // does not stop.
        let listed = tokio::task::spawn_blocking(move || {
            let _turn = turn;
            svm.vm_infos(WhichVms::All)
        })
        .await;
        let vms = listed.map_err(|err| Status::internal(format!("the listing failed: {err}")))?;
        Ok(Response::new(AgentsReply { vms }))
    }

    async fn assign_tag(&self, request: Request<TagRequest>) -> Result<Response<TagReply>, Status> {
        let request = request.into_inner();
        let tag = requested_tag(&request)?;
        let changed = self.svm.vms.assign(&request.vm_id, tag);
        if let Ok(true) = changed {
            tracing::warn!(vm = %request.vm_id, %tag, "security tag assigned by an operator");
        }
        self.tag_reply(&request.vm_id, changed).await
    }

    async fn remove_tag(&self, request: Request<TagRequest>) -> Result<Response<TagReply>, Status> {
        let request = request.into_inner();
        let tag = requested_tag(&request)?;
        let changed = self.svm.vms.remove(&request.vm_id, tag);
        if let Ok(true) = changed {
            tracing::info!(vm = %request.vm_id, %tag, "security tag removed by an operator");
            let session =
                (self.svm.vms.session_of(&request.vm_id)).and_then(|id| self.svm.sessions.get(&id));
            if let Some(session) = session {
                session.restart(&format!("the operator removed the security tag {tag}"));
            }
        }
        self.tag_reply(&request.vm_id, changed).await
    }

    async fn reload_signatures(
        &self,
        _: Request<ReloadSignaturesRequest>,
    ) -> Result<Response<ReloadSignaturesReply>, Status> {
        let outcome = self.reloader.reload().await;
        let reload = outcome.as_ref().as_ref().map_err(|err| {
            let mut message = err.abridged(RELOAD_ERRORS_SHOWN);
            // It travels in a header: hyper refuses large ones.
            if message.len() > MAX_RELOAD_ERROR {
                message.truncate(message.floor_char_boundary(MAX_RELOAD_ERROR));
                message += "...";
            }
            Status::failed_precondition(format!(
                "{message}\nthe SVM goes on with signatures version {}",
                self.svm.engine.ruleset().version()
            ))
        })?;
        let warnings = if reload.changed {
            reload
                .ruleset
                .warnings()
                .iter()
                .map(|w| w.to_string())
                .collect()
        } else {
            Vec::new()
        };
        Ok(Response::new(ReloadSignaturesReply {
            changed: reload.changed,
            previous_version: reload.previous.to_string(),
            signatures: Some(signatures_info(&reload.ruleset)),
            warnings,
            elapsed_ms: reload.elapsed.as_millis() as u64,
        }))
    }
}

/// Compiler errors a failed reload's answer shows in full.
const RELOAD_ERRORS_SHOWN: usize = 10;

/// The longest error a failed reload's answer carries, in bytes (the
/// rest is cut off): gRPC sends it in an HTTP/2 header, percent-encoded
/// (up to three bytes each), and clients refuse headers over 16 KiB.
const MAX_RELOAD_ERROR: usize = 4 << 10;

/// A client of the admin service, sending the operator's token, if any.
pub type AdminClient = admin_client::AdminClient<InterceptedService<Channel, SendToken>>;

/// What an admin request without the right token is told.
pub const TOKEN_HINT: &str = "pass the server's token file with --admin-token-file FILE (other clients: send the header `authorization: Bearer TOKEN`)";

/// How long an operator command waits for the server's answer: a server
/// that accepts and never answers must not hang a monitoring script.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long `scanserver rules reload` waits: compiling a large ruleset
/// takes seconds to minutes, more on a busy SVM.
pub const RELOAD_TIMEOUT: Duration = Duration::from_secs(600);

/// Connects to the admin service at `addr` (`host:port`, a URL, or
/// `unix:PATH`), to send `token` with every request, and to wait at most
/// `timeout` for each answer.
pub async fn connect(
    addr: &str,
    token: Option<BearerToken>,
    timeout: Duration,
) -> Result<AdminClient, String> {
    let socket = addr.strip_prefix("unix:").map(PathBuf::from);
    let is_socket = socket.is_some();
    let url = match (&socket, addr.contains("://")) {
        // Unused but for the `:authority` header: the socket is the address.
        (Some(_), _) => "http://localhost".to_owned(),
        (None, true) => addr.to_owned(),
        (None, false) => format!("http://{addr}"),
    };
    let unreachable = |err: &dyn std::fmt::Display| {
        let whom = match is_socket {
            true => " are you its user, or in its socket's group?",
            false => "",
        };
        format!(
            "cannot reach the admin service at {addr}: {err} (is `scanserver serve` running? does --admin match its --admin-listen?{whom})"
        )
    };
    let endpoint = Endpoint::from_shared(url)
        .map_err(|e| unreachable(&crate::WithCauses(&e)))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(timeout);
    let channel = match socket {
        Some(path) => endpoint.connect_with_connector(SocketConnector(path)).await,
        None => endpoint.connect().await,
    }
    .map_err(|e| unreachable(&crate::WithCauses(&e)))?;
    let client = admin_client::AdminClient::with_interceptor(channel, SendToken(token));
    Ok(client.max_decoding_message_size(MAX_LISTING_SIZE))
}

/// Connects a channel to the admin service's Unix-domain socket.
#[derive(Clone)]
struct SocketConnector(PathBuf);

impl tonic::codegen::Service<Uri> for SocketConnector {
    type Response = TokioIo<UnixStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<TokioIo<UnixStream>>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let path = self.0.clone();
        Box::pin(async move { UnixStream::connect(path).await.map(TokioIo::new) })
    }
}

/// `scanserver status` as text.
pub fn render_status(reply: &StatusReply) -> String {
    let mut out = String::new();
    let Some(report) = &reply.report else {
        return out;
    };
    let svm = report.svm.clone().unwrap_or_default();
    out += &format!(
        "SVM {} ({}), version {}\n",
        svm.name, svm.svm_id, svm.version
    );
    out += &format!(
        "uptime {}\n",
        humantime::format_duration(Duration::from_secs(svm.uptime_seconds))
    );
    out += &format!("status {}\n", health(report.status));
    for reason in &report.reasons {
        out += &format!("  reason: {}\n", svm_reason(*reason));
    }
    out += "components:\n";
    for component in &reply.components {
        let state = match ComponentState::try_from(component.state) {
            Ok(ComponentState::Ok) => "OK",
            Ok(ComponentState::Warning) => "WARNING",
            Ok(ComponentState::Critical) => "CRITICAL",
            Ok(ComponentState::Disabled) => "disabled",
            _ => "unknown",
        };
        out += &format!(
            "  {:<30} {:<9} {}\n",
            component.name, state, component.detail
        );
        let mut counts: Vec<_> = component.counts.iter().collect();
        counts.sort();
        if !counts.is_empty() {
            let counts: Vec<_> = counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
            out += &format!("  {:<30} {:<9} {}\n", "", "", counts.join(", "));
        }
    }
    if let Some(load) = &report.load {
        out += &format!(
            "load: {:.1} scans/s, {:.1} MB/s, queue {}/{}, {} files in flight, CPU {:.0}%, memory {} MiB\n",
            load.scans_per_second,
            load.megabytes_per_second,
            load.queue_depth,
            load.queue_capacity,
            load.scans_in_flight,
            load.cpu_percent,
            load.memory_bytes >> 20
        );
    }
    out
}

/// `scanserver rules reload` as text.
pub fn render_reload(reply: &ReloadSignaturesReply) -> String {
    let signatures = reply.signatures.clone().unwrap_or_default();
    if !reply.changed {
        return format!(
            "signatures unchanged: version {} ({} rules)\n",
            signatures.version, signatures.rule_count
        );
    }
    let mut out = format!(
        "signatures reloaded: version {} ({} rules) replaces {}, in {:.2} s\n",
        signatures.version,
        signatures.rule_count,
        reply.previous_version,
        reply.elapsed_ms as f64 / 1000.0
    );
    if !reply.warnings.is_empty() {
        out += &format!(
            "{} compiler warnings (`scanserver rules check` shows them; --json lists them)\n",
            reply.warnings.len()
        );
    }
    out
}

/// `scanserver agents` as text: one line per VM.
pub fn render_agents(reply: &AgentsReply) -> String {
    let mut out = format!(
        "{:<24} {:<20} {:<10} {:<9} {}\n",
        "VM", "NAME", "CONNECTED", "STATUS", "REASONS / TAGS"
    );
    for vm in &reply.vms {
        out += &render_vm(vm);
    }
    out
}

fn render_vm(vm: &VmInfo) -> String {
    let mut notes: Vec<String> = vm.reasons.iter().map(|r| vm_reason(*r)).collect();
    notes.extend(vm.tags.iter().map(|t| format!("tag {}", t.name)));
    format!(
        "{:<24} {:<20} {:<10} {:<9} {}\n",
        vm.vm_id,
        vm.vm_name,
        if vm.connected { "yes" } else { "no" },
        health(vm.status),
        notes.join(", ")
    )
}

fn health(value: i32) -> &'static str {
    match Health::try_from(value) {
        Ok(Health::Ok) => "OK",
        Ok(Health::Warning) => "WARNING",
        Ok(Health::Critical) => "CRITICAL",
        _ => "UNKNOWN",
    }
}

fn svm_reason(value: i32) -> String {
    SvmReason::try_from(value)
        .map_or_else(|_| format!("reason {value}"), |r| r.describe().to_owned())
}

fn vm_reason(value: i32) -> String {
    VmReason::try_from(value)
        .map_or_else(|_| format!("reason {value}"), |r| r.describe().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_addresses_are_tcp_or_unix() {
        for text in [
            "127.0.0.1:7406",
            "[::1]:7406",
            "unix:/run/scanserver/admin.sock",
        ] {
            let addr: AdminAddr = text.parse().unwrap();
            assert_eq!(addr.to_string(), text);
        }
        let err = "localhost:7406".parse::<AdminAddr>().unwrap_err();
        assert!(err.contains("unix:PATH"), "{err}");
        assert!("unix:".parse::<AdminAddr>().is_err());
        let err = "unix:admin.sock".parse::<AdminAddr>().unwrap_err();
        assert!(err.contains("absolute"), "{err}");
    }

    #[tokio::test]
    async fn the_admin_socket_is_private_and_replaces_only_a_dead_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run").join("admin.sock");
        let socket = AdminSocket::bind(&path).unwrap();
        let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o660);
        assert_eq!(
            mode(path.parent().unwrap()),
            0o700,
            "a missing folder is made private"
        );

        let refused = AdminSocket::bind(&path).err().unwrap();
        assert_eq!(refused.kind(), io::ErrorKind::AddrInUse, "{refused}");
        assert!(refused.to_string().contains("another server"), "{refused}");
        assert!(path.exists(), "the running server keeps its socket");
        drop(socket);
        assert!(!path.exists(), "a stopped server removes its socket");

        // A server killed leaves its socket, and no lock on it.
        let lockless = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let refused = AdminSocket::bind(&path).err().unwrap();
        assert!(refused.to_string().contains("already listens"), "{refused}");
        drop(lockless);
        drop(AdminSocket::bind(&path).unwrap());

        // A folder that others may write to is refused, with what to do.
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
        let refused = AdminSocket::bind(&shared.join("admin.sock")).err().unwrap();
        assert!(
            refused.to_string().contains("RuntimeDirectory"),
            "{refused}"
        );

        std::fs::write(&path, "not a socket").unwrap();
        let refused = AdminSocket::bind(&path).err().unwrap();
        assert!(refused.to_string().contains("is not a socket"), "{refused}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "not a socket");
    }
}
