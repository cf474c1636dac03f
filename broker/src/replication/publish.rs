//! Routing a publish: append to an open segment of the topic this node is primary of,
//! or forward to the primary of one. Waits (within the request timeout) while the
//! topic has no open segment, e.g. right after it was created or during a fail-over.
//!
//! A publish goes to a shard picked by [`shard_of`]: its routing key's (one key, one
//! shard, in order), else for an exactly-once publish (with a producer id) the shard
//! of its producer id and sequence (its duplicate window lives with that shard's
//! primary, so a retry must reach the same shard), else any open segment,
//! round-robin. A publish with a shard waits for that shard's segment rather than
//! taking another.

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
use crate::cluster_state::{NodeId, SegmentId, ShardKey};
use crate::error::{ErrorCode, RequestError};
use crate::peers::PUBLISH_HOPS_MAX;

/// Where a stream of publishes goes: see [`Segments::stream_target`].
#[derive(Debug, PartialEq, Eq)]
pub enum StreamTarget {
    /// Relayed whole to the primary of its shard, at this address.
    Relay(String),
    /// Published here; `in_turn`: its requests go to one shard and are stored in order.
    Here { in_turn: bool },
}

/// Pause between routing attempts while no segment can take the publish.
pub(super) const RETRY_PAUSE: Duration = Duration::from_millis(20);

static ROUND_ROBIN: AtomicUsize = AtomicUsize::new(0);

