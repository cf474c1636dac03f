//! The reconcilers against a scripted API server (every request checked in order) and
//! an in-process fake broker.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::api_server::{self, status_error, ApiServer};
use common::fake_broker::{self, Script};
use eventter_operator::broker::BrokerConnector;
use eventter_operator::controller::{broker_object, cluster, error_policy, Context};
use eventter_operator::crd::{BrokerObjectStatus, Topic};
use eventter_operator::error::Error;
use eventter_operator::metrics::Metrics;
use http::{Method, StatusCode};
use kube::runtime::controller::Action;
use serde_json::json;

const NS: &str = "messaging";

fn context(client: kube::Client, broker: std::net::SocketAddr) -> Arc<Context> {
    let connector = BrokerConnector {
        address_override: Some(broker.to_string()),
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(5),
    };
    Arc::new(Context::new(client, Arc::new(Metrics::default()), connector, Some("test".into())))
}

fn ok_echo(body: &serde_json::Value) -> (StatusCode, serde_json::Value) {
    (StatusCode::OK, body.clone())
}

/// Answers a status patch with the object as it would be after it.
fn patched_status<T: serde::Serialize>(
    object: &T,
) -> impl FnOnce(&serde_json::Value) -> (StatusCode, serde_json::Value) {
    let mut object = serde_json::to_value(object).unwrap();
    move |patch| {
        object["status"] = patch["status"].clone();
        (StatusCode::OK, object)
    }
}

fn cluster_path() -> String {
    format!("/apis/eventter.io/v1alpha1/namespaces/{NS}/eventterclusters/emq")
}

fn topic_path() -> String {
    format!("/apis/eventter.io/v1alpha1/namespaces/{NS}/topics/orders")
}

/// GET of the Topic's EventterCluster, answered with the fixture.
async fn expect_cluster_get(server: &mut ApiServer) {
    let cluster = serde_json::to_value(common::cluster()).unwrap();
    server.expect(Method::GET, &cluster_path(), |_| (StatusCode::OK, cluster)).await;
}

#[tokio::test]
async fn cluster_create_applies_children_then_status() {
    let (broker, broker_state) =
        fake_broker::start(Script { dump: Some(fake_broker::healthy_dump()), ..Script::default() }).await;
    let (client, mut server) = api_server::client();
    let ctx = context(client, broker);
    let reconcile = tokio::spawn(cluster::reconcile(Arc::new(common::cluster()), ctx));

    let applied =
        [format!("/api/v1/namespaces/{NS}/services/emq-nodes"), format!("/api/v1/namespaces/{NS}/services/emq")];
    for path in &applied {
        let seen = server.expect(Method::PATCH, path, ok_echo).await;
        assert!(
            seen.query.contains("fieldManager=eventter-operator") && seen.query.contains("force=true"),
            "{}",
            seen.query
        );
        assert_eq!(seen.body["metadata"]["ownerReferences"][0]["kind"], "EventterCluster");
    }
    let seen = server
        .expect(Method::PATCH, &format!("/apis/apps/v1/namespaces/{NS}/statefulsets/emq"), |body| {
            let mut sts = body.clone();
            sts["status"] = json!({"replicas": 3, "readyReplicas": 3});
            (StatusCode::OK, sts)
        })
        .await;
    assert_eq!(seen.body["kind"], "StatefulSet");
    assert_eq!(seen.body["spec"]["serviceName"], "emq-nodes");
    let seen = server
        .expect(Method::PATCH, &format!("/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/emq"), ok_echo)
        .await;
    assert_eq!(seen.body["spec"]["maxUnavailable"], 1);

    let seen =
        server.expect(Method::PATCH, &format!("{}/status", cluster_path()), patched_status(&common::cluster())).await;
    assert!(seen.query.contains("fieldManager=eventter-operator"), "{}", seen.query);
    let status = &seen.body["status"];
    assert_eq!(status["readyReplicas"], 3);
    assert_eq!(status["leader"], "emq-1");
    assert_eq!(status["leaderId"], "2");
    assert_eq!(status["clusterStateIndex"], 42);
    assert_eq!(status["observedGeneration"], 1);
    assert_eq!(status["members"].as_array().unwrap().len(), 3);
    assert_eq!(status["members"][0]["state"], "Alive");
    let conditions = status["conditions"].as_array().unwrap();
    let condition = |t: &str| conditions.iter().find(|c| c["type"] == t).unwrap().clone();
    assert_eq!(condition("Ready")["status"], "True");
    assert_eq!(condition("Progressing")["status"], "False");
    assert_eq!(condition("Degraded")["status"], "False");
    server.expect_event(NS, "ClusterReady").await;

    let action = reconcile.await.unwrap().unwrap();
    assert_eq!(action, Action::requeue(cluster::READY_RECHECK_PERIOD));
    server.expect_no_more().await;
    assert_eq!(broker_state.calls(), vec!["Dump"]);
}

