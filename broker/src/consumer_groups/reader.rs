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
//!
//! **Order within a shard.** A shard's segments are its generations: a rotation or a
//! fail-over closes generation N and opens N+1, and a publisher that waited for its
//! confirmation in N may already be writing to N+1. So per shard only the oldest
//! segment that is not finished (closed and every record reported, or gone from the
//! state) is read and fed: the shard's *head*. No record of a later generation reaches
//! the buffer before every record of the earlier ones was offered or skipped, even
//! when the earlier one is slow to read (failed over, being sealed, read from another
//! node): the next generation waits, as a Kafka partition or a JetStream stream does.
//! Only segments in the state count, so one deleted by retention leaves a gap in the
//! generations that holds nothing back. Shards and topics are independent: each has
//! its own head, read and fed side by side.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use eventtermq_proto::v1::Message;
use eventtermq_storage::Record;
use prost::Message as _;

use super::buffer::{Delivery, GroupBuffer, OfferError};
use super::lag::SegmentLag;
use super::matching;
use crate::cluster_state::{ConsumerGroupSpec, SegmentId, SegmentRecord};
use crate::replication::read::ReadResult;

/// A shard of a bound topic.
type ShardKey = (Arc<str>, u32);

/// A segment's place in its shard's order: its generation, then its id should two
/// ever share a generation, so that the order is total.
type Place = (u32, SegmentId);

/// Read position in one segment.
#[derive(Debug)]
struct Cursor {
    topic: Arc<str>,
    shard: u32,
    generation: u32,
    /// A binding of the topic takes every message: no need to decode one to match it.
    takes_all: bool,
    next: u64,
    /// Records read but not yet reported (the buffer was full).
    backlog: VecDeque<Record>,
    /// The last read found nothing new.
    idle: bool,
    /// The segment is closed and its records end here (from the state or a read).
    end: Option<u64>,
    /// Closed and every record up to `end` reported.
    finished: bool,
    fetching: bool,
    /// The newest timestamp among the records reported: a binding added later whose
    /// `since` is not after it came too late for them (see [`Reader::spec_changed`]).
    latest_reported_ms: i64,
    /// Where a late binding's records may start: the first offset reported, and
    /// (timestamp, offset) of the first record of each second of the last
    /// [`REWIND_MARKS_MAX`] seconds reported.
    first_reported: Option<u64>,
    marks: VecDeque<(i64, u64)>,
    /// Records read again after a late binding.
    replay: Option<Replay>,
    /// The read on its way started at the group's `since` for the topic (this time)
    /// rather than at `next`: nothing was reported yet.
    seek_since_ms: i64,
    /// The highest end a read of the segment answered: for an open one, how far its
    /// primary had confirmed records then (what the group's lag counts up to).
    readable_end: u64,
}

/// A segment read again from before where it was because a binding came late: below
/// `until`, a record goes to the buffer only if it was outstanding (offered, not
/// acked) when the reading went back, or if it matches now and did not before.
#[derive(Debug)]
struct Replay {
    until: u64,
    outstanding: BTreeSet<u64>,
    before: ConsumerGroupSpec,
}

/// Seconds of (timestamp, offset) marks a cursor keeps to find where a late binding's
/// records start. A binding is late by the time its node takes to apply a write, well
/// under this; older ones read the segment again from where the cursor began.
const REWIND_MARKS_MAX: usize = 64;

impl Cursor {
    fn shard_key(&self) -> ShardKey {
        (self.topic.clone(), self.shard)
    }
}

/// See [`Reader::caught_up`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaughtUp {
    Yes,
    /// Records are still to be read or handed out.
    No,
    /// An open head's end is not among those given.
    Unknown,
}

/// A read the group task should start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetch {
    pub segment_id: SegmentId,
    pub from: u64,
    /// When > 0, the read starts at the first record stored at or after this time if
    /// that is past `from` (the records before are older than the group takes).
    pub since_unix_ms: i64,
    /// The last read of this segment found nothing: do not ask again at once.
    pub idle: bool,
}

/// How far the clock of the node that closed a segment may lag the clocks that stamped
/// its records: a segment closed this long before a group's `since` is skipped unread.
const SINCE_CLOCK_MARGIN_MS: i64 = 60_000;

/// What the reader knows of the segments of one group's bound topics.
#[derive(Debug)]
pub struct Reader {
    namespace: String,
    spec: ConsumerGroupSpec,
    topics: BTreeSet<String>,
    /// Committed offsets when the group started: where a new cursor begins.
    start: BTreeMap<SegmentId, u64>,
    /// Boxed: a map's node has room for 11 entries whatever it holds, and a cursor is
    /// 300 bytes, so a group reading one segment (the usual case) took 3.5 KiB.
    cursors: BTreeMap<SegmentId, Box<Cursor>>,
    /// Per shard, its segments that are not finished, in generation order: the first
    /// is the shard's head, the only one read and fed (see the module header). A
    /// finished segment leaves its set, so finding the heads costs one step per shard,
    /// not per segment, however many closed generations retention keeps.
    unfinished: BTreeMap<ShardKey, BTreeSet<Place>>,
}

impl Reader {
    pub fn new(namespace: &str, spec: ConsumerGroupSpec, start: BTreeMap<SegmentId, u64>) -> Self {
        let topics = spec.bindings.iter().map(|b| b.topic.clone()).collect();
        Self {
            namespace: namespace.to_string(),
            spec,
            topics,
            start,
            cursors: BTreeMap::new(),
            unfinished: BTreeMap::new(),
        }
    }

    /// The group's spec changed (a binding added or removed): matching follows it at
    /// once; the next [`Reader::segments_changed`] opens cursors on newly bound topics
    /// and drops those of topics no longer bound. A binding added with a `since` this
    /// reader has already passed (this node applied it after the records it takes
    /// were reported as skipped) makes the segments it concerns be read again from
    /// their committed offsets: what they hold unacknowledged comes again (acks of
    /// the earlier deliveries fail), nothing the new binding takes is missed.
    pub fn spec_changed(&mut self, spec: ConsumerGroupSpec, buffer: &mut GroupBuffer) {
        let added: Vec<_> =
            spec.bindings.iter().filter(|b| !self.spec.bindings.iter().any(|o| o.same_route(b))).cloned().collect();
        self.topics = spec.bindings.iter().map(|b| b.topic.clone()).collect();
        let before = std::mem::replace(&mut self.spec, spec);
        let takes_all: Vec<(SegmentId, bool)> =
            self.cursors.iter().map(|(id, c)| (*id, self.takes_all(&c.topic))).collect();
        for (id, all) in takes_all {
            if let Some(c) = self.cursors.get_mut(&id) {
                c.takes_all = all;
            }
        }
        let late: Vec<(SegmentId, i64)> = self
            .cursors
            .iter()
            .filter_map(|(id, c)| {
                let since = added
                    .iter()
                    .filter(|b| *b.topic == *c.topic && c.latest_reported_ms >= b.since_unix_ms)
                    .map(|b| b.since_unix_ms)
                    .min()?;
                Some((*id, since))
            })
            .collect();
        for (id, since) in late {
            self.rewind(id, since, &before, buffer);
        }
    }

