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
//! gRPC framing:
//!
//! * A message of up to [`FREE`] (64 KiB: hellos, heartbeats, begins,
//!   small Lookups) goes on as it comes. The 64 calls of a connection hold
//!   at most 4 MiB of those, as much as its flow-control window.
//! * A larger one goes on only once its call holds room for it, taken from
//!   one budget for the listener (`uploads.message_budget`), as a whole, at
//!   its header (before tonic sizes its buffer): a call never holds part of
//!   what it needs, so calls holding room never wait on one another. The
//!   room stays with the call until the call ends, as tonic's buffer does;
//!   a larger message later takes only the difference. Room is handed out
//!   in turn (a FIFO semaphore, in KiB); a call that finds none within
//!   [`ROOM_WAIT`] fails with `RESOURCE_EXHAUSTED`. While it waits, its
//!   stream is held back by HTTP/2 flow control.
//! * A message begun must come whole: a call whose client keeps the server
//!   waiting for the rest of a message for [`STALL`] in all fails with
//!   `DEADLINE_EXCEEDED`, and its room is given back. The time counts from
//!   each read that finds the rest missing until more comes; a call's time
//!   on one message before it reads the next is not counted.
//!
//! [`ROOM_WAIT`] is shorter than [`STALL`] for a reason: what a client sends
//! on a call that waits for room stays in HTTP/2, in the connection's
//! window, which the connection's other calls share, so a message under way
//! on one of them may find its bytes stuck behind. The waiting call gives
//! up first, and the bytes flow again.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::{
    sync::{AcquireError, OwnedSemaphorePermit, Semaphore, TryAcquireError},
    time::{Instant, Sleep, error::Elapsed},
};
use tonic::{Status, body::Body};

/// The largest gRPC message the agent listener accepts (a batch of a Scan
/// stream's requests, or a Lookup of 100,000 digests). tonic refuses a
/// larger one from its header.
pub const MAX_MESSAGE_SIZE: usize = 16 << 20;

/// Messages up to this size take no room.
pub const FREE: usize = 64 << 10;

/// How long a call may wait for room for a message.
pub const ROOM_WAIT: Duration = Duration::from_secs(10);

/// How long, in all, the server may wait for the rest of a message begun.
pub const STALL: Duration = Duration::from_secs(60);

/// A gRPC message's header: a compression flag and a 4-byte length.
const HEADER_LEN: usize = 5;

/// Puts every request body of the service it wraps through an [`Intake`],
/// within one budget. Clones share it.
#[derive(Debug, Clone)]
pub struct IntakeLayer {
    budget: Arc<Budget>,
}

/// The room, in KiB permits, and how much there is in all.
#[derive(Debug)]
struct Budget {
    room: Arc<Semaphore>,
    kib: usize,
}

impl IntakeLayer {
    /// A layer whose calls' messages hold at most `bytes` together, beside
    /// those of up to [`FREE`].
    pub fn new(bytes: u64) -> Self {
        let kib = usize::try_from(bytes >> 10)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        IntakeLayer {
            budget: Arc::new(Budget {
                room: Arc::new(Semaphore::new(kib)),
                kib,
            }),
        }
    }

    /// The room calls hold now, in bytes.
    pub fn held(&self) -> u64 {
        ((self.budget.kib - self.budget.room.available_permits()) as u64) << 10
    }

    /// The whole budget, in bytes.
    pub fn budget(&self) -> u64 {
        (self.budget.kib as u64) << 10
    }
}

impl<S> tower_layer::Layer<S> for IntakeLayer {
    type Service = IntakeService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IntakeService {
            inner,
            budget: Arc::clone(&self.budget),
        }
    }
}

/// A service whose request bodies go through an [`Intake`].
#[derive(Debug, Clone)]
pub struct IntakeService<S> {
    inner: S,
    budget: Arc<Budget>,
}

impl<S> tower_service::Service<http::Request<Body>> for IntakeService<S>
where
    S: tower_service::Service<http::Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let budget = Arc::clone(&self.budget);
        self.inner
            .call(request.map(|body| Body::new(Intake::new(body, budget))))
    }
}

/// A request body whose large messages go on only within the room their
/// call holds.
pub struct Intake<B> {
    inner: B,
    budget: Arc<Budget>,
    /// The call's room, kept until the call ends (see the module doc).
    room: Option<OwnedSemaphorePermit>,
    /// Received and not passed on yet.
    held: Bytes,
    at: At,
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
    /// Waiting for room for a message of `len` bytes; the last byte of its
    /// header is the first of `held`.
    Room { len: usize, waiting: RoomWait },
    /// Passing on a message's `left` bytes.
    Message { left: usize },
    /// The call failed (no room, or a stalled message): nothing more goes
    /// on, and the body holds nothing.
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

    /// Whether a message is under way, its client owing the rest.
    fn under_way(&self) -> bool {
        matches!(self, At::Header { read: 1.., .. } | At::Message { .. })
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
    /// moved on only when it fires early, since its deadline only ever moves
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
    /// waiting for [`STALL`], and otherwise makes sure the call is woken
    /// when it would have.
    fn check(&mut self, cx: &mut Context<'_>) -> Result<(), Status> {
        let since = *self.since.get_or_insert_with(Instant::now);
        let Some(left) = STALL.checked_sub(self.waited + since.elapsed()) else {
            return Err(stalled());
        };
        let due = Instant::now() + left;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        if timer.deadline() <= Instant::now() {
            timer.as_mut().reset(due);
        }
        // Registers the wake-up; ready only if `left` is nothing.
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Err(stalled()),
            Poll::Pending => Ok(()),
        }
    }
}

