//! Reconciler of `EventterCluster`: applies the five child objects with server-side
//! apply and reports readiness from the StatefulSet and the brokers' own view (Dump),
//! with each broker's own health (free disk, Raft error) asked of that broker.

use std::sync::Arc;
use std::time::Duration;

use eventtermq_proto::v1 as pb;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{EvictParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::{predicates, reflector, watcher, Controller, WatchStreamExt};
use kube::{Api, Resource, ResourceExt};

use super::{
    apply_status, condition, error_policy, find_condition, object_key, roll, scale, Context, CREDENTIALS_READY,
    DEGRADED, PROGRESSING, READY, SCALE_DOWN_BLOCKED, TLS_READY,
};
use crate::broker::{BrokerConnector, Refusal};
use crate::builders::{self, FIELD_MANAGER};
use crate::crd::{ClusterMember, DecommissionedNode, EventterCluster, EventterClusterStatus, NodeAuthentication};
use crate::credentials::{self, BrokerCredentials};
use crate::error::{Error, Result};

/// Controller name in logs and metrics.
pub const CONTROLLER: &str = "eventtercluster";
/// Recheck period of a ready cluster (members can fail without any Kubernetes event).
pub const READY_RECHECK_PERIOD: Duration = Duration::from_secs(60);
/// Recheck period while the cluster forms or recovers.
pub const NOT_READY_RECHECK_PERIOD: Duration = Duration::from_secs(10);
/// Recheck period while a scale-down drains brokers or is refused.
pub const SCALE_DOWN_RECHECK_PERIOD: Duration = Duration::from_secs(5);
/// Recheck period while a rolling update runs (changes of the StatefulSet's status,
/// such as a pod turning ready, trigger a pass sooner).
pub const ROLL_RECHECK_PERIOD: Duration = Duration::from_secs(2);

/// Reconciles one EventterCluster.
pub async fn reconcile(cluster: Arc<EventterCluster>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started(CONTROLLER);
    let key = object_key(cluster.as_ref());
    let namespace = cluster.namespace().ok_or_else(|| Error::InvalidObject(format!("{key} has no namespace")))?;
    if cluster.meta().deletion_timestamp.is_some() {
        // Owner references let the garbage collector remove the children.
        return Ok(Action::await_change());
    }
    let client = ctx.client.clone();
    let params = PatchParams::apply(FIELD_MANAGER).force();
    // First, so that the brokers' pods find the Secret they mount.
    let credentials = match credentials::load_password(&client, &cluster, true).await? {
        credentials::Found::Usable { credentials, created } => {
            if created {
                let note = format!(
                    "generated the operator's broker credentials in Secret {:?}",
                    credentials::secret_name(&cluster.name_any())
                );
                ctx.publish(cluster.as_ref(), EventType::Normal, "CredentialsCreated", note).await;
            }
            Ok(credentials)
        }
        credentials::Found::Missing(message) | credentials::Found::Invalid(message) => {
            Err(Unusable::Credentials(message))
        }
    };

    let services: Api<Service> = Api::namespaced(client.clone(), &namespace);
    let headless = builders::headless_service(&cluster);
    services.patch(&headless.name_any(), &params, &Patch::Apply(&headless)).await?;
    let client_service = builders::client_service(&cluster);
    services.patch(&client_service.name_any(), &params, &Patch::Apply(&client_service)).await?;
    let metrics_service = builders::metrics_service(&cluster);
    services.patch(&metrics_service.name_any(), &params, &Patch::Apply(&metrics_service)).await?;
    let stateful_sets: Api<StatefulSet> = Api::namespaced(client.clone(), &namespace);
    let previous = cluster.status.clone().unwrap_or_default();
    let recorded = previous.bootstrap_expect.is_some_and(|n| n >= 1)
        && previous.replicas.is_some()
        && previous.node_authentication.is_some();
    // The StatefulSet as it is matters only while the status has no record of it.
    let existing = if recorded { None } else { stateful_sets.get_opt(&cluster.name_any()).await? };
    let founding = builders::Founding::of(&cluster, existing.as_ref());
    let bootstrap_expect = founding.bootstrap_expect;
    let current = previous.replicas.or_else(|| existing.as_ref().and_then(|s| s.spec.as_ref()?.replicas));
    // The Secrets the pods mount, before the StatefulSet that mounts them.
    if founding.node_authentication == NodeAuthentication::ClusterSecret {
        ensure_cluster_secret(&cluster, &ctx).await?;
    }
    let pods = cluster.spec.replicas.max(current.unwrap_or(0));
    let tls = super::tls::ensure(&cluster, &ctx, pods).await?;
    let credentials = match (credentials, &tls.client) {
        (Ok(credentials), Ok(client)) => Ok(credentials.with_tls(client.clone())),
        (Err(unusable), _) => Err(unusable),
        (Ok(_), Err(message)) => Err(Unusable::Tls(message.clone())),
    };
    let scale = scale_step(&cluster, &ctx, &credentials, current, &previous).await?;
    let mut desired = builders::stateful_set(&cluster, &founding);
    if let Some(spec) = desired.spec.as_mut() {
        spec.replicas = Some(scale.replicas);
    }
    let stateful_set = apply_stateful_set(&stateful_sets, &params, &desired).await?;
    let budgets: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &namespace);
    let budget = builders::pod_disruption_budget(&cluster);
    budgets.patch(&budget.name_any(), &params, &Patch::Apply(&budget)).await?;

    let ready_replicas = stateful_set.status.as_ref().and_then(|s| s.ready_replicas).unwrap_or(0);
    let address = ctx.broker.address(&cluster);
    let dump = match &credentials {
        Ok(credentials) => match ctx.broker.connect(&address, credentials).await {
            Ok(mut admin) => admin.dump().await,
            Err(error) => Err(error),
        },
        Err(unusable) => Err(unusable.error()),
    };
    let health = match (&dump, &credentials) {
        (Ok(dump), Ok(credentials)) => nodes_health(&ctx.broker, credentials, dump).await,
        _ => Vec::new(),
    };
    let mut status = cluster_status(&cluster, ready_replicas, &dump, &health, bootstrap_expect);
    record_scale(&mut status, &previous, &scale, cluster.meta().generation);
    let roll = roll_step(&cluster, &ctx, &credentials, &stateful_set, &status, &scale).await?;
    record_roll(&mut status, &previous, &roll, cluster.meta().generation);
    record_security(&mut status, &previous, founding.node_authentication, &tls, cluster.meta().generation);

    if status != previous {
        let api: Api<EventterCluster> = Api::namespaced(client, &namespace);
        apply_status(&api, &cluster.name_any(), &status).await?;
    }
    publish_transitions(&cluster, &ctx, &previous, &status).await;
    ctx.succeeded(&key);
    let ready = find_condition(&status.conditions, READY).is_some_and(|c| c.status == "True");
    if scale.draining || scale.blocked.is_some() {
        return Ok(Action::requeue(SCALE_DOWN_RECHECK_PERIOD));
    }
    if roll.rolling {
        return Ok(Action::requeue(ROLL_RECHECK_PERIOD));
    }
    Ok(Action::requeue(if ready { READY_RECHECK_PERIOD } else { NOT_READY_RECHECK_PERIOD }))
}

