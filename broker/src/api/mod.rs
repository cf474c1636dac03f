//! gRPC services of a node, all on one port: the client/admin API ([`admin`]), the
//! node-to-node API ([`internal`], open only to cluster members: [`guard`]),
//! `grpc.health.v1` and server reflection (of the client services only).

pub mod access;
pub mod admin;
pub mod convert;
pub mod guard;
pub mod internal;
pub mod messaging;
pub mod metrics;
pub mod request;

use std::pin::Pin;

use eventtermq_proto::internal::v1::internal_server::InternalServer;
use eventtermq_proto::v1::admin_server::AdminServer;
use eventtermq_proto::v1::messaging_server::MessagingServer;
use futures::Stream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::codegen::http;
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

pub use eventtermq_api::health::{LIVENESS_SERVICE, READINESS_SERVICE};

type RaftMetrics = openraft::RaftMetrics<crate::cluster_state::NodeId, openraft::BasicNode>;

/// Why Raft stopped on this node, if it stopped on an error (a storage error: a failed
/// fsync, a disk that filled under Raft's own writes, a corrupt file) rather than at a
/// shutdown. openraft stops its core then and never starts it again.
pub fn raft_failure(m: &RaftMetrics) -> Option<String> {
    match &m.running_state {
        Err(openraft::error::Fatal::Stopped) | Ok(()) => None,
        Err(e) => Some(e.to_string()),
    }
}

/// When a node is ready to serve: not while it is stopping, nor before it caught up
/// after its start. Each token is cancelled once, by the node.
#[derive(Clone, Default)]
pub struct Readiness {
    /// Cancelled when a graceful stop begins.
    pub stopping: CancellationToken,
    /// Cancelled once the node caught up after its start.
    pub caught_up: CancellationToken,
}

/// Keeps the health service in line with Raft: readiness while a leader is known (and
/// see [`Readiness`]);
/// liveness until Raft stops on an error, since nothing in this process brings it back
/// (an orchestrator's liveness probe then restarts the node, as it should).
async fn report_health(
    cluster: Cluster,
    health: tonic_health::server::HealthReporter,
    readiness: Readiness,
    stop: CancellationToken,
) {
    let Readiness { stopping, caught_up } = readiness;
    let (metrics, mut raft_changes) = (cluster.raft.metrics(), cluster.state_changes());
    let mut last = None;
    loop {
        let (has_leader, failure) = {
            let m = metrics.borrow();
            (m.current_leader.is_some(), raft_failure(&m))
        };
        if let Some(reason) = failure {
            tracing::error!(%reason, "Raft stopped on this node: reporting NOT_SERVING on liveness and readiness; \
                the node must be restarted (dump --stale shows its last state and this reason)");
            health.set_service_status(LIVENESS_SERVICE, ServingStatus::NotServing).await;
            health.set_service_status(READINESS_SERVICE, ServingStatus::NotServing).await;
            return;
        }
        // A node stopping gracefully is no longer ready, whatever Raft says; one that
        // just started is ready once it caught up.
        let ready = has_leader && !stopping.is_cancelled() && caught_up.is_cancelled();
        if last != Some(ready) {
            let status = if ready { ServingStatus::Serving } else { ServingStatus::NotServing };
            health.set_service_status(READINESS_SERVICE, status).await;
            last = Some(ready);
        }
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = stopping.cancelled(), if last == Some(true) => {}
            _ = caught_up.cancelled(), if last != Some(true) && !caught_up.is_cancelled() => {}
            r = raft_changes.changed() => if r.is_err() { return },
        }
    }
}

/// The node's parts the services answer from.
pub struct Services {
    pub cluster: Cluster,
    pub membership: Membership,
    pub segments: Segments,
    pub groups: Groups,
    pub peers: Peers,
    /// Users: who a client is and what it may do.
    pub auth: crate::auth::Auth,
    /// The publish bytes this node holds for its clients, gRPC and AMQP alike.
    pub budget: crate::budget::PublishBudget,
}

/// Serves the gRPC port; node-to-node calls only as `access` allows.
pub fn serve(
    services: Services,
    access: crate::security::InternalAccess,
    incoming: Pin<Box<dyn Stream<Item = std::io::Result<Conn>> + Send>>,
    stop: CancellationToken,
    readiness: Readiness,
) -> JoinHandle<()> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    // Both reflection versions: grpcurl and other tools still ask for v1alpha. Only
    // the client services: the node-to-node one is none of a client's business.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(eventtermq_proto::CLIENT_FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1().expect("descriptor sets are generated at build time and valid");
    let reflection_v1alpha =
        reflection().build_v1alpha().expect("descriptor sets are generated at build time and valid");

    let Services { cluster, membership, segments, groups, peers, auth, budget } = services;
    let grpc_metrics = GrpcMetricsLayer { metrics: segments.metrics().clone() };
    let guard = guard::InternalGuardLayer::new(access, segments.metrics().clone());
    tokio::spawn(report_health(cluster.clone(), health_reporter, readiness, stop.clone()));
    let admin = AdminServer::new(admin::AdminService {
        cluster: cluster.clone(),
        segments: segments.clone(),
        groups: groups.clone(),
        peers: peers.clone(),
        auth: auth.clone(),
    })
    .max_decoding_message_size(GRPC_MESSAGE_SIZE_MAX_BYTES);
    let messaging = MessagingServer::new(messaging::MessagingService {
        budget,
        segments: segments.clone(),
        groups,
        peers,
        auth: auth.clone(),
    })
    .max_decoding_message_size(GRPC_MESSAGE_SIZE_MAX_BYTES)
    .max_encoding_message_size(GRPC_MESSAGE_SIZE_MAX_BYTES);
    let stream_window = Some(segments.settings().http2_stream_window_bytes).filter(|w| *w > 0);
    let keepalive_ms = segments.settings().http2_keepalive_interval_ms;
    let keepalive = (keepalive_ms > 0).then(|| std::time::Duration::from_millis(keepalive_ms));
    let internal = InternalServer::new(internal::InternalService { cluster, membership, segments })
        .max_decoding_message_size(GRPC_MESSAGE_SIZE_MAX_BYTES)
        .max_encoding_message_size(GRPC_MESSAGE_SIZE_MAX_BYTES);
    tokio::spawn(async move {
        let result = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .initial_stream_window_size(stream_window)
            .http2_keepalive_interval(keepalive)
            .layer(
                tower::ServiceBuilder::new()
                    .layer(grpc_metrics)
                    .layer(guard)
                    .layer(request::RequestContextLayer)
                    .layer(access::AccessLayer { auth })
                    .into_inner(),
            )
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

/// Counts every gRPC request by method and status code, and times it until its
/// response headers: a unary call's whole handling, a stream's set-up. A status sent
/// in the trailers after a stream's messages is not seen: such a stream counts as
/// `0` (OK).
#[derive(Clone)]
struct GrpcMetricsLayer {
    metrics: crate::metrics::Metrics,
}

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics { inner, metrics: self.metrics.clone() }
    }
}

#[derive(Clone)]
struct GrpcMetrics<S> {
    inner: S,
    metrics: crate::metrics::Metrics,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B, R> tower::Service<http::Request<B>> for GrpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let count = self.metrics.grpc_started(req.uri().path());
        let answer = self.inner.call(req);
        Box::pin(async move {
            let r = answer.await;
            // No grpc-status in the headers: the status follows the messages (OK so far).
            let code = match &r {
                Ok(resp) => Some(resp.headers().get("grpc-status").and_then(|v| v.to_str().ok()).unwrap_or("0")),
                Err(_) => None,
            };
            count.answered(code);
            r
        })
    }
}
