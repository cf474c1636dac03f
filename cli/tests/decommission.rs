//! Process-level tests of the day-2 commands: `list-nodes`, `decommission-node` and
//! `transfer-leadership`, on the real binary (127.0.0.171-174, port 28000): their
//! output, their errors and exit statuses, and a drained node leaving the cluster.

mod common;

use std::time::{Duration, Instant};

use common::*;

const PORT: u16 = 28000;

fn nodes_json(host: &str) -> serde_json::Value {
    let o = cli(host, PORT, &["list-nodes", "--output", "json"]);
    assert!(o.status.success(), "list-nodes: {}", stderr(&o));
    serde_json::from_str(stdout(&o).trim()).unwrap_or_else(|e| panic!("{e}: {}", stdout(&o)))
}

fn node_id(nodes: &serde_json::Value, host: &str) -> u64 {
    let addr = format!("{host}:{PORT}");
    let n = nodes["nodes"].as_array().unwrap().iter().find(|n| n["address"] == addr.as_str());
    n.unwrap_or_else(|| panic!("{addr} not in {nodes}"))["id"].as_u64().unwrap()
}

#[test]
fn decommission_drains_a_node_refuses_what_cannot_be_done_and_the_node_leaves() {
    let tmp = test_dir("decommission");
    let hosts = ["127.0.0.171", "127.0.0.172", "127.0.0.173"];
    let mut nodes = three_nodes(&tmp, hosts, PORT);
    let fourth = "127.0.0.174";
    nodes.push(Broker::start(fourth, PORT, &tmp.join("n3"), &[format!("{}:{PORT}", hosts[0])]));
    eventually(Duration::from_secs(40), "4 ALIVE voters in list-nodes", || {
        let o = cli(hosts[0], PORT, &["list-nodes"]);
        let text = stdout(&o);
        o.status.success() && text.matches("ALIVE").count() == 4 && text.matches("voter").count() == 4
    });
    let o =
        cli(hosts[0], PORT, &["create-topic", "t", "--replication-factor", "3", "--segment-size-max-bytes", "4096"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(cli(hosts[0], PORT, &["create-consumer-group", "g", "--bind", "t"]).status.success());
    let o = cli(hosts[1], PORT, &["publish", "t", "m{n}", "--count", "300"]);
    assert!(o.status.success(), "publish: {}", stderr(&o));

    // list-nodes: a table with the leader marked, nothing decommissioned yet.
    let text = stdout(&cli(hosts[0], PORT, &["list-nodes"]));
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["ID", "ADDRESS", "STATE", "RAFT", "LOAD", "DRAIN"], "{text}");
    assert_eq!(text.matches("(leader)").count(), 1, "{text}");
    assert_eq!(lines.filter(|l| l.trim_end().ends_with(" -")).count(), 4, "{text}");

    // Errors: usage (exit 2), an unknown node (exit 1, NotFound 2006), and nothing changed.
    let o = cli(hosts[0], PORT, &["decommission-node", "0"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("NODE_ID: must be a node's id"), "{}", stderr(&o));
    let o = cli(hosts[0], PORT, &["decommission-node", "12345"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("NotFound") && stderr(&o).contains("node_id: node 12345 is not a member of the cluster"),
        "{}",
        stderr(&o)
    );
    assert!(stdout(&o).is_empty());

    // Decommission the fourth node: accepted; a second one would leave 2 nodes for
    // replication factor 3: refused (exit 1, FailedPrecondition 4013), nothing changed.
    let before = nodes_json(hosts[0]);
    let gone = node_id(&before, fourth);
    let o = cli(hosts[1], PORT, &["decommission-node", &gone.to_string()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).starts_with("{\"ok\": true, \"index\": "), "{}", stdout(&o));
    let other = node_id(&before, hosts[2]);
    let o = cli(hosts[0], PORT, &["decommission-node", &other.to_string()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("FailedPrecondition")
            && stderr(&o).contains(&format!("decommissioning node {other} would leave 2 live node(s)"))
            && stderr(&o).contains("topic default/t keeps 3 copies"),
        "{}",
        stderr(&o)
    );

    // Progress until drained: then it is a Raft learner, and holds nothing.
    let started = Instant::now();
    eventually_explained(Duration::from_secs(60), "the node drained and a learner", || {
        let nodes = nodes_json(hosts[0]);
        let n = nodes["nodes"].as_array().unwrap().iter().find(|n| n["id"] == gone).cloned().unwrap();
        match (n["drain"]["state"].as_str(), n["raft_role"].as_str()) {
            (Some("drained"), Some("learner")) => Ok(()),
            _ => Err(n.to_string()),
        }
    });
    eprintln!("drained and demoted {:?} after decommission-node", started.elapsed());
    let text = stdout(&cli(hosts[0], PORT, &["list-nodes"]));
    let row = text.lines().find(|l| l.starts_with(&gone.to_string())).unwrap();
    assert!(row.contains("learner") && row.trim_end().ends_with("drained"), "{text}");
    let dump = stdout(&cli(hosts[0], PORT, &["dump"]));
    assert!(dump.contains("drain: drained"), "{dump}");

    // Every message is still there, from the remaining nodes.
    let got = subscribe(hosts[2], PORT, "g", &["--max-messages", "300", "--wait", "10s"]);
    let mut expected: Vec<String> = (1..=300).map(|n| format!("m{n}")).collect();
    let mut sorted = got.clone();
    sorted.sort();
    sorted.dedup();
    expected.sort();
    assert_eq!(sorted, expected, "after the drain");

    // transfer-leadership: to an unknown node refused; to any voter moves it.
    let o = cli(hosts[0], PORT, &["transfer-leadership", "--to", "12345"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("node 12345 is not a Raft voter"), "{}", stderr(&o));
    let leader = nodes_json(hosts[0])["leader_id"].as_u64().unwrap();
    let o = cli(hosts[0], PORT, &["transfer-leadership"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let moved: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(moved["ok"], true, "{moved}");
    let new_leader = moved["leader_id"].as_u64().unwrap();
    assert!(new_leader != leader && new_leader != gone && new_leader != 0, "{moved} (was {leader})");

    // Stopped, the drained node leaves the cluster at once.
    let status = nodes[3].terminate();
    assert!(status.success(), "SIGTERM exit status {status}");
    let stopped = Instant::now();
    eventually_explained(Duration::from_secs(20), "the drained node gone from list-nodes", || {
        let nodes = nodes_json(hosts[0]);
        let ids: Vec<u64> = nodes["nodes"].as_array().unwrap().iter().map(|n| n["id"].as_u64().unwrap()).collect();
        if ids.len() == 3 && !ids.contains(&gone) {
            Ok(())
        } else {
            Err(nodes.to_string())
        }
    });
    eprintln!("removed {:?} after its SIGTERM", stopped.elapsed());
    let o = cli(hosts[0], PORT, &["publish", "t", "after", "--count", "10"]);
    assert!(o.status.success(), "publish with three nodes: {}", stderr(&o));

    // A leader stopped with SIGTERM hands leadership over first, so writes resume
    // without an election timeout; after kill -9 the others wait one out (300-600 ms
    // in these tests). Both times are printed, not compared: on a loaded machine a
    // forwarded write's retries can take as long as an election.
    nodes.truncate(3);
    let mut gap = |graceful: bool| {
        let leader = nodes_json(hosts[0])["leader_id"].as_u64().unwrap();
        let li = (0..3).find(|i| node_id(&nodes_json(hosts[(i + 1) % 3]), hosts[*i]) == leader).unwrap();
        let writer = hosts[(li + 1) % 3];
        let t0 = Instant::now();
        if graceful {
            let handed_over = |log: String| log.matches("handed leadership over").count();
            let before = handed_over(nodes[li].log());
            assert!(nodes[li].terminate().success());
            assert_eq!(
                handed_over(nodes[li].log()),
                before + 1,
                "the stopped leader did not hand over: {}",
                nodes[li].log()
            );
        } else {
            nodes[li].kill9();
        }
        let stopped = t0.elapsed();
        let mut n = 0;
        eventually(Duration::from_secs(20), "a write after the leader stopped", || {
            n += 1;
            cli(writer, PORT, &["create-namespace", &format!("after-{graceful}-{n}")]).status.success()
        });
        let took = t0.elapsed() - stopped;
        eprintln!("leader stopped (graceful: {graceful}) in {stopped:?}");
        nodes[li].spawn();
        eventually(Duration::from_secs(30), "3 ALIVE voters again", || {
            let text = stdout(&cli(writer, PORT, &["list-nodes"]));
            text.matches("ALIVE").count() == 3 && text.matches("voter").count() == 3 && text.contains("(leader)")
        });
        took
    };
    let graceful = gap(true);
    let killed = gap(false);
    eprintln!(
        "first committed write {graceful:?} after the leader's SIGTERM ended (hand-over), {killed:?} after its kill -9"
    );

    // rebalance: three nodes, one segment of replication factor 3 and one group are as
    // fair as they can be: nothing moves. list-nodes shows each node's load. (First,
    // when a stopped leader was also the open segment's primary, the new leader's
    // placement pass opens the successor a moment after the restart: wait for it.)
    let loads = || {
        let nodes = nodes_json(hosts[0]);
        let loads: Vec<&serde_json::Value> = nodes["nodes"].as_array().unwrap().iter().map(|n| &n["load"]).collect();
        let primaries: u64 = loads.iter().map(|l| l["primaries"].as_u64().unwrap()).sum();
        let groups: u64 = loads.iter().map(|l| l["consumer_groups"].as_u64().unwrap()).sum();
        ((primaries, groups), nodes)
    };
    eventually(Duration::from_secs(20), "one open segment and one group placed", || loads().0 == (1, 1));
    let o = cli(hosts[1], PORT, &["rebalance"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let done: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(done, serde_json::json!({"ok": true, "index": 0, "consumer_groups_moved": 0, "segments_rotated": 0}));
    let (placed, nodes) = loads();
    assert_eq!(placed, (1, 1), "{nodes}");
}
