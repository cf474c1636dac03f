//! Reconciler of the resources that live inside a broker cluster: `Topic` and
//! `ConsumerGroup`. Both follow the same steps, so one generic reconciler serves both
//! through [`BrokerObject`].
//!
//! Apply: find the EventterCluster, read the object from the broker, and only when the
//! broker does not hold it as specified create it (and its namespace) or update it;
//! record the outcome in the Ready condition. Every broker write is a Raft log entry,
//! even an idempotent one, and a status patch is a watch event: writing or patching on
//! every pass would feed itself (each pass's status patch triggering the next pass).
//! So an object in sync costs reads only, and its status is left alone.
//!
//! Cleanup (the finalizer): delete it from the broker unless `deletionPolicy: Retain`,
//! or unless it never was in sync (then the broker object of that name is not ours).

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use eventtermq_proto::v1 as pb;
use futures::StreamExt;
use k8s_openapi::NamespaceResourceScope;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{finalizer, Event as FinalizerEvent};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{watcher, Controller, WatchStreamExt};
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{
    apply_status, cluster_readiness_changed, condition, error_policy, find_condition, object_key,
    spec_or_lifecycle_changed, Context, READY,
};
use crate::broker::{self, Admin, Refusal};
use crate::crd::{
    parse_duration_ms, BrokerObjectStatus, ConsumerGroup, ConsumerGroupLag, ConsumerGroupStatus, DeletionPolicy,
    EventterCluster, ExchangeType, Topic,
};
use crate::credentials;
use crate::error::{Error, Result};

/// How often an object in sync is checked again (the broker may have lost or changed
/// it without Kubernetes knowing). Status-only changes do not trigger a reconcile, so
/// this is what repairs drift in the broker.
pub const RESYNC_PERIOD: Duration = Duration::from_secs(300);
/// Retry delay while the EventterCluster or a dependency (a bound topic) is missing.
pub const DEPENDENCY_RETRY_DELAY: Duration = Duration::from_secs(15);
/// Default of [`Context::group_status_period`] (`--group-status-period-ms`): how often
/// a ConsumerGroup in sync reads its lag again.
pub const GROUP_STATUS_PERIOD_DEFAULT: Duration = Duration::from_secs(15);

/// What to create in the broker.
pub enum BrokerWrite {
    Topic(pb::Topic),
    ConsumerGroup(pb::ConsumerGroup),
}

/// A custom resource that mirrors an object inside a broker cluster.
pub trait BrokerObject:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + Debug
    + Serialize
    + DeserializeOwned
    + Send
    + Sync
    + 'static
{
    /// Controller name in logs and metrics.
    const CONTROLLER: &'static str;
    /// Finalizer that keeps the resource until the broker object is gone.
    const FINALIZER: &'static str;
    /// Human name of the kind in messages ("topic", "consumer group").
    const NOUN: &'static str;
    /// Whether the status carries the group's lag, read from the broker on every pass.
    const REPORTS_LAG: bool;
    /// The whole status subresource.
    type Status: Serialize + Clone + PartialEq + Send + Sync;

    fn cluster_ref(&self) -> &str;
    fn broker_namespace(&self) -> &str;
    /// Name in the broker: `spec.name`, else `metadata.name`.
    fn broker_name(&self) -> String;
    fn deletion_policy(&self) -> DeletionPolicy;
    /// The Ready condition and index part of the status.
    fn current_status(&self) -> Option<&BrokerObjectStatus>;
    /// The status with `object` as its condition part and, for a kind that
    /// [`REPORTS_LAG`](Self::REPORTS_LAG), `lag` as read now (`None`: keep what the
    /// status holds).
    fn status_with(&self, object: BrokerObjectStatus, lag: Option<ConsumerGroupLag>) -> Self::Status;
    /// The status as it is (default when unset).
    fn full_status(&self) -> Self::Status;
    /// How soon a pass over an object in sync comes back.
    fn in_sync_period(ctx: &Context) -> Duration;
    /// The broker object the spec asks for, or why the spec cannot be turned into one.
    fn desired(&self) -> std::result::Result<BrokerWrite, String>;
}

