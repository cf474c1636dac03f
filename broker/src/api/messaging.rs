//! The `eventter.v1.Messaging` service: publish, subscribe, ack, nack. Handlers check
//! the request and hand it to [`Segments`] (publishing) or [`Groups`] (consuming),
//! which route it to the node that owns the data.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use eventtermq_proto::v1 as pb;
use eventtermq_proto::v1::messaging_server::Messaging;
use futures::{Stream, StreamExt};
use prost::Message as _;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::access::allow;
use super::admin::namespace_of;
use super::request::tag;
use crate::auth::{Auth, Need};
use crate::budget::{PublishBudget, Share};
use crate::cluster_state::validate;
use crate::consumer_groups::Groups;
use crate::error::{ErrorCode, RequestError};
use crate::metrics::{self, FOLDED};
use crate::peers::{hops, Peers, Relayed};
use crate::replication::dedupe::Key;
use crate::replication::publish::{StreamTarget, Turn};
use crate::replication::Segments;

pub struct MessagingService {
    /// The node's bytes of publishes in flight, over every stream and client.
    pub budget: PublishBudget,
    pub segments: Segments,
    pub groups: Groups,
    pub peers: Peers,
    pub auth: Auth,
}

type Reply<T> = Result<Response<T>, Status>;

/// Publishes a stream may have in flight at once; more wait for the oldest to finish.
const PUBLISH_STREAM_IN_FLIGHT_MAX: usize = 64;

fn forwarded<T>(req: &Request<T>) -> bool {
    hops(req.metadata()) > 0
}

/// A stream of the data path's answers as the client sees them.
fn to_client<T: Send + 'static>(stream: Relayed<T>) -> Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>> {
    Box::pin(stream.map(|r| r.map_err(Status::from)))
}

/// Every request of a publish stream goes to the same topic as its first.
fn same_topic(first: &pb::PublishRequest, r: &pb::PublishRequest) -> Result<(), Status> {
    if r.namespace == first.namespace && r.topic == first.topic {
        Ok(())
    } else {
        Err(RequestError::new(
            ErrorCode::InvalidArgument,
            format!("topic: a publish stream goes to one topic ({:?}), not {:?}", first.topic, r.topic),
        )
        .into())
    }
}

fn persistence(p: i32) -> Result<pb::Persistence, RequestError> {
    pb::Persistence::try_from(p).map_err(|_| {
        RequestError::new(
            ErrorCode::InvalidArgument,
            format!("persistence: {p} is not one of DEFAULT (0), NONE (1), PRIMARY (2), REPLICATED (3)"),
        )
    })
}

async fn publish_one(
    segments: &Segments,
    req: pb::PublishRequest,
    hops: u32,
    turn: Option<Turn>,
) -> Result<pb::PublishResponse, RequestError> {
    // The root of a publish's trace on this node (traces on); `Span::none()` otherwise,
    // and the field values are not even computed.
    let span = tracing::trace_span!(
        target: metrics::PUBLISH_TRACE_TARGET,
        "publish",
        request_id = crate::peers::current_request_id().unwrap_or_default(),
        namespace = %req.namespace,
        topic = %req.topic,
        messages = req.messages.len(),
        hops,
    );
    let namespace = namespace_of(&req.namespace)?;
    validate::name("topic", &req.topic)?;
    let p = persistence(req.persistence)?;
    segments.publish_in_turn(&namespace, &req.topic, &req.messages, p, key(&req), hops, turn).instrument(span).await
}

/// The producer id and sequence of an exactly-once publish (producer id 0: none).
fn key(req: &pb::PublishRequest) -> Option<Key> {
    (req.producer_id != 0).then_some(Key { producer: req.producer_id, sequence: req.sequence })
}

/// [`publish_one`], counted in the metrics. Each publish is counted once, on the node
/// that handled it for the client: a unary `Publish` where it arrived (not again on the
/// primary it was forwarded to), a `PublishStream` where its requests are published
/// (a relayed stream on the node it was relayed to).
async fn publish_counted(
    segments: &Segments,
    req: pb::PublishRequest,
    hops: u32,
    count: bool,
    turn: Option<Turn>,
) -> Result<pb::PublishResponse, RequestError> {
    if !count {
        return publish_one(segments, req, hops, turn).await;
    }
    let namespace = eventtermq_api::defaults::or_default(&req.namespace, eventtermq_api::defaults::NAMESPACE);
    // Names that are not valid (refused below) get no series of their own.
    let valid = validate::name("namespace", namespace).is_ok() && validate::name("topic", &req.topic).is_ok();
    let (namespace, topic) = if valid { (namespace, req.topic.as_str()) } else { (FOLDED, FOLDED) };
    let count = segments.metrics().publish_started(namespace, topic, persistence_label(req.persistence));
    let (messages, bytes) = (req.messages.len() as u64, req.messages.iter().map(|m| m.data.len() as u64).sum());
    let r = publish_one(segments, req, hops, turn).await;
    match &r {
        Ok(_) => count.answered(Ok((messages, bytes))),
        Err(e) => count.answered(Err((e.code.as_u32(), &error_name(e.code)))),
    }
    r
}

