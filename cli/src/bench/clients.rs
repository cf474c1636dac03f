//! `eventtermq bench clients`: many publishers and subscribers on one node (issue 18
//! item 4). Three brokers it starts itself; every client connects to the first one.
//! Three phases, each on topics of its own: W1 (one publisher, one `PublishStream`,
//! pipelined, as `bench data-path`'s), the same single stream with its topic's
//! subscribers attached, then `--publishers` publishers at once, each to its own topic,
//! with `--subscribers` subscribers spread evenly over the topics' groups. Per phase:
//! publish throughput, what each subscriber got (min, max, their ratio, overall and
//! within a group), whether every confirmed message was delivered, delivery latency
//! (the publisher's send time travels in the message), the brokers' CPU per message
//! and RSS (peak while running). Prints JSON lines; asserts nothing about timings.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventtermq_proto::v1 as pb;
use eventtermq_proto::v1::messaging_client::MessagingClient;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use super::{cpu_ms, rss_kib, Proc};
use crate::args::ClientsBenchArgs;
use crate::Ctx;
use crate::{admin_client, CliError};

/// Bound on waiting for subscribers to get what was confirmed after publishing ended.
const DRAIN_WAIT_MAX: Duration = Duration::from_secs(120);
/// Bound on waiting for a topic's first segment to open (the first publish succeeds).
const OPEN_WAIT_MAX: Duration = Duration::from_secs(60);
/// How often the brokers' RSS is sampled while a phase runs (for its peak).
const RSS_SAMPLE_INTERVAL: Duration = Duration::from_millis(250);
/// Publish requests a publisher keeps queued for its stream (HTTP/2 flow control and
/// the broker's budget bound what is in flight beyond them). The send time is taken
/// when a request enters this queue, so a longer one only adds to the latency measured
/// (16 did: 100 MiB queued in this process with 100 publishers).
const PUBLISHER_QUEUE_REQUESTS: usize = 2;
/// Subscriptions (and with them new connections) made at once: 1,100 connections
/// opened at the same moment overflowed the brokers' accept queue (connection resets).
const SUBSCRIBES_AT_ONCE_MAX: usize = 64;
/// Bytes at the front of every message's data: the publisher's send time.
const STAMP_BYTES: usize = 8;

fn err(e: impl std::fmt::Display) -> CliError {
    CliError::Failed(e.to_string())
}

/// How many clients of each kind a phase runs, and how subscribers map to groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Shape {
    /// Publishers, each with its own topic.
    pub publishers: usize,
    /// Consumer groups bound to each topic (1: the subscribers of a topic share its
    /// messages; as many as its subscribers: each gets every message of the topic).
    pub groups_per_topic: usize,
    /// Subscribers of each group.
    pub subscribers_per_group: usize,
}

impl Shape {
    /// Checks the flags: `subscribers` must spread evenly over `publishers` topics and
    /// their `groups_per_topic` groups.
    pub(crate) fn new(publishers: usize, subscribers: usize, groups_per_topic: usize) -> Result<Shape, CliError> {
        if publishers == 0 {
            return Err(CliError::Usage("--publishers: must be at least 1".into()));
        }
        if groups_per_topic == 0 {
            return Err(CliError::Usage("--groups-per-topic: must be at least 1".into()));
        }
        let groups = publishers * groups_per_topic;
        if subscribers == 0 || !subscribers.is_multiple_of(groups) {
            return Err(CliError::Usage(format!(
                "--subscribers: must be a positive multiple of --publishers x --groups-per-topic ({groups}), \
                 so that every group has as many subscribers; got {subscribers}"
            )));
        }
        Ok(Shape { publishers, groups_per_topic, subscribers_per_group: subscribers / groups })
    }

    fn groups(&self) -> usize {
        self.publishers * self.groups_per_topic
    }

    fn subscribers(&self) -> usize {
        self.groups() * self.subscribers_per_group
    }
}

