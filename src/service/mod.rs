//! The Light Agent gRPC service, `scanserver.v1.ProtectionServer`.
//!
//! * [`session`]: `Connect`, the agent session (hello, heartbeats, events).
//! * [`scan`]: `Scan` (many files multiplexed on one stream, hash first) and
//!   `ScanFile` (one file per call).
//! * [`replies`]: a `Scan` stream's replies on their way, bounded in bytes.
//! * [`upload`]: receiving one file's content, in memory or spooled.
//! * `Lookup` is answered here, from the verdict cache.
//!
//! Every handler works on the shared [`ServiceState`].

pub mod replies;
pub mod scan;
pub mod session;
pub mod upload;

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use parking_lot::Mutex;
use prost::Message;
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    cache::{
        CacheKey, Digest,
        flight::{UPLOAD_WAIT, Waiter},
    },
    config::Config,
    engine::Engine,
    intake::{IntakeLayer, LOOKUP_WEIGHT, MAX_LOOKUP_MESSAGE},
    proto::{
        AgentMessage, FileChunk, FileVerdict, LookupReply, LookupRequest, LookupResult,
        ScanRequest, protection_server_server::ProtectionServer,
    },
    sessions::{
        LOOKUPS_AT_ONCE, LogBudget, MALWARE_LOGGED, REJECTIONS_LOGGED, Session, Sessions, Subject,
    },
    signatures::Ruleset,
    vms::Vms,
};

use self::scan::ScanFileCalls;
use upload::UploadStore;

/// Digests accepted in one Lookup request.
pub const MAX_LOOKUP_DIGESTS: usize = 100_000;

/// The bytes a digest takes in a Lookup's message: its field's tag, its
/// length, and its 32 bytes.
const DIGEST_IN_MESSAGE: usize = 34;

/// What a Lookup's answer may weigh (see [`Answer::weight`]) for each
/// digest its request names: the room the digest took in the message (see
/// [`LOOKUP_WEIGHT`]) less what the Lookup holds of the digest itself while
/// it answers (the digest, and its place among those under way). Plenty
/// for verdicts clean and unknown; one with many detections weighs more,
/// and a Lookup naming many of those gives the last of them as unknown,
/// rather than hold more than its room. (Unknown asks the agent to scan
/// the file, which then gets its verdict from the cache.)
const ANSWER_PER_DIGEST: usize = LOOKUP_WEIGHT * DIGEST_IN_MESSAGE
    - std::mem::size_of::<Digest>()
    - std::mem::size_of::<(usize, Waiter)>();

// Every digest's answer may be unknown.
const _: () = assert!(Answer::UNKNOWN <= ANSWER_PER_DIGEST);

// The largest Lookup the service accepts is one the intake lets through.
const _: () =
    assert!(MAX_LOOKUP_DIGESTS * DIGEST_IN_MESSAGE + 2 * MAX_SESSION_ID_LEN <= MAX_LOOKUP_MESSAGE);

/// The longest session id accepted: the server's are 36 bytes. A longer
/// one is refused without being repeated back (errors name the session).
pub const MAX_SESSION_ID_LEN: usize = 64;

/// The longest file path accepted in a begin or a `ScanFile` call, in
/// bytes: a Windows long path has at most 32,767 characters, each at most 3
/// bytes in UTF-8. A file's path stays with it until its verdict (for the
/// rules, the logs and the VM's records): on a Scan stream, within the
/// server's `uploads.path_budget` (see [`crate::sessions::Session::take_place`]);
/// `ScanFile` calls, `files_in_flight` at most, are bounded by their number.
pub const MAX_PATH_LEN: usize = 96 << 10;

/// Checks a file's path against [`MAX_PATH_LEN`].
fn check_path(path: &str) -> Result<(), Status> {
    if path.len() > MAX_PATH_LEN {
        return Err(Status::invalid_argument(format!(
            "the file's path is {} bytes long; at most {MAX_PATH_LEN} are accepted",
            path.len()
        )));
    }
    Ok(())
}

