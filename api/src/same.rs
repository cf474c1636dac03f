//! When a topic or consumer group the broker holds is what a client asks for, compared
//! as the broker compares a repeated create: the operator uses this to write only what
//! differs (every broker write is a Raft entry), and the broker's own rules for the
//! defaults come from [`crate::defaults`], so both sides resolve an unset field alike.

use eventtermq_proto::v1 as pb;

use crate::defaults::{self, or_default};

/// Whether the broker's `held` topic is what `desired` asks for, on the fields a client
/// sets. Output-only fields (`under_replicated`) and the segment size, which UpdateTopic
/// cannot change, are left out: comparing them would see a difference that no write
/// can repair, and write on every pass.
pub fn topic_in_sync(desired: &pb::Topic, held: &pb::Topic) -> bool {
    let min_insync = |t: &pb::Topic| defaults::min_insync_replicas(t.replication_factor, t.min_insync_replicas);
    let exchange_type = |t: &pb::Topic| or_default(&t.default_exchange_type, defaults::EXCHANGE_TYPE).to_string();
    desired.name == held.name
        && desired.shards == held.shards
        && desired.replication_factor == held.replication_factor
        && defaults::retention_ms(&desired.retention) == defaults::retention_ms(&held.retention)
        && exchange_type(desired) == exchange_type(held)
        && min_insync(desired) == min_insync(held)
        && desired.retention_bytes_max == held.retention_bytes_max
        && desired.segment_age_max_ms == held.segment_age_max_ms
        && desired.retention_overrides_consumers == held.retention_overrides_consumers
        && or_default(&desired.shard_key, "routing_key") == or_default(&held.shard_key, "routing_key")
}