    /// Reads a segment again from its last record before `since` (see [`Replay`]).
    fn rewind(&mut self, id: SegmentId, since: i64, before: &ConsumerGroupSpec, buffer: &mut GroupBuffer) {
        let Some(c) = self.cursors.get_mut(&id) else { return };
        let Some(first) = c.first_reported else { return };
        let from = c.marks.iter().rev().find(|(ts, _)| *ts < since).map_or(first, |(_, offset)| *offset);
        let mut outstanding = buffer.outstanding_offsets(id);
        buffer.forget_segment(id);
        let replay = match c.replay.take() {
            // Still replaying an earlier late binding: keep what it would still offer.
            Some(r) => Replay {
                until: r.until.max(c.next),
                outstanding: {
                    outstanding.extend(r.outstanding);
                    outstanding
                },
                before: r.before,
            },
            None => Replay { until: c.next, outstanding, before: before.clone() },
        };
        c.replay = Some(replay);
        c.next = from;
        c.backlog.clear();
        c.idle = false;
        c.marks.retain(|(_, offset)| *offset < from);
        if c.finished {
            c.finished = false;
            self.unfinished.entry(c.shard_key()).or_default().insert((c.generation, id));
        }
    }

    pub fn spec(&self) -> &ConsumerGroupSpec {
        &self.spec
    }

    fn takes_all(&self, topic: &str) -> bool {
        self.spec
            .bindings
            .iter()
            .any(|b| b.topic == topic && b.since_unix_ms == 0 && matching::matches_every_message(b))
    }

    /// The cluster's segments now: those of the bound topics get a cursor (from the
    /// committed offset), cursors of segments that are gone (retention, a deleted
    /// topic) are dropped and the buffer forgets them. A closed segment's end is known
    /// from the state, so one whose committed offset is already there is finished
    /// without a read: a group resuming after many generations does not read each of
    /// them once, one after another, before reaching the live one.
    pub fn segments_changed<'a>(
        &mut self,
        segments: impl IntoIterator<Item = (SegmentId, &'a SegmentRecord)>,
        buffer: &mut GroupBuffer,
    ) {
        let ours: BTreeMap<SegmentId, &SegmentRecord> = segments
            .into_iter()
            .filter(|(_, s)| s.namespace == self.namespace && self.topics.contains(&s.topic))
            .collect();
        let gone: Vec<SegmentId> = self.cursors.keys().filter(|id| !ours.contains_key(id)).copied().collect();
        for id in gone {
            if let Some(c) = self.cursors.remove(&id) {
                self.leave_order(&c, id);
            }
            buffer.forget_segment(id);
        }
        for (id, s) in ours {
            if !self.cursors.contains_key(&id) {
                let mut c = self.new_cursor(id, s);
                if !s.is_open() && !self.start.contains_key(&id) && self.closed_before_since(s) {
                    // Nothing in it is new enough for the group: finished unread (the
                    // time index in one step). A late binding reads it again whole.
                    c.next = s.next_offset;
                    c.first_reported = Some(0);
                    c.latest_reported_ms = s.closed_unix_ms;
                }
                self.unfinished.entry(c.shard_key()).or_default().insert((c.generation, id));
                self.cursors.insert(id, Box::new(c));
            }
            if let Some(c) = self.cursors.get_mut(&id).filter(|_| !s.is_open()) {
                c.end = Some(s.next_offset);
            }
            self.finish_if_read(id, buffer);
        }
    }

    /// Whether the closed segment `s` ended (by its close time, less a margin for the
    /// clocks of the nodes that wrote and closed it) before the earliest record the
    /// group takes from its topic: the group's `since`, and each binding's.
    fn closed_before_since(&self, s: &SegmentRecord) -> bool {
        let takes_from = self.takes_from(&s.topic);
        takes_from > 0 && s.closed_unix_ms.saturating_add(SINCE_CLOCK_MARGIN_MS) < takes_from
    }

    /// The time of the earliest record the group takes from `topic` (Unix ms; 0 for
    /// all): the later of the group's `since` and its earliest binding's.
    fn takes_from(&self, topic: &str) -> i64 {
        let bindings = self.spec.bindings.iter().filter(|b| b.topic == topic);
        let earliest_binding = bindings.map(|b| b.since_unix_ms).min().unwrap_or(0);
        self.spec.since_unix_ms.max(earliest_binding)
    }

    fn new_cursor(&self, id: SegmentId, s: &SegmentRecord) -> Cursor {
        Cursor {
            takes_all: self.takes_all(&s.topic),
            topic: s.topic.as_str().into(),
            shard: s.shard,
            generation: s.generation,
            next: self.start.get(&id).copied().unwrap_or(0),
            backlog: VecDeque::new(),
            idle: false,
            end: None,
            finished: false,
            fetching: false,
            latest_reported_ms: i64::MIN,
            first_reported: None,
            marks: VecDeque::new(),
            replay: None,
            seek_since_ms: 0,
            readable_end: 0,
        }
    }

    /// The answer to a [`Fetch`] of `segment_id`: records, or `None` when the read
    /// failed (it is asked again, not at once).
    pub fn fetched(&mut self, segment_id: SegmentId, result: Option<ReadResult>, buffer: &mut GroupBuffer) {
        let Some(topic) = self.cursors.get(&segment_id).map(|c| c.topic.clone()) else { return };
        let takes_from = self.takes_from(&topic);
        let Some(c) = self.cursors.get_mut(&segment_id) else { return };
        c.fetching = false;
        if c.finished {
            // The state said it was closed and read while this read was on its way.
            return;
        }
        let seek_since_ms = std::mem::take(&mut c.seek_since_ms);
        let Some(r) = result else {
            c.idle = true;
            return;
        };
        if r.start > c.next {
            // The read started at the group's `since` (see `next_fetches`): what lies
            // before was stored earlier, skipped unread. Unless a binding added
            // meanwhile takes from earlier: then it is read from `next` after all.
            if seek_since_ms == 0 || takes_from < seek_since_ms || c.first_reported.is_some() || !c.backlog.is_empty() {
                return;
            }
            c.first_reported = Some(c.next);
            c.latest_reported_ms = c.latest_reported_ms.max(seek_since_ms - 1);
            c.next = r.start;
            buffer.mark_read(segment_id, r.start);
        }
        if r.records.first().is_some_and(|first| first.offset > c.backlog.back().map_or(c.next, |b| b.offset + 1)) {
            // Started before a rewind: ask again from where the cursor is now.
            return;
        }
        c.idle = r.records.is_empty();
        c.readable_end = c.readable_end.max(r.end_offset);
        // A read may overlap what was reported (it started before a backlog emptied):
        // only what is new goes in.
        let next = c.backlog.back().map_or(c.next, |r| r.offset + 1);
        c.backlog.extend(r.records.into_iter().filter(|r| r.offset >= next));
        if r.closed {
            c.end = Some(r.end_offset);
        }
        self.finish_if_read(segment_id, buffer);
    }

    /// Reports backlogged records to the buffer while it has room, shard by shard,
    /// from each shard's head only. An error means the reader and the buffer disagree
    /// on a position: a bug, logged by the caller; the record is not reported twice.
    pub fn feed(&mut self, buffer: &mut GroupBuffer) -> Vec<(SegmentId, OfferError)> {
        let mut errors = Vec::new();
        let heads: Vec<SegmentId> = heads(&self.unfinished).collect();
        for id in heads {
            let Some(c) = self.cursors.get_mut(&id) else { continue };
            while buffer.free() > 0 {
                let Some(r) = c.backlog.pop_front() else { break };
                if r.offset < c.next {
                    continue;
                }
                c.next = r.offset + 1;
                note_reported(c, &r);
                let reported = if takes(&self.spec, c, &r) {
                    let d = Delivery {
                        topic: c.topic.clone(),
                        segment_id: id,
                        offset: r.offset,
                        timestamp_ms: r.timestamp_ms,
                        message: r.payload,
                        delivery_count: 0,
                        expiration_ms: None,
                        body_bytes: 0,
                    };
                    buffer.offer(d)
                } else {
                    buffer.skip(id, r.offset)
                };
                if let Err(e) = reported {
                    errors.push((id, e));
                }
            }
            // A closed head fed to its end hands over to the next generation now,
            // without another read to learn that nothing is left.
            self.finish_if_read(id, buffer);
        }
        errors
    }

