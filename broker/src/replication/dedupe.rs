//! Exactly-once publishing: the primary's duplicate window, a pure core (no IO, no
//! clock: the caller passes the time).
//!
//! A publish request may carry a producer id and a sequence number ([`Key`]). The
//! primary of a shard's open segment remembers, for the keyed requests of the last
//! `window_ms` (at most `entries_max` of them, the newest), where each was stored
//! ([`Stored`]); a request that comes again (the client did not hear the answer and
//! sent it again, maybe through another node) is answered as the first attempt was and
//! not stored again. A repeat of a request still in flight here waits for the first
//! attempt's outcome.
//!
//! Keys are per request, not per message: a request is the unit the primary stores
//! contiguously and answers with one range, and a client retries whole requests; one
//! entry per request keeps the window small (a CLI batch of 100 messages is one entry).
//!
//! The window survives a rotation, a fail-over and a restart because the first record
//! of every keyed request carries its key (field 15 of the stored `Message`, see
//! [`encode_key`]): the primary of the shard's next generation starts from the window
//! its predecessor kept ([`Window::export`], handed over, [`Window::trim`]med to the
//! segment's agreed end) or, when that primary is gone, rebuilds it from the records
//! ([`stored_key`], [`Window::insert_stored`]). A fail-over may cut a request short
//! (the longest replica held only its first records): that request counts as stored
//! in part, and its retry stores only the rest ([`Begin::Append`] with `skip`).

use std::collections::{HashMap, VecDeque};

use bytes::{BufMut, Bytes, BytesMut};
use eventtermq_proto::internal::v1::PublishKey;
use prost::Message as _;

use crate::cluster_state::SegmentId;

/// Field number of the key in a stored `Message` (`reserved 15` in messaging.proto).
const KEY_FIELD: u32 = 15;
/// Its tag byte: field 15, wire type 2 (length-delimited).
const KEY_TAG: u8 = ((KEY_FIELD << 3) | 2) as u8;

/// Identity of a deduplicated publish request within a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub producer: u64,
    pub sequence: u64,
}

/// Where a request's messages are: `count` records from `first_offset` of `segment`,
/// after `stored_before` of its `total` messages stored in an earlier generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    pub segment: SegmentId,
    pub first_offset: u64,
    pub count: u32,
    pub stored_before: u32,
    pub total: u32,
}

impl Stored {
    /// Every message of the request is stored (not cut short by a fail-over).
    pub fn complete(&self) -> bool {
        u64::from(self.stored_before) + u64::from(self.count) >= u64::from(self.total)
    }
}

/// What to do with a keyed request ([`Window::begin`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Begin<T> {
    /// Not stored yet: append its messages from `skip` on (an earlier attempt stored
    /// the first `skip` before a fail-over cut it short), then report
    /// [`Window::written`] and [`Window::confirmed`] or [`Window::failed`].
    Append { skip: u32, token: T },
    /// Stored already: answer with where (a duplicate; nothing is appended).
    Duplicate { stored: Stored, token: T },
    /// The same request is being appended here: the token waits for its outcome and
    /// comes back from `confirmed` or `failed`.
    Waiting,
    /// The sequence was used before for a request of `total` messages: refuse.
    Mismatch { total: u32, token: T },
}

#[derive(Debug)]
enum State<T> {
    /// Being appended by this primary; where, once written. `previous`: the part an
    /// earlier generation stored, kept should this attempt fail before it is written.
    InFlight {
        total: u32,
        stored_before: u32,
        written: Option<(SegmentId, u64, u32)>,
        waiters: Vec<T>,
        previous: Option<Stored>,
    },
    Stored(Stored),
}

#[derive(Debug)]
struct Entry<T> {
    state: State<T>,
    /// Tells this entry's place in `order` from a stale one of a replaced entry.
    stamp: u64,
}

/// The duplicate window of one shard's primary. `T` is whatever a waiting repeat is
/// answered through (a reply channel; a number in tests).
#[derive(Debug)]
pub struct Window<T> {
    window_ms: u64,
    entries_max: usize,
    entries: HashMap<Key, Entry<T>>,
    /// Entries by age, oldest first: (time, key, stamp). Times never go back (see
    /// `last_ms`), so the front is the oldest.
    order: VecDeque<(i64, Key, u64)>,
    next_stamp: u64,
    last_ms: i64,
}

