//! The registry of connected Light Agents.
//!
//! A session exists from an accepted Hello until its `Connect` stream ends
//! (or misses three heartbeats). Scan and Lookup requests name their session;
//! the registry keeps per-session counters (files, bytes, detections) and the
//! last time the agent was heard from, for status and reporting. Opening and
//! closing sessions, and verdicts with detections, are passed on to the
//! registry of protected VMs ([`Vms`]).

use std::{
    collections::HashMap,
    sync::{
        Arc, Weak,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Instant, SystemTime},
};

use parking_lot::{Mutex, RwLock};
use tokio::sync::{Semaphore, watch};

use crate::{
    config::UploadConfig,
    metrics::{Metrics, Tally},
    proto::{self, FileVerdict, Hello},
    vms::{Ending, SecurityTag, Vms},
};

/// Who an agent is, from its Hello.
#[derive(Debug, Clone)]
pub struct AgentIdentity {
    pub agent_id: String,
    pub vm_id: String,
    pub vm_name: String,
    pub os: String,
    pub agent_version: String,
    /// The blake3 digest of the certificate the agent connected with, when
    /// the server takes VM ids from certificates: only connections with
    /// that certificate may use the session.
    pub certificate: Option<blake3::Hash>,
}

impl From<&Hello> for AgentIdentity {
    fn from(hello: &Hello) -> Self {
        AgentIdentity {
            agent_id: hello.agent_id.clone(),
            vm_id: hello.vm_id.clone(),
            vm_name: hello.vm_name.clone(),
            os: hello.os.clone(),
            agent_version: hello.agent_version.clone(),
            certificate: None,
        }
    }
}

