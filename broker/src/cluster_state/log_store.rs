//! Durable Raft log storage for the cluster state.
//!
//! Layout of the directory given to [`LogStore::open`]:
//!
//! - `log`: an append log (`eventtermq_storage::durable::AppendLog`) of records
//!   `[u32 len LE][u32 crc32c LE of payload][payload]`, where the payload is the JSON of
//!   one `Entry`. Records have contiguous indexes. The file may still hold records at or
//!   below the purge point until it is compacted.
//! - `vote`, `committed`, `purged`: record files (one record each, same framing, JSON
//!   payload of an `Option<Vote>` / `Option<LogId>`), replaced atomically (tmp file,
//!   fsync, rename, fsync of the directory); `committed` without the fsyncs.
//!
//! The framing, torn-tail recovery, atomic replace and directory fsyncs are the storage
//! crate's durable-file module; this file keeps what is Raft's: entries and their
//! indexes, contiguity, purge and compaction, the in-memory map.
//!
//! Everything is on disk (fsynced) before it is acknowledged. On open the log is read
//! sequentially; the first torn or corrupt record, or one that is not the next entry,
//! and everything after it is dropped (the file is truncated there) and never served:
//! Raft re-replicates it from the leader.
//!
//! All non-purged entries are also kept in memory for reads: the control-plane log is
//! small because snapshots purge it.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use eventtermq_storage::durable::{self, AppendLog, FileError};
use eventtermq_storage::fs::{Fs, RealFs};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{AnyError, ErrorSubject, ErrorVerb, OptionalSend, RaftLogReader, StorageIOError, Vote};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::model::NodeId;
use super::raft::{LogId, StorageError, TypeConfig};

type Entry = openraft::Entry<TypeConfig>;

const LOG_FILE: &str = "log";
const VOTE_FILE: &str = "vote";
const COMMITTED_FILE: &str = "committed";
const PURGED_FILE: &str = "purged";

// ---------------------------------------------------------------------------------------
// Small atomically replaced files
// ---------------------------------------------------------------------------------------

fn write_meta<T: Serialize>(fs: &dyn Fs, dir: &Path, name: &str, value: &T) -> io::Result<()> {
    let payload = serde_json::to_vec(value).map_err(io::Error::other)?;
    Ok(durable::write_record_file(fs, &dir.join(name), &payload)?)
}

/// Like [`write_meta`] but without fsync: for hints whose loss is harmless.
fn write_meta_nosync<T: Serialize>(fs: &dyn Fs, dir: &Path, name: &str, value: &T) -> io::Result<()> {
    let payload = serde_json::to_vec(value).map_err(io::Error::other)?;
    Ok(durable::write_record_file_unsynced(fs, &dir.join(name), &payload)?)
}

/// Reads a file written by [`write_meta`]; a missing file is `None`. These files are
/// replaced atomically, so any damage is real corruption and an error.
fn read_meta<T: DeserializeOwned>(fs: &dyn Fs, dir: &Path, name: &str) -> Result<Option<T>, String> {
    let path = dir.join(name);
    let bytes = match durable::read_replaced_file(fs, &path) {
        Ok(Some(b)) => b,
        Ok(None) => return Ok(None),
        Err(e) => return Err(format!("reading {}: {e}", path.display())),
    };
    decode_meta(&bytes, &path).map(Some)
}

/// Decodes the bytes of a file written by `write_meta`: one framed record
/// ([`durable::decode_record_file`]) holding JSON (`path` is only used in messages).
/// Never panics, whatever the bytes.
pub fn decode_meta<T: DeserializeOwned>(bytes: &[u8], path: &Path) -> Result<T, String> {
    let payload = durable::decode_record_file(bytes).map_err(|e| format!("{} is corrupt: {e}", path.display()))?;
    serde_json::from_slice(payload).map_err(|e| format!("{} is corrupt: undecodable content: {e}", path.display()))
}