pub async fn run(ctx: &Ctx, args: ClientsBenchArgs) -> Result<(), CliError> {
    if args.hosts.len() != 3 {
        return Err(CliError::Usage("--hosts: give exactly three addresses".into()));
    }
    let shape = Shape::new(args.publishers, args.subscribers, args.groups_per_topic)?;
    if args.seconds == 0 && args.messages_per_publisher == 0 {
        return Err(CliError::Usage("--seconds: must be at least 1 unless --messages-per-publisher is set".into()));
    }
    if args.batch_messages == 0 {
        return Err(CliError::Usage("--batch-messages: must be at least 1".into()));
    }
    if args.message_bytes < STAMP_BYTES {
        return Err(CliError::Usage(format!(
            "--message-bytes: at least {STAMP_BYTES} (the send time travels in the message); got {}",
            args.message_bytes
        )));
    }
    if args.subscriber_size == 0 {
        return Err(CliError::Usage("--subscriber-size: must be at least 1".into()));
    }
    let dir = args
        .brokers
        .bench_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("eventtermq-bench-clients-{}", std::process::id())));
    let result = clients(ctx, &args, shape, &dir).await;
    if result.is_ok() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!("brokers' data and logs kept in {}", dir.display());
    }
    result
}

async fn clients(ctx: &Ctx, args: &ClientsBenchArgs, shape: Shape, dir: &Path) -> Result<(), CliError> {
    let port = args.broker_port;
    let super::Three { exe, procs, addrs, .. } = super::start_three(&args.brokers, &args.hosts, port, dir).await?;
    let connections = if args.connections == 0 { shape.publishers + shape.subscribers() } else { args.connections };
    println!(
        "{}",
        serde_json::json!({"bench": "clients: setup", "broker": exe.display().to_string(),
            "entry_node": addrs[0], "publishers": shape.publishers, "subscribers": shape.subscribers(),
            "groups_per_topic": shape.groups_per_topic, "subscribers_per_group": shape.subscribers_per_group,
            "connections": connections, "seconds": args.seconds,
            "messages_per_publisher": args.messages_per_publisher, "message_bytes": args.message_bytes,
            "batch_messages": args.batch_messages, "subscriber_size": args.subscriber_size})
    );
    let bench = Bench { ctx, args, procs: &procs, entry: &addrs[0] };
    let single = Shape { publishers: 1, ..shape };
    let w1 = bench.phase("W1: one publisher, no subscriber", "w1", single, None, 1).await?;
    let w1_subs =
        bench.phase("single stream with its subscribers", "one", single, Some(single.subscribers()), 1).await?;
    let many = bench.phase("many clients", "many", shape, Some(shape.subscribers()), connections).await?;
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    println!(
        "{}",
        serde_json::json!({"bench": "clients: summary",
            "throughput_vs_w1": ratio(many.messages_per_s, w1.messages_per_s),
            "throughput_vs_single_stream_with_subscribers": ratio(many.messages_per_s, w1_subs.messages_per_s),
            "delivered_max_over_min": many.fairness,
            "every_confirmed_message_delivered": many.all_delivered,
            "brokers_us_per_message": {"w1": w1.brokers_us_per_message,
                "single_stream_with_subscribers": w1_subs.brokers_us_per_message,
                "many_clients": many.brokers_us_per_message},
            "rss_kib_peak": many.rss_kib_peak})
    );
    drop(procs);
    Ok(())
}

struct Bench<'a> {
    ctx: &'a Ctx,
    args: &'a ClientsBenchArgs,
    procs: &'a [Proc],
    entry: &'a str,
}

/// What the summary compares between phases.
struct PhaseFigures {
    messages_per_s: f64,
    brokers_us_per_message: f64,
    fairness: f64,
    all_delivered: bool,
    rss_kib_peak: Vec<u64>,
}

fn topic_name(phase: &str, t: usize) -> String {
    format!("clients-{phase}-t{t}")
}

fn group_name(phase: &str, t: usize, g: usize) -> String {
    format!("clients-{phase}-t{t}-g{g}")
}

