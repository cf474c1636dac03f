//! The task of one consumer group on the node the leader placed it on: the driver
//! around the [`Reader`] (what to read) and the [`GroupBuffer`] (what to hand out).
//!
//! It reads the bound topics' segments (locally or from the node that holds them),
//! feeds the buffer, hands messages to subscribers, applies their acks and nacks, and
//! every `offsets_commit_interval_ms` records in the cluster state how far everything
//! is acknowledged. A task that starts (first time, after a restart, or on a new node)
//! resumes from the committed offsets, so every message is delivered at least once.
//! The reader reads a shard's generations one after another (order within a shard), so
//! a segment that stays unreadable holds its shard back: the task says so in the log.
//! A message held unacknowledged past the group's ack timeout (its own
//! `ack_timeout_ms`, else the node's) is taken back at its deadline (a tokio timer, so
//! tests with paused time advance it) and handed out again. Timers are armed only by
//! activity (see [`run`]): a node holding thousands of idle groups runs none of them.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use eventtermq_proto::v1::{Message, Persistence};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use prost::Message as _;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;

use super::buffer::{Acked, Delivery, GroupBuffer, Millis, SubscriberId};
use super::commits::{CommitResult, OffsetCommits};
use super::dead_letter;
use super::reader::{CaughtUp, Fetch, Reader};
use crate::cluster::Cluster;
use crate::cluster_state::{ConsumerGroupSpec, GroupOffsets, SegmentId};
use crate::error::{ErrorCode, RequestError};
use crate::metrics::GroupCounters;
use crate::replication::read::{ReadRequest, ReadResult};
use crate::replication::Segments;

/// Requests to a group task.
pub(crate) enum GroupCmd {
    Subscribe {
        max_unacked: u32,
        /// Messages to hand out at most; 0 = no limit.
        max_messages: u64,
        do_not_block: bool,
        /// The group's only subscriber (see `SubscribeRequest.exclusive`).
        exclusive: bool,
        reply: oneshot::Sender<Result<(SubscriberId, mpsc::Receiver<Event>), RequestError>>,
    },
    Unsubscribe(SubscriberId),
    /// The subscriber got its `max_messages`: hand it nothing more; answer once none of
    /// its messages is in flight.
    Limit(SubscriberId, oneshot::Sender<()>),
    Ack(Vec<(SegmentId, u64)>, oneshot::Sender<Result<(), RequestError>>),
    Nack(Vec<(SegmentId, u64)>, oneshot::Sender<Result<(), RequestError>>),
    /// Lag and delivery state now (a scrape, an Admin call).
    Stats(oneshot::Sender<GroupStats>),
    /// Answer once everything acknowledged so far is recorded in the cluster state (or
    /// recording it failed): a bounded subscription ends only then, so what it acked
    /// is not delivered again after a restart that follows at once.
    Flush(oneshot::Sender<()>),
    /// Drop every message waiting for a subscriber (not those delivered and not yet
    /// acknowledged), up to how far each bound segment is confirmed now: how many were
    /// ready, and an answer once the purge is recorded in the cluster state.
    Purge(oneshot::Sender<Result<Purged, RequestError>>),
}

/// A purge's answer: how many messages were ready, and an answer once that is
/// recorded with the group's offsets (as a [`GroupCmd::Flush`] answers).
pub(crate) type Purged = (u64, oneshot::Receiver<()>);

/// A group's lag and delivery state on the node running it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupStats {
    pub namespace: String,
    pub group: String,
    /// Per bound topic, records not yet dealt with (see [`super::lag`]).
    pub lag: BTreeMap<String, u64>,
    /// Age of the oldest message the group has read and not acknowledged; 0 when none.
    pub oldest_unacked_ms: u64,
    pub subscribers: usize,
    /// Messages waiting for a subscriber, and handed out and not acknowledged.
    pub pending: usize,
    pub in_flight: usize,
    /// The buffer's size in messages.
    pub capacity: usize,
    /// Per segment, the offset below which everything is acknowledged, as the group
    /// knows it now (the cluster state has it up to one commit interval later).
    pub committed: BTreeMap<SegmentId, u64>,
}

/// What a subscriber's stream receives from the group task.
pub(crate) enum Event {
    Message(Delivery),
    /// Nothing to deliver right now (only sent to `do_not_block` subscribers).
    Drained,
}

/// Pause after a failed read, or before reading again a closed segment whose copy was
/// not there yet: do not spin on it.
const READ_RETRY_PAUSE: Duration = Duration::from_millis(100);
/// An open segment whose records are not being read (behind a full buffer, or an
/// earlier generation) is peeked at to learn how far it is readable, at most this
/// often: each peek waits for records beyond the end seen last, so while publishers
/// write the group's lag is at most this much behind them, and while they do not the
/// peek just waits.
const LAG_PEEK_INTERVAL: Duration = Duration::from_secs(1);
/// Failed reads of one segment in a row before the task warns (about 5 s at
/// [`READ_RETRY_PAUSE`]): a fail-over's sealing takes well under that, while a copy
/// that stays unreadable stops its shard's later generations and needs an operator.
const READ_FAILURES_WARN_COUNT: u32 = 50;
/// Failed publishes of one batch of dead letters before the task warns (about 10 s).
const DEAD_LETTER_ATTEMPTS_WARN: u32 = 10;

