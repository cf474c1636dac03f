//! The Raft leader's data-path duties, one pass per tick:
//!
//! 1. every shard of every topic has an open segment; a new one gets its primary and
//!    replicas among ALIVE nodes with disk space (not below their watermark), the
//!    least loaded first, so segments spread evenly, and is not opened at all while
//!    fewer such nodes are there than the topic's `min_insync_replicas` (publishes are
//!    refused instead, see `publish.rs`);
//! 2. an open segment whose primary is DEAD or LEFT is failed over ([`fail_over`]);
//!    the next pass opens its successor;
//! 3. a closed segment's copy on a node DEAD for `rereplicate_after_ms` (or removed
//!    from the cluster) is replaced by a copy on a live node, and a closed segment with
//!    fewer replicas than its topic's replication factor (opened while nodes were
//!    down) gets copies on live nodes up to it;
//! 4. retention: closed segments older than their topic's retention, and the oldest
//!    while the topic keeps more than its `retention_bytes_max`, are deleted once
//!    every consumer group bound to the topic has passed them (or at once with
//!    `retention_overrides_consumers`);
//!    A node being decommissioned (`DecommissionNode`) takes no new segment nor copy,
//!    and its closed copies are copied to other live nodes before it leaves their
//!    replica sets ([`drain_copies`]); its open segments rotate away (the keeper of
//!    their primary closes them);
//! 5. every consumer group runs on an ALIVE node; a group whose node is DEAD, LEFT or
//!    being decommissioned moves to the least loaded live node;
//! 6. an AMQP exclusive queue (a group with an `exclusive_owner`) whose node is DEAD or
//!    LEFT is deleted, as its connection is gone.
//!
//! Each pass proposes its commands together (at most [`PROPOSALS_IN_FLIGHT_MAX`] in
//! flight, so Raft commits many in one append) and waits for them before the next
//! pass, so a slow quorum slows the loop rather than piling up proposals.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventtermq_proto::internal::v1::SegmentStatusResponse;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::{lock, Segments};
use crate::cluster_state::{ClusterState, Command, NodeId, NodeState, SegmentId, SegmentRecord};
use crate::error::{ErrorCode, RequestError};
use crate::membership::Membership;

/// Passes are at least this far apart (a pass is linear in the state; while thousands
/// of changes arrive, one pass per spacing takes them all).
pub(crate) const PASS_SPACING_MIN: Duration = Duration::from_millis(50);

/// Commands of one pass proposed at once, at most.
const PROPOSALS_IN_FLIGHT_MAX: usize = 256;

/// Runs the leader's passes. A pass runs when something it acts on changed: the
/// applied cluster state, the leader, gossip's view of the members; or at the next
/// moment a pass would decide otherwise with nothing changed ([`next_due`]: a dead
/// node's copies due for re-replication, a closed segment reaching its retention), or
/// `retry` after a change that could not be made (no quorum, a fail-over that could
/// not reach enough replicas). Nothing else wakes it: an idle cluster costs no passes
/// however many topics and groups it holds.
pub async fn run(segments: Segments, membership: Membership, retry: Duration, stop: CancellationToken) {
    let failing_over: Arc<Mutex<HashSet<SegmentId>>> = Arc::default();
    // Fail-overs that did not complete wake the loop to try again.
    let retry_wake = Arc::new(tokio::sync::Notify::new());
    // Offset commits matter only while retention waits for a group to read past a
    // segment (`waits_for_consumers`); otherwise a pass follows the other changes.
    let mut layout_changes = segments.cluster().layout_changes();
    let mut state_changes = segments.cluster().state_changes();
    let mut waits_for_commits = false;
    let mut members_changed = membership.watch();
    // The first pass runs at once.
    let mut due: Option<tokio::time::Instant> = Some(tokio::time::Instant::now());
    let mut last_pass = tokio::time::Instant::now() - PASS_SPACING_MIN;
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            r = layout_changes.changed() => if r.is_err() { return },
            r = state_changes.changed(), if waits_for_commits => if r.is_err() { return },
            r = members_changed.changed() => if r.is_err() { return },
            _ = retry_wake.notified() => {}
            _ = sleep_until_due(due) => {}
        }
        due = None;
        // A burst of changes (thousands of topics created) runs a pass per
        // PASS_SPACING_MIN at most: each pass is linear in the state.
        tokio::time::sleep_until(last_pass + PASS_SPACING_MIN).await;
        last_pass = tokio::time::Instant::now();
        // This pass sees every change so far.
        state_changes.borrow_and_update();
        let cluster = segments.cluster();
        if cluster.leader().map(|(id, _)| id) != Some(cluster.id) {
            waits_for_commits = false;
            continue;
        }
        let dead_since: HashMap<NodeId, Duration> = membership
            .watch()
            .borrow()
            .iter()
            .filter(|m| matches!(m.state, NodeState::Dead | NodeState::Left))
            .map(|m| (m.id, m.state_since.elapsed()))
            .collect();
        let rereplicate_after = Duration::from_millis(segments.settings().rereplicate_after_ms);
        let now_unix_ms = segments.clock().now_unix_ms();
        let unreached = unreached_followers(cluster);
        // Decided under the state's read lock, without copying the state.
        let (cmds, gone_primaries, next) = {
            let st = cluster.state.read();
            let state = &st.state;
            let gone: Vec<SegmentId> = state
                .segments
                .iter()
                .filter(|(_, seg)| seg.is_open() && state.node_gone(seg.primary))
                .map(|(id, _)| *id)
                .collect();
            let next = next_due(state, &dead_since, rereplicate_after, now_unix_ms);
            let plan = plan_reaching(state, &dead_since, rereplicate_after, now_unix_ms, &unreached);
            waits_for_commits = plan.waits_for_consumers;
            (plan.commands, gone, next)
        };
        let mut deferred = false;
        // Proposed together, so that Raft commits them in shared log appends (one
        // fsync for many): 10,000 new topics open their segments in seconds, not in
        // one round trip each.
        let writes = futures::stream::iter(cmds)
            .map(|cmd| {
                if let Command::OpenSegment { topic, shard, replicas, min_insync, .. } = &cmd {
                    tracing::info!(topic = %topic, shard, replicas = ?replicas, min_insync, "opening a segment");
                }
                cluster.write(cmd)
            })
            .buffered(PROPOSALS_IN_FLIGHT_MAX);
        let mut writes = std::pin::pin!(writes);
        while let Some(r) = writes.next().await {
            if let Err(e) = r {
                tracing::info!(error = %e, "placement change deferred");
                deferred = true;
                break;
            }
        }
        for id in gone_primaries {
            if lock(&failing_over).insert(id) {
                let (segments, failing_over, wake) = (segments.clone(), failing_over.clone(), retry_wake.clone());
                segments.clone().spawn(async move {
                    let r = fail_over(&segments, id).await;
                    lock(&failing_over).remove(&id);
                    if let Err(e) = r {
                        tracing::info!(segment_id = id, error = %e, "fail-over deferred");
                        tokio::time::sleep(retry).await;
                        wake.notify_one();
                    }
                });
            }
        }
        let retry_at = deferred.then_some(retry);
        due = [next, retry_at].into_iter().flatten().min().map(|d| tokio::time::Instant::now() + d);
    }
}

