//! Commands that change the cluster state, and their deterministic application.
//!
//! Every command is validated twice: by the API handler before it is proposed (so bad
//! input fails fast without touching the Raft log), and here at apply time, which is
//! authoritative because the state may have changed between the two. A rejected
//! command leaves the state untouched; only the applied index advances.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::model::*;
use super::validate;
use crate::error::{ErrorCode, RequestError};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    CreateNamespace {
        name: String,
    },
    DeleteNamespace {
        name: String,
        cascade: bool,
    },
    CreateTopic {
        namespace: String,
        name: String,
        spec: TopicSpec,
    },
    UpdateTopic {
        namespace: String,
        name: String,
        update: TopicUpdate,
    },
    DeleteTopic {
        namespace: String,
        name: String,
    },
    CreateConsumerGroup {
        namespace: String,
        name: String,
        spec: ConsumerGroupSpec,
    },
    DeleteConsumerGroup {
        namespace: String,
        name: String,
    },
    /// Adds a binding to an existing group (AMQP `queue.bind`); one that routes the
    /// same as a binding the group has changes nothing.
    BindConsumerGroup {
        namespace: String,
        name: String,
        binding: BindingSpec,
    },
    /// Removes the group's bindings that route the same as `binding` (AMQP
    /// `queue.unbind`); none is not an error, as in RabbitMQ.
    UnbindConsumerGroup {
        namespace: String,
        name: String,
        binding: BindingSpec,
    },
    /// Changes a group in place, keeping its offsets: `spec`'s bindings and settings
    /// replace the group's (its `since_unix_ms` is ignored); bindings that route the
    /// same as one the group has keep it, new ones take what is published from
    /// `now_unix_ms` on.
    UpdateConsumerGroup {
        namespace: String,
        name: String,
        spec: ConsumerGroupSpec,
        now_unix_ms: i64,
    },
    /// Gossip's view of a node, written by the leader when it changes.
    SetNode {
        id: NodeId,
        record: NodeRecord,
    },
    RemoveNode {
        id: NodeId,
    },
    /// An operator decommissions (drains) node `id`, or with `cancel` takes it back:
    /// see [`ClusterState::draining`]. Refused when the live nodes left could not hold
    /// every topic's replication factor.
    DecommissionNode {
        id: NodeId,
        #[serde(default)]
        cancel: bool,
    },
    /// A node reports that its data directory went below its free-space watermark
    /// (`Some`) or is back above it (`None`).
    SetDiskLow {
        node: NodeId,
        low: Option<DiskLow>,
    },
    /// The leader opens a segment for a topic's shard on `replicas` (primary first,
    /// distinct nodes), at least `min_insync` of them: the segment's
    /// [`SegmentRecord::min_insync`].
    OpenSegment {
        namespace: String,
        topic: String,
        shard: u32,
        replicas: Vec<NodeId>,
        now_unix_ms: i64,
        #[serde(default)]
        min_insync: u32,
    },
    /// Closes an open segment at `next_offset`: its primary on rotation, or the leader
    /// failing over from a dead primary (then `done` are the replicas with the longest
    /// log).
    CloseSegment {
        id: SegmentId,
        next_offset: u64,
        size_bytes: u64,
        checksum: u32,
        done: Vec<NodeId>,
        now_unix_ms: i64,
    },
    /// `node` now holds a complete, sealed copy of a closed segment. The first copy
    /// sets the segment's checksum; a copy that differs from it is refused.
    SegmentDone {
        id: SegmentId,
        node: NodeId,
        size_bytes: u64,
        checksum: u32,
    },
    /// `node` no longer has its complete copy of a closed segment (it was found damaged
    /// and set aside). It stays a replica, so it fetches the segment again and reports
    /// `SegmentDone` once it holds a good copy; meanwhile nobody reads from it.
    SegmentLost {
        id: SegmentId,
        node: NodeId,
    },
    /// The leader changes who should hold a closed segment (re-replication).
    SetSegmentReplicas {
        id: SegmentId,
        replicas: Vec<NodeId>,
    },
    /// A rebalance asks the primaries of these open segments to close them, so that
    /// their successors are placed afresh (closed or unknown ones are left alone: the
    /// state may have moved on since the rebalance looked).
    RotateSegments {
        ids: Vec<SegmentId>,
    },
    /// Retention: the segments are gone for good.
    DeleteSegments {
        ids: Vec<SegmentId>,
    },
    /// The leader (re)assigns a consumer group to a node.
    AssignGroup {
        namespace: String,
        group: String,
        node: Option<NodeId>,
    },
    /// The commits of many groups of one node, written as one entry (see
    /// `consumer_groups::commits`); a group deleted meanwhile is passed over.
    CommitOffsetsBatch {
        commits: Vec<GroupOffsets>,
    },
    /// A group's node records how far it got; offsets only move forward.
    CommitOffsets {
        namespace: String,
        group: String,
        offsets: std::collections::BTreeMap<SegmentId, u64>,
        /// Per segment, below which every record the group offered was handed out
        /// ([`GroupRuntime::handed_out`]); only moves forward.
        #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
        handed_out: std::collections::BTreeMap<SegmentId, u64>,
    },
    /// A user of the client APIs with its password's hash (made on the node that took
    /// the request, never here). `only_if_no_users`: the bootstrap admin of
    /// `--admin-user`, created only while the cluster has no user at all.
    CreateUser {
        name: String,
        password_hash: String,
        admin: bool,
        #[serde(default)]
        only_if_no_users: bool,
    },
    DeleteUser {
        name: String,
    },
    /// A new password hash for an existing user (made, as for `CreateUser`, on the
    /// node that took the request); its administrator flag and permissions stay.
    ChangePassword {
        name: String,
        password_hash: String,
    },
    /// Sets (`Some`) or removes (`None`) a user's permissions on a namespace.
    SetPermissions {
        user: String,
        namespace: String,
        permissions: Option<Permissions>,
    },
    /// `command`, identified: applied once; a repeat of the same `id` (a write retried
    /// after its outcome was unknown, maybe through another node) changes nothing and
    /// answers as the first did, index included ([`ClusterState::apply_at`]).
    Once {
        id: RequestId,
        command: Box<Command>,
    },
}

/// What applying a command returned: the log index it was applied at, and whether it
/// was accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResponse {
    pub index: u64,
    pub result: Result<(), RequestError>,
}

impl ClusterState {
    /// Applies the log entry `cmd` at `index` and answers it: an identified command
    /// seen before answers as it did then (its index and outcome) and changes nothing;
    /// one seen first is applied and its answer remembered ([`AppliedRequests`]).
    pub fn apply_at(&mut self, index: u64, cmd: &Command) -> CommandResponse {
        let Command::Once { id, command } = cmd else {
            return CommandResponse { index, result: self.apply(cmd) };
        };
        if let Some((first, result)) = self.applied_requests.get(id) {
            return CommandResponse { index: *first, result: result.clone() };
        }
        let result = self.apply(command);
        self.applied_requests.record(*id, index, result.clone());
        CommandResponse { index, result }
    }

    /// How an identified write already applied was answered, if it was.
    pub fn answered(&self, cmd: &Command) -> Option<CommandResponse> {
        let Command::Once { id, .. } = cmd else { return None };
        self.applied_requests.get(id).map(|(index, result)| CommandResponse { index: *index, result: result.clone() })
    }

