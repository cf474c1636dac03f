//! The door of node-to-node calls: a tower layer in front of every service of the
//! gRPC port that lets a call to `eventter.internal.v1.Internal`, or a request marked
//! as forwarded by a node, through only with the cluster credential
//! (`security::InternalAccess`). It runs before any handler, so a refused call
//! changes nothing and costs no more than a header comparison.
//!
//! Refusals: `Unauthenticated` when no credential came, `PermissionDenied` when a
//! wrong one did; each counted in `eventtermq_internal_calls_refused{reason}` and
//! logged (at most once per [`REFUSAL_LOG_INTERVAL`], with the caller's address and
//! the number not logged since), never with the credential, expected or presented.

use std::sync::Arc;
use std::time::Duration;

use tonic::codegen::http;

use super::BoxFuture;
use crate::security::{InternalAccess, LogLimiter, Refusal, CLUSTER_CREDENTIAL_METADATA};
use crate::transport::ConnInfo;

/// Path prefix of every node-to-node method.
pub const INTERNAL_PATH_PREFIX: &str = "/eventter.internal.v1.Internal/";

/// Refused calls are logged at most once per this interval.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct InternalGuardLayer {
    access: Arc<InternalAccess>,
    metrics: crate::metrics::Metrics,
    log: Arc<LogLimiter>,
}

impl InternalGuardLayer {
    pub fn new(access: InternalAccess, metrics: crate::metrics::Metrics) -> Self {
        Self { access: Arc::new(access), metrics, log: Arc::new(LogLimiter::new(REFUSAL_LOG_INTERVAL)) }
    }

    /// Whether a request with `path` and `headers` may reach its handler; the status
    /// to answer when not.
    fn admit(&self, path: &str, headers: &http::HeaderMap, conn: Option<&ConnInfo>) -> Result<(), tonic::Status> {
        let forwarded = headers.contains_key(crate::peers::FORWARDED_METADATA);
        if !path.starts_with(INTERNAL_PATH_PREFIX) && !forwarded {
            return Ok(());
        }
        let presented = headers.get(CLUSTER_CREDENTIAL_METADATA).map(|v| v.as_bytes());
        let Err(refusal) = self.access.check(presented) else { return Ok(()) };
        self.metrics.internal_refused(refusal.as_str());
        if let Some(suppressed) = self.log.admit() {
            let from = conn.and_then(|c| c.remote).map(|a| a.to_string()).unwrap_or_else(|| "-".into());
            tracing::warn!(
                method = path,
                from,
                reason = refusal.as_str(),
                forwarded,
                suppressed,
                "refused a node-to-node call without the cluster credential"
            );
        }
        let message = match (refusal, forwarded && !path.starts_with(INTERNAL_PATH_PREFIX)) {
            (r, true) => {
                format!("a request marked as forwarded by a node is taken only from cluster members: {}", r.message())
            }
            (r, false) => r.message().to_string(),
        };
        Err(match (refusal, presented) {
            (Refusal::Missing, _) | (Refusal::Closed, None) => tonic::Status::unauthenticated(message),
            _ => tonic::Status::permission_denied(message),
        })
    }
}

impl<S> tower::Layer<S> for InternalGuardLayer {
    type Service = InternalGuard<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InternalGuard { inner, guard: self.clone() }
    }
}

#[derive(Clone)]
pub struct InternalGuard<S> {
    inner: S,
    guard: InternalGuardLayer,
}

impl<S, B, R> tower::Service<http::Request<B>> for InternalGuard<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        match self.guard.admit(req.uri().path(), req.headers(), req.extensions().get::<ConnInfo>()) {
            Ok(()) => Box::pin(self.inner.call(req)),
            Err(status) => Box::pin(async move { Ok(status.into_http()) }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::ClusterSecret;

    fn headers(pairs: &[(&'static str, &str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn internal_calls_and_forwards_need_the_credential_and_client_calls_do_not() {
        let access = InternalAccess::Secret(ClusterSecret::new(b"a cluster secret of enough bytes").unwrap());
        let token = access.token().unwrap().to_string();
        let metrics = crate::metrics::Metrics::new(10);
        let guard = InternalGuardLayer::new(access, metrics.clone());
        let raft = "/eventter.internal.v1.Internal/Raft";
        let publish = "/eventter.v1.Messaging/Publish";
        assert!(guard.admit(publish, &headers(&[]), None).is_ok());
        assert!(guard.admit(raft, &headers(&[(CLUSTER_CREDENTIAL_METADATA, &token)]), None).is_ok());
        let e = guard.admit(raft, &headers(&[]), None).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let e = guard.admit(raft, &headers(&[(CLUSTER_CREDENTIAL_METADATA, "guess")]), None).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(!e.message().contains(&token));
        // A client passing for a node with the forwarding mark.
        let e = guard.admit(publish, &headers(&[(crate::peers::FORWARDED_METADATA, "1")]), None).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(e.message().contains("forwarded"), "{}", e.message());
        let forwarded = [(crate::peers::FORWARDED_METADATA, "1"), (CLUSTER_CREDENTIAL_METADATA, token.as_str())];
        assert!(guard.admit(publish, &headers(&forwarded), None).is_ok());
        let text = metrics.encode(&Default::default(), false);
        assert!(text.contains(r#"eventtermq_internal_calls_refused_total{reason="missing"} 2"#), "{text}");
        assert!(text.contains(r#"eventtermq_internal_calls_refused_total{reason="wrong"} 1"#), "{text}");
    }
}
