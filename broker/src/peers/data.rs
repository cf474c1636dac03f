//! Calls of the data path: replication streams, segment status and reads, forwarded
//! publishes and publish streams, relayed subscriptions, forwarded acks and nacks.

use std::pin::Pin;
use std::time::Duration;

use eventtermq_proto::internal::v1::{
    internal_client::InternalClient, DedupeEntry, DedupeWindowRequest, ReadSegmentRequest, ReadSegmentResponse,
    ReplicateRequest, ReplicateResponse, SegmentStatusRequest, SegmentStatusResponse,
};
use eventtermq_proto::v1::{
    admin_client::AdminClient, messaging_client::MessagingClient, AckRequest, Delivery, DescribeConsumerGroupsRequest,
    DescribeConsumerGroupsResponse, NackRequest, PublishRequest, PublishResponse, PurgeConsumerGroupRequest,
    PurgeConsumerGroupResponse, SubscribeRequest, SubscribeResponse,
};
use futures::{Stream, StreamExt};
use tokio::time::Instant;

use super::{forwarded, with_timeout, Peer, PeerError, Peers};
use crate::cluster_state::{NodeId, SegmentId};
use crate::error::RequestError;

/// A read of one segment: its records from `from`, or with `since_unix_ms` from the
/// first record stored at or after that time when that is later (found with the
/// segment's time index, not by reading what lies before); at most about
/// `max_bytes`, waiting up to `wait` at an open segment's primary when nothing is
/// readable there yet.
#[derive(Debug, Clone, Copy)]
pub struct ReadRequest {
    pub from: u64,
    /// 0: no time bound.
    pub since_unix_ms: i64,
    pub max_bytes: usize,
    pub wait: Duration,
}

impl ReadRequest {
    /// Records from `from` on, as many as `max_bytes` holds, without waiting.
    pub fn at(from: u64, max_bytes: usize) -> Self {
        ReadRequest { from, since_unix_ms: 0, max_bytes, wait: Duration::ZERO }
    }

    pub fn waiting(self, wait: Duration) -> Self {
        ReadRequest { wait, ..self }
    }

    pub fn since(self, since_unix_ms: i64) -> Self {
        ReadRequest { since_unix_ms, ..self }
    }
}

/// Answers relayed from another node, in order, as the data path sees them.
pub type Relayed<T> = Pin<Box<dyn Stream<Item = Result<T, RequestError>> + Send>>;

/// The primary's end of a replication stream to one replica.
pub struct ReplicaAnswers {
    peer: String,
    answers: tonic::Streaming<ReplicateResponse>,
}

impl ReplicaAnswers {
    /// The next offset below which the replica has everything fsynced; `None` when the
    /// replica ended the stream.
    pub async fn next(&mut self) -> Result<Option<u64>, PeerError> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    /// [`ReplicaAnswers::next`] for a task that polls several streams itself.
    pub fn poll_next(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<Option<u64>, PeerError>> {
        self.answers.poll_next_unpin(cx).map(|m| match m {
            None => Ok(None),
            Some(Ok(r)) => Ok(Some(r.durable_offset)),
            Some(Err(s)) => Err(PeerError::from_status(Peer::addr(&self.peer), s)),
        })
    }
}

impl Peers {
    /// Opens a replication stream of a segment to the replica `node`: `requests` name
    /// the segment first, then carry consecutive records.
    pub async fn replicate(
        &self,
        node: NodeId,
        addr: &str,
        requests: impl Stream<Item = ReplicateRequest> + Send + 'static,
    ) -> Result<ReplicaAnswers, PeerError> {
        let peer = Peer::node(node, addr);
        let mut client = InternalClient::new(self.data_channel(addr));
        let answers = client.replicate(requests).await.map_err(|s| PeerError::from_status(peer, s))?.into_inner();
        Ok(ReplicaAnswers { peer: peer.to_string(), answers })
    }

    /// What `node` holds of a segment; with `freeze`, it first stops taking records
    /// from the primary (a fail-over).
    pub async fn segment_status(
        &self,
        node: NodeId,
        addr: &str,
        segment_id: SegmentId,
        freeze: bool,
    ) -> Result<SegmentStatusResponse, PeerError> {
        let timeout = Duration::from_millis(self.timeouts().segment_status_ms);
        let mut client = InternalClient::new(self.channel(addr));
        let req = with_timeout(tonic::Request::new(SegmentStatusRequest { segment_id, freeze }), timeout);
        let reply = client.segment_status(req).await.map_err(|s| PeerError::from_status(Peer::node(node, addr), s))?;
        Ok(reply.into_inner())
    }

    /// The duplicate window `node` kept of closed segment `segment_id`, which it was
    /// primary of; `None` when it does not have it.
    pub async fn dedupe_window(
        &self,
        node: NodeId,
        addr: &str,
        segment_id: SegmentId,
    ) -> Result<Option<Vec<DedupeEntry>>, PeerError> {
        let timeout = Duration::from_millis(self.timeouts().segment_status_ms);
        // A full window is bigger than tonic's default 4 MiB limit.
        let mut client = InternalClient::new(self.channel(addr)).max_decoding_message_size(usize::MAX);
        let req = with_timeout(tonic::Request::new(DedupeWindowRequest { segment_id }), timeout);
        let reply = client.dedupe_window(req).await.map_err(|s| PeerError::from_status(Peer::node(node, addr), s))?;
        let reply = reply.into_inner();
        Ok(reply.known.then_some(reply.entries))
    }

