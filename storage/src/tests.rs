//! Unit tests of the store: round trips, recovery from torn and corrupt files, sealing,
//! index rebuilds, time look-ups, truncation.

use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::codec::{
    decode_header, encode_trailer, Decoded, SealTrailer, FILE_HEADER_LEN, FRAME_HEADER_LEN, INDEX_ENTRY_LEN,
};
use crate::test_env::{on_both, Env, TestDir};
use crate::{index_file_name, segment_file_name, Config, Record, SegmentInfo, StorageError, Store};

fn small_index(e: &Env) -> Config {
    Config { index_interval_bytes: 100, ..e.config() }
}

fn payload(offset: u64, len: usize) -> Bytes {
    (0..len).map(|i| (offset as usize * 31 + i) as u8).collect::<Vec<u8>>().into()
}

fn seg_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(segment_file_name(id))
}

fn idx_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(index_file_name(id))
}

/// Appends `count` records of `len` bytes in batches of `batch`, timestamp = 1000 + offset / batch.
fn fill(store: &Store, id: u64, count: u64, len: usize, batch: u64) -> Vec<Record> {
    let mut w = store.create(id).unwrap();
    let mut records = Vec::new();
    let mut offset = 0;
    while offset < count {
        let n = batch.min(count - offset);
        let ts = 1000 + (offset / batch) as i64;
        let payloads: Vec<Bytes> = (offset..offset + n).map(|o| payload(o, len)).collect();
        assert_eq!(w.append(ts, &payloads).unwrap(), offset..offset + n);
        for (o, p) in (offset..).zip(payloads) {
            records.push(Record { offset: o, timestamp_ms: ts, payload: p });
        }
        offset += n;
    }
    assert_eq!(w.sync().unwrap(), count);
    records
}

fn read_all(store: &Store, id: u64) -> Vec<Record> {
    store.reader(id).unwrap().read(0, u64::MAX, usize::MAX).unwrap()
}

/// crc32c of the record frames of an unsealed segment file.
fn file_checksum(e: &Env, dir: &Path, id: u64, records_end: usize) -> u32 {
    let bytes = e.read(&seg_path(dir, id));
    crc32c::crc32c(&bytes[FILE_HEADER_LEN..records_end])
}

fn record_positions(records: &[Record]) -> Vec<u64> {
    let mut pos = FILE_HEADER_LEN as u64;
    records
        .iter()
        .map(|r| {
            let p = pos;
            pos += (FRAME_HEADER_LEN + r.payload.len()) as u64;
            p
        })
        .collect()
}

on_both! {
fn round_trip_in_batches_and_ranges(e: &Env) {
    let dir = e.tempdir();
    let store = Store::open(dir.path(), small_index(e)).unwrap();
    let records = fill(&store, 3, 250, 37, 17);
    assert_eq!(read_all(&store, 3), records);
    let r = store.reader(3).unwrap();
    assert_eq!(r.id(), 3);
    assert_eq!(r.next_offset(), 250);
    for from in [0, 1, 16, 17, 18, 99, 100, 248, 249] {
        for until in [from, from + 1, from + 5, 250, 400] {
            let got = r.read(from, until, usize::MAX).unwrap();
            let want: Vec<Record> = records.iter().filter(|x| x.offset >= from && x.offset < until).cloned().collect();
            assert_eq!(got, want, "from {from} until {until}");
        }
    }
    assert!(r.read(250, u64::MAX, 100).unwrap().is_empty());
    assert!(r.read(900, u64::MAX, 100).unwrap().is_empty());
    let info = store.info(3).unwrap();
    let size = FILE_HEADER_LEN as u64 + 250 * (FRAME_HEADER_LEN as u64 + 37);
    assert_eq!(info, SegmentInfo { id: 3, size_bytes: size, next_offset: 250, sealed: false, checksum: info.checksum });
    assert_eq!(info.checksum, file_checksum(e, dir.path(), 3, size as usize));
    assert_eq!(store.list(), vec![info]);
    assert!(store.info(4).is_none());
}
}

on_both! {
fn max_bytes_limits_payload_but_returns_one_record(e: &Env) {
    let dir = e.tempdir();
    let store = Store::open(dir.path(), small_index(e)).unwrap();
    let mut w = store.create(1).unwrap();
    let sizes = [10usize, 10, 5000, 10, 10, 10];
    for (o, s) in sizes.iter().enumerate() {
        w.append(7, &[payload(o as u64, *s)]).unwrap();
    }
    let r = store.reader(1).unwrap();
    let offsets = |v: Vec<Record>| v.iter().map(|x| x.offset).collect::<Vec<_>>();
    assert_eq!(offsets(r.read(0, 99, 20).unwrap()), vec![0, 1]);
    assert_eq!(offsets(r.read(0, 99, 19).unwrap()), vec![0]);
    assert_eq!(offsets(r.read(0, 99, 0).unwrap()), vec![0]);
    assert_eq!(offsets(r.read(2, 99, 100).unwrap()), vec![2]);
    assert_eq!(r.read(2, 99, 100).unwrap()[0].payload, payload(2, 5000));
    assert_eq!(offsets(r.read(1, 99, 100).unwrap()), vec![1]);
    assert_eq!(offsets(r.read(3, 99, 30).unwrap()), vec![3, 4, 5]);
    assert_eq!(offsets(r.read(0, 99, 5020).unwrap()), vec![0, 1, 2]);
}
}

on_both! {
fn until_offset_hides_records(e: &Env) {
    let dir = e.tempdir();
    let store = Store::open(dir.path(), small_index(e)).unwrap();
    let records = fill(&store, 1, 40, 20, 10);
    let r = store.reader(1).unwrap();
    assert_eq!(r.read(0, 25, usize::MAX).unwrap(), records[..25].to_vec());
    assert!(r.read(25, 25, usize::MAX).unwrap().is_empty());
    assert!(r.read(30, 25, usize::MAX).unwrap().is_empty());
    assert_eq!(r.read(24, 25, usize::MAX).unwrap(), records[24..25].to_vec());
}
}