/// Why the operator cannot call the brokers of a cluster.
#[derive(Clone, Debug)]
enum Unusable {
    /// Its credential Secret (the message names Secret and key).
    Credentials(String),
    /// Its TLS Secret (the message names the field of spec.tls).
    Tls(String),
}

impl Unusable {
    fn error(&self) -> Error {
        match self {
            Self::Credentials(message) => Error::Credentials(message.clone()),
            Self::Tls(message) => Error::Tls(message.clone()),
        }
    }
}

/// Makes the cluster secret's Secret when it does not exist (a create, never an
/// overwrite: the brokers that started with it refuse any other). The operator never
/// reads its data: only the broker pods mount it.
async fn ensure_cluster_secret(cluster: &EventterCluster, ctx: &Context) -> Result<()> {
    let namespace = cluster.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let name = builders::cluster_secret_name(&cluster.name_any());
    if secrets.get_metadata_opt(&name).await?.is_some() {
        return Ok(());
    }
    let secret = builders::cluster_secret(cluster, &builders::generate_cluster_secret());
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            let note = format!("generated the brokers' cluster secret in Secret {name:?}");
            ctx.publish(cluster, EventType::Normal, "ClusterSecretCreated", note).await;
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Adds to `status` how the brokers authenticate each other (the record that keeps a
/// running cluster on it) and their TLS, with the `TLSReady` condition. Pure.
pub fn record_security(
    status: &mut EventterClusterStatus,
    previous: &EventterClusterStatus,
    node_authentication: NodeAuthentication,
    tls: &super::tls::TlsStep,
    generation: Option<i64>,
) {
    status.node_authentication = Some(node_authentication.as_str().to_string());
    status.conditions.retain(|c| c.type_ != TLS_READY);
    match &tls.condition {
        Some((ok, reason, message)) => {
            // A failing pass keeps what the last good one set up.
            status.tls = tls.status.clone().or_else(|| previous.tls.clone());
            status.conditions.push(condition(
                &previous.conditions,
                TLS_READY,
                *ok,
                reason,
                message.clone(),
                generation,
            ));
        }
        None => status.tls = None,
    }
}

/// What this pass did about the StatefulSet's replicas.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScaleStep {
    /// StatefulSet replicas applied.
    pub replicas: i32,
    /// The leaving brokers the operator decommissioned, and what each still holds.
    pub progress: Vec<DecommissionedNode>,
    /// Brokers are still draining: check again soon.
    pub draining: bool,
    /// Why the scale-down cannot go on (the brokers' refusal).
    pub blocked: Option<String>,
}

/// The safe scale-down's IO: while `spec.replicas` is below the StatefulSet's
/// replicas (`current`; `None` for a new cluster), or decommissions the operator
/// started are recorded, reads the brokers' nodes, decommissions the leaving pods'
/// brokers and takes back those of pods that stay ([`scale::plan`] decides). A
/// refused decommission keeps the StatefulSet's replicas.
async fn scale_step(
    cluster: &EventterCluster,
    ctx: &Context,
    credentials: &std::result::Result<BrokerCredentials, Unusable>,
    current: Option<i32>,
    previous: &EventterClusterStatus,
) -> Result<ScaleStep> {
    let desired = cluster.spec.replicas;
    let current = current.unwrap_or(desired);
    if current <= desired && previous.decommission.is_empty() {
        return Ok(ScaleStep { replicas: desired, ..ScaleStep::default() });
    }
    let credentials = credentials.as_ref().map_err(Unusable::error)?;
    let mut admin = ctx.broker.connect(&ctx.broker.address(cluster), credentials).await?;
    let nodes = admin.list_nodes().await?;
    let plan = scale::plan(&cluster.name_any(), current, desired, &nodes, &previous.decommission);
    // One event per pass and kind: the recorder folds events of one reason into a series.
    let mut cancelled = Vec::new();
    for (pod, id) in &plan.cancel {
        match admin.decommission_node(*id, true).await? {
            Ok(_) => cancelled.push(format!("{pod} (node {id})")),
            // Removed meanwhile: nothing to take back.
            Err(Refusal::Missing(_)) => {}
            Err(Refusal::Rejected(message)) => {
                return Err(Error::Broker {
                    address: admin.address.clone(),
                    status: tonic::Status::failed_precondition(message),
                })
            }
        }
    }
    if !cancelled.is_empty() {
        let note = format!("took back the decommission of {}: spec.replicas is {desired}", cancelled.join(", "));
        ctx.publish(cluster, EventType::Normal, "DecommissionCancelled", note).await;
    }
    let mut refused = Vec::new();
    let mut started = Vec::new();
    for (pod, id) in &plan.decommission {
        match admin.decommission_node(*id, false).await? {
            Ok(_) => started.push(format!("{pod} (node {id})")),
            // Removed meanwhile: it holds nothing; the next pass lists the nodes again.
            Err(Refusal::Missing(_)) => {}
            Err(Refusal::Rejected(message)) => {
                refused.push((*id, format!("the brokers refused to decommission {pod} (node {id}): {message}")));
            }
        }
    }
    if !started.is_empty() {
        let note = format!("decommissioning {} before the pods are removed", started.join(", "));
        ctx.publish(cluster, EventType::Normal, "Decommissioning", note).await;
    }
    let progress: Vec<DecommissionedNode> =
        plan.progress.iter().filter(|n| !refused.iter().any(|(id, _)| id.to_string() == n.id)).cloned().collect();
    let blocked = (!refused.is_empty()).then(|| refused.into_iter().map(|(_, m)| m).collect::<Vec<_>>().join("; "));
    if let Some(message) = &blocked {
        let first = previous.scale_down.as_deref() != Some(format!("blocked: {message}").as_str());
        if first {
            ctx.publish(cluster, EventType::Warning, "ScaleDownBlocked", message.clone()).await;
        }
    }
    Ok(ScaleStep {
        replicas: if blocked.is_some() { current } else { plan.replicas },
        draining: progress.iter().any(|n| !n.drained),
        progress,
        blocked,
    })
}

/// Adds a scale step to `status`: the StatefulSet's replicas, the leaving brokers'
/// progress (Progressing `Decommissioning` while they drain) and, while the brokers
/// refuse, the ScaleDownBlocked condition with their message. Pure.
pub fn record_scale(
    status: &mut EventterClusterStatus,
    previous: &EventterClusterStatus,
    step: &ScaleStep,
    generation: Option<i64>,
) {
    status.replicas = Some(step.replicas);
    status.decommission = step.progress.clone();
    status.scale_down = match &step.blocked {
        Some(message) => Some(format!("blocked: {message}")),
        None => scale::summary(&step.progress),
    };
    if step.draining {
        let message = status.scale_down.clone().unwrap_or_default();
        let progressing = condition(&previous.conditions, PROGRESSING, true, "Decommissioning", message, generation);
        status.conditions.retain(|c| c.type_ != PROGRESSING);
        status.conditions.push(progressing);
    }
    status.conditions.retain(|c| c.type_ != SCALE_DOWN_BLOCKED);
    if let Some(message) = &step.blocked {
        let blocked = condition(
            &previous.conditions,
            SCALE_DOWN_BLOCKED,
            true,
            "DecommissionRefused",
            message.clone(),
            generation,
        );
        status.conditions.push(blocked);
    }
}

/// Applies the StatefulSet. One made by an operator before the OnDelete update
/// strategy carries the API server's default `rollingUpdate: {partition: 0}`, which no
/// manager owns, so an apply of `type: OnDelete` alone is refused (422: rollingUpdate
/// is only allowed for RollingUpdate): the strategy is then replaced once with a merge
/// patch (type OnDelete, rollingUpdate removed) and the apply repeated.
async fn apply_stateful_set(
    stateful_sets: &Api<StatefulSet>,
    params: &PatchParams,
    desired: &StatefulSet,
) -> Result<StatefulSet> {
    let name = desired.name_any();
    match stateful_sets.patch(&name, params, &Patch::Apply(desired)).await {
        Err(kube::Error::Api(e)) if e.code == 422 && e.message.contains("updateStrategy") => {
            tracing::info!(statefulset = %name, "moving the StatefulSet's update strategy to OnDelete");
            let strategy = serde_json::json!({
                "spec": {"updateStrategy": {"type": builders::UPDATE_STRATEGY, "rollingUpdate": null}}
            });
            stateful_sets.patch(&name, &PatchParams::default(), &Patch::Merge(&strategy)).await?;
            Ok(stateful_sets.patch(&name, params, &Patch::Apply(desired)).await?)
        }
        result => Ok(result?),
    }
}

/// What this pass did about a rolling update.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RollStep {
    /// A roll runs (pods on an old revision): check again soon.
    pub rolling: bool,
    /// The progress line ([`roll::summary`]).
    pub summary: Option<String>,
}

