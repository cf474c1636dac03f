//! Request context of the client API (`eventter.v1.*`): an id per request, a `request`
//! tracing span around its handling, and the id in the answer.
//!
//! Every log line written while a request is handled is inside its span, so it carries
//! the request's `id` and `method`, and the `namespace`, `topic` and `group` the handler
//! records with [`tag`] once it has decoded the request. The id comes back in the
//! `eventter-request-id` metadata of every answer and, for every error, at the end of
//! the error message: an error answered before any message (every unary error, a
//! stream refused at its start) in the response headers, an error that ends a stream
//! (a subscription whose relayed group node went away, a publish stream's refused
//! request) in its trailers. So a user can find the broker's log lines of a failed
//! request. A request that failed is logged once, with its status and error code.
//!
//! Node-to-node calls (`eventter.internal.v1`, the data path's replication) and
//! health/reflection get none of this: they are not requests a client can report.

use std::pin::Pin;
use std::task::{Context, Poll};

use eventtermq_api::error::{ERROR_CODE_METADATA, REQUEST_ID_METADATA};
use tonic::codegen::http;
use tracing::Instrument;

/// The id of the client request the current task is handling, if any: what a request
/// forwarded to another node carries along. The task-local lives in `peers/`, which
/// sends it and must not depend on `api/`.
pub fn current_id() -> Option<String> {
    crate::peers::current_request_id()
}

pub use crate::peers::REQUEST_ID_LEN_MAX;

/// Path prefix of the services that get a request context.
const CLIENT_API_PREFIX: &str = "/eventter.v1.";

/// A client's own id when it is one we accept, else a new random one.
pub fn request_id(from_client: Option<&http::HeaderValue>) -> String {
    let valid = |s: &&str| {
        !s.is_empty()
            && s.len() <= REQUEST_ID_LEN_MAX
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    };
    match from_client.and_then(|v| v.to_str().ok()).filter(valid) {
        Some(id) => id.to_string(),
        None => crate::peers::new_request_id(),
    }
}

/// Records what the request is about in the current request span (no-op outside one),
/// as the client sent it (an empty namespace is `default`), before any validation, so
/// that a refused request's lines say what was asked for.
pub fn tag(namespace: &str, topic: Option<&str>, group: Option<&str>) {
    let span = tracing::Span::current();
    let namespace = if namespace.is_empty() { eventtermq_api::defaults::NAMESPACE } else { namespace };
    // Display, not Debug: `topic=orders` in text logs, as the id and method print.
    span.record("namespace", tracing::field::display(namespace));
    if let Some(topic) = topic {
        span.record("topic", tracing::field::display(topic));
    }
    if let Some(group) = group {
        span.record("group", tracing::field::display(group));
    }
}

/// `message` with the request id appended, as the `grpc-message` header carries it
/// (percent-encoded, gRPC's rule: every byte outside printable ASCII, and `%`).
fn message_with_id(encoded: Option<&http::HeaderValue>, id: &str) -> Option<http::HeaderValue> {
    let decoded = encoded
        .map(|v| percent_encoding::percent_decode(v.as_bytes()).decode_utf8_lossy().into_owned())
        .unwrap_or_default();
    let message =
        if decoded.is_empty() { format!("[request id: {id}]") } else { format!("{decoded} [request id: {id}]") };
    const GRPC_MESSAGE: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS.add(b'%');
    let encoded = percent_encoding::utf8_percent_encode(&message, GRPC_MESSAGE).to_string();
    http::HeaderValue::from_str(&encoded).ok()
}

/// Tower layer of the gRPC server adding the request context.
#[derive(Clone, Default)]
pub struct RequestContextLayer;

impl<S> tower::Layer<S> for RequestContextLayer {
    type Service = RequestContext<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestContext { inner }
    }
}

