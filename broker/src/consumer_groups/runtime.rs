//! Running consumer groups: one task per group on the node the leader assigned it to,
//! and the subscriber side of `Subscribe`, `Ack` and `Nack` on every node (forwarded
//! to the group's node when it runs elsewhere).
//!
//! A group task reads the bound topics' segments in offset order (locally or from the
//! node that holds them), matches each record against the bindings, keeps matching
//! messages in its [`GroupBuffer`] (at most `size`), hands them to subscribers, and
//! every `offsets_commit_interval_ms` records in the cluster state how far everything
//! is acknowledged. A task that starts (first time, after a restart, or on a new node)
//! resumes from the committed offsets, so every message is delivered at least once.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventtermq_proto::v1::{
    messaging_client::MessagingClient, AckRequest, Delivery as PbDelivery, Message, NackRequest, SubscribeRequest,
    SubscribeResponse,
};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use prost::Message as _;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use super::buffer::{Delivery, GroupBuffer, SubscriberId};
use super::matching;
use crate::cluster_state::{Command, ConsumerGroupSpec, SegmentId, SegmentRecord};
use crate::error::{ErrorCode, RequestError};
use crate::replication::publish::FORWARDED_METADATA;
use crate::replication::{lock, Segments};

/// The messages of one subscription: local, or relayed from the group's node.
pub type SubscribeStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<SubscribeResponse, Status>> + Send>>;

/// A subscriber's window when the request leaves `size` at 0.
pub const SUBSCRIBER_SIZE_DEFAULT: u32 = 1000;

type GroupKey = (String, String);

/// The consumer groups of this node. Cheap to clone.
#[derive(Clone)]
pub struct Groups {
    inner: Arc<Inner>,
}

struct Inner {
    segments: Segments,
    running: Mutex<HashMap<GroupKey, GroupHandle>>,
}

#[derive(Clone)]
struct GroupHandle {
    cmd: mpsc::UnboundedSender<GroupCmd>,
    stop: CancellationToken,
    task: Arc<tokio::sync::Mutex<Option<JoinHandle<()>>>>,
}

enum GroupCmd {
    Subscribe {
        max_unacked: u32,
        do_not_block: bool,
        reply: oneshot::Sender<(SubscriberId, mpsc::Receiver<Event>)>,
    },
    Unsubscribe(SubscriberId),
    /// The subscriber got its `max_messages`: hand it nothing more; answer once none of
    /// its messages is in flight.
    Limit(SubscriberId, oneshot::Sender<()>),
    Ack(Vec<(SegmentId, u64)>, oneshot::Sender<Result<(), RequestError>>),
    Nack(Vec<(SegmentId, u64)>, oneshot::Sender<Result<(), RequestError>>),
}

enum Event {
    Message(Delivery),
    /// Nothing to deliver right now (only sent to `do_not_block` subscribers).
    Drained,
}

impl Groups {
    pub fn new(segments: Segments) -> Self {
        Self { inner: Arc::new(Inner { segments, running: Mutex::default() }) }
    }

    fn cluster(&self) -> &crate::node::Cluster {
        self.inner.segments.cluster()
    }

