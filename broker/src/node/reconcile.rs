//! The leader's membership duties: gossip is the source of truth for who is around;
//! this loop makes the cluster state and Raft membership follow it.
//!
//! - every member gossip knows is recorded in the cluster state (id, address, state);
//! - an ALIVE member outside Raft is added as a learner, and a caught-up learner is
//!   promoted to voter while there are fewer than `voters_count_max` voters;
//! - a member DEAD or LEFT for longer than `dead_node_removal_ms` leaves Raft and the
//!   cluster state. LEFT members are not removed at once: a rolling restart (every
//!   pod leaves gracefully, one after another) must not shrink the voter set. A DEAD
//!   member is knocked on first (a `GossipSync` over TCP): gossip can be wrong (it
//!   once held every restarted pod DEAD while Raft still reached them all), and
//!   removing a live voter on a wrong verdict costs the cluster its quorum.
//!
//! - a node being decommissioned is never added to Raft nor promoted; once drained
//!   (nothing depends on it, see `ClusterState::drain_progress`) a voter is demoted to
//!   learner, after handing leadership over if it leads, and once it stops (LEFT or
//!   DEAD) it is removed at once, without waiting for `dead_node_removal_ms`.
//!
//! One Raft membership change per round, each awaited until committed: openraft
//! allows only one at a time, and small steps keep the quorum arithmetic obvious.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use openraft::{BasicNode, ChangeMembers};
use tokio_util::sync::CancellationToken;

use crate::cluster::Cluster;
use crate::cluster_state::{Command, NodeRecord, NodeState};
use crate::config::NodeConfig;
use crate::membership::{MemberInfo, Membership};

/// A learner within this many entries of the leader's log counts as caught up.
const LEARNER_LAG_MAX_ENTRIES: u64 = 100;
/// A drained leader that could not hand leadership over demotes itself instead, until
/// this long after its attempt (each attempt holds new writes for up to one leader
/// lease, so they are not repeated at every round).
const HAND_OVER_RETRY: Duration = Duration::from_secs(10);

/// When the drained leader last tried to hand leadership over.
#[derive(Default)]
struct HandOverBackoff {
    last: Option<tokio::time::Instant>,
}

/// How long adding a learner waits for it to catch up before moving on.
const LEARNER_CATCH_UP_MAX: Duration = Duration::from_secs(2);

/// Runs a round whenever gossip's members or the cluster state (its leader included)
/// change, and every `reconcile_interval_ms` only while something is left to do (a
/// member not ALIVE, whose removal waits for a time, a learner to promote, a node
/// draining, a round that failed): a settled cluster has nothing here that wakes.
/// Rounds are at least `reconcile_interval_ms` apart.
pub async fn run(config: NodeConfig, cluster: Cluster, membership: Membership, stop: CancellationToken) {
    let interval = Duration::from_millis(config.reconcile_interval_ms);
    let mut members_changed = membership.watch();
    // Offset commits change nothing here.
    let mut layout_changes = cluster.layout_changes();
    let mut hand_over = HandOverBackoff::default();
    let mut settled = false;
    let mut last_round: Option<tokio::time::Instant> = None;
    loop {
        let next = last_round.map_or_else(tokio::time::Instant::now, |at| at + interval);
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(next), if !settled => {}
            r = members_changed.changed() => if r.is_err() { return },
            r = layout_changes.changed() => if r.is_err() { return },
        }
        if last_round.is_some_and(|at| at + interval > tokio::time::Instant::now()) {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep_until(next) => {}
            }
        }
        if cluster.leader().map(|(id, _)| id) != Some(cluster.id) {
            // Becoming leader is a state change: nothing to do until then.
            settled = true;
            continue;
        }
        last_round = Some(tokio::time::Instant::now());
        let members = membership.watch().borrow().clone();
        settled = match reconcile_once(&config, &cluster, &membership, &members, &mut hand_over).await {
            Ok(()) => is_settled(&config, &cluster, &members),
            Err(e) => {
                tracing::debug!(error = %e, "membership reconciliation deferred");
                false
            }
        };
    }
}

