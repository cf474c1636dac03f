//! `run` wired end to end against a permissive fake API server (every list is empty):
//! it starts the controllers and stops cleanly on shutdown.

mod common;

use std::time::Duration;

use eventter_operator::run::{run, RunConfig};
use http::{Request, Response, StatusCode};
use kube::client::Body;
use serde_json::json;
use tokio_util::sync::CancellationToken;

fn answer(request: &Request<Body>) -> (StatusCode, serde_json::Value) {
    let path = request.uri().path();
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

#[tokio::test]
async fn run_starts_controllers_and_shuts_down() {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen_by_server = seen.clone();
    tokio::spawn(async move {
        while let Some((request, send)) = handle.next_request().await {
            let (status, body) = answer(&request);
            seen_by_server.lock().unwrap().push(format!("{} {}", request.method(), request.uri().path()));
            let bytes = if body.is_null() { Vec::new() } else { serde_json::to_vec(&body).unwrap() };
            send.send_response(Response::builder().status(status).body(Body::from(bytes)).unwrap());
        }
    });

    let config = RunConfig {
        http_address: "127.0.0.1:0".parse().unwrap(),
        namespace: Some("messaging".into()),
        broker_address_override: None,
        leader_election: false,
        lease_name: "eventter-operator".into(),
        lease_namespace: None,
        identity: "test".into(),
    };
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(run(client, config, shutdown.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    shutdown.cancel();
    let result = tokio::time::timeout(Duration::from_secs(25), running).await.expect("run did not stop");
    result.unwrap().unwrap();

    let seen = seen.lock().unwrap().clone();
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
