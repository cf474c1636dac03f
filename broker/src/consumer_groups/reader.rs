//! The group reader's decision core: which segments of the bound topics to read, from
//! where, and which records to hand the [`GroupBuffer`], in order. Plain data, no IO and
//! no time: the group task ([`super::task`]) fetches what [`Reader::next_fetches`]
//! asks for and reports it back with [`Reader::fetched`].
//!
//! One cursor per segment of the bound topics: the next offset to report, the records
//! read but not reported yet (the buffer was full), and whether the segment is being
//! read, was read to its end (closed), or had nothing new at the last read. Every
//! record is reported to the buffer exactly once, in offset order: offered when it
//! matches the group's bindings and is not older than `since`, skipped otherwise.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use eventtermq_proto::v1::Message;
use eventtermq_storage::Record;
use prost::Message as _;

use super::buffer::{Delivery, GroupBuffer, OfferError};
use super::matching;
use crate::cluster_state::{ConsumerGroupSpec, SegmentId, SegmentRecord};
use crate::replication::read::ReadResult;

/// Read position in one segment.
#[derive(Debug)]
struct Cursor {
    topic: Arc<str>,
    /// A binding of the topic takes every message: no need to decode one to match it.
    takes_all: bool,
    next: u64,
    /// Records read but not yet reported (the buffer was full).
    backlog: VecDeque<Record>,
    /// The last read found nothing new.
    idle: bool,
    /// Closed and read to its end.
    finished: bool,
    fetching: bool,
}

/// A read the group task should start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetch {
    pub segment_id: SegmentId,
    pub from: u64,
    /// The last read of this segment found nothing: do not ask again at once.
    pub idle: bool,
}

/// What the reader knows of the segments of one group's bound topics.
#[derive(Debug)]
pub struct Reader {
    namespace: String,
    spec: ConsumerGroupSpec,
    topics: BTreeSet<String>,
    /// Committed offsets when the group started: where a new cursor begins.
    start: BTreeMap<SegmentId, u64>,
    cursors: BTreeMap<SegmentId, Cursor>,
}

impl Reader {
    pub fn new(namespace: &str, spec: ConsumerGroupSpec, start: BTreeMap<SegmentId, u64>) -> Self {
        let topics = spec.bindings.iter().map(|b| b.topic.clone()).collect();
        Self { namespace: namespace.to_string(), spec, topics, start, cursors: BTreeMap::new() }
    }

    /// The cluster's segments now: those of the bound topics get a cursor (from the
    /// committed offset), cursors of segments that are gone (retention, a deleted
    /// topic) are dropped and the buffer forgets them.
    pub fn segments_changed<'a>(
        &mut self,
        segments: impl IntoIterator<Item = (SegmentId, &'a SegmentRecord)>,
        buffer: &mut GroupBuffer,
    ) {
        let ours: BTreeMap<SegmentId, &SegmentRecord> = segments
            .into_iter()
            .filter(|(_, s)| s.namespace == self.namespace && self.topics.contains(&s.topic))
            .collect();
        self.cursors.retain(|id, _| {
            let keep = ours.contains_key(id);
            if !keep {
                buffer.forget_segment(*id);
            }
            keep
        });
        for (id, s) in ours {
            let bindings = &self.spec.bindings;
            self.cursors.entry(id).or_insert_with(|| Cursor {
                takes_all: bindings.iter().any(|b| b.topic == s.topic && matching::matches_every_message(b)),
                topic: s.topic.as_str().into(),
                next: self.start.get(&id).copied().unwrap_or(0),
                backlog: VecDeque::new(),
                idle: false,
                finished: false,
                fetching: false,
            });
        }
    }

    /// The answer to a [`Fetch`] of `segment_id`: records, or `None` when the read
    /// failed (it is asked again, not at once).
    pub fn fetched(&mut self, segment_id: SegmentId, result: Option<ReadResult>, buffer: &mut GroupBuffer) {
        let Some(c) = self.cursors.get_mut(&segment_id) else { return };
        c.fetching = false;
        let Some(r) = result else {
            c.idle = true;
            return;
        };
        c.idle = r.records.is_empty();
        // A read may overlap what was reported (it started before a backlog emptied):
        // only what is new goes in.
        let next = c.backlog.back().map_or(c.next, |r| r.offset + 1);
        c.backlog.extend(r.records.into_iter().filter(|r| r.offset >= next));
        if r.closed && c.backlog.is_empty() && c.next >= r.end_offset {
            buffer.mark_read(segment_id, r.end_offset);
            c.finished = true;
        }
    }

    /// Reports backlogged records to the buffer while it has room, segment by segment
    /// in id order. An error means the reader and the buffer disagree on a position:
    /// a bug, logged by the caller; the record is not reported twice.
    pub fn feed(&mut self, buffer: &mut GroupBuffer) -> Vec<(SegmentId, OfferError)> {
        let mut errors = Vec::new();
        for (id, c) in self.cursors.iter_mut() {
            while buffer.free() > 0 {
                let Some(r) = c.backlog.pop_front() else { break };
                if r.offset < c.next {
                    continue;
                }
                c.next = r.offset + 1;
                let reported = if matches(&self.spec, c, &r) {
                    let d = Delivery { topic: c.topic.clone(), segment_id: *id, offset: r.offset, message: r.payload };
                    buffer.offer(d)
                } else {
                    buffer.skip(*id, r.offset)
                };
                if let Err(e) = reported {
                    errors.push((*id, e));
                }
            }
        }
        errors
    }

