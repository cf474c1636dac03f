//! The AMQP model on EventterMQ's: a virtual host is a namespace, an exchange a topic
//! (its type the topic's default exchange type), a queue a consumer group, a binding
//! a group binding. This is the only part of `amqp/` that touches the cluster; the
//! connection and channel code speak AMQP and call these.
//!
//! The default exchange `""` is the topic `amq.default` of the namespace, created with
//! the first queue; every queue declared over AMQP is bound to it by its own name
//! (direct), so publishing there with routing key `q` reaches exactly queue `q`. The
//! predeclared `amq.direct`, `amq.fanout`, `amq.topic` and `amq.headers` are created on
//! first use. A binding made after a queue exists takes what is published after it,
//! as in RabbitMQ (`BindingSpec::since_unix_ms`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use amq_protocol::types::{AMQPValue, FieldTable};
use eventtermq_proto::v1 as pb;

use super::convert::text_value;
use super::error::{
    AmqpError, ACCESS_REFUSED, INTERNAL_ERROR, NOT_ALLOWED, NOT_FOUND, PRECONDITION_FAILED, RESOURCE_LOCKED,
};
use crate::cluster::Cluster;
use crate::cluster_state::validate::{CONSUMER_GROUP_SIZE_MAX, MESSAGE_TTL_MS_MAX};
use crate::cluster_state::{
    validate, BindingSpec, ClusterState, Command, ConsumerGroupSpec, ExchangeType, ExclusiveOwner, HeadersMatch,
    TopicSpec, DEFAULT_NAMESPACE,
};
use crate::consumer_groups::{matching, Groups, Occupancy};
use crate::error::{ErrorCode, RequestError};
use crate::peers::{Peers, Relayed};
use crate::replication::in_order::InOrder;
use crate::replication::{lock, Segments};
use rand::distr::{Alphanumeric, SampleString};
use tokio_util::sync::CancellationToken;

/// What `queue.bind` and `queue.unbind` name besides the queue.
#[derive(Clone, Copy)]
pub struct Route<'a> {
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub args: &'a FieldTable,
}

/// The topic behind the default exchange `""`.
pub const DEFAULT_EXCHANGE_TOPIC: &str = "amq.default";
/// A queue (or binding) takes what is published from this long before it was
/// declared (or bound): messages are stamped by their primary's clock and the
/// declaration by this node's, and a message published after `declare-ok` must never
/// be missed because the two clocks differ. The price: a queue may also get what was
/// published up to this long before it existed.
pub const START_MARGIN_MS: i64 = 1_000;
/// Exchanges every virtual host has, with their types.
const PREDECLARED: [(&str, ExchangeType); 4] = [
    ("amq.direct", ExchangeType::Direct),
    ("amq.fanout", ExchangeType::Fanout),
    ("amq.topic", ExchangeType::Topic),
    ("amq.headers", ExchangeType::Headers),
];

/// The broker as AMQP sees it. Cheap to clone.
#[derive(Clone)]
pub struct Backend {
    /// Users: the login and every method's permission.
    pub auth: crate::auth::Auth,
    pub cluster: Cluster,
    pub segments: Segments,
    pub groups: Groups,
    pub peers: Peers,
    /// This node's AMQP consumers.
    pub consumers: LocalConsumers,
    /// The publish bytes this node holds for its clients (shared with gRPC): a
    /// message takes its share before it is handed to its channel's publisher.
    pub budget: crate::budget::PublishBudget,
    /// Random per start of this node's process: exclusive queues declared here carry
    /// it (`ExclusiveOwner`), so that the next run knows which are of an earlier one.
    pub run_id: u64,
}

/// The AMQP consumers of this node's connections per (namespace, queue): what
/// `declare-ok` counts when the group's node cannot tell. Cheap to clone.
#[derive(Clone, Default)]
pub struct LocalConsumers(Arc<Mutex<HashMap<(String, String), u64>>>);

/// One consumer counted in [`LocalConsumers`] until this is dropped (with the
/// channel's record of the consumer, however it ends).
pub struct Counted {
    consumers: LocalConsumers,
    key: (String, String),
}

impl LocalConsumers {
    pub fn count(&self, namespace: &str, queue: &str) -> u64 {
        lock(&self.0).get(&(namespace.to_string(), queue.to_string())).copied().unwrap_or(0)
    }

    pub fn counted(&self, namespace: &str, queue: &str) -> Counted {
        let key = (namespace.to_string(), queue.to_string());
        *lock(&self.0).entry(key.clone()).or_default() += 1;
        Counted { consumers: self.clone(), key }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut all = lock(&self.consumers.0);
        if let Some(n) = all.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                all.remove(&self.key);
            }
        }
    }
}

/// The namespace of a virtual host: `/` is `default`, a leading `/` is dropped.
pub fn namespace_of_vhost(vhost: &str) -> String {
    match vhost.strip_prefix('/').unwrap_or(vhost) {
        "" => DEFAULT_NAMESPACE.to_string(),
        name => name.to_string(),
    }
}

/// The virtual host of a namespace as reply texts name it: `/` for `default`.
pub fn vhost(namespace: &str) -> &str {
    if namespace == DEFAULT_NAMESPACE {
        "/"
    } else {
        namespace
    }
}

/// The topic behind an exchange name.
pub fn topic_of_exchange(exchange: &str) -> &str {
    if exchange.is_empty() {
        DEFAULT_EXCHANGE_TOPIC
    } else {
        exchange
    }
}

