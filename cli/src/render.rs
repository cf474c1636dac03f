//! Rendering of API answers: the `dump` text form of the seed page (protobuf text
//! format with `<` `>` delimiters, default values omitted) and JSON.

use std::fmt::Write;

use eventtermq_proto::v1 as pb;
use serde_json::{json, Value};

/// Writes protobuf-text-style fields with two-space indentation.
struct Text {
    out: String,
    depth: usize,
}

impl Text {
    fn line(&mut self, s: impl std::fmt::Display) {
        let _ = writeln!(self.out, "{:width$}{s}", "", width = self.depth * 2);
    }
    fn str(&mut self, name: &str, v: &str) {
        if !v.is_empty() {
            self.line(format_args!("{name}: {v:?}"));
        }
    }
    fn num(&mut self, name: &str, v: impl Into<i128> + Copy) {
        if v.into() != 0 {
            self.line(format_args!("{name}: {}", v.into()));
        }
    }
    fn msg(&mut self, name: &str, body: impl FnOnce(&mut Self)) {
        self.line(format_args!("{name}: <"));
        self.depth += 1;
        body(self);
        self.depth -= 1;
        self.line(">");
    }
}

fn node_state_name(state: i32) -> &'static str {
    match pb::NodeState::try_from(state).unwrap_or(pb::NodeState::Unspecified) {
        pb::NodeState::Alive => "ALIVE",
        pb::NodeState::Suspect => "SUSPECT",
        pb::NodeState::Dead => "DEAD",
        pb::NodeState::Left => "LEFT",
        pb::NodeState::Unspecified => "UNSPECIFIED",
    }
}

fn topic_text(w: &mut Text, t: &pb::Topic) {
    w.str("name", &t.name);
    w.num("shards", t.shards);
    w.num("replication_factor", t.replication_factor);
    if let Some(r) = &t.retention {
        w.msg("retention", |w| {
            w.num("seconds", r.seconds);
            w.num("nanos", r.nanos);
        });
    }
    w.str("default_exchange_type", &t.default_exchange_type);
    if t.under_replicated {
        w.line("under_replicated: true");
    }
    if t.min_insync_replicas != 0 {
        w.num("min_insync_replicas", t.min_insync_replicas);
    }
    if t.retention_bytes_max != 0 {
        w.num("retention_bytes_max", t.retention_bytes_max);
    }
    if t.segment_age_max_ms != 0 {
        w.num("segment_age_max_ms", t.segment_age_max_ms);
    }
    if t.retention_overrides_consumers {
        w.line("retention_overrides_consumers: true");
    }
    w.num("retained_bytes", t.retained_bytes);
    if let Some(s) = &t.retained_since {
        w.msg("retained_since", |w| {
            w.num("seconds", s.seconds);
            w.num("nanos", s.nanos);
        });
    }
}

fn consumer_group_text(w: &mut Text, g: &pb::ConsumerGroup) {
    w.str("name", &g.name);
    for b in &g.bindings {
        w.msg("bindings", |w| {
            w.str("topic", &b.topic);
            w.str("exchange_type", &b.exchange_type);
            w.str("routing_key", &b.routing_key);
            let mut headers: Vec<_> = b.headers.iter().collect();
            headers.sort();
            for (k, v) in headers {
                w.msg("headers", |w| {
                    w.str("key", k);
                    w.str("value", v);
                });
            }
            if b.exchange_type == "headers" {
                w.str("headers_match", &b.headers_match);
            }
        });
    }
    w.num("size", g.size);
    if let Some(s) = &g.since {
        w.msg("since", |w| {
            w.num("seconds", s.seconds);
            w.num("nanos", s.nanos);
        });
    }
    if g.node_id != 0 {
        w.line(format_args!("node_id: {}", g.node_id));
    }
    let mut offsets: Vec<_> = g.committed_offsets.iter().collect();
    offsets.sort();
    for (segment, offset) in offsets {
        w.msg("committed_offsets", |w| {
            w.line(format_args!("segment_id: {segment}"));
            w.line(format_args!("offset: {offset}"));
        });
    }
}

