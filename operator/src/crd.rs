//! Custom resources of the operator: `EventterCluster`, `Topic`, `ConsumerGroup` and
//! `User` (group `eventter.io`, version `v1alpha1`).
//!
//! Every field carries a doc comment because it becomes the `description` that
//! `kubectl explain` prints. Limits mirror the broker's own validation
//! (`broker/src/cluster_state/validate.rs`) so that most mistakes are refused by the
//! apiserver before the operator ever talks to a broker. Fields the broker cannot change
//! after creation carry CEL transition rules (`x-kubernetes-validations`).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration, TopologySpreadConstraint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every custom resource.
pub const GROUP: &str = "eventter.io";
/// API version of every custom resource.
pub const VERSION: &str = "v1alpha1";

/// Default gRPC (and gossip) port of a broker.
pub const DEFAULT_GRPC_PORT: i32 = eventtermq_api::defaults::PORT as i32;
/// Default AMQP port of a broker.
pub const DEFAULT_AMQP_PORT: i32 = (eventtermq_api::defaults::PORT + eventtermq_api::defaults::AMQP_PORT_OFFSET) as i32;
/// The brokers' default `/metrics` port (Prometheus, HTTP).
pub const DEFAULT_METRICS_PORT: i32 =
    (eventtermq_api::defaults::PORT + eventtermq_api::defaults::METRICS_PORT_OFFSET) as i32;

// Names as the broker accepts them (validate::name).
const BROKER_NAME_PATTERN: &str = "^[A-Za-z0-9._-]{1,249}$";
// "0" (forever) or a sequence of <number><unit>, e.g. "7d", "36h", "1h30m", "500ms".
const DURATION_PATTERN: &str = "^(0|([0-9]+(ms|s|m|h|d))+)$";
// A Kubernetes quantity, e.g. "10Gi" or "500M".
const QUANTITY_PATTERN: &str = "^[0-9]+(\\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$";
// RFC 1123 DNS label: the name of an EventterCluster in the same namespace.
const DNS_LABEL_PATTERN: &str = "^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$";
// User names as the broker accepts them (validate::user_name).
const USER_NAME_PATTERN: &str = "^[A-Za-z0-9._@-]{1,64}$";
/// Longest user name the brokers take, in characters (their `USER_NAME_LEN_MAX`; the
/// pattern above says the same).
pub const USER_NAME_LEN_MAX: usize = 64;
// RFC 1123 subdomain: the name of a Secret.
const DNS_SUBDOMAIN_PATTERN: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
// A key of a Secret's data.
const SECRET_KEY_PATTERN: &str = "^[-._a-zA-Z0-9]+$";
/// Longest permission pattern the brokers take, in bytes (their `PATTERN_LEN_MAX`).
pub const PERMISSION_PATTERN_LEN_MAX: usize = 1024;
/// Compiled size of a permission pattern at most, in bytes (the brokers'
/// `PATTERN_COMPILED_SIZE_MAX_BYTES`): a pattern over it is refused.
pub const PERMISSION_PATTERN_COMPILED_SIZE_MAX_BYTES: usize = 256 * 1024;

