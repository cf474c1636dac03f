//! Each node's loop that makes its segment files agree with the cluster state.
//!
//! - an open segment whose primary is this node gets a primary task, unless its file
//!   predates this process: a primary that restarted may have lost records it had not
//!   fsynced that its replicas did, so it must not append after them; the segment is
//!   failed over instead (closed at the longest replica's log) and a new one opened;
//! - an open segment this node is primary of that has fewer replicas than its topic's
//!   replication factor while more nodes are ALIVE (it was opened while nodes were
//!   down) is closed like a full one, so its successor gets every replica, and the
//!   leader copies the closed one up to the replication factor;
//! - a closed segment this node should hold is truncated or completed to the agreed
//!   length, sealed, checked against the agreed checksum, and reported done;
//! - a closed segment the state says this node holds complete, but whose copy is gone
//!   (quarantined as damaged at startup or after a failed read, or dropped for
//!   differing), is reported lost, so readers go elsewhere, and fetched again as above;
//! - a segment the state no longer has (retention, deleted topic) is deleted.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventtermq_storage::SegmentInfo;
use tokio_util::sync::CancellationToken;

use super::{lock, primary, Segments};
use crate::cluster_state::{ClusterState, Command, NodeId, SegmentId, SegmentRecord};
use crate::error::{ErrorCode, RequestError};

/// Pause between passes when nothing wakes the loop earlier.
const TICK: Duration = Duration::from_millis(250);

/// Pauses between attempts to fail over a segment this node was primary of before it
/// restarted (doubling from the first to the second).
const FAIL_OVER_RETRY_MIN: Duration = Duration::from_millis(100);
const FAIL_OVER_RETRY_MAX: Duration = Duration::from_secs(1);
/// Pauses between attempts to complete and seal a closed segment's copy (doubling).
const FINISH_RETRY_MIN: Duration = Duration::from_millis(50);
const FINISH_RETRY_MAX: Duration = Duration::from_secs(2);

pub async fn run(segments: Segments, stop: CancellationToken) {
    let mut metrics = segments.cluster().raft.metrics();
    let mut keeper = Keeper::new(segments, stop.clone());
    loop {
        keeper.pass().await;
        tokio::select! {
            _ = stop.cancelled() => return,
            r = metrics.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(TICK) => {}
        }
    }
}

type SharedIds = Arc<Mutex<HashSet<SegmentId>>>;

/// What the keeper of this node remembers between passes.
struct Keeper {
    segments: Segments,
    me: NodeId,
    stop: CancellationToken,
    /// Files that exist before this process started: see the module comment. A file
    /// quarantined at startup counts: the primary it belonged to wrote records that the
    /// replicas may have and a fresh file would not.
    preexisting: HashSet<SegmentId>,
    /// Open segments whose primary this keeper started (or is failing over).
    started: HashSet<SegmentId>,
    /// Closed segments being completed and sealed here.
    finishing: SharedIds,
    /// Copies being reported lost, until the state no longer lists them done here.
    losing: SharedIds,
}

impl Keeper {
    fn new(segments: Segments, stop: CancellationToken) -> Self {
        let store = segments.store();
        let preexisting = store.list().iter().map(|s| s.id).chain(store.quarantined().iter().map(|q| q.id)).collect();
        let me = segments.cluster().id;
        Keeper {
            segments,
            me,
            stop,
            preexisting,
            started: HashSet::new(),
            finishing: Default::default(),
            losing: Default::default(),
        }
    }

    /// One look at the state: every segment it lists, then local files it dropped.
    async fn pass(&mut self) {
        let (snapshot, under_replicated) = {
            let st = self.segments.cluster().state.read();
            let snapshot: Vec<(SegmentId, SegmentRecord)> =
                st.state.segments.iter().map(|(id, s)| (*id, s.clone())).collect();
            (snapshot, under_replicated_primaries(&st.state, self.me))
        };
        for id in under_replicated {
            if let Some(p) = self.segments.primary(id) {
                p.rotate();
            }
        }
        self.segments.prune_kept_windows();
        let known: HashSet<SegmentId> = snapshot.iter().map(|(id, _)| *id).collect();
        for (id, seg) in snapshot {
            if seg.is_open() {
                self.open_segment(id, &seg);
            } else {
                self.closed_segment(id, &seg).await;
            }
        }
        self.delete_dropped(&known).await;
    }

