//! One way to make a file durable, used by every file a node writes.
//!
//! A node keeps several kinds of files (the Raft log, its vote / committed / purged
//! markers, the snapshot, the node id, segments and their indexes). They all need the
//! same few primitives, and each primitive is easy to get subtly wrong (a rename that is
//! not durable until its directory is fsynced; a decoder that panics on a torn length
//! field; a torn tail taken for corruption or the reverse). They live here once:
//!
//! - **Framed records**: `[u32 len LE][u32 crc32c LE of payload][payload]`
//!   ([`encode_record`], [`decode_record`]). The decoder never panics and tells a
//!   complete record from "incomplete: the buffer ends inside it" (a torn write) and
//!   from "invalid" (not a record). A payload is at most [`RECORD_PAYLOAD_MAX_BYTES`]:
//!   a larger length field is garbage, not a record still being written, and the
//!   encoder refuses larger payloads so that nothing is written that would not read back.
//! - **Append logs** ([`AppendLog`]): framed records appended and fdatasynced; on open
//!   the file is scanned and cut at the first torn or corrupt record (logged with the
//!   file name), then fsynced, so what was read is durable before anyone relies on it.
//! - **Atomically replaced files** ([`replace_file`]): write `<name>.tmp`, fsync it,
//!   rename over `<name>`, fsync the directory. A reader sees the old or the new
//!   content, never a mix, and once the call returns the new content survives a power
//!   loss. "Record files" ([`write_record_file`], [`read_record_file`]) are such files
//!   holding exactly one framed record, so any damage is detected on read.
//! - **Directories**: [`fsync_dir`] (makes creations, renames and removals in a
//!   directory durable) and [`create_dir_durable`]; [`lock_dir`] makes a directory one
//!   process's own (an exclusive `flock` on `<dir>/LOCK`, which records the holder's PID).
//! - **Checksums**: crc32c ([`checksum`], [`verify_checksum`]), shared by the segment
//!   codec, whose own frame layout (with offsets and timestamps) is in
//!   [`crate::codec`].
//!
//! Every operation goes through an [`Fs`] (the operating system's, or a simulated disk
//! that knows what a power loss keeps). Everything here is blocking IO: async callers
//! run it on a blocking thread.

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::fs::{Fs, FsFile, OpenMode};

/// Bytes of a record header: payload length and payload checksum.
pub const RECORD_HEADER_BYTES: usize = 8;
/// Largest payload a record may carry (64 MiB). A length field above it is garbage, not
/// a record that is still being written. The segment codec uses the same limit.
pub const RECORD_PAYLOAD_MAX_BYTES: usize = 64 << 20;
/// Suffix of the temporary file an atomic replace writes first (`<name>.tmp`). A file
/// with this suffix left in a directory is a replace cut short: safe to delete.
pub const TMP_SUFFIX: &str = ".tmp";

// ---------------------------------------------------------------------------------------
// Checksums
// ---------------------------------------------------------------------------------------

/// crc32c (Castagnoli) of `bytes`: hardware-accelerated on x86-64 and aarch64.
pub fn checksum(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

/// A stored checksum that does not match the bytes it covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("checksum mismatch (stored {stored:08x}, computed {computed:08x})")]
pub struct ChecksumMismatch {
    pub stored: u32,
    pub computed: u32,
}

/// Checks that `stored` is the [`checksum`] of `covered`.
pub fn verify_checksum(stored: u32, covered: &[u8]) -> Result<(), ChecksumMismatch> {
    let computed = checksum(covered);
    if computed == stored {
        Ok(())
    } else {
        Err(ChecksumMismatch { stored, computed })
    }
}

// ---------------------------------------------------------------------------------------
// Framed records
// ---------------------------------------------------------------------------------------

/// A payload larger than [`RECORD_PAYLOAD_MAX_BYTES`] was not framed: the decoder would
/// refuse it, so writing it would lose it on the next read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("a record payload of {len_bytes} bytes exceeds the maximum of {RECORD_PAYLOAD_MAX_BYTES}")]
pub struct RecordTooLarge {
    pub len_bytes: usize,
}

/// Appends one framed record holding `payload` to `out` (nothing when it is too large).
pub fn encode_record(payload: &[u8], out: &mut Vec<u8>) -> Result<(), RecordTooLarge> {
    let too_large = RecordTooLarge { len_bytes: payload.len() };
    if payload.len() > RECORD_PAYLOAD_MAX_BYTES {
        return Err(too_large);
    }
    let len = u32::try_from(payload.len()).map_err(|_| too_large)?;
    out.reserve(RECORD_HEADER_BYTES + payload.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&checksum(payload).to_le_bytes());
    out.extend_from_slice(payload);
    Ok(())
}

/// Why bytes are not a framed record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRecord {
    #[error("record length {len_bytes} exceeds the maximum of {RECORD_PAYLOAD_MAX_BYTES}")]
    TooLong { len_bytes: u32 },
    #[error(transparent)]
    Checksum(#[from] ChecksumMismatch),
}

/// Result of decoding the record at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A complete record with a valid checksum; `size` bytes (header included) were used.
    Record { payload: &'a [u8], size: usize },
    /// The buffer ends inside the record (a torn write): exactly `needed` more bytes
    /// would complete it (once the header is complete; before, they complete the header).
    Incomplete { needed: usize },
    /// The bytes are not a valid record. `size` is the extent the header claims (or the
    /// header length if the length field is itself invalid).
    Invalid { reason: InvalidRecord, size: usize },
}

fn u32_le(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(b)
}

/// Decodes the record at the start of `buf` (an empty buffer is `Incomplete`). Never
/// panics, whatever the bytes.
pub fn decode_record(buf: &[u8]) -> Decoded<'_> {
    if buf.len() < RECORD_HEADER_BYTES {
        return Decoded::Incomplete { needed: RECORD_HEADER_BYTES - buf.len() };
    }
    let len = u32_le(buf, 0);
    let stored = u32_le(buf, 4);
    if len as usize > RECORD_PAYLOAD_MAX_BYTES {
        return Decoded::Invalid { reason: InvalidRecord::TooLong { len_bytes: len }, size: RECORD_HEADER_BYTES };
    }
    let size = RECORD_HEADER_BYTES + len as usize;
    if buf.len() < size {
        return Decoded::Incomplete { needed: size - buf.len() };
    }
    let payload = &buf[RECORD_HEADER_BYTES..size];
    match verify_checksum(stored, payload) {
        Ok(()) => Decoded::Record { payload, size },
        Err(e) => Decoded::Invalid { reason: e.into(), size },
    }
}

