//! Running the broker process: flags -> [`NodeConfig`], real sockets, signals.

use std::net::SocketAddr;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::args::BrokerArgs;
use eventtermq_broker::amqp::AmqpSettings;
use eventtermq_broker::config::NodeConfig;
use eventtermq_broker::security::{ClusterSecret, InternalAccess};
use eventtermq_broker::transport::tls::{NodeTls, TlsSettings};

/// The `--tls-ca-file`, `--tls-cert-file` and `--tls-key-file` flags (the broker's and
/// the CLI's).
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    pub ca: Option<std::path::PathBuf>,
    pub cert: Option<std::path::PathBuf>,
    pub key: Option<std::path::PathBuf>,
}

/// How the node is reached, per the seed page's `--host`/`--advertise-host` table.
pub fn advertise_host(host: &Option<String>, advertise: &Option<String>) -> String {
    match (advertise, host) {
        (Some(a), _) => a.clone(),
        (None, Some(h)) => h.clone(),
        (None, None) => os_hostname(),
    }
}

fn os_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

pub fn node_config(args: &BrokerArgs, host: &Option<String>, port: u16) -> Result<NodeConfig, String> {
    let dir = args.dir.clone().ok_or("--dir: is required to run the broker (or give a subcommand, see --help)")?;
    let listen_host = host.clone().unwrap_or_else(|| "0.0.0.0".to_string());
    let advertise = format!("{}:{port}", advertise_host(host, &args.advertise_host));
    let mut config = NodeConfig::new(dir, format!("{listen_host}:{port}"), advertise);
    for j in &args.join {
        let j = j.trim();
        if j.is_empty() {
            continue;
        }
        if !j.contains(':') {
            return Err(format!("--join: {j:?} must be HOST:PORT"));
        }
        config.join.push(j.to_string());
    }
    if args.bootstrap_expect == Some(0) {
        return Err("--bootstrap-expect: must be at least 1".into());
    }
    config.bootstrap_expect = args.bootstrap_expect;
    config.id = args.id;
    config.raft.heartbeat_interval_ms = args.heartbeat_interval_ms;
    config.raft.election_timeout_min_ms = args.election_timeout_min_ms;
    config.raft.election_timeout_max_ms = args.election_timeout_max_ms;
    config.raft.quiesce_after_ms = args.raft_quiesce_after_ms;
    config.raft.snapshot_logs_count = args.raft_snapshot_logs_count;
    if args.voters_count_max == 0 {
        return Err("--voters-count-max: must be at least 1".into());
    }
    config.voters_count_max = args.voters_count_max;
    config.dead_node_removal_ms = args.dead_node_removal_ms;
    config.request_timeout_ms = args.request_timeout_ms;
    config.membership.probe_period_ms = args.gossip_probe_period_ms;
    config.membership.suspect_to_down_ms = args.gossip_suspect_to_down_ms;
    config.data = eventtermq_broker::config::DataSettings {
        segment_size_max_bytes: args.segment_size_max_bytes,
        segment_age_max_ms: args.segment_age_max_ms,
        segment_preallocate_bytes: args.segment_preallocate_bytes,
        open_segments_max: args.open_segments_max,
        write_batch_max_bytes: args.write_batch_max_bytes,
        read_batch_max_bytes: args.read_batch_max_bytes,
        write_queue_max_bytes: args.write_queue_max_bytes,
        publish_in_flight_max_bytes: args.publish_in_flight_max_bytes,
        http2_stream_window_bytes: args.http2_stream_window_bytes,
        http2_keepalive_interval_ms: args.http2_keepalive_interval_ms,
        offsets_commit_interval_ms: args.offsets_commit_interval_ms,
        offsets_commit_batch_max_count: args.offsets_commit_batch_max_count,
        ack_timeout_ms: args.ack_timeout_ms,
        rereplicate_after_ms: args.rereplicate_after_ms,
        shutdown_copies_wait_ms: args.shutdown_copies_wait_ms,
        ready_catch_up_max_ms: args.ready_catch_up_max_ms,
        dedupe_window_ms: args.dedupe_window_ms,
        dedupe_window_entries_max: args.dedupe_window_entries_max,
        dedupe_rebuild_read_max_bytes: args.dedupe_rebuild_read_max_bytes,
        disk_watermark: eventtermq_broker::disk::Watermark {
            free_min_bytes: args.disk_free_min_bytes,
            free_min_percent: args.disk_free_min_percent,
        },
        ..config.data
    };
    if args.disk_free_min_percent > 100 {
        return Err(format!("--disk-free-min-percent: {} is out of range (0-100)", args.disk_free_min_percent));
    }
    config.amqp = amqp_settings(args)?;
    config.metrics_label_values_max = args.metrics_label_values_max;
    config.raft.to_openraft().map_err(|e| format!("raft timing flags: {e}"))?;
    config.internal_access = internal_access(args, &config)?;
    config.auth = eventtermq_broker::auth::AuthSettings {
        cache_entries_max: args.auth_cache_entries_max,
        cache_ttl_ms: args.auth_cache_ttl_ms,
        failure_delay_ms: args.auth_failure_delay_ms,
        failure_delay_max_ms: args.auth_failure_delay_max_ms,
        failure_forget_ms: args.auth_failure_forget_ms,
        verifications_in_flight_max: args.auth_verifications_in_flight_max,
        // The node sets it from --admin-user.
        awaiting_bootstrap_admin: false,
        cert_user_from: args.tls_client_cert_user_from.unwrap_or_default(),
    };
    if args.tls_client_cert_user_from.is_some() && args.tls_client_ca_file.is_none() {
        return Err("--tls-client-cert-user-from: needs --tls-client-ca-file (the CA that signs the client \
                    certificates that name users)"
            .into());
    }
    if args.auth_verifications_in_flight_max == 0 {
        return Err("--auth-verifications-in-flight-max: must be at least 1".into());
    }
    config.bootstrap_admin = bootstrap_admin(args)?;
    Ok(config)
}

