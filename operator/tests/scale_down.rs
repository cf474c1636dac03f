//! Safe scale-down of an EventterCluster against a scripted API server (every request
//! checked in order) and the fake broker, which keeps each node's drain state.

mod common;

use std::sync::Arc;

use common::api_server::{self, ApiServer};
use common::fake_broker::{self, Script};
use common::{after_status_patch, cluster_path, context, finished, ok_echo, patched_status, NS};
use eventter_operator::controller::{cluster, Context};
use eventter_operator::crd::{DecommissionedNode, EventterCluster};
use eventtermq_proto::v1 as pb;
use http::{Method, StatusCode};
use kube::runtime::controller::Action;
use serde_json::json;

fn stateful_set_path() -> String {
    format!("/apis/apps/v1/namespaces/{NS}/statefulsets/emq")
}

/// A cluster whose status records a StatefulSet of `current` replicas (founded with 3),
/// ready, with `spec.replicas` `desired`.
fn recorded_cluster(current: i32, desired: i32, decommission: Vec<DecommissionedNode>) -> EventterCluster {
    let mut cluster = common::cluster();
    cluster.spec.replicas = current;
    let dump = fake_broker::healthy_dump_of(current as u64);
    let health = [(1, Ok(dump.local.clone().unwrap()))];
    let mut status = cluster::cluster_status(&cluster, current, &Ok(dump), &health, 3);
    status.replicas = Some(current);
    status.node_authentication = Some("ClusterSecret".into());
    status.decommission = decommission;
    cluster.status = Some(status);
    cluster.spec.replicas = desired;
    cluster.metadata.generation = Some(2);
    cluster
}

/// One pass: the events named in `events` come before the StatefulSet's apply (the
/// decommissions are asked for first); returns the applied StatefulSet, the status
/// patch (if any) and the action.
async fn pass(
    cluster: &EventterCluster,
    server: &mut ApiServer,
    ctx: Arc<Context>,
    events: &[&str],
    pods_ready: i32,
) -> (serde_json::Value, Option<serde_json::Value>, Action) {
    let reconcile = tokio::spawn(cluster::reconcile(Arc::new(cluster.clone()), ctx));
    common::expect_secret_get(server).await;
    server.expect(Method::PATCH, &format!("/api/v1/namespaces/{NS}/services/emq-nodes"), ok_echo).await;
    server.expect(Method::PATCH, &format!("/api/v1/namespaces/{NS}/services/emq"), ok_echo).await;
    server.expect(Method::PATCH, &format!("/api/v1/namespaces/{NS}/services/emq-metrics"), ok_echo).await;
    common::expect_cluster_secret(server).await;
    for reason in events {
        server.expect_event(NS, reason).await;
    }
    let sts = server
        .expect(Method::PATCH, &stateful_set_path(), move |body| {
            let mut sts = body.clone();
            sts["status"] = json!({"replicas": pods_ready, "readyReplicas": pods_ready});
            (StatusCode::OK, sts)
        })
        .await
        .body;
    server.expect(Method::PATCH, &format!("/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/emq"), ok_echo).await;
    let status = server.expect(Method::PATCH, &format!("{}/status", cluster_path()), patched_status(cluster)).await;
    let action = finished(reconcile).await.unwrap();
    server.expect_no_more().await;
    (sts, Some(status.body), action)
}

fn drain(open: u64, closed: u64, groups: u64) -> Option<pb::DrainProgress> {
    Some(pb::DrainProgress {
        open_segments: open,
        closed_segments: closed,
        consumer_groups: groups,
        drained: open + closed + groups == 0,
    })
}

fn condition(status: &serde_json::Value, type_: &str) -> Option<serde_json::Value> {
    status["status"]["conditions"].as_array().unwrap().iter().find(|c| c["type"] == type_).cloned()
}

