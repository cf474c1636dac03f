//! openraft wiring: the type configuration and the encoding of Raft messages between
//! nodes (the network that carries them is [`crate::peers::raft`]).

use std::io::Cursor;

use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::commands::{Command, CommandResponse};
use super::model::NodeId;

openraft::declare_raft_types!(
    /// Raft types of the cluster state. `BasicNode::addr` is the node's advertised
    /// `host:port`.
    pub TypeConfig:
        D = Command,
        R = CommandResponse,
        NodeId = NodeId,
        Node = BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type StorageError = openraft::StorageError<NodeId>;

/// Encoding of Raft messages on the internal gRPC service. JSON: the control plane is
/// small and low-rate, and readable payloads make debugging easy.
pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("raft types always serialize")
}

pub fn decode<T: DeserializeOwned>(data: &[u8]) -> Result<T, serde_json::Error> {
    serde_json::from_slice(data)
}