on_both! {
fn reader_sees_what_the_writer_appends(e: &Env) {
    let dir = e.tempdir();
    let store = Store::open(dir.path(), small_index(e)).unwrap();
    let mut w = store.create(1).unwrap();
    let r = store.reader(1).unwrap();
    assert!(r.read(0, u64::MAX, usize::MAX).unwrap().is_empty());
    w.append(1, &[payload(0, 3)]).unwrap();
    assert_eq!(r.next_offset(), 1);
    assert_eq!(r.read(0, u64::MAX, usize::MAX).unwrap().len(), 1);
    w.append(2, &[payload(1, 3), payload(2, 3)]).unwrap();
    assert_eq!(r.read(1, u64::MAX, usize::MAX).unwrap().len(), 2);
    assert_eq!(w.append(3, &[]).unwrap(), 3..3);
}
}

on_both! {
fn reopen_after_drop_continues_appending(e: &Env) {
    let dir = e.tempdir();
    let records = {
        let store = Store::open(dir.path(), small_index(e)).unwrap();
        let r = fill(&store, 5, 60, 50, 7);
        fill(&store, 2, 3, 5, 1);
        r
    };
    let store = Store::open(dir.path(), small_index(e)).unwrap();
    assert_eq!(store.list().iter().map(|i| i.id).collect::<Vec<_>>(), vec![2, 5]);
    assert_eq!(read_all(&store, 5), records);
    let mut w = store.writer(5).unwrap();
    assert_eq!(w.next_offset(), 60);
    assert_eq!(w.append(99, &[payload(60, 5)]).unwrap(), 60..61);
    assert_eq!(w.sync().unwrap(), 61);
    drop(w);
    drop(store);
    let store = Store::open(dir.path(), small_index(e)).unwrap();
    let all = read_all(&store, 5);
    assert_eq!(all.len(), 61);
    assert_eq!(all[60], Record { offset: 60, timestamp_ms: 99, payload: payload(60, 5) });
}
}

on_both! {
fn one_writer_per_segment(e: &Env) {
    let dir = e.tempdir();
    let store = Store::open(dir.path(), small_index(e)).unwrap();
    let w = store.create(1).unwrap();
    assert!(matches!(store.writer(1), Err(StorageError::WriterBusy { id: 1 })));
    assert!(matches!(store.create(1), Err(StorageError::AlreadyExists { id: 1 })));
    drop(w);
    let w = store.writer(1).unwrap();
    assert_eq!(w.id(), 1);
    assert!(matches!(store.writer(2), Err(StorageError::NotFound { id: 2 })));
    assert!(matches!(store.reader(2), Err(StorageError::NotFound { id: 2 })));
}
}

/// Copies `dir/<id>.seg` cut to `len` bytes into a fresh directory.
fn cut_copy(e: &Env, src: &Path, id: u64, len: usize) -> TestDir {
    let bytes = e.read(&seg_path(src, id));
    let dir = e.tempdir();
    e.write(&seg_path(dir.path(), id), &bytes[..len]);
    dir
}

on_both! {
fn torn_tail_at_every_byte_of_the_last_record_is_cut_and_appends_continue(e: &Env) {
    let src = e.tempdir();
    let records = {
        let store = Store::open(src.path(), small_index(e)).unwrap();
        fill(&store, 1, 12, 30, 5)
    };
    let positions = record_positions(&records);
    let last_start = *positions.last().unwrap() as usize;
    let end = last_start + FRAME_HEADER_LEN + 30;
    for cut in last_start..end {
        let dir = cut_copy(e, src.path(), 1, cut);
        let store = Store::open(dir.path(), small_index(e)).unwrap();
        assert_eq!(store.info(1).unwrap().next_offset, 11, "cut at {cut}");
        assert_eq!(read_all(&store, 1), records[..11].to_vec(), "cut at {cut}");
        assert_eq!(e.len(&seg_path(dir.path(), 1)), last_start as u64);
        let mut w = store.writer(1).unwrap();
        assert_eq!(w.append(5000, &[payload(11, 4)]).unwrap(), 11..12);
        w.sync().unwrap();
        drop(w);
        drop(store);
        let store = Store::open(dir.path(), small_index(e)).unwrap();
        let all = read_all(&store, 1);
        assert_eq!(all.len(), 12);
        assert_eq!(all[11].payload, payload(11, 4));
    }
}
}

on_both! {
fn zeroed_tail_is_cut(e: &Env) {
    let src = e.tempdir();
    let (records, good) = {
        let store = Store::open(src.path(), small_index(e)).unwrap();
        let records = fill(&store, 1, 5, 30, 5);
        (records, store.info(1).unwrap().size_bytes as usize)
    };
    let mut bytes = e.read(&seg_path(src.path(), 1));
    bytes.resize(good + 4096, 0);
    e.write(&seg_path(src.path(), 1), &bytes);
    let store = Store::open(src.path(), small_index(e)).unwrap();
    assert_eq!(read_all(&store, 1), records);
    assert_eq!(e.len(&seg_path(src.path(), 1)), good as u64);
}
}

