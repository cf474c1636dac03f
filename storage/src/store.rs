//! The directory of segments.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::reader::SegmentReader;
use crate::segment::Segment;
use crate::writer::SegmentWriter;
use crate::{fsync_dir, parse_segment_file_name, recover, Config, SegmentInfo, StorageError};

/// The segments of one directory. Cheap to clone (shared); `Send + Sync`.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    config: Config,
    segments: Mutex<BTreeMap<u64, Arc<Segment>>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("dir", &self.inner.dir).finish()
    }
}

impl Store {
    /// Opens `dir` (creating it) and recovers every segment in it: unsealed segments
    /// are scanned and a torn or corrupt tail is cut off (logged), never served; sealed
    /// ones are trusted through their seal trailer. Indexes are rebuilt where needed.
    /// A segment whose header is damaged fails the open with [`StorageError::Corrupt`].
    pub fn open(dir: &Path, config: Config) -> Result<Store, StorageError> {
        if !dir.is_dir() {
            fs::create_dir_all(dir).map_err(|e| StorageError::io(dir, e))?;
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                fsync_dir(parent)?;
            }
        }
        let mut ids = Vec::new();
        let mut index_files = Vec::new();
        for entry in fs::read_dir(dir).map_err(|e| StorageError::io(dir, e))? {
            let entry = entry.map_err(|e| StorageError::io(dir, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(id) = parse_segment_file_name(name) {
                ids.push(id);
            } else if let Some(stem) = name.strip_suffix(".idx") {
                index_files.push((stem.to_owned(), entry.path()));
            } else if name.ends_with(".idx.tmp") {
                // An index rebuild cut short.
                remove_file(&entry.path())?;
            }
        }
        ids.sort_unstable();
        // An index without its segment: a deletion cut short.
        for (stem, path) in index_files {
            let segment_name = format!("{stem}.seg");
            if parse_segment_file_name(&segment_name).is_some_and(|id| ids.binary_search(&id).is_err()) {
                tracing::info!(file = %path.display(), "removing the index of a deleted segment");
                remove_file(&path)?;
            }
        }
        let mut segments = BTreeMap::new();
        for id in ids {
            segments.insert(id, Arc::new(recover::recover(dir, id, &config)?));
        }
        tracing::debug!(dir = %dir.display(), segments = segments.len(), "segment store opened");
        Ok(Store { inner: Arc::new(Inner { dir: dir.to_path_buf(), config, segments: Mutex::new(segments) }) })
    }

    /// The directory of the store.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    fn segments(&self) -> MutexGuard<'_, BTreeMap<u64, Arc<Segment>>> {
        self.inner.segments.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn get(&self, id: u64) -> Result<Arc<Segment>, StorageError> {
        self.segments().get(&id).cloned().ok_or(StorageError::NotFound { id })
    }

    /// Every segment, by id.
    pub fn list(&self) -> Vec<SegmentInfo> {
        self.segments().values().map(|s| s.info()).collect()
    }

    pub fn info(&self, id: u64) -> Option<SegmentInfo> {
        self.segments().get(&id).map(|s| s.info())
    }

    /// Creates a new, empty segment (durably) and returns its writer.
    pub fn create(&self, id: u64) -> Result<SegmentWriter, StorageError> {
        let mut segments = self.segments();
        if segments.contains_key(&id) {
            return Err(StorageError::AlreadyExists { id });
        }
        let seg = Arc::new(recover::create(&self.inner.dir, id)?);
        seg.state().writer_live = true;
        let files = seg.files()?;
        segments.insert(id, seg.clone());
        Ok(SegmentWriter::new(seg, files, self.inner.config.index_interval_bytes))
    }

    /// The writer of an existing unsealed segment (e.g. after a restart). At most one
    /// writer lives per segment.
    pub fn writer(&self, id: u64) -> Result<SegmentWriter, StorageError> {
        let seg = self.get(id)?;
        {
            let mut s = seg.state();
            if s.sealed {
                return Err(StorageError::Sealed { id });
            }
            if s.writer_live {
                return Err(StorageError::WriterBusy { id });
            }
            s.writer_live = true;
        }
        match seg.files() {
            Ok(files) => Ok(SegmentWriter::new(seg, files, self.inner.config.index_interval_bytes)),
            Err(e) => {
                seg.state().writer_live = false;
                Err(e)
            }
        }
    }

    /// A reader of the segment (sealed or not). Cheap; many may exist at once.
    pub fn reader(&self, id: u64) -> Result<SegmentReader, StorageError> {
        let seg = self.get(id)?;
        let files = seg.files()?;
        Ok(SegmentReader::new(seg, files))
    }

    /// Removes the segment's files (durably). Readers that exist keep reading the
    /// removed files; a live writer gets `NotFound` from then on.
    pub fn delete(&self, id: u64) -> Result<(), StorageError> {
        let mut segments = self.segments();
        let seg = segments.get(&id).cloned().ok_or(StorageError::NotFound { id })?;
        // The segment first: an index left behind by a crash is removed on open.
        remove_file(&seg.seg_path)?;
        seg.state().deleted = true;
        segments.remove(&id);
        seg.unpin();
        remove_file(&seg.idx_path)?;
        fsync_dir(&self.inner.dir)
    }
}

fn remove_file(path: &Path) -> Result<(), StorageError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StorageError::io(path, e)),
    }
}