fn segment_text(w: &mut Text, s: &pb::Segment) {
    w.line(format_args!("id: {}", s.id));
    w.str("namespace", &s.namespace);
    w.str("topic", &s.topic);
    w.num("shard", s.shard);
    w.num("generation", s.generation);
    w.line(format_args!("open: {}", s.open));
    w.line(format_args!("primary_node_id: {}", s.primary_node_id));
    for n in &s.replica_node_ids {
        w.line(format_args!("replica_node_ids: {n}"));
    }
    for n in &s.done_node_ids {
        w.line(format_args!("done_node_ids: {n}"));
    }
    if !s.open {
        w.num("messages", s.next_offset);
        w.num("size", s.size_bytes);
        w.line(format_args!("checksum: {:#010x}", s.checksum));
    }
}

/// The `dump` output: `=== Cluster state ===` then `=== Segments ===`.
pub fn dump_text(r: &pb::DumpResponse) -> String {
    let mut w = Text { out: String::new(), depth: 0 };
    w.line("=== Cluster state ===");
    let state = r.state.clone().unwrap_or_default();
    w.line(format_args!("index: {}", state.index));
    for ns in &state.namespaces {
        w.msg("namespaces", |w| {
            w.str("name", &ns.name);
            for t in &ns.topics {
                w.msg("topics", |w| topic_text(w, t));
            }
            for g in &ns.consumer_groups {
                w.msg("consumer_groups", |w| consumer_group_text(w, g));
            }
        });
    }
    for n in &state.nodes {
        w.msg("nodes", |w| {
            w.line(format_args!("id: {}", n.id));
            w.str("address", &n.address);
            w.line(format_args!("state: {}", node_state_name(n.state)));
            if n.disk_low {
                w.line("disk_low: true");
                w.num("disk_free_bytes", n.disk_free_bytes);
                w.num("disk_free_min_bytes", n.disk_free_min_bytes);
            }
        });
    }
    for s in &state.segments {
        w.msg("segments", |w| segment_text(w, s));
    }
    w.line("");
    w.line("");
    w.line("=== Segments ===");
    for s in &r.segments {
        w.msg("segments", |w| {
            w.line(format_args!("id: {}", s.id));
            w.num("size", s.size_bytes);
            w.num("messages", s.next_offset);
            w.line(format_args!("open: {}", s.open));
        });
    }
    if let Some(l) = &r.local {
        w.line("");
        w.line("");
        w.line("=== This node ===");
        w.line(format_args!("node_id: {}", r.node_id));
        w.line(format_args!("disk_free_bytes: {}", l.disk_free_bytes));
        w.line(format_args!("disk_free_min_bytes: {}", l.disk_free_min_bytes));
        if l.disk_low {
            w.line("disk_low: true");
        }
        w.str("raft_error", &l.raft_error);
    }
    w.line("");
    w.out
}

pub fn topic_json(t: &pb::Topic) -> Value {
    let retention_ms = t.retention.as_ref().map(|d| d.seconds * 1000 + i64::from(d.nanos) / 1_000_000).unwrap_or(0);
    json!({
        "name": t.name,
        "shards": t.shards,
        "replication_factor": t.replication_factor,
        "retention": humantime::format_duration(std::time::Duration::from_millis(retention_ms as u64)).to_string(),
        "default_exchange_type": t.default_exchange_type,
        "under_replicated": t.under_replicated,
        "min_insync_replicas": t.min_insync_replicas,
        "retention_bytes_max": t.retention_bytes_max,
        "segment_age_max_ms": t.segment_age_max_ms,
        "retention_overrides_consumers": t.retention_overrides_consumers,
        "retained_bytes": t.retained_bytes,
        "retained_since_unix_ms": t.retained_since.as_ref().map(|s| s.seconds * 1000 + i64::from(s.nanos) / 1_000_000),
    })
}