#[derive(Clone)]
pub struct RequestContext<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B, R> tower::Service<http::Request<B>> for RequestContext<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    R: 'static,
{
    type Response = http::Response<WithRequestId<R>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        if !req.uri().path().starts_with(CLIENT_API_PREFIX) {
            let answer = self.inner.call(req);
            return Box::pin(async move { Ok(answer.await?.map(|inner| WithRequestId { inner, context: None })) });
        }
        let id = request_id(req.headers().get(REQUEST_ID_METADATA));
        // A request another node forwarded: that node tells the client the id.
        let from_client = !req.headers().contains_key(crate::peers::FORWARDED_METADATA);
        let id_header = http::HeaderValue::from_str(&id).ok();
        if let Some(value) = &id_header {
            // Handlers (and their forwarding to other nodes) see the id chosen here.
            req.headers_mut().insert(REQUEST_ID_METADATA, value.clone());
        }
        let span = tracing::info_span!(
            "request",
            id = %id,
            method = %req.uri().path(),
            namespace = tracing::field::Empty,
            topic = tracing::field::Empty,
            group = tracing::field::Empty,
            user = tracing::field::Empty,
        );
        let answer = span.in_scope(|| self.inner.call(req));
        let scope_id = id.clone();
        let stream_span = span.clone();
        Box::pin(
            crate::peers::REQUEST_ID.scope(
                scope_id,
                async move {
                    let mut response = answer.await?;
                    let headers = response.headers_mut();
                    if let Some(value) = id_header {
                        headers.insert(REQUEST_ID_METADATA, value);
                    }
                    // A status in the headers: answered without messages (trailers-only),
                    // nothing follows. Otherwise the status comes in the trailers.
                    let context = if failed(headers, &id, from_client) {
                        None
                    } else {
                        Some(Box::new(StreamContext { id, from_client, span: stream_span }))
                    };
                    Ok(response.map(|inner| WithRequestId { inner, context }))
                }
                .instrument(span),
            ),
        )
    }
}

/// When `headers` (an answer's headers or trailers) carry a failed gRPC status: logs
/// the failure (in the current span, the request's) and, on the node the client talks
/// to, appends the request id to the status message. Whether it was a failure.
fn failed(headers: &mut http::HeaderMap, id: &str, from_client: bool) -> bool {
    let Some(status) = headers.get("grpc-status").and_then(|v| v.to_str().ok()) else { return false };
    if status == "0" {
        return false;
    }
    let status = status.to_string();
    if from_client {
        if let Some(message) = message_with_id(headers.get("grpc-message"), id) {
            headers.insert("grpc-message", message);
        }
    }
    let error_code = headers.get(ERROR_CODE_METADATA).and_then(|v| v.to_str().ok()).unwrap_or("");
    // A broker fault (9xxx) or a status without our code is worth a warning; a
    // refused request is the client's business.
    if error_code.starts_with('9') || error_code.is_empty() {
        tracing::warn!(grpc_status = %status, error_code, "request failed");
    } else {
        tracing::info!(grpc_status = %status, error_code, "request failed");
    }
    true
}

/// What a streaming answer needs to mark an error in its trailers.
struct StreamContext {
    id: String,
    from_client: bool,
    span: tracing::Span,
}

/// An answer's body that, at its trailers, does what [`failed`] does for a status in
/// the headers. Frames pass through untouched; only the trailers frame is looked at.
pub struct WithRequestId<B> {
    inner: B,
    /// `None`: not a client request, or its status was in the headers.
    context: Option<Box<StreamContext>>,
}

/// An empty answer, as layers outside this one make (the guard's refusals).
impl<B: Default> Default for WithRequestId<B> {
    fn default() -> Self {
        WithRequestId { inner: B::default(), context: None }
    }
}

