//! Types of the cluster state. Serialized into Raft snapshots, so field changes must
//! stay backward compatible (add fields with `#[serde(default)]`).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::error::RequestError;

pub type NodeId = u64;

/// Name of the namespace every new cluster has and that cannot be deleted.
pub const DEFAULT_NAMESPACE: &str = eventtermq_api::defaults::NAMESPACE;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub namespaces: BTreeMap<String, Namespace>,
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    /// Every segment of every topic, by id (ids grow with creation order), and by topic.
    #[serde(default)]
    pub segments: SegmentTable,
    /// The id the next opened segment gets.
    #[serde(default = "first_segment_id")]
    pub next_segment_id: SegmentId,
    /// Where each consumer group runs and how far it got, by namespace then group.
    #[serde(default)]
    pub groups: BTreeMap<String, BTreeMap<String, GroupRuntime>>,
    /// Answers of the newest identified writes (`Command::Once`), so that a write
    /// retried after its outcome was unknown answers as its first attempt did.
    #[serde(default)]
    pub applied_requests: AppliedRequests,
    /// Nodes whose data directory has less free space than their watermark, as each
    /// reported it when it crossed: they take no new segment data (placement leaves
    /// them out, their segments rotate away) until they report space again.
    #[serde(default)]
    pub disk_low: BTreeMap<NodeId, DiskLow>,
    /// Users of the client APIs, by name. While there is none, client access is open
    /// (see the README's Security section).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub users: BTreeMap<String, User>,
    /// Nodes being decommissioned (`DecommissionNode`): they take no new segment and
    /// no consumer group, their open segments rotate away, their closed copies are
    /// copied elsewhere and then dropped; [`ClusterState::drain_progress`] says what
    /// still depends on one. Left when the node is removed from the cluster.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub draining: BTreeSet<NodeId>,
}

impl SegmentRecord {
    /// Generation 1 of shard 0 of `namespace`/`topic`, open and empty, on node 1 alone.
    #[cfg(test)]
    pub(crate) fn open_for_test(namespace: &str, topic: &str) -> Self {
        SegmentRecord {
            namespace: namespace.into(),
            topic: topic.into(),
            shard: 0,
            generation: 1,
            state: SegmentState::Open,
            primary: 1,
            replicas: vec![1],
            done: Vec::new(),
            next_offset: 0,
            size_bytes: 0,
            checksum: 0,
            created_unix_ms: 0,
            closed_unix_ms: 0,
            min_insync: 1,
            rotate: false,
        }
    }
}

/// Every segment by id (read it as the map it derefs to), with the ids of each topic's
/// segments beside: a publish, a read or a group finds a topic's segments without
/// looking at every other topic's (a scan of 10,000 topics' segments per publish was
/// most of a publish's CPU at that scale). Serialized as the map alone; the index is
/// rebuilt when read back. A segment's namespace and topic never change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SegmentTable {
    by_id: BTreeMap<SegmentId, SegmentRecord>,
    by_topic: BTreeMap<(String, String), BTreeSet<SegmentId>>,
}

impl SegmentTable {
    pub fn insert(&mut self, id: SegmentId, record: SegmentRecord) {
        let key = (record.namespace.clone(), record.topic.clone());
        if let Some(old) = self.by_id.insert(id, record) {
            self.unindex(id, &old);
        }
        self.by_topic.entry(key).or_default().insert(id);
    }

    pub fn remove(&mut self, id: &SegmentId) -> Option<SegmentRecord> {
        let old = self.by_id.remove(id)?;
        self.unindex(*id, &old);
        Some(old)
    }

    /// Keeps the segments for which `keep` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&SegmentId, &SegmentRecord) -> bool) {
        let gone: Vec<SegmentId> = self.by_id.iter().filter(|(id, s)| !keep(id, s)).map(|(id, _)| *id).collect();
        for id in gone {
            self.remove(&id);
        }
    }

    /// The record of `id` to change (its namespace and topic stay as they are).
    pub fn get_mut(&mut self, id: &SegmentId) -> Option<&mut SegmentRecord> {
        self.by_id.get_mut(id)
    }

    /// The ids of a topic's segments, oldest first.
    pub fn of_topic<'a>(&'a self, namespace: &str, topic: &str) -> impl Iterator<Item = SegmentId> + 'a {
        // The key is owned, so looking it up allocates; a range over borrowed parts
        // would need a different key type for little gain next to a publish.
        self.by_topic.get(&(namespace.to_string(), topic.to_string())).into_iter().flatten().copied()
    }

    fn unindex(&mut self, id: SegmentId, record: &SegmentRecord) {
        let key = (record.namespace.clone(), record.topic.clone());
        if let Some(ids) = self.by_topic.get_mut(&key) {
            ids.remove(&id);
            if ids.is_empty() {
                self.by_topic.remove(&key);
            }
        }
    }
}

