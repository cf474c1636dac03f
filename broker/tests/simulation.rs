//! Deterministic simulation of a whole cluster (issue 13, item 8), after TigerBeetle's
//! VOPR and FoundationDB's simulation: three nodes in one process over the in-memory
//! network, each on its own simulated disk (`eventtermq_storage::sim::SimFs`), on
//! tokio's paused clock (one thread), with publishers and a subscriber, through a
//! seeded random schedule of faults: kill -9 of a node, power loss of a node or of all
//! of them (unsynced data and directory entries dropped, the last write torn),
//! partitions, full disks, failing fsyncs and flipped bits. After every step the
//! invariants are checked; at the end every fault is healed and every confirmed
//! message must be delivered.
//!
//! Invariants:
//! - **no confirmed message lost**: every publish that was confirmed is delivered to the
//!   consumer group at the end (at least once), and nothing is delivered that was never
//!   published;
//! - **no corrupt data served**: every delivery decodes to a message of this run, and
//!   one from a confirmed position carries the message confirmed there;
//! - **per-shard order**: a publisher's confirmed batches are stored in the order they
//!   were confirmed (segment ids grow with generations, offsets within a segment), and
//!   the group hands a shard's records out in that order: a record seen for the first
//!   time never comes after a later record of its shard unless the subscriber's stream
//!   broke shortly before (what was in flight on it is redelivered);
//! - **committed Raft entries never lost**: every node's applied state at a log index
//!   (term and content) is the same as every other observation of that index, across
//!   crashes and power losses;
//! - **committed offsets never beyond an unacknowledged message**: every record below a
//!   committed offset of the group was acknowledged by the subscriber.
//!
//! Beyond the invariants, a task of a node that panics (an assertion in openraft, say)
//! fails the run, and so does a node that refuses to restart.
//!
//! Everything random comes from the seed: the schedule, the workload, the disks, the
//! network's losses, gossip, Raft's election timeouts, node ids; blocking disk IO runs
//! as ordinary tasks (`clock::run_blocking_io_inline`). A failing seed prints its
//! schedule and the command that replays it.
//!
//! Commands (see README, Tests):
//! - `cargo test -p eventtermq-broker --test simulation` runs seeds 1 to
//!   [`CI_SEEDS_COUNT`] and checks that a seed replays exactly;
//! - `EVENTTERMQ_SIM_SEEDS=1000 EVENTTERMQ_SIM_SEED_START=100 cargo test --release -p
//!   eventtermq-broker --test simulation seeds -- --nocapture` runs more;
//! - `EVENTTERMQ_SIM_SEED=<seed> cargo test -p eventtermq-broker --test simulation seeds
//!   -- --nocapture` replays one, printing its schedule as it goes
//!   (`EVENTTERMQ_SIM_LOG=info` adds the nodes' logs).

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use eventtermq_broker::api::raft_failure;
use eventtermq_broker::clock::{self, Clock};
use eventtermq_broker::cluster_state::{BindingSpec, Command, ConsumerGroupSpec, ExchangeType, SharedState, TopicSpec};
use eventtermq_broker::config::NodeConfig;
use eventtermq_broker::node::{self, NodeHandle};
use eventtermq_broker::transport::mem::MemNetwork;
use eventtermq_broker::transport::Network;
use eventtermq_proto::v1::messaging_client::MessagingClient;
use eventtermq_proto::v1::{AckRequest, Delivery, Message, NackRequest, PublishRequest, SubscribeRequest};
use eventtermq_storage::sim::{FaultError, FaultRule, FsOp, SimFs, SimRng};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Seeds `cargo test` runs by default: seeds 1 to 16, about 2-3 s each (debug build).
const CI_SEEDS_COUNT: u64 = 16;

/// Wall-clock time of a run's start (any fixed value).
const START_UNIX_MS: i64 = 1_700_000_000_000;
const NODES: [&str; 3] = ["a:1", "b:1", "c:1"];
const CLIENT: &str = "client:1";
const NAMESPACE: &str = "default";
/// One topic per publisher, one shard each: a publisher's order is its shard's order.
const TOPICS: [&str; 2] = ["t0", "t1"];
const GROUP: &str = "g";

/// Fault steps per run.
const STEPS: usize = 14;
/// Virtual time the workload runs between two steps, at least and at most.
const DWELL_MIN_MS: u64 = 300;
const DWELL_MAX_MS: u64 = 3_000;
/// How long a healed cluster has to deliver every confirmed message at the end.
const DRAIN_MAX: Duration = Duration::from_secs(120);
/// A client call that takes longer is given up (its outcome is unknown).
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// A first delivery out of its shard's order is allowed this soon after the
/// subscriber's stream broke (what was in flight on it is redelivered later).
const REDELIVERY_WINDOW: Duration = Duration::from_secs(2);
/// Capacity left on a disk made full, at most.
const FULL_DISK_SLACK_MAX_BYTES: u64 = 256 * 1024;
/// A node whose liveness fails this long is restarted, as the kubelet does with the
/// operator's liveness probe (period 10 s, 6 failures): Raft stopped on a storage error
/// (a disk that filled under its log) never starts again in the same process.
const LIVENESS_RESTART_AFTER: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------
// The model: what clients saw, and what must hold
// ---------------------------------------------------------------------------------------

/// Where a record is: segment ids grow with a shard's generations, so within a shard
/// (segment id, offset) is the order of the records.
type Position = (u64, u64);
/// A published message: (publisher, sequence number).
type MsgId = (u32, u64);

