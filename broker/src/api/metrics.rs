//! `/metrics` over HTTP (`--metrics-port`): the node's event metrics
//! ([`crate::metrics`]) and the levels read from its parts at each scrape: consumer
//! lag from the group tasks running here, Raft, gossip, local segments, disk,
//! replication progress of the segments this node is primary of, and the process.
//!
//! A scrape reads shared state (the cluster state's lock for a moment, one question to
//! each group task running here) and touches nothing on the data path.

use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::cluster::Cluster;
use crate::cluster_state::NodeState;
use crate::consumer_groups::{GroupStats, Groups};
use crate::membership::Membership;
use crate::metrics::{fold_samples, Kind, LabelKind, Metrics, Snapshot};
use crate::replication::{lock, Segments};

/// What a scrape reads. Cheap to clone.
#[derive(Clone)]
pub struct Observer {
    pub cluster: Cluster,
    pub membership: Membership,
    pub segments: Segments,
    pub groups: Groups,
    /// Not ready while stopping, nor before it caught up after its start.
    pub readiness: super::Readiness,
}

type Labels = Vec<(&'static str, String)>;

/// Linux reports process CPU times in clock ticks of `USER_HZ`, which is 100 on every
/// architecture the kernel supports for user space ABI purposes.
const USER_HZ: f64 = 100.0;

impl Observer {
    pub fn new(s: &super::Services, readiness: super::Readiness) -> Self {
        let (cluster, membership) = (s.cluster.clone(), s.membership.clone());
        Self { cluster, membership, segments: s.segments.clone(), groups: s.groups.clone(), readiness }
    }

    fn metrics(&self) -> &Metrics {
        self.segments.metrics()
    }

    /// Every metric, in the Prometheus text format or, with `openmetrics`, OpenMetrics.
    pub async fn render(&self, openmetrics: bool) -> String {
        let groups = self.groups.stats().await;
        let mut s = Snapshot::default();
        self.group_levels(&groups, &mut s);
        self.raft_levels(&mut s);
        self.gossip_levels(&mut s);
        self.storage_levels(&mut s);
        self.replication_levels(&mut s);
        process_levels(&mut s);
        self.metrics().encode(&s, openmetrics)
    }

    fn group_label(&self, namespace: &str, group: &str) -> Labels {
        let (namespace, group) = self.metrics().labels().fold(LabelKind::Group, namespace, group);
        vec![("namespace", namespace), ("group", group)]
    }

    fn group_levels(&self, groups: &[GroupStats], s: &mut Snapshot) {
        let labels = |g: &GroupStats| self.group_label(&g.namespace, &g.group);
        let per_group = |f: &dyn Fn(&GroupStats) -> f64| -> Vec<(Labels, f64)> {
            groups.iter().map(|g| (labels(g), f(g))).collect()
        };
        let lag: Vec<(Labels, f64)> = groups
            .iter()
            .flat_map(|g| {
                g.lag.iter().map(move |(topic, n)| {
                    let mut l = labels(g);
                    let (_, topic) = self.metrics().labels().fold(LabelKind::Topic, &g.namespace, topic);
                    l.push(("topic", topic));
                    (l, *n as f64)
                })
            })
            .collect();
        let same = |l: Labels| l;
        s.gauge(
            "consumer_group_lag_records",
            "Records of a bound topic the group has not dealt with yet: confirmed (open segments) or stored \
             (closed ones) and neither acknowledged nor read and found not matching (README, Metrics)",
            fold_samples(lag, false, same),
        );
        s.gauge(
            "consumer_group_oldest_unacked_seconds",
            "Age of the oldest message the group has read and not acknowledged (0: none)",
            fold_samples(per_group(&|g| g.oldest_unacked_ms as f64 / 1000.0), true, same),
        );
        s.gauge(
            "consumer_group_subscribers",
            "Subscribers of the group",
            fold_samples(per_group(&|g| g.subscribers as f64), false, same),
        );
        let buffered: Vec<(Labels, f64)> = groups
            .iter()
            .flat_map(|g| {
                [("pending", g.pending), ("in_flight", g.in_flight)].map(|(state, n)| {
                    let mut l = labels(g);
                    l.push(("state", state.to_string()));
                    (l, n as f64)
                })
            })
            .collect();
        s.gauge(
            "consumer_group_buffered_messages",
            "Messages in the group's buffer: waiting for a subscriber (pending) or handed out and not acknowledged (in_flight)",
            fold_samples(buffered, false, same),
        );
        s.gauge(
            "consumer_group_buffer_capacity_messages",
            "Size of the group's buffer",
            fold_samples(per_group(&|g| g.capacity as f64), false, same),
        );
    }

    fn raft_levels(&self, s: &mut Snapshot) {
        let m = self.cluster.raft.metrics().borrow().clone();
        let me = self.cluster.id;
        let node = vec![("node_id", me.to_string())];
        s.gauge("node_info", "This node's id (1)", vec![(node, 1.0)]);
        s.gauge("raft_term", "Raft term this node is in", vec![(Vec::new(), m.current_term as f64)]);
        s.gauge(
            "raft_leader",
            "The Raft leader this node follows (1, with its id as label); no sample while none is known",
            m.current_leader.map(|l| (vec![("leader_id", l.to_string())], 1.0)).into_iter().collect(),
        );
        s.gauge(
            "raft_is_leader",
            "1 while this node is the Raft leader",
            vec![(Vec::new(), f64::from(u8::from(m.current_leader == Some(me))))],
        );
        s.gauge(
            "raft_last_log_index",
            "Index of the last entry in this node's Raft log",
            vec![(Vec::new(), m.last_log_index.unwrap_or(0) as f64)],
        );
        s.gauge(
            "raft_applied_index",
            "Index of the last entry applied to this node's cluster state (committed and applied)",
            vec![(Vec::new(), m.last_applied.map_or(0, |l| l.index) as f64)],
        );
        s.gauge(
            "raft_snapshot_index",
            "Index up to which this node's Raft state is in a snapshot",
            vec![(Vec::new(), m.snapshot.map_or(0, |l| l.index) as f64)],
        );
        s.gauge(
            "raft_stopped",
            "1 once Raft stopped on this node on a storage error (the node must be restarted)",
            vec![(Vec::new(), f64::from(u8::from(super::raft_failure(&m).is_some())))],
        );
    }

    fn gossip_levels(&self, s: &mut Snapshot) {
        let members = self.membership.watch().borrow().clone();
        let states = [NodeState::Alive, NodeState::Suspect, NodeState::Dead, NodeState::Left];
        let samples = states
            .iter()
            .map(|st| {
                let n = members.iter().filter(|m| m.state == *st).count();
                (vec![("state", st.as_str().to_lowercase())], n as f64)
            })
            .collect();
        s.gauge("gossip_members", "Members this node's gossip knows, by state", samples);
    }

    fn storage_levels(&self, s: &mut Snapshot) {
        let store = self.segments.store();
        let list = store.list();
        let open = list.iter().filter(|i| !i.sealed).count();
        s.gauge(
            "storage_segments",
            "Segment copies on this node: open (being written) or sealed",
            vec![
                (vec![("state", "open".into())], open as f64),
                (vec![("state", "sealed".into())], (list.len() - open) as f64),
            ],
        );
        s.gauge(
            "storage_segments_quarantined",
            "Damaged segment copies set aside since this node started (renamed *.corrupt-*)",
            vec![(Vec::new(), store.quarantined().len() as f64)],
        );
        s.gauge(
            "storage_segments_bytes",
            "Bytes of the segment copies in --dir on this node (Raft files not included)",
            vec![(Vec::new(), list.iter().map(|i| i.size_bytes).sum::<u64>() as f64)],
        );
        let disk = self.segments.disk().status();
        s.gauge(
            "disk_free_bytes",
            "Free bytes of the filesystem of --dir (read every 100 ms)",
            vec![(Vec::new(), disk.free_bytes as f64)],
        );
        s.gauge(
            "disk_free_min_bytes",
            "The free-space watermark (--disk-free-min-bytes or --disk-free-min-percent)",
            vec![(Vec::new(), disk.free_min_bytes as f64)],
        );
        s.gauge(
            "disk_low",
            "1 while this node is below its watermark and refuses segment data",
            vec![(Vec::new(), f64::from(u8::from(disk.below)))],
        );
    }

    fn replication_levels(&self, s: &mut Snapshot) {
        let primaries: Vec<_> = lock(self.segments.primaries()).values().cloned().collect();
        let (behind, unconfirmed, under) = {
            let st = self.cluster.state.read();
            let topic = |id| {
                let seg = st.state.segments.get(&id)?;
                let (ns, topic) = self.metrics().labels().fold(LabelKind::Topic, &seg.namespace, &seg.topic);
                Some(vec![("namespace", ns), ("topic", topic), ("segment", id.to_string())])
            };
            let mut behind = Vec::new();
            let mut unconfirmed = Vec::new();
            for p in &primaries {
                let Some(labels) = topic(p.id) else { continue };
                let progress = &p.progress;
                let written = progress.written.load(std::sync::atomic::Ordering::Relaxed);
                let confirmed = progress.confirmed.load(std::sync::atomic::Ordering::Relaxed);
                unconfirmed.push((labels.clone(), written.saturating_sub(confirmed) as f64));
                for (node, durable) in &progress.durable {
                    let mut l = labels.clone();
                    l.push(("replica", node.to_string()));
                    let d = durable.load(std::sync::atomic::Ordering::Relaxed);
                    behind.push((l, written.saturating_sub(d) as f64));
                }
            }
            let under = st
                .state
                .segments
                .values()
                .filter(|seg| {
                    let rf = st.state.topic(&seg.namespace, &seg.topic).map_or(0, |t| t.replication_factor as usize);
                    let copies = if seg.is_open() { &seg.replicas } else { &seg.done };
                    copies.iter().filter(|n| !st.state.node_gone(**n)).count() < rf
                })
                .count();
            (behind, unconfirmed, under)
        };
        s.gauge(
            "replication_records_behind",
            "Per open segment this node is primary of and member of its replica set (the primary too): \
             records written by the primary and not yet fsynced there",
            behind,
        );
        s.gauge(
            "replication_unconfirmed_records",
            "Per open segment this node is primary of: records written and not yet on a quorum (not readable yet)",
            unconfirmed,
        );
        s.gauge(
            "replication_under_replicated_segments",
            "Segments with fewer copies on live nodes than their topic's replication factor, as this node's copy \
             of the cluster state says (the same on every node: use max)",
            vec![(Vec::new(), under as f64)],
        );
    }
}

/// Build information and the process's resources (from /proc; absent elsewhere).
fn process_levels(s: &mut Snapshot) {
    s.gauge(
        "build_info",
        "The running build (1)",
        vec![(vec![("version", env!("CARGO_PKG_VERSION").to_string())], 1.0)],
    );
    if let Some(p) = read_proc() {
        s.unprefixed("process_cpu_seconds", "User and system CPU time of the process", Kind::Counter, p.cpu_seconds);
        s.unprefixed("process_resident_memory_bytes", "Resident memory of the process", Kind::Gauge, p.rss_bytes);
        s.unprefixed("process_open_fds", "Open file descriptors of the process", Kind::Gauge, p.open_fds);
    }
}

struct Proc {
    cpu_seconds: f64,
    rss_bytes: f64,
    open_fds: f64,
}

fn read_proc() -> Option<Proc> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let (utime, stime) = cpu_ticks(&stat)?;
    let rss_kib: f64 =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as f64;
    Some(Proc { cpu_seconds: (utime + stime) as f64 / USER_HZ, rss_bytes: rss_kib * 1024.0, open_fds })
}

