//! Gossip membership: which nodes exist and whether they are alive.
//!
//! SWIM failure detection and dissemination (the `foca` crate) over the node's gossip
//! datagrams, plus a full-state push-pull ("sync") over the `GossipSync` gRPC call, used
//! to join through seeds and, periodically, as anti-entropy.
//!
//! One task owns the `Foca` instance (see [`task`]); [`Membership`] handles talk to it
//! over a channel and read the member list from a `watch` channel.
//!
//! Member states:
//! - ALIVE / SUSPECT: foca's `Alive` / `Suspect`.
//! - DEAD: foca's `Down` for an identity that did not announce its departure.
//! - LEFT: foca's `Down` for an identity with the `leaving` flag. A leaving node first
//!   switches to a flagged copy of its identity (which wins the id conflict, so peers
//!   just rename it) and then leaves the cluster, i.e. gossips itself `Down`. Peers
//!   that learn the news therefore hold a flagged `Down` entry: LEFT. No custom
//!   broadcast is needed, and a late or duplicated "down" about the unflagged identity
//!   loses the conflict against the flagged one, so a leaving node never flickers to
//!   DEAD. (If every leave datagram is lost, peers detect the silence and say DEAD.)
//!
//! Identities carry a `bump` (start time, +1 per automatic rejoin): a node restarted
//! with the same id has a larger bump, wins against its old identity and is ALIVE
//! again at once; a node wrongly declared down renews itself the same way. DEAD and
//! LEFT members stay listed (with `state_since`) for 24 h, or until a newer identity of
//! the same id shows up.
//!
//! A node that finds itself alone (every other member DEAD or LEFT) knocks on the doors
//! of its seeds and DEAD members every `join_retry_ms` until someone answers: foca on
//! its own goes quiet when it has no live member, so a cluster whose members all lost
//! sight of each other at once would otherwise never meet again.

mod identity;
mod task;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::cluster_state::model::{NodeId, NodeState};
use crate::peers::Peers;
use crate::watch;

#[doc(hidden)]
pub use self::task::decode_sync_payload_reencoded;
use self::task::Command;

/// Gossip timing.
///
/// The defaults target a LAN: a killed node is normally SUSPECT within ~1 s and DEAD
/// within ~3 s. Each node probes one member per `probe_period_ms` (round robin), so a
/// dead node is probed by someone within about one period and suspected when that
/// probe (direct ping, then indirect pings through 3 members after `probe_rtt_ms`) has
/// no answer by the end of the period: typically 0.3-0.9 s in small clusters, plus
/// gossip spread (every ~150 ms). It then becomes DEAD `suspect_to_down_ms` later
/// unless it refutes.
///
/// The trade-off: shorter periods detect failures sooner but send more datagrams
/// (a few small ones per node per period) and turn stalls into false suspicions; a
/// node that cannot answer for longer than `probe_rtt` + `suspect_to_down_ms` (CPU
/// starvation, a long stop-the-world pause, a congested link) is declared DEAD and
/// rejoins by itself when it recovers (it renews its identity). On a WAN or with busy
/// hosts, raise `probe_rtt_ms` and `suspect_to_down_ms` first.
#[derive(Debug, Clone)]
pub struct MembershipConfig {
    /// How often each node probes one other member (default 300 ms).
    pub probe_period_ms: u64,
    /// How long a direct ping may take before indirect pings are sent (default 100 ms;
    /// LAN round trips are well below 1 ms, this leaves room for scheduling delays).
    /// Must be smaller than `probe_period_ms` (it is clamped).
    pub probe_rtt_ms: u64,
    /// Suspicion timeout before DEAD (default 1500 ms: five probe periods, enough for
    /// a healthy but briefly stalled node to refute).
    pub suspect_to_down_ms: u64,
    /// Retry interval for seeds while not joined, and for re-joining (seeds and DEAD
    /// members) while no member is ALIVE or SUSPECT (default 1000 ms).
    pub join_retry_ms: u64,
    /// Periodic full-state push-pull with a random member over TCP (anti-entropy),
    /// 0 = off (default 30 s: repairs anything datagram gossip missed, at the cost of
    /// one small RPC per node per period).
    pub sync_period_ms: u64,
    /// Seed of the random choices gossip makes (foca's probe order, the member to
    /// sync with); `None`: random. A simulation sets it so that a run replays.
    pub rng_seed: Option<u64>,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        Self {
            probe_period_ms: 300,
            probe_rtt_ms: 100,
            suspect_to_down_ms: 1500,
            join_retry_ms: 1000,
            sync_period_ms: 30_000,
            rng_seed: None,
        }
    }
}

