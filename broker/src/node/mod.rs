//! A broker node: wires storage, Raft, gossip and the gRPC server together.
//!
//! Like mini-redis's `server::run`, [`start`] takes its listeners and a shutdown
//! token from the caller, so tests run whole clusters in one process (over
//! [`crate::transport::mem`]) and the binary runs one node over real sockets.

pub mod format;
pub mod id;
mod quiesce;
mod reconcile;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use openraft::BasicNode;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::api::Services;
use crate::cluster::Cluster;
use crate::cluster_state::{LogStore, NodeState, Raft, SharedState, StateMachineStore};
use crate::config::NodeConfig;
use crate::consumer_groups::Groups;
use crate::membership::Membership;
use crate::peers::{PeerError, Peers};
use crate::replication::Segments;
use crate::transport::{Incoming, Listeners, Network};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{0}")]
    Config(String),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("storage error: {0}")]
    Storage(String),
    #[error("raft error: {0}")]
    Raft(String),
    /// The Raft log, vote or snapshot cannot be read back. The node does not start: a
    /// node that forgot its vote could vote twice in a term, and one that lost
    /// committed entries could help elect a leader without them.
    #[error(
        "cannot open this node's Raft state in {dir}: {detail}. The node does not start rather than \
         forget its vote or committed entries. Way back: restore {dir} from a backup if there is one; \
         otherwise move the whole data directory aside and start this node again with --join naming a \
         running member (never without --join, which would found a new cluster): it joins as a new member \
         with a new id and gets the cluster state and its share of the segments from the others, and the \
         leader removes the old id after --dead-node-removal-ms"
    )]
    RaftState { dir: String, detail: String },
    /// Another process (or a node of this one that has not stopped) uses the directory.
    #[error("--dir: {0}")]
    DirLocked(eventtermq_storage::durable::LockError),
    /// The data directory (or a segment file in it) has a format this binary does not
    /// read: refused before anything was changed ([`format`]).
    #[error("--dir: {0}")]
    DataFormat(format::Refusal),
    /// A segment file written in a newer segment format than this binary reads (copied
    /// in by hand, or a directory whose marker was removed): never set aside as damage.
    #[error(
        "--dir: {0}; refusing to start rather than set it aside as damaged (downgrade refused). Start this node \
         with the release that wrote it or a later one"
    )]
    NewerSegmentFormat(String),
}

impl NodeError {
    /// Whether this is a refusal of a format the binary does not read, which the broker
    /// reports with exit status [`format::REFUSED_EXIT_STATUS`].
    pub fn is_format_refusal(&self) -> bool {
        matches!(self, NodeError::DataFormat(_) | NodeError::NewerSegmentFormat(_))
    }
}

/// A running node. Dropping it does not stop it: cancel the shutdown token (graceful)
/// or call [`NodeHandle::kill`] (abrupt, for tests), then await [`NodeHandle::wait`].
pub struct NodeHandle {
    pub id: u64,
    pub cluster: Cluster,
    pub segments: Segments,
    pub membership: Membership,
    /// What `/metrics` reads (see [`crate::api::metrics`]).
    pub observer: crate::api::metrics::Observer,
    stop: CancellationToken,
    done: JoinHandle<()>,
}

impl NodeHandle {
    /// Stops everything at once without leaving gracefully, like `kill -9` (the
    /// process's disk writes that were fsynced stay; nothing else is flushed).
    pub async fn kill(self) {
        self.stop.cancel();
        let _ = self.cluster.raft.shutdown().await;
        let _ = self.done.await;
    }

    /// Waits until the node has stopped.
    pub async fn wait(self) {
        let _ = self.done.await;
    }
}