on_both! {
fn space_reserved_ahead_of_the_records_is_cut_on_reopen_and_given_back_on_seal(e: &Env) {
    let dir = e.tempdir();
    let config = Config { preallocate_bytes: 4096, ..small_index(e) };
    let file_len = || e.len(&seg_path(dir.path(), 1));
    let first = {
        let store = Store::open(dir.path(), config.clone()).unwrap();
        let records = fill(&store, 1, 5, 30, 5);
        assert_eq!(file_len(), 4096, "one step reserved");
        assert!(store.info(1).unwrap().size_bytes < 4096);
        records
    };
    // As after a crash: the reserve is zeros after the last record.
    let store = Store::open(dir.path(), config.clone()).unwrap();
    assert_eq!(read_all(&store, 1), first);
    assert_eq!(file_len(), store.info(1).unwrap().size_bytes, "reserve cut on reopen");
    let mut w = store.writer(1).unwrap();
    // 200 records of 54 bytes of frame cross two more 4 KiB steps.
    for o in 5..205 {
        w.append(2000, &[payload(o, 30)]).unwrap();
    }
    w.sync().unwrap();
    let size = store.info(1).unwrap().size_bytes;
    assert_eq!(file_len(), size.div_ceil(4096) * 4096, "reserved in whole steps past the end");
    let info = w.seal().unwrap();
    assert_eq!(file_len(), info.size_bytes, "a sealed file ends with its trailer");
    drop(store);
    let store = Store::open(dir.path(), config).unwrap();
    let info = store.info(1).unwrap();
    assert!(info.sealed);
    assert_eq!(info.next_offset, 205);
    assert_eq!(read_all(&store, 1)[..5], first[..]);
}
}

on_both! {
fn the_reserve_grows_with_the_file_up_to_the_preallocation_step(e: &Env) {
    const KIB: u64 = 1024;
    let dir = e.tempdir();
    let store = Store::open(dir.path(), Config { preallocate_bytes: 1024 * KIB, ..small_index(e) }).unwrap();
    let file_len = || e.len(&seg_path(dir.path(), 1));
    let mut w = store.create(1).unwrap();
    w.append(1000, &[payload(0, 100)]).unwrap();
    assert_eq!(file_len(), 64 * KIB, "a quiet segment reserves the smallest step");
    let mut o = 1;
    // 1 KiB records up to about 200 KiB, then 1.5 MiB.
    for (until, reserved) in [(200 * KIB, 256 * KIB), (1536 * KIB, 2048 * KIB)] {
        while w.size_bytes() < until {
            w.append(1000, &[payload(o, 1000)]).unwrap();
            o += 1;
        }
        assert_eq!(file_len(), reserved, "about as much reserved as written, in whole steps, at most 1 MiB at a time");
    }
}
}

/// Descriptors of this process open on files under `dir` (none on the simulated disk,
/// whose files are not the operating system's).
fn fds_under(dir: &Path) -> usize {
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else { return 0 };
    fds.flatten().filter(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target.starts_with(dir))).count()
}

on_both! {
fn idle_segments_beyond_the_limit_close_their_files_and_reopen_on_the_next_write(e: &Env) {
    let dir = e.tempdir();
    let config = Config { open_segments_max: 2, ..small_index(e) };
    let store = Store::open(dir.path(), config.clone()).unwrap();
    let mut writers: Vec<crate::SegmentWriter> = (1..=5).map(|id| store.create(id).unwrap()).collect();
    let mut expected: Vec<Vec<Record>> = vec![Vec::new(); 5];
    let write = |w: &mut crate::SegmentWriter, expected: &mut Vec<Record>, sync: bool| {
        let offset = w.next_offset();
        w.append(1000 + offset as i64, &[payload(offset, 50)]).unwrap();
        if sync {
            w.sync().unwrap();
        }
        expected.push(Record { offset, timestamp_ms: 1000 + offset as i64, payload: payload(offset, 50) });
    };
    // Segment 1 has a record not synced: it keeps its files whatever the others do.
    write(&mut writers[0], &mut expected[0], false);
    for i in 1..5 {
        write(&mut writers[i], &mut expected[i], true);
    }
    assert_eq!(store.open_segments(), 2);
    assert!(store.holds_files_of(1), "the segment with a record not synced keeps its files");
    assert!(store.holds_files_of(5), "the most recently written keeps its files");
    assert!(fds_under(dir.path()) <= 4, "two files each: {}", fds_under(dir.path()));
    writers[0].sync().unwrap();
    // Every segment is written again, the closed ones reopened; all read back whole.
    for round in 0..3 {
        for i in [round % 5, 4, 0, 2] {
            write(&mut writers[i], &mut expected[i], true);
            assert!(store.open_segments() <= 2, "{}", store.open_segments());
        }
    }
    for (i, records) in expected.iter().enumerate() {
        assert_eq!(&read_all(&store, i as u64 + 1), records, "segment {}", i + 1);
    }
    let sealed = writers.remove(3).seal().unwrap();
    assert!(sealed.sealed);
    drop(writers);
    drop(store);
    let store = Store::open(dir.path(), config).unwrap();
    assert!(store.open_segments() <= 2, "at most the limit open after a restart: {}", store.open_segments());
    for (i, records) in expected.iter().enumerate() {
        assert_eq!(&read_all(&store, i as u64 + 1), records, "segment {} after a restart", i + 1);
    }
}
}

on_both! {
fn without_a_reserve_the_file_ends_at_the_last_record(e: &Env) {
    let dir = e.tempdir();
    let store = Store::open(dir.path(), Config { preallocate_bytes: 0, ..small_index(e) }).unwrap();
    fill(&store, 1, 50, 30, 7);
    assert_eq!(e.len(&seg_path(dir.path(), 1)), store.info(1).unwrap().size_bytes);
}
}

on_both! {
fn flipped_bit_in_the_middle_of_an_unsealed_segment_truncates_there(e: &Env) {
    let dir = e.tempdir();
    let records = {
        let store = Store::open(dir.path(), small_index(e)).unwrap();
        fill(&store, 1, 20, 40, 4)
    };
    let positions = record_positions(&records);
    let path = seg_path(dir.path(), 1);
    let mut bytes = e.read(&path);
    bytes[positions[10] as usize + FRAME_HEADER_LEN + 7] ^= 0x10;
    e.write(&path, &bytes);
    let store = Store::open(dir.path(), small_index(e)).unwrap();
    let info = store.info(1).unwrap();
    assert_eq!(info.next_offset, 10);
    assert_eq!(info.size_bytes, positions[10]);
    assert_eq!(info.checksum, file_checksum(e, dir.path(), 1, positions[10] as usize));
    assert_eq!(read_all(&store, 1), records[..10].to_vec());
    assert_eq!(store.writer(1).unwrap().append(1, &[payload(10, 1)]).unwrap(), 10..11);
}
}

