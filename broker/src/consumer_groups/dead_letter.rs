//! What a consumer group publishes to its dead-letter topic for a message delivered
//! `deliveries_max` times, expired (`message_ttl_ms`) or beyond `ready_messages_max`:
//! the message as it was published, with headers that say
//! where it came from and why, named as RabbitMQ names them (so tools that read
//! RabbitMQ's dead letters read these too) plus the record's place in the log.
//!
//! Pure: the group task publishes the result ([`super::task`]).

use amq_protocol::types::generation::gen_field_table;
use amq_protocol::types::parsing::parse_field_table;
use amq_protocol::types::{AMQPValue, LongString};
use eventtermq_proto::v1::Message;
use prost::Message as _;

use super::buffer::{DeathReason, Delivery};

/// The dead letter of `d`, taken from group `group` for `reason`, with `routing_key`
/// (empty: its own); `None` when the stored message does not decode (the primary
/// encoded it, so only a bug gets there).
pub fn message(d: &Delivery, group: &str, reason: DeathReason, routing_key: &str) -> Option<Message> {
    let mut m = Message::decode(d.message.clone()).ok()?;
    if !routing_key.is_empty() {
        m.routing_key = routing_key.to_string();
    }
    let added = [
        ("x-first-death-reason", reason.as_str().to_string()),
        ("x-first-death-queue", group.to_string()),
        ("x-first-death-exchange", d.topic.to_string()),
        ("x-delivery-count", d.delivery_count.to_string()),
        ("x-eventtermq-segment-id", d.segment_id.to_string()),
        ("x-eventtermq-offset", d.offset.to_string()),
    ];
    for (k, v) in &added {
        m.headers.insert(k.to_string(), v.clone());
    }
    if !m.amqp_headers.is_empty() {
        m.amqp_headers = with_long_strings(&m.amqp_headers, &added)?;
    }
    Some(m)
}

/// An AMQP 0.9.1 field table (with its 4-byte length, as `Message.amqp_headers`
/// holds it) with `entries` set as long strings; `None` when it does not parse.
fn with_long_strings(table: &[u8], entries: &[(&str, String)]) -> Option<Vec<u8>> {
    let (_, mut table) = parse_field_table(table).ok()?;
    for (k, v) in entries {
        table.insert((*k).into(), AMQPValue::LongString(LongString::from(v.as_bytes())));
    }
    cookie_factory::gen(gen_field_table(&table), Vec::new()).ok().map(|(buf, _)| buf)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;

    fn delivery(m: &Message) -> Delivery {
        Delivery {
            topic: Arc::from("orders"),
            segment_id: 7,
            offset: 41,
            timestamp_ms: 0,
            message: Bytes::from(m.encode_to_vec()),
            delivery_count: 5,
        }
    }

    #[test]
    fn a_dead_letter_keeps_the_message_and_says_where_it_came_from() {
        let m = Message { routing_key: "k".into(), data: Bytes::from_static(b"body"), ..Default::default() };
        let dead = message(&delivery(&m), "billing", DeathReason::DeliveryLimit, "").unwrap();
        assert_eq!((dead.routing_key.as_str(), &dead.data[..]), ("k", &b"body"[..]));
        let rerouted = message(&delivery(&m), "billing", DeathReason::Expired, "retry").unwrap();
        assert_eq!(rerouted.routing_key, "retry");
        let h = |k: &str| dead.headers.get(k).map(String::as_str);
        assert_eq!(h("x-first-death-reason"), Some("delivery_limit"));
        assert_eq!(h("x-first-death-queue"), Some("billing"));
        assert_eq!(h("x-first-death-exchange"), Some("orders"));
        assert_eq!(
            (h("x-delivery-count"), h("x-eventtermq-segment-id"), h("x-eventtermq-offset")),
            (Some("5"), Some("7"), Some("41"))
        );
        assert!(dead.amqp_headers.is_empty(), "a gRPC message stays one");
    }

    #[test]
    fn an_amqp_header_table_gets_the_entries_and_keeps_its_own() {
        use amq_protocol::types::FieldTable;
        let mut table = FieldTable::default();
        table.insert("n".into(), AMQPValue::LongInt(7));
        table.insert("x-delivery-count".into(), AMQPValue::LongString("1".into()));
        let (encoded, _) = cookie_factory::gen(gen_field_table(&table), Vec::new()).unwrap();
        let m = Message { amqp_headers: encoded, ..Default::default() };
        let dead = message(&delivery(&m), "g", DeathReason::Expired, "").unwrap();
        let (_, t) = parse_field_table(&dead.amqp_headers[..]).unwrap();
        let get = |k: &str| t.inner().get(k).cloned();
        assert_eq!(get("n"), Some(AMQPValue::LongInt(7)), "its own entry kept, typed");
        assert_eq!(get("x-delivery-count"), Some(AMQPValue::LongString("5".into())), "replaced");
        assert_eq!(get("x-first-death-queue"), Some(AMQPValue::LongString("g".into())));
    }

    #[test]
    fn a_damaged_table_is_refused() {
        let m = Message { amqp_headers: vec![0, 0, 0, 9, 1], ..Default::default() };
        assert!(message(&delivery(&m), "g", DeathReason::MaxLength, "").is_none());
    }
}
