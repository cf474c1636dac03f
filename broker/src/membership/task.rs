//! The gossip task: sole owner of the `Foca` instance.
//!
//! Every interaction with foca goes through an `AccumulatingRuntime` that is drained
//! right after: datagrams go out through [`Peers`], timers go into a local
//! deadline heap served by the same `select!` loop, and the member list is republished
//! (foca has no notification for SUSPECT, so the list is recomputed each time and only
//! published when it differs).

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap};
use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Duration;

use bytes::Bytes;
use foca::{
    AccumulatingRuntime, Foca, Member, NoCustomBroadcast, OwnedNotification, PeriodicParams, PostcardCodec, State,
    Timer,
};
use rand::seq::IndexedRandom;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::identity::GossipId;
use super::{MemberInfo, MembershipConfig, MembershipError};
use crate::clock::Clock;
use crate::cluster_state::model::{NodeId, NodeState};
use crate::peers::Peers;
use crate::transport::DATAGRAM_SIZE_MAX_BYTES;
use crate::watch;

/// foca 2 takes a `rand` 0.10 generator (the rest of the crate uses `rand` 0.9).
type FocaRng = rand::rngs::SmallRng;
type Gossip = Foca<GossipId, PostcardCodec, FocaRng, NoCustomBroadcast>;

/// Down (DEAD/LEFT) members are forgotten after this long.
const REMOVE_DOWN_AFTER: Duration = Duration::from_secs(24 * 60 * 60);
/// While alone, at most this many DEAD members are announced to per `join_retry_ms`.
const REJOIN_ANNOUNCES_MAX: usize = 8;
/// Sync payloads listing more members than this are rejected.
const SYNC_MEMBERS_MAX: usize = 100_000;

pub(crate) enum Command {
    /// Our full state, encoded.
    Payload(oneshot::Sender<Bytes>),
    /// Merge a peer's state and reply with ours (server side of `GossipSync`).
    Merge { data: Bytes, reply: oneshot::Sender<Result<Bytes, MembershipError>> },
    /// Merge a peer's state (client side of `GossipSync`).
    Apply { data: Bytes, reply: Option<oneshot::Sender<Result<(), MembershipError>>> },
    /// Leave the cluster; replied once the departure is gossiped.
    Leave(oneshot::Sender<()>),
    /// Send pending updates to a few random members now.
    Gossip,
    /// The `--join` seeds, remembered for re-joining (see `Actor::rejoin`).
    Seeds(Vec<String>),
}

/// The full-state exchange of `GossipSync` (postcard).
#[derive(Serialize, Deserialize)]
struct SyncPayload {
    members: Vec<Member<GossipId>>,
}

/// Decodes a `GossipSync` payload. Never panics, whatever the bytes.
fn decode_sync_payload(data: &[u8]) -> Result<SyncPayload, MembershipError> {
    let payload: SyncPayload = postcard::from_bytes(data).map_err(|e| MembershipError::Decode(e.to_string()))?;
    if payload.members.len() > SYNC_MEMBERS_MAX {
        return Err(MembershipError::Decode(format!("{} members", payload.members.len())));
    }
    Ok(payload)
}

/// For the fuzz targets: `decode_sync_payload`, then the payload re-encoded as
/// `Actor::payload` encodes it.
#[doc(hidden)]
pub fn decode_sync_payload_reencoded(data: &[u8]) -> Result<Vec<u8>, MembershipError> {
    let payload = decode_sync_payload(data)?;
    postcard::to_stdvec(&payload).map_err(|e| MembershipError::Decode(format!("re-encoding: {e}")))
}

struct Scheduled {
    at: Instant,
    seq: u64,
    timer: Timer<GossipId>,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

pub(crate) struct Actor {
    foca: Gossip,
    runtime: AccumulatingRuntime<GossipId>,
    peers: Peers,
    timers: BinaryHeap<Reverse<Scheduled>>,
    next_seq: u64,
    members: watch::Sender<Vec<MemberInfo>>,
    /// Since when each member has had its current state.
    since: HashMap<NodeId, (NodeState, Instant)>,
    self_since: Instant,
    left: bool,
    sync_period: Option<Duration>,
    /// Picks the member of the next anti-entropy sync.
    sync_rng: FocaRng,
    /// A suspicion older than this has lost its timer (see `refresh_stale_suspicions`).
    stale_suspicion: Duration,
    /// When we last re-raised a stale suspicion, per member.
    resuspected: HashMap<NodeId, Instant>,
    /// For results of background syncs; weak so handles alone keep the channel open.
    commands: mpsc::WeakSender<Command>,
    /// Where to knock when no member is active (see `rejoin`).
    seeds: Vec<String>,
    rejoin_period: Duration,
    /// Turns of `rejoin` so far: picks the next address to sync with.
    rejoin_turn: usize,
    /// The re-join sync in flight, if any: at most one at a time.
    rejoin_sync: Option<tokio::task::JoinHandle<()>>,
    /// Whether we were alone at the last `rejoin` tick (logs the transitions only).
    alone: bool,
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v.max(1))
}

