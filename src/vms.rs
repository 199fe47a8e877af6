//! The protected virtual machines: every VM whose agent connected in the
//! last 30 days (powered-off ones included), what its agent told about it,
//! and its security tags. Kept in the state folder (`vms.json`), so the
//! 30-day count and the tags survive a restart.
//!
//! A VM's status comes from what the server sees and what its agent tells
//! (see [`VmRecord::reasons`]). Security tags follow these rules:
//!
//! * `ANTI_VIRUS.VirusFound.threat=high` is assigned automatically when a
//!   scan for the VM finds malware, and removed automatically when the VM
//!   reports a full scan that finished with no detections, unless it was
//!   assigned by hand. Only a full scan the server saw start, in the same
//!   session and after the tag was assigned, counts, and only if since it
//!   started no file of the VM failed or went without a verdict, and no
//!   malware was found: a scan that failed is never taken for a clean one.
//! * `IDS_IPS.threat=high` is assigned when the agent reports a network
//!   attack, and is only ever removed by hand.
//! * A tag assigned by hand is removed only by hand (assigning by hand a
//!   tag that was automatic makes it manual).
//! * A VM with a tag is remembered past 30 days, until the tag goes; but
//!   when the registry is full, one whose tags were all assigned
//!   automatically may be forgotten to make room (see [`Vms::connected`]).
//!
//! Every change bumps a generation ([`Vms::changes`]): the reporter sends a
//! report at once, and the keeper saves the file.

use std::{
    collections::{BTreeMap, HashMap},
    fmt, io,
    path::{Path, PathBuf},
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::{
    files,
    proto::{self, Health, IntegrityKind, TaskKind, VmReason},
    sessions::{AgentIdentity, Session},
    state,
    status::worst,
};

/// How long a VM that is no longer seen still counts as protected.
pub const RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// The most VMs remembered; beyond it, the VM not seen for the longest time
/// and carrying no tag is forgotten first (see `forget_idle`).
pub const MAX_VMS: usize = 100_000;

/// The largest listing of VMs `scanserver agents` accepts: it may name
/// [`MAX_VMS`] VMs of some 200 bytes each, 20 MB, but at most 2 KiB each
/// (five identity fields of up to 256 bytes from the agents' Hellos, tags
/// and counters): 200 MB when agents chose the longest names. (Reports
/// list VMs within a budget of their own, see
/// [`crate::reporting::REPORT_VMS_BUDGET`].)
pub const MAX_LISTING_SIZE: usize = 256 << 20;

/// The file's name in the state folder.
pub const FILE_NAME: &str = "vms.json";

/// The largest registry file read: [`MAX_VMS`] records of at most 16 KiB
/// each (the identity fields and a task id of up to 256 bytes each, every
/// byte of them a control character written as six), 1.6 GB. A larger
/// one was not saved by this server, and is set aside unread.
const MAX_FILE_SIZE: u64 = MAX_VMS as u64 * (16 << 10);

/// How long the VMs that had a session when the server stopped have, once
/// it serves again, to come back before their connection counts as lost
/// (see [`VmRecord::awaited`]): agents find a restarted server at their
/// next attempt to connect, which they make every minute or sooner.
pub const RECONNECT_GRACE: Duration = Duration::from_secs(120);

/// At which of the server's starts a VM awaited at each since it had a
/// session counts as lost at once (see [`VmRecord::awaited_starts`]): it
/// was awaited through two runs of the server without coming back.
pub const AWAITED_STARTS: u8 = 3;

/// A count of 0 is left out of the saved file (for serde).
fn is_zero(n: &u8) -> bool {
    *n == 0
}

/// A security tag, as VMware NSX names them; saved under that name
/// ([`SecurityTag::name`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(into = "&'static str", try_from = "String")]
pub enum SecurityTag {
    /// Malware was found on the VM.
    VirusFound,
    /// A network attack on the VM was detected.
    IdsIps,
}

impl SecurityTag {
    pub const ALL: [SecurityTag; 2] = [SecurityTag::VirusFound, SecurityTag::IdsIps];

    pub fn name(self) -> &'static str {
        match self {
            SecurityTag::VirusFound => "ANTI_VIRUS.VirusFound.threat=high",
            SecurityTag::IdsIps => "IDS_IPS.threat=high",
        }
    }
}

impl fmt::Display for SecurityTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl From<SecurityTag> for &'static str {
    fn from(tag: SecurityTag) -> Self {
        tag.name()
    }
}

impl TryFrom<String> for SecurityTag {
    type Error = String;

    fn try_from(name: String) -> Result<Self, String> {
        name.parse()
    }
}

impl FromStr for SecurityTag {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        SecurityTag::ALL
            .into_iter()
            .find(|tag| tag.name() == name)
            .ok_or_else(|| {
                format!(
                    "unknown security tag `{name}`; the tags are `{}` and `{}`",
                    SecurityTag::VirusFound,
                    SecurityTag::IdsIps
                )
            })
    }
}

/// Who assigned a tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TagOrigin {
    Automatic,
    Manual,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TagEntry {
    pub origin: TagOrigin,
    /// Milliseconds since the Unix epoch.
    pub assigned_at: u64,
}

/// One protected VM, as remembered.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmRecord {
    pub vm_id: String,
    pub vm_name: String,
    pub agent_id: String,
    pub agent_version: String,
    pub os: String,
    /// Milliseconds since the Unix epoch.
    pub first_seen: u64,
    pub last_seen: u64,
    pub tags: BTreeMap<SecurityTag, TagEntry>,
    /// The session dropped (missed heartbeats, broken connection) and the
    /// agent has not come back.
    pub connection_lost: bool,
    /// The VM had a session when the server stopped (or last saved, before
    /// a crash), and has not come back since: unless it does within
    /// [`RECONNECT_GRACE`] of the next start, its connection counts as lost
    /// ([`Vms::lost_unless_back`]). A session the server ended is no more
    /// the agent's doing than one it closed, but its VM is unprotected all
    /// the same until it is back; without this, a VM whose agent failed
    /// while the server restarted would be neither connected nor lost, and
    /// left out of reports as a VM shut down.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub awaited: bool,
    /// The server's starts the VM was awaited at without coming back: at
    /// [`AWAITED_STARTS`], its connection counts as lost at once. A server
    /// that crashes before each grace period ends (a crash loop) would
    /// otherwise never count it lost, whatever happened to its agent.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub awaited_starts: u8,
    /// The agent said it cannot reach the Integration Server.
    pub integration_server_unreachable: bool,
    pub file_modified: bool,
    pub registry_modified: bool,
    /// The full scan under way in the current session (not saved: a scan
    /// that spans a restart or a reconnection was not all seen here).
    #[serde(skip)]
    pub full_scan: Option<FullScan>,
    /// The session open now, if any (not saved).
    #[serde(skip)]
    pub session_id: Option<String>,
}