/// Desired state of an EventterCluster.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "eventter.io",
    version = "v1alpha1",
    kind = "EventterCluster",
    doc = "An EventterMQ broker cluster: a StatefulSet of broker pods with a headless Service for gossip and Raft, a client Service and a PodDisruptionBudget.",
    plural = "eventterclusters",
    singular = "eventtercluster",
    namespaced,
    status = "EventterClusterStatus",
    shortname = "ec",
    shortname = "emq",
    category = "eventter",
    printcolumn = r#"{"name": "Replicas", "type": "integer", "description": "Desired broker pods", "jsonPath": ".spec.replicas"}"#,
    printcolumn = r#"{"name": "Ready", "type": "integer", "description": "Broker pods passing their readiness probe", "jsonPath": ".status.readyReplicas"}"#,
    printcolumn = r#"{"name": "Leader", "type": "string", "description": "Raft leader as the brokers report it", "jsonPath": ".status.leader"}"#,
    printcolumn = r#"{"name": "Status", "type": "string", "description": "Ready condition", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name": "Scale-Down", "type": "string", "description": "Progress of a scale-down: what the leaving brokers still hold, or why it is blocked", "jsonPath": ".status.scaleDown"}"#,
    printcolumn = r#"{"name": "Roll", "type": "string", "description": "Progress of a rolling update: pods rolled and the next one, or what it waits for", "jsonPath": ".status.rollingUpdate"}"#,
    printcolumn = r#"{"name": "TLS", "type": "string", "description": "Where the brokers' certificates come from: SecretName or SelfSigned", "jsonPath": ".status.tls.mode", "priority": 1}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#,
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct EventterClusterSpec {
    /// Number of broker pods. Raft voters are capped by broker.votersCountMax; further
    /// brokers join as learners.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 99))]
    pub replicas: i32,
    /// Broker container image, e.g. `localhost/eventtermq:0.1.0`.
    #[schemars(length(min = 1))]
    pub image: String,
    /// Image pull policy of the broker container (Kubernetes default when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<ImagePullPolicy>,
    /// Persistent volume of each broker, mounted at /data. Immutable: a StatefulSet's
    /// volume claim templates cannot change.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self == oldSelf", "message": "storage is immutable"}]))]
    pub storage: StorageSpec,
    /// Compute resources of the broker container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Ports the brokers listen on.
    #[serde(default)]
    pub ports: PortsSpec,
    /// Broker settings, passed to every broker as command-line flags. Unset fields keep
    /// the broker's defaults.
    #[serde(default)]
    pub broker: BrokerSettings,
    /// Additions to the broker pods: metadata and scheduling.
    #[serde(default)]
    pub pod: PodOverrides,
    /// What happens to the volume (PersistentVolumeClaim) of a broker pod removed by a
    /// scale-down: `Retain` (default) keeps it, so a later scale-up finds the data of
    /// the removed broker again; `Delete` deletes it (the StatefulSet's
    /// persistentVolumeClaimRetentionPolicy.whenScaled). Volumes are kept when the
    /// cluster itself is deleted either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_reclaim_policy: Option<VolumeReclaimPolicy>,
    /// How brokers prove to each other that they are members (the broker API between
    /// nodes is closed to everyone else). `ClusterSecret`: the operator generates the
    /// Secret `<name>-cluster-secret`, mounts it and starts every broker with
    /// `--cluster-secret-file`. `InsecureTrustedNetwork`: `--insecure-trusted-network`,
    /// anyone reaching the pods may call the node-to-node API (only for a network
    /// nothing else reaches). Unset: what the cluster runs with, recorded in
    /// status.nodeAuthentication (a cluster made by an operator without this field keeps
    /// `InsecureTrustedNetwork`), `ClusterSecret` for a new cluster. Brokers with and
    /// without the secret refuse each other: changing it on a running cluster needs
    /// every broker pod restarted at once (see the README).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_authentication: Option<NodeAuthentication>,
    /// TLS on the brokers' gRPC and AMQP ports and between brokers. Either `secretName`
    /// (a Secret in the cluster's namespace with `tls.crt`, `tls.key` and `ca.crt`, as
    /// cert-manager makes them, whose certificate names every pod's DNS name and the
    /// client Service) or `selfSigned: {}` (the operator makes a cluster CA and per-pod
    /// certificates and renews them). Unset: plaintext.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
}

/// How brokers authenticate each other's node-to-node calls.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum NodeAuthentication {
    /// A shared secret from the operator-made Secret `<name>-cluster-secret`.
    ClusterSecret,
    /// None: a network trusted to hold nothing but the brokers.
    InsecureTrustedNetwork,
}

impl NodeAuthentication {
    /// The name as the spec and status write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClusterSecret => "ClusterSecret",
            Self::InsecureTrustedNetwork => "InsecureTrustedNetwork",
        }
    }

    /// Parses [`Self::as_str`].
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "ClusterSecret" => Some(Self::ClusterSecret),
            "InsecureTrustedNetwork" => Some(Self::InsecureTrustedNetwork),
            _ => None,
        }
    }
}

/// Default of [`SelfSignedTls::certificate_lifetime_hours`]: 90 days.
pub const CERTIFICATE_LIFETIME_HOURS_DEFAULT: u32 = 90 * 24;
/// Default of [`SelfSignedTls::ca_lifetime_hours`]: 10 years.
pub const CA_LIFETIME_HOURS_DEFAULT: u32 = 10 * 365 * 24;

/// Where the brokers' certificates come from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.secretName) != has(self.selfSigned)",
    "message": "set exactly one of secretName and selfSigned"
}]))]
pub struct TlsSpec {
    /// A Secret with `tls.crt` (the certificate chain every broker serves: its names
    /// must include `*.<name>-nodes.<namespace>.svc.cluster.local` or every pod's name
    /// there, and `<name>.<namespace>.svc.cluster.local`), `tls.key` and `ca.crt` (the
    /// CA the brokers and the operator verify brokers against), e.g. made by
    /// cert-manager; rotated in place, the brokers load a new pair within seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    pub secret_name: Option<String>,
    /// The operator makes a cluster CA (Secret `<name>-ca`) and a certificate per pod
    /// (Secret `<name>-tls`: `ca.crt`, `<pod>.crt`, `<pod>.key`), renewed after two
    /// thirds of their lifetime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_signed: Option<SelfSignedTls>,
}

/// The operator's own CA and per-pod certificates.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SelfSignedTls {
    /// Lifetime of each pod certificate, in hours (default 2160: 90 days); renewed
    /// once two thirds of it passed.
    #[serde(default = "default_certificate_lifetime_hours")]
    #[schemars(range(min = 1, max = 87600))]
    pub certificate_lifetime_hours: u32,
    /// Lifetime of the cluster CA, in hours (default 87600: 10 years). The CA is made
    /// once and not renewed.
    #[serde(default = "default_ca_lifetime_hours")]
    #[schemars(range(min = 24, max = 876000))]
    pub ca_lifetime_hours: u32,
}

