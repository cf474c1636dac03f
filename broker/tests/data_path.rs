//! Process-level tests of the data path: the real binary on 127.0.0.3x, publishing and
//! subscribing through the CLI as a user would, with nodes killed and restarted.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// Waits until three nodes are ALIVE, then creates topic `t` and group `g` bound to it.
fn cluster_with_topic_and_group(tmp: &std::path::Path, hosts: [&str; 3], port: u16) -> Vec<Broker> {
    let nodes = three_nodes(tmp, hosts, port);
    eventually(Duration::from_secs(30), "3 ALIVE nodes", || {
        let o = cli(hosts[2], port, &["dump"]);
        o.status.success() && alive_count(&stdout(&o)) == 3
    });
    let o = cli(hosts[0], port, &["create-topic", "t", "--replication-factor", "3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = cli(hosts[1], port, &["create-consumer-group", "g", "--bind", "t"]);
    assert!(o.status.success(), "{}", stderr(&o));
    nodes
}

fn publish_lines(host: &str, port: u16, topic: &str, lines: &[String]) -> String {
    let mut child = Command::new(BIN)
        .args(["--host", host, "--port", &port.to_string(), "publish", topic, "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for l in lines {
        writeln!(stdin, "{l}").unwrap();
    }
    drop(stdin);
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "publish failed: {}", stderr(&o));
    stdout(&o)
}

/// The data of each message `subscribe` printed, in order.
fn subscribe(host: &str, port: u16, group: &str, extra: &[&str]) -> Vec<String> {
    let mut args = vec!["subscribe", group];
    args.extend_from_slice(extra);
    let o = cli(host, port, &args);
    assert!(o.status.success(), "subscribe failed: {}", stderr(&o));
    stdout(&o)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            for key in ["topic", "segment_id", "offset"] {
                assert!(v.get(key).is_some(), "{key} missing in {l}");
            }
            let data = v["message"]["data"].as_str().unwrap();
            use base64::Engine as _;
            String::from_utf8(base64::engine::general_purpose::STANDARD.decode(data).unwrap()).unwrap()
        })
        .collect()
}

fn numbers(from: usize, to: usize) -> Vec<String> {
    (from..=to).map(|i| i.to_string()).collect()
}