/// A full scan the agent reported started.
#[derive(Debug, Clone)]
pub struct FullScan {
    task_id: String,
    /// The session that reported it: only its end, in the same session,
    /// counts.
    session_id: String,
    /// Since it started, a file of the VM failed or went without a verdict,
    /// or malware was found: its end proves nothing clean.
    spoiled: bool,
    /// Since it started, the agent reported a modified file, or registry
    /// object: the scan may have passed it before, so its end does not
    /// clear that reason.
    file_modified: bool,
    registry_modified: bool,
}

impl VmRecord {
    fn new(agent: &AgentIdentity, now: u64) -> Self {
        VmRecord {
            vm_id: agent.vm_id.clone(),
            vm_name: agent.vm_name.clone(),
            agent_id: agent.agent_id.clone(),
            agent_version: agent.agent_version.clone(),
            os: agent.os.clone(),
            first_seen: now,
            last_seen: now,
            tags: BTreeMap::new(),
            connection_lost: false,
            awaited: false,
            awaited_starts: 0,
            integration_server_unreachable: false,
            file_modified: false,
            registry_modified: false,
            full_scan: None,
            session_id: None,
        }
    }

    fn spoil_full_scan(&mut self) {
        if let Some(scan) = &mut self.full_scan {
            scan.spoiled = true;
        }
    }

    /// Assigns `tag` automatically; false if it was assigned already.
    fn assign_automatically(&mut self, tag: SecurityTag) -> bool {
        if self.tags.contains_key(&tag) {
            return false;
        }
        let entry = TagEntry {
            origin: TagOrigin::Automatic,
            assigned_at: unix_ms(SystemTime::now()),
        };
        self.tags.insert(tag, entry);
        true
    }

    /// Counts the VM's connection as lost: it was awaited after a restart
    /// and has not come back. What its agent told in its last session
    /// ended with it, as in [`Vms::disconnected`].
    fn lost(&mut self) {
        self.awaited = false;
        self.awaited_starts = 0;
        self.connection_lost = true;
        self.integration_server_unreachable = false;
    }

    /// Every reason in force, worst first.
    pub fn reasons(&self) -> Vec<VmReason> {
        self.flags()
            .into_iter()
            .filter_map(|(set, reason)| set.then_some(reason))
            .collect()
    }

    /// Whether any reason is in force (without listing them).
    pub fn has_reasons(&self) -> bool {
        self.flags().into_iter().any(|(set, _)| set)
    }

    /// Each reason, and whether it is in force.
    fn flags(&self) -> [(bool, VmReason); 6] {
        [
            (self.connection_lost, VmReason::NoConnectionToSvm),
            (
                self.tags.contains_key(&SecurityTag::VirusFound),
                VmReason::ThreatFound,
            ),
            (
                self.tags.contains_key(&SecurityTag::IdsIps),
                VmReason::NetworkAttack,
            ),
            (
                self.integration_server_unreachable,
                VmReason::NoConnectionToIntegrationServer,
            ),
            (self.file_modified, VmReason::FileModified),
            (self.registry_modified, VmReason::RegistryModified),
        ]
    }

    /// The VM's status, with the reasons in force. `session` is its open
    /// session, for the live figures.
    pub fn info(&self, session: Option<&Session>) -> proto::VmInfo {
        let reasons = self.reasons();
        let tags = self
            .tags
            .iter()
            .map(|(tag, entry)| proto::SecurityTag {
                name: tag.name().to_owned(),
                origin: match entry.origin {
                    TagOrigin::Automatic => proto::TagOrigin::Automatic,
                    TagOrigin::Manual => proto::TagOrigin::Manual,
                } as i32,
                assigned_at_unix_ms: entry.assigned_at,
            })
            .collect();
        let relaxed = std::sync::atomic::Ordering::Relaxed;
        let (since, last_seen, files, bytes, detections) = match session {
            Some(s) => (
                unix_ms(s.connected_since),
                unix_ms(s.last_seen_at()),
                s.files.load(relaxed),
                s.bytes.load(relaxed),
                s.detections.load(relaxed),
            ),
            None => (0, self.last_seen, 0, 0, 0),
        };
        proto::VmInfo {
            vm_id: self.vm_id.clone(),
            vm_name: self.vm_name.clone(),
            agent_id: self.agent_id.clone(),
            agent_version: self.agent_version.clone(),
            os: self.os.clone(),
            connected: session.is_some(),
            connected_since_unix_ms: since,
            last_seen_unix_ms: last_seen,
            first_seen_unix_ms: self.first_seen,
            status: worst(reasons.iter().map(|r| r.health())) as i32,
            reasons: reasons.into_iter().map(|r| r as i32).collect(),
            tags,
            files,
            bytes,
            detections,
            awaited: self.awaited && session.is_none(),
        }
    }
}

impl VmReason {
    /// The reason in words, as `scanserver agents` prints it and the README
    /// lists it.
    pub fn describe(self) -> &'static str {
        match self {
            VmReason::NoConnectionToSvm => "no connection to the SVM",
            VmReason::NoConnectionToIntegrationServer => {
                "the agent has no connection to the Integration Server"
            }
            VmReason::FileModified => "protected file modified",
            VmReason::RegistryModified => "protected registry key modified",
            VmReason::ThreatFound => "malware found",
            VmReason::NetworkAttack => "network attack detected",
            VmReason::Unspecified => "unspecified",
        }
    }

    /// How bad the reason is.
    pub fn health(self) -> Health {
        match self {
            VmReason::NoConnectionToSvm | VmReason::ThreatFound | VmReason::NetworkAttack => {
                Health::Critical
            }
            VmReason::NoConnectionToIntegrationServer
            | VmReason::FileModified
            | VmReason::RegistryModified
            | VmReason::Unspecified => Health::Warning,
        }
    }
}

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The agent closed its stream (its VM shut down, say).
    Closed,
    /// Missed heartbeats or a broken connection: the VM is unprotected.
    Dropped,
    /// The server shut down.
    ServerShutdown,
}

