//! Reconciler of `User`: a user of a broker cluster's client APIs, its password from a
//! Secret and its permissions per broker namespace, written with the operator's own
//! administrator credential.
//!
//! Apply: check the spec (user name, every permission pattern) and read the password
//! Secret before anything is written, so that a bad spec or Secret changes nothing.
//! Then read the users (one linearizable read) and write only what differs: create
//! the user when missing; set its password again when the Secret changed since the
//! operator last set it (the status keeps the Secret's uid and resourceVersion, never
//! the password or a hash: the broker lists no hash to compare with); set or clear
//! the permissions of each namespace that differs (creating a missing namespace).
//!
//! Cleanup (the finalizer): delete the user from the broker unless `deletionPolicy:
//! Retain`, or unless it never was in sync.

use std::collections::BTreeMap;
use std::sync::Arc;

use eventtermq_proto::v1 as pb;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::PostParams;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{finalizer, Event as FinalizerEvent};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{watcher, Controller, WatchStreamExt};
use kube::{Api, Resource, ResourceExt};

use super::broker_object::{cleanup_admin, DEPENDENCY_RETRY_DELAY, RESYNC_PERIOD};
use super::{
    apply_status, cluster_readiness_changed, condition, error_policy, find_condition, object_key,
    spec_or_lifecycle_changed, Context, READY,
};
use crate::broker::{Admin, Refusal};
use crate::builders;
use crate::crd::{
    BrokerObjectStatus, DeletionPolicy, EventterCluster, User, UserStatus, PERMISSION_PATTERN_COMPILED_SIZE_MAX_BYTES,
    PERMISSION_PATTERN_LEN_MAX, USER_NAME_LEN_MAX,
};
use crate::credentials::{self, OPERATOR_USER};
use crate::error::{Error, Result};

/// Controller name in logs and metrics.
pub const CONTROLLER: &str = "user";
/// Finalizer that keeps the resource until the broker user is gone.
pub const FINALIZER: &str = "eventter.io/user";

/// Name of the user in the broker: `spec.name`, else `metadata.name`.
pub fn broker_name(user: &User) -> String {
    user.spec.name.clone().unwrap_or_else(|| user.name_any())
}

/// The permissions the spec asks for, by namespace, or why the spec cannot be applied
/// (naming the field). Checked as the brokers check them (user name, pattern length,
/// each pattern a regular expression within the compiled-size limit), before anything
/// is written.
pub fn desired_permissions(user: &User) -> std::result::Result<BTreeMap<String, pb::Permissions>, String> {
    let name = broker_name(user);
    let name_ok = name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'));
    if name.is_empty() || name.len() > USER_NAME_LEN_MAX || !name_ok {
        let field = if user.spec.name.is_some() { "spec.name" } else { "metadata.name (the default of spec.name)" };
        return Err(format!(
            "{field}: {name:?} is not a valid user name (1-{USER_NAME_LEN_MAX} characters of A-Z a-z 0-9 . _ @ -)"
        ));
    }
    if name == OPERATOR_USER {
        return Err(format!("spec.name: {name:?} is the operator's own user; choose another name"));
    }
    let mut out = BTreeMap::new();
    for p in &user.spec.permissions {
        for (field, pattern) in [("configure", &p.configure), ("write", &p.write), ("read", &p.read)] {
            let field = format!("spec.permissions[namespace={:?}].{field}", p.namespace);
            check_pattern(&field, pattern)?;
        }
        let permissions =
            pb::Permissions { configure: p.configure.clone(), write: p.write.clone(), read: p.read.clone() };
        if out.insert(p.namespace.clone(), permissions).is_some() {
            return Err(format!("spec.permissions: namespace {:?} is listed twice", p.namespace));
        }
    }
    Ok(out)
}

fn check_pattern(field: &str, pattern: &str) -> std::result::Result<(), String> {
    if pattern.len() > PERMISSION_PATTERN_LEN_MAX {
        return Err(format!("{field}: is longer than {PERMISSION_PATTERN_LEN_MAX} bytes"));
    }
    if pattern.is_empty() {
        return Ok(());
    }
    regex::RegexBuilder::new(pattern).size_limit(PERMISSION_PATTERN_COMPILED_SIZE_MAX_BYTES).build().map_err(|e| {
        let reason = e.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
        format!("{field}: {pattern:?} is not a valid regular expression: {reason}")
    })?;
    Ok(())
}

/// What identifies the content of a Secret: its uid and resourceVersion.
pub fn secret_version(secret: &Secret) -> String {
    format!("{}/{}", secret.uid().unwrap_or_default(), secret.resource_version().unwrap_or_default())
}

