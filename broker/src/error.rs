//! Request errors with stable numeric codes.
//!
//! A [`RequestError`] is what a request gets back when it does not succeed: the
//! client's problem (bad input, missing resource, wrong state, 1xxx-4xxx: nothing was
//! changed), a cluster condition worth retrying (no leader, no segment open yet, too
//! few nodes, a peer unreachable, 5xxx), a resource that ran out (a disk below its
//! free-space watermark, 6xxx: nothing was written), an outcome the node cannot know
//! (`Timeout`: the request may still take effect), or a failure of this node's own disk or task
//! (9xxx). The Raft state machine's fatal conditions are `StorageError`s inside
//! openraft instead, and stop Raft on this node.
//!
//! The numeric codes are part of the wire contract: they travel in the
//! `eventter-error-code` gRPC metadata entry (set by `api/`, read by `peers/`) and
//! never change meaning once released.

use serde::{Deserialize, Serialize};

pub use eventtermq_api::error::{ErrorCode, ERROR_CODE_METADATA};

/// An error returned to the caller of a request; its code says whether anything may
/// have changed (see the module comment).
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

    /// Worth another attempt: the cluster may be able to do it in a moment.
    pub fn retryable(&self) -> bool {
        self.code.as_u32() / 1000 == 5
    }

    /// This error, from a request retried after an earlier attempt whose outcome is
    /// unknown (`earlier`): a refusal now (a delete that finds nothing, no leader) does
    /// not mean nothing changed, since the earlier attempt may have taken effect; so
    /// the caller hears `Timeout` with both reasons.
    pub fn after_unknown(self, earlier: Option<&RequestError>) -> RequestError {
        match earlier {
            Some(first) if !self.code.outcome_unknown() => RequestError::new(
                ErrorCode::Timeout,
                format!("{} (after an earlier attempt whose outcome is unknown: {})", self.message, first.message),
            ),
            _ => self,
        }
    }
}
