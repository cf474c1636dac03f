//! The primary of an open segment: one task per segment that owns the order of its
//! records.
//!
//! Publishes queue up while the previous write runs; the task takes everything queued
//! (up to `write_batch_max_bytes`) into one write, and keeps at most one fsync in
//! flight: while batch N is being fsynced on the blocking pool, batch N+1 is written
//! (group commit). With nothing more queued and a publish waiting for the fsync (a
//! publisher waiting for its confirmation) the fsync runs on the task's own thread
//! instead, so the confirmation is not handed to another thread and back; with no
//! publish waiting for it (persistence `NONE`) it stays on the blocking pool, out of
//! the way of the next publish. One stream per replica tails the segment file and sends
//! what it has not sent yet; each replica answers with the offset below which it has
//! fsynced everything, and the primary task reads those answers itself. A publish is
//! confirmed when its last record is below the offset its persistence mode needs:
//! written (`NONE`), fsynced here (`PRIMARY`), or fsynced on the segment's quorum of
//! distinct replicas, this node included (`REPLICATED`; a majority of the replica set,
//! or the topic's `min_insync_replicas` when that is more). Consumers only ever see
//! records below the quorum offset, so a fail-over (which keeps the longest log among a
//! set of replicas that intersects every quorum) never takes back what a consumer saw.
//!
//! What is confirmed when is decided by the pure [`Confirmations`] core, and which keyed
//! publish is a repeat by the pure duplicate [`Window`] (exactly-once publishing; the
//! window is loaded from the shard's previous generation by [`super::window`] before
//! the first keyed publish is taken, while unkeyed ones flow); this module is the
//! driver around them: the queue, the file, the fsync and the replica streams.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use eventtermq_proto::internal::v1::{PublishKey, ReplicateRequest};
use eventtermq_storage::{StorageError, Syncer};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::confirm::Confirmations;
pub use super::confirm::Durability;
use super::dedupe::{encode_key, Begin, Key, Stored, Window};
use super::traced::{Traces, PUBLISH_TRACE_TARGET};
use super::{lock, storage_error, Segments, SharedWriter};
use crate::cluster_state::{Command, NodeId, SegmentId};
use crate::error::{ErrorCode, RequestError};
use crate::metrics::SegmentProgress;
use crate::peers::ReplicaAnswers;
use crate::watch;

/// A publish's turn in a stream whose requests must be stored in the order they
/// came (see [`Segments::publish_in_turn`](super::Segments::publish_in_turn)): held
/// from the first routing attempt until the request is queued here, or forwarded and
/// answered; dropping it lets the next request of the stream go (its receiver ends).
pub type Turn = oneshot::Sender<()>;

struct AppendRequest {
    payloads: Vec<Bytes>,
    durability: Durability,
    /// Producer id and sequence of an exactly-once publish.
    key: Option<Key>,
    reply: Reply,
    /// Holds a share of the primary's write queue until the publish is answered.
    _permit: OwnedSemaphorePermit,
    /// The publish's `append` span (traces on) or `Span::none()`.
    trace: tracing::Span,
    /// Its `queue` span: ends when the primary task takes it.
    _queue: tracing::Span,
}

/// Handle of a running primary task.
#[derive(Clone)]
pub struct PrimaryHandle {
    pub id: SegmentId,
    /// Never full: every request holds at least one of the queue's units, and the
    /// channel has room for as many requests as there are units.
    /// Boxed: a channel allocates room for 32 of its items when it is made, 5 KiB of
    /// unboxed requests for every primary, busy or not (10,000 quiet topics: 16 MiB
    /// per node).
    tx: mpsc::Sender<Box<AppendRequest>>,
    queue: Arc<Semaphore>,
    /// Size of `queue`; a request bigger than all of it takes all of it.
    queue_units: u32,
    /// Offset below which records are on a quorum of the replica set: what readers see.
    confirmed: watch::Receiver<u64>,
    /// Close the segment once everything written is confirmed, as when it is full.
    rotate: CancellationToken,
    /// Too many of the replicas are below their disk watermark to make a quorum: the
    /// keeper sets it, and publishes are refused meanwhile rather than left waiting.
    quorum_disk_low: Arc<AtomicBool>,
    /// What is written, confirmed and fsynced where, for the metrics.
    pub progress: Arc<SegmentProgress>,
    stop: CancellationToken,
    task: Arc<tokio::sync::Mutex<Option<JoinHandle<Option<()>>>>>,
}

