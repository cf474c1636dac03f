//! Conversions between the wire types (`eventter.v1`) and the cluster-state model.

use eventtermq_proto::v1 as pb;

use crate::cluster_state::*;

pub fn duration_to_ms(d: &Option<prost_types::Duration>) -> Result<u64, crate::error::RequestError> {
    match d {
        None => Ok(0),
        Some(d) if d.seconds < 0 || d.nanos < 0 => Err(crate::error::RequestError::new(
            crate::error::ErrorCode::InvalidRetention,
            "retention: must not be negative (0 keeps messages forever)",
        )),
        Some(d) => Ok(d.seconds as u64 * 1000 + d.nanos as u64 / 1_000_000),
    }
}

pub fn ms_to_duration(ms: u64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds: (ms / 1000) as i64, nanos: ((ms % 1000) * 1_000_000) as i32 })
}

pub fn timestamp_to_ms(t: &prost_types::Timestamp) -> i64 {
    t.seconds * 1000 + i64::from(t.nanos) / 1_000_000
}

pub fn ms_to_timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: ms.div_euclid(1000), nanos: (ms.rem_euclid(1000) * 1_000_000) as i32 }
}

pub fn topic_to_pb(name: &str, t: &TopicSpec) -> pb::Topic {
    pb::Topic {
        name: name.to_string(),
        shards: t.shards,
        replication_factor: t.replication_factor,
        retention: ms_to_duration(t.retention_ms),
        default_exchange_type: t.default_exchange_type.as_str().to_string(),
        under_replicated: false,
        segment_size_max_bytes: t.segment_size_max_bytes,
        min_insync_replicas: t.min_insync(),
        retention_bytes_max: t.retention_bytes_max,
        segment_age_max_ms: t.segment_age_max_ms,
        retention_overrides_consumers: t.retention_overrides_consumers,
        shard_key: t.shard_key.as_str().to_string(),
        retained_bytes: 0,
        retained_since: None,
    }
}

/// The size of a segment's copy on this node, if it holds one.
pub type LocalSize<'a> = &'a dyn Fn(SegmentId) -> Option<u64>;

/// What a topic's segments add up to: whether an open one is short of copies, the
/// bytes kept, and when the oldest was opened.
#[derive(Default)]
struct Kept {
    short: bool,
    bytes: u64,
    oldest_unix_ms: Option<i64>,
}

/// The topics `topics` of namespace `ns_name`, each flagged when its replication
/// factor is above the number of ALIVE nodes or one of its open segments has fewer
/// replicas, with what it keeps (open segments' sizes from `local_size`). One pass
/// over the segments for all of them, not one per topic: a dump of 10,000 topics
/// stays linear.
pub fn topics_to_pb<'a>(
    state: &ClusterState,
    ns_name: &str,
    topics: impl IntoIterator<Item = (&'a String, &'a TopicSpec)>,
    local_size: LocalSize,
) -> Vec<pb::Topic> {
    let alive = state.alive_nodes().count();
    let topics: Vec<(&String, &TopicSpec)> = topics.into_iter().collect();
    let mut kept: std::collections::HashMap<&str, (usize, Kept)> =
        topics.iter().map(|(n, t)| (n.as_str(), (t.replication_factor as usize, Kept::default()))).collect();
    for (id, s) in state.segments.iter().filter(|(_, s)| s.namespace == ns_name) {
        let Some((rf, k)) = kept.get_mut(s.topic.as_str()) else { continue };
        k.short |= s.is_open() && s.replicas.len() < *rf;
        k.bytes += if s.is_open() { local_size(*id).unwrap_or(0) } else { s.size_bytes };
        k.oldest_unix_ms = Some(k.oldest_unix_ms.map_or(s.created_unix_ms, |o| o.min(s.created_unix_ms)));
    }
    topics
        .into_iter()
        .map(|(n, t)| {
            let (_, k) = kept.remove(n.as_str()).unwrap_or_default();
            pb::Topic {
                under_replicated: t.replication_factor as usize > alive || k.short,
                retained_bytes: k.bytes,
                retained_since: k.oldest_unix_ms.map(ms_to_timestamp),
                ..topic_to_pb(n, t)
            }
        })
        .collect()
}

/// One page of a listing by name: the entries of `map` whose names start with
/// `prefix`, after `page_token` (the last name of the previous page), at most
/// `page_size` of them (0: all), and the token of the next page (empty: none).
pub fn page<'a, V>(
    map: &'a std::collections::BTreeMap<String, V>,
    prefix: &str,
    page_size: u32,
    page_token: &str,
) -> (Vec<(&'a String, &'a V)>, String) {
    use std::ops::Bound;
    let start = if !page_token.is_empty() && page_token >= prefix {
        Bound::Excluded(page_token)
    } else {
        Bound::Included(prefix)
    };
    let mut names = map.range::<str, _>((start, Bound::Unbounded)).take_while(|(n, _)| n.starts_with(prefix));
    let limit = if page_size == 0 { usize::MAX } else { page_size as usize };
    let items: Vec<(&String, &V)> = names.by_ref().take(limit).collect();
    let next = match (names.next(), items.last()) {
        (Some(_), Some((last, _))) => (*last).clone(),
        _ => String::new(),
    };
    (items, next)
}

