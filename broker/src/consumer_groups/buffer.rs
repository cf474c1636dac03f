//! The delivery state machine of one consumer group (SPEC section 5).
//!
//! The group's reader walks the bound topics' segments in offset order and reports
//! every record here exactly once: [`GroupBuffer::offer`] for a record that matched the
//! group's bindings, [`GroupBuffer::skip`] for one that did not, and
//! [`GroupBuffer::mark_read`] for a stretch with no (more) records. Offered messages
//! wait in the pending queue until [`GroupBuffer::dispatch`] hands them out
//! round-robin to subscribers with room in their window; [`GroupBuffer::ack`] removes
//! a message for good, [`GroupBuffer::nack`], [`GroupBuffer::unsubscribe`] and
//! [`GroupBuffer::expire`] (held unacknowledged past the ack timeout) put it back for
//! redelivery. [`GroupBuffer::committed`] tells, per segment, the offset below which
//! nothing needs delivering again: that is what the group persists, so a restarted
//! group resumes there and every message is delivered at least once.
//!
//! Time is passed in ([`Millis`], the driver's monotonic clock from any origin): the
//! core reads no clock, so tests drive it step by step.
//!
//! Invariants (checked against a model by the property test below):
//!
//! 1. Every offered record that is not acked is in exactly one place: the pending
//!    queue or the in-flight map. Its offset is also in its segment's `outstanding`
//!    set. So `pending + in flight == sum of outstanding <= capacity`, and memory is
//!    bounded by the group's `size`, not by how far the reader is ahead or how many
//!    records it skipped.
//! 2. For each segment, every offset below `next` has been reported; those not in
//!    `outstanding` are acked or skipped. Hence `committed = min(outstanding)`, or
//!    `next` when nothing is outstanding, never passes an unacked record.
//! 3. A message in flight with a deadline (ack timeout) is in `deadlines` once, and
//!    nothing else is: [`GroupBuffer::expire`] at time `t` leaves no deadline `<= t`.
//! 4. A message's `delivery_count` is the number of hand-outs so far (plus one when an
//!    earlier run of the group handed it out, see [`GroupBuffer::resume_handed_out`]).
//!
//! Storing the outstanding offsets rather than the done offsets above a watermark is
//! deliberate: done offsets above the oldest unacked message include every skipped
//! record, and a group bound to a rare routing key may skip millions while one
//! message sits in flight. Outstanding offsets are bounded by capacity.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;

/// Milliseconds on the driver's monotonic clock (any origin).
pub type Millis = u64;

/// One message handed to a subscriber, identified by its place in the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// Shared by every delivery of the topic: a delivery is cloned into the in-flight
    /// map, and one allocation per message would show in the consumer's throughput.
    pub topic: Arc<str>,
    pub segment_id: u64,
    pub offset: u64,
    /// When the primary stored it (unix ms): how old the oldest unacknowledged is.
    pub timestamp_ms: i64,
    pub message: Bytes,
    /// Hand-outs so far, this one included (1 the first time); 0 before the first.
    pub delivery_count: u32,
}

impl Delivery {
    /// It was (or may have been) handed out before.
    pub fn redelivered(&self) -> bool {
        self.delivery_count > 1
    }
}

pub type SubscriberId = u64;

/// Why a message left the group without being acknowledged (RabbitMQ's words, as
/// dead letters' `x-first-death-reason` carries them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeathReason {
    /// Delivered `deliveries_max` times.
    DeliveryLimit,
    /// Waited longer than the group's message TTL.
    Expired,
    /// The oldest waiting beyond the group's `ready_messages_max`.
    MaxLength,
}

impl DeathReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DeathReason::DeliveryLimit => "delivery_limit",
            DeathReason::Expired => "expired",
            DeathReason::MaxLength => "maxlen",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    #[error("message not delivered (never delivered, or its segment is gone)")]
    NotInFlight,
}

/// What an accepted ack did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acked {
    /// The message was delivered and unacknowledged (in flight, or back in the queue
    /// after an ack timeout or a nack): it is done now.
    Now,
    /// Nothing left to do: acknowledged before (a retried ack), auto-acknowledged, or
    /// below what the group committed. An offset the group passed without delivering
    /// (it matched no binding) answers the same: the buffer does not keep them.
    Already,
}

/// The reader broke the reporting contract; nothing was changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OfferError {
    /// [`GroupBuffer::free`] was 0: the reader must wait for acks before offering more.
    #[error("consumer group buffer is full")]
    Full,
    /// Records of a segment must be reported once each, in offset order, without gaps
    /// (a gap is declared with [`GroupBuffer::mark_read`]).
    #[error("segment {segment_id}: record {offset} reported out of order, expected {expected}")]
    OutOfOrder { segment_id: u64, offset: u64, expected: u64 },
}

/// (segment_id, offset): orders a subscriber's in-flight messages by log position.
type Key = (u64, u64);

#[derive(Debug, Default)]
struct Segment {
    /// The offset the reader must report next. Every offset below it was reported.
    next: u64,
    /// Offered and not yet acked (pending or in flight). See invariant 1 and 2.
    outstanding: BTreeSet<u64>,
    /// Every offered record below this offset was handed out at least once (the
    /// pending queue is first in, first out per segment; only what was handed out
    /// comes back to its front). Kept across runs of the group with its offsets.
    handed_end: u64,
}

impl Segment {
    fn starting_at(next: u64) -> Self {
        Segment { next, ..Segment::default() }
    }
}

#[derive(Debug)]
struct Subscriber {
    /// 0 = unlimited.
    max_unacked: u32,
    auto_ack: bool,
    /// Ordered so that unsubscribing returns them in log order.
    in_flight: BTreeSet<Key>,
    /// Messages it may still be handed (its `max_messages` less what it got); `None`
    /// = no limit. At 0 it gets nothing more and keeps what it holds.
    budget: Option<u64>,
}

impl Subscriber {
    fn has_room(&self) -> bool {
        if self.budget == Some(0) {
            return false;
        }
        // Auto-ack messages never stay in flight, so the window never fills.
        self.auto_ack || self.max_unacked == 0 || self.in_flight.len() < self.max_unacked as usize
    }
}

/// A message handed to a subscriber and not acked yet.
#[derive(Debug)]
struct InFlight {
    subscriber: SubscriberId,
    /// When it goes back to the queue unless acked (`None`: no ack timeout).
    deadline: Option<Millis>,
    /// Kept so it can be redelivered without reading the segment again.
    delivery: Delivery,
}

#[derive(Debug)]
pub struct GroupBuffer {
    capacity: usize,
    /// How long a message may stay in flight unacknowledged (0: for ever).
    ack_timeout_ms: Millis,
    segments: BTreeMap<u64, Segment>,
    /// Waiting for a subscriber. Redeliveries go to the front, so a returned message
    /// is not starved behind newer ones.
    pending: VecDeque<Delivery>,
    /// Handed to a (non-auto-ack) subscriber and not yet acked.
    in_flight: HashMap<Key, InFlight, foldhash::fast::RandomState>,
    /// A message delivered this many times is not handed out again (0: no limit).
    deliveries_max: u32,
    /// Messages past `deliveries_max`, expired or beyond `ready_max`, taken by
    /// [`Self::take_dead`] and still outstanding until [`Self::dead_lettered`].
    dead: Vec<(Delivery, DeathReason)>,
    /// A message waiting longer than this since it was stored (its `timestamp_ms`)
    /// is not handed out but dead (0: no expiry).
    message_ttl_ms: u64,
    /// At most this many messages wait in the pending queue; the oldest beyond are
    /// dead (0: no limit).
    ready_max: usize,
    /// The wall clock (unix ms) as [`Self::expire_messages`] last told it.
    now_unix_ms: i64,
    /// Taken dead letters not yet settled (they hold buffer room).
    dead_outstanding: BTreeSet<Key>,
    /// The in-flight messages with a deadline, soonest first (invariant 3).
    deadlines: BTreeSet<(Millis, Key)>,
    subscribers: BTreeMap<SubscriberId, Subscriber>,
    next_subscriber_id: SubscriberId,
    /// Round robin: the hand-out after the last one goes to the first subscriber with
    /// room at or after this id (wrapping). Kept across `dispatch` calls so fairness
    /// holds even when messages trickle in one at a time.
    rr_cursor: SubscriberId,
}

