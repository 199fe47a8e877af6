//! `Connect`: one agent session, from Hello to the end of the stream.
//!
//! The first message must be a Hello, within [`HELLO_TIMEOUT`]. It is
//! checked (protocol version, connection tags, encryption, capacity) and
//! answered with a Welcome or a Rejection. Then the server sends a heartbeat
//! every interval, notes every message from the agent as a sign of life,
//! passes its events on to the registry of protected VMs (finished scan
//! tasks, integrity events, network attacks, whether it reaches the
//! Integration Server), tells it when the signatures change, and asks it to
//! restart the session when an operator removed a tag from its VM. The
//! session ends when the agent closes the stream, when it has been silent
//! for three heartbeat intervals, or when the server shuts down; how it
//! ended decides the VM's status. When the server ends it, the stream ends
//! with a status that says why (see [`SessionStream`]).

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use rustls_pki_types::{CertificateDer, ServerName};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::Stream;
use tonic::{Status, Streaming};

use super::ServiceState;
use crate::{
    proto::{
        AgentMessage, Heartbeat, Hello, Limits, PROTOCOL_VERSION, RejectReason, Rejection,
        ServerMessage, SignaturesChanged, Welcome, agent_message, server_message,
    },
    proto::{RestartSession, TaskState},
    sessions::{AgentIdentity, Session},
    shutdown::shut_down,
    vms::{Ending, SecurityTag, Vms},
};

/// How long a new stream may take to send its Hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Messages to an agent its session may have queued (heartbeats, notices)
/// before it ends the session: the agent does not read.
const OUTBOX: usize = 16;

/// What a session sends its agent: messages, queued (at most
/// [`OUTBOX`]), then the status its stream ends with, if the server ends
/// it. The status goes beside the queue, not into it: it never waits for
/// room, and an agent that let the queue fill up still learns why its
/// session ended, rather than see its stream end with OK.
pub(super) struct Outbox {
    messages: mpsc::Sender<ServerMessage>,
    last: oneshot::Sender<Status>,
}

/// A session's stream as its agent reads it: the messages its session
/// queued, then the status it ended with (OK when the session sent none).
pub struct SessionStream {
    messages: mpsc::Receiver<ServerMessage>,
    last: Option<oneshot::Receiver<Status>>,
}

impl Outbox {
    /// An outbox, and the stream its agent reads.
    pub(super) fn new() -> (Outbox, SessionStream) {
        let (messages, queued) = mpsc::channel(OUTBOX);
        let (last, status) = oneshot::channel();
        let stream = SessionStream {
            messages: queued,
            last: Some(status),
        };
        (Outbox { messages, last }, stream)
    }

    /// Sends `message`, waiting for room; false once the stream is gone.
    async fn send(&self, message: server_message::Kind) -> bool {
        let message = ServerMessage {
            kind: Some(message),
        };
        self.messages.send(message).await.is_ok()
    }

    /// Sends the agent `message`; an error when the session is over: its
    /// stream is gone, or (with the status to end it with) its agent has
    /// let [`OUTBOX`] messages pile up unread. Never waits: a session
    /// waiting on an agent that does not read would check neither its
    /// heartbeats nor shutdown.
    fn tell(&self, message: server_message::Kind) -> Result<(), Option<Status>> {
        let message = ServerMessage {
            kind: Some(message),
        };
        match self.messages.try_send(message) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                let message = format!(
                    "the agent stopped taking its session's messages ({OUTBOX} wait unread); the session is closed"
                );
                Err(Some(Status::resource_exhausted(message)))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(None),
        }
    }

    /// Ends the stream, after the messages queued, with `status`.
    fn end(self, status: Status) {
        let _ = self.last.send(status);
    }
}

impl Stream for SessionStream {
    type Item = Result<ServerMessage, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(message) = ready!(self.messages.poll_recv(cx)) {
            return Poll::Ready(Some(Ok(message)));
        }
        // The queue is closed once the session is over: its status, if it
        // has one, is known by then.
        let Some(last) = self.last.as_mut() else {
            return Poll::Ready(None);
        };
        let status = ready!(Pin::new(last).poll(cx)).ok();
        self.last = None;
        Poll::Ready(status.map(Err))
    }
}

