//! Fixtures shared by the integration tests.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use eventter_operator::broker::BrokerConnector;
use eventter_operator::controller::Context;
use eventter_operator::crd::{EventterCluster, EventterClusterSpec};
use eventter_operator::metrics::Metrics;
use http::{Method, StatusCode};
use serde_json::json;

/// The EventterCluster the golden files and reconciler tests are built from.
pub fn cluster() -> EventterCluster {
    let spec: EventterClusterSpec = serde_json::from_value(serde_json::json!({
        "replicas": 3,
        "image": "localhost/eventtermq:0.1.0",
        "imagePullPolicy": "Never",
        "storage": {"size": "1Gi", "storageClassName": "standard"},
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
        "broker": {"electionTimeoutMinMs": 400, "electionTimeoutMaxMs": 800, "deadNodeRemovalMs": 60000},
        "pod": {
            "labels": {"team": "messaging"},
            "annotations": {"example.com/scrape": "true"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "mq", "effect": "NoSchedule"}],
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "priorityClassName": "high"
        }
    }))
    .unwrap();
    let mut cluster = EventterCluster::new("emq", spec);
    cluster.metadata.namespace = Some("messaging".into());
    cluster.metadata.uid = Some("5d0c7c1e-0000-4000-8000-000000000001".into());
    cluster.metadata.generation = Some(1);
    cluster
}

pub mod api_server;
pub mod fake_broker;

use eventter_operator::crd::{Topic, TopicSpec};

/// A Topic in namespace `messaging` of cluster `emq`, with the operator's finalizer.
pub fn topic(spec: serde_json::Value) -> Topic {
    let spec: TopicSpec = serde_json::from_value(spec).unwrap();
    let mut topic = Topic::new("orders", spec);
    topic.metadata.namespace = Some("messaging".into());
    topic.metadata.uid = Some("5d0c7c1e-0000-4000-8000-000000000002".into());
    topic.metadata.generation = Some(2);
    topic.metadata.resource_version = Some("100".into());
    topic.metadata.finalizers = Some(vec!["eventter.io/topic".into()]);
    topic
}

// Reconciler tests: a context whose broker connections go to one address, and the
// scripted API server's answers to what every reconcile sends.

pub const NS: &str = "messaging";

pub fn context(client: kube::Client, broker: std::net::SocketAddr) -> Arc<Context> {
    let connector = BrokerConnector {
        address_override: Some(broker.to_string()),
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(5),
        ..BrokerConnector::default()
    };
    Arc::new(Context::new(client, Arc::new(Metrics::default()), connector, Some("test".into())))
}

/// The reconcile's result. One still running after 10 s is waiting for the answer to
/// a request the test did not expect (the scripted server only answers expectations).
pub async fn finished<T>(reconcile: tokio::task::JoinHandle<T>) -> T {
    let result = tokio::time::timeout(Duration::from_secs(10), reconcile).await;
    result.expect("the reconcile is still waiting: it sent a request the test did not expect").unwrap()
}

pub fn ok_echo(body: &serde_json::Value) -> (StatusCode, serde_json::Value) {
    (StatusCode::OK, body.clone())
}

/// Answers a status patch with the object as it would be after it.
pub fn patched_status<T: serde::Serialize>(
    object: &T,
) -> impl FnOnce(&serde_json::Value) -> (StatusCode, serde_json::Value) {
    let mut object = serde_json::to_value(object).unwrap();
    move |patch| {
        object["status"] = patch["status"].clone();
        (StatusCode::OK, object)
    }
}

pub fn cluster_path() -> String {
    format!("/apis/eventter.io/v1alpha1/namespaces/{NS}/eventterclusters/emq")
}

pub fn topic_path() -> String {
    format!("/apis/eventter.io/v1alpha1/namespaces/{NS}/topics/orders")
}

/// The operator's password in the fixture Secret (and what the fake broker expects).
pub const OPERATOR_PASSWORD: &str = "0123456789abcdef-operator";

pub fn secret_path() -> String {
    format!("/api/v1/namespaces/{NS}/secrets/emq-operator-credentials")
}

/// The operator's credential Secret of the fixture cluster.
pub fn operator_secret() -> k8s_openapi::api::core::v1::Secret {
    eventter_operator::builders::operator_credentials_secret(&cluster(), OPERATOR_PASSWORD)
}

/// GET of the operator's credential Secret, answered with the fixture.
pub async fn expect_secret_get(server: &mut api_server::ApiServer) {
    let secret = serde_json::to_value(operator_secret()).unwrap();
    server.expect(Method::GET, &secret_path(), |_| (StatusCode::OK, secret)).await;
}

pub fn cluster_secret_path() -> String {
    format!("/api/v1/namespaces/{NS}/secrets/emq-cluster-secret")
}

