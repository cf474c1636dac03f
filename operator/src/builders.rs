//! Pure functions from an [`EventterCluster`] to the objects the operator owns for it.
//!
//! Nothing here talks to the API server: the reconciler applies whatever these return
//! with server-side apply, and the golden tests compare them with files under
//! `operator/tests/golden/`.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, GRPCAction, KeyToPath, ObjectFieldSelector,
    PersistentVolumeClaim, PersistentVolumeClaimSpec, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    SeccompProfile, Secret, SecretVolumeSource, SecurityContext, Service, ServicePort, ServiceSpec, Volume,
    VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::ByteString;
use kube::{Resource, ResourceExt};

use crate::crd::{EventterCluster, VolumeReclaimPolicy};
use crate::credentials;

/// Field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "eventter-operator";
pub use eventtermq_api::health::READINESS_SERVICE;
/// UID (and GID) the broker runs as: "nonroot" of distroless-style images.
pub const BROKER_UID: i64 = 65532;
/// Where the broker's volume is mounted.
pub const DATA_DIR: &str = "/data";
/// Name of the broker's volume claim template (and so of its PVCs' prefix).
pub const DATA_VOLUME: &str = "data";
/// Name of the broker container.
pub const BROKER_CONTAINER: &str = "broker";
/// Name of the volume of the operator's credential Secret in a broker pod.
pub const OPERATOR_CREDENTIALS_VOLUME: &str = "operator-credentials";
/// Where the operator's credential Secret is mounted in a broker pod.
pub const OPERATOR_CREDENTIALS_DIR: &str = "/etc/eventtermq/operator";
/// Mode of the mounted password file: owner and group (the pod's fsGroup) read it.
pub const OPERATOR_CREDENTIALS_FILE_MODE: i32 = 0o440;
/// Cluster DNS domain the advertised pod names are built on.
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// Grace period of a broker pod: time to leave the cluster and flush segments.
pub const TERMINATION_GRACE_PERIOD_SECONDS: i64 = 60;

/// Labels every object of a cluster carries.
pub fn labels(cluster_name: &str) -> BTreeMap<String, String> {
    let mut labels = selector_labels(cluster_name);
    labels.insert("app.kubernetes.io/managed-by".into(), FIELD_MANAGER.into());
    labels
}

/// Labels that select a cluster's broker pods. Never change them: a StatefulSet's
/// selector is immutable.
pub fn selector_labels(cluster_name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "eventtermq".to_string()),
        ("app.kubernetes.io/instance".to_string(), cluster_name.to_string()),
    ])
}

