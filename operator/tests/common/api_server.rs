//! A scripted Kubernetes API server: the test takes each request the client sends, in
//! order, checks its method and path, and answers it.

use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

pub struct ApiServer {
    handle: Handle,
}

/// One request as the client sent it.
pub struct Seen {
    pub query: String,
    pub body: Value,
}

/// A client talking to a fresh scripted API server.
pub fn client() -> (Client, ApiServer) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "default"), ApiServer { handle })
}

/// The body of a Kubernetes `Status` error response.
pub fn status_error(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": reason, "reason": reason, "code": code})
}

impl ApiServer {
    /// Takes the next request, asserts `method` and `path`, answers `respond(body)`.
    pub async fn expect(
        &mut self,
        method: Method,
        path: &str,
        respond: impl FnOnce(&Value) -> (StatusCode, Value),
    ) -> Seen {
        let next = tokio::time::timeout(Duration::from_secs(10), self.handle.next_request()).await;
        let (request, send) = next
            .unwrap_or_else(|_| panic!("timed out waiting for {method} {path}"))
            .unwrap_or_else(|| panic!("client gone before {method} {path}"));
        let seen_method = request.method().clone();
        let uri = request.uri().clone();
        assert_eq!((&seen_method, uri.path()), (&method, path), "unexpected request {seen_method} {uri}");
        let bytes = request.into_body().collect_bytes().await.unwrap();
        let body = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
        let (status, response) = respond(&body);
        send.send_response(
            Response::builder().status(status).body(Body::from(serde_json::to_vec(&response).unwrap())).unwrap(),
        );
        Seen { query: uri.query().unwrap_or_default().to_string(), body }
    }

    /// Answers an Event creation (the recorder's POST).
    pub async fn expect_event(&mut self, namespace: &str, reason: &str) -> Seen {
        let seen = self
            .expect(Method::POST, &format!("/apis/events.k8s.io/v1/namespaces/{namespace}/events"), |b| {
                (StatusCode::CREATED, b.clone())
            })
            .await;
        assert_eq!(seen.body["reason"], reason, "event: {}", seen.body);
        seen
    }

    /// Asserts that the client sends nothing more.
    pub async fn expect_no_more(&mut self) {
        if let Ok(Some((request, _))) =
            tokio::time::timeout(Duration::from_millis(200), self.handle.next_request()).await
        {
            panic!("unexpected extra request {} {}", request.method(), request.uri());
        }
    }
}
