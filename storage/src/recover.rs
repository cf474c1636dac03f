//! Creating a segment's files and recovering them on open.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::codec::{
    decode_frame_header, decode_header, decode_index_entry, decode_trailer, encode_header, encode_index_entry,
    trailer_nonce, verify_frame, CodecError, Decoded, FileHeader, FileKind, IndexEntry, FILE_HEADER_LEN,
    FORMAT_VERSION, FRAME_HEADER_LEN, INDEX_ENTRY_LEN, TRAILER_LEN,
};
use crate::durable;
use crate::files::{corrupt, Cursor, Files};
use crate::fs::{Fs, FsFile, OpenMode};
use crate::open_files::OpenFiles;
use crate::segment::{SegState, Segment};
use crate::{index_file_name, segment_file_name, Config, StorageError};

/// Scratch buffer of the recovery scan (grows to a record when one is longer).
const SCAN_CHUNK_BYTES: usize = 1 << 20;
/// Index entries validated per read when checking an index file.
const INDEX_CHECK_ENTRIES: usize = 2048;

fn paths(dir: &Path, id: u64) -> (PathBuf, PathBuf) {
    (dir.join(segment_file_name(id)), dir.join(index_file_name(id)))
}

/// A value clients cannot guess (the filesystem's: random on a real one, from the seed
/// on a simulated one).
fn new_nonce(fs: &dyn Fs, id: u64) -> u64 {
    fs.unique_u64(id)
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StorageError + '_ {
    move |e| StorageError::io(path, e)
}

/// Replaces the index file with a header and `entries` (encoded), atomically but not
/// fsynced (`durable::replace_file_unsynced`): an index lost or damaged in a crash is
/// checked and rebuilt on the next open.
pub(crate) fn write_index_file(
    fs: &dyn Fs,
    idx_path: &Path,
    id: u64,
    nonce: u64,
    entries: &[u8],
) -> Result<(), StorageError> {
    let mut bytes = Vec::with_capacity(FILE_HEADER_LEN + entries.len());
    encode_header(&mut bytes, &FileHeader { kind: FileKind::Index, segment_id: id, nonce });
    bytes.extend_from_slice(entries);
    durable::replace_file_unsynced(fs, idx_path, &bytes).map_err(StorageError::from_file)
}

fn open_rw(fs: &dyn Fs, path: &Path) -> Result<Box<dyn FsFile>, StorageError> {
    fs.open(path, OpenMode::ReadWrite).map_err(io_err(path))
}

/// Creates the files of a new, empty segment; `AlreadyExists` if its segment file exists.
pub(crate) fn create(
    fs: &Arc<dyn Fs>,
    dir: &Path,
    id: u64,
    open_files: &Arc<OpenFiles>,
) -> Result<Segment, StorageError> {
    let (seg_path, idx_path) = paths(dir, id);
    let nonce = new_nonce(&**fs, id);
    let seg = match fs.open(&seg_path, OpenMode::CreateNew) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(StorageError::AlreadyExists { id }),
        Err(e) => return Err(StorageError::io(&seg_path, e)),
    };
    let mut header = Vec::with_capacity(FILE_HEADER_LEN);
    encode_header(&mut header, &FileHeader { kind: FileKind::Segment, segment_id: id, nonce });
    // The header is durable before any record: a segment file whose header is missing
    // can only be a creation cut short, with nothing in it to lose.
    if let Err(e) = seg.write_all_at(&header, 0).and_then(|()| seg.sync_all()) {
        let _ = fs.remove_file(&seg_path);
        return Err(StorageError::io(&seg_path, e));
    }
    write_index_file(&**fs, &idx_path, id, nonce, &[])?;
    let idx = open_rw(&**fs, &idx_path)?;
    crate::fsync_dir(&**fs, dir)?;
    let files = Arc::new(Files { seg, seg_path: seg_path.clone(), idx: Some(idx), idx_path: idx_path.clone() });
    Ok(Segment::new(fs.clone(), id, nonce, (seg_path, idx_path), SegState::empty(), Some(files), open_files.clone()))
}

