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
//! - an open segment this node is primary of with a member below its disk watermark
//!   (this node or a replica) is closed the same way, so that its successor is placed
//!   on nodes with room, or, when too few members can write to confirm anything,
//!   refuses publishes until space returns ([`DiskAction`]);
//! - a closed segment this node should hold is truncated or completed to the agreed
//!   length, sealed, checked against the agreed checksum, and reported done;
//! - a closed segment the state says this node holds complete, but whose copy is gone
//!   (quarantined as damaged at startup or after a failed read, or dropped for
//!   differing), is reported lost, so readers go elsewhere, and fetched again as above;
//! - a segment the state no longer has (retention, deleted topic) is deleted;
//! - the replication streams of a segment that is no longer open end
//!   ([`Segments::release_replica`]).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::StreamExt;

use eventtermq_storage::SegmentInfo;
use tokio_util::sync::CancellationToken;

use super::read::ReadRequest;
use super::{lock, primary, Segments};
use crate::cluster_state::{ClusterState, Command, NodeId, SegmentId, SegmentRecord};
use crate::error::{ErrorCode, RequestError};

/// Pause before a pass retries what failed (reporting a lost copy).
const RETRY_PAUSE: Duration = Duration::from_millis(250);

/// Pauses between attempts to fail over a segment this node was primary of before it
/// restarted (doubling from the first to the second).
const FAIL_OVER_RETRY_MIN: Duration = Duration::from_millis(100);
const FAIL_OVER_RETRY_MAX: Duration = Duration::from_secs(1);
/// Pauses between attempts to complete and seal a closed segment's copy (doubling).
const FINISH_RETRY_MIN: Duration = Duration::from_millis(50);
const FINISH_RETRY_MAX: Duration = Duration::from_secs(2);

/// Runs a pass whenever something it acts on changed: the applied cluster state (or
/// the leader), this node's disk level, a primary that got its first record after its
/// age limit passed, a failure's retry; and at the next moment a pass would decide
/// otherwise with nothing changed ([`Keeper::pass`]'s answer: a primary reaching its
/// age limit, a kept duplicate window expiring). No timer runs per segment, and an idle
/// node runs no pass at all.
pub async fn run(segments: Segments, stop: CancellationToken) {
    // Nothing here acts on committed offsets.
    let mut layout_changes = segments.cluster().layout_changes();
    let mut disk_changes = segments.disk().level_changes();
    let mut keeper = Keeper::new(segments, stop.clone());
    let wake = keeper.wake.clone();
    // Primaries past their age limit that hold no record yet (a quiet topic's empty
    // segment stays open): each ends when the segment gets its first record, or its
    // primary stops, and wakes the loop to close it.
    let mut first_records = FuturesUnordered::new();
    let mut last_pass = tokio::time::Instant::now() - super::placement::PASS_SPACING_MIN;
    loop {
        // A burst of changes runs a pass per spacing at most (a pass is linear in the
        // state): see `placement::PASS_SPACING_MIN`.
        tokio::time::sleep_until(last_pass + super::placement::PASS_SPACING_MIN).await;
        last_pass = tokio::time::Instant::now();
        let due = keeper.pass().await.map(|d| tokio::time::Instant::now() + d);
        for (id, mut confirmed) in keeper.first_record_waits.drain(..) {
            first_records.push(async move {
                let _ = confirmed.wait_for(|c| *c > 0).await;
                id
            });
        }
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            r = layout_changes.changed() => if r.is_err() { return },
            r = disk_changes.changed() => if r.is_err() { return },
            _ = wake.notified() => {}
            Some(id) = first_records.next(), if !first_records.is_empty() => {
                keeper.awaiting_first_record.remove(&id);
            }
            _ = sleep_until_due(due) => {}
        }
    }
}

