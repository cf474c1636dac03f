//! Raft quiescence: an idle cluster sends no heartbeats.
//!
//! A Raft leader sends a heartbeat to every follower every `heartbeat_interval_ms`
//! (50 ms) so that they do not elect another; on an idle cluster those heartbeats (and
//! the wake-ups they cost on every node) were most of what the brokers did. Gossip
//! (SWIM) already tells every node whether each other node is alive, so, as
//! CockroachDB does with its idle ranges, a cluster whose state is not changing
//! switches Raft's timers off and lets gossip stand in for the heartbeats:
//!
//! - **quiet**: nothing changed in Raft (no entry, no term, leader, role or membership
//!   change) for `quiesce_after_ms`, and gossip holds the leader ALIVE (on a
//!   follower) or every voter ALIVE and each follower's log caught up (on the leader,
//!   which waits two heartbeat intervals longer, so that its followers, which see the
//!   last commit up to a heartbeat later, are quiet before its heartbeats stop). A
//!   quiet leader sends no heartbeats, a quiet follower starts no election
//!   (`Cluster::quiesce`).
//! - **awake** again at once when anything of that changes: a write (its entry), a new
//!   term or leader, a membership change, the leader (on a follower) or any voter (on
//!   the leader) no longer ALIVE in gossip or restarted (a new life), or, on a
//!   follower, a write or read that could not reach the leader. A follower that wakes
//!   because of its leader has heard nothing from it for long, so it starts an
//!   election at its next Raft tick: fail-over is gossip's detection time (SUSPECT) plus
//!   one election. A follower that wakes because of an entry has just heard from the
//!   leader (which is awake, since it wrote).
//!
//! Only timers change, never what Raft votes for or commits, so safety does not rest
//! on any of this; liveness does, which is why every way the leader can fail shows up
//! as one of the wake-ups above. Linearizable reads do not need heartbeats: openraft's
//! read index confirms leadership with a round of its own.

use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cluster::Cluster;
use crate::cluster_state::{NodeId, NodeState};
use crate::config::RaftSettings;
use crate::membership::{MemberInfo, Membership};

/// What, seen from this node, must not change for `quiesce_after_ms` before Raft goes
/// quiet; any change wakes it.
#[derive(PartialEq, Debug)]
struct Observed {
    running: bool,
    term: u64,
    leader: Option<NodeId>,
    server_state: openraft::ServerState,
    membership: Option<openraft::LogId<NodeId>>,
    last_log: Option<u64>,
    last_applied: Option<u64>,
    /// Gossip's view of the nodes that matter here: the leader's on a follower, every
    /// voter's on the leader (state and life).
    watched: Vec<(NodeId, NodeState, u64)>,
}

type Metrics = openraft::RaftMetrics<NodeId, openraft::BasicNode>;

impl Observed {
    fn of(me: NodeId, m: &Metrics, members: &[MemberInfo]) -> Self {
        let gossip = |id: NodeId| match members.iter().find(|x| x.id == id) {
            Some(x) => (id, x.state, x.life),
            None => (id, NodeState::Dead, 0),
        };
        let watched = match m.current_leader {
            Some(l) if l == me => {
                m.membership_config.membership().voter_ids().filter(|v| *v != me).map(gossip).collect()
            }
            Some(l) => vec![gossip(l)],
            None => Vec::new(),
        };
        Observed {
            running: m.running_state.is_ok(),
            term: m.current_term,
            leader: m.current_leader,
            server_state: m.state,
            membership: *m.membership_config.log_id(),
            last_log: m.last_log_index,
            last_applied: m.last_applied.map(|l| l.index),
            watched,
        }
    }

    /// Why Raft must stay awake now, if it must (time aside).
    fn awake_because(&self, me: NodeId, m: &Metrics) -> Option<&'static str> {
        if !self.running {
            return Some("raft stopped");
        }
        let Some(leader) = self.leader else { return Some("no leader known") };
        if m.membership_config.membership().get_joint_config().len() > 1 {
            return Some("membership change in flight");
        }
        if self.watched.iter().any(|(_, state, _)| *state != NodeState::Alive) {
            return Some(if leader == me {
                "a voter is not ALIVE in gossip"
            } else {
                "the leader is not ALIVE in gossip"
            });
        }
        if leader == me {
            if self.server_state != openraft::ServerState::Leader {
                return Some("not leading yet");
            }
            // Voters only: replication to a learner goes on without heartbeats, and a
            // learner that is down must not keep the voters awake.
            let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
            let behind = m.replication.as_ref().is_some_and(|r| {
                r.iter()
                    .any(|(id, matched)| *id != me && voters.contains(id) && matched.map(|l| l.index) != self.last_log)
            });
            if behind {
                return Some("a follower's log is behind");
            }
        } else if self.server_state != openraft::ServerState::Follower {
            return Some("neither leader nor follower");
        }
        None
    }
}

/// Switches this node's Raft timers off while the cluster state is idle and gossip
/// vouches for the nodes Raft's heartbeats would; see the module's documentation.
pub async fn run(cluster: Cluster, membership: Membership, settings: RaftSettings, stop: CancellationToken) {
    if settings.quiesce_after_ms == 0 {
        return;
    }
    let after = Duration::from_millis(settings.quiesce_after_ms);
    let leader_margin = Duration::from_millis(settings.heartbeat_interval_ms.saturating_mul(2));
    let me = cluster.id;
    let mut state_changes = cluster.state_changes();
    let mut raft_changes = cluster.raft_changes();
    let mut members = membership.watch();
    let mut unreachable = cluster.leader_unreachable();
    let mut last: Option<Observed> = None;
    let mut since = Instant::now();
    let mut last_why: Option<&'static str> = Some("starting");
    loop {
        let m = cluster.raft.metrics().borrow().clone();
        let observed = Observed::of(me, &m, &members.borrow_and_update());
        if last.as_ref() != Some(&observed) {
            since = Instant::now();
        }
        let why = observed.awake_because(me, &m);
        let settle = if observed.leader == Some(me) { after + leader_margin } else { after };
        let due = since + settle;
        let quiet = why.is_none() && Instant::now() >= due;
        if why != last_why {
            tracing::debug!(why = why.unwrap_or("nothing"), "raft stays awake because");
            last_why = why;
        }
        if quiet != cluster.quiesced() {
            tracing::debug!(quiet, why = why.unwrap_or("changed"), leader = ?observed.leader, "raft quiescence");
            cluster.quiesce(quiet);
        }
        // A follower's log behind is the one condition progress (not a change) ends.
        let follow_progress = why == Some("a follower's log is behind");
        last = Some(observed);
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            r = state_changes.changed() => if r.is_err() { return },
            r = raft_changes.changed(), if follow_progress => if r.is_err() { return },
            r = members.changed() => if r.is_err() { return },
            r = unreachable.changed() => {
                if r.is_err() {
                    return;
                }
                // Counts as a change: awake (elections on) for `quiesce_after_ms`.
                last = None;
            }
            _ = tokio::time::sleep_until(due), if why.is_none() && !quiet => {}
        }
    }
}
