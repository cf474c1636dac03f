//! Node configuration: every limit and timeout has a name ending in its unit.

use std::path::PathBuf;

use crate::membership::MembershipConfig;

/// Default gRPC/gossip port.
pub const DEFAULT_PORT: u16 = 16000;

#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Persistent data directory.
    pub dir: PathBuf,
    /// Address the gRPC (TCP) and gossip (UDP) listeners are bound to; informational
    /// for the node itself (listeners are injected), used for logs.
    pub listen_addr: String,
    /// `host:port` other nodes use to reach this node.
    pub advertise_addr: String,
    /// Seeds to join through (`host:port`); this node's own address is ignored.
    pub join: Vec<String>,
    /// Form a new cluster only once this many members have met over gossip.
    pub bootstrap_expect: Option<usize>,
    /// Explicit node id; must match `<dir>/id` when that exists.
    pub id: Option<u64>,
    pub raft: RaftSettings,
    pub membership: MembershipConfig,
    /// Raft voters at most; further members stay learners.
    pub voters_count_max: usize,
    /// A member DEAD or LEFT for this long is removed from Raft and the cluster state.
    pub dead_node_removal_ms: u64,
    /// How long an API request may wait for a leader, forwarding and commit.
    pub request_timeout_ms: u64,
    /// Interval of the leader's membership reconciliation (gossip -> Raft).
    pub reconcile_interval_ms: u64,
}

/// Raft timing. Failover takes about one election timeout after the leader stops
/// heart-beating: short timeouts fail over fast but risk needless elections when the
/// machine stalls (GC-free Rust helps; fsync stalls do not). 150 ms heartbeats with a
/// 500-1000 ms election timeout keep failover under ~1 s while tolerating a few
/// hundred milliseconds of stall on a loaded 2-core machine.
#[derive(Debug, Clone)]
pub struct RaftSettings {
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot (and purge the log) after this many new entries.
    pub snapshot_logs_count: u64,
    /// Entries kept in the log behind the snapshot, so slightly lagging followers
    /// catch up without a snapshot.
    pub logs_kept_after_snapshot_count: u64,
    pub install_snapshot_timeout_ms: u64,
    pub max_payload_entries_count: u64,
}

impl Default for RaftSettings {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: 150,
            election_timeout_min_ms: 500,
            election_timeout_max_ms: 1000,
            snapshot_logs_count: 5000,
            logs_kept_after_snapshot_count: 1000,
            install_snapshot_timeout_ms: 5000,
            max_payload_entries_count: 1000,
        }
    }
}

impl RaftSettings {
    pub fn to_openraft(&self) -> Result<openraft::Config, openraft::ConfigError> {
        openraft::Config {
            cluster_name: "eventtermq".to_string(),
            heartbeat_interval: self.heartbeat_interval_ms,
            election_timeout_min: self.election_timeout_min_ms,
            election_timeout_max: self.election_timeout_max_ms,
            install_snapshot_timeout: self.install_snapshot_timeout_ms,
            max_payload_entries: self.max_payload_entries_count,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.snapshot_logs_count),
            max_in_snapshot_log_to_keep: self.logs_kept_after_snapshot_count,
            ..Default::default()
        }
        .validate()
    }
}

impl NodeConfig {
    /// A configuration with defaults for everything but the directory and addresses.
    pub fn new(dir: impl Into<PathBuf>, listen_addr: impl Into<String>, advertise_addr: impl Into<String>) -> Self {
        Self {
            dir: dir.into(),
            listen_addr: listen_addr.into(),
            advertise_addr: advertise_addr.into(),
            join: Vec::new(),
            bootstrap_expect: None,
            id: None,
            raft: RaftSettings::default(),
            membership: MembershipConfig::default(),
            voters_count_max: 5,
            dead_node_removal_ms: 5 * 60 * 1000,
            request_timeout_ms: 10_000,
            reconcile_interval_ms: 200,
        }
    }
}
