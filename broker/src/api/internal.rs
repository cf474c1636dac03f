//! The `eventter.internal.v1.Internal` service: Raft RPCs, forwarded writes, read
//! index, gossip full-state sync and leadership hand-over, replication, segment
//! status, reads and duplicate windows. Only nodes call it.

use std::pin::Pin;

use eventtermq_proto::internal::v1 as ipb;
use eventtermq_proto::internal::v1::internal_server::Internal;
use futures::{Stream, StreamExt};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::cluster::Cluster;
use crate::cluster_state::raft::{decode, encode};
use crate::cluster_state::{Command, CommandResponse};
use crate::error::{ErrorCode, RequestError};
use crate::membership::Membership;
use crate::replication::read::ReadRequest;
use crate::replication::{replica, Segments};

pub struct InternalService {
    pub cluster: Cluster,
    pub membership: Membership,
    pub segments: Segments,
}

type Reply<T> = Result<Response<T>, Status>;

fn payload<T: serde::de::DeserializeOwned>(req: Request<ipb::RaftPayload>) -> Result<T, Status> {
    decode(&req.into_inner().data).map_err(|e| Status::invalid_argument(format!("data: undecodable payload: {e}")))
}

fn reply<T: serde::Serialize>(v: &T) -> Reply<ipb::RaftPayload> {
    Ok(Response::new(ipb::RaftPayload { data: encode(v) }))
}

impl InternalService {
    /// Refuses a Raft message meant for another node id (see
    /// [`crate::peers::raft_message_is_for`]).
    fn check_raft_target<T>(&self, req: &Request<T>) -> Result<(), Status> {
        if crate::peers::raft_message_is_for(req.metadata(), self.cluster.id) {
            return Ok(());
        }
        Err(Status::from(RequestError::new(
            ErrorCode::NotRaftTarget,
            format!(
                "node {} answers at this address now; the Raft member that had it is gone (a new member joins under its own id)",
                self.cluster.id
            ),
        )))
    }
}

#[tonic::async_trait]
impl Internal for InternalService {
    async fn raft_append_entries(&self, req: Request<ipb::RaftPayload>) -> Reply<ipb::RaftPayload> {
        self.check_raft_target(&req)?;
        let r = self.cluster.raft.append_entries(payload(req)?).await;
        reply(&r)
    }

    async fn raft_vote(&self, req: Request<ipb::RaftPayload>) -> Reply<ipb::RaftPayload> {
        self.check_raft_target(&req)?;
        let r = self.cluster.raft.vote(payload(req)?).await;
        reply(&r)
    }

    async fn raft_install_snapshot(&self, req: Request<ipb::RaftPayload>) -> Reply<ipb::RaftPayload> {
        self.check_raft_target(&req)?;
        let r = self.cluster.raft.install_snapshot(payload(req)?).await;
        reply(&r)
    }

    async fn forward_write(&self, req: Request<ipb::RaftPayload>) -> Reply<ipb::RaftPayload> {
        let cmd: Command = payload(req)?;
        let r: Result<CommandResponse, RequestError> = self.cluster.handle_forwarded_write(cmd).await;
        reply(&r)
    }

    async fn read_index(&self, _req: Request<ipb::ReadIndexRequest>) -> Reply<ipb::ReadIndexResponse> {
        let index = self.cluster.handle_read_index().await?;
        Ok(Response::new(ipb::ReadIndexResponse { index }))
    }

    async fn start_election(&self, _req: Request<ipb::StartElectionRequest>) -> Reply<ipb::StartElectionResponse> {
        self.cluster.raft.trigger().elect().await.map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(ipb::StartElectionResponse {}))
    }

    async fn hand_over_leadership(
        &self,
        req: Request<ipb::HandOverLeadershipRequest>,
    ) -> Reply<ipb::HandOverLeadershipResponse> {
        let to = Some(req.into_inner().to_node_id).filter(|id| *id != 0);
        let leader_id = self.cluster.hand_over_leadership(to, self.cluster.request_timeout()).await?;
        Ok(Response::new(ipb::HandOverLeadershipResponse { leader_id }))
    }

    async fn gossip_sync(&self, req: Request<ipb::GossipPayload>) -> Reply<ipb::GossipPayload> {
        let data = self
            .membership
            .handle_sync(req.into_inner().data.into())
            .await
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(ipb::GossipPayload { data: data.to_vec() }))
    }

    type ReplicateStream = Pin<Box<dyn Stream<Item = Result<ipb::ReplicateResponse, Status>> + Send>>;

    async fn replicate(&self, req: Request<tonic::Streaming<ipb::ReplicateRequest>>) -> Reply<Self::ReplicateStream> {
        // The primary's stream breaking is what the replica sees of a dead primary.
        let inbound =
            req.into_inner().map(|r| r.map_err(|s| RequestError::new(ErrorCode::PeerUnreachable, s.message())));
        let answers = replica::handle_replicate(self.segments.clone(), inbound).await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(answers).map(|r| r.map_err(Status::from)))))
    }

    async fn segment_status(&self, req: Request<ipb::SegmentStatusRequest>) -> Reply<ipb::SegmentStatusResponse> {
        let req = req.into_inner();
        Ok(Response::new(replica::status(&self.segments, req.segment_id, req.freeze).await?))
    }

    async fn dedupe_window(&self, req: Request<ipb::DedupeWindowRequest>) -> Reply<ipb::DedupeWindowResponse> {
        let kept = self.segments.kept_window(req.into_inner().segment_id);
        Ok(Response::new(ipb::DedupeWindowResponse {
            known: kept.is_some(),
            entries: kept.iter().flat_map(|k| k.iter()).map(crate::replication::window::to_wire).collect(),
        }))
    }

    async fn read_segment(&self, req: Request<ipb::ReadSegmentRequest>) -> Reply<ipb::ReadSegmentResponse> {
        let req = req.into_inner();
        // A long poll: up to this node's own read wait, the bound a group's idle reads
        // are meant to have (a shorter cap, such as the request timeout, would make
        // every idle group on another node ask again that often).
        let wait = std::time::Duration::from_millis(u64::from(req.wait_ms).min(self.segments.settings().read_wait_ms));
        let max_bytes = (req.max_bytes as usize).clamp(1, self.segments.settings().read_batch_max_bytes);
        let read = ReadRequest::at(req.from_offset, max_bytes).waiting(wait).since(req.since_unix_ms);
        let r = self.segments.read_local(req.segment_id, read).await?;
        Ok(Response::new(ipb::ReadSegmentResponse {
            from_offset: r.start,
            records: r.records.into_iter().map(crate::replication::to_wire).collect(),
            end_offset: r.end_offset,
            closed: r.closed,
        }))
    }
}
