//! Reading records by offset and finding offsets by time.

use std::sync::Arc;

use bytes::Bytes;

use crate::codec::{FILE_HEADER_LEN, FRAME_HEADER_LEN};
use crate::files::{corrupt, index_ceil, index_floor, Cursor, Files};
use crate::segment::{ReadHint, SegState, Segment};
use crate::{Record, StorageError};

/// Scratch buffer of a read: at most this, at least a page (and no more than the
/// bytes there are to read).
const READ_CHUNK_MAX_BYTES: usize = 64 << 10;
const READ_CHUNK_MIN_BYTES: usize = 4 << 10;

/// Reads a segment with positional reads; sees what its writer has appended so far.
/// Cheap to clone; many may read one segment at once.
#[derive(Clone)]
pub struct SegmentReader {
    seg: Arc<Segment>,
    files: Arc<Files>,
}

impl std::fmt::Debug for SegmentReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SegmentReader").field("id", &self.seg.id).finish()
    }
}

/// Where a record is: its offset and the position of its frame.
#[derive(Clone, Copy)]
struct At {
    offset: u64,
    position: u64,
}

impl SegmentReader {
    pub(crate) fn new(seg: Arc<Segment>, files: Arc<Files>) -> Self {
        SegmentReader { seg, files }
    }

    pub fn id(&self) -> u64 {
        self.seg.id
    }

    /// The offset the next appended record will get.
    pub fn next_offset(&self) -> u64 {
        self.seg.snapshot().next_offset
    }

    /// The records with `from_offset <= offset < until_offset`, in order, as long as
    /// their payloads add up to at most `max_bytes` — but always the first one when there
    /// is one, however large. `until_offset` hides what the caller may not serve yet.
    ///
    /// Memory: the payloads are copied into one buffer of at most `max_bytes` (or the
    /// first record's payload when larger), plus a scratch buffer of at most 64 KiB.
    pub fn read(&self, from_offset: u64, until_offset: u64, max_bytes: usize) -> Result<Vec<Record>, StorageError> {
        let _shared = self.seg.read_guard();
        let snap = self.seg.snapshot();
        let end_offset = until_offset.min(snap.next_offset);
        if from_offset >= end_offset {
            return Ok(Vec::new());
        }
        let id = self.seg.id;
        let files = &*self.files;
        let (start, end_position) = self.bounds(&snap, from_offset, end_offset)?;
        let chunk = max_bytes
            .saturating_add(FRAME_HEADER_LEN)
            .clamp(READ_CHUNK_MIN_BYTES, READ_CHUNK_MAX_BYTES)
            .min(usize::try_from(end_position.saturating_sub(start.position)).unwrap_or(usize::MAX));
        let mut cur = Cursor::new(&*files.seg, &files.seg_path, start.position, snap.len, chunk);
        let mut offset = start.offset;
        while offset < from_offset {
            let h = cur.frame_header(id, offset)?;
            cur.consume(h.frame_len as u64);
            offset += 1;
        }
        let (records, end_position) = self.copy_records(&mut cur, offset, end_offset, end_position, max_bytes)?;
        let end =
            ReadHint { offset: offset + records.len() as u64, position: end_position, truncations: snap.truncations };
        self.seg.remember(end);
        Ok(records)
    }

    /// Where a read of `from_offset..end_offset` starts (a record at or before
    /// `from_offset`) and an upper bound of the position where its records end.
    fn bounds(&self, snap: &SegState, from_offset: u64, end_offset: u64) -> Result<(At, u64), StorageError> {
        let hint = self.seg.hint(from_offset, snap.truncations).filter(|h| h.position <= snap.len);
        let start = match hint {
            Some(h) => At { offset: h.offset, position: h.position },
            None => self.floor(snap, |e| e.offset <= from_offset)?,
        };
        // An upper bound of the bytes to read: up to the first index entry at or past
        // the end (or the end of the records). A sequential reader (hinted) is near the
        // end anyway and saves the index search.
        let end_position = if end_offset == snap.next_offset || hint.is_some() {
            snap.len
        } else {
            index_ceil(self.seg.id, &self.files, snap.idx_count, |e| e.offset < end_offset)?
                .map_or(snap.len, |e| e.position)
        };
        Ok((start, end_position))
    }

