//! `eventtermq bench scale`: how the brokers' cost grows with what they hold. Three
//! brokers it starts itself; N topics and N consumer groups (one bound to each topic),
//! one message published to every topic, M streaming subscribers over C connections;
//! at each stage the brokers' memory, CPU, descriptors and files, and CPU while idle.
//! Prints JSON lines; asserts nothing about timings (bench/scale.md has the figures).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventtermq_proto::v1 as pb;
use futures::StreamExt;
use tokio::sync::mpsc;

use super::{cpu_ms, rss_kib, spawn_binary, wait_alive, Proc};
use crate::args::ScaleBenchArgs;
use crate::Ctx;
use crate::{admin_client, CliError};

/// Bound on waiting for the leader to open every topic's segment, and for every
/// subscriber to receive its topic's message.
const SETTLE_WAIT_MAX: Duration = Duration::from_secs(900);
/// Pause between looks while waiting for the cluster to settle.
const SETTLE_POLL: Duration = Duration::from_millis(250);
/// Bound on one message's delivery in the latency stage.
const DELIVERY_WAIT_MAX: Duration = Duration::from_secs(30);

fn err(e: impl std::fmt::Display) -> CliError {
    CliError::Failed(e.to_string())
}

pub async fn run(ctx: &Ctx, args: ScaleBenchArgs) -> Result<(), CliError> {
    if args.hosts.len() != 3 {
        return Err(CliError::Usage("--hosts: give exactly three addresses".into()));
    }
    if args.subscribers > args.topics {
        return Err(CliError::Usage(format!(
            "--subscribers: at most --topics ({}), one per group; got {}",
            args.topics, args.subscribers
        )));
    }
    if args.subscribers > 0 && args.connections == 0 {
        return Err(CliError::Usage("--connections: must be at least 1 with subscribers".into()));
    }
    let dir = args
        .brokers
        .bench_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("eventtermq-bench-scale-{}", std::process::id())));
    let result = scale(ctx, &args, &dir).await;
    if result.is_ok() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!("brokers' data and logs kept in {}", dir.display());
    }
    result
}

struct Cluster {
    procs: Vec<Proc>,
    addrs: Vec<String>,
    dirs: Vec<PathBuf>,
}