/// `--admin-user` and `--admin-password-file`: both or neither; the password hashed
/// here, at start (only the hash is kept, and written to the cluster state if it has
/// no user yet).
fn bootstrap_admin(args: &BrokerArgs) -> Result<Option<eventtermq_broker::config::BootstrapAdmin>, String> {
    let (name, file) = match (&args.admin_user, &args.admin_password_file) {
        (None, None) => return Ok(None),
        (Some(n), Some(f)) => (n, f),
        (Some(_), None) => return Err("--admin-user: needs --admin-password-file (its password)".into()),
        (None, Some(_)) => return Err("--admin-password-file: needs --admin-user (the user it is for)".into()),
    };
    eventtermq_broker::cluster_state::validate::user_name("--admin-user", name).map_err(|e| e.message)?;
    let password = eventtermq_broker::auth::read_password_file("--admin-password-file", file)?;
    let password_hash = eventtermq_broker::auth::password::hash(&password).map_err(|e| e.message)?;
    Ok(Some(eventtermq_broker::config::BootstrapAdmin { name: name.clone(), password_hash }))
}

/// Who may make node-to-node calls. A node that joins others or waits for them
/// (`--join`, `--bootstrap-expect` above 1) must say how they prove membership: a
/// shared secret, or an explicit statement that the network is trusted. A node alone
/// without either takes node-to-node calls from nobody (others cannot join it).
fn internal_access(args: &BrokerArgs, config: &NodeConfig) -> Result<InternalAccess, String> {
    match (&args.cluster_secret_file, args.insecure_trusted_network) {
        (Some(_), true) => Err("--cluster-secret-file and --insecure-trusted-network exclude each other: \
             with a secret, node-to-node calls are taken only from nodes that know it"
            .into()),
        (Some(path), false) => Ok(InternalAccess::Secret(ClusterSecret::from_file(path)?)),
        (None, true) => Ok(InternalAccess::TrustedNetwork),
        (None, false) if !config.join.is_empty() || config.bootstrap_expect.is_some_and(|n| n > 1) => {
            Err("--join/--bootstrap-expect: the nodes of a cluster must prove to each other that they are members: \
             give every node --cluster-secret-file (a file with the same secret of at least 16 bytes; env \
             EVENTTERMQ_CLUSTER_SECRET_FILE), or, on a private network nothing else can reach, \
             --insecure-trusted-network (env EVENTTERMQ_INSECURE_TRUSTED_NETWORK=true)"
                .into())
        }
        (None, false) => Ok(InternalAccess::closed()),
    }
}