/// What a verdict given to an agent was for, as the log of malware found
/// names it.
#[derive(Debug, Clone, Copy)]
pub enum Subject<'a> {
    /// A file, by the path its agent gave (a Scan begin, a ScanFile call).
    Path(&'a str),
    /// Content by its digest alone (a Lookup).
    Digest(&'a [u8]),
}

/// The log lines of one kind one source may take (a session's events, the
/// malware found in its files; the `ScanFile` calls'; the agents rejected
/// at their Hello): `per_minute` a minute. An agent that sends more
/// (ransomware touching thousands of files, or an agent gone wrong) must
/// not fill the SVM's journal and disk, nor have journald's own rate limit
/// drop other lines; its VM's record still counts everything, and how
/// many lines went unlogged is
/// logged with the first line taken after the minute, and when the budget
/// is dropped (a burst is often the last thing an agent sends).
#[derive(Debug)]
pub struct LogBudget {
    /// What the lines tell, for the line that says how many went unlogged.
    what: &'static str,
    session: String,
    vm: String,
    per_minute: u32,
    since: tokio::time::Instant,
    logged: u32,
    unlogged: u64,
}

impl LogBudget {
    /// A budget for lines telling `what`, of the session `session` of VM
    /// `vm` (empty for none).
    pub fn new(what: &'static str, per_minute: u32, session: &str, vm: &str) -> Self {
        LogBudget {
            what,
            session: session.to_owned(),
            vm: vm.to_owned(),
            per_minute,
            since: tokio::time::Instant::now(),
            logged: 0,
            unlogged: 0,
        }
    }

    /// Whether its minute, begun by a line, is still under way.
    fn recent(&self) -> bool {
        self.logged > 0 && self.since.elapsed() < std::time::Duration::from_secs(60)
    }

    /// Whether a line may be logged now.
    pub fn take(&mut self) -> bool {
        if self.since.elapsed() >= std::time::Duration::from_secs(60) {
            self.log_unlogged();
            (self.since, self.logged, self.unlogged) = (tokio::time::Instant::now(), 0, 0);
        }
        self.logged = self.logged.saturating_add(1);
        self.unlogged += u64::from(self.logged > self.per_minute);
        self.logged <= self.per_minute
    }

    fn log_unlogged(&self) {
        if self.unlogged > 0 {
            let named = |name: &str| (!name.is_empty()).then(|| name.to_owned());
            tracing::warn!(
                session = named(&self.session),
                vm = named(&self.vm),
                unlogged = self.unlogged,
                "{} were not logged: over {} a minute",
                self.what,
                self.per_minute
            );
        }
    }
}

impl Drop for LogBudget {
    fn drop(&mut self) {
        self.log_unlogged();
    }
}

/// Lines telling of malware found one VM's session may take a minute (see
/// [`LogBudget`]), and the `ScanFile` calls of the whole server.
pub const MALWARE_LOGGED: u32 = 600;

/// How many of one VM's events (scan tasks, integrity events, network
/// attacks) are logged a minute (see [`LogBudget`]).
pub const EVENTS_LOGGED: u32 = 120;

/// Lines telling of security tags assigned or removed one VM may take
/// a minute (see [`LogBudget`]): a tag changes a few times a day; more is
/// an agent gone wrong.
pub const TAGS_LOGGED: u32 = 10;

/// Lines telling of one VM's sessions opened, replaced and ended a minute
/// (see [`LogBudget`]), within the server's budget for them (see
/// [`Sessions::life_logged`]): an agent that reconnects a few times a
/// minute is logged each time; one that sends Hello after Hello takes no
/// more of the server's lines than this.
pub const SESSION_LINES_LOGGED: u32 = 12;

/// Lines telling of agents rejected at their Hello the whole server may
/// take a minute (see [`LogBudget`]).
pub const REJECTIONS_LOGGED: u32 = 120;

/// The most of a path a line telling of malware found shows: Windows paths
/// may be 96 KiB long, and a log line of that size is a line no one reads.
const PATH_LOGGED: usize = 4 << 10;

/// Logs malware found in `verdict`, given to the agent of `session` (none
/// for a `ScanFile` call, which names no session): the operator's record
/// of what was found on which VM, where the SVM's status and the VM's
/// security tag only say that something was. One warning per verdict, so
/// a file found on a hundred VMs is a hundred lines, each VM's own; from
/// the cache or a shared scan as much as from a scan of its own, which
/// `source` tells. Within `budget` (that of the session, or of the
/// `ScanFile` calls); paths cut to 4 KiB.
pub fn log_malware_found(
    budget: &Mutex<LogBudget>,
    session: Option<&Session>,
    subject: Subject<'_>,
    verdict: &FileVerdict,
) {
    let Some(proto::verdict::Kind::Infected(infected)) =
        verdict.verdict.as_ref().and_then(|v| v.kind.as_ref())
    else {
        return;
    };
    if !budget.lock().take() {
        return;
    }
    let list = |field: fn(&proto::Detection) -> &str| {
        let names: Vec<&str> = infected.detections.iter().map(field).collect();
        names.join(", ")
    };
    let (threats, rules) = (list(|d| &d.threat), list(|d| &d.rule));
    let source = match (verdict.cached, verdict.coalesced) {
        (true, _) => "cache",
        (false, true) => "coalesced",
        (false, false) => "scan",
    };
    let vm = session.map(|s| s.agent.vm_id.as_str());
    let vm_name = session.map(|s| s.agent.vm_name.as_str());
    let session = session.map(|s| s.id.as_str());
    match subject {
        Subject::Path(path) => {
            let path = crate::abridged(path, PATH_LOGGED);
            let path = path.as_ref();
            tracing::warn!(
                vm,
                vm_name,
                session,
                path,
                threats,
                rules,
                source,
                "malware found"
            );
        }
        Subject::Digest(digest) => {
            let digest = <[u8; 32]>::try_from(digest)
                .map(|digest| blake3::Hash::from_bytes(digest).to_hex().to_string())
                .unwrap_or_default();
            tracing::warn!(
                vm,
                vm_name,
                session,
                digest,
                threats,
                rules,
                source,
                "malware found"
            );
        }
    }
}

/// What a VM's files and Lookups hold, for as long as any of them holds
/// it.
#[derive(Default)]
struct VmPlaces {
    /// Its places in flight.
    files: Weak<Places>,
    /// Its share of the spool, in KiB permits.
    spool: Weak<Semaphore>,
    /// Its Lookups answered at once.
    lookups: Weak<Semaphore>,
    /// Its log lines: held here too, so that an agent that ends its
    /// session and opens another does not find its budgets new.
    logs: Option<Arc<VmLogs>>,
}

/// Each VM's [`VmPlaces`], and when to look for those all given back.
#[derive(Default)]
struct VmsPlaces {
    by_vm: HashMap<String, VmPlaces>,
    /// The entries at which they are next looked through.
    sweep_at: usize,
    /// Times they were looked through.
    #[cfg(test)]
    sweeps: usize,
}

impl VmPlaces {
    /// Whether anything of the VM is held: its places, by its files and
    /// sessions; its log budgets, by its sessions, or for the minute
    /// after their last line.
    fn held(&self) -> bool {
        let held = [
            self.files.strong_count(),
            self.spool.strong_count(),
            self.lookups.strong_count(),
        ];
        let logs = self.logs.as_ref();
        held.iter().sum::<usize>() > 0
            || logs.is_some_and(|logs| Arc::strong_count(logs) > 1 || logs.recent())
    }
}

/// The log lines one VM's sessions may take (see [`LogBudget`]): the VM's,
/// not each session's, so that an agent that opens session after session
/// (a Hello replaces the VM's session) does not get a budget with each.
#[derive(Debug)]
struct VmLogs {
    /// Lines telling of malware found in its files.
    malware: Mutex<LogBudget>,
    /// Lines telling of its agent's events (scan tasks, integrity events,
    /// network attacks).
    events: Mutex<LogBudget>,
    /// Lines telling of security tags its sessions' messages assigned or
    /// removed: their own, so that a burst of malware found or of events
    /// cannot leave out the line that says the VM's state changed.
    tags: Mutex<LogBudget>,
    /// Lines telling of its sessions opened, replaced and ended.
    lives: Mutex<LogBudget>,
}

impl VmLogs {
    fn new(vm: &str) -> Self {
        let budget = |what, per_minute| Mutex::new(LogBudget::new(what, per_minute, "", vm));
        VmLogs {
            malware: budget(
                "lines telling of malware found in this VM's files",
                MALWARE_LOGGED,
            ),
            events: budget("lines telling of this VM's agent's events", EVENTS_LOGGED),
            tags: budget(
                "lines telling of security tags assigned or removed",
                TAGS_LOGGED,
            ),
            lives: budget(
                "lines telling of this VM's sessions opened, replaced and ended",
                SESSION_LINES_LOGGED,
            ),
        }
    }

    /// Whether any of its budgets took a line within the last minute.
    fn recent(&self) -> bool {
        let budgets = [&self.malware, &self.events, &self.tags, &self.lives];
        budgets.iter().any(|budget| budget.lock().recent())
    }
}

/// What a VM's sessions share (see [`Sessions::places_of`]).
struct Shares {
    files: Arc<Places>,
    spool: Arc<Semaphore>,
    lookups: Arc<Semaphore>,
    logs: Arc<VmLogs>,
}

/// What `held` names while anyone holds it, or else a `fresh` one, which
/// `held` names from then on.
fn shared<T>(held: &mut Weak<T>, fresh: impl FnOnce() -> T) -> Arc<T> {
    held.upgrade().unwrap_or_else(|| {
        let fresh = Arc::new(fresh());
        *held = Arc::downgrade(&fresh);
        fresh
    })
}

/// Lookups one VM may have answered at once. Each holds its batch (up to
/// 100,000 digests) and may wait seconds for scans under way; an agent
/// pre-checking folders needs one or two at a time.
pub const LOOKUPS_AT_ONCE: usize = 4;

/// A VM's places for files in flight. Every file begun takes one and
/// gives it back at its final reply, a hundred thousand a second in a boot
/// storm: they are counted, not handed out by a semaphore (which locks to
/// give permits back), since a file that finds none is refused, never kept
/// waiting.
#[derive(Debug)]
struct Places {
    limit: usize,
    taken: AtomicUsize,
    everywhere: Arc<Everywhere>,
}

/// What the files open on every VM hold together. A VM's places bound its
/// own files, but a file keeps its place after its session ends (until
/// its final reply), and an agent may connect under ever new VM ids: the
/// server as a whole bounds them too, in number and in the bytes of their
/// paths, which each keeps until its verdict (up to
/// [`MAX_PATH_LEN`](crate::service::MAX_PATH_LEN) each).
#[derive(Debug)]
struct Everywhere {
    /// Places taken on every VM (see [`Sessions::files_in_flight`]).
    files: AtomicUsize,
    /// At most: as many as `max_agents` VMs may have.
    most_files: usize,
    path_bytes: AtomicUsize,
    /// At most (`uploads.path_budget`).
    path_budget: usize,
}

/// Why a file found no place in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoPlace {
    /// Its VM has as many files in flight as it may.
    Vm,
    /// The server has as many files in flight as all the agents it takes
    /// may have.
    Server,
    /// The paths of the files in flight take the server's whole budget
    /// for them.
    Paths,
}

