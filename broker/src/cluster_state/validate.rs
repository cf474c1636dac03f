//! Validation rules shared by the API (before proposing) and the state machine (at
//! apply time). Each error names the field and the rule it broke.

use super::model::*;
use crate::error::{ErrorCode, RequestError};

pub const NAME_LEN_MAX: usize = 249;
pub const SHARDS_MIN: u32 = 1;
pub const SHARDS_MAX: u32 = 1024;
pub const REPLICATION_FACTOR_MIN: u32 = 1;
pub const REPLICATION_FACTOR_MAX: u32 = 7;
pub const CONSUMER_GROUP_SIZE_MAX: u32 = 1_000_000;
/// The longest message TTL a group takes (RabbitMQ's largest `x-message-ttl`).
pub const MESSAGE_TTL_MS_MAX: u64 = u32::MAX as u64;
pub const BINDINGS_COUNT_MAX: usize = 1024;
/// A consumer group's ack timeout at most (12 h, as SQS's visibility timeout).
pub const ACK_TIMEOUT_MS_MAX: u64 = 12 * 60 * 60 * 1000;

/// Names of namespaces, topics and consumer groups: 1-249 characters of `[A-Za-z0-9._-]`.
pub fn name(field: &str, value: &str) -> Result<(), RequestError> {
    let ok_chars = value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if value.is_empty() || value.len() > NAME_LEN_MAX || !ok_chars {
        return Err(RequestError::new(
            ErrorCode::InvalidName,
            format!("{field}: {value:?} is not a valid name (1-{NAME_LEN_MAX} characters of A-Z a-z 0-9 . _ -)"),
        ));
    }
    Ok(())
}

/// Longest user name.
pub const USER_NAME_LEN_MAX: usize = 64;
/// Longest password, in bytes (argon2 takes any length; this bounds a request).
pub const PASSWORD_LEN_MAX_BYTES: usize = 1024;

/// User names: 1-64 characters of `[A-Za-z0-9._@-]`.
pub fn user_name(field: &str, value: &str) -> Result<(), RequestError> {
    let ok_chars = value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'));
    if value.is_empty() || value.len() > USER_NAME_LEN_MAX || !ok_chars {
        return Err(RequestError::new(
            ErrorCode::InvalidName,
            format!(
                "{field}: {value:?} is not a valid user name (1-{USER_NAME_LEN_MAX} characters of A-Z a-z 0-9 . _ @ -)"
            ),
        ));
    }
    Ok(())
}

/// A password a user may be given: 1-1024 bytes. The error never shows it.
pub fn password(field: &str, value: &str) -> Result<(), RequestError> {
    if value.is_empty() || value.len() > PASSWORD_LEN_MAX_BYTES {
        return Err(RequestError::new(
            ErrorCode::InvalidPassword,
            format!("{field}: must be 1-{PASSWORD_LEN_MAX_BYTES} bytes (got {})", value.len()),
        ));
    }
    Ok(())
}

/// A stored password hash: an argon2id PHC string (`$argon2id$v=19$m=...,t=...,p=...$salt$hash`).
pub fn password_hash(field: &str, value: &str) -> Result<(), RequestError> {
    let ok = argon2::PasswordHash::new(value).is_ok_and(|h| h.algorithm.as_str() == "argon2id" && h.hash.is_some());
    if !ok {
        return Err(RequestError::new(ErrorCode::InvalidArgument, format!("{field}: is not an argon2id PHC string")));
    }
    Ok(())
}

/// A user's permissions on a namespace: three patterns, each a valid one.
pub fn permissions(configure: &str, write: &str, read: &str) -> Result<Permissions, RequestError> {
    Ok(Permissions {
        configure: Pattern::parse("configure", configure)?,
        write: Pattern::parse("write", write)?,
        read: Pattern::parse("read", read)?,
    })
}

pub fn shards(value: u32) -> Result<(), RequestError> {
    if !(SHARDS_MIN..=SHARDS_MAX).contains(&value) {
        return Err(RequestError::new(
            ErrorCode::InvalidShards,
            format!("shards: {value} is out of range (must be {SHARDS_MIN}-{SHARDS_MAX})"),
        ));
    }
    Ok(())
}

