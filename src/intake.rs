//! The agent listener's intake: the memory that calls' request messages
//! may hold, together.
//!
//! tonic takes a request's bytes out of HTTP/2 as they arrive, handing the
//! flow-control credit back at once, into a buffer of the call that it
//! sizes for the whole message from the message's header; the buffer then
//! stays with the call, as large as its largest message so far. So flow
//! control bounds none of it: a client starting 16 MiB messages on the 64
//! calls a connection may have, and stalling or letting them sit, would
//! make the server hold a gigabyte per connection. Every request body of
//! the agent listener goes through an [`Intake`] instead, which follows the
//! gRPC framing and passes on one message at a time:
//!
//! * Each method has its largest message: 64 KiB on `Connect` and on the
//!   health and reflection services, [`MAX_MESSAGE_SIZE`] on `Scan` and
//!   `ScanFile`, [`MAX_LOOKUP_MESSAGE`] on `Lookup`. A larger one fails its
//!   call with `OUT_OF_RANGE` from its header, before anything is held for
//!   it. A `Lookup`'s request is one message: a second fails the call with
//!   `INVALID_ARGUMENT`.
//! * A message of up to [`FREE`] (64 KiB; a `Lookup`'s, see below) goes on
//!   as it comes: a call holds no more than that for such messages.
//! * What an HTTP/2 frame holds past the message passed on (the next
//!   messages a client packed into it, up to the largest frame, 1 MiB)
//!   waits with the call until tonic reads its next message, which a
//!   handler held up (a full scan queue) may not do for long. Up to
//!   [`FREE`] of it is held freely; more takes room from the budget for
//!   all of it, counted in the peer's share as a large message's is, until
//!   it is passed on (room it holds for the start of a large message
//!   becomes that message's). The message before it goes on only once that
//!   room is taken; a call that finds none within [`ROOM_WAIT`] fails.
//!   What is held without room, or while waiting for it, is copied out of
//!   HTTP/2's read buffer, which a view would keep whole. So a call holds
//!   at most twice [`FREE`] besides its room, and a connection its 64
//!   calls' worth. (What a frame holds past a message waiting for room,
//!   below, waits for room too; past a `Lookup`'s message, it fails the
//!   call at once.)
//! * A larger one goes on only once its call holds room for it, taken from
//!   one budget for the listener (`uploads.message_budget`), as a whole, at
//!   its header (whose last byte is held back until then, so that tonic
//!   sizes no buffer before, and then sizes it from an empty one): a
//!   message under way never waits for room, so it depends on its client
//!   alone. The room stays with the call until the call ends, as tonic's
//!   buffer does; a larger message later takes its size again, as the
//!   buffer may grow by that much (see `Intake::admit`). A `Lookup`'s
//!   answer is made from its request, and holds more: its message takes
//!   [`LOOKUP_WEIGHT`] times its size, and the room stays until the answer
//!   is sent, or dropped unread (see `Answer`). Room is handed out in
//!   turn (a FIFO semaphore, in KiB); a call that finds none within
//!   [`ROOM_WAIT`] fails with `RESOURCE_EXHAUSTED`. While it waits, its
//!   stream is held back by HTTP/2 flow control. The calls of one peer (an
//!   address) may hold at most a quarter of the budget
//!   ([`PEER_SHARE`]), or [`CALL_MOST`] if that is more; one more that needs room fails with
//!   `RESOURCE_EXHAUSTED` at once, so that one client cannot take all of
//!   it. (A client with many addresses still can: mutual TLS keeps out
//!   clients that are not agents.)
//! * A call holding room must not sit on it while others need it: when
//!   less than a largest message's room is free, a call whose client has
//!   kept the server waiting for [`STALL`] in all for the rest of a message
//!   (or, on `Lookup`, for the end of its request) fails with
//!   `DEADLINE_EXCEEDED`. The time counts from each read that finds the
//!   rest missing until more comes; a call's time on one message before it
//!   reads the next is not counted. With room to spare, such a call waits
//!   on.
//!
//! [`ROOM_WAIT`] is shorter than [`STALL`] for a reason: what a client sends
//! on a call that waits for room stays in HTTP/2, in the connection's
//! window, which the connection's other calls share, so a message under way
//! on one of them may find its bytes stuck behind. The waiting call gives
//! up first, and, its body dropped, HTTP/2 lets go of what it held.

use std::{
    collections::HashMap,
    future::Future,
    net::IpAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use parking_lot::Mutex;
use tokio::{
    sync::{AcquireError, OwnedSemaphorePermit, Semaphore},
    time::{Instant, Sleep, error::Elapsed},
};
use tonic::{Status, body::Body};

use crate::connections::Ends;
use crate::proto::{codec::MAX_AGENT_MESSAGE, protection_server_server::SERVICE_NAME};

/// The largest gRPC message the agent listener accepts (a batch of a Scan
/// stream's requests; a Lookup's is smaller, see [`MAX_LOOKUP_MESSAGE`]).
pub const MAX_MESSAGE_SIZE: usize = 16 << 20;

/// Messages whose room would be up to this take none.
pub const FREE: usize = 64 << 10;

/// A `Lookup`'s answer is made from its request, and holds more than the
/// request's bytes: for each digest the request names (34 bytes of it),
/// the digest, its result as a struct, and the result encoded, some six
/// times as much. So a `Lookup`'s message takes room for this many times
/// its size, and the call keeps it until its answer is sent or dropped
/// unread (see `crate::service`'s `lookup`, which answers within it, and
/// `Answer`).
pub const LOOKUP_WEIGHT: usize = 8;

/// The largest `Lookup` message (100,000 digests and a session id fit):
/// its room is at most what one call may hold.
pub const MAX_LOOKUP_MESSAGE: usize = CALL_MOST / LOOKUP_WEIGHT;

/// How long a `Lookup`'s answer waits, by default, for its client to take
/// any of it (the server's `idle_timeout` is given instead).
const ANSWER_WAIT: Duration = Duration::from_secs(300);

/// How long a call may wait for room for a message.
pub const ROOM_WAIT: Duration = Duration::from_secs(10);

/// How long, in all, a call holding room may keep the server waiting for
/// the rest of a message while others need room.
pub const STALL: Duration = Duration::from_secs(60);

/// The calls of one peer address may hold this share of the budget.
pub const PEER_SHARE: usize = 4;

/// The most room one call may come to hold for its messages: they grow to
/// at most [`MAX_MESSAGE_SIZE`], and each growth takes room for the message
/// on top of what the call holds (see `Intake::admit`). Bytes it is sent
/// ahead of the message read may take up to a frame's more (1 MiB, see
/// `Intake::ahead`): a call that came to hold this much, alone at the
/// smallest budget or share, fails when it packs more than [`FREE`] into
/// a frame after a message. (lightagent's calls hold far less.)
pub const CALL_MOST: usize = 2 * MAX_MESSAGE_SIZE;

/// A gRPC message's header: a compression flag and a 4-byte length.
const HEADER_LEN: usize = 5;

/// Puts every request body of the service it wraps through an [`Intake`],
/// within one budget. Clones share it.
#[derive(Debug, Clone)]
pub struct IntakeLayer {
    budget: Arc<Budget>,
    /// How long a `Lookup`'s answer may wait for its client to take any of
    /// it (see [`IntakeLayer::answer_wait`]).
    answer_wait: Duration,
}

/// The room, in KiB permits, and who holds it.
#[derive(Debug)]
struct Budget {
    room: Arc<Semaphore>,
    kib: usize,
    /// KiB taken (or being waited for) by the calls of each peer address.
    peers: Mutex<HashMap<IpAddr, usize>>,
}

impl IntakeLayer {
    /// A layer whose calls' messages over [`FREE`] hold at most `bytes`
    /// together.
    pub fn new(bytes: u64) -> Self {
        let kib = usize::try_from(bytes >> 10)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        IntakeLayer {
            budget: Arc::new(Budget {
                room: Arc::new(Semaphore::new(kib)),
                kib,
                peers: Mutex::default(),
            }),
            answer_wait: ANSWER_WAIT,
        }
    }

    /// Drops a `Lookup`'s answer, and gives its room back, once its client
    /// has taken nothing of it (less than a slice, 64 KiB) for `wait`
    /// (5 minutes unless set): a client that never reads would
    /// otherwise hold both for as long as its connection lasts.
    pub fn answer_wait(mut self, wait: Duration) -> Self {
        self.answer_wait = wait;
        self
    }

    /// The room calls hold now, in bytes, with what is set aside for calls
    /// waiting for room.
    pub fn held(&self) -> u64 {
        ((self.budget.kib - self.budget.room.available_permits()) as u64) << 10
    }

    /// The whole budget, in bytes.
    pub fn budget(&self) -> u64 {
        (self.budget.kib as u64) << 10
    }

    /// The budget's room, for what a call of `peer` (see [`peer_of_call`])
    /// holds besides its requests.
    pub fn shared_room(&self, peer: Option<IpAddr>) -> SharedRoom {
        SharedRoom {
            budget: Arc::clone(&self.budget),
            peer,
        }
    }
}

/// The budget's room for what a call holds besides its requests'
/// messages: the replies a `Scan` stream has waiting for its agent, beyond
/// a first part (see `crate::service::replies`). Handed out in KiB, as
/// room for messages is, and counted in the peer's share as theirs is: an
/// agent that leaves its replies unread must not take the others' room.
#[derive(Clone)]
pub struct SharedRoom {
    budget: Arc<Budget>,
    peer: Option<IpAddr>,
}

/// Room taken with [`SharedRoom::try_take`], held until dropped (which
/// gives it back, to the budget and to the peer's share).
pub struct HeldRoom {
    _room: Room,
}

impl SharedRoom {
    /// Room for `bytes` (at most [`CALL_MOST`], which the budget always
    /// holds), if it is free now and within the peer's share.
    pub fn try_take(&self, bytes: usize) -> Option<HeldRoom> {
        let kib = bytes.min(CALL_MOST).div_ceil(1024);
        let mut room = Room::new(Arc::clone(&self.budget), self.peer);
        // Not taken: dropped, it counts nothing more for the peer.
        let taken = room.try_take(kib).ok()??;
        room.keep(taken);
        Some(HeldRoom { _room: room })
    }
}

/// The peer whose share a call's room counts in, from the call's
/// extensions: its address (an IPv4-mapped IPv6 one as the IPv4 address
/// it is).
pub fn peer_of_call(extensions: &http::Extensions) -> Option<IpAddr> {
    Ends::of(extensions).map(|ends| peer_of(ends.remote.ip()))
}

impl Budget {
    /// Whether less room is free than a largest message needs.
    fn short(&self) -> bool {
        self.room.available_permits() < MAX_MESSAGE_SIZE >> 10
    }

    /// Counts `kib` more for `peer`, if its calls may hold that much: a
    /// [`PEER_SHARE`] of the budget, and at least what one call may come to
    /// hold (so that a small budget still takes the largest messages).
    fn charge(&self, peer: IpAddr, kib: usize) -> bool {
        let share = (self.kib / PEER_SHARE).max(CALL_MOST >> 10);
        let mut peers = self.peers.lock();
        let held = peers.get(&peer).copied().unwrap_or(0);
        if held + kib > share {
            return false;
        }
        peers.insert(peer, held + kib);
        true
    }

    fn discharge(&self, peer: IpAddr, kib: usize) {
        let mut peers = self.peers.lock();
        if let Some(held) = peers.get_mut(&peer) {
            *held -= kib.min(*held);
            if *held == 0 {
                peers.remove(&peer);
            }
        }
    }
}

impl<S> tower_layer::Layer<S> for IntakeLayer {
    type Service = IntakeService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IntakeService {
            inner,
            budget: Arc::clone(&self.budget),
            answer_wait: self.answer_wait,
        }
    }
}