/// Reconciles one User.
pub async fn reconcile(obj: Arc<User>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started(CONTROLLER);
    let key = object_key(obj.as_ref());
    let namespace = obj.namespace().ok_or_else(|| Error::InvalidObject(format!("{key} has no namespace")))?;
    let api: Api<User> = Api::namespaced(ctx.client.clone(), &namespace);
    let action = finalizer(&api, FINALIZER, obj, |event| async {
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

/// What a pass changes in the status besides the Ready condition.
#[derive(Default)]
struct StatusUpdate {
    /// The Raft index to record (`None`: keep the status's).
    index: Option<u64>,
    /// The Secret version whose password the broker now holds (`None`: keep).
    password_secret_version: Option<String>,
    /// The Secret the password comes from (`None`: keep).
    password_secret_name: Option<String>,
}

/// Records the Ready condition (and an event when it changes), skipping the write when
/// nothing changed.
async fn set_ready(
    obj: &User,
    ctx: &Context,
    api: &Api<User>,
    ready: bool,
    reason: &str,
    message: String,
    update: StatusUpdate,
) -> Result<()> {
    let previous = obj.status.clone().unwrap_or_default();
    let ready_condition =
        condition(&previous.object.conditions, READY, ready, reason, message.clone(), obj.meta().generation);
    let changed = find_condition(&previous.object.conditions, READY)
        .is_none_or(|c| c.status != ready_condition.status || c.reason != ready_condition.reason);
    let status = UserStatus {
        object: BrokerObjectStatus {
            conditions: vec![ready_condition],
            observed_generation: obj.meta().generation,
            cluster_state_index: update.index.or(previous.object.cluster_state_index),
        },
        password_secret_version: update.password_secret_version.or(previous.password_secret_version.clone()),
        password_secret_name: update.password_secret_name.or(previous.password_secret_name.clone()),
    };
    if status != previous {
        apply_status(api, &obj.name_any(), &status).await?;
    }
    if changed {
        let type_ = if ready { EventType::Normal } else { EventType::Warning };
        ctx.publish(obj, type_, reason, message).await;
    }
    Ok(())
}

async fn apply(obj: Arc<User>, ctx: &Context, api: &Api<User>, namespace: &str) -> Result<Action> {
    let clusters: Api<EventterCluster> = Api::namespaced(ctx.client.clone(), namespace);
    let Some(cluster) = clusters.get_opt(&obj.spec.cluster_ref).await? else {
        let message = format!("EventterCluster {:?} not found in namespace {namespace:?}", obj.spec.cluster_ref);
        set_ready(&obj, ctx, api, false, "ClusterNotFound", message, StatusUpdate::default()).await?;
        return Ok(Action::requeue(DEPENDENCY_RETRY_DELAY));
    };
    let permissions = match desired_permissions(&obj) {
        Ok(permissions) => permissions,
        Err(message) => {
            set_ready(&obj, ctx, api, false, "Rejected", message, StatusUpdate::default()).await?;
            return Ok(Action::await_change());
        }
    };
    // The password: a Secret missing or without a usable key is waited for (the
    // controller watches Secrets), naming the field, never a value.
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let name = broker_name(&obj);
    let (secret, key, key_field) = match &obj.spec.password_secret_ref {
        Some(secret_ref) => {
            let Some(secret) = secrets.get_opt(&secret_ref.name).await? else {
                let message = format!(
                    "spec.passwordSecretRef.name: Secret {:?} not found in namespace {namespace:?}",
                    secret_ref.name
                );
                set_ready(&obj, ctx, api, false, "SecretNotFound", message, StatusUpdate::default()).await?;
                return Ok(Action::requeue(DEPENDENCY_RETRY_DELAY));
            };
            (secret, secret_ref.key.clone(), "spec.passwordSecretRef.key")
        }
        None => match generated_secret(&obj, ctx, &secrets, &name).await? {
            Ok(secret) => (secret, credentials::PASSWORD_KEY.to_string(), "status.passwordSecretName"),
            Err(message) => {
                set_ready(&obj, ctx, api, false, "SecretConflict", message, StatusUpdate::default()).await?;
                return Ok(Action::requeue(DEPENDENCY_RETRY_DELAY));
            }
        },
    };
    let secret_name = secret.name_any();
    let password = match credentials::password_in(&secret, &key) {
        Ok(password) => password,
        Err(message) => {
            let message = format!("{key_field}: {message}");
            set_ready(&obj, ctx, api, false, "SecretInvalid", message, StatusUpdate::default()).await?;
            return Ok(Action::requeue(DEPENDENCY_RETRY_DELAY));
        }
    };
    let credentials = match credentials::load(&ctx.client, &cluster).await? {
        credentials::Found::Usable { credentials, .. } => credentials,
        credentials::Found::Missing(message) => {
            set_ready(&obj, ctx, api, false, "CredentialsMissing", message, StatusUpdate::default()).await?;
            return Ok(Action::requeue(DEPENDENCY_RETRY_DELAY));
        }
        credentials::Found::Invalid(message) => {
            set_ready(&obj, ctx, api, false, "CredentialsInvalid", message, StatusUpdate::default()).await?;
            return Ok(Action::requeue(DEPENDENCY_RETRY_DELAY));
        }
    };
    let version = secret_version(&secret);
    let known_version = obj.status.as_ref().and_then(|s| s.password_secret_version.as_deref());
    let want = Want { name: &name, admin: obj.spec.admin, password: &password, permissions: &permissions };
    let mut pass = Pass::default();
    let synced = match ctx.broker.connect(&ctx.broker.address(&cluster), &credentials).await {
        Ok(mut admin) => sync_user(&mut admin, &want, known_version != Some(version.as_str()), &mut pass).await,
        Err(error) => Err(error),
    };
    // Whatever was written stays recorded, even when a later write failed.
    let update = StatusUpdate {
        index: pass.last_index,
        password_secret_version: pass.password_set.then(|| version.clone()),
        password_secret_name: Some(secret_name.clone()),
    };
    if pass.password_set {
        let note = format!("password of user {name:?} set from Secret {secret_name:?} key {key:?}");
        ctx.publish(obj.as_ref(), EventType::Normal, "PasswordSet", note).await;
    }
    match synced {
        Ok(Ok(read_index)) => {
            let update = StatusUpdate {
                // An object found already in place on its first pass records the read.
                index: update.index.or_else(|| {
                    obj.status.as_ref().and_then(|s| s.object.cluster_state_index).is_none().then_some(read_index)
                }),
                ..update
            };
            let namespaces = permissions.keys().map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", ");
            let message = if namespaces.is_empty() {
                format!("user {name:?} is in sync, with no permissions")
            } else {
                format!("user {name:?} is in sync, with permissions on {namespaces}")
            };
            set_ready(&obj, ctx, api, true, "Synced", message, update).await?;
            Ok(Action::requeue(RESYNC_PERIOD))
        }
        Ok(Err(Refusal::Rejected(message))) => {
            set_ready(&obj, ctx, api, false, "Rejected", message, update).await?;
            Ok(Action::await_change())
        }
        Ok(Err(Refusal::Missing(message))) => {
            set_ready(&obj, ctx, api, false, "DependencyMissing", message, update).await?;
            Ok(Action::requeue(DEPENDENCY_RETRY_DELAY))
        }
        Err(error) => {
            let reason = match error {
                Error::BrokerUnavailable { .. } => Some("BrokerUnavailable"),
                Error::BrokerUnauthenticated { .. } => Some("BrokerUnauthenticated"),
                _ => None,
            };
            if let Some(reason) = reason {
                set_ready(&obj, ctx, api, false, reason, error.to_string(), update).await?;
            }
            Err(error)
        }
    }
}

/// The Secret the operator generates for a User without `passwordSecretRef`
/// ([`credentials::user_secret_name`]): read when it exists, made with a random
/// password when not (a create, never an overwrite). `Err`: a Secret of that name
/// exists that this User does not own, which the operator neither uses nor replaces.
async fn generated_secret(
    obj: &User,
    ctx: &Context,
    secrets: &Api<Secret>,
    user_name: &str,
) -> Result<std::result::Result<Secret, String>> {
    let name = credentials::user_secret_name(&obj.name_any());
    let owned = |secret: &Secret| {
        let uid = obj.uid();
        secret.owner_references().iter().any(|o| Some(&o.uid) == uid.as_ref() && o.kind == "User")
    };
    let conflict = |namespace: &str| {
        format!(
            "spec.passwordSecretRef: unset, so the operator would generate Secret {name:?}, but a Secret of that name \
             exists in namespace {namespace:?} that this User does not own; name it in spec.passwordSecretRef to use \
             it, or delete it"
        )
    };
    let namespace = obj.namespace().unwrap_or_default();
    if let Some(secret) = secrets.get_opt(&name).await? {
        return Ok(if owned(&secret) { Ok(secret) } else { Err(conflict(&namespace)) });
    }
    let secret = builders::user_credentials_secret(obj, user_name, &credentials::generate_password());
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(made) => {
            let note = format!("generated a password for user {user_name:?} in Secret {name:?}");
            ctx.publish(obj, EventType::Normal, "PasswordGenerated", note).await;
            Ok(Ok(if made.data.is_some() { made } else { secret }))
        }
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let secret = secrets.get(&name).await?;
            Ok(if owned(&secret) { Ok(secret) } else { Err(conflict(&namespace)) })
        }
        Err(e) => Err(e.into()),
    }
}