    /// Reads records of a segment `node` holds (see [`ReadRequest`]).
    pub async fn read_segment(
        &self,
        node: NodeId,
        addr: &str,
        segment_id: SegmentId,
        read: ReadRequest,
    ) -> Result<ReadSegmentResponse, PeerError> {
        let mut client = InternalClient::new(self.data_channel(addr));
        let req = ReadSegmentRequest {
            segment_id,
            from_offset: read.from,
            max_bytes: read.max_bytes.min(u32::MAX as usize) as u32,
            wait_ms: read.wait.as_millis().min(u32::MAX as u128) as u32,
            since_unix_ms: read.since_unix_ms,
        };
        let timeout = read.wait + Duration::from_millis(self.timeouts().read_segment_margin_ms);
        let reply = client
            .read_segment(with_timeout(tonic::Request::new(req), timeout))
            .await
            .map_err(|s| PeerError::from_status(Peer::node(node, addr), s))?;
        Ok(reply.into_inner())
    }

    /// Forwards a publish to the primary `node`, within what is left until `deadline`.
    /// `hops`: how many times the request was forwarded before reaching this node.
    pub async fn forward_publish(
        &self,
        node: NodeId,
        addr: &str,
        request: PublishRequest,
        hops: u32,
        deadline: Instant,
    ) -> Result<PublishResponse, PeerError> {
        let mut client = MessagingClient::new(self.data_channel(addr))
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        let req = with_timeout(forwarded(request, hops), deadline.saturating_duration_since(Instant::now()));
        let reply = client.publish(req).await.map_err(|s| PeerError::from_status(Peer::node(node, addr), s))?;
        Ok(reply.into_inner())
    }

    /// Relays a whole stream of publishes to the node at `addr`, so its messages keep
    /// their order; answers come back in order.
    pub async fn relay_publish_stream(
        &self,
        addr: &str,
        upstream: impl Stream<Item = PublishRequest> + Send + 'static,
        hops: u32,
    ) -> Result<Relayed<PublishResponse>, PeerError> {
        let mut client = MessagingClient::new(self.data_channel(addr))
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        let answers = client
            .publish_stream(forwarded(upstream, hops))
            .await
            .map_err(|s| PeerError::from_status(Peer::addr(addr), s))?
            .into_inner();
        Ok(relayed(addr, answers))
    }

    /// Relays a subscription to the node running the group. The group node's stream
    /// is served as it is (no task or channel in between: one wake-up less per
    /// message), and a client that goes away drops it, which the group node sees as
    /// its subscriber leaving.
    pub async fn relay_subscribe(
        &self,
        addr: &str,
        request: SubscribeRequest,
    ) -> Result<Relayed<SubscribeResponse>, PeerError> {
        let mut client = MessagingClient::new(self.data_channel(addr)).max_decoding_message_size(usize::MAX);
        let messages = client
            .subscribe(forwarded(request, 0))
            .await
            .map_err(|s| PeerError::from_status(Peer::addr(addr), s))?
            .into_inner();
        Ok(relayed(addr, messages))
    }

    /// Asks `node` for the lag and delivery state of the groups of `request` it runs
    /// (forwarded: it answers for its own groups only, and asks nobody else).
    pub async fn describe_consumer_groups(
        &self,
        node: NodeId,
        addr: &str,
        request: DescribeConsumerGroupsRequest,
        timeout: Duration,
    ) -> Result<DescribeConsumerGroupsResponse, PeerError> {
        let peer = Peer::node(node, addr);
        let mut client = AdminClient::new(self.channel(addr));
        let ask = client.describe_consumer_groups(with_timeout(forwarded(request, 0), timeout));
        let reply = tokio::time::timeout(timeout, ask)
            .await
            .map_err(|_| PeerError::timed_out(peer, timeout))?
            .map_err(|s| PeerError::from_status(peer, s))?;
        Ok(reply.into_inner())
    }

    /// Forwards a purge to the node running the group (forwarded: it purges only a
    /// group running there).
    pub async fn purge_consumer_group(
        &self,
        addr: &str,
        request: PurgeConsumerGroupRequest,
    ) -> Result<PurgeConsumerGroupResponse, PeerError> {
        let mut client = AdminClient::new(self.channel(addr));
        let reply = client.purge_consumer_group(forwarded(request, 0)).await;
        Ok(reply.map_err(|s| PeerError::from_status(Peer::addr(addr), s))?.into_inner())
    }

    /// Forwards an ack (`ack`) or nack of deliveries to the node running the group.
    pub async fn settle(
        &self,
        addr: &str,
        namespace: String,
        consumer_group: String,
        deliveries: Vec<Delivery>,
        ack: bool,
    ) -> Result<(), PeerError> {
        let mut client = MessagingClient::new(self.data_channel(addr));
        let r = if ack {
            client.ack(forwarded(AckRequest { namespace, consumer_group, deliveries }, 0)).await.map(|_| ())
        } else {
            client.nack(forwarded(NackRequest { namespace, consumer_group, deliveries }, 0)).await.map(|_| ())
        };
        r.map_err(|s| PeerError::from_status(Peer::addr(addr), s))
    }
}

fn relayed<T: Send + 'static>(addr: &str, stream: tonic::Streaming<T>) -> Relayed<T> {
    let addr = addr.to_string();
    Box::pin(stream.map(move |r| r.map_err(|s| PeerError::from_status(Peer::addr(&addr), s).into())))
}