/// Takes `n` of `count`, if it stays within `most`. (The places' atomics
/// are counts, guarding no other memory: relaxed order is enough.)
fn take_within(count: &AtomicUsize, n: usize, most: usize) -> bool {
    count
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |taken| {
            (taken.saturating_add(n) <= most).then_some(taken + n)
        })
        .is_ok()
}

impl Places {
    /// A place for a file of `path_len` bytes of path, if one is free.
    fn take(self: &Arc<Self>, path_len: usize) -> Result<FilePlace, NoPlace> {
        let everywhere = &self.everywhere;
        if !take_within(&self.taken, 1, self.limit) {
            return Err(NoPlace::Vm);
        }
        if !take_within(&everywhere.files, 1, everywhere.most_files) {
            self.taken.fetch_sub(1, Ordering::Relaxed);
            return Err(NoPlace::Server);
        }
        if !take_within(&everywhere.path_bytes, path_len, everywhere.path_budget) {
            everywhere.files.fetch_sub(1, Ordering::Relaxed);
            self.taken.fetch_sub(1, Ordering::Relaxed);
            return Err(NoPlace::Paths);
        }
        Ok(FilePlace {
            places: Arc::clone(self),
            path_len,
        })
    }
}

/// A file's place in flight on its VM and on the server, with its path's
/// bytes (see [`Session::take_place`]), given back when dropped.
#[derive(Debug)]
pub struct FilePlace {
    places: Arc<Places>,
    path_len: usize,
}

