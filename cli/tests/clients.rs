//! `eventtermq bench clients` with small numbers on 127.0.0.5-7: 20 publishers, each to
//! its own topic, and 100 subscribers (5 per topic's group), all through one node.
//! Every confirmed message is delivered once, and no subscriber of a group is starved
//! relative to the others. Counts and ratios only, no timing.

mod common;

use std::process::Command;

use common::*;

/// Each publisher's messages: 1,000, so 200 per subscriber when a group hands them
/// out round-robin.
const MESSAGES_PER_PUBLISHER: u64 = 1000;
/// Each subscriber's window: more than its share (200), so that the windows of a
/// group hold all its topic's messages at once and the group hands every message out
/// without waiting for an acknowledgement. What each subscriber gets then depends on
/// the hand-out alone, not on how fast its stream drains: with a window of 128, a
/// subscriber whose stream was slow during the 50 ms burst (debug build, busy machine)
/// got its 128 while others got 257, 2.01x, with the round-robin hand-out working.
/// Handing out to the first subscriber with room instead gives 256, 256, 256, 233, 0.
const WINDOW: &str = "256";

#[test]
fn many_clients_get_every_message_and_share_each_group_fairly() {
    let dir = test_dir("clients_bench");
    let o = Command::new(BIN)
        .args(["bench", "clients", "--hosts", "127.0.0.5,127.0.0.6,127.0.0.7", "--broker-port", "27650"])
        .args(["--publishers", "20", "--subscribers", "100", "--connections", "10"])
        .args(["--messages-per-publisher", &MESSAGES_PER_PUBLISHER.to_string(), "--seconds", "0"])
        .args(["--subscriber-size", WINDOW, "--bench-dir", dir.join("bench").to_str().unwrap()])
        .output()
        .unwrap();
    let out = stdout(&o);
    assert!(o.status.success(), "bench clients failed: {out}\n{}", stderr(&o));
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).expect(l)).collect();
    let phase = |name: &str| {
        lines.iter().find(|l| l["bench"] == format!("clients: {name}")).unwrap_or_else(|| panic!("no {name}: {out}"))
    };
    // Every publisher's messages were confirmed, in every phase.
    for (name, publishers) in [("W1: one publisher, no subscriber", 1), ("single stream with its subscribers", 1)]
        .into_iter()
        .chain([("many clients", 20)])
    {
        let p = phase(name);
        assert_eq!(p["messages"], MESSAGES_PER_PUBLISHER * publishers, "{p}");
        assert_eq!(p["confirmed_per_publisher"]["min"], MESSAGES_PER_PUBLISHER, "{p}");
    }
    for name in ["single stream with its subscribers", "many clients"] {
        let s = &phase(name)["subscribers"];
        // Each topic's messages and the one that opened it, each delivered once.
        assert_eq!(s["errors"], 0, "{s}");
        assert_eq!(s["missing"], 0, "{s}");
        assert_eq!(s["delivered_more_than_confirmed"], 0, "{s}");
        assert_eq!(s["every_confirmed_message_delivered"], true, "{s}");
        // null: infinite, a subscriber got nothing while another got some.
        let ratio = s["delivered_per_subscriber"]["max_over_min_within_a_group"].as_f64().unwrap_or(f64::INFINITY);
        assert!(ratio <= 2.0, "a subscriber of a group got less than half of another's: {s}");
    }
    assert_eq!(phase("many clients")["subscribers"]["subscribers"], 100);
    let _ = std::fs::remove_dir_all(&dir);
}