impl BrokerObject for Topic {
    const CONTROLLER: &'static str = "topic";
    const FINALIZER: &'static str = "eventter.io/topic";
    const NOUN: &'static str = "topic";
    const REPORTS_LAG: bool = false;
    type Status = BrokerObjectStatus;

    fn cluster_ref(&self) -> &str {
        &self.spec.cluster_ref
    }

    fn broker_namespace(&self) -> &str {
        &self.spec.namespace
    }

    fn broker_name(&self) -> String {
        self.spec.name.clone().unwrap_or_else(|| self.name_any())
    }

    fn deletion_policy(&self) -> DeletionPolicy {
        self.spec.deletion_policy
    }

    fn current_status(&self) -> Option<&BrokerObjectStatus> {
        self.status.as_ref()
    }

    fn status_with(&self, object: BrokerObjectStatus, _: Option<ConsumerGroupLag>) -> BrokerObjectStatus {
        object
    }

    fn full_status(&self) -> BrokerObjectStatus {
        self.status.clone().unwrap_or_default()
    }

    fn in_sync_period(_: &Context) -> Duration {
        RESYNC_PERIOD
    }

    fn desired(&self) -> std::result::Result<BrokerWrite, String> {
        let spec = &self.spec;
        let retention_ms = parse_duration_ms(&spec.retention).ok_or_else(|| {
            format!("retention: {:?} is not a duration such as \"0\", \"7d\" or \"1h30m\"", spec.retention)
        })?;
        Ok(BrokerWrite::Topic(pb::Topic {
            name: self.broker_name(),
            shards: spec.shards,
            replication_factor: spec.replication_factor,
            retention: Some(duration_to_pb(retention_ms)),
            default_exchange_type: spec.default_exchange_type.as_str().to_string(),
            under_replicated: false,
            segment_size_max_bytes: 0,
            min_insync_replicas: spec.min_insync_replicas.unwrap_or(0),
            retention_bytes_max: spec.retention_bytes_max,
            segment_age_max_ms: spec.segment_age_max_ms,
            retention_overrides_consumers: spec.retention_overrides_consumers,
            shard_key: spec.shard_key.clone().unwrap_or_default(),
            retained_bytes: 0,
            retained_since: None,
        }))
    }
}

impl BrokerObject for ConsumerGroup {
    const CONTROLLER: &'static str = "consumergroup";
    const FINALIZER: &'static str = "eventter.io/consumergroup";
    const NOUN: &'static str = "consumer group";
    const REPORTS_LAG: bool = true;
    type Status = ConsumerGroupStatus;

    fn cluster_ref(&self) -> &str {
        &self.spec.cluster_ref
    }

    fn broker_namespace(&self) -> &str {
        &self.spec.namespace
    }

    fn broker_name(&self) -> String {
        self.spec.name.clone().unwrap_or_else(|| self.name_any())
    }

    fn deletion_policy(&self) -> DeletionPolicy {
        self.spec.deletion_policy
    }

    fn current_status(&self) -> Option<&BrokerObjectStatus> {
        self.status.as_ref().map(|s| &s.object)
    }

    fn status_with(&self, object: BrokerObjectStatus, lag: Option<ConsumerGroupLag>) -> ConsumerGroupStatus {
        let lag = lag.unwrap_or_else(|| self.status.as_ref().map(|s| s.lag.clone()).unwrap_or_default());
        ConsumerGroupStatus { object, lag }
    }

    fn full_status(&self) -> ConsumerGroupStatus {
        self.status.clone().unwrap_or_default()
    }

    /// The lag in the status is only as fresh as the last pass.
    fn in_sync_period(ctx: &Context) -> Duration {
        ctx.group_status_period.min(RESYNC_PERIOD)
    }