/// Why a tag command failed.
#[derive(Debug, thiserror::Error)]
pub enum TagError {
    #[error("no VM `{0}` was seen in the last 30 days; `scanserver agents` lists them")]
    UnknownVm(String),
}

impl TagError {
    /// No VM `vm_id`; the message shows at most 256 bytes of it (a status
    /// message goes in a header, which clients take up to 16 KiB of).
    fn unknown(vm_id: &str) -> Self {
        TagError::UnknownVm(crate::abridged(vm_id, 256).into_owned())
    }
}

/// The saved registry: its records as read, or as borrowed to be written.
#[derive(Debug, Serialize, Deserialize)]
struct Saved<R = VmRecord> {
    format: u32,
    vms: Vec<R>,
}

impl<R> Default for Saved<R> {
    fn default() -> Self {
        Saved {
            format: FORMAT,
            vms: Vec::new(),
        }
    }
}

const FORMAT: u32 = 1;

/// Forgets up to `n` of the idle VMs (no session) that carry no tag,
/// those seen least recently; when that makes fewer than `needed`, up to
/// `n` in all with those whose tags were all assigned automatically (with
/// a warning: their tags go with them). Returns how many. A VM tagged by
/// hand is never forgotten. VM ids are the agents' to choose: were
/// automatic tags kept whatever the cost, an agent reporting attacks for
/// made-up VMs could fill the registry with them for good, and lock every
/// new VM out. None of them goes while untagged ones make room enough; but
/// when they must, they go `n` at a time, as untagged ones do: one at a
/// time, a registry full of them would be walked for every new VM.
fn forget_idle(by_id: &mut Registry, n: usize, needed: usize) -> usize {
    let untagged = forget_least_recent(by_id, n, |vm| vm.tags.is_empty());
    if untagged.len() >= needed {
        return untagged.len();
    }
    let automatic = |vm: &VmRecord| {
        vm.tags
            .values()
            .all(|tag| tag.origin == TagOrigin::Automatic)
    };
    let tagged = forget_least_recent(by_id, n - untagged.len(), automatic);
    if let Some(first) = tagged.first() {
        tracing::warn!(
            forgotten = tagged.len(),
            first = %first,
            "the registry of VMs is full: disconnected VMs with automatic security tags were \
             forgotten, tags and all, to make room. If agents report VMs that do not exist, bind \
             VM ids to certificates (vm_id_in_certificate)"
        );
    }
    untagged.len() + tagged.len()
}

/// Forgets up to `n` of the idle VMs for which `which` holds, those seen
/// least recently; returns their ids.
fn forget_least_recent(
    by_id: &mut Registry,
    n: usize,
    which: impl Fn(&VmRecord) -> bool,
) -> Vec<String> {
    let mut idle: Vec<_> = by_id
        .values()
        .filter(|vm| vm.session_id.is_none() && which(vm))
        .map(|vm| (vm.last_seen, vm.vm_id.clone()))
        .collect();
    if idle.len() > n {
        idle.select_nth_unstable(n);
        idle.truncate(n);
    }
    idle.into_iter()
        .map(|(_, vm_id)| {
            by_id.remove(&vm_id);
            vm_id
        })
        .collect()
}

/// A saved registry whose records are read one by one: each is kept as
/// its text until its turn, so that reading a registry of 100,000 VMs
/// does not hold a tree of JSON values for all of them at once.
#[derive(Deserialize)]
struct SavedRecords<'a> {
    format: u32,
    #[serde(borrow)]
    vms: Vec<&'a serde_json::value::RawValue>,
}

impl Saved {
    /// The registry in `data`, and what could not be read and was left
    /// out: a record, or a tag this version does not know (a newer one's).
    /// Neither costs the other VMs, or the VM's other tags, theirs. A file
    /// that is not a registry of this format fails whole.
    fn parse(data: &[u8]) -> Result<(Saved, Vec<String>), String> {
        let saved = serde_json::from_slice::<SavedRecords>(data).map_err(|e| e.to_string())?;
        if saved.format != FORMAT {
            return Err(format!("format {}, expected {FORMAT}", saved.format));
        }
        let mut errors = Vec::new();
        let vms = saved
            .vms
            .into_iter()
            .filter_map(|record| {
                let mut record = serde_json::from_str::<serde_json::Value>(record.get())
                    .map_err(|err| errors.push(err.to_string()))
                    .ok()?;
                if let Some(tags) = record.get_mut("tags").and_then(|t| t.as_object_mut()) {
                    tags.retain(|name, _| {
                        let known = name.parse::<SecurityTag>().is_ok();
                        if !known {
                            errors.push(format!("unknown tag {name:?}"));
                        }
                        known
                    });
                }
                serde_json::from_value::<VmRecord>(record)
                    .map_err(|err| errors.push(err.to_string()))
                    .ok()
            })
            .collect();
        let saved = Saved {
            format: FORMAT,
            vms,
        };
        Ok((saved, errors))
    }
}

/// The records by VM id, each shared with the save under way, if any: a
/// save copies pointers under the lock, not records (100,000 of them at
/// most), and a record changed meanwhile is copied then (`Arc::make_mut`).
type Registry = HashMap<String, Arc<VmRecord>>;