impl Bench<'_> {
    /// Creates the phase's topics and groups, connects its subscribers (`None`: none,
    /// the groups are created all the same, as in `bench data-path`), publishes, waits
    /// for every confirmed message to be delivered and prints the phase's line.
    async fn phase(
        &self,
        what: &str,
        phase: &str,
        shape: Shape,
        subscribers: Option<usize>,
        connections: usize,
    ) -> Result<PhaseFigures, CliError> {
        let ns = self.ctx.namespace.as_str();
        let args = self.args;
        create(self.entry, ns, phase, shape).await?;
        let channels: Vec<Channel> =
            (0..connections.max(1)).map(|_| crate::channel(self.entry, None)).collect::<Result<_, _>>()?;
        // Every topic's segment open (its first publish succeeds) before anything is timed.
        for t in 0..shape.publishers {
            wait_open(&channels[t % channels.len()], ns, &topic_name(phase, t)).await?;
        }
        let epoch = Instant::now();
        let subs = match subscribers {
            Some(_) => Some(Subscribers::start(&channels, ns, phase, shape, args.subscriber_size, epoch).await?),
            None => None,
        };
        let rss = RssSampler::start(self.procs);
        let cpu_before = Cpu::now(self.procs);
        let stop_at = (args.messages_per_publisher == 0).then(|| Instant::now() + Duration::from_secs(args.seconds));
        let t0 = Instant::now();
        let mut publishers = Vec::new();
        for t in 0..shape.publishers {
            // Publishers take the first connections, subscribers the next ones.
            let p = Publisher {
                channel: channels[t % channels.len()].clone(),
                namespace: ns.to_string(),
                topic: topic_name(phase, t),
                message_bytes: args.message_bytes,
                batch_messages: args.batch_messages,
                messages: args.messages_per_publisher,
                stop_at,
                epoch,
            };
            publishers.push(tokio::spawn(p.run()));
        }
        let mut confirmed = Vec::with_capacity(shape.publishers);
        for p in publishers {
            confirmed.push(p.await.map_err(err)??);
        }
        let publish_time = t0.elapsed();
        let cpu_published = Cpu::now(self.procs);
        let total: u64 = confirmed.iter().sum();
        let mut line = serde_json::json!({
            "bench": format!("clients: {what}"),
            "publishers": shape.publishers,
            "messages": total,
            "message_bytes": args.message_bytes,
            "seconds": publish_time.as_secs_f64(),
            "messages_per_s": total as f64 / publish_time.as_secs_f64(),
            "mb_per_s": total as f64 * args.message_bytes as f64 / publish_time.as_secs_f64() / 1e6,
            "confirmed_per_publisher": min_max(&confirmed),
        });
        let mut fairness = 0.0;
        let mut all_delivered = true;
        if let Some(subs) = subs {
            // What each topic holds: its confirmed messages and the one that opened it.
            let stored: Vec<u64> = confirmed.iter().map(|c| c + 1).collect();
            let drained = subs.drain(shape, &stored).await;
            let report = subs.finish(shape, &stored, drained).await;
            fairness = report["delivered_per_subscriber"]["max_over_min"].as_f64().unwrap_or(f64::INFINITY);
            all_delivered = report["every_confirmed_message_delivered"].as_bool().unwrap_or(false);
            line["subscribers"] = report;
        }
        let cpu_end = Cpu::now(self.procs);
        let rss_kib_peak = rss.finish().await;
        let brokers_us_per_message = cpu_published.brokers_since(&cpu_before) as f64 * 1e3 / total.max(1) as f64;
        line["cpu"] = serde_json::json!({
            "while_publishing": cpu_published.report(&cpu_before, total),
            "with_draining": cpu_end.report(&cpu_before, total),
        });
        line["rss_kib"] = serde_json::json!({
            "peak": rss_kib_peak,
            "after": self.procs.iter().map(|p| rss_kib(p.child.id())).collect::<Vec<_>>(),
        });
        println!("{line}");
        // The next phase starts with the disk this one used given back.
        delete(self.entry, ns, phase, shape).await?;
        Ok(PhaseFigures {
            messages_per_s: total as f64 / publish_time.as_secs_f64(),
            brokers_us_per_message,
            fairness,
            all_delivered,
            rss_kib_peak,
        })
    }
}