/// Why the bytes of a record file are not exactly one record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadRecordFile {
    #[error("truncated ({missing_bytes} bytes missing)")]
    Truncated { missing_bytes: usize },
    #[error(transparent)]
    Invalid(#[from] InvalidRecord),
    #[error("{extra_bytes} unexpected bytes after the record")]
    TrailingBytes { extra_bytes: usize },
}

/// The payload of a record file's bytes, which must be exactly one valid record. Never
/// panics, whatever the bytes.
pub fn decode_record_file(bytes: &[u8]) -> Result<&[u8], BadRecordFile> {
    match decode_record(bytes) {
        Decoded::Record { payload, size } if size == bytes.len() => Ok(payload),
        Decoded::Record { size, .. } => Err(BadRecordFile::TrailingBytes { extra_bytes: bytes.len() - size }),
        Decoded::Incomplete { needed } => Err(BadRecordFile::Truncated { missing_bytes: needed }),
        Decoded::Invalid { reason, .. } => Err(reason.into()),
    }
}

// ---------------------------------------------------------------------------------------
// Errors of file operations
// ---------------------------------------------------------------------------------------

/// A durable file that could not be read or written, or whose content cannot be trusted.
/// Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("I/O error on {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{} is corrupt: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("cannot write {}: {source}", path.display())]
    TooLarge { path: PathBuf, source: RecordTooLarge },
    #[error("cannot append an empty record to {}: zeros left by a crash would read as one", path.display())]
    EmptyRecord { path: PathBuf },
}

impl FileError {
    fn io(path: &Path) -> impl FnOnce(io::Error) -> FileError + '_ {
        move |source| FileError::Io { path: path.to_path_buf(), source }
    }

    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            FileError::Io { path, .. }
            | FileError::Corrupt { path, .. }
            | FileError::TooLarge { path, .. }
            | FileError::EmptyRecord { path } => path,
        }
    }
}

/// For callers whose interfaces speak `io::Error`: the kind is kept for IO errors, the
/// message (with the file name) for all.
impl From<FileError> for io::Error {
    fn from(e: FileError) -> io::Error {
        let kind = match &e {
            FileError::Io { source, .. } => source.kind(),
            FileError::Corrupt { .. } => io::ErrorKind::InvalidData,
            FileError::TooLarge { .. } | FileError::EmptyRecord { .. } => io::ErrorKind::InvalidInput,
        };
        io::Error::new(kind, e)
    }
}

// ---------------------------------------------------------------------------------------
// Directories
// ---------------------------------------------------------------------------------------

/// The directory holding `path` (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// fsyncs a directory, making file creations, renames and removals in it durable: a
/// file's own fsync does not cover its directory entry.
pub fn fsync_dir(fs: &dyn Fs, dir: &Path) -> Result<(), FileError> {
    fs.sync_dir(dir).map_err(FileError::io(dir))
}

/// Creates `dir` and any missing parents, durably: each new directory's entry is
/// fsynced in its parent, so the directory (and what is later made durable in it)
/// does not vanish in a power loss.
pub fn create_dir_durable(fs: &dyn Fs, dir: &Path) -> Result<(), FileError> {
    if fs.metadata(dir).is_ok_and(|m| m.is_dir) {
        return Ok(());
    }
    let missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.as_os_str().is_empty() && !fs.exists(d)).collect();
    fs.create_dir_all(dir).map_err(FileError::io(dir))?;
    // Outermost first: a new directory's entry is durable once its parent is fsynced.
    for d in missing.iter().rev() {
        fsync_dir(fs, parent_dir(d))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Atomically replaced files
// ---------------------------------------------------------------------------------------

/// `<path>.tmp`: where [`replace_file`] writes before renaming.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(TMP_SUFFIX);
    PathBuf::from(name)
}

/// Writes `bytes` to `<path>.tmp` (replacing a stale one), optionally fsyncs it, and
/// renames it over `path`.
fn write_and_rename(fs: &dyn Fs, path: &Path, bytes: &[u8], fsync: bool) -> Result<(), FileError> {
    let tmp = tmp_path(path);
    {
        let f = fs.open(&tmp, OpenMode::Truncate).map_err(FileError::io(&tmp))?;
        f.write_all_at(bytes, 0).map_err(FileError::io(&tmp))?;
        if fsync {
            // Before the rename: otherwise a power loss could leave the new name
            // pointing at a file whose data never reached the disk.
            f.sync_all().map_err(FileError::io(&tmp))?;
        }
    }
    fs.rename(&tmp, path).map_err(FileError::io(path))
}

