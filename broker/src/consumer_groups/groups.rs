//! The consumer groups of this node: starting and stopping group tasks as the cluster
//! state places groups here, finding where a group runs, and the subscriber side of
//! `Subscribe`, `Ack` and `Nack` for a group running here. A request for a group that
//! runs elsewhere is relayed there through `peers/` ([`Located::Remote`]);
//! [`Groups::subscribe_anywhere`] and [`Groups::settle_anywhere`] do both for the
//! front doors (gRPC in `api/`, AMQP in `amqp/`).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventtermq_proto::v1::{
    ConsumerGroupStatus, Delivery as PbDelivery, DescribeConsumerGroupsRequest, Message, PurgeConsumerGroupRequest,
    SubscribeRequest, SubscribeResponse,
};
use prost::Message as _;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use super::buffer::{Delivery, SubscriberId};
use super::commits::OffsetCommits;
use super::task::{self, Event, GroupCmd, GroupStats};
use crate::cluster::Cluster;
use crate::cluster_state::{NodeId, Touched};
use crate::error::{ErrorCode, RequestError};
use crate::peers::{Peers, Relayed};
use crate::replication::{lock, Segments};

/// Requests queued to one group task; senders (subscriptions, acks) wait beyond.
const GROUP_COMMAND_QUEUE_MAX: usize = 1024;
/// Acks of one subscription sent to the group task in one command at most.
const AUTO_ACK_BATCH_MAX: usize = 1024;
/// Messages queued to one subscriber's stream at most (its window bounds it first).
const SUBSCRIBER_STREAM_QUEUE_MAX: usize = 1024;
/// Pause between looks for a group that is not placed on a live node yet.
const LOCATE_RETRY_PAUSE: Duration = Duration::from_millis(50);
/// How long a scrape or an Admin call waits for a group task's figures: a task answers
/// between two events, so only a stuck one takes this long (and is left out).
const STATS_WAIT_MAX: Duration = Duration::from_secs(1);

/// How long a complete bounded subscription waits for its acks to be recorded in the
/// cluster state before its stream ends anyway (they are then recorded a commit
/// interval later, as every ack is).
const FLUSH_WAIT_MAX: Duration = Duration::from_secs(5);

type GroupKey = (String, String);

/// The consumer groups of this node. Cheap to clone.
#[derive(Clone)]
pub struct Groups {
    inner: Arc<Inner>,
}

struct Inner {
    segments: Segments,
    commits: OffsetCommits,
    running: Mutex<HashMap<GroupKey, GroupHandle>>,
}

/// A group task running on this node.
#[derive(Clone)]
pub struct GroupHandle {
    cmd: mpsc::Sender<GroupCmd>,
    /// Tells the task that the cluster state changed its group or one of its topics.
    refresh: Arc<Notify>,
    stop: CancellationToken,
    task: Arc<tokio::sync::Mutex<Option<JoinHandle<Option<()>>>>>,
}

/// What a queue's `declare-ok` and `queue.delete`'s checks need of a group, from the
/// node running it: every subscription reaches the group there, whichever node the
/// client is connected to, so these are the cluster's figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Occupancy {
    /// Messages waiting for a subscriber: the group's lag (the figure of
    /// `consumer_group_lag_records`, summed over its bound topics) less those handed
    /// out and not acknowledged.
    pub ready: u64,
    /// Its subscribers (AMQP consumers and gRPC subscribers, on any node).
    pub subscribers: u64,
}

impl Occupancy {
    pub fn of(st: &GroupStats) -> Self {
        let lag = st.lag.values().fold(0u64, |a, b| a.saturating_add(*b));
        Occupancy { ready: lag.saturating_sub(st.in_flight as u64), subscribers: st.subscribers as u64 }
    }

    fn of_status(st: &ConsumerGroupStatus) -> Self {
        Occupancy { ready: st.lag.saturating_sub(u64::from(st.in_flight)), subscribers: u64::from(st.subscribers) }
    }
}

/// Where a group runs.
pub enum Located {
    Here(GroupHandle),
    /// On the node at this address: relay the request there.
    Remote(String),
}

impl Groups {
    pub fn new(segments: Segments) -> Self {
        let commits = OffsetCommits::start(&segments);
        Self { inner: Arc::new(Inner { segments, commits, running: Mutex::default() }) }
    }

    fn cluster(&self) -> &Cluster {
        self.inner.segments.cluster()
    }

