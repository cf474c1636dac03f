//! Routing a publish: append to an open segment of the topic this node is primary of,
//! or forward to the primary of one. Waits (within the request timeout) while the
//! topic has no open segment, e.g. right after it was created or during a fail-over.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use eventtermq_proto::v1::{messaging_client::MessagingClient, Message, Persistence, PublishRequest, PublishResponse};
use prost::Message as _;
use tokio::time::Instant;

use super::primary::Durability;
use super::Segments;
use crate::cluster_state::{NodeId, SegmentId};
use crate::error::{ErrorCode, RequestError};

/// Metadata marking a request one node forwarded to another, with the number of hops
/// so far. Consumer-group requests are never forwarded twice; a publish may be, up to
/// [`PUBLISH_HOPS_MAX`], when the segment moved while the request was on its way.
pub const FORWARDED_METADATA: &str = "eventter-forwarded";

/// Most times one publish is passed from node to node.
pub const PUBLISH_HOPS_MAX: u32 = 3;

/// Hops a request has made, from its metadata (0: straight from a client).
pub fn hops<T>(req: &tonic::Request<T>) -> u32 {
    req.metadata().get(FORWARDED_METADATA).and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(0)
}

fn mark_forwarded<T>(req: &mut tonic::Request<T>, hops: u32) {
    if let Ok(v) = (hops + 1).to_string().parse() {
        req.metadata_mut().insert(FORWARDED_METADATA, v);
    }
}

/// Pause between routing attempts while no segment can take the publish.
const RETRY_PAUSE: Duration = Duration::from_millis(20);

static ROUND_ROBIN: AtomicUsize = AtomicUsize::new(0);

