//! The primary's decision core: which publishes are confirmed, and up to where readers
//! may read. Plain data, no IO and no time: the primary task ([`super::primary`])
//! appends and fsyncs, streams to the replicas, and tells this core what happened.
//!
//! A publish is confirmed once its last record is below the offset its durability
//! needs: written (`Received`, at once), fsynced on this node (`Primary`), or fsynced
//! on `quorum` distinct members of the replica set, this node included (`Replicated`).
//! Readers see records below the quorum offset only, which never goes back.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;

use crate::cluster_state::NodeId;

/// How durable a publish must be before it is confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    Received,
    Primary,
    Replicated,
}

/// The confirmation state of one open segment on its primary. `T` is whatever the
/// caller answers a publish with (a reply channel; a number in tests).
#[derive(Debug)]
pub struct Confirmations<T> {
    me: NodeId,
    quorum: usize,
    /// Offset after the last record written.
    written: u64,
    /// Per member of the replica set (this node included): everything below is
    /// fsynced there, as far as this node knows.
    durable: BTreeMap<NodeId, u64>,
    /// Below this offset records are on a quorum: what readers may see. Never goes back.
    confirmed: u64,
    waiting_primary: VecDeque<(Range<u64>, T)>,
    waiting_quorum: VecDeque<(Range<u64>, T)>,
}

impl<T> Confirmations<T> {
    /// A segment whose file holds `written` records; `replicas` includes `me`.
    pub fn new(me: NodeId, replicas: &[NodeId], quorum: usize, written: u64) -> Self {
        let mut durable: BTreeMap<NodeId, u64> = replicas.iter().map(|n| (*n, 0)).collect();
        durable.insert(me, 0);
        debug_assert!((1..=durable.len()).contains(&quorum), "quorum {quorum} of {} members", durable.len());
        Self {
            me,
            quorum,
            written,
            durable,
            confirmed: written,
            waiting_primary: VecDeque::new(),
            waiting_quorum: VecDeque::new(),
        }
    }

    /// A batch was written from `start` on: one entry per publish with its record
    /// count. Returns the publishes confirmed at once (`Received`).
    pub fn appended(
        &mut self,
        start: u64,
        publishes: impl IntoIterator<Item = (u64, Durability, T)>,
    ) -> Vec<(T, Range<u64>)> {
        debug_assert_eq!(start, self.written, "a batch starts where the last one ended");
        let mut now = Vec::new();
        let mut at = start;
        for (count, durability, token) in publishes {
            let range = at..at + count;
            at = range.end;
            match durability {
                Durability::Received => now.push((token, range)),
                Durability::Primary => self.waiting_primary.push_back((range, token)),
                Durability::Replicated => self.waiting_quorum.push_back((range, token)),
            }
        }
        self.written = at;
        now
    }

    /// This node fsynced everything below `durable`.
    pub fn fsynced_here(&mut self, durable: u64) {
        debug_assert!(durable <= self.written, "fsynced {durable} of {} written", self.written);
        let mine = self.durable.entry(self.me).or_insert(0);
        *mine = (*mine).max(durable);
    }

    /// Replica `node` has everything below `durable` fsynced. `fresh`: the first answer
    /// on a new stream, which says what the replica has now: less than before if its
    /// copy was damaged and set aside, and it must not count for records it lost.
    pub fn replica_durable(&mut self, node: NodeId, durable: u64, fresh: bool) {
        let Some(known) = self.durable.get_mut(&node) else { return };
        let durable = durable.min(self.written);
        *known = if fresh { durable } else { (*known).max(durable) };
    }

    /// What this node has fsynced.
    pub fn durable_here(&self) -> u64 {
        self.durable_on(self.me)
    }

    /// What member `node` has fsynced, as far as this node knows (0 for a non-member).
    pub fn durable_on(&self, node: NodeId) -> u64 {
        self.durable.get(&node).copied().unwrap_or(0)
    }

    /// The offset `quorum` members have fsynced, and below what was written.
    fn quorum_offset(&self) -> u64 {
        let mut all: Vec<u64> = self.durable.values().copied().collect();
        all.sort_unstable_by(|a, b| b.cmp(a));
        all.get(self.quorum - 1).copied().unwrap_or(0).min(self.written)
    }

