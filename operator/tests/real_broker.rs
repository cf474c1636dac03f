//! The Topic, ConsumerGroup and User reconcilers against a real broker: one in-process
//! node per test (127.0.0.71-73; the User test 127.0.0.82; the decommission test 127.0.0.87:28150) and the scripted API server. The operator decides by itself whether
//! the broker's copy of an object already matches its spec, and writes only when it
//! does not; these tests check that its rules agree with what the broker really
//! stores (defaults filled in, durations normalised). If they disagreed, every resync
//! would write again, and each write moves the status's index, which shows here as a
//! status patch the scripted server did not expect.
//!
//! The broker runs as the operator starts them (issue 17): with the operator's
//! administrator (`--admin-user`), so it takes no call without credentials, and
//! every call of the operator's here carries the fixture Secret's password.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::api_server;
use common::{after_status_patch, context, expect_cluster_get, finished, patched_status, topic_path, NS};
use eventter_operator::controller::broker_object;
use eventter_operator::crd::ConsumerGroup;
use eventtermq_broker::config::NodeConfig;
use eventtermq_proto::v1 as pb;
use http::Method;
use kube::runtime::controller::Action;
use serde_json::json;
use tokio_util::sync::CancellationToken;

struct Broker {
    addr: SocketAddr,
    shutdown: CancellationToken,
    node: eventtermq_broker::node::NodeHandle,
    _dir: tempfile::TempDir,
}

impl Broker {
    /// A single-node cluster on a free port of `ip`, ready for writes.
    async fn start(ip: &str) -> Broker {
        let free = std::net::TcpListener::bind((ip, 0)).unwrap();
        let addr = free.local_addr().unwrap();
        drop(free);
        Self::start_at(addr).await
    }

    /// A single-node cluster at `addr`, ready for writes.
    async fn start_at(addr: SocketAddr) -> Broker {
        let dir = tempfile::tempdir().unwrap();
        let mut config = NodeConfig::new(dir.path(), addr.to_string(), addr.to_string());
        config.raft.election_timeout_min_ms = 200;
        config.raft.election_timeout_max_ms = 300;
        config.bootstrap_admin = Some(eventtermq_broker::config::BootstrapAdmin {
            name: eventter_operator::credentials::OPERATOR_USER.into(),
            password_hash: eventtermq_broker::auth::password::hash(common::OPERATOR_PASSWORD).unwrap(),
        });
        let (network, listeners) =
            eventtermq_broker::transport::tcp::bind(addr, Duration::from_secs(1), None).await.unwrap();
        let shutdown = CancellationToken::new();
        let node = eventtermq_broker::node::start(config, network, listeners, shutdown.clone()).await.unwrap();
        let broker = Broker { addr, shutdown, node, _dir: dir };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while broker
            .admin()
            .await
            .list_topics(pb::ListTopicsRequest { namespace: "default".into(), ..Default::default() })
            .await
            .is_err()
        {
            assert!(tokio::time::Instant::now() < deadline, "the broker did not become ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        broker
    }

    /// An admin client with the operator's credentials.
    async fn admin(
        &self,
    ) -> pb::admin_client::AdminClient<
        tonic::service::interceptor::InterceptedService<
            tonic::transport::Channel,
            eventter_operator::credentials::BrokerCredentials,
        >,
    > {
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr)).unwrap().connect().await.unwrap();
        let credentials = eventter_operator::credentials::BrokerCredentials::new(
            eventter_operator::credentials::OPERATOR_USER,
            common::OPERATOR_PASSWORD,
        )
        .unwrap();
        pb::admin_client::AdminClient::with_interceptor(channel, credentials)
    }

    /// A call without credentials, as a client that has none.
    async fn anonymous_list_topics(&self) -> tonic::Code {
        let mut client = pb::admin_client::AdminClient::connect(format!("http://{}", self.addr)).await.unwrap();
        let request = pb::ListTopicsRequest { namespace: "default".into(), ..Default::default() };
        client.list_topics(request).await.map(|_| tonic::Code::Ok).unwrap_or_else(|s| s.code())
    }