    /// Applies `cmd` (an identified one without remembering it: see
    /// [`ClusterState::apply_at`]). On error nothing is changed.
    pub fn apply(&mut self, cmd: &Command) -> Result<(), RequestError> {
        if let Command::Once { command, .. } = cmd {
            return self.apply(command);
        }
        self.check(cmd)?;
        match cmd {
            Command::CreateNamespace { name } => {
                self.namespaces.entry(name.clone()).or_default();
            }
            Command::DeleteNamespace { name, .. } => {
                self.namespaces.remove(name);
                for user in self.users.values_mut() {
                    user.permissions.remove(name);
                }
                self.segments.retain(|_, s| s.namespace != *name);
                self.groups.remove(name);
            }
            Command::CreateTopic { namespace, name, spec } => {
                self.namespaces
                    .entry(namespace.clone())
                    .or_default()
                    .topics
                    .entry(name.clone())
                    .or_insert(spec.resolved());
            }
            Command::UpdateTopic { namespace, name, update } => {
                if let Some(topic) = self.namespaces.get_mut(namespace).and_then(|ns| ns.topics.get_mut(name)) {
                    *topic = validate::topic_update(topic, update)?;
                }
            }
            Command::DeleteTopic { namespace, name } => {
                self.namespaces.get_mut(namespace).map(|ns| ns.topics.remove(name));
                let gone: Vec<SegmentId> = self.topic_segments(namespace, name).map(|(id, _)| id).collect();
                self.forget_segments(&gone);
            }
            Command::CreateConsumerGroup { .. }
            | Command::DeleteConsumerGroup { .. }
            | Command::BindConsumerGroup { .. }
            | Command::UnbindConsumerGroup { .. }
            | Command::UpdateConsumerGroup { .. } => self.apply_group_spec(cmd),
            Command::SetNode { id, record } => {
                self.nodes.insert(*id, record.clone());
            }
            Command::RemoveNode { id } => {
                self.nodes.remove(id);
                self.disk_low.remove(id);
                self.draining.remove(id);
            }
            Command::DecommissionNode { id, cancel: false } => {
                self.draining.insert(*id);
            }
            Command::DecommissionNode { id, cancel: true } => {
                self.draining.remove(id);
            }
            Command::RotateSegments { ids } => {
                for id in ids {
                    if let Some(s) = self.segments.get_mut(id).filter(|s| s.is_open()) {
                        s.rotate = true;
                    }
                }
            }
            Command::SetDiskLow { node, low: Some(low) } => {
                self.disk_low.insert(*node, *low);
            }
            Command::SetDiskLow { node, low: None } => {
                self.disk_low.remove(node);
            }
            Command::OpenSegment { .. }
            | Command::CloseSegment { .. }
            | Command::SegmentDone { .. }
            | Command::SegmentLost { .. }
            | Command::SetSegmentReplicas { .. }
            | Command::DeleteSegments { .. } => self.apply_segment_change(cmd),
            Command::AssignGroup { .. } | Command::CommitOffsets { .. } => self.apply_group_runtime(cmd),
            Command::CommitOffsetsBatch { commits } => {
                for c in commits {
                    self.commit_offsets(&c.namespace, &c.group, &c.offsets, &c.handed_out);
                }
            }
            Command::CreateUser { name, password_hash, admin, .. } => {
                let user =
                    User { password_hash: password_hash.clone(), admin: *admin, permissions: Default::default() };
                self.users.insert(name.clone(), user);
            }
            Command::DeleteUser { name } => {
                self.users.remove(name);
            }
            Command::ChangePassword { name, password_hash } => {
                if let Some(u) = self.users.get_mut(name) {
                    u.password_hash = password_hash.clone();
                }
            }
            Command::SetPermissions { user, namespace, permissions } => {
                if let Some(u) = self.users.get_mut(user) {
                    match permissions {
                        Some(p) => {
                            u.permissions.insert(namespace.clone(), p.clone());
                        }
                        None => {
                            u.permissions.remove(namespace);
                        }
                    }
                }
            }
            Command::Once { .. } => {}
        }
        Ok(())
    }

    /// Consumer groups: created, deleted, bound, unbound.
    fn apply_group_spec(&mut self, cmd: &Command) {
        match cmd {
            Command::CreateConsumerGroup { namespace, name, spec } => {
                let ns = self.namespaces.entry(namespace.clone()).or_default();
                ns.consumer_groups.entry(name.clone()).or_insert(spec.clone());
                self.groups.entry(namespace.clone()).or_default().entry(name.clone()).or_default();
            }
            Command::DeleteConsumerGroup { namespace, name } => {
                self.namespaces.get_mut(namespace).map(|ns| ns.consumer_groups.remove(name));
                self.groups.get_mut(namespace).map(|g| g.remove(name));
            }
            Command::BindConsumerGroup { namespace, name, binding } => {
                if let Some(g) = self.namespaces.get_mut(namespace).and_then(|ns| ns.consumer_groups.get_mut(name)) {
                    if !g.bindings.iter().any(|b| b.same_route(binding)) {
                        g.bindings.push(binding.clone());
                    }
                }
            }
            Command::UnbindConsumerGroup { namespace, name, binding } => {
                if let Some(g) = self.namespaces.get_mut(namespace).and_then(|ns| ns.consumer_groups.get_mut(name)) {
                    g.bindings.retain(|b| !b.same_route(binding));
                }
            }
            Command::UpdateConsumerGroup { namespace, name, spec, now_unix_ms } => {
                if let Some(g) = self.namespaces.get_mut(namespace).and_then(|ns| ns.consumer_groups.get_mut(name)) {
                    *g = g.updated(spec, *now_unix_ms);
                }
            }
            _ => {}
        }
    }

    /// Segment records: opened, closed, copies done or lost, moved, deleted.
    fn apply_segment_change(&mut self, cmd: &Command) {
        match cmd {
            Command::OpenSegment { .. } => self.open_segment(cmd),
            Command::CloseSegment { id, next_offset, size_bytes, checksum, done, now_unix_ms } => {
                if let Some(s) = self.segments.get_mut(id) {
                    s.state = SegmentState::Closed;
                    s.rotate = false;
                    s.next_offset = *next_offset;
                    s.size_bytes = *size_bytes;
                    s.checksum = *checksum;
                    s.done = done.clone();
                    s.closed_unix_ms = *now_unix_ms;
                }
            }
            Command::SegmentDone { id, node, size_bytes, checksum } => {
                if let Some(s) = self.segments.get_mut(id) {
                    s.add_done(*node, *size_bytes, *checksum);
                }
            }
            Command::SegmentLost { id, node } => {
                if let Some(s) = self.segments.get_mut(id) {
                    s.done.retain(|n| n != node);
                }
            }
            Command::SetSegmentReplicas { id, replicas } => {
                if let Some(s) = self.segments.get_mut(id) {
                    s.replicas = replicas.clone();
                    s.done.retain(|n| replicas.contains(n));
                }
            }
            Command::DeleteSegments { ids } => self.forget_segments(ids),
            _ => {}
        }
    }

    /// Where a group runs and how far it committed (offsets only move forward).
    fn apply_group_runtime(&mut self, cmd: &Command) {
        match cmd {
            Command::AssignGroup { namespace, group, node } => {
                if let Some(g) = self.groups.get_mut(namespace).and_then(|g| g.get_mut(group)) {
                    g.node = *node;
                }
            }
            Command::CommitOffsets { namespace, group, offsets, handed_out } => {
                self.commit_offsets(namespace, group, offsets, handed_out)
            }
            _ => {}
        }
    }

