//! An in-process broker admin API for the reconciler tests. It keeps namespaces,
//! topics and consumer groups the way the broker does (`broker/src/cluster_state`,
//! `broker/src/api`): creates are idempotent for an identical spec and refused with
//! AlreadyExists for a different one, objects live in existing namespaces, lists answer
//! in the broker's normalized form, and every accepted write, idempotent or not, takes
//! the next Raft index (a new log entry), as it does in the broker. It records every
//! call, and a test can script an error answer per call.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use eventtermq_proto::v1 as pb;
use eventtermq_proto::v1::admin_server::{Admin, AdminServer};
use tonic::{Request, Response, Status};

/// Error answers to script (`None`: the broker's own answer) and the starting state.
pub struct Script {
    pub create_topic: Option<Status>,
    pub update_topic: Option<Status>,
    pub delete: Option<Status>,
    pub create_consumer_group: Option<Status>,
    pub dump: Option<pb::DumpResponse>,
    /// Lag per group name that DescribeConsumerGroups reports (0 when not listed) for
    /// every group it holds, as running on node 1; `None`: it answers Unavailable.
    pub lag: Option<BTreeMap<String, u64>>,
    /// Raft index before the first write; each accepted write takes the next one.
    pub index: u64,
    /// Namespaces with their topics and groups; `default` exists, as in a new cluster.
    pub namespaces: BTreeMap<String, Namespace>,
    /// The operator's password the broker takes (user `eventter-operator`); any call
    /// without it is refused Unauthenticated, as the broker does once it has users.
    pub operator_password: String,
    /// Users other than the operator, by name (the broker hashes passwords; the fake
    /// keeps them so that a test can see which one was set).
    pub users: BTreeMap<String, FakeUser>,
    /// An error answer to every user write (CreateUser, ChangePassword, SetPermissions,
    /// DeleteUser).
    pub user_write: Option<Status>,
    /// The nodes ListNodes answers, with their drain state; `None`: the Dump's nodes.
    /// DecommissionNode marks a node draining (1 open segment, 2 closed, 1 group
    /// left); a test drains it further with [`State::set_drain`].
    pub nodes: Option<Vec<pb::Node>>,
    /// An error answer to every DecommissionNode that is not a cancel (the brokers'
    /// refusal when the nodes left could not hold a replication factor).
    pub decommission: Option<Status>,
    /// An error answer to every TransferLeadership.
    pub transfer_leadership: Option<Status>,
}

/// A user as the fake broker holds it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FakeUser {
    pub password: String,
    pub admin: bool,
    pub permissions: BTreeMap<String, pb::Permissions>,
}

impl Default for Script {
    fn default() -> Self {
        Self {
            create_topic: None,
            update_topic: None,
            delete: None,
            create_consumer_group: None,
            dump: None,
            lag: Some(BTreeMap::new()),
            index: 0,
            namespaces: BTreeMap::from([("default".to_string(), Namespace::default())]),
            operator_password: super::OPERATOR_PASSWORD.to_string(),
            users: BTreeMap::new(),
            user_write: None,
            nodes: None,
            decommission: None,
            transfer_leadership: None,
        }
    }
}

impl Script {
    /// Puts `topic` in `namespace` (created if missing) as if created earlier.
    pub fn with_topic(mut self, namespace: &str, topic: pb::Topic) -> Self {
        self.namespaces
            .entry(namespace.to_string())
            .or_default()
            .topics
            .insert(topic.name.clone(), stored_topic(topic));
        self
    }

    /// Puts `group` in `namespace` as if created earlier; its bindings name their
    /// exchange type, as the broker stores them.
    pub fn with_consumer_group(mut self, namespace: &str, group: pb::ConsumerGroup) -> Self {
        self.namespaces.entry(namespace.to_string()).or_default().groups.insert(group.name.clone(), group);
        self
    }
}

/// One broker namespace.
#[derive(Clone, Default)]
pub struct Namespace {
    pub topics: BTreeMap<String, pb::Topic>,
    pub groups: BTreeMap<String, pb::ConsumerGroup>,
}

#[derive(Default)]
pub struct State {
    pub script: Mutex<Script>,
    pub calls: Mutex<Vec<String>>,
}

