//! The simulated disk itself: what a power loss keeps and drops, faults, process death,
//! determinism; and the durable-file primitives and segments against its power losses.

use std::io;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::*;
use crate::durable;
use crate::{Config, Store};

fn p(s: &str) -> PathBuf {
    PathBuf::from(s)
}

/// A disk with `/d` created and made durable.
fn disk(seed: u64) -> SimFs {
    let fs = SimFs::new(seed);
    fs.create_dir_all(&p("/d")).unwrap();
    fs.sync_dir(Path::new("/")).unwrap();
    fs
}

fn write_file(fs: &SimFs, path: &str, bytes: &[u8]) -> Box<dyn FsFile> {
    let f = fs.open(&p(path), OpenMode::Create).unwrap();
    f.write_all_at(bytes, 0).unwrap();
    f
}

#[test]
fn synced_data_and_entries_survive_a_power_loss() {
    for seed in 0..50 {
        let fs = disk(seed);
        let f = write_file(&fs, "/d/a", b"hello");
        f.sync_data().unwrap();
        fs.sync_dir(&p("/d")).unwrap();
        drop(f);
        fs.power_loss();
        assert_eq!(fs.read(&p("/d/a")).unwrap(), b"hello", "seed {seed}");
    }
}

#[test]
fn unsynced_writes_are_lost_or_kept_as_a_prefix_and_the_last_may_be_torn() {
    let mut outcomes = std::collections::BTreeSet::new();
    for seed in 0..400 {
        let fs = disk(seed);
        let f = write_file(&fs, "/d/a", b"AAAA");
        f.sync_data().unwrap();
        fs.sync_dir(&p("/d")).unwrap();
        f.write_all_at(b"BBBB", 4).unwrap();
        f.write_all_at(b"CCCC", 8).unwrap();
        fs.power_loss();
        let got = fs.read(&p("/d/a")).unwrap();
        // What survives: the synced content, then some of the writes in order; the last
        // one that reached the disk may be cut anywhere, or end in zeros.
        let full = b"AAAABBBBCCCC";
        assert!(got.len() >= 4 && got.len() <= 12, "seed {seed}: {got:?}");
        let data_end = got.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
        assert_eq!(&got[..data_end], &full[..data_end], "seed {seed}: a prefix, {got:?}");
        assert!(got[data_end..].iter().all(|b| *b == 0), "seed {seed}");
        outcomes.insert(got);
    }
    assert!(outcomes.contains(b"AAAA".as_slice()), "sometimes everything unsynced is lost");
    assert!(outcomes.contains(b"AAAABBBBCCCC".as_slice()), "sometimes all of it reached the disk");
    assert!(outcomes.iter().any(|o| o.len() % 4 != 0), "sometimes a write is torn");
    assert!(outcomes.iter().any(|o| o.len() > 4 && o.ends_with(&[0])), "sometimes the size came without the data");
}

#[test]
fn a_new_file_needs_its_directory_synced() {
    let mut lost = 0;
    for seed in 0..100 {
        let fs = disk(seed);
        let f = write_file(&fs, "/d/new", b"data");
        f.sync_all().unwrap();
        fs.power_loss();
        match fs.read(&p("/d/new")) {
            Ok(bytes) => assert_eq!(bytes, b"data", "seed {seed}"),
            Err(e) => {
                assert_eq!(e.kind(), io::ErrorKind::NotFound);
                lost += 1;
            }
        }
    }
    assert!(lost > 10 && lost < 90, "a create without a directory fsync is sometimes lost: {lost} of 100");
}

#[test]
fn renames_and_removals_need_their_directory_synced() {
    let (mut undone, mut back) = (0, 0);
    for seed in 0..100 {
        let fs = disk(seed);
        fs.put_durable(&p("/d/x"), b"old").unwrap();
        fs.put_durable(&p("/d/gone"), b"was here").unwrap();
        let tmp = write_file(&fs, "/d/x.tmp", b"new");
        tmp.sync_all().unwrap();
        fs.rename(&p("/d/x.tmp"), &p("/d/x")).unwrap();
        fs.remove_file(&p("/d/gone")).unwrap();
        assert_eq!(fs.read(&p("/d/x")).unwrap(), b"new", "the process sees the rename at once");
        fs.power_loss();
        let x = fs.read(&p("/d/x")).unwrap();
        assert!(x == b"old" || x == b"new", "seed {seed}: old or new, never a mix: {x:?}");
        undone += usize::from(x == b"old");
        back += usize::from(fs.exists(&p("/d/gone")));
    }
    assert!(undone > 0 && back > 0, "unsynced renames are undone ({undone}) and removals come back ({back})");

    // Synced, they stay.
    let fs = disk(7);
    fs.put_durable(&p("/d/x"), b"old").unwrap();
    write_file(&fs, "/d/x.tmp", b"new").sync_all().unwrap();
    fs.rename(&p("/d/x.tmp"), &p("/d/x")).unwrap();
    fs.sync_dir(&p("/d")).unwrap();
    fs.power_loss();
    assert_eq!(fs.read(&p("/d/x")).unwrap(), b"new");
    assert!(!fs.exists(&p("/d/x.tmp")));
}