fn default_certificate_lifetime_hours() -> u32 {
    CERTIFICATE_LIFETIME_HOURS_DEFAULT
}

fn default_ca_lifetime_hours() -> u32 {
    CA_LIFETIME_HOURS_DEFAULT
}

/// What happens to the volume of a broker pod a scale-down removes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum VolumeReclaimPolicy {
    #[default]
    Retain,
    Delete,
}

fn default_replicas() -> i32 {
    3
}

/// When the kubelet pulls the broker image.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ImagePullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl ImagePullPolicy {
    /// The value Kubernetes expects in a container spec.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "Always",
            Self::IfNotPresent => "IfNotPresent",
            Self::Never => "Never",
        }
    }
}

/// Persistent storage of each broker pod.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Requested size of each broker's volume, as a Kubernetes quantity.
    #[serde(default = "default_storage_size")]
    #[schemars(regex(pattern = QUANTITY_PATTERN))]
    pub size: String,
    /// StorageClass of the volumes (the cluster's default class when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

fn default_storage_size() -> String {
    "10Gi".to_string()
}

impl Default for StorageSpec {
    fn default() -> Self {
        Self { size: default_storage_size(), storage_class_name: None }
    }
}

/// Container ports of the brokers.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortsSpec {
    /// gRPC port (TCP); gossip uses the same number over UDP.
    #[serde(default = "default_grpc_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub grpc: i32,
    /// AMQP port (TCP).
    #[serde(default = "default_amqp_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub amqp: i32,
    /// HTTP port of the brokers' Prometheus metrics (`/metrics`, TCP); the pods carry
    /// `prometheus.io/scrape`, `prometheus.io/port` and `prometheus.io/path` annotations
    /// for it.
    #[serde(default = "default_metrics_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub metrics: i32,
}

fn default_grpc_port() -> i32 {
    DEFAULT_GRPC_PORT
}

fn default_amqp_port() -> i32 {
    DEFAULT_AMQP_PORT
}

fn default_metrics_port() -> i32 {
    DEFAULT_METRICS_PORT
}

impl Default for PortsSpec {
    fn default() -> Self {
        Self { grpc: DEFAULT_GRPC_PORT, amqp: DEFAULT_AMQP_PORT, metrics: DEFAULT_METRICS_PORT }
    }
}

/// Broker tuning; each field maps to the broker flag of the same name
/// (`heartbeatIntervalMs` -> `--heartbeat-interval-ms`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!has(self.electionTimeoutMinMs) || !has(self.electionTimeoutMaxMs) || self.electionTimeoutMinMs < self.electionTimeoutMaxMs",
    "message": "electionTimeoutMinMs must be below electionTimeoutMaxMs"
}]))]
pub struct BrokerSettings {
    /// Raft heartbeat interval in milliseconds (broker default 150).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 60000))]
    pub heartbeat_interval_ms: Option<u64>,
    /// Lower bound of the Raft election timeout in milliseconds (broker default 500).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 50, max = 600000))]
    pub election_timeout_min_ms: Option<u64>,
    /// Upper bound of the Raft election timeout in milliseconds (broker default 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 50, max = 600000))]
    pub election_timeout_max_ms: Option<u64>,
    /// Raft voters at most; further brokers stay learners (broker default 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 99))]
    pub voters_count_max: Option<u64>,
    /// A broker DEAD or LEFT this long is removed from the cluster, in milliseconds
    /// (broker default 300000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1000))]
    pub dead_node_removal_ms: Option<u64>,
    /// How long an API request may wait for a leader, forwarding and commit, in
    /// milliseconds (broker default 10000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 100))]
    pub request_timeout_ms: Option<u64>,
    /// Gossip probe period in milliseconds (broker default when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10))]
    pub gossip_probe_period_ms: Option<u64>,
    /// How long gossip keeps a member SUSPECT before declaring it DOWN, in milliseconds
    /// (broker default when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10))]
    pub gossip_suspect_to_down_ms: Option<u64>,
}

/// Additions to the broker pod template.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodOverrides {
    /// Extra labels of the broker pods (the operator's own labels win on conflict).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Extra annotations of the broker pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Affinity of the broker pods, e.g. anti-affinity to spread them over nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Tolerations of the broker pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Node selector of the broker pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Topology spread constraints of the broker pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topology_spread_constraints: Vec<TopologySpreadConstraint>,
    /// PriorityClass of the broker pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// Seconds a broker pod being stopped keeps serving before its broker starts
    /// leaving (a `preStop` sleep; default 3, 0: none). Meanwhile the pod is out of the
    /// Services' endpoints and kube-proxy stops sending it new connections, so a client
    /// reconnecting after the broker's GOAWAY reaches another broker, not a closed port.
    /// Added to the pod's termination grace period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 120))]
    pub pre_stop_sleep_seconds: Option<u32>,
}