    /// Moves a group's offsets and hand-out marks forward (never back), for segments
    /// that still exist; a group that does not exist (any more) is passed over.
    fn commit_offsets(
        &mut self,
        namespace: &str,
        group: &str,
        offsets: &BTreeMap<SegmentId, u64>,
        handed_out: &BTreeMap<SegmentId, u64>,
    ) {
        let Some(g) = self.groups.get_mut(namespace).and_then(|g| g.get_mut(group)) else { return };
        for (map, moved) in [(&mut g.offsets, offsets), (&mut g.handed_out, handed_out)] {
            for (seg, off) in moved {
                if self.segments.contains_key(seg) {
                    let e = map.entry(*seg).or_insert(0);
                    *e = (*e).max(*off);
                }
            }
        }
    }

    /// Records a new open segment: the shard's next generation, the next id.
    fn open_segment(&mut self, cmd: &Command) {
        let Command::OpenSegment { namespace, topic, shard, replicas, now_unix_ms, min_insync } = cmd else { return };
        let generation = self
            .topic_segments(namespace, topic)
            .filter(|(_, s)| s.shard == *shard)
            .map(|(_, s)| s.generation)
            .max()
            .unwrap_or(0)
            + 1;
        let id = self.next_segment_id;
        self.next_segment_id += 1;
        let record = SegmentRecord {
            namespace: namespace.clone(),
            topic: topic.clone(),
            shard: *shard,
            generation,
            state: SegmentState::Open,
            primary: replicas[0],
            replicas: replicas.clone(),
            done: Vec::new(),
            next_offset: 0,
            size_bytes: 0,
            checksum: 0,
            created_unix_ms: *now_unix_ms,
            closed_unix_ms: 0,
            min_insync: *min_insync,
            rotate: false,
        };
        self.segments.insert(id, record);
    }

    /// Drops segments and every group's offsets in them.
    fn forget_segments(&mut self, ids: &[SegmentId]) {
        for id in ids {
            self.segments.remove(id);
        }
        for groups in self.groups.values_mut() {
            for g in groups.values_mut() {
                g.offsets.retain(|seg, _| !ids.contains(seg));
                g.handed_out.retain(|seg, _| !ids.contains(seg));
            }
        }
    }

    /// Whether `cmd` would be accepted, without changing anything. The leader calls it
    /// before proposing, so a rejected request does not even take a log index.
    pub fn check(&self, cmd: &Command) -> Result<(), RequestError> {
        match cmd {
            // A repeat is answered, not applied again.
            Command::Once { id, .. } if self.applied_requests.get(id).is_some() => Ok(()),
            Command::Once { command, .. } if matches!(**command, Command::Once { .. }) => {
                Err(RequestError::new(ErrorCode::InvalidArgument, "command: an identified command inside another"))
            }
            Command::Once { command, .. } => self.check(command),
            Command::CreateNamespace { name } => validate::name("name", name),
            Command::DeleteNamespace { name, cascade } => self.check_delete_namespace(name, *cascade),
            Command::CreateTopic { namespace, name, spec } => self.check_create_topic(namespace, name, spec),
            Command::UpdateTopic { namespace, name, update } => {
                validate::topic_update(self.topic(namespace, name)?, update).map(|_| ())
            }
            Command::DeleteTopic { namespace, name } => self.topic(namespace, name).map(|_| ()),
            Command::CreateConsumerGroup { namespace, name, spec } => self.check_create_group(namespace, name, spec),
            Command::DeleteConsumerGroup { namespace, name } | Command::UnbindConsumerGroup { namespace, name, .. } => {
                self.group_spec(namespace, name).map(|_| ())
            }
            Command::BindConsumerGroup { namespace, name, binding } => self.check_bind(namespace, name, binding),
            Command::UpdateConsumerGroup { namespace, name, spec, now_unix_ms } => {
                let updated = self.group_spec(namespace, name)?.updated(spec, *now_unix_ms);
                self.check_group_spec(namespace, &updated)
            }
            Command::SetNode { .. } | Command::RemoveNode { .. } | Command::SetDiskLow { .. } => Ok(()),
            Command::DecommissionNode { id, cancel } => self.check_decommission(*id, *cancel),
            Command::RotateSegments { .. } => Ok(()),
            Command::OpenSegment { namespace, topic, shard, replicas, min_insync, .. } => {
                self.check_open_segment(namespace, topic, *shard, replicas, *min_insync)
            }
            Command::CloseSegment { .. }
            | Command::SegmentDone { .. }
            | Command::SegmentLost { .. }
            | Command::SetSegmentReplicas { .. }
            | Command::DeleteSegments { .. } => self.check_segment_change(cmd),
            Command::CreateUser { name, password_hash, only_if_no_users, .. } => {
                self.check_create_user(name, password_hash, *only_if_no_users)
            }
            Command::DeleteUser { name } => {
                validate::user_name("name", name)?;
                self.user(name).map(|_| ())
            }
            Command::ChangePassword { name, password_hash } => {
                validate::user_name("name", name)?;
                validate::password_hash("password_hash", password_hash)?;
                self.user(name).map(|_| ())
            }
            Command::SetPermissions { user, namespace, .. } => {
                validate::user_name("user", user)?;
                self.user(user)?;
                validate::name("namespace", namespace)?;
                self.namespace(namespace).map(|_| ())
            }
            // Each group of a batch may have been deleted since: applying passes it over.
            Command::CommitOffsetsBatch { .. } => Ok(()),
            Command::AssignGroup { namespace, group, .. } | Command::CommitOffsets { namespace, group, .. } => {
                if self.group_runtime(namespace, group).is_some() {
                    Ok(())
                } else {
                    Err(RequestError::new(
                        ErrorCode::ConsumerGroupNotFound,
                        format!("consumer_group: {group:?} does not exist in namespace {namespace:?}"),
                    ))
                }
            }
        }
    }

    fn check_create_user(&self, name: &str, password_hash: &str, only_if_no_users: bool) -> Result<(), RequestError> {
        validate::user_name("name", name)?;
        validate::password_hash("password_hash", password_hash)?;
        if self.users.contains_key(name) {
            return Err(RequestError::new(ErrorCode::UserAlreadyExists, format!("name: user {name:?} already exists")));
        }
        if only_if_no_users && !self.users.is_empty() {
            return Err(RequestError::new(
                ErrorCode::UserAlreadyExists,
                format!(
                    "name: the bootstrap admin {name:?} is created only while the cluster has no user, and it has {}",
                    self.users.len()
                ),
            ));
        }
        Ok(())
    }

    /// The user `name`, or `UserNotFound`.
    pub fn user(&self, name: &str) -> Result<&User, RequestError> {
        self.users
            .get(name)
            .ok_or_else(|| RequestError::new(ErrorCode::UserNotFound, format!("user: {name:?} does not exist")))
    }

    fn check_delete_namespace(&self, name: &str, cascade: bool) -> Result<(), RequestError> {
        if name == DEFAULT_NAMESPACE {
            return Err(RequestError::new(
                ErrorCode::DefaultNamespaceUndeletable,
                "name: the \"default\" namespace cannot be deleted",
            ));
        }
        let ns = self.namespace(name)?;
        if !cascade && (!ns.topics.is_empty() || !ns.consumer_groups.is_empty()) {
            return Err(RequestError::new(
                ErrorCode::NamespaceNotEmpty,
                format!(
                    "name: namespace {name:?} still has {} topic(s) and {} consumer group(s); delete them first or ask to cascade",
                    ns.topics.len(),
                    ns.consumer_groups.len()
                ),
            ));
        }
        Ok(())
    }

    /// A repeated create of the same topic is accepted (idempotent), a different one
    /// refused.
    fn check_create_topic(&self, namespace: &str, name: &str, spec: &TopicSpec) -> Result<(), RequestError> {
        validate::name("name", name)?;
        validate::topic_spec(spec)?;
        match self.namespace(namespace)?.topics.get(name) {
            Some(existing) if existing.resolved() != spec.resolved() => Err(RequestError::new(
                ErrorCode::TopicAlreadyExists,
                format!(
                    "name: topic {name:?} already exists in namespace {namespace:?} with a different spec ({})",
                    describe_topic_diff(existing, spec)
                ),
            )),
            _ => Ok(()),
        }
    }