fn io_err(subject: ErrorSubject<NodeId>, verb: ErrorVerb, e: &(impl std::error::Error + 'static)) -> StorageError {
    StorageIOError::new(subject, verb, AnyError::new(e)).into()
}

fn msg_err(subject: ErrorSubject<NodeId>, verb: ErrorVerb, msg: impl ToString) -> StorageError {
    StorageIOError::new(subject, verb, AnyError::error(msg)).into()
}

// ---------------------------------------------------------------------------------------
// The log file
// ---------------------------------------------------------------------------------------

/// The `log` file and the position of each record in it.
struct LogFile {
    log: AppendLog,
    /// Index -> byte offset of every record in the file, purged ones included until the
    /// file is compacted.
    offsets: BTreeMap<u64, u64>,
}

impl LogFile {
    fn last_index(&self) -> Option<u64> {
        self.offsets.last_key_value().map(|(i, _)| *i)
    }

    /// Drops every record, keeping an empty file.
    fn clear(&mut self) -> io::Result<()> {
        self.log.truncate(0)?;
        self.offsets.clear();
        Ok(())
    }

    /// Appends encoded entries (`(index, payload)`, contiguous) and fsyncs once.
    /// `purged` is the last purged index: a gap after a fully purged file is fine (the
    /// purge point moved past the last entry), any other gap is refused.
    fn append(&mut self, records: &[(u64, Vec<u8>)], purged: Option<u64>) -> io::Result<()> {
        let Some(&(first, _)) = records.first() else { return Ok(()) };
        if let Some(last) = self.last_index() {
            if first != last + 1 {
                if purged.is_some_and(|p| last <= p && first > p) {
                    self.clear()?;
                } else {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("non-contiguous append: entry {first} after {last}"),
                    ));
                }
            }
        }
        for (expected, (index, _)) in (first..).zip(records) {
            if *index != expected {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("non-contiguous append: entry {index} where {expected} was expected"),
                ));
            }
        }
        let payloads: Vec<&[u8]> = records.iter().map(|(_, payload)| payload.as_slice()).collect();
        let positions = self.log.append(&payloads)?;
        self.offsets.extend(records.iter().map(|(index, _)| *index).zip(positions));
        Ok(())
    }

    /// Removes the records with index >= `index`.
    fn truncate_from(&mut self, index: u64) -> io::Result<()> {
        let Some((_, &offset)) = self.offsets.range(index..).next() else { return Ok(()) };
        self.log.truncate(offset)?;
        self.offsets.split_off(&index);
        Ok(())
    }

    /// Reclaims the space of records with index <= `purged`: the file is emptied when
    /// nothing else is in it, and rewritten without them when they are more than half
    /// of it.
    fn compact(&mut self, purged: u64) -> io::Result<()> {
        let len = self.log.len_bytes();
        let keep_from = match purged.checked_add(1) {
            Some(next) => self.offsets.range(next..).next().map_or(len, |(_, &o)| o),
            None => len,
        };
        if keep_from == 0 {
            return Ok(());
        }
        if keep_from >= len {
            return self.clear();
        }
        if keep_from * 2 <= len {
            return Ok(());
        }
        self.log.drop_front(keep_from)?;
        let kept = self.offsets.split_off(&(purged + 1));
        self.offsets = kept.into_iter().map(|(i, o)| (i, o - keep_from)).collect();
        tracing::debug!(purged, reclaimed_bytes = keep_from, "compacted the raft log file");
        Ok(())
    }
}

/// Reads the log file, truncating a torn or corrupt tail, or the first entry that does
/// not decode or follow its predecessor. Returns the file and the entries above `purged`.
fn load_log(fs: Arc<dyn Fs>, dir: &Path, purged: Option<u64>) -> Result<(LogFile, BTreeMap<u64, Entry>), FileError> {
    let mut offsets = BTreeMap::new();
    let mut entries = BTreeMap::new();
    let mut prev: Option<u64> = None;
    let (log, cut) = AppendLog::open(fs, &dir.join(LOG_FILE), |pos, payload| {
        let entry: Entry = serde_json::from_slice(payload).map_err(|e| format!("undecodable entry: {e}"))?;
        let index = entry.log_id.index;
        if let Some(p) = prev {
            if Some(index) != p.checked_add(1) {
                return Err(format!("non-contiguous index {index} after {p}"));
            }
        }
        prev = Some(index);
        offsets.insert(index, pos);
        if purged.is_none_or(|p| index > p) {
            entries.insert(index, entry);
        }
        Ok(())
    })?;
    // Damage before the end fails the open above (`AppendLog::open`); what is cut here
    // is a torn tail: entries a crash left half written, never acknowledged.
    let _ = cut;
    Ok((LogFile { log, offsets }, entries))
}

