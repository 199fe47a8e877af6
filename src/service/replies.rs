//! A `Scan` stream's replies on their way to the agent, bounded in bytes as
//! well as in messages.
//!
//! A reply can be far larger than the request it answers: a hash-first
//! begin of some 60 bytes gets a verdict with every detection of its
//! content, and a begin of a few bytes naming no session an error of a
//! hundred. Counted in messages alone, the replies an agent leaves unread
//! (each message up to a thousand of them) could make a stream hold
//! gigabytes from a megabyte of requests. So each reply message takes its
//! weight (its encoded size, plus the memory its replies take as structs)
//! from the stream's [`REPLY_BYTES`] before it is queued, and gives it back
//! as tonic takes it to encode: the stream then waits, as it does for a
//! place among [`REPLY_MESSAGES`], and its agent's requests wait in HTTP/2
//! flow control. A message heavier than the whole allowance takes all of
//! it, and goes alone.
//!
//! The thousands of streams an SVM serves could still hold gigabytes of
//! replies together, their agents reading none: so beyond the first
//! [`REPLY_FREE`] of a stream's replies, a message also takes its weight
//! from the agent listener's budget for messages (`uploads.message_budget`,
//! see [`crate::intake`]) if there is room there; if not, the stream waits
//! until its agent has taken all but the first part of its replies (never
//! for room that other streams hold: each stream also holds room for its
//! requests, and waiting on one another they could wait for ever). A
//! stream the server gives up on, its agent having taken none of its
//! waiting replies for the idle timeout (while the stream goes on, or after
//! its end), drops them ([`Replies::abandon`]): HTTP/2 would otherwise keep
//! them, and their room, for as long as the agent keeps the stream open
//! without reading. Should the agent read again, the stream ends with
//! `DEADLINE_EXCEEDED`: ended without a status, it would look complete.

