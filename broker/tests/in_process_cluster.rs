//! Several nodes in one process over the in-memory network, with faults: cluster
//! formation, leader crash, partitions and full restarts.
//!
//! Every test runs on tokio's paused clock (a current-thread runtime): the nodes' timers,
//! timeouts and "how long since" are tokio's, and their timestamps come from one manual
//! clock, so an idle runtime jumps to the next timer instead of sleeping, and waits and
//! deadlines below are in that virtual time. Disk IO on the blocking pool holds the
//! clock still until it is done, so a timeout cannot fire because an fsync was slow.

use std::ops::Deref;
use std::path::Path;
use std::time::Duration;

use eventtermq_broker::clock::Clock;
use eventtermq_broker::cluster_state::{Command, ExchangeType, NodeState, TopicSpec};
use eventtermq_broker::config::NodeConfig;
use eventtermq_broker::node::{self, NodeHandle};
use eventtermq_broker::replication::read::ReadRequest;
use eventtermq_broker::transport::mem::MemNetwork;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Wall-clock time of a test's start (any fixed value, the same in every run).
const START_UNIX_MS: i64 = 1_700_000_000_000;

/// The in-memory network and the one clock every node of a test shares (also across
/// restarts), so nodes agree on timestamps and a restarted node's go on from there.
struct TestNet {
    net: MemNetwork,
    clock: Clock,
}

impl TestNet {
    fn new() -> TestNet {
        TestNet { net: MemNetwork::new(), clock: Clock::manual(START_UNIX_MS) }
    }

    /// A new, empty network; the clock goes on.
    fn replaced(&self) -> TestNet {
        TestNet { net: MemNetwork::new(), clock: self.clock.clone() }
    }
}

impl Deref for TestNet {
    type Target = MemNetwork;
    fn deref(&self) -> &MemNetwork {
        &self.net
    }
}

struct TestNode {
    name: String,
    handle: NodeHandle,
    shutdown: CancellationToken,
}

/// A purge the moment a group's first segment appears in the state, before the
/// segment's primary serves it (issue 15: `queue.purge` right after a queue's first
/// bind failed once with 541, "no readable copy yet"): the purge waits for the
/// primary, as the group's own reads do, instead of failing.
#[tokio::test(start_paused = true)]
async fn a_purge_as_the_first_segment_appears_waits_for_its_primary() {
    use eventtermq_broker::cluster_state::{BindingSpec, ConsumerGroupSpec};
    use eventtermq_proto::v1::admin_client::AdminClient;
    use eventtermq_proto::v1::PurgeConsumerGroupRequest;

    let dir = tempfile::tempdir().unwrap();
    let net = TestNet::new();
    let nodes = three(&net, dir.path()).await;
    let (client, _listeners) = net.attach("client:1");
    for i in 0..10 {
        let spec = topic();
        let (topic, group) = (format!("t{i}"), format!("g{i}"));
        let create = Command::CreateTopic { namespace: "default".into(), name: topic.clone(), spec };
        nodes[0].handle.cluster.write(create).await.unwrap();
        let spec = ConsumerGroupSpec { bindings: vec![BindingSpec::fanout(&topic)], size: 10, ..Default::default() };
        let cmd = Command::CreateConsumerGroup { namespace: "default".into(), name: group.clone(), spec };
        nodes[0].handle.cluster.write(cmd).await.unwrap();
        // The first moment the group's node knows both the group's place and a segment.
        let appeared = || {
            let st = nodes[0].handle.cluster.state.read();
            let node = st.state.group_runtime("default", &group).and_then(|g| g.node)?;
            let n = nodes.iter().find(|n| n.handle.id == node)?;
            let st = n.handle.cluster.state.read();
            st.state.segments.values().any(|s| s.topic == topic && s.is_open()).then_some(n.name.clone())
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let placed = loop {
            if let Some(name) = appeared() {
                break name;
            }
            assert!(Instant::now() < deadline, "{group}: never placed with a segment");
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        let mut admin = AdminClient::new(client.data_channel(&placed));
        let req = PurgeConsumerGroupRequest { namespace: String::new(), name: group.clone() };
        match admin.purge_consumer_group(req).await {
            Ok(r) => assert_eq!(r.into_inner().purged, 0, "{group}"),
            Err(e) => panic!("purge of {group} as its first segment appeared: {e:?}"),
        }
    }
    stop_all(nodes).await;
}

fn config(dir: &Path, name: &str, join: &[&str], clock: &Clock) -> NodeConfig {
    let mut c = NodeConfig::new(dir.join(name), name, name);
    c.clock = clock.clone();
    c.join = join.iter().map(|s| s.to_string()).collect();
    c.raft.heartbeat_interval_ms = 50;
    c.raft.election_timeout_min_ms = 200;
    c.raft.election_timeout_max_ms = 400;
    c.membership.probe_period_ms = 100;
    c.membership.probe_rtt_ms = 50;
    c.membership.suspect_to_down_ms = 500;
    c.membership.join_retry_ms = 100;
    c.reconcile_interval_ms = 50;
    c.request_timeout_ms = 3_000;
    // Every node-to-node call of these tests carries the cluster credential.
    let secret = eventtermq_broker::security::ClusterSecret::new(b"in-process test cluster secret");
    c.internal_access = eventtermq_broker::security::InternalAccess::Secret(secret.expect("a valid secret"));
    c
}

async fn start(net: &TestNet, dir: &Path, name: &str, join: &[&str]) -> TestNode {
    start_tuned(net, dir, name, join, |_| {}).await
}

/// `start` with `tune` applied to the test config.
async fn start_tuned(
    net: &TestNet,
    dir: &Path,
    name: &str,
    join: &[&str],
    tune: impl FnOnce(&mut NodeConfig),
) -> TestNode {
    let (network, listeners) = net.attach(name);
    let shutdown = CancellationToken::new();
    let mut c = config(dir, name, join, &net.clock);
    tune(&mut c);
    let handle = node::start(c, network, listeners, shutdown.clone()).await.expect("node starts");
    TestNode { name: name.to_string(), handle, shutdown }
}

async fn eventually<F, Fut>(timeout: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out after {timeout:?} waiting for: {what}");
}

fn topic() -> TopicSpec {
    TopicSpec {
        shards: 1,
        replication_factor: 3,
        retention_ms: 0,
        default_exchange_type: ExchangeType::Fanout,
        segment_size_max_bytes: 0,
        min_insync_replicas: 0,
        ..Default::default()
    }
}

fn voters(n: &TestNode) -> usize {
    n.handle.cluster.raft.metrics().borrow().membership_config.membership().voter_ids().count()
}

fn alive_records(n: &TestNode) -> usize {
    n.handle.cluster.state.read().state.nodes.values().filter(|r| r.state == NodeState::Alive).count()
}

async fn three(net: &TestNet, dir: &Path) -> Vec<TestNode> {
    three_tuned(net, dir, |_| {}).await
}

/// `three` with `tune` applied to every node's config.
async fn three_tuned(net: &TestNet, dir: &Path, tune: impl Fn(&mut NodeConfig)) -> Vec<TestNode> {
    let a = start_tuned(net, dir, "a:1", &[], &tune).await;
    let b = start_tuned(net, dir, "b:1", &["a:1"], &tune).await;
    let c = start_tuned(net, dir, "c:1", &["a:1"], &tune).await;
    let nodes = vec![a, b, c];
    eventually(Duration::from_secs(20), "3 voters and 3 ALIVE records", || async {
        nodes.iter().all(|n| voters(n) == 3 && alive_records(n) == 3)
    })
    .await;
    nodes
}

/// Graceful stop of every node, each awaited.
async fn stop_all(nodes: Vec<TestNode>) {
    for n in nodes {
        n.shutdown.cancel();
        n.handle.wait().await;
    }
}

fn leader_index(nodes: &[TestNode]) -> usize {
    let leader = nodes[0].handle.cluster.leader().expect("a leader").0;
    nodes.iter().position(|n| n.handle.id == leader).expect("leader is one of ours")
}

#[tokio::test(start_paused = true)]
async fn forms_a_cluster_and_keeps_writing_after_the_leader_dies() {
    let dir = tempfile::tempdir().unwrap();
    let net = TestNet::new();
    let mut nodes = three(&net, dir.path()).await;

    // A write on a follower is forwarded to the leader and visible everywhere.
    let li = leader_index(&nodes);
    let follower = (li + 1) % 3;
    let cmd = Command::CreateTopic { namespace: "default".into(), name: "t1".into(), spec: topic() };
    nodes[follower].handle.cluster.write(cmd.clone()).await.expect("forwarded write");
    // Idempotent create.
    nodes[li].handle.cluster.write(cmd).await.expect("same spec again is ok");
    for n in &nodes {
        let s = n.handle.cluster.read(true).await.expect("linearizable read");
        assert!(s.state.namespaces["default"].topics.contains_key("t1"), "{} lacks t1", n.name);
    }

    // Crash the leader: the other two elect a new one and accept writes.
    let dead = nodes.remove(li);
    net.detach(&dead.name);
    let killed_at = Instant::now();
    dead.handle.kill().await;
    let survivor = &nodes[0].handle.cluster;
    let cmd = Command::CreateNamespace { name: "after-crash".into() };
    survivor.write(cmd).await.expect("write after leader crash");
    eprintln!("write committed {:?} after the leader crashed", killed_at.elapsed());
    for n in &nodes {
        let s = n.handle.cluster.read(true).await.unwrap();
        assert!(s.state.namespaces.contains_key("after-crash"));
    }
    // Gossip reports the crashed node.
    eventually(Duration::from_secs(10), "crashed node marked SUSPECT or DEAD", || async {
        let s = nodes[0].handle.cluster.state.read();
        s.state.nodes.values().any(|r| matches!(r.state, NodeState::Suspect | NodeState::Dead))
    })
    .await;
    stop_all(nodes).await;
}

#[tokio::test(start_paused = true)]
async fn a_partitioned_minority_cannot_write_and_catches_up_after_healing() {
    let dir = tempfile::tempdir().unwrap();
    let net = TestNet::new();
    let nodes = three(&net, dir.path()).await;
    let li = leader_index(&nodes);
    let old_leader = &nodes[li];
    let majority: Vec<&TestNode> = nodes.iter().filter(|n| n.handle.id != old_leader.handle.id).collect();

    net.isolate(&old_leader.name);
    let cmd = Command::CreateNamespace { name: "majority-side".into() };
    majority[0].handle.cluster.write(cmd).await.expect("majority elects a leader and commits");

    // The isolated old leader cannot commit anything.
    let err = old_leader
        .handle
        .cluster
        .write(Command::CreateNamespace { name: "minority-side".into() })
        .await
        .expect_err("a minority must not commit");
    assert!(err.code.grpc_code() == tonic::Code::Unavailable, "{err:?}");

    net.heal();
    eventually(Duration::from_secs(15), "old leader catches up", || async {
        match old_leader.handle.cluster.read(true).await {
            Ok(s) => {
                s.state.namespaces.contains_key("majority-side") && !s.state.namespaces.contains_key("minority-side")
            }
            Err(_) => false,
        }
    })
    .await;
    stop_all(nodes).await;
}

#[tokio::test(start_paused = true)]
async fn state_survives_a_full_restart_with_lossy_gossip() {
    let dir = tempfile::tempdir().unwrap();
    let net = TestNet::new();
    let nodes = three(&net, dir.path()).await;
    for i in 0..20 {
        let cmd = Command::CreateTopic { namespace: "default".into(), name: format!("t{i}"), spec: topic() };
        nodes[i % 3].handle.cluster.write(cmd).await.expect("write");
    }
    stop_all(nodes).await;

    // Restart on the same directories over a network that drops 20% of datagrams.
    let net = net.replaced();
    net.set_drop_rate(0.2);
    let a = start(&net, dir.path(), "a:1", &[]).await;
    let b = start(&net, dir.path(), "b:1", &["a:1"]).await;
    let c = start(&net, dir.path(), "c:1", &["a:1"]).await;
    for n in [&a, &b, &c] {
        eventually(Duration::from_secs(20), "topics back after restart", || async {
            match n.handle.cluster.read(true).await {
                Ok(s) => (0..20).all(|i| s.state.namespaces["default"].topics.contains_key(&format!("t{i}"))),
                Err(_) => false,
            }
        })
        .await;
    }
    b.handle
        .cluster
        .write(Command::CreateNamespace { name: "after-restart".into() })
        .await
        .expect("write after restart");
    stop_all(vec![a, b, c]).await;
}

#[tokio::test(start_paused = true)]
async fn a_node_dead_past_the_removal_time_leaves_raft_and_the_state() {
    let dir = tempfile::tempdir().unwrap();
    let net = TestNet::new();
    let start_short = |name: &'static str, join: &'static [&'static str]| {
        start_tuned(&net, dir.path(), name, join, |c| c.dead_node_removal_ms = 1_000)
    };
    let nodes =
        vec![start_short("a:1", &[]).await, start_short("b:1", &["a:1"]).await, start_short("c:1", &["a:1"]).await];
    eventually(Duration::from_secs(20), "3 voters", || async {
        nodes.iter().all(|n| voters(n) == 3 && alive_records(n) == 3)
    })
    .await;
    // Crash a follower (never the leader, so the survivors keep their leader).
    let li = leader_index(&nodes);
    let mut nodes = nodes;
    let victim = nodes.remove((li + 1) % 3);
    let victim_id = victim.handle.id;
    net.detach(&victim.name);
    victim.handle.kill().await;
    eventually(Duration::from_secs(20), "dead node removed from raft and the cluster state", || async {
        nodes.iter().all(|n| {
            let m = n.handle.cluster.raft.metrics().borrow().membership_config.membership().clone();
            let in_raft = m.voter_ids().any(|v| v == victim_id) || m.learner_ids().any(|l| l == victim_id);
            !in_raft && !n.handle.cluster.state.read().state.nodes.contains_key(&victim_id)
        })
    })
    .await;
    // Two voters remain and still commit.
    nodes[0].handle.cluster.write(Command::CreateNamespace { name: "after-removal".into() }).await.expect("write");
    for n in nodes {
        assert_eq!(voters(&n), 2);
        n.shutdown.cancel();
        n.handle.wait().await;
    }
}

/// Gossip can be wrong while Raft is fine: with every gossip datagram lost, each node
/// soon holds the others DEAD, yet Raft (over TCP) still reaches them. The leader must
/// not remove live voters on that verdict (it knocks first): doing so once left a
/// cluster without quorum after a rolling restart on Kubernetes.
#[tokio::test(start_paused = true)]
async fn gossip_dead_but_reachable_voters_are_not_removed() {
    let dir = tempfile::tempdir().unwrap();
    let net = TestNet::new();
    let start_short = |name: &'static str, join: &'static [&'static str]| {
        start_tuned(&net, dir.path(), name, join, |c| {
            c.dead_node_removal_ms = 1_000;
            // No re-join syncs within the test: only the leader's knock can tell.
            c.membership.join_retry_ms = 60_000;
        })
    };
    let nodes =
        vec![start_short("a:1", &[]).await, start_short("b:1", &["a:1"]).await, start_short("c:1", &["a:1"]).await];
    eventually(Duration::from_secs(20), "3 voters", || async {
        nodes.iter().all(|n| voters(n) == 3 && alive_records(n) == 3)
    })
    .await;
    net.set_drop_rate(1.0);
    eventually(Duration::from_secs(10), "the leader's gossip to hold a peer DEAD", || async {
        let li = leader_index(&nodes);
        nodes[li].handle.membership.watch().borrow().iter().any(|m| m.state == NodeState::Dead)
    })
    .await;
    // Well past dead_node_removal_ms: every voter is still a voter.
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        for n in &nodes {
            assert_eq!(voters(n), 3, "{} lost a voter while gossip was down", n.name);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    net.set_drop_rate(0.0);
    eventually(Duration::from_secs(20), "3 ALIVE records once gossip is back", || async {
        nodes.iter().all(|n| alive_records(n) == 3)
    })
    .await;
    nodes[0]
        .handle
        .cluster
        .write(Command::CreateNamespace { name: "after-gossip-outage".into() })
        .await
        .expect("write");
    stop_all(nodes).await;
}

/// A StatefulSet scaled up starts new pods with the founding `--bootstrap-expect`. A
/// new node that meets enough members, even with the smallest id of all, joins the
/// running cluster instead of founding a second one beside it.
#[tokio::test(start_paused = true)]
async fn a_node_added_with_bootstrap_expect_joins_the_running_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let net = TestNet::new();
    let founders = ["f1:1", "f2:1", "f3:1"];
    let start_with = |name: &'static str, id: u64| {
        start_tuned(&net, dir.path(), name, &founders, move |c| {
            c.bootstrap_expect = Some(3);
            c.id = Some(id);
        })
    };
    let mut nodes = vec![start_with("f1:1", 100).await, start_with("f2:1", 200).await, start_with("f3:1", 300).await];
    eventually(Duration::from_secs(20), "3 founders, 3 voters", || async {
        nodes.iter().all(|n| voters(n) == 3 && alive_records(n) == 3)
    })
    .await;
    nodes[0].handle.cluster.write(Command::CreateNamespace { name: "before-scale-up".into() }).await.expect("write");
    // Smallest id of all: without the check it would initialize a cluster of its own.
    nodes.push(start_with("new:1", 1).await);
    eventually(Duration::from_secs(20), "the new node in the founders' cluster", || async {
        nodes.iter().all(|n| {
            let m = n.handle.cluster.raft.metrics().borrow().membership_config.membership().clone();
            m.voter_ids().count() + m.learner_ids().count() == 4
                && n.handle.cluster.state.read().state.namespaces.contains_key("before-scale-up")
        })
    })
    .await;
    let term_of_founders = nodes[0].handle.cluster.raft.metrics().borrow().current_term;
    assert!(term_of_founders > 0);
    let leaders: Vec<_> = nodes.iter().map(|n| n.handle.cluster.leader().map(|(id, _)| id)).collect();
    assert!(leaders.iter().all(|l| *l == leaders[0] && l.is_some()), "one leader for all: {leaders:?}");
    stop_all(nodes).await;
}

/// Publishes `ids` one batch at a time through `node`, returning the ids confirmed.
async fn publish_ids(node: &TestNode, ids: std::ops::Range<u32>) -> Vec<u32> {
    use eventtermq_proto::v1::{Message, Persistence};
    let mut confirmed = Vec::new();
    for chunk in ids.collect::<Vec<_>>().chunks(10) {
        let messages: Vec<Message> =
            chunk.iter().map(|i| Message { data: i.to_string().into_bytes().into(), ..Default::default() }).collect();
        if node.handle.segments.publish("default", "t", &messages, Persistence::Replicated, None, 0).await.is_ok() {
            confirmed.extend_from_slice(chunk);
        }
    }
    confirmed
}

/// One read of segment `id` from `from`; a segment no node has sealed a copy of yet
/// (closed by a fail-over moments ago) is asked again, for a bounded time.
async fn read_when_ready(
    node: &TestNode,
    id: u64,
    seg: &eventtermq_broker::cluster_state::model::SegmentRecord,
    from: u64,
) -> eventtermq_broker::replication::read::ReadResult {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match node.handle.segments.read(id, seg, ReadRequest::at(from, 1 << 20)).await {
            Ok(r) => return r,
            Err(e) if e.code == eventtermq_broker::error::ErrorCode::NotReady && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("segment {id} not readable: {e:?}"),
        }
    }
}

