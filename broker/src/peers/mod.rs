//! The one door to other nodes.
//!
//! Every call this node makes to another goes through [`Peers`]: typed requests and
//! answers, one error type ([`PeerError`]) with the cases callers act on, deadlines
//! from one place ([`PeerTimeouts`]), and the forwarding header (the hop count) set
//! and read only here. Nothing else in the node builds a gRPC client or sees a
//! `tonic::Status`; `api/` converts on the server side.
//!
//! - [`control`]: the cluster state and gossip: forwarded writes, read index,
//!   leadership hand-over, "do you belong to a cluster?", gossip full-state sync and
//!   datagrams; [`raft`]: openraft's network over the same service.
//! - [`data`]: the data path: replication streams, segment status and reads, forwarded
//!   publishes and publish streams, relayed subscriptions, forwarded acks and nacks.
//!
//! Control calls use [`Network::channel`], data calls [`Network::data_channel`]: a
//! slow data stream must not hold up Raft heartbeats on the same HTTP/2 connection.

pub mod control;
pub mod data;
pub mod raft;

pub use data::{ReadRequest, Relayed, ReplicaAnswers};

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tonic::metadata::MetadataMap;
use tonic::service::interceptor::InterceptedService;

use crate::cluster_state::NodeId;
use crate::error::{ErrorCode, RequestError, ERROR_CODE_METADATA};
use crate::transport::Network;

/// How long calls to other nodes may take, where the caller has no deadline of its own
/// (a forwarded client request carries what is left of the client's).
#[derive(Debug, Clone)]
pub struct PeerTimeouts {
    /// A replica's answer to "what do you hold of this segment?" during a fail-over.
    pub segment_status_ms: u64,
    /// Added to the wait a segment read asks the holder for (network and disk).
    pub read_segment_margin_ms: u64,
    /// Asking a member whether it already belongs to a cluster, before bootstrapping.
    pub cluster_probe_ms: u64,
    /// One gossip full-state exchange (connect and both payloads).
    pub gossip_sync_ms: u64,
}

impl Default for PeerTimeouts {
    fn default() -> Self {
        Self { segment_status_ms: 2000, read_segment_margin_ms: 5000, cluster_probe_ms: 3000, gossip_sync_ms: 3000 }
    }
}

/// Handle to the other nodes. Cheap to clone.
#[derive(Clone)]
pub struct Peers {
    inner: Arc<Inner>,
}

struct Inner {
    network: Arc<dyn Network>,
    timeouts: PeerTimeouts,
    credential: Credential,
    access: crate::security::InternalAccess,
}

impl Peers {
    /// Calls without a cluster credential (peers that take node-to-node calls from
    /// anyone: `--insecure-trusted-network`).
    pub fn new(network: Arc<dyn Network>, timeouts: PeerTimeouts) -> Self {
        Self::with_access(network, timeouts, crate::security::InternalAccess::TrustedNetwork)
    }

    /// Calls carrying the cluster credential of `access`, and gossip datagrams with
    /// its tag (`security::InternalAccess`).
    pub fn with_access(
        network: Arc<dyn Network>,
        timeouts: PeerTimeouts,
        access: crate::security::InternalAccess,
    ) -> Self {
        // A token is hex (ASCII); one that is not valid metadata is not sent at all,
        // and the peers answer that it is missing.
        let credential = Credential(access.token().and_then(|t| t.parse().ok()));
        Self { inner: Arc::new(Inner { network, timeouts, credential, access }) }
    }

    /// The payload of a gossip datagram received, if it comes from a member (its tag
    /// is the cluster's); `None`: dropped.
    pub fn open_datagram<'a>(&self, datagram: &'a [u8]) -> Option<&'a [u8]> {
        self.inner.access.open(datagram)
    }

    pub fn timeouts(&self) -> &PeerTimeouts {
        &self.inner.timeouts
    }

    /// Sends one gossip datagram. Best effort, like UDP.
    pub fn send_datagram(&self, addr: &str, data: Bytes) {
        self.inner.network.send_datagram(addr, Bytes::from(self.inner.access.seal(&data)))
    }

    fn channel(&self, addr: &str) -> PeerChannel {
        InterceptedService::new(self.inner.network.channel(addr), self.inner.credential.clone())
    }

    fn data_channel(&self, addr: &str) -> PeerChannel {
        InterceptedService::new(self.inner.network.data_channel(addr), self.inner.credential.clone())
    }
}

/// Puts the cluster credential on every call to another node (node-to-node calls and
/// forwarded client requests alike: both are refused without it, see `api/`).
#[derive(Clone)]
pub struct Credential(Option<tonic::metadata::AsciiMetadataValue>);