/// What every handler shares.
pub struct ServiceState {
    pub engine: Arc<Engine>,
    pub sessions: Arc<Sessions>,
    /// The protected VMs, told what agents report.
    pub vms: Arc<Vms>,
    pub uploads: UploadStore,
    /// The memory the agent listener's calls hold for their messages.
    pub intake: IntakeLayer,
    pub svm_id: String,
    pub allowed_tags: Vec<String>,
    pub heartbeat_interval: Duration,
    pub idle_timeout: Duration,
    /// `ScanFile` calls at once (the same number as one session's files
    /// in flight), and from one address.
    scan_file_calls: ScanFileCalls,
    /// The lines telling of malware found through `ScanFile` calls, which
    /// have no session: their own budget, for the whole server.
    scan_file_malware_logs: Mutex<LogBudget>,
    /// The lines telling of agents rejected at their Hello, which take no
    /// place and have no session: agents of a whole estate refused (a tag
    /// not allowed, an older version), each trying again, must not fill
    /// the journal. Their own budget, for the whole server.
    rejection_logs: Mutex<LogBudget>,
    /// Whether the agent listener is TLS.
    pub encrypted: bool,
    /// Whether a Hello's VM id must be a name of the agent's certificate,
    /// and its session used over connections with that certificate only
    /// (`tls.vm_id_in_certificate`).
    pub vm_id_in_certificate: bool,
    /// The current signatures version; sessions tell their agent when it
    /// changes.
    signatures: watch::Sender<Arc<str>>,
    /// Becomes true when the server shuts down; sessions and streams end.
    shutdown: watch::Receiver<bool>,
    pub counters: Counters,
}

/// Service-wide counters.
#[derive(Default)]
pub struct Counters {
    /// Content requests sent (hash-first misses).
    pub content_requests: AtomicU64,
    /// Content bytes received from agents.
    pub bytes_received: AtomicU64,
    /// Scan streams closed as idle: nothing came on them, and nothing was
    /// owed on them, for the idle timeout.
    pub idle_streams: AtomicU64,
}

impl Counters {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

impl ServiceState {
    pub fn new(
        engine: Arc<Engine>,
        config: &Config,
        vms: Arc<Vms>,
        shutdown: watch::Receiver<bool>,
    ) -> std::io::Result<Self> {
        let (signatures, _) = watch::channel(engine.ruleset().version_arc());
        Ok(ServiceState {
            sessions: Arc::new(Sessions::new(
                config.server.max_agents,
                &config.uploads,
                Arc::clone(&vms),
                Arc::clone(engine.metrics()),
            )),
            vms,
            uploads: UploadStore::new(config.uploads.clone(), &config.spool_dir())?,
            intake: IntakeLayer::new(config.uploads.message_budget)
                .answer_wait(config.server.idle_timeout),
            svm_id: config.server.svm_id.clone(),
            allowed_tags: config.server.allowed_tags.clone(),
            heartbeat_interval: config.server.heartbeat_interval,
            idle_timeout: config.server.idle_timeout,
            scan_file_calls: ScanFileCalls::new(config.uploads.files_in_flight),
            scan_file_malware_logs: Mutex::new(LogBudget::new(
                "lines telling of malware found through ScanFile calls",
                MALWARE_LOGGED,
                "",
                "",
            )),
            rejection_logs: Mutex::new(LogBudget::new(
                "lines telling of agents rejected",
                REJECTIONS_LOGGED,
                "",
                "",
            )),
            encrypted: config.tls.is_some(),
            vm_id_in_certificate: config.tls.as_ref().is_some_and(|t| t.vm_id_in_certificate),
            signatures,
            shutdown,
            counters: Counters::default(),
            engine,
        })
    }

    /// `ScanFile` calls holding a place now (from their first chunk to
    /// their verdict).
    pub fn scan_file_calls(&self) -> usize {
        self.scan_file_calls.open()
    }

    /// Replaces the signatures and tells every connected agent; a
    /// blocking call (see [`Engine::replace_ruleset`]).
    pub fn replace_ruleset(&self, ruleset: Ruleset) {
        self.engine.replace_ruleset(ruleset);
        self.signatures
            .send_replace(self.engine.ruleset().version_arc());
    }