/// The user as the spec and Secret want it.
struct Want<'a> {
    name: &'a str,
    admin: bool,
    password: &'a str,
    permissions: &'a BTreeMap<String, pb::Permissions>,
}

/// What a pass wrote.
#[derive(Default)]
struct Pass {
    /// Raft index of the last write.
    last_index: Option<u64>,
    /// The password was set (created with it, or changed).
    password_set: bool,
}

/// Makes the broker hold the user as wanted, writing only what differs. `Ok(Ok(index))`
/// with the Raft index of the users read.
async fn sync_user(
    admin: &mut Admin,
    want: &Want<'_>,
    password_stale: bool,
    pass: &mut Pass,
) -> Result<std::result::Result<u64, Refusal>> {
    let listed = admin.list_users().await?;
    let held = listed.items.into_iter().find(|u| u.name == want.name);
    let held_permissions = match held {
        None => {
            match admin.create_user(want.name, want.password, want.admin).await? {
                Ok(index) => pass.last_index = Some(index),
                Err(refusal) => return Ok(Err(refusal)),
            }
            pass.password_set = true;
            Default::default()
        }
        Some(held) => {
            if held.admin != want.admin {
                return Ok(Err(Refusal::Rejected(format!(
                    "spec.admin: the broker's user {:?} has admin {} and this resource asks for {}; the broker cannot \
                     change it in place (delete the user, or the resource, first)",
                    want.name, held.admin, want.admin
                ))));
            }
            if password_stale {
                match admin.change_password(want.name, want.password).await? {
                    Ok(index) => pass.last_index = Some(index),
                    Err(refusal) => return Ok(Err(refusal)),
                }
                pass.password_set = true;
            }
            held.permissions
        }
    };
    for (namespace, permissions) in want.permissions {
        if held_permissions.get(namespace) == Some(permissions) {
            continue;
        }
        let mut outcome = admin.set_permissions(want.name, namespace, Some(permissions.clone())).await?;
        if let Err(Refusal::Missing(_)) = outcome {
            // The namespace does not exist yet: create it, then try again.
            if let Err(refusal) = admin.ensure_namespace(namespace).await? {
                return Ok(Err(refusal));
            }
            outcome = admin.set_permissions(want.name, namespace, Some(permissions.clone())).await?;
        }
        match outcome {
            Ok(index) => pass.last_index = Some(index),
            Err(refusal) => return Ok(Err(refusal)),
        }
    }
    for namespace in held_permissions.keys().filter(|n| !want.permissions.contains_key(*n)) {
        match admin.set_permissions(want.name, namespace, None).await? {
            Ok(index) => pass.last_index = Some(index),
            // The namespace (and its permissions with it) went meanwhile.
            Err(Refusal::Missing(_)) => {}
            Err(refusal) => return Ok(Err(refusal)),
        }
    }
    Ok(Ok(listed.index))
}