#[tokio::test]
async fn cluster_forming_with_unreachable_broker_is_not_ready_nor_degraded() {
    let (client, mut server) = api_server::client();
    let ctx = context(client, fake_broker::closed_address().await);
    let reconcile = tokio::spawn(cluster::reconcile(Arc::new(common::cluster()), ctx));
    server.expect(Method::PATCH, &format!("/api/v1/namespaces/{NS}/services/emq-nodes"), ok_echo).await;
    server.expect(Method::PATCH, &format!("/api/v1/namespaces/{NS}/services/emq"), ok_echo).await;
    server.expect(Method::PATCH, &format!("/apis/apps/v1/namespaces/{NS}/statefulsets/emq"), ok_echo).await;
    server.expect(Method::PATCH, &format!("/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/emq"), ok_echo).await;
    let seen =
        server.expect(Method::PATCH, &format!("{}/status", cluster_path()), patched_status(&common::cluster())).await;
    let conditions = seen.body["status"]["conditions"].as_array().unwrap().clone();
    let status_of = |t: &str| conditions.iter().find(|c| c["type"] == t).unwrap()["status"].clone();
    assert_eq!(status_of("Ready"), "False");
    assert_eq!(status_of("Progressing"), "True");
    assert_eq!(status_of("Degraded"), "False");
    let action = reconcile.await.unwrap().unwrap();
    assert_eq!(action, Action::requeue(cluster::NOT_READY_RECHECK_PERIOD));
    server.expect_no_more().await;
}

#[tokio::test]
async fn topic_created_in_broker_sets_ready() {
    let (broker, broker_state) = fake_broker::start(Script { index: 7, ..Script::default() }).await;
    let (client, mut server) = api_server::client();
    let ctx = context(client, broker);
    let topic = common::topic(json!({"clusterRef": "emq", "shards": 4, "retention": "1h30m", "replicationFactor": 3}));
    let reconcile = tokio::spawn(broker_object::reconcile(Arc::new(topic.clone()), ctx));

    expect_cluster_get(&mut server).await;
    let seen = server.expect(Method::PATCH, &format!("{}/status", topic_path()), patched_status(&topic)).await;
    let status = &seen.body["status"];
    assert_eq!(status["conditions"][0]["type"], "Ready");
    assert_eq!(status["conditions"][0]["status"], "True");
    assert_eq!(status["conditions"][0]["reason"], "Synced");
    assert_eq!(status["clusterStateIndex"], 7);
    assert_eq!(status["observedGeneration"], 2);
    server.expect_event(NS, "Synced").await;

    let action = reconcile.await.unwrap().unwrap();
    assert_eq!(action, Action::requeue(broker_object::RESYNC_PERIOD));
    server.expect_no_more().await;
    assert_eq!(
        broker_state.calls(),
        vec!["CreateNamespace default", "CreateTopic default/orders shards=4 rf=3 retention=Some(5400) type=fanout"]
    );
}