/// The exchange name a consumer sees for a topic.
pub fn exchange_of_topic(topic: &str) -> &str {
    if topic == DEFAULT_EXCHANGE_TOPIC {
        ""
    } else {
        topic
    }
}

fn predeclared(name: &str) -> Option<ExchangeType> {
    PREDECLARED.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}

fn valid_name(what: &str, name: &str) -> Result<(), AmqpError> {
    validate::name(what, name).map_err(|e| AmqpError::channel(PRECONDITION_FAILED, e.message))
}

fn topic_spec(kind: ExchangeType) -> TopicSpec {
    TopicSpec {
        shards: eventtermq_api::defaults::SHARDS,
        replication_factor: eventtermq_api::defaults::REPLICATION_FACTOR,
        retention_ms: 0,
        default_exchange_type: kind,
        segment_size_max_bytes: 0,
        min_insync_replicas: 0,
        ..Default::default()
    }
}

/// What `queue.declare`'s arguments ask for.
#[derive(Debug, Default, PartialEq, Eq)]
struct QueueArguments {
    /// `x-delivery-limit`: the group's `deliveries_max`.
    deliveries_max: u32,
    /// `x-dead-letter-exchange`.
    dead_letter_exchange: Option<String>,
    /// `x-message-ttl`: the group's `message_ttl_ms`.
    message_ttl_ms: u64,
    /// `x-max-length` (overflow `drop-head`): the group's `ready_messages_max`.
    ready_messages_max: u64,
    /// `x-max-length-bytes` (overflow `drop-head`): the group's `ready_bytes_max`.
    ready_bytes_max: u64,
    /// `x-dead-letter-routing-key`.
    dead_letter_routing_key: String,
}

/// What `queue.declare`'s arguments ask for: a delivery limit (`x-delivery-limit`)
/// and a dead-letter exchange (`x-dead-letter-exchange`), as RabbitMQ's quorum queues
/// take them, a message TTL (`x-message-ttl`) and length limits (`x-max-length`,
/// `x-max-length-bytes`, `x-overflow` `drop-head` only); `x-queue-type` is accepted and ignored (every queue
/// is replicated). Anything else: 406 naming the argument.
fn queue_arguments(args: &FieldTable) -> Result<QueueArguments, AmqpError> {
    let mut a = QueueArguments::default();
    for (k, v) in args.inner() {
        let refused = |rule: &str| AmqpError::channel(PRECONDITION_FAILED, format!("queue argument '{k}': {rule}"));
        match (k.as_str(), v) {
            ("x-queue-type", AMQPValue::LongString(_) | AMQPValue::ShortString(_)) => {}
            ("x-delivery-limit", v) => {
                let n = integer(v).ok_or_else(|| refused("must be an integer"))?;
                a.deliveries_max =
                    u32::try_from(n).ok().filter(|n| *n > 0).ok_or_else(|| refused("must be 1 or more"))?;
            }
            ("x-message-ttl", v) => {
                let n = integer(v).ok_or_else(|| refused("must be an integer (milliseconds)"))?;
                a.message_ttl_ms =
                    u64::try_from(n).ok().filter(|n| (1..=MESSAGE_TTL_MS_MAX).contains(n)).ok_or_else(|| {
                        refused(&format!(
                            "{n} is out of range (1-{MESSAGE_TTL_MS_MAX} ms; 0, expire unless delivered at once, is \
                             not supported)"
                        ))
                    })?;
            }
            ("x-max-length", v) => {
                let n = integer(v).ok_or_else(|| refused("must be an integer (messages)"))?;
                let max = u64::from(CONSUMER_GROUP_SIZE_MAX);
                a.ready_messages_max = u64::try_from(n)
                    .ok()
                    .filter(|n| (1..=max).contains(n))
                    .ok_or_else(|| refused(&format!("{n} is out of range (1-{max} messages)")))?;
            }
            ("x-max-length-bytes", v) => {
                let n = integer(v).ok_or_else(|| refused("must be an integer (bytes)"))?;
                a.ready_bytes_max = u64::try_from(n)
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| refused(&format!("{n} is out of range (1 or more bytes)")))?;
            }
            ("x-overflow", v) => match text(v).as_deref() {
                Some("drop-head") => {}
                Some(other @ ("reject-publish" | "reject-publish-dlx")) => {
                    return Err(refused(&format!(
                        "'{other}' is not supported: a queue is a consumer group reading a log that takes every \
                         publish; only 'drop-head' (the default) is"
                    )))
                }
                _ => return Err(refused("must be 'drop-head'")),
            },
            ("x-dead-letter-exchange", v) => {
                a.dead_letter_exchange = Some(text(v).ok_or_else(|| refused("must be a string"))?);
            }
            ("x-dead-letter-routing-key", v) => {
                a.dead_letter_routing_key = text(v).ok_or_else(|| refused("must be a string"))?;
            }
            (other, _) => {
                return Err(AmqpError::channel(
                    PRECONDITION_FAILED,
                    format!("queue argument '{other}' is not supported (yet); declare the queue without it"),
                ))
            }
        }
    }
    if a.dead_letter_exchange.as_deref() == Some("") && a.dead_letter_routing_key.is_empty() {
        return Err(AmqpError::channel(
            PRECONDITION_FAILED,
            "queue argument 'x-dead-letter-exchange': the default exchange needs x-dead-letter-routing-key (the \
             queue to go to)",
        ));
    }
    if a.dead_letter_exchange.is_none() && !a.dead_letter_routing_key.is_empty() {
        return Err(AmqpError::channel(
            PRECONDITION_FAILED,
            "queue argument 'x-dead-letter-routing-key': needs x-dead-letter-exchange",
        ));
    }
    Ok(a)
}