impl std::ops::Deref for SegmentTable {
    type Target = BTreeMap<SegmentId, SegmentRecord>;
    fn deref(&self) -> &Self::Target {
        &self.by_id
    }
}

impl<'a> IntoIterator for &'a SegmentTable {
    type Item = (&'a SegmentId, &'a SegmentRecord);
    type IntoIter = std::collections::btree_map::Iter<'a, SegmentId, SegmentRecord>;
    fn into_iter(self) -> Self::IntoIter {
        self.by_id.iter()
    }
}

impl FromIterator<(SegmentId, SegmentRecord)> for SegmentTable {
    fn from_iter<I: IntoIterator<Item = (SegmentId, SegmentRecord)>>(iter: I) -> Self {
        let mut table = SegmentTable::default();
        for (id, record) in iter {
            table.insert(id, record);
        }
        table
    }
}

impl Serialize for SegmentTable {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.by_id.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for SegmentTable {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(BTreeMap::<SegmentId, SegmentRecord>::deserialize(deserializer)?.into_iter().collect())
    }
}

/// A user of the client APIs (gRPC and AMQP).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// The password's argon2id hash as a PHC string (salt and parameters included),
    /// made on the node that took the request: the password itself is never in the
    /// state, the Raft log or a snapshot.
    pub password_hash: String,
    /// A cluster administrator: every permission on every namespace, and the
    /// namespaces and users themselves.
    #[serde(default)]
    pub admin: bool,
    /// What the user may do, by namespace; a namespace not listed: nothing.
    #[serde(default)]
    pub permissions: BTreeMap<String, Permissions>,
}

/// The hash stays out of debug output (logs, test failures).
impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User").field("admin", &self.admin).field("permissions", &self.permissions).finish()
    }
}

/// A user's permissions on one namespace, as RabbitMQ's: each a pattern the names a
/// request touches must match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Permissions {
    /// Create, update and delete topics and consumer groups.
    pub configure: Pattern,
    /// Publish to topics.
    pub write: Pattern,
    /// Subscribe to, ack, nack and purge consumer groups.
    pub read: Pattern,
}

/// Longest permission pattern, in bytes.
pub const PATTERN_LEN_MAX: usize = 1024;
/// Most memory one compiled permission pattern may take (the regex crate's size
/// limit), so that a pattern cannot make every node spend much memory.
pub const PATTERN_COMPILED_SIZE_MAX_BYTES: usize = 256 * 1024;

/// A permission pattern: a regular expression matched anywhere in a name (unanchored,
/// as RabbitMQ's: `^orders\.` for a prefix, `.*` for everything); the empty pattern
/// matches nothing. Kept compiled; compared and serialized as its text.
#[derive(Clone, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Pattern {
    source: String,
    /// `None`: the empty pattern.
    regex: Option<regex::Regex>,
}

impl Pattern {
    /// The pattern `source`, or why it is not one (naming `field`).
    pub fn parse(field: &str, source: &str) -> Result<Pattern, RequestError> {
        let invalid = |rule: String| {
            RequestError::new(crate::error::ErrorCode::InvalidPermission, format!("{field}: {source:?} {rule}"))
        };
        if source.len() > PATTERN_LEN_MAX {
            return Err(invalid(format!("is longer than {PATTERN_LEN_MAX} bytes")));
        }
        if source.is_empty() {
            return Ok(Pattern { source: String::new(), regex: None });
        }
        let regex = regex::RegexBuilder::new(source)
            .size_limit(PATTERN_COMPILED_SIZE_MAX_BYTES)
            .build()
            .map_err(|e| invalid(format!("is not a valid regular expression: {}", one_line(&e.to_string()))))?;
        Ok(Pattern { source: source.to_string(), regex: Some(regex) })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether `name` matches (somewhere in it; never for the empty pattern).
    pub fn matches(&self, name: &str) -> bool {
        self.regex.as_ref().is_some_and(|r| r.is_match(name))
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Eq for Pattern {}

impl std::fmt::Debug for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.source)
    }
}