/// Observed state of an EventterCluster.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventterClusterStatus {
    /// Ready, Progressing and Degraded conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Broker pods passing their readiness probe.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Members as the brokers report them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<ClusterMember>,
    /// Pod (first label of the address) of the Raft leader, when one is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    /// Node id of the Raft leader, in decimal, when one is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader_id: Option<String>,
    /// Raft log index of the cluster state the status was read from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_state_index: Option<u64>,
    /// metadata.generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Brokers the cluster was founded with: every broker's `--bootstrap-expect`, and
    /// pods 0 to bootstrapExpect-1 are the seeds (`--join`) the others join through.
    /// Recorded when the operator first creates the StatefulSet and kept when replicas
    /// change, so that scaling leaves the pod template, and the running brokers, alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap_expect: Option<i32>,
    /// Replicas of the StatefulSet as the operator last applied them: the broker pods
    /// there are. Above spec.replicas while a scale-down drains the leaving brokers
    /// (the `scale` subresource's status replicas).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// Label selector of the broker pods, as a string (the `scale` subresource's, for
    /// a HorizontalPodAutoscaler).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Brokers of the pods a scale-down removes, while it runs: what each still holds.
    /// The operator decommissioned them (see DecommissionNode) and lowers the
    /// StatefulSet once they are drained.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub decommission: Vec<DecommissionedNode>,
    /// One line on a running or blocked scale-down (the Scale-Down printer column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_down: Option<String>,
    /// One line on a running rolling update (the Roll printer column): pods on the
    /// StatefulSet's new revision, of how many, and the next step or what it waits for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolling_update: Option<String>,
    /// How the brokers authenticate each other (`ClusterSecret` or
    /// `InsecureTrustedNetwork`), recorded when the operator first applies the
    /// StatefulSet and kept, so that a newer operator does not split a running
    /// cluster (see spec.nodeAuthentication).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_authentication: Option<String>,
    /// TLS as the operator last set it up (see the TLSReady condition).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsStatus>,
}

/// The brokers' TLS as the operator set it up.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsStatus {
    /// `SecretName` or `SelfSigned`.
    pub mode: String,
    /// The Secret mounted into the broker pods; its `ca.crt` is the CA clients need.
    pub secret_name: String,
    /// SelfSigned: when the oldest pod certificate expires (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<String>,
    /// SelfSigned: when the operator renews the certificates (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_after: Option<String>,
}

/// A broker being drained before its pod is removed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DecommissionedNode {
    /// Its pod.
    pub pod: String,
    /// Node id, in decimal.
    pub id: String,
    /// Open segments with the node in their replica set (being closed).
    pub open_segments: u64,
    /// Closed segments with a copy on the node (being copied to other nodes).
    pub closed_segments: u64,
    /// Consumer groups running on the node (being moved).
    pub consumer_groups: u64,
    /// Nothing depends on the node any more: its pod may go.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub drained: bool,
}

/// One broker as the cluster state lists it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterMember {
    /// Node id, in decimal (a string because ids use all 64 bits).
    pub id: String,
    /// host:port other brokers and clients use to reach it.
    pub address: String,
    /// Gossip state: Alive, Suspect, Dead, Left or Unknown.
    pub state: String,
    /// Raft role: voter, learner, or empty when not (yet) a member.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub raft_role: String,
    /// True for the Raft leader the brokers reported.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub leader: bool,
    /// Free bytes on the filesystem of the broker's data directory, as the broker itself
    /// reported them when the operator last asked it (Dump); unset when it could not be
    /// asked (see healthError) and did not report a low disk to the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_free_bytes: Option<u64>,
    /// The broker's free-space watermark (`--disk-free-min-bytes`/`--disk-free-min-percent`):
    /// below it, it refuses segment data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_free_min_bytes: Option<u64>,
    /// True while the broker is below its free-space watermark.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disk_low: bool,
    /// Why Raft stopped on this broker (a storage error; the pod must be restarted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raft_error: Option<String>,
    /// Why the broker's own health could not be read (not alive, unreachable, no answer
    /// within the operator's --node-health-timeout-ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_error: Option<String>,
}

/// Exchange type: how a consumer group's binding matches messages of a topic.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ExchangeType {
    #[default]
    Fanout,
    Direct,
    Topic,
    Headers,
}

impl ExchangeType {
    /// The name the broker API uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fanout => "fanout",
            Self::Direct => "direct",
            Self::Topic => "topic",
            Self::Headers => "headers",
        }
    }
}

/// What happens in the broker when the custom resource is deleted.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum DeletionPolicy {
    #[default]
    Delete,
    Retain,
}

