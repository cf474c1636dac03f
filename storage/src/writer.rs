//! Appending to, syncing, truncating and sealing a segment.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;

use crate::codec::{
    encode_frame, encode_index_entry, encode_trailer, IndexEntry, SealTrailer, FILE_HEADER_LEN, FRAME_HEADER_LEN,
    INDEX_ENTRY_LEN, RECORD_PAYLOAD_MAX_BYTES,
};
use crate::files::{index_partition, read_index_entry, Cursor, Files};
use crate::segment::Segment;
use crate::{Config, Record, SegmentInfo, StorageError};

/// A writer keeps its frame buffer between appends (one allocation serves every batch
/// of a similar size) unless a batch made it larger than this.
const WRITE_BUFFER_RETAIN_MAX_BYTES: usize = 1 << 20;
/// The smallest step by which a writer reserves space ahead of its records (see
/// [`SegmentWriter::reserve`]).
const PREALLOCATE_MIN_BYTES: u64 = 64 << 10;
/// Read chunk when re-reading records (truncation).
const REREAD_CHUNK_BYTES: usize = 64 << 10;

/// The only writer of an unsealed segment (see [`crate::Store::create`] and
/// [`crate::Store::writer`]). Dropping it lets a new one be made.
pub struct SegmentWriter {
    seg: Arc<Segment>,
    index_interval_bytes: u64,
    /// See [`crate::Config::preallocate_bytes`]; set to 0 if the filesystem refuses.
    preallocate_bytes: u64,
    /// Length of the segment file: `len` plus the space reserved after the records.
    file_len: u64,
    /// Frames of the batch being appended (reused).
    buf: Vec<u8>,
    /// Index entries of the batch being appended (reused).
    idx_buf: Vec<u8>,
    len: u64,
    next_offset: u64,
    checksum: u32,
    idx_count: u64,
    last_index_pos: u64,
    /// An index write failed: no more entries are written (lookups scan further; the
    /// index is rebuilt on the next open).
    index_broken: bool,
}

impl std::fmt::Debug for SegmentWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SegmentWriter")
            .field("id", &self.seg.id)
            .field("next_offset", &self.next_offset)
            .field("size_bytes", &self.len)
            .finish()
    }
}

impl SegmentWriter {
    /// `seg` must be unsealed, with `writer_live` just set by the caller.
    pub(crate) fn new(seg: Arc<Segment>, files: Arc<Files>, config: &Config) -> Self {
        let s = seg.snapshot();
        let file_len = files.seg.len_bytes().map_or(s.len, |len| len).max(s.len);
        SegmentWriter {
            seg,
            index_interval_bytes: u64::from(config.index_interval_bytes),
            preallocate_bytes: config.preallocate_bytes,
            file_len,
            buf: Vec::new(),
            idx_buf: Vec::new(),
            len: s.len,
            next_offset: s.next_offset,
            checksum: s.checksum,
            idx_count: s.idx_count,
            last_index_pos: s.last_index_pos,
            index_broken: false,
        }
    }

