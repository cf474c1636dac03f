//! The Raft state machine of the cluster state, and its snapshots.
//!
//! The state machine lives in memory ([`SharedState`], also read by the API). It is not
//! persisted by itself: the current snapshot is, in `<dir>/snapshot`, and after a
//! restart the state is that snapshot, on top of which openraft re-applies the
//! committed log entries.
//!
//! Snapshot file: `[magic "EMQSNAP1"][u32 crc32c LE of json][u64 len LE of json][json]`,
//! replaced atomically (`durable::replace_file`: tmp file, fsync, rename, fsync of the
//! directory). The JSON holds the snapshot id, last applied log id, membership and
//! cluster state; it is also the snapshot data sent to followers. Its framing is its own
//! (a u64 length: a snapshot is not bounded by the record payload limit), its IO and
//! checksum are the storage crate's durable-file module's.

use std::io::{self, Cursor};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use eventtermq_storage::durable;
use eventtermq_storage::fs::{Fs, RealFs};
use openraft::storage::RaftStateMachine;
use openraft::{
    AnyError, BasicNode, EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, RaftSnapshotBuilder, Snapshot,
    SnapshotMeta, StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};

use super::changes::{ChangeLog, Touched};
use super::commands::CommandResponse;
use super::model::{ClusterState, NodeId};
use super::raft::{LogId, StorageError, TypeConfig};

type Entry = openraft::Entry<TypeConfig>;
type Meta = SnapshotMeta<NodeId, BasicNode>;

const SNAPSHOT_FILE: &str = "snapshot";
const SNAPSHOT_MAGIC: &[u8; 8] = b"EMQSNAP1";
const SNAPSHOT_HEADER: usize = 8 + 4 + 8;

/// The applied cluster state and what it reflects.
#[derive(Debug, Clone)]
pub struct AppliedState {
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership<NodeId, BasicNode>,
    pub state: ClusterState,
    /// What the last entries applied here touched (not replicated, not in snapshots).
    pub changes: ChangeLog,
}

/// Shared read access to the applied state (cheap to clone).
#[derive(Clone)]
pub struct SharedState(Arc<RwLock<AppliedState>>);

impl SharedState {
    /// Read access. Does not fail on a poisoned lock: the state is only changed by
    /// pure, non-panicking code.
    pub fn read(&self) -> RwLockReadGuard<'_, AppliedState> {
        self.0.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, AppliedState> {
        self.0.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// A state of its own, outside any Raft (unit tests of what reads the state).
    pub fn detached(state: ClusterState) -> Self {
        SharedState(Arc::new(RwLock::new(AppliedState {
            last_applied: None,
            membership: StoredMembership::default(),
            state,
            changes: ChangeLog::default(),
        })))
    }

    /// Changes a [`SharedState::detached`] state (unit tests).
    #[cfg(test)]
    pub(crate) fn change_detached(&self, f: impl FnOnce(&mut ClusterState)) {
        f(&mut self.write().state)
    }
}

/// What a snapshot holds (its data is the JSON of this).
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotContent {
    snapshot_id: String,
    last_applied: Option<LogId>,
    membership: StoredMembership<NodeId, BasicNode>,
    state: ClusterState,
}

impl SnapshotContent {
    fn meta(&self) -> Meta {
        Meta {
            last_log_id: self.last_applied,
            last_membership: self.membership.clone(),
            snapshot_id: self.snapshot_id.clone(),
        }
    }
}

/// The current snapshot: its meta and data (JSON of [`SnapshotContent`]).
#[derive(Clone)]
struct StoredSnapshot {
    meta: Meta,
    data: Arc<Vec<u8>>,
}

impl StoredSnapshot {
    fn to_snapshot(&self) -> Snapshot<TypeConfig> {
        Snapshot { meta: self.meta.clone(), snapshot: Box::new(Cursor::new(self.data.to_vec())) }
    }
}

/// The state machine and snapshot store. Clones share everything; a clone is the
/// snapshot builder.
#[derive(Clone)]
pub struct StateMachineStore {
    fs: Arc<dyn Fs>,
    dir: Arc<PathBuf>,
    shared: SharedState,
    /// Also serializes snapshot writes (building and installing may run concurrently).
    snapshot: Arc<tokio::sync::Mutex<Option<StoredSnapshot>>>,
}

fn snapshot_err(meta: Option<&Meta>, verb: ErrorVerb, msg: impl ToString) -> StorageError {
    StorageIOError::new(ErrorSubject::Snapshot(meta.map(|m| m.signature())), verb, AnyError::error(msg)).into()
}

/// Frames snapshot data for the snapshot file.
pub fn encode_snapshot_file(json: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(SNAPSHOT_HEADER + json.len());
    out.extend_from_slice(SNAPSHOT_MAGIC);
    out.extend_from_slice(&durable::checksum(json).to_le_bytes());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(json);
    out
}

/// Validates the framing of a snapshot file and returns its JSON. Never panics.
pub fn decode_snapshot_file(bytes: &[u8]) -> Result<&[u8], String> {
    if bytes.len() < SNAPSHOT_HEADER {
        return Err(format!("truncated: {} bytes, shorter than the {SNAPSHOT_HEADER}-byte header", bytes.len()));
    }
    if &bytes[..8] != SNAPSHOT_MAGIC {
        return Err("bad magic (not an EventterMQ snapshot file)".to_string());
    }
    let crc = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&bytes[12..20]);
    let len = u64::from_le_bytes(len_bytes);
    let actual_len = (bytes.len() - SNAPSHOT_HEADER) as u64;
    if len != actual_len {
        return Err(format!("length mismatch: header says {len} bytes, file has {actual_len}"));
    }
    let json = &bytes[SNAPSHOT_HEADER..];
    durable::verify_checksum(crc, json).map_err(|e| e.to_string())?;
    Ok(json)
}

