//! The duplicate window's way from one generation of a shard to the next (the pure
//! window is [`super::dedupe`]).
//!
//! A primary that stops (its segment rotated, or it was stopped for a fail-over or a
//! graceful shutdown) keeps its window on the node ([`Segments::keep_window`]), and
//! the primary of the shard's next generation starts from it: locally, or asked for
//! over `Internal.DedupeWindow`, then trimmed to the segment's agreed end. When that
//! primary is gone (kill -9, a restart: the window lived in its memory), the new one
//! reads the generation's records instead, which carry their keys, and continues with
//! the generation before it the same way, back to one closed before the window began
//! or one whose window is still kept somewhere. A rotation, the frequent case, costs
//! one small call; a crash costs a read of the crashed primary's segment.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use eventtermq_proto::internal::v1::{DedupeEntry, PublishKey};

use super::dedupe::{stored_at, stored_key, Key, Stored, Window};
use super::read::ReadRequest;
use super::{lock, Segments};
use crate::cluster_state::{SegmentId, SegmentRecord};
use crate::error::{ErrorCode, RequestError};

/// Pauses between attempts to load a window (doubling from the first).
const LOAD_RETRY_MIN: Duration = Duration::from_millis(50);
const LOAD_RETRY_MAX: Duration = Duration::from_secs(1);

/// A window as kept and handed over: (key, where, when), oldest first.
pub type Kept = Arc<Vec<(Key, Stored, i64)>>;