#[test]
fn publish_on_one_node_subscribe_on_another_exactly_once() {
    let tmp = test_dir("data_exactly_once");
    let hosts = ["127.0.0.31", "127.0.0.32", "127.0.0.33"];
    let port = 26720;
    let _nodes = cluster_with_topic_and_group(&tmp, hosts, port);

    let sent = numbers(1, 1000);
    let out = publish_lines(hosts[1], port, "t", &sent);
    assert_eq!(out.trim(), r#"{"ok": true, "published": 1000}"#);

    let got = subscribe(hosts[2], port, "g", &["--max-messages", "1000", "--wait", "10s"]);
    assert_eq!(got, sent, "every message once, in publish order");
    // Acknowledged messages are gone for good.
    assert!(subscribe(hosts[0], port, "g", &["--wait", "1s"]).is_empty());

    // A generated batch (no stdin): a refused --count publishes nothing, a good one
    // publishes DATA with `{n}` numbered.
    let refused = cli(hosts[0], port, &["publish", "t", "-", "--count", "3"]);
    assert!(!refused.status.success());
    let o = cli(hosts[0], port, &["publish", "t", "gen-{n}", "--count", "300", "--batch-messages-max", "64"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), r#"{"ok": true, "published": 300}"#);
    let got = subscribe(hosts[2], port, "g", &["--max-messages", "300", "--wait", "10s"]);
    assert_eq!(got, (1..=300).map(|n| format!("gen-{n}")).collect::<Vec<_>>());
}

#[test]
fn confirmed_messages_survive_kill_9_of_the_primary() {
    let tmp = test_dir("data_kill_primary");
    let hosts = ["127.0.0.34", "127.0.0.35", "127.0.0.36"];
    let port = 26730;
    let mut nodes = cluster_with_topic_and_group(&tmp, hosts, port);

    let sent = numbers(1, 500);
    publish_lines(hosts[0], port, "t", &sent);
    // Kill the node holding the open segment's primary: the one that confirmed.
    let dump: serde_json::Value =
        serde_json::from_str(&stdout(&cli(hosts[0], port, &["dump", "--output", "json"]))).unwrap();
    let primary = dump["segments"][0]["primary_node_id"].as_u64().unwrap();
    let addr = dump["nodes"].as_array().unwrap().iter().find(|n| n["id"] == primary).unwrap()["address"]
        .as_str()
        .unwrap()
        .to_string();
    let victim = hosts.iter().position(|h| addr.starts_with(h)).unwrap();
    nodes[victim].kill9();
    let reader = hosts[(victim + 1) % 3];

    let got: BTreeSet<String> =
        subscribe(reader, port, "g", &["--max-messages", "500", "--wait", "20s"]).into_iter().collect();
    assert_eq!(got, sent.iter().cloned().collect::<BTreeSet<_>>(), "all 500 confirmed messages delivered");

    // The segment was failed over: closed at 500 messages, and publishing goes on.
    publish_lines(reader, port, "t", &["after".to_string()]);
    assert_eq!(subscribe(reader, port, "g", &["--max-messages", "1", "--wait", "10s"]), vec!["after"]);
}

#[test]
fn topic_bindings_match_words() {
    let tmp = test_dir("data_bindings");
    let hosts = ["127.0.0.37", "127.0.0.38", "127.0.0.39"];
    let port = 26740;
    let _nodes = cluster_with_topic_and_group(&tmp, hosts, port);
    for (name, pattern) in [("one", "t:a.*"), ("many", "t:a.#")] {
        let o = cli(hosts[0], port, &["create-consumer-group", name, "--bind-topic", pattern]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    for key in ["a.x", "a.y", "b.x", "a.x.y", "a"] {
        let o = cli(hosts[1], port, &["publish", "t", key, "--routing-key", key]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    assert_eq!(sorted(subscribe(hosts[2], port, "one", &["--wait", "3s"])), ["a.x", "a.y"]);
    assert_eq!(sorted(subscribe(hosts[2], port, "many", &["--wait", "3s"])), ["a", "a.x", "a.x.y", "a.y"]);
}

#[test]
fn graceful_restart_of_every_node_resumes_where_consumers_were() {
    let tmp = test_dir("data_restart");
    let hosts = ["127.0.0.40", "127.0.0.41", "127.0.0.42"];
    let port = 26750;
    let mut nodes = cluster_with_topic_and_group(&tmp, hosts, port);

    let sent = numbers(1, 100);
    publish_lines(hosts[1], port, "t", &sent);
    let first = subscribe(hosts[2], port, "g", &["--max-messages", "40", "--wait", "10s"]);
    assert_eq!(first, numbers(1, 40));

    for n in nodes.iter_mut() {
        assert!(n.terminate().success());
    }
    for n in nodes.iter_mut() {
        n.spawn();
    }
    eventually(Duration::from_secs(30), "3 ALIVE nodes after the restart", || {
        let o = cli(hosts[0], port, &["dump"]);
        o.status.success() && alive_count(&stdout(&o)) == 3
    });
    let rest = subscribe(hosts[0], port, "g", &["--wait", "5s"]);
    assert_eq!(rest, numbers(41, 100), "exactly the 60 not yet consumed");
}

#[test]
fn bad_publish_and_subscribe_requests_name_the_problem() {
    let tmp = test_dir("data_bad_input");
    let hosts = ["127.0.0.43", "127.0.0.44", "127.0.0.45"];
    let port = 26760;
    let _nodes = cluster_with_topic_and_group(&tmp, hosts, port);
    let cases: &[(&[&str], &str)] = &[
        (&["publish", "missing", "x"], "topic \"missing\" does not exist"),
        (&["publish", "t", "x", "--header", "novalue"], "--header: \"novalue\" must look like key=value"),
        (&["subscribe", "missing", "--wait", "1s"], "consumer_group: \"missing\" does not exist"),
        (&["subscribe", "g", "--wait", "soon"], "--wait: \"soon\" is not a duration"),
        (&["publish", "t", "x", "--count", "0"], "--count: must be at least 1"),
        (&["publish", "t", "-", "--count", "3"], "--count: publishes DATA; it cannot be combined with `-` (stdin)"),
    ];
    for (args, message) in cases {
        let o = cli(hosts[0], port, args);
        assert!(!o.status.success(), "{args:?} should fail");
        assert!(stderr(&o).contains(message), "{args:?}: {}", stderr(&o));
    }
}
