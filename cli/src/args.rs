//! Command-line flags. One binary is both the broker (no subcommand) and its CLI.
//!
//! `--host`/`--port` mean "listen here" for the broker and "talk to this node" for the
//! CLI, as on the seed page (`eventtermq --host emq-2 dump`).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use eventtermq_api::defaults;

use eventtermq_broker::amqp::AmqpSettings;
use eventtermq_broker::auth::AuthSettings;
use eventtermq_broker::config::{DataSettings, NodeConfig, RaftSettings};
use eventtermq_broker::membership::MembershipConfig;
use eventtermq_broker::transport::tls::TlsSettings;

#[derive(Debug, Parser)]
#[command(name = "eventtermq", version, about = "EventterMQ: a distributed message broker and its CLI.", long_about = None)]
#[command(args_conflicts_with_subcommands = false, subcommand_negates_reqs = true, after_help = EXIT_STATUS_HELP)]
pub struct Cli {
    /// Broker: address to listen on (default: all interfaces). CLI: node to talk to (default: localhost).
    #[arg(long, global = true)]
    pub host: Option<String>,
    /// Broker: gRPC (TCP) and gossip (UDP) port. CLI: the node's port.
    #[arg(long, global = true, default_value_t = defaults::PORT)]
    pub port: u16,
    /// CLI: namespace of topics and consumer groups.
    #[arg(long, global = true, default_value = defaults::NAMESPACE)]
    pub namespace: String,
    /// CLI: output format of dump and list commands.
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// CLI: talk TLS, verifying the node's certificate against these PEM CA certificates.
    /// Broker: the CA of the other nodes' certificates (default: --tls-client-ca-file).
    #[arg(long, global = true, env = "EVENTTERMQ_TLS_CA_FILE")]
    pub tls_ca_file: Option<PathBuf>,
    /// CLI: client certificate (PEM) to present. Broker: the certificate chain served on
    /// the gRPC and AMQP ports and presented to other nodes; turns TLS on (reloaded when
    /// the file changes).
    #[arg(long, global = true, env = "EVENTTERMQ_TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,
    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1) of --tls-cert-file.
    #[arg(long, global = true, env = "EVENTTERMQ_TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,
    /// CLI: the user to authenticate as (needed once the cluster has users), with --password-file.
    #[arg(long, global = true, env = "EVENTTERMQ_USER")]
    pub user: Option<String>,
    /// CLI: a file holding --user's password (trailing whitespace ignored).
    #[arg(long, global = true, env = "EVENTTERMQ_PASSWORD_FILE")]
    pub password_file: Option<PathBuf>,
    #[command(flatten)]
    pub broker: BrokerArgs,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The exit statuses (`crate::exit_status`), as `--help` shows them.
