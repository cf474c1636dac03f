//! The gossip full-state sync payload decoder (postcard `SyncPayload`, the `GossipSync`
//! RPC body), through `membership::decode_sync_payload_reencoded`.
//!
//! Asserts: never panics; a decoded payload re-encodes (as the gossip task encodes its
//! own) to bytes that decode again to the same encoding (fixed point). postcard ignores
//! trailing bytes, so the input itself is not required to round-trip byte for byte.
#![no_main]

use eventtermq_broker::membership::decode_sync_payload_reencoded;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(encoded) = decode_sync_payload_reencoded(data) else { return };
    let again = decode_sync_payload_reencoded(&encoded).expect("a re-encoded sync payload decodes");
    assert_eq!(again, encoded, "sync payload re-encoding is not a fixed point");
});
