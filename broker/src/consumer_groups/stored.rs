//! What the group buffer reads of a stored message (`eventter.v1.Message`) without
//! decoding all of it: its own time to live, the AMQP basic property `expiration`
//! (milliseconds as a decimal string, as RabbitMQ reads it), and its body's size.

use bytes::Bytes;
use prost::Message as _;

/// Longest `expiration` RabbitMQ takes (ms): as its queue TTL, 2^32 - 1.
pub const EXPIRATION_MS_MAX: u64 = u32::MAX as u64;

/// The `expiration` property's milliseconds (0 to [`EXPIRATION_MS_MAX`], decimal
/// digits only); `Err` says which rule it breaks.
pub fn parse_expiration(expiration: &str) -> Result<u64, String> {
    if expiration.is_empty() || !expiration.bytes().all(|b| b.is_ascii_digit()) {
        return Err("must be milliseconds as a non-negative decimal integer".into());
    }
    match expiration.parse::<u64>() {
        Ok(ms) if ms <= EXPIRATION_MS_MAX => Ok(ms),
        _ => Err(format!("must be at most {EXPIRATION_MS_MAX} ms")),
    }
}

/// The fields of `eventter.v1.Message` read here (prost skips the others; `data`
/// is a slice of the stored bytes, not a copy).
#[derive(Clone, PartialEq, prost::Message)]
struct Partial {
    #[prost(message, optional, tag = "2")]
    properties: Option<ExpirationOnly>,
    #[prost(bytes = "bytes", tag = "4")]
    data: Bytes,
}

/// The only field of `eventter.v1.Properties` read here.
#[derive(Clone, PartialEq, prost::Message)]
struct ExpirationOnly {
    #[prost(string, tag = "7")]
    expiration: String,
}

/// What the buffer needs of a stored message.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    /// Its own TTL in ms, if it has a valid `expiration` (AMQP publishers are refused
    /// an invalid one; one published over gRPC that does not parse is no TTL).
    pub expiration_ms: Option<u64>,
    /// Its body's length (`data`), as RabbitMQ's `x-max-length-bytes` counts.
    pub body_bytes: u64,
}

/// Reads [`Meta`] from a stored message (a record that does not decode: none).
pub fn read(message: &Bytes) -> Meta {
    let Ok(m) = Partial::decode(message.clone()) else { return Meta::default() };
    let expiration = m.properties.map(|p| p.expiration).unwrap_or_default();
    Meta {
        expiration_ms: (!expiration.is_empty()).then(|| parse_expiration(&expiration).ok()).flatten(),
        body_bytes: m.data.len() as u64,
    }
}

#[cfg(test)]
mod tests {
    use eventtermq_proto::v1::{Message, Properties};

    use super::*;

    #[test]
    fn expiration_is_rabbitmqs_decimal_milliseconds() {
        assert_eq!(parse_expiration("0"), Ok(0));
        assert_eq!(parse_expiration("60000"), Ok(60_000));
        assert_eq!(parse_expiration("4294967295"), Ok(EXPIRATION_MS_MAX));
        for bad in ["", "-5", "+5", "1.5", "abc", " 10", "4294967296", "99999999999999999999999"] {
            assert!(parse_expiration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_ttl_and_body_size_are_read_from_the_stored_message() {
        let with = |expiration: &str| {
            let m = Message {
                routing_key: "k".into(),
                properties: Some(Properties { expiration: expiration.into(), ..Default::default() }),
                headers: [("h".to_string(), "v".to_string())].into(),
                data: Bytes::from_static(b"body"),
                ..Default::default()
            };
            Bytes::from(m.encode_to_vec())
        };
        assert_eq!(read(&with("1500")), Meta { expiration_ms: Some(1500), body_bytes: 4 });
        assert_eq!(read(&with("")), Meta { expiration_ms: None, body_bytes: 4 });
        assert_eq!(read(&with("soon")), Meta { expiration_ms: None, body_bytes: 4 });
        assert_eq!(read(&Bytes::from(Message::default().encode_to_vec())), Meta::default());
        assert_eq!(read(&Bytes::from_static(b"\xff\xff")), Meta::default());
    }
}
