//! Contents whose scans time out: not scanned again for a while.
//!
//! A scan that times out fails its file (`timeout`), and a failure is never
//! cached: the next copy of the content is scanned again, which is right
//! for one file, whose scan may have timed out in a busy moment. But in a
//! boot storm hundreds of VMs open the same file at once, and a scan that
//! fails lands nothing for the copies that waited for it (see
//! `cache::flight`): each has its own copy scanned, holding a scan thread
//! for a whole timeout. On a two-core SVM, 500 copies of a file that times
//! out at 10 s would keep both threads for some forty minutes, while every
//! other file of the estate waits behind them.
//!
//! So content whose scans timed out [`TIMEOUTS_IN_A_ROW`] times in a row,
//! under the same signatures and (for rules that look at names) the same
//! name, is not scanned again for [`REFUSED_FOR`] after the last: its copies
//! fail at once with `timeout`, saying why and for how long. Never clean
//! (fail closed), and not a verdict: nothing is cached or persisted, and a
//! signatures change forgets every such content (its key names the
//! signatures). A scan of the content that ends in time (one that was under
//! way as the last timed out) forgets it too. Twice rather than once, so
//! that one scan cut short by a busy machine refuses nothing.
//!
//! Only timeouts of content whose digest the server computed count (a
//! server's uploads, see `Engine::scan_on_worker`): an agent cannot have
//! content refused for others without sending that very content, and what
//! it gets refused is a failure, never a verdict.

