//! Routing a publish: append to an open segment of the topic this node is primary of,
//! or forward to the primary of one. Waits (within the request timeout) while the
//! topic has no open segment, e.g. right after it was created or during a fail-over.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use eventtermq_proto::v1::{Message, Persistence, PublishRequest, PublishResponse};
use prost::Message as _;
use tokio::time::Instant;

use super::confirm::Durability;
use super::keeper::{disk_action, DiskAction};
use super::Segments;
use crate::cluster_state::{NodeId, SegmentId};
use crate::error::{ErrorCode, RequestError};
use crate::peers::PUBLISH_HOPS_MAX;

/// Pause between routing attempts while no segment can take the publish.
const RETRY_PAUSE: Duration = Duration::from_millis(20);

static ROUND_ROBIN: AtomicUsize = AtomicUsize::new(0);

impl Segments {
    /// Publishes `messages` to a topic; `hops`: how many times the request was
    /// forwarded before it reached this node (see [`PUBLISH_HOPS_MAX`]).
    pub async fn publish(
        &self,
        namespace: &str,
        topic: &str,
        messages: &[Message],
        persistence: Persistence,
        hops: u32,
    ) -> Result<PublishResponse, RequestError> {
        let payloads = self.encode_checked(messages)?;
        let deadline = Instant::now() + self.cluster().request_timeout();
        let mut checked_linearizable = false;
        // An attempt that may have stored the messages: a later refusal must not say
        // "nothing changed".
        let mut unknown: Option<RequestError> = None;
        loop {
            let route = match self.route(namespace, topic) {
                Err(_) if !checked_linearizable => {
                    // The topic may be newer than this node's copy of the state.
                    checked_linearizable = true;
                    drop(self.cluster().read(true).await?);
                    continue;
                }
                r => r?,
            };
            let attempt = match route {
                Route::Local(id, replicas) => {
                    self.append_local(id, topic, &payloads, durability(persistence, replicas)).await
                }
                Route::TooFewNodes(e) => Err(e),
                Route::Remote(..) | Route::None if hops >= PUBLISH_HOPS_MAX => Err(RequestError::new(
                    ErrorCode::NotPrimary,
                    format!("node {} is not the primary of an open segment of topic {topic:?}", self.cluster().id),
                )),
                Route::Remote(node, addr) => {
                    let req = PublishRequest {
                        namespace: namespace.to_string(),
                        topic: topic.to_string(),
                        messages: messages.to_vec(),
                        persistence: persistence as i32,
                    };
                    let r = self.peers().forward_publish(node, &addr, req, hops, deadline).await;
                    r.map_err(|e| {
                        tracing::debug!(node, error = %e, "forwarded publish failed");
                        RequestError::from(e)
                    })
                }
                Route::None => Err(not_ready(topic)),
            };
            match attempt {
                Err(e) if again(&e) && Instant::now() < deadline => {
                    if e.code.outcome_unknown() {
                        unknown = Some(e);
                    }
                    tokio::time::sleep(RETRY_PAUSE).await
                }
                r => return r.map_err(|e| e.after_unknown(unknown.as_ref())),
            }
        }
    }

    /// The messages as stored (encoded), after checking them against the limits.
    fn encode_checked(&self, messages: &[Message]) -> Result<Vec<Bytes>, RequestError> {
        if messages.is_empty() {
            return Err(invalid("messages: at least one message is required"));
        }
        let payloads: Vec<Bytes> = messages.iter().map(|m| Bytes::from(m.encode_to_vec())).collect();
        let limit = self.settings().write_batch_max_bytes;
        if let Some((i, p)) = payloads.iter().enumerate().find(|(_, p)| p.len() > limit) {
            return Err(invalid(format!(
                "messages[{i}]: {} bytes encoded is above the limit of {limit} bytes (--write-batch-max-bytes)",
                p.len()
            )));
        }
        Ok(payloads)
    }

    /// Appends to the open segment `id` this node is primary of.
    async fn append_local(
        &self,
        id: SegmentId,
        topic: &str,
        payloads: &[Bytes],
        durability: Durability,
    ) -> Result<PublishResponse, RequestError> {
        // No task yet: the keeper has not started it.
        let primary = self.primary(id).ok_or_else(|| not_ready(topic))?;
        let range = match primary.append(payloads.to_vec(), durability).await {
            Err(e) if e.code == ErrorCode::DiskFull && self.moves_for_disk(id) => {
                // Not a refusal of the cluster: the shard is about to move to nodes
                // with room, so the publish is routed again (within its deadline).
                return Err(RequestError::new(
                    ErrorCode::NotPrimary,
                    format!("{}; segment {id} moves to nodes with disk space: publish again", e.message),
                ));
            }
            r => r?,
        };
        #[allow(deprecated)] // `ok`: still sent for clients that read it
        Ok(PublishResponse {
            ok: true,
            segment_id: id,
            first_offset: range.start,
            count: (range.end - range.start) as u32,
        })
    }

    /// Whether segment `id`, whose primary (this node) refused a publish for disk space,
    /// is closed by its keeper so that its successor goes elsewhere, and enough other
    /// nodes have room to open that successor.
    fn moves_for_disk(&self, id: SegmentId) -> bool {
        let me = self.cluster().id;
        let me_low = self.disk().status().below;
        let st = self.cluster().state.read();
        let low = |n: NodeId| if n == me { me_low } else { st.state.disk_low.contains_key(&n) };
        let Some(seg) = st.state.segments.get(&id) else { return false };
        let Ok(spec) = st.state.topic(&seg.namespace, &seg.topic) else { return false };
        let room = st.state.alive_nodes().filter(|n| !low(*n)).count();
        disk_action(seg, low) == DiskAction::Rotate && room >= st.state.min_insync_for(spec) as usize
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
            let data = st.state.data_nodes().count();
            if alive >= needed as usize && data < needed as usize {
                let low = st.state.disk_low_text(st.state.alive_nodes());
                return Ok(Route::TooFewNodes(RequestError::new(
                    ErrorCode::DiskFull,
                    format!(
                        "topic {topic:?} needs {needed} nodes with disk space for a new segment \
                         (min_insync_replicas) and {data} have it: {low} below the disk watermark; \
                         publish refused before any disk fills; retry once space is freed"
                    ),
                )));
            }
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
        // Shards whose primary has disk space first: another shard can still take it.
        let with_room: Vec<_> = open.iter().filter(|(_, p, _)| !st.state.disk_low.contains_key(p)).collect();
        let candidates = if with_room.is_empty() { open.iter().collect() } else { with_room };
        let &(_, node, _) = candidates[ROUND_ROBIN.fetch_add(1, Ordering::Relaxed) % candidates.len()];
        Ok(match st.state.nodes.get(&node) {
            Some(n) => Route::Remote(node, n.address.clone()),
            None => Route::None,
        })
    }
}

enum Route {
    /// This node is the primary of the segment (id, replica count).
    Local(SegmentId, usize),
    /// Forward to the primary of an open segment.
    Remote(NodeId, String),
    /// No open segment (yet): retry.
    None,
    /// No open segment, and too few nodes ALIVE (or with disk space) to open one.
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

/// Errors worth another routing attempt: the segment moved or is being opened, or the
/// cluster cannot take it right now.
fn again(e: &RequestError) -> bool {
    e.code == ErrorCode::NotPrimary || e.retryable()
}