    fn desired(&self) -> std::result::Result<BrokerWrite, String> {
        let spec = &self.spec;
        let bindings = spec
            .bindings
            .iter()
            .map(|b| pb::Binding {
                topic: b.topic.clone(),
                exchange_type: b.exchange_type.map(ExchangeType::as_str).unwrap_or_default().to_string(),
                routing_key: b.routing_key.clone().unwrap_or_default(),
                headers: b.headers.clone().into_iter().collect(),
                headers_match: b.headers_match.map(|m| m.as_str()).unwrap_or_default().to_string(),
            })
            .collect();
        let since = spec
            .since
            .as_ref()
            .map(|t| prost_types::Timestamp { seconds: t.0.as_second(), nanos: t.0.subsec_nanosecond() });
        Ok(BrokerWrite::ConsumerGroup(pb::ConsumerGroup {
            name: self.broker_name(),
            bindings,
            size: spec.size,
            since,
            ack_timeout_ms: spec.ack_timeout_ms,
            deliveries_max: spec.deliveries_max,
            dead_letter_topic: spec.dead_letter_topic.clone().unwrap_or_default(),
            dead_letter_routing_key: spec.dead_letter_routing_key.clone().unwrap_or_default(),
            message_ttl_ms: spec.message_ttl_ms,
            ready_messages_max: spec.ready_messages_max,
            ready_bytes_max: spec.ready_bytes_max,
            ..Default::default()
        }))
    }
}

fn duration_to_pb(ms: u64) -> prost_types::Duration {
    prost_types::Duration { seconds: (ms / 1000) as i64, nanos: ((ms % 1000) * 1_000_000) as i32 }
}

/// Reconciles one Topic or ConsumerGroup.
pub async fn reconcile<K: BrokerObject>(obj: Arc<K>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started(K::CONTROLLER);
    let key = object_key(obj.as_ref());
    let namespace = obj.namespace().ok_or_else(|| Error::InvalidObject(format!("{key} has no namespace")))?;
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &namespace);
    let action = finalizer(&api, K::FINALIZER, obj, |event| async {
        match event {
            FinalizerEvent::Apply(obj) => apply(obj, &ctx, &api, &namespace).await,
            FinalizerEvent::Cleanup(obj) => cleanup(obj, &ctx, &namespace).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))?;
    ctx.succeeded(&key);
    Ok(action)
}

/// Records the Ready condition (and an event when it changes) and, for a group, the
/// lag read in this pass (`None`: keep the status's), skipping the write when nothing
/// changed.
#[allow(clippy::too_many_arguments)]
async fn set_ready<K: BrokerObject>(
    obj: &K,
    ctx: &Context,
    api: &Api<K>,
    ready: bool,
    reason: &str,
    message: String,
    cluster_state_index: Option<u64>,
    lag: Option<ConsumerGroupLag>,
) -> Result<()> {
    let previous = obj.current_status().cloned().unwrap_or_default();
    let ready_condition = condition(&previous.conditions, READY, ready, reason, message.clone(), obj.meta().generation);
    let changed = find_condition(&previous.conditions, READY)
        .is_none_or(|c| c.status != ready_condition.status || c.reason != ready_condition.reason);
    let object = BrokerObjectStatus {
        conditions: vec![ready_condition],
        observed_generation: obj.meta().generation,
        cluster_state_index: cluster_state_index.or(previous.cluster_state_index),
    };
    let status = obj.status_with(object, lag);
    if status != obj.full_status() {
        apply_status(api, &obj.name_any(), &status).await?;
    }
    if changed {
        let type_ = if ready { EventType::Normal } else { EventType::Warning };
        ctx.publish(obj, type_, reason, message).await;
    }
    Ok(())
}

