//! Consumer lag: how many records of its bound topics a group has not yet dealt with.
//! Plain data, no IO: the group task ([`super::task`]) gathers the inputs from its
//! reader, its buffer and the primaries it knows of.
//!
//! Kafka defines a partition's lag as its log end offset minus the group's committed
//! offset. Here a shard is a sequence of segments (its generations), and the group
//! knows more than its committed offsets (it has read ahead and holds acks above
//! them), so the lag of a group for a topic is, summed over the topic's segments in
//! the cluster state:
//!
//! ```text
//! lag(segment) = outstanding + max(0, end - reported)
//! ```
//!
//! - `end`: a closed segment's end as the state records it; for an open one, the
//!   offset below which its primary has confirmed records (what readers may see, the
//!   equivalent of Kafka's high watermark), as far as the group knows: the largest
//!   end a read or a peek of it answered, or the primary's own figure when the
//!   primary is this node.
//! - `reported`: the group's position: every record below it was handed to the
//!   group's buffer (offered when it matched the bindings, skipped when not), or was
//!   below the committed offset the group started from.
//! - `outstanding`: records offered to the buffer and not acknowledged yet (pending or
//!   in flight to a subscriber).
//!
//! So a record counts until it is acknowledged, or until the group read it and it
//! matched none of the bindings. Records not read yet count whether or not they will
//! match (the group cannot know before reading them, as a Kafka consumer cannot).
//! A segment deleted by retention no longer counts; records the group skips because
//! of `since` count until read. Lag is in records (messages), not bytes.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::cluster_state::SegmentId;

/// What the lag needs of one segment of a bound topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentLag {
    pub segment_id: SegmentId,
    pub topic: Arc<str>,
    /// The segment is closed and its records end here.
    pub closed_end: Option<u64>,
    /// The largest end a read of the segment answered (0 before any).
    pub readable_end: u64,
    /// Every record below was handed to the buffer or below the start.
    pub reported: u64,
}

/// Lag per bound topic: every topic of `topics` appears, with 0 when nothing is behind.
/// `outstanding(segment)`: records offered and not acknowledged; `primary_confirmed
/// (segment)`: the confirmed offset of an open segment whose primary is this node.
pub fn by_topic<'a>(
    topics: impl IntoIterator<Item = &'a str>,
    segments: &[SegmentLag],
    outstanding: impl Fn(SegmentId) -> u64,
    primary_confirmed: impl Fn(SegmentId) -> Option<u64>,
) -> BTreeMap<String, u64> {
    let mut out: BTreeMap<String, u64> = topics.into_iter().map(|t| (t.to_string(), 0)).collect();
    for s in segments {
        let end = match s.closed_end {
            Some(end) => end,
            None => s.readable_end.max(primary_confirmed(s.segment_id).unwrap_or(0)),
        };
        let lag = outstanding(s.segment_id).saturating_add(end.saturating_sub(s.reported));
        let total = out.entry(s.topic.to_string()).or_insert(0);
        *total = total.saturating_add(lag);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(id: SegmentId, topic: &str, closed_end: Option<u64>, readable_end: u64, reported: u64) -> SegmentLag {
        SegmentLag { segment_id: id, topic: topic.into(), closed_end, readable_end, reported }
    }

    fn lag(segments: &[SegmentLag], outstanding: &[(SegmentId, u64)]) -> BTreeMap<String, u64> {
        let outstanding: BTreeMap<SegmentId, u64> = outstanding.iter().copied().collect();
        by_topic(["t"], segments, |id| outstanding.get(&id).copied().unwrap_or(0), |_| None)
    }

    #[test]
    fn records_not_read_yet_count() {
        // An idle group: 1000 confirmed, none read.
        assert_eq!(lag(&[seg(0, "t", None, 1000, 0)], &[])["t"], 1000);
    }

    #[test]
    fn records_read_count_until_acknowledged() {
        // All 1000 offered to the buffer, none acknowledged.
        assert_eq!(lag(&[seg(0, "t", None, 1000, 1000)], &[(0, 1000)])["t"], 1000);
        // 400 acknowledged, in any order: only the outstanding count.
        assert_eq!(lag(&[seg(0, "t", None, 1000, 1000)], &[(0, 600)])["t"], 600);
        assert_eq!(lag(&[seg(0, "t", None, 1000, 1000)], &[])["t"], 0);
    }

    #[test]
    fn records_that_match_no_binding_stop_counting_once_read() {
        // 1000 read, 990 skipped (another routing key), 10 offered and unacknowledged.
        assert_eq!(lag(&[seg(0, "t", None, 1000, 1000)], &[(0, 10)])["t"], 10);
    }

    #[test]
    fn a_closed_segment_counts_to_its_end_in_the_state() {
        // The last read saw 300 (before the close), the state says it ends at 500.
        assert_eq!(lag(&[seg(0, "t", Some(500), 300, 200)], &[])["t"], 300);
    }

    #[test]
    fn the_group_resumes_from_its_committed_offset() {
        // Committed 500 (the start of its reported position), 1000 confirmed.
        assert_eq!(lag(&[seg(0, "t", None, 1000, 500)], &[])["t"], 500);
    }

    #[test]
    fn the_local_primary_knows_better_than_an_old_read() {
        let segments = [seg(0, "t", None, 100, 100), seg(1, "t", Some(50), 0, 50)];
        let l = by_topic(["t"], &segments, |_| 0, |id| (id == 0).then_some(1000));
        assert_eq!(l["t"], 900);
        // A stale figure from the primary never takes back what a read saw.
        let l = by_topic(["t"], &segments, |_| 0, |id| (id == 0).then_some(10));
        assert_eq!(l["t"], 0);
    }

    #[test]
    fn topics_are_separate_and_every_bound_topic_appears() {
        let segments = [seg(0, "a", Some(10), 10, 0), seg(1, "b", None, 5, 5), seg(2, "a", None, 7, 0)];
        let l = by_topic(["a", "b", "c"], &segments, |id| if id == 1 { 2 } else { 0 }, |_| None);
        assert_eq!(l, BTreeMap::from([("a".into(), 17), ("b".into(), 2), ("c".into(), 0)]));
    }

    #[test]
    fn a_position_past_the_known_end_counts_nothing_beyond_what_is_held() {
        // A read answered records up to 20 (readable end then 20); a later peek's
        // figure was lower on a failed-over copy: never negative.
        assert_eq!(lag(&[seg(0, "t", Some(15), 20, 20)], &[(0, 3)])["t"], 3);
    }
}
