//! The User reconciler against the scripted API server (every request checked in
//! order) and the fake broker, which keeps users as the broker does.

mod common;

use std::sync::Arc;

use common::api_server;
use common::fake_broker::{self, FakeUser, Script};
use common::{after_status_patch, app_user, cluster_path, context, expect_user_reads as expect_reads, finished};
use common::{password_secret, patched_status, ready, spec_with, user_path, NS};
use eventter_operator::controller::{broker_object, user};
use eventter_operator::crd::User;
use eventtermq_proto::v1 as pb;
use http::{Method, StatusCode};
use k8s_openapi::ByteString;
use kube::runtime::controller::Action;
use serde_json::json;

const PASSWORD: &str = "app-pw-4Tq9z2";
const NEW_PASSWORD: &str = "app-pw-new-8Kd1x7";

fn perms(configure: &str, write: &str, read: &str) -> pb::Permissions {
    pb::Permissions { configure: configure.into(), write: write.into(), read: read.into() }
}

#[tokio::test]
async fn user_is_created_with_its_permissions_then_only_read() {
    let (broker, broker_state) = fake_broker::start(Script { index: 7, ..Script::default() }).await;
    let (client, mut server) = api_server::client();
    let ctx = context(client, broker);
    let user = app_user(spec_with(json!([
        {"namespace": "default", "write": "^orders$", "read": "^orders-"},
        {"namespace": "shop", "configure": ".*", "write": ".*", "read": ".*"}
    ])));
    let secret = password_secret(PASSWORD, "55");
    let reconcile = tokio::spawn(user::reconcile(Arc::new(user.clone()), ctx.clone()));
    expect_reads(&mut server, Some(&secret), true).await;
    server.expect_event(NS, "PasswordSet").await;
    let patch = server.expect(Method::PATCH, &format!("{}/status", user_path()), patched_status(&user)).await;
    let (status, reason, message) = ready(&patch.body);
    assert_eq!((status.as_str(), reason.as_str()), ("True", "Synced"), "{message}");
    assert!(message.contains("\"default\", \"shop\""), "{message}");
    assert_eq!(patch.body["status"]["passwordSecretVersion"], "secret-uid-1/55");
    // CreateUser 8, SetPermissions default 9, CreateNamespace shop 10, SetPermissions shop 11.
    assert_eq!(patch.body["status"]["clusterStateIndex"], 11);
    assert!(!patch.body.to_string().contains(PASSWORD), "no password in the status");
    server.expect_event(NS, "Synced").await;
    assert_eq!(finished(reconcile).await.unwrap(), Action::requeue(broker_object::RESYNC_PERIOD));
    server.expect_no_more().await;
    assert_eq!(
        broker_state.write_calls(),
        vec![
            "CreateUser app admin=false",
            "SetPermissions app default",
            "SetPermissions app shop",
            "CreateNamespace shop",
            "SetPermissions app shop",
        ]
    );
    let held = broker_state.user("app").unwrap();
    assert_eq!(held.password, PASSWORD, "trailing whitespace of the Secret dropped");
    assert_eq!(held.permissions["default"], perms("", "^orders$", "^orders-"));
    assert_eq!(held.permissions["shop"], perms(".*", ".*", ".*"));

    // In sync: the next pass reads the users and writes nothing, status included.
    let synced = after_status_patch(&user, &patch.body);
    let calls_before = broker_state.calls().len();
    let reconcile = tokio::spawn(user::reconcile(Arc::new(synced.clone()), ctx.clone()));
    expect_reads(&mut server, Some(&secret), true).await;
    assert_eq!(finished(reconcile).await.unwrap(), Action::requeue(broker_object::RESYNC_PERIOD));
    server.expect_no_more().await;
    assert_eq!(broker_state.calls()[calls_before..], ["ListUsers"]);

    // The Secret changed and a namespace left the spec: the password is set again and
    // the permissions on that namespace removed; nothing else is written.
    let mut changed = synced.clone();
    changed.spec.permissions.truncate(1);
    changed.metadata.generation = Some(2);
    let new_secret = password_secret(NEW_PASSWORD, "56");
    // (A fresh event recorder: a repeated event would be a PATCH of the first.)
    let ctx = context(ctx.client.clone(), broker);
    let reconcile = tokio::spawn(user::reconcile(Arc::new(changed.clone()), ctx));
    expect_reads(&mut server, Some(&new_secret), true).await;
    server.expect_event(NS, "PasswordSet").await;
    let patch = server.expect(Method::PATCH, &format!("{}/status", user_path()), patched_status(&changed)).await;
    assert_eq!(patch.body["status"]["passwordSecretVersion"], "secret-uid-1/56");
    assert_eq!(patch.body["status"]["clusterStateIndex"], 13);
    assert_eq!(finished(reconcile).await.unwrap(), Action::requeue(broker_object::RESYNC_PERIOD));
    server.expect_no_more().await;
    assert_eq!(broker_state.write_calls()[5..], ["ChangePassword app", "SetPermissions app shop clear"]);
    let held = broker_state.user("app").unwrap();
    assert_eq!(held.password, NEW_PASSWORD);
    assert_eq!(held.permissions.keys().collect::<Vec<_>>(), ["default"]);
}

