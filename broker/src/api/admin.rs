//! The `eventter.v1.Admin` service: one small handler per resource and verb. Each
//! handler validates its input (so bad requests never reach the Raft log), builds a
//! [`Command`], and writes it through [`Cluster`]; reads go through `Cluster::read`.

use std::collections::BTreeMap;
use std::time::Duration;

use eventtermq_api::defaults::{self, or_default};
use eventtermq_proto::v1 as pb;
use eventtermq_proto::v1::admin_server::Admin;
use tonic::{Request, Response, Status};

use super::access::{allow, sees_namespace};
use super::convert::*;
use super::request::tag;
use crate::auth::{Auth, Need};
use crate::cluster::Cluster;
use crate::cluster_state::validate;
use crate::cluster_state::TopicUpdate;
use crate::cluster_state::*;
use crate::consumer_groups::{GroupStats, Groups};
use crate::error::{ErrorCode, RequestError};
use crate::peers::{hops, Peers};

pub struct AdminService {
    pub cluster: Cluster,
    pub segments: crate::replication::Segments,
    pub groups: Groups,
    pub peers: Peers,
    pub auth: Auth,
}

/// How long `DescribeConsumerGroups` waits for another node's figures: a group task
/// answers within a second (or is left out), plus a network round trip.
const DESCRIBE_WAIT_MAX: Duration = Duration::from_secs(2);

type Reply<T> = Result<Response<T>, Status>;

fn written(index: u64) -> Reply<pb::WriteResponse> {
    #[allow(deprecated)] // `ok`: still sent for clients that read it
    Ok(Response::new(pb::WriteResponse { ok: true, index }))
}

/// Namespace of a request: empty means `default`.
pub(crate) fn namespace_of(ns: &str) -> Result<String, RequestError> {
    if ns.is_empty() {
        return Ok(DEFAULT_NAMESPACE.to_string());
    }
    validate::name("namespace", ns)?;
    Ok(ns.to_string())
}

fn shard_key(v: &str) -> Result<ShardKey, RequestError> {
    ShardKey::parse(v).ok_or_else(|| {
        RequestError::new(ErrorCode::InvalidArgument, format!("shard_key: {v:?} is not \"routing_key\" or \"none\""))
    })
}

fn topic_spec_from_pb(t: &pb::Topic) -> Result<TopicSpec, RequestError> {
    let default_exchange_type = or_default(&t.default_exchange_type, defaults::EXCHANGE_TYPE);
    let default_exchange_type = validate::exchange_type("default_exchange_type", default_exchange_type)?;
    let spec = TopicSpec {
        shards: t.shards,
        replication_factor: t.replication_factor,
        retention_ms: duration_to_ms(&t.retention)?,
        default_exchange_type,
        segment_size_max_bytes: t.segment_size_max_bytes,
        min_insync_replicas: t.min_insync_replicas,
        retention_bytes_max: t.retention_bytes_max,
        segment_age_max_ms: t.segment_age_max_ms,
        retention_overrides_consumers: t.retention_overrides_consumers,
        shard_key: shard_key(&t.shard_key)?,
    };
    validate::topic_spec(&spec)?;
    Ok(spec)
}

impl AdminService {
    /// The namespace, name and spec a create or update of a consumer group asks for.
    async fn group_of_request(
        &self,
        namespace: &str,
        group: Option<pb::ConsumerGroup>,
    ) -> Result<(String, String, ConsumerGroupSpec), RequestError> {
        let namespace = namespace_of(namespace)?;
        let group =
            group.ok_or_else(|| RequestError::new(ErrorCode::InvalidArgument, "consumer_group: is required"))?;
        validate::name("name", &group.name)?;
        let spec = self.consumer_group_spec_from_pb(&namespace, &group).await?;
        Ok((namespace, group.name, spec))
    }

