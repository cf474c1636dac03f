//! The operator's view of a broker's admin API: where to reach a cluster, and how to
//! read the broker's answers.

use std::time::Duration;

use eventtermq_proto::v1 as pb;
use eventtermq_proto::v1::admin_client::AdminClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

use crate::builders;
use crate::crd::EventterCluster;
use crate::credentials::BrokerCredentials;
use crate::error::{Error, Result};

/// How the operator connects to brokers.
#[derive(Clone, Debug)]
pub struct BrokerConnector {
    /// Fixed `host:port` used for every cluster instead of its client Service (tests,
    /// or an operator running outside the cluster with a port-forward).
    pub address_override: Option<String>,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// Connect and answer timeout of each broker's health read (a Dump of its own
    /// condition), so one unreachable broker holds up the cluster's status only this
    /// long.
    pub node_health_timeout: Duration,
    /// Brokers asked for their health at once, at most.
    pub node_health_concurrency_max: usize,
}

/// Default of [`BrokerConnector::node_health_timeout`] (`--node-health-timeout-ms`).
pub const NODE_HEALTH_TIMEOUT_DEFAULT: Duration = Duration::from_secs(3);
/// Default of [`BrokerConnector::node_health_concurrency_max`]
/// (`--node-health-concurrency-max`).
pub const NODE_HEALTH_CONCURRENCY_MAX_DEFAULT: usize = 8;

impl Default for BrokerConnector {
    fn default() -> Self {
        Self {
            address_override: None,
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(15),
            node_health_timeout: NODE_HEALTH_TIMEOUT_DEFAULT,
            node_health_concurrency_max: NODE_HEALTH_CONCURRENCY_MAX_DEFAULT,
        }
    }
}

impl BrokerConnector {
    /// `host:port` of the admin API of `cluster`.
    pub fn address(&self, cluster: &EventterCluster) -> String {
        if let Some(address) = &self.address_override {
            return address.clone();
        }
        let name = kube::ResourceExt::name_any(cluster);
        let namespace = kube::ResourceExt::namespace(cluster).unwrap_or_default();
        builders::client_address(&name, &namespace, cluster.spec.ports.grpc)
    }

    /// An admin client of the broker at `address` that sends `credentials` with every
    /// call. Connects eagerly so that an unreachable broker shows up here, as
    /// [`Error::BrokerUnavailable`].
    pub async fn connect(&self, address: &str, credentials: &BrokerCredentials) -> Result<Admin> {
        self.connect_with(address, credentials, self.connect_timeout, self.request_timeout).await
    }

    async fn connect_with(
        &self,
        address: &str,
        credentials: &BrokerCredentials,
        connect_timeout: Duration,
        timeout: Duration,
    ) -> Result<Admin> {
        let unavailable = |message: String| Error::BrokerUnavailable { address: address.to_string(), message };
        let endpoint = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| unavailable(format!("bad address: {e}")))?
            .connect_timeout(connect_timeout)
            .timeout(timeout);
        let connected = match credentials.tls() {
            // The connector verifies the broker's certificate against the cluster's CA
            // and the address's host name.
            Some(tls) => tls.channel(endpoint).await,
            None => endpoint.connect().await,
        };
        let channel = connected.map_err(|e| unavailable(error_chain(&e)))?;
        let client = AdminClient::with_interceptor(channel, credentials.clone());
        Ok(Admin { address: address.to_string(), client })
    }

    /// The condition of the one broker at `address` (its free disk, watermark, Raft
    /// error), read from that broker itself within [`Self::node_health_timeout`].
    pub async fn node_health(&self, address: &str, credentials: &BrokerCredentials) -> Result<pb::LocalHealth> {
        let timeout = self.node_health_timeout;
        let read = async {
            let mut admin = self.connect_with(address, credentials, timeout, timeout).await?;
            // stale: the answer is about the broker itself, no leader needed.
            match admin.client.dump(pb::DumpRequest { stale: true, ..Default::default() }).await {
                Ok(response) => Ok(response.into_inner().local.unwrap_or_default()),
                Err(status) => Err(admin.read_failed(status)),
            }
        };
        match tokio::time::timeout(timeout, read).await {
            Ok(result) => result,
            Err(_) => Err(Error::BrokerUnavailable {
                address: address.to_string(),
                message: format!("no answer within {} ms", timeout.as_millis()),
            }),
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}

/// `message` without the ` [request id: ...]` the brokers append to every error.
pub fn without_request_id(message: &str) -> &str {
    match message.rfind(" [request id: ") {
        Some(at) if message.ends_with(']') => &message[..at],
        _ => message,
    }
}

/// How the operator treats a broker's error answer.
#[derive(Debug)]
pub enum Refusal {
    /// The spec itself is refused (InvalidArgument, AlreadyExists with a different
    /// spec, FailedPrecondition): retrying the same spec cannot help.
    Rejected(String),
    /// Something the object depends on is missing (NotFound), e.g. a topic a consumer
    /// group binds to that another resource has yet to create: retry later.
    Missing(String),
}

/// An admin client bound to one broker address, sending the operator's credentials.
#[derive(Clone)]
pub struct Admin {
    pub address: String,
    pub client: AdminClient<InterceptedService<Channel, BrokerCredentials>>,
}

/// Outcome of a broker write: the Raft index, or a refusal the status should show.
pub type WriteOutcome = std::result::Result<u64, Refusal>;

/// Objects of one broker namespace as a linearizable read found them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Listed<T> {
    pub items: Vec<T>,
    /// Raft index of the cluster state the read saw.
    pub index: u64,
}