/// The rolling update's IO. Engages only while the StatefulSet reports fewer updated
/// pods than pods (`status.updatedReplicas` < `status.replicas`; its
/// `currentRevision` is no help: with OnDelete, Kubernetes before 1.36 never moves
/// it). Lists the broker pods, lets [`roll::next_step`] decide, and hands leadership
/// over and evicts one pod (the Eviction API: the PodDisruptionBudget applies). Waits
/// while a scale-down runs.
async fn roll_step(
    cluster: &EventterCluster,
    ctx: &Context,
    credentials: &std::result::Result<BrokerCredentials, Unusable>,
    stateful_set: &StatefulSet,
    status: &EventterClusterStatus,
    scale: &ScaleStep,
) -> Result<RollStep> {
    let Some(sts_status) = &stateful_set.status else { return Ok(RollStep::default()) };
    let Some(update_revision) = sts_status.update_revision.as_deref() else { return Ok(RollStep::default()) };
    let replicas = stateful_set.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
    let seen = sts_status.observed_generation.is_some_and(|g| Some(g) >= stateful_set.metadata.generation);
    if !seen {
        // The StatefulSet controller has yet to see the last change: its revisions are
        // stale. Its status update triggers the next pass.
        return Ok(RollStep { rolling: status.rolling_update.is_some(), summary: status.rolling_update.clone() });
    }
    if sts_status.updated_replicas.unwrap_or(0) >= sts_status.replicas {
        return Ok(RollStep::default());
    }
    let name = cluster.name_any();
    if scale.draining || scale.blocked.is_some() {
        return Ok(RollStep { rolling: true, summary: Some("waiting: a scale-down runs".to_string()) });
    }
    let namespace = cluster.namespace().unwrap_or_default();
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let selector = builders::selector_string(&name);
    let listed = pods_api.list(&ListParams::default().labels(&selector)).await?;
    let pods: Vec<roll::PodView> = listed
        .items
        .iter()
        .filter_map(|pod| {
            let pod_name = pod.name_any();
            let ordinal = scale::pod_ordinal(&name, &pod_name)?;
            let ready = pod
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            Some(roll::PodView {
                revision: pod.labels().get(builders::REVISION_LABEL).cloned(),
                name: pod_name,
                ordinal,
                ready,
                terminating: pod.meta().deletion_timestamp.is_some(),
                exited: broker_exit(pod),
            })
        })
        .collect();
    let nodes: Vec<(String, u64)> = status
        .members
        .iter()
        .filter(|m| m.state == "Alive")
        .filter_map(|m| Some((builders::pod_of_address(&m.address), m.id.parse().ok()?)))
        .collect();
    let unhealthy = [READY, DEGRADED].iter().find_map(|type_| {
        let c = find_condition(&status.conditions, type_)?;
        let bad = if *type_ == READY { c.status != "True" } else { c.status == "True" };
        bad.then(|| c.message.clone())
    });
    let view = roll::Cluster {
        update_revision,
        replicas,
        leader_pod: status.leader.as_deref(),
        nodes: &nodes,
        brokers_unhealthy: unhealthy.as_deref(),
    };
    let decision = roll::next_step(&pods, &view);
    let mut summary = roll::summary(&pods, &view, &decision);
    // A broker that does not start (a refused data format, damaged state) stops the roll
    // until someone acts: an event says why, once per new reason.
    if let roll::Decision::Wait(why) = &decision {
        if pods.iter().any(|p| p.exited.is_some() && !p.ready) && status.rolling_update != summary {
            ctx.publish(cluster, EventType::Warning, "BrokerNotStarting", format!("rolling update waits: {why}")).await;
        }
    }
    let evict = match &decision {
        roll::Decision::Done => return Ok(RollStep::default()),
        roll::Decision::Wait(_) => None,
        roll::Decision::Evict { pod, leader } => Some((pod.clone(), *leader)),
        roll::Decision::HandOverLeadership { from, to_pod, to_node } => {
            let credentials = credentials.as_ref().map_err(Unusable::error)?;
            let mut admin = ctx.broker.connect(&ctx.broker.address(cluster), credentials).await?;
            let outcome = match admin.transfer_leadership(*to_node).await {
                Ok(Ok(leader)) if leader == *to_node => Ok(()),
                Ok(Ok(leader)) => Err(format!("node {leader} leads instead")),
                Ok(Err(Refusal::Rejected(message) | Refusal::Missing(message))) => Err(message),
                Err(error) => Err(error.to_string()),
            };
            match outcome {
                Ok(()) => {
                    tracing::info!(cluster = %name, %from, %to_pod, "rolling update: leadership handed over");
                    let note =
                        format!("moved Raft leadership from {from} to {to_pod} (node {to_node}) before rolling {from}");
                    ctx.publish(cluster, EventType::Normal, "LeadershipHandedOver", note).await;
                }
                Err(why) => {
                    tracing::warn!(cluster = %name, %from, %to_pod, %why, "rolling update: leadership hand-over failed");
                    // The broker's own SIGTERM path tries again; failing that, the others
                    // elect a leader after an election timeout.
                    let note =
                        format!("could not move Raft leadership from {from} to {to_pod}: {why}; rolling {from} anyway");
                    ctx.publish(cluster, EventType::Warning, "LeadershipHandOverFailed", note).await;
                }
            }
            Some((from.clone(), true))
        }
    };
    if let Some((pod, leader)) = evict {
        match pods_api.evict(&pod, &EvictParams::default()).await {
            Ok(_) => {
                let role = if leader { "the Raft leader" } else { "a Raft follower" };
                let note = format!("evicted {pod} ({role}) to restart it on revision {update_revision}");
                tracing::info!(cluster = %name, %pod, leader, revision = update_revision, "rolling update: evicted");
                ctx.publish(cluster, EventType::Normal, "RollingUpdate", note).await;
            }
            // The PodDisruptionBudget allows no disruption now (something else is down).
            Err(kube::Error::Api(e)) if e.code == 429 => {
                let (done, total) = roll::rolled(&pods, update_revision, replicas);
                summary = Some(format!(
                    "rolled {done} of {total}, waiting: the PodDisruptionBudget allows no eviction of {pod} now"
                ));
            }
            // Gone meanwhile: the StatefulSet makes it again.
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(RollStep { rolling: true, summary })
}

/// Why the pod's broker container is not running, from its termination (current, or
/// the last one while it waits to be restarted): `None` while it runs or never ran.
fn broker_exit(pod: &Pod) -> Option<String> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    let container = statuses.iter().find(|c| c.name == builders::BROKER_CONTAINER)?;
    let state = container.state.as_ref()?;
    let terminated = match (&state.terminated, &state.waiting) {
        (Some(t), _) => t,
        (None, Some(_)) => container.last_state.as_ref()?.terminated.as_ref()?,
        (None, None) => return None,
    };
    Some(roll::exit_note(terminated.exit_code, terminated.message.as_deref()))
}

/// Adds a roll step to `status`: the progress line, and Progressing True with reason
/// `RollingUpdate` while it runs (unless a scale-down already reports its own). Pure.
pub fn record_roll(
    status: &mut EventterClusterStatus,
    previous: &EventterClusterStatus,
    step: &RollStep,
    generation: Option<i64>,
) {
    status.rolling_update = step.summary.clone();
    let decommissioning =
        find_condition(&status.conditions, PROGRESSING).is_some_and(|c| c.reason == "Decommissioning");
    if let (true, Some(message), false) = (step.rolling, &step.summary, decommissioning) {
        let progressing =
            condition(&previous.conditions, PROGRESSING, true, "RollingUpdate", message.clone(), generation);
        status.conditions.retain(|c| c.type_ != PROGRESSING);
        status.conditions.push(progressing);
    }
}

/// Events when Ready or Degraded change.
async fn publish_transitions(
    cluster: &EventterCluster,
    ctx: &Context,
    previous: &EventterClusterStatus,
    status: &EventterClusterStatus,
) {
    for type_ in [READY, DEGRADED] {
        let Some(now) = find_condition(&status.conditions, type_) else { continue };
        let before = find_condition(&previous.conditions, type_);
        if before.is_some_and(|b| b.status == now.status) {
            continue;
        }
        let (event_type, reason) = match (type_, now.status.as_str()) {
            (READY, "True") => (EventType::Normal, "ClusterReady"),
            (READY, _) if before.is_some() => (EventType::Warning, "ClusterNotReady"),
            (DEGRADED, "True") => (EventType::Warning, "ClusterDegraded"),
            (DEGRADED, _) if before.is_some() => (EventType::Normal, "ClusterRecovered"),
            // First observation of a not-ready, non-degraded cluster: nothing to say.
            _ => continue,
        };
        ctx.publish(cluster, event_type, reason, now.message.clone()).await;
    }
}

fn node_state_name(state: i32) -> &'static str {
    match pb::NodeState::try_from(state) {
        Ok(pb::NodeState::Alive) => "Alive",
        Ok(pb::NodeState::Suspect) => "Suspect",
        Ok(pb::NodeState::Dead) => "Dead",
        Ok(pb::NodeState::Left) => "Left",
        _ => "Unknown",
    }
}

