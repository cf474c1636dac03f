//! The Raft leader's data-path duties, one pass per tick:
//!
//! 1. every shard of every topic has an open segment; a new one gets its primary and
//!    replicas among ALIVE nodes, the least loaded first, so segments spread evenly;
//! 2. an open segment whose primary is DEAD or LEFT is failed over ([`fail_over`]);
//!    the next pass opens its successor;
//! 3. a closed segment's copy on a node DEAD for `rereplicate_after_ms` (or removed
//!    from the cluster) is replaced by a copy on a live node;
//! 4. retention: closed segments older than their topic's retention that every
//!    consumer group bound to the topic has passed are deleted;
//! 5. every consumer group runs on an ALIVE node; a group whose node is DEAD or LEFT
//!    moves to the least loaded live node.
//!
//! Each pass proposes at most a few commands and waits for them, so a slow quorum
//! slows the loop rather than piling up proposals.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventtermq_proto::internal::v1::{internal_client::InternalClient, SegmentStatusRequest, SegmentStatusResponse};
use tokio_util::sync::CancellationToken;

use super::{lock, now_unix_ms, Segments};
use crate::cluster_state::{ClusterState, Command, NodeId, NodeState, SegmentId};
use crate::error::{ErrorCode, RequestError};
use crate::membership::Membership;

/// How long the leader waits for a replica's answer during a fail-over.
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);

pub async fn run(segments: Segments, membership: Membership, interval: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let failing_over: Arc<Mutex<HashSet<SegmentId>>> = Arc::default();
    let mut metrics = segments.cluster().raft.metrics();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
            r = metrics.changed() => if r.is_err() { return },
        }
        let cluster = segments.cluster();
        if cluster.leader().map(|(id, _)| id) != Some(cluster.id) {
            continue;
        }
        let state = cluster.state.read().state.clone();
        let dead_since: HashMap<NodeId, Duration> = membership
            .watch()
            .borrow()
            .iter()
            .filter(|m| matches!(m.state, NodeState::Dead | NodeState::Left))
            .map(|m| (m.id, m.state_since.elapsed()))
            .collect();
        let rereplicate_after = Duration::from_millis(segments.settings().rereplicate_after_ms);
        for cmd in plan(&state, &dead_since, rereplicate_after, now_unix_ms()) {
            if let Command::OpenSegment { topic, shard, replicas, .. } = &cmd {
                tracing::info!(topic = %topic, shard, replicas = ?replicas, "opening a segment");
            }
            if let Err(e) = cluster.write(cmd).await {
                tracing::info!(error = %e, "placement change deferred");
                break;
            }
        }
        for (id, seg) in &state.segments {
            if seg.is_open() && state.node_gone(seg.primary) && lock(&failing_over).insert(*id) {
                let (segments, failing_over, id) = (segments.clone(), failing_over.clone(), *id);
                tokio::spawn(async move {
                    if let Err(e) = fail_over(&segments, id).await {
                        tracing::info!(segment_id = id, error = %e, "fail-over deferred");
                    }
                    lock(&failing_over).remove(&id);
                });
            }
        }
    }
}

