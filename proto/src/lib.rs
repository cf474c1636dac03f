//! Generated protobuf/gRPC code of EventterMQ.
//!
//! - [`v1`]: the client/admin API (`eventter.v1`), the one users and the operator call.
//! - [`internal::v1`]: node-to-node calls (Raft, gossip full-state sync, forwarding).
#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("eventter.v1");
}

pub mod internal {
    pub mod v1 {
        tonic::include_proto!("eventter.internal.v1");
    }
}

/// Encoded `FileDescriptorSet` of every service, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/eventter_descriptor.bin"));