/// utime and stime (fields 14 and 15) of `/proc/self/stat`; the command name (field 2)
/// may hold spaces and parentheses, so fields are counted after its last `)`.
fn cpu_ticks(stat: &str) -> Option<(u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    Some((fields.next()?.parse().ok()?, fields.next()?.parse().ok()?))
}

/// Whether the scraper asked for OpenMetrics (Prometheus does, with a preference).
fn wants_openmetrics(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"))
}

async fn metrics(State(observer): State<Observer>, headers: HeaderMap) -> impl IntoResponse {
    let openmetrics = wants_openmetrics(&headers);
    let content_type = if openmetrics {
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    } else {
        prometheus_client::encoding::prometheus_text::CONTENT_TYPE
    };
    ([(header::CONTENT_TYPE, content_type)], observer.render(openmetrics).await)
}

/// Path of the readiness check: 200 while the node knows a Raft leader, as the gRPC
/// health service's readiness (`eventtermq_api::health::READINESS_SERVICE`), and is
/// not stopping (a graceful stop makes it 503 at once, so a Service stops sending new
/// clients while the node hands its work over).
pub const READINESS_PATH: &str = "/readyz";
/// Path of the liveness check: 200 until Raft stopped on an error, as the gRPC health
/// service's liveness.
pub const LIVENESS_PATH: &str = "/livez";