/// The phase's topics (one shard, three copies, one per publisher) and their groups.
async fn create(entry: &str, namespace: &str, phase: &str, shape: Shape) -> Result<(), CliError> {
    let mut admin = admin_client(entry, None)?;
    for t in 0..shape.publishers {
        let topic = pb::Topic { name: topic_name(phase, t), shards: 1, replication_factor: 3, ..Default::default() };
        admin
            .create_topic(pb::CreateTopicRequest { namespace: namespace.to_string(), topic: Some(topic) })
            .await
            .map_err(err)?;
        for g in 0..shape.groups_per_topic {
            let group = pb::ConsumerGroup {
                name: group_name(phase, t, g),
                bindings: vec![pb::Binding { topic: topic_name(phase, t), ..Default::default() }],
                ..Default::default()
            };
            admin
                .create_consumer_group(pb::CreateConsumerGroupRequest {
                    namespace: namespace.to_string(),
                    consumer_group: Some(group),
                })
                .await
                .map_err(err)?;
        }
    }
    Ok(())
}

/// Deletes the phase's groups and topics (each node then deletes its copies).
async fn delete(entry: &str, namespace: &str, phase: &str, shape: Shape) -> Result<(), CliError> {
    let mut admin = admin_client(entry, None)?;
    for t in 0..shape.publishers {
        for g in 0..shape.groups_per_topic {
            let req = pb::DeleteConsumerGroupRequest { namespace: namespace.into(), name: group_name(phase, t, g) };
            admin.delete_consumer_group(req).await.map_err(err)?;
        }
        let req = pb::DeleteTopicRequest { namespace: namespace.into(), name: topic_name(phase, t) };
        admin.delete_topic(req).await.map_err(err)?;
    }
    Ok(())
}

/// Waits until `topic` took a publish of one message shorter than a stamp (its
/// subscribers count it, but it has no send time to measure).
async fn wait_open(channel: &Channel, namespace: &str, topic: &str) -> Result<(), CliError> {
    let mut client = MessagingClient::new(channel.clone());
    let t0 = Instant::now();
    loop {
        let req = pb::PublishRequest {
            namespace: namespace.into(),
            topic: topic.into(),
            messages: vec![pb::Message { data: bytes::Bytes::from_static(b"open"), ..Default::default() }],
            ..Default::default()
        };
        match client.publish(req).await {
            Ok(_) => return Ok(()),
            Err(s) if t0.elapsed() > OPEN_WAIT_MAX => {
                return Err(err(format!("topic {topic}: no publish taken within {OPEN_WAIT_MAX:?}: {s}")))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(25)).await,
        }
    }
}

/// One publisher: one `PublishStream` on a shared connection, batches pipelined.
struct Publisher {
    channel: Channel,
    namespace: String,
    topic: String,
    message_bytes: usize,
    batch_messages: usize,
    /// Messages to publish; 0: until `stop_at`.
    messages: u64,
    stop_at: Option<Instant>,
    epoch: Instant,
}

impl Publisher {
    /// Publishes, then closes its stream and returns how many messages were confirmed.
    async fn run(self) -> Result<u64, CliError> {
        let mut client = MessagingClient::new(self.channel.clone())
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        let (tx, rx) = mpsc::channel::<pb::PublishRequest>(PUBLISHER_QUEUE_REQUESTS);
        let Publisher { namespace, topic, message_bytes, batch_messages, messages, stop_at, epoch, .. } = self;
        let feeder = tokio::spawn(async move {
            let mut sent = 0u64;
            loop {
                let batch = if messages > 0 {
                    (messages - sent).min(batch_messages as u64) as usize
                } else if stop_at.is_some_and(|s| Instant::now() < s) {
                    batch_messages
                } else {
                    0
                };
                if batch == 0 {
                    return;
                }
                // Room first, so that the stamp is the time the request goes out.
                let Ok(permit) = tx.reserve().await else { return };
                permit.send(pb::PublishRequest {
                    namespace: namespace.clone(),
                    topic: topic.clone(),
                    messages: stamped(batch, message_bytes, epoch),
                    ..Default::default()
                });
                sent += batch as u64;
            }
        });
        let mut answers =
            client.publish_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await.map_err(err)?.into_inner();
        let mut confirmed = 0u64;
        while let Some(r) = answers.message().await.map_err(err)? {
            confirmed += u64::from(r.count);
        }
        feeder.abort();
        Ok(confirmed)
    }
}

