//! The primary of an open segment: one task per segment that owns the order of its
//! records.
//!
//! Publishes queue up while the previous write runs; the task takes everything queued
//! (up to `write_batch_max_bytes`) into one write, and keeps at most one fsync in
//! flight: while batch N is being fsynced, batch N+1 is written (group commit). One
//! stream per replica tails the segment file and sends what it has not sent yet; each
//! replica answers with the offset below which it has fsynced everything. A publish is
//! confirmed when its last record is below the offset its persistence mode needs:
//! written (`NONE`), fsynced here (`PRIMARY`), or fsynced on the segment's quorum of
//! distinct replicas, this node included (`REPLICATED`; a majority of the replica set,
//! or the topic's `min_insync_replicas` when that is more). Consumers only ever see
//! records below the quorum offset, so a fail-over (which keeps the longest log among a
//! set of replicas that intersects every quorum) never takes back what a consumer saw.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use eventtermq_proto::internal::v1::{internal_client::InternalClient, ReplicateRequest};
use eventtermq_storage::{SegmentReader, StorageError};
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{lock, now_unix_ms, storage_error, Segments, SharedWriter};
use crate::cluster_state::{Command, NodeId, SegmentId};
use crate::error::{ErrorCode, RequestError};

/// How durable a publish must be before it is confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    Received,
    Primary,
    Replicated,
}

struct AppendRequest {
    payloads: Vec<Bytes>,
    durability: Durability,
    reply: oneshot::Sender<Result<Range<u64>, RequestError>>,
    /// Holds a share of the primary's write queue until the publish is answered.
    _permit: OwnedSemaphorePermit,
}

/// Handle of a running primary task.
#[derive(Clone)]
pub struct PrimaryHandle {
    pub id: SegmentId,
    tx: mpsc::UnboundedSender<AppendRequest>,
    queue: Arc<Semaphore>,
    /// Size of `queue`; a request bigger than all of it takes all of it.
    queue_units: u32,
    /// Offset below which records are on a quorum of the replica set: what readers see.
    confirmed: watch::Receiver<u64>,
    /// Close the segment once everything written is confirmed, as when it is full.
    rotate: CancellationToken,
    stop: CancellationToken,
    task: Arc<tokio::sync::Mutex<Option<JoinHandle<()>>>>,
}

/// Unit of the write-queue semaphore.
const QUEUE_UNIT_BYTES: usize = 1024;

impl PrimaryHandle {
    /// Appends `payloads` as consecutive records; returns their offsets once they are
    /// as durable as asked. `NotPrimary` means the segment is closing: publish again.
    pub async fn append(&self, payloads: Vec<Bytes>, durability: Durability) -> Result<Range<u64>, RequestError> {
        let bytes: usize = payloads.iter().map(Bytes::len).sum();
        let units = (bytes.div_ceil(QUEUE_UNIT_BYTES)).clamp(1, u32::MAX as usize) as u32;
        let units = units.min(self.queue_units);
        let permit = self.queue.clone().acquire_many_owned(units).await.map_err(|_| closing(self.id))?;
        let (reply, rx) = oneshot::channel();
        self.tx.send(AppendRequest { payloads, durability, reply, _permit: permit }).map_err(|_| closing(self.id))?;
        rx.await.map_err(|_| closing(self.id))?
    }

    /// Offset below which records may be read.
    pub fn confirmed(&self) -> watch::Receiver<u64> {
        self.confirmed.clone()
    }

    /// Asks the task to close the segment as if it were full: it takes no more
    /// publishes (they go to the successor) and closes once all it wrote is confirmed.
    pub fn rotate(&self) {
        self.rotate.cancel();
    }

    pub async fn stop(&self) {
        self.stop.cancel();
        if let Some(t) = self.task.lock().await.take() {
            let _ = t.await;
        }
    }
}

fn closing(id: SegmentId) -> RequestError {
    RequestError::new(ErrorCode::NotPrimary, format!("segment {id} is closing on this node; publish again"))
}

