//! Defaults of the wire: what a field left at zero or empty means, as the broker
//! applies it, and the defaults clients start from.

/// gRPC (TCP) and gossip (UDP) port of a node.
pub const PORT: u16 = 16000;

/// The AMQP 0.9.1 port is the gRPC port plus this.
pub const AMQP_PORT_OFFSET: u16 = 1;

/// The HTTP port of `/metrics` (Prometheus) is the gRPC port plus this (16002).
pub const METRICS_PORT_OFFSET: u16 = 2;

/// The namespace a request without one goes to, which every cluster has.
pub const NAMESPACE: &str = "default";

/// A topic's default exchange type when it names none; also what a binding without
/// an exchange type takes from a topic that names none.
pub const EXCHANGE_TYPE: &str = "fanout";

/// A headers binding's match mode when it names none.
pub const HEADERS_MATCH: &str = "all";

/// Open segments (parallel write streams) of a topic, as the CLI and the CRD default.
pub const SHARDS: u32 = 1;

/// Copies of a topic's messages, as the CLI and the CRD default.
pub const REPLICATION_FACTOR: u32 = 3;

/// In-memory buffer of a consumer group created with `size` 0, in messages.
pub const CONSUMER_GROUP_SIZE: u32 = 10_000;

/// A subscriber's window (unacknowledged messages) when it asks for `size` 0.
pub const SUBSCRIBER_SIZE: u32 = 1000;

/// A node's default ack timeout (`--ack-timeout-ms`), for consumer groups that set
/// none: a message handed out and not acknowledged within it goes back to its group
/// for redelivery. 30 s, as NATS JetStream's `AckWait` and SQS's visibility timeout:
/// long for a message handler, short enough that a stuck subscriber's messages move
/// on within a minute (RabbitMQ's 30 min consumer timeout closes the channel instead).
pub const ACK_TIMEOUT_MS: u64 = 30_000;

/// How long a broker remembers an exactly-once publish (its producer id and
/// sequence) by default: a client that retries with the same ids within it has the
/// request stored once. 2 minutes, as NATS JetStream's duplicate window.
pub const DEDUPE_WINDOW_MS: u64 = 120_000;

/// `name` unless empty, else `default`.
pub fn or_default<'a>(name: &'a str, default: &'a str) -> &'a str {
    if name.is_empty() {
        default
    } else {
        name
    }
}

/// A topic's `min_insync_replicas` as the broker applies it: 0 is a majority of the
/// replication factor.
pub fn min_insync_replicas(replication_factor: u32, min_insync_replicas: u32) -> u32 {
    match min_insync_replicas {
        0 => replication_factor / 2 + 1,
        n => n,
    }
}

/// A consumer group's buffer as the broker applies it: 0 is [`CONSUMER_GROUP_SIZE`].
pub fn consumer_group_size(size: u32) -> u32 {
    if size == 0 {
        CONSUMER_GROUP_SIZE
    } else {
        size
    }
}

/// A subscriber's window as the broker applies it: 0 is [`SUBSCRIBER_SIZE`].
pub fn subscriber_size(size: u32) -> u32 {
    if size == 0 {
        SUBSCRIBER_SIZE
    } else {
        size
    }
}

/// A retention as the broker stores it, in milliseconds: unset is 0 (forever).
pub fn retention_ms(retention: &Option<prost_types::Duration>) -> i128 {
    retention.as_ref().map_or(0, |d| i128::from(d.seconds) * 1000 + i128::from(d.nanos) / 1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_means_the_default() {
        assert_eq!((min_insync_replicas(3, 0), min_insync_replicas(5, 0), min_insync_replicas(1, 0)), (2, 3, 1));
        assert_eq!(min_insync_replicas(3, 3), 3);
        assert_eq!((consumer_group_size(0), consumer_group_size(7)), (CONSUMER_GROUP_SIZE, 7));
        assert_eq!((subscriber_size(0), subscriber_size(7)), (SUBSCRIBER_SIZE, 7));
        assert_eq!((or_default("", EXCHANGE_TYPE), or_default("topic", EXCHANGE_TYPE)), ("fanout", "topic"));
        assert_eq!(retention_ms(&None), 0);
        assert_eq!(retention_ms(&Some(prost_types::Duration { seconds: 2, nanos: 500_000_000 })), 2500);
    }
}