/// Nothing for a round to do until gossip or the cluster state changes: every member
/// ALIVE, in Raft and recorded as such, no node draining, no membership change in
/// flight, and no learner that could be promoted.
fn is_settled(config: &NodeConfig, cluster: &Cluster, members: &[MemberInfo]) -> bool {
    let metrics = cluster.raft.metrics().borrow().clone();
    let stored = metrics.membership_config.membership();
    if stored.get_joint_config().len() > 1 {
        return false;
    }
    let voters: BTreeSet<u64> = stored.voter_ids().collect();
    let learners: BTreeSet<u64> = stored.learner_ids().collect();
    if !learners.is_empty() && voters.len() < config.voters_count_max {
        return false;
    }
    let st = cluster.state.read();
    if !st.state.draining.is_empty() {
        return false;
    }
    members.iter().all(|m| {
        m.state == NodeState::Alive
            && (voters.contains(&m.id) || learners.contains(&m.id))
            && st.state.nodes.get(&m.id).is_some_and(|r| r.address == m.addr && r.state == NodeState::Alive)
    })
}

async fn reconcile_once(
    config: &NodeConfig,
    cluster: &Cluster,
    membership: &Membership,
    members: &[MemberInfo],
    hand_over: &mut HandOverBackoff,
) -> Result<(), String> {
    let metrics = cluster.raft.metrics().borrow().clone();
    let stored = metrics.membership_config.membership().clone();
    if stored.get_joint_config().len() > 1 {
        return Ok(()); // a change is still in flight
    }
    let (draining, drained) = {
        let st = cluster.state.read();
        let drained: BTreeSet<u64> =
            st.state.draining.iter().copied().filter(|id| st.state.drain_progress(*id).drained()).collect();
        (st.state.draining.clone(), drained)
    };
    let round = Round {
        draining,
        drained,
        config,
        cluster,
        membership,
        members,
        removal_after: Duration::from_millis(config.dead_node_removal_ms),
        recorded: cluster.state.read().state.nodes.clone(),
        voters: stored.voter_ids().collect(),
        learners: stored.learner_ids().collect(),
    };
    // 1. Raft membership follows gossip, one change per round. It goes first so a
    //    node shows ALIVE in the cluster state only once it is a Raft member.
    if round.remove_gone().await? || round.add_new().await? {
        return Ok(());
    }
    // 2. Cluster-state node records follow gossip.
    round.record_nodes().await?;
    if round.demote_drained(hand_over).await? {
        return Ok(());
    }
    round.promote_caught_up(&metrics).await
}

/// One round's view: gossip's members, and what Raft and the cluster state hold.
struct Round<'a> {
    config: &'a NodeConfig,
    cluster: &'a Cluster,
    membership: &'a Membership,
    members: &'a [MemberInfo],
    removal_after: Duration,
    recorded: BTreeMap<u64, NodeRecord>,
    voters: BTreeSet<u64>,
    learners: BTreeSet<u64>,
    /// Nodes being decommissioned, and those of them nothing depends on any more.
    draining: BTreeSet<u64>,
    drained: BTreeSet<u64>,
}

