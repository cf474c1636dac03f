//! Issue 17 on the operator side, against the scripted API server: the cluster secret
//! generated once and mounted (a running cluster started with
//! `--insecure-trusted-network` kept on it), `spec.tls` (the operator's own CA and pod
//! certificates, issued once and not again while valid; a missing `secretName` named
//! in `TLSReady`), and a `User` without `passwordSecretRef` getting a generated Secret.

mod common;

use std::sync::Arc;

use common::api_server::{self, status_error, ApiServer};
use common::fake_broker::{self, Script};
use common::{app_user, cluster_path, context, finished, ok_echo, patched_status, ready, user_path, NS};
use eventter_operator::builders::{self, Founding};
use eventter_operator::controller::{cluster, user};
use eventter_operator::crd::{EventterCluster, NodeAuthentication};
use http::{Method, StatusCode};
use serde_json::json;

fn secret_path(name: &str) -> String {
    format!("/api/v1/namespaces/{NS}/secrets/{name}")
}

fn sts_path() -> String {
    format!("/apis/apps/v1/namespaces/{NS}/statefulsets/emq")
}

fn not_found(_: &serde_json::Value) -> (StatusCode, serde_json::Value) {
    (StatusCode::NOT_FOUND, status_error(404, "NotFound"))
}

fn created(body: &serde_json::Value) -> (StatusCode, serde_json::Value) {
    (StatusCode::CREATED, body.clone())
}

fn ready_sts(body: &serde_json::Value) -> (StatusCode, serde_json::Value) {
    let mut sts = body.clone();
    sts["status"] = json!({"replicas": 3, "readyReplicas": 3});
    (StatusCode::OK, sts)
}

fn args_of(sts: &serde_json::Value) -> Vec<String> {
    serde_json::from_value(sts["spec"]["template"]["spec"]["containers"][0]["args"].clone()).unwrap()
}

fn condition(status: &serde_json::Value, type_: &str) -> serde_json::Value {
    status["status"]["conditions"].as_array().unwrap().iter().find(|c| c["type"] == type_).cloned().unwrap_or_default()
}

fn decoded(secret: &serde_json::Value, key: &str) -> String {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD.decode(secret["data"][key].as_str().unwrap()).unwrap();
    String::from_utf8(bytes).unwrap()
}

async fn expect_services(server: &mut ApiServer) {
    for service in ["emq-nodes", "emq", "emq-metrics"] {
        server.expect(Method::PATCH, &format!("/api/v1/namespaces/{NS}/services/{service}"), ok_echo).await;
    }
}

#[tokio::test]
async fn a_new_cluster_gets_a_generated_cluster_secret_mounted_instead_of_the_insecure_flag() {
    let (broker, _) = fake_broker::start(Script { dump: Some(fake_broker::healthy_dump()), ..Script::default() }).await;
    let (client, mut server) = api_server::client();
    let reconcile = tokio::spawn(cluster::reconcile(Arc::new(common::cluster()), context(client, broker)));
    common::expect_secret_get(&mut server).await;
    expect_services(&mut server).await;
    server.expect(Method::GET, &sts_path(), not_found).await;
    server.expect(Method::GET, &secret_path("emq-cluster-secret"), not_found).await;
    let secret = server.expect(Method::POST, &format!("/api/v1/namespaces/{NS}/secrets"), created).await.body;
    assert_eq!(secret["metadata"]["name"], "emq-cluster-secret");
    assert_eq!(secret["metadata"]["ownerReferences"][0]["kind"], "EventterCluster");
    let value = decoded(&secret, "secret");
    assert_eq!(value.len(), 2 * builders::CLUSTER_SECRET_BYTES);
    assert!(value.chars().all(|c| c.is_ascii_hexdigit()));
    server.expect_event(NS, "ClusterSecretCreated").await;
    let sts = server.expect(Method::PATCH, &sts_path(), ready_sts).await.body;
    let args = args_of(&sts);
    let at = args.iter().position(|a| a == "--cluster-secret-file").expect("--cluster-secret-file");
    assert_eq!(args[at + 1], "/etc/eventtermq/cluster/secret");
    assert!(!args.contains(&"--insecure-trusted-network".to_string()));
    let volumes = sts["spec"]["template"]["spec"]["volumes"].to_string();
    assert!(volumes.contains("emq-cluster-secret"), "{volumes}");
    assert!(!sts.to_string().contains(&value), "the secret's value is in no pod spec");
    server.expect(Method::PATCH, &format!("/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/emq"), ok_echo).await;
    let status =
        server.expect(Method::PATCH, &format!("{}/status", cluster_path()), patched_status(&common::cluster())).await;
    assert_eq!(status.body["status"]["nodeAuthentication"], "ClusterSecret");
    assert!(condition(&status.body, "TLSReady").is_null(), "no TLS condition without spec.tls");
    server.expect_event(NS, "ClusterReady").await;
    finished(reconcile).await.unwrap();
    server.expect_no_more().await;
}