async fn cleanup(obj: Arc<User>, ctx: &Context, namespace: &str) -> Result<Action> {
    let name = broker_name(&obj);
    if obj.spec.deletion_policy == DeletionPolicy::Retain {
        let note = format!("user {name:?} kept in the broker (deletionPolicy Retain)");
        ctx.publish(obj.as_ref(), EventType::Normal, "Retained", note).await;
        return Ok(Action::await_change());
    }
    if obj.status.as_ref().and_then(|s| s.object.cluster_state_index).is_none() || name == OPERATOR_USER {
        let note = format!("user {name:?} was never in sync: not deleted from the broker");
        ctx.publish(obj.as_ref(), EventType::Normal, "NotDeleted", note).await;
        return Ok(Action::await_change());
    }
    let Some(mut admin) = cleanup_admin(ctx, namespace, &obj.spec.cluster_ref).await? else {
        // The cluster, and its users with it, is gone or going.
        return Ok(Action::await_change());
    };
    admin.delete_user(&name).await?;
    ctx.publish(obj.as_ref(), EventType::Normal, "Deleted", format!("user {name:?} deleted from the broker")).await;
    Ok(Action::await_change())
}

/// Name of the Secret `user`'s password comes from: the one it names, else the one the
/// operator generates for it.
pub fn password_secret_of(user: &User) -> String {
    match &user.spec.password_secret_ref {
        Some(secret_ref) => secret_ref.name.clone(),
        None => credentials::user_secret_name(&user.name_any()),
    }
}

