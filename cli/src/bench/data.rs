//! `eventtermq bench data-path`: W1 pipelined publishing, W2 confirm latency, W3
//! consumption from another node, on three brokers it starts itself. Prints JSON lines
//! (and progress bars on stderr); asserts nothing about timings.

use std::time::{Duration, Instant};

use eventtermq_proto::v1 as pb;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::mpsc;

use super::scrape::Scraper;
use super::{cpu_ms, rss_kib, spawn, wait_alive, Proc};
use crate::args::DataPathBenchArgs;
use crate::Ctx;
use crate::{admin_client, messaging_client, CliError};

fn err(e: impl std::fmt::Display) -> CliError {
    CliError::Failed(e.to_string())
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} {per_sec} eta {eta}")
            .expect("static template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

pub async fn run(ctx: &Ctx, args: DataPathBenchArgs) -> Result<(), CliError> {
    if args.hosts.len() != 3 {
        return Err(CliError::Usage("--hosts: give exactly three addresses".into()));
    }
    if args.batch_messages == 0 {
        return Err(CliError::Usage("--batch-messages: must be at least 1".into()));
    }
    let port: u16 =
        ctx.addr.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).unwrap_or(eventtermq_api::defaults::PORT);
    let dir = args
        .bench_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("eventtermq-bench-data-{}", std::process::id())));
    let result = data_path(ctx, &args, port, &dir).await;
    // Keep the brokers' logs (<dir>/n*.log) when something went wrong.
    if result.is_ok() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!("brokers' data and logs kept in {}", dir.display());
    }
    result
}

/// The address of the primary of `topic`'s open segment.
async fn primary_of(seed: &str, namespace: &str, topic: &str) -> Result<String, CliError> {
    let mut admin = admin_client(seed, None)?;
    let state = admin.dump(pb::DumpRequest::default()).await.map_err(err)?.into_inner().state.unwrap_or_default();
    let node = state
        .segments
        .iter()
        .find(|s| s.open && s.namespace == namespace && s.topic == topic)
        .map(|s| s.primary_node_id)
        .ok_or_else(|| err(format!("topic {topic} has no open segment")))?;
    state
        .nodes
        .iter()
        .find(|n| n.id == node)
        .map(|n| n.address.clone())
        .ok_or_else(|| err(format!("node {node} has no address")))
}

/// W2 against one node.
struct W2<'a, F: Fn(usize) -> pb::PublishRequest> {
    procs: &'a [Proc],
    count: u64,
    request: &'a F,
    /// Measured when `--floor-samples` is above 0.
    floor: Option<Floor>,
}

impl<F: Fn(usize) -> pb::PublishRequest> W2<'_, F> {
    async fn run(&self, what: &str, addr: &str, forwarded: bool) -> Result<(), CliError> {
        if self.count == 0 {
            return Ok(());
        }
        let mut client = messaging_client(addr, None)?;
        // The first call connects.
        client.publish((self.request)(1)).await.map_err(err)?;
        let progress = bar(self.count, "W2 latency");
        let mut latencies = Vec::with_capacity(self.count as usize);
        let cpu = Cpu::start(self.procs);
        for _ in 1..self.count {
            let t = Instant::now();
            client.publish((self.request)(1)).await.map_err(err)?;
            latencies.push(t.elapsed());
            progress.inc(1);
        }
        progress.finish_and_clear();
        let messages = latencies.len();
        let (p50, p99) = percentiles_us(latencies);
        println!(
            "{}",
            serde_json::json!({
                "bench": what,
                "node": addr,
                "messages": messages,
                "p50_us": p50,
                "p99_us": p99,
                "cpu": cpu.report(self.procs, self.count),
                "floor": self.floor.map(|f| f.latency(forwarded, p50, p99)),
                "cpu_floor": self.floor.map(|f| f.cpu_us_per_message(forwarded)),
            })
        );
        Ok(())
    }
}

