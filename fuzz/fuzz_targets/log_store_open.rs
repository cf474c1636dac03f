//! The whole Raft log loader: `LogStore::open` on a directory whose `log`, `vote`,
//! `committed` and `purged` files hold arbitrary bytes (record decoding, JSON entries,
//! index contiguity, torn-tail truncation, purge compaction, committed lowering).
//!
//! Input: one mode byte, then up to four parts separated by `\0\0|`: log, vote,
//! committed, purged (a missing part is a missing file). Mode bit 0: the log part is
//! `\n`-separated entry JSON framed by the target; bit 1: the meta parts are JSON framed
//! by the target.
//!
//! Asserts: never panics; when it opens, the entries are contiguous and above the purge
//! point, the log state and committed id are consistent with them, the log file was only
//! truncated (when there is no purge point to compact to), and opening again changes
//! nothing (same entries, state, vote, committed and file bytes).
#![no_main]

use std::fs;

use eventtermq_broker::cluster_state::LogStore;
use eventtermq_fuzz::{frame_lines, runtime, scratch_dir, split_parts};
use eventtermq_storage::durable::encode_record;
use libfuzzer_sys::fuzz_target;
use openraft::storage::RaftLogStorage;
use openraft::RaftLogReader;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let parts = split_parts(rest, 4);
    let dir = scratch_dir();
    let log = parts[0].map(|p| if mode & 1 == 1 { frame_lines(p) } else { p.to_vec() });
    if let Some(log) = &log {
        fs::write(dir.join("log"), log).expect("write log");
    }
    for (name, part) in ["vote", "committed", "purged"].iter().zip(&parts[1..]) {
        if let Some(p) = part {
            let bytes = if mode & 2 == 2 {
                let mut v = Vec::new();
                encode_record(p, &mut v).expect("fuzz inputs are within the record limit");
                v
            } else {
                p.to_vec()
            };
            fs::write(dir.join(name), bytes).expect("write meta");
        }
    }
    runtime().block_on(async {
        let Ok(mut store) = LogStore::open(&dir).await else { return };
        let entries = store.try_get_log_entries(..).await.expect("read entries");
        for w in entries.windows(2) {
            assert_eq!(Some(w[1].log_id.index), w[0].log_id.index.checked_add(1), "non-contiguous entries served");
        }
        let state = store.get_log_state().await.expect("log state");
        match entries.last() {
            Some(last) => assert_eq!(state.last_log_id, Some(last.log_id)),
            None => assert_eq!(state.last_log_id, state.last_purged_log_id),
        }
        if let (Some(p), Some(first)) = (state.last_purged_log_id, entries.first()) {
            assert!(first.log_id.index > p.index, "purged entry served");
        }
        let vote = store.read_vote().await.expect("vote");
        let committed = store.read_committed().await.expect("committed");
        if let Some(c) = committed {
            assert!(state.last_log_id.is_some_and(|l| l.index >= c.index), "committed past the end of the log");
        }
        let after = fs::read(dir.join("log")).expect("log file");
        if parts[3].is_none() {
            assert!(log.unwrap_or_default().starts_with(&after), "the loader did more than truncate the log");
        }
        drop(store);

        let mut again = LogStore::open(&dir).await.expect("a store that opened once opens again");
        assert_eq!(again.try_get_log_entries(..).await.expect("read entries"), entries);
        let state2 = again.get_log_state().await.expect("log state");
        assert_eq!(state2.last_log_id, state.last_log_id);
        assert_eq!(state2.last_purged_log_id, state.last_purged_log_id);
        assert_eq!(again.read_vote().await.expect("vote"), vote);
        assert_eq!(again.read_committed().await.expect("committed"), committed);
        assert_eq!(fs::read(dir.join("log")).expect("log file"), after, "reopening changed the log file");
    });
});