#[derive(Default)]
struct Model {
    /// Confirmed messages and where they were stored.
    confirmed: BTreeMap<MsgId, Position>,
    /// The same, by position: what a delivery from there must carry.
    confirmed_at: BTreeMap<Position, MsgId>,
    /// Publishes with an unknown outcome (may or may not be stored).
    unknown: BTreeSet<MsgId>,
    /// Every message a publish was sent for (recorded before it is sent).
    sent: BTreeSet<MsgId>,
    /// Per publisher: the position of its last confirmed batch.
    last_confirmed: BTreeMap<u32, Position>,
    /// First delivery of each message.
    delivered: BTreeMap<MsgId, Position>,
    /// Records delivered at least once.
    seen: BTreeSet<Position>,
    /// Records the subscriber acknowledged (sent an ack for).
    acked: BTreeSet<Position>,
    /// Per topic: the furthest record delivered and when.
    furthest: BTreeMap<String, (Position, Instant)>,
    /// When the subscriber's stream last broke (what it had in flight comes again).
    last_break: Option<Instant>,
    /// Applied state per Raft log index: (term and leader, hash of the state, who).
    applied: BTreeMap<u64, (String, u64, String)>,
    violations: Vec<String>,
    /// Everything observable, in order, for the determinism check.
    digest: std::collections::hash_map::DefaultHasher,
    publishes: u64,
    deliveries: u64,
}

impl Model {
    fn violation(&mut self, what: String) {
        if self.violations.len() < 20 {
            self.violations.push(what);
        }
    }

    fn observe(&mut self, event: impl Hash) {
        event.hash(&mut self.digest);
    }
}

type Shared = Arc<Mutex<Model>>;

fn lock(m: &Shared) -> MutexGuard<'_, Model> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What a message carries: its publisher and sequence number.
fn encode(id: MsgId) -> Vec<u8> {
    format!("p{}-{}", id.0, id.1).into_bytes()
}

fn decode(data: &[u8]) -> Option<MsgId> {
    let s = std::str::from_utf8(data).ok()?.strip_prefix('p')?;
    let (p, n) = s.split_once('-')?;
    Some((p.parse().ok()?, n.parse().ok()?))
}

// ---------------------------------------------------------------------------------------
// The simulated cluster
// ---------------------------------------------------------------------------------------

struct SimNode {
    name: &'static str,
    id: u64,
    fs: SimFs,
    running: Option<(NodeHandle, CancellationToken)>,
    /// Restarts of this node so far (each gets new seeds).
    lives: u32,
    /// Since when its liveness fails (Raft stopped on an error), while it runs.
    not_live_since: Option<Instant>,
}

/// Which nodes clients may talk to (running ones), shared with the workload.
type Up = Arc<Mutex<Vec<bool>>>;

struct Sim {
    seed: u64,
    rng: SimRng,
    net: MemNetwork,
    clock: Clock,
    nodes: Vec<SimNode>,
    up: Up,
    model: Shared,
    /// The schedule so far: one line per step.
    schedule: Vec<String>,
    verbose: bool,
    partitioned: Option<usize>,
    full: Option<usize>,
    /// Nodes whose fsyncs fail (EIO) until healed.
    failing: Option<usize>,
    started: Instant,
}

/// A run's result.
#[derive(Debug)]
struct Outcome {
    seed: u64,
    schedule: Vec<String>,
    violations: Vec<String>,
    digest: u64,
    publishes: u64,
    confirmed: usize,
    deliveries: u64,
}

impl Outcome {
    fn report(&self) -> String {
        let mut s = format!(
            "seed {}: {} publishes ({} messages confirmed), {} deliveries\nschedule:\n",
            self.seed, self.publishes, self.confirmed, self.deliveries
        );
        for line in &self.schedule {
            s.push_str(&format!("  {line}\n"));
        }
        if self.violations.is_empty() {
            s.push_str("no violation\n");
        } else {
            s.push_str("VIOLATIONS:\n");
            for v in &self.violations {
                s.push_str(&format!("  {v}\n"));
            }
            s.push_str(&format!(
                "replay: EVENTTERMQ_SIM_SEED={} cargo test -p eventtermq-broker --test simulation seeds -- --nocapture\n",
                self.seed
            ));
        }
        s
    }
}

impl Sim {
    fn new(seed: u64, verbose: bool) -> Sim {
        let mut rng = SimRng::new(seed);
        let net = MemNetwork::with_seed(rng.next_u64());
        // Ids from the seed: the smallest bootstraps, and placement prefers by id.
        let mut ids: Vec<u64> = (0..3).map(|i| 1 + rng.below(1 << 40) * 3 + i).collect();
        ids.sort_unstable_by_key(|_| rng.next_u64());
        let nodes = NODES
            .iter()
            .zip(ids)
            .map(|(name, id)| SimNode {
                name,
                id,
                fs: SimFs::new(rng.next_u64()),
                running: None,
                lives: 0,
                not_live_since: None,
            })
            .collect();
        Sim {
            seed,
            rng,
            net,
            clock: Clock::manual(START_UNIX_MS),
            nodes,
            up: Arc::new(Mutex::new(vec![false; 3])),
            model: Arc::default(),
            schedule: Vec::new(),
            verbose,
            partitioned: None,
            full: None,
            failing: None,
            started: Instant::now(),
        }
    }