    fn group_spec(&self, namespace: &str, name: &str) -> Result<&ConsumerGroupSpec, RequestError> {
        self.namespace(namespace)?.consumer_groups.get(name).ok_or_else(|| {
            RequestError::new(
                ErrorCode::ConsumerGroupNotFound,
                format!("name: consumer group {name:?} does not exist in namespace {namespace:?}"),
            )
        })
    }

    /// The group and the topic must exist, and the group with the binding added must
    /// be a valid group (the binding's own rules, the bindings limit).
    fn check_bind(&self, namespace: &str, name: &str, binding: &BindingSpec) -> Result<(), RequestError> {
        let spec = self.group_spec(namespace, name)?;
        if spec.bindings.iter().any(|b| b.same_route(binding)) {
            return Ok(());
        }
        self.topic(namespace, &binding.topic)?;
        let mut bound = spec.clone();
        bound.bindings.push(binding.clone());
        validate::consumer_group_spec(&bound)
    }

    /// A valid group whose bound topics and dead-letter topic exist; a repeated create
    /// of the same group is accepted.
    fn check_create_group(&self, namespace: &str, name: &str, spec: &ConsumerGroupSpec) -> Result<(), RequestError> {
        validate::name("name", name)?;
        self.check_group_spec(namespace, spec)?;
        match self.namespace(namespace)?.consumer_groups.get(name) {
            Some(existing) if !existing.same_settings(spec) => Err(RequestError::new(
                ErrorCode::ConsumerGroupAlreadyExists,
                format!(
                    "name: consumer group {name:?} already exists in namespace {namespace:?} with other bindings or \
                     settings (update-consumer-group changes it in place)"
                ),
            )),
            _ => Ok(()),
        }
    }

    /// The spec's own rules, and every topic it names exists in the namespace.
    fn check_group_spec(&self, namespace: &str, spec: &ConsumerGroupSpec) -> Result<(), RequestError> {
        validate::consumer_group_spec(spec)?;
        let ns = self.namespace(namespace)?;
        let missing = |field: String, topic: &str| {
            RequestError::new(
                ErrorCode::TopicNotFound,
                format!("{field}: topic {topic:?} does not exist in namespace {namespace:?}"),
            )
        };
        if let Some((i, b)) = spec.bindings.iter().enumerate().find(|(_, b)| !ns.topics.contains_key(&b.topic)) {
            return Err(missing(format!("bindings[{i}].topic"), &b.topic));
        }
        let dead_letters = &spec.dead_letter_topic;
        if !dead_letters.is_empty() && !ns.topics.contains_key(dead_letters) {
            return Err(missing("dead_letter_topic".into(), dead_letters));
        }
        Ok(())
    }

    /// A shard gets one open segment at a time, on distinct nodes, at least as many as
    /// its in-sync copies.
    fn check_open_segment(
        &self,
        namespace: &str,
        topic: &str,
        shard: u32,
        replicas: &[NodeId],
        min_insync: u32,
    ) -> Result<(), RequestError> {
        let spec = self.topic(namespace, topic)?;
        let invalid = |msg: String| Err(RequestError::new(ErrorCode::InvalidArgument, msg));
        if shard >= spec.shards {
            let msg = format!("shard: {shard} is not below the topic's {} shards", spec.shards);
            return Err(RequestError::new(ErrorCode::InvalidShards, msg));
        }
        if replicas.is_empty() {
            return invalid("replicas: must not be empty".into());
        }
        if replicas.iter().enumerate().any(|(i, n)| replicas[..i].contains(n)) {
            return invalid("replicas: must be distinct nodes".into());
        }
        if replicas.len() < min_insync as usize {
            let msg = format!(
                "replicas: {} node(s), fewer than the {min_insync} in-sync copies the segment needs",
                replicas.len()
            );
            return Err(RequestError::new(ErrorCode::NotEnoughReplicas, msg));
        }
        if self.topic_segments(namespace, topic).any(|(_, s)| s.shard == shard && s.is_open()) {
            let msg = format!("shard: topic {topic:?} already has an open segment for shard {shard}");
            return Err(RequestError::new(ErrorCode::SegmentAlreadyOpen, msg));
        }
        Ok(())
    }

    /// A node the state knows; decommissioned only while the live nodes not being
    /// decommissioned besides it can hold every topic's replication factor (and at
    /// least one is left). Decommissioning again, or cancelling, is always fine.
    fn check_decommission(&self, id: NodeId, cancel: bool) -> Result<(), RequestError> {
        if !self.nodes.contains_key(&id) {
            let known: Vec<String> = self.nodes.keys().map(|n| n.to_string()).collect();
            return Err(RequestError::new(
                ErrorCode::NodeNotFound,
                format!("node_id: node {id} is not a member of the cluster (members: {})", known.join(", ")),
            ));
        }
        if cancel || self.draining.contains(&id) {
            return Ok(());
        }
        let left = self.group_nodes().filter(|n| *n != id).count();
        let widest = self
            .namespaces
            .iter()
            .flat_map(|(ns, n)| n.topics.iter().map(move |(t, spec)| (spec.replication_factor as usize, ns, t)))
            .max_by_key(|(rf, _, _)| *rf);
        let refuse = |need: String| {
            let draining = if self.draining.is_empty() {
                String::new()
            } else {
                let ids: Vec<String> = self.draining.iter().map(|n| n.to_string()).collect();
                format!(", besides nodes {} already being decommissioned", ids.join(", "))
            };
            Err(RequestError::new(
                ErrorCode::NotEnoughNodesLeft,
                format!("node_id: decommissioning node {id} would leave {left} live node(s){draining}; {need}; nothing was changed"),
            ))
        };
        match widest {
            _ if left == 0 => refuse("at least one must stay".into()),
            Some((rf, ns, t)) if left < rf => refuse(format!(
                "topic {ns}/{t} keeps {rf} copies of every message: add a node first, or lower its replication factor"
            )),
            _ => Ok(()),
        }
    }

    /// Closing an open segment, and what may change of a closed one.
    fn check_segment_change(&self, cmd: &Command) -> Result<(), RequestError> {
        let still_open =
            |id: &SegmentId| RequestError::new(ErrorCode::SegmentOpen, format!("id: segment {id} is still open"));
        match cmd {
            Command::CloseSegment { id, .. } => match self.segment(*id)? {
                s if s.is_open() => Ok(()),
                _ => Err(RequestError::new(ErrorCode::SegmentClosed, format!("id: segment {id} is already closed"))),
            },
            Command::SegmentDone { id, node, checksum, .. } => match self.segment(*id)? {
                s if !s.is_open() && !s.done.is_empty() && s.checksum != *checksum => Err(RequestError::new(
                    ErrorCode::ChecksumMismatch,
                    format!(
                        "checksum: node {node}'s copy of segment {id} has checksum {checksum:#010x}, the segment's is {:#010x}",
                        s.checksum
                    ),
                )),
                s if !s.is_open() => Ok(()),
                _ => Err(still_open(id)),
            },
            Command::SegmentLost { id, .. } => match self.segment(*id)? {
                s if !s.is_open() => Ok(()),
                _ => Err(still_open(id)),
            },
            Command::SetSegmentReplicas { id, replicas } => match self.segment(*id)? {
                _ if replicas.is_empty() => {
                    Err(RequestError::new(ErrorCode::InvalidArgument, "replicas: must not be empty"))
                }
                s if !s.is_open() => Ok(()),
                _ => Err(still_open(id)),
            },
            Command::DeleteSegments { ids } => ids.iter().try_for_each(|id| match self.segment(*id)? {
                s if s.is_open() => Err(RequestError::new(
                    ErrorCode::SegmentOpen,
                    format!("ids: segment {id} is open; open segments are never deleted"),
                )),
                _ => Ok(()),
            }),
            _ => Ok(()),
        }
    }

