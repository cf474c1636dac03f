//! A live `Membership` fed arbitrary gossip datagrams (foca's postcard codec and its
//! message handling) and `GossipSync` payloads (decoding plus the merge into foca).
//!
//! Input: a sequence of `[kind u8][len u16 LE][bytes]`: even kind = one datagram on the
//! node's datagram channel, odd kind = one `handle_sync` call with those bytes.
//!
//! Asserts: never panics (libfuzzer-sys aborts on a panic in the gossip task too); the
//! task keeps answering (`handle_sync` never reports it stopped); the node's own sync
//! payload always decodes.
#![no_main]

use bytes::Bytes;
use eventtermq_broker::clock::Clock;
use eventtermq_broker::membership::{decode_sync_payload_reencoded, Membership, MembershipConfig, MembershipError};
use eventtermq_broker::peers::Peers;
use eventtermq_broker::transport::mem::MemNetwork;
use eventtermq_broker::transport::DATAGRAM_QUEUE_MAX;
use eventtermq_fuzz::runtime;
use libfuzzer_sys::fuzz_target;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const ADDR: &str = "fuzz-node:7000";

fuzz_target!(|data: &[u8]| {
    runtime().block_on(async {
        let net = MemNetwork::new();
        let (network, _listeners) = net.attach(ADDR);
        let (tx, rx) = mpsc::channel(DATAGRAM_QUEUE_MAX);
        let shutdown = CancellationToken::new();
        let membership = Membership::start(
            7,
            ADDR.to_string(),
            MembershipConfig::default(),
            &Clock::System,
            Peers::new(network, Default::default()),
            rx,
            shutdown.clone(),
        );
        let mut rest = data;
        while let Some((&kind, r)) = rest.split_first() {
            let (len, r) = match r {
                [a, b, r @ ..] => (u16::from_le_bytes([*a, *b]) as usize, r),
                r => (r.len(), &[][..]),
            };
            let (chunk, r) = r.split_at(len.min(r.len()));
            rest = r;
            if kind & 1 == 0 {
                tx.send(Bytes::copy_from_slice(chunk)).await.expect("gossip task alive");
                // Let the task handle it before the next step.
                while tx.capacity() < tx.max_capacity() {
                    tokio::task::yield_now().await;
                }
            } else {
                let r = membership.handle_sync(Bytes::copy_from_slice(chunk)).await;
                assert!(!matches!(r, Err(MembershipError::Stopped)), "gossip task stopped");
            }
        }
        let ours = membership.handle_sync(Bytes::new()).await.expect("gossip task alive");
        decode_sync_payload_reencoded(&ours).expect("our own sync payload decodes");
        shutdown.cancel();
        drop(tx);
        tokio::task::yield_now().await;
    });
});