/// Closes a session as it is dropped, however its task ends: a task that
/// panicked, or was dropped, must not leave it open (counted against
/// `max_agents`, its VM connected, and no one to hear its agent).
struct Closing<'a> {
    state: &'a ServiceState,
    id: &'a str,
    ending: Ending,
}

impl Drop for Closing<'_> {
    fn drop(&mut self) {
        self.state.sessions.close(self.id, self.ending);
    }
}

/// Runs one session to its end.
pub(super) async fn run(
    state: Arc<ServiceState>,
    mut incoming: Streaming<AgentMessage>,
    certificate: Option<CertificateDer<'static>>,
    out: Outbox,
) {
    // A stop ends the wait for a Hello: a connection that has not sent one
    // must not hold up the server's shutdown for HELLO_TIMEOUT, nor be
    // welcomed into a server that is going away.
    let mut shutdown = state.shutdown.clone();
    let first = tokio::select! {
        first = tokio::time::timeout(HELLO_TIMEOUT, incoming.message()) => first,
        () = shut_down(&mut shutdown) => return out.end(shutting_down()),
    };
    let hello = match first {
        Ok(Ok(Some(AgentMessage {
            kind: Some(agent_message::Kind::Hello(hello)),
        }))) => hello,
        Ok(Ok(Some(_))) => {
            let message = "the first message must be a Hello";
            return reject(&state, &out, RejectReason::InvalidHello, message).await;
        }
        Err(_) => {
            let message = format!("no Hello within {HELLO_TIMEOUT:?}");
            return reject(&state, &out, RejectReason::InvalidHello, &message).await;
        }
        // A first message the server would not decode: the agent is told why.
        Ok(Err(status)) => return out.end(status),
        Ok(Ok(None)) => return,
    };
    if *shutdown.borrow() {
        return out.end(shutting_down());
    }
    let session = match admit(&state, &hello, certificate.as_ref()) {
        Ok(session) => session,
        Err((reason, message)) => return reject(&state, &out, reason, &message).await,
    };
    if state.sessions.life_logged(&session) {
        tracing::info!(
            session = %session.id, agent = %hello.agent_id, vm = %hello.vm_id, vm_name = %hello.vm_name,
            "agent connected"
        );
    }
    let mut closing = Closing {
        state: &state,
        id: &session.id,
        ending: Ending::Dropped,
    };
    // Watched from before the Welcome is made: a change while it is on its
    // way is told after it, not lost.
    let watched = Watched::subscribe(&state, &session);
    let (ending, status) = match out.send(welcome(&state, &session)).await {
        true => serve(&state, &session, incoming, &out, watched).await,
        false => (Ending::Dropped, None),
    };
    // Closed before the agent is told: one that reconnects at once must
    // not find its old session still open.
    closing.ending = ending;
    drop(closing);
    // Logged within the session's budget, with why: an agent that goes
    // silent again and again must not fill the journal. A session dropped
    // (three heartbeats missed, its messages left unread, its stream
    // broken) leaves its VM unprotected: a warning.
    if state.sessions.life_logged(&session) {
        let (id, vm) = (&session.id, &session.agent.vm_id);
        let why = status.as_ref().map(Status::message).unwrap_or_default();
        match ending {
            Ending::Dropped => {
                tracing::warn!(session = %id, %vm, ?ending, why, "agent disconnected")
            }
            _ => tracing::info!(session = %id, %vm, ?ending, why, "agent disconnected"),
        }
    }
    if let Some(status) = status {
        out.end(status);
    }
}

