//! Node configuration: every limit and timeout has a name ending in its unit.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use eventtermq_storage::fs::{Fs, RealFs};

use crate::clock::Clock;
use crate::membership::MembershipConfig;
use crate::peers::PeerTimeouts;
use crate::security::InternalAccess;

/// Default gRPC/gossip port.
pub const DEFAULT_PORT: u16 = eventtermq_api::defaults::PORT;

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
    /// Bounds on calls to other nodes that have no deadline of their own.
    pub peers: PeerTimeouts,
    /// Raft voters at most; further members stay learners.
    pub voters_count_max: usize,
    /// A member DEAD or LEFT for this long is removed from Raft and the cluster state.
    pub dead_node_removal_ms: u64,
    /// How long an API request may wait for a leader, forwarding and commit.
    pub request_timeout_ms: u64,
    /// Interval of the leader's membership reconciliation (gossip -> Raft).
    pub reconcile_interval_ms: u64,
    pub data: DataSettings,
    /// Limits of the AMQP 0.9.1 listener (whether it runs is the caller's: a node
    /// handed an AMQP listener serves it).
    pub amqp: AmqpSettings,
    /// Where wall-clock timestamps come from (the system's; a manual one in tests).
    pub clock: Clock,
    /// Distinct namespace/topic (and namespace/group) label values with series of
    /// their own in the metrics; later ones are folded into one (`_other`).
    pub metrics_label_values_max: usize,
    /// The filesystem `dir` is on: the operating system's; a simulated disk in the
    /// simulation (`eventtermq_storage::sim::SimFs`). Every file of the node goes
    /// through it (segments, the Raft log and snapshot, the node id, the lock).
    pub fs: Arc<dyn Fs>,
    /// Who may make node-to-node calls here, and the credential this node sends on
    /// its own (default: closed, a cluster of one; see [`InternalAccess`]).
    pub internal_access: InternalAccess,
    /// Limits of authentication (the verification cache, the failure delay).
    pub auth: crate::auth::AuthSettings,
    /// `--admin-user`: a cluster administrator created when the cluster has no user
    /// yet (its password already hashed).
    pub bootstrap_admin: Option<BootstrapAdmin>,
}

/// The bootstrap administrator of `--admin-user` / `--admin-password-file`.
#[derive(Clone)]
pub struct BootstrapAdmin {
    pub name: String,
    /// The password's argon2id PHC string (the password itself is not kept).
    pub password_hash: String,
}

impl std::fmt::Debug for BootstrapAdmin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BootstrapAdmin").field("name", &self.name).finish_non_exhaustive()
    }
}

