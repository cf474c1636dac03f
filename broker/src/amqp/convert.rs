//! AMQP content (basic properties, header table, body) to the stored message and
//! back. The header table is kept as AMQP encodes it (`Message.amqp_headers`), so
//! every type survives; its entries that are text, numbers or booleans also go to
//! `Message.headers`, which bindings match and gRPC clients read.

use std::collections::HashMap;

use amq_protocol::protocol::basic::AMQPProperties;
use amq_protocol::types::generation::gen_field_table;
use amq_protocol::types::parsing::parse_field_table;
use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
use eventtermq_proto::v1 as pb;

/// The message a `basic.publish` stores.
pub fn to_message(routing_key: &str, p: &AMQPProperties, body: Vec<u8>) -> pb::Message {
    let text = |v: &Option<ShortString>| v.as_ref().map(|s| s.as_str().to_string()).unwrap_or_default();
    let (headers, amqp_headers) = match p.headers() {
        Some(table) => (text_entries(table), encode_table(table)),
        None => (HashMap::new(), Vec::new()),
    };
    pb::Message {
        routing_key: routing_key.to_string(),
        properties: Some(pb::Properties {
            content_type: text(p.content_type()),
            content_encoding: text(p.content_encoding()),
            delivery_mode: p.delivery_mode().map(u32::from).unwrap_or(0),
            priority: p.priority().map(u32::from).unwrap_or(0),
            correlation_id: text(p.correlation_id()),
            reply_to: text(p.reply_to()),
            expiration: text(p.expiration()),
            message_id: text(p.message_id()),
            timestamp: p.timestamp().map(|s| prost_types::Timestamp { seconds: s as i64, nanos: 0 }),
            r#type: text(p.kind()),
            user_id: text(p.user_id()),
            app_id: text(p.app_id()),
        }),
        headers,
        data: body.into(),
        amqp_headers,
    }
}

/// The basic properties a consumer gets for a stored message (empty fields absent).
pub fn to_properties(m: &pb::Message) -> AMQPProperties {
    let mut p = AMQPProperties::default();
    if let Some(table) = headers_table(m) {
        p = p.with_headers(table);
    }
    let Some(q) = &m.properties else { return p };
    let short = |s: &str| (!s.is_empty()).then(|| ShortString::from(s));
    if let Some(v) = short(&q.content_type) {
        p = p.with_content_type(v);
    }
    if let Some(v) = short(&q.content_encoding) {
        p = p.with_content_encoding(v);
    }
    if let Ok(v @ 1..) = u8::try_from(q.delivery_mode) {
        p = p.with_delivery_mode(v);
    }
    if let Ok(v @ 1..) = u8::try_from(q.priority) {
        p = p.with_priority(v);
    }
    if let Some(v) = short(&q.correlation_id) {
        p = p.with_correlation_id(v);
    }
    if let Some(v) = short(&q.reply_to) {
        p = p.with_reply_to(v);
    }
    if let Some(v) = short(&q.expiration) {
        p = p.with_expiration(v);
    }
    if let Some(v) = short(&q.message_id) {
        p = p.with_message_id(v);
    }
    // AMQP's timestamp is an unsigned 64-bit count of seconds and a stored one is signed:
    // the bits are carried as they are both ways, so every value a publisher sent comes
    // back unchanged (one past i64::MAX reads as negative over gRPC, and the other way).
    if let Some(t) = &q.timestamp {
        p = p.with_timestamp(t.seconds as u64);
    }
    if let Some(v) = short(&q.r#type) {
        p = p.with_type(v);
    }
    if let Some(v) = short(&q.user_id) {
        p = p.with_user_id(v);
    }
    if let Some(v) = short(&q.app_id) {
        p = p.with_app_id(v);
    }
    p
}

/// The header table as published over AMQP, else `headers` as long strings.
fn headers_table(m: &pb::Message) -> Option<FieldTable> {
    if !m.amqp_headers.is_empty() {
        match parse_field_table(&m.amqp_headers[..]) {
            Ok((_, table)) => return Some(table),
            // Stored by a publisher that checked it; a gRPC client may have set junk.
            Err(_) => tracing::debug!("a message's amqp_headers is not a field table; using headers"),
        }
    }
    if m.headers.is_empty() {
        return None;
    }
    let mut table = FieldTable::default();
    for (k, v) in &m.headers {
        table.insert(k.as_str().into(), AMQPValue::LongString(LongString::from(v.as_bytes())));
    }
    Some(table)
}