/// Checks a Hello (sent with the agent's `certificate`, under mutual TLS)
/// and opens the session, or says why not.
fn admit(
    state: &ServiceState,
    hello: &Hello,
    certificate: Option<&CertificateDer<'_>>,
) -> Result<Arc<Session>, (RejectReason, String)> {
    // First: an agent of another version may fill its Hello by other
    // rules, and should be told to look for a compatible SVM, not that its
    // Hello is malformed.
    if hello.protocol_version != PROTOCOL_VERSION {
        return Err((
            RejectReason::IncompatibleVersion,
            format!(
                "protocol version {} is not supported; this server speaks version {PROTOCOL_VERSION}",
                hello.protocol_version
            ),
        ));
    }
    if let Err(message) = check_identity(hello) {
        return Err((RejectReason::InvalidHello, message));
    }
    if state.vm_id_in_certificate
        && let Err(message) = check_certified(&hello.vm_id, certificate)
    {
        return Err((RejectReason::NotCertified, message));
    }
    if hello.require_encryption && !state.encrypted {
        return Err((
            RejectReason::EncryptionRequired,
            "this server's agent listener is not encrypted; connect to an SVM with TLS".into(),
        ));
    }
    let tag_allowed = state.allowed_tags.is_empty()
        || hello
            .connection_tags
            .iter()
            .any(|t| state.allowed_tags.contains(t));
    if !tag_allowed {
        return Err((
            RejectReason::TagNotAllowed,
            format!(
                "none of the agent's connection tags {:?} is accepted here (accepted: {:?})",
                hello.connection_tags, state.allowed_tags
            ),
        ));
    }
    let agent = AgentIdentity {
        certificate: certificate
            .filter(|_| state.vm_id_in_certificate)
            .map(|der| blake3::hash(der.as_ref())),
        ..AgentIdentity::from(hello)
    };
    state
        .sessions
        .open(agent)
        .map_err(|refused| (RejectReason::Capacity, refused.to_string()))
}

/// The most bytes of each identity field of a Hello. The VM id keys the
/// registry of protected VMs, which is saved, reported and kept for 30
/// days: what an agent names there must stay small.
const MAX_IDENTITY_LEN: usize = 256;

/// The most connection tags a Hello may carry. A rejection lists them, so
/// what an agent sends there must stay small too.
const MAX_CONNECTION_TAGS: usize = 16;

/// A Hello names its agent and VM, each field (and each of at most
/// [`MAX_CONNECTION_TAGS`] connection tags) within [`MAX_IDENTITY_LEN`].
fn check_identity(hello: &Hello) -> Result<(), String> {
    let tags = &hello.connection_tags;
    if tags.len() > MAX_CONNECTION_TAGS {
        return Err(format!(
            "the Hello has {} connection tags; at most {MAX_CONNECTION_TAGS} are accepted",
            tags.len()
        ));
    }
    let fields = [
        ("agent_id", &hello.agent_id),
        ("vm_id", &hello.vm_id),
        ("vm_name", &hello.vm_name),
        ("os", &hello.os),
        ("agent_version", &hello.agent_version),
    ];
    let tags = tags.iter().map(|tag| ("connection tag", tag));
    for (name, value) in fields.into_iter().chain(tags) {
        if value.len() > MAX_IDENTITY_LEN {
            return Err(format!(
                "the Hello's {name} is {} bytes long; at most {MAX_IDENTITY_LEN} are accepted",
                value.len()
            ));
        }
        // Logged, listed and reported as they are: a line break would
        // forge a log line.
        if value.chars().any(char::is_control) {
            return Err(format!(
                "the Hello's {name} {value:?} holds control characters"
            ));
        }
    }
    if hello.agent_id.is_empty() || hello.vm_id.is_empty() {
        return Err("the Hello must name its agent (agent_id) and its VM (vm_id)".into());
    }
    Ok(())
}

