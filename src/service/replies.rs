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

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use prost::Message;
use tokio::sync::{
    OwnedSemaphorePermit, Semaphore, TryAcquireError,
    mpsc::{self, error::TrySendError},
};
use tokio_stream::Stream;
use tonic::Status;

use crate::proto::{FileReply, ScanReply};

/// Reply messages queued per stream before the server waits for the agent
/// to read them.
pub const REPLY_MESSAGES: usize = 256;

/// The weight of the replies queued per stream before the server waits for
/// the agent to read them: about 256 MiB for a connection's 64 streams (a
/// message heavier than this goes alone, once the queue is empty). A
/// thousand hash-first verdicts weigh some 150 KiB: a stream that answers
/// a burst of them should not wait for its agent to read the first
/// (each wait sets a timer).
pub const REPLY_BYTES: usize = 4 << 20;

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
    _weight: OwnedSemaphorePermit,
}

/// The sending side, cloned for each verdict on its way.
#[derive(Clone)]
pub struct Replies {
    queue: mpsc::Sender<Queued>,
    allowance: Arc<Semaphore>,
}

/// The receiving side, which tonic takes the replies from.
pub struct ReplyStream {
    queue: mpsc::Receiver<Queued>,
}

/// A place for one message of a known weight, taken in the queue and the
/// allowance both.
pub struct Slot<'a> {
    place: mpsc::Permit<'a, Queued>,
    weight: OwnedSemaphorePermit,
}

/// Why no slot was taken.
#[derive(Debug, PartialEq, Eq)]
pub enum NoSlot {
    /// The agent is gone.
    Closed,
    /// No room now (the agent has not read its replies).
    Full,
}

/// A stream's reply queue.
pub fn queue() -> (Replies, ReplyStream) {
    let (queue, received) = mpsc::channel(REPLY_MESSAGES);
    let replies = Replies {
        queue,
        allowance: Arc::new(Semaphore::new(REPLY_BYTES)),
    };
    (replies, ReplyStream { queue: received })
}

impl Replies {
    /// A slot for a message of `weight`, if there is room now.
    pub fn try_reserve(&self, weight: usize) -> Result<Slot<'_>, NoSlot> {
        let weight = match Arc::clone(&self.allowance).try_acquire_many_owned(permits(weight)) {
            Ok(weight) => weight,
            Err(TryAcquireError::NoPermits) => return Err(NoSlot::Full),
            Err(TryAcquireError::Closed) => unreachable!("the allowance is never closed"),
        };
        match self.queue.try_reserve() {
            Ok(place) => Ok(Slot { place, weight }),
            Err(TrySendError::Full(())) => Err(NoSlot::Full),
            Err(TrySendError::Closed(())) => Err(NoSlot::Closed),
        }
    }

    /// A slot for a message of `weight`, once there is room; `None` when
    /// the agent is gone.
    pub async fn reserve(&self, weight: usize) -> Option<Slot<'_>> {
        let allowance = Arc::clone(&self.allowance);
        let weight = tokio::select! {
            weight = allowance.acquire_many_owned(permits(weight)) => weight.ok()?,
            () = self.queue.closed() => return None,
        };
        let place = self.queue.reserve().await.ok()?;
        Some(Slot { place, weight })
    }
}

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
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.queue
            .poll_recv(cx)
            .map(|queued| queued.map(|queued| queued.reply))
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

    #[tokio::test]
    async fn replies_wait_for_their_weight_to_be_taken() {
        let (replies, mut stream) = queue();
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
}
