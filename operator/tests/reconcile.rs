//! The reconcilers against a scripted API server (every request checked in order) and
//! an in-process fake broker.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::api_server::{self, status_error, ApiServer};
use common::fake_broker::{self, Script};
use common::{
    after_status_patch, cluster_path, context, expect_cluster_get, finished, ok_echo, patched_status, topic_path, NS,
};
use eventter_operator::builders;
use eventter_operator::controller::{broker_object, cluster, error_policy, Context};
use eventter_operator::crd::{BrokerObjectStatus, ConsumerGroup, EventterCluster, Topic};
use eventter_operator::error::Error;
use eventtermq_proto::v1 as pb;
use http::{Method, StatusCode};
use kube::runtime::controller::Action;
use serde_json::json;

fn stateful_set_path() -> String {
    format!("/apis/apps/v1/namespaces/{NS}/statefulsets/emq")
}

/// GET of a StatefulSet that does not exist yet.
async fn expect_no_stateful_set(server: &mut ApiServer) {
    server.expect(Method::GET, &stateful_set_path(), |_| (StatusCode::NOT_FOUND, status_error(404, "NotFound"))).await;
}

#[tokio::test]
async fn cluster_create_applies_children_then_status() {
    let (broker, broker_state) =
        fake_broker::start(Script { dump: Some(fake_broker::healthy_dump()), ..Script::default() }).await;
    let (client, mut server) = api_server::client();
    let ctx = context(client, broker);
    let reconcile = tokio::spawn(cluster::reconcile(Arc::new(common::cluster()), ctx));

    common::expect_secret_get(&mut server).await;
    let applied = [
        format!("/api/v1/namespaces/{NS}/services/emq-nodes"),
        format!("/api/v1/namespaces/{NS}/services/emq"),
        format!("/api/v1/namespaces/{NS}/services/emq-metrics"),
    ];
    for path in &applied {
        let seen = server.expect(Method::PATCH, path, ok_echo).await;
        assert!(
            seen.query.contains("fieldManager=eventter-operator") && seen.query.contains("force=true"),
            "{}",
            seen.query
        );
        assert_eq!(seen.body["metadata"]["ownerReferences"][0]["kind"], "EventterCluster");
    }
    // A new cluster: no StatefulSet whose --bootstrap-expect to keep.
    expect_no_stateful_set(&mut server).await;
    common::expect_cluster_secret(&mut server).await;
    let seen = server
        .expect(Method::PATCH, &stateful_set_path(), |body| {
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
    assert_eq!(status["bootstrapExpect"], 3);
    assert_eq!(status["members"].as_array().unwrap().len(), 3);
    assert_eq!(status["members"][0]["state"], "Alive");
    // The answering broker's own health; the others cannot be asked through the fixed
    // test address, and say so.
    assert_eq!(status["members"][0]["diskFreeBytes"], 10u64 << 30);
    assert_eq!(status["members"][0]["diskFreeMinBytes"], 64u64 << 20);
    assert_eq!(status["members"][1]["leader"], true);
    assert!(status["members"][1]["healthError"].is_string(), "{status}");
    let conditions = status["conditions"].as_array().unwrap();
    let condition = |t: &str| conditions.iter().find(|c| c["type"] == t).unwrap().clone();
    assert_eq!(condition("Ready")["status"], "True");
    assert_eq!(condition("Progressing")["status"], "False");
    assert_eq!(condition("Degraded")["status"], "False");
    server.expect_event(NS, "ClusterReady").await;

    let action = finished(reconcile).await.unwrap();
    assert_eq!(action, Action::requeue(cluster::READY_RECHECK_PERIOD));
    server.expect_no_more().await;
    assert_eq!(broker_state.calls(), vec!["Dump"]);
}

#[tokio::test]
async fn cluster_forming_with_unreachable_broker_is_not_ready_nor_degraded() {
    let (client, mut server) = api_server::client();
    let ctx = context(client, fake_broker::closed_address().await);
    let reconcile = tokio::spawn(cluster::reconcile(Arc::new(common::cluster()), ctx));
    common::expect_secret_get(&mut server).await;
    server.expect(Method::PATCH, &format!("/api/v1/namespaces/{NS}/services/emq-nodes"), ok_echo).await;
    server.expect(Method::PATCH, &format!("/api/v1/namespaces/{NS}/services/emq"), ok_echo).await;
    server.expect(Method::PATCH, &format!("/api/v1/namespaces/{NS}/services/emq-metrics"), ok_echo).await;
    expect_no_stateful_set(&mut server).await;
    common::expect_cluster_secret(&mut server).await;
    server.expect(Method::PATCH, &stateful_set_path(), ok_echo).await;
    server.expect(Method::PATCH, &format!("/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/emq"), ok_echo).await;
    let seen =
        server.expect(Method::PATCH, &format!("{}/status", cluster_path()), patched_status(&common::cluster())).await;
    let conditions = seen.body["status"]["conditions"].as_array().unwrap().clone();
    let status_of = |t: &str| conditions.iter().find(|c| c["type"] == t).unwrap()["status"].clone();
    assert_eq!(status_of("Ready"), "False");
    assert_eq!(status_of("Progressing"), "True");
    assert_eq!(status_of("Degraded"), "False");
    let action = finished(reconcile).await.unwrap();
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
    assert_eq!(status["clusterStateIndex"], 8);
    assert_eq!(status["observedGeneration"], 2);
    server.expect_event(NS, "Synced").await;

    let action = finished(reconcile).await.unwrap();
    assert_eq!(action, Action::requeue(broker_object::RESYNC_PERIOD));
    server.expect_no_more().await;
    // The `default` namespace exists: read, then one write.
    assert_eq!(
        broker_state.calls(),
        vec!["ListTopics default", "CreateTopic default/orders shards=4 rf=3 retention=Some(5400) type=fanout"]
    );
    assert_eq!(broker_state.index(), 8);
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

    let action = finished(reconcile).await.unwrap();
    assert_eq!(action, Action::await_change());
    server.expect_no_more().await;
    assert_eq!(broker_state.calls().len(), 2);
    assert_eq!(broker_state.index(), 0, "a refused write takes no index");
}

#[tokio::test]
async fn topic_with_changed_spec_is_updated_and_an_immutable_change_is_rejected() {
    let (broker, broker_state) = fake_broker::start(Script::default().with_topic("default", held_orders())).await;
    let (client, mut server) = api_server::client();
    let ctx = context(client, broker);
    let topic = common::topic(json!({"clusterRef": "emq", "replicationFactor": 2}));
    let reconcile = tokio::spawn(broker_object::reconcile(Arc::new(topic.clone()), ctx));

    expect_cluster_get(&mut server).await;
    let seen = server.expect(Method::PATCH, &format!("{}/status", topic_path()), patched_status(&topic)).await;
    assert_eq!(seen.body["status"]["conditions"][0]["message"], "replication_factor: is immutable");
    server.expect_event(NS, "Rejected").await;
    assert_eq!(finished(reconcile).await.unwrap(), Action::await_change());
    assert_eq!(broker_state.calls(), vec!["ListTopics default", "UpdateTopic default/orders rf=Some(2)"]);
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

    let error = finished(reconcile).await.unwrap_err();
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
    assert_eq!(finished(reconcile).await.unwrap(), Action::requeue(broker_object::DEPENDENCY_RETRY_DELAY));
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
    assert_eq!(finished(reconcile).await.unwrap(), Action::await_change());
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
    assert_eq!(finished(reconcile).await.unwrap(), Action::await_change());
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
    assert_eq!(finished(reconcile).await.unwrap(), Action::await_change());
    server.expect_no_more().await;
    assert_eq!(broker_state.calls(), vec!["DeleteTopic default/orders"]);
}

#[tokio::test]
async fn consumer_group_is_created_with_its_bindings() {
    let script = Script { index: 9, ..Script::default() }
        .with_topic("shop", pb::Topic { name: "orders".into(), ..pb::Topic::default() })
        .with_topic("shop", pb::Topic { name: "payments".into(), ..pb::Topic::default() });
    let (broker, broker_state) = fake_broker::start(script).await;
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
    assert_eq!(seen.body["status"]["clusterStateIndex"], 10);
    assert_eq!(seen.body["status"]["lag"], 0, "{}", seen.body);
    server.expect_event(NS, "Synced").await;
    assert_eq!(finished(reconcile).await.unwrap(), Action::requeue(broker_object::GROUP_STATUS_PERIOD_DEFAULT));
    assert_eq!(
        broker_state.calls(),
        vec!["ListConsumerGroups shop", "CreateConsumerGroup shop/billing bindings=2", "DescribeConsumerGroups shop"]
    );
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
    assert_eq!(finished(reconcile).await.unwrap(), Action::await_change());
    server.expect_no_more().await;
    assert!(broker_state.calls().is_empty(), "{:?}", broker_state.calls());
}

#[tokio::test]
async fn consumer_group_with_a_changed_spec_is_updated_in_place() {
    // The broker's group has another size than the spec's (the default, 10,000) and
    // no delivery limit.
    let held = pb::ConsumerGroup {
        name: "billing".into(),
        bindings: vec![pb::Binding {
            topic: "orders".into(),
            exchange_type: "fanout".into(),
            headers_match: "all".into(),
            ..pb::Binding::default()
        }],
        size: 500,
        ..pb::ConsumerGroup::default()
    };
    let dead = pb::Topic { name: "dead".into(), ..pb::Topic::default() };
    let script = Script { index: 4, ..Script::default() }
        .with_topic("default", held_orders())
        .with_topic("default", dead)
        .with_consumer_group("default", held);
    let (broker, broker_state) = fake_broker::start(script).await;
    let (client, mut server) = api_server::client();
    let ctx = context(client, broker);
    let spec = serde_json::from_value(json!({
        "clusterRef": "emq",
        "bindings": [{"topic": "orders"}],
        "ackTimeoutMs": 5000,
        "deliveriesMax": 3,
        "deadLetterTopic": "dead",
        "deadLetterRoutingKey": "billing.dead",
        "messageTtlMs": 60000,
        "readyMessagesMax": 800,
        "readyBytesMax": 1048576
    }))
    .unwrap();
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
    assert_eq!(seen.body["status"]["conditions"][0]["status"], "True", "{}", seen.body);
    server.expect_event(NS, "Synced").await;
    assert_eq!(finished(reconcile).await.unwrap(), Action::requeue(broker_object::GROUP_STATUS_PERIOD_DEFAULT));
    assert_eq!(
        broker_state.calls(),
        vec![
            "ListConsumerGroups default",
            "ListTopics default",
            "CreateConsumerGroup default/billing bindings=1",
            "UpdateConsumerGroup default/billing bindings=1",
            "DescribeConsumerGroups default"
        ]
    );
    broker_state.edit(|namespaces| {
        let g = &namespaces["default"].groups["billing"];
        assert_eq!(
            (g.size, g.ack_timeout_ms, g.deliveries_max, g.dead_letter_topic.as_str()),
            (10_000, 5000, 3, "dead")
        );
        assert_eq!((g.message_ttl_ms, g.ready_messages_max, g.ready_bytes_max), (60_000, 800, 1 << 20));
        assert_eq!(g.dead_letter_routing_key, "billing.dead");
    });
}

/// The broker's copy of the Topic `common::topic(json!({"clusterRef": "emq"}))`.
fn held_orders() -> pb::Topic {
    pb::Topic {
        name: "orders".into(),
        shards: 1,
        replication_factor: 3,
        retention: Some(prost_types::Duration { seconds: 0, nanos: 0 }),
        default_exchange_type: "fanout".into(),
        ..pb::Topic::default()
    }
}

fn topic_status_path() -> String {
    format!("{}/status", topic_path())
}

/// The loop seen on a real cluster: each pass wrote to the broker (a new Raft entry
/// and index even for an unchanged topic), patched the new index into the status, and
/// that patch triggered the next pass. An unchanged topic is written once.
#[tokio::test]
async fn topic_in_sync_is_written_once_then_only_read() {
    let (broker, broker_state) = fake_broker::start(Script { index: 7, ..Script::default() }).await;
    let (client, mut server) = api_server::client();
    let ctx = context(client, broker);
    let topic = common::topic(json!({"clusterRef": "emq", "retention": "7d"}));

    let reconcile = tokio::spawn(broker_object::reconcile(Arc::new(topic.clone()), ctx.clone()));
    expect_cluster_get(&mut server).await;
    let patch = server.expect(Method::PATCH, &topic_status_path(), patched_status(&topic)).await;
    assert_eq!(patch.body["status"]["clusterStateIndex"], 8);
    server.expect_event(NS, "Synced").await;
    assert_eq!(finished(reconcile).await.unwrap(), Action::requeue(broker_object::RESYNC_PERIOD));
    server.expect_no_more().await;

    // The next passes get the object as the status patch left it.
    let synced = Arc::new(after_status_patch(&topic, &patch.body));
    for _ in 0..2 {
        broker_state.other_writes(5);
        common::in_sync_pass(&synced, &ctx, &mut server).await;
    }
    assert_eq!(
        broker_state.write_calls(),
        vec!["CreateTopic default/orders shards=1 rf=3 retention=Some(604800) type=fanout"]
    );
    assert_eq!(broker_state.index(), 18);
    assert_eq!(broker_state.calls().iter().filter(|c| *c == "ListTopics default").count(), 3);
}

/// A Topic in sync whose broker copy someone changed: the next pass repairs it with
/// one update, and the index moves to that write.
#[tokio::test]
async fn topic_changed_in_the_broker_is_updated_back() {
    let changed = pb::Topic { shards: 2, default_exchange_type: "topic".into(), ..held_orders() };
    let (broker, broker_state) =
        fake_broker::start(Script { index: 20, ..Script::default() }.with_topic("default", changed)).await;
    let (client, mut server) = api_server::client();
    let ctx = context(client, broker);
    let mut topic = common::topic(json!({"clusterRef": "emq", "shards": 2}));
    let ready = eventter_operator::controller::condition(&[], "Ready", true, "Synced", "in sync", Some(2));
    topic.status = Some(BrokerObjectStatus {
        conditions: vec![ready],
        observed_generation: Some(2),
        cluster_state_index: Some(3),
    });
    let reconcile = tokio::spawn(broker_object::reconcile(Arc::new(topic.clone()), ctx));

    expect_cluster_get(&mut server).await;
    let seen = server.expect(Method::PATCH, &topic_status_path(), patched_status(&topic)).await;
    assert_eq!(seen.body["status"]["clusterStateIndex"], 21);
    assert_eq!(seen.body["status"]["conditions"][0]["reason"], "Synced");
    assert_eq!(finished(reconcile).await.unwrap(), Action::requeue(broker_object::RESYNC_PERIOD));
    // Still Ready: no event.
    server.expect_no_more().await;
    assert_eq!(broker_state.write_calls(), vec!["UpdateTopic default/orders rf=Some(3)"]);
    assert_eq!(broker_state.topic("default", "orders").unwrap().default_exchange_type, "fanout");
}

/// A Topic in sync whose broker copy was deleted behind the operator's back is created
/// again.
#[tokio::test]
async fn topic_deleted_in_the_broker_is_created_again() {
    let (broker, broker_state) =
        fake_broker::start(Script { index: 7, ..Script::default() }.with_topic("default", held_orders())).await;
    let (client, mut server) = api_server::client();
    let ctx = context(client, broker);
    let topic = common::topic(json!({"clusterRef": "emq"}));
    let reconcile = tokio::spawn(broker_object::reconcile(Arc::new(topic.clone()), ctx.clone()));
    expect_cluster_get(&mut server).await;
    let patch = server.expect(Method::PATCH, &topic_status_path(), patched_status(&topic)).await;
    // Found in place before the operator ever wrote it: the index of that read.
    assert_eq!(patch.body["status"]["clusterStateIndex"], 7);
    server.expect_event(NS, "Synced").await;
    finished(reconcile).await.unwrap();
    assert!(broker_state.write_calls().is_empty(), "{:?}", broker_state.calls());

    broker_state.edit(|namespaces| {
        namespaces.get_mut("default").unwrap().topics.clear();
    });
    let synced = after_status_patch(&topic, &patch.body);
    let reconcile = tokio::spawn(broker_object::reconcile(Arc::new(synced.clone()), ctx));
    expect_cluster_get(&mut server).await;
    let patch = server.expect(Method::PATCH, &topic_status_path(), patched_status(&synced)).await;
    assert_eq!(patch.body["status"]["clusterStateIndex"], 8);
    assert_eq!(finished(reconcile).await.unwrap(), Action::requeue(broker_object::RESYNC_PERIOD));
    server.expect_no_more().await;
    assert_eq!(
        broker_state.write_calls(),
        vec!["CreateTopic default/orders shards=1 rf=3 retention=Some(0) type=fanout"]
    );
}

#[tokio::test]
async fn topic_in_a_new_broker_namespace_creates_the_namespace_first() {
    let (broker, broker_state) = fake_broker::start(Script::default()).await;
    let (client, mut server) = api_server::client();
    let ctx = context(client, broker);
    let topic = common::topic(json!({"clusterRef": "emq", "namespace": "shop"}));
    let reconcile = tokio::spawn(broker_object::reconcile(Arc::new(topic.clone()), ctx));
    expect_cluster_get(&mut server).await;
    let seen = server.expect(Method::PATCH, &topic_status_path(), patched_status(&topic)).await;
    // The topic's write, the second.
    assert_eq!(seen.body["status"]["clusterStateIndex"], 2);
    server.expect_event(NS, "Synced").await;
    finished(reconcile).await.unwrap();
    assert_eq!(
        broker_state.calls(),
        vec![
            "ListTopics shop",
            "CreateNamespace shop",
            "CreateTopic shop/orders shards=1 rf=3 retention=Some(0) type=fanout"
        ]
    );
}

fn billing(spec: serde_json::Value) -> ConsumerGroup {
    let mut group = ConsumerGroup::new("billing", serde_json::from_value(spec).unwrap());
    group.metadata.namespace = Some(NS.into());
    group.metadata.generation = Some(1);
    group.metadata.finalizers = Some(vec!["eventter.io/consumergroup".into()]);
    group
}

fn group_status_path() -> String {
    format!("/apis/eventter.io/v1alpha1/namespaces/{NS}/consumergroups/billing/status")
}

/// A group whose binding names no exchange type (the broker stores its topic's
/// default) and a start time (the broker does not compare it): written once.
#[tokio::test]
async fn consumer_group_in_sync_is_written_once_then_only_read() {
    let direct = pb::Topic { default_exchange_type: "direct".into(), ..held_orders() };
    let (broker, broker_state) =
        fake_broker::start(Script { index: 30, ..Script::default() }.with_topic("default", direct)).await;
    let (client, mut server) = api_server::client();
    let ctx = context(client, broker);
    let group = billing(json!({
        "clusterRef": "emq",
        "bindings": [{"topic": "orders", "routingKey": "eu"}],
        "since": "2026-01-01T00:00:00Z"
    }));

    let reconcile = tokio::spawn(broker_object::reconcile(Arc::new(group.clone()), ctx.clone()));
    expect_cluster_get(&mut server).await;
    let patch = server.expect(Method::PATCH, &group_status_path(), patched_status(&group)).await;
    assert_eq!(patch.body["status"]["clusterStateIndex"], 31);
    server.expect_event(NS, "Synced").await;
    finished(reconcile).await.unwrap();

    let synced = Arc::new(after_status_patch(&group, &patch.body));
    broker_state.other_writes(5);
    common::in_sync_pass(&synced, &ctx, &mut server).await;
    assert_eq!(broker_state.write_calls(), vec!["CreateConsumerGroup default/billing bindings=1"]);
    assert_eq!(broker_state.index(), 36);
}

/// The lag the group's broker reports goes into the status (with the pod running the
/// group, from the EventterCluster's members); a pass that reads the same lag writes
/// nothing, one that reads another patches the status; a broker that cannot say
/// leaves the lag unset with the reason.
#[tokio::test]
async fn consumer_group_status_follows_the_brokers_lag() {
    let script = Script::default().with_topic("default", held_orders());
    let (broker, broker_state) = fake_broker::start(script).await;
    let (client, mut server) = api_server::client();
    let ctx = context(client, broker);
    let group = billing(json!({"clusterRef": "emq", "bindings": [{"topic": "orders"}]}));
    let mut cluster = common::cluster();
    cluster.status = Some(eventter_operator::controller::cluster::cluster_status(
        &cluster,
        3,
        &Ok(fake_broker::healthy_dump()),
        &[],
        3,
    ));
    let cluster = serde_json::to_value(&cluster).unwrap();

    broker_state.set_lag("billing", 1000);
    let reconcile = tokio::spawn(broker_object::reconcile(Arc::new(group.clone()), ctx.clone()));
    expect_cluster_with(&mut server, &cluster).await;
    let patch = server.expect(Method::PATCH, &group_status_path(), patched_status(&group)).await;
    let status = &patch.body["status"];
    assert_eq!(
        (&status["lag"], &status["topicLag"]["orders"], &status["oldestUnackedSeconds"], &status["subscribers"]),
        (&json!(1000), &json!(1000), &json!(7), &json!(2)),
        "{status}"
    );
    assert_eq!((&status["node"], &status["nodeId"]), (&json!("emq-0"), &json!("1")), "{status}");
    assert!(status.get("lagError").is_none(), "{status}");
    server.expect_event(NS, "Synced").await;
    finished(reconcile).await.unwrap();

    // The same lag: read only.
    let synced = Arc::new(after_status_patch(&group, &patch.body));
    let reconcile = tokio::spawn(broker_object::reconcile(synced.clone(), ctx.clone()));
    expect_cluster_with(&mut server, &cluster).await;
    assert_eq!(finished(reconcile).await.unwrap(), Action::requeue(broker_object::GROUP_STATUS_PERIOD_DEFAULT));
    server.expect_no_more().await;

    // Consumed: the status follows.
    broker_state.set_lag("billing", 0);
    let reconcile = tokio::spawn(broker_object::reconcile(synced.clone(), ctx.clone()));
    expect_cluster_with(&mut server, &cluster).await;
    let patch = server.expect(Method::PATCH, &group_status_path(), patched_status(&*synced)).await;
    assert_eq!(patch.body["status"]["lag"], 0, "{}", patch.body);
    assert_eq!(patch.body["status"]["conditions"][0]["reason"], "Synced");
    finished(reconcile).await.unwrap();

    // The broker cannot say: no lag, and why.
    let consumed = Arc::new(after_status_patch(&*synced, &patch.body));
    broker_state.edit_script(|script| script.lag = None);
    let reconcile = tokio::spawn(broker_object::reconcile(consumed.clone(), ctx.clone()));
    expect_cluster_with(&mut server, &cluster).await;
    let patch = server.expect(Method::PATCH, &group_status_path(), patched_status(&*consumed)).await;
    let status = &patch.body["status"];
    assert!(status.get("lag").is_none(), "{status}");
    assert!(status["lagError"].as_str().unwrap().contains("cannot ask node 1"), "{status}");
    assert_eq!(status["conditions"][0]["status"], "True", "the group itself is in sync");
    finished(reconcile).await.unwrap();
    server.expect_no_more().await;
    assert_eq!(broker_state.write_calls(), vec!["CreateConsumerGroup default/billing bindings=1"]);
}

/// GET of the EventterCluster, answered with `cluster`.
async fn expect_cluster_with(server: &mut ApiServer, cluster: &serde_json::Value) {
    let cluster = cluster.clone();
    server.expect(Method::GET, &common::cluster_path(), move |_| (StatusCode::OK, cluster)).await;
    common::expect_secret_get(server).await;
}

/// A group waiting for its topic retries without writing anything: the broker refuses
/// the create before it takes a log index, and the unchanged status is not patched.
#[tokio::test]
async fn consumer_group_waiting_for_its_topic_patches_its_status_once() {
    let (broker, broker_state) = fake_broker::start(Script::default()).await;
    let (client, mut server) = api_server::client();
    let ctx = context(client, broker);
    let group = billing(json!({"clusterRef": "emq", "bindings": [{"topic": "orders"}]}));

    let reconcile = tokio::spawn(broker_object::reconcile(Arc::new(group.clone()), ctx.clone()));
    expect_cluster_get(&mut server).await;
    let patch = server.expect(Method::PATCH, &group_status_path(), patched_status(&group)).await;
    assert_eq!(patch.body["status"]["conditions"][0]["reason"], "DependencyMissing");
    assert!(patch.body["status"].get("clusterStateIndex").is_none(), "{}", patch.body);
    server.expect_event(NS, "DependencyMissing").await;
    assert_eq!(finished(reconcile).await.unwrap(), Action::requeue(broker_object::DEPENDENCY_RETRY_DELAY));

    let waiting = Arc::new(after_status_patch(&group, &patch.body));
    let reconcile = tokio::spawn(broker_object::reconcile(waiting, ctx));
    expect_cluster_get(&mut server).await;
    assert_eq!(finished(reconcile).await.unwrap(), Action::requeue(broker_object::DEPENDENCY_RETRY_DELAY));
    server.expect_no_more().await;
    assert_eq!(broker_state.index(), 0);
}

/// The StatefulSet of `cluster` as the server answers the apply: `body` with ready pods.
fn applied_stateful_set(ready: i32) -> impl FnOnce(&serde_json::Value) -> (StatusCode, serde_json::Value) {
    move |body| {
        let mut sts = body.clone();
        sts["status"] = json!({"replicas": ready, "readyReplicas": ready});
        (StatusCode::OK, sts)
    }
}

/// One cluster reconcile that finds the status's record (no StatefulSet GET); returns
/// the applied StatefulSet and the status patch.
async fn reconcile_recorded_cluster(
    cluster: &EventterCluster,
    server: &mut ApiServer,
    ctx: Arc<Context>,
    event: Option<&str>,
) -> (serde_json::Value, serde_json::Value) {
    let reconcile = tokio::spawn(cluster::reconcile(Arc::new(cluster.clone()), ctx));
    common::expect_secret_get(server).await;
    server.expect(Method::PATCH, &format!("/api/v1/namespaces/{NS}/services/emq-nodes"), ok_echo).await;
    server.expect(Method::PATCH, &format!("/api/v1/namespaces/{NS}/services/emq"), ok_echo).await;
    server.expect(Method::PATCH, &format!("/api/v1/namespaces/{NS}/services/emq-metrics"), ok_echo).await;
    common::expect_cluster_secret(server).await;
    let sts = server.expect(Method::PATCH, &stateful_set_path(), applied_stateful_set(3)).await.body;
    server.expect(Method::PATCH, &format!("/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/emq"), ok_echo).await;
    let status = server.expect(Method::PATCH, &format!("{}/status", cluster_path()), patched_status(cluster)).await;
    if let Some(reason) = event {
        server.expect_event(NS, reason).await;
    }
    finished(reconcile).await.unwrap();
    server.expect_no_more().await;
    (sts, status.body)
}

fn args_of(sts: &serde_json::Value) -> Vec<String> {
    serde_json::from_value(sts["spec"]["template"]["spec"]["containers"][0]["args"].clone()).unwrap()
}

fn flag(args: &[String], flag: &str) -> String {
    args[args.iter().position(|a| a == flag).unwrap() + 1].clone()
}

/// Scaling 3 -> 5 -> 3 changes the StatefulSet's replicas only: a changed pod template
/// would restart every broker.
#[tokio::test]
async fn scaling_the_cluster_leaves_the_pod_template_alone() {
    let (broker, _) = fake_broker::start(Script { dump: Some(fake_broker::healthy_dump()), ..Script::default() }).await;
    let (client, mut server) = api_server::client();
    let ctx = context(client.clone(), broker);

    // Created with 3 replicas: no StatefulSet yet, --bootstrap-expect 3 recorded.
    let created = common::cluster();
    let reconcile = tokio::spawn(cluster::reconcile(Arc::new(created.clone()), ctx.clone()));
    common::expect_secret_get(&mut server).await;
    server.expect(Method::PATCH, &format!("/api/v1/namespaces/{NS}/services/emq-nodes"), ok_echo).await;
    server.expect(Method::PATCH, &format!("/api/v1/namespaces/{NS}/services/emq"), ok_echo).await;
    server.expect(Method::PATCH, &format!("/api/v1/namespaces/{NS}/services/emq-metrics"), ok_echo).await;
    expect_no_stateful_set(&mut server).await;
    common::expect_cluster_secret(&mut server).await;
    let first = server.expect(Method::PATCH, &stateful_set_path(), applied_stateful_set(3)).await.body;
    server.expect(Method::PATCH, &format!("/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/emq"), ok_echo).await;
    let status = server.expect(Method::PATCH, &format!("{}/status", cluster_path()), patched_status(&created)).await;
    assert_eq!(status.body["status"]["bootstrapExpect"], 3);
    server.expect_event(NS, "ClusterReady").await;
    finished(reconcile).await.unwrap();
    server.expect_no_more().await;
    assert_eq!(flag(&args_of(&first), "--bootstrap-expect"), "3");

    let mut cluster = after_status_patch(&created, &status.body);
    let mut applied = vec![(3, first)];
    for (generation, replicas, event) in [(2, 5, Some("ClusterNotReady")), (3, 3, Some("ClusterReady"))] {
        cluster.spec.replicas = replicas;
        cluster.metadata.generation = Some(generation);
        // A fresh event recorder per pass: a repeated event is a PATCH of the first.
        let ctx = context(client.clone(), broker);
        let (sts, status) = reconcile_recorded_cluster(&cluster, &mut server, ctx, event).await;
        assert_eq!(status["status"]["bootstrapExpect"], 3);
        cluster = after_status_patch(&cluster, &status);
        applied.push((replicas, sts));
    }
    let (_, first) = &applied[0];
    for (replicas, sts) in &applied {
        assert_eq!(sts["spec"]["replicas"], *replicas);
        assert_eq!(sts["spec"]["template"], first["spec"]["template"], "replicas {replicas}");
        let (mut spec, mut first_spec) = (sts["spec"].clone(), first["spec"].clone());
        spec.as_object_mut().unwrap().remove("replicas");
        first_spec.as_object_mut().unwrap().remove("replicas");
        assert_eq!(spec, first_spec, "replicas {replicas}: only spec.replicas may differ");
    }
}

/// A cluster the operator created before it recorded `bootstrapExpect` (the flag then
/// followed spec.replicas): its StatefulSet's value is kept and recorded, whatever
/// spec.replicas says now.
#[tokio::test]
async fn cluster_without_a_record_keeps_its_stateful_sets_bootstrap_expect() {
    let (broker, _) = fake_broker::start(Script { dump: Some(fake_broker::healthy_dump()), ..Script::default() }).await;
    let (client, mut server) = api_server::client();
    let ctx = context(client, broker);
    let running =
        serde_json::to_value(builders::stateful_set(&common::cluster(), &builders::Founding::new(3))).unwrap();
    let mut cluster = common::cluster();
    cluster.spec.replicas = 5;
    cluster.metadata.generation = Some(2);
    let reconcile = tokio::spawn(cluster::reconcile(Arc::new(cluster.clone()), ctx));
    common::expect_secret_get(&mut server).await;
    server.expect(Method::PATCH, &format!("/api/v1/namespaces/{NS}/services/emq-nodes"), ok_echo).await;
    server.expect(Method::PATCH, &format!("/api/v1/namespaces/{NS}/services/emq"), ok_echo).await;
    server.expect(Method::PATCH, &format!("/api/v1/namespaces/{NS}/services/emq-metrics"), ok_echo).await;
    server.expect(Method::GET, &stateful_set_path(), |_| (StatusCode::OK, running.clone())).await;
    common::expect_cluster_secret(&mut server).await;
    let sts = server.expect(Method::PATCH, &stateful_set_path(), applied_stateful_set(3)).await.body;
    server.expect(Method::PATCH, &format!("/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/emq"), ok_echo).await;
    let status = server.expect(Method::PATCH, &format!("{}/status", cluster_path()), patched_status(&cluster)).await;
    finished(reconcile).await.unwrap();
    assert_eq!(status.body["status"]["bootstrapExpect"], 3);
    assert_eq!(sts["spec"]["replicas"], 5);
    assert_eq!(sts["spec"]["template"], running["spec"]["template"]);
}

/// Drift repair of the StatefulSet: with `bootstrapExpect` recorded the operator does
/// not read the StatefulSet (whose args may have been edited by hand, `--bootstrap-expect`
/// included) and applies its own args, which the forced server-side apply restores.
#[tokio::test]
async fn recorded_cluster_applies_its_own_args_without_reading_the_stateful_set() {
    let (broker, _) = fake_broker::start(Script { dump: Some(fake_broker::healthy_dump()), ..Script::default() }).await;
    let (client, mut server) = api_server::client();
    let ctx = context(client, broker);
    let mut cluster = common::cluster();
    cluster.spec.replicas = 4;
    // As the reconcile sees it: the answering broker (node 1) reports its own health.
    let dump = fake_broker::healthy_dump();
    let health = [(1, Ok(dump.local.clone().unwrap()))];
    let mut recorded = cluster::cluster_status(&cluster, 4, &Ok(dump), &health, 3);
    recorded.replicas = Some(4);
    recorded.node_authentication = Some("ClusterSecret".into());
    cluster.status = Some(recorded);
    let reconcile = tokio::spawn(cluster::reconcile(Arc::new(cluster.clone()), ctx));
    common::expect_secret_get(&mut server).await;
    server.expect(Method::PATCH, &format!("/api/v1/namespaces/{NS}/services/emq-nodes"), ok_echo).await;
    server.expect(Method::PATCH, &format!("/api/v1/namespaces/{NS}/services/emq"), ok_echo).await;
    server.expect(Method::PATCH, &format!("/api/v1/namespaces/{NS}/services/emq-metrics"), ok_echo).await;
    common::expect_cluster_secret(&mut server).await;
    let seen = server.expect(Method::PATCH, &stateful_set_path(), applied_stateful_set(4)).await;
    assert!(seen.query.contains("force=true"), "{}", seen.query);
    server.expect(Method::PATCH, &format!("/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/emq"), ok_echo).await;
    finished(reconcile).await.unwrap();
    // The status is as recorded: no status patch.
    server.expect_no_more().await;
    let args = args_of(&seen.body);
    assert_eq!(args, builders::broker_args(&cluster, &builders::Founding::new(3)));
    assert_eq!(flag(&args, "--bootstrap-expect"), "3");
}
