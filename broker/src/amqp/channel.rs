//! Channels: their state (consumers, delivery tags, confirm mode, the message being
//! assembled) and the class methods on them. Everything here runs on the connection's
//! loop; what waits on the cluster for long (publishing, consuming) runs in tasks that
//! report back as connection events, so one slow publish never stalls a consumer.

use std::collections::BTreeMap;
use std::time::Duration;

use amq_protocol::frame::AMQPContentHeader;
use amq_protocol::protocol::{basic, channel, confirm, exchange, queue, tx, AMQPClass};
use eventtermq_proto::v1 as pb;
use futures::stream::FuturesOrdered;
use futures::StreamExt;
use prost::Message as _;
use rand::distr::{Alphanumeric, SampleString};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::backend::{exchange_of_topic, locked_queue, stream_offset, topic_of_exchange, Backend, Route};
use super::connection::{Conn, Event};
use super::convert;
use super::error::*;
use super::state::{Channel, Consumer, HeldPublish, HeldSettle, Pending, PublishJob, Settler, Tx, Unacked};
use crate::auth::Need;
use crate::budget::Share;
use crate::consumer_groups::stored;
use crate::error::{ErrorCode, RequestError};
use crate::peers::Relayed;

/// Pause before a consumer subscribes again after its group's node went away.
const RESUBSCRIBE_PAUSE: Duration = Duration::from_millis(200);