/// Whether the broker's `held` group is what `desired` asks for: bindings in order,
/// size, ack timeout, delivery limit and dead-letter topic; `since` only places a new group, so it is not compared. A binding without an
/// exchange type takes its topic's default from `topics` (the namespace's topics), as
/// the broker does when it creates the group. A bound topic missing from `topics` is a
/// difference, so that the create that follows reports it the way the broker words it.
pub fn consumer_group_in_sync(desired: &pb::ConsumerGroup, held: &pb::ConsumerGroup, topics: &[pb::Topic]) -> bool {
    let resolved_exchange_type = |binding: &pb::Binding| -> Option<String> {
        let topic = topics.iter().find(|t| t.name == binding.topic)?;
        let topic_default = or_default(&topic.default_exchange_type, defaults::EXCHANGE_TYPE);
        Some(or_default(&binding.exchange_type, topic_default).to_string())
    };
    let headers_match = |b: &pb::Binding| or_default(&b.headers_match, defaults::HEADERS_MATCH).to_string();
    desired.name == held.name
        && defaults::consumer_group_size(desired.size) == defaults::consumer_group_size(held.size)
        && desired.ack_timeout_ms == held.ack_timeout_ms
        && desired.deliveries_max == held.deliveries_max
        && desired.dead_letter_topic == held.dead_letter_topic
        && desired.message_ttl_ms == held.message_ttl_ms
        && desired.ready_messages_max == held.ready_messages_max
        && desired.dead_letter_routing_key == held.dead_letter_routing_key
        && desired.bindings.len() == held.bindings.len()
        && desired.bindings.iter().zip(&held.bindings).all(|(want, have)| {
            resolved_exchange_type(want).is_some_and(|exchange_type| exchange_type == have.exchange_type)
                && want.topic == have.topic
                && want.routing_key == have.routing_key
                && want.headers == have.headers
                && headers_match(want) == headers_match(have)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic() -> pb::Topic {
        pb::Topic {
            name: "orders".into(),
            shards: 2,
            replication_factor: 3,
            retention: Some(prost_types::Duration { seconds: 3600, nanos: 0 }),
            default_exchange_type: "direct".into(),
            under_replicated: false,
            segment_size_max_bytes: 0,
            min_insync_replicas: 0,
            ..Default::default()
        }
    }

    #[test]
    fn topic_compares_the_fields_the_operator_sets() {
        let desired = topic();
        // As ListTopics answers: output-only and unmanaged fields set.
        let held = pb::Topic {
            under_replicated: true,
            segment_size_max_bytes: 1 << 20,
            min_insync_replicas: 2,
            retained_bytes: 4096,
            retained_since: Some(prost_types::Timestamp { seconds: 1, nanos: 0 }),
            ..topic()
        };
        assert!(topic_in_sync(&desired, &held), "unset min_insync_replicas is a majority");
        assert!(!topic_in_sync(&desired, &pb::Topic { min_insync_replicas: 3, ..held.clone() }));
        assert!(topic_in_sync(
            &pb::Topic { min_insync_replicas: 3, ..desired.clone() },
            &pb::Topic { min_insync_replicas: 3, ..held.clone() }
        ));
        assert!(!topic_in_sync(&desired, &pb::Topic { shards: 3, ..held.clone() }));
        assert!(!topic_in_sync(&desired, &pb::Topic { replication_factor: 1, ..held.clone() }));
        assert!(!topic_in_sync(&desired, &pb::Topic { default_exchange_type: "fanout".into(), ..held.clone() }));
        assert!(!topic_in_sync(&desired, &pb::Topic { name: "other".into(), ..held.clone() }));
        let longer = Some(prost_types::Duration { seconds: 3601, nanos: 0 });
        assert!(!topic_in_sync(&desired, &pb::Topic { retention: longer, ..held }));
    }

    #[test]
    fn topic_retention_and_exchange_type_compare_as_the_broker_stores_them() {
        let forever = pb::Topic { retention: None, default_exchange_type: String::new(), ..topic() };
        let stored = pb::Topic {
            retention: Some(prost_types::Duration { seconds: 0, nanos: 0 }),
            default_exchange_type: "fanout".into(),
            ..topic()
        };
        assert!(topic_in_sync(&forever, &stored));
        let half_second =
            pb::Topic { retention: Some(prost_types::Duration { seconds: 0, nanos: 500_000_000 }), ..topic() };
        assert!(!topic_in_sync(&half_second, &stored));
    }

    fn binding(topic: &str, exchange_type: &str) -> pb::Binding {
        pb::Binding { topic: topic.into(), exchange_type: exchange_type.into(), ..pb::Binding::default() }
    }

    fn group(bindings: Vec<pb::Binding>, size: u32) -> pb::ConsumerGroup {
        pb::ConsumerGroup { name: "billing".into(), bindings, size, ..pb::ConsumerGroup::default() }
    }

    #[test]
    fn group_binding_without_exchange_type_takes_the_topics_default() {
        let topics = [topic()];
        let desired = group(vec![binding("orders", "")], 0);
        // As ListConsumerGroups answers: resolved exchange type, headers_match, size,
        // where the group runs and what it committed.
        let mut held = group(vec![pb::Binding { headers_match: "all".into(), ..binding("orders", "direct") }], 10_000);
        held.node_id = 7;
        held.committed_offsets.insert(1, 10);
        held.since = Some(prost_types::Timestamp { seconds: 1_700_000_000, nanos: 0 });
        assert!(consumer_group_in_sync(&desired, &held, &topics));
        let fanout = [pb::Topic { default_exchange_type: "fanout".into(), ..topic() }];
        assert!(!consumer_group_in_sync(&desired, &held, &fanout));
    }

    #[test]
    fn group_differs_on_bindings_settings_or_a_missing_topic() {
        let topics = [topic()];
        let desired = group(vec![binding("orders", "topic")], 100);
        let held = group(vec![binding("orders", "topic")], 100);
        assert!(consumer_group_in_sync(&desired, &held, &topics));
        assert!(!consumer_group_in_sync(&desired, &group(vec![binding("orders", "topic")], 200), &topics));
        assert!(!consumer_group_in_sync(&desired, &group(vec![binding("orders", "fanout")], 100), &topics));
        assert!(!consumer_group_in_sync(&desired, &group(vec![], 100), &topics));
        let keyed = pb::Binding { routing_key: "eu.#".into(), ..binding("orders", "topic") };
        assert!(!consumer_group_in_sync(&desired, &group(vec![keyed], 100), &topics));
        let any = pb::Binding { headers_match: "any".into(), ..binding("orders", "topic") };
        assert!(!consumer_group_in_sync(&desired, &group(vec![any], 100), &topics));
        let mut with_headers = binding("orders", "topic");
        with_headers.headers.insert("kind".into(), "refund".into());
        assert!(!consumer_group_in_sync(&desired, &group(vec![with_headers], 100), &topics));
        for changed in [
            pb::ConsumerGroup { ack_timeout_ms: 5_000, ..held.clone() },
            pb::ConsumerGroup { deliveries_max: 3, ..held.clone() },
            pb::ConsumerGroup { dead_letter_topic: "dead".into(), ..held.clone() },
        ] {
            assert!(!consumer_group_in_sync(&desired, &changed, &topics), "{changed:?}");
        }
        // The group is there but its topic is gone: not in sync.
        assert!(!consumer_group_in_sync(&desired, &held, &[]));
    }
}