/// Every message of topic `t` as `node` can read it (closed segments from a complete
/// copy, open ones up to what is confirmed).
async fn read_topic(node: &TestNode) -> Vec<u32> {
    let segments: Vec<_> = {
        let st = node.handle.cluster.state.read();
        st.state.topic_segments("default", "t").map(|(id, s)| (id, s.clone())).collect()
    };
    let mut out = Vec::new();
    for (id, seg) in segments {
        let mut from = 0;
        loop {
            let r = read_when_ready(node, id, &seg, from).await;
            let Some(last) = r.records.last() else { break };
            from = last.offset + 1;
            for rec in &r.records {
                let m = <eventtermq_proto::v1::Message as prost::Message>::decode(rec.payload.clone()).unwrap();
                out.push(String::from_utf8(m.data.to_vec()).unwrap().parse().unwrap());
            }
        }
    }
    out
}

fn primary_index(nodes: &[TestNode]) -> Option<usize> {
    let st = nodes[0].handle.cluster.state.read();
    let primary = st.state.topic_segments("default", "t").find(|(_, s)| s.is_open())?.1.primary;
    nodes.iter().position(|n| n.handle.id == primary)
}

#[tokio::test(start_paused = true)]
async fn confirmed_messages_survive_a_primary_crash_mid_stream() {
    let dir = tempfile::tempdir().unwrap();
    let net = TestNet::new();
    let mut nodes = three(&net, dir.path()).await;
    let cmd = Command::CreateTopic { namespace: "default".into(), name: "t".into(), spec: topic() };
    nodes[0].handle.cluster.write(cmd).await.unwrap();
    eventually(Duration::from_secs(10), "an open segment", || async { primary_index(&nodes).is_some() }).await;

    let pi = primary_index(&nodes).unwrap();
    let seg_id = {
        let st = nodes[0].handle.cluster.state.read();
        let open = st.state.topic_segments("default", "t").find(|(_, s)| s.is_open()).map(|(id, _)| id);
        open.unwrap()
    };
    let writer = (pi + 1) % 3;
    let mut confirmed = publish_ids(&nodes[writer], 0..100).await;
    assert_eq!(confirmed.len(), 100);
    // Crash the primary while another batch is being published, once it has confirmed
    // a quarter of it (past offset 150). Progress, not time, picks the moment: on
    // tokio's paused clock no time passes while the batch goes through, so a sleep
    // would end only after it.
    let dead = nodes.remove(pi);
    let writer = if writer > pi { writer - 1 } else { writer };
    let publishing = async { publish_ids(&nodes[writer], 100..300).await };
    let crash = async {
        let _ = dead.handle.segments.read_local(seg_id, ReadRequest::at(150, 1).waiting(Duration::from_secs(10))).await;
        net.detach(&dead.name);
        dead.handle.kill().await;
    };
    let (more, ()) = tokio::join!(publishing, crash);
    confirmed.extend(more);
    assert!(confirmed.len() > 100, "publishing goes on after the crash");

    // The segment is failed over to the survivors, who hold every confirmed message.
    eventually(Duration::from_secs(20), "the old segment closed and sealed on a survivor", || async {
        let st = nodes[0].handle.cluster.state.read();
        let sealed = st.state.topic_segments("default", "t").any(|(_, s)| !s.is_open() && !s.done.is_empty());
        sealed
    })
    .await;
    for n in &nodes {
        let read = read_topic(n).await;
        let have: std::collections::HashSet<u32> = read.iter().copied().collect();
        let lost: Vec<_> = confirmed.iter().filter(|i| !have.contains(i)).collect();
        assert!(lost.is_empty(), "{} lost confirmed messages {lost:?}", n.name);
    }
}

/// Creates topic `t` and waits for its open segment: its id and the indexes in
/// `nodes` of its replica set, primary first.
async fn open_segment_of_t(nodes: &[TestNode]) -> (u64, [usize; 3]) {
    let cmd = Command::CreateTopic { namespace: "default".into(), name: "t".into(), spec: topic() };
    nodes[0].handle.cluster.write(cmd).await.unwrap();
    eventually(Duration::from_secs(10), "an open segment", || async { primary_index(nodes).is_some() }).await;
    let st = nodes[0].handle.cluster.state.read();
    let (id, s) = st.state.topic_segments("default", "t").find(|(_, s)| s.is_open()).unwrap();
    let at = |n: u64| nodes.iter().position(|x| x.handle.id == n).unwrap();
    (id, [at(s.replicas[0]), at(s.replicas[1]), at(s.replicas[2])])
}

#[tokio::test(start_paused = true)]
async fn a_partitioned_replica_does_not_stop_publishing_and_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let net = TestNet::new();
    let nodes = three(&net, dir.path()).await;
    let (seg_id, [pi, _, replica]) = open_segment_of_t(&nodes).await;
    assert_ne!(replica, pi);

    // Cut one replica off from the primary only: a majority (primary + the other
    // replica) still confirms.
    net.partition(&[&nodes[pi].name], &[&nodes[replica].name]);
    let confirmed = publish_ids(&nodes[pi], 0..200).await;
    assert_eq!(confirmed.len(), 200, "a majority of the replica set is enough");
    assert!(nodes[replica].handle.segments.store().info(seg_id).map_or(0, |i| i.next_offset) < 200);

    net.heal();
    eventually(Duration::from_secs(20), "the cut-off replica caught up", || async {
        nodes[replica].handle.segments.store().info(seg_id).is_some_and(|i| i.next_offset == 200)
    })
    .await;
}

/// A replica stopping gracefully (SIGTERM: a rolling restart's next pod) keeps its
/// copy of an open segment confirming until the segment's other replica, which fell
/// behind (cut off from the primary, as a pod that restarted a moment ago), caught
/// up: stopping it earlier would leave the primary without a quorum. Once that replica
/// has everything, the wait ends and publishing goes on without the stopped copy. When
/// the other copies do not answer at all, it does not wait.
#[tokio::test(start_paused = true)]
async fn a_stopping_replica_waits_until_the_other_replica_caught_up() {
    use eventtermq_broker::replication::replica::wait_for_other_copies;
    let dir = tempfile::tempdir().unwrap();
    let net = TestNet::new();
    let nodes = three(&net, dir.path()).await;
    let (seg_id, [pi, behind, stopping]) = open_segment_of_t(&nodes).await;
    net.partition(&[&nodes[pi].name], &[&nodes[behind].name]);
    assert_eq!(publish_ids(&nodes[pi], 0..100).await.len(), 100, "the primary and one replica confirm");
    let held = |n: usize| nodes[n].handle.segments.store().info(seg_id).map_or(0, |i| i.next_offset);
    assert!(held(behind) < 100);

    let waiting = wait_for_other_copies(&nodes[stopping].handle.segments, Duration::from_secs(30));
    tokio::pin!(waiting);
    assert!(
        tokio::time::timeout(Duration::from_secs(3), &mut waiting).await.is_err(),
        "the stopping replica waits while the other one is behind"
    );
    net.heal();
    let short = tokio::time::timeout(Duration::from_secs(20), waiting).await.expect("the wait ends once it caught up");
    assert_eq!(short, 0, "no segment left short");
    assert_eq!(held(behind), 100, "the other replica holds everything the primary held");
    // The stopping copy gone, the primary and the caught-up replica confirm at once.
    net.isolate(&nodes[stopping].name);
    let confirmed = tokio::time::timeout(Duration::from_secs(2), publish_ids(&nodes[pi], 100..110)).await;
    assert_eq!(confirmed.expect("confirmed without waiting").len(), 10);

    // Nothing answers but this node: no wait at all.
    net.heal();
    net.isolate(&nodes[behind].name);
    net.partition(&[&nodes[stopping].name], &[&nodes[pi].name]);
    let short = tokio::time::timeout(
        Duration::from_secs(10),
        wait_for_other_copies(&nodes[stopping].handle.segments, Duration::from_secs(30)),
    )
    .await
    .expect("no wait when waiting cannot help");
    assert_eq!(short, 0);
}