impl Segments {
    /// Publishes `messages` to a topic; `hops`: see [`FORWARDED_METADATA`].
    pub async fn publish(
        &self,
        namespace: &str,
        topic: &str,
        messages: &[Message],
        persistence: Persistence,
        hops: u32,
    ) -> Result<PublishResponse, tonic::Status> {
        let forwarded = hops >= PUBLISH_HOPS_MAX;
        if messages.is_empty() {
            return Err(invalid("messages: at least one message is required").into());
        }
        let payloads: Vec<Bytes> = messages.iter().map(|m| Bytes::from(m.encode_to_vec())).collect();
        let limit = self.settings().write_batch_max_bytes;
        if let Some((i, p)) = payloads.iter().enumerate().find(|(_, p)| p.len() > limit) {
            return Err(invalid(format!(
                "messages[{i}]: {} bytes encoded is above the limit of {limit} bytes (--write-batch-max-bytes)",
                p.len()
            ))
            .into());
        }
        let deadline = Instant::now() + Duration::from_millis(self.settings_request_timeout_ms());
        let mut checked_linearizable = false;
        loop {
            let route = self.route(namespace, topic);
            let route = match route {
                Err(e) if !checked_linearizable => {
                    // The topic may be newer than this node's copy of the state.
                    checked_linearizable = true;
                    drop(self.cluster().read(true).await?);
                    let _ = e;
                    continue;
                }
                r => r?,
            };
            let attempt: Result<PublishResponse, tonic::Status> = match route {
                Route::Local(id, replicas) => match self.primary(id) {
                    Some(p) => {
                        let durability = durability(persistence, replicas);
                        match p.append(payloads.clone(), durability).await {
                            Ok(range) => {
                                return Ok(PublishResponse {
                                    ok: true,
                                    segment_id: id,
                                    first_offset: range.start,
                                    count: (range.end - range.start) as u32,
                                })
                            }
                            Err(e) => Err(e.into()),
                        }
                    }
                    // The keeper has not started it yet.
                    None => Err(not_ready(topic).into()),
                },
                Route::TooFewNodes(e) => Err(e.into()),
                Route::Remote(..) | Route::None if forwarded => Err(RequestError::new(
                    ErrorCode::NotPrimary,
                    format!("node {} is not the primary of an open segment of topic {topic:?}", self.cluster().id),
                )
                .into()),
                Route::Remote(node, addr) => {
                    self.forward_publish(node, &addr, namespace, topic, messages, persistence, deadline, hops).await
                }
                Route::None => Err(not_ready(topic).into()),
            };
            match attempt {
                Ok(r) => return Ok(r),
                Err(s) if retryable(&s) && Instant::now() < deadline => {
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Err(s) => return Err(s),
            }
        }
    }

    fn settings_request_timeout_ms(&self) -> u64 {
        self.cluster().request_timeout().as_millis() as u64
    }

    /// Where a stream of publishes to `topic` should go as a whole: `Some(addr)` when
    /// the primary is another node (the stream is relayed there so it keeps its order),
    /// `None` to publish here request by request.
    pub fn stream_target(&self, namespace: &str, topic: &str, hops: u32) -> Option<String> {
        match self.route(namespace, topic) {
            Ok(Route::Remote(_, addr)) if hops < PUBLISH_HOPS_MAX => Some(addr),
            _ => None,
        }
    }

    /// Relays a stream of publishes to the node at `addr`; answers come back in order.
    pub async fn relay_publish_stream_from(
        &self,
        addr: &str,
        upstream: impl futures::Stream<Item = PublishRequest> + Send + 'static,
        hops: u32,
    ) -> Result<tonic::Streaming<PublishResponse>, tonic::Status> {
        let mut client = MessagingClient::new(self.network().data_channel(addr))
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        let mut req = tonic::Request::new(upstream);
        mark_forwarded(&mut req, hops);
        Ok(client.publish_stream(req).await?.into_inner())
    }

    fn route(&self, namespace: &str, topic: &str) -> Result<Route, RequestError> {
        let me = self.cluster().id;
        let st = self.cluster().state.read();
        let spec = st.state.topic(namespace, topic)?;
        let open: Vec<(SegmentId, NodeId, usize)> = st
            .state
            .topic_segments(namespace, topic)
            .filter(|(_, s)| s.is_open() && !st.state.node_gone(s.primary))
            .map(|(id, s)| (id, s.primary, s.replicas.len()))
            .collect();
        if let Some((id, _, n)) = open.iter().find(|(_, p, _)| *p == me) {
            return Ok(Route::Local(*id, *n));
        }
        if open.is_empty() {
            let needed = st.state.min_insync_for(spec);
            let alive = st.state.alive_nodes().count();
            if alive < needed as usize {
                return Ok(Route::TooFewNodes(RequestError::new(
                    ErrorCode::NotEnoughReplicas,
                    format!(
                        "topic {topic:?} needs {needed} in-sync copies (min_insync_replicas) of each message and \
                         {alive} node(s) are ALIVE: publish refused rather than confirmed on fewer copies; \
                         retry when more nodes are up"
                    ),
                )));
            }
            return Ok(Route::None);
        }
        let (_, node, _) = open[ROUND_ROBIN.fetch_add(1, Ordering::Relaxed) % open.len()];
        Ok(match st.state.nodes.get(&node) {
            Some(n) => Route::Remote(node, n.address.clone()),
            None => Route::None,
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn forward_publish(
        &self,
        node: NodeId,
        addr: &str,
        namespace: &str,
        topic: &str,
        messages: &[Message],
        persistence: Persistence,
        deadline: Instant,
        hops: u32,
    ) -> Result<PublishResponse, tonic::Status> {
        let mut client = MessagingClient::new(self.network().data_channel(addr))
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        let mut req = tonic::Request::new(PublishRequest {
            namespace: namespace.to_string(),
            topic: topic.to_string(),
            messages: messages.to_vec(),
            persistence: persistence as i32,
        });
        mark_forwarded(&mut req, hops);
        req.set_timeout(deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)));
        let r = client.publish(req).await.map(|r| r.into_inner());
        if let Err(s) = &r {
            tracing::debug!(node, code = ?s.code(), error = s.message(), "forwarded publish failed");
        }
        r
    }
}

enum Route {
    /// This node is the primary of the segment (id, replica count).
    Local(SegmentId, usize),
    /// Forward to the primary of an open segment.
    Remote(NodeId, String),
    /// No open segment (yet): retry.
    None,
    /// No open segment, and too few nodes ALIVE to open one.
    TooFewNodes(RequestError),
}

fn durability(p: Persistence, replicas: usize) -> Durability {
    match p {
        Persistence::None => Durability::Received,
        Persistence::Primary => Durability::Primary,
        Persistence::Replicated => Durability::Replicated,
        Persistence::Default if replicas > 1 => Durability::Replicated,
        Persistence::Default => Durability::Primary,
    }
}

fn invalid(msg: impl Into<String>) -> RequestError {
    RequestError::new(ErrorCode::InvalidArgument, msg)
}

fn not_ready(topic: &str) -> RequestError {
    RequestError::new(
        ErrorCode::NotReady,
        format!("topic {topic:?} has no open segment that can take messages right now; retry"),
    )
}

/// Errors worth another routing attempt: the segment moved or is being opened.
fn retryable(s: &tonic::Status) -> bool {
    let code = s.metadata().get(crate::error::ERROR_CODE_METADATA).and_then(|v| v.to_str().ok()?.parse::<u32>().ok());
    let again = [ErrorCode::NotPrimary, ErrorCode::NotReady, ErrorCode::NotEnoughReplicas];
    matches!(code, Some(c) if again.iter().any(|a| a.as_u32() == c))
        || matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Cancelled)
}
