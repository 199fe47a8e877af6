//! What the agent listener's partly received messages may hold, together.
//!
//! tonic takes a request's bytes out of HTTP/2 as they arrive, handing the
//! flow-control credit back, and keeps them until the message they belong
//! to is whole (up to 16 MiB). Flow control bounds nothing there: a client
//! that starts large messages and never finishes them, on every call of
//! every connection it may open, makes the server hold all it sent, a
//! gigabyte per connection. So every request's bytes pass through an
//! [`Intake`] first: a message's bytes go on only within [`BUDGET`], shared
//! by every call of the listener, room for them taken as they come (in
//! steps of at most [`STEP`]) and given back once the message is whole. A
//! message must be whole within [`MESSAGE_WAIT`] of its header, or its
//! call fails (`DEADLINE_EXCEEDED`): that frees the room of clients that
//! stall, and of messages that wait for room the others hold. A call
//! waiting for room holds its stream back: what its client sends meanwhile
//! stays in HTTP/2, within its flow-control windows. tonic reads a message
//! only when its call wants one, so the wait is the message's own, never a
//! handler's backpressure.

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
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Sleep,
};
use tonic::{Status, body::Body};

/// Bytes of partly received messages the listener holds at once.
pub const BUDGET: usize = 256 << 20;

/// How long a message may take to arrive whole, once its room is reserved.
pub const MESSAGE_WAIT: Duration = Duration::from_secs(60);

/// A gRPC message's header: a compression flag and a 4-byte length.
const HEADER_LEN: usize = 5;

/// Puts every request of the service it wraps through an [`Intake`], within
/// one budget.
#[derive(Debug, Clone)]
pub struct IntakeLayer {
    budget: Budget,
}

/// The budget, in KiB permits, and how many there are.
#[derive(Debug, Clone)]
struct Budget {
    room: Arc<Semaphore>,
    kib: usize,
}

impl IntakeLayer {
    /// A layer whose requests share [`BUDGET`].
    pub fn new() -> Self {
        Self::with_budget(BUDGET)
    }

    /// A layer whose requests share `bytes`.
    pub fn with_budget(bytes: usize) -> Self {
        let kib = bytes.div_ceil(1024).min(Semaphore::MAX_PERMITS);
        IntakeLayer {
            budget: Budget {
                room: Arc::new(Semaphore::new(kib)),
                kib,
            },
        }
    }

    /// Bytes of the budget reserved now.
    pub fn reserved(&self) -> usize {
        (self.budget.kib - self.budget.room.available_permits()) << 10
    }
}

impl Default for IntakeLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> tower_layer::Layer<S> for IntakeLayer {
    type Service = IntakeService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IntakeService {
            inner,
            budget: self.budget.clone(),
        }
    }
}

/// A service whose requests' bodies go through an [`Intake`].
#[derive(Debug, Clone)]
pub struct IntakeService<S> {
    inner: S,
    budget: Budget,
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
        let budget = self.budget.clone();
        self.inner
            .call(request.map(|body| Body::new(Intake::new(body, budget))))
    }
}

/// A request body whose messages go on only within the budget.
pub struct Intake<B> {
    inner: B,
    budget: Budget,
    /// Received and not passed on yet.
    held: Bytes,
    at: Stage,
}

/// Where the body stands in its current message.
enum Stage {
    /// Reading a message's header (`read` bytes of it so far).
    Header {
        header: [u8; HEADER_LEN],
        read: usize,
    },
    /// Passing on a message's `left` bytes, within its `room` (KiB
    /// permits, taken as its bytes come), before its deadline.
    Message {
        left: usize,
        passed: usize,
        room: Option<OwnedSemaphorePermit>,
        /// More room, being waited for.
        more: Option<Pin<Box<dyn Future<Output = Option<OwnedSemaphorePermit>> + Send>>>,
        deadline: Pin<Box<Sleep>>,
    },
}

/// The most of a message passed on at once: room is taken in steps no
/// larger, so that a large frame does not wait for room it does not need
/// yet.
const STEP: usize = 256 << 10;

impl Stage {
    fn header() -> Self {
        Stage::Header {
            header: [0; HEADER_LEN],
            read: 0,
        }
    }

    fn message(len: usize) -> Self {
        Stage::Message {
            left: len,
            passed: 0,
            room: None,
            more: None,
            deadline: Box::pin(tokio::time::sleep(MESSAGE_WAIT)),
        }
    }
}