    fn log(&mut self, what: String) {
        let line = format!("{:>8.3}s {what}", self.started.elapsed().as_secs_f64());
        if self.verbose {
            eprintln!("[sim {}] {line}", self.seed);
        }
        lock(&self.model).observe(&line);
        self.schedule.push(line);
    }

    fn config(&mut self, i: usize) -> NodeConfig {
        let n = &self.nodes[i];
        let mut c = NodeConfig::new(PathBuf::from(format!("/sim/{}", n.name)), n.name, n.name);
        c.id = Some(n.id);
        c.fs = n.fs.as_fs();
        c.clock = self.clock.clone();
        c.join = if i == 0 { Vec::new() } else { vec![NODES[0].to_string()] };
        c.internal_access = eventtermq_broker::security::InternalAccess::TrustedNetwork;
        c.raft.heartbeat_interval_ms = 50;
        // openraft draws a node's election timeout once per start from this range: one
        // value, from the seed, so that a run replays (and the nodes differ).
        let timeout = 200 + self.rng.below(200);
        c.raft.election_timeout_min_ms = timeout;
        c.raft.election_timeout_max_ms = timeout + 1;
        c.raft.snapshot_logs_count = 200;
        c.raft.logs_kept_after_snapshot_count = 50;
        c.membership.probe_period_ms = 100;
        c.membership.probe_rtt_ms = 50;
        c.membership.suspect_to_down_ms = 500;
        c.membership.join_retry_ms = 100;
        c.membership.rng_seed = Some(self.rng.next_u64());
        c.reconcile_interval_ms = 50;
        c.request_timeout_ms = 3_000;
        c.data.segment_size_max_bytes = 4096 + self.rng.below(8192);
        c.data.segment_preallocate_bytes = 4096;
        c.data.offsets_commit_interval_ms = 200;
        c.data.read_wait_ms = 100;
        c.data.rereplicate_after_ms = 3_000;
        c.data.disk_watermark.free_min_bytes = 64 * 1024;
        c
    }

    async fn start(&mut self, i: usize) -> Result<(), String> {
        let c = self.config(i);
        let name = self.nodes[i].name;
        let (network, listeners) = self.net.attach(name);
        if self.partitioned == Some(i) {
            self.net.isolate(name);
        }
        let shutdown = CancellationToken::new();
        match node::start(c, network, listeners, shutdown.clone()).await {
            Ok(handle) => {
                self.nodes[i].running = Some((handle, shutdown));
                self.nodes[i].lives += 1;
                self.nodes[i].not_live_since = None;
                lock_up(&self.up)[i] = true;
                Ok(())
            }
            Err(e) => {
                self.net.detach(name);
                Err(format!("{name} does not start: {e}"))
            }
        }
    }

    /// kill -9: the process's tasks stop at once, its files close; the page cache stays.
    async fn kill(&mut self, i: usize) {
        lock_up(&self.up)[i] = false;
        self.net.detach(self.nodes[i].name);
        if let Some((handle, _)) = self.nodes[i].running.take() {
            handle.kill().await;
        }
        self.nodes[i].fs.process_died();
    }

    fn running(&self) -> Vec<usize> {
        (0..3).filter(|i| self.nodes[*i].running.is_some()).collect()
    }

    fn stopped(&self) -> Vec<usize> {
        (0..3).filter(|i| self.nodes[*i].running.is_none()).collect()
    }

    fn pick(&mut self, from: &[usize]) -> usize {
        from[self.rng.below(from.len() as u64) as usize]
    }

