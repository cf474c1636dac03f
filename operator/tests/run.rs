//! `run` wired end to end against a permissive fake API server (every list is empty):
//! it starts the controllers and stops cleanly on shutdown.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventter_operator::run::{run, RunConfig};
use http::{Request, Response, StatusCode};
use kube::client::Body;
use serde_json::json;
use tokio_util::sync::CancellationToken;

const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/ops/leases/eventter-operator";

/// Answers like an API server holding no objects but one Lease (`lease`).
fn answer(
    request: &Request<Body>,
    body: &serde_json::Value,
    lease: &mut Option<serde_json::Value>,
) -> (StatusCode, serde_json::Value) {
    let path = request.uri().path();
    if path.starts_with("/apis/coordination.k8s.io/") {
        return match (request.method().as_str(), lease.as_ref()) {
            ("GET", Some(stored)) => (StatusCode::OK, stored.clone()),
            ("GET", None) => (StatusCode::NOT_FOUND, common::api_server::status_error(404, "NotFound")),
            ("POST" | "PUT", _) => {
                *lease = Some(body.clone());
                (StatusCode::OK, body.clone())
            }
            _ => (StatusCode::METHOD_NOT_ALLOWED, json!(null)),
        };
    }
    let query = request.uri().query().unwrap_or_default();
    if path == "/version" {
        let info = json!({"major": "1", "minor": "34", "gitVersion": "v1.34.4", "gitCommit": "", "gitTreeState": "",
                          "buildDate": "", "goVersion": "", "compiler": "", "platform": ""});
        return (StatusCode::OK, info);
    }
    if query.contains("watch=true") {
        // An empty watch stream: the watcher simply watches again.
        return (StatusCode::OK, json!(null));
    }
    (StatusCode::OK, json!({"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": []}))
}

type Seen = Arc<Mutex<Vec<String>>>;
type StoredLease = Arc<Mutex<Option<serde_json::Value>>>;

/// Runs the operator for half a second against the fake, then shuts it down.
async fn run_briefly(leader_election: bool) -> (Vec<String>, Option<serde_json::Value>) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let seen: Seen = Arc::default();
    let lease: StoredLease = Arc::default();
    let (seen_by_server, lease_in_server) = (seen.clone(), lease.clone());
    tokio::spawn(async move {
        while let Some((request, send)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let bytes = body.collect_bytes().await.unwrap();
            let body = if bytes.is_empty() { json!(null) } else { serde_json::from_slice(&bytes).unwrap() };
            let request = Request::from_parts(parts, Body::empty());
            let (status, body) = answer(&request, &body, &mut lease_in_server.lock().unwrap());
            seen_by_server.lock().unwrap().push(format!("{} {}", request.method(), request.uri().path()));
            let bytes = if body.is_null() { Vec::new() } else { serde_json::to_vec(&body).unwrap() };
            send.send_response(Response::builder().status(status).body(Body::from(bytes)).unwrap());
        }
    });

    let config = RunConfig {
        http_address: "127.0.0.1:0".parse().unwrap(),
        namespace: Some("messaging".into()),
        broker_address_override: None,
        leader_election,
        lease_name: "eventter-operator".into(),
        lease_namespace: Some("ops".into()),
        identity: "test".into(),
        group_status_period: Duration::from_secs(15),
        node_health_timeout: Duration::from_secs(3),
        node_health_concurrency_max: 8,
    };
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(run(client, config, shutdown.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    shutdown.cancel();
    let result = tokio::time::timeout(Duration::from_secs(25), running).await.expect("run did not stop");
    result.unwrap().unwrap();
    let seen = seen.lock().unwrap().clone();
    let lease = lease.lock().unwrap().clone();
    (seen, lease)
}

#[tokio::test]
async fn run_starts_controllers_and_shuts_down() {
    let (seen, lease) = run_briefly(false).await;
    assert!(lease.is_none());
    for path in [
        "/apis/eventter.io/v1alpha1/namespaces/messaging/eventterclusters",
        "/apis/eventter.io/v1alpha1/namespaces/messaging/topics",
        "/apis/eventter.io/v1alpha1/namespaces/messaging/consumergroups",
        "/api/v1/namespaces/messaging/services",
        "/apis/apps/v1/namespaces/messaging/statefulsets",
        "/apis/policy/v1/namespaces/messaging/poddisruptionbudgets",
    ] {
        assert!(seen.iter().any(|s| s == &format!("GET {path}")), "{path} never listed: {seen:?}");
    }
}

#[tokio::test]
async fn run_with_leader_election_takes_the_lease_then_releases_it() {
    let (seen, lease) = run_briefly(true).await;
    let position = |call: &str| seen.iter().position(|s| s == call);
    let created = position(&format!("POST {}", LEASE.trim_end_matches("/eventter-operator")))
        .unwrap_or_else(|| panic!("lease never created: {seen:?}"));
    let first_list = position("GET /apis/eventter.io/v1alpha1/namespaces/messaging/eventterclusters").unwrap();
    assert!(created < first_list, "controllers started before the lease was held: {seen:?}");
    let lease = lease.unwrap();
    // Released on shutdown: no holder, so the next replica takes over at once.
    assert!(lease["spec"].get("holderIdentity").is_none_or(|h| h.is_null()), "{lease}");
}
