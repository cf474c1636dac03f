//! `raft::decode::<T>` of the internal gRPC payloads (JSON), as the server decodes
//! requests and the client decodes replies.
//!
//! Input: one byte selecting the type, then the payload:
//! 0 AppendEntriesRequest, 1 VoteRequest, 2 InstallSnapshotRequest, 3 Command (forwarded
//! write), 4-6 the Raft replies (`Result<_, RaftError>`), 7 the forwarded write reply.
//!
//! Asserts: never panics; a decoded payload re-encodes (`raft::encode`, which must not
//! panic) to bytes that decode again, and that encoding is a fixed point.
#![no_main]

use eventtermq_broker::cluster_state::raft::{decode, encode};
use eventtermq_broker::cluster_state::{Command, CommandResponse, NodeId, TypeConfig};
use eventtermq_broker::error::RequestError;
use libfuzzer_sys::fuzz_target;
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

fn check<T: Serialize + DeserializeOwned>(data: &[u8]) {
    let Ok(value) = decode::<T>(data) else { return };
    let bytes = encode(&value);
    let again: T = decode(&bytes).expect("a re-encoded payload decodes");
    assert_eq!(encode(&again), bytes, "re-encoding is not a fixed point");
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, payload)) = data.split_first() else { return };
    match kind % 8 {
        0 => check::<AppendEntriesRequest<TypeConfig>>(payload),
        1 => check::<VoteRequest<NodeId>>(payload),
        2 => check::<InstallSnapshotRequest<TypeConfig>>(payload),
        3 => check::<Command>(payload),
        4 => check::<Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>>(payload),
        5 => check::<Result<VoteResponse<NodeId>, RaftError<NodeId>>>(payload),
        6 => check::<Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>>(payload),
        _ => check::<Result<CommandResponse, RequestError>>(payload),
    }
});
