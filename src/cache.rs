//! The SharedCache: verdicts by content digest, shared by every entry point
//! and every virtual machine.
//!
//! Keyed by the blake3 digest of the content and valid for one signatures
//! version: an entry made under another version is never served (and the
//! whole cache is cleared when the signatures change, which reclaims its
//! memory). Clean and infected verdicts are cached; failures never are.
//!
//! Bounded by a memory budget, with quick_cache's frequency-aware eviction
//! (CLOCK-Pro): files opened by many machines stay, one-off files go first.
//! Lookups and inserts lock only one shard of the cache.
//!
//! # Threat model
//!
//! Entries come only from scans of content the server received and hashed
//! itself ([`crate::engine::Engine`] inserts under the digest it computed
//! while reading or receiving the content). A digest an agent *claims* is
//! only ever used to look a verdict up. So an agent that lies about digests
//! can learn nothing but the verdict for a digest it already knows, and can
//! never make another machine's content look clean.

use std::{path::Path, sync::Arc};

use quick_cache::{Weighter, sync::Cache};

use crate::{
    signatures::{NameExternals, Ruleset},
    verdict::Verdict,
};

/// A blake3 content digest.
pub type Digest = blake3::Hash;

/// What a verdict is cached under: the content digest, and, when the
/// ruleset's verdicts may depend on the file's name (it uses the `filename`,
/// `filepath` or `extension` variables), the name-derived values too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey([u8; 32]);

impl CacheKey {
    pub fn new(digest: &Digest, ruleset: &Ruleset, name: Option<&Path>) -> Self {
        if !ruleset.name_sensitive() {
            return CacheKey(*digest.as_bytes());
        }
        let mut hasher = blake3::Hasher::new();
        hasher.update(digest.as_bytes());
        for (_, value) in NameExternals::of(name).pairs() {
            hasher.update(value.as_bytes());
            hasher.update(&[0]);
        }
        CacheKey(*hasher.finalize().as_bytes())
    }
}

/// A verdict as cached: with the signatures version that made it.
#[derive(Debug, Clone)]
pub struct CachedVerdict {
    pub verdict: Verdict,
    pub rules_version: Arc<str>,
}

/// The verdict cache.
pub struct SharedCache {
    entries: Cache<CacheKey, Arc<CachedVerdict>, EntryWeight>,
    /// A budget of 0 turns caching off (for benchmarks of the engine).
    enabled: bool,
}

/// The approximate memory an entry takes, so the budget is in bytes.
#[derive(Clone)]
struct EntryWeight;

impl Weighter<CacheKey, Arc<CachedVerdict>> for EntryWeight {
    fn weight(&self, _key: &CacheKey, value: &Arc<CachedVerdict>) -> u64 {
        let detections: usize = value
            .verdict
            .detections()
            .iter()
            .map(|d| {
                96 + d.rule.len()
                    + d.namespace.len()
                    + d.threat.len()
                    + d.tags.iter().map(|t| t.len() + 24).sum::<usize>()
            })
            .sum();
        (128 + detections) as u64
    }
}

impl SharedCache {
    /// A cache holding at most about `budget` bytes of entries; 0 caches
    /// nothing.
    pub fn new(budget: u64) -> Self {
        let estimated_items = (budget / 128).clamp(16, 1 << 24) as usize;
        SharedCache {
            entries: Cache::with_weighter(estimated_items, budget.max(1024), EntryWeight),
            enabled: budget > 0,
        }
    }

    /// The verdict under `key`, if one was made with `rules_version`.
    pub fn get(&self, key: &CacheKey, rules_version: &str) -> Option<Arc<CachedVerdict>> {
        self.entries
            .get(key)
            .filter(|entry| &*entry.rules_version == rules_version)
    }

    /// Remembers a verdict the engine made on content it hashed itself.
    /// Failures are not cached.
    pub fn insert(&self, key: CacheKey, verdict: &Verdict, rules_version: &Arc<str>) {
        if !self.enabled || verdict.failure().is_some() {
            return;
        }
        let entry = CachedVerdict {
            verdict: verdict.clone(),
            rules_version: Arc::clone(rules_version),
        };
        self.entries.insert(key, Arc::new(entry));
    }

    /// Forgets every entry (the signatures changed).
    pub fn clear(&self) {
        self.entries.clear();
    }

    /// Entries currently cached.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Approximate bytes used by the entries.
    pub fn bytes(&self) -> u64 {
        self.entries.weight()
    }
}