/// A service whose request bodies go through an [`Intake`].
#[derive(Debug, Clone)]
pub struct IntakeService<S> {
    inner: S,
    budget: Arc<Budget>,
    answer_wait: Duration,
}

type CallFuture<E> = Pin<Box<dyn Future<Output = Result<http::Response<Body>, E>> + Send>>;

impl<S> tower_service::Service<http::Request<Body>> for IntakeService<S>
where
    S: tower_service::Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = CallFuture<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let method = Method::of(request.uri().path());
        let peer = peer_of_call(request.extensions());
        let room = Room::new(Arc::clone(&self.budget), peer);
        let kept = method.answered_within.then(KeptRoom::default);
        let intake = |body| Body::new(Intake::new(body, room, method, kept.clone()));
        let response = self.inner.call(request.map(intake));
        match kept {
            None => Box::pin(response),
            Some(kept) => {
                let wait = self.answer_wait;
                Box::pin(async move {
                    let answer = |body| Body::new(Answer::new(body, kept, wait, peer));
                    Ok(response.await?.map(answer))
                })
            }
        }
    }
}

/// Whose share a call's room counts in: its address (an IPv4-mapped IPv6
/// one as the IPv4 address it is), as the connection limits count them. Not an IPv6
/// /64: the VMs of a subnet share one, and would share one quarter of the
/// budget (a VM free to add addresses on its subnet gets round the
/// share, as it gets round the connection limit).
fn peer_of(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// What the calls of a method may receive.
#[derive(Debug, Clone, Copy)]
struct Method {
    /// The largest message.
    max: usize,
    /// Whether the call's request is one message (then its end is owed
    /// once the message is whole).
    unary: bool,
    /// Whether its answer is made from its request, and held with it: a
    /// message takes room for [`LOOKUP_WEIGHT`] times its size, kept until
    /// the answer is sent or dropped unread.
    answered_within: bool,
}

impl Method {
    fn of(path: &str) -> Method {
        let of_protection = (path.strip_prefix('/'))
            .and_then(|path| path.strip_prefix(SERVICE_NAME))
            .and_then(|path| path.strip_prefix('/'));
        match of_protection {
            Some("Connect") => Method {
                max: MAX_AGENT_MESSAGE,
                unary: false,
                answered_within: false,
            },
            Some("Lookup") => Method {
                max: MAX_LOOKUP_MESSAGE,
                unary: true,
                answered_within: true,
            },
            // Scan and ScanFile (tonic answers other names itself).
            Some(_) => Method {
                max: MAX_MESSAGE_SIZE,
                unary: false,
                answered_within: false,
            },
            // Health and reflection.
            None => Method {
                max: FREE,
                unary: false,
                answered_within: false,
            },
        }
    }

    /// The room, in bytes, a message of `len` bytes takes (if over
    /// [`FREE`]).
    fn room(&self, len: usize) -> usize {
        if self.answered_within {
            len * LOOKUP_WEIGHT
        } else {
            len
        }
    }
}

/// The room a call holds, and what is counted of it for its peer: given
/// back when dropped.
struct Room {
    budget: Arc<Budget>,
    taken: Option<OwnedSemaphorePermit>,
    /// The peer's address, and the KiB counted for it.
    peer: Option<(IpAddr, usize)>,
}

impl Room {
    fn new(budget: Arc<Budget>, peer: Option<IpAddr>) -> Self {
        Room {
            budget,
            taken: None,
            peer: peer.map(|ip| (ip, 0)),
        }
    }

    /// The KiB taken.
    fn kib(&self) -> usize {
        self.taken
            .as_ref()
            .map_or(0, OwnedSemaphorePermit::num_permits)
    }

    fn keep(&mut self, taken: OwnedSemaphorePermit) {
        merge(&mut self.taken, taken);
    }

    /// Counts `kib` more for the peer and takes them from the budget if
    /// they are free: `Err` when the peer's share has no room for them,
    /// `None` when the budget has none now (they stay counted for the peer,
    /// for the wait).
    fn try_take(&mut self, kib: usize) -> Result<Option<OwnedSemaphorePermit>, ()> {
        if !self.charge(kib) {
            return Err(());
        }
        Ok(Arc::clone(&self.budget.room)
            .try_acquire_many_owned(kib as u32)
            .ok())
    }

    /// Counts `kib` more for the peer, if its calls may hold that much.
    fn charge(&mut self, kib: usize) -> bool {
        let Some((ip, charged)) = &mut self.peer else {
            return true;
        };
        let fits = self.budget.charge(*ip, kib);
        if fits {
            *charged += kib;
        }
        fits
    }

    /// Counts `kib` less for the peer (a wait for them failed, or they
    /// were given back).
    fn discharge(&mut self, kib: usize) {
        if let Some((ip, charged)) = &mut self.peer {
            self.budget.discharge(*ip, kib);
            *charged -= kib;
        }
    }
}

impl Drop for Room {
    fn drop(&mut self) {
        if let Some((ip, charged)) = self.peer
            && charged > 0
        {
            self.budget.discharge(ip, charged);
        }
    }
}

/// Where a call whose answer is made from its request (see
/// [`Method::answered_within`]) keeps its room once its request is gone:
/// shared by the request's body, which leaves the room here when dropped,
/// and the answer's, which holds it until the answer is sent.
#[derive(Clone, Default)]
struct KeptRoom(Arc<Mutex<Option<Room>>>);

/// A `Lookup`'s answer, as its body goes out: the answer and the room it
/// was made within (see [`KeptRoom`]) are held until it is sent, or until
/// its client has taken nothing of it for the layer's answer wait.
///
/// Its data goes in copied slices of at most [`Answer::MOST`]: hyper takes
/// the next slice only once HTTP/2 has room to send, while an answer of
/// some megabytes handed whole would wait in h2's buffer for a client that
/// reads nothing, its room given back when its body went. Copies, not
/// views of the answer: the few h2 may still hold once the body is gone do
/// not keep the whole answer's buffer.
///
/// hyper does not poll a body while its client gives no window, so no
/// timer of the body's own would fire: a task of its own drops what an
/// answer left unread holds (its buffer and its room, and the body of the
/// layers inside this one: the call no longer counts as under way on its
/// connection, which may then be closed as idle), and the body, next
/// polled, ends the call with `DEADLINE_EXCEEDED` in its trailers.
struct Answer {
    unsent: Arc<Mutex<Unsent>>,
    /// The task that drops an answer left unread, ended with the body.
    watch: tokio::task::AbortHandle,
}

/// Where an [`Answer`] stands.
struct Unsent {
    state: Sending,
    /// What is left of the answer's last data.
    rest: Bytes,
    /// When hyper last took something of it (or the answer began).
    taken: Instant,
}

enum Sending {
    /// The answer, and its room.
    Answer { body: Body, _room: KeptRoom },
    /// Dropped unread: the call ends with `DEADLINE_EXCEEDED`.
    Dropped,
    /// Sent, or ended.
    Over,
}

impl Answer {
    const MOST: usize = 64 << 10;

    fn new(body: Body, kept: KeptRoom, wait: Duration, peer: Option<IpAddr>) -> Self {
        let unsent = Arc::new(Mutex::new(Unsent {
            state: Sending::Answer { body, _room: kept },
            rest: Bytes::new(),
            taken: Instant::now(),
        }));
        let watch = Answer::drop_unread(Arc::downgrade(&unsent), wait, peer);
        Answer {
            unsent,
            watch: tokio::spawn(watch).abort_handle(),
        }
    }

    /// Drops what `unsent` holds once hyper has taken nothing of it for
    /// `wait`.
    async fn drop_unread(
        unsent: std::sync::Weak<Mutex<Unsent>>,
        wait: Duration,
        peer: Option<IpAddr>,
    ) {
        loop {
            let due = match unsent.upgrade() {
                Some(unsent) => unsent.lock().taken + wait,
                None => return,
            };
            tokio::time::sleep_until(due).await;
            let Some(unsent) = unsent.upgrade() else {
                return;
            };
            let mut unsent = unsent.lock();
            if unsent.taken + wait > Instant::now() {
                continue;
            }
            if let Sending::Answer { .. } = unsent.state {
                let dropped = (
                    std::mem::replace(&mut unsent.state, Sending::Dropped),
                    std::mem::take(&mut unsent.rest),
                );
                drop(unsent);
                drop(dropped);
                tracing::info!(
                    peer = peer.map(tracing::field::display),
                    "a Lookup's answer left unread for {wait:?} was dropped, with its room"
                );
            }
            return;
        }
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        self.watch.abort();
    }
}

impl HttpBody for Answer {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let mut unsent = self.unsent.lock();
        let unsent = &mut *unsent;
        if unsent.rest.is_empty() {
            let body = match &mut unsent.state {
                Sending::Answer { body, .. } => body,
                Sending::Over => return Poll::Ready(None),
                Sending::Dropped => {
                    unsent.state = Sending::Over;
                    let status = Status::deadline_exceeded(
                        "the answer was left unread for the server's idle timeout, and dropped",
                    );
                    let mut trailers = http::HeaderMap::new();
                    return Poll::Ready(match status.add_header(&mut trailers) {
                        Ok(()) => Some(Ok(Frame::trailers(trailers))),
                        Err(status) => Some(Err(status)),
                    });
                }
            };
            // tonic's answer to a unary call is ready at once: a wait
            // here (none comes) would count as the client's, and the
            // answer dropped meanwhile would leave hyper waiting on it.
            let frame = ready!(Pin::new(body).poll_frame(cx));
            match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => unsent.rest = data,
                    // The call's status: the answer is sent.
                    Err(trailers) => {
                        unsent.state = Sending::Over;
                        return Poll::Ready(Some(Ok(trailers)));
                    }
                },
                ended => {
                    unsent.state = Sending::Over;
                    return Poll::Ready(ended);
                }
            }
        }
        unsent.taken = Instant::now();
        let most = unsent.rest.len().min(Self::MOST);
        let slice = Bytes::copy_from_slice(&unsent.rest[..most]);
        // Empty once all is handed on, and then no longer the answer's.
        unsent.rest = unsent.rest.slice(most..);
        Poll::Ready(Some(Ok(Frame::data(slice))))
    }

    fn is_end_stream(&self) -> bool {
        let unsent = self.unsent.lock();
        unsent.rest.is_empty()
            && match &unsent.state {
                Sending::Answer { body, .. } => body.is_end_stream(),
                Sending::Dropped => false,
                Sending::Over => true,
            }
    }

    fn size_hint(&self) -> SizeHint {
        let unsent = self.unsent.lock();
        let mut hint = match &unsent.state {
            Sending::Answer { body, .. } => body.size_hint(),
            Sending::Dropped | Sending::Over => SizeHint::with_exact(0),
        };
        let rest = unsent.rest.len() as u64;
        hint.set_lower(hint.lower() + rest);
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper + rest);
        }
        hint
    }
}