pub fn consumer_group_json(g: &pb::ConsumerGroup) -> Value {
    json!({
        "name": g.name,
        "bindings": g.bindings.iter().map(|b| json!({
            "topic": b.topic,
            "exchange_type": b.exchange_type,
            "routing_key": b.routing_key,
            "headers": b.headers,
            "headers_match": b.headers_match,
        })).collect::<Vec<_>>(),
        "size": g.size,
        "since_unix_ms": g.since.as_ref().map(|s| s.seconds * 1000 + i64::from(s.nanos) / 1_000_000),
        "ack_timeout_ms": g.ack_timeout_ms,
        "deliveries_max": g.deliveries_max,
        "dead_letter_topic": g.dead_letter_topic,
        "message_ttl_ms": g.message_ttl_ms,
        "ready_messages_max": g.ready_messages_max,
        "exclusive_node_id": g.exclusive_node_id,
        "dead_letter_routing_key": g.dead_letter_routing_key,
        "node_id": g.node_id,
        "committed_offsets": g.committed_offsets,
    })
}

/// `list-users` as text: one line per user and namespace (a user without permissions
/// on one line of its own); never a password or hash (the answer has none).
pub fn users_text(users: &[pb::User]) -> String {
    let mut out = String::from("USER\tADMIN\tNAMESPACE\tCONFIGURE\tWRITE\tREAD\n");
    for u in users {
        let mut namespaces: Vec<_> = u.permissions.iter().collect();
        namespaces.sort_by(|a, b| a.0.cmp(b.0));
        if namespaces.is_empty() {
            let _ = writeln!(out, "{}\t{}\t-\t-\t-\t-", u.name, u.admin);
        }
        for (ns, p) in namespaces {
            let _ = writeln!(out, "{}\t{}\t{ns}\t{:?}\t{:?}\t{:?}", u.name, u.admin, p.configure, p.write, p.read);
        }
    }
    out
}

/// `list-users --output json`.
pub fn users_json(r: &pb::ListUsersResponse) -> Value {
    let users: Vec<Value> = r
        .users
        .iter()
        .map(|u| {
            let permissions: serde_json::Map<String, Value> = u
                .permissions
                .iter()
                .map(|(ns, p)| (ns.clone(), json!({"configure": p.configure, "write": p.write, "read": p.read})))
                .collect();
            json!({"name": u.name, "admin": u.admin, "permissions": permissions})
        })
        .collect();
    json!({"users": users, "index": r.index})
}