/// Sleeps until `due`; never returns without one.
async fn sleep_until_due(due: Option<tokio::time::Instant>) {
    match due {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// How long until a pass would decide otherwise on the same state: the soonest of a
/// gone node's copies becoming due for re-replication and a closed segment reaching
/// its topic's retention age. `None`: nothing changes with time alone.
fn next_due(
    state: &ClusterState,
    dead_since: &HashMap<NodeId, Duration>,
    rereplicate_after: Duration,
    now_unix_ms: i64,
) -> Option<Duration> {
    let rereplicate = dead_since.values().filter(|d| **d < rereplicate_after).map(|d| rereplicate_after - *d).min();
    let retention = state
        .segments
        .values()
        .filter(|s| !s.is_open())
        .filter_map(|s| {
            let retention_ms = state.topic(&s.namespace, &s.topic).ok()?.retention_ms;
            let at = s.closed_unix_ms.saturating_add(i64::try_from(retention_ms).ok()?);
            (retention_ms > 0 && at > now_unix_ms).then(|| Duration::from_millis((at - now_unix_ms) as u64))
        })
        .min();
    // A millisecond late rather than early: the age compares with >=.
    [rereplicate, retention].into_iter().flatten().min().map(|d| d + Duration::from_millis(1))
}

/// The nodes this leader's Raft log has not reached up to what it applied: a node
/// that restarted a moment ago, whose new address the others cannot reach yet (DNS
/// answers lag a pod's restart by seconds), or one cut off. They are not made the
/// primary of a new segment while another replica will do: the others could not
/// forward publishes to it.
fn unreached_followers(cluster: &crate::cluster::Cluster) -> HashSet<NodeId> {
    let metrics = cluster.raft.metrics();
    let m = metrics.borrow();
    let applied = m.last_applied.map_or(0, |l| l.index);
    let Some(replication) = m.replication.as_ref() else { return HashSet::new() };
    replication
        .iter()
        .filter(|(id, matched)| **id != cluster.id && matched.map_or(0, |l| l.index) < applied)
        .map(|(id, _)| *id)
        .collect()
}

/// [`plan_reaching`] with every node reached.
#[cfg(test)]
fn plan(
    state: &ClusterState,
    dead_since: &HashMap<NodeId, Duration>,
    rereplicate_after: Duration,
    now_unix_ms: i64,
) -> Vec<Command> {
    plan_reaching(state, dead_since, rereplicate_after, now_unix_ms, &HashSet::new()).commands
}

/// What one pass decides.
struct Plan {
    /// The commands it proposes.
    commands: Vec<Command>,
    /// Retention keeps a segment until a bound group reads past it: an offset commit
    /// can change the plan (see [`Retention`]).
    waits_for_consumers: bool,
}

/// The commands one pass proposes: a pure function of the state, how long nodes have
/// been gone (`dead_since`), the clock, and which nodes the leader's log does not
/// reach yet (`unreached`: not made primaries of new segments while others can be).
fn plan_reaching(
    state: &ClusterState,
    dead_since: &HashMap<NodeId, Duration>,
    rereplicate_after: Duration,
    now_unix_ms: i64,
    unreached: &HashSet<NodeId>,
) -> Plan {
    let alive: Vec<NodeId> = state.alive_nodes().collect();
    if alive.is_empty() {
        return Plan { commands: Vec::new(), waits_for_consumers: false };
    }
    // Segment data (new segments, new copies) goes only to nodes with disk space.
    let data: Vec<NodeId> = state.data_nodes().collect();
    let mut load = Load::of_open_segments(state, &data);
    let lost = |n: &NodeId| !state.nodes.contains_key(n) || dead_since.get(n).is_some_and(|d| *d >= rereplicate_after);
    let mut cmds = open_segments(state, &mut load, data.len(), now_unix_ms, unreached);
    cmds.extend(rereplicate(state, &load, lost));
    let retention = retention(state, now_unix_ms);
    let waits_for_consumers = retention.waits_for_consumers;
    cmds.extend(expire(retention));
    let group_nodes: Vec<NodeId> = state.group_nodes().collect();
    cmds.extend(place_groups(state, &group_nodes));
    cmds.extend(exclusive_queues_of_gone_nodes(state));
    Plan { commands: cmds, waits_for_consumers }
}

/// 6. An AMQP exclusive queue whose node is DEAD or LEFT is deleted: the connection
///    that declared it is gone with its node (a node that restarted deletes those of
///    its earlier runs itself, see `amqp::Backend::delete_exclusive_queues_of_earlier_runs`).
fn exclusive_queues_of_gone_nodes(state: &ClusterState) -> Vec<Command> {
    let mut cmds = Vec::new();
    for (ns, namespace) in &state.namespaces {
        for (name, g) in &namespace.consumer_groups {
            if g.exclusive_owner.is_some_and(|o| state.node_gone(o.node_id)) {
                cmds.push(Command::DeleteConsumerGroup { namespace: ns.clone(), name: name.clone() });
            }
        }
    }
    cmds
}

/// How busy each ALIVE node is with open segments: being a primary counts most.
struct Load(BTreeMap<NodeId, u64>);

impl Load {
    const PRIMARY: u64 = 3;
    const REPLICA: u64 = 1;

    fn of_open_segments(state: &ClusterState, alive: &[NodeId]) -> Self {
        let mut load = Load(alive.iter().map(|n| (*n, 0)).collect());
        for s in state.segments.values().filter(|s| s.is_open()) {
            load.add(&s.replicas);
        }
        load
    }

    /// Counts a segment on `replicas` (primary first).
    fn add(&mut self, replicas: &[NodeId]) {
        for (i, n) in replicas.iter().enumerate() {
            if let Some(l) = self.0.get_mut(n) {
                *l += if i == 0 { Self::PRIMARY } else { Self::REPLICA };
            }
        }
    }

    /// No longer counts a segment on `replicas` (primary first).
    fn remove(&mut self, replicas: &[NodeId]) {
        for (i, n) in replicas.iter().enumerate() {
            if let Some(l) = self.0.get_mut(n) {
                *l = l.saturating_sub(if i == 0 { Self::PRIMARY } else { Self::REPLICA });
            }
        }
    }

    /// Up to `count` of the nodes counted (ALIVE, with disk space) not in `exclude`,
    /// the least loaded first.
    fn least_loaded(&self, count: usize, exclude: &[NodeId]) -> Vec<NodeId> {
        let mut nodes: Vec<(u64, NodeId)> =
            self.0.iter().filter(|(n, _)| !exclude.contains(n)).map(|(n, l)| (*l, *n)).collect();
        nodes.sort();
        nodes.into_iter().take(count).map(|(_, n)| n).collect()
    }
}

/// 1. An open segment for every shard that has none, on as many of the least loaded
///    of the `data` nodes (ALIVE, with disk space) as the replication factor asks,
///    and never on fewer than the topic's min in-sync replicas.
fn open_segments(
    state: &ClusterState,
    load: &mut Load,
    data: usize,
    now_unix_ms: i64,
    unreached: &HashSet<NodeId>,
) -> Vec<Command> {
    let mut cmds = Vec::new();
    // One look at the segments, not one per shard: a pass stays linear in the state.
    let open_shards: HashSet<(&str, &str, u32)> = state
        .segments
        .values()
        .filter(|s| s.is_open())
        .map(|s| (s.namespace.as_str(), s.topic.as_str(), s.shard))
        .collect();
    for (ns_name, ns) in &state.namespaces {
        for (topic_name, topic) in &ns.topics {
            for shard in 0..topic.shards {
                let open = open_shards.contains(&(ns_name.as_str(), topic_name.as_str(), shard));
                let count = (topic.replication_factor as usize).min(data);
                let min_insync = state.min_insync_for(topic);
                if open || count < min_insync as usize {
                    continue; // never opened on fewer copies than promised
                }
                let mut replicas = load.least_loaded(count, &[]);
                reached_primary_first(&mut replicas, unreached);
                load.add(&replicas);
                cmds.push(Command::OpenSegment {
                    namespace: ns_name.clone(),
                    topic: topic_name.clone(),
                    shard,
                    replicas,
                    now_unix_ms,
                    min_insync,
                });
            }
        }
    }
    cmds
}

/// Puts the first of `replicas` that is not `unreached` first (the primary), keeping
/// the others' order; unchanged when the first is reached or none is.
fn reached_primary_first(replicas: &mut [NodeId], unreached: &HashSet<NodeId>) {
    if let Some(i) = replicas.iter().position(|n| !unreached.contains(n)) {
        replicas[..=i].rotate_right(1);
    }
}

/// 3. A closed segment's copies on `lost` nodes are replaced by copies on live ones,
///    and a segment with fewer replicas than its topic's replication factor gets more,
///    as long as some complete copy is there to copy from.
fn rereplicate(state: &ClusterState, load: &Load, lost: impl Fn(&NodeId) -> bool) -> Vec<Command> {
    let mut cmds = Vec::new();
    for (id, s) in state.segments.iter().filter(|(_, s)| !s.is_open()) {
        let Ok(topic) = state.topic(&s.namespace, &s.topic) else { continue };
        if s.replicas.iter().any(|n| state.draining.contains(n)) {
            cmds.extend(drain_copies(state, load, *id, s, topic.replication_factor as usize, &lost));
            continue;
        }
        let wanted = (topic.replication_factor as usize).max(s.replicas.len());
        let under_replicated = s.replicas.len() < wanted;
        if !(s.replicas.iter().any(&lost) || under_replicated) || s.done.iter().all(&lost) {
            continue;
        }
        let mut replicas: Vec<NodeId> = s.replicas.iter().copied().filter(|n| !lost(n)).collect();
        let extra = load.least_loaded(wanted - replicas.len(), &s.replicas);
        if extra.is_empty() {
            continue; // no live node to take a copy; keep waiting for the old one
        }
        replicas.extend(extra);
        tracing::info!(segment_id = id, from = ?s.replicas, to = ?replicas, "re-replicating a closed segment");
        cmds.push(Command::SetSegmentReplicas { id: *id, replicas });
    }
    cmds
}

/// 3b. A closed segment with a copy on a node being decommissioned: first more copies
///     on other live nodes, up to the topic's replication factor (the draining node's
///     copy stays, a source to copy from meanwhile); once that many of them are
///     complete, the draining node leaves the replica set (and its keeper deletes the
///     file). Until then the segment keeps every copy it had.
fn drain_copies(
    state: &ClusterState,
    load: &Load,
    id: SegmentId,
    s: &SegmentRecord,
    replication_factor: usize,
    lost: impl Fn(&NodeId) -> bool,
) -> Option<Command> {
    if s.done.iter().all(&lost) {
        return None; // nothing to copy from
    }
    let draining = |n: &NodeId| state.draining.contains(n);
    let keep: Vec<NodeId> = s.replicas.iter().copied().filter(|n| !lost(n) && !draining(n)).collect();
    let wanted = replication_factor.max(1);
    if keep.len() < wanted {
        let extra = load.least_loaded(wanted - keep.len(), &s.replicas);
        if extra.is_empty() {
            return None; // no live node to take a copy: the node stays draining
        }
        let mut replicas: Vec<NodeId> = s.replicas.iter().copied().filter(|n| !lost(n)).collect();
        replicas.extend(extra);
        tracing::info!(segment_id = id, from = ?s.replicas, to = ?replicas, "copying a segment off a decommissioned node");
        return Some(Command::SetSegmentReplicas { id, replicas });
    }
    let complete = keep.iter().filter(|n| s.done.contains(n)).count();
    if complete < wanted {
        return None; // the new copies are still being fetched
    }
    tracing::info!(segment_id = id, from = ?s.replicas, to = ?keep, "dropping a decommissioned node's copy");
    Some(Command::SetSegmentReplicas { id, replicas: keep })
}

/// 4. Retention: a topic's closed segments older than its `retention_ms`, and its
///    oldest closed segments while those kept are more than `retention_bytes_max`
///    bytes; unless the topic has `retention_overrides_consumers`, only those every
///    consumer group bound to the topic has read past.
fn expire(retention: Retention) -> Option<Command> {
    let expired = retention.expired;
    if expired.is_empty() {
        return None;
    }
    tracing::info!(segments = ?expired, "deleting segments past their topic's retention (age or bytes)");
    Some(Command::DeleteSegments { ids: expired })
}

/// What retention decides now (carried out by [`expire`]).
struct Retention {
    /// Closed segments to delete.
    expired: Vec<SegmentId>,
    /// A segment past its retention is kept until a bound group reads past it: an
    /// offset commit can then let it go.
    waits_for_consumers: bool,
}

fn retention(state: &ClusterState, now_unix_ms: i64) -> Retention {
    // Per topic, its closed segments oldest first (ids grow as segments are opened).
    let mut by_topic: BTreeMap<(&str, &str), Vec<(SegmentId, &SegmentRecord)>> = BTreeMap::new();
    for (id, s) in state.segments.iter().filter(|(_, s)| !s.is_open()) {
        by_topic.entry((s.namespace.as_str(), s.topic.as_str())).or_default().push((*id, s));
    }
    let (mut expired, mut waits_for_consumers) = (Vec::new(), false);
    for ((namespace, topic_name), closed) in by_topic {
        let Ok(topic) = state.topic(namespace, topic_name) else { continue };
        let mut kept_bytes: u64 = closed.iter().map(|(_, s)| s.size_bytes).sum();
        for (id, s) in closed {
            let too_old = topic.retention_ms > 0 && now_unix_ms - s.closed_unix_ms >= topic.retention_ms as i64;
            let too_big = topic.retention_bytes_max > 0 && kept_bytes > topic.retention_bytes_max;
            if !(too_old || too_big) {
                continue;
            }
            if !(topic.retention_overrides_consumers || passed_by_all(state, id, s)) {
                waits_for_consumers = true;
                continue;
            }
            expired.push(id);
            kept_bytes -= s.size_bytes;
        }
    }
    Retention { expired, waits_for_consumers }
}

/// Every consumer group bound to the segment's topic has committed past its end.
fn passed_by_all(state: &ClusterState, id: SegmentId, s: &SegmentRecord) -> bool {
    let ns = &state.namespaces[&s.namespace];
    let mut bound = ns.consumer_groups.iter().filter(|(_, g)| g.bindings.iter().any(|b| b.topic == s.topic));
    bound.all(|(name, _)| {
        let committed = state.group_runtime(&s.namespace, name).and_then(|g| g.offsets.get(&id));
        committed.is_some_and(|off| *off >= s.next_offset)
    })
}

/// 5. Every consumer group on a live node not being decommissioned: a group without
///    one (or on a node being decommissioned) goes to the `alive` node running the
///    fewest groups.
fn place_groups(state: &ClusterState, alive: &[NodeId]) -> Vec<Command> {
    let mut group_load: BTreeMap<NodeId, u64> = alive.iter().map(|n| (*n, 0)).collect();
    for g in state.groups.values().flat_map(|groups| groups.values()) {
        if let Some(l) = g.node.and_then(|n| group_load.get_mut(&n)) {
            *l += 1;
        }
    }
    let mut cmds = Vec::new();
    for (ns, groups) in &state.groups {
        for (name, g) in groups {
            if g.node.is_some_and(|n| !state.node_gone(n) && !state.draining.contains(&n)) {
                continue;
            }
            let Some((&node, _)) = group_load.iter().min_by_key(|(n, l)| (**l, **n)) else { continue };
            *group_load.get_mut(&node).expect("present") += 1;
            cmds.push(Command::AssignGroup { namespace: ns.clone(), group: name.clone(), node: Some(node) });
        }
    }
    cmds
}

/// What an explicit rebalance (`Admin.Rebalance`, after nodes were added) changes:
/// the fewest group moves that leave every live node (not being decommissioned) within
/// one group of the others, and the open segments to close (`RotateSegments`) so that
/// their successors, placed on the least loaded nodes, even out the open segments'
/// load (a primary counts 3, another replica 1, as for new segments) to within one
/// primary. What is already fair does not move; an AMQP exclusive queue's group stays
/// with its connection's node. A pure function of the state.
pub fn rebalance(state: &ClusterState) -> Vec<Command> {
    let mut cmds = rebalance_groups(state);
    let rotate = rebalance_segments(state);
    if !rotate.is_empty() {
        cmds.push(Command::RotateSegments { ids: rotate });
    }
    cmds
}

/// What [`request_rebalance`] asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rebalanced {
    /// Raft log index of the last change (0: nothing to do).
    pub index: u64,
    pub consumer_groups_moved: u32,
    pub segments_rotated: u32,
}

/// Writes what [`rebalance`] decides on the cluster state as the leader knows it.
pub async fn request_rebalance(cluster: &crate::cluster::Cluster) -> Result<Rebalanced, RequestError> {
    let plan = rebalance(&cluster.read(true).await?.state);
    let mut done = Rebalanced::default();
    for cmd in plan {
        match &cmd {
            Command::AssignGroup { .. } => done.consumer_groups_moved += 1,
            Command::RotateSegments { ids } => done.segments_rotated += ids.len() as u32,
            _ => {}
        }
        done.index = cluster.write(cmd).await?;
    }
    tracing::info!(?done, "rebalance requested");
    Ok(done)
}

fn rebalance_groups(state: &ClusterState) -> Vec<Command> {
    let nodes: Vec<NodeId> = state.group_nodes().collect();
    let mut on: BTreeMap<NodeId, Vec<(&String, &String)>> = nodes.iter().map(|n| (*n, Vec::new())).collect();
    for (ns, groups) in &state.groups {
        for (name, g) in groups {
            let spec = state.namespaces.get(ns).and_then(|n| n.consumer_groups.get(name));
            let exclusive = spec.is_some_and(|s| s.exclusive_owner.is_some());
            if let Some(list) = g.node.and_then(|n| on.get_mut(&n)).filter(|_| !exclusive) {
                list.push((ns, name));
            }
        }
    }
    let mut cmds = Vec::new();
    loop {
        let most = on.iter().max_by_key(|(n, l)| (l.len(), std::cmp::Reverse(**n))).map(|(n, l)| (*n, l.len()));
        let least = on.iter().min_by_key(|(n, l)| (l.len(), **n)).map(|(n, l)| (*n, l.len()));
        let (Some((from, high)), Some((to, low))) = (most, least) else { return cmds };
        if high <= low + 1 {
            return cmds;
        }
        let (ns, name) = on.get_mut(&from).and_then(|l| l.pop()).expect("the most loaded node has a group");
        on.get_mut(&to).expect("present").push((ns, name));
        cmds.push(Command::AssignGroup { namespace: ns.clone(), group: name.clone(), node: Some(to) });
    }
}

fn rebalance_segments(state: &ClusterState) -> Vec<SegmentId> {
    let data: Vec<NodeId> = state.data_nodes().collect();
    let mut load = Load::of_open_segments(state, &data);
    let mut chosen: Vec<SegmentId> = Vec::new();
    // Those asked to close already count where their successors will go.
    for s in state.segments.values().filter(|s| s.is_open() && s.rotate) {
        load.remove(&s.replicas);
        let successor = load.least_loaded(s.replicas.len(), &[]);
        load.add(&successor);
    }
    let open: Vec<(SegmentId, &SegmentRecord)> =
        state.segments.iter().filter(|(_, s)| s.is_open() && !s.rotate).map(|(id, s)| (*id, s)).collect();
    for _ in 0..open.len() {
        let most = load.0.iter().max_by_key(|(n, l)| (**l, std::cmp::Reverse(**n))).map(|(n, l)| (*n, *l));
        let least = load.0.iter().min_by_key(|(n, l)| (**l, **n)).map(|(n, l)| (*n, *l));
        let (Some((high_node, high)), Some((low_node, low))) = (most, least) else { break };
        if high <= low + Load::PRIMARY {
            break;
        }
        // A segment on the most loaded node and not on the least loaded one, one it
        // leads first.
        let candidate = open
            .iter()
            .filter(|(id, s)| {
                !chosen.contains(id) && s.replicas.contains(&high_node) && !s.replicas.contains(&low_node)
            })
            .min_by_key(|(id, s)| (s.primary != high_node, *id));
        let Some((id, s)) = candidate else { break };
        load.remove(&s.replicas);
        let successor = load.least_loaded(s.replicas.len(), &[]);
        load.add(&successor);
        chosen.push(*id);
    }
    chosen
}

/// Closes an open segment whose primary is gone (or restarted) at the longest log
/// among its replicas, without losing a confirmed record.
///
/// A record is confirmed once `quorum` replicas (a majority of the replica set, or the
/// topic's `min_insync_replicas` when more) fsynced it. The fail-over freezes (stops
/// the appends of) and asks enough replicas to meet every such set: `n - quorum + 1`
/// of `n`. At least one of them has every confirmed record, so the longest of their
/// logs has them all; and once they are frozen, the old primary can no longer gather a
/// quorum to confirm anything new.
pub async fn fail_over(segments: &Segments, id: SegmentId) -> Result<(), RequestError> {
    let seg = segments.cluster().state.read().state.segment(id)?.clone();
    if !seg.is_open() {
        return Ok(());
    }
    let n = seg.replicas.len();
    let needed = n - seg.quorum() + 1;
    let me = segments.cluster().id;
    let asks = seg.replicas.iter().copied().map(|node| {
        let segments = segments.clone();
        async move {
            let r = if node == me {
                super::replica::status(&segments, id, true).await
            } else {
                ask_status(&segments, node, id).await
            };
            (node, r)
        }
    });
    let answers: Vec<(NodeId, SegmentStatusResponse)> = futures::future::join_all(asks)
        .await
        .into_iter()
        .filter_map(|(node, r)| match r {
            Ok(s) => Some((node, s)),
            Err(e) => {
                tracing::debug!(segment_id = id, node, error = %e, "replica did not answer the fail-over");
                None
            }
        })
        .collect();
    if answers.len() < needed {
        return Err(RequestError::new(
            ErrorCode::NotReady,
            format!("fail-over of segment {id}: {} of {n} replicas answered, {needed} needed", answers.len()),
        ));
    }
    let (_, longest) = answers.iter().max_by_key(|(_, s)| s.next_offset).expect("needed >= 1");
    tracing::info!(
        segment_id = id,
        next_offset = longest.next_offset,
        answered = answers.len(),
        "failing over segment"
    );
    let cmd = Command::CloseSegment {
        id,
        next_offset: longest.next_offset,
        size_bytes: longest.size_bytes,
        checksum: 0,
        done: Vec::new(),
        now_unix_ms: segments.clock().now_unix_ms(),
    };
    match segments.cluster().write(cmd).await {
        Ok(_) => {
            segments.metrics().failed_over();
            Ok(())
        }
        Err(e) if e.code == ErrorCode::SegmentClosed => Ok(()),
        Err(e) => Err(e),
    }
}

/// Freezes `node`'s copy of segment `id` and asks what it holds.
async fn ask_status(segments: &Segments, node: NodeId, id: SegmentId) -> Result<SegmentStatusResponse, RequestError> {
    let addr = segments.node_addr(node)?;
    Ok(segments.peers().segment_status(node, &addr, id, true).await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster_state::*;

    const HOUR_MS: i64 = 3_600_000;

    fn state_with_topic(retention_ms: u64) -> ClusterState {
        let mut s = ClusterState::new_cluster();
        for id in 1..=3 {
            let record = NodeRecord { address: format!("n{id}:1"), state: NodeState::Alive };
            s.apply(&Command::SetNode { id, record }).unwrap();
        }
        let spec = TopicSpec {
            shards: 2,
            replication_factor: 3,
            retention_ms,
            default_exchange_type: ExchangeType::Fanout,
            segment_size_max_bytes: 0,
            min_insync_replicas: 0,
            ..Default::default()
        };
        s.apply(&Command::CreateTopic { namespace: "default".into(), name: "t".into(), spec }).unwrap();
        s
    }

    fn apply_all(s: &mut ClusterState, cmds: &[Command]) {
        for c in cmds {
            s.apply(c).unwrap();
        }
    }

    #[test]
    fn a_node_the_leaders_log_does_not_reach_is_no_new_primary_while_another_can_be() {
        let opened = |unreached: &[NodeId]| -> Vec<Vec<NodeId>> {
            let s = state_with_topic(0);
            let unreached: HashSet<NodeId> = unreached.iter().copied().collect();
            plan_reaching(&s, &HashMap::new(), Duration::from_secs(60), 0, &unreached)
                .commands
                .into_iter()
                .filter_map(|c| match c {
                    Command::OpenSegment { replicas, .. } => Some(replicas),
                    _ => None,
                })
                .collect()
        };
        let all_reached = opened(&[]);
        assert_eq!(all_reached.len(), 2);
        let first_primary = all_reached[0][0];
        let avoided = opened(&[first_primary]);
        assert_eq!(avoided.len(), 2);
        for replicas in &avoided {
            assert_ne!(replicas[0], first_primary, "{replicas:?}");
            // Still a copy: only who is primary changes.
            assert!(replicas.contains(&first_primary), "{replicas:?}");
            assert_eq!(replicas.len(), 3);
        }
        // Nobody reached: placed as before rather than not at all.
        assert_eq!(opened(&[1, 2, 3]), all_reached);
        let mut r = vec![7, 8, 9];
        reached_primary_first(&mut r, &HashSet::from([7, 8]));
        assert_eq!(r, vec![9, 7, 8]);
    }

    #[test]
    fn opens_one_segment_per_shard_spread_over_live_nodes() {
        let mut s = state_with_topic(0);
        let cmds = plan(&s, &HashMap::new(), Duration::from_secs(60), 0);
        assert_eq!(cmds.len(), 2);
        apply_all(&mut s, &cmds);
        let primaries: HashSet<NodeId> = s.segments.values().map(|seg| seg.primary).collect();
        assert_eq!(primaries.len(), 2, "the two shards get different primaries");
        assert!(s.segments.values().all(|seg| seg.replicas.len() == 3));
        assert!(plan(&s, &HashMap::new(), Duration::from_secs(60), 0).is_empty(), "nothing more to do");
    }

    #[test]
    fn retention_deletes_closed_segments_every_bound_group_passed() {
        let mut s = state_with_topic(HOUR_MS as u64);
        let cmds = plan(&s, &HashMap::new(), Duration::from_secs(60), 0);
        apply_all(&mut s, &cmds);
        let binding = BindingSpec::fanout("t");
        let spec = ConsumerGroupSpec { bindings: vec![binding], size: 10, since_unix_ms: 0, ..Default::default() };
        s.apply(&Command::CreateConsumerGroup { namespace: "default".into(), name: "g".into(), spec }).unwrap();
        let (first, _) = s.segments.iter().next().map(|(id, seg)| (*id, seg.clone())).unwrap();
        s.apply(&Command::CloseSegment {
            id: first,
            next_offset: 10,
            size_bytes: 100,
            checksum: 0,
            done: vec![],
            now_unix_ms: 0,
        })
        .unwrap();
        let deletes = |s: &ClusterState, now| {
            plan(s, &HashMap::new(), Duration::from_secs(60), now)
                .into_iter()
                .filter(|c| matches!(c, Command::DeleteSegments { .. }))
                .count()
        };
        assert_eq!(deletes(&s, HOUR_MS / 2), 0, "younger than the retention");
        assert!(!retention(&s, HOUR_MS / 2).waits_for_consumers, "a commit changes nothing yet");
        assert_eq!(deletes(&s, 2 * HOUR_MS), 0, "the group has not read it yet");
        assert!(retention(&s, 2 * HOUR_MS).waits_for_consumers, "the group's next commit can let it go");
        let offsets = std::collections::BTreeMap::from([(first, 10)]);
        let handed_out = Default::default();
        let commit = Command::CommitOffsets { namespace: "default".into(), group: "g".into(), offsets, handed_out };
        s.apply(&commit).unwrap();
        let cmds = plan(&s, &HashMap::new(), Duration::from_secs(60), 2 * HOUR_MS);
        assert!(cmds.contains(&Command::DeleteSegments { ids: vec![first] }), "{cmds:?}");
        assert!(!retention(&s, 2 * HOUR_MS).waits_for_consumers);
    }

    #[test]
    fn retention_by_bytes_deletes_the_oldest_beyond_the_limit_once_passed_or_when_it_overrides() {
        let mut s = ClusterState::new_cluster();
        let update = |bytes, overrides| Command::UpdateTopic {
            namespace: "default".into(),
            name: "t".into(),
            update: TopicUpdate {
                retention_bytes_max: Some(bytes),
                retention_overrides_consumers: Some(overrides),
                ..Default::default()
            },
        };
        let spec = TopicSpec { shards: 1, replication_factor: 1, ..Default::default() };
        s.apply(&Command::CreateTopic { namespace: "default".into(), name: "t".into(), spec }).unwrap();
        let spec = ConsumerGroupSpec { bindings: vec![BindingSpec::fanout("t")], size: 10, ..Default::default() };
        s.apply(&Command::CreateConsumerGroup { namespace: "default".into(), name: "g".into(), spec }).unwrap();
        // Five closed segments of 100 bytes each.
        let mut ids = Vec::new();
        for _ in 0..5 {
            let open = Command::OpenSegment {
                namespace: "default".into(),
                topic: "t".into(),
                shard: 0,
                replicas: vec![1],
                now_unix_ms: 0,
                min_insync: 1,
            };
            s.apply(&open).unwrap();
            let id = *s.segments.keys().last().unwrap();
            let close = Command::CloseSegment {
                id,
                next_offset: 10,
                size_bytes: 100,
                checksum: 0,
                done: vec![],
                now_unix_ms: 0,
            };
            s.apply(&close).unwrap();
            ids.push(id);
        }
        let deleted = |s: &ClusterState| {
            expire(retention(s, 0)).map(|c| match c {
                Command::DeleteSegments { ids } => ids,
                other => panic!("{other:?}"),
            })
        };
        assert_eq!(deleted(&s), None, "no limit");
        s.apply(&update(250, false)).unwrap();
        assert_eq!(deleted(&s), None, "the group has read none of them");
        let offsets = ids.iter().take(2).map(|id| (*id, 10)).collect();
        let commit = Command::CommitOffsets {
            namespace: "default".into(),
            group: "g".into(),
            offsets,
            handed_out: Default::default(),
        };
        s.apply(&commit).unwrap();
        assert_eq!(deleted(&s), Some(ids[..2].to_vec()), "the two oldest, which the group passed");
        s.apply(&update(250, true)).unwrap();
        assert_eq!(deleted(&s), Some(ids[..3].to_vec()), "down to 200 bytes, read or not");
    }

    fn set_node(s: &mut ClusterState, id: NodeId, state: NodeState) {
        s.apply(&Command::SetNode { id, record: NodeRecord { address: format!("n{id}:1"), state } }).unwrap();
    }

    fn close(s: &mut ClusterState, id: SegmentId, done: &[NodeId]) {
        let close =
            Command::CloseSegment { id, next_offset: 1, size_bytes: 1, checksum: 0, done: vec![], now_unix_ms: 0 };
        s.apply(&close).unwrap();
        for node in done {
            s.apply(&Command::SegmentDone { id, node: *node, size_bytes: 1, checksum: 7 }).unwrap();
        }
    }

    fn replica_changes(cmds: &[Command]) -> Vec<(SegmentId, Vec<NodeId>)> {
        cmds.iter()
            .filter_map(|c| match c {
                Command::SetSegmentReplicas { id, replicas } => Some((*id, replicas.clone())),
                _ => None,
            })
            .collect()
    }

    /// What the nodes' keepers do, done at once: a primary with a draining node in its
    /// replica set closes its segment, and every replica of a closed segment gets its
    /// complete copy. `Ok(true)`: something changed.
    fn keepers(s: &mut ClusterState) -> bool {
        let mut cmds = Vec::new();
        for (id, seg) in &s.segments {
            if seg.is_open() && seg.replicas.iter().any(|n| s.draining.contains(n)) {
                cmds.push(Command::CloseSegment {
                    id: *id,
                    next_offset: 1,
                    size_bytes: 1,
                    checksum: 0,
                    done: vec![],
                    now_unix_ms: 0,
                });
                cmds.extend(seg.replicas.iter().map(|n| Command::SegmentDone {
                    id: *id,
                    node: *n,
                    size_bytes: 1,
                    checksum: 7,
                }));
            } else if !seg.is_open() {
                let missing = seg.replicas.iter().filter(|n| !seg.done.contains(n));
                cmds.extend(missing.map(|n| Command::SegmentDone { id: *id, node: *n, size_bytes: 1, checksum: 7 }));
            }
        }
        apply_all(s, &cmds);
        !cmds.is_empty()
    }

    /// One placement pass, applied.
    fn pass(s: &mut ClusterState) {
        let cmds = plan(s, &HashMap::new(), Duration::from_secs(60), 0);
        apply_all(s, &cmds);
    }

    /// Placement passes and keepers until neither changes anything (bounded).
    fn settle(s: &mut ClusterState) {
        for _ in 0..50 {
            let cmds = plan(s, &HashMap::new(), Duration::from_secs(60), 0);
            apply_all(s, &cmds);
            if !keepers(s) && cmds.is_empty() {
                return;
            }
        }
        panic!("placement did not settle: {s:?}");
    }

    /// After a decommission has settled: nothing depends on `gone`, every closed segment
    /// has its replication factor in complete copies on the other nodes, and every
    /// shard has an open segment without it.
    fn assert_drained(s: &ClusterState, gone: NodeId) {
        assert!(s.drain_progress(gone).drained(), "{:?}", s.drain_progress(gone));
        for (id, seg) in &s.segments {
            assert!(!seg.replicas.contains(&gone) && !seg.done.contains(&gone), "segment {id}: {seg:?}");
            if !seg.is_open() {
                let rf = s.topic(&seg.namespace, &seg.topic).unwrap().replication_factor as usize;
                assert!(seg.done.len() >= rf, "segment {id} has {} of {rf} copies: {seg:?}", seg.done.len());
            }
        }
        for (ns, n) in &s.namespaces {
            for (t, spec) in &n.topics {
                let open = s.topic_segments(ns, t).filter(|(_, seg)| seg.is_open()).count();
                assert_eq!(open, spec.shards as usize, "{ns}/{t}");
            }
        }
    }

    #[test]
    fn a_decommissioned_node_is_copied_off_before_it_leaves_and_its_groups_move() {
        let mut s = state_with_topic(0);
        set_node(&mut s, 4, NodeState::Alive);
        let spec = ConsumerGroupSpec { bindings: vec![BindingSpec::fanout("t")], size: 10, ..Default::default() };
        for g in ["g1", "g2", "g3", "g4"] {
            let create =
                Command::CreateConsumerGroup { namespace: "default".into(), name: g.into(), spec: spec.clone() };
            s.apply(&create).unwrap();
        }
        pass(&mut s);
        // Close the first generation everywhere: closed copies to move.
        let first: Vec<SegmentId> = s.segments.keys().copied().collect();
        for id in &first {
            let holders = s.segments[id].replicas.clone();
            close(&mut s, *id, &holders);
        }
        pass(&mut s);
        let gone = s.segments[&first[0]].replicas[0];
        assert!(s.drain_progress(gone).closed_segments >= 1);
        s.apply(&Command::DecommissionNode { id: gone, cancel: false }).unwrap();

        // First pass: a copy is added beside the draining one (still a source), groups move.
        let cmds = plan(&s, &HashMap::new(), Duration::from_secs(60), 0);
        let changes = replica_changes(&cmds);
        let (id, replicas) = changes.iter().find(|(id, _)| *id == first[0]).expect("a new copy of the first segment");
        assert_eq!(replicas.len(), 4, "the draining copy stays until the others are complete: {replicas:?}");
        assert!(replicas.contains(&gone), "{replicas:?}");
        let moved =
            cmds.iter().filter(|c| matches!(c, Command::AssignGroup { node: Some(n), .. } if *n != gone)).count();
        assert_eq!(moved as u64, s.drain_progress(gone).consumer_groups, "{cmds:?}");
        apply_all(&mut s, &cmds);
        // Until the new copy is complete, the draining node stays in the set.
        let again = replica_changes(&plan(&s, &HashMap::new(), Duration::from_secs(60), 0));
        assert!(again.iter().all(|(i, _)| i != id), "{again:?}");

        settle(&mut s);
        assert_drained(&s, gone);
        // Cancelled, the node takes segments again.
        s.apply(&Command::DecommissionNode { id: gone, cancel: true }).unwrap();
        assert!(s.data_nodes().any(|n| n == gone));
    }

    #[test]
    fn a_decommission_waits_while_no_other_node_can_take_the_copies() {
        let mut s = state_with_topic(0);
        set_node(&mut s, 4, NodeState::Alive);
        pass(&mut s);
        let id = *s.segments.keys().next().unwrap();
        let holders = s.segments[&id].replicas.clone();
        close(&mut s, id, &holders);
        let gone = holders[0];
        s.apply(&Command::DecommissionNode { id: gone, cancel: false }).unwrap();
        // The one node that could take a copy dies: the copy stays where it is.
        let spare = [1, 2, 3, 4].into_iter().find(|n| !holders.contains(n)).unwrap();
        set_node(&mut s, spare, NodeState::Dead);
        let changes = replica_changes(&plan(&s, &HashMap::new(), Duration::from_secs(60), 0));
        assert!(changes.iter().all(|(i, _)| *i != id), "{changes:?}");
        assert_eq!(s.drain_progress(gone).closed_segments, 1);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Whatever the cluster (3-6 nodes, topics of replication factor 1 up to one
        /// less than the nodes, closed generations, groups), a decommission the state
        /// accepts ends drained with every copy on the other nodes.
        #[test]
        fn every_accepted_decommission_ends_drained(
            nodes in 3u64..=6,
            topics in proptest::collection::vec((1u32..=3, 1u32..=5), 1..4),
            generations in 0usize..3,
            groups in 0usize..5,
            pick in 0u64..6,
        ) {
            let mut s = ClusterState::new_cluster();
            for id in 1..=nodes {
                set_node(&mut s, id, NodeState::Alive);
            }
            for (i, (shards, rf)) in topics.iter().enumerate() {
                let spec = TopicSpec { shards: *shards, replication_factor: *rf, ..Default::default() };
                s.apply(&Command::CreateTopic { namespace: "default".into(), name: format!("t{i}"), spec }).unwrap();
            }
            for g in 0..groups {
                let spec = ConsumerGroupSpec { bindings: vec![BindingSpec::fanout("t0")], size: 10, ..Default::default() };
                s.apply(&Command::CreateConsumerGroup { namespace: "default".into(), name: format!("g{g}"), spec }).unwrap();
            }
            for _ in 0..=generations {
                pass(&mut s);
                let open: Vec<(SegmentId, Vec<NodeId>)> =
                    s.segments.iter().filter(|(_, g)| g.is_open()).map(|(id, g)| (*id, g.replicas.clone())).collect();
                for (id, holders) in open {
                    close(&mut s, id, &holders);
                }
            }
            pass(&mut s);
            let gone = 1 + pick % nodes;
            let widest = topics.iter().map(|(_, rf)| *rf as u64).max().unwrap();
            let accepted = s.apply(&Command::DecommissionNode { id: gone, cancel: false });
            proptest::prop_assert_eq!(accepted.is_ok(), nodes > widest, "{:?}", accepted);
            if accepted.is_ok() {
                settle(&mut s);
                assert_drained(&s, gone);
            }
        }
    }

    #[test]
    fn a_rebalance_gives_a_new_node_its_share_and_moves_nothing_else() {
        let mut s = state_with_topic(0);
        let spec = TopicSpec { shards: 3, replication_factor: 3, ..Default::default() };
        s.apply(&Command::CreateTopic { namespace: "default".into(), name: "t3".into(), spec }).unwrap();
        for g in 0..6 {
            let spec = ConsumerGroupSpec { bindings: vec![BindingSpec::fanout("t")], size: 10, ..Default::default() };
            s.apply(&Command::CreateConsumerGroup { namespace: "default".into(), name: format!("g{g}"), spec })
                .unwrap();
        }
        pass(&mut s);
        assert!(rebalance(&s).is_empty(), "already fair: {:?}", rebalance(&s));

        set_node(&mut s, 4, NodeState::Alive);
        assert_eq!(s.node_load(4), NodeLoad::default());
        let cmds = rebalance(&s);
        let moved: Vec<NodeId> = cmds
            .iter()
            .filter_map(|c| match c {
                Command::AssignGroup { node, .. } => *node,
                _ => None,
            })
            .collect();
        assert_eq!(moved, [4], "6 groups on 4 nodes: one moves, to the new node");
        let rotated = cmds.iter().find_map(|c| match c {
            Command::RotateSegments { ids } => Some(ids.clone()),
            _ => None,
        });
        let rotated = rotated.expect("open segments to close");
        assert!(!rotated.is_empty() && rotated.len() < 5, "{rotated:?} of 5 open segments");
        apply_all(&mut s, &cmds);
        assert!(rotated.iter().all(|id| s.segments[id].rotate));
        assert!(rebalance(&s).is_empty(), "asked once: {:?}", rebalance(&s));
        // The primaries close them; their successors go to the least loaded nodes.
        for id in &rotated {
            let holders = s.segments[id].replicas.clone();
            close(&mut s, *id, &holders);
        }
        pass(&mut s);
        let load = s.node_load(4);
        assert!(load.primaries >= 1 && load.consumer_groups == 1, "{load:?}");
        let loads: Vec<u64> = (1..=4).map(|n| 3 * s.node_load(n).primaries + s.node_load(n).replicas).collect();
        assert!(loads.iter().max().unwrap() - loads.iter().min().unwrap() <= Load::PRIMARY, "{loads:?}");
        assert!(rebalance(&s).is_empty(), "fair now: {:?}", rebalance(&s));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Groups placed anyhow on 1-6 live nodes (one maybe being decommissioned): a
        /// rebalance leaves every other node within one group of the rest, moves none to
        /// the decommissioned node, and a second rebalance moves nothing.
        #[test]
        fn rebalanced_groups_are_within_one_of_each_other(
            nodes in 1u64..=6,
            placed in proptest::collection::vec(0u64..6, 0..30),
            drain in proptest::option::of(0u64..6),
        ) {
            let mut s = ClusterState::new_cluster();
            for id in 1..=nodes {
                set_node(&mut s, id, NodeState::Alive);
            }
            for (i, n) in placed.iter().enumerate() {
                let spec = ConsumerGroupSpec { size: 10, ..Default::default() };
                let name = format!("g{i}");
                s.apply(&Command::CreateConsumerGroup { namespace: "default".into(), name: name.clone(), spec }).unwrap();
                let node = Some(1 + n % nodes);
                s.apply(&Command::AssignGroup { namespace: "default".into(), group: name, node }).unwrap();
            }
            let drained = drain.map(|d| 1 + d % nodes).filter(|_| nodes > 1);
            if let Some(d) = drained {
                s.apply(&Command::DecommissionNode { id: d, cancel: false }).unwrap();
            }
            let cmds = rebalance(&s);
            apply_all(&mut s, &cmds);
            let counts: Vec<u64> = s.group_nodes().map(|n| s.node_load(n).consumer_groups).collect();
            let (max, min) = (counts.iter().max().copied().unwrap_or(0), counts.iter().min().copied().unwrap_or(0));
            proptest::prop_assert!(max <= min + 1, "{:?}", counts);
            for c in &cmds {
                if let Command::AssignGroup { node, .. } = c {
                    proptest::prop_assert!(node.is_some() && *node != drained);
                }
            }
            proptest::prop_assert!(rebalance(&s).is_empty());
        }
    }

    #[test]
    fn groups_move_off_dead_nodes() {
        let mut s = state_with_topic(0);
        let spec = ConsumerGroupSpec { bindings: vec![], size: 10, since_unix_ms: 0, ..Default::default() };
        s.apply(&Command::CreateConsumerGroup { namespace: "default".into(), name: "g".into(), spec }).unwrap();
        let cmds = plan(&s, &HashMap::new(), Duration::from_secs(60), 0);
        apply_all(&mut s, &cmds);
        let node = s.group_runtime("default", "g").unwrap().node.unwrap();
        set_node(&mut s, node, NodeState::Dead);
        let cmds = plan(&s, &HashMap::from([(node, Duration::from_secs(1))]), Duration::from_secs(60), 0);
        let moved = cmds.iter().find_map(|c| match c {
            Command::AssignGroup { node, .. } => *node,
            _ => None,
        });
        assert!(moved.is_some_and(|n| n != node && s.node_alive(n)), "{cmds:?}");
    }

    #[test]
    fn exclusive_queues_of_dead_or_left_nodes_are_deleted() {
        let mut s = state_with_topic(0);
        for (name, owner) in [("ex-1", Some(1)), ("ex-2", Some(2)), ("ex-3", Some(3)), ("plain", None)] {
            let spec = ConsumerGroupSpec {
                size: 10,
                exclusive_owner: owner.map(|node_id| ExclusiveOwner { node_id, run_id: 7 }),
                ..Default::default()
            };
            s.apply(&Command::CreateConsumerGroup { namespace: "default".into(), name: name.into(), spec }).unwrap();
        }
        let deletes = |s: &ClusterState| {
            let mut names: Vec<String> = plan(s, &HashMap::new(), Duration::from_secs(60), 0)
                .into_iter()
                .filter_map(|c| match c {
                    Command::DeleteConsumerGroup { name, .. } => Some(name),
                    _ => None,
                })
                .collect();
            names.sort();
            names
        };
        assert!(deletes(&s).is_empty(), "every owner ALIVE");
        set_node(&mut s, 1, NodeState::Suspect);
        assert!(deletes(&s).is_empty(), "SUSPECT is not gone");
        set_node(&mut s, 1, NodeState::Dead);
        set_node(&mut s, 2, NodeState::Left);
        assert_eq!(deletes(&s), ["ex-1", "ex-2"]);
    }

    #[test]
    fn a_closed_copy_on_a_long_dead_node_is_replaced_from_a_live_copy() {
        let mut s = state_with_topic(0);
        let cmds = plan(&s, &HashMap::new(), Duration::from_secs(60), 0);
        apply_all(&mut s, &cmds);
        let id = *s.segments.keys().next().unwrap();
        assert_eq!(s.segments[&id].replicas.len(), 3);
        let dead = s.segments[&id].replicas[1];
        let holder = s.segments[&id].replicas[0];
        close(&mut s, id, &[holder, dead]);
        set_node(&mut s, dead, NodeState::Dead);
        set_node(&mut s, 4, NodeState::Alive);

        let recent = HashMap::from([(dead, Duration::from_secs(10))]);
        assert!(replica_changes(&plan(&s, &recent, Duration::from_secs(60), 0)).is_empty(), "not dead long enough");
        let long = HashMap::from([(dead, Duration::from_secs(120))]);
        let changes = replica_changes(&plan(&s, &long, Duration::from_secs(60), 0));
        assert_eq!(changes.len(), 1, "{changes:?}");
        let (changed, replicas) = &changes[0];
        assert_eq!(*changed, id);
        assert_eq!(replicas.len(), 3, "{replicas:?}");
        assert!(!replicas.contains(&dead) && replicas.contains(&4) && replicas.contains(&holder), "{replicas:?}");

        // With the only complete copy on the dead node there is nothing to copy from.
        let mut s2 = s.clone();
        s2.apply(&Command::SegmentLost { id, node: holder }).unwrap();
        assert!(replica_changes(&plan(&s2, &long, Duration::from_secs(60), 0)).is_empty());
    }

    #[test]
    fn no_segment_is_opened_on_fewer_nodes_than_min_insync_replicas() {
        let mut s = state_with_topic(0);
        set_node(&mut s, 2, NodeState::Dead);
        set_node(&mut s, 3, NodeState::Left);
        assert!(plan(&s, &HashMap::new(), Duration::from_secs(60), 0).is_empty(), "1 of 3 nodes alive, 2 needed");

        set_node(&mut s, 3, NodeState::Alive);
        let cmds = plan(&s, &HashMap::new(), Duration::from_secs(60), 0);
        assert_eq!(cmds.len(), 2, "{cmds:?}");
        apply_all(&mut s, &cmds);
        for seg in s.segments.values() {
            assert_eq!((seg.replicas.len(), seg.min_insync, seg.quorum()), (2, 2, 2), "{seg:?}");
        }

        // A topic may ask for every copy: then two live nodes are not enough.
        let spec = TopicSpec { min_insync_replicas: 3, ..s.topic("default", "t").unwrap().clone() };
        s.apply(&Command::CreateTopic { namespace: "default".into(), name: "all".into(), spec }).unwrap();
        assert!(plan(&s, &HashMap::new(), Duration::from_secs(60), 0).is_empty());
    }

    #[test]
    fn a_cluster_smaller_than_min_insync_replicas_still_opens_segments() {
        let mut s = ClusterState::new_cluster();
        set_node(&mut s, 1, NodeState::Alive);
        let spec = state_with_topic(0).topic("default", "t").unwrap().clone();
        s.apply(&Command::CreateTopic { namespace: "default".into(), name: "t".into(), spec }).unwrap();
        let cmds = plan(&s, &HashMap::new(), Duration::from_secs(60), 0);
        apply_all(&mut s, &cmds);
        assert_eq!(s.segments.len(), 2);
        assert!(s.segments.values().all(|seg| seg.replicas == vec![1] && seg.quorum() == 1));
    }

    #[test]
    fn a_segment_closed_with_fewer_copies_than_the_replication_factor_gets_more() {
        let mut s = state_with_topic(0);
        set_node(&mut s, 3, NodeState::Dead);
        let cmds = plan(&s, &HashMap::new(), Duration::from_secs(60), 0);
        apply_all(&mut s, &cmds);
        let id = *s.segments.keys().next().unwrap();
        assert_eq!(s.segments[&id].replicas.len(), 2);
        close(&mut s, id, &[1]);
        let dead = HashMap::from([(3, Duration::from_secs(1))]);
        assert!(replica_changes(&plan(&s, &dead, Duration::from_secs(60), 0)).is_empty(), "no third node yet");

        set_node(&mut s, 3, NodeState::Alive);
        let changes = replica_changes(&plan(&s, &HashMap::new(), Duration::from_secs(60), 0));
        assert!(changes.iter().any(|(i, r)| *i == id && r.len() == 3 && r.contains(&3)), "{changes:?}");
    }

    #[test]
    fn nodes_below_their_disk_watermark_get_no_new_segment_and_no_new_copy() {
        let mut s = state_with_topic(0);
        let low = Some(DiskLow { free_bytes: 1, free_min_bytes: 2 });
        s.apply(&Command::SetDiskLow { node: 3, low }).unwrap();
        let cmds = plan(&s, &HashMap::new(), Duration::from_secs(60), 0);
        assert_eq!(cmds.len(), 2, "{cmds:?}");
        apply_all(&mut s, &cmds);
        for seg in s.segments.values() {
            assert_eq!((seg.replicas.len(), seg.quorum()), (2, 2), "{seg:?}");
            assert!(!seg.replicas.contains(&3), "{seg:?}");
        }
        // A closed copy to add (replication factor 3) does not go to the low node either.
        let id = *s.segments.keys().next().unwrap();
        let holder = s.segments[&id].replicas[0];
        close(&mut s, id, &[holder]);
        assert!(replica_changes(&plan(&s, &HashMap::new(), Duration::from_secs(60), 0)).is_empty());

        // With two of three low, none is opened: 1 node with room, 2 needed.
        let mut s = state_with_topic(0);
        s.apply(&Command::SetDiskLow { node: 2, low }).unwrap();
        s.apply(&Command::SetDiskLow { node: 3, low }).unwrap();
        assert!(plan(&s, &HashMap::new(), Duration::from_secs(60), 0).is_empty());
        // Space returns: segments open on every node again.
        s.apply(&Command::SetDiskLow { node: 2, low: None }).unwrap();
        s.apply(&Command::SetDiskLow { node: 3, low: None }).unwrap();
        let cmds = plan(&s, &HashMap::new(), Duration::from_secs(60), 0);
        apply_all(&mut s, &cmds);
        assert!(s.segments.values().all(|seg| seg.replicas.len() == 3));
        // A node removed from the cluster leaves no disk record behind.
        s.apply(&Command::SetDiskLow { node: 2, low }).unwrap();
        s.apply(&Command::RemoveNode { id: 2 }).unwrap();
        assert!(s.disk_low.is_empty());
    }
}
