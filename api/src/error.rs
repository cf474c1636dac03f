//! Stable numeric error codes: part of the wire contract. They travel in the
//! `eventter-error-code` gRPC metadata entry of every error a broker answers and never
//! change meaning once released. Ranges: 1xxx invalid argument, 2xxx not found, 3xxx
//! already exists, 4xxx failed precondition (nothing was changed), 5xxx unavailable
//! (worth retrying; 5002 `Timeout` means the outcome is unknown), 6xxx resource
//! exhausted (gRPC `RESOURCE_EXHAUSTED`: nothing was written; retry once an operator
//! or retention freed the resource, not at once), 7xxx who may do it (gRPC
//! `UNAUTHENTICATED` / `PERMISSION_DENIED`: nothing was done), 9xxx internal.
//! [`ErrorCode::outcome_unknown`] says which codes leave a request's outcome unknown
//! (the CLI exits 3 on those, 1 on the others).

use serde::{Deserialize, Serialize};

/// Stable numeric error codes. Ranges: 1xxx invalid argument, 2xxx not found,
/// 3xxx already exists, 4xxx failed precondition, 5xxx unavailable, 6xxx resource
/// exhausted, 7xxx authentication and authorization, 9xxx internal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[repr(u32)]
pub enum ErrorCode {
    InvalidName = 1001,
    InvalidShards = 1002,
    InvalidReplicationFactor = 1003,
    InvalidRetention = 1004,
    InvalidExchangeType = 1005,
    InvalidBinding = 1006,
    InvalidSize = 1007,
    InvalidMinInsyncReplicas = 1008,
    /// A user's permission pattern is not a regular expression this broker takes.
    InvalidPermission = 1009,
    /// A password that is empty or too long.
    InvalidPassword = 1010,
    InvalidArgument = 1099,
    NamespaceNotFound = 2001,
    TopicNotFound = 2002,
    ConsumerGroupNotFound = 2003,
    SegmentNotFound = 2004,
    UserNotFound = 2005,
    /// The cluster state has no node with this id.
    NodeNotFound = 2006,
    NamespaceAlreadyExists = 3001,
    TopicAlreadyExists = 3002,
    ConsumerGroupAlreadyExists = 3003,
    UserAlreadyExists = 3004,
    DefaultNamespaceUndeletable = 4001,
    NamespaceNotEmpty = 4002,
    ImmutableField = 4003,
    ShardsDecrease = 4004,
    SegmentAlreadyOpen = 4005,
    SegmentClosed = 4006,
    SegmentOpen = 4007,
    /// This node is not (or no longer) the primary of the segment.
    NotPrimary = 4008,
    /// A delivery that is not in flight (already acked, or never delivered).
    NotInFlight = 4009,
    /// A copy of a closed segment differs from the copies recorded before it.
    ChecksumMismatch = 4010,
    /// A Raft message reached a node that is not the member it was for (another
    /// process answers at the member's address now).
    NotRaftTarget = 4011,
    /// A subscription asked to be a group's only subscriber while it has others, or
    /// came while the group has such an exclusive subscriber (`SubscribeRequest.exclusive`).
    ConsumerGroupInExclusiveUse = 4012,
    /// Decommissioning the node would leave fewer live nodes than some topic's
    /// replication factor (or none at all).
    NotEnoughNodesLeft = 4013,
    NoLeader = 5001,
    /// The request was sent on but no answer came in time: it may still take effect.
    Timeout = 5002,
    /// No open segment or no node to take the request right now; retry.
    NotReady = 5003,
    /// Fewer nodes are up than a topic's `min_insync_replicas`: a publish is refused
    /// rather than confirmed on fewer copies. Retry once nodes are back.
    NotEnoughReplicas = 5004,
    /// Another node the request needed could not be reached; nothing was done there.
    PeerUnreachable = 5005,
    /// A node that would store the data has less free disk space than its watermark
    /// (`--disk-free-min-bytes`): refused before any write could fail. Nothing was
    /// written.
    DiskFull = 6001,
    /// No credentials, or a user name and password the cluster does not know
    /// (gRPC `UNAUTHENTICATED`). Nothing was done.
    Unauthenticated = 7001,
    /// The user lacks the permission the request needs (gRPC `PERMISSION_DENIED`); the
    /// message names the user, the namespace and the permission. Nothing was done.
    PermissionDenied = 7002,
    Internal = 9001,
    /// This node's copy of a segment failed its checksum; it is not served. Read
    /// another copy.
    CorruptCopy = 9002,
}

