//! The replica side of a segment: records streamed by the primary are appended in the
//! order received and fsynced in groups (all that has arrived by the time of an fsync);
//! each fsync is answered with the offset below which everything is durable here.

use std::time::Duration;

use eventtermq_proto::internal::v1::{ReplicateRequest, ReplicateResponse, SegmentStatusResponse};
use eventtermq_storage::Syncer;
use futures::{FutureExt, Stream, StreamExt};
use tokio::sync::mpsc;

use super::{from_wire, lock, storage_error, Segments, SharedWriter};
use crate::cluster_state::{NodeId, SegmentId};
use crate::error::{ErrorCode, RequestError};

/// How long a replica waits for the cluster state to show a segment it is asked to
/// replicate (the primary may learn of the segment a moment before this node does).
const STATE_WAIT: Duration = Duration::from_secs(2);

/// Pause between looks at the state while waiting for a segment to show up.
const STATE_POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Answers queued to the primary; the replica waits beyond (the primary reads them
/// as they come, so this is only reached when the connection is slow).
const ANSWER_QUEUE_MAX: usize = 16;

/// The replica's answers on one stream: the offset below which it has everything
/// fsynced, first what it already has, then one per fsync.
pub type ReplicateAnswers = mpsc::Receiver<Result<ReplicateResponse, RequestError>>;

/// Serves one replication stream from a primary: `inbound` names the segment in its
/// first message, then carries consecutive records.
pub async fn handle_replicate(
    segments: Segments,
    mut inbound: impl Stream<Item = Result<ReplicateRequest, RequestError>> + Unpin + Send + 'static,
) -> Result<ReplicateAnswers, RequestError> {
    let first = inbound
        .next()
        .await
        .transpose()?
        .ok_or_else(|| RequestError::new(ErrorCode::InvalidArgument, "segment_id: empty replication stream"))?;
    let id = first.segment_id;
    // Taken before the state is checked: a close or freeze from then on cancels it.
    let released = segments.replica_release(id);
    wait_until_replica(&segments, id).await?;
    if segments.is_frozen(id) {
        return Err(frozen(id));
    }
    let writer = segments.writer(id)?;
    let syncer = lock(&writer).syncer();
    let durable = sync_here(&syncer).await?;
    let (out_tx, out_rx) = mpsc::channel(ANSWER_QUEUE_MAX);
    let _ = out_tx.send(Ok(ReplicateResponse { durable_offset: durable })).await;
    let stream = ReplicaStream { segments: segments.clone(), id, writer, syncer, inbound, out: out_tx, released };
    segments.spawn(stream.run());
    Ok(out_rx)
}

/// One replication stream on the replica: one task appends what arrives and fsyncs it
/// (group commit: everything that has arrived by then goes into one fsync, and what
/// arrives during an fsync into the next). Each fsync is answered with the offset
/// below which everything is durable here.
struct ReplicaStream<S> {
    segments: Segments,
    id: SegmentId,
    writer: SharedWriter,
    syncer: Syncer,
    inbound: S,
    out: mpsc::Sender<Result<ReplicateResponse, RequestError>>,
    /// Cancelled when the segment is frozen, closed or deleted.
    released: tokio_util::sync::CancellationToken,
}

impl<S: Stream<Item = Result<ReplicateRequest, RequestError>> + Unpin> ReplicaStream<S> {
    async fn run(mut self) {
        while let Some(first) = self.next_message().await {
            match self.append_arrived(first) {
                Ok(false) => continue,
                Ok(true) => {}
                Err(Some(e)) => {
                    let _ = self.out.send(Err(e)).await;
                    return;
                }
                // The primary is gone: what was appended is fsynced when the segment
                // is sealed or taken over.
                Err(None) => return,
            }
            let started = std::time::Instant::now();
            let answer = sync_here(&self.syncer).await.map(|durable| ReplicateResponse { durable_offset: durable });
            self.segments.metrics().fsynced(None, started.elapsed().as_secs_f64());
            let failed = answer.is_err();
            if self.out.send(answer).await.is_err() || failed {
                return;
            }
        }
    }

    /// The next message from the primary; `None` when the stream ended, or when the
    /// segment was closed or frozen meanwhile: a primary that died mid-stream may leave
    /// the connection hanging, and the writer must be let go of so that the segment
    /// can be sealed. That is an event ([`Segments::release_replica`], from the
    /// freeze or from the keeper once the state shows the segment closed), not a look
    /// at the state on a timer: an idle stream costs nothing.
    async fn next_message(&mut self) -> Option<ReplicateRequest> {
        tokio::select! {
            biased;
            m = self.inbound.next() => match m {
                Some(Ok(m)) => Some(m),
                _ => None,
            },
            _ = self.released.cancelled() => None,
        }
    }

    /// Appends `first` and every message that has already arrived after it. `Ok(true)`
    /// when records were appended; `Err` stops the stream, with the error to answer.
    fn append_arrived(&mut self, first: ReplicateRequest) -> Result<bool, Option<RequestError>> {
        let mut appended = false;
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            if self.segments.is_frozen(self.id) {
                return Err(Some(frozen(self.id)));
            }
            if !msg.records.is_empty() {
                // Below the disk watermark a replica takes nothing more: the stream ends
                // with the refusal, so the primary cannot count this copy (and retries).
                let bytes: usize = msg.records.iter().map(|r| r.payload.len()).sum();
                let id = self.id;
                self.segments.disk().admit(bytes as u64, || format!("replicating segment {id}")).map_err(Some)?;
                let records: Vec<_> = msg.records.into_iter().map(from_wire).collect();
                lock(&self.writer).append_records(&records).map_err(|e| Some(self.segments.write_error(e)))?;
                appended = true;
            }
            next = match self.inbound.next().now_or_never() {
                Some(Some(Ok(m))) => Some(m),
                Some(_) => return Err(None),
                None => None,
            };
        }
        Ok(appended)
    }
}

