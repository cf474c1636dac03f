//! Property test: random sequences of appends, replica appends, reads, time look-ups,
//! truncations, syncs and reopens agree with a plain vector of records.

use bytes::Bytes;
use eventtermq_storage::codec::encode_record;
use eventtermq_storage::{Config, Record, SegmentWriter, Store};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Append { ts_step: i64, sizes: Vec<usize> },
    AppendRecords { ts_step: i64, sizes: Vec<usize> },
    Read { from: u64, len: u64, max_bytes: usize },
    OffsetForTime { back: i64 },
    Truncate { back: u64 },
    Sync,
    Reopen,
}

fn sizes() -> impl Strategy<Value = Vec<usize>> {
    proptest::collection::vec(prop_oneof![4 => 0usize..64, 2 => 64usize..700, 1 => 2000usize..6000], 1..12)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0i64..3, sizes()).prop_map(|(ts_step, sizes)| Op::Append { ts_step, sizes }),
        2 => (0i64..3, sizes()).prop_map(|(ts_step, sizes)| Op::AppendRecords { ts_step, sizes }),
        5 => (0u64..200, 0u64..60, prop_oneof![Just(0usize), 0usize..3000, Just(usize::MAX)])
            .prop_map(|(from, len, max_bytes)| Op::Read { from, len, max_bytes }),
        2 => (-1i64..40).prop_map(|back| Op::OffsetForTime { back }),
        1 => (0u64..30).prop_map(|back| Op::Truncate { back }),
        1 => Just(Op::Sync),
        1 => Just(Op::Reopen),
    ]
}

fn payload(offset: u64, len: usize) -> Bytes {
    (0..len).map(|i| (offset as usize).wrapping_mul(7).wrapping_add(i) as u8).collect::<Vec<u8>>().into()
}

/// What `read` must return according to the model.
fn expected(model: &[Record], from: u64, until: u64, max_bytes: usize) -> Vec<Record> {
    let mut out: Vec<Record> = Vec::new();
    let mut total = 0usize;
    for r in model.iter().filter(|r| r.offset >= from && r.offset < until) {
        if !out.is_empty() && total + r.payload.len() > max_bytes {
            break;
        }
        total += r.payload.len();
        out.push(r.clone());
    }
    out
}

fn model_checksum(model: &[Record]) -> u32 {
    let mut frames = Vec::new();
    for r in model {
        encode_record(&mut frames, r);
    }
    crc32c::crc32c(&frames)
}

fn check_all(store: &Store, model: &[Record]) -> Result<(), TestCaseError> {
    let info = store.info(1).unwrap();
    prop_assert_eq!(info.next_offset, model.len() as u64);
    prop_assert_eq!(info.checksum, model_checksum(model));
    let all = store.reader(1).unwrap().read(0, u64::MAX, usize::MAX).unwrap();
    prop_assert_eq!(all, model.to_vec());
    Ok(())
}

fn run(interval: u32, ops: Vec<Op>, seal: bool) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let config = Config { index_interval_bytes: interval, ..Config::default() };
    let mut store = Store::open(dir.path(), config.clone()).unwrap();
    let mut writer: SegmentWriter = store.create(1).unwrap();
    let mut model: Vec<Record> = Vec::new();
    let mut ts = 100i64;
    for op in ops {
        match op {
            Op::Append { ts_step, sizes } => {
                ts += ts_step;
                let next = model.len() as u64;
                let payloads: Vec<Bytes> = sizes.iter().zip(next..).map(|(s, o)| payload(o, *s)).collect();
                let range = writer.append(ts, &payloads).unwrap();
                prop_assert_eq!(range, next..next + payloads.len() as u64);
                for (o, p) in (next..).zip(payloads) {
                    model.push(Record { offset: o, timestamp_ms: ts, payload: p });
                }
            }
            Op::AppendRecords { ts_step, sizes } => {
                let next = model.len() as u64;
                let records: Vec<Record> = sizes
                    .iter()
                    .zip(next..)
                    .map(|(s, o)| {
                        ts += ts_step;
                        Record { offset: o, timestamp_ms: ts, payload: payload(o, *s) }
                    })
                    .collect();
                writer.append_records(&records).unwrap();
                model.extend(records);
            }
            Op::Read { from, len, max_bytes } => {
                let reader = store.reader(1).unwrap();
                let got = reader.read(from, from + len, max_bytes).unwrap();
                prop_assert_eq!(got, expected(&model, from, from + len, max_bytes));
            }
            Op::OffsetForTime { back } => {
                let target = ts - back;
                let want = model.iter().find(|r| r.timestamp_ms >= target).map_or(model.len() as u64, |r| r.offset);
                prop_assert_eq!(store.reader(1).unwrap().offset_for_time(target).unwrap(), want);
            }
            Op::Truncate { back } => {
                let to = (model.len() as u64).saturating_sub(back);
                writer.truncate(to).unwrap();
                model.truncate(to as usize);
                check_all(&store, &model)?;
            }
            Op::Sync => {
                prop_assert_eq!(writer.sync().unwrap(), model.len() as u64);
            }
            Op::Reopen => {
                drop(writer);
                drop(store);
                store = Store::open(dir.path(), config.clone()).unwrap();
                writer = store.writer(1).unwrap();
                check_all(&store, &model)?;
            }
        }
        prop_assert_eq!(writer.next_offset(), model.len() as u64);
    }
    check_all(&store, &model)?;
    if seal {
        let info = writer.seal().unwrap();
        prop_assert!(info.sealed);
        drop(store);
        let store = Store::open(dir.path(), config).unwrap();
        prop_assert_eq!(store.info(1).unwrap(), info);
        check_all(&store, &model)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn store_agrees_with_a_vector(
        interval in prop_oneof![Just(0u32), Just(64), Just(700), Just(4096)],
        ops in proptest::collection::vec(op(), 1..40),
        seal: bool,
    ) {
        run(interval, ops, seal)?;
    }
}