    /// Builds the group's spec. A binding without an exchange type takes its topic's
    /// default, read linearizably so a topic created just before is seen.
    async fn consumer_group_spec_from_pb(
        &self,
        namespace: &str,
        g: &pb::ConsumerGroup,
    ) -> Result<ConsumerGroupSpec, RequestError> {
        let topics: BTreeMap<String, TopicSpec> = if g.bindings.iter().any(|b| b.exchange_type.is_empty()) {
            let applied = self.cluster.read(true).await?;
            applied.state.namespace(namespace)?.topics.clone()
        } else {
            BTreeMap::new()
        };
        let mut bindings = Vec::with_capacity(g.bindings.len());
        for (i, b) in g.bindings.iter().enumerate() {
            validate::name(&format!("bindings[{i}].topic"), &b.topic)?;
            let exchange_type = if b.exchange_type.is_empty() {
                topics.get(&b.topic).map(|t| t.default_exchange_type).ok_or_else(|| {
                    RequestError::new(
                        ErrorCode::TopicNotFound,
                        format!("bindings[{i}].topic: topic {:?} does not exist in namespace {namespace:?}", b.topic),
                    )
                })?
            } else {
                validate::exchange_type(&format!("bindings[{i}].exchange_type"), &b.exchange_type)?
            };
            let headers_match = match or_default(&b.headers_match, defaults::HEADERS_MATCH) {
                "all" => HeadersMatch::All,
                "any" => HeadersMatch::Any,
                other => {
                    return Err(RequestError::new(
                        ErrorCode::InvalidBinding,
                        format!("bindings[{i}].headers_match: {other:?} is not one of all, any"),
                    ))
                }
            };
            bindings.push(BindingSpec {
                topic: b.topic.clone(),
                exchange_type,
                routing_key: b.routing_key.clone(),
                headers: b.headers.clone().into_iter().collect(),
                headers_match,
                since_unix_ms: 0,
            });
        }
        let spec = ConsumerGroupSpec {
            bindings,
            size: defaults::consumer_group_size(g.size),
            since_unix_ms: g.since.as_ref().map(timestamp_to_ms).unwrap_or(0),
            ack_timeout_ms: g.ack_timeout_ms,
            deliveries_max: g.deliveries_max,
            dead_letter_topic: g.dead_letter_topic.clone(),
            message_ttl_ms: g.message_ttl_ms,
            ready_messages_max: g.ready_messages_max,
            ready_bytes_max: g.ready_bytes_max,
            exclusive_owner: None,
            dead_letter_routing_key: g.dead_letter_routing_key.clone(),
        };
        validate::consumer_group_spec(&spec)?;
        Ok(spec)
    }
}

/// A group of a `DescribeConsumerGroups` answer as the state has it: name, its live node
/// (id, address) if placed, its committed offsets.
type Placed = (String, Option<(u64, String)>, BTreeMap<SegmentId, u64>);

fn placed_addr(placed: &[Placed], node: u64) -> String {
    placed
        .iter()
        .find_map(|(_, n, _)| n.as_ref().filter(|(id, _)| *id == node).map(|(_, a)| a.clone()))
        .unwrap_or_default()
}

fn status_to_pb(node_id: u64, st: GroupStats) -> pb::ConsumerGroupStatus {
    let count = |n: usize| n.min(u32::MAX as usize) as u32;
    pb::ConsumerGroupStatus {
        name: st.group,
        node_id,
        running: true,
        error: String::new(),
        lag: st.lag.values().fold(0u64, |a, b| a.saturating_add(*b)),
        topic_lag: st.lag.into_iter().collect(),
        oldest_unacked_age: Some(prost_types::Duration {
            seconds: (st.oldest_unacked_ms / 1000) as i64,
            nanos: ((st.oldest_unacked_ms % 1000) * 1_000_000) as i32,
        }),
        committed_offsets: st.committed.into_iter().collect(),
        subscribers: count(st.subscribers),
        pending: count(st.pending),
        in_flight: count(st.in_flight),
        size: count(st.capacity),
    }
}

impl AdminService {
    /// How many bytes this node's copy of segment `id` holds, if it has one.
    fn local_size(&self, id: SegmentId) -> Option<u64> {
        self.segments.store().info(id).map(|i| i.size_bytes)
    }

