use std::path::PathBuf;

use crate::codec::RECORD_PAYLOAD_MAX_BYTES;

/// Errors of the segment store.
///
/// `Io` and `Corrupt` are storage failures (a broken disk or file): the caller should
/// stop using the segment. The others are refusals of a request that changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("I/O error on {}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("segment {id} does not exist")]
    NotFound { id: u64 },
    #[error("segment {id} already exists")]
    AlreadyExists { id: u64 },
    #[error("segment {id} is sealed")]
    Sealed { id: u64 },
    #[error("segment {id} already has a live writer")]
    WriterBusy { id: u64 },
    #[error("segment {id}: offset {got} where {expected} was expected")]
    OffsetMismatch { id: u64, expected: u64, got: u64 },
    #[error("segment {id}: cannot truncate to offset {requested}, it ends at {next_offset}")]
    TruncatePastEnd { id: u64, next_offset: u64, requested: u64 },
    #[error("segment {id}: a payload of {size} bytes exceeds the maximum of {RECORD_PAYLOAD_MAX_BYTES}")]
    RecordTooLarge { id: u64, size: usize },
    #[error("segment {id} is corrupt at byte {position} of {}: {reason}", path.display())]
    Corrupt { id: u64, path: PathBuf, position: u64, reason: String },
}

impl StorageError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StorageError::Io { path: path.into(), source }
    }
}