type FetchFuture = Pin<Box<dyn std::future::Future<Output = (SegmentId, Result<ReadResult, RequestError>)> + Send>>;
type PeekFuture = Pin<Box<dyn std::future::Future<Output = (SegmentId, Option<u64>)> + Send>>;
/// Dead letters on their way to the dead-letter topic, as one publish: the records
/// they are, once published.
type EndsFuture = Pin<Box<dyn std::future::Future<Output = Result<BTreeMap<SegmentId, u64>, RequestError>> + Send>>;
type DeadLetterFuture = Pin<Box<dyn std::future::Future<Output = Vec<(SegmentId, u64)>> + Send>>;

/// A dead letter waiting for its turn: the record it is, where it goes, what goes.
struct DeadLetter {
    record: (SegmentId, u64),
    topic: String,
    message: Message,
}
/// A purge learning how far each open segment is confirmed, then its answer.
type PurgeFuture = Pin<
    Box<
        dyn std::future::Future<
                Output = (
                    Result<BTreeMap<SegmentId, u64>, RequestError>,
                    oneshot::Sender<Result<Purged, RequestError>>,
                ),
            > + Send,
    >,
>;

struct Subscriber {
    tx: mpsc::Sender<Event>,
    do_not_block: bool,
    /// Its number among `do_not_block` subscribers ([`Task::one_offs`]): only ends
    /// learnt after it came can tell it that nothing is left.
    since: u64,
    exclusive: bool,
    limit: Option<oneshot::Sender<()>>,
}

/// One group's running state.
struct Task {
    segments: Segments,
    cluster: Cluster,
    commits: OffsetCommits,
    namespace: String,
    name: String,
    reader: Reader,
    buffer: GroupBuffer,
    subscribers: HashMap<SubscriberId, Subscriber>,
    fetches: FuturesUnordered<FetchFuture>,
    /// Reads of open segments in flight (they wait for records), each ended early when
    /// the state says its segment closed: the rest of the segment is then read from a
    /// complete copy at once, not after the wait.
    open_fetches: BTreeMap<SegmentId, CancellationToken>,
    /// Failed reads in a row, per segment (only for the warning above).
    read_failures: HashMap<SegmentId, u32>,
    /// Offsets and hand-out marks recorded in the cluster state (or on their way).
    last_committed: BTreeMap<SegmentId, u64>,
    last_handed_out: BTreeMap<SegmentId, u64>,
    /// The answer to the commit on its way ([`OffsetCommits`] writes it with others).
    commit_in_flight: Option<oneshot::Receiver<CommitResult>>,
    /// The segments whose offsets / hand-out marks the commit in flight carries: if it
    /// fails they are not recorded, and the next commit carries them again.
    commit_carries: (Vec<SegmentId>, Vec<SegmentId>),
    /// Commits failed in a row: the next one waits longer ([`commit_backoff`]), so
    /// that thousands of groups do not retry together into a cluster that cannot
    /// take their writes now.
    commit_failures: u32,
    /// Commits started so far; the one in flight is number `commits_started`.
    commits_started: u64,
    /// [`GroupCmd::Flush`]es, each with the number of the commit that records it.
    flushes: Vec<(u64, oneshot::Sender<()>)>,
    /// Reads that only learn how far an open segment is readable, for the lag: each
    /// waits for records beyond what the group saw, so an idle group's peek is one
    /// read outstanding, not one per interval.
    peeks: FuturesUnordered<PeekFuture>,
    /// The segments peeked at, each peek ended early when the state says its segment
    /// closed (as [`Task::open_fetches`]).
    peeking: BTreeMap<SegmentId, CancellationToken>,
    /// Dead letters in log order, published one batch at a time so they reach the
    /// dead-letter topic in the order they died (as RabbitMQ's).
    dead_waiting: VecDeque<DeadLetter>,
    dead_publishing: Option<DeadLetterFuture>,
    purges: FuturesUnordered<PurgeFuture>,
    /// `do_not_block` subscribers so far; each is told "nothing left" only once the
    /// reader has read everything its open heads had confirmed after it came (ends
    /// learnt by an [`EndsFuture`]), not from a read that waited since before: a
    /// `basic.get` right after a publish's confirm must find that message, and one on
    /// an empty queue must not wait out the reads' wait.
    one_offs: u64,
    /// The ends being learnt, for the subscribers up to this number.
    ends_asked: Option<(u64, EndsFuture)>,
    /// The last ends learnt, for the subscribers up to this number.
    ends_known: Option<(u64, BTreeMap<SegmentId, u64>)>,
    counters: GroupCounters,
    /// Origin of the buffer's clock ([`Millis`]).
    epoch: tokio::time::Instant,
}

