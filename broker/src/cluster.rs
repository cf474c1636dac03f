//! The node's typed door to the cluster state: `write` a command (on the leader, or
//! forwarded to it) and `read` the state linearizably (confirmed with the leader) or
//! stale (this node's copy). API handlers and background tasks use only this.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use tokio::time::Instant;

use crate::cluster_state::raft::LogId;
use crate::cluster_state::{AppliedState, Command, CommandResponse, NodeId, Raft, RequestId, SharedState};
use crate::error::{ErrorCode, RequestError};
use crate::metrics::Metrics;
use crate::peers::{PeerError, Peers};

#[derive(Clone)]
pub struct Cluster {
    pub id: NodeId,
    pub raft: Raft,
    pub state: SharedState,
    peers: Peers,
    request_timeout: Duration,
    /// The nonce of the next request id: unique per node across its restarts (it
    /// starts at a random point, or one a simulation derives from its seed and clock,
    /// so a run replays exactly).
    next_nonce: Arc<AtomicU64>,
    metrics: Metrics,
    /// Changes of `raft.metrics()`, passed on by one task: see [`Cluster::raft_changes`].
    raft_changes: crate::watch::Receiver<()>,
    /// The term this node last became leader in, and when it saw that (for the
    /// hand-over: its vote is granted to a candidate only once its own lease ran out).
    leader_since: Arc<std::sync::Mutex<Option<(u64, Instant)>>>,
    /// Set while this leader hands leadership over: new writes are turned away (the
    /// writer retries, on the next leader) so that the candidate's log can be as long
    /// as this leader's when it asks for votes.
    holding_writes: Arc<std::sync::atomic::AtomicBool>,
    /// The changes among them that background duties act on: see [`Cluster::state_changes`].
    state_changes: crate::watch::Receiver<()>,
    /// Those of them that are not only offset commits: see [`Cluster::layout_changes`].
    layout_changes: crate::watch::Receiver<()>,
    /// Raft's quiescence as this node set it, and what wakes it: see [`Cluster::quiesce`].
    quiet: Arc<Quiet>,
}

/// Whether this node's Raft timers are off (quiesced), and the signal that a request
/// could not reach the leader.
struct Quiet {
    on: std::sync::atomic::AtomicBool,
    leader_unreachable: crate::watch::Sender<()>,
}

/// The parts of Raft's metrics that [`Cluster::state_changes`] follows.
#[derive(PartialEq, Clone, Copy)]
struct Significant {
    running: bool,
    term: u64,
    leader: Option<NodeId>,
    server_state: openraft::ServerState,
    membership: Option<LogId>,
    last_applied: Option<LogId>,
}

impl Significant {
    /// Whether all that changed from `before` is the applied index, over entries that
    /// touched nothing a duty acts on (offset commits, users: the change log records
    /// nothing for them); `false` when the log no longer goes back that far.
    fn only_unrecorded_since(&self, before: &Significant, applied: &SharedState) -> bool {
        let same_but_applied = Significant { last_applied: before.last_applied, ..*self } == *before;
        if !same_but_applied {
            return false;
        }
        let seen = before.last_applied.map_or(0, |l| l.index);
        let st = applied.read();
        st.changes.since(seen).is_some_and(|c| c.is_empty())
    }

    fn of(m: &openraft::RaftMetrics<NodeId, openraft::BasicNode>) -> Self {
        Significant {
            running: m.running_state.is_ok(),
            term: m.current_term,
            leader: m.current_leader,
            server_state: m.state,
            membership: *m.membership_config.log_id(),
            last_applied: m.last_applied,
        }
    }
}

/// Voters at most for a leadership hand-over: with openraft 0.9 only the leader's vote
/// and the candidate's own are sure (the other followers' leases refuse it).
const HAND_OVER_VOTERS_MAX: usize = 3;

/// Sets a flag for as long as it lives.
struct HoldWrites<'a>(&'a std::sync::atomic::AtomicBool);

impl<'a> HoldWrites<'a> {
    fn new(flag: &'a std::sync::atomic::AtomicBool) -> Self {
        flag.store(true, Ordering::Relaxed);
        HoldWrites(flag)
    }
}

impl Drop for HoldWrites<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// Pause between attempts while there is no leader or it just changed.
const RETRY_PAUSE_MS: u64 = 50;