impl<S: AsyncRead + AsyncWrite + Send + 'static> Conn<S> {
    /// A method on channel `id` (not 0). A channel exception closes only the channel.
    pub(super) async fn channel_method(&mut self, id: u16, method: AMQPClass) -> Result<(), AmqpError> {
        if let AMQPClass::Channel(m) = &method {
            return self.channel_class(id, m.clone());
        }
        let Some(ch) = self.channels.get(&id) else {
            return Err(AmqpError::connection(CHANNEL_ERROR, format!("channel {id} is not open")).on(&method));
        };
        if ch.closing {
            return Ok(());
        }
        if ch.pending.is_some() {
            return Err(AmqpError::connection(
                UNEXPECTED_FRAME,
                "a method frame while a message's content was expected",
            )
            .on(&method));
        }
        let reply = match self.method(id, &method).await {
            Ok(reply) => reply,
            Err(e) => return self.fail_channel(id, e.on(&method)),
        };
        if let Some(reply) = reply {
            self.send(id, reply);
        }
        Ok(())
    }

    /// The method's answer (none for `nowait` and asynchronous methods).
    async fn method(&mut self, id: u16, method: &AMQPClass) -> Result<Option<AMQPClass>, AmqpError> {
        match method {
            AMQPClass::Exchange(m) => self.exchange_method(m).await,
            AMQPClass::Queue(m) => self.queue_method(id, m).await,
            AMQPClass::Basic(m) => self.basic_method(id, m).await,
            AMQPClass::Confirm(confirm::AMQPMethod::Select(s)) => {
                let ch = self.open_channel(id)?;
                if ch.tx.is_some() {
                    return Err(AmqpError::channel(PRECONDITION_FAILED, "cannot switch from tx to confirm mode"));
                }
                ch.next_confirm = ch.next_confirm.max(1);
                Ok((!s.nowait).then_some(AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(confirm::SelectOk {}))))
            }
            AMQPClass::Tx(m) => self.tx_method(id, m).await.map(Some),
            _ => Err(AmqpError::connection(COMMAND_INVALID, "method not expected from a client")),
        }
    }

    fn channel_class(&mut self, id: u16, m: channel::AMQPMethod) -> Result<(), AmqpError> {
        let method = AMQPClass::Channel(m.clone());
        match m {
            channel::AMQPMethod::Open(_) => {
                if self.channels.contains_key(&id) {
                    return Err(
                        AmqpError::connection(CHANNEL_ERROR, format!("channel {id} is already open")).on(&method)
                    );
                }
                if id > self.channel_max {
                    return Err(AmqpError::connection(
                        NOT_ALLOWED,
                        format!("channel {id} is above channel_max ({})", self.channel_max),
                    )
                    .on(&method));
                }
                self.channels.insert(id, Channel { next_tag: 1, ..Channel::default() });
                self.send(id, AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})));
            }
            channel::AMQPMethod::Close(_) => {
                if let Some(mut ch) = self.channels.remove(&id) {
                    ch.stop_all();
                    self.queues_lost_consumers(&ch);
                }
                self.send(id, AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})));
            }
            channel::AMQPMethod::CloseOk(_) => {
                if let Some(ch) = self.channels.remove(&id) {
                    self.queues_lost_consumers(&ch);
                }
            }
            channel::AMQPMethod::Flow(f) => {
                let ch = self.open_channel(id).map_err(|e| e.on(&method))?;
                if ch.closing {
                    return Ok(());
                }
                ch.flow_stopped.send_replace(!f.active);
                self.send(id, AMQPClass::Channel(channel::AMQPMethod::FlowOk(channel::FlowOk { active: f.active })));
                if f.active {
                    let held = std::mem::take(&mut self.open_channel(id)?.held_deliveries);
                    for (consumer, d) in held {
                        self.deliver(id, &consumer, d);
                    }
                }
            }
            _ => return Err(AmqpError::connection(COMMAND_INVALID, "method not expected from a client").on(&method)),
        }
        Ok(())
    }

    async fn exchange_method(&mut self, m: &exchange::AMQPMethod) -> Result<Option<AMQPClass>, AmqpError> {
        let ns = self.namespace.clone();
        match m {
            exchange::AMQPMethod::Declare(d) => {
                if !d.passive {
                    self.allow(Need::Configure { namespace: &ns, kind: "exchange", name: d.exchange.as_str() })?;
                }
                self.backend.declare_exchange(&ns, d.exchange.as_str(), d.kind.as_str(), d.passive).await?;
                Ok((!d.nowait).then_some(AMQPClass::Exchange(exchange::AMQPMethod::DeclareOk(exchange::DeclareOk {}))))
            }
            exchange::AMQPMethod::Delete(d) => {
                self.allow(Need::Configure { namespace: &ns, kind: "exchange", name: d.exchange.as_str() })?;
                self.backend.delete_exchange(&ns, d.exchange.as_str(), d.if_unused).await?;
                Ok((!d.nowait).then_some(AMQPClass::Exchange(exchange::AMQPMethod::DeleteOk(exchange::DeleteOk {}))))
            }
            exchange::AMQPMethod::Bind(_) | exchange::AMQPMethod::Unbind(_) => Err(AmqpError::connection(
                NOT_IMPLEMENTED,
                "exchange-to-exchange bindings are not supported; bind queues to exchanges",
            )),
            _ => Err(AmqpError::connection(COMMAND_INVALID, "method not expected from a client")),
        }
    }

    /// Whether the connection's user may do what `need` says; ACCESS_REFUSED (403)
    /// naming the user, the vhost and the permission otherwise.
    fn allow(&self, need: Need) -> Result<(), AmqpError> {
        self.backend.auth.authorize(&self.caller, &need).map_err(|e| {
            let text = format!("access refused in vhost '{}': {}", super::backend::vhost(&self.namespace), e.message);
            match e.code {
                // The user is gone (deleted since it logged in): the whole connection.
                ErrorCode::Unauthenticated => AmqpError::connection(ACCESS_REFUSED, text),
                _ => AmqpError::channel(ACCESS_REFUSED, text),
            }
        })
    }

    /// An empty queue name means the channel's last declared queue.
    fn queue_name(&mut self, id: u16, name: &str) -> Result<String, AmqpError> {
        let ch = self.open_channel(id)?;
        if !name.is_empty() {
            return Ok(name.to_string());
        }
        if ch.last_queue.is_empty() {
            return Err(AmqpError::channel(NOT_FOUND, "no queue name given and no queue declared on this channel"));
        }
        Ok(ch.last_queue.clone())
    }

    /// 405 RESOURCE_LOCKED when the queue is exclusive to another connection (as
    /// RabbitMQ answers declare, passive declare, bind, unbind, purge, delete,
    /// consume and get); a queue this connection declared exclusive is its own.
    async fn not_locked(&self, queue: &str) -> Result<(), AmqpError> {
        if self.exclusive.contains(queue) || !self.backend.queue_is_exclusive(&self.namespace, queue).await {
            return Ok(());
        }
        Err(locked_queue(&self.namespace, queue))
    }

    async fn queue_method(&mut self, id: u16, m: &queue::AMQPMethod) -> Result<Option<AMQPClass>, AmqpError> {
        let ns = self.namespace.clone();
        match m {
            queue::AMQPMethod::Declare(d) => self.declare_queue(id, d).await,
            queue::AMQPMethod::Bind(b) => {
                let q = self.queue_name(id, b.queue.as_str())?;
                self.allow(Need::Configure { namespace: &ns, kind: "queue", name: &q })?;
                self.not_locked(&q).await?;
                let route =
                    Route { exchange: b.exchange.as_str(), routing_key: b.routing_key.as_str(), args: &b.arguments };
                self.backend.bind(&ns, &q, route).await?;
                Ok((!b.nowait).then_some(AMQPClass::Queue(queue::AMQPMethod::BindOk(queue::BindOk {}))))
            }
            queue::AMQPMethod::Unbind(b) => {
                let q = self.queue_name(id, b.queue.as_str())?;
                self.allow(Need::Configure { namespace: &ns, kind: "queue", name: &q })?;
                self.not_locked(&q).await?;
                let route =
                    Route { exchange: b.exchange.as_str(), routing_key: b.routing_key.as_str(), args: &b.arguments };
                self.backend.unbind(&ns, &q, route).await?;
                Ok(Some(AMQPClass::Queue(queue::AMQPMethod::UnbindOk(queue::UnbindOk {}))))
            }
            queue::AMQPMethod::Delete(d) => {
                let q = self.queue_name(id, d.queue.as_str())?;
                self.allow(Need::Configure { namespace: &ns, kind: "queue", name: &q })?;
                self.not_locked(&q).await?;
                let deleted = self.backend.delete_queue_if(&ns, &q, d.if_unused, d.if_empty).await?;
                self.cancel_consumers_of(&q);
                let reply = queue::DeleteOk { message_count: count(deleted) };
                Ok((!d.nowait).then_some(AMQPClass::Queue(queue::AMQPMethod::DeleteOk(reply))))
            }
            queue::AMQPMethod::Purge(p) => {
                let q = self.queue_name(id, p.queue.as_str())?;
                self.allow(Need::Read { namespace: &ns, group: &q })?;
                self.not_locked(&q).await?;
                let purged = self.backend.purge_queue(&ns, &q).await?;
                let reply = queue::PurgeOk { message_count: count(purged) };
                Ok((!p.nowait).then_some(AMQPClass::Queue(queue::AMQPMethod::PurgeOk(reply))))
            }
            _ => Err(AmqpError::connection(COMMAND_INVALID, "method not expected from a client")),
        }
    }

    async fn declare_queue(&mut self, id: u16, d: &queue::Declare) -> Result<Option<AMQPClass>, AmqpError> {
        self.open_channel(id)?;
        let name = if d.queue.as_str().is_empty() && !d.passive {
            format!("amq.gen-{}", Alphanumeric.sample_string(&mut rand::rng(), 22))
        } else {
            self.queue_name(id, d.queue.as_str())?
        };
        let ns = self.namespace.clone();
        if !d.passive {
            self.allow(Need::Configure { namespace: &ns, kind: "queue", name: &name })?;
        }
        let created = self.backend.declare_queue(&ns, &name, d.passive, d.exclusive, &d.arguments).await?;
        if !created {
            // As RabbitMQ: another connection's exclusive queue is locked; a
            // non-passive declare must also ask for what the queue is (exclusive or
            // not), so no connection takes a shared queue as its own (and deletes it
            // when it closes).
            let exclusive = self.backend.queue_is_exclusive(&ns, &name).await;
            let others = exclusive && !self.exclusive.contains(&name);
            if others || (!d.passive && exclusive != d.exclusive) {
                return Err(locked_queue(&ns, &name));
            }
        }
        if d.exclusive && !d.passive {
            self.exclusive.insert(name.clone());
        }
        if d.auto_delete && !d.passive {
            self.auto_delete.insert(name.clone());
        }
        self.open_channel(id)?.last_queue = name.clone();
        let (message_count, consumer_count) = if created {
            (0, 0)
        } else {
            match self.backend.occupancy(&ns, &name).await {
                Some(o) => (count(o.ready), count(o.subscribers)),
                // The group's node cannot tell now: the consumers this node has.
                None => (0, count(self.backend.consumers.count(&ns, &name))),
            }
        };
        let reply = queue::DeclareOk { queue: name.into(), message_count, consumer_count };
        Ok((!d.nowait).then_some(AMQPClass::Queue(queue::AMQPMethod::DeclareOk(reply))))
    }

    async fn basic_method(&mut self, id: u16, m: &basic::AMQPMethod) -> Result<Option<AMQPClass>, AmqpError> {
        match m {
            basic::AMQPMethod::Qos(q) => {
                // amq-protocol drops prefetch_size (RabbitMQ does not implement it either).
                self.open_channel(id)?.prefetch = q.prefetch_count;
                Ok(Some(AMQPClass::Basic(basic::AMQPMethod::QosOk(basic::QosOk {}))))
            }
            basic::AMQPMethod::Publish(p) => {
                if p.immediate {
                    return Err(AmqpError::connection(NOT_IMPLEMENTED, "immediate=true is not supported"));
                }
                let ns = self.namespace.clone();
                self.allow(Need::Write { namespace: &ns, topic: topic_of_exchange(p.exchange.as_str()) })?;
                self.open_channel(id)?.pending = Some(Pending { publish: p.clone(), header: None, body: Vec::new() });
                Ok(None)
            }
            basic::AMQPMethod::Consume(c) => self.consume(id, c).await,
            basic::AMQPMethod::Cancel(c) => {
                self.cancel(id, c.consumer_tag.as_str());
                let reply = basic::CancelOk { consumer_tag: c.consumer_tag.clone() };
                Ok((!c.nowait).then_some(AMQPClass::Basic(basic::AMQPMethod::CancelOk(reply))))
            }
            basic::AMQPMethod::Get(g) => self.get(id, g).await,
            basic::AMQPMethod::Ack(a) => self.settle(id, a.delivery_tag, a.multiple, true, true).await.map(|_| None),
            basic::AMQPMethod::Nack(n) => {
                self.settle(id, n.delivery_tag, n.multiple, !n.requeue, true).await.map(|_| None)
            }
            // requeue=false drops the message (or dead-letters it); requeue=true
            // returns it for redelivery.
            basic::AMQPMethod::Reject(r) => {
                self.settle(id, r.delivery_tag, false, !r.requeue, true).await.map(|_| None)
            }
            basic::AMQPMethod::Recover(_) => {
                self.settle(id, 0, true, false, false).await?;
                Ok(Some(AMQPClass::Basic(basic::AMQPMethod::RecoverOk(basic::RecoverOk {}))))
            }
            basic::AMQPMethod::RecoverAsync(_) => self.settle(id, 0, true, false, false).await.map(|_| None),
            _ => Err(AmqpError::connection(COMMAND_INVALID, "method not expected from a client")),
        }
    }

    /// A content header: the message's size and properties.
    pub(super) async fn content_header(&mut self, id: u16, header: AMQPContentHeader) -> Result<(), AmqpError> {
        let max = self.backend.segments.settings().write_batch_max_bytes as u64;
        let ch = self.open_channel(id)?;
        if ch.closing {
            return Ok(());
        }
        let Some(p) = ch.pending.as_mut().filter(|p| p.header.is_none()) else {
            return Err(AmqpError::connection(UNEXPECTED_FRAME, "a content header without a basic.publish"));
        };
        if header.body_size > max {
            // The body frames still coming are dropped with the channel.
            let e = AmqpError::channel(
                PRECONDITION_FAILED,
                format!(
                    "message size {} is larger than the maximum of {max} bytes (--write-batch-max-bytes)",
                    header.body_size
                ),
            );
            return self.fail_channel(id, e);
        }
        let done = header.body_size == 0;
        p.body.reserve(header.body_size as usize);
        p.header = Some(header);
        if done {
            self.published(id).await?;
        }
        Ok(())
    }

    pub(super) async fn content_body(&mut self, id: u16, body: Vec<u8>) -> Result<(), AmqpError> {
        let ch = self.open_channel(id)?;
        if ch.closing {
            return Ok(());
        }
        let Some((p, size)) = ch.pending.as_mut().and_then(|p| p.header.as_ref().map(|h| h.body_size).map(|s| (p, s)))
        else {
            return Err(AmqpError::connection(UNEXPECTED_FRAME, "a content body without a content header"));
        };
        p.body.extend_from_slice(&body);
        if p.body.len() as u64 > size {
            return Err(AmqpError::connection(FRAME_ERROR, "content bodies longer than their header's body size"));
        }
        if p.body.len() as u64 == size {
            self.published(id).await?;
        }
        Ok(())
    }

    /// A complete message: checked for its exchange, returned if `mandatory` and no
    /// queue takes it, and handed to the channel's publisher.
    async fn published(&mut self, id: u16) -> Result<(), AmqpError> {
        let ch = self.open_channel(id)?;
        let Some(Pending { publish, header: Some(header), body }) = ch.pending.take() else { return Ok(()) };
        if let Some(e) = header.properties.expiration() {
            if let Err(rule) = stored::parse_expiration(e.as_str()) {
                let text = format!("invalid expiration '{}': the basic property 'expiration' {rule}", e.as_str());
                let e = AmqpError::channel(PRECONDITION_FAILED, text);
                return self.fail_channel(id, e.on(&AMQPClass::Basic(basic::AMQPMethod::Publish(publish))));
            }
        }
        let confirm = (ch.next_confirm > 0).then(|| {
            ch.next_confirm += 1;
            ch.next_confirm - 1
        });
        let exchange = publish.exchange.as_str();
        let message = convert::to_message(publish.routing_key.as_str(), &header.properties, body);
        let topic = topic_of_exchange(exchange).to_string();
        // The default exchange always exists; its topic comes with the first queue.
        if !exchange.is_empty() {
            if let Err(e) = self.backend.ensure_exchange(&self.namespace, exchange).await {
                return self.fail_channel(id, e.on(&AMQPClass::Basic(basic::AMQPMethod::Publish(publish))));
            }
        }
        if self.open_channel(id)?.tx.is_some() {
            return self.hold(id, HeldPublish { publish, topic, message });
        }
        let routable = self.backend.routable(&self.namespace, &topic, &message).await;
        if publish.mandatory && !routable {
            self.return_unroutable(id, &publish, &message);
        }
        // What the default exchange cannot route goes nowhere (as in RabbitMQ); a
        // named exchange is a topic, a log that keeps what is published to it.
        if !routable && exchange.is_empty() {
            if let Some(tag) = confirm {
                self.confirmed(id, tag, false, true);
            }
            return Ok(());
        }
        let job = PublishJob { namespace: self.namespace.clone(), topic, message, confirm, done: None };
        self.enqueue_publish(id, job).await
    }

    /// `basic.return` 312 NO_ROUTE with the message.
    fn return_unroutable(&mut self, id: u16, publish: &basic::Publish, message: &pb::Message) {
        let ret = basic::Return {
            reply_code: NO_ROUTE,
            reply_text: "NO_ROUTE".into(),
            exchange: publish.exchange.clone(),
            routing_key: publish.routing_key.clone(),
        };
        self.send(id, AMQPClass::Basic(basic::AMQPMethod::Return(ret)));
        codec_content(self, id, convert::to_properties(message), &message.data);
    }

    /// A transaction's message, held until `tx.commit` within the transaction's
    /// bounds (`--amqp-tx-messages-max`, `--amqp-tx-max-bytes`); beyond them the
    /// channel is closed (406) and the transaction dropped.
    fn hold(&mut self, id: u16, held: HeldPublish) -> Result<(), AmqpError> {
        let (messages_max, bytes_max) = (self.settings.tx_messages_max, self.settings.tx_max_bytes);
        let ch = self.open_channel(id)?;
        let Some(tx) = ch.tx.as_mut() else { return Ok(()) };
        let bytes = tx.bytes + held.message.data.len() as u64;
        let refused = if tx.publishes.len() >= messages_max {
            Some(format!(
                "a transaction holds at most {messages_max} messages (--amqp-tx-messages-max); commit more often"
            ))
        } else if bytes > bytes_max {
            Some(format!(
                "a transaction holds at most {bytes_max} bytes of message bodies (--amqp-tx-max-bytes); commit more \
                 often"
            ))
        } else {
            None
        };
        if let Some(text) = refused {
            let method = AMQPClass::Basic(basic::AMQPMethod::Publish(held.publish));
            return self.fail_channel(id, AmqpError::channel(PRECONDITION_FAILED, text).on(&method));
        }
        tx.bytes = bytes;
        tx.publishes.push(held);
        Ok(())
    }

    /// Hands the message to the channel's publisher task, with its share of the node's
    /// publish budget (`--publish-in-flight-max-bytes`, shared with gRPC clients),
    /// given back once the message is stored or failed. When the channel's publisher
    /// has `publishes_in_flight_max` waiting, or the node's budget is spent, this
    /// waits, and so does reading the connection: TCP pushes back on a client
    /// publishing faster than the topic takes.
    async fn enqueue_publish(&mut self, id: u16, job: PublishJob) -> Result<(), AmqpError> {
        let share = self.backend.budget.take(job.message.encoded_len()).await;
        let (backend, events, stop) = (self.backend.clone(), self.events.clone(), self.node_stop.clone());
        let caller = self.caller.clone();
        let in_flight = self.settings.publishes_in_flight_max;
        let batches = self.settings.publish_batches_in_flight_max;
        let ch = self.open_channel(id)?;
        let tx = ch
            .publisher
            .get_or_insert_with(|| {
                let (tx, rx) = mpsc::channel(in_flight);
                let publisher = run_publisher(backend, id, rx, events, (in_flight, batches), stop);
                tokio::spawn(crate::peers::CALLER.scope(caller, publisher));
                tx
            })
            .clone();
        let _ = tx.send((job, share)).await;
        Ok(())
    }

    /// A confirm: `multiple` covers every tag up to `tag`.
    pub(super) fn confirmed(&mut self, id: u16, tag: u64, multiple: bool, stored: bool) {
        let method = if stored {
            basic::AMQPMethod::Ack(basic::Ack { delivery_tag: tag, multiple })
        } else {
            basic::AMQPMethod::Nack(basic::Nack { delivery_tag: tag, multiple, requeue: false })
        };
        if self.channels.get(&id).is_some_and(|c| !c.closing) {
            self.send(id, AMQPClass::Basic(method));
        }
    }

    /// With `x-stream-offset` the consumer reads a private group with the queue's
    /// bindings from that point (see `Backend::declare_replay`), deleted with it.
    async fn consume(&mut self, id: u16, c: &basic::Consume) -> Result<Option<AMQPClass>, AmqpError> {
        let mut queue = self.queue_name(id, c.queue.as_str())?;
        let ns = self.namespace.clone();
        // The queue itself first: no replay group is made for a caller who may not
        // read it (the replay's own group is checked below, as every node checks it).
        self.allow(Need::Read { namespace: &ns, group: &queue })?;
        self.not_locked(&queue).await?;
        if let Some(offset) = stream_offset(&c.arguments)? {
            let since = self.backend.stream_offset_since(offset);
            queue = self.backend.declare_replay(&self.namespace, &queue, since).await?;
            self.exclusive.insert(queue.clone());
            self.auto_delete.insert(queue.clone());
        }
        let tag = match c.consumer_tag.as_str() {
            "" => format!("amq.ctag-{}", Alphanumeric.sample_string(&mut rand::rng(), 22)),
            t => t.to_string(),
        };
        self.allow(Need::Read { namespace: &ns, group: &queue })?;
        let ch = self.open_channel(id)?;
        if ch.consumers.contains_key(&tag) {
            return Err(AmqpError::connection(NOT_ALLOWED, format!("attempt to reuse consumer tag '{tag}'")));
        }
        let prefetch = u32::from(ch.prefetch);
        let flow_stopped = ch.flow_stopped.subscribe();
        let stream = self.backend.consume(&self.namespace, &queue, prefetch, c.no_ack, false, c.exclusive).await?;
        let stop = self.stop.child_token();
        let consumer = ConsumerTask {
            backend: self.backend.clone(),
            namespace: self.namespace.clone(),
            queue: queue.clone(),
            prefetch,
            no_ack: c.no_ack,
            exclusive: c.exclusive,
            channel: id,
            tag: tag.clone(),
            events: self.events.clone(),
            stop: stop.clone(),
            flow_stopped,
        };
        tokio::spawn(crate::peers::CALLER.scope(self.caller.clone(), consumer.run(stream)));
        let _counted = self.backend.consumers.counted(&self.namespace, &queue);
        let ch = self.open_channel(id)?;
        ch.consumers.insert(tag.clone(), Consumer { queue, no_ack: c.no_ack, stop, _counted });
        let reply = basic::ConsumeOk { consumer_tag: tag.into() };
        Ok((!c.nowait).then_some(AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(reply))))
    }

    fn cancel(&mut self, id: u16, tag: &str) {
        let Some(ch) = self.channels.get_mut(&id) else { return };
        if let Some(c) = ch.consumers.remove(tag) {
            c.stop.cancel();
            self.maybe_auto_delete(&c.queue);
        }
    }

    /// Deletes an auto-delete queue this connection declared once it has no consumer
    /// on this connection left.
    fn maybe_auto_delete(&mut self, queue: &str) {
        let used = self.channels.values().any(|ch| ch.consumers.values().any(|c| c.queue == queue));
        if used || !self.auto_delete.remove(queue) {
            return;
        }
        let (backend, ns, queue) = (self.backend.clone(), self.namespace.clone(), queue.to_string());
        tokio::spawn(crate::peers::CALLER.scope(self.caller.clone(), async move {
            if let Err(e) = backend.delete_queue(&ns, &queue).await {
                tracing::warn!(namespace = %ns, queue, error = %e.text, "cannot delete an auto-delete queue");
            }
        }));
    }

    fn queues_lost_consumers(&mut self, ch: &Channel) {
        let queues: Vec<String> = ch.consumers.values().map(|c| c.queue.clone()).collect();
        for q in queues {
            self.maybe_auto_delete(&q);
        }
    }

    /// The queue is gone: its consumers here are cancelled, and their clients told.
    fn cancel_consumers_of(&mut self, queue: &str) {
        let mut told = Vec::new();
        for (id, ch) in self.channels.iter_mut() {
            ch.consumers.retain(|tag, c| {
                if c.queue != queue {
                    return true;
                }
                c.stop.cancel();
                told.push((*id, tag.clone()));
                false
            });
        }
        for (id, tag) in told {
            let cancel = basic::Cancel { consumer_tag: tag.into(), nowait: true };
            self.send(id, AMQPClass::Basic(basic::AMQPMethod::Cancel(cancel)));
        }
    }

    pub(super) fn consumer_ended(&mut self, id: u16, tag: &str) {
        let Some(ch) = self.channels.get_mut(&id) else { return };
        if ch.consumers.remove(tag).is_some() {
            let cancel = basic::Cancel { consumer_tag: tag.into(), nowait: true };
            self.send(id, AMQPClass::Basic(basic::AMQPMethod::Cancel(cancel)));
        }
    }

    /// A message for one of the channel's consumers: tagged and written.
    /// While the client stopped the channel's flow it is held until it asks again.
    pub(super) fn deliver(&mut self, id: u16, tag: &str, d: pb::SubscribeResponse) {
        let Some(ch) = self.channels.get_mut(&id).filter(|c| !c.closing) else { return };
        let Some(consumer) = ch.consumers.get(tag) else { return };
        if *ch.flow_stopped.borrow() {
            ch.held_deliveries.push((tag.to_string(), d));
            return;
        }
        let delivery_tag = ch.next_tag;
        ch.next_tag += 1;
        if !consumer.no_ack {
            let queue = consumer.queue.clone();
            ch.unacked.insert(delivery_tag, Unacked { queue, segment_id: d.segment_id, offset: d.offset });
        }
        let message = d.message.unwrap_or_default();
        let deliver = basic::Deliver {
            consumer_tag: tag.into(),
            delivery_tag,
            redelivered: d.redelivered,
            exchange: exchange_of_topic(&d.topic).into(),
            routing_key: message.routing_key.as_str().into(),
        };
        self.send(id, AMQPClass::Basic(basic::AMQPMethod::Deliver(deliver)));
        codec_content(self, id, convert::to_properties(&message), &message.data);
    }

    /// `basic.get`: one message if the queue has one now.
    async fn get(&mut self, id: u16, g: &basic::Get) -> Result<Option<AMQPClass>, AmqpError> {
        let queue = self.queue_name(id, g.queue.as_str())?;
        let ns = self.namespace.clone();
        self.allow(Need::Read { namespace: &ns, group: &queue })?;
        self.not_locked(&queue).await?;
        let mut stream = self.backend.consume(&self.namespace, &queue, 1, g.no_ack, true, false).await?;
        let first = tokio::time::timeout(self.backend.cluster.request_timeout(), stream.next()).await;
        let d = match first {
            Ok(Some(Ok(d))) => d,
            Ok(Some(Err(e))) => return Err(e.into()),
            Ok(None) | Err(_) => return Ok(Some(AMQPClass::Basic(basic::AMQPMethod::GetEmpty(basic::GetEmpty {})))),
        };
        // What is left ready after this one, as declare-ok counts it (0 when the
        // group's node cannot tell now).
        let ns = self.namespace.clone();
        let left = self.backend.occupancy(&ns, &queue).await.map_or(0, |o| count(o.ready));
        let ch = self.open_channel(id)?;
        let delivery_tag = ch.next_tag;
        ch.next_tag += 1;
        if !g.no_ack {
            ch.unacked.insert(delivery_tag, Unacked { queue, segment_id: d.segment_id, offset: d.offset });
            // The subscription must outlive the ack or the message goes back: it ends
            // once the message is settled (its stream then ends by itself).
            tokio::spawn(
                crate::peers::CALLER.scope(self.caller.clone(), async move { while stream.next().await.is_some() {} }),
            );
        }
        let message = d.message.unwrap_or_default();
        let ok = basic::GetOk {
            delivery_tag,
            redelivered: d.redelivered,
            exchange: exchange_of_topic(&d.topic).into(),
            routing_key: message.routing_key.as_str().into(),
            message_count: left,
        };
        self.send(id, AMQPClass::Basic(basic::AMQPMethod::GetOk(ok)));
        codec_content(self, id, convert::to_properties(&message), &message.data);
        Ok(None)
    }

    /// Acks (`ack`) or returns deliveries up to `tag` (`multiple`; 0 with `multiple`:
    /// all), or just `tag`. An unknown tag is the channel's error, as in RabbitMQ.
    /// In a transaction (`tx.select`) they leave the channel's unacknowledged ones
    /// at once but are applied at `tx.commit` (`in_tx`; `basic.recover` is not).
    /// Otherwise they go to the channel's settler (see [`run_settler`]), which sends
    /// those that queued together as one call per queue; when it has
    /// `settles_queued_max` waiting, this waits, and so does reading the connection.
    async fn settle(&mut self, id: u16, tag: u64, multiple: bool, ack: bool, in_tx: bool) -> Result<(), AmqpError> {
        let (backend, ns, caller) = (self.backend.clone(), self.namespace.clone(), self.caller.clone());
        let queued_max = self.settings.settles_queued_max;
        let ch = self.open_channel(id)?;
        let settled: Vec<(u64, Unacked)> = if multiple {
            let keys: Vec<u64> = ch.unacked.keys().copied().filter(|t| tag == 0 || *t <= tag).collect();
            keys.into_iter().filter_map(|t| ch.unacked.remove(&t).map(|u| (t, u))).collect()
        } else {
            match ch.unacked.remove(&tag) {
                Some(u) => vec![(tag, u)],
                None => return Err(AmqpError::channel(PRECONDITION_FAILED, format!("unknown delivery tag {tag}"))),
            }
        };
        if let Some(tx) = ch.tx.as_mut().filter(|_| in_tx) {
            tx.settles.push(HeldSettle { deliveries: settled, ack });
            return Ok(());
        }
        if settled.is_empty() {
            return Ok(());
        }
        let settler = ch
            .settler
            .get_or_insert_with(|| {
                let (tx, rx) = mpsc::channel(queued_max);
                let (drained_tx, drained) = oneshot::channel::<()>();
                let settler = async move {
                    run_settler(backend, ns, rx, queued_max).await;
                    drop(drained_tx);
                };
                tokio::spawn(crate::peers::CALLER.scope(caller, settler));
                Settler { tx, drained }
            })
            .tx
            .clone();
        let _ = settler.send(HeldSettle { deliveries: settled, ack }).await;
        Ok(())
    }

    /// `tx.select`, `tx.commit`, `tx.rollback`, as RabbitMQ answers them.
    async fn tx_method(&mut self, id: u16, m: &tx::AMQPMethod) -> Result<AMQPClass, AmqpError> {
        let ch = self.open_channel(id)?;
        match m {
            tx::AMQPMethod::Select(_) => {
                if ch.next_confirm > 0 {
                    return Err(AmqpError::channel(PRECONDITION_FAILED, "cannot switch from confirm to tx mode"));
                }
                ch.tx.get_or_insert_with(Tx::default);
                Ok(AMQPClass::Tx(tx::AMQPMethod::SelectOk(tx::SelectOk {})))
            }
            tx::AMQPMethod::Rollback(_) => {
                let Some(held) = ch.tx.replace(Tx::default()) else {
                    return Err(not_transactional());
                };
                // Settled in the transaction: the client's to settle again.
                for s in held.settles {
                    ch.unacked.extend(s.deliveries);
                }
                Ok(AMQPClass::Tx(tx::AMQPMethod::RollbackOk(tx::RollbackOk {})))
            }
            tx::AMQPMethod::Commit(_) => {
                let Some(held) = ch.tx.replace(Tx::default()) else {
                    return Err(not_transactional());
                };
                self.commit(id, held).await?;
                Ok(AMQPClass::Tx(tx::AMQPMethod::CommitOk(tx::CommitOk {})))
            }
            _ => Err(AmqpError::connection(COMMAND_INVALID, "method not expected from a client")),
        }
    }

    /// Applies a transaction: its messages are routed (returned when `mandatory` and
    /// no queue takes them) and stored through the channel's publisher, after what
    /// the channel published before, and waited for (stored as confirmed ones are);
    /// then its acks, nacks and rejects are applied and waited for. A message that
    /// could not be stored (or a settlement that failed) fails the commit with 406
    /// `partial tx completion`, as RabbitMQ's does: what was stored stays stored.
    async fn commit(&mut self, id: u16, held: Tx) -> Result<(), AmqpError> {
        let total = held.publishes.len();
        let mut waits = Vec::with_capacity(total);
        for HeldPublish { publish, topic, message } in held.publishes {
            let routable = self.backend.routable(&self.namespace, &topic, &message).await;
            if publish.mandatory && !routable {
                self.return_unroutable(id, &publish, &message);
            }
            if !routable && publish.exchange.as_str().is_empty() {
                continue;
            }
            let (done, wait) = oneshot::channel();
            let job = PublishJob { namespace: self.namespace.clone(), topic, message, confirm: None, done: Some(done) };
            self.enqueue_publish(id, job).await?;
            waits.push(wait);
        }
        let (mut failed, mut why) = (0, String::new());
        for wait in waits {
            let e = match wait.await {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e.message,
                Err(_) => "the node is stopping".to_string(),
            };
            failed += 1;
            if why.is_empty() {
                why = e;
            }
        }
        let mut settle_failed = None;
        for s in held.settles {
            for (queue, deliveries) in by_queue(s.deliveries) {
                let r = self.backend.settle(self.namespace.clone(), queue.clone(), deliveries, s.ack).await;
                if let Err(e) = r {
                    settle_failed.get_or_insert(format!("queue '{queue}': {}", e.message));
                }
            }
        }
        if failed > 0 {
            return Err(AmqpError::channel(
                PRECONDITION_FAILED,
                format!("partial tx completion: {failed} of {total} messages could not be stored ({why})"),
            ));
        }
        if let Some(why) = settle_failed {
            return Err(AmqpError::channel(
                PRECONDITION_FAILED,
                format!(
                    "partial tx completion: an acknowledgement could not be applied ({why}); those messages come again"
                ),
            ));
        }
        Ok(())
    }
}