/// Opens an existing segment: trusts a valid seal trailer, scans (and cuts the torn or
/// corrupt tail of) anything else; rebuilds the index when needed.
///
/// `Corrupt` means damage that cutting a tail cannot repair (a damaged header, a
/// damaged seal trailer, a sealed segment whose records fail the checks): the caller
/// sets the segment aside. The files are left as they were.
pub(crate) fn recover(
    dir: &Path,
    id: u64,
    config: &Config,
    open_files: &Arc<OpenFiles>,
) -> Result<Segment, StorageError> {
    let fs = &config.fs;
    let (seg_path, idx_path) = paths(dir, id);
    let seg = open_rw(&**fs, &seg_path)?;
    let file_len = seg.len_bytes().map_err(io_err(&seg_path))?;

    let mut header = [0u8; FILE_HEADER_LEN];
    let header_len = file_len.min(FILE_HEADER_LEN as u64) as usize;
    seg.read_exact_at(&mut header[..header_len], 0).map_err(io_err(&seg_path))?;
    let decoded = decode_header(&header[..header_len]);
    let nonce = match decoded {
        Ok(Decoded::Complete(h, _)) if h.kind == FileKind::Segment && h.segment_id == id => h.nonce,
        Ok(Decoded::Complete(h, _)) => {
            let reason = format!("header of a {:?} file of segment {}", h.kind, h.segment_id);
            return Err(corrupt(id, &seg_path, 0, reason));
        }
        // Nothing but a (partial) header: a creation cut short. Start the segment afresh.
        _ if file_len <= FILE_HEADER_LEN as u64 => {
            tracing::warn!(id, file = %seg_path.display(), file_len,
                "segment file has no valid header and no records (creation cut short); re-creating it empty");
            drop(seg);
            fs.remove_file(&seg_path).map_err(io_err(&seg_path))?;
            let segment = create(fs, dir, id, open_files)?;
            return Ok(segment);
        }
        Ok(Decoded::Incomplete { needed }) => {
            return Err(corrupt(id, &seg_path, 0, format!("segment header: {needed} bytes short")))
        }
        // The header's checksum held (it is checked before the version): a newer
        // release's file, not damage.
        Err(CodecError::UnsupportedVersion { version }) if version > FORMAT_VERSION => {
            return Err(StorageError::NewerFormat { id, path: seg_path, version, supported: FORMAT_VERSION })
        }
        Err(e) => return Err(corrupt(id, &seg_path, 0, format!("segment header: {e}"))),
    };

    if let Some(trailer) = read_trailer(id, &*seg, &seg_path, file_len, nonce)? {
        drop(seg);
        return recover_sealed(id, nonce, seg_path, idx_path, trailer, config, open_files);
    }
    recover_unsealed(id, nonce, seg, (seg_path, idx_path), file_len, config, open_files)
}

/// The seal trailer at the end of the file, if there is a valid one for this segment;
/// `Corrupt` if the segment's own trailer is there but damaged.
fn read_trailer(
    id: u64,
    seg: &dyn FsFile,
    path: &Path,
    file_len: u64,
    nonce: u64,
) -> Result<Option<crate::codec::SealTrailer>, StorageError> {
    let min_len = (FILE_HEADER_LEN + TRAILER_LEN) as u64;
    if file_len < min_len {
        return Ok(None);
    }
    let mut buf = [0u8; TRAILER_LEN];
    let position = file_len - TRAILER_LEN as u64;
    seg.read_exact_at(&mut buf, position).map_err(io_err(path))?;
    let decoded = decode_trailer(&buf);
    let problem = match &decoded {
        Ok(Decoded::Complete(t, _))
            if t.nonce == nonce
                && t.records_len == file_len - min_len
                && t.record_count <= t.records_len / FRAME_HEADER_LEN as u64 =>
        {
            return Ok(Some(*t));
        }
        Ok(Decoded::Complete(t, _)) => format!(
            "seal trailer does not fit the file: {} records in {} bytes, the file has {} bytes of records",
            t.record_count,
            t.records_len,
            file_len - min_len
        ),
        Ok(Decoded::Incomplete { .. }) => "short seal trailer".to_string(),
        Err(e) => format!("seal trailer: {e}"),
    };
    // Zeros where the trailer's checksum should be: a crash while sealing, whose bytes
    // did not all reach the disk. The records before it are checked by the scan of an
    // unsealed segment, and the segment is sealed again.
    let torn = buf[TRAILER_LEN - 4..].iter().all(|b| *b == 0);
    if trailer_nonce(&buf) == Some(nonce) && !torn {
        return Err(corrupt(id, path, position, problem));
    }
    Ok(None)
}

