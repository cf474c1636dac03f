//! Admin subcommands: each builds one request, prints the answer, and maps errors.

use eventtermq_proto::v1 as pb;
use eventtermq_proto::v1::admin_client::AdminClient;

use super::args::{Command, GroupArgs, ListArgs, Output};
use super::render;
use super::{admin_client_as, CliError, Ctx};
use eventtermq_broker::cluster_state::validate;

fn usage(e: eventtermq_broker::error::RequestError) -> CliError {
    CliError::Usage(e.message)
}

fn duration(field: &str, v: &str) -> Result<Option<prost_types::Duration>, CliError> {
    let ms = validate::duration_ms(field, v).map_err(usage)?;
    Ok(eventtermq_broker::api::convert::ms_to_duration(ms))
}

/// `-1h` (in the past), `+1h`/`1h` (in the future), or an RFC 3339 time.
fn since(v: &str) -> Result<prost_types::Timestamp, CliError> {
    let ms = since_unix_ms(v, eventtermq_broker::clock::system_unix_ms()).ok_or_else(|| {
        CliError::Usage(format!(
            "--since: {v:?} is neither a duration into the past (1h, 30m, 2d; -1h too), an RFC 3339 time \
             (2026-12-05T10:00:00Z) nor Unix seconds (1764928800)"
        ))
    })?;
    Ok(eventtermq_broker::api::convert::ms_to_timestamp(ms))
}

/// `--since` as Unix milliseconds at `now_ms`: a duration means that long ago (with or
/// without a leading `-`, as `docker logs --since 1h` and `kubectl logs --since=1h`),
/// digits alone are Unix seconds, else an RFC 3339 time.
fn since_unix_ms(v: &str, now_ms: i64) -> Option<i64> {
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        return v.parse::<i64>().ok()?.checked_mul(1000);
    }
    if let Ok(t) = humantime::parse_rfc3339_weak(v) {
        return t.duration_since(std::time::UNIX_EPOCH).ok().map(|d| d.as_millis() as i64);
    }
    let ago = validate::duration_ms("since", v.strip_prefix('-').unwrap_or(v)).ok()?;
    Some(now_ms.saturating_sub(i64::try_from(ago).ok()?))
}

fn split_pair<'a>(flag: &str, v: &'a str) -> Result<(&'a str, &'a str), CliError> {
    v.split_once(':')
        .filter(|(t, k)| !t.is_empty() && !k.is_empty())
        .ok_or_else(|| CliError::Usage(format!("{flag}: {v:?} must look like TOPIC:VALUE")))
}

fn header_binding(v: &str) -> Result<pb::Binding, CliError> {
    let (topic, rest) = split_pair("--bind-headers", v)?;
    let (pairs, mode) = match rest.rsplit_once(':') {
        Some((p, m)) if m == "all" || m == "any" => (p, m),
        _ => (rest, "all"),
    };
    let mut headers = std::collections::HashMap::new();
    for kv in pairs.split(',') {
        let (k, val) = kv
            .split_once('=')
            .ok_or_else(|| CliError::Usage(format!("--bind-headers: {kv:?} must look like key=value")))?;
        headers.insert(k.to_string(), val.to_string());
    }
    Ok(pb::Binding {
        topic: topic.to_string(),
        exchange_type: "headers".into(),
        routing_key: String::new(),
        headers,
        headers_match: mode.to_string(),
    })
}

/// The group `create-consumer-group` or `update-consumer-group` asks for.
fn consumer_group(args: GroupArgs) -> Result<pb::ConsumerGroup, CliError> {
    Ok(pb::ConsumerGroup {
        bindings: bindings(&args.bind, &args.bind_direct, &args.bind_topic, &args.bind_headers)?,
        since: args.since.as_deref().map(since).transpose()?,
        name: args.name,
        size: args.size,
        ack_timeout_ms: args.ack_timeout_ms,
        deliveries_max: args.deliveries_max,
        dead_letter_topic: args.dead_letter_topic,
        message_ttl_ms: args.message_ttl_ms,
        ready_messages_max: args.ready_messages_max,
        ready_bytes_max: args.ready_bytes_max,
        dead_letter_routing_key: args.dead_letter_routing_key,
        ..Default::default()
    })
}

/// A new user's password from the first line of stdin (`create-user` without
/// `--user-password-file`).
fn password_from_stdin() -> Result<String, CliError> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| CliError::Usage(format!("create-user: cannot read the password from stdin: {e}")))?;
    let password = line.trim_end().to_string();
    eventtermq_broker::cluster_state::validate::password("password (stdin)", &password)
        .map_err(|e| CliError::Usage(e.message))?;
    Ok(password)
}

