//! Routing a publish: append to an open segment of the topic this node is primary of,
//! or forward to the primary of one. Waits (within the request timeout) while the
//! topic has no open segment, e.g. right after it was created or during a fail-over.
//!
//! An exactly-once publish (with a producer id) always goes to the shard
//! `producer_id % shards`: its duplicate window lives with that shard's primary, so a
//! retry must reach the same shard (and a producer's requests keep their order). It
//! waits for that shard's segment rather than taking another. Unkeyed publishes go to
//! any open segment, round-robin.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use eventtermq_proto::v1::{Message, Persistence, PublishRequest, PublishResponse};
use prost::Message as _;
use tokio::time::Instant;

use super::confirm::Durability;
use super::dedupe::Key;
use super::keeper::{disk_action, DiskAction};
use super::Segments;
use crate::cluster_state::{NodeId, SegmentId};
use crate::error::{ErrorCode, RequestError};
use crate::peers::PUBLISH_HOPS_MAX;

/// Pause between routing attempts while no segment can take the publish.
const RETRY_PAUSE: Duration = Duration::from_millis(20);

static ROUND_ROBIN: AtomicUsize = AtomicUsize::new(0);

impl Segments {
    /// Publishes `messages` to a topic; with a `key` (producer id and sequence),
    /// exactly once within the duplicate window. `hops`: how many times the request
    /// was forwarded before it reached this node (see [`PUBLISH_HOPS_MAX`]).
    pub async fn publish(
        &self,
        namespace: &str,
        topic: &str,
        messages: &[Message],
        persistence: Persistence,
        key: Option<Key>,
        hops: u32,
    ) -> Result<PublishResponse, RequestError> {
        let payloads = self.encode_checked(messages)?;
        let producer = key.map(|k| k.producer);
        let deadline = Instant::now() + self.cluster().request_timeout();
        let mut checked_linearizable = false;
        // An attempt that may have stored the messages: a later refusal must not say
        // "nothing changed".
        let mut unknown: Option<RequestError> = None;
        loop {
            let route = match self.route(namespace, topic, producer) {
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
                    let append = self.append_local(id, topic, &payloads, durability(persistence, replicas), key);
                    // The primary answers within the request timeout, except a repeat
                    // of a request still in flight, which waits for the first attempt
                    // (confirmed or failed): that wait is bounded here.
                    tokio::time::timeout_at(deadline, append).await.unwrap_or_else(|_| Err(unconfirmed(topic)))
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
                        producer_id: key.map_or(0, |k| k.producer),
                        sequence: key.map_or(0, |k| k.sequence),
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
        if u32::try_from(messages.len()).is_err() {
            return Err(invalid(format!("messages: {} is more than {} in one request", messages.len(), u32::MAX)));
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
        key: Option<Key>,
    ) -> Result<PublishResponse, RequestError> {
        // No task yet: the keeper has not started it.
        let primary = self.primary(id).ok_or_else(|| not_ready(topic))?;
        let a = match primary.append(payloads.to_vec(), durability, key).await {
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
            segment_id: a.segment_id,
            first_offset: a.first_offset,
            count: a.count,
            duplicate: a.duplicate,
            stored_before: a.stored_before,
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
    /// `None` to publish here request by request. `producer`: the first request's.
    pub fn stream_target(&self, namespace: &str, topic: &str, producer: Option<u64>, hops: u32) -> Option<String> {
        match self.route(namespace, topic, producer) {
            Ok(Route::Remote(_, addr)) if hops < PUBLISH_HOPS_MAX => Some(addr),
            _ => None,
        }
    }

    /// Where a publish goes: any open segment of the topic (this node's first), or for
    /// a `producer` the open segment of its shard only.
    fn route(&self, namespace: &str, topic: &str, producer: Option<u64>) -> Result<Route, RequestError> {
        let me = self.cluster().id;
        let st = self.cluster().state.read();
        let spec = st.state.topic(namespace, topic)?;
        let shard = producer.map(|p| (p % u64::from(spec.shards.max(1))) as u32);
        let open: Vec<(SegmentId, NodeId, usize)> = st
            .state
            .topic_segments(namespace, topic)
            .filter(|(_, s)| s.is_open() && !st.state.node_gone(s.primary))
            .filter(|(_, s)| shard.is_none_or(|shard| s.shard == shard))
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

/// No answer from the topic's primary within the request timeout: the messages may be
/// stored (a retry with the same producer id and sequence is answered as they were).
fn unconfirmed(topic: &str) -> RequestError {
    RequestError::new(
        ErrorCode::Timeout,
        format!(
            "topic {topic:?}: the primary did not confirm the publish within the request timeout (--request-timeout-ms); \
             it may still be stored"
        ),
    )
}