/// Unit of the write-queue semaphore.
const QUEUE_UNIT_BYTES: usize = 1024;
/// Most units of the write queue (`write_queue_max_bytes` above 16 GiB counts as that).
const QUEUE_UNITS_MAX: usize = 1 << 24;
/// Replica streams (re)connected and not yet taken by the primary task; a stream waits beyond.
const CONNECTED_QUEUE_MAX: usize = 64;
/// Pause between attempts to record the close of a full segment.
const CLOSE_RETRY_PAUSE: Duration = Duration::from_millis(100);
/// Pauses between reconnections of a replication stream (doubling from the first).
const STREAM_RETRY_MIN: Duration = Duration::from_millis(20);
const STREAM_RETRY_MAX: Duration = Duration::from_secs(1);
/// Replication messages in flight to one replica; the stream waits beyond.
const STREAM_IN_FLIGHT_MAX: usize = 8;

/// Where a publish's messages are, as its answer says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub segment_id: SegmentId,
    pub first_offset: u64,
    pub count: u32,
    /// Messages of the request an earlier attempt stored in an earlier generation.
    pub stored_before: u32,
    /// The answer of an earlier attempt with the same key: nothing was stored now.
    pub duplicate: bool,
}

impl Appended {
    fn of(stored: Stored, duplicate: bool) -> Self {
        Appended {
            segment_id: stored.segment,
            first_offset: stored.first_offset,
            count: stored.count,
            stored_before: stored.stored_before,
            duplicate,
        }
    }
}