impl Cluster {
    pub fn new(
        id: NodeId,
        raft: Raft,
        state: SharedState,
        peers: Peers,
        request_timeout: Duration,
        first_nonce: u64,
        metrics: Metrics,
    ) -> Self {
        // The only task that waits on openraft's watch (its waiters wake in a random
        // order, see `crate::watch`); it ends when Raft does, and so does the channel.
        let (changed, raft_changes) = crate::watch::channel(());
        let (significant, state_changes) = crate::watch::channel(());
        let (layout, layout_changes) = crate::watch::channel(());
        let mut raft_metrics = raft.metrics();
        let applied = state.clone();
        let leader_since: Arc<std::sync::Mutex<Option<(u64, Instant)>>> = Arc::default();
        let since = leader_since.clone();
        tokio::spawn(async move {
            let mut last = Significant::of(&raft_metrics.borrow());
            while raft_metrics.changed().await.is_ok() {
                {
                    let m = raft_metrics.borrow();
                    if m.current_leader == Some(id) {
                        let mut since = since.lock().unwrap_or_else(|e| e.into_inner());
                        if since.is_none_or(|(term, _)| term != m.current_term) {
                            *since = Some((m.current_term, Instant::now()));
                        }
                    }
                }
                changed.send_replace(());
                let now = Significant::of(&raft_metrics.borrow());
                if now != last {
                    if !now.only_unrecorded_since(&last, &applied) {
                        layout.send_replace(());
                    }
                    last = now;
                    significant.send_replace(());
                }
            }
        });
        let next_nonce = Arc::new(AtomicU64::new(first_nonce));
        let (leader_unreachable, _) = crate::watch::channel(());
        let quiet = Arc::new(Quiet { on: Default::default(), leader_unreachable });
        Self {
            id,
            raft,
            state,
            peers,
            request_timeout,
            next_nonce,
            raft_changes,
            state_changes,
            layout_changes,
            metrics,
            leader_since,
            holding_writes: Arc::default(),
            quiet,
        }
    }

    /// Turns this node's Raft timers off (`true`: a leader sends no heartbeats, a
    /// follower starts no election) or on again. Only timers: what Raft votes for and
    /// commits does not change, so this is safe whatever the timing; waking when
    /// needed is `node::quiesce`'s job. A leader that wakes sends a heartbeat at once.
    pub fn quiesce(&self, quiet: bool) {
        let was = self.quiet.on.swap(quiet, Ordering::Relaxed);
        let rc = self.raft.runtime_config();
        rc.heartbeat(!quiet);
        rc.elect(!quiet);
        // Its tick would find nothing to do: off too, so Raft's core is not woken for
        // it (openraft's tick task itself still wakes, every 1.5 heartbeat intervals).
        rc.tick(!quiet);
        if was && !quiet && self.raft.metrics().borrow().current_leader == Some(self.id) {
            // Fire and forget: the trigger only queues a message to Raft's core.
            let raft = self.raft.clone();
            tokio::spawn(async move {
                let _ = raft.trigger().heartbeat().await;
            });
        }
    }

    /// Whether [`Cluster::quiesce`] last turned the timers off.
    pub fn quiesced(&self) -> bool {
        self.quiet.on.load(Ordering::Relaxed)
    }

    /// Tells when a write or a linearizable read on this node could not reach the
    /// leader: a quiesced follower then starts its election timer (the leader may be
    /// cut off from it while gossip still reaches it through others).
    pub fn leader_unreachable(&self) -> crate::watch::Receiver<()> {
        self.quiet.leader_unreachable.subscribe()
    }

    fn note_peer_failure(&self, e: &PeerError) {
        if matches!(e, PeerError::Unreachable { .. } | PeerError::OutcomeUnknown { .. }) {
            self.quiet.leader_unreachable.send_replace(());
        }
    }

    /// Tells when the applied cluster state, the leader, this node's role or the Raft
    /// membership changed, or Raft stopped: what the node's background duties
    /// (placement, the keeper, the groups' assignments, health) act on. Unlike
    /// [`Cluster::raft_changes`] it stays quiet on a heartbeat: openraft publishes new
    /// metrics for every acknowledged heartbeat (the time since the quorum's last
    /// ack, the followers' replication progress), about 40 times a second on the
    /// leader of three nodes, and a duty that woke on each of them scanned the whole
    /// state that often while nothing happened.
    pub fn state_changes(&self) -> crate::watch::Receiver<()> {
        self.state_changes.clone()
    }