    /// Publishes now as durable as they asked, oldest first; advances what readers see.
    pub fn take_confirmed(&mut self) -> Vec<(T, Range<u64>)> {
        let quorum_offset = self.quorum_offset();
        if quorum_offset > self.confirmed {
            debug_assert!(
                self.durable.values().filter(|d| **d >= quorum_offset).count() >= self.quorum,
                "confirming {quorum_offset} on fewer than {} members: {:?}",
                self.quorum,
                self.durable
            );
            self.confirmed = quorum_offset;
        }
        let local = self.durable[&self.me];
        let mut out = Vec::new();
        while self.waiting_primary.front().is_some_and(|(r, _)| r.end <= local) {
            let (range, token) = self.waiting_primary.pop_front().expect("checked");
            out.push((token, range));
        }
        while self.waiting_quorum.front().is_some_and(|(r, _)| r.end <= quorum_offset) {
            let (range, token) = self.waiting_quorum.pop_front().expect("checked");
            out.push((token, range));
        }
        out
    }

    /// Offset below which records may be read (on a quorum).
    pub fn confirmed(&self) -> u64 {
        self.confirmed
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    /// Something written here is not fsynced yet.
    pub fn needs_fsync(&self) -> bool {
        self.durable[&self.me] < self.written
    }

    /// A publish waits for fsyncs (here, or on a quorum that counts this node).
    pub fn publishes_wait_for_fsync(&self) -> bool {
        !self.waiting_primary.is_empty() || !self.waiting_quorum.is_empty()
    }

    /// Everything written is fsynced here and on a quorum and every publish answered:
    /// the segment can be closed at [`Confirmations::written`] without taking anything
    /// back.
    pub fn settled(&self) -> bool {
        self.waiting_primary.is_empty()
            && self.waiting_quorum.is_empty()
            && !self.needs_fsync()
            && self.quorum_offset() == self.written
    }

    /// Publishes still waiting (the task is stopping): neither confirmed nor refused
    /// for good, since their records may be in the segment.
    pub fn abandon(&mut self) -> impl Iterator<Item = T> + '_ {
        self.waiting_primary.drain(..).chain(self.waiting_quorum.drain(..)).map(|(_, t)| t)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    const ME: NodeId = 1;

    #[test]
    fn a_replicated_publish_waits_for_the_quorum_and_readers_with_it() {
        let mut c = Confirmations::new(ME, &[1, 2, 3], 2, 0);
        assert!(c.appended(0, [(2, Durability::Replicated, "a"), (1, Durability::Received, "b")]) == [("b", 2..3)]);
        c.fsynced_here(3);
        assert!(c.take_confirmed().is_empty(), "one copy of three");
        assert_eq!(c.confirmed(), 0);
        c.replica_durable(3, 2, true);
        assert_eq!(c.take_confirmed(), [("a", 0..2)]);
        assert_eq!(c.confirmed(), 2);
        assert!(!c.settled(), "record 2 is on one node");
        c.replica_durable(2, 3, true);
        assert!(c.take_confirmed().is_empty());
        assert!(c.settled());
    }

    #[test]
    fn a_quorum_above_the_majority_needs_every_copy_it_names() {
        let mut c = Confirmations::new(ME, &[1, 2, 3], 3, 0);
        c.appended(0, [(1, Durability::Replicated, ())]);
        c.fsynced_here(1);
        c.replica_durable(2, 1, true);
        assert!(c.take_confirmed().is_empty());
        c.replica_durable(3, 1, true);
        assert_eq!(c.take_confirmed().len(), 1);
    }

    #[test]
    fn a_fresh_stream_lowers_what_a_replica_counts_for_but_not_what_readers_saw() {
        let mut c = Confirmations::new(ME, &[1, 2], 2, 0);
        c.appended(0, [(5, Durability::Replicated, ())]);
        c.fsynced_here(5);
        c.replica_durable(2, 5, true);
        assert_eq!(c.take_confirmed().len(), 1);
        c.replica_durable(2, 1, true); // its copy was damaged and set aside
        c.appended(5, [(1, Durability::Replicated, ())]);
        c.fsynced_here(6);
        assert!(c.take_confirmed().is_empty());
        assert_eq!(c.confirmed(), 5, "never goes back");
        c.replica_durable(2, 6, false);
        assert_eq!(c.take_confirmed().len(), 1);
    }

    #[derive(Debug, Clone)]
    enum Event {
        Append(Vec<(u64, u8)>),
        FsyncHere(u64),
        Replica(usize, u64, bool),
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            prop::collection::vec((1..4u64, 0..3u8), 1..4).prop_map(Event::Append),
            (0..40u64).prop_map(Event::FsyncHere),
            (1..5usize, 0..40u64, any::<bool>()).prop_map(|(n, d, f)| Event::Replica(n, d, f)),
        ]
    }

