//! `grpc.health.v1` service names every node serves.

/// SERVING while the process runs (liveness).
pub const LIVENESS_SERVICE: &str = "";

/// SERVING only while the node knows a Raft leader (readiness): a node without one
/// cannot take writes.
pub const READINESS_SERVICE: &str = "eventter.v1.Admin";