/// Found by the cluster simulation: a file created and renamed away, never synced,
/// then another file renamed over the name and some other directory synced, came back at a power loss as a name whose
/// file the disk had already freed (every write to it failed with EBADF).
#[test]
fn a_file_a_power_loss_brings_back_is_whole_and_usable() {
    let mut resurrected = 0;
    for seed in 0..100 {
        let fs = disk(seed);
        for content in [b"one", b"two"] {
            durable::replace_file_unsynced(&fs, &p("/d/x"), content).unwrap();
        }
        // Another directory's sync (it frees files nothing refers to any more).
        fs.sync_dir(Path::new("/")).unwrap();
        fs.power_loss();
        for name in ["/d/x", "/d/x.tmp"] {
            if !fs.exists(&p(name)) {
                continue;
            }
            resurrected += 1;
            // Unsynced: any of the contents, possibly torn, but readable.
            let got = fs.read(&p(name)).unwrap();
            assert!(got.len() <= 3, "seed {seed}: {name}: {got:?}");
            let f = fs.open(&p(name), OpenMode::Truncate).unwrap();
            f.write_all_at(b"three", 0).unwrap();
            assert_eq!(fs.read(&p(name)).unwrap(), b"three", "seed {seed}: {name}");
        }
    }
    assert!(resurrected > 0, "some power losses keep some of the names");
}

#[test]
fn a_directory_whose_entry_is_lost_takes_its_files_with_it() {
    let mut lost = 0;
    for seed in 0..60 {
        let fs = disk(seed);
        fs.create_dir_all(&p("/d/sub/deeper")).unwrap();
        // The new directories' own entries are not synced; their content is.
        fs.put_durable(&p("/d/sub/deeper/f"), b"x").unwrap();
        fs.power_loss();
        if !fs.exists(&p("/d/sub/deeper")) {
            assert!(!fs.exists(&p("/d/sub/deeper/f")), "seed {seed}");
            lost += 1;
        }
    }
    assert!(lost > 0);
    // `create_dir_durable` syncs every new level.
    for seed in 0..20 {
        let fs = disk(seed);
        durable::create_dir_durable(&fs, &p("/d/sub/deeper")).unwrap();
        fs.put_durable(&p("/d/sub/deeper/f"), b"x").unwrap();
        fs.power_loss();
        assert_eq!(fs.read(&p("/d/sub/deeper/f")).unwrap(), b"x", "seed {seed}");
    }
}

#[test]
fn a_dead_process_keeps_its_writes_and_loses_its_files_and_locks() {
    let fs = disk(1);
    let f = write_file(&fs, "/d/a", b"unsynced but in the page cache");
    let lock = fs.open(&p("/d/LOCK"), OpenMode::Create).unwrap();
    assert!(lock.try_lock_exclusive().unwrap());
    let other = fs.open(&p("/d/LOCK"), OpenMode::Create).unwrap();
    assert!(!other.try_lock_exclusive().unwrap(), "a second open file conflicts");
    drop(other);
    fs.process_died();
    assert_eq!(f.write_all_at(b"x", 0).unwrap_err().raw_os_error(), Some(EBADF));
    assert_eq!(f.sync_data().unwrap_err().raw_os_error(), Some(EBADF));
    assert_eq!(fs.read(&p("/d/a")).unwrap(), b"unsynced but in the page cache");
    let again = fs.open(&p("/d/LOCK"), OpenMode::Create).unwrap();
    assert!(again.try_lock_exclusive().unwrap(), "the lock died with its holder");
    drop(lock); // a stale handle's drop does not release the new holder's lock
    let third = fs.open(&p("/d/LOCK"), OpenMode::Create).unwrap();
    assert!(!third.try_lock_exclusive().unwrap());
    drop(again);
    assert!(third.try_lock_exclusive().unwrap(), "dropping the holder releases it");
}