/// Desired state of a Topic.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "eventter.io",
    version = "v1alpha1",
    kind = "Topic",
    doc = "A topic in an EventterMQ cluster, kept in sync with the broker.",
    plural = "topics",
    singular = "topic",
    namespaced,
    status = "BrokerObjectStatus",
    shortname = "etopic",
    category = "eventter",
    printcolumn = r#"{"name": "Cluster", "type": "string", "description": "EventterCluster the topic lives in", "jsonPath": ".spec.clusterRef"}"#,
    printcolumn = r#"{"name": "Shards", "type": "integer", "jsonPath": ".spec.shards"}"#,
    printcolumn = r#"{"name": "RF", "type": "integer", "description": "Replication factor", "jsonPath": ".spec.replicationFactor"}"#,
    printcolumn = r#"{"name": "Retention", "type": "string", "jsonPath": ".spec.retention"}"#,
    printcolumn = r#"{"name": "Ready", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.name) == has(oldSelf.name) && (!has(self.name) || self.name == oldSelf.name)",
    "message": "name is immutable"
}]))]
pub struct TopicSpec {
    /// Name of the EventterCluster (in the same Kubernetes namespace) that holds the
    /// topic. Immutable.
    #[schemars(regex(pattern = DNS_LABEL_PATTERN))]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self == oldSelf", "message": "clusterRef is immutable"}]))]
    pub cluster_ref: String,
    /// Broker namespace of the topic (created when missing). Immutable.
    #[serde(default = "default_broker_namespace")]
    #[schemars(regex(pattern = BROKER_NAME_PATTERN))]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self == oldSelf", "message": "namespace is immutable"}]))]
    pub namespace: String,
    /// Topic name in the broker (default: metadata.name). Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = BROKER_NAME_PATTERN))]
    pub name: Option<String>,
    /// Maximum number of open segments (parallel write streams); can only grow.
    #[serde(default = "default_shards")]
    #[schemars(range(min = 1, max = 1024))]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self >= oldSelf", "message": "shards can only grow"}]))]
    pub shards: u32,
    /// Copies of every segment. Immutable.
    #[serde(default = "default_replication_factor")]
    #[schemars(range(min = 1, max = 7))]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self == oldSelf", "message": "replicationFactor is immutable"}]))]
    pub replication_factor: u32,
    /// Nodes that must have fsynced a message before the broker confirms it, and the
    /// fewest nodes a segment is opened on: while fewer are up, publishing is refused
    /// rather than confirmed on fewer copies. Unset: a majority of replicationFactor.
    /// Applies to segments opened after a change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 7))]
    pub min_insync_replicas: Option<u32>,
    /// How long closed segments are kept: "0" keeps them forever, otherwise a sequence
    /// of `<number><unit>` with units ms, s, m, h, d (e.g. "7d", "1h30m").
    #[serde(default = "default_retention")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub retention: String,
    /// Exchange type of bindings that do not name one.
    #[serde(default)]
    pub default_exchange_type: ExchangeType,
    /// Bytes of closed segments kept at most: beyond it the oldest go first; 0 or
    /// unset: no limit.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub retention_bytes_max: u64,
    /// An open segment holding records is closed at this age, so that a quiet topic's
    /// records expire with its retention; 0 or unset: the brokers'
    /// `--segment-age-max-ms` (1 h).
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub segment_age_max_ms: u64,
    /// Retention deletes segments consumer groups have not acknowledged yet (as Kafka
    /// does); false or unset: a segment is kept until every bound group passed it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retention_overrides_consumers: bool,
    /// What picks a publish's shard: "routing_key" (the default: one key, one shard, in
    /// order; messages without a key spread) or "none" (every publish spreads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^(routing_key|none)$"))]
    pub shard_key: Option<String>,
    /// Delete removes the topic from the broker when this resource is deleted (if it was
    /// ever in sync, so a same-named object the operator never managed is kept); Retain
    /// keeps it.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

fn default_broker_namespace() -> String {
    eventtermq_api::defaults::NAMESPACE.to_string()
}

fn default_shards() -> u32 {
    eventtermq_api::defaults::SHARDS
}

fn default_replication_factor() -> u32 {
    eventtermq_api::defaults::REPLICATION_FACTOR
}

fn default_retention() -> String {
    "0".to_string()
}

/// Observed state of a Topic or ConsumerGroup.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BrokerObjectStatus {
    /// The Ready condition: True once the broker holds the object as specified; False
    /// with the broker's message when it refused the spec or could not be reached.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// metadata.generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Raft log index of the operator's last write of the object to the broker (create
    /// or update). Unchanged while the broker holds the object as specified, since the
    /// operator then writes nothing; when it found the object already in place before
    /// ever writing it, the index of the state that read saw. Set once the object was
    /// in sync: a resource deleted without it leaves the broker object alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_state_index: Option<u64>,
}

/// Observed state of a ConsumerGroup: the Ready condition as for a Topic, and the
/// group's lag as the broker running it reports it (Admin `DescribeConsumerGroups`),
/// refreshed every --group-status-period-ms of the operator while the group is in sync.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerGroupStatus {
    #[serde(flatten)]
    pub object: BrokerObjectStatus,
    #[serde(flatten)]
    pub lag: ConsumerGroupLag,
}

