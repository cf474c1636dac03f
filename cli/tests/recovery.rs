//! Process-level tests of the way back from damaged files of one node (issue 13, item
//! 6b): the node refuses to start with an error that names the file and says what to
//! do, and doing it brings the node back as a new member without losing data.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn a_damaged_vote_stops_the_node_and_rejoining_with_a_fresh_dir_brings_it_back() {
    // One bit of the vote, the file's last byte (its record's payload).
    damaged_raft_file_way_back("recovery_vote", ["127.0.0.101", "127.0.0.102", "127.0.0.103"], 26840, "vote", |b| {
        b.len() - 1
    });
}

#[test]
fn a_raft_log_damaged_before_its_end_stops_the_node_and_the_same_way_back_works() {
    // One bit in the middle of the log: synced entries follow it, so it is damage,
    // not a torn write, and cutting the log there would forget acknowledged entries.
    damaged_raft_file_way_back("recovery_log", ["127.0.0.104", "127.0.0.105", "127.0.0.106"], 26850, "log", |b| {
        b.len() / 2
    });
}

#[test]
fn a_damaged_raft_snapshot_stops_the_node_and_the_same_way_back_works() {
    // Snapshots every 10 entries: the topics created below make one on every node.
    let hosts = ["127.0.0.107", "127.0.0.108", "127.0.0.109"];
    let tmp = test_dir("recovery_snapshot");
    let port = 26860;
    let mut nodes = three_nodes(&tmp, hosts, port);
    for n in nodes.iter_mut() {
        n.kill9();
        n.extra = vec!["--raft-snapshot-logs-count".into(), "10".into()];
        n.spawn();
    }
    damaged_file_way_back(&tmp, hosts, port, nodes, "raft/sm/snapshot", |b| b.len() / 2);
}

/// Stops node 2 of a three-node cluster, flips one bit of `raft/log/<file>` at the
/// byte `at` chooses, checks that the node refuses to start naming the file and the way
/// back, then walks that way back: a fresh directory with `--join`, after which the
/// node is a new member and every message is readable through it.
fn damaged_raft_file_way_back(name: &str, hosts: [&str; 3], port: u16, file: &str, at: fn(&[u8]) -> usize) {
    let tmp = test_dir(name);
    let nodes = three_nodes(&tmp, hosts, port);
    damaged_file_way_back(&tmp, hosts, port, nodes, &format!("raft/log/{file}"), at);
}

fn damaged_file_way_back(
    tmp: &std::path::Path,
    hosts: [&str; 3],
    port: u16,
    mut nodes: Vec<Broker>,
    file: &str,
    at: fn(&[u8]) -> usize,
) {
    eventually(Duration::from_secs(30), "3 ALIVE nodes", || alive_count(&stdout(&cli(hosts[0], port, &["dump"]))) == 3);
    let o = cli(hosts[0], port, &["create-topic", "t"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = cli(hosts[0], port, &["create-consumer-group", "g", "--bind", "t"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = cli(hosts[1], port, &["publish", "t", "m-{n}", "--count", "50"]);
    assert!(o.status.success(), "{}", stderr(&o));
    for i in 0..12 {
        let o = cli(hosts[0], port, &["create-namespace", &format!("ns-{i}")]);
        assert!(o.status.success(), "{}", stderr(&o));
    }

    // Node 2 stops; one bit of the file flips.
    let path = nodes[2].dir.join(file);
    eventually(Duration::from_secs(20), "the file on node 2", || path.exists());
    assert!(nodes[2].terminate().success());
    let mut bytes = std::fs::read(&path).unwrap();
    let i = at(&bytes);
    bytes[i] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();

    let out = std::process::Command::new(BIN)
        .args(["--dir", nodes[2].dir.to_str().unwrap(), "--host", hosts[2], "--advertise-host", hosts[2]])
        .args(["--port", &port.to_string(), "--join", &format!("{}:{port}", hosts[0])])
        .env(common::TRUSTED_NETWORK_ENV, "true")
        .output()
        .unwrap();
    assert!(!out.status.success(), "started on a damaged {file}");
    let err = stderr(&out);
    assert!(err.contains(file) && err.contains("Way back"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), bytes, "the damaged file is left for an operator");

    // The way back the error gives: move the directory aside, start again with --join.
    std::fs::rename(&nodes[2].dir, tmp.join(format!("n2-damaged-{}", file.replace('/', "-")))).unwrap();
    nodes[2].join = vec![format!("{}:{port}", hosts[0])];
    nodes[2].spawn();
    eventually(Duration::from_secs(30), "the new member ALIVE at the old address", || {
        let dump = stdout(&cli(hosts[0], port, &["dump"]));
        dump.matches(&format!("address: \"{}:{port}\"\n  state: ALIVE", hosts[2])).count() == 1
    });
    let o = cli(hosts[2], port, &["subscribe", "g", "--max-messages", "50", "--wait", "10s"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).lines().count(), 50, "every message through the rejoined node");
}