/// The window of the open segment `id`'s shard as its previous generations left it.
/// Retried until it succeeds (the caller drops it when the primary stops): keyed
/// publishes wait meanwhile, and taking them without it could store a repeat twice.
pub(crate) async fn load<T>(segments: Segments, id: SegmentId) -> Window<T> {
    let mut pause = LOAD_RETRY_MIN;
    let mut attempt = 0u32;
    loop {
        attempt = attempt.saturating_add(1);
        match load_once(&segments, id).await {
            Ok(w) => {
                if attempt > 1 || !w.is_empty() {
                    tracing::info!(
                        segment_id = id,
                        entries = w.len(),
                        "duplicate window of exactly-once publishes loaded"
                    );
                }
                return w;
            }
            Err(e) if attempt == 1 || attempt.is_power_of_two() => {
                tracing::warn!(segment_id = id, error = %e, attempt,
                    "loading the duplicate window failed; keyed publishes wait; retrying")
            }
            Err(_) => {}
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(LOAD_RETRY_MAX);
    }
}

async fn load_once<T>(segments: &Segments, id: SegmentId) -> Result<Window<T>, RequestError> {
    let settings = segments.settings();
    let mut window = Window::new(settings.dedupe_window_ms, settings.dedupe_window_entries_max);
    let previous = previous_generations(segments, id);
    let now = segments.clock().now_unix_ms();
    let horizon = now.saturating_sub(settings.dedupe_window_ms.min(i64::MAX as u64) as i64);
    // Newest first: the first generation whose window is kept somewhere covers all
    // before it; those after it are read.
    let mut read: Vec<(SegmentId, SegmentRecord)> = Vec::new();
    let mut read_bytes = 0u64;
    let read_max = settings.dedupe_rebuild_read_max_bytes;
    let mut base = None;
    for (pid, seg) in previous {
        if seg.closed_unix_ms < horizon {
            break; // every record in it is older than the window
        }
        if let Some(kept) = ask(segments, pid, seg.primary).await {
            base = Some((pid, seg.next_offset, kept));
            break;
        }
        if no_copy_left(segments, &seg) {
            // Waiting for it would stop keyed publishes to the shard until a node that
            // held it comes back; its messages cannot be read meanwhile either.
            tracing::warn!(
                segment_id = id,
                "no node that holds segment {pid} is up: keyed publishes stored there are not recognized as \
                 repeats"
            );
            continue;
        }
        read_bytes += seg.size_bytes;
        if read_bytes > read_max {
            tracing::warn!(
                segment_id = id,
                "rebuilding the duplicate window would read more than {read_max} bytes \
                 (--dedupe-rebuild-read-max-bytes); keyed publishes stored before segment {pid} closed are not \
                 recognized as repeats"
            );
            break;
        }
        read.push((pid, seg));
    }
    if let Some((pid, end, kept)) = base {
        for (key, stored, at) in kept.iter() {
            window.insert_stored(*key, *stored, *at);
        }
        window.trim(pid, end);
    }
    for (pid, seg) in read.iter().rev() {
        read_keys(segments, *pid, seg, &mut window).await?;
        tracing::info!(segment_id = id, read = pid, "duplicate window rebuilt from a previous generation's records");
    }
    window.evict(now);
    Ok(window)
}

/// The closed generations before `id` of its shard, newest first.
fn previous_generations(segments: &Segments, id: SegmentId) -> Vec<(SegmentId, SegmentRecord)> {
    let st = segments.cluster().state.read();
    let Some(seg) = st.state.segments.get(&id) else { return Vec::new() };
    let mut previous: Vec<(SegmentId, SegmentRecord)> = st
        .state
        .topic_segments(&seg.namespace, &seg.topic)
        .filter(|(_, s)| s.shard == seg.shard && s.generation < seg.generation && !s.is_open())
        .map(|(id, s)| (id, s.clone()))
        .collect();
    previous.sort_by_key(|(_, s)| std::cmp::Reverse(s.generation));
    previous
}

/// Every node that holds (or should hold) a copy of `seg` is DEAD, LEFT or gone.
fn no_copy_left(segments: &Segments, seg: &SegmentRecord) -> bool {
    let st = segments.cluster().state.read();
    seg.replicas.iter().chain(&seg.done).all(|n| st.state.node_gone(*n))
}

/// The window the primary of closed segment `id` kept, if it still has it.
async fn ask(segments: &Segments, id: SegmentId, primary: u64) -> Option<Kept> {
    if primary == segments.cluster().id {
        return segments.kept_window(id);
    }
    let addr = segments.node_addr(primary).ok()?;
    match segments.peers().dedupe_window(primary, &addr, id).await {
        Ok(Some(entries)) => Some(Arc::new(entries.into_iter().filter_map(from_wire).collect())),
        Ok(None) => None,
        Err(e) => {
            tracing::debug!(segment_id = id, node = primary, error = %e, "asking for a duplicate window failed");
            None
        }
    }
}

/// Adds the keyed requests stored in closed segment `id` (its first records carry
/// their keys) to `window`.
async fn read_keys<T>(
    segments: &Segments,
    id: SegmentId,
    seg: &SegmentRecord,
    window: &mut Window<T>,
) -> Result<(), RequestError> {
    let end = seg.next_offset;
    let mut from = 0;
    while from < end {
        let r = segments.read(id, seg, ReadRequest::at(from, segments.settings().read_batch_max_bytes)).await?;
        if r.records.is_empty() {
            let msg = format!("segment {id} has no readable copy of offset {from} yet");
            return Err(RequestError::new(ErrorCode::NotReady, msg));
        }
        for record in r.records.iter().filter(|r| r.offset < end) {
            if let Some(key) = stored_key(&record.payload) {
                let (key, stored) = stored_at(&key, id, record.offset, end);
                window.insert_stored(key, stored, record.timestamp_ms);
            }
            from = record.offset + 1;
        }
    }
    Ok(())
}

impl Segments {
    /// Keeps the window of segment `id`, whose primary this node was, for the shard's
    /// next generation. One per shard: a later generation's window covers the earlier
    /// ones'.
    pub(crate) fn keep_window(&self, id: SegmentId, entries: Vec<(Key, Stored, i64)>) {
        let st = self.cluster().state.read();
        let shard_of =
            |id: &SegmentId| st.state.segments.get(id).map(|s| (s.namespace.clone(), s.topic.clone(), s.shard));
        let Some(mine) = shard_of(&id) else { return };
        let mut kept = lock(&self.inner.kept_windows);
        kept.retain(|other, _| *other > id || shard_of(other).is_some_and(|s| s != mine));
        kept.insert(id, Arc::new(entries));
    }

    /// The window kept of closed segment `id`, if this node has it.
    pub(crate) fn kept_window(&self, id: SegmentId) -> Option<Kept> {
        lock(&self.inner.kept_windows).get(&id).cloned()
    }

    /// Drops kept windows nobody needs any more: their segment is gone, or closed
    /// before the window began (everything in them is too old).
    /// Answers how long until the next kept window expires (`None`: none kept).
    pub(crate) fn prune_kept_windows(&self) -> Option<std::time::Duration> {
        let window_ms = self.settings().dedupe_window_ms.min(i64::MAX as u64) as i64;
        let now = self.clock().now_unix_ms();
        let horizon = now.saturating_sub(window_ms);
        let st = self.cluster().state.read();
        let mut kept = lock(&self.inner.kept_windows);
        kept.retain(|id, _| st.state.segments.get(id).is_some_and(|s| s.is_open() || s.closed_unix_ms >= horizon));
        // A window of a segment still open expires only after it closes: a state change.
        kept.keys()
            .filter_map(|id| st.state.segments.get(id).filter(|s| !s.is_open()))
            .map(|s| s.closed_unix_ms.saturating_add(window_ms).saturating_sub(now).max(0) as u64 + 1)
            .min()
            .map(std::time::Duration::from_millis)
    }
}

/// Kept windows by segment: see [`Segments::keep_window`].
pub(crate) type KeptWindows = BTreeMap<SegmentId, Kept>;

pub(crate) fn to_wire((key, stored, at): &(Key, Stored, i64)) -> DedupeEntry {
    DedupeEntry {
        key: Some(PublishKey {
            producer_id: key.producer,
            sequence: key.sequence,
            count: stored.total,
            stored_before: stored.stored_before,
        }),
        segment_id: stored.segment,
        first_offset: stored.first_offset,
        stored_count: stored.count,
        timestamp_ms: *at,
    }
}

fn from_wire(e: DedupeEntry) -> Option<(Key, Stored, i64)> {
    let k = e.key?;
    let stored = Stored {
        segment: e.segment_id,
        first_offset: e.first_offset,
        count: e.stored_count,
        stored_before: k.stored_before,
        total: k.count,
    };
    Some((Key { producer: k.producer_id, sequence: k.sequence }, stored, e.timestamp_ms))
}
