//! The shared state of one segment: what its writer has published and how to reach its
//! files.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};

use crate::codec::{FILE_HEADER_LEN, TRAILER_LEN};
use crate::files::Files;
use crate::fs::{Fs, OpenMode};
use crate::open_files::OpenFiles;
use crate::{SegmentInfo, StorageError};

/// What readers, syncers and the store see of a segment. Only the writer changes it,
/// after its bytes are in the files, so a snapshot never points at unwritten bytes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SegState {
    /// End of the last record frame (= file length of an unsealed segment).
    pub len: u64,
    pub next_offset: u64,
    /// crc32c of the record frames `[FILE_HEADER_LEN, len)`.
    pub checksum: u32,
    /// Complete entries in the index file.
    pub idx_count: u64,
    /// Position of the record of the last index entry (`FILE_HEADER_LEN` without one).
    pub last_index_pos: u64,
    pub sealed: bool,
    pub writer_live: bool,
    pub deleted: bool,
    /// `len` at the end of the last completed fdatasync (skips syncs with nothing new).
    pub synced_len: u64,
    /// Number of truncations so far: a sync that started before one must not record
    /// its (longer) length as synced.
    pub truncations: u64,
}

impl SegState {
    pub fn empty() -> Self {
        let start = FILE_HEADER_LEN as u64;
        SegState {
            len: start,
            next_offset: 0,
            checksum: 0,
            idx_count: 0,
            last_index_pos: start,
            sealed: false,
            writer_live: false,
            deleted: false,
            synced_len: start,
            truncations: 0,
        }
    }
}

pub(crate) struct Segment {
    /// The filesystem of the store (sealed segments' files are opened on demand).
    pub fs: Arc<dyn Fs>,
    pub id: u64,
    pub nonce: u64,
    pub seg_path: PathBuf,
    pub idx_path: PathBuf,
    state: Mutex<SegState>,
    /// Open files. Pinned while the segment is unsealed and written (its writer and
    /// readers share them), up to the store's [`OpenFiles`] limit; a sealed segment's
    /// files, and an idle one's beyond the limit, are opened on demand and closed with
    /// the last reader, so a node with thousands of segments does not hold their
    /// descriptors.
    files: Mutex<FileSlot>,
    open_files: Arc<OpenFiles>,
    /// Shared by reads, exclusive for truncation: a read never sees the file cut under it.
    shrink: RwLock<()>,
    /// Where recent reads ended. A sequential reader (a replication stream, a consumer
    /// group) starts its next read exactly there and skips the index search, which
    /// costs one `pread` per step of a binary search.
    hints: Mutex<Hints>,
}

/// Number of read positions remembered per segment: about one per concurrent
/// sequential reader (replicas of an open segment, consumer groups).
const READ_HINTS: usize = 8;

/// A record's offset and the file position of its frame, valid while the segment has
/// had `truncations` truncations.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ReadHint {
    pub offset: u64,
    pub position: u64,
    pub truncations: u64,
}

#[derive(Default)]
struct Hints {
    slots: [Option<ReadHint>; READ_HINTS],
    next: usize,
}

struct FileSlot {
    pinned: Option<Arc<Files>>,
    cached: Weak<Files>,
}

impl Segment {
    /// `paths`: the segment file's and the index file's.
    pub fn new(
        fs: Arc<dyn Fs>,
        id: u64,
        nonce: u64,
        (seg_path, idx_path): (PathBuf, PathBuf),
        state: SegState,
        pinned: Option<Arc<Files>>,
        open_files: Arc<OpenFiles>,
    ) -> Self {
        let cached = pinned.as_ref().map(Arc::downgrade).unwrap_or_default();
        Segment {
            fs,
            id,
            nonce,
            seg_path,
            idx_path,
            state: Mutex::new(state),
            files: Mutex::new(FileSlot { pinned, cached }),
            open_files,
            shrink: RwLock::new(()),
            hints: Mutex::default(),
        }
    }

    /// The remembered position of the record `offset`, if a read ended there since the
    /// last truncation.
    pub fn hint(&self, offset: u64, truncations: u64) -> Option<ReadHint> {
        let hints = self.hints.lock().unwrap_or_else(PoisonError::into_inner);
        hints.slots.iter().flatten().find(|h| h.offset == offset && h.truncations == truncations).copied()
    }