#[tokio::test]
async fn a_bad_pattern_is_rejected_naming_the_field_and_nothing_is_written() {
    let (broker, broker_state) = fake_broker::start(Script::default()).await;
    let (client, mut server) = api_server::client();
    let ctx = context(client, broker);
    let user = app_user(spec_with(json!([
        {"namespace": "default", "read": ".*"},
        {"namespace": "shop", "write": "orders[", "read": ".*"}
    ])));
    let reconcile = tokio::spawn(user::reconcile(Arc::new(user.clone()), ctx));
    let cluster = serde_json::to_value(common::cluster()).unwrap();
    server.expect(Method::GET, &cluster_path(), |_| (StatusCode::OK, cluster)).await;
    let patch = server.expect(Method::PATCH, &format!("{}/status", user_path()), patched_status(&user)).await;
    let (status, reason, message) = ready(&patch.body);
    assert_eq!((status.as_str(), reason.as_str()), ("False", "Rejected"));
    assert!(
        message
            .starts_with("spec.permissions[namespace=\"shop\"].write: \"orders[\" is not a valid regular expression"),
        "{message}"
    );
    server.expect_event(NS, "Rejected").await;
    assert_eq!(finished(reconcile).await.unwrap(), Action::await_change());
    server.expect_no_more().await;
    assert!(broker_state.calls().is_empty(), "{:?}", broker_state.calls());
}

#[tokio::test]
async fn a_missing_or_unusable_secret_is_named_and_nothing_is_written() {
    let (broker, broker_state) = fake_broker::start(Script::default()).await;
    let (client, mut server) = api_server::client();
    let ctx = context(client, broker);
    let user = app_user(spec_with(json!([{"namespace": "default", "read": ".*"}])));
    let reconcile = tokio::spawn(user::reconcile(Arc::new(user.clone()), ctx.clone()));
    expect_reads(&mut server, None, false).await;
    let patch = server.expect(Method::PATCH, &format!("{}/status", user_path()), patched_status(&user)).await;
    let (status, reason, message) = ready(&patch.body);
    assert_eq!((status.as_str(), reason.as_str()), ("False", "SecretNotFound"));
    assert_eq!(message, "spec.passwordSecretRef.name: Secret \"app-password\" not found in namespace \"messaging\"");
    server.expect_event(NS, "SecretNotFound").await;
    assert_eq!(finished(reconcile).await.unwrap(), Action::requeue(broker_object::DEPENDENCY_RETRY_DELAY));

    let waiting = after_status_patch(&user, &patch.body);
    let mut secret = password_secret(PASSWORD, "60");
    secret.data = Some([("pass".to_string(), ByteString(PASSWORD.as_bytes().to_vec()))].into());
    let reconcile = tokio::spawn(user::reconcile(Arc::new(waiting.clone()), ctx));
    expect_reads(&mut server, Some(&secret), false).await;
    let patch = server.expect(Method::PATCH, &format!("{}/status", user_path()), patched_status(&waiting)).await;
    let (status, reason, message) = ready(&patch.body);
    assert_eq!((status.as_str(), reason.as_str()), ("False", "SecretInvalid"));
    assert_eq!(message, "spec.passwordSecretRef.key: Secret \"app-password\" has no key \"password\"");
    server.expect_event(NS, "SecretInvalid").await;
    finished(reconcile).await.unwrap();
    server.expect_no_more().await;
    assert!(broker_state.calls().is_empty(), "{:?}", broker_state.calls());
}

