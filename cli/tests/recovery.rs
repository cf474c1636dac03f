//! Process-level tests of the way back from damaged files of one node (issue 13, item
//! 6b): the node refuses to start with an error that names the file and says what to
//! do, and doing it brings the node back as a new member without losing data.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn a_damaged_vote_stops_the_node_and_rejoining_with_a_fresh_dir_brings_it_back() {
    let tmp = test_dir("recovery_vote");
    let hosts = ["127.0.0.101", "127.0.0.102", "127.0.0.103"];
    let port = 26840;
    let mut nodes = three_nodes(&tmp, hosts, port);
    eventually(Duration::from_secs(30), "3 ALIVE nodes", || alive_count(&stdout(&cli(hosts[0], port, &["dump"]))) == 3);
    let o = cli(hosts[0], port, &["create-topic", "t"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = cli(hosts[0], port, &["create-consumer-group", "g", "--bind", "t"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = cli(hosts[1], port, &["publish", "t", "m-{n}", "--count", "50"]);
    assert!(o.status.success(), "{}", stderr(&o));

    // Node 2 stops; one bit of its Raft vote file flips.
    assert!(nodes[2].terminate().success());
    let vote = nodes[2].dir.join("raft/log/vote");
    let mut bytes = std::fs::read(&vote).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&vote, &bytes).unwrap();

    let out = std::process::Command::new(BIN)
        .args(["--dir", nodes[2].dir.to_str().unwrap(), "--host", hosts[2], "--advertise-host", hosts[2]])
        .args(["--port", &port.to_string(), "--join", &format!("{}:{port}", hosts[0])])
        .output()
        .unwrap();
    assert!(!out.status.success(), "started on a damaged vote");
    let err = stderr(&out);
    assert!(err.contains("raft/log/vote") && err.contains("Way back"), "{err}");

    // The way back the error gives: move the directory aside, start again with --join.
    std::fs::rename(&nodes[2].dir, tmp.join("n2-damaged")).unwrap();
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
