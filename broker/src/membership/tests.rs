//! In-process clusters over `MemNetwork` with short periods, on tokio's paused clock:
//! every gossip timer and wait here is tokio's, so an idle runtime jumps straight to
//! the next timer and a test takes milliseconds, not seconds. `GossipSync` is routed
//! by calling the seed's `handle_sync` directly (no gRPC server here).

use std::ops::Deref;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::clock::Clock;
use crate::peers::{PeerTimeouts, Peers};
use crate::transport::mem::MemNetwork;

/// `MEMBERSHIP_TRACE=1 cargo test ... membership` prints foca's and our debug logs.
fn init_tracing() {
    if std::env::var("MEMBERSHIP_TRACE").is_ok() {
        let _ = tracing_subscriber::fmt().with_env_filter("foca=debug,eventtermq=debug").with_test_writer().try_init();
    }
}

fn fast_config() -> MembershipConfig {
    MembershipConfig {
        probe_period_ms: 100,
        probe_rtt_ms: 40,
        suspect_to_down_ms: 500,
        join_retry_ms: 50,
        sync_period_ms: 0,
        rng_seed: None,
    }
}

/// Wall-clock time of the test's start (any fixed value, the same in every run).
const START_UNIX_MS: i64 = 1_700_000_000_000;

/// The in-memory network and the one clock every node of a test shares, so a restarted
/// node's identity is dated after its previous life's.
struct Net {
    net: MemNetwork,
    clock: Clock,
}

impl Net {
    fn new() -> Net {
        Net { net: MemNetwork::new(), clock: Clock::manual(START_UNIX_MS) }
    }
}

impl Deref for Net {
    type Target = MemNetwork;
    fn deref(&self) -> &MemNetwork {
        &self.net
    }
}

struct Node {
    id: NodeId,
    addr: String,
    membership: Membership,
    shutdown: CancellationToken,
}

impl Node {
    fn start(net: &Net, id: NodeId, addr: &str) -> Node {
        let (network, listeners) = net.attach(addr);
        let shutdown = CancellationToken::new();
        let peers = Peers::new(network, PeerTimeouts::default());
        let membership = Membership::start(
            id,
            addr.to_string(),
            fast_config(),
            &net.clock,
            peers,
            listeners.datagrams,
            shutdown.clone(),
        );
        Node { id, addr: addr.to_string(), membership, shutdown }
    }

    /// Joins through `seed`, with the sync call routed straight to its `handle_sync`.
    async fn join_through(&self, seed: &Node) {
        let peer = seed.membership.clone();
        let seeds = vec![seed.addr.clone()];
        tokio::time::timeout(
            Duration::from_secs(5),
            self.membership.join_via(seeds, move |_addr, data| {
                let peer = peer.clone();
                async move { peer.handle_sync(data).await }
            }),
        )
        .await
        .expect("join timed out")
        .expect("join failed");
    }

    fn stop(&self) {
        self.shutdown.cancel();
    }
}

fn state_of(members: &[MemberInfo], id: NodeId) -> Option<NodeState> {
    members.iter().find(|m| m.id == id).map(|m| m.state)
}

/// Waits (bounded) until `node`'s member list satisfies `pred`; returns that list.
async fn wait_until(
    node: &Node,
    what: &str,
    within: Duration,
    pred: impl Fn(&[MemberInfo]) -> bool,
) -> Vec<MemberInfo> {
    let mut rx = node.membership.watch();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        {
            let current = rx.borrow_and_update();
            if pred(&current) {
                return current.clone();
            }
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => panic!("node {}: membership stopped while waiting for {what}", node.id),
            Err(_) => {
                panic!("node {}: timed out after {within:?} waiting for {what}; members: {:?}", node.id, *rx.borrow())
            }
        }
    }
}

fn all_alive(ids: &'static [NodeId]) -> impl Fn(&[MemberInfo]) -> bool {
    move |members| members.len() == ids.len() && ids.iter().all(|id| state_of(members, *id) == Some(NodeState::Alive))
}