/// Starts the primary task of a newly opened segment; a `REPLICATED` publish is
/// confirmed once `quorum` distinct members of `replicas` fsynced it.
pub fn start(
    segments: &Segments,
    id: SegmentId,
    replicas: Vec<NodeId>,
    quorum: usize,
    size_max_bytes: u64,
) -> Result<PrimaryHandle, RequestError> {
    debug_assert!((1..=replicas.len()).contains(&quorum), "quorum {quorum} of {replicas:?}");
    let writer = segments.writer(id)?;
    let reader = segments.store().reader(id).map_err(storage_error)?;
    let (tx, rx) = mpsc::unbounded_channel();
    let written = lock(&writer).next_offset();
    let (confirmed_tx, confirmed) = watch::channel(written);
    let stop = CancellationToken::new();
    let rotate = CancellationToken::new();
    let queue_units = (segments.settings().write_queue_max_bytes / QUEUE_UNIT_BYTES).clamp(1, 1 << 24) as u32;
    let queue = Arc::new(Semaphore::new(queue_units as usize));
    let task = tokio::spawn(run(Task {
        segments: segments.clone(),
        id,
        writer,
        reader,
        replicas,
        quorum,
        size_max_bytes,
        rx,
        confirmed_tx,
        rotate: rotate.clone(),
        stop: stop.clone(),
    }));
    Ok(PrimaryHandle {
        id,
        tx,
        queue,
        queue_units,
        confirmed,
        rotate,
        stop,
        task: Arc::new(tokio::sync::Mutex::new(Some(task))),
    })
}

struct Task {
    segments: Segments,
    id: SegmentId,
    writer: SharedWriter,
    reader: SegmentReader,
    replicas: Vec<NodeId>,
    quorum: usize,
    size_max_bytes: u64,
    rx: mpsc::UnboundedReceiver<AppendRequest>,
    confirmed_tx: watch::Sender<u64>,
    rotate: CancellationToken,
    stop: CancellationToken,
}

type Waiting = VecDeque<(u64, oneshot::Sender<Result<Range<u64>, RequestError>>, Range<u64>)>;