    /// The reads to start now: each shard's head when it has nothing backlogged and is
    /// not being read, while the buffer has room.
    pub fn next_fetches(&mut self, buffer: &GroupBuffer) -> Vec<Fetch> {
        if buffer.free() == 0 {
            return Vec::new();
        }
        let mut out = Vec::new();
        let heads: Vec<SegmentId> = heads(&self.unfinished).collect();
        for id in heads {
            let Some(topic) = self.cursors.get(&id).map(|c| c.topic.clone()) else { continue };
            let takes_from = self.takes_from(&topic);
            let Some(c) = self.cursors.get_mut(&id) else { continue };
            if c.fetching || c.finished || !c.backlog.is_empty() {
                continue;
            }
            c.fetching = true;
            // Nothing reported yet: start at the first record the group takes, found
            // with the segment's time index, instead of reading every older one.
            c.seek_since_ms = if c.first_reported.is_none() { takes_from } else { 0 };
            out.push(Fetch { segment_id: id, from: c.next, since_unix_ms: c.seek_since_ms, idle: c.idle });
        }
        out
    }

    /// A fetch that was planned could not start (its segment is gone from the state).
    pub fn fetch_dropped(&mut self, segment_id: SegmentId) {
        if let Some(c) = self.cursors.get_mut(&segment_id) {
            c.fetching = false;
        }
    }

    /// Nothing to hand out and nothing new right now: every shard's head had nothing at
    /// its last read, with nothing backlogged. The generations behind a head wait for
    /// it, so they have nothing to hand out either.
    #[cfg(test)]
    pub fn drained(&self, buffer: &GroupBuffer) -> bool {
        buffer.pending_len() == 0
            && heads(&self.unfinished).all(|id| self.cursors.get(&id).is_none_or(|c| c.idle && c.backlog.is_empty()))
    }

    /// Every shard's head that is open, and where the reader is in it.
    pub fn open_heads(&self) -> Vec<(SegmentId, u64)> {
        let open = heads(&self.unfinished).filter_map(|id| self.cursors.get(&id).map(|c| (id, c)));
        open.filter(|(_, c)| c.end.is_none()).map(|(id, c)| (id, c.next)).collect()
    }

    /// Whether anything is left to hand out, as far as `ends` (how far each open head
    /// was confirmed at some moment) tell: [`CaughtUp::Yes`] once nothing waits in the
    /// buffer or a backlog, every open head was read to its end in `ends`, and every
    /// closed head found nothing at its last read (a closed segment's reads do not
    /// wait). The generations behind a head wait for it, so they have nothing to hand
    /// out either.
    pub fn caught_up(&self, buffer: &GroupBuffer, ends: &BTreeMap<SegmentId, u64>) -> CaughtUp {
        if buffer.pending_len() > 0 {
            return CaughtUp::No;
        }
        let mut unknown = false;
        for id in heads(&self.unfinished) {
            let Some(c) = self.cursors.get(&id) else { continue };
            let read = match (c.end, ends.get(&id)) {
                (Some(_), _) => c.idle,
                (None, Some(end)) => c.next >= *end,
                (None, None) => {
                    unknown = true;
                    true
                }
            };
            if !read || !c.backlog.is_empty() {
                return CaughtUp::No;
            }
        }
        if unknown {
            CaughtUp::Unknown
        } else {
            CaughtUp::Yes
        }
    }

    /// A read made only to learn how far an open segment is readable now (for its lag,
    /// while its records are not being read: behind a full buffer or an earlier
    /// generation).
    pub fn peeked(&mut self, segment_id: SegmentId, end_offset: u64) {
        if let Some(c) = self.cursors.get_mut(&segment_id) {
            c.readable_end = c.readable_end.max(end_offset);
        }
    }

    /// Open segments not being read now, and the offset to peek from: the reader's
    /// position or the end seen last, whichever is further.
    pub fn peeks_due(&self) -> Vec<(SegmentId, u64)> {
        let open = self.cursors.iter().filter(|(_, c)| c.end.is_none() && !c.fetching);
        open.map(|(id, c)| (*id, c.next.max(c.readable_end))).collect()
    }

    /// Where a purge needs each segment's end: `Ok(end)` of a closed one, `Err(from)`
    /// for an open one, whose end (how far its primary confirmed records) must be
    /// asked for, from this offset.
    pub fn purge_inputs(&self) -> Vec<(SegmentId, Result<u64, u64>)> {
        let cursors = self.cursors.iter();
        cursors.map(|(id, c)| (*id, c.end.ok_or(c.next.max(c.readable_end)))).collect()
    }

    /// A purge: every record below each segment's end in `ends` that waits for a
    /// subscriber is dropped as done, in the buffer and read ahead in the backlog, and
    /// what was not read yet below the end is passed unread (as a binding's `since`
    /// passes what is older). Records delivered and not acknowledged stay. Answers how
    /// many records the group held ready, counted as its lag counts them (what was not
    /// read yet counts whether or not it would have matched, see [`super::lag`]).
    pub fn purge(&mut self, ends: &BTreeMap<SegmentId, u64>, buffer: &mut GroupBuffer) -> u64 {
        let mut purged = buffer.purge_pending(ends) as u64;
        for (&id, &end) in ends {
            let Some(c) = self.cursors.get_mut(&id) else { continue };
            if c.next >= end {
                continue;
            }
            let mut read_to = c.next;
            while c.backlog.front().is_some_and(|r| r.offset < end) {
                let Some(r) = c.backlog.pop_front() else { break };
                purged += u64::from(matches(&self.spec, c, &r));
                read_to = r.offset + 1;
            }
            purged = purged.saturating_add(end.saturating_sub(read_to));
            c.first_reported.get_or_insert(c.next);
            c.next = end;
            c.readable_end = c.readable_end.max(end);
            c.idle = false;
            buffer.mark_read(id, end);
            self.finish_if_read(id, buffer);
        }
        purged
    }

    /// What the lag of the group needs to know of each segment of its bound topics in
    /// the state (see [`super::lag`]).
    pub fn lag_inputs(&self) -> Vec<SegmentLag> {
        let cursors = self.cursors.iter();
        cursors
            .map(|(id, c)| SegmentLag {
                segment_id: *id,
                topic: c.topic.clone(),
                closed_end: c.end,
                readable_end: c.readable_end,
                reported: c.next,
            })
            .collect()
    }

    /// The bound topics.
    pub fn topics(&self) -> impl Iterator<Item = &str> {
        self.topics.iter().map(String::as_str)
    }

    /// When the oldest record read but not yet handed to the buffer was stored.
    pub fn oldest_backlog_timestamp_ms(&self) -> Option<i64> {
        self.cursors.values().filter_map(|c| c.backlog.front().map(|r| r.timestamp_ms)).min()
    }

    /// Closed and every record reported: the buffer learns the segment's end (so its
    /// committed offset reaches it) and the next generation becomes the shard's head.
    fn finish_if_read(&mut self, id: SegmentId, buffer: &mut GroupBuffer) {
        let Some(c) = self.cursors.get_mut(&id) else { return };
        let Some(end) = c.end.filter(|end| !c.finished && c.backlog.is_empty() && c.next >= *end) else { return };
        buffer.mark_read(id, end);
        c.finished = true;
        let (key, place) = (c.shard_key(), (c.generation, id));
        remove_place(&mut self.unfinished, key, place);
    }