    /// One step of the schedule: a fault or a repair, chosen from what the cluster's
    /// state allows (each kind of fault on at most one node at a time; a node is killed
    /// or loses power only while all three run, but for a power loss of every node).
    async fn step(&mut self) {
        let stopped = self.stopped();
        let healthy = stopped.is_empty() && self.partitioned.is_none() && self.full.is_none() && self.failing.is_none();
        let roll = self.rng.below(100);
        if !healthy {
            // Repair first, most of the time.
            if roll < 70 || (!stopped.is_empty() && roll < 85) {
                return self.repair().await;
            }
        }
        let i = self.pick(&[0, 1, 2]);
        match self.rng.below(100) {
            0..=19 if self.running().len() == 3 => {
                self.log(format!("kill -9 {}", self.nodes[i].name));
                self.kill(i).await;
            }
            20..=39 if self.running().len() == 3 => self.power_loss(i).await,
            40..=44 => self.power_loss_everywhere().await,
            45..=59 if self.partitioned.is_none() => {
                self.log(format!("partition {} from the others", self.nodes[i].name));
                self.net.isolate(self.nodes[i].name);
                self.partitioned = Some(i);
            }
            60..=69 if self.full.is_none() => self.fill_disk(i),
            70..=74 if self.failing.is_none() => self.fail_fsyncs(i),
            75..=84 => self.flip_bit(i),
            _ => {
                let ms = self.rng.between(DWELL_MIN_MS, DWELL_MAX_MS);
                self.log(format!("quiet for {ms} ms"));
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
        }
    }

    /// Node `i` loses power: killed, and its disk keeps only what was synced (plus a
    /// random prefix of the rest, the last write perhaps torn).
    async fn power_loss(&mut self, i: usize) {
        self.kill(i).await;
        let r = self.nodes[i].fs.power_loss();
        self.log(format!(
            "power loss of {} (lost {} of {} unsynced writes, {} torn; {} of {} directory operations)",
            self.nodes[i].name, r.file_ops_lost, r.file_ops_pending, r.torn_writes, r.dir_ops_lost, r.dir_ops_pending
        ));
    }

    /// Every node loses power at once; all restart.
    async fn power_loss_everywhere(&mut self) {
        self.log("power loss of every node; all restart".to_string());
        for i in 0..3 {
            self.kill(i).await;
            self.nodes[i].fs.power_loss();
        }
        self.partitioned = None;
        self.net.heal();
        for i in 0..3 {
            self.restart(i).await;
        }
    }

    /// Node `i`'s disk is full but for a few KB.
    fn fill_disk(&mut self, i: usize) {
        let slack = self.rng.below(FULL_DISK_SLACK_MAX_BYTES);
        let fs = &self.nodes[i].fs;
        fs.set_capacity_bytes(fs.used_bytes() + slack);
        self.log(format!("disk of {} full ({slack} bytes left)", self.nodes[i].name));
        self.full = Some(i);
    }

    /// A few of node `i`'s segment fsyncs fail with EIO.
    fn fail_fsyncs(&mut self, i: usize) {
        let skip = self.rng.below(20);
        self.nodes[i].fs.fail(FaultRule {
            path_contains: "/segments/".into(),
            ops: vec![FsOp::Sync],
            skip,
            times: 1 + self.rng.below(3),
            error: FaultError::Io,
        });
        self.log(format!("segment fsyncs of {} fail (EIO) after {skip} more", self.nodes[i].name));
        self.failing = Some(i);
    }

    /// One bit of a segment or index file of node `i` flips, on the disk and in the
    /// page cache.
    fn flip_bit(&mut self, i: usize) {
        let flipped = self.nodes[i].fs.flip_random_bit(|p| p.extension().is_some_and(|e| e == "seg" || e == "idx"));
        match flipped {
            Some((path, bit)) => self.log(format!("flip bit {bit} of {} on {}", path.display(), self.nodes[i].name)),
            None => self.log(format!("flip a bit on {}: no segment file yet", self.nodes[i].name)),
        }
    }

    /// Undoes one fault: restarts a stopped node, heals the partition, frees the disk,
    /// stops failing fsyncs.
    async fn repair(&mut self) {
        let stopped = self.stopped();
        if let Some(&i) = stopped.first() {
            return self.restart(i).await;
        }
        if let Some(i) = self.partitioned.take() {
            self.log(format!("heal the partition of {}", self.nodes[i].name));
            self.net.heal();
            return;
        }
        if let Some(i) = self.full.take() {
            self.log(format!("disk of {} has room again", self.nodes[i].name));
            self.nodes[i].fs.set_capacity_bytes(eventtermq_storage::sim::DEFAULT_CAPACITY_BYTES);
            return;
        }
        if let Some(i) = self.failing.take() {
            self.log(format!("fsyncs of {} work again", self.nodes[i].name));
            self.nodes[i].fs.clear_faults();
        }
    }

    /// The kubelet's part: a node whose liveness failed for [`LIVENESS_RESTART_AFTER`]
    /// is killed and started again.
    async fn supervise(&mut self) {
        for i in self.running() {
            let failure =
                self.nodes[i].running.as_ref().and_then(|(h, _)| raft_failure(&h.cluster.raft.metrics().borrow()));
            let since = match (failure, self.nodes[i].not_live_since) {
                (None, _) => {
                    self.nodes[i].not_live_since = None;
                    continue;
                }
                (Some(_), None) => {
                    self.nodes[i].not_live_since = Some(Instant::now());
                    continue;
                }
                (Some(_), Some(since)) => since,
            };
            if since.elapsed() >= LIVENESS_RESTART_AFTER {
                self.log(format!("liveness of {} failed for {LIVENESS_RESTART_AFTER:?}: kill", self.nodes[i].name));
                self.kill(i).await;
                self.restart(i).await;
            }
        }
    }

    async fn restart(&mut self, i: usize) {
        if let Err(e) = self.start(i).await {
            // A node that refuses to start (damaged state it must not guess at) is a
            // finding of its own: the run goes on without it.
            let msg = format!("restart of {}: {e}", self.nodes[i].name);
            self.log(msg.clone());
            lock(&self.model).violation(msg);
        } else {
            self.log(format!("restart {}", self.nodes[i].name));
        }
    }

    /// Checks what must hold at any time, on every running node.
    fn check(&mut self) {
        let mut m = lock(&self.model);
        for n in &self.nodes {
            let Some((handle, _)) = &n.running else { continue };
            check_node(&mut m, n.name, &handle.cluster.state);
        }
    }

    async fn wait_for(&self, timeout: Duration, mut f: impl FnMut(&Sim) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if f(self) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// What the first running node's cluster state says about the group and the
    /// topics' segments (for a failing seed's report).
    fn describe_state(&self) -> String {
        let names: BTreeMap<u64, &str> = self.nodes.iter().map(|n| (n.id, n.name)).collect();
        let name = |id: &u64| names.get(id).copied().unwrap_or("?");
        let Some(state) = self.any_state() else { return "no node runs".into() };
        let st = state.read();
        let mut s = String::from("cluster state:");
        if let Some(g) = st.state.group_runtime(NAMESPACE, GROUP) {
            s.push_str(&format!(
                "\n    group on {}, committed offsets {:?}",
                g.node.as_ref().map_or("none", name),
                g.offsets
            ));
        }
        for t in TOPICS {
            for (id, seg) in st.state.topic_segments(NAMESPACE, t) {
                s.push_str(&format!(
                    "\n    {t} segment {id}: generation {}, {}, primary {}, replicas {:?}, done {:?}, next offset {}",
                    seg.generation,
                    if seg.is_open() { "open" } else { "closed" },
                    name(&seg.primary),
                    seg.replicas.iter().map(name).collect::<Vec<_>>(),
                    seg.done.iter().map(name).collect::<Vec<_>>(),
                    seg.next_offset
                ));
            }
        }
        s
    }

    fn any_state(&self) -> Option<SharedState> {
        self.nodes.iter().find_map(|n| n.running.as_ref().map(|(h, _)| h.cluster.state.clone()))
    }
}

fn lock_up(up: &Up) -> MutexGuard<'_, Vec<bool>> {
    up.lock().unwrap_or_else(PoisonError::into_inner)
}

fn hash_of(v: &impl serde::Serialize) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_string(v).unwrap_or_default().hash(&mut h);
    h.finish()
}

