//! AMQP 0.9.1 with real clients of two languages: pika (from PyPI, installed into
//! `$HOME/.cache/eventtermq/pylib` on first use) and amqplib (from npm, installed into
//! `$HOME/.cache/eventtermq/node` on first use) against a 3-node cluster of the real
//! binary, publishers on one node and consumers on another; protocol violations with
//! raw sockets; messages crossing between AMQP and gRPC with their properties.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;

/// One cluster per test (tests run at once): 127.0.0.131-143.
const TUTORIALS: [&str; 3] = ["127.0.0.131", "127.0.0.132", "127.0.0.133"];
const INTEROP: [&str; 3] = ["127.0.0.134", "127.0.0.135", "127.0.0.136"];
const VIOLATIONS: [&str; 3] = ["127.0.0.137", "127.0.0.138", "127.0.0.139"];
const AMQPLIB_TUTORIALS: [&str; 3] = ["127.0.0.141", "127.0.0.142", "127.0.0.143"];
const PORT: u16 = 26880;
const AMQP_PORT: u16 = PORT + 1;
const PIKA: &str = "pika>=1.3,<2";
const AMQPLIB: &str = "amqplib@0.10";

/// A directory holding pika, installed with pip on first use.
fn pika_path() -> PathBuf {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let dir = PathBuf::from(home).join(".cache/eventtermq/pylib");
    let has_pika = || {
        Command::new("python3").env("PYTHONPATH", &dir).args(["-c", "import pika"]).status().is_ok_and(|s| s.success())
    };
    if !has_pika() {
        let o = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--target"])
            .arg(&dir)
            .arg(PIKA)
            // Debian's python3 refuses pip installs (PEP 668) unless told; --target
            // keeps it out of the system's packages anyway.
            .env("PIP_BREAK_SYSTEM_PACKAGES", "1")
            .output()
            .expect("python3 -m pip");
        assert!(o.status.success(), "pip install {PIKA} failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    assert!(has_pika(), "pika not importable from {}", dir.display());
    dir
}

/// Runs pika_checks.py with publishers on `hosts[1]` and consumers on `hosts[2]`.
fn pika(hosts: [&str; 3], checks: &[&str]) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/amqp/pika_checks.py");
    let port = AMQP_PORT.to_string();
    let o = Command::new("timeout")
        .args(["120", "python3", script, hosts[1], hosts[2], &port])
        .args(checks)
        .env("PYTHONPATH", pika_path())
        .output()
        .expect("run python3");
    let out = stdout(&o);
    assert!(o.status.success(), "pika checks {checks:?} failed:\n{out}\n{}", stderr(&o));
    out
}

fn cluster(name: &str, hosts: [&str; 3]) -> Vec<Broker> {
    let nodes = three_nodes(&test_dir(name), hosts, PORT);
    eventually(Duration::from_secs(30), "3 ALIVE nodes", || {
        let o = cli(hosts[2], PORT, &["dump"]);
        o.status.success() && alive_count(&stdout(&o)) == 3
    });
    nodes
}

#[test]
fn pika_runs_the_tutorials_confirms_and_error_classes_across_nodes() {
    const HOSTS: [&str; 3] = TUTORIALS;
    let _nodes = cluster("amqp_tutorials", HOSTS);
    let checks = ["hello", "work_queues", "publish_subscribe", "routing", "topics", "rpc", "confirms_and_mandatory"];
    let out = pika(HOSTS, &checks);
    for c in checks {
        assert!(out.contains(&format!("ok {c}\n")), "{c} missing:\n{out}");
    }
    let out = pika(HOSTS, &["errors"]);
    for c in [
        "error_404_passive_queue",
        "error_404_publish_exchange",
        "error_406_exchange_type",
        "error_406_queue_argument",
        "error_403_reserved_name",
        "error_530_vhost",
        "error_403_login",
    ] {
        assert!(out.contains(&format!("ok {c}\n")), "{c} missing:\n{out}");
    }
}

#[test]
fn messages_cross_between_amqp_and_grpc_with_their_properties() {
    const HOSTS: [&str; 3] = INTEROP;
    let _nodes = cluster("amqp_interop", HOSTS);
    // gRPC -> AMQP: a queue bound to a topic; `eventtermq publish` with a header and
    // a content type; pika gets both.
    let o = cli(HOSTS[0], PORT, &["create-topic", "interop-grpc", "--default-exchange-type", "fanout"]);
    assert!(o.status.success(), "{}", stderr(&o));
    pika(HOSTS, &["interop_prepare"]);
    let o = cli(
        HOSTS[0],
        PORT,
        &["publish", "interop-grpc", "from-grpc", "--header", "source=cli", "--content-type", "text/plain"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = pika(HOSTS, &["interop_consume"]);
    // pika shows a long string as str or bytes depending on its version.
    assert!(out.contains("got body=from-grpc content_type=text/plain headers=[('source', "), "{out}");
    assert!(out.contains("cli')]"), "{out}");
    // AMQP -> gRPC: pika publishes with a content type, a correlation id and headers;
    // `eventtermq subscribe` prints them.
    let o = cli(HOSTS[0], PORT, &["create-topic", "interop", "--default-exchange-type", "direct"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = cli(HOSTS[0], PORT, &["create-consumer-group", "g-interop", "--bind-direct", "interop:k"]);
    assert!(o.status.success(), "{}", stderr(&o));
    pika(HOSTS, &["interop_publish"]);
    let o = cli(HOSTS[2], PORT, &["subscribe", "g-interop", "--max-messages", "1", "--wait", "20s"]);
    let out = stdout(&o);
    // The body is printed in base64: {"a": 1}.
    for want in ["application/json", "corr-7", "\"source\":\"pika\"", "\"n\":\"3\"", "eyJhIjogMX0="] {
        assert!(out.contains(want), "{want} missing from subscribe output: {out}");
    }
}

/// Connects to the AMQP port of `VIOLATIONS[0]`, sends `bytes`, and returns what the
/// node answers before it closes the connection (bounded).
fn raw(bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect((VIOLATIONS[0], AMQP_PORT)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(bytes).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    got
}

#[test]
fn protocol_violations_close_that_connection_and_the_node_keeps_serving() {
    const HOSTS: [&str; 3] = VIOLATIONS;
    let _nodes = cluster("amqp_violations", HOSTS);
    // Another protocol, or junk: the node answers with the header it speaks, closes.
    assert_eq!(raw(b"AMQP\x01\x01\x00\x0a"), b"AMQP\x00\x00\x09\x01");
    assert_eq!(raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), b"AMQP\x00\x00\x09\x01");
    // A frame larger than frame_max right after the header: connection.start, then
    // connection.close with 501 FRAME_ERROR.
    let mut big = b"AMQP\x00\x00\x09\x01".to_vec();
    big.extend_from_slice(&[1, 0, 0, 0x10, 0, 0, 0]);
    let answer = raw(&big);
    let close = answer.windows(4).position(|w| w == [0, 10, 0, 50]).expect("connection.close");
    assert_eq!(&answer[close + 4..close + 6], &501u16.to_be_bytes(), "{answer:?}");
    assert!(String::from_utf8_lossy(&answer).contains("larger than frame_max"), "{answer:?}");
    // The node still serves a real client.
    let out = pika(HOSTS, &["hello"]);
    assert!(out.contains("ok hello"), "{out}");
}

/// A `node_modules` directory holding amqplib, installed with npm on first use.
fn amqplib_path() -> PathBuf {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let dir = PathBuf::from(home).join(".cache/eventtermq/node");
    let modules = dir.join("node_modules");
    let node_ok = Command::new("node").arg("--version").output().is_ok_and(|o| o.status.success());
    assert!(node_ok, "`node` not found: the amqplib checks need Node.js (>= 16) and npm (apt-get install nodejs npm)");
    let has_amqplib = || {
        Command::new("node")
            .env("NODE_PATH", &modules)
            .args(["-e", "require('amqplib')"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !has_amqplib() {
        std::fs::create_dir_all(&dir).unwrap();
        let o = Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--loglevel=error", "--prefix"])
            .arg(&dir)
            .arg(AMQPLIB)
            .output();
        let o = match o {
            Ok(o) => o,
            Err(e) => {
                panic!("`npm` not found ({e}): the amqplib checks install {AMQPLIB} with npm (apt-get install npm)")
            }
        };
        assert!(o.status.success(), "npm install {AMQPLIB} failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    assert!(has_amqplib(), "amqplib not loadable from {}", modules.display());
    modules
}

/// Runs amqplib_checks.js with publishers on `hosts[1]` and consumers on `hosts[2]`.
fn amqplib(hosts: [&str; 3], checks: &[&str]) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/amqp/amqplib_checks.js");
    let port = AMQP_PORT.to_string();
    let o = Command::new("timeout")
        .args(["180", "node", script, hosts[1], hosts[2], &port])
        .args(checks)
        .env("NODE_PATH", amqplib_path())
        .output()
        .expect("run node");
    let out = stdout(&o);
    assert!(o.status.success(), "amqplib checks {checks:?} failed:\n{out}\n{}", stderr(&o));
    out
}

#[test]
fn amqplib_runs_the_tutorials_and_confirms_across_nodes() {
    const HOSTS: [&str; 3] = AMQPLIB_TUTORIALS;
    let _nodes = cluster("amqp_amqplib", HOSTS);
    let checks = ["hello", "work_queues", "publish_subscribe", "routing", "topics", "rpc", "confirms"];
    let out = amqplib(HOSTS, &checks);
    for c in checks {
        assert!(out.contains(&format!("ok {c}\n")), "{c} missing:\n{out}");
    }
}