    /// A segment gone from the state no longer holds its shard's later generations back.
    fn leave_order(&mut self, c: &Cursor, id: SegmentId) {
        remove_place(&mut self.unfinished, c.shard_key(), (c.generation, id));
    }
}

/// Each shard's head: its oldest segment not finished.
fn heads(unfinished: &BTreeMap<ShardKey, BTreeSet<Place>>) -> impl Iterator<Item = SegmentId> + '_ {
    unfinished.values().filter_map(|places| places.first()).map(|(_, id)| *id)
}

fn remove_place(unfinished: &mut BTreeMap<ShardKey, BTreeSet<Place>>, key: ShardKey, place: Place) {
    if let Some(places) = unfinished.get_mut(&key) {
        places.remove(&place);
        if places.is_empty() {
            unfinished.remove(&key);
        }
    }
}

/// Keeps what a late binding needs to find its records (see [`Reader::rewind`]).
fn note_reported(c: &mut Cursor, r: &Record) {
    c.latest_reported_ms = c.latest_reported_ms.max(r.timestamp_ms);
    c.first_reported.get_or_insert(r.offset);
    if c.marks.back().is_none_or(|(ts, _)| ts.div_euclid(1000) < r.timestamp_ms.div_euclid(1000)) {
        c.marks.push_back((r.timestamp_ms, r.offset));
        if c.marks.len() > REWIND_MARKS_MAX {
            c.marks.pop_front();
        }
    }
}

/// Whether record `r` goes to the buffer: it matches, or, while a segment is read
/// again after a late binding, it is one the buffer held or one only the new
/// binding takes.
fn takes(spec: &ConsumerGroupSpec, c: &mut Cursor, r: &Record) -> bool {
    let Some(replay) = c.replay.as_ref().filter(|p| r.offset < p.until) else {
        c.replay = None;
        return matches(spec, c, r);
    };
    if replay.outstanding.contains(&r.offset) {
        return true;
    }
    let now = matches(spec, c, r);
    now && !matches_decoded(&replay.before, &c.topic, r)
}

/// Whether record `r` of the cursor's segment goes to the group.
fn matches(spec: &ConsumerGroupSpec, c: &Cursor, r: &Record) -> bool {
    if c.takes_all {
        return spec.since_unix_ms == 0 || r.timestamp_ms >= spec.since_unix_ms;
    }
    matches_decoded(spec, &c.topic, r)
}