impl Drop for FilePlace {
    fn drop(&mut self) {
        let everywhere = &self.places.everywhere;
        everywhere
            .path_bytes
            .fetch_sub(self.path_len, Ordering::Relaxed);
        everywhere.files.fetch_sub(1, Ordering::Relaxed);
        self.places.taken.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One connected agent.
#[derive(Debug)]
pub struct Session {
    pub id: String,
    pub agent: AgentIdentity,
    pub connected_since: SystemTime,
    last_seen: Mutex<Instant>,
    /// Files open at once on the session's Scan streams: the VM's places,
    /// shared with files its earlier sessions still have open (see
    /// [`Session::take_place`]).
    places: Arc<Places>,
    /// The VM's share of the spool, in KiB permits: shared with its
    /// earlier sessions' files as its places are.
    pub spool_share: Arc<Semaphore>,
    /// Lookups answered at once for the VM (see [`LOOKUPS_AT_ONCE`]),
    /// shared with its earlier sessions' Lookups as its places are.
    pub lookups: Arc<Semaphore>,
    pub files: AtomicU64,
    pub bytes: AtomicU64,
    pub detections: AtomicU64,
    /// Set when an operator wants the agent to restart its session.
    restart: watch::Sender<Option<String>>,
    /// Set when a newer session of the same VM replaced this one.
    superseded: watch::Sender<bool>,
    /// The log lines of the VM's sessions.
    logs: Arc<VmLogs>,
    vms: Arc<Vms>,
    metrics: Arc<Metrics>,
}

impl Session {
    /// Notes that the agent was heard from.
    pub fn touch(&self) {
        *self.last_seen.lock() = Instant::now();
    }

    /// When the agent was last heard from.
    pub fn last_seen(&self) -> Instant {
        *self.last_seen.lock()
    }

    /// When the agent was last heard from, on the wall clock.
    pub fn last_seen_at(&self) -> SystemTime {
        SystemTime::now() - self.last_seen().elapsed()
    }

    /// Counts the verdict on the file at `path`; malware found is logged
    /// and tags the session's VM.
    pub fn record_file(&self, bytes: u64, path: &str, verdict: &FileVerdict) {
        self.record_files(bytes, [(Subject::Path(path), verdict)]);
    }

    /// Counts verdicts given together (`bytes` of content in all); malware
    /// found is logged and tags the session's VM, a failure spoils its full
    /// scan.
    pub fn record_files<'a>(
        &self,
        bytes: u64,
        verdicts: impl IntoIterator<Item = (Subject<'a>, &'a FileVerdict)>,
    ) {
        let mut tally = Tally::default();
        for (subject, verdict) in verdicts {
            self.tally(&mut tally, subject, verdict);
        }
        self.record(bytes, &tally);
    }

    /// Adds the verdict on `subject` to `tally`, to be counted later with
    /// [`Self::record`]; malware found is logged at once.
    pub fn tally(&self, tally: &mut Tally, subject: Subject<'_>, verdict: &FileVerdict) {
        tally.add(verdict);
        log_malware_found(&self.logs.malware, Some(self), subject, verdict);
    }

    /// Counts the verdicts of `tally` (`bytes` of content in all): one
    /// atomic operation a figure, however many they are. Malware found tags
    /// the session's VM, a failure spoils its full scan.
    pub fn record(&self, bytes: u64, tally: &Tally) {
        self.files.fetch_add(tally.verdicts, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.detections
            .fetch_add(tally.detections, Ordering::Relaxed);
        self.metrics.record(tally);
        if tally.detections > 0 && self.vms.threat_found(&self.agent.vm_id) {
            self.tagged(SecurityTag::VirusFound, true);
        }
        if tally.failures > 0 {
            self.scan_failed();
        }
    }

    /// Logs that the session's messages assigned `tag` to its VM (or
    /// removed it after a clean full scan, when not `assigned`), within
    /// the VM's budget for such lines. Logged by the callers of [`Vms`],
    /// not by the registry: it knows nothing of whose messages did it.
    pub fn tagged(&self, tag: SecurityTag, assigned: bool) {
        if !self.logs.tags.lock().take() {
            return;
        }
        let vm = &self.agent.vm_id;
        match assigned {
            true => tracing::warn!(vm, %tag, "security tag assigned"),
            false => tracing::info!(vm, %tag, "security tag removed after a clean full scan"),
        }
    }

    /// Whether a line telling of an event of the agent's (a scan task, an
    /// integrity event, a network attack) may be logged now, within the
    /// VM's budget for such lines.
    pub fn event_logged(&self) -> bool {
        self.logs.events.lock().take()
    }

    /// Files of the VM (this session's, or its earlier ones') begun and
    /// not answered yet.
    pub fn files_open(&self) -> usize {
        self.places.taken.load(Ordering::Relaxed)
    }

    /// A place in flight for a file begun on the session, with `path_len`
    /// bytes of path, if the VM and the server have one free; the file
    /// holds it until its final reply.
    pub fn take_place(&self, path_len: usize) -> Result<FilePlace, NoPlace> {
        self.places.take(path_len)
    }

    /// A file of the session failed, or went without a verdict: a full
    /// scan of its VM under way proves nothing clean.
    pub fn scan_failed(&self) {
        self.vms.scan_failed(&self.agent.vm_id);
    }

    /// Asks the agent to restart its session, saying why.
    pub fn restart(&self, reason: &str) {
        self.restart.send_replace(Some(reason.to_owned()));
    }

    /// A receiver that holds the reason once a restart is asked for.
    pub fn restart_requested(&self) -> watch::Receiver<Option<String>> {
        self.restart.subscribe()
    }

    /// A receiver that turns true once a newer session of the same VM has
    /// replaced this one.
    pub fn superseded(&self) -> watch::Receiver<bool> {
        self.superseded.subscribe()
    }
}

/// Why a session could not be opened (a `CAPACITY` rejection).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("this SVM serves its maximum number of agents; connect to another SVM")]
    TooManyAgents,
    #[error(
        "this SVM's registry of protected VMs is full (every VM in it is connected or tagged); connect to another SVM"
    )]
    TooManyVms,
}