/// A node that just started (readiness: a rolling restart's next pod stops only once
/// it is ready) has caught up only once its copy of each open segment is as long as
/// the primary's: one the primary cannot reach (a restarted pod whose new address the
/// others' DNS answers do not have yet) is not, and is as soon as the primary reaches
/// it again.
#[tokio::test(start_paused = true)]
async fn a_started_node_is_caught_up_only_once_its_copies_are() {
    use eventtermq_broker::replication::replica::{catch_up_at_start, CatchUp};
    let dir = tempfile::tempdir().unwrap();
    let net = TestNet::new();
    let nodes = three(&net, dir.path()).await;
    let (seg_id, [pi, behind, other]) = open_segment_of_t(&nodes).await;
    assert_eq!(
        catch_up_at_start(&nodes[other].handle.segments, Duration::from_secs(5)).await,
        CatchUp::Done,
        "a replica the primary reaches is caught up"
    );
    // The primary cannot reach it; it reaches the primary (and asks how far it is).
    net.cut_one_way(&nodes[pi].name, &nodes[behind].name);
    assert_eq!(publish_ids(&nodes[pi], 0..100).await.len(), 100, "the primary and one replica confirm");
    let held = |n: usize| nodes[n].handle.segments.store().info(seg_id).map_or(0, |i| i.next_offset);
    assert!(held(behind) < 100);

    // Bounded: where it stood when the bound passed.
    let short = catch_up_at_start(&nodes[behind].handle.segments, Duration::from_secs(2)).await;
    assert_ne!(short, CatchUp::Done, "not caught up while the primary cannot reach it");
    let catching = catch_up_at_start(&nodes[behind].handle.segments, Duration::from_secs(30));
    tokio::pin!(catching);
    assert!(tokio::time::timeout(Duration::from_secs(3), &mut catching).await.is_err(), "still catching up");
    net.heal();
    let done = tokio::time::timeout(Duration::from_secs(20), catching).await.expect("caught up once reached");
    assert_eq!(done, CatchUp::Done);
    assert_eq!(held(behind), 100);
}

/// Topic `t` with segments of at most `segment_size_max_bytes`, `count` messages
/// published into it, and the first closed segment sealed on every node. Returns the
/// messages and that segment's id.
async fn sealed_everywhere(nodes: &[TestNode], count: u32, segment_size_max_bytes: u64) -> (Vec<u32>, u64) {
    let spec = TopicSpec { segment_size_max_bytes, ..topic() };
    nodes[0]
        .handle
        .cluster
        .write(Command::CreateTopic { namespace: "default".into(), name: "t".into(), spec })
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "an open segment", || async { primary_index(nodes).is_some() }).await;
    let sent = publish_ids(&nodes[0], 0..count).await;
    assert_eq!(sent.len(), count as usize);
    let sealed = wait_for(Duration::from_secs(20), "a closed segment sealed on every node", || {
        let st = nodes[0].handle.cluster.state.read();
        let found = st.state.topic_segments("default", "t").find_map(|(id, s)| {
            let everywhere = !s.is_open()
                && s.next_offset > 10
                && nodes.iter().all(|n| {
                    s.done.contains(&n.handle.id)
                        && n.handle.segments.store().info(id).is_some_and(|i| i.sealed && i.checksum == s.checksum)
                });
            everywhere.then_some(id)
        });
        found
    })
    .await;
    (sent, sealed)
}

async fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn segment_file(dir: &Path, node: &TestNode, id: u64) -> std::path::PathBuf {
    dir.join(&node.name).join("segments").join(format!("{id:020}.seg"))
}

/// Flips a payload byte of the record at `offset` in a segment file, in place (the
/// layout is in storage/src/codec.rs), and returns the file's bytes after the change.
fn damage_record(path: &Path, offset: u64) -> Vec<u8> {
    use eventtermq_storage::codec::{FILE_HEADER_LEN, FRAME_HEADER_LEN};
    use std::os::unix::fs::FileExt;
    let mut bytes = std::fs::read(path).unwrap();
    let mut pos = FILE_HEADER_LEN;
    for _ in 0..offset {
        let len = u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
        pos += 8 + len;
    }
    let at = pos + FRAME_HEADER_LEN + 1;
    bytes[at] ^= 0x20;
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(&bytes[at..at + 1], at as u64).unwrap();
    file.sync_all().unwrap();
    bytes
}

/// The node's local copy of a closed segment is complete, agrees with the cluster's
/// checksum, is listed as done, and reads back as `expected`.
fn holds_good_copy(node: &TestNode, id: u64, expected: &[eventtermq_storage::Record]) -> bool {
    let st = node.handle.cluster.state.read();
    let Some(seg) = st.state.segments.get(&id) else { return false };
    let store = node.handle.segments.store();
    seg.done.contains(&node.handle.id)
        && store.info(id).is_some_and(|i| i.sealed && i.next_offset == seg.next_offset && i.checksum == seg.checksum)
        && store.reader(id).is_ok_and(|r| r.read(0, u64::MAX, usize::MAX).is_ok_and(|got| got == expected))
}

