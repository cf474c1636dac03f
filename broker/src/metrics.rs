//! The node's Prometheus metrics: what the data path counts as it goes, and how the
//! figures read from the node's state at each scrape are encoded.
//!
//! Two kinds of figures, kept apart so that the data path pays only for what it must:
//!
//! - **Events** (publishes, fsyncs, deliveries, gRPC calls) are counted where they
//!   happen, in counters and histograms held here: an atomic add, or a histogram's
//!   short lock, per request or per batch, never per scrape.
//! - **Levels** (consumer lag, Raft term, disk space, replicas behind) are read when
//!   Prometheus scrapes: `api/metrics.rs` gathers them into a [`Snapshot`] of plain
//!   numbers, encoded after the events by [`Metrics::encode`]. Nothing on the data
//!   path keeps them up to date, and a segment or group that is gone leaves no series
//!   behind.
//!
//! Label values that come from users (namespaces, topics, groups) are bounded by
//! [`Metrics::new`]'s `label_values_max` (`--metrics-label-values-max`): the first
//! that many distinct values of each kind are kept, later ones are folded into
//! [`FOLDED`], so that a cluster with a million topics cannot make a million series.
//!
//! This module is a leaf: the data path reports to it, it reads nothing back.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// The label value every value beyond the limit is folded into.
pub const FOLDED: &str = "_other";

/// Default of `--metrics-label-values-max`: distinct namespace/topic pairs (and
/// namespace/group pairs, and gRPC methods) with series of their own. A topic has
/// about a dozen series (publish counters by persistence, lag per bound group), so
/// this keeps a node's scrape in the tens of thousands of series at most.
pub const LABEL_VALUES_MAX_DEFAULT: usize = 500;

/// Prometheus counts in float64: ids above 2^53 do not survive as values, so node ids
/// travel as labels.
type Labels = Vec<(&'static str, String)>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicLabels {
    pub namespace: String,
    pub topic: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PublishLabels {
    pub namespace: String,
    pub topic: String,
    /// `default`, `none`, `primary` or `replicated`: as the publisher asked.
    pub persistence: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PersistenceLabels {
    pub persistence: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// The stable numeric error code (`api/src/error.rs`) and its name.
    pub code: String,
    pub error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabels {
    pub namespace: String,
    pub group: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GrpcLabels {
    /// `/package.Service/Method`.
    pub method: String,
    /// The gRPC status code's number as text (`0` OK).
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    pub method: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// 100 us .. 13 s: a confirmation waits for fsyncs on up to three disks and a network
/// hop or two; a write behind a full queue waits longer.
fn confirm_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.000_1, 2.0, 18))
}

/// 10 us .. 0.3 s: one positional write of a batch of at most 1 MiB.
fn append_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.000_01, 2.0, 16))
}

/// 50 us .. 1.6 s: an fdatasync on anything from NVMe to a network volume.
fn fsync_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

/// 1 .. 32768 records in one fsync: how well group commit batches.
fn records_buckets() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 16))
}

/// The kinds of label values bounded separately.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LabelKind {
    /// A namespace/topic pair.
    Topic,
    /// A namespace/consumer group pair.
    Group,
    /// A gRPC method path (clients may send any path).
    Method,
}

/// Admits the first `max` distinct values of each [`LabelKind`]; later ones are folded.
#[derive(Debug)]
pub struct LabelFolder {
    max: usize,
    seen: Mutex<BTreeMap<LabelKindKey, HashSet<(String, String)>>>,
}

type LabelKindKey = u8;

fn kind_key(kind: LabelKind) -> LabelKindKey {
    match kind {
        LabelKind::Topic => 0,
        LabelKind::Group => 1,
        LabelKind::Method => 2,
    }
}

impl LabelFolder {
    pub fn new(max: usize) -> Self {
        Self { max, seen: Mutex::default() }
    }

    /// `(a, b)` as it appears in labels: itself while it is one of the first `max`
    /// distinct pairs of its kind, `(FOLDED, FOLDED)` beyond.
    pub fn fold(&self, kind: LabelKind, a: &str, b: &str) -> (String, String) {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let set = seen.entry(kind_key(kind)).or_default();
        let key = (a.to_string(), b.to_string());
        if set.contains(&key) {
            return key;
        }
        if set.len() < self.max {
            set.insert(key.clone());
            return key;
        }
        (FOLDED.to_string(), FOLDED.to_string())
    }
}

