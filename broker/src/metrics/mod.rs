//! The node's Prometheus metrics: one registry, owned by the node, that the data path
//! reports events to, and the encoding of a scrape.
//!
//! Two kinds of figures, kept apart so that the data path pays only for what it must:
//!
//! - **Events** (publishes, fsyncs, deliveries, gRPC calls) are counted where they
//!   happen, through the typed methods of [`Metrics`]: atomic adds on counters and
//!   [`AtomicHistogram`]s. A publish or a gRPC call finds its series in a map under a
//!   read lock (never held across an await); a group's task looks its counters up once.
//! - **Levels** (consumer lag, Raft term, disk space, replicas behind) are read when
//!   Prometheus scrapes ([`levels`]; `api/metrics.rs` gathers them).
//!
//! Label values that come from users or clients (namespaces and topics, groups, gRPC
//! method paths) are bounded by [`labels::LabelFolder`] (`--metrics-label-values-max`):
//! the first that many distinct values of each kind get series of their own, later
//! ones are folded into [`FOLDED`], so that a cluster with a million topics cannot make
//! a million series.
//!
//! This module is a leaf: the data path reports to it, it reads nothing back.

pub mod histogram;
pub mod labels;
pub mod levels;

/// The `tracing` target of the spans of a publish's path (`publish` where it is
/// handled; `append`, `queue`, `write`, `fsync`, `replicate` on the segment's primary),
/// all at TRACE level: exported over OTLP with `--otlp-endpoint`, otherwise disabled
/// (a disabled span costs a comparison of levels).
pub const PUBLISH_TRACE_TARGET: &str = "eventtermq_publish_trace";

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, PoisonError, RwLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

pub use histogram::AtomicHistogram;
pub use labels::{LabelFolder, LabelKind, FOLDED};
pub use levels::{fold_samples, Kind, Labels, Levels, Snapshot};