/// The status of `cluster` given its StatefulSet's ready pods, a broker's Dump, what
/// the brokers said of their own health and the `--bootstrap-expect` its StatefulSet
/// was applied with. Pure, so the condition logic is tested without a cluster.
pub fn cluster_status(
    cluster: &EventterCluster,
    ready_replicas: i32,
    dump: &Result<pb::DumpResponse>,
    health: &[NodeHealth],
    bootstrap_expect: i32,
) -> EventterClusterStatus {
    let previous = cluster.status.clone().unwrap_or_default();
    let generation = cluster.meta().generation;
    let replicas = cluster.spec.replicas;
    let mut status = EventterClusterStatus {
        ready_replicas,
        observed_generation: generation,
        // Without a fresh Dump keep what the brokers last said, marked by conditions.
        members: previous.members.clone(),
        leader: previous.leader.clone(),
        leader_id: previous.leader_id.clone(),
        cluster_state_index: previous.cluster_state_index,
        bootstrap_expect: Some(bootstrap_expect),
        conditions: Vec::new(),
        replicas: previous.replicas,
        selector: Some(builders::selector_string(&cluster.name_any())),
        decommission: previous.decommission.clone(),
        scale_down: previous.scale_down.clone(),
        rolling_update: previous.rolling_update.clone(),
        node_authentication: previous.node_authentication.clone(),
        tls: previous.tls.clone(),
    };
    let (ready, degraded, message) = match dump {
        Ok(dump) => {
            record_brokers_view(&mut status, dump);
            record_nodes_health(&mut status, health);
            brokers_health(&status, dump.leader_id, ready_replicas, replicas)
        }
        // No pod ready yet: the cluster is still forming, not degraded.
        Err(error) => (false, ready_replicas > 0, format!("cannot read the cluster state: {error}")),
    };
    let progressing = ready_replicas < replicas;
    let progressing_message = format!("{ready_replicas}/{replicas} broker pods ready");
    let ready_reason = if ready { "ClusterReady" } else { "ClusterNotReady" };
    status.conditions = vec![
        condition(&previous.conditions, READY, ready, ready_reason, message.clone(), generation),
        condition(
            &previous.conditions,
            PROGRESSING,
            progressing,
            if progressing { "PodsStarting" } else { "PodsReady" },
            progressing_message,
            generation,
        ),
        condition(
            &previous.conditions,
            DEGRADED,
            degraded,
            if degraded { "BrokersUnhealthy" } else { "BrokersHealthy" },
            if degraded { message } else { String::new() },
            generation,
        ),
        credentials_condition(cluster, &previous, dump, generation),
    ];
    status
}