/// Loads `dir/snapshot`; `None` if there is none.
#[allow(clippy::result_large_err)] // openraft's error type
fn load_snapshot(fs: &dyn Fs, dir: &Path) -> Result<Option<(StoredSnapshot, ClusterState)>, StorageError> {
    let path = dir.join(SNAPSHOT_FILE);
    let bytes = match durable::read_replaced_file(fs, &path) {
        Ok(Some(b)) => b,
        Ok(None) => return Ok(None),
        Err(e) => return Err(snapshot_err(None, ErrorVerb::Read, format!("reading {}: {e}", path.display()))),
    };
    let corrupt = |why: String| {
        snapshot_err(
            None,
            ErrorVerb::Read,
            format!(
                "snapshot file {} is corrupt: {why}; refusing to serve it. The log before it may already be \
                 purged, so this node's raft data must be wiped and the node re-added to the cluster",
                path.display()
            ),
        )
    };
    let json = decode_snapshot_file(&bytes).map_err(corrupt)?;
    let content: SnapshotContent =
        serde_json::from_slice(json).map_err(|e| corrupt(format!("undecodable content: {e}")))?;
    let snapshot = StoredSnapshot { meta: content.meta(), data: Arc::new(json.to_vec()) };
    Ok(Some((snapshot, content.state)))
}

impl StateMachineStore {
    /// Opens the state machine whose snapshot is kept in `dir` (created if missing),
    /// e.g. `<data>/raft`. Returns it and shared read access to its state.
    #[allow(clippy::result_large_err)] // openraft's error type
    pub async fn open(dir: &Path) -> Result<(StateMachineStore, SharedState), StorageError> {
        Self::open_in(RealFs::shared(), dir).await
    }