impl tonic::service::Interceptor for Credential {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert(crate::security::CLUSTER_CREDENTIAL_METADATA, v.clone());
        }
        Ok(req)
    }
}

/// A channel to another node whose calls carry the cluster credential.
pub type PeerChannel = InterceptedService<tonic::transport::Channel, Credential>;

/// Who a call went to, for error messages: a node id when the caller knows it.
#[derive(Debug, Clone, Copy)]
pub struct Peer<'a> {
    pub node: Option<NodeId>,
    pub addr: &'a str,
}

impl<'a> Peer<'a> {
    pub fn node(node: NodeId, addr: &'a str) -> Self {
        Self { node: Some(node), addr }
    }

    pub fn addr(addr: &'a str) -> Self {
        Self { node: None, addr }
    }
}

impl std::fmt::Display for Peer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.node {
            Some(n) => write!(f, "node {n} at {}", self.addr),
            None => write!(f, "{}", self.addr),
        }
    }
}

/// Why a call to another node failed, in the cases callers act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// The request did not get through (no connection): nothing happened there. Worth
    /// retrying, there or elsewhere.
    #[error("{peer} is unreachable: {message}")]
    Unreachable { peer: String, message: String },
    /// Sent, but the answer did not come in time or the connection broke: the request
    /// may or may not have taken effect there.
    #[error("{peer} did not answer in time (the request may still take effect there): {message}")]
    OutcomeUnknown { peer: String, message: String },
    /// The peer answered with an error; its code says which (see [`PeerError::moved`]).
    #[error("{0}")]
    Rejected(RequestError),
}

impl PeerError {
    /// The peer is not (or no longer) where the data is: the segment moved or closed.
    pub fn moved(&self) -> bool {
        matches!(self, PeerError::Rejected(e) if matches!(e.code, ErrorCode::NotPrimary | ErrorCode::SegmentClosed))
    }

    fn from_status(peer: Peer<'_>, status: tonic::Status) -> Self {
        if let Some(code) = error_code(&status) {
            return PeerError::Rejected(RequestError::new(code, status.message()));
        }
        let (peer, message) = (peer.to_string(), status.message().to_string());
        match status.code() {
            tonic::Code::Unavailable => PeerError::Unreachable { peer, message },
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled | tonic::Code::Unknown => {
                PeerError::OutcomeUnknown { peer, message }
            }
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange => {
                PeerError::Rejected(RequestError::new(ErrorCode::InvalidArgument, message))
            }
            _ => PeerError::Rejected(RequestError::new(ErrorCode::Internal, format!("{peer}: {message}"))),
        }
    }

    /// The call took longer than its deadline.
    fn timed_out(peer: Peer<'_>, after: Duration) -> Self {
        PeerError::OutcomeUnknown { peer: peer.to_string(), message: format!("no answer within {after:?}") }
    }
}

impl From<PeerError> for RequestError {
    fn from(e: PeerError) -> Self {
        match e {
            PeerError::Rejected(e) => e,
            e @ PeerError::Unreachable { .. } => RequestError::new(ErrorCode::PeerUnreachable, e.to_string()),
            e @ PeerError::OutcomeUnknown { .. } => RequestError::new(ErrorCode::Timeout, e.to_string()),
        }
    }
}

/// Metadata marking a request one node forwarded to another, with the number of hops
/// so far. Consumer-group requests are never forwarded twice; a publish may be, up to
/// [`PUBLISH_HOPS_MAX`], when the segment moved while the request was on its way. A
/// request carrying it is taken only with the cluster credential (`api/`): a client
/// must not pass for a node.
pub const FORWARDED_METADATA: &str = "eventter-forwarded";

/// Most times one publish is passed from node to node.
pub const PUBLISH_HOPS_MAX: u32 = 3;

/// Hops an incoming request has made (0: straight from a client).
pub fn hops(metadata: &MetadataMap) -> u32 {
    metadata.get(FORWARDED_METADATA).and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(0)
}

/// The error code a peer's answer carries, if any.
fn error_code(status: &tonic::Status) -> Option<ErrorCode> {
    let code = status.metadata().get(ERROR_CODE_METADATA).and_then(|v| v.to_str().ok()?.parse::<u32>().ok());
    code.and_then(ErrorCode::from_u32)
}

/// Metadata naming the node a Raft message is for. Raft messages carry the sender's
/// vote but not the receiver's id, and a node is reached by its address: a process that
/// took over the address of a member (the member's data directory was damaged and it
/// rejoined as a new member, or a pod came back with an empty volume) would otherwise
/// take the member's log entries as its own, and its empty log would look to the leader
/// like a follower's log going backwards, which openraft treats as a bug and stops on.
const RAFT_TARGET_METADATA: &str = "eventter-raft-target";