/// Starts a node. Returns once storage is open and every task runs; joining and
/// bootstrapping go on in the background.
pub async fn start(
    config: NodeConfig,
    network: Arc<dyn Network>,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<NodeHandle, NodeError> {
    let fs = &*config.fs;
    // Durably (each new level's entry fsynced in its parent): otherwise a power loss
    // soon after the first start could take the whole directory, Raft log and vote
    // included, with it (found by the simulation, broker/tests/simulation.rs).
    eventtermq_storage::durable::create_dir_durable(fs, &config.dir)
        .map_err(|e| NodeError::Config(format!("--dir: cannot create {}: {e}", config.dir.display())))?;
    // Before anything in the directory is read or written: two nodes on one directory
    // would share an id and a Raft log and corrupt both. Held until the node stopped.
    let dir_lock = eventtermq_storage::durable::lock_dir(fs, &config.dir).map_err(NodeError::DirLocked)?;
    // Before anything else in the directory is read: a directory of a format this binary
    // does not read is refused untouched, never misread (and partly set aside as damage).
    format::check_and_mark(fs, &config.dir)?;
    let id = id::load_or_create(fs, &config.dir, config.id)?;
    let peers = Peers::with_access(network, config.peers.clone(), config.internal_access.clone());
    let (raft, shared) = start_raft(&config, id, &peers).await?;

    // Everything below stops on `stop`; `shutdown` first runs the graceful sequence.
    let stop = CancellationToken::new();
    let membership = Membership::start(
        id,
        config.advertise_addr.clone(),
        config.membership.clone(),
        &config.clock,
        peers.clone(),
        listeners.datagrams,
        stop.clone(),
    );
    let metrics = crate::metrics::Metrics::with_tls_counter(
        config.metrics_label_values_max,
        listeners.tls_handshakes_failed.clone(),
    );
    let timeout = Duration::from_millis(config.request_timeout_ms);
    // Request ids must differ across restarts; a simulation's replay must not.
    let first_nonce =
        config.membership.rng_seed.map(|s| s ^ config.clock.now_unix_us().rotate_left(23)).unwrap_or_else(rand::random);
    let cluster = Cluster::new(id, raft.clone(), shared, peers.clone(), timeout, first_nonce, metrics);
    let store = open_segment_store(&config)?;
    let disk = open_disk(&config, id).map_err(|e| {
        NodeError::Config(format!("--dir: cannot read the free space of {}: {e}", config.dir.display()))
    })?;
    let segments =
        Segments::new(store, cluster.clone(), peers.clone(), config.clock.clone(), config.data.clone(), disk.clone());
    let groups = Groups::new(segments.clone());
    let auth_settings =
        crate::auth::AuthSettings { awaiting_bootstrap_admin: config.bootstrap_admin.is_some(), ..config.auth.clone() };
    let auth = crate::auth::Auth::new(cluster.state.clone(), cluster.metrics().clone(), &auth_settings);

    let services = Services {
        cluster: cluster.clone(),
        membership: membership.clone(),
        segments: segments.clone(),
        groups: groups.clone(),
        peers: peers.clone(),
        auth,
        budget: crate::budget::PublishBudget::new(config.data.publish_in_flight_max_bytes),
    };
    let readiness = crate::api::Readiness { stopping: shutdown.clone(), caught_up: CancellationToken::new() };
    let observer = crate::api::metrics::Observer::new(&services, readiness.clone());
    tokio::spawn(catch_up(segments.clone(), readiness.caught_up.clone(), stop.clone()));
    let tasks = Tasks::spawn(&config, services, (listeners.incoming, listeners.amqp), disk, &stop, &readiness);
    tracing::info!(node_id = id, listen = %config.listen_addr, advertise = %config.advertise_addr,
        dir = %config.dir.display(), internal_access = ?config.internal_access, "node started");

    let parts = Parts {
        cluster: cluster.clone(),
        membership: membership.clone(),
        segments: segments.clone(),
        groups,
        dir_lock,
    };
    let done = tokio::spawn(run_until_stopped(parts, tasks, shutdown, stop.clone()));
    Ok(NodeHandle { id, cluster, segments, membership, observer, stop, done })
}

/// Opens the Raft log and state machine under `<dir>/raft` and starts Raft.
async fn start_raft(config: &NodeConfig, id: u64, peers: &Peers) -> Result<(Raft, SharedState), NodeError> {
    let raft_dir = config.dir.join("raft");
    let damaged = |e: crate::cluster_state::raft::StorageError| NodeError::RaftState {
        dir: raft_dir.display().to_string(),
        detail: e.to_string(),
    };
    let log_store = LogStore::open_in(config.fs.clone(), &raft_dir.join("log")).await.map_err(damaged)?;
    let (sm_store, shared) =
        StateMachineStore::open_in(config.fs.clone(), &raft_dir.join("sm")).await.map_err(damaged)?;
    let raft_config =
        Arc::new(config.raft.to_openraft().map_err(|e| NodeError::Config(format!("raft settings: {e}")))?);
    let raft = Raft::new(id, raft_config, peers.raft_network(), log_store, sm_store)
        .await
        .map_err(|e| NodeError::Raft(e.to_string()))?;
    Ok((raft, shared))
}

/// Opens `<dir>/segments`; damaged segments are set aside (and fetched again later).
fn open_segment_store(config: &NodeConfig) -> Result<eventtermq_storage::Store, NodeError> {
    let storage_config = eventtermq_storage::Config {
        preallocate_bytes: config.data.segment_preallocate_bytes,
        open_segments_max: config.data.open_segments_max,
        fs: config.fs.clone(),
        ..eventtermq_storage::Config::default()
    };
    let store = eventtermq_storage::Store::open(&config.dir.join("segments"), storage_config).map_err(|e| match e {
        e @ eventtermq_storage::StorageError::NewerFormat { .. } => NodeError::NewerSegmentFormat(e.to_string()),
        e => NodeError::Storage(e.to_string()),
    })?;
    for q in store.quarantined() {
        // The keeper fetches a good copy of whatever the cluster state places here.
        tracing::warn!(segment_id = q.id, files = ?q.files, reason = %q.reason,
            "a damaged segment was quarantined at startup; a copy this node should hold is fetched again");
    }
    Ok(store)
}

/// The free-space watermark of `dir`, read from the node's filesystem.
fn open_disk(config: &NodeConfig, id: u64) -> std::io::Result<crate::disk::Disk> {
    let (fs, dir) = (config.fs.clone(), config.dir.clone());
    let source =
        move || fs.space(&dir).map(|s| crate::disk::Space { free_bytes: s.free_bytes, total_bytes: s.total_bytes });
    crate::disk::Disk::with_source(id, &config.dir, config.data.disk_watermark, Box::new(source))
}

/// The node's parts the shutdown sequence needs.
struct Parts {
    cluster: Cluster,
    membership: Membership,
    segments: Segments,
    groups: Groups,
    /// Released when the shutdown task ends, after Raft and every task stopped, so a
    /// node started next on the same directory (a restart in a test) finds it free.
    dir_lock: eventtermq_storage::durable::DirLock,
}

/// The node's background tasks.
struct Tasks {
    /// The gRPC server; taken when it is drained.
    server: Option<JoinHandle<()>>,
    /// Stops the gRPC server alone (a graceful stop drains it first); a child of
    /// `stop`.
    server_stop: CancellationToken,
    keeper: JoinHandle<()>,
    placement: JoinHandle<()>,
    group_runner: JoinHandle<()>,
    bootstrap: JoinHandle<()>,
    reconciler: JoinHandle<()>,
    disk_watch: JoinHandle<()>,
    quiesce: JoinHandle<()>,
    amqp: Option<JoinHandle<()>>,
}

impl Tasks {
    /// Starts the gRPC server and every loop of the node; all stop on `stop`.
    /// `readiness`: when the node is ready (see [`crate::api::Readiness`]).
    fn spawn(
        config: &NodeConfig,
        services: Services,
        (incoming, amqp): (Incoming, Option<Incoming>),
        disk: crate::disk::Disk,
        stop: &CancellationToken,
        readiness: &crate::api::Readiness,
    ) -> Tasks {
        let Services { cluster, membership, segments, groups, peers, auth, budget } = &services;
        let amqp = amqp.map(|incoming| {
            let backend = crate::amqp::Backend {
                auth: auth.clone(),
                cluster: cluster.clone(),
                segments: segments.clone(),
                groups: groups.clone(),
                peers: peers.clone(),
                consumers: Default::default(),
                budget: budget.clone(),
                run_id: rand::random(),
            };
            tokio::spawn(crate::amqp::serve(backend, incoming, config.amqp.clone(), stop.clone()))
        });
        let reconcile_interval = Duration::from_millis(config.reconcile_interval_ms);
        let server_stop = stop.child_token();
        tokio::spawn(users_at_start(config.bootstrap_admin.clone(), cluster.clone(), auth.clone(), stop.clone()));
        Tasks {
            keeper: tokio::spawn(crate::replication::keeper::run(segments.clone(), stop.clone())),
            placement: tokio::spawn(crate::replication::placement::run(
                segments.clone(),
                membership.clone(),
                reconcile_interval,
                stop.clone(),
            )),
            group_runner: tokio::spawn(groups.clone().run(stop.clone())),
            bootstrap: tokio::spawn(bootstrap(
                config.clone(),
                cluster.clone(),
                membership.clone(),
                peers.clone(),
                stop.clone(),
            )),
            reconciler: tokio::spawn(reconcile::run(config.clone(), cluster.clone(), membership.clone(), stop.clone())),
            disk_watch: tokio::spawn(crate::disk::watch(disk, cluster.clone(), stop.clone())),
            quiesce: tokio::spawn(quiesce::run(cluster.clone(), membership.clone(), config.raft.clone(), stop.clone())),
            server: Some(crate::api::serve(
                services,
                config.internal_access.clone(),
                incoming,
                server_stop.clone(),
                readiness.clone(),
            )),
            server_stop,
            amqp,
        }
    }
}

impl Tasks {
    /// Stops the gRPC server and lets it finish the calls in flight, for at most
    /// [`SERVER_DRAIN_MAX`].
    async fn drain_server(&mut self) {
        self.server_stop.cancel();
        let Some(server) = self.server.take() else { return };
        let abort = server.abort_handle();
        if tokio::time::timeout(SERVER_DRAIN_MAX, server).await.is_err() {
            abort.abort();
        }
    }
}

/// Pause between attempts of [`users_at_start`] while the cluster cannot answer.
const USERS_AT_START_RETRY: Duration = Duration::from_secs(1);

/// Once the node can read the cluster state: with no user in it, creates the bootstrap
/// administrator of `--admin-user` (only while there is still none: two nodes started
/// with it create one), or says once that client access is open until a user exists.
async fn users_at_start(
    admin: Option<crate::config::BootstrapAdmin>,
    cluster: Cluster,
    auth: crate::auth::Auth,
    stop: CancellationToken,
) {
    let work = async {
        let users = loop {
            let users = cluster.read(true).await.map(|applied| applied.state.users.len());
            match users {
                Ok(n) => break n,
                Err(_) => tokio::time::sleep(USERS_AT_START_RETRY).await,
            }
        };
        if users > 0 {
            tracing::info!(users, "client access requires authentication (the cluster has users)");
            return;
        }
        let Some(admin) = admin else {
            tracing::warn!(
                "client access is OPEN: the cluster has no users, so every client may do everything until one \
                 exists (start a node with --admin-user and --admin-password-file, or run create-user)"
            );
            return;
        };
        let cmd = crate::cluster_state::Command::CreateUser {
            name: admin.name.clone(),
            password_hash: admin.password_hash.clone(),
            admin: true,
            only_if_no_users: true,
        };
        loop {
            match cluster.write(cmd.clone()).await {
                Ok(_) => {
                    tracing::info!(user = %admin.name, "created the bootstrap administrator (--admin-user)");
                    return;
                }
                Err(e) if e.code == crate::error::ErrorCode::UserAlreadyExists => {
                    tracing::info!(user = %admin.name, reason = %e, "--admin-user not created: the cluster has users");
                    return;
                }
                Err(e) if e.retryable() || e.code.outcome_unknown() => {
                    tracing::debug!(error = %e, "bootstrap administrator not written yet; retrying");
                    tokio::time::sleep(USERS_AT_START_RETRY).await;
                }
                Err(e) => {
                    tracing::error!(user = %admin.name, error = %e, "cannot create the bootstrap administrator");
                    return;
                }
            }
        }
    };
    tokio::select! {
        biased;
        _ = stop.cancelled() => {}
        _ = work => auth.bootstrap_admin_settled(),
    }
}

/// Waits for `shutdown` (graceful: gossip and the cluster state hear this node LEFT,
/// groups commit, primaries close their segments, other copies of the open segments
/// this node replicates catch up, leadership is handed over, the gRPC server drains) or `stop` (abrupt), then
/// stops Raft and every task.
async fn run_until_stopped(parts: Parts, mut tasks: Tasks, shutdown: CancellationToken, stop: CancellationToken) {
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => {
            tracing::info!("shutting down gracefully");
            // A stopping node never campaigns from here on (it still votes). Otherwise,
            // once it handed leadership over, a leader that can no longer reach it (a
            // terminating pod's DNS name goes first) leaves its election timer to fire:
            // it wins, and stops as the leader, and the cluster waits out an election
            // (seen in e2e rolling upgrades: a 2.2 s stall as the last pod stopped).
            parts.cluster.raft.runtime_config().elect(false);
            // Gossip and the cluster state hear first that this node is leaving, so
            // the successors of the segments it closes below (and whatever else is
            // placed meanwhile) go to other nodes, not to this one.
            parts.membership.leave().await;
            if tokio::time::timeout(MARK_LEFT_MAX, mark_left(&parts.cluster)).await.is_err() {
                tracing::warn!("could not record this node LEFT in the cluster state in time");
            }
            // Groups commit their offsets and primaries close their segments while Raft
            // still has this node; bounded, as a quorum may be gone.
            let data = async {
                tasks.group_runner.abort();
                parts.groups.stop_all().await;
                parts.segments.close_primaries().await;
            };
            if tokio::time::timeout(DATA_SHUTDOWN_MAX, data).await.is_err() {
                tracing::warn!("consumer groups and segments did not stop in time");
            }
            // This node's copies of other primaries' open segments keep confirming until
            // enough other copies caught up (a rolling restart's previous node).
            let wait = Duration::from_millis(parts.segments.settings().shutdown_copies_wait_ms);
            if !wait.is_zero() {
                crate::replication::replica::wait_for_other_copies(&parts.segments, wait).await;
            }
            hand_over_leadership(&parts.cluster).await;
            // Clients next: the gRPC server takes no more requests (HTTP/2 GOAWAY: a
            // client goes to another node at once) and answers those it took while
            // Raft and the data path still serve them, instead of leaving them to
            // their deadlines.
            tasks.drain_server().await;
            stop.cancel();
        }
        _ = stop.cancelled() => {}
    }
    // Whatever of the data path still runs (all of it after a kill) ends here, before
    // Raft, as at a process's death.
    tasks.group_runner.abort();
    parts.segments.stop_tasks();
    let _ = parts.cluster.raft.shutdown().await;
    // The background loops may sit in a request that can no longer succeed (Raft is
    // down): stop them rather than wait out their timeouts.
    tasks.bootstrap.abort();
    tasks.reconciler.abort();
    tasks.keeper.abort();
    tasks.placement.abort();
    tasks.disk_watch.abort();
    tasks.quiesce.abort();
    if let Some(amqp) = &tasks.amqp {
        amqp.abort();
    }
    tasks.drain_server().await;
    drop(parts.dir_lock);
    tracing::info!("node stopped");
}