impl GroupBuffer {
    /// `capacity`: max messages held (pending + in flight). `start`: per segment the
    /// committed offset (every record below it is done); the reader resumes there.
    /// `ack_timeout_ms`: see [`Self::set_ack_timeout`].
    pub fn new(capacity: usize, start: BTreeMap<u64, u64>, ack_timeout_ms: Millis) -> Self {
        let segments = start.into_iter().map(|(id, next)| (id, Segment::starting_at(next))).collect();
        Self {
            capacity,
            ack_timeout_ms,
            segments,
            pending: VecDeque::new(),
            in_flight: HashMap::default(),
            deliveries_max: 0,
            dead: Vec::new(),
            message_ttl_ms: 0,
            ready_max: 0,
            now_unix_ms: i64::MIN,
            dead_outstanding: BTreeSet::new(),
            deadlines: BTreeSet::new(),
            subscribers: BTreeMap::new(),
            next_subscriber_id: 1,
            rr_cursor: 0,
        }
    }

    /// A message handed out from now on goes back to the queue when it is not acked
    /// within this many milliseconds (0: never). Messages in flight keep their deadline.
    pub fn set_ack_timeout(&mut self, ack_timeout_ms: Millis) {
        self.ack_timeout_ms = ack_timeout_ms;
    }

    /// A message delivered `count` times (0: no limit) is not handed out again but
    /// given to [`Self::take_dead`].
    pub fn set_deliveries_max(&mut self, count: u32) {
        self.deliveries_max = count;
    }

    /// A message that waited (in the pending queue, since it was stored) longer than
    /// `ttl_ms` is not handed out but given to [`Self::take_dead`] (0: no expiry).
    pub fn set_message_ttl(&mut self, ttl_ms: u64) {
        self.message_ttl_ms = ttl_ms;
    }

    /// At most `count` messages wait in the pending queue (0: no limit); the oldest
    /// beyond are given to [`Self::take_dead`] by [`Self::expire_messages`].
    pub fn set_ready_max(&mut self, count: usize) {
        self.ready_max = count;
    }

    /// At wall-clock time `now_unix_ms`: the expired messages at the front of the
    /// pending queue, and the oldest waiting beyond the ready limit, go to the dead
    /// letters (as RabbitMQ expires at the head of a queue; one expired behind a
    /// younger one, as messages of two segments may be, is caught when it reaches the
    /// front or by [`Self::dispatch`], which never hands out an expired message).
    /// Answers how many.
    pub fn expire_messages(&mut self, now_unix_ms: i64) -> usize {
        self.now_unix_ms = self.now_unix_ms.max(now_unix_ms);
        let mut n = 0;
        while self.pending.front().is_some_and(|d| self.expired(d)) {
            let d = self.pending.pop_front().expect("checked");
            self.dead.push((d, DeathReason::Expired));
            n += 1;
        }
        while self.ready_max > 0 && self.pending.len() > self.ready_max {
            let d = self.pending.pop_front().expect("longer than the limit");
            self.dead.push((d, DeathReason::MaxLength));
            n += 1;
        }
        n
    }

    /// When (unix ms) the message at the front of the pending queue expires, if the
    /// group has a TTL: when [`Self::expire_messages`] has work next.
    pub fn next_expiry_unix_ms(&self) -> Option<i64> {
        let ttl = i64::try_from(self.message_ttl_ms).ok().filter(|t| *t > 0)?;
        self.pending.front().map(|d| d.timestamp_ms.saturating_add(ttl))
    }

    fn expired(&self, d: &Delivery) -> bool {
        self.message_ttl_ms > 0
            && i64::try_from(self.message_ttl_ms)
                .is_ok_and(|ttl| d.timestamp_ms.saturating_add(ttl) <= self.now_unix_ms)
    }

    /// The messages that reached the delivery limit, expired or were beyond the ready
    /// limit since the last call, in log order, with why. Each stays outstanding (the
    /// committed offset does not pass it) until [`Self::dead_lettered`].
    pub fn take_dead(&mut self) -> Vec<(Delivery, DeathReason)> {
        self.dead_outstanding.extend(self.dead.iter().map(|(d, _)| (d.segment_id, d.offset)));
        let mut dead = std::mem::take(&mut self.dead);
        dead.sort_unstable_by_key(|(d, _)| (d.segment_id, d.offset));
        dead
    }

    /// A message from [`Self::take_dead`] was published to the dead-letter topic, or
    /// dropped: it is done.
    pub fn dead_lettered(&mut self, segment_id: u64, offset: u64) {
        self.dead_outstanding.remove(&(segment_id, offset));
        self.done((segment_id, offset));
    }

    pub fn ack_timeout_ms(&self) -> Millis {
        self.ack_timeout_ms
    }

    /// Per segment, the offset below which an earlier run of the group handed out
    /// every record it offered ([`Self::handed_out`], as it was recorded): such a
    /// record counts one delivery before its first hand-out here, so it arrives with
    /// `delivery_count` 2 and redelivered. Call before offering anything.
    pub fn resume_handed_out(&mut self, handed: &BTreeMap<u64, u64>) {
        for (&id, &end) in handed {
            if let Some(seg) = self.segments.get_mut(&id) {
                seg.handed_end = seg.handed_end.max(end);
            }
        }
    }

    /// Per segment, the offset below which every offered record was handed out at
    /// least once (recorded with the committed offsets; see [`Self::resume_handed_out`]).
    pub fn handed_out(&self) -> BTreeMap<u64, u64> {
        self.segments.iter().filter(|(_, s)| s.handed_end > 0).map(|(&id, s)| (id, s.handed_end)).collect()
    }

    /// How many more messages may be offered now.
    pub fn free(&self) -> usize {
        self.capacity
            .saturating_sub(self.pending.len() + self.in_flight.len() + self.dead.len() + self.dead_outstanding.len())
    }

    /// A record that matched the group's bindings. Records of one segment are reported
    /// (offered, skipped or marked read) in offset order starting at the segment's
    /// committed offset; the first record reported for an unknown segment sets its
    /// start. On error nothing changes.
    pub fn offer(&mut self, mut d: Delivery) -> Result<(), OfferError> {
        if self.free() == 0 {
            return Err(OfferError::Full);
        }
        let seg = self.report(d.segment_id, d.offset)?;
        seg.outstanding.insert(d.offset);
        if d.offset < seg.handed_end {
            d.delivery_count = d.delivery_count.max(1);
        }
        self.pending.push_back(d);
        Ok(())
    }

    /// A record that matched nothing: done at once. Needs no room.
    pub fn skip(&mut self, segment_id: u64, offset: u64) -> Result<(), OfferError> {
        self.report(segment_id, offset).map(|_| ())
    }

    /// Declares that the segment has no records to report below `next_offset` beyond
    /// those already reported (e.g. a closed segment read to its end, or a gap), so
    /// that [`Self::committed`] can reach `next_offset`. Never moves backwards; for an
    /// unknown segment it sets the start.
    pub fn mark_read(&mut self, segment_id: u64, next_offset: u64) {
        let seg = self.segments.entry(segment_id).or_insert(Segment::starting_at(next_offset));
        seg.next = seg.next.max(next_offset);
    }

    /// Checks the reporting order and advances the segment's read position.
    fn report(&mut self, segment_id: u64, offset: u64) -> Result<&mut Segment, OfferError> {
        let seg = self.segments.entry(segment_id).or_insert(Segment::starting_at(offset));
        if offset != seg.next {
            return Err(OfferError::OutOfOrder { segment_id, offset, expected: seg.next });
        }
        seg.next = offset.saturating_add(1);
        Ok(seg)
    }

    /// `max_unacked`: the subscriber's window (0 = unlimited). With `auto_ack` its
    /// messages count as acked when handed out.
    pub fn subscribe(&mut self, max_unacked: u32, auto_ack: bool) -> SubscriberId {
        let id = self.next_subscriber_id;
        self.next_subscriber_id += 1;
        self.subscribers.insert(id, Subscriber { max_unacked, auto_ack, in_flight: BTreeSet::new(), budget: None });
        id
    }

    /// Messages the subscriber holds unacknowledged (0 for an unknown id).
    pub fn in_flight_of(&self, id: SubscriberId) -> usize {
        self.subscribers.get(&id).map_or(0, |s| s.in_flight.len())
    }

    /// Hands the subscriber nothing more; what it holds stays in flight until it acks,
    /// nacks, unsubscribes or its ack timeout passes.
    pub fn stop_dispatch(&mut self, id: SubscriberId) {
        self.limit_hand_outs(id, 0);
    }

    /// Hands the subscriber `count` more messages at most, whatever its window (a
    /// subscription with `max_messages`: acks free its window, not its budget).
    pub fn limit_hand_outs(&mut self, id: SubscriberId, count: u64) {
        if let Some(s) = self.subscribers.get_mut(&id) {
            s.budget = Some(count);
        }
    }