/// A request body whose large messages go on only within the room their
/// call holds.
pub struct Intake<B> {
    /// Dropped when the call fails: HTTP/2 then lets go of what it holds
    /// for the call, and of its share of the connection's window.
    inner: Option<B>,
    method: Method,
    /// The call's room, kept until the call ends (see the module doc).
    room: Room,
    /// Where the room goes when the body does, for a call answered within
    /// it.
    kept: Option<KeptRoom>,
    /// Received and not passed on yet.
    held: Bytes,
    /// Whether `held` is a copy of its own, not a view of HTTP/2's read
    /// buffer (see `own_held`).
    held_copied: bool,
    /// Room for what `held` keeps once a message is passed on, when that
    /// is over [`FREE`] (the rest of its frame): those bytes wait with the
    /// call until tonic reads its next message, which a handler held up
    /// may not do for a long while. Given back once they are passed on, or
    /// given over to the room of the message they begin.
    ahead: Option<OwnedSemaphorePermit>,
    at: At,
    /// Whether a message came whole.
    whole: bool,
    stall: Stall,
}

/// Where the body stands in the framing.
enum At {
    /// In a message's header, `read` bytes of it passed on (all but the
    /// last go on before its room is settled: tonic acts on none of it
    /// until it has the whole header).
    Header {
        header: [u8; HEADER_LEN],
        read: usize,
    },
    /// Waiting for `more` KiB of room for a message of `len` bytes, and
    /// `ahead` KiB for the bytes `held` keeps past it (the rest of its
    /// frame, up to 1 MiB, which HTTP/2 has let go of); the last byte of
    /// its header is the first of `held`. The wait, and its
    /// [`ROOM_WAIT`], begin when the body is next read.
    Room {
        len: usize,
        more: u32,
        ahead: u32,
        waiting: Option<RoomWait>,
    },
    /// Passing on a message's `left` bytes.
    Message { left: usize },
    /// A message's last `pass` bytes wait for `more` KiB of room for the
    /// bytes received after them (see [`Intake::ahead`]); they go on once
    /// it is given, or the call fails after [`ROOM_WAIT`].
    Ahead {
        pass: usize,
        more: u32,
        waiting: Option<RoomWait>,
    },
    /// The call failed: nothing more goes on.
    Failed,
}

