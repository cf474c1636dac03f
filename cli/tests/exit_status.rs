//! Process-level tests of what a caller can conclude from the binary's exit status
//! (README, "CLI"): 0 done, 1 rejected and nothing changed, 2 usage error, 3 outcome
//! unknown; and of one process per data directory. The real binary on 127.0.0.91-98.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Runs the binary with `args`, killing it if it has not exited within `limit` (so a
/// hang fails the test instead of stalling it); returns its output and run time.
fn run_bounded(args: &[&str], limit: Duration) -> (Output, Duration) {
    let t0 = Instant::now();
    let mut command = Command::new(BIN);
    command.args(args).env(TRUSTED_NETWORK_ENV, "true").stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command.spawn().expect("run binary");
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > limit {
            let _ = child.kill();
            panic!("{args:?} still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    (child.wait_with_output().unwrap(), t0.elapsed())
}

fn cli_bounded(host: &str, port: u16, args: &[&str], limit: Duration) -> (Output, Duration) {
    let port = port.to_string();
    let all: Vec<&str> = ["--host", host, "--port", &port].into_iter().chain(args.iter().copied()).collect();
    run_bounded(&all, limit)
}

fn signal(broker: &Broker, sig: &str) {
    let pid = broker.child.as_ref().expect("running").id().to_string();
    assert!(Command::new("kill").args([sig, &pid]).status().unwrap().success());
}

fn ready(host: &str, port: u16) {
    eventually(Duration::from_secs(30), "a single node ready", || {
        let o = cli(host, port, &["dump"]);
        o.status.success() && alive_count(&stdout(&o)) == 1
    });
}

fn topics(host: &str, port: u16) -> String {
    stdout(&cli(host, port, &["list-topics"]))
}

/// Every file under `dir` with its length and modification time: what a refused
/// process must leave as it was.
fn snapshot(dir: &Path) -> Vec<(String, u64, std::time::SystemTime)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else {
                out.push((e.path().display().to_string(), m.len(), m.modified().unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// Finding 1 of issue 13: a second broker on a running broker's --dir started, with
/// the same node id, and damaged the Raft log. Now it exits at once, naming the
/// directory and the holder, and changes nothing there.
#[test]
fn a_second_broker_on_a_running_brokers_dir_is_refused_and_the_first_keeps_working() {
    let tmp = test_dir("exit_status_second_broker");
    let dir = tmp.join("n");
    let port = 26910;
    let mut first = Broker::start("127.0.0.91", port, &dir, &[]);
    ready("127.0.0.91", port);
    assert!(cli("127.0.0.91", port, &["create-topic", "before"]).status.success());
    // Let the node settle (the topic's segment opened), so that it writes nothing while
    // the directory is compared.
    eventually(Duration::from_secs(30), "the topic's segment opened", || {
        stdout(&cli("127.0.0.91", port, &["dump"])).contains("open: true")
    });
    std::thread::sleep(Duration::from_millis(500));
    let holder = first.child.as_ref().unwrap().id();
    assert_eq!(std::fs::read_to_string(dir.join("LOCK")).unwrap().trim(), holder.to_string());

    // Another address, so that the port is free and only the directory is shared (a
    // pod's replacement on a shared volume, a copied unit file).
    let before = snapshot(&dir);
    let dir_arg = dir.to_str().unwrap();
    let (o, took) =
        run_bounded(&["--dir", dir_arg, "--host", "127.0.0.92", "--port", &port.to_string()], Duration::from_secs(20));
    assert_eq!(o.status.code(), Some(1), "stderr: {}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains(&format!("{dir_arg} is in use by another process (PID {holder})")), "{err}");
    assert!(took < Duration::from_secs(10), "refused only after {took:?}");
    assert_eq!(snapshot(&dir), before, "the refused broker changed the directory");
    assert!(!cli("127.0.0.92", port, &["dump"]).status.success(), "the refused broker must not serve");

    // The first one is unaffected, and its Raft log is whole after a restart.
    assert!(cli("127.0.0.91", port, &["create-topic", "after"]).status.success());
    assert!(first.terminate().success());
    first.spawn();
    eventually(Duration::from_secs(30), "both topics after a restart", || {
        let t = topics("127.0.0.91", port);
        t.contains("before") && t.contains("after")
    });
    let log = first.log();
    for damage in ["non-contiguous", "lowering it", "corrupt", "is in use by another process"] {
        assert!(!log.contains(damage), "the broker's log reports {damage:?}:\n{log}");
    }
    // The lock died with the stopped process: the restart took it again.
    let holder = first.child.as_ref().unwrap().id();
    assert_eq!(std::fs::read_to_string(dir.join("LOCK")).unwrap().trim(), holder.to_string());
}

/// A benchmark run on a directory another process owns stops before starting brokers
/// there or removing anything.
#[test]
fn a_bench_dir_in_use_is_refused() {
    let tmp = test_dir("exit_status_bench_dir");
    let dir = tmp.join("n");
    let port = 26920;
    let _broker = Broker::start("127.0.0.93", port, &dir, &[]);
    ready("127.0.0.93", port);
    let dir_arg = dir.to_str().unwrap();
    let (o, _) = run_bounded(
        &[
            "--port",
            "26925",
            "bench",
            "control-plane",
            "--hosts",
            "127.0.0.94,127.0.0.95,127.0.0.96",
            "--bench-dir",
            dir_arg,
        ],
        Duration::from_secs(20),
    );
    assert_eq!(o.status.code(), Some(1), "stderr: {}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("--bench-dir: {dir_arg} is in use by another process (PID ")),
        "{}",
        stderr(&o)
    );
    assert!(dir.join("id").exists() && dir.join("raft").exists(), "the bench removed a running broker's data");
    assert!(cli("127.0.0.93", port, &["create-topic", "still-here"]).status.success());
}

#[test]
fn usage_errors_exit_2_before_anything_is_sent() {
    // No broker listens here: each error must be found before connecting.
    let (host, port) = ("127.0.0.97", 26970);
    let cases: &[(&[&str], &str)] = &[
        (&["publish", "t", "x", "--count", "0"], "--count: must be at least 1"),
        (&["publish", "t", "x", "--header", "novalue"], "--header: \"novalue\" must look like key=value"),
        (&["create-consumer-group", "g", "--bind-direct", "no-key"], "--bind-direct: \"no-key\" must look like"),
        (&["create-topic", "t", "--retention", "forever"], "retention: \"forever\" is not a duration"),
        (&["subscribe", "g", "--wait", "soon"], "--wait"),
        (&["create-topic"], "required"),
        (&["create-topic", "t", "--no-such-flag"], "--no-such-flag"),
    ];
    for (args, message) in cases {
        let (o, _) = cli_bounded(host, port, args, Duration::from_secs(20));
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(message), "{args:?}: stderr {:?} lacks {message:?}", stderr(&o));
        assert!(!stderr(&o).contains("cannot reach"), "{args:?} tried to connect: {}", stderr(&o));
    }
    // The broker's own flags too.
    let (o, _) = run_bounded(&[], Duration::from_secs(20));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--dir"), "{}", stderr(&o));
    // Exit statuses are documented in --help.
    let (o, _) = run_bounded(&["--help"], Duration::from_secs(20));
    assert!(o.status.success());
    assert!(stdout(&o).contains("Exit status:\n  0  done"), "{}", stdout(&o));
}

#[test]
fn rejected_requests_and_unreachable_nodes_exit_1_and_change_nothing() {
    let tmp = test_dir("exit_status_rejected");
    let (host, port) = ("127.0.0.94", 26940);
    let node = Broker::start(host, port, &tmp.join("n"), &[]);
    ready(host, port);
    assert!(cli(host, port, &["create-topic", "t", "--replication-factor", "1"]).status.success());
    // The topic's segment opens right after it is created (a write of its own): the
    // state is compared from then on.
    eventually(Duration::from_secs(30), "the topic's segment opened", || {
        stdout(&cli(host, port, &["dump"])).contains("open: true")
    });
    let index = |_: ()| stdout(&cli(host, port, &["dump"])).lines().nth(1).map(str::to_string);
    let before = index(());
    let cases: &[(&[&str], &str)] = &[
        (&["create-topic", "t", "--shards", "2"], "rejected: AlreadyExists (3002): "),
        (&["create-topic", "t", "--shards", "0"], "rejected: InvalidArgument (1002): shards: 0 is out of range"),
        (&["delete-topic", "nope"], "rejected: NotFound (2002): "),
        (&["update-topic", "t", "--replication-factor", "3"], "rejected: FailedPrecondition (4003): "),
        (&["publish", "missing", "x"], "rejected: NotFound (2002): "),
    ];
    let mut ids = Vec::new();
    for (args, message) in cases {
        let (o, _) = cli_bounded(host, port, args, Duration::from_secs(30));
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(message), "{args:?}: stderr {:?} lacks {message:?}", stderr(&o));
        assert!(stdout(&o).is_empty(), "{args:?} printed {:?}", stdout(&o));
        // The error names the request's id ...
        let err = stderr(&o);
        let id = err
            .split("[request id: ")
            .nth(1)
            .and_then(|rest| rest.split(']').next())
            .unwrap_or_else(|| panic!("{args:?}: no request id in {err:?}"))
            .to_string();
        ids.push(id);
    }
    assert_eq!(index(()), before, "rejected requests must not change the cluster state");
    // ... which finds the broker's log line of that request, with what it was about.
    let log = node.log();
    for (id, topic) in ids.iter().zip(["t", "t", "nope", "t", "missing"]) {
        let line = log
            .lines()
            .find(|l| l.contains(&format!("id={id} ")) && l.contains("request failed"))
            .unwrap_or_else(|| panic!("no log line of request {id}:\n{log}"));
        assert!(line.contains("namespace=default") && line.contains(&format!("topic={topic}")), "{line}");
    }
    assert_ne!(ids[0], ids[1], "each request has its own id");

    // Nobody listens there: nothing was sent.
    let (o, _) = cli_bounded("127.0.0.95", 26950, &["create-topic", "t"], Duration::from_secs(20));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("cannot reach node at 127.0.0.95:26950"), "{}", stderr(&o));
    assert!(stderr(&o).contains("nothing was sent"), "{}", stderr(&o));
}

/// A publish to a broker that stops answering after it took the request (SIGSTOP):
/// the client gives up when its HTTP/2 keep-alive goes unanswered (10 s + 5 s) and
/// cannot know whether the message was stored.
#[test]
fn a_publish_to_a_frozen_broker_exits_3() {
    let tmp = test_dir("exit_status_frozen");
    let (host, port) = ("127.0.0.96", 26960);
    let node = Broker::start(host, port, &tmp.join("n"), &[]);
    ready(host, port);
    assert!(cli(host, port, &["create-topic", "t", "--replication-factor", "1"]).status.success());
    let o = cli(host, port, &["publish", "t", "before"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));

    signal(&node, "-STOP");
    // One attempt (by default the CLI sends it again for 30 s, with the same producer id
    // and number, before it gives up the same way).
    let (o, took) = cli_bounded(host, port, &["publish", "t", "frozen", "--retry-for", "0s"], Duration::from_secs(60));
    signal(&node, "-CONT");
    assert_eq!(o.status.code(), Some(3), "after {took:?}: {}", stderr(&o));
    let err = stderr(&o);
    assert!(err.starts_with("error: outcome unknown: ") && err.contains("the request may still take effect"), "{err}");
    assert!(stdout(&o).is_empty(), "{}", stdout(&o));

    // The broker carries on.
    let o = cli(host, port, &["publish", "t", "after"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

/// A write the leader cannot commit (its only follower frozen) answers Timeout (5002)
/// after --request-timeout-ms: exit 3; it does take effect once the follower is back.
#[test]
fn a_write_without_a_quorum_exits_3_and_may_still_take_effect() {
    let tmp = test_dir("exit_status_no_quorum");
    let hosts = ["127.0.0.92", "127.0.0.93"];
    let port = 26980;
    let timeout = ["--request-timeout-ms", "2000"];
    let seed = format!("{}:{port}", hosts[0]);
    let nodes = [
        Broker::start_with(hosts[0], port, &tmp.join("n0"), &timeout),
        Broker::start_with(hosts[1], port, &tmp.join("n1"), &["--join", &seed, timeout[0], timeout[1]]),
    ];
    let dump = |h: &str| -> Option<serde_json::Value> {
        let o = cli(h, port, &["dump", "--output", "json"]);
        o.status.success().then(|| serde_json::from_str(&stdout(&o)).ok()).flatten()
    };
    eventually(Duration::from_secs(30), "two voters", || {
        dump(hosts[0]).is_some_and(|d| {
            let nodes = d["nodes"].as_array().cloned().unwrap_or_default();
            nodes.len() == 2 && nodes.iter().all(|n| n["state"] == "ALIVE" && n["raft_role"] == "voter")
        })
    });
    let d = dump(hosts[0]).unwrap();
    let leader = d["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == d["leader_id"])
        .and_then(|n| n["address"].as_str())
        .and_then(|a| hosts.iter().position(|h| a == format!("{h}:{port}")))
        .expect("a leader");
    let follower = 1 - leader;

    signal(&nodes[follower], "-STOP");
    let (o, took) = cli_bounded(hosts[leader], port, &["create-topic", "maybe"], Duration::from_secs(30));
    signal(&nodes[follower], "-CONT");
    assert_eq!(o.status.code(), Some(3), "after {took:?}: {}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("outcome unknown: Unavailable (5002): "), "{err}");
    assert!(err.contains("the request may still take effect"), "{err}");
    eventually(Duration::from_secs(30), "the write committed once the follower answered", || {
        topics(hosts[leader], port).contains("maybe")
    });
}

/// `subscribe | head -n 3`: once the reader is gone the command ends quietly with 0
/// (no panic on the broken pipe), and what it could not print is not acknowledged:
/// the next subscriber gets it.
#[test]
fn a_subscriber_whose_reader_went_away_exits_0_and_acks_only_what_it_printed() {
    use std::io::BufRead;
    let tmp = test_dir("exit_broken_pipe");
    let (host, port) = ("127.0.0.98", 26980);
    let _broker = Broker::start(host, port, &tmp.join("n1"), &[]);
    ready(host, port);
    for args in [&["create-topic", "t"][..], &["create-consumer-group", "g", "--bind", "t"]] {
        let o = cli(host, port, args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    }
    let publish = |data: &str| {
        let o = cli(host, port, &["publish", "t", data, "--count", "3"]);
        assert!(o.status.success(), "{}", stderr(&o));
    };
    publish("a{n}");
    let port_s = port.to_string();
    let mut sub = Command::new(BIN)
        .args(["--host", host, "--port", &port_s, "subscribe", "g"])
        .env(TRUSTED_NETWORK_ENV, "true")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(sub.stdout.take().unwrap()).lines();
    for _ in 0..3 {
        lines.next().unwrap().unwrap();
    }
    drop(lines); // the reader goes, as `head -n 3` does
    publish("b{n}");
    let t0 = Instant::now();
    while sub.try_wait().unwrap().is_none() {
        assert!(t0.elapsed() < Duration::from_secs(20), "subscribe still running after its reader went");
        std::thread::sleep(Duration::from_millis(50));
    }
    let o = sub.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).is_empty(), "nothing on stderr: {}", stderr(&o));
    let mut got = subscribe(host, port, "g", &["--max-messages", "3", "--wait", "40s"]);
    got.sort();
    assert_eq!(got, ["b1", "b2", "b3"]);
}

/// Issue 19, upgrades: a data directory whose format marker names a newer format than
/// this release reads (a downgrade) is refused with exit status 4 and a message naming
/// the directory, the format, who wrote it and what to do, and is left as it was. A
/// directory from before the marker (none in it) is format 1: it is marked and used.
#[test]
fn a_data_directory_of_a_newer_format_is_refused_with_exit_4_and_left_untouched() {
    use eventtermq_broker::node::format::{DATA_FORMAT, FORMAT_FILE};
    let tmp = test_dir("exit_status_data_format");
    let dir = tmp.join("n");
    let (host, port) = ("127.0.0.99", 26930);
    let mut node = Broker::start(host, port, &dir, &[]);
    ready(host, port);
    assert!(cli(host, port, &["create-topic", "kept", "--replication-factor", "1"]).status.success());
    assert!(node.terminate().success());
    let marker = dir.join(FORMAT_FILE);
    let written = eventtermq_storage::durable::read_record_file(&eventtermq_storage::fs::RealFs, &marker)
        .unwrap()
        .expect("a new directory gets the marker");
    let written = String::from_utf8(written).unwrap();
    assert!(written.starts_with(&format!("format {DATA_FORMAT}\nwritten_by eventtermq ")), "{written:?}");

    // As a later release that changed the format would leave it.
    let newer = DATA_FORMAT + 1;
    let payload = format!("format {newer}\nwritten_by eventtermq 99.0.0\n");
    eventtermq_storage::durable::write_record_file(&eventtermq_storage::fs::RealFs, &marker, payload.as_bytes())
        .unwrap();
    // LOCK is taken (and gets the refused process's PID) before the marker is read.
    let without_lock = |d: &Path| snapshot(d).into_iter().filter(|(p, ..)| !p.ends_with("/LOCK")).collect::<Vec<_>>();
    let before = without_lock(&dir);
    let dir_arg = dir.to_str().unwrap();
    let (o, took) =
        run_bounded(&["--dir", dir_arg, "--host", host, "--port", &port.to_string()], Duration::from_secs(20));
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(4), "stderr: {err}");
    for part in [
        format!("data directory {dir_arg} has format {newer} (written by eventtermq 99.0.0)"),
        format!("reads format {DATA_FORMAT}"),
        "downgrade refused, nothing in the directory was changed".to_string(),
        "Start this node with eventtermq 99.0.0 or a later release".to_string(),
    ] {
        assert!(err.contains(&part), "{part:?} missing: {err}");
    }
    assert!(took < Duration::from_secs(10), "refused only after {took:?}");
    assert_eq!(without_lock(&dir), before, "the refused broker changed the directory");
    assert!(!cli(host, port, &["dump"]).status.success(), "the refused broker must not serve");

    // A directory a release from before the marker left (no marker): format 1, used.
    std::fs::remove_file(&marker).unwrap();
    node.spawn();
    eventually(Duration::from_secs(30), "the topic after the restart", || topics(host, port).contains("kept"));
    let again = std::fs::read(&marker).expect("the marker is written again");
    assert!(String::from_utf8_lossy(&again).contains(&format!("format {DATA_FORMAT}\n")));
}