use std::{
    pin::Pin,
    sync::{
        Arc, Weak,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use parking_lot::Mutex;
use prost::Message;
use tokio::sync::{
    OwnedSemaphorePermit, Semaphore, TryAcquireError,
    mpsc::{self, error::TrySendError},
};
use tokio::time::{Duration, Instant};
use tokio_stream::Stream;
use tonic::Status;

use crate::{
    intake::{HeldRoom, SharedRoom},
    proto::{FileReply, ScanReply},
};

/// Reply messages queued per stream before the server waits for the agent
/// to read them.
pub const REPLY_MESSAGES: usize = 256;

/// The weight of the replies queued per stream before the server waits for
/// the agent to read them (a message heavier than this goes alone, once
/// the queue is empty); beyond its first [`REPLY_FREE`], within the
/// listener's budget. A
/// thousand hash-first verdicts weigh some 150 KiB: a stream that answers
/// a burst of them should not wait for its agent to read the first
/// (each wait sets a timer).
pub const REPLY_BYTES: usize = 4 << 20;

/// The weight of a stream's replies that takes no room in the listener's
/// budget, as request messages up to [`crate::intake::FREE`] take none.
pub const REPLY_FREE: usize = 64 << 10;

/// The weight of replies one message carries at most: a thousand verdicts
/// with many detections each must not make a message over what the agent
/// decodes (16 MiB, as the server), nor weigh much of what a stream may
/// queue.
pub const MESSAGE_BYTES: usize = 256 << 10;

/// What one reply weighs: a message weighs its replies' sum against
/// [`REPLY_BYTES`] and [`MESSAGE_BYTES`].
pub fn weight(reply: &FileReply) -> usize {
    reply.encoded_len() + std::mem::size_of::<FileReply>()
}

/// A reply message, or the status that ends the stream, with the weight
/// it holds until tonic takes it.
struct Queued {
    reply: Result<ScanReply, Status>,
    _weight: Weight,
}

/// A message's weight, taken from its stream's allowance and, beyond
/// [`REPLY_FREE`], from the listener's budget.
struct Weight {
    _own: OwnedSemaphorePermit,
    _shared: Option<HeldRoom>,
}

/// The sending side, cloned for each verdict on its way.
#[derive(Clone)]
pub struct Replies {
    queue: mpsc::Sender<Queued>,
    allowance: Arc<Semaphore>,
    shared: SharedRoom,
    /// The receiving side's queue, for [`Replies::abandon`]: not kept
    /// alive by it (the queue closes when tonic drops the stream).
    received: Weak<Received>,
    /// Messages taken by tonic so far.
    taken: Arc<AtomicU64>,
}

/// The receiving side, which tonic takes the replies from.
pub struct ReplyStream {
    queue: Arc<Received>,
    taken: Arc<AtomicU64>,
}

/// The replies queued, until they are taken, or dropped with the stream.
type Received = Mutex<Queue>;

/// A stream's reply queue, or why it was given up on.
enum Queue {
    Open(mpsc::Receiver<Queued>),
    /// Abandoned (see [`Replies::abandon`]): the stream ends with this
    /// status, then nothing.
    Abandoned(Option<Status>),
}

/// A place for one message of a known weight, taken in the queue and the
/// allowance both.
pub struct Slot<'a> {
    place: mpsc::Permit<'a, Queued>,
    weight: Weight,
}

/// Why no slot was taken.
#[derive(Debug, PartialEq, Eq)]
pub enum NoSlot {
    /// The agent is gone.
    Closed,
    /// No room now (the agent has not read its replies).
    Full,
}

/// A stream's reply queue, whose replies beyond [`REPLY_FREE`] take room
/// in `shared` too.
pub fn queue(shared: SharedRoom) -> (Replies, ReplyStream) {
    let (queue, received) = mpsc::channel(REPLY_MESSAGES);
    let received = Arc::new(Mutex::new(Queue::Open(received)));
    let taken = Arc::default();
    let replies = Replies {
        queue,
        allowance: Arc::new(Semaphore::new(REPLY_BYTES)),
        shared,
        received: Arc::downgrade(&received),
        taken: Arc::clone(&taken),
    };
    let stream = ReplyStream {
        queue: received,
        taken,
    };
    (replies, stream)
}

impl Replies {
    /// A slot for a message of `weight`, if there is room now.
    pub fn try_reserve(&self, weight: usize) -> Result<Slot<'_>, NoSlot> {
        let own = match Arc::clone(&self.allowance).try_acquire_many_owned(permits(weight)) {
            Ok(own) => own,
            Err(TryAcquireError::NoPermits) => return Err(NoSlot::Full),
            Err(TryAcquireError::Closed) => unreachable!("the allowance is never closed"),
        };
        let shared = self.shared_room(weight).ok_or(NoSlot::Full)?;
        let weight = Weight {
            _own: own,
            _shared: shared,
        };
        match self.queue.try_reserve() {
            Ok(place) => Ok(Slot { place, weight }),
            Err(TrySendError::Full(())) => Err(NoSlot::Full),
            Err(TrySendError::Closed(())) => Err(NoSlot::Closed),
        }
    }

    /// [`Self::reserve`], given up on (`Err`) once the agent has taken
    /// none of the stream's replies for `idle`.
    pub async fn reserve_within(
        &self,
        weight: usize,
        idle: Duration,
    ) -> Result<Option<Slot<'_>>, Unread> {
        let reserve = self.reserve(weight);
        tokio::pin!(reserve);
        let mut reading = Reading::new(&self.taken);
        loop {
            tokio::select! {
                slot = &mut reserve => return Ok(slot),
                () = tokio::time::sleep(look(idle)) => {
                    if reading.stalled(true, idle) {
                        return Err(Unread);
                    }
                }
            }
        }
    }

    /// A slot for a message of `weight`, once there is room; `None` when
    /// the agent is gone.
    pub async fn reserve(&self, weight: usize) -> Option<Slot<'_>> {
        let room = async {
            let own = self.own_room(weight, 0).await?;
            match self.shared_room(weight) {
                Some(shared) => Some((own, shared)),
                None => {
                    drop(own);
                    Some((self.own_room(weight, FREE_WAIT).await?, None))
                }
            }
        };
        let (own, shared) = tokio::select! {
            room = room => room?,
            () = self.queue.closed() => return None,
        };
        let weight = Weight {
            _own: own,
            _shared: shared,
        };
        let place = self.queue.reserve().await.ok()?;
        Some(Slot { place, weight })
    }

    /// Room in the stream's allowance for a message of `weight`, taken
    /// once `more` is free besides (all of it at most). With [`FREE_WAIT`]
    /// more, that is once the replies queued weigh no more than
    /// [`REPLY_FREE`] less the message.
    async fn own_room(&self, weight: usize, more: usize) -> Option<OwnedSemaphorePermit> {
        let wanted = permits(weight.saturating_add(more));
        let allowance = Arc::clone(&self.allowance);
        let mut taken = allowance.acquire_many_owned(wanted).await.ok()?;
        // The rest goes back with `taken`.
        taken.split(permits(weight) as usize)
    }

    /// The room in the budget a message of `weight` takes, once its own
    /// room is taken (it counts among the replies queued): none while the
    /// replies queued weigh no more than [`REPLY_FREE`]; `None` when it
    /// needs room and the budget has none now.
    fn shared_room(&self, weight: usize) -> Option<Option<HeldRoom>> {
        if REPLY_BYTES - self.allowance.available_permits() <= REPLY_FREE {
            return Some(None);
        }
        self.shared.try_take(weight).map(Some)
    }

    /// Drops the replies queued, and any to come: the agent, which has
    /// taken none for `idle`, is given up on. What tonic takes next is the
    /// end of the stream, with `DEADLINE_EXCEEDED`.
    pub fn abandon(&self, idle: Duration) {
        abandon(&self.received, idle);
    }

    /// What the replies leave behind once the stream's task is over (see
    /// [`LeftBehind::until_taken`]): no way to send more, so that the
    /// stream ends as soon as the last verdict under way is sent.
    pub fn left_behind(&self) -> LeftBehind {
        LeftBehind {
            allowance: Arc::clone(&self.allowance),
            taken: Arc::clone(&self.taken),
            received: Weak::clone(&self.received),
        }
    }
}