type RoomWait = Pin<
    Box<dyn Future<Output = Result<Result<OwnedSemaphorePermit, AcquireError>, Elapsed>> + Send>,
>;

impl At {
    fn header() -> Self {
        At::Header {
            header: [0; HEADER_LEN],
            read: 0,
        }
    }
}

/// The time the server has waited for the rest of the current message.
#[derive(Default)]
struct Stall {
    /// Waited before the current wait.
    waited: Duration,
    /// When the current wait began.
    since: Option<Instant>,
    /// Wakes the call when the message's time may be up: made once and
    /// moved on only when it fires, since its deadline only ever moves
    /// later (a timer set for every wait would cost the runtime's timer
    /// lock on every read of an upload).
    timer: Option<Pin<Box<Sleep>>>,
}

impl Stall {
    /// The client's bytes came: the current wait is over.
    fn resume(&mut self) {
        if let Some(since) = self.since.take() {
            self.waited += since.elapsed();
        }
    }

    /// A message came whole.
    fn reset(&mut self) {
        self.waited = Duration::ZERO;
        self.since = None;
    }

    /// The server waits for the client: fails once the message has kept it
    /// waiting for [`STALL`] while `budget` is short, and otherwise makes
    /// sure the call is woken to look again.
    fn check(&mut self, budget: &Budget, cx: &mut Context<'_>) -> Result<(), Status> {
        let now = Instant::now();
        let since = *self.since.get_or_insert(now);
        let due = match STALL.checked_sub(self.waited + (now - since)) {
            Some(left) if !left.is_zero() => now + left,
            // Time is up: the call goes if others need room, else it looks
            // again a while later.
            _ if budget.short() => return Err(stalled()),
            _ => now + STALL / 12,
        };
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        if timer.deadline() <= now {
            timer.as_mut().reset(due);
        }
        // Registers the wake-up; one already due looks again at once.
        if timer.as_mut().poll(cx).is_ready() {
            cx.waker().wake_by_ref();
        }
        Ok(())
    }
}

impl<B> Intake<B> {
    /// The intake of `inner`, a request body of `method`, holding `room`,
    /// which it leaves in `kept` when it goes.
    fn new(inner: B, room: Room, method: Method, kept: Option<KeptRoom>) -> Self {
        Intake {
            inner: Some(inner),
            method,
            room,
            kept,
            held: Bytes::new(),
            held_copied: false,
            ahead: None,
            at: At::header(),
            whole: false,
            stall: Stall::default(),
        }
    }

    /// Whether the client owes the rest of a message (or, for a unary
    /// call, the end of its request) while the call holds room.
    fn owing(&self) -> bool {
        self.room.taken.is_some()
            && match self.at {
                At::Header { read, .. } => read > 0 || (self.method.unary && self.whole),
                At::Message { .. } => true,
                At::Room { .. } | At::Ahead { .. } | At::Failed => false,
            }
    }

    /// How many bytes of `held` may go on now: at most the rest of one
    /// message (tonic then has no more than that message to hold), and
    /// nothing of a message that needs room it has not been given (the
    /// body then waits for it).
    fn passable(&mut self) -> Result<usize, Status> {
        let mut pos = 0;
        while pos < self.held.len() {
            match &mut self.at {
                At::Message { left } => {
                    let n = (*left).min(self.held.len() - pos);
                    pos += n;
                    *left -= n;
                    if *left == 0 {
                        self.came_whole();
                        break;
                    }
                }
                At::Header { header, read } => {
                    header[*read] = self.held[pos];
                    *read += 1;
                    if *read < HEADER_LEN {
                        pos += 1;
                        continue;
                    }
                    // tonic would read it and drop it, after the one it
                    // answers; while the first message's room waits for
                    // the request's end.
                    if self.method.unary && self.whole {
                        return Err(second_message());
                    }
                    // tonic would fail it with INTERNAL, the server's
                    // fault; it is the client's.
                    if header[0] != 0 {
                        return Err(Status::invalid_argument(
                            "a compressed message: this server accepts none; send messages uncompressed",
                        ));
                    }
                    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
                    let len = len as usize;
                    match self.admit(len)? {
                        0 => {
                            pos += 1;
                            self.at = At::Message { left: len };
                            if len == 0 {
                                self.came_whole();
                                break;
                            }
                            // The header ends its frame (see `admit`).
                            if self.method.room(len) > FREE {
                                break;
                            }
                        }
                        more => {
                            // The rest of the frame, past this message, waits
                            // with it: room is waited for it too, as for bytes
                            // ahead (see `hold_ahead`).
                            let past = self.held.len().saturating_sub(pos + 1 + len);
                            // After a Lookup's message, what would wait can
                            // only fail the call.
                            if self.method.unary && past > 0 {
                                self.room.discharge(more as usize);
                                return Err(second_message());
                            }
                            let ahead = match past > FREE {
                                true => past.div_ceil(1024),
                                false => 0,
                            };
                            if !self.room.charge(ahead) {
                                self.room.discharge(more as usize);
                                return Err(peer_full(&self::ahead(past)));
                            }
                            self.at = At::Room {
                                len,
                                more,
                                ahead: ahead as u32,
                                waiting: None,
                            };
                            break;
                        }
                    }
                }
                At::Room { .. } | At::Ahead { .. } | At::Failed => break,
            }
        }
        Ok(pos)
    }

    fn came_whole(&mut self) {
        self.at = At::header();
        self.whole = true;
        self.stall.reset();
    }

    /// Settles the room for a message of `len` bytes: takes it if it is
    /// free, else returns the KiB to wait for (0: it may go on).
    ///
    /// A call's first large message takes its size: tonic sizes its buffer
    /// for it from an empty one (the header's last byte goes on alone). A
    /// larger message later takes its size again, on top of what the call
    /// holds: growing a buffer (`BytesMut::reserve`) may double it, or add
    /// the message to what the buffer already spans, and the sum bounds
    /// both. (A `Lookup`'s message takes more: see [`LOOKUP_WEIGHT`].)
    fn admit(&mut self, len: usize) -> Result<u32, Status> {
        if len > self.method.max {
            return Err(too_large(len, self.method.max));
        }
        let room = self.method.room(len);
        let needed = room.div_ceil(1024);
        if room <= FREE || needed <= self.room.kib() {
            return Ok(0);
        }
        // Room taken for the bytes received ahead of the message (see
        // `ahead`), which are this message's, goes to it first: counted
        // once, and already counted for the peer.
        let mut more = needed;
        if let Some(part) = self.ahead.as_mut().and_then(|ahead| {
            let part = ahead.num_permits().min(more);
            ahead.split(part)
        }) {
            more -= part.num_permits();
            self.room.keep(part);
        }
        if more == 0 {
            return Ok(0);
        }
        match self.room.try_take(more) {
            Ok(Some(taken)) => {
                self.room.keep(taken);
                Ok(0)
            }
            Ok(None) => Ok(more as u32),
            Err(()) => Err(peer_full(&message(len))),
        }
    }

    /// Settles the room for the `waiting` bytes `held` keeps once a
    /// message is passed on (see [`Intake::ahead`]): none for up to
    /// [`FREE`]; else takes what it lacks if it is free, or returns the
    /// KiB to wait for (0: the message may go on).
    fn hold_ahead(&mut self, waiting: usize) -> Result<u32, Status> {
        let needed = waiting.div_ceil(1024);
        let held = self
            .ahead
            .as_ref()
            .map_or(0, OwnedSemaphorePermit::num_permits);
        if waiting <= FREE || needed <= held {
            return Ok(0);
        }
        let more = needed - held;
        match self.room.try_take(more) {
            Ok(Some(taken)) => {
                merge(&mut self.ahead, taken);
                Ok(0)
            }
            Ok(None) => Ok(more as u32),
            Err(()) => Err(peer_full(&ahead(waiting))),
        }
    }

