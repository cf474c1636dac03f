//! Running the broker process: flags -> [`NodeConfig`], real sockets, signals.

use std::net::SocketAddr;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::args::BrokerArgs;
use eventtermq_broker::config::NodeConfig;

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
        segment_preallocate_bytes: args.segment_preallocate_bytes,
        write_batch_max_bytes: args.write_batch_max_bytes,
        read_batch_max_bytes: args.read_batch_max_bytes,
        write_queue_max_bytes: args.write_queue_max_bytes,
        offsets_commit_interval_ms: args.offsets_commit_interval_ms,
        rereplicate_after_ms: args.rereplicate_after_ms,
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
    config.metrics_label_values_max = args.metrics_label_values_max;
    config.raft.to_openraft().map_err(|e| format!("raft timing flags: {e}"))?;
    Ok(config)
}

/// The port of `/metrics`: `--metrics-port`, by default `--port` + 2; `None`: off.
pub fn metrics_port(args: &BrokerArgs, port: u16) -> Result<Option<u16>, String> {
    match args.metrics_port {
        Some(0) => Ok(None),
        Some(p) => Ok(Some(p)),
        None => port.checked_add(eventtermq_api::defaults::METRICS_PORT_OFFSET).map(Some).ok_or_else(|| {
            format!("--metrics-port: --port {port} + 2 is not a port; set --metrics-port (0: no metrics endpoint)")
        }),
    }
}

/// Runs one broker until SIGTERM/SIGINT, then leaves gracefully; serves `/metrics` on
/// `metrics_port` of the listen address.
pub async fn run_broker(config: NodeConfig, metrics_port: Option<u16>) -> anyhow::Result<()> {
    let listen: SocketAddr = tokio::net::lookup_host(&config.listen_addr)
        .await
        .map_err(|e| anyhow::anyhow!("--host: cannot resolve {}: {e}", config.listen_addr))?
        .next()
        .ok_or_else(|| anyhow::anyhow!("--host: {} resolves to no address", config.listen_addr))?;
    let (network, listeners) = eventtermq_broker::transport::tcp::bind(listen, Duration::from_secs(1))
        .await
        .map_err(|e| anyhow::anyhow!("--host/--port: cannot listen on {listen}: {e}"))?;
    // Bound before the node starts: a port taken is a refusal to start, not a node
    // that runs unobserved.
    let metrics_listener = match metrics_port {
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