fn persistence_label(p: i32) -> metrics::Persistence {
    match pb::Persistence::try_from(p) {
        Ok(pb::Persistence::Default) => metrics::Persistence::Default,
        Ok(pb::Persistence::None) => metrics::Persistence::None,
        Ok(pb::Persistence::Primary) => metrics::Persistence::Primary,
        Ok(pb::Persistence::Replicated) => metrics::Persistence::Replicated,
        Err(_) => metrics::Persistence::Invalid,
    }
}

fn error_name(code: ErrorCode) -> String {
    format!("{code:?}")
}

#[tonic::async_trait]
impl Messaging for MessagingService {
    async fn publish(&self, req: Request<pb::PublishRequest>) -> Reply<pb::PublishResponse> {
        let hops = hops(req.metadata());
        tag(&req.get_ref().namespace, Some(&req.get_ref().topic), None);
        let namespace = namespace_of(&req.get_ref().namespace)?;
        allow(&self.auth, Need::Write { namespace: &namespace, topic: &req.get_ref().topic })?;
        // Counted where it came from a client only (see `budget.rs`).
        let _share = match hops {
            0 => Some(self.budget.take(req.get_ref().encoded_len()).await),
            _ => None,
        };
        // A forwarded publish was counted where it arrived.
        Ok(Response::new(publish_counted(&self.segments, req.into_inner(), hops, hops == 0, None).await?))
    }

    type PublishStreamStream = Pin<Box<dyn Stream<Item = Result<pb::PublishResponse, Status>> + Send>>;