impl Admin {
    /// Sorts a broker error into a refusal (recorded in the status) or an error
    /// (retried with backoff).
    pub fn classify(&self, status: tonic::Status) -> Result<Refusal> {
        match status.code() {
            Code::InvalidArgument | Code::AlreadyExists | Code::FailedPrecondition | Code::OutOfRange => {
                Ok(Refusal::Rejected(status.message().to_string()))
            }
            Code::NotFound => Ok(Refusal::Missing(status.message().to_string())),
            // The operator's own credentials: wrong (a Secret replaced or generated
            // again after the brokers' first start) or not an administrator.
            Code::Unauthenticated | Code::PermissionDenied => Err(Error::BrokerUnauthenticated {
                address: self.address.clone(),
                message: status.message().to_string(),
            }),
            Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled | Code::Aborted => {
                Err(Error::BrokerUnavailable { address: self.address.clone(), message: status.message().to_string() })
            }
            _ => Err(Error::Broker { address: self.address.clone(), status }),
        }
    }

    fn outcome(
        &self,
        result: std::result::Result<tonic::Response<pb::WriteResponse>, tonic::Status>,
    ) -> Result<WriteOutcome> {
        match result {
            Ok(response) => Ok(Ok(response.into_inner().index)),
            Err(status) => self.classify(status).map(Err),
        }
    }

    /// Creates the broker namespace (idempotent).
    pub async fn ensure_namespace(&mut self, name: &str) -> Result<WriteOutcome> {
        let result = self.client.create_namespace(pb::CreateNamespaceRequest { name: name.to_string() }).await;
        self.outcome(result)
    }

    /// The topics of `namespace` (linearizable read: no Raft log entry), or `None` when
    /// the namespace does not exist.
    pub async fn list_topics(&mut self, namespace: &str) -> Result<Option<Listed<pb::Topic>>> {
        let request = pb::ListTopicsRequest { namespace: namespace.to_string(), ..Default::default() };
        match self.client.list_topics(request).await {
            Ok(response) => {
                let response = response.into_inner();
                Ok(Some(Listed { items: response.topics, index: response.index }))
            }
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => Err(self.read_failed(status)),
        }
    }

    /// The consumer groups of `namespace` (linearizable read), or `None` when the
    /// namespace does not exist.
    pub async fn list_consumer_groups(&mut self, namespace: &str) -> Result<Option<Listed<pb::ConsumerGroup>>> {
        let request = pb::ListConsumerGroupsRequest { namespace: namespace.to_string(), ..Default::default() };
        match self.client.list_consumer_groups(request).await {
            Ok(response) => {
                let response = response.into_inner();
                Ok(Some(Listed { items: response.consumer_groups, index: response.index }))
            }
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => Err(self.read_failed(status)),
        }
    }

    /// A failed read is never something to record in a status: the operator cannot
    /// compare, so the reconcile fails and is retried.
    fn read_failed(&self, status: tonic::Status) -> Error {
        match self.classify(status) {
            Err(error) => error,
            Ok(Refusal::Rejected(message) | Refusal::Missing(message)) => {
                Error::Broker { address: self.address.clone(), status: tonic::Status::failed_precondition(message) }
            }
        }
    }

