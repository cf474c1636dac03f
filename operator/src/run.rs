//! `eventter-operator run`: the HTTP endpoints, leader election and the four
//! controllers, wired together with one shutdown signal.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::core::PartialObjectMeta;
use kube::{Api, Client, Resource};
use tokio_util::sync::CancellationToken;

use crate::broker::BrokerConnector;
use crate::controller::{broker_object, cluster, user, Context};
use crate::crd::{ConsumerGroup, EventterCluster, Topic, User};
use crate::leader::{LeaderElector, LeaseConfig};
use crate::metrics::Metrics;
use crate::server::{self, Health};

/// Settings of `eventter-operator run`.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    pub http_address: SocketAddr,
    /// Watch only this Kubernetes namespace (default: all).
    pub namespace: Option<String>,
    /// Use this broker address for every cluster (tests, development).
    pub broker_address_override: Option<String>,
    /// Elect a leader through a Lease before reconciling.
    pub leader_election: bool,
    /// Name of the Lease.
    pub lease_name: String,
    /// Namespace of the Lease (default: the client's namespace, i.e. the operator's).
    pub lease_namespace: Option<String>,
    /// This replica's identity (pod name).
    pub identity: String,
    /// How often a ConsumerGroup in sync refreshes the lag in its status.
    pub group_status_period: Duration,
    /// Timeout of each broker's health read for the EventterCluster status.
    pub node_health_timeout: Duration,
    /// Brokers asked for their health at once, at most.
    pub node_health_concurrency_max: usize,
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Waits for SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Runs the operator until `shutdown` is cancelled or leadership is lost (an error,
/// so the process exits and restarts as a candidate).
pub async fn run(client: Client, config: RunConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(Health::new(metrics.clone()));
    let listener = tokio::net::TcpListener::bind(config.http_address).await?;
    tracing::info!(address = %listener.local_addr()?, "serving /healthz, /readyz and /metrics");
    let http_shutdown = shutdown.clone();
    let http = tokio::spawn(server::serve(listener, health.clone(), async move { http_shutdown.cancelled().await }));

    let version = client.apiserver_version().await?;
    tracing::info!(version = %version.git_version, "connected to the Kubernetes API");
    health.set_ready(true);

    let elector = config.leader_election.then(|| {
        let namespace = config.lease_namespace.clone().unwrap_or_else(|| client.default_namespace().to_string());
        let api: Api<Lease> = Api::namespaced(client.clone(), &namespace);
        LeaderElector::new(api, LeaseConfig::new(config.lease_name.clone(), config.identity.clone()))
    });
    if let Some(elector) = &elector {
        tokio::select! {
            _ = elector.acquire() => {}
            _ = shutdown.cancelled() => {
                http.await??;
                return Ok(());
            }
        }
    }
    metrics.leader.set(1);
    let stop = lead(&client, &config, metrics.clone(), elector.as_ref(), &shutdown).await;
    metrics.leader.set(0);
    if let Some(elector) = &elector {
        if !matches!(stop, Stop::LostLeadership) {
            if let Err(error) = elector.release().await {
                tracing::warn!(%error, "releasing the lease failed");
            }
        }
    }
    shutdown.cancel();
    http.await??;
    match stop {
        Stop::LostLeadership => anyhow::bail!("lost leadership"),
        Stop::ControllersEnded { shutdown_requested: false } => anyhow::bail!("the controllers stopped on their own"),
        Stop::ControllersEnded { shutdown_requested: true } | Stop::Shutdown => Ok(()),
    }
}

/// Why the leader stopped reconciling.
enum Stop {
    /// The controllers returned; an error unless a shutdown came meanwhile.
    ControllersEnded {
        shutdown_requested: bool,
    },
    LostLeadership,
    Shutdown,
}

/// Runs the controllers as the leader until they end, leadership is lost or
/// `shutdown` is cancelled; then stops them.
async fn lead(
    client: &Client,
    config: &RunConfig,
    metrics: Arc<Metrics>,
    elector: Option<&LeaderElector>,
    shutdown: &CancellationToken,
) -> Stop {
    let connector = BrokerConnector {
        address_override: config.broker_address_override.clone(),
        node_health_timeout: config.node_health_timeout,
        node_health_concurrency_max: config.node_health_concurrency_max,
        ..BrokerConnector::default()
    };
    let mut ctx = Context::new(client.clone(), metrics, connector, Some(config.identity.clone()));
    ctx.group_status_period = config.group_status_period;
    let ctx = Arc::new(ctx);
    let controllers = shutdown.child_token();
    let all = run_controllers(ctx, client, config.namespace.as_deref(), &controllers);
    tokio::pin!(all);

    let hold = async {
        match elector {
            Some(elector) => elector.hold().await,
            None => std::future::pending().await,
        }
    };
    let stop = tokio::select! {
        _ = &mut all => Stop::ControllersEnded { shutdown_requested: shutdown.is_cancelled() },
        _ = hold => Stop::LostLeadership,
        _ = shutdown.cancelled() => Stop::Shutdown,
    };
    controllers.cancel();
    if !matches!(stop, Stop::ControllersEnded { .. }) {
        // Controllers finish their running reconciles; bound the wait.
        let _ = tokio::time::timeout(Duration::from_secs(20), &mut all).await;
    }
    stop
}

/// The four controllers (clusters, topics, consumer groups, users) of namespace `ns` (or
/// all), until `controllers` is cancelled.
async fn run_controllers(ctx: Arc<Context>, client: &Client, ns: Option<&str>, controllers: &CancellationToken) {
    let stop = || {
        let token = controllers.clone();
        async move { token.cancelled().await }
    };
    let clusters = cluster::run(
        ctx.clone(),
        api::<EventterCluster>(client, ns),
        api::<Service>(client, ns),
        api::<StatefulSet>(client, ns),
        api::<PodDisruptionBudget>(client, ns),
        stop(),
    );
    let topics = broker_object::run::<Topic>(ctx.clone(), api(client, ns), api::<EventterCluster>(client, ns), stop());
    let groups =
        broker_object::run::<ConsumerGroup>(ctx.clone(), api(client, ns), api::<EventterCluster>(client, ns), stop());
    let users = user::run(
        ctx,
        api::<User>(client, ns),
        api::<EventterCluster>(client, ns),
        api::<PartialObjectMeta<Secret>>(client, ns),
        stop(),
    );
    futures::future::join4(clusters, topics, groups, users).await;
}
