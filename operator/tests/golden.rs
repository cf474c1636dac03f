//! Object builders against expected YAML under `tests/golden/`, compared as data
//! (field order and formatting do not matter).
//!
//! After an intended change: `UPDATE_GOLDEN=1 cargo test -p eventter-operator --test golden`.

mod common;

use std::path::PathBuf;

use eventter_operator::builders;
use serde::Serialize;

fn check<T: Serialize>(file: &str, object: &T) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(file);
    let actual = serde_json::to_value(object).unwrap();
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, serde_norway::to_string(&actual).unwrap()).unwrap();
        return;
    }
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let expected: serde_json::Value = serde_norway::from_str(&text).unwrap();
    assert!(
        actual == expected,
        "{file} differs from the builder's output (UPDATE_GOLDEN=1 regenerates it):\n{}",
        serde_norway::to_string(&actual).unwrap()
    );
}

#[test]
fn headless_service() {
    check("headless-service.yaml", &builders::headless_service(&common::cluster()));
}

#[test]
fn client_service() {
    check("client-service.yaml", &builders::client_service(&common::cluster()));
}

#[test]
fn stateful_set() {
    check("statefulset.yaml", &builders::stateful_set(&common::cluster()));
}

#[test]
fn pod_disruption_budget() {
    check("poddisruptionbudget.yaml", &builders::pod_disruption_budget(&common::cluster()));
}

#[test]
fn broker_args_join_every_pod_and_pass_settings() {
    let args = builders::broker_args(&common::cluster());
    let value = |flag: &str| args.iter().position(|a| a == flag).map(|i| args[i + 1].clone());
    assert_eq!(value("--dir").as_deref(), Some("/data"));
    assert_eq!(value("--advertise-host").as_deref(), Some("$(POD_NAME).emq-nodes.messaging.svc.cluster.local"));
    assert_eq!(
        value("--join").as_deref(),
        Some(
            "emq-0.emq-nodes.messaging.svc.cluster.local:16000,\
             emq-1.emq-nodes.messaging.svc.cluster.local:16000,\
             emq-2.emq-nodes.messaging.svc.cluster.local:16000"
        )
    );
    assert_eq!(value("--bootstrap-expect").as_deref(), Some("3"));
    assert_eq!(value("--election-timeout-min-ms").as_deref(), Some("400"));
    assert_eq!(value("--election-timeout-max-ms").as_deref(), Some("800"));
    assert_eq!(value("--dead-node-removal-ms").as_deref(), Some("60000"));
    assert_eq!(value("--heartbeat-interval-ms"), None);
}

#[test]
fn operator_labels_win_over_pod_labels() {
    let mut cluster = common::cluster();
    cluster.spec.pod.labels.insert("app.kubernetes.io/instance".into(), "other".into());
    let sts = builders::stateful_set(&cluster);
    let labels = sts.spec.unwrap().template.metadata.unwrap().labels.unwrap();
    assert_eq!(labels["app.kubernetes.io/instance"], "emq");
    assert_eq!(labels["team"], "messaging");
}