    /// [`StateMachineStore::open`] on the filesystem `fs` (a node's `NodeConfig::fs`).
    #[allow(clippy::result_large_err)] // openraft's error type
    pub async fn open_in(fs: Arc<dyn Fs>, dir: &Path) -> Result<(StateMachineStore, SharedState), StorageError> {
        let dir = dir.to_path_buf();
        let in_fs = fs.clone();
        let (dir, loaded) = crate::clock::spawn_blocking(move || {
            let fs = &*in_fs;
            durable::create_dir_durable(fs, &dir)
                .map_err(|e| snapshot_err(None, ErrorVerb::Read, format!("creating {}: {e}", dir.display())))?;
            // A replace cut short by a crash: its content never counted.
            let _ = fs.remove_file(&durable::tmp_path(&dir.join(SNAPSHOT_FILE)));
            let loaded = load_snapshot(fs, &dir)?;
            Ok::<_, StorageError>((dir, loaded))
        })
        .await
        .map_err(|e| snapshot_err(None, ErrorVerb::Read, format!("opening the snapshot store: {e}")))??;

        let (applied, snapshot) = match loaded {
            Some((snapshot, state)) => {
                tracing::info!(snapshot = %snapshot.meta, "loaded the raft snapshot");
                let mut changes = ChangeLog::default();
                changes.forget_up_to(snapshot.meta.last_log_id.map_or(0, |l| l.index));
                let applied = AppliedState {
                    last_applied: snapshot.meta.last_log_id,
                    membership: snapshot.meta.last_membership.clone(),
                    state,
                    changes,
                };
                (applied, Some(snapshot))
            }
            None => (
                AppliedState {
                    last_applied: None,
                    membership: StoredMembership::default(),
                    state: ClusterState::new_cluster(),
                    changes: ChangeLog::default(),
                },
                None,
            ),
        };
        let shared = SharedState(Arc::new(RwLock::new(applied)));
        let store = StateMachineStore {
            fs,
            dir: Arc::new(dir),
            shared: shared.clone(),
            snapshot: Arc::new(tokio::sync::Mutex::new(snapshot)),
        };
        Ok((store, shared))
    }

    /// Shared read access to the applied state.
    pub fn shared(&self) -> SharedState {
        self.shared.clone()
    }

    /// Writes snapshot data to `dir/snapshot` atomically, in a blocking thread.
    async fn persist(&self, meta: &Meta, data: Arc<Vec<u8>>) -> Result<(), StorageError> {
        let (fs, dir) = (self.fs.clone(), self.dir.clone());
        crate::clock::spawn_blocking(move || {
            durable::replace_file(&*fs, &dir.join(SNAPSHOT_FILE), &encode_snapshot_file(&data))
        })
        .await
        .map_err(io::Error::other)
        .and_then(|r| r.map_err(io::Error::from))
        .map_err(|e| {
            StorageIOError::new(ErrorSubject::Snapshot(Some(meta.signature())), ErrorVerb::Write, AnyError::new(&e))
                .into()
        })
    }
}

