//! The snapshot file framing decoder (`state_machine::decode_snapshot_file`:
//! `EMQSNAP1` magic, crc32c, u64 length, JSON).
//!
//! Input: one mode byte, then the raw file (even mode) or JSON that the target frames
//! with `encode_snapshot_file` (odd mode).
//!
//! Asserts: never panics; a file that decodes re-encodes to exactly its bytes; every
//! framed file decodes to the JSON it was framed from.
#![no_main]

use eventtermq_broker::cluster_state::state_machine::{decode_snapshot_file, encode_snapshot_file};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode & 1 == 1 {
        let file = encode_snapshot_file(rest);
        assert_eq!(decode_snapshot_file(&file), Ok(rest), "a framed snapshot does not decode");
        return;
    }
    if let Ok(json) = decode_snapshot_file(rest) {
        assert_eq!(encode_snapshot_file(json), rest, "a decoded snapshot file does not re-encode to its bytes");
    }
});