/// What a `Dump` shows: one namespace (empty: all), and in it only topics, groups
/// and segments whose topic or group name starts with `prefix`.
#[derive(Debug, Default)]
pub struct DumpFilter<'a> {
    pub namespace: &'a str,
    pub prefix: &'a str,
}

pub fn consumer_group_to_pb(name: &str, g: &ConsumerGroupSpec) -> pb::ConsumerGroup {
    pb::ConsumerGroup {
        name: name.to_string(),
        bindings: g
            .bindings
            .iter()
            .map(|b| pb::Binding {
                topic: b.topic.clone(),
                exchange_type: b.exchange_type.as_str().to_string(),
                routing_key: b.routing_key.clone(),
                headers: b.headers.clone().into_iter().collect(),
                headers_match: match b.headers_match {
                    HeadersMatch::All => "all".to_string(),
                    HeadersMatch::Any => "any".to_string(),
                },
            })
            .collect(),
        size: g.size,
        since: (g.since_unix_ms != 0).then(|| ms_to_timestamp(g.since_unix_ms)),
        ack_timeout_ms: g.ack_timeout_ms,
        deliveries_max: g.deliveries_max,
        dead_letter_topic: g.dead_letter_topic.clone(),
        message_ttl_ms: g.message_ttl_ms,
        ready_messages_max: g.ready_messages_max,
        exclusive_node_id: g.exclusive_owner.map_or(0, |o| o.node_id),
        dead_letter_routing_key: g.dead_letter_routing_key.clone(),
        node_id: 0,
        committed_offsets: Default::default(),
    }
}

/// A group with where it runs and what it committed.
pub fn consumer_group_runtime_to_pb(
    state: &ClusterState,
    namespace: &str,
    name: &str,
    g: &ConsumerGroupSpec,
) -> pb::ConsumerGroup {
    let rt = state.group_runtime(namespace, name);
    pb::ConsumerGroup {
        node_id: rt.and_then(|r| r.node).unwrap_or(0),
        committed_offsets: rt.map(|r| r.offsets.iter().map(|(k, v)| (*k, *v)).collect()).unwrap_or_default(),
        ..consumer_group_to_pb(name, g)
    }
}

pub fn segment_to_pb(id: SegmentId, s: &SegmentRecord) -> pb::Segment {
    pb::Segment {
        id,
        namespace: s.namespace.clone(),
        topic: s.topic.clone(),
        shard: s.shard,
        generation: s.generation,
        open: s.is_open(),
        primary_node_id: s.primary,
        replica_node_ids: s.replicas.clone(),
        done_node_ids: s.done.clone(),
        next_offset: s.next_offset,
        size_bytes: s.size_bytes,
        checksum: s.checksum,
        created_at: Some(ms_to_timestamp(s.created_unix_ms)),
        closed_at: (s.closed_unix_ms != 0).then(|| ms_to_timestamp(s.closed_unix_ms)),
    }
}

pub fn node_state_to_pb(s: NodeState) -> pb::NodeState {
    match s {
        NodeState::Alive => pb::NodeState::Alive,
        NodeState::Suspect => pb::NodeState::Suspect,
        NodeState::Dead => pb::NodeState::Dead,
        NodeState::Left => pb::NodeState::Left,
    }
}

/// The whole cluster state as the API returns it.
pub fn state_to_pb(applied: &AppliedState, filter: &DumpFilter, local_size: LocalSize) -> pb::ClusterState {
    let shown_ns = |ns: &str| filter.namespace.is_empty() || filter.namespace == ns;
    let membership = applied.membership.membership();
    let role = |id: &u64| {
        if membership.voter_ids().any(|v| v == *id) {
            "voter"
        } else if membership.learner_ids().any(|l| l == *id) {
            "learner"
        } else {
            ""
        }
    };
    pb::ClusterState {
        segments: applied
            .state
            .segments
            .iter()
            .filter(|(_, s)| shown_ns(&s.namespace) && s.topic.starts_with(filter.prefix))
            .map(|(id, s)| segment_to_pb(*id, s))
            .collect(),
        index: applied.last_applied.map(|l| l.index).unwrap_or(0),
        namespaces: applied
            .state
            .namespaces
            .iter()
            .filter(|(name, _)| shown_ns(name))
            .map(|(name, ns)| pb::Namespace {
                name: name.clone(),
                topics: topics_to_pb(&applied.state, name, page(&ns.topics, filter.prefix, 0, "").0, local_size),
                consumer_groups: page(&ns.consumer_groups, filter.prefix, 0, "")
                    .0
                    .into_iter()
                    .map(|(n, g)| consumer_group_runtime_to_pb(&applied.state, name, n, g))
                    .collect(),
            })
            .collect(),
        nodes: applied
            .state
            .nodes
            .iter()
            .map(|(id, n)| {
                let low = applied.state.disk_low.get(id);
                pb::Node {
                    id: *id,
                    address: n.address.clone(),
                    state: node_state_to_pb(n.state) as i32,
                    raft_role: role(id).to_string(),
                    disk_low: low.is_some(),
                    disk_free_bytes: low.map_or(0, |l| l.free_bytes),
                    disk_free_min_bytes: low.map_or(0, |l| l.free_min_bytes),
                }
            })
            .collect(),
    }
}