impl<T> Window<T> {
    /// A window that remembers keyed requests for `window_ms`, at most `entries_max`.
    pub fn new(window_ms: u64, entries_max: usize) -> Self {
        Self {
            window_ms,
            entries_max: entries_max.max(1),
            entries: HashMap::new(),
            order: VecDeque::new(),
            next_stamp: 0,
            last_ms: i64::MIN,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// A keyed request of `total` messages arrives at `now_ms`.
    pub fn begin(&mut self, key: Key, total: u32, now_ms: i64, token: T) -> Begin<T> {
        self.evict(now_ms);
        let Some(entry) = self.entries.get_mut(&key) else {
            let state = State::InFlight { total, stored_before: 0, written: None, waiters: Vec::new(), previous: None };
            self.insert(key, state, now_ms);
            return Begin::Append { skip: 0, token };
        };
        match &mut entry.state {
            State::InFlight { total: t, .. } | State::Stored(Stored { total: t, .. }) if *t != total => {
                Begin::Mismatch { total: *t, token }
            }
            State::InFlight { waiters, .. } => {
                waiters.push(token);
                Begin::Waiting
            }
            State::Stored(s) if s.complete() => Begin::Duplicate { stored: *s, token },
            State::Stored(s) => {
                // Cut short by a fail-over: the rest is stored now, in this generation.
                let skip = s.stored_before.saturating_add(s.count);
                let previous = Some(*s);
                let state =
                    State::InFlight { total, stored_before: skip, written: None, waiters: Vec::new(), previous };
                self.insert(key, state, now_ms);
                Begin::Append { skip, token }
            }
        }
    }

    /// The request begun as `key` was written at `first_offset` (`count` records) of
    /// `segment`: should it never be confirmed, its records may still be in the
    /// segment, and the window handed over says so.
    pub fn written(&mut self, key: Key, segment: SegmentId, first_offset: u64, count: u32) {
        if let Some(Entry { state: State::InFlight { written, .. }, .. }) = self.entries.get_mut(&key) {
            *written = Some((segment, first_offset, count));
        }
    }

    /// The request begun as `key` is confirmed: where it is, and the repeats that
    /// waited for it (answered the same, as duplicates).
    pub fn confirmed(&mut self, key: Key) -> Option<(Stored, Vec<T>)> {
        let entry = self.entries.get_mut(&key)?;
        let State::InFlight { total, stored_before, written: Some((segment, first_offset, count)), waiters, .. } =
            &mut entry.state
        else {
            return None;
        };
        let stored = Stored {
            segment: *segment,
            first_offset: *first_offset,
            count: *count,
            stored_before: *stored_before,
            total: *total,
        };
        let waiters = std::mem::take(waiters);
        entry.state = State::Stored(stored);
        Some((stored, waiters))
    }

    /// The request begun as `key` failed or was given up (the primary is stopping):
    /// the repeats that waited get the same answer. A request not written is
    /// forgotten (but for the part an earlier generation stored); one written stays,
    /// since its records may be in the segment.
    pub fn failed(&mut self, key: Key) -> Vec<T> {
        let Some(entry) = self.entries.get_mut(&key) else { return Vec::new() };
        let State::InFlight { waiters, written, previous, .. } = &mut entry.state else { return Vec::new() };
        let waiters = std::mem::take(waiters);
        match (written.is_none(), previous.take()) {
            (true, Some(previous)) => entry.state = State::Stored(previous),
            (true, None) => {
                self.entries.remove(&key);
            }
            (false, _) => {}
        }
        waiters
    }

    /// Every repeat still waiting (the primary failed): they get its error.
    pub fn drain_waiters(&mut self) -> Vec<T> {
        let mut all = Vec::new();
        for e in self.entries.values_mut() {
            if let State::InFlight { waiters, .. } = &mut e.state {
                all.append(waiters);
            }
        }
        all
    }

    /// A request known to be stored (handed over, or found in a record) at `at_ms`.
    /// A later one of the same key replaces it (the rest of a request cut short).
    pub fn insert_stored(&mut self, key: Key, stored: Stored, at_ms: i64) {
        self.insert(key, State::Stored(stored), at_ms);
    }

    /// What the next generation's primary needs, oldest first: the stored requests,
    /// and those written here whatever their outcome (their records may be in the
    /// segment; [`Window::trim`] to its agreed end says).
    pub fn export(&self) -> Vec<(Key, Stored, i64)> {
        self.order
            .iter()
            .filter_map(|(at, key, stamp)| {
                let e = self.entries.get(key).filter(|e| e.stamp == *stamp)?;
                let stored = match &e.state {
                    State::Stored(s) => *s,
                    State::InFlight { total, stored_before, written: Some((segment, first_offset, count)), .. } => {
                        Stored {
                            segment: *segment,
                            first_offset: *first_offset,
                            count: *count,
                            stored_before: *stored_before,
                            total: *total,
                        }
                    }
                    State::InFlight { written: None, .. } => return None,
                };
                Some((*key, stored, *at))
            })
            .collect()
    }

    /// `segment` was closed at `next_offset` (a fail-over keeps the longest replica's
    /// log, which may end before what its primary wrote): requests past it were not
    /// stored, a request across it only in part. A request whose first messages an
    /// earlier generation stored keeps that part even when none of the rest is here.
    pub fn trim(&mut self, segment: SegmentId, next_offset: u64) {
        self.entries.retain(|_, e| match &mut e.state {
            State::Stored(s) if s.segment == segment => {
                let here = next_offset.saturating_sub(s.first_offset).min(u64::from(u32::MAX)) as u32;
                s.count = s.count.min(here);
                s.count > 0 || s.stored_before > 0
            }
            _ => true,
        });
    }

    /// Forgets what is older than the window or beyond its count, oldest first; a
    /// request still in flight is kept (the oldest in flight stops the eviction: every
    /// later one is younger, and in-flight requests are bounded by the write queue).
    pub fn evict(&mut self, now_ms: i64) {
        let horizon = now_ms.saturating_sub(self.window_ms.min(i64::MAX as u64) as i64);
        while let Some((at, key, stamp)) = self.order.front().copied() {
            let live = self.entries.get(&key).is_some_and(|e| e.stamp == stamp);
            if !live {
                self.order.pop_front();
                continue;
            }
            if at >= horizon && self.entries.len() <= self.entries_max {
                return;
            }
            if matches!(self.entries.get(&key).map(|e| &e.state), Some(State::InFlight { .. })) {
                return;
            }
            self.order.pop_front();
            self.entries.remove(&key);
        }
    }

    fn insert(&mut self, key: Key, state: State<T>, at_ms: i64) {
        let at = at_ms.max(self.last_ms);
        self.last_ms = at;
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        self.entries.insert(key, Entry { state, stamp });
        self.order.push_back((at, key, stamp));
        // Stale positions of replaced entries are dropped as eviction reaches them;
        // compact when they would make `order` grow past twice the entries.
        if self.order.len() > 2 * self.entries_max + 16 {
            let entries = &self.entries;
            self.order.retain(|(_, k, s)| entries.get(k).is_some_and(|e| e.stamp == *s));
        }
        self.evict(at);
    }
}

/// Where the keyed request whose first record, at `offset` of `segment` (which ends
/// at `segment_end`), carries `key` is: a fail-over may have cut it short.
pub fn stored_at(key: &PublishKey, segment: SegmentId, offset: u64, segment_end: u64) -> (Key, Stored) {
    let rest = key.count.saturating_sub(key.stored_before);
    let here = u64::from(rest).min(segment_end.saturating_sub(offset)) as u32;
    let stored =
        Stored { segment, first_offset: offset, count: here, stored_before: key.stored_before, total: key.count };
    (Key { producer: key.producer_id, sequence: key.sequence }, stored)
}

/// The first payload of a keyed request as stored: the key (field 15) first, then the
/// encoded message. Protobuf readers take fields in any order and skip unknown ones,
/// so it still decodes as the same `Message`; putting the key first lets
/// [`stored_key`] find it without decoding the message.
pub fn encode_key(key: &PublishKey, payload: &[u8]) -> Bytes {
    let len = key.encoded_len();
    let mut out = BytesMut::with_capacity(1 + prost::encoding::encoded_len_varint(len as u64) + len + payload.len());
    out.put_u8(KEY_TAG);
    prost::encoding::encode_varint(len as u64, &mut out);
    key.encode_raw(&mut out);
    out.put_slice(payload);
    out.freeze()
}

/// The key a stored payload starts with, if any ([`encode_key`]).
pub fn stored_key(payload: &[u8]) -> Option<PublishKey> {
    let (&tag, mut rest) = payload.split_first()?;
    if tag != KEY_TAG {
        return None;
    }
    let len = prost::encoding::decode_varint(&mut rest).ok()?;
    let body = rest.get(..usize::try_from(len).ok()?)?;
    PublishKey::decode(body).ok()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use eventtermq_proto::v1::Message;
    use proptest::prelude::*;

    use super::*;

    const WINDOW_MS: u64 = 1000;

    fn key(sequence: u64) -> Key {
        Key { producer: 7, sequence }
    }

    #[test]
    fn the_key_rides_in_front_of_the_message_and_readers_skip_it() {
        let m = Message { routing_key: "r".into(), data: Bytes::from_static(b"hello"), ..Default::default() };
        let key = PublishKey { producer_id: u64::MAX, sequence: 3, count: 100, stored_before: 0 };
        let stored = encode_key(&key, &m.encode_to_vec());
        assert_eq!(stored_key(&stored), Some(key));
        assert_eq!(Message::decode(stored).unwrap(), m);
        assert_eq!(stored_key(&m.encode_to_vec()), None, "an ordinary message has no key");
        assert_eq!(stored_key(&Message::default().encode_to_vec()), None, "empty");
        assert_eq!(stored_key(&[KEY_TAG, 200]), None, "a length past the end is no key");
    }

    #[test]
    fn a_repeat_waits_for_the_first_attempt_and_gets_its_answer() {
        let mut w = Window::new(WINDOW_MS, 10);
        assert_eq!(w.begin(key(1), 3, 0, "first"), Begin::Append { skip: 0, token: "first" });
        assert_eq!(w.begin(key(1), 3, 1, "again"), Begin::Waiting);
        assert!(matches!(w.begin(key(1), 4, 1, "other"), Begin::Mismatch { total: 3, .. }));
        w.written(key(1), 5, 10, 3);
        let stored = Stored { segment: 5, first_offset: 10, count: 3, stored_before: 0, total: 3 };
        assert_eq!(w.confirmed(key(1)), Some((stored, vec!["again"])));
        assert_eq!(w.begin(key(1), 3, 2, "late"), Begin::Duplicate { stored, token: "late" });
        // Past the window it is a new request.
        assert_eq!(w.begin(key(1), 3, 2 + WINDOW_MS as i64 + 1, "new"), Begin::Append { skip: 0, token: "new" });
    }

    #[test]
    fn a_failed_attempt_is_forgotten_unless_it_was_written() {
        let mut w = Window::new(WINDOW_MS, 10);
        w.begin(key(1), 1, 0, 1);
        w.begin(key(1), 1, 0, 2);
        assert_eq!(w.failed(key(1)), vec![2]);
        assert_eq!(w.begin(key(1), 1, 0, 3), Begin::Append { skip: 0, token: 3 });
        w.written(key(1), 1, 0, 1);
        w.failed(key(1));
        // Its records may be in the segment: handed over, trimmed there.
        assert_eq!(w.export().len(), 1);
        assert!(matches!(w.begin(key(1), 1, 0, 4), Begin::Waiting));
    }

    #[test]
    fn a_request_cut_short_by_a_fail_over_is_completed_by_its_retry() {
        let mut w: Window<u8> = Window::new(WINDOW_MS, 10);
        w.insert_stored(key(1), Stored { segment: 1, first_offset: 8, count: 5, stored_before: 0, total: 5 }, 0);
        w.trim(1, 10);
        assert_eq!(w.begin(key(1), 5, 1, 0), Begin::Append { skip: 2, token: 0 });
        w.written(key(1), 2, 0, 3);
        let (stored, _) = w.confirmed(key(1)).unwrap();
        assert_eq!(stored, Stored { segment: 2, first_offset: 0, count: 3, stored_before: 2, total: 5 });
        assert_eq!(w.begin(key(1), 5, 2, 1), Begin::Duplicate { stored, token: 1 });
    }

    #[test]
    fn the_count_bound_forgets_the_oldest_first() {
        let mut w: Window<u8> = Window::new(WINDOW_MS, 2);
        for s in 0..3 {
            w.begin(key(s), 1, 0, 0);
            w.written(key(s), 1, s, 1);
            w.confirmed(key(s));
        }
        assert_eq!(w.len(), 2);
        assert_eq!(w.begin(key(0), 1, 0, 0), Begin::Append { skip: 0, token: 0 }, "forgotten");
        assert!(matches!(w.begin(key(2), 1, 0, 0), Begin::Duplicate { .. }));
    }

    #[derive(Debug, Clone)]
    enum Event {
        /// A request (sequence, messages) arrives.
        Publish(u64, u32),
        /// The oldest request in flight is written and confirmed.
        Confirm,
        /// The oldest request in flight fails before it is written.
        Fail,
        Advance(i64),
        /// The primary goes away and the segment is closed `cut` records before its
        /// end; the next generation's window is the one handed over, or (`rebuild`)
        /// the one this generation started from plus the keys its records carry.
        FailOver {
            cut: u64,
            rebuild: bool,
        },
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            // A sequence names one request: its size follows from it.
            4 => (0..6u64).prop_map(|s| Event::Publish(s, (s % 4) as u32 + 1)),
            3 => Just(Event::Confirm),
            1 => Just(Event::Fail),
            1 => (0..600i64).prop_map(Event::Advance),
            1 => (0..5u64, any::<bool>()).prop_map(|(cut, rebuild)| Event::FailOver { cut, rebuild }),
        ]
    }

    /// A record of the open segment: (key, index in its request, storing), and the key
    /// the first record of each request carries, with its time.
    type Rec = (Key, u32, usize, Option<(PublishKey, i64)>);

    /// The window under test and a model of what the segments hold.
    struct Model {
        w: Window<usize>,
        entries_max: usize,
        now: i64,
        segment: SegmentId,
        /// Records in the open segment.
        written: u64,
        /// Requests being appended, oldest first: (key, skip, messages, begun at, place).
        in_flight: VecDeque<(Key, u32, u32, i64, u64)>,
        /// Per key, every stored copy of its messages (by index in the request).
        all: BTreeMap<Key, Vec<u32>>,
        /// Per key, its latest storing (a number) and that storing's messages.
        latest: BTreeMap<Key, (usize, Vec<u32>)>,
        /// When (time, place among keyed requests begun) that storing began.
        began: BTreeMap<Key, (i64, u64)>,
        placed: u64,
        records: Vec<Rec>,
        /// The window this generation started from.
        started: Vec<(Key, Stored, i64)>,
    }

    impl Model {
        fn new(entries_max: usize) -> Self {
            Model {
                w: Window::new(WINDOW_MS, entries_max),
                entries_max,
                now: 0,
                segment: 1,
                written: 0,
                in_flight: VecDeque::new(),
                all: BTreeMap::new(),
                latest: BTreeMap::new(),
                began: BTreeMap::new(),
                placed: 0,
                records: Vec::new(),
                started: Vec::new(),
            }
        }

        /// Request `s` of `n` messages arrives; what the window says is checked.
        fn publish(&mut self, s: u64, n: u32, token: usize) -> Result<(), TestCaseError> {
            let k = key(s);
            let guaranteed = self.began.get(&k).is_some_and(|(at, place)| {
                self.now - at <= WINDOW_MS as i64 && self.placed - place < self.entries_max as u64
            });
            let prefix =
                |held: Option<&Vec<u32>>| (0..n).take_while(|i| held.is_some_and(|h| h.contains(i))).count() as u32;
            let anywhere = prefix(self.all.get(&k));
            let of_latest = prefix(self.latest.get(&k).map(|(_, h)| h));
            let in_flight_here = self.in_flight.iter().any(|(f, ..)| *f == k);
            match self.w.begin(k, n, self.now, token) {
                Begin::Append { skip, .. } => {
                    prop_assert!(!in_flight_here, "{:?} appended while in flight", k);
                    prop_assert!(skip <= anywhere, "{:?} skips {} of {:?}", k, skip, self.all.get(&k));
                    if guaranteed {
                        // Nothing its latest storing holds is appended again.
                        prop_assert!(skip >= of_latest, "{:?} skips {} of {:?}", k, skip, self.latest.get(&k));
                        prop_assert!(of_latest < n, "{:?} complete yet appended", k);
                    }
                    self.placed += 1;
                    self.in_flight.push_back((k, skip, n, self.now, self.placed));
                }
                Begin::Duplicate { stored, .. } => {
                    prop_assert!(!in_flight_here);
                    prop_assert!(stored.complete());
                    prop_assert_eq!(stored.total, n);
                    prop_assert_eq!(anywhere, n, "{:?}: answered as stored, holds {:?}", k, self.all.get(&k));
                }
                Begin::Waiting => prop_assert!(in_flight_here),
                Begin::Mismatch { total, .. } => prop_assert_ne!(total, n),
            }
            Ok(())
        }

        /// The oldest request in flight is written and confirmed.
        fn confirm(&mut self, token: usize) -> Result<(), TestCaseError> {
            let Some((k, skip, n, at, place)) = self.in_flight.pop_front() else { return Ok(()) };
            let count = n - skip;
            self.w.written(k, self.segment, self.written, count);
            // The window runs from a request's first storing: the rest of one cut short
            // continues it.
            if skip == 0 {
                self.latest.insert(k, (token, Vec::new()));
                self.began.insert(k, (at, place));
            }
            let storing = self.latest.get(&k).map_or(token, |(id, _)| *id);
            let carried = PublishKey { producer_id: k.producer, sequence: k.sequence, count: n, stored_before: skip };
            for i in skip..n {
                self.records.push((k, i, storing, (i == skip).then_some((carried, self.now))));
                self.all.entry(k).or_default().push(i);
                if let Some((_, mine)) = self.latest.get_mut(&k) {
                    mine.push(i);
                }
            }
            self.written += u64::from(count);
            let (stored, _) = self.w.confirmed(k).expect("in flight");
            prop_assert_eq!((stored.first_offset, stored.count), (self.written - u64::from(count), count));
            Ok(())
        }

        /// The primary goes away; the segment is closed `cut` records before its end.
        fn fail_over(&mut self, cut: u64, rebuild: bool) {
            // Requests in flight are given up unwritten.
            for (k, ..) in self.in_flight.drain(..) {
                self.w.failed(k);
            }
            let end = self.written.saturating_sub(cut);
            let kept: Vec<Rec> = self.records.drain(..end as usize).collect();
            for (k, i, storing, _) in self.records.drain(..) {
                if let Some(copies) = self.all.get_mut(&k) {
                    if let Some(at) = copies.iter().position(|x| *x == i) {
                        copies.remove(at);
                    }
                }
                if let Some((id, mine)) = self.latest.get_mut(&k) {
                    if *id == storing {
                        mine.retain(|x| *x != i);
                    }
                }
            }
            let mut next: Window<usize> = Window::new(WINDOW_MS, self.entries_max);
            if rebuild {
                for (k, stored, at) in &self.started {
                    next.insert_stored(*k, *stored, *at);
                }
                for (offset, (_, _, _, carried)) in kept.iter().enumerate() {
                    if let Some((key, at)) = carried {
                        let (k, stored) = stored_at(key, self.segment, offset as u64, end);
                        next.insert_stored(k, stored, *at);
                    }
                }
            } else {
                for (k, stored, at) in self.w.export() {
                    next.insert_stored(k, stored, at);
                }
                next.trim(self.segment, end);
            }
            next.evict(self.now);
            self.started = next.export();
            self.w = next;
            self.segment += 1;
            self.written = 0;
        }
    }

    proptest! {
        /// Against a model of what the segments hold: a request is answered as a
        /// duplicate only when all its messages are stored, and appended from `skip` on
        /// only when its first `skip` are; and when its first storing began within the
        /// window and fewer than `entries_max` keyed requests began after it, it is
        /// never appended again in part or whole (a request cut short by a fail-over
        /// gets exactly its missing messages), whether the next generation's window
        /// was handed over or rebuilt from the records. So a request retried within
        /// the window has each of its messages stored once, across fail-overs.
        #[test]
        fn every_message_is_stored_once_within_the_window(
            entries_max in 1..8usize,
            events in prop::collection::vec(event(), 1..120),
        ) {
            let mut m = Model::new(entries_max);
            for (token, e) in events.into_iter().enumerate() {
                match e {
                    Event::Publish(s, n) => m.publish(s, n, token)?,
                    Event::Confirm => m.confirm(token)?,
                    Event::Fail => {
                        if let Some((k, ..)) = m.in_flight.pop_front() {
                            m.w.failed(k);
                        }
                    }
                    Event::Advance(ms) => m.now += ms,
                    Event::FailOver { cut, rebuild } => m.fail_over(cut, rebuild),
                }
            }
        }
    }
}