/// fsyncs on this task's own thread where the runtime can lend it (multi-threaded) and
/// on the blocking pool otherwise. A confirmation waits for this fsync: handing it to
/// another thread and back adds two thread wake-ups to every one-at-a-time publish
/// (about 60 us of a 0.7 ms W2 confirmation on the benchmark machine).
async fn sync_here(syncer: &Syncer) -> Result<u64, RequestError> {
    if crate::clock::can_block_in_place() {
        return tokio::task::block_in_place(|| syncer.sync()).map_err(storage_error);
    }
    let s = syncer.clone();
    crate::clock::spawn_blocking(move || s.sync())
        .await
        .map_err(|e| RequestError::new(ErrorCode::Internal, format!("fsync task: {e}")))?
        .map_err(storage_error)
}

fn frozen(id: SegmentId) -> RequestError {
    RequestError::new(ErrorCode::SegmentClosed, format!("segment {id} is being failed over; it takes no more records"))
}

/// Waits until this node's state shows `id` open with this node among its replicas.
async fn wait_until_replica(segments: &Segments, id: SegmentId) -> Result<(), RequestError> {
    let me = segments.cluster().id;
    let deadline = tokio::time::Instant::now() + STATE_WAIT;
    loop {
        {
            let st = segments.cluster().state.read();
            match st.state.segments.get(&id) {
                Some(s) if !s.is_open() => return Err(frozen(id)),
                Some(s) if s.replicas.contains(&me) && s.primary != me => return Ok(()),
                Some(_) => {
                    return Err(RequestError::new(
                        ErrorCode::NotPrimary,
                        format!("segment_id: node {me} is not a replica of segment {id}"),
                    ))
                }
                None => {}
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(RequestError::new(
                ErrorCode::SegmentNotFound,
                format!("segment_id: segment {id} is unknown here"),
            ));
        }
        tokio::time::sleep(STATE_POLL_INTERVAL).await;
    }
}

/// What this node holds of a segment; with `freeze`, it first stops taking records.
pub async fn status(segments: &Segments, id: SegmentId, freeze: bool) -> Result<SegmentStatusResponse, RequestError> {
    if freeze {
        segments.freeze(id);
    }
    let writer = lock(&segments.inner.writers).get(&id).cloned();
    if let Some(w) = writer {
        let s = crate::clock::spawn_blocking(move || {
            let mut w = lock(&w);
            w.sync().map(|next| (next, w.size_bytes()))
        })
        .await
        .map_err(|e| RequestError::new(ErrorCode::Internal, e.to_string()))?;
        let (next_offset, size_bytes) = s.map_err(storage_error)?;
        return Ok(SegmentStatusResponse { exists: true, next_offset, size_bytes, checksum: 0 });
    }
    Ok(match segments.store().info(id) {
        Some(info) => SegmentStatusResponse {
            exists: true,
            next_offset: info.next_offset,
            size_bytes: info.size_bytes,
            checksum: if info.sealed { info.checksum } else { 0 },
        },
        None => SegmentStatusResponse { exists: false, next_offset: 0, size_bytes: 0, checksum: 0 },
    })
}

/// Pause between looks while a stopping node waits for the other copies of its open
/// segments to catch up.
const COPIES_WAIT_POLL: Duration = Duration::from_millis(100);
/// Segments asked about at once while a stopping node waits for other copies.
const COPIES_WAIT_ASKS_MAX: usize = 64;

/// Where one open segment stands without this node's copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OtherCopies {
    /// The primary and enough replicas hold what the primary held: stopping this copy
    /// does not hold confirmations up.
    Enough,
    /// Too few are caught up yet, but enough of them answer to get there.
    CatchingUp,
    /// Too few copies answer for this one's wait to help (the primary or the others are
    /// down: the whole cluster may be stopping).
    Unreachable,
}