    async fn publish_stream(&self, req: Request<Streaming<pb::PublishRequest>>) -> Reply<Self::PublishStreamStream> {
        let hops = hops(req.metadata());
        let mut inbound = req.into_inner();
        let Some(first) = inbound.message().await? else {
            return Ok(Response::new(Box::pin(futures::stream::empty())));
        };
        tag(&first.namespace, Some(&first.topic), None);
        let namespace = namespace_of(&first.namespace)?;
        validate::name("topic", &first.topic)?;
        // Every request of the stream goes to this topic (`same_topic`).
        allow(&self.auth, Need::Write { namespace: &namespace, topic: &first.topic })?;
        // A stream whose topic's primary is elsewhere is relayed there whole, so its
        // messages keep their order.
        let routing_key = first.messages.first().map(|m| m.routing_key.as_str());
        let in_turn = match self.segments.stream_target(&namespace, &first.topic, routing_key, hops) {
            StreamTarget::Here { in_turn } => in_turn,
            StreamTarget::Relay(addr) => {
                let head = futures::stream::once(std::future::ready(Ok(first)));
                let (tx, rx) = mpsc::channel::<pb::PublishRequest>(PUBLISH_STREAM_IN_FLIGHT_MAX);
                let first_req = head.chain(inbound);
                // Each request relayed holds its share of this node's budget until its
                // answer comes back (answers come one per request, in order).
                let shares = Arc::new(Mutex::new(VecDeque::<Share>::new()));
                let (budget, held) = (self.budget.clone(), shares.clone());
                tokio::spawn(async move {
                    let mut first_req = std::pin::pin!(first_req);
                    while let Some(Ok(r)) = first_req.next().await {
                        let share = budget.take(r.encoded_len()).await;
                        held.lock().unwrap_or_else(|e| e.into_inner()).push_back(share);
                        if tx.send(r).await.is_err() {
                            return;
                        }
                    }
                });
                let upstream = self.peers.relay_publish_stream(&addr, ReceiverStream::new(rx), hops).await;
                let answers = to_client(upstream.map_err(RequestError::from)?).inspect(move |_| {
                    shares.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
                });
                return Ok(Response::new(Box::pin(answers)));
            }
        };
        let segments = self.segments.clone();
        let template = first.clone();
        // Each request from a client takes its share of this node's budget before the
        // next is read off the stream, and holds it until it is answered (a stream
        // relayed here took its shares where it came from a client: see `budget.rs`).
        // A task of its own: the same in a `then` combinator trips the compiler's Send
        // check of the task below.
        let source = futures::stream::once(std::future::ready(Ok(first))).chain(inbound);
        let (shared_tx, shared_rx) = mpsc::channel::<Result<(pb::PublishRequest, Option<Share>), Status>>(1);
        let budget = (hops == 0).then(|| self.budget.clone());
        tokio::spawn(async move {
            let mut source = std::pin::pin!(source);
            while let Some(r) = source.next().await {
                let item = match r {
                    Ok(r) => {
                        let share = match &budget {
                            Some(b) => Some(b.take(r.encoded_len()).await),
                            None => None,
                        };
                        Ok((r, share))
                    }
                    Err(e) => Err(e),
                };
                let failed = item.is_err();
                if shared_tx.send(item).await.is_err() || failed {
                    return;
                }
            }
        });
        let rest = ReceiverStream::new(shared_rx);
        // Requests are published concurrently (they batch together on the primary);
        // answers keep the request order. To one shard, each waits for the one before
        // it to be queued at the primary (a chain of turns made in stream order), so
        // they are stored in stream order even while they wait for a segment to open
        // or are forwarded one by one.
        let mut previous: Option<oneshot::Receiver<()>> = None;
        let answers = rest
            .map(move |r| {
                let segments = segments.clone();
                let template = template.clone();
                let (turn, wait) = if in_turn {
                    let (turn, next) = oneshot::channel();
                    (Some(turn), previous.replace(next))
                } else {
                    (None, None)
                };
                async move {
                    if let Some(wait) = wait {
                        // Ends when the previous request drops its turn.
                        let _ = wait.await;
                    }
                    let (r, _share) = r?;
                    same_topic(&template, &r)?;
                    Ok(publish_counted(&segments, r, hops, true, turn).await?)
                }
            })
            .buffered(PUBLISH_STREAM_IN_FLIGHT_MAX);
        // Stop at the first failure: the client must not take later confirmations for
        // an unbroken sequence.
        let (tx, rx) = mpsc::channel(PUBLISH_STREAM_IN_FLIGHT_MAX);
        tokio::spawn(async move {
            let mut answers = std::pin::pin!(answers);
            while let Some(a) = answers.next().await {
                let failed = a.is_err();
                if tx.send(a).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type SubscribeStream = Pin<Box<dyn Stream<Item = Result<pb::SubscribeResponse, Status>> + Send>>;

    async fn subscribe(&self, req: Request<pb::SubscribeRequest>) -> Reply<Self::SubscribeStream> {
        let fwd = forwarded(&req);
        let mut req = req.into_inner();
        tag(&req.namespace, None, Some(&req.consumer_group));
        req.namespace = namespace_of(&req.namespace)?;
        validate::name("consumer_group", &req.consumer_group)?;
        allow(&self.auth, Need::Read { namespace: &req.namespace, group: &req.consumer_group })?;
        let stream = self.groups.subscribe_anywhere(&self.peers, req, fwd).await?;
        Ok(Response::new(to_client(stream)))
    }

    async fn ack(&self, req: Request<pb::AckRequest>) -> Reply<pb::AckResponse> {
        let fwd = forwarded(&req);
        let req = req.into_inner();
        tag(&req.namespace, None, Some(&req.consumer_group));
        let namespace = namespace_of(&req.namespace)?;
        validate::name("consumer_group", &req.consumer_group)?;
        allow(&self.auth, Need::Read { namespace: &namespace, group: &req.consumer_group })?;
        self.groups.settle_anywhere(&self.peers, namespace, req.consumer_group, req.deliveries, true, fwd).await?;
        #[allow(deprecated)] // `ok`: still sent for clients that read it
        Ok(Response::new(pb::AckResponse { ok: true }))
    }

    async fn nack(&self, req: Request<pb::NackRequest>) -> Reply<pb::NackResponse> {
        let fwd = forwarded(&req);
        let req = req.into_inner();
        tag(&req.namespace, None, Some(&req.consumer_group));
        let namespace = namespace_of(&req.namespace)?;
        validate::name("consumer_group", &req.consumer_group)?;
        allow(&self.auth, Need::Read { namespace: &namespace, group: &req.consumer_group })?;
        self.groups.settle_anywhere(&self.peers, namespace, req.consumer_group, req.deliveries, false, fwd).await?;
        #[allow(deprecated)] // `ok`: still sent for clients that read it
        Ok(Response::new(pb::NackResponse { ok: true }))
    }
}