    /// The records from the cursor's (at `offset`) up to `end_offset`, their checksums
    /// checked, while their payloads fit in `max_bytes` (the first always does),
    /// copied into one buffer.
    fn copy_records(
        &self,
        cur: &mut Cursor<'_>,
        mut offset: u64,
        end_offset: u64,
        end_position: u64,
        max_bytes: usize,
    ) -> Result<(Vec<Record>, u64), StorageError> {
        let id = self.seg.id;
        let span = usize::try_from(end_position.saturating_sub(cur.pos())).unwrap_or(usize::MAX);
        // Where the last record copied ends: a damaged record after good ones ends the
        // read there, so the good ones are served and the next read meets the damage.
        let mut good_end = cur.pos();
        let mut data: Vec<u8> = Vec::with_capacity(max_bytes.min(span));
        // (offset, timestamp, payload start, payload length)
        let mut found: Vec<(u64, i64, usize, usize)> = Vec::new();
        while offset < end_offset {
            let position = cur.pos();
            let h = match cur.frame_header(id, offset) {
                Ok(h) => h,
                Err(StorageError::Corrupt { .. }) if !found.is_empty() => break,
                Err(e) => return Err(e),
            };
            let payload_len = h.payload_len();
            if !found.is_empty() && data.len() + payload_len > max_bytes {
                break;
            }
            if found.is_empty() && payload_len > data.capacity() {
                data.reserve_exact(payload_len);
            }
            let mut fixed = [0u8; 16];
            fixed[..8].copy_from_slice(&h.offset.to_le_bytes());
            fixed[8..].copy_from_slice(&h.timestamp_ms.to_le_bytes());
            cur.consume(FRAME_HEADER_LEN as u64);
            let payload_start = data.len();
            cur.copy_out(payload_len, &mut data)?;
            let crc = crc32c::crc32c_append(crc32c::crc32c(&fixed), &data[payload_start..]);
            if crc != h.crc {
                if !found.is_empty() {
                    data.truncate(payload_start);
                    break;
                }
                let reason = format!("checksum mismatch (stored {:08x}, computed {crc:08x})", h.crc);
                return Err(corrupt(id, &self.files.seg_path, position, reason));
            }
            found.push((h.offset, h.timestamp_ms, payload_start, payload_len));
            good_end = cur.pos();
            offset += 1;
        }
        let data = Bytes::from(data);
        let records = found
            .into_iter()
            .map(|(offset, timestamp_ms, start, len)| Record {
                offset,
                timestamp_ms,
                payload: data.slice(start..start + len),
            })
            .collect();
        Ok((records, good_end))
    }

    /// The first offset whose timestamp is >= `ts_ms` (`next_offset` if none).
    /// Timestamps are non-decreasing within a segment (the broker ensures it).
    pub fn offset_for_time(&self, ts_ms: i64) -> Result<u64, StorageError> {
        let _shared = self.seg.read_guard();
        let snap = self.seg.snapshot();
        let id = self.seg.id;
        let start = self.floor(&snap, |e| e.timestamp_ms < ts_ms)?;
        let files = &*self.files;
        let mut cur = Cursor::new(&*files.seg, &files.seg_path, start.position, snap.len, READ_CHUNK_MAX_BYTES);
        let mut offset = start.offset;
        while offset < snap.next_offset {
            let h = cur.frame_header(id, offset)?;
            if h.timestamp_ms >= ts_ms {
                return Ok(offset);
            }
            cur.consume(h.frame_len as u64);
            offset += 1;
        }
        Ok(snap.next_offset)
    }

    /// The last indexed record for which `below` holds, or the first record.
    fn floor(&self, snap: &SegState, below: impl Fn(&crate::codec::IndexEntry) -> bool) -> Result<At, StorageError> {
        let entry = index_floor(self.seg.id, &self.files, snap.idx_count, below)?;
        Ok(entry.map_or(At { offset: 0, position: FILE_HEADER_LEN as u64 }, |e| At {
            offset: e.offset,
            position: e.position,
        }))
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use crate::{Config, Store};

    fn payloads(tag: u8, from: u64, n: u64, len: usize) -> Vec<Bytes> {
        (from..from + n).map(|o| Bytes::from(vec![tag ^ o as u8; len + o as usize % 7])).collect()
    }

    /// Sequential reads start at remembered positions; a truncation must make those
    /// positions stale even when records of other sizes now have the same offsets.
    #[test]
    fn hinted_reads_follow_truncations() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Config { index_interval_bytes: 300, ..Config::default() }).unwrap();
        let mut w = store.create(1).unwrap();
        let r = store.reader(1).unwrap();
        w.append(1, &payloads(1, 0, 40, 50)).unwrap();
        // Read in small steps so positions are remembered at many offsets.
        let mut next = 0;
        while next < 40 {
            let got = r.read(next, 40, 120).unwrap();
            assert_eq!(got[0].offset, next);
            next = got.last().unwrap().offset + 1;
        }
        w.truncate(10).unwrap();
        w.append(2, &payloads(2, 10, 40, 90)).unwrap();
        let expected = payloads(2, 10, 40, 90);
        for from in [10, 20, 39, 40] {
            let got = r.read(from, u64::MAX, usize::MAX).unwrap();
            assert_eq!(got.len() as u64, 50 - from, "from {from}");
            for rec in &got {
                assert_eq!(rec.payload, expected[(rec.offset - 10) as usize], "offset {}", rec.offset);
                assert_eq!(rec.timestamp_ms, 2);
            }
        }
        // And hinted reads after the truncation are right too.
        let mut next = 10;
        while next < 50 {
            let got = r.read(next, 50, 200).unwrap();
            assert_eq!(got[0].payload, expected[(next - 10) as usize]);
            next = got.last().unwrap().offset + 1;
        }
    }
}