/// The commands one pass proposes: a pure function of the state, how long nodes have
/// been gone (`dead_since`), and the clock.
fn plan(
    state: &ClusterState,
    dead_since: &HashMap<NodeId, Duration>,
    rereplicate_after: Duration,
    now_unix_ms: i64,
) -> Vec<Command> {
    let mut cmds = Vec::new();
    let alive: Vec<NodeId> =
        state.nodes.iter().filter(|(_, n)| n.state == NodeState::Alive).map(|(id, _)| *id).collect();
    if alive.is_empty() {
        return cmds;
    }
    // Load per node: open segments it is primary of count most, replicas less.
    let mut load: BTreeMap<NodeId, u64> = alive.iter().map(|n| (*n, 0)).collect();
    for s in state.segments.values().filter(|s| s.is_open()) {
        for (i, n) in s.replicas.iter().enumerate() {
            if let Some(l) = load.get_mut(n) {
                *l += if i == 0 { 3 } else { 1 };
            }
        }
    }
    let least_loaded = |load: &BTreeMap<NodeId, u64>, count: usize, exclude: &[NodeId]| -> Vec<NodeId> {
        let mut nodes: Vec<(u64, NodeId)> =
            load.iter().filter(|(n, _)| !exclude.contains(n)).map(|(n, l)| (*l, *n)).collect();
        nodes.sort();
        nodes.into_iter().take(count).map(|(_, n)| n).collect()
    };

    // 1. Open segments for shards that have none.
    for (ns_name, ns) in &state.namespaces {
        for (topic_name, topic) in &ns.topics {
            for shard in 0..topic.shards {
                let open = state.topic_segments(ns_name, topic_name).any(|(_, s)| s.shard == shard && s.is_open());
                if open {
                    continue;
                }
                let count = (topic.replication_factor as usize).min(alive.len());
                let replicas = least_loaded(&load, count, &[]);
                for (i, n) in replicas.iter().enumerate() {
                    *load.get_mut(n).expect("alive") += if i == 0 { 3 } else { 1 };
                }
                cmds.push(Command::OpenSegment {
                    namespace: ns_name.clone(),
                    topic: topic_name.clone(),
                    shard,
                    replicas,
                    now_unix_ms,
                });
            }
        }
    }

    // 3. Re-replication of closed segments.
    let lost = |n: &NodeId| !state.nodes.contains_key(n) || dead_since.get(n).is_some_and(|d| *d >= rereplicate_after);
    for (id, s) in state.segments.iter().filter(|(_, s)| !s.is_open()) {
        if !s.replicas.iter().any(lost) || s.done.iter().all(lost) {
            continue;
        }
        let mut replicas: Vec<NodeId> = s.replicas.iter().copied().filter(|n| !lost(n)).collect();
        let missing = s.replicas.len() - replicas.len();
        let extra = least_loaded(&load, missing, &s.replicas);
        if extra.is_empty() {
            continue; // no live node to take a copy; keep waiting for the old one
        }
        replicas.extend(extra);
        tracing::info!(segment_id = id, from = ?s.replicas, to = ?replicas, "re-replicating a closed segment");
        cmds.push(Command::SetSegmentReplicas { id: *id, replicas });
    }

    // 4. Retention.
    let mut expired = Vec::new();
    for (id, s) in state.segments.iter().filter(|(_, s)| !s.is_open()) {
        let Some(topic) = state.namespaces.get(&s.namespace).and_then(|ns| ns.topics.get(&s.topic)) else { continue };
        if topic.retention_ms == 0 || now_unix_ms - s.closed_unix_ms < topic.retention_ms as i64 {
            continue;
        }
        let ns = &state.namespaces[&s.namespace];
        let passed_by_all =
            ns.consumer_groups.iter().filter(|(_, g)| g.bindings.iter().any(|b| b.topic == s.topic)).all(
                |(name, _)| {
                    state
                        .group_runtime(&s.namespace, name)
                        .and_then(|g| g.offsets.get(id))
                        .is_some_and(|off| *off >= s.next_offset)
                },
            );
        if passed_by_all {
            expired.push(*id);
        }
    }
    if !expired.is_empty() {
        tracing::info!(segments = ?expired, "deleting segments past their topic's retention");
        cmds.push(Command::DeleteSegments { ids: expired });
    }

    // 5. Consumer groups on live nodes.
    let mut group_load: BTreeMap<NodeId, u64> = alive.iter().map(|n| (*n, 0)).collect();
    for groups in state.groups.values() {
        for g in groups.values() {
            if let Some(l) = g.node.and_then(|n| group_load.get_mut(&n)) {
                *l += 1;
            }
        }
    }
    for (ns, groups) in &state.groups {
        for (name, g) in groups {
            if g.node.is_some_and(|n| !state.node_gone(n)) {
                continue;
            }
            let Some((&node, _)) = group_load.iter().min_by_key(|(n, l)| (**l, **n)) else { continue };
            *group_load.get_mut(&node).expect("present") += 1;
            cmds.push(Command::AssignGroup { namespace: ns.clone(), group: name.clone(), node: Some(node) });
        }
    }
    cmds
}

