//! The operator-ordered rolling update against a scripted API server (every request
//! checked in order) and the fake broker: which pod is evicted, when leadership is
//! handed over first, and what the status shows.

mod common;

use std::sync::Arc;

use common::api_server::{self, status_error, ApiServer};
use common::fake_broker::{self, Script};
use common::{cluster_path, context, finished, ok_echo, patched_status, NS};
use eventter_operator::controller::{cluster, Context};
use eventter_operator::crd::EventterCluster;
use http::{Method, StatusCode};
use kube::runtime::controller::Action;
use serde_json::{json, Value};

const NEW: &str = "emq-7d9f";
const OLD: &str = "emq-5c4b";

fn stateful_set_path() -> String {
    format!("/apis/apps/v1/namespaces/{NS}/statefulsets/emq")
}

fn pods_path() -> String {
    format!("/api/v1/namespaces/{NS}/pods")
}

/// A ready 3-broker cluster whose status records its StatefulSet (led by emq-1, node 2,
/// as the fake broker's Dump says).
fn recorded_cluster() -> EventterCluster {
    let mut cluster = common::cluster();
    let dump = fake_broker::healthy_dump_of(3);
    let health = [(1, Ok(dump.local.clone().unwrap()))];
    let mut status = cluster::cluster_status(&cluster, 3, &Ok(dump), &health, 3);
    status.replicas = Some(3);
    status.node_authentication = Some("ClusterSecret".into());
    cluster.status = Some(status);
    cluster.metadata.generation = Some(2);
    cluster
}

/// A pod as the API server lists it: its revision label and Ready condition.
fn pod(ordinal: usize, revision: &str, ready: bool) -> Value {
    json!({
        "metadata": {
            "name": format!("emq-{ordinal}"),
            "namespace": NS,
            "labels": {"app.kubernetes.io/instance": "emq", "controller-revision-hash": revision},
        },
        "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]},
    })
}

/// The StatefulSet as the API server answers the apply: `updated` of 3 pods on the
/// update revision, its controller up to date with the spec.
fn rolling_stateful_set(body: &Value, updated: usize) -> (StatusCode, Value) {
    let mut sts = body.clone();
    sts["metadata"]["generation"] = json!(7);
    sts["status"] = json!({
        "observedGeneration": 7, "replicas": 3, "readyReplicas": 3, "updatedReplicas": updated,
        "currentRevision": OLD, "updateRevision": NEW,
    });
    (StatusCode::OK, sts)
}

/// The requests of a pass up to the PodDisruptionBudget; returns the applied StatefulSet.
async fn children(server: &mut ApiServer, updated: usize) -> Value {
    common::expect_secret_get(server).await;
    for service in ["emq-nodes", "emq", "emq-metrics"] {
        server.expect(Method::PATCH, &format!("/api/v1/namespaces/{NS}/services/{service}"), ok_echo).await;
    }
    common::expect_cluster_secret(server).await;
    let sts = server.expect(Method::PATCH, &stateful_set_path(), |b| rolling_stateful_set(b, updated)).await.body;
    server.expect(Method::PATCH, &format!("/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/emq"), ok_echo).await;
    sts
}

async fn expect_pods(server: &mut ApiServer, pods: Vec<Value>) {
    let seen = server
        .expect(Method::GET, &pods_path(), move |_| {
            (StatusCode::OK, json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": pods}))
        })
        .await;
    assert!(
        seen.query.contains("labelSelector=app.kubernetes.io%2Finstance%3Demq%2Capp.kubernetes.io%2Fname%3Deventtermq"),
        "{}",
        seen.query
    );
}

async fn expect_eviction(server: &mut ApiServer, pod: &str, code: StatusCode) -> Value {
    server
        .expect(Method::POST, &format!("{}/{pod}/eviction", pods_path()), move |_| {
            if code.is_success() {
                (code, json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}))
            } else {
                (code, status_error(code.as_u16(), "Cannot evict pod as it would violate the pod's disruption budget."))
            }
        })
        .await
        .body
}

/// The status patch; returns the status.
async fn expect_status(server: &mut ApiServer, cluster: &EventterCluster) -> Value {
    server.expect(Method::PATCH, &format!("{}/status", cluster_path()), patched_status(cluster)).await.body["status"]
        .clone()
}

fn progressing(status: &Value) -> (String, String) {
    let c = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Progressing").unwrap();
    (c["reason"].as_str().unwrap().to_string(), c["message"].as_str().unwrap().to_string())
}

async fn run(
    cluster: &EventterCluster,
    ctx: Arc<Context>,
) -> tokio::task::JoinHandle<eventter_operator::error::Result<Action>> {
    tokio::spawn(cluster::reconcile(Arc::new(cluster.clone()), ctx))
}