/// Whether the replicated log (on any of `names`' disks) has the command by which
/// `node` gave up its claim to a complete copy of segment `id`. The log, not the state:
/// the state shows the claim gone only until the fresh copy is reported done, which can
/// be too short a moment to observe.
fn reported_lost(dir: &Path, names: &[&str], id: u64, node: u64) -> bool {
    let needle = format!(r#"{{"SegmentLost":{{"id":{id},"node":{node}}}}}"#);
    names.iter().any(|name| {
        let log = std::fs::read(dir.join(name).join("raft").join("log").join("log")).unwrap_or_default();
        log.windows(needle.len()).any(|w| w == needle.as_bytes())
    })
}

fn local_records(node: &TestNode, id: u64) -> Vec<eventtermq_storage::Record> {
    node.handle.segments.store().reader(id).unwrap().read(0, u64::MAX, usize::MAX).unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_group_reads_past_a_damaged_sealed_copy_and_the_copy_is_fetched_again() {
    use eventtermq_broker::cluster_state::{BindingSpec, ConsumerGroupSpec};
    use eventtermq_proto::v1::{messaging_client::MessagingClient, SubscribeRequest};

    let dir = tempfile::tempdir().unwrap();
    let net = TestNet::new();
    let nodes = three(&net, dir.path()).await;
    let (sent, seg_id) = sealed_everywhere(&nodes, 300, 2048).await;
    // A new group goes to the least loaded node, the smallest id first: damage the
    // copy that node's group task reads.
    let target = nodes.iter().position(|n| n.handle.id == nodes.iter().map(|n| n.handle.id).min().unwrap()).unwrap();
    let healthy = (target + 1) % 3;
    let expected = local_records(&nodes[healthy], seg_id);
    let damaged_offset = expected.len() as u64 / 2;
    let damaged = damage_record(&segment_file(dir.path(), &nodes[target], seg_id), damaged_offset);
    // The records before the damage are still served; the damaged one is not.
    let reader = nodes[target].handle.segments.store().reader(seg_id).unwrap();
    let before = reader.read(0, u64::MAX, usize::MAX).unwrap();
    assert_eq!(before, expected[..damaged_offset as usize], "the records before the damage");
    let err = reader.read(damaged_offset, u64::MAX, usize::MAX).unwrap_err();
    assert!(matches!(err, eventtermq_storage::StorageError::Corrupt { .. }), "the damage is detected: {err}");
    drop(reader);

    let binding = BindingSpec::fanout("t");
    let spec = ConsumerGroupSpec { bindings: vec![binding], size: 1000, since_unix_ms: 0, ..Default::default() };
    let cmd = Command::CreateConsumerGroup { namespace: "default".into(), name: "g".into(), spec };
    nodes[0].handle.cluster.write(cmd).await.unwrap();
    let placed = wait_for(Duration::from_secs(10), "the group placed", || {
        nodes[0].handle.cluster.state.read().state.group_runtime("default", "g").and_then(|g| g.node)
    })
    .await;
    assert_eq!(placed, nodes[target].handle.id, "the test expects the group on the node with the damaged copy");

    let (client, _listeners) = net.attach("client:1");
    let mut messaging = MessagingClient::new(client.data_channel(&nodes[target].name));
    let subscribe = |max_messages: u64, do_not_block: bool| SubscribeRequest {
        namespace: "default".into(),
        consumer_group: "g".into(),
        auto_ack: true,
        do_not_block,
        max_messages,
        ..Default::default()
    };
    let mut stream = messaging.subscribe(subscribe(sent.len() as u64, false)).await.unwrap().into_inner();
    let mut got: Vec<(u64, u64, u32)> = Vec::new();
    let receiving = async {
        while let Some(m) = stream.message().await.unwrap() {
            let data = m.message.unwrap().data;
            got.push((m.segment_id, m.offset, String::from_utf8(data.to_vec()).unwrap().parse().unwrap()));
            if got.len() == sent.len() {
                break;
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(30), receiving).await.is_err() {
        panic!("{} of {} messages arrived", got.len(), sent.len());
    }
    let mut ids: Vec<u32> = got.iter().map(|(_, _, i)| *i).collect();
    ids.sort_unstable();
    assert_eq!(ids, sent, "every message exactly once, with its content");
    assert!(
        got.iter().any(|(s, o, _)| (*s, *o) == (seg_id, damaged_offset)),
        "the damaged record came from a good copy"
    );
    for (s, o, i) in &got {
        if *s == seg_id {
            let m = <eventtermq_proto::v1::Message as prost::Message>::decode(expected[*o as usize].payload.clone());
            assert_eq!(m.unwrap().data, i.to_string().into_bytes(), "segment {s} offset {o}");
        }
    }
    drop(stream);
    let more = messaging.subscribe(subscribe(0, true)).await.unwrap().into_inner().message().await.unwrap();
    assert!(more.is_none(), "nothing is delivered twice: {more:?}");

    // The damaged copy was set aside (bytes kept) and replaced by a good one.
    eventually(Duration::from_secs(30), "the node holds a good copy again", || async {
        holds_good_copy(&nodes[target], seg_id, &expected)
    })
    .await;
    let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
    assert!(
        reported_lost(dir.path(), &names, seg_id, placed),
        "the node did not give up its claim on the damaged copy"
    );
    let quarantined = nodes[target].handle.segments.store().quarantined();
    assert_eq!(quarantined.iter().map(|q| q.id).collect::<Vec<_>>(), vec![seg_id], "{quarantined:?}");
    assert_eq!(std::fs::read(&quarantined[0].files[0]).unwrap(), damaged);
}

#[tokio::test(start_paused = true)]
async fn a_segment_damaged_while_its_node_was_down_is_quarantined_at_start_and_fetched_again() {
    let dir = tempfile::tempdir().unwrap();
    let net = TestNet::new();
    let mut nodes = three(&net, dir.path()).await;
    let (sent, seg_id) = sealed_everywhere(&nodes, 300, 2048).await;
    let victim = (leader_index(&nodes) + 1) % 3;
    let expected = local_records(&nodes[(victim + 1) % 3], seg_id);
    let node = nodes.remove(victim);
    let victim_id = node.handle.id;
    let path = segment_file(dir.path(), &node, seg_id);
    let name = node.name.clone();
    node.shutdown.cancel();
    node.handle.wait().await;
    // A damaged header: nothing in the file can be trusted.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[3] ^= 1;
    std::fs::write(&path, &bytes).unwrap();

    let node = start(&net, dir.path(), &name, &["a:1", "b:1", "c:1"]).await;
    let quarantined = node.handle.segments.store().quarantined();
    assert_eq!(quarantined.iter().map(|q| q.id).collect::<Vec<_>>(), vec![seg_id], "{quarantined:?}");
    assert_eq!(std::fs::read(&quarantined[0].files[0]).unwrap(), bytes);
    eventually(Duration::from_secs(30), "the restarted node holds a good copy again", || async {
        holds_good_copy(&node, seg_id, &expected)
    })
    .await;
    let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).chain([name.as_str()]).collect();
    assert!(
        reported_lost(dir.path(), &names, seg_id, victim_id),
        "the restarted node did not give up its claim on the quarantined copy"
    );
    let mut read = read_topic(&node).await;
    read.sort_unstable();
    assert_eq!(read, sent);
    nodes.push(node);
    stop_all(nodes).await;
}

/// A cluster-state write retried after its outcome was unknown (`Cluster::write`
/// does this under one request id) answers as its first attempt did: a delete that
/// happened is not reported as NotFound, wherever the retry is sent, and the state
/// changes once.
#[tokio::test(start_paused = true)]
async fn a_retried_cluster_state_write_answers_as_its_first_attempt_did() {
    use eventtermq_broker::cluster_state::RequestId;
    use eventtermq_broker::error::ErrorCode;
    let dir = tempfile::tempdir().unwrap();
    let net = TestNet::new();
    let nodes = three(&net, dir.path()).await;
    let li = leader_index(&nodes);
    let follower = &nodes[(li + 1) % 3].handle.cluster;
    let create = Command::CreateTopic { namespace: "default".into(), name: "gone".into(), spec: topic() };
    nodes[li].handle.cluster.write(create).await.unwrap();

    let delete = Command::DeleteTopic { namespace: "default".into(), name: "gone".into() };
    let id = RequestId { node: follower.id, nonce: 7 };
    let first = follower.write_as(id, delete.clone()).await.expect("forwarded delete");
    // The answer was lost on the way back; the retry carries the same id.
    assert_eq!(follower.write_as(id, delete.clone()).await, Ok(first), "retried through the same node");
    assert_eq!(nodes[li].handle.cluster.write_as(id, delete.clone()).await, Ok(first), "retried on the leader");
    let other = RequestId { node: follower.id, nonce: 8 };
    assert_eq!(follower.write_as(other, delete.clone()).await.unwrap_err().code, ErrorCode::TopicNotFound);
    // A repeat answered from the table takes no log entry: the next write's index
    // follows the last one that was applied.
    let after = follower.write(Command::CreateNamespace { name: "after".into() }).await.unwrap();
    assert!(after > first);
    for n in &nodes {
        let st = n.handle.cluster.read(true).await.unwrap();
        assert!(!st.state.namespaces["default"].topics.contains_key("gone"));
        assert_eq!(st.state.applied_requests.get(&id).map(|(i, r)| (*i, r.is_ok())), Some((first, true)));
    }
    stop_all(nodes).await;
}

/// Offset commits wake only what acts on them: every node's `state_changes` tells of
/// a commit, its `layout_changes` (the keeper, placement, the groups' assignments:
/// duties whose work is linear in the state) do not; a new topic wakes both.
#[tokio::test(start_paused = true)]
async fn an_offset_commit_is_a_state_change_but_not_a_layout_change() {
    use eventtermq_broker::cluster_state::{BindingSpec, ConsumerGroupSpec};
    let dir = tempfile::tempdir().unwrap();
    let net = TestNet::new();
    let nodes = three(&net, dir.path()).await;
    let leader = &nodes[leader_index(&nodes)].handle.cluster;
    let create = Command::CreateTopic { namespace: "default".into(), name: "t".into(), spec: topic() };
    leader.write(create).await.unwrap();
    let spec = ConsumerGroupSpec { bindings: vec![BindingSpec::fanout("t")], size: 10, ..Default::default() };
    leader.write(Command::CreateConsumerGroup { namespace: "default".into(), name: "g".into(), spec }).await.unwrap();
    let segment = wait_for(Duration::from_secs(10), "the topic's segments open and the group placed", || {
        let st = leader.state.read();
        let open: Vec<u64> = st.state.segments.iter().filter(|(_, s)| s.is_open()).map(|(id, _)| *id).collect();
        let placed = st.state.group_runtime("default", "g").and_then(|g| g.node).is_some();
        (open.len() == topic().shards as usize && placed).then(|| open[0])
    })
    .await;
    // Whatever the creation set off settles first.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut watches: Vec<_> = nodes
        .iter()
        .map(|n| {
            let (mut all, mut layout) = (n.handle.cluster.state_changes(), n.handle.cluster.layout_changes());
            all.borrow_and_update();
            layout.borrow_and_update();
            (all, layout)
        })
        .collect();

    let offsets = std::collections::BTreeMap::from([(segment, 0)]);
    let commit = Command::CommitOffsets {
        namespace: "default".into(),
        group: "g".into(),
        offsets,
        handed_out: Default::default(),
    };
    leader.write(commit).await.unwrap();
    for (i, (all, layout)) in watches.iter_mut().enumerate() {
        let told = tokio::time::timeout(Duration::from_secs(5), all.changed()).await;
        assert!(matches!(told, Ok(Ok(()))), "node {i}: the commit is a state change");
        let woken = tokio::time::timeout(Duration::from_secs(1), layout.changed()).await;
        assert!(woken.is_err(), "node {i}: an offset commit woke the duties that scan the whole state");
    }

    let create = Command::CreateTopic { namespace: "default".into(), name: "u".into(), spec: topic() };
    leader.write(create).await.unwrap();
    for (i, (_, layout)) in watches.iter_mut().enumerate() {
        let woken = tokio::time::timeout(Duration::from_secs(5), layout.changed()).await;
        assert!(matches!(woken, Ok(Ok(()))), "node {i}: a new topic is a layout change");
    }
    stop_all(nodes).await;
}

/// Publishes request `sequence` of producer 99 to topic `t` through `node` (messages
/// `sequence * 5` .. `+ 5`), again until it is answered (as a client that did not hear
/// an answer does, with the same key), for up to 30 s.
async fn keyed_publish(node: &TestNode, sequence: u32) -> eventtermq_proto::v1::PublishResponse {
    use eventtermq_broker::replication::dedupe::Key;
    use eventtermq_proto::v1::{Message, Persistence};
    let messages: Vec<Message> = (0..5)
        .map(|i| Message { data: (sequence * 5 + i).to_string().into_bytes().into(), ..Default::default() })
        .collect();
    let key = Some(Key { producer: 99, sequence: u64::from(sequence) });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match node.handle.segments.publish("default", "t", &messages, Persistence::Replicated, key, 0).await {
            Ok(r) => return r,
            Err(e) if Instant::now() < deadline => {
                eprintln!("publish {sequence} again after: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("publish {sequence}: {e:?}"),
        }
    }
}

/// Exactly-once publishing across rotations (the window handed from primary to
/// primary) and a primary crash (rebuilt from the records): every request sent again
/// with its producer id and sequence is answered as first stored, and every message
/// is in the topic once.
#[tokio::test(start_paused = true)]
async fn keyed_publishes_are_stored_once_across_rotations_and_a_primary_crash() {
    use eventtermq_proto::v1::PublishResponse;
    let dir = tempfile::tempdir().unwrap();
    let net = TestNet::new();
    let mut nodes = three(&net, dir.path()).await;
    // Small segments: a rotation every few requests.
    let spec = TopicSpec { segment_size_max_bytes: 600, ..topic() };
    let cmd = Command::CreateTopic { namespace: "default".into(), name: "t".into(), spec };
    nodes[0].handle.cluster.write(cmd).await.unwrap();
    eventually(Duration::from_secs(10), "an open segment", || async { primary_index(&nodes).is_some() }).await;

    const REQUESTS: u32 = 30;
    let mut first: Vec<PublishResponse> = Vec::new();
    for s in 0..REQUESTS {
        let r = keyed_publish(&nodes[(s % 3) as usize], s).await;
        assert!(!r.duplicate && r.count == 5, "{r:?}");
        first.push(r);
    }
    let generations =
        |nodes: &[TestNode]| nodes[0].handle.cluster.state.read().state.topic_segments("default", "t").count();
    assert!(generations(&nodes) > 3, "rotations: {}", generations(&nodes));
    // Again, through other nodes: answered as stored, in whichever generation.
    for s in 0..REQUESTS {
        let r = keyed_publish(&nodes[((s + 1) % 3) as usize], s).await;
        assert!(r.duplicate, "{s}: {r:?}");
        assert_eq!(
            (r.segment_id, r.first_offset, r.count),
            (first[s as usize].segment_id, first[s as usize].first_offset, 5)
        );
    }

    // Crash the current primary: its window is gone with it; the next generation's
    // primary reads the crashed one's records instead.
    let pi = primary_index(&nodes).unwrap();
    let dead = nodes.remove(pi);
    let (dead_name, dead_id) = (dead.name.clone(), dead.handle.id);
    net.detach(&dead.name);
    dead.handle.kill().await;
    for s in 0..REQUESTS + 5 {
        let r = keyed_publish(&nodes[(s % 2) as usize], s).await;
        assert_eq!(r.duplicate, s < REQUESTS, "{s}: {r:?}");
    }

    // The crashed node comes back; as the least loaded node with the lowest id it
    // becomes the primary of later generations again, and asks the survivor that was
    // primary before it for the window (handed over between nodes).
    nodes.push(start(&net, dir.path(), &dead_name, &["a:1", "b:1", "c:1"]).await);
    eventually(Duration::from_secs(20), "the restarted node ALIVE", || async {
        nodes.iter().all(|n| alive_records(n) == 3)
    })
    .await;
    let mut s = REQUESTS + 5;
    while s < REQUESTS + 50 && primary_index(&nodes).map(|i| nodes[i].handle.id) != Some(dead_id) {
        let r = keyed_publish(&nodes[(s % 3) as usize], s).await;
        assert!(!r.duplicate, "{s}: {r:?}");
        s += 1;
    }
    assert_eq!(primary_index(&nodes).map(|i| nodes[i].handle.id), Some(dead_id), "the primary moved back");
    for again in 0..s {
        let r = keyed_publish(&nodes[(again % 3) as usize], again).await;
        assert!(r.duplicate, "{again}: {r:?}");
    }
    let mut got = read_topic(&nodes[0]).await;
    got.sort_unstable();
    assert_eq!(got, (0..s * 5).collect::<Vec<_>>(), "every message once");
    stop_all(nodes).await;
}

/// A node whose data directory is below its free-space watermark (here: a watermark of
/// the whole filesystem) says so in the cluster state, gets no segment, and the others
/// carry on without it: publishes, also through it, are confirmed on the two with room,
/// and the topic shows as under-replicated rather than silently short of a copy.
#[tokio::test(start_paused = true)]
async fn a_node_below_its_disk_watermark_gets_no_segment_and_the_others_carry_on() {
    let dir = tempfile::tempdir().unwrap();
    let net = TestNet::new();
    let a = start(&net, dir.path(), "a:1", &[]).await;
    let b = start(&net, dir.path(), "b:1", &["a:1"]).await;
    let full = |c: &mut NodeConfig| c.data.disk_watermark.free_min_percent = 100;
    let c = start_tuned(&net, dir.path(), "c:1", &["a:1"], full).await;
    let nodes = vec![a, b, c];
    eventually(Duration::from_secs(20), "3 voters, and node c's low disk in the state", || async {
        nodes.iter().all(|n| voters(n) == 3 && alive_records(n) == 3)
            && nodes[0].handle.cluster.state.read().state.disk_low.contains_key(&nodes[2].handle.id)
    })
    .await;
    assert!(nodes[2].handle.segments.disk().status().below);

    let cmd = Command::CreateTopic { namespace: "default".into(), name: "t".into(), spec: topic() };
    nodes[0].handle.cluster.write(cmd).await.unwrap();
    eventually(Duration::from_secs(10), "an open segment", || async { primary_index(&nodes).is_some() }).await;
    let low = nodes[2].handle.id;
    {
        let st = nodes[0].handle.cluster.state.read();
        let (_, seg) = st.state.topic_segments("default", "t").find(|(_, s)| s.is_open()).unwrap();
        assert_eq!(seg.replicas.len(), 2, "{seg:?}");
        assert!(!seg.replicas.contains(&low), "a segment on the node without space: {seg:?}");
        let topics = eventtermq_broker::api::convert::topics_to_pb(
            &st.state,
            "default",
            &st.state.namespaces["default"].topics,
            &|_| None,
        );
        assert!(topics[0].under_replicated, "the topic shows it is short of a copy");
    }
    let confirmed = publish_ids(&nodes[2], 0..100).await;
    assert_eq!(confirmed.len(), 100, "publishes through the low node go to the primary, which has room");
    let read = read_topic(&nodes[0]).await;
    assert_eq!(read, confirmed);
    assert!(nodes[2].handle.segments.store().list().is_empty(), "no data written on the low node");
    stop_all(nodes).await;
}

/// The open segment of topic `t`: (its id, its replica set).
fn open_segment(node: &TestNode) -> Option<(u64, Vec<u64>)> {
    let st = node.handle.cluster.state.read();
    let open =
        st.state.topic_segments("default", "t").find(|(_, s)| s.is_open()).map(|(id, s)| (id, s.replicas.clone()));
    open
}

fn set_disk_full(node: &TestNode, full: bool) {
    let percent = if full { 100 } else { 0 };
    let watermark = eventtermq_broker::disk::Watermark { free_min_bytes: 0, free_min_percent: percent };
    node.handle.segments.disk().set_watermark(watermark);
}

/// Disks filling one after another while publishing: a replica that goes below its
/// watermark is replaced like a dead one (the segment rotates onto the nodes with
/// room), publishing goes on; once too few nodes have room, publishes are refused with
/// `DiskFull` naming the nodes; when space returns, publishing resumes and segments get
/// every replica again. No confirmed message is lost.
#[tokio::test(start_paused = true)]
async fn disks_filling_move_segments_away_refuse_when_too_few_have_room_and_recover() {
    let dir = tempfile::tempdir().unwrap();
    let net = TestNet::new();
    let nodes = three(&net, dir.path()).await;
    let cmd = Command::CreateTopic { namespace: "default".into(), name: "t".into(), spec: topic() };
    nodes[0].handle.cluster.write(cmd).await.unwrap();
    eventually(Duration::from_secs(10), "an open segment", || async { open_segment(&nodes[0]).is_some() }).await;
    let mut confirmed = publish_ids(&nodes[0], 0..100).await;
    assert_eq!(confirmed.len(), 100);

    // A replica's disk fills: the segment moves to the two others.
    let (first, replicas) = open_segment(&nodes[0]).unwrap();
    let replica = nodes.iter().position(|n| n.handle.id == replicas[2]).unwrap();
    set_disk_full(&nodes[replica], true);
    let low_id = nodes[replica].handle.id;
    eventually(Duration::from_secs(10), "a successor without the full replica", || async {
        open_segment(&nodes[0]).is_some_and(|(id, r)| id != first && r.len() == 2 && !r.contains(&low_id))
    })
    .await;
    let more = publish_ids(&nodes[replica], 100..200).await;
    assert_eq!(more.len(), 100, "publishing goes on, also through the full node");
    confirmed.extend(more);

    // The primary of the successor fills too: one node with room, two needed.
    let (_, replicas) = open_segment(&nodes[0]).unwrap();
    let primary = nodes.iter().position(|n| n.handle.id == replicas[0]).unwrap();
    set_disk_full(&nodes[primary], true);
    let publish_one = || async {
        // A number, like every message of the test, so that `read_topic` can read it.
        let m = eventtermq_proto::v1::Message { data: "1000000".into(), ..Default::default() };
        nodes[0]
            .handle
            .segments
            .publish("default", "t", &[m], eventtermq_proto::v1::Persistence::Replicated, None, 0)
            .await
    };
    // First the primary refuses (its own disk); once it closed its segment, the
    // cluster does (no segment can be opened), naming both nodes without room.
    let primary_id = nodes[primary].handle.id;
    eventually(Duration::from_secs(10), "publishes refused for disk space, naming both nodes", || async {
        publish_one().await.is_err_and(|e| {
            e.code == eventtermq_broker::error::ErrorCode::DiskFull
                && e.message.contains(&format!("node {low_id} ("))
                && e.message.contains(&format!("node {primary_id} ("))
        })
    })
    .await;
    assert!(open_segment(&nodes[0]).is_none(), "no segment is opened on one node with room");
    let st = nodes[0].handle.cluster.state.read().state.clone();
    assert_eq!(st.disk_low.len(), 2, "{:?}", st.disk_low);

    // Space returns: publishing resumes, and the next segments get every replica.
    set_disk_full(&nodes[replica], false);
    set_disk_full(&nodes[primary], false);
    eventually(Duration::from_secs(10), "publishing resumed", || async { publish_one().await.is_ok() }).await;
    let more = publish_ids(&nodes[1], 200..300).await;
    assert_eq!(more.len(), 100);
    confirmed.extend(more);
    eventually(Duration::from_secs(20), "an open segment on all three", || async {
        open_segment(&nodes[0]).is_some_and(|(_, r)| r.len() == 3)
    })
    .await;
    let read: std::collections::HashSet<u32> = read_topic(&nodes[2]).await.into_iter().filter(|_| true).collect();
    let lost: Vec<_> = confirmed.iter().filter(|i| !read.contains(i)).collect();
    assert!(lost.is_empty(), "lost confirmed messages {lost:?}");
    stop_all(nodes).await;
}

/// The value of `name{...}` in a scrape of `node`, whose labels include every one of
/// `labels`.
async fn scraped(node: &TestNode, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let text = node.handle.observer.render(false).await;
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let rest = series.strip_prefix(name)?.strip_prefix('{')?;
        labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))).then(|| value.parse().ok()).flatten()
    })
}