    /// The digest of the certificate the client of `request` presented,
    /// which sessions are bound to: only when VM ids are taken from
    /// certificates (none is needed otherwise).
    fn caller<T>(&self, request: &Request<T>) -> Option<Digest> {
        if !self.vm_id_in_certificate {
            return None;
        }
        let chain = request.peer_certs()?;
        chain.first().map(|certificate| blake3::hash(certificate))
    }

    /// The open session `id`, for a request over a connection with the
    /// certificate of digest `caller` (see [`Self::caller`]), or the error
    /// an agent can act on. With VM ids taken from certificates, a session
    /// is its certificate's: its id (logged, not a secret) does not let
    /// another agent speak for its VM.
    fn session(&self, id: &str, caller: Option<&Digest>) -> Result<Arc<Session>, Status> {
        if id.len() > MAX_SESSION_ID_LEN {
            return Err(Status::invalid_argument(format!(
                "a session id of {} bytes is none of this server's (at most {MAX_SESSION_ID_LEN}): use the session id of your Welcome",
                id.len()
            )));
        }
        let session = self.sessions.get(id).ok_or_else(|| {
            // Sessions end first as the server stops: one gone then is
            // not the agent's mistake.
            if *self.shutdown.borrow() {
                return Status::unavailable(
                    "the server is shutting down; send this file to another SVM",
                );
            }
            Status::failed_precondition(format!(
                "unknown session `{id}`: open a session with Connect and use the session id of its Welcome"
            ))
        })?;
        if self.vm_id_in_certificate && session.agent.certificate.as_ref() != caller {
            return Err(Status::permission_denied(format!(
                "session `{id}` was opened with another certificate: use the session your own Connect opened"
            )));
        }
        Ok(session)
    }
}

/// The tonic service.
#[derive(Clone)]
pub struct ProtectionService {
    state: Arc<ServiceState>,
}

impl ProtectionService {
    pub fn new(state: Arc<ServiceState>) -> Self {
        ProtectionService { state }
    }
}

#[tonic::async_trait]
impl ProtectionServer for ProtectionService {
    type ConnectStream = session::SessionStream;
    type ScanStream = replies::ReplyStream;

    async fn connect(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let (outbox, stream) = session::Outbox::new();
        // The agent's own certificate, under mutual TLS.
        let certificate = request
            .peer_certs()
            .and_then(|chain| chain.first().cloned());
        tokio::spawn(session::run(
            Arc::clone(&self.state),
            request.into_inner(),
            certificate,
            outbox,
        ));
        Ok(Response::new(stream))
    }

    async fn scan(
        &self,
        request: Request<Streaming<ScanRequest>>,
    ) -> Result<Response<Self::ScanStream>, Status> {
        let peer = crate::intake::peer_of_call(request.extensions());
        let (tx, rx) = replies::queue(self.state.intake.shared_room(peer));
        let caller = self.state.caller(&request);
        tokio::spawn(scan::run(
            Arc::clone(&self.state),
            request.into_inner(),
            caller,
            tx,
        ));
        Ok(Response::new(rx))
    }