/// Default of `--metrics-label-values-max`: distinct namespace/topic pairs (and
/// namespace/group pairs, and gRPC methods) with series of their own. A topic has
/// about a dozen series (publish counters by persistence, lag per bound group), so
/// this keeps a node's scrape in the tens of thousands of series at most.
pub const LABEL_VALUES_MAX_DEFAULT: usize = 500;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PublishLabels {
    namespace: String,
    topic: String,
    persistence: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PersistenceLabels {
    persistence: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    /// The stable numeric error code (`api/src/error.rs`) and its name.
    code: u32,
    error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupLabels {
    namespace: String,
    group: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GrpcLabels {
    /// `/package.Service/Method`.
    method: String,
    /// The gRPC status code's number (`0` OK), or `transport`.
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    /// `closed` (no credential configured here), `missing` or `wrong` (the caller's).
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: String,
}

/// The persistence a publisher asked for, as a label value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Persistence {
    Default,
    None,
    Primary,
    Replicated,
    /// A value this broker does not know (refused).
    Invalid,
}

const PERSISTENCES: usize = 5;

impl Persistence {
    fn index(self) -> usize {
        self as usize
    }

    fn as_str(self) -> &'static str {
        match self {
            Persistence::Default => "default",
            Persistence::None => "none",
            Persistence::Primary => "primary",
            Persistence::Replicated => "replicated",
            Persistence::Invalid => "invalid",
        }
    }
}

/// gRPC status codes 0-16, then one slot for a transport failure (no status).
const GRPC_CODES: [&str; 18] =
    ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16", "transport"];

fn grpc_code_index(code: Option<&str>) -> usize {
    let last = GRPC_CODES.len() - 1;
    code.map_or(last, |c| GRPC_CODES[..last].iter().position(|k| *k == c).unwrap_or(last))
}

type HistogramFamily<L> = Family<L, AtomicHistogram, fn() -> AtomicHistogram>;

/// 100 us .. 13 s: a confirmation waits for fsyncs on up to three disks and a network
/// hop or two; a write behind a full queue waits longer.
fn latency_buckets() -> AtomicHistogram {
    AtomicHistogram::exponential(0.000_1, 2.0, 18)
}

/// What the primary of an open segment has written and what each member of its replica
/// set has fsynced, for the replication gauges. The primary task stores; a scrape loads.
#[derive(Debug)]
pub struct SegmentProgress {
    pub written: std::sync::atomic::AtomicU64,
    pub confirmed: std::sync::atomic::AtomicU64,
    /// Per member of the replica set (the primary included).
    pub durable: Vec<(u64, std::sync::atomic::AtomicU64)>,
}

impl SegmentProgress {
    pub fn new(replicas: &[u64]) -> Self {
        use std::sync::atomic::AtomicU64;
        Self {
            written: AtomicU64::new(0),
            confirmed: AtomicU64::new(0),
            durable: replicas.iter().map(|n| (*n, AtomicU64::new(0))).collect(),
        }
    }

    /// Records the core's view: `durable(node)` for each member.
    pub fn store(&self, written: u64, confirmed: u64, durable: impl Fn(u64) -> u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.written.store(written, Relaxed);
        self.confirmed.store(confirmed, Relaxed);
        for (node, d) in &self.durable {
            d.store(durable(*node), Relaxed);
        }
    }
}

/// The counters of one consumer group, looked up once when its task starts.
#[derive(Clone, Debug, Default)]
pub struct GroupCounters {
    pub deliveries: Counter,
    pub acks: Counter,
    pub nacks: Counter,
    pub redeliveries: Counter,
    /// Messages past the delivery limit published to the dead-letter topic, and dropped.
    pub dead_lettered: Counter,
    pub dropped: Counter,
}

/// The publish series of one namespace/topic (or of the folded ones), by persistence,
/// created on first use so that only what happened has series.
#[derive(Debug)]
struct TopicSeries {
    namespace: String,
    topic: String,
    by_persistence: [OnceLock<PublishSeries>; PERSISTENCES],
}

#[derive(Debug)]
struct PublishSeries {
    requests: Counter,
    messages: Counter,
    bytes: Counter,
}

/// The series of one gRPC method (or of the folded ones).
#[derive(Debug)]
struct MethodSeries {
    method: String,
    by_code: [OnceLock<Counter>; GRPC_CODES.len()],
    seconds: AtomicHistogram,
}

/// One publish request being handled: [`PublishCount::answered`] counts it.
#[derive(Debug)]
pub struct PublishCount {
    inner: Arc<Inner>,
    topic: Arc<TopicSeries>,
    persistence: Persistence,
    started: std::time::Instant,
}

impl PublishCount {
    /// The request was answered: with its messages and their bytes, or with the
    /// error's code and name.
    pub fn answered(self, result: Result<(u64, u64), (u32, &str)>) {
        let (i, p) = (&self.inner, self.persistence);
        let s = self.topic.by_persistence[p.index()].get_or_init(|| i.f.publish_series(&self.topic, p));
        s.requests.inc();
        match result {
            Ok((messages, bytes)) => {
                s.messages.inc_by(messages);
                s.bytes.inc_by(bytes);
                let labels = PersistenceLabels { persistence: p.as_str() };
                let h = i.confirm[p.index()].get_or_init(|| i.f.publish_confirm.get_or_create(&labels).clone());
                h.observe(self.started.elapsed().as_secs_f64());
            }
            Err((code, name)) => {
                i.f.publish_rejected.get_or_create(&ErrorLabels { code, error: name.to_string() }).inc();
            }
        }
    }
}

/// One gRPC request being handled: [`GrpcCount::answered`] counts it.
#[derive(Debug)]
pub struct GrpcCount {
    inner: Arc<Inner>,
    series: Arc<MethodSeries>,
    started: std::time::Instant,
}

impl GrpcCount {
    /// Answered with `code` (the `grpc-status`; `None`: a transport failure).
    pub fn answered(self, code: Option<&str>) {
        let (i, m) = (&self.inner, &self.series);
        let code = grpc_code_index(code);
        let labels = || GrpcLabels { method: m.method.clone(), code: GRPC_CODES[code] };
        m.by_code[code].get_or_init(|| i.f.grpc_requests.get_or_create(&labels()).clone()).inc();
        m.seconds.observe(self.started.elapsed().as_secs_f64());
    }
}

/// The event metrics of a node. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Metrics {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    labels: LabelFolder,
    f: Families,
    /// Series of the topics admitted by `labels`, by namespace and topic: a publish
    /// finds its own under a read lock without allocating.
    topics: RwLock<HashMap<String, HashMap<String, Arc<TopicSeries>>>>,
    other_topics: OnceLock<Arc<TopicSeries>>,
    methods: RwLock<HashMap<String, Arc<MethodSeries>>>,
    other_methods: OnceLock<Arc<MethodSeries>>,
    confirm: [OnceLock<AtomicHistogram>; PERSISTENCES],
}