#[tokio::test]
async fn topic_rejected_by_broker_sets_ready_false_and_waits_for_a_change() {
    let message = "replication_factor: 5 is above the number of nodes";
    let (broker, broker_state) = fake_broker::start(Script {
        create_topic: Some(tonic::Status::invalid_argument(message)),
        ..Script::default()
    })
    .await;
    let (client, mut server) = api_server::client();
    let ctx = context(client, broker);
    let topic = common::topic(json!({"clusterRef": "emq", "replicationFactor": 5}));
    let reconcile = tokio::spawn(broker_object::reconcile(Arc::new(topic.clone()), ctx));

    expect_cluster_get(&mut server).await;
    let seen = server.expect(Method::PATCH, &format!("{}/status", topic_path()), patched_status(&topic)).await;
    let condition = &seen.body["status"]["conditions"][0];
    assert_eq!(condition["status"], "False");
    assert_eq!(condition["reason"], "Rejected");
    assert_eq!(condition["message"], message);
    let event = server.expect_event(NS, "Rejected").await;
    assert_eq!(event.body["type"], "Warning");

    let action = reconcile.await.unwrap().unwrap();
    assert_eq!(action, Action::await_change());
    server.expect_no_more().await;
    assert_eq!(broker_state.calls().len(), 2);
}

#[tokio::test]
async fn topic_with_changed_spec_is_updated_and_an_immutable_change_is_rejected() {
    let (broker, broker_state) = fake_broker::start(Script {
        create_topic: Some(tonic::Status::already_exists("topic exists with another spec")),
        update_topic: Some(tonic::Status::failed_precondition("replication_factor: is immutable")),
        ..Script::default()
    })
    .await;
    let (client, mut server) = api_server::client();
    let ctx = context(client, broker);
    let topic = common::topic(json!({"clusterRef": "emq", "replicationFactor": 2}));
    let reconcile = tokio::spawn(broker_object::reconcile(Arc::new(topic.clone()), ctx));

    expect_cluster_get(&mut server).await;
    let seen = server.expect(Method::PATCH, &format!("{}/status", topic_path()), patched_status(&topic)).await;
    assert_eq!(seen.body["status"]["conditions"][0]["message"], "replication_factor: is immutable");
    server.expect_event(NS, "Rejected").await;
    assert_eq!(reconcile.await.unwrap().unwrap(), Action::await_change());
    assert_eq!(broker_state.calls()[2], "UpdateTopic default/orders rf=Some(2)");
}

#[tokio::test]
async fn topic_with_unreachable_broker_fails_and_backs_off() {
    let (client, mut server) = api_server::client();
    let ctx = context(client, fake_broker::closed_address().await);
    let topic = Arc::new(common::topic(json!({"clusterRef": "emq"})));
    let reconcile = tokio::spawn(broker_object::reconcile(topic.clone(), ctx.clone()));

    expect_cluster_get(&mut server).await;
    let seen = server.expect(Method::PATCH, &format!("{}/status", topic_path()), patched_status(topic.as_ref())).await;
    assert_eq!(seen.body["status"]["conditions"][0]["reason"], "BrokerUnavailable");
    server.expect_event(NS, "BrokerUnavailable").await;

    let error = reconcile.await.unwrap().unwrap_err();
    assert_eq!(error.metric_label(), "broker_unavailable", "{error}");
    assert!(matches!(&error, Error::Finalizer(_)), "{error}");
    // Each consecutive failure doubles the retry delay.
    assert_eq!(error_policy(topic.clone(), &error, ctx.clone(), "topic"), Action::requeue(Duration::from_secs(2)));
    assert_eq!(error_policy(topic, &error, ctx, "topic"), Action::requeue(Duration::from_secs(4)));
    server.expect_no_more().await;
}