fn foca_config(config: &MembershipConfig) -> foca::Config {
    let probe_period = ms(config.probe_period_ms.max(2));
    // Starting point: foca's LAN settings for a few dozen nodes (update fan-out).
    let mut c = foca::Config::new_lan(NonZeroU32::new(32).expect("non-zero"));
    c.probe_period = probe_period;
    c.probe_rtt = ms(config.probe_rtt_ms).min(probe_period - Duration::from_millis(1));
    c.suspect_to_down_after = ms(config.suspect_to_down_ms);
    c.remove_down_after = Some(REMOVE_DOWN_AFTER);
    // Room for the tag `peers/` appends (security::DATAGRAM_TAG_BYTES).
    let packet_max = DATAGRAM_SIZE_MAX_BYTES - crate::security::DATAGRAM_TAG_BYTES;
    c.max_packet_size = NonZeroUsize::new(packet_max).expect("non-zero");
    // Tell members we consider down, so they renew their identity and rejoin.
    c.notify_down_members = true;
    let one = NonZeroUsize::new(1).expect("non-zero");
    // Spread updates between probes, not only piggybacked on them.
    c.periodic_gossip = Some(PeriodicParams {
        frequency: (probe_period / 2).max(Duration::from_millis(10)),
        num_members: NonZeroUsize::new(3).expect("non-zero"),
    });
    // Ask a member for its members now and then (discovery).
    c.periodic_announce = Some(PeriodicParams { frequency: probe_period * 20, num_members: one });
    // Knock on DEAD members' doors: heals partitions and finds restarted nodes even
    // when they did not join through a seed (a restarted node accepts an announce
    // sent to its previous identity, since it has the same node id).
    c.periodic_announce_to_down_members = Some(PeriodicParams { frequency: probe_period * 10, num_members: one });
    c
}

/// A fresh identity's bump: microseconds since the Unix epoch by the node's clock, so a
/// restarted node wins against its previous life. The bumps of one clock also strictly
/// grow: a test restarts a node in-process, and with tokio's clock paused the new life
/// can start at the very microsecond the old one did. (In a broker process, one node
/// per process, this is the clock's value.)
fn initial_bump(clock: &Clock) -> u64 {
    clock.next_unique_us()
}

impl Actor {
    pub(crate) fn new(
        id: NodeId,
        addr: String,
        config: &MembershipConfig,
        clock: &Clock,
        peers: Peers,
        members: watch::Sender<Vec<MemberInfo>>,
        commands: mpsc::WeakSender<Command>,
    ) -> Self {
        let identity = GossipId::new(id, addr, initial_bump(clock));
        let seed = config.rng_seed.unwrap_or_else(rand::random);
        let rng = <FocaRng as rand::SeedableRng>::seed_from_u64(seed);
        let foca = Foca::new(identity, foca_config(config), rng, PostcardCodec);
        let sync_rng = <FocaRng as rand::SeedableRng>::seed_from_u64(seed.rotate_left(32) ^ 0x5bd1_e995);
        let sync_period = (config.sync_period_ms > 0).then(|| ms(config.sync_period_ms));
        let mut actor = Self {
            foca,
            runtime: AccumulatingRuntime::new(),
            peers,
            timers: BinaryHeap::new(),
            next_seq: 0,
            members,
            since: HashMap::new(),
            self_since: Instant::now(),
            left: false,
            sync_period,
            sync_rng,
            stale_suspicion: ms(config.suspect_to_down_ms) + ms(config.probe_period_ms) * 3,
            resuspected: HashMap::new(),
            commands,
            seeds: Vec::new(),
            rejoin_period: ms(config.join_retry_ms),
            rejoin_turn: 0,
            rejoin_sync: None,
            alone: false,
        };
        actor.publish();
        actor
    }

