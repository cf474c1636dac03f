//! Frames on the wire. The frame and method encodings are `amq-protocol`'s (the codec
//! lapin is built on); this file only cuts the byte stream into frames, refusing one
//! larger than the negotiated `frame_max` before reading it, and splits a message body
//! into body frames that fit.

use amq_protocol::frame::{gen_frame, parse_frame, AMQPContentHeader, AMQPFrame};
use amq_protocol::protocol::{basic::AMQPProperties, constants, AMQPClass};
use bytes::{Buf, BytesMut};
use tokio_util::codec::Decoder;

use super::error::{AmqpError, FRAME_ERROR, SYNTAX_ERROR};

/// The protocol header a 0.9.1 client opens with; also what a server answers a
/// client speaking another version with before it closes.
pub const PROTOCOL_HEADER: [u8; 8] = *b"AMQP\x00\x00\x09\x01";
/// Type, channel and size in front of a frame's payload, and the end octet after it.
const FRAME_OVERHEAD_BYTES: usize = 8;
const FRAME_HEADER_BYTES: usize = 7;

/// Cuts frames out of the bytes a client sends.
#[derive(Debug)]
pub struct FrameCodec {
    /// Largest whole frame (header, payload and end octet) accepted.
    pub frame_max_bytes: u32,
}

impl Decoder for FrameCodec {
    type Item = AMQPFrame;
    type Error = AmqpError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<AMQPFrame>, AmqpError> {
        if src.first() == Some(&b'A') {
            // A protocol header in the middle of a connection is as wrong as any other
            // junk; the handshake reads the opening one itself.
            return Err(AmqpError::connection(FRAME_ERROR, "a protocol header after the handshake"));
        }
        if src.len() < FRAME_HEADER_BYTES {
            return Ok(None);
        }
        if !matches!(
            src[0],
            constants::FRAME_METHOD | constants::FRAME_HEADER | constants::FRAME_BODY | constants::FRAME_HEARTBEAT
        ) {
            return Err(AmqpError::connection(FRAME_ERROR, format!("unknown frame type {}", src[0])));
        }
        let size = u32::from_be_bytes([src[3], src[4], src[5], src[6]]) as usize;
        let whole = size.saturating_add(FRAME_OVERHEAD_BYTES);
        if whole > self.frame_max_bytes as usize {
            return Err(AmqpError::connection(
                FRAME_ERROR,
                format!("a frame of {whole} bytes is larger than frame_max ({} bytes)", self.frame_max_bytes),
            ));
        }
        if src.len() < whole {
            src.reserve(whole - src.len());
            return Ok(None);
        }
        if src[whole - 1] != constants::FRAME_END {
            return Err(AmqpError::connection(FRAME_ERROR, format!("frame end octet is {}, not 206", src[whole - 1])));
        }
        let frame = match parse_frame(&src[..whole]) {
            Ok((&[], frame)) => frame,
            _ => {
                let what = match src[0] {
                    constants::FRAME_METHOD => "method",
                    constants::FRAME_HEADER => "content header",
                    _ => "frame",
                };
                return Err(AmqpError::connection(SYNTAX_ERROR, format!("malformed {what} frame ({size} bytes)")));
            }
        };
        src.advance(whole);
        Ok(Some(frame))
    }
}

/// Appends the encoding of `frame` to `out`.
pub fn encode(frame: &AMQPFrame, out: &mut Vec<u8>) {
    let taken = std::mem::take(out);
    // Writing into a Vec grows it as needed: it cannot run out of room.
    match cookie_factory::gen(gen_frame(frame), taken) {
        Ok((buf, _)) => *out = buf,
        Err(e) => tracing::error!(error = ?e, "cannot encode an AMQP frame"),
    }
}

/// Appends a method frame.
pub fn method(channel: u16, class: AMQPClass, out: &mut Vec<u8>) {
    encode(&AMQPFrame::Method(channel, class), out);
}

/// Appends a message's content: the header frame and body frames no larger than
/// `frame_max_bytes` (an empty body has none).
pub fn content(channel: u16, properties: AMQPProperties, body: &[u8], frame_max_bytes: u32, out: &mut Vec<u8>) {
    let header = AMQPContentHeader { class_id: 60, body_size: body.len() as u64, properties };
    encode(&AMQPFrame::Header(channel, 60, Box::new(header)), out);
    let chunk = (frame_max_bytes as usize).saturating_sub(FRAME_OVERHEAD_BYTES).max(1);
    for part in body.chunks(chunk) {
        encode(&AMQPFrame::Body(channel, part.to_vec()), out);
    }
}

#[cfg(test)]
mod tests {
    use amq_protocol::protocol::channel;

    use super::*;

    fn codec() -> FrameCodec {
        FrameCodec { frame_max_bytes: 4096 }
    }

    #[test]
    fn frames_round_trip_whole_and_byte_by_byte() {
        let mut wire = Vec::new();
        method(1, AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})), &mut wire);
        content(1, AMQPProperties::default(), &[7u8; 10_000], 4096, &mut wire);
        encode(&AMQPFrame::Heartbeat(0), &mut wire);
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        for b in &wire {
            buf.extend_from_slice(&[*b]);
            while let Some(f) = codec().decode(&mut buf).unwrap() {
                frames.push(f);
            }
        }
        assert!(buf.is_empty());
        // method, header, 3 body frames of at most 4088 bytes, heartbeat
        assert_eq!(frames.len(), 6, "{frames:?}");
        let body: Vec<u8> = frames
            .iter()
            .filter_map(|f| match f {
                AMQPFrame::Body(1, b) => Some(b.clone()),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(body, vec![7u8; 10_000]);
    }

    #[test]
    fn an_oversized_frame_is_refused_before_its_payload_arrives() {
        let mut buf = BytesMut::from(&[constants::FRAME_BODY, 0, 1, 0, 1, 0, 0][..]);
        let e = codec().decode(&mut buf).unwrap_err();
        assert_eq!(e.code, FRAME_ERROR);
        assert!(e.text.contains("larger than frame_max (4096 bytes)"), "{}", e.text);
    }

    #[test]
    fn junk_and_bad_end_octets_and_malformed_methods_are_refused() {
        let e = codec().decode(&mut BytesMut::from(&b"GET / HTTP/1.1\r\n"[..])).unwrap_err();
        assert_eq!(e.code, FRAME_ERROR);
        let e = codec().decode(&mut BytesMut::from(&[8u8, 0, 0, 0, 0, 0, 0, 0][..])).unwrap_err();
        assert!(e.text.contains("end octet"), "{}", e.text);
        // A method frame of class 20 method 10 cut short of its fields is fine (channel.open
        // has one reserved short string); class 999 is not a class.
        let e = codec().decode(&mut BytesMut::from(&[1u8, 0, 1, 0, 0, 0, 4, 3, 231, 0, 10, 206][..])).unwrap_err();
        assert_eq!(e.code, SYNTAX_ERROR, "{}", e.text);
    }
}