async fn apply<K: BrokerObject>(obj: Arc<K>, ctx: &Context, api: &Api<K>, namespace: &str) -> Result<Action> {
    let clusters: Api<EventterCluster> = Api::namespaced(ctx.client.clone(), namespace);
    let Some(cluster) = clusters.get_opt(obj.cluster_ref()).await? else {
        let message = format!("EventterCluster {:?} not found in namespace {namespace:?}", obj.cluster_ref());
        set_ready(obj.as_ref(), ctx, api, false, "ClusterNotFound", message, None, None).await?;
        return Ok(Action::requeue(DEPENDENCY_RETRY_DELAY));
    };
    let write = match obj.desired() {
        Ok(write) => write,
        Err(message) => {
            set_ready(obj.as_ref(), ctx, api, false, "Rejected", message, None, None).await?;
            return Ok(Action::await_change());
        }
    };
    let credentials = match credentials::load(&ctx.client, &cluster).await? {
        credentials::Found::Usable { credentials, .. } => credentials,
        credentials::Found::Missing(message) => {
            set_ready(obj.as_ref(), ctx, api, false, "CredentialsMissing", message, None, None).await?;
            return Ok(Action::requeue(DEPENDENCY_RETRY_DELAY));
        }
        credentials::Found::Invalid(message) => {
            set_ready(obj.as_ref(), ctx, api, false, "CredentialsInvalid", message, None, None).await?;
            return Ok(Action::requeue(DEPENDENCY_RETRY_DELAY));
        }
    };
    let address = ctx.broker.address(&cluster);
    let synced = match ctx.broker.connect(&address, &credentials).await {
        Ok(mut admin) => sync_to_broker(&mut admin, obj.broker_namespace(), write).await.map(|o| (admin, o)),
        Err(error) => Err(error),
    };
    let (mut admin, outcome) = match synced {
        Ok(synced) => synced,
        Err(error) => {
            let reason = match error {
                Error::BrokerUnavailable { .. } => Some("BrokerUnavailable"),
                Error::BrokerUnauthenticated { .. } => Some("BrokerUnauthenticated"),
                _ => None,
            };
            if let Some(reason) = reason {
                set_ready(obj.as_ref(), ctx, api, false, reason, error.to_string(), None, None).await?;
            }
            return Err(error);
        }
    };
    match outcome {
        Ok(synced) => {
            let index = match synced {
                Synced::Written { index } => index,
                // Nothing written: keep the index of the operator's last write, so that
                // the status of an object in sync does not change from pass to pass. An
                // object found already in place on its first pass records the read.
                Synced::AlreadyHeld { read_index } => {
                    obj.current_status().and_then(|s| s.cluster_state_index).unwrap_or(read_index)
                }
            };
            let message = format!(
                "{} {:?} is in sync in broker namespace {:?}",
                K::NOUN,
                obj.broker_name(),
                obj.broker_namespace()
            );
            let lag = if K::REPORTS_LAG {
                Some(read_lag(&mut admin, obj.broker_namespace(), &obj.broker_name(), &cluster).await)
            } else {
                None
            };
            set_ready(obj.as_ref(), ctx, api, true, "Synced", message, Some(index), lag).await?;
            Ok(Action::requeue(K::in_sync_period(ctx)))
        }
        Err(Refusal::Rejected(message)) => {
            // The same spec will be refused again: wait for the user to change it.
            set_ready(obj.as_ref(), ctx, api, false, "Rejected", message, None, None).await?;
            Ok(Action::await_change())
        }
        Err(Refusal::Missing(message)) => {
            set_ready(obj.as_ref(), ctx, api, false, "DependencyMissing", message, None, None).await?;
            Ok(Action::requeue(DEPENDENCY_RETRY_DELAY))
        }
    }
}

/// What a pass found or did in the broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Synced {
    /// The broker already held the object as specified; nothing was written. The Raft
    /// index of the state that read saw.
    AlreadyHeld { read_index: u64 },
    /// The operator created or changed it; the Raft index of its last write.
    Written { index: u64 },
}

/// The lag of group `name` as its broker reports it now. A group the broker cannot
/// describe (not placed or running yet, its node unreachable) gets no lag and the
/// reason; the reconcile goes on either way, since the group itself is in sync.
async fn read_lag(admin: &mut Admin, namespace: &str, name: &str, cluster: &EventterCluster) -> ConsumerGroupLag {
    match admin.describe_consumer_group(namespace, name).await {
        Ok(Some(described)) => group_lag(&described, cluster),
        Ok(None) => ConsumerGroupLag {
            lag_error: Some(format!("the broker does not describe group {name:?}")),
            ..ConsumerGroupLag::default()
        },
        Err(error) => {
            ConsumerGroupLag { lag_error: Some(format!("cannot read the lag: {error}")), ..ConsumerGroupLag::default() }
        }
    }
}