/// `count` messages of `bytes` each, sliced from one buffer, each starting with the
/// time since `epoch` in microseconds.
fn stamped(count: usize, bytes: usize, epoch: Instant) -> Vec<pb::Message> {
    let stamp = (epoch.elapsed().as_micros() as u64).to_le_bytes();
    let mut buf = bytes::BytesMut::zeroed(count * bytes);
    for m in buf.chunks_mut(bytes) {
        m[..STAMP_BYTES].copy_from_slice(&stamp);
    }
    let mut buf = buf.freeze();
    (0..count).map(|_| pb::Message { data: buf.split_to(bytes), ..Default::default() }).collect()
}

/// The send time a [`stamped`] message carries, in microseconds since the epoch.
fn stamp_of(data: &[u8]) -> Option<u64> {
    data.get(..STAMP_BYTES).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes)
}

/// What one subscriber saw.
#[derive(Default)]
struct Tally {
    delivered: u64,
    /// Publish-to-receipt times, in microseconds.
    latencies_us: Vec<u32>,
    error: Option<String>,
}

/// The phase's subscribers: subscriber `s` of group `g` of topic `t` subscribes over
/// connection `publishers + index` (modulo the connections), so that publishers and
/// subscribers share the connections evenly.
struct Subscribers {
    tasks: Vec<tokio::task::JoinHandle<Tally>>,
    /// Messages delivered so far, per group (topic-major).
    per_group: Arc<Vec<AtomicU64>>,
    stop: CancellationToken,
}

impl Subscribers {
    async fn start(
        channels: &[Channel],
        namespace: &str,
        phase: &str,
        shape: Shape,
        size: u32,
        epoch: Instant,
    ) -> Result<Subscribers, CliError> {
        let per_group: Arc<Vec<AtomicU64>> = Arc::new((0..shape.groups()).map(|_| AtomicU64::new(0)).collect());
        let stop = CancellationToken::new();
        let (ready_tx, mut ready_rx) = mpsc::channel::<Result<(), String>>(shape.subscribers().max(1));
        let mut tasks = Vec::new();
        let connecting = Arc::new(tokio::sync::Semaphore::new(SUBSCRIBES_AT_ONCE_MAX));
        for i in 0..shape.subscribers() {
            let group = i / shape.subscribers_per_group;
            let (t, g) = (group / shape.groups_per_topic, group % shape.groups_per_topic);
            let channel = channels[(shape.publishers + i) % channels.len()].clone();
            let req = pb::SubscribeRequest {
                namespace: namespace.to_string(),
                consumer_group: group_name(phase, t, g),
                size,
                auto_ack: true,
                ..Default::default()
            };
            let (per_group, stop, ready) = (per_group.clone(), stop.clone(), ready_tx.clone());
            let connecting = connecting.clone();
            tasks.push(tokio::spawn(async move {
                let mut tally = Tally::default();
                let mut client = MessagingClient::new(channel).max_decoding_message_size(usize::MAX);
                let pace = connecting.acquire_owned().await;
                let subscribed = client.subscribe(req).await;
                drop(pace);
                let mut stream = match subscribed {
                    Ok(s) => s.into_inner(),
                    Err(e) => {
                        let _ = ready.send(Err(format!("subscriber {i}: {e}"))).await;
                        tally.error = Some(e.to_string());
                        return tally;
                    }
                };
                let _ = ready.send(Ok(())).await;
                drop(ready);
                loop {
                    let next = tokio::select! {
                        next = stream.next() => next,
                        () = stop.cancelled() => break,
                    };
                    match next {
                        Some(Ok(m)) => {
                            let now = epoch.elapsed().as_micros() as u64;
                            if let Some(sent) = m.message.as_ref().and_then(|m| stamp_of(&m.data)) {
                                tally.latencies_us.push(now.saturating_sub(sent).min(u64::from(u32::MAX)) as u32);
                            }
                            tally.delivered += 1;
                            per_group[group].fetch_add(1, Ordering::Relaxed);
                        }
                        Some(Err(e)) => {
                            tally.error = Some(e.to_string());
                            break;
                        }
                        None => break,
                    }
                }
                tally
            }));
        }
        drop(ready_tx);
        // Every subscription answered before anything is published.
        while let Some(r) = ready_rx.recv().await {
            r.map_err(err)?;
        }
        Ok(Subscribers { tasks, per_group, stop })
    }

