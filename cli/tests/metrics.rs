//! Process-level test of `/metrics` (`--metrics-port`, default `--port` + 2): the real
//! binary on 127.0.0.121-125, scraped with a plain HTTP GET over a TcpStream, as
//! Prometheus would.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

const HOSTS: [&str; 3] = ["127.0.0.121", "127.0.0.122", "127.0.0.123"];
const PORT: u16 = 26990;
/// `--port` + 2, the default.
const METRICS_PORT: u16 = PORT + 2;

/// The body of `GET /metrics` on `host`, with `accept` as the Accept header.
fn scrape(host: &str, accept: &str) -> String {
    scrape_port(host, METRICS_PORT, accept)
}

fn scrape_port(host: &str, port: u16, accept: &str) -> String {
    let mut s = TcpStream::connect((host, port)).unwrap_or_else(|e| panic!("connect {host}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {host}\r\nAccept: {accept}\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_string()
    }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").unwrap();
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
}

/// Checks the Prometheus text format (0.0.4) line by line: `# HELP` and `# TYPE` before
/// a family's samples, valid metric and label names, quoted label values, a number.
fn check_text_format(text: &str) {
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars()
                .enumerate()
                .all(|(i, c)| c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit()))
    };
    let mut typed: Vec<(String, String)> = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            assert!(name_ok(rest.split(' ').next().unwrap()), "{line}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(name_ok(name), "{line}");
            assert!(["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind), "{line}");
            typed.push((name.to_string(), kind.to_string()));
            continue;
        }
        assert!(!line.starts_with('#'), "unexpected comment: {line}");
        let (series, value) = line.rsplit_once(' ').unwrap();
        assert!(value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value), "{line}");
        let name = series.split('{').next().unwrap();
        assert!(name_ok(name), "{line}");
        let (family, kind) = typed.last().unwrap_or_else(|| panic!("sample before any TYPE: {line}"));
        let base = match kind.as_str() {
            "histogram" => ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name),
            _ => name,
        };
        assert_eq!(base, family, "sample of another family than its TYPE: {line}");
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            let inner = labels.strip_prefix('{').and_then(|l| l.strip_suffix('}')).unwrap_or_else(|| panic!("{line}"));
            for pair in inner.split("\",").filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').unwrap_or_else(|| panic!("{line}"));
                assert!(name_ok(k), "{line}");
                assert!(v.starts_with('"'), "{line}");
            }
        }
    }
    assert!(!typed.is_empty());
}

/// The value of the series `name{labels...}` whose labels include all of `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let rest = series.strip_prefix(name)?;
        if !(rest.is_empty() || rest.starts_with('{')) {
            return None;
        }
        labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))).then(|| value.parse().ok()).flatten()
    })
}

fn lag_of(text: &str) -> Option<f64> {
    sample(text, "eventtermq_consumer_group_lag_records", &[("group", "g"), ("topic", "t")])
}

/// Every node's scrape is well formed; the group's node reports the group's other
/// levels, and every node its own.
fn check_every_node(group_host: &str) {
    for h in HOSTS {
        check_text_format(&scrape(h, "*/*"));
    }
    let text = scrape(group_host, "text/plain");
    check_text_format(&text);
    assert!(text.contains("eventtermq_build_info{version="), "{text}");
    assert_eq!(sample(&text, "eventtermq_consumer_group_subscribers", &[("group", "g")]), Some(0.0));
    assert!(sample(&text, "eventtermq_consumer_group_oldest_unacked_seconds", &[("group", "g")]).is_some());
    let members = sample(&text, "eventtermq_gossip_members", &[("state", "alive")]);
    assert!(members.is_some_and(|n| n >= 2.0), "{text}");
    assert!(sample(&text, "process_resident_memory_bytes", &[]).is_some_and(|b| b > 0.0), "{text}");
}