/// The metadata GET of the cluster secret's Secret, answered: it exists (the operator
/// never reads its data).
pub async fn expect_cluster_secret(server: &mut api_server::ApiServer) {
    let found = json!({
        "apiVersion": "meta.k8s.io/v1",
        "kind": "PartialObjectMetadata",
        "metadata": {"name": "emq-cluster-secret", "namespace": NS, "uid": "cluster-secret-uid"}
    });
    server.expect(Method::GET, &cluster_secret_path(), |_| (StatusCode::OK, found)).await;
}

/// GET of the Topic's EventterCluster, answered with the fixture, then of the
/// operator's credential Secret.
pub async fn expect_cluster_get(server: &mut api_server::ApiServer) {
    let cluster = serde_json::to_value(cluster()).unwrap();
    server.expect(Method::GET, &cluster_path(), |_| (StatusCode::OK, cluster)).await;
    expect_secret_get(server).await;
}

/// `object` with the status a status patch (as the server saw it) wrote, and a new
/// resourceVersion: what the next reconcile gets from the watch.
pub fn after_status_patch<T: serde::Serialize + serde::de::DeserializeOwned>(
    object: &T,
    patch: &serde_json::Value,
) -> T {
    let mut value = serde_json::to_value(object).unwrap();
    value["status"] = patch["status"].clone();
    value["metadata"]["resourceVersion"] = json!("101");
    serde_json::from_value(value).unwrap()
}

/// One pass over an object already in sync: it reads the cluster, writes nothing,
/// patches no status, and comes back after the resync period.
pub async fn in_sync_pass<K>(object: &Arc<K>, ctx: &Arc<Context>, server: &mut api_server::ApiServer)
where
    K: eventter_operator::controller::broker_object::BrokerObject,
{
    let reconcile = tokio::spawn(eventter_operator::controller::broker_object::reconcile(object.clone(), ctx.clone()));
    expect_cluster_get(server).await;
    let action = finished(reconcile).await.unwrap();
    assert_eq!(action, kube::runtime::controller::Action::requeue(K::in_sync_period(ctx)));
    server.expect_no_more().await;
}

// User fixtures (tests/users.rs, tests/real_broker.rs).

use eventter_operator::crd::{User, UserSpec};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;

/// A User `app` in namespace `messaging` of cluster `emq`, with the operator's finalizer.
pub fn app_user(spec: serde_json::Value) -> User {
    let spec: UserSpec = serde_json::from_value(spec).unwrap();
    let mut user = User::new("app", spec);
    user.metadata.namespace = Some(NS.into());
    user.metadata.uid = Some("5d0c7c1e-0000-4000-8000-000000000009".into());
    user.metadata.generation = Some(1);
    user.metadata.resource_version = Some("100".into());
    user.metadata.finalizers = Some(vec![eventter_operator::controller::user::FINALIZER.into()]);
    user
}

pub fn spec_with(permissions: serde_json::Value) -> serde_json::Value {
    json!({"clusterRef": "emq", "passwordSecretRef": {"name": "app-password"}, "permissions": permissions})
}

pub fn user_path() -> String {
    format!("/apis/eventter.io/v1alpha1/namespaces/{NS}/users/app")
}

pub fn password_secret(password: &str, resource_version: &str) -> Secret {
    let mut secret = Secret::default();
    secret.metadata.name = Some("app-password".into());
    secret.metadata.namespace = Some(NS.into());
    secret.metadata.uid = Some("secret-uid-1".into());
    secret.metadata.resource_version = Some(resource_version.into());
    secret.data = Some([("password".to_string(), ByteString(format!("{password}\n").into_bytes()))].into());
    secret
}

/// GET of the cluster, of the user's password Secret (`None`: not found), and, when
/// `then_operator`, of the operator's own Secret.
pub async fn expect_user_reads(server: &mut api_server::ApiServer, secret: Option<&Secret>, then_operator: bool) {
    let cluster = serde_json::to_value(cluster()).unwrap();
    server.expect(Method::GET, &cluster_path(), |_| (StatusCode::OK, cluster)).await;
    let path = format!("/api/v1/namespaces/{NS}/secrets/app-password");
    match secret {
        Some(secret) => {
            let secret = serde_json::to_value(secret).unwrap();
            server.expect(Method::GET, &path, |_| (StatusCode::OK, secret)).await;
        }
        None => {
            server
                .expect(Method::GET, &path, |_| (StatusCode::NOT_FOUND, api_server::status_error(404, "NotFound")))
                .await;
        }
    }
    if then_operator {
        expect_secret_get(server).await;
    }
}

pub fn ready(patch: &serde_json::Value) -> (String, String, String) {
    let c = &patch["status"]["conditions"][0];
    assert_eq!(c["type"], "Ready");
    (c["status"].as_str().unwrap().into(), c["reason"].as_str().unwrap().into(), c["message"].as_str().unwrap().into())
}