/// The status's lag part from a broker's description of the group; the pod running it
/// comes from the members the EventterCluster's status lists.
pub fn group_lag(described: &pb::ConsumerGroupStatus, cluster: &EventterCluster) -> ConsumerGroupLag {
    let node_id = (described.node_id != 0).then(|| described.node_id.to_string());
    let node = node_id.as_ref().and_then(|id| {
        let members = cluster.status.as_ref().map(|s| s.members.as_slice()).unwrap_or_default();
        members.iter().find(|m| &m.id == id).map(|m| crate::builders::pod_of_address(&m.address))
    });
    if !described.running {
        let error =
            if described.error.is_empty() { "the group is not running".to_string() } else { described.error.clone() };
        return ConsumerGroupLag { node, node_id, lag_error: Some(error), ..ConsumerGroupLag::default() };
    }
    ConsumerGroupLag {
        lag: Some(described.lag),
        topic_lag: described.topic_lag.iter().map(|(t, n)| (t.clone(), *n)).collect(),
        oldest_unacked_seconds: Some(described.oldest_unacked_age.map(|d| d.seconds.max(0) as u64).unwrap_or(0)),
        subscribers: Some(described.subscribers),
        node,
        node_id,
        lag_error: None,
    }
}

/// Makes the broker hold `write` in `namespace`, writing only what differs.
async fn sync_to_broker(
    admin: &mut Admin,
    namespace: &str,
    write: BrokerWrite,
) -> Result<std::result::Result<Synced, Refusal>> {
    let written = match write {
        BrokerWrite::Topic(topic) => match admin.list_topics(namespace).await? {
            None => create_namespace_then(admin, namespace, BrokerWrite::Topic(topic)).await?,
            Some(listed) => match listed.items.iter().find(|t| t.name == topic.name) {
                Some(held) if eventtermq_api::same::topic_in_sync(&topic, held) => {
                    return Ok(Ok(Synced::AlreadyHeld { read_index: listed.index }))
                }
                Some(_) => admin.update_topic(namespace, topic).await?,
                None => admin.apply_topic(namespace, topic).await?,
            },
        },
        BrokerWrite::ConsumerGroup(group) => match admin.list_consumer_groups(namespace).await? {
            None => create_namespace_then(admin, namespace, BrokerWrite::ConsumerGroup(group)).await?,
            Some(listed) => {
                if let Some(held) = listed.items.iter().find(|g| g.name == group.name) {
                    let topics = admin.list_topics(namespace).await?.map(|t| t.items).unwrap_or_default();
                    if eventtermq_api::same::consumer_group_in_sync(&group, held, &topics) {
                        return Ok(Ok(Synced::AlreadyHeld { read_index: listed.index }));
                    }
                }
                // Missing, or different: the broker has no update for groups, and its
                // answer to the create (AlreadyExists, or NotFound for a bound topic)
                // is what the status shows.
                admin.apply_consumer_group(namespace, group).await?
            }
        },
    };
    Ok(written.map(|index| Synced::Written { index }))
}

/// Creates the missing broker namespace, then the object in it.
async fn create_namespace_then(admin: &mut Admin, namespace: &str, write: BrokerWrite) -> Result<broker::WriteOutcome> {
    if let Err(refusal) = admin.ensure_namespace(namespace).await? {
        return Ok(Err(refusal));
    }
    match write {
        BrokerWrite::Topic(topic) => admin.apply_topic(namespace, topic).await,
        BrokerWrite::ConsumerGroup(group) => admin.apply_consumer_group(namespace, group).await,
    }
}