/// Every family of event metrics, as registered.
#[derive(Debug)]
struct Families {
    publish_requests: Family<PublishLabels, Counter>,
    publish_messages: Family<PublishLabels, Counter>,
    publish_bytes: Family<PublishLabels, Counter>,
    publish_rejected: Family<ErrorLabels, Counter>,
    publish_confirm: HistogramFamily<PersistenceLabels>,
    append_seconds: AtomicHistogram,
    fsync_seconds: AtomicHistogram,
    fsync_records: AtomicHistogram,
    written_bytes: Counter,
    failovers: Counter,
    group_deliveries: Family<GroupLabels, Counter>,
    group_acks: Family<GroupLabels, Counter>,
    group_nacks: Family<GroupLabels, Counter>,
    group_redeliveries: Family<GroupLabels, Counter>,
    group_dead_lettered: Family<GroupLabels, Counter>,
    group_dropped: Family<GroupLabels, Counter>,
    grpc_requests: Family<GrpcLabels, Counter>,
    grpc_seconds: HistogramFamily<MethodLabels>,
    cluster_write_seconds: AtomicHistogram,
    cluster_writes_failed: Counter,
    internal_refused: Family<RefusalLabels, Counter>,
    tls_handshakes_failed: Counter,
    auth_failures: Family<RefusalLabels, Counter>,
}

impl Families {
    fn new() -> Self {
        Self {
            publish_requests: Family::default(),
            publish_messages: Family::default(),
            publish_bytes: Family::default(),
            publish_rejected: Family::default(),
            publish_confirm: HistogramFamily::new_with_constructor(latency_buckets),
            // 10 us .. 0.3 s: one positional write of a batch of at most 1 MiB.
            append_seconds: AtomicHistogram::exponential(0.000_01, 2.0, 16),
            // 50 us .. 1.6 s: an fdatasync on anything from NVMe to a network volume.
            fsync_seconds: AtomicHistogram::exponential(0.000_05, 2.0, 16),
            // 1 .. 32768 records in one fsync: how well group commit batches.
            fsync_records: AtomicHistogram::exponential(1.0, 2.0, 16),
            written_bytes: Counter::default(),
            failovers: Counter::default(),
            group_deliveries: Family::default(),
            group_acks: Family::default(),
            group_nacks: Family::default(),
            group_redeliveries: Family::default(),
            group_dead_lettered: Family::default(),
            group_dropped: Family::default(),
            grpc_requests: Family::default(),
            grpc_seconds: HistogramFamily::new_with_constructor(latency_buckets),
            cluster_write_seconds: latency_buckets(),
            cluster_writes_failed: Counter::default(),
            internal_refused: Family::default(),
            tls_handshakes_failed: Counter::default(),
            auth_failures: Family::default(),
        }
    }