/// The broker's TLS settings (`None`: plaintext), checked for flags that only make
/// sense together; the files themselves are read by [`NodeTls::load`].
pub fn tls_settings(args: &BrokerArgs, files: &TlsFiles) -> Result<Option<TlsSettings>, String> {
    let (cert, key) = match (&files.cert, &files.key) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        (None, None) => {
            return match (&args.tls_client_ca_file, &files.ca) {
                (Some(_), _) => Err("--tls-client-ca-file: needs --tls-cert-file and --tls-key-file (TLS on)".into()),
                (None, Some(_)) => Err("--tls-ca-file: a broker needs --tls-cert-file and --tls-key-file too \
                     (the CA verifies the other nodes once TLS is on)"
                    .into()),
                (None, None) => Ok(None),
            };
        }
        (Some(_), None) => return Err("--tls-cert-file: needs --tls-key-file (its private key)".into()),
        (None, Some(_)) => return Err("--tls-key-file: needs --tls-cert-file (the certificate it goes with)".into()),
    };
    let ca_file = files.ca.clone().or_else(|| args.tls_client_ca_file.clone()).ok_or(
        "--tls-ca-file: TLS is on, so this node verifies the other nodes' certificates: give the CA that \
         signed them (--tls-ca-file, or --tls-client-ca-file when it is the same)",
    )?;
    if args.tls_reload_interval_ms == 0 {
        return Err("--tls-reload-interval-ms: must be at least 1".into());
    }
    if args.tls_handshake_timeout_ms == 0 || args.tls_handshakes_in_flight_max == 0 {
        return Err("--tls-handshake-timeout-ms and --tls-handshakes-in-flight-max: must be at least 1".into());
    }
    Ok(Some(TlsSettings {
        cert_file: cert,
        key_file: key,
        ca_file,
        client_ca_file: args.tls_client_ca_file.clone(),
        reload_interval_ms: args.tls_reload_interval_ms,
        handshake_timeout_ms: args.tls_handshake_timeout_ms,
        handshakes_in_flight_max: args.tls_handshakes_in_flight_max,
    }))
}

fn amqp_settings(args: &BrokerArgs) -> Result<AmqpSettings, String> {
    if args.amqp_frame_max_bytes < 4096 {
        return Err(format!("--amqp-frame-max-bytes: {} is below AMQP's minimum of 4096", args.amqp_frame_max_bytes));
    }
    if args.amqp_publishes_in_flight_max == 0 {
        return Err("--amqp-publishes-in-flight-max: must be at least 1".into());
    }
    if args.amqp_publish_batches_in_flight_max == 0 {
        return Err("--amqp-publish-batches-in-flight-max: must be at least 1".into());
    }
    if args.amqp_settles_queued_max == 0 {
        return Err("--amqp-settles-queued-max: must be at least 1".into());
    }
    if args.amqp_tx_messages_max == 0 {
        return Err("--amqp-tx-messages-max: must be at least 1".into());
    }
    if args.amqp_tx_max_bytes == 0 {
        return Err("--amqp-tx-max-bytes: must be at least 1".into());
    }
    if args.amqp_connections_max == 0 {
        return Err("--amqp-connections-max: must be at least 1 (--amqp-port 0 turns AMQP off)".into());
    }
    Ok(AmqpSettings {
        frame_max_bytes: args.amqp_frame_max_bytes,
        channel_max: args.amqp_channel_max,
        heartbeat_s: args.amqp_heartbeat_s,
        publishes_in_flight_max: args.amqp_publishes_in_flight_max,
        publish_batches_in_flight_max: args.amqp_publish_batches_in_flight_max,
        settles_queued_max: args.amqp_settles_queued_max,
        connections_max: args.amqp_connections_max,
        tx_messages_max: args.amqp_tx_messages_max,
        tx_max_bytes: args.amqp_tx_max_bytes,
        ..AmqpSettings::default()
    })
}

/// The ports beside `--port`: AMQP and `/metrics` (`None`: off).
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub amqp: Option<u16>,
    pub metrics: Option<u16>,
}

pub fn ports(args: &BrokerArgs, port: u16) -> Result<Ports, String> {
    use eventtermq_api::defaults::{AMQP_PORT_OFFSET, METRICS_PORT_OFFSET};
    Ok(Ports {
        amqp: offset_port("--amqp-port", args.amqp_port, port, AMQP_PORT_OFFSET)?,
        metrics: offset_port("--metrics-port", args.metrics_port, port, METRICS_PORT_OFFSET)?,
    })
}