    /// Starts and stops group tasks as the cluster state assigns groups to this node.
    pub async fn run(self, stop: CancellationToken) {
        let mut metrics = self.cluster().raft.metrics();
        let me = self.cluster().id;
        loop {
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
                tracing::info!(namespace = %ns, group = %name, "consumer group no longer runs here");
                stop_group(h).await;
            }
            for key in assigned {
                if lock(&self.inner.running).contains_key(&key) {
                    continue;
                }
                tracing::info!(namespace = %key.0, group = %key.1, "starting consumer group");
                let h = start_group(self.inner.segments.clone(), key.clone());
                lock(&self.inner.running).insert(key, h);
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                r = metrics.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    /// Stops every group task after a last commit of its offsets (graceful shutdown).
    pub async fn stop_all(&self) {
        let all: Vec<GroupHandle> = lock(&self.inner.running).drain().map(|(_, h)| h).collect();
        futures::future::join_all(all.into_iter().map(stop_group)).await;
    }

    fn local(&self, namespace: &str, group: &str) -> Option<GroupHandle> {
        lock(&self.inner.running).get(&(namespace.to_string(), group.to_string())).cloned()
    }

    /// Where the group runs now: `Ok(None)` here, `Ok(Some(addr))` elsewhere; waits
    /// (within the request timeout) while it is not placed or its node is gone.
    async fn locate(&self, namespace: &str, group: &str, forwarded: bool) -> Result<Option<GroupHandle>, Located> {
        let deadline = tokio::time::Instant::now() + self.cluster().request_timeout();
        let mut checked = false;
        loop {
            if let Some(h) = self.local(namespace, group) {
                return Ok(Some(h));
            }
            let target = {
                let st = self.cluster().state.read();
                match st.state.namespace(namespace).and_then(|ns| {
                    ns.consumer_groups.get(group).ok_or_else(|| {
                        RequestError::new(
                            ErrorCode::ConsumerGroupNotFound,
                            format!("consumer_group: {group:?} does not exist in namespace {namespace:?}"),
                        )
                    })
                }) {
                    Err(e) if checked => return Err(Located::Error(e)),
                    Err(_) => None,
                    Ok(_) => st
                        .state
                        .group_runtime(namespace, group)
                        .and_then(|g| g.node)
                        .filter(|n| *n != self.cluster().id && !st.state.node_gone(*n))
                        .and_then(|n| st.state.nodes.get(&n).map(|r| (n, r.address.clone()))),
                }
            };
            if !checked {
                // The group may be newer than this node's copy of the state.
                checked = true;
                if target.is_none() {
                    drop(self.cluster().read(true).await.map_err(Located::Error)?);
                    continue;
                }
            }
            if let Some((_, addr)) = target {
                if !forwarded {
                    return Err(Located::Remote(addr));
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Located::Error(RequestError::new(
                    ErrorCode::NotReady,
                    format!("consumer_group: {group:?} is not running on any live node yet; retry"),
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Serves a subscription; see `SubscribeRequest` in messaging.proto.
    pub async fn subscribe(&self, req: SubscribeRequest, forwarded: bool) -> Result<SubscribeStream, Status> {
        let group = match self.locate(&req.namespace, &req.consumer_group, forwarded).await {
            Ok(Some(h)) => h,
            Ok(None) => unreachable!("locate returns a handle or an error"),
            Err(Located::Error(e)) => return Err(e.into()),
            Err(Located::Remote(addr)) => return self.proxy_subscribe(&addr, req).await,
        };
        let max_unacked = if req.size == 0 { SUBSCRIBER_SIZE_DEFAULT } else { req.size };
        let (reply, rx) = oneshot::channel();
        group
            .cmd
            .send(GroupCmd::Subscribe { max_unacked, do_not_block: req.do_not_block, reply })
            .map_err(|_| gone(&req.consumer_group))?;
        let (sub, mut events) = rx.await.map_err(|_| gone(&req.consumer_group))?;
        let (out, out_rx) = mpsc::channel::<Result<SubscribeResponse, Status>>(max_unacked.clamp(1, 1024) as usize);
        tokio::spawn(async move {
            let mut delivered = 0u64;
            'stream: loop {
                let first = tokio::select! {
                    ev = events.recv() => ev,
                    _ = out.closed() => None,
                };
                let Some(mut ev) = first else { break };
                let mut acks = Vec::new();
                loop {
                    match ev {
                        Event::Drained => break 'stream,
                        Event::Message(d) => {
                            let key = (d.segment_id, d.offset);
                            if out.send(Ok(to_response(d))).await.is_err() {
                                break 'stream;
                            }
                            delivered += 1;
                            if req.auto_ack {
                                acks.push(key);
                            }
                        }
                    }
                    if req.max_messages > 0 && delivered >= req.max_messages {
                        break;
                    }
                    // Ack what is already queued in one command.
                    match events.try_recv() {
                        Ok(next) if acks.len() < 1024 => ev = next,
                        Ok(next) => {
                            let (tx, _) = oneshot::channel();
                            let _ = group.cmd.send(GroupCmd::Ack(std::mem::take(&mut acks), tx));
                            ev = next;
                        }
                        Err(_) => break,
                    }
                }
                if !acks.is_empty() {
                    let (tx, _) = oneshot::channel();
                    let _ = group.cmd.send(GroupCmd::Ack(acks, tx));
                }
                if req.max_messages > 0 && delivered >= req.max_messages {
                    // Keep the subscription until the client acked what it holds (or left).
                    let (tx, rx) = oneshot::channel();
                    let _ = group.cmd.send(GroupCmd::Limit(sub, tx));
                    tokio::select! {
                        _ = rx => {}
                        _ = out.closed() => {}
                    }
                    break;
                }
            }
            let _ = group.cmd.send(GroupCmd::Unsubscribe(sub));
        });
        Ok(Box::pin(ReceiverStream::new(out_rx)))
    }

    async fn proxy_subscribe(&self, addr: &str, req: SubscribeRequest) -> Result<SubscribeStream, Status> {
        let mut client = MessagingClient::new(self.inner.segments.network().data_channel(addr))
            .max_decoding_message_size(usize::MAX);
        let mut r = tonic::Request::new(req);
        r.metadata_mut().insert(FORWARDED_METADATA, tonic::metadata::MetadataValue::from_static("1"));
        // The group node's stream is served as is: no task or channel in between (one
        // wake-up less per message), and a client that goes away drops it, which
        // the group node sees as its subscriber leaving.
        Ok(Box::pin(client.subscribe(r).await?.into_inner()))
    }

    /// Acknowledges (`ack`) or returns for redelivery (`!ack`) delivered messages.
    pub async fn settle(
        &self,
        namespace: &str,
        group_name: &str,
        deliveries: Vec<PbDelivery>,
        ack: bool,
        forwarded: bool,
    ) -> Result<(), Status> {
        if deliveries.is_empty() {
            return Err(RequestError::new(ErrorCode::InvalidArgument, "deliveries: at least one is required").into());
        }
        match self.locate(namespace, group_name, forwarded).await {
            Ok(Some(h)) => {
                let keys = deliveries.iter().map(|d| (d.segment_id, d.offset)).collect();
                let (tx, rx) = oneshot::channel();
                let cmd = if ack { GroupCmd::Ack(keys, tx) } else { GroupCmd::Nack(keys, tx) };
                h.cmd.send(cmd).map_err(|_| gone(group_name))?;
                rx.await.map_err(|_| gone(group_name))?.map_err(Status::from)
            }
            Ok(None) => unreachable!("locate returns a handle or an error"),
            Err(Located::Error(e)) => Err(e.into()),
            Err(Located::Remote(addr)) => {
                let mut client = MessagingClient::new(self.inner.segments.network().data_channel(&addr));
                let (namespace, consumer_group) = (namespace.to_string(), group_name.to_string());
                if ack {
                    let mut r = tonic::Request::new(AckRequest { namespace, consumer_group, deliveries });
                    r.metadata_mut().insert(FORWARDED_METADATA, tonic::metadata::MetadataValue::from_static("1"));
                    client.ack(r).await.map(|_| ())
                } else {
                    let mut r = tonic::Request::new(NackRequest { namespace, consumer_group, deliveries });
                    r.metadata_mut().insert(FORWARDED_METADATA, tonic::metadata::MetadataValue::from_static("1"));
                    client.nack(r).await.map(|_| ())
                }
            }
        }
    }
}

enum Located {
    Remote(String),
    Error(RequestError),
}

fn gone(group: &str) -> Status {
    RequestError::new(ErrorCode::NotReady, format!("consumer_group: {group:?} stopped on this node; subscribe again"))
        .into()
}

fn to_response(d: Delivery) -> SubscribeResponse {
    // Stored payloads are encoded `Message`s; the primary encoded them.
    let message = Message::decode(d.message).ok();
    SubscribeResponse { topic: d.topic.to_string(), segment_id: d.segment_id, offset: d.offset, message }
}

async fn stop_group(h: GroupHandle) {
    h.stop.cancel();
    if let Some(t) = h.task.lock().await.take() {
        let _ = t.await;
    }
}

fn start_group(segments: Segments, key: GroupKey) -> GroupHandle {
    let (cmd, rx) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let task = tokio::spawn(group_task(segments, key, rx, stop.clone()));
    GroupHandle { cmd, stop, task: Arc::new(tokio::sync::Mutex::new(Some(task))) }
}

/// Read position in one segment.
struct Cursor {
    topic: std::sync::Arc<str>,
    /// A binding of the topic takes every message: no need to decode one to match it.
    takes_all: bool,
    next: u64,
    /// Records read but not yet offered (the buffer was full).
    backlog: std::collections::VecDeque<eventtermq_storage::Record>,
    /// The last read found nothing new.
    idle: bool,
    /// Closed and read to its end.
    finished: bool,
    fetching: bool,
}

struct Subscriber {
    tx: mpsc::Sender<Event>,
    do_not_block: bool,
    limit: Option<oneshot::Sender<()>>,
}

type Fetch = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = (SegmentId, Result<crate::replication::read::ReadResult, RequestError>)>
            + Send,
    >,
>;

async fn group_task(
    segments: Segments,
    key: GroupKey,
    mut cmds: mpsc::UnboundedReceiver<GroupCmd>,
    stop: CancellationToken,
) {
    let (namespace, name) = key;
    let cluster = segments.cluster().clone();
    let settings = segments.settings().clone();
    let (spec, committed_start): (ConsumerGroupSpec, BTreeMap<SegmentId, u64>) = {
        let st = cluster.state.read();
        let spec = st.state.namespaces.get(&namespace).and_then(|ns| ns.consumer_groups.get(&name)).cloned();
        let Some(spec) = spec else { return };
        (spec, st.state.group_runtime(&namespace, &name).map(|g| g.offsets.clone()).unwrap_or_default())
    };
    let topics: BTreeSet<String> = spec.bindings.iter().map(|b| b.topic.clone()).collect();
    let mut buffer = GroupBuffer::new(spec.size.max(1) as usize, committed_start.clone());
    let mut cursors: BTreeMap<SegmentId, Cursor> = BTreeMap::new();
    let mut subscribers: HashMap<SubscriberId, Subscriber> = HashMap::new();
    let mut fetches: FuturesUnordered<Fetch> = FuturesUnordered::new();
    let mut last_committed = committed_start.clone();
    let mut commit_tick = tokio::time::interval(Duration::from_millis(settings.offsets_commit_interval_ms.max(1)));
    commit_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut refresh_tick = tokio::time::interval(Duration::from_millis(200));
    let mut commit_in_flight: Option<JoinHandle<Result<u64, RequestError>>> = None;
    let read_wait = Duration::from_millis(settings.read_wait_ms);
    let max_bytes = settings.read_batch_max_bytes;

    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = refresh_tick.tick() => {
                let st = cluster.state.read();
                if st.state.group_runtime(&namespace, &name).is_none() {
                    return; // deleted
                }
                let segs: Vec<(SegmentId, SegmentRecord)> = st.state.segments.iter()
                    .filter(|(_, s)| s.namespace == namespace && topics.contains(&s.topic))
                    .map(|(id, s)| (*id, s.clone()))
                    .collect();
                drop(st);
                let present: HashSet<SegmentId> = segs.iter().map(|(id, _)| *id).collect();
                cursors.retain(|id, _| {
                    if present.contains(id) { true } else { buffer.forget_segment(*id); false }
                });
                for (id, s) in segs {
                    cursors.entry(id).or_insert_with(|| Cursor {
                        takes_all: spec.bindings.iter().any(|b| b.topic == s.topic && matching::matches_every_message(b)),
                        topic: s.topic.as_str().into(),
                        next: committed_start.get(&id).copied().unwrap_or(0),
                        backlog: Default::default(),
                        idle: false,
                        finished: false,
                        fetching: false,
                    });
                }
            }
            Some((id, result)) = fetches.next(), if !fetches.is_empty() => {
                let Some(c) = cursors.get_mut(&id) else { continue };
                c.fetching = false;
                match result {
                    Ok(r) => {
                        c.idle = r.records.is_empty();
                        c.backlog.extend(r.records);
                        if r.closed && c.backlog.is_empty() && c.next >= r.end_offset {
                            buffer.mark_read(id, r.end_offset);
                            c.finished = true;
                        }
                    }
                    Err(e) => {
                        c.idle = true;
                        tracing::debug!(segment_id = id, error = %e, "group read failed; retrying");
                    }
                }
            }
            Some(cmd) = cmds.recv() => match cmd {
                GroupCmd::Subscribe { max_unacked, do_not_block, reply } => {
                    let id = buffer.subscribe(max_unacked, false);
                    let (tx, rx) = mpsc::channel(max_unacked as usize + 1);
                    subscribers.insert(id, Subscriber { tx, do_not_block, limit: None });
                    let _ = reply.send((id, rx));
                }
                GroupCmd::Unsubscribe(id) => {
                    buffer.unsubscribe(id);
                    subscribers.remove(&id);
                }
                GroupCmd::Limit(id, reply) => {
                    buffer.stop_dispatch(id);
                    if let Some(s) = subscribers.get_mut(&id) {
                        s.limit = Some(reply);
                    }
                }
                GroupCmd::Ack(keys, reply) => {
                    let r = settle(&mut buffer, &keys, true);
                    let _ = reply.send(r);
                }
                GroupCmd::Nack(keys, reply) => {
                    let r = settle(&mut buffer, &keys, false);
                    let _ = reply.send(r);
                }
            },
            _ = commit_tick.tick() => {
                if commit_in_flight.as_ref().is_none_or(|t| t.is_finished()) {
                    let offsets = to_commit(&buffer, &last_committed);
                    if !offsets.is_empty() {
                        last_committed.extend(offsets.clone());
                        let (cluster, namespace, group) = (cluster.clone(), namespace.clone(), name.clone());
                        commit_in_flight = Some(tokio::spawn(async move {
                            cluster.write(Command::CommitOffsets { namespace, group, offsets }).await
                        }));
                    }
                }
            }
        }

        // Feed the buffer from the read backlogs, in segment order.
        for (id, c) in cursors.iter_mut() {
            while buffer.free() > 0 {
                let Some(r) = c.backlog.pop_front() else { break };
                if r.offset < c.next {
                    continue;
                }
                c.next = r.offset + 1;
                let since_ok = spec.since_unix_ms == 0 || r.timestamp_ms >= spec.since_unix_ms;
                let matched = since_ok
                    && (c.takes_all || {
                        let message = Message::decode(r.payload.clone()).unwrap_or_default();
                        matching::matches_any(
                            spec.bindings.iter().filter(|b| *b.topic == *c.topic),
                            &message.routing_key,
                            &message.headers,
                        )
                    });
                let reported = if matched {
                    buffer.offer(Delivery {
                        topic: c.topic.clone(),
                        segment_id: *id,
                        offset: r.offset,
                        message: r.payload,
                    })
                } else {
                    buffer.skip(*id, r.offset)
                };
                if let Err(e) = reported {
                    tracing::error!(segment_id = id, error = %e, "consumer group reader out of step; re-reading");
                }
            }
        }
        // Start reads where there is room and nothing is pending.
        if buffer.free() > 0 {
            let st = cluster.state.read();
            for (id, c) in cursors.iter_mut() {
                if c.fetching || c.finished || !c.backlog.is_empty() {
                    continue;
                }
                let Some(seg) = st.state.segments.get(id).cloned() else { continue };
                c.fetching = true;
                let (segments, id, from) = (segments.clone(), *id, c.next);
                let wait = if seg.is_open() { read_wait } else { Duration::ZERO };
                let idle = c.idle;
                fetches.push(Box::pin(async move {
                    let r = segments.read(id, &seg, from, max_bytes, wait).await;
                    if r.is_err() || (idle && !seg.is_open()) {
                        // Do not spin on a copy that is not there yet.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    (id, r)
                }));
            }
        }
        // Hand out.
        for (sub, d) in buffer.dispatch() {
            match subscribers.get_mut(&sub) {
                Some(s) if s.tx.try_send(Event::Message(d)).is_ok() => {}
                _ => {
                    buffer.unsubscribe(sub);
                    subscribers.remove(&sub);
                }
            }
        }
        let drained =
            buffer.pending_len() == 0 && cursors.values().all(|c| c.finished || (c.idle && c.backlog.is_empty()));
        for (id, s) in subscribers.iter_mut() {
            let holds_none = buffer.in_flight_of(*id) == 0;
            if let Some(limit) = s.limit.take_if(|_| holds_none) {
                let _ = limit.send(());
            }
            if s.do_not_block && drained && holds_none {
                let _ = s.tx.try_send(Event::Drained);
            }
        }
    }
    // Last commit, so a graceful stop redelivers nothing that was acknowledged.
    if let Some(t) = commit_in_flight {
        let _ = t.await;
    }
    let offsets = to_commit(&buffer, &last_committed);
    if !offsets.is_empty() {
        if let Err(e) =
            cluster.write(Command::CommitOffsets { namespace: namespace.clone(), group: name.clone(), offsets }).await
        {
            tracing::warn!(namespace = %namespace, group = %name, error = %e, "last offset commit failed");
        }
    }
}

fn to_commit(buffer: &GroupBuffer, last: &BTreeMap<SegmentId, u64>) -> BTreeMap<SegmentId, u64> {
    buffer.committed().into_iter().filter(|(seg, off)| last.get(seg).is_none_or(|l| off > l)).collect()
}

fn settle(buffer: &mut GroupBuffer, keys: &[(SegmentId, u64)], ack: bool) -> Result<(), RequestError> {
    let mut missing = Vec::new();
    for &(seg, off) in keys {
        let r = if ack { buffer.ack(seg, off) } else { buffer.nack(seg, off) };
        if r.is_err() {
            missing.push(format!("{seg}/{off}"));
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(RequestError::new(
            ErrorCode::NotInFlight,
            format!(
                "deliveries: {} not in flight (already acknowledged, auto-acknowledged or never delivered): {}",
                missing.len(),
                missing.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
            ),
        ))
    }
}