/// One member as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    pub id: NodeId,
    /// Advertised `host:port`.
    pub addr: String,
    pub state: NodeState,
    /// Which life of the member this is: grows with each restart and each rejoin after
    /// being declared down (gossip's identity "bump"), so a restart shows as a change
    /// even when the member was never seen other than ALIVE.
    pub life: u64,
    /// When this node first saw the member in `state` (tokio's clock, so "DEAD for how
    /// long" moves with a paused test clock).
    pub state_since: Instant,
}

#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    /// The gossip task has stopped (the node is shutting down).
    #[error("membership is shut down")]
    Stopped,
    /// A full-state sync payload could not be decoded.
    #[error("malformed gossip sync payload: {0}")]
    Decode(String),
    /// A `GossipSync` call to a peer failed.
    #[error("gossip sync with {addr} failed: {message}")]
    Sync { addr: String, message: String },
}

/// How long [`Membership::leave`] keeps re-gossiping its departure.
const LEAVE_SPREAD: Duration = Duration::from_millis(300);
const LEAVE_GOSSIP_ROUNDS: u32 = 3;
/// Requests to the gossip task queued at most; callers wait beyond (they are few: API
/// handlers, the leader's reconcile loop, joins).
const COMMAND_QUEUE_MAX: usize = 64;

/// Handle to the gossip task. Clone freely.
#[derive(Clone)]
pub struct Membership {
    inner: Arc<Shared>,
}

struct Shared {
    addr: String,
    config: MembershipConfig,
    peers: Peers,
    commands: mpsc::Sender<Command>,
    members: watch::Sender<Vec<MemberInfo>>,
    shutdown: CancellationToken,
}

impl Membership {
    /// Starts the gossip task. `addr` is this node's advertised "host:port"; `clock`
    /// dates this life of the node (its identity's `bump`).
    pub fn start(
        id: NodeId,
        addr: String,
        config: MembershipConfig,
        clock: &Clock,
        peers: Peers,
        datagrams: mpsc::Receiver<Bytes>,
        shutdown: CancellationToken,
    ) -> Membership {
        let (commands, command_rx) = mpsc::channel(COMMAND_QUEUE_MAX);
        let (members, _) = watch::channel(Vec::new());
        let actor =
            task::Actor::new(id, addr.clone(), &config, clock, peers.clone(), members.clone(), commands.downgrade());
        let span = tracing::info_span!("gossip", node_id = id);
        tokio::spawn(tracing::Instrument::instrument(actor.run(datagrams, command_rx, shutdown.clone()), span));
        Membership { inner: Arc::new(Shared { addr, config, peers, commands, members, shutdown }) }
    }

    /// Every known member including this node, sorted by id; updates whenever a state
    /// changes.
    pub fn watch(&self) -> watch::Receiver<Vec<MemberInfo>> {
        self.inner.members.subscribe()
    }

    /// Joins through the given seeds ("host:port"; entries equal to this node's own
    /// addr are skipped): a `GossipSync` call to each seed until one succeeds, merging
    /// the member lists both ways; retries every `join_retry_ms` until success or
    /// shutdown. Returns Ok once joined. An empty seed list (after skipping self)
    /// returns Ok immediately.
    pub async fn join(&self, seeds: Vec<String>) -> Result<(), MembershipError> {
        let peers = self.inner.peers.clone();
        self.join_via(seeds, move |addr, data| {
            let peers = peers.clone();
            async move { peers.gossip_sync(&addr, data).await.map_err(|e| sync_failed(&addr, e)) }
        })
        .await
    }