pub use super::primary::Turn;

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
        self.publish_in_turn(namespace, topic, messages, persistence, key, hops, None).await
    }

    /// [`Segments::publish`], holding `turn` (when given) until the messages are
    /// queued at their primary, or were forwarded and answered: the requests of one
    /// stream to one shard that take their turns in order are stored in that order,
    /// even when they wait for the shard's segment to open or are forwarded one by
    /// one (without it, each retries on its own and the first to find the segment
    /// goes first).
    #[allow(clippy::too_many_arguments)]
    pub async fn publish_in_turn(
        &self,
        namespace: &str,
        topic: &str,
        messages: &[Message],
        persistence: Persistence,
        key: Option<Key>,
        hops: u32,
        mut turn: Option<Turn>,
    ) -> Result<PublishResponse, RequestError> {
        let payloads = self.encode_checked(messages)?;
        let routing_key = messages.first().map(|m| m.routing_key.as_str());
        let deadline = Instant::now() + self.cluster().request_timeout();
        let mut checked_linearizable = false;
        // An attempt that may have stored the messages: a later refusal must not say
        // "nothing changed".
        let mut unknown: Option<RequestError> = None;
        loop {
            let route = match self.route(namespace, topic, key, routing_key, hops > 0) {
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
                    let append =
                        self.append_local(id, topic, &payloads, durability(persistence, replicas), key, &mut turn);
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
        turn: &mut Option<Turn>,
    ) -> Result<PublishResponse, RequestError> {
        // No task yet: the keeper has not started it.
        let primary = self.primary(id).ok_or_else(|| not_ready(topic))?;
        let a = match primary.append(payloads.to_vec(), durability, key, turn).await {
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

    /// Where a stream of publishes to `topic` should go as a whole: relayed to another
    /// node when its requests go to one shard whose primary is that node (so it keeps
    /// its order): a topic of one shard, or a stream whose first request names a
    /// routing key that picks the shard. Else published here request by request, in
    /// turn (see [`Segments::publish_in_turn`]) when they go to one shard.
    pub fn stream_target(&self, namespace: &str, topic: &str, routing_key: Option<&str>, hops: u32) -> StreamTarget {
        let one_shard =
            self.cluster().state.read().state.topic(namespace, topic).is_ok_and(|spec| {
                spec.shards <= 1 || shard_of(spec.shards, spec.shard_key, None, routing_key).is_some()
            });
        if !one_shard {
            return StreamTarget::Here { in_turn: false };
        }
        match self.route(namespace, topic, None, routing_key, hops > 0) {
            Ok(Route::Remote(_, addr)) if hops < PUBLISH_HOPS_MAX => StreamTarget::Relay(addr),
            _ => StreamTarget::Here { in_turn: true },
        }
    }

    /// Where a publish goes: the open segment of its shard ([`shard_of`]), or when any
    /// shard will do, one of the topic's open segments round-robin (this node's when
    /// the request was forwarded here: it came to this primary on purpose).
    fn route(
        &self,
        namespace: &str,
        topic: &str,
        key: Option<Key>,
        routing_key: Option<&str>,
        forwarded: bool,
    ) -> Result<Route, RequestError> {
        let me = self.cluster().id;
        let st = self.cluster().state.read();
        let spec = st.state.topic(namespace, topic)?;
        let shard = shard_of(spec.shards, spec.shard_key, key, routing_key);
        let open: Vec<(SegmentId, NodeId, usize)> = st
            .state
            .topic_segments(namespace, topic)
            .filter(|(_, s)| s.is_open() && !st.state.node_gone(s.primary))
            .filter(|(_, s)| shard.is_none_or(|shard| s.shard == shard))
            .map(|(id, s)| (id, s.primary, s.replicas.len()))
            .collect();
        let local = open.iter().find(|(_, p, _)| *p == me);
        if let Some((id, _, n)) = local.filter(|_| shard.is_some() || forwarded || open.len() == 1) {
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
        let &(id, node, n) = candidates[ROUND_ROBIN.fetch_add(1, Ordering::Relaxed) % candidates.len()];
        if node == me {
            return Ok(Route::Local(id, n));
        }
        Ok(match st.state.nodes.get(&node) {
            Some(n) => Route::Remote(node, n.address.clone()),
            None => Route::None,
        })
    }
}

/// The shard a publish must go to, if one: with [`ShardKey::RoutingKey`] the shard of
/// a non-empty routing key (crc32c of its bytes modulo `shards`, stable across nodes
/// and releases), else for an exactly-once request the shard of its producer id and
/// sequence (a retry names both, so it reaches the same shard and its duplicate
/// window; a producer's requests spread like unkeyed ones); `None`: any open shard.
pub fn shard_of(shards: u32, by: ShardKey, key: Option<Key>, routing_key: Option<&str>) -> Option<u32> {
    let shards = shards.max(1);
    match (by, routing_key) {
        (ShardKey::RoutingKey, Some(k)) if !k.is_empty() => Some(crc32c::crc32c(k.as_bytes()) % shards),
        _ => key.map(|k| {
            let ids = [k.producer.to_le_bytes(), k.sequence.to_le_bytes()].concat();
            crc32c::crc32c(&ids) % shards
        }),
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
pub(super) fn again(e: &RequestError) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_has_one_shard_an_exactly_once_request_its_own_and_else_any() {
        let by_key = |k: &str| shard_of(3, ShardKey::RoutingKey, None, Some(k));
        assert_eq!(by_key("order-17"), by_key("order-17"));
        assert_eq!(by_key("order-17"), Some(crc32c::crc32c(b"order-17") % 3));
        let spread: std::collections::BTreeSet<u32> = (0..100).filter_map(|i| by_key(&format!("k{i}"))).collect();
        assert_eq!(spread.len(), 3, "100 keys reach every shard");
        let request = |sequence| Some(Key { producer: 7, sequence });
        assert_eq!(
            shard_of(3, ShardKey::RoutingKey, request(1), Some("order-17")),
            by_key("order-17"),
            "the key first"
        );
        let once = shard_of(3, ShardKey::RoutingKey, request(1), None);
        assert!(once.is_some() && once == shard_of(3, ShardKey::None, request(1), Some("order-17")), "a retry's shard");
        let mut per_shard = [0; 3];
        for sequence in 1..=3000 {
            per_shard[shard_of(3, ShardKey::RoutingKey, request(sequence), None).unwrap() as usize] += 1;
        }
        assert!(per_shard.iter().all(|n| (900..=1100).contains(n)), "a producer's requests spread: {per_shard:?}");
        assert_eq!(shard_of(3, ShardKey::RoutingKey, None, Some("")), None);
        assert_eq!(shard_of(3, ShardKey::RoutingKey, None, None), None);
        assert_eq!(shard_of(3, ShardKey::None, None, Some("order-17")), None);
        assert_eq!(shard_of(0, ShardKey::RoutingKey, None, Some("x")), Some(0));
    }
}