#[tokio::test]
async fn topic_with_missing_cluster_waits_for_it() {
    let (client, mut server) = api_server::client();
    let ctx = context(client, fake_broker::closed_address().await);
    let topic = common::topic(json!({"clusterRef": "emq"}));
    let reconcile = tokio::spawn(broker_object::reconcile(Arc::new(topic.clone()), ctx));
    server.expect(Method::GET, &cluster_path(), |_| (StatusCode::NOT_FOUND, status_error(404, "NotFound"))).await;
    let seen = server.expect(Method::PATCH, &format!("{}/status", topic_path()), patched_status(&topic)).await;
    assert_eq!(seen.body["status"]["conditions"][0]["reason"], "ClusterNotFound");
    server.expect_event(NS, "ClusterNotFound").await;
    assert_eq!(reconcile.await.unwrap().unwrap(), Action::requeue(broker_object::DEPENDENCY_RETRY_DELAY));
}

#[tokio::test]
async fn new_topic_gets_the_finalizer_first() {
    let (client, mut server) = api_server::client();
    let ctx = context(client, fake_broker::closed_address().await);
    let mut topic = common::topic(json!({"clusterRef": "emq"}));
    topic.metadata.finalizers = None;
    let reconcile = tokio::spawn(broker_object::reconcile(Arc::new(topic.clone()), ctx));
    let seen =
        server.expect(Method::PATCH, &topic_path(), |_| (StatusCode::OK, serde_json::to_value(&topic).unwrap())).await;
    assert_eq!(seen.body[1], json!({"op": "add", "path": "/metadata/finalizers", "value": ["eventter.io/topic"]}));
    assert_eq!(reconcile.await.unwrap().unwrap(), Action::await_change());
    server.expect_no_more().await;
}

fn deleted(mut topic: Topic) -> Topic {
    topic.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
    topic
}

#[tokio::test]
async fn deleted_topic_with_retain_policy_drops_the_finalizer_without_a_broker_call() {
    let (broker, broker_state) = fake_broker::start(Script::default()).await;
    let (client, mut server) = api_server::client();
    let ctx = context(client, broker);
    let topic = deleted(common::topic(json!({"clusterRef": "emq", "deletionPolicy": "Retain"})));
    let reconcile = tokio::spawn(broker_object::reconcile(Arc::new(topic.clone()), ctx));

    server.expect_event(NS, "Retained").await;
    let seen =
        server.expect(Method::PATCH, &topic_path(), |_| (StatusCode::OK, serde_json::to_value(&topic).unwrap())).await;
    assert_eq!(
        seen.body,
        json!([
            {"op": "test", "path": "/metadata/finalizers/0", "value": "eventter.io/topic"},
            {"op": "remove", "path": "/metadata/finalizers/0"}
        ])
    );
    assert_eq!(reconcile.await.unwrap().unwrap(), Action::await_change());
    server.expect_no_more().await;
    assert!(broker_state.calls().is_empty(), "{:?}", broker_state.calls());
}

#[tokio::test]
async fn deleted_topic_is_deleted_in_the_broker_and_not_found_counts_as_done() {
    let (broker, broker_state) = fake_broker::start(Script {
        delete: Some(tonic::Status::not_found("topic: \"orders\" does not exist")),
        ..Script::default()
    })
    .await;
    let (client, mut server) = api_server::client();
    let ctx = context(client, broker);
    let mut topic = deleted(common::topic(json!({"clusterRef": "emq"})));
    topic.status = Some(BrokerObjectStatus { cluster_state_index: Some(7), ..BrokerObjectStatus::default() });
    let reconcile = tokio::spawn(broker_object::reconcile(Arc::new(topic.clone()), ctx));

    expect_cluster_get(&mut server).await;
    server.expect_event(NS, "Deleted").await;
    server.expect(Method::PATCH, &topic_path(), |_| (StatusCode::OK, serde_json::to_value(&topic).unwrap())).await;
    assert_eq!(reconcile.await.unwrap().unwrap(), Action::await_change());
    server.expect_no_more().await;
    assert_eq!(broker_state.calls(), vec!["DeleteTopic default/orders"]);
}