async fn scale(ctx: &Ctx, args: &ScaleBenchArgs, dir: &Path) -> Result<(), CliError> {
    let port = args.broker_port;
    let super::Three { exe, extra, procs, addrs, dirs } =
        super::start_three(&args.brokers, &args.hosts, port, dir).await?;
    let c = Cluster { procs, addrs, dirs };
    let ns = ctx.namespace.as_str();
    let n = args.topics;
    println!(
        "{}",
        serde_json::json!({"bench": "scale: setup", "broker": exe.display().to_string(), "topics": n,
            "groups": n, "subscribers": args.subscribers, "connections": args.connections,
            "concurrency": args.concurrency})
    );
    let empty = stage(&c, "empty");
    idle(&c, "empty", args.idle_seconds).await;

    // One connection per node, shared by the concurrent requests.
    let admins = c.addrs.iter().map(|a| admin_client(a, None)).collect::<Result<Vec<_>, _>>()?;
    let messengers = c.addrs.iter().map(|a| crate::messaging_client(a, None)).collect::<Result<Vec<_>, _>>()?;
    let created = Instant::now();
    let t = Instant::now();
    run_concurrently(n, args.concurrency, |i| {
        let admin = admins[i % admins.len()].clone();
        let topic = pb::Topic { name: topic_name(i), shards: 1, replication_factor: 3, ..Default::default() };
        let req = pb::CreateTopicRequest { namespace: ns.to_string(), topic: Some(topic) };
        retrying(move || {
            let (mut admin, req) = (admin.clone(), req.clone());
            async move { admin.create_topic(req).await }
        })
    })
    .await?;
    rate("scale: create topics", n, t.elapsed());
    let t = Instant::now();
    let open = wait_open_segments(&c.addrs[0], n).await?;
    println!(
        "{}",
        serde_json::json!({"bench": "scale: segments opened", "open_segments": open,
            "seconds_after_last_create": t.elapsed().as_secs_f64(),
            "seconds_from_first_create": created.elapsed().as_secs_f64()})
    );
    let t = Instant::now();
    run_concurrently(n, args.concurrency, |i| {
        let admin = admins[i % admins.len()].clone();
        let group = pb::ConsumerGroup {
            name: group_name(i),
            bindings: vec![pb::Binding { topic: topic_name(i), ..Default::default() }],
            ..Default::default()
        };
        let req = pb::CreateConsumerGroupRequest { namespace: ns.to_string(), consumer_group: Some(group) };
        retrying(move || {
            let (mut admin, req) = (admin.clone(), req.clone());
            async move { admin.create_consumer_group(req).await }
        })
    })
    .await?;
    rate("scale: create groups", n, t.elapsed());
    let full = stage(&c, "created");
    per_object(&empty, &full, n);

    let before = brokers_cpu_ms(&c);
    let t = Instant::now();
    run_concurrently(n, args.concurrency, |i| {
        let mut client = messengers[i % messengers.len()].clone();
        let message = pb::Message { data: format!("m-{i}").into_bytes().into(), ..Default::default() };
        let req = pb::PublishRequest {
            namespace: ns.to_string(),
            topic: topic_name(i),
            messages: vec![message],
            ..Default::default()
        };
        async move { client.publish(req).await.map(drop).map_err(err) }
    })
    .await?;
    let elapsed = t.elapsed();
    println!(
        "{}",
        serde_json::json!({"bench": "scale: publish one message to every topic", "messages": n,
            "seconds": elapsed.as_secs_f64(), "per_second": (n as f64 / elapsed.as_secs_f64()).round(),
            "brokers_cpu_ms": brokers_cpu_ms(&c) - before,
            "brokers_us_per_message": (brokers_cpu_ms(&c) - before) as f64 * 1e3 / n.max(1) as f64})
    );
    stage(&c, "published");
    idle(&c, "published, no subscriber", args.idle_seconds).await;

    let mut subs = Subscribers::start(&c.addrs, ns, args.subscribers, args.connections)?;
    let t = Instant::now();
    subs.wait_first(args.subscribers).await?;
    println!(
        "{}",
        serde_json::json!({"bench": "scale: subscribers connected and each got its topic's message",
            "subscribers": args.subscribers, "connections": args.connections, "seconds": t.elapsed().as_secs_f64()})
    );
    stage(&c, "subscribed");
    idle(&c, "subscribed", args.idle_seconds).await;
    latency(&c, ns, &mut subs, args.subscribers, args.latency_messages).await?;
    dump_timing(&c.addrs[0]).await?;
    stage(&c, "end");
    drop(subs);
    if !args.joiner_host.is_empty() {
        let joiner = Joiner { exe: &exe, host: &args.joiner_host, port, dir: &dir.join("n3"), extra: &extra };
        joiner.join(&c, ns, n).await?;
    }
    Ok(())
}

/// A fourth broker joining the loaded cluster (issue 18 item 7: the cluster state's
/// Raft snapshot taken and installed on a new node).
struct Joiner<'a> {
    exe: &'a Path,
    host: &'a str,
    port: u16,
    dir: &'a Path,
    extra: &'a [String],
}