/// Replaces `path` with `bytes` atomically and durably: write `<path>.tmp`, fsync it,
/// rename it over `path`, fsync the directory. A crash at any point leaves the old or
/// the new content (plus perhaps a stale `.tmp`); once this returns, the new content
/// survives a power loss.
pub fn replace_file(fs: &dyn Fs, path: &Path, bytes: &[u8]) -> Result<(), FileError> {
    write_and_rename(fs, path, bytes, true)?;
    fsync_dir(fs, parent_dir(path))
}

/// Like [`replace_file`] but without any fsync, for hints whose loss is harmless: the
/// rename keeps it atomic against a process crash, but after a power loss the file may
/// hold the old content, or be empty or damaged (readers must tolerate that).
pub fn replace_file_unsynced(fs: &dyn Fs, path: &Path, bytes: &[u8]) -> Result<(), FileError> {
    write_and_rename(fs, path, bytes, false)
}

/// Reads a file written by [`replace_file`]; `None` if it does not exist. The directory
/// is fsynced when it does: a crash between the rename and the directory fsync leaves a
/// new name that only the page cache knows, and the caller is about to rely on it.
pub fn read_replaced_file(fs: &dyn Fs, path: &Path) -> Result<Option<Vec<u8>>, FileError> {
    let bytes = match fs.read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(FileError::io(path)(e)),
    };
    fsync_dir(fs, parent_dir(path))?;
    Ok(Some(bytes))
}

fn frame_file(path: &Path, payload: &[u8]) -> Result<Vec<u8>, FileError> {
    let mut bytes = Vec::new();
    encode_record(payload, &mut bytes).map_err(|source| FileError::TooLarge { path: path.to_path_buf(), source })?;
    Ok(bytes)
}

/// Replaces `path` ([`replace_file`]) with one framed record holding `payload`.
pub fn write_record_file(fs: &dyn Fs, path: &Path, payload: &[u8]) -> Result<(), FileError> {
    replace_file(fs, path, &frame_file(path, payload)?)
}

/// Like [`write_record_file`] without fsync ([`replace_file_unsynced`]): for hints.
pub fn write_record_file_unsynced(fs: &dyn Fs, path: &Path, payload: &[u8]) -> Result<(), FileError> {
    replace_file_unsynced(fs, path, &frame_file(path, payload)?)
}

/// The payload of a record file; `None` if the file does not exist. Such files are
/// replaced atomically, so anything but exactly one valid record is real damage:
/// `Corrupt`, never a guess.
pub fn read_record_file(fs: &dyn Fs, path: &Path) -> Result<Option<Vec<u8>>, FileError> {
    let Some(bytes) = read_replaced_file(fs, path)? else { return Ok(None) };
    match decode_record_file(&bytes) {
        Ok(payload) => Ok(Some(payload.to_vec())),
        Err(e) => Err(FileError::Corrupt { path: path.to_path_buf(), reason: e.to_string() }),
    }
}

// ---------------------------------------------------------------------------------------
// Append logs
// ---------------------------------------------------------------------------------------

/// What opening an [`AppendLog`] cut off its end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cut {
    /// Where the first bad record started (= the new length of the file).
    pub position: u64,
    pub dropped_bytes: u64,
    pub reason: String,
    /// The bad record was the last one written (it reaches the end of the file, or only
    /// zeros follow it): a write torn by a crash, nothing that had been made durable.
    /// Otherwise records after it were dropped too: damage, not a crash.
    pub torn_tail: bool,
}

/// A file of framed records, only ever appended to, cut at the end, or rewritten without
/// its first records. Opening it reads the whole file, so it suits logs that are kept
/// short (the Raft log, compacted behind snapshots), not segments.
///
/// Records are never empty: an empty record is eight zero bytes (crc32c of nothing is
/// 0), exactly what a file system may leave where a crash lost appended data after the
/// file's new size was made durable. So the log refuses to append one, and a scan takes
/// one for unwritten space, not a record.
#[derive(Debug)]
pub struct AppendLog {
    fs: Arc<dyn Fs>,
    path: PathBuf,
    /// Opened for reading and writing; written only at its end.
    file: Box<dyn FsFile>,
    /// Length of the valid part of the file (= the file length).
    len_bytes: u64,
}

/// Whether a complete record with a payload and a valid checksum starts anywhere at or
/// after `from`: then the bytes before it were written and synced before it, and a bad
/// record there is damage, not a torn write (even if its length field now points past
/// the end of the file).
fn valid_record_after(data: &[u8], from: usize) -> bool {
    (from..data.len())
        .any(|at| matches!(decode_record(&data[at..]), Decoded::Record { payload, .. } if !payload.is_empty()))
}

