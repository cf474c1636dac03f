//! A channel's state, owned by its connection's loop (see `connection.rs`); the
//! methods that change it are in `channel.rs`.

use std::collections::{BTreeMap, HashMap};

use amq_protocol::frame::AMQPContentHeader;
use amq_protocol::protocol::basic;
use eventtermq_proto::v1 as pb;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::budget::Share;

/// A publish waiting for its body.
pub(super) struct Pending {
    pub(super) publish: basic::Publish,
    pub(super) header: Option<AMQPContentHeader>,
    pub(super) body: Vec<u8>,
}

pub(super) struct Consumer {
    pub(super) queue: String,
    pub(super) no_ack: bool,
    pub(super) stop: CancellationToken,
    /// Counts it among the node's consumers while it is recorded here.
    pub(super) _counted: super::backend::Counted,
}

/// A delivery the client has not settled yet.
pub(super) struct Unacked {
    pub(super) queue: String,
    pub(super) segment_id: u64,
    pub(super) offset: u64,
}

/// One open channel.
#[derive(Default)]
pub(super) struct Channel {
    /// A channel exception was sent: everything but `close`/`close-ok` is dropped.
    pub(super) closing: bool,
    pub(super) prefetch: u16,
    /// Publisher confirms: the sequence number of the next publish (0: not selected).
    pub(super) next_confirm: u64,
    pub(super) pending: Option<Pending>,
    pub(super) publisher: Option<mpsc::Sender<(PublishJob, Share)>>,
    /// Acks, nacks and rejects on their way to the queues' groups (see `run_settler`).
    pub(super) settler: Option<Settler>,
    pub(super) consumers: HashMap<String, Consumer>,
    pub(super) next_tag: u64,
    pub(super) unacked: BTreeMap<u64, Unacked>,
    /// The queue declared last: what an empty queue name means (AMQP 0.9.1).
    pub(super) last_queue: String,
    /// `tx.select` was sent: publishes and settlements wait here for `tx.commit`.
    pub(super) tx: Option<Tx>,
    /// `channel.flow`: `true` while the client asked to get no deliveries; the
    /// channel's consumer tasks wait while it is (see `ConsumerTask`).
    pub(super) flow_stopped: watch::Sender<bool>,
    /// Deliveries that reached the connection after `channel.flow` active=false (they
    /// were on their way): sent when the client asks for deliveries again.
    pub(super) held_deliveries: Vec<(String, pb::SubscribeResponse)>,
}

/// What a transactional channel holds until `tx.commit` (dropped by `tx.rollback`).
#[derive(Default)]
pub(super) struct Tx {
    pub(super) publishes: Vec<HeldPublish>,
    /// The held publishes' body bytes.
    pub(super) bytes: u64,
    /// Acks, nacks and rejects, in order; their deliveries left `Channel::unacked`
    /// (a rollback puts them back: still the client's to settle, as in RabbitMQ).
    pub(super) settles: Vec<HeldSettle>,
}

/// A complete `basic.publish` of a transaction: its exchange exists (checked when
/// it came); routing and `mandatory` are decided at commit, as RabbitMQ does.
pub(super) struct HeldPublish {
    pub(super) publish: basic::Publish,
    pub(super) topic: String,
    pub(super) message: pb::Message,
}

/// An ack (`ack`) or a return (nack/reject), held by a transaction or queued to the
/// channel's settler.
pub(super) struct HeldSettle {
    pub(super) deliveries: Vec<(u64, Unacked)>,
    pub(super) ack: bool,
}

/// A channel's settler task: its queue, and a receiver that ends when the task ended
/// (everything queued was applied).
pub(super) struct Settler {
    pub(super) tx: mpsc::Sender<HeldSettle>,
    pub(super) drained: oneshot::Receiver<()>,
}

impl Channel {
    /// Stops the channel's consumers and publisher; unsettled deliveries go back to
    /// their queues when the subscriptions end. Acks queued still go, and the
    /// subscriptions end only after them (else a message acked just before the close
    /// would come again).
    pub(super) fn stop_all(&mut self) {
        let stops: Vec<CancellationToken> = self.consumers.values().map(|c| c.stop.clone()).collect();
        self.consumers.clear();
        match self.settler.take() {
            Some(Settler { tx, drained }) => {
                drop(tx);
                tokio::spawn(async move {
                    let _ = drained.await;
                    stops.iter().for_each(CancellationToken::cancel);
                });
            }
            None => stops.iter().for_each(CancellationToken::cancel),
        }
        self.publisher = None;
        self.pending = None;
        self.held_deliveries.clear();
    }
}

/// One message on its way to a topic.
pub(super) struct PublishJob {
    pub(super) namespace: String,
    pub(super) topic: String,
    pub(super) message: pb::Message,
    /// The confirm sequence number, in confirm mode.
    pub(super) confirm: Option<u64>,
    /// Told whether the message was stored (a transaction's messages, at commit).
    pub(super) done: Option<oneshot::Sender<Result<(), crate::error::RequestError>>>,
}