/// Calls that ask for a Raft log entry.
const WRITES: [&str; 13] = [
    "DecommissionNode",
    "CreateUser",
    "ChangePassword",
    "SetPermissions",
    "DeleteUser",
    "CreateNamespace",
    "DeleteNamespace",
    "CreateTopic",
    "UpdateTopic",
    "DeleteTopic",
    "CreateConsumerGroup",
    "UpdateConsumerGroup",
    "DeleteConsumerGroup",
];

impl State {
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    /// The write calls made so far (accepted or refused).
    pub fn write_calls(&self) -> Vec<String> {
        self.calls().into_iter().filter(|c| WRITES.iter().any(|w| c.split(' ').next() == Some(*w))).collect()
    }

    /// Raft index of the last accepted write.
    pub fn index(&self) -> u64 {
        self.script.lock().unwrap().index
    }

    /// The topic as the broker holds it now.
    pub fn topic(&self, namespace: &str, name: &str) -> Option<pb::Topic> {
        self.script.lock().unwrap().namespaces.get(namespace)?.topics.get(name).cloned()
    }

    /// Changes the broker's state behind the operator's back (as another client would,
    /// without a log entry of the operator's).
    pub fn edit(&self, change: impl FnOnce(&mut BTreeMap<String, Namespace>)) {
        change(&mut self.script.lock().unwrap().namespaces);
    }

    /// Writes of other clients (consumer groups committing offsets, other objects):
    /// the Raft index moves on without any change to what the operator manages.
    pub fn other_writes(&self, count: u64) {
        self.script.lock().unwrap().index += count;
    }

    /// The lag DescribeConsumerGroups reports for `group` from now on.
    pub fn set_lag(&self, group: &str, lag: u64) {
        self.script.lock().unwrap().lag.get_or_insert_with(BTreeMap::new).insert(group.to_string(), lag);
    }

    /// The drain state of node `id` from now on (`None`: not decommissioned).
    pub fn set_drain(&self, id: u64, drain: Option<pb::DrainProgress>) {
        let mut script = self.script.lock().unwrap();
        let mut nodes = listed_nodes(&script);
        nodes.iter_mut().filter(|n| n.id == id).for_each(|n| n.drain = drain);
        script.nodes = Some(nodes);
    }

    /// The node `id` as ListNodes lists it now.
    pub fn node(&self, id: u64) -> Option<pb::Node> {
        listed_nodes(&self.script.lock().unwrap()).into_iter().find(|n| n.id == id)
    }

    /// Changes the script (error answers, the lag) between passes.
    pub fn edit_script(&self, change: impl FnOnce(&mut Script)) {
        change(&mut self.script.lock().unwrap());
    }

    fn record(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }

    /// Runs `change` on the state unless `scripted` is an error; an accepted write
    /// takes the next index.
    fn write(
        &self,
        scripted: impl FnOnce(&Script) -> Option<Status>,
        change: impl FnOnce(&mut BTreeMap<String, Namespace>) -> Result<(), Status>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        let mut script = self.script.lock().unwrap();
        if let Some(status) = scripted(&script) {
            return Err(status);
        }
        change(&mut script.namespaces)?;
        script.index += 1;
        #[allow(deprecated)] // `ok`: the broker still sends it
        Ok(Response::new(pb::WriteResponse { ok: true, index: script.index }))
    }

    /// The user `name` as the broker holds it now.
    pub fn user(&self, name: &str) -> Option<FakeUser> {
        self.script.lock().unwrap().users.get(name).cloned()
    }

    /// A user write: refused with the scripted error, else `change` on the script; an
    /// accepted write takes the next index.
    fn write_user(
        &self,
        change: impl FnOnce(&mut Script) -> Result<(), Status>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        let mut script = self.script.lock().unwrap();
        if let Some(status) = script.user_write.clone() {
            return Err(status);
        }
        change(&mut script)?;
        script.index += 1;
        #[allow(deprecated)] // `ok`: the broker still sends it
        Ok(Response::new(pb::WriteResponse { ok: true, index: script.index }))
    }

    fn read<T>(&self, namespace: &str, f: impl FnOnce(&Namespace) -> T) -> Result<(T, u64), Status> {
        let script = self.script.lock().unwrap();
        let ns = script.namespaces.get(namespace).ok_or_else(|| namespace_not_found(namespace))?;
        Ok((f(ns), script.index))
    }
}