fn recover_sealed(
    id: u64,
    nonce: u64,
    seg_path: PathBuf,
    idx_path: PathBuf,
    trailer: crate::codec::SealTrailer,
    config: &Config,
    open_files: &Arc<OpenFiles>,
) -> Result<Segment, StorageError> {
    let fs = &config.fs;
    let len = FILE_HEADER_LEN as u64 + trailer.records_len;
    let (idx_count, last_index_pos) = match check_index(&**fs, &idx_path, id, nonce, len, trailer.record_count) {
        Ok(valid) => valid,
        Err(reason) => {
            tracing::info!(id, file = %idx_path.display(), %reason, "rebuilding the index of a sealed segment");
            let seg = fs.open(&seg_path, OpenMode::Read).map_err(io_err(&seg_path))?;
            let scan = scan(&*seg, &seg_path, len, config)?;
            if scan.problem.is_some() || scan.next_offset != trailer.record_count || scan.checksum != trailer.checksum {
                // The scan was needed anyway for the index; what it found is damage in
                // records that were sealed, and a sealed segment is not cut: it is set
                // aside whole so that a complete copy can replace it.
                let reason = match &scan.problem {
                    Some(p) => format!("record at offset {}: {}", scan.next_offset, p.reason),
                    None => format!(
                        "the records ({} of them, checksum {:08x}) differ from the seal trailer ({}, {:08x})",
                        scan.next_offset, scan.checksum, trailer.record_count, trailer.checksum
                    ),
                };
                return Err(corrupt(id, &seg_path, scan.len, reason));
            }
            write_index_file(&**fs, &idx_path, id, nonce, &scan.index)?;
            (scan.idx_count, scan.last_index_pos)
        }
    };
    let state = SegState {
        len,
        next_offset: trailer.record_count,
        checksum: trailer.checksum,
        idx_count,
        last_index_pos,
        sealed: true,
        synced_len: len,
        ..SegState::empty()
    };
    Ok(Segment::new(fs.clone(), id, nonce, (seg_path, idx_path), state, None, open_files.clone()))
}