pub fn dump_json(r: &pb::DumpResponse) -> Value {
    let state = r.state.clone().unwrap_or_default();
    json!({
        "index": state.index,
        "node_id": r.node_id,
        "leader_id": r.leader_id,
        "term": r.term,
        "namespaces": state.namespaces.iter().map(|ns| json!({
            "name": ns.name,
            "topics": ns.topics.iter().map(topic_json).collect::<Vec<_>>(),
            "consumer_groups": ns.consumer_groups.iter().map(consumer_group_json).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "nodes": state.nodes.iter().map(|n| json!({
            "id": n.id,
            "address": n.address,
            "state": node_state_name(n.state),
            "raft_role": n.raft_role,
            "disk_low": n.disk_low,
            "disk_free_bytes": n.disk_free_bytes,
            "disk_free_min_bytes": n.disk_free_min_bytes,
        })).collect::<Vec<_>>(),
        "segments": state.segments.iter().map(|s| json!({
            "id": s.id,
            "namespace": s.namespace,
            "topic": s.topic,
            "shard": s.shard,
            "generation": s.generation,
            "open": s.open,
            "primary_node_id": s.primary_node_id,
            "replica_node_ids": s.replica_node_ids,
            "done_node_ids": s.done_node_ids,
            "messages": s.next_offset,
            "size_bytes": s.size_bytes,
            "checksum": s.checksum,
        })).collect::<Vec<_>>(),
        "local_segments": r.segments.iter().map(|s| json!({
            "id": s.id, "size_bytes": s.size_bytes, "messages": s.next_offset, "open": s.open,
        })).collect::<Vec<_>>(),
        "local": r.local.as_ref().map(|l| json!({
            "disk_free_bytes": l.disk_free_bytes,
            "disk_free_min_bytes": l.disk_free_min_bytes,
            "disk_low": l.disk_low,
            "raft_error": l.raft_error,
        })),
    })
}

/// One line per topic for `list-topics`.
pub fn topic_line(t: &pb::Topic) -> String {
    topic_json(t).to_string()
}

/// One line per consumer group for `list-consumer-groups`.
/// A listed group with `lag` (messages of its bound topics not acknowledged yet) when
/// its node answered.
pub fn consumer_group_with_lag(g: &pb::ConsumerGroup, lag: Option<u64>) -> Value {
    let mut v = consumer_group_json(g);
    v["lag"] = json!(lag);
    v
}

fn duration_secs(d: &Option<prost_types::Duration>) -> f64 {
    d.as_ref().map_or(0.0, |d| d.seconds as f64 + f64::from(d.nanos) / 1e9)
}

/// The `stats` table: one row per group and bound topic (a group that is not running
/// gets one row saying why).
pub fn stats_text(groups: &[pb::ConsumerGroupStatus]) -> String {
    let mut rows = vec![["GROUP", "NODE", "TOPIC", "LAG", "OLDEST_UNACKED", "SUBSCRIBERS", "PENDING", "IN_FLIGHT"]
        .map(String::from)
        .to_vec()];
    for g in groups {
        if !g.running {
            rows.push(vec![g.name.clone(), g.node_id.to_string(), format!("({})", g.error)]);
            continue;
        }
        let mut topics: Vec<(&String, &u64)> = g.topic_lag.iter().collect();
        topics.sort();
        for (topic, lag) in topics {
            rows.push(vec![
                g.name.clone(),
                g.node_id.to_string(),
                topic.clone(),
                lag.to_string(),
                format!("{:.1}s", duration_secs(&g.oldest_unacked_age)),
                g.subscribers.to_string(),
                g.pending.to_string(),
                g.in_flight.to_string(),
            ]);
        }
    }
    table(&rows)
}

/// Left-aligned columns two spaces apart; a row shorter than the header ends early, its
/// last cell running on (it does not widen the column it starts in).
fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let cell = |r: &Vec<String>, c: usize| r.get(c).filter(|_| c + 1 < r.len() || r.len() == columns).map(String::len);
    let widths: Vec<usize> = (0..columns).map(|c| rows.iter().filter_map(|r| cell(r, c)).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in rows {
        let cells: Vec<String> = r.iter().zip(&widths).map(|(s, w)| format!("{s:w$}")).collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
    }
    out
}

pub fn stats_json(r: &pb::DescribeConsumerGroupsResponse) -> Value {
    let groups: Vec<Value> = r
        .consumer_groups
        .iter()
        .map(|g| {
            json!({
                "name": g.name,
                "node_id": g.node_id,
                "running": g.running,
                "error": g.error,
                "lag": g.lag,
                "topic_lag": g.topic_lag,
                "oldest_unacked_seconds": duration_secs(&g.oldest_unacked_age),
                "committed_offsets": g.committed_offsets,
                "subscribers": g.subscribers,
                "pending": g.pending,
                "in_flight": g.in_flight,
                "size": g.size,
            })
        })
        .collect();
    json!({"consumer_groups": groups, "index": r.index})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_has_a_row_per_group_and_topic_and_says_why_a_group_has_none() {
        let running = pb::ConsumerGroupStatus {
            name: "orders".into(),
            node_id: 7,
            running: true,
            lag: 650,
            topic_lag: [("b".to_string(), 50), ("a".to_string(), 600)].into(),
            oldest_unacked_age: Some(prost_types::Duration { seconds: 3, nanos: 250_000_000 }),
            subscribers: 2,
            pending: 10,
            in_flight: 5,
            ..Default::default()
        };
        let idle = pb::ConsumerGroupStatus {
            name: "g".into(),
            error: "not placed on a live node yet".into(),
            ..Default::default()
        };
        let text = stats_text(&[running, idle]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "GROUP   NODE  TOPIC  LAG  OLDEST_UNACKED  SUBSCRIBERS  PENDING  IN_FLIGHT",
                "orders  7     a      600  3.2s            2            10       5",
                "orders  7     b      50   3.2s            2            10       5",
                "g       0     (not placed on a live node yet)",
            ]
        );
    }
}