impl AppendLog {
    /// Opens (creating) the log at `path` and reads every record in order, passing each
    /// complete, checksummed record's position and payload to `accept`, which may
    /// refuse it (`Err(reason)`: undecodable, out of sequence...).
    ///
    /// A torn tail (the first bad record reaches the end of the file, or only zeros
    /// follow it, and no valid record comes after it) is what a crash leaves of an
    /// append that was never synced, so never acknowledged: it is cut off (and logged
    /// with the file name), never passed on. Damage before the end (a bad record with
    /// valid ones after it, or a length that cannot come from a torn write) is not a
    /// crash's doing: records that were synced, and acknowledged, are gone or altered,
    /// and cutting them off would silently forget them. The open then fails with
    /// [`FileError::Corrupt`] and leaves the file as it is, for the owner to decide.
    ///
    /// The file and its directory are then fsynced: what a crashed process wrote may
    /// still be only in the page cache, and the caller is about to treat every accepted
    /// record as durable.
    pub fn open(
        fs: Arc<dyn Fs>,
        path: &Path,
        mut accept: impl FnMut(u64, &[u8]) -> Result<(), String>,
    ) -> Result<(AppendLog, Option<Cut>), FileError> {
        let file = fs.open(path, OpenMode::Create).map_err(FileError::io(path))?;
        let data = file.read_all().map_err(FileError::io(path))?;

        let mut pos = 0usize;
        // (reason, extent the bad record claims)
        let mut problem: Option<(String, usize)> = None;
        while pos < data.len() {
            match decode_record(&data[pos..]) {
                Decoded::Record { payload: [], size } => {
                    problem = Some(("empty record (zeros: space a crash left unwritten)".to_string(), size));
                    break;
                }
                Decoded::Record { payload, size } => {
                    if let Err(reason) = accept(pos as u64, payload) {
                        problem = Some((reason, size));
                        break;
                    }
                    pos += size;
                }
                Decoded::Incomplete { needed } => {
                    problem = Some((format!("incomplete record ({needed} more bytes needed)"), data.len() - pos));
                    break;
                }
                Decoded::Invalid { reason, size } => {
                    problem = Some((reason.to_string(), size));
                    break;
                }
            }
        }

        let cut = match problem {
            None => None,
            Some((reason, extent)) => {
                let claimed_end = pos.saturating_add(extent).min(data.len());
                // A zero-filled tail is what a file system may leave when the size of
                // the file was made durable but its last data was not: a torn write too.
                let torn_tail = (claimed_end >= data.len() || data[claimed_end..].iter().all(|b| *b == 0))
                    && !valid_record_after(&data, pos + 1);
                let dropped_bytes = (data.len() - pos) as u64;
                if !torn_tail {
                    let reason = format!(
                        "damaged at byte {pos} ({reason}) with {dropped_bytes} bytes after it that a crash cannot \
                         explain: records that were synced are gone or altered"
                    );
                    return Err(FileError::Corrupt { path: path.to_path_buf(), reason });
                }
                tracing::warn!(file = %path.display(), position = pos, dropped_bytes, %reason,
                    "file ends with a torn or corrupt record; truncating it to the last valid record");
                Some(Cut { position: pos as u64, dropped_bytes, reason, torn_tail })
            }
        };
        if cut.is_some() {
            file.set_len(pos as u64).map_err(FileError::io(path))?;
        }
        file.sync_all().map_err(FileError::io(path))?;
        fsync_dir(&*fs, parent_dir(path))?;
        Ok((AppendLog { fs, path: path.to_path_buf(), file, len_bytes: pos as u64 }, cut))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes of valid records (= the file length).
    pub fn len_bytes(&self) -> u64 {
        self.len_bytes
    }

    /// Appends one record per payload with one write and one fdatasync; returns the
    /// position of each record. On an error nothing counts as appended (the file is cut
    /// back, best effort; a torn rest would be cut on the next open anyway).
    pub fn append<P: AsRef<[u8]>>(&mut self, payloads: &[P]) -> Result<Vec<u64>, FileError> {
        let mut buf = Vec::new();
        let mut positions = Vec::with_capacity(payloads.len());
        for payload in payloads {
            if payload.as_ref().is_empty() {
                return Err(FileError::EmptyRecord { path: self.path.clone() });
            }
            positions.push(self.len_bytes + buf.len() as u64);
            encode_record(payload.as_ref(), &mut buf)
                .map_err(|source| FileError::TooLarge { path: self.path.clone(), source })?;
        }
        if buf.is_empty() {
            return Ok(positions);
        }
        let written = self.file.write_all_at(&buf, self.len_bytes).and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            // Do not leave a partial record behind the valid log: a later append would
            // land after it and be cut with it on the next open.
            if let Err(cut) = self.file.set_len(self.len_bytes) {
                tracing::warn!(file = %self.path.display(), error = %cut, "cannot cut a failed append off the log");
            }
            return Err(FileError::io(&self.path)(e));
        }
        self.len_bytes += buf.len() as u64;
        Ok(positions)
    }

    /// Cuts the log to `len_bytes` (a record boundary), durably: dropped records must not
    /// come back after a crash.
    pub fn truncate(&mut self, len_bytes: u64) -> Result<(), FileError> {
        if len_bytes >= self.len_bytes {
            return Ok(());
        }
        self.file.set_len(len_bytes).map_err(FileError::io(&self.path))?;
        self.file.sync_all().map_err(FileError::io(&self.path))?;
        self.len_bytes = len_bytes;
        Ok(())
    }