#[test]
fn fault_rules_fail_what_they_match_after_skipping_some() {
    let fs = disk(1);
    fs.fail(FaultRule { path_contains: "seg".into(), ops: vec![FsOp::Sync], skip: 2, times: 1, error: FaultError::Io });
    let seg = write_file(&fs, "/d/1.seg", b"x");
    let other = write_file(&fs, "/d/other", b"x");
    for _ in 0..5 {
        other.sync_data().unwrap();
    }
    seg.sync_data().unwrap();
    seg.sync_data().unwrap();
    assert_eq!(seg.sync_data().unwrap_err().raw_os_error(), Some(EIO));
    seg.sync_data().unwrap();
    fs.fail(FaultRule::always("", FsOp::Write, FaultError::NoSpace));
    let e = other.write_all_at(b"y", 1).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::StorageFull);
    fs.clear_faults();
    other.write_all_at(b"y", 1).unwrap();
}

#[test]
fn a_full_disk_refuses_growth_and_reports_its_space() {
    let fs = disk(1);
    fs.set_capacity_bytes(100);
    let f = write_file(&fs, "/d/a", &[1u8; 60]);
    assert_eq!(fs.space(&p("/d")).unwrap(), Space { free_bytes: 40, total_bytes: 100 });
    assert_eq!(f.write_all_at(&[2u8; 50], 60).unwrap_err().kind(), io::ErrorKind::StorageFull);
    assert_eq!(f.allocate(0, 200).unwrap_err().kind(), io::ErrorKind::StorageFull);
    f.write_all_at(&[3u8; 10], 0).unwrap(); // no growth: fine
    f.set_len(20).unwrap();
    assert_eq!(fs.space(&p("/d")).unwrap().free_bytes, 80, "a cut gives space back");
    fs.remove_file(&p("/d/a")).unwrap();
    drop(f);
    fs.sync_dir(&p("/d")).unwrap();
    assert_eq!(fs.used_bytes(), 0, "a removed, closed file's space is free once the removal is durable");
}

#[test]
fn a_flipped_bit_is_on_the_disk_too() {
    let fs = disk(3);
    fs.put_durable(&p("/d/a"), &[0u8; 8]).unwrap();
    fs.flip_bit(&p("/d/a"), 13).unwrap();
    assert_eq!(fs.read(&p("/d/a")).unwrap(), [0, 0x20, 0, 0, 0, 0, 0, 0]);
    fs.power_loss();
    assert_eq!(fs.read(&p("/d/a")).unwrap(), [0, 0x20, 0, 0, 0, 0, 0, 0]);
    let (path, bit) = fs.flip_random_bit(|p| p.starts_with("/d")).unwrap();
    assert_eq!(path, p("/d/a"));
    assert!(bit < 64);
    assert!(fs.flip_random_bit(|p| p.starts_with("/nowhere")).is_none());
}

/// The same operations on disks with the same seed give the same bytes.
#[test]
fn a_seed_replays_exactly() {
    let run = |seed: u64| {
        let fs = disk(seed);
        let mut out = Vec::new();
        for round in 0..5u8 {
            let f = write_file(&fs, &format!("/d/f{round}"), &[round; 100]);
            f.write_all_at(&[round + 1; 50], 80).unwrap();
            if round % 2 == 0 {
                f.sync_data().unwrap();
            }
            out.push(fs.unique_u64(u64::from(round)));
            let report = fs.power_loss();
            out.push(report.file_ops_lost as u64);
            for (path, _) in fs.files() {
                out.extend(fs.read(&path).unwrap().iter().map(|b| u64::from(*b)));
            }
        }
        out
    };
    assert_eq!(run(42), run(42));
    assert_ne!(run(42), run(43));
}