fn matches_decoded(spec: &ConsumerGroupSpec, topic: &str, r: &Record) -> bool {
    let since_ok = spec.since_unix_ms == 0 || r.timestamp_ms >= spec.since_unix_ms;
    since_ok && {
        let message = Message::decode(r.payload.clone()).unwrap_or_default();
        let bindings = spec.bindings.iter().filter(|b| *b.topic == *topic && r.timestamp_ms >= b.since_unix_ms);
        matching::matches_any(bindings, &message.routing_key, &message.headers)
    }
}
#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use bytes::Bytes;
    use proptest::prelude::*;

    use super::*;
    use crate::cluster_state::{BindingSpec, ExchangeType, HeadersMatch, SegmentState};

    fn segment(topic: &str, open: bool) -> SegmentRecord {
        generation(topic, 0, 1, open, 0)
    }

    /// Generation `generation` of `topic`'s shard `shard`; a closed one holds
    /// `next_offset` records.
    fn generation(topic: &str, shard: u32, generation: u32, open: bool, next_offset: u64) -> SegmentRecord {
        SegmentRecord {
            shard,
            generation,
            state: if open { SegmentState::Open } else { SegmentState::Closed },
            done: vec![1],
            next_offset: if open { 0 } else { next_offset },
            ..SegmentRecord::open_for_test("default", topic)
        }
    }

    fn record(offset: u64, key: &str, timestamp_ms: i64) -> Record {
        let m = Message { routing_key: key.into(), ..Default::default() };
        Record { offset, timestamp_ms, payload: Bytes::from(m.encode_to_vec()) }
    }

    fn records(offsets: std::ops::Range<u64>) -> Vec<Record> {
        offsets.map(|o| record(o, "", 0)).collect()
    }

    fn closed_read(offsets: std::ops::Range<u64>, end_offset: u64) -> Option<ReadResult> {
        Some(ReadResult { start: 0, records: records(offsets), end_offset, closed: true })
    }

    fn open_read(offsets: std::ops::Range<u64>) -> Option<ReadResult> {
        let end_offset = offsets.end;
        Some(ReadResult { start: 0, records: records(offsets), end_offset, closed: false })
    }

    fn direct(topic: &str, key: &str) -> BindingSpec {
        BindingSpec {
            topic: topic.into(),
            exchange_type: ExchangeType::Direct,
            routing_key: key.into(),
            headers: Default::default(),
            headers_match: HeadersMatch::All,
            since_unix_ms: 0,
        }
    }

    fn fanout_group(topics: &[&str], size: u32, start: BTreeMap<SegmentId, u64>) -> (Reader, GroupBuffer) {
        let bindings = topics.iter().map(|t| BindingSpec::fanout(*t)).collect();
        let spec = ConsumerGroupSpec { bindings, size, since_unix_ms: 0, ..Default::default() };
        (Reader::new("default", spec, start.clone()), GroupBuffer::new(size as usize, start, 0))
    }

    fn fetch(segment_id: SegmentId, from: u64, idle: bool) -> Fetch {
        Fetch { segment_id, from, since_unix_ms: 0, idle }
    }

    /// Feeds and hands out to an auto-ack subscriber until nothing moves, as the task
    /// does after every event: (segment, offset) in the order handed out.
    fn deliver(reader: &mut Reader, buffer: &mut GroupBuffer) -> Vec<(SegmentId, u64)> {
        let mut out = Vec::new();
        loop {
            assert!(reader.feed(buffer).is_empty(), "reader out of step with the buffer");
            let handed = buffer.dispatch(0);
            if handed.is_empty() {
                return out;
            }
            out.extend(handed.into_iter().map(|(_, d)| (d.segment_id, d.offset)));
        }
    }

    #[test]
    fn a_group_reads_only_its_topics_from_the_committed_offset() {
        let spec = ConsumerGroupSpec {
            bindings: vec![BindingSpec::fanout("t")],
            size: 10,
            since_unix_ms: 0,
            ..Default::default()
        };
        let mut reader = Reader::new("default", spec, BTreeMap::from([(2, 5)]));
        let mut buffer = GroupBuffer::new(10, BTreeMap::from([(2, 5)]), 0);
        let (t, other) = (segment("t", true), segment("u", true));
        reader.segments_changed([(2, &t), (3, &other)], &mut buffer);
        assert_eq!(reader.next_fetches(&buffer), [fetch(2, 5, false)]);
        assert!(reader.next_fetches(&buffer).is_empty(), "one read at a time");
        let r =
            ReadResult { start: 5, records: vec![record(5, "", 0), record(6, "", 0)], end_offset: 7, closed: false };
        reader.fetched(2, Some(r), &mut buffer);
        assert!(reader.feed(&mut buffer).is_empty());
        assert_eq!(buffer.pending_len(), 2);
        assert_eq!(reader.next_fetches(&buffer), [fetch(2, 7, false)]);
        reader.segments_changed([(3, &other)], &mut buffer);
        assert!(reader.drained(&GroupBuffer::new(1, BTreeMap::new(), 0)), "no segment left to read");
    }

    #[test]
    fn a_purge_drops_what_is_ready_and_passes_what_is_unread_and_keeps_what_is_in_flight() {
        // Buffer of 3: records 0..3 offered (0 handed out), 3..5 read ahead, 5..8 not read.
        let (mut reader, mut buffer) = fanout_group(&["t"], 3, BTreeMap::new());
        let t = segment("t", true);
        reader.segments_changed([(1, &t)], &mut buffer);
        assert_eq!(reader.next_fetches(&buffer), [fetch(1, 0, false)]);
        reader.fetched(1, open_read(0..5), &mut buffer);
        assert!(reader.feed(&mut buffer).is_empty());
        let sub = buffer.subscribe(1, false);
        assert_eq!(buffer.dispatch(0).len(), 1);
        assert_eq!(reader.purge_inputs(), [(1, Err(5))]);
        // The primary confirmed up to 8: 2 waiting + 2 read ahead + 3 unread.
        assert_eq!(reader.purge(&BTreeMap::from([(1, 8)]), &mut buffer), 7);
        assert_eq!((buffer.pending_len(), buffer.in_flight_len()), (0, 1));
        assert_eq!(reader.next_fetches(&buffer), [fetch(1, 8, false)], "reading goes on from the end");
        assert_eq!(reader.lag_inputs()[0].reported, 8);
        buffer.ack(1, 0).unwrap();
        assert_eq!(buffer.committed()[&1], 8);
        reader.fetched(1, open_read(8..9), &mut buffer);
        assert_eq!(deliver(&mut reader, &mut buffer), [(1, 8)], "what comes after the purge is delivered");
        // Unacknowledged when its subscriber leaves: ready again, so purged.
        buffer.unsubscribe(sub);
        assert_eq!(reader.purge(&BTreeMap::from([(1, 9)]), &mut buffer), 1);
        assert_eq!(reader.purge(&BTreeMap::from([(1, 9)]), &mut buffer), 0, "nothing left");
    }

    #[test]
    fn a_segment_closed_well_before_since_is_finished_unread() {
        let spec = ConsumerGroupSpec {
            bindings: vec![BindingSpec::fanout("t")],
            size: 10,
            since_unix_ms: 1_000_000,
            ..Default::default()
        };
        let mut reader = Reader::new("default", spec, BTreeMap::new());
        let mut buffer = GroupBuffer::new(10, BTreeMap::new(), 0);
        let closed_at = |ms, generation, records| SegmentRecord {
            closed_unix_ms: ms,
            ..self::generation("t", 0, generation, false, records)
        };
        let (old, recent) = (closed_at(1_000_000 - 60_001, 1, 50), closed_at(1_000_000 - 60_000, 2, 3));
        reader.segments_changed([(1, &old), (2, &recent)], &mut buffer);
        let from_since = Fetch { since_unix_ms: 1_000_000, ..fetch(2, 0, false) };
        assert_eq!(reader.next_fetches(&buffer), [from_since], "the old one is not read");
        assert_eq!(buffer.committed()[&1], 50, "and counts as done");
        // A binding added later with an earlier `since` reads it after all.
        let mut late = reader.spec().clone();
        late.bindings.push(BindingSpec { since_unix_ms: 1, ..direct("t", "k") });
        reader.spec_changed(late, &mut buffer);
        reader.fetched(2, closed_read(0..3, 3), &mut buffer);
        assert!(reader.next_fetches(&buffer).contains(&fetch(1, 0, false)), "read again for the late binding");
    }

    /// A group with a `since` starts each segment at the first record stored at or
    /// after it (the read finds it with the time index); the records before count as
    /// done, and a binding with an earlier `since` still gets them, whether it comes
    /// while that read is on its way or after.
    #[test]
    fn reads_start_at_since_and_an_earlier_binding_reads_from_the_start() {
        let spec = ConsumerGroupSpec {
            bindings: vec![direct("t", "a")],
            size: 10,
            since_unix_ms: 1_000,
            ..Default::default()
        };
        let mut reader = Reader::new("default", spec.clone(), BTreeMap::new());
        let mut buffer = GroupBuffer::new(10, BTreeMap::new(), 0);
        let sub = buffer.subscribe(0, true);
        let t = generation("t", 0, 1, true, 0);
        reader.segments_changed([(1, &t)], &mut buffer);
        let seek = Fetch { since_unix_ms: 1_000, ..fetch(1, 0, false) };
        assert_eq!(reader.next_fetches(&buffer), std::slice::from_ref(&seek));
        let answer = |start, records: Vec<Record>| Some(ReadResult { start, records, end_offset: 7, closed: false });
        reader.fetched(1, answer(5, vec![record(5, "a", 1_000), record(6, "b", 1_001)]), &mut buffer);
        assert!(reader.feed(&mut buffer).is_empty());
        let got: Vec<u64> = buffer.dispatch(0).into_iter().map(|(s, d)| (assert_eq!(s, sub), d.offset).1).collect();
        assert_eq!(got, [5]);
        assert_eq!(buffer.committed(), BTreeMap::from([(1, 7)]), "what lies before since is done");
        assert_eq!(reader.next_fetches(&buffer), [fetch(1, 7, false)], "later reads go on from there");

        // A binding from an earlier time, after the skip: the segment is read again
        // from where the cursor began.
        let mut earlier = spec.clone();
        earlier.since_unix_ms = 0;
        earlier.bindings.push(BindingSpec { since_unix_ms: 500, ..direct("t", "k") });
        reader.spec_changed(earlier.clone(), &mut buffer);
        reader.fetched(1, answer(7, vec![]), &mut buffer);
        assert_eq!(reader.next_fetches(&buffer), [fetch(1, 0, false)]);

        // The same binding while the seek is on its way: its answer is not used.
        let mut reader = Reader::new("default", spec, BTreeMap::new());
        let mut buffer = GroupBuffer::new(10, BTreeMap::new(), 0);
        reader.segments_changed([(1, &t)], &mut buffer);
        assert_eq!(reader.next_fetches(&buffer), [seek]);
        reader.spec_changed(earlier, &mut buffer);
        reader.fetched(1, answer(5, vec![record(5, "a", 1_000)]), &mut buffer);
        assert_eq!(reader.next_fetches(&buffer), [fetch(1, 0, false)], "the first binding takes all");
        assert!(buffer.committed().is_empty(), "nothing skipped");
    }

    #[test]
    fn since_and_bindings_decide_what_is_offered() {
        let spec =
            ConsumerGroupSpec { bindings: vec![direct("t", "a")], size: 10, since_unix_ms: 100, ..Default::default() };
        let mut reader = Reader::new("default", spec, BTreeMap::new());
        let mut buffer = GroupBuffer::new(10, BTreeMap::new(), 0);
        let t = generation("t", 0, 1, false, 3);
        reader.segments_changed([(1, &t)], &mut buffer);
        reader.next_fetches(&buffer);
        let records = vec![record(0, "a", 99), record(1, "b", 100), record(2, "a", 100)];
        reader.fetched(1, Some(ReadResult { start: 0, records, end_offset: 3, closed: true }), &mut buffer);
        assert!(reader.feed(&mut buffer).is_empty());
        let sub = buffer.subscribe(0, true);
        let got: Vec<u64> = buffer.dispatch(0).into_iter().map(|(s, d)| (assert_eq!(s, sub), d.offset).1).collect();
        assert_eq!(got, [2]);
        reader.next_fetches(&buffer);
        reader.fetched(1, Some(ReadResult { start: 0, records: vec![], end_offset: 3, closed: true }), &mut buffer);
        assert!(reader.next_fetches(&buffer).is_empty(), "finished");
        assert!(reader.drained(&buffer));
        assert_eq!(buffer.committed(), BTreeMap::from([(1, 3)]));
    }

    /// AMQP's `queue.bind` on a running group: the binding takes records from its
    /// `since` on, even those this reader had already skipped before it learnt of the
    /// binding (their segment is read again from its committed offset), and a binding
    /// that comes in time changes nothing already reported.
    #[test]
    fn a_binding_added_late_reads_again_what_it_takes_and_one_in_time_does_not() {
        let spec =
            ConsumerGroupSpec { bindings: vec![direct("t", "a")], size: 10, since_unix_ms: 0, ..Default::default() };
        let mut reader = Reader::new("default", spec.clone(), BTreeMap::new());
        let mut buffer = GroupBuffer::new(10, BTreeMap::new(), 0);
        let sub = buffer.subscribe(0, false);
        let t = generation("t", 0, 1, true, 0);
        reader.segments_changed([(1, &t)], &mut buffer);
        reader.next_fetches(&buffer);
        let records = vec![record(0, "a", 100), record(1, "b", 200), record(2, "a", 300)];
        reader.fetched(
            1,
            Some(ReadResult { start: 0, records: records.clone(), end_offset: 3, closed: false }),
            &mut buffer,
        );
        assert!(reader.feed(&mut buffer).is_empty());
        let offsets = |b: &mut GroupBuffer| b.dispatch(0).into_iter().map(|(_, d)| d.offset).collect::<Vec<_>>();
        assert_eq!(offsets(&mut buffer), [0, 2]);
        buffer.ack(1, 0).unwrap();

        // In time: `since` after everything reported; nothing is read again.
        let mut in_time = spec.clone();
        in_time.bindings.push(BindingSpec { since_unix_ms: 301, ..direct("t", "c") });
        reader.spec_changed(in_time.clone(), &mut buffer);
        assert_eq!(reader.next_fetches(&buffer), [fetch(1, 3, false)]);
        reader.fetched(1, None, &mut buffer);

        // Late: `since` 150, record 1 ("b", 200) was skipped: the segment is read again
        // from its last record before 150 (0, acked: not again); record 1 is offered
        // now and record 2, unacknowledged when the reading went back, comes again.
        let mut late = in_time;
        late.bindings.push(BindingSpec { since_unix_ms: 150, ..direct("t", "b") });
        reader.spec_changed(late, &mut buffer);
        assert_eq!(buffer.in_flight_of(sub), 0, "the rewound segment's deliveries are dropped");
        assert_eq!(reader.next_fetches(&buffer), [fetch(1, 0, false)]);
        reader.fetched(1, Some(ReadResult { start: 0, records, end_offset: 3, closed: false }), &mut buffer);
        assert!(reader.feed(&mut buffer).is_empty());
        assert_eq!(offsets(&mut buffer), [1, 2]);
    }

    /// Issue 13, finding 3: the primary of generation 1 was killed, the fail-over
    /// closed it at 3 records, and generation 2 took the next publishes. Generation 1
    /// cannot be read for a while (its copies are being sealed): generation 2 waits.
    #[test]
    fn a_shard_s_next_generation_waits_until_the_previous_one_is_read_to_its_end() {
        let (mut reader, mut buffer) = fanout_group(&["t"], 2, BTreeMap::new());
        buffer.subscribe(0, true);
        let (g1, g2) = (generation("t", 0, 1, false, 3), generation("t", 0, 2, true, 0));
        reader.segments_changed([(1, &g1), (2, &g2)], &mut buffer);
        assert_eq!(reader.next_fetches(&buffer), [fetch(1, 0, false)], "generation 2 waits");
        reader.fetched(1, None, &mut buffer);
        assert!(deliver(&mut reader, &mut buffer).is_empty());
        assert!(reader.drained(&buffer), "nothing to hand out now: generation 2 waits for 1");
        assert_eq!(reader.next_fetches(&buffer), [fetch(1, 0, true)], "generation 1 again, generation 2 still waits");
        // Read at last, with more records than the buffer holds: generation 2 waits
        // until the last of them is fed, then needs no further read of generation 1.
        reader.fetched(1, closed_read(0..3, 3), &mut buffer);
        assert!(reader.feed(&mut buffer).is_empty());
        assert!(reader.next_fetches(&buffer).is_empty(), "generation 1's backlog first");
        assert_eq!(deliver(&mut reader, &mut buffer), [(1, 0), (1, 1), (1, 2)]);
        assert_eq!(reader.next_fetches(&buffer), [fetch(2, 0, false)]);
        reader.fetched(2, open_read(0..2), &mut buffer);
        assert_eq!(deliver(&mut reader, &mut buffer), [(2, 0), (2, 1)]);
        assert_eq!(buffer.committed(), BTreeMap::from([(1, 3), (2, 2)]));
    }

    /// Segment ids are not the order: generations are (ids of an old state, or a
    /// topic deleted and created again, need not follow them).
    #[test]
    fn generations_not_segment_ids_decide_the_order() {
        let (mut reader, mut buffer) = fanout_group(&["t"], 10, BTreeMap::new());
        buffer.subscribe(0, true);
        let (g1, g2) = (generation("t", 0, 1, false, 1), generation("t", 0, 2, true, 0));
        reader.segments_changed([(9, &g1), (4, &g2)], &mut buffer);
        assert_eq!(reader.next_fetches(&buffer), [fetch(9, 0, false)]);
        reader.fetched(9, closed_read(0..1, 1), &mut buffer);
        assert_eq!(deliver(&mut reader, &mut buffer), [(9, 0)]);
        assert_eq!(reader.next_fetches(&buffer), [fetch(4, 0, false)]);
    }

    /// A head that cannot be read holds back its own shard only.
    #[test]
    fn shards_and_topics_do_not_wait_for_each_other() {
        let (mut reader, mut buffer) = fanout_group(&["t", "u"], 10, BTreeMap::new());
        buffer.subscribe(0, true);
        let stuck = generation("t", 0, 1, false, 5);
        let behind = generation("t", 0, 2, true, 0);
        let other_shard = generation("t", 1, 1, true, 0);
        let other_topic = generation("u", 0, 1, true, 0);
        reader.segments_changed([(1, &stuck), (2, &behind), (3, &other_shard), (4, &other_topic)], &mut buffer);
        assert_eq!(reader.next_fetches(&buffer), [fetch(1, 0, false), fetch(3, 0, false), fetch(4, 0, false)]);
        reader.fetched(1, None, &mut buffer);
        reader.fetched(3, open_read(0..2), &mut buffer);
        reader.fetched(4, open_read(0..1), &mut buffer);
        assert_eq!(deliver(&mut reader, &mut buffer), [(3, 0), (3, 1), (4, 0)]);
        assert!(!reader.drained(&buffer), "shard 1 and topic u are read again at once");
        assert_eq!(reader.next_fetches(&buffer), [fetch(1, 0, true), fetch(3, 2, false), fetch(4, 1, false)]);
    }

    /// Only segments in the state count: one deleted (retention, here while it could
    /// not be read) no longer holds its shard back, and a gap in generations is fine.
    #[test]
    fn a_generation_gone_from_the_state_holds_nothing_back() {
        let (mut reader, mut buffer) = fanout_group(&["t"], 10, BTreeMap::new());
        buffer.subscribe(0, true);
        let (g1, g2, g4) =
            (generation("t", 0, 1, false, 2), generation("t", 0, 2, false, 1), generation("t", 0, 4, true, 0));
        reader.segments_changed([(1, &g1), (2, &g2), (4, &g4)], &mut buffer);
        assert_eq!(reader.next_fetches(&buffer), [fetch(1, 0, false)]);
        reader.segments_changed([(2, &g2), (4, &g4)], &mut buffer);
        assert_eq!(reader.next_fetches(&buffer), [fetch(2, 0, false)]);
        reader.fetched(1, closed_read(0..2, 2), &mut buffer);
        assert!(deliver(&mut reader, &mut buffer).is_empty(), "a late answer for a deleted segment is dropped");
        reader.fetched(2, closed_read(0..1, 1), &mut buffer);
        assert_eq!(deliver(&mut reader, &mut buffer), [(2, 0)]);
        assert_eq!(reader.next_fetches(&buffer), [fetch(4, 0, false)], "generation 3 never existed here");
        assert_eq!(buffer.committed(), BTreeMap::from([(2, 1)]), "the deleted segment is forgotten");
    }

    /// A group resumed elsewhere: generation 1 was acknowledged to its end (no read),
    /// generation 2 in part, and generation 3 in part too (a nacked message of 2 was
    /// still out when the offsets were committed). Each is read from its offset, in
    /// order.
    #[test]
    fn committed_offsets_decide_where_each_generation_resumes() {
        let start = BTreeMap::from([(1, 5), (2, 2), (3, 1)]);
        let (mut reader, mut buffer) = fanout_group(&["t"], 10, start);
        buffer.subscribe(0, true);
        let (g1, g2, g3) =
            (generation("t", 0, 1, false, 5), generation("t", 0, 2, false, 4), generation("t", 0, 3, true, 0));
        reader.segments_changed([(1, &g1), (2, &g2), (3, &g3)], &mut buffer);
        assert_eq!(reader.next_fetches(&buffer), [fetch(2, 2, false)], "generation 1 is done already");
        reader.fetched(2, closed_read(2..4, 4), &mut buffer);
        assert_eq!(deliver(&mut reader, &mut buffer), [(2, 2), (2, 3)]);
        assert_eq!(reader.next_fetches(&buffer), [fetch(3, 1, false)]);
        reader.fetched(3, open_read(1..3), &mut buffer);
        assert_eq!(deliver(&mut reader, &mut buffer), [(3, 1), (3, 2)]);
        assert_eq!(buffer.committed(), BTreeMap::from([(1, 5), (2, 4), (3, 3)]));
    }

    /// A shard whose generations are all closed (its topic is being deleted, or the
    /// next one is not open yet): each is read in turn, an empty one (failed over
    /// before its first record) without a read, and then nothing is left to do.
    #[test]
    fn a_shard_whose_generations_are_all_closed_is_read_in_order_to_its_end() {
        let (mut reader, mut buffer) = fanout_group(&["t"], 10, BTreeMap::new());
        buffer.subscribe(0, true);
        let (g1, g2, g3) =
            (generation("t", 0, 1, false, 2), generation("t", 0, 2, false, 0), generation("t", 0, 3, false, 1));
        reader.segments_changed([(1, &g1), (2, &g2), (3, &g3)], &mut buffer);
        assert_eq!(reader.next_fetches(&buffer), [fetch(1, 0, false)]);
        reader.fetched(1, closed_read(0..2, 2), &mut buffer);
        assert_eq!(deliver(&mut reader, &mut buffer), [(1, 0), (1, 1)]);
        assert_eq!(reader.next_fetches(&buffer), [fetch(3, 0, false)], "generation 2 is empty");
        reader.fetched(3, closed_read(0..1, 1), &mut buffer);
        assert_eq!(deliver(&mut reader, &mut buffer), [(3, 0)]);
        assert!(reader.next_fetches(&buffer).is_empty());
        assert!(reader.drained(&buffer));
        assert_eq!(buffer.committed(), BTreeMap::from([(1, 2), (2, 0), (3, 1)]));
    }

    /// The open generation is closed (rotation, fail-over) after all of it was read:
    /// the state says so, and the next generation is read without asking the old one
    /// again. A read of the old one still on its way changes nothing when it answers.
    #[test]
    fn an_open_head_hands_over_once_the_state_closes_it() {
        let (mut reader, mut buffer) = fanout_group(&["t"], 10, BTreeMap::new());
        buffer.subscribe(0, true);
        let g1 = generation("t", 0, 1, true, 0);
        reader.segments_changed([(1, &g1)], &mut buffer);
        assert_eq!(reader.next_fetches(&buffer), [fetch(1, 0, false)]);
        reader.fetched(1, open_read(0..2), &mut buffer);
        assert_eq!(deliver(&mut reader, &mut buffer), [(1, 0), (1, 1)]);
        assert_eq!(reader.next_fetches(&buffer), [fetch(1, 2, false)]);
        let (g1, g2) = (generation("t", 0, 1, false, 2), generation("t", 0, 2, true, 0));
        reader.segments_changed([(1, &g1), (2, &g2)], &mut buffer);
        assert_eq!(reader.next_fetches(&buffer), [fetch(2, 0, false)]);
        reader.fetched(1, closed_read(0..2, 2), &mut buffer);
        reader.fetched(2, open_read(0..1), &mut buffer);
        assert_eq!(deliver(&mut reader, &mut buffer), [(2, 0)]);
        assert_eq!(buffer.committed(), BTreeMap::from([(1, 2), (2, 1)]));
    }

    /// One segment of the property test's model.
    #[derive(Debug)]
    struct ModelSegment {
        id: SegmentId,
        generation: u32,
        data: Vec<Record>,
        /// Its committed offset when the group starts.
        start: u64,
        deleted: bool,
    }

    /// The cluster state as the group sees it: shards of two topics, each with its
    /// generations; a shard's later generations are opened one by one.
    #[derive(Debug)]
    struct Model {
        /// Per shard (topic `t` for even indexes, `u` for odd), its segments in
        /// generation order.
        shards: Vec<Vec<ModelSegment>>,
        /// Per shard: how many of its generations were opened so far.
        opened: Vec<usize>,
        /// Per shard: its last generation stays open once all are opened.
        last_open: Vec<bool>,
    }

    impl Model {
        fn topic_and_shard(k: usize) -> (&'static str, u32) {
            (if k.is_multiple_of(2) { "t" } else { "u" }, (k / 2) as u32)
        }

        fn is_open(&self, k: usize, i: usize) -> bool {
            i + 1 == self.opened[k] && (self.opened[k] < self.shards[k].len() || self.last_open[k])
        }

        fn present(&self, k: usize, i: usize) -> bool {
            i < self.opened[k] && !self.shards[k][i].deleted
        }

        fn state(&self) -> Vec<(SegmentId, SegmentRecord)> {
            let mut out = Vec::new();
            for (k, segments) in self.shards.iter().enumerate() {
                let (topic, shard) = Self::topic_and_shard(k);
                for (i, s) in segments.iter().enumerate().filter(|(i, _)| self.present(k, *i)) {
                    let open = self.is_open(k, i);
                    out.push((s.id, generation(topic, shard, s.generation, open, s.data.len() as u64)));
                }
            }
            out
        }

        fn find(&self, id: SegmentId) -> (usize, usize) {
            for (k, segments) in self.shards.iter().enumerate() {
                if let Some(i) = segments.iter().position(|s| s.id == id) {
                    return (k, i);
                }
            }
            panic!("segment {id} is not in the model");
        }

        /// The offsets the group must get from a segment: matching, from its start.
        fn expected(&self, k: usize, i: usize) -> Vec<u64> {
            let s = &self.shards[k][i];
            let matching = |r: &&Record| Message::decode(r.payload.clone()).unwrap().routing_key == "a";
            s.data.iter().filter(matching).map(|r| r.offset).filter(|o| *o >= s.start).collect()
        }

        /// Closes the shard's open generation at its full length and opens the next.
        fn advance(&mut self, k: usize) {
            self.opened[k] = (self.opened[k] + 1).min(self.shards[k].len());
        }
    }

    /// Feeds and hands out (auto-ack frees the buffer) until nothing moves, as the task
    /// does on every event, checking each hand-out against the shard order; then
    /// starts the reads the reader asks for, remembering whether each segment was open.
    fn run(
        reader: &mut Reader,
        buffer: &mut GroupBuffer,
        model: &Model,
        got: &mut HashMap<SegmentId, Vec<u64>>,
        in_read: &mut Vec<(Fetch, bool)>,
    ) -> Result<(), TestCaseError> {
        loop {
            prop_assert!(reader.feed(buffer).is_empty());
            let handed = buffer.dispatch(0);
            if handed.is_empty() {
                break;
            }
            for (_, d) in handed {
                let (k, i) = model.find(d.segment_id);
                for j in (0..i).filter(|j| model.present(k, *j)) {
                    let earlier = got.get(&model.shards[k][j].id).cloned().unwrap_or_default();
                    prop_assert_eq!(earlier, model.expected(k, j), "shard {} generation {} came first", k, i);
                }
                got.entry(d.segment_id).or_default().push(d.offset);
            }
        }
        for f in reader.next_fetches(buffer) {
            let (k, i) = model.find(f.segment_id);
            in_read.push((f, model.is_open(k, i)));
        }
        Ok(())
    }

    /// A read's answer: up to `len` records from `back` before the position asked
    /// (reads may overlap); an open segment reads as far as it got, a closed one
    /// tells its end.
    fn answer(model: &Model, f: &Fetch, open: bool, len: u64, back: u64) -> ReadResult {
        let (k, i) = model.find(f.segment_id);
        let data = &model.shards[k][i].data;
        let from = f.from.saturating_sub(back) as usize;
        let records: Vec<Record> = data.iter().skip(from).take(len as usize).cloned().collect();
        let end_offset = if open { records.last().map_or(f.from, |r| r.offset + 1) } else { data.len() as u64 };
        ReadResult { start: f.from, records, end_offset, closed: !open }
    }

    proptest! {
        /// Shards of two topics, each with generations of random records (two routing
        /// keys, gaps in the generation numbers, segment ids in random order, random
        /// committed offsets to start from) that are opened one after another, some
        /// deleted on the way; read in random slices that may overlap or fail; a small
        /// buffer a subscriber drains. Every matching record arrives exactly once, in
        /// offset order per segment; no record of a shard's generation arrives before
        /// every record of its earlier generations still in the state; the buffer never
        /// reports the reader out of step; once all is read and acked the committed
        /// offsets reach every segment's end.
        #[test]
        fn every_matching_record_arrives_once_in_order_and_in_generation_order(
            layout in prop::collection::vec(
                prop::collection::vec((0..12u64, 1..3u32, prop_oneof![3 => Just(0u64), 1 => 0..13u64]), 1..4),
                1..5,
            ),
            last_open in prop::collection::vec(any::<bool>(), 4),
            first_opened in prop::collection::vec(1..4usize, 4),
            id_salt in prop::collection::vec(0..1000u64, 16),
            keys in prop::collection::vec(any::<bool>(), 90),
            steps in prop::collection::vec((0..16usize, 1..8u64, 0..3u64, any::<bool>(), 0..100u8), 1..300),
            size in 1..6usize,
        ) {
            let mut n = 0;
            let shards: Vec<Vec<ModelSegment>> = layout.iter().map(|gens| {
                let mut generation = 0;
                gens.iter().map(|(len, gap, start)| {
                    // Unique, and unrelated to the generation order.
                    let id = id_salt[n] * 16 + n as u64;
                    let data = (0..*len).map(|o| {
                        record(o, if keys[(n * 12 + o as usize) % keys.len()] { "a" } else { "b" }, 0)
                    }).collect();
                    n += 1;
                    generation += gap;
                    ModelSegment { id, generation, data, start: (*start).min(*len), deleted: false }
                }).collect()
            }).collect();
            let opened = shards.iter().enumerate().map(|(k, s)| first_opened[k].min(s.len())).collect();
            let mut model = Model { shards, opened, last_open };
            // Offsets are committed only in segments that exist when the group starts.
            for (k, segments) in model.shards.iter_mut().enumerate() {
                segments.iter_mut().skip(model.opened[k]).for_each(|s| s.start = 0);
            }
            let start: BTreeMap<SegmentId, u64> =
                model.shards.iter().flatten().filter(|s| s.start > 0).map(|s| (s.id, s.start)).collect();
            let spec = ConsumerGroupSpec { bindings: vec![direct("t", "a"), direct("u", "a")], size: size as u32, since_unix_ms: 0, ..Default::default() };
            let mut reader = Reader::new("default", spec, start.clone());
            let mut buffer = GroupBuffer::new(size, start, 0);
            buffer.subscribe(0, true);
            let changed = |reader: &mut Reader, buffer: &mut GroupBuffer, model: &Model| {
                let state = model.state();
                reader.segments_changed(state.iter().map(|(id, s)| (*id, s)), buffer);
            };
            changed(&mut reader, &mut buffer, &model);
            let mut got: HashMap<SegmentId, Vec<u64>> = HashMap::new();
            let mut in_read: Vec<(Fetch, bool)> = Vec::new();
            run(&mut reader, &mut buffer, &model, &mut got, &mut in_read)?;
            for (pick, len, back, fail, event) in steps {
                match event {
                    // A rotation or fail-over of a shard.
                    0..=5 => {
                        model.advance(pick % model.shards.len());
                        changed(&mut reader, &mut buffer, &model);
                    }
                    // Retention (or a topic deletion) takes a segment.
                    6 => {
                        let present: Vec<(usize, usize)> = (0..model.shards.len())
                            .flat_map(|k| (0..model.shards[k].len()).map(move |i| (k, i)))
                            .filter(|(k, i)| model.present(*k, *i))
                            .collect();
                        if let Some(&(k, i)) = present.get(pick % present.len().max(1)) {
                            model.shards[k][i].deleted = true;
                            changed(&mut reader, &mut buffer, &model);
                        }
                    }
                    _ => {
                        if in_read.is_empty() { continue; }
                        let (f, open) = in_read.remove(pick % in_read.len());
                        let result = (!fail).then(|| answer(&model, &f, open, len, back));
                        reader.fetched(f.segment_id, result, &mut buffer);
                    }
                }
                run(&mut reader, &mut buffer, &model, &mut got, &mut in_read)?;
            }
            // Every shard closed and opened to its last generation; read all that is
            // left, in whole.
            model.last_open = vec![false; model.last_open.len()];
            for k in 0..model.shards.len() {
                model.opened[k] = model.shards[k].len();
            }
            changed(&mut reader, &mut buffer, &model);
            run(&mut reader, &mut buffer, &model, &mut got, &mut in_read)?;
            for _ in 0..500 {
                let Some((f, _)) = in_read.pop() else { break };
                let result = answer(&model, &f, false, u64::MAX, 0);
                reader.fetched(f.segment_id, Some(result), &mut buffer);
                run(&mut reader, &mut buffer, &model, &mut got, &mut in_read)?;
            }
            prop_assert!(in_read.is_empty() && reader.drained(&buffer));
            let committed = buffer.committed();
            for (k, segments) in model.shards.iter().enumerate() {
                for (i, s) in segments.iter().enumerate() {
                    let (want, delivered) = (model.expected(k, i), got.remove(&s.id).unwrap_or_default());
                    if s.deleted {
                        prop_assert!(want.starts_with(&delivered), "deleted segment: {:?} of {:?}", delivered, want);
                        prop_assert!(!committed.contains_key(&s.id));
                    } else {
                        prop_assert_eq!(delivered, want);
                        prop_assert_eq!(committed.get(&s.id).copied().unwrap_or(0), s.data.len() as u64);
                    }
                }
            }
        }
    }
}