/// `flag`'s port, by default `--port` + `offset`; `None` when it is 0 (off).
fn offset_port(flag: &str, value: Option<u16>, port: u16, offset: u16) -> Result<Option<u16>, String> {
    match value {
        Some(0) => Ok(None),
        Some(p) => Ok(Some(p)),
        None => port
            .checked_add(offset)
            .map(Some)
            .ok_or_else(|| format!("{flag}: --port {port} + {offset} is not a port; set {flag} (0: off)")),
    }
}

/// Runs one broker until SIGTERM/SIGINT, then leaves gracefully; serves AMQP and
/// `/metrics` on their ports of the listen address.
pub async fn run_broker(config: NodeConfig, ports: Ports, tls: Option<TlsSettings>) -> anyhow::Result<()> {
    raise_descriptor_limit(config.data.open_segments_max);
    let tls = tls.map(|t| NodeTls::load(&t)).transpose().map_err(|e| anyhow::anyhow!(e))?;
    let listen: SocketAddr = tokio::net::lookup_host(&config.listen_addr)
        .await
        .map_err(|e| anyhow::anyhow!("--host: cannot resolve {}: {e}", config.listen_addr))?
        .next()
        .ok_or_else(|| anyhow::anyhow!("--host: {} resolves to no address", config.listen_addr))?;
    let (network, mut listeners) =
        eventtermq_broker::transport::tcp::bind(listen, Duration::from_secs(1), tls.as_ref())
            .await
            .map_err(|e| anyhow::anyhow!("--host/--port: cannot listen on {listen}: {e}"))?;
    if let Some(port) = ports.amqp {
        let addr = SocketAddr::new(listen.ip(), port);
        let server_tls = tls.as_ref().map(|t| &t.server);
        let amqp = eventtermq_broker::transport::tcp::bind_amqp(addr, server_tls, &listeners.tls_handshakes_failed)
            .await
            .map_err(|e| anyhow::anyhow!("--amqp-port: cannot listen on {addr}: {e}"))?;
        listeners.amqp = Some(amqp);
    }
    // Bound before the node starts: a port taken is a refusal to start, not a node
    // that runs unobserved.
    let metrics_listener = match ports.metrics {
        Some(port) => {
            let addr = SocketAddr::new(listen.ip(), port);
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("--metrics-port: cannot listen on {addr}: {e}"))?;
            Some(l)
        }
        None => None,
    };
    let shutdown = CancellationToken::new();
    let node = eventtermq_broker::node::start(config, network, listeners, shutdown.clone()).await?;
    let metrics_stop = CancellationToken::new();
    if let Some(l) = metrics_listener {
        tokio::spawn(eventtermq_broker::api::metrics::serve(l, node.observer.clone(), metrics_stop.clone()));
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
    shutdown.cancel();
    node.wait().await;
    metrics_stop.cancel();
    Ok(())
}

/// Descriptors the broker needs besides its open segments' files: connections, the
/// Raft log, sealed segments being read.
const DESCRIPTORS_BESIDES_SEGMENTS: u64 = 1024;

/// Raises the soft limit on open files to the hard one, as servers do (a login shell's
/// soft limit is often 1,024), and warns when it cannot hold `open_segments_max`
/// segments' files (two each) with room for connections.
fn raise_descriptor_limit(open_segments_max: usize) {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let limit = getrlimit(Resource::Nofile);
    let mut raised = limit;
    // (`None` is unlimited: nothing to raise then, or no finite value to raise to.)
    if matches!((limit.current, limit.maximum), (Some(soft), Some(hard)) if soft < hard) {
        raised.current = limit.maximum;
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => tracing::info!(from = limit.current, to = raised.current, "raised the open files limit"),
            Err(e) => {
                tracing::info!(error = %e, limit = limit.current, "cannot raise the open files limit");
                raised = limit;
            }
        }
    }
    let needed = 2 * open_segments_max as u64 + DESCRIPTORS_BESIDES_SEGMENTS;
    if let Some(current) = raised.current.filter(|c| open_segments_max > 0 && *c < needed) {
        tracing::warn!(
            limit = current,
            needed,
            open_segments_max,
            "the open files limit is below what --open-segments-max needs; raise it (ulimit -n) or lower the setting"
        );
    }
}