/// A consumer group's lag and where it runs, as its broker reported them.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerGroupLag {
    /// Messages published to the bound topics (confirmed, or stored in closed segments)
    /// and not yet acknowledged by the group: the metric
    /// eventtermq_consumer_group_lag_records summed over the topics. Unset while the
    /// group's broker could not say (see lagError).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<u64>,
    /// The lag per bound topic.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub topic_lag: BTreeMap<String, u64>,
    /// Age in whole seconds of the oldest message the group read and has not
    /// acknowledged (0: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_unacked_seconds: Option<u64>,
    /// Subscribers connected to the group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscribers: Option<u32>,
    /// Broker pod running the group (first label of its address), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Node id of the broker running the group, in decimal (unset until placed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// Why the lag is unknown: the group is not placed or running yet, or its broker
    /// could not be asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_error: Option<String>,
}

/// Desired state of a ConsumerGroup.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "eventter.io",
    version = "v1alpha1",
    kind = "ConsumerGroup",
    doc = "A consumer group in an EventterMQ cluster: a named subscription to one or more topics.",
    plural = "consumergroups",
    singular = "consumergroup",
    namespaced,
    status = "ConsumerGroupStatus",
    shortname = "ecg",
    category = "eventter",
    printcolumn = r#"{"name": "Cluster", "type": "string", "description": "EventterCluster the group lives in", "jsonPath": ".spec.clusterRef"}"#,
    printcolumn = r#"{"name": "Size", "type": "integer", "jsonPath": ".spec.size"}"#,
    printcolumn = r#"{"name": "Lag", "type": "integer", "description": "Messages of the bound topics not yet acknowledged by the group", "jsonPath": ".status.lag"}"#,
    printcolumn = r#"{"name": "Oldest-Unacked", "type": "integer", "description": "Age in seconds of the oldest message read and not acknowledged", "jsonPath": ".status.oldestUnackedSeconds", "priority": 1}"#,
    printcolumn = r#"{"name": "Node", "type": "string", "description": "Broker pod running the group", "jsonPath": ".status.node", "priority": 1}"#,
    printcolumn = r#"{"name": "Ready", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.name) == has(oldSelf.name) && (!has(self.name) || self.name == oldSelf.name)",
    "message": "name is immutable"
}, {
    "rule": "!has(self.readyMessagesMax) || self.readyMessagesMax <= self.size",
    "message": "readyMessagesMax must be at most size (the group's buffer holds what it counts)"
}, {
    "rule": "!has(self.deadLetterRoutingKey) || has(self.deadLetterTopic)",
    "message": "deadLetterRoutingKey needs deadLetterTopic (the topic the dead letters go to)"
}]))]
pub struct ConsumerGroupSpec {
    /// Name of the EventterCluster (in the same Kubernetes namespace) that holds the
    /// group. Immutable.
    #[schemars(regex(pattern = DNS_LABEL_PATTERN))]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self == oldSelf", "message": "clusterRef is immutable"}]))]
    pub cluster_ref: String,
    /// Broker namespace of the group and of its topics (created when missing). Immutable.
    #[serde(default = "default_broker_namespace")]
    #[schemars(regex(pattern = BROKER_NAME_PATTERN))]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self == oldSelf", "message": "namespace is immutable"}]))]
    pub namespace: String,
    /// Group name in the broker (default: metadata.name). Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = BROKER_NAME_PATTERN))]
    pub name: Option<String>,
    /// Topics the group reads, and which of their messages.
    #[schemars(length(min = 1, max = 1024))]
    pub bindings: Vec<ConsumerGroupBinding>,
    /// In-memory buffer of the group, in messages.
    #[serde(default = "default_group_size")]
    #[schemars(range(min = 1, max = 1000000))]
    pub size: u32,
    /// Where a new group starts reading (RFC 3339 time); unset means when it was
    /// created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
    /// Milliseconds a subscriber may hold a delivered message unacknowledged before it
    /// is delivered again; 0 or unset: the broker's `--ack-timeout-ms` (30 s).
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    #[schemars(range(max = 43200000))]
    pub ack_timeout_ms: u64,
    /// A message delivered this many times and not acknowledged goes to
    /// `deadLetterTopic`, or is dropped without one; 0 or unset: no limit.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub deliveries_max: u32,
    /// Topic (of the same broker namespace, not one the group reads) that takes the
    /// group's dead letters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = BROKER_NAME_PATTERN))]
    pub dead_letter_topic: Option<String>,
    /// The routing key dead letters are published to `deadLetterTopic` with (RabbitMQ's
    /// x-dead-letter-routing-key); unset: each message's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub dead_letter_routing_key: Option<String>,
    /// A message that waited in the group longer than this many milliseconds since it
    /// was stored is not delivered: it goes to `deadLetterTopic` (x-first-death-reason
    /// "expired"), or is dropped without one (RabbitMQ's x-message-ttl); 0 or unset:
    /// messages do not expire.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    #[schemars(range(max = 4294967295u64))]
    pub message_ttl_ms: u64,
    /// At most this many messages wait in the group undelivered: beyond it the oldest
    /// waiting ones go to `deadLetterTopic` (x-first-death-reason "maxlen") or are
    /// dropped (RabbitMQ's x-max-length with overflow drop-head). At most `size`; 0 or
    /// unset: no limit.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub ready_messages_max: u64,
    /// At most this many bytes of message bodies wait in the group undelivered: beyond
    /// it the oldest waiting ones go to `deadLetterTopic` or are dropped (RabbitMQ's
    /// x-max-length-bytes with overflow drop-head); 0 or unset: no limit.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub ready_bytes_max: u64,
    /// Delete removes the group from the broker when this resource is deleted (if it was
    /// ever in sync, so a same-named object the operator never managed is kept); Retain
    /// keeps it.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

fn is_zero_u64(v: &u64) -> bool {
    *v == 0
}

fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}