/// Runs the group `name` of `namespace` until `stop`, or until it is deleted.
///
/// Every wake-up is an event: a command, a read that answered, `refresh` (the node's
/// groups poke it when the cluster state changed the group or one of its topics), or
/// a timer armed by activity: the soonest ack deadline, the next offset commit (only
/// once something happened since the last), the next lag peek (only while a segment
/// is not being read). An idle group with nothing in flight sleeps on its reads and
/// peeks of open segments, which wait for records ([`DataSettings::read_wait_ms`]).
///
/// [`DataSettings::read_wait_ms`]: crate::config::DataSettings::read_wait_ms
pub(crate) async fn run(
    segments: Segments,
    commits: OffsetCommits,
    namespace: String,
    name: String,
    mut cmds: mpsc::Receiver<GroupCmd>,
    refresh: Arc<Notify>,
    stop: CancellationToken,
) {
    let Some(mut t) = Task::new(segments, commits, namespace, name) else { return };
    let commit_interval = Duration::from_millis(t.segments.settings().offsets_commit_interval_ms.max(1));
    let (mut commit_due, mut peek_due, mut expiry) = (Deadline::default(), Deadline::default(), Deadline::default());
    // When the message at the front of the queue outlives the group's TTL.
    let mut ttl_due = Deadline::default();
    if !t.refresh() {
        return;
    }
    loop {
        // In this order when several are ready at once, not at random: what a commit
        // records (offsets, hand-out marks) then depends only on what happened before
        // (a seed of the simulation replays exactly). Timers first: each is ready once
        // per arming, so they cannot starve the rest.
        let mut committing = false;
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            _ = refresh.notified() => if !t.refresh() { return },
            _ = commit_due.wait() => {
                commit_due.disarm();
                committing = true;
                t.commit_in_background();
            }
            _ = peek_due.wait() => {
                peek_due.disarm();
                t.start_peeks();
            }
            _ = expiry.wait() => {
                expiry.disarm();
                t.expire();
            }
            // `step` below dead-letters what expired.
            _ = ttl_due.wait() => ttl_due.disarm(),
            r = commit_done(&mut t.commit_in_flight), if t.commit_in_flight.is_some() => t.committed(r),
            Some(cmd) = cmds.recv() => t.command(cmd),
            Some((id, result)) = t.fetches.next(), if !t.fetches.is_empty() => t.fetched(id, result),
            Some((id, end)) = t.peeks.next(), if !t.peeks.is_empty() => t.peeked(id, end),
            records = dead_letters_published(&mut t.dead_publishing), if t.dead_publishing.is_some() => {
                t.dead_publishing = None;
                for (id, offset) in records {
                    t.buffer.dead_lettered(id, offset);
                    t.counters.dead_lettered.inc();
                }
                t.publish_dead_letters();
            }
            Some((ends, reply)) = t.purges.next(), if !t.purges.is_empty() => t.purge(ends, reply),
            (upto, ends) = ends_learnt(&mut t.ends_asked), if t.ends_asked.is_some() => {
                t.ends_asked = None;
                match ends {
                    Ok(ends) => t.ends_known = Some((upto, ends)),
                    Err(e) => tracing::debug!(group = %t.name, error = %e, "cannot learn how far segments are confirmed; asking again"),
                }
            }
        }
        t.step();
        // Anything may have moved the offsets: a commit within one interval, unless
        // this wake-up was the commit itself (an idle group then commits no more).
        if !committing && !commit_due.is_armed() {
            let wait = commit_backoff(commit_interval, t.commit_failures, &t.name);
            commit_due.arm(tokio::time::Instant::now() + wait);
        }
        if !peek_due.is_armed() && t.peeks.is_empty() && !t.reader.peeks_due().is_empty() {
            peek_due.arm(tokio::time::Instant::now() + LAG_PEEK_INTERVAL);
        }
        match t.buffer.next_deadline() {
            Some(deadline) => expiry.arm(t.epoch + Duration::from_millis(deadline)),
            None => expiry.disarm(),
        }
        match t.buffer.next_expiry_unix_ms() {
            Some(at) => {
                let wait_ms = at.saturating_sub(t.segments.clock().now_unix_ms()).max(0) as u64;
                ttl_due.arm(tokio::time::Instant::now() + Duration::from_millis(wait_ms));
            }
            None => ttl_due.disarm(),
        }
    }
    // Boxed: a future that holds the whole task again, needed once at the end.
    Box::pin(t.last_commit()).await;
}

/// A timer that is armed or not; waiting on one that is not never ends.
#[derive(Default)]
struct Deadline {
    at: Option<tokio::time::Instant>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Deadline {
    fn is_armed(&self) -> bool {
        self.at.is_some()
    }

    /// Sets it to `at` (a new time resets the timer; the same one keeps it).
    fn arm(&mut self, at: tokio::time::Instant) {
        if self.at == Some(at) {
            return;
        }
        self.at = Some(at);
        match &mut self.sleep {
            Some(sleep) => sleep.as_mut().reset(at),
            None => self.sleep = Some(Box::pin(tokio::time::sleep_until(at))),
        }
    }

    fn disarm(&mut self) {
        self.at = None;
    }

    async fn wait(&mut self) {
        match (self.at, &mut self.sleep) {
            (Some(_), Some(sleep)) => sleep.as_mut().await,
            _ => std::future::pending().await,
        }
    }
}

impl Task {
    fn new(segments: Segments, commits: OffsetCommits, namespace: String, name: String) -> Option<Self> {
        let cluster = segments.cluster().clone();
        let (spec, runtime) = {
            let st = cluster.state.read();
            let spec = st.state.namespaces.get(&namespace).and_then(|ns| ns.consumer_groups.get(&name)).cloned()?;
            (spec, st.state.group_runtime(&namespace, &name).cloned().unwrap_or_default())
        };
        let start = runtime.offsets;
        let ack_timeout = ack_timeout_ms(&spec, segments.settings().ack_timeout_ms);
        let mut buffer = GroupBuffer::new(spec.size.max(1) as usize, start.clone(), ack_timeout);
        buffer.set_deliveries_max(spec.deliveries_max);
        buffer.set_message_ttl(spec.message_ttl_ms);
        buffer.set_ready_max(spec.ready_messages_max as usize);
        buffer.set_ready_bytes_max(spec.ready_bytes_max);
        buffer.resume_handed_out(&runtime.handed_out);
        let counters = segments.metrics().group_counters(&namespace, &name);
        Some(Task {
            reader: Reader::new(&namespace, spec, start.clone()),
            buffer,
            segments,
            cluster,
            commits,
            namespace,
            name,
            subscribers: HashMap::new(),
            fetches: FuturesUnordered::new(),
            open_fetches: BTreeMap::new(),
            read_failures: HashMap::new(),
            last_committed: start,
            last_handed_out: runtime.handed_out,
            commit_in_flight: None,
            commit_carries: Default::default(),
            commit_failures: 0,
            commits_started: 0,
            flushes: Vec::new(),
            peeks: FuturesUnordered::new(),
            peeking: BTreeMap::new(),
            dead_waiting: VecDeque::new(),
            dead_publishing: None,
            purges: FuturesUnordered::new(),
            one_offs: 0,
            ends_asked: None,
            ends_known: None,
            counters,
            epoch: tokio::time::Instant::now(),
        })
    }