/// `quorum`: copies a record needs before it is confirmed; `primary_end`: what the
/// primary held when asked (`None`: it did not answer); `others`: what each other
/// replica held (not this node's copy, not the primary's), asked after the primary.
fn other_copies(quorum: usize, primary_end: Option<u64>, others: &[Option<u64>]) -> OtherCopies {
    let Some(end) = primary_end else { return OtherCopies::Unreachable };
    let answering = 1 + others.iter().flatten().count();
    let caught_up = 1 + others.iter().flatten().filter(|n| **n >= end).count();
    if caught_up >= quorum {
        OtherCopies::Enough
    } else if answering >= quorum {
        OtherCopies::CatchingUp
    } else {
        OtherCopies::Unreachable
    }
}

/// Graceful shutdown of a replica, as Kafka's controlled shutdown waits for in-sync
/// replicas: waits, at most `max`, until every open segment this node holds a copy of
/// (and is not primary of) has a quorum of caught-up copies without this one. A
/// replica that restarted a moment ago (the previous pod of a rolling restart) may
/// still be catching up; stopping this copy before it has would leave the primary
/// without a quorum until it has. Segments whose other copies do not answer are not
/// waited for. Returns how many segments were still short when it gave up.
pub async fn wait_for_other_copies(segments: &Segments, max: Duration) -> usize {
    let me = segments.cluster().id;
    let deadline = tokio::time::Instant::now() + max;
    let started = tokio::time::Instant::now();
    let mut waited_for = 0;
    loop {
        let open: Vec<(SegmentId, NodeId, Vec<NodeId>, usize)> = {
            let st = segments.cluster().state.read();
            let open = st.state.segments.iter().filter(|(_, s)| s.is_open() && s.primary != me);
            let mine = open.filter(|(_, s)| s.replicas.contains(&me));
            mine.map(|(id, s)| (*id, s.primary, s.replicas.clone(), s.quorum())).collect()
        };
        let asks = open.into_iter().map(|(id, primary, replicas, quorum)| async move {
            // A node that answers and has no copy yet holds nothing of it so far.
            let held = |node: NodeId| async move {
                let addr = segments.node_addr(node).ok()?;
                let r = segments.peers().segment_status(node, &addr, id, false).await.ok()?;
                Some(r)
            };
            let primary_end = held(primary).await.filter(|r| r.exists).map(|r| r.next_offset);
            let others = replicas.iter().filter(|n| **n != me && **n != primary).map(|n| held(*n));
            let others: Vec<Option<u64>> =
                futures::future::join_all(others).await.into_iter().map(|r| r.map(|r| r.next_offset)).collect();
            other_copies(quorum, primary_end, &others)
        });
        let verdicts: Vec<OtherCopies> =
            futures::stream::iter(asks).buffer_unordered(COPIES_WAIT_ASKS_MAX).collect().await;
        let short = verdicts.iter().filter(|v| **v == OtherCopies::CatchingUp).count();
        if short == 0 {
            if waited_for > 0 {
                tracing::info!(
                    segments = waited_for,
                    waited_ms = started.elapsed().as_millis() as u64,
                    "the other copies of this node's open segments caught up; stopping"
                );
            }
            return 0;
        }
        if waited_for == 0 {
            tracing::info!(
                segments = short,
                "waiting for the other copies of open segments to catch up before stopping"
            );
        }
        waited_for = waited_for.max(short);
        if tokio::time::Instant::now() + COPIES_WAIT_POLL > deadline {
            tracing::warn!(
                segments = short,
                waited_ms = started.elapsed().as_millis() as u64,
                "stopping although open segments this node holds a copy of have too few caught-up copies \
                 elsewhere (--shutdown-copies-wait-ms): their publishes wait until those catch up"
            );
            return short;
        }
        tokio::time::sleep(COPIES_WAIT_POLL).await;
    }
}

/// Pause between looks while a node that just started waits to catch up.
const CATCH_UP_POLL: Duration = Duration::from_millis(200);

