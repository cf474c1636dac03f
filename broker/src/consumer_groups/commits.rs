//! The offset commits of every consumer group on this node, written to the cluster
//! state together: one Raft entry carries the commits that queued while the one before
//! was being written, up to [`DataSettings::offsets_commit_batch_max_count`] of them.
//!
//! Each group commits once per interval while it moves. Written one by one, 10,000
//! groups that moved in the same second were 10,000 Raft entries (and, on the
//! followers, as many forwarded writes), which on a loaded machine outlasted Raft's
//! heartbeats and cost elections. Batched, they are a few entries, at no extra wait
//! for a lone group: a commit is written at once when nothing else is being written.
//!
//! [`DataSettings::offsets_commit_batch_max_count`]: crate::config::DataSettings::offsets_commit_batch_max_count

use tokio::sync::{mpsc, oneshot};

use crate::cluster::Cluster;
use crate::cluster_state::{Command, GroupOffsets};
use crate::error::RequestError;
use crate::replication::Segments;

/// The answer to one group's commit: recorded, or why not (the outcome may be unknown,
/// as for any cluster write: the group commits the same offsets again).
pub type CommitResult = Result<(), RequestError>;

type Queued = (GroupOffsets, oneshot::Sender<CommitResult>);

/// Where the group tasks of this node send their commits. Cheap to clone.
#[derive(Clone)]
pub struct OffsetCommits {
    // Unbounded, yet bounded by the groups: each has at most one commit on its way.
    tx: mpsc::UnboundedSender<Queued>,
}

impl OffsetCommits {
    /// Starts the writer, a data-path task that ends when the node stops.
    pub fn start(segments: &Segments) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let batch_max = segments.settings().offsets_commit_batch_max_count.max(1);
        segments.spawn(write_batches(segments.cluster().clone(), rx, batch_max));
        Self { tx }
    }

    /// Queues a group's commit; the answer comes once the entry holding it is
    /// committed or failed. Dropped unanswered when the node stops.
    pub fn commit(&self, commit: GroupOffsets) -> oneshot::Receiver<CommitResult> {
        let (reply, answer) = oneshot::channel();
        let _ = self.tx.send((commit, reply));
        answer
    }
}

/// Writes what queued, one entry at a time, until every sender is gone.
async fn write_batches(cluster: Cluster, mut rx: mpsc::UnboundedReceiver<Queued>, batch_max: usize) {
    let mut queued = Vec::with_capacity(batch_max);
    while rx.recv_many(&mut queued, batch_max).await > 0 {
        let (commits, replies): (Vec<GroupOffsets>, Vec<_>) = queued.drain(..).unzip();
        let result = cluster.write(batch_command(commits)).await.map(drop);
        for reply in replies {
            let _ = reply.send(result.clone());
        }
    }
}

/// One group's commit as the command it always was; several as a batch.
fn batch_command(mut commits: Vec<GroupOffsets>) -> Command {
    if commits.len() != 1 {
        return Command::CommitOffsetsBatch { commits };
    }
    let c = commits.remove(0);
    Command::CommitOffsets { namespace: c.namespace, group: c.group, offsets: c.offsets, handed_out: c.handed_out }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn commit(group: &str) -> GroupOffsets {
        GroupOffsets {
            namespace: "default".into(),
            group: group.into(),
            offsets: BTreeMap::from([(1, 5)]),
            handed_out: BTreeMap::new(),
        }
    }

    #[test]
    fn a_lone_commit_is_the_plain_command_and_several_are_one_batch() {
        assert!(matches!(batch_command(vec![commit("a")]), Command::CommitOffsets { group, .. } if group == "a"));
        match batch_command(vec![commit("a"), commit("b")]) {
            Command::CommitOffsetsBatch { commits } => {
                assert_eq!(commits.iter().map(|c| c.group.as_str()).collect::<Vec<_>>(), ["a", "b"])
            }
            other => panic!("a batch: {other:?}"),
        }
    }
}