/// A cluster an earlier operator made (pods on `--insecure-trusted-network`, no
/// record in the status) keeps the flag: a broker with the secret and one without
/// refuse each other, so rolling the pods onto the secret would split the cluster.
#[tokio::test]
async fn a_running_cluster_on_the_insecure_flag_keeps_it_and_records_it() {
    let (broker, _) = fake_broker::start(Script { dump: Some(fake_broker::healthy_dump()), ..Script::default() }).await;
    let (client, mut server) = api_server::client();
    let insecure = Founding { bootstrap_expect: 3, node_authentication: NodeAuthentication::InsecureTrustedNetwork };
    let running = serde_json::to_value(builders::stateful_set(&common::cluster(), &insecure)).unwrap();
    assert!(args_of(&running).contains(&"--insecure-trusted-network".to_string()));
    let mut old = common::cluster();
    // Recorded as an older operator did: no nodeAuthentication.
    old.status = Some(eventter_operator::crd::EventterClusterStatus {
        bootstrap_expect: Some(3),
        replicas: Some(3),
        ..Default::default()
    });
    let reconcile = tokio::spawn(cluster::reconcile(Arc::new(old.clone()), context(client, broker)));
    common::expect_secret_get(&mut server).await;
    expect_services(&mut server).await;
    server.expect(Method::GET, &sts_path(), |_| (StatusCode::OK, running.clone())).await;
    // No cluster secret is read or made.
    let sts = server.expect(Method::PATCH, &sts_path(), ready_sts).await.body;
    assert_eq!(sts["spec"]["template"], running["spec"]["template"], "the pods are not rolled");
    server.expect(Method::PATCH, &format!("/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/emq"), ok_echo).await;
    let status = server.expect(Method::PATCH, &format!("{}/status", cluster_path()), patched_status(&old)).await;
    assert_eq!(status.body["status"]["nodeAuthentication"], "InsecureTrustedNetwork");
    server.expect_event(NS, "ClusterReady").await;
    finished(reconcile).await.unwrap();
    server.expect_no_more().await;

    // From the record on, the StatefulSet is not read again and the flag stays.
    let recorded = common::after_status_patch(&old, &status.body);
    assert_eq!(builders::node_authentication(&recorded, None), NodeAuthentication::InsecureTrustedNetwork);
    // An explicit spec wins over the record (the user restarts every pod at once).
    let mut explicit = recorded.clone();
    explicit.spec.node_authentication = Some(NodeAuthentication::ClusterSecret);
    assert_eq!(
        builders::node_authentication(&explicit, Some(&serde_json::from_value(running).unwrap())),
        NodeAuthentication::ClusterSecret
    );
}

fn tls_cluster(tls: serde_json::Value) -> EventterCluster {
    let mut cluster = common::cluster();
    cluster.spec.tls = Some(serde_json::from_value(tls).unwrap());
    cluster
}