pub async fn execute(ctx: &Ctx, cmd: Command) -> Result<(), CliError> {
    let mut admin = Admin { client: admin_client_as(&ctx.addr, ctx.tls.as_ref(), &ctx.credentials)?, ctx };
    match cmd {
        Command::Dump { stale, only_namespace, prefix } => {
            let req = pb::DumpRequest { stale, namespace: only_namespace.unwrap_or_default(), prefix };
            admin.dump(req).await?
        }
        Command::CreateNamespace { name } => admin.create_namespace(name).await?,
        Command::DeleteNamespace { name, cascade } => admin.delete_namespace(name, cascade).await?,
        Command::ListNamespaces => admin.list_namespaces().await?,
        Command::CreateTopic {
            name,
            shards,
            replication_factor,
            retention,
            default_exchange_type,
            segment_size_max_bytes,
            min_insync_replicas,
            retention_limits,
        } => {
            let topic = pb::Topic {
                name,
                shards,
                replication_factor,
                retention: duration("retention", &retention)?,
                default_exchange_type,
                under_replicated: false,
                segment_size_max_bytes,
                min_insync_replicas,
                retention_bytes_max: retention_limits.retention_bytes_max,
                segment_age_max_ms: retention_limits.segment_age_max_ms,
                retention_overrides_consumers: retention_limits.retention_overrides_consumers,
                shard_key: retention_limits.shard_key,
                retained_bytes: 0,
                retained_since: None,
            };
            admin.create_topic(topic).await?
        }
        Command::UpdateTopic {
            name,
            shards,
            replication_factor,
            retention,
            default_exchange_type,
            min_insync_replicas,
            retention_bytes_max,
            segment_age_max_ms,
            retention_overrides_consumers,
            shard_key,
        } => {
            let retention = retention.map(|r| duration("retention", &r)).transpose()?.flatten();
            let req = pb::UpdateTopicRequest {
                namespace: ctx.namespace.clone(),
                name,
                shards,
                replication_factor,
                retention,
                default_exchange_type,
                min_insync_replicas,
                retention_bytes_max,
                segment_age_max_ms,
                retention_overrides_consumers,
                shard_key,
            };
            admin.update_topic(req).await?
        }
        Command::DeleteTopic { name } => admin.delete_topic(name).await?,
        Command::ListTopics(list) => admin.list_topics(list).await?,
        Command::CreateConsumerGroup(args) => admin.create_consumer_group(consumer_group(args)?).await?,
        Command::UpdateConsumerGroup(args) => admin.update_consumer_group(consumer_group(args)?).await?,
        Command::DeleteConsumerGroup { name } => admin.delete_consumer_group(name).await?,
        Command::PurgeConsumerGroup { name } => admin.purge_consumer_group(name).await?,
        Command::ListConsumerGroups(list) => admin.list_consumer_groups(list).await?,
        Command::Stats { groups, watch, watch_count } => admin.stats(groups, watch, watch_count).await?,
        Command::Publish(args) => super::messages::publish(ctx, args).await?,
        Command::Subscribe(args) => super::messages::subscribe(ctx, args).await?,
        Command::CreateUser { name, user_password_file, admin: is_admin } => {
            let password = match user_password_file {
                Some(f) => {
                    eventtermq_broker::auth::read_password_file("--user-password-file", &f).map_err(CliError::Usage)?
                }
                None => password_from_stdin()?,
            };
            admin.create_user(pb::CreateUserRequest { name, password, admin: is_admin }).await?
        }
        Command::DeleteUser { name } => admin.delete_user(name).await?,
        Command::ChangePassword { name, user_password_file } => {
            let password = match user_password_file {
                Some(f) => {
                    eventtermq_broker::auth::read_password_file("--user-password-file", &f).map_err(CliError::Usage)?
                }
                None => password_from_stdin()?,
            };
            admin.change_password(pb::ChangePasswordRequest { name, password }).await?
        }
        Command::SetPermissions { user, configure, write, read, clear } => {
            let req = pb::SetPermissionsRequest {
                user,
                namespace: ctx.namespace.clone(),
                permissions: (!clear).then_some(pb::Permissions { configure, write, read }),
                clear,
            };
            admin.set_permissions(req).await?
        }
        Command::ListUsers => admin.list_users().await?,
        Command::ListNodes { stale } => admin.list_nodes(stale).await?,
        Command::DecommissionNode { node_id, cancel } => {
            if node_id == 0 {
                return Err(CliError::Usage("NODE_ID: must be a node's id (list-nodes shows them), not 0".into()));
            }
            admin.decommission_node(node_id, cancel).await?
        }
        Command::TransferLeadership { to } => admin.transfer_leadership(to).await?,
        Command::Rebalance => admin.rebalance().await?,
        Command::Bench(b) => super::bench::run(ctx, b).await?,
        Command::Load(l) => super::load::run(ctx, l).await?,
    }
    Ok(())
}

