//! Coalescing ("single flight"): one upload and one scan per content, however
//! many agents ask for it at once.
//!
//! The first request for a digest that is not cached takes the lead
//! ([`Join::Lead`]): it gets the content (asks its agent, or already holds
//! it) and scans it. Requests for the same digest meanwhile wait
//! ([`Join::Wait`]) and are handed the lead's verdict when it
//! [lands](Flight::land). A lead that fails (its scan failed, its upload was
//! cancelled or cut short) lands nothing: its waiters are told so, and
//! each then gets its own content scanned. A failure is never handed to a
//! request that did not earn it. (But content the engine refuses fails
//! unscanned, waiter or not: content that stuck a scan thread, or whose
//! scans timed out twice in a row lately, see `engine::timeouts`.)
//!
//! A request waits in one of two ways: with a [`Waiter`] (a future, for
//! requests that are handled in a task of their own), or subscribed
//! ([`Flights::join_or_subscribe`]), told by a [`Notice`] left in its
//! stream's [`Landings`] when the flight lands (a Scan stream's waiting
//! files: no task or timer per file). Waiting is bounded by
//! [`UPLOAD_WAIT`] (the subscriber's stream keeps the deadline), so an
//! agent that announces content and never sends it delays others, but
//! never decides their verdicts.
//!
//! The registry is one mutex-guarded map, touched only on cache misses
//! (once per upload or scan), never on the hit path. A stream's landings
//! are locked while the registry is, never the other way round.