    pub fn id(&self) -> u64 {
        self.seg.id
    }

    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }

    /// Bytes of the segment file (header and records).
    pub fn size_bytes(&self) -> u64 {
        self.len
    }

    /// Frames all payloads (offsets `next_offset..`, all with `timestamp_ms`) into one
    /// buffer and writes it with one write call. Not durable until a sync. Returns the
    /// offsets given to the payloads.
    pub fn append(&mut self, timestamp_ms: i64, payloads: &[Bytes]) -> Result<Range<u64>, StorageError> {
        self.check_live()?;
        let first = self.next_offset;
        if let Some(p) = payloads.iter().find(|p| p.len() > RECORD_PAYLOAD_MAX_BYTES) {
            return Err(StorageError::RecordTooLarge { id: self.seg.id, size: p.len() });
        }
        let frames_len = payloads.iter().map(|p| FRAME_HEADER_LEN + p.len()).sum();
        self.write_batch(frames_len, payloads.iter().map(|p| (timestamp_ms, &p[..])))?;
        Ok(first..self.next_offset)
    }

    /// Appends records copied from a primary, keeping their offsets and timestamps:
    /// `records[0].offset` must be `next_offset` and the offsets consecutive.
    pub fn append_records(&mut self, records: &[Record]) -> Result<(), StorageError> {
        self.check_live()?;
        for (expected, r) in (self.next_offset..).zip(records) {
            if r.offset != expected {
                return Err(StorageError::OffsetMismatch { id: self.seg.id, expected, got: r.offset });
            }
            if r.payload.len() > RECORD_PAYLOAD_MAX_BYTES {
                return Err(StorageError::RecordTooLarge { id: self.seg.id, size: r.payload.len() });
            }
        }
        let frames_len = records.iter().map(|r| FRAME_HEADER_LEN + r.payload.len()).sum();
        self.write_batch(frames_len, records.iter().map(|r| (r.timestamp_ms, &r.payload[..])))
    }

    /// Frames `records` (timestamp, payload; offsets from `next_offset`) and their index
    /// entries, writes both, then publishes the new end to readers.
    fn write_batch<'a>(
        &mut self,
        frames_len: usize,
        records: impl Iterator<Item = (i64, &'a [u8])>,
    ) -> Result<(), StorageError> {
        if frames_len == 0 {
            return Ok(());
        }
        self.buf.clear();
        self.buf.reserve(frames_len);
        self.idx_buf.clear();
        let mut offset = self.next_offset;
        let mut last_index_pos = self.last_index_pos;
        let mut new_entries = 0u64;
        for (timestamp_ms, payload) in records {
            let position = self.len + self.buf.len() as u64;
            if position - last_index_pos >= self.index_interval_bytes {
                encode_index_entry(&mut self.idx_buf, &IndexEntry { offset, position, timestamp_ms });
                last_index_pos = position;
                new_entries += 1;
            }
            encode_frame(&mut self.buf, offset, timestamp_ms, payload);
            offset += 1;
        }

        let end = self.len + self.buf.len() as u64;
        // The segment's open files, opened again if they were closed as idle.
        let files = self.seg.files_rw()?;
        if end > self.file_len {
            self.reserve(&files, end);
        }
        if let Err(e) = files.seg.write_all_at(&self.buf, self.len) {
            // Best effort: leave no partial frame behind the records (the next append
            // overwrites it anyway; recovery would cut it).
            let _ = files.seg.set_len(self.len);
            self.file_len = self.len;
            return Err(StorageError::io(&files.seg_path, e));
        }
        self.file_len = self.file_len.max(end);
        if new_entries > 0 && !self.index_broken {
            self.write_index_entries(&files, new_entries);
        }
        self.checksum = crc32c::crc32c_append(self.checksum, &self.buf);
        self.len += self.buf.len() as u64;
        self.next_offset = offset;
        self.last_index_pos = last_index_pos;
        self.publish();
        if self.buf.capacity() > WRITE_BUFFER_RETAIN_MAX_BYTES {
            self.buf = Vec::new();
        }
        Ok(())
    }

    /// Grows the file past `end` by whole steps, with blocks allocated, so the appends
    /// up to there change no file size. A step is about as large as the file already
    /// is (at least [`PREALLOCATE_MIN_BYTES`], at most `preallocate_bytes`): a busy
    /// segment soon reserves whole `preallocate_bytes`, while each of 10,000 quiet
    /// topics' open segments holds 64 KiB of unused disk, not 1 MiB. Without it (or if
    /// the filesystem refuses) the write itself grows the file.
    fn reserve(&mut self, files: &Files, end: u64) {
        if self.preallocate_bytes == 0 {
            return;
        }
        let step = end.next_power_of_two().max(PREALLOCATE_MIN_BYTES).min(self.preallocate_bytes);
        let target = (end / step + 1) * step;
        match files.seg.allocate(self.file_len, target - self.file_len) {
            Ok(()) => self.file_len = target,
            Err(e) => {
                tracing::info!(id = self.seg.id, file = %files.seg_path.display(), error = %e,
                    "cannot reserve space for a segment (fallocate); its appends grow the file instead");
                self.preallocate_bytes = 0;
            }
        }
    }

    fn write_index_entries(&mut self, files: &Files, new_entries: u64) {
        let Some(idx) = &files.idx else {
            self.index_broken = true;
            return;
        };
        let at = FILE_HEADER_LEN as u64 + self.idx_count * INDEX_ENTRY_LEN as u64;
        match idx.write_all_at(&self.idx_buf, at) {
            Ok(()) => self.idx_count += new_entries,
            Err(e) => {
                tracing::warn!(id = self.seg.id, file = %files.idx_path.display(), error = %e,
                    "cannot write the segment index; no more entries until it is rebuilt on the next open");
                let _ = idx.set_len(at);
                self.index_broken = true;
            }
        }
    }

    /// Makes the writer's view the one readers and the store see.
    fn publish(&self) {
        let mut s = self.seg.state();
        s.len = self.len;
        s.next_offset = self.next_offset;
        s.checksum = self.checksum;
        s.idx_count = self.idx_count;
        s.last_index_pos = self.last_index_pos;
    }

    fn check_live(&self) -> Result<(), StorageError> {
        if self.seg.state().deleted {
            return Err(StorageError::NotFound { id: self.seg.id });
        }
        Ok(())
    }

    /// A handle that fdatasyncs this segment without borrowing the writer.
    pub fn syncer(&self) -> Syncer {
        Syncer { seg: self.seg.clone() }
    }

    /// fdatasyncs the segment; returns the `next_offset` that is now durable.
    pub fn sync(&mut self) -> Result<u64, StorageError> {
        sync(&self.seg)
    }

    /// Drops the records with offset >= `next_offset` (durably), e.g. when a replica
    /// follows a new primary. Refused when `next_offset` is beyond the end.
    pub fn truncate(&mut self, next_offset: u64) -> Result<(), StorageError> {
        self.check_live()?;
        let id = self.seg.id;
        if next_offset > self.next_offset {
            return Err(StorageError::TruncatePastEnd { id, next_offset: self.next_offset, requested: next_offset });
        }
        if next_offset == self.next_offset {
            return Ok(());
        }
        let files = &self.seg.files_rw()?;
        let keep_entries = index_partition(id, files, self.idx_count, |e| e.offset < next_offset)?;
        let (mut offset, start) = match keep_entries {
            0 => (0, FILE_HEADER_LEN as u64),
            n => {
                let e = read_index_entry(id, files, n - 1)?;
                (e.offset, e.position)
            }
        };
        let mut cur = Cursor::new(&*files.seg, &files.seg_path, start, self.len, REREAD_CHUNK_BYTES);
        while offset < next_offset {
            let h = cur.frame_header(id, offset)?;
            cur.consume(h.frame_len as u64);
            offset += 1;
        }
        let position = cur.pos();
        let checksum = checksum_of(files, FILE_HEADER_LEN as u64, position)?;

        let _exclusive = self.seg.write_guard();
        // The index first: if the segment cannot be cut after it, the index is still
        // a valid (sparser) index of the records.
        if let Some(idx) = &files.idx {
            let idx_len = FILE_HEADER_LEN as u64 + keep_entries * INDEX_ENTRY_LEN as u64;
            idx.set_len(idx_len).map_err(|e| StorageError::io(&files.idx_path, e))?;
        }
        self.idx_count = keep_entries;
        self.last_index_pos = start;
        self.publish();
        files.seg.set_len(position).map_err(|e| StorageError::io(&files.seg_path, e))?;
        self.file_len = position;
        self.len = position;
        self.next_offset = next_offset;
        self.checksum = checksum;
        self.publish();
        {
            let mut s = self.seg.state();
            s.truncations += 1;
            s.synced_len = s.synced_len.min(position);
        }
        // Durable, so that dropped records do not come back after a crash.
        files.seg.sync_all().map_err(|e| StorageError::io(&files.seg_path, e))?;
        let mut s = self.seg.state();
        s.synced_len = position;
        Ok(())
    }

    /// fsyncs the records, writes the seal trailer (record count and checksum) and
    /// fsyncs again; the segment is read-only afterwards. On error the segment stays
    /// unsealed and a new writer can be made for it.
    pub fn seal(mut self) -> Result<SegmentInfo, StorageError> {
        self.check_live()?;
        let files = self.seg.files_rw()?;
        let path = &files.seg_path;
        if self.file_len > self.len {
            // The trailer is the end of a sealed segment's file: give back the reserve.
            files.seg.set_len(self.len).map_err(|e| StorageError::io(path, e))?;
            self.file_len = self.len;
        }
        files.seg.sync_data().map_err(|e| StorageError::io(path, e))?;
        let trailer = SealTrailer {
            nonce: self.seg.nonce,
            record_count: self.next_offset,
            records_len: self.len - FILE_HEADER_LEN as u64,
            checksum: self.checksum,
        };
        self.buf.clear();
        encode_trailer(&mut self.buf, &trailer);
        if let Err(e) = files.seg.write_all_at(&self.buf, self.len).and_then(|()| files.seg.sync_data()) {
            let _ = files.seg.set_len(self.len);
            return Err(StorageError::io(path, e));
        }
        if let (Some(idx), false) = (&files.idx, self.index_broken) {
            if let Err(e) = idx.sync_data() {
                tracing::warn!(id = self.seg.id, file = %files.idx_path.display(), error = %e,
                    "cannot fsync the index of a sealed segment; it is rebuilt on the next open if damaged");
            }
        }
        {
            let mut s = self.seg.state();
            s.sealed = true;
            s.synced_len = s.len;
        }
        self.seg.unpin();
        Ok(self.seg.info())
    }
}

