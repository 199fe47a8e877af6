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
//! ended decides the VM's status.

use std::{sync::Arc, time::Duration};

use rustls_pki_types::{CertificateDer, ServerName};
use tokio::sync::{mpsc, watch};
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
    vms::{Ending, Vms},
};

/// How long a new stream may take to send its Hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

type Outbox = mpsc::Sender<Result<ServerMessage, Status>>;

/// Messages to an agent its session may have queued (heartbeats, notices)
/// before it ends the session: the agent does not read.
pub(super) const OUTBOX: usize = 16;

/// Runs one session to its end.
pub(super) async fn run(
    state: Arc<ServiceState>,
    mut incoming: Streaming<AgentMessage>,
    certificate: Option<CertificateDer<'static>>,
    out: Outbox,
) {
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, incoming.message()).await {
        Ok(Ok(Some(AgentMessage {
            kind: Some(agent_message::Kind::Hello(hello)),
        }))) => hello,
        Ok(Ok(Some(_))) => {
            return reject(
                &out,
                RejectReason::InvalidHello,
                "the first message must be a Hello",
            )
            .await;
        }
        Err(_) => {
            let message = format!("no Hello within {HELLO_TIMEOUT:?}");
            return reject(&out, RejectReason::InvalidHello, &message).await;
        }
        // A first message the server would not decode: the agent is told why.
        Ok(Err(status)) => {
            let _ = out.send(Err(status)).await;
            return;
        }
        Ok(Ok(None)) => return,
    };
    let session = match admit(&state, &hello, certificate.as_ref()) {
        Ok(session) => session,
        Err((reason, message)) => return reject(&out, reason, &message).await,
    };
    tracing::info!(
        session = %session.id, agent = %hello.agent_id, vm = %hello.vm_id, vm_name = %hello.vm_name,
        "agent connected"
    );
    // Watched from before the Welcome is made: a change while it is on its
    // way is told after it, not lost.
    let watched = Watched::subscribe(&state, &session);
    let ending = match out.send(Ok(welcome(&state, &session))).await {
        Ok(()) => serve(&state, &session, incoming, &out, watched).await,
        Err(_) => Ending::Dropped,
    };
    state.sessions.close(&session.id, ending);
    tracing::info!(session = %session.id, vm = %session.agent.vm_id, ?ending, "agent disconnected");
}