pub fn replication_factor(value: u32) -> Result<(), RequestError> {
    if !(REPLICATION_FACTOR_MIN..=REPLICATION_FACTOR_MAX).contains(&value) {
        return Err(RequestError::new(
            ErrorCode::InvalidReplicationFactor,
            format!(
                "replication_factor: {value} is out of range (must be {REPLICATION_FACTOR_MIN}-{REPLICATION_FACTOR_MAX})"
            ),
        ));
    }
    Ok(())
}

pub fn exchange_type(field: &str, value: &str) -> Result<ExchangeType, RequestError> {
    ExchangeType::parse(value).ok_or_else(|| {
        RequestError::new(
            ErrorCode::InvalidExchangeType,
            format!("{field}: {value:?} is not an exchange type (one of {})", ExchangeType::NAMES),
        )
    })
}

pub fn topic_spec(spec: &TopicSpec) -> Result<(), RequestError> {
    shards(spec.shards)?;
    replication_factor(spec.replication_factor)?;
    min_insync_replicas(spec.min_insync_replicas, spec.replication_factor)
}

/// 0 (a majority of the replication factor) or 1 up to the replication factor.
pub fn min_insync_replicas(value: u32, replication_factor: u32) -> Result<(), RequestError> {
    if value > replication_factor {
        return Err(RequestError::new(
            ErrorCode::InvalidMinInsyncReplicas,
            format!(
                "min_insync_replicas: {value} is above the replication factor {replication_factor} \
                 (must be 1-{replication_factor}, or 0 for a majority)"
            ),
        ));
    }
    Ok(())
}

/// Returns the topic after `update`, or why the update is not allowed.
pub fn topic_update(current: &TopicSpec, update: &TopicUpdate) -> Result<TopicSpec, RequestError> {
    let mut next = current.clone();
    if let Some(rf) = update.replication_factor {
        replication_factor(rf)?;
        if rf != current.replication_factor {
            return Err(RequestError::new(
                ErrorCode::ImmutableField,
                format!(
                    "replication_factor: is immutable (is {}, asked for {rf}); create a new topic instead",
                    current.replication_factor
                ),
            ));
        }
    }
    if let Some(s) = update.shards {
        shards(s)?;
        if s < current.shards {
            return Err(RequestError::new(
                ErrorCode::ShardsDecrease,
                format!("shards: can only go up (is {}, asked for {s})", current.shards),
            ));
        }
        next.shards = s;
    }
    if let Some(r) = update.retention_ms {
        next.retention_ms = r;
    }
    if let Some(m) = update.min_insync_replicas {
        min_insync_replicas(m, current.replication_factor)?;
        next.min_insync_replicas = m;
        next = next.resolved();
    }
    if let Some(t) = update.default_exchange_type {
        next.default_exchange_type = t;
    }
    if let Some(b) = update.retention_bytes_max {
        next.retention_bytes_max = b;
    }
    if let Some(a) = update.segment_age_max_ms {
        next.segment_age_max_ms = a;
    }
    if let Some(o) = update.retention_overrides_consumers {
        next.retention_overrides_consumers = o;
    }
    if let Some(k) = update.shard_key {
        next.shard_key = k;
    }
    Ok(next)
}