fn not_transactional() -> AmqpError {
    AmqpError::channel(PRECONDITION_FAILED, "channel is not transactional")
}

/// Settled deliveries as `(segment, offset)` per queue.
fn by_queue(settled: Vec<(u64, Unacked)>) -> BTreeMap<String, Vec<(u64, u64)>> {
    let mut by_queue: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::new();
    for (_, u) in settled {
        by_queue.entry(u.queue).or_default().push((u.segment_id, u.offset));
    }
    by_queue
}

/// A count as AMQP's 32-bit fields carry it.
fn count(n: u64) -> u32 {
    n.min(u64::from(u32::MAX)) as u32
}

fn codec_content<S>(conn: &mut Conn<S>, id: u16, properties: basic::AMQPProperties, body: &[u8]) {
    super::codec::content(id, properties, body, conn.frame_max_bytes, &mut conn.out);
}

/// Applies one channel's acks, nacks and rejects in the order they came: what queued
/// while the previous call was in flight (at most `batch_max` of them) goes together,
/// as one call per run of acks or returns and queue, so a client acking message by
/// message costs a call per batch, not per message. Ends once the channel dropped its
/// sender and everything queued was applied.
async fn run_settler(backend: Backend, namespace: String, mut rx: mpsc::Receiver<HeldSettle>, batch_max: usize) {
    while let Some(first) = rx.recv().await {
        let mut settles = vec![first];
        while settles.len() < batch_max.max(1) {
            match rx.try_recv() {
                Ok(s) => settles.push(s),
                Err(_) => break,
            }
        }
        for (ack, deliveries) in settle_runs(settles) {
            for (queue, deliveries) in by_queue(deliveries) {
                if let Err(e) = backend.settle(namespace.clone(), queue.clone(), deliveries, ack).await {
                    tracing::debug!(queue, error = %e, "AMQP settle failed (the messages come again)");
                }
            }
        }
    }
}