    /// Now on the buffer's clock.
    fn now(&self) -> Millis {
        self.epoch.elapsed().as_millis() as Millis
    }

    /// Messages held past their ack timeout go back for redelivery.
    fn expire(&mut self) {
        let taken = self.buffer.expire(self.now());
        if taken > 0 {
            tracing::debug!(namespace = %self.namespace, group = %self.name, messages = taken,
                "ack timeout passed; redelivering");
            self.counters.redeliveries.inc_by(taken as u64);
        }
    }

    /// Follows the cluster state's segments; `false` once the group is deleted.
    fn refresh(&mut self) -> bool {
        let st = self.cluster.state.read();
        if st.state.group_runtime(&self.namespace, &self.name).is_none() {
            return false;
        }
        let spec = st.state.namespaces.get(&self.namespace).and_then(|ns| ns.consumer_groups.get(&self.name));
        if let Some(spec) = spec.filter(|s| *s != self.reader.spec()) {
            self.buffer.set_ack_timeout(ack_timeout_ms(spec, self.segments.settings().ack_timeout_ms));
            self.buffer.set_deliveries_max(spec.deliveries_max);
            self.buffer.set_message_ttl(spec.message_ttl_ms);
            self.buffer.set_ready_max(spec.ready_messages_max as usize);
            self.buffer.set_ready_bytes_max(spec.ready_bytes_max);
            self.reader.spec_changed(spec.clone(), &mut self.buffer);
        }
        // The bound topics' segments only (the table's index), not every segment.
        let topics: Vec<String> = self.reader.topics().map(str::to_string).collect();
        let ours = topics.iter().flat_map(|t| st.state.topic_segments(&self.namespace, t));
        self.reader.segments_changed(ours, &mut self.buffer);
        self.read_failures.retain(|id, _| st.state.segments.contains_key(id));
        let still_open = |id: &SegmentId, cancel: &mut CancellationToken| {
            let open = st.state.segments.get(id).is_some_and(|s| s.is_open());
            if !open {
                cancel.cancel();
            }
            open
        };
        self.open_fetches.retain(still_open);
        self.peeking.retain(still_open);
        true
    }

    fn fetched(&mut self, id: SegmentId, result: Result<ReadResult, RequestError>) {
        self.open_fetches.remove(&id);
        if let Ok(r) = &result {
            tracing::trace!(group = %self.name, segment_id = id, start = r.start, records = r.records.len(),
                end = r.end_offset, closed = r.closed, "group read answered");
        }
        match &result {
            Ok(_) => {
                self.read_failures.remove(&id);
            }
            Err(e) => {
                let failures = self.read_failures.entry(id).or_default();
                *failures = failures.saturating_add(1);
                if *failures == READ_FAILURES_WARN_COUNT {
                    tracing::warn!(namespace = %self.namespace, group = %self.name, segment_id = id, error = %e,
                        failures = *failures,
                        "consumer group cannot read a segment; later segments of its shard wait for it");
                } else {
                    tracing::debug!(segment_id = id, error = %e, "group read failed; retrying");
                }
            }
        }
        self.reader.fetched(id, result.ok(), &mut self.buffer);
    }

    fn command(&mut self, cmd: GroupCmd) {
        match cmd {
            GroupCmd::Subscribe { max_unacked, max_messages, do_not_block, exclusive, reply } => {
                if let Err(e) = self.may_subscribe(do_not_block, exclusive) {
                    let _ = reply.send(Err(e));
                    return;
                }
                let id = self.buffer.subscribe(max_unacked, false);
                if max_messages > 0 {
                    self.buffer.limit_hand_outs(id, max_messages);
                }
                let (tx, rx) = mpsc::channel(max_unacked as usize + 1);
                self.one_offs += u64::from(do_not_block);
                let since = self.one_offs;
                self.subscribers.insert(id, Subscriber { tx, do_not_block, since, exclusive, limit: None });
                let _ = reply.send(Ok((id, rx)));
            }
            GroupCmd::Unsubscribe(id) => self.unsubscribe(id),
            GroupCmd::Limit(id, reply) => {
                self.buffer.stop_dispatch(id);
                if let Some(s) = self.subscribers.get_mut(&id) {
                    s.limit = Some(reply);
                }
            }
            GroupCmd::Ack(keys, reply) => {
                let (done, r) = settle(&mut self.buffer, &keys, true);
                self.counters.acks.inc_by(done);
                let _ = reply.send(r);
            }
            GroupCmd::Nack(keys, reply) => {
                let (done, r) = settle(&mut self.buffer, &keys, false);
                self.counters.nacks.inc_by(done);
                self.counters.redeliveries.inc_by(done);
                let _ = reply.send(r);
            }
            GroupCmd::Stats(reply) => {
                let _ = reply.send(self.stats());
            }
            GroupCmd::Flush(reply) => self.flush(reply),
            GroupCmd::Purge(reply) => self.start_purge(reply),
        }
    }

