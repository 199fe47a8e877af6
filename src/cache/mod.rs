//! The SharedCache: verdicts by content digest, shared by every entry point
//! and every virtual machine.
//!
//! * Keyed by the blake3 digest of the content and the signatures version
//!   ([`CacheKey`]), and serving only keys of the signatures in use: when
//!   they change the cache is emptied (the entries' room goes to the new
//!   signatures' verdicts), and from then on a key of the old ones finds
//!   nothing, even a request's made just before the change; a verdict of a
//!   scan that was running with the old signatures is not kept (or, if it
//!   slipped in as they changed, never served, and evicted like any other).
//!   Clean and infected verdicts are cached; failures never are.
//! * Bounded by a memory budget, with quick_cache's frequency-aware
//!   eviction (CLOCK-Pro): files opened by many machines stay, one-off files
//!   go first. Lookups and inserts lock only one shard of the cache.
//! * [`flight`]: while content is being received or scanned, other requests
//!   for the same digest wait for that one verdict instead of starting
//!   another upload or scan (a boot storm costs one scan per file).
//! * [`snapshot`]: the entries survive a restart in the server's state
//!   folder.
//!
//! # Threat model
//!
//! Entries come only from scans of content the server received and hashed
//! itself ([`crate::engine::Engine`] inserts under the digest it computed
//! while reading or receiving the content). A digest an agent *claims* is
//! only ever used to look a verdict up, or to wait for a scan in flight.
//! So an agent that lies about digests:
//!
//! * can learn the verdict for a digest it already knows, nothing more;
//! * can never make another machine's content look clean: its content is
//!   hashed by the server, and a claimed digest that differs fails the file;
//! * can announce a digest and then not send the content: requests for the
//!   same digest wait for that upload at most [`flight::UPLOAD_WAIT`], then
//!   get their own content scanned, and an upload that sent less than
//!   [`flight::LEAD_PROGRESS`] of its content by then (or in any such
//!   wait after) gives its lead up (later requests do not wait for it). It
//!   can delay, never decide, a verdict.
//!
//! A snapshot is trusted only when its checksum, format and signatures
//! version match; it lives in a folder only the server writes to.

pub mod flight;
pub mod snapshot;

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use arc_swap::ArcSwapOption;
use quick_cache::{DefaultHashBuilder, Lifecycle, OptionsBuilder, Weighter, sync::Cache};
use serde::Serialize;

use crate::{
    signatures::{Ruleset, version_id},
    verdict::Verdict,
};
pub use flight::{Flight, Flights, Join};

/// A blake3 content digest.
pub type Digest = blake3::Hash;

/// What a verdict is cached under: the content digest (mixed, when the
/// ruleset's verdicts may depend on the file's name, with the name, which
/// the `filename`, `filepath` and `extension` values are made from) and
/// the signatures version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey {
    content: [u8; 32],
    rules: u64,
}

impl CacheKey {
    pub fn new(digest: &Digest, ruleset: &Ruleset, name: Option<&Path>) -> Self {
        let rules = ruleset.version_id();
        if !ruleset.name_sensitive() {
            return CacheKey {
                content: *digest.as_bytes(),
                rules,
            };
        }
        // The name as given, not the values made from it: a boot storm
        // makes a key for every request, and parsing the name into its
        // parts for each cost more than the hash (same name, same values;
        // one file under names that differ only in spelling is scanned
        // once for each). No name is the empty name: their values agree.
        let name = name.map_or(&[][..], |name| name.as_os_str().as_encoded_bytes());
        let mut hasher = blake3::Hasher::new();
        hasher.update(digest.as_bytes());
        hasher.update(name);
        CacheKey {
            content: *hasher.finalize().as_bytes(),
            rules,
        }
    }

    /// Whether the key is one of the signatures `version`: a verdict made
    /// with others is not a verdict for this key.
    pub fn is_of(&self, version: &str) -> bool {
        self.rules == version_id(version)
    }
}

/// A verdict as cached: with the signatures version that made it.
#[derive(Debug, Clone)]
pub struct CachedVerdict {
    pub verdict: Verdict,
    pub rules_version: Arc<str>,
}

/// What the cache did since the server started.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CacheStats {
    /// Entries held now.
    pub entries: u64,
    /// Approximate bytes they take.
    pub bytes: u64,
    /// The memory budget.
    pub budget: u64,
    /// Requests (a hash-first begin, a digest in a Lookup, content
    /// received or read) whose verdict was cached when they came.
    pub hits: u64,
    /// The other requests: each is counted once, at its first look, so a
    /// request that then waited for a scan under way (see
    /// `coalesced_waits`), or found the verdict of a scan that ended just
    /// after that look, stays a miss.
    pub misses: u64,
    /// hits / (hits + misses), 0 before the first lookup.
    pub hit_ratio: f64,
    /// Requests that waited for a scan or upload of the same content under
    /// way rather than starting their own, and that scan's verdict came (a
    /// wait that brought none, that scan having failed, is not counted;
    /// one whose verdict was of signatures replaced meanwhile, and so not
    /// taken, is).
    pub coalesced_waits: u64,
    /// Entries evicted to stay within the budget, or replaced by another
    /// verdict for the same key (an entry larger than the cache can hold
    /// at all is counted here as it is refused).
    pub evictions: u64,
    /// Entries loaded from the snapshot at start.
    pub loaded: u64,
    /// Entries in the last snapshot written.
    pub persisted: u64,
}