/// The CredentialsReady condition: whether the operator's Secret holds a usable
/// password and the brokers take it.
fn credentials_condition(
    cluster: &EventterCluster,
    previous: &EventterClusterStatus,
    dump: &Result<pb::DumpResponse>,
    generation: Option<i64>,
) -> Condition {
    let secret = credentials::secret_name(&cluster.name_any());
    let (ok, reason, message) = match dump {
        Err(Error::Credentials(message)) => (false, "SecretInvalid", message.clone()),
        Err(error @ Error::BrokerUnauthenticated { .. }) => (
            false,
            "Refused",
            format!(
                "{error}. The brokers keep the password of Secret {secret:?} they first started with: a Secret \
                 changed, or deleted and generated again since, no longer matches; put the first password back"
            ),
        ),
        _ => (true, "SecretReady", format!("Secret {secret:?} holds the operator's broker password")),
    };
    condition(&previous.conditions, CREDENTIALS_READY, ok, reason, message, generation)
}

/// Records in `status` what the brokers said: the members, the state's index and
/// the leader.
fn record_brokers_view(status: &mut EventterClusterStatus, dump: &pb::DumpResponse) {
    let state = dump.state.clone().unwrap_or_default();
    status.members = state
        .nodes
        .iter()
        .map(|n| ClusterMember {
            id: n.id.to_string(),
            address: n.address.clone(),
            state: node_state_name(n.state).to_string(),
            raft_role: n.raft_role.clone(),
            leader: dump.leader_id != 0 && n.id == dump.leader_id,
            // The cluster state carries a node's free space only while it is low.
            disk_free_bytes: n.disk_low.then_some(n.disk_free_bytes),
            disk_free_min_bytes: n.disk_low.then_some(n.disk_free_min_bytes),
            disk_low: n.disk_low,
            raft_error: None,
            health_error: None,
        })
        .collect();
    status.cluster_state_index = Some(state.index);
    let leader = state.nodes.iter().find(|n| n.id == dump.leader_id && dump.leader_id != 0);
    status.leader_id = (dump.leader_id != 0).then(|| dump.leader_id.to_string());
    status.leader = leader.map(|n| builders::pod_of_address(&n.address));
}