use std::{
    collections::{HashMap, hash_map::Entry},
    sync::{
        Arc, Weak,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use parking_lot::Mutex;
use tokio::{
    sync::{Notify, watch},
    time::Instant,
};

use super::{CacheKey, CachedVerdict};

/// How long a request waits for another's upload and scan of the same
/// content before it has its own content scanned.
pub const UPLOAD_WAIT: Duration = Duration::from_secs(10);

/// The least content (or all that is left of it) a request leading the
/// scan of its content must send every [`UPLOAD_WAIT`] to keep the lead:
/// about 100 KiB/s. One that sends less, a byte now and then, would hold
/// every other request for the same content waiting for ever; it keeps
/// uploading, and the others go on without it.
pub const LEAD_PROGRESS: u64 = 1 << 20;

/// What a flight lands: the verdict, or `None` for a failure.
pub type Landing = Option<Arc<CachedVerdict>>;

/// The flights under way, by cache key. Hashed with foldhash, seeded at
/// random for each process: quicker than the standard SipHash on these
/// keys. An agent can claim digests of its choosing, but only as many as
/// its VM's files in flight at a time (see `Sessions`).
type Registry = HashMap<CacheKey, UnderWay, foldhash::fast::RandomState>;

/// Uploads and scans under way, by cache key.
#[derive(Default)]
pub struct Flights {
    under_way: Arc<Mutex<Registry>>,
    waits: Arc<AtomicU64>,
    /// Flights led so far: the next one's id.
    led: AtomicU64,
}

/// One flight in the registry.
struct UnderWay {
    id: FlightId,
    landing: watch::Receiver<Landing>,
    subscribers: Vec<Subscriber>,
}

/// A flight's own number: flights for the same key, one after the other,
/// have different ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlightId(u64);

/// A request told of the landing by a [`Notice`] left in `to`. Holds its
/// stream's landings weakly: a stream that ended is not kept alive by the
/// flights it waited for.
struct Subscriber {
    /// The subscriber's name for the request (a Scan stream uses the file
    /// id).
    tag: u64,
    to: Weak<Landings>,
}

impl Subscriber {
    /// Its stream's landings, unless the stream has ended or is ending
    /// (see [`Landings::close`]): such a subscriber waits for nothing.
    fn open(&self) -> Option<Arc<Landings>> {
        self.to
            .upgrade()
            .filter(|to| !to.closed.load(Ordering::Relaxed))
    }
}

/// The notices of one Scan stream's landed flights, waiting for the stream
/// to take them.
///
/// In a boot storm a flight lands every fraction of a millisecond, each
/// with a notice for nearly every stream. A channel would wake every stream
/// for every landing, to hold one more verdict: the stream's task polled
/// for nothing but bookkeeping, tens of thousands of times a second. Here
/// notices pile up instead, and the stream is woken only when they need it:
/// when the first comes in (to set a time to take them), when one tells of
/// a failure (its file must ask for its own content at once), when
/// `enough` of them are in, and when the last of the stream's waits lands
/// or is withdrawn (no other notice is coming to go with them, and its
/// agent may be held back by its files in flight until they go). Each
/// notice is for one subscription, made for a waiting file, and the stream
/// takes them all before it handles a request message: they never
/// outnumber the files waiting since then and the begins of one message.
pub struct Landings {
    pile: Mutex<Pile>,
    woken: Notify,
    enough: usize,
    /// The stream is ending: it takes no more notices.
    closed: AtomicBool,
}

#[derive(Default)]
struct Pile {
    notices: Vec<Notice>,
    failed: bool,
    /// Subscriptions whose flight has not landed yet.
    waiting: usize,
}

impl Pile {
    fn pending(&self, enough: usize) -> Pending {
        let n = self.notices.len();
        match () {
            _ if n == 0 => Pending::Nothing,
            _ if self.failed || n >= enough || self.waiting == 0 => Pending::Due,
            _ => Pending::Hold,
        }
    }
}

/// What a stream's landings call for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pending {
    /// No notice is in.
    Nothing,
    /// Notices are in, and can wait for more to go with them.
    Hold,
    /// Notices are in that should be taken now: one tells of a failure, or
    /// `enough` are in, or the stream waits for no other.
    Due,
}

/// How a flight landed, as told to a subscriber. It names the flight: a
/// tag may be used again once its request is over, and a notice still
/// queued for the old request must not be taken for the new one's.
pub struct Notice {
    pub tag: u64,
    pub flight: FlightId,
    pub landing: Landing,
}

impl Landings {
    /// Landings for a stream that is woken when `enough` notices are in.
    pub fn new(enough: usize) -> Arc<Self> {
        Arc::new(Landings {
            pile: Mutex::default(),
            woken: Notify::new(),
            enough,
            closed: AtomicBool::new(false),
        })
    }

    /// The stream is ending (its last replies may take a while to go): its
    /// subscriptions wait for nothing from now on, and are neither told
    /// nor counted as waits, as those of a stream that ended.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
    }

    /// Waits until the stream may be wanted: a notice came into an empty
    /// pile, or the notices became [due](Pending::Due). A wake-up that
    /// comes while the stream is busy is kept for its next wait, so the
    /// stream may find that it took the notices meanwhile: it looks at
    /// [`Self::pending`].
    pub async fn woken(&self) {
        self.woken.notified().await
    }

    /// What the notices in call for now.
    pub fn pending(&self) -> Pending {
        self.pile.lock().pending(self.enough)
    }

    /// Takes every notice in, oldest first, into `into` (emptied first; a
    /// stream keeps one for its life, so taking them allocates nothing).
    pub fn take(&self, into: &mut Vec<Notice>) {
        into.clear();
        let mut pile = self.pile.lock();
        std::mem::swap(&mut pile.notices, into);
        pile.failed = false;
    }

    /// A subscription was made (under the registry's lock).
    fn subscribed(&self) {
        self.pile.lock().waiting += 1;
    }

    /// `n` subscriptions were withdrawn before their flight landed.
    fn withdrawn(&self, n: usize) {
        self.change(|pile| pile.waiting -= n);
    }

    /// A subscription's flight landed.
    fn leave(&self, notice: Notice) {
        self.change(|pile| {
            pile.failed |= notice.landing.is_none();
            pile.waiting -= 1;
            pile.notices.push(notice);
        });
    }

    /// Changes the pile, and wakes the stream if that brought in its
    /// first notice or made the notices due.
    fn change(&self, change: impl FnOnce(&mut Pile)) {
        let mut pile = self.pile.lock();
        let before = pile.pending(self.enough);
        change(&mut pile);
        let after = pile.pending(self.enough);
        drop(pile);
        if after != before && after != Pending::Nothing {
            self.woken.notify_one();
        }
    }
}

/// The outcome of [`Flights::join_or_subscribe`].
pub enum Subscription {
    /// Nobody is on it: the caller leads, and must land its flight.
    Lead(Flight),
    /// Subscribed to this flight, under way.
    Waits(FlightId),
}

/// The outcome of [`Flights::join`].
pub enum Join {
    /// Nobody is on it: the caller leads, and must land its flight.
    Lead(Flight),
    /// Another request is on it: wait for its verdict.
    Wait(Waiter),
}

impl Flights {
    /// Leads the flight for `key`, or joins the one under way.
    pub fn join(&self, key: CacheKey) -> Join {
        let mut under_way = self.under_way.lock();
        match under_way.get(&key) {
            Some(flight) => Join::Wait(self.waiter(flight.landing.clone())),
            None => Join::Lead(self.lead(&mut under_way, key)),
        }
    }