impl TryFrom<String> for Pattern {
    type Error = RequestError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Pattern::parse("pattern", &s)
    }
}

impl From<Pattern> for String {
    fn from(p: Pattern) -> String {
        p.source
    }
}

/// Identity of one cluster-state write, picked (at random) by the node that first
/// proposes it and kept across that node's retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RequestId {
    pub node: NodeId,
    pub nonce: u64,
}

/// Identified writes remembered at most: the oldest is forgotten first. A write is
/// retried for at most `--request-timeout-ms` (10 s); this covers that at about 1,000
/// writes a second (the create-topic benchmark's rate), and keeps snapshots under
/// about 1 MB of it.
pub const APPLIED_REQUESTS_MAX: usize = 10_000;

/// The answers of identified writes, newest last, at most [`APPLIED_REQUESTS_MAX`].
/// Part of the state (and of snapshots), so every node answers a repeat the same way.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Vec<AppliedRequest>", into = "Vec<AppliedRequest>")]
pub struct AppliedRequests {
    order: VecDeque<RequestId>,
    answers: BTreeMap<RequestId, (u64, Result<(), RequestError>)>,
}

/// One remembered write: the log index it was applied at and its outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedRequest {
    pub id: RequestId,
    pub index: u64,
    pub result: Result<(), RequestError>,
}

impl AppliedRequests {
    /// How the write `id` was answered, if it is remembered.
    pub fn get(&self, id: &RequestId) -> Option<&(u64, Result<(), RequestError>)> {
        self.answers.get(id)
    }

    /// Remembers the answer of `id`, forgetting the oldest beyond the bound.
    pub fn record(&mut self, id: RequestId, index: u64, result: Result<(), RequestError>) {
        if self.answers.insert(id, (index, result)).is_none() {
            self.order.push_back(id);
        }
        while self.order.len() > APPLIED_REQUESTS_MAX {
            if let Some(old) = self.order.pop_front() {
                self.answers.remove(&old);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

impl From<Vec<AppliedRequest>> for AppliedRequests {
    fn from(all: Vec<AppliedRequest>) -> Self {
        let mut r = AppliedRequests::default();
        for a in all {
            r.record(a.id, a.index, a.result);
        }
        r
    }
}

impl From<AppliedRequests> for Vec<AppliedRequest> {
    fn from(mut r: AppliedRequests) -> Self {
        r.order
            .iter()
            .filter_map(|id| r.answers.remove(id).map(|(index, result)| AppliedRequest { id: *id, index, result }))
            .collect()
    }
}

/// What a node below its free-space watermark reported when it crossed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskLow {
    /// Free bytes on the filesystem of its data directory then.
    pub free_bytes: u64,
    /// Its watermark (`--disk-free-min-bytes`, or the percentage form).
    pub free_min_bytes: u64,
}

fn first_segment_id() -> SegmentId {
    1
}

pub type SegmentId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SegmentState {
    Open,
    Closed,
}

/// A segment of a topic as the cluster knows it. Open segments take writes on their
/// primary, which streams them to the other replicas; closed ones are immutable and
/// readable from any node in `done`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentRecord {
    pub namespace: String,
    pub topic: String,
    pub shard: u32,
    /// Counts the segments of this shard: a rotation or a fail-over opens the next one.
    pub generation: u32,
    pub state: SegmentState,
    pub primary: NodeId,
    /// The replica set, primary first.
    pub replicas: Vec<NodeId>,
    /// Closed segments: nodes holding a complete, sealed copy.
    pub done: Vec<NodeId>,
    /// Closed segments: number of records, bytes and crc32c of the records.
    pub next_offset: u64,
    pub size_bytes: u64,
    pub checksum: u32,
    pub created_unix_ms: i64,
    pub closed_unix_ms: i64,
    /// Distinct replicas that must have fsynced a record before a `REPLICATED` publish
    /// is confirmed, fixed when the segment is opened (see [`SegmentRecord::quorum`]).
    /// 0 in segments opened before the setting existed: a majority of `replicas`.
    #[serde(default)]
    pub min_insync: u32,
    /// Open segments: a rebalance asked its primary to close it (`RotateSegments`), so
    /// that its successor is placed on the least loaded nodes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rotate: bool,
}

impl SegmentRecord {
    pub fn is_open(&self) -> bool {
        self.state == SegmentState::Open
    }

    /// How many distinct replicas (the primary included) hold a record once it is
    /// confirmed: the segment's `min_insync`, and never less than a majority of the
    /// replica set, because a fail-over reads `replicas - quorum + 1` of them and that
    /// set must meet every confirming set.
    pub fn quorum(&self) -> usize {
        (self.min_insync as usize).max(self.replicas.len() / 2 + 1)
    }

    /// `node` holds a complete copy: the first one sets the segment's size and
    /// checksum (`SegmentDone` refuses a later copy that differs), and a node not in
    /// the replica set joins it.
    pub fn add_done(&mut self, node: NodeId, size_bytes: u64, checksum: u32) {
        if self.done.is_empty() {
            self.checksum = checksum;
            self.size_bytes = size_bytes;
        }
        if !self.done.contains(&node) {
            self.done.push(node);
        }
        if !self.replicas.contains(&node) {
            self.replicas.push(node);
        }
    }
}

/// One group's commit in a [`Command::CommitOffsetsBatch`](super::Command::CommitOffsetsBatch):
/// what `CommitOffsets` carries for one group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupOffsets {
    pub namespace: String,
    pub group: String,
    pub offsets: BTreeMap<SegmentId, u64>,
    /// Below which every record the group offered was handed out, per segment.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub handed_out: BTreeMap<SegmentId, u64>,
}

/// What still depends on a node ([`ClusterState::drain_progress`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DrainProgress {
    /// Open segments with the node in their replica set (they rotate away).
    pub open_segments: u64,
    /// Closed segments the node holds or should hold a copy of (copied elsewhere, then
    /// dropped from it).
    pub closed_segments: u64,
    /// Consumer groups placed on the node (they move to another node).
    pub consumer_groups: u64,
}