/// Marks the node caught up after its start (readiness), once
/// [`crate::replication::replica::catch_up_at_start`] returned, bounded by
/// `--ready-catch-up-max-ms` (0: at once).
async fn catch_up(segments: Segments, caught_up: CancellationToken, stop: CancellationToken) {
    let max = Duration::from_millis(segments.settings().ready_catch_up_max_ms);
    if !max.is_zero() {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = crate::replication::replica::catch_up_at_start(&segments, max) => {}
        }
    }
    caught_up.cancel();
}

/// Forms a new cluster or joins an existing one, as the flags ask.
async fn bootstrap(
    config: NodeConfig,
    cluster: Cluster,
    membership: Membership,
    peers: Peers,
    stop: CancellationToken,
) {
    let seeds: Vec<String> = config.join.iter().filter(|s| **s != config.advertise_addr).cloned().collect();
    if cluster.raft.is_initialized().await.unwrap_or(true) {
        return rejoin(&cluster, &membership, seeds).await;
    }
    let expect = config.bootstrap_expect.unwrap_or(if seeds.is_empty() { 1 } else { 0 });
    if expect == 1 {
        tracing::info!("no state and nothing to join: bootstrapping a single-node cluster");
        initialize(&cluster, BTreeMap::from([(cluster.id, BasicNode::new(config.advertise_addr.clone()))])).await;
        if let Err(e) = membership.join(seeds).await {
            tracing::warn!(error = %e, "joining gossip failed");
        }
        return;
    }
    if let Err(e) = membership.join(seeds).await {
        tracing::warn!(error = %e, "joining gossip failed");
        return;
    }
    if expect == 0 {
        tracing::info!("joined gossip; waiting for the leader to add this node");
        return;
    }
    let retry = Duration::from_millis(config.membership.join_retry_ms.max(1));
    bootstrap_when_met(&cluster, &membership, &peers, expect, retry, &stop).await;
}