    /// Gives back the room for bytes received ahead: they were passed on.
    fn release_ahead(&mut self) {
        if let Some(ahead) = self.ahead.take() {
            self.room.discharge(ahead.num_permits());
        }
    }

    /// Fails the call with `status`, and lets go of its request (HTTP/2
    /// then drops what it holds for the call). Its room stays until the
    /// call ends, as tonic's buffer does.
    fn fail(&mut self, status: Status) -> Poll<Next> {
        self.at = At::Failed;
        self.inner = None;
        self.held = Bytes::new();
        self.release_ahead();
        Poll::Ready(Some(Err(status)))
    }

    /// Copies `held` out of HTTP/2's read buffer, once: kept while the call
    /// waits for room, or without room, a view would keep the whole buffer
    /// (a frame, or more) for as long as the call does not read on.
    fn own_held(&mut self) {
        if !self.held_copied {
            self.held = Bytes::copy_from_slice(&self.held);
            self.held_copied = true;
        }
    }

    /// Goes on with a wait for room, when the call is in one: what goes on
    /// once the room came, or the call's failure (`None`: no wait).
    fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<Option<Next>> {
        if matches!(self.at, At::Room { .. } | At::Ahead { .. }) {
            self.own_held();
        }
        match &mut self.at {
            At::Failed => Poll::Ready(Some(None)),
            At::Room {
                len,
                more,
                ahead,
                waiting,
            } => {
                let (len, more, ahead) = (*len, *more, *ahead);
                let Ok(mut taken) =
                    ready!(wait_for_room(waiting, &self.room.budget, more + ahead, cx))
                else {
                    self.room.discharge((more + ahead) as usize);
                    return self.fail(no_room(&message(len))).map(Some);
                };
                if ahead > 0 {
                    let part = taken.split(ahead as usize).expect("taken with the rest");
                    merge(&mut self.ahead, part);
                }
                self.room.keep(taken);
                // The header's last byte, alone (see `admit`).
                self.at = At::Message { left: len };
                let last = self.held.split_to(1);
                Poll::Ready(Some(Some(Ok(Frame::data(last)))))
            }
            At::Ahead {
                pass,
                more,
                waiting,
            } => {
                let (pass, more) = (*pass, *more);
                let Ok(taken) = ready!(wait_for_room(waiting, &self.room.budget, more, cx)) else {
                    self.room.discharge(more as usize);
                    return self.fail(no_room(&ahead(self.held.len() - pass))).map(Some);
                };
                merge(&mut self.ahead, taken);
                self.at = At::header();
                Poll::Ready(Some(Some(Ok(Frame::data(self.held.split_to(pass))))))
            }
            At::Header { .. } | At::Message { .. } => Poll::Ready(None),
        }
    }
}

impl<B> Drop for Intake<B> {
    fn drop(&mut self) {
        self.release_ahead();
        if let Some(kept) = &self.kept {
            let none = Room::new(Arc::clone(&self.room.budget), None);
            *kept.0.lock() = Some(std::mem::replace(&mut self.room, none));
        }
    }
}

/// What the body passes on.
type Next = Option<Result<Frame<Bytes>, Status>>;

impl<B> HttpBody for Intake<B>
where
    B: HttpBody<Data = Bytes, Error = Status> + Unpin,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Next> {
        let this = &mut *self;
        loop {
            if let Some(next) = ready!(this.poll_room(cx)) {
                return Poll::Ready(next);
            }
            if this.held.is_empty() {
                this.release_ahead();
                let Some(inner) = &mut this.inner else {
                    return Poll::Ready(None);
                };
                match Pin::new(inner).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                        Ok(data) => {
                            this.stall.resume();
                            this.held = data;
                            this.held_copied = false;
                        }
                        Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                    },
                    Poll::Ready(end_or_error) => return Poll::Ready(end_or_error),
                    Poll::Pending => {
                        if this.owing()
                            && let Err(status) = this.stall.check(&this.room.budget, cx)
                        {
                            return this.fail(status);
                        }
                        return Poll::Pending;
                    }
                }
            }
            let pass = match this.passable() {
                Ok(0) => continue,
                Ok(pass) => pass,
                Err(status) => return this.fail(status),
            };
            // What stays once a whole message goes on waits for tonic to
            // read the next. (What follows the header of a message whose
            // room is being settled waits for that room; after a Lookup's
            // message, anything but the request's end fails the call.)
            let at_a_message_end = matches!(this.at, At::Header { read: 0, .. });
            let waiting = if at_a_message_end && !(this.method.unary && this.whole) {
                this.held.len() - pass
            } else {
                0
            };
            match this.hold_ahead(waiting) {
                Ok(0) => {
                    let data = this.held.split_to(pass);
                    // Kept without room (see `own_held`; a call waiting
                    // for room copies what it keeps as it waits).
                    if (1..=FREE).contains(&waiting) {
                        this.own_held();
                    }
                    // tonic reads no further once it has a message: the
                    // room goes back now, not at its next read.
                    if this.held.is_empty() {
                        this.release_ahead();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(more) => {
                    this.at = At::Ahead {
                        pass,
                        more,
                        waiting: None,
                    }
                }
                Err(status) => return this.fail(status),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_empty() && self.inner.as_ref().is_none_or(B::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.inner.as_ref().map(B::size_hint).unwrap_or_default();
        let held = self.held.len() as u64;
        hint.set_lower(hint.lower() + held);
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper + held);
        }
        hint
    }
}

/// Adds the room `taken` to what `held` holds.
fn merge(held: &mut Option<OwnedSemaphorePermit>, taken: OwnedSemaphorePermit) {
    match held {
        Some(held) => held.merge(taken),
        None => *held = Some(taken),
    }
}

/// Room for `more` KiB from `budget`, waited for at most [`ROOM_WAIT`]
/// from the first poll; an error if none came in time.
fn wait_for_room(
    waiting: &mut Option<RoomWait>,
    budget: &Budget,
    more: u32,
    cx: &mut Context<'_>,
) -> Poll<Result<OwnedSemaphorePermit, ()>> {
    let waiting = waiting.get_or_insert_with(|| {
        let wait = Arc::clone(&budget.room).acquire_many_owned(more);
        Box::pin(tokio::time::timeout(ROOM_WAIT, wait))
    });
    // The budget is never closed.
    waiting.as_mut().poll(cx).map(|taken| match taken {
        Ok(Ok(taken)) => Ok(taken),
        Ok(Err(_)) | Err(_) => Err(()),
    })
}

/// The error of a `Lookup` whose request holds more than its message.
fn second_message() -> Status {
    Status::invalid_argument(
        "a second message in a Lookup's request: a Lookup is one message, then the request's end",
    )
}

/// The error of a call whose message is over its method's largest.
fn too_large(len: usize, max: usize) -> Status {
    Status::out_of_range(format!(
        "a message of {len} bytes; this call accepts at most {max}"
    ))
}

/// Why the intake failed a call that its client should make again, later
/// or elsewhere: the source of each such status, so that what the call
/// was doing can be let off (see [`asks_to_send_again`]) by the intake's
/// word alone, never by a status code a client can bring about itself
/// (tonic maps an HTTP/2 reset's reason to one).
#[derive(Debug, thiserror::Error)]
#[error("the server asks for the call again, later or elsewhere")]
struct SendAgain;

/// Whether `status` is the intake's own, failing a call for want of room
/// or time that its client should make again. tonic hands the service
/// that status wrapped in one of its own: the mark is looked for down the
/// chain of sources.
pub fn asks_to_send_again(status: &Status) -> bool {
    crate::causes(status).any(|error| error.is::<SendAgain>())
}

/// `status`, as one that asks its client to send the call again.
fn send_again(mut status: Status) -> Status {
    status.set_source(Arc::new(SendAgain));
    status
}

/// The error of a call whose message (`what`, see [`message`] and
/// [`ahead`]) found no room in time.
fn no_room(what: &str) -> Status {
    send_again(Status::resource_exhausted(format!(
        "the server holds as many messages as it may: {what} found no room within {ROOM_WAIT:?}; send it again later, or to another SVM"
    )))
}