    async fn topic(&self, namespace: &str, name: &str) -> Option<pb::Topic> {
        let list = self
            .admin()
            .await
            .list_topics(pb::ListTopicsRequest { namespace: namespace.into(), ..Default::default() })
            .await
            .ok()?;
        list.into_inner().topics.into_iter().find(|t| t.name == name)
    }

    /// Whether the node runs the group (DescribeConsumerGroups answers for it).
    async fn group_running(&self, namespace: &str, name: &str) -> bool {
        let request = pb::DescribeConsumerGroupsRequest { namespace: namespace.into(), names: vec![name.into()] };
        match self.admin().await.describe_consumer_groups(request).await {
            Ok(r) => r.into_inner().consumer_groups.iter().any(|g| g.name == name && g.running),
            Err(_) => false,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.node.wait().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_is_written_once_then_only_read_and_drift_is_repaired() {
    let broker = Broker::start("127.0.0.71").await;
    let (client, mut server) = api_server::client();
    let ctx = context(client, broker.addr);
    // Durations in another unit than the broker prints them and the exchange type
    // left to its default: the comparison must see through both.
    let topic = common::topic(json!({"clusterRef": "emq", "shards": 2, "replicationFactor": 1, "retention": "90m"}));
    let status_path = format!("{}/status", topic_path());

    let reconcile = tokio::spawn(broker_object::reconcile(Arc::new(topic.clone()), ctx.clone()));
    expect_cluster_get(&mut server).await;
    let patch = server.expect(Method::PATCH, &status_path, patched_status(&topic)).await;
    assert_eq!(patch.body["status"]["conditions"][0]["reason"], "Synced", "{}", patch.body);
    let written_at = patch.body["status"]["clusterStateIndex"].as_u64().unwrap();
    server.expect_event(NS, "Synced").await;
    assert_eq!(finished(reconcile).await.unwrap(), Action::requeue(broker_object::RESYNC_PERIOD));
    server.expect_no_more().await;
    let stored = broker.topic("default", "orders").await.expect("the topic is in the broker");
    assert_eq!((stored.shards, stored.replication_factor), (2, 1));
    assert_eq!(stored.retention.map(|d| d.seconds), Some(5400));

    // Resyncs of the unchanged object: read only (a write would patch a new index).
    let synced = Arc::new(after_status_patch(&topic, &patch.body));
    for _ in 0..2 {
        common::in_sync_pass(&synced, &ctx, &mut server).await;
    }

    // Someone changes the topic behind the operator's back: the next pass puts it back.
    broker
        .admin()
        .await
        .update_topic(pb::UpdateTopicRequest {
            namespace: "default".into(),
            name: "orders".into(),
            retention: Some(prost_types::Duration { seconds: 60, nanos: 0 }),
            ..Default::default()
        })
        .await
        .unwrap();
    let reconcile = tokio::spawn(broker_object::reconcile(synced.clone(), ctx.clone()));
    expect_cluster_get(&mut server).await;
    let patch = server.expect(Method::PATCH, &status_path, patched_status(&*synced)).await;
    assert!(patch.body["status"]["clusterStateIndex"].as_u64().unwrap() > written_at, "{}", patch.body);
    assert_eq!(finished(reconcile).await.unwrap(), Action::requeue(broker_object::RESYNC_PERIOD));
    server.expect_no_more().await;
    let stored = broker.topic("default", "orders").await.unwrap();
    assert_eq!(stored.retention.map(|d| d.seconds), Some(5400));
    // The broker is closed to those without credentials: the operator got in with its own.
    assert_eq!(broker.anonymous_list_topics().await, tonic::Code::Unauthenticated);
    broker.stop().await;
}

/// A Topic that sets nothing but what it must: the CRD's defaults against the broker's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_with_defaults_is_written_once() {
    let broker = Broker::start("127.0.0.73").await;
    let (client, mut server) = api_server::client();
    let ctx = context(client, broker.addr);
    let topic = common::topic(json!({"clusterRef": "emq", "replicationFactor": 1}));
    let reconcile = tokio::spawn(broker_object::reconcile(Arc::new(topic.clone()), ctx.clone()));
    expect_cluster_get(&mut server).await;
    let patch = server.expect(Method::PATCH, &format!("{}/status", topic_path()), patched_status(&topic)).await;
    server.expect_event(NS, "Synced").await;
    finished(reconcile).await.unwrap();
    assert!(broker.topic("default", "orders").await.is_some());
    let synced = Arc::new(after_status_patch(&topic, &patch.body));
    common::in_sync_pass(&synced, &ctx, &mut server).await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_group_is_written_once_then_only_read() {
    let broker = Broker::start("127.0.0.72").await;
    let topic = pb::Topic {
        name: "orders".into(),
        shards: 1,
        replication_factor: 1,
        default_exchange_type: "direct".into(),
        ..Default::default()
    };
    broker
        .admin()
        .await
        .create_topic(pb::CreateTopicRequest { namespace: "default".into(), topic: Some(topic) })
        .await
        .unwrap();
    let (client, mut server) = api_server::client();
    let ctx = context(client, broker.addr);
    // No exchange type (the broker stores the topic's default), a start time (the
    // broker keeps it but an existing group cannot move it), a size left to default,
    // and the queue limits the broker compares (TTL, ready messages and bytes).
    let spec = serde_json::from_value(json!({
        "clusterRef": "emq",
        "bindings": [{"topic": "orders", "routingKey": "eu"}],
        "since": "2026-01-01T00:00:00Z",
        "messageTtlMs": 60000,
        "readyMessagesMax": 500,
        "readyBytesMax": 1048576
    }))
    .unwrap();
    let mut group = ConsumerGroup::new("billing", spec);
    group.metadata.namespace = Some(NS.into());
    group.metadata.generation = Some(1);
    group.metadata.finalizers = Some(vec!["eventter.io/consumergroup".into()]);
    let status_path = format!("/apis/eventter.io/v1alpha1/namespaces/{NS}/consumergroups/billing/status");

    let reconcile = tokio::spawn(broker_object::reconcile(Arc::new(group.clone()), ctx.clone()));
    expect_cluster_get(&mut server).await;
    let patch = server.expect(Method::PATCH, &status_path, patched_status(&group)).await;
    assert_eq!(patch.body["status"]["conditions"][0]["reason"], "Synced", "{}", patch.body);
    server.expect_event(NS, "Synced").await;
    finished(reconcile).await.unwrap();
    let groups = broker
        .admin()
        .await
        .list_consumer_groups(pb::ListConsumerGroupsRequest { namespace: "default".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .consumer_groups;
    assert_eq!(groups.iter().map(|g| g.name.as_str()).collect::<Vec<_>>(), ["billing"]);
    assert_eq!(groups[0].bindings[0].exchange_type, "direct", "the topic's default, filled in by the broker");

    // The lag, as the broker reports it: none while the new group's task starts (the
    // status says why), then 0 once it runs; that change is one status patch.
    let mut synced = Arc::new(after_status_patch(&group, &patch.body));
    if patch.body["status"].get("lag").is_none() {
        assert!(patch.body["status"]["lagError"].is_string(), "{}", patch.body);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !broker.group_running("default", "billing").await {
            assert!(tokio::time::Instant::now() < deadline, "the group did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let reconcile = tokio::spawn(broker_object::reconcile(synced.clone(), ctx.clone()));
        expect_cluster_get(&mut server).await;
        let patch = server.expect(Method::PATCH, &status_path, patched_status(&*synced)).await;
        finished(reconcile).await.unwrap();
        synced = Arc::new(after_status_patch(&*synced, &patch.body));
    }
    let status = &serde_json::to_value(&*synced).unwrap()["status"];
    assert_eq!(
        (&status["lag"], &status["topicLag"]["orders"], &status["subscribers"]),
        (&json!(0), &json!(0), &json!(0))
    );
    assert!(status["nodeId"].as_str().is_some_and(|id| id != "0"), "{status}");
    assert!(status.get("lagError").is_none(), "{status}");
    for _ in 0..2 {
        common::in_sync_pass(&synced, &ctx, &mut server).await;
    }
    broker.stop().await;
}

/// A connection to the broker at `addr` as `user` with `password`.
async fn as_user(
    addr: SocketAddr,
    user: &str,
    password: &str,
) -> pb::admin_client::AdminClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        eventter_operator::credentials::BrokerCredentials,
    >,
> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let credentials = eventter_operator::credentials::BrokerCredentials::new(user, password).unwrap();
    pb::admin_client::AdminClient::with_interceptor(channel, credentials)
}

/// What listing the topics of `namespace` as `user` answers.
async fn list_topics_as(addr: SocketAddr, user: &str, password: &str, namespace: &str) -> tonic::Code {
    let request = pb::ListTopicsRequest { namespace: namespace.into(), ..Default::default() };
    let answer = as_user(addr, user, password).await.list_topics(request).await;
    answer.map(|_| tonic::Code::Ok).unwrap_or_else(|s| s.code())
}

/// A User against a real broker: created with its password and permissions, then in
/// sync (the operator's comparison agrees with what the broker lists: no write, no
/// status patch), a changed Secret replaces the password, and deleting the resource
/// deletes the user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_is_created_its_password_follows_the_secret_and_it_is_deleted() {
    use common::{app_user, expect_user_reads, password_secret, ready, spec_with, user_path};
    use eventter_operator::controller::user;
    let broker = Broker::start("127.0.0.82").await;
    let (client, mut server) = api_server::client();
    let ctx = context(client, broker.addr);
    let user = app_user(spec_with(json!([
        {"namespace": "default", "configure": "^orders$", "write": "^orders$", "read": ".*"},
        {"namespace": "shop", "read": "^audit$"}
    ])));
    let (old, new) = ("app-old-pw-5Hs2k9", "app-new-pw-7Lm3q1");
    let secret = password_secret(old, "10");
    let reconcile = tokio::spawn(user::reconcile(Arc::new(user.clone()), ctx.clone()));
    expect_user_reads(&mut server, Some(&secret), true).await;
    server.expect_event(NS, "PasswordSet").await;
    let patch = server.expect(Method::PATCH, &format!("{}/status", user_path()), patched_status(&user)).await;
    assert_eq!(ready(&patch.body).0, "True", "{}", patch.body);
    server.expect_event(NS, "Synced").await;
    finished(reconcile).await.unwrap();
    server.expect_no_more().await;
    // The user gets in where its permissions say, and only there.
    assert_eq!(list_topics_as(broker.addr, "app", old, "default").await, tonic::Code::Ok);
    assert_eq!(list_topics_as(broker.addr, "app", old, "shop").await, tonic::Code::Ok, "shop was created");
    let users = broker.admin().await.list_users(pb::ListUsersRequest::default()).await.unwrap().into_inner().users;
    let app = users.iter().find(|u| u.name == "app").expect("user app in the broker");
    assert_eq!(app.permissions["shop"].read, "^audit$");
    assert!(!app.admin);

    // In sync: reads only (a write would move the index and patch the status).
    let synced = after_status_patch(&user, &patch.body);
    for _ in 0..2 {
        let reconcile = tokio::spawn(user::reconcile(Arc::new(synced.clone()), ctx.clone()));
        expect_user_reads(&mut server, Some(&secret), true).await;
        assert_eq!(finished(reconcile).await.unwrap(), Action::requeue(broker_object::RESYNC_PERIOD));
        server.expect_no_more().await;
    }

    // The Secret changes: the new password works, the old one no longer does, and a
    // namespace dropped from the spec loses its permissions.
    let mut changed = synced.clone();
    changed.spec.permissions.truncate(1);
    let new_secret = password_secret(new, "11");
    let ctx = context(ctx.client.clone(), broker.addr);
    let reconcile = tokio::spawn(user::reconcile(Arc::new(changed.clone()), ctx.clone()));
    expect_user_reads(&mut server, Some(&new_secret), true).await;
    server.expect_event(NS, "PasswordSet").await;
    let patch = server.expect(Method::PATCH, &format!("{}/status", user_path()), patched_status(&changed)).await;
    assert_eq!(patch.body["status"]["passwordSecretVersion"], "secret-uid-1/11");
    finished(reconcile).await.unwrap();
    server.expect_no_more().await;
    assert_eq!(list_topics_as(broker.addr, "app", old, "default").await, tonic::Code::Unauthenticated);
    assert_eq!(list_topics_as(broker.addr, "app", new, "default").await, tonic::Code::Ok);
    assert_eq!(list_topics_as(broker.addr, "app", new, "shop").await, tonic::Code::PermissionDenied);

    // Deleted: gone from the broker, and its password with it.
    let mut gone = after_status_patch(&changed, &patch.body);
    gone.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
    let reconcile = tokio::spawn(user::reconcile(Arc::new(gone.clone()), ctx.clone()));
    common::expect_cluster_get(&mut server).await;
    server.expect_event(NS, "Deleted").await;
    server.expect(Method::PATCH, &user_path(), |_| (http::StatusCode::OK, serde_json::to_value(&gone).unwrap())).await;
    assert_eq!(finished(reconcile).await.unwrap(), Action::await_change());
    server.expect_no_more().await;
    assert_eq!(list_topics_as(broker.addr, "app", new, "default").await, tonic::Code::Unauthenticated);
    let users = broker.admin().await.list_users(pb::ListUsersRequest::default()).await.unwrap().into_inner().users;
    assert!(users.iter().all(|u| u.name != "app"), "{users:?}");
    broker.stop().await;
}

/// The operator's decommission calls against a broker: ListNodes lists the node, and
/// the brokers' refusal to decommission the only node (NotEnoughNodesLeft, 4013) comes
/// back as a `Rejected` outcome with the broker's message, which the cluster
/// reconciler shows as ScaleDownBlocked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decommissioning_the_only_node_is_a_refusal_with_the_brokers_message() {
    let broker = Broker::start_at("127.0.0.87:28150".parse().unwrap()).await;
    let credentials = eventter_operator::credentials::BrokerCredentials::new(
        eventter_operator::credentials::OPERATOR_USER,
        common::OPERATOR_PASSWORD,
    )
    .unwrap();
    let connector = eventter_operator::broker::BrokerConnector::default();
    let mut admin = connector.connect(&broker.addr.to_string(), &credentials).await.unwrap();
    // The node records itself in the cluster state shortly after it leads.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let nodes = loop {
        let nodes = admin.list_nodes().await.unwrap();
        if !nodes.is_empty() || tokio::time::Instant::now() > deadline {
            break nodes;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    assert!(nodes[0].drain.is_none());
    let id = nodes[0].id;
    match admin.decommission_node(id, false).await.unwrap() {
        Err(eventter_operator::broker::Refusal::Rejected(message)) => {
            assert!(message.contains(&format!("node {id} would leave 0 live node")), "{message}");
            assert!(!message.contains("request id"), "the changing request id is cut: {message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(admin.list_nodes().await.unwrap()[0].drain.is_none(), "a refused node is not draining");
    broker.stop().await;
}