/// What a stream's replies leave behind once its task is over.
pub struct LeftBehind {
    allowance: Arc<Semaphore>,
    taken: Arc<AtomicU64>,
    received: Weak<Received>,
}

impl LeftBehind {
    /// Waits until the agent has taken every reply queued and `owing` says
    /// none is still to come (the verdicts of scans under way), or the
    /// agent is gone. Replies the agent takes none of for `idle` are
    /// dropped (see [`Replies::abandon`]).
    pub async fn until_taken(self, idle: Duration, owing: impl Fn() -> bool) {
        let mut reading = Reading::new(&self.taken);
        loop {
            // Owing first: a verdict's room is taken before its id is
            // given back, so a verdict queued meanwhile is seen queued.
            let owing = owing();
            let queued = self.allowance.available_permits() < REPLY_BYTES;
            if self.received.strong_count() == 0 || !(queued || owing) {
                return;
            }
            if reading.stalled(queued, idle) {
                return abandon(&self.received, idle);
            }
            tokio::time::sleep(look(idle)).await;
        }
    }
}

/// A stream whose agent took none of its replies for the idle timeout.
#[derive(Debug)]
pub struct Unread;

/// Whether an agent takes its stream's replies.
struct Reading<'a> {
    taken: &'a AtomicU64,
    /// Messages taken when last looked at.
    seen: u64,
    /// Since when none was taken while some waited.
    since: Instant,
}

impl<'a> Reading<'a> {
    fn new(taken: &'a AtomicU64) -> Self {
        Reading {
            taken,
            seen: taken.load(Ordering::Relaxed),
            since: Instant::now(),
        }
    }

    /// Whether replies have waited (`waiting` now) for `idle` with none
    /// taken.
    fn stalled(&mut self, waiting: bool, idle: Duration) -> bool {
        let taken = self.taken.load(Ordering::Relaxed);
        if taken != self.seen || !waiting {
            (self.seen, self.since) = (taken, Instant::now());
            return false;
        }
        self.since.elapsed() >= idle
    }
}

/// How often a wait for the agent looks whether it took replies.
fn look(idle: Duration) -> Duration {
    idle.min(Duration::from_secs(1))
}

/// Drops the replies queued in `received`, if the stream is still there,
/// and leaves why, its agent having taken none for `idle`.
fn abandon(received: &Weak<Received>, idle: Duration) {
    if let Some(received) = received.upgrade() {
        let message = format!(
            "the agent took none of its replies for {idle:?}; the stream is closed, open a new one"
        );
        let abandoned = Queue::Abandoned(Some(Status::deadline_exceeded(message)));
        drop(std::mem::replace(&mut *received.lock(), abandoned));
    }
}

/// What [`Replies::own_room`] is asked for on top of a message, for it to
/// wait until the replies queued weigh no more than [`REPLY_FREE`] less the
/// message.
const FREE_WAIT: usize = REPLY_BYTES - REPLY_FREE;

impl Slot<'_> {
    /// Queues `reply` in this slot.
    pub fn send(self, reply: Result<ScanReply, Status>) {
        self.place.send(Queued {
            reply,
            _weight: self.weight,
        });
    }
}