fn namespace_not_found(namespace: &str) -> Status {
    Status::not_found(format!("namespace: {namespace:?} does not exist"))
}

fn namespace_mut<'a>(namespaces: &'a mut BTreeMap<String, Namespace>, name: &str) -> Result<&'a mut Namespace, Status> {
    namespaces.get_mut(name).ok_or_else(|| namespace_not_found(name))
}

fn ms(duration: &Option<prost_types::Duration>) -> i64 {
    duration.as_ref().map_or(0, |d| d.seconds * 1000 + i64::from(d.nanos) / 1_000_000)
}

/// A topic as the broker stores and lists it.
fn stored_topic(topic: pb::Topic) -> pb::Topic {
    let retention_ms = ms(&topic.retention);
    pb::Topic {
        retention: Some(prost_types::Duration {
            seconds: retention_ms / 1000,
            nanos: ((retention_ms % 1000) * 1_000_000) as i32,
        }),
        default_exchange_type: if topic.default_exchange_type.is_empty() {
            "fanout".to_string()
        } else {
            topic.default_exchange_type
        },
        under_replicated: false,
        ..topic
    }
}

fn same_topic_spec(a: &pb::Topic, b: &pb::Topic) -> bool {
    a.shards == b.shards
        && a.replication_factor == b.replication_factor
        && ms(&a.retention) == ms(&b.retention)
        && a.default_exchange_type == b.default_exchange_type
        && a.segment_size_max_bytes == b.segment_size_max_bytes
}

#[derive(Clone)]
pub struct FakeBroker(pub Arc<State>);

#[tonic::async_trait]
impl Admin for FakeBroker {
    async fn create_namespace(
        &self,
        r: Request<pb::CreateNamespaceRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        let name = r.into_inner().name;
        self.0.record(format!("CreateNamespace {name}"));
        self.0.write(
            |_| None,
            |namespaces| {
                namespaces.entry(name).or_default();
                Ok(())
            },
        )
    }

    async fn delete_namespace(
        &self,
        r: Request<pb::DeleteNamespaceRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        let name = r.into_inner().name;
        self.0.record(format!("DeleteNamespace {name}"));
        self.0.write(
            |_| None,
            |namespaces| namespaces.remove(&name).map(|_| ()).ok_or_else(|| namespace_not_found(&name)),
        )
    }

    async fn list_namespaces(
        &self,
        _: Request<pb::ListNamespacesRequest>,
    ) -> Result<Response<pb::ListNamespacesResponse>, Status> {
        self.0.record("ListNamespaces".to_string());
        let script = self.0.script.lock().unwrap();
        Ok(Response::new(pb::ListNamespacesResponse {
            namespaces: script.namespaces.keys().cloned().collect(),
            index: script.index,
        }))
    }

    async fn create_topic(&self, r: Request<pb::CreateTopicRequest>) -> Result<Response<pb::WriteResponse>, Status> {
        let r = r.into_inner();
        let topic = r.topic.unwrap_or_default();
        self.0.record(format!(
            "CreateTopic {}/{} shards={} rf={} retention={:?} type={}",
            r.namespace,
            topic.name,
            topic.shards,
            topic.replication_factor,
            topic.retention.map(|d| d.seconds),
            topic.default_exchange_type
        ));
        self.0.write(
            |s| s.create_topic.clone(),
            |namespaces| {
                let ns = namespace_mut(namespaces, &r.namespace)?;
                let topic = stored_topic(topic);
                match ns.topics.get(&topic.name) {
                    Some(existing) if !same_topic_spec(existing, &topic) => Err(Status::already_exists(format!(
                        "name: topic {:?} already exists in namespace {:?} with a different spec",
                        topic.name, r.namespace
                    ))),
                    Some(_) => Ok(()),
                    None => {
                        ns.topics.insert(topic.name.clone(), topic);
                        Ok(())
                    }
                }
            },
        )
    }

