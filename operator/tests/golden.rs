//! Object builders against expected YAML under `tests/golden/`, compared as data
//! (field order and formatting do not matter).
//!
//! After an intended change: `UPDATE_GOLDEN=1 cargo test -p eventter-operator --test golden`.

mod common;

use std::path::PathBuf;

use eventter_operator::builders::{self, Founding};
use eventter_operator::crd::{EventterCluster, EventterClusterStatus};
use k8s_openapi::api::apps::v1::StatefulSet;
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
fn metrics_service() {
    check("metrics-service.yaml", &builders::metrics_service(&common::cluster()));
}

#[test]
fn client_service() {
    check("client-service.yaml", &builders::client_service(&common::cluster()));
}

/// The fixture is a new cluster: founded with its `spec.replicas`.
fn stateful_set_of_new(cluster: &EventterCluster) -> StatefulSet {
    builders::stateful_set(cluster, &Founding::of(cluster, None))
}

#[test]
fn stateful_set() {
    check("statefulset.yaml", &stateful_set_of_new(&common::cluster()));
}

#[test]
fn pod_disruption_budget() {
    check("poddisruptionbudget.yaml", &builders::pod_disruption_budget(&common::cluster()));
}

#[test]
fn broker_args_join_the_founding_pods_and_pass_settings() {
    let args = builders::broker_args(&common::cluster(), &Founding::new(3));
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
    let sts = stateful_set_of_new(&cluster);
    let labels = sts.spec.unwrap().template.metadata.unwrap().labels.unwrap();
    assert_eq!(labels["app.kubernetes.io/instance"], "emq");
    assert_eq!(labels["team"], "messaging");
}

/// The golden StatefulSet has the default `preStop` sleep (3 s, grace 63 s); another
/// value moves the grace period with it, and 0 leaves the hook out.
#[test]
fn the_pre_stop_sleep_is_added_to_the_grace_period_and_0_removes_it() {
    for (seconds, grace) in [(Some(10), 70), (Some(0), 60), (None, 63)] {
        let mut cluster = common::cluster();
        cluster.spec.pod.pre_stop_sleep_seconds = seconds;
        let pod = stateful_set_of_new(&cluster).spec.unwrap().template.spec.unwrap();
        assert_eq!(pod.termination_grace_period_seconds, Some(grace), "{seconds:?}");
        let sleep = pod.containers[0].lifecycle.as_ref().and_then(|l| l.pre_stop.as_ref()?.sleep.as_ref());
        assert_eq!(sleep.map(|s| s.seconds), Some(grace - 60).filter(|s| *s > 0), "{seconds:?}");
    }
}

fn args_of(sts: &StatefulSet) -> Vec<String> {
    sts.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0].args.clone().unwrap()
}

fn flag(args: &[String], flag: &str) -> String {
    args[args.iter().position(|a| a == flag).unwrap() + 1].clone()
}

#[test]
fn scaling_changes_the_replicas_and_not_the_pod_template() {
    let founded = common::cluster();
    let before = stateful_set_of_new(&founded);
    for replicas in [5, 1, 3] {
        let mut scaled = founded.clone();
        scaled.spec.replicas = replicas;
        scaled.status = Some(EventterClusterStatus { bootstrap_expect: Some(3), ..EventterClusterStatus::default() });
        let after = builders::stateful_set(&scaled, &Founding::of(&scaled, Some(&before)));
        let (before_spec, mut after_spec) = (before.spec.clone().unwrap(), after.spec.clone().unwrap());
        assert_eq!(after_spec.replicas, Some(replicas));
        assert_eq!(after_spec.template, before_spec.template, "replicas {replicas}");
        after_spec.replicas = before_spec.replicas;
        assert_eq!(after_spec, before_spec, "replicas {replicas}: only spec.replicas may differ");
        assert_eq!(after.metadata, before.metadata);
    }
}

#[test]
fn bootstrap_expect_is_the_recorded_value_else_the_owned_statefulsets_else_replicas() {
    let mut cluster = common::cluster();
    cluster.spec.replicas = 5;
    assert_eq!(builders::bootstrap_expect(&cluster, None), 5, "a new cluster");

    // A cluster from before the status field: what its StatefulSet runs with.
    let running = builders::stateful_set(&common::cluster(), &Founding::new(3));
    assert_eq!(builders::bootstrap_expect(&cluster, Some(&running)), 3);
    let args = args_of(&builders::stateful_set(&cluster, &Founding::of(&cluster, Some(&running))));
    assert_eq!(flag(&args, "--bootstrap-expect"), "3");
    assert_eq!(flag(&args, "--join").split(',').count(), 3);

    // A same-named StatefulSet of an earlier cluster (another uid) says nothing.
    let mut stranger = running.clone();
    stranger.metadata.owner_references.as_mut().unwrap()[0].uid = "another-uid".into();
    assert_eq!(builders::bootstrap_expect(&cluster, Some(&stranger)), 5);

    // The record wins over the StatefulSet, so a hand edit of the flag is repaired.
    let mut edited = running.clone();
    let container = &mut edited.spec.as_mut().unwrap().template.spec.as_mut().unwrap().containers[0];
    let args = container.args.as_mut().unwrap();
    let i = args.iter().position(|a| a == "--bootstrap-expect").unwrap();
    args[i + 1] = "7".into();
    assert_eq!(builders::bootstrap_expect(&cluster, Some(&edited)), 7, "no record: the running value");
    cluster.status = Some(EventterClusterStatus { bootstrap_expect: Some(3), ..EventterClusterStatus::default() });
    assert_eq!(builders::bootstrap_expect(&cluster, Some(&edited)), 3);
}