/// A name for a new snapshot. A unique value from the filesystem (random on a real
/// one, from the seed on a simulated one), not the node's clock: it is read by nobody,
/// it only keeps two snapshots of the same log position (one before a restart, one
/// after) apart, and a manual clock in a paused test can repeat an instant across a
/// restart.
fn new_snapshot_id(last_applied: Option<LogId>, unique: u64) -> String {
    match last_applied {
        Some(l) => format!("{}-{}-{}-{unique:016x}", l.leader_id.term, l.leader_id.node_id, l.index),
        None => format!("none-{unique:016x}"),
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let content = {
            let applied = self.shared.read();
            SnapshotContent {
                snapshot_id: new_snapshot_id(
                    applied.last_applied,
                    self.fs.unique_u64(applied.last_applied.map_or(0, |l| l.index)),
                ),
                last_applied: applied.last_applied,
                membership: applied.membership.clone(),
                state: applied.state.clone(),
            }
        };
        let meta = content.meta();
        // Megabytes at 10,000 topics: encoded off the async runtime, whose threads also
        // carry Raft's heartbeats.
        let data = crate::clock::spawn_blocking(move || serde_json::to_vec(&content))
            .await
            .map_err(|e| snapshot_err(Some(&meta), ErrorVerb::Write, format!("encoding the snapshot: {e}")))?
            .map_err(|e| snapshot_err(Some(&meta), ErrorVerb::Write, format!("encoding the snapshot: {e}")))?;
        let built = StoredSnapshot { meta, data: Arc::new(data) };

        let mut current = self.snapshot.lock().await;
        // An installed snapshot may be newer than this one: never go back.
        if current.as_ref().is_none_or(|c| c.meta.last_log_id <= built.meta.last_log_id) {
            self.persist(&built.meta, built.data.clone()).await?;
            *current = Some(built.clone());
        }
        tracing::info!(snapshot = %built.meta, "built a raft snapshot");
        Ok(built.to_snapshot())
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership<NodeId, BasicNode>), StorageError> {
        let applied = self.shared.read();
        Ok((applied.last_applied, applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResponse>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut applied = self.shared.write();
        let mut responses = Vec::new();
        for entry in entries {
            let index = entry.log_id.index;
            applied.last_applied = Some(entry.log_id);
            let response = match entry.payload {
                EntryPayload::Blank => CommandResponse { index, result: Ok(()) },
                EntryPayload::Normal(cmd) => {
                    let touched = Touched::of(&cmd, &applied.state);
                    applied.changes.record(index, touched);
                    applied.state.apply_at(index, &cmd)
                }
                EntryPayload::Membership(m) => {
                    applied.membership = StoredMembership::new(Some(entry.log_id), m);
                    CommandResponse { index, result: Ok(()) }
                }
            };
            responses.push(response);
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(&mut self, meta: &Meta, snapshot: Box<Cursor<Vec<u8>>>) -> Result<(), StorageError> {
        let mut data = snapshot.into_inner();
        let mut content: SnapshotContent = serde_json::from_slice(&data)
            .map_err(|e| snapshot_err(Some(meta), ErrorVerb::Read, format!("received snapshot is undecodable: {e}")))?;
        if content.last_applied != meta.last_log_id || content.membership != meta.last_membership {
            return Err(snapshot_err(
                Some(meta),
                ErrorVerb::Read,
                format!(
                    "received snapshot does not match its meta: content has last_applied {:?} and membership {}",
                    content.last_applied, content.membership
                ),
            ));
        }
        if content.snapshot_id != meta.snapshot_id {
            content.snapshot_id = meta.snapshot_id.clone();
            data = serde_json::to_vec(&content)
                .map_err(|e| snapshot_err(Some(meta), ErrorVerb::Write, format!("encoding the snapshot: {e}")))?;
        }
        let installed = StoredSnapshot { meta: meta.clone(), data: Arc::new(data) };

        let mut current = self.snapshot.lock().await;
        self.persist(meta, installed.data.clone()).await?;
        {
            let mut applied = self.shared.write();
            applied.last_applied = meta.last_log_id;
            applied.membership = meta.last_membership.clone();
            applied.state = content.state;
            applied.changes.forget_up_to(meta.last_log_id.map_or(0, |l| l.index));
        }
        *current = Some(installed);
        tracing::info!(snapshot = %meta, "installed a raft snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        Ok(self.snapshot.lock().await.as_ref().map(StoredSnapshot::to_snapshot))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::fs;

    use openraft::error::{InstallSnapshotError, RPCError, RaftError, Unreachable};
    use openraft::network::RPCOption;
    use openraft::raft::{
        AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
        VoteResponse,
    };
    use openraft::testing::{blank_ent, log_id, membership_ent, StoreBuilder, Suite};
    use openraft::Membership;

    use super::*;
    use crate::cluster_state::commands::Command;
    use crate::cluster_state::log_store::LogStore;
    use crate::cluster_state::model::DEFAULT_NAMESPACE;
    use crate::error::ErrorCode;

    fn normal_ent(index: u64, cmd: Command) -> Entry {
        Entry { log_id: log_id(1, 1, index), payload: EntryPayload::Normal(cmd) }
    }

    fn create_ns(name: &str) -> Command {
        Command::CreateNamespace { name: name.to_string() }
    }

    fn voters(ids: &[u64]) -> BTreeSet<u64> {
        ids.iter().copied().collect()
    }

    #[tokio::test]
    async fn initial_state_is_a_new_cluster() {
        let dir = tempfile::tempdir().unwrap();
        let (mut sm, shared) = StateMachineStore::open(dir.path()).await.unwrap();
        assert_eq!(sm.applied_state().await.unwrap(), (None, StoredMembership::default()));
        assert_eq!(shared.read().state, ClusterState::new_cluster());
        assert!(shared.read().state.namespaces.contains_key(DEFAULT_NAMESPACE));
        assert!(sm.get_current_snapshot().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn apply_answers_every_entry_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (mut sm, shared) = StateMachineStore::open(dir.path()).await.unwrap();
        let responses = sm
            .apply([
                blank_ent::<TypeConfig>(1, 1, 0),
                membership_ent::<TypeConfig>(1, 1, 1, vec![voters(&[1])]),
                normal_ent(2, create_ns("a")),
                normal_ent(3, Command::DeleteNamespace { name: DEFAULT_NAMESPACE.to_string(), cascade: true }),
                normal_ent(4, create_ns("b")),
            ])
            .await
            .unwrap();
        assert_eq!(responses.iter().map(|r| r.index).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
        assert!(responses[0].result.is_ok() && responses[1].result.is_ok() && responses[2].result.is_ok());
        assert_eq!(responses[3].result.as_ref().unwrap_err().code, ErrorCode::DefaultNamespaceUndeletable);
        assert!(responses[4].result.is_ok());

        let applied = shared.read();
        assert_eq!(applied.last_applied, Some(log_id(1, 1, 4)));
        assert_eq!(applied.membership.log_id(), &Some(log_id(1, 1, 1)));
        assert_eq!(applied.state.namespaces.keys().map(String::as_str).collect::<Vec<_>>(), ["a", "b", "default"]);
    }

    #[tokio::test]
    async fn snapshot_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (mut sm, _) = StateMachineStore::open(dir.path()).await.unwrap();
        sm.apply([membership_ent::<TypeConfig>(1, 1, 1, vec![voters(&[1, 2])]), normal_ent(2, create_ns("x"))])
            .await
            .unwrap();
        let built = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        assert_eq!(built.meta.last_log_id, Some(log_id(1, 1, 2)));
        // Applied after the snapshot: not persisted, re-applied from the log after a restart.
        sm.apply([normal_ent(3, create_ns("y"))]).await.unwrap();
        drop(sm);

        let (mut sm, shared) = StateMachineStore::open(dir.path()).await.unwrap();
        let current = sm.get_current_snapshot().await.unwrap().expect("persisted snapshot");
        assert_eq!(current.meta, built.meta);
        assert_eq!(current.snapshot.into_inner(), built.snapshot.into_inner());
        let (applied, membership) = sm.applied_state().await.unwrap();
        assert_eq!(applied, Some(log_id(1, 1, 2)));
        assert_eq!(membership.membership(), &Membership::new(vec![voters(&[1, 2])], ()));
        let state = &shared.read().state;
        assert!(state.namespaces.contains_key("x"));
        assert!(!state.namespaces.contains_key("y"));
    }

    #[tokio::test]
    async fn corrupt_snapshot_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (mut sm, _) = StateMachineStore::open(dir.path()).await.unwrap();
        sm.apply([normal_ent(1, create_ns("x"))]).await.unwrap();
        sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        drop(sm);
        let path = dir.path().join(SNAPSHOT_FILE);
        let good = fs::read(&path).unwrap();

        let mut flipped = good.clone();
        let last = flipped.len() - 3;
        flipped[last] ^= 0x04;
        fs::write(&path, &flipped).unwrap();
        let err = StateMachineStore::open(dir.path()).await.err().expect("bad checksum");
        assert!(err.to_string().contains("checksum mismatch"), "{err}");

        fs::write(&path, &good[..good.len() - 10]).unwrap();
        let err = StateMachineStore::open(dir.path()).await.err().expect("truncated");
        assert!(err.to_string().contains("length mismatch"), "{err}");

        fs::write(&path, &good[..12]).unwrap();
        assert!(StateMachineStore::open(dir.path()).await.is_err());

        let mut magic = good.clone();
        magic[0] = b'X';
        fs::write(&path, &magic).unwrap();
        assert!(StateMachineStore::open(dir.path()).await.is_err());

        fs::write(&path, &good).unwrap();
        assert!(StateMachineStore::open(dir.path()).await.is_ok());
        fs::remove_file(&path).unwrap();
        let (_, shared) = StateMachineStore::open(dir.path()).await.unwrap();
        assert_eq!(shared.read().state, ClusterState::new_cluster());
    }

    #[test]
    fn snapshot_file_decoder_never_panics() {
        let framed = encode_snapshot_file(b"{}");
        assert_eq!(decode_snapshot_file(&framed), Ok(&b"{}"[..]));
        for n in 0..framed.len() {
            assert!(decode_snapshot_file(&framed[..n]).is_err());
        }
        let mut huge = framed.clone();
        huge[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode_snapshot_file(&huge).is_err());
    }

    #[tokio::test]
    async fn install_snapshot_replaces_state_and_persists() {
        let leader_dir = tempfile::tempdir().unwrap();
        let (mut leader, _) = StateMachineStore::open(leader_dir.path()).await.unwrap();
        leader
            .apply([membership_ent::<TypeConfig>(1, 1, 1, vec![voters(&[1, 2, 3])]), normal_ent(2, create_ns("x"))])
            .await
            .unwrap();
        let snap = leader.get_snapshot_builder().await.build_snapshot().await.unwrap();

        let dir = tempfile::tempdir().unwrap();
        let (mut follower, shared) = StateMachineStore::open(dir.path()).await.unwrap();
        follower.apply([normal_ent(1, create_ns("stale"))]).await.unwrap();
        let mut received = follower.begin_receiving_snapshot().await.unwrap();
        *received = *snap.snapshot;
        follower.install_snapshot(&snap.meta, received).await.unwrap();
        assert!(shared.read().state.namespaces.contains_key("x"));
        assert!(!shared.read().state.namespaces.contains_key("stale"));
        assert_eq!(follower.get_current_snapshot().await.unwrap().unwrap().meta, snap.meta);
        drop(follower);

        let (mut follower, shared) = StateMachineStore::open(dir.path()).await.unwrap();
        assert_eq!(follower.get_current_snapshot().await.unwrap().unwrap().meta, snap.meta);
        assert_eq!(follower.applied_state().await.unwrap().0, Some(log_id(1, 1, 2)));
        assert!(shared.read().state.namespaces.contains_key("x"));
    }

    #[tokio::test]
    async fn install_snapshot_rejects_bad_data() {
        let dir = tempfile::tempdir().unwrap();
        let (mut sm, _) = StateMachineStore::open(dir.path()).await.unwrap();
        sm.apply([normal_ent(1, create_ns("x"))]).await.unwrap();
        let snap = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();

        let mut wrong_meta = snap.meta.clone();
        wrong_meta.last_log_id = Some(log_id(9, 1, 9));
        let data = snap.snapshot.clone();
        assert!(sm.install_snapshot(&wrong_meta, data).await.is_err());
        let garbage = Box::new(Cursor::new(b"{not json".to_vec()));
        assert!(sm.install_snapshot(&snap.meta, garbage).await.is_err());
        assert_eq!(sm.get_current_snapshot().await.unwrap().unwrap().meta, snap.meta);
    }

    #[tokio::test]
    async fn builder_after_install_builds_from_the_installed_state() {
        let leader_dir = tempfile::tempdir().unwrap();
        let (mut leader, _) = StateMachineStore::open(leader_dir.path()).await.unwrap();
        leader.apply((1..=5).map(|i| normal_ent(i, create_ns(&format!("n{i}"))))).await.unwrap();
        let newer = leader.get_snapshot_builder().await.build_snapshot().await.unwrap();

        let dir = tempfile::tempdir().unwrap();
        let (mut sm, _) = StateMachineStore::open(dir.path()).await.unwrap();
        sm.apply([normal_ent(1, create_ns("n1"))]).await.unwrap();
        let mut builder = sm.get_snapshot_builder().await;
        sm.install_snapshot(&newer.meta, newer.snapshot).await.unwrap();
        // The builder sees the installed state now; an older view would not be stored.
        let built = builder.build_snapshot().await.unwrap();
        assert_eq!(built.meta.last_log_id, Some(log_id(1, 1, 5)));
        let current = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta.last_log_id, Some(log_id(1, 1, 5)));
    }

    /// Network of a single-node cluster: there is nobody to talk to.
    struct NoNetwork;

    impl openraft::RaftNetworkFactory<TypeConfig> for NoNetwork {
        type Network = NoNetwork;

        async fn new_client(&mut self, _target: NodeId, _node: &BasicNode) -> NoNetwork {
            NoNetwork
        }
    }

    fn unreachable<E: std::error::Error>() -> RPCError<NodeId, BasicNode, E> {
        RPCError::Unreachable(Unreachable::new(&io::Error::other("single-node test: no network")))
    }

    impl openraft::RaftNetwork<TypeConfig> for NoNetwork {
        async fn append_entries(
            &mut self,
            _rpc: AppendEntriesRequest<TypeConfig>,
            _option: RPCOption,
        ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
            Err(unreachable())
        }

        async fn install_snapshot(
            &mut self,
            _rpc: InstallSnapshotRequest<TypeConfig>,
            _option: RPCOption,
        ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>>
        {
            Err(unreachable())
        }

        async fn vote(
            &mut self,
            _rpc: VoteRequest<NodeId>,
            _option: RPCOption,
        ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
            Err(unreachable())
        }
    }

    async fn start_node(dir: &Path) -> (openraft::Raft<TypeConfig>, SharedState) {
        let config = openraft::Config {
            heartbeat_interval: 50,
            election_timeout_min: 150,
            election_timeout_max: 300,
            snapshot_policy: openraft::SnapshotPolicy::Never,
            max_in_snapshot_log_to_keep: 0,
            ..Default::default()
        };
        let log = LogStore::open(dir).await.unwrap();
        let (sm, shared) = StateMachineStore::open(dir).await.unwrap();
        let raft = openraft::Raft::new(1, Arc::new(config.validate().unwrap()), NoNetwork, log, sm).await.unwrap();
        (raft, shared)
    }

    /// A real single-node Raft on these stores: the state is rebuilt after a restart
    /// from the snapshot plus the committed entries after it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn single_node_raft_recovers_its_state_after_restart() {
        let timeout = Some(std::time::Duration::from_secs(10));
        let dir = tempfile::tempdir().unwrap();
        let (raft, shared) = start_node(dir.path()).await;
        let mut members = std::collections::BTreeMap::new();
        members.insert(1u64, BasicNode { addr: "127.0.0.1:1".to_string() });
        raft.initialize(members).await.unwrap();
        raft.wait(timeout).state(openraft::ServerState::Leader, "leader").await.unwrap();

        let mut last = None;
        for name in ["a", "b", "c"] {
            let resp = raft.client_write(create_ns(name)).await.unwrap();
            assert!(resp.data.result.is_ok());
            assert_eq!(resp.data.index, resp.log_id.index);
            last = Some(resp.log_id);
        }
        raft.trigger().snapshot().await.unwrap();
        raft.wait(timeout).snapshot(last.unwrap(), "snapshot").await.unwrap();
        raft.wait(timeout).purged(last, "purged").await.unwrap();
        let rejected = raft.client_write(create_ns("Bad Name")).await.unwrap();
        assert!(rejected.data.result.is_err());
        let resp = raft.client_write(create_ns("d")).await.unwrap();
        let before = shared.read().state.clone();
        assert!(before.namespaces.contains_key("d"));
        raft.shutdown().await.unwrap();
        drop(raft);

        let (raft, shared) = start_node(dir.path()).await;
        raft.wait(timeout).applied_index_at_least(Some(resp.log_id.index), "re-applied").await.unwrap();
        assert_eq!(shared.read().state, before);
        raft.wait(timeout).state(openraft::ServerState::Leader, "leader again").await.unwrap();
        let resp = raft.client_write(create_ns("e")).await.unwrap();
        assert!(resp.data.result.is_ok());
        assert!(shared.read().state.namespaces.contains_key("e"));
        raft.shutdown().await.unwrap();
    }

    struct DiskStores;

    impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for DiskStores {
        async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError> {
            let dir = tempfile::tempdir().expect("temp dir");
            let log = LogStore::open(dir.path()).await?;
            let (sm, _) = StateMachineStore::open(dir.path()).await?;
            Ok((dir, log, sm))
        }
    }

    /// openraft's storage conformance suite, on the real on-disk stores.
    #[test]
    fn openraft_storage_suite() {
        Suite::test_all(DiskStores).unwrap();
    }
}