    fn register_security(&self, r: &mut Registry) {
        r.register(
            "internal_calls_refused",
            "Node-to-node calls (or requests marked as forwarded by a node) refused for want of the cluster \
             credential, by reason: missing, wrong, or closed (this node has none configured)",
            self.internal_refused.clone(),
        );
        r.register(
            "tls_handshakes_failed",
            "Connections to a TLS listener (gRPC or AMQP) that did not complete a handshake: plaintext, an unknown \
             CA, no client certificate where one is required, or no handshake in time",
            self.tls_handshakes_failed.clone(),
        );
        r.register(
            "auth_failures",
            "Client requests and AMQP logins refused by authentication or authorization, by reason: missing \
             (no credentials while users exist), malformed, unknown_user, wrong_password, guest_not_loopback, \
             permission_denied, and for client certificates certificate_expired, certificate_unknown_user \
             (names no user of the cluster), certificate_no_user (has no name to read), certificate_user_mismatch \
             (another user's than the password's)",
            self.auth_failures.clone(),
        );
    }

    fn register_data_path(&self, r: &mut Registry) {
        r.register(
            "publish_requests",
            "Publish requests this node handled for clients (a stream's requests each), by topic and the persistence asked",
            self.publish_requests.clone(),
        );
        r.register("publish_messages", "Messages confirmed to publishers by this node", self.publish_messages.clone());
        r.register(
            "publish_bytes",
            "Bytes of message data (payloads) confirmed to publishers by this node",
            self.publish_bytes.clone(),
        );
        r.register(
            "publish_rejected",
            "Publish requests answered with an error, by error code (5002 and 9001: outcome unknown)",
            self.publish_rejected.clone(),
        );
        r.register(
            "publish_confirm_seconds",
            "Time from a publish request's arrival to its answer on the node that handled it",
            self.publish_confirm.clone(),
        );
        r.register(
            "storage_append_seconds",
            "Time of one write of a batch of records to an open segment on its primary",
            self.append_seconds.clone(),
        );
        r.register(
            "storage_fsync_seconds",
            "Time of one fdatasync of segment records (primaries and replicas)",
            self.fsync_seconds.clone(),
        );
        r.register(
            "storage_fsync_records",
            "Records made durable by one fsync of a primary (group commit)",
            self.fsync_records.clone(),
        );
        r.register(
            "storage_written_bytes",
            "Bytes of message data (payloads) written to segments as a primary",
            self.written_bytes.clone(),
        );
        r.register(
            "replication_failovers",
            "Segments this node failed over (closed at the longest replica's length after their primary was gone or stopped)",
            self.failovers.clone(),
        );
    }

    fn register_groups_and_grpc(&self, r: &mut Registry) {
        r.register("consumer_group_deliveries", "Messages handed to subscribers", self.group_deliveries.clone());
        r.register("consumer_group_acks", "Messages acknowledged", self.group_acks.clone());
        r.register("consumer_group_nacks", "Messages returned by a nack", self.group_nacks.clone());
        r.register(
            "consumer_group_redeliveries",
            "Messages returned for redelivery (nacked, or held by a subscriber that left)",
            self.group_redeliveries.clone(),
        );
        r.register(
            "consumer_group_dead_lettered",
            "Messages delivered deliveries_max times, expired (message_ttl_ms or the message's expiration) or beyond ready_messages_max or ready_bytes_max, published to the group's dead-letter topic",
            self.group_dead_lettered.clone(),
        );
        r.register(
            "consumer_group_dropped",
            "Messages delivered deliveries_max times, expired (message_ttl_ms or the message's expiration) or beyond ready_messages_max or ready_bytes_max, and dropped (the group has no dead-letter topic)",
            self.group_dropped.clone(),
        );
        r.register("grpc_requests", "gRPC requests served, by method and status code", self.grpc_requests.clone());
        r.register(
            "grpc_request_duration_seconds",
            "Time from a gRPC request's arrival to its response headers (for streams: until the stream is set up)",
            self.grpc_seconds.clone(),
        );
        r.register(
            "cluster_write_seconds",
            "Time of one write to the cluster state from this node (a Raft proposal, forwarded to the leader when \
             this node is not it, retried across leader changes) until committed and applied, or refused",
            self.cluster_write_seconds.clone(),
        );
        r.register(
            "cluster_writes_failed",
            "Writes to the cluster state from this node that ended in an error (refused, no leader in time)",
            self.cluster_writes_failed.clone(),
        );
    }