    async fn lookup(
        &self,
        request: Request<LookupRequest>,
    ) -> Result<Response<LookupReply>, Status> {
        let caller = self.state.caller(&request);
        let request = request.into_inner();
        // A request that can never be answered says so first, whatever
        // else holds (a retry would not mend it).
        if request.digests.len() > MAX_LOOKUP_DIGESTS {
            return Err(Status::invalid_argument(format!(
                "{} digests in one Lookup; send at most {MAX_LOOKUP_DIGESTS} per request",
                request.digests.len()
            )));
        }
        // The digests are views of the buffer the request came in (as
        // large as the request): copied out, so that the buffer goes before
        // the wait below (see `crate::intake`).
        let digests = (request.digests.iter().enumerate())
            .map(|(index, digest)| {
                parse_digest(digest)
                    .map_err(|e| Status::invalid_argument(format!("digest #{index}: {e}")))?
                    .ok_or_else(|| Status::invalid_argument(format!("digest #{index} is empty")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let session = self.state.session(&request.session_id, caller.as_ref())?;
        session.touch();
        let Ok(_answering) = session.lookups.try_acquire() else {
            return Err(Status::resource_exhausted(format!(
                "more than {LOOKUPS_AT_ONCE} Lookups at once for this VM; wait for their answers"
            )));
        };
        drop(request);
        let ruleset = self.state.engine.ruleset();
        let results = Answer::look_up(&self.state.engine, &ruleset, &digests).await;
        // A verdict given by digest counts for the agent's VM as one given
        // for content: malware found this way tags the VM too. Infected
        // content is counted and logged once, however many times the
        // Lookup names it (one line per copy would let an agent flood the
        // log of malware found).
        let mut infected = HashSet::new();
        let given = digests.iter().zip(&results);
        session.record_files(
            0,
            given.filter_map(|(digest, r)| {
                let verdict = r.verdict.as_ref()?;
                let first = verdict.detection_count() == 0 || infected.insert(digest);
                first.then_some((Subject::Digest(digest.as_bytes()), verdict))
            }),
        );
        let signatures_version = ruleset.version().to_owned();
        Ok(Response::new(LookupReply {
            results,
            signatures_version,
        }))
    }

    async fn scan_file(
        &self,
        request: Request<Streaming<FileChunk>>,
    ) -> Result<Response<FileVerdict>, Status> {
        let ends = crate::connections::Ends::of(request.extensions());
        scan::scan_file(&self.state, request.into_inner(), ends)
            .await
            .map(Response::new)
    }
}

/// A Lookup's results, as they are made, within what its room allows:
/// [`ANSWER_PER_DIGEST`] for each digest. Each digest's result weighs at
/// least as much as an unknown one, which is set aside for every digest
/// at the start; a verdict that would weigh more than is left is given as
/// unknown.
struct Answer {
    results: Vec<LookupResult>,
    /// What is left to weigh, over what the results' unknowns weigh.
    left: usize,
}

impl Answer {
    /// What a result without detections (clean, unknown) takes encoded:
    /// a few bytes. It is not encoded to be weighed.
    const FEW: usize = 16;

    /// What an unknown result weighs (see [`Self::weight`]).
    const UNKNOWN: usize = std::mem::size_of::<LookupResult>() + 2 * Self::FEW;

    fn new(digests: usize) -> Self {
        Answer {
            results: Vec::with_capacity(digests),
            left: digests * (ANSWER_PER_DIGEST - Self::UNKNOWN),
        }
    }

    /// The answer for `digests` under `ruleset`: the verdicts cached, and
    /// those of scans under way once they land (for at most
    /// [`UPLOAD_WAIT`]); unknown for the rest.
    async fn look_up(engine: &Engine, ruleset: &Ruleset, digests: &[Digest]) -> Vec<LookupResult> {
        let cache = engine.cache();
        let mut answer = Answer::new(digests.len());
        // Digests being uploaded or scanned right now are answered when
        // their scan lands.
        let mut under_way = Vec::new();
        for (index, digest) in digests.iter().enumerate() {
            // A Lookup names no files: when the rules look at names, no
            // verdict holds for a digest alone (one cached for content sent
            // without a name is not the verdict on this agent's file).
            if ruleset.name_sensitive() {
                answer.push(None);
                continue;
            }
            let key = CacheKey::new(digest, ruleset, None);
            let mut known = cache.get(&key);
            // Content refused unscanned is unknown at once: no scan of it
            // lands anything (see `Engine::refused_content`).
            if known.is_none() && engine.refused_content(digest, &key).is_none() {
                match cache.flights().waiting(&key) {
                    Some(waiter) => under_way.push((index, waiter)),
                    // A flight that landed since the look above left its
                    // verdict in the cache.
                    None => known = cache.peek(&key),
                }
            }
            answer.push(known.map(|hit| FileVerdict::in_lookup(&hit, false)));
        }
        let deadline = tokio::time::Instant::now() + UPLOAD_WAIT;
        for (index, waiter) in under_way {
            // A scan that began under these signatures may have run with
            // newer ones (replaced meanwhile): the reply has one version
            // for all its verdicts, so such a verdict is left out.
            let verdict = waiter
                .verdict(deadline)
                .await
                .filter(|landed| *landed.rules_version == *ruleset.version())
                .map(|landed| FileVerdict::in_lookup(&landed, true));
            answer.set(index, verdict);
        }
        answer.results
    }

    /// What a result holds, about: itself, its detections, and its
    /// strings (their bytes in its encoding), once in memory and once in
    /// the reply's encoding.
    fn weight(result: &LookupResult) -> usize {
        let detections = (result.verdict.as_ref()).map_or(0, FileVerdict::detection_count);
        let encoded = match detections {
            0 => Self::FEW,
            _ => result.encoded_len() + 2,
        };
        std::mem::size_of::<LookupResult>()
            + detections * std::mem::size_of::<crate::proto::Detection>()
            + 2 * encoded
    }

    /// The result of a digest: `verdict`, if its weight is left.
    fn result(&mut self, verdict: Option<FileVerdict>) -> LookupResult {
        let result = LookupResult { verdict };
        let over = Self::weight(&result) - Self::UNKNOWN;
        match self.left.checked_sub(over) {
            Some(left) => {
                self.left = left;
                result
            }
            None => LookupResult { verdict: None },
        }
    }

    /// Adds the next digest's result.
    fn push(&mut self, verdict: Option<FileVerdict>) {
        let result = self.result(verdict);
        self.results.push(result);
    }

    /// Sets the result of digest `index`, unknown so far.
    fn set(&mut self, index: usize, verdict: Option<FileVerdict>) {
        self.results[index] = self.result(verdict);
    }
}

/// A digest from the wire: empty means none; otherwise 32 bytes.
pub fn parse_digest(bytes: &[u8]) -> Result<Option<blake3::Hash>, String> {
    match bytes.len() {
        0 => Ok(None),
        32 => Ok(Some(blake3::Hash::from_bytes(
            bytes.try_into().expect("32 bytes"),
        ))),
        n => Err(format!("a blake3 digest is 32 bytes, not {n}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Clean, Detection, Infected, Verdict, verdict};

    fn found(kind: verdict::Kind) -> Option<FileVerdict> {
        Some(FileVerdict {
            verdict: Some(Verdict { kind: Some(kind) }),
            cached: true,
            ..FileVerdict::default()
        })
    }

    fn infected(detections: usize) -> Option<FileVerdict> {
        let detection = Detection {
            rule: "Some_Rule_Name".into(),
            namespace: "default".into(),
            tags: vec!["malware".into()],
            ..Detection::default()
        };
        found(verdict::Kind::Infected(Infected {
            detections: vec![detection; detections],
        }))
    }

    #[test]
    fn a_lookup_answers_within_its_room() {
        // Clean and unknown, however many: every verdict given.
        let mut answer = Answer::new(1000);
        for i in 0..1000 {
            answer.push(
                (i % 2 == 0)
                    .then(|| found(verdict::Kind::Clean(Clean {})))
                    .flatten(),
            );
        }
        let given = |answer: &Answer| {
            answer
                .results
                .iter()
                .filter(|r| r.verdict.is_some())
                .count()
        };
        assert_eq!(given(&answer), 500);
        // So is a verdict with a detection among them.
        let mut answer = Answer::new(1000);
        answer.push(infected(1));
        for _ in 1..1000 {
            answer.push(None);
        }
        assert_eq!(given(&answer), 1);
        // Verdicts with many detections: the last are unknown, and the
        // answer weighs no more than its room allows.
        let mut answer = Answer::new(1000);
        for _ in 0..1000 {
            answer.push(infected(20));
        }
        assert!((1..1000).contains(&given(&answer)), "{}", given(&answer));
        let weight: usize = answer.results.iter().map(Answer::weight).sum();
        assert!(weight <= 1000 * ANSWER_PER_DIGEST);
    }
}