/// p50 and p99 of `timings`, in microseconds.
fn percentiles_us(mut timings: Vec<Duration>) -> (f64, f64) {
    timings.sort();
    let pct = |p: f64| {
        timings
            .get(((timings.len() as f64 * p) as usize).min(timings.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    (pct(0.50), pct(0.99))
}

/// What W2 cannot go below on this machine, measured without a broker in the way:
/// appending one record and fsyncing it through the brokers' own storage, by one
/// writer and by three at once (as the primary and two replicas of a segment do on
/// one disk). Returns the CPU time one record took with three writers at once, in
/// microseconds (this process does nothing else meanwhile, so its CPU time is the
/// writers'): on a virtual machine most of it is the kernel's and the hypervisor's
/// part of a write and an fsync, a cost every copy of a W2 message pays. With it, the
/// three writers' p50 and p99.
async fn storage_floor(dir: &std::path::Path, samples: u64, message_bytes: usize) -> Result<Timed, CliError> {
    let mut three = Timed::default();
    for writers in [1usize, 3] {
        let base = dir.join(format!("floor-{writers}"));
        let files = base.clone();
        let cpu_before = cpu_ms(std::process::id());
        let timings = tokio::task::spawn_blocking(move || sync_timings(&files, writers, samples, message_bytes))
            .await
            .map_err(err)?
            .map_err(err)?;
        let cpu_ms_used = cpu_ms(std::process::id()) - cpu_before;
        let _ = std::fs::remove_dir_all(&base);
        let cpu_us_per_record = cpu_ms_used as f64 * 1e3 / (writers as u64 * samples).max(1) as f64;
        let (p50, p99) = percentiles_us(timings);
        three = Timed { p50_us: p50, p99_us: p99, cpu_us: cpu_us_per_record };
        println!(
            "{}",
            serde_json::json!({
                "bench": "floor: append + fdatasync of one record, no broker",
                "writers_at_once": writers,
                "records_per_writer": samples,
                "p50_us": p50,
                "p99_us": p99,
                "cpu_us_per_record": cpu_us_per_record,
            })
        );
    }
    Ok(three)
}

/// Each of `writers` threads appends `samples` records of `bytes` to its own segment
/// and fsyncs each; they start together so that their fsyncs overlap.
fn sync_timings(
    base: &std::path::Path,
    writers: usize,
    samples: u64,
    bytes: usize,
) -> Result<Vec<Duration>, eventtermq_storage::StorageError> {
    let start = std::sync::Barrier::new(writers);
    std::thread::scope(|scope| {
        let threads: Vec<_> = (0..writers)
            .map(|w| {
                let start = &start;
                scope.spawn(move || {
                    let store = eventtermq_storage::Store::open(&base.join(w.to_string()), Default::default())?;
                    let mut writer = store.create(1)?;
                    let payload = [bytes::Bytes::from(vec![b'x'; bytes])];
                    let mut timings = Vec::with_capacity(samples as usize);
                    start.wait();
                    for _ in 0..samples {
                        let t = Instant::now();
                        writer.append(0, &payload)?;
                        writer.sync()?;
                        timings.push(t.elapsed());
                    }
                    Ok(timings)
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in threads {
            all.extend(t.join().expect("a floor writer panicked")?);
        }
        Ok(all)
    })
}

/// A gRPC round trip that does no work (a health check), one at a time: the part of
/// every W2 publish (and of every replication answer) that is not the broker's.
/// Returns the CPU time one call took on each side, and its p50 and p99.
async fn rpc_floor(addr: &str, procs: &[Proc], samples: u64) -> Result<(RpcCpu, Timed), CliError> {
    let mut health = tonic_health::pb::health_client::HealthClient::new(crate::channel(addr, None)?);
    let check = || tonic_health::pb::HealthCheckRequest { service: String::new() };
    health.check(check()).await.map_err(err)?;
    let mut timings = Vec::with_capacity(samples as usize);
    let cpu = Cpu::start(procs);
    for _ in 0..samples {
        let t = Instant::now();
        health.check(check()).await.map_err(err)?;
        timings.push(t.elapsed());
    }
    let used = cpu.used(procs);
    let per_call = |ms: u64| ms as f64 * 1e3 / samples.max(1) as f64;
    let (p50, p99) = percentiles_us(timings);
    println!(
        "{}",
        serde_json::json!({
            "bench": "floor: gRPC round trip (health check), one at a time",
            "node": addr,
            "calls": samples,
            "p50_us": p50,
            "p99_us": p99,
            "cpu": {"broker_us_per_call": per_call(used.brokers_ms), "client_us_per_call": per_call(used.client_ms)},
        })
    );
    let cpu = RpcCpu { broker_us: per_call(used.brokers_ms), client_us: per_call(used.client_ms) };
    Ok((cpu, Timed { p50_us: p50, p99_us: p99, cpu_us: cpu.broker_us + cpu.client_us }))
}

/// A floor's latency percentiles and CPU time per operation, in microseconds.
#[derive(Clone, Copy, Default)]
struct Timed {
    p50_us: f64,
    p99_us: f64,
    cpu_us: f64,
}

/// CPU time of one empty gRPC round trip, per side.
#[derive(Clone, Copy)]
struct RpcCpu {
    broker_us: f64,
    client_us: f64,
}

/// What a W2 message cannot go below here, from the floors measured in the same run:
/// three fsynced appends at once (the primary and two replicas, on one disk), the
/// client's round trip and a replication round trip, and, through another node, one
/// forwarded round trip more.
#[derive(Clone, Copy)]
struct Floor {
    /// Three writers at once: their p50, p99 and CPU per record.
    fsync: Timed,
    /// One empty gRPC round trip.
    rpc: Timed,
    rpc_cpu: RpcCpu,
}

impl Floor {
    /// The latency floor, and a W2 line's p50 and p99 over it. The floor's p50 (p99) is
    /// the sum of its parts' p50s (p99s): the sum of p99s is above the p99 of the sum,
    /// so the p99 ratio errs in the broker's favour.
    fn latency(&self, forwarded: bool, p50: f64, p99: f64) -> serde_json::Value {
        let round_trips = if forwarded { 3.0 } else { 2.0 };
        let floor_p50 = self.fsync.p50_us + round_trips * self.rpc.p50_us;
        let floor_p99 = self.fsync.p99_us + round_trips * self.rpc.p99_us;
        serde_json::json!({
            "p50_us": floor_p50,
            "p99_us": floor_p99,
            "p50_ratio": p50 / floor_p50.max(1.0),
            "p99_ratio": p99 / floor_p99.max(1.0),
        })
    }

    /// The least broker CPU time a W2 message can take here: three fsynced appends,
    /// the client's round trip (its broker side), two replication round trips (both
    /// sides are brokers) and, through another node, one forwarded round trip more. An
    /// estimate: a replication answer rides a stream already open, which costs less
    /// than a unary call.
    fn cpu_us_per_message(&self, forwarded: bool) -> serde_json::Value {
        let node_to_node = self.rpc_cpu.broker_us + self.rpc_cpu.client_us;
        let round_trips = self.rpc_cpu.broker_us + node_to_node * if forwarded { 3.0 } else { 2.0 };
        serde_json::json!({
            "fsyncs_us": 3.0 * self.fsync.cpu_us,
            "round_trips_us": round_trips,
            "brokers_us_per_message": 3.0 * self.fsync.cpu_us + round_trips,
        })
    }
}

/// CPU time the brokers and this client used during one workload.
struct Cpu {
    brokers_ms: u64,
    client_ms: u64,
}

impl Cpu {
    fn now(procs: &[Proc]) -> Self {
        Cpu { brokers_ms: procs.iter().map(|p| cpu_ms(p.child.id())).sum(), client_ms: cpu_ms(std::process::id()) }
    }

    fn start(procs: &[Proc]) -> Self {
        Self::now(procs)
    }

    /// What was used since `self` was taken.
    fn used(&self, procs: &[Proc]) -> Self {
        let now = Self::now(procs);
        Cpu { brokers_ms: now.brokers_ms - self.brokers_ms, client_ms: now.client_ms - self.client_ms }
    }

    fn report(&self, procs: &[Proc], messages: u64) -> serde_json::Value {
        let used = self.used(procs);
        serde_json::json!({
            "brokers_ms": used.brokers_ms,
            "client_ms": used.client_ms,
            "brokers_us_per_message": used.brokers_ms as f64 * 1e3 / messages.max(1) as f64,
        })
    }
}

async fn data_path(ctx: &Ctx, args: &DataPathBenchArgs, port: u16, dir: &std::path::Path) -> Result<(), CliError> {
    let addrs: Vec<String> = args.hosts.iter().map(|h| format!("{h}:{port}")).collect();
    let seed = &addrs[0];
    let fsync_floor = if args.floor_samples > 0 {
        Some(storage_floor(dir, args.floor_samples, args.message_bytes).await?)
    } else {
        None
    };
    let procs = start_brokers(args, port, dir, &addrs).await?;
    let scraper = match args.scrape_interval_ms {
        0 => None,
        ms => {
            let metrics_port = port.checked_add(eventtermq_api::defaults::METRICS_PORT_OFFSET).ok_or_else(|| {
                CliError::Usage(format!(
                    "--scrape-interval-ms: the brokers' metrics port (--port {port} + 2) is past 65535"
                ))
            })?;
            let targets = args.hosts.iter().map(|h| format!("{h}:{metrics_port}")).collect();
            Some(Scraper::start(targets, Duration::from_millis(ms)))
        }
    };
    create_topic_and_group(seed, &ctx.namespace).await?;
    let persistence = crate::messages::persistence(args.persistence) as i32;
    let data: bytes::Bytes = vec![b'x'; args.message_bytes].into();
    let request = |count: usize| pb::PublishRequest {
        namespace: ctx.namespace.clone(),
        topic: "bench".into(),
        messages: (0..count).map(|_| pb::Message { data: data.clone(), ..Default::default() }).collect(),
        persistence,
        ..Default::default()
    };

    let confirmed = w1(seed, &procs, args, &request).await?;

    // W2: one message at a time, each waiting for its confirmation; once sent to the
    // segment's primary (as a client that knows where the data lives would), once
    // through another node (which forwards it).
    let primary = primary_of(seed, &ctx.namespace, "bench").await?;
    let other = addrs.iter().find(|a| **a != primary).expect("three hosts");
    let floor = match fsync_floor {
        Some(fsync) => {
            let (rpc_cpu, rpc) = rpc_floor(&primary, &procs, args.floor_samples).await?;
            Some(Floor { fsync, rpc, rpc_cpu })
        }
        None => None,
    };
    let w2 = W2 { procs: &procs, count: args.latency_messages, request: &request, floor };
    w2.run("W2 publish one at a time, to the primary", &primary, false).await?;
    w2.run("W2 publish one at a time, through another node", other, true).await?;

    // W3: everything published so far, consumed through another node.
    let expected = confirmed + 2 * args.latency_messages + 1;
    w3(&addrs[2], &procs, &ctx.namespace, expected).await?;
    if let Some(s) = scraper {
        s.finish();
    }
    drop(procs);
    Ok(())
}

/// Starts a broker on each of the three hosts (at `addrs`), the first as the seed the
/// others join, and waits until all three are members.
async fn start_brokers(
    args: &DataPathBenchArgs,
    port: u16,
    dir: &std::path::Path,
    addrs: &[String],
) -> Result<Vec<Proc>, CliError> {
    let seed = addrs[0].as_str();
    let mut procs: Vec<Proc> = Vec::new();
    for (i, h) in args.hosts.iter().enumerate() {
        procs.push(spawn(h, port, &dir.join(format!("n{i}")), (i > 0).then_some(seed), &args.broker_args)?);
        wait_alive(seed, i + 1).await?;
    }
    wait_alive(&addrs[2], 3).await?;
    for p in &mut procs {
        p.check_running()?;
    }
    Ok(procs)
}

/// The topic `bench` (one shard, three copies) and the group `bench` bound to it.
async fn create_topic_and_group(seed: &str, namespace: &str) -> Result<(), CliError> {
    let mut admin = admin_client(seed, None)?;
    let topic = pb::Topic { name: "bench".into(), shards: 1, replication_factor: 3, ..Default::default() };
    admin
        .create_topic(pb::CreateTopicRequest { namespace: namespace.to_string(), topic: Some(topic) })
        .await
        .map_err(err)?;
    let group = pb::ConsumerGroup {
        name: "bench".into(),
        bindings: vec![pb::Binding { topic: "bench".into(), ..Default::default() }],
        size: 20_000,
        ..Default::default()
    };
    admin
        .create_consumer_group(pb::CreateConsumerGroupRequest {
            namespace: namespace.to_string(),
            consumer_group: Some(group),
        })
        .await
        .map_err(err)?;
    Ok(())
}

/// W1: one client, pipelined batches over one stream. Returns how many messages were
/// confirmed.
async fn w1(
    seed: &str,
    procs: &[Proc],
    args: &DataPathBenchArgs,
    request: &impl Fn(usize) -> pb::PublishRequest,
) -> Result<u64, CliError> {
    let mut client = messaging_client(seed, None)?;
    // The topic's first segment opens right after the topic is created.
    for _ in 0..200 {
        if client.publish(request(1)).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let (tx, rx) = mpsc::channel::<pb::PublishRequest>(256);
    let total = args.messages;
    let batch = args.batch_messages as u64;
    // --exactly-once: every request carries this run's producer id and its number.
    let producer_id = if args.exactly_once { rand::random::<u64>().max(1) } else { 0 };
    let requests: Vec<pb::PublishRequest> = (0..total.div_ceil(batch))
        .map(|i| pb::PublishRequest {
            producer_id,
            sequence: if args.exactly_once { i + 1 } else { 0 },
            ..request(batch.min(total - i * batch) as usize)
        })
        .collect();
    let progress = bar(total, "W1 publish");
    let cpu = Cpu::start(procs);
    let t0 = Instant::now();
    tokio::spawn(async move {
        for r in requests {
            if tx.send(r).await.is_err() {
                return;
            }
        }
    });
    let mut confirmations =
        client.publish_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await.map_err(err)?.into_inner();
    let mut confirmed = 0u64;
    while let Some(r) = confirmations.message().await.map_err(err)? {
        confirmed += u64::from(r.count);
        progress.set_position(confirmed);
    }
    let w1 = t0.elapsed();
    progress.finish_and_clear();
    let rss: Vec<u64> = procs.iter().map(|p| rss_kib(p.child.id())).collect();
    println!(
        "{}",
        serde_json::json!({
            "bench": "W1 publish pipelined",
            "exactly_once": args.exactly_once,
            "messages": confirmed,
            "message_bytes": args.message_bytes,
            "seconds": w1.as_secs_f64(),
            "messages_per_s": confirmed as f64 / w1.as_secs_f64(),
            "mb_per_s": (confirmed as f64 * args.message_bytes as f64) / w1.as_secs_f64() / 1e6,
            "rss_kib_after": rss,
            "cpu": cpu.report(procs, confirmed),
        })
    );
    Ok(confirmed)
}

/// W3: `expected` messages consumed from the group `bench` through the node at `addr`.
async fn w3(addr: &str, procs: &[Proc], namespace: &str, expected: u64) -> Result<(), CliError> {
    let mut consumer = messaging_client(addr, None)?;
    let progress = bar(expected, "W3 consume");
    let cpu = Cpu::start(procs);
    let t0 = Instant::now();
    let mut stream = consumer
        .subscribe(pb::SubscribeRequest {
            namespace: namespace.to_string(),
            consumer_group: "bench".into(),
            size: 10_000,
            auto_ack: true,
            do_not_block: false,
            max_messages: expected,
            exclusive: false,
        })
        .await
        .map_err(err)?
        .into_inner();
    let mut received = 0u64;
    while received < expected {
        match tokio::time::timeout(Duration::from_secs(30), stream.message()).await {
            Ok(Ok(Some(_))) => {
                received += 1;
                if received.is_multiple_of(1024) {
                    progress.set_position(received);
                }
            }
            _ => break,
        }
    }
    let w3 = t0.elapsed();
    progress.finish_and_clear();
    println!(
        "{}",
        serde_json::json!({
            "bench": "W3 consume from another node",
            "messages": received,
            "expected": expected,
            "seconds": w3.as_secs_f64(),
            "messages_per_s": received as f64 / w3.as_secs_f64(),
            "cpu": cpu.report(procs, received),
        })
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_the_50th_and_99th_of_100() {
        let timings: Vec<Duration> = (1..=100).rev().map(Duration::from_micros).collect();
        assert_eq!(percentiles_us(timings), (51.0, 100.0));
        assert_eq!(percentiles_us(Vec::new()), (0.0, 0.0));
    }

    #[test]
    fn the_storage_floor_times_every_fsync_of_every_writer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let timings = sync_timings(dir.path(), 3, 5, 1024).expect("sync timings");
        assert_eq!(timings.len(), 15);
        // Each writer left a segment holding its five records.
        for w in 0..3 {
            let store =
                eventtermq_storage::Store::open(&dir.path().join(w.to_string()), Default::default()).expect("reopen");
            assert_eq!(store.info(1).expect("segment 1").next_offset, 5);
        }
    }
}