/// Starts nodes 1, 2, 3 at "n1", "n2", "n3"; 2 joins through 1, 3 through 2, and all
/// three see 3 ALIVE.
async fn three_node_cluster(net: &Net) -> Vec<Node> {
    let nodes = vec![Node::start(net, 1, "n1"), Node::start(net, 2, "n2"), Node::start(net, 3, "n3")];
    nodes[1].join_through(&nodes[0]).await;
    nodes[2].join_through(&nodes[1]).await;
    for n in &nodes {
        let members = wait_until(n, "3 ALIVE", Duration::from_secs(5), all_alive(&[1, 2, 3])).await;
        for m in &members {
            assert_eq!(m.addr, format!("n{}", m.id));
        }
    }
    nodes
}

#[tokio::test(start_paused = true)]
async fn three_nodes_converge_to_alive() {
    init_tracing();
    let net = Net::new();
    let nodes = three_node_cluster(&net).await;
    // Stays converged (no false suspicions on a healthy network).
    tokio::time::sleep(Duration::from_millis(1000)).await;
    for n in &nodes {
        let members = n.membership.watch().borrow().clone();
        assert!(all_alive(&[1, 2, 3])(&members), "node {}: {members:?}", n.id);
        assert!(members.windows(2).all(|w| w[0].id < w[1].id), "sorted by id");
    }
    nodes.iter().for_each(Node::stop);
}

#[tokio::test(start_paused = true)]
async fn join_skips_self_and_returns_on_empty_seeds() {
    init_tracing();
    let net = Net::new();
    let a = Node::start(&net, 1, "n1");
    tokio::time::timeout(Duration::from_secs(1), a.membership.join(vec![]))
        .await
        .expect("bounded")
        .expect("empty seeds");
    tokio::time::timeout(Duration::from_secs(1), a.membership.join(vec!["n1".into()]))
        .await
        .expect("bounded")
        .expect("only self");
    let members = a.membership.watch().borrow().clone();
    assert_eq!(members.len(), 1);
    assert_eq!((members[0].id, members[0].state), (1, NodeState::Alive));
    a.stop();
}

#[tokio::test(start_paused = true)]
async fn join_retries_until_a_seed_answers_and_stops_on_shutdown() {
    init_tracing();
    let net = Net::new();
    let a = Node::start(&net, 1, "n1");
    let b = Node::start(&net, 2, "n2");
    let attempts = Arc::new(AtomicUsize::new(0));
    let counter = attempts.clone();
    let peer = a.membership.clone();
    b.membership
        .join_via(vec!["n2".into(), "n1".into()], move |addr, data| {
            assert_eq!(addr, "n1", "own address is skipped");
            let n = counter.fetch_add(1, Ordering::SeqCst);
            let peer = peer.clone();
            async move {
                if n < 2 {
                    Err(MembershipError::Sync { addr, message: "unreachable".into() })
                } else {
                    peer.handle_sync(data).await
                }
            }
        })
        .await
        .expect("joined on the third attempt");
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
    wait_until(&a, "2 ALIVE", Duration::from_secs(3), all_alive(&[1, 2])).await;
    wait_until(&b, "2 ALIVE", Duration::from_secs(3), all_alive(&[1, 2])).await;

    // A join that can never succeed ends with shutdown.
    let c = Node::start(&net, 3, "n3");
    let never = c.membership.join_via(vec!["nowhere".into()], |addr, _| async move {
        Err::<Bytes, _>(MembershipError::Sync { addr, message: "unreachable".into() })
    });
    let token = c.shutdown.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        token.cancel();
    });
    let result = tokio::time::timeout(Duration::from_secs(2), never).await.expect("bounded");
    assert!(matches!(result, Err(MembershipError::Stopped)), "{result:?}");
    a.stop();
    b.stop();
}