    /// The subscriber's in-flight messages go back to the front of the pending queue,
    /// in log order, for redelivery. Unknown ids are ignored (unsubscribing twice is
    /// harmless).
    pub fn unsubscribe(&mut self, id: SubscriberId) {
        let Some(sub) = self.subscribers.remove(&id) else { return };
        let keys: Vec<Key> = sub.in_flight.into_iter().collect();
        self.requeue(&keys);
    }

    /// Takes the in-flight messages of `keys` (in log order) back to the front of the
    /// pending queue, in that order.
    fn requeue(&mut self, keys: &[Key]) {
        // Pushing to the front in reverse leaves the smallest position first.
        for &key in keys.iter().rev() {
            if let Ok(d) = self.take_in_flight(key) {
                self.return_to_queue(d);
            }
        }
    }

    /// A delivered message back to the front of the queue, or, once delivered
    /// `deliveries_max` times, to the dead letters ([`Self::take_dead`]).
    fn return_to_queue(&mut self, d: Delivery) {
        if self.deliveries_max > 0 && d.delivery_count >= self.deliveries_max {
            self.dead.push((d, DeathReason::DeliveryLimit));
        } else {
            self.pending.push_front(d);
        }
    }

    /// Messages in flight whose ack timeout passed at `now` go back to the front of
    /// the pending queue, in log order, for redelivery to any subscriber (the same
    /// one included). Answers how many.
    pub fn expire(&mut self, now: Millis) -> usize {
        let mut keys: Vec<Key> = self.deadlines.range(..=(now, (u64::MAX, u64::MAX))).map(|(_, k)| *k).collect();
        keys.sort_unstable();
        self.requeue(&keys);
        keys.len()
    }

    /// The soonest deadline of a message in flight: when [`Self::expire`] has work.
    pub fn next_deadline(&self) -> Option<Millis> {
        self.deadlines.first().map(|(t, _)| *t)
    }

    /// Hands pending messages out at `now`, front first, round-robin over subscribers
    /// with room (in flight < max_unacked), until the queue is empty or every window
    /// is full. Auto-ack subscribers always have room: their messages are acked here
    /// and never count as in flight, so pacing a slow auto-ack stream is the caller's
    /// job. Each hand-out counts in the message's `delivery_count`.
    pub fn dispatch(&mut self, now: Millis) -> Vec<(SubscriberId, Delivery)> {
        let mut out = Vec::new();
        let deadline = (self.ack_timeout_ms > 0).then(|| now.saturating_add(self.ack_timeout_ms));
        while !self.pending.is_empty() {
            let Some(id) = self.next_with_room() else { break };
            self.rr_cursor = id.wrapping_add(1);
            let mut d = self.pending.pop_front().expect("checked non-empty");
            if self.deliveries_max > 0 && d.delivery_count >= self.deliveries_max {
                self.dead.push((d, DeathReason::DeliveryLimit));
                continue;
            }
            if self.expired(&d) {
                self.dead.push((d, DeathReason::Expired));
                continue;
            }
            d.delivery_count = d.delivery_count.saturating_add(1);
            let key = (d.segment_id, d.offset);
            if let Some(seg) = self.segments.get_mut(&key.0) {
                seg.handed_end = seg.handed_end.max(key.1 + 1);
            }
            let sub = self.subscribers.get_mut(&id).expect("found above");
            if let Some(b) = &mut sub.budget {
                *b -= 1; // has room: more than 0 left
            }
            if sub.auto_ack {
                self.done(key);
            } else {
                sub.in_flight.insert(key);
                if let Some(t) = deadline {
                    self.deadlines.insert((t, key));
                }
                self.in_flight.insert(key, InFlight { subscriber: id, deadline, delivery: d.clone() });
            }
            out.push((id, d));
        }
        out
    }

    fn next_with_room(&self) -> Option<SubscriberId> {
        let from_cursor = self.subscribers.range(self.rr_cursor..);
        let wrapped = self.subscribers.range(..self.rr_cursor);
        from_cursor.chain(wrapped).find(|(_, s)| s.has_room()).map(|(id, _)| *id)
    }

    /// Removes a delivered message for good: one in flight, or one back in the queue
    /// after an ack timeout or a nack (a late ack still counts). Acking again what is
    /// done answers [`Acked::Already`], so a retried ack is harmless; only a message
    /// never delivered (or of a segment the group does not know) is refused.
    pub fn ack(&mut self, segment_id: u64, offset: u64) -> Result<Acked, AckError> {
        let key = (segment_id, offset);
        if self.take_in_flight(key).is_ok() {
            self.done(key);
            return Ok(Acked::Now);
        }
        let seg = self.segments.get(&segment_id).ok_or(AckError::NotInFlight)?;
        if seg.outstanding.contains(&offset) {
            if let Some(i) = self.dead.iter().position(|(d, _)| (d.segment_id, d.offset) == key) {
                // Past its delivery limit, acked before it was dead-lettered.
                self.dead.remove(i);
            } else if self.take_redelivery(key).is_err() {
                // Being dead-lettered (a late ack changes nothing), or never delivered.
                let dead_lettering = self.dead_outstanding.contains(&key);
                return if dead_lettering { Ok(Acked::Already) } else { Err(AckError::NotInFlight) };
            }
            self.done(key);
            return Ok(Acked::Now);
        }
        if offset < seg.next {
            return Ok(Acked::Already);
        }
        Err(AckError::NotInFlight)
    }