/// The connected agents.
pub struct Sessions {
    by_id: RwLock<HashMap<String, Arc<Session>>>,
    /// Each VM's places for files in flight, share of the spool and
    /// Lookups, while any is held (by a session, or by a file or Lookup
    /// begun under one that has ended): a VM's new session shares them
    /// with the files of its earlier ones, still open on their Scan
    /// streams, and their Lookups still being answered. With places of its
    /// own, an agent that reconnected again and again could keep ever more
    /// files open and Lookups waiting.
    places: Mutex<VmsPlaces>,
    /// What the files in flight on every VM hold, counted as places are
    /// taken and given back: what reports and status read, without a walk
    /// over the VMs.
    everywhere: Arc<Everywhere>,
    max_agents: usize,
    files_in_flight: usize,
    spool_share_kib: usize,
    vms: Arc<Vms>,
    metrics: Arc<Metrics>,
    /// The lines telling of sessions opened, replaced and ended: one
    /// budget for the server (see [`Self::life_logged`]).
    life_logs: Mutex<LogBudget>,
}

impl Sessions {
    /// Sessions for at most `max_agents` agents, each VM's files within
    /// the places and spool share `uploads` sets.
    pub fn new(
        max_agents: usize,
        uploads: &UploadConfig,
        vms: Arc<Vms>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let spool_share_kib =
            usize::try_from(uploads.spool_budget_per_vm() >> 10).unwrap_or(usize::MAX);
        Sessions {
            by_id: RwLock::new(HashMap::new()),
            places: Mutex::default(),
            everywhere: Arc::new(Everywhere {
                files: AtomicUsize::new(0),
                most_files: max_agents
                    .max(1)
                    .saturating_mul(uploads.files_in_flight as usize),
                path_bytes: AtomicUsize::new(0),
                path_budget: usize::try_from(uploads.path_budget).unwrap_or(usize::MAX),
            }),
            max_agents,
            files_in_flight: uploads.files_in_flight as usize,
            spool_share_kib: spool_share_kib.min(Semaphore::MAX_PERMITS),
            vms,
            metrics,
            life_logs: Mutex::new(LogBudget::new(
                "lines telling of sessions opened, replaced and ended",
                u32::try_from(max_agents.saturating_mul(4).max(1200)).unwrap_or(u32::MAX),
                "",
                "",
            )),
        }
    }

