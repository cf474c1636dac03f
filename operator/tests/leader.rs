//! Leader election against a scripted API server.

mod common;

use common::api_server::{self, status_error};
use eventter_operator::leader::{LeaderElector, LeaseConfig};
use http::{Method, StatusCode};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use serde_json::json;

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/ops/leases";

fn elector(client: kube::Client) -> LeaderElector {
    LeaderElector::new(Api::<Lease>::namespaced(client, "ops"), LeaseConfig::new("eventter-operator", "me"))
}

fn lease(holder: &str, renew_time: &str) -> serde_json::Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "eventter-operator", "namespace": "ops", "resourceVersion": "5"},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15, "renewTime": renew_time, "leaseTransitions": 3}
    })
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

#[tokio::test]
async fn missing_lease_is_created_and_held() {
    let (client, mut server) = api_server::client();
    let elector = elector(client);
    let round = tokio::spawn(async move { elector.try_acquire_or_renew().await });
    let path = format!("{LEASES}/eventter-operator");
    server.expect(Method::GET, &path, |_| (StatusCode::NOT_FOUND, status_error(404, "NotFound"))).await;
    let seen = server.expect(Method::POST, LEASES, |b| (StatusCode::CREATED, b.clone())).await;
    assert_eq!(seen.body["spec"]["holderIdentity"], "me");
    assert_eq!(seen.body["spec"]["leaseDurationSeconds"], 15);
    assert!(round.await.unwrap().unwrap());
    server.expect_no_more().await;
}

#[tokio::test]
async fn lease_of_a_live_holder_is_left_alone() {
    let (client, mut server) = api_server::client();
    let elector = elector(client);
    let round = tokio::spawn(async move { elector.try_acquire_or_renew().await });
    let held = lease("other", &now());
    server.expect(Method::GET, &format!("{LEASES}/eventter-operator"), |_| (StatusCode::OK, held)).await;
    assert!(!round.await.unwrap().unwrap());
    server.expect_no_more().await;
}

#[tokio::test]
async fn expired_lease_is_taken_over_with_its_resource_version() {
    let (client, mut server) = api_server::client();
    let elector = elector(client);
    let round = tokio::spawn(async move { elector.try_acquire_or_renew().await });
    let path = format!("{LEASES}/eventter-operator");
    let expired = lease("other", "2020-01-01T00:00:00.000000Z");
    server.expect(Method::GET, &path, |_| (StatusCode::OK, expired)).await;
    let seen = server.expect(Method::PUT, &path, |b| (StatusCode::OK, b.clone())).await;
    assert_eq!(seen.body["metadata"]["resourceVersion"], "5");
    assert_eq!(seen.body["spec"]["holderIdentity"], "me");
    assert_eq!(seen.body["spec"]["leaseTransitions"], 4);
    assert!(round.await.unwrap().unwrap());
}

#[tokio::test]
async fn losing_the_race_for_an_expired_lease_is_not_leadership() {
    let (client, mut server) = api_server::client();
    let elector = elector(client);
    let round = tokio::spawn(async move { elector.try_acquire_or_renew().await });
    let path = format!("{LEASES}/eventter-operator");
    let expired = lease("other", "2020-01-01T00:00:00.000000Z");
    server.expect(Method::GET, &path, |_| (StatusCode::OK, expired)).await;
    server.expect(Method::PUT, &path, |_| (StatusCode::CONFLICT, status_error(409, "Conflict"))).await;
    assert!(!round.await.unwrap().unwrap());
}

#[tokio::test]
async fn holder_renews_its_own_lease() {
    let (client, mut server) = api_server::client();
    let elector = elector(client);
    let round = tokio::spawn(async move { elector.try_acquire_or_renew().await });
    let path = format!("{LEASES}/eventter-operator");
    let mine = lease("me", "2020-01-01T00:00:00.000000Z");
    server.expect(Method::GET, &path, |_| (StatusCode::OK, mine)).await;
    let seen = server.expect(Method::PUT, &path, |b| (StatusCode::OK, b.clone())).await;
    // A renewal is no transition.
    assert_eq!(seen.body["spec"]["leaseTransitions"], 3);
    assert_ne!(seen.body["spec"]["renewTime"], "2020-01-01T00:00:00.000000Z");
    assert!(round.await.unwrap().unwrap());
}
