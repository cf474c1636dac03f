//! Pure functions from an [`EventterCluster`] to the objects the operator owns for it.
//!
//! Nothing here talks to the API server: the reconciler applies whatever these return
//! with server-side apply, and the golden tests compare them with files under
//! `operator/tests/golden/`.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec, StatefulSetUpdateStrategy,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, KeyToPath, Lifecycle,
    LifecycleHandler, ObjectFieldSelector, PersistentVolumeClaim, PersistentVolumeClaimSpec, PodSecurityContext,
    PodSpec, PodTemplateSpec, Probe, SeccompProfile, Secret, SecretVolumeSource, SecurityContext, Service, ServicePort,
    ServiceSpec, SleepAction, Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::ByteString;
use kube::{Resource, ResourceExt};

use crate::crd::{EventterCluster, NodeAuthentication, TlsSpec, User, VolumeReclaimPolicy};
use crate::{certificates, credentials};

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
/// Name of the volume of the cluster secret in a broker pod.
pub const CLUSTER_SECRET_VOLUME: &str = "cluster-secret";
/// Where the cluster secret is mounted in a broker pod.
pub const CLUSTER_SECRET_DIR: &str = "/etc/eventtermq/cluster";
/// Key of the cluster secret in its Secret (and the file name in the pod).
pub const CLUSTER_SECRET_KEY: &str = "secret";
/// Random bytes of a generated cluster secret (hex-encoded: 64 characters).
pub const CLUSTER_SECRET_BYTES: usize = 32;
/// Name of the volume of the TLS Secret in a broker pod.
pub const TLS_VOLUME: &str = "tls";
/// Where the TLS Secret is mounted in a broker pod.
pub const TLS_DIR: &str = "/etc/eventtermq/tls";
/// Key (and file) of the CA certificate in a TLS Secret, cert-manager's name.
pub const TLS_CA_KEY: &str = "ca.crt";
/// Key of the certificate chain in a cert-manager style TLS Secret.
pub const TLS_CERT_KEY: &str = "tls.crt";
/// Key of the private key in a cert-manager style TLS Secret.
pub const TLS_KEY_KEY: &str = "tls.key";
/// Path of the metrics port's readiness endpoint (a known Raft leader).
pub const READINESS_PATH: &str = "/readyz";
/// Path of the metrics port's liveness endpoint (Raft has not stopped).
pub const LIVENESS_PATH: &str = "/livez";
/// Cluster DNS domain the advertised pod names are built on.
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// The StatefulSet's `updateStrategy.type`: the operator rolls the pods itself.
pub const UPDATE_STRATEGY: &str = "OnDelete";
/// Label the StatefulSet controller puts on each pod: the revision it was made from.
pub const REVISION_LABEL: &str = "controller-revision-hash";
/// Grace period of a broker pod: time to leave the cluster and flush segments (after
/// its `preStop` sleep, which is added to it).
pub const TERMINATION_GRACE_PERIOD_SECONDS: i64 = 60;
/// Default of `spec.pod.preStopSleepSeconds`: long enough for the endpoint change to
/// reach kube-proxy on a busy node (measured under the e2e load: 1-2 s).
pub const PRE_STOP_SLEEP_SECONDS_DEFAULT: u32 = 3;

fn pre_stop_sleep_seconds(cluster: &EventterCluster) -> u32 {
    cluster.spec.pod.pre_stop_sleep_seconds.unwrap_or(PRE_STOP_SLEEP_SECONDS_DEFAULT)
}

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
        .and_then(broker_container_of)
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

fn broker_container_of(sts: &StatefulSet) -> Option<&Container> {
    sts.spec.as_ref()?.template.spec.as_ref()?.containers.iter().find(|c| c.name == BROKER_CONTAINER)
}