/// The registry of protected VMs.
#[derive(Debug)]
pub struct Vms {
    by_id: Mutex<Registry>,
    /// Where it is saved; `None` keeps it in memory only.
    path: Option<PathBuf>,
    changes: watch::Sender<u64>,
    /// The most VMs kept: [`MAX_VMS`] (fewer in tests).
    limit: usize,
    /// The server ended a session as it stops: see [`Vms::lost_unless_back`].
    stopping: AtomicBool,
    /// Opening the registry changed records (the starts their VMs were
    /// awaited at): see [`Vms::changed_at_open`].
    changed_at_open: bool,
    /// One more than the generation last written to the file (0: none
    /// written yet): see [`Vms::save`].
    written: AtomicU64,
    /// Saves take turns: the file of one renamed into place after a later
    /// one's would put back what that one had changed.
    saving: Mutex<()>,
}

impl Vms {
    /// A registry kept in memory only.
    pub fn in_memory() -> Self {
        Vms {
            by_id: Mutex::default(),
            path: None,
            changes: watch::channel(0).0,
            limit: MAX_VMS,
            stopping: AtomicBool::new(false),
            changed_at_open: false,
            written: AtomicU64::new(0),
            saving: Mutex::new(()),
        }
    }

    /// Whether opening the registry changed records, which are then to be
    /// saved soon: the starts a VM was awaited at count only once saved
    /// (a server that crashes within a minute of each start would
    /// otherwise never count its VMs lost).
    pub fn changed_at_open(&self) -> bool {
        self.changed_at_open
    }