    /// Waits until every group got what its topic's publisher had confirmed, at most
    /// [`DRAIN_WAIT_MAX`]; returns how long after publishing ended that was (None:
    /// not within the bound).
    async fn drain(&self, shape: Shape, confirmed: &[u64]) -> Option<Duration> {
        let t0 = Instant::now();
        loop {
            let done = (0..shape.groups())
                .all(|g| self.per_group[g].load(Ordering::Relaxed) >= confirmed[g / shape.groups_per_topic]);
            if done {
                return Some(t0.elapsed());
            }
            if t0.elapsed() > DRAIN_WAIT_MAX {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the subscribers and reports what they got.
    async fn finish(self, shape: Shape, confirmed: &[u64], drained: Option<Duration>) -> serde_json::Value {
        // Anything still on its way (a duplicate would show) in the next moment.
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.stop.cancel();
        let mut tallies = Vec::with_capacity(self.tasks.len());
        for t in self.tasks {
            tallies.push(t.await.unwrap_or_default());
        }
        delivery_report(shape, confirmed, &tallies, drained)
    }
}

/// The per-subscriber and per-group delivery figures of a phase.
fn delivery_report(shape: Shape, confirmed: &[u64], tallies: &[Tally], drained: Option<Duration>) -> serde_json::Value {
    let delivered: Vec<u64> = tallies.iter().map(|t| t.delivered).collect();
    let per_group: Vec<u64> = delivered.chunks(shape.subscribers_per_group.max(1)).map(|c| c.iter().sum()).collect();
    let expected = |g: usize| confirmed[g / shape.groups_per_topic];
    let missing: u64 = per_group.iter().enumerate().map(|(g, d)| expected(g).saturating_sub(*d)).sum();
    let extra: u64 = per_group.iter().enumerate().map(|(g, d)| d.saturating_sub(expected(g))).sum();
    // The worst ratio between two subscribers of one group.
    let within_group = delivered.chunks(shape.subscribers_per_group.max(1)).map(ratio_max_min).fold(1.0_f64, f64::max);
    let mut latencies: Vec<u32> = tallies.iter().flat_map(|t| t.latencies_us.iter().copied()).collect();
    latencies.sort_unstable();
    let pct =
        |p: f64| latencies.get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1))).copied();
    let errors: Vec<&String> = tallies.iter().filter_map(|t| t.error.as_ref()).collect();
    serde_json::json!({
        "subscribers": tallies.len(),
        "delivered": delivered.iter().sum::<u64>(),
        "missing": missing,
        "delivered_more_than_confirmed": extra,
        "every_confirmed_message_delivered": missing == 0,
        "seconds_to_drain_after_publishing": drained.map(|d| d.as_secs_f64()),
        "delivered_per_subscriber": {
            "min": delivered.iter().min(), "max": delivered.iter().max(),
            "max_over_min": ratio_max_min(&delivered),
            "max_over_min_within_a_group": within_group,
        },
        "latency_us": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "max": latencies.last()},
        "errors": errors.len(),
        "first_error": errors.first(),
    })
}

/// Largest over smallest (infinite when one is 0 and another is not; 1 for none).
fn ratio_max_min(values: &[u64]) -> f64 {
    let (min, max) = (values.iter().min().copied().unwrap_or(0), values.iter().max().copied().unwrap_or(0));
    match (min, max) {
        (_, 0) => 1.0,
        (0, _) => f64::INFINITY,
        (min, max) => max as f64 / min as f64,
    }
}

fn min_max(values: &[u64]) -> serde_json::Value {
    serde_json::json!({"min": values.iter().min(), "max": values.iter().max(), "max_over_min": ratio_max_min(values)})
}

/// CPU time of each broker and of this process at one moment, in milliseconds.
struct Cpu {
    brokers_ms: Vec<u64>,
    client_ms: u64,
}

impl Cpu {
    fn now(procs: &[Proc]) -> Cpu {
        Cpu { brokers_ms: procs.iter().map(|p| cpu_ms(p.child.id())).collect(), client_ms: cpu_ms(std::process::id()) }
    }

