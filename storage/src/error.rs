use std::path::PathBuf;

use crate::codec::RECORD_PAYLOAD_MAX_BYTES;
use crate::durable::FileError;

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
    /// A segment file whose intact header names a newer format than this binary reads:
    /// written by a newer release, not damaged. The store does not open rather than set
    /// it aside (which would lose its data on a downgrade).
    #[error(
        "{} is a segment file of format version {version}, newer than this binary reads (up to {supported})",
        path.display()
    )]
    NewerFormat { id: u64, path: PathBuf, version: u16, supported: u16 },
}

impl StorageError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StorageError::Io { path: path.into(), source }
    }

    /// The durable-file helpers the store uses only fail with IO errors on a named file;
    /// anything else is reported as one too, so it is never mistaken for a refusal. (A
    /// function, not a `From`: a second `From` impl would break `?` inference in callers.)
    pub(crate) fn from_file(e: FileError) -> Self {
        match e {
            FileError::Io { path, source } => StorageError::Io { path, source },
            other => StorageError::Io { path: other.path().to_path_buf(), source: std::io::Error::other(other) },
        }
    }
}