/// How the brokers of `cluster` authenticate each other, first match:
///
/// 1. `spec.nodeAuthentication`, the user's explicit choice;
/// 2. `status.nodeAuthentication`, recorded when the operator applied the StatefulSet;
/// 3. the owned StatefulSet as it is (`existing`): `--insecure-trusted-network` in its
///    args keeps a cluster made before the operator issued cluster secrets on it, since
///    a broker with the secret and one without refuse each other and a rolling update
///    would split the cluster;
/// 4. `ClusterSecret`: a new cluster.
pub fn node_authentication(cluster: &EventterCluster, existing: Option<&StatefulSet>) -> NodeAuthentication {
    if let Some(mode) = cluster.spec.node_authentication {
        return mode;
    }
    let recorded = cluster.status.as_ref().and_then(|s| s.node_authentication.as_deref());
    if let Some(mode) = recorded.and_then(NodeAuthentication::parse) {
        return mode;
    }
    let running = existing.filter(|sts| owned_by(sts, cluster)).and_then(broker_container_of);
    match running.and_then(|c| c.args.as_ref()) {
        Some(args) if args.iter().any(|a| a == "--insecure-trusted-network") => {
            NodeAuthentication::InsecureTrustedNetwork
        }
        _ => NodeAuthentication::ClusterSecret,
    }
}

/// What the pod template keeps from the cluster's founding rather than following the
/// spec (see [`bootstrap_expect`] and [`node_authentication`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Founding {
    /// The brokers' `--bootstrap-expect`, and the `--join` seeds.
    pub bootstrap_expect: i32,
    /// How the brokers authenticate each other.
    pub node_authentication: NodeAuthentication,
}

impl Founding {
    /// A cluster founded with `bootstrap_expect` brokers sharing a cluster secret.
    pub fn new(bootstrap_expect: i32) -> Self {
        Self { bootstrap_expect, node_authentication: NodeAuthentication::ClusterSecret }
    }

    /// What `cluster` was founded with, given its StatefulSet as it is (`None`: not
    /// read, or none).
    pub fn of(cluster: &EventterCluster, existing: Option<&StatefulSet>) -> Self {
        Self {
            bootstrap_expect: bootstrap_expect(cluster, existing),
            node_authentication: node_authentication(cluster, existing),
        }
    }
}

/// Name of the Secret holding the cluster secret of `cluster_name`.
pub fn cluster_secret_name(cluster_name: &str) -> String {
    format!("{cluster_name}-cluster-secret")
}