/// Closes an open segment whose primary is gone (or restarted) at the longest log
/// among its replicas, without losing a confirmed record.
///
/// A record is confirmed once a majority of the replica set fsynced it. The fail-over
/// freezes (stops the appends of) and asks enough replicas to meet every majority:
/// `n - (n/2 + 1) + 1` of `n`. At least one of them has every confirmed record, so the
/// longest of their logs has them all; and once they are frozen, the old primary can
/// no longer gather a majority to confirm anything new.
pub async fn fail_over(segments: &Segments, id: SegmentId) -> Result<(), RequestError> {
    let seg = segments.cluster().state.read().state.segment(id)?.clone();
    if !seg.is_open() {
        return Ok(());
    }
    let n = seg.replicas.len();
    let needed = n - (n / 2 + 1) + 1;
    let me = segments.cluster().id;
    let asks = seg.replicas.iter().copied().map(|node| {
        let segments = segments.clone();
        async move {
            let r = if node == me {
                super::replica::status(&segments, id, true).await.map_err(|e| e.message)
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
        now_unix_ms: now_unix_ms(),
    };
    match segments.cluster().write(cmd).await {
        Ok(_) => Ok(()),
        Err(e) if e.code == ErrorCode::SegmentClosed => Ok(()),
        Err(e) => Err(e),
    }
}

async fn ask_status(segments: &Segments, node: NodeId, id: SegmentId) -> Result<SegmentStatusResponse, String> {
    let addr = segments.node_addr(node).ok_or("no address")?;
    let mut client = InternalClient::new(segments.network().channel(&addr));
    let mut req = tonic::Request::new(SegmentStatusRequest { segment_id: id, freeze: true });
    req.set_timeout(STATUS_TIMEOUT);
    client.segment_status(req).await.map(|r| r.into_inner()).map_err(|s| s.message().to_string())
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
        let spec = ConsumerGroupSpec { bindings: vec![binding], size: 10, since_unix_ms: 0 };
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
        assert_eq!(deletes(&s, 2 * HOUR_MS), 0, "the group has not read it yet");
        let offsets = std::collections::BTreeMap::from([(first, 10)]);
        s.apply(&Command::CommitOffsets { namespace: "default".into(), group: "g".into(), offsets }).unwrap();
        let cmds = plan(&s, &HashMap::new(), Duration::from_secs(60), 2 * HOUR_MS);
        assert!(cmds.contains(&Command::DeleteSegments { ids: vec![first] }), "{cmds:?}");
    }

    #[test]
    fn groups_move_off_dead_nodes_and_closed_copies_are_replaced() {
        let mut s = state_with_topic(0);
        let cmds = plan(&s, &HashMap::new(), Duration::from_secs(60), 0);
        apply_all(&mut s, &cmds);
        let spec = ConsumerGroupSpec { bindings: vec![], size: 10, since_unix_ms: 0 };
        s.apply(&Command::CreateConsumerGroup { namespace: "default".into(), name: "g".into(), spec }).unwrap();
        let cmds = plan(&s, &HashMap::new(), Duration::from_secs(60), 0);
        apply_all(&mut s, &cmds);
        let node = s.group_runtime("default", "g").unwrap().node.unwrap();
        let id = *s.segments.keys().next().unwrap();
        s.apply(&Command::CloseSegment {
            id,
            next_offset: 1,
            size_bytes: 1,
            checksum: 0,
            done: vec![],
            now_unix_ms: 0,
        })
        .unwrap();
        s.apply(&Command::SegmentDone { id, node: 1, size_bytes: 1, checksum: 7 }).unwrap();

        let record = NodeRecord { address: format!("n{node}:1"), state: NodeState::Dead };
        s.apply(&Command::SetNode { id: node, record }).unwrap();
        // A fourth node can take the dead one's copy.
        let record = NodeRecord { address: "n4:1".into(), state: NodeState::Alive };
        s.apply(&Command::SetNode { id: 4, record }).unwrap();
        let dead = HashMap::from([(node, Duration::from_secs(120))]);
        let cmds = plan(&s, &dead, Duration::from_secs(60), 0);
        let moved = cmds.iter().find_map(|c| match c {
            Command::AssignGroup { node, .. } => *node,
            _ => None,
        });
        assert!(moved.is_some_and(|n| n != node), "{cmds:?}");
        let replaced = cmds.iter().any(|c| {
            matches!(c, Command::SetSegmentReplicas { id: i, replicas }
                if *i == id && !replicas.contains(&node) && replicas.contains(&4) && replicas.len() == 3)
        });
        // Node 1 holds the only complete copy: nothing to copy from while it is dead.
        assert_eq!(replaced, node != 1, "{cmds:?}");
    }
}
