//! Reconcilers, one per kind, and what they share: the context, status conditions,
//! events and the retry policy.
//!
//! Each reconcile computes the desired state from the object alone and applies it
//! (server-side apply for Kubernetes objects; for the broker, a read and a create or
//! update only where it differs), so running it twice, or after a restart, is harmless.
//! A reconcile writes status only when the status changes, and the controllers ignore
//! status-only changes of the objects they reconcile: a status patch must not trigger
//! the next pass. Periodic requeues catch what changes outside Kubernetes.

pub mod broker_object;
pub mod cluster;
pub mod roll;
pub mod scale;
pub mod tls;
pub mod user;

use std::collections::HashMap;
use std::fmt::Debug;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::broker::BrokerConnector;
use crate::builders::FIELD_MANAGER;
use crate::crd::EventterCluster;
use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// First retry delay after a failed reconcile; doubles per consecutive failure.
pub const RETRY_DELAY_MIN: Duration = Duration::from_secs(2);
/// Longest retry delay after failed reconciles.
pub const RETRY_DELAY_MAX: Duration = Duration::from_secs(300);
/// Consecutive failures counted per object at most (2 s * 2^8 > RETRY_DELAY_MAX).
const FAILURES_COUNT_MAX: u32 = 9;

/// What every reconcile gets.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub broker: BrokerConnector,
    /// How often a ConsumerGroup in sync is reconciled again to refresh the lag in its
    /// status (capped by the resync period; a status write only when it changed).
    pub group_status_period: Duration,
    /// Consecutive failures per object (`kind/namespace/name`), for the retry backoff.
    /// Bounded by the number of objects watched; entries go on success.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    pub fn new(client: Client, metrics: Arc<Metrics>, broker: BrokerConnector, instance: Option<String>) -> Self {
        let reporter = Reporter { controller: FIELD_MANAGER.to_string(), instance };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            broker,
            group_status_period: broker_object::GROUP_STATUS_PERIOD_DEFAULT,
            failures: Mutex::new(HashMap::new()),
        }
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        // A panic while holding the lock leaves only a counter behind: keep going.
        self.failures.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets the failures of `key` after a successful reconcile.
    pub fn succeeded(&self, key: &str) {
        self.failures().remove(key);
    }

    /// Records a failure of `key` and returns how long to wait before the next try.
    pub fn failed(&self, key: &str) -> Duration {
        let mut failures = self.failures();
        let count = failures.entry(key.to_string()).or_insert(0);
        *count = (*count + 1).min(FAILURES_COUNT_MAX);
        retry_delay(*count)
    }

    /// Publishes an event about `obj`; a failure is logged, never fatal.
    pub async fn publish<K: Resource<DynamicType = ()>>(&self, obj: &K, type_: EventType, reason: &str, note: String) {
        let event = Event {
            type_,
            reason: reason.to_string(),
            note: Some(truncate(note, 1000)),
            action: "Reconcile".to_string(),
            secondary: None,
        };
        if let Err(error) = self.recorder.publish(&event, &obj.object_ref(&())).await {
            tracing::warn!(%error, object = %obj.name_any(), reason, "publishing an event failed");
        }
    }
}

/// Delay before retry number `failures` (1-based): 2 s, 4 s, 8 s ... capped at 5 min.
pub fn retry_delay(failures: u32) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    RETRY_DELAY_MIN.saturating_mul(factor).min(RETRY_DELAY_MAX)
}

/// Key of an object in the failure counters.
pub fn object_key<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    format!("{}/{}/{}", K::kind(&()), obj.namespace().unwrap_or_default(), obj.name_any())
}

/// The `error_policy` of every controller: log, count, back off per object.
pub fn error_policy<K: Resource<DynamicType = ()>>(
    obj: Arc<K>,
    error: &Error,
    ctx: Arc<Context>,
    controller: &str,
) -> Action {
    let delay = ctx.failed(&object_key(obj.as_ref()));
    tracing::warn!(%error, controller, object = %object_key(obj.as_ref()), retry_in_ms = delay.as_millis() as u64, "reconcile failed");
    ctx.metrics.reconcile_failed(controller, error);
    Action::requeue(delay)
}

fn truncate(mut s: String, len_max: usize) -> String {
    if s.len() > len_max {
        let mut end = len_max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// Condition types.
pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";
/// Of an EventterCluster: the operator's own broker credentials are usable.
pub const CREDENTIALS_READY: &str = "CredentialsReady";
/// Condition type of an EventterCluster with `spec.tls`: its certificates' Secret is
/// there and usable (False names the field).
pub const TLS_READY: &str = "TLSReady";
/// Of an EventterCluster: the brokers refused to decommission a broker of a pod a
/// scale-down removes, so the StatefulSet keeps its replicas.
pub const SCALE_DOWN_BLOCKED: &str = "ScaleDownBlocked";

/// A condition of `type_`, keeping the previous transition time when the status did
/// not change.
pub fn condition(
    previous: &[Condition],
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
) -> Condition {
    let status = if status { "True" } else { "False" };
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| Time(Timestamp::now()));
    Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message: truncate(message.into(), 32_768),
        observed_generation: generation,
        last_transition_time,
    }
}

/// Finds a condition by type.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