/// Consecutive settles of one kind (ack or return) merged, in order.
fn settle_runs(settles: Vec<HeldSettle>) -> Vec<(bool, Vec<(u64, Unacked)>)> {
    let mut runs: Vec<(bool, Vec<(u64, Unacked)>)> = Vec::new();
    for s in settles {
        match runs.last_mut() {
            Some((ack, deliveries)) if *ack == s.ack => deliveries.extend(s.deliveries),
            _ => runs.push((s.ack, s.deliveries)),
        }
    }
    runs
}

/// A batch of a channel's messages, stored or not; what the publisher reports.
struct BatchDone {
    confirms: Vec<u64>,
    done: Vec<oneshot::Sender<Result<(), RequestError>>>,
    result: Result<(), RequestError>,
    /// The batch's shares of the publish budget, given back once it is reported.
    _shares: Vec<Share>,
}

/// Publishes one channel's messages in order: batches of what queued (consecutive
/// messages to one topic and routing key, at most `batch_max` of them), up to
/// `batches_max` of them in flight at once, through the channel's
/// [`crate::replication::in_order::InOrder`]: a batch is routed only once the one
/// before it is queued at its primary here, or sent on the channel's stream to the
/// primary's node, so a channel's messages keep their order through any node.
/// Confirms go out in batch order.
async fn run_publisher(
    backend: Backend,
    channel: u16,
    mut rx: mpsc::Receiver<(PublishJob, Share)>,
    events: mpsc::Sender<Event>,
    (batch_max, batches_max): (usize, usize),
    stop: CancellationToken,
) {
    let mut carried: Option<(PublishJob, Share)> = None;
    let mut open = true;
    let mut in_flight = FuturesOrdered::new();
    let mut publisher = backend.in_order();
    loop {
        let room = in_flight.len() < batches_max.max(1);
        let first = if room && carried.is_some() {
            carried.take()
        } else if room && open {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                    report(channel, &events, done).await;
                    continue;
                }
                job = rx.recv() => job,
            }
        } else if !in_flight.is_empty() {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                Some(done) = in_flight.next() => report(channel, &events, done).await,
            }
            continue;
        } else {
            return;
        };
        let Some(first) = first else {
            open = false;
            continue;
        };
        let mut batch = vec![first];
        while batch.len() < batch_max.max(1) {
            match rx.try_recv() {
                // One topic and one routing key a batch: a key's messages go to its
                // shard (see `shard_of`), which the whole request goes to.
                Ok(job)
                    if job.0.topic == batch[0].0.topic
                        && job.0.message.routing_key == batch[0].0.message.routing_key =>
                {
                    batch.push(job)
                }
                Ok(job) => {
                    carried = Some(job);
                    break;
                }
                Err(_) => break,
            }
        }
        let (namespace, topic) = (batch[0].0.namespace.clone(), batch[0].0.topic.clone());
        let confirms: Vec<u64> = batch.iter().filter_map(|(j, _)| j.confirm).collect();
        let (mut done, mut shares) = (Vec::new(), Vec::with_capacity(batch.len()));
        let messages: Vec<pb::Message> = batch
            .into_iter()
            .map(|(j, share)| {
                done.extend(j.done);
                shares.push(share);
                j.message
            })
            .collect();
        let publish = publisher.publish(namespace, topic.clone(), messages, pb::Persistence::Default);
        in_flight.push_back(async move {
            let result = publish.await.map(|_| ());
            if let Err(e) = &result {
                tracing::debug!(topic, error = %e, "AMQP publish failed");
            }
            BatchDone { confirms, done, result, _shares: shares }
        });
    }
}