    proptest! {
        /// Against a model that knows what each member really has fsynced: a publish
        /// is confirmed once, in order within its durability, only when its records
        /// are as durable as asked (on `quorum` distinct members for `Replicated`);
        /// readers never see past the quorum or go back; and once every member has
        /// everything, every publish is confirmed.
        #[test]
        fn confirmations_follow_the_copies(
            members in 1..=5usize,
            quorum_extra in 0..3usize,
            events in prop::collection::vec(event(), 1..60),
        ) {
            let replicas: Vec<NodeId> = (1..=members as NodeId).collect();
            let quorum = (members / 2 + 1 + quorum_extra).min(members);
            let mut c = Confirmations::new(ME, &replicas, quorum, 0);
            // What each member has fsynced for real (a fresh stream may report less).
            let mut real: HashMap<NodeId, u64> = replicas.iter().map(|n| (*n, 0)).collect();
            let mut asked: HashMap<usize, (Durability, Range<u64>)> = HashMap::new();
            let mut done: Vec<usize> = Vec::new();
            let mut next_id = 0usize;
            let mut last_confirmed = 0;
            let check = |_c: &mut Confirmations<usize>, real: &HashMap<NodeId, u64>,
                         asked: &HashMap<usize, (Durability, Range<u64>)>, done: &mut Vec<usize>,
                         now: Vec<(usize, Range<u64>)>| -> Result<(), TestCaseError> {
                for (id, range) in now {
                    let (durability, want) = &asked[&id];
                    prop_assert_eq!(&range, want);
                    prop_assert!(!done.contains(&id), "confirmed twice");
                    match durability {
                        Durability::Received => {}
                        Durability::Primary => prop_assert!(real[&ME] >= range.end),
                        Durability::Replicated => {
                            let copies = real.values().filter(|d| **d >= range.end).count();
                            prop_assert!(copies >= quorum, "{} copies of {:?}, quorum {}", copies, range, quorum);
                        }
                    }
                    done.push(id);
                }
                Ok(())
            };
            for e in events {
                match e {
                    Event::Append(batch) => {
                        let start = c.written();
                        let mut at = start;
                        let publishes: Vec<(u64, Durability, usize)> = batch.into_iter().map(|(n, d)| {
                            let d = [Durability::Received, Durability::Primary, Durability::Replicated][d as usize];
                            asked.insert(next_id, (d, at..at + n));
                            at += n;
                            next_id += 1;
                            (n, d, next_id - 1)
                        }).collect();
                        let now = c.appended(start, publishes);
                        check(&mut c, &real, &asked, &mut done, now)?;
                    }
                    Event::FsyncHere(d) => {
                        let d = d.min(c.written());
                        let r = real.get_mut(&ME).unwrap();
                        *r = (*r).max(d);
                        c.fsynced_here(*r);
                    }
                    Event::Replica(n, d, fresh) => {
                        let node = replicas[n % members];
                        if node == ME { continue; }
                        let d = d.min(c.written());
                        let r = real.get_mut(&node).unwrap();
                        *r = if fresh { d } else { (*r).max(d) };
                        c.replica_durable(node, *r, fresh);
                    }
                }
                let now = c.take_confirmed();
                check(&mut c, &real, &asked, &mut done, now)?;
                prop_assert!(c.confirmed() >= last_confirmed && c.confirmed() <= c.written());
                if c.confirmed() > last_confirmed {
                    let holding = real.values().filter(|d| **d >= c.confirmed()).count();
                    prop_assert!(holding >= quorum, "readers see {} held by {}", c.confirmed(), holding);
                }
                last_confirmed = c.confirmed();
            }
            // Everything everywhere: everything confirmed, in order per durability.
            let end = c.written();
            c.fsynced_here(end);
            for n in replicas.iter().filter(|n| **n != ME) {
                real.insert(*n, end);
                c.replica_durable(*n, end, false);
            }
            real.insert(ME, end);
            let now = c.take_confirmed();
            check(&mut c, &real, &asked, &mut done, now)?;
            prop_assert!(c.settled());
            prop_assert_eq!(done.len(), asked.len());
            for d in [Durability::Primary, Durability::Replicated] {
                let order: Vec<usize> = done.iter().copied().filter(|id| asked[id].0 == d).collect();
                let mut sorted = order.clone();
                sorted.sort_unstable();
                prop_assert_eq!(order, sorted);
            }
        }
    }
}