fn integer(v: &AMQPValue) -> Option<i64> {
    Some(match v {
        AMQPValue::ShortShortInt(i) => i64::from(*i),
        AMQPValue::ShortShortUInt(i) => i64::from(*i),
        AMQPValue::ShortInt(i) => i64::from(*i),
        AMQPValue::ShortUInt(i) => i64::from(*i),
        AMQPValue::LongInt(i) => i64::from(*i),
        AMQPValue::LongUInt(i) => i64::from(*i),
        AMQPValue::LongLongInt(i) => *i,
        _ => return None,
    })
}

fn text(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

impl Backend {
    /// Where a queue or binding made now starts: [`START_MARGIN_MS`] ago.
    fn start_ms(&self) -> i64 {
        self.segments.clock().now_unix_ms() - START_MARGIN_MS
    }

    /// Whether the virtual host (namespace) exists, by this node's state.
    pub async fn vhost_exists(&self, namespace: &str) -> bool {
        self.fresh(|st| st.namespaces.get(namespace).map(|_| ())).await.is_some()
    }

    /// Looks `f` up in this node's state, and when it is not there, once more after
    /// catching up with the leader: what another node just created is found.
    async fn fresh<T>(&self, f: impl Fn(&ClusterState) -> Option<T>) -> Option<T> {
        if let Some(v) = f(&self.cluster.state.read().state) {
            return Some(v);
        }
        match self.cluster.read(true).await {
            Ok(applied) => f(&applied.state),
            Err(_) => None,
        }
    }

    async fn topic_type(&self, namespace: &str, topic: &str) -> Option<ExchangeType> {
        self.fresh(|st| st.namespaces.get(namespace)?.topics.get(topic).map(|t| t.default_exchange_type)).await
    }

    /// Whether the queue exists and is exclusive to a connection (of any node); the
    /// caller knows its connection's own.
    pub async fn queue_is_exclusive(&self, namespace: &str, queue: &str) -> bool {
        let owner =
            |st: &ClusterState| st.namespaces.get(namespace)?.consumer_groups.get(queue).map(|g| g.exclusive_owner);
        self.fresh(owner).await.flatten().is_some()
    }

    async fn queue_exists(&self, namespace: &str, queue: &str) -> bool {
        self.fresh(|st| st.namespaces.get(namespace)?.consumer_groups.get(queue).map(|_| ())).await.is_some()
    }

    /// Creates the topic (accepting one created meanwhile with the same type).
    async fn create_topic(&self, namespace: &str, name: &str, kind: ExchangeType) -> Result<(), AmqpError> {
        let cmd = Command::CreateTopic { namespace: namespace.into(), name: name.into(), spec: topic_spec(kind) };
        match self.cluster.write_applied(cmd).await {
            Ok(_) => Ok(()),
            Err(e) if e.code == ErrorCode::TopicAlreadyExists => self.check_type(namespace, name, kind).await,
            Err(e) => Err(e.into()),
        }
    }

    async fn check_type(&self, namespace: &str, name: &str, kind: ExchangeType) -> Result<(), AmqpError> {
        match self.topic_type(namespace, name).await {
            Some(t) if t == kind => Ok(()),
            Some(t) => Err(AmqpError::channel(
                PRECONDITION_FAILED,
                format!(
                    "inequivalent arg 'type' for exchange '{name}' in vhost '{vh}': received '{}' but current \
                     is '{}'",
                    kind.as_str(),
                    t.as_str(),
                    vh = vhost(namespace)
                ),
            )),
            None => Err(AmqpError::channel(
                NOT_FOUND,
                format!("no exchange '{name}' in vhost '{vh}'", vh = vhost(namespace)),
            )),
        }
    }

    /// `exchange.declare`: creates or checks the topic.
    pub async fn declare_exchange(
        &self,
        namespace: &str,
        name: &str,
        kind: &str,
        passive: bool,
    ) -> Result<(), AmqpError> {
        if name.is_empty() {
            return Err(AmqpError::channel(ACCESS_REFUSED, "operation not permitted on the default exchange"));
        }
        if let Some(own) = predeclared(name) {
            // Declaring a predeclared exchange with its own type changes nothing.
            if !passive && kind != own.as_str() {
                return Err(AmqpError::channel(
                    ACCESS_REFUSED,
                    format!("exchange '{name}' is predeclared as '{}', not '{kind}'", own.as_str()),
                ));
            }
            return self.ensure_exchange(namespace, name).await.map(|_| ());
        }
        if name.starts_with("amq.") {
            return Err(AmqpError::channel(
                ACCESS_REFUSED,
                format!("exchange name '{name}' contains reserved prefix 'amq.*'"),
            ));
        }
        valid_name("exchange", name)?;
        if passive {
            return match self.topic_type(namespace, name).await {
                Some(_) => Ok(()),
                None => Err(AmqpError::channel(
                    NOT_FOUND,
                    format!("no exchange '{name}' in vhost '{vh}'", vh = vhost(namespace)),
                )),
            };
        }
        let kind = ExchangeType::parse(kind).ok_or_else(|| {
            AmqpError::connection(
                super::error::COMMAND_INVALID,
                format!("invalid exchange type '{kind}' (one of {})", ExchangeType::NAMES),
            )
        })?;
        match self.topic_type(namespace, name).await {
            Some(_) => self.check_type(namespace, name, kind).await,
            None => self.create_topic(namespace, name, kind).await,
        }
    }

    /// The topic an exchange publishes to, creating a predeclared one on first use;
    /// 404 for any other exchange that does not exist.
    pub async fn ensure_exchange(&self, namespace: &str, exchange: &str) -> Result<(String, ExchangeType), AmqpError> {
        let topic = topic_of_exchange(exchange);
        if let Some(t) = self.topic_type(namespace, topic).await {
            return Ok((topic.to_string(), t));
        }
        let kind = if exchange.is_empty() { Some(ExchangeType::Direct) } else { predeclared(exchange) };
        match kind {
            Some(kind) => {
                self.create_topic(namespace, topic, kind).await?;
                Ok((topic.to_string(), kind))
            }
            None => Err(AmqpError::channel(
                NOT_FOUND,
                format!("no exchange '{exchange}' in vhost '{vh}'", vh = vhost(namespace)),
            )),
        }
    }

    /// `exchange.delete`: deletes the topic (and what it holds).
    pub async fn delete_exchange(&self, namespace: &str, name: &str, if_unused: bool) -> Result<(), AmqpError> {
        if name.is_empty() || name.starts_with("amq.") {
            return Err(AmqpError::channel(ACCESS_REFUSED, format!("exchange '{name}' cannot be deleted")));
        }
        if self.topic_type(namespace, name).await.is_none() {
            return Ok(()); // as RabbitMQ: deleting what is not there succeeds
        }
        if if_unused && self.bound_groups(namespace, name) > 0 {
            return Err(AmqpError::channel(
                PRECONDITION_FAILED,
                format!("exchange '{name}' in vhost '{vh}' in use", vh = vhost(namespace)),
            ));
        }
        let cmd = Command::DeleteTopic { namespace: namespace.into(), name: name.into() };
        match self.cluster.write_applied(cmd).await {
            Ok(_) => Ok(()),
            Err(e) if e.code == ErrorCode::TopicNotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn bound_groups(&self, namespace: &str, topic: &str) -> usize {
        let st = self.cluster.state.read();
        st.state
            .namespaces
            .get(namespace)
            .map_or(0, |ns| ns.consumer_groups.values().filter(|g| g.bindings.iter().any(|b| b.topic == topic)).count())
    }

    /// `queue.declare`: creates the group (bound to the default exchange by its name,
    /// reading from now on) or checks that it exists (`passive`). `true` when this
    /// call created it.
    pub async fn declare_queue(
        &self,
        namespace: &str,
        name: &str,
        passive: bool,
        exclusive: bool,
        args: &FieldTable,
    ) -> Result<bool, AmqpError> {
        valid_name("queue", name)?;
        if passive || self.queue_exists(namespace, name).await {
            return if self.queue_exists(namespace, name).await { Ok(false) } else { Err(no_queue(namespace, name)) };
        }
        let a = queue_arguments(args)?;
        let dead_letter_topic = match a.dead_letter_exchange {
            Some(exchange) => self.ensure_exchange(namespace, &exchange).await?.0,
            None => String::new(),
        };
        self.ensure_exchange(namespace, "").await?;
        let binding = BindingSpec {
            routing_key: name.to_string(),
            exchange_type: ExchangeType::Direct,
            ..BindingSpec::fanout(DEFAULT_EXCHANGE_TOPIC)
        };
        let spec = ConsumerGroupSpec {
            bindings: vec![binding],
            // The buffer holds the ready messages x-max-length counts.
            size: eventtermq_api::defaults::CONSUMER_GROUP_SIZE.max(a.ready_messages_max as u32),
            since_unix_ms: self.start_ms(),
            deliveries_max: a.deliveries_max,
            dead_letter_topic,
            dead_letter_routing_key: a.dead_letter_routing_key,
            message_ttl_ms: a.message_ttl_ms,
            ready_messages_max: a.ready_messages_max,
            ready_bytes_max: a.ready_bytes_max,
            exclusive_owner: exclusive.then_some(ExclusiveOwner { node_id: self.cluster.id, run_id: self.run_id }),
            ..Default::default()
        };
        let cmd = Command::CreateConsumerGroup { namespace: namespace.into(), name: name.into(), spec };
        match self.cluster.write_applied(cmd).await {
            Ok(_) => Ok(true),
            // Declared meanwhile (by another client, or as a ConsumerGroup resource).
            Err(e) if e.code == ErrorCode::ConsumerGroupAlreadyExists => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// The queue's ready messages and consumers, from the node running its group
    /// (see [`Occupancy`]); `None` when that node cannot tell now (the group is not
    /// placed on a live node, or its node does not answer within a second).
    pub async fn occupancy(&self, namespace: &str, queue: &str) -> Option<Occupancy> {
        self.groups.occupancy_anywhere(&self.peers, namespace, queue).await
    }

    /// `queue.delete` with its conditions: refused (406, as RabbitMQ) when `if_unused`
    /// and the queue has consumers, or `if_empty` and it has ready messages; a queue
    /// that does not exist is deleted already. Answers the ready messages deleted.
    pub async fn delete_queue_if(
        &self,
        namespace: &str,
        name: &str,
        if_unused: bool,
        if_empty: bool,
    ) -> Result<u64, AmqpError> {
        if !self.queue_exists(namespace, name).await {
            return Ok(0);
        }
        let occupancy = self.occupancy(namespace, name).await;
        if if_unused || if_empty {
            let Some(o) = occupancy else {
                return Err(AmqpError::channel(
                    INTERNAL_ERROR,
                    format!(
                        "cannot tell whether queue '{name}' in vhost '{}' is {}: its consumer group runs on no \
                         live node now; retry",
                        vhost(namespace),
                        if if_unused { "in use" } else { "empty" }
                    ),
                ));
            };
            if if_unused && o.subscribers > 0 {
                let text = format!("queue '{name}' in vhost '{}' in use", vhost(namespace));
                return Err(AmqpError::channel(PRECONDITION_FAILED, text));
            }
            if if_empty && o.ready > 0 {
                let text = format!("queue '{name}' in vhost '{}' not empty", vhost(namespace));
                return Err(AmqpError::channel(PRECONDITION_FAILED, text));
            }
        }
        self.delete_queue(namespace, name).await?;
        Ok(occupancy.map_or(0, |o| o.ready))
    }

    /// `queue.purge`: drops the queue's ready messages (see
    /// `Groups::purge_anywhere`); answers how many.
    pub async fn purge_queue(&self, namespace: &str, name: &str) -> Result<u64, AmqpError> {
        match self.groups.purge_anywhere(&self.peers, namespace, name, false).await {
            Ok(n) => Ok(n),
            Err(e) if e.code == ErrorCode::ConsumerGroupNotFound => Err(no_queue(namespace, name)),
            Err(e) => Err(e.into()),
        }
    }

    /// `queue.delete`.
    pub async fn delete_queue(&self, namespace: &str, name: &str) -> Result<(), AmqpError> {
        let cmd = Command::DeleteConsumerGroup { namespace: namespace.into(), name: name.into() };
        match self.cluster.write_applied(cmd).await {
            Ok(_) => Ok(()),
            Err(e) if e.code == ErrorCode::ConsumerGroupNotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes the exclusive queues this node's earlier runs declared: their
    /// connections ended with that run (the leader deletes those of a node that is
    /// DEAD or LEFT; a node back within the failure detector's time never is).
    /// Retried every `pause` until the state, read linearizably, has none left or
    /// `stop`.
    pub async fn delete_exclusive_queues_of_earlier_runs(&self, pause: std::time::Duration, stop: CancellationToken) {
        loop {
            let left = match self.cluster.read(true).await {
                Ok(applied) => Some(earlier_runs(&applied.state, self.cluster.id, self.run_id)),
                Err(_) => None, // no leader yet
            };
            let mut done = left.is_some();
            for (ns, queue) in left.unwrap_or_default() {
                match self.delete_queue(&ns, &queue).await {
                    Ok(()) => {
                        tracing::info!(namespace = %ns, queue, "deleted an exclusive queue of this node's earlier run")
                    }
                    Err(e) => {
                        tracing::debug!(namespace = %ns, queue, error = %e.text,
                            "cannot delete an exclusive queue of an earlier run yet; retrying");
                        done = false;
                    }
                }
            }
            if done {
                return;
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// A private group for a consumer with `x-stream-offset` (see [`stream_offset`]):
    /// the queue's bindings, reading from `since_unix_ms` (0: the oldest kept), owned
    /// by this node's run as an exclusive queue is (the caller deletes it with its
    /// consumer). The queue itself is not touched: replaying reads, as on a stream.
    /// Answers its name.
    pub async fn declare_replay(&self, namespace: &str, queue: &str, since_unix_ms: i64) -> Result<String, AmqpError> {
        let of = |st: &ClusterState| st.namespaces.get(namespace)?.consumer_groups.get(queue).cloned();
        let spec = self.fresh(of).await.ok_or_else(|| no_queue(namespace, queue))?;
        let name = format!("amq.stream-{}", Alphanumeric.sample_string(&mut rand::rng(), 22));
        let bindings = spec.bindings.iter().map(|b| BindingSpec { since_unix_ms, ..b.clone() }).collect();
        let spec = ConsumerGroupSpec {
            bindings,
            size: spec.size,
            since_unix_ms,
            ack_timeout_ms: spec.ack_timeout_ms,
            exclusive_owner: Some(ExclusiveOwner { node_id: self.cluster.id, run_id: self.run_id }),
            ..Default::default()
        };
        let cmd = Command::CreateConsumerGroup { namespace: namespace.into(), name: name.clone(), spec };
        self.cluster.write_applied(cmd).await.map_err(AmqpError::from)?;
        Ok(name)
    }

    /// Where `x-stream-offset` starts, in unix ms (0: the oldest kept).
    pub fn stream_offset_since(&self, offset: StreamOffset) -> i64 {
        match offset {
            StreamOffset::First => 0,
            StreamOffset::Next => self.start_ms(),
            StreamOffset::At(ms) => ms,
            StreamOffset::Ago(ms) => self.segments.clock().now_unix_ms().saturating_sub(ms),
        }
    }

    /// The binding `queue.bind` / `queue.unbind` describe.
    async fn binding(
        &self,
        namespace: &str,
        exchange: &str,
        routing_key: &str,
        args: &FieldTable,
    ) -> Result<BindingSpec, AmqpError> {
        let (topic, kind) = self.ensure_exchange(namespace, exchange).await?;
        let mut b = BindingSpec { exchange_type: kind, ..BindingSpec::fanout(topic) };
        match kind {
            ExchangeType::Fanout => {}
            ExchangeType::Direct | ExchangeType::Topic => b.routing_key = routing_key.to_string(),
            ExchangeType::Headers => {
                for (k, v) in args.inner() {
                    match (k.as_str(), text_value(v)) {
                        ("x-match", Some(m)) => {
                            b.headers_match = match m.as_str() {
                                "all" => HeadersMatch::All,
                                "any" => HeadersMatch::Any,
                                other => {
                                    return Err(AmqpError::channel(
                                        PRECONDITION_FAILED,
                                        format!("x-match: '{other}' is not one of all, any"),
                                    ))
                                }
                            }
                        }
                        (k, _) if k.starts_with("x-") => {}
                        (k, Some(v)) => {
                            b.headers.insert(k.to_string(), v);
                        }
                        (k, None) => {
                            return Err(AmqpError::channel(
                                PRECONDITION_FAILED,
                                format!("binding argument '{k}': only text, number and boolean values can be matched"),
                            ))
                        }
                    }
                }
            }
        }
        Ok(b)
    }

    /// `queue.bind`: what is published to the exchange from now on and matches.
    pub async fn bind(&self, namespace: &str, queue: &str, route: Route<'_>) -> Result<(), AmqpError> {
        if !self.queue_exists(namespace, queue).await {
            return Err(no_queue(namespace, queue));
        }
        let mut binding = self.route_binding(namespace, route).await?;
        binding.since_unix_ms = self.start_ms();
        let cmd = Command::BindConsumerGroup { namespace: namespace.into(), name: queue.into(), binding };
        self.cluster.write_applied(cmd).await.map(|_| ()).map_err(Into::into)
    }

    /// `queue.unbind`.
    pub async fn unbind(&self, namespace: &str, queue: &str, route: Route<'_>) -> Result<(), AmqpError> {
        let binding = self.route_binding(namespace, route).await?;
        let cmd = Command::UnbindConsumerGroup { namespace: namespace.into(), name: queue.into(), binding };
        self.cluster.write_applied(cmd).await.map(|_| ()).map_err(Into::into)
    }

    /// The binding a `queue.bind` or `queue.unbind` names; the default exchange's
    /// bindings are implicit and cannot be changed.
    async fn route_binding(&self, namespace: &str, route: Route<'_>) -> Result<BindingSpec, AmqpError> {
        if route.exchange.is_empty() {
            return Err(AmqpError::channel(ACCESS_REFUSED, "operation not permitted on the default exchange"));
        }
        self.binding(namespace, route.exchange, route.routing_key, route.args).await
    }

    /// Whether any queue of the namespace takes a message published to `topic` now
    /// (for `mandatory`, and the default exchange, which drops what it cannot route).
    pub async fn routable(&self, namespace: &str, topic: &str, message: &pb::Message) -> bool {
        self.fresh(|st| {
            let ns = st.namespaces.get(namespace)?;
            let any = ns.consumer_groups.values().any(|g| {
                let bindings = g.bindings.iter().filter(|b| b.topic == topic);
                matching::matches_any(bindings, &message.routing_key, &message.headers)
            });
            any.then_some(())
        })
        .await
        .is_some()
    }

    /// A channel's publisher: batches stored in the order they are handed in, as a
    /// gRPC publish of each would, several in flight (see [`InOrder`]).
    pub fn in_order(&self) -> InOrder {
        InOrder::new(self.segments.clone())
    }

    /// Subscribes to the queue's group wherever it runs; `get_one`: at most one
    /// message, and only if there is one now (`basic.get`); `exclusive`: as the
    /// queue's only consumer (refused with 403, as RabbitMQ does, while it has
    /// others; while it is there, other consumers are refused the same way).
    pub async fn consume(
        &self,
        namespace: &str,
        queue: &str,
        prefetch: u32,
        no_ack: bool,
        get_one: bool,
        exclusive: bool,
    ) -> Result<Relayed<pb::SubscribeResponse>, AmqpError> {
        if !self.queue_exists(namespace, queue).await {
            return Err(no_queue(namespace, queue));
        }
        match self.subscribe(namespace, queue, prefetch, no_ack, get_one, exclusive).await {
            Ok(s) => Ok(s),
            Err(e) if e.code == ErrorCode::ConsumerGroupInExclusiveUse => Err(AmqpError::channel(
                ACCESS_REFUSED,
                format!("queue '{queue}' in vhost '{}' in exclusive use", vhost(namespace)),
            )),
            Err(e) => Err(e.into()),
        }
    }

    /// [`Backend::consume`] without the local check, for consumers that subscribe
    /// again after their group moved.
    pub async fn subscribe(
        &self,
        namespace: &str,
        queue: &str,
        prefetch: u32,
        no_ack: bool,
        get_one: bool,
        exclusive: bool,
    ) -> Result<Relayed<pb::SubscribeResponse>, RequestError> {
        let req = pb::SubscribeRequest {
            namespace: namespace.to_string(),
            consumer_group: queue.to_string(),
            size: if get_one { 1 } else { prefetch },
            auto_ack: no_ack,
            do_not_block: get_one,
            max_messages: u64::from(get_one),
            exclusive,
        };
        self.groups.subscribe_anywhere(&self.peers, req, false).await
    }

    /// Acks (or returns, `!ack`) delivered messages of one queue.
    pub async fn settle(
        &self,
        namespace: String,
        queue: String,
        deliveries: Vec<(u64, u64)>,
        ack: bool,
    ) -> Result<(), RequestError> {
        let deliveries =
            deliveries.into_iter().map(|(segment_id, offset)| pb::Delivery { segment_id, offset }).collect();
        self.groups.settle_anywhere(&self.peers, namespace, queue, deliveries, ack, false).await
    }
}

/// (namespace, queue) of the exclusive queues that node `node_id` declared in a run
/// other than `run_id`.
fn earlier_runs(state: &ClusterState, node_id: u64, run_id: u64) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for (ns, namespace) in &state.namespaces {
        for (name, g) in &namespace.consumer_groups {
            if g.exclusive_owner.is_some_and(|o| o.node_id == node_id && o.run_id != run_id) {
                found.push((ns.clone(), name.clone()));
            }
        }
    }
    found
}

/// A consumer's `x-stream-offset`, as RabbitMQ streams take it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamOffset {
    /// `first`: from the oldest message kept.
    First,
    /// `next` and `last`: from now (what is published after `consume-ok`; `last`,
    /// the last chunk on a stream, has no counterpart: a topic has no chunks).
    Next,
    /// A timestamp: from what was stored at or after it (unix ms).
    At(i64),
    /// An interval string (`30s`, `10m`, `2h`, `7D`): from that long ago (ms).
    Ago(i64),
}

/// The consumer's `x-stream-offset` argument (`None` without one); 406 naming it for
/// a value that is not one of RabbitMQ's forms or is a numeric offset (a queue reads
/// the segments of several shards and topics: there is no one offset to start at).
pub fn stream_offset(args: &FieldTable) -> Result<Option<StreamOffset>, AmqpError> {
    let Some(v) = args.inner().get("x-stream-offset") else { return Ok(None) };
    let refused =
        |rule: &str| AmqpError::channel(PRECONDITION_FAILED, format!("consumer argument 'x-stream-offset': {rule}"));
    if let AMQPValue::Timestamp(seconds) = v {
        let ms = i64::try_from(*seconds)
            .ok()
            .and_then(|s| s.checked_mul(1000))
            .ok_or_else(|| refused("timestamp out of range"))?;
        return Ok(Some(StreamOffset::At(ms)));
    }
    if integer(v).is_some() {
        return Err(refused(
            "numeric offsets are not supported (a queue reads several segments, each with its own offsets); use \
             'first', 'next', a timestamp or an interval such as '1h'",
        ));
    }
    let Some(t) = text(v) else { return Err(refused("must be 'first', 'last', 'next', a timestamp or an interval")) };
    Ok(Some(match t.as_str() {
        "first" => StreamOffset::First,
        "last" | "next" => StreamOffset::Next,
        interval => {
            let (n, unit) = interval.split_at(interval.len().saturating_sub(1));
            let n: i64 = n.parse().ok().filter(|n| *n >= 0).ok_or_else(|| {
                refused(&format!(
                    "'{interval}' is not 'first', 'last', 'next' or an interval (a number and s, m, h or D)"
                ))
            })?;
            let unit_ms = match unit {
                "s" => 1_000,
                "m" => 60_000,
                "h" => 3_600_000,
                "D" => 86_400_000,
                _ => return Err(refused(&format!("'{interval}': the interval's unit is one of s, m, h, D"))),
            };
            StreamOffset::Ago(n.saturating_mul(unit_ms))
        }
    }))
}

/// 404 for a queue that does not exist.
/// 405 RESOURCE_LOCKED, as RabbitMQ answers a connection that uses another one's
/// exclusive queue.
pub fn locked_queue(namespace: &str, queue: &str) -> AmqpError {
    AmqpError::channel(
        RESOURCE_LOCKED,
        format!(
            "cannot obtain exclusive access to locked queue '{queue}' in vhost '{}': it is exclusive to another \
             connection, or the exclusive property does not match the queue's declaration",
            vhost(namespace)
        ),
    )
}

pub fn no_queue(namespace: &str, queue: &str) -> AmqpError {
    AmqpError::channel(NOT_FOUND, format!("no queue '{queue}' in vhost '{}'", vhost(namespace)))
}

/// A vhost that does not exist is refused at `connection.open`.
pub fn vhost_missing(vhost: &str, namespace: &str) -> AmqpError {
    AmqpError::connection(NOT_ALLOWED, format!("vhost '{vhost}' not found (no namespace \"{namespace}\")"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_consumer_counts_on_its_node_until_its_record_is_dropped() {
        let consumers = LocalConsumers::default();
        let a = consumers.counted("default", "q");
        let b = consumers.counted("default", "q");
        let other = consumers.counted("v", "q");
        assert_eq!((consumers.count("default", "q"), consumers.count("v", "q")), (2, 1));
        drop(a);
        assert_eq!(consumers.count("default", "q"), 1);
        drop((b, other));
        assert_eq!((consumers.count("default", "q"), consumers.count("v", "q")), (0, 0));
        assert!(lock(&consumers.0).is_empty(), "nothing kept for queues without consumers");
    }

    #[test]
    fn queue_arguments_are_checked_and_name_what_is_wrong() {
        let args = |pairs: &[(&str, AMQPValue)]| {
            let mut t = FieldTable::default();
            for (k, v) in pairs {
                t.insert((*k).into(), v.clone());
            }
            queue_arguments(&t)
        };
        let ok = args(&[
            ("x-message-ttl", AMQPValue::LongInt(1500)),
            ("x-max-length", AMQPValue::ShortInt(5)),
            ("x-max-length-bytes", AMQPValue::LongLongInt(1 << 20)),
            ("x-overflow", AMQPValue::LongString("drop-head".into())),
            ("x-dead-letter-exchange", AMQPValue::LongString("dlx".into())),
        ])
        .unwrap();
        assert_eq!(
            ok,
            QueueArguments {
                deliveries_max: 0,
                dead_letter_exchange: Some("dlx".into()),
                message_ttl_ms: 1500,
                ready_messages_max: 5,
                ready_bytes_max: 1 << 20,
                dead_letter_routing_key: String::new(),
            }
        );
        for (pairs, text) in [
            (vec![("x-message-ttl", AMQPValue::LongString("1000".into()))], "'x-message-ttl': must be an integer"),
            (vec![("x-message-ttl", AMQPValue::LongInt(-1))], "'x-message-ttl': -1 is out of range"),
            (vec![("x-message-ttl", AMQPValue::LongInt(0))], "'x-message-ttl': 0 is out of range"),
            (vec![("x-message-ttl", AMQPValue::LongLongInt(1 << 33))], "'x-message-ttl': 8589934592 is out of range"),
            (vec![("x-max-length", AMQPValue::LongInt(0))], "'x-max-length': 0 is out of range"),
            (vec![("x-max-length", AMQPValue::Boolean(true))], "'x-max-length': must be an integer"),
            (vec![("x-overflow", AMQPValue::LongString("reject-publish".into()))], "'reject-publish' is not supported"),
            (vec![("x-max-length-bytes", AMQPValue::LongInt(0))], "'x-max-length-bytes': 0 is out of range"),
            (
                vec![("x-max-length-bytes", AMQPValue::LongString("1k".into()))],
                "'x-max-length-bytes': must be an integer",
            ),
            (vec![("x-max-priority", AMQPValue::LongInt(10))], "'x-max-priority' is not supported"),
            (vec![("x-dead-letter-exchange", AMQPValue::LongString("".into()))], "needs x-dead-letter-routing-key"),
            (vec![("x-dead-letter-routing-key", AMQPValue::LongString("q".into()))], "needs x-dead-letter-exchange"),
        ] {
            let e = args(&pairs).unwrap_err();
            assert_eq!((e.scope, e.code), (super::super::error::Scope::Channel, PRECONDITION_FAILED));
            assert!(e.text.contains(text), "{} does not contain {text}", e.text);
        }
    }

    #[test]
    fn a_restarted_node_finds_the_exclusive_queues_of_its_earlier_runs() {
        let mut st = ClusterState::new_cluster();
        let owned = |node_id, run_id| ConsumerGroupSpec {
            size: 10,
            exclusive_owner: Some(ExclusiveOwner { node_id, run_id }),
            ..Default::default()
        };
        for (name, spec) in [
            ("earlier", owned(1, 5)),
            ("now", owned(1, 6)),
            ("other-node", owned(2, 5)),
            ("plain", ConsumerGroupSpec { size: 10, ..Default::default() }),
        ] {
            st.apply(&Command::CreateConsumerGroup { namespace: "default".into(), name: name.into(), spec }).unwrap();
        }
        assert_eq!(earlier_runs(&st, 1, 6), [("default".to_string(), "earlier".to_string())]);
        assert!(earlier_runs(&st, 3, 6).is_empty());
    }

    #[test]
    fn stream_offsets_take_rabbitmqs_forms_except_numeric_offsets() {
        let offset = |v: AMQPValue| {
            let mut t = FieldTable::default();
            t.insert("x-stream-offset".into(), v);
            stream_offset(&t)
        };
        let s = |t: &str| AMQPValue::LongString(t.into());
        assert_eq!(stream_offset(&FieldTable::default()), Ok(None));
        assert_eq!(offset(s("first")), Ok(Some(StreamOffset::First)));
        assert_eq!(offset(s("last")), Ok(Some(StreamOffset::Next)));
        assert_eq!(offset(s("next")), Ok(Some(StreamOffset::Next)));
        assert_eq!(offset(AMQPValue::Timestamp(1_700_000_000)), Ok(Some(StreamOffset::At(1_700_000_000_000))));
        assert_eq!(offset(s("90s")), Ok(Some(StreamOffset::Ago(90_000))));
        assert_eq!(offset(s("2h")), Ok(Some(StreamOffset::Ago(7_200_000))));
        assert_eq!(offset(s("7D")), Ok(Some(StreamOffset::Ago(604_800_000))));
        for (v, text) in [
            (AMQPValue::LongLongInt(5), "numeric offsets are not supported"),
            (s("soon"), "'soon' is not"),
            (s("3w"), "unit is one of s, m, h, D"),
            (s("-1h"), "'-1h' is not"),
            (AMQPValue::Boolean(true), "must be 'first'"),
        ] {
            let e = offset(v).unwrap_err();
            assert_eq!(e.code, PRECONDITION_FAILED);
            assert!(e.text.starts_with("consumer argument 'x-stream-offset': ") && e.text.contains(text), "{}", e.text);
        }
    }

    #[test]
    fn the_default_namespace_is_the_vhost_slash() {
        assert_eq!(vhost(DEFAULT_NAMESPACE), "/");
        assert_eq!(vhost(&namespace_of_vhost("/")), "/");
        assert_eq!(vhost(&namespace_of_vhost("/v")), "v");
    }
}