/// Runs the User controller until `shutdown` resolves. A User is reconciled when its
/// spec, finalizers or deletion change, when its EventterCluster's spec or readiness
/// changes, when its password Secret changes (a metadata-only watch: the operator
/// reads a Secret's data only with a get, for the Users that name it), and every
/// [`RESYNC_PERIOD`] while in sync.
pub async fn run(
    ctx: Arc<Context>,
    api: Api<User>,
    clusters: Api<EventterCluster>,
    secrets: Api<PartialObjectMeta<Secret>>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let (reader, writer) = reflector::store();
    let objects = watcher(api, watcher::Config::default().any_semantic())
        .reflect(writer)
        .applied_objects()
        .predicate_filter(spec_or_lifecycle_changed::<User>, Default::default());
    let cluster_changes = watcher(clusters, watcher::Config::default().any_semantic())
        .touched_objects()
        .predicate_filter(cluster_readiness_changed, Default::default());
    let secret_changes = watcher(secrets, watcher::Config::default().any_semantic()).touched_objects();
    let (by_cluster, by_secret) = (reader.clone(), reader.clone());
    Controller::for_stream(objects, reader)
        .watches_stream(cluster_changes, move |cluster: EventterCluster| {
            let (namespace, name) = (cluster.namespace(), cluster.name_any());
            by_cluster
                .state()
                .into_iter()
                .filter(|u| u.namespace() == namespace && u.spec.cluster_ref == name)
                .map(|u| ObjectRef::from_obj(u.as_ref()))
                .collect::<Vec<_>>()
        })
        .watches_stream(secret_changes, move |secret: PartialObjectMeta<Secret>| {
            let (namespace, name) = (secret.namespace(), secret.name_any());
            by_secret
                .state()
                .into_iter()
                .filter(|u| u.namespace() == namespace && password_secret_of(u) == name)
                .map(|u| ObjectRef::from_obj(u.as_ref()))
                .collect::<Vec<_>>()
        })
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

    fn user(spec: serde_json::Value) -> User {
        User::new("app", serde_json::from_value(spec).unwrap())
    }

    #[test]
    fn permissions_are_checked_before_anything_is_written() {
        let ok = user(serde_json::json!({
            "clusterRef": "emq", "passwordSecretRef": {"name": "app-password"},
            "permissions": [{"namespace": "a", "configure": "^t$", "write": ".*", "read": ""}]
        }));
        assert_eq!(ok.spec.password_secret_ref.as_ref().unwrap().key, "password");
        let want = desired_permissions(&ok).unwrap();
        assert_eq!(want["a"], pb::Permissions { configure: "^t$".into(), write: ".*".into(), read: String::new() });
        let bad = user(serde_json::json!({
            "clusterRef": "emq", "passwordSecretRef": {"name": "s"},
            "permissions": [{"namespace": "a"}, {"namespace": "b", "read": "("}]
        }));
        let error = desired_permissions(&bad).unwrap_err();
        assert!(
            error.starts_with("spec.permissions[namespace=\"b\"].read: \"(\" is not a valid regular expression"),
            "{error}"
        );
        let long = user(serde_json::json!({
            "clusterRef": "emq", "passwordSecretRef": {"name": "s"},
            "permissions": [{"namespace": "a", "write": "x".repeat(1025)}]
        }));
        assert!(desired_permissions(&long).unwrap_err().contains(".write: is longer than 1024 bytes"));
        let operator = user(serde_json::json!({
            "clusterRef": "emq", "name": "eventter-operator", "passwordSecretRef": {"name": "s"}
        }));
        assert!(desired_permissions(&operator)
            .unwrap_err()
            .starts_with("spec.name: \"eventter-operator\" is the operator's own user"));
        let mut bad_name = user(serde_json::json!({"clusterRef": "emq", "passwordSecretRef": {"name": "s"}}));
        bad_name.metadata.name = Some("a".repeat(65));
        assert!(desired_permissions(&bad_name).unwrap_err().starts_with("metadata.name (the default of spec.name)"));
    }
}