#[tokio::test(start_paused = true)]
async fn handle_sync_merges_both_ways() {
    init_tracing();
    let net = Net::new();
    let a = Node::start(&net, 1, "n1");
    let b = Node::start(&net, 2, "n2");
    let payload = a.membership.sync_payload().await.expect("payload");
    let reply = b.membership.handle_sync(payload).await.expect("b merges a");
    // b learnt a from the request alone.
    let b_view = b.membership.watch().borrow().clone();
    assert_eq!(state_of(&b_view, 1), Some(NodeState::Alive), "{b_view:?}");
    a.membership.apply_sync(reply).await.expect("a merges b");
    let a_view = a.membership.watch().borrow().clone();
    assert_eq!(state_of(&a_view, 2), Some(NodeState::Alive), "{a_view:?}");
    // And they keep each other alive over datagrams.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    wait_until(&a, "2 ALIVE", Duration::from_secs(1), all_alive(&[1, 2])).await;
    wait_until(&b, "2 ALIVE", Duration::from_secs(1), all_alive(&[1, 2])).await;

    let bad = b.membership.handle_sync(Bytes::from_static(&[0xff, 0xff, 0xff])).await;
    assert!(matches!(bad, Err(MembershipError::Decode(_))), "{bad:?}");
    a.stop();
    b.stop();
}

#[tokio::test(start_paused = true)]
async fn detached_node_becomes_suspect_then_dead() {
    init_tracing();
    let net = Net::new();
    let nodes = three_node_cluster(&net).await;
    let started = tokio::time::Instant::now();
    net.detach("n3");
    for n in &nodes[..2] {
        wait_until(n, "node 3 SUSPECT", Duration::from_secs(3), |m| state_of(m, 3) == Some(NodeState::Suspect)).await;
    }
    for n in &nodes[..2] {
        let members =
            wait_until(n, "node 3 DEAD", Duration::from_secs(4), |m| state_of(m, 3) == Some(NodeState::Dead)).await;
        // The survivors still see each other.
        assert_eq!(state_of(&members, 1), Some(NodeState::Alive));
        assert_eq!(state_of(&members, 2), Some(NodeState::Alive));
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "detection took {took:?}");
    // DEAD members stay listed, with the time they became DEAD.
    let members = nodes[0].membership.watch().borrow().clone();
    let dead = members.iter().find(|m| m.id == 3).expect("still listed");
    assert!(dead.state_since.elapsed() < took);
    nodes.iter().for_each(Node::stop);
}

#[tokio::test(start_paused = true)]
async fn leaving_node_is_left_not_dead() {
    init_tracing();
    let net = Net::new();
    let nodes = three_node_cluster(&net).await;
    // Record every state node 1 publishes for node 3 (best effort: watch keeps the latest).
    let mut rx = nodes[0].membership.watch();
    let seen = tokio::spawn(async move {
        let mut seen = Vec::new();
        while rx.changed().await.is_ok() {
            let state = state_of(&rx.borrow_and_update(), 3);
            if seen.last() != Some(&state) {
                seen.push(state);
            }
        }
        seen
    });
    tokio::time::timeout(Duration::from_millis(800), nodes[2].membership.leave()).await.expect("leave is bounded");
    let own = nodes[2].membership.watch().borrow().clone();
    assert_eq!(state_of(&own, 3), Some(NodeState::Left), "{own:?}");
    for n in &nodes[..2] {
        wait_until(n, "node 3 LEFT", Duration::from_secs(2), |m| state_of(m, 3) == Some(NodeState::Left)).await;
    }
    // Well past the suspicion timeout it is still LEFT, never DEAD, even once it is gone.
    nodes[2].stop();
    net.detach("n3");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for n in &nodes[..2] {
        let members = n.membership.watch().borrow().clone();
        assert_eq!(state_of(&members, 3), Some(NodeState::Left), "node {}: {members:?}", n.id);
        assert_eq!(state_of(&members, 1), Some(NodeState::Alive));
        assert_eq!(state_of(&members, 2), Some(NodeState::Alive));
    }
    nodes[0].stop();
    nodes[1].stop();
    drop(nodes); // the last watch senders: lets the recorder finish
    let seen = tokio::time::timeout(Duration::from_secs(1), seen).await.expect("watch closes").expect("recorder");
    assert!(!seen.contains(&Some(NodeState::Dead)), "node 1 saw node 3 go through {seen:?}");
}

