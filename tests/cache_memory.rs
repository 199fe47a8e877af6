//! The SharedCache's budget is of the process's memory: a cache filled
//! twice over holds no more resident memory than its budget. In a test
//! binary of its own, so that no other test's memory is counted.

mod common;

use scanserver::{
    cache::{CacheKey, SharedCache},
    verdict::Verdict,
};

/// Resident memory of this process, in bytes.
fn resident() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib << 10
}

#[test]
fn a_full_cache_stays_within_its_budget() {
    // A ruleset of one small rule: compiling it frees next to nothing that
    // the cache could then take without growing the process.
    let ruleset = common::ruleset_from_source("rule one { strings: $a = \"one\" condition: $a }");
    let version = ruleset.version_arc();
    let budget = 64 << 20;
    let before = resident();
    let cache = SharedCache::new(budget, &ruleset);
    // Twice as many clean verdicts as a clean entry's weight lets in: the
    // cache fills, then evicts.
    for n in 0..2 * budget / 200 {
        let mut digest = [0; 32];
        digest[..8].copy_from_slice(&n.to_le_bytes());
        let key = CacheKey::new(&blake3::Hash::from_bytes(digest), &ruleset, None);
        cache.insert(key, Verdict::Clean, &version);
    }
    let stats = cache.stats();
    assert!(stats.evictions > 0, "{stats:?}");
    let taken = resident().saturating_sub(before);
    assert!(
        taken <= budget,
        "{} MiB resident for a budget of {} MiB ({} entries)",
        taken >> 20,
        budget >> 20,
        stats.entries
    );
}