/// The broker connection a finalizer deletes through: `None` when the cluster is gone
/// or being deleted (what it held goes with it); an error, which keeps the finalizer
/// until the broker copy can be deleted, when the operator's credential cannot be used.
pub(super) async fn cleanup_admin(ctx: &Context, namespace: &str, cluster_ref: &str) -> Result<Option<Admin>> {
    let clusters: Api<EventterCluster> = Api::namespaced(ctx.client.clone(), namespace);
    let cluster = clusters.get_opt(cluster_ref).await?;
    let Some(cluster) = cluster.filter(|c| c.meta().deletion_timestamp.is_none()) else { return Ok(None) };
    let credentials = match credentials::load(&ctx.client, &cluster).await? {
        credentials::Found::Usable { credentials, .. } => credentials,
        credentials::Found::Missing(message) | credentials::Found::Invalid(message) => {
            return Err(Error::Credentials(message))
        }
    };
    Ok(Some(ctx.broker.connect(&ctx.broker.address(&cluster), &credentials).await?))
}

async fn cleanup<K: BrokerObject>(obj: Arc<K>, ctx: &Context, namespace: &str) -> Result<Action> {
    let name = obj.broker_name();
    let broker_namespace = obj.broker_namespace();
    if obj.deletion_policy() == DeletionPolicy::Retain {
        let note = format!("{} {name:?} kept in the broker (deletionPolicy Retain)", K::NOUN);
        ctx.publish(obj.as_ref(), EventType::Normal, "Retained", note).await;
        return Ok(Action::await_change());
    }
    if obj.current_status().and_then(|s| s.cluster_state_index).is_none() {
        // Never in sync: the broker object of that name, if any, is not this resource's
        // (e.g. the create was refused with AlreadyExists). Deleting it would destroy
        // someone else's data; leaving a stray object is the safer mistake.
        let note = format!("{} {name:?} was never in sync: not deleted from the broker", K::NOUN);
        ctx.publish(obj.as_ref(), EventType::Normal, "NotDeleted", note).await;
        return Ok(Action::await_change());
    }
    let Some(mut admin) = cleanup_admin(ctx, namespace, obj.cluster_ref()).await? else {
        // The cluster, and with it the broker's copy, is gone or going.
        return Ok(Action::await_change());
    };
    match obj.desired() {
        Ok(BrokerWrite::Topic(_)) => admin.delete_topic(broker_namespace, &name).await?,
        Ok(BrokerWrite::ConsumerGroup(_)) => admin.delete_consumer_group(broker_namespace, &name).await?,
        // A spec that never made it into the broker has nothing to delete.
        Err(_) => return Ok(Action::await_change()),
    }
    let note = format!("{} {name:?} deleted from broker namespace {broker_namespace:?}", K::NOUN);
    ctx.publish(obj.as_ref(), EventType::Normal, "Deleted", note).await;
    Ok(Action::await_change())
}

/// Runs the controller of `K` until `shutdown` resolves. An object is reconciled when
/// its spec, finalizers or deletion change (not its status, which the reconciler
/// writes itself), when its EventterCluster's spec or readiness changes, and every
/// [`RESYNC_PERIOD`] while in sync.
pub async fn run<K: BrokerObject>(
    ctx: Arc<Context>,
    api: Api<K>,
    clusters: Api<EventterCluster>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let (reader, writer) = reflector::store();
    // The store sees every change (status included); only the triggers are filtered.
    let objects = watcher(api, watcher::Config::default().any_semantic())
        .reflect(writer)
        .applied_objects()
        .predicate_filter(spec_or_lifecycle_changed::<K>, Default::default());
    let cluster_changes = watcher(clusters, watcher::Config::default().any_semantic())
        .touched_objects()
        .predicate_filter(cluster_readiness_changed, Default::default());
    let store = reader.clone();
    Controller::for_stream(objects, reader)
        .watches_stream(cluster_changes, move |cluster: EventterCluster| {
            let cluster_namespace = cluster.namespace();
            let cluster_name = cluster.name_any();
            store
                .state()
                .into_iter()
                .filter(|o| o.namespace() == cluster_namespace && o.cluster_ref() == cluster_name)
                .map(|o| ObjectRef::from_obj(o.as_ref()))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(shutdown)
        .run(reconcile::<K>, |obj, error, ctx| error_policy(obj, error, ctx, K::CONTROLLER), ctx)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, controller = K::CONTROLLER, "reconcile result");
            }
        })
        .await;
}