/// Tells a stored (or failed) batch's waiters, and its client with one confirm:
/// `multiple` up to its last tag (every tag below it was confirmed before: batches
/// report in order).
async fn report(channel: u16, events: &mpsc::Sender<Event>, b: BatchDone) {
    for d in b.done {
        let _ = d.send(b.result.clone());
    }
    // A connection that is gone gets no confirms; its messages are stored all the same.
    if let Some(&tag) = b.confirms.last() {
        let multiple = b.confirms.len() > 1;
        let _ = events.send(Event::Confirmed { channel, tag, multiple, ok: b.result.is_ok() }).await;
    }
}

/// One `basic.consume`: moves the subscription's messages to the connection, and
/// subscribes again when the group's node went away (its unacknowledged messages come
/// again, to this consumer or another).
struct ConsumerTask {
    backend: Backend,
    namespace: String,
    queue: String,
    prefetch: u32,
    no_ack: bool,
    exclusive: bool,
    channel: u16,
    tag: String,
    events: mpsc::Sender<Event>,
    stop: CancellationToken,
    /// The channel's `channel.flow`: no message is taken from the subscription while
    /// the client asked for none (the group holds them, within the consumer's window).
    flow_stopped: watch::Receiver<bool>,
}

/// Errors after which a consumer subscribes again: the cluster could not serve the
/// subscription just now (5xxx: no leader, timeout, a node unreachable).
fn resubscribable(e: &RequestError) -> bool {
    (5000..6000).contains(&(e.code as u32))
}