    /// Returns an in-flight message to the front of the pending queue for redelivery.
    /// One that waits there already after a delivery (a retried nack, an ack timeout)
    /// stays where it is.
    pub fn nack(&mut self, segment_id: u64, offset: u64) -> Result<(), AckError> {
        let key = (segment_id, offset);
        match self.take_in_flight(key) {
            Ok(d) => self.return_to_queue(d),
            Err(e) => {
                let waiting = self.pending.iter().any(|d| (d.segment_id, d.offset) == key && d.delivery_count > 0);
                if !waiting {
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Removes from the pending queue a message that was delivered before.
    fn take_redelivery(&mut self, key: Key) -> Result<Delivery, AckError> {
        let i = self
            .pending
            .iter()
            .position(|d| (d.segment_id, d.offset) == key && d.delivery_count > 0)
            .ok_or(AckError::NotInFlight)?;
        Ok(self.pending.remove(i).expect("found above"))
    }

    fn take_in_flight(&mut self, key: Key) -> Result<Delivery, AckError> {
        let f = self.in_flight.remove(&key).ok_or(AckError::NotInFlight)?;
        if let Some(sub) = self.subscribers.get_mut(&f.subscriber) {
            sub.in_flight.remove(&key);
        }
        if let Some(t) = f.deadline {
            self.deadlines.remove(&(t, key));
        }
        Ok(f.delivery)
    }

    /// The message left the buffer for good (acked or auto-acked).
    fn done(&mut self, (segment_id, offset): Key) {
        if let Some(seg) = self.segments.get_mut(&segment_id) {
            seg.outstanding.remove(&offset);
        }
    }

    /// Per segment: the offset below which every record is acked or skipped (or was
    /// below the start). Safe to persist: a group resumed from it loses nothing
    /// unacked; it redelivers only messages acked out of order above it.
    pub fn committed(&self) -> BTreeMap<u64, u64> {
        self.segments.iter().map(|(&id, seg)| (id, seg.outstanding.first().copied().unwrap_or(seg.next))).collect()
    }

    /// Offsets of the segment offered and not acked (pending or in flight).
    pub fn outstanding_offsets(&self, segment_id: u64) -> BTreeSet<u64> {
        self.segments.get(&segment_id).map(|s| s.outstanding.clone()).unwrap_or_default()
    }

    /// The segment is deleted (retention, topic deleted): drops its pending and
    /// in-flight messages (later acks of them fail with `NotInFlight`) and its
    /// committed offset. Reporting a record of it again starts it afresh.
    pub fn forget_segment(&mut self, segment_id: u64) {
        if self.segments.remove(&segment_id).is_none() {
            // Invariant 1: nothing of an unknown segment can be held.
            return;
        }
        self.pending.retain(|d| d.segment_id != segment_id);
        self.dead.retain(|(d, _)| d.segment_id != segment_id);
        self.dead_outstanding.retain(|key| key.0 != segment_id);
        self.deadlines.retain(|(_, key)| key.0 != segment_id);
        let subscribers = &mut self.subscribers;
        self.in_flight.retain(|key, f| {
            let keep = key.0 != segment_id;
            if !keep {
                if let Some(sub) = subscribers.get_mut(&f.subscriber) {
                    sub.in_flight.remove(key);
                }
            }
            keep
        });
    }

    /// Drops the messages waiting for a subscriber (fresh ones and those back after a
    /// delivery) of each segment of `below` whose offset is under its figure there, as
    /// acknowledged (a purge): nothing in flight is touched. Answers how many.
    pub fn purge_pending(&mut self, below: &BTreeMap<u64, u64>) -> usize {
        let mut purged = Vec::new();
        self.pending.retain(|d| {
            let purge = below.get(&d.segment_id).is_some_and(|end| d.offset < *end);
            if purge {
                purged.push((d.segment_id, d.offset));
            }
            !purge
        });
        for key in &purged {
            self.done(*key);
        }
        purged.len()
    }

    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    pub fn in_flight_len(&self) -> usize {
        self.in_flight.len()
    }

    pub fn subscriber_count(&self) -> usize {
        self.subscribers.len()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Offered and not yet acknowledged messages of a segment (pending or in flight).
    pub fn outstanding(&self, segment_id: u64) -> usize {
        self.segments.get(&segment_id).map_or(0, |s| s.outstanding.len())
    }

    /// When the oldest message held unacknowledged (pending or in flight) was stored.
    /// A scan of at most `capacity` messages: asked at a scrape, not per message.
    pub fn oldest_timestamp_ms(&self) -> Option<i64> {
        let pending = self.pending.iter().map(|d| d.timestamp_ms);
        pending.chain(self.in_flight.values().map(|f| f.delivery.timestamp_ms)).min()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    fn msg(segment_id: u64, offset: u64) -> Delivery {
        Delivery {
            topic: "t".into(),
            segment_id,
            offset,
            timestamp_ms: 0,
            message: Bytes::from(format!("{segment_id}:{offset}")),
            delivery_count: 0,
        }
    }

    fn positions(ds: &[(SubscriberId, Delivery)]) -> Vec<(SubscriberId, u64, u64)> {
        ds.iter().map(|(s, d)| (*s, d.segment_id, d.offset)).collect()
    }

    fn offer_range(buf: &mut GroupBuffer, segment_id: u64, offsets: std::ops::Range<u64>) {
        for o in offsets {
            buf.offer(msg(segment_id, o)).unwrap();
        }
    }

    #[test]
    fn round_robin_over_three_subscribers() {
        let mut buf = GroupBuffer::new(100, BTreeMap::new(), 0);
        let a = buf.subscribe(0, false);
        let b = buf.subscribe(0, false);
        let c = buf.subscribe(0, false);
        offer_range(&mut buf, 1, 0..9);
        let got = positions(&buf.dispatch(0));
        let owners: Vec<_> = got.iter().map(|(s, _, _)| *s).collect();
        assert_eq!(owners, [a, b, c, a, b, c, a, b, c]);
        // Pending order is kept.
        assert_eq!(got.iter().map(|(_, _, o)| *o).collect::<Vec<_>>(), (0..9).collect::<Vec<_>>());

        // Fair across calls too: one message at a time keeps rotating.
        let mut owners = Vec::new();
        for o in 9..15 {
            buf.offer(msg(1, o)).unwrap();
            owners.extend(buf.dispatch(0).into_iter().map(|(s, _)| s));
        }
        assert_eq!(owners, [a, b, c, a, b, c]);
    }

    #[test]
    fn round_robin_continues_after_subscriber_changes() {
        let mut buf = GroupBuffer::new(100, BTreeMap::new(), 0);
        let a = buf.subscribe(0, true);
        let b = buf.subscribe(0, true);
        offer_range(&mut buf, 1, 0..1);
        assert_eq!(buf.dispatch(0)[0].0, a);
        let c = buf.subscribe(0, true);
        buf.unsubscribe(a);
        offer_range(&mut buf, 1, 1..5);
        let owners: Vec<_> = buf.dispatch(0).into_iter().map(|(s, _)| s).collect();
        assert_eq!(owners, [b, c, b, c]);
    }

    #[test]
    fn window_is_respected() {
        let mut buf = GroupBuffer::new(100, BTreeMap::new(), 0);
        let a = buf.subscribe(1, false);
        let b = buf.subscribe(3, false);
        offer_range(&mut buf, 1, 0..10);
        // a takes one, then only b has room.
        assert_eq!(positions(&buf.dispatch(0)), [(a, 1, 0), (b, 1, 1), (b, 1, 2), (b, 1, 3)]);
        assert!(buf.dispatch(0).is_empty());
        assert_eq!((buf.pending_len(), buf.in_flight_len()), (6, 4));

        buf.ack(1, 2).unwrap();
        assert_eq!(positions(&buf.dispatch(0)), [(b, 1, 4)]);
        buf.ack(1, 0).unwrap();
        buf.ack(1, 1).unwrap();
        // Both have room; the rotation goes on from after b.
        assert_eq!(positions(&buf.dispatch(0)), [(a, 1, 5), (b, 1, 6)]);
        assert_eq!(buf.in_flight_len(), 4);
    }

    #[test]
    fn no_subscribers_means_no_dispatch() {
        let mut buf = GroupBuffer::new(10, BTreeMap::new(), 0);
        offer_range(&mut buf, 1, 0..3);
        assert!(buf.dispatch(0).is_empty());
        assert_eq!(buf.pending_len(), 3);
        assert_eq!(buf.subscriber_count(), 0);
    }

    #[test]
    fn auto_ack_messages_are_done_when_handed_out() {
        let mut buf = GroupBuffer::new(3, BTreeMap::from([(1, 0)]), 0);
        let a = buf.subscribe(1, true);
        offer_range(&mut buf, 1, 0..3);
        assert_eq!(buf.free(), 0);
        // The window of 1 does not limit an auto-ack subscriber: nothing stays in flight.
        assert_eq!(positions(&buf.dispatch(0)), [(a, 1, 0), (a, 1, 1), (a, 1, 2)]);
        assert_eq!((buf.pending_len(), buf.in_flight_len(), buf.free()), (0, 0, 3));
        assert_eq!(buf.committed(), BTreeMap::from([(1, 3)]));
        // Acking an auto-acked message is harmless; nacking it is refused.
        assert_eq!(buf.ack(1, 0), Ok(Acked::Already));
        assert_eq!(buf.nack(1, 0), Err(AckError::NotInFlight));
    }

    #[test]
    fn auto_ack_and_manual_subscribers_share() {
        let mut buf = GroupBuffer::new(10, BTreeMap::new(), 0);
        let manual = buf.subscribe(1, false);
        let auto = buf.subscribe(1, true);
        offer_range(&mut buf, 1, 0..4);
        assert_eq!(positions(&buf.dispatch(0)), [(manual, 1, 0), (auto, 1, 1), (auto, 1, 2), (auto, 1, 3)]);
        assert_eq!(buf.in_flight_len(), 1);
        // Offset 0 is unacked: nothing can be committed past it.
        assert_eq!(buf.committed(), BTreeMap::from([(1, 0)]));
        buf.ack(1, 0).unwrap();
        assert_eq!(buf.committed(), BTreeMap::from([(1, 4)]));
    }

    #[test]
    fn ack_removes_for_good() {
        let mut buf = GroupBuffer::new(10, BTreeMap::new(), 0);
        buf.subscribe(0, false);
        offer_range(&mut buf, 1, 0..2);
        // Pending, never delivered: not ackable.
        assert_eq!(buf.ack(1, 0), Err(AckError::NotInFlight));
        buf.dispatch(0);
        assert_eq!(buf.ack(1, 0), Ok(Acked::Now));
        // Acked again (a retry after a lost answer): done already, no error.
        assert_eq!(buf.ack(1, 0), Ok(Acked::Already));
        assert_eq!(buf.nack(1, 0), Err(AckError::NotInFlight));
        // Never read, or an unknown segment: refused.
        assert_eq!(buf.ack(1, 5), Err(AckError::NotInFlight));
        assert_eq!(buf.ack(7, 0), Err(AckError::NotInFlight));
        assert!(buf.dispatch(0).is_empty());
        assert_eq!((buf.pending_len(), buf.in_flight_len(), buf.free()), (0, 1, 9));
    }

    #[test]
    fn nack_redelivers_before_newer_messages() {
        let mut buf = GroupBuffer::new(10, BTreeMap::new(), 0);
        let a = buf.subscribe(2, false);
        offer_range(&mut buf, 1, 0..5);
        assert_eq!(positions(&buf.dispatch(0)), [(a, 1, 0), (a, 1, 1)]);
        buf.nack(1, 1).unwrap();
        buf.nack(1, 0).unwrap();
        // Each nack pushed to the front: the last nacked comes first.
        assert_eq!(positions(&buf.dispatch(0)), [(a, 1, 0), (a, 1, 1)]);
        buf.nack(1, 1).unwrap();
        buf.ack(1, 0).unwrap();
        assert_eq!(positions(&buf.dispatch(0)), [(a, 1, 1), (a, 1, 2)]);
        assert_eq!(buf.committed(), BTreeMap::from([(1, 1)]));
    }

    #[test]
    fn unsubscribe_returns_in_flight_to_the_front_in_log_order() {
        let mut buf = GroupBuffer::new(20, BTreeMap::new(), 0);
        let a = buf.subscribe(0, false);
        let b = buf.subscribe(0, false);
        offer_range(&mut buf, 2, 0..3);
        offer_range(&mut buf, 1, 0..3);
        offer_range(&mut buf, 2, 3..6);
        // a: 2/0, 2/2, 1/1, 2/3, 2/5; b: 2/1, 1/0, 1/2, 2/4.
        let first = positions(&buf.dispatch(0));
        assert_eq!(first.len(), 9);
        buf.ack(2, 2).unwrap();
        offer_range(&mut buf, 3, 0..2);
        buf.unsubscribe(a);
        assert_eq!(buf.subscriber_count(), 1);
        // a's unacked messages, ordered by (segment, offset), then the newer ones.
        let c = buf.subscribe(0, false);
        buf.unsubscribe(b);
        let again = positions(&buf.dispatch(0));
        let order: Vec<_> = again.iter().map(|(_, s, o)| (*s, *o)).collect();
        // b's went to the front after a's, each group in log order.
        assert_eq!(order, [(1, 0), (1, 2), (2, 1), (2, 4), (1, 1), (2, 0), (2, 3), (2, 5), (3, 0), (3, 1)]);
        assert!(again.iter().all(|(s, _, _)| *s == c));
        buf.unsubscribe(a); // twice: harmless
        assert_eq!(buf.subscriber_count(), 1);
    }

    #[test]
    fn committed_never_passes_an_unacked_record() {
        let mut buf = GroupBuffer::new(10, BTreeMap::from([(1, 10)]), 0);
        buf.subscribe(0, false);
        assert_eq!(buf.committed(), BTreeMap::from([(1, 10)]));
        buf.skip(1, 10).unwrap();
        assert_eq!(buf.committed(), BTreeMap::from([(1, 11)]));
        offer_range(&mut buf, 1, 11..14); // 11, 12, 13
        buf.skip(1, 14).unwrap();
        assert_eq!(buf.committed(), BTreeMap::from([(1, 11)]));
        buf.dispatch(0);
        buf.ack(1, 13).unwrap();
        buf.ack(1, 12).unwrap();
        assert_eq!(buf.committed(), BTreeMap::from([(1, 11)]));
        buf.ack(1, 11).unwrap();
        assert_eq!(buf.committed(), BTreeMap::from([(1, 15)]));
    }

    #[test]
    fn skips_need_no_room_and_hold_no_memory() {
        let mut buf = GroupBuffer::new(1, BTreeMap::new(), 0);
        buf.offer(msg(1, 0)).unwrap();
        assert_eq!(buf.offer(msg(1, 1)), Err(OfferError::Full));
        for o in 1..10_000 {
            buf.skip(1, o).unwrap();
        }
        assert_eq!(buf.committed(), BTreeMap::from([(1, 0)]));
        let a = buf.subscribe(0, false);
        assert_eq!(positions(&buf.dispatch(0)), [(a, 1, 0)]);
        buf.ack(1, 0).unwrap();
        assert_eq!(buf.committed(), BTreeMap::from([(1, 10_000)]));
        assert_eq!(buf.free(), 1);
    }

    #[test]
    fn reports_must_be_in_order_from_the_start() {
        let mut buf = GroupBuffer::new(10, BTreeMap::from([(1, 5)]), 0);
        assert_eq!(buf.offer(msg(1, 0)), Err(OfferError::OutOfOrder { segment_id: 1, offset: 0, expected: 5 }));
        assert_eq!(buf.skip(1, 6), Err(OfferError::OutOfOrder { segment_id: 1, offset: 6, expected: 5 }));
        buf.offer(msg(1, 5)).unwrap();
        // Reported twice.
        assert_eq!(buf.offer(msg(1, 5)), Err(OfferError::OutOfOrder { segment_id: 1, offset: 5, expected: 6 }));
        assert_eq!(buf.skip(1, 5), Err(OfferError::OutOfOrder { segment_id: 1, offset: 5, expected: 6 }));
        assert_eq!(buf.pending_len(), 1);
        // An unknown segment starts wherever its first record is.
        buf.skip(2, 42).unwrap();
        buf.offer(msg(3, 7)).unwrap();
        assert_eq!(buf.committed(), BTreeMap::from([(1, 5), (2, 43), (3, 7)]));
        // A rejected offer into an unknown segment while full creates nothing.
        let mut full = GroupBuffer::new(0, BTreeMap::new(), 0);
        assert_eq!(full.offer(msg(9, 0)), Err(OfferError::Full));
        assert!(full.committed().is_empty());
    }

    #[test]
    fn capacity_counts_pending_and_in_flight() {
        let mut buf = GroupBuffer::new(3, BTreeMap::new(), 0);
        assert_eq!(buf.free(), 3);
        offer_range(&mut buf, 1, 0..3);
        assert_eq!(buf.free(), 0);
        assert_eq!(buf.offer(msg(1, 3)), Err(OfferError::Full));
        buf.subscribe(0, false);
        buf.dispatch(0);
        assert_eq!(buf.free(), 0); // in flight still counts
        buf.nack(1, 1).unwrap();
        assert_eq!(buf.free(), 0); // back in pending
        buf.ack(1, 0).unwrap();
        assert_eq!(buf.free(), 1);
        buf.offer(msg(1, 3)).unwrap();
    }

    #[test]
    fn mark_read_lets_committed_reach_the_end() {
        let mut buf = GroupBuffer::new(10, BTreeMap::from([(1, 3)]), 0);
        buf.mark_read(1, 8);
        assert_eq!(buf.committed(), BTreeMap::from([(1, 8)]));
        buf.mark_read(1, 4); // never backwards
        assert_eq!(buf.committed(), BTreeMap::from([(1, 8)]));
        buf.offer(msg(1, 8)).unwrap();
        buf.mark_read(1, 20);
        assert_eq!(buf.committed(), BTreeMap::from([(1, 8)]));
        assert_eq!(buf.skip(1, 9), Err(OfferError::OutOfOrder { segment_id: 1, offset: 9, expected: 20 }));
        buf.subscribe(0, true);
        buf.dispatch(0);
        assert_eq!(buf.committed(), BTreeMap::from([(1, 20)]));
        buf.mark_read(2, 5);
        assert_eq!(buf.committed(), BTreeMap::from([(1, 20), (2, 5)]));
    }

    #[test]
    fn purge_drops_what_waits_below_the_ends_and_keeps_what_is_in_flight() {
        let mut buf = GroupBuffer::new(10, BTreeMap::new(), 0);
        let sub = buf.subscribe(2, false);
        offer_range(&mut buf, 7, 0..5);
        let handed = buf.dispatch(0);
        assert_eq!(positions(&handed), vec![(sub, 7, 0), (sub, 7, 1)]);
        buf.nack(7, 1).unwrap(); // back in the queue after a delivery: ready again
                                 // Offsets 1..4 wait; 4 is at or past the end the purge names.
        assert_eq!(buf.purge_pending(&BTreeMap::from([(7, 4), (8, 100)])), 3);
        assert_eq!((buf.pending_len(), buf.in_flight_len()), (1, 1));
        assert_eq!(buf.committed()[&7], 0, "0 is still in flight");
        assert_eq!(buf.ack(7, 0), Ok(Acked::Now));
        assert_eq!(buf.committed()[&7], 4, "purged messages count as done");
        assert_eq!(buf.dispatch(0).len(), 1);
    }

    #[test]
    fn forget_segment_drops_everything_of_it() {
        let mut buf = GroupBuffer::new(10, BTreeMap::from([(1, 0), (2, 0)]), 0);
        let a = buf.subscribe(2, false);
        offer_range(&mut buf, 1, 0..3);
        offer_range(&mut buf, 2, 0..2);
        assert_eq!(positions(&buf.dispatch(0)), [(a, 1, 0), (a, 1, 1)]);
        buf.forget_segment(1);
        assert_eq!(buf.committed(), BTreeMap::from([(2, 0)]));
        assert_eq!((buf.pending_len(), buf.in_flight_len(), buf.free()), (2, 0, 8));
        assert_eq!(buf.ack(1, 0), Err(AckError::NotInFlight));
        // a's window is free again.
        assert_eq!(positions(&buf.dispatch(0)), [(a, 2, 0), (a, 2, 1)]);
        buf.forget_segment(1); // twice: harmless
        buf.forget_segment(9);
        // Reported again, it starts afresh.
        buf.skip(1, 100).unwrap();
        assert_eq!(buf.committed(), BTreeMap::from([(1, 101), (2, 0)]));
    }

    #[test]
    fn a_message_past_its_delivery_limit_is_dead_lettered_not_delivered() {
        let mut buf = GroupBuffer::new(3, BTreeMap::new(), 0);
        buf.set_deliveries_max(2);
        let a = buf.subscribe(0, false);
        offer_range(&mut buf, 1, 0..2);
        for count in 1..=2 {
            let got = buf.dispatch(0);
            assert_eq!(positions(&got), [(a, 1, 0), (a, 1, 1)]);
            assert!(got.iter().all(|(_, d)| d.delivery_count == count));
            // Each nack goes to the front: the last one nacked comes first.
            buf.nack(1, 1).unwrap();
            buf.nack(1, 0).unwrap();
        }
        // Delivered twice: not again. Both wait to be dead-lettered, holding room.
        assert!(buf.dispatch(0).is_empty());
        assert_eq!(buf.free(), 1);
        // Acked before it was taken: done, not dead-lettered.
        assert_eq!(buf.ack(1, 0), Ok(Acked::Now));
        let dead = buf.take_dead();
        assert_eq!(
            dead.iter().map(|(d, why)| (d.offset, d.delivery_count, *why)).collect::<Vec<_>>(),
            [(1, 2, DeathReason::DeliveryLimit)]
        );
        // While it is being dead-lettered a late ack changes nothing.
        assert_eq!(buf.ack(1, 1), Ok(Acked::Already));
        assert_eq!(buf.committed(), BTreeMap::from([(1, 1)]));
        buf.dead_lettered(1, 1);
        assert_eq!((buf.committed(), buf.free()), (BTreeMap::from([(1, 2)]), 3));
    }

    /// Stored at `timestamp_ms` (unix ms).
    fn stored_at(segment_id: u64, offset: u64, timestamp_ms: i64) -> Delivery {
        Delivery { timestamp_ms, ..msg(segment_id, offset) }
    }

    #[test]
    fn a_message_waiting_past_its_ttl_is_dead_not_delivered() {
        let mut buf = GroupBuffer::new(10, BTreeMap::new(), 0);
        buf.set_message_ttl(1_000);
        for (offset, at) in [(0, 10_000), (1, 10_500), (2, 11_000)] {
            buf.offer(stored_at(1, offset, at)).unwrap();
        }
        assert_eq!(buf.next_expiry_unix_ms(), Some(11_000));
        // At 11,000 the first one has waited its 1,000 ms: expired at the front.
        assert_eq!(buf.expire_messages(10_999), 0);
        assert_eq!(buf.expire_messages(11_000), 1);
        assert_eq!(buf.next_expiry_unix_ms(), Some(11_500));
        // One that expired while the front is younger is not handed out either.
        buf.offer(stored_at(2, 0, 9_000)).unwrap();
        let a = buf.subscribe(0, false);
        let got = buf.dispatch(0);
        assert_eq!(positions(&got), [(a, 1, 1), (a, 1, 2)]);
        let dead: Vec<_> = buf.take_dead().into_iter().map(|(d, why)| (d.segment_id, d.offset, why)).collect();
        assert_eq!(dead, [(1, 0, DeathReason::Expired), (2, 0, DeathReason::Expired)]);
        // Dead, they hold the committed offsets until dead-lettered (or dropped).
        assert_eq!(buf.committed(), BTreeMap::from([(1, 0), (2, 0)]));
        buf.dead_lettered(1, 0);
        buf.dead_lettered(2, 0);
        assert_eq!(buf.committed(), BTreeMap::from([(1, 1), (2, 1)]), "up to the first one in flight");
        // A delivered message nacked after its TTL passed is not delivered again.
        buf.nack(1, 1).unwrap();
        buf.expire_messages(11_600);
        assert_eq!(positions(&buf.dispatch(0)), []);
        let dead: Vec<_> = buf.take_dead().into_iter().map(|(d, why)| (d.offset, d.delivery_count, why)).collect();
        assert_eq!(dead, [(1, 1, DeathReason::Expired)]);
        // In flight, a message does not expire (the TTL is time in the queue).
        assert_eq!(buf.in_flight_of(a), 1);
        // No TTL: nothing expires.
        buf.set_message_ttl(0);
        buf.offer(stored_at(1, 3, 0)).unwrap();
        assert_eq!((buf.expire_messages(i64::MAX), buf.next_expiry_unix_ms()), (0, None));
        assert_eq!(positions(&buf.dispatch(0)), [(a, 1, 3)]);
    }

    #[test]
    fn beyond_the_ready_limit_the_oldest_waiting_are_dead() {
        let mut buf = GroupBuffer::new(10, BTreeMap::new(), 0);
        buf.set_ready_max(2);
        offer_range(&mut buf, 1, 0..5);
        assert_eq!(buf.expire_messages(0), 3);
        assert_eq!(buf.pending_len(), 2);
        let dead: Vec<_> = buf.take_dead().into_iter().map(|(d, why)| (d.offset, why)).collect();
        assert_eq!(dead, [(0, DeathReason::MaxLength), (1, DeathReason::MaxLength), (2, DeathReason::MaxLength)]);
        // Delivered and unacknowledged messages do not count.
        let a = buf.subscribe(1, false);
        assert_eq!(positions(&buf.dispatch(0)), [(a, 1, 3)]);
        offer_range(&mut buf, 1, 5..7);
        assert_eq!(buf.expire_messages(0), 1);
        assert_eq!(positions(&buf.take_dead().into_iter().map(|(d, _)| (a, d)).collect::<Vec<_>>()), [(a, 1, 4)]);
        assert_eq!((buf.pending_len(), buf.in_flight_len()), (2, 1));
    }

    #[test]
    fn a_limited_subscriber_gets_its_count_whatever_it_acks() {
        let mut buf = GroupBuffer::new(10, BTreeMap::new(), 0);
        let a = buf.subscribe(2, false);
        buf.limit_hand_outs(a, 3);
        let b = buf.subscribe(0, false);
        offer_range(&mut buf, 1, 0..8);
        let first = buf.dispatch(0);
        assert_eq!(
            positions(&first),
            [(a, 1, 0), (b, 1, 1), (a, 1, 2), (b, 1, 3), (b, 1, 4), (b, 1, 5), (b, 1, 6), (b, 1, 7)]
        );
        buf.ack(1, 0).unwrap();
        buf.ack(1, 2).unwrap();
        buf.nack(1, 1).unwrap();
        // a's window is free again, but it has one hand-out left.
        assert_eq!(positions(&buf.dispatch(0)), [(a, 1, 1)]);
        buf.ack(1, 1).unwrap();
        assert!(buf.dispatch(0).is_empty());
        assert_eq!(buf.in_flight_of(a), 0);
    }

    #[test]
    fn ack_timeout_takes_messages_back_for_another_subscriber() {
        let mut buf = GroupBuffer::new(10, BTreeMap::new(), 100);
        let a = buf.subscribe(0, false);
        offer_range(&mut buf, 1, 0..3);
        let first = buf.dispatch(1000);
        assert_eq!(positions(&first), [(a, 1, 0), (a, 1, 1), (a, 1, 2)]);
        assert!(first.iter().all(|(_, d)| d.delivery_count == 1 && !d.redelivered()));
        assert_eq!(buf.next_deadline(), Some(1100));
        buf.ack(1, 1).unwrap();
        assert_eq!(buf.expire(1099), 0);
        // a stops asking; b comes. At the deadline a's two go to b, in log order.
        buf.stop_dispatch(a);
        let b = buf.subscribe(0, false);
        assert_eq!(buf.expire(1100), 2);
        assert_eq!((buf.in_flight_of(a), buf.pending_len(), buf.next_deadline()), (0, 2, None));
        let again = buf.dispatch(1200);
        assert_eq!(positions(&again), [(b, 1, 0), (b, 1, 2)]);
        assert!(again.iter().all(|(_, d)| d.delivery_count == 2 && d.redelivered()));
        assert_eq!(buf.next_deadline(), Some(1300));
        // a's late ack still counts (a retried one too); b's copy is gone with it.
        assert_eq!(buf.ack(1, 0), Ok(Acked::Now));
        assert_eq!(buf.ack(1, 0), Ok(Acked::Already));
        assert_eq!(buf.in_flight_of(b), 1);
        assert_eq!(buf.committed(), BTreeMap::from([(1, 2)]));
    }

    #[test]
    fn an_expired_message_comes_back_to_the_same_subscriber_when_alone() {
        let mut buf = GroupBuffer::new(10, BTreeMap::new(), 50);
        let a = buf.subscribe(1, false);
        offer_range(&mut buf, 1, 0..2);
        assert_eq!(positions(&buf.dispatch(0)), [(a, 1, 0)]);
        // Its window is full until the deadline.
        assert!(buf.dispatch(49).is_empty());
        assert_eq!(buf.expire(50), 1);
        // Before the newer one, counted again.
        let d = buf.dispatch(50);
        assert_eq!(positions(&d), [(a, 1, 0)]);
        assert_eq!(d[0].1.delivery_count, 2);
        // A late ack of a message waiting for redelivery counts too.
        assert_eq!(buf.expire(100), 1);
        assert_eq!(buf.ack(1, 0), Ok(Acked::Now));
        let d = buf.dispatch(100);
        assert_eq!((positions(&d), d[0].1.delivery_count), (vec![(a, 1, 1)], 1));
        // Never delivered: refused.
        buf.offer(msg(1, 2)).unwrap();
        assert_eq!(buf.ack(1, 2), Err(AckError::NotInFlight));
        assert_eq!(buf.ack(1, 3), Err(AckError::NotInFlight));
    }

    #[test]
    fn no_ack_timeout_means_no_deadline() {
        let mut buf = GroupBuffer::new(10, BTreeMap::new(), 0);
        buf.subscribe(0, false);
        offer_range(&mut buf, 1, 0..2);
        buf.dispatch(0);
        assert_eq!((buf.next_deadline(), buf.expire(u64::MAX)), (None, 0));
        // A new timeout applies to what is handed out from then on.
        buf.set_ack_timeout(10);
        buf.nack(1, 0).unwrap();
        buf.dispatch(5);
        assert_eq!(buf.next_deadline(), Some(15));
        assert_eq!(buf.expire(15), 1);
        assert_eq!(buf.in_flight_len(), 1);
        // A nack of a message already waiting again is harmless.
        assert_eq!(buf.nack(1, 0), Ok(()));
        assert_eq!(buf.pending_len(), 1);
    }

    #[test]
    fn a_resumed_group_counts_what_its_earlier_run_handed_out() {
        let mut buf = GroupBuffer::new(10, BTreeMap::from([(1, 5)]), 0);
        buf.resume_handed_out(&BTreeMap::from([(1, 7), (9, 3)]));
        assert_eq!(buf.handed_out(), BTreeMap::from([(1, 7)]));
        offer_range(&mut buf, 1, 5..9);
        let a = buf.subscribe(0, false);
        let counts: Vec<_> = buf.dispatch(0).into_iter().map(|(_, d)| (d.offset, d.delivery_count)).collect();
        assert_eq!(counts, [(5, 2), (6, 2), (7, 1), (8, 1)]);
        assert_eq!(buf.handed_out(), BTreeMap::from([(1, 9)]));
        assert_eq!(buf.in_flight_of(a), 4);
    }

    // ---- Model-based property test ----

    #[derive(Clone, Debug)]
    enum Op {
        Offer(u64),
        OfferOutOfOrder(u64, u64),
        Skip(u64),
        MarkRead(u64, u64),
        Subscribe(u32, bool),
        Unsubscribe(usize),
        Dispatch,
        Ack(usize),
        Nack(usize),
        AckDone(usize),
        Forget(u64),
        /// Time passes (ms) ...
        Advance(u64),
        /// ... and the driver's timer fires.
        Expire,
    }

    const SEGMENTS: u64 = 3;

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0..SEGMENTS).prop_map(Op::Offer),
            1 => (0..SEGMENTS, 1u64..3).prop_map(|(s, d)| Op::OfferOutOfOrder(s, d)),
            3 => (0..SEGMENTS).prop_map(Op::Skip),
            1 => (0..SEGMENTS, 0u64..4).prop_map(|(s, n)| Op::MarkRead(s, n)),
            1 => (0u32..4, proptest::bool::weighted(0.25)).prop_map(|(m, a)| Op::Subscribe(m, a)),
            1 => any::<usize>().prop_map(Op::Unsubscribe),
            4 => Just(Op::Dispatch),
            4 => any::<usize>().prop_map(Op::Ack),
            2 => any::<usize>().prop_map(Op::Nack),
            2 => any::<usize>().prop_map(Op::AckDone),
            1 => prop_oneof![15 => Just(99u64), 1 => 0..SEGMENTS].prop_map(Op::Forget),
            2 => (1u64..4).prop_map(Op::Advance),
            2 => Just(Op::Expire),
        ]
    }

    /// What the buffer must be equivalent to, kept as plainly as possible: sets of
    /// positions, no queues.
    #[derive(Default)]
    struct Model {
        /// The ack timeout (0: none) and the clock.
        timeout: Millis,
        now: Millis,
        /// Next offset the reader reports, per segment (kept across forgets).
        next: BTreeMap<u64, u64>,
        /// Segments committed() must list.
        known: BTreeSet<u64>,
        /// Offered and not acked (and not forgotten).
        outstanding: BTreeSet<Key>,
        /// Holder and deadline.
        in_flight: BTreeMap<Key, (SubscriberId, Option<Millis>)>,
        /// Hand-outs per offered message (an earlier run's counting as one).
        counts: BTreeMap<Key, u32>,
        /// Per segment: below it every offered record was handed out (what
        /// `handed_out` answers; an earlier run's to start with).
        handed: BTreeMap<u64, u64>,
        acks: BTreeMap<Key, u32>,
        forgotten: BTreeSet<Key>,
        offered: BTreeSet<Key>,
        /// id -> (max_unacked, auto_ack)
        subs: BTreeMap<SubscriberId, (u32, bool)>,
    }

    impl Model {
        fn in_flight_of(&self, id: SubscriberId) -> usize {
            self.in_flight.values().filter(|(s, _)| *s == id).count()
        }

        fn has_room(&self, id: SubscriberId) -> bool {
            let (max, auto) = self.subs[&id];
            auto || max == 0 || self.in_flight_of(id) < max as usize
        }

        fn ack(&mut self, key: Key) {
            self.outstanding.remove(&key);
            self.in_flight.remove(&key);
            *self.acks.entry(key).or_default() += 1;
        }

        /// Delivered before and waiting for redelivery.
        fn waiting_again(&self, key: Key) -> bool {
            self.outstanding.contains(&key) && !self.in_flight.contains_key(&key) && self.counts[&key] > 0
        }

        /// What acking `key` must answer when it is not in flight.
        fn expected_ack(&self, key: Key) -> Result<Acked, AckError> {
            if self.waiting_again(key) {
                Ok(Acked::Now)
            } else if !self.outstanding.contains(&key) && self.known.contains(&key.0) && key.1 < self.next[&key.0] {
                Ok(Acked::Already)
            } else {
                Err(AckError::NotInFlight)
            }
        }

        /// Checks one dispatch result against the model and applies it.
        fn apply_dispatch(&mut self, got: &[(SubscriberId, Delivery)]) -> Result<(), TestCaseError> {
            for (id, d) in got {
                let key = (d.segment_id, d.offset);
                prop_assert!(self.subs.contains_key(id), "delivered to unknown subscriber {}", id);
                prop_assert!(self.outstanding.contains(&key), "{:?} delivered but not outstanding", key);
                prop_assert!(!self.in_flight.contains_key(&key), "{:?} delivered while in flight", key);
                let count = self.counts.get_mut(&key).expect("offered");
                *count += 1;
                prop_assert_eq!(d, &Delivery { delivery_count: *count, ..msg(key.0, key.1) });
                prop_assert!(self.has_room(*id), "subscriber {} window exceeded", id);
                let handed = self.handed.entry(key.0).or_default();
                *handed = (*handed).max(key.1 + 1);
                if self.subs[id].1 {
                    self.ack(key);
                } else {
                    let deadline = (self.timeout > 0).then_some(self.now + self.timeout);
                    self.in_flight.insert(key, (*id, deadline));
                }
            }
            // Dispatch hands out all it can.
            let pending = self.outstanding.len() - self.in_flight.len();
            let room = self.subs.keys().any(|id| self.has_room(*id));
            prop_assert!(pending == 0 || !room, "dispatch left {} pending with a subscriber having room", pending);
            Ok(())
        }

        /// The timer fired: what passed its deadline goes back.
        fn expire(&mut self, buf: &mut GroupBuffer) -> Result<(), TestCaseError> {
            let due: Vec<Key> =
                self.in_flight.iter().filter(|(_, (_, t))| t.is_some_and(|t| t <= self.now)).map(|(k, _)| *k).collect();
            prop_assert_eq!(buf.expire(self.now), due.len());
            for key in due {
                self.in_flight.remove(&key);
            }
            Ok(())
        }

        fn check(&self, buf: &GroupBuffer, capacity: usize) -> Result<(), TestCaseError> {
            prop_assert!(buf.pending_len() + buf.in_flight_len() <= capacity);
            prop_assert_eq!(buf.pending_len() + buf.in_flight_len(), self.outstanding.len());
            prop_assert_eq!(buf.in_flight_len(), self.in_flight.len());
            prop_assert_eq!(buf.free(), capacity - self.outstanding.len());
            prop_assert_eq!(buf.subscriber_count(), self.subs.len());
            prop_assert_eq!(buf.next_deadline(), self.in_flight.values().filter_map(|(_, t)| *t).min());
            let handed: BTreeMap<u64, u64> =
                self.handed.iter().filter(|(s, e)| **e > 0 && self.known.contains(s)).map(|(s, e)| (*s, *e)).collect();
            prop_assert_eq!(buf.handed_out(), handed);
            let committed = buf.committed();
            prop_assert_eq!(committed.keys().copied().collect::<BTreeSet<_>>(), self.known.clone());
            for (&seg, &c) in &committed {
                let oldest = self.outstanding.range((seg, 0)..=(seg, u64::MAX)).next().map(|k| k.1);
                // Never past an unacked record ...
                if let Some(oldest) = oldest {
                    prop_assert!(c <= oldest, "segment {}: committed {} past unacked {}", seg, c, oldest);
                }
                // ... and not lagging either: everything below the oldest is done.
                prop_assert_eq!(c, oldest.unwrap_or(self.next[&seg]), "segment {}", seg);
            }
            Ok(())
        }
    }

    /// Applies one operation to the buffer and the model, checking what it answers.
    fn step(buf: &mut GroupBuffer, m: &mut Model, capacity: usize, op: Op) -> Result<(), TestCaseError> {
        match op {
            Op::Offer(seg) => {
                let key = (seg, m.next[&seg]);
                if m.outstanding.len() == capacity {
                    prop_assert_eq!(buf.offer(msg(key.0, key.1)), Err(OfferError::Full));
                } else {
                    prop_assert_eq!(buf.offer(msg(key.0, key.1)), Ok(()));
                    m.next.insert(seg, key.1 + 1);
                    m.known.insert(seg);
                    m.outstanding.insert(key);
                    m.offered.insert(key);
                    let before = m.handed.get(&seg).is_some_and(|e| key.1 < *e);
                    m.counts.insert(key, u32::from(before));
                }
            }
            Op::OfferOutOfOrder(seg, delta) => {
                // Only for known segments: an unknown one accepts any first offset.
                if m.known.contains(&seg) && m.outstanding.len() < capacity {
                    let expected = m.next[&seg];
                    for offset in [expected + delta, expected.saturating_sub(delta)] {
                        if offset != expected {
                            let err = OfferError::OutOfOrder { segment_id: seg, offset, expected };
                            prop_assert_eq!(buf.offer(msg(seg, offset)), Err(err));
                            prop_assert_eq!(buf.skip(seg, offset), Err(err));
                        }
                    }
                }
            }
            Op::Skip(seg) => {
                prop_assert_eq!(buf.skip(seg, m.next[&seg]), Ok(()));
                *m.next.get_mut(&seg).unwrap() += 1;
                m.known.insert(seg);
            }
            Op::MarkRead(seg, n) => {
                let to = m.next[&seg] + n;
                buf.mark_read(seg, to);
                m.next.insert(seg, to);
                m.known.insert(seg);
            }
            Op::Subscribe(max, auto) => {
                let id = buf.subscribe(max, auto);
                prop_assert!(!m.subs.contains_key(&id));
                m.subs.insert(id, (max, auto));
            }
            Op::Unsubscribe(i) => {
                if let Some(&id) = m.subs.keys().nth(i % m.subs.len().max(1)) {
                    buf.unsubscribe(id);
                    m.subs.remove(&id);
                    m.in_flight.retain(|_, (s, _)| *s != id);
                }
            }
            Op::Dispatch => {
                let got = buf.dispatch(m.now);
                m.apply_dispatch(&got)?;
            }
            Op::Ack(i) | Op::Nack(i) => {
                if let Some(&key) = m.in_flight.keys().nth(i % m.in_flight.len().max(1)) {
                    if matches!(op, Op::Ack(_)) {
                        prop_assert_eq!(buf.ack(key.0, key.1), Ok(Acked::Now));
                        m.ack(key);
                    } else {
                        prop_assert_eq!(buf.nack(key.0, key.1), Ok(()));
                        m.in_flight.remove(&key);
                    }
                }
            }
            Op::AckDone(i) => ack_not_in_flight(buf, m, i)?,
            Op::Forget(seg) => {
                buf.forget_segment(seg);
                m.known.remove(&seg);
                m.handed.remove(&seg);
                let gone: Vec<Key> = m.outstanding.iter().filter(|k| k.0 == seg).copied().collect();
                for key in gone {
                    m.outstanding.remove(&key);
                    m.in_flight.remove(&key);
                    m.forgotten.insert(key);
                }
            }
            Op::Advance(ms) => m.now += ms,
            Op::Expire => m.expire(buf)?,
        }
        Ok(())
    }

    /// Acks (or nacks) a message that is not in flight: acked, forgotten, pending
    /// (never delivered, or waiting for redelivery).
    fn ack_not_in_flight(buf: &mut GroupBuffer, m: &mut Model, i: usize) -> Result<(), TestCaseError> {
        let candidates: Vec<Key> = m
            .acks
            .keys()
            .chain(&m.forgotten)
            .chain(m.outstanding.iter().filter(|k| !m.in_flight.contains_key(k)))
            .copied()
            .collect();
        let Some(&key) = candidates.get(i % candidates.len().max(1)) else { return Ok(()) };
        // A nack leaves a waiting message where it is; anything else is refused.
        let nack = if m.waiting_again(key) { Ok(()) } else { Err(AckError::NotInFlight) };
        prop_assert_eq!(buf.nack(key.0, key.1), nack);
        let expected = m.expected_ack(key);
        prop_assert_eq!(buf.ack(key.0, key.1), expected);
        if expected == Ok(Acked::Now) {
            m.ack(key);
        }
        // Twice: done now, whatever it was.
        if expected.is_ok() {
            prop_assert_eq!(buf.ack(key.0, key.1), Ok(Acked::Already));
        }
        Ok(())
    }

    fn run(capacity: usize, start0: u64, timeout: Millis, ops: Vec<Op>) -> Result<(), TestCaseError> {
        // Segment 0 resumes at start0 (an earlier run handed out its next two), 1 at
        // 0, 2 is new and starts at 1000.
        let mut buf = GroupBuffer::new(capacity, BTreeMap::from([(0, start0), (1, 0)]), timeout);
        let handed = BTreeMap::from([(0, start0 + 2)]);
        buf.resume_handed_out(&handed);
        let mut m = Model {
            timeout,
            next: BTreeMap::from([(0, start0), (1, 0), (2, 1000)]),
            known: BTreeSet::from([0, 1]),
            handed,
            ..Model::default()
        };
        for op in ops {
            step(&mut buf, &mut m, capacity, op)?;
            m.check(&buf, capacity)?;
        }
        drain(&mut buf, &mut m, capacity)
    }

    /// A subscriber that acks everything gets every remaining message, each acked
    /// exactly once in all (a forgotten one never).
    fn drain(buf: &mut GroupBuffer, m: &mut Model, capacity: usize) -> Result<(), TestCaseError> {
        let id = buf.subscribe(0, false);
        m.subs.insert(id, (0, false));
        for _ in 0..=capacity {
            for key in m.in_flight.keys().copied().collect::<Vec<_>>() {
                prop_assert_eq!(buf.ack(key.0, key.1), Ok(Acked::Now));
                m.ack(key);
            }
            let got = buf.dispatch(m.now);
            m.apply_dispatch(&got)?;
            m.check(buf, capacity)?;
        }
        prop_assert!(m.outstanding.is_empty(), "undelivered: {:?}", m.outstanding);
        prop_assert_eq!((buf.pending_len(), buf.in_flight_len(), buf.next_deadline()), (0, 0, None));
        for key in &m.offered {
            let acks = m.acks.get(key).copied().unwrap_or(0);
            if m.forgotten.contains(key) {
                prop_assert_eq!(acks, 0, "{:?} forgotten and acked", key);
            } else {
                prop_assert_eq!(acks, 1, "{:?} acked {} times", key, acks);
            }
        }
        for (seg, c) in buf.committed() {
            prop_assert_eq!(c, m.next[&seg]);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn buffer_behaves_like_the_model(
            capacity in 0usize..7,
            start0 in 0u64..20,
            timeout in prop_oneof![1 => Just(0u64), 3 => 1u64..6],
            ops in proptest::collection::vec(op(), 0..120),
        ) {
            run(capacity, start0, timeout, ops)?;
        }
    }
}
