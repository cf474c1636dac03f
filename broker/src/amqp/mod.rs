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
//! - [`channel`]: channel, exchange, queue, basic and confirm methods, on a
//!   channel's state ([`state`]).
//! - [`convert`]: AMQP content to the stored message and back.
//! - [`error`]: AMQP exceptions and the broker's errors mapped onto them.

pub mod backend;
mod channel;
pub mod codec;
mod connection;
pub mod convert;
pub mod error;
mod state;

use std::sync::Arc;

use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub use crate::config::AmqpSettings;
pub use backend::Backend;

use crate::transport::Incoming;

/// Pause between attempts to delete the exclusive queues of this node's earlier runs
/// (while there is no leader, say).
const EARLIER_RUNS_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

/// Accepts AMQP connections until `stop`.
pub async fn serve(backend: Backend, mut incoming: Incoming, settings: AmqpSettings, stop: CancellationToken) {
    // Exclusive queues of this node's earlier runs: their connections are gone.
    let reaper = backend.clone();
    let reaper_stop = stop.clone();
    tokio::spawn(async move {
        reaper.delete_exclusive_queues_of_earlier_runs(EARLIER_RUNS_RETRY_PAUSE, reaper_stop).await;
    });
    let slots = Arc::new(Semaphore::new(settings.connections_max));
    loop {
        let conn = tokio::select! {
            biased;
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
        let info = tonic::transport::server::Connected::connect_info(&conn);
        let client = connection::Client { from: info.remote, cert: info.client_cert };
        tokio::spawn(async move {
            connection::run(conn, client, backend, settings, stop).await;
            drop(slot);
        });
    }
}