/// An atomically replaced file holds the old or the new content after any power loss,
/// and the new one once `replace_file` returned; a record file is never damaged.
#[test]
fn atomic_replace_survives_power_loss_at_every_step() {
    for seed in 0..200 {
        let fs = disk(seed);
        let path = p("/d/vote");
        durable::write_record_file(&fs, &path, b"old").unwrap();
        // Cut the replace short after each of its steps (tmp written, synced, renamed).
        let steps = seed % 4;
        let tmp = durable::tmp_path(&path);
        let framed = {
            let mut v = Vec::new();
            durable::encode_record(b"new", &mut v).unwrap();
            v
        };
        if steps == 3 {
            durable::write_record_file(&fs, &path, b"new").unwrap();
        } else {
            let f = fs.open(&tmp, OpenMode::Truncate).unwrap();
            f.write_all_at(&framed, 0).unwrap();
            if steps >= 1 {
                f.sync_all().unwrap();
            }
            if steps >= 2 {
                fs.rename(&tmp, &path).unwrap();
            }
        }
        fs.power_loss();
        let got = durable::read_record_file(&fs, &path).unwrap().unwrap();
        if steps == 3 {
            assert_eq!(got, b"new", "seed {seed}: durable once the call returned");
        } else {
            assert!(got == b"old" || got == b"new", "seed {seed} steps {steps}: {got:?}");
        }
    }
}

/// After any power loss an append log holds every record whose append returned, in
/// order, and nothing but whole records.
#[test]
fn append_log_keeps_every_acknowledged_record() {
    for seed in 0..100 {
        let fs = disk(seed);
        let arc = fs.as_fs();
        let path = p("/d/log");
        let (mut log, _) = durable::AppendLog::open(arc.clone(), &path, |_, _| Ok(())).unwrap();
        let records: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i + 1; 1 + i as usize]).collect();
        let mut acked = 0;
        for (i, chunk) in records.chunks(3).enumerate() {
            // Some fsyncs fail: those records were never acknowledged.
            if i == (seed % 7) as usize {
                fs.fail(FaultRule {
                    path_contains: "log".into(),
                    ops: vec![FsOp::Sync],
                    skip: 0,
                    times: 1,
                    error: FaultError::Io,
                });
            }
            if log.append(chunk).is_ok() {
                acked += chunk.len();
            } else {
                break;
            }
        }
        drop(log);
        fs.power_loss();
        let mut got = Vec::new();
        let (_, _) = durable::AppendLog::open(arc, &path, |_, p| {
            got.push(p.to_vec());
            Ok(())
        })
        .unwrap();
        assert!(got.len() >= acked, "seed {seed}: {} of {acked} acknowledged records", got.len());
        assert_eq!(got[..], records[..got.len()], "seed {seed}");
    }
}

/// After any power loss a segment holds every record synced before it, as a prefix of
/// what was appended, whatever the disk kept of the rest; appends then go on.
#[test]
fn segments_keep_every_synced_record_through_power_losses() {
    let (mut lost_some, mut kept_unsynced) = (0, 0);
    for seed in 0..150 {
        let fs = disk(seed);
        let mut rng = SimRng::new(seed);
        let config = Config { index_interval_bytes: 64, preallocate_bytes: 512, fs: fs.as_fs(), ..Config::default() };
        let dir = p("/d/segments");
        let mut model: Vec<Bytes> = Vec::new();
        let mut synced = 0u64;
        for round in 0..4 {
            let store = Store::open(&dir, config.clone()).unwrap();
            let mut w = match store.writer(1) {
                Ok(w) => w,
                Err(_) => store.create(1).unwrap(),
            };
            let kept = w.next_offset();
            assert!(kept >= synced, "seed {seed} round {round}: {kept} records, {synced} were synced");
            let all = store.reader(1).unwrap().read(0, u64::MAX, usize::MAX).unwrap();
            let payloads: Vec<Bytes> = all.iter().map(|r| r.payload.clone()).collect();
            assert_eq!(payloads[..], model[..kept as usize], "seed {seed} round {round}: a prefix of the appends");
            lost_some += usize::from((kept as usize) < model.len());
            kept_unsynced += usize::from(kept > synced);
            model.truncate(kept as usize);
            synced = kept;
            for _ in 0..rng.between(1, 6) {
                let batch: Vec<Bytes> = (0..rng.between(1, 4))
                    .map(|_| Bytes::from(vec![rng.below(250) as u8 + 1; rng.between(1, 40) as usize]))
                    .collect();
                w.append(round, &batch).unwrap();
                model.extend(batch);
                if rng.chance(1, 2) {
                    synced = w.sync().unwrap();
                }
            }
            drop(w);
            drop(store);
            fs.power_loss();
        }
    }
    assert!(
        lost_some > 0 && kept_unsynced > 0,
        "power losses took unsynced records ({lost_some}) and left some ({kept_unsynced})"
    );
}