impl Joiner<'_> {
    /// Starts the node and reports how long it took to become a member and to hold the
    /// whole state (all `topics` topics and as many groups of `namespace`, in its own
    /// stale dump), whether it got that state as a snapshot, and the snapshot's size.
    async fn join(&self, c: &Cluster, namespace: &str, topics: usize) -> Result<(), CliError> {
        let t = Instant::now();
        let mut proc = spawn_binary(self.exe, self.host, self.port, self.dir, Some(&c.addrs[0]), self.extra)?;
        let addr = format!("{}:{}", self.host, self.port);
        wait_alive(&c.addrs[0], 4).await?;
        let member = t.elapsed();
        let holds = |d: &pb::DumpResponse| {
            d.state
                .as_ref()
                .and_then(|s| s.namespaces.iter().find(|n| n.name == namespace))
                .is_some_and(|n| n.topics.len() >= topics && n.consumer_groups.len() >= topics)
        };
        let whole_state = loop {
            if super::dump(&addr).await.is_some_and(|d| holds(&d)) {
                break t.elapsed();
            }
            proc.check_running()?;
            if t.elapsed() > JOIN_WAIT_MAX {
                return Err(err(format!(
                    "{addr}: the joining node did not hold the whole state within {JOIN_WAIT_MAX:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let log = std::fs::read_to_string(self.dir.with_extension("log")).unwrap_or_default();
        let snapshot_bytes: u64 = std::fs::read_dir(self.dir.join("raft").join("sm"))
            .map(|entries| entries.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum())
            .unwrap_or(0);
        println!(
            "{}",
            serde_json::json!({"bench": "scale: a fourth node joins", "host": addr,
                "seconds_to_member": member.as_secs_f64(), "seconds_to_whole_state": whole_state.as_secs_f64(),
                "installed_snapshot": log.contains("installed a raft snapshot"),
                "snapshot_dir_bytes": snapshot_bytes, "rss_kib": rss_kib(proc.child.id())})
        );
        Ok(())
    }
}

/// How long [`Joiner::join`] waits for the new node to hold the whole state.
const JOIN_WAIT_MAX: Duration = Duration::from_secs(300);

fn topic_name(i: usize) -> String {
    format!("scale-t{i}")
}

fn group_name(i: usize) -> String {
    format!("scale-g{i}")
}

fn rate(what: &str, count: usize, elapsed: Duration) {
    println!(
        "{}",
        serde_json::json!({"bench": what, "count": count, "seconds": elapsed.as_secs_f64(),
            "per_second": (count as f64 / elapsed.as_secs_f64()).round()})
    );
}

/// Runs `f(i)` for every `i` below `count`, `concurrency` at a time.
async fn run_concurrently<F, Fut>(count: usize, concurrency: usize, f: F) -> Result<(), CliError>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<(), CliError>>,
{
    let results = futures::stream::iter(0..count).map(&f).buffer_unordered(concurrency.max(1));
    let mut results = std::pin::pin!(results);
    while let Some(r) = results.next().await {
        r?;
    }
    Ok(())
}

/// Attempts of an idempotent write (a create) whose outcome was unknown or that found
/// no leader, before the bench gives up.
const WRITE_ATTEMPTS_MAX: u32 = 10;
/// Pause between those attempts.
const WRITE_RETRY_PAUSE: Duration = Duration::from_secs(1);

/// Sends an idempotent write until it is answered (creating the same topic or group
/// again succeeds), at most [`WRITE_ATTEMPTS_MAX`] times.
async fn retrying<T, Fut>(mut send: impl FnMut() -> Fut) -> Result<(), CliError>
where
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let mut attempt = 1;
    loop {
        match send().await {
            Ok(_) => return Ok(()),
            Err(s)
                if attempt < WRITE_ATTEMPTS_MAX
                    && matches!(s.code(), tonic::Code::Unavailable | tonic::Code::DeadlineExceeded) =>
            {
                attempt += 1;
                tokio::time::sleep(WRITE_RETRY_PAUSE).await
            }
            Err(s) => return Err(err(s)),
        }
    }
}

/// Waits until the state has `count` open segments (the leader opens one per topic).
async fn wait_open_segments(seed: &str, count: usize) -> Result<usize, CliError> {
    let mut admin = admin_client(seed, None)?.max_decoding_message_size(usize::MAX);
    let t0 = Instant::now();
    loop {
        let d = admin.dump(pb::DumpRequest { stale: true, ..Default::default() }).await.map_err(err)?.into_inner();
        let open = d.state.map_or(0, |s| s.segments.iter().filter(|s| s.open).count());
        if open >= count {
            return Ok(open);
        }
        if t0.elapsed() > SETTLE_WAIT_MAX {
            return Err(err(format!("{open} of {count} segments open after {SETTLE_WAIT_MAX:?}")));
        }
        tokio::time::sleep(SETTLE_POLL).await;
    }
}

/// One broker's figures at a stage.
#[derive(Clone, Copy, Default)]
struct NodeFigures {
    rss_kib: u64,
    fds: usize,
    files: usize,
    dir_entries_max: usize,
}

fn stage(c: &Cluster, name: &str) -> Vec<NodeFigures> {
    let figures: Vec<NodeFigures> = c
        .procs
        .iter()
        .zip(&c.dirs)
        .map(|(p, dir)| {
            let pid = p.child.id();
            let (files, dir_entries_max) = count_files(dir);
            NodeFigures {
                rss_kib: rss_kib(pid),
                fds: std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count()),
                files,
                dir_entries_max,
            }
        })
        .collect();
    let nodes: Vec<serde_json::Value> = figures
        .iter()
        .zip(&c.procs)
        .map(|(f, p)| {
            serde_json::json!({"host": p.host, "rss_kib": f.rss_kib, "cpu_ms": cpu_ms(p.child.id()),
                "fds": f.fds, "files": f.files, "dir_entries_max": f.dir_entries_max})
        })
        .collect();
    println!("{}", serde_json::json!({"bench": "scale: stage", "stage": name, "nodes": nodes}));
    figures
}

/// How memory and files grew per topic-and-group pair between two stages.
fn per_object(before: &[NodeFigures], after: &[NodeFigures], objects: usize) {
    let per = |f: fn(&NodeFigures) -> u64| -> Vec<f64> {
        before.iter().zip(after).map(|(b, a)| (f(a) as f64 - f(b) as f64) / objects.max(1) as f64).collect()
    };
    println!(
        "{}",
        serde_json::json!({"bench": "scale: growth per topic with its group", "objects": objects,
            "rss_kib": per(|f| f.rss_kib), "fds": per(|f| f.fds as u64), "files": per(|f| f.files as u64)})
    );
}

/// Files under `dir` (recursively), and the most entries of one directory.
fn count_files(dir: &Path) -> (usize, usize) {
    let mut files = 0;
    let mut most = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        let mut here = 0;
        for e in entries.flatten() {
            here += 1;
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(_) => files += 1,
                Err(_) => {}
            }
        }
        most = most.max(here);
    }
    (files, most)
}