    async fn update_topic(&self, r: Request<pb::UpdateTopicRequest>) -> Result<Response<pb::WriteResponse>, Status> {
        let r = r.into_inner();
        self.0.record(format!("UpdateTopic {}/{} rf={:?}", r.namespace, r.name, r.replication_factor));
        self.0.write(
            |s| s.update_topic.clone(),
            |namespaces| {
                let topic = namespace_mut(namespaces, &r.namespace)?
                    .topics
                    .get_mut(&r.name)
                    .ok_or_else(|| Status::not_found(format!("name: topic {:?} does not exist", r.name)))?;
                if r.replication_factor.is_some_and(|rf| rf != topic.replication_factor) {
                    return Err(Status::failed_precondition("replication_factor: is immutable"));
                }
                if r.shards.is_some_and(|shards| shards < topic.shards) {
                    return Err(Status::failed_precondition("shards: can only grow"));
                }
                let updated = pb::Topic {
                    shards: r.shards.unwrap_or(topic.shards),
                    retention: r.retention.or(topic.retention),
                    default_exchange_type: r.default_exchange_type.unwrap_or(topic.default_exchange_type.clone()),
                    ..topic.clone()
                };
                *topic = stored_topic(updated);
                Ok(())
            },
        )
    }

    async fn delete_topic(&self, r: Request<pb::DeleteTopicRequest>) -> Result<Response<pb::WriteResponse>, Status> {
        let r = r.into_inner();
        self.0.record(format!("DeleteTopic {}/{}", r.namespace, r.name));
        self.0.write(
            |s| s.delete.clone(),
            |namespaces| {
                namespace_mut(namespaces, &r.namespace)?
                    .topics
                    .remove(&r.name)
                    .map(|_| ())
                    .ok_or_else(|| Status::not_found(format!("name: topic {:?} does not exist", r.name)))
            },
        )
    }

    async fn list_topics(&self, r: Request<pb::ListTopicsRequest>) -> Result<Response<pb::ListTopicsResponse>, Status> {
        let namespace = r.into_inner().namespace;
        self.0.record(format!("ListTopics {namespace}"));
        let (topics, index) = self.0.read(&namespace, |ns| ns.topics.values().cloned().collect())?;
        Ok(Response::new(pb::ListTopicsResponse { topics, index, ..Default::default() }))
    }

    async fn create_consumer_group(
        &self,
        r: Request<pb::CreateConsumerGroupRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        let r = r.into_inner();
        let group = r.consumer_group.unwrap_or_default();
        self.0.record(format!("CreateConsumerGroup {}/{} bindings={}", r.namespace, group.name, group.bindings.len()));
        self.0.write(
            |s| s.create_consumer_group.clone(),
            |namespaces| {
                let ns = namespace_mut(namespaces, &r.namespace)?;
                let stored = stored_group(ns, &group)?;
                match ns.groups.get(&group.name) {
                    Some(existing) if pb::ConsumerGroup { since: None, ..existing.clone() } != stored => {
                        Err(Status::already_exists(format!(
                            "name: consumer group {:?} already exists in namespace {:?} with other bindings or settings",
                            group.name, r.namespace
                        )))
                    }
                    Some(_) => Ok(()),
                    None => {
                        ns.groups.insert(group.name.clone(), pb::ConsumerGroup { since: group.since, ..stored });
                        Ok(())
                    }
                }
            },
        )
    }

    async fn update_consumer_group(
        &self,
        r: Request<pb::UpdateConsumerGroupRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        let r = r.into_inner();
        let group = r.consumer_group.unwrap_or_default();
        self.0.record(format!("UpdateConsumerGroup {}/{} bindings={}", r.namespace, group.name, group.bindings.len()));
        self.0.write(
            |_| None,
            |namespaces| {
                let ns = namespace_mut(namespaces, &r.namespace)?;
                let stored = stored_group(ns, &group)?;
                let existing = ns.groups.get_mut(&group.name).ok_or_else(|| {
                    Status::not_found(format!("name: consumer group {:?} does not exist", group.name))
                })?;
                *existing = pb::ConsumerGroup { since: existing.since, ..stored };
                Ok(())
            },
        )
    }

