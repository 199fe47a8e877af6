//! The SharedCache: hits and misses, signatures changes, eviction within
//! the budget, failures never cached, and warm restarts from the state
//! folder (damaged or foreign snapshots set aside).

mod common;

use std::{sync::Arc, time::Duration};

use common::*;
use scanserver::{
    cache::{CacheKey, Join, SharedCache},
    engine::{Engine, EngineConfig, ScanJob},
    state::StateDir,
    verdict::{FailReason, Verdict},
};
use tokio::{sync::watch, task::JoinHandle};

fn engine(budget: u64) -> Arc<Engine> {
    engine_with(
        shipped_ruleset(),
        EngineConfig {
            threads: 2,
            cache_budget: budget,
            ..EngineConfig::default()
        },
    )
}

fn document(n: u32) -> Vec<u8> {
    format!("document number {n}\n").repeat(20).into_bytes()
}

#[test]
fn hits_misses_and_a_signatures_change() {
    let engine = engine(1 << 20);
    let first = engine.scan(&ScanJob::bytes(EICAR.to_vec(), None));
    assert!(!first.cached);
    let second = engine.scan(&ScanJob::bytes(EICAR.to_vec(), None));
    assert!(second.cached);
    assert_eq!(
        second.verdict, first.verdict,
        "infected verdicts are cached"
    );
    let stats = engine.cache().stats();
    assert_eq!((stats.hits, stats.misses, stats.entries), (1, 1, 1));

    let digest = blake3::hash(EICAR);
    engine.replace_ruleset(ruleset_from_source(
        "rule other { strings: $a = \"other\" condition: $a }",
    ));
    assert!(
        engine.cached(&digest, None).is_none(),
        "nothing from the old signatures is served"
    );
    assert_eq!(engine.cache().len(), 0, "and emptied");
    let rescanned = engine.scan(&ScanJob::bytes(EICAR.to_vec(), None));
    assert!(!rescanned.cached);
    assert!(rescanned.verdict.is_clean(), "judged by the new signatures");
}

/// Keys made, and verdicts added, with the signatures a change replaced:
/// a request that made its key just before the change, or a scan that was
/// running with the old signatures and ends after it, finds or leaves
/// nothing that is served.
#[test]
fn keys_of_replaced_signatures_find_nothing() {
    let old = shipped_ruleset();
    let cache = SharedCache::new(1 << 20, &old);
    let key = CacheKey::new(&blake3::hash(EICAR), &old, None);
    cache.insert(key, Verdict::Clean, &old.version_arc());
    assert!(cache.get(&key).is_some());
    let new = ruleset_from_source("rule other { strings: $a = \"other\" condition: $a }");
    cache.serve(&new);
    cache.clear();
    cache.insert(key, Verdict::Clean, &old.version_arc());
    assert!(cache.get(&key).is_none() && cache.peek(&key).is_none());
    assert!(cache.is_empty(), "and not kept either");
    let current = CacheKey::new(&blake3::hash(EICAR), &new, None);
    cache.insert(current, Verdict::Clean, &new.version_arc());
    assert!(cache.get(&current).is_some(), "the new signatures' are");
}

/// Looking a verdict up, then leading the flight for its content, is not
/// one step: a flight for the same content may land in between. The lead
/// then finds that verdict in the cache and hands it to whoever joined it
/// meanwhile, rather than have the content sent and scanned again.
#[tokio::test]
async fn a_lead_taken_just_after_another_landed_finds_its_verdict() {
    let engine = engine(1 << 20);
    let cache = engine.cache();
    let key = engine.cache_key(&blake3::hash(EICAR), None);
    assert!(cache.get(&key).is_none());
    // In between, the content is scanned and cached.
    engine.scan(&ScanJob::bytes(EICAR.to_vec(), None));
    let Join::Lead(flight) = cache.flights().join(key) else {
        panic!("nobody else leads")
    };
    let Join::Wait(waiter) = cache.flights().join(key) else {
        panic!("the lead is under way")
    };
    let hit = cache
        .landed_meanwhile(flight)
        .ok()
        .expect("the verdict cached");
    assert!(!hit.verdict.is_clean());
    let soon = tokio::time::Instant::now() + Duration::from_secs(1);
    let handed = waiter.verdict(soon).await.expect("handed on");
    assert!(!handed.verdict.is_clean());
    assert!(cache.flights().is_empty());

    let unknown = engine.cache_key(&blake3::hash(b"never scanned"), None);
    let Join::Lead(flight) = cache.flights().join(unknown) else {
        panic!("nobody else leads")
    };
    assert!(
        cache.landed_meanwhile(flight).is_err(),
        "nothing cached: led"
    );
}