    /// Whether a line telling of `session` opened, replaced or ended may be
    /// logged now: within its VM's [`SESSION_LINES_LOGGED`] a minute, then
    /// within the server's four a minute for each agent it takes (each may
    /// connect and disconnect twice), 1,200 at least. A client that sends
    /// Hello after Hello must neither fill the journal nor keep others'
    /// sessions out of it.
    pub fn life_logged(&self, session: &Session) -> bool {
        session.logs.lives.lock().take() && self.life_logs.lock().take()
    }

    /// Opens a session for `agent`, unless the server is at capacity. A
    /// VM has one session: an earlier one of the same VM (its agent
    /// reconnected before the old one timed out, say) is closed, told it
    /// was superseded. Kept, it would count twice against the limit and in
    /// reports until its heartbeats ran out, and its end would mark the VM
    /// disconnected while the new one runs.
    pub fn open(&self, agent: AgentIdentity) -> Result<Arc<Session>, Refused> {
        let mut by_id = self.by_id.write();
        let earlier = self
            .vms
            .session_of(&agent.vm_id)
            .and_then(|id| by_id.get(&id).cloned());
        if earlier.is_none() && by_id.len() >= self.max_agents {
            return Err(Refused::TooManyAgents);
        }
        let shares = self.places_of(&agent.vm_id);
        let session_id = uuid::Uuid::new_v4().to_string();
        let session = Arc::new(Session {
            id: session_id,
            agent,
            connected_since: SystemTime::now(),
            last_seen: Mutex::new(Instant::now()),
            places: shares.files,
            spool_share: shares.spool,
            lookups: shares.lookups,
            files: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            detections: AtomicU64::new(0),
            restart: watch::channel(None).0,
            superseded: watch::channel(false).0,
            logs: shares.logs,
            vms: Arc::clone(&self.vms),
            metrics: Arc::clone(&self.metrics),
        });
        // Under the lock: of two sessions of one VM opening at once, the
        // registry of VMs must end up with the one opened last.
        if !self.vms.connected(&session) {
            return Err(Refused::TooManyVms);
        }
        if let Some(earlier) = earlier {
            by_id.remove(&earlier.id);
            earlier.superseded.send_replace(true);
            if self.life_logged(&session) {
                tracing::warn!(
                    vm = %session.agent.vm_id, earlier = %earlier.id, earlier_agent = %earlier.agent.agent_id,
                    later = %session.id, later_agent = %session.agent.agent_id,
                    "a new session of the VM replaces its earlier one (two agents with one VM id take turns)"
                );
            }
        }
        by_id.insert(session.id.clone(), Arc::clone(&session));
        Ok(session)
    }