/// A weight in permits: all of the allowance at most.
fn permits(weight: usize) -> u32 {
    weight.min(REPLY_BYTES) as u32
}

impl Stream for ReplyStream {
    type Item = Result<ScanReply, Status>;

    /// The next reply; its weight goes back to the stream as tonic takes it.
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut queue = self.queue.lock();
        let queue = match &mut *queue {
            Queue::Open(queue) => queue,
            Queue::Abandoned(why) => return Poll::Ready(why.take().map(Err)),
        };
        let next = queue.poll_recv(cx);
        if let Poll::Ready(Some(_)) = next {
            self.taken.fetch_add(1, Ordering::Relaxed);
        }
        next.map(|queued| queued.map(|queued| queued.reply))
    }
}

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt;

    use super::*;

    fn message(weight: usize) -> Result<ScanReply, Status> {
        Ok(ScanReply {
            replies: Vec::new(),
            signatures_version: "x".repeat(weight),
        })
    }

    fn shared_room(bytes: u64) -> (crate::intake::IntakeLayer, SharedRoom) {
        let layer = crate::intake::IntakeLayer::new(bytes);
        let room = layer.shared_room(None);
        (layer, room)
    }

    #[tokio::test]
    async fn replies_wait_for_their_weight_to_be_taken() {
        let (_layer, room) = shared_room(1 << 30);
        let (replies, mut stream) = queue(room);
        let half = REPLY_BYTES / 2;
        replies.try_reserve(half).unwrap().send(message(1));
        replies.try_reserve(half).unwrap().send(message(2));
        assert_eq!(replies.try_reserve(1).err(), Some(NoSlot::Full));
        // One taken, its weight is back.
        let first = stream.next().await.unwrap().unwrap();
        assert_eq!(first.signatures_version.len(), 1);
        replies.try_reserve(half).unwrap().send(message(3));
        // Heavier than the whole allowance: it waits for all of it.
        let heavy = tokio::spawn(async move {
            replies
                .reserve(4 * REPLY_BYTES)
                .await
                .unwrap()
                .send(message(4));
            replies
        });
        for expected in [2, 3, 4] {
            let next = stream.next().await.unwrap().unwrap();
            assert_eq!(next.signatures_version.len(), expected);
        }
        let replies = heavy.await.unwrap();
        drop(stream);
        assert_eq!(replies.try_reserve(1).err(), Some(NoSlot::Closed));
        assert!(replies.reserve(1).await.is_none());
    }

    /// Beyond the first `REPLY_FREE` of a stream's replies, each message
    /// takes its weight from the listener's budget too, if it has room;
    /// taken by tonic, it gives it back. Without room there, a message
    /// waits for its agent to take the stream's replies down to the first
    /// part, not for the room others hold.
    #[tokio::test]
    async fn replies_beyond_their_free_part_take_room_in_the_budget() {
        let (layer, room) = shared_room(1 << 20);
        let (replies, mut stream) = queue(room.clone());
        replies.try_reserve(REPLY_FREE).unwrap().send(message(1));
        assert_eq!(layer.held(), 0, "the first part takes none");
        replies.try_reserve(512 << 10).unwrap().send(message(2));
        assert_eq!(layer.held(), 512 << 10);
        // Others hold the rest of the budget: the stream has room of its
        // own, and waits for its agent.
        let others = room.try_take(512 << 10).unwrap();
        assert_eq!(replies.try_reserve(1).err(), Some(NoSlot::Full));
        let waiting = tokio::spawn(async move {
            replies.reserve(1).await.unwrap().send(message(3));
            replies
        });
        tokio::task::yield_now().await;
        drop(others);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        for expected in [1, 2] {
            let next = stream.next().await.unwrap().unwrap();
            assert_eq!(next.signatures_version.len(), expected);
        }
        let _replies = waiting.await.unwrap();
        assert_eq!(layer.held(), 0, "within the first part again");
        assert_eq!(
            stream
                .next()
                .await
                .unwrap()
                .unwrap()
                .signatures_version
                .len(),
            3
        );
    }

    /// A wait for room goes on while the agent takes replies, however long
    /// it takes; it is given up on once the agent has taken none for the
    /// idle time.
    #[tokio::test(start_paused = true)]
    async fn a_wait_for_room_lasts_while_the_agent_takes_replies() {
        let idle = Duration::from_secs(10);
        let (_layer, room) = shared_room(32 << 20);
        let _full = room.try_take(32 << 20).unwrap();
        let (replies, mut stream) = queue(room);
        for i in 0..4 {
            replies.try_reserve(16 << 10).unwrap().send(message(i));
        }
        let replies = Arc::new(replies);
        let wait = |replies: &Arc<Replies>| {
            let replies = Arc::clone(replies);
            tokio::spawn(async move {
                let reserved = replies.reserve_within(48 << 10, idle).await;
                reserved.map(|slot| slot.map(|slot| slot.send(message(9))).is_some())
            })
        };
        // Three replies to take, one every 8 s.
        let waiting = wait(&replies);
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(8)).await;
            assert!(!waiting.is_finished());
            stream.next().await.unwrap().unwrap();
        }
        assert!(matches!(waiting.await.unwrap(), Ok(true)));
        // None taken: given up on.
        let waiting = wait(&replies);
        tokio::time::sleep(idle * 2).await;
        assert!(matches!(waiting.await.unwrap(), Err(Unread)));
    }

    /// Once its task is over, a stream waits for the verdicts still to
    /// come however long their scans take, and for its agent to take the
    /// replies, dropping them only once the agent has taken none for the
    /// idle time.
    #[tokio::test(start_paused = true)]
    async fn replies_left_behind_wait_for_verdicts_and_for_their_agent() {
        let idle = Duration::from_secs(10);
        let (_layer, room) = shared_room(1 << 30);
        let (replies, mut stream) = queue(room);
        let owing = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let still_owing = Arc::clone(&owing);
        let left = replies.left_behind();
        let waiting = tokio::spawn(async move {
            left.until_taken(idle, || still_owing.load(Ordering::Relaxed))
                .await
        });
        tokio::time::sleep(idle * 3).await;
        assert!(!waiting.is_finished());
        // The verdict comes, and waits to be taken.
        replies.try_reserve(1).unwrap().send(message(1));
        owing.store(false, Ordering::Relaxed);
        tokio::time::sleep(idle / 2).await;
        assert!(!waiting.is_finished());
        // Taken: the wait is over.
        stream.next().await.unwrap().unwrap();
        drop(replies);
        waiting.await.unwrap();
        assert!(stream.next().await.is_none());

        // Replies none of which is taken are dropped after the idle time,
        // with their room.
        let (layer, room) = shared_room(1 << 30);
        let (replies, mut stream) = queue(room);
        for _ in 0..4 {
            replies.try_reserve(REPLY_FREE).unwrap().send(message(1));
        }
        let waiting = tokio::spawn(replies.left_behind().until_taken(idle, || false));
        drop(replies);
        tokio::time::sleep(idle / 2).await;
        assert!(!waiting.is_finished());
        assert_eq!(layer.held(), 3 * REPLY_FREE as u64);
        waiting.await.unwrap();
        assert_eq!(layer.held(), 0);
        let why = stream.next().await.expect("a status").unwrap_err();
        assert_eq!(why.code(), tonic::Code::DeadlineExceeded);
        assert!(stream.next().await.is_none());

        // An agent gone: nothing to wait for.
        let (replies, stream) = queue(shared_room(1 << 30).1);
        replies.try_reserve(1).unwrap().send(message(1));
        let waiting = tokio::spawn(replies.left_behind().until_taken(idle, || true));
        drop(stream);
        tokio::time::sleep(look(idle) * 2).await;
        assert!(waiting.is_finished());
    }

    /// A stream given up on lets go of its replies at once, though tonic
    /// has not taken them (HTTP/2 would not, its agent reading nothing).
    #[tokio::test]
    async fn an_abandoned_stream_drops_its_replies() {
        let (layer, room) = shared_room(1 << 30);
        let (replies, mut stream) = queue(room);
        for _ in 0..4 {
            replies.try_reserve(REPLY_FREE).unwrap().send(message(1));
        }
        assert_eq!(layer.held(), 3 * REPLY_FREE as u64);
        replies.abandon(Duration::from_secs(3));
        assert_eq!(layer.held(), 0);
        assert_eq!(replies.try_reserve(1).err(), Some(NoSlot::Closed));
        let why = stream.next().await.expect("a status").unwrap_err();
        assert_eq!(why.code(), tonic::Code::DeadlineExceeded);
        assert!(
            why.message().contains("none of its replies for 3s"),
            "{why}"
        );
        assert!(stream.next().await.is_none());
    }
}