// ---------------------------------------------------------------------------------------
// LogStore
// ---------------------------------------------------------------------------------------

type SharedEntries = Arc<RwLock<BTreeMap<u64, Entry>>>;

/// The Raft log, vote, committed and purged log ids of this node, on disk.
pub struct LogStore {
    fs: Arc<dyn Fs>,
    dir: PathBuf,
    disk: Arc<Mutex<LogFile>>,
    entries: SharedEntries,
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId>,
    last_purged: Option<LogId>,
}

/// Cheap cloneable reader of the log entries held by a [`LogStore`].
#[derive(Clone)]
pub struct LogStoreReader {
    entries: SharedEntries,
}

impl LogStore {
    /// Opens (creating it if missing) the log storage in `dir`, e.g. `<data>/raft`.
    #[allow(clippy::result_large_err)] // openraft's error type
    pub async fn open(dir: &Path) -> Result<LogStore, StorageError> {
        Self::open_in(RealFs::shared(), dir).await
    }

    /// [`LogStore::open`] on the filesystem `fs` (a node's `NodeConfig::fs`).
    #[allow(clippy::result_large_err)] // openraft's error type
    pub async fn open_in(fs: Arc<dyn Fs>, dir: &Path) -> Result<LogStore, StorageError> {
        let dir = dir.to_path_buf();
        crate::clock::spawn_blocking(move || Self::open_blocking(fs, dir))
            .await
            .map_err(|e| msg_err(ErrorSubject::Store, ErrorVerb::Read, format!("opening the raft log: {e}")))?
    }

    #[allow(clippy::result_large_err)] // openraft's error type
    fn open_blocking(fs: Arc<dyn Fs>, dir: PathBuf) -> Result<LogStore, StorageError> {
        let read_err = |e: FileError| io_err(ErrorSubject::Store, ErrorVerb::Read, &e);
        durable::create_dir_durable(&*fs, &dir).map_err(read_err)?;
        // Reading the meta files and opening the log fsync the directory, so a rename or
        // creation that a crash left in the page cache only is durable before it counts.
        let vote: Option<Vote<NodeId>> = read_meta::<Option<Vote<NodeId>>>(&*fs, &dir, VOTE_FILE)
            .map_err(|m| msg_err(ErrorSubject::Vote, ErrorVerb::Read, m))?
            .flatten();
        // The committed marker is a hint written without fsync (see `save_committed`):
        // a damaged one is dropped, which only means re-learning the commit point.
        let mut committed: Option<LogId> = read_meta::<Option<LogId>>(&*fs, &dir, COMMITTED_FILE)
            .unwrap_or_else(|m| {
                tracing::warn!(reason = %m, "ignoring the damaged committed marker");
                None
            })
            .flatten();
        let last_purged: Option<LogId> = read_meta::<Option<LogId>>(&*fs, &dir, PURGED_FILE)
            .map_err(|m| msg_err(ErrorSubject::Store, ErrorVerb::Read, m))?
            .flatten();

        let (mut log, entries) = load_log(fs.clone(), &dir, last_purged.map(|l| l.index)).map_err(read_err)?;
        if let Some(p) = last_purged {
            // Finishes a compaction that a crash may have interrupted.
            log.compact(p.index).map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Write, &e))?;
            if let Some((&first, _)) = entries.first_key_value() {
                if p.index.checked_add(1) != Some(first) {
                    tracing::warn!(purged = p.index, first, "raft log does not start right after the purge point");
                }
            }
        }

        // The tail of the log may have been dropped above; never claim more committed
        // than what is there.
        let last_log_id = entries.last_key_value().map(|(_, e)| e.log_id).or(last_purged);
        if let Some(c) = committed {
            if last_log_id.is_none_or(|l| l.index < c.index) {
                tracing::warn!(
                    committed = %c,
                    last_log_id = ?last_log_id,
                    "persisted committed log id is past the end of the log; lowering it"
                );
                committed = last_log_id;
            }
        }

        Ok(LogStore {
            fs,
            dir,
            disk: Arc::new(Mutex::new(log)),
            entries: Arc::new(RwLock::new(entries)),
            vote,
            committed,
            last_purged,
        })
    }

    /// Runs `f` on the log file in a blocking thread.
    async fn with_disk<T, F>(&self, f: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut LogFile) -> io::Result<T> + Send + 'static,
    {
        let disk = self.disk.clone();
        crate::clock::spawn_blocking(move || {
            let mut guard = disk.lock().unwrap_or_else(PoisonError::into_inner);
            f(&mut guard)
        })
        .await
        .map_err(io::Error::other)?
    }

    /// Replaces a small metadata file in a blocking thread.
    async fn save_meta<T: Serialize + Send + 'static>(&self, name: &'static str, value: T) -> io::Result<()> {
        let (fs, dir) = (self.fs.clone(), self.dir.clone());
        crate::clock::spawn_blocking(move || write_meta(&*fs, &dir, name, &value)).await.map_err(io::Error::other)?
    }

    fn reader(&self) -> LogStoreReader {
        LogStoreReader { entries: self.entries.clone() }
    }

    fn entries_write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<u64, Entry>> {
        self.entries.write().unwrap_or_else(PoisonError::into_inner)
    }
}