/// Raft: the applied state at an index never differs between observations.
/// Offsets: every record below a committed offset was acknowledged.
fn check_node(m: &mut Model, name: &str, state: &SharedState) {
    let applied = state.read();
    if let Some(log_id) = applied.last_applied {
        let key = log_id.index;
        let now = (log_id.to_string(), hash_of(&applied.state), name.to_string());
        match m.applied.get(&key) {
            Some(before) if (&before.0, before.1) != (&now.0, now.1) => {
                let v = format!(
                    "Raft index {key}: {name} applied {} (state {:016x}) where {} applied {} (state {:016x}): a committed entry was lost or changed",
                    now.0, now.1, before.2, before.0, before.1
                );
                m.violation(v);
            }
            Some(_) => {}
            None => {
                m.applied.insert(key, now);
            }
        }
    }
    if let Some(g) = applied.state.group_runtime(NAMESPACE, GROUP) {
        for (&seg, &committed) in &g.offsets {
            let missing = (0..committed).find(|o| !m.acked.contains(&(seg, *o)));
            if let Some(o) = missing {
                let v = format!(
                    "group {GROUP} on {name}: committed offset {committed} of segment {seg} is past record {o}, which was never acknowledged"
                );
                m.violation(v);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The workload
// ---------------------------------------------------------------------------------------

fn pick_up(up: &Up, rng: &mut SimRng) -> Option<usize> {
    let up = lock_up(up);
    let live: Vec<usize> = (0..up.len()).filter(|i| up[*i]).collect();
    (!live.is_empty()).then(|| live[rng.below(live.len() as u64) as usize])
}

/// Publishes batches of 1-4 messages to its topic, each waited for, through a random
/// running node.
async fn publisher(p: u32, client: Arc<dyn Network>, up: Up, model: Shared, mut rng: SimRng, stop: CancellationToken) {
    let mut seq = 0u64;
    while !stop.is_cancelled() {
        let Some(i) = pick_up(&up, &mut rng) else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let n = rng.between(1, 4);
        let ids: Vec<MsgId> = (seq..seq + n).map(|s| (p, s)).collect();
        seq += n;
        let messages =
            ids.iter().map(|id| Message { data: encode(*id).into(), ..Default::default() }).collect::<Vec<_>>();
        let req = PublishRequest {
            namespace: NAMESPACE.into(),
            topic: TOPICS[p as usize].into(),
            messages,
            ..Default::default()
        };
        lock(&model).sent.extend(ids.iter().copied());
        let mut c = MessagingClient::new(client.data_channel(NODES[i]));
        let result = tokio::time::timeout(CALL_TIMEOUT, c.publish(req)).await;
        record_publish(&model, p, &ids, result.map(|r| r.map(|r| r.into_inner())));
        tokio::time::sleep(Duration::from_millis(rng.between(5, 80))).await;
    }
}

type PublishResult = Result<Result<eventtermq_proto::v1::PublishResponse, tonic::Status>, tokio::time::error::Elapsed>;

fn record_publish(model: &Shared, p: u32, ids: &[MsgId], result: PublishResult) {
    let n = ids.len() as u64;
    let mut m = lock(model);
    m.publishes += 1;
    match result {
        Ok(Ok(r)) => {
            let pos = (r.segment_id, r.first_offset);
            m.observe(("confirmed", p, ids[0].1, pos));
            if let Some(last) = m.last_confirmed.get(&p).copied() {
                if pos <= last {
                    let v = format!(
                        "publisher {p}: batch from seq {} confirmed at {pos:?}, before its predecessor's {last:?}",
                        ids[0].1
                    );
                    m.violation(v);
                }
            }
            m.last_confirmed.insert(p, (pos.0, pos.1 + n - 1));
            for (k, id) in ids.iter().enumerate() {
                let at = (pos.0, pos.1 + k as u64);
                m.confirmed.insert(*id, at);
                if let Some(other) = m.confirmed_at.insert(at, *id) {
                    m.violation(format!("{at:?} confirmed for message {id:?} and for message {other:?}"));
                }
            }
        }
        Ok(Err(status)) => {
            m.observe(("refused", p, ids[0].1, status.code() as i32));
            m.unknown.extend(ids.iter().copied());
        }
        Err(_) => {
            m.observe(("timed out", p, ids[0].1));
            m.unknown.extend(ids.iter().copied());
        }
    }
}

/// The one subscriber of the group: through a random running node, a few messages at
/// a time (`max_messages`), acknowledging most, nacking some and leaving some
/// unacknowledged (they come again once the stream is gone). Once `draining` (every
/// fault healed), it acknowledges everything in larger subscriptions, so that the
/// end check measures what the cluster delivers, not how slowly this client takes it.
struct Subscriber {
    client: Arc<dyn Network>,
    up: Up,
    model: Shared,
    rng: SimRng,
    draining: Arc<AtomicBool>,
}

/// How a subscription ended.
enum Ended {
    /// The subscribe call failed.
    NotStarted,
    /// This client ended it (or the server did, as asked).
    Done,
    /// The stream broke or went silent: what it had in flight comes again.
    Broke,
}

impl Subscriber {
    async fn run(mut self, stop: CancellationToken) {
        while !stop.is_cancelled() {
            let Some(i) = pick_up(&self.up, &mut self.rng) else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let pause = match self.subscription(i).await {
                Ended::NotStarted => self.rng.between(20, 200),
                Ended::Done => self.rng.between(1, 50),
                Ended::Broke => {
                    let mut m = lock(&self.model);
                    m.last_break = Some(Instant::now());
                    m.observe("stream broke");
                    self.rng.between(1, 50)
                }
            };
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
    }

    async fn subscription(&mut self, node: usize) -> Ended {
        let draining = self.draining.load(Ordering::Relaxed);
        let mut c = MessagingClient::new(self.client.data_channel(NODES[node]));
        let max_messages = if draining { 500 } else { self.rng.between(1, 40) };
        let req = SubscribeRequest {
            namespace: NAMESPACE.into(),
            consumer_group: GROUP.into(),
            size: if draining { 64 } else { self.rng.between(1, 20) as u32 },
            auto_ack: false,
            do_not_block: false,
            max_messages,
            exclusive: false,
        };
        let mut stream = match tokio::time::timeout(CALL_TIMEOUT, c.subscribe(req)).await {
            Ok(Ok(s)) => s.into_inner(),
            _ => return Ended::NotStarted,
        };
        let (mut got, mut held) = (0, 0);
        loop {
            if got == max_messages && held == 0 {
                // Everything acknowledged: the server ends the stream.
                return match tokio::time::timeout(CALL_TIMEOUT, stream.message()).await {
                    Ok(Ok(None)) => Ended::Done,
                    _ => Ended::Broke,
                };
            }
            if got == max_messages {
                // Leave with unacknowledged messages: they come again.
                return Ended::Done;
            }
            let m = match tokio::time::timeout(Duration::from_secs(2), stream.message()).await {
                Ok(Ok(Some(m))) => m,
                Ok(Ok(None)) => return Ended::Done,
                // A broken stream, or one we give up on while the server may be sending.
                Ok(Err(_)) | Err(_) => return Ended::Broke,
            };
            got += 1;
            let pos = (m.segment_id, m.offset);
            record_delivery(&self.model, &m.topic, pos, m.message.as_ref().and_then(|msg| decode(&msg.data)));
            if !self.settle(&mut c, pos, draining).await {
                held += 1;
            }
        }
    }

    /// Acknowledges, nacks or keeps the delivery at `pos`; `false` when it stays
    /// unacknowledged on this stream.
    async fn settle(
        &mut self,
        c: &mut MessagingClient<tonic::transport::Channel>,
        pos: Position,
        draining: bool,
    ) -> bool {
        let deliveries = vec![Delivery { segment_id: pos.0, offset: pos.1 }];
        let (namespace, consumer_group) = (NAMESPACE.to_string(), GROUP.to_string());
        match if draining { 0 } else { self.rng.below(100) } {
            0..=84 => {
                lock(&self.model).acked.insert(pos);
                let req = AckRequest { namespace, consumer_group, deliveries };
                matches!(tokio::time::timeout(CALL_TIMEOUT, c.ack(req)).await, Ok(Ok(_)))
            }
            85..=92 => {
                let req = NackRequest { namespace, consumer_group, deliveries };
                matches!(tokio::time::timeout(CALL_TIMEOUT, c.nack(req)).await, Ok(Ok(_)));
                false
            }
            _ => false,
        }
    }
}

fn record_delivery(model: &Shared, topic: &str, pos: Position, id: Option<MsgId>) {
    let mut m = lock(model);
    m.deliveries += 1;
    m.observe(("delivered", topic, pos, id));
    let Some(id) = id else {
        m.violation(format!("a delivery at {pos:?} of {topic} holds no message of this simulation"));
        return;
    };
    if !m.sent.contains(&id) {
        m.violation(format!("message {id:?} delivered at {pos:?} was never published"));
    }
    if let Some(stored) = m.confirmed_at.get(&pos).copied().filter(|stored| *stored != id) {
        m.violation(format!("{pos:?} delivered message {id:?}, but message {stored:?} was confirmed there"));
    }
    let first_of_record = m.seen.insert(pos);
    m.delivered.entry(id).or_insert(pos);
    if first_of_record {
        let now = Instant::now();
        match m.furthest.get(topic).copied() {
            Some((furthest, at)) if pos < furthest => {
                let excused = m.last_break.is_some_and(|b| b + REDELIVERY_WINDOW >= at);
                if !excused {
                    let v = format!(
                        "{topic}: record {pos:?} (message {id:?}) delivered for the first time after record {furthest:?} of the same shard"
                    );
                    m.violation(v);
                }
            }
            _ => {
                m.furthest.insert(topic.to_string(), (pos, now));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// A run
// ---------------------------------------------------------------------------------------

impl Sim {
    async fn run(mut self) -> Outcome {
        if let Err(e) = self.form().await {
            lock(&self.model).violation(e);
            return self.outcome();
        }
        self.log("cluster formed; topics and group created".into());

        let (client, _listeners) = self.net.attach(CLIENT);
        let stop = CancellationToken::new();
        let mut workers = Vec::new();
        for p in 0..TOPICS.len() as u32 {
            let task = publisher(p, client.clone(), self.up.clone(), self.model.clone(), self.rng.fork(), stop.clone());
            workers.push(tokio::spawn(task));
        }
        let sub_stop = CancellationToken::new();
        let draining = Arc::new(AtomicBool::new(false));
        let sub = Subscriber {
            client: client.clone(),
            up: self.up.clone(),
            model: self.model.clone(),
            rng: self.rng.fork(),
            draining: draining.clone(),
        };
        let sub = tokio::spawn(sub.run(sub_stop.clone()));

        for _ in 0..STEPS {
            self.step().await;
            let ms = self.rng.between(DWELL_MIN_MS, DWELL_MAX_MS);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            self.check();
            self.supervise().await;
        }

        self.heal_everything().await;
        stop.cancel();
        for w in workers {
            let _ = w.await;
        }
        draining.store(true, Ordering::Relaxed);
        self.drain().await;
        sub_stop.cancel();
        let _ = sub.await;
        self.check();
        for i in self.running() {
            if let Some((handle, shutdown)) = self.nodes[i].running.take() {
                shutdown.cancel();
                handle.wait().await;
            }
        }
        self.outcome()
    }

    /// Starts the three nodes, waits until all are voters, creates the topics and group.
    async fn form(&mut self) -> Result<(), String> {
        for i in 0..3 {
            self.start(i).await?;
        }
        let formed = self
            .wait_for(Duration::from_secs(30), |s| {
                s.nodes.iter().all(|n| {
                    n.running.as_ref().is_some_and(|(h, _)| {
                        h.cluster.raft.metrics().borrow().membership_config.membership().voter_ids().count() == 3
                    })
                })
            })
            .await;
        if !formed {
            return Err("the cluster did not form".into());
        }
        self.setup().await.map_err(|e| format!("setup: {e}"))
    }

    /// Ends every fault: partitions, full disks, failing fsyncs, stopped nodes.
    async fn heal_everything(&mut self) {
        self.log("heal everything".into());
        self.partitioned = None;
        self.net.heal();
        for n in &self.nodes {
            n.fs.clear_faults();
            n.fs.set_capacity_bytes(eventtermq_storage::sim::DEFAULT_CAPACITY_BYTES);
        }
        self.full = None;
        self.failing = None;
        for i in self.stopped() {
            self.restart(i).await;
        }
    }

    /// Waits until every confirmed message was delivered, or reports those that were not.
    async fn drain(&mut self) {
        let deadline = Instant::now() + DRAIN_MAX;
        let all_delivered = |s: &Sim| {
            let m = lock(&s.model);
            m.confirmed.keys().all(|id| m.delivered.contains_key(id))
        };
        while !all_delivered(self) && Instant::now() < deadline {
            self.supervise().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let drained = all_delivered(self);
        if !drained {
            let mut m = lock(&self.model);
            let missing: Vec<MsgId> = m.confirmed.keys().filter(|id| !m.delivered.contains_key(id)).copied().collect();
            let v = format!(
                "{} confirmed messages never delivered (within {DRAIN_MAX:?} of healing), e.g. {:?} stored at {:?}",
                missing.len(),
                &missing[..missing.len().min(5)],
                missing.iter().take(5).map(|id| m.confirmed[id]).collect::<Vec<_>>()
            );
            m.violation(v);
            drop(m);
            let state = self.describe_state();
            self.log(state);
        }
        self.log(format!("drained: {drained}"));
    }

    async fn setup(&mut self) -> Result<(), String> {
        let (handle, _) = self.nodes[0].running.as_ref().ok_or("no node")?;
        let cluster = handle.cluster.clone();
        for t in TOPICS {
            let spec = TopicSpec {
                shards: 1,
                replication_factor: 3,
                retention_ms: 0,
                default_exchange_type: ExchangeType::Fanout,
                segment_size_max_bytes: 0,
                min_insync_replicas: 0,
                ..Default::default()
            };
            let cmd = Command::CreateTopic { namespace: NAMESPACE.into(), name: t.into(), spec };
            cluster.write(cmd).await.map_err(|e| e.to_string())?;
        }
        let spec = ConsumerGroupSpec {
            bindings: TOPICS.iter().map(|t| BindingSpec::fanout(*t)).collect(),
            size: 64,
            since_unix_ms: 0,
            ..Default::default()
        };
        let cmd = Command::CreateConsumerGroup { namespace: NAMESPACE.into(), name: GROUP.into(), spec };
        cluster.write(cmd).await.map_err(|e| e.to_string())?;
        let ready = self
            .wait_for(Duration::from_secs(20), |s| {
                s.any_state().is_some_and(|st| {
                    let st = st.read();
                    TOPICS.iter().all(|t| st.state.topic_segments(NAMESPACE, t).any(|(_, seg)| seg.is_open()))
                })
            })
            .await;
        if ready {
            Ok(())
        } else {
            Err("no open segment in time".into())
        }
    }

    fn outcome(self) -> Outcome {
        let m = lock(&self.model);
        Outcome {
            seed: self.seed,
            schedule: self.schedule.clone(),
            violations: m.violations.clone(),
            digest: m.digest.finish(),
            publishes: m.publishes,
            confirmed: m.confirmed.len(),
            deliveries: m.deliveries,
        }
    }
}

/// Panics on simulation threads (`sim-<seed>`), by thread name: a task of a node that
/// panics (a failed assertion in openraft, say) ends without stopping the run, so the
/// run reports it.
static PANICS: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

fn record_panics() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current().name().unwrap_or_default().to_string();
            if thread.starts_with("sim-") {
                let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
                let what = info
                    .payload()
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                PANICS.lock().unwrap_or_else(PoisonError::into_inner).push((thread, format!("{what}{at}")));
            }
            default(info);
        }));
    });
}

fn panics_of(thread: &str) -> Vec<String> {
    let mut all = PANICS.lock().unwrap_or_else(PoisonError::into_inner);
    let (mine, others): (Vec<_>, Vec<_>) = all.drain(..).partition(|(t, _)| t == thread);
    *all = others;
    mine.into_iter().map(|(_, what)| format!("a task panicked: {what}")).collect()
}

/// Runs one seed on a fresh thread: a current-thread runtime with tokio's clock paused,
/// blocking IO inline.
fn run_seed(seed: u64, verbose: bool) -> Outcome {
    record_panics();
    let mut outcome = run_seed_thread(seed, verbose);
    for p in panics_of(&format!("sim-{seed}")) {
        if outcome.violations.len() < 20 {
            outcome.violations.push(p);
        }
    }
    outcome
}

fn run_seed_thread(seed: u64, verbose: bool) -> Outcome {
    let thread = std::thread::Builder::new().name(format!("sim-{seed}")).spawn(move || {
        clock::run_blocking_io_inline(true);
        let rt =
            tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().expect("a runtime");
        // Sim::new inside the runtime: it reads the paused clock, not the real one.
        rt.block_on(async move { Sim::new(seed, verbose).run().await })
    });
    match thread.expect("a thread").join() {
        Ok(outcome) => outcome,
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Outcome {
                seed,
                schedule: Vec::new(),
                violations: vec![format!("panicked: {what}")],
                digest: 0,
                publishes: 0,
                confirmed: 0,
                deliveries: 0,
            }
        }
    }
}

fn init_logs() {
    if let Ok(filter) = std::env::var("EVENTTERMQ_SIM_LOG") {
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(value.parse().unwrap_or_else(|_| panic!("{name}={value:?}: not a number")))
}

/// Runs `seeds` one after another; every failing one is reported with its schedule
/// and the command that replays it.
/// Runs `seeds`, one per CPU at a time (each seed is a thread of its own with its own
/// runtime and clock, so they do not meet).
fn run_many(seeds: impl Iterator<Item = u64> + Send, verbose: bool) {
    init_logs();
    let seeds = Mutex::new(seeds);
    let failed = Mutex::new(Vec::new());
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let Some(seed) = seeds.lock().unwrap_or_else(PoisonError::into_inner).next() else { return };
                let started = std::time::Instant::now();
                let outcome = run_seed(seed, verbose);
                eprintln!(
                    "seed {seed}: {} ({} publishes, {} messages confirmed, {} deliveries) in {:.1?}",
                    if outcome.violations.is_empty() { "ok" } else { "FAILED" },
                    outcome.publishes,
                    outcome.confirmed,
                    outcome.deliveries,
                    started.elapsed()
                );
                if verbose || !outcome.violations.is_empty() {
                    eprintln!("{}", outcome.report());
                }
                if !outcome.violations.is_empty() {
                    failed.lock().unwrap_or_else(PoisonError::into_inner).push(seed);
                }
            });
        }
    });
    let mut failed = failed.into_inner().unwrap_or_else(PoisonError::into_inner);
    failed.sort_unstable();
    assert!(failed.is_empty(), "failing seeds: {failed:?}");
}

/// `EVENTTERMQ_SIM_SEED=n`: that seed alone, printing its schedule as it goes.
/// Otherwise `EVENTTERMQ_SIM_SEEDS` seeds (default [`CI_SEEDS_COUNT`]) from
/// `EVENTTERMQ_SIM_SEED_START` (default 1).
#[test]
fn seeds() {
    if let Some(seed) = env_u64("EVENTTERMQ_SIM_SEED") {
        return run_many(std::iter::once(seed), true);
    }
    let start = env_u64("EVENTTERMQ_SIM_SEED_START").unwrap_or(1);
    let count = env_u64("EVENTTERMQ_SIM_SEEDS").unwrap_or(CI_SEEDS_COUNT);
    run_many(start..start.saturating_add(count), false);
}

/// A seed gives the same run twice: same schedule, same observations.
#[test]
fn a_seed_replays_exactly() {
    let a = run_seed(3, false);
    let b = run_seed(3, false);
    assert_eq!(a.schedule, b.schedule);
    assert_eq!(a.digest, b.digest, "{}\n---\n{}", a.report(), b.report());
}
