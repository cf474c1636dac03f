//! Admin subcommands: each builds one request, prints the answer, and maps errors.

use eventtermq_proto::v1 as pb;

use super::args::{Command, Output};
use super::render;
use super::{admin_client, CliError, Ctx};
use eventtermq_broker::cluster_state::validate;

fn print_written(r: pb::WriteResponse) {
    // The seed page's output; `ok` is always true on the wire (an error is a status).
    println!("{{\"ok\": true, \"index\": {}}}", r.index);
}

fn usage(e: eventtermq_broker::error::RequestError) -> CliError {
    CliError::Usage(e.message)
}

fn duration(field: &str, v: &str) -> Result<Option<prost_types::Duration>, CliError> {
    let ms = validate::duration_ms(field, v).map_err(usage)?;
    Ok(eventtermq_broker::api::convert::ms_to_duration(ms))
}

/// `-1h` (in the past), `+1h`/`1h` (in the future), or an RFC 3339 time.
fn since(v: &str) -> Result<prost_types::Timestamp, CliError> {
    let now = eventtermq_broker::clock::system_unix_ms();
    let ms = if let Ok(t) = humantime::parse_rfc3339_weak(v) {
        t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
    } else if let Some(rest) = v.strip_prefix('-') {
        now - validate::duration_ms("since", rest).map_err(usage)? as i64
    } else {
        now + validate::duration_ms("since", v.strip_prefix('+').unwrap_or(v)).map_err(usage)? as i64
    };
    Ok(eventtermq_broker::api::convert::ms_to_timestamp(ms))
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

pub async fn execute(ctx: &Ctx, cmd: Command) -> Result<(), CliError> {
    let mut client = admin_client(&ctx.addr)?;
    let status = |s: tonic::Status| CliError::from_status(s, &ctx.addr);
    let ns = ctx.namespace.clone();
    match cmd {
        Command::Dump { stale } => {
            let r = client.dump(pb::DumpRequest { stale }).await.map_err(status)?.into_inner();
            match ctx.output {
                Output::Text => print!("{}", render::dump_text(&r)),
                Output::Json => println!("{}", render::dump_json(&r)),
            }
        }
        Command::CreateNamespace { name } => print_written(
            client.create_namespace(pb::CreateNamespaceRequest { name }).await.map_err(status)?.into_inner(),
        ),
        Command::DeleteNamespace { name, cascade } => print_written(
            client.delete_namespace(pb::DeleteNamespaceRequest { name, cascade }).await.map_err(status)?.into_inner(),
        ),
        Command::ListNamespaces => {
            let r =
                client.list_namespaces(pb::ListNamespacesRequest { stale: false }).await.map_err(status)?.into_inner();
            match ctx.output {
                Output::Text => r.namespaces.iter().for_each(|n| println!("{n}")),
                Output::Json => println!("{}", serde_json::json!({"namespaces": r.namespaces, "index": r.index})),
            }
        }
        Command::CreateTopic {
            name,
            shards,
            replication_factor,
            retention,
            default_exchange_type,
            segment_size_max_bytes,
            min_insync_replicas,
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
            };
            let req = pb::CreateTopicRequest { namespace: ns, topic: Some(topic) };
            print_written(client.create_topic(req).await.map_err(status)?.into_inner())
        }
        Command::UpdateTopic {
            name,
            shards,
            replication_factor,
            retention,
            default_exchange_type,
            min_insync_replicas,
        } => {
            let retention = retention.map(|r| duration("retention", &r)).transpose()?.flatten();
            let req = pb::UpdateTopicRequest {
                namespace: ns,
                name,
                shards,
                replication_factor,
                retention,
                default_exchange_type,
                min_insync_replicas,
            };
            print_written(client.update_topic(req).await.map_err(status)?.into_inner())
        }
        Command::DeleteTopic { name } => print_written(
            client.delete_topic(pb::DeleteTopicRequest { namespace: ns, name }).await.map_err(status)?.into_inner(),
        ),
        Command::ListTopics => {
            let r = client
                .list_topics(pb::ListTopicsRequest { namespace: ns, stale: false })
                .await
                .map_err(status)?
                .into_inner();
            match ctx.output {
                Output::Text => r.topics.iter().for_each(|t| println!("{}", render::topic_line(t))),
                Output::Json => println!(
                    "{}",
                    serde_json::json!({"topics": r.topics.iter().map(render::topic_json).collect::<Vec<_>>(), "index": r.index})
                ),
            }
        }
        Command::CreateConsumerGroup { name, bind, bind_direct, bind_topic, bind_headers, since: since_arg, size } => {
            let mut bindings: Vec<pb::Binding> =
                bind.iter().map(|t| pb::Binding { topic: t.clone(), ..Default::default() }).collect();
            for (flag, kind, values) in
                [("--bind-direct", "direct", &bind_direct), ("--bind-topic", "topic", &bind_topic)]
            {
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
            for v in &bind_headers {
                bindings.push(header_binding(v)?);
            }
            let group = pb::ConsumerGroup {
                name,
                bindings,
                size,
                since: since_arg.as_deref().map(since).transpose()?,
                ..Default::default()
            };
            let req = pb::CreateConsumerGroupRequest { namespace: ns, consumer_group: Some(group) };
            print_written(client.create_consumer_group(req).await.map_err(status)?.into_inner())
        }
        Command::DeleteConsumerGroup { name } => print_written(
            client
                .delete_consumer_group(pb::DeleteConsumerGroupRequest { namespace: ns, name })
                .await
                .map_err(status)?
                .into_inner(),
        ),
        Command::ListConsumerGroups => {
            let r = client
                .list_consumer_groups(pb::ListConsumerGroupsRequest { namespace: ns, stale: false })
                .await
                .map_err(status)?
                .into_inner();
            match ctx.output {
                Output::Text => r.consumer_groups.iter().for_each(|g| println!("{}", render::consumer_group_line(g))),
                Output::Json => println!(
                    "{}",
                    serde_json::json!({"consumer_groups": r.consumer_groups.iter().map(render::consumer_group_json).collect::<Vec<_>>(), "index": r.index})
                ),
            }
        }
        Command::Publish(args) => super::messages::publish(ctx, args).await?,
        Command::Subscribe(args) => super::messages::subscribe(ctx, args).await?,
        Command::Bench(b) => super::bench::run(ctx, b).await?,
    }
    Ok(())
}