async fn run(mut t: Task) {
    let me = t.segments.cluster().id;
    let id = t.id;
    let (syncer, mut written) = {
        let w = lock(&t.writer);
        (w.syncer(), w.next_offset())
    };
    // Every member of the replica set, this node included: offset fsynced there.
    let mut durable: HashMap<NodeId, u64> = t.replicas.iter().map(|n| (*n, 0)).collect();
    durable.insert(me, 0);
    let quorum = t.quorum;
    let (written_tx, written_rx) = watch::channel(written);
    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<Ack>();
    let streams = t.stop.child_token();
    for node in t.replicas.iter().copied().filter(|n| *n != me) {
        tokio::spawn(replicate_to(
            t.segments.clone(),
            id,
            node,
            t.reader.clone(),
            written_rx.clone(),
            ack_tx.clone(),
            streams.clone(),
        ));
    }
    let batch_max = t.segments.settings().write_batch_max_bytes;
    let mut sync_task: Option<JoinHandle<Result<u64, StorageError>>> = None;
    let mut wait_primary: Waiting = VecDeque::new();
    let mut wait_majority: Waiting = VecDeque::new();
    let mut last_ts = 0i64;
    let mut rotating = false;
    let mut failure: Option<RequestError> = None;

    loop {
        tokio::select! {
            biased;
            _ = t.stop.cancelled() => break,
            _ = t.rotate.cancelled(), if !rotating => {
                tracing::info!(segment_id = id, "closing the segment so that its successor gets every replica");
                rotating = true;
            }
            r = async { sync_task.as_mut().expect("guarded").await }, if sync_task.is_some() => {
                sync_task = None;
                match r {
                    Ok(Ok(d)) => { durable.insert(me, d); }
                    Ok(Err(e)) => { failure = Some(storage_error(e)); break; }
                    Err(e) => { failure = Some(RequestError::new(ErrorCode::Internal, format!("fsync task: {e}"))); break; }
                }
            }
            Some(ack) = ack_rx.recv() => {
                let e = durable.entry(ack.node).or_insert(0);
                // A new stream starts from what the replica has now: less than before
                // if its copy was damaged and quarantined, and it must not count for
                // records it lost.
                *e = if ack.fresh { ack.durable } else { (*e).max(ack.durable) };
            }
            req = t.rx.recv(), if !rotating => {
                let Some(first) = req else { break };
                let mut bytes: usize = first.payloads.iter().map(Bytes::len).sum();
                let mut batch = vec![first];
                while bytes < batch_max {
                    match t.rx.try_recv() {
                        Ok(r) => {
                            bytes += r.payloads.iter().map(Bytes::len).sum::<usize>();
                            batch.push(r);
                        }
                        Err(_) => break,
                    }
                }
                // Timestamps never go backwards within a segment, so a time look-up
                // can bisect.
                let ts = now_unix_ms().max(last_ts);
                last_ts = ts;
                let payloads: Vec<Bytes> = batch.iter().flat_map(|r| r.payloads.iter().cloned()).collect();
                let appended = {
                    let mut w = lock(&t.writer);
                    w.append(ts, &payloads).map(|range| (range, w.size_bytes()))
                };
                match appended {
                    Ok((range, size)) => {
                        // The fsync is the longest step: start it before anything else.
                        if sync_task.is_none() {
                            let s = syncer.clone();
                            sync_task = Some(tokio::task::spawn_blocking(move || s.sync()));
                        }
                        let mut start = range.start;
                        for r in batch {
                            let end = start + r.payloads.len() as u64;
                            match r.durability {
                                Durability::Received => { let _ = r.reply.send(Ok(start..end)); }
                                Durability::Primary => wait_primary.push_back((end, r.reply, start..end)),
                                Durability::Replicated => wait_majority.push_back((end, r.reply, start..end)),
                            }
                            start = end;
                        }
                        written = range.end;
                        let _ = written_tx.send(written);
                        if size >= t.size_max_bytes {
                            tracing::info!(segment_id = id, size_bytes = size, "segment full; closing it");
                            rotating = true;
                        }
                    }
                    Err(e) => {
                        let e = storage_error(e);
                        for r in batch { let _ = r.reply.send(Err(e.clone())); }
                        failure = Some(e);
                        break;
                    }
                }
            }
        }
        if sync_task.is_none() && durable[&me] < written {
            let s = syncer.clone();
            sync_task = Some(tokio::task::spawn_blocking(move || s.sync()));
        }
        let local = durable[&me];
        let mut all: Vec<u64> = t.replicas.iter().map(|n| durable.get(n).copied().unwrap_or(0)).collect();
        all.sort_unstable_by(|a, b| b.cmp(a));
        let majority = all.get(quorum - 1).copied().unwrap_or(0).min(written);
        while wait_primary.front().is_some_and(|(end, ..)| *end <= local) {
            let (_, reply, range) = wait_primary.pop_front().expect("checked");
            let _ = reply.send(Ok(range));
        }
        while wait_majority.front().is_some_and(|(end, ..)| *end <= majority) {
            let (_, reply, range) = wait_majority.pop_front().expect("checked");
            let _ = reply.send(Ok(range));
        }
        // Readers may already have seen records up to the old value.
        t.confirmed_tx.send_if_modified(|c| {
            let changed = majority > *c;
            *c = (*c).max(majority);
            changed
        });
        if rotating && wait_primary.is_empty() && wait_majority.is_empty() && local == written && majority == written {
            streams.cancel();
            let size = lock(&t.writer).size_bytes();
            close(&t.segments, id, written, size, &t.stop).await;
            break;
        }
    }
    streams.cancel();
    if let Some(s) = sync_task {
        let _ = s.await;
    }
    // Whatever is still waiting is neither confirmed nor refused for good: it may be
    // in the segment and delivered later, which the client learns by its error.
    let err = failure.clone().unwrap_or_else(|| closing(id));
    for (_, reply, _) in wait_primary.into_iter().chain(wait_majority) {
        let _ = reply.send(Err(err.clone()));
    }
    t.rx.close();
    while let Ok(r) = t.rx.try_recv() {
        let _ = r.reply.send(Err(closing(id)));
    }
    lock(t.segments.primaries()).remove(&id);
    if let Some(e) = failure {
        // The file may be damaged past what was confirmed: let the replicas decide
        // where the segment ends.
        tracing::error!(segment_id = id, error = %e, "primary failed; failing the segment over");
        let segments = t.segments.clone();
        tokio::spawn(async move {
            if let Err(e) = super::placement::fail_over(&segments, id).await {
                tracing::warn!(segment_id = id, error = %e, "fail-over after a primary failure did not complete");
            }
        });
    }
}

