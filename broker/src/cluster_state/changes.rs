//! What each applied command touched, so that a task can learn what changed since it
//! last looked without scanning the whole state: the node's groups wake only the
//! group tasks whose topics or spec changed (a pure, bounded log; no clock, no IO).

use std::collections::VecDeque;

use super::commands::Command;
use super::model::ClusterState;

/// What one command touched.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Touched {
    /// A namespace was created or deleted (with everything in it).
    Namespace(String),
    /// A topic's spec or its segments (opened, closed, copies, deleted).
    Topic { namespace: String, topic: String },
    /// A consumer group's spec or placement (not its committed offsets).
    Group { namespace: String, group: String },
    /// Nodes: their records or disk levels.
    Nodes,
    /// Segments whose primaries were asked to close them (a rebalance).
    Rotation,
}

impl Touched {
    /// What `cmd` touches in `state` (before it is applied: a deleted segment's topic
    /// is known only then).
    pub fn of(cmd: &Command, state: &ClusterState) -> Vec<Touched> {
        let topic = |namespace: &str, topic: &str| Touched::Topic { namespace: namespace.into(), topic: topic.into() };
        let group = |namespace: &str, group: &str| Touched::Group { namespace: namespace.into(), group: group.into() };
        let of_segment = |id| state.segments.get(id).map(|s| topic(&s.namespace, &s.topic));
        match cmd {
            Command::CreateNamespace { name } | Command::DeleteNamespace { name, .. } => {
                vec![Touched::Namespace(name.clone())]
            }
            Command::CreateTopic { namespace, name, .. }
            | Command::UpdateTopic { namespace, name, .. }
            | Command::DeleteTopic { namespace, name } => vec![topic(namespace, name)],
            Command::OpenSegment { namespace, topic: t, .. } => vec![topic(namespace, t)],
            Command::CreateConsumerGroup { namespace, name, .. }
            | Command::DeleteConsumerGroup { namespace, name }
            | Command::BindConsumerGroup { namespace, name, .. }
            | Command::UnbindConsumerGroup { namespace, name, .. }
            | Command::UpdateConsumerGroup { namespace, name, .. } => vec![group(namespace, name)],
            Command::AssignGroup { namespace, group: g, .. } => vec![group(namespace, g)],
            // A group commits as its consumers move: most of what a busy cluster
            // applies. Recorded as nothing, so that no duty that scans the state wakes
            // for it (`Cluster::layout_changes`) and the log holds only what they act on.
            Command::CommitOffsets { .. } | Command::CommitOffsetsBatch { .. } => Vec::new(),
            Command::SetNode { .. }
            | Command::RemoveNode { .. }
            | Command::SetDiskLow { .. }
            | Command::DecommissionNode { .. } => vec![Touched::Nodes],
            // Nothing a group or segment task acts on: access is checked per request.
            Command::CreateUser { .. }
            | Command::DeleteUser { .. }
            | Command::ChangePassword { .. }
            | Command::SetPermissions { .. } => Vec::new(),
            Command::CloseSegment { id, .. }
            | Command::SegmentDone { id, .. }
            | Command::SegmentLost { id, .. }
            | Command::SetSegmentReplicas { id, .. } => of_segment(id).into_iter().collect(),
            Command::DeleteSegments { ids } => ids.iter().filter_map(of_segment).collect(),
            // Only the segments' primaries act on it (their keeper).
            Command::RotateSegments { .. } => vec![Touched::Rotation],
            Command::Once { command, .. } => Touched::of(command, state),
        }
    }
}

/// The last [`ChangeLog::CAPACITY`] changes by log index. A reader that fell further
/// behind (or that looks across a snapshot installed in between) is told that
/// anything may have changed.
#[derive(Debug, Clone, Default)]
pub struct ChangeLog {
    entries: VecDeque<(u64, Touched)>,
    /// Changes at or below this index are no longer listed.
    forgotten_up_to: u64,
}

impl ChangeLog {
    /// Changes kept: a few seconds of a busy cluster's commands. Each is one small
    /// entry, so this bounds the log's memory at well under a megabyte.
    pub const CAPACITY: usize = 4096;

    /// Records what the entry at `index` touched.
    pub fn record(&mut self, index: u64, touched: Vec<Touched>) {
        for t in touched {
            if self.entries.len() == Self::CAPACITY {
                if let Some((i, _)) = self.entries.pop_front() {
                    self.forgotten_up_to = self.forgotten_up_to.max(i);
                }
            }
            self.entries.push_back((index, t));
        }
    }

    /// Everything up to `index` may have changed (a snapshot was installed).
    pub fn forget_up_to(&mut self, index: u64) {
        self.entries.clear();
        self.forgotten_up_to = self.forgotten_up_to.max(index);
    }

    /// What changed after index `seen`; `None` when the log no longer goes back
    /// that far (anything may have changed).
    pub fn since(&self, seen: u64) -> Option<Vec<&Touched>> {
        if seen < self.forgotten_up_to {
            return None;
        }
        Some(self.entries.iter().filter(|(i, _)| *i > seen).map(|(_, t)| t).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic(t: &str) -> Touched {
        Touched::Topic { namespace: "default".into(), topic: t.into() }
    }

    #[test]
    fn lists_what_changed_after_an_index_until_it_forgets() {
        let mut log = ChangeLog::default();
        assert_eq!(log.since(0), Some(vec![]));
        log.record(1, vec![topic("a")]);
        log.record(2, vec![topic("b"), topic("c")]);
        assert_eq!(log.since(0), Some(vec![&topic("a"), &topic("b"), &topic("c")]));
        assert_eq!(log.since(1), Some(vec![&topic("b"), &topic("c")]));
        assert_eq!(log.since(2), Some(vec![]));
        for i in 3..3 + ChangeLog::CAPACITY as u64 {
            log.record(i, vec![topic("d")]);
        }
        assert_eq!(log.since(1), None, "index 2 was forgotten");
        assert_eq!(log.since(2).map(|c| c.len()), Some(ChangeLog::CAPACITY));
        log.forget_up_to(10_000);
        assert_eq!(log.since(9_999), None);
        assert_eq!(log.since(10_000), Some(vec![]));
    }

    #[test]
    fn a_segment_command_touches_its_topic_and_a_commit_only_offsets() {
        let mut s = ClusterState::new_cluster();
        let spec = crate::cluster_state::TopicSpec { shards: 1, replication_factor: 1, ..Default::default() };
        s.apply(&Command::CreateTopic { namespace: "default".into(), name: "t".into(), spec }).unwrap();
        let open = Command::OpenSegment {
            namespace: "default".into(),
            topic: "t".into(),
            shard: 0,
            replicas: vec![1],
            now_unix_ms: 0,
            min_insync: 1,
        };
        assert_eq!(Touched::of(&open, &s), vec![topic("t")]);
        s.apply(&open).unwrap();
        let id = *s.segments.keys().next().unwrap();
        let once = Command::Once {
            id: crate::cluster_state::RequestId { node: 1, nonce: 1 },
            command: Box::new(Command::DeleteSegments { ids: vec![id, id + 100] }),
        };
        assert_eq!(Touched::of(&once, &s), vec![topic("t")], "an unknown segment touches nothing");
        let commit = Command::CommitOffsets {
            namespace: "default".into(),
            group: "g".into(),
            offsets: Default::default(),
            handed_out: Default::default(),
        };
        assert_eq!(Touched::of(&commit, &s), vec![], "offset commits are not recorded");
    }
}