/// The `stats` command's lag of group `g` on topic `t` (JSON output).
fn stats_lag(host: &str) -> Option<u64> {
    let o = cli(host, PORT, &["stats", "--output", "json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let g = v["consumer_groups"].as_array()?.iter().find(|g| g["name"] == "g")?;
    g["running"].as_bool().filter(|r| *r)?;
    g["topic_lag"]["t"].as_u64()
}

/// Scrapes every node until exactly one reports the lag of `g`: that node's index.
fn group_node() -> usize {
    let mut found = None;
    eventually(Duration::from_secs(20), "one node reporting the lag of g", || {
        let reporting: Vec<usize> =
            (0..HOSTS.len()).filter(|i| lag_of(&scrape(HOSTS[*i], "text/plain")).is_some()).collect();
        found = reporting.first().copied().filter(|_| reporting.len() == 1);
        found.is_some()
    });
    found.unwrap()
}

#[test]
fn lag_is_what_is_published_and_not_acknowledged_on_the_group_node_and_in_the_cli() {
    const N: u64 = 1000;
    const M: u64 = 400;
    let tmp = test_dir("metrics_lag");
    let _nodes = three_nodes(&tmp, HOSTS, PORT);
    create_topic_and_group(HOSTS, PORT);
    let o = cli(HOSTS[1], PORT, &["publish", "t", "m-{n}", "--count", &N.to_string()]);
    assert!(o.status.success(), "{}", stderr(&o));

    // Exactly one node runs the group and reports its lag: every message, none read.
    let group_host = HOSTS[group_node()];
    eventually(Duration::from_secs(20), "lag N on the group's node", || {
        lag_of(&scrape(group_host, "text/plain")) == Some(N as f64)
    });
    check_every_node(group_host);
    // Each message is counted once, on the node that published it (the stream went
    // in through node 2, which relays it to the primary when that is another node).
    let published: f64 = HOSTS
        .iter()
        .filter_map(|h| {
            let labels = [("topic", "t"), ("persistence", "default")];
            sample(&scrape(h, "text/plain"), "eventtermq_publish_messages_total", &labels)
        })
        .sum();
    assert_eq!(published, N as f64);
    let entry = scrape(HOSTS[1], "text/plain");
    assert!(entry.contains("eventtermq_grpc_requests_total{method=\"/eventter.v1.Messaging/PublishStream\""));
    let leaders: f64 =
        HOSTS.iter().filter_map(|h| sample(&scrape(h, "text/plain"), "eventtermq_raft_is_leader", &[])).sum();
    assert_eq!(leaders, 1.0);

    // OpenMetrics when asked for it.
    let om = scrape(group_host, "application/openmetrics-text;version=1.0.0,text/plain;q=0.5");
    assert!(om.ends_with("# EOF\n"), "{om}");

    // M consumed (and acknowledged) through another node: N - M left, in the metric
    // and in the CLI asked anywhere.
    let reader = HOSTS.iter().find(|h| **h != group_host).unwrap();
    let o = cli(reader, PORT, &["subscribe", "g", "--max-messages", &M.to_string(), "--wait", "10s"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).lines().count() as u64, M);
    eventually(Duration::from_secs(10), "lag N - M", || {
        lag_of(&scrape(group_host, "text/plain")) == Some((N - M) as f64)
    });
    let text = scrape(group_host, "text/plain");
    assert_eq!(sample(&text, "eventtermq_consumer_group_acks_total", &[("group", "g")]), Some(M as f64), "{text}");
    for h in HOSTS {
        assert_eq!(stats_lag(h), Some(N - M));
    }
    let o = cli(reader, PORT, &["stats"]);
    assert!(stdout(&o).starts_with("GROUP"), "{}", stdout(&o));
    assert!(stdout(&o).lines().any(|l| l.split_whitespace().nth(3) == Some(&(N - M).to_string())), "{}", stdout(&o));
    let o = cli(reader, PORT, &["list-consumer-groups"]);
    let listed: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(listed["lag"], N - M, "{listed}");
    assert_ne!(listed["node_id"], 0, "{listed}");

    // The rest consumed: no lag left.
    let o = cli(reader, PORT, &["subscribe", "g", "--max-messages", &(N - M).to_string(), "--wait", "10s"]);
    assert!(o.status.success(), "{}", stderr(&o));
    eventually(Duration::from_secs(10), "lag 0", || lag_of(&scrape(group_host, "text/plain")) == Some(0.0));
    let text = scrape(group_host, "text/plain");
    assert_eq!(sample(&text, "eventtermq_consumer_group_acks_total", &[("group", "g")]), Some(N as f64), "{text}");
}

#[test]
fn metrics_port_zero_disables_the_endpoint_and_another_port_moves_it() {
    let tmp = test_dir("metrics_port");
    let (off, moved, port) = ("127.0.0.124", "127.0.0.125", 26995);
    let _off = Broker::start_with(off, port, &tmp.join("off"), &["--metrics-port", "0"]);
    let _moved = Broker::start_with(moved, port, &tmp.join("moved"), &["--metrics-port", "26999"]);
    for h in [off, moved] {
        eventually(Duration::from_secs(20), "the node answers", || cli(h, port, &["dump"]).status.success());
    }
    let refused = |h: &str, p: u16| TcpStream::connect((h, p)).is_err();
    assert!(refused(off, port + 2) && refused(off, 26999), "no metrics endpoint with --metrics-port 0");
    assert!(refused(moved, port + 2));
    check_text_format(&scrape_port(moved, 26999, "text/plain"));
}