/// A new random cluster secret: [`CLUSTER_SECRET_BYTES`] random bytes, hex-encoded.
pub fn generate_cluster_secret() -> String {
    let bytes: [u8; CLUSTER_SECRET_BYTES] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The Secret `<name>-cluster-secret` holding `secret`, owned by the cluster.
pub fn cluster_secret(cluster: &EventterCluster, secret: &str) -> Secret {
    let name = cluster.name_any();
    let mut meta = metadata(cluster, cluster_secret_name(&name));
    meta.labels.get_or_insert_with(BTreeMap::new).insert("app.kubernetes.io/component".into(), "cluster-secret".into());
    Secret {
        metadata: meta,
        type_: Some("Opaque".to_string()),
        data: Some([(CLUSTER_SECRET_KEY.to_string(), ByteString(secret.as_bytes().to_vec()))].into()),
        ..Secret::default()
    }
}

/// Name of the Secret of the operator's self-signed cluster CA (`ca.crt`, `ca.key`).
pub fn ca_secret_name(cluster_name: &str) -> String {
    format!("{cluster_name}-ca")
}

/// Name of the Secret of the operator-issued pod certificates (`ca.crt`,
/// `<pod>.crt`, `<pod>.key`).
pub fn pod_certificates_secret_name(cluster_name: &str) -> String {
    format!("{cluster_name}-tls")
}

/// The Secret of the operator's cluster CA (`ca.crt`, `ca.key`), owned by the cluster.
/// Broker pods do not mount it.
pub fn ca_secret(cluster: &EventterCluster, ca: &certificates::Ca) -> Secret {
    let name = cluster.name_any();
    let mut meta = metadata(cluster, ca_secret_name(&name));
    meta.labels.get_or_insert_with(BTreeMap::new).insert("app.kubernetes.io/component".into(), "ca".into());
    Secret {
        metadata: meta,
        type_: Some("Opaque".to_string()),
        data: Some(
            [
                (certificates::CA_CERT_KEY.to_string(), ByteString(ca.cert_pem().as_bytes().to_vec())),
                (certificates::CA_KEY_KEY.to_string(), ByteString(ca.key_pem().into_bytes())),
            ]
            .into(),
        ),
        ..Secret::default()
    }
}

/// The Secret of the pod certificates (`ca.crt`, `<pod>.crt`, `<pod>.key`, the times
/// as annotations), owned by the cluster, mounted by every broker pod.
pub fn pod_certificates_secret(cluster: &EventterCluster, issued: &certificates::PodCertificates) -> Secret {
    let name = cluster.name_any();
    let mut meta = metadata(cluster, pod_certificates_secret_name(&name));
    meta.labels.get_or_insert_with(BTreeMap::new).insert("app.kubernetes.io/component".into(), "tls".into());
    meta.annotations = Some(issued.annotations());
    Secret { metadata: meta, type_: Some("Opaque".to_string()), data: Some(issued.data.clone()), ..Secret::default() }
}

/// The Secret mounted into the broker pods for `tls`: the user's, or the operator's
/// pod certificates.
pub fn tls_secret_name(cluster_name: &str, tls: &TlsSpec) -> String {
    match &tls.secret_name {
        Some(name) => name.clone(),
        None => pod_certificates_secret_name(cluster_name),
    }
}

/// The DNS names a broker pod's certificate must hold: its own name under the headless
/// Service (what `--advertise-host` is, and what other brokers verify), the client
/// Service's names (what the operator and clients connect to), and `localhost` (the
/// CLI run in the pod by `kubectl exec`).
pub fn pod_dns_names(cluster_name: &str, namespace: &str, pod: &str) -> Vec<String> {
    let headless = headless_service_name(cluster_name);
    vec![
        format!("{pod}.{headless}.{namespace}.svc.{CLUSTER_DOMAIN}"),
        format!("{pod}.{headless}.{namespace}.svc"),
        format!("{pod}.{headless}.{namespace}"),
        format!("{cluster_name}.{namespace}.svc.{CLUSTER_DOMAIN}"),
        format!("{cluster_name}.{namespace}.svc"),
        format!("{cluster_name}.{namespace}"),
        cluster_name.to_string(),
        "localhost".to_string(),
    ]
}

/// Command-line arguments of the broker container of a cluster founded as `founding`
/// says (see [`Founding`]). Nothing here depends on `spec.replicas`: pods added later
/// join through the founding members.
pub fn broker_args(cluster: &EventterCluster, founding: &Founding) -> Vec<String> {
    let bootstrap_expect = founding.bootstrap_expect;
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
        // The operator's own administrator (see `credentials`): created by the brokers
        // at their first start, which also closes client access to those without
        // credentials.
        "--admin-user".to_string(),
        credentials::OPERATOR_USER.to_string(),
        "--admin-password-file".to_string(),
        operator_password_file(),
    ];
    // Brokers take node-to-node calls only from members proving it (issue 17).
    match founding.node_authentication {
        NodeAuthentication::ClusterSecret => {
            args.push("--cluster-secret-file".to_string());
            args.push(format!("{CLUSTER_SECRET_DIR}/{CLUSTER_SECRET_KEY}"));
        }
        NodeAuthentication::InsecureTrustedNetwork => args.push("--insecure-trusted-network".to_string()),
    }
    if let Some(tls) = &cluster.spec.tls {
        let (cert, key) = match &tls.secret_name {
            Some(_) => (TLS_CERT_KEY.to_string(), TLS_KEY_KEY.to_string()),
            // One Secret serves every pod: the kubelet expands $(POD_NAME).
            None => ("$(POD_NAME).crt".to_string(), "$(POD_NAME).key".to_string()),
        };
        args.extend([
            "--tls-cert-file".to_string(),
            format!("{TLS_DIR}/{cert}"),
            "--tls-key-file".to_string(),
            format!("{TLS_DIR}/{key}"),
            "--tls-ca-file".to_string(),
            format!("{TLS_DIR}/{TLS_CA_KEY}"),
        ]);
    }
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

/// An HTTP probe of the metrics port. Not the kubelet's gRPC probe: it speaks no
/// TLS, so it could not reach the gRPC port of a cluster with `spec.tls`; the metrics
/// port is plain HTTP either way and answers from the same Raft state as the gRPC
/// health service (see `eventtermq_broker::api::metrics`).
fn http_probe(port: i32, path: &str, initial_delay_seconds: i32, period_seconds: i32, failure_threshold: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            port: IntOrString::Int(port),
            path: Some(path.to_string()),
            scheme: Some("HTTP".to_string()),
            ..HTTPGetAction::default()
        }),
        initial_delay_seconds: Some(initial_delay_seconds),
        period_seconds: Some(period_seconds),
        timeout_seconds: Some(period_seconds.min(2)),
        failure_threshold: Some(failure_threshold),
        ..Probe::default()
    }
}

