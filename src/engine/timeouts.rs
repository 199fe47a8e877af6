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
//! way as the last timed out) forgets it too. Twice rather than once, and
//! in a row: a timeout counts only if its scan began after the last one
//! counted, so that scans cut short together in one busy moment count as
//! one, and refuse nothing; and within [`REFUSED_FOR`] of it, or it counts
//! as a first again.
//!
//! Only timeouts of content agents send (through `Scan` or `ScanFile`),
//! which the server hashes as it receives it (`ScanJob::digest`), count;
//! local scans do not. So an agent cannot have content refused for others
//! without sending that very content, and what is refused is a failure,
//! never a verdict. (A scan that ends as the signatures are replaced may
//! leave a mark under the old ones: it matches no key of the new ones, and
//! goes within [`REFUSED_FOR`].)

use std::{
    collections::HashMap,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use parking_lot::RwLock;

use crate::cache::CacheKey;

/// Timeouts in a row after which a content's copies are refused.
pub const TIMEOUTS_IN_A_ROW: u32 = 2;

/// How long after its last timeout a content's copies are refused.
pub const REFUSED_FOR: Duration = Duration::from_secs(10 * 60);

/// Contents remembered at most; a new one takes the place of one not
/// refused, or else of the one refused longest ago.
pub const MAX_TIMED_OUT: usize = 4096;

/// Contents whose scans timed out lately, by cache key.
pub(super) struct TimedOutContents {
    /// Until when, in milliseconds from `epoch`, a content remembered may
    /// count: [`REFUSED_FOR`] after the last timeout, 0 when none is. The
    /// look every scan makes, which takes no lock once that time is past.
    live_until: AtomicU64,
    epoch: Instant,
    contents: RwLock<HashMap<CacheKey, Mark>>,
}

/// A content's timeouts.
#[derive(Debug, Clone, Copy)]
struct Mark {
    in_a_row: u32,
    /// When the last timeout counted was noted.
    last: Instant,
}

impl Mark {
    /// How long the content is still refused at `now`, if it is.
    fn refused_for(&self, now: Instant) -> Option<Duration> {
        let left = REFUSED_FOR.checked_sub(now.saturating_duration_since(self.last))?;
        (self.in_a_row >= TIMEOUTS_IN_A_ROW && !left.is_zero()).then_some(left)
    }
}

impl Default for TimedOutContents {
    fn default() -> Self {
        TimedOutContents {
            live_until: AtomicU64::new(0),
            epoch: Instant::now(),
            contents: RwLock::default(),
        }
    }
}

impl TimedOutContents {
    /// Whether a content remembered may count at `now`; when none may, no
    /// key need be made to look one up.
    pub fn any(&self, now: Instant) -> bool {
        self.millis(now) < self.live_until.load(Ordering::Relaxed)
    }

    fn millis(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// How long content under `key` is still refused at `now`, if it is.
    pub fn refused_for(&self, key: &CacheKey, now: Instant) -> Option<Duration> {
        if !self.any(now) {
            return None;
        }
        self.contents.read().get(key)?.refused_for(now)
    }

    /// Notes, at `now`, a scan of content under `key` begun at `began` that
    /// timed out. Returns whether the content is refused from now on,
    /// which it was not before.
    pub fn note_timeout(&self, key: CacheKey, began: Instant, now: Instant) -> bool {
        let mut contents = self.contents.write();
        if contents.len() >= MAX_TIMED_OUT && !contents.contains_key(&key) {
            contents.retain(|_, mark| mark.last + REFUSED_FOR > now);
            if contents.len() >= MAX_TIMED_OUT {
                let first_to_go = contents
                    .iter()
                    .min_by_key(|(_, mark)| (mark.refused_for(now).is_some(), mark.last));
                if let Some((&key, _)) = first_to_go {
                    contents.remove(&key);
                }
            }
        }
        let mark = contents.entry(key).or_insert(Mark {
            in_a_row: 0,
            last: now,
        });
        if mark.in_a_row > 0 && began < mark.last {
            // Begun before the last timeout counted: cut short with it.
            return false;
        }
        let was_refused = mark.refused_for(now).is_some();
        if mark.last + REFUSED_FOR <= now {
            // Its last timeout is too long ago to count.
            mark.in_a_row = 0;
        }
        mark.in_a_row += 1;
        mark.last = now;
        let until = self.millis(now + REFUSED_FOR);
        self.live_until.fetch_max(until, Ordering::Relaxed);
        !was_refused && mark.refused_for(now).is_some()
    }

    /// Notes, at `now`, a scan of content under `key` that ended in time:
    /// the content is forgotten.
    pub fn note_in_time(&self, key: &CacheKey, now: Instant) {
        if !self.any(now) || !self.contents.read().contains_key(key) {
            return;
        }
        let mut contents = self.contents.write();
        contents.remove(key);
        if contents.is_empty() {
            self.live_until.store(0, Ordering::Relaxed);
        }
    }

    /// Forgets every content: the signatures changed.
    pub fn clear(&self) {
        let mut contents = self.contents.write();
        contents.clear();
        self.live_until.store(0, Ordering::Relaxed);
    }

    /// Contents refused at `now`.
    pub fn refused(&self, now: Instant) -> usize {
        if !self.any(now) {
            return 0;
        }
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
        Ruleset::of_source("rule r { condition: false }")
    }

    #[test]
    fn content_is_refused_after_two_timeouts_in_a_row() {
        let ruleset = ruleset();
        let timed_out = TimedOutContents::default();
        let (slow, other) = (key(&ruleset, 1), key(&ruleset, 2));
        let t0 = Instant::now();
        let at = |secs| t0 + Duration::from_secs(secs);
        assert!(!timed_out.any(t0) && timed_out.refused_for(&slow, t0).is_none());
        assert!(
            !timed_out.note_timeout(slow, t0, at(10)),
            "one timeout refuses nothing"
        );
        assert!(timed_out.refused_for(&slow, at(10)).is_none());
        // A scan begun before the first timeout was noted, cut short in
        // the same busy moment, does not count.
        assert!(!timed_out.note_timeout(slow, at(1), at(11)));
        assert!(timed_out.refused_for(&slow, at(11)).is_none());
        assert!(
            timed_out.note_timeout(slow, at(10), at(20)),
            "the second does"
        );
        assert_eq!(
            timed_out.refused_for(&slow, at(30)),
            Some(REFUSED_FOR - Duration::from_secs(10))
        );
        assert!(
            !timed_out.note_timeout(slow, at(20), at(30)),
            "refused already: not news"
        );
        assert!(timed_out.refused_for(&other, at(30)).is_none());
        assert_eq!(timed_out.refused(at(30)), 1);
        // A scan that ends in time forgets it.
        timed_out.note_in_time(&slow, at(31));
        assert!(timed_out.refused_for(&slow, at(31)).is_none() && !timed_out.any(at(31)));
        // As does a signatures change.
        timed_out.note_timeout(other, at(31), at(40));
        timed_out.note_timeout(other, at(40), at(50));
        assert_eq!(timed_out.refused(at(50)), 1);
        timed_out.clear();
        assert!(timed_out.refused_for(&other, at(50)).is_none() && timed_out.refused(at(50)) == 0);
    }

    #[test]
    fn timeouts_count_for_a_while_and_in_a_bounded_number() {
        let ruleset = ruleset();
        let timed_out = TimedOutContents::default();
        let slow = key(&ruleset, 1);
        let now = Instant::now();
        timed_out.note_timeout(slow, now, now);
        timed_out.note_timeout(slow, now, now);
        assert!(timed_out.refused_for(&slow, now).is_some());
        let later = now + REFUSED_FOR;
        assert!(!timed_out.any(later), "nothing counts any more");
        assert!(timed_out.refused_for(&slow, later).is_none());
        assert!(
            !timed_out.note_timeout(slow, later, later),
            "a timeout after that is a first"
        );
        assert!(timed_out.any(later) && timed_out.refused_for(&slow, later).is_none());
        // Full: one refused (`slow`, twice timed out) and others that
        // timed out once; the first of those goes for a new one.
        let then = later + Duration::from_secs(1);
        timed_out.note_timeout(slow, later, then);
        for n in 2..=MAX_TIMED_OUT as u32 {
            timed_out.note_timeout(key(&ruleset, n), then, then);
        }
        let newest = key(&ruleset, MAX_TIMED_OUT as u32 + 1);
        timed_out.note_timeout(newest, then, then);
        let contents = timed_out.contents.read();
        assert_eq!(contents.len(), MAX_TIMED_OUT);
        assert!(contents.contains_key(&newest));
        assert!(contents.contains_key(&slow), "the one refused stays");
    }
}