on_both! {
fn out_of_sequence_offset_truncates_there(e: &Env) {
    let dir = e.tempdir();
    let records = {
        let store = Store::open(dir.path(), small_index(e)).unwrap();
        fill(&store, 1, 6, 10, 6)
    };
    // Re-frame record 3 with offset 7 (valid checksum).
    let positions = record_positions(&records);
    let path = seg_path(dir.path(), 1);
    let mut bytes = e.read(&path);
    let mut frame = Vec::new();
    crate::codec::encode_record(&mut frame, &Record { offset: 7, ..records[3].clone() });
    let at = positions[3] as usize;
    bytes[at..at + frame.len()].copy_from_slice(&frame);
    e.write(&path, &bytes);
    let store = Store::open(dir.path(), small_index(e)).unwrap();
    assert_eq!(read_all(&store, 1), records[..3].to_vec());
}
}

on_both! {
fn sealed_segment_reopens_trusted_and_read_only(e: &Env) {
    let dir = e.tempdir();
    let (records, sealed) = {
        let store = Store::open(dir.path(), small_index(e)).unwrap();
        let records = fill(&store, 9, 30, 25, 4);
        let info = store.writer(9).unwrap().seal().unwrap();
        (records, info)
    };
    let records_end = FILE_HEADER_LEN + 30 * (FRAME_HEADER_LEN + 25);
    assert!(sealed.sealed);
    assert_eq!(sealed.next_offset, 30);
    assert_eq!(sealed.size_bytes, (records_end + crate::codec::TRAILER_LEN) as u64);
    assert_eq!(sealed.checksum, file_checksum(e, dir.path(), 9, records_end));
    let store = Store::open(dir.path(), small_index(e)).unwrap();
    assert_eq!(store.info(9).unwrap(), sealed);
    assert_eq!(read_all(&store, 9), records);
    assert_eq!(store.reader(9).unwrap().offset_for_time(1003).unwrap(), 12);
    assert!(matches!(store.writer(9), Err(StorageError::Sealed { id: 9 })));
    assert!(matches!(store.create(9), Err(StorageError::AlreadyExists { id: 9 })));
}
}

on_both! {
fn empty_segment_seals_and_reopens(e: &Env) {
    let dir = e.tempdir();
    {
        let store = Store::open(dir.path(), small_index(e)).unwrap();
        let info = store.create(1).unwrap().seal().unwrap();
        assert_eq!((info.next_offset, info.checksum, info.sealed), (0, 0, true));
    }
    let store = Store::open(dir.path(), small_index(e)).unwrap();
    assert!(store.info(1).unwrap().sealed);
    assert!(read_all(&store, 1).is_empty());
}
}

on_both! {
fn torn_seal_trailer_leaves_an_unsealed_segment_that_can_be_sealed_again(e: &Env) {
    let src = e.tempdir();
    let records = {
        let store = Store::open(src.path(), small_index(e)).unwrap();
        let records = fill(&store, 1, 10, 10, 10);
        store.writer(1).unwrap().seal().unwrap();
        records
    };
    let full = e.len(&seg_path(src.path(), 1)) as usize;
    for cut in full - crate::codec::TRAILER_LEN + 1..full {
        let dir = cut_copy(e, src.path(), 1, cut);
        let store = Store::open(dir.path(), small_index(e)).unwrap();
        assert!(!store.info(1).unwrap().sealed);
        assert_eq!(read_all(&store, 1), records);
        assert!(store.writer(1).unwrap().seal().unwrap().sealed);
    }
}
}

on_both! {
fn a_payload_cannot_forge_a_seal_trailer(e: &Env) {
    let dir = e.tempdir();
    {
        let store = Store::open(dir.path(), small_index(e)).unwrap();
        let mut w = store.create(1).unwrap();
        // A payload ending with a trailer whose sizes fit the file, but not the nonce.
        let records_len = FRAME_HEADER_LEN as u64 + 40;
        let mut fake = vec![0u8; 0];
        encode_trailer(&mut fake, &SealTrailer { nonce: 0, record_count: 1, records_len, checksum: 0 });
        assert_eq!(fake.len(), 40);
        w.append(1, &[Bytes::new()]).unwrap();
        w.append(1, &[Bytes::from(fake)]).unwrap();
        w.sync().unwrap();
    }
    let store = Store::open(dir.path(), small_index(e)).unwrap();
    let info = store.info(1).unwrap();
    assert!(!info.sealed);
    assert_eq!(info.next_offset, 2);
}
}