use std::{
    collections::HashMap,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use parking_lot::RwLock;

use crate::cache::CacheKey;

/// Timeouts in a row after which a content's copies are refused.
pub const TIMEOUTS_IN_A_ROW: u32 = 2;

/// How long after its last timeout a content's copies are refused.
pub const REFUSED_FOR: Duration = Duration::from_secs(10 * 60);

/// Contents remembered at most; a new one takes the place of the one that
/// timed out longest ago.
pub const MAX_TIMED_OUT: usize = 4096;

/// Contents whose scans timed out lately, by cache key.
#[derive(Default)]
pub(super) struct TimedOut {
    /// Whether any content is remembered: the look every scan makes.
    any: AtomicBool,
    contents: RwLock<HashMap<CacheKey, Mark>>,
}

/// A content's timeouts.
#[derive(Debug, Clone, Copy)]
struct Mark {
    in_a_row: u32,
    last: Instant,
}

impl Mark {
    /// How long the content is still refused at `now`, if it is.
    fn refused_for(&self, now: Instant) -> Option<Duration> {
        let left = REFUSED_FOR.checked_sub(now.saturating_duration_since(self.last))?;
        (self.in_a_row >= TIMEOUTS_IN_A_ROW && !left.is_zero()).then_some(left)
    }
}

impl TimedOut {
    /// Whether any content is remembered; when not, no key need be made
    /// to look one up.
    pub fn any(&self) -> bool {
        self.any.load(Ordering::Relaxed)
    }

    /// How long content under `key` is still refused, if it is.
    pub fn refused_for(&self, key: &CacheKey) -> Option<Duration> {
        self.refused_for_at(key, Instant::now())
    }

    fn refused_for_at(&self, key: &CacheKey, now: Instant) -> Option<Duration> {
        if !self.any() {
            return None;
        }
        self.contents.read().get(key)?.refused_for(now)
    }

    /// Notes a scan of content under `key` that timed out. Returns whether
    /// the content is refused from now on, which it was not before.
    pub fn timed_out(&self, key: CacheKey) -> bool {
        self.timed_out_at(key, Instant::now())
    }

    fn timed_out_at(&self, key: CacheKey, now: Instant) -> bool {
        let mut contents = self.contents.write();
        if contents.len() >= MAX_TIMED_OUT && !contents.contains_key(&key) {
            contents.retain(|_, mark| mark.last + REFUSED_FOR > now);
            if contents.len() >= MAX_TIMED_OUT {
                let oldest = contents.iter().min_by_key(|(_, mark)| mark.last);
                if let Some((&oldest, _)) = oldest {
                    contents.remove(&oldest);
                }
            }
        }
        let mark = contents.entry(key).or_insert(Mark {
            in_a_row: 0,
            last: now,
        });
        let was_refused = mark.refused_for(now).is_some();
        if mark.last + REFUSED_FOR <= now {
            // Its last timeout is too long ago to count.
            mark.in_a_row = 0;
        }
        mark.in_a_row += 1;
        mark.last = now;
        self.any.store(true, Ordering::Relaxed);
        !was_refused && mark.refused_for(now).is_some()
    }

    /// Notes a scan of content under `key` that ended in time: the content
    /// is forgotten.
    pub fn in_time(&self, key: &CacheKey) {
        if self.any() {
            let mut contents = self.contents.write();
            contents.remove(key);
            self.any.store(!contents.is_empty(), Ordering::Relaxed);
        }
    }

    /// Forgets every content: the signatures changed.
    pub fn clear(&self) {
        let mut contents = self.contents.write();
        contents.clear();
        self.any.store(false, Ordering::Relaxed);
    }

    /// Contents refused now.
    pub fn refused(&self) -> usize {
        let now = Instant::now();
        let contents = self.contents.read();
        contents
            .values()
            .filter(|mark| mark.refused_for(now).is_some())
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signatures::Ruleset;

    fn key(ruleset: &Ruleset, n: u32) -> CacheKey {
        CacheKey::new(&blake3::hash(&n.to_le_bytes()), ruleset, None)
    }

    fn ruleset() -> Ruleset {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("r.yar"), "rule r { condition: false }").unwrap();
        Ruleset::load(dir.path(), None).unwrap()
    }

    #[test]
    fn content_is_refused_after_two_timeouts_in_a_row() {
        let ruleset = ruleset();
        let timed_out = TimedOut::default();
        let (slow, other) = (key(&ruleset, 1), key(&ruleset, 2));
        assert!(!timed_out.any() && timed_out.refused_for(&slow).is_none());
        assert!(!timed_out.timed_out(slow), "one timeout refuses nothing");
        assert!(timed_out.refused_for(&slow).is_none());
        assert!(timed_out.timed_out(slow), "the second does");
        let left = timed_out.refused_for(&slow).expect("refused");
        assert!(left > REFUSED_FOR - Duration::from_secs(60) && left <= REFUSED_FOR);
        assert!(!timed_out.timed_out(slow), "refused already: not news");
        assert!(timed_out.refused_for(&other).is_none());
        assert_eq!(timed_out.refused(), 1);
        // A scan that ends in time forgets it.
        timed_out.in_time(&slow);
        assert!(timed_out.refused_for(&slow).is_none() && !timed_out.any());
        // As does a signatures change.
        timed_out.timed_out(other);
        timed_out.timed_out(other);
        timed_out.clear();
        assert!(timed_out.refused_for(&other).is_none() && timed_out.refused() == 0);
    }

    #[test]
    fn timeouts_count_for_a_while_and_in_a_bounded_number() {
        let ruleset = ruleset();
        let timed_out = TimedOut::default();
        let slow = key(&ruleset, 1);
        let now = Instant::now();
        timed_out.timed_out_at(slow, now);
        timed_out.timed_out_at(slow, now);
        let later = now + REFUSED_FOR;
        assert!(
            timed_out.refused_for_at(&slow, later).is_none(),
            "no longer refused"
        );
        assert!(
            !timed_out.timed_out_at(slow, later),
            "a timeout after that is a first"
        );
        assert!(timed_out.refused_for_at(&slow, later).is_none());
        for n in 2..MAX_TIMED_OUT as u32 + 10 {
            timed_out.timed_out_at(key(&ruleset, n), later + Duration::from_secs(1));
        }
        assert_eq!(timed_out.contents.read().len(), MAX_TIMED_OUT);
        let newest = key(&ruleset, MAX_TIMED_OUT as u32 + 9);
        assert!(timed_out.contents.read().contains_key(&newest));
        assert!(
            !timed_out.contents.read().contains_key(&slow),
            "the oldest went"
        );
    }
}