    fn topic_series(&self, namespace: String, topic: String) -> TopicSeries {
        TopicSeries { namespace, topic, by_persistence: Default::default() }
    }

    fn publish_series(&self, t: &TopicSeries, p: Persistence) -> PublishSeries {
        let labels = PublishLabels { namespace: t.namespace.clone(), topic: t.topic.clone(), persistence: p.as_str() };
        PublishSeries {
            requests: self.publish_requests.get_or_create(&labels).clone(),
            messages: self.publish_messages.get_or_create(&labels).clone(),
            bytes: self.publish_bytes.get_or_create(&labels).clone(),
        }
    }

    fn method_series(&self, method: String) -> MethodSeries {
        let seconds = self.grpc_seconds.get_or_create(&MethodLabels { method: method.clone() }).clone();
        MethodSeries { method, by_code: Default::default(), seconds }
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

impl Metrics {
    /// `label_values_max`: see [`LabelFolder`] (`--metrics-label-values-max`).
    pub fn new(label_values_max: usize) -> Self {
        Self::with_tls_counter(label_values_max, Counter::default())
    }

    /// As [`Metrics::new`], with the counter of failed TLS handshakes that the
    /// listeners (bound before the node, and so before its metrics) count in.
    pub fn with_tls_counter(label_values_max: usize, tls_handshakes_failed: Counter) -> Self {
        let mut registry = Registry::with_prefix("eventtermq");
        let f = Families { tls_handshakes_failed, ..Families::new() };
        f.register_data_path(&mut registry);
        f.register_groups_and_grpc(&mut registry);
        f.register_security(&mut registry);
        let inner = Inner {
            registry,
            labels: LabelFolder::new(label_values_max),
            f,
            topics: RwLock::default(),
            other_topics: OnceLock::new(),
            methods: RwLock::default(),
            other_methods: OnceLock::new(),
            confirm: Default::default(),
        };
        Self { inner: Arc::new(inner) }
    }

    pub fn labels(&self) -> &LabelFolder {
        &self.inner.labels
    }

    /// Starts counting one publish request to `namespace`/`topic` (its series found
    /// before the request is handled, so that nothing is copied for after).
    pub fn publish_started(&self, namespace: &str, topic: &str, persistence: Persistence) -> PublishCount {
        // The read guard ends with the statement, before a miss takes the write lock.
        let hit = read(&self.inner.topics).get(namespace).and_then(|m| m.get(topic)).cloned();
        let topic = hit.unwrap_or_else(|| self.topic_series(namespace, topic));
        PublishCount { inner: self.inner.clone(), topic, persistence, started: std::time::Instant::now() }
    }

    /// The series of a topic not seen before: admitted (and kept for the next publish)
    /// or folded.
    fn topic_series(&self, namespace: &str, topic: &str) -> Arc<TopicSeries> {
        let i = &self.inner;
        let (ns, t) = i.labels.fold(LabelKind::Topic, namespace, topic);
        if ns == FOLDED {
            let other = || Arc::new(i.f.topic_series(ns.clone(), t.clone()));
            return i.other_topics.get_or_init(other).clone();
        }
        let mut topics = write(&i.topics);
        let by_topic = topics.entry(namespace.to_string()).or_default();
        by_topic.entry(topic.to_string()).or_insert_with(|| Arc::new(i.f.topic_series(ns, t))).clone()
    }

    /// One write of `bytes` to a segment as its primary.
    pub fn appended(&self, bytes: u64, seconds: f64) {
        self.inner.f.append_seconds.observe(seconds);
        self.inner.f.written_bytes.inc_by(bytes);
    }

    /// One fsync of segment records; `records`: how many it made durable (primaries).
    pub fn fsynced(&self, records: Option<u64>, seconds: f64) {
        self.inner.f.fsync_seconds.observe(seconds);
        if let Some(n) = records.filter(|n| *n > 0) {
            self.inner.f.fsync_records.observe(n as f64);
        }
    }

    /// One write to the cluster state answered (`ok` or not) after `seconds`.
    pub fn cluster_written(&self, ok: bool, seconds: f64) {
        self.inner.f.cluster_write_seconds.observe(seconds);
        if !ok {
            self.inner.f.cluster_writes_failed.inc();
        }
    }

    pub fn failed_over(&self) {
        self.inner.f.failovers.inc();
    }

    /// The counters of a group, for its task to keep.
    pub fn group_counters(&self, namespace: &str, group: &str) -> GroupCounters {
        let f = &self.inner.f;
        let (namespace, group) = self.inner.labels.fold(LabelKind::Group, namespace, group);
        let labels = GroupLabels { namespace, group };
        GroupCounters {
            deliveries: f.group_deliveries.get_or_create(&labels).clone(),
            acks: f.group_acks.get_or_create(&labels).clone(),
            nacks: f.group_nacks.get_or_create(&labels).clone(),
            redeliveries: f.group_redeliveries.get_or_create(&labels).clone(),
            dead_lettered: f.group_dead_lettered.get_or_create(&labels).clone(),
            dropped: f.group_dropped.get_or_create(&labels).clone(),
        }
    }

    /// A node-to-node call refused (see `security::Refusal::as_str`).
    pub fn internal_refused(&self, reason: &'static str) {
        self.inner.f.internal_refused.get_or_create(&RefusalLabels { reason }).inc();
    }

    /// A client request or AMQP login refused by authentication or authorization.
    pub fn auth_failed(&self, reason: &'static str) {
        self.inner.f.auth_failures.get_or_create(&RefusalLabels { reason }).inc();
    }

    /// Starts counting one gRPC request to `method` (a path such as
    /// `/eventter.v1.Admin/Dump`): its series found now, so nothing is copied for later.
    pub fn grpc_started(&self, method: &str) -> GrpcCount {
        // The read guard ends with the statement, before a miss takes the write lock.
        let hit = read(&self.inner.methods).get(method).cloned();
        let series = hit.unwrap_or_else(|| self.method_series(method));
        GrpcCount { inner: self.inner.clone(), series, started: std::time::Instant::now() }
    }

    fn method_series(&self, method: &str) -> Arc<MethodSeries> {
        let i = &self.inner;
        let (folded, _) = i.labels.fold(LabelKind::Method, method, "");
        if folded == FOLDED {
            return i.other_methods.get_or_init(|| Arc::new(i.f.method_series(folded.clone()))).clone();
        }
        let mut methods = write(&i.methods);
        methods.entry(method.to_string()).or_insert_with(|| Arc::new(i.f.method_series(folded))).clone()
    }

    /// The event metrics followed by `snapshot`, in the Prometheus text format (0.0.4)
    /// or, with `openmetrics`, in OpenMetrics 1.0 (which ends in `# EOF`).
    pub fn encode(&self, snapshot: &Snapshot, openmetrics: bool) -> String {
        let levels = snapshot.registry();
        let mut out = String::new();
        // Writing to a String cannot fail; a metric that fails to encode is a bug that
        // shows as a truncated scrape, not a crash.
        if openmetrics {
            let _ = prometheus_client::encoding::text::encode_registry(&mut out, &self.inner.registry);
            let _ = prometheus_client::encoding::text::encode_registry(&mut out, &levels);
            let _ = prometheus_client::encoding::text::encode_eof(&mut out);
        } else {
            let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.inner.registry);
            let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &levels);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folded_samples_add_up_or_keep_the_largest() {
        let l = |t: &str| vec![("topic", t.to_string())];
        let fold = |labels: Labels| if labels[0].1 == "a" { labels } else { vec![("topic", FOLDED.to_string())] };
        let samples = vec![(l("a"), 1.0), (l("b"), 2.0), (l("c"), 5.0)];
        assert_eq!(fold_samples(samples.clone(), false, fold), vec![(l("a"), 1.0), (l(FOLDED), 7.0)]);
        assert_eq!(fold_samples(samples, true, fold), vec![(l("a"), 1.0), (l(FOLDED), 5.0)]);
    }

    #[test]
    fn both_formats_encode_events_and_levels() {
        let m = Metrics::new(10);
        m.publish_started("default", "t", Persistence::Default).answered(Ok((3, 30)));
        m.publish_started("default", "t", Persistence::Default).answered(Err((5004, "NotEnoughReplicas")));
        let mut s = Snapshot::default();
        s.gauge("consumer_group_lag_records", "lag", vec![(vec![("group", "g".into())], 1000.0)]);
        s.unprefixed("process_open_fds", "fds", Kind::Gauge, 12.0);
        let text = m.encode(&s, false);
        let published =
            "eventtermq_publish_messages_total{namespace=\"default\",topic=\"t\",persistence=\"default\"} 3";
        assert!(text.contains(published), "{text}");
        let requests = "eventtermq_publish_requests_total{namespace=\"default\",topic=\"t\",persistence=\"default\"} 2";
        assert!(text.contains(requests), "{text}");
        let rejected = "eventtermq_publish_rejected_total{code=\"5004\",error=\"NotEnoughReplicas\"} 1";
        assert!(text.contains(rejected), "{text}");
        assert!(text.contains("eventtermq_publish_confirm_seconds_count{persistence=\"default\"} 1"), "{text}");
        assert!(text.contains("eventtermq_consumer_group_lag_records{group=\"g\"} 1000"), "{text}");
        assert!(text.contains("\nprocess_open_fds 12"), "{text}");
        assert!(!text.contains("# EOF"));
        let om = m.encode(&s, true);
        assert!(om.ends_with("# EOF\n"), "{om}");
        assert_eq!(om.matches("# EOF").count(), 1);
    }

    #[test]
    fn topics_and_methods_beyond_the_bound_share_one_series() {
        let m = Metrics::new(2);
        for (topic, n) in [("a", 1), ("b", 2), ("c", 4), ("d", 8), ("a", 16)] {
            m.publish_started("ns", topic, Persistence::Primary).answered(Ok((n, n)));
        }
        for method in ["/x.S/A", "/x.S/B", "/x.S/C", "/x.S/D"] {
            m.grpc_started(method).answered(Some("0"));
        }
        m.grpc_started("/x.S/A").answered(Some("14"));
        m.grpc_started("/x.S/A").answered(None);
        let text = m.encode(&Snapshot::default(), false);
        let messages = |ns: &str, t: &str| {
            let series = format!(
                "eventtermq_publish_messages_total{{namespace=\"{ns}\",topic=\"{t}\",persistence=\"primary\"}} "
            );
            text.lines().find_map(|l| l.strip_prefix(&series)).map(|v| v.parse::<u64>().unwrap())
        };
        assert_eq!(messages("ns", "a"), Some(17));
        assert_eq!(messages("ns", "b"), Some(2));
        assert_eq!(messages(FOLDED, FOLDED), Some(12));
        assert_eq!(messages("ns", "c"), None);
        assert_eq!(text.matches("eventtermq_publish_messages_total{").count(), 3, "{text}");
        assert!(text.contains("eventtermq_grpc_requests_total{method=\"_other\",code=\"0\"} 2"), "{text}");
        assert!(text.contains("eventtermq_grpc_requests_total{method=\"/x.S/A\",code=\"14\"} 1"), "{text}");
        assert!(text.contains("eventtermq_grpc_requests_total{method=\"/x.S/A\",code=\"transport\"} 1"), "{text}");
        assert!(text.contains("eventtermq_grpc_request_duration_seconds_count{method=\"/x.S/A\"} 3"), "{text}");
    }

    #[test]
    fn group_counters_are_shared_by_a_group_restarted_here() {
        let m = Metrics::new(10);
        m.group_counters("ns", "g").acks.inc_by(3);
        m.group_counters("ns", "g").acks.inc_by(4);
        let text = m.encode(&Snapshot::default(), false);
        assert!(text.contains("eventtermq_consumer_group_acks_total{namespace=\"ns\",group=\"g\"} 7"), "{text}");
    }
}