/// 5 -> 3: the brokers of emq-4 and emq-3 are decommissioned, the StatefulSet keeps 5
/// until emq-4 is drained (then 4), then 3 once emq-3 is; the status shows the progress.
#[tokio::test]
async fn scale_down_decommissions_then_lowers_the_stateful_set_as_brokers_drain() {
    let (broker, broker_state) =
        fake_broker::start(Script { dump: Some(fake_broker::healthy_dump_of(5)), ..Script::default() }).await;
    let (client, mut server) = api_server::client();
    let mut cluster = recorded_cluster(5, 3, vec![]);

    let ctx = context(client.clone(), broker);
    let (sts, status, action) = pass(&cluster, &mut server, ctx, &["Decommissioning"], 5).await;
    let status = status.unwrap();
    assert_eq!(sts["spec"]["replicas"], 5, "nothing drained yet");
    assert_eq!(action, Action::requeue(cluster::SCALE_DOWN_RECHECK_PERIOD));
    assert_eq!(broker_state.write_calls(), vec!["DecommissionNode 5", "DecommissionNode 4"]);
    assert_eq!(status["status"]["replicas"], 5);
    assert_eq!(status["status"]["selector"], "app.kubernetes.io/instance=emq,app.kubernetes.io/name=eventtermq");
    let decommission = status["status"]["decommission"].as_array().unwrap();
    assert_eq!(decommission.len(), 2);
    assert_eq!(decommission[0]["pod"], "emq-4");
    assert_eq!(decommission[0]["id"], "5");
    assert_eq!(
        status["status"]["scaleDown"],
        "draining emq-4: 0 open, 0 closed segments, 0 groups left; emq-3: 0 open, 0 closed segments, 0 groups left"
    );
    let progressing = condition(&status, "Progressing").unwrap();
    assert_eq!(progressing["status"], "True");
    assert_eq!(progressing["reason"], "Decommissioning");
    assert!(condition(&status, "ScaleDownBlocked").is_none());
    cluster = after_status_patch(&cluster, &status);

    // The brokers report progress: emq-4 drained, emq-3 still holds data.
    broker_state.set_drain(5, drain(0, 0, 0));
    broker_state.set_drain(4, drain(0, 3, 1));
    let ctx = context(client.clone(), broker);
    let (sts, status, action) = pass(&cluster, &mut server, ctx, &[], 5).await;
    let status = status.unwrap();
    assert_eq!(sts["spec"]["replicas"], 4, "emq-4 may go");
    assert_eq!(action, Action::requeue(cluster::SCALE_DOWN_RECHECK_PERIOD));
    assert_eq!(
        status["status"]["scaleDown"],
        "draining emq-4 drained; emq-3: 0 open, 3 closed segments, 1 groups left"
    );
    assert_eq!(status["status"]["decommission"][1]["closedSegments"], 3);
    assert_eq!(status["status"]["decommission"][1]["consumerGroups"], 1);
    assert_eq!(status["status"]["replicas"], 4);
    assert_eq!(broker_state.write_calls().len(), 2, "no decommission asked twice");
    cluster = after_status_patch(&cluster, &status);

    broker_state.set_drain(4, drain(0, 0, 0));
    let ctx = context(client.clone(), broker);
    let (sts, status, action) = pass(&cluster, &mut server, ctx, &[], 4).await;
    let status = status.unwrap();
    assert_eq!(sts["spec"]["replicas"], 3);
    assert_eq!(status["status"]["replicas"], 3);
    assert_eq!(action, Action::requeue(cluster::READY_RECHECK_PERIOD));
    assert_eq!(condition(&status, "Progressing").unwrap()["reason"], "PodsReady");
}