fn recover_unsealed(
    id: u64,
    nonce: u64,
    seg: Box<dyn FsFile>,
    (seg_path, idx_path): (PathBuf, PathBuf),
    file_len: u64,
    config: &Config,
    open_files: &Arc<OpenFiles>,
) -> Result<Segment, StorageError> {
    let fs = &config.fs;
    let scan = scan(&*seg, &seg_path, file_len, config)?;
    if let Some(problem) = &scan.problem {
        let dropped_bytes = file_len - scan.len;
        let zeros = zero_tail(&*seg, &seg_path, scan.len, file_len)?;
        // The bad record is the last one written: it reaches the end of the file, or
        // only reserved space (zeros) follows it.
        let claimed_end = scan.len.saturating_add(problem.extent);
        let torn = zeros || claimed_end >= file_len || zero_tail(&*seg, &seg_path, claimed_end, file_len)?;
        if zeros {
            // Space reserved ahead of the records (Config::preallocate_bytes), or
            // appended bytes that never reached the disk: nothing was lost here that
            // had been made durable.
            tracing::info!(
                id,
                offset = scan.next_offset,
                position = scan.len,
                dropped_bytes,
                "segment ends with zeros after its last record; cutting them"
            );
        } else if torn {
            tracing::warn!(id, offset = scan.next_offset, position = scan.len, dropped_bytes, reason = %problem.reason,
                "segment ends with a torn or corrupt record; truncating it to the last valid record");
        } else {
            tracing::warn!(id, offset = scan.next_offset, position = scan.len, dropped_bytes, reason = %problem.reason,
                "SEGMENT IS DAMAGED BEFORE ITS END: dropping the damaged record and everything after it");
        }
        seg.set_len(scan.len).map_err(io_err(&seg_path))?;
    }
    // What was read may still be only in the page cache (a process crash, not a power
    // loss): make it durable before anyone relies on it.
    seg.sync_all().map_err(io_err(&seg_path))?;
    write_index_file(&**fs, &idx_path, id, nonce, &scan.index)?;
    let idx = open_rw(&**fs, &idx_path)?;
    let files = Arc::new(Files { seg, seg_path: seg_path.clone(), idx: Some(idx), idx_path: idx_path.clone() });
    let state = SegState {
        len: scan.len,
        next_offset: scan.next_offset,
        checksum: scan.checksum,
        idx_count: scan.idx_count,
        last_index_pos: scan.last_index_pos,
        synced_len: scan.len,
        ..SegState::empty()
    };
    Ok(Segment::new(fs.clone(), id, nonce, (seg_path, idx_path), state, Some(files), open_files.clone()))
}

/// Why a scan stopped before the end.
pub(crate) struct Problem {
    pub reason: String,
    /// Bytes the bad record claims (it is the last one when they reach the end).
    pub extent: u64,
}

/// The valid prefix of a segment's records and its index.
pub(crate) struct Scan {
    /// End of the last valid record.
    pub len: u64,
    pub next_offset: u64,
    pub checksum: u32,
    /// Encoded index entries.
    pub index: Vec<u8>,
    pub idx_count: u64,
    pub last_index_pos: u64,
    pub problem: Option<Problem>,
}

/// Reads the records in `[FILE_HEADER_LEN, limit)` until the first torn or invalid one
/// (bad length, checksum, or an offset out of sequence).
pub(crate) fn scan(file: &dyn FsFile, path: &Path, limit: u64, config: &Config) -> Result<Scan, StorageError> {
    let interval = u64::from(config.index_interval_bytes);
    let start = FILE_HEADER_LEN as u64;
    let mut out = Scan {
        len: start,
        next_offset: 0,
        checksum: 0,
        index: Vec::new(),
        idx_count: 0,
        last_index_pos: start,
        problem: None,
    };
    let mut cur = Cursor::new(file, path, start, limit, SCAN_CHUNK_BYTES);
    while cur.remaining() > 0 {
        let pos = cur.pos();
        let problem = |reason: String, extent: usize| Some(Problem { reason, extent: extent as u64 });
        let header = match decode_frame_header(cur.fill(FRAME_HEADER_LEN)?) {
            Ok(Decoded::Complete(h, _)) => h,
            Ok(Decoded::Incomplete { needed }) => {
                out.problem = problem(format!("torn record header ({needed} bytes missing)"), FRAME_HEADER_LEN);
                break;
            }
            Err(e) => {
                out.problem = problem(e.to_string(), FRAME_HEADER_LEN);
                break;
            }
        };
        if header.offset != out.next_offset {
            let reason = format!("record offset {} where {} was expected", header.offset, out.next_offset);
            out.problem = problem(reason, header.frame_len);
            break;
        }
        let frame = cur.fill(header.frame_len)?;
        if frame.len() < header.frame_len {
            let missing = header.frame_len - frame.len();
            out.problem = problem(format!("torn record ({missing} bytes missing)"), header.frame_len);
            break;
        }
        if let Err(e) = verify_frame(&header, frame) {
            out.problem = problem(e.to_string(), header.frame_len);
            break;
        }
        out.checksum = crc32c::crc32c_append(out.checksum, &frame[..header.frame_len]);
        if pos - out.last_index_pos >= interval {
            let entry = IndexEntry { offset: header.offset, position: pos, timestamp_ms: header.timestamp_ms };
            encode_index_entry(&mut out.index, &entry);
            out.idx_count += 1;
            out.last_index_pos = pos;
        }
        cur.consume(header.frame_len as u64);
        out.next_offset += 1;
        out.len = cur.pos();
    }
    Ok(out)
}