const EXIT_STATUS_HELP: &str = "\
Exit status:
  0  done: the broker confirmed the request (a broker: stopped by SIGTERM)
  1  rejected, nothing changed: the broker refused the request, or the node could not
     be reached and nothing was sent (a broker: refused to start, e.g. its --dir is
     another process's)
  2  usage error: bad flags or values, found before anything was sent
  3  outcome unknown: the request was sent but no answer says what happened (no answer
     in time, the connection was lost, or the broker answered Timeout (5002) or
     Internal (9xxx)): it may still take effect
  4  a broker only: refused to start because its --dir has a data format this release
     does not read (written by a newer release: downgrade refused; or too old: upgrade
     through an intermediate release first); nothing in the directory was changed";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

/// Retention by size and the segment age of `create-topic`.
#[derive(Debug, Args)]
pub struct RetentionArgs {
    /// Bytes of closed segments kept at most; the oldest go first (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub retention_bytes_max: u64,
    /// Close an open segment that holds records at this age, so a quiet topic's records
    /// expire (0: the nodes' --segment-age-max-ms).
    #[arg(long, default_value_t = 0)]
    pub segment_age_max_ms: u64,
    /// Retention deletes segments even when consumer groups have not acknowledged
    /// them (as Kafka); without it a segment waits for every bound group.
    #[arg(long)]
    pub retention_overrides_consumers: bool,
    /// What picks a publish's shard: routing_key (one key, one shard, in order; no key:
    /// spread) or none (always spread).
    #[arg(long, default_value = "routing_key")]
    pub shard_key: String,
}

/// A consumer group's bindings and settings (create-consumer-group,
/// update-consumer-group).
#[derive(Debug, Args)]
pub struct GroupArgs {
    pub name: String,
    /// Bind TOPIC with its default exchange type (fanout: every message).
    #[arg(long = "bind", value_name = "TOPIC")]
    pub bind: Vec<String>,
    /// Bind TOPIC:KEY, direct exchange (routing key equal to KEY).
    #[arg(long, value_name = "TOPIC:KEY")]
    pub bind_direct: Vec<String>,
    /// Bind TOPIC:PATTERN, topic exchange (`*` one word, `#` zero or more).
    #[arg(long, value_name = "TOPIC:PATTERN")]
    pub bind_topic: Vec<String>,
    /// Bind TOPIC:k=v,k2=v2[:all|any], headers exchange.
    #[arg(long, value_name = "TOPIC:K=V,...[:all|any]")]
    pub bind_headers: Vec<String>,
    /// Where a new group starts: a duration into the past (1h, 30m, 2d; -1h too), an
    /// RFC 3339 time (2026-12-05T10:00:00Z) or Unix seconds. Default: the oldest kept.
    #[arg(long, allow_hyphen_values = true)]
    pub since: Option<String>,
    /// In-memory buffer of the group, in messages.
    #[arg(long, default_value_t = 10_000)]
    pub size: u32,
    /// A message not acknowledged within this many milliseconds of its delivery is
    /// delivered again (0: the group's node's --ack-timeout-ms).
    #[arg(long, default_value_t = 0)]
    pub ack_timeout_ms: u64,
    /// A message delivered this many times and still not acknowledged is not
    /// delivered again: it goes to --dead-letter-topic, or is dropped (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub deliveries_max: u32,
    /// Topic of the namespace (not one the group reads) that takes the messages past
    /// --deliveries-max, with headers saying where they came from and why.
    #[arg(long, default_value = "")]
    pub dead_letter_topic: String,
    /// A message waiting in the group longer than this many milliseconds since it was
    /// stored is not delivered: it goes to --dead-letter-topic, or is dropped (0: never
    /// expires; at most 4294967295).
    #[arg(long, default_value_t = 0)]
    pub message_ttl_ms: u64,
    /// At most this many messages wait undelivered; the oldest beyond go to
    /// --dead-letter-topic, or are dropped (0: no limit; at most --size).
    #[arg(long, default_value_t = 0)]
    pub ready_messages_max: u64,
    /// At most this many bytes of message bodies wait undelivered (of the messages
    /// the group's buffer holds, at most --size); the oldest beyond go to
    /// --dead-letter-topic, or are dropped (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub ready_bytes_max: u64,
    /// Dead letters are published to --dead-letter-topic with this routing key
    /// (default: the message's own).
    #[arg(long, default_value = "")]
    pub dead_letter_routing_key: String,
}

#[derive(Debug, Args)]
pub struct BrokerArgs {
    /// Persistent data directory (required to run the broker; created if missing). One broker at a time: it is locked (<dir>/LOCK holds the PID).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Host name or IP other nodes use to reach this node (default: --host, or the OS host name).
    #[arg(long)]
    pub advertise_host: Option<String>,
    /// host:port of a member to join through; repeatable or comma-separated. This node's own address is ignored.
    #[arg(long, value_delimiter = ',')]
    pub join: Vec<String>,
    /// Form a new cluster only once this many members have met over gossip.
    #[arg(long)]
    pub bootstrap_expect: Option<usize>,
    /// Node id (default: random, generated once and kept in <dir>/id).
    #[arg(long)]
    pub id: Option<u64>,
    /// A file holding the cluster's shared secret (at least 16 bytes; the same on every
    /// node): node-to-node calls are taken only with it. A multi-node cluster needs it
    /// or --insecure-trusted-network.
    #[arg(long, env = "EVENTTERMQ_CLUSTER_SECRET_FILE")]
    pub cluster_secret_file: Option<PathBuf>,
    /// Take node-to-node calls from anyone who reaches the port, without a credential:
    /// only on a private network that nothing else can reach.
    #[arg(long, env = "EVENTTERMQ_INSECURE_TRUSTED_NETWORK")]
    pub insecure_trusted_network: bool,
    /// Require client certificates signed by these PEM CA certificates on the gRPC and
    /// AMQP ports (clients and other nodes alike).
    #[arg(long, env = "EVENTTERMQ_TLS_CLIENT_CA_FILE")]
    pub tls_client_ca_file: Option<PathBuf>,
    /// Where a client certificate names its user, who then needs no password: cn (the
    /// subject's common name), san-dns or san-email (the first such subject alternative
    /// name), none (certificates name no users); default cn. Needs --tls-client-ca-file.
    #[arg(long, env = "EVENTTERMQ_TLS_CLIENT_CERT_USER_FROM", value_name = "cn|san-dns|san-email|none")]
    pub tls_client_cert_user_from: Option<eventtermq_broker::client_cert::UserFrom>,
    /// How often --tls-cert-file and --tls-key-file are checked for changes (a changed
    /// pair is served to new connections without a restart).
    #[arg(long, default_value_t = TlsSettings::DEFAULT_RELOAD_INTERVAL_MS)]
    pub tls_reload_interval_ms: u64,
    /// How long a connection to a TLS port may take to complete its handshake.
    #[arg(long, default_value_t = TlsSettings::DEFAULT_HANDSHAKE_TIMEOUT_MS)]
    pub tls_handshake_timeout_ms: u64,
    /// TLS handshakes in progress at most per port; further connections wait.
    #[arg(long, default_value_t = TlsSettings::DEFAULT_HANDSHAKES_IN_FLIGHT_MAX)]
    pub tls_handshakes_in_flight_max: usize,
    /// A cluster administrator created at start when the cluster has no user yet (with
    /// --admin-password-file); until a user exists, client access is open.
    #[arg(long, env = "EVENTTERMQ_ADMIN_USER")]
    pub admin_user: Option<String>,
    /// A file holding --admin-user's password (trailing whitespace ignored).
    #[arg(long, env = "EVENTTERMQ_ADMIN_PASSWORD_FILE")]
    pub admin_password_file: Option<PathBuf>,
    /// Successful password verifications remembered (0: every request verifies its password).
    #[arg(long, default_value_t = AuthSettings::default().cache_entries_max)]
    pub auth_cache_entries_max: usize,
    /// How long a successful verification is remembered.
    #[arg(long, default_value_t = AuthSettings::default().cache_ttl_ms)]
    pub auth_cache_ttl_ms: u64,
    /// The delay before answering a failed login from an address; it doubles with each
    /// further failure from there.
    #[arg(long, default_value_t = AuthSettings::default().failure_delay_ms)]
    pub auth_failure_delay_ms: u64,
    /// ... up to this.
    #[arg(long, default_value_t = AuthSettings::default().failure_delay_max_ms)]
    pub auth_failure_delay_max_ms: u64,
    /// An address without a failed login this long starts again from --auth-failure-delay-ms.
    #[arg(long, default_value_t = AuthSettings::default().failure_forget_ms)]
    pub auth_failure_forget_ms: u64,
    /// Password verifications (argon2id: 19 MiB and tens of milliseconds each) running at once at most.
    #[arg(long, default_value_t = AuthSettings::default().verifications_in_flight_max)]
    pub auth_verifications_in_flight_max: usize,
    /// Log format on stderr (level from RUST_LOG, default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Export a trace of each publish's path through this node (received, queued on the
    /// segment's primary, written, fsynced here, replicated, confirmed) to an
    /// OpenTelemetry collector over OTLP/gRPC at this http:// URL (no TLS), e.g.
    /// http://127.0.0.1:4317. Off by default; off, the spans cost nothing but a
    /// comparison of levels.
    #[arg(long, env = "EVENTTERMQ_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// With --otlp-endpoint: the share of publishes traced, from 0 to 1.
    #[arg(long, default_value_t = 1.0)]
    pub otlp_sample_ratio: f64,
    /// Raft heartbeat interval.
    #[arg(long, default_value_t = RaftSettings::default().heartbeat_interval_ms)]
    pub heartbeat_interval_ms: u64,
    /// Raft election timeout, lower bound.
    #[arg(long, default_value_t = RaftSettings::default().election_timeout_min_ms)]
    pub election_timeout_min_ms: u64,
    /// Raft election timeout, upper bound.
    #[arg(long, default_value_t = RaftSettings::default().election_timeout_max_ms)]
    pub election_timeout_max_ms: u64,
    /// Quiesce Raft after this long without a cluster-state write while gossip holds
    /// every voter ALIVE: the leader sends no heartbeats and followers rely on gossip
    /// (SWIM) to notice a dead leader; 0: heartbeats always.
    #[arg(long, default_value_t = RaftSettings::default().quiesce_after_ms)]
    pub raft_quiesce_after_ms: u64,
    /// Build a Raft snapshot (and purge the log behind it) after this many new entries.
    #[arg(long, default_value_t = RaftSettings::default().snapshot_logs_count)]
    pub raft_snapshot_logs_count: u64,
    /// Raft voters at most; further nodes are learners.
    #[arg(long, default_value_t = NodeConfig::DEFAULT_VOTERS_COUNT_MAX)]
    pub voters_count_max: usize,
    /// Remove a node from Raft and the cluster state once DEAD or LEFT this long.
    #[arg(long, default_value_t = NodeConfig::DEFAULT_DEAD_NODE_REMOVAL_MS)]
    pub dead_node_removal_ms: u64,
    /// How long an API request may wait for a leader and a commit.
    #[arg(long, default_value_t = NodeConfig::DEFAULT_REQUEST_TIMEOUT_MS)]
    pub request_timeout_ms: u64,
    /// SWIM probe period.
    #[arg(long, default_value_t = MembershipConfig::default().probe_period_ms)]
    pub gossip_probe_period_ms: u64,
    /// SWIM suspicion timeout before a node is declared DEAD.
    #[arg(long, default_value_t = MembershipConfig::default().suspect_to_down_ms)]
    pub gossip_suspect_to_down_ms: u64,
    /// Close a segment and open the next once it reaches this size (topics may set their own).
    #[arg(long, default_value_t = DataSettings::default().segment_size_max_bytes)]
    pub segment_size_max_bytes: u64,
    /// Close an open segment that holds records once it is this old, so a quiet
    /// topic's records expire with its retention (topics may set their own; 0: never).
    #[arg(long, default_value_t = DataSettings::default().segment_age_max_ms)]
    pub segment_age_max_ms: u64,
    /// Disk space a segment file reserves (fallocate) ahead of its records, at most this
    /// much at a time (the reserve grows with the file from 64 KiB), so that most
    /// fsyncs need not record a new file size (0: no reserve).
    #[arg(long, default_value_t = DataSettings::default().segment_preallocate_bytes)]
    pub segment_preallocate_bytes: u64,
    /// Open segments whose files (2 descriptors each) stay open between writes; the
    /// least recently written idle ones beyond it are closed until their next write
    /// (0: no limit).
    #[arg(long, default_value_t = DataSettings::default().open_segments_max)]
    pub open_segments_max: usize,
    /// Most bytes of messages a primary writes (and fsyncs) at once.
    #[arg(long, default_value_t = DataSettings::default().write_batch_max_bytes)]
    pub write_batch_max_bytes: usize,
    /// Most bytes of records in one replication message or segment read.
    #[arg(long, default_value_t = DataSettings::default().read_batch_max_bytes)]
    pub read_batch_max_bytes: usize,
    /// Publishes queued on a primary beyond this many bytes wait.
    #[arg(long, default_value_t = DataSettings::default().write_queue_max_bytes)]
    pub write_queue_max_bytes: usize,
    /// Bytes of publishes this node holds at once for its clients, gRPC and AMQP
    /// (what other nodes forward to it is counted where it came from); beyond it it
    /// reads no more publishes until earlier ones are answered, so publishers wait
    /// (HTTP/2 flow control, TCP for AMQP) instead of the node's memory growing with
    /// their number.
    #[arg(long, default_value_t = DataSettings::default().publish_in_flight_max_bytes)]
    pub publish_in_flight_max_bytes: usize,
    /// The gRPC server's HTTP/2 stream window: bytes a client may send on one stream
    /// beyond what this node has read (a publisher's backlog in the node's buffers);
    /// 0: the HTTP/2 library's default (1 MiB).
    #[arg(long, default_value_t = DataSettings::default().http2_stream_window_bytes)]
    pub http2_stream_window_bytes: u32,
    /// How long a connection may be idle before this node pings it (HTTP/2 PING; one
    /// unanswered for 5 s is dropped, with the subscriptions on it); 0: no pings. Each
    /// ping wakes the node: with many idle client connections a longer interval costs
    /// less CPU and finds a vanished client later.
    #[arg(long, default_value_t = DataSettings::default().http2_keepalive_interval_ms)]
    pub http2_keepalive_interval_ms: u64,
    /// How often consumer groups record acknowledged offsets in the cluster state.
    #[arg(long, default_value_t = DataSettings::default().offsets_commit_interval_ms)]
    pub offsets_commit_interval_ms: u64,
    /// Most consumer groups' offset commits written to the cluster state as one entry.
    #[arg(long, default_value_t = DataSettings::default().offsets_commit_batch_max_count)]
    pub offsets_commit_batch_max_count: usize,
    /// A message handed out by a consumer group and not acknowledged within this many
    /// milliseconds is delivered again, for groups that set no ack timeout (0: never).
    #[arg(long, default_value_t = DataSettings::default().ack_timeout_ms)]
    pub ack_timeout_ms: u64,
    /// Replace a closed segment's copy on a node DEAD this long with a copy on a live node.
    #[arg(long, default_value_t = DataSettings::default().rereplicate_after_ms)]
    pub rereplicate_after_ms: u64,
    /// On SIGTERM, wait at most this long until every open segment this node holds a
    /// copy of has enough caught-up copies on other nodes (a rolling restart); 0: no wait.
    #[arg(long, default_value_t = DataSettings::default().shutdown_copies_wait_ms)]
    pub shutdown_copies_wait_ms: u64,
    /// At start, readiness waits at most this long until the node caught up: its Raft
    /// state holds what the leader committed and its copies of open segments are as
    /// long as their primaries' (a rolling restart stops the next pod only then); 0:
    /// ready once a leader is known.
    #[arg(long, default_value_t = DataSettings::default().ready_catch_up_max_ms)]
    pub ready_catch_up_max_ms: u64,
    /// Exactly-once publishing: how long a segment's primary remembers a publish that
    /// carries a producer id and sequence, so that a retry is answered as the first
    /// attempt was and not stored again (0: ids are ignored).
    #[arg(long, default_value_t = DataSettings::default().dedupe_window_ms)]
    pub dedupe_window_ms: u64,
    /// ... and at most this many such publishes per shard, the newest (about 100 bytes of
    /// memory each).
    #[arg(long, default_value_t = DataSettings::default().dedupe_window_entries_max)]
    pub dedupe_window_entries_max: usize,
    /// ... and after a crash of a shard's primary, at most this many bytes of the
    /// shard's previous segments are read to rebuild the window (keyed publishes stored
    /// before are not recognized as repeats).
    #[arg(long, default_value_t = DataSettings::default().dedupe_rebuild_read_max_bytes)]
    pub dedupe_rebuild_read_max_bytes: u64,
    /// Free space the filesystem of --dir keeps: below it the node refuses publishes and
    /// replicated records (ResourceExhausted) before a write could fail, so the cluster
    /// state keeps room to work. Back above at 25 % (at least 4 MiB) more.
    #[arg(long, default_value_t = DataSettings::default().disk_watermark.free_min_bytes)]
    pub disk_free_min_bytes: u64,
    /// The same as a percentage of the filesystem's size (0-100; 0: off); the larger of
    /// the two counts.
    #[arg(long, default_value_t = DataSettings::default().disk_watermark.free_min_percent)]
    pub disk_free_min_percent: u8,
    /// AMQP 0.9.1 listener on --host (default: --port + 1, i.e. 16001; 0: off).
    #[arg(long)]
    pub amqp_port: Option<u16>,
    /// AMQP: the largest frame offered to clients in connection.tune (at least 4096).
    #[arg(long, default_value_t = AmqpSettings::default().frame_max_bytes)]
    pub amqp_frame_max_bytes: u32,
    /// AMQP: the highest channel number offered to clients.
    #[arg(long, default_value_t = AmqpSettings::default().channel_max)]
    pub amqp_channel_max: u16,
    /// AMQP: heartbeat interval offered to clients (0: none); a client silent for two
    /// intervals is disconnected.
    #[arg(long, default_value_t = AmqpSettings::default().heartbeat_s)]
    pub amqp_heartbeat_s: u16,
    /// AMQP: publishes of one channel queued at once, and the most stored in one
    /// request; more wait, and so does reading that connection.
    #[arg(long, default_value_t = AmqpSettings::default().publishes_in_flight_max)]
    pub amqp_publishes_in_flight_max: usize,
    /// AMQP: publish requests (batches) of one channel in flight at once; each goes to
    /// its primary only after the one before it, so the channel keeps its order.
    #[arg(long, default_value_t = AmqpSettings::default().publish_batches_in_flight_max)]
    pub amqp_publish_batches_in_flight_max: usize,
    /// AMQP: acks, nacks and rejects of one channel queued for their queues at once,
    /// and the most sent together (one call per queue); more wait, and so does
    /// reading that connection.
    #[arg(long, default_value_t = AmqpSettings::default().settles_queued_max)]
    pub amqp_settles_queued_max: usize,
    /// AMQP: open connections at most per node; more are closed as they arrive.
    #[arg(long, default_value_t = AmqpSettings::default().connections_max)]
    pub amqp_connections_max: usize,
    /// AMQP: messages one transaction (tx.select) holds until tx.commit at most; one
    /// more closes the channel with 406 PRECONDITION_FAILED.
    #[arg(long, default_value_t = AmqpSettings::default().tx_messages_max)]
    pub amqp_tx_messages_max: usize,
    /// AMQP: message body bytes one transaction holds until tx.commit at most; more
    /// close the channel with 406 PRECONDITION_FAILED.
    #[arg(long, default_value_t = AmqpSettings::default().tx_max_bytes)]
    pub amqp_tx_max_bytes: u64,
    /// HTTP port of /metrics (Prometheus text, OpenMetrics when asked) on --host
    /// (default: --port + 2, i.e. 16002; 0: no metrics endpoint).
    #[arg(long)]
    pub metrics_port: Option<u16>,
    /// Distinct namespace/topic pairs (and namespace/group pairs, and gRPC methods) with
    /// series of their own in the metrics; values seen after that many are folded into
    /// one label value, `_other`, so that the number of series stays bounded.
    #[arg(long, default_value_t = eventtermq_broker::metrics::LABEL_VALUES_MAX_DEFAULT)]
    pub metrics_label_values_max: usize,
    /// Threads that run the broker's tasks (0: one per CPU). Blocking file work (fsync,
    /// reads) runs on a separate pool. Fewer threads mean fewer cross-thread wake-ups
    /// per request, which matters where they are costly (virtual machines, several
    /// brokers on one host).
    #[arg(long, default_value_t = 0)]
    pub worker_threads: usize,
    /// Memory arenas glibc's malloc may keep (0: glibc's default, 8 per CPU). Each
    /// thread that allocates gets an arena of its own up to this many, and an arena
    /// returns little of what it once held, so a node with many quiet topics and groups
    /// holds more memory with more arenas (bench/scale.md: 326-357 MiB per node at
    /// 10,000 topics and groups with glibc's default, 252-266 MiB with 2, W1-W3 within
    /// noise). Ignored where the C library is not glibc.
    #[arg(long, env = "EVENTTERMQ_MALLOC_ARENA_MAX", default_value_t = 2)]
    pub malloc_arena_max: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the cluster state and this node's segments.
    Dump {
        /// Answer from the node's own copy without confirming with the leader.
        #[arg(long)]
        stale: bool,
        /// Only this namespace (its topics, groups and segments; default: all).
        #[arg(long)]
        only_namespace: Option<String>,
        /// Only topics, groups and segments of topics whose names start with this.
        #[arg(long, default_value = "")]
        prefix: String,
    },
    /// Create a namespace.
    CreateNamespace { name: String },
    /// Delete a namespace.
    DeleteNamespace {
        name: String,
        /// Also delete its topics and consumer groups.
        #[arg(long)]
        cascade: bool,
    },
    /// List namespaces.
    ListNamespaces,
    /// Create a topic (idempotent: the same spec again succeeds).
    CreateTopic {
        name: String,
        /// Maximum number of open segments (parallel write streams), 1-1024.
        #[arg(long, default_value_t = defaults::SHARDS)]
        shards: u32,
        /// Copies of every message, 1-7.
        #[arg(long, default_value_t = defaults::REPLICATION_FACTOR)]
        replication_factor: u32,
        /// How long closed segments are kept (e.g. 24h, 7d); 0 keeps them forever.
        #[arg(long, default_value = "0")]
        retention: String,
        /// fanout, direct, topic or headers.
        #[arg(long, default_value = defaults::EXCHANGE_TYPE)]
        default_exchange_type: String,
        /// Close a segment and open the next at this size (0: the nodes' --segment-size-max-bytes).
        #[arg(long, default_value_t = 0)]
        segment_size_max_bytes: u64,
        /// Nodes that must have fsynced a message before it is confirmed, and the fewest
        /// a segment is opened on: while fewer are up, publishing is refused
        /// (0: a majority of --replication-factor).
        #[arg(long, default_value_t = 0)]
        min_insync_replicas: u32,
        #[command(flatten)]
        retention_limits: RetentionArgs,
    },
    /// Change a topic's mutable fields (shards up, retention, default exchange type,
    /// min in-sync replicas).
    UpdateTopic {
        name: String,
        #[arg(long)]
        shards: Option<u32>,
        /// Immutable: any other value than the current one is rejected.
        #[arg(long)]
        replication_factor: Option<u32>,
        #[arg(long)]
        retention: Option<String>,
        #[arg(long)]
        default_exchange_type: Option<String>,
        /// For segments opened from now on (0: a majority).
        #[arg(long)]
        min_insync_replicas: Option<u32>,
        /// Bytes of closed segments kept at most (0: no limit).
        #[arg(long)]
        retention_bytes_max: Option<u64>,
        /// Close an open segment with records at this age (0: the nodes' --segment-age-max-ms).
        #[arg(long)]
        segment_age_max_ms: Option<u64>,
        /// Whether retention deletes what consumer groups have not acknowledged yet.
        #[arg(long)]
        retention_overrides_consumers: Option<bool>,
        /// routing_key or none (see create-topic).
        #[arg(long)]
        shard_key: Option<String>,
    },
    /// Delete a topic.
    DeleteTopic { name: String },
    /// List topics of the namespace, in name order.
    ListTopics(ListArgs),
    /// Create a consumer group bound to topics.
    CreateConsumerGroup(GroupArgs),
    /// Change a consumer group in place, keeping its committed offsets: its bindings
    /// and settings become those given here (flags left out take their defaults, as
    /// for create). A binding it already has keeps its place; a new one takes what is
    /// published from now on. --since is ignored (it says where a new group starts).
    UpdateConsumerGroup(GroupArgs),
    /// Delete a consumer group.
    DeleteConsumerGroup { name: String },
    /// Drop every message of a consumer group that waits for a subscriber (published
    /// before the call and not handed out, or back after a nack); those handed out and
    /// not acknowledged stay. Prints how many went: {"ok": true, "purged": N}.
    PurgeConsumerGroup { name: String },
    /// List consumer groups of the namespace, in name order, with their node,
    /// committed offsets and lag.
    ListConsumerGroups(ListArgs),
    /// Consumer lag: per group and bound topic, the messages published and not yet
    /// acknowledged, the age of the oldest unacknowledged one, subscribers and the
    /// buffer, as the nodes running the groups know them now.
    Stats {
        /// Groups to show (default: every group of the namespace).
        groups: Vec<String>,
        /// Print again every INTERVAL (e.g. 1s, 500ms) until interrupted.
        #[arg(long, value_name = "INTERVAL")]
        watch: Option<String>,
        /// With --watch: stop after this many tables (0: until interrupted).
        #[arg(long, default_value_t = 0)]
        watch_count: u64,
    },
    /// Publish DATA to TOPIC (--count N times), or with DATA `-` one message per line of
    /// stdin (streamed in batches); prints {"ok": true, "published": N}.
    Publish(PublishArgs),
    /// Receive messages of a consumer group, one JSON object per line (data in base64).
    Subscribe(SubscribeArgs),
    /// Create a user (cluster administrators only, once users exist). The password is
    /// read from --user-password-file, else from the first line of stdin.
    CreateUser {
        name: String,
        /// A file holding the new user's password (trailing whitespace ignored).
        #[arg(long)]
        user_password_file: Option<PathBuf>,
        /// A cluster administrator: every permission everywhere, namespaces and users.
        #[arg(long)]
        admin: bool,
    },
    /// Delete a user.
    DeleteUser { name: String },
    /// Replace a user's password (cluster administrators only); its administrator flag
    /// and permissions stay. The new password is read from --user-password-file, else
    /// from the first line of stdin.
    ChangePassword {
        name: String,
        /// A file holding the new password (trailing whitespace ignored).
        #[arg(long)]
        user_password_file: Option<PathBuf>,
    },
    /// Set USER's permissions on --namespace: regular expressions (unanchored, as
    /// RabbitMQ's: ^...$ for a whole name; "" matches nothing) of the topics and groups
    /// it may configure, the topics it may write to and the groups it may read.
    SetPermissions {
        /// The user whose permissions these are (not the global --user, who asks).
        #[arg(id = "permissions_user", value_name = "USER")]
        user: String,
        #[arg(long, default_value = "")]
        configure: String,
        #[arg(long, default_value = "")]
        write: String,
        #[arg(long, default_value = "")]
        read: String,
        /// Remove USER's permissions on the namespace instead.
        #[arg(long, conflicts_with_all = ["configure", "write", "read"])]
        clear: bool,
    },
    /// List users with their administrator flag and permissions (never a password or hash).
    ListUsers,
    /// List the nodes: address, gossip state, Raft role, the leader, and a
    /// decommission's progress (draining with what still depends on the node, or
    /// drained).
    ListNodes {
        /// Answer from the node's own copy without confirming with the leader.
        #[arg(long)]
        stale: bool,
    },
    /// Decommission (drain) node NODE_ID before removing it: it takes no new segment
    /// or consumer group, its open segments close so that their successors go
    /// elsewhere, its closed segments are copied to other nodes, its groups move. Follow
    /// it with list-nodes until it shows `drained`, then stop the node: it leaves the
    /// cluster at once. Refused (exit 1) when the other live nodes could not hold every
    /// topic's replication factor, or the node is unknown.
    DecommissionNode {
        node_id: u64,
        /// Take the node back instead: it gets segments and groups again.
        #[arg(long)]
        cancel: bool,
    },
    /// Even out the nodes after nodes were added: consumer groups move from nodes above
    /// their fair share, open segments on the most loaded nodes close so that their
    /// successors go to the least loaded; what is fair stays. Prints {"ok": true,
    /// "index": N, "consumer_groups_moved": N, "segments_rotated": N}; list-nodes shows
    /// each node's load.
    Rebalance,
    /// Hand Raft leadership to another voter (--to NODE_ID, or any that holds the
    /// leader's whole log) and wait until it moved; prints {"ok": true, "leader_id": N}.
    /// A node stopping gracefully (SIGTERM) does this by itself when it leads.
    TransferLeadership {
        /// The voter to lead next (default: any caught-up voter).
        #[arg(long)]
        to: Option<u64>,
    },
    /// Benchmarks that start their own local brokers (results go into README.md).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Steady traffic for testing disruptions: a publisher and a consumer that log
    /// every confirmed and delivered message id and every error they see, and a
    /// checker comparing their logs (README, Load and disruption checks).
    #[command(subcommand)]
    Load(LoadCommand),
}

#[derive(Debug, Subcommand)]
pub enum LoadCommand {
    /// Publish to --topic at a steady --rate-per-s for --duration-s, one message per
    /// request, each with this run's producer id and its message id as request number;
    /// a request whose outcome is unknown, that could not reach a node, or refused with
    /// a retryable 5xxx code is sent again (same ids) for up to --retry-for-ms. Logs one
    /// JSON line per confirmed id and per error seen to --report.
    Publish(LoadPublishArgs),
    /// Subscribe to --group for --duration-s, acknowledging what it logged: one JSON line
    /// per delivered message id and per error seen, to --report. Subscribes again after
    /// any failure.
    Consume(LoadConsumeArgs),
    /// Compare a publisher's and a consumer's reports: confirmed, delivered, lost
    /// (confirmed, never delivered), duplicates, client errors, the longest gap without a
    /// confirmation. Exit status 1 when any confirmed message was lost or fewer than
    /// --confirmed-min were confirmed.
    Check(LoadCheckArgs),
}

#[derive(Debug, Args)]
pub struct LoadPublishArgs {
    #[arg(long)]
    pub topic: String,
    /// Messages per second (one request each), 1-10000.
    #[arg(long, default_value_t = 20)]
    pub rate_per_s: u32,
    /// How long to publish (at most a week); at most --rate-per-s x --duration-s messages.
    #[arg(long)]
    pub duration_s: u64,
    /// Size of each message (at least the id text it carries, about 40 bytes; at most
    /// 64 MiB).
    #[arg(long, default_value_t = 64)]
    pub message_bytes: usize,
    /// How long one attempt waits for its answer before it counts as unknown and is sent
    /// again on a new connection.
    #[arg(long, default_value_t = 5_000)]
    pub request_timeout_ms: u64,
    /// How long one message is retried before the publisher gives up on it (logged as
    /// `gave_up`). Keep it below the brokers' --dedupe-window-ms.
    #[arg(long, default_value_t = 30_000)]
    pub retry_for_ms: u64,
    /// Where the JSON lines go: a file, or `-` for stdout.
    #[arg(long, default_value = "-")]
    pub report: String,
}

#[derive(Debug, Args)]
pub struct LoadConsumeArgs {
    #[arg(long)]
    pub group: String,
    /// How long to consume.
    #[arg(long)]
    pub duration_s: u64,
    /// Most unacknowledged messages held at once.
    #[arg(long, default_value_t = defaults::SUBSCRIBER_SIZE)]
    pub size: u32,
    /// Subscribe again (on a new connection) after this long without a message, in case
    /// the stream's node went away without closing it (0: never).
    #[arg(long, default_value_t = 5_000)]
    pub idle_resubscribe_ms: u64,
    /// Where the JSON lines go: a file, or `-` for stdout.
    #[arg(long, default_value = "-")]
    pub report: String,
}

#[derive(Debug, Args)]
pub struct LoadCheckArgs {
    /// The publisher's report (lines that are not its JSON are skipped, so a pod log
    /// with stderr mixed in will do).
    #[arg(long)]
    pub published: PathBuf,
    /// The consumer's report.
    #[arg(long)]
    pub delivered: PathBuf,
    /// Only confirmations and errors at or after this time (Unix ms); also where the
    /// first gap starts. Default: the publisher's start.
    #[arg(long)]
    pub from_ms: Option<i64>,
    /// Only confirmations and errors at or before this time (Unix ms); also where the
    /// last gap ends. Default: the publisher's end, or its last line.
    #[arg(long)]
    pub to_ms: Option<i64>,
    /// Exit 1 when fewer messages than this were confirmed in the window (a check of no
    /// traffic proves nothing).
    #[arg(long, default_value_t = 1)]
    pub confirmed_min: u64,
}

/// Which part of a listing to print.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only names that start with this.
    #[arg(long, default_value = "")]
    pub prefix: String,
    /// At most this many (0: all); the next page's token is printed after them (on
    /// stderr as text, as `next_page_token` in JSON).
    #[arg(long, default_value_t = 0)]
    pub page_size: u32,
    /// Start after this name: the token the previous page printed.
    #[arg(long, default_value = "")]
    pub page_token: String,
}

