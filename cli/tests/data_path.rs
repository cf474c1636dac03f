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
    create_topic_and_group(hosts, port);
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

#[test]
fn publishing_is_refused_while_fewer_nodes_are_up_than_min_insync_replicas() {
    let tmp = test_dir("data_refused");
    let hosts = ["127.0.0.49", "127.0.0.50", "127.0.0.51"];
    let port = 26780;
    let mut nodes = cluster_with_topic_and_group(&tmp, hosts, port);
    let o = cli(hosts[0], port, &["create-topic", "all", "--min-insync-replicas", "4"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("min_insync_replicas: 4 is above the replication factor 3"), "{}", stderr(&o));

    nodes[2].kill9();
    eventually(Duration::from_secs(30), "the killed node DEAD", || {
        stdout(&cli(hosts[0], port, &["dump"])).contains(&format!("address: \"{}:{port}\"\n  state: DEAD", hosts[2]))
    });
    // Every message of `all` must be on all three nodes: with two up it is refused, and
    // nothing is stored.
    let o = cli(hosts[0], port, &["create-topic", "all", "--min-insync-replicas", "3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = cli(hosts[1], port, &["publish", "all", "refused"]);
    assert!(!o.status.success(), "confirmed with a node down: {}", stdout(&o));
    assert!(
        stderr(&o).contains("Unavailable")
            && stderr(&o).contains(
                "topic \"all\" needs 3 in-sync copies (min_insync_replicas) of each message and 2 node(s) are ALIVE"
            ),
        "{}",
        stderr(&o)
    );
    let dump = dump_json(hosts[0], port).unwrap();
    assert!(dump["segments"].as_array().unwrap().iter().all(|s| s["topic"] != "all"), "no segment opened");
    // `t` (a majority, 2 of 3) still takes messages, and lists as under-replicated.
    assert!(cli(hosts[1], port, &["publish", "t", "kept"]).status.success());
    assert!(stdout(&cli(hosts[0], port, &["list-topics"])).contains("\"min_insync_replicas\":3,\"name\":\"all\""));

    nodes[2].spawn();
    let o = cli(hosts[1], port, &["publish", "all", "accepted"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let dump = dump_json(hosts[0], port).unwrap();
    let all: Vec<_> = dump["segments"].as_array().unwrap().iter().filter(|s| s["topic"] == "all").cloned().collect();
    assert_eq!(all.len(), 1);
    assert_eq!(ids(&all[0]["replica_node_ids"]).len(), 3, "{all:?}");
}

/// The cluster state as `dump --output json` on `host` shows it.
fn dump_json(host: &str, port: u16) -> Option<serde_json::Value> {
    let o = cli(host, port, &["dump", "--output", "json"]);
    o.status.success().then(|| serde_json::from_str(&stdout(&o)).ok()).flatten()
}

/// Segments of topic `t` in a JSON dump.
fn topic_segments(dump: &serde_json::Value) -> Vec<serde_json::Value> {
    dump["segments"].as_array().into_iter().flatten().filter(|s| s["topic"] == "t").cloned().collect()
}

fn ids(v: &serde_json::Value) -> Vec<u64> {
    v.as_array().into_iter().flatten().filter_map(|n| n.as_u64()).collect()
}

/// Finding 0 of the data-safety issue: full restarts of every node (SIGTERM 0.3 s apart,
/// as a StatefulSet restart or a drain does) while publishers run through every node
/// once opened segments of a replication-factor-3 topic on the one node the leader saw
/// alive, confirmed every publish there after one fsync, and lost them all to a bit
/// flip. Now no segment is opened on fewer than min_insync_replicas (2) nodes, closed
/// ones are copied back up to 3, and a damaged copy on one node loses nothing.
#[test]
fn full_restarts_never_leave_a_segment_on_one_node_and_a_bit_flip_loses_nothing() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    let tmp = test_dir("data_min_insync");
    let hosts = ["127.0.0.46", "127.0.0.47", "127.0.0.48"];
    let port = 26770;
    let mut nodes = cluster_with_topic_and_group(&tmp, hosts, port);

    // One publisher per node, one message per CLI call: a call that exits 0 was confirmed.
    let stop = Arc::new(AtomicBool::new(false));
    let confirmed = Arc::new(Mutex::new(BTreeSet::new()));
    let publishers: Vec<_> = hosts
        .iter()
        .map(|host| {
            let (host, stop, confirmed) = (host.to_string(), stop.clone(), confirmed.clone());
            std::thread::spawn(move || {
                let deadline = std::time::Instant::now() + Duration::from_secs(240);
                for i in 0..100_000 {
                    if stop.load(Ordering::Relaxed) || std::time::Instant::now() > deadline {
                        return;
                    }
                    let data = format!("{host}-{i}");
                    if cli(&host, port, &["publish", "t", &data]).status.success() {
                        confirmed.lock().unwrap().insert(data);
                    } else {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            })
        })
        .collect();

    for round in 0..6 {
        let before = confirmed.lock().unwrap().len();
        eventually(Duration::from_secs(30), "publishes confirmed before the restart", || {
            confirmed.lock().unwrap().len() >= before + 20
        });
        let children: Vec<_> = nodes.iter_mut().map(|n| n.child.take().unwrap()).collect();
        for c in &children {
            Command::new("kill").args(["-TERM", &c.id().to_string()]).status().unwrap();
            std::thread::sleep(Duration::from_millis(300));
        }
        for (mut c, n) in children.into_iter().zip(nodes.iter_mut()) {
            let status = c.wait().unwrap();
            assert!(status.success(), "round {round}: a node exited with {status} after SIGTERM");
            n.spawn();
        }
    }
    let before = confirmed.lock().unwrap().len();
    eventually(Duration::from_secs(30), "publishes confirmed after the last restart", || {
        confirmed.lock().unwrap().len() >= before + 20
    });
    stop.store(true, Ordering::Relaxed);
    for p in publishers {
        p.join().unwrap();
    }

    // Every segment of the topic was opened on at least two nodes, and once every node
    // is back each closed one has three complete copies.
    let mut dump = serde_json::Value::Null;
    eventually(Duration::from_secs(60), "every closed segment complete on 3 nodes", || {
        let Some(d) = dump_json(hosts[0], port) else { return false };
        let closed_complete =
            topic_segments(&d).iter().filter(|s| s["open"] != true).all(|s| ids(&s["done_node_ids"]).len() == 3);
        dump = d;
        alive_count(&stdout(&cli(hosts[0], port, &["dump"]))) == 3 && closed_complete
    });
    let segments = topic_segments(&dump);
    // What each segment was opened on, from the leaders' logs ("opening a segment ...
    // replicas=[a, b, c]"): at least min_insync_replicas (2) nodes, every time.
    let opened: Vec<usize> = nodes
        .iter()
        .flat_map(|n| {
            n.log().lines().filter(|l| l.contains("opening a segment")).map(str::to_string).collect::<Vec<_>>()
        })
        .map(|l| {
            let list = l.split("replicas=[").nth(1).and_then(|r| r.split(']').next()).unwrap_or_else(|| panic!("{l}"));
            list.split(',').count()
        })
        .collect();
    assert!(opened.len() >= 7, "six full restarts close and open segments: {opened:?}");
    assert!(opened.iter().all(|n| *n >= 2), "segments opened on one node: {opened:?}");
    for s in &segments {
        let replicas = ids(&s["replica_node_ids"]);
        assert!(replicas.len() >= 2, "segment {} was opened on {replicas:?}", s["id"]);
    }

    // Flip a bit inside the records of every sealed copy on one node.
    let victim = 1;
    let victim_id = dump["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["address"].as_str().unwrap().starts_with(hosts[victim]))
        .unwrap()["id"]
        .as_u64()
        .unwrap();
    nodes[victim].kill9();
    let mut flipped = 0;
    for s in segments.iter().filter(|s| s["open"] != true && s["messages"].as_u64() > Some(0)) {
        if !ids(&s["done_node_ids"]).contains(&victim_id) {
            continue;
        }
        let file = tmp.join(format!("n{victim}/segments/{:020}.seg", s["id"].as_u64().unwrap()));
        let mut bytes = std::fs::read(&file).unwrap();
        bytes[28 + 24 + 2] ^= 0x10; // the first record's payload
        std::fs::write(&file, bytes).unwrap();
        flipped += 1;
    }
    assert!(flipped > 0, "no sealed copy with records on node {victim}");
    nodes[victim].spawn();
    eventually(Duration::from_secs(30), "3 ALIVE nodes after the bit flips", || {
        let o = cli(hosts[0], port, &["dump"]);
        o.status.success() && alive_count(&stdout(&o)) == 3
    });

    let confirmed = confirmed.lock().unwrap().clone();
    let got: BTreeSet<String> = subscribe(hosts[victim], port, "g", &["--wait", "10s"]).into_iter().collect();
    let lost: Vec<_> = confirmed.difference(&got).collect();
    assert!(lost.is_empty(), "{} of {} confirmed messages lost: {lost:?}", lost.len(), confirmed.len());
}

/// Issue 13, finding 3: one publisher waits for each of `m-1` … `m-150`, the primary of
/// the shard's segment is killed (kill -9), `m-151` … `m-300` go through another node:
/// the fail-over closes generation 1 and opens generation 2, and a subscriber used to
/// get some of generation 2 before generation 1. Now a shard's generations are
/// delivered in order: every message once, in publish order. A publish that failed
/// and was sent again may have been stored twice (its first outcome was unknown);
/// such a retried message may appear twice, never any other.
#[test]
fn a_shard_keeps_publish_order_across_kill_9_of_its_primary() {
    let tmp = test_dir("data_order_fail_over");
    let hosts = ["127.0.0.74", "127.0.0.75", "127.0.0.76"];
    let port = 26810;
    let mut nodes = cluster_with_topic_and_group(&tmp, hosts, port);
    let sent: Vec<String> = (1..=300).map(|n| format!("m-{n}")).collect();
    // Each call exits once the publish is confirmed; a failed one (the fail-over may
    // outlast a call's own retries) is sent again until this deadline.
    let publish_one_by_one = |host: &str, messages: &[String], retried: &mut BTreeSet<String>| {
        for m in messages {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            loop {
                let o = cli(host, port, &["publish", "t", m]);
                if o.status.success() {
                    break;
                }
                assert!(std::time::Instant::now() < deadline, "publishing {m} through {host}: {}", stderr(&o));
                retried.insert(m.clone());
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    let mut retried = BTreeSet::new();
    publish_one_by_one(hosts[0], &sent[..150], &mut retried);
    assert!(retried.is_empty(), "publishes failed before any fault: {retried:?}");

    let dump = dump_json(hosts[0], port).unwrap();
    let open: Vec<_> = topic_segments(&dump).into_iter().filter(|s| s["open"] == true).collect();
    assert_eq!(open.len(), 1, "one shard, one open segment: {open:?}");
    let primary = open[0]["primary_node_id"].as_u64().unwrap();
    let addr = dump["nodes"].as_array().unwrap().iter().find(|n| n["id"] == primary).unwrap()["address"]
        .as_str()
        .unwrap()
        .to_string();
    let victim = hosts.iter().position(|h| addr.starts_with(h)).unwrap();
    nodes[victim].kill9();
    // Another node than the killed one and than the first publisher's, when it lives.
    let survivors: Vec<&str> = (0..3).filter(|i| *i != victim).map(|i| hosts[i]).collect();
    let publisher = *survivors.iter().find(|h| **h != hosts[0]).unwrap();
    publish_one_by_one(publisher, &sent[150..], &mut retried);

    let reader = *survivors.iter().find(|h| **h != publisher).unwrap_or(&publisher);
    let want = (sent.len() + retried.len()).to_string();
    let mut got = subscribe(reader, port, "g", &["--max-messages", &want, "--wait", "20s"]);
    // Nothing is left over.
    got.extend(subscribe(reader, port, "g", &["--wait", "2s"]));
    let mut seen = BTreeSet::new();
    let firsts: Vec<String> = got.iter().filter(|m| seen.insert(m.to_string())).cloned().collect();
    let first_wrong = firsts.iter().zip(&sent).position(|(g, s)| g != s);
    assert!(
        firsts == sent,
        "every message, in publish order: {} of {} arrived, first out of place at {first_wrong:?}: {:?}",
        firsts.len(),
        sent.len(),
        &firsts[first_wrong.unwrap_or(0).saturating_sub(3)..(first_wrong.unwrap_or(0) + 20).min(firsts.len())],
    );
    let not_retried = got.iter().filter(|m| !retried.contains(*m)).count();
    assert_eq!(not_retried, sent.len() - retried.len(), "only a retried publish may arrive twice: {retried:?}");

    // The fault struck where intended: generation 1 was closed by the fail-over with
    // the 150 messages confirmed before it, and generation 2 took the rest.
    let dump = dump_json(reader, port).unwrap();
    let mut segments = topic_segments(&dump);
    segments.sort_by_key(|s| s["generation"].as_u64());
    assert!(segments.len() >= 2, "{segments:?}");
    assert_eq!((segments[0]["open"].as_bool(), segments[0]["messages"].as_u64()), (Some(false), Some(150)));
}

/// A subscriber with `--no-auto-ack` that never acks gets its messages again after the
/// group's ack timeout, with `delivery_count` 2 and `redelivered`, and each message
/// says when the broker stored it.
#[test]
fn unacknowledged_messages_come_again_after_the_ack_timeout_counted() {
    let tmp = test_dir("data_ack_timeout");
    let (host, port) = ("127.0.0.141", 27100);
    let _node = Broker::start(host, port, &tmp.join("n1"), &[]);
    eventually(Duration::from_secs(30), "the node ALIVE", || alive_count(&stdout(&cli(host, port, &["dump"]))) == 1);
    let o = cli(host, port, &["create-topic", "t", "--replication-factor", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = cli(host, port, &["create-consumer-group", "g", "--bind", "t", "--ack-timeout-ms", "1000"]);
    assert!(o.status.success(), "{}", stderr(&o));
    publish_lines(host, port, "t", &numbers(1, 3));

    let started = std::time::Instant::now();
    let o = cli(host, port, &["subscribe", "g", "--no-auto-ack", "--max-messages", "6", "--wait", "10s"]);
    assert!(o.status.success(), "subscribe failed: {}", stderr(&o));
    assert!(started.elapsed() >= Duration::from_secs(1), "redelivered before the ack timeout");
    let lines: Vec<serde_json::Value> = stdout(&o).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let seen: Vec<(u64, u64, bool)> = lines
        .iter()
        .map(|v| {
            assert!(v["timestamp_ms"].as_i64().is_some_and(|t| t > 1_600_000_000_000), "{v}");
            (v["offset"].as_u64().unwrap(), v["delivery_count"].as_u64().unwrap(), v["redelivered"].as_bool().unwrap())
        })
        .collect();
    let expected: Vec<(u64, u64, bool)> = (0..3).map(|o| (o, 1, false)).chain((0..3).map(|o| (o, 2, true))).collect();
    assert_eq!(seen, expected);
}

/// A message nacked or timed out `--deliveries-max` times goes to the group's
/// dead-letter topic with headers saying where it came from and why; the group then
/// changes in place (`update-consumer-group`) without redelivering what was done;
/// `--since 1h` means the past hour, and a malformed one names the accepted forms.
#[test]
fn dead_letters_group_updates_and_since() {
    let tmp = test_dir("data_dead_letters");
    let (host, port) = ("127.0.0.142", 27110);
    let _node = Broker::start(host, port, &tmp.join("n1"), &[]);
    eventually(Duration::from_secs(30), "the node ALIVE", || alive_count(&stdout(&cli(host, port, &["dump"]))) == 1);
    let ok = |args: &[&str]| {
        let o = cli(host, port, args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    };
    for t in ["t", "u", "dead"] {
        ok(&["create-topic", t, "--replication-factor", "1"]);
    }
    let dead_letters = ["--deliveries-max", "2", "--dead-letter-topic", "dead"];
    let mut create = vec!["create-consumer-group", "g", "--bind", "t", "--ack-timeout-ms", "500"];
    create.extend(dead_letters);
    ok(&create);
    ok(&["create-consumer-group", "d", "--bind", "dead"]);
    let o = cli(host, port, &["create-consumer-group", "loop", "--bind", "t", "--dead-letter-topic", "t"]);
    assert!(!o.status.success() && stderr(&o).contains("dead_letter_topic"), "{}", stderr(&o));
    publish_lines(host, port, "t", &numbers(1, 3));

    // Delivered twice (the ack timeout takes them back), never acked: dead-lettered.
    let got = subscribe(host, port, "g", &["--no-auto-ack", "--max-messages", "6", "--wait", "10s"]);
    assert_eq!(got, ["1", "2", "3", "1", "2", "3"]);
    let o = cli(host, port, &["subscribe", "d", "--max-messages", "3", "--wait", "10s"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let dead: Vec<serde_json::Value> = stdout(&o).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(dead.len(), 3, "{}", stdout(&o));
    for (i, v) in dead.iter().enumerate() {
        let h = &v["message"]["headers"];
        assert_eq!(h["x-first-death-reason"], "delivery_limit", "{v}");
        assert_eq!((&h["x-first-death-queue"], &h["x-first-death-exchange"]), (&"g".into(), &"t".into()), "{v}");
        assert_eq!((&h["x-delivery-count"], &h["x-eventtermq-offset"]), (&"2".into(), &i.to_string().into()), "{v}");
    }
    assert!(subscribe(host, port, "g", &["--wait", "2s"]).is_empty(), "nothing left for g");

    // Updated in place: a new binding takes what is published from now on, nothing
    // done comes again.
    publish_lines(host, port, "u", &["before".to_string()]);
    let mut update = vec!["update-consumer-group", "g", "--bind", "t", "--bind", "u"];
    update.extend(dead_letters);
    ok(&update);
    let o = cli(host, port, &["update-consumer-group", "nope", "--bind", "t"]);
    assert!(!o.status.success() && stderr(&o).contains("nope"), "{}", stderr(&o));
    publish_lines(host, port, "u", &["after".to_string()]);
    assert_eq!(subscribe(host, port, "g", &["--wait", "3s"]), ["after"]);

    // --since: a duration is the past.
    ok(&["create-consumer-group", "h", "--bind", "t", "--since", "1h"]);
    assert_eq!(subscribe(host, port, "h", &["--max-messages", "3", "--wait", "10s"]), numbers(1, 3));
    let o = cli(host, port, &["create-consumer-group", "x", "--bind", "t", "--since", "yesterday"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("RFC 3339") && stderr(&o).contains("Unix seconds"), "{}", stderr(&o));
}

/// A quiet topic expires: its open segment closes at `--segment-age-max-ms` (it holds
/// records), and once its group acknowledged them, retention deletes it; a group
/// created afterwards finds nothing old.
#[test]
fn a_quiet_topic_expires_by_segment_age_and_retention() {
    let tmp = test_dir("data_quiet_retention");
    let (host, port) = ("127.0.0.143", 27120);
    let _node = Broker::start(host, port, &tmp.join("n1"), &[]);
    eventually(Duration::from_secs(30), "the node ALIVE", || alive_count(&stdout(&cli(host, port, &["dump"]))) == 1);
    let o = cli(
        host,
        port,
        &["create-topic", "q", "--replication-factor", "1", "--retention", "2s", "--segment-age-max-ms", "1000"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = cli(host, port, &["create-consumer-group", "g", "--bind", "q"]);
    assert!(o.status.success(), "{}", stderr(&o));
    publish_lines(host, port, "q", &numbers(1, 3));
    assert_eq!(subscribe(host, port, "g", &["--max-messages", "3", "--wait", "10s"]), numbers(1, 3));
    let mut attempt = 0;
    eventually(Duration::from_secs(30), "old records gone for a new group", || {
        attempt += 1;
        let late = format!("late{attempt}");
        let o = cli(host, port, &["create-consumer-group", &late, "--bind", "q"]);
        assert!(o.status.success(), "{}", stderr(&o));
        subscribe(host, port, &late, &["--wait", "1s"]).is_empty()
    });
    let o = cli(host, port, &["--output", "json", "list-topics"]);
    let topics: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let q = &topics["topics"][0];
    assert_eq!((&q["segment_age_max_ms"], &q["retention_overrides_consumers"]), (&1000.into(), &false.into()), "{q}");
}

/// Retention by size: 50 MiB published to a topic that keeps 10 MiB in 1 MiB
/// segments, all consumed; the oldest closed segments go and about 10 MiB stays,
/// which `list-topics` and `dump` show with the time the oldest kept segment began.
#[test]
fn retention_by_size_keeps_about_the_limit_and_list_topics_says_so() {
    const MIB: u64 = 1 << 20;
    let tmp = test_dir("data_retention_bytes");
    let (host, port) = ("127.0.0.147", 27140);
    let _node = Broker::start(host, port, &tmp.join("n1"), &[]);
    eventually(Duration::from_secs(30), "the node ALIVE", || alive_count(&stdout(&cli(host, port, &["dump"]))) == 1);
    let (limit, segment) = ((10 * MIB).to_string(), MIB.to_string());
    let create = [
        "create-topic",
        "big",
        "--replication-factor",
        "1",
        "--retention-bytes-max",
        &limit,
        "--segment-size-max-bytes",
        &segment,
    ];
    let o = cli(host, port, &create);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = cli(host, port, &["create-consumer-group", "g", "--bind", "big", "--size", "1000"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let started_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    // 5,000 messages of 10 KiB: 50 MiB.
    let data = format!("{{n}}:{}", "x".repeat(10 * 1024));
    let o = cli(host, port, &["publish", "big", &data, "--count", "5000", "--batch-messages-max", "50"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = cli(host, port, &["subscribe", "g", "--max-messages", "5000", "--wait", "30s"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).lines().count(), 5000);

    let topic = || {
        let o = cli(host, port, &["--output", "json", "list-topics"]);
        let topics: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
        topics["topics"][0].clone()
    };
    // The closed segments kept hold at most the limit; the open one up to a segment.
    eventually_explained(Duration::from_secs(60), "about 10 MiB kept", || {
        let kept = topic()["retained_bytes"].as_u64().unwrap();
        if (8 * MIB..=11 * MIB + MIB / 2).contains(&kept) {
            return Ok(());
        }
        Err(format!("{kept} bytes kept; the cluster state:\n{}", stdout(&cli(host, port, &["dump"]))))
    });
    let t = topic();
    let since = t["retained_since_unix_ms"].as_i64().unwrap();
    assert!(since > started_ms, "the oldest segments are gone: {t}");
    let dump = stdout(&cli(host, port, &["dump"]));
    assert!(dump.contains(&format!("retained_bytes: {}", t["retained_bytes"])), "{dump}");
    assert!(dump.contains("retained_since: <"), "{dump}");
}

/// On a 3-shard topic, the messages of one routing key all go to one shard and keep
/// their order, whichever node the publisher uses; requests without a key spread
/// evenly over the shards.
#[test]
fn keyed_messages_keep_one_shard_and_their_order_unkeyed_ones_spread() {
    let tmp = test_dir("data_keyed_shards");
    let hosts = ["127.0.0.144", "127.0.0.145", "127.0.0.146"];
    let port = 27130;
    let _nodes = three_nodes(&tmp, hosts, port);
    eventually(Duration::from_secs(30), "3 ALIVE nodes", || alive_count(&stdout(&cli(hosts[0], port, &["dump"]))) == 3);
    let ok = |host: &str, args: &[&str]| {
        let o = cli(host, port, args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    };
    ok(hosts[0], &["create-topic", "k", "--shards", "3"]);
    ok(hosts[0], &["create-consumer-group", "g", "--bind", "k"]);
    eventually(Duration::from_secs(20), "3 open segments", || {
        stdout(&cli(hosts[0], port, &["dump"])).matches("open: true").count() >= 3
    });
    let (keys, per_key) = (20, 25);
    for key in 0..keys {
        let host = hosts[key % 3];
        ok(
            host,
            &[
                "publish",
                "k",
                &format!("{key}:{{n}}"),
                "--count",
                &per_key.to_string(),
                "--routing-key",
                &format!("key{key}"),
            ],
        );
    }
    // 300 requests of one message through one node. A fixed producer id: the spread
    // checked below is then the same every run (with the CLI's random one, a third of
    // 300 falls outside 80-120 about once in 25 runs).
    ok(
        hosts[2],
        &["publish", "k", "plain:{n}", "--count", "300", "--batch-messages-max", "1", "--producer-id", "20261207"],
    );
    let total = keys * per_key + 300;
    let o = cli(hosts[1], port, &["subscribe", "g", "--max-messages", &total.to_string(), "--wait", "20s"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o_dump = cli(hosts[0], port, &["--output", "json", "dump"]);
    let dump: serde_json::Value = serde_json::from_str(stdout(&o_dump).trim()).unwrap();
    let shard_of: std::collections::BTreeMap<u64, u64> = dump["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["id"].as_u64().unwrap(), s["shard"].as_u64().unwrap()))
        .collect();
    // Per key: (shard, segment, offset, n) of each message.
    let mut by_key: std::collections::BTreeMap<String, Vec<(u64, u64, u64, u64)>> = Default::default();
    let mut plain_per_shard = [0u32; 3];
    for line in stdout(&o).lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        use base64::Engine as _;
        let data = base64::engine::general_purpose::STANDARD.decode(v["message"]["data"].as_str().unwrap()).unwrap();
        let data = String::from_utf8(data).unwrap();
        let (seg, off) = (v["segment_id"].as_u64().unwrap(), v["offset"].as_u64().unwrap());
        let shard = shard_of[&seg];
        let (prefix, n) = data.split_once(':').unwrap();
        if prefix == "plain" {
            plain_per_shard[shard as usize] += 1;
        } else {
            by_key.entry(prefix.to_string()).or_default().push((shard, seg, off, n.parse().unwrap()));
        }
    }
    assert_eq!(by_key.len(), keys, "every key delivered");
    let mut shards_used = std::collections::BTreeSet::new();
    for (key, mut got) in by_key {
        assert_eq!(got.len(), per_key, "key {key}");
        assert!(got.iter().all(|g| g.0 == got[0].0), "key {key} in one shard: {got:?}");
        shards_used.insert(got[0].0);
        got.sort_by_key(|g| (g.1, g.2));
        let ns: Vec<u64> = got.iter().map(|g| g.3).collect();
        assert_eq!(ns, (1..=per_key as u64).collect::<Vec<_>>(), "key {key} in publish order");
    }
    assert_eq!(shards_used.len(), 3, "20 keys use every shard");
    assert_eq!(plain_per_shard.iter().sum::<u32>(), 300);
    // Exactly-once requests (the CLI's) spread by their ids: within 20 % of a third
    // for 300 requests (the unit test of `shard_of` checks 10 % over 3,000).
    assert!(plain_per_shard.iter().all(|n| (80..=120).contains(n)), "unkeyed spread: {plain_per_shard:?}");
}

/// Descriptors of process `pid` open on segment files (and indexes) under `dir`.
fn fds_under(pid: u32, dir: &std::path::Path) -> usize {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap();
    let segment_file =
        |t: &std::path::Path| t.starts_with(dir) && t.extension().is_some_and(|e| e == "seg" || e == "idx");
    fds.flatten().filter(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| segment_file(&t))).count()
}

/// At most `max` segment-file descriptors, once reads in progress (which open closed
/// segments' files for a moment) are done.
fn settles_at_most(pid: u32, dir: &std::path::Path, max: usize, when: &str) {
    eventually_explained(Duration::from_secs(10), &format!("at most {max} descriptors {when}"), || {
        let n = fds_under(pid, dir);
        if n <= max {
            Ok(())
        } else {
            Err(format!("{n}"))
        }
    });
}

/// 30 quiet topics on a node that keeps at most 8 open segments' files: the node holds
/// at most 16 descriptors on segment files, before and after a restart, and every
/// topic still takes publishes and delivers them.
#[test]
fn quiet_topics_beyond_the_open_segments_limit_hold_no_descriptors_and_still_work() {
    let tmp = test_dir("data_open_segments_max");
    let (host, port) = ("127.0.0.148", 27150);
    let dir = tmp.join("n1");
    let mut node = Broker::start_with(host, port, &dir, &["--open-segments-max", "8"]);
    eventually(Duration::from_secs(30), "the node ALIVE", || alive_count(&stdout(&cli(host, port, &["dump"]))) == 1);
    let topics: Vec<String> = (0..30).map(|i| format!("t{i}")).collect();
    let mut group = vec!["create-consumer-group", "g"];
    for t in &topics {
        let o = cli(host, port, &["create-topic", t, "--replication-factor", "1"]);
        assert!(o.status.success(), "{}", stderr(&o));
        group.extend(["--bind", t.as_str()]);
    }
    let o = cli(host, port, &group);
    assert!(o.status.success(), "{}", stderr(&o));
    let publish_all = |round: &str| {
        for t in &topics {
            let o = cli(host, port, &["publish", t, &format!("{t}-{round}")]);
            assert!(o.status.success(), "{t}: {}", stderr(&o));
        }
    };
    let segments = dir.join("segments");
    publish_all("a");
    let pid = node.child.as_ref().unwrap().id();
    settles_at_most(pid, &segments, 16, "on segment files");
    node.terminate();
    node.spawn();
    eventually(Duration::from_secs(30), "the node back", || alive_count(&stdout(&cli(host, port, &["dump"]))) == 1);
    let pid = node.child.as_ref().unwrap().id();
    settles_at_most(pid, &segments, 16, "after a restart");
    publish_all("b");
    let mut got = subscribe(host, port, "g", &["--max-messages", "60", "--wait", "30s"]);
    got.sort();
    let mut expected: Vec<String> = topics.iter().flat_map(|t| [format!("{t}-a"), format!("{t}-b")]).collect();
    expected.sort();
    assert_eq!(got, expected);
    settles_at_most(pid, &segments, 16, "after reading every topic");
}
