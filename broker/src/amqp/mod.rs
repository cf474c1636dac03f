//! AMQP 0.9.1 on `--amqp-port`, so RabbitMQ clients and tools work unchanged.
//!
//! Every node serves every request, as gRPC does: publishes go to the topic's
//! primary and subscriptions to the group's node through the same paths the gRPC
//! API uses. The model maps onto EventterMQ's (see [`backend`]): virtual host ↔
//! namespace, exchange ↔ topic, queue ↔ consumer group, binding ↔ group binding.
//!
//! - [`codec`]: frames on the wire (amq-protocol's encoding), `frame_max` enforced
//!   before a frame is read.
//! - [`connection`]: the handshake and the connection's loop, which owns all channel
//!   state; consumers and publishers run as tasks that report back to it as events.
//! - [`channel`]: channel, exchange, queue, basic and confirm methods.
//! - [`convert`]: AMQP content to the stored message and back.
//! - [`error`]: AMQP exceptions and the broker's errors mapped onto them.

pub mod backend;
mod channel;
pub mod codec;
mod connection;
pub mod convert;
pub mod error;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub use backend::Backend;

use crate::transport::Incoming;

/// The AMQP listener's limits.
#[derive(Debug, Clone)]
pub struct AmqpSettings {
    /// Largest frame, offered in `connection.tune` (a client may ask for less).
    pub frame_max_bytes: u32,
    /// Highest channel number, offered in `connection.tune`.
    pub channel_max: u16,
    /// Heartbeat interval offered in `connection.tune` (0: none); a client silent for
    /// two intervals is disconnected.
    pub heartbeat_s: u16,
    /// Time a client has from connecting to `connection.open-ok`.
    pub handshake_timeout: Duration,
    /// Publishes of one channel queued at once (and the most stored in one request;
    /// a channel has one request in flight, which keeps its order); more wait, and so
    /// does reading that connection.
    pub publishes_in_flight_max: usize,
    /// Open connections at most; more are closed as they arrive.
    pub connections_max: usize,
}

impl Default for AmqpSettings {
    fn default() -> Self {
        Self {
            frame_max_bytes: 128 * 1024,
            channel_max: 2047,
            heartbeat_s: 60,
            handshake_timeout: Duration::from_secs(10),
            publishes_in_flight_max: 256,
            connections_max: 10_000,
        }
    }
}

/// Accepts AMQP connections until `stop`.
pub async fn serve(backend: Backend, mut incoming: Incoming, settings: AmqpSettings, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(settings.connections_max));
    loop {
        let conn = tokio::select! {
            _ = stop.cancelled() => return,
            c = incoming.next() => match c {
                Some(Ok(c)) => c,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "AMQP accept failed");
                    continue;
                }
                None => return,
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(connections_max = settings.connections_max, "AMQP connection refused: too many open");
            continue;
        };
        let (backend, settings, stop) = (backend.clone(), settings.clone(), stop.clone());
        tokio::spawn(async move {
            connection::run(conn, backend, settings, stop).await;
            drop(slot);
        });
    }
}