impl<B> Intake<B> {
    fn new(inner: B, budget: Arc<Budget>) -> Self {
        Intake {
            inner,
            budget,
            room: None,
            held: Bytes::new(),
            at: At::header(),
            stall: Stall::default(),
        }
    }

    /// How many bytes of `held` may go on now. Follows the framing through
    /// them, and stops at a header whose message needs room that is not
    /// free (the body then waits for it).
    fn passable(&mut self) -> usize {
        let mut pos = 0;
        while pos < self.held.len() {
            match &mut self.at {
                At::Message { left } => {
                    let n = (*left).min(self.held.len() - pos);
                    pos += n;
                    *left -= n;
                    if *left == 0 {
                        self.at = At::header();
                        self.stall.reset();
                    }
                }
                At::Header { header, read } => {
                    header[*read] = self.held[pos];
                    *read += 1;
                    if *read < HEADER_LEN {
                        pos += 1;
                        continue;
                    }
                    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
                    let len = len as usize;
                    match self.make_room(len) {
                        Some(waiting) => {
                            self.at = At::Room { len, waiting };
                            break;
                        }
                        None => {
                            pos += 1;
                            self.at = At::Message { left: len };
                            if len == 0 {
                                self.at = At::header();
                            }
                        }
                    }
                }
                At::Room { .. } | At::Failed => break,
            }
        }
        pos
    }

    /// Takes the room a message of `len` bytes needs if it is free, or
    /// returns the wait for it.
    fn make_room(&mut self, len: usize) -> Option<RoomWait> {
        let held = self
            .room
            .as_ref()
            .map_or(0, OwnedSemaphorePermit::num_permits);
        let needed = len.div_ceil(1024);
        // tonic refuses a message over the largest size from its header.
        if len <= FREE || len > MAX_MESSAGE_SIZE || needed <= held {
            return None;
        }
        let more = (needed - held) as u32;
        let room = Arc::clone(&self.budget.room);
        match Arc::clone(&room).try_acquire_many_owned(more) {
            Ok(taken) => {
                self.keep(taken);
                None
            }
            Err(TryAcquireError::NoPermits | TryAcquireError::Closed) => Some(Box::pin(
                tokio::time::timeout(ROOM_WAIT, room.acquire_many_owned(more)),
            )),
        }
    }

    /// Fails the call with `status`, giving back its room at once (and,
    /// with the wait for room dropped, any the wait was given so far).
    fn fail(&mut self, status: Status) -> Poll<Next> {
        self.at = At::Failed;
        self.room = None;
        self.held = Bytes::new();
        Poll::Ready(Some(Err(status)))
    }

    fn keep(&mut self, taken: OwnedSemaphorePermit) {
        match &mut self.room {
            Some(room) => room.merge(taken),
            None => self.room = Some(taken),
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
            if let At::Room { len, waiting } = &mut this.at {
                let len = *len;
                match ready!(waiting.as_mut().poll(cx)) {
                    Ok(Ok(taken)) => this.keep(taken),
                    // The budget is never closed.
                    Ok(Err(_)) | Err(_) => return this.fail(no_room(len)),
                }
                // The header's last byte, then the message.
                this.at = At::Message { left: len + 1 };
            }
            if let At::Failed = this.at {
                return Poll::Ready(None);
            }
            if this.held.is_empty() {
                match Pin::new(&mut this.inner).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                        Ok(data) => {
                            this.stall.resume();
                            this.held = data;
                        }
                        Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                    },
                    Poll::Ready(end_or_error) => return Poll::Ready(end_or_error),
                    Poll::Pending => {
                        if this.at.under_way()
                            && let Err(status) = this.stall.check(cx)
                        {
                            return this.fail(status);
                        }
                        return Poll::Pending;
                    }
                }
            }
            let pass = this.passable();
            if pass > 0 {
                return Poll::Ready(Some(Ok(Frame::data(this.held.split_to(pass)))));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.inner.size_hint();
        let held = self.held.len() as u64;
        hint.set_lower(hint.lower() + held);
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper + held);
        }
        hint
    }
}

/// The error of a call whose message found no room in time.
fn no_room(len: usize) -> Status {
    Status::resource_exhausted(format!(
        "the server holds as many received messages as it may: a message of {len} bytes found no room within {ROOM_WAIT:?}; send it again later, or to another SVM"
    ))
}

/// The error of a call whose message did not come whole in time.
fn stalled() -> Status {
    Status::deadline_exceeded(format!(
        "a message begun kept the server waiting for its rest for {STALL:?}; messages must be sent whole"
    ))
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

    fn body(layer: &IntakeLayer) -> (mpsc::UnboundedSender<Bytes>, Intake<Sent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (tx, Intake::new(Sent(rx), Arc::clone(&layer.budget)))
    }

    fn message(len: usize) -> Vec<u8> {
        let mut message = vec![0];
        message.extend_from_slice(&(len as u32).to_be_bytes());
        message.resize(HEADER_LEN + len, 7);
        message
    }

    /// Everything the intake passes on now, and how it stopped: pending,
    /// or an error.
    async fn drain(intake: &mut Intake<Sent>) -> (usize, Option<tonic::Code>) {
        let mut passed = 0;
        loop {
            let next = poll_fn(|cx| Poll::Ready(Pin::new(&mut *intake).poll_frame(cx))).await;
            match next {
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
        assert_eq!(layer.held(), 0, "its room is given back");
        assert!(matches!(drain(&mut stalled).await, (0, None)));

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
}