impl DrainProgress {
    /// Nothing depends on the node any more.
    pub fn drained(&self) -> bool {
        self.open_segments == 0 && self.closed_segments == 0 && self.consumer_groups == 0
    }
}

/// What a node carries: open segments it is primary of or another replica of, and
/// consumer groups placed on it ([`ClusterState::node_load`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeLoad {
    pub primaries: u64,
    pub replicas: u64,
    pub consumer_groups: u64,
}

/// Where a consumer group runs and the offsets it committed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRuntime {
    /// The node running the group; `None` until the leader assigns one.
    pub node: Option<NodeId>,
    /// Per segment: every record below this offset is acknowledged (or did not match).
    pub offsets: BTreeMap<SegmentId, u64>,
    /// Per segment: every record below this offset that the group took was handed to
    /// a subscriber at least once (as of the last commit). A group that resumes counts
    /// that as one delivery of the unacknowledged ones (`delivery_count` 2).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub handed_out: BTreeMap<SegmentId, u64>,
}

impl ClusterState {
    /// Segments of a topic, in creation order.
    pub fn topic_segments<'a>(
        &'a self,
        namespace: &'a str,
        topic: &'a str,
    ) -> impl Iterator<Item = (SegmentId, &'a SegmentRecord)> + 'a {
        self.segments.of_topic(namespace, topic).filter_map(|id| Some((id, self.segments.get(&id)?)))
    }

    pub fn group_runtime(&self, namespace: &str, group: &str) -> Option<&GroupRuntime> {
        self.groups.get(namespace)?.get(group)
    }

    pub fn node_alive(&self, id: NodeId) -> bool {
        self.nodes.get(&id).is_some_and(|n| n.state == NodeState::Alive)
    }

    /// DEAD, LEFT or no longer a member (SUSPECT is not gone yet).
    pub fn node_gone(&self, id: NodeId) -> bool {
        self.nodes.get(&id).is_none_or(|n| matches!(n.state, NodeState::Dead | NodeState::Left))
    }

    /// Nodes gossip sees ALIVE, by id.
    pub fn alive_nodes(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.nodes.iter().filter(|(_, n)| n.state == NodeState::Alive).map(|(id, _)| *id)
    }

    /// ALIVE nodes that may take new segment data: not below their disk watermark, not
    /// being decommissioned.
    pub fn data_nodes(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.alive_nodes().filter(|id| !self.disk_low.contains_key(id) && !self.draining.contains(id))
    }

    /// ALIVE nodes that may run consumer groups: not being decommissioned.
    pub fn group_nodes(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.alive_nodes().filter(|id| !self.draining.contains(id))
    }

    /// What node `id` carries now.
    pub fn node_load(&self, id: NodeId) -> NodeLoad {
        let mut l = NodeLoad::default();
        for s in self.segments.values().filter(|s| s.is_open()) {
            if s.primary == id {
                l.primaries += 1;
            } else if s.replicas.contains(&id) {
                l.replicas += 1;
            }
        }
        l.consumer_groups = self.groups.values().flat_map(|g| g.values()).filter(|g| g.node == Some(id)).count() as u64;
        l
    }

    /// What still depends on node `id`: the open segments whose replica set has it,
    /// the closed segments it is a replica of, the consumer groups placed on it.
    /// A decommissioned node with nothing left is drained.
    pub fn drain_progress(&self, id: NodeId) -> DrainProgress {
        let mut p = DrainProgress::default();
        for s in self.segments.values().filter(|s| s.replicas.contains(&id) || s.done.contains(&id)) {
            if s.is_open() {
                p.open_segments += 1;
            } else {
                p.closed_segments += 1;
            }
        }
        p.consumer_groups = self.groups.values().flat_map(|g| g.values()).filter(|g| g.node == Some(id)).count() as u64;
        p
    }

    /// Those of `nodes` below their disk watermark, for an error message: `node 7
    /// (3145728 bytes free, watermark 67108864 bytes), ...`.
    pub fn disk_low_text(&self, nodes: impl IntoIterator<Item = NodeId>) -> String {
        let text: Vec<String> = nodes
            .into_iter()
            .filter_map(|id| {
                let low = self.disk_low.get(&id)?;
                Some(format!("node {id} ({} bytes free, watermark {} bytes)", low.free_bytes, low.free_min_bytes))
            })
            .collect();
        text.join(", ")
    }

    /// Copies a new segment of `topic` needs before it may be opened: the topic's
    /// `min_insync_replicas`, capped by the number of nodes in the cluster (down ones
    /// included), so that a cluster smaller than the setting still works, and shows
    /// the topic as under-replicated.
    pub fn min_insync_for(&self, topic: &TopicSpec) -> u32 {
        topic.min_insync().min(self.nodes.len().max(1) as u32)
    }
}