#[test]
fn eviction_keeps_the_cache_within_its_budget() {
    let budget = 64 << 10;
    let engine = engine(budget);
    let jobs = (0..5_000).map(|n| ScanJob::bytes(document(n), None));
    engine.scan_all(jobs, |_, outcome| assert!(outcome.verdict.is_clean()));
    let stats = engine.cache().stats();
    assert!(stats.bytes <= budget, "{} bytes over {budget}", stats.bytes);
    assert!(stats.evictions > 0);
    assert!(stats.entries < 5_000);
}

#[test]
fn failures_are_never_cached() {
    let engine = engine_with(
        shipped_ruleset(),
        EngineConfig {
            threads: 1,
            max_scan_size: 100,
            ..EngineConfig::default()
        },
    );
    let outcome = engine.scan(&ScanJob::bytes(vec![7u8; 1000], None));
    assert_eq!(
        outcome.verdict.failure().map(|f| f.reason),
        Some(FailReason::TooLarge)
    );
    let again = engine.scan(&ScanJob::bytes(vec![7u8; 1000], None));
    assert!(!again.cached);
    assert!(engine.cache().is_empty());
}

/// Starts the state folder's keeper (and lets it take note of the cache as
/// it is); sending `true` stops it, and the handle resolves after its last
/// save.
async fn keeper(state: &StateDir, engine: &Arc<Engine>) -> (watch::Sender<bool>, JoinHandle<()>) {
    let (stop, stopped) = watch::channel(false);
    let keeper = tokio::spawn(state.clone().keep_cache(
        Arc::clone(engine),
        Duration::from_secs(3600),
        stopped,
    ));
    tokio::task::yield_now().await;
    (stop, keeper)
}

async fn save_on_shutdown((stop, keeper): (watch::Sender<bool>, JoinHandle<()>)) {
    stop.send(true).unwrap();
    keeper.await.unwrap();
}

#[tokio::test]
async fn a_restart_keeps_the_verdicts_of_the_same_signatures() {
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::open(dir.path()).unwrap();
    let before = engine(1 << 20);
    let running = keeper(&state, &before).await;
    let contents: Vec<_> = (0..50).map(document).chain([EICAR.to_vec()]).collect();
    for content in &contents {
        before.scan(&ScanJob::bytes(content.clone(), None));
    }
    save_on_shutdown(running).await;
    assert_eq!(before.cache().stats().persisted, 51);

    let after = engine(1 << 20);
    state.restore_cache(&after);
    assert_eq!(after.cache().stats().loaded, 51);
    for content in &contents {
        let outcome = after.scan(&ScanJob::bytes(content.clone(), None));
        assert!(outcome.cached, "served from the restored cache");
    }
    let eicar = after.cached(&blake3::hash(EICAR), None).unwrap();
    assert_eq!(eicar.verdict.detections()[0].rule, "EICAR_Test_File");

    // Other signatures: the snapshot is set aside, nothing is served.
    let other = engine_with(
        ruleset_from_source("rule other { strings: $a = \"other\" condition: $a }"),
        EngineConfig::default(),
    );
    state.restore_cache(&other);
    assert!(other.cache().is_empty());
    assert!(dir.path().join("verdicts.snapshot.rejected").exists());
}

#[tokio::test]
async fn a_damaged_snapshot_is_set_aside_and_never_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::open(dir.path()).unwrap();
    let before = engine(1 << 20);
    let running = keeper(&state, &before).await;
    before.scan(&ScanJob::bytes(document(1), None));
    save_on_shutdown(running).await;

    let path = dir.path().join("verdicts.snapshot");
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();

    let after = engine(1 << 20);
    state.restore_cache(&after);
    assert!(after.cache().is_empty());
    assert!(!path.exists());
    assert!(dir.path().join("verdicts.snapshot.rejected").exists());

    // Not a snapshot at all: set aside in its turn, in place of the older.
    std::fs::write(&path, b"hello").unwrap();
    let fresh = engine(1 << 20);
    state.restore_cache(&fresh);
    assert!(fresh.cache().is_empty());
    assert!(!path.exists());
    let rejected = std::fs::read(dir.path().join("verdicts.snapshot.rejected")).unwrap();
    assert_eq!(rejected, b"hello");
}