#[tokio::test]
async fn self_signed_tls_makes_a_ca_and_pod_certificates_once_and_mounts_them() {
    let (client, mut server) = api_server::client();
    let closed = fake_broker::closed_address().await;
    let ctx = context(client.clone(), closed);
    let cluster = tls_cluster(json!({"selfSigned": {"certificateLifetimeHours": 24}}));
    let reconcile = tokio::spawn(cluster::reconcile(Arc::new(cluster.clone()), ctx));
    common::expect_secret_get(&mut server).await;
    expect_services(&mut server).await;
    server.expect(Method::GET, &sts_path(), not_found).await;
    common::expect_cluster_secret(&mut server).await;
    server.expect(Method::GET, &secret_path("emq-ca"), not_found).await;
    let ca = server.expect(Method::POST, &format!("/api/v1/namespaces/{NS}/secrets"), created).await.body;
    assert_eq!(ca["metadata"]["name"], "emq-ca");
    assert!(decoded(&ca, "ca.crt").starts_with("-----BEGIN CERTIFICATE-----"));
    assert!(decoded(&ca, "ca.key").contains("PRIVATE KEY"));
    server.expect_event(NS, "CACreated").await;
    server.expect(Method::GET, &secret_path("emq-tls"), not_found).await;
    let issued = server.expect(Method::PATCH, &secret_path("emq-tls"), ok_echo).await;
    assert!(issued.query.contains("fieldManager=eventter-operator"), "{}", issued.query);
    let certs = issued.body.clone();
    let keys: Vec<&String> = certs["data"].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["ca.crt", "emq-0.crt", "emq-0.key", "emq-1.crt", "emq-1.key", "emq-2.crt", "emq-2.key"]);
    assert_eq!(decoded(&certs, "ca.crt"), decoded(&ca, "ca.crt"));
    assert!(!certs.to_string().contains(ca["data"]["ca.key"].as_str().unwrap()), "the CA key stays in its Secret");
    assert!(certs["metadata"]["annotations"]["eventter.io/renew-after"].is_string());
    server.expect_event(NS, "CertificatesIssued").await;
    let sts = server.expect(Method::PATCH, &sts_path(), ready_sts).await.body;
    let args = args_of(&sts).join(" ");
    assert!(
        args.contains(
            "--tls-cert-file /etc/eventtermq/tls/$(POD_NAME).crt --tls-key-file /etc/eventtermq/tls/$(POD_NAME).key \
             --tls-ca-file /etc/eventtermq/tls/ca.crt"
        ),
        "{args}"
    );
    let pod = &sts["spec"]["template"]["spec"];
    assert!(pod["volumes"].to_string().contains("\"secretName\":\"emq-tls\""), "{}", pod["volumes"]);
    assert!(!pod["volumes"].to_string().contains("emq-ca\""), "pods do not mount the CA's key");
    assert_eq!(pod["containers"][0]["readinessProbe"]["httpGet"]["path"], "/readyz");
    let env = pod["containers"][0]["env"].to_string();
    assert!(env.contains("EVENTTERMQ_TLS_CA_FILE"), "{env}");
    server.expect(Method::PATCH, &format!("/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/emq"), ok_echo).await;
    let status = server.expect(Method::PATCH, &format!("{}/status", cluster_path()), patched_status(&cluster)).await;
    let tls = condition(&status.body, "TLSReady");
    assert_eq!((tls["status"].as_str(), tls["reason"].as_str()), (Some("True"), Some("SelfSigned")), "{tls}");
    assert!(tls["message"].as_str().unwrap().contains("emq-0, emq-1, emq-2"), "{tls}");
    assert_eq!(status.body["status"]["tls"]["mode"], "SelfSigned");
    assert_eq!(status.body["status"]["tls"]["secretName"], "emq-tls");
    server.expect_event(NS, "ClusterDegraded").await;
    finished(reconcile).await.unwrap();
    server.expect_no_more().await;

    // The next pass finds both Secrets: nothing issued again.
    let cluster = common::after_status_patch(&cluster, &status.body);
    let reconcile = tokio::spawn(cluster::reconcile(Arc::new(cluster.clone()), context(client, closed)));
    common::expect_secret_get(&mut server).await;
    expect_services(&mut server).await;
    common::expect_cluster_secret(&mut server).await;
    server.expect(Method::GET, &secret_path("emq-ca"), |_| (StatusCode::OK, ca.clone())).await;
    server.expect(Method::GET, &secret_path("emq-tls"), |_| (StatusCode::OK, certs.clone())).await;
    server.expect(Method::PATCH, &sts_path(), ready_sts).await;
    server.expect(Method::PATCH, &format!("/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/emq"), ok_echo).await;
    finished(reconcile).await.unwrap();
    server.expect_no_more().await;
}

