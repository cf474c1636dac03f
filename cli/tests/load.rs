//! `eventtermq load` against one real broker on 127.0.0.118:28500: a publisher and a
//! consumer through a kill -9 and restart of the broker, then `load check` finds every
//! confirmed message delivered, the errors the clients saw and the gap the restart
//! made; a consumer's report cut short makes it exit 1 naming the lost count.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const HOST: &str = "127.0.0.118";
const PORT: u16 = 28500;

fn field(line: &str, key: &str) -> i64 {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

#[test]
fn load_check_finds_every_confirmed_message_after_a_kill_and_restart() {
    let tmp = test_dir("load_kill");
    let mut broker = Broker::start_with(HOST, PORT, &tmp.join("n1"), &[]);
    eventually(Duration::from_secs(20), "the broker to answer", || {
        cli(HOST, PORT, &["create-topic", "lt", "--replication-factor", "1"]).status.success()
    });
    assert!(cli(HOST, PORT, &["create-consumer-group", "lg", "--bind", "lt"]).status.success());
    let (published, delivered) = (tmp.join("published.jsonl"), tmp.join("delivered.jsonl"));
    let load = |args: &[&str]| {
        Command::new(BIN)
            .args(["--host", HOST, "--port", &PORT.to_string(), "load"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap()
    };
    let mut consumer =
        load(&["consume", "--group", "lg", "--duration-s", "12", "--report", delivered.to_str().unwrap()]);
    let mut publisher = load(&[
        "publish",
        "--topic",
        "lt",
        "--rate-per-s",
        "50",
        "--duration-s",
        "6",
        "--report",
        published.to_str().unwrap(),
    ]);
    std::thread::sleep(Duration::from_secs(2));
    broker.kill9();
    std::thread::sleep(Duration::from_secs(1));
    broker.spawn();
    assert!(publisher.wait().unwrap().success(), "load publish failed");
    assert!(consumer.wait().unwrap().success(), "load consume failed");

    let check = |delivered: &std::path::Path| {
        Command::new(BIN)
            .args(["load", "check", "--published", published.to_str().unwrap()])
            .args(["--delivered", delivered.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let o = check(&delivered);
    let line = stdout(&o);
    assert!(o.status.success(), "{line} {}", stderr(&o));
    // 6 s at 50/s, less what the restart held up (the rate resumes, no burst).
    let confirmed = field(&line, "confirmed");
    assert!((100..=300).contains(&confirmed), "{line}");
    assert_eq!(field(&line, "delivered"), confirmed, "{line}");
    assert_eq!((field(&line, "lost"), field(&line, "stored_twice")), (0, 0), "{line}");
    // The kill was seen: attempts refused a connection or lost, and a gap of about
    // the second the broker was down, and more than the 20 ms between messages.
    assert!(field(&line, "client_errors") > 0, "{line}");
    assert!(field(&line, "longest_gap_ms") >= 900, "{line}");
    assert!(field(&line, "consumer_errors") > 0, "{line}");

    // The consumer's report without its last half: those messages count as lost.
    let text = std::fs::read_to_string(&delivered).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let cut = tmp.join("delivered-cut.jsonl");
    std::fs::write(&cut, lines[..lines.len() / 2].join("\n")).unwrap();
    let o = check(&cut);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    let lost = field(&stdout(&o), "lost");
    assert!(
        lost > 0 && stderr(&o).contains(&format!("{lost} confirmed messages were never delivered")),
        "{}",
        stderr(&o)
    );
}