impl Drop for SegmentWriter {
    fn drop(&mut self) {
        self.seg.state().writer_live = false;
    }
}

/// crc32c of the bytes `[from, to)` of the segment file.
fn checksum_of(files: &Files, from: u64, to: u64) -> Result<u32, StorageError> {
    let mut cur = Cursor::new(&*files.seg, &files.seg_path, from, to, REREAD_CHUNK_BYTES);
    let mut crc = 0;
    while cur.remaining() > 0 {
        let bytes = cur.fill(1)?;
        crc = crc32c::crc32c_append(crc, bytes);
        let n = bytes.len() as u64;
        cur.consume(n);
    }
    Ok(crc)
}

fn sync(seg: &Arc<Segment>) -> Result<u64, StorageError> {
    let s = seg.snapshot();
    if s.deleted {
        return Err(StorageError::NotFound { id: seg.id });
    }
    if s.sealed || s.synced_len == s.len {
        return Ok(s.next_offset);
    }
    // Records not synced keep the files open ([`Segment::close_if_idle`]), unless they
    // were closed just before the write that added them: opened again then (an
    // fdatasync covers every write to the file, through any descriptor).
    let files = seg.files_rw()?;
    files.seg.sync_data().map_err(|e| StorageError::io(&files.seg_path, e))?;
    let mut now = seg.state();
    if now.truncations == s.truncations && now.synced_len < s.len {
        now.synced_len = s.len;
    }
    Ok(s.next_offset)
}

/// fdatasyncs a segment without borrowing its writer, so a group-commit task can make
/// one batch durable while the next is being appended.
#[derive(Clone)]
pub struct Syncer {
    seg: Arc<Segment>,
}

impl Syncer {
    /// fdatasyncs the segment; returns the `next_offset` appended when the call started,
    /// which is now durable (immediately when nothing was appended since the last sync).
    pub fn sync(&self) -> Result<u64, StorageError> {
        sync(&self.seg)
    }
}

impl std::fmt::Debug for Syncer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Syncer").field("id", &self.seg.id).finish()
    }
}
