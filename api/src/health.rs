//! `grpc.health.v1` service names every node serves.

/// SERVING while the process runs and its Raft works (liveness); NOT_SERVING once Raft
/// stopped on a storage error, which only a restart mends.
pub const LIVENESS_SERVICE: &str = "";

/// SERVING only while the node knows a Raft leader (readiness): a node without one
/// cannot take writes.
pub const READINESS_SERVICE: &str = "eventter.v1.Admin";