/// The entries bindings and gRPC clients can read as text.
fn text_entries(table: &FieldTable) -> HashMap<String, String> {
    table
        .inner()
        .iter()
        .filter_map(|(k, v)| {
            let text = match v {
                AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec()).ok()?,
                AMQPValue::ShortString(s) => s.as_str().to_string(),
                AMQPValue::Boolean(b) => b.to_string(),
                AMQPValue::ShortShortInt(i) => i.to_string(),
                AMQPValue::ShortShortUInt(i) => i.to_string(),
                AMQPValue::ShortInt(i) => i.to_string(),
                AMQPValue::ShortUInt(i) => i.to_string(),
                AMQPValue::LongInt(i) => i.to_string(),
                AMQPValue::LongUInt(i) => i.to_string(),
                AMQPValue::LongLongInt(i) => i.to_string(),
                AMQPValue::Float(f) => f.to_string(),
                AMQPValue::Double(f) => f.to_string(),
                AMQPValue::Timestamp(t) => t.to_string(),
                _ => return None,
            };
            Some((k.as_str().to_string(), text))
        })
        .collect()
}

/// The table as AMQP encodes it (with its length).
pub fn encode_table(table: &FieldTable) -> Vec<u8> {
    match cookie_factory::gen(gen_field_table(table), Vec::new()) {
        Ok((buf, _)) => buf,
        Err(e) => {
            tracing::error!(error = ?e, "cannot encode an AMQP field table");
            Vec::new()
        }
    }
}

/// A header table's entry as text, for `x-match` binding arguments.
pub fn text_value(v: &AMQPValue) -> Option<String> {
    let mut one = FieldTable::default();
    one.insert("v".into(), v.clone());
    text_entries(&one).remove("v")
}

#[cfg(test)]
mod tests {
    use amq_protocol::types::{DecimalValue, FieldArray};

    use super::*;

    fn rich_table() -> FieldTable {
        let mut nested = FieldTable::default();
        nested.insert("deep".into(), AMQPValue::LongLongInt(-5));
        let mut t = FieldTable::default();
        t.insert("s".into(), AMQPValue::LongString("text".into()));
        t.insert("n".into(), AMQPValue::LongInt(42));
        t.insert("b".into(), AMQPValue::Boolean(true));
        t.insert("table".into(), AMQPValue::FieldTable(nested));
        t.insert(
            "array".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::Double(1.5), AMQPValue::Void])),
        );
        t.insert("dec".into(), AMQPValue::DecimalValue(DecimalValue { scale: 2, value: 314 }));
        t.insert("ts".into(), AMQPValue::Timestamp(1_700_000_000));
        t.insert("bytes".into(), AMQPValue::ByteArray(vec![0u8, 255, 1].into()));
        t
    }

    #[test]
    fn properties_and_every_header_type_survive_a_round_trip() {
        let p = AMQPProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_priority(3)
            .with_correlation_id("c-1".into())
            .with_reply_to("amq.gen-abc".into())
            .with_message_id("m-1".into())
            .with_timestamp(1_700_000_000)
            .with_type("t".into())
            .with_app_id("app".into())
            .with_headers(rich_table());
        let m = to_message("key", &p, b"body".to_vec());
        assert_eq!(m.routing_key, "key");
        assert_eq!(m.headers.get("s").map(String::as_str), Some("text"));
        assert_eq!(m.headers.get("n").map(String::as_str), Some("42"));
        assert_eq!(m.headers.get("b").map(String::as_str), Some("true"));
        assert!(!m.headers.contains_key("table"), "only text-like entries are text");
        let back = to_properties(&m);
        assert_eq!(back, p);
        assert_eq!(encode_table(back.headers().as_ref().unwrap()), encode_table(&rich_table()));
    }

    #[test]
    fn every_amqp_timestamp_comes_back_as_sent() {
        for seconds in [0, 1, 1_700_000_000, i64::MAX as u64, i64::MAX as u64 + 1, u64::MAX] {
            let p = AMQPProperties::default().with_timestamp(seconds);
            let m = to_message("key", &p, Vec::new());
            assert_eq!(to_properties(&m).timestamp(), &Some(seconds), "timestamp {seconds}");
        }
    }

    #[test]
    fn grpc_messages_reach_amqp_with_headers_as_long_strings_and_no_empty_properties() {
        let m = pb::Message {
            routing_key: "k".into(),
            properties: Some(pb::Properties { content_type: "text/plain".into(), ..Default::default() }),
            headers: HashMap::from([("h".to_string(), "v".to_string())]),
            data: b"x".to_vec().into(),
            amqp_headers: Default::default(),
        };
        let p = to_properties(&m);
        assert_eq!(p.content_type().as_ref().map(|s| s.as_str()), Some("text/plain"));
        assert_eq!(p.correlation_id(), &None);
        let h = p.headers().as_ref().unwrap();
        assert_eq!(h.inner().get("h"), Some(&AMQPValue::LongString("v".into())));
    }
}