#[tokio::test]
async fn an_existing_user_is_adopted_but_its_admin_flag_is_not_changed() {
    let mut script = Script { index: 3, ..Script::default() };
    script.users.insert("app".into(), FakeUser { password: "old".into(), admin: true, ..FakeUser::default() });
    let (broker, broker_state) = fake_broker::start(script).await;
    let (client, mut server) = api_server::client();
    let ctx = context(client, broker);
    let secret = password_secret(PASSWORD, "55");
    let user = app_user(spec_with(json!([])));
    let reconcile = tokio::spawn(user::reconcile(Arc::new(user.clone()), ctx.clone()));
    expect_reads(&mut server, Some(&secret), true).await;
    let patch = server.expect(Method::PATCH, &format!("{}/status", user_path()), patched_status(&user)).await;
    let (status, reason, message) = ready(&patch.body);
    assert_eq!((status.as_str(), reason.as_str()), ("False", "Rejected"));
    assert!(message.starts_with("spec.admin: the broker's user \"app\" has admin true"), "{message}");
    server.expect_event(NS, "Rejected").await;
    assert_eq!(finished(reconcile).await.unwrap(), Action::await_change());
    assert!(broker_state.write_calls().is_empty(), "{:?}", broker_state.calls());
    assert_eq!(broker_state.user("app").unwrap().password, "old");

    // With the same flag, the user is taken over: its password set from the Secret.
    let mut admin_user = user.clone();
    admin_user.spec.admin = true;
    let reconcile = tokio::spawn(user::reconcile(Arc::new(admin_user.clone()), ctx));
    expect_reads(&mut server, Some(&secret), true).await;
    server.expect_event(NS, "PasswordSet").await;
    let patch = server.expect(Method::PATCH, &format!("{}/status", user_path()), patched_status(&admin_user)).await;
    assert_eq!(ready(&patch.body).0, "True");
    assert_eq!(patch.body["status"]["clusterStateIndex"], 4);
    server.expect_event(NS, "Synced").await;
    finished(reconcile).await.unwrap();
    server.expect_no_more().await;
    assert_eq!(broker_state.write_calls(), ["ChangePassword app"]);
    assert_eq!(broker_state.user("app").unwrap().password, PASSWORD);
}

#[tokio::test]
async fn the_operators_own_user_is_refused() {
    let (broker, broker_state) = fake_broker::start(Script::default()).await;
    let (client, mut server) = api_server::client();
    let ctx = context(client, broker);
    let mut spec = spec_with(json!([]));
    spec["name"] = json!("eventter-operator");
    let user = app_user(spec);
    let reconcile = tokio::spawn(user::reconcile(Arc::new(user.clone()), ctx));
    let cluster = serde_json::to_value(common::cluster()).unwrap();
    server.expect(Method::GET, &cluster_path(), |_| (StatusCode::OK, cluster)).await;
    let patch = server.expect(Method::PATCH, &format!("{}/status", user_path()), patched_status(&user)).await;
    let (_, reason, message) = ready(&patch.body);
    assert_eq!(reason, "Rejected");
    assert!(message.starts_with("spec.name: \"eventter-operator\" is the operator's own user"), "{message}");
    server.expect_event(NS, "Rejected").await;
    finished(reconcile).await.unwrap();
    assert!(broker_state.calls().is_empty());
}

fn deleted(mut user: User, index: Option<u64>) -> User {
    user.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
    user.status = Some(eventter_operator::crd::UserStatus {
        object: eventter_operator::crd::BrokerObjectStatus { cluster_state_index: index, ..Default::default() },
        ..Default::default()
    });
    user
}

#[tokio::test]
async fn a_deleted_user_is_deleted_in_the_broker() {
    let mut script = Script::default();
    script.users.insert("app".into(), FakeUser { password: PASSWORD.into(), ..FakeUser::default() });
    let (broker, broker_state) = fake_broker::start(script).await;
    let (client, mut server) = api_server::client();
    let ctx = context(client, broker);
    let user = deleted(app_user(spec_with(json!([]))), Some(5));
    let reconcile = tokio::spawn(user::reconcile(Arc::new(user.clone()), ctx.clone()));
    let cluster = serde_json::to_value(common::cluster()).unwrap();
    server.expect(Method::GET, &cluster_path(), |_| (StatusCode::OK, cluster)).await;
    common::expect_secret_get(&mut server).await;
    server.expect_event(NS, "Deleted").await;
    let seen =
        server.expect(Method::PATCH, &user_path(), |_| (StatusCode::OK, serde_json::to_value(&user).unwrap())).await;
    assert_eq!(seen.body[1], json!({"op": "remove", "path": "/metadata/finalizers/0"}));
    assert_eq!(finished(reconcile).await.unwrap(), Action::await_change());
    server.expect_no_more().await;
    assert_eq!(broker_state.calls(), ["DeleteUser app"]);
    assert!(broker_state.user("app").is_none());

    // Never in sync (e.g. refused): the broker's user of that name is left alone.
    let mut script = Script::default();
    script.users.insert("app".into(), FakeUser::default());
    let (broker, broker_state) = fake_broker::start(script).await;
    let (client, mut server) = api_server::client();
    let user = deleted(app_user(spec_with(json!([]))), None);
    let reconcile = tokio::spawn(user::reconcile(Arc::new(user.clone()), context(client, broker)));
    server.expect_event(NS, "NotDeleted").await;
    server.expect(Method::PATCH, &user_path(), |_| (StatusCode::OK, serde_json::to_value(&user).unwrap())).await;
    finished(reconcile).await.unwrap();
    server.expect_no_more().await;
    assert!(broker_state.calls().is_empty());
}