    /// [`Membership::join`] with the sync call supplied by the caller (tests call a
    /// peer's [`Membership::handle_sync`] directly).
    pub(crate) async fn join_via<F, Fut>(&self, seeds: Vec<String>, mut call: F) -> Result<(), MembershipError>
    where
        F: FnMut(String, Bytes) -> Fut,
        Fut: Future<Output = Result<Bytes, MembershipError>>,
    {
        let seeds: Vec<String> = seeds.into_iter().filter(|s| *s != self.inner.addr).collect();
        if seeds.is_empty() {
            return Ok(());
        }
        self.send(Command::Seeds(seeds.clone())).await?;
        let retry = Duration::from_millis(self.inner.config.join_retry_ms.max(1));
        loop {
            for seed in &seeds {
                let payload = self.sync_payload().await?;
                let result = tokio::select! {
                    biased;
                    _ = self.inner.shutdown.cancelled() => return Err(MembershipError::Stopped),
                    r = call(seed.clone(), payload) => r,
                };
                match result {
                    Ok(reply) => match self.apply_sync(reply).await {
                        Ok(()) => {
                            tracing::info!(seed = %seed, "joined the gossip cluster");
                            return Ok(());
                        }
                        Err(MembershipError::Stopped) => return Err(MembershipError::Stopped),
                        Err(e) => {
                            tracing::warn!(seed = %seed, error = %e, "bad join reply from seed")
                        }
                    },
                    Err(e) => tracing::debug!(seed = %seed, error = %e, "join attempt failed"),
                }
            }
            tracing::info!(?seeds, retry_ms = retry.as_millis() as u64, "no seed reachable yet, retrying");
            tokio::select! {
                biased;
                _ = self.inner.shutdown.cancelled() => return Err(MembershipError::Stopped),
                _ = tokio::time::sleep(retry) => {}
            }
        }
    }

    /// Server side of the `GossipSync` RPC: merges the caller's members, returns ours.
    pub async fn handle_sync(&self, data: Bytes) -> Result<Bytes, MembershipError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Merge { data, reply }).await?;
        rx.await.map_err(|_| MembershipError::Stopped)?
    }

    /// Graceful leave: tells peers this node LEFT (not DEAD) and gives the news a
    /// moment (~300 ms) to spread. The task keeps answering until shutdown.
    pub async fn leave(&self) {
        let (reply, rx) = oneshot::channel();
        if self.send(Command::Leave(reply)).await.is_err() || rx.await.is_err() {
            return;
        }
        // foca already told a few members; repeat to reach the rest even if some
        // datagrams are lost (each update goes out a bounded number of times).
        for _ in 0..LEAVE_GOSSIP_ROUNDS {
            tokio::select! {
                biased;
                _ = self.inner.shutdown.cancelled() => return,
                _ = tokio::time::sleep(LEAVE_SPREAD / LEAVE_GOSSIP_ROUNDS) => {}
            }
            if self.send(Command::Gossip).await.is_err() {
                return;
            }
        }
    }

    /// Whether the node at `addr` answers a `GossipSync` now (bounded by the sync call
    /// timeout). Its answer is merged, so a node our gossip wrongly holds DEAD learns
    /// it and rejoins (and we learn its new identity).
    pub async fn knock(&self, addr: &str) -> bool {
        let Ok(payload) = self.sync_payload().await else { return false };
        match self.inner.peers.gossip_sync(addr, payload).await {
            Ok(reply) => {
                if let Err(e) = self.apply_sync(reply).await {
                    tracing::debug!(peer = %addr, error = %e, "merging a knock reply failed");
                }
                true
            }
            Err(e) => {
                tracing::debug!(peer = %addr, error = %e, "knock unanswered");
                false
            }
        }
    }

    /// This node's full member state, encoded for `GossipSync`.
    pub(crate) async fn sync_payload(&self) -> Result<Bytes, MembershipError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Payload(reply)).await?;
        rx.await.map_err(|_| MembershipError::Stopped)
    }

    /// Merges a peer's `GossipSync` payload (its reply to ours).
    pub(crate) async fn apply_sync(&self, data: Bytes) -> Result<(), MembershipError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Apply { data, reply: Some(reply) }).await?;
        rx.await.map_err(|_| MembershipError::Stopped)?
    }

    async fn send(&self, command: Command) -> Result<(), MembershipError> {
        self.inner.commands.send(command).await.map_err(|_| MembershipError::Stopped)
    }
}

fn sync_failed(addr: &str, e: crate::peers::PeerError) -> MembershipError {
    MembershipError::Sync { addr: addr.to_string(), message: e.to_string() }
}