    /// Rewrites the log without its first `bytes` (a record boundary), atomically: the
    /// rest is copied to `<path>.tmp`, fsynced and renamed over the log, and the
    /// directory fsynced. A crash leaves the old or the new file. Positions of the kept
    /// records move down by `bytes`.
    pub fn drop_front(&mut self, bytes: u64) -> Result<(), FileError> {
        if bytes == 0 {
            return Ok(());
        }
        if bytes >= self.len_bytes {
            return self.truncate(0);
        }
        let mut rest = vec![0u8; (self.len_bytes - bytes) as usize];
        self.file.read_exact_at(&mut rest, bytes).map_err(FileError::io(&self.path))?;

        let tmp_path = tmp_path(&self.path);
        match self.fs.remove_file(&tmp_path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(FileError::io(&tmp_path)(e)),
        }
        let tmp = self.fs.open(&tmp_path, OpenMode::CreateNew).map_err(FileError::io(&tmp_path))?;
        tmp.write_all_at(&rest, 0).and_then(|()| tmp.sync_all()).map_err(FileError::io(&tmp_path))?;
        self.fs.rename(&tmp_path, &self.path).map_err(FileError::io(&self.path))?;
        fsync_dir(&*self.fs, parent_dir(&self.path))?;
        // The handle of the tmp file now is the log file.
        self.file = tmp;
        self.len_bytes -= bytes;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// A directory one process owns
// ---------------------------------------------------------------------------------------

/// Name of the lock file [`lock_dir`] takes in a directory.
pub const LOCK_FILE: &str = "LOCK";

/// A directory this process owns: an exclusive `flock` on `<dir>/LOCK`, held as long as
/// this value lives (dropping it closes the file, which releases the lock; so does the
/// process's death, even by kill -9, so a crash never leaves a stale lock behind).
#[derive(Debug)]
pub struct DirLock {
    dir: PathBuf,
    // Never read: the open file is the lock.
    _file: Box<dyn FsFile>,
}

impl DirLock {
    /// The directory this lock owns.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Why a directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process (or another owner in this one) holds the lock.
    #[error(
        "{} is in use by another process ({}): one process at a time may use it; stop that one first or choose another directory",
        dir.display(),
        holder.map_or_else(|| "PID not recorded yet".to_string(), |pid| format!("PID {pid}"))
    )]
    Held { dir: PathBuf, holder: Option<u32> },
    #[error(transparent)]
    File(#[from] FileError),
}

/// Takes the exclusive lock on `<dir>/LOCK` (creating the file, not the directory)
/// without waiting, and records this process's PID in it.
///
/// Two processes that both write one data directory corrupt it (two Raft nodes with one
/// id and one log), so an owner takes this before it reads or writes anything else in
/// the directory. `flock` rather than the file's existence: the kernel drops the lock
/// when the holder dies, whatever the cause. The lock belongs to the open file, so a
/// second attempt fails in the same process too, until the first [`DirLock`] is dropped.
/// The PID is informational (for the error message of the next attempt): the file is
/// opened without truncating, so a failed attempt leaves the holder's PID in place.
pub fn lock_dir(fs: &dyn Fs, dir: &Path) -> Result<DirLock, LockError> {
    let path = dir.join(LOCK_FILE);
    let file = fs.open(&path, OpenMode::Create).map_err(FileError::io(&path))?;
    if !file.try_lock_exclusive().map_err(FileError::io(&path))? {
        // The holder may not have written its PID yet: then it is not named.
        let holder = file
            .read_all()
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .and_then(|text| text.trim().parse().ok());
        return Err(LockError::Held { dir: dir.to_path_buf(), holder });
    }
    file.set_len(0)
        .and_then(|()| file.write_all_at(format!("{}\n", std::process::id()).as_bytes(), 0))
        .map_err(FileError::io(&path))?;
    Ok(DirLock { dir: dir.to_path_buf(), _file: file })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::test_env::{on_both, Env};

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_record(payload, &mut out).unwrap();
        out
    }

    /// Opens the log at `path`, returning its payloads and what was cut.
    fn open_all(e: &Env, path: &Path) -> (AppendLog, Vec<Vec<u8>>, Option<Cut>) {
        let mut payloads = Vec::new();
        let (log, cut) = AppendLog::open(e.fs.clone(), path, |_, p| {
            payloads.push(p.to_vec());
            Ok(())
        })
        .unwrap();
        (log, payloads, cut)
    }

    fn payloads(n: usize) -> Vec<Vec<u8>> {
        (0..n).map(|i| format!("{{\"record\":{i},\"pad\":\"{}\"}}", "x".repeat(i * 3)).into_bytes()).collect()
    }

    #[test]
    fn decode_record_classifies_any_bytes() {
        let mut buf = Vec::new();
        encode_record(b"{\"a\":1}", &mut buf).unwrap();
        assert_eq!(decode_record(&buf), Decoded::Record { payload: b"{\"a\":1}", size: buf.len() });
        assert!(matches!(decode_record(&[]), Decoded::Incomplete { needed: 8 }));
        assert!(matches!(decode_record(&buf[..5]), Decoded::Incomplete { needed: 3 }));
        assert!(matches!(decode_record(&buf[..buf.len() - 1]), Decoded::Incomplete { needed: 1 }));
        let mut bad = buf.clone();
        *bad.last_mut().unwrap() ^= 0xff;
        assert!(matches!(decode_record(&bad), Decoded::Invalid { .. }));
        let huge = [0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 1, 2];
        assert!(matches!(decode_record(&huge), Decoded::Invalid { size: RECORD_HEADER_BYTES, .. }));
        // Arbitrary bytes never panic.
        let mut x: u32 = 12345;
        for n in 0..2000usize {
            let bytes: Vec<u8> = (0..n % 64)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            let _ = decode_record(&bytes);
        }
    }

    #[test]
    fn record_layout_and_limits() {
        let buf = frame(b"abc");
        assert_eq!(&buf[..4], &3u32.to_le_bytes());
        assert_eq!(&buf[4..8], &crc32c::crc32c(b"abc").to_le_bytes());
        assert_eq!(&buf[8..], b"abc");
        // The largest payload frames and decodes; one byte more is refused by both sides.
        let max = vec![7u8; RECORD_PAYLOAD_MAX_BYTES];
        let framed = frame(&max);
        assert_eq!(decode_record(&framed), Decoded::Record { payload: &max[..], size: framed.len() });
        let mut out = b"kept".to_vec();
        let over = vec![0u8; RECORD_PAYLOAD_MAX_BYTES + 1];
        assert_eq!(encode_record(&over, &mut out), Err(RecordTooLarge { len_bytes: RECORD_PAYLOAD_MAX_BYTES + 1 }));
        assert_eq!(out, b"kept", "nothing is framed when the payload is too large");
        let mut header = ((RECORD_PAYLOAD_MAX_BYTES + 1) as u32).to_le_bytes().to_vec();
        header.extend_from_slice(&[0; 4]);
        assert!(matches!(
            decode_record(&header),
            Decoded::Invalid { reason: InvalidRecord::TooLong { .. }, size: RECORD_HEADER_BYTES }
        ));
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let buf = frame(b"{\"vote\":{\"term\":4}}");
        for bit in 0..buf.len() * 8 {
            let mut bad = buf.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(!matches!(decode_record(&bad), Decoded::Record { .. }), "bit {bit}");
            assert!(decode_record_file(&bad).is_err(), "bit {bit}");
        }
    }