    /// Remembers where a read ended (replacing the same offset's or the oldest entry).
    pub fn remember(&self, hint: ReadHint) {
        let mut hints = self.hints.lock().unwrap_or_else(PoisonError::into_inner);
        let slot = match hints.slots.iter().position(|h| h.is_some_and(|h| h.offset == hint.offset)) {
            Some(i) => i,
            None => {
                let i = hints.next;
                hints.next = (i + 1) % READ_HINTS;
                i
            }
        };
        hints.slots[slot] = Some(hint);
    }

    pub fn state(&self) -> MutexGuard<'_, SegState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn snapshot(&self) -> SegState {
        *self.state()
    }

    pub fn read_guard(&self) -> RwLockReadGuard<'_, ()> {
        self.shrink.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn write_guard(&self) -> RwLockWriteGuard<'_, ()> {
        self.shrink.write().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn info(&self) -> SegmentInfo {
        let s = self.snapshot();
        SegmentInfo {
            id: self.id,
            size_bytes: if s.sealed { s.len + TRAILER_LEN as u64 } else { s.len },
            next_offset: s.next_offset,
            sealed: s.sealed,
            checksum: s.checksum,
        }
    }

    /// The segment's files: the pinned or a reader's still open ones, else opened now
    /// (read-only: only unsealed segments, whose files are pinned, are written).
    pub fn files(&self) -> Result<Arc<Files>, StorageError> {
        let mut slot = self.files.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(files) = slot.pinned.clone().or_else(|| slot.cached.upgrade()) {
            return Ok(files);
        }
        let seg = self.fs.open(&self.seg_path, OpenMode::Read).map_err(|e| StorageError::io(&self.seg_path, e))?;
        let idx = match self.fs.open(&self.idx_path, OpenMode::Read) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!(id = self.id, path = %self.idx_path.display(), error = %e,
                    "cannot open the segment index; reads scan from the start of the segment");
                None
            }
        };
        let files = Arc::new(Files { seg, seg_path: self.seg_path.clone(), idx, idx_path: self.idx_path.clone() });
        slot.cached = Arc::downgrade(&files);
        Ok(files)
    }

    /// The files, to write: the pinned ones, else opened for writing and pinned again
    /// (they were closed as idle). Counts as a use for [`OpenFiles`].
    pub fn files_rw(self: &Arc<Self>) -> Result<Arc<Files>, StorageError> {
        let files = {
            let mut slot = self.files.lock().unwrap_or_else(PoisonError::into_inner);
            match slot.pinned.clone() {
                Some(files) => files,
                None => {
                    let open =
                        |path: &PathBuf| self.fs.open(path, OpenMode::ReadWrite).map_err(|e| StorageError::io(path, e));
                    let files = Arc::new(Files {
                        seg: open(&self.seg_path)?,
                        seg_path: self.seg_path.clone(),
                        idx: Some(open(&self.idx_path)?),
                        idx_path: self.idx_path.clone(),
                    });
                    slot.pinned = Some(files.clone());
                    slot.cached = Arc::downgrade(&files);
                    files
                }
            }
        };
        self.open_files.used(self.id, Arc::downgrade(self));
        Ok(files)
    }

    #[cfg(test)]
    pub fn is_pinned(&self) -> bool {
        self.files.lock().unwrap_or_else(PoisonError::into_inner).pinned.is_some()
    }

    /// Marks pinned files as used ([`OpenFiles`]), e.g. when the store opens.
    pub fn pinned_used(self: &Arc<Self>) {
        if self.files.lock().unwrap_or_else(PoisonError::into_inner).pinned.is_some() {
            self.open_files.used(self.id, Arc::downgrade(self));
        }
    }

    /// Closes the files (readers that have them keep them) unless records written
    /// through them are not synced yet; whether they are closed now.
    pub fn close_if_idle(&self) -> bool {
        let s = self.state();
        if !s.sealed && !s.deleted && s.synced_len != s.len {
            return false;
        }
        self.files.lock().unwrap_or_else(PoisonError::into_inner).pinned = None;
        true
    }

    /// Stops pinning the files (after sealing or deletion).
    pub fn unpin(&self) {
        self.files.lock().unwrap_or_else(PoisonError::into_inner).pinned = None;
        self.open_files.forget(self.id);
    }
}