    /// Answers `reply` once everything acknowledged so far is recorded.
    fn flush(&mut self, reply: oneshot::Sender<()>) {
        // A commit in flight may have been cut before the latest acks: the next one
        // records them.
        let needs = self.commits_started + 1;
        self.commit_in_background();
        if self.commits_started < needs && self.commit_in_flight.is_none() {
            let _ = reply.send(()); // nothing moved since the last commit
        } else {
            self.flushes.push((needs, reply));
        }
    }

    /// A purge first learns how far each bound segment is confirmed now
    /// ([`Task::confirmed_ends`]), so that everything published and confirmed before
    /// the purge goes, and nothing published after its answer (a message published
    /// while the purge runs may go or stay).
    fn start_purge(&mut self, reply: oneshot::Sender<Result<Purged, RequestError>>) {
        if !self.refresh() {
            let e = RequestError::new(
                ErrorCode::ConsumerGroupNotFound,
                format!("consumer group {:?} was deleted", self.name),
            );
            let _ = reply.send(Err(e));
            return;
        }
        let ends = self.confirmed_ends(self.reader.purge_inputs());
        self.purges.push(Box::pin(async move { (ends.await, reply) }));
    }

    /// How far each segment is confirmed now: `Ok(end)` of a closed one is known; for
    /// an open one (`Err(from)`) its primary is asked, here at once or with a
    /// one-record read from `from` on another node, as the lag's peeks do. A segment
    /// not readable yet (`NotReady`: its primary has not started it) is asked again
    /// every [`READ_RETRY_PAUSE`] within the request timeout.
    fn confirmed_ends(
        &self,
        inputs: Vec<(SegmentId, Result<u64, u64>)>,
    ) -> impl std::future::Future<Output = Result<BTreeMap<SegmentId, u64>, RequestError>> + Send + 'static {
        let mut known = BTreeMap::new();
        let mut asks = Vec::new();
        for (id, end) in inputs {
            let from = match end {
                Ok(end) => {
                    known.insert(id, end);
                    continue;
                }
                Err(from) => from,
            };
            if let Some(p) = self.segments.primary(id) {
                known.insert(id, *p.confirmed().borrow());
                continue;
            }
            let Some(seg) = self.cluster.state.read().state.segments.get(&id).cloned() else { continue };
            let segments = self.segments.clone();
            // A segment that just appeared may not be served by its primary yet (its
            // node applies the state and starts the primary a moment later).
            let deadline = tokio::time::Instant::now() + self.cluster.request_timeout();
            asks.push(async move {
                loop {
                    match segments.read(id, &seg, ReadRequest::at(from, 1)).await {
                        Ok(r) => return Ok((id, r.end_offset)),
                        Err(e)
                            if e.code == ErrorCode::NotReady
                                && tokio::time::Instant::now() + READ_RETRY_PAUSE < deadline =>
                        {
                            tracing::debug!(segment_id = id, error = %e, "segment not readable yet; asking again");
                            tokio::time::sleep(READ_RETRY_PAUSE).await;
                        }
                        Err(e) => return Err(e),
                    }
                }
            });
        }
        async move {
            let mut ends = known;
            for answer in futures::future::join_all(asks).await {
                let (id, end) = answer?;
                ends.insert(id, end);
            }
            Ok(ends)
        }
    }

