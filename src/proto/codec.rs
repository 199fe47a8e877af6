//! The gRPC codec of every service: prost's, with one check before a
//! message is decoded.
//!
//! Decoding makes a value of each entry of a repeated field, and an entry
//! can be far smaller on the wire than in memory: an empty `FileRequest`
//! is two bytes encoded and about a hundred decoded, so a message of 16 MiB
//! of them would take some 850 MB before the service sees it. A message
//! whose top level has more than [`MAX_FIELDS`] fields (each entry of a
//! repeated field counts) is refused with INVALID_ARGUMENT instead. The
//! largest legitimate ones are below: a Lookup of 100,000 digests, a
//! report or VM list of 100,000 VMs. Repeated fields further down are not
//! counted (a chunk's bytes could read as anything); the one an agent sends,
//! a hello's connection tags, is in `AgentMessage`, whose messages (a
//! hello, heartbeats, events) are small: one over [`MAX_AGENT_MESSAGE`] is
//! refused with OUT_OF_RANGE, as [`crate::intake`] refuses it from its
//! header on the agent listener (the codec's check stands for any other
//! way the service is served).
//!
//! An agent's message that is not valid protobuf of its type is the
//! agent's fault: it fails with INVALID_ARGUMENT, where prost's codec says
//! INTERNAL (which reads as the server's fault, and which a Scan stream
//! passes on to every file it fails with the stream). Other messages
//! (replies a client decodes, the admin service's and reports) keep
//! INTERNAL, as gRPC has it.

use std::{any::TypeId, marker::PhantomData};

use prost::{
    Message,
    encoding::{DecodeContext, decode_key, skip_field},
};
use tonic::{
    Status,
    codec::{BufferSettings, DecodeBuf, Decoder},
};
use tonic_prost::{ProstDecoder, ProstEncoder};

use super::{AgentMessage, FileChunk, LookupRequest, ScanRequest};

/// The most fields the top level of a message may have.
pub const MAX_FIELDS: usize = 1 << 17;

/// The largest message an agent may send on Connect.
pub const MAX_AGENT_MESSAGE: usize = 64 << 10;

/// prost's codec, with [`BoundedDecoder`] for decoding.
pub struct BoundedCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for BoundedCodec<T, U> {
    fn default() -> Self {
        BoundedCodec(PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for BoundedCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = BoundedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        BoundedDecoder(ProstDecoder::default())
    }
}

/// prost's decoder, after counting the message's top-level fields.
pub struct BoundedDecoder<U>(ProstDecoder<U>);

impl<U: Message + Default + 'static> Decoder for BoundedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        let len = bytes::Buf::remaining(buf);
        // One decoder serves every message type; the one with its own
        // limit is told apart by its type.
        if TypeId::of::<U>() == TypeId::of::<AgentMessage>() && len > MAX_AGENT_MESSAGE {
            return Err(Status::out_of_range(format!(
                "a Connect message of {len} bytes; at most {MAX_AGENT_MESSAGE} are accepted"
            )));
        }
        // tonic holds a whole message in one buffer before decoding it.
        let encoded = bytes::Buf::chunk(buf);
        debug_assert_eq!(encoded.len(), len, "one buffer");
        if top_level_fields(encoded) > MAX_FIELDS {
            return Err(Status::invalid_argument(format!(
                "a message with more than {MAX_FIELDS} entries; send fewer requests in each"
            )));
        }
        self.0.decode(buf).map_err(|status| {
            if !sent_by_agents::<U>() {
                return status;
            }
            Status::invalid_argument(format!(
                "a message that is not valid protobuf of its type ({})",
                status.message()
            ))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

/// Whether `U` is a message agents send the server.
fn sent_by_agents<U: 'static>() -> bool {
    [
        TypeId::of::<AgentMessage>(),
        TypeId::of::<ScanRequest>(),
        TypeId::of::<FileChunk>(),
        TypeId::of::<LookupRequest>(),
    ]
    .contains(&TypeId::of::<U>())
}

/// The fields at the top of encoded message `bytes`, counted up to one
/// over [`MAX_FIELDS`]. Counting stops at anything malformed: decoding
/// then says what.
fn top_level_fields(mut bytes: &[u8]) -> usize {
    let mut count = 0;
    while !bytes.is_empty() && count <= MAX_FIELDS {
        let skipped = decode_key(&mut bytes)
            .and_then(|(tag, wire)| skip_field(wire, tag, &mut bytes, DecodeContext::default()));
        if skipped.is_err() {
            break;
        }
        count += 1;
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::FileRequest;

    #[test]
    fn fields_are_counted_at_the_top_only() {
        let requests = ScanRequest {
            requests: vec![FileRequest::default(); 3],
        };
        assert_eq!(top_level_fields(&requests.encode_to_vec()), 3);
        let lookup = LookupRequest {
            session_id: "s".into(),
            digests: vec![bytes::Bytes::from_static(&[7; 32]); 100_000],
        };
        assert_eq!(top_level_fields(&lookup.encode_to_vec()), 100_001);
        let flood = ScanRequest {
            requests: vec![FileRequest::default(); MAX_FIELDS * 2],
        };
        assert_eq!(top_level_fields(&flood.encode_to_vec()), MAX_FIELDS + 1);
        assert_eq!(
            top_level_fields(&[0xff, 0xff]),
            0,
            "malformed: left to prost"
        );
    }
}