/// Limits of the data path (segments, replication, consumer groups).
#[derive(Debug, Clone)]
pub struct DataSettings {
    /// A segment is closed and the next one opened once it is this big (a topic may
    /// set its own).
    pub segment_size_max_bytes: u64,
    /// An open segment holding records is closed once it is this old (a topic may set
    /// its own), so that a quiet topic's records expire; 0: never by age.
    pub segment_age_max_ms: u64,
    /// Disk space a segment file reserves ahead of its records, at most this much at a
    /// time (the reserve grows with the file from 64 KiB): an fsync that need not
    /// record a new file size is faster (0: none).
    pub segment_preallocate_bytes: u64,
    /// Open segments whose two files stay open between writes; beyond it the least
    /// recently written idle ones are closed and opened again by their next write, so
    /// a node's descriptors stay bounded however many topics it holds (0: no limit).
    pub open_segments_max: usize,
    /// Most bytes of messages one write (and one fsync) of a primary takes at once.
    pub write_batch_max_bytes: usize,
    /// Most bytes of records one replication message or one segment read carries.
    pub read_batch_max_bytes: usize,
    /// Publishes queued on a primary beyond this many bytes wait (back-pressure).
    pub write_queue_max_bytes: usize,
    /// Bytes of publishes a node holds at once over all its clients, gRPC and AMQP
    /// (read, not answered yet); beyond it the node reads no more publishes until
    /// some are answered (`budget.rs`).
    pub publish_in_flight_max_bytes: usize,
    /// The gRPC server's HTTP/2 stream window: bytes a client (or node) may send on
    /// one stream beyond what the server has read; 0 leaves hyper's default (1 MiB).
    pub http2_stream_window_bytes: u32,
    /// How long a connection (a client's or another node's) may be idle before the
    /// gRPC server pings it
    /// (HTTP/2 PING; unanswered within `transport::HTTP2_KEEPALIVE_TIMEOUT`, it is
    /// dropped); 0: no pings.
    pub http2_keepalive_interval_ms: u64,
    /// How often a consumer group records its acknowledged offsets in the cluster state.
    /// After a kill -9, at most this much of acknowledged messages is delivered again.
    pub offsets_commit_interval_ms: u64,
    /// Most consumer groups' commits one cluster-state write carries: the commits of
    /// this node's groups that queue while one is being written go in the next.
    pub offsets_commit_batch_max_count: usize,
    /// A consumer group's ack timeout when the group sets none (0 there): a message
    /// handed out and not acknowledged within it goes back for redelivery (0: never).
    pub ack_timeout_ms: u64,
    /// A closed segment's copy on a node DEAD this long is replaced by a new copy on a
    /// live node.
    pub rereplicate_after_ms: u64,
    /// Graceful shutdown: how long a node waits, at most, until every open segment it
    /// holds a copy of (and is not primary of) has enough caught-up copies without it
    /// (a replica that restarted a moment ago may still be catching up, as in a
    /// rolling restart); 0: does not wait.
    pub shutdown_copies_wait_ms: u64,
    /// At start: how long readiness waits, at most, until the node caught up (its Raft
    /// state holds what the leader committed, its copies of open segments are as long
    /// as their primaries'), so that a rolling restart stops the next node only once
    /// this one takes part fully; 0: ready as soon as a leader is known.
    pub ready_catch_up_max_ms: u64,
    /// How long a consumer group's read of an open segment waits for new records
    /// before it asks again. A read ends as soon as records are confirmed, the segment
    /// closes or its primary goes away, so this only bounds how often an idle group
    /// asks: each idle group reads once per this (across the network when the
    /// segment's primary is another node), which is the whole idle cost of a group.
    pub read_wait_ms: u64,
    /// Exactly-once publishing: how long a primary remembers a keyed publish (producer
    /// id and sequence), so that a repeat is answered as the first attempt was instead
    /// of being stored again (0: keys are ignored). Clients must retry within it.
    pub dedupe_window_ms: u64,
    /// ... and at most this many keyed publishes per shard, the newest (memory: about
    /// 100 bytes each).
    pub dedupe_window_entries_max: usize,
    /// ... and, where a shard's primaries crashed (their windows lived in memory), at
    /// most this many bytes of the shard's previous generations are read to rebuild
    /// the window from the keys their records carry (four segments of the default
    /// size): keyed publishes stored before are not recognized as repeats (logged).
    /// Rotations and graceful stops hand the window over and read nothing.
    pub dedupe_rebuild_read_max_bytes: u64,
    /// Free space the data directory's filesystem keeps: below it the node takes no
    /// segment data (publishes are refused with `DiskFull`), so Raft keeps its room.
    pub disk_watermark: crate::disk::Watermark,
}

impl Default for DataSettings {
    fn default() -> Self {
        Self {
            segment_size_max_bytes: 64 * 1024 * 1024,
            segment_age_max_ms: 3_600_000,
            segment_preallocate_bytes: 1024 * 1024,
            open_segments_max: 4096,
            write_batch_max_bytes: 1024 * 1024,
            read_batch_max_bytes: 1024 * 1024,
            write_queue_max_bytes: 64 * 1024 * 1024,
            publish_in_flight_max_bytes: 16 * 1024 * 1024,
            http2_stream_window_bytes: 0,
            http2_keepalive_interval_ms: crate::transport::HTTP2_KEEPALIVE_INTERVAL.as_millis() as u64,
            offsets_commit_interval_ms: 1000,
            offsets_commit_batch_max_count: 256,
            ack_timeout_ms: eventtermq_api::defaults::ACK_TIMEOUT_MS,
            rereplicate_after_ms: 60_000,
            shutdown_copies_wait_ms: 30_000,
            ready_catch_up_max_ms: 30_000,
            read_wait_ms: 300_000,
            dedupe_window_ms: eventtermq_api::defaults::DEDUPE_WINDOW_MS,
            dedupe_window_entries_max: 100_000,
            dedupe_rebuild_read_max_bytes: 256 * 1024 * 1024,
            disk_watermark: crate::disk::Watermark::default(),
        }
    }
}