    /// Starts the primary task of an open segment this node is primary of, or fails it
    /// over when its file predates this process.
    fn open_segment(&mut self, id: SegmentId, seg: &SegmentRecord) {
        if seg.primary != self.me || !self.started.insert(id) {
            return;
        }
        if self.preexisting.contains(&id) {
            let (segments, stop) = (self.segments.clone(), self.stop.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = fail_over_restarted(&segments, id) => {}
                    _ = stop.cancelled() => {}
                }
            });
            return;
        }
        let size_max = topic_segment_size(&self.segments, seg);
        match primary::start(&self.segments, id, seg.replicas.clone(), seg.quorum(), size_max) {
            Ok(handle) => {
                lock(self.segments.primaries()).insert(id, handle);
                tracing::info!(segment_id = id, topic = %seg.topic, shard = seg.shard, replicas = ?seg.replicas, "primary started");
            }
            Err(e) => tracing::error!(segment_id = id, error = %e, "cannot start the primary"),
        }
    }

    /// A closed segment: report a complete copy that is gone, complete and seal a copy
    /// this node should hold, drop one that was replaced elsewhere.
    async fn closed_segment(&mut self, id: SegmentId, seg: &SegmentRecord) {
        let me = self.me;
        let holds = seg.replicas.contains(&me);
        let complete = seg.done.contains(&me)
            && self.segments.store().info(id).is_some_and(|i| i.sealed && i.next_offset == seg.next_offset);
        if !seg.done.contains(&me) {
            lock(&self.losing).remove(&id);
        } else if !complete && lock(&self.losing).insert(id) {
            let (segments, losing) = (self.segments.clone(), self.losing.clone());
            tokio::spawn(async move {
                if let Err(e) = report_lost(&segments, id).await {
                    tracing::warn!(segment_id = id, error = %e, "reporting a lost copy failed; retrying");
                    lock(&losing).remove(&id);
                }
            });
        }
        if holds && !complete && lock(&self.finishing).insert(id) {
            let (segments, finishing, stop) = (self.segments.clone(), self.finishing.clone(), self.stop.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = finish(&segments, id) => {}
                    _ = stop.cancelled() => {}
                }
                lock(&finishing).remove(&id);
            });
        } else if !holds && !seg.done.contains(&me) && self.segments.store().info(id).is_some() {
            // Replaced by a copy elsewhere: once that copy is complete, drop ours.
            if seg.replicas.iter().all(|r| seg.done.contains(r)) {
                delete_local(&self.segments, id).await;
            }
        }
    }

    /// Deletes local copies of segments the state dropped (not of those it has not
    /// heard of yet).
    async fn delete_dropped(&self, known: &HashSet<SegmentId>) {
        for local in self.segments.store().list() {
            if known.contains(&local.id) || lock(&self.finishing).contains(&local.id) {
                continue;
            }
            let applied_past = self.segments.cluster().state.read().state.next_segment_id > local.id;
            if applied_past {
                delete_local(&self.segments, local.id).await;
            }
        }
    }
}