    /// The places in flight, the spool share, the Lookups and the log
    /// budgets of the VM `vm_id`: those its earlier sessions had, each
    /// while any of it is still held (the budgets, also for the minute
    /// after their last line), or new ones.
    fn places_of(&self, vm_id: &str) -> Shares {
        let mut places = self.places.lock();
        // The VMs whose places are all given back need no entry. Looked
        // for again once the entries have doubled: those still held (for
        // the minute after their VM's last line, say: VMs that take a new
        // id at each boot) are not walked again at every Hello, under the
        // lock every Hello takes.
        let floor = 2 * self.max_agents.max(1024);
        if places.by_vm.len() >= places.sweep_at.max(floor) {
            places.by_vm.retain(|_, held| held.held());
            places.sweep_at = 2 * places.by_vm.len();
            #[cfg(test)]
            {
                places.sweeps += 1;
            }
        }
        let held = places.by_vm.entry(vm_id.to_owned()).or_default();
        Shares {
            files: shared(&mut held.files, || Places {
                limit: self.files_in_flight,
                taken: AtomicUsize::new(0),
                everywhere: Arc::clone(&self.everywhere),
            }),
            spool: shared(&mut held.spool, || Semaphore::new(self.spool_share_kib)),
            lookups: shared(&mut held.lookups, || Semaphore::new(LOOKUPS_AT_ONCE)),
            logs: Arc::clone(
                held.logs
                    .get_or_insert_with(|| Arc::new(VmLogs::new(vm_id))),
            ),
        }
    }

    /// The open session with this id.
    pub fn get(&self, id: &str) -> Option<Arc<Session>> {
        self.by_id.read().get(id).cloned()
    }

    /// Ends a session. Its VM's record is updated before the session is
    /// gone for others (whoever finds no session where the record named
    /// one, a report, finds the record updated), both under the sessions'
    /// lock, as [`Sessions::open`] takes them: a new session of the VM
    /// opening meanwhile finds the old one either still open (and replaces
    /// it) or gone from both, never counted against `max_agents` while its
    /// VM's record says it is gone.
    pub fn close(&self, id: &str, ending: Ending) {
        let mut by_id = self.by_id.write();
        let Some(session) = by_id.get(id).cloned() else {
            return;
        };
        self.vms.disconnected(&session, ending);
        by_id.remove(id);
    }

    /// Every open session.
    pub fn list(&self) -> Vec<Arc<Session>> {
        self.by_id.read().values().cloned().collect()
    }

    /// How many agents are connected.
    pub fn len(&self) -> usize {
        self.by_id.read().len()
    }

    /// Files begun on Scan streams and not yet answered, those of sessions
    /// that ended included (each holds its VM's place until answered).
    pub fn files_in_flight(&self) -> usize {
        self.everywhere.files.load(Ordering::Relaxed)
    }

    /// Whether no agent is connected.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What tests of the sessions and of those who use them are made of.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;

    /// An agent of the VM `vm`.
    pub fn agent_of(vm: &str) -> AgentIdentity {
        AgentIdentity {
            agent_id: "agent".into(),
            vm_id: vm.into(),
            vm_name: vm.into(),
            os: "Windows".into(),
            agent_version: "1".into(),
            certificate: None,
        }
    }