fn brokers_cpu_ms(c: &Cluster) -> u64 {
    c.procs.iter().map(|p| cpu_ms(p.child.id())).sum()
}

/// How long the cluster state must stay unchanged before an idle measurement starts.
const SETTLED_FOR: Duration = Duration::from_secs(3);

/// Waits until the cluster state stopped changing for [`SETTLED_FOR`] (what the last
/// stage started, such as the groups' first offset commits, is done), at most
/// [`SETTLE_WAIT_MAX`]; says how long it waited.
async fn settle(seed: &str) -> Duration {
    let t0 = Instant::now();
    let Ok(admin) = admin_client(seed, None) else { return Duration::ZERO };
    let mut admin = admin.max_decoding_message_size(usize::MAX);
    let mut last: Option<(u64, Instant)> = None;
    while t0.elapsed() < SETTLE_WAIT_MAX {
        // A prefix no topic has: the answer carries the index, not the state.
        let req = pb::DumpRequest { stale: true, prefix: "\u{0}".into(), ..Default::default() };
        let index = admin.dump(req).await.ok().and_then(|d| d.into_inner().state).map_or(0, |s| s.index);
        match last {
            Some((i, since)) if i == index => {
                if since.elapsed() >= SETTLED_FOR {
                    break;
                }
            }
            _ => last = Some((index, Instant::now())),
        }
        tokio::time::sleep(SETTLE_POLL).await;
    }
    t0.elapsed()
}

/// How long tokio keeps an idle blocking-pool thread (its default), and a second more.
const BLOCKING_THREADS_IDLE_OUT: Duration = Duration::from_secs(11);

/// The number of threads of process `pid` (0 when unknown).
fn threads_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("Threads:")?.trim().parse().ok()).unwrap_or(0)
}

/// CPU of each broker over `seconds` while the bench does nothing, once the cluster
/// state stopped changing and the stage's blocking-pool threads have exited.
async fn idle(c: &Cluster, stage: &str, seconds: u64) {
    if seconds == 0 {
        return;
    }
    let settled_after = settle(&c.addrs[0]).await;
    let pids: Vec<u32> = c.procs.iter().map(|p| p.child.id()).collect();
    // The stage's fsyncs ran on tokio's blocking pool, whose threads (hundreds after a
    // burst) exit 10 s after their last task: tearing them down is the stage's cost,
    // not idling's.
    tokio::time::sleep(BLOCKING_THREADS_IDLE_OUT).await;
    let threads: Vec<u64> = pids.iter().map(|p| threads_of(*p)).collect();
    let before: Vec<u64> = pids.iter().map(|p| cpu_ms(*p)).collect();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let used: Vec<u64> = pids.iter().zip(&before).map(|(p, b)| cpu_ms(*p).saturating_sub(*b)).collect();
    let total: u64 = used.iter().sum();
    println!(
        "{}",
        serde_json::json!({"bench": "scale: idle", "stage": stage, "seconds": seconds, "cpu_ms": used,
            "percent_of_one_core": total as f64 / (seconds as f64 * 10.0), "threads": threads,
            "settled_after_seconds": settled_after.as_secs_f64()})
    );
}

/// Streaming subscribers, one per group `0..count`, spread over `connections`
/// connections to the three brokers. Each reports (group, when) for every message.
struct Subscribers {
    received: mpsc::UnboundedReceiver<(usize, Instant)>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    failed: Arc<AtomicUsize>,
}

