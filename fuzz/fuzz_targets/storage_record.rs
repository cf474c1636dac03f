//! The segment record decoder (`eventtermq_storage::codec::decode_record`): frames of
//! `[u32 len][u32 crc32c][u64 offset][i64 timestamp][payload]`.
//!
//! Input: one mode byte, then either raw segment bytes (even mode) or `\n`-separated
//! payloads that the target frames with valid checksums (odd mode).
//!
//! Asserts: never panics; a decoded record re-encodes to exactly the bytes it was
//! decoded from and agrees with `decode_frame_header`; `Incomplete { needed }` is exact
//! once the length field is there (adding `needed` bytes gives something complete or
//! invalid, never incomplete).
#![no_main]

use eventtermq_storage::codec::{decode_frame_header, decode_record, encode_record, Decoded, FRAME_HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let buf = if mode & 1 == 0 { rest.to_vec() } else { eventtermq_fuzz::frame_records(rest) };
    let mut pos = 0;
    while pos < buf.len() {
        let tail = &buf[pos..];
        match decode_record(tail) {
            Ok(Decoded::Complete(record, used)) => {
                assert_eq!(used, FRAME_HEADER_LEN + record.payload.len());
                let mut again = Vec::new();
                encode_record(&mut again, &record);
                assert_eq!(again, &tail[..used], "a decoded record does not re-encode to its bytes");
                match decode_frame_header(tail) {
                    Ok(Decoded::Complete(h, _)) => {
                        assert_eq!((h.frame_len, h.offset, h.timestamp_ms), (used, record.offset, record.timestamp_ms));
                    }
                    other => panic!("record decodes but its header does not: {other:?}"),
                }
                pos += used;
            }
            Ok(Decoded::Incomplete { needed }) => {
                assert!(needed > 0);
                if tail.len() < 4 {
                    assert_eq!(needed, FRAME_HEADER_LEN - tail.len());
                } else if needed <= 1 << 20 {
                    let mut longer = tail.to_vec();
                    longer.resize(tail.len() + needed, 0);
                    assert!(!matches!(decode_record(&longer), Ok(Decoded::Incomplete { .. })), "needed is not exact");
                }
                break;
            }
            Err(_) => break,
        }
    }
});