    /// Starts and stops group tasks as the cluster state assigns groups to this node,
    /// and tells each running task when the state changed its group or one of its
    /// topics ([`ChangeLog`](crate::cluster_state::ChangeLog)): a change wakes the tasks it concerns, not all of them,
    /// and nothing wakes them while nothing changes.
    pub async fn run(self, stop: CancellationToken) {
        // Other groups' offset commits change neither assignments nor what a task
        // acts on (see `tell_changes`).
        let mut layout_changes = self.cluster().layout_changes();
        let mut seen = 0;
        loop {
            self.follow_assignments().await;
            self.tell_changes(&mut seen);
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                r = layout_changes.changed() => if r.is_err() { return },
            }
        }
    }

    /// Wakes the running tasks that what was applied after index `seen` concerns.
    fn tell_changes(&self, seen: &mut u64) {
        let st = self.cluster().state.read();
        let applied = st.last_applied.map_or(0, |l| l.index);
        if applied == *seen {
            return;
        }
        let changes = st.changes.since(*seen);
        *seen = applied;
        let running = lock(&self.inner.running);
        let mut woken: Vec<(&GroupKey, &GroupHandle)> = match changes {
            None => running.iter().collect(),
            Some(changes) => {
                let (mut namespaces, mut topics, mut groups) = (HashSet::new(), HashSet::new(), HashSet::new());
                for c in changes {
                    match c {
                        Touched::Namespace(ns) => {
                            namespaces.insert(ns.as_str());
                        }
                        Touched::Topic { namespace, topic } => {
                            topics.insert((namespace.as_str(), topic.as_str()));
                        }
                        Touched::Group { namespace, group } => {
                            groups.insert((namespace.as_str(), group.as_str()));
                        }
                        Touched::Nodes | Touched::Rotation => {}
                    }
                }
                if namespaces.is_empty() && topics.is_empty() && groups.is_empty() {
                    return;
                }
                running
                    .iter()
                    .filter(|((ns, name), _)| {
                        namespaces.contains(ns.as_str())
                            || groups.contains(&(ns.as_str(), name.as_str()))
                            || st.state.namespaces.get(ns).and_then(|n| n.consumer_groups.get(name)).is_some_and(|g| {
                                g.bindings.iter().any(|b| topics.contains(&(ns.as_str(), b.topic.as_str())))
                            })
                    })
                    .collect()
            }
        };
        // In a fixed order: the tasks then run in it (a simulation replays exactly).
        woken.sort_by(|a, b| a.0.cmp(b.0));
        for (_, h) in woken {
            h.refresh.notify_one();
        }
    }

    async fn follow_assignments(&self) {
        let me = self.cluster().id;
        let assigned: BTreeSet<GroupKey> = {
            let st = self.cluster().state.read();
            st.state
                .groups
                .iter()
                .flat_map(|(ns, gs)| {
                    gs.iter().filter(|(_, g)| g.node == Some(me)).map(move |(name, _)| (ns.clone(), name.clone()))
                })
                .collect()
        };
        let stale: Vec<(GroupKey, GroupHandle)> = {
            let mut running = lock(&self.inner.running);
            let stale_keys: Vec<GroupKey> = running.keys().filter(|k| !assigned.contains(*k)).cloned().collect();
            stale_keys.into_iter().filter_map(|k| running.remove(&k).map(|h| (k, h))).collect()
        };
        for ((ns, name), h) in stale {
            tracing::info!(node_id = me, namespace = %ns, group = %name, "consumer group no longer runs here");
            stop_group(h).await;
        }
        for key in assigned {
            if lock(&self.inner.running).contains_key(&key) {
                continue;
            }
            tracing::info!(node_id = me, namespace = %key.0, group = %key.1, "starting consumer group");
            let h = start_group(self.inner.segments.clone(), self.inner.commits.clone(), key.clone());
            lock(&self.inner.running).insert(key, h);
        }
    }

    /// The lag and delivery state of every group running here (those that answer in
    /// time), by namespace and name.
    pub async fn stats(&self) -> Vec<GroupStats> {
        let running: Vec<GroupHandle> = lock(&self.inner.running).values().cloned().collect();
        let all = futures::future::join_all(running.iter().map(group_stats)).await;
        let mut all: Vec<GroupStats> = all.into_iter().flatten().collect();
        all.sort_by(|a, b| (&a.namespace, &a.group).cmp(&(&b.namespace, &b.group)));
        all
    }

    /// The lag and delivery state of one group if it runs here.
    pub async fn stats_of(&self, namespace: &str, group: &str) -> Option<GroupStats> {
        group_stats(&self.local(namespace, group)?).await
    }

    /// Stops every group task after a last commit of its offsets (graceful shutdown).
    pub async fn stop_all(&self) {
        let all: Vec<GroupHandle> = lock(&self.inner.running).drain().map(|(_, h)| h).collect();
        futures::future::join_all(all.into_iter().map(stop_group)).await;
    }

    fn local(&self, namespace: &str, group: &str) -> Option<GroupHandle> {
        lock(&self.inner.running).get(&(namespace.to_string(), group.to_string())).cloned()
    }

    /// Where the group runs now; waits (within the request timeout) while it is not
    /// placed or its node is gone. A `forwarded` request is never sent on again.
    pub async fn locate(&self, namespace: &str, group: &str, forwarded: bool) -> Result<Located, RequestError> {
        let deadline = tokio::time::Instant::now() + self.cluster().request_timeout();
        let mut checked = false;
        loop {
            if let Some(h) = self.local(namespace, group) {
                return Ok(Located::Here(h));
            }
            let target = match self.placed_on(namespace, group) {
                Err(e) if checked => return Err(e),
                Err(_) => None,
                Ok(target) => target,
            };
            if !checked {
                // The group may be newer than this node's copy of the state.
                checked = true;
                if target.is_none() {
                    drop(self.cluster().read(true).await?);
                    continue;
                }
            }
            if let Some(addr) = target.filter(|_| !forwarded) {
                return Ok(Located::Remote(addr));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(RequestError::new(
                    ErrorCode::NotReady,
                    format!("consumer_group: {group:?} is not running on any live node yet; retry"),
                ));
            }
            tokio::time::sleep(LOCATE_RETRY_PAUSE).await;
        }
    }

    /// The address of the live node other than this one the group is placed on, from
    /// this node's copy of the state.
    fn placed_on(&self, namespace: &str, group: &str) -> Result<Option<String>, RequestError> {
        let st = self.cluster().state.read();
        st.state.namespace(namespace)?.consumer_groups.get(group).ok_or_else(|| {
            RequestError::new(
                ErrorCode::ConsumerGroupNotFound,
                format!("consumer_group: {group:?} does not exist in namespace {namespace:?}"),
            )
        })?;
        let node = st.state.group_runtime(namespace, group).and_then(|g| g.node);
        let live_elsewhere = node.filter(|n| *n != self.cluster().id && !st.state.node_gone(*n));
        Ok(live_elsewhere.and_then(|n| st.state.nodes.get(&n).map(|r| r.address.clone())))
    }

    /// Serves a subscription to a group running here; see `SubscribeRequest` in
    /// messaging.proto.
    pub async fn subscribe(
        &self,
        group: GroupHandle,
        req: SubscribeRequest,
    ) -> Result<Relayed<SubscribeResponse>, RequestError> {
        let max_unacked = eventtermq_api::defaults::subscriber_size(req.size);
        let (reply, rx) = oneshot::channel();
        let cmd = GroupCmd::Subscribe {
            max_unacked,
            max_messages: req.max_messages,
            do_not_block: req.do_not_block,
            exclusive: req.exclusive,
            reply,
        };
        group.cmd.send(cmd).await.map_err(|_| gone(&req.consumer_group))?;
        let (sub, events) = rx.await.map_err(|_| gone(&req.consumer_group))??;
        let queue = (max_unacked as usize).clamp(1, SUBSCRIBER_STREAM_QUEUE_MAX);
        let (out, out_rx) = mpsc::channel::<Result<SubscribeResponse, RequestError>>(queue);
        self.inner.segments.spawn(serve_subscriber(group, sub, events, out, req));
        Ok(Box::pin(ReceiverStream::new(out_rx)))
    }

    /// Acknowledges (`ack`) or returns for redelivery (`!ack`) deliveries of a group
    /// running here.
    pub async fn settle(
        &self,
        group: &GroupHandle,
        name: &str,
        deliveries: &[PbDelivery],
        ack: bool,
    ) -> Result<(), RequestError> {
        let keys = deliveries.iter().map(|d| (d.segment_id, d.offset)).collect();
        let (tx, rx) = oneshot::channel();
        let cmd = if ack { GroupCmd::Ack(keys, tx) } else { GroupCmd::Nack(keys, tx) };
        group.cmd.send(cmd).await.map_err(|_| gone(name))?;
        rx.await.map_err(|_| gone(name))?
    }
}