    /// [`Cluster::state_changes`] but for entries that only committed consumer groups'
    /// offsets: what duties that scan the whole state follow (the keeper, placement,
    /// the groups' assignments). A group commits as its consumers move, so with
    /// thousands of groups being consumed, commits are most of what is applied; a
    /// duty woken by each of them did work linear in the state per delivered message.
    pub fn layout_changes(&self) -> crate::watch::Receiver<()> {
        self.layout_changes.clone()
    }

    /// Tells of every change of Raft's metrics (`raft.metrics()` has the new ones); an
    /// error once Raft has stopped. Tasks that wait for Raft wait on this rather than on
    /// `raft.metrics()` itself, so that they wake in the order they began to wait.
    pub fn raft_changes(&self) -> crate::watch::Receiver<()> {
        self.raft_changes.clone()
    }

    /// The node's metrics registry.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// How long a request may take, forwarding and retries included.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// The current leader and its address, if one is known.
    pub fn leader(&self) -> Option<(NodeId, String)> {
        let m = self.raft.metrics().borrow().clone();
        let leader = m.current_leader?;
        let addr = m.membership_config.membership().get_node(&leader)?.addr.clone();
        Some((leader, addr))
    }

    /// If this node leads, hands leadership to another voter (`to`, or the first one
    /// that holds the whole log, preferring nodes not being decommissioned) and waits
    /// until it moved, within `within`. Answers the leader after it: this node's id
    /// when it does not lead (nothing to do) or is the one asked for.
    ///
    /// openraft 0.9 has no transfer call, so: wait until the target holds the leader's
    /// whole log, then ask it to start an election (`Internal.StartElection`). This
    /// leader grants it the vote (its log is as long), which with the candidate's own
    /// vote is a majority of three; the leader then steps down. Other followers whose
    /// lease from this leader is still valid refuse, so with five voters the election
    /// may fail: the error says so and the leader stays.
    pub async fn hand_over_leadership(&self, to: Option<NodeId>, within: Duration) -> Result<NodeId, RequestError> {
        let deadline = Instant::now() + within;
        let mut raft_changes = self.raft_changes();
        let target = loop {
            let m = self.raft.metrics().borrow().clone();
            if m.current_leader != Some(self.id) || to == Some(self.id) {
                return Ok(m.current_leader.unwrap_or(0));
            }
            let membership = m.membership_config.membership().clone();
            if let Some(to) = to {
                if !membership.voter_ids().any(|v| v == to) {
                    return Err(RequestError::new(
                        ErrorCode::NodeNotFound,
                        format!("to_node_id: node {to} is not a Raft voter; only a voter can lead"),
                    ));
                }
            }
            // A node being decommissioned is not chosen while another voter can lead.
            let draining = self.state.read().state.draining.clone();
            let mut caught_up: Vec<NodeId> = m
                .replication
                .as_ref()
                .map(|r| {
                    r.iter()
                        .filter(|(id, matched)| {
                            **id != self.id
                                && to.is_none_or(|t| t == **id)
                                && membership.voter_ids().any(|v| v == **id)
                                && matched.map(|l| l.index) == m.last_log_index
                        })
                        .map(|(id, _)| *id)
                        .collect()
                })
                .unwrap_or_default();
            caught_up.sort_by_key(|id| draining.contains(id));
            if let Some(node) = caught_up.first().and_then(|id| membership.get_node(id).map(|n| (*id, n.addr.clone())))
            {
                break node;
            }
            if membership.voter_ids().all(|v| v == self.id) {
                return Err(RequestError::new(
                    ErrorCode::NotEnoughNodesLeft,
                    "to_node_id: this node is the only Raft voter: there is nobody to hand leadership to",
                ));
            }
            let voters = membership.voter_ids().count();
            if voters > HAND_OVER_VOTERS_MAX {
                // The followers' leases refuse the candidate: only the leader's vote and
                // its own are sure, a majority of three at most.
                return Err(RequestError::new(
                    ErrorCode::NotReady,
                    format!(
                        "leadership hand-over needs {HAND_OVER_VOTERS_MAX} Raft voters at most (the leader's vote and \
                         the candidate's must be a majority), the cluster has {voters}; the leader stays"
                    ),
                ));
            }
            if !matches!(tokio::time::timeout_at(deadline, raft_changes.changed()).await, Ok(Ok(()))) {
                return Err(RequestError::new(
                    ErrorCode::NotReady,
                    format!("no voter caught up with the leader's log within {within:?}; the leader stays"),
                ));
            }
        };
        // openraft's leader grants its vote only once its own leader lease (the longest
        // election timeout) has passed since it was elected: a leader elected moments
        // ago waits that out first, else the candidate fails and nobody leads until an
        // election timeout later.
        let lease = Duration::from_millis(self.raft.config().election_timeout_max);
        let elected = *self.leader_since.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, at)) = elected {
            let granted_from = at + lease + Duration::from_millis(RETRY_PAUSE_MS);
            if granted_from >= deadline {
                return Err(RequestError::new(
                    ErrorCode::NotReady,
                    format!("this leader was elected less than {lease:?} ago and cannot hand over within {within:?}"),
                ));
            }
            tokio::time::sleep_until(granted_from).await;
        }
        // New writes wait (they are retried, on the next leader) until the target holds
        // this leader's whole log, so that the leader's vote can go to it.
        let hold = HoldWrites::new(&self.holding_writes);
        let caught_up = tokio::time::timeout_at(deadline, async {
            loop {
                let m = self.raft.metrics().borrow().clone();
                let matched = m.replication.as_ref().and_then(|r| r.get(&target.0).copied().flatten());
                if matched.map(|l| l.index) == m.last_log_index {
                    return Ok::<(), crate::watch::RecvError>(());
                }
                raft_changes.changed().await?;
            }
        })
        .await;
        if !matches!(caught_up, Ok(Ok(()))) {
            return Err(RequestError::new(
                ErrorCode::NotReady,
                format!("node {} did not catch up with the leader's log within {within:?}; the leader stays", target.0),
            ));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        self.peers.start_election(target.0, &target.1, left).await?;
        // Writes are held while the candidate's vote requests can still be decided (one
        // lease at most), not for the whole wait: a hand-over that fails (five voters)
        // must not stall writes for long.
        let mut hold = Some(hold);
        let release_at = (Instant::now() + lease).min(deadline);
        let moved = tokio::time::timeout_at(deadline, async {
            loop {
                let leader = self.raft.metrics().borrow().current_leader;
                if leader.is_some_and(|l| l != self.id) {
                    return Ok::<NodeId, crate::watch::RecvError>(leader.unwrap_or(0));
                }
                tokio::select! {
                    biased;
                    r = raft_changes.changed() => r?,
                    _ = tokio::time::sleep_until(release_at), if hold.is_some() => hold = None,
                }
            }
        })
        .await;
        match moved {
            Ok(Ok(leader)) => Ok(leader),
            _ => Err(RequestError::new(
                ErrorCode::NotReady,
                format!("node {} started an election but leadership did not move within {within:?}", target.0),
            )),
        }
    }

    /// [`Cluster::hand_over_leadership`] on the leader, wherever it is (forwarded to it
    /// from a follower). Answers the leader after it.
    pub async fn transfer_leadership(&self, to: Option<NodeId>) -> Result<NodeId, RequestError> {
        match self.leader() {
            Some((leader, _)) if leader == self.id => self.hand_over_leadership(to, self.request_timeout).await,
            Some((leader, addr)) => {
                Ok(self.peers.hand_over_leadership(leader, &addr, to, self.request_timeout).await?)
            }
            None => Err(RequestError::new(ErrorCode::NoLeader, "no leader known to hand leadership over from")),
        }
    }

    /// Proposes `cmd` and waits until it is committed and applied; returns the index it
    /// was applied at. A command the state machine rejects returns its error.
    ///
    /// The command goes into the log identified ([`Command::Once`], a new id): an
    /// attempt whose outcome is unknown (no answer in time, the leader changed) is
    /// retried with the same id, and the state machine answers a repeat as it answered
    /// the first attempt, so a delete that did happen does not come back as NotFound.
    pub async fn write(&self, cmd: Command) -> Result<u64, RequestError> {
        let nonce = self.next_nonce.fetch_add(1, Ordering::Relaxed);
        // Boxed: the attempt (forwarding, retries) is about 3 KiB of future, which would
        // otherwise be part of every long-lived task that can write (each consumer
        // group's, each primary's), whether it is writing or not.
        Box::pin(self.write_as(RequestId { node: self.id, nonce }, cmd)).await
    }

    /// [`Cluster::write`] under a given id: a write made again with the id of an
    /// earlier one is answered as that one was.
    pub async fn write_as(&self, id: RequestId, cmd: Command) -> Result<u64, RequestError> {
        let started = std::time::Instant::now();
        let r = self.write_until_answered(Command::Once { id, command: Box::new(cmd) }).await;
        self.metrics.cluster_written(r.is_ok(), started.elapsed().as_secs_f64());
        r
    }

    async fn write_until_answered(&self, cmd: Command) -> Result<u64, RequestError> {
        let deadline = Instant::now() + self.request_timeout;
        // An attempt that may have been committed: a later refusal must not say
        // "nothing changed".
        let mut unknown: Option<RequestError> = None;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let attempt = match self.leader() {
                // A leader cut off from its quorum accepts the proposal but can never
                // commit it: bound the wait. The outcome is then unknown (it may still
                // commit after a heal), which the error says.
                Some((leader, _)) if leader == self.id => {
                    match tokio::time::timeout(remaining, self.write_local(&cmd)).await {
                        Ok(r) => r,
                        Err(_) => Err(Retry::Other("not committed in time (the write may still be applied)".into())),
                    }
                }
                Some((_, addr)) => self.write_forwarded(&addr, &cmd, remaining).await,
                None => Err(Retry::NoLeader),
            };
            match attempt {
                Ok(resp) => return resp.result.map(|()| resp.index).map_err(|e| e.after_unknown(unknown.as_ref())),
                Err(Retry::Fatal(e)) => return Err(e.after_unknown(unknown.as_ref())),
                Err(retry) if Instant::now() >= deadline => {
                    return Err(retry.into_error().after_unknown(unknown.as_ref()))
                }
                Err(retry) => {
                    if retry.outcome_unknown() {
                        unknown = Some(retry.into_error());
                    }
                    tokio::time::sleep(Duration::from_millis(RETRY_PAUSE_MS)).await
                }
            }
        }
    }

    async fn write_local(&self, cmd: &Command) -> Result<CommandResponse, Retry> {
        // The leader's applied state holds every acknowledged write, so a request it
        // rejects here would be rejected at apply time too; checking first keeps the
        // log free of rejected commands. (Apply checks again: authoritative.)
        // A rejection may come from a state that lags the log (a leader just elected
        // applies its predecessor's last entries shortly after): confirm with a
        // linearizable barrier before refusing.
        // A repeat already applied is answered here (the leader's applied state is
        // committed); the log needs no second entry.
        if let Some(answer) = self.state.read().state.answered(cmd) {
            return Ok(answer);
        }
        if self.holding_writes.load(Ordering::Relaxed) {
            return Err(Retry::NoLeader); // handing leadership over: nothing proposed
        }
        let check = self.state.read().state.check(cmd);
        if check.is_err() {
            if self.raft.ensure_linearizable().await.is_err() {
                return Err(Retry::NoLeader);
            }
            let st = self.state.read();
            if let Some(answer) = st.state.answered(cmd) {
                return Ok(answer);
            }
            st.state.check(cmd).map_err(Retry::Fatal)?;
        }
        match self.raft.client_write(cmd.clone()).await {
            Ok(r) => Ok(r.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => Err(Retry::NoLeader),
            Err(e) => Err(Retry::Other(e.to_string())),
        }
    }

    async fn write_forwarded(
        &self,
        leader_addr: &str,
        cmd: &Command,
        timeout: Duration,
    ) -> Result<CommandResponse, Retry> {
        let resp = self.peers.forward_write(leader_addr, cmd, timeout).await.map_err(|e| {
            self.note_peer_failure(&e);
            Retry::Peer(e)
        })?;
        match resp {
            Ok(r) => Ok(r),
            // The leader moved between our look-up and its receipt: try again.
            Err(e) if e.code == ErrorCode::NoLeader => Err(Retry::NoLeader),
            Err(e) => Err(Retry::Fatal(e)),
        }
    }

    /// Leader side of a forwarded write: only accepted while this node is leader.
    pub async fn handle_forwarded_write(&self, cmd: Command) -> Result<CommandResponse, RequestError> {
        self.write_local(&cmd).await.map_err(|r| r.into_error())
    }

    /// Leader side of a read index request: confirms leadership with a quorum and
    /// returns the index a linearizable read must observe.
    pub async fn handle_read_index(&self) -> Result<u64, RequestError> {
        match self.raft.ensure_linearizable().await {
            Ok(log_id) => Ok(log_id.map(|l| l.index).unwrap_or(0)),
            Err(e) => Err(RequestError::new(ErrorCode::NoLeader, format!("not the leader: {e}"))),
        }
    }

    /// [`Cluster::write`], then waits until this node has applied it, so what the
    /// caller reads next on this node includes it (read-your-writes: AMQP's
    /// declare, then bind, then publish on one connection).
    pub async fn write_applied(&self, cmd: Command) -> Result<u64, RequestError> {
        let index = self.write(cmd).await?;
        self.raft
            .wait(Some(self.request_timeout))
            .applied_index_at_least(Some(index), "read your write")
            .await
            .map_err(|e| RequestError::new(ErrorCode::Timeout, format!("waiting to apply index {index}: {e}")))?;
        Ok(index)
    }

    /// Waits until this node's state reflects everything committed before the call
    /// (when `linearizable`), then returns a read guard on it.
    pub async fn read(&self, linearizable: bool) -> Result<std::sync::RwLockReadGuard<'_, AppliedState>, RequestError> {
        if linearizable {
            let deadline = Instant::now() + self.request_timeout;
            let index = loop {
                let remaining = deadline.saturating_duration_since(Instant::now());
                let attempt = match self.leader() {
                    Some((leader, _)) if leader == self.id => {
                        match tokio::time::timeout(remaining, self.handle_read_index()).await {
                            Ok(r) => r.map_err(|_| Retry::NoLeader),
                            Err(_) => Err(Retry::Other("leadership not confirmed in time".into())),
                        }
                    }
                    Some((_, addr)) => self.read_index_remote(&addr, remaining).await,
                    None => Err(Retry::NoLeader),
                };
                match attempt {
                    Ok(i) => break i,
                    Err(retry) if Instant::now() >= deadline => return Err(retry.into_error()),
                    Err(_) => tokio::time::sleep(Duration::from_millis(RETRY_PAUSE_MS)).await,
                }
            };
            let mut changes = self.raft_changes();
            while self.raft.metrics().borrow().last_applied.map(|l| l.index) < Some(index) {
                let why = match tokio::time::timeout_at(deadline, changes.changed()).await {
                    Ok(Ok(())) => continue,
                    Ok(Err(_)) => "Raft stopped",
                    Err(_) => "timed out",
                };
                return Err(RequestError::new(ErrorCode::Timeout, format!("waiting to apply index {index}: {why}")));
            }
        }
        Ok(self.state.read())
    }

    async fn read_index_remote(&self, leader_addr: &str, timeout: Duration) -> Result<u64, Retry> {
        self.peers.read_index(leader_addr, timeout).await.map_err(|e| {
            self.note_peer_failure(&e);
            Retry::Peer(e)
        })
    }
}