/// Topic `t` (one shard) and group `g` bound to it with a buffer of `size` messages,
/// placed, after `before` other groups (each goes to the node with the fewest, the
/// smallest id first), and an open segment: the id of the group's node.
async fn topic_and_group(nodes: &[TestNode], before: &[&str], size: u32) -> u64 {
    use eventtermq_broker::cluster_state::{BindingSpec, ConsumerGroupSpec};
    let create = Command::CreateTopic { namespace: "default".into(), name: "t".into(), spec: topic() };
    nodes[0].handle.cluster.write(create).await.unwrap();
    let mut placed = 0;
    for name in before.iter().chain(&["g"]) {
        let spec = ConsumerGroupSpec {
            bindings: vec![BindingSpec::fanout("t")],
            size,
            since_unix_ms: 0,
            ..Default::default()
        };
        let cmd = Command::CreateConsumerGroup { namespace: "default".into(), name: name.to_string(), spec };
        nodes[0].handle.cluster.write(cmd).await.unwrap();
        placed = wait_for(Duration::from_secs(10), "the group placed", || {
            nodes[0].handle.cluster.state.read().state.group_runtime("default", name).and_then(|g| g.node)
        })
        .await;
    }
    eventually(Duration::from_secs(10), "an open segment", || async { primary_index(nodes).is_some() }).await;
    placed
}

/// An idle group whose segment's primary is another node keeps one read waiting there
/// for up to `read_wait_ms`, not the request timeout: at 10,000 groups, reads that came
/// back every 10 s were most of an idle cluster's CPU.
#[tokio::test(start_paused = true)]
async fn an_idle_group_reading_from_another_node_asks_once_per_read_wait() {
    let dir = tempfile::tempdir().unwrap();
    let net = TestNet::new();
    let nodes = three_tuned(&net, dir.path(), |c| c.data.read_wait_ms = 60_000).await;
    let placed = topic_and_group(&nodes, &["first"], 10).await;
    let primary = &nodes[primary_index(&nodes).unwrap()];
    assert_ne!(primary.handle.id, placed, "the group runs on another node than the primary");
    assert_eq!(publish_ids(primary, 0..1).await.len(), 1);
    let reads = [("method", "/eventter.internal.v1.Internal/ReadSegment"), ("code", "0")];
    eventually(Duration::from_secs(10), "the group read the message from the primary", || async {
        scraped(primary, "eventtermq_grpc_requests_total", &reads).await.is_some()
    })
    .await;
    let before = scraped(primary, "eventtermq_grpc_requests_total", &reads).await.unwrap();
    // Ten request timeouts (3 s here) of nothing new.
    tokio::time::sleep(Duration::from_secs(30)).await;
    let after = scraped(primary, "eventtermq_grpc_requests_total", &reads).await.unwrap();
    assert!(after - before <= 1.0, "{} reads answered in 30 idle seconds", after - before);
    stop_all(nodes).await;
}

/// A one-off read (`do_not_block`, AMQP's `basic.get`) answers "nothing left" as soon
/// as it knows, not after the reads' wait (60 s here) or the request timeout (3 s);
/// and one made right after a publish was confirmed finds that message, though the
/// group's read of the open segment was waiting since before it.
#[tokio::test(start_paused = true)]
async fn a_one_off_read_answers_empty_at_once_and_finds_what_was_just_confirmed() {
    use eventtermq_proto::v1::messaging_client::MessagingClient;
    use eventtermq_proto::v1::SubscribeRequest;

    let dir = tempfile::tempdir().unwrap();
    let net = TestNet::new();
    let nodes = three_tuned(&net, dir.path(), |c| c.data.read_wait_ms = 60_000).await;
    let placed = topic_and_group(&nodes, &["first"], 10).await;
    let primary = &nodes[primary_index(&nodes).unwrap()];
    assert_ne!(primary.handle.id, placed, "the group reads from another node's primary");
    let (client, _listeners) = net.attach("client:1");
    let mut messaging = MessagingClient::new(client.data_channel(&primary.name));
    let get = SubscribeRequest {
        consumer_group: "g".into(),
        auto_ack: true,
        size: 1,
        do_not_block: true,
        max_messages: 1,
        ..Default::default()
    };
    for round in 0..5u32 {
        let mut empty = messaging.subscribe(get.clone()).await.unwrap().into_inner();
        let answer = tokio::time::timeout(Duration::from_secs(1), empty.message()).await;
        assert!(matches!(answer, Ok(Ok(None))), "round {round}: not an empty answer at once: {answer:?}");

        assert_eq!(publish_ids(primary, round..round + 1).await, [round]);
        let mut one = messaging.subscribe(get.clone()).await.unwrap().into_inner();
        let m = tokio::time::timeout(Duration::from_secs(1), one.message()).await.unwrap().unwrap();
        let data = m.and_then(|d| d.message).map(|m| String::from_utf8(m.data.to_vec()).unwrap());
        assert_eq!(data, Some(round.to_string()), "round {round}: the confirmed message");
    }
    stop_all(nodes).await;
}

#[tokio::test(start_paused = true)]
async fn lag_follows_publishes_while_the_group_buffer_is_full() {
    let dir = tempfile::tempdir().unwrap();
    let net = TestNet::new();
    let nodes = three(&net, dir.path()).await;
    // Another group first, so that g runs on another node than the segment's primary
    // (the least loaded, smallest id first, as the first group): it reads from there.
    let placed = topic_and_group(&nodes, &["first"], 10).await;
    let group_node = nodes.iter().find(|n| n.handle.id == placed).unwrap();
    let primary = &nodes[primary_index(&nodes).unwrap()];
    assert_ne!(primary.handle.id, placed, "the group runs on another node than the primary");
    let lag = [("group", "g"), ("topic", "t")];
    for (batch, expected) in [(0..50, 50.0), (50..120, 120.0)] {
        assert_eq!(publish_ids(primary, batch.clone()).await.len(), batch.len());
        // The buffer holds 10 and nobody consumes: the group does not read the rest,
        // and learns how far the segment goes by peeking at it.
        eventually(Duration::from_secs(10), &format!("lag {expected}"), || async {
            scraped(group_node, "eventtermq_consumer_group_lag_records", &lag).await == Some(expected)
        })
        .await;
    }
    let buffered = [("group", "g"), ("state", "pending")];
    assert_eq!(scraped(group_node, "eventtermq_consumer_group_buffered_messages", &buffered).await, Some(10.0));
    stop_all(nodes).await;
}

/// PurgeConsumerGroup on a node that does not run the group, while the group's buffer
/// (10) is full and most of what was published is not read yet: everything goes, what
/// comes after is delivered; an exclusive subscriber then refuses any other.
/// An offset commit that fails (the group's node cut off from the cluster for longer
/// than a write may take) is made again, though the group then stays idle: what it
/// consumed is recorded once the network heals, not delivered again after a restart
/// and kept from retention for ever.
#[tokio::test(start_paused = true)]
async fn an_offset_commit_that_failed_is_made_again_by_an_idle_group() {
    use eventtermq_proto::v1::messaging_client::MessagingClient;
    use eventtermq_proto::v1::SubscribeRequest;

    let dir = tempfile::tempdir().unwrap();
    let net = TestNet::new();
    // Writes give up quickly; gossip does not call the cut-off node DEAD meanwhile
    // (which would move the group away).
    let nodes = three_tuned(&net, dir.path(), |c| {
        c.request_timeout_ms = 500;
        c.membership.suspect_to_down_ms = 120_000;
    })
    .await;
    let placed = topic_and_group(&nodes, &[], 100).await;
    let group_node = nodes.iter().find(|n| n.handle.id == placed).unwrap();
    let primary = &nodes[primary_index(&nodes).unwrap()];
    assert_eq!(publish_ids(primary, 0..20).await.len(), 20);

    let (client, _listeners) = net.attach("client:1");
    let mut messaging = MessagingClient::new(client.data_channel(&group_node.name));
    let req = SubscribeRequest { consumer_group: "g".into(), auto_ack: true, size: 100, ..Default::default() };
    let mut stream = wait_for_stream(&mut messaging, req).await;
    for _ in 0..20 {
        tokio::time::timeout(Duration::from_secs(10), stream.message()).await.unwrap().unwrap().unwrap();
    }
    drop(stream);
    // Cut off before the group's next commit (within one commit interval): it fails,
    // and so does every one made while the cut lasts.
    net.isolate(&group_node.name);
    tokio::time::sleep(Duration::from_secs(5)).await;
    net.heal();
    let others: Vec<&TestNode> = nodes.iter().filter(|n| n.handle.id != placed).collect();
    eventually(Duration::from_secs(20), "the 20 acknowledged messages recorded", || async {
        let st = others[0].handle.cluster.state.read();
        st.state.group_runtime("default", "g").is_some_and(|g| g.offsets.values().sum::<u64>() == 20)
    })
    .await;
    stop_all(nodes).await;
}

