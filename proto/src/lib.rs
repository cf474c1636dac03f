//! Generated protobuf/gRPC code of EventterMQ.
//!
//! - [`v1`]: the client/admin API (`eventter.v1`), the one users and the operator call.
//! - [`internal::v1`]: node-to-node calls (Raft, gossip full-state sync, forwarding).
#![allow(clippy::all, missing_docs)]

pub mod codec;

pub mod v1 {
    tonic::include_proto!("eventter.v1");
}

pub mod internal {
    pub mod v1 {
        tonic::include_proto!("eventter.internal.v1");
    }
}

/// Encoded `FileDescriptorSet` of every service, node-to-node included.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/eventter_descriptor.bin"));

/// Encoded `FileDescriptorSet` of the services clients call (no `eventter.internal.v1`),
/// for gRPC server reflection: a client is not shown what only cluster members may call.
pub const CLIENT_FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/eventter_client_descriptor.bin"));