/// `volumeReclaimPolicy: Delete` becomes the StatefulSet's whenScaled: Delete (volumes
/// of the cluster kept when it is deleted); unset (Retain) sets nothing, so the
/// StatefulSet applied before the field existed stays as it was.
#[test]
fn volume_reclaim_policy_sets_the_stateful_sets_pvc_retention_when_delete() {
    let mut cluster = common::cluster();
    let retained = builders::stateful_set(&cluster, &Founding::new(3));
    assert!(retained.spec.unwrap().persistent_volume_claim_retention_policy.is_none());
    cluster.spec.volume_reclaim_policy = Some(eventter_operator::crd::VolumeReclaimPolicy::Delete);
    let deleted = builders::stateful_set(&cluster, &Founding::new(3));
    let policy = deleted.spec.unwrap().persistent_volume_claim_retention_policy.unwrap();
    assert_eq!(policy.when_scaled.as_deref(), Some("Delete"));
    assert_eq!(policy.when_deleted.as_deref(), Some("Retain"));
}

/// Every broker pod the operator builds runs locked down, whatever the spec turns on:
/// non-root, a read-only root filesystem, no privilege escalation, every capability
/// dropped and none added, the runtime's seccomp profile. A builder change that loses
/// any of it fails here (the golden file alone could be regenerated over it).
#[test]
fn every_built_pod_runs_non_root_read_only_without_capabilities() {
    use eventter_operator::crd::NodeAuthentication;
    let mut variants = vec![("plain", common::cluster(), Founding::new(3))];
    let mut tls = common::cluster();
    tls.spec.tls = Some(serde_json::from_value(serde_json::json!({"selfSigned": {}})).unwrap());
    variants.push(("selfSigned", tls, Founding::new(3)));
    let mut provided = common::cluster();
    provided.spec.tls = Some(serde_json::from_value(serde_json::json!({"secretName": "emq-cert"})).unwrap());
    let insecure = Founding { bootstrap_expect: 3, node_authentication: NodeAuthentication::InsecureTrustedNetwork };
    variants.push(("secretName, insecure", provided, insecure));
    for (what, cluster, founding) in variants {
        let sts = builders::stateful_set(&cluster, &founding);
        let pod = sts.spec.unwrap().template.spec.unwrap();
        let psc = pod.security_context.expect("pod securityContext");
        assert_eq!(psc.run_as_non_root, Some(true), "{what}");
        assert_ne!(psc.run_as_user, Some(0), "{what}");
        assert_eq!(psc.seccomp_profile.map(|p| p.type_).as_deref(), Some("RuntimeDefault"), "{what}");
        let containers = pod.containers.iter().chain(pod.init_containers.iter().flatten());
        for c in containers {
            let sc = c.security_context.as_ref().unwrap_or_else(|| panic!("{what}: {} has no securityContext", c.name));
            assert_eq!(sc.run_as_non_root, Some(true), "{what}: {}", c.name);
            assert_eq!(sc.read_only_root_filesystem, Some(true), "{what}: {}", c.name);
            assert_eq!(sc.allow_privilege_escalation, Some(false), "{what}: {}", c.name);
            assert_ne!(sc.privileged, Some(true), "{what}: {}", c.name);
            let caps = sc.capabilities.as_ref().unwrap_or_else(|| panic!("{what}: {} keeps capabilities", c.name));
            assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]), "{what}: {}", c.name);
            assert!(caps.add.as_ref().is_none_or(|a| a.is_empty()), "{what}: {} adds capabilities", c.name);
            // Secrets are mounted read-only; the data volume is the only writable one.
            for m in c.volume_mounts.iter().flatten() {
                assert!(m.name == "data" || m.read_only == Some(true), "{what}: {} mounts {} writable", c.name, m.name);
            }
        }
        assert!(pod.host_network.is_none() && pod.host_pid.is_none() && pod.host_ipc.is_none(), "{what}");
    }
}