impl Groups {
    /// The group's [`Occupancy`] from the node running it (this one or another), or
    /// `None` when it runs on no live node now or that node does not answer within
    /// [`STATS_WAIT_MAX`]. Does not wait for the group to be placed.
    pub async fn occupancy_anywhere(&self, peers: &Peers, namespace: &str, group: &str) -> Option<Occupancy> {
        if let Some(h) = self.local(namespace, group) {
            return group_stats(&h).await.map(|st| Occupancy::of(&st));
        }
        let (node, addr) = self.live_node_of(namespace, group)?;
        let req = DescribeConsumerGroupsRequest { namespace: namespace.to_string(), names: vec![group.to_string()] };
        let r = peers.describe_consumer_groups(node, &addr, req, STATS_WAIT_MAX).await.ok()?;
        r.consumer_groups.iter().find(|g| g.name == group).map(Occupancy::of_status)
    }

    /// The live node other than this one the group is placed on, as this node's copy of
    /// the state has it.
    fn live_node_of(&self, namespace: &str, group: &str) -> Option<(NodeId, String)> {
        let st = self.cluster().state.read();
        let node = st.state.group_runtime(namespace, group)?.node?;
        if node == self.cluster().id || st.state.node_gone(node) {
            return None;
        }
        st.state.nodes.get(&node).map(|r| (node, r.address.clone()))
    }