fn hash_of(value: &impl Hash) -> u64 {
    let mut hasher = DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

/// Watch predicate of Topics and ConsumerGroups: what their reconcile acts on. The
/// spec (metadata.generation), the finalizers (the finalizer helper adds ours and waits
/// for the change to come back) and the deletion mark; not the status, which the
/// reconciler writes itself.
pub fn spec_or_lifecycle_changed<K: Resource>(obj: &K) -> Option<u64> {
    let meta = obj.meta();
    Some(hash_of(&(meta.generation, &meta.finalizers, meta.deletion_timestamp.is_some())))
}

/// Watch predicate of EventterClusters as seen by the Topic and ConsumerGroup
/// controllers: their spec, and whether they are Ready (objects waiting for a cluster
/// go on once it is). The rest of the status (members, the Raft index, ready pods)
/// changes all the time and says nothing to them.
pub fn cluster_readiness_changed(cluster: &EventterCluster) -> Option<u64> {
    let ready = cluster.status.as_ref().and_then(|s| find_condition(&s.conditions, READY)).map(|c| &c.status);
    Some(hash_of(&(cluster.meta().generation, ready, cluster.meta().deletion_timestamp.is_some())))
}

/// Writes `status` through the status subresource with server-side apply.
pub async fn apply_status<K, S>(api: &Api<K>, name: &str, status: &S) -> Result<()>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    S: Serialize,
{
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_doubles_and_caps() {
        assert_eq!(retry_delay(1), Duration::from_secs(2));
        assert_eq!(retry_delay(2), Duration::from_secs(4));
        assert_eq!(retry_delay(5), Duration::from_secs(32));
        assert_eq!(retry_delay(8), Duration::from_secs(256));
        assert_eq!(retry_delay(FAILURES_COUNT_MAX), RETRY_DELAY_MAX);
        assert_eq!(retry_delay(u32::MAX), RETRY_DELAY_MAX);
    }

    fn topic() -> crate::crd::Topic {
        let spec = serde_json::from_value(serde_json::json!({"clusterRef": "emq"})).unwrap();
        let mut topic = crate::crd::Topic::new("orders", spec);
        topic.metadata.generation = Some(1);
        topic
    }

    #[test]
    fn topic_trigger_ignores_status_but_not_spec_finalizers_or_deletion() {
        let before = topic();
        let mut status_only = before.clone();
        status_only.status = Some(crate::crd::BrokerObjectStatus {
            cluster_state_index: Some(8),
            ..crate::crd::BrokerObjectStatus::default()
        });
        status_only.metadata.resource_version = Some("101".into());
        assert_eq!(spec_or_lifecycle_changed(&status_only), spec_or_lifecycle_changed(&before));
        let mut spec = before.clone();
        spec.metadata.generation = Some(2);
        assert_ne!(spec_or_lifecycle_changed(&spec), spec_or_lifecycle_changed(&before));
        let mut finalized = before.clone();
        finalized.metadata.finalizers = Some(vec!["eventter.io/topic".into()]);
        assert_ne!(spec_or_lifecycle_changed(&finalized), spec_or_lifecycle_changed(&before));
        let mut deleted = before.clone();
        deleted.metadata.deletion_timestamp = Some(Time(Timestamp::UNIX_EPOCH));
        assert_ne!(spec_or_lifecycle_changed(&deleted), spec_or_lifecycle_changed(&before));
    }

    #[test]
    fn cluster_trigger_follows_spec_and_readiness_only() {
        let spec = serde_json::from_value(serde_json::json!({"image": "x"})).unwrap();
        let mut cluster = EventterCluster::new("emq", spec);
        cluster.metadata.generation = Some(1);
        let with_ready = |cluster: &EventterCluster, ready: bool, index: u64| {
            let mut cluster = cluster.clone();
            cluster.status = Some(crate::crd::EventterClusterStatus {
                conditions: vec![condition(&[], READY, ready, "r", "m", Some(1))],
                cluster_state_index: Some(index),
                ..crate::crd::EventterClusterStatus::default()
            });
            cluster
        };
        let not_ready = with_ready(&cluster, false, 5);
        assert_eq!(cluster_readiness_changed(&with_ready(&cluster, false, 90)), cluster_readiness_changed(&not_ready));
        assert_ne!(cluster_readiness_changed(&with_ready(&cluster, true, 5)), cluster_readiness_changed(&not_ready));
        let mut scaled = not_ready.clone();
        scaled.metadata.generation = Some(2);
        assert_ne!(cluster_readiness_changed(&scaled), cluster_readiness_changed(&not_ready));
    }

    #[test]
    fn condition_keeps_transition_time_while_status_holds() {
        let first = condition(&[], READY, false, "Rejected", "no", Some(1));
        let mut earlier = first.clone();
        earlier.last_transition_time = Time(Timestamp::UNIX_EPOCH);
        let same = condition(&[earlier.clone()], READY, false, "Other", "still no", Some(2));
        assert_eq!(same.last_transition_time, earlier.last_transition_time);
        let flipped = condition(&[earlier.clone()], READY, true, "Synced", "", Some(2));
        assert_ne!(flipped.last_transition_time, earlier.last_transition_time);
    }
}