    /// The registry saved in the state folder `dir`. A file that is damaged
    /// or of another format, larger than any registry saved, or not a file
    /// at all (a FIFO would keep the start waiting) is set aside (renamed
    /// `vms.json.rejected`) with a warning; so is a copy of one with
    /// records that cannot be read, whose other records are kept. One that
    /// cannot be read at all (its permissions, a failing disk) is an error,
    /// since saving over it would lose its tags.
    pub fn open(dir: &Path) -> io::Result<Self> {
        let path = dir.join(FILE_NAME);
        let saved = match files::read(&path, MAX_FILE_SIZE) {
            Ok(data) => match Saved::parse(&data) {
                Ok((saved, errors)) => {
                    if let Some(first) = errors.first() {
                        let (left_out, kept) = (errors.len(), saved.vms.len());
                        tracing::warn!(
                            path = %path.display(), left_out, kept,
                            "protected VMs that cannot be read are left out (a copy of the file is set aside): {first}"
                        );
                        state::set_aside_copy(&path);
                    }
                    saved
                }
                Err(err) => {
                    tracing::warn!(path = %path.display(), "protected VMs set aside, starting with none: {err}");
                    state::set_aside(&path);
                    Saved::default()
                }
            },
            Err(err) if err.kind() == io::ErrorKind::NotFound => Saved::default(),
            // Larger than any registry saved, or not a file at all.
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::InvalidData | io::ErrorKind::InvalidInput
                ) =>
            {
                tracing::warn!(path = %path.display(), "protected VMs set aside, starting with none: {err}");
                state::set_aside(&path);
                Saved::default()
            }
            Err(err) => return Err(err),
        };
        let (mut lost, mut awaited) = (0, false);
        let records = saved.vms.into_iter().map(|mut vm| {
            if vm.awaited {
                awaited = true;
                // Saved while its session was open (the server crashed):
                // what its agent told in it ended with it, as when the
                // server ends the session.
                vm.integration_server_unreachable = false;
                vm.awaited_starts = vm.awaited_starts.saturating_add(1);
                if vm.awaited_starts >= AWAITED_STARTS {
                    vm.lost();
                    lost += 1;
                }
            }
            (vm.vm_id.clone(), Arc::new(vm))
        });
        let by_id = records.collect();
        if lost > 0 {
            tracing::warn!(
                lost,
                "VMs awaited at {AWAITED_STARTS} starts of the server have not come back: their connection counts as lost"
            );
        }
        let vms = Vms {
            by_id: Mutex::new(by_id),
            path: Some(path),
            changes: watch::channel(0).0,
            limit: MAX_VMS,
            stopping: AtomicBool::new(false),
            changed_at_open: awaited,
            written: AtomicU64::new(0),
            saving: Mutex::new(()),
        };
        vms.forget_old();
        Ok(vms)
    }

    /// A receiver that changes whenever a VM's status or tags change.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Applies `change` to VM `vm_id`, if known; when it reports a change,
    /// everyone watching is told.
    fn update(&self, vm_id: &str, change: impl FnOnce(&mut VmRecord) -> bool) -> Option<bool> {
        let changed = self
            .by_id
            .lock()
            .get_mut(vm_id)
            .map(|vm| change(Arc::make_mut(vm)));
        if changed == Some(true) {
            self.changed();
        }
        changed
    }

    /// Tells everyone watching that a VM changed.
    fn changed(&self) {
        self.changes.send_modify(|generation| *generation += 1);
    }

    /// An agent opened `session`. False, with nothing changed, when its VM
    /// is new and the registry holds [`MAX_VMS`] VMs, none of which can be
    /// forgotten (connected or tagged by hand): VM ids are the agents' to choose,
    /// and each new one must not grow the registry without bound.
    pub fn connected(&self, session: &Session) -> bool {
        let agent = &session.agent;
        let now = unix_ms(SystemTime::now());
        {
            let mut by_id = self.by_id.lock();
            // Full: the idle VMs seen least recently make room, a hundredth
            // of the registry at once, so that a pool whose VMs get new ids
            // at every boot walks it once per thousand new VMs, not for
            // each (under the sessions' lock).
            let room = (self.limit / 100).max(1);
            if !by_id.contains_key(&agent.vm_id)
                && by_id.len() >= self.limit
                && forget_idle(&mut by_id, room, 1) == 0
            {
                return false;
            }
            let vm = by_id
                .entry(agent.vm_id.clone())
                .or_insert_with(|| Arc::new(VmRecord::new(agent, now)));
            let vm = Arc::make_mut(vm);
            vm.vm_name.clone_from(&agent.vm_name);
            vm.agent_id.clone_from(&agent.agent_id);
            vm.agent_version.clone_from(&agent.agent_version);
            vm.os.clone_from(&agent.os);
            vm.last_seen = now;
            vm.connection_lost = false;
            vm.awaited = false;
            vm.awaited_starts = 0;
            // A new session starts from what the agent tells in it.
            vm.integration_server_unreachable = false;
            vm.full_scan = None;
            vm.session_id = Some(session.id.clone());
        }
        self.changed();
        true
    }

    /// `session` ended. A later session of the same VM (an agent that
    /// reconnected before its old session timed out) is left alone.
    pub fn disconnected(&self, session: &Session, ending: Ending) {
        if ending == Ending::ServerShutdown {
            self.stopping.store(true, Ordering::Relaxed);
        }
        let last_seen = unix_ms(session.last_seen_at());
        self.update(&session.agent.vm_id, |vm| {
            if vm.session_id.as_deref() != Some(session.id.as_str()) {
                return false;
            }
            vm.session_id = None;
            vm.last_seen = last_seen;
            vm.connection_lost = ending == Ending::Dropped;
            // Told of the session: a VM shut down during an outage of the
            // Integration Server does not keep it for 30 days.
            vm.integration_server_unreachable = false;
            vm.awaited = ending == Ending::ServerShutdown;
            true
        });
    }

    /// Counts the connection of every VM still awaited as lost (see
    /// [`VmRecord::awaited`]): it had a session when the server stopped,
    /// and has not come back since the server started. Returns how many.
    /// Not once the server stops: the VMs whose sessions it ended then are
    /// awaited at its next start, not lost now.
    pub fn lost_unless_back(&self) -> usize {
        // Looked at under the registry's lock, which a session ended as the
        // server stops takes after setting it.
        let mut by_id = self.by_id.lock();
        if self.stopping.load(Ordering::Relaxed) {
            return 0;
        }
        let mut lost = 0;
        for vm in by_id.values_mut() {
            if vm.awaited && vm.session_id.is_none() {
                let vm = Arc::make_mut(vm);
                vm.lost();
                lost += 1;
            }
        }
        drop(by_id);
        if lost > 0 {
            tracing::warn!(
                lost,
                "VMs that had a session when the server stopped have not come back: their connection counts as lost"
            );
            self.changed();
        }
        lost
    }

    /// A scan for VM `vm_id` found malware. The full scan under way cannot
    /// prove the VM clean any more: it is spoiled with the tag assigned,
    /// under one lock, so that no full scan can start between the two and
    /// later clear a tag it was never spoiled by. Returns whether the tag
    /// was assigned now, for the caller to log within its agent's budget
    /// (see [`Session::tagged`]).
    pub fn threat_found(&self, vm_id: &str) -> bool {
        self.assign_automatically(vm_id, SecurityTag::VirusFound, |vm| vm.spoil_full_scan())
    }

    /// The agent of VM `vm_id` reported a network attack. Returns whether
    /// the tag was assigned now.
    pub fn network_attack(&self, vm_id: &str) -> bool {
        self.assign_automatically(vm_id, SecurityTag::IdsIps, |_| {})
    }

    /// Assigns `tag` to VM `vm_id` automatically, after `first` (under the
    /// same lock); whether it was not assigned before.
    fn assign_automatically(
        &self,
        vm_id: &str,
        tag: SecurityTag,
        first: impl FnOnce(&mut VmRecord),
    ) -> bool {
        let assigned = self.update(vm_id, |vm| {
            first(vm);
            vm.assign_automatically(tag)
        });
        assigned == Some(true)
    }

    /// A file of VM `vm_id` failed or went without a verdict: a full scan
    /// under way no longer proves the VM clean.
    pub fn scan_failed(&self, vm_id: &str) {
        if let Some(vm) = self.by_id.lock().get_mut(vm_id) {
            Arc::make_mut(vm).spoil_full_scan();
        }
    }

    /// The agent of `session` reported that scan task `task_id` started.
    /// The same full scan reported started again stays as it was (what
    /// spoiled it still does); another one takes its place.
    pub fn task_started(&self, session: &Session, task_id: &str, kind: TaskKind) {
        if kind != TaskKind::FullScan {
            return;
        }
        let mut by_id = self.by_id.lock();
        // Only the VM's session (not one a newer session replaced) starts
        // its full scans.
        let Some(vm) = by_id
            .get_mut(&session.agent.vm_id)
            .filter(|vm| vm.session_id.as_deref() == Some(session.id.as_str()))
        else {
            return;
        };
        let vm = Arc::make_mut(vm);
        let same = |scan: &FullScan| scan.task_id == task_id && scan.session_id == session.id;
        if !vm.full_scan.as_ref().is_some_and(same) {
            vm.full_scan = Some(FullScan {
                task_id: task_id.to_owned(),
                session_id: session.id.clone(),
                spoiled: false,
                file_modified: false,
                registry_modified: false,
            });
        }
    }

    /// The agent of `session` reported that scan task `task_id` finished,
    /// with `detections` and `failed_files` (files it could not scan, the
    /// server's failures among them). A full scan seen starting in the same
    /// session, unspoiled, with no detections and no failed files, clears
    /// what a full scan answers for: the automatic malware tag (assigned
    /// before it started, or it would be spoiled), and the modification
    /// reasons reported before it started. The agent's own count of
    /// failures matters: files it could not read were never sent, so no
    /// failure of theirs spoiled the scan here. Nor has a full scan that
    /// ends with files of the VM still owed their verdicts seen them (the
    /// end of another task says nothing of those files). Returns whether
    /// the malware tag was removed now.
    pub fn task_finished(
        &self,
        session: &Session,
        task_id: &str,
        kind: TaskKind,
        detections: u32,
        failed_files: u32,
    ) -> bool {
        if kind != TaskKind::FullScan {
            return false;
        }
        let vm_id = session.agent.vm_id.as_str();
        let mut untagged = false;
        self.update(vm_id, |vm| {
            let ours =
                |scan: &mut FullScan| scan.task_id == task_id && scan.session_id == session.id;
            let Some(scan) = vm.full_scan.take_if(ours) else {
                return false;
            };
            if detections > 0 || failed_files > 0 || scan.spoiled || session.files_open() > 0 {
                return false;
            }
            let automatic = vm
                .tags
                .get(&SecurityTag::VirusFound)
                .is_some_and(|entry| entry.origin == TagOrigin::Automatic);
            if automatic {
                vm.tags.remove(&SecurityTag::VirusFound);
                untagged = true;
            }
            let file = vm.file_modified && !scan.file_modified;
            let registry = vm.registry_modified && !scan.registry_modified;
            vm.file_modified &= !file;
            vm.registry_modified &= !registry;
            automatic || file || registry
        });
        untagged
    }

    /// The agent of VM `vm_id` reported a modified protected object. The
    /// full scan under way may have passed it already: its end will not
    /// clear the reason.
    pub fn integrity(&self, vm_id: &str, kind: IntegrityKind) {
        self.update(vm_id, |vm| {
            let scan = vm.full_scan.as_mut();
            let (flag, during_scan) = match kind {
                IntegrityKind::FileModified => {
                    (&mut vm.file_modified, scan.map(|s| &mut s.file_modified))
                }
                IntegrityKind::RegistryModified => (
                    &mut vm.registry_modified,
                    scan.map(|s| &mut s.registry_modified),
                ),
                IntegrityKind::Unspecified => return false,
            };
            if let Some(during_scan) = during_scan {
                *during_scan = true;
            }
            !std::mem::replace(flag, true)
        });
    }

    /// The agent of `session` told whether it reaches the Integration
    /// Server. Only the VM's session speaks for it: a word a replaced
    /// session still had on its way would outlast the newer session's
    /// (agents tell only of changes).
    pub fn integration_server(&self, session: &Session, connected: bool) {
        self.update(&session.agent.vm_id, |vm| {
            if vm.session_id.as_deref() != Some(session.id.as_str()) {
                return false;
            }
            let was_unreachable = vm.integration_server_unreachable;
            vm.integration_server_unreachable = !connected;
            was_unreachable != vm.integration_server_unreachable
        });
    }

    /// Assigns `tag` to `vm_id` by hand; false if it already was, by hand.
    pub fn assign(&self, vm_id: &str, tag: SecurityTag) -> Result<bool, TagError> {
        let changed = self.update(vm_id, |vm| {
            let manual = TagEntry {
                origin: TagOrigin::Manual,
                assigned_at: unix_ms(SystemTime::now()),
            };
            match vm.tags.get(&tag) {
                Some(entry) if entry.origin == TagOrigin::Manual => false,
                _ => {
                    vm.tags.insert(tag, manual);
                    true
                }
            }
        });
        changed.ok_or_else(|| TagError::unknown(vm_id))
    }

    /// Removes `tag` from `vm_id` by hand, however it was assigned; false if
    /// it was not there.
    pub fn remove(&self, vm_id: &str, tag: SecurityTag) -> Result<bool, TagError> {
        let changed = self.update(vm_id, |vm| vm.tags.remove(&tag).is_some());
        changed.ok_or_else(|| TagError::unknown(vm_id))
    }

    /// The session VM `vm_id` has open, if any.
    pub fn session_of(&self, vm_id: &str) -> Option<String> {
        self.by_id.lock().get(vm_id)?.session_id.clone()
    }

    /// VM `vm_id`'s record, as it is now.
    pub fn get(&self, vm_id: &str) -> Option<Arc<VmRecord>> {
        self.by_id.lock().get(vm_id).cloned()
    }

    /// The VMs for which `keep` holds, as they are now: connected ones
    /// first, then by name.
    pub fn list(&self, keep: impl Fn(&VmRecord) -> bool) -> Vec<Arc<VmRecord>> {
        let mut vms: Vec<_> = self
            .by_id
            .lock()
            .values()
            .filter(|vm| keep(vm))
            .cloned()
            .collect();
        vms.sort_by(|a, b| {
            (a.session_id.is_none(), &a.vm_name, &a.vm_id).cmp(&(
                b.session_id.is_none(),
                &b.vm_name,
                &b.vm_id,
            ))
        });
        vms
    }

    /// VMs protected over the last 30 days (connected, or seen since).
    pub fn count(&self) -> usize {
        let horizon = horizon();
        self.by_id
            .lock()
            .values()
            .filter(|vm| vm.session_id.is_some() || vm.last_seen >= horizon)
            .count()
    }

    /// Forgets VMs not seen for 30 days, and the oldest untagged ones over
    /// [`MAX_VMS`]; true if it forgot any. Done when the registry is loaded
    /// and saved (a second after changes, and at every save interval), not
    /// per connection: a boot storm should not walk it.
    fn forget_old(&self) -> bool {
        let horizon = horizon();
        let mut by_id = self.by_id.lock();
        let before = by_id.len();
        by_id.retain(|_, vm| {
            vm.session_id.is_some() || vm.last_seen >= horizon || !vm.tags.is_empty()
        });
        if by_id.len() > self.limit {
            let excess = by_id.len() - self.limit;
            forget_idle(&mut by_id, excess, excess);
        }
        by_id.len() < before
    }

    /// The file the registry is kept in (none for one in memory only).
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Writes the registry to the state folder, atomically; unless the
    /// file would say what it says already: no record changed since it was
    /// written, none is old enough to forget, and no VM is connected (whose
    /// last-seen time moves). An SVM with no agent does not rewrite its
    /// registry at every save interval.
    pub fn save(&self) -> io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let _in_turn = self.saving.lock();
        // Read before the records: a change made after it is written now
        // and again at the next save, never missed.
        let generation = *self.changes.borrow() + 1;
        let forgot = self.forget_old();
        // Pointers copied under the lock; the records of connected VMs,
        // whose last-seen time is now, copied after it.
        let mut vms: Vec<Arc<VmRecord>> = self.by_id.lock().values().cloned().collect();
        let connected = vms.iter().any(|vm| vm.session_id.is_some());
        if !forgot && !connected && self.written.load(Ordering::Relaxed) == generation {
            return Ok(());
        }
        let now = unix_ms(SystemTime::now());
        for vm in vms.iter_mut().filter(|vm| vm.session_id.is_some()) {
            let vm = Arc::make_mut(vm);
            vm.last_seen = now;
            // Should the server crash before the next save.
            vm.awaited = true;
        }
        let saved = Saved {
            format: FORMAT,
            vms: vms.iter().map(|vm| &**vm).collect(),
        };
        state::replace_file(path, |out| {
            serde_json::to_writer(&mut *out, &saved).map_err(io::Error::other)
        })?;
        self.written.store(generation, Ordering::Relaxed);
        Ok(())
    }
}