/// What the primary of an open segment has written and what each member of its replica
/// set has fsynced, for the replication gauges. The primary task stores; a scrape loads.
#[derive(Debug)]
pub struct SegmentProgress {
    pub written: AtomicU64,
    pub confirmed: AtomicU64,
    /// Per member of the replica set (the primary included).
    pub durable: Vec<(u64, AtomicU64)>,
}

impl SegmentProgress {
    pub fn new(replicas: &[u64]) -> Self {
        Self {
            written: AtomicU64::new(0),
            confirmed: AtomicU64::new(0),
            durable: replicas.iter().map(|n| (*n, AtomicU64::new(0))).collect(),
        }
    }

    /// Records the core's view: `durable(node)` for each member.
    pub fn store(&self, written: u64, confirmed: u64, durable: impl Fn(u64) -> u64) {
        self.written.store(written, Ordering::Relaxed);
        self.confirmed.store(confirmed, Ordering::Relaxed);
        for (node, d) in &self.durable {
            d.store(durable(*node), Ordering::Relaxed);
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
    publish_requests: Family<PublishLabels, Counter>,
    publish_messages: Family<PublishLabels, Counter>,
    publish_bytes: Family<PublishLabels, Counter>,
    publish_rejected: Family<ErrorLabels, Counter>,
    publish_confirm: HistogramFamily<PersistenceLabels>,
    append_seconds: Histogram,
    fsync_seconds: Histogram,
    fsync_records: Histogram,
    written_bytes: Counter,
    failovers: Counter,
    group_deliveries: Family<GroupLabels, Counter>,
    group_acks: Family<GroupLabels, Counter>,
    group_nacks: Family<GroupLabels, Counter>,
    group_redeliveries: Family<GroupLabels, Counter>,
    grpc_requests: Family<GrpcLabels, Counter>,
    grpc_seconds: HistogramFamily<MethodLabels>,
}

impl Metrics {
    /// `label_values_max`: see [`LabelFolder`] (`--metrics-label-values-max`).
    pub fn new(label_values_max: usize) -> Self {
        let mut registry = Registry::with_prefix("eventtermq");
        let publish_requests = Family::<PublishLabels, Counter>::default();
        let publish_messages = Family::<PublishLabels, Counter>::default();
        let publish_bytes = Family::<PublishLabels, Counter>::default();
        let publish_rejected = Family::<ErrorLabels, Counter>::default();
        let publish_confirm = HistogramFamily::<PersistenceLabels>::new_with_constructor(confirm_buckets);
        let (append_seconds, fsync_seconds, fsync_records) = (append_buckets(), fsync_buckets(), records_buckets());
        let (written_bytes, failovers) = (Counter::default(), Counter::default());
        let group_deliveries = Family::<GroupLabels, Counter>::default();
        let group_acks = Family::<GroupLabels, Counter>::default();
        let group_nacks = Family::<GroupLabels, Counter>::default();
        let group_redeliveries = Family::<GroupLabels, Counter>::default();
        let grpc_requests = Family::<GrpcLabels, Counter>::default();
        let grpc_seconds = HistogramFamily::<MethodLabels>::new_with_constructor(confirm_buckets);
        let r = &mut registry;
        r.register(
            "publish_requests",
            "Publish requests this node handled for clients (a stream's requests each), by topic and the persistence asked",
            publish_requests.clone(),
        );
        r.register("publish_messages", "Messages confirmed to publishers by this node", publish_messages.clone());
        r.register(
            "publish_bytes",
            "Bytes of message data (payloads) confirmed to publishers by this node",
            publish_bytes.clone(),
        );
        r.register(
            "publish_rejected",
            "Publish requests answered with an error, by error code (5002 and 9001: outcome unknown)",
            publish_rejected.clone(),
        );
        r.register(
            "publish_confirm_seconds",
            "Time from a publish request's arrival to its answer on the node that handled it",
            publish_confirm.clone(),
        );
        r.register(
            "storage_append_seconds",
            "Time of one write of a batch of records to an open segment on its primary",
            append_seconds.clone(),
        );
        r.register(
            "storage_fsync_seconds",
            "Time of one fdatasync of segment records (primaries and replicas)",
            fsync_seconds.clone(),
        );
        r.register(
            "storage_fsync_records",
            "Records made durable by one fsync of a primary (group commit)",
            fsync_records.clone(),
        );
        r.register("storage_written_bytes", "Bytes of records written to segments as a primary", written_bytes.clone());
        r.register(
            "replication_failovers",
            "Segments this node failed over (closed at the longest replica's length after their primary was gone or stopped)",
            failovers.clone(),
        );
        r.register("consumer_group_deliveries", "Messages handed to subscribers", group_deliveries.clone());
        r.register("consumer_group_acks", "Messages acknowledged", group_acks.clone());
        r.register("consumer_group_nacks", "Messages returned by a nack", group_nacks.clone());
        r.register(
            "consumer_group_redeliveries",
            "Messages returned for redelivery (nacked, or held by a subscriber that left)",
            group_redeliveries.clone(),
        );
        r.register("grpc_requests", "gRPC requests served, by method and status code", grpc_requests.clone());
        r.register(
            "grpc_request_duration_seconds",
            "Time from a gRPC request's arrival to its response headers (for streams: until the stream is set up)",
            grpc_seconds.clone(),
        );
        Self {
            inner: Arc::new(Inner {
                registry,
                labels: LabelFolder::new(label_values_max),
                publish_requests,
                publish_messages,
                publish_bytes,
                publish_rejected,
                publish_confirm,
                append_seconds,
                fsync_seconds,
                fsync_records,
                written_bytes,
                failovers,
                group_deliveries,
                group_acks,
                group_nacks,
                group_redeliveries,
                grpc_requests,
                grpc_seconds,
            }),
        }
    }

    pub fn labels(&self) -> &LabelFolder {
        &self.inner.labels
    }

    /// One publish request answered: `ok` with its messages and their bytes, or the
    /// error's code and name.
    pub fn publish(
        &self,
        namespace: &str,
        topic: &str,
        persistence: &str,
        result: Result<(u64, u64), (u32, &str)>,
        seconds: f64,
    ) {
        let i = &self.inner;
        let (namespace, topic) = i.labels.fold(LabelKind::Topic, namespace, topic);
        let labels = PublishLabels { namespace, topic, persistence: persistence.to_string() };
        i.publish_requests.get_or_create(&labels).inc();
        match result {
            Ok((messages, bytes)) => {
                i.publish_messages.get_or_create(&labels).inc_by(messages);
                i.publish_bytes.get_or_create(&labels).inc_by(bytes);
                let p = PersistenceLabels { persistence: labels.persistence };
                i.publish_confirm.get_or_create(&p).observe(seconds);
            }
            Err((code, name)) => {
                let labels = ErrorLabels { code: code.to_string(), error: name.to_string() };
                i.publish_rejected.get_or_create(&labels).inc();
            }
        }
    }

    /// One write of `bytes` to a segment as its primary.
    pub fn appended(&self, bytes: u64, seconds: f64) {
        self.inner.append_seconds.observe(seconds);
        self.inner.written_bytes.inc_by(bytes);
    }

    /// One fsync of segment records; `records`: how many it made durable (primaries).
    pub fn fsynced(&self, records: Option<u64>, seconds: f64) {
        self.inner.fsync_seconds.observe(seconds);
        if let Some(n) = records.filter(|n| *n > 0) {
            self.inner.fsync_records.observe(n as f64);
        }
    }

    pub fn failed_over(&self) {
        self.inner.failovers.inc();
    }

    /// The counters of a group, for its task to keep.
    pub fn group_counters(&self, namespace: &str, group: &str) -> GroupCounters {
        let i = &self.inner;
        let (namespace, group) = i.labels.fold(LabelKind::Group, namespace, group);
        let labels = GroupLabels { namespace, group };
        GroupCounters {
            deliveries: i.group_deliveries.get_or_create(&labels).clone(),
            acks: i.group_acks.get_or_create(&labels).clone(),
            nacks: i.group_nacks.get_or_create(&labels).clone(),
            redeliveries: i.group_redeliveries.get_or_create(&labels).clone(),
        }
    }

    /// One gRPC request answered with `code` after `seconds`.
    pub fn grpc(&self, method: &str, code: &str, seconds: f64) {
        let i = &self.inner;
        let (method, _) = i.labels.fold(LabelKind::Method, method, "");
        i.grpc_requests.get_or_create(&GrpcLabels { method: method.clone(), code: code.to_string() }).inc();
        i.grpc_seconds.get_or_create(&MethodLabels { method }).observe(seconds);
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

/// Whether a sample is a gauge or a counter (a level read from the state that only
/// grows, such as CPU seconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Gauge,
    Counter,
}

/// One family of levels read at a scrape.
#[derive(Debug)]
pub struct Levels {
    /// Without the `eventtermq_` prefix, which [`Snapshot::prefixed`] says whether to add.
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    pub prefixed: bool,
    pub samples: Vec<(Labels, f64)>,
}

/// The levels read from the node's state at one scrape, ready to encode.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub families: Vec<Levels>,
}

impl Snapshot {
    /// Adds a family of `eventtermq_`-prefixed gauges.
    pub fn gauge(&mut self, name: &'static str, help: &'static str, samples: Vec<(Labels, f64)>) {
        self.families.push(Levels { name, help, kind: Kind::Gauge, prefixed: true, samples });
    }

    /// Adds one family without the prefix (the conventional `process_*` names).
    pub fn unprefixed(&mut self, name: &'static str, help: &'static str, kind: Kind, value: f64) {
        self.families.push(Levels { name, help, kind, prefixed: false, samples: vec![(Vec::new(), value)] });
    }

    fn registry(&self) -> Registry {
        let mut root = Registry::default();
        for f in &self.families {
            let registry = if f.prefixed { root.sub_registry_with_prefix("eventtermq") } else { &mut root };
            match f.kind {
                Kind::Gauge => {
                    let family = Family::<Labels, Gauge<f64, AtomicU64>>::default();
                    for (labels, v) in &f.samples {
                        family.get_or_create(labels).set(*v);
                    }
                    registry.register(f.name, f.help, family);
                }
                Kind::Counter => {
                    let family = Family::<Labels, Counter<f64, AtomicU64>>::default();
                    for (labels, v) in &f.samples {
                        family.get_or_create(labels).inc_by(*v);
                    }
                    registry.register(f.name, f.help, family);
                }
            }
        }
        root
    }
}

/// Sums samples whose labels became equal after folding (`fold` maps a sample's labels
/// to their folded form), keeping the first order; `max` instead of the sum when
/// `keep_max` (an age, where adding is meaningless).
pub fn fold_samples(
    samples: Vec<(Labels, f64)>,
    keep_max: bool,
    fold: impl Fn(Labels) -> Labels,
) -> Vec<(Labels, f64)> {
    let mut out: Vec<(Labels, f64)> = Vec::with_capacity(samples.len());
    let mut index: std::collections::HashMap<Labels, usize> = std::collections::HashMap::new();
    for (labels, v) in samples {
        let labels = fold(labels);
        match index.get(&labels) {
            Some(&i) => {
                let acc = &mut out[i].1;
                *acc = if keep_max { acc.max(v) } else { *acc + v };
            }
            None => {
                index.insert(labels.clone(), out.len());
                out.push((labels, v));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_beyond_the_limit_fold_into_one() {
        let f = LabelFolder::new(2);
        assert_eq!(f.fold(LabelKind::Topic, "ns", "a"), ("ns".into(), "a".into()));
        assert_eq!(f.fold(LabelKind::Topic, "ns", "b"), ("ns".into(), "b".into()));
        assert_eq!(f.fold(LabelKind::Topic, "ns", "c"), (FOLDED.into(), FOLDED.into()));
        // Values admitted before stay; other kinds have their own room.
        assert_eq!(f.fold(LabelKind::Topic, "ns", "a"), ("ns".into(), "a".into()));
        assert_eq!(f.fold(LabelKind::Group, "ns", "c"), ("ns".into(), "c".into()));
    }

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
        m.publish("default", "t", "default", Ok((3, 30)), 0.001);
        m.publish("default", "t", "default", Err((5004, "NotEnoughReplicas")), 0.001);
        let mut s = Snapshot::default();
        s.gauge("consumer_group_lag_records", "lag", vec![(vec![("group", "g".into())], 1000.0)]);
        s.unprefixed("process_open_fds", "fds", Kind::Gauge, 12.0);
        let text = m.encode(&s, false);
        assert!(
            text.contains(
                "eventtermq_publish_messages_total{namespace=\"default\",topic=\"t\",persistence=\"default\"} 3"
            ),
            "{text}"
        );
        assert!(
            text.contains("eventtermq_publish_rejected_total{code=\"5004\",error=\"NotEnoughReplicas\"} 1"),
            "{text}"
        );
        assert!(text.contains("eventtermq_consumer_group_lag_records{group=\"g\"} 1000"), "{text}");
        assert!(text.contains("\nprocess_open_fds 12"), "{text}");
        assert!(!text.contains("# EOF"));
        let om = m.encode(&s, true);
        assert!(om.ends_with("# EOF\n"), "{om}");
        assert_eq!(om.matches("# EOF").count(), 1);
    }
}