impl PrimaryHandle {
    /// Appends `payloads` as consecutive records; answers where they are once they are
    /// as durable as asked. With a `key`, a request this shard stored before (within
    /// the duplicate window) is answered as it was then and not stored again.
    /// `NotPrimary` means the segment is closing: publish again.
    pub async fn append(
        &self,
        payloads: Vec<Bytes>,
        durability: Durability,
        key: Option<Key>,
        turn: &mut Option<Turn>,
    ) -> Result<Appended, RequestError> {
        let bytes: usize = payloads.iter().map(Bytes::len).sum();
        let units = (bytes.div_ceil(QUEUE_UNIT_BYTES)).clamp(1, u32::MAX as usize) as u32;
        let units = units.min(self.queue_units);
        let permit = self.queue.clone().acquire_many_owned(units).await.map_err(|_| closing(self.id))?;
        let (reply, rx) = oneshot::channel();
        // A publish's path on the primary, when publish traces are on: queued, written,
        // fsynced here and on replicas, confirmed. Off, both are `Span::none()`.
        let trace = tracing::trace_span!(target: PUBLISH_TRACE_TARGET, "append", segment_id = self.id,
            records = payloads.len());
        let queue = tracing::trace_span!(target: PUBLISH_TRACE_TARGET, parent: &trace, "queue");
        let req = Box::new(AppendRequest { payloads, durability, key, reply, _permit: permit, trace, _queue: queue });
        self.tx.send(req).await.map_err(|_| closing(self.id))?;
        // Queued: the next request of the stream may go (not before: a request that
        // was not queued keeps its turn while it routes again).
        drop(turn.take());
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

    /// Whether [`PrimaryHandle::rotate`] was called.
    pub fn rotating(&self) -> bool {
        self.rotate.is_cancelled()
    }

    /// Whether too many replicas are below their disk watermark to confirm a publish.
    pub fn set_quorum_disk_low(&self, low: bool) {
        self.quorum_disk_low.store(low, Ordering::Relaxed);
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
    let queue_units = (segments.settings().write_queue_max_bytes / QUEUE_UNIT_BYTES).clamp(1, QUEUE_UNITS_MAX);
    let (tx, rx) = mpsc::channel(queue_units);
    let queue_units = queue_units as u32;
    let written = lock(&writer).next_offset();
    let (confirmed_tx, confirmed) = watch::channel(written);
    let stop = CancellationToken::new();
    let rotate = CancellationToken::new();
    let queue = Arc::new(Semaphore::new(queue_units as usize));
    let quorum_disk_low = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(SegmentProgress::new(&replicas));
    let task = segments.spawn(run(Task {
        segments: segments.clone(),
        id,
        writer,
        replicas,
        quorum,
        size_max_bytes,
        rx,
        confirmed_tx,
        last_timestamp_ms: 0,
        window: None,
        held: VecDeque::new(),
        rotate: rotate.clone(),
        quorum_disk_low: quorum_disk_low.clone(),
        progress: progress.clone(),
        traces: Traces::default(),
        stop: stop.clone(),
    }));
    Ok(PrimaryHandle {
        id,
        tx,
        queue,
        queue_units,
        confirmed,
        rotate,
        quorum_disk_low,
        progress,
        stop,
        task: Arc::new(tokio::sync::Mutex::new(Some(task))),
    })
}

struct Task {
    segments: Segments,
    id: SegmentId,
    writer: SharedWriter,
    replicas: Vec<NodeId>,
    quorum: usize,
    size_max_bytes: u64,
    rx: mpsc::Receiver<Box<AppendRequest>>,
    confirmed_tx: watch::Sender<u64>,
    last_timestamp_ms: i64,
    /// The duplicate window of exactly-once publishes; `None` until loaded.
    window: Option<Window<Reply>>,
    /// Keyed publishes taken before the window was loaded, in order.
    held: VecDeque<AppendRequest>,
    rotate: CancellationToken,
    quorum_disk_low: Arc<AtomicBool>,
    progress: Arc<SegmentProgress>,
    /// Traced publishes waiting for fsyncs and replicas (empty while traces are off).
    traces: Traces,
    stop: CancellationToken,
}

type Reply = oneshot::Sender<Result<Appended, RequestError>>;

/// A publish the [`Confirmations`] core holds until it is as durable as asked.
struct Waiting {
    reply: Reply,
    key: Option<Key>,
    /// Messages of the request an earlier generation stored (see [`Appended`]).
    stored_before: u32,
    /// The publish's `append` span, which ends once it is answered (and its `fsync`
    /// and `replicate` ended).
    trace: tracing::Span,
}

/// The one fsync of this segment's file in flight at a time (on the blocking pool).
struct Fsync {
    syncer: Syncer,
    running: Option<JoinHandle<Result<u64, StorageError>>>,
    /// When the running fsync started, and the offset durable before it (metrics).
    started: (std::time::Instant, u64),
    metrics: crate::metrics::Metrics,
    /// An fsync that fails for want of space (thin provisioning, network filesystems)
    /// puts the node below its watermark at once.
    disk: crate::disk::Disk,
}

impl Fsync {
    fn new(syncer: Syncer, durable: u64, segments: &Segments) -> Self {
        let (metrics, disk) = (segments.metrics().clone(), segments.disk().clone());
        Fsync { syncer, running: None, started: (std::time::Instant::now(), durable), metrics, disk }
    }

    /// Whether an fsync may run on the task's own thread: none is running and the
    /// runtime can lend the thread (`block_in_place`, multi-threaded runtimes only).
    fn can_run_here(&self) -> bool {
        self.running.is_none() && crate::clock::can_block_in_place()
    }

    /// fsyncs on this task's thread: the offset it made durable. Nothing else of the
    /// task runs meanwhile; used when nothing is queued to write, so a publisher
    /// waiting alone is not handed to the blocking pool and back (two thread wake-ups).
    fn run_here(&mut self, durable: u64) -> Result<u64, RequestError> {
        let at = std::time::Instant::now();
        let r = tokio::task::block_in_place(|| self.syncer.sync());
        self.finished(at, durable, r)
    }

    fn start_if_idle(&mut self, durable: u64) {
        if self.running.is_none() {
            self.started = (std::time::Instant::now(), durable);
            let s = self.syncer.clone();
            self.running = Some(crate::clock::spawn_blocking(move || s.sync()));
        }
    }

    /// The offset the running fsync made durable; pending while none runs.
    async fn done(&mut self) -> Result<u64, RequestError> {
        let Some(task) = self.running.as_mut() else { return std::future::pending().await };
        let r = task.await;
        self.running = None;
        let (at, before) = self.started;
        match r {
            Ok(r) => self.finished(at, before, r),
            Err(e) => Err(RequestError::new(ErrorCode::Internal, format!("fsync task: {e}"))),
        }
    }

    /// The outcome of an fsync started at `at` when `before` was durable.
    fn finished(&self, at: std::time::Instant, before: u64, r: Result<u64, StorageError>) -> Result<u64, RequestError> {
        match r {
            Ok(d) => {
                self.metrics.fsynced(Some(d.saturating_sub(before)), at.elapsed().as_secs_f64());
                Ok(d)
            }
            Err(e) => {
                if super::out_of_space(&e) {
                    self.disk.out_of_space();
                }
                Err(storage_error(e))
            }
        }
    }
}

/// The task: moves bytes between the publishers, the file, the replicas and the
/// [`Confirmations`] core, which decides what is confirmed.
async fn run(mut t: Task) {
    let me = t.segments.cluster().id;
    let id = t.id;
    let (syncer, written) = {
        let w = lock(&t.writer);
        (w.syncer(), w.next_offset())
    };
    let mut core = Confirmations::new(me, &t.replicas, t.quorum, written);
    let (written_tx, written_rx) = watch::channel(written);
    let (connected_tx, mut connected_rx) = mpsc::channel::<Connected>(CONNECTED_QUEUE_MAX);
    let mut answers = Answers::default();
    let streams = t.start_streams(written_rx, connected_tx);
    let mut fsync = Fsync::new(syncer, written, &t.segments);
    let mut rotating = false;
    // Exactly-once publishing: the window of the shard's previous generations, loaded
    // (handed over or rebuilt) while unkeyed publishes flow; keyed ones wait in `held`.
    let dedupe = t.segments.settings().dedupe_window_ms > 0;
    // Boxed, and dropped once loaded: the loading is a large future that each of
    // thousands of long-lived primaries would otherwise carry for its whole life.
    let mut loading = dedupe.then(|| Box::pin(super::window::load(t.segments.clone(), id)));
    let failure = loop {
        tokio::select! {
            biased;
            _ = t.stop.cancelled() => break None,
            w = loaded(&mut loading), if loading.is_some() && t.window.is_none() => {
                loading = None;
                match t.window_loaded(w, rotating, &mut core, &mut fsync) {
                    Ok(full) => rotating |= full,
                    Err(e) => break Some(e),
                }
                written_tx.send_if_modified(|w| std::mem::replace(w, core.written()) != core.written());
            }
            _ = t.rotate.cancelled(), if !rotating => {
                tracing::info!(segment_id = id, "closing the segment so that its successor gets every replica");
                rotating = true;
            }
            r = fsync.done() => match r {
                Ok(d) => core.fsynced_here(d),
                Err(e) => break Some(e),
            },
            Some(c) = connected_rx.recv() => {
                core.replica_durable(c.node, c.durable, true);
                answers.connected(c);
            }
            // Matched here, not in the branch's pattern: a pattern that fails disables
            // the branch until the loop comes round, and with it every other stream's
            // answers.
            a = answers.next() => if let Ok((node, durable)) = a {
                core.replica_durable(node, durable, false);
            },
            req = t.rx.recv(), if !rotating || t.quorum_disk_low.load(Ordering::Relaxed) => {
                let Some(first) = req else { break None };
                let first = *first;
                match t.take(first, rotating, &mut core, &mut fsync) {
                    Ok(full) => rotating |= full,
                    Err(e) => break Some(e),
                }
                let _ = written_tx.send(core.written());
            }
        }
        if let Err(e) = t.after_event(&mut core, &mut fsync) {
            break Some(e);
        }
        if rotating && core.settled() {
            streams.cancel();
            // Before the close is proposed: the next generation's primary may ask for
            // the window as soon as the close is applied.
            t.keep_window();
            let size = lock(&t.writer).size_bytes();
            close(&t.segments, id, core.written(), size, &t.stop).await;
            break None;
        }
    };
    streams.cancel();
    if let Some(task) = fsync.running {
        let _ = task.await;
    }
    t.finish(core, failure);
}

impl Task {
    /// Starts a stream to every other replica; cancelling the token ends them.
    fn start_streams(&self, written: watch::Receiver<u64>, connected: mpsc::Sender<Connected>) -> CancellationToken {
        let me = self.segments.cluster().id;
        let streams = self.stop.child_token();
        for node in self.replicas.iter().copied().filter(|n| *n != me) {
            let stream = ReplicaStream { segments: self.segments.clone(), id: self.id, node };
            self.segments.spawn(stream.run(written.clone(), connected.clone(), streams.clone()));
        }
        streams
    }

    /// The duplicate window is loaded: the keyed publishes held meanwhile are taken
    /// now, or (`rotating`: closing) go to the successor as those still queued do.
    /// `Ok(true)`: the segment is full.
    fn window_loaded(
        &mut self,
        window: Window<Reply>,
        rotating: bool,
        core: &mut Confirmations<Waiting>,
        fsync: &mut Fsync,
    ) -> Result<bool, RequestError> {
        self.window = Some(window);
        let held: Vec<AppendRequest> = self.held.drain(..).collect();
        if rotating {
            for r in held {
                let _ = r.reply.send(Err(closing(self.id)));
            }
            return Ok(false);
        }
        if held.is_empty() {
            return Ok(false);
        }
        self.append_batch(held, core, fsync)
    }

    /// A publish from the queue: written with whatever else is queued, or, while the
    /// segment is closing because too few replicas have disk space to confirm what was
    /// written (which may take long), refused rather than kept waiting.
    fn take(
        &mut self,
        first: AppendRequest,
        rotating: bool,
        core: &mut Confirmations<Waiting>,
        fsync: &mut Fsync,
    ) -> Result<bool, RequestError> {
        if rotating {
            let _ = first.reply.send(Err(self.quorum_disk_refusal()));
            return Ok(false);
        }
        self.append_batch(vec![first], core, fsync)
    }

    /// After every event: fsync what needs it, answer what is confirmed, and let
    /// readers see the new confirmed end. With nothing more queued to write and a
    /// publish waiting for it, the fsync runs right here (the replica streams were
    /// told of the write before).
    fn after_event(&mut self, core: &mut Confirmations<Waiting>, fsync: &mut Fsync) -> Result<(), RequestError> {
        if core.needs_fsync() {
            if self.rx.is_empty() && core.publishes_wait_for_fsync() && fsync.can_run_here() {
                let durable = fsync.run_here(core.durable_here())?;
                core.fsynced_here(durable);
            } else {
                fsync.start_if_idle(core.durable_here());
            }
        }
        for (waiting, range) in core.take_confirmed() {
            self.answer(waiting, range);
        }
        // Readers may already have seen records up to the old value: only forward.
        self.confirmed_tx.send_if_modified(|c| std::mem::replace(c, core.confirmed()) != core.confirmed());
        self.progress.store(core.written(), core.confirmed(), |n| core.durable_on(n));
        if !self.traces.is_empty() {
            let me = self.segments.cluster().id;
            let replicas = &self.replicas;
            self.traces.progress(core.durable_here(), |end| {
                replicas.iter().filter(|n| **n != me && core.durable_on(**n) >= end).count()
            });
        }
        Ok(())
    }

    /// Takes `first` and whatever else is queued (up to `write_batch_max_bytes`) into
    /// one write, starts its fsync at once (the longest step), and hands the batch to
    /// the core. Keyed publishes go through the duplicate window first: a repeat is
    /// answered (or waits for its first attempt) instead of being written. `Ok(true)`:
    /// the segment is full.
    fn append_batch(
        &mut self,
        first: Vec<AppendRequest>,
        core: &mut Confirmations<Waiting>,
        fsync: &mut Fsync,
    ) -> Result<bool, RequestError> {
        let batch_max = self.segments.settings().write_batch_max_bytes;
        let mut bytes: usize = first.iter().flat_map(|r| &r.payloads).map(Bytes::len).sum();
        let mut batch = first;
        while bytes < batch_max {
            let Ok(r) = self.rx.try_recv() else { break };
            bytes += r.payloads.iter().map(Bytes::len).sum::<usize>();
            batch.push(*r);
        }
        if let Err(e) = self.admit(bytes) {
            // Refused before anything was written: the segment carries on.
            for r in batch {
                let _ = r.reply.send(Err(e.clone()));
            }
            return Ok(false);
        }
        // Timestamps never go backwards within a segment, so a time look-up can bisect.
        let ts = self.segments.clock().now_unix_ms().max(self.last_timestamp_ms);
        self.last_timestamp_ms = ts;
        let writes = self.deduplicate(batch, ts);
        if writes.is_empty() {
            return Ok(false);
        }
        let payloads: Vec<Bytes> = writes.iter().flat_map(|w| w.payloads.iter().cloned()).collect();
        // Traces off: every span is disabled, nothing is collected (no allocation).
        let write_spans: Vec<tracing::Span> = writes
            .iter()
            .filter(|w| !w.waiting.trace.is_disabled())
            .map(|w| {
                tracing::trace_span!(target: PUBLISH_TRACE_TARGET, parent: &w.waiting.trace, "write",
                batch_records = payloads.len())
            })
            .collect();
        let started = std::time::Instant::now();
        let appended = {
            let mut w = lock(&self.writer);
            w.append(ts, &payloads).map(|range| (range, w.size_bytes()))
        };
        drop(write_spans);
        let (range, size) = match appended {
            Ok(a) => {
                let written = payloads.iter().map(|p| p.len() as u64).sum();
                self.segments.metrics().appended(written, started.elapsed().as_secs_f64());
                a
            }
            Err(e) => {
                let e = self.segments.write_error(e);
                for w in writes {
                    let _ = w.waiting.reply.send(Err(e.clone()));
                }
                return Err(e);
            }
        };
        let mut at = range.start;
        for w in &writes {
            let count = w.payloads.len() as u32;
            if let (Some(key), Some(window)) = (w.waiting.key, self.window.as_mut()) {
                window.written(key, self.id, at, count);
            }
            at += u64::from(count);
            if !w.waiting.trace.is_disabled() {
                // Confirmed on a quorum that counts this node: that many others.
                let others = if w.durability == Durability::Replicated { self.quorum.saturating_sub(1) } else { 0 };
                self.traces.written(&w.waiting.trace, at, others);
            }
        }
        let publishes = writes.into_iter().map(|w| (w.payloads.len() as u64, w.durability, w.waiting));
        let received = core.appended(range.start, publishes);
        if !self.rx.is_empty() || !core.publishes_wait_for_fsync() || !fsync.can_run_here() {
            // More to write meanwhile, or nobody waits for it: the fsync runs beside
            // the task, on the blocking pool (otherwise right after the replica streams
            // were told of the write: `after_event`).
            fsync.start_if_idle(core.durable_here());
        }
        for (waiting, range) in received {
            self.answer(waiting, range);
        }
        let full = size >= self.size_max_bytes;
        if full {
            tracing::info!(segment_id = self.id, size_bytes = size, "segment full; closing it");
        }
        Ok(full)
    }

    /// What of `batch` is written: unkeyed publishes whole; a keyed one unless the
    /// window knows it (then it is answered, or waits for its first attempt), only its
    /// messages not stored yet, the first carrying the key; keyed ones while the window
    /// is loading are held.
    fn deduplicate(&mut self, batch: Vec<AppendRequest>, now_ms: i64) -> Vec<Write> {
        let mut writes = Vec::with_capacity(batch.len());
        for r in batch {
            let AppendRequest { payloads, durability, key, reply, _permit, trace, _queue } = r;
            let dedupe = self.segments.settings().dedupe_window_ms > 0;
            let Some(key) = key.filter(|_| dedupe) else {
                let waiting = Waiting { reply, key: None, stored_before: 0, trace };
                writes.push(Write { payloads, durability, waiting, _permit });
                continue;
            };
            let Some(window) = self.window.as_mut() else {
                self.held.push_back(AppendRequest {
                    payloads,
                    durability,
                    key: Some(key),
                    reply,
                    _permit,
                    trace,
                    _queue,
                });
                continue;
            };
            let total = payloads.len() as u32;
            match window.begin(key, total, now_ms, reply) {
                Begin::Append { skip, token } => {
                    let mut rest = payloads;
                    rest.drain(..(skip as usize).min(rest.len()));
                    if let Some(first) = rest.first_mut() {
                        let stored = PublishKey {
                            producer_id: key.producer,
                            sequence: key.sequence,
                            count: total,
                            stored_before: skip,
                        };
                        *first = encode_key(&stored, first);
                    }
                    let waiting = Waiting { reply: token, key: Some(key), stored_before: skip, trace };
                    writes.push(Write { payloads: rest, durability, waiting, _permit });
                }
                Begin::Duplicate { stored, token } => {
                    let _ = token.send(Ok(Appended::of(stored, true)));
                }
                Begin::Waiting => {}
                Begin::Mismatch { total: first, token } => {
                    let _ = token.send(Err(RequestError::new(
                        ErrorCode::InvalidArgument,
                        format!(
                            "sequence: producer {} used sequence {} for a request of {first} message(s); this one has \
                             {total}: a sequence names one request",
                            key.producer, key.sequence
                        ),
                    )));
                }
            }
        }
        writes
    }

    /// Answers a publish now as durable as it asked, and the repeats that waited for it.
    fn answer(&mut self, waiting: Waiting, range: Range<u64>) {
        if !waiting.trace.is_disabled() {
            tracing::trace!(target: PUBLISH_TRACE_TARGET, parent: &waiting.trace, "confirmed");
        }
        let confirmed = waiting.key.zip(self.window.as_mut()).and_then(|(key, w)| w.confirmed(key));
        match confirmed {
            Some((stored, repeats)) => {
                let _ = waiting.reply.send(Ok(Appended::of(stored, false)));
                for r in repeats {
                    let _ = r.send(Ok(Appended::of(stored, true)));
                }
            }
            None => {
                let _ = waiting.reply.send(Ok(Appended {
                    segment_id: self.id,
                    first_offset: range.start,
                    count: (range.end - range.start) as u32,
                    stored_before: waiting.stored_before,
                    duplicate: false,
                }));
            }
        }
    }

    /// Keeps this segment's window on the node, for the next generation's primary.
    fn keep_window(&self) {
        if let Some(w) = &self.window {
            self.segments.keep_window(self.id, w.export());
        }
    }

    /// Whether `bytes` of publishes may be written: not while this node's disk is below
    /// its watermark, nor while too many replicas' are to confirm them.
    fn admit(&self, bytes: usize) -> Result<(), RequestError> {
        if self.quorum_disk_low.load(Ordering::Relaxed) {
            return Err(self.quorum_disk_refusal());
        }
        self.segments.disk().admit(bytes as u64, || format!("a publish to segment {}", self.id))
    }

    fn quorum_disk_refusal(&self) -> RequestError {
        let st = self.segments.cluster().state.read();
        let low = st.state.disk_low_text(self.replicas.iter().copied());
        RequestError::new(
            ErrorCode::DiskFull,
            format!(
                "segment {}: publish refused: it cannot be confirmed on {} copies while replicas are below their \
                 disk watermark: {low}; nothing was written; retry once space is freed",
                self.id, self.quorum
            ),
        )
    }

    /// Answers what is still waiting and, after a failure, hands the segment to a
    /// fail-over.
    fn finish(mut self, mut core: Confirmations<Waiting>, failure: Option<RequestError>) {
        let id = self.id;
        // Whatever is still waiting is neither confirmed nor refused for good: it may be
        // in the segment and delivered later, which the client learns by its error; a
        // repeat that waited for it hears the same.
        let err = failure.clone().unwrap_or_else(|| closing(id));
        for waiting in core.abandon().collect::<Vec<_>>() {
            let _ = waiting.reply.send(Err(err.clone()));
            if let (Some(key), Some(w)) = (waiting.key, self.window.as_mut()) {
                for r in w.failed(key) {
                    let _ = r.send(Err(err.clone()));
                }
            }
        }
        if let Some(w) = self.window.as_mut() {
            for r in w.drain_waiters() {
                let _ = r.send(Err(err.clone()));
            }
        }
        for r in self.held.drain(..) {
            let _ = r.reply.send(Err(closing(id)));
        }
        self.rx.close();
        while let Ok(r) = self.rx.try_recv() {
            let _ = r.reply.send(Err(closing(id)));
        }
        if failure.is_none() {
            // Written but unconfirmed requests are in it too: the next generation trims
            // them to the segment's agreed end. After a failure the file may be damaged
            // past what the replicas agree on, and the next generation reads them.
            self.keep_window();
        }
        lock(self.segments.primaries()).remove(&id);
        if let Some(e) = failure {
            // The file may be damaged past what was confirmed: let the replicas decide
            // where the segment ends.
            tracing::error!(segment_id = id, error = %e, "primary failed; failing the segment over");
            let segments = self.segments.clone();
            segments.clone().spawn(async move {
                // Out of space: say so before the close, or the leader's next pass may
                // open the successor right here again.
                crate::disk::report(segments.disk(), segments.cluster()).await;
                if let Err(e) = super::placement::fail_over(&segments, id).await {
                    tracing::warn!(segment_id = id, error = %e, "fail-over after a primary failure did not complete");
                }
            });
        }
    }
}

/// What `loading` loads, once it has; never ready without one.
async fn loaded<F: std::future::Future + Unpin>(loading: &mut Option<F>) -> F::Output {
    match loading {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// A publish (or what of it is not stored yet) going into a write.
struct Write {
    payloads: Vec<Bytes>,
    durability: Durability,
    waiting: Waiting,
    /// Holds a share of the primary's write queue until the publish is answered.
    _permit: OwnedSemaphorePermit,
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
            now_unix_ms: segments.clock().now_unix_ms(),
        };
        match segments.cluster().write(cmd).await {
            Ok(_) => return,
            Err(e) if matches!(e.code, ErrorCode::SegmentClosed | ErrorCode::SegmentNotFound) => return,
            Err(e) => tracing::warn!(segment_id = id, error = %e, "closing a full segment failed; retrying"),
        }
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(CLOSE_RETRY_PAUSE) => {}
        }
    }
}

/// A replication stream (re)connected: what the replica has now (its first answer),
/// and the stream's later answers, which the primary task reads itself: an answer
/// that confirms a publish then wakes the one task that answers it, not a stream task
/// first. `lost` tells the stream's task why the answers ended, so it reconnects.
struct Connected {
    node: NodeId,
    durable: u64,
    answers: ReplicaAnswers,
    lost: oneshot::Sender<RequestError>,
}

/// The answers of the replicas' current streams, read by the primary task.
#[derive(Default)]
struct Answers(Vec<Connected>);

impl Answers {
    /// A new stream of `c.node`: it replaces the node's previous one, whose answers
    /// (older than this stream's first) are not read any more.
    fn connected(&mut self, c: Connected) {
        self.0.retain(|a| a.node != c.node);
        self.0.push(c);
    }