fn broker_container(cluster: &EventterCluster, founding: &Founding) -> Container {
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
        args: Some(broker_args(cluster, founding)),
        env: Some(
            vec![
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
            ]
            .into_iter()
            // With TLS, the CLI verifies the broker against the cluster's CA.
            .chain(spec.tls.as_ref().map(|_| env("EVENTTERMQ_TLS_CA_FILE", &format!("{TLS_DIR}/{TLS_CA_KEY}"))))
            .collect(),
        ),
        ports: Some(vec![
            container_port("grpc", ports.grpc, "TCP"),
            container_port("gossip", ports.grpc, "UDP"),
            container_port("amqp", ports.amqp, "TCP"),
            container_port("metrics", ports.metrics, "TCP"),
        ]),
        // Ready once the broker knows a Raft leader and caught up after its start (its
        // Raft state and its copies of open segments: the StatefulSet's rolling update
        // stops the next pod only then). Asked every second, so the roll goes on as soon
        // as it did (a local HTTP GET).
        readiness_probe: Some(http_probe(ports.metrics, READINESS_PATH, 0, 1, 3)),
        // Alive while Raft runs; generous, so that a broker replaying a long log at
        // start-up is not killed.
        liveness_probe: Some(http_probe(ports.metrics, LIVENESS_PATH, 30, 5, 6)),
        // The pod leaves the Services' endpoints when it starts terminating, but
        // kube-proxy applies that a moment later: the broker keeps serving meanwhile
        // (SIGTERM comes after the sleep), so no client is sent to a closed port.
        lifecycle: match pre_stop_sleep_seconds(cluster) {
            0 => None,
            seconds => Some(Lifecycle {
                pre_stop: Some(LifecycleHandler {
                    sleep: Some(SleepAction { seconds: i64::from(seconds) }),
                    ..LifecycleHandler::default()
                }),
                ..Lifecycle::default()
            }),
        },
        resources: spec.resources.clone(),
        // A broker that refuses to start (a data directory of a newer format, damaged
        // state) says why in its last log line: that becomes the pod's termination
        // message, which `kubectl describe pod` and the operator's roll status show.
        termination_message_policy: Some("FallbackToLogsOnError".to_string()),
        volume_mounts: Some(volume_mounts(cluster, founding)),
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

fn read_only_mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: name.to_string(),
        mount_path: path.to_string(),
        read_only: Some(true),
        ..VolumeMount::default()
    }
}