#[tokio::test(start_paused = true)]
async fn a_purge_drops_what_is_buffered_and_unread_and_an_exclusive_subscriber_is_alone() {
    use eventtermq_proto::v1::admin_client::AdminClient;
    use eventtermq_proto::v1::messaging_client::MessagingClient;
    use eventtermq_proto::v1::{self as pb, SubscribeRequest};

    let dir = tempfile::tempdir().unwrap();
    let net = TestNet::new();
    let nodes = three(&net, dir.path()).await;
    let placed = topic_and_group(&nodes, &["first"], 10).await;
    let group_node = nodes.iter().find(|n| n.handle.id == placed).unwrap();
    let other = nodes.iter().find(|n| n.handle.id != placed).unwrap();
    let primary = &nodes[primary_index(&nodes).unwrap()];
    assert_eq!(publish_ids(primary, 0..50).await.len(), 50);
    let lag = [("group", "g"), ("topic", "t")];
    eventually(Duration::from_secs(10), "lag 50", || async {
        scraped(group_node, "eventtermq_consumer_group_lag_records", &lag).await == Some(50.0)
    })
    .await;

    let (client, _listeners) = net.attach("client:1");
    let mut admin = AdminClient::new(client.data_channel(&other.name));
    let purge = || pb::PurgeConsumerGroupRequest { namespace: String::new(), name: "g".into() };
    assert_eq!(admin.purge_consumer_group(purge()).await.unwrap().into_inner().purged, 50);
    assert_eq!(scraped(group_node, "eventtermq_consumer_group_lag_records", &lag).await, Some(0.0));
    // Recorded before the answer: a restart of the group would not bring them back.
    let leader = &nodes[leader_index(&nodes)];
    let recorded = leader.handle.cluster.state.read().state.group_runtime("default", "g").unwrap().offsets.clone();
    assert_eq!(recorded.values().sum::<u64>(), 50, "{recorded:?}");
    assert_eq!(admin.purge_consumer_group(purge()).await.unwrap().into_inner().purged, 0);
    let missing = pb::PurgeConsumerGroupRequest { namespace: String::new(), name: "missing".into() };
    let e = admin.purge_consumer_group(missing).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");

    let mut messaging = MessagingClient::new(client.data_channel(&other.name));
    let sub = |exclusive| SubscribeRequest {
        consumer_group: "g".into(),
        auto_ack: true,
        size: 10,
        exclusive,
        ..Default::default()
    };
    let mut alone = messaging.subscribe(sub(true)).await.unwrap().into_inner();
    for exclusive in [false, true] {
        let e = messaging.subscribe(sub(exclusive)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
        assert_eq!(e.metadata().get("eventter-error-code").unwrap(), "4012");
    }
    assert_eq!(publish_ids(primary, 50..55).await.len(), 5);
    let mut got = Vec::new();
    while got.len() < 5 {
        let m = tokio::time::timeout(Duration::from_secs(10), alone.message()).await.unwrap().unwrap().unwrap();
        got.push(String::from_utf8(m.message.unwrap().data.to_vec()).unwrap());
    }
    assert_eq!(got, ["50", "51", "52", "53", "54"], "only what was published after the purge");
    drop(alone);
    eventually(Duration::from_secs(10), "another subscriber once the exclusive one left", || async {
        messaging.clone().subscribe(sub(false)).await.is_ok()
    })
    .await;
    stop_all(nodes).await;
}

#[tokio::test(start_paused = true)]
async fn consumer_lag_is_what_is_published_and_not_acknowledged_in_metrics_and_admin() {
    use eventtermq_proto::v1::admin_client::AdminClient;
    use eventtermq_proto::v1::messaging_client::MessagingClient;
    use eventtermq_proto::v1::{self as pb, Message, PublishRequest, SubscribeRequest};

    let dir = tempfile::tempdir().unwrap();
    let net = TestNet::new();
    let nodes = three(&net, dir.path()).await;
    let placed = topic_and_group(&nodes, &[], 1000).await;
    let group_node = nodes.iter().find(|n| n.handle.id == placed).unwrap();
    let other = nodes.iter().find(|n| n.handle.id != placed).unwrap();

    // 100 messages in 10 requests through the gRPC API of a node.
    let (client, _listeners) = net.attach("client:1");
    let mut messaging = MessagingClient::new(client.data_channel(&nodes[0].name));
    for batch in 0..10 {
        let messages = (0..10).map(|i| Message { data: format!("{batch}-{i}").into(), ..Default::default() }).collect();
        let req = PublishRequest { topic: "t".into(), messages, ..Default::default() };
        messaging.publish(req).await.unwrap();
    }
    let published = [("topic", "t"), ("persistence", "default")];
    assert_eq!(scraped(&nodes[0], "eventtermq_publish_messages_total", &published).await, Some(100.0));
    let lag = [("group", "g"), ("topic", "t")];
    eventually(Duration::from_secs(10), "lag 100 before anything is consumed", || async {
        scraped(group_node, "eventtermq_consumer_group_lag_records", &lag).await == Some(100.0)
    })
    .await;

    // 30 consumed and acknowledged through a node that does not run the group.
    let mut messaging = MessagingClient::new(client.data_channel(&other.name));
    let req = SubscribeRequest {
        consumer_group: "g".into(),
        auto_ack: true,
        max_messages: 30,
        size: 30,
        ..Default::default()
    };
    let mut stream = messaging.subscribe(req).await.unwrap().into_inner();
    let mut got = 0;
    while got < 30 {
        let m = tokio::time::timeout(Duration::from_secs(10), stream.message()).await.unwrap().unwrap();
        assert!(m.is_some(), "the stream ended after {got} messages");
        got += 1;
    }
    // The stream ends once the 30 acks are in the cluster state (a restart right now
    // would not deliver them again).
    assert!(tokio::time::timeout(Duration::from_secs(10), stream.message()).await.unwrap().unwrap().is_none());
    let leader = &nodes[leader_index(&nodes)];
    let recorded = leader.handle.cluster.state.read().state.group_runtime("default", "g").unwrap().offsets.clone();
    assert_eq!(recorded.values().sum::<u64>(), 30, "{recorded:?}");
    eventually(Duration::from_secs(10), "lag 70 once 30 are acknowledged", || async {
        scraped(group_node, "eventtermq_consumer_group_lag_records", &lag).await == Some(70.0)
    })
    .await;
    let acks = scraped(group_node, "eventtermq_consumer_group_acks_total", &[("group", "g")]).await;
    assert_eq!(acks, Some(30.0));

    // The Admin call, on a node that asks the group's node, and ListConsumerGroups.
    let mut admin = AdminClient::new(client.data_channel(&other.name));
    let req = pb::DescribeConsumerGroupsRequest { namespace: String::new(), names: vec![] };
    let groups = admin.describe_consumer_groups(req).await.unwrap().into_inner().consumer_groups;
    let [g] = &groups[..] else { panic!("one group: {groups:?}") };
    assert!(g.running, "{g:?}");
    assert_eq!((g.name.as_str(), g.node_id, g.lag, g.topic_lag.get("t")), ("g", placed, 70, Some(&70)), "{g:?}");
    assert_eq!(g.committed_offsets.values().sum::<u64>(), 30, "{g:?}");
    let req = pb::ListConsumerGroupsRequest { namespace: String::new(), ..Default::default() };
    let listed = admin.list_consumer_groups(req).await.unwrap().into_inner().consumer_groups;
    assert_eq!(listed[0].node_id, placed);
    stop_all(nodes).await;
}

#[tokio::test(start_paused = true)]
async fn messages_held_past_the_ack_timeout_are_redelivered_counted() {
    use eventtermq_broker::cluster_state::{BindingSpec, ConsumerGroupSpec};
    use eventtermq_proto::v1::messaging_client::MessagingClient;
    use eventtermq_proto::v1::{AckRequest, Delivery, Message, PublishRequest, SubscribeRequest};

    let dir = tempfile::tempdir().unwrap();
    let net = TestNet::new();
    let nodes = three(&net, dir.path()).await;
    let create = Command::CreateTopic { namespace: "default".into(), name: "t".into(), spec: topic() };
    nodes[0].handle.cluster.write(create).await.unwrap();
    let spec = ConsumerGroupSpec {
        bindings: vec![BindingSpec::fanout("t")],
        size: 100,
        ack_timeout_ms: 2_000,
        ..Default::default()
    };
    let cmd = Command::CreateConsumerGroup { namespace: "default".into(), name: "g".into(), spec };
    nodes[0].handle.cluster.write(cmd).await.unwrap();
    wait_for(Duration::from_secs(10), "the group placed", || {
        nodes[0].handle.cluster.state.read().state.group_runtime("default", "g").and_then(|g| g.node)
    })
    .await;
    eventually(Duration::from_secs(10), "an open segment", || async { primary_index(&nodes).is_some() }).await;

    let (client, _listeners) = net.attach("client:1");
    let mut messaging = MessagingClient::new(client.data_channel(&nodes[0].name));
    let messages = (0..3).map(|i| Message { data: format!("m{i}").into(), ..Default::default() }).collect();
    messaging.publish(PublishRequest { topic: "t".into(), messages, ..Default::default() }).await.unwrap();

    // A takes all three and never acks; its stream stays open while it holds them.
    let sub =
        |max_messages| SubscribeRequest { consumer_group: "g".into(), size: 10, max_messages, ..Default::default() };
    let mut a = messaging.subscribe(sub(3)).await.unwrap().into_inner();
    for _ in 0..3 {
        let m = tokio::time::timeout(Duration::from_secs(10), a.message()).await.unwrap().unwrap().unwrap();
        assert_eq!((m.delivery_count, m.redelivered), (1, false), "{m:?}");
        let ts = m.timestamp.expect("the broker's timestamp");
        assert!(ts.seconds * 1000 >= START_UNIX_MS, "{ts:?}");
    }
    let mut b = messaging.subscribe(sub(0)).await.unwrap().into_inner();
    // Nothing for B before the ack timeout ...
    assert!(tokio::time::timeout(Duration::from_millis(1_500), b.message()).await.is_err());
    // ... then A's three, counted twice; A's stream ends, holding nothing any more.
    let mut again = Vec::new();
    for _ in 0..3 {
        let m = tokio::time::timeout(Duration::from_secs(5), b.message()).await.unwrap().unwrap().unwrap();
        assert_eq!((m.delivery_count, m.redelivered), (2, true), "{m:?}");
        again.push(Delivery { segment_id: m.segment_id, offset: m.offset });
    }
    assert!(tokio::time::timeout(Duration::from_secs(5), a.message()).await.unwrap().unwrap().is_none());

    // Acked twice (a retry after a lost answer): OK both times. Never delivered: refused.
    let ack = |deliveries| AckRequest { consumer_group: "g".into(), deliveries, ..Default::default() };
    messaging.ack(ack(again.clone())).await.unwrap();
    messaging.ack(ack(again.clone())).await.unwrap();
    let never = Delivery { segment_id: again[0].segment_id, offset: 99 };
    let e = messaging.ack(ack(vec![never])).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    // Acked in time: nothing comes back.
    assert!(tokio::time::timeout(Duration::from_secs(5), b.message()).await.is_err());
    drop((a, b));
    stop_all(nodes).await;
}

/// Deliveries are counted across a group fail-over: messages handed out on the
/// group's node and never acknowledged come again from the node the group moves to
/// with `delivery_count` 2 (the hand-out recorded with the group's offsets counts as
/// one delivery), and after `deliveries_max` (2) they go to the dead-letter topic,
/// saying how often they were delivered, in the order they were published.
#[tokio::test(start_paused = true)]
async fn deliveries_are_counted_across_a_group_fail_over_up_to_the_dead_letter_topic() {
    use eventtermq_broker::cluster_state::{BindingSpec, ConsumerGroupSpec};
    use eventtermq_proto::v1::messaging_client::MessagingClient;
    use eventtermq_proto::v1::{Message, PublishRequest, SubscribeRequest};

    let dir = tempfile::tempdir().unwrap();
    let net = TestNet::new();
    let mut nodes = three(&net, dir.path()).await;
    for t in ["t", "dead"] {
        let create = Command::CreateTopic { namespace: "default".into(), name: t.into(), spec: topic() };
        nodes[0].handle.cluster.write(create).await.unwrap();
    }
    let group =
        |name: &str, spec| Command::CreateConsumerGroup { namespace: "default".into(), name: name.into(), spec };
    let spec = ConsumerGroupSpec {
        bindings: vec![BindingSpec::fanout("t")],
        size: 100,
        ack_timeout_ms: 2_000,
        deliveries_max: 2,
        dead_letter_topic: "dead".into(),
        ..Default::default()
    };
    nodes[0].handle.cluster.write(group("g", spec)).await.unwrap();
    let dead_spec = ConsumerGroupSpec { bindings: vec![BindingSpec::fanout("dead")], size: 100, ..Default::default() };
    nodes[0].handle.cluster.write(group("d", dead_spec)).await.unwrap();
    let node_of = |nodes: &[TestNode], g: &str| {
        nodes[0].handle.cluster.state.read().state.group_runtime("default", g).and_then(|r| r.node)
    };
    let placed = wait_for(Duration::from_secs(10), "the group placed", || node_of(&nodes, "g")).await;
    eventually(Duration::from_secs(10), "open segments", || async {
        let st = nodes[0].handle.cluster.state.read();
        ["t", "dead"].iter().all(|t| st.state.topic_segments("default", t).any(|(_, s)| s.is_open()))
    })
    .await;

    let gi = nodes.iter().position(|n| n.handle.id == placed).unwrap();
    let via = (gi + 1) % 3;
    let (client, _listeners) = net.attach("client:1");
    let mut messaging = MessagingClient::new(client.data_channel(&nodes[via].name));
    let messages = (0..3).map(|i| Message { data: format!("m{i}").into(), ..Default::default() }).collect();
    messaging.publish(PublishRequest { topic: "t".into(), messages, ..Default::default() }).await.unwrap();
    let sub = |group: &str, max_messages| SubscribeRequest {
        consumer_group: group.into(),
        size: 10,
        max_messages,
        ..Default::default()
    };

    // Handed out once on the group's node, never acknowledged, and recorded so.
    let mut a = messaging.subscribe(sub("g", 3)).await.unwrap().into_inner();
    for _ in 0..3 {
        let m = tokio::time::timeout(Duration::from_secs(10), a.message()).await.unwrap().unwrap().unwrap();
        assert_eq!(m.delivery_count, 1, "{m:?}");
    }
    eventually(Duration::from_secs(10), "the hand-outs recorded", || async {
        let st = nodes[via].handle.cluster.state.read();
        st.state.group_runtime("default", "g").is_some_and(|r| r.handed_out.values().sum::<u64>() == 3)
    })
    .await;
    drop(a);
    let dead = nodes.remove(gi);
    net.detach(&dead.name);
    dead.handle.kill().await;
    let via = if via > gi { via - 1 } else { via };
    let moved = wait_for(Duration::from_secs(30), "the group on a survivor", || {
        node_of(&nodes, "g").filter(|n| *n != placed && nodes.iter().any(|s| s.handle.id == *n))
    })
    .await;

    // The second delivery, from the survivor: counted 2, redelivered.
    let mut messaging = MessagingClient::new(client.data_channel(&nodes[via].name));
    let mut b = wait_for_stream(&mut messaging, sub("g", 3)).await;
    let mut data = Vec::new();
    for _ in 0..3 {
        let m = tokio::time::timeout(Duration::from_secs(20), b.message()).await.unwrap().unwrap().unwrap();
        assert_eq!((m.delivery_count, m.redelivered), (2, true), "{m:?} from node {moved}");
        data.push(m.message.unwrap().data);
    }
    // Not acknowledged within the ack timeout either: dead-lettered, counted 2.
    let mut d = wait_for_stream(&mut messaging, sub("d", 3)).await;
    let mut dead_data = Vec::new();
    for _ in 0..3 {
        let m = tokio::time::timeout(Duration::from_secs(20), d.message()).await.unwrap().unwrap().unwrap();
        let message = m.message.unwrap();
        assert_eq!(message.headers.get("x-delivery-count").map(String::as_str), Some("2"), "{message:?}");
        dead_data.push(message.data);
    }
    data.sort();
    assert_eq!(data, ["m0", "m1", "m2"]);
    // Dead-lettered in the order they were published (one publish, in log order).
    assert_eq!(dead_data, data);
    drop((b, d));
    stop_all(nodes).await;
}

/// Opens a subscription, retrying while the group is between nodes.
async fn wait_for_stream(
    messaging: &mut eventtermq_proto::v1::messaging_client::MessagingClient<tonic::transport::Channel>,
    req: eventtermq_proto::v1::SubscribeRequest,
) -> tonic::Streaming<eventtermq_proto::v1::SubscribeResponse> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match messaging.subscribe(req.clone()).await {
            Ok(s) => return s.into_inner(),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "subscribe retried");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("subscribe failed: {e:?}"),
        }
    }
}