impl ClusterState {
    /// State of a brand-new cluster: just the `default` namespace.
    pub fn new_cluster() -> Self {
        let mut s = Self::default();
        s.namespaces.insert(DEFAULT_NAMESPACE.to_string(), Namespace::default());
        s
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespace {
    pub topics: BTreeMap<String, TopicSpec>,
    pub consumer_groups: BTreeMap<String, ConsumerGroupSpec>,
}

#[derive(Debug, Clone, Default, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExchangeType {
    #[default]
    Fanout,
    Direct,
    Topic,
    Headers,
}

impl ExchangeType {
    pub const NAMES: &'static str = "fanout, direct, topic, headers";

    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeType::Fanout => "fanout",
            ExchangeType::Direct => "direct",
            ExchangeType::Topic => "topic",
            ExchangeType::Headers => "headers",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "fanout" => Some(ExchangeType::Fanout),
            "direct" => Some(ExchangeType::Direct),
            "topic" => Some(ExchangeType::Topic),
            "headers" => Some(ExchangeType::Headers),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicSpec {
    pub shards: u32,
    pub replication_factor: u32,
    /// 0 keeps closed segments forever.
    pub retention_ms: u64,
    pub default_exchange_type: ExchangeType,
    /// Rotation size of this topic's segments; 0 uses the node's `--segment-size-max-bytes`.
    #[serde(default)]
    pub segment_size_max_bytes: u64,
    /// Distinct nodes that must have fsynced a message before a replicated publish is
    /// confirmed, and the fewest nodes a segment of the topic is opened on (Kafka's
    /// `min.insync.replicas`). 0: a majority of `replication_factor`. Topics created
    /// through the API store the resolved value.
    #[serde(default)]
    pub min_insync_replicas: u32,
    /// Bytes of closed segments kept at most: beyond it the oldest go first. 0: no
    /// limit.
    #[serde(default)]
    pub retention_bytes_max: u64,
    /// An open segment with records is closed (and the next opened) once it is this
    /// old, so that a quiet topic's records expire; 0 uses the node's
    /// `--segment-age-max-ms`.
    #[serde(default)]
    pub segment_age_max_ms: u64,
    /// Retention deletes segments consumer groups have not acknowledged yet (as
    /// Kafka always does); off: a segment waits until every bound group passed it.
    #[serde(default)]
    pub retention_overrides_consumers: bool,
    /// What picks the shard of a publish without a producer id.
    #[serde(default)]
    pub shard_key: ShardKey,
}

/// What picks a publish's shard (one with a producer id always goes to the producer's
/// shard, where its duplicate window is).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShardKey {
    /// The routing key of the request's first message: one key, one shard, in order;
    /// requests without a routing key spread over the open shards.
    #[default]
    RoutingKey,
    /// Nothing: every request goes to any open shard, round-robin.
    None,
}

impl ShardKey {
    pub fn as_str(self) -> &'static str {
        match self {
            ShardKey::RoutingKey => "routing_key",
            ShardKey::None => "none",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "" | "routing_key" => Some(ShardKey::RoutingKey),
            "none" => Some(ShardKey::None),
            _ => None,
        }
    }
}