#[tokio::test(start_paused = true)]
async fn restarted_node_is_alive_again() {
    init_tracing();
    let net = Net::new();
    let nodes = three_node_cluster(&net).await;
    nodes[2].stop();
    net.detach("n3");
    for n in &nodes[..2] {
        wait_until(n, "node 3 DEAD", Duration::from_secs(5), |m| state_of(m, 3) == Some(NodeState::Dead)).await;
    }
    // Same id, same address, new process.
    let restarted = Node::start(&net, 3, "n3");
    restarted.join_through(&nodes[0]).await;
    for n in [&nodes[0], &nodes[1], &restarted] {
        wait_until(n, "3 ALIVE after restart", Duration::from_secs(5), all_alive(&[1, 2, 3])).await;
    }
    // And it stays ALIVE: the old, dead identity does not come back.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for n in [&nodes[0], &nodes[1], &restarted] {
        let members = n.membership.watch().borrow().clone();
        assert!(all_alive(&[1, 2, 3])(&members), "node {}: {members:?}", n.id);
    }
    nodes.iter().for_each(Node::stop);
    restarted.stop();
}

#[tokio::test(start_paused = true)]
async fn quickly_restarted_node_replaces_its_old_identity() {
    init_tracing();
    let net = Net::new();
    let nodes = three_node_cluster(&net).await;
    // Restart before anyone noticed the crash.
    nodes[2].stop();
    let restarted = Node::start(&net, 3, "n3");
    restarted.join_through(&nodes[1]).await;
    for n in [&nodes[0], &nodes[1], &restarted] {
        wait_until(n, "3 ALIVE after restart", Duration::from_secs(5), all_alive(&[1, 2, 3])).await;
    }
    // Probes of the old identity go unanswered, but it lost to the new one: no DEAD.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for n in [&nodes[0], &nodes[1], &restarted] {
        let members = n.membership.watch().borrow().clone();
        assert!(all_alive(&[1, 2, 3])(&members), "node {}: {members:?}", n.id);
    }
    nodes.iter().for_each(Node::stop);
    restarted.stop();
}

#[tokio::test(start_paused = true)]
async fn restarted_node_is_found_without_a_seed() {
    init_tracing();
    let net = Net::new();
    let nodes = three_node_cluster(&net).await;
    nodes[2].stop();
    net.detach("n3");
    for n in &nodes[..2] {
        wait_until(n, "node 3 DEAD", Duration::from_secs(5), |m| state_of(m, 3) == Some(NodeState::Dead)).await;
    }
    // No join: the survivors periodically announce to DEAD members.
    let restarted = Node::start(&net, 3, "n3");
    for n in [&nodes[0], &nodes[1], &restarted] {
        wait_until(n, "3 ALIVE after restart", Duration::from_secs(5), all_alive(&[1, 2, 3])).await;
    }
    nodes.iter().for_each(Node::stop);
    restarted.stop();
}

#[tokio::test(start_paused = true)]
async fn healed_partition_rejoins() {
    init_tracing();
    let net = Net::new();
    let nodes = three_node_cluster(&net).await;
    net.isolate("n3");
    for n in &nodes[..2] {
        wait_until(n, "node 3 DEAD", Duration::from_secs(5), |m| state_of(m, 3) == Some(NodeState::Dead)).await;
    }
    net.heal();
    for n in &nodes {
        wait_until(n, "3 ALIVE after heal", Duration::from_secs(6), all_alive(&[1, 2, 3])).await;
    }
    nodes.iter().for_each(Node::stop);
}

/// Every node loses sight of every other (as when all pods of a StatefulSet restart
/// within seconds): each ends up alone, with the others DEAD. Once the network is back
/// they must find each other again by themselves.
#[tokio::test(start_paused = true)]
async fn nodes_that_all_lost_each_other_meet_again() {
    init_tracing();
    let net = Net::new();
    let nodes = three_node_cluster(&net).await;
    for n in &nodes {
        net.isolate(&n.addr);
    }
    for n in &nodes {
        wait_until(n, "the other two DEAD", Duration::from_secs(5), |m| {
            m.iter().filter(|x| x.id != n.id).all(|x| x.state == NodeState::Dead)
        })
        .await;
    }
    net.heal();
    for n in &nodes {
        wait_until(n, "3 ALIVE after heal", Duration::from_secs(6), all_alive(&[1, 2, 3])).await;
    }
    nodes.iter().for_each(Node::stop);
}
