//! Types of the cluster state. Serialized into Raft snapshots, so field changes must
//! stay backward compatible (add fields with `#[serde(default)]`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub type NodeId = u64;

/// Name of the namespace every new cluster has and that cannot be deleted.
pub const DEFAULT_NAMESPACE: &str = "default";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub namespaces: BTreeMap<String, Namespace>,
    pub nodes: BTreeMap<NodeId, NodeRecord>,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExchangeType {
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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicSpec {
    pub shards: u32,
    pub replication_factor: u32,
    /// 0 keeps closed segments forever.
    pub retention_ms: u64,
    pub default_exchange_type: ExchangeType,
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
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerGroupSpec {
    pub bindings: Vec<BindingSpec>,
    /// In-memory buffer of the group, in messages.
    pub size: u32,
    /// Unix time in milliseconds where a new group starts reading.
    pub since_unix_ms: i64,
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