/// Counters shared with the eviction hook.
#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
    loaded: AtomicU64,
    persisted: AtomicU64,
    /// Bumped by every insert and clear: tells a snapshot it is stale.
    changes: AtomicU64,
}

fn bump(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// The entries' store.
type Entries = Cache<CacheKey, Arc<CachedVerdict>, EntryWeight, DefaultHashBuilder, Evictions>;

/// The verdict cache.
pub struct SharedCache {
    entries: Entries,
    counters: Arc<Counters>,
    flights: Flights,
    budget: u64,
    /// The version number of the signatures whose keys are served
    /// ([`Ruleset::version_id`]).
    signatures: AtomicU64,
    /// The clean verdict of the latest signatures, which every clean entry
    /// of theirs shares: nearly every entry is clean, and one allocation
    /// for each would take about a third of the cache's memory. Swapped,
    /// not locked: every scan's clean verdict is stored through it.
    clean: ArcSwapOption<CachedVerdict>,
}

/// The memory an entry takes, so that the budget is of the process's
/// memory: an entry's place in the cache (its key, the pointer to its
/// verdict, the cache's own tables, and the keys of evicted entries the
/// cache remembers to judge how often content comes back) was measured
/// at 145 to 175 bytes a clean entry (resident memory of a process
/// filling caches of 64 MiB to 1 GiB twice over), and counts as 200; an
/// infected verdict's allocation and its detections come on top.
#[derive(Clone)]
struct EntryWeight;

/// The memory of a clean entry, whose verdict is shared (see
/// [`SharedCache::insert`]).
const ENTRY_WEIGHT: u64 = 200;

impl Weighter<CacheKey, Arc<CachedVerdict>> for EntryWeight {
    fn weight(&self, _key: &CacheKey, value: &Arc<CachedVerdict>) -> u64 {
        let detections = value.verdict.detections();
        if detections.is_empty() {
            return ENTRY_WEIGHT;
        }
        let detections: usize = detections
            .iter()
            .map(|d| {
                96 + d.rule.len()
                    + d.namespace.len()
                    + d.threat.len()
                    + d.tags.iter().map(|t| t.len() + 24).sum::<usize>()
            })
            .sum();
        ENTRY_WEIGHT + 80 + detections as u64
    }
}

/// Counts evictions.
#[derive(Clone)]
struct Evictions(Arc<Counters>);

impl Lifecycle<CacheKey, Arc<CachedVerdict>> for Evictions {
    type RequestState = ();

    fn on_evict(&self, _: &mut (), _: CacheKey, _: Arc<CachedVerdict>) {
        bump(&self.0.evictions, 1);
    }
}

impl SharedCache {
    /// A cache holding at most about `budget` bytes of verdicts made with
    /// `ruleset`; 0 caches nothing (for benchmarks of the engine alone).
    pub fn new(budget: u64, ruleset: &Ruleset) -> Self {
        let counters = Arc::new(Counters::default());
        let options = OptionsBuilder::new()
            .estimated_items_capacity((budget / ENTRY_WEIGHT).clamp(16, 1 << 24) as usize)
            .weight_capacity(budget.max(1024))
            .build()
            .expect("cache options are valid");
        SharedCache {
            entries: Cache::with_options(
                options,
                EntryWeight,
                DefaultHashBuilder::default(),
                Evictions(Arc::clone(&counters)),
            ),
            counters,
            flights: Flights::default(),
            budget,
            signatures: AtomicU64::new(ruleset.version_id()),
            clean: ArcSwapOption::empty(),
        }
    }

    /// Whether `key` is of the signatures in use.
    fn serves(&self, key: &CacheKey) -> bool {
        key.rules == self.signatures.load(Ordering::Acquire)
    }

    /// The verdict under `key`.
    pub fn get(&self, key: &CacheKey) -> Option<Arc<CachedVerdict>> {
        let found = self.fresh(key, |entries| entries.get(key));
        let counter = match found {
            Some(_) => &self.counters.hits,
            None => &self.counters.misses,
        };
        bump(counter, 1);
        found
    }

    /// The verdict under `key`, without counting a hit or a miss: for a
    /// second look by the engine at content whose request was counted
    /// already.
    pub fn peek(&self, key: &CacheKey) -> Option<Arc<CachedVerdict>> {
        self.fresh(key, |entries| entries.peek(key))
    }

    /// What `read` finds under `key`, if `key` is of the signatures in use
    /// both before and after the read: new signatures put in use during it
    /// (before their clearing has reached the entry) must not let an old
    /// verdict out.
    fn fresh(
        &self,
        key: &CacheKey,
        read: impl FnOnce(&Entries) -> Option<Arc<CachedVerdict>>,
    ) -> Option<Arc<CachedVerdict>> {
        if !self.serves(key) {
            return None;
        }
        read(&self.entries).filter(|_| self.serves(key))
    }

    /// The verdict a flight for the key of `flight` left here, if one
    /// landed since the caller found nothing under that key and led
    /// `flight` (looking up, then joining, is not one step): `flight` hands
    /// it on to whoever joined it meanwhile. Otherwise `flight`, to lead:
    /// without this second look the content would be asked for, and
    /// scanned, again.
    pub fn landed_meanwhile(&self, flight: Flight) -> Result<Arc<CachedVerdict>, Flight> {
        match self.peek(flight.key()) {
            Some(hit) => {
                flight.land(Some(Arc::clone(&hit)));
                Ok(hit)
            }
            None => Err(flight),
        }
    }

    /// Remembers a verdict the engine made on content it hashed itself.
    /// Failures are not cached.
    pub fn insert(&self, key: CacheKey, verdict: Verdict, rules_version: &Arc<str>) {
        if self.budget == 0 || verdict.failure().is_some() || !self.serves(&key) {
            return;
        }
        let entry = match verdict {
            Verdict::Clean => self.clean(rules_version),
            verdict => Arc::new(CachedVerdict {
                verdict,
                rules_version: Arc::clone(rules_version),
            }),
        };
        self.entries.insert(key, entry);
        bump(&self.counters.changes, 1);
    }

    /// The clean verdict of the signatures `version`, shared. Scans of
    /// two versions finishing at once (a reload) may each make their own:
    /// each is as good, and the latest stored is shared from then on.
    fn clean(&self, version: &Arc<str>) -> Arc<CachedVerdict> {
        if let Some(shared) = &*self.clean.load()
            && shared.rules_version == *version
        {
            return Arc::clone(shared);
        }
        let shared = Arc::new(CachedVerdict {
            verdict: Verdict::Clean,
            rules_version: Arc::clone(version),
        });
        self.clean.store(Some(Arc::clone(&shared)));
        shared
    }

    /// Uploads and scans under way, for coalescing.
    pub fn flights(&self) -> &Flights {
        &self.flights
    }

    /// From now on serves only keys of `ruleset`, which is to replace the
    /// signatures in use (see [`crate::engine::Engine::replace_ruleset`]).
    pub fn serve(&self, ruleset: &Ruleset) {
        self.signatures
            .store(ruleset.version_id(), Ordering::Release);
    }

    /// Forgets every entry (the signatures changed). Blocking: the entries
    /// are dropped one by one.
    pub fn clear(&self) {
        self.entries.clear();
        bump(&self.counters.changes, 1);
    }

    /// A number that changes whenever the entries do (evictions aside).
    pub fn generation(&self) -> u64 {
        self.counters.changes.load(Ordering::Relaxed)
    }

    /// Entries currently cached.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The statistics, as of now.
    pub fn stats(&self) -> CacheStats {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let (hits, misses) = (get(&self.counters.hits), get(&self.counters.misses));
        let lookups = hits + misses;
        CacheStats {
            entries: self.entries.len() as u64,
            bytes: self.entries.weight(),
            budget: self.budget,
            hits,
            misses,
            hit_ratio: if lookups == 0 {
                0.0
            } else {
                hits as f64 / lookups as f64
            },
            coalesced_waits: self.flights.waits(),
            evictions: get(&self.counters.evictions),
            loaded: get(&self.counters.loaded),
            persisted: get(&self.counters.persisted),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// New signatures put in use while an entry of the old ones is read
    /// (before their clearing reaches it) let nothing out.
    #[test]
    fn signatures_changed_during_a_read_let_no_old_verdict_out() {
        let old = Ruleset::of_source("rule a { strings: $a = \"a\" condition: $a }");
        let new = Ruleset::of_source("rule b { strings: $b = \"b\" condition: $b }");
        let cache = SharedCache::new(1 << 20, &old);
        let key = CacheKey::new(&blake3::hash(b"content"), &old, None);
        cache.insert(key, Verdict::Clean, &old.version_arc());
        assert!(cache.get(&key).is_some(), "in use");
        let switched = cache.fresh(&key, |entries| {
            let found = entries.get(&key);
            cache.serve(&new);
            found
        });
        assert!(switched.is_none(), "switched during the read");
    }
}