    /// Creates the topic, or brings an existing one to `topic`.
    ///
    /// CreateTopic is idempotent for an identical spec; for a different one it answers
    /// AlreadyExists, and UpdateTopic then changes what may change (the broker refuses
    /// a new replication factor or fewer shards with FailedPrecondition/InvalidArgument).
    pub async fn apply_topic(&mut self, namespace: &str, topic: pb::Topic) -> Result<WriteOutcome> {
        let request = pb::CreateTopicRequest { namespace: namespace.to_string(), topic: Some(topic.clone()) };
        match self.client.create_topic(request).await {
            Ok(response) => Ok(Ok(response.into_inner().index)),
            Err(status) if status.code() == Code::AlreadyExists => self.update_topic(namespace, topic).await,
            Err(status) => self.classify(status).map(Err),
        }
    }

    /// Brings an existing topic to `topic` (every field set; the broker refuses a new
    /// replication factor or fewer shards with FailedPrecondition/InvalidArgument).
    pub async fn update_topic(&mut self, namespace: &str, topic: pb::Topic) -> Result<WriteOutcome> {
        let update = pb::UpdateTopicRequest {
            namespace: namespace.to_string(),
            name: topic.name,
            shards: Some(topic.shards),
            replication_factor: Some(topic.replication_factor),
            retention: topic.retention,
            default_exchange_type: Some(topic.default_exchange_type),
            min_insync_replicas: Some(topic.min_insync_replicas),
            retention_bytes_max: Some(topic.retention_bytes_max),
            segment_age_max_ms: Some(topic.segment_age_max_ms),
            retention_overrides_consumers: Some(topic.retention_overrides_consumers),
            shard_key: Some(topic.shard_key),
        };
        let result = self.client.update_topic(update).await;
        self.outcome(result)
    }

    /// Deletes a topic; a topic already gone counts as deleted.
    pub async fn delete_topic(&mut self, namespace: &str, name: &str) -> Result<()> {
        let request = pb::DeleteTopicRequest { namespace: namespace.to_string(), name: name.to_string() };
        self.deleted(self.client.clone().delete_topic(request).await)
    }

    /// Creates the consumer group, or, when it exists with other bindings or settings,
    /// changes it in place (its committed offsets kept; new bindings take what is
    /// published from then on).
    pub async fn apply_consumer_group(&mut self, namespace: &str, group: pb::ConsumerGroup) -> Result<WriteOutcome> {
        let request =
            pb::CreateConsumerGroupRequest { namespace: namespace.to_string(), consumer_group: Some(group.clone()) };
        match self.client.create_consumer_group(request).await {
            Ok(response) => Ok(Ok(response.into_inner().index)),
            Err(status) if status.code() == Code::AlreadyExists => {
                let update =
                    pb::UpdateConsumerGroupRequest { namespace: namespace.to_string(), consumer_group: Some(group) };
                let result = self.client.update_consumer_group(update).await;
                self.outcome(result)
            }
            Err(status) => self.classify(status).map(Err),
        }
    }

    /// Deletes a consumer group; a group already gone counts as deleted.
    pub async fn delete_consumer_group(&mut self, namespace: &str, name: &str) -> Result<()> {
        let request = pb::DeleteConsumerGroupRequest { namespace: namespace.to_string(), name: name.to_string() };
        self.deleted(self.client.clone().delete_consumer_group(request).await)
    }

    fn deleted(&self, result: std::result::Result<tonic::Response<pb::WriteResponse>, tonic::Status>) -> Result<()> {
        match result {
            Ok(_) => Ok(()),
            Err(status) if status.code() == Code::NotFound => Ok(()),
            Err(status) => match self.classify(status)? {
                Refusal::Rejected(message) | Refusal::Missing(message) => Err(Error::Broker {
                    address: self.address.clone(),
                    status: tonic::Status::failed_precondition(message),
                }),
            },
        }
    }