/// The bindings of `create-consumer-group`'s `--bind`, `--bind-direct`, `--bind-topic`
/// and `--bind-headers`, in that order.
fn bindings(
    bind: &[String],
    bind_direct: &[String],
    bind_topic: &[String],
    bind_headers: &[String],
) -> Result<Vec<pb::Binding>, CliError> {
    let mut bindings: Vec<pb::Binding> =
        bind.iter().map(|t| pb::Binding { topic: t.clone(), ..Default::default() }).collect();
    for (flag, kind, values) in [("--bind-direct", "direct", bind_direct), ("--bind-topic", "topic", bind_topic)] {
        for v in values {
            let (topic, key) = split_pair(flag, v)?;
            bindings.push(pb::Binding {
                topic: topic.into(),
                exchange_type: kind.into(),
                routing_key: key.into(),
                ..Default::default()
            });
        }
    }
    for v in bind_headers {
        bindings.push(header_binding(v)?);
    }
    Ok(bindings)
}

/// One node's Admin service, with one method per resource and verb: each sends one
/// request and prints the answer.
struct Admin<'a> {
    client: AdminClient<crate::Authed>,
    ctx: &'a Ctx,
}

impl Admin<'_> {
    /// The answer to a call, or its status as the CLI's error.
    fn answer<T>(&self, r: Result<tonic::Response<T>, tonic::Status>) -> Result<T, CliError> {
        r.map(tonic::Response::into_inner).map_err(|s| CliError::from_status(s, &self.ctx.addr))
    }

    /// Prints the answer to a write.
    fn written(&self, r: Result<tonic::Response<pb::WriteResponse>, tonic::Status>) -> Result<(), CliError> {
        // The seed page's output; `ok` is always true on the wire (an error is a status).
        println!("{{\"ok\": true, \"index\": {}}}", self.answer(r)?.index);
        Ok(())
    }

    fn namespace(&self) -> String {
        self.ctx.namespace.clone()
    }

    async fn dump(&mut self, req: pb::DumpRequest) -> Result<(), CliError> {
        let r = self.client.dump(req).await;
        let r = self.answer(r)?;
        match self.ctx.output {
            Output::Text => print!("{}", render::dump_text(&r)),
            Output::Json => println!("{}", render::dump_json(&r)),
        }
        Ok(())
    }

    async fn create_user(&mut self, req: pb::CreateUserRequest) -> Result<(), CliError> {
        let r = self.client.create_user(req).await;
        self.written(r)
    }

    async fn delete_user(&mut self, name: String) -> Result<(), CliError> {
        let r = self.client.delete_user(pb::DeleteUserRequest { name }).await;
        self.written(r)
    }

    async fn change_password(&mut self, req: pb::ChangePasswordRequest) -> Result<(), CliError> {
        let r = self.client.change_password(req).await;
        self.written(r)
    }

    async fn set_permissions(&mut self, req: pb::SetPermissionsRequest) -> Result<(), CliError> {
        let r = self.client.set_permissions(req).await;
        self.written(r)
    }

    async fn list_users(&mut self) -> Result<(), CliError> {
        let r = self.client.list_users(pb::ListUsersRequest { stale: false }).await;
        let r = self.answer(r)?;
        match self.ctx.output {
            Output::Text => print!("{}", render::users_text(&r.users)),
            Output::Json => println!("{}", render::users_json(&r)),
        }
        Ok(())
    }

    async fn list_nodes(&mut self, stale: bool) -> Result<(), CliError> {
        let r = self.client.list_nodes(pb::ListNodesRequest { stale }).await;
        let r = self.answer(r)?;
        match self.ctx.output {
            Output::Text => print!("{}", render::nodes_text(&r)),
            Output::Json => println!("{}", render::nodes_json(&r)),
        }
        Ok(())
    }

    async fn decommission_node(&mut self, node_id: u64, cancel: bool) -> Result<(), CliError> {
        let r = self.client.decommission_node(pb::DecommissionNodeRequest { node_id, cancel }).await;
        self.written(r)
    }

    async fn rebalance(&mut self) -> Result<(), CliError> {
        let r = self.client.rebalance(pb::RebalanceRequest {}).await;
        let r = self.answer(r)?;
        let out = serde_json::json!({
            "ok": true,
            "index": r.index,
            "consumer_groups_moved": r.consumer_groups_moved,
            "segments_rotated": r.segments_rotated,
        });
        println!("{out}");
        Ok(())
    }

    async fn transfer_leadership(&mut self, to: Option<u64>) -> Result<(), CliError> {
        if to == Some(0) {
            return Err(CliError::Usage("--to: must be a node's id (list-nodes shows them), not 0".into()));
        }
        let req = pb::TransferLeadershipRequest { to_node_id: to.unwrap_or(0) };
        let r = self.client.transfer_leadership(req).await;
        let r = self.answer(r)?;
        println!("{}", serde_json::json!({"ok": true, "leader_id": r.leader_id}));
        Ok(())
    }

    async fn create_namespace(&mut self, name: String) -> Result<(), CliError> {
        let r = self.client.create_namespace(pb::CreateNamespaceRequest { name }).await;
        self.written(r)
    }

    async fn delete_namespace(&mut self, name: String, cascade: bool) -> Result<(), CliError> {
        let r = self.client.delete_namespace(pb::DeleteNamespaceRequest { name, cascade }).await;
        self.written(r)
    }

    async fn list_namespaces(&mut self) -> Result<(), CliError> {
        let r = self.client.list_namespaces(pb::ListNamespacesRequest { stale: false }).await;
        let r = self.answer(r)?;
        match self.ctx.output {
            Output::Text => r.namespaces.iter().for_each(|n| println!("{n}")),
            Output::Json => println!("{}", serde_json::json!({"namespaces": r.namespaces, "index": r.index})),
        }
        Ok(())
    }

    async fn create_topic(&mut self, topic: pb::Topic) -> Result<(), CliError> {
        let req = pb::CreateTopicRequest { namespace: self.namespace(), topic: Some(topic) };
        let r = self.client.create_topic(req).await;
        self.written(r)
    }

    async fn update_topic(&mut self, req: pb::UpdateTopicRequest) -> Result<(), CliError> {
        let r = self.client.update_topic(req).await;
        self.written(r)
    }

    async fn delete_topic(&mut self, name: String) -> Result<(), CliError> {
        let r = self.client.delete_topic(pb::DeleteTopicRequest { namespace: self.namespace(), name }).await;
        self.written(r)
    }

    async fn list_topics(&mut self, list: ListArgs) -> Result<(), CliError> {
        let req = pb::ListTopicsRequest {
            namespace: self.namespace(),
            stale: false,
            prefix: list.prefix,
            page_size: list.page_size,
            page_token: list.page_token,
        };
        let r = self.client.list_topics(req).await;
        let r = self.answer(r)?;
        self.print_listed(
            "topics",
            r.topics.iter().map(render::topic_line),
            r.topics.iter().map(render::topic_json),
            r.index,
            &r.next_page_token,
        );
        Ok(())
    }

    /// A listing: one line per item as text (and the next page's token on stderr), or
    /// `{"<key>": [items], "index": N}` (with `"next_page_token"` when a page follows).
    fn print_listed(
        &self,
        key: &str,
        lines: impl Iterator<Item = String>,
        items: impl Iterator<Item = serde_json::Value>,
        index: u64,
        next_page_token: &str,
    ) {
        match self.ctx.output {
            Output::Text => {
                lines.for_each(|l| println!("{l}"));
                if !next_page_token.is_empty() {
                    eprintln!("more follow: --page-token {next_page_token}");
                }
            }
            Output::Json => {
                let mut out = serde_json::json!({key: items.collect::<Vec<_>>(), "index": index});
                if !next_page_token.is_empty() {
                    out["next_page_token"] = next_page_token.into();
                }
                println!("{out}")
            }
        }
    }

    async fn create_consumer_group(&mut self, group: pb::ConsumerGroup) -> Result<(), CliError> {
        let req = pb::CreateConsumerGroupRequest { namespace: self.namespace(), consumer_group: Some(group) };
        let r = self.client.create_consumer_group(req).await;
        self.written(r)
    }

    async fn update_consumer_group(&mut self, group: pb::ConsumerGroup) -> Result<(), CliError> {
        let req = pb::UpdateConsumerGroupRequest { namespace: self.namespace(), consumer_group: Some(group) };
        let r = self.client.update_consumer_group(req).await;
        self.written(r)
    }

    async fn delete_consumer_group(&mut self, name: String) -> Result<(), CliError> {
        let req = pb::DeleteConsumerGroupRequest { namespace: self.namespace(), name };
        let r = self.client.delete_consumer_group(req).await;
        self.written(r)
    }

    async fn purge_consumer_group(&mut self, name: String) -> Result<(), CliError> {
        let req = pb::PurgeConsumerGroupRequest { namespace: self.namespace(), name };
        let r = self.client.purge_consumer_group(req).await;
        // As `publish` prints what it did: `{"ok": true, "published": N}`.
        println!("{{\"ok\": true, \"purged\": {}}}", self.answer(r)?.purged);
        Ok(())
    }

    async fn list_consumer_groups(&mut self, list: ListArgs) -> Result<(), CliError> {
        let whole = list.prefix.is_empty() && list.page_size == 0 && list.page_token.is_empty();
        let req = pb::ListConsumerGroupsRequest {
            namespace: self.namespace(),
            stale: false,
            prefix: list.prefix,
            page_size: list.page_size,
            page_token: list.page_token,
        };
        let r = self.client.list_consumer_groups(req).await;
        let r = self.answer(r)?;
        // The lag, from the nodes running the groups (those listed: all, or the page's);
        // a group whose node did not answer is listed without it.
        let names = if whole { Vec::new() } else { r.consumer_groups.iter().map(|g| g.name.clone()).collect() };
        let lags: std::collections::HashMap<String, u64> = match (!whole && names.is_empty()).then_some(()) {
            Some(()) => Default::default(), // an empty page: nothing to ask
            None => match self.describe(names).await {
                Ok(d) => d.consumer_groups.into_iter().filter(|g| g.running).map(|g| (g.name, g.lag)).collect(),
                Err(_) => Default::default(),
            },
        };
        let items: Vec<serde_json::Value> =
            r.consumer_groups.iter().map(|g| render::consumer_group_with_lag(g, lags.get(&g.name).copied())).collect();
        let (lines, json) = (items.iter().map(|i| i.to_string()), items.iter().cloned());
        self.print_listed("consumer_groups", lines, json, r.index, &r.next_page_token);
        Ok(())
    }

    async fn describe(&mut self, names: Vec<String>) -> Result<pb::DescribeConsumerGroupsResponse, CliError> {
        let req = pb::DescribeConsumerGroupsRequest { namespace: self.namespace(), names };
        let r = self.client.describe_consumer_groups(req).await;
        self.answer(r)
    }

    /// The lag table once, or every `watch` (`count` times; 0: until interrupted).
    async fn stats(&mut self, names: Vec<String>, watch: Option<String>, count: u64) -> Result<(), CliError> {
        let every = watch.map(|w| validate::duration_ms("--watch", &w).map_err(usage)).transpose()?;
        let every = every.map(std::time::Duration::from_millis);
        let mut printed = 0u64;
        loop {
            let r = self.describe(names.clone()).await?;
            match self.ctx.output {
                Output::Text => print!("{}", render::stats_text(&r.consumer_groups)),
                Output::Json => println!("{}", render::stats_json(&r)),
            }
            printed += 1;
            let Some(every) = every else { return Ok(()) };
            if count != 0 && printed >= count {
                return Ok(());
            }
            tokio::time::sleep(every).await;
            if self.ctx.output == Output::Text {
                println!();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::since_unix_ms;

    #[test]
    fn since_means_the_past_rfc3339_or_unix_seconds() {
        let now = 1_800_000_000_000;
        assert_eq!(since_unix_ms("1h", now), Some(now - 3_600_000));
        assert_eq!(since_unix_ms("-1h", now), Some(now - 3_600_000));
        assert_eq!(since_unix_ms("1700000000", now), Some(1_700_000_000_000));
        assert_eq!(since_unix_ms("2023-11-14T22:13:20Z", now), Some(1_700_000_000_000));
        for bad in ["", "+1h", "yesterday", "2023-13-40T00:00:00Z", "1h30"] {
            assert_eq!(since_unix_ms(bad, now), None, "{bad:?}");
        }
    }
}