    /// The next answer of any stream: `Ok((node, durable))`, or `Err(node)` once that
    /// stream ended (it is dropped, and its task told why); pending while none has one.
    async fn next(&mut self) -> Result<(NodeId, u64), NodeId> {
        std::future::poll_fn(|cx| {
            for i in 0..self.0.len() {
                let a = &mut self.0[i];
                let Poll::Ready(r) = a.answers.poll_next(cx) else { continue };
                let node = a.node;
                let e = match r {
                    Ok(Some(durable)) => return Poll::Ready(Ok((node, durable))),
                    Ok(None) => ended(),
                    Err(e) => RequestError::from(e),
                };
                let _ = self.0.swap_remove(i).lost.send(e);
                return Poll::Ready(Err(node));
            }
            Poll::Pending
        })
        .await
    }
}

/// The stream of one segment to one replica: tails the file and sends what the replica
/// does not have yet; hands its answers (what it fsynced) to the primary task.
struct ReplicaStream {
    segments: Segments,
    id: SegmentId,
    node: NodeId,
}

impl ReplicaStream {
    /// Streams until stopped, reconnecting after failures.
    async fn run(self, written: watch::Receiver<u64>, connected: mpsc::Sender<Connected>, stop: CancellationToken) {
        let mut backoff = STREAM_RETRY_MIN;
        let mut failures = 0u32;
        while !stop.is_cancelled() {
            match self.stream_once(written.clone(), &connected, &stop).await {
                Ok(()) => return,
                Err(e) => {
                    failures += 1;
                    // Log the first failure and then rarely: a dead replica fails every try.
                    if failures == 1 || failures.is_power_of_two() {
                        tracing::warn!(segment_id = self.id, replica = self.node, error = %e, failures,
                            "replication stream failed; reconnecting");
                    }
                }
            }
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(STREAM_RETRY_MAX);
        }
    }