    async fn delete_consumer_group(
        &self,
        r: Request<pb::DeleteConsumerGroupRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        let r = r.into_inner();
        self.0.record(format!("DeleteConsumerGroup {}/{}", r.namespace, r.name));
        self.0.write(
            |s| s.delete.clone(),
            |namespaces| {
                namespace_mut(namespaces, &r.namespace)?
                    .groups
                    .remove(&r.name)
                    .map(|_| ())
                    .ok_or_else(|| Status::not_found(format!("name: consumer group {:?} does not exist", r.name)))
            },
        )
    }

    async fn list_consumer_groups(
        &self,
        r: Request<pb::ListConsumerGroupsRequest>,
    ) -> Result<Response<pb::ListConsumerGroupsResponse>, Status> {
        let namespace = r.into_inner().namespace;
        self.0.record(format!("ListConsumerGroups {namespace}"));
        let (consumer_groups, index) = self.0.read(&namespace, |ns| ns.groups.values().cloned().collect())?;
        Ok(Response::new(pb::ListConsumerGroupsResponse { consumer_groups, index, ..Default::default() }))
    }

    async fn purge_consumer_group(
        &self,
        r: Request<pb::PurgeConsumerGroupRequest>,
    ) -> Result<Response<pb::PurgeConsumerGroupResponse>, Status> {
        let request = r.into_inner();
        self.0.record(format!("PurgeConsumerGroup {} {}", request.namespace, request.name));
        Err(Status::unimplemented("the operator never purges a consumer group"))
    }

    async fn describe_consumer_groups(
        &self,
        r: Request<pb::DescribeConsumerGroupsRequest>,
    ) -> Result<Response<pb::DescribeConsumerGroupsResponse>, Status> {
        let request = r.into_inner();
        self.0.record(format!("DescribeConsumerGroups {}", request.namespace));
        let Some(lag) = self.0.script.lock().unwrap().lag.clone() else {
            return Err(Status::unavailable("cannot ask node 1"));
        };
        let (groups, index): (Vec<pb::ConsumerGroup>, u64) =
            self.0.read(&request.namespace, |ns| ns.groups.values().cloned().collect())?;
        let consumer_groups = groups
            .into_iter()
            .filter(|g| request.names.is_empty() || request.names.contains(&g.name))
            .map(|g| {
                let lag = lag.get(&g.name).copied().unwrap_or(0);
                pb::ConsumerGroupStatus {
                    node_id: 1,
                    running: true,
                    lag,
                    topic_lag: g.bindings.iter().map(|b| (b.topic.clone(), lag)).take(1).collect(),
                    oldest_unacked_age: Some(prost_types::Duration { seconds: 7, nanos: 0 }),
                    subscribers: 2,
                    size: g.size,
                    name: g.name,
                    ..pb::ConsumerGroupStatus::default()
                }
            })
            .collect();
        Ok(Response::new(pb::DescribeConsumerGroupsResponse { consumer_groups, index }))
    }

    async fn dump(&self, _: Request<pb::DumpRequest>) -> Result<Response<pb::DumpResponse>, Status> {
        self.0.record("Dump".to_string());
        match self.0.script.lock().unwrap().dump.clone() {
            Some(dump) => Ok(Response::new(dump)),
            None => Err(Status::unavailable("no leader")),
        }
    }

    // Users as the broker keeps them: names unique, permissions only on existing
    // namespaces, NotFound (2005) for an unknown user.
    async fn create_user(&self, r: Request<pb::CreateUserRequest>) -> Result<Response<pb::WriteResponse>, Status> {
        let r = r.into_inner();
        self.0.record(format!("CreateUser {} admin={}", r.name, r.admin));
        self.0.write_user(|script| {
            if script.users.contains_key(&r.name) {
                return Err(Status::already_exists(format!("name: user {:?} already exists", r.name)));
            }
            let user = FakeUser { password: r.password, admin: r.admin, permissions: BTreeMap::new() };
            script.users.insert(r.name, user);
            Ok(())
        })
    }

    async fn delete_user(&self, r: Request<pb::DeleteUserRequest>) -> Result<Response<pb::WriteResponse>, Status> {
        let r = r.into_inner();
        self.0.record(format!("DeleteUser {}", r.name));
        self.0.write_user(|script| script.users.remove(&r.name).map(|_| ()).ok_or_else(|| user_not_found(&r.name)))
    }