#[tokio::test]
async fn the_statefulset_is_on_delete_and_a_follower_is_evicted_first_highest_ordinal_first() {
    let (broker, broker_state) =
        fake_broker::start(Script { dump: Some(fake_broker::healthy_dump()), ..Script::default() }).await;
    let (client, mut server) = api_server::client();
    let cluster = recorded_cluster();
    let reconcile = run(&cluster, context(client, broker)).await;
    let sts = children(&mut server, 1).await;
    assert_eq!(sts["spec"]["updateStrategy"], json!({"type": "OnDelete"}));
    // emq-1 leads; emq-0 already rolled: emq-2 is next.
    expect_pods(&mut server, vec![pod(0, NEW, true), pod(1, OLD, true), pod(2, OLD, true)]).await;
    let eviction = expect_eviction(&mut server, "emq-2", StatusCode::CREATED).await;
    assert_eq!(eviction["metadata"]["name"], "emq-2", "{eviction}");
    let event = server.expect_event(NS, "RollingUpdate").await;
    assert!(event.body["note"].as_str().unwrap().contains("evicted emq-2 (a Raft follower)"), "{}", event.body);
    let status = expect_status(&mut server, &cluster).await;
    assert_eq!(status["rollingUpdate"], "rolled 1 of 3, next emq-2 (follower)");
    assert_eq!(progressing(&status), ("RollingUpdate".into(), "rolled 1 of 3, next emq-2 (follower)".into()));
    assert_eq!(finished(reconcile).await.unwrap(), Action::requeue(cluster::ROLL_RECHECK_PERIOD));
    server.expect_no_more().await;
    assert!(broker_state.write_calls().is_empty());
}

#[tokio::test]
async fn the_leader_goes_last_after_handing_leadership_to_a_rolled_broker() {
    let (broker, broker_state) =
        fake_broker::start(Script { dump: Some(fake_broker::healthy_dump()), ..Script::default() }).await;
    let (client, mut server) = api_server::client();
    let cluster = recorded_cluster();
    let reconcile = run(&cluster, context(client, broker)).await;
    children(&mut server, 2).await;
    expect_pods(&mut server, vec![pod(0, NEW, true), pod(1, OLD, true), pod(2, NEW, true)]).await;
    let event = server.expect_event(NS, "LeadershipHandedOver").await;
    assert!(event.body["note"].as_str().unwrap().contains("from emq-1 to emq-0 (node 1)"), "{}", event.body);
    expect_eviction(&mut server, "emq-1", StatusCode::CREATED).await;
    let event = server.expect_event(NS, "RollingUpdate").await;
    assert!(event.body["note"].as_str().unwrap().contains("evicted emq-1 (the Raft leader)"), "{}", event.body);
    let status = expect_status(&mut server, &cluster).await;
    assert_eq!(status["rollingUpdate"], "rolled 2 of 3, next emq-1 (leader): leadership to emq-0 first");
    finished(reconcile).await.unwrap();
    server.expect_no_more().await;
    assert!(broker_state.calls().contains(&"TransferLeadership 1".to_string()), "{:?}", broker_state.calls());
}

#[tokio::test]
async fn nothing_is_evicted_while_a_pod_catches_up_or_the_budget_refuses() {
    let (broker, _) = fake_broker::start(Script { dump: Some(fake_broker::healthy_dump()), ..Script::default() }).await;
    let (client, mut server) = api_server::client();
    let cluster = recorded_cluster();

    // emq-2 restarted and is not ready yet: wait.
    let reconcile = run(&cluster, context(client.clone(), broker)).await;
    children(&mut server, 1).await;
    expect_pods(&mut server, vec![pod(0, OLD, true), pod(1, OLD, true), pod(2, NEW, false)]).await;
    let status = expect_status(&mut server, &cluster).await;
    assert_eq!(status["rollingUpdate"], "rolled 1 of 3, waiting: emq-2 is not ready (catching up)");
    assert_eq!(finished(reconcile).await.unwrap(), Action::requeue(cluster::ROLL_RECHECK_PERIOD));
    server.expect_no_more().await;

    // All ready, but the PodDisruptionBudget refuses (429): wait, no event.
    let reconcile = run(&cluster, context(client, broker)).await;
    children(&mut server, 1).await;
    expect_pods(&mut server, vec![pod(0, OLD, true), pod(1, OLD, true), pod(2, NEW, true)]).await;
    expect_eviction(&mut server, "emq-0", StatusCode::TOO_MANY_REQUESTS).await;
    let status = expect_status(&mut server, &cluster).await;
    assert_eq!(
        status["rollingUpdate"],
        "rolled 1 of 3, waiting: the PodDisruptionBudget allows no eviction of emq-0 now"
    );
    assert_eq!(finished(reconcile).await.unwrap(), Action::requeue(cluster::ROLL_RECHECK_PERIOD));
    server.expect_no_more().await;
}

#[tokio::test]
async fn a_rolled_out_statefulset_lists_no_pods_and_clears_the_progress() {
    let (broker, _) = fake_broker::start(Script { dump: Some(fake_broker::healthy_dump()), ..Script::default() }).await;
    let (client, mut server) = api_server::client();
    let mut cluster = recorded_cluster();
    cluster.status.as_mut().unwrap().rolling_update = Some("rolled 2 of 3, next emq-1 (follower)".into());
    let reconcile = run(&cluster, context(client, broker)).await;
    children(&mut server, 3).await;
    let status = expect_status(&mut server, &cluster).await;
    assert!(status.get("rollingUpdate").is_none(), "{status}");
    assert_eq!(progressing(&status).0, "PodsReady");
    assert_eq!(finished(reconcile).await.unwrap(), Action::requeue(cluster::READY_RECHECK_PERIOD));
    server.expect_no_more().await;
}