/// Sleeps until `due`; never returns without one.
async fn sleep_until_due(due: Option<tokio::time::Instant>) {
    match due {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
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
    /// Wakes the loop for a retry.
    wake: Arc<tokio::sync::Notify>,
    /// Aged primaries without a record yet whose first record the loop waits for,
    /// and those it is to start waiting for.
    awaiting_first_record: HashSet<SegmentId>,
    first_record_waits: Vec<(SegmentId, crate::watch::Receiver<u64>)>,
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
            wake: Arc::default(),
            awaiting_first_record: HashSet::new(),
            first_record_waits: Vec::new(),
        }
    }

    /// One look at the state: every segment it lists, then local files it dropped.
    /// Answers how long until a pass would decide otherwise on the same state.
    async fn pass(&mut self) -> Option<Duration> {
        let now_unix_ms = self.segments.clock().now_unix_ms();
        let (snapshot, to_rotate, disk_actions, aged) = {
            let st = self.segments.cluster().state.read();
            let snapshot: Vec<(SegmentId, SegmentRecord)> =
                st.state.segments.iter().map(|(id, s)| (*id, s.clone())).collect();
            // This node's own level is the freshest here; the others' as they reported.
            let me_low = self.segments.disk().status().below;
            let low = |n: NodeId| if n == self.me { me_low } else { st.state.disk_low.contains_key(&n) };
            let disk_actions: Vec<(SegmentId, DiskAction)> = st
                .state
                .segments
                .iter()
                .filter(|(_, s)| s.is_open() && s.primary == self.me)
                .map(|(id, s)| (*id, disk_action(s, low)))
                .collect();
            let age_max_ms = self.segments.settings().segment_age_max_ms;
            let aged = aged_primaries(&st.state, self.me, now_unix_ms, age_max_ms);
            let next_age = next_age_limit(&st.state, self.me, now_unix_ms, age_max_ms);
            let mut rotate = under_replicated_primaries(&st.state, self.me);
            rotate.extend(draining_primaries(&st.state, self.me));
            rotate.extend(rotation_asked(&st.state, self.me));
            (snapshot, rotate, disk_actions, (aged, next_age))
        };
        let (aged, next_age) = aged;
        for id in aged {
            let Some(p) = self.segments.primary(id) else { continue };
            // Only one that holds records: a quiet topic's empty segment stays open
            // until its first record.
            if *p.confirmed().borrow() == 0 {
                if self.awaiting_first_record.insert(id) {
                    self.first_record_waits.push((id, p.confirmed()));
                }
            } else if !p.rotating() {
                tracing::info!(segment_id = id, "the segment reached its topic's segment_age_max_ms: closing it");
                p.rotate();
            }
        }
        // Under-replicated ones (more nodes can take data now), those with a node being
        // decommissioned and those a rebalance asked to close.
        for id in to_rotate {
            if let Some(p) = self.segments.primary(id) {
                p.rotate();
            }
        }
        for (id, action) in disk_actions {
            if let Some(p) = self.segments.primary(id) {
                p.set_quorum_disk_low(action == DiskAction::Refuse);
                if action == DiskAction::Rotate && !p.rotating() {
                    tracing::info!(
                        segment_id = id,
                        "a member of the replica set is below its disk watermark: \
                        closing the segment so that its successor goes to nodes with room"
                    );
                    p.rotate();
                }
            }
        }
        let next_prune = self.segments.prune_kept_windows();
        let known: HashSet<SegmentId> = snapshot.iter().map(|(id, _)| *id).collect();
        // Replication streams of segments no longer open let go of their writers.
        let open: HashSet<SegmentId> = snapshot.iter().filter(|(_, s)| s.is_open()).map(|(id, _)| *id).collect();
        self.segments.release_replicas_except(|id| open.contains(&id));
        for (id, seg) in snapshot {
            if seg.is_open() {
                self.open_segment(id, &seg);
            } else {
                self.closed_segment(id, &seg).await;
            }
        }
        self.delete_dropped(&known).await;
        [next_age, next_prune].into_iter().flatten().min()
    }

    /// Starts the primary task of an open segment this node is primary of, or fails it
    /// over when its file predates this process.
    fn open_segment(&mut self, id: SegmentId, seg: &SegmentRecord) {
        if seg.primary != self.me || !self.started.insert(id) {
            return;
        }
        if self.preexisting.contains(&id) {
            let (segments, stop) = (self.segments.clone(), self.stop.clone());
            self.segments.spawn(async move {
                tokio::select! {
                    biased;
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
            let (segments, losing, wake) = (self.segments.clone(), self.losing.clone(), self.wake.clone());
            self.segments.spawn(async move {
                if let Err(e) = report_lost(&segments, id).await {
                    tracing::warn!(segment_id = id, error = %e, "reporting a lost copy failed; retrying");
                    lock(&losing).remove(&id);
                    tokio::time::sleep(RETRY_PAUSE).await;
                    wake.notify_one();
                }
            });
        }
        if holds && !complete && lock(&self.finishing).insert(id) {
            let (segments, finishing, stop) = (self.segments.clone(), self.finishing.clone(), self.stop.clone());
            self.segments.spawn(async move {
                tokio::select! {
                    biased;
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

/// What the primary of an open segment does about the members of its replica set
/// that are below their disk watermark (`low`, itself included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DiskAction {
    /// None is: carry on.
    Write,
    /// Close it like a full one, so that its successor is placed on nodes with room
    /// (a replica that cannot write is replaced like a dead one): enough of the set
    /// can still confirm what was written, so the close completes.
    Rotate,
    /// Too few of the set can write to confirm anything, nor to complete a close:
    /// refuse publishes (rather than leave them waiting) until space returns.
    Refuse,
}

pub(crate) fn disk_action(seg: &SegmentRecord, low: impl Fn(NodeId) -> bool) -> DiskAction {
    if !seg.replicas.iter().any(|n| low(*n)) {
        return DiskAction::Write;
    }
    // The primary holds what it wrote; the replicas with room can take the rest.
    let able = 1 + seg.replicas.iter().filter(|n| **n != seg.primary && !low(**n)).count();
    if able >= seg.quorum() {
        DiskAction::Rotate
    } else {
        DiskAction::Refuse
    }
}

/// Open segments `me` is primary of that have fewer replicas than their topic's
/// replication factor while more nodes could take data (ALIVE, not below their disk
/// watermark: counting those would rotate again and again onto the same nodes).
fn under_replicated_primaries(state: &ClusterState, me: NodeId) -> Vec<SegmentId> {
    let alive = state.data_nodes().count();
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

/// Open segments `me` is primary of whose replica set has a node being decommissioned
/// (`me` included): closed, so that their successors go to the other nodes. An empty
/// one too: the node must not stay in any open segment's replica set.
fn draining_primaries(state: &ClusterState, me: NodeId) -> Vec<SegmentId> {
    if state.draining.is_empty() {
        return Vec::new();
    }
    state
        .segments
        .iter()
        .filter(|(_, s)| s.is_open() && s.primary == me && s.replicas.iter().any(|n| state.draining.contains(n)))
        .map(|(id, _)| *id)
        .collect()
}

/// Open segments `me` is primary of that a rebalance asked to close (`RotateSegments`).
fn rotation_asked(state: &ClusterState, me: NodeId) -> Vec<SegmentId> {
    state.segments.iter().filter(|(_, s)| s.is_open() && s.primary == me && s.rotate).map(|(id, _)| *id).collect()
}

/// This node's open primaries older than their topic's `segment_age_max_ms` (else
/// `node_default_ms`; 0: no limit).
fn aged_primaries(state: &ClusterState, me: NodeId, now_unix_ms: i64, node_default_ms: u64) -> Vec<SegmentId> {
    state
        .segments
        .iter()
        .filter(|(_, s)| s.is_open() && s.primary == me)
        .filter(|(_, s)| {
            let topic_ms = state.topic(&s.namespace, &s.topic).map_or(0, |t| t.segment_age_max_ms);
            let max_ms = if topic_ms > 0 { topic_ms } else { node_default_ms };
            max_ms > 0 && now_unix_ms.saturating_sub(s.created_unix_ms) >= max_ms as i64
        })
        .map(|(id, _)| *id)
        .collect()
}

/// How long until the next of this node's open primaries reaches its age limit (as
/// [`aged_primaries`] counts it); `None` when none has one ahead.
fn next_age_limit(state: &ClusterState, me: NodeId, now_unix_ms: i64, node_default_ms: u64) -> Option<Duration> {
    state
        .segments
        .values()
        .filter(|s| s.is_open() && s.primary == me)
        .filter_map(|s| {
            let topic_ms = state.topic(&s.namespace, &s.topic).map_or(0, |t| t.segment_age_max_ms);
            let max_ms = if topic_ms > 0 { topic_ms } else { node_default_ms };
            let at = s.created_unix_ms.saturating_add(i64::try_from(max_ms).ok()?);
            (max_ms > 0 && at > now_unix_ms).then(|| Duration::from_millis((at - now_unix_ms) as u64))
        })
        .min()
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
        if let Err(e) = segments.disk().admit(0, || format!("completing segment {id}")) {
            // Fetching is data like any other: wait until space returns.
            tracing::debug!(segment_id = id, error = %e, "completing a closed copy waits for disk space");
            return Ok(None);
        }
        let r = segments.read(id, seg, ReadRequest::at(next, segments.settings().read_batch_max_bytes)).await?;
        let records: Vec<_> = r.records.into_iter().filter(|r| r.offset < target).collect();
        if records.is_empty() {
            return Ok(None);
        }
        segments.disk().charge(records.iter().map(|r| r.payload.len() as u64).sum());
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
    crate::clock::spawn_blocking(f)
        .await
        .map_err(|e| RequestError::new(ErrorCode::Internal, format!("blocking task: {e}")))?
        .map_err(super::storage_error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster_state::{DiskLow, NodeRecord, NodeState, SegmentState};

    fn segment(replicas: &[NodeId], min_insync: u32) -> SegmentRecord {
        SegmentRecord {
            namespace: "default".into(),
            topic: "t".into(),
            shard: 0,
            generation: 1,
            state: SegmentState::Open,
            primary: replicas[0],
            replicas: replicas.to_vec(),
            done: vec![],
            next_offset: 0,
            size_bytes: 0,
            checksum: 0,
            created_unix_ms: 0,
            closed_unix_ms: 0,
            min_insync,
            rotate: false,
        }
    }

    #[test]
    fn a_member_below_its_disk_watermark_rotates_the_segment_while_the_rest_make_a_quorum() {
        let seg = segment(&[1, 2, 3], 2);
        let low = |set: &'static [NodeId]| move |n: NodeId| set.contains(&n);
        assert_eq!(disk_action(&seg, low(&[])), DiskAction::Write);
        assert_eq!(disk_action(&seg, low(&[3])), DiskAction::Rotate, "primary and node 2 confirm");
        assert_eq!(disk_action(&seg, low(&[1])), DiskAction::Rotate, "the primary itself: its replicas confirm");
        assert_eq!(disk_action(&seg, low(&[1, 2])), DiskAction::Rotate, "the primary holds its records");
        assert_eq!(disk_action(&seg, low(&[2, 3])), DiskAction::Refuse, "nothing can reach a quorum of 2");
        let all = segment(&[1, 2, 3], 3);
        assert_eq!(disk_action(&all, low(&[3])), DiskAction::Refuse, "min_insync 3 needs every copy");
        let single = segment(&[1], 1);
        assert_eq!(disk_action(&single, low(&[1])), DiskAction::Rotate, "one node: close it; none reopens");
    }

    #[test]
    fn nodes_below_their_watermark_do_not_count_for_a_rotation_to_more_replicas() {
        let mut s = ClusterState::new_cluster();
        for id in 1..=3 {
            let record = NodeRecord { address: format!("n{id}:1"), state: NodeState::Alive };
            s.apply(&Command::SetNode { id, record }).unwrap();
        }
        let spec = crate::cluster_state::TopicSpec {
            shards: 1,
            replication_factor: 3,
            retention_ms: 0,
            default_exchange_type: crate::cluster_state::ExchangeType::Fanout,
            segment_size_max_bytes: 0,
            min_insync_replicas: 0,
            ..Default::default()
        };
        s.apply(&Command::CreateTopic { namespace: "default".into(), name: "t".into(), spec }).unwrap();
        let open = Command::OpenSegment {
            namespace: "default".into(),
            topic: "t".into(),
            shard: 0,
            replicas: vec![1, 2],
            now_unix_ms: 0,
            min_insync: 2,
        };
        s.apply(&open).unwrap();
        assert_eq!(under_replicated_primaries(&s, 1).len(), 1, "node 3 could take a copy");
        let low = Some(DiskLow { free_bytes: 1, free_min_bytes: 2 });
        s.apply(&Command::SetDiskLow { node: 3, low }).unwrap();
        assert!(under_replicated_primaries(&s, 1).is_empty(), "node 3 has no room: rotating would not help");
        s.apply(&Command::SetDiskLow { node: 3, low: None }).unwrap();
        assert_eq!(under_replicated_primaries(&s, 1).len(), 1);
    }
}