    /// The groups asked for (all of the namespace when none), from a linearizable read.
    async fn placed_groups(&self, namespace: &str, names: &[String]) -> Result<(Vec<Placed>, u64), RequestError> {
        let applied = self.cluster.read(true).await?;
        let st = &applied.state;
        let ns = st.namespace(namespace)?;
        let names: Vec<String> =
            if names.is_empty() { ns.consumer_groups.keys().cloned().collect() } else { names.to_vec() };
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            if !ns.consumer_groups.contains_key(&name) {
                return Err(RequestError::new(
                    ErrorCode::ConsumerGroupNotFound,
                    format!("names: consumer group {name:?} does not exist in namespace {namespace:?}"),
                ));
            }
            let rt = st.group_runtime(namespace, &name);
            let node = rt.and_then(|r| r.node).filter(|n| !st.node_gone(*n));
            let node = node.and_then(|n| st.nodes.get(&n).map(|r| (n, r.address.clone())));
            out.push((name, node, rt.map(|r| r.offsets.clone()).unwrap_or_default()));
        }
        Ok((out, applied.last_applied.map(|l| l.index).unwrap_or(0)))
    }

    /// The figures of `names` from `node` (this one or another): per group, its status
    /// or why there is none.
    async fn ask_node(
        &self,
        namespace: String,
        node: u64,
        addr: String,
        names: Vec<String>,
    ) -> Vec<(String, Result<pb::ConsumerGroupStatus, String>)> {
        if node == self.cluster.id {
            let mut out = Vec::new();
            for name in names {
                let st = self.groups.stats_of(&namespace, &name).await;
                let st =
                    st.map(|st| status_to_pb(node, st)).ok_or_else(|| "the group does not run here yet".to_string());
                out.push((name, st));
            }
            return out;
        }
        let req = pb::DescribeConsumerGroupsRequest { namespace, names: names.clone() };
        match self.peers.describe_consumer_groups(node, &addr, req, DESCRIBE_WAIT_MAX).await {
            Ok(r) => {
                let mut found: BTreeMap<String, pb::ConsumerGroupStatus> =
                    r.consumer_groups.into_iter().map(|g| (g.name.clone(), g)).collect();
                names
                    .into_iter()
                    .map(|n| {
                        let st = found.remove(&n).ok_or_else(|| format!("node {node} does not run the group yet"));
                        (n, st)
                    })
                    .collect()
            }
            Err(e) => names.into_iter().map(|n| (n, Err(format!("cannot ask node {node}: {e}")))).collect(),
        }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_namespace(&self, req: Request<pb::CreateNamespaceRequest>) -> Reply<pb::WriteResponse> {
        let name = req.into_inner().name;
        tag(&name, None, None);
        allow(&self.auth, Need::Admin { what: "creating a namespace" })?;
        validate::name("name", &name)?;
        written(self.cluster.write(Command::CreateNamespace { name }).await?)
    }

    async fn delete_namespace(&self, req: Request<pb::DeleteNamespaceRequest>) -> Reply<pb::WriteResponse> {
        let req = req.into_inner();
        tag(&req.name, None, None);
        allow(&self.auth, Need::Admin { what: "deleting a namespace" })?;
        validate::name("name", &req.name)?;
        written(self.cluster.write(Command::DeleteNamespace { name: req.name, cascade: req.cascade }).await?)
    }

    async fn list_namespaces(&self, req: Request<pb::ListNamespacesRequest>) -> Reply<pb::ListNamespacesResponse> {
        let applied = self.cluster.read(!req.into_inner().stale).await?;
        Ok(Response::new(pb::ListNamespacesResponse {
            // A user sees the namespaces it has permissions on.
            namespaces: applied.state.namespaces.keys().filter(|ns| sees_namespace(&self.auth, ns)).cloned().collect(),
            index: applied.last_applied.map(|l| l.index).unwrap_or(0),
        }))
    }

    async fn create_topic(&self, req: Request<pb::CreateTopicRequest>) -> Reply<pb::WriteResponse> {
        let req = req.into_inner();
        tag(&req.namespace, req.topic.as_ref().map(|t| t.name.as_str()), None);
        let namespace = namespace_of(&req.namespace)?;
        let topic = req.topic.ok_or_else(|| RequestError::new(ErrorCode::InvalidArgument, "topic: is required"))?;
        validate::name("name", &topic.name)?;
        allow(&self.auth, Need::Configure { namespace: &namespace, kind: "topic", name: &topic.name })?;
        let spec = topic_spec_from_pb(&topic)?;
        written(self.cluster.write(Command::CreateTopic { namespace, name: topic.name, spec }).await?)
    }

    async fn update_topic(&self, req: Request<pb::UpdateTopicRequest>) -> Reply<pb::WriteResponse> {
        let req = req.into_inner();
        tag(&req.namespace, Some(&req.name), None);
        let namespace = namespace_of(&req.namespace)?;
        validate::name("name", &req.name)?;
        allow(&self.auth, Need::Configure { namespace: &namespace, kind: "topic", name: &req.name })?;
        let update = TopicUpdate {
            shards: req.shards,
            replication_factor: req.replication_factor,
            retention_ms: req.retention.as_ref().map(|_| duration_to_ms(&req.retention)).transpose()?,
            default_exchange_type: req
                .default_exchange_type
                .as_deref()
                .map(|t| validate::exchange_type("default_exchange_type", t))
                .transpose()?,
            min_insync_replicas: req.min_insync_replicas,
            retention_bytes_max: req.retention_bytes_max,
            segment_age_max_ms: req.segment_age_max_ms,
            retention_overrides_consumers: req.retention_overrides_consumers,
            shard_key: req.shard_key.as_deref().map(shard_key).transpose()?,
        };
        if let Some(s) = update.shards {
            validate::shards(s)?;
        }
        written(self.cluster.write(Command::UpdateTopic { namespace, name: req.name, update }).await?)
    }

    async fn delete_topic(&self, req: Request<pb::DeleteTopicRequest>) -> Reply<pb::WriteResponse> {
        let req = req.into_inner();
        tag(&req.namespace, Some(&req.name), None);
        let namespace = namespace_of(&req.namespace)?;
        validate::name("name", &req.name)?;
        allow(&self.auth, Need::Configure { namespace: &namespace, kind: "topic", name: &req.name })?;
        written(self.cluster.write(Command::DeleteTopic { namespace, name: req.name }).await?)
    }

    async fn list_topics(&self, req: Request<pb::ListTopicsRequest>) -> Reply<pb::ListTopicsResponse> {
        let req = req.into_inner();
        tag(&req.namespace, None, None);
        let namespace = namespace_of(&req.namespace)?;
        allow(&self.auth, Need::Member { namespace: &namespace })?;
        let applied = self.cluster.read(!req.stale).await?;
        let ns = applied.state.namespace(&namespace)?;
        let (topics, next_page_token) = page(&ns.topics, &req.prefix, req.page_size, &req.page_token);
        Ok(Response::new(pb::ListTopicsResponse {
            topics: topics_to_pb(&applied.state, &namespace, topics, &|id| self.local_size(id)),
            index: applied.last_applied.map(|l| l.index).unwrap_or(0),
            next_page_token,
        }))
    }

    async fn create_consumer_group(&self, req: Request<pb::CreateConsumerGroupRequest>) -> Reply<pb::WriteResponse> {
        let req = req.into_inner();
        tag(&req.namespace, None, req.consumer_group.as_ref().map(|g| g.name.as_str()));
        let (namespace, name, spec) = self.group_of_request(&req.namespace, req.consumer_group).await?;
        allow(&self.auth, Need::Configure { namespace: &namespace, kind: "consumer group", name: &name })?;
        written(self.cluster.write(Command::CreateConsumerGroup { namespace, name, spec }).await?)
    }

    async fn update_consumer_group(&self, req: Request<pb::UpdateConsumerGroupRequest>) -> Reply<pb::WriteResponse> {
        let req = req.into_inner();
        tag(&req.namespace, None, req.consumer_group.as_ref().map(|g| g.name.as_str()));
        let (namespace, name, spec) = self.group_of_request(&req.namespace, req.consumer_group).await?;
        allow(&self.auth, Need::Configure { namespace: &namespace, kind: "consumer group", name: &name })?;
        let now_unix_ms = self.segments.clock().now_unix_ms();
        written(self.cluster.write(Command::UpdateConsumerGroup { namespace, name, spec, now_unix_ms }).await?)
    }

    async fn delete_consumer_group(&self, req: Request<pb::DeleteConsumerGroupRequest>) -> Reply<pb::WriteResponse> {
        let req = req.into_inner();
        tag(&req.namespace, None, Some(&req.name));
        let namespace = namespace_of(&req.namespace)?;
        validate::name("name", &req.name)?;
        allow(&self.auth, Need::Configure { namespace: &namespace, kind: "consumer group", name: &req.name })?;
        written(self.cluster.write(Command::DeleteConsumerGroup { namespace, name: req.name }).await?)
    }

    async fn purge_consumer_group(
        &self,
        req: Request<pb::PurgeConsumerGroupRequest>,
    ) -> Reply<pb::PurgeConsumerGroupResponse> {
        let forwarded = hops(req.metadata()) > 0;
        let req = req.into_inner();
        tag(&req.namespace, None, Some(&req.name));
        let namespace = namespace_of(&req.namespace)?;
        validate::name("name", &req.name)?;
        allow(&self.auth, Need::Read { namespace: &namespace, group: &req.name })?;
        let purged = self.groups.purge_anywhere(&self.peers, &namespace, &req.name, forwarded).await?;
        Ok(Response::new(pb::PurgeConsumerGroupResponse { purged }))
    }

    async fn list_consumer_groups(
        &self,
        req: Request<pb::ListConsumerGroupsRequest>,
    ) -> Reply<pb::ListConsumerGroupsResponse> {
        let req = req.into_inner();
        tag(&req.namespace, None, None);
        let namespace = namespace_of(&req.namespace)?;
        allow(&self.auth, Need::Member { namespace: &namespace })?;
        let applied = self.cluster.read(!req.stale).await?;
        let ns = applied.state.namespace(&namespace)?;
        let (groups, next_page_token) = page(&ns.consumer_groups, &req.prefix, req.page_size, &req.page_token);
        Ok(Response::new(pb::ListConsumerGroupsResponse {
            consumer_groups: groups
                .into_iter()
                .map(|(n, g)| consumer_group_runtime_to_pb(&applied.state, &namespace, n, g))
                .collect(),
            index: applied.last_applied.map(|l| l.index).unwrap_or(0),
            next_page_token,
        }))
    }

    async fn describe_consumer_groups(
        &self,
        req: Request<pb::DescribeConsumerGroupsRequest>,
    ) -> Reply<pb::DescribeConsumerGroupsResponse> {
        let forwarded = hops(req.metadata()) > 0;
        let req = req.into_inner();
        tag(&req.namespace, None, (req.names.len() == 1).then(|| req.names[0].as_str()));
        let namespace = namespace_of(&req.namespace)?;
        for (i, n) in req.names.iter().enumerate() {
            validate::name(&format!("names[{i}]"), n)?;
        }
        allow(&self.auth, Need::Member { namespace: &namespace })?;
        if forwarded {
            // Another node asks for the groups running here: answer from them only.
            let mut out = Vec::new();
            for name in &req.names {
                if let Some(st) = self.groups.stats_of(&namespace, name).await {
                    out.push(status_to_pb(self.cluster.id, st));
                }
            }
            return Ok(Response::new(pb::DescribeConsumerGroupsResponse { consumer_groups: out, index: 0 }));
        }
        let (placed, index) = self.placed_groups(&namespace, &req.names).await?;
        let mut by_node: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        for (name, node, _) in &placed {
            if let Some((node, _)) = node {
                by_node.entry(*node).or_default().push(name.clone());
            }
        }
        let asks = by_node
            .into_iter()
            .map(|(node, names)| self.ask_node(namespace.clone(), node, placed_addr(&placed, node), names));
        let mut answers: BTreeMap<String, Result<pb::ConsumerGroupStatus, String>> = BTreeMap::new();
        for answer in futures::future::join_all(asks).await {
            answers.extend(answer);
        }
        let consumer_groups = placed
            .into_iter()
            .map(|(name, node, committed)| match answers.remove(&name) {
                Some(Ok(status)) => status,
                other => pb::ConsumerGroupStatus {
                    name: name.clone(),
                    node_id: node.as_ref().map_or(0, |(n, _)| *n),
                    running: false,
                    error: match (other, node) {
                        (Some(Err(e)), _) => e,
                        (_, None) => "not placed on a live node yet".to_string(),
                        (_, Some(_)) => "the group does not run on its node yet".to_string(),
                    },
                    committed_offsets: committed.into_iter().collect(),
                    ..Default::default()
                },
            })
            .collect();
        Ok(Response::new(pb::DescribeConsumerGroupsResponse { consumer_groups, index }))
    }

    async fn dump(&self, req: Request<pb::DumpRequest>) -> Reply<pb::DumpResponse> {
        let req = req.into_inner();
        allow(&self.auth, Need::Admin { what: "dump (the whole cluster state)" })?;
        let stale = req.stale;
        if !req.namespace.is_empty() {
            validate::name("namespace", &req.namespace)?;
        }
        let filter = DumpFilter { namespace: &req.namespace, prefix: &req.prefix };
        let metrics = self.cluster.raft.metrics().borrow().clone();
        let raft_error = super::raft_failure(&metrics);
        if let (Some(reason), false) = (&raft_error, stale) {
            // No linearizable read will ever succeed here: say why at once.
            return Err(RequestError::new(
                ErrorCode::Internal,
                format!(
                    "node {}: Raft stopped on this node: {reason}; it reports NOT_SERVING on liveness and must be \
                     restarted (dump --stale shows its last state)",
                    self.cluster.id
                ),
            )
            .into());
        }
        let state = state_to_pb(&*self.cluster.read(!stale).await?, &filter, &|id| self.local_size(id));
        let filtered = !req.namespace.is_empty() || !req.prefix.is_empty();
        let shown: std::collections::HashSet<u64> = state.segments.iter().map(|s| s.id).collect();
        let disk = self.segments.disk().status();
        Ok(Response::new(pb::DumpResponse {
            state: Some(state),
            // This node's copies; with a filter, only those of the segments shown.
            segments: self
                .segments
                .store()
                .list()
                .into_iter()
                .filter(|s| !filtered || shown.contains(&s.id))
                .map(|s| pb::LocalSegment {
                    id: s.id,
                    size_bytes: s.size_bytes,
                    open: !s.sealed,
                    next_offset: s.next_offset,
                })
                .collect(),
            node_id: self.cluster.id,
            leader_id: metrics.current_leader.unwrap_or(0),
            term: metrics.current_term,
            local: Some(pb::LocalHealth {
                disk_free_bytes: disk.free_bytes,
                disk_free_min_bytes: disk.free_min_bytes,
                disk_low: disk.below,
                raft_error: raft_error.unwrap_or_default(),
            }),
        }))
    }

    async fn create_user(&self, req: Request<pb::CreateUserRequest>) -> Reply<pb::WriteResponse> {
        let req = req.into_inner();
        allow(&self.auth, Need::Admin { what: "creating a user" })?;
        validate::user_name("name", &req.name)?;
        validate::password("password", &req.password)?;
        if self.cluster.state.read().state.users.contains_key(&req.name) {
            return Err(RequestError::new(
                ErrorCode::UserAlreadyExists,
                format!("name: user {:?} already exists", req.name),
            )
            .into());
        }
        // Hashed here, on the node that took the request: only the hash is replicated.
        let password_hash = crate::auth::hash_password(req.password).await?;
        let cmd = Command::CreateUser { name: req.name, password_hash, admin: req.admin, only_if_no_users: false };
        written(self.cluster.write(cmd).await?)
    }

    async fn delete_user(&self, req: Request<pb::DeleteUserRequest>) -> Reply<pb::WriteResponse> {
        let req = req.into_inner();
        allow(&self.auth, Need::Admin { what: "deleting a user" })?;
        validate::user_name("name", &req.name)?;
        written(self.cluster.write(Command::DeleteUser { name: req.name }).await?)
    }

    async fn change_password(&self, req: Request<pb::ChangePasswordRequest>) -> Reply<pb::WriteResponse> {
        let req = req.into_inner();
        allow(&self.auth, Need::Admin { what: "changing a password" })?;
        validate::user_name("name", &req.name)?;
        validate::password("password", &req.password)?;
        // Checked before the slow hash; the state machine checks again at apply.
        if !self.cluster.state.read().state.users.contains_key(&req.name) {
            return Err(RequestError::new(
                ErrorCode::UserNotFound,
                format!("name: user {:?} does not exist", req.name),
            )
            .into());
        }
        let password_hash = crate::auth::hash_password(req.password).await?;
        written(self.cluster.write(Command::ChangePassword { name: req.name, password_hash }).await?)
    }

    async fn set_permissions(&self, req: Request<pb::SetPermissionsRequest>) -> Reply<pb::WriteResponse> {
        let req = req.into_inner();
        tag(&req.namespace, None, None);
        allow(&self.auth, Need::Admin { what: "setting permissions" })?;
        validate::user_name("user", &req.user)?;
        let namespace = namespace_of(&req.namespace)?;
        let permissions = match (req.clear, req.permissions) {
            (true, _) => None,
            (false, Some(p)) => Some(validate::permissions(&p.configure, &p.write, &p.read)?),
            (false, None) => {
                return Err(RequestError::new(ErrorCode::InvalidArgument, "permissions: is required (or clear)").into())
            }
        };
        written(self.cluster.write(Command::SetPermissions { user: req.user, namespace, permissions }).await?)
    }

    async fn decommission_node(&self, req: Request<pb::DecommissionNodeRequest>) -> Reply<pb::WriteResponse> {
        let req = req.into_inner();
        allow(&self.auth, Need::Admin { what: "decommissioning a node" })?;
        if req.node_id == 0 {
            return Err(RequestError::new(
                ErrorCode::InvalidArgument,
                "node_id: is required (a node's id, see list-nodes)",
            )
            .into());
        }
        let cmd = Command::DecommissionNode { id: req.node_id, cancel: req.cancel };
        written(self.cluster.write(cmd).await?)
    }

    async fn list_nodes(&self, req: Request<pb::ListNodesRequest>) -> Reply<pb::ListNodesResponse> {
        allow(&self.auth, Need::Admin { what: "listing nodes" })?;
        let applied = self.cluster.read(!req.into_inner().stale).await?;
        let leader_id = self.cluster.leader().map_or(0, |(id, _)| id);
        Ok(Response::new(pb::ListNodesResponse { nodes: nodes_to_pb(&applied), leader_id }))
    }

    async fn transfer_leadership(
        &self,
        req: Request<pb::TransferLeadershipRequest>,
    ) -> Reply<pb::TransferLeadershipResponse> {
        allow(&self.auth, Need::Admin { what: "transferring Raft leadership" })?;
        let to = Some(req.into_inner().to_node_id).filter(|id| *id != 0);
        let leader_id = self.cluster.transfer_leadership(to).await?;
        Ok(Response::new(pb::TransferLeadershipResponse { leader_id }))
    }

    async fn rebalance(&self, _req: Request<pb::RebalanceRequest>) -> Reply<pb::RebalanceResponse> {
        allow(&self.auth, Need::Admin { what: "rebalancing the cluster" })?;
        let done = crate::replication::placement::request_rebalance(&self.cluster).await?;
        Ok(Response::new(pb::RebalanceResponse {
            index: done.index,
            consumer_groups_moved: done.consumer_groups_moved,
            segments_rotated: done.segments_rotated,
        }))
    }

    async fn list_users(&self, req: Request<pb::ListUsersRequest>) -> Reply<pb::ListUsersResponse> {
        allow(&self.auth, Need::Admin { what: "listing users" })?;
        let applied = self.cluster.read(!req.into_inner().stale).await?;
        let users = applied
            .state
            .users
            .iter()
            .map(|(name, u)| pb::User {
                name: name.clone(),
                admin: u.admin,
                permissions: u
                    .permissions
                    .iter()
                    .map(|(ns, p)| {
                        let p = pb::Permissions {
                            configure: p.configure.as_str().to_string(),
                            write: p.write.as_str().to_string(),
                            read: p.read.as_str().to_string(),
                        };
                        (ns.clone(), p)
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(pb::ListUsersResponse { users, index: applied.last_applied.map(|l| l.index).unwrap_or(0) }))
    }
}
