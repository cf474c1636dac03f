//! The whole segment loader: `Store::open` on a directory holding one segment
//! (`<id 7>.seg`) and its index (`.idx`) with arbitrary bytes, then reads of everything
//! (recovery scan, torn-tail truncation, seal trailer, index checks and rebuilds,
//! positional reads through the index).
//!
//! Input: one mode byte, then up to two parts separated by `\0\0|`: segment, index (a
//! missing index part is a missing file). Mode bit 0: the segment part is `\n`-separated
//! payloads that the target frames as records 0, 1, ... after a valid header (nonce 42);
//! bit 1: with bit 0, a valid seal trailer follows them; bit 2: the index part follows a
//! valid index header (id 7, nonce 42). Bits 3-7: index interval (x 16 bytes).
//!
//! Asserts: never panics; when it opens, a segment left out of the store was quarantined
//! with its bytes kept as they were; an unsealed segment was only truncated, its
//! records have consecutive offsets from 0, their checksum is the store's, reads in small
//! steps and time look-ups agree with one big read, an append after recovery reads back,
//! and opening again gives the same records. Sealed segments are trusted on open, so
//! for them reads may fail (with an error) or stop before the damage (the next read then fails),
//! and only agreement is checked.
#![no_main]

use std::fs;

use bytes::Bytes;
use eventtermq_fuzz::{scratch_dir, split_parts};
use eventtermq_storage::codec::{encode_record, FILE_HEADER_LEN};
use eventtermq_storage::{Config, Record, Store};
use libfuzzer_sys::fuzz_target;

const ID: u64 = 7;

fn checksum(records: &[Record]) -> u32 {
    let mut frames = Vec::new();
    for r in records {
        encode_record(&mut frames, r);
    }
    crc32c::crc32c(&frames)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let parts = split_parts(rest, 2);
    let dir = scratch_dir();
    let seg = match parts[0] {
        Some(p) if mode & 1 == 1 => eventtermq_fuzz::build_segment(ID, 42, p, mode & 2 == 2),
        Some(p) => p.to_vec(),
        None => return,
    };
    let seg_path = dir.join(format!("{ID:020}.seg"));
    fs::write(&seg_path, &seg).expect("write segment");
    if let Some(p) = parts[1] {
        let idx = if mode & 4 == 4 { eventtermq_fuzz::with_index_header(ID, 42, p) } else { p.to_vec() };
        fs::write(dir.join(format!("{ID:020}.idx")), idx).expect("write index");
    }
    let config = Config { index_interval_bytes: u32::from(mode >> 3) * 16, ..Config::default() };
    let Ok(store) = Store::open(&dir, config.clone()) else { return };
    let Some(info) = store.info(ID) else {
        let q = store.quarantined();
        assert_eq!(q.iter().map(|q| q.id).collect::<Vec<_>>(), [ID], "an unlisted segment is a quarantined one");
        assert_eq!(fs::read(&q[0].files[0]).expect("quarantined segment file"), seg, "quarantine kept the bytes");
        assert!(!seg_path.exists());
        return;
    };
    let reader = store.reader(ID).expect("reader");
    assert_eq!(reader.next_offset(), info.next_offset);
    let all = match reader.read(0, u64::MAX, usize::MAX) {
        Ok(all) => all,
        // A sealed segment is trusted without a scan: damage shows when it is read.
        Err(_) if info.sealed => return,
        Err(e) => panic!("unsealed segment recovered but unreadable: {e}"),
    };
    if sealed_and_damaged(&reader, info.sealed, all.len() as u64, info.next_offset) {
        return;
    }
    assert_eq!(all.len() as u64, info.next_offset, "not every record is readable");
    for (i, r) in all.iter().enumerate() {
        assert_eq!(r.offset, i as u64);
    }
    if !info.sealed {
        assert_eq!(info.checksum, checksum(&all));
        if seg.len() > FILE_HEADER_LEN {
            let after = fs::read(&seg_path).expect("segment file");
            assert!(seg.starts_with(&after), "recovery did more than truncate the segment");
        }
    }
    // Small steps through the index give the same records. A sealed segment's index is
    // only checked for plausibility on open, so a crafted one may fail here (with an
    // error); an unsealed segment's index was rebuilt from its records and may not.
    let sealed = info.sealed;
    let mut from = 0;
    let mut stepped = Vec::new();
    while from < info.next_offset {
        let got = match reader.read(from, u64::MAX, 64) {
            Ok(got) => got,
            Err(_) if sealed => return,
            Err(e) => panic!("stepped read of an unsealed segment failed: {e}"),
        };
        assert!(!got.is_empty());
        from = got.last().map_or(from, |r| r.offset + 1);
        stepped.extend(got);
    }
    assert_eq!(stepped, all);
    for r in all.iter().step_by(7) {
        let at = match reader.offset_for_time(r.timestamp_ms) {
            Ok(at) => at,
            Err(_) if sealed => return,
            Err(e) => panic!("time look-up in an unsealed segment failed: {e}"),
        };
        assert!(!is_sorted(&all) || (at <= r.offset && all[at as usize].timestamp_ms >= r.timestamp_ms));
    }
    if sealed {
        return;
    }
    let mut writer = store.writer(ID).expect("writer of an unsealed segment");
    let range = writer.append(i64::MAX, &[Bytes::from_static(b"after recovery")]).expect("append");
    assert_eq!(range.start, info.next_offset);
    drop(writer);
    drop(reader);
    drop(store);
    let again = Store::open(&dir, config).expect("a store that opened once opens again");
    let reread = again.reader(ID).expect("reader").read(0, u64::MAX, usize::MAX).expect("read again");
    assert_eq!(&reread[..all.len()], &all[..]);
    assert_eq!(reread.len(), all.len() + 1);
    assert_eq!(&reread[all.len()].payload[..], b"after recovery");
});

/// A read across damage in a sealed segment serves the records before it and stops
/// there; the next read, from the first record it did not serve, must meet the damage
/// (an error), never skip it.
fn sealed_and_damaged(reader: &eventtermq_storage::SegmentReader, sealed: bool, served: u64, next: u64) -> bool {
    if !sealed || served >= next {
        return false;
    }
    assert!(reader.read(served, u64::MAX, usize::MAX).is_err(), "a short read of a sealed segment must stop at damage");
    true
}

fn is_sorted(records: &[Record]) -> bool {
    records.windows(2).all(|w| w[0].timestamp_ms <= w[1].timestamp_ms)
}