    fn purge(
        &mut self,
        ends: Result<BTreeMap<SegmentId, u64>, RequestError>,
        reply: oneshot::Sender<Result<Purged, RequestError>>,
    ) {
        let ends = match ends {
            Ok(ends) => ends,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let purged = self.reader.purge(&ends, &mut self.buffer);
        tracing::info!(namespace = %self.namespace, group = %self.name, messages = purged, "consumer group purged");
        let (tx, rx) = oneshot::channel();
        self.flush(tx);
        let _ = reply.send(Ok((purged, rx)));
    }

    /// An exclusive subscriber is the only one, and while it is there no other comes;
    /// `do_not_block` ones (one-off reads) neither count nor are refused.
    fn may_subscribe(&self, do_not_block: bool, exclusive: bool) -> Result<(), RequestError> {
        if do_not_block {
            return Ok(());
        }
        let mut others = self.subscribers.values().filter(|s| !s.do_not_block);
        let refused = if exclusive {
            others.next().is_some().then_some("it has other subscribers")
        } else {
            others.any(|s| s.exclusive).then_some("it has an exclusive subscriber")
        };
        match refused {
            None => Ok(()),
            Some(why) => Err(RequestError::new(
                ErrorCode::ConsumerGroupInExclusiveUse,
                format!("consumer_group: {:?} is in exclusive use: {why}", self.name),
            )),
        }
    }

    /// The subscriber is gone: what it held goes back for redelivery.
    fn unsubscribe(&mut self, id: SubscriberId) {
        self.counters.redeliveries.inc_by(self.buffer.in_flight_of(id) as u64);
        self.buffer.unsubscribe(id);
        self.subscribers.remove(&id);
    }

    fn stats(&self) -> GroupStats {
        let segments = self.reader.lag_inputs();
        let lag = super::lag::by_topic(
            self.reader.topics(),
            &segments,
            |id| self.buffer.outstanding(id) as u64,
            |id| self.segments.primary(id).map(|p| *p.confirmed().borrow()),
        );
        let oldest = [self.buffer.oldest_timestamp_ms(), self.reader.oldest_backlog_timestamp_ms()];
        let now = self.segments.clock().now_unix_ms();
        let oldest_unacked_ms = oldest.into_iter().flatten().min().map_or(0, |t| now.saturating_sub(t).max(0) as u64);
        GroupStats {
            namespace: self.namespace.clone(),
            group: self.name.clone(),
            lag,
            oldest_unacked_ms,
            subscribers: self.buffer.subscriber_count(),
            pending: self.buffer.pending_len(),
            in_flight: self.buffer.in_flight_len(),
            capacity: self.buffer.capacity(),
            committed: self.buffer.committed(),
        }
    }

    /// Peeks at the open segments that are not being read, so the lag sees records
    /// published meanwhile. A segment whose primary is this node needs none.
    fn start_peeks(&mut self) {
        for (id, from) in self.reader.peeks_due() {
            if self.peeking.contains_key(&id) || self.segments.primary(id).is_some() {
                continue;
            }
            let Some(seg) = self.cluster.state.read().state.segments.get(&id).cloned() else { continue };
            let segments = self.segments.clone();
            let wait = Duration::from_millis(segments.settings().read_wait_ms);
            let cancel = CancellationToken::new();
            self.peeking.insert(id, cancel.clone());
            self.peeks.push(Box::pin(async move {
                // One record at most: the answer's end is what matters. It comes once
                // records beyond `from` are confirmed (or the wait, or the segment, ends).
                let read = segments.read(id, &seg, ReadRequest::at(from, 1).waiting(wait));
                let r = tokio::select! {
                    biased;
                    r = read => r.ok(),
                    _ = cancel.cancelled() => None,
                };
                (id, r.map(|r| r.end_offset))
            }));
        }
    }

    fn peeked(&mut self, id: SegmentId, end: Option<u64>) {
        self.peeking.remove(&id);
        if let Some(end) = end {
            self.reader.peeked(id, end);
        }
    }

    /// After every event: feed the buffer, start the reads the reader asks for, hand
    /// out, and tell subscribers that wait for it that nothing is left.
    fn step(&mut self) {
        for (id, e) in self.reader.feed(&mut self.buffer) {
            tracing::error!(segment_id = id, error = %e, "consumer group reader out of step; re-reading");
        }
        for fetch in self.reader.next_fetches(&self.buffer) {
            self.start_fetch(fetch);
        }
        // Expired and beyond the ready limit: dead before anything is handed out.
        self.buffer.expire_messages(self.segments.clock().now_unix_ms());
        let handed = self.buffer.dispatch(self.now());
        self.counters.deliveries.inc_by(handed.len() as u64);
        self.dead_letter();
        for (sub, d) in handed {
            match self.subscribers.get_mut(&sub) {
                Some(s) if s.tx.try_send(Event::Message(d)).is_ok() => {}
                _ => self.unsubscribe(sub),
            }
        }
        // Only while a one-off read waits: every other step of a busy group skips it.
        let one_off = self.subscribers.values().any(|s| s.do_not_block);
        let caught_up = self
            .ends_known
            .as_ref()
            .filter(|_| one_off)
            .map(|(upto, ends)| (*upto, self.reader.caught_up(&self.buffer, ends)));
        let mut ask_ends = false;
        for (id, s) in self.subscribers.iter_mut() {
            let holds_none = self.buffer.in_flight_of(*id) == 0;
            if let Some(limit) = s.limit.take_if(|_| holds_none) {
                let _ = limit.send(());
            }
            if !s.do_not_block || !holds_none {
                continue;
            }
            match caught_up {
                Some((upto, CaughtUp::Yes)) if upto >= s.since => {
                    let _ = s.tx.try_send(Event::Drained);
                }
                // Records to come: the reads bring them.
                Some((upto, CaughtUp::No)) if upto >= s.since => {}
                _ => ask_ends = true,
            }
        }
        if ask_ends && self.ends_asked.is_none() {
            let heads = self.reader.open_heads();
            let asked: Vec<SegmentId> = heads.iter().map(|(id, _)| *id).collect();
            let ends = self.confirmed_ends(heads.into_iter().map(|(id, from)| (id, Err(from))).collect());
            // Not every end learnt: a pause before asking again.
            let failed_pause = async move {
                let r = ends.await;
                if r.as_ref().map_or(true, |ends| asked.iter().any(|id| !ends.contains_key(id))) {
                    tokio::time::sleep(READ_RETRY_PAUSE).await;
                }
                r
            };
            self.ends_asked = Some((self.one_offs, Box::pin(failed_pause)));
        }
    }

    /// Messages past the delivery limit go to the dead-letter topic (retried until
    /// published: they stay outstanding meanwhile, so none is lost to a failure or a
    /// restart; a restart may publish one twice), or are dropped without one.
    fn dead_letter(&mut self) {
        let topic = self.reader.spec().dead_letter_topic.clone();
        let key = self.reader.spec().dead_letter_routing_key.clone();
        for (d, reason) in self.buffer.take_dead() {
            let message = (!topic.is_empty()).then(|| dead_letter::message(&d, &self.name, reason, &key)).flatten();
            let Some(message) = message else {
                tracing::debug!(namespace = %self.namespace, group = %self.name, segment_id = d.segment_id,
                    offset = d.offset, deliveries = d.delivery_count, reason = reason.as_str(),
                    "dead, and no dead-letter topic; dropping the message");
                self.buffer.dead_lettered(d.segment_id, d.offset);
                self.counters.dropped.inc();
                continue;
            };
            self.dead_waiting.push_back(DeadLetter { record: (d.segment_id, d.offset), topic: topic.clone(), message });
        }
        self.publish_dead_letters();
    }

    /// Publishes the oldest waiting dead letters for one topic as one request (at most
    /// `write_batch_max_bytes` of them, and at least one), unless a publish is out.
    fn publish_dead_letters(&mut self) {
        if self.dead_publishing.is_some() {
            return;
        }
        let Some(first) = self.dead_waiting.front() else { return };
        let topic = first.topic.clone();
        let max_bytes = self.segments.settings().write_batch_max_bytes;
        let (mut records, mut messages, mut bytes) = (Vec::new(), Vec::new(), 0);
        while let Some(next) = self.dead_waiting.front() {
            let size = next.message.encoded_len();
            if next.topic != topic || (!messages.is_empty() && bytes + size > max_bytes) {
                break;
            }
            let next = self.dead_waiting.pop_front().expect("front was Some");
            bytes += size;
            records.push(next.record);
            messages.push(next.message);
        }
        let (segments, namespace) = (self.segments.clone(), self.namespace.clone());
        self.dead_publishing = Some(Box::pin(async move {
            for attempt in 1u32.. {
                match segments.publish(&namespace, &topic, &messages, Persistence::Default, None, 0).await {
                    Ok(_) => break,
                    Err(e) if attempt == DEAD_LETTER_ATTEMPTS_WARN => tracing::warn!(%namespace, %topic, error = %e,
                        attempts = attempt, "cannot publish to the dead-letter topic; retrying (the messages stay unacknowledged)"),
                    Err(e) => tracing::debug!(%namespace, %topic, error = %e, "dead-letter publish failed; retrying"),
                }
                tokio::time::sleep(READ_RETRY_PAUSE * 10).await;
            }
            records
        }));
    }

    fn start_fetch(&mut self, f: Fetch) {
        let Some(seg) = self.cluster.state.read().state.segments.get(&f.segment_id).cloned() else {
            self.reader.fetch_dropped(f.segment_id);
            return;
        };
        tracing::trace!(group = %self.name, segment_id = f.segment_id, from = f.from, since = f.since_unix_ms,
            idle = f.idle, open = seg.is_open(), "group read");
        let settings = self.segments.settings();
        let wait = if seg.is_open() { Duration::from_millis(settings.read_wait_ms) } else { Duration::ZERO };
        let (segments, max_bytes) = (self.segments.clone(), settings.read_batch_max_bytes);
        let cancel = CancellationToken::new();
        if seg.is_open() {
            self.open_fetches.insert(f.segment_id, cancel.clone());
        }
        self.fetches.push(Box::pin(async move {
            let read = ReadRequest::at(f.from, max_bytes).waiting(wait).since(f.since_unix_ms);
            let read = segments.read(f.segment_id, &seg, read);
            let r = tokio::select! {
                biased;
                r = read => r,
                // The segment closed: read it again as closed, at once.
                _ = cancel.cancelled() => return (f.segment_id, Err(segment_closed(f.segment_id))),
            };
            if r.is_err() || (f.idle && !seg.is_open()) {
                tokio::time::sleep(READ_RETRY_PAUSE).await;
            }
            (f.segment_id, r)
        }));
    }

    /// Records what moved since the last commit, unless one is still on its way.
    fn commit_in_background(&mut self) {
        if self.commit_in_flight.is_some() {
            return;
        }
        let Some(commit) = self.next_commit() else { return };
        self.commit_carries = (commit.offsets.keys().copied().collect(), commit.handed_out.keys().copied().collect());
        self.commits_started += 1;
        self.commit_in_flight = Some(self.commits.commit(commit));
    }

    /// The commit in flight ended: answer the flushes it covers, and start the next
    /// one at once when flushes wait for it (nothing left to record answers them).
    fn committed(&mut self, result: Result<(), String>) {
        self.commit_in_flight = None;
        let (offsets, handed_out) = std::mem::take(&mut self.commit_carries);
        if let Err(e) = result {
            // Not recorded (or not known to be): the next commit carries them again,
            // else a group that then stays idle would never record how far it got,
            // and retention would keep what it has consumed.
            self.commit_failures = self.commit_failures.saturating_add(1);
            if self.commit_failures == 1 {
                tracing::info!(namespace = %self.namespace, group = %self.name, error = %e,
                    "offset commit failed; retried with the next one, later each time while they fail");
            } else {
                tracing::debug!(namespace = %self.namespace, group = %self.name, error = %e,
                    failures = self.commit_failures, "offset commit failed again");
            }
            for id in offsets {
                self.last_committed.remove(&id);
            }
            for id in handed_out {
                self.last_handed_out.remove(&id);
            }
        } else {
            self.commit_failures = 0;
        }
        let done = self.commits_started;
        for (_, reply) in self.flushes.extract_if(.., |(needs, _)| *needs <= done) {
            let _ = reply.send(());
        }
        if !self.flushes.is_empty() {
            self.commit_in_background();
            if self.commit_in_flight.is_none() {
                for (_, reply) in self.flushes.drain(..) {
                    let _ = reply.send(());
                }
            }
        }
    }

    /// What moved since the last commit (offsets, hand-out marks), noted as recorded.
    fn next_commit(&mut self) -> Option<GroupOffsets> {
        let offsets = moved(self.buffer.committed(), &self.last_committed);
        let handed_out = moved(self.buffer.handed_out(), &self.last_handed_out);
        if offsets.is_empty() && handed_out.is_empty() {
            return None;
        }
        self.last_committed.extend(offsets.clone());
        self.last_handed_out.extend(handed_out.clone());
        Some(GroupOffsets { namespace: self.namespace.clone(), group: self.name.clone(), offsets, handed_out })
    }

    /// Last commit, so a graceful stop redelivers nothing that was acknowledged.
    async fn last_commit(mut self) {
        if self.commit_in_flight.is_some() {
            // A failed one puts back what it carried, for the last one to carry.
            let r = commit_done(&mut self.commit_in_flight).await;
            self.committed(r);
        }
        let Some(commit) = self.next_commit() else { return };
        let done = self.commits.commit(commit);
        match commit_done(&mut Some(done)).await {
            Ok(()) => {}
            Err(e) => tracing::warn!(namespace = %self.namespace, group = %self.name, error = %e,
                "last offset commit failed"),
        }
    }
}

/// The wait before the next commit: the interval, doubled for each commit that failed
/// in a row up to [`COMMIT_BACKOFF_MAX_FACTOR`] times it, plus (after a failure) up
/// to one interval more that depends on the group's name, so that groups that failed
/// together spread their retries (the same every run: simulations replay).
fn commit_backoff(interval: Duration, failures: u32, name: &str) -> Duration {
    if failures == 0 {
        return interval;
    }
    let factor = 1u32 << failures.min(COMMIT_BACKOFF_MAX_FACTOR.trailing_zeros());
    let spread = {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        (name, failures).hash(&mut h);
        interval.mul_f64((h.finish() % 1000) as f64 / 1000.0)
    };
    interval * factor + spread
}

/// At most this many intervals between commits while they fail (a power of two).
const COMMIT_BACKOFF_MAX_FACTOR: u32 = 32;

/// Waits for the commit in flight (the caller polls this only when there is one).
async fn ends_learnt(asked: &mut Option<(u64, EndsFuture)>) -> (u64, Result<BTreeMap<SegmentId, u64>, RequestError>) {
    match asked {
        Some((upto, ends)) => (*upto, ends.await),
        None => std::future::pending().await,
    }
}

async fn dead_letters_published(publishing: &mut Option<DeadLetterFuture>) -> Vec<(SegmentId, u64)> {
    match publishing {
        Some(publish) => publish.await,
        None => std::future::pending().await,
    }
}

async fn commit_done(commit: &mut Option<oneshot::Receiver<CommitResult>>) -> Result<(), String> {
    match commit {
        Some(answer) => match answer.await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err("the node is stopping: its offset commits are no longer written".to_string()),
        },
        None => std::future::pending().await,
    }
}

