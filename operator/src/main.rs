//! `eventter-operator`: `run` (default) runs the controllers; `crd` prints the CRDs.

use std::io::IsTerminal;
use std::net::SocketAddr;

use clap::{Args, Parser, Subcommand, ValueEnum};
use eventter_operator::run::{run, shutdown_signal, RunConfig};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "eventter-operator",
    version,
    about = "Kubernetes operator of EventterMQ clusters, topics and consumer groups."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the controllers (the default).
    Run,
    /// Print the CustomResourceDefinitions as multi-document YAML.
    Crd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Address of the /healthz, /readyz and /metrics endpoints.
    #[arg(long, env = "EVENTTER_OPERATOR_HTTP_ADDRESS", default_value = "0.0.0.0:8080", global = true)]
    http_address: SocketAddr,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "EVENTTER_OPERATOR_NAMESPACE", global = true)]
    namespace: Option<String>,
    /// Call every cluster's admin API at this host:port instead of its Service (tests,
    /// development with a port-forward).
    #[arg(long, env = "EVENTTER_OPERATOR_BROKER_ADDRESS_OVERRIDE", global = true)]
    broker_address_override: Option<String>,
    /// Reconcile without electing a leader (only when a single replica runs).
    #[arg(long, global = true)]
    no_leader_election: bool,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "eventter-operator", global = true)]
    lease_name: String,
    /// Namespace of the Lease (default: the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", global = true)]
    lease_namespace: Option<String>,
    /// Identity in leader election and events (default: the host name, i.e. the pod name).
    #[arg(long, env = "POD_NAME", global = true)]
    identity: Option<String>,
    /// How often a ConsumerGroup in sync reads its lag from the broker again and
    /// updates its status (at most every 300000 ms, the resync period).
    #[arg(long, env = "EVENTTER_OPERATOR_GROUP_STATUS_PERIOD_MS", default_value_t = 15_000,
          value_parser = clap::value_parser!(u64).range(1000..=300_000), global = true)]
    group_status_period_ms: u64,
    /// How long the operator waits for each broker's own health (free disk, Raft
    /// error) when it updates an EventterCluster's status.
    #[arg(long, env = "EVENTTER_OPERATOR_NODE_HEALTH_TIMEOUT_MS", default_value_t = 3_000,
          value_parser = clap::value_parser!(u64).range(100..=60_000), global = true)]
    node_health_timeout_ms: u64,
    /// Brokers asked for their health at once, at most.
    #[arg(long, env = "EVENTTER_OPERATOR_NODE_HEALTH_CONCURRENCY_MAX", default_value_t = 8,
          value_parser = clap::value_parser!(u64).range(1..=256), global = true)]
    node_health_concurrency_max: u64,
    /// Log format on stderr (level from RUST_LOG, default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Json, global = true)]
    log_format: LogFormat,
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        // Colours only on a terminal: `kubectl logs` shows escape codes verbatim.
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Crd => {
            print!("{}", eventter_operator::crd::crds_yaml()?);
            Ok(())
        }
        Command::Run => {
            init_tracing(cli.run.log_format);
            tokio::runtime::Runtime::new()?.block_on(run_operator(cli.run))
        }
    }
}

async fn run_operator(args: RunArgs) -> anyhow::Result<()> {
    // Both rustls providers may be compiled in through dependencies; choose one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = kube::Client::try_default().await?;
    let identity = match args.identity {
        Some(identity) => identity,
        None => std::env::var("HOSTNAME").unwrap_or_else(|_| "eventter-operator".to_string()),
    };
    let config = RunConfig {
        http_address: args.http_address,
        namespace: args.namespace,
        broker_address_override: args.broker_address_override,
        leader_election: !args.no_leader_election,
        lease_name: args.lease_name,
        lease_namespace: args.lease_namespace,
        identity,
        group_status_period: std::time::Duration::from_millis(args.group_status_period_ms),
        node_health_timeout: std::time::Duration::from_millis(args.node_health_timeout_ms),
        node_health_concurrency_max: args.node_health_concurrency_max as usize,
    };
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        on_signal.cancel();
    });
    run(client, config, shutdown).await
}