/// What one broker said of its own condition, or why it could not be asked.
pub type NodeHealth = (u64, std::result::Result<pb::LocalHealth, String>);

/// Each member's own health: the answering broker's from its Dump, the other alive
/// members' by asking each one (at most `node_health_concurrency_max` at once, each
/// within `node_health_timeout`). Members not alive are not asked. With a fixed
/// broker address (tests, a port-forward) only the answering broker is known.
async fn nodes_health(
    connector: &BrokerConnector,
    credentials: &BrokerCredentials,
    dump: &pb::DumpResponse,
) -> Vec<NodeHealth> {
    let mut health: Vec<NodeHealth> = Vec::new();
    if let Some(local) = &dump.local {
        health.push((dump.node_id, Ok(local.clone())));
    }
    if connector.address_override.is_some() {
        return health;
    }
    let nodes = dump.state.as_ref().map(|s| s.nodes.as_slice()).unwrap_or_default();
    let others: Vec<(u64, String)> = nodes
        .iter()
        .filter(|n| n.id != dump.node_id && n.state == pb::NodeState::Alive as i32)
        .map(|n| (n.id, n.address.clone()))
        .collect();
    let asked = futures::stream::iter(others)
        .map(|(id, address)| async move {
            (id, connector.node_health(&address, credentials).await.map_err(|e| e.to_string()))
        })
        .buffer_unordered(connector.node_health_concurrency_max.max(1))
        .collect::<Vec<_>>()
        .await;
    health.extend(asked);
    health
}

