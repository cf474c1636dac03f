//! Replicated segments: the data path between publishers and consumer groups.
//!
//! - [`primary`]: the task that owns an open segment on its primary node: it batches
//!   publishes into one write and one fsync (group commit), streams the records to the
//!   other replicas, and confirms each publish once it is as durable as asked, as its
//!   pure core [`confirm`] decides.
//! - [`replica`]: the receiving end of that stream, and the fence the leader raises
//!   before a fail-over.
//! - [`keeper`]: each node's loop that makes its local segment files agree with the
//!   cluster state: starts primaries, seals closed segments, fetches missing copies,
//!   deletes what the state no longer has.
//! - [`placement`]: the Raft leader's loop that opens segments, fails them over when a
//!   primary dies, re-replicates closed ones, applies retention, and places consumer
//!   groups.
//! - [`read`]: reading a segment from wherever a readable copy is.
//! - [`publish`]: routing a publish to the primary of an open segment.
//! - [`in_order`]: one publisher's batches in order, several in flight, its relay
//!   stream to a primary on another node.
//! - [`dedupe`], [`window`]: exactly-once publishing: the primary's duplicate window (a
//!   pure core) and how it passes from one generation of a shard to the next.
//!
//! Why a primary per segment and not Raft per message: Raft orders the cluster state
//! (rare, small writes); messages are many and large, and only need the order of their
//! own segment. The Raft leader decides who holds what; primaries move the bytes.

pub mod confirm;
pub mod dedupe;
pub mod in_order;
pub mod keeper;
pub mod placement;
pub mod primary;
pub mod publish;
pub mod read;
pub mod replica;
mod traced;
pub mod window;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use eventtermq_storage::{SegmentWriter, Store};

use crate::clock::Clock;
use crate::cluster::Cluster;
use crate::cluster_state::SegmentId;
use crate::config::DataSettings;
use crate::disk::Disk;
use crate::error::{ErrorCode, RequestError};
use crate::metrics::Metrics;
use crate::peers::Peers;

/// A segment's writer, shared by whoever appends to it on this node (its primary task
/// or a replication stream) and the keeper that seals it.
pub type SharedWriter = Arc<Mutex<SegmentWriter>>;

/// This node's segments: its store and what currently writes to it. Cheap to clone.
#[derive(Clone)]
pub struct Segments {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    cluster: Cluster,
    peers: Peers,
    clock: Clock,
    settings: DataSettings,
    /// The data directory's free space: every write of segment data asks it first.
    disk: Disk,
    metrics: Metrics,
    /// Open segments this node writes to, by id.
    writers: Mutex<HashMap<SegmentId, SharedWriter>>,
    /// Primary tasks running on this node.
    primaries: Mutex<HashMap<SegmentId, primary::PrimaryHandle>>,
    /// Segments the leader froze for a fail-over: no more records are accepted.
    frozen: Mutex<std::collections::HashSet<SegmentId>>,
    /// Per segment, cancelled when this node's replica of it is to let go of its
    /// writer (the segment was frozen, closed or deleted): idle replication streams
    /// wait on it instead of looking at the state on a timer.
    replica_releases: Mutex<HashMap<SegmentId, tokio_util::sync::CancellationToken>>,
    /// Damaged local copies already reported that could not be replaced (no other
    /// complete copy): reported once, not on every retried read.
    corrupt_kept: Mutex<std::collections::HashSet<SegmentId>>,
    /// Cancelled when the node stops: every task [`Segments::spawn`] started ends.
    tasks_stop: tokio_util::sync::CancellationToken,
    /// Duplicate windows of closed segments this node was primary of, for the
    /// shard's next generation (one per shard).
    kept_windows: Mutex<window::KeptWindows>,
}

impl Segments {
    pub fn new(store: Store, cluster: Cluster, peers: Peers, clock: Clock, settings: DataSettings, disk: Disk) -> Self {
        let metrics = cluster.metrics().clone();
        Self {
            inner: Arc::new(Inner {
                store,
                cluster,
                peers,
                clock,
                settings,
                disk,
                metrics,
                writers: Mutex::default(),
                primaries: Mutex::default(),
                frozen: Mutex::default(),
                replica_releases: Mutex::default(),
                corrupt_kept: Mutex::default(),
                tasks_stop: tokio_util::sync::CancellationToken::new(),
                kept_windows: Mutex::default(),
            }),
        }
    }

