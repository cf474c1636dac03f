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
    /// The changes among them that background duties act on: see [`Cluster::state_changes`].
    state_changes: crate::watch::Receiver<()>,
}

/// The parts of Raft's metrics that [`Cluster::state_changes`] follows.
#[derive(PartialEq)]
struct Significant {
    running: bool,
    term: u64,
    leader: Option<NodeId>,
    server_state: openraft::ServerState,
    membership: Option<LogId>,
    last_applied: Option<LogId>,
}

impl Significant {
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
        let mut raft_metrics = raft.metrics();
        tokio::spawn(async move {
            let mut last = Significant::of(&raft_metrics.borrow());
            while raft_metrics.changed().await.is_ok() {
                changed.send_replace(());
                let now = Significant::of(&raft_metrics.borrow());
                if now != last {
                    last = now;
                    significant.send_replace(());
                }
            }
        });
        let next_nonce = Arc::new(AtomicU64::new(first_nonce));
        Self { id, raft, state, peers, request_timeout, next_nonce, raft_changes, state_changes, metrics }
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
        let resp = self.peers.forward_write(leader_addr, cmd, timeout).await.map_err(Retry::Peer)?;
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
        self.peers.read_index(leader_addr, timeout).await.map_err(Retry::Peer)
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
