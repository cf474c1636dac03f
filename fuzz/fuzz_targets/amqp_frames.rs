//! The AMQP 0.9.1 frame decoder (`amqp::codec::FrameCodec`, over amq-protocol's frame
//! and method parsers) as a node runs it on the bytes a client sends after the protocol
//! header, and the conversion of a content header's properties into a stored message
//! and back (`amqp::convert`), which must keep header tables byte for byte.
//!
//! Asserts: never panics; a decoded frame re-encodes (`codec::encode`) to bytes that
//! decode to exactly one frame whose encoding is the same (fixed point); properties
//! converted to a message, back to properties and to a message again give the same
//! message.
#![no_main]

use amq_protocol::frame::AMQPFrame;
use bytes::BytesMut;
use eventtermq_broker::amqp::codec::{encode, FrameCodec};
use eventtermq_broker::amqp::convert::{to_message, to_properties};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

/// The broker's default `frame_max`.
const FRAME_MAX_BYTES: u32 = 131_072;
/// Frames decoded from one input at most (a bound on the loop, not a limit the node has).
const FRAMES_MAX: usize = 64;

fuzz_target!(|data: &[u8]| {
    let mut codec = FrameCodec { frame_max_bytes: FRAME_MAX_BYTES };
    let mut src = BytesMut::from(data);
    for _ in 0..FRAMES_MAX {
        let frame = match codec.decode(&mut src) {
            Ok(Some(frame)) => frame,
            Ok(None) | Err(_) => return,
        };
        let mut encoded = Vec::new();
        encode(&frame, &mut encoded);
        let mut again = BytesMut::from(&encoded[..]);
        let decoded = FrameCodec { frame_max_bytes: u32::MAX }
            .decode(&mut again)
            .expect("a re-encoded frame decodes")
            .expect("a re-encoded frame is whole");
        assert!(again.is_empty(), "a re-encoded frame left {} bytes", again.len());
        let mut reencoded = Vec::new();
        encode(&decoded, &mut reencoded);
        assert_eq!(reencoded, encoded, "frame re-encoding is not a fixed point");

        if let AMQPFrame::Header(_, _, header) = &frame {
            let stored = to_message("key", &header.properties, Vec::new());
            let restored = to_message("key", &to_properties(&stored), Vec::new());
            assert_eq!(restored, stored, "properties changed on their way through a stored message");
        }
    }
});