fn default_group_size() -> u32 {
    eventtermq_api::defaults::CONSUMER_GROUP_SIZE
}

/// One topic a consumer group reads.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerGroupBinding {
    /// Topic name in the group's broker namespace.
    #[schemars(regex(pattern = BROKER_NAME_PATTERN))]
    pub topic: String,
    /// Exchange type of this binding (default: the topic's default exchange type).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exchange_type: Option<ExchangeType>,
    /// direct: the routing key; topic: the pattern (`*` one word, `#` zero or more).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing_key: Option<String>,
    /// headers exchange: the headers to match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// headers exchange: whether all headers (default) or any of them must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers_match: Option<HeadersMatch>,
}

/// How a headers binding matches.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum HeadersMatch {
    #[default]
    All,
    Any,
}

impl HeadersMatch {
    /// The name the broker API uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Any => "any",
        }
    }
}

/// Desired state of a User.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "eventter.io",
    version = "v1alpha1",
    kind = "User",
    doc = "A user of an EventterMQ cluster's client APIs (gRPC and AMQP): its password from a Secret, its permissions per broker namespace.",
    plural = "users",
    singular = "user",
    namespaced,
    status = "UserStatus",
    shortname = "euser",
    category = "eventter",
    printcolumn = r#"{"name": "Cluster", "type": "string", "description": "EventterCluster the user belongs to", "jsonPath": ".spec.clusterRef"}"#,
    printcolumn = r#"{"name": "User", "type": "string", "description": "User name in the broker (default: metadata.name)", "jsonPath": ".spec.name"}"#,
    printcolumn = r#"{"name": "Admin", "type": "boolean", "jsonPath": ".spec.admin", "priority": 1}"#,
    printcolumn = r#"{"name": "Ready", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.name) == has(oldSelf.name) && (!has(self.name) || self.name == oldSelf.name)",
    "message": "name is immutable"
}, {
    "rule": "(has(self.admin) && self.admin) == (has(oldSelf.admin) && oldSelf.admin)",
    "message": "admin is immutable"
}]))]
pub struct UserSpec {
    /// Name of the EventterCluster (in the same Kubernetes namespace) the user belongs
    /// to. Immutable.
    #[schemars(regex(pattern = DNS_LABEL_PATTERN))]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self == oldSelf", "message": "clusterRef is immutable"}]))]
    pub cluster_ref: String,
    /// User name in the broker, as clients log in (default: metadata.name): 1-64
    /// characters of A-Z a-z 0-9 . _ @ -. Not the operator's own user,
    /// `eventter-operator`. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = USER_NAME_PATTERN))]
    pub name: Option<String>,
    /// The key of a Secret (in the same Kubernetes namespace) holding the password
    /// (1-1024 bytes; trailing whitespace is ignored, as the brokers read password
    /// files). A change of the Secret sets the new password in the broker. Unset: the
    /// operator generates the Secret `<metadata.name>-eventter-credentials` (keys
    /// `username` and `password`, a random password; owned by this User, so deleted
    /// with it; never overwritten) and names it in status.passwordSecretName.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret_ref: Option<SecretKeyRef>,
    /// A cluster administrator: every permission on every broker namespace, and the
    /// namespaces and users themselves. Immutable (the broker cannot change it in place).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub admin: bool,
    /// What the user may do, per broker namespace (created when missing); a namespace
    /// not listed: nothing. The operator removes the user's permissions on namespaces
    /// not listed here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["namespace"]))]
    pub permissions: Vec<NamespacePermissions>,
    /// Delete removes the user from the broker when this resource is deleted (if it was
    /// ever in sync); Retain keeps it.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// A key of a Secret in the resource's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    pub name: String,
    /// Key in the Secret's data.
    #[serde(default = "default_password_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = SECRET_KEY_PATTERN))]
    pub key: String,
}

fn default_password_key() -> String {
    "password".to_string()
}

/// A user's permissions on one broker namespace, as the broker's `set-permissions`
/// takes them: RabbitMQ's three regular expressions, matched (unanchored: use ^...$
/// for a whole name) against the names a request touches; an empty pattern matches
/// nothing.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NamespacePermissions {
    /// The broker namespace.
    #[schemars(regex(pattern = BROKER_NAME_PATTERN))]
    pub namespace: String,
    /// Topics and consumer groups the user may create, update and delete.
    #[serde(default)]
    #[schemars(length(max = 1024))]
    pub configure: String,
    /// Topics the user may publish to.
    #[serde(default)]
    #[schemars(length(max = 1024))]
    pub write: String,
    /// Consumer groups the user may subscribe to, ack, nack and purge.
    #[serde(default)]
    #[schemars(length(max = 1024))]
    pub read: String,
}

