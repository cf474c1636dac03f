//! Calls of the control plane: the cluster state (forwarded writes, read index,
//! leadership hand-over, bootstrap probe) and gossip full-state sync.

use std::time::Duration;

use bytes::Bytes;
use eventtermq_proto::internal::v1::{
    internal_client::InternalClient, GossipPayload, HandOverLeadershipRequest, RaftPayload, ReadIndexRequest,
    StartElectionRequest,
};
use eventtermq_proto::v1::{admin_client::AdminClient, DumpRequest};

use super::{with_timeout, Peer, PeerError, Peers};
use crate::cluster_state::raft::{decode, encode};
use crate::cluster_state::{Command, CommandResponse};
use crate::error::{ErrorCode, RequestError};

impl Peers {
    /// Sends a cluster-state command to the leader at `addr`; its answer is the
    /// leader's own outcome of the write (accepted at an index, or refused).
    pub async fn forward_write(
        &self,
        addr: &str,
        cmd: &Command,
        timeout: Duration,
    ) -> Result<Result<CommandResponse, RequestError>, PeerError> {
        let peer = Peer::addr(addr);
        let mut client = InternalClient::new(self.channel(addr));
        let req = with_timeout(tonic::Request::new(RaftPayload { data: encode(cmd) }), timeout);
        let reply = client.forward_write(req).await.map_err(|s| PeerError::from_status(peer, s))?;
        decode(&reply.into_inner().data).map_err(|e| undecodable(peer, e))
    }

    /// Asks the leader at `addr` to confirm its leadership and return the index a
    /// linearizable read must wait for.
    pub async fn read_index(&self, addr: &str, timeout: Duration) -> Result<u64, PeerError> {
        let mut client = InternalClient::new(self.channel(addr));
        let req = with_timeout(tonic::Request::new(ReadIndexRequest {}), timeout);
        let reply = client.read_index(req).await.map_err(|s| PeerError::from_status(Peer::addr(addr), s))?;
        Ok(reply.into_inner().index)
    }

    /// Asks the voter at `addr` to start a Raft election now (leadership hand-over).
    pub async fn start_election(&self, node: u64, addr: &str, timeout: Duration) -> Result<(), PeerError> {
        let mut client = InternalClient::new(self.channel(addr));
        let req = with_timeout(tonic::Request::new(StartElectionRequest {}), timeout);
        client.start_election(req).await.map_err(|s| PeerError::from_status(Peer::node(node, addr), s))?;
        Ok(())
    }

    /// Asks the leader `node` at `addr` to hand leadership over (to `to`, or to any
    /// caught-up voter); answers the leader after it.
    pub async fn hand_over_leadership(
        &self,
        node: u64,
        addr: &str,
        to: Option<u64>,
        timeout: Duration,
    ) -> Result<u64, PeerError> {
        let mut client = InternalClient::new(self.channel(addr));
        let req = with_timeout(tonic::Request::new(HandOverLeadershipRequest { to_node_id: to.unwrap_or(0) }), timeout);
        let reply =
            client.hand_over_leadership(req).await.map_err(|s| PeerError::from_status(Peer::node(node, addr), s))?;
        Ok(reply.into_inner().leader_id)
    }

    /// Whether the node at `addr` already belongs to a Raft cluster, from its own copy
    /// of the state (no leader needed): it has a term, a leader or applied entries.
    pub async fn belongs_to_a_cluster(&self, node: u64, addr: &str) -> Result<bool, PeerError> {
        let peer = Peer::node(node, addr);
        let timeout = Duration::from_millis(self.timeouts().cluster_probe_ms);
        let mut client = AdminClient::new(self.channel(addr));
        // The node's own request (marked as a node's, with the cluster credential), not
        // a client's: a peer started with `--admin-user` takes no client before its
        // administrator exists, which needs the cluster this probe is deciding on, and
        // a cluster with users takes no client without credentials.
        let ask =
            client.dump(with_timeout(super::forwarded(DumpRequest { stale: true, ..Default::default() }, 0), timeout));
        let reply = tokio::time::timeout(timeout, ask)
            .await
            .map_err(|_| PeerError::timed_out(peer, timeout))?
            .map_err(|s| PeerError::from_status(peer, s))?
            .into_inner();
        let index = reply.state.map(|s| s.index).unwrap_or(0);
        Ok(reply.term > 0 || reply.leader_id != 0 || index > 0)
    }

    /// One gossip full-state exchange: sends ours, returns the peer's.
    pub async fn gossip_sync(&self, addr: &str, data: Bytes) -> Result<Bytes, PeerError> {
        let peer = Peer::addr(addr);
        let timeout = Duration::from_millis(self.timeouts().gossip_sync_ms);
        let mut client = InternalClient::new(self.channel(addr));
        let call =
            client.gossip_sync(with_timeout(tonic::Request::new(GossipPayload { data: data.to_vec() }), timeout));
        let reply = tokio::time::timeout(timeout, call)
            .await
            .map_err(|_| PeerError::timed_out(peer, timeout))?
            .map_err(|s| PeerError::from_status(peer, s))?;
        Ok(Bytes::from(reply.into_inner().data))
    }
}

fn undecodable(peer: Peer<'_>, e: impl std::fmt::Display) -> PeerError {
    PeerError::Rejected(RequestError::new(ErrorCode::Internal, format!("{peer} answered something undecodable: {e}")))
}