/// A StatefulSet made by an operator before OnDelete carries the defaulted
/// `rollingUpdate`, so the apply is refused: the strategy is replaced once with a
/// merge patch, then the apply goes through.
#[tokio::test]
async fn a_statefulset_of_an_earlier_operator_moves_to_on_delete() {
    let (broker, _) = fake_broker::start(Script { dump: Some(fake_broker::healthy_dump()), ..Script::default() }).await;
    let (client, mut server) = api_server::client();
    let cluster = recorded_cluster();
    let reconcile = run(&cluster, context(client, broker)).await;
    common::expect_secret_get(&mut server).await;
    for service in ["emq-nodes", "emq", "emq-metrics"] {
        server.expect(Method::PATCH, &format!("/api/v1/namespaces/{NS}/services/{service}"), ok_echo).await;
    }
    common::expect_cluster_secret(&mut server).await;
    let message = "StatefulSet.apps \"emq\" is invalid: spec.updateStrategy.rollingUpdate: Invalid value: \
                   {\"partition\":0}: only allowed for updateStrategy 'RollingUpdate'";
    let refused = server
        .expect(Method::PATCH, &stateful_set_path(), |_| {
            let mut error = status_error(422, "Invalid");
            error["message"] = json!(message);
            (StatusCode::UNPROCESSABLE_ENTITY, error)
        })
        .await;
    assert!(refused.query.contains("fieldManager=eventter-operator"), "{}", refused.query);
    let merge = server
        .expect(Method::PATCH, &stateful_set_path(), |_| {
            (StatusCode::OK, json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "emq"}}))
        })
        .await;
    assert_eq!(merge.body, json!({"spec": {"updateStrategy": {"type": "OnDelete", "rollingUpdate": null}}}));
    assert!(!merge.query.contains("force=true"), "a merge patch, not an apply: {}", merge.query);
    let applied = server
        .expect(Method::PATCH, &stateful_set_path(), |body| {
            let mut sts = body.clone();
            sts["status"] = json!({"replicas": 3, "readyReplicas": 3});
            (StatusCode::OK, sts)
        })
        .await;
    assert_eq!(applied.body["spec"]["updateStrategy"]["type"], "OnDelete");
    server.expect(Method::PATCH, &format!("/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/emq"), ok_echo).await;
    let _ = server.expect(Method::PATCH, &format!("{}/status", cluster_path()), patched_status(&cluster)).await;
    finished(reconcile).await.unwrap();
    server.expect_no_more().await;
}

/// Issue 19, upgrades: a broker that refuses to start on the new revision (here: its
/// data directory has a newer format) stops the roll, and its termination message (the
/// broker's last log line, `FallbackToLogsOnError`) is in the status and an event.
#[tokio::test]
async fn a_broker_that_refuses_to_start_stops_the_roll_and_its_reason_is_shown() {
    let (broker, _) = fake_broker::start(Script { dump: Some(fake_broker::healthy_dump()), ..Script::default() }).await;
    let (client, mut server) = api_server::client();
    let cluster = recorded_cluster();
    let reconcile = run(&cluster, context(client, broker)).await;
    let sts = children(&mut server, 1).await;
    let container = &sts["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["terminationMessagePolicy"], "FallbackToLogsOnError", "{container}");
    let refusal = "error: --dir: data directory /data has format 2 (written by eventtermq 0.2.0); this binary \
                   (eventtermq 0.1.0) reads format 1: downgrade refused, nothing in the directory was changed";
    let mut refusing = pod(2, NEW, false);
    refusing["status"]["containerStatuses"] = json!([{
        "name": "broker", "image": "localhost/eventtermq:0.1.0", "imageID": "", "ready": false, "restartCount": 3,
        "state": {"waiting": {"reason": "CrashLoopBackOff"}},
        "lastState": {"terminated": {"exitCode": 4, "reason": "Error",
            "message": format!("{{\"level\":\"INFO\",\"message\":\"starting\"}}\n{refusal}\n")}},
    }]);
    expect_pods(&mut server, vec![pod(0, OLD, true), pod(1, OLD, true), refusing]).await;
    let want = format!("emq-2 is not ready: its broker exited with status 4: {refusal}");
    let event = server.expect_event(NS, "BrokerNotStarting").await;
    assert_eq!(event.body["type"], "Warning", "{}", event.body);
    assert_eq!(event.body["note"].as_str().unwrap(), format!("rolling update waits: {want}"), "{}", event.body);
    let status = expect_status(&mut server, &cluster).await;
    assert_eq!(status["rollingUpdate"], format!("rolled 1 of 3, waiting: {want}"));
    assert_eq!(finished(reconcile).await.unwrap(), Action::requeue(cluster::ROLL_RECHECK_PERIOD));
    server.expect_no_more().await;
}
