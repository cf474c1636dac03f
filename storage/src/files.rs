//! Positional access to a segment's files: a buffered forward cursor over the record
//! frames and binary searches in the index file.

use std::path::{Path, PathBuf};

use crate::codec::{
    decode_frame_header, decode_index_entry, Decoded, FrameHeader, IndexEntry, FILE_HEADER_LEN, FRAME_HEADER_LEN,
    INDEX_ENTRY_LEN,
};
use crate::fs::FsFile;
use crate::StorageError;

/// The open files of one segment.
pub(crate) struct Files {
    pub seg: Box<dyn FsFile>,
    pub seg_path: PathBuf,
    /// `None` when the index file could not be opened: lookups then scan from the start.
    pub idx: Option<Box<dyn FsFile>>,
    pub idx_path: PathBuf,
}

/// Reads the `i`-th index entry. A damaged entry is an error: indexes are checked (or
/// rebuilt) on open and only complete entries are counted, so this is disk damage.
pub(crate) fn read_index_entry(id: u64, files: &Files, i: u64) -> Result<IndexEntry, StorageError> {
    let Some(idx) = &files.idx else {
        return Err(corrupt(id, &files.idx_path, 0, "index file is not open".into()));
    };
    let position = FILE_HEADER_LEN as u64 + i * INDEX_ENTRY_LEN as u64;
    let mut buf = [0u8; INDEX_ENTRY_LEN];
    idx.read_exact_at(&mut buf, position).map_err(|e| StorageError::io(&files.idx_path, e))?;
    match decode_index_entry(&buf) {
        Ok(Decoded::Complete(entry, _)) => Ok(entry),
        Ok(Decoded::Incomplete { needed }) => {
            Err(corrupt(id, &files.idx_path, position, format!("index entry {i}: {needed} bytes short")))
        }
        Err(e) => Err(corrupt(id, &files.idx_path, position, format!("index entry {i}: {e}"))),
    }
}

/// The last of the first `count` index entries for which `below` holds (`below` must be
/// true for a prefix of the entries), or `None`.
pub(crate) fn index_floor(
    id: u64,
    files: &Files,
    count: u64,
    below: impl Fn(&IndexEntry) -> bool,
) -> Result<Option<IndexEntry>, StorageError> {
    match index_partition(id, files, count, below)? {
        0 => Ok(None),
        n => read_index_entry(id, files, n - 1).map(Some),
    }
}

/// The first of the first `count` index entries for which `below` does not hold.
pub(crate) fn index_ceil(
    id: u64,
    files: &Files,
    count: u64,
    below: impl Fn(&IndexEntry) -> bool,
) -> Result<Option<IndexEntry>, StorageError> {
    if files.idx.is_none() {
        return Ok(None);
    }
    match index_partition(id, files, count, below)? {
        n if n < count => read_index_entry(id, files, n).map(Some),
        _ => Ok(None),
    }
}

/// Number of the first `count` index entries for which `below` holds (0 without an
/// index file).
pub(crate) fn index_partition(
    id: u64,
    files: &Files,
    count: u64,
    below: impl Fn(&IndexEntry) -> bool,
) -> Result<u64, StorageError> {
    if files.idx.is_none() {
        return Ok(0);
    }
    let (mut lo, mut hi) = (0u64, count);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if below(&read_index_entry(id, files, mid)?) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}

pub(crate) fn corrupt(id: u64, path: &Path, position: u64, reason: String) -> StorageError {
    StorageError::Corrupt { id, path: path.to_path_buf(), position, reason }
}

/// A forward reader over `[pos, limit)` of a file, with a scratch buffer of about
/// `chunk` bytes (more only when [`Cursor::fill`] asks for a longer frame).
pub(crate) struct Cursor<'a> {
    file: &'a dyn FsFile,
    path: &'a Path,
    buf: Vec<u8>,
    /// File position of `buf[0]`.
    buf_pos: u64,
    /// Bytes of `buf` already consumed.
    start: usize,
    limit: u64,
    chunk: usize,
}

impl<'a> Cursor<'a> {
    pub fn new(file: &'a dyn FsFile, path: &'a Path, pos: u64, limit: u64, chunk: usize) -> Self {
        Cursor { file, path, buf: Vec::new(), buf_pos: pos, start: 0, limit, chunk: chunk.max(FRAME_HEADER_LEN) }
    }

    pub fn pos(&self) -> u64 {
        self.buf_pos + self.start as u64
    }

    pub fn remaining(&self) -> u64 {
        self.limit.saturating_sub(self.pos())
    }

    /// The buffered bytes at the cursor, at least `n` of them unless the limit comes
    /// first (then all bytes up to the limit).
    pub fn fill(&mut self, n: usize) -> Result<&[u8], StorageError> {
        if self.buf.len() - self.start < n {
            self.buf.drain(..self.start);
            self.buf_pos += self.start as u64;
            self.start = 0;
            let remaining = self.limit.saturating_sub(self.buf_pos);
            let want = n.max(self.chunk).min(usize::try_from(remaining).unwrap_or(usize::MAX));
            let have = self.buf.len();
            if want > have {
                self.buf.resize(want, 0);
                let at = self.buf_pos + have as u64;
                if let Err(e) = self.file.read_exact_at(&mut self.buf[have..], at) {
                    self.buf.truncate(have);
                    return Err(StorageError::io(self.path, e));
                }
            }
        }
        Ok(&self.buf[self.start..])
    }

    /// Moves the cursor `n` bytes forward (past the buffer if need be).
    pub fn consume(&mut self, n: u64) {
        let buffered = (self.buf.len() - self.start) as u64;
        if n <= buffered {
            self.start += n as usize;
        } else {
            self.buf_pos = self.pos() + n;
            self.buf.clear();
            self.start = 0;
        }
    }

    /// Appends the `n` bytes at the cursor to `out` (what is buffered is copied, the
    /// rest read straight into `out`) and moves past them.
    pub fn copy_out(&mut self, n: usize, out: &mut Vec<u8>) -> Result<(), StorageError> {
        let buffered = (self.buf.len() - self.start).min(n);
        out.extend_from_slice(&self.buf[self.start..self.start + buffered]);
        self.consume(buffered as u64);
        let rest = n - buffered;
        if rest > 0 {
            let at = self.pos();
            let old = out.len();
            out.resize(old + rest, 0);
            if let Err(e) = self.file.read_exact_at(&mut out[old..], at) {
                out.truncate(old);
                return Err(StorageError::io(self.path, e));
            }
            self.consume(rest as u64);
        }
        Ok(())
    }

    /// Decodes the frame header at the cursor (without moving), checking that it holds
    /// `expected_offset` and ends before the limit.
    pub fn frame_header(&mut self, id: u64, expected_offset: u64) -> Result<FrameHeader, StorageError> {
        let pos = self.pos();
        let path = self.path;
        let bytes = self.fill(FRAME_HEADER_LEN)?;
        let header = match decode_frame_header(bytes) {
            Ok(Decoded::Complete(h, _)) => h,
            Ok(Decoded::Incomplete { .. }) => {
                return Err(corrupt(id, path, pos, "record header runs past the end of the records".into()))
            }
            Err(e) => return Err(corrupt(id, path, pos, e.to_string())),
        };
        if header.offset != expected_offset {
            let reason = format!("record offset {} where {expected_offset} was expected", header.offset);
            return Err(corrupt(id, path, pos, reason));
        }
        if header.frame_len as u64 > self.remaining() {
            return Err(corrupt(id, path, pos, "record runs past the end of the records".into()));
        }
        Ok(header)
    }
}
