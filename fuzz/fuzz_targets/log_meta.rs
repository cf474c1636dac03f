//! The decoder of the small `vote` / `committed` / `purged` files
//! (`log_store::decode_meta`: one framed record, `durable::decode_record_file`, holding
//! the JSON of an `Option<Vote>` / `Option<LogId>`).
//!
//! Input: one mode byte, then the raw file (even mode) or a JSON payload that the target
//! frames with a valid checksum (odd mode).
//!
//! Asserts: never panics; a file that decodes is exactly one record; the value
//! re-encoded as `write_meta` writes it decodes to the same value, and that encoding is a
//! fixed point (byte for byte).
#![no_main]

use std::fmt::Debug;
use std::path::Path;

use eventtermq_broker::cluster_state::log_store::decode_meta;
use eventtermq_broker::cluster_state::raft::LogId;
use eventtermq_broker::cluster_state::NodeId;
use eventtermq_storage::durable::{decode_record, decode_record_file, encode_record, Decoded};
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_record(payload, &mut out).expect("fuzz inputs are within the record limit");
    out
}

fn check<T: Serialize + DeserializeOwned + PartialEq + Debug>(file: &[u8]) {
    let path = Path::new("meta");
    let Ok(value) = decode_meta::<T>(file, path) else { return };
    match decode_record(file) {
        Decoded::Record { size, .. } => assert_eq!(size, file.len(), "decoded a file with trailing bytes"),
        other => panic!("decoded a file that is not a record: {other:?}"),
    }
    assert!(decode_record_file(file).is_ok(), "decode_meta accepted what decode_record_file refuses");
    let re = frame(&serde_json::to_vec(&value).expect("meta values always serialize"));
    let again: T = decode_meta(&re, path).expect("a re-encoded meta file decodes");
    assert_eq!(again, value);
    assert_eq!(frame(&serde_json::to_vec(&again).expect("meta values always serialize")), re);
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let file = if mode & 1 == 0 { rest.to_vec() } else { frame(rest) };
    check::<Option<openraft::Vote<NodeId>>>(&file);
    check::<Option<LogId>>(&file);
});