    fn brokers_since(&self, before: &Cpu) -> u64 {
        self.brokers_ms.iter().zip(&before.brokers_ms).map(|(a, b)| a.saturating_sub(*b)).sum()
    }

    fn report(&self, before: &Cpu, messages: u64) -> serde_json::Value {
        let per_node: Vec<u64> = self.brokers_ms.iter().zip(&before.brokers_ms).map(|(a, b)| a - b).collect();
        let per_message = |ms: u64| ms as f64 * 1e3 / messages.max(1) as f64;
        serde_json::json!({
            "brokers_ms": per_node,
            "client_ms": self.client_ms.saturating_sub(before.client_ms),
            "brokers_us_per_message": per_message(self.brokers_since(before)),
            "us_per_message_per_node": per_node.iter().map(|ms| per_message(*ms)).collect::<Vec<_>>(),
        })
    }
}

/// Samples every broker's RSS while a phase runs and keeps the highest.
struct RssSampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<u64>>,
}

impl RssSampler {
    fn start(procs: &[Proc]) -> RssSampler {
        let pids: Vec<u32> = procs.iter().map(|p| p.child.id()).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let task = tokio::spawn(async move {
            let mut peak = vec![0u64; pids.len()];
            // Bounded by the phase: `finish` sets `stop`.
            loop {
                for (p, pid) in peak.iter_mut().zip(&pids) {
                    *p = (*p).max(rss_kib(*pid));
                }
                if stopping.load(Ordering::Relaxed) {
                    return peak;
                }
                tokio::time::sleep(RSS_SAMPLE_INTERVAL).await;
            }
        });
        RssSampler { stop, task }
    }

    async fn finish(self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribers_must_spread_evenly_over_the_groups() {
        let s = Shape::new(100, 1000, 1).expect("100 x 10");
        assert_eq!((s.groups(), s.subscribers_per_group, s.subscribers()), (100, 10, 1000));
        let fan_out = Shape::new(100, 1000, 10).expect("100 topics x 10 groups x 1");
        assert_eq!((fan_out.groups(), fan_out.subscribers_per_group), (1000, 1));
        for (p, s, g, flag) in [(0, 10, 1, "--publishers"), (3, 10, 1, "--subscribers"), (2, 0, 1, "--subscribers")]
            .into_iter()
            .chain([(2, 4, 0, "--groups-per-topic")])
        {
            let e = Shape::new(p, s, g).expect_err("refused").to_string();
            assert!(e.contains(flag), "{e}");
        }
    }

    #[test]
    fn a_stamp_comes_back_from_every_message_of_a_batch() {
        let epoch = Instant::now() - Duration::from_secs(2);
        let batch = stamped(5, 16, epoch);
        assert_eq!(batch.len(), 5);
        for m in &batch {
            assert_eq!(m.data.len(), 16);
            let us = stamp_of(&m.data).expect("stamped");
            assert!((2_000_000..60_000_000).contains(&us), "{us}");
        }
        assert_eq!(stamp_of(b"short"), None);
    }

    #[test]
    fn the_report_finds_a_starved_subscriber_and_what_is_missing() {
        let shape = Shape::new(2, 4, 1).expect("2 x 2");
        let tally = |delivered| Tally { delivered, latencies_us: vec![10; delivered as usize], error: None };
        // Topic 0: 6 confirmed, its subscribers got 5 + 1; topic 1: 4 confirmed, 2 + 1.
        let r = delivery_report(shape, &[6, 4], &[tally(5), tally(1), tally(2), tally(1)], None);
        assert_eq!(r["missing"], 1);
        assert_eq!(r["every_confirmed_message_delivered"], false);
        assert_eq!(r["delivered_per_subscriber"]["max_over_min"], 5.0);
        assert_eq!(r["delivered_per_subscriber"]["max_over_min_within_a_group"], 5.0);
        assert_eq!(r["latency_us"]["p50"], 10);
        assert_eq!(ratio_max_min(&[0, 3]), f64::INFINITY);
        assert_eq!(ratio_max_min(&[0, 0]), 1.0);
    }
}