    pub fn segment(&self, id: SegmentId) -> Result<&SegmentRecord, RequestError> {
        self.segments.get(&id).ok_or_else(|| {
            RequestError::new(ErrorCode::SegmentNotFound, format!("segment_id: segment {id} does not exist"))
        })
    }

    /// The namespace called `name`, or NotFound naming it.
    pub fn namespace(&self, name: &str) -> Result<&Namespace, RequestError> {
        self.namespaces.get(name).ok_or_else(|| {
            RequestError::new(ErrorCode::NamespaceNotFound, format!("namespace: {name:?} does not exist"))
        })
    }

    pub fn topic(&self, namespace: &str, name: &str) -> Result<&TopicSpec, RequestError> {
        self.namespace(namespace)?.topics.get(name).ok_or_else(|| {
            RequestError::new(
                ErrorCode::TopicNotFound,
                format!("name: topic {name:?} does not exist in namespace {namespace:?}"),
            )
        })
    }
}

fn describe_topic_diff(a: &TopicSpec, b: &TopicSpec) -> String {
    let mut diffs = Vec::new();
    if a.shards != b.shards {
        diffs.push(format!("shards {} != {}", a.shards, b.shards));
    }
    if a.replication_factor != b.replication_factor {
        diffs.push(format!("replication_factor {} != {}", a.replication_factor, b.replication_factor));
    }
    if a.retention_ms != b.retention_ms {
        diffs.push(format!("retention {}ms != {}ms", a.retention_ms, b.retention_ms));
    }
    if a.min_insync() != b.min_insync() {
        diffs.push(format!("min_insync_replicas {} != {}", a.min_insync(), b.min_insync()));
    }
    if a.retention_bytes_max != b.retention_bytes_max {
        diffs.push(format!("retention_bytes_max {} != {}", a.retention_bytes_max, b.retention_bytes_max));
    }
    if a.segment_age_max_ms != b.segment_age_max_ms {
        diffs.push(format!("segment_age_max_ms {} != {}", a.segment_age_max_ms, b.segment_age_max_ms));
    }
    if a.retention_overrides_consumers != b.retention_overrides_consumers {
        diffs.push(format!(
            "retention_overrides_consumers {} != {}",
            a.retention_overrides_consumers, b.retention_overrides_consumers
        ));
    }
    if a.default_exchange_type != b.default_exchange_type {
        diffs.push(format!(
            "default_exchange_type {} != {}",
            a.default_exchange_type.as_str(),
            b.default_exchange_type.as_str()
        ));
    }
    diffs.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decommissioning_needs_a_known_node_and_enough_live_nodes_left_for_every_replication_factor() {
        let mut s = ClusterState::new_cluster();
        for id in 1..=4 {
            let record = NodeRecord { address: format!("n{id}:1"), state: NodeState::Alive };
            s.apply(&Command::SetNode { id, record }).unwrap();
        }
        let decommission = |id, cancel| Command::DecommissionNode { id, cancel };
        let e = s.apply(&decommission(9, false)).unwrap_err();
        assert_eq!(e.code, ErrorCode::NodeNotFound);
        assert!(e.message.starts_with("node_id: node 9 is not a member") && e.message.contains("1, 2, 3, 4"), "{e}");

        s.apply(&Command::CreateTopic { namespace: "default".into(), name: "t".into(), spec: topic(1) }).unwrap();
        s.apply(&decommission(4, false)).unwrap();
        s.apply(&decommission(4, false)).expect("again: a no-op");
        assert!(s.draining.contains(&4) && s.data_nodes().all(|n| n != 4) && s.group_nodes().all(|n| n != 4));
        // Three live nodes besides 4 were needed for RF 3: a second one is refused.
        let e = s.apply(&decommission(3, false)).unwrap_err();
        assert_eq!(e.code, ErrorCode::NotEnoughNodesLeft);
        assert!(e.message.contains("leave 2 live node(s), besides nodes 4") && e.message.contains("default/t"), "{e}");
        assert!(!s.draining.contains(&3), "nothing changed");
        // A dead node does not count as one left.
        s.apply(&Command::DecommissionNode { id: 4, cancel: true }).unwrap();
        let record = NodeRecord { address: "n2:1".into(), state: NodeState::Dead };
        s.apply(&Command::SetNode { id: 2, record }).unwrap();
        assert_eq!(s.apply(&decommission(4, false)).unwrap_err().code, ErrorCode::NotEnoughNodesLeft);
        // Without topics, one node must stay all the same.
        s.apply(&Command::DeleteTopic { namespace: "default".into(), name: "t".into() }).unwrap();
        s.apply(&decommission(4, false)).unwrap();
        s.apply(&decommission(3, false)).unwrap();
        let e = s.apply(&decommission(1, false)).unwrap_err();
        assert!(e.message.contains("at least one must stay"), "{e}");
        // Removing a node forgets its decommission.
        s.apply(&Command::RemoveNode { id: 4 }).unwrap();
        assert_eq!(s.draining.iter().copied().collect::<Vec<_>>(), [3]);
    }

    fn topic(shards: u32) -> TopicSpec {
        TopicSpec {
            shards,
            replication_factor: 3,
            retention_ms: 0,
            default_exchange_type: ExchangeType::Fanout,
            segment_size_max_bytes: 0,
            min_insync_replicas: 0,
            ..Default::default()
        }
    }

    fn create_topic(ns: &str, name: &str, spec: TopicSpec) -> Command {
        Command::CreateTopic { namespace: ns.into(), name: name.into(), spec }
    }

    /// Opens shard 0 of topic `t` in `default` on `replicas`, a majority in sync.
    fn open_segment_of_t(replicas: Vec<NodeId>) -> Command {
        let min_insync = (replicas.len() / 2 + 1) as u32;
        Command::OpenSegment {
            namespace: "default".into(),
            topic: "t".into(),
            shard: 0,
            replicas,
            now_unix_ms: 0,
            min_insync,
        }
    }

    #[test]
    fn a_lost_copy_leaves_done_but_stays_a_replica_until_it_is_done_again() {
        let mut s = ClusterState::new_cluster();
        s.apply(&create_topic("default", "t", topic(1))).unwrap();
        s.apply(&open_segment_of_t(vec![1, 2, 3])).unwrap();
        let id = *s.segments.keys().next().unwrap();
        let lost = Command::SegmentLost { id, node: 1 };
        assert_eq!(s.apply(&lost).unwrap_err().code, ErrorCode::SegmentOpen);
        let close =
            Command::CloseSegment { id, next_offset: 5, size_bytes: 9, checksum: 0, done: vec![], now_unix_ms: 1 };
        s.apply(&close).unwrap();
        for node in [1, 2] {
            s.apply(&Command::SegmentDone { id, node, size_bytes: 9, checksum: 7 }).unwrap();
        }
        s.apply(&lost).unwrap();
        s.apply(&lost).unwrap();
        assert_eq!((&s.segments[&id].done, &s.segments[&id].replicas), (&vec![2], &vec![1, 2, 3]));
        assert_eq!(s.segments[&id].checksum, 7, "the agreed checksum stays");
        s.apply(&Command::SegmentDone { id, node: 1, size_bytes: 9, checksum: 7 }).unwrap();
        assert_eq!(s.segments[&id].done, vec![2, 1]);
        let missing = Command::SegmentLost { id: id + 1, node: 1 };
        assert_eq!(s.apply(&missing).unwrap_err().code, ErrorCode::SegmentNotFound);
    }

    #[test]
    fn an_identified_write_applies_once_and_repeats_answer_as_the_first_did() {
        let mut s = ClusterState::new_cluster();
        s.apply(&create_topic("default", "t", topic(1))).unwrap();
        let once = |nonce, command| Command::Once { id: RequestId { node: 1, nonce }, command: Box::new(command) };
        let delete = Command::DeleteTopic { namespace: "default".into(), name: "t".into() };
        assert_eq!(s.apply_at(5, &once(1, delete.clone())), CommandResponse { index: 5, result: Ok(()) });
        // The retry after an unknown outcome: answered as the first attempt, not NotFound.
        assert!(s.check(&once(1, delete.clone())).is_ok());
        let before = s.clone();
        assert_eq!(s.apply_at(9, &once(1, delete.clone())), CommandResponse { index: 5, result: Ok(()) });
        assert_eq!(s, before, "a repeat changes nothing");
        assert_eq!(s.answered(&once(1, delete.clone())), Some(CommandResponse { index: 5, result: Ok(()) }));
        // Another write of the same command is a new request.
        let r = s.apply_at(10, &once(2, delete.clone()));
        assert_eq!((r.index, r.result.unwrap_err().code), (10, ErrorCode::TopicNotFound));
        assert_eq!(s.apply_at(11, &once(2, delete)).result.unwrap_err().code, ErrorCode::TopicNotFound, "as first");
        let nested = once(3, once(4, Command::CreateNamespace { name: "n".into() }));
        assert_eq!(s.check(&nested).unwrap_err().code, ErrorCode::InvalidArgument);
    }

    #[test]
    fn the_table_of_answers_is_bounded_and_survives_a_snapshot() {
        let mut s = ClusterState::new_cluster();
        let create = |nonce: u64| Command::Once {
            id: RequestId { node: 1, nonce },
            command: Box::new(Command::CreateNamespace { name: format!("n{}", nonce % 3) }),
        };
        let total = APPLIED_REQUESTS_MAX as u64 + 10;
        for nonce in 0..total {
            s.apply_at(nonce + 1, &create(nonce));
        }
        assert_eq!(s.applied_requests.len(), APPLIED_REQUESTS_MAX);
        assert_eq!(s.answered(&create(9)), None, "the oldest are forgotten");
        assert_eq!(s.answered(&create(10)).map(|r| r.index), Some(11));
        let json = serde_json::to_string(&s).unwrap();
        let back: ClusterState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        let mut again = back.clone();
        again.apply_at(total + 1, &create(total));
        assert_eq!(again.answered(&create(10)), None, "the same order after a snapshot");
        // A snapshot of a version without the table loads with an empty one.
        let mut old: serde_json::Value = serde_json::from_str(&json).unwrap();
        old.as_object_mut().unwrap().remove("applied_requests");
        let old: ClusterState = serde_json::from_value(old).unwrap();
        assert!(old.applied_requests.is_empty());
    }

    #[test]
    fn users_are_created_given_permissions_and_survive_a_snapshot() {
        let mut s = ClusterState::new_cluster();
        s.apply(&Command::CreateNamespace { name: "a".into() }).unwrap();
        use argon2::password_hash::{PasswordHasher, SaltString};
        let salt = SaltString::encode_b64(b"sixteen byte salt").unwrap();
        let hash = argon2::Argon2::default().hash_password(b"pw", &salt).unwrap().to_string();
        let create = |name: &str, only_if_no_users| Command::CreateUser {
            name: name.into(),
            password_hash: hash.clone(),
            admin: false,
            only_if_no_users,
        };
        s.apply(&create("admin", true)).unwrap();
        let e = s.apply(&create("second", true)).unwrap_err();
        assert_eq!(e.code, ErrorCode::UserAlreadyExists, "the bootstrap admin only into a cluster without users");
        s.apply(&create("bob", false)).unwrap();
        assert_eq!(s.apply(&create("bob", false)).unwrap_err().code, ErrorCode::UserAlreadyExists);
        let e = s.apply(&create("bad name", false)).unwrap_err();
        assert!(e.message.starts_with("name: \"bad name\" is not a valid user name"), "{}", e.message);
        let e = s
            .apply(&Command::CreateUser {
                name: "x".into(),
                password_hash: "plain".into(),
                admin: false,
                only_if_no_users: false,
            })
            .unwrap_err();
        assert!(e.message.starts_with("password_hash:"), "{}", e.message);
        let p = validate::permissions("^t", "^t", ".*").unwrap();
        let set = |user: &str, ns: &str| Command::SetPermissions {
            user: user.into(),
            namespace: ns.into(),
            permissions: Some(p.clone()),
        };
        s.apply(&set("bob", "a")).unwrap();
        assert_eq!(s.apply(&set("bob", "nope")).unwrap_err().code, ErrorCode::NamespaceNotFound);
        assert_eq!(s.apply(&set("carol", "a")).unwrap_err().code, ErrorCode::UserNotFound);
        assert_eq!(s.users["bob"].permissions["a"], p);
        let json = serde_json::to_string(&s).unwrap();
        assert!(!json.contains("\"pw\""));
        let back: ClusterState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        assert!(back.users["bob"].permissions["a"].read.matches("anything"), "patterns come back compiled");
        // A pattern that is not a regex never gets into the state.
        assert_eq!(validate::permissions("(", "", "").unwrap_err().code, ErrorCode::InvalidPermission);
        // A deleted namespace takes its permissions along; a deleted user is gone.
        s.apply(&Command::DeleteNamespace { name: "a".into(), cascade: true }).unwrap();
        assert!(s.users["bob"].permissions.is_empty());
        // A new password hash keeps the user's flag and permissions.
        let before = s.users["bob"].clone();
        let new_hash = argon2::Argon2::default()
            .hash_password(b"pw2", &SaltString::encode_b64(b"another salt....").unwrap())
            .unwrap()
            .to_string();
        let change = |name: &str, hash: &str| Command::ChangePassword { name: name.into(), password_hash: hash.into() };
        s.apply(&change("bob", &new_hash)).unwrap();
        assert_eq!(s.users["bob"].password_hash, new_hash);
        assert_eq!((s.users["bob"].admin, &s.users["bob"].permissions), (before.admin, &before.permissions));
        assert_eq!(s.apply(&change("carol", &new_hash)).unwrap_err().code, ErrorCode::UserNotFound);
        let e = s.apply(&change("bob", "plain")).unwrap_err();
        assert!(e.message.starts_with("password_hash:"), "{}", e.message);
        assert_eq!(s.users["bob"].password_hash, new_hash, "a refused change changes nothing");
        s.apply(&Command::DeleteUser { name: "bob".into() }).unwrap();
        assert_eq!(s.apply(&Command::DeleteUser { name: "bob".into() }).unwrap_err().code, ErrorCode::UserNotFound);
        assert!(!format!("{:?}", s.users["admin"]).contains("argon2"), "no hash in debug output");
        // A state without users serializes as before.
        assert!(!serde_json::to_string(&ClusterState::new_cluster()).unwrap().contains("users"));
    }

    #[test]
    fn new_cluster_has_the_default_namespace() {
        assert!(ClusterState::new_cluster().namespaces.contains_key(DEFAULT_NAMESPACE));
    }

    #[test]
    fn create_topic_is_idempotent_and_rejects_a_different_spec() {
        let mut s = ClusterState::new_cluster();
        s.apply(&create_topic("default", "t", topic(1))).unwrap();
        s.apply(&create_topic("default", "t", topic(1))).unwrap();
        let before = s.clone();
        let err = s.apply(&create_topic("default", "t", topic(2))).unwrap_err();
        assert_eq!(err.code, ErrorCode::TopicAlreadyExists);
        assert!(err.message.contains("shards 1 != 2"), "{}", err.message);
        assert_eq!(s, before, "a rejected command changes nothing");
    }

    #[test]
    fn topic_needs_an_existing_namespace_and_valid_fields() {
        let mut s = ClusterState::new_cluster();
        let before = s.clone();
        assert_eq!(s.apply(&create_topic("nope", "t", topic(1))).unwrap_err().code, ErrorCode::NamespaceNotFound);
        assert_eq!(s.apply(&create_topic("default", "bad name", topic(1))).unwrap_err().code, ErrorCode::InvalidName);
        assert_eq!(s.apply(&create_topic("default", "t", topic(0))).unwrap_err().code, ErrorCode::InvalidShards);
        assert_eq!(s.apply(&create_topic("default", "t", topic(1025))).unwrap_err().code, ErrorCode::InvalidShards);
        let rf8 = TopicSpec { replication_factor: 8, ..topic(1) };
        assert_eq!(s.apply(&create_topic("default", "t", rf8)).unwrap_err().code, ErrorCode::InvalidReplicationFactor);
        assert_eq!(s, before);
    }

    #[test]
    fn update_topic_changes_mutable_fields_only() {
        let mut s = ClusterState::new_cluster();
        s.apply(&create_topic("default", "t", topic(2))).unwrap();
        let update = |u: TopicUpdate| Command::UpdateTopic { namespace: "default".into(), name: "t".into(), update: u };
        let err = s.apply(&update(TopicUpdate { replication_factor: Some(1), ..Default::default() })).unwrap_err();
        assert_eq!(err.code, ErrorCode::ImmutableField);
        assert!(err.message.starts_with("replication_factor:"), "{}", err.message);
        let err = s.apply(&update(TopicUpdate { shards: Some(1), ..Default::default() })).unwrap_err();
        assert_eq!(err.code, ErrorCode::ShardsDecrease);
        // Same replication factor is fine; shards up, retention and exchange type change.
        s.apply(&update(TopicUpdate {
            shards: Some(4),
            replication_factor: Some(3),
            retention_ms: Some(60_000),
            default_exchange_type: Some(ExchangeType::Topic),
            min_insync_replicas: Some(3),
            retention_bytes_max: Some(1 << 20),
            segment_age_max_ms: Some(30_000),
            retention_overrides_consumers: Some(true),
            shard_key: Some(ShardKey::None),
        }))
        .unwrap();
        let t = &s.namespaces["default"].topics["t"];
        assert_eq!((t.shards, t.retention_ms, t.default_exchange_type), (4, 60_000, ExchangeType::Topic));
        assert_eq!(
            (t.retention_bytes_max, t.segment_age_max_ms, t.retention_overrides_consumers),
            (1 << 20, 30_000, true)
        );
        assert_eq!((t.min_insync_replicas, t.shard_key), (3, ShardKey::None));
        let err = s.apply(&update(TopicUpdate { min_insync_replicas: Some(4), ..Default::default() })).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidMinInsyncReplicas);
        assert!(err.message.starts_with("min_insync_replicas: 4 is above the replication factor 3"), "{}", err.message);
        s.apply(&update(TopicUpdate { min_insync_replicas: Some(0), ..Default::default() })).unwrap();
        assert_eq!(s.namespaces["default"].topics["t"].min_insync_replicas, 2, "0 is a majority");
    }

    #[test]
    fn namespaces_default_is_protected_and_non_empty_needs_cascade() {
        let mut s = ClusterState::new_cluster();
        let del = |name: &str, cascade| Command::DeleteNamespace { name: name.into(), cascade };
        assert_eq!(s.apply(&del("default", true)).unwrap_err().code, ErrorCode::DefaultNamespaceUndeletable);
        s.apply(&Command::CreateNamespace { name: "ns".into() }).unwrap();
        s.apply(&create_topic("ns", "t", topic(1))).unwrap();
        assert_eq!(s.apply(&del("ns", false)).unwrap_err().code, ErrorCode::NamespaceNotEmpty);
        s.apply(&del("ns", true)).unwrap();
        assert!(!s.namespaces.contains_key("ns"));
        assert_eq!(s.apply(&del("ns", true)).unwrap_err().code, ErrorCode::NamespaceNotFound);
    }

    #[test]
    fn consumer_groups_bind_existing_topics_with_valid_bindings() {
        let mut s = ClusterState::new_cluster();
        s.apply(&create_topic("default", "t", topic(1))).unwrap();
        let binding = |exchange_type, key: &str| BindingSpec {
            topic: "t".into(),
            exchange_type,
            routing_key: key.into(),
            headers: Default::default(),
            headers_match: HeadersMatch::All,
            since_unix_ms: 0,
        };
        let group =
            |bindings, since_unix_ms| ConsumerGroupSpec { bindings, size: 100, since_unix_ms, ..Default::default() };
        let create = |spec| Command::CreateConsumerGroup { namespace: "default".into(), name: "g".into(), spec };

        let err = s.apply(&create(group(vec![binding(ExchangeType::Direct, "")], 0))).unwrap_err();
        assert!(err.message.starts_with("bindings[0].routing_key:"), "{}", err.message);
        let err = s.apply(&create(group(vec![binding(ExchangeType::Topic, "a.b*")], 0))).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidBinding);
        let mut missing = binding(ExchangeType::Fanout, "");
        missing.topic = "missing".into();
        assert_eq!(s.apply(&create(group(vec![missing], 0))).unwrap_err().code, ErrorCode::TopicNotFound);

        s.apply(&create(group(vec![binding(ExchangeType::Topic, "a.*.#")], 1))).unwrap();
        // Repeating with another `since` is still the same group.
        s.apply(&create(group(vec![binding(ExchangeType::Topic, "a.*.#")], 2))).unwrap();
        let err = s.apply(&create(group(vec![binding(ExchangeType::Fanout, "")], 1))).unwrap_err();
        assert_eq!(err.code, ErrorCode::ConsumerGroupAlreadyExists);

        // AMQP's queue.bind / queue.unbind on the running group.
        let bind =
            |name: &str, b| Command::BindConsumerGroup { namespace: "default".into(), name: name.into(), binding: b };
        let unbind = |b| Command::UnbindConsumerGroup { namespace: "default".into(), name: "g".into(), binding: b };
        let later = BindingSpec { since_unix_ms: 5, ..binding(ExchangeType::Direct, "k") };
        assert_eq!(s.apply(&bind("nope", later.clone())).unwrap_err().code, ErrorCode::ConsumerGroupNotFound);
        let err = s.apply(&bind("g", binding(ExchangeType::Direct, ""))).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidBinding, "a bound group is checked as a created one");
        s.apply(&bind("g", later.clone())).unwrap();
        s.apply(&bind("g", BindingSpec { since_unix_ms: 9, ..later.clone() })).unwrap();
        let bindings = |s: &ClusterState| s.namespaces["default"].consumer_groups["g"].bindings.clone();
        assert_eq!(
            bindings(&s),
            [binding(ExchangeType::Topic, "a.*.#"), later.clone()],
            "bound once, first since kept"
        );
        s.apply(&unbind(binding(ExchangeType::Direct, "k"))).unwrap();
        assert_eq!(bindings(&s), [binding(ExchangeType::Topic, "a.*.#")], "unbound whatever its since");
        s.apply(&unbind(binding(ExchangeType::Direct, "k"))).unwrap();
    }

    #[test]
    fn a_batch_of_commits_moves_each_group_forward_and_passes_over_a_deleted_one() {
        let mut s = ClusterState::new_cluster();
        s.apply(&create_topic("default", "t", topic(1))).unwrap();
        for g in ["a", "b"] {
            let spec = ConsumerGroupSpec { bindings: vec![BindingSpec::fanout("t")], size: 10, ..Default::default() };
            s.apply(&Command::CreateConsumerGroup { namespace: "default".into(), name: g.into(), spec }).unwrap();
        }
        s.apply(&open_segment_of_t(vec![1])).unwrap();
        let seg = *s.segments.keys().next().unwrap();
        let commit = |group: &str, offset| GroupOffsets {
            namespace: "default".into(),
            group: group.into(),
            offsets: BTreeMap::from([(seg, offset)]),
            handed_out: BTreeMap::from([(seg, offset + 1)]),
        };
        let batch = Command::CommitOffsetsBatch { commits: vec![commit("a", 5), commit("gone", 7), commit("b", 9)] };
        s.apply(&batch).unwrap();
        let back = Command::CommitOffsetsBatch { commits: vec![commit("a", 2)] };
        s.apply(&back).unwrap();
        let runtime = |g: &str| s.group_runtime("default", g).cloned().unwrap();
        assert_eq!((runtime("a").offsets[&seg], runtime("a").handed_out[&seg]), (5, 6), "never back");
        assert_eq!((runtime("b").offsets[&seg], runtime("b").handed_out[&seg]), (9, 10));
        assert!(s.group_runtime("default", "gone").is_none());
    }

    #[test]
    fn a_group_updated_in_place_keeps_its_offsets_and_old_bindings_their_start() {
        let mut s = ClusterState::new_cluster();
        for t in ["t", "u", "dead"] {
            s.apply(&create_topic("default", t, topic(1))).unwrap();
        }
        let old = BindingSpec { since_unix_ms: 3, ..BindingSpec::fanout("t") };
        let spec = ConsumerGroupSpec { bindings: vec![old.clone()], size: 10, since_unix_ms: 1, ..Default::default() };
        s.apply(&Command::CreateConsumerGroup { namespace: "default".into(), name: "g".into(), spec }).unwrap();
        use std::collections::BTreeMap;
        s.apply(&open_segment_of_t(vec![1])).unwrap();
        let offsets = BTreeMap::from([(*s.segments.keys().next().unwrap(), 5)]);
        let commit = Command::CommitOffsets {
            namespace: "default".into(),
            group: "g".into(),
            offsets: offsets.clone(),
            handed_out: BTreeMap::new(),
        };
        s.apply(&commit).unwrap();
        let update = |name: &str, spec| Command::UpdateConsumerGroup {
            namespace: "default".into(),
            name: name.into(),
            spec,
            now_unix_ms: 100,
        };
        let wanted = ConsumerGroupSpec {
            bindings: vec![BindingSpec::fanout("t"), BindingSpec::fanout("u")],
            size: 20,
            since_unix_ms: 99,
            ack_timeout_ms: 5_000,
            deliveries_max: 3,
            dead_letter_topic: "dead".into(),
            message_ttl_ms: 60_000,
            ready_messages_max: 20,
            exclusive_owner: None,
            dead_letter_routing_key: String::new(),
            ready_bytes_max: 1 << 20,
        };
        assert_eq!(s.apply(&update("nope", wanted.clone())).unwrap_err().code, ErrorCode::ConsumerGroupNotFound);
        let too_long = ConsumerGroupSpec { ready_messages_max: 21, ..wanted.clone() };
        let err = s.apply(&update("g", too_long)).unwrap_err();
        assert!(err.message.starts_with("ready_messages_max: 21 is more than size (20)"), "{}", err.message);
        let key = ConsumerGroupSpec {
            dead_letter_routing_key: "k".into(),
            dead_letter_topic: String::new(),
            ..wanted.clone()
        };
        let err = s.apply(&update("g", key)).unwrap_err();
        assert!(err.message.starts_with("dead_letter_routing_key: needs dead_letter_topic"), "{}", err.message);
        let ttl = ConsumerGroupSpec { message_ttl_ms: 1 << 32, ..wanted.clone() };
        let err = s.apply(&update("g", ttl)).unwrap_err();
        assert!(err.message.starts_with("message_ttl_ms: 4294967296 is out of range"), "{}", err.message);
        let looping = ConsumerGroupSpec { dead_letter_topic: "u".into(), ..wanted.clone() };
        let err = s.apply(&update("g", looping)).unwrap_err();
        assert!(err.message.starts_with("dead_letter_topic:"), "{}", err.message);
        // A routing key of their own does not help when a fanout binding takes them.
        let keyed =
            ConsumerGroupSpec { dead_letter_topic: "u".into(), dead_letter_routing_key: "k".into(), ..wanted.clone() };
        let err = s.apply(&update("g", keyed)).unwrap_err();
        assert!(err.message.starts_with("dead_letter_topic:"), "{}", err.message);
        let missing = ConsumerGroupSpec { dead_letter_topic: "gone".into(), ..wanted.clone() };
        assert_eq!(s.apply(&update("g", missing)).unwrap_err().code, ErrorCode::TopicNotFound);
        assert_eq!(s.namespaces["default"].consumer_groups["g"].size, 10, "a refused update changes nothing");

        s.apply(&update("g", wanted.clone())).unwrap();
        let g = &s.namespaces["default"].consumer_groups["g"];
        let new = BindingSpec { since_unix_ms: 100, ..BindingSpec::fanout("u") };
        assert_eq!(g.bindings, [old, new], "the old binding keeps its start; the new one starts now");
        assert_eq!((g.size, g.since_unix_ms, g.ack_timeout_ms, g.deliveries_max), (20, 1, 5_000, 3));
        assert_eq!((g.dead_letter_topic.as_str(), g.message_ttl_ms, g.ready_messages_max), ("dead", 60_000, 20));
        assert_eq!(g.ready_bytes_max, 1 << 20);
        assert_eq!(s.group_runtime("default", "g").unwrap().offsets, offsets, "offsets kept");
        // Created again with the old settings: it exists with others now.
        let again = ConsumerGroupSpec { bindings: vec![BindingSpec::fanout("t")], size: 10, ..Default::default() };
        let create = Command::CreateConsumerGroup { namespace: "default".into(), name: "g".into(), spec: again };
        assert_eq!(s.apply(&create).unwrap_err().code, ErrorCode::ConsumerGroupAlreadyExists);
    }

    #[test]
    fn names_follow_the_rules() {
        assert!(validate::name("name", "a.b_c-D9").is_ok());
        assert!(validate::name("name", &"x".repeat(249)).is_ok());
        assert!(validate::name("name", &"x".repeat(250)).is_err());
        assert!(validate::name("name", "").is_err());
        assert!(validate::name("name", "sp ace").is_err());
        assert!(validate::name("name", "slash/").is_err());
    }

    #[test]
    fn durations_parse() {
        assert_eq!(validate::duration_ms("retention", "0").unwrap(), 0);
        assert_eq!(validate::duration_ms("retention", "24h").unwrap(), 86_400_000);
        assert_eq!(validate::duration_ms("retention", "7d").unwrap(), 7 * 86_400_000);
        assert!(validate::duration_ms("retention", "forever").unwrap_err().message.starts_with("retention:"));
    }
}
