//! The directory of segments.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::durable;
use crate::fs::Fs;
use crate::open_files::OpenFiles;
use crate::reader::SegmentReader;
use crate::segment::Segment;
use crate::writer::SegmentWriter;
use crate::{
    fsync_dir, index_file_name, parse_segment_file_name, recover, segment_file_name, Config, SegmentInfo, StorageError,
};

/// A segment set aside because its files are damaged: it is no longer listed, read or
/// written; its bytes stay in `files` for whoever investigates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quarantined {
    pub id: u64,
    /// The segment file, and its index when there was one, as renamed:
    /// `<name>.corrupt-<unix ms>`.
    pub files: Vec<PathBuf>,
    /// What was found wrong.
    pub reason: String,
}

/// The segments of one directory. Cheap to clone (shared); `Send + Sync`.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    config: Config,
    open_files: Arc<OpenFiles>,
    segments: Mutex<BTreeMap<u64, Arc<Segment>>>,
    quarantined: Mutex<Vec<Quarantined>>,
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
    /// A segment that is damaged beyond a torn tail (its header, its seal trailer, or
    /// sealed records that the open-time checks read) is quarantined: renamed aside,
    /// logged, left out of the store and listed by [`Store::quarantined`].
    pub fn open(dir: &Path, config: Config) -> Result<Store, StorageError> {
        let fs = &*config.fs;
        durable::create_dir_durable(fs, dir).map_err(StorageError::from_file)?;
        let mut ids = Vec::new();
        let mut index_files = Vec::new();
        for name in fs.read_dir(dir).map_err(|e| StorageError::io(dir, e))? {
            let Some(name) = name.to_str() else { continue };
            if let Some(id) = parse_segment_file_name(name) {
                ids.push(id);
            } else if let Some(stem) = name.strip_suffix(".idx") {
                index_files.push((stem.to_owned(), dir.join(name)));
            } else if name.strip_suffix(durable::TMP_SUFFIX).is_some_and(|n| n.ends_with(".idx")) {
                // An index rebuild cut short.
                remove_file(fs, &dir.join(name))?;
            }
        }
        ids.sort_unstable();
        // An index without its segment: a deletion cut short.
        for (stem, path) in index_files {
            let segment_name = format!("{stem}.seg");
            if parse_segment_file_name(&segment_name).is_some_and(|id| ids.binary_search(&id).is_err()) {
                tracing::info!(file = %path.display(), "removing the index of a deleted segment");
                remove_file(fs, &path)?;
            }
        }
        let mut segments = BTreeMap::new();
        let mut quarantined = Vec::new();
        let open_files = Arc::new(OpenFiles::new(config.open_segments_max));
        for id in ids {
            match recover::recover(dir, id, &config, &open_files) {
                Ok(seg) => {
                    let seg = Arc::new(seg);
                    // Unsealed segments come back with open files; the oldest close
                    // beyond the limit.
                    seg.pinned_used();
                    segments.insert(id, seg);
                }
                // One damaged file must not take the other segments (and the node) down
                // with it; its bytes are kept rather than guessed at, and a copy from
                // elsewhere can take its place.
                Err(e @ StorageError::Corrupt { .. }) => quarantined.push(set_aside(fs, dir, id, e.to_string())?),
                Err(e) => return Err(e),
            }
        }
        tracing::debug!(dir = %dir.display(), segments = segments.len(), quarantined = quarantined.len(),
            "segment store opened");
        Ok(Store {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                config,
                open_files,
                segments: Mutex::new(segments),
                quarantined: Mutex::new(quarantined),
            }),
        })
    }

    /// Unsealed segments whose files are held open now ([`Config::open_segments_max`]).
    #[cfg(test)]
    pub(crate) fn open_segments(&self) -> usize {
        self.inner.open_files.open_count()
    }

    /// Whether the segment's files are held open between writes.
    #[cfg(test)]
    pub(crate) fn holds_files_of(&self, id: u64) -> bool {
        self.get(id).is_ok_and(|s| s.is_pinned())
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

    /// The segments set aside as damaged since the store was opened (at the open and by
    /// [`Store::quarantine`]), oldest first.
    pub fn quarantined(&self) -> Vec<Quarantined> {
        self.inner.quarantined.lock().unwrap_or_else(PoisonError::into_inner).clone()
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
        let seg = Arc::new(recover::create(&self.inner.config.fs, &self.inner.dir, id, &self.inner.open_files)?);
        seg.state().writer_live = true;
        let files = seg.files_rw()?;
        segments.insert(id, seg.clone());
        Ok(SegmentWriter::new(seg, files, &self.inner.config))
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
        match seg.files_rw() {
            Ok(files) => Ok(SegmentWriter::new(seg, files, &self.inner.config)),
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
        let fs = &*self.inner.config.fs;
        // The segment first: an index left behind by a crash is removed on open.
        remove_file(fs, &seg.seg_path)?;
        seg.state().deleted = true;
        segments.remove(&id);
        seg.unpin();
        remove_file(fs, &seg.idx_path)?;
        fsync_dir(fs, &self.inner.dir)
    }

    /// Sets a damaged segment aside (e.g. a read failed its checksum): from now on it is
    /// not listed and cannot be read or written, so the id is free for a good copy; its
    /// files are renamed, not removed. Readers that exist keep their open files; a live
    /// writer gets `NotFound`. On an error the segment is out of service all the same,
    /// but its files may still have their names.
    pub fn quarantine(&self, id: u64, reason: &str) -> Result<Quarantined, StorageError> {
        let mut segments = self.segments();
        let seg = segments.remove(&id).ok_or(StorageError::NotFound { id })?;
        seg.state().deleted = true;
        seg.unpin();
        let q = set_aside(&*self.inner.config.fs, &self.inner.dir, id, reason.to_string())?;
        drop(segments);
        self.inner.quarantined.lock().unwrap_or_else(PoisonError::into_inner).push(q.clone());
        Ok(q)
    }
}

/// Renames a segment's files to `<name>.corrupt-<unix ms>` (durably), which nothing in
/// the store opens again.
fn set_aside(fs: &dyn Fs, dir: &Path, id: u64, reason: String) -> Result<Quarantined, StorageError> {
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
    let original = dir.join(segment_file_name(id));
    let mut files = Vec::new();
    // The segment first: an index left behind by a crash is removed on open.
    for name in [segment_file_name(id), index_file_name(id)] {
        let from = dir.join(&name);
        let mut to = dir.join(format!("{name}.corrupt-{stamp}"));
        let mut n = 1;
        while fs.exists(&to) {
            to = dir.join(format!("{name}.corrupt-{stamp}-{n}"));
            n += 1;
        }
        match fs.rename(&from, &to) {
            Ok(()) => files.push(to),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(StorageError::io(&from, e)),
        }
    }
    fsync_dir(fs, dir)?;
    tracing::error!(id, file = %original.display(), moved_to = ?files, %reason,
        "SEGMENT IS DAMAGED: quarantined (its files are kept aside and never served)");
    Ok(Quarantined { id, files, reason })
}

fn remove_file(fs: &dyn Fs, path: &Path) -> Result<(), StorageError> {
    match fs.remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StorageError::io(path, e)),
    }
}