impl ConsumerTask {
    async fn run(mut self, mut stream: Relayed<pb::SubscribeResponse>) {
        loop {
            let Some(e) = self.forward(&mut stream).await else { return };
            if !resubscribable(&e) {
                return self.ended().await;
            }
            loop {
                tokio::select! {
                    biased;
                    _ = self.stop.cancelled() => return,
                    _ = tokio::time::sleep(RESUBSCRIBE_PAUSE) => {}
                }
                let (ns, queue) = (&self.namespace, &self.queue);
                match self.backend.subscribe(ns, queue, self.prefetch, self.no_ack, false, self.exclusive).await {
                    Ok(s) => {
                        stream = s;
                        break;
                    }
                    Err(e) if resubscribable(&e) => continue,
                    Err(_) => return self.ended().await,
                }
            }
        }
    }

    /// The queue is gone: the client gets a `basic.cancel`.
    async fn ended(&self) {
        let (channel, consumer) = (self.channel, self.tag.clone());
        let _ = self.events.send(Event::ConsumerEnded { channel, consumer }).await;
    }

    /// Forwards until the stream ends: `None` when stopped, else why it ended (a
    /// stream that just ends, as when the group moves to another node, is retried).
    async fn forward(&mut self, stream: &mut Relayed<pb::SubscribeResponse>) -> Option<RequestError> {
        loop {
            let flowing = tokio::select! {
                biased;
                _ = self.stop.cancelled() => return None,
                r = self.flow_stopped.wait_for(|stopped| !stopped) => r.is_ok(),
            };
            if !flowing {
                return None; // the channel is gone
            }
            let item = tokio::select! {
                biased;
                _ = self.stop.cancelled() => return None,
                item = stream.next() => item,
            };
            match item {
                Some(Ok(d)) => {
                    let message = Box::new(d);
                    let event = Event::Delivery { channel: self.channel, consumer: self.tag.clone(), message };
                    if self.events.send(event).await.is_err() {
                        return None;
                    }
                }
                Some(Err(e)) => return Some(e),
                None => return Some(RequestError::new(ErrorCode::NotReady, "the subscription ended")),
            }
        }
    }
}