    /// Purges a group running here (see `GroupCmd::Purge`): how many messages went,
    /// once that is recorded (or [`FLUSH_WAIT_MAX`] passed).
    pub async fn purge(&self, group: &GroupHandle, name: &str) -> Result<u64, RequestError> {
        let (tx, rx) = oneshot::channel();
        group.cmd.send(GroupCmd::Purge(tx)).await.map_err(|_| gone(name))?;
        let (purged, recorded) = rx.await.map_err(|_| gone(name))??;
        let _ = tokio::time::timeout(FLUSH_WAIT_MAX, recorded).await;
        Ok(purged)
    }

    /// Purges the group wherever it runs (a `forwarded` request is never sent on
    /// again). The group's node learns of segments created before the call first.
    pub async fn purge_anywhere(
        &self,
        peers: &Peers,
        namespace: &str,
        group: &str,
        forwarded: bool,
    ) -> Result<u64, RequestError> {
        match self.locate(namespace, group, forwarded).await? {
            Located::Here(h) => {
                drop(self.cluster().read(true).await?);
                self.purge(&h, group).await
            }
            Located::Remote(addr) => {
                let req = PurgeConsumerGroupRequest { namespace: namespace.to_string(), name: group.to_string() };
                Ok(peers.purge_consumer_group(&addr, req).await?.purged)
            }
        }
    }

    /// Subscribes to the group wherever it runs: here, or relayed to its node (a
    /// `forwarded` request is never sent on again).
    pub async fn subscribe_anywhere(
        &self,
        peers: &Peers,
        req: SubscribeRequest,
        forwarded: bool,
    ) -> Result<Relayed<SubscribeResponse>, RequestError> {
        match self.locate(&req.namespace, &req.consumer_group, forwarded).await? {
            Located::Here(group) => self.subscribe(group, req).await,
            Located::Remote(addr) => Ok(peers.relay_subscribe(&addr, req).await?),
        }
    }

    /// Acknowledges (`ack`) or returns for redelivery (`!ack`) delivered messages on
    /// the group's node, wherever it runs.
    pub async fn settle_anywhere(
        &self,
        peers: &Peers,
        namespace: String,
        group: String,
        deliveries: Vec<PbDelivery>,
        ack: bool,
        forwarded: bool,
    ) -> Result<(), RequestError> {
        if deliveries.is_empty() {
            return Err(RequestError::new(ErrorCode::InvalidArgument, "deliveries: at least one is required"));
        }
        match self.locate(&namespace, &group, forwarded).await? {
            Located::Here(g) => self.settle(&g, &group, &deliveries, ack).await,
            Located::Remote(addr) => Ok(peers.settle(&addr, namespace, group, deliveries, ack).await?),
        }
    }
}