    /// Leads the flight for `key`, or subscribes to the one under way.
    /// Subscribers whose stream has ended, or is ending, are dropped when
    /// the list is full, before it grows: looking them over at every
    /// subscription would cost a storm's flights time quadratic in their
    /// subscribers.
    pub fn join_or_subscribe(&self, key: CacheKey, to: &Arc<Landings>, tag: u64) -> Subscription {
        let mut under_way = self.under_way.lock();
        match under_way.get_mut(&key) {
            Some(flight) => {
                let subscribers = &mut flight.subscribers;
                if subscribers.len() == subscribers.capacity() {
                    subscribers.retain(|s| s.open().is_some());
                }
                to.subscribed();
                let to = Arc::downgrade(to);
                subscribers.push(Subscriber { tag, to });
                Subscription::Waits(flight.id)
            }
            None => Subscription::Lead(self.lead(&mut under_way, key)),
        }
    }

    /// Withdraws a subscription to `flight` (its file was cancelled, or
    /// stopped waiting), so a long flight does not collect them.
    pub fn unsubscribe(&self, key: &CacheKey, flight: FlightId, tag: u64, to: &Arc<Landings>) {
        let mut under_way = self.under_way.lock();
        if let Some(entry) = under_way.get_mut(key).filter(|f| f.id == flight) {
            let subscribers = &mut entry.subscribers;
            let before = subscribers.len();
            let weak = Arc::downgrade(to);
            subscribers.retain(|s| s.tag != tag || !s.to.ptr_eq(&weak));
            to.withdrawn(before - subscribers.len());
        }
    }

    /// A wait on the flight for `key`, if one is under way (for requests
    /// that cannot lead: a Lookup has no content to offer).
    pub fn waiting(&self, key: &CacheKey) -> Option<Waiter> {
        let under_way = self.under_way.lock();
        let flight = under_way.get(key)?;
        Some(self.waiter(flight.landing.clone()))
    }

    fn lead(&self, under_way: &mut Registry, key: CacheKey) -> Flight {
        let (sender, landing) = watch::channel(None);
        let id = FlightId(self.led.fetch_add(1, Ordering::Relaxed));
        let entry = UnderWay {
            id,
            landing,
            subscribers: Vec::new(),
        };
        under_way.insert(key, entry);
        Flight {
            id,
            key,
            sender,
            under_way: Arc::clone(&self.under_way),
            waits: Arc::clone(&self.waits),
            ended: false,
        }
    }

    /// Requests handed another's verdict so far.
    pub fn waits(&self) -> u64 {
        self.waits.load(Ordering::Relaxed)
    }

    /// Flights under way.
    pub fn len(&self) -> usize {
        self.under_way.lock().len()
    }

    /// Whether no flight is under way.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn waiter(&self, landing: watch::Receiver<Landing>) -> Waiter {
        Waiter {
            landing,
            waits: Arc::clone(&self.waits),
        }
    }
}

/// The lead of an upload and scan. Dropping it without landing tells the
/// waiters it failed. While it lives, the registry's entry for its key is
/// its own (nobody else can lead that key).
pub struct Flight {
    id: FlightId,
    key: CacheKey,
    sender: watch::Sender<Landing>,
    under_way: Arc<Mutex<Registry>>,
    waits: Arc<AtomicU64>,
    ended: bool,
}

impl Flight {
    /// The key the flight is for.
    pub fn key(&self) -> &CacheKey {
        &self.key
    }

    /// Hands `verdict` (the scan's, now in the cache; `None` if the scan
    /// failed) to every waiter.
    pub fn land(mut self, verdict: Landing) {
        self.end(verdict);
    }

    /// Leaves the registry and tells every waiter how it ended. The entry
    /// is removed only if it is this flight's (it always is while the
    /// flight lives; checked, so that no slip elsewhere can end another).
    fn end(&mut self, verdict: Landing) {
        self.ended = true;
        let entry = match self.under_way.lock().entry(self.key) {
            Entry::Occupied(entry) if entry.get().id == self.id => Some(entry.remove()),
            _ => None,
        };
        let subscribers = entry.map(|entry| entry.subscribers).unwrap_or_default();
        let mut told = 0;
        for subscriber in subscribers {
            if let Some(landings) = subscriber.open() {
                landings.leave(Notice {
                    tag: subscriber.tag,
                    flight: self.id,
                    landing: verdict.clone(),
                });
                told += 1;
            }
        }
        // Subscribers whose stream ended waited for nothing.
        if verdict.is_some() {
            self.waits.fetch_add(told, Ordering::Relaxed);
        }
        self.sender.send_replace(verdict);
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        if !self.ended {
            self.end(None);
        }
    }
}