#[tokio::test]
async fn consumer_group_is_created_with_its_bindings() {
    let (broker, broker_state) = fake_broker::start(Script { index: 9, ..Script::default() }).await;
    let (client, mut server) = api_server::client();
    let ctx = context(client, broker);
    let spec: eventter_operator::crd::ConsumerGroupSpec = serde_json::from_value(json!({
        "clusterRef": "emq",
        "namespace": "shop",
        "bindings": [
            {"topic": "orders", "exchangeType": "direct", "routingKey": "eu"},
            {"topic": "payments", "exchangeType": "headers", "headers": {"kind": "refund"}, "headersMatch": "any"}
        ],
        "since": "2026-01-01T00:00:00Z"
    }))
    .unwrap();
    let mut group = eventter_operator::crd::ConsumerGroup::new("billing", spec);
    group.metadata.namespace = Some(NS.into());
    group.metadata.generation = Some(1);
    group.metadata.finalizers = Some(vec!["eventter.io/consumergroup".into()]);
    let reconcile = tokio::spawn(broker_object::reconcile(Arc::new(group.clone()), ctx));

    expect_cluster_get(&mut server).await;
    let seen = server
        .expect(
            Method::PATCH,
            &format!("/apis/eventter.io/v1alpha1/namespaces/{NS}/consumergroups/billing/status"),
            patched_status(&group),
        )
        .await;
    assert_eq!(seen.body["status"]["conditions"][0]["status"], "True");
    assert_eq!(seen.body["status"]["clusterStateIndex"], 9);
    server.expect_event(NS, "Synced").await;
    assert_eq!(reconcile.await.unwrap().unwrap(), Action::requeue(broker_object::RESYNC_PERIOD));
    assert_eq!(broker_state.calls(), vec!["CreateNamespace shop", "CreateConsumerGroup shop/billing bindings=2"]);
}

#[tokio::test]
async fn deleted_topic_that_never_synced_leaves_the_broker_alone() {
    let (broker, broker_state) = fake_broker::start(Script::default()).await;
    let (client, mut server) = api_server::client();
    let ctx = context(client, broker);
    let topic = deleted(common::topic(json!({"clusterRef": "emq"})));
    let reconcile = tokio::spawn(broker_object::reconcile(Arc::new(topic.clone()), ctx));

    server.expect_event(NS, "NotDeleted").await;
    server.expect(Method::PATCH, &topic_path(), |_| (StatusCode::OK, serde_json::to_value(&topic).unwrap())).await;
    assert_eq!(reconcile.await.unwrap().unwrap(), Action::await_change());
    server.expect_no_more().await;
    assert!(broker_state.calls().is_empty(), "{:?}", broker_state.calls());
}

#[tokio::test]
async fn consumer_group_with_a_changed_spec_is_rejected_with_a_hint() {
    let (broker, _) = fake_broker::start(Script {
        create_consumer_group: Some(tonic::Status::already_exists("consumer group exists with another spec")),
        ..Script::default()
    })
    .await;
    let (client, mut server) = api_server::client();
    let ctx = context(client, broker);
    let spec = serde_json::from_value(json!({"clusterRef": "emq", "bindings": [{"topic": "orders"}]})).unwrap();
    let mut group = eventter_operator::crd::ConsumerGroup::new("billing", spec);
    group.metadata.namespace = Some(NS.into());
    group.metadata.finalizers = Some(vec!["eventter.io/consumergroup".into()]);
    let reconcile = tokio::spawn(broker_object::reconcile(Arc::new(group.clone()), ctx));

    expect_cluster_get(&mut server).await;
    let seen = server
        .expect(
            Method::PATCH,
            &format!("/apis/eventter.io/v1alpha1/namespaces/{NS}/consumergroups/billing/status"),
            patched_status(&group),
        )
        .await;
    let message = seen.body["status"]["conditions"][0]["message"].as_str().unwrap().to_string();
    assert!(message.starts_with("consumer group exists with another spec") && message.contains("delete"), "{message}");
    server.expect_event(NS, "Rejected").await;
    assert_eq!(reconcile.await.unwrap().unwrap(), Action::await_change());
}