    /// The reads to start now: every segment with nothing backlogged that is neither
    /// being read nor finished, while the buffer has room.
    pub fn next_fetches(&mut self, buffer: &GroupBuffer) -> Vec<Fetch> {
        if buffer.free() == 0 {
            return Vec::new();
        }
        let mut out = Vec::new();
        for (id, c) in self.cursors.iter_mut() {
            if c.fetching || c.finished || !c.backlog.is_empty() {
                continue;
            }
            c.fetching = true;
            out.push(Fetch { segment_id: *id, from: c.next, idle: c.idle });
        }
        out
    }

    /// A fetch that was planned could not start (its segment is gone from the state).
    pub fn fetch_dropped(&mut self, segment_id: SegmentId) {
        if let Some(c) = self.cursors.get_mut(&segment_id) {
            c.fetching = false;
        }
    }

    /// Nothing to hand out and nothing new anywhere: every segment is finished or had
    /// nothing at its last read, with nothing backlogged.
    pub fn drained(&self, buffer: &GroupBuffer) -> bool {
        buffer.pending_len() == 0 && self.cursors.values().all(|c| c.finished || (c.idle && c.backlog.is_empty()))
    }
}

/// Whether record `r` of the cursor's segment goes to the group.
fn matches(spec: &ConsumerGroupSpec, c: &Cursor, r: &Record) -> bool {
    let since_ok = spec.since_unix_ms == 0 || r.timestamp_ms >= spec.since_unix_ms;
    since_ok
        && (c.takes_all || {
            let message = Message::decode(r.payload.clone()).unwrap_or_default();
            let bindings = spec.bindings.iter().filter(|b| *b.topic == *c.topic);
            matching::matches_any(bindings, &message.routing_key, &message.headers)
        })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use bytes::Bytes;
    use proptest::prelude::*;

    use super::*;
    use crate::cluster_state::{BindingSpec, ExchangeType, HeadersMatch, SegmentState};

    fn segment(topic: &str, open: bool) -> SegmentRecord {
        SegmentRecord {
            namespace: "default".into(),
            topic: topic.into(),
            shard: 0,
            generation: 1,
            state: if open { SegmentState::Open } else { SegmentState::Closed },
            primary: 1,
            replicas: vec![1],
            done: vec![1],
            next_offset: 0,
            size_bytes: 0,
            checksum: 0,
            created_unix_ms: 0,
            closed_unix_ms: 0,
            min_insync: 1,
        }
    }

    fn record(offset: u64, key: &str, timestamp_ms: i64) -> Record {
        let m = Message { routing_key: key.into(), ..Default::default() };
        Record { offset, timestamp_ms, payload: Bytes::from(m.encode_to_vec()) }
    }

    fn direct(topic: &str, key: &str) -> BindingSpec {
        BindingSpec {
            topic: topic.into(),
            exchange_type: ExchangeType::Direct,
            routing_key: key.into(),
            headers: Default::default(),
            headers_match: HeadersMatch::All,
        }
    }

    #[test]
    fn a_group_reads_only_its_topics_from_the_committed_offset() {
        let spec = ConsumerGroupSpec { bindings: vec![BindingSpec::fanout("t")], size: 10, since_unix_ms: 0 };
        let mut reader = Reader::new("default", spec, BTreeMap::from([(2, 5)]));
        let mut buffer = GroupBuffer::new(10, BTreeMap::from([(2, 5)]));
        let (t, other) = (segment("t", true), segment("u", true));
        reader.segments_changed([(2, &t), (3, &other)], &mut buffer);
        assert_eq!(reader.next_fetches(&buffer), [Fetch { segment_id: 2, from: 5, idle: false }]);
        assert!(reader.next_fetches(&buffer).is_empty(), "one read at a time");
        let r = ReadResult { records: vec![record(5, "", 0), record(6, "", 0)], end_offset: 7, closed: false };
        reader.fetched(2, Some(r), &mut buffer);
        assert!(reader.feed(&mut buffer).is_empty());
        assert_eq!(buffer.pending_len(), 2);
        assert_eq!(reader.next_fetches(&buffer), [Fetch { segment_id: 2, from: 7, idle: false }]);
        reader.segments_changed([(3, &other)], &mut buffer);
        assert!(reader.drained(&GroupBuffer::new(1, BTreeMap::new())), "no segment left to read");
    }

    #[test]
    fn since_and_bindings_decide_what_is_offered() {
        let spec = ConsumerGroupSpec { bindings: vec![direct("t", "a")], size: 10, since_unix_ms: 100 };
        let mut reader = Reader::new("default", spec, BTreeMap::new());
        let mut buffer = GroupBuffer::new(10, BTreeMap::new());
        let t = segment("t", false);
        reader.segments_changed([(1, &t)], &mut buffer);
        reader.next_fetches(&buffer);
        let records = vec![record(0, "a", 99), record(1, "b", 100), record(2, "a", 100)];
        reader.fetched(1, Some(ReadResult { records, end_offset: 3, closed: true }), &mut buffer);
        assert!(reader.feed(&mut buffer).is_empty());
        let sub = buffer.subscribe(0, true);
        let got: Vec<u64> = buffer.dispatch().into_iter().map(|(s, d)| (assert_eq!(s, sub), d.offset).1).collect();
        assert_eq!(got, [2]);
        reader.next_fetches(&buffer);
        reader.fetched(1, Some(ReadResult { records: vec![], end_offset: 3, closed: true }), &mut buffer);
        assert!(reader.next_fetches(&buffer).is_empty(), "finished");
        assert!(reader.drained(&buffer));
        assert_eq!(buffer.committed(), BTreeMap::from([(1, 3)]));
    }

    proptest! {
        /// Segments of random records (two routing keys, random timestamps), read in
        /// random slices that may overlap or fail, with a small buffer a subscriber
        /// drains: every matching record arrives exactly once, in offset order per
        /// segment, the buffer never reports the reader out of step, and once all is
        /// read and acked the committed offsets reach every segment's end.
        #[test]
        fn every_matching_record_arrives_once_in_order(
            lengths in prop::collection::vec(0..30u64, 1..4),
            keys in prop::collection::vec(any::<bool>(), 90),
            steps in prop::collection::vec((0..4usize, 1..8u64, 0..3u64, any::<bool>()), 1..200),
            size in 1..6usize,
        ) {
            let spec = ConsumerGroupSpec { bindings: vec![direct("t", "a")], size: size as u32, since_unix_ms: 0 };
            let mut reader = Reader::new("default", spec, BTreeMap::new());
            let mut buffer = GroupBuffer::new(size, BTreeMap::new());
            let sub = buffer.subscribe(0, true);
            let segs: Vec<SegmentRecord> = lengths.iter().map(|_| segment("t", false)).collect();
            let data: Vec<Vec<Record>> = lengths.iter().enumerate().map(|(s, n)| {
                (0..*n).map(|o| record(o, if keys[(s * 30 + o as usize) % keys.len()] { "a" } else { "b" }, 0)).collect()
            }).collect();
            reader.segments_changed(segs.iter().enumerate().map(|(i, s)| (i as SegmentId, s)), &mut buffer);
            let mut got: HashMap<SegmentId, Vec<u64>> = HashMap::new();
            let mut in_read: Vec<Fetch> = Vec::new();
            let run = |reader: &mut Reader, buffer: &mut GroupBuffer, got: &mut HashMap<SegmentId, Vec<u64>>,
                       in_read: &mut Vec<Fetch>| -> Result<(), TestCaseError> {
                // As the task does on every event: feed, hand out (auto-ack frees the
                // buffer), until nothing moves.
                loop {
                    prop_assert!(reader.feed(buffer).is_empty());
                    let handed = buffer.dispatch();
                    if handed.is_empty() { break; }
                    for (s, d) in handed {
                        prop_assert_eq!(s, sub);
                        got.entry(d.segment_id).or_default().push(d.offset);
                    }
                }
                in_read.extend(reader.next_fetches(buffer));
                Ok(())
            };
            run(&mut reader, &mut buffer, &mut got, &mut in_read)?;
            for (pick, len, back, fail) in steps {
                if in_read.is_empty() { break; }
                let f = in_read.remove(pick % in_read.len());
                let seg = f.segment_id as usize;
                let result = (!fail).then(|| {
                    let from = f.from.saturating_sub(back) as usize;
                    let records: Vec<Record> = data[seg].iter().skip(from).take(len as usize).cloned().collect();
                    ReadResult { records, end_offset: lengths[seg], closed: true }
                });
                reader.fetched(f.segment_id, result, &mut buffer);
                run(&mut reader, &mut buffer, &mut got, &mut in_read)?;
            }
            // Read everything that is left, in whole.
            for _ in 0..200 {
                let Some(f) = in_read.pop() else { break };
                let seg = f.segment_id as usize;
                let records: Vec<Record> = data[seg].iter().skip(f.from as usize).cloned().collect();
                reader.fetched(f.segment_id, Some(ReadResult { records, end_offset: lengths[seg], closed: true }), &mut buffer);
                run(&mut reader, &mut buffer, &mut got, &mut in_read)?;
            }
            prop_assert!(in_read.is_empty() && reader.drained(&buffer));
            for (seg, records) in data.iter().enumerate() {
                let want: Vec<u64> = records.iter().filter(|r| {
                    Message::decode(r.payload.clone()).unwrap().routing_key == "a"
                }).map(|r| r.offset).collect();
                prop_assert_eq!(got.remove(&(seg as SegmentId)).unwrap_or_default(), want);
                prop_assert_eq!(buffer.committed().get(&(seg as SegmentId)).copied().unwrap_or(0), lengths[seg]);
            }
        }
    }
}