/// Moves one subscriber's messages from the group task to its stream, acking them
/// there when it auto-acks, until it has `max_messages` (and acked them) or leaves;
/// a complete stream ends once its acks are recorded ([`GroupCmd::Flush`]).
async fn serve_subscriber(
    group: GroupHandle,
    sub: SubscriberId,
    mut events: mpsc::Receiver<Event>,
    out: mpsc::Sender<Result<SubscribeResponse, RequestError>>,
    req: SubscribeRequest,
) {
    let limit = (req.max_messages > 0).then_some(req.max_messages);
    let mut delivered = 0u64;
    // Whether the stream ends because it is complete (limit reached, or drained),
    // rather than because the client or the group went away.
    let mut complete = false;
    'stream: loop {
        let first = tokio::select! {
            biased;
            ev = events.recv() => ev,
            _ = out.closed() => None,
        };
        let Some(mut ev) = first else { break };
        let mut acks = Vec::new();
        loop {
            let Event::Message(d) = ev else {
                complete = true;
                break 'stream;
            };
            let key = (d.segment_id, d.offset);
            if out.send(Ok(to_response(d))).await.is_err() {
                break 'stream;
            }
            delivered += 1;
            if req.auto_ack {
                acks.push(key);
            }
            if limit.is_some_and(|l| delivered >= l) {
                break;
            }
            // Ack what is already queued in one command.
            match events.try_recv() {
                Ok(next) if acks.len() < AUTO_ACK_BATCH_MAX => ev = next,
                Ok(next) => {
                    let (tx, _) = oneshot::channel();
                    let _ = group.cmd.send(GroupCmd::Ack(std::mem::take(&mut acks), tx)).await;
                    ev = next;
                }
                Err(_) => break,
            }
        }
        let limited = limit.is_some_and(|l| delivered >= l);
        // At the limit, dispatch stops before the last acks free the window: the task
        // would otherwise hand this subscriber messages it never reads.
        let (limit_tx, limit_rx) = oneshot::channel();
        if limited {
            let _ = group.cmd.send(GroupCmd::Limit(sub, limit_tx)).await;
        }
        if !acks.is_empty() {
            let (tx, _) = oneshot::channel();
            let _ = group.cmd.send(GroupCmd::Ack(acks, tx)).await;
        }
        if limited {
            // Keep the subscription until the client acked what it holds (or left).
            let rx = limit_rx;
            tokio::select! {
                biased;
                r = rx => complete = r.is_ok(),
                _ = out.closed() => {}
            }
            break;
        }
    }
    let _ = group.cmd.send(GroupCmd::Unsubscribe(sub)).await;
    if complete {
        // What this subscription acked is recorded before its stream ends.
        let (tx, rx) = oneshot::channel();
        if group.cmd.send(GroupCmd::Flush(tx)).await.is_ok() {
            let _ = tokio::time::timeout(FLUSH_WAIT_MAX, rx).await;
        }
    }
}

async fn group_stats(h: &GroupHandle) -> Option<GroupStats> {
    let (tx, rx) = oneshot::channel();
    let asked = async {
        h.cmd.send(GroupCmd::Stats(tx)).await.ok()?;
        rx.await.ok()
    };
    tokio::time::timeout(STATS_WAIT_MAX, asked).await.ok().flatten()
}

fn gone(group: &str) -> RequestError {
    RequestError::new(ErrorCode::NotReady, format!("consumer_group: {group:?} stopped on this node; subscribe again"))
}

fn to_response(d: Delivery) -> SubscribeResponse {
    // Stored payloads are encoded `Message`s; the primary encoded them.
    let (delivery_count, redelivered) = (d.delivery_count, d.redelivered());
    let message = Message::decode(d.message).ok();
    let ms = d.timestamp_ms;
    let timestamp =
        prost_types::Timestamp { seconds: ms.div_euclid(1000), nanos: (ms.rem_euclid(1000) * 1_000_000) as i32 };
    SubscribeResponse {
        topic: d.topic.to_string(),
        segment_id: d.segment_id,
        offset: d.offset,
        message,
        delivery_count,
        redelivered,
        timestamp: Some(timestamp),
    }
}

async fn stop_group(h: GroupHandle) {
    h.stop.cancel();
    if let Some(t) = h.task.lock().await.take() {
        let _ = t.await;
    }
}

fn start_group(segments: Segments, commits: OffsetCommits, (namespace, name): GroupKey) -> GroupHandle {
    let (cmd, rx) = mpsc::channel(GROUP_COMMAND_QUEUE_MAX);
    let stop = CancellationToken::new();
    let refresh = Arc::new(Notify::new());
    let task = segments.clone().spawn(task::run(segments, commits, namespace, name, rx, refresh.clone(), stop.clone()));
    GroupHandle { cmd, refresh, stop, task: Arc::new(tokio::sync::Mutex::new(Some(task))) }
}
