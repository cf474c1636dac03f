//! The CRDs' CEL rules (`x-kubernetes-validations`), evaluated client-side with kube's
//! CEL validator as the apiserver would on create and update.
//!
//! Needs the `cel-tests` feature: `cargo test -p eventter-operator --features cel-tests --test cel`.

use eventter_operator::crd::{ConsumerGroup, EventterCluster, Topic};
use kube::core::cel::{validate_cel, validate_cel_update};
use serde_json::json;

fn topic(spec: serde_json::Value) -> Topic {
    // Defaults filled in, as the apiserver does before validating.
    Topic::new("orders", serde_json::from_value(spec).unwrap())
}

#[test]
fn topic_immutable_fields() {
    let old = topic(json!({"clusterRef": "emq", "replicationFactor": 3, "shards": 2}));
    assert!(validate_cel(&old).is_ok());

    let same = topic(json!({"clusterRef": "emq", "replicationFactor": 3, "shards": 2, "retention": "7d"}));
    assert!(validate_cel_update(&same, &old).is_ok(), "{:?}", validate_cel_update(&same, &old));

    let more_shards = topic(json!({"clusterRef": "emq", "replicationFactor": 3, "shards": 8}));
    assert!(validate_cel_update(&more_shards, &old).is_ok());

    for (changed, message) in [
        (json!({"clusterRef": "emq", "replicationFactor": 5, "shards": 2}), "replicationFactor is immutable"),
        (json!({"clusterRef": "other", "replicationFactor": 3, "shards": 2}), "clusterRef is immutable"),
        (json!({"clusterRef": "emq", "replicationFactor": 3, "shards": 1}), "shards can only grow"),
        (json!({"clusterRef": "emq", "replicationFactor": 3, "shards": 2, "namespace": "x"}), "namespace is immutable"),
        (json!({"clusterRef": "emq", "replicationFactor": 3, "shards": 2, "name": "renamed"}), "name is immutable"),
    ] {
        let result = validate_cel_update(&topic(changed), &old);
        let errors = format!("{result:?}");
        assert!(result.is_err() && errors.contains(message), "expected {message:?}, got {errors}");
    }
}

#[test]
fn consumer_group_immutable_fields() {
    let group = |spec: serde_json::Value| ConsumerGroup::new("billing", serde_json::from_value(spec).unwrap());
    let old = group(json!({"clusterRef": "emq", "name": "billing", "bindings": [{"topic": "orders"}]}));
    let rebound = group(json!({"clusterRef": "emq", "name": "billing", "bindings": [{"topic": "payments"}]}));
    assert!(validate_cel_update(&rebound, &old).is_ok());
    let unnamed = group(json!({"clusterRef": "emq", "bindings": [{"topic": "orders"}]}));
    assert!(format!("{:?}", validate_cel_update(&unnamed, &old)).contains("name is immutable"));
}

#[test]
fn cluster_storage_is_immutable_and_election_timeouts_ordered() {
    let cluster = |spec: serde_json::Value| EventterCluster::new("emq", serde_json::from_value(spec).unwrap());
    let old = cluster(json!({"image": "a", "storage": {"size": "1Gi"}}));
    let scaled = cluster(json!({"image": "b", "replicas": 5, "storage": {"size": "1Gi"}}));
    assert!(validate_cel_update(&scaled, &old).is_ok());
    let grown = cluster(json!({"image": "a", "storage": {"size": "2Gi"}}));
    assert!(format!("{:?}", validate_cel_update(&grown, &old)).contains("storage is immutable"));

    let inverted = cluster(json!({"image": "a", "broker": {"electionTimeoutMinMs": 900, "electionTimeoutMaxMs": 800}}));
    assert!(format!("{:?}", validate_cel(&inverted)).contains("electionTimeoutMinMs must be below"));
    let ordered = cluster(json!({"image": "a", "broker": {"electionTimeoutMinMs": 400, "electionTimeoutMaxMs": 800}}));
    assert!(validate_cel(&ordered).is_ok());
}

#[test]
fn user_immutable_fields() {
    use eventter_operator::crd::User;
    let user = |spec: serde_json::Value| User::new("app", serde_json::from_value(spec).unwrap());
    let base = json!({"clusterRef": "emq", "passwordSecretRef": {"name": "app-password"}});
    let old = user(base.clone());
    assert!(validate_cel(&old).is_ok());
    let mut permitted = base.clone();
    permitted["permissions"] = json!([{"namespace": "a", "read": ".*"}]);
    assert!(validate_cel_update(&user(permitted), &old).is_ok());
    for (field, value, message) in [
        ("admin", json!(true), "admin is immutable"),
        ("name", json!("other"), "name is immutable"),
        ("clusterRef", json!("other"), "clusterRef is immutable"),
    ] {
        let mut changed = base.clone();
        changed[field] = value;
        let result = validate_cel_update(&user(changed), &old);
        assert!(format!("{result:?}").contains(message), "{field}: expected {message:?}, got {result:?}");
    }
}

#[test]
fn cluster_tls_takes_exactly_one_source() {
    let cluster = |tls: serde_json::Value| {
        EventterCluster::new("emq", serde_json::from_value(json!({"image": "a", "tls": tls})).unwrap())
    };
    assert!(validate_cel(&cluster(json!({"secretName": "emq-certs"}))).is_ok());
    assert!(validate_cel(&cluster(json!({"selfSigned": {}}))).is_ok());
    for both_or_none in [json!({"secretName": "emq-certs", "selfSigned": {}}), json!({})] {
        let result = validate_cel(&cluster(both_or_none.clone()));
        assert!(
            format!("{result:?}").contains("set exactly one of secretName and selfSigned"),
            "{both_or_none}: {result:?}"
        );
    }
}

#[test]
fn consumer_group_ready_messages_max_is_at_most_its_size() {
    let group = |spec: serde_json::Value| ConsumerGroup::new("billing", serde_json::from_value(spec).unwrap());
    let base = json!({"clusterRef": "emq", "bindings": [{"topic": "orders"}], "size": 100});
    let mut within = base.clone();
    within["readyMessagesMax"] = json!(100);
    assert!(validate_cel(&group(within)).is_ok());
    let mut over = base.clone();
    over["readyMessagesMax"] = json!(101);
    let result = validate_cel(&group(over));
    assert!(format!("{result:?}").contains("readyMessagesMax must be at most size"), "{result:?}");
}