pub fn consumer_group_spec(spec: &ConsumerGroupSpec) -> Result<(), RequestError> {
    if spec.size == 0 || spec.size > CONSUMER_GROUP_SIZE_MAX {
        return Err(RequestError::new(
            ErrorCode::InvalidSize,
            format!("size: {} is out of range (must be 1-{CONSUMER_GROUP_SIZE_MAX})", spec.size),
        ));
    }
    if spec.ack_timeout_ms > ACK_TIMEOUT_MS_MAX {
        return Err(RequestError::new(
            ErrorCode::InvalidArgument,
            format!(
                "ack_timeout_ms: {} is out of range (0 = the node's default, or at most {ACK_TIMEOUT_MS_MAX}, 12 h)",
                spec.ack_timeout_ms
            ),
        ));
    }
    if spec.message_ttl_ms > MESSAGE_TTL_MS_MAX {
        return Err(RequestError::new(
            ErrorCode::InvalidArgument,
            format!(
                "message_ttl_ms: {} is out of range (0 = no expiry, or at most {MESSAGE_TTL_MS_MAX}, about 49.7 days)",
                spec.message_ttl_ms
            ),
        ));
    }
    if spec.ready_messages_max > u64::from(spec.size) {
        return Err(RequestError::new(
            ErrorCode::InvalidArgument,
            format!(
                "ready_messages_max: {} is more than size ({}): the group's buffer holds the messages it counts",
                spec.ready_messages_max, spec.size
            ),
        ));
    }
    if !spec.dead_letter_routing_key.is_empty() && spec.dead_letter_topic.is_empty() {
        return Err(RequestError::new(
            ErrorCode::InvalidArgument,
            "dead_letter_routing_key: needs dead_letter_topic (the topic the dead letters go to)",
        ));
    }
    if !spec.dead_letter_topic.is_empty() {
        name("dead_letter_topic", &spec.dead_letter_topic)?;
        // A dead letter comes back unless every binding on that topic is a direct one
        // for another key than the one dead letters carry.
        let comes_back = |b: &BindingSpec| {
            b.topic == spec.dead_letter_topic
                && (spec.dead_letter_routing_key.is_empty()
                    || b.exchange_type != ExchangeType::Direct
                    || b.routing_key == spec.dead_letter_routing_key)
        };
        if spec.bindings.iter().any(comes_back) {
            return Err(RequestError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "dead_letter_topic: {:?} is a topic the group reads (its dead letters would come back to it)",
                    spec.dead_letter_topic
                ),
            ));
        }
    }
    if spec.bindings.len() > BINDINGS_COUNT_MAX {
        return Err(RequestError::new(
            ErrorCode::InvalidBinding,
            format!("bindings: {} bindings is more than the maximum of {BINDINGS_COUNT_MAX}", spec.bindings.len()),
        ));
    }
    for (i, b) in spec.bindings.iter().enumerate() {
        name(&format!("bindings[{i}].topic"), &b.topic)?;
        match b.exchange_type {
            ExchangeType::Direct | ExchangeType::Topic if b.routing_key.is_empty() => {
                return Err(RequestError::new(
                    ErrorCode::InvalidBinding,
                    format!("bindings[{i}].routing_key: a {} binding needs a routing key", b.exchange_type.as_str()),
                ));
            }
            ExchangeType::Topic => topic_pattern(&format!("bindings[{i}].routing_key"), &b.routing_key)?,
            ExchangeType::Headers if b.headers.is_empty() => {
                return Err(RequestError::new(
                    ErrorCode::InvalidBinding,
                    format!("bindings[{i}].headers: a headers binding needs at least one header"),
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Topic patterns are `.`-separated words; `*` and `#` must be whole words.
pub fn topic_pattern(field: &str, pattern: &str) -> Result<(), RequestError> {
    for word in pattern.split('.') {
        if word.len() > 1 && (word.contains('*') || word.contains('#')) {
            return Err(RequestError::new(
                ErrorCode::InvalidBinding,
                format!("{field}: {pattern:?} uses * or # inside a word; they must stand alone between dots"),
            ));
        }
    }
    Ok(())
}

/// Parses a retention/since duration: `0`, or humantime like `24h`, `7d`, `90m`, `1h30m`.
pub fn duration_ms(field: &str, value: &str) -> Result<u64, RequestError> {
    if value.trim() == "0" {
        return Ok(0);
    }
    humantime::parse_duration(value.trim()).map(|d| d.as_millis() as u64).map_err(|e| {
        RequestError::new(
            ErrorCode::InvalidRetention,
            format!("{field}: {value:?} is not a duration ({e}; examples: 0, 30s, 24h, 7d)"),
        )
    })
}