    /// Lag and delivery state of the consumer group `name` of `namespace`, as the
    /// broker running it reports it: `Ok(None)` when the broker lists no such group.
    pub async fn describe_consumer_group(
        &mut self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<pb::ConsumerGroupStatus>> {
        let request =
            pb::DescribeConsumerGroupsRequest { namespace: namespace.to_string(), names: vec![name.to_string()] };
        match self.client.describe_consumer_groups(request).await {
            Ok(response) => Ok(response.into_inner().consumer_groups.into_iter().find(|g| g.name == name)),
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => Err(self.read_failed(status)),
        }
    }

    /// Every user with its administrator flag and permissions (linearizable read; no
    /// password or hash is ever listed).
    pub async fn list_users(&mut self) -> Result<Listed<pb::User>> {
        match self.client.list_users(pb::ListUsersRequest { stale: false }).await {
            Ok(response) => {
                let response = response.into_inner();
                Ok(Listed { items: response.users, index: response.index })
            }
            Err(status) => Err(self.read_failed(status)),
        }
    }

    /// Creates a user (the password is hashed by the broker; it is in no error).
    pub async fn create_user(&mut self, name: &str, password: &str, admin: bool) -> Result<WriteOutcome> {
        let request = pb::CreateUserRequest { name: name.to_string(), password: password.to_string(), admin };
        let result = self.client.create_user(request).await;
        self.outcome(result)
    }

    /// Replaces an existing user's password.
    pub async fn change_password(&mut self, name: &str, password: &str) -> Result<WriteOutcome> {
        let request = pb::ChangePasswordRequest { name: name.to_string(), password: password.to_string() };
        let result = self.client.change_password(request).await;
        self.outcome(result)
    }

    /// Sets (`Some`) or removes (`None`) a user's permissions on one namespace.
    pub async fn set_permissions(
        &mut self,
        user: &str,
        namespace: &str,
        permissions: Option<pb::Permissions>,
    ) -> Result<WriteOutcome> {
        let request = pb::SetPermissionsRequest {
            user: user.to_string(),
            namespace: namespace.to_string(),
            clear: permissions.is_none(),
            permissions,
        };
        let result = self.client.set_permissions(request).await;
        self.outcome(result)
    }

    /// Deletes a user; a user already gone counts as deleted.
    pub async fn delete_user(&mut self, name: &str) -> Result<()> {
        let request = pb::DeleteUserRequest { name: name.to_string() };
        self.deleted(self.client.clone().delete_user(request).await)
    }

    /// The nodes with their gossip state, Raft role and, while decommissioned, what
    /// still depends on them (read through the leader).
    pub async fn list_nodes(&mut self) -> Result<Vec<pb::Node>> {
        match self.client.list_nodes(pb::ListNodesRequest { stale: false }).await {
            Ok(response) => Ok(response.into_inner().nodes),
            Err(status) => Err(self.read_failed(status)),
        }
    }

    /// Decommissions (drains) node `id`, or with `cancel` takes it back. A refusal
    /// (FAILED_PRECONDITION 4013: the nodes left could not hold a topic's replication
    /// factor) is the outcome's `Rejected`; an unknown node its `Missing`.
    /// The refusal's message comes without the broker's `[request id: ...]`, which
    /// differs on every call: the operator asks again every few seconds while refused,
    /// and an unchanged refusal must leave the status (and its events) unchanged.
    pub async fn decommission_node(&mut self, id: u64, cancel: bool) -> Result<WriteOutcome> {
        let result = self.client.decommission_node(pb::DecommissionNodeRequest { node_id: id, cancel }).await;
        Ok(match self.outcome(result)? {
            Err(Refusal::Rejected(message)) => Err(Refusal::Rejected(without_request_id(&message).to_string())),
            Err(Refusal::Missing(message)) => Err(Refusal::Missing(without_request_id(&message).to_string())),
            Ok(index) => Ok(index),
        })
    }

    /// Hands Raft leadership to node `to` (any node forwards it to the leader); the
    /// leader after the call. A refusal (no such voter, no other voter) is the
    /// outcome's `Rejected`/`Missing`; leadership not moved in time is
    /// [`Error::BrokerUnavailable`].
    pub async fn transfer_leadership(&mut self, to: u64) -> Result<std::result::Result<u64, Refusal>> {
        match self.client.transfer_leadership(pb::TransferLeadershipRequest { to_node_id: to }).await {
            Ok(response) => Ok(Ok(response.into_inner().leader_id)),
            Err(status) => Ok(Err(match self.classify(status)? {
                Refusal::Rejected(message) => Refusal::Rejected(without_request_id(&message).to_string()),
                Refusal::Missing(message) => Refusal::Missing(without_request_id(&message).to_string()),
            })),
        }
    }

    /// The cluster state and Raft view of the answering broker (linearizable read).
    pub async fn dump(&mut self) -> Result<pb::DumpResponse> {
        match self.client.dump(pb::DumpRequest::default()).await {
            Ok(response) => Ok(response.into_inner()),
            Err(status) => Err(self.read_failed(status)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::without_request_id;

    #[test]
    fn the_request_id_is_cut_from_a_brokers_message() {
        assert_eq!(
            without_request_id("node 3 would leave 0 live node(s) [request id: cf74]"),
            "node 3 would leave 0 live node(s)"
        );
        assert_eq!(without_request_id("no id here"), "no id here");
        assert_eq!(without_request_id("[request id: a] in the middle, kept"), "[request id: a] in the middle, kept");
    }
}