    async fn stream_once(
        &self,
        mut written: watch::Receiver<u64>,
        connected: &mpsc::Sender<Connected>,
        stop: &CancellationToken,
    ) -> Result<(), RequestError> {
        let (id, node) = (self.id, self.node);
        let addr = self.segments.node_addr(node)?;
        let (tx, rx) = mpsc::channel::<ReplicateRequest>(STREAM_IN_FLIGHT_MAX);
        tx.try_send(ReplicateRequest { segment_id: id, records: Vec::new() }).map_err(|_| stream_closed())?;
        let requests = tokio_stream::wrappers::ReceiverStream::new(rx);
        let mut answers = self.segments.peers().replicate(node, &addr, requests).await?;
        let mut next = answers.next().await?.ok_or_else(ended)?;
        if next > *written.borrow() {
            let msg = format!("replica has {next} records, more than the primary's {}", *written.borrow());
            return Err(RequestError::new(ErrorCode::Internal, msg));
        }
        let (lost_tx, mut lost) = oneshot::channel();
        let _ = connected.send(Connected { node, durable: next, answers, lost: lost_tx }).await;
        let max_bytes = self.segments.settings().read_batch_max_bytes;
        loop {
            let behind = next < *written.borrow();
            tokio::select! {
                biased;
                _ = stop.cancelled() => return Ok(()),
                e = &mut lost => return Err(e.unwrap_or_else(|_| stream_closed())),
                permit = tx.reserve(), if behind => {
                    let permit = permit.map_err(|_| stream_closed())?;
                    let end = *written.borrow();
                    // A reader per read, not one held for the stream's life: an idle
                    // segment's files can then close (`--open-segments-max`).
                    let reader = self.segments.store().reader(self.id).map_err(storage_error)?;
                    let records = reader.read(next, end, max_bytes).map_err(storage_error)?;
                    if let Some(last) = records.last() {
                        next = last.offset + 1;
                    }
                    let records = records.into_iter().map(super::to_wire).collect();
                    permit.send(ReplicateRequest { segment_id: id, records });
                }
                r = written.changed(), if !behind => if r.is_err() { return Ok(()) },
            }
        }
    }
}

fn ended() -> RequestError {
    RequestError::new(ErrorCode::PeerUnreachable, "the replica ended the stream")
}

fn stream_closed() -> RequestError {
    RequestError::new(ErrorCode::PeerUnreachable, "the replication stream closed")
}