on_both! {
fn index_is_rebuilt_when_missing_or_damaged(e: &Env) {
    let dir = e.tempdir();
    let records = {
        let store = Store::open(dir.path(), small_index(e)).unwrap();
        let records = fill(&store, 4, 80, 33, 3);
        store.writer(4).unwrap().seal().unwrap();
        records
    };
    let idx = idx_path(dir.path(), 4);
    let original = e.read(&idx);
    assert!(original.len() > FILE_HEADER_LEN + 10 * INDEX_ENTRY_LEN, "the test needs a real index");
    assert_eq!((original.len() - FILE_HEADER_LEN) % INDEX_ENTRY_LEN, 0);

    type Damage = fn(&mut Vec<u8>);
    let damages: Vec<(&str, Damage)> = vec![
        ("missing", |_| {}),
        ("flipped bit", |b| b[FILE_HEADER_LEN + 3 * INDEX_ENTRY_LEN + 5] ^= 1),
        ("partial entry", |b| b.truncate(b.len() - 3)),
        ("bad header", |b| b[2] ^= 0xff),
        ("empty", |b| b.clear()),
        ("entries swapped", |b| {
            let (a, c) = (FILE_HEADER_LEN, FILE_HEADER_LEN + INDEX_ENTRY_LEN);
            let first: Vec<u8> = b[a..c].to_vec();
            let second: Vec<u8> = b[c..c + INDEX_ENTRY_LEN].to_vec();
            b[a..c].copy_from_slice(&second);
            b[c..c + INDEX_ENTRY_LEN].copy_from_slice(&first);
        }),
    ];
    for (what, damage) in damages {
        if what == "missing" {
            e.remove(&idx);
        } else {
            let mut bytes = original.clone();
            damage(&mut bytes);
            e.write(&idx, &bytes);
        }
        let store = Store::open(dir.path(), small_index(e)).unwrap();
        assert_eq!(e.read(&idx), original, "{what}: the index was not rebuilt");
        assert_eq!(read_all(&store, 4), records, "{what}");
        assert_eq!(store.reader(4).unwrap().read(50, 52, usize::MAX).unwrap(), records[50..52].to_vec());
    }
}
}

on_both! {
fn unsealed_index_is_rebuilt_from_the_records(e: &Env) {
    let dir = e.tempdir();
    let records = {
        let store = Store::open(dir.path(), small_index(e)).unwrap();
        fill(&store, 4, 80, 33, 3)
    };
    let idx = idx_path(dir.path(), 4);
    let original = e.read(&idx);
    e.write(&idx, b"garbage");
    let store = Store::open(dir.path(), small_index(e)).unwrap();
    assert_eq!(e.read(&idx), original);
    assert_eq!(store.reader(4).unwrap().read(60, 61, 0).unwrap(), records[60..61].to_vec());
}
}

on_both! {
fn reads_work_without_an_index_file(e: &Env) {
    let dir = e.tempdir();
    let store = Store::open(dir.path(), small_index(e)).unwrap();
    let records = fill(&store, 1, 50, 20, 5);
    store.writer(1).unwrap().seal().unwrap();
    e.remove(&idx_path(dir.path(), 1));
    // The sealed segment's files are opened on demand: no index now.
    let r = store.reader(1).unwrap();
    assert_eq!(r.read(33, 35, usize::MAX).unwrap(), records[33..35].to_vec());
    assert_eq!(r.offset_for_time(1005).unwrap(), 25);
}
}

on_both! {
fn offset_for_time_finds_the_first_record_at_or_after(e: &Env) {
    let dir = e.tempdir();
    let store = Store::open(dir.path(), small_index(e)).unwrap();
    let records = fill(&store, 1, 200, 30, 7);
    let r = store.reader(1).unwrap();
    for ts in 990..1040 {
        let want = records.iter().find(|x| x.timestamp_ms >= ts).map_or(200, |x| x.offset);
        assert_eq!(r.offset_for_time(ts).unwrap(), want, "ts {ts}");
    }
    assert_eq!(r.offset_for_time(i64::MIN).unwrap(), 0);
    assert_eq!(r.offset_for_time(i64::MAX).unwrap(), 200);
    let dir2 = e.tempdir();
    let empty = Store::open(dir2.path(), small_index(e)).unwrap();
    let _w = empty.create(1).unwrap();
    assert_eq!(empty.reader(1).unwrap().offset_for_time(5).unwrap(), 0);
}
}

on_both! {
fn truncate_drops_records_durably(e: &Env) {
    let dir = e.tempdir();
    let records = {
        let store = Store::open(dir.path(), small_index(e)).unwrap();
        let records = fill(&store, 1, 50, 21, 6);
        let mut w = store.writer(1).unwrap();
        assert!(matches!(w.truncate(51), Err(StorageError::TruncatePastEnd { next_offset: 50, requested: 51, .. })));
        w.truncate(50).unwrap();
        w.truncate(30).unwrap();
        assert_eq!(w.next_offset(), 30);
        let positions = record_positions(&records);
        assert_eq!(w.size_bytes(), positions[30]);
        let info = store.info(1).unwrap();
        assert_eq!(info.next_offset, 30);
        assert_eq!(info.checksum, file_checksum(e, dir.path(), 1, positions[30] as usize));
        assert_eq!(read_all(&store, 1), records[..30].to_vec());
        assert_eq!(w.append(2000, &[payload(30, 3)]).unwrap(), 30..31);
        w.sync().unwrap();
        records
    };
    let store = Store::open(dir.path(), small_index(e)).unwrap();
    let all = read_all(&store, 1);
    assert_eq!(all[..30], records[..30]);
    assert_eq!(all[30], Record { offset: 30, timestamp_ms: 2000, payload: payload(30, 3) });
    assert_eq!(all.len(), 31);
    let mut w = store.writer(1).unwrap();
    w.truncate(0).unwrap();
    assert!(read_all(&store, 1).is_empty());
    assert_eq!(store.info(1).unwrap().checksum, 0);
    assert_eq!(w.append(1, &[payload(0, 1)]).unwrap(), 0..1);
}
}

on_both! {
fn append_records_keeps_offsets_and_timestamps(e: &Env) {
    let dir = e.tempdir();
    let store = Store::open(dir.path(), small_index(e)).unwrap();
    let records = fill(&store, 1, 30, 12, 4);
    let mut replica = store.create(2).unwrap();
    let err = replica.append_records(&records[1..3]).unwrap_err();
    assert!(matches!(err, StorageError::OffsetMismatch { id: 2, expected: 0, got: 1 }));
    let gap = [records[0].clone(), records[2].clone()];
    assert!(matches!(replica.append_records(&gap), Err(StorageError::OffsetMismatch { expected: 1, got: 2, .. })));
    replica.append_records(&records[..10]).unwrap();
    replica.append_records(&records[10..]).unwrap();
    replica.append_records(&[]).unwrap();
    assert_eq!(read_all(&store, 2), records);
    assert_eq!(store.info(2).unwrap().checksum, store.info(1).unwrap().checksum);
}
}