    #[test]
    fn record_file_decoder_wants_exactly_one_record() {
        let buf = frame(b"42");
        assert_eq!(decode_record_file(&buf), Ok(&b"42"[..]));
        for cut in 0..buf.len() {
            // Before the header is complete, the missing bytes are the header's.
            let missing_bytes = if cut < RECORD_HEADER_BYTES { RECORD_HEADER_BYTES - cut } else { buf.len() - cut };
            assert_eq!(decode_record_file(&buf[..cut]), Err(BadRecordFile::Truncated { missing_bytes }));
        }
        let mut longer = buf.clone();
        longer.push(0);
        assert_eq!(decode_record_file(&longer), Err(BadRecordFile::TrailingBytes { extra_bytes: 1 }));
        let err = decode_record_file(&longer[..3]).unwrap_err();
        assert_eq!(err.to_string(), "truncated (5 bytes missing)");
    }

    on_both! {
    fn record_file_round_trip_and_damage(e: &Env) {
        let dir = e.tempdir();
        let path = dir.path().join("vote");
        assert_eq!(read_record_file(&*e.fs, &path).unwrap(), None);
        write_record_file(&*e.fs, &path, b"{\"term\":1}").unwrap();
        assert_eq!(read_record_file(&*e.fs, &path).unwrap().as_deref(), Some(&b"{\"term\":1}"[..]));
        write_record_file_unsynced(&*e.fs, &path, b"{\"term\":2}").unwrap();
        assert_eq!(read_record_file(&*e.fs, &path).unwrap().as_deref(), Some(&b"{\"term\":2}"[..]));
        assert!(!e.exists(&tmp_path(&path)));

        let good = e.read(&path);
        let mut flipped = good.clone();
        flipped[9] ^= 0x10;
        e.write(&path, &flipped);
        let err = read_record_file(&*e.fs, &path).unwrap_err();
        assert!(matches!(err, FileError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("vote is corrupt: checksum mismatch"), "{err}");
        e.write(&path, &good[..good.len() - 1]);
        let err = read_record_file(&*e.fs, &path).unwrap_err();
        assert!(err.to_string().contains("truncated (1 bytes missing)"), "{err}");
        assert_eq!(err.path(), path);

        let over = vec![0u8; RECORD_PAYLOAD_MAX_BYTES + 1];
        assert!(matches!(write_record_file(&*e.fs, &path, &over), Err(FileError::TooLarge { .. })));
    }
    }

    on_both! {
    fn atomic_replace_leaves_old_or_new_content(e: &Env) {
        let dir = e.tempdir();
        let path = dir.path().join("snapshot");
        replace_file(&*e.fs, &path, b"old content").unwrap();

        // A replace cut short by a crash before its rename leaves a stale tmp file (here
        // half written) and the old content; the next replace does not mind the stale tmp.
        e.write(&tmp_path(&path), b"new con");
        assert_eq!(read_replaced_file(&*e.fs, &path).unwrap().as_deref(), Some(&b"old content"[..]));
        replace_file(&*e.fs, &path, b"new content, longer than before").unwrap();
        assert_eq!(e.read(&path), b"new content, longer than before");
        assert!(!e.exists(&tmp_path(&path)));

        // Shorter new content replaces the whole file, not a prefix of it.
        replace_file_unsynced(&*e.fs, &path, b"short").unwrap();
        assert_eq!(e.read(&path), b"short");
        assert_eq!(read_replaced_file(&*e.fs, &dir.path().join("missing")).unwrap(), None);

        // A replace that fails (its tmp file cannot be written) leaves the old content.
        e.create_dir(&tmp_path(&path));
        let err = replace_file(&*e.fs, &path, b"never written").unwrap_err();
        assert!(matches!(err, FileError::Io { .. }), "{err}");
        assert_eq!(err.path(), tmp_path(&path));
        assert_eq!(e.read(&path), b"short");
    }
    }

    on_both! {
    fn create_dir_durable_makes_every_level(e: &Env) {
        let dir = e.tempdir();
        let deep = dir.path().join("a/b/c");
        create_dir_durable(&*e.fs, &deep).unwrap();
        assert!(e.fs.metadata(&deep).unwrap().is_dir);
        create_dir_durable(&*e.fs, &deep).unwrap();
        fsync_dir(&*e.fs, &deep).unwrap();
        assert!(matches!(fsync_dir(&*e.fs, &dir.path().join("nope")), Err(FileError::Io { .. })));
        let file = dir.path().join("file");
        e.write(&file, b"x");
        assert!(create_dir_durable(&*e.fs, &file.join("sub")).is_err());
    }
    }

    #[test]
    fn verify_checksum_reports_both_values() {
        assert_eq!(verify_checksum(checksum(b"abc"), b"abc"), Ok(()));
        let err = verify_checksum(1, b"abc").unwrap_err();
        assert_eq!(err, ChecksumMismatch { stored: 1, computed: checksum(b"abc") });
        assert_eq!(err.to_string(), format!("checksum mismatch (stored 00000001, computed {:08x})", checksum(b"abc")));
    }

    on_both! {
    fn append_log_round_trip(e: &Env) {
        let dir = e.tempdir();
        let path = dir.path().join("log");
        let (mut log, got, cut) = open_all(e, &path);
        assert!(got.is_empty() && cut.is_none() && log.len_bytes() == 0);
        let p = payloads(5);
        let positions = log.append(&p[..2]).unwrap();
        assert_eq!(positions, vec![0, (RECORD_HEADER_BYTES + p[0].len()) as u64]);
        log.append(&p[2..]).unwrap();
        log.append::<Vec<u8>>(&[]).unwrap();
        assert_eq!(log.len_bytes(), e.len(&path));
        drop(log);
        let (log, got, cut) = open_all(e, &path);
        assert_eq!((got, cut), (p.clone(), None));

        // A refused append leaves nothing behind.
        let mut log = log;
        let before = log.len_bytes();
        let over = vec![0u8; RECORD_PAYLOAD_MAX_BYTES + 1];
        assert!(matches!(log.append(&[p[0].clone(), over]), Err(FileError::TooLarge { .. })));
        assert!(matches!(log.append(&[p[0].clone(), Vec::new()]), Err(FileError::EmptyRecord { .. })));
        assert_eq!(log.len_bytes(), before);
        assert_eq!(e.len(&path), before);
    }
    }

    on_both! {
    fn append_log_cuts_a_torn_tail_at_every_byte_of_the_last_record(e: &Env) {
        let dir = e.tempdir();
        let path = dir.path().join("log");
        let p = payloads(4);
        let (mut log, _, _) = open_all(e, &path);
        let positions = log.append(&p).unwrap();
        drop(log);
        let full = e.read(&path);
        let last = positions[3] as usize;
        for cut_at in last..full.len() {
            e.write(&path, &full[..cut_at]);
            let (mut log, got, cut) = open_all(e, &path);
            assert_eq!(got, p[..3], "cut at {cut_at}");
            assert_eq!(e.len(&path), last as u64, "cut at {cut_at}");
            let cut = cut.filter(|_| cut_at > last);
            if let Some(c) = cut {
                assert!(c.torn_tail && c.position == last as u64 && c.dropped_bytes == (cut_at - last) as u64);
            }
            // The log keeps working after the repair.
            log.append(&p[3..]).unwrap();
            drop(log);
            assert_eq!(e.read(&path), full, "cut at {cut_at}");
        }
    }
    }

    on_both! {
    fn append_log_cuts_a_flipped_bit_in_the_last_record_and_refuses_one_before_it(e: &Env) {
        let dir = e.tempdir();
        let path = dir.path().join("log");
        let p = payloads(4);
        let (mut log, _, _) = open_all(e, &path);
        let positions = log.append(&p).unwrap();
        drop(log);
        let full = e.read(&path);
        let last = positions.len() - 1;
        for (i, &start) in positions.iter().enumerate() {
            let end = positions.get(i + 1).map_or(full.len(), |&e| e as usize);
            for bit in (start as usize * 8..end * 8).step_by(5) {
                let mut bad = full.clone();
                bad[bit / 8] ^= 1 << (bit % 8);
                e.write(&path, &bad);
                match AppendLog::open(e.fs.clone(), &path, |_, _| Ok(())) {
                    Ok((_, cut)) => {
                        // Only the last record can be a torn write.
                        assert_eq!(i, last, "record {i} bit {bit}: damage before the end was cut");
                        let cut = cut.unwrap_or_else(|| panic!("record {i} bit {bit}: nothing cut"));
                        assert!(cut.torn_tail && cut.position == start);
                        assert_eq!(e.len(&path), start);
                    }
                    Err(FileError::Corrupt { reason, .. }) => {
                        assert!(reason.contains(&format!("damaged at byte {start}")), "record {i} bit {bit}: {reason}");
                        assert_eq!(e.read(&path), bad, "record {i} bit {bit}: left as it is");
                        // In the last record only a length field that shrank says damage.
                        assert!(i < last || bit / 8 < start as usize + 4, "record {i} bit {bit}");
                    }
                    Err(e) => panic!("record {i} bit {bit}: {e}"),
                }
            }
        }
    }
    }

    on_both! {
    fn append_log_cuts_zeros_and_refused_records(e: &Env) {
        let dir = e.tempdir();
        let path = dir.path().join("log");
        let p = payloads(3);
        let (mut log, _, _) = open_all(e, &path);
        log.append(&p).unwrap();
        let valid = log.len_bytes();
        drop(log);

        // What a file system may leave after a crash: the size grew, the data did not land.
        e.set_len(&path, valid + 4096);
        let (_, got, cut) = open_all(e, &path);
        assert_eq!(got, p);
        assert!(cut.unwrap().torn_tail);
        assert_eq!(e.len(&path), valid);

        // The caller refuses the second record while a valid third follows: damage, not
        // a crash; the open fails and the file stays as it is.
        let before = e.read(&path);
        let mut seen = 0;
        let refused = AppendLog::open(e.fs.clone(), &path, |_, _| {
            seen += 1;
            if seen == 2 {
                Err("out of sequence".to_string())
            } else {
                Ok(())
            }
        });
        assert!(matches!(&refused, Err(FileError::Corrupt { reason, .. }) if reason.contains("out of sequence")));
        assert_eq!(e.read(&path), before);

        // The caller refuses the last record: a torn tail, cut off.
        let mut seen = 0;
        let (log, cut) = AppendLog::open(e.fs.clone(), &path, |_, _| {
            seen += 1;
            if seen == 3 {
                Err("out of sequence".to_string())
            } else {
                Ok(())
            }
        })
        .unwrap();
        let cut = cut.unwrap();
        assert_eq!(cut.reason, "out of sequence");
        assert!(cut.torn_tail);
        assert_eq!(log.len_bytes(), (frame(&p[0]).len() + frame(&p[1]).len()) as u64);
    }
    }

    on_both! {
    fn append_log_truncate_and_drop_front(e: &Env) {
        let dir = e.tempdir();
        let path = dir.path().join("log");
        let p = payloads(6);
        let (mut log, _, _) = open_all(e, &path);
        let positions = log.append(&p).unwrap();
        log.truncate(positions[5]).unwrap();
        log.truncate(u64::MAX).unwrap();
        assert_eq!(e.len(&path), positions[5]);

        log.drop_front(positions[2]).unwrap();
        assert!(!e.exists(&tmp_path(&path)));
        assert_eq!(log.len_bytes(), positions[5] - positions[2]);
        // Appends and truncation keep working on the rewritten file.
        let again = log.append(&p[5..]).unwrap();
        assert_eq!(again, vec![positions[5] - positions[2]]);
        drop(log);
        let (mut log, got, cut) = open_all(e, &path);
        assert_eq!((got, cut), (p[2..].to_vec(), None));

        log.drop_front(0).unwrap();
        log.drop_front(log.len_bytes()).unwrap();
        assert_eq!(log.len_bytes(), 0);
        drop(log);
        let (_, got, _) = open_all(e, &path);
        assert!(got.is_empty());
    }
    }

    proptest! {
        #[test]
        fn record_round_trip(payload in proptest::collection::vec(any::<u8>(), 0..600), junk in proptest::collection::vec(any::<u8>(), 0..8)) {
            let mut buf = frame(&payload);
            let len = buf.len();
            buf.extend_from_slice(&junk);
            prop_assert_eq!(decode_record(&buf), Decoded::Record { payload: &payload[..], size: len });
            for cut in 0..len {
                let incomplete = matches!(decode_record(&buf[..cut]), Decoded::Incomplete { .. });
                prop_assert!(incomplete);
            }
        }

        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_record(&bytes);
            let _ = decode_record_file(&bytes);
        }

        /// Whatever prefix of a log survives a crash, opening it yields exactly the
        /// records that are complete in it, and the file is cut after the last one.
        #[test]
        fn append_log_keeps_the_complete_prefix(
            records in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..64), 1..8),
            cut_fraction in 0.0f64..=1.0,
            sim in any::<bool>(),
        ) {
            let env = if sim { Env::sim() } else { Env::real() };
            let e = &env;
            let dir = e.tempdir();
            let path = dir.path().join("log");
            let (mut log, _, _) = open_all(e, &path);
            let positions = log.append(&records).unwrap();
            let full_len = log.len_bytes();
            drop(log);
            let cut_at = (full_len as f64 * cut_fraction) as u64;
            e.set_len(&path, cut_at);
            let complete = positions
                .iter()
                .zip(records.iter())
                .take_while(|(&pos, r)| pos + (RECORD_HEADER_BYTES + r.len()) as u64 <= cut_at)
                .count();
            let (log, got, _) = open_all(e, &path);
            prop_assert_eq!(&got[..], &records[..complete]);
            let expected_len = positions.get(complete).copied().unwrap_or(full_len).min(cut_at);
            prop_assert_eq!(log.len_bytes(), expected_len);
            prop_assert_eq!(e.len(&path), expected_len);
        }
    }

    on_both! {
    fn a_locked_directory_refuses_a_second_owner_and_names_the_holder(e: &Env) {
        let dir = e.tempdir();
        let lock = lock_dir(&*e.fs, dir.path()).unwrap();
        assert_eq!(lock.dir(), dir.path());
        assert_eq!(e.read_to_string(&dir.path().join(LOCK_FILE)), format!("{}\n", std::process::id()));
        // A second open file in the same process conflicts like another process would.
        let err = lock_dir(&*e.fs, dir.path()).unwrap_err();
        let LockError::Held { dir: d, holder } = &err else { panic!("second lock: {err:?}") };
        assert_eq!((d.as_path(), *holder), (dir.path(), Some(std::process::id())));
        let message = err.to_string();
        assert!(message.contains(&dir.path().display().to_string()), "{message}");
        assert!(message.contains(&format!("PID {}", std::process::id())), "{message}");
        // The refused attempt left the holder's PID in place.
        assert_eq!(e.read_to_string(&dir.path().join(LOCK_FILE)), format!("{}\n", std::process::id()));
    }
    }

    on_both! {
    fn dropping_the_lock_releases_the_directory(e: &Env) {
        let dir = e.tempdir();
        // A stale PID left by an owner that died is not a lock.
        e.write(&dir.path().join(LOCK_FILE), "999999999\n");
        let first = lock_dir(&*e.fs, dir.path()).unwrap();
        drop(first);
        let again = lock_dir(&*e.fs, dir.path()).unwrap();
        assert!(matches!(lock_dir(&*e.fs, dir.path()), Err(LockError::Held { .. })));
        drop(again);
    }
    }

    on_both! {
    fn locking_a_missing_directory_names_the_lock_file(e: &Env) {
        let dir = e.tempdir();
        let missing = dir.path().join("missing");
        let err = lock_dir(&*e.fs, &missing).unwrap_err();
        assert!(err.to_string().contains(&missing.join(LOCK_FILE).display().to_string()), "{err}");
    }
    }
}