impl ErrorCode {
    /// Every code, for decoding.
    const ALL: [ErrorCode; 44] = [
        ErrorCode::InvalidName,
        ErrorCode::InvalidShards,
        ErrorCode::InvalidReplicationFactor,
        ErrorCode::InvalidRetention,
        ErrorCode::InvalidExchangeType,
        ErrorCode::InvalidBinding,
        ErrorCode::InvalidSize,
        ErrorCode::InvalidMinInsyncReplicas,
        ErrorCode::InvalidPermission,
        ErrorCode::InvalidPassword,
        ErrorCode::InvalidArgument,
        ErrorCode::NamespaceNotFound,
        ErrorCode::TopicNotFound,
        ErrorCode::ConsumerGroupNotFound,
        ErrorCode::SegmentNotFound,
        ErrorCode::UserNotFound,
        ErrorCode::NodeNotFound,
        ErrorCode::NamespaceAlreadyExists,
        ErrorCode::TopicAlreadyExists,
        ErrorCode::ConsumerGroupAlreadyExists,
        ErrorCode::UserAlreadyExists,
        ErrorCode::DefaultNamespaceUndeletable,
        ErrorCode::NamespaceNotEmpty,
        ErrorCode::ImmutableField,
        ErrorCode::ShardsDecrease,
        ErrorCode::SegmentAlreadyOpen,
        ErrorCode::SegmentClosed,
        ErrorCode::SegmentOpen,
        ErrorCode::NotPrimary,
        ErrorCode::NotInFlight,
        ErrorCode::ChecksumMismatch,
        ErrorCode::NotRaftTarget,
        ErrorCode::ConsumerGroupInExclusiveUse,
        ErrorCode::NotEnoughNodesLeft,
        ErrorCode::NoLeader,
        ErrorCode::Timeout,
        ErrorCode::NotReady,
        ErrorCode::NotEnoughReplicas,
        ErrorCode::PeerUnreachable,
        ErrorCode::DiskFull,
        ErrorCode::Unauthenticated,
        ErrorCode::PermissionDenied,
        ErrorCode::Internal,
        ErrorCode::CorruptCopy,
    ];

    pub fn as_u32(self) -> u32 {
        self as u32
    }

    /// The code with this number, if it is one.
    pub fn from_u32(n: u32) -> Option<ErrorCode> {
        Self::ALL.iter().copied().find(|c| c.as_u32() == n)
    }

    /// Whether a request that failed with this code may still take effect: `Timeout`
    /// (sent on, no answer in time) and `Internal` (this node's disk or task failed
    /// part-way, e.g. records written whose fsync failed). Every other code means
    /// nothing was changed: 1xxx-4xxx are refusals, and the 5xxx retry codes are given
    /// before anything is done (`NoLeader`: nothing proposed; `NotReady`,
    /// `NotEnoughReplicas`: nothing written; `PeerUnreachable`: nothing reached the
    /// peer); `CorruptCopy` answers a read.
    pub fn outcome_unknown(self) -> bool {
        matches!(self, ErrorCode::Timeout | ErrorCode::Internal)
    }

    /// [`ErrorCode::outcome_unknown`] of a number, also one this version does not know
    /// (from a newer broker): by its range, where only 9xxx (the node's own failure)
    /// leaves the outcome unknown.
    pub fn number_outcome_unknown(number: u32) -> bool {
        match ErrorCode::from_u32(number) {
            Some(code) => code.outcome_unknown(),
            None => number / 1000 == 9,
        }
    }

    pub fn grpc_code(self) -> tonic::Code {
        match self.as_u32() / 1000 {
            1 => tonic::Code::InvalidArgument,
            2 => tonic::Code::NotFound,
            3 => tonic::Code::AlreadyExists,
            4 => tonic::Code::FailedPrecondition,
            5 => tonic::Code::Unavailable,
            6 => tonic::Code::ResourceExhausted,
            7 if self == ErrorCode::Unauthenticated => tonic::Code::Unauthenticated,
            7 => tonic::Code::PermissionDenied,
            _ => tonic::Code::Internal,
        }
    }
}

/// Metadata key carrying [`ErrorCode`] in gRPC responses.
pub const ERROR_CODE_METADATA: &str = "eventter-error-code";

/// Metadata key of a client request's id: every answer of the client API carries it
/// (an error also names it in its message, `[request id: ...]`), and every log line the
/// broker writes while handling the request has it as the `id` of its `request` span.
/// A client may send its own (1-64 characters of `[A-Za-z0-9._-]`); otherwise the node
/// that received the request makes one.
pub const REQUEST_ID_METADATA: &str = "eventter-request-id";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_proto_lists_every_code() {
        let proto = include_str!("../../proto/proto/eventter/v1/admin.proto");
        for code in ErrorCode::ALL {
            let entry = format!("{} {code:?}", code.as_u32());
            assert!(proto.contains(&entry), "admin.proto's error code table lacks {entry:?}");
        }
    }

    #[test]
    fn every_code_decodes_to_itself_and_nothing_else_does() {
        for c in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_u32(c.as_u32()), Some(c));
        }
        let distinct: std::collections::BTreeSet<u32> = ErrorCode::ALL.iter().map(|c| c.as_u32()).collect();
        assert_eq!(distinct.len(), ErrorCode::ALL.len());
        assert_eq!(ErrorCode::from_u32(0), None);
        assert_eq!(ErrorCode::from_u32(5999), None);
    }

    #[test]
    fn only_timeout_and_internal_failures_leave_the_outcome_unknown() {
        let unknown: Vec<ErrorCode> = ErrorCode::ALL.into_iter().filter(|c| c.outcome_unknown()).collect();
        assert_eq!(unknown, [ErrorCode::Timeout, ErrorCode::Internal]);
        assert!(ErrorCode::number_outcome_unknown(5002));
        assert!(!ErrorCode::number_outcome_unknown(5005));
        assert!(ErrorCode::number_outcome_unknown(9999));
        assert!(!ErrorCode::number_outcome_unknown(5999));
        assert!(!ErrorCode::number_outcome_unknown(6001), "a refused write wrote nothing");
        assert!(!ErrorCode::number_outcome_unknown(6999));
    }

    #[test]
    fn each_range_maps_to_its_grpc_code() {
        assert_eq!(ErrorCode::NotReady.grpc_code(), tonic::Code::Unavailable);
        assert_eq!(ErrorCode::DiskFull.grpc_code(), tonic::Code::ResourceExhausted);
        assert_eq!(ErrorCode::Internal.grpc_code(), tonic::Code::Internal);
    }
}
