//! The operator's own broker credentials (issue 17) against the scripted API server
//! and the fake broker, which takes only calls carrying the operator's password: the
//! Secret generated once and owned by the cluster, the brokers started with it, every
//! broker call authenticated, and each bad state of the Secret named in a status.

mod common;

use std::sync::Arc;

use common::api_server::{self, status_error, ApiServer};
use common::fake_broker::{self, Script};
use common::{cluster_path, context, finished, ok_echo, patched_status, secret_path, topic_path, NS};
use eventter_operator::controller::{broker_object, cluster};
use eventter_operator::credentials;
use http::{Method, StatusCode};
use kube::runtime::controller::Action;
use serde_json::json;

fn condition(status: &serde_json::Value, type_: &str) -> serde_json::Value {
    status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == type_).cloned().unwrap_or_default()
}

/// The rest of a cluster reconcile after the Secret: the children applied, then the
/// status patch, which is returned.
async fn expect_children_and_status(server: &mut ApiServer) -> (serde_json::Value, serde_json::Value) {
    for service in ["emq-nodes", "emq", "emq-metrics"] {
        server.expect(Method::PATCH, &format!("/api/v1/namespaces/{NS}/services/{service}"), ok_echo).await;
    }
    let sts_path = format!("/apis/apps/v1/namespaces/{NS}/statefulsets/emq");
    server.expect(Method::GET, &sts_path, |_| (StatusCode::NOT_FOUND, status_error(404, "NotFound"))).await;
    common::expect_cluster_secret(server).await;
    let sts = server
        .expect(Method::PATCH, &sts_path, |body| {
            let mut sts = body.clone();
            sts["status"] = json!({"replicas": 3, "readyReplicas": 3});
            (StatusCode::OK, sts)
        })
        .await
        .body;
    server.expect(Method::PATCH, &format!("/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/emq"), ok_echo).await;
    let status =
        server.expect(Method::PATCH, &format!("{}/status", cluster_path()), patched_status(&common::cluster())).await;
    (sts, status.body["status"].clone())
}