impl<B: http_body::Body + Unpin> http_body::Body for WithRequestId<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let mut frame = std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if let Some(trailers) = frame.as_mut().and_then(|f| f.as_mut().ok()).and_then(http_body::Frame::trailers_mut) {
            if let Some(context) = this.context.take() {
                let _entered = context.span.enter();
                failed(trailers, &context.id, context.from_client);
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use tower::{Layer, Service, ServiceExt};

    use super::*;

    #[test]
    fn a_clients_id_is_kept_only_when_valid() {
        let header = |s: &str| http::HeaderValue::from_str(s).unwrap();
        assert_eq!(request_id(Some(&header("order-42_a.b"))), "order-42_a.b");
        for bad in ["", "has space", "ü", &"x".repeat(REQUEST_ID_LEN_MAX + 1)] {
            let id = request_id(http::HeaderValue::from_str(bad).ok().as_ref());
            assert_eq!(id.len(), 16, "{bad:?} -> {id}");
            assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        }
        assert_ne!(request_id(None), request_id(None));
    }

    #[test]
    fn the_id_is_appended_to_the_error_message_percent_encoded() {
        let encoded = http::HeaderValue::from_static("topic%20%22x%22%3A%20100%25%20full");
        let with_id = message_with_id(Some(&encoded), "abc").unwrap();
        let decoded = percent_encoding::percent_decode(with_id.as_bytes()).decode_utf8().unwrap();
        assert_eq!(decoded, "topic \"x\": 100% full [request id: abc]");
        let plain = message_with_id(Some(&http::HeaderValue::from_static("no such topic")), "abc").unwrap();
        assert_eq!(plain.to_str().unwrap(), "no such topic [request id: abc]");
        assert_eq!(message_with_id(None, "abc").unwrap().to_str().unwrap(), "[request id: abc]");
    }

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A handler that tags its request and logs, then refuses it.
    async fn handler(req: http::Request<()>) -> Result<http::Response<()>, std::convert::Infallible> {
        if req.uri().path().starts_with(CLIENT_API_PREFIX) {
            // What a forward to another node would carry.
            assert_eq!(current_id().as_deref(), req.headers()[REQUEST_ID_METADATA].to_str().ok());
        }
        tag("shop", Some("orders"), None);
        tracing::info!("handling");
        let mut response = http::Response::new(());
        response.headers_mut().insert("grpc-status", http::HeaderValue::from_static("5"));
        response.headers_mut().insert("grpc-message", http::HeaderValue::from_static("topic%20not%20found"));
        response.headers_mut().insert(ERROR_CODE_METADATA, http::HeaderValue::from_static("2001"));
        Ok(response)
    }

    #[tokio::test]
    async fn log_lines_and_the_error_carry_the_request_id_and_what_it_is_about() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt().json().with_writer(move || writer.clone()).finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let mut service = RequestContextLayer.layer(tower::service_fn(handler));

        let request = http::Request::builder()
            .uri("/eventter.v1.Messaging/Publish")
            .header(REQUEST_ID_METADATA, "client-7")
            .body(())
            .unwrap();
        let response = service.ready().await.unwrap().call(request).await.unwrap();
        assert_eq!(response.headers()[REQUEST_ID_METADATA], "client-7");
        // Decoded the same, re-encoded as gRPC requires (spaces and brackets are printable).
        assert_eq!(response.headers()["grpc-message"], "topic not found [request id: client-7]");

        let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = logs.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2, "{logs}");
        for line in &lines {
            let span = &line["span"];
            assert_eq!(
                (&span["id"], &span["namespace"], &span["topic"], &span["method"]),
                (
                    &serde_json::json!("client-7"),
                    &serde_json::json!("shop"),
                    &serde_json::json!("orders"),
                    &serde_json::json!("/eventter.v1.Messaging/Publish")
                ),
                "{line}"
            );
        }
        assert_eq!(lines[1]["fields"]["message"], "request failed");
        assert_eq!(lines[1]["fields"]["error_code"], "2001");

        // A request forwarded by another node keeps that node's id, which the handler
        // sees (and would pass on), and the error is left for that node to mark.
        let forwarded = http::Request::builder()
            .uri("/eventter.v1.Messaging/Publish")
            .header(REQUEST_ID_METADATA, "client-7")
            .header(crate::peers::FORWARDED_METADATA, "1")
            .body(())
            .unwrap();
        let response = service.ready().await.unwrap().call(forwarded).await.unwrap();
        assert_eq!(response.headers()[REQUEST_ID_METADATA], "client-7");
        assert_eq!(response.headers()["grpc-message"], "topic%20not%20found");