/// Adds what the brokers said of themselves to the members of `status`. A member not
/// asked keeps what the cluster state says (its free disk only when it reported a low
/// disk), with the reason it was not asked.
pub fn record_nodes_health(status: &mut EventterClusterStatus, health: &[NodeHealth]) {
    for member in &mut status.members {
        let found = health.iter().find(|(id, _)| id.to_string() == member.id);
        match found {
            Some((_, Ok(local))) => {
                member.disk_free_bytes = Some(local.disk_free_bytes);
                member.disk_free_min_bytes = Some(local.disk_free_min_bytes);
                member.disk_low = local.disk_low;
                member.raft_error = (!local.raft_error.is_empty()).then(|| local.raft_error.clone());
                member.health_error = None;
            }
            Some((_, Err(error))) => member.health_error = Some(error.clone()),
            None if member.state != "Alive" => member.health_error = Some(format!("member is {}", member.state)),
            None => member.health_error = Some("not asked (fixed broker address)".to_string()),
        }
    }
}

/// Whether the cluster is ready and whether it is degraded, and why, given the
/// brokers' view recorded in `status` and their leader (0: none known).
fn brokers_health(
    status: &EventterClusterStatus,
    leader_id: u64,
    ready_replicas: i32,
    replicas: i32,
) -> (bool, bool, String) {
    let pods_ready = ready_replicas >= replicas;
    let unhealthy: Vec<String> = status
        .members
        .iter()
        .filter_map(|m| {
            if m.state != "Alive" {
                Some(format!("{} ({}) is {}", m.id, m.address, m.state))
            } else if let Some(error) = &m.raft_error {
                Some(format!("{} ({}) stopped Raft: {error}", m.id, m.address))
            } else if m.disk_low {
                let free = m.disk_free_bytes.unwrap_or_default();
                Some(format!("{} ({}) is low on disk: {free} bytes free", m.id, m.address))
            } else {
                None
            }
        })
        .collect();
    if leader_id == 0 {
        (false, ready_replicas > 0, "the brokers know no Raft leader".to_string())
    } else if !unhealthy.is_empty() {
        (pods_ready, true, format!("members not healthy: {}", unhealthy.join(", ")))
    } else if !pods_ready {
        (false, false, format!("{ready_replicas}/{replicas} broker pods ready"))
    } else {
        (true, false, format!("{replicas} brokers ready, leader {}", status.leader.clone().unwrap_or_default()))
    }
}