    /// Spawns a data-path task (a primary, a replication stream, a consumer group, a
    /// fail-over) that ends, wherever it is, when the node stops ([`Segments::stop_tasks`]).
    pub(crate) fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<Option<F::Output>>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let stop = self.inner.tasks_stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                biased;
                out = task => Some(out),
                _ = stop.cancelled() => None,
            }
        })
    }

    /// Ends every task [`Segments::spawn`] started, at once, as a process's death
    /// would: the last step of a node's stop, graceful or not. Without it, a node
    /// stopped in-process (a test's kill -9) left its primaries and groups running,
    /// writing through closed files and talking to the node started in its place.
    pub fn stop_tasks(&self) {
        self.inner.tasks_stop.cancel();
        lock(&self.inner.primaries).clear();
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn cluster(&self) -> &Cluster {
        &self.inner.cluster
    }

    pub fn peers(&self) -> &Peers {
        &self.inner.peers
    }

    pub fn clock(&self) -> &Clock {
        &self.inner.clock
    }

    pub fn settings(&self) -> &DataSettings {
        &self.inner.settings
    }

    pub fn disk(&self) -> &Disk {
        &self.inner.disk
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The writer of an open segment, opening (or creating) its file on first use.
    pub(crate) fn writer(&self, id: SegmentId) -> Result<SharedWriter, RequestError> {
        let mut writers = lock(&self.inner.writers);
        if let Some(w) = writers.get(&id) {
            return Ok(w.clone());
        }
        let w = match self.inner.store.info(id) {
            Some(_) => self.inner.store.writer(id),
            None => self.inner.store.create(id),
        }
        .map_err(storage_error)?;
        let w = Arc::new(Mutex::new(w));
        writers.insert(id, w.clone());
        Ok(w)
    }

    /// Gives up the shared writer of a segment (it is being sealed or deleted).
    pub(crate) fn take_writer(&self, id: SegmentId) -> Option<SharedWriter> {
        lock(&self.inner.writers).remove(&id)
    }

    pub(crate) fn is_frozen(&self, id: SegmentId) -> bool {
        lock(&self.inner.frozen).contains(&id)
    }

    pub(crate) fn freeze(&self, id: SegmentId) {
        lock(&self.inner.frozen).insert(id);
        self.release_replica(id);
    }

    /// Cancelled once this node's replica of `id` is to stop taking records: see
    /// [`Segments::release_replica`]. The caller checks the state after taking it (a
    /// release before it was taken cancels nothing).
    pub(crate) fn replica_release(&self, id: SegmentId) -> tokio_util::sync::CancellationToken {
        lock(&self.inner.replica_releases).entry(id).or_default().clone()
    }

    /// The segment was frozen, closed or deleted: replication streams of it end once
    /// idle (the keeper calls this for every segment that is no longer open).
    pub(crate) fn release_replica(&self, id: SegmentId) {
        if let Some(token) = lock(&self.inner.replica_releases).remove(&id) {
            token.cancel();
        }
    }

    /// Releases the replicas of every segment for which `keep` is false.
    pub(crate) fn release_replicas_except(&self, keep: impl Fn(SegmentId) -> bool) {
        let mut releases = lock(&self.inner.replica_releases);
        releases.retain(|id, token| {
            let kept = keep(*id);
            if !kept {
                token.cancel();
            }
            kept
        });
    }

    pub(crate) fn primary(&self, id: SegmentId) -> Option<primary::PrimaryHandle> {
        lock(&self.inner.primaries).get(&id).cloned()
    }

    pub(crate) fn primaries(&self) -> &Mutex<HashMap<SegmentId, primary::PrimaryHandle>> {
        &self.inner.primaries
    }

    /// Address of a node as the cluster state records it.
    pub(crate) fn node_addr(&self, node: u64) -> Result<String, RequestError> {
        let st = self.inner.cluster.state.read();
        st.state.nodes.get(&node).map(|n| n.address.clone()).ok_or_else(|| {
            RequestError::new(ErrorCode::PeerUnreachable, format!("node {node} is not in the cluster state"))
        })
    }

    /// Graceful shutdown: stops every primary task and closes its segment where the
    /// replicas agree, so the cluster need not wait to see this node DEAD to open the
    /// next one.
    pub async fn close_primaries(&self) {
        let all: Vec<_> = lock(&self.inner.primaries).drain().map(|(_, p)| p).collect();
        for p in &all {
            p.stop().await;
        }
        let closes = all.iter().map(|p| placement::fail_over(self, p.id));
        for r in futures::future::join_all(closes).await {
            if let Err(e) = r {
                tracing::warn!(error = %e, "closing a segment at shutdown failed; the leader fails it over later");
            }
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Segments {
    /// A failed write of segment data: one that failed for want of space puts the node
    /// below its watermark at once (the next writes are refused, not failed).
    pub(crate) fn write_error(&self, e: eventtermq_storage::StorageError) -> RequestError {
        if out_of_space(&e) {
            self.inner.disk.out_of_space();
        }
        storage_error(e)
    }
}

pub(crate) fn out_of_space(e: &eventtermq_storage::StorageError) -> bool {
    matches!(e, eventtermq_storage::StorageError::Io { source, .. } if source.kind() == std::io::ErrorKind::StorageFull)
}

pub(crate) fn storage_error(e: eventtermq_storage::StorageError) -> RequestError {
    RequestError::new(ErrorCode::Internal, format!("segment storage: {e}"))
}

pub(crate) fn to_wire(r: eventtermq_storage::Record) -> eventtermq_proto::internal::v1::Record {
    eventtermq_proto::internal::v1::Record { offset: r.offset, timestamp_ms: r.timestamp_ms, payload: r.payload }
}

pub(crate) fn from_wire(r: eventtermq_proto::internal::v1::Record) -> eventtermq_storage::Record {
    eventtermq_storage::Record { offset: r.offset, timestamp_ms: r.timestamp_ms, payload: r.payload }
}