on_both! {
fn syncer_works_beside_the_writer(e: &Env) {
    let dir = e.tempdir();
    let store = Store::open(dir.path(), small_index(e)).unwrap();
    let mut w = store.create(1).unwrap();
    let syncer = w.syncer();
    assert_eq!(syncer.sync().unwrap(), 0);
    w.append(1, &[payload(0, 10), payload(1, 10)]).unwrap();
    let handle = std::thread::spawn({
        let syncer = syncer.clone();
        move || syncer.sync().unwrap()
    });
    let durable = handle.join().unwrap();
    assert_eq!(durable, 2);
    w.append(1, &[payload(2, 10)]).unwrap();
    assert_eq!(syncer.sync().unwrap(), 3);
    assert_eq!(syncer.sync().unwrap(), 3);
    w.seal().unwrap();
    assert_eq!(syncer.sync().unwrap(), 3);
}
}

on_both! {
fn delete_removes_files_and_live_handles_notice(e: &Env) {
    let dir = e.tempdir();
    let store = Store::open(dir.path(), small_index(e)).unwrap();
    let records = fill(&store, 1, 5, 10, 5);
    let reader = store.reader(1).unwrap();
    let mut w = store.writer(1).unwrap();
    store.delete(1).unwrap();
    assert!(!e.exists(&seg_path(dir.path(), 1)));
    assert!(!e.exists(&idx_path(dir.path(), 1)));
    assert!(matches!(store.delete(1), Err(StorageError::NotFound { id: 1 })));
    assert!(store.info(1).is_none());
    assert!(matches!(w.append(1, &[payload(5, 1)]), Err(StorageError::NotFound { id: 1 })));
    assert!(matches!(w.sync(), Err(StorageError::NotFound { id: 1 })));
    // An existing reader still reads the removed file.
    assert_eq!(reader.read(0, u64::MAX, usize::MAX).unwrap(), records);
    drop(w);
    // The id can be used again.
    store.create(1).unwrap();
    assert!(read_all(&store, 1).is_empty());
}
}

on_both! {
fn creation_cut_short_is_recreated_empty(e: &Env) {
    for len in [0, 5, FILE_HEADER_LEN] {
        let dir = e.tempdir();
        e.write(&seg_path(dir.path(), 8), vec![0u8; len]);
        let store = Store::open(dir.path(), small_index(e)).unwrap();
        assert_eq!(store.info(8).unwrap().next_offset, 0);
        let mut w = store.writer(8).unwrap();
        w.append(1, &[payload(0, 3)]).unwrap();
        let bytes = e.read(&seg_path(dir.path(), 8));
        assert!(matches!(decode_header(&bytes), Ok(Decoded::Complete(h, _)) if h.segment_id == 8));
    }
}
}

/// Segments 1 and 2 sealed, 3 unsealed, each with records; returns their records.
fn three_segments(e: &Env, dir: &Path) -> Vec<Vec<Record>> {
    let store = Store::open(dir, small_index(e)).unwrap();
    let one = fill(&store, 1, 30, 25, 4);
    store.writer(1).unwrap().seal().unwrap();
    let two = fill(&store, 2, 30, 25, 4);
    store.writer(2).unwrap().seal().unwrap();
    let three = fill(&store, 3, 10, 25, 4);
    vec![one, two, three]
}

fn flip(e: &Env, path: &Path, position: usize) -> Vec<u8> {
    let mut bytes = e.read(path);
    bytes[position] ^= 0x04;
    e.write(path, &bytes);
    bytes
}

/// The store opened, serves every segment but `bad` exactly as written, and has set
/// `bad`'s files aside with their bytes (`seg_bytes`) intact.
fn assert_quarantined(e: &Env, dir: &Path, records: &[Vec<Record>], bad: u64, seg_bytes: &[u8]) -> Store {
    let store = Store::open(dir, small_index(e)).unwrap();
    let ids: Vec<u64> = store.list().iter().map(|i| i.id).collect();
    let good: Vec<u64> = (1..=records.len() as u64).filter(|id| *id != bad).collect();
    assert_eq!(ids, good, "the damaged segment is not listed");
    for id in good {
        assert_eq!(read_all(&store, id), records[id as usize - 1], "segment {id}");
    }
    assert!(store.info(bad).is_none());
    assert!(matches!(store.reader(bad), Err(StorageError::NotFound { .. })));
    assert!(!e.exists(&seg_path(dir, bad)) && !e.exists(&idx_path(dir, bad)), "renamed away");
    let q = store.quarantined();
    assert_eq!(q.len(), 1, "{q:?}");
    assert_eq!(q[0].id, bad);
    assert!(!q[0].reason.is_empty());
    assert_eq!(q[0].files.len(), 2, "segment and index: {q:?}");
    let seg_name = q[0].files[0].file_name().unwrap().to_str().unwrap().to_string();
    assert!(seg_name.starts_with(&format!("{}.corrupt-", segment_file_name(bad))), "{seg_name}");
    assert_eq!(e.read(&q[0].files[0]), seg_bytes, "the damaged bytes are kept as they were");
    store
}

on_both! {
fn damaged_header_quarantines_the_segment_and_the_rest_opens(e: &Env) {
    for bad in [1u64, 3] {
        let dir = e.tempdir();
        let records = three_segments(e, dir.path());
        let bytes = flip(e, &seg_path(dir.path(), bad), 3);
        let store = assert_quarantined(e, dir.path(), &records, bad, &bytes);
        assert!(store.quarantined()[0].reason.contains("header"), "{:?}", store.quarantined());
        // The id is free for a good copy, and the quarantined files stay out of the
        // store on the next open.
        let again = fill(&store, bad, 3, 5, 3);
        drop(store);
        let store = Store::open(dir.path(), small_index(e)).unwrap();
        assert_eq!(read_all(&store, bad), again);
        assert!(store.quarantined().is_empty());
        assert_eq!(e.count(dir.path()), 8, "3 segments, 3 indexes, 2 quarantined files");
    }
}
}

