//! Append-only segment files of message records.
//!
//! A [`Store`] owns one directory of segments. Each segment `<id>` (printed as 20
//! digits) is two files:
//!
//! - `<id>.seg`: a file header, record frames with consecutive offsets from 0, and, once
//!   sealed, a seal trailer with the record count and the crc32c of all record frames;
//! - `<id>.idx`: a sparse index, one entry (offset, file position, timestamp) every
//!   [`Config::index_interval_bytes`] of records, each entry checksummed. It is appended
//!   without fsync because it can always be rebuilt from the segment.
//!
//! The byte layouts are in [`codec`]. Writes are positional (`pwrite`) and reads too
//! (`pread`), so one [`SegmentWriter`] and any number of [`SegmentReader`]s share a file
//! without a seek position. Durability is explicit: [`SegmentWriter::append`] only
//! writes; [`Syncer::sync`] (fdatasync) makes everything appended so far durable, so a
//! group-commit task can fsync one batch while the next is being written.
//!
//! Recovery ([`Store::open`]): an unsealed segment is scanned; the first torn or corrupt
//! record and everything after it is cut off (and logged), never served; its index is
//! rebuilt from the scan. A sealed segment is trusted through its trailer (which carries
//! the segment's random nonce, so payload bytes cannot forge one); its index is checked
//! and rebuilt when missing or damaged.
//!
//! Quarantine: a segment whose header is damaged, whose seal trailer is recognisably
//! its own but damaged, or whose records the open-time checks find broken is not
//! served and does not stop the store from opening: its files are renamed aside
//! (`<name>.corrupt-<unix ms>`, kept for forensics) and reported by
//! [`Store::quarantined`]. [`Store::quarantine`] does the same for damage found later
//! (a read that failed its checksum), so the owner can fetch a good copy elsewhere.
//!
//! Every file operation goes through the [`fs::Fs`] in [`Config::fs`]: the operating
//! system's ([`fs::RealFs`], the default) or a simulated disk ([`sim::SimFs`]) that
//! drops what was not synced when told to lose power.
//!
//! [`durable`] holds the primitives every file of a node is made durable with (framed
//! checksummed records, append logs with torn-tail recovery, atomic replace, directory
//! fsync); the segment files use its checksums, payload limit, atomic replace (index
//! files) and directory helpers, and the broker uses it for its Raft log, meta files,
//! snapshot and node id.

use std::path::Path;
use std::sync::Arc;

pub mod codec;
pub mod durable;
mod error;
mod files;
pub mod fs;
mod open_files;
mod reader;
mod recover;
mod segment;
pub mod sim;
mod store;
mod writer;

pub use error::StorageError;
pub use reader::SegmentReader;
pub use store::{Quarantined, Store};
pub use writer::{SegmentWriter, Syncer};

/// Settings of a [`Store`].
#[derive(Clone, Debug)]
pub struct Config {
    /// Bytes of records between two sparse index entries. Smaller: faster seeks, a
    /// bigger index (28 bytes per entry).
    pub index_interval_bytes: u32,
    /// A writer reserves disk space (`fallocate`) at most this many bytes at a time
    /// ahead of its records (about as much as it has written, from 64 KiB), so that most appends do not grow the file: an `fdatasync` that must also
    /// commit a new file size to the filesystem journal takes about a third longer
    /// (measured on ext4). 0: no reservation. A crash leaves the reserved space as zeros
    /// after the last record, which recovery cuts off.
    pub preallocate_bytes: u64,
    /// Unsealed segments whose files (two descriptors each) stay open between writes;
    /// beyond it the least recently written ones whose records are all synced are
    /// closed, and opened again by their next write (0: no limit).
    pub open_segments_max: usize,
    /// The filesystem every file of the store is in: the operating system's by default.
    pub fs: Arc<dyn fs::Fs>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            index_interval_bytes: 4096,
            preallocate_bytes: 1 << 20,
            open_segments_max: 4096,
            fs: fs::RealFs::shared(),
        }
    }
}

/// One message as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub offset: u64,
    pub timestamp_ms: i64,
    pub payload: bytes::Bytes,
}

/// What the store knows about a segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentInfo {
    pub id: u64,
    /// Bytes of the `.seg` file: header, records and, when sealed, the trailer.
    pub size_bytes: u64,
    /// Offset the next record gets (= number of records: offsets start at 0).
    pub next_offset: u64,
    pub sealed: bool,
    /// crc32c of all record frames of the file (the seal trailer's value when sealed;
    /// the records appended so far otherwise).
    pub checksum: u32,
}

fn segment_file_name(id: u64) -> String {
    format!("{id:020}.seg")
}

fn index_file_name(id: u64) -> String {
    format!("{id:020}.idx")
}

/// The segment id of a `<20 digits>.seg` file name.
fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// fsyncs a directory ([`durable::fsync_dir`]), making file creations, renames and
/// removals in it durable.
fn fsync_dir(fs: &dyn fs::Fs, dir: &Path) -> Result<(), StorageError> {
    durable::fsync_dir(fs, dir).map_err(StorageError::from_file)
}

#[cfg(test)]
mod test_env;
#[cfg(test)]
mod tests;