/// [`selector_labels`] as a label selector string (`k=v,k=v`), what the `scale`
/// subresource reports to a HorizontalPodAutoscaler.
pub fn selector_string(cluster_name: &str) -> String {
    selector_labels(cluster_name).iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

/// The first DNS label of a broker's `host:port` address: its pod's name (the
/// inverse of [`pod_address`]).
pub fn pod_of_address(address: &str) -> String {
    address.split(['.', ':']).next().unwrap_or_default().to_string()
}

/// Name of the headless Service that gives every broker pod a DNS name.
pub fn headless_service_name(cluster_name: &str) -> String {
    format!("{cluster_name}-nodes")
}

/// Address (`host:port`) broker pod `ordinal` advertises and others join through.
pub fn pod_address(cluster_name: &str, namespace: &str, ordinal: i32, port: i32) -> String {
    format!("{cluster_name}-{ordinal}.{}.{namespace}.svc.{CLUSTER_DOMAIN}:{port}", headless_service_name(cluster_name))
}

/// Address of the client Service: what the operator calls the admin API on.
pub fn client_address(cluster_name: &str, namespace: &str, port: i32) -> String {
    format!("{cluster_name}.{namespace}.svc.{CLUSTER_DOMAIN}:{port}")
}

fn metadata(cluster: &EventterCluster, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: cluster.namespace(),
        labels: Some(labels(&cluster.name_any())),
        owner_references: owner_reference(cluster).map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

fn owner_reference(cluster: &EventterCluster) -> Option<OwnerReference> {
    cluster.controller_owner_ref(&())
}

fn port(name: &str, port: i32, protocol: &str) -> ServicePort {
    ServicePort {
        name: Some(name.to_string()),
        port,
        target_port: Some(IntOrString::String(name.to_string())),
        protocol: Some(protocol.to_string()),
        ..ServicePort::default()
    }
}

/// Headless Service `<name>-nodes`: one DNS record per broker pod, published before
/// the pods are ready so that gossip and Raft can form the cluster in the first place.
pub fn headless_service(cluster: &EventterCluster) -> Service {
    let name = cluster.name_any();
    let ports = &cluster.spec.ports;
    Service {
        metadata: metadata(cluster, headless_service_name(&name)),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(selector_labels(&name)),
            ports: Some(vec![
                port("grpc", ports.grpc, "TCP"),
                port("gossip", ports.grpc, "UDP"),
                port("amqp", ports.amqp, "TCP"),
                port("metrics", ports.metrics, "TCP"),
            ]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// Name of the Service that lists every broker's `/metrics` endpoint.
pub fn metrics_service_name(cluster_name: &str) -> String {
    format!("{cluster_name}-metrics")
}

/// Label value of `app.kubernetes.io/component` on the metrics Service, which a
/// Prometheus Operator ServiceMonitor (the chart's) selects.
pub const METRICS_COMPONENT: &str = "metrics";

/// Metrics Service `<name>-metrics`: headless, the `metrics` port only, and every
/// broker pod listed whether ready or not, so that a ServiceMonitor (or any
/// endpoints-based discovery) scrapes each broker, also one that is not ready (a
/// broker without a Raft leader is exactly the one to watch). The pods themselves
/// carry `prometheus.io/*` annotations for pod-based discovery.
pub fn metrics_service(cluster: &EventterCluster) -> Service {
    let name = cluster.name_any();
    let mut meta = metadata(cluster, metrics_service_name(&name));
    meta.labels
        .get_or_insert_with(BTreeMap::new)
        .insert("app.kubernetes.io/component".into(), METRICS_COMPONENT.into());
    Service {
        metadata: meta,
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(selector_labels(&name)),
            ports: Some(vec![port("metrics", cluster.spec.ports.metrics, "TCP")]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// Client Service `<name>`: load-balances clients (and the operator) over ready brokers.
pub fn client_service(cluster: &EventterCluster) -> Service {
    let name = cluster.name_any();
    let ports = &cluster.spec.ports;
    Service {
        metadata: metadata(cluster, name.clone()),
        spec: Some(ServiceSpec {
            selector: Some(selector_labels(&name)),
            ports: Some(vec![port("grpc", ports.grpc, "TCP"), port("amqp", ports.amqp, "TCP")]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// The `--bootstrap-expect` of `cluster`'s brokers: the number of brokers it was
/// founded with, which also fixes the `--join` seeds (pods 0 to N-1).
///
/// Only a broker without state reads `--bootstrap-expect`, so the value matters when
/// the cluster is created; afterwards it is kept, because anything in the pod template
/// that followed `spec.replicas` would make every scale restart every broker. Where it
/// comes from, first match:
///
/// 1. `status.bootstrapExpect`, recorded once the operator created the StatefulSet. The
///    status rather than the StatefulSet is the record, so that a hand edit of the
///    flag is repaired like any other drift, and a StatefulSet deleted and created
///    again (e.g. to change its volume claims) gets the same template.
/// 2. `--bootstrap-expect` of `existing`, the StatefulSet as it is, if this cluster
///    owns it: a cluster made before the status field existed, or whose status was
///    lost, keeps what its pods run with.
/// 3. `spec.replicas`: a new cluster.
pub fn bootstrap_expect(cluster: &EventterCluster, existing: Option<&StatefulSet>) -> i32 {
    if let Some(recorded) = cluster.status.as_ref().and_then(|s| s.bootstrap_expect).filter(|n| *n >= 1) {
        return recorded;
    }
    existing
        .filter(|sts| owned_by(sts, cluster))
        .and_then(|sts| {
            sts.spec.as_ref()?.template.spec.as_ref()?.containers.iter().find(|c| c.name == BROKER_CONTAINER)
        })
        .and_then(|container| flag_value(container.args.as_deref()?, "--bootstrap-expect"))
        .and_then(|value| value.parse::<i32>().ok())
        .filter(|n| *n >= 1)
        .unwrap_or(cluster.spec.replicas)
}

/// Whether `cluster` is the controller owner of `sts` (not a same-named StatefulSet of
/// an earlier cluster that the garbage collector has yet to remove).
fn owned_by(sts: &StatefulSet, cluster: &EventterCluster) -> bool {
    let Some(uid) = cluster.metadata.uid.as_deref() else { return false };
    sts.metadata.owner_references.iter().flatten().any(|o| o.controller == Some(true) && o.uid == uid)
}

fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).map(String::as_str)
}

/// Command-line arguments of the broker container of a cluster founded with
/// `bootstrap_expect` brokers (see [`bootstrap_expect`]). Nothing here depends on
/// `spec.replicas`: pods added later join through the founding members.
pub fn broker_args(cluster: &EventterCluster, bootstrap_expect: i32) -> Vec<String> {
    let name = cluster.name_any();
    let namespace = cluster.namespace().unwrap_or_default();
    let spec = &cluster.spec;
    let join: Vec<String> =
        (0..bootstrap_expect).map(|ordinal| pod_address(&name, &namespace, ordinal, spec.ports.grpc)).collect();
    let mut args = vec![
        "--dir".to_string(),
        DATA_DIR.to_string(),
        "--port".to_string(),
        spec.ports.grpc.to_string(),
        "--metrics-port".to_string(),
        spec.ports.metrics.to_string(),
        "--advertise-host".to_string(),
        // Expanded by the kubelet from the POD_NAME environment variable.
        format!("$(POD_NAME).{}.{namespace}.svc.{CLUSTER_DOMAIN}", headless_service_name(&name)),
        "--join".to_string(),
        join.join(","),
        "--bootstrap-expect".to_string(),
        bootstrap_expect.to_string(),
        "--log-format".to_string(),
        "json".to_string(),
        // Brokers take node-to-node calls only from members proving it (issue 17). The
        // operator does not issue a cluster secret yet, so its brokers run as the seed
        // did, on a network trusted to hold only them, and say so explicitly. Limit who
        // reaches the pods (a NetworkPolicy) until it does.
        "--insecure-trusted-network".to_string(),
        // The operator's own administrator (see `credentials`): created by the brokers
        // at their first start, which also closes client access to those without
        // credentials.
        "--admin-user".to_string(),
        credentials::OPERATOR_USER.to_string(),
        "--admin-password-file".to_string(),
        operator_password_file(),
    ];
    let b = &spec.broker;
    let settings = [
        ("--heartbeat-interval-ms", b.heartbeat_interval_ms),
        ("--election-timeout-min-ms", b.election_timeout_min_ms),
        ("--election-timeout-max-ms", b.election_timeout_max_ms),
        ("--voters-count-max", b.voters_count_max),
        ("--dead-node-removal-ms", b.dead_node_removal_ms),
        ("--request-timeout-ms", b.request_timeout_ms),
        ("--gossip-probe-period-ms", b.gossip_probe_period_ms),
        ("--gossip-suspect-to-down-ms", b.gossip_suspect_to_down_ms),
    ];
    for (flag, value) in settings {
        if let Some(value) = value {
            args.push(flag.to_string());
            args.push(value.to_string());
        }
    }
    args
}

/// Path of the operator's password file in a broker pod.
pub fn operator_password_file() -> String {
    format!("{OPERATOR_CREDENTIALS_DIR}/{}", credentials::PASSWORD_KEY)
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar { name: name.to_string(), value: Some(value.to_string()), ..EnvVar::default() }
}

fn grpc_probe(port: i32, service: &str, initial_delay_seconds: i32, failure_threshold: i32) -> Probe {
    Probe {
        grpc: Some(GRPCAction { port, service: Some(service.to_string()) }),
        initial_delay_seconds: Some(initial_delay_seconds),
        period_seconds: Some(5),
        timeout_seconds: Some(2),
        failure_threshold: Some(failure_threshold),
        ..Probe::default()
    }
}

fn broker_container(cluster: &EventterCluster, bootstrap_expect: i32) -> Container {
    let spec = &cluster.spec;
    let ports = &spec.ports;
    let container_port = |name: &str, port: i32, protocol: &str| ContainerPort {
        name: Some(name.to_string()),
        container_port: port,
        protocol: Some(protocol.to_string()),
        ..ContainerPort::default()
    };
    Container {
        name: BROKER_CONTAINER.to_string(),
        image: Some(spec.image.clone()),
        image_pull_policy: spec.image_pull_policy.map(|p| p.as_str().to_string()),
        args: Some(broker_args(cluster, bootstrap_expect)),
        env: Some(vec![
            EnvVar {
                name: "POD_NAME".to_string(),
                value_from: Some(EnvVarSource {
                    field_ref: Some(ObjectFieldSelector {
                        field_path: "metadata.name".to_string(),
                        ..ObjectFieldSelector::default()
                    }),
                    ..EnvVarSource::default()
                }),
                ..EnvVar::default()
            },
            // `kubectl exec <pod> -- eventtermq ...` runs the CLI as the operator's
            // administrator (the file is the broker's own --admin-password-file).
            env("EVENTTERMQ_USER", credentials::OPERATOR_USER),
            env("EVENTTERMQ_PASSWORD_FILE", &operator_password_file()),
        ]),
        ports: Some(vec![
            container_port("grpc", ports.grpc, "TCP"),
            container_port("gossip", ports.grpc, "UDP"),
            container_port("amqp", ports.amqp, "TCP"),
            container_port("metrics", ports.metrics, "TCP"),
        ]),
        // Ready once the broker knows a Raft leader (it reports that per service).
        readiness_probe: Some(grpc_probe(ports.grpc, READINESS_SERVICE, 0, 3)),
        // Alive while the gRPC server answers at all; generous, so that a broker
        // replaying a long log at start-up is not killed.
        liveness_probe: Some(grpc_probe(ports.grpc, "", 30, 6)),
        resources: spec.resources.clone(),
        volume_mounts: Some(vec![
            VolumeMount { name: DATA_VOLUME.to_string(), mount_path: DATA_DIR.to_string(), ..VolumeMount::default() },
            VolumeMount {
                name: OPERATOR_CREDENTIALS_VOLUME.to_string(),
                mount_path: OPERATOR_CREDENTIALS_DIR.to_string(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
        ]),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(BROKER_UID),
            run_as_group: Some(BROKER_UID),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".to_string()]), add: None }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    }
}

fn non_empty<T>(items: &[T]) -> Option<Vec<T>>
where
    T: Clone,
{
    (!items.is_empty()).then(|| items.to_vec())
}

fn non_empty_map(map: &BTreeMap<String, String>) -> Option<BTreeMap<String, String>> {
    (!map.is_empty()).then(|| map.clone())
}

/// The pods' annotations: where Prometheus scrapes them (the `prometheus.io/*`
/// convention of its Kubernetes discovery examples and many charts), then the user's,
/// which may override them.
fn pod_annotations(cluster: &EventterCluster) -> BTreeMap<String, String> {
    let mut annotations = BTreeMap::from([
        ("prometheus.io/scrape".to_string(), "true".to_string()),
        ("prometheus.io/port".to_string(), cluster.spec.ports.metrics.to_string()),
        ("prometheus.io/path".to_string(), "/metrics".to_string()),
    ]);
    annotations.extend(cluster.spec.pod.annotations.clone());
    annotations
}

/// StatefulSet `<name>`: the broker pods, each with its own volume. `spec.replicas`
/// shows only in the StatefulSet's replicas, never in its pod template.
pub fn stateful_set(cluster: &EventterCluster, bootstrap_expect: i32) -> StatefulSet {
    let name = cluster.name_any();
    let spec = &cluster.spec;
    let pod = &spec.pod;
    // Operator labels last, so a user label cannot break the selector.
    let mut pod_labels = pod.labels.clone();
    pod_labels.extend(labels(&name));
    StatefulSet {
        metadata: metadata(cluster, name.clone()),
        spec: Some(StatefulSetSpec {
            replicas: Some(spec.replicas),
            service_name: Some(headless_service_name(&name)),
            // Brokers wait for each other (--bootstrap-expect): start them together.
            pod_management_policy: Some("Parallel".into()),
            // Retain is the StatefulSet's own default: set only for Delete, so that an
            // unset field leaves the applied StatefulSet as before.
            persistent_volume_claim_retention_policy: (spec.volume_reclaim_policy == Some(VolumeReclaimPolicy::Delete))
                .then(|| StatefulSetPersistentVolumeClaimRetentionPolicy {
                    when_scaled: Some("Delete".into()),
                    when_deleted: Some("Retain".into()),
                }),
            selector: LabelSelector { match_labels: Some(selector_labels(&name)), match_expressions: None },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(pod_annotations(cluster)),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![broker_container(cluster, bootstrap_expect)],
                    volumes: Some(vec![Volume {
                        name: OPERATOR_CREDENTIALS_VOLUME.to_string(),
                        secret: Some(SecretVolumeSource {
                            secret_name: Some(credentials::secret_name(&name)),
                            items: Some(vec![KeyToPath {
                                key: credentials::PASSWORD_KEY.to_string(),
                                path: credentials::PASSWORD_KEY.to_string(),
                                mode: None,
                            }]),
                            default_mode: Some(OPERATOR_CREDENTIALS_FILE_MODE),
                            optional: Some(false),
                        }),
                        ..Volume::default()
                    }]),
                    termination_grace_period_seconds: Some(TERMINATION_GRACE_PERIOD_SECONDS),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(BROKER_UID),
                        run_as_group: Some(BROKER_UID),
                        fs_group: Some(BROKER_UID),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".to_string(),
                            localhost_profile: None,
                        }),
                        ..PodSecurityContext::default()
                    }),
                    affinity: pod.affinity.clone(),
                    tolerations: non_empty(&pod.tolerations),
                    node_selector: non_empty_map(&pod.node_selector),
                    topology_spread_constraints: non_empty(&pod.topology_spread_constraints),
                    priority_class_name: pod.priority_class_name.clone(),
                    ..PodSpec::default()
                }),
            },
            volume_claim_templates: Some(vec![PersistentVolumeClaim {
                metadata: ObjectMeta {
                    name: Some(DATA_VOLUME.to_string()),
                    labels: Some(selector_labels(&name)),
                    ..ObjectMeta::default()
                },
                spec: Some(PersistentVolumeClaimSpec {
                    access_modes: Some(vec!["ReadWriteOnce".to_string()]),
                    storage_class_name: spec.storage.storage_class_name.clone(),
                    resources: Some(VolumeResourceRequirements {
                        requests: Some(BTreeMap::from([("storage".to_string(), Quantity(spec.storage.size.clone()))])),
                        limits: None,
                    }),
                    ..PersistentVolumeClaimSpec::default()
                }),
                status: None,
            }]),
            ..StatefulSetSpec::default()
        }),
        status: None,
    }
}

/// The operator's credential Secret of `cluster` holding `password`, owned by the
/// cluster (deleted with it).
pub fn operator_credentials_secret(cluster: &EventterCluster, password: &str) -> Secret {
    let name = cluster.name_any();
    Secret {
        metadata: ObjectMeta {
            name: Some(credentials::secret_name(&name)),
            namespace: cluster.namespace(),
            labels: Some(labels(&name)),
            owner_references: cluster.controller_owner_ref(&()).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_string()),
        data: Some(
            [
                (credentials::USER_KEY.to_string(), ByteString(credentials::OPERATOR_USER.as_bytes().to_vec())),
                (credentials::PASSWORD_KEY.to_string(), ByteString(password.as_bytes().to_vec())),
            ]
            .into(),
        ),
        ..Secret::default()
    }
}

/// PodDisruptionBudget `<name>`: voluntary disruptions (drains) take one broker at a
/// time, so a Raft majority survives them.
pub fn pod_disruption_budget(cluster: &EventterCluster) -> PodDisruptionBudget {
    let name = cluster.name_any();
    PodDisruptionBudget {
        metadata: metadata(cluster, name.clone()),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector { match_labels: Some(selector_labels(&name)), match_expressions: None }),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    }
}