        // Node-to-node calls are left alone.
        let internal = http::Request::builder().uri("/eventter.internal.v1.Internal/Append").body(()).unwrap();
        let response = service.ready().await.unwrap().call(internal).await.unwrap();
        assert!(response.headers().get(REQUEST_ID_METADATA).is_none());
        assert_eq!(response.headers()["grpc-message"], "topic%20not%20found");
    }

    /// A streaming answer: one message, then `status` in the trailers.
    struct Frames(std::collections::VecDeque<http_body::Frame<bytes::Bytes>>);

    impl http_body::Body for Frames {
        type Data = bytes::Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front().map(Ok))
        }
    }

    fn streaming(status: &'static str, message: &'static str) -> http::Response<Frames> {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static(status));
        trailers.insert("grpc-message", http::HeaderValue::from_static(message));
        let frames =
            [http_body::Frame::data(bytes::Bytes::from_static(b"message")), http_body::Frame::trailers(trailers)];
        http::Response::new(Frames(frames.into()))
    }

    /// The frames of `body`, in order.
    async fn frames<B: http_body::Body + Unpin>(mut body: B) -> Vec<http_body::Frame<B::Data>>
    where
        B::Error: std::fmt::Debug,
    {
        let mut out = Vec::new();
        while let Some(frame) = futures::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            out.push(frame.unwrap());
        }
        out
    }

    #[tokio::test]
    async fn an_error_that_ends_a_stream_carries_the_request_id_in_its_trailers_and_is_logged() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt().json().with_writer(move || writer.clone()).finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let answer = |status, message| {
            tower::service_fn(move |_: http::Request<()>| async move {
                tag("shop", None, Some("billing"));
                Ok::<_, std::convert::Infallible>(streaming(status, message))
            })
        };
        let request = |forwarded: bool| {
            let mut r =
                http::Request::builder().uri("/eventter.v1.Messaging/Subscribe").header(REQUEST_ID_METADATA, "s-1");
            if forwarded {
                r = r.header(crate::peers::FORWARDED_METADATA, "1");
            }
            r.body(()).unwrap()
        };
        let trailers = |frames: Vec<http_body::Frame<bytes::Bytes>>| {
            assert_eq!(frames.len(), 2);
            assert!(frames[0].is_data());
            frames.into_iter().nth(1).unwrap().into_trailers().unwrap()
        };

        let mut failing = RequestContextLayer.layer(answer("14", "node%20went%20away"));
        let response = failing.ready().await.unwrap().call(request(false)).await.unwrap();
        // The headers went out before the error was known.
        assert_eq!(response.headers()[REQUEST_ID_METADATA], "s-1");
        assert!(response.headers().get("grpc-message").is_none());
        let end = trailers(frames(response.into_body()).await);
        assert_eq!(end["grpc-message"], "node went away [request id: s-1]");
        let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let line: serde_json::Value = serde_json::from_str(logs.lines().last().unwrap()).unwrap();
        assert_eq!(line["fields"]["message"], "request failed", "{logs}");
        assert_eq!(line["fields"]["grpc_status"], "14");
        assert_eq!(
            (&line["span"]["id"], &line["span"]["group"]),
            (&serde_json::json!("s-1"), &serde_json::json!("billing"))
        );

        // Forwarded: left for the node the client talks to (which relays these trailers).
        let response = failing.ready().await.unwrap().call(request(true)).await.unwrap();
        assert_eq!(trailers(frames(response.into_body()).await)["grpc-message"], "node%20went%20away");

        // A stream that ends well is passed through as it is, and not logged as failed.
        captured.0.lock().unwrap().clear();
        let mut ok = RequestContextLayer.layer(answer("0", ""));
        let response = ok.ready().await.unwrap().call(request(false)).await.unwrap();
        assert_eq!(trailers(frames(response.into_body()).await)["grpc-message"], "");
        assert!(captured.0.lock().unwrap().is_empty());
    }
}