/// Whether `[from, to)` holds only zero bytes: what a file system may leave when a
/// file's new size reached the disk but its data did not (a torn write too).
fn zero_tail(file: &dyn FsFile, path: &Path, from: u64, to: u64) -> Result<bool, StorageError> {
    let mut cur = Cursor::new(file, path, from, to, SCAN_CHUNK_BYTES);
    while cur.remaining() > 0 {
        let bytes = cur.fill(1)?;
        if bytes.iter().any(|b| *b != 0) {
            return Ok(false);
        }
        let n = bytes.len() as u64;
        cur.consume(n);
    }
    Ok(true)
}

/// Checks a sealed segment's index file: its header, whole entries with valid
/// checksums, strictly increasing offsets and positions inside the records. Returns the
/// entry count and the position of the last entry, or why the index is not usable.
fn check_index(
    fs: &dyn Fs,
    idx_path: &Path,
    id: u64,
    nonce: u64,
    records_end: u64,
    record_count: u64,
) -> Result<(u64, u64), String> {
    let file = match fs.open(idx_path, OpenMode::Read) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err("the index file is missing".into()),
        Err(e) => return Err(format!("cannot open the index file: {e}")),
    };
    let len = file.len_bytes().map_err(|e| e.to_string())?;
    if len < FILE_HEADER_LEN as u64 {
        return Err("the index file is shorter than its header".into());
    }
    let mut header = [0u8; FILE_HEADER_LEN];
    file.read_exact_at(&mut header, 0).map_err(|e| e.to_string())?;
    match decode_header(&header) {
        Ok(Decoded::Complete(h, _)) if h.kind == FileKind::Index && h.segment_id == id && h.nonce == nonce => {}
        Ok(_) => return Err("the index header belongs to another file".into()),
        Err(e) => return Err(format!("index header: {e}")),
    }
    let body = len - FILE_HEADER_LEN as u64;
    let count = body / INDEX_ENTRY_LEN as u64;
    if count * INDEX_ENTRY_LEN as u64 != body {
        return Err("the index ends with a partial entry".into());
    }
    let mut prev: Option<IndexEntry> = None;
    let mut buf = vec![0u8; INDEX_CHECK_ENTRIES * INDEX_ENTRY_LEN];
    let mut i = 0u64;
    while i < count {
        let n = (count - i).min(INDEX_CHECK_ENTRIES as u64) as usize;
        let chunk = &mut buf[..n * INDEX_ENTRY_LEN];
        file.read_exact_at(chunk, FILE_HEADER_LEN as u64 + i * INDEX_ENTRY_LEN as u64).map_err(|e| e.to_string())?;
        for (k, bytes) in chunk.chunks_exact(INDEX_ENTRY_LEN).enumerate() {
            let entry = match decode_index_entry(bytes) {
                Ok(Decoded::Complete(e, _)) => e,
                Ok(Decoded::Incomplete { .. }) => return Err("short index entry".into()),
                Err(e) => return Err(format!("index entry {}: {e}", i + k as u64)),
            };
            // Every frame is at least a header long, which bounds where a record can be.
            let min_position = FILE_HEADER_LEN as u64 + entry.offset.saturating_mul(FRAME_HEADER_LEN as u64);
            let in_order = prev.is_none_or(|p| entry.offset > p.offset && entry.position > p.position);
            if !in_order
                || entry.offset >= record_count
                || entry.position < min_position
                || entry.position >= records_end
            {
                return Err(format!("index entry {} does not fit the segment", i + k as u64));
            }
            prev = Some(entry);
        }
        i += n as u64;
    }
    Ok((count, prev.map_or(FILE_HEADER_LEN as u64, |p| p.position)))
}
