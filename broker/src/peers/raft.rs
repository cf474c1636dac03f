//! openraft's network: Raft RPCs over the internal gRPC service, JSON payloads
//! (`cluster_state::raft::{encode, decode}`). openraft wants its own error types
//! (unreachable vs. a network error vs. the remote's `RaftError`), so these calls map
//! `tonic::Status` to them directly rather than through [`super::PeerError`].

use eventtermq_proto::internal::v1::{internal_client::InternalClient, RaftPayload};
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::Peers;
use crate::cluster_state::raft::{decode, encode, TypeConfig};
use crate::cluster_state::NodeId;
use crate::error::ErrorCode;

/// Creates a [`RaftNetworkConnection`] per target node.
#[derive(Clone)]
pub struct RaftNetworkFactoryImpl {
    peers: Peers,
}

impl Peers {
    /// openraft's network: Raft RPCs to the other voters and learners.
    pub fn raft_network(&self) -> RaftNetworkFactoryImpl {
        RaftNetworkFactoryImpl { peers: self.clone() }
    }
}

impl RaftNetworkFactory<TypeConfig> for RaftNetworkFactoryImpl {
    type Network = RaftNetworkConnection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        RaftNetworkConnection { target, client: InternalClient::new(self.peers.channel(&node.addr)) }
    }
}

pub struct RaftNetworkConnection {
    target: NodeId,
    client: InternalClient<super::PeerChannel>,
}

/// The remote side's answer: either the openraft response or its RaftError.
type Remote<T, E> = Result<T, RaftError<NodeId, E>>;

impl RaftNetworkConnection {
    async fn call<Req, Resp, E>(
        &mut self,
        kind: RpcKind,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let mut request = tonic::Request::new(RaftPayload { data: encode(req) });
        request.set_timeout(option.hard_ttl());
        super::address_to(&mut request, self.target);
        let result = match kind {
            RpcKind::Append => self.client.raft_append_entries(request).await,
            RpcKind::Vote => self.client.raft_vote(request).await,
            RpcKind::Snapshot => self.client.raft_install_snapshot(request).await,
        };
        // Unreachable makes openraft back off before the next attempt; a network error
        // is retried at once. Another node at the member's address is as good as none.
        let reply = result.map_err(|status| {
            let replaced = super::error_code(&status) == Some(ErrorCode::NotRaftTarget);
            match status.code() {
                tonic::Code::Unavailable => RPCError::Unreachable(Unreachable::new(&status)),
                _ if replaced => RPCError::Unreachable(Unreachable::new(&status)),
                _ => RPCError::Network(NetworkError::new(&status)),
            }
        })?;
        let remote: Remote<Resp, E> =
            decode(&reply.into_inner().data).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        remote.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

enum RpcKind {
    Append,
    Vote,
    Snapshot,
}

impl RaftNetwork<TypeConfig> for RaftNetworkConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(RpcKind::Append, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>>
    {
        self.call(RpcKind::Snapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(RpcKind::Vote, &rpc, &option).await
    }
}
