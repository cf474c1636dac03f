//! Process-level test of `/metrics` (`--metrics-port`, default `--port` + 2): the real
//! binary on 127.0.0.131-133, scraped with a plain HTTP GET over a TcpStream, as
//! Prometheus would.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

const HOSTS: [&str; 3] = ["127.0.0.131", "127.0.0.132", "127.0.0.133"];
const PORT: u16 = 27200;
/// `--port` + 2, the default.
const METRICS_PORT: u16 = PORT + 2;

/// The body of `GET /metrics` on `host`, with `accept` as the Accept header.
fn scrape(host: &str, accept: &str) -> String {
    let mut s = TcpStream::connect((host, METRICS_PORT)).unwrap_or_else(|e| panic!("connect {host}: {e}"));
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

#[test]
fn lag_of_an_idle_group_on_its_node_and_zero_once_consumed() {
    let tmp = test_dir("metrics_lag");
    let _nodes = three_nodes(&tmp, HOSTS, PORT);
    eventually(Duration::from_secs(30), "3 ALIVE nodes", || {
        let o = cli(HOSTS[2], PORT, &["dump"]);
        o.status.success() && alive_count(&stdout(&o)) == 3
    });
    let o = cli(HOSTS[0], PORT, &["create-topic", "t", "--replication-factor", "3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = cli(HOSTS[1], PORT, &["create-consumer-group", "g", "--bind", "t"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = cli(HOSTS[1], PORT, &["publish", "t", "m-{n}", "--count", "1000"]);
    assert!(o.status.success(), "{}", stderr(&o));

    // Exactly one node runs the group and reports its lag: every message, none read.
    let mut group_host = None;
    eventually(Duration::from_secs(20), "lag 1000 on the group's node", || {
        let found: Vec<(usize, f64)> =
            HOSTS.iter().enumerate().filter_map(|(i, h)| lag_of(&scrape(h, "text/plain")).map(|v| (i, v))).collect();
        if let [(i, v)] = found[..] {
            group_host = Some(i);
            return v == 1000.0;
        }
        false
    });
    let group_host = HOSTS[group_host.unwrap()];
    let text = scrape(group_host, "text/plain");
    check_text_format(&text);
    for h in HOSTS {
        check_text_format(&scrape(h, "*/*"));
    }
    assert!(text.contains("eventtermq_build_info{version="), "{text}");
    assert_eq!(sample(&text, "eventtermq_consumer_group_subscribers", &[("group", "g")]), Some(0.0));
    assert!(sample(&text, "eventtermq_consumer_group_oldest_unacked_seconds", &[("group", "g")]).is_some());
    let members = sample(&text, "eventtermq_gossip_members", &[("state", "alive")]);
    assert!(members.is_some_and(|n| n >= 2.0), "{text}");
    // Each message is counted once, on the node that published it (the stream went
    // in through node 2, which relays it to the primary when that is another node).
    let published: f64 = HOSTS
        .iter()
        .filter_map(|h| {
            let labels = [("topic", "t"), ("persistence", "default")];
            sample(&scrape(h, "text/plain"), "eventtermq_publish_messages_total", &labels)
        })
        .sum();
    assert_eq!(published, 1000.0);
    let entry = scrape(HOSTS[1], "text/plain");
    assert!(entry.contains("eventtermq_grpc_requests_total{method=\"/eventter.v1.Messaging/PublishStream\""));
    let leaders: f64 =
        HOSTS.iter().filter_map(|h| sample(&scrape(h, "text/plain"), "eventtermq_raft_is_leader", &[])).sum();
    assert_eq!(leaders, 1.0);

    // OpenMetrics when asked for it.
    let om = scrape(group_host, "application/openmetrics-text;version=1.0.0,text/plain;q=0.5");
    assert!(om.ends_with("# EOF\n"), "{om}");

    // Consumed (and so acknowledged) through another node: no lag left.
    let reader = HOSTS.iter().find(|h| **h != group_host).unwrap();
    let o = cli(reader, PORT, &["subscribe", "g", "--max-messages", "1000", "--wait", "10s"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).lines().count(), 1000);
    eventually(Duration::from_secs(10), "lag 0", || lag_of(&scrape(group_host, "text/plain")) == Some(0.0));
    let text = scrape(group_host, "text/plain");
    assert_eq!(sample(&text, "eventtermq_consumer_group_acks_total", &[("group", "g")]), Some(1000.0), "{text}");
    assert_eq!(sample(&text, "eventtermq_consumer_group_deliveries_total", &[("group", "g")]), Some(1000.0));
}

#[test]
fn metrics_port_zero_disables_the_endpoint() {
    let tmp = test_dir("metrics_off");
    let host = "127.0.0.134";
    let _b = Broker::start_with(host, PORT, &tmp.join("n"), &["--metrics-port", "0"]);
    eventually(Duration::from_secs(20), "the node answers", || cli(host, PORT, &["dump"]).status.success());
    assert!(TcpStream::connect((host, METRICS_PORT)).is_err());
}