/// A node with state never bootstraps again; it only finds its peers: the `--join`
/// seeds and every member Raft remembers, so a restarted first node (started without
/// `--join`) is seen ALIVE again at once instead of waiting for its peers to probe it.
async fn rejoin(cluster: &Cluster, membership: &Membership, mut seeds: Vec<String>) {
    tracing::info!("existing cluster state found; rejoining");
    let known = cluster.raft.metrics().borrow().membership_config.membership().clone();
    for (id, node) in known.nodes() {
        if *id != cluster.id && !seeds.contains(&node.addr) {
            seeds.push(node.addr.clone());
        }
    }
    if let Err(e) = membership.join(seeds).await {
        tracing::warn!(error = %e, "joining gossip failed");
    }
}

/// Waits until `expect` members have met over gossip; then the one with the smallest
/// id initializes Raft with all of them as voters (the others are brought in by its
/// first heartbeats), unless one of them already belongs to a cluster.
async fn bootstrap_when_met(
    cluster: &Cluster,
    membership: &Membership,
    peers: &Peers,
    expect: usize,
    retry: Duration,
    stop: &CancellationToken,
) {
    tracing::info!(expect, "waiting for {expect} members to meet before bootstrapping");
    let mut watch = membership.watch();
    loop {
        let alive: BTreeMap<u64, BasicNode> = watch
            .borrow()
            .iter()
            .filter(|m| m.state == NodeState::Alive)
            .map(|m| (m.id, BasicNode::new(m.addr.clone())))
            .collect();
        if alive.len() >= expect {
            if alive.keys().next() != Some(&cluster.id) {
                return;
            }
            // A node added to a running cluster (a StatefulSet scaled up keeps its
            // founding --bootstrap-expect) meets enough members too: it must not
            // found a second cluster beside theirs, but wait for their leader.
            match existing_cluster(peers, cluster.id, &alive).await {
                Ok(None) => {
                    tracing::info!(members = ?alive.keys().collect::<Vec<_>>(), "bootstrapping cluster");
                    initialize(cluster, alive).await;
                    return;
                }
                Ok(Some(peer)) => {
                    tracing::info!(
                        peer,
                        "joined gossip of an existing cluster; waiting for its leader to add this node"
                    );
                    return;
                }
                Err(e) => tracing::info!(error = %e, "cannot tell yet whether a cluster exists; asking again"),
            }
        }
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            r = watch.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(retry), if alive.len() >= expect => {}
        }
    }
}

