//! Exactly-once publishing through the real binary on 127.0.0.121-123: a CLI
//! `publish` through a node that is killed (kill -9) and restarted while it publishes
//! sends its unanswered requests again with the same producer id and numbers, and
//! every message is stored once.

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn dump_json(host: &str, port: u16) -> Option<serde_json::Value> {
    let o = cli(host, port, &["dump", "--output", "json"]);
    o.status.success().then(|| serde_json::from_str(&stdout(&o)).ok()).flatten()
}

/// `got` is `m-1` ... `m-<count>`, each once, in any order.
fn assert_each_once(got: &[String], count: u64) {
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for m in got {
        *seen.entry(m.as_str()).or_default() += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).map(|(m, _)| m).take(10).collect();
    assert!(twice.is_empty(), "stored twice: {twice:?} ...");
    let missing: Vec<_> =
        (1..=count).map(|n| format!("m-{n}")).filter(|m| !seen.contains_key(m.as_str())).take(10).collect();
    assert!(missing.is_empty(), "lost: {missing:?} ...");
    assert_eq!(got.len() as u64, count);
}

#[test]
fn a_publish_through_a_node_killed_and_restarted_stores_every_message_once() {
    let tmp = test_dir("exactly_once_kill");
    let hosts = ["127.0.0.121", "127.0.0.122", "127.0.0.123"];
    let port = 26850;
    let mut nodes = three_nodes(&tmp, hosts, port);
    create_topic_and_group(hosts, port);

    // The node the publisher talks to is the primary of the topic's open segment, so
    // the kill takes both its connection and the segment's primary.
    let mut primary = None;
    eventually(Duration::from_secs(30), "an open segment of t", || {
        let Some(d) = dump_json(hosts[0], port) else { return false };
        let open = d["segments"].as_array().into_iter().flatten().find(|s| s["topic"] == "t" && s["open"] == true);
        let Some(id) = open.and_then(|s| s["primary_node_id"].as_u64()) else { return false };
        let node = d["nodes"].as_array().unwrap().iter().find(|n| n["id"] == id).cloned();
        primary = node.and_then(|n| hosts.iter().position(|h| n["address"].as_str().unwrap().starts_with(h)));
        primary.is_some()
    });
    let victim = primary.unwrap();
    let host = hosts[victim];

    // Small requests, many of them: the kill finds some answered, some in flight. An
    // unloaded machine stores 20,000 in about 0.1 s, as long as a `dump` takes: enough
    // that the kill comes while most are still to be sent, and few enough that a debug
    // build repeats the publish well within the brokers' 2 min duplicate window.
    const COUNT: u64 = 50_000;
    let publish = |extra: &[&str]| {
        let mut cmd = Command::new(BIN);
        cmd.args(["--host", host, "--port", &port.to_string(), "publish", "t", "m-{n}"])
            .args(["--count", &COUNT.to_string(), "--batch-messages-max", "10", "--producer-id", "4242"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    };
    let publisher = publish(&["--retry-for", "60s"]).spawn().unwrap();
    // Kill once part of it is stored on the primary.
    let started = Instant::now();
    eventually(Duration::from_secs(60), "some messages stored before the kill", || {
        let Some(d) = dump_json(host, port) else { return false };
        let local = d["local_segments"].as_array().cloned().unwrap_or_default();
        local.iter().any(|s| s["open"] == true && s["messages"].as_u64().unwrap_or(0) > 1_000)
    });
    nodes[victim].kill9();
    std::thread::sleep(Duration::from_secs(1));
    nodes[victim].spawn();

    let o = publisher.wait_with_output().unwrap();
    // What a user sees through the kill (kept in the test's output).
    eprintln!("publish through the kill, after {:?}; its stderr:\n{}", started.elapsed(), stderr(&o));
    assert!(o.status.success(), "publish exited {:?} after {:?}: {}", o.status.code(), started.elapsed(), stderr(&o));
    assert_eq!(stdout(&o).trim(), format!(r#"{{"ok": true, "published": {COUNT}}}"#));
    assert!(stderr(&o).contains("retrying with the same producer id"), "the kill was not noticed: {}", stderr(&o));

    // Every message exactly once.
    let reader = hosts[(victim + 1) % 3];
    let got = subscribe(reader, port, "g", &["--max-messages", &COUNT.to_string(), "--wait", "20s"]);
    assert_each_once(&got, COUNT);
    assert!(subscribe(reader, port, "g", &["--wait", "2s"]).is_empty(), "nothing more");

    // The same command again, same producer id: every request is a repeat, answered as
    // stored, and nothing is stored a second time.
    let o = publish(&[]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), format!(r#"{{"ok": true, "published": {COUNT}}}"#));
    assert!(subscribe(reader, port, "g", &["--wait", "3s"]).is_empty(), "a repeated run stored messages again");
    // A number names one request: reusing it for another is refused, not ignored.
    let one = cli(reader, port, &["publish", "t", "other", "--producer-id", "4242"]);
    assert_eq!(one.status.code(), Some(1), "{}", stderr(&one));
    assert!(stderr(&one).contains("used sequence 1 for a request of 10 message(s)"), "{}", stderr(&one));
}