impl Round<'_> {
    /// DEAD or LEFT for `dead_node_removal_ms`, or at all once drained.
    fn gone_for_good(&self, m: &MemberInfo) -> bool {
        matches!(m.state, NodeState::Dead | NodeState::Left)
            && (m.state_since.elapsed() >= self.removal_after || self.drained.contains(&m.id))
    }

    /// Removes one member gone for long from Raft (after knocking on a DEAD one's
    /// door), or its record from the cluster state. `Ok(true)`: Raft changed.
    async fn remove_gone(&self) -> Result<bool, String> {
        for m in self.members.iter().filter(|m| self.gone_for_good(m) && m.id != self.cluster.id) {
            if m.state == NodeState::Dead && self.membership.knock(&m.addr).await {
                tracing::warn!(node_id = m.id, addr = %m.addr, "gossip holds the node DEAD but it answers; not removing it");
                continue;
            }
            if self.voters.contains(&m.id) || self.learners.contains(&m.id) {
                tracing::info!(node_id = m.id, state = m.state.as_str(), "removing node from raft");
                let change = if self.voters.contains(&m.id) {
                    ChangeMembers::RemoveVoters(BTreeSet::from([m.id]))
                } else {
                    ChangeMembers::RemoveNodes(BTreeSet::from([m.id]))
                };
                self.cluster.raft.change_membership(change, false).await.map_err(|e| e.to_string())?;
                return Ok(true);
            }
            if self.recorded.contains_key(&m.id) {
                self.cluster.write(Command::RemoveNode { id: m.id }).await.map_err(|e| e.to_string())?;
            }
        }
        Ok(false)
    }

    /// Adds one ALIVE member outside Raft as a learner, and promotes it at once while
    /// voters are missing. `Ok(true)`: Raft changed (or is changing).
    async fn add_new(&self) -> Result<bool, String> {
        let new = self.members.iter().find(|m| {
            m.state == NodeState::Alive
                && !self.voters.contains(&m.id)
                && !self.learners.contains(&m.id)
                && !self.draining.contains(&m.id)
        });
        let Some(m) = new else { return Ok(false) };
        tracing::info!(node_id = m.id, addr = %m.addr, "adding node to raft as learner");
        // Blocking: returns once the learner has caught up (a new node's log is short),
        // so it can be promoted right away; bounded in case it stalls.
        let add = self.cluster.raft.add_learner(m.id, BasicNode::new(m.addr.clone()), true);
        match tokio::time::timeout(LEARNER_CATCH_UP_MAX, add).await {
            Ok(r) => r.map_err(|e| e.to_string())?,
            Err(_) => return Ok(true), // promoted by a later round once caught up
        };
        if self.voters.len() < self.config.voters_count_max {
            self.promote(m.id).await?;
        }
        Ok(true)
    }

    /// Records every member's address and state in the cluster state where it differs.
    async fn record_nodes(&self) -> Result<(), String> {
        for m in self.members {
            if self.gone_for_good(m) && m.id != self.cluster.id {
                continue;
            }
            // A DEAD or LEFT member the state does not have (a drained node removed at
            // once) is not recorded again.
            if matches!(m.state, NodeState::Dead | NodeState::Left) && !self.recorded.contains_key(&m.id) {
                continue;
            }
            let want = NodeRecord { address: m.addr.clone(), state: m.state };
            if self.recorded.get(&m.id) != Some(&want) {
                self.cluster.write(Command::SetNode { id: m.id, record: want }).await.map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }

    /// Demotes a drained voter to learner, so that no quorum counts on it; if it is
    /// this node (the leader), hands leadership over first (the next leader demotes
    /// it). Only while every other voter is ALIVE: a change needs the old and the new
    /// set's majorities. `Ok(true)`: Raft changed (or leadership moved).
    async fn demote_drained(&self, hand_over: &mut HandOverBackoff) -> Result<bool, String> {
        let Some(&id) = self.drained.iter().find(|id| self.voters.contains(id)) else { return Ok(false) };
        let alive = |v: &u64| self.members.iter().any(|m| m.id == *v && m.state == NodeState::Alive);
        let others: Vec<u64> = self.voters.iter().copied().filter(|v| *v != id).collect();
        if others.is_empty() || !others.iter().all(alive) {
            return Ok(false);
        }
        if id == self.cluster.id && hand_over.last.is_none_or(|at| at.elapsed() >= HAND_OVER_RETRY) {
            hand_over.last = Some(tokio::time::Instant::now());
            tracing::info!(node_id = id, "this node is drained: handing leadership over before it is demoted");
            super::hand_over_leadership(self.cluster).await;
            return Ok(true);
        }
        if id == self.cluster.id {
            // The hand-over did not move leadership (more than three voters): the leader
            // demotes itself; it steps down once that is committed and the others elect.
            tracing::info!(node_id = id, "this drained leader demotes itself; the others elect a leader");
        }
        tracing::info!(node_id = id, "demoting a drained node from voter to learner");
        let change = ChangeMembers::RemoveVoters(BTreeSet::from([id]));
        // `retain`: it stays a learner until it stops, then is removed at once.
        self.cluster.raft.change_membership(change, true).await.map_err(|e| e.to_string())?;
        Ok(true)
    }

    /// Promotes an ALIVE learner that has caught up while voters are missing.
    async fn promote_caught_up(&self, metrics: &openraft::RaftMetrics<u64, BasicNode>) -> Result<(), String> {
        if self.voters.len() >= self.config.voters_count_max {
            return Ok(());
        }
        let last = metrics.last_log_index.unwrap_or(0);
        let replication = metrics.replication.clone().unwrap_or_default();
        let alive: BTreeSet<u64> = self.members.iter().filter(|m| m.state == NodeState::Alive).map(|m| m.id).collect();
        let ready = self.learners.iter().find(|id| {
            let matched = replication.get(id).copied().flatten().map(|l| l.index).unwrap_or(0);
            alive.contains(id) && !self.draining.contains(id) && matched + LEARNER_LAG_MAX_ENTRIES >= last
        });
        match ready {
            Some(&id) => self.promote(id).await,
            None => Ok(()),
        }
    }

    async fn promote(&self, id: u64) -> Result<(), String> {
        tracing::info!(node_id = id, "promoting learner to voter");
        let change = ChangeMembers::AddVoterIds(BTreeSet::from([id]));
        self.cluster.raft.change_membership(change, false).await.map(|_| ()).map_err(|e| e.to_string())
    }
}