/// Whether `certificate` is for VM `vm_id`: the VM id is a DNS name (or IP
/// address) among its subject alternative names, checked as TLS checks a
/// server's name (the CA already vouched for the certificate in the
/// handshake). The id must be in the one form the registry keys VMs by:
/// the check ignores case and a final dot, which would let one
/// certificate name several VMs.
fn check_certified(vm_id: &str, certificate: Option<&CertificateDer<'_>>) -> Result<(), String> {
    let Some(certificate) = certificate else {
        return Err(
            "this SVM takes VM ids from agents' certificates, and the agent presented none".into(),
        );
    };
    if vm_id.bytes().any(|b| b.is_ascii_uppercase()) || vm_id.ends_with('.') {
        return Err(format!(
            "the VM id {vm_id:?} must be in lower case without a final dot, as in the certificate"
        ));
    }
    // An address has many spellings (fd00::5, fd00:0::0005): one, the
    // shortest, names the VM.
    if let Ok(address) = vm_id.parse::<std::net::IpAddr>()
        && address.to_string() != vm_id
    {
        return Err(format!(
            "the VM id {vm_id:?} is an address that must be written {address}"
        ));
    }
    let name = ServerName::try_from(vm_id).map_err(|_| {
        format!("the VM id {vm_id:?} is not a DNS name: no certificate can be for it")
    })?;
    webpki::EndEntityCert::try_from(certificate)
        .map_err(|err| format!("the agent's certificate cannot be read: {err}"))?
        .verify_is_valid_for_subject_name(&name)
        .map_err(|_| {
            format!("the agent's certificate is not for VM {vm_id:?}: its subject alternative names must include it")
        })
}

fn welcome(state: &ServiceState, session: &Session) -> server_message::Kind {
    let uploads = state.uploads.config();
    server_message::Kind::Welcome(Welcome {
        session_id: session.id.clone(),
        svm_id: state.svm_id.clone(),
        server_version: crate::VERSION.to_owned(),
        signatures_version: state.engine.ruleset().version().to_owned(),
        heartbeat_interval_ms: state.heartbeat_interval.as_millis() as u32,
        limits: Some(Limits {
            max_file_size: uploads.max_file_size,
            preferred_chunk_size: uploads.chunk_size,
            max_files_in_flight: uploads.files_in_flight,
        }),
    })
}

/// Tells the agent why it is rejected, and logs it within the server's
/// budget for such lines.
async fn reject(state: &ServiceState, out: &Outbox, reason: RejectReason, message: &str) {
    if state.rejection_logs.lock().take() {
        tracing::info!(?reason, message, "agent rejected");
    }
    let rejection = Rejection {
        reason: reason as i32,
        message: message.to_owned(),
    };
    out.send(server_message::Kind::Rejection(rejection)).await;
}

/// What a session tells its agent of as it changes, and whether a newer
/// session of its VM replaced it.
struct Watched {
    signatures: watch::Receiver<Arc<str>>,
    restart: watch::Receiver<Option<String>>,
    superseded: watch::Receiver<bool>,
}

impl Watched {
    fn subscribe(state: &ServiceState, session: &Session) -> Self {
        let mut restart = session.restart_requested();
        // Asked for between the session's opening and now.
        if restart.borrow().is_some() {
            restart.mark_changed();
        }
        let mut superseded = session.superseded();
        if *superseded.borrow() {
            superseded.mark_changed();
        }
        Watched {
            signatures: state.signatures.subscribe(),
            restart,
            superseded,
        }
    }
}