#[tokio::test]
async fn a_new_cluster_gets_a_generated_secret_and_the_brokers_take_it() {
    let (broker, broker_state) = fake_broker::start(Script {
        dump: Some(fake_broker::healthy_dump()),
        // Not the fixture's: the broker takes the password the operator generates.
        operator_password: "not yet known".into(),
        ..Script::default()
    })
    .await;
    let (client, mut server) = api_server::client();
    let ctx = context(client, broker);
    let reconcile = tokio::spawn(cluster::reconcile(Arc::new(common::cluster()), ctx));

    server.expect(Method::GET, &secret_path(), |_| (StatusCode::NOT_FOUND, status_error(404, "NotFound"))).await;
    let state = broker_state.clone();
    let created = server
        .expect(Method::POST, &format!("/api/v1/namespaces/{NS}/secrets"), move |body| {
            use base64::Engine;
            let password =
                base64::engine::general_purpose::STANDARD.decode(body["data"]["password"].as_str().unwrap()).unwrap();
            // The brokers started with it: from now on they take it.
            state.edit_script(|s| s.operator_password = String::from_utf8(password).unwrap());
            (StatusCode::CREATED, body.clone())
        })
        .await;
    let secret = &created.body;
    assert_eq!(secret["metadata"]["name"], "emq-operator-credentials");
    assert_eq!(secret["metadata"]["ownerReferences"][0]["kind"], "EventterCluster");
    assert_eq!(secret["metadata"]["ownerReferences"][0]["controller"], true);
    assert_eq!(secret["data"]["user"], "ZXZlbnR0ZXItb3BlcmF0b3I="); // eventter-operator
    assert_eq!(broker_state.script.lock().unwrap().operator_password.len(), 2 * credentials::GENERATED_PASSWORD_BYTES);
    server.expect_event(NS, "CredentialsCreated").await;

    let (sts, status) = expect_children_and_status(&mut server).await;
    let container = &sts["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<&str> = container["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    let flag = |name: &str| args.iter().position(|a| *a == name).map(|i| args[i + 1]);
    assert_eq!(flag("--admin-user"), Some("eventter-operator"));
    assert_eq!(flag("--admin-password-file"), Some("/etc/eventtermq/operator/password"));
    let volume = &sts["spec"]["template"]["spec"]["volumes"][0];
    assert_eq!(volume["secret"]["secretName"], "emq-operator-credentials");
    assert_eq!(container["volumeMounts"][1]["mountPath"], "/etc/eventtermq/operator");
    assert_eq!(container["volumeMounts"][1]["readOnly"], true);
    assert_eq!(condition(&status, "CredentialsReady")["status"], "True", "{status}");
    assert_eq!(condition(&status, "Ready")["status"], "True", "{status}");
    server.expect_event(NS, "ClusterReady").await;
    assert_eq!(finished(reconcile).await.unwrap(), Action::requeue(cluster::READY_RECHECK_PERIOD));
    server.expect_no_more().await;
    // The Dump went through with the generated password.
    assert_eq!(broker_state.calls(), vec!["Dump"]);
}

#[tokio::test]
async fn a_secret_the_brokers_refuse_is_named_in_the_cluster_status() {
    let (broker, broker_state) = fake_broker::start(Script {
        dump: Some(fake_broker::healthy_dump()),
        operator_password: "the password the brokers first started with".into(),
        ..Script::default()
    })
    .await;
    let (client, mut server) = api_server::client();
    let ctx = context(client, broker);
    let reconcile = tokio::spawn(cluster::reconcile(Arc::new(common::cluster()), ctx));
    common::expect_secret_get(&mut server).await;
    let (_, status) = expect_children_and_status(&mut server).await;
    let credentials = condition(&status, "CredentialsReady");
    assert_eq!((&credentials["status"], &credentials["reason"]), (&json!("False"), &json!("Refused")), "{status}");
    let message = credentials["message"].as_str().unwrap();
    assert!(message.contains("refused the operator's credentials: wrong user name or password"), "{message}");
    assert!(message.contains("emq-operator-credentials"), "{message}");
    assert!(!message.contains(common::OPERATOR_PASSWORD), "{message}");
    assert_eq!(condition(&status, "Ready")["status"], "False");
    // Its pods run, and the operator cannot read them.
    server.expect_event(NS, "ClusterDegraded").await;
    finished(reconcile).await.unwrap();
    server.expect_no_more().await;
    assert_eq!(broker_state.calls(), vec!["Refused wrong credentials"]);
}

#[tokio::test]
async fn a_secret_without_a_password_is_named_and_the_brokers_not_called() {
    let (broker, broker_state) =
        fake_broker::start(Script { dump: Some(fake_broker::healthy_dump()), ..Script::default() }).await;
    let (client, mut server) = api_server::client();
    let ctx = context(client, broker);
    let reconcile = tokio::spawn(cluster::reconcile(Arc::new(common::cluster()), ctx));
    let mut secret = serde_json::to_value(common::operator_secret()).unwrap();
    secret["data"].as_object_mut().unwrap().remove("password");
    server.expect(Method::GET, &secret_path(), move |_| (StatusCode::OK, secret)).await;
    let (_, status) = expect_children_and_status(&mut server).await;
    let credentials = condition(&status, "CredentialsReady");
    assert_eq!((&credentials["status"], &credentials["reason"]), (&json!("False"), &json!("SecretInvalid")));
    assert_eq!(credentials["message"], "Secret \"emq-operator-credentials\" has no key \"password\"");
    assert_eq!(condition(&status, "Ready")["status"], "False");
    server.expect_event(NS, "ClusterDegraded").await;
    finished(reconcile).await.unwrap();
    server.expect_no_more().await;
    assert!(broker_state.calls().is_empty(), "{:?}", broker_state.calls());
}

#[tokio::test]
async fn a_topic_waits_for_the_operators_secret_without_calling_the_broker() {
    let (broker, broker_state) = fake_broker::start(Script::default()).await;
    let (client, mut server) = api_server::client();
    let ctx = context(client, broker);
    let topic = common::topic(json!({"clusterRef": "emq"}));
    let reconcile = tokio::spawn(broker_object::reconcile(Arc::new(topic.clone()), ctx));
    let cluster = serde_json::to_value(common::cluster()).unwrap();
    server.expect(Method::GET, &cluster_path(), |_| (StatusCode::OK, cluster)).await;
    server.expect(Method::GET, &secret_path(), |_| (StatusCode::NOT_FOUND, status_error(404, "NotFound"))).await;
    let seen = server.expect(Method::PATCH, &format!("{}/status", topic_path()), patched_status(&topic)).await;
    let ready = &seen.body["status"]["conditions"][0];
    assert_eq!((&ready["status"], &ready["reason"]), (&json!("False"), &json!("CredentialsMissing")));
    assert!(ready["message"].as_str().unwrap().contains("\"emq-operator-credentials\""), "{ready}");
    server.expect_event(NS, "CredentialsMissing").await;
    assert_eq!(finished(reconcile).await.unwrap(), Action::requeue(broker_object::DEPENDENCY_RETRY_DELAY));
    server.expect_no_more().await;
    assert!(broker_state.calls().is_empty());
}

#[tokio::test]
async fn a_topic_the_broker_refuses_the_operator_for_says_so_and_retries() {
    let (broker, broker_state) =
        fake_broker::start(Script { operator_password: "another password".into(), ..Script::default() }).await;
    let (client, mut server) = api_server::client();
    let ctx = context(client, broker);
    let topic = common::topic(json!({"clusterRef": "emq"}));
    let reconcile = tokio::spawn(broker_object::reconcile(Arc::new(topic.clone()), ctx));
    common::expect_cluster_get(&mut server).await;
    let seen = server.expect(Method::PATCH, &format!("{}/status", topic_path()), patched_status(&topic)).await;
    let ready = &seen.body["status"]["conditions"][0];
    assert_eq!((&ready["status"], &ready["reason"]), (&json!("False"), &json!("BrokerUnauthenticated")));
    server.expect_event(NS, "BrokerUnauthenticated").await;
    let error = finished(reconcile).await.unwrap_err();
    assert_eq!(error.metric_label(), "broker_unauthenticated", "{error}");
    server.expect_no_more().await;
    assert_eq!(broker_state.calls(), vec!["Refused wrong credentials"]);
    assert_eq!(broker_state.index(), 0);
}