/// 3 -> 2 with a topic of replication factor 3: the brokers refuse, the StatefulSet
/// keeps 3 and the status says why.
#[tokio::test]
async fn a_refused_decommission_blocks_the_scale_down_with_the_brokers_message() {
    let refusal = "NotEnoughNodesLeft (4013): topic default/orders needs 3 nodes, 2 would be left";
    let (broker, broker_state) = fake_broker::start(Script {
        dump: Some(fake_broker::healthy_dump_of(3)),
        decommission: Some(tonic::Status::failed_precondition(refusal)),
        ..Script::default()
    })
    .await;
    let (client, mut server) = api_server::client();
    let cluster = recorded_cluster(3, 2, vec![]);
    let ctx = context(client.clone(), broker);
    let (sts, status, action) = pass(&cluster, &mut server, ctx, &["ScaleDownBlocked"], 3).await;
    let status = status.unwrap();
    assert_eq!(sts["spec"]["replicas"], 3, "the StatefulSet is left as it is");
    assert_eq!(action, Action::requeue(cluster::SCALE_DOWN_RECHECK_PERIOD));
    let blocked = condition(&status, "ScaleDownBlocked").unwrap();
    assert_eq!(blocked["status"], "True");
    assert_eq!(blocked["reason"], "DecommissionRefused");
    let message = blocked["message"].as_str().unwrap();
    assert!(message.contains("emq-2 (node 3)") && message.contains(refusal), "{message}");
    assert_eq!(status["status"]["scaleDown"], format!("blocked: {message}"));
    assert!(status["status"].get("decommission").is_none(), "a refused node is not draining");
    assert_eq!(status["status"]["replicas"], 3);
    assert!(broker_state.node(3).unwrap().drain.is_none());

    // Asked again 5 s later and refused the same way: no new event, no status patch.
    let cluster = after_status_patch(&cluster, &status);
    let ctx = context(client, broker);
    let reconcile = tokio::spawn(cluster::reconcile(Arc::new(cluster.clone()), ctx));
    common::expect_secret_get(&mut server).await;
    server.expect(Method::PATCH, &format!("/api/v1/namespaces/{NS}/services/emq-nodes"), ok_echo).await;
    server.expect(Method::PATCH, &format!("/api/v1/namespaces/{NS}/services/emq"), ok_echo).await;
    server.expect(Method::PATCH, &format!("/api/v1/namespaces/{NS}/services/emq-metrics"), ok_echo).await;
    common::expect_cluster_secret(&mut server).await;
    let sts = server
        .expect(Method::PATCH, &stateful_set_path(), |body| {
            let mut sts = body.clone();
            sts["status"] = json!({"replicas": 3, "readyReplicas": 3});
            (StatusCode::OK, sts)
        })
        .await
        .body;
    assert_eq!(sts["spec"]["replicas"], 3);
    server.expect(Method::PATCH, &format!("/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/emq"), ok_echo).await;
    assert_eq!(finished(reconcile).await.unwrap(), Action::requeue(cluster::SCALE_DOWN_RECHECK_PERIOD));
    server.expect_no_more().await;
    assert_eq!(broker_state.write_calls(), vec!["DecommissionNode 3", "DecommissionNode 3"]);
}

/// 5 -> 3 while draining, then back to 5: the operator takes its decommissions back.
#[tokio::test]
async fn raising_replicas_during_a_scale_down_cancels_the_decommissions() {
    let (broker, broker_state) =
        fake_broker::start(Script { dump: Some(fake_broker::healthy_dump_of(5)), ..Script::default() }).await;
    broker_state.set_drain(5, drain(0, 1, 0));
    broker_state.set_drain(4, drain(1, 1, 1));
    let started = |pod: &str, id: &str| DecommissionedNode { pod: pod.into(), id: id.into(), ..Default::default() };
    let cluster = recorded_cluster(5, 5, vec![started("emq-4", "5"), started("emq-3", "4")]);
    let (client, mut server) = api_server::client();
    let ctx = context(client, broker);
    let (sts, status, action) = pass(&cluster, &mut server, ctx, &["DecommissionCancelled"], 5).await;
    let status = status.unwrap();
    assert_eq!(sts["spec"]["replicas"], 5);
    assert_eq!(broker_state.write_calls(), vec!["DecommissionNode 5 cancel", "DecommissionNode 4 cancel"]);
    assert!(broker_state.node(5).unwrap().drain.is_none() && broker_state.node(4).unwrap().drain.is_none());
    assert!(status["status"].get("decommission").is_none());
    assert!(status["status"].get("scaleDown").is_none());
    assert_eq!(action, Action::requeue(cluster::READY_RECHECK_PERIOD));
}

/// While no broker answers, a pending scale-down cannot be checked: the reconcile
/// fails (retried with backoff) before the StatefulSet is applied, so nothing is
/// lowered.
#[tokio::test]
async fn a_scale_down_without_an_answering_broker_lowers_nothing() {
    let (client, mut server) = api_server::client();
    let ctx = context(client, fake_broker::closed_address().await);
    let cluster = recorded_cluster(5, 3, vec![]);
    let reconcile = tokio::spawn(cluster::reconcile(Arc::new(cluster), ctx));
    common::expect_secret_get(&mut server).await;
    server.expect(Method::PATCH, &format!("/api/v1/namespaces/{NS}/services/emq-nodes"), ok_echo).await;
    server.expect(Method::PATCH, &format!("/api/v1/namespaces/{NS}/services/emq"), ok_echo).await;
    server.expect(Method::PATCH, &format!("/api/v1/namespaces/{NS}/services/emq-metrics"), ok_echo).await;
    common::expect_cluster_secret(&mut server).await;
    let error = finished(reconcile).await.unwrap_err();
    assert!(matches!(error, eventter_operator::error::Error::BrokerUnavailable { .. }), "{error}");
    server.expect_no_more().await;
}