/// Checks a Hello (sent with the agent's `certificate`, under mutual TLS)
/// and opens the session, or says why not.
fn admit(
    state: &ServiceState,
    hello: &Hello,
    certificate: Option<&CertificateDer<'_>>,
) -> Result<Arc<Session>, (RejectReason, String)> {
    if let Err(message) = check_identity(hello) {
        return Err((RejectReason::InvalidHello, message));
    }
    if state.vm_id_in_certificate
        && let Err(message) = check_certified(&hello.vm_id, certificate)
    {
        return Err((RejectReason::NotCertified, message));
    }
    if hello.protocol_version != PROTOCOL_VERSION {
        return Err((
            RejectReason::IncompatibleVersion,
            format!(
                "protocol version {} is not supported; this server speaks version {PROTOCOL_VERSION}",
                hello.protocol_version
            ),
        ));
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

fn welcome(state: &ServiceState, session: &Session) -> ServerMessage {
    let uploads = state.uploads.config();
    ServerMessage {
        kind: Some(server_message::Kind::Welcome(Welcome {
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
        })),
    }
}

async fn reject(out: &Outbox, reason: RejectReason, message: &str) {
    tracing::info!(?reason, message, "agent rejected");
    let rejection = Rejection {
        reason: reason as i32,
        message: message.to_owned(),
    };
    let _ = out
        .send(Ok(ServerMessage {
            kind: Some(server_message::Kind::Rejection(rejection)),
        }))
        .await;
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

/// Sends the agent `message`; false when the session is over: its stream
/// is gone, or its agent has let [`OUTBOX`] messages pile up unread. Never
/// waits: a session waiting on an agent that does not read would check
/// neither its heartbeats nor shutdown.
fn tell(out: &Outbox, session: &Session, message: server_message::Kind) -> bool {
    match out.try_send(Ok(ServerMessage {
        kind: Some(message),
    })) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(_)) => {
            tracing::warn!(session = %session.id, "the agent does not read its session stream");
            false
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    }
}

/// The life of an admitted session, and how it ended.
async fn serve(
    state: &ServiceState,
    session: &Session,
    mut incoming: Streaming<AgentMessage>,
    out: &Outbox,
    watched: Watched,
) -> Ending {
    let mut heartbeat = tokio::time::interval(state.heartbeat_interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let Watched {
        mut signatures,
        mut restart,
        mut superseded,
    } = watched;
    let mut shutdown = state.shutdown.clone();
    let mut sequence = 0;
    loop {
        let message = tokio::select! {
            message = incoming.message() => message,
            _ = heartbeat.tick() => {
                if session.last_seen().elapsed() > state.heartbeat_interval * 3 {
                    tracing::warn!(session = %session.id, "agent missed three heartbeats");
                    return Ending::Dropped;
                }
                sequence += 1;
                let beat = server_message::Kind::Heartbeat(Heartbeat { sequence });
                if !tell(out, session, beat) {
                    return Ending::Dropped;
                }
                continue;
            }
            Ok(()) = signatures.changed() => {
                let ruleset = state.engine.ruleset();
                let notice = server_message::Kind::SignaturesChanged(SignaturesChanged {
                    signatures_version: ruleset.version().to_owned(),
                    rule_count: ruleset.rule_count() as u64,
                });
                if !tell(out, session, notice) {
                    return Ending::Dropped;
                }
                continue;
            }
            Ok(()) = superseded.changed() => {
                // Closed already: the VM's session is the newer one.
                let message = "a newer session of this VM replaced this one";
                let _ = out.try_send(Err(Status::aborted(message)));
                return Ending::Closed;
            }
            Ok(()) = restart.changed() => {
                let reason = restart.borrow_and_update().clone().unwrap_or_default();
                let notice = server_message::Kind::RestartSession(RestartSession { reason });
                if !tell(out, session, notice) {
                    return Ending::Dropped;
                }
                continue;
            }
            () = shut_down(&mut shutdown) => {
                let _ = out.try_send(Err(Status::unavailable("the server is shutting down")));
                return Ending::ServerShutdown;
            }
        };
        match message {
            // What a replaced session still had on its way is not its
            // VM's any more: the newer session speaks for it.
            Ok(Some(_)) if *superseded.borrow() => {}
            Ok(Some(message)) => {
                session.touch();
                note(&state.vms, session, message);
            }
            Ok(None) => return Ending::Closed,
            Err(status) => {
                // Broken, or a message the server would not decode: the
                // agent is told why, if it still listens.
                let _ = out.try_send(Err(status));
                return Ending::Dropped;
            }
        }
    }
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
                tracing::warn!(
                    session = %session.id, vm, length = task.task_id.len(),
                    "scan task event ignored: its task id is over {MAX_IDENTITY_LEN} bytes"
                );
                return;
            }
            tracing::info!(
                session = %session.id, vm, task = ?task.task_id,
                kind = ?task.kind(), state = ?task.state(), detections = task.detections,
                failed_files = task.failed_files, "scan task"
            );
            match task.state() {
                TaskState::Started => vms.task_started(session, &task.task_id, task.kind()),
                TaskState::Finished => {
                    vms.task_finished(
                        session,
                        &task.task_id,
                        task.kind(),
                        task.detections,
                        task.failed_files,
                    );
                }
                TaskState::Unspecified => {}
            }
        }
        Some(agent_message::Kind::Integrity(event)) => {
            tracing::warn!(
                session = %session.id, vm, kind = ?event.kind(), object = ?shown(&event.object),
                "integrity event"
            );
            vms.integrity(vm, event.kind());
        }
        Some(agent_message::Kind::NetworkAttack(attack)) => {
            tracing::warn!(
                session = %session.id, vm, source = ?shown(&attack.source_address),
                description = ?shown(&attack.description), "network attack"
            );
            vms.network_attack(vm);
        }
        Some(agent_message::Kind::Status(status)) => {
            vms.integration_server(vm, status.integration_server_connected);
        }
        Some(agent_message::Kind::Heartbeat(_)) | Some(agent_message::Kind::Hello(_)) | None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