#[derive(Debug, Args)]
pub struct PublishArgs {
    pub topic: String,
    /// The message, or `-` to read one message per line from stdin.
    pub data: String,
    /// Publish DATA this many times, each `{n}` in it replaced by the message's number
    /// (1, 2, ...); streamed in batches like stdin.
    #[arg(long)]
    pub count: Option<u64>,
    /// Routing key (direct and topic bindings match on it).
    #[arg(long, default_value = "")]
    pub routing_key: String,
    /// A header k=v (headers bindings match on them); repeatable.
    #[arg(long = "header", value_name = "K=V")]
    pub headers: Vec<String>,
    /// When a publish is confirmed: on receipt (none), after fsync on the segment's
    /// primary (primary), or after fsync on a majority of its replicas (replicated).
    /// Default: replicated when the topic has more than one replica.
    #[arg(long, value_enum)]
    pub persistence: Option<PersistenceArg>,
    /// Content type property of the messages.
    #[arg(long)]
    pub content_type: Option<String>,
    /// Stdin and --count: messages per publish request.
    #[arg(long, default_value_t = 100)]
    pub batch_messages_max: usize,
    /// Producer id of this publish (default: random). Every request carries it and its
    /// number (1, 2, ... in order), so the brokers store each request once within
    /// their --dedupe-window-ms: running the same command again with the same id
    /// (after exit status 3) stores only what the first run did not.
    #[arg(long)]
    pub producer_id: Option<u64>,
    /// How long to keep sending requests whose outcome is unknown (no answer, the
    /// connection lost, a node killed) again, with the same producer id and numbers, so
    /// that none is lost or stored twice (0: do not retry). Keep it well below the
    /// brokers' --dedupe-window-ms (2 min).
    #[arg(long, default_value = "30s")]
    pub retry_for: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PersistenceArg {
    None,
    Primary,
    Replicated,
}

#[derive(Debug, Args)]
pub struct SubscribeArgs {
    pub group: String,
    /// Stop after this many messages.
    #[arg(long)]
    pub max_messages: Option<u64>,
    /// Exit 0 once no message arrived for this long (e.g. 10s, 500ms).
    #[arg(long)]
    pub wait: Option<String>,
    /// Do not acknowledge: the messages are delivered again once this subscriber leaves.
    #[arg(long)]
    pub no_auto_ack: bool,
    /// Most unacknowledged messages held at once.
    #[arg(long, default_value_t = defaults::SUBSCRIBER_SIZE)]
    pub size: u32,
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Control plane: starts 3 local brokers (this binary) on --hosts and --port and
    /// measures cluster formation, leader failover after kill -9, create-topic latency
    /// and throughput with concurrent clients, and idle memory; prints JSON lines.
    ControlPlane {
        /// Loopback addresses of the three brokers to start.
        #[arg(long, value_delimiter = ',', default_value = "127.0.0.11,127.0.0.12,127.0.0.13")]
        hosts: Vec<String>,
        /// Topics to create.
        #[arg(long, default_value_t = 5000)]
        count: usize,
        /// Concurrent clients.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Data directory of the brokers (default: a fresh temporary directory); locked by the run, removed after it.
        #[arg(long)]
        bench_dir: Option<PathBuf>,
    },
    /// Data path: starts 3 local brokers, then W1 publishes --messages of
    /// --message-bytes from one pipelining client (replication factor 3, default
    /// persistence), W2 publishes --latency-messages one at a time (confirm latency),
    /// W3 consumes all of them from another node; prints JSON lines.
    DataPath(DataPathBenchArgs),
    /// Scale: starts 3 local brokers, creates --topics topics and as many consumer
    /// groups (one bound to each), publishes one message to every topic, keeps
    /// --subscribers streaming subscribers connected over --connections connections,
    /// and reports per stage the brokers' memory, CPU, files and descriptors, idle CPU
    /// over --idle-seconds, dump size and time, publish throughput over all topics and
    /// delivery latency; prints JSON lines (bench/scale.md).
    Scale(ScaleBenchArgs),
    /// Many clients: starts 3 local brokers and, all through the first, runs W1 (one
    /// pipelined publisher), the same single stream with its subscribers, then
    /// --publishers publishers at once, each to its own topic (replication factor 3),
    /// with --subscribers subscribers spread over the topics' groups; per phase
    /// publish throughput, delivered per subscriber (min, max, ratio), every confirmed
    /// message delivered or not, delivery latency, brokers' CPU per message and RSS;
    /// prints JSON lines (bench/scale.md).
    Clients(ClientsBenchArgs),
}

#[derive(Debug, Args)]
pub struct ClientsBenchArgs {
    /// Loopback addresses of the three brokers to start; every client connects to the first.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.205,127.0.0.206,127.0.0.207")]
    pub hosts: Vec<String>,
    /// The brokers' gRPC and gossip port; their AMQP and metrics ports are the next two.
    #[arg(long, default_value_t = 27600)]
    pub broker_port: u16,
    /// Publishers, each with its own topic (one shard, replication factor 3) and its
    /// own `PublishStream`, pipelined.
    #[arg(long, default_value_t = 100)]
    pub publishers: usize,
    /// Subscribers (auto-ack), spread evenly over the groups: each topic has
    /// --groups-per-topic groups, each group subscribers / (publishers x groups per
    /// topic) of them.
    #[arg(long, default_value_t = 1000)]
    pub subscribers: usize,
    /// Consumer groups bound to each topic: 1 (the default), the subscribers of a
    /// topic share its messages (a RabbitMQ queue with competing consumers, a Kafka
    /// consumer group); as many as the topic's subscribers, each gets all of them.
    #[arg(long, default_value_t = 1)]
    pub groups_per_topic: usize,
    /// Client connections (HTTP/2) the publishers and subscribers of the many-clients
    /// phase share, round-robin; 0: one per client.
    #[arg(long, default_value_t = 0)]
    pub connections: usize,
    /// How long each phase publishes.
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// Messages each publisher publishes instead of publishing for --seconds; 0: by time.
    #[arg(long, default_value_t = 0)]
    pub messages_per_publisher: u64,
    /// Size of each message's data (its first 8 bytes carry the send time).
    #[arg(long, default_value_t = 1024)]
    pub message_bytes: usize,
    /// Messages per publish request.
    #[arg(long, default_value_t = 64)]
    pub batch_messages: usize,
    /// Each subscriber's window (unacknowledged messages held at once).
    #[arg(long, default_value_t = 100)]
    pub subscriber_size: u32,
    #[command(flatten)]
    pub brokers: BenchBrokers,
}

/// The brokers a bench starts: which binary, with which extra flags, where.
#[derive(Debug, Args)]
pub struct BenchBrokers {
    /// The broker binary to start (default: this one), to compare builds.
    #[arg(long)]
    pub broker_binary: Option<PathBuf>,
    /// A flag passed to every broker started (repeatable).
    #[arg(long = "broker-arg", allow_hyphen_values = true)]
    pub broker_args: Vec<String>,
    /// Data directory of the brokers (default: a fresh temporary directory); locked by
    /// the run, removed after it unless it failed.
    #[arg(long)]
    pub bench_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ScaleBenchArgs {
    /// Loopback addresses of the three brokers to start.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.201,127.0.0.202,127.0.0.203")]
    pub hosts: Vec<String>,
    /// The brokers' gRPC and gossip port; their AMQP and metrics ports are the next two.
    #[arg(long, default_value_t = 27400)]
    pub broker_port: u16,
    /// Topics to create, and consumer groups (one bound to each topic).
    #[arg(long, default_value_t = 10_000)]
    pub topics: usize,
    /// Loopback address of a fourth broker started at the end to join the loaded
    /// cluster (how long until it is a member and holds the whole state); "" skips it.
    #[arg(long, default_value = "127.0.0.204")]
    pub joiner_host: String,
    /// Concurrent requests while creating and publishing.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Streaming subscribers kept connected (each to its own group) while idle and
    /// while delivery latency is measured; at most --topics.
    #[arg(long, default_value_t = 1000)]
    pub subscribers: usize,
    /// Client connections the subscribers share, spread over the three brokers.
    #[arg(long, default_value_t = 100)]
    pub connections: usize,
    /// How long each idle measurement lasts.
    #[arg(long, default_value_t = 30)]
    pub idle_seconds: u64,
    /// Messages published one at a time to subscribed groups' topics to measure
    /// delivery latency (publish to receipt by the subscriber).
    #[arg(long, default_value_t = 1000)]
    pub latency_messages: usize,
    #[command(flatten)]
    pub brokers: BenchBrokers,
}

#[derive(Debug, Args)]
pub struct DataPathBenchArgs {
    /// Loopback addresses of the three brokers to start.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.11,127.0.0.12,127.0.0.13")]
    pub hosts: Vec<String>,
    /// W1 and W3: messages to publish and consume.
    #[arg(long, default_value_t = 200_000)]
    pub messages: u64,
    /// Size of each message's data.
    #[arg(long, default_value_t = 1024)]
    pub message_bytes: usize,
    /// W1: messages per publish request.
    #[arg(long, default_value_t = 64)]
    pub batch_messages: usize,
    /// W2: messages published one at a time.
    #[arg(long, default_value_t = 5000)]
    pub latency_messages: u64,
    /// Persistence of every publish (default: the topic's default, replicated).
    #[arg(long, value_enum)]
    pub persistence: Option<PersistenceArg>,
    /// Samples of each floor measured before the workloads (append + fdatasync with no
    /// broker, alone and three at once; a gRPC round trip that does no work, before
    /// W2); 0 skips them.
    #[arg(long, default_value_t = 2000)]
    pub floor_samples: u64,
    /// Data directory of the brokers (default: a fresh temporary directory); locked by the run.
    #[arg(long)]
    pub bench_dir: Option<PathBuf>,
    /// W1 publishes exactly once: every request carries a producer id and a sequence
    /// number (the brokers keep them in their duplicate window).
    #[arg(long)]
    pub exactly_once: bool,
    /// A flag passed to every broker started, e.g. `--broker-arg=--worker-threads=1`
    /// (repeatable).
    #[arg(long = "broker-arg", allow_hyphen_values = true)]
    pub broker_args: Vec<String>,
    /// Scrape every broker's `/metrics` (on `--port` + 2, the brokers' default
    /// `--metrics-port`) every this many milliseconds while the workloads run, as a
    /// Prometheus would, from a thread of its own; 0: no scraping. Compare runs with
    /// and without it to see what serving metrics costs the data path.
    #[arg(long, default_value_t = 0)]
    pub scrape_interval_ms: u64,
}
