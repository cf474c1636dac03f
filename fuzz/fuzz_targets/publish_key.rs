//! The key of an exactly-once publish in front of a stored record's payload
//! (`replication::dedupe::stored_key`: field 15 of the stored `Message`), looked for in
//! every record of a previous generation when a primary rebuilds its duplicate window
//! from disk after a crash.
//!
//! Input: one mode byte, then either a raw record payload (even mode) or a key (8 bytes
//! producer id, 8 sequence, 4 count, 4 stored before) and a payload that the target
//! puts the key in front of, as the primary stores it (odd mode).
//!
//! Asserts: never panics; a key found re-encodes to the same key; an ordinary message
//! as the broker encodes it carries no key; a key put in front of a payload is found
//! again, and the payload still decodes to the same `Message` (what subscribers get).
//!
//! Seeds (`seeds/publish_key/`): a keyed and an unkeyed record as the primary stores
//! them, and a key with a message, written by hand (the encoding is three fields).
#![no_main]

use eventtermq_broker::replication::dedupe::{encode_key, stored_key};
use eventtermq_proto::internal::v1::PublishKey;
use eventtermq_proto::v1::Message;
use libfuzzer_sys::fuzz_target;
use prost::Message as _;

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn raw(payload: &[u8]) {
    if let Some(key) = stored_key(payload) {
        assert_eq!(stored_key(&encode_key(&key, b"")), Some(key), "a found key re-encodes to itself");
    }
    if let Ok(m) = Message::decode(payload) {
        assert_eq!(stored_key(&m.encode_to_vec()), None, "an unkeyed message carries no key: {m:?}");
    }
}

fn keyed(input: &[u8]) {
    if input.len() < 24 {
        return;
    }
    let key = PublishKey {
        producer_id: u64_at(input, 0),
        sequence: u64_at(input, 8),
        count: u32_at(input, 16),
        stored_before: u32_at(input, 20),
    };
    let payload = &input[24..];
    let stored = encode_key(&key, payload);
    assert_eq!(stored_key(&stored), Some(key), "the key in front is found again");
    match Message::decode(payload) {
        Ok(m) => assert_eq!(Message::decode(stored.clone()).ok(), Some(m), "the message is unchanged"),
        Err(_) => assert!(Message::decode(stored).is_err(), "an undecodable payload stays undecodable"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((mode, rest)) = data.split_first() else { return };
    if mode % 2 == 0 {
        raw(rest);
    } else {
        keyed(rest);
    }
});