impl<B> Intake<B> {
    fn new(inner: B, budget: Budget) -> Self {
        Intake {
            inner,
            budget,
            held: Bytes::new(),
            at: Stage::header(),
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
            if this.held.is_empty() {
                let polled = poll_data(&mut this.inner, cx, &mut this.held);
                match (polled, &mut this.at) {
                    (Poll::Ready(Some(Step::Data)), _) => continue,
                    (Poll::Ready(other), _) => return Poll::Ready(other.and_then(Step::passed)),
                    (Poll::Pending, Stage::Message { deadline, .. }) => {
                        ready!(deadline.as_mut().poll(cx));
                        return Poll::Ready(Some(Err(cut_off())));
                    }
                    (Poll::Pending, Stage::Header { .. }) => return Poll::Pending,
                }
            }
            match &mut this.at {
                Stage::Header { header, read } => {
                    let part = this
                        .held
                        .split_to((HEADER_LEN - *read).min(this.held.len()));
                    header[*read..*read + part.len()].copy_from_slice(&part);
                    *read += part.len();
                    if *read == HEADER_LEN {
                        let len = u32::from_be_bytes(header[1..].try_into().expect("4 bytes"));
                        this.at = match len {
                            0 => Stage::header(),
                            len => Stage::message(len as usize),
                        };
                    }
                    return Poll::Ready(Some(Ok(Frame::data(part))));
                }
                Stage::Message {
                    left,
                    passed,
                    room,
                    more,
                    deadline,
                } => {
                    let want = (*left).min(this.held.len()).min(STEP);
                    let held = room.as_ref().map_or(0, |r| r.num_permits());
                    let needed = (*passed + want).div_ceil(1024);
                    // A message larger than the whole budget goes on
                    // without (tonic refuses it from its header).
                    if needed > held && needed <= this.budget.kib {
                        let taken = match more {
                            Some(waiting) => match waiting.as_mut().poll(cx) {
                                Poll::Ready(taken) => taken,
                                Poll::Pending => {
                                    ready!(deadline.as_mut().poll(cx));
                                    return Poll::Ready(Some(Err(cut_off())));
                                }
                            },
                            None => {
                                let budget = Arc::clone(&this.budget.room);
                                let kib = (needed - held) as u32;
                                *more = Some(Box::pin(async move {
                                    budget.acquire_many_owned(kib).await.ok()
                                }));
                                continue;
                            }
                        };
                        *more = None;
                        match (room.as_mut(), taken) {
                            (Some(room), Some(taken)) => room.merge(taken),
                            (None, taken) => *room = taken,
                            (Some(_), None) => {}
                        }
                        continue;
                    }
                    let part = this.held.split_to(want);
                    *passed += want;
                    *left -= want;
                    // Whole: its room is given back.
                    if *left == 0 {
                        this.at = Stage::header();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(part))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The error of a call whose message did not come whole in time.
fn cut_off() -> Status {
    Status::deadline_exceeded(format!(
        "a message did not arrive whole within {MESSAGE_WAIT:?}"
    ))
}

/// What the inner body gave.
enum Step {
    /// Data, now held.
    Data,
    /// Anything else (trailers, an error), passed on as it is.
    Pass(Result<Frame<Bytes>, Status>),
}

impl Step {
    fn passed(self) -> Next {
        match self {
            Step::Data => None,
            Step::Pass(frame) => Some(frame),
        }
    }
}

/// The inner body's next frame: data goes into `held`; `None` at its end.
fn poll_data<B>(inner: &mut B, cx: &mut Context<'_>, held: &mut Bytes) -> Poll<Option<Step>>
where
    B: HttpBody<Data = Bytes, Error = Status> + Unpin,
{
    let frame = match ready!(Pin::new(inner).poll_frame(cx)) {
        None => return Poll::Ready(None),
        Some(Err(status)) => return Poll::Ready(Some(Step::Pass(Err(status)))),
        Some(Ok(frame)) => frame,
    };
    match frame.into_data() {
        Ok(data) => {
            *held = data;
            Poll::Ready(Some(Step::Data))
        }
        Err(frame) => Poll::Ready(Some(Step::Pass(Ok(frame)))),
    }
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
        (tx, Intake::new(Sent(rx), layer.budget.clone()))
    }

    fn message(len: usize) -> Vec<u8> {
        let mut message = vec![0];
        message.extend_from_slice(&(len as u32).to_be_bytes());
        message.resize(HEADER_LEN + len, 7);
        message
    }

    /// The next data the intake passes on, if it passes any now.
    async fn next(intake: &mut Intake<Sent>) -> Poll<Option<Result<Bytes, Status>>> {
        poll_fn(|cx| {
            Poll::Ready(
                Pin::new(&mut *intake)
                    .poll_frame(cx)
                    .map(|frame| frame.map(|f| f.map(|f| f.into_data().unwrap()))),
            )
        })
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn messages_go_on_within_the_budget_and_a_stalled_one_lets_go() {
        let layer = IntakeLayer::with_budget(64 << 10);
        // Two whole messages in one frame go on one at a time, each within
        // its room, given back once it is through.
        let (tx, mut whole) = body(&layer);
        tx.send([message(1000), message(2000)].concat().into())
            .unwrap();
        let mut passed = Vec::new();
        for _ in 0..4 {
            let Poll::Ready(Some(Ok(data))) = next(&mut whole).await else {
                panic!("data passed on");
            };
            passed.push(data.len());
        }
        assert_eq!(passed, [HEADER_LEN, 1000, HEADER_LEN, 2000]);
        assert!(next(&mut whole).await.is_pending());
        assert_eq!(layer.reserved(), 0);

        // A message begun and stalled holds the room its bytes take; the
        // bytes of another that do not fit wait, until the first is cut
        // off at its deadline.
        let (stalled_tx, mut stalled) = body(&layer);
        stalled_tx
            .send(message(48 << 10)[..HEADER_LEN + 40_000].to_vec().into())
            .unwrap();
        let mut lens = Vec::new();
        while let Poll::Ready(Some(Ok(data))) = next(&mut stalled).await {
            lens.push(data.len());
        }
        assert_eq!(lens, [HEADER_LEN, 40_000]);
        assert_eq!(layer.reserved(), 40 << 10);
        let (waiting_tx, mut waiting) = body(&layer);
        waiting_tx.send(message(32 << 10).into()).unwrap();
        assert!(
            matches!(next(&mut waiting).await, Poll::Ready(Some(Ok(h))) if h.len() == HEADER_LEN)
        );
        assert!(next(&mut waiting).await.is_pending(), "no room");

        tokio::time::sleep(MESSAGE_WAIT).await;
        let Poll::Ready(Some(Err(status))) = next(&mut stalled).await else {
            panic!("the stalled message is cut off");
        };
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        drop(stalled);
        assert!(
            matches!(next(&mut waiting).await, Poll::Ready(Some(Ok(d))) if d.len() == 32 << 10)
        );
        assert_eq!(
            layer.reserved(),
            0,
            "given back once the message is through"
        );
    }
}
