//! The Raft log record decoder: `[u32 len][u32 crc32c][json Entry]` (the storage crate's
//! `durable::decode_record`, then the JSON `Entry` as `log_store::load_log` reads it).
//!
//! Input: one mode byte, then either raw log bytes (even mode) or `\n`-separated entry
//! JSON that the target frames with valid checksums (odd mode).
//!
//! Asserts: never panics; a decoded record re-encodes (`encode_record`) to exactly the
//! bytes it was decoded from; `Incomplete { needed }` is exact; `Invalid` claims at least
//! a header; a decoded entry re-serializes to JSON that decodes to the same entry and is a
//! fixed point.
#![no_main]

use eventtermq_broker::cluster_state::TypeConfig;
use eventtermq_storage::durable::{
    decode_record, encode_record, Decoded, RECORD_HEADER_BYTES, RECORD_PAYLOAD_MAX_BYTES,
};
use libfuzzer_sys::fuzz_target;

type Entry = openraft::Entry<TypeConfig>;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let buf = if mode & 1 == 0 { rest.to_vec() } else { eventtermq_fuzz::frame_lines(rest) };
    let mut pos = 0;
    while pos < buf.len() {
        let tail = &buf[pos..];
        match decode_record(tail) {
            Decoded::Record { payload, size } => {
                assert_eq!(size, RECORD_HEADER_BYTES + payload.len());
                assert!(size <= tail.len() && payload.len() <= RECORD_PAYLOAD_MAX_BYTES);
                let mut re = Vec::new();
                encode_record(payload, &mut re).expect("a decoded payload is within the limit");
                assert_eq!(re, &tail[..size], "a decoded record does not re-encode to its bytes");
                if let Ok(entry) = serde_json::from_slice::<Entry>(payload) {
                    let json = serde_json::to_vec(&entry).expect("entries always serialize");
                    let again: Entry = serde_json::from_slice(&json).expect("a re-encoded entry decodes");
                    assert_eq!(again, entry);
                    assert_eq!(serde_json::to_vec(&again).expect("entries always serialize"), json);
                }
                pos += size;
            }
            Decoded::Incomplete { needed } => {
                assert!(needed > 0);
                if tail.len() >= RECORD_HEADER_BYTES && needed <= 1 << 16 {
                    // With the header complete, `needed` more bytes complete the record.
                    let mut longer = tail.to_vec();
                    longer.resize(tail.len() + needed, 0);
                    assert!(!matches!(decode_record(&longer), Decoded::Incomplete { .. }), "needed is not exact");
                } else if tail.len() < RECORD_HEADER_BYTES {
                    assert_eq!(needed, RECORD_HEADER_BYTES - tail.len());
                }
                break;
            }
            Decoded::Invalid { size, .. } => {
                assert!(size >= RECORD_HEADER_BYTES);
                break;
            }
        }
    }
});