    async fn change_password(
        &self,
        r: Request<pb::ChangePasswordRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        let r = r.into_inner();
        self.0.record(format!("ChangePassword {}", r.name));
        self.0.write_user(|script| {
            let user = script.users.get_mut(&r.name).ok_or_else(|| user_not_found(&r.name))?;
            user.password = r.password;
            Ok(())
        })
    }

    async fn set_permissions(
        &self,
        r: Request<pb::SetPermissionsRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        let r = r.into_inner();
        self.0.record(format!("SetPermissions {} {}{}", r.user, r.namespace, if r.clear { " clear" } else { "" }));
        self.0.write_user(|script| {
            if !script.namespaces.contains_key(&r.namespace) {
                return Err(namespace_not_found(&r.namespace));
            }
            let user = script.users.get_mut(&r.user).ok_or_else(|| user_not_found(&r.user))?;
            match (r.clear, r.permissions) {
                (true, _) => {
                    user.permissions.remove(&r.namespace);
                }
                (false, Some(p)) => {
                    user.permissions.insert(r.namespace, p);
                }
                (false, None) => return Err(Status::invalid_argument("permissions: is required (or clear)")),
            }
            Ok(())
        })
    }

    async fn list_users(&self, _: Request<pb::ListUsersRequest>) -> Result<Response<pb::ListUsersResponse>, Status> {
        self.0.record("ListUsers".to_string());
        let script = self.0.script.lock().unwrap();
        let mut users: Vec<pb::User> = script
            .users
            .iter()
            .map(|(name, u)| pb::User {
                name: name.clone(),
                admin: u.admin,
                permissions: u.permissions.clone().into_iter().collect(),
            })
            .collect();
        users.push(pb::User { name: "eventter-operator".into(), admin: true, ..Default::default() });
        Ok(Response::new(pb::ListUsersResponse { users, index: script.index }))
    }

    // As the broker: NotFound (2006) for an unknown node, a repeat is a no-op, a
    // cancel takes the node back.
    async fn decommission_node(
        &self,
        r: Request<pb::DecommissionNodeRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        let r = r.into_inner();
        self.0.record(format!("DecommissionNode {}{}", r.node_id, if r.cancel { " cancel" } else { "" }));
        let mut script = self.0.script.lock().unwrap();
        let mut nodes = listed_nodes(&script);
        let node = nodes
            .iter_mut()
            .find(|n| n.id == r.node_id)
            .ok_or_else(|| Status::not_found(format!("node_id: node {} does not exist", r.node_id)))?;
        if r.cancel {
            node.drain = None;
        } else {
            if let Some(status) = script.decommission.clone() {
                return Err(status);
            }
            if node.drain.is_none() {
                node.drain = Some(pb::DrainProgress {
                    open_segments: 1,
                    closed_segments: 2,
                    consumer_groups: 1,
                    drained: false,
                });
            }
        }
        script.nodes = Some(nodes);
        script.index += 1;
        #[allow(deprecated)] // `ok`: the broker still sends it
        Ok(Response::new(pb::WriteResponse { ok: true, index: script.index }))
    }

    async fn list_nodes(&self, _: Request<pb::ListNodesRequest>) -> Result<Response<pb::ListNodesResponse>, Status> {
        self.0.record("ListNodes".to_string());
        let script = self.0.script.lock().unwrap();
        let leader_id = script.dump.as_ref().map(|d| d.leader_id).unwrap_or_default();
        Ok(Response::new(pb::ListNodesResponse { nodes: listed_nodes(&script), leader_id }))
    }

    async fn rebalance(&self, _: Request<pb::RebalanceRequest>) -> Result<Response<pb::RebalanceResponse>, Status> {
        Err(Status::unimplemented("rebalance: not in the fake broker"))
    }

    // As the broker: NotFound for a node that is no voter; otherwise the target leads
    // from then on (in the Dump and ListNodes), or the scripted error.
    async fn transfer_leadership(
        &self,
        r: Request<pb::TransferLeadershipRequest>,
    ) -> Result<Response<pb::TransferLeadershipResponse>, Status> {
        let to = r.into_inner().to_node_id;
        self.0.record(format!("TransferLeadership {to}"));
        let mut script = self.0.script.lock().unwrap();
        if let Some(status) = script.transfer_leadership.clone() {
            return Err(status);
        }
        if !listed_nodes(&script).iter().any(|n| n.id == to && n.raft_role == "voter") {
            return Err(Status::not_found(format!("to_node_id: node {to} is not a voter")));
        }
        if let Some(dump) = script.dump.as_mut() {
            dump.leader_id = to;
        }
        Ok(Response::new(pb::TransferLeadershipResponse { leader_id: to }))
    }
}