/// The life of an admitted session: how it ended, and the status its
/// stream ends with when the server ended it.
async fn serve(
    state: &ServiceState,
    session: &Session,
    mut incoming: Streaming<AgentMessage>,
    out: &Outbox,
    watched: Watched,
) -> (Ending, Option<Status>) {
    let mut heartbeat = tokio::time::interval(state.heartbeat_interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let Watched {
        mut signatures,
        mut restart,
        mut superseded,
    } = watched;
    let mut shutdown = state.shutdown.clone();
    let silence = state.heartbeat_interval * 3;
    // Looked at when the third heartbeat is overdue, not at the server's
    // next tick, which may come an interval later; the agent may have been
    // heard meanwhile, on a Scan stream too. One timer, moved on as it
    // fires: its messages do not each set a timer.
    let silent = tokio::time::sleep(silence);
    tokio::pin!(silent);
    let mut sequence = 0;
    loop {
        // In this order: the server's own events (rare) before the agent's
        // messages, which could otherwise keep them waiting; and a message
        // already come before the silence is judged, so that one waiting
        // when the server resumes from a pause (the SVM's VM stunned, its
        // threads starved) counts, rather than end a live session.
        let told = tokio::select! {
            biased;
            () = shut_down(&mut shutdown) => return (Ending::ServerShutdown, Some(shutting_down())),
            Ok(()) = superseded.changed() => {
                // Closed already: the VM's session is the newer one.
                let message = "a newer session of this VM replaced this one";
                return (Ending::Closed, Some(Status::aborted(message)));
            }
            _ = heartbeat.tick() => {
                sequence += 1;
                out.tell(server_message::Kind::Heartbeat(Heartbeat { sequence }))
            }
            Ok(()) = signatures.changed() => {
                let ruleset = state.engine.ruleset();
                let notice = server_message::Kind::SignaturesChanged(SignaturesChanged {
                    signatures_version: ruleset.version().to_owned(),
                    rule_count: ruleset.rule_count() as u64,
                });
                out.tell(notice)
            }
            Ok(()) = restart.changed() => {
                let reason = restart.borrow_and_update().clone().unwrap_or_default();
                out.tell(server_message::Kind::RestartSession(RestartSession { reason }))
            }
            message = incoming.message() => match message {
                // What a replaced session still had on its way is not its
                // VM's any more: the newer session speaks for it.
                Ok(Some(_)) if *superseded.borrow() => Ok(()),
                Ok(Some(message)) => {
                    session.touch();
                    note(&state.vms, session, message);
                    Ok(())
                }
                Ok(None) => return (Ending::Closed, None),
                // Broken, or a message the server would not decode: the
                // agent is told why, if it still listens.
                Err(status) => return (Ending::Dropped, Some(status)),
            },
            () = &mut silent => {
                let quiet = session.last_seen().elapsed();
                if quiet >= silence {
                    let message = format!(
                        "no message from the agent for three heartbeat intervals ({silence:?}); the session is closed"
                    );
                    return (Ending::Dropped, Some(Status::deadline_exceeded(message)));
                }
                silent.as_mut().reset(tokio::time::Instant::now() + (silence - quiet));
                Ok(())
            }
        };
        if let Err(status) = told {
            return (Ending::Dropped, status);
        }
    }
}

/// How a session, or a Connect waiting for its Hello, ends as the server
/// stops.
fn shutting_down() -> Status {
    Status::unavailable("the server is shutting down")
}

/// An agent's text as logs show it: its first [`MAX_IDENTITY_LEN`] bytes
/// (logged quoted and escaped, so that it cannot forge a log line).
fn shown(text: &str) -> &str {
    &text[..text.floor_char_boundary(MAX_IDENTITY_LEN)]
}

/// Records what the agent tells.
fn note(vms: &Vms, session: &Session, message: AgentMessage) {
    let vm = session.agent.vm_id.as_str();
    match message.kind {
        Some(agent_message::Kind::Task(task)) => {
            // Kept with the VM until the task ends: what the agent names
            // there must stay small.
            if task.task_id.len() > MAX_IDENTITY_LEN {
                if session.event_logged() {
                    tracing::warn!(
                        session = %session.id, vm, length = task.task_id.len(),
                        "scan task event ignored: its task id is over {MAX_IDENTITY_LEN} bytes"
                    );
                }
                return;
            }
            if session.event_logged() {
                tracing::info!(
                    session = %session.id, vm, task = ?task.task_id,
                    kind = ?task.kind(), state = ?task.state(), detections = task.detections,
                    failed_files = task.failed_files, "scan task"
                );
            }
            match task.state() {
                TaskState::Started => vms.task_started(session, &task.task_id, task.kind()),
                TaskState::Finished => {
                    let untagged = vms.task_finished(
                        session,
                        &task.task_id,
                        task.kind(),
                        task.detections,
                        task.failed_files,
                    );
                    if untagged {
                        session.tagged(SecurityTag::VirusFound, false);
                    }
                }
                TaskState::Unspecified => {}
            }
        }
        Some(agent_message::Kind::Integrity(event)) => {
            if session.event_logged() {
                tracing::warn!(
                    session = %session.id, vm, kind = ?event.kind(), object = ?shown(&event.object),
                    "integrity event"
                );
            }
            vms.integrity(vm, event.kind());
        }
        Some(agent_message::Kind::NetworkAttack(attack)) => {
            if session.event_logged() {
                tracing::warn!(
                    session = %session.id, vm, source = ?shown(&attack.source_address),
                    description = ?shown(&attack.description), "network attack"
                );
            }
            if vms.network_attack(vm) {
                session.tagged(SecurityTag::IdsIps, true);
            }
        }
        Some(agent_message::Kind::Status(status)) => {
            vms.integration_server(session, status.integration_server_connected);
        }
        Some(agent_message::Kind::Heartbeat(_)) | Some(agent_message::Kind::Hello(_)) | None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        proto,
        sessions::{EVENTS_LOGGED, LogBudget, Subject, TAGS_LOGGED, fixtures},
    };

    /// An agent's events take at most `EVENTS_LOGGED` log lines a minute;
    /// how many went unlogged is logged once the minute is over.
    #[tokio::test(start_paused = true)]
    async fn an_agents_events_take_a_bounded_share_of_the_log() {
        let (logged, _logging) = crate::testlog::Logged::capture();
        let mut logs = LogBudget::new(
            "lines telling of events",
            EVENTS_LOGGED,
            "session-1",
            "desk-1",
        );
        let taken = (0..1000).filter(|_| logs.take()).count();
        assert_eq!(taken, EVENTS_LOGGED as usize);
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(!logs.take());
        assert_eq!(logged.lines("not logged"), 0);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(logs.take(), "a new minute");
        assert_eq!(logged.lines("unlogged=881"), 1);
        assert_eq!(logged.lines("desk-1"), 1);
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(logs.take());
        assert_eq!(logged.lines("not logged"), 1, "none went unlogged since");
        for _ in 0..200 {
            logs.take();
        }
        drop(logs);
        assert_eq!(logged.lines("unlogged=81"), 1, "said as the session ends");
    }

    /// An agent whose files tag its VM and whose clean full scans untag
    /// it, over and over, has the tag lines logged within a budget of
    /// their own, not two lines a round; the first are logged, however
    /// many lines of malware found or of events come with them.
    #[tokio::test(start_paused = true)]
    async fn tag_lines_take_a_bounded_share_of_the_log() {
        let (logged, _logging) = crate::testlog::Logged::capture();
        let vms = Arc::new(Vms::in_memory());
        let sessions = crate::sessions::Sessions::new(
            10,
            &Default::default(),
            Arc::clone(&vms),
            Default::default(),
        );
        let session = sessions.open(fixtures::agent_of("desk-1")).unwrap();
        let infected = fixtures::infected();
        let task = |state: TaskState| AgentMessage {
            kind: Some(agent_message::Kind::Task(proto::TaskEvent {
                task_id: "full".into(),
                kind: proto::TaskKind::FullScan as i32,
                state: state as i32,
                ..Default::default()
            })),
        };
        for _ in 0..1000 {
            let found = [(Subject::Digest(&[0; 32]), &infected)];
            session.record_files(0, found);
            note(&vms, &session, task(TaskState::Started));
            note(&vms, &session, task(TaskState::Finished));
            assert!(vms.get("desk-1").unwrap().tags.is_empty());
        }
        let assigned = logged.lines("security tag assigned");
        let removed = logged.lines("security tag removed");
        assert_eq!(assigned + removed, TAGS_LOGGED as usize);
        assert!(logged.lines("malware found") > 0 && logged.lines("scan task") > 0);
    }

    /// One certificate names one VM: an address is written one way only.
    #[test]
    fn a_vm_id_from_a_certificate_has_one_spelling() {
        let names = vec!["desk-12.vdi.example".to_owned(), "fd00::5".to_owned()];
        let key = rcgen::KeyPair::generate().unwrap();
        let certificate = rcgen::CertificateParams::new(names)
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = certificate.der();
        assert!(check_certified("desk-12.vdi.example", Some(der)).is_ok());
        assert!(check_certified("fd00::5", Some(der)).is_ok());
        for alias in [
            "DESK-12.vdi.example",
            "desk-12.vdi.example.",
            "fd00:0::5",
            "fd00::0005",
        ] {
            let err = check_certified(alias, Some(der)).expect_err(alias);
            assert!(err.contains("must be"), "{alias}: {err}");
        }
        assert!(check_certified("desk-13.vdi.example", Some(der)).is_err());
        assert!(check_certified("fd00::5", None).is_err());
    }
}