/// Proposes the close of a full segment; retried until the cluster state has it.
async fn close(segments: &Segments, id: SegmentId, next_offset: u64, size_bytes: u64, stop: &CancellationToken) {
    loop {
        let cmd = Command::CloseSegment {
            id,
            next_offset,
            size_bytes,
            checksum: 0,
            done: Vec::new(),
            now_unix_ms: now_unix_ms(),
        };
        match segments.cluster().write(cmd).await {
            Ok(_) => return,
            Err(e) if matches!(e.code, ErrorCode::SegmentClosed | ErrorCode::SegmentNotFound) => return,
            Err(e) => tracing::warn!(segment_id = id, error = %e, "closing a full segment failed; retrying"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

/// What a replica has fsynced; `fresh` on the first answer of a stream.
struct Ack {
    node: NodeId,
    durable: u64,
    fresh: bool,
}

/// Streams the segment to one replica, reconnecting until stopped.
async fn replicate_to(
    segments: Segments,
    id: SegmentId,
    node: NodeId,
    reader: SegmentReader,
    written: watch::Receiver<u64>,
    acks: mpsc::UnboundedSender<Ack>,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(20);
    let mut failures = 0u32;
    while !stop.is_cancelled() {
        match stream_once(&segments, id, node, &reader, written.clone(), &acks, &stop).await {
            Ok(()) => return,
            Err(e) => {
                failures += 1;
                // Log the first failure and then rarely: a dead replica fails every try.
                if failures == 1 || failures.is_power_of_two() {
                    tracing::warn!(segment_id = id, replica = node, error = %e, failures, "replication stream failed; reconnecting");
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

async fn stream_once(
    segments: &Segments,
    id: SegmentId,
    node: NodeId,
    reader: &SegmentReader,
    mut written: watch::Receiver<u64>,
    acks: &mpsc::UnboundedSender<Ack>,
    stop: &CancellationToken,
) -> Result<(), String> {
    let addr = segments.node_addr(node).ok_or_else(|| format!("node {node} has no address"))?;
    let (tx, rx) = mpsc::channel::<ReplicateRequest>(8);
    tx.send(ReplicateRequest { segment_id: id, records: Vec::new() }).await.map_err(|e| e.to_string())?;
    let mut client = InternalClient::new(segments.network().data_channel(&addr));
    let mut responses = client
        .replicate(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    let first = responses.message().await.map_err(|s| s.message().to_string())?.ok_or("replica closed the stream")?;
    let mut next = first.durable_offset;
    if next > *written.borrow() {
        return Err(format!("replica has {next} records, more than the primary's {}", *written.borrow()));
    }
    let _ = acks.send(Ack { node, durable: next, fresh: true });
    let max_bytes = segments.settings().read_batch_max_bytes;
    loop {
        let behind = next < *written.borrow();
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            r = responses.message() => match r {
                Ok(Some(resp)) => { let _ = acks.send(Ack { node, durable: resp.durable_offset, fresh: false }); }
                Ok(None) => return Err("replica ended the stream".into()),
                Err(s) => return Err(s.message().to_string()),
            },
            permit = tx.reserve(), if behind => {
                let permit = permit.map_err(|_| "stream closed")?;
                let end = *written.borrow();
                let records = reader.read(next, end, max_bytes).map_err(|e| e.to_string())?;
                if let Some(last) = records.last() {
                    next = last.offset + 1;
                }
                permit.send(ReplicateRequest { segment_id: id, records: records.into_iter().map(super::to_wire).collect() });
            }
            r = written.changed(), if !behind => { if r.is_err() { return Ok(()); } }
        }
    }
}