/// Asks every other member in `alive` (from its local copy, no leader needed) whether
/// it already belongs to a Raft cluster: `Ok(Some(id))` of the first that does,
/// `Ok(None)` when none does, `Err` when one could not be asked.
async fn existing_cluster(peers: &Peers, me: u64, alive: &BTreeMap<u64, BasicNode>) -> Result<Option<u64>, PeerError> {
    for (id, node) in alive.iter().filter(|(id, _)| **id != me) {
        if peers.belongs_to_a_cluster(*id, &node.addr).await? {
            return Ok(Some(*id));
        }
    }
    Ok(None)
}

async fn initialize(cluster: &Cluster, members: BTreeMap<u64, BasicNode>) {
    match cluster.raft.initialize(members).await {
        Ok(()) => {}
        // Someone else initialized us first (we already received their log).
        Err(openraft::error::RaftError::APIError(e)) => tracing::info!(reason = %e, "not initializing"),
        Err(e) => tracing::error!(error = %e, "raft initialize failed"),
    }
}

/// Bound on committing consumer-group offsets and closing segments at shutdown.
const DATA_SHUTDOWN_MAX: Duration = Duration::from_secs(5);

/// Bound on recording this node LEFT in the cluster state at shutdown.
const MARK_LEFT_MAX: Duration = Duration::from_secs(2);