    /// A verdict of malware found.
    pub fn infected() -> FileVerdict {
        FileVerdict {
            verdict: Some(proto::Verdict {
                kind: Some(proto::verdict::Kind::Infected(proto::Infected {
                    detections: vec![proto::Detection::default()],
                })),
            }),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Malware found takes at most `MALWARE_LOGGED` lines a minute of one
    /// budget (how many more there were is logged when the budget goes),
    /// and a line shows at most 4 KiB of a path.
    #[tokio::test(start_paused = true)]
    async fn malware_found_takes_a_bounded_share_of_the_log() {
        let (logged, _logging) = crate::testlog::Logged::capture();
        let infected = proto::Verdict {
            kind: Some(proto::verdict::Kind::Infected(proto::Infected {
                detections: vec![proto::Detection {
                    rule: "EICAR_Test_File".into(),
                    threat: "EICAR-Test-File".into(),
                    ..Default::default()
                }],
            })),
        };
        let verdict = FileVerdict {
            verdict: Some(infected),
            ..Default::default()
        };
        let budget = Mutex::new(LogBudget::new("malware found", MALWARE_LOGGED, "", ""));
        let long = format!("C:\\{}\\eicar.com", "d".repeat(10 << 10));
        log_malware_found(&budget, None, Subject::Path(&long), &verdict);
        assert_eq!(logged.lines("malware found"), 1);
        assert_eq!(logged.lines("eicar.com"), 0, "the path is cut");
        assert_eq!(logged.lines(&format!("{}…", "d".repeat(4093))), 1);
        assert_eq!(logged.lines(&"d".repeat(4094)), 0);
        for _ in 0..1000 {
            log_malware_found(&budget, None, Subject::Path("C:\\eicar.com"), &verdict);
        }
        assert_eq!(logged.lines("EICAR_Test_File"), MALWARE_LOGGED as usize);
        drop(budget);
        assert_eq!(logged.lines("unlogged=401"), 1);
    }

    /// VMs that come and go under new ids (as VMs that take one at each
    /// boot do) are looked through for entries to drop once they have
    /// doubled, not at every session opened: entries held for the minute
    /// after their VM's last line would be walked again and again, under
    /// the lock every Hello takes.
    #[tokio::test(start_paused = true)]
    async fn vms_coming_and_going_are_looked_through_once_they_double() {
        let vms = Arc::new(Vms::in_memory());
        let sessions = Sessions::new(1, &Default::default(), vms, Default::default());
        for vm in 0..3000 {
            let session = sessions
                .open(fixtures::agent_of(&format!("vm-{vm}")))
                .unwrap();
            // A line of its own tells of it: its budget is held a minute.
            sessions.life_logged(&session);
            sessions.close(&session.id, Ending::Closed);
        }
        let places = sessions.places.lock();
        assert!(places.sweeps <= 2, "{} looks", places.sweeps);
    }

    /// The VM's sessions share its budgets: an agent that sends a Hello
    /// again (which replaces its session), or ends its session and opens
    /// another, does not get another; and the lines telling of sessions
    /// have budgets of their own, the VM's and the server's.
    #[tokio::test(start_paused = true)]
    async fn a_new_session_of_a_vm_takes_from_its_budgets() {
        let (logged, _logging) = crate::testlog::Logged::capture();
        let vms = Arc::new(Vms::in_memory());
        let sessions = Sessions::new(10, &Default::default(), vms, Default::default());
        let (agent, infected) = (fixtures::agent_of("desk-1"), fixtures::infected());
        let mut earlier = None;
        for round in 0..4 {
            let session = sessions.open(agent.clone()).unwrap();
            for _ in 0..1000 {
                session.record_files(0, [(Subject::Digest(&[0; 32]), &infected)]);
            }
            // Its session replaced by the next one, or ended before it.
            match round % 2 {
                0 => earlier = Some(session),
                _ => {
                    sessions.close(&session.id, Ending::Closed);
                    earlier = None;
                }
            }
        }
        drop(earlier);
        assert_eq!(logged.lines("malware found in"), 0, "not dropped");
        assert_eq!(logged.lines("malware found"), MALWARE_LOGGED as usize);
        // Hello after Hello: the lines telling of the VM's sessions
        // replaced come within the VM's budget for such lines.
        for _ in 0..2000 {
            sessions.open(agent.clone()).unwrap();
        }
        let replaced = "replaces its earlier one";
        assert_eq!(logged.lines(replaced), SESSION_LINES_LOGGED as usize);
        // Of many VMs, within the server's (1,200 a minute here).
        for vm in 0..1500 {
            let agent = fixtures::agent_of(&format!("vm-{vm}"));
            sessions.open(agent.clone()).unwrap();
            let session = sessions.open(agent).unwrap();
            sessions.close(&session.id, Ending::Closed);
        }
        assert_eq!(logged.lines(replaced), 1200);
    }
}