    pub(crate) async fn run(
        mut self,
        mut datagrams: mpsc::Receiver<Bytes>,
        mut commands: mpsc::Receiver<Command>,
        shutdown: CancellationToken,
    ) {
        let mut datagrams_open = true;
        let mut commands_open = true;
        let mut sync_tick = self.sync_period.map(|p| {
            let mut i = tokio::time::interval_at(Instant::now() + p, p);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        });
        let mut watchdog = tokio::time::interval(self.stale_suspicion / 2);
        watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut rejoin_tick = tokio::time::interval(self.rejoin_period);
        rejoin_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next_timer = self.timers.peek().map(|Reverse(s)| s.at);
            tokio::select! {
                // In this order, not at random (tokio's default): what is due at the
                // same instant is handled the same way every time, so a simulation
                // replays. Timers and ticks first: each is ready at most once a period,
                // so they cannot starve the channels.
                biased;
                _ = shutdown.cancelled() => break,
                _ = sleep_until_opt(next_timer), if next_timer.is_some() => self.on_timers(),
                _ = tick_opt(&mut sync_tick), if sync_tick.is_some() => self.start_sync(&shutdown),
                _ = watchdog.tick() => self.refresh_stale_suspicions(),
                _ = rejoin_tick.tick() => self.rejoin(&shutdown),
                c = commands.recv(), if commands_open => match c {
                    Some(c) => self.on_command(c),
                    None => commands_open = false,
                },
                d = datagrams.recv(), if datagrams_open => match d {
                    Some(d) => self.on_datagram(&d),
                    None => datagrams_open = false,
                },
            }
        }
        tracing::debug!(identity = ?self.foca.identity(), "gossip task stopped");
    }

    fn on_datagram(&mut self, datagram: &[u8]) {
        let Some(data) = self.peers.open_datagram(datagram) else {
            // Not from a member (another cluster's, or forged): SWIM tolerates loss.
            tracing::trace!(len = datagram.len(), "gossip datagram without this cluster's tag dropped");
            return;
        };
        if let Err(e) = self.foca.handle_data(data, &mut self.runtime) {
            tracing::trace!(error = %e, len = data.len(), "gossip datagram ignored");
        }
        self.drain();
    }

    fn on_timers(&mut self) {
        let now = Instant::now();
        while self.timers.peek().is_some_and(|Reverse(s)| s.at <= now) {
            let Some(Reverse(s)) = self.timers.pop() else {
                break;
            };
            if let Err(e) = self.foca.handle_timer(s.timer, &mut self.runtime) {
                tracing::debug!(error = %e, "gossip timer failed");
            }
        }
        self.drain();
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Payload(reply) => {
                let _ = reply.send(self.payload());
            }
            Command::Merge { data, reply } => {
                let result = self.apply(&data).map(|()| self.payload());
                let _ = reply.send(result);
            }
            Command::Apply { data, reply } => {
                let result = self.apply(&data);
                if let (Err(e), None) = (&result, &reply) {
                    tracing::debug!(error = %e, "background gossip sync reply ignored");
                }
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
            Command::Leave(reply) => {
                self.leave();
                let _ = reply.send(());
            }
            Command::Gossip => {
                if let Err(e) = self.foca.gossip(&mut self.runtime) {
                    tracing::debug!(error = %e, "gossip failed");
                }
            }
            Command::Seeds(seeds) => self.seeds = seeds,
        }
        self.drain();
    }

    fn leave(&mut self) {
        if self.left {
            return;
        }
        // Switch to the flagged identity first (peers rename us to it), then declare
        // it down: peers end up with a flagged Down entry, i.e. LEFT.
        let leaving = self.foca.identity().to_leaving();
        if let Err(e) = self.foca.change_identity(leaving, &mut self.runtime) {
            tracing::warn!(error = %e, "could not switch to the leaving identity");
        }
        if let Err(e) = self.foca.leave_cluster(&mut self.runtime) {
            tracing::warn!(error = %e, "could not leave the gossip cluster");
        }
        self.left = true;
        self.self_since = Instant::now();
        tracing::info!("left the gossip cluster");
    }

    /// Our view of the cluster, ourselves included.
    fn payload(&self) -> Bytes {
        let me = self.foca.identity().clone();
        let me = if self.left { Member::down(me) } else { Member::alive(me) };
        let members = std::iter::once(me).chain(self.foca.iter_membership_state().cloned()).collect();
        match postcard::to_stdvec(&SyncPayload { members }) {
            Ok(v) => Bytes::from(v),
            // Cannot happen for these types; an empty payload merges as nothing.
            Err(e) => {
                tracing::error!(error = %e, "cannot encode gossip sync payload");
                Bytes::new()
            }
        }
    }

    fn apply(&mut self, data: &[u8]) -> Result<(), MembershipError> {
        if data.is_empty() {
            return Ok(());
        }
        let payload = decode_sync_payload(data)?;
        if let Err(e) = self.foca.apply_many(payload.members.into_iter(), true, &mut self.runtime) {
            tracing::debug!(error = %e, "applying gossip sync payload failed");
        }
        // Let the members we just learnt (or that just learnt us) hear from us soon.
        if !self.left {
            if let Err(e) = self.foca.gossip(&mut self.runtime) {
                tracing::debug!(error = %e, "gossip failed");
            }
        }
        Ok(())
    }

    /// foca forgets its pending suspicion timeouts whenever it resets its timers (it
    /// rejoined under a new identity, or lost and regained all members). A member
    /// suspected just before that stays SUSPECT here forever if it never heard of the
    /// suspicion (nothing else makes it refute). Such a suspicion is raised again one
    /// incarnation higher: it is gossiped afresh (so a live member refutes it) and
    /// gets a new timeout (so a dead one goes DEAD).
    fn refresh_stale_suspicions(&mut self) {
        let now = Instant::now();
        let me = self.foca.identity().id;
        let mut stale = Vec::new();
        for m in self.foca.iter_membership_state() {
            let id = m.id().id;
            if m.state() != State::Suspect || id == me || m.incarnation() == foca::Incarnation::MAX {
                continue;
            }
            let since = match (self.since.get(&id), self.resuspected.get(&id)) {
                (Some(&(NodeState::Suspect, t)), Some(&k)) => t.max(k),
                (Some(&(NodeState::Suspect, t)), None) => t,
                _ => continue,
            };
            if now.duration_since(since) > self.stale_suspicion {
                stale.push(Member::new(m.id().clone(), m.incarnation() + 1, State::Suspect));
            }
        }
        self.resuspected.retain(|id, _| self.since.get(id).is_some_and(|(s, _)| *s == NodeState::Suspect));
        if stale.is_empty() || self.left {
            return;
        }
        for m in &stale {
            tracing::debug!(node_id = m.id().id, "re-raising a stale suspicion");
            self.resuspected.insert(m.id().id, now);
        }
        if let Err(e) = self.foca.apply_many(stale.into_iter(), true, &mut self.runtime) {
            tracing::debug!(error = %e, "re-raising suspicions failed");
        }
        self.drain();
    }

    /// Background anti-entropy: push-pull with one random active member.
    fn start_sync(&mut self, shutdown: &CancellationToken) {
        if self.left {
            return;
        }
        let addrs: Vec<String> = self.foca.iter_members().map(|m| m.id().addr.clone()).collect();
        let chosen: Option<&String> = IndexedRandom::choose(addrs.as_slice(), &mut self.sync_rng);
        if let Some(addr) = chosen.cloned() {
            self.spawn_sync(addr, shutdown);
        }
    }

    /// foca stops every timer (probes, gossip, announces to down members) once it has no
    /// active member, so a node that saw all its peers go DEAD (e.g. every pod of a
    /// StatefulSet restarted within a few seconds, each peer declared down while its
    /// DNS name pointed nowhere) would stay silent, and alone, forever: and so would
    /// they, if they all ended up in that state. While alone, every `join_retry_ms`
    /// we announce ourselves to the members we know as DEAD (over datagrams; a restarted
    /// node accepts an announce to its previous identity) and push-pull with one seed or
    /// known member in turn (over TCP, which also works while datagrams do not). Either
    /// side that learns the other considers it down renews its identity and is ALIVE
    /// again at the next exchange.
    fn rejoin(&mut self, shutdown: &CancellationToken) {
        let alone = !self.left && self.foca.num_members() == 0;
        let was_alone = std::mem::replace(&mut self.alone, alone);
        if !alone {
            return;
        }
        let me = self.foca.identity().clone();
        let down: Vec<GossipId> = self
            .foca
            .iter_membership_state()
            .filter(|m| m.state() == State::Down && m.id().id != me.id && !m.id().leaving)
            .map(|m| m.id().clone())
            .collect();
        let mut addrs: Vec<String> = self.seeds.clone();
        for id in &down {
            if !addrs.contains(&id.addr) {
                addrs.push(id.addr.clone());
            }
        }
        addrs.retain(|a| *a != me.addr);
        if addrs.is_empty() {
            return; // a cluster of one: nobody to knock on
        }
        if !was_alone {
            tracing::info!(known = addrs.len(), "no live gossip member; re-joining through seeds and known members");
        }
        for id in down.into_iter().take(REJOIN_ANNOUNCES_MAX) {
            if let Err(e) = self.foca.announce(id, &mut self.runtime) {
                tracing::debug!(error = %e, "announce to a down member failed");
            }
        }
        self.drain();
        if self.rejoin_sync.as_ref().is_none_or(|t| t.is_finished()) {
            let addr = addrs[self.rejoin_turn % addrs.len()].clone();
            self.rejoin_turn = self.rejoin_turn.wrapping_add(1);
            self.rejoin_sync = Some(self.spawn_sync(addr, shutdown));
        }
    }

    /// A `GossipSync` push-pull with `addr` in the background; the reply is merged
    /// through the command channel.
    fn spawn_sync(&self, addr: String, shutdown: &CancellationToken) -> tokio::task::JoinHandle<()> {
        let payload = self.payload();
        let peers = self.peers.clone();
        let commands = self.commands.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let reply = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                r = peers.gossip_sync(&addr, payload) => r,
            };
            match reply {
                Ok(data) => {
                    if let Some(commands) = commands.upgrade() {
                        let _ = commands.send(Command::Apply { data, reply: None }).await;
                    }
                }
                Err(e) => tracing::debug!(peer = %addr, error = %e, "gossip sync failed"),
            }
        })
    }

    /// Carries out what foca asked for during the last interaction.
    fn drain(&mut self) {
        while let Some((to, data)) = self.runtime.to_send() {
            self.peers.send_datagram(&to.addr, data);
        }
        let now = Instant::now();
        while let Some((after, timer)) = self.runtime.to_schedule() {
            let seq = self.next_seq;
            self.next_seq += 1;
            self.timers.push(Reverse(Scheduled { at: now + after, seq, timer }));
        }
        while let Some(n) = self.runtime.to_notify() {
            match n {
                OwnedNotification::MemberUp(m) => {
                    tracing::debug!(node_id = m.id, addr = %m.addr, "member up")
                }
                OwnedNotification::MemberDown(m) => {
                    tracing::info!(node_id = m.id, addr = %m.addr, left = m.leaving, "member down")
                }
                OwnedNotification::Rename(a, b) => {
                    tracing::debug!(node_id = b.id, from = a.bump, to = b.bump, leaving = b.leaving, "member renamed")
                }
                OwnedNotification::Rejoin(me) => {
                    tracing::info!(bump = me.bump, "declared down, rejoined")
                }
                OwnedNotification::Defunct if !self.left => {
                    tracing::warn!("gossip identity declared down")
                }
                other => tracing::trace!(notification = ?other, "gossip notification"),
            }
        }
        self.publish();
    }

    fn publish(&mut self) {
        let now = Instant::now();
        let me = self.foca.identity();
        let mut list = Vec::with_capacity(self.foca.iter_membership_state().len() + 1);
        list.push(MemberInfo {
            id: me.id,
            addr: me.addr.clone(),
            state: if self.left { NodeState::Left } else { NodeState::Alive },
            life: me.bump,
            state_since: self.self_since,
        });
        for m in self.foca.iter_membership_state() {
            let id = m.id();
            // Our own earlier identities (from before a restart or a rejoin) may be
            // in the table as Down; we are listed above.
            if id.id == me.id {
                continue;
            }
            let state = match m.state() {
                State::Alive => NodeState::Alive,
                State::Suspect => NodeState::Suspect,
                State::Down if id.leaving => NodeState::Left,
                State::Down => NodeState::Dead,
            };
            let since = match self.since.get(&id.id) {
                Some(&(s, t)) if s == state => t,
                _ => now,
            };
            self.since.insert(id.id, (state, since));
            list.push(MemberInfo { id: id.id, addr: id.addr.clone(), state, life: id.bump, state_since: since });
        }
        list.sort_by_key(|m| m.id);
        self.since.retain(|id, _| list.binary_search_by_key(id, |m| m.id).is_ok());
        self.members.send_if_modified(|current| {
            if *current == list {
                false
            } else {
                *current = list;
                true
            }
        });
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn tick_opt(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}