/// A wait for another request's verdict.
pub struct Waiter {
    landing: watch::Receiver<Landing>,
    waits: Arc<AtomicU64>,
}

impl Waiter {
    /// The lead's verdict; `None` when the lead failed, or did not land by
    /// `deadline`.
    pub async fn verdict(mut self, deadline: Instant) -> Landing {
        let landed = tokio::time::timeout_at(deadline, self.landing.wait_for(Option::is_some));
        let verdict = landed.await.ok()?.ok()?.clone();
        self.waits.fetch_add(1, Ordering::Relaxed);
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verdict::Verdict;

    fn key(n: u8) -> CacheKey {
        CacheKey {
            content: [n; 32],
            rules: 1,
        }
    }

    fn clean() -> Landing {
        Some(Arc::new(CachedVerdict {
            verdict: Verdict::Clean,
            rules_version: "v".into(),
        }))
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    #[tokio::test]
    async fn waiters_get_the_lead_verdict_and_the_flight_ends() {
        let flights = Flights::default();
        let Join::Lead(lead) = flights.join(key(1)) else {
            panic!("the first request leads")
        };
        let Join::Wait(first) = flights.join(key(1)) else {
            panic!("the second waits")
        };
        let second = flights.waiting(&key(1)).expect("under way");
        assert!(flights.waiting(&key(2)).is_none());
        lead.land(clean());
        assert!(first.verdict(soon()).await.is_some());
        assert!(second.verdict(soon()).await.is_some());
        assert_eq!(flights.waits(), 2);
        assert!(flights.is_empty());
        assert!(matches!(flights.join(key(1)), Join::Lead(_)));
    }

    #[tokio::test]
    async fn a_failed_or_abandoned_lead_hands_nothing_on() {
        let flights = Flights::default();
        let Join::Lead(lead) = flights.join(key(1)) else {
            panic!()
        };
        let Join::Wait(waiter) = flights.join(key(1)) else {
            panic!()
        };
        lead.land(None);
        assert!(waiter.verdict(soon()).await.is_none());

        let Join::Lead(lead) = flights.join(key(1)) else {
            panic!("a failed flight is over")
        };
        let Join::Wait(waiter) = flights.join(key(1)) else {
            panic!()
        };
        drop(lead);
        assert!(waiter.verdict(soon()).await.is_none());
        assert_eq!(flights.waits(), 0);
    }

    /// Whether the stream would be woken now (taking the wake-up).
    async fn woken(landings: &Landings) -> bool {
        tokio::time::timeout(Duration::ZERO, landings.woken())
            .await
            .is_ok()
    }

    fn lead(flights: &Flights, key: CacheKey) -> Flight {
        match flights.join(key) {
            Join::Lead(lead) => lead,
            Join::Wait(_) => panic!("the first request leads"),
        }
    }

    /// Flights for keys `0..n`, each waited for by a file of `landings`
    /// tagged with its key.
    fn waits(flights: &Flights, landings: &Arc<Landings>, n: u8) -> Vec<Flight> {
        (0..n)
            .map(|n| {
                let lead = lead(flights, key(n));
                let subscription = flights.join_or_subscribe(key(n), landings, n.into());
                assert!(matches!(subscription, Subscription::Waits(id) if id == lead.id));
                lead
            })
            .collect()
    }

    #[tokio::test]
    async fn subscribers_are_told_through_their_landings() {
        let flights = Flights::default();
        let landings = Landings::new(128);
        let subscribe = |tag| flights.join_or_subscribe(key(1), &landings, tag);
        let Subscription::Lead(lead) = subscribe(0) else {
            panic!("the first request leads")
        };
        for tag in 1..=2 {
            assert!(matches!(subscribe(tag), Subscription::Waits(id) if id == lead.id));
        }
        let first = lead.id;
        lead.land(clean());
        let mut notices = Vec::new();
        landings.take(&mut notices);
        let told: Vec<_> = notices.iter().map(|n| (n.tag, n.flight)).collect();
        assert_eq!(told, [(1, first), (2, first)]);
        assert!(notices.iter().all(|n| n.landing.is_some()));
        assert_eq!(flights.waits(), 2);

        let Subscription::Lead(lead) = subscribe(3) else {
            panic!("a landed flight is over")
        };
        assert_ne!(lead.id, first, "the next flight for the key is another");
        let Subscription::Waits(second) = subscribe(4) else {
            panic!()
        };
        flights.unsubscribe(&key(1), first, 4, &landings);
        drop(lead);
        landings.take(&mut notices);
        assert!(
            matches!(
                notices[..],
                [Notice {
                    tag: 4,
                    flight,
                    landing: None,
                }] if flight == second
            ),
            "an abandoned lead; unsubscribing from the flight before withdrew nothing"
        );
        assert!(flights.is_empty());
    }

    #[tokio::test]
    async fn the_stream_is_woken_for_the_first_notice_and_when_they_are_due() {
        let flights = Flights::default();
        let landings = Landings::new(3);
        let mut leads = waits(&flights, &landings, 5).into_iter();
        let mut land = || leads.next().expect("a flight").land(clean());
        land();
        assert!(woken(&landings).await, "the first notice");
        assert_eq!(landings.pending(), Pending::Hold);
        land();
        assert!(!woken(&landings).await, "a second, not due");
        assert_eq!(landings.pending(), Pending::Hold);
        land();
        assert!(woken(&landings).await, "enough");
        assert_eq!(landings.pending(), Pending::Due);
        landings.take(&mut Vec::new());
        assert_eq!(landings.pending(), Pending::Nothing);
        land();
        assert!(woken(&landings).await, "the first notice again");
        assert_eq!(landings.pending(), Pending::Hold, "one more is coming");
        land();
        assert!(woken(&landings).await, "the last wait landed");
        assert_eq!(landings.pending(), Pending::Due);
    }

    #[tokio::test]
    async fn a_failure_or_the_last_wait_withdrawn_makes_them_due() {
        let flights = Flights::default();
        let landings = Landings::new(128);
        let mut leads = waits(&flights, &landings, 4).into_iter();
        leads.next().unwrap().land(clean());
        assert!(woken(&landings).await);
        assert_eq!(landings.pending(), Pending::Hold);
        drop(leads.next());
        assert!(woken(&landings).await, "a failure");
        assert_eq!(landings.pending(), Pending::Due);
        landings.take(&mut Vec::new());

        let third = leads.next().unwrap();
        third.land(clean());
        assert!(woken(&landings).await);
        assert_eq!(landings.pending(), Pending::Hold);
        let last = leads.next().unwrap();
        flights.unsubscribe(&key(3), last.id, 3, &landings);
        assert!(woken(&landings).await, "the last wait withdrawn");
        assert_eq!(landings.pending(), Pending::Due);
        drop(last);
        let mut notices = Vec::new();
        landings.take(&mut notices);
        let tags: Vec<_> = notices.iter().map(|n| n.tag).collect();
        assert_eq!(tags, [2], "a withdrawn wait is not told");
    }

    #[tokio::test]
    async fn an_ended_stream_is_not_told_nor_counted_and_its_subscriptions_are_dropped() {
        let flights = Flights::default();
        let first = lead(&flights, key(1));
        let gone = Landings::new(128);
        for tag in 0..4 {
            flights.join_or_subscribe(key(1), &gone, tag);
        }
        drop(gone);
        let landings = Landings::new(128);
        flights.join_or_subscribe(key(1), &landings, 9);
        let subscribers = |n| flights.under_way.lock()[&key(n)].subscribers.len();
        assert_eq!(subscribers(1), 1, "the full list was pruned first");
        first.land(clean());
        let mut notices = Vec::new();
        landings.take(&mut notices);
        assert_eq!(notices.len(), 1);
        assert_eq!(landings.pending(), Pending::Nothing);

        // Not pruned (the list is not full): passed over as it lands, and
        // not counted as waits.
        let second = lead(&flights, key(2));
        let (gone, closed) = (Landings::new(128), Landings::new(128));
        flights.join_or_subscribe(key(2), &gone, 0);
        flights.join_or_subscribe(key(2), &closed, 0);
        flights.join_or_subscribe(key(2), &landings, 9);
        drop(gone);
        closed.close();
        assert_eq!(subscribers(2), 3);
        let before = flights.waits();
        second.land(clean());
        landings.take(&mut notices);
        assert_eq!(notices.len(), 1);
        let waits = flights.waits() - before;
        assert_eq!(waits, 1, "the ended streams' files waited for nothing");
        closed.take(&mut notices);
        assert!(notices.is_empty(), "a closed stream is not told");
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_is_bounded() {
        let flights = Flights::default();
        let Join::Lead(_lead) = flights.join(key(1)) else {
            panic!()
        };
        let Join::Wait(waiter) = flights.join(key(1)) else {
            panic!()
        };
        assert!(waiter.verdict(Instant::now() + UPLOAD_WAIT).await.is_none());
    }
}
