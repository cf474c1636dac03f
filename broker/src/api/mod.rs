//! gRPC services of a node, all on one port: the client/admin API ([`admin`]), the
//! node-to-node API ([`internal`]), `grpc.health.v1` and server reflection.

pub mod admin;
pub mod convert;
pub mod internal;
pub mod messaging;

use std::pin::Pin;

use eventtermq_proto::internal::v1::internal_server::InternalServer;
use eventtermq_proto::v1::admin_server::AdminServer;
use eventtermq_proto::v1::messaging_server::MessagingServer;
use futures::Stream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;

use crate::cluster::Cluster;
use crate::consumer_groups::Groups;
use crate::error::{RequestError, ERROR_CODE_METADATA};
use crate::membership::Membership;
use crate::peers::Peers;
use crate::replication::Segments;
use crate::transport::Conn;

/// What a client sees of a [`RequestError`]: the gRPC code of its range, its message,
/// and its number in the `eventter-error-code` metadata (read back by `peers/`).
impl From<RequestError> for tonic::Status {
    fn from(e: RequestError) -> Self {
        let mut status = tonic::Status::new(e.code.grpc_code(), e.message);
        if let Ok(v) = e.code.as_u32().to_string().parse() {
            status.metadata_mut().insert(ERROR_CODE_METADATA, v);
        }
        status
    }
}

/// Largest gRPC message accepted (Raft snapshots travel in chunks well below this).
pub const GRPC_MESSAGE_SIZE_MAX_BYTES: usize = 64 * 1024 * 1024;

pub use eventtermq_api::health::READINESS_SERVICE;

/// The node's parts the services answer from.
pub struct Services {
    pub cluster: Cluster,
    pub membership: Membership,
    pub segments: Segments,
    pub groups: Groups,
    pub peers: Peers,
}

pub fn serve(
    services: Services,
    incoming: Pin<Box<dyn Stream<Item = std::io::Result<Conn>> + Send>>,
    stop: CancellationToken,
) -> JoinHandle<()> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    // Both reflection versions: grpcurl and other tools still ask for v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(eventtermq_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1().expect("descriptor sets are generated at build time and valid");
    let reflection_v1alpha =
        reflection().build_v1alpha().expect("descriptor sets are generated at build time and valid");

    let Services { cluster, membership, segments, groups, peers } = services;
    // Readiness follows whether a leader is known.
    let mut metrics = cluster.raft.metrics();
    let health_stop = stop.clone();
    tokio::spawn(async move {
        let mut last = None;
        loop {
            let has_leader = metrics.borrow().current_leader.is_some();
            if last != Some(has_leader) {
                let status = if has_leader { ServingStatus::Serving } else { ServingStatus::NotServing };
                health_reporter.set_service_status(READINESS_SERVICE, status).await;
                last = Some(has_leader);
            }
            tokio::select! {
                r = metrics.changed() => if r.is_err() { return },
                _ = health_stop.cancelled() => return,
            }
        }
    });

    let admin = AdminServer::new(admin::AdminService { cluster: cluster.clone(), segments: segments.clone() })
        .max_decoding_message_size(GRPC_MESSAGE_SIZE_MAX_BYTES);
    let messaging = MessagingServer::new(messaging::MessagingService { segments: segments.clone(), groups, peers })
        .max_decoding_message_size(GRPC_MESSAGE_SIZE_MAX_BYTES)
        .max_encoding_message_size(GRPC_MESSAGE_SIZE_MAX_BYTES);
    let internal = InternalServer::new(internal::InternalService { cluster, membership, segments })
        .max_decoding_message_size(GRPC_MESSAGE_SIZE_MAX_BYTES)
        .max_encoding_message_size(GRPC_MESSAGE_SIZE_MAX_BYTES);
    tokio::spawn(async move {
        let result = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(crate::transport::HTTP2_KEEPALIVE_INTERVAL))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(admin)
            .add_service(messaging)
            .add_service(internal)
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "gRPC server failed");
        }
    })
}