/// Raft timing. After a leader dies, a follower waits out its election timeout, and
/// its peers refuse to vote until their leader lease (openraft 0.9: the maximum
/// election timeout since the last heartbeat) has run out, so failover takes about
/// one to two election timeouts. Short timeouts fail over fast but risk needless
/// elections when the machine stalls (no GC here, but fsync and scheduler stalls
/// happen). 50 ms heartbeats with a 250-350 ms election timeout fail over in about
/// 0.6-0.7 s on the reference machine and tolerate stalls of about 200 ms; raise
/// them on slower or busier hosts.
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
    /// Quiescence (see `node::quiesce`): after this long without a Raft write, while
    /// gossip holds every voter ALIVE, the leader stops its heartbeats and the
    /// followers their election timers, relying on gossip for the leader's liveness;
    /// any write, a voter not ALIVE or a membership change wakes them at once.
    /// 0: never quiesce (heartbeats always).
    pub quiesce_after_ms: u64,
}

impl Default for RaftSettings {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: 50,
            election_timeout_min_ms: 250,
            election_timeout_max_ms: 350,
            snapshot_logs_count: 5000,
            logs_kept_after_snapshot_count: 1000,
            install_snapshot_timeout_ms: 5000,
            max_payload_entries_count: 1000,
            quiesce_after_ms: 3000,
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
    pub const DEFAULT_VOTERS_COUNT_MAX: usize = 5;
    pub const DEFAULT_DEAD_NODE_REMOVAL_MS: u64 = 5 * 60 * 1000;
    pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 10_000;

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
            peers: PeerTimeouts::default(),
            voters_count_max: Self::DEFAULT_VOTERS_COUNT_MAX,
            dead_node_removal_ms: Self::DEFAULT_DEAD_NODE_REMOVAL_MS,
            request_timeout_ms: Self::DEFAULT_REQUEST_TIMEOUT_MS,
            reconcile_interval_ms: 200,
            data: DataSettings::default(),
            amqp: AmqpSettings::default(),
            clock: Clock::default(),
            metrics_label_values_max: crate::metrics::LABEL_VALUES_MAX_DEFAULT,
            fs: RealFs::shared(),
            internal_access: InternalAccess::closed(),
            auth: crate::auth::AuthSettings::default(),
            bootstrap_admin: None,
        }
    }
}

/// The AMQP listener's limits.
#[derive(Debug, Clone)]
pub struct AmqpSettings {
    /// Largest frame, offered in `connection.tune` (a client may ask for less).
    pub frame_max_bytes: u32,
    /// Highest channel number, offered in `connection.tune`.
    pub channel_max: u16,
    /// Heartbeat interval offered in `connection.tune` (0: none); a client silent for
    /// two intervals is disconnected.
    pub heartbeat_s: u16,
    /// Time a client has from connecting to `connection.open-ok`.
    pub handshake_timeout: Duration,
    /// Publishes of one channel queued at once (and the most stored in one request);
    /// more wait, and so does reading that connection.
    pub publishes_in_flight_max: usize,
    /// Publish requests (batches) of one channel in flight at once; each is routed
    /// only after the one before it was queued at its primary, so the channel's
    /// messages keep their order.
    pub publish_batches_in_flight_max: usize,
    /// Acks, nacks and rejects of one channel queued for their queues' groups at once
    /// (and the most sent together, one call per queue); more wait, and so does
    /// reading that connection.
    pub settles_queued_max: usize,
    /// Open connections at most; more are closed as they arrive.
    pub connections_max: usize,
    /// Messages one transaction (`tx.select`) holds until `tx.commit` at most; one
    /// more closes the channel (406).
    pub tx_messages_max: usize,
    /// Body bytes one transaction holds at most; more close the channel (406).
    pub tx_max_bytes: u64,
}

impl Default for AmqpSettings {
    fn default() -> Self {
        Self {
            frame_max_bytes: 128 * 1024,
            channel_max: 2047,
            heartbeat_s: 60,
            handshake_timeout: Duration::from_secs(10),
            publishes_in_flight_max: 256,
            publish_batches_in_flight_max: 8,
            settles_queued_max: 1024,
            connections_max: 10_000,
            tx_messages_max: 10_000,
            tx_max_bytes: 64 * 1024 * 1024,
        }
    }
}