#[tokio::test]
async fn a_missing_tls_secret_is_named_in_the_tls_condition() {
    let (client, mut server) = api_server::client();
    let ctx = context(client, fake_broker::closed_address().await);
    let cluster = tls_cluster(json!({"secretName": "emq-cert"}));
    let reconcile = tokio::spawn(cluster::reconcile(Arc::new(cluster.clone()), ctx));
    common::expect_secret_get(&mut server).await;
    expect_services(&mut server).await;
    server.expect(Method::GET, &sts_path(), not_found).await;
    common::expect_cluster_secret(&mut server).await;
    server.expect(Method::GET, &secret_path("emq-cert"), not_found).await;
    let sts = server.expect(Method::PATCH, &sts_path(), ready_sts).await.body;
    let args = args_of(&sts).join(" ");
    assert!(args.contains("--tls-cert-file /etc/eventtermq/tls/tls.crt --tls-key-file /etc/eventtermq/tls/tls.key"));
    server.expect(Method::PATCH, &format!("/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/emq"), ok_echo).await;
    let status = server.expect(Method::PATCH, &format!("{}/status", cluster_path()), patched_status(&cluster)).await;
    let tls = condition(&status.body, "TLSReady");
    assert_eq!((tls["status"].as_str(), tls["reason"].as_str()), (Some("False"), Some("SecretNotFound")));
    assert_eq!(tls["message"], "spec.tls.secretName: Secret \"emq-cert\" not found in namespace \"messaging\"");
    let ready_condition = condition(&status.body, "Ready");
    assert!(ready_condition["message"].as_str().unwrap().contains("TLS: spec.tls.secretName"), "{ready_condition}");
    server.expect_event(NS, "ClusterDegraded").await;
    finished(reconcile).await.unwrap();
    server.expect_no_more().await;
}

#[tokio::test]
async fn a_user_without_a_secret_gets_a_generated_one_it_owns() {
    let (broker, broker_state) = fake_broker::start(Script { index: 7, ..Script::default() }).await;
    let (client, mut server) = api_server::client();
    let ctx = context(client, broker);
    let user = app_user(json!({"clusterRef": "emq", "permissions": [{"namespace": "default", "read": ".*"}]}));
    let reconcile = tokio::spawn(user::reconcile(Arc::new(user.clone()), ctx.clone()));
    let cluster = serde_json::to_value(common::cluster()).unwrap();
    server.expect(Method::GET, &cluster_path(), |_| (StatusCode::OK, cluster.clone())).await;
    server.expect(Method::GET, &secret_path("app-eventter-credentials"), not_found).await;
    let made = server
        .expect(Method::POST, &format!("/api/v1/namespaces/{NS}/secrets"), |body| {
            let mut stored = body.clone();
            stored["metadata"]["uid"] = json!("generated-uid");
            stored["metadata"]["resourceVersion"] = json!("7");
            (StatusCode::CREATED, stored)
        })
        .await
        .body;
    assert_eq!(made["metadata"]["ownerReferences"][0]["kind"], "User");
    assert_eq!(made["metadata"]["ownerReferences"][0]["uid"], user.metadata.uid.clone().unwrap());
    assert_eq!(decoded(&made, "username"), "app");
    let password = decoded(&made, "password");
    assert_eq!(password.len(), 64);
    server.expect_event(NS, "PasswordGenerated").await;
    common::expect_secret_get(&mut server).await;
    server.expect_event(NS, "PasswordSet").await;
    let patch = server.expect(Method::PATCH, &format!("{}/status", user_path()), patched_status(&user)).await;
    let (status, reason, message) = ready(&patch.body);
    assert_eq!((status.as_str(), reason.as_str()), ("True", "Synced"), "{message}");
    assert_eq!(patch.body["status"]["passwordSecretName"], "app-eventter-credentials");
    assert_eq!(patch.body["status"]["passwordSecretVersion"], "generated-uid/7");
    server.expect_event(NS, "Synced").await;
    finished(reconcile).await.unwrap();
    server.expect_no_more().await;
    assert_eq!(broker_state.user("app").unwrap().password, password);

    // A same-named Secret this User does not own is neither used nor replaced.
    let (client, mut server) = api_server::client();
    let ctx = context(client, broker);
    let reconcile = tokio::spawn(user::reconcile(Arc::new(user.clone()), ctx));
    server.expect(Method::GET, &cluster_path(), |_| (StatusCode::OK, cluster.clone())).await;
    let mut foreign = made.clone();
    foreign["metadata"]["ownerReferences"][0]["uid"] = json!("someone-else");
    server.expect(Method::GET, &secret_path("app-eventter-credentials"), |_| (StatusCode::OK, foreign)).await;
    let patch = server.expect(Method::PATCH, &format!("{}/status", user_path()), patched_status(&user)).await;
    let (status, reason, message) = ready(&patch.body);
    assert_eq!((status.as_str(), reason.as_str()), ("False", "SecretConflict"));
    assert!(message.starts_with("spec.passwordSecretRef: unset, so the operator would generate Secret"), "{message}");
    server.expect_event(NS, "SecretConflict").await;
    finished(reconcile).await.unwrap();
    server.expect_no_more().await;
}