on_both! {
fn segment_file_of_a_newer_format_is_refused_never_quarantined(e: &Env) {
    // A newer release's segment (say, copied in by hand): its header is intact, with
    // a higher version and a checksum that holds. Setting it aside as damage would lose
    // its data on a downgrade; the store refuses to open instead and changes nothing.
    let dir = e.tempdir();
    three_segments(e, dir.path());
    let path = seg_path(dir.path(), 2);
    let mut bytes = e.read(&path);
    let newer = crate::codec::FORMAT_VERSION + 1;
    bytes[6..8].copy_from_slice(&newer.to_le_bytes());
    let crc = crate::durable::checksum(&bytes[..24]);
    bytes[24..28].copy_from_slice(&crc.to_le_bytes());
    e.write(&path, &bytes);
    let files_before = e.count(dir.path());
    let err = Store::open(dir.path(), small_index(e)).map(|_| ()).unwrap_err();
    assert!(
        matches!(&err, StorageError::NewerFormat { id: 2, version, .. } if *version == newer),
        "{err}"
    );
    let msg = err.to_string();
    assert!(msg.contains(&path.display().to_string()) && msg.contains("newer than this binary reads"), "{msg}");
    assert_eq!(e.read(&path), bytes, "left as it was");
    assert_eq!(e.count(dir.path()), files_before, "nothing renamed aside");
    // The same bytes with a checksum that does not hold are damage, as before.
    let mut damaged = bytes.clone();
    damaged[24] ^= 1;
    e.write(&path, &damaged);
    let store = Store::open(dir.path(), small_index(e)).unwrap();
    assert_eq!(store.quarantined().len(), 1);
}
}

on_both! {
fn segment_file_under_another_ids_name_is_quarantined(e: &Env) {
    let dir = e.tempdir();
    let records = three_segments(e, dir.path());
    let bytes = e.read(&seg_path(dir.path(), 2));
    e.remove(&seg_path(dir.path(), 2));
    e.write(&seg_path(dir.path(), 4), &bytes);
    e.rename(&idx_path(dir.path(), 2), &idx_path(dir.path(), 4));
    let store = Store::open(dir.path(), small_index(e)).unwrap();
    assert_eq!(store.list().iter().map(|i| i.id).collect::<Vec<_>>(), vec![1, 3]);
    assert_eq!((read_all(&store, 1), read_all(&store, 3)), (records[0].clone(), records[2].clone()));
    assert_eq!(store.quarantined().len(), 1);
    assert_eq!(store.quarantined()[0].id, 4);
    assert_eq!(e.read(&store.quarantined()[0].files[0]), bytes);
}
}

on_both! {
fn damaged_seal_trailer_quarantines_the_segment(e: &Env) {
    let trailer = crate::codec::TRAILER_LEN;
    // Offsets inside the trailer: magic, record count, records length, checksum, its crc.
    for at in [0, 17, 25, 33, trailer - 2] {
        let dir = e.tempdir();
        let records = three_segments(e, dir.path());
        let path = seg_path(dir.path(), 2);
        let len = e.len(&path) as usize;
        let bytes = flip(e, &path, len - trailer + at);
        let store = assert_quarantined(e, dir.path(), &records, 2, &bytes);
        assert!(store.quarantined()[0].reason.contains("trailer"), "byte {at}: {:?}", store.quarantined());
    }
}
}

on_both! {
fn trailer_that_is_not_recognisably_the_segments_own_leaves_an_unsealed_segment(e: &Env) {
    let trailer = crate::codec::TRAILER_LEN;
    type Damage = fn(&mut [u8]);
    let damages: Vec<(&str, Damage)> = vec![
        // Without its nonce the bytes could be anything; the scan checks every record.
        ("nonce", |t| t[9] ^= 1),
        // A crash while sealing: the end of the trailer never reached the disk.
        ("torn", |t| t[20..].fill(0)),
    ];
    for (what, damage) in damages {
        let dir = e.tempdir();
        let records = three_segments(e, dir.path());
        let path = seg_path(dir.path(), 2);
        let mut bytes = e.read(&path);
        let len = bytes.len();
        damage(&mut bytes[len - trailer..]);
        e.write(&path, &bytes);
        let store = Store::open(dir.path(), small_index(e)).unwrap();
        assert!(store.quarantined().is_empty(), "{what}");
        let info = store.info(2).unwrap();
        assert!(!info.sealed, "{what}");
        assert_eq!(read_all(&store, 2), records[1], "{what}");
        assert!(store.writer(2).unwrap().seal().unwrap().sealed, "{what}");
    }
}
}

on_both! {
fn damaged_sealed_records_found_by_an_index_rebuild_quarantine_the_segment(e: &Env) {
    let dir = e.tempdir();
    let records = three_segments(e, dir.path());
    let positions = record_positions(&records[1]);
    let bytes = flip(e, &seg_path(dir.path(), 2), positions[17] as usize + FRAME_HEADER_LEN + 3);
    // With its index intact a sealed segment is trusted at open (no full rescan) ...
    {
        let store = Store::open(dir.path(), small_index(e)).unwrap();
        assert!(store.quarantined().is_empty());
        assert!(store.info(2).unwrap().sealed);
    }
    // ... but a rebuild of the index reads every record and sees the damage.
    e.remove(&idx_path(dir.path(), 2));
    let store = Store::open(dir.path(), small_index(e)).unwrap();
    assert_eq!(store.list().iter().map(|i| i.id).collect::<Vec<_>>(), vec![1, 3]);
    let q = store.quarantined();
    assert_eq!((q.len(), q[0].id, q[0].files.len()), (1, 2, 1), "no index to keep: {q:?}");
    assert!(q[0].reason.contains("offset 17"), "{q:?}");
    assert_eq!(e.read(&q[0].files[0]), bytes);
}
}