/// Records this node LEFT in the cluster state (as the leader's reconciler does once
/// gossip says so, but at once): placement gives a LEFT node nothing new. Not for a
/// decommissioned node: nothing is placed on it anyway, and the leader removes it from
/// the state as soon as gossip says LEFT (a record written after that would stay).
async fn mark_left(cluster: &Cluster) {
    let address = {
        let st = cluster.state.read();
        match st.state.nodes.get(&cluster.id) {
            _ if st.state.draining.contains(&cluster.id) => return,
            Some(n) if n.state == crate::cluster_state::NodeState::Alive => n.address.clone(),
            _ => return,
        }
    };
    let record = crate::cluster_state::NodeRecord { address, state: crate::cluster_state::NodeState::Left };
    if let Err(e) = cluster.write(crate::cluster_state::Command::SetNode { id: cluster.id, record }).await {
        tracing::warn!(error = %e, "could not record this node LEFT in the cluster state");
    }
}

/// How long the gRPC server may take to drain in-flight calls at shutdown.
const SERVER_DRAIN_MAX: Duration = Duration::from_secs(2);

/// Bound on the graceful leadership hand-over at shutdown.
const HAND_OVER_MAX: Duration = Duration::from_secs(1);

/// If this node leads, hands leadership to another voter so the cluster does not wait
/// out an election timeout (and the followers' leader lease) after it stops: see
/// [`Cluster::hand_over_leadership`]. Failures are logged; followers then elect after
/// a timeout.
pub(crate) async fn hand_over_leadership(cluster: &Cluster) {
    if cluster.leader().map(|(id, _)| id) != Some(cluster.id) {
        return;
    }
    match cluster.hand_over_leadership(None, HAND_OVER_MAX).await {
        Ok(leader) if leader != cluster.id => tracing::info!(target = leader, "handed leadership over"),
        Ok(_) => {}
        Err(e) if e.code == crate::error::ErrorCode::NotEnoughNodesLeft => {} // nobody to hand over to
        Err(e) => tracing::warn!(error = %e, "leadership hand-over failed; followers will elect after a timeout"),
    }
}