impl LogStoreReader {
    fn read_range(&self, start: Bound<&u64>, end: Bound<&u64>) -> Vec<Entry> {
        let start = match start {
            Bound::Included(s) => Some(*s),
            Bound::Excluded(s) => s.checked_add(1),
            Bound::Unbounded => Some(0),
        };
        let Some(start) = start else { return Vec::new() };
        let end = match end {
            Bound::Included(e) => e.checked_add(1),
            Bound::Excluded(e) => Some(*e),
            Bound::Unbounded => None,
        };
        let entries = self.entries.read().unwrap_or_else(PoisonError::into_inner);
        match end {
            Some(end) if start >= end => Vec::new(),
            Some(end) => entries.range(start..end).map(|(_, e)| e.clone()).collect(),
            None => entries.range(start..).map(|(_, e)| e.clone()).collect(),
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStoreReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        Ok(self.read_range(range.start_bound(), range.end_bound()))
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        Ok(self.reader().read_range(range.start_bound(), range.end_bound()))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStoreReader;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last = self.entries.read().unwrap_or_else(PoisonError::into_inner).last_key_value().map(|(_, e)| e.log_id);
        Ok(LogState { last_purged_log_id: self.last_purged, last_log_id: last.or(self.last_purged) })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.reader()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.save_meta(VOTE_FILE, Some(*vote)).await.map_err(|e| io_err(ErrorSubject::Vote, ErrorVerb::Write, &e))?;
        self.vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        Ok(self.vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        if committed == self.committed {
            return Ok(());
        }
        // Not fsynced: every commit would otherwise cost two more fsyncs on every node.
        // Losing the latest value in a power failure is safe: an older commit point only
        // means applying less at start-up, and the leader re-establishes the rest.
        let (fs, dir) = (self.fs.clone(), self.dir.clone());
        crate::clock::spawn_blocking(move || write_meta_nosync(&*fs, &dir, COMMITTED_FILE, &committed))
            .await
            .map_err(io::Error::other)
            .and_then(|r| r)
            .map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Write, &e))?;
        self.committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.committed)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let mut records = Vec::with_capacity(entries.len());
        for entry in &entries {
            let payload = serde_json::to_vec(entry)
                .map_err(|e| StorageError::from(StorageIOError::write_log_entry(entry.log_id, AnyError::new(&e))))?;
            records.push((entry.log_id.index, payload));
        }
        let purged = self.last_purged.map(|l| l.index);
        match self.with_disk(move |log| log.append(&records, purged)).await {
            Ok(()) => {
                let mut map = self.entries_write();
                for entry in entries {
                    map.insert(entry.log_id.index, entry);
                }
                drop(map);
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                let err = io_err(ErrorSubject::Logs, ErrorVerb::Write, &e);
                callback.log_io_completed(Err(e));
                Err(err)
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let index = log_id.index;
        self.with_disk(move |log| log.truncate_from(index))
            .await
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, &e))?;
        self.entries_write().split_off(&index);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        if self.last_purged.is_some_and(|p| p.index >= log_id.index) {
            return Ok(());
        }
        self.save_meta(PURGED_FILE, Some(log_id))
            .await
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, &e))?;
        self.last_purged = Some(log_id);
        {
            let mut map = self.entries_write();
            *map = match log_id.index.checked_add(1) {
                Some(next) => map.split_off(&next),
                None => BTreeMap::new(),
            };
        }
        let index = log_id.index;
        self.with_disk(move |log| log.compact(index))
            .await
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, &e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! The torn-tail cases through the whole store (the record-level ones, at every byte
    //! and bit, are the durable-file module's tests).

    use std::fs::{self, OpenOptions};
    use std::io::Write;

    use eventtermq_storage::durable::{encode_record, RECORD_HEADER_BYTES};
    use openraft::storage::RaftLogStorageExt;
    use openraft::testing::{blank_ent, log_id};
    use openraft::EntryPayload;

    use super::*;
    use crate::cluster_state::commands::Command;

    fn normal_ent(term: u64, index: u64) -> Entry {
        Entry {
            log_id: log_id(term, 1, index),
            payload: EntryPayload::Normal(Command::CreateNamespace { name: format!("ns-{index}") }),
        }
    }

    async fn open_with(dir: &Path, n: u64) -> LogStore {
        let mut store = LogStore::open(dir).await.unwrap();
        store.blocking_append((0..n).map(|i| normal_ent(1, i))).await.unwrap();
        store
    }

    async fn indexes(store: &mut LogStore) -> Vec<u64> {
        store.try_get_log_entries(..).await.unwrap().iter().map(|e| e.log_id.index).collect()
    }

    fn log_len(dir: &Path) -> u64 {
        fs::metadata(dir.join(LOG_FILE)).unwrap().len()
    }

    fn record_offsets(store: &LogStore) -> BTreeMap<u64, u64> {
        store.disk.lock().unwrap().offsets.clone()
    }

    #[tokio::test]
    async fn append_then_reopen_reads_everything() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open_with(dir.path(), 5).await;
        assert_eq!(indexes(&mut store).await, vec![0, 1, 2, 3, 4]);
        drop(store);
        let mut store = LogStore::open(dir.path()).await.unwrap();
        assert_eq!(indexes(&mut store).await, vec![0, 1, 2, 3, 4]);
        let entries = store.try_get_log_entries(2..4).await.unwrap();
        assert_eq!(entries, vec![normal_ent(1, 2), normal_ent(1, 3)]);
        let st = store.get_log_state().await.unwrap();
        assert_eq!(st.last_log_id, Some(log_id(1, 1, 4)));
        assert_eq!(st.last_purged_log_id, None);
        // A reader sees later appends.
        let mut reader = store.get_log_reader().await;
        store.blocking_append([normal_ent(2, 5)]).await.unwrap();
        assert_eq!(reader.try_get_log_entries(5..).await.unwrap().len(), 1);
        assert!(reader.try_get_log_entries((Bound::Included(7), Bound::Excluded(3))).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn torn_tail_garbage_is_truncated() {
        let dir = tempfile::tempdir().unwrap();
        drop(open_with(dir.path(), 5).await);
        let valid = log_len(dir.path());
        let mut f = OpenOptions::new().append(true).open(dir.path().join(LOG_FILE)).unwrap();
        f.write_all(&[0x37, 0x00, 0x00, 0x00, 0xde, 0xad]).unwrap();
        drop(f);
        let mut store = LogStore::open(dir.path()).await.unwrap();
        assert_eq!(indexes(&mut store).await, vec![0, 1, 2, 3, 4]);
        assert_eq!(log_len(dir.path()), valid);
        // The log keeps working after the repair.
        store.blocking_append([normal_ent(1, 5)]).await.unwrap();
        drop(store);
        let mut store = LogStore::open(dir.path()).await.unwrap();
        assert_eq!(indexes(&mut store).await, vec![0, 1, 2, 3, 4, 5]);
    }

    #[tokio::test]
    async fn record_cut_mid_way_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_with(dir.path(), 5).await;
        let offsets = record_offsets(&store);
        drop(store);
        let cut_at = offsets[&4] + 11;
        let f = OpenOptions::new().write(true).open(dir.path().join(LOG_FILE)).unwrap();
        f.set_len(cut_at).unwrap();
        drop(f);
        let mut store = LogStore::open(dir.path()).await.unwrap();
        assert_eq!(indexes(&mut store).await, vec![0, 1, 2, 3]);
        assert_eq!(log_len(dir.path()), offsets[&4]);
        assert_eq!(store.get_log_state().await.unwrap().last_log_id, Some(log_id(1, 1, 3)));
        store.blocking_append([normal_ent(2, 4)]).await.unwrap();
        drop(store);
        let mut store = LogStore::open(dir.path()).await.unwrap();
        assert_eq!(store.try_get_log_entries(4..).await.unwrap(), vec![normal_ent(2, 4)]);
    }

    #[tokio::test]
    async fn header_only_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_with(dir.path(), 3).await;
        let offsets = record_offsets(&store);
        drop(store);
        let f = OpenOptions::new().write(true).open(dir.path().join(LOG_FILE)).unwrap();
        f.set_len(offsets[&2] + 3).unwrap();
        drop(f);
        let mut store = LogStore::open(dir.path()).await.unwrap();
        assert_eq!(indexes(&mut store).await, vec![0, 1]);
        assert_eq!(log_len(dir.path()), offsets[&2]);
    }

    #[tokio::test]
    async fn bad_checksum_in_last_record_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_with(dir.path(), 5).await;
        let offsets = record_offsets(&store);
        drop(store);
        let path = dir.path().join(LOG_FILE);
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 2;
        bytes[last] ^= 0x01;
        fs::write(&path, &bytes).unwrap();
        let mut store = LogStore::open(dir.path()).await.unwrap();
        assert_eq!(indexes(&mut store).await, vec![0, 1, 2, 3]);
        assert_eq!(log_len(dir.path()), offsets[&4]);
    }

    #[tokio::test]
    async fn corruption_before_the_last_record_refuses_to_open_and_keeps_the_file() {
        // Entries 3-5 were synced (and acknowledged) after entry 2: cutting the log at
        // the damage would silently forget them, which could cost the cluster a
        // committed entry. The node must not start on it.
        let dir = tempfile::tempdir().unwrap();
        let store = open_with(dir.path(), 6).await;
        let offsets = record_offsets(&store);
        drop(store);
        let path = dir.path().join(LOG_FILE);
        let mut bytes = fs::read(&path).unwrap();
        let inside_2 = (offsets[&2] + RECORD_HEADER_BYTES as u64 + 3) as usize;
        bytes[inside_2] ^= 0x40;
        fs::write(&path, &bytes).unwrap();
        let err = LogStore::open(dir.path()).await.err().expect("opened a log damaged before its end");
        let text = err.to_string();
        assert!(text.contains(&path.display().to_string()) && text.contains("damaged at byte"), "{text}");
        assert_eq!(fs::read(&path).unwrap(), bytes, "left as it is");
    }

    #[tokio::test]
    async fn undecodable_payload_and_index_gap_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        drop(open_with(dir.path(), 3).await);
        let valid = log_len(dir.path());
        let path = dir.path().join(LOG_FILE);

        // Valid framing, but not an entry.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        let mut buf = Vec::new();
        encode_record(b"not json", &mut buf).unwrap();
        f.write_all(&buf).unwrap();
        drop(f);
        let mut store = LogStore::open(dir.path()).await.unwrap();
        assert_eq!(indexes(&mut store).await, vec![0, 1, 2]);
        assert_eq!(log_len(dir.path()), valid);
        drop(store);

        // A well-formed entry whose index does not follow.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        let mut buf = Vec::new();
        encode_record(&serde_json::to_vec(&normal_ent(1, 7)).unwrap(), &mut buf).unwrap();
        f.write_all(&buf).unwrap();
        drop(f);
        let mut store = LogStore::open(dir.path()).await.unwrap();
        assert_eq!(indexes(&mut store).await, vec![0, 1, 2]);
        assert_eq!(log_len(dir.path()), valid);
    }

    #[tokio::test]
    async fn zeroed_tail_is_dropped() {
        // What a file system may leave after a crash: the size grew, the data did not land.
        let dir = tempfile::tempdir().unwrap();
        drop(open_with(dir.path(), 2).await);
        let valid = log_len(dir.path());
        let f = OpenOptions::new().write(true).open(dir.path().join(LOG_FILE)).unwrap();
        f.set_len(valid + 4096).unwrap();
        drop(f);
        let mut store = LogStore::open(dir.path()).await.unwrap();
        assert_eq!(indexes(&mut store).await, vec![0, 1]);
        assert_eq!(log_len(dir.path()), valid);
    }

    #[tokio::test]
    async fn truncate_cuts_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open_with(dir.path(), 6).await;
        let offsets = record_offsets(&store);
        store.truncate(log_id(1, 1, 3)).await.unwrap();
        assert_eq!(indexes(&mut store).await, vec![0, 1, 2]);
        assert_eq!(log_len(dir.path()), offsets[&3]);
        // Truncating past the end is a no-op.
        store.truncate(log_id(1, 1, 10)).await.unwrap();
        assert_eq!(log_len(dir.path()), offsets[&3]);
        store.blocking_append([normal_ent(3, 3)]).await.unwrap();
        drop(store);
        let mut store = LogStore::open(dir.path()).await.unwrap();
        assert_eq!(indexes(&mut store).await, vec![0, 1, 2, 3]);
        assert_eq!(store.get_log_state().await.unwrap().last_log_id, Some(log_id(3, 1, 3)));
    }

    #[tokio::test]
    async fn vote_committed_and_purge_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open_with(dir.path(), 10).await;
        assert_eq!(store.read_vote().await.unwrap(), None);
        assert_eq!(store.read_committed().await.unwrap(), None);
        let vote = Vote::new_committed(4, 2);
        store.save_vote(&vote).await.unwrap();
        store.save_committed(Some(log_id(1, 1, 8))).await.unwrap();
        store.purge(log_id(1, 1, 2)).await.unwrap();
        drop(store);

        let mut store = LogStore::open(dir.path()).await.unwrap();
        assert_eq!(store.read_vote().await.unwrap(), Some(vote));
        assert_eq!(store.read_committed().await.unwrap(), Some(log_id(1, 1, 8)));
        let st = store.get_log_state().await.unwrap();
        assert_eq!(st.last_purged_log_id, Some(log_id(1, 1, 2)));
        assert_eq!(st.last_log_id, Some(log_id(1, 1, 9)));
        assert_eq!(indexes(&mut store).await, (3..10).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn purge_compacts_when_more_than_half_is_purged() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open_with(dir.path(), 10).await;
        let offsets = record_offsets(&store);
        let full = log_len(dir.path());

        // Less than half: the file is left as is.
        store.purge(log_id(1, 1, 2)).await.unwrap();
        assert_eq!(log_len(dir.path()), full);

        // More than half: rewritten without the purged records.
        store.purge(log_id(1, 1, 6)).await.unwrap();
        assert_eq!(log_len(dir.path()), full - offsets[&7]);
        assert!(!dir.path().join(format!("{LOG_FILE}.tmp")).exists());
        assert_eq!(indexes(&mut store).await, vec![7, 8, 9]);
        assert_eq!(record_offsets(&store).keys().copied().collect::<Vec<_>>(), vec![7, 8, 9]);

        // Appends and truncation keep working on the rewritten file.
        store.blocking_append([normal_ent(1, 10), normal_ent(1, 11)]).await.unwrap();
        store.truncate(log_id(1, 1, 11)).await.unwrap();
        drop(store);
        let mut store = LogStore::open(dir.path()).await.unwrap();
        assert_eq!(indexes(&mut store).await, vec![7, 8, 9, 10]);
        assert_eq!(store.get_log_state().await.unwrap().last_purged_log_id, Some(log_id(1, 1, 6)));
    }

    #[tokio::test]
    async fn purge_past_the_end_then_append() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open_with(dir.path(), 4).await;
        store.purge(log_id(5, 1, 20)).await.unwrap();
        assert_eq!(log_len(dir.path()), 0);
        let st = store.get_log_state().await.unwrap();
        assert_eq!(st.last_purged_log_id, Some(log_id(5, 1, 20)));
        assert_eq!(st.last_log_id, Some(log_id(5, 1, 20)));
        store.blocking_append([blank_ent::<TypeConfig>(5, 1, 21)]).await.unwrap();
        // A purge point that moved back is ignored.
        store.purge(log_id(1, 1, 2)).await.unwrap();
        drop(store);
        let mut store = LogStore::open(dir.path()).await.unwrap();
        assert_eq!(indexes(&mut store).await, vec![21]);
        assert_eq!(store.get_log_state().await.unwrap().last_purged_log_id, Some(log_id(5, 1, 20)));
    }

    #[tokio::test]
    async fn gap_in_append_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open_with(dir.path(), 3).await;
        assert!(store.blocking_append([normal_ent(1, 5)]).await.is_err());
        assert_eq!(indexes(&mut store).await, vec![0, 1, 2]);
    }

    #[tokio::test]
    async fn committed_past_a_dropped_tail_is_lowered() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open_with(dir.path(), 5).await;
        store.save_committed(Some(log_id(1, 1, 4))).await.unwrap();
        let offsets = record_offsets(&store);
        drop(store);
        let f = OpenOptions::new().write(true).open(dir.path().join(LOG_FILE)).unwrap();
        f.set_len(offsets[&4] + 1).unwrap();
        drop(f);
        let mut store = LogStore::open(dir.path()).await.unwrap();
        assert_eq!(store.read_committed().await.unwrap(), Some(log_id(1, 1, 3)));
    }

    /// Bytes framed by hand as the files have always been written (not through the
    /// encoder under test), so a change of format cannot go unnoticed: existing data
    /// directories must open unchanged.
    fn framed_by_hand(json: &[u8]) -> Vec<u8> {
        let mut out = (json.len() as u32).to_le_bytes().to_vec();
        out.extend_from_slice(&crc32c::crc32c(json).to_le_bytes());
        out.extend_from_slice(json);
        out
    }

    #[tokio::test]
    async fn files_keep_their_byte_format() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Vec::new();
        for i in 0..3 {
            log.extend(framed_by_hand(&serde_json::to_vec(&normal_ent(1, i)).unwrap()));
        }
        fs::write(dir.path().join(LOG_FILE), &log).unwrap();
        let vote = Vote::new_committed(4, 2);
        fs::write(dir.path().join(VOTE_FILE), framed_by_hand(&serde_json::to_vec(&Some(vote)).unwrap())).unwrap();
        let committed = Some(log_id(1, 1, 1));
        fs::write(dir.path().join(COMMITTED_FILE), framed_by_hand(&serde_json::to_vec(&committed).unwrap())).unwrap();

        let mut store = LogStore::open(dir.path()).await.unwrap();
        assert_eq!(indexes(&mut store).await, vec![0, 1, 2]);
        assert_eq!(store.read_vote().await.unwrap(), Some(vote));
        assert_eq!(store.read_committed().await.unwrap(), committed);
        assert_eq!(fs::read(dir.path().join(LOG_FILE)).unwrap(), log);

        store.blocking_append([normal_ent(1, 3)]).await.unwrap();
        log.extend(framed_by_hand(&serde_json::to_vec(&normal_ent(1, 3)).unwrap()));
        assert_eq!(fs::read(dir.path().join(LOG_FILE)).unwrap(), log);
        let vote = Vote::new(5, 3);
        store.save_vote(&vote).await.unwrap();
        let expected = framed_by_hand(&serde_json::to_vec(&Some(vote)).unwrap());
        assert_eq!(fs::read(dir.path().join(VOTE_FILE)).unwrap(), expected);
        store.purge(log_id(1, 1, 0)).await.unwrap();
        let expected = framed_by_hand(&serde_json::to_vec(&Some(log_id(1, 1, 0))).unwrap());
        assert_eq!(fs::read(dir.path().join(PURGED_FILE)).unwrap(), expected);
    }

    #[tokio::test]
    async fn corrupt_vote_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = LogStore::open(dir.path()).await.unwrap();
        store.save_vote(&Vote::new(3, 1)).await.unwrap();
        drop(store);
        let path = dir.path().join(VOTE_FILE);
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x20;
        fs::write(&path, &bytes).unwrap();
        let err = LogStore::open(dir.path()).await.err().expect("corrupt vote must not load");
        assert!(err.to_string().contains("corrupt"), "{err}");
    }
}