/// Why an attempt did not complete; all but `Fatal` are retried until the deadline.
enum Retry {
    NoLeader,
    Other(String),
    Peer(PeerError),
    Fatal(RequestError),
}

impl Retry {
    /// The attempt may have been committed: proposed locally without an answer in
    /// time, or sent to the leader without one.
    fn outcome_unknown(&self) -> bool {
        match self {
            Retry::Other(_) => true,
            Retry::Peer(PeerError::OutcomeUnknown { .. }) => true,
            Retry::Peer(PeerError::Rejected(e)) => e.code.outcome_unknown(),
            Retry::NoLeader | Retry::Peer(PeerError::Unreachable { .. }) | Retry::Fatal(_) => false,
        }
    }

    fn into_error(self) -> RequestError {
        match self {
            Retry::NoLeader => RequestError::new(
                ErrorCode::NoLeader,
                "no Raft leader: the cluster has no quorum of voters reachable from this node; retry later",
            ),
            Retry::Other(msg) => {
                RequestError::new(ErrorCode::Timeout, format!("cluster state request did not complete: {msg}"))
            }
            Retry::Peer(e) => {
                RequestError::new(ErrorCode::Timeout, format!("cluster state request did not complete: {e}"))
            }
            Retry::Fatal(e) => e,
        }
    }
}