on_both! {
fn quarantine_after_a_failed_read_frees_the_id_and_keeps_the_bytes(e: &Env) {
    let dir = e.tempdir();
    let records = three_segments(e, dir.path());
    let positions = record_positions(&records[1]);
    let bytes = flip(e, &seg_path(dir.path(), 2), positions[17] as usize + FRAME_HEADER_LEN + 3);
    let store = Store::open(dir.path(), small_index(e)).unwrap();
    let reader = store.reader(2).unwrap();
    assert_eq!(reader.read(0, 17, usize::MAX).unwrap(), records[1][..17].to_vec());
    // A read across the damage serves the good records before it and stops there; the
    // next one meets the damage.
    assert_eq!(reader.read(10, u64::MAX, usize::MAX).unwrap(), records[1][10..17].to_vec());
    let err = reader.read(17, u64::MAX, usize::MAX).unwrap_err();
    assert!(matches!(err, StorageError::Corrupt { id: 2, .. }), "{err}");

    let q = store.quarantine(2, &err.to_string()).unwrap();
    assert_eq!(q.id, 2);
    assert_eq!(e.read(&q.files[0]), bytes);
    assert_eq!(store.quarantined(), vec![q]);
    assert!(store.info(2).is_none());
    assert!(!e.exists(&seg_path(dir.path(), 2)) && !e.exists(&idx_path(dir.path(), 2)));
    assert!(matches!(store.quarantine(2, "again"), Err(StorageError::NotFound { id: 2 })));
    // A live writer of a quarantined segment cannot write into the set-aside file.
    let mut w = store.writer(3).unwrap();
    store.quarantine(3, "test").unwrap();
    assert!(matches!(w.append(1, &[payload(10, 1)]), Err(StorageError::NotFound { id: 3 })));
    drop(w);
    // A fresh copy takes the id; the old reader still sees its old (renamed) file.
    let mut w = store.create(2).unwrap();
    w.append_records(&records[1]).unwrap();
    w.seal().unwrap();
    assert_eq!(read_all(&store, 2), records[1]);
    assert!(reader.read(18, u64::MAX, usize::MAX).is_ok());
    drop(store);
    let store = Store::open(dir.path(), small_index(e)).unwrap();
    assert_eq!(store.list().iter().map(|i| i.id).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(read_all(&store, 2), records[1]);
}
}

on_both! {
fn leftovers_of_interrupted_operations_are_cleaned_up(e: &Env) {
    let dir = e.tempdir();
    e.write(&idx_path(dir.path(), 3), b"orphan");
    e.write(&dir.path().join(format!("{}.tmp", index_file_name(4))), b"tmp");
    e.write(&dir.path().join("unrelated.txt"), b"keep");
    let store = Store::open(dir.path(), small_index(e)).unwrap();
    assert!(store.list().is_empty());
    assert!(!e.exists(&idx_path(dir.path(), 3)));
    assert!(!e.exists(&dir.path().join(format!("{}.tmp", index_file_name(4)))));
    assert!(e.exists(&dir.path().join("unrelated.txt")));
}
}

on_both! {
fn oversized_payload_is_refused(e: &Env) {
    let dir = e.tempdir();
    let store = Store::open(dir.path(), small_index(e)).unwrap();
    let mut w = store.create(1).unwrap();
    let big = Bytes::from(vec![0u8; crate::codec::RECORD_PAYLOAD_MAX_BYTES + 1]);
    assert!(matches!(w.append(1, &[big]), Err(StorageError::RecordTooLarge { .. })));
    assert_eq!(w.next_offset(), 0);
}
}

#[test]
fn store_handles_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Store>();
    send_sync::<crate::SegmentReader>();
    send_sync::<crate::Syncer>();
    send::<crate::SegmentWriter>();
}

on_both! {
fn concurrent_readers_see_whole_records_while_the_writer_appends_and_truncates(e: &Env) {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let dir = e.tempdir();
    let store = Store::open(dir.path(), small_index(e)).unwrap();
    let mut w = store.create(1).unwrap();
    let done = std::sync::Arc::new(AtomicBool::new(false));
    // Readers that have read once: the writer starts only then, so the reads overlap
    // its appends however the threads are scheduled on a loaded machine.
    let reading = std::sync::Arc::new(AtomicUsize::new(0));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let r = store.reader(1).unwrap();
            let (done, reading) = (done.clone(), reading.clone());
            std::thread::spawn(move || {
                let mut reads = 0;
                while !done.load(Ordering::Relaxed) {
                    let from = r.next_offset().saturating_sub(50);
                    let got = r.read(from, u64::MAX, 4000).unwrap();
                    for (o, rec) in (from..).zip(&got) {
                        assert_eq!(rec.offset, o);
                        assert_eq!(rec.payload, payload(o, (o % 90) as usize));
                    }
                    if reads == 0 {
                        reading.fetch_add(1, Ordering::Relaxed);
                    }
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while reading.load(Ordering::Relaxed) < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    for round in 0..300u64 {
        let next = w.next_offset();
        let payloads: Vec<Bytes> = (next..next + 5).map(|o| payload(o, (o % 90) as usize)).collect();
        w.append(round as i64, &payloads).unwrap();
        if round % 50 == 49 {
            w.truncate(w.next_offset() - 7).unwrap();
        }
    }
    done.store(true, Ordering::Relaxed);
    for r in readers {
        assert!(r.join().unwrap() > 0);
    }
}
}