fn segment_closed(id: SegmentId) -> RequestError {
    RequestError::new(ErrorCode::SegmentClosed, format!("segment {id} closed while a read of it waited for records"))
}

/// The group's own ack timeout, else the node's.
fn ack_timeout_ms(spec: &ConsumerGroupSpec, node_default_ms: u64) -> Millis {
    if spec.ack_timeout_ms == 0 {
        node_default_ms
    } else {
        spec.ack_timeout_ms
    }
}

/// The entries of `now` ahead of `last`.
fn moved(now: BTreeMap<SegmentId, u64>, last: &BTreeMap<SegmentId, u64>) -> BTreeMap<SegmentId, u64> {
    now.into_iter().filter(|(seg, off)| last.get(seg).is_none_or(|l| off > l)).collect()
}

/// Acks or nacks `keys`: how many were settled now, and an error naming those that
/// were not delivered (an ack of what is done already answers OK and counts nothing).
fn settle(buffer: &mut GroupBuffer, keys: &[(SegmentId, u64)], ack: bool) -> (u64, Result<(), RequestError>) {
    let mut missing = Vec::new();
    let mut done = 0u64;
    for &(seg, off) in keys {
        let r = if ack { buffer.ack(seg, off) } else { buffer.nack(seg, off).map(|()| Acked::Now) };
        match r {
            Ok(Acked::Now) => done += 1,
            Ok(Acked::Already) => {}
            Err(_) => missing.push(format!("{seg}/{off}")),
        }
    }
    if missing.is_empty() {
        return (done, Ok(()));
    }
    let e = RequestError::new(
        ErrorCode::NotInFlight,
        format!(
            "deliveries: {} not delivered (not yet handed out, or of a segment the group does not know): {}",
            missing.len(),
            missing.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
        ),
    );
    (done, Err(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_that_fail_wait_longer_each_time_up_to_a_bound_spread_by_group() {
        let i = Duration::from_secs(1);
        assert_eq!(commit_backoff(i, 0, "g"), i, "no failure: the interval");
        for (failures, factor) in [(1, 2), (2, 4), (5, 32), (6, 32), (1000, 32)] {
            let wait = commit_backoff(i, failures, "g");
            assert!(wait >= i * factor && wait < i * (factor + 1), "{failures} failures: {wait:?}");
            assert_eq!(wait, commit_backoff(i, failures, "g"), "the same every time");
        }
        let spread: std::collections::BTreeSet<Duration> =
            (0..50).map(|n| commit_backoff(i, 3, &format!("group-{n}"))).collect();
        assert!(spread.len() > 40, "groups that failed together retry apart: {spread:?}");
    }
}