fn volume_mounts(cluster: &EventterCluster, founding: &Founding) -> Vec<VolumeMount> {
    let mut mounts = vec![
        VolumeMount { name: DATA_VOLUME.to_string(), mount_path: DATA_DIR.to_string(), ..VolumeMount::default() },
        read_only_mount(OPERATOR_CREDENTIALS_VOLUME, OPERATOR_CREDENTIALS_DIR),
    ];
    if founding.node_authentication == NodeAuthentication::ClusterSecret {
        mounts.push(read_only_mount(CLUSTER_SECRET_VOLUME, CLUSTER_SECRET_DIR));
    }
    if cluster.spec.tls.is_some() {
        mounts.push(read_only_mount(TLS_VOLUME, TLS_DIR));
    }
    mounts
}

/// A volume of Secret `secret_name`, files readable by owner and group (the pod's
/// fsGroup) only; `keys`: only those keys (`None`: all).
fn secret_volume(name: &str, secret_name: String, keys: Option<&[&str]>) -> Volume {
    Volume {
        name: name.to_string(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret_name),
            items: keys.map(|keys| {
                keys.iter()
                    .map(|k| KeyToPath { key: k.to_string(), path: k.to_string(), mode: None })
                    .collect::<Vec<_>>()
            }),
            default_mode: Some(OPERATOR_CREDENTIALS_FILE_MODE),
            optional: Some(false),
        }),
        ..Volume::default()
    }
}

fn volumes(cluster: &EventterCluster, founding: &Founding) -> Vec<Volume> {
    let name = cluster.name_any();
    let mut volumes = vec![secret_volume(
        OPERATOR_CREDENTIALS_VOLUME,
        credentials::secret_name(&name),
        Some(&[credentials::PASSWORD_KEY]),
    )];
    if founding.node_authentication == NodeAuthentication::ClusterSecret {
        volumes.push(secret_volume(CLUSTER_SECRET_VOLUME, cluster_secret_name(&name), Some(&[CLUSTER_SECRET_KEY])));
    }
    if let Some(tls) = &cluster.spec.tls {
        // The operator's Secret holds one pair per pod: all of it. A user's Secret: the
        // three keys the brokers read.
        let keys: Option<&[&str]> = match tls.secret_name {
            Some(_) => Some(&[TLS_CERT_KEY, TLS_KEY_KEY, TLS_CA_KEY]),
            None => None,
        };
        volumes.push(secret_volume(TLS_VOLUME, tls_secret_name(&name, tls), keys));
    }
    volumes
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
pub fn stateful_set(cluster: &EventterCluster, founding: &Founding) -> StatefulSet {
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
            // A changed pod template replaces no pod by itself: the operator evicts one
            // pod at a time in its own order (controller::roll: followers first, the Raft
            // leader last after a hand-over).
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some(UPDATE_STRATEGY.into()),
                rolling_update: None,
            }),
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
                    containers: vec![broker_container(cluster, founding)],
                    volumes: Some(volumes(cluster, founding)),
                    termination_grace_period_seconds: Some(
                        TERMINATION_GRACE_PERIOD_SECONDS + i64::from(pre_stop_sleep_seconds(cluster)),
                    ),
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

/// The Secret the operator generates for `user` (a `User` without
/// `passwordSecretRef`): `username` (the broker user name) and `password`, owned by
/// the User (deleted with it).
pub fn user_credentials_secret(user: &User, user_name: &str, password: &str) -> Secret {
    let resource = user.name_any();
    Secret {
        metadata: ObjectMeta {
            name: Some(credentials::user_secret_name(&resource)),
            namespace: user.namespace(),
            labels: Some(BTreeMap::from([
                ("app.kubernetes.io/managed-by".to_string(), FIELD_MANAGER.to_string()),
                ("eventter.io/user".to_string(), resource.clone()),
            ])),
            owner_references: user.controller_owner_ref(&()).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_string()),
        data: Some(
            [
                (credentials::USER_SECRET_USERNAME_KEY.to_string(), ByteString(user_name.as_bytes().to_vec())),
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