/// Fails over an open segment this node was primary of before it restarted, retrying
/// until it is closed: nobody else does (the leader fails over segments whose primary
/// is gone, and this one is ALIVE), and the shard takes no publishes meanwhile.
async fn fail_over_restarted(segments: &Segments, id: SegmentId) {
    tracing::info!(segment_id = id, "this node restarted as the primary of an open segment; failing it over");
    let mut pause = FAIL_OVER_RETRY_MIN;
    for attempt in 1u32.. {
        let open = segments.cluster().state.read().state.segments.get(&id).is_some_and(|s| s.is_open());
        if !open {
            return;
        }
        match super::placement::fail_over(segments, id).await {
            Ok(()) => return,
            // The first failure and then rarely: the replicas may take a while to return.
            Err(e) if attempt == 1 || attempt.is_power_of_two() => {
                tracing::warn!(segment_id = id, error = %e, attempt, "fail-over deferred; retrying")
            }
            Err(_) => {}
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(FAIL_OVER_RETRY_MAX);
    }
}

/// Open segments `me` is primary of that have fewer replicas than their topic's
/// replication factor while more nodes are ALIVE.
fn under_replicated_primaries(state: &ClusterState, me: NodeId) -> Vec<SegmentId> {
    let alive = state.alive_nodes().count();
    state
        .segments
        .iter()
        .filter(|(_, s)| s.is_open() && s.primary == me)
        .filter(|(_, s)| {
            let rf = state.topic(&s.namespace, &s.topic).map_or(0, |t| t.replication_factor as usize);
            s.replicas.len() < rf.min(alive)
        })
        .map(|(id, _)| *id)
        .collect()
}

pub(crate) fn topic_segment_size(segments: &Segments, seg: &SegmentRecord) -> u64 {
    let st = segments.cluster().state.read();
    let topic = st.state.namespaces.get(&seg.namespace).and_then(|ns| ns.topics.get(&seg.topic));
    match topic.map(|t| t.segment_size_max_bytes) {
        Some(n) if n > 0 => n,
        _ => segments.settings().segment_size_max_bytes,
    }
}

/// Tells the cluster this node no longer has its complete copy of a closed segment.
async fn report_lost(segments: &Segments, id: SegmentId) -> Result<(), RequestError> {
    let me = segments.cluster().id;
    tracing::warn!(segment_id = id, "this node's complete copy of a closed segment is gone; fetching it again");
    match segments.cluster().write(Command::SegmentLost { id, node: me }).await {
        Ok(_) => Ok(()),
        Err(e) if e.code == ErrorCode::SegmentNotFound => Ok(()),
        Err(e) => Err(e),
    }
}

async fn delete_local(segments: &Segments, id: SegmentId) {
    let primary = lock(segments.primaries()).remove(&id);
    if let Some(p) = primary {
        p.stop().await;
    }
    segments.take_writer(id);
    match segments.store().delete(id) {
        Ok(()) => tracing::info!(segment_id = id, "deleted local copy of a segment the cluster no longer keeps here"),
        Err(e) => tracing::warn!(segment_id = id, error = %e, "deleting a segment failed"),
    }
}

/// Brings this node's copy of a closed segment to the agreed length, seals it and
/// reports it done. Retries until it succeeds or the segment is gone.
async fn finish(segments: &Segments, id: SegmentId) {
    let mut pause = FINISH_RETRY_MIN;
    loop {
        match finish_once(segments, id).await {
            Ok(true) => return,
            Ok(false) => {}
            Err(e) => tracing::warn!(segment_id = id, error = %e, "completing a closed segment failed; retrying"),
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(FINISH_RETRY_MAX);
    }
}

/// One attempt; `Ok(true)` when finished (or nothing left to do).
async fn finish_once(segments: &Segments, id: SegmentId) -> Result<bool, RequestError> {
    let me = segments.cluster().id;
    let Some(seg) = segments.cluster().state.read().state.segments.get(&id).cloned() else { return Ok(true) };
    if seg.is_open() || !seg.replicas.contains(&me) {
        return Ok(true);
    }
    // The primary task of a segment that rotated ends by itself; after a fail-over it
    // may still run (a false suspicion): stop it, the agreed end is what counts.
    let primary = lock(segments.primaries()).remove(&id);
    if let Some(p) = primary {
        p.stop().await;
    }
    let info = match segments.store().info(id) {
        Some(info) if info.sealed && info.next_offset == seg.next_offset => info,
        _ => match complete_and_seal(segments, id, &seg).await? {
            Some(info) => info,
            None => return Ok(false),
        },
    };
    if !seg.done.is_empty() && info.checksum != seg.checksum {
        tracing::error!(
            segment_id = id,
            local = info.checksum,
            agreed = seg.checksum,
            "local copy differs from the agreed one; fetching it again"
        );
        segments.take_writer(id);
        segments.store().delete(id).map_err(super::storage_error)?;
        return Ok(false);
    }
    if seg.done.contains(&me) {
        return Ok(true);
    }
    report_done(segments, id, &info).await
}

/// Brings this node's copy to the agreed length (truncating it, or appending what a
/// complete copy elsewhere has) and seals it. `None`: not possible yet (no complete
/// copy anywhere, or a replication stream still holds the writer).
async fn complete_and_seal(
    segments: &Segments,
    id: SegmentId,
    seg: &SegmentRecord,
) -> Result<Option<SegmentInfo>, RequestError> {
    let target = seg.next_offset;
    if segments.store().info(id).is_some_and(|i| i.sealed) {
        // A sealed copy of the wrong length: drop it and start over.
        segments.take_writer(id);
        segments.store().delete(id).map_err(super::storage_error)?;
    }
    let writer = segments.writer(id)?;
    let mut next = lock(&writer).next_offset();
    if next > target {
        let w = writer.clone();
        blocking(move || lock(&w).truncate(target)).await?;
        next = target;
    }
    while next < target {
        if seg.done.is_empty() {
            // Nobody has a complete copy yet: a replica with the whole log seals first.
            return Ok(None);
        }
        let r = segments.read(id, seg, next, segments.settings().read_batch_max_bytes, Duration::ZERO).await?;
        let records: Vec<_> = r.records.into_iter().filter(|r| r.offset < target).collect();
        if records.is_empty() {
            return Ok(None);
        }
        let w = writer.clone();
        next = blocking(move || {
            let mut w = lock(&w);
            w.append_records(&records).map(|()| w.next_offset())
        })
        .await?;
    }
    drop(writer);
    let Some(writer) = segments.take_writer(id) else { return Ok(None) };
    let writer = match Arc::try_unwrap(writer) {
        Ok(m) => m.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner),
        Err(shared) => {
            // A replication stream still holds it; it ends once it sees the close.
            lock(&segments.inner.writers).insert(id, shared);
            return Ok(None);
        }
    };
    blocking(move || writer.seal()).await.map(Some)
}

/// Tells the cluster this node now holds a complete copy (`Ok(true)`), or why not.
async fn report_done(segments: &Segments, id: SegmentId, info: &SegmentInfo) -> Result<bool, RequestError> {
    let node = segments.cluster().id;
    let cmd = Command::SegmentDone { id, node, size_bytes: info.size_bytes, checksum: info.checksum };
    match segments.cluster().write(cmd).await {
        Ok(_) => {
            tracing::info!(
                segment_id = id,
                next_offset = info.next_offset,
                "sealed a complete copy of a closed segment"
            );
            Ok(true)
        }
        Err(e) if e.code == ErrorCode::ChecksumMismatch => {
            segments.store().delete(id).map_err(super::storage_error)?;
            Err(e)
        }
        Err(e) if e.code == ErrorCode::SegmentNotFound => Ok(true),
        Err(e) => Err(e),
    }
}

/// Runs storage work on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, eventtermq_storage::StorageError> + Send + 'static,
) -> Result<T, RequestError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RequestError::new(ErrorCode::Internal, format!("blocking task: {e}")))?
        .map_err(super::storage_error)
}