fn address_to<T>(req: &mut tonic::Request<T>, node: NodeId) {
    if let Ok(v) = node.to_string().parse() {
        req.metadata_mut().insert(RAFT_TARGET_METADATA, v);
    }
}

/// Whether an incoming Raft message is for node `me`: one that names another node was
/// meant for whoever had this address before. A message without the name (from a
/// node of an older version) is taken.
pub fn raft_message_is_for(metadata: &MetadataMap, me: NodeId) -> bool {
    let target = metadata.get(RAFT_TARGET_METADATA).and_then(|v| v.to_str().ok()?.parse::<NodeId>().ok());
    target.is_none_or(|t| t == me)
}

tokio::task_local! {
    /// The id of the client request the current task handles: set by `api/` around a
    /// request's handler, sent along with every call it makes to other nodes.
    pub static REQUEST_ID: String;
}

tokio::task_local! {
    /// Who the client request the current task handles is for: set by `api/` (and
    /// `amqp/`) around a request's handling, sent along with every request it forwards
    /// to another node ([`crate::security::CALLER_METADATA`]), which checks it too.
    /// Unset: the node's own work.
    pub static CALLER: crate::security::Caller;
}

/// Who the current task works for (the node itself outside any client request).
pub fn current_caller() -> crate::security::Caller {
    CALLER.try_with(|c| c.clone()).unwrap_or(crate::security::Caller::Node)
}

/// Longest request id a client may choose.
pub const REQUEST_ID_LEN_MAX: usize = 64;

/// A new request id: 16 hex digits.
pub fn new_request_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// The id of the client request the current task handles, if any.
pub fn current_request_id() -> Option<String> {
    REQUEST_ID.try_with(|id| id.clone()).ok()
}

/// `message` as a request forwarded by a node that received it after `hops` hops.
fn forwarded<T>(message: T, hops: u32) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    if let Ok(v) = (hops + 1).to_string().parse() {
        req.metadata_mut().insert(FORWARDED_METADATA, v);
    }
    // The client's request keeps its id on every node it passes (their logs match).
    if let Some(v) = current_request_id().and_then(|id| id.parse().ok()) {
        req.metadata_mut().insert(eventtermq_api::error::REQUEST_ID_METADATA, v);
    }
    // The caller's identity, so the node it reaches checks the request too.
    if let Some(v) = current_caller().to_metadata().and_then(|c| c.parse().ok()) {
        req.metadata_mut().insert(crate::security::CALLER_METADATA, v);
    }
    req
}

/// `message` with a deadline (never zero: a spent deadline still sends, and fails).
fn with_timeout<T>(mut req: tonic::Request<T>, timeout: Duration) -> tonic::Request<T> {
    req.set_timeout(timeout.max(Duration::from_millis(1)));
    req
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_with_code(code: ErrorCode, message: &str) -> tonic::Status {
        tonic::Status::from(RequestError::new(code, message))
    }

    #[test]
    fn answers_are_classified_by_what_the_caller_can_do() {
        let peer = Peer::node(7, "n7:1");
        let e = PeerError::from_status(peer, status_with_code(ErrorCode::NotPrimary, "moved"));
        assert_eq!(e, PeerError::Rejected(RequestError::new(ErrorCode::NotPrimary, "moved")));
        assert!(e.moved());
        let e = PeerError::from_status(peer, tonic::Status::unavailable("tcp connect error"));
        assert!(matches!(&e, PeerError::Unreachable { peer, .. } if peer == "node 7 at n7:1"), "{e:?}");
        assert_eq!(RequestError::from(e).code, ErrorCode::PeerUnreachable);
        let e = PeerError::from_status(peer, tonic::Status::deadline_exceeded("late"));
        assert!(matches!(e, PeerError::OutcomeUnknown { .. }));
        assert_eq!(RequestError::from(e).code, ErrorCode::Timeout);
        let e = PeerError::from_status(Peer::addr("a:1"), tonic::Status::invalid_argument("bad"));
        assert_eq!(e, PeerError::Rejected(RequestError::new(ErrorCode::InvalidArgument, "bad")));
    }

    #[test]
    fn the_hop_count_goes_up_by_one_per_forward() {
        assert_eq!(hops(&MetadataMap::new()), 0);
        let req = forwarded((), 0);
        assert_eq!(hops(req.metadata()), 1);
        let req = forwarded((), hops(req.metadata()));
        assert_eq!(hops(req.metadata()), 2);
    }
}