/// The error of a call whose peer's calls hold their share of the room.
fn peer_full(what: &str) -> Status {
    send_again(Status::resource_exhausted(format!(
        "this address's calls hold all the room for messages one address may: {what} must wait until some of them end; send fewer large messages at once (or pack fewer into each HTTP/2 frame)"
    )))
}

/// A message of `len` bytes, in an error.
fn message(len: usize) -> String {
    format!("a message of {len} bytes")
}

/// The `len` bytes a call was sent ahead of the message read, in an error.
fn ahead(len: usize) -> String {
    format!("the {len} bytes this call sent ahead of the message being read")
}

/// The error of a call whose message did not come whole in time.
fn stalled() -> Status {
    send_again(Status::deadline_exceeded(format!(
        "a message begun kept the server waiting for its rest for {STALL:?} while others waited for room; messages must be sent whole"
    )))
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use tokio::sync::mpsc;

    use super::*;

    /// A request body of the data sent on a channel.
    struct Sent(mpsc::UnboundedReceiver<Bytes>);

    impl HttpBody for Sent {
        type Data = Bytes;
        type Error = Status;

        fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Next> {
            self.0
                .poll_recv(cx)
                .map(|data| data.map(|d| Ok(Frame::data(d))))
        }
    }

    const SCAN: &str = "/scanserver.v1.ProtectionServer/Scan";
    const LOOKUP: &str = "/scanserver.v1.ProtectionServer/Lookup";

    /// A Scan call's body, of no known peer.
    fn body(layer: &IntakeLayer) -> (mpsc::UnboundedSender<Bytes>, Intake<Sent>) {
        call(layer, SCAN, None)
    }

    fn call(
        layer: &IntakeLayer,
        path: &str,
        peer: Option<IpAddr>,
    ) -> (mpsc::UnboundedSender<Bytes>, Intake<Sent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let room = Room::new(Arc::clone(&layer.budget), peer.map(peer_of));
        (tx, Intake::new(Sent(rx), room, Method::of(path), None))
    }

    /// The header of a message of `len` bytes.
    fn header(len: usize) -> Vec<u8> {
        let mut header = vec![0];
        header.extend_from_slice(&(len as u32).to_be_bytes());
        header
    }

    fn message(len: usize) -> Vec<u8> {
        let mut message = header(len);
        message.resize(HEADER_LEN + len, 7);
        message
    }

    /// What the intake passes on next, if anything now.
    async fn next(intake: &mut Intake<Sent>) -> Poll<Next> {
        poll_fn(|cx| Poll::Ready(Pin::new(&mut *intake).poll_frame(cx))).await
    }

    /// Everything the intake passes on now, and how it stopped: pending,
    /// or an error.
    async fn drain(intake: &mut Intake<Sent>) -> (usize, Option<tonic::Code>) {
        let mut passed = 0;
        loop {
            match next(intake).await {
                Poll::Ready(Some(Ok(frame))) => passed += frame.into_data().unwrap().len(),
                Poll::Ready(Some(Err(status))) => return (passed, Some(status.code())),
                Poll::Ready(None) | Poll::Pending => return (passed, None),
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn small_messages_go_on_as_they_come_and_large_ones_within_the_room() {
        let layer = IntakeLayer::new(1 << 20);
        let (tx, mut small) = body(&layer);
        // Several small messages in one frame, and a header cut in two.
        let frame = [message(FREE), message(10), message(3)].concat();
        let (a, b) = frame.split_at(FREE + HEADER_LEN + 2);
        tx.send(Bytes::copy_from_slice(a)).unwrap();
        tx.send(Bytes::copy_from_slice(b)).unwrap();
        assert_eq!(drain(&mut small).await, (frame.len(), None));
        assert_eq!(layer.held(), 0, "small messages take no room");

        // A large message takes its room at its header, keeps it once
        // whole (tonic keeps a buffer that large), and a smaller one after
        // it takes nothing more.
        let (tx, mut large) = body(&layer);
        tx.send(message(300 << 10).into()).unwrap();
        tx.send(message(200 << 10).into()).unwrap();
        assert_eq!(drain(&mut large).await.0, (500 << 10) + 2 * HEADER_LEN);
        assert_eq!(layer.held(), 300 << 10);

        // Another call's message that does not fit waits; its header's
        // last byte stays back, so tonic sizes no buffer for it.
        let (tx, mut waiting) = body(&layer);
        tx.send(message(800 << 10).into()).unwrap();
        assert_eq!(drain(&mut waiting).await, (HEADER_LEN - 1, None));
        tokio::time::sleep(ROOM_WAIT / 2).await;
        assert_eq!(drain(&mut waiting).await, (0, None));
        // The first call ends: its room goes to the one waiting.
        drop(large);
        assert_eq!(drain(&mut waiting).await.0, (800 << 10) + 1);
        assert_eq!(layer.held(), 800 << 10);

        // One more finds no room in time, and its call fails.
        let (tx, mut refused) = body(&layer);
        tx.send(message(300 << 10).into()).unwrap();
        assert_eq!(drain(&mut refused).await, (HEADER_LEN - 1, None));
        tokio::time::sleep(ROOM_WAIT).await;
        let (_, error) = drain(&mut refused).await;
        assert_eq!(error, Some(tonic::Code::ResourceExhausted));
        assert_eq!(layer.held(), 800 << 10);
    }

    /// The bytes a frame holds past the message passed on wait with the
    /// call until tonic reads its next message (a handler held up may not
    /// for long): over [`FREE`], they take room until they are passed on,
    /// or give it to the message they begin.
    #[tokio::test(start_paused = true)]
    async fn what_a_frame_holds_past_the_message_read_takes_room() {
        let layer = IntakeLayer::new(2 << 20);
        let peer = Some(IpAddr::from([10, 0, 0, 1]));
        let passed = |next: Poll<Next>| match next {
            Poll::Ready(Some(Ok(frame))) => frame.into_data().unwrap().len(),
            _ => panic!("a message goes on"),
        };
        let ahead: Vec<u8> = (0..15).flat_map(|_| message(60 << 10)).collect();
        let packed = || Bytes::from([message(10), ahead.clone()].concat());
        let (tx, mut scan) = call(&layer, SCAN, peer);
        tx.send(packed()).unwrap();
        assert_eq!(passed(next(&mut scan).await), 10 + HEADER_LEN);
        assert_eq!(layer.held(), (ahead.len().div_ceil(1024) as u64) << 10);
        for _ in 0..15 {
            assert_eq!(passed(next(&mut scan).await), (60 << 10) + HEADER_LEN);
        }
        assert_eq!(layer.held(), 0, "given back once passed on");
        assert!(layer.budget.peers.lock().is_empty());

        // With no room for them, the message before them waits, and goes
        // on once room comes; or its call fails when none comes in time.
        // (Another call's message holds 1.5 of the 2 MiB.)
        let holding = async || {
            let (large, mut holding) = body(&layer);
            large.send(header(1536 << 10).into()).unwrap();
            assert_eq!(drain(&mut holding).await, (HEADER_LEN, None));
            (large, holding)
        };
        let held = holding().await;
        let (tx, mut scan) = body(&layer);
        tx.send(packed()).unwrap();
        assert_eq!(drain(&mut scan).await, (0, None));
        drop(held);
        assert_eq!(
            drain(&mut scan).await,
            (10 + HEADER_LEN + ahead.len(), None)
        );
        let held = holding().await;
        let (tx, mut refused) = body(&layer);
        tx.send(packed()).unwrap();
        assert_eq!(drain(&mut refused).await, (0, None));
        tokio::time::sleep(ROOM_WAIT).await;
        let (_, error) = drain(&mut refused).await;
        assert_eq!(error, Some(tonic::Code::ResourceExhausted));
        assert_eq!(layer.held(), 1536 << 10);
        // A Lookup's message goes on, and what follows it fails the call
        // as a second message, without waiting for room (600 KiB: more
        // than is free).
        let (tx, mut lookup) = call(&layer, LOOKUP, None);
        tx.send([message(100), message(600 << 10)].concat().into())
            .unwrap();
        let drained = drain(&mut lookup).await;
        assert_eq!(
            drained,
            (100 + HEADER_LEN, Some(tonic::Code::InvalidArgument))
        );
        assert_eq!(layer.held(), 1536 << 10);
        drop(held);

        // Bytes ahead that begin a large message give it their room: it
        // is counted once.
        let (tx, mut scan) = body(&layer);
        tx.send([message(10), message(800 << 10)].concat().into())
            .unwrap();
        assert_eq!(passed(next(&mut scan).await), 10 + HEADER_LEN);
        assert_eq!(layer.held(), 801 << 10);
        assert_eq!(passed(next(&mut scan).await), HEADER_LEN);
        assert_eq!(layer.held(), 801 << 10, "not 1,601 KiB");
        assert_eq!(passed(next(&mut scan).await), 800 << 10);
        assert_eq!(layer.held(), 800 << 10, "the large message's room");
    }

    /// A message that waits for room keeps the rest of its frame, which
    /// HTTP/2 has let go of: it is counted in the peer's share meanwhile
    /// (to the KiB), and takes room with the message; after a Lookup's
    /// message, it fails the call at once. What a call keeps while it
    /// waits, or without room, is a copy, not a view that would keep the
    /// whole frame.
    #[tokio::test(start_paused = true)]
    async fn the_frame_of_a_message_waiting_for_room_is_counted() {
        let layer = IntakeLayer::new(2 << 20);
        let peer = IpAddr::from([10, 0, 0, 2]);
        let charged = || layer.budget.peers.lock().get(&peer).copied();
        let holding = async || {
            let (large, mut holding) = body(&layer);
            large.send(header(1536 << 10).into()).unwrap();
            assert_eq!(drain(&mut holding).await, (HEADER_LEN, None));
            (large, holding)
        };
        // A rest of 900 KiB, then of a byte more: counted to the byte.
        for (extra, kib) in [(0, 900), (1, 901)] {
            let held = holding().await;
            let small = (60 << 10) + HEADER_LEN;
            let last = (900 << 10) + extra - 14 * small - HEADER_LEN;
            let mut rest: Vec<u8> = (0..14).flat_map(|_| message(60 << 10)).collect();
            rest.extend(message(last));
            let frame = Bytes::from([message(600 << 10), rest.clone()].concat());
            let (tx, mut scan) = call(&layer, SCAN, Some(peer));
            tx.send(frame.clone()).unwrap();
            assert_eq!(drain(&mut scan).await, (HEADER_LEN - 1, None));
            assert_eq!(charged(), Some(600 + kib));
            assert!(
                !frame.as_ptr_range().contains(&scan.held.as_ptr()),
                "a copy"
            );
            drop(held);
            assert_eq!(drain(&mut scan).await.0, 1 + (600 << 10) + rest.len());
            assert_eq!(layer.held(), 600 << 10, "the rest's room given back");
            assert_eq!(charged(), Some(600));
        }

        // A Lookup's message followed by anything fails at once.
        let held = holding().await;
        let (tx, mut lookup) = call(&layer, LOOKUP, Some(peer));
        tx.send([message(200 << 10), message(10)].concat().into())
            .unwrap();
        let (_, error) = drain(&mut lookup).await;
        assert_eq!(error, Some(tonic::Code::InvalidArgument));
        assert_eq!(charged(), None, "nothing held for it");
        drop(held);

        // A small rest, kept without room after its message, is copied.
        let frame = Bytes::from([message(10), message(100)].concat());
        let (tx, mut small) = body(&layer);
        tx.send(frame.clone()).unwrap();
        assert!(matches!(next(&mut small).await, Poll::Ready(Some(Ok(_)))));
        assert_eq!(small.held.len(), 100 + HEADER_LEN);
        let kept = small.held.as_ptr();
        assert!(!frame.as_ptr_range().contains(&kept), "a copy");
    }

    #[tokio::test(start_paused = true)]
    async fn each_method_has_its_largest_message_and_each_peer_its_share() {
        let layer = IntakeLayer::new(256 << 20);
        // Over a method's largest: refused at the header, holding nothing.
        let (tx, mut connect) = call(&layer, "/scanserver.v1.ProtectionServer/Connect", None);
        tx.send(message(FREE + 1).into()).unwrap();
        let (passed, error) = drain(&mut connect).await;
        assert_eq!((passed, error), (0, Some(tonic::Code::OutOfRange)));
        let (tx, mut health) = call(&layer, "/grpc.health.v1.Health/Check", None);
        tx.send(message(FREE + 1).into()).unwrap();
        assert_eq!(drain(&mut health).await.1, Some(tonic::Code::OutOfRange));
        assert_eq!(layer.held(), 0);

        // One address's calls hold at most a quarter of the budget: one
        // more fails at once, another address's goes on.
        let peer = Some(IpAddr::from([10, 0, 0, 1]));
        let mut calls = Vec::new();
        for _ in 0..4 {
            let (tx, mut scan) = call(&layer, "/scanserver.v1.ProtectionServer/Scan", peer);
            tx.send(header(16 << 20).into()).unwrap();
            assert_eq!(drain(&mut scan).await, (HEADER_LEN, None));
            calls.push((tx, scan));
        }
        assert_eq!(layer.held(), 64 << 20);
        let (tx, mut refused) = call(&layer, "/scanserver.v1.ProtectionServer/Lookup", peer);
        tx.send(header(1 << 20).into()).unwrap();
        let (_, error) = drain(&mut refused).await;
        assert_eq!(error, Some(tonic::Code::ResourceExhausted));
        let other = Some(IpAddr::from([10, 0, 0, 2]));
        let (tx, mut third) = call(&layer, "/scanserver.v1.ProtectionServer/Lookup", other);
        tx.send(header(1 << 20).into()).unwrap();
        assert_eq!(drain(&mut third).await, (HEADER_LEN, None));
        // The address's share comes back as its calls end.
        calls.pop();
        let (tx, mut again) = call(&layer, "/scanserver.v1.ProtectionServer/Scan", peer);
        tx.send(message(1 << 20).into()).unwrap();
        assert_eq!(drain(&mut again).await, ((1 << 20) + HEADER_LEN, None));
        // The Lookup's room: eight times its message.
        assert_eq!(layer.held(), (48 << 20) + (8 << 20) + (1 << 20));
        // A larger message later takes its size again (the buffer may
        // grow by that much).
        tx.send(header(2 << 20).into()).unwrap();
        assert_eq!(drain(&mut again).await, (HEADER_LEN, None));
        assert_eq!(layer.held(), (48 << 20) + (8 << 20) + (3 << 20));

        // IPv6 clients share by address, not by /64: the VMs of a subnet
        // share its /64.
        let host = |last: u16| Some(IpAddr::from([0xfd00, 0, 0, 7, 0, 0, 0, last]));
        let mut calls = Vec::new();
        for n in 1..=5 {
            let (tx, mut scan) = call(&layer, "/scanserver.v1.ProtectionServer/Scan", host(1));
            tx.send(header(16 << 20).into()).unwrap();
            let expected = (n == 5).then_some(tonic::Code::ResourceExhausted);
            assert_eq!(drain(&mut scan).await.1, expected);
            calls.push((tx, scan));
        }
        let (tx, mut scan) = call(&layer, "/scanserver.v1.ProtectionServer/Scan", host(2));
        tx.send(header(16 << 20).into()).unwrap();
        assert_eq!(drain(&mut scan).await, (HEADER_LEN, None));
    }

    /// The room a peer's unread replies take counts in its share: one
    /// agent leaving its Scan replies unread on many streams cannot take
    /// the room every other agent's messages need.
    #[test]
    fn replies_room_counts_in_the_peers_share() {
        let layer = IntakeLayer::new(256 << 20);
        let room = layer.shared_room(Some(IpAddr::from([192, 0, 2, 1])));
        let held: Vec<_> = (0..2).map(|_| room.try_take(32 << 20).unwrap()).collect();
        assert_eq!(layer.held(), 64 << 20);
        assert!(room.try_take(1 << 10).is_none(), "its quarter is spent");
        let other = layer.shared_room(Some(IpAddr::from([192, 0, 2, 2])));
        assert!(other.try_take(32 << 20).is_some(), "another's is not");
        drop(held);
        assert_eq!(layer.held(), 0, "given back");
        assert!(room.try_take(32 << 20).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_lookup_takes_room_for_its_answer_and_keeps_it_until_answered() {
        let layer = IntakeLayer::new(64 << 20);
        // Over its largest, refused at the header.
        let (tx, mut large) = call(&layer, LOOKUP, None);
        tx.send(header(MAX_LOOKUP_MESSAGE + 1).into()).unwrap();
        assert_eq!(drain(&mut large).await.1, Some(tonic::Code::OutOfRange));
        // A message whose room would be up to `FREE` takes none.
        let (tx, mut small) = call(&layer, LOOKUP, None);
        let len = FREE / LOOKUP_WEIGHT;
        tx.send(message(len).into()).unwrap();
        assert_eq!(drain(&mut small).await, (len + HEADER_LEN, None));
        assert_eq!(layer.held(), 0);

        // A larger one takes `LOOKUP_WEIGHT` times its size, which stays
        // where the call keeps it once the request's body is gone, until
        // the answer goes too.
        let (tx, rx) = mpsc::unbounded_channel();
        let peer = Some(IpAddr::from([10, 0, 0, 1]));
        let room = Room::new(Arc::clone(&layer.budget), peer);
        let kept = KeptRoom::default();
        let mut lookup = Intake::new(Sent(rx), room, Method::of(LOOKUP), Some(kept.clone()));
        tx.send(message(1 << 20).into()).unwrap();
        assert_eq!(drain(&mut lookup).await, ((1 << 20) + HEADER_LEN, None));
        assert_eq!(layer.held(), 8 << 20);
        drop(lookup);
        assert_eq!(layer.held(), 8 << 20);
        assert_eq!(layer.budget.peers.lock().values().sum::<usize>(), 8 << 10);
        drop(kept);
        assert_eq!(layer.held(), 0);
        assert!(layer.budget.peers.lock().is_empty());
    }

    /// A Lookup's answer holds its room until sent; one its client takes
    /// nothing of for the answer wait is dropped with its room, and the
    /// call fails.
    #[tokio::test(start_paused = true)]
    async fn an_answer_left_unread_is_dropped_with_its_room() {
        let layer = IntakeLayer::new(64 << 20);
        let wait = Duration::from_secs(300);
        // A Lookup that took 8 MiB of room, and its answer of 200 KiB.
        let answer = |layer: &IntakeLayer| {
            let (tx, rx) = mpsc::unbounded_channel();
            let room = Room::new(Arc::clone(&layer.budget), None);
            let kept = KeptRoom::default();
            let mut lookup = Intake::new(Sent(rx), room, Method::of(LOOKUP), Some(kept.clone()));
            tx.send(message(1 << 20).into()).unwrap();
            let (tx, rx) = mpsc::unbounded_channel();
            tx.send(Bytes::from(vec![7; 200 << 10])).unwrap();
            async move {
                drain(&mut lookup).await;
                drop(lookup);
                (tx, Answer::new(Body::new(Sent(rx)), kept, wait, None))
            }
        };
        let poll = async |answer: &mut Answer| {
            poll_fn(|cx| Poll::Ready(Pin::new(&mut *answer).poll_frame(cx))).await
        };
        let (_tx, mut unread) = answer(&layer).await;
        assert_eq!(layer.held(), 8 << 20);
        // Taken a slice at a time, more than the wait in all.
        for _ in 0..3 {
            let Poll::Ready(Some(Ok(slice))) = poll(&mut unread).await else {
                panic!("a slice of the answer");
            };
            assert_eq!(slice.into_data().unwrap().len(), Answer::MOST);
            tokio::time::sleep(wait / 2).await;
        }
        assert_eq!(layer.held(), 8 << 20);
        // Then nothing taken for the wait.
        tokio::time::sleep(wait).await;
        assert_eq!(layer.held(), 0, "dropped with its room");
        let Poll::Ready(Some(Ok(frame))) = poll(&mut unread).await else {
            panic!("the call's status");
        };
        let trailers = frame.into_trailers().unwrap();
        assert_eq!(trailers["grpc-status"], "4", "DEADLINE_EXCEEDED");
        assert!(matches!(poll(&mut unread).await, Poll::Ready(None)));

        // One sent to its end gives its room back then.
        let (tx, mut sent) = answer(&layer).await;
        drop(tx);
        while let Poll::Ready(Some(frame)) = poll(&mut sent).await {
            frame.unwrap();
        }
        assert_eq!(layer.held(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_message_fails_its_call_and_gives_its_room_back() {
        let layer = IntakeLayer::new(1 << 20);
        let (tx, mut stalled) = body(&layer);
        let whole = message(500 << 10);
        tx.send(Bytes::copy_from_slice(&whole[..100 << 10]))
            .unwrap();
        assert_eq!(drain(&mut stalled).await, (100 << 10, None));
        // Waits for the client add up, across its sends.
        tokio::time::sleep(STALL / 2).await;
        tx.send(Bytes::copy_from_slice(&whole[100 << 10..200 << 10]))
            .unwrap();
        assert_eq!(drain(&mut stalled).await, (100 << 10, None));
        assert_eq!(layer.held(), 500 << 10);
        // The timer wakes the call when its time is up.
        let woken =
            tokio::time::timeout(STALL, poll_fn(|cx| Pin::new(&mut stalled).poll_frame(cx)))
                .await
                .expect("woken by its deadline");
        let Some(Err(status)) = woken else {
            panic!("the stalled message fails its call");
        };
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert!(matches!(drain(&mut stalled).await, (0, None)));
        // Its room goes back as the call ends (tonic's buffer with it).
        drop(stalled);
        assert_eq!(layer.held(), 0);

        // A Lookup owes the end of its request too.
        let (tx, mut lookup) = call(&layer, "/scanserver.v1.ProtectionServer/Lookup", None);
        tx.send(message(100 << 10).into()).unwrap();
        assert_eq!(drain(&mut lookup).await.0, (100 << 10) + HEADER_LEN);
        tokio::time::sleep(STALL).await;
        assert_eq!(
            drain(&mut lookup).await.1,
            Some(tonic::Code::DeadlineExceeded)
        );
        drop(lookup);

        // The time a call spends between messages is not counted, and each
        // message has its own.
        let (tx, mut steady) = body(&layer);
        tx.send(message(200 << 10).into()).unwrap();
        assert_eq!(drain(&mut steady).await.0, (200 << 10) + HEADER_LEN);
        tokio::time::sleep(STALL * 2).await;
        let next = message(200 << 10);
        tx.send(Bytes::copy_from_slice(&next[..1000])).unwrap();
        assert_eq!(drain(&mut steady).await, (1000, None));
        tokio::time::sleep(STALL - Duration::from_secs(1)).await;
        assert_eq!(drain(&mut steady).await, (0, None));
        tx.send(Bytes::copy_from_slice(&next[1000..])).unwrap();
        assert_eq!(drain(&mut steady).await.0, next.len() - 1000);
    }

    #[tokio::test(start_paused = true)]
    async fn with_room_to_spare_a_stalled_message_waits_on() {
        let layer = IntakeLayer::new(20 << 20);
        let (tx, mut stalled) = body(&layer);
        tx.send(Bytes::copy_from_slice(&message(1 << 20)[..1000]))
            .unwrap();
        assert_eq!(drain(&mut stalled).await, (1000, None));
        tokio::time::sleep(STALL * 3).await;
        assert_eq!(drain(&mut stalled).await, (0, None));
        // Once others need the room, it goes.
        let (tx, mut large) = body(&layer);
        tx.send(Bytes::copy_from_slice(&message(16 << 20)[..1000]))
            .unwrap();
        assert_eq!(drain(&mut large).await, (1000, None));
        let woken =
            tokio::time::timeout(STALL, poll_fn(|cx| Pin::new(&mut stalled).poll_frame(cx)))
                .await
                .expect("woken to look again");
        assert!(
            matches!(woken, Some(Err(status)) if status.code() == tonic::Code::DeadlineExceeded)
        );
    }
}