/// The nodes ListNodes answers: the script's, else those of the Dump's state.
fn listed_nodes(script: &Script) -> Vec<pb::Node> {
    match &script.nodes {
        Some(nodes) => nodes.clone(),
        None => script.dump.as_ref().and_then(|d| d.state.as_ref()).map(|s| s.nodes.clone()).unwrap_or_default(),
    }
}

fn user_not_found(name: &str) -> Status {
    Status::not_found(format!("user: {name:?} does not exist"))
}

/// Starts the fake on 127.0.0.1:0; it runs until the test's runtime ends.
pub async fn start(script: Script) -> (SocketAddr, Arc<State>) {
    let state = Arc::new(State { script: Mutex::new(script), calls: Mutex::default() });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let checked = state.clone();
    let service = AdminServer::with_interceptor(FakeBroker(state.clone()), move |request: Request<()>| {
        use base64::Engine;
        let password = checked.script.lock().unwrap().operator_password.clone();
        let expected = base64::engine::general_purpose::STANDARD.encode(format!("eventter-operator:{password}"));
        match request.metadata().get("authorization").and_then(|v| v.to_str().ok()) {
            Some(header) if header == format!("Basic {expected}") => Ok(request),
            Some(_) => {
                checked.record("Refused wrong credentials".to_string());
                Err(Status::unauthenticated("wrong user name or password"))
            }
            None => {
                checked.record("Refused no credentials".to_string());
                Err(Status::unauthenticated("credentials required"))
            }
        }
    });
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    (address, state)
}

/// A 127.0.0.1 address nothing listens on.
pub async fn closed_address() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
    // The listener drops here, so connections are refused.
}

/// A Dump of a healthy three-node cluster led by node 2.
pub fn healthy_dump() -> pb::DumpResponse {
    healthy_dump_of(3)
}

/// A Dump of a healthy cluster of `count` nodes (ids 1.., pods emq-0..) led by node 2.
pub fn healthy_dump_of(count: u64) -> pb::DumpResponse {
    let node = |id: u64, pod: &str| pb::Node {
        id,
        address: format!("{pod}.emq-nodes.messaging.svc.cluster.local:16000"),
        state: pb::NodeState::Alive as i32,
        raft_role: "voter".into(),
        ..pb::Node::default()
    };
    pb::DumpResponse {
        state: Some(pb::ClusterState {
            index: 42,
            namespaces: vec![],
            nodes: (1..=count).map(|id| node(id, &format!("emq-{}", id - 1))).collect(),
            segments: vec![],
        }),
        segments: vec![],
        node_id: 1,
        leader_id: 2,
        term: 3,
        local: Some(pb::LocalHealth {
            disk_free_bytes: 10 << 30,
            disk_free_min_bytes: 64 << 20,
            disk_low: false,
            raft_error: String::new(),
        }),
    }
}

/// The group as the broker stores it (defaults filled in, `since` left out), after
/// checking that its topics exist.
fn stored_group(ns: &Namespace, group: &pb::ConsumerGroup) -> Result<pb::ConsumerGroup, Status> {
    let mut bindings = Vec::new();
    for (i, b) in group.bindings.iter().enumerate() {
        let topic = ns
            .topics
            .get(&b.topic)
            .ok_or_else(|| Status::not_found(format!("bindings[{i}].topic: topic {:?} does not exist", b.topic)))?;
        bindings.push(pb::Binding {
            exchange_type: if b.exchange_type.is_empty() {
                topic.default_exchange_type.clone()
            } else {
                b.exchange_type.clone()
            },
            headers_match: if b.headers_match.is_empty() { "all".into() } else { b.headers_match.clone() },
            ..b.clone()
        });
    }
    Ok(pb::ConsumerGroup {
        bindings,
        size: if group.size == 0 { 10_000 } else { group.size },
        since: None,
        ..group.clone()
    })
}
