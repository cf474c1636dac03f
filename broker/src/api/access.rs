//! Who a client request is for: the tower layer in front of the client services
//! (`/eventter.v1.*`) that authenticates it and runs its handler as that caller
//! (`peers::CALLER`), which handlers check with [`allow`] and which travels with any
//! request forwarded to another node.
//!
//! - While the cluster has no users, every client is let in ([`Caller::Open`]), as
//!   before users existed.
//! - Once one exists, a request must carry `authorization: Basic base64(user:password)`:
//!   none is `Unauthenticated` (counted as `missing`), a wrong one `Unauthenticated`
//!   after the source's failure delay (`crate::auth::throttle`). Verified passwords are
//!   remembered for a while (`crate::auth::cache`). The header is removed before the
//!   handler runs.
//! - A client certificate (`--tls-client-ca-file`) that names a user of the cluster
//!   (`crate::client_cert`) logs in as that user when no `authorization` is sent; with
//!   one for another user the request is refused naming both. A certificate that has
//!   expired gets nothing on any path (node-to-node, health and reflection included).
//! - A request another node forwarded (its cluster credential was checked by
//!   [`super::guard`] before this layer) names its caller in `eventter-caller`; that
//!   caller is checked here again against this node's state by the handler.
//!
//! Health and reflection stay open: probes need them, and they tell nothing of the data.

use base64::Engine;
use tonic::codegen::http;

use super::BoxFuture;
use crate::auth::{Auth, Caller, Failure, Need, Refused};
use crate::error::{ErrorCode, RequestError};
use crate::security::CALLER_METADATA;
use crate::transport::ConnInfo;

/// The client services: the only ones this layer checks.
const CLIENT_API_PREFIX: &str = "/eventter.v1.";

/// The standard header of HTTP Basic credentials.
pub const AUTHORIZATION_METADATA: &str = "authorization";

/// Whether the current request's caller may do what `need` says (in a handler).
pub fn allow(auth: &Auth, need: Need) -> Result<(), RequestError> {
    auth.authorize(&crate::peers::current_caller(), &need)
}

/// Whether the current caller may see namespace `ns` in a listing (nothing counted).
pub fn sees_namespace(auth: &Auth, ns: &str) -> bool {
    auth.permits(&crate::peers::current_caller(), &Need::Member { namespace: ns })
}

/// An `authorization` value that is not `Basic base64(user:password)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotBasic;

/// The user name and password of `authorization: Basic ...`.
pub fn basic_credentials(value: &http::HeaderValue) -> Result<(String, String), NotBasic> {
    let text = value.to_str().map_err(|_| NotBasic)?;
    let (scheme, encoded) = text.split_once(' ').ok_or(NotBasic)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(NotBasic);
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).map_err(|_| NotBasic)?;
    let decoded = String::from_utf8(decoded).map_err(|_| NotBasic)?;
    let (user, password) = decoded.split_once(':').ok_or(NotBasic)?;
    Ok((user.to_string(), password.to_string()))
}

#[derive(Clone)]
pub struct AccessLayer {
    pub auth: Auth,
}

impl<S> tower::Layer<S> for AccessLayer {
    type Service = Access<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Access { inner, auth: self.auth.clone() }
    }
}

#[derive(Clone)]
pub struct Access<S> {
    inner: S,
    auth: Auth,
}

fn refusal(failure: Failure) -> tonic::Status {
    RequestError::new(ErrorCode::Unauthenticated, failure.message()).into()
}

fn refused(r: Refused) -> tonic::Status {
    RequestError::new(ErrorCode::Unauthenticated, r.message).into()
}

impl<S, B, R> tower::Service<http::Request<B>> for Access<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    R: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let info = req.extensions().get::<ConnInfo>().cloned();
        let (from, cert) = info.map(|i| (i.remote, i.client_cert)).unwrap_or_default();
        let now = std::time::SystemTime::now();
        if !req.uri().path().starts_with(CLIENT_API_PREFIX) {
            // Not a client request, but an expired certificate still gets nothing.
            if cert.as_ref().is_some_and(|c| c.expired(now).is_some()) {
                let auth = self.auth.clone();
                return Box::pin(async move {
                    let e = auth.certificate(cert.as_deref(), from, "grpc").await.err();
                    let r = e.unwrap_or_else(|| Refused {
                        failure: Failure::CertificateExpired,
                        message: Failure::CertificateExpired.message().into(),
                    });
                    Ok(refused(r).into_http())
                });
            }
            return Box::pin(self.inner.call(req));
        }
        // The ready service answers this request; a fresh clone takes its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let auth = self.auth.clone();
        let headers = req.headers_mut();
        let forwarded = headers.contains_key(crate::peers::FORWARDED_METADATA);
        let named = headers.get(CALLER_METADATA).map(|v| v.to_str().map(str::to_string).map_err(|_| ()));
        let credentials = headers.remove(AUTHORIZATION_METADATA).map(|v| basic_credentials(&v));
        Box::pin(async move {
            // An expired certificate is refused whoever sends it.
            let cert = match auth.certificate(cert.as_deref(), from, "grpc").await {
                Ok(c) => c,
                Err(r) => return Ok(refused(r).into_http()),
            };
            let caller = if forwarded {
                // Only cluster members get here with the mark (the guard checked); the
                // caller is the one the forwarding node authenticated, not its certificate.
                match named.transpose().ok().and_then(|n| Caller::from_metadata(n.as_deref())) {
                    Some(c) => c,
                    None => return Ok(refusal(Failure::Malformed).into_http()),
                }
            } else {
                match auth.open_access() {
                    Ok(true) => Caller::Open,
                    Err(e) => return Ok(tonic::Status::from(e).into_http()),
                    Ok(false) => match credentials {
                        None => match auth.certificate_login(cert, from, "grpc").await {
                            Ok(c) => c,
                            Err(r) => return Ok(refused(r).into_http()),
                        },
                        Some(Err(NotBasic)) => {
                            auth.refuse(Failure::Malformed, None, from, "grpc").await;
                            return Ok(refusal(Failure::Malformed).into_http());
                        }
                        Some(Ok((user, password))) => {
                            match auth.password_login(&cert, &user, &password, from, "grpc").await {
                                Ok(c) => c,
                                Err(r) => return Ok(refused(r).into_http()),
                            }
                        }
                    },
                }
            };
            // Every line of the request (on every node it reaches) names its user.
            if let Some(user) = caller.user() {
                tracing::Span::current().record("user", tracing::field::display(user));
            }
            crate::peers::CALLER.scope(caller, inner.call(req)).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_are_read_and_anything_else_refused() {
        let v = |s: &str| http::HeaderValue::from_str(s).unwrap();
        let encoded = base64::engine::general_purpose::STANDARD.encode("alice:pa:ss");
        assert_eq!(basic_credentials(&v(&format!("Basic {encoded}"))), Ok(("alice".into(), "pa:ss".into())));
        assert_eq!(basic_credentials(&v(&format!("basic {encoded}"))), Ok(("alice".into(), "pa:ss".into())));
        assert!(basic_credentials(&v("Bearer abc")).is_err());
        assert!(basic_credentials(&v("Basic !!!")).is_err());
        let no_colon = base64::engine::general_purpose::STANDARD.encode("alice");
        assert!(basic_credentials(&v(&format!("Basic {no_colon}"))).is_err());
    }
}