/// Decommissioning the primary of a busy topic's open segment while a client publishes
/// through another node: its segments rotate away, its closed copies are copied to the
/// others, its consumer groups move, it is reported drained and demoted to Raft
/// learner; no confirmed message is lost, every closed segment keeps its replication
/// factor on the remaining nodes, and once stopped the node leaves the cluster at once.
#[tokio::test(start_paused = true)]
async fn decommission_under_traffic_moves_everything_off_the_node_and_loses_nothing() {
    decommission_under_traffic(|nodes| primary_index(nodes).unwrap()).await;
}

/// The same with the Raft leader decommissioned: four voters are too many for a
/// hand-over (the followers' leases refuse the candidate), so once drained the leader
/// demotes itself and the others elect a leader.
#[tokio::test(start_paused = true)]
async fn decommission_of_the_leader_under_traffic_loses_nothing() {
    decommission_under_traffic(leader_index).await;
}

async fn decommission_under_traffic(pick: impl Fn(&[TestNode]) -> usize) {
    init_logs();
    use eventtermq_broker::cluster_state::{BindingSpec, ConsumerGroupSpec};
    let dir = tempfile::tempdir().unwrap();
    let net = TestNet::new();
    let mut nodes = three(&net, dir.path()).await;
    nodes.push(start(&net, dir.path(), "d:1", &["a:1"]).await);
    eventually(Duration::from_secs(20), "4 voters and 4 ALIVE records", || async {
        nodes.iter().all(|n| voters(n) == 4 && alive_records(n) == 4)
    })
    .await;
    // Two shards: their open segments need all 4 nodes between them (the least loaded
    // first, ties by id), so whichever node is picked holds some; one shard's segments
    // would all go to the same 3 nodes.
    let spec = TopicSpec { segment_size_max_bytes: 2_000, shards: 2, ..topic() };
    nodes[0]
        .handle
        .cluster
        .write(Command::CreateTopic { namespace: "default".into(), name: "t".into(), spec })
        .await
        .unwrap();
    for g in ["g1", "g2", "g3", "g4"] {
        let spec = ConsumerGroupSpec { bindings: vec![BindingSpec::fanout("t")], size: 10, ..Default::default() };
        let cmd = Command::CreateConsumerGroup { namespace: "default".into(), name: g.into(), spec };
        nodes[0].handle.cluster.write(cmd).await.unwrap();
    }
    eventually(Duration::from_secs(10), "an open segment and every group placed", || async {
        let st = nodes[0].handle.cluster.state.read();
        primary_index(&nodes).is_some() && st.state.groups["default"].values().all(|g| g.node.is_some())
    })
    .await;
    let mut confirmed = publish_ids(&nodes[0], 0..200).await;
    assert_eq!(confirmed.len(), 200);
    let gone_index = pick(&nodes);
    let gone = nodes[gone_index].handle.id;
    let survivor = (gone_index + 1) % 4;
    let before = nodes[survivor].handle.cluster.state.read().state.drain_progress(gone);
    assert!(before.closed_segments >= 1 && before.consumer_groups >= 1, "{before:?}");

    // The client publishes through a survivor all along; the decommission starts as it does.
    let publisher = async {
        let mut ok = Vec::new();
        let mut failed_batches = 0;
        for start in (200..800).step_by(10) {
            let got = publish_ids(&nodes[survivor], start..start + 10).await;
            failed_batches += usize::from(got.is_empty());
            ok.extend(got);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (ok, failed_batches)
    };
    let drain = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = Instant::now();
        let cmd = Command::DecommissionNode { id: gone, cancel: false };
        nodes[survivor].handle.cluster.write(cmd).await.expect("decommission accepted");
        eventually(Duration::from_secs(60), "the node drained and demoted to learner", || async {
            let drained = nodes[survivor].handle.cluster.state.read().state.drain_progress(gone).drained();
            let m = nodes[survivor].handle.cluster.raft.metrics().borrow().membership_config.membership().clone();
            drained && !m.voter_ids().any(|v| v == gone) && m.learner_ids().any(|l| l == gone)
        })
        .await;
        started.elapsed()
    };
    let ((more, failed_batches), took) = tokio::join!(publisher, drain);
    eprintln!(
        "decommission drained in {took:?} (virtual); {} of 600 messages confirmed during it, {failed_batches} \
         batches of 10 refused",
        more.len()
    );
    confirmed.extend(more);

    // Every confirmed message is there, read from a remaining node.
    let read: std::collections::HashSet<u32> = read_topic(&nodes[survivor]).await.into_iter().collect();
    let lost: Vec<_> = confirmed.iter().filter(|i| !read.contains(i)).collect();
    assert!(lost.is_empty(), "lost confirmed messages {lost:?}");
    {
        let st = nodes[survivor].handle.cluster.state.read();
        for (id, s) in st.state.topic_segments("default", "t") {
            assert!(!s.replicas.contains(&gone), "segment {id} still on the drained node: {s:?}");
            if !s.is_open() {
                assert!(s.done.len() >= 3, "segment {id} has {} complete copies: {s:?}", s.done.len());
            }
        }
        assert!(st.state.groups["default"].values().all(|g| g.node.is_some_and(|n| n != gone)));
        let topics = eventtermq_broker::api::convert::topics_to_pb(
            &st.state,
            "default",
            &st.state.namespaces["default"].topics,
            &|_| None,
        );
        assert!(!topics[0].under_replicated, "{:?}", topics[0]);
    }
    eventually(Duration::from_secs(10), "the drained node's copies deleted", || async {
        nodes[gone_index].handle.segments.store().list().is_empty()
    })
    .await;

    // Stopped, the drained node leaves the cluster at once (not after dead_node_removal_ms).
    let node = nodes.remove(gone_index);
    let stopped = Instant::now();
    node.shutdown.cancel();
    node.handle.wait().await;
    let removed = || {
        let st = nodes[0].handle.cluster.state.read();
        let m = nodes[0].handle.cluster.raft.metrics().borrow().membership_config.membership().clone();
        !st.state.nodes.contains_key(&gone) && !st.state.draining.contains(&gone) && m.get_node(&gone).is_none()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !removed() {
        let st = nodes[0].handle.cluster.state.read().state.clone();
        let m = nodes[0].handle.cluster.raft.metrics().borrow().membership_config.clone();
        assert!(Instant::now() < deadline, "not removed: {:?} {:?} {m:?}", st.nodes, st.draining);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("the drained node was removed {:?} after its graceful stop began", stopped.elapsed());
    let after = publish_ids(&nodes[0], 1000..1010).await;
    assert_eq!(after.len(), 10, "publishing goes on with three nodes");
    stop_all(nodes).await;
}

/// Logs of the nodes on the test's output, filtered by `EVENTTERMQ_TEST_LOG` (e.g.
/// `eventtermq_broker=info`); none without it.
fn init_logs() {
    if let Ok(filter) = std::env::var("EVENTTERMQ_TEST_LOG") {
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    }
}

/// Writes to the cluster state through `node` one after another for `run`, and answers
/// the longest time between two that committed (and how many failed).
async fn longest_write_gap(node: &TestNode, tag: &str, run: Duration) -> (Duration, usize) {
    let end = Instant::now() + run;
    let (mut last, mut gap, mut failed) = (Instant::now(), Duration::ZERO, 0);
    let mut i = 0;
    while Instant::now() < end {
        i += 1;
        match node.handle.cluster.write(Command::CreateNamespace { name: format!("{tag}-{i}") }).await {
            Ok(_) => {
                gap = gap.max(last.elapsed());
                last = Instant::now();
            }
            Err(_) => failed += 1,
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (gap.max(last.elapsed()), failed)
}

/// Leadership hand-over: an explicit transfer (asked on a follower) moves leadership to
/// the voter named; a leader that stops gracefully hands leadership over, so writes
/// pause far shorter than when it is killed and the others must wait out an election
/// timeout. Prints both gaps (virtual time; election timeouts 200-400 ms here).
#[tokio::test(start_paused = true)]
async fn leadership_moves_on_request_and_before_a_graceful_stop() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let net = TestNet::new();
    let mut nodes = three(&net, dir.path()).await;

    // Explicit transfer, asked on a follower, to the other follower.
    let li = leader_index(&nodes);
    let (asked, target) = ((li + 1) % 3, (li + 2) % 3);
    let to = nodes[target].handle.id;
    let leader = nodes[asked].handle.cluster.transfer_leadership(Some(to)).await.expect("transfer");
    assert_eq!(leader, to);
    eventually(Duration::from_secs(5), "every node sees the new leader", || async {
        nodes.iter().all(|n| n.handle.cluster.leader().map(|(id, _)| id) == Some(to))
    })
    .await;
    let e = nodes[0].handle.cluster.transfer_leadership(Some(12345)).await.unwrap_err();
    assert_eq!(e.code, eventtermq_broker::error::ErrorCode::NodeNotFound, "{e}");

    // Graceful stop of the leader while a follower writes.
    let leaving = nodes.remove(leader_index(&nodes));
    let name = leaving.name.clone();
    let stop = async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        leaving.shutdown.cancel();
        leaving.handle.wait().await;
    };
    let ((graceful_gap, graceful_failed), ()) =
        tokio::join!(longest_write_gap(&nodes[0], "graceful", Duration::from_secs(3)), stop);
    nodes.push(start(&net, dir.path(), &name, &["a:1", "b:1", "c:1"]).await);
    eventually(Duration::from_secs(20), "3 ALIVE voters again", || async {
        nodes.iter().all(|n| voters(n) == 3 && alive_records(n) == 3) && nodes[0].handle.cluster.leader().is_some()
    })
    .await;

    // Kill of the leader while a follower writes: no hand-over.
    let dead = nodes.remove(leader_index(&nodes));
    let net_ref = &net;
    let kill = async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        net_ref.detach(&dead.name);
        dead.handle.kill().await;
    };
    let ((killed_gap, killed_failed), ()) =
        tokio::join!(longest_write_gap(&nodes[0], "killed", Duration::from_secs(3)), kill);
    eprintln!(
        "longest gap between committed writes: {graceful_gap:?} ({graceful_failed} failed) when the leader stopped \
         gracefully (hand-over), {killed_gap:?} ({killed_failed} failed) when it was killed"
    );
    assert!(graceful_gap < killed_gap, "hand-over gap {graceful_gap:?} vs kill {killed_gap:?}");
    assert!(graceful_gap < Duration::from_millis(200), "below one election timeout: {graceful_gap:?}");
    stop_all(nodes).await;
}

/// Scale-up: a fourth node joins a busy three-node cluster and gets nothing of what
/// runs; a rebalance moves it a fair share of consumer groups and of open segments'
/// primaries (through rotations, so publishing goes on); nothing confirmed is lost.
#[tokio::test(start_paused = true)]
async fn rebalance_after_scale_up_gives_the_new_node_its_share() {
    use eventtermq_broker::cluster_state::{BindingSpec, ConsumerGroupSpec};
    let dir = tempfile::tempdir().unwrap();
    let net = TestNet::new();
    let mut nodes = three(&net, dir.path()).await;
    let spec = TopicSpec { shards: 3, ..topic() };
    nodes[0]
        .handle
        .cluster
        .write(Command::CreateTopic { namespace: "default".into(), name: "t".into(), spec })
        .await
        .unwrap();
    for g in 0..6 {
        let spec = ConsumerGroupSpec { bindings: vec![BindingSpec::fanout("t")], size: 10, ..Default::default() };
        let cmd = Command::CreateConsumerGroup { namespace: "default".into(), name: format!("g{g}"), spec };
        nodes[0].handle.cluster.write(cmd).await.unwrap();
    }
    let open_and_placed = |nodes: &[TestNode]| {
        let st = nodes[0].handle.cluster.state.read();
        st.state.segments.values().filter(|s| s.is_open()).count() == 3
            && st.state.groups["default"].values().all(|g| g.node.is_some())
    };
    eventually(Duration::from_secs(10), "3 open segments and every group placed", || async { open_and_placed(&nodes) })
        .await;
    let mut confirmed = publish_ids(&nodes[0], 0..200).await;
    assert_eq!(confirmed.len(), 200);

    nodes.push(start(&net, dir.path(), "d:1", &["a:1"]).await);
    eventually(Duration::from_secs(20), "4 voters and 4 ALIVE records", || async {
        nodes.iter().all(|n| voters(n) == 4 && alive_records(n) == 4)
    })
    .await;
    let new = nodes[3].handle.id;
    let load = |nodes: &[TestNode]| nodes[0].handle.cluster.state.read().state.node_load(new);
    assert_eq!(load(&nodes), Default::default(), "a new node gets nothing by itself");

    let done = eventtermq_broker::replication::placement::request_rebalance(&nodes[1].handle.cluster).await.unwrap();
    eprintln!("rebalance: {done:?}");
    assert_eq!(done.consumer_groups_moved, 1, "6 groups on 4 nodes: 2, 2, 1, 1");
    assert!(done.segments_rotated >= 1, "{done:?}");
    let more = publish_ids(&nodes[2], 200..400).await;
    confirmed.extend(more);
    eventually(Duration::from_secs(20), "the new node leads a segment and runs a group", || async {
        let l = load(&nodes);
        l.primaries >= 1 && l.consumer_groups == 1 && open_and_placed(&nodes)
    })
    .await;
    eprintln!("load of the new node after the rebalance: {:?}", load(&nodes));
    let again = eventtermq_broker::replication::placement::request_rebalance(&nodes[0].handle.cluster).await.unwrap();
    assert_eq!(again, Default::default(), "fair now: nothing moves");
    let more = publish_ids(&nodes[3], 400..500).await;
    assert_eq!(more.len(), 100);
    confirmed.extend(more);
    let read: std::collections::HashSet<u32> = read_topic(&nodes[3]).await.into_iter().collect();
    let lost: Vec<_> = confirmed.iter().filter(|i| !read.contains(i)).collect();
    assert!(lost.is_empty(), "lost confirmed messages {lost:?}");
    stop_all(nodes).await;
}

/// A consumer group running on a node that is decommissioned moves to another node
/// while a subscriber consumes it through a third one (acknowledging each message):
/// the subscriber's stream ends, it subscribes again, and every confirmed message,
/// published before and during the move, is delivered (at least once).
#[tokio::test(start_paused = true)]
async fn a_consumer_group_moves_off_a_decommissioned_node_and_delivers_everything() {
    use eventtermq_broker::cluster_state::{BindingSpec, ConsumerGroupSpec};
    use eventtermq_proto::v1::messaging_client::MessagingClient;
    use eventtermq_proto::v1::{AckRequest, Delivery, SubscribeRequest};
    let dir = tempfile::tempdir().unwrap();
    let net = TestNet::new();
    let mut nodes = three(&net, dir.path()).await;
    nodes.push(start(&net, dir.path(), "d:1", &["a:1"]).await);
    eventually(Duration::from_secs(20), "4 voters and 4 ALIVE records", || async {
        nodes.iter().all(|n| voters(n) == 4 && alive_records(n) == 4)
    })
    .await;
    let spec = TopicSpec { segment_size_max_bytes: 2_000, ..topic() };
    nodes[0]
        .handle
        .cluster
        .write(Command::CreateTopic { namespace: "default".into(), name: "t".into(), spec })
        .await
        .unwrap();
    let spec = ConsumerGroupSpec { bindings: vec![BindingSpec::fanout("t")], size: 100, ..Default::default() };
    let cmd = Command::CreateConsumerGroup { namespace: "default".into(), name: "g".into(), spec };
    nodes[0].handle.cluster.write(cmd).await.unwrap();
    let node_of = |nodes: &[TestNode]| {
        nodes[0].handle.cluster.state.read().state.group_runtime("default", "g").and_then(|r| r.node)
    };
    let placed = wait_for(Duration::from_secs(10), "the group placed", || node_of(&nodes)).await;
    eventually(Duration::from_secs(10), "an open segment", || async { primary_index(&nodes).is_some() }).await;
    let gi = nodes.iter().position(|n| n.handle.id == placed).unwrap();
    let via = (gi + 1) % 4;
    let mut confirmed = publish_ids(&nodes[via], 0..100).await;
    assert_eq!(confirmed.len(), 100);

    let (client, _listeners) = net.attach("client:1");
    let mut messaging = MessagingClient::new(client.data_channel(&nodes[via].name));
    let sub = SubscribeRequest { consumer_group: "g".into(), size: 20, ..Default::default() };
    let mut stream = wait_for_stream(&mut messaging, sub.clone()).await;
    let mut seen = std::collections::HashSet::new();
    let mut resubscribed = 0;
    // Reads one message (acknowledging it), subscribing again when the stream ends.
    macro_rules! consume_one {
        () => {
            match tokio::time::timeout(Duration::from_secs(5), stream.message()).await {
                Ok(Ok(Some(m))) => {
                    let data = m.message.as_ref().unwrap().data.clone();
                    seen.insert(String::from_utf8(data.to_vec()).unwrap().parse::<u32>().unwrap());
                    let deliveries = vec![Delivery { segment_id: m.segment_id, offset: m.offset }];
                    let ack = AckRequest { consumer_group: "g".into(), deliveries, ..Default::default() };
                    let _ = messaging.ack(ack).await; // a refused ack only means it comes again
                }
                _ => {
                    resubscribed += 1;
                    stream = wait_for_stream(&mut messaging, sub.clone()).await;
                }
            }
        };
    }
    for _ in 0..50 {
        consume_one!();
    }
    nodes[via].handle.cluster.write(Command::DecommissionNode { id: placed, cancel: false }).await.unwrap();
    confirmed.extend(publish_ids(&nodes[via], 100..200).await);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !confirmed.iter().all(|i| seen.contains(i)) {
        assert!(
            Instant::now() < deadline,
            "not delivered: {:?}",
            confirmed.iter().filter(|i| !seen.contains(i)).collect::<Vec<_>>()
        );
        consume_one!();
    }
    let moved = node_of(&nodes).unwrap();
    assert_ne!(moved, placed, "the group left the decommissioned node");
    eprintln!(
        "all {} confirmed messages delivered; the subscriber subscribed again {resubscribed} time(s)",
        confirmed.len()
    );
    eventually(Duration::from_secs(30), "the node drained", || async {
        nodes[via].handle.cluster.state.read().state.drain_progress(placed).drained()
    })
    .await;
    drop(stream);
    stop_all(nodes).await;
}

/// Raft RPCs of `method` (`RaftAppendEntries`, `RaftVote`) this node served, every
/// status code together.
async fn raft_rpcs_served(node: &TestNode, method: &str) -> f64 {
    let text = node.handle.observer.render(false).await;
    let label = format!("method=\"/eventter.internal.v1.Internal/{method}\"");
    text.lines()
        .filter(|l| l.starts_with("eventtermq_grpc_requests_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// [`raft_rpcs_served`] summed over `nodes`.
async fn served(nodes: &[TestNode], method: &str) -> f64 {
    let mut sum = 0.0;
    for n in nodes {
        sum += raft_rpcs_served(n, method).await;
    }
    sum
}

async fn all_quiesced(nodes: &[TestNode], within: Duration) {
    eventually(within, "every node's Raft quiesced", || async { nodes.iter().all(|n| n.handle.cluster.quiesced()) })
        .await;
}

/// Raft quiescence (issue 18, "idle costs nothing"): an idle cluster sends no Raft
/// heartbeats while gossip vouches for every voter; linearizable reads work meanwhile;
/// a write commits and wakes the heartbeats; a partitioned or dead leader is replaced
/// within gossip's detection time plus an election.
#[tokio::test(start_paused = true)]
async fn a_quiesced_cluster_sends_no_heartbeats_and_wakes_for_writes_and_a_lost_leader() {
    let dir = tempfile::tempdir().unwrap();
    let net = TestNet::new();
    let quiesce_after = Duration::from_millis(1000);
    let mut nodes = three_tuned(&net, dir.path(), |c| c.raft.quiesce_after_ms = 1000).await;
    all_quiesced(&nodes, Duration::from_secs(10)).await;

    // (a) Quiet: no AppendEntries (heartbeats) and no votes over 10 s.
    let appends_before = served(&nodes, "RaftAppendEntries").await;
    assert!(appends_before > 0.0, "the metric counts Raft RPCs (none seen while forming the cluster)");
    let votes_before = served(&nodes, "RaftVote").await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(served(&nodes, "RaftAppendEntries").await, appends_before, "no heartbeat while quiesced");
    assert_eq!(served(&nodes, "RaftVote").await, votes_before, "no election while quiesced");
    assert!(nodes.iter().all(|n| n.handle.cluster.quiesced()), "still quiesced");

    // (d) Linearizable reads, on the leader and through a follower, while quiesced:
    // the read index confirms leadership with a round of its own.
    let li = leader_index(&nodes);
    let follower = (li + 1) % 3;
    for n in [&nodes[li], &nodes[follower]] {
        let started = Instant::now();
        drop(n.handle.cluster.read(true).await.expect("linearizable read while quiesced"));
        assert!(started.elapsed() < Duration::from_secs(1), "read took {:?}", started.elapsed());
    }
    assert!(nodes[li].handle.cluster.quiesced(), "a read does not wake the leader");

    // (c) A write through a follower while quiesced commits, and wakes the heartbeats.
    let started = Instant::now();
    let cmd = Command::CreateNamespace { name: "woken".into() };
    nodes[follower].handle.cluster.write(cmd).await.expect("write while quiesced");
    assert!(started.elapsed() < Duration::from_secs(1), "write took {:?}", started.elapsed());
    assert!(!nodes[li].handle.cluster.quiesced(), "the write woke the leader");
    let appends = served(&nodes, "RaftAppendEntries").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let heartbeats = served(&nodes, "RaftAppendEntries").await - appends;
    assert!(heartbeats >= 10.0, "heartbeats resumed after the write: {heartbeats} AppendEntries in 500 ms");
    for n in &nodes {
        let s = n.handle.cluster.read(true).await.unwrap();
        assert!(s.state.namespaces.contains_key("woken"), "{} lacks the write", n.name);
    }
    // Quiet again once idle.
    all_quiesced(&nodes, quiesce_after * 5).await;

    // (e) A follower restarts at once (kill -9, same directory) while quiesced: the
    // leader sees its new life in gossip and wakes, so the restarted node hears from it
    // before its election timer runs out; the leader stays.
    let li = leader_index(&nodes);
    let term = nodes[li].handle.cluster.raft.metrics().borrow().current_term;
    let fi = (li + 1) % 3;
    let restarted = nodes.remove(fi);
    net.detach(&restarted.name);
    let name = restarted.name.clone();
    restarted.handle.kill().await;
    let restarted = start_tuned(&net, dir.path(), &name, &["a:1"], |c| c.raft.quiesce_after_ms = 1000).await;
    nodes.insert(fi, restarted);
    eventually(Duration::from_secs(5), "the restarted follower knows the leader", || async {
        nodes[fi].handle.cluster.leader().is_some()
    })
    .await;
    let li_after = leader_index(&nodes);
    let term_after = nodes[li_after].handle.cluster.raft.metrics().borrow().current_term;
    assert_eq!((li_after, term_after), (li, term), "a restarted follower does not cost an election");
    all_quiesced(&nodes, Duration::from_secs(15)).await;

    // (b1) The leader cut off from everyone (gossip too) while quiesced: the others
    // elect a new leader within gossip's detection time plus an election, and write.
    let li = leader_index(&nodes);
    let old = nodes[li].handle.id;
    net.isolate(&nodes[li].name);
    let cut_at = Instant::now();
    let others: Vec<usize> = (0..3).filter(|i| *i != li).collect();
    eventually(Duration::from_secs(5), "a new leader on the majority side", || async {
        others.iter().all(|i| nodes[*i].handle.cluster.leader().is_some_and(|(l, _)| l != old))
    })
    .await;
    let took = cut_at.elapsed();
    eprintln!("new leader {took:?} after the quiesced leader was cut off");
    // Gossip: SUSPECT after one or two probe periods (100 ms here) and the indirect
    // probes; then one election (200-400 ms timeouts here).
    assert!(took < Duration::from_secs(2), "fail-over took {took:?}");
    nodes[others[0]]
        .handle
        .cluster
        .write(Command::CreateNamespace { name: "after-cut".into() })
        .await
        .expect("the majority writes");
    net.heal();
    eventually(Duration::from_secs(10), "the old leader follows and has the write", || async {
        match nodes[li].handle.cluster.read(true).await {
            Ok(s) => s.state.namespaces.contains_key("after-cut"),
            Err(_) => false,
        }
    })
    .await;
    all_quiesced(&nodes, Duration::from_secs(15)).await;

    // (b2) The quiesced leader dies.
    let li = leader_index(&nodes);
    let dead = nodes.remove(li);
    let dead_id = dead.handle.id;
    net.detach(&dead.name);
    let killed_at = Instant::now();
    dead.handle.kill().await;
    eventually(Duration::from_secs(5), "a new leader after the crash", || async {
        nodes.iter().all(|n| n.handle.cluster.leader().is_some_and(|(l, _)| l != dead_id))
    })
    .await;
    let took = killed_at.elapsed();
    eprintln!("new leader {took:?} after the quiesced leader died");
    assert!(took < Duration::from_secs(2), "fail-over took {took:?}");
    nodes[0]
        .handle
        .cluster
        .write(Command::CreateNamespace { name: "after-crash".into() })
        .await
        .expect("write after the crash");
    stop_all(nodes).await;
}