impl Subscribers {
    fn start(addrs: &[String], namespace: &str, count: usize, connections: usize) -> Result<Self, CliError> {
        let (tx, received) = mpsc::unbounded_channel();
        let failed = Arc::new(AtomicUsize::new(0));
        let mut channels = Vec::new();
        for c in 0..connections.min(count.max(1)) {
            channels.push(crate::channel(&addrs[c % addrs.len()], None)?);
        }
        let mut tasks = Vec::new();
        for g in 0..count {
            let channel = channels[g % channels.len()].clone();
            let (tx, failed) = (tx.clone(), failed.clone());
            let req = pb::SubscribeRequest {
                namespace: namespace.to_string(),
                consumer_group: group_name(g),
                size: 10,
                auto_ack: true,
                ..Default::default()
            };
            tasks.push(tokio::spawn(async move {
                let mut client = eventtermq_proto::v1::messaging_client::MessagingClient::new(channel);
                let mut stream = match client.subscribe(req).await {
                    Ok(s) => s.into_inner(),
                    Err(e) => {
                        eprintln!("subscriber of group {g}: {e}");
                        failed.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                };
                while let Some(m) = stream.next().await {
                    match m {
                        Ok(_) => {
                            if tx.send((g, Instant::now())).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            eprintln!("subscriber of group {g}: {e}");
                            failed.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    }
                }
            }));
        }
        Ok(Subscribers { received, tasks, failed })
    }

    /// Waits until each of the `count` subscribers got a message (its topic's one).
    async fn wait_first(&mut self, count: usize) -> Result<(), CliError> {
        let mut got = vec![false; count];
        let mut missing = count;
        let deadline = Instant::now() + SETTLE_WAIT_MAX;
        while missing > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.received.recv()).await {
                Ok(Some((g, _))) => {
                    if !std::mem::replace(&mut got[g], true) {
                        missing -= 1;
                    }
                }
                _ => {
                    return Err(err(format!(
                        "{missing} of {count} subscribers got nothing ({} failed)",
                        self.failed.load(Ordering::Relaxed)
                    )))
                }
            }
        }
        Ok(())
    }
}

impl Drop for Subscribers {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Publishes `messages` one at a time, each to the topic of a subscribed group in
/// turn, and measures the time from the publish to its subscriber's receipt.
async fn latency(
    c: &Cluster,
    namespace: &str,
    subs: &mut Subscribers,
    subscribers: usize,
    messages: usize,
) -> Result<(), CliError> {
    if subscribers == 0 || messages == 0 {
        return Ok(());
    }
    let mut clients = Vec::new();
    for a in &c.addrs {
        clients.push(crate::messaging_client(a, None)?);
    }
    let before = brokers_cpu_ms(c);
    let mut timings = Vec::with_capacity(messages);
    for i in 0..messages {
        // Spread over the groups, and over the nodes the publishes enter by.
        let g = (i * 7919) % subscribers;
        let message = pb::Message { data: format!("latency-{i}").into_bytes().into(), ..Default::default() };
        let req = pb::PublishRequest {
            namespace: namespace.to_string(),
            topic: topic_name(g),
            messages: vec![message],
            ..Default::default()
        };
        let t0 = Instant::now();
        let k = i % clients.len();
        clients[k].publish(req).await.map_err(err)?;
        loop {
            match tokio::time::timeout(DELIVERY_WAIT_MAX, subs.received.recv()).await {
                Ok(Some((got, at))) if got == g => {
                    timings.push(at.saturating_duration_since(t0));
                    break;
                }
                Ok(Some(_)) => continue, // a redelivery of something else
                _ => return Err(err(format!("message {i} to group {g} not delivered within {DELIVERY_WAIT_MAX:?}"))),
            }
        }
    }
    timings.sort();
    let pct = |p: f64| {
        let i = ((timings.len() as f64 * p) as usize).min(timings.len().saturating_sub(1));
        timings.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    println!(
        "{}",
        serde_json::json!({"bench": "scale: delivery latency, publish to subscriber, one at a time",
            "messages": messages, "groups": subscribers, "p50_us": pct(0.5), "p99_us": pct(0.99),
            "brokers_us_per_message": (brokers_cpu_ms(c) - before) as f64 * 1e3 / messages as f64})
    );
    Ok(())
}

/// How long `dump` takes with everything created, and how big it is.
async fn dump_timing(seed: &str) -> Result<(), CliError> {
    use prost::Message as _;
    let mut admin = admin_client(seed, None)?.max_decoding_message_size(usize::MAX);
    for stale in [true, false] {
        let t = Instant::now();
        let d = admin.dump(pb::DumpRequest { stale, ..Default::default() }).await.map_err(err)?.into_inner();
        let elapsed = t.elapsed();
        println!(
            "{}",
            serde_json::json!({"bench": "scale: dump", "stale": stale, "ms": elapsed.as_secs_f64() * 1e3,
                "bytes": d.encoded_len()})
        );
    }
    Ok(())
}
