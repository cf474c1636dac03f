//! The whole snapshot loader: `StateMachineStore::open` on a directory whose `snapshot`
//! file holds arbitrary bytes (framing, then the JSON snapshot content).
//!
//! Input: one mode byte, then the raw file (even mode) or snapshot JSON framed by the
//! target with a valid checksum (odd mode).
//!
//! Asserts: never panics; a file with bad framing is never served; a loaded snapshot is
//! served as exactly the file's JSON, with meta matching the applied state; it installs
//! on a fresh store (what a follower does with it), and that store reopens with the same
//! snapshot.
#![no_main]

use std::fs;

use eventtermq_broker::cluster_state::state_machine::{decode_snapshot_file, encode_snapshot_file};
use eventtermq_broker::cluster_state::StateMachineStore;
use eventtermq_fuzz::{runtime, scratch_dir};
use libfuzzer_sys::fuzz_target;
use openraft::storage::RaftStateMachine;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let file = if mode & 1 == 1 { encode_snapshot_file(rest) } else { rest.to_vec() };
    let dir = scratch_dir();
    let (a, b) = (dir.join("a"), dir.join("b"));
    fs::create_dir_all(&a).expect("mkdir");
    fs::write(a.join("snapshot"), &file).expect("write snapshot");
    runtime().block_on(async {
        let Ok((mut store, shared)) = StateMachineStore::open(&a).await else { return };
        let json = decode_snapshot_file(&file).expect("a snapshot file with bad framing was loaded");
        let snap = store.get_current_snapshot().await.expect("current snapshot").expect("loaded snapshot is served");
        assert_eq!(snap.snapshot.get_ref().as_slice(), json);
        {
            let applied = shared.read();
            assert_eq!(applied.last_applied, snap.meta.last_log_id);
            assert_eq!(applied.membership, snap.meta.last_membership);
        }

        let (mut follower, _) = StateMachineStore::open(&b).await.expect("open an empty store");
        follower.install_snapshot(&snap.meta, snap.snapshot).await.expect("a served snapshot installs");
        drop(follower);
        let (mut reopened, _) = StateMachineStore::open(&b).await.expect("an installed snapshot loads");
        let again = reopened.get_current_snapshot().await.expect("current snapshot").expect("installed snapshot");
        assert_eq!(again.meta, snap.meta);
        assert_eq!(again.snapshot.get_ref().as_slice(), json);
    });
});