/// The oldest last-seen time that still counts as protected.
fn horizon() -> u64 {
    unix_ms(SystemTime::now()).saturating_sub(RETENTION.as_millis() as u64)
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sessions::fixtures::agent_of;
    use std::fs;

    #[test]
    fn tag_names_round_trip() {
        for tag in SecurityTag::ALL {
            assert_eq!(tag.name().parse::<SecurityTag>().unwrap(), tag);
        }
        assert!("VirusFound".parse::<SecurityTag>().is_err());
        // Saved under the same names, as values and as map keys.
        let tags = BTreeMap::from([(SecurityTag::IdsIps, SecurityTag::VirusFound)]);
        let saved = serde_json::to_string(&tags).unwrap();
        assert_eq!(
            saved,
            r#"{"IDS_IPS.threat=high":"ANTI_VIRUS.VirusFound.threat=high"}"#
        );
        assert_eq!(
            serde_json::from_str::<BTreeMap<_, _>>(&saved).unwrap(),
            tags
        );
        assert!(serde_json::from_str::<SecurityTag>(r#""VirusFound""#).is_err());
    }

    /// A registry of at most `limit` VMs, and sessions that record in it.
    fn registry(limit: usize) -> (std::sync::Arc<Vms>, crate::sessions::Sessions) {
        let vms = std::sync::Arc::new(Vms {
            limit,
            ..Vms::in_memory()
        });
        let sessions = sessions_of(&vms);
        (vms, sessions)
    }

    /// Sessions (ten at most) that record in `vms`.
    fn sessions_of(vms: &Arc<Vms>) -> crate::sessions::Sessions {
        crate::sessions::Sessions::new(10, &Default::default(), Arc::clone(vms), Default::default())
    }

    /// Only the VM's session tells whether its agent reaches the
    /// Integration Server: a word a replaced session still had on its way
    /// is not the VM's any more.
    #[test]
    fn only_the_vms_session_tells_of_the_integration_server() {
        let dir = tempfile::tempdir().unwrap();
        let vms = Arc::new(Vms::open(dir.path()).unwrap());
        let sessions = sessions_of(&vms);
        let replaced = sessions.open(agent_of("vm-a")).unwrap();
        let newer = sessions.open(agent_of("vm-a")).unwrap();
        vms.integration_server(&replaced, false);
        assert!(vms.get("vm-a").unwrap().reasons().is_empty());
        vms.integration_server(&newer, false);
        assert_eq!(
            vms.get("vm-a").unwrap().reasons(),
            [VmReason::NoConnectionToIntegrationServer]
        );
    }

    /// A VM that had a session when the server stopped (or saved last,
    /// before a crash) is awaited at the next start: not back by the end
    /// of the grace period, its connection counts as lost. One that came
    /// back, or whose agent closed its session, is not; nor, while the
    /// server stops, is one whose session the server ended.
    #[test]
    fn vms_not_back_after_a_restart_count_as_lost() {
        let dir = tempfile::tempdir().unwrap();
        let start = || {
            let vms = Arc::new(Vms::open(dir.path()).unwrap());
            let sessions = sessions_of(&vms);
            (vms, sessions)
        };
        let lost = |vms: &Vms, vm: &str| vms.get(vm).unwrap().connection_lost;

        let (vms, sessions) = start();
        let a = sessions.open(agent_of("vm-a")).unwrap();
        let _b = sessions.open(agent_of("vm-b")).unwrap();
        let c = sessions.open(agent_of("vm-c")).unwrap();
        sessions.close(&c.id, Ending::Closed);
        vms.integration_server(&a, false);
        vms.save().unwrap();
        // The server crashed; vm-b comes back after the restart.
        let (vms, sessions) = start();
        let b = sessions.open(agent_of("vm-b")).unwrap();
        let reasons = vms.get("vm-a").unwrap().reasons();
        assert!(
            reasons.is_empty(),
            "awaited, its session's word ended: {reasons:?}"
        );
        assert_eq!(vms.lost_unless_back(), 1);
        assert!(lost(&vms, "vm-a"));
        let reasons = vms.get("vm-a").unwrap().reasons();
        assert_eq!(
            reasons,
            [VmReason::NoConnectionToSvm],
            "its session's word ended with it"
        );
        assert!(!lost(&vms, "vm-b") && !lost(&vms, "vm-c"));
        assert_eq!(vms.lost_unless_back(), 0, "once");

        // Stopped in order, the server ended vm-b's session itself.
        sessions.close(&b.id, Ending::ServerShutdown);
        assert_eq!(vms.lost_unless_back(), 0, "not while stopping");
        vms.save().unwrap();
        let (vms, _sessions) = start();
        assert!(!lost(&vms, "vm-b"), "awaited for the grace period");
        assert_eq!(vms.lost_unless_back(), 1);
        assert!(lost(&vms, "vm-a") && lost(&vms, "vm-b") && !lost(&vms, "vm-c"));

        // The server crashes within each grace period: a VM awaited at
        // every start since counts as lost at the third.
        let (vms, sessions) = start();
        let _d = sessions.open(agent_of("vm-d")).unwrap();
        vms.save().unwrap();
        for start_ in 1..AWAITED_STARTS {
            let (vms, _sessions) = start();
            assert!(vms.changed_at_open(), "to be saved");
            assert!(!lost(&vms, "vm-d"), "awaited at start {start_}");
            vms.save().unwrap();
        }
        let (vms, _sessions) = start();
        assert!(lost(&vms, "vm-d"), "lost at start {AWAITED_STARTS}");
        assert_eq!(vms.lost_unless_back(), 0, "counted once");
    }

    /// A save writes the file while a VM is connected or after a change,
    /// not when it would say what it says already.
    #[test]
    fn an_idle_registry_is_not_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let vms = Arc::new(Vms::open(dir.path()).unwrap());
        let sessions = sessions_of(&vms);
        let file = dir.path().join(FILE_NAME);
        // Each save here after the file was removed: whether it wrote it.
        let wrote = || {
            let _ = fs::remove_file(&file);
            vms.save().unwrap();
            file.exists()
        };
        assert!(wrote(), "the first save");
        assert!(!wrote(), "nothing changed");
        let a = sessions.open(agent_of("vm-a")).unwrap();
        assert!(
            wrote() && wrote(),
            "a VM connected: its last-seen time moves"
        );
        sessions.close(&a.id, Ending::Closed);
        assert!(wrote(), "it disconnected");
        assert!(!wrote(), "idle");
        vms.assign("vm-a", SecurityTag::VirusFound).unwrap();
        assert!(wrote(), "a tag assigned");
        assert!(!wrote(), "idle again");
    }

    #[test]
    fn a_full_registry_forgets_an_idle_vm_or_refuses_a_new_one() {
        use crate::sessions::Refused;
        let (vms, sessions) = registry(2);
        let open = |vm: &str| sessions.open(agent_of(vm));
        let first = open("vm-1").unwrap();
        let second = open("vm-2").unwrap();
        assert_eq!(open("vm-3").unwrap_err(), Refused::TooManyVms);
        assert_eq!(sessions.len(), 2, "a refused session is not opened");
        sessions.close(&first.id, Ending::Closed);
        let third = open("vm-3").expect("an idle, untagged VM makes room");
        assert!(vms.get("vm-1").is_none());

        // Tagged automatically, vm-2 was seen before vm-3; untagged, vm-3
        // goes first all the same.
        assert!(vms.threat_found("vm-2"));
        sessions.close(&second.id, Ending::Closed);
        sessions.close(&third.id, Ending::Closed);
        let fourth = open("vm-4").expect("an untagged VM makes room");
        assert!(vms.get("vm-3").is_none());
        assert!(vms.get("vm-2").is_some(), "tagged, kept while it could be");
        // With none left untagged, the VM tagged automatically goes, lest
        // made-up VMs with tags lock new ones out for good.
        let fifth = open("vm-5").expect("an automatically tagged VM makes room");
        assert!(vms.get("vm-2").is_none());

        // Tagged by hand, a VM is never forgotten.
        vms.assign("vm-4", SecurityTag::IdsIps).unwrap();
        sessions.close(&fourth.id, Ending::Closed);
        assert_eq!(
            open("vm-6").unwrap_err(),
            Refused::TooManyVms,
            "a VM tagged by hand is never forgotten to make room"
        );
        open("vm-5").expect("a VM in the registry comes back");
        drop(fifth);
    }

    /// Room is made a hundredth of the registry at a time, but no VM with a
    /// tag goes while an untagged one makes room enough.
    #[test]
    fn tagged_vms_go_only_when_untagged_ones_make_no_room() {
        let (vms, sessions) = registry(200);
        let visit = |vm: &str| {
            let session = sessions.open(agent_of(vm)).unwrap();
            sessions.close(&session.id, Ending::Closed);
        };
        for n in 0..199 {
            visit(&format!("tagged-{n}"));
            assert!(vms.threat_found(&format!("tagged-{n}")));
        }
        visit("untagged");
        visit("new");
        assert!(vms.get("untagged").is_none(), "made room");
        assert_eq!(vms.by_id.lock().len(), 200, "and no tagged VM went with it");
        // None untagged is left but "new": the two tagged VMs seen least
        // recently go at once, and the next new VM walks nothing.
        assert!(vms.threat_found("new"));
        visit("newer");
        assert!(vms.get("tagged-0").is_none() && vms.get("tagged-1").is_none());
        assert_eq!(vms.by_id.lock().len(), 199);
        visit("newest");
        assert_eq!(vms.by_id.lock().len(), 200);
        assert!(vms.get("tagged-2").is_some());
    }

    #[test]
    fn what_a_saved_registry_does_not_know_is_left_out_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let saved = Vms::open(dir.path()).unwrap();
        for vm_id in ["vm-1", "vm-2"] {
            let record = VmRecord::new(&agent_of(vm_id), unix_ms(SystemTime::now()));
            saved.by_id.lock().insert(vm_id.into(), Arc::new(record));
            assert!(saved.threat_found(vm_id));
        }
        saved.save().unwrap();
        // vm-2's tag is one this version does not know (a newer one's),
        // and a record it cannot read comes first.
        let text = fs::read_to_string(&path).unwrap();
        let (first, second) = text.split_at(text.find("vm-2").unwrap());
        let second = second.replacen("ANTI_VIRUS.VirusFound", "ANTI_VIRUS.Unknown", 1);
        let text = format!("{first}{second}").replacen("[", r#"[{"vm_id": 7},"#, 1);
        fs::write(&path, text).unwrap();

        let loaded = Vms::open(dir.path()).unwrap();
        assert_eq!(
            loaded.by_id.lock().len(),
            2,
            "the unreadable record is left out"
        );
        assert!(
            loaded
                .get("vm-1")
                .unwrap()
                .tags
                .contains_key(&SecurityTag::VirusFound)
        );
        assert!(
            loaded.get("vm-2").unwrap().tags.is_empty(),
            "kept, less the unknown tag"
        );
        let rejected = dir.path().join(format!("{FILE_NAME}.rejected"));
        assert!(
            fs::read_to_string(&rejected)
                .unwrap()
                .contains("ANTI_VIRUS.Unknown")
        );

        fs::write(&path, "not json").unwrap();
        let loaded = Vms::open(dir.path()).unwrap();
        assert!(
            loaded.get("vm-1").is_none(),
            "a damaged file is not trusted"
        );
        assert!(!path.exists() && rejected.exists());

        // Not a file: a FIFO in its place would keep the start waiting.
        let fifo = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid C string; mkfifo has no memory preconditions.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let loaded = Vms::open(dir.path()).unwrap();
        assert_eq!(loaded.count(), 0);
        assert!(!path.exists(), "set aside");
    }

    #[test]
    fn the_worst_reason_decides() {
        assert_eq!(worst([]), Health::Ok);
        let reasons = [VmReason::FileModified, VmReason::NoConnectionToSvm];
        assert_eq!(worst(reasons.map(VmReason::health)), Health::Critical);
    }
}
