//! Request errors with stable numeric codes.
//!
//! A [`RequestError`] is the client's problem (bad input, missing resource, wrong
//! state) or a retryable cluster condition (no leader). It never means the node is
//! broken: storage corruption and other fatal conditions are `StorageError`s inside
//! Raft and stop the node instead.
//!
//! The numeric codes are part of the wire contract: they travel in the
//! `eventter-error-code` gRPC metadata entry and never change meaning once released.

use serde::{Deserialize, Serialize};

/// Stable numeric error codes. Ranges: 1xxx invalid argument, 2xxx not found,
/// 3xxx already exists, 4xxx failed precondition, 5xxx unavailable, 9xxx internal.
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
    InvalidArgument = 1099,
    NamespaceNotFound = 2001,
    TopicNotFound = 2002,
    ConsumerGroupNotFound = 2003,
    SegmentNotFound = 2004,
    NamespaceAlreadyExists = 3001,
    TopicAlreadyExists = 3002,
    ConsumerGroupAlreadyExists = 3003,
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
    NoLeader = 5001,
    Timeout = 5002,
    /// No open segment or no node to take the request right now; retry.
    NotReady = 5003,
    /// Fewer nodes are up than a topic's `min_insync_replicas`: a publish is refused
    /// rather than confirmed on fewer copies. Retry once nodes are back.
    NotEnoughReplicas = 5004,
    Internal = 9001,
    /// This node's copy of a segment failed its checksum; it is not served. Read
    /// another copy.
    CorruptCopy = 9002,
}

impl ErrorCode {
    pub fn as_u32(self) -> u32 {
        self as u32
    }

    pub fn grpc_code(self) -> tonic::Code {
        match self.as_u32() / 1000 {
            1 => tonic::Code::InvalidArgument,
            2 => tonic::Code::NotFound,
            3 => tonic::Code::AlreadyExists,
            4 => tonic::Code::FailedPrecondition,
            5 => tonic::Code::Unavailable,
            _ => tonic::Code::Internal,
        }
    }
}

/// An error returned to the caller of an API request. Nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct RequestError {
    pub code: ErrorCode,
    pub message: String,
}

impl RequestError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }

    pub fn invalid(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::new(code, message)
    }
}

/// Metadata key carrying [`ErrorCode`] in gRPC responses.
pub const ERROR_CODE_METADATA: &str = "eventter-error-code";

impl From<RequestError> for tonic::Status {
    fn from(e: RequestError) -> Self {
        let mut status = tonic::Status::new(e.code.grpc_code(), e.message);
        if let Ok(v) = e.code.as_u32().to_string().parse() {
            status.metadata_mut().insert(ERROR_CODE_METADATA, v);
        }
        status
    }
}