impl TopicSpec {
    /// `min_insync_replicas`, with 0 resolved to a majority of the replication factor.
    pub fn min_insync(&self) -> u32 {
        eventtermq_api::defaults::min_insync_replicas(self.replication_factor, self.min_insync_replicas)
    }

    /// The spec with its defaults resolved, as the cluster state keeps it: two specs
    /// that only differ in a default left unset are the same topic.
    pub fn resolved(&self) -> TopicSpec {
        TopicSpec { min_insync_replicas: self.min_insync(), ..self.clone() }
    }
}

/// Fields of a topic to change; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicUpdate {
    pub shards: Option<u32>,
    pub replication_factor: Option<u32>,
    pub retention_ms: Option<u64>,
    pub default_exchange_type: Option<ExchangeType>,
    /// Applies to segments opened after the change.
    #[serde(default)]
    pub min_insync_replicas: Option<u32>,
    #[serde(default)]
    pub retention_bytes_max: Option<u64>,
    #[serde(default)]
    pub segment_age_max_ms: Option<u64>,
    #[serde(default)]
    pub retention_overrides_consumers: Option<bool>,
    #[serde(default)]
    pub shard_key: Option<ShardKey>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HeadersMatch {
    All,
    Any,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindingSpec {
    pub topic: String,
    pub exchange_type: ExchangeType,
    /// direct: the key; topic: the pattern; otherwise empty.
    pub routing_key: String,
    pub headers: BTreeMap<String, String>,
    pub headers_match: HeadersMatch,
    /// Unix time in milliseconds before which this binding takes nothing: a binding
    /// added to a running group (AMQP `queue.bind`) takes what is published after it,
    /// as in RabbitMQ. 0 (the default, and every binding made with the group): no limit
    /// of its own.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub since_unix_ms: i64,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

impl BindingSpec {
    /// A binding that takes every message of `topic`.
    pub fn fanout(topic: impl Into<String>) -> Self {
        BindingSpec {
            topic: topic.into(),
            exchange_type: ExchangeType::Fanout,
            routing_key: String::new(),
            headers: BTreeMap::new(),
            headers_match: HeadersMatch::All,
            since_unix_ms: 0,
        }
    }

    /// Whether the two route the same messages (everything but `since_unix_ms`): a
    /// repeated `queue.bind` changes nothing, and `queue.unbind` removes the binding
    /// whenever it was made.
    pub fn same_route(&self, other: &BindingSpec) -> bool {
        self.topic == other.topic
            && self.exchange_type == other.exchange_type
            && self.routing_key == other.routing_key
            && self.headers == other.headers
            && self.headers_match == other.headers_match
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerGroupSpec {
    pub bindings: Vec<BindingSpec>,
    /// In-memory buffer of the group, in messages.
    pub size: u32,
    /// Unix time in milliseconds where a new group starts reading.
    pub since_unix_ms: i64,
    /// A message handed out and not acknowledged within this many milliseconds goes
    /// back to the group for redelivery; 0: the node's `--ack-timeout-ms`.
    #[serde(default)]
    pub ack_timeout_ms: u64,
    /// A message delivered this many times and not acknowledged is not delivered
    /// again: it goes to `dead_letter_topic`, or is dropped without one; 0: no limit.
    #[serde(default)]
    pub deliveries_max: u32,
    /// Topic of the group's namespace that takes its dead letters; empty: none.
    #[serde(default)]
    pub dead_letter_topic: String,
    /// A message waiting longer than this since it was stored is not delivered: it is
    /// dead-lettered (reason `expired`) or dropped; 0: messages do not expire.
    #[serde(default)]
    pub message_ttl_ms: u64,
    /// At most this many messages wait undelivered; the oldest beyond are
    /// dead-lettered (reason `maxlen`) or dropped; 0: no limit. At most `size`.
    #[serde(default)]
    pub ready_messages_max: u64,
    /// An AMQP exclusive queue: the node whose connection declared it, and that
    /// node's run. The queue goes with the connection; when the node is DEAD or LEFT
    /// the leader deletes it, and a node that restarted deletes those of its earlier
    /// runs (its connections are gone).
    #[serde(default)]
    pub exclusive_owner: Option<ExclusiveOwner>,
    /// Dead letters are published with this routing key (empty: the message's own).
    #[serde(default)]
    pub dead_letter_routing_key: String,
    /// At most this many bytes of message bodies wait undelivered (of the messages
    /// the group's buffer holds, at most `size`); the oldest beyond are
    /// dead-lettered (reason `maxlen`) or dropped; 0: no limit.
    #[serde(default)]
    pub ready_bytes_max: u64,
}

/// Who holds an exclusive queue: a node, in one run of its process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExclusiveOwner {
    pub node_id: NodeId,
    /// Random per start of the node's process.
    pub run_id: u64,
}

impl ConsumerGroupSpec {
    /// Everything but `since_unix_ms` is the same (a repeated create computes `since`
    /// anew, e.g. "-1h" from now).
    pub fn same_settings(&self, other: &ConsumerGroupSpec) -> bool {
        ConsumerGroupSpec { since_unix_ms: other.since_unix_ms, ..self.clone() } == *other
    }

    /// This spec with `update`'s settings and bindings: bindings routing the same as
    /// one it has keep theirs (and where they started); new ones start at `now_unix_ms`.
    pub fn updated(&self, update: &ConsumerGroupSpec, now_unix_ms: i64) -> ConsumerGroupSpec {
        let bindings = update
            .bindings
            .iter()
            .map(|b| match self.bindings.iter().find(|old| old.same_route(b)) {
                Some(old) => old.clone(),
                None => BindingSpec { since_unix_ms: now_unix_ms, ..b.clone() },
            })
            .collect();
        // The owner is not a setting: it stays with the queue.
        ConsumerGroupSpec {
            bindings,
            since_unix_ms: self.since_unix_ms,
            exclusive_owner: self.exclusive_owner,
            ..update.clone()
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum NodeState {
    Alive,
    Suspect,
    Dead,
    Left,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Alive => "ALIVE",
            NodeState::Suspect => "SUSPECT",
            NodeState::Dead => "DEAD",
            NodeState::Left => "LEFT",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// host:port of the node's gRPC/gossip port.
    pub address: String,
    pub state: NodeState,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every topic's ids, found by scanning the map: what the index must say.
    fn scanned(t: &SegmentTable, namespace: &str, topic: &str) -> Vec<SegmentId> {
        t.iter().filter(|(_, s)| s.namespace == namespace && s.topic == topic).map(|(id, _)| *id).collect()
    }

    #[test]
    fn the_topic_index_follows_inserts_removals_and_a_round_trip_through_json() {
        let names = [("a", "x"), ("a", "y"), ("b", "x")];
        let mut t = SegmentTable::default();
        // A fixed pseudo-random sequence of changes (ids reused, so replacing counts).
        let mut seed = 7u64;
        for step in 0..500u64 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let id = (seed >> 33) % 40;
            let (ns, topic) = names[((seed >> 20) % 3) as usize];
            match step % 4 {
                0 | 1 => t.insert(id, SegmentRecord::open_for_test(ns, topic)),
                2 => drop(t.remove(&id)),
                _ => t.retain(|i, s| *i != id || s.topic != topic),
            }
            for (ns, topic) in names {
                assert_eq!(t.of_topic(ns, topic).collect::<Vec<_>>(), scanned(&t, ns, topic), "step {step}");
            }
        }
        let json = serde_json::to_string(&t).unwrap();
        let plain: BTreeMap<SegmentId, SegmentRecord> = serde_json::from_str(&json).unwrap();
        assert_eq!(&plain, &*t, "serialized as the map alone");
        let back: SegmentTable = serde_json::from_str(&json).unwrap();
        assert_eq!(back, t, "the index is rebuilt when read back");
        assert_eq!(t.of_topic("c", "z").count(), 0);
    }
}