/// What a node that just started still lacks before it takes part fully (readiness:
/// the next pod of a rolling restart stops only once this one has it all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatchUp {
    /// No Raft leader known yet, or this node's state lacks what the leader committed
    /// (the leader cannot reach it yet: a restarted pod's new address takes seconds
    /// to reach the other nodes' DNS answers).
    Raft,
    /// This many open segments it copies are shorter here than at their primary.
    Segments(usize),
    /// Caught up.
    Done,
}

/// Waits, at most `max`, until this node caught up after its start: its Raft state
/// holds everything committed when asked (a linearizable read: the leader's log has
/// reached this node), and each open segment it holds a copy of (and is not primary
/// of) is as long here as its primary's was when asked (the primary's replication
/// stream reaches this node). A segment whose primary does not answer is not waited
/// for. Returns where it stood when it returned.
pub async fn catch_up_at_start(segments: &Segments, max: Duration) -> CatchUp {
    let me = segments.cluster().id;
    let started = tokio::time::Instant::now();
    let deadline = started + max;
    let mut logged = false;
    loop {
        let left = catch_up_step(segments, me).await;
        if left == CatchUp::Done {
            if logged {
                tracing::info!(waited_ms = started.elapsed().as_millis() as u64, "caught up; ready");
            }
            return left;
        }
        if !logged {
            tracing::info!(missing = ?left, "catching up before becoming ready");
            logged = true;
        }
        if tokio::time::Instant::now() + CATCH_UP_POLL > deadline {
            tracing::warn!(missing = ?left, waited_ms = started.elapsed().as_millis() as u64,
                "ready although not caught up (--ready-catch-up-max-ms)");
            return left;
        }
        tokio::time::sleep(CATCH_UP_POLL).await;
    }
}

async fn catch_up_step(segments: &Segments, me: NodeId) -> CatchUp {
    let cluster = segments.cluster();
    if cluster.leader().is_none() {
        return CatchUp::Raft;
    }
    // Bounded by the request timeout; a leader that cannot reach this node keeps the
    // read waiting for its apply.
    let read = tokio::time::timeout(CATCH_UP_READ_MAX, async { cluster.read(true).await.map(drop) }).await;
    if !matches!(read, Ok(Ok(()))) {
        return CatchUp::Raft;
    }
    let copies: Vec<(SegmentId, NodeId)> = {
        let st = cluster.state.read();
        let open = st.state.segments.iter().filter(|(_, s)| s.is_open() && s.primary != me);
        open.filter(|(_, s)| s.replicas.contains(&me)).map(|(id, s)| (*id, s.primary)).collect()
    };
    let asks = copies.into_iter().map(|(id, primary)| async move {
        let addr = segments.node_addr(primary).ok()?;
        let theirs = segments.peers().segment_status(primary, &addr, id, false).await.ok()?;
        if !theirs.exists {
            return None;
        }
        let mine = status(segments, id, false).await.map(|r| if r.exists { r.next_offset } else { 0 }).unwrap_or(0);
        (mine < theirs.next_offset).then_some(id)
    });
    let short = futures::stream::iter(asks).buffer_unordered(COPIES_WAIT_ASKS_MAX).filter_map(|s| async move { s });
    match short.count().await {
        0 => CatchUp::Done,
        n => CatchUp::Segments(n),
    }
}

/// Bound on one linearizable read while catching up at start.
const CATCH_UP_READ_MAX: Duration = Duration::from_secs(2);

#[cfg(test)]
mod copies_tests {
    use super::*;

    #[test]
    fn a_stopping_copy_waits_only_when_waiting_can_help() {
        use OtherCopies::*;
        // Three copies, quorum 2: the primary and one caught-up replica are enough.
        assert_eq!(other_copies(2, Some(10), &[Some(10)]), Enough);
        assert_eq!(other_copies(2, Some(10), &[Some(12)]), Enough, "it got more since the primary was asked");
        assert_eq!(other_copies(2, Some(10), &[Some(7)]), CatchingUp, "restarted, still catching up");
        assert_eq!(other_copies(2, Some(10), &[None]), Unreachable, "the other replica is down too");
        assert_eq!(other_copies(2, None, &[Some(10)]), Unreachable, "the primary is down: a fail-over's job");
        // Five copies, quorum 3.
        assert_eq!(other_copies(3, Some(5), &[Some(5), Some(1), None]), CatchingUp);
        assert_eq!(other_copies(3, Some(5), &[Some(5), Some(5), None]), Enough);
        assert_eq!(other_copies(3, Some(5), &[None, Some(1), None]), Unreachable);
        // One copy left besides this one is the primary: quorum 1 needs no one else.
        assert_eq!(other_copies(1, Some(5), &[]), Enough);
    }
}