/// Observed state of a User.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UserStatus {
    #[serde(flatten)]
    pub object: BrokerObjectStatus,
    /// `<uid>/<resourceVersion>` of the password Secret whose password the broker holds
    /// (set by the operator's create or change-password). Another value, or none: the
    /// next pass sets the password again. Never the password or a hash of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret_version: Option<String>,
    /// The Secret the password comes from: spec.passwordSecretRef.name, or the one the
    /// operator generated (`<metadata.name>-eventter-credentials`, keys `username` and
    /// `password`) when the spec names none. Mount it into client pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret_name: Option<String>,
}

/// Parses a retention/duration string as the CRD pattern allows it ("0", "7d",
/// "1h30m", "500ms") into milliseconds.
pub fn parse_duration_ms(value: &str) -> Option<u64> {
    if value == "0" {
        return Some(0);
    }
    let mut rest = value;
    let mut total_ms: u64 = 0;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        if digits == 0 {
            return None;
        }
        let number: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit_ms, len) = if rest.starts_with("ms") {
            (1, 2)
        } else if rest.starts_with('s') {
            (1_000, 1)
        } else if rest.starts_with('m') {
            (60_000, 1)
        } else if rest.starts_with('h') {
            (3_600_000, 1)
        } else if rest.starts_with('d') {
            (86_400_000, 1)
        } else {
            return None;
        };
        rest = &rest[len..];
        total_ms = total_ms.checked_add(number.checked_mul(unit_ms)?)?;
    }
    Some(total_ms)
}

type Crd = k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

/// All CRDs of the operator, in a stable order.
pub fn all_crds() -> Vec<Crd> {
    use kube::CustomResourceExt;
    vec![EventterCluster::crd(), Topic::crd(), ConsumerGroup::crd(), User::crd()]
        .into_iter()
        .map(without_null_enum_values)
        .collect()
}

/// Drops `null` from the `enum` of nullable fields (kube renders `Option<Enum>` as
/// `enum: [..., null]` plus `nullable: true`). `nullable` alone already admits null, and
/// a plain list of strings is the form every apiserver version accepts.
fn without_null_enum_values(crd: Crd) -> Crd {
    fn walk(value: &mut serde_json::Value) {
        match value {
            serde_json::Value::Object(map) => {
                if map.get("nullable") == Some(&serde_json::Value::Bool(true)) {
                    if let Some(serde_json::Value::Array(values)) = map.get_mut("enum") {
                        values.retain(|v| !v.is_null());
                    }
                }
                map.values_mut().for_each(walk);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    let mut value = serde_json::to_value(&crd).expect("a CRD serializes");
    walk(&mut value);
    serde_json::from_value(value).expect("the CRD still deserializes")
}

/// Each CRD as a YAML document with the file name it has under `crds/`.
pub fn crd_files() -> Result<Vec<(&'static str, String)>, serde_norway::Error> {
    let names = ["eventterclusters.yaml", "topics.yaml", "consumergroups.yaml", "users.yaml"];
    names.into_iter().zip(all_crds()).map(|(file, crd)| Ok((file, serde_norway::to_string(&crd)?))).collect()
}

/// The CRDs as multi-document YAML, as `eventter-operator crd` prints them.
pub fn crds_yaml() -> Result<String, serde_norway::Error> {
    let mut out = String::new();
    for (_, yaml) in crd_files()? {
        out.push_str("---\n");
        out.push_str(&yaml);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_as_the_pattern_allows() {
        assert_eq!(parse_duration_ms("0"), Some(0));
        assert_eq!(parse_duration_ms("500ms"), Some(500));
        assert_eq!(parse_duration_ms("7d"), Some(7 * 86_400_000));
        assert_eq!(parse_duration_ms("1h30m"), Some(5_400_000));
        assert_eq!(parse_duration_ms(""), None);
        assert_eq!(parse_duration_ms("10"), None);
        assert_eq!(parse_duration_ms("h"), None);
        assert_eq!(parse_duration_ms("5w"), None);
    }

    #[test]
    fn spec_defaults_fill_in() {
        let spec: TopicSpec = serde_json::from_value(serde_json::json!({"clusterRef": "emq"})).unwrap();
        assert_eq!(spec.namespace, "default");
        assert_eq!(spec.shards, 1);
        assert_eq!(spec.replication_factor, 3);
        assert_eq!(spec.retention, "0");
        assert_eq!(spec.deletion_policy, DeletionPolicy::Delete);
        let spec: EventterClusterSpec = serde_json::from_value(serde_json::json!({"image": "x"})).unwrap();
        assert_eq!(spec.replicas, 3);
        assert_eq!(spec.ports.grpc, 16000);
        assert_eq!(spec.storage.size, "10Gi");
    }
}