/// The health answers of the gRPC health service, over plain HTTP on the metrics
/// port: a Kubernetes kubelet's gRPC probe speaks no TLS, so a node serving TLS on
/// its gRPC port is probed here. `ready`: readiness, else liveness. No data is shown.
fn health_answer(observer: &Observer, ready: bool) -> (axum::http::StatusCode, String) {
    use axum::http::StatusCode;
    let metrics = observer.cluster.raft.metrics();
    let m = metrics.borrow();
    if let Some(reason) = super::raft_failure(&m) {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("Raft stopped: {reason}\n"));
    }
    if ready && observer.readiness.stopping.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "stopping\n".to_string());
    }
    if ready && m.current_leader.is_none() {
        return (StatusCode::SERVICE_UNAVAILABLE, "no Raft leader known\n".to_string());
    }
    if ready && !observer.readiness.caught_up.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "catching up with the leader and the primaries\n".to_string());
    }
    (StatusCode::OK, "ok\n".to_string())
}

async fn readyz(State(observer): State<Observer>) -> impl IntoResponse {
    health_answer(&observer, true)
}

async fn livez(State(observer): State<Observer>) -> impl IntoResponse {
    health_answer(&observer, false)
}

/// Serves `/metrics`, [`READINESS_PATH`] and [`LIVENESS_PATH`] on `listener` until
/// `stop`.
pub async fn serve(listener: tokio::net::TcpListener, observer: Observer, stop: CancellationToken) {
    let router = Router::new()
        .route("/metrics", get(metrics))
        .route(READINESS_PATH, get(readyz))
        .route(LIVENESS_PATH, get(livez))
        .with_state(observer);
    if let Err(e) = axum::serve(listener, router).with_graceful_shutdown(stop.cancelled_owned()).await {
        tracing::error!(error = %e, "metrics server failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_skip_a_command_name_with_spaces() {
        let stat = "1234 (a b) c) S 1 2 3 4 5 6 7 8 9 10 250 75 0 0 20 0 1 0";
        assert_eq!(cpu_ticks(stat), Some((250, 75)));
    }

    #[test]
    fn openmetrics_only_when_asked() {
        let mut h = HeaderMap::new();
        assert!(!wants_openmetrics(&h));
        h.insert(header::ACCEPT, "application/openmetrics-text;version=1.0.0,text/plain;q=0.5".parse().unwrap());
        assert!(wants_openmetrics(&h));
    }
}