/// Runs the EventterCluster controller until `shutdown` resolves. Changes to (or
/// deletion of) the owned Services, StatefulSet and PodDisruptionBudget trigger a
/// reconcile, which applies them again. Changes of a cluster's own status do not: the
/// reconciler writes it, and the Raft index in it moves with every broker write, so
/// each status patch would trigger the next pass.
pub async fn run(
    ctx: Arc<Context>,
    clusters: Api<EventterCluster>,
    services: Api<Service>,
    stateful_sets: Api<StatefulSet>,
    budgets: Api<PodDisruptionBudget>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let owned = watcher::Config::default().labels("app.kubernetes.io/managed-by=eventter-operator").any_semantic();
    let (reader, writer) = reflector::store();
    let changed_specs = watcher(clusters, watcher::Config::default().any_semantic())
        .reflect(writer)
        .applied_objects()
        .predicate_filter(predicates::generation, Default::default());
    Controller::for_stream(changed_specs, reader)
        .owns(services, owned.clone())
        .owns(stateful_sets, owned.clone())
        .owns(budgets, owned)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, |obj, error, ctx| error_policy(obj, error, ctx, CONTROLLER), ctx)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, controller = CONTROLLER, "reconcile result");
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster() -> EventterCluster {
        let spec = serde_json::from_value(serde_json::json!({"image": "localhost/eventtermq:0.1.0"})).unwrap();
        let mut cluster = EventterCluster::new("emq", spec);
        cluster.metadata.namespace = Some("mq".into());
        cluster.metadata.generation = Some(4);
        cluster
    }

    fn dump(leader_id: u64, states: &[pb::NodeState]) -> pb::DumpResponse {
        let nodes = states
            .iter()
            .enumerate()
            .map(|(i, state)| pb::Node {
                id: i as u64 + 1,
                address: format!("emq-{i}.emq-nodes.mq.svc.cluster.local:16000"),
                state: *state as i32,
                raft_role: "voter".into(),
                ..pb::Node::default()
            })
            .collect();
        pb::DumpResponse {
            state: Some(pb::ClusterState { index: 9, namespaces: vec![], nodes, segments: vec![] }),
            leader_id,
            ..pb::DumpResponse::default()
        }
    }

    fn status_of(status: &EventterClusterStatus, type_: &str) -> String {
        find_condition(&status.conditions, type_).unwrap().status.clone()
    }

    #[test]
    fn healthy_cluster_is_ready() {
        let alive = [pb::NodeState::Alive; 3];
        let status = cluster_status(&cluster(), 3, &Ok(dump(1, &alive)), &[], 3);
        assert_eq!((status_of(&status, READY), status_of(&status, DEGRADED)), ("True".into(), "False".into()));
        assert_eq!(status.leader.as_deref(), Some("emq-0"));
        assert_eq!(status.cluster_state_index, Some(9));
        assert_eq!(status.observed_generation, Some(4));
        assert_eq!(status.bootstrap_expect, Some(3));
    }

    #[test]
    fn dead_member_degrades_the_cluster() {
        let states = [pb::NodeState::Alive, pb::NodeState::Dead, pb::NodeState::Alive];
        let status = cluster_status(&cluster(), 3, &Ok(dump(1, &states)), &[], 3);
        assert_eq!(status_of(&status, DEGRADED), "True");
        let degraded = find_condition(&status.conditions, DEGRADED).unwrap();
        assert!(degraded.message.contains("is Dead"), "{}", degraded.message);
        assert_eq!(status.members[1].state, "Dead");
    }

    #[test]
    fn members_carry_their_own_health_and_a_low_disk_degrades() {
        let alive = [pb::NodeState::Alive; 3];
        let health = |free: u64, low: bool| pb::LocalHealth {
            disk_free_bytes: free,
            disk_free_min_bytes: 64 << 20,
            disk_low: low,
            raft_error: String::new(),
        };
        let answers: Vec<NodeHealth> =
            vec![(1, Ok(health(5 << 30, false))), (2, Ok(health(7 << 30, false))), (3, Err("refused".into()))];
        let status = cluster_status(&cluster(), 3, &Ok(dump(2, &alive)), &answers, 3);
        assert_eq!(status_of(&status, DEGRADED), "False");
        let m = &status.members;
        assert_eq!((m[0].disk_free_bytes, m[0].leader, m[1].leader), (Some(5 << 30), false, true));
        assert_eq!(m[1].disk_free_min_bytes, Some(64 << 20));
        assert_eq!((m[2].disk_free_bytes, m[2].health_error.as_deref()), (None, Some("refused")));

        let answers: Vec<NodeHealth> = vec![(1, Ok(health(1 << 20, true)))];
        let status = cluster_status(&cluster(), 3, &Ok(dump(2, &alive)), &answers, 3);
        assert_eq!(status_of(&status, DEGRADED), "True");
        let degraded = find_condition(&status.conditions, DEGRADED).unwrap();
        assert!(degraded.message.contains("low on disk: 1048576 bytes free"), "{}", degraded.message);
        assert!(status.members[1].health_error.is_some(), "a member not asked says so");
    }

    #[test]
    fn no_leader_is_not_ready() {
        let alive = [pb::NodeState::Alive; 3];
        let status = cluster_status(&cluster(), 3, &Ok(dump(0, &alive)), &[], 3);
        assert_eq!(status_of(&status, READY), "False");
        assert_eq!(status.leader, None);
    }

    #[test]
    fn unreachable_brokers_keep_the_last_members_and_degrade_once_pods_ran() {
        let mut cluster = cluster();
        let alive = [pb::NodeState::Alive; 3];
        cluster.status = Some(cluster_status(&cluster, 3, &Ok(dump(1, &alive)), &[], 3));
        let unreachable = Err(Error::BrokerUnavailable { address: "emq:16000".into(), message: "refused".into() });
        let status = cluster_status(&cluster, 2, &unreachable, &[], 3);
        assert_eq!(status_of(&status, READY), "False");
        assert_eq!(status_of(&status, PROGRESSING), "True");
        assert_eq!(status_of(&status, DEGRADED), "True");
        assert_eq!(status.members.len(), 3);
        assert_eq!(status.ready_replicas, 2);
    }

    #[test]
    fn scale_step_shows_in_status_progressing_and_blocked_conditions() {
        let cluster = cluster();
        let dump = Ok(dump(1, &[pb::NodeState::Alive; 5]));
        let base = cluster_status(&cluster, 5, &dump, &[], 3);
        let leaving = DecommissionedNode {
            pod: "emq-4".into(),
            id: "5".into(),
            open_segments: 1,
            closed_segments: 4,
            consumer_groups: 2,
            drained: false,
        };
        let draining = ScaleStep { replicas: 5, progress: vec![leaving.clone()], draining: true, blocked: None };
        let mut status = base.clone();
        record_scale(&mut status, &base, &draining, Some(4));
        assert_eq!(status.replicas, Some(5));
        assert_eq!(status.decommission, vec![leaving.clone()]);
        assert_eq!(status.scale_down.as_deref(), Some("draining emq-4: 1 open, 4 closed segments, 2 groups left"));
        let progressing = find_condition(&status.conditions, PROGRESSING).unwrap();
        assert_eq!((progressing.status.as_str(), progressing.reason.as_str()), ("True", "Decommissioning"));
        assert_eq!(status.conditions.iter().filter(|c| c.type_ == PROGRESSING).count(), 1);
        assert!(find_condition(&status.conditions, SCALE_DOWN_BLOCKED).is_none());

        let refusal = "the brokers refused to decommission emq-2 (node 3): topic default/orders".to_string();
        let blocked = ScaleStep { replicas: 3, progress: vec![], draining: false, blocked: Some(refusal.clone()) };
        let mut status_blocked = base.clone();
        record_scale(&mut status_blocked, &status, &blocked, Some(4));
        let condition = find_condition(&status_blocked.conditions, SCALE_DOWN_BLOCKED).unwrap();
        assert_eq!((condition.status.as_str(), condition.message.as_str()), ("True", refusal.as_str()));
        assert_eq!(status_blocked.scale_down, Some(format!("blocked: {refusal}")));
        assert!(status_blocked.decommission.is_empty());

        // Done: no progress line, no blocked condition.
        let done = ScaleStep { replicas: 3, ..ScaleStep::default() };
        let mut status_done = base.clone();
        record_scale(&mut status_done, &status_blocked, &done, Some(5));
        assert_eq!(status_done.scale_down, None);
        assert!(find_condition(&status_done.conditions, SCALE_DOWN_BLOCKED).is_none());
        assert_eq!(status_done.replicas, Some(3));
    }
}
