//! Process-level test of `--otlp-endpoint` (issue 16, item 5): three real brokers on
//! 127.0.0.219-221 export their publish traces to an OTLP/gRPC receiver in this test
//! (opentelemetry-proto's generated `TraceService` server on 127.0.0.214), and a
//! publish's path arrives as one trace: `publish` -> `append` -> `queue`, `write`,
//! `fsync`, `replicate`, with a `confirmed` event.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::Span;

const HOSTS: [&str; 3] = ["127.0.0.219", "127.0.0.220", "127.0.0.221"];
const PORT: u16 = 27520;
const RECEIVER: &str = "127.0.0.214:27510";

/// A received span and the `service.instance.id` of the node that sent it.
#[derive(Clone, Debug)]
struct Received {
    instance: String,
    span: Span,
}

#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<Received>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = self.0.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let attributes = resource_spans.resource.map(|r| r.attributes).unwrap_or_default();
            let instance = string_attribute(&attributes, "service.instance.id").unwrap_or_default();
            assert_eq!(string_attribute(&attributes, "service.name").as_deref(), Some("eventtermq"));
            for scope in resource_spans.scope_spans {
                received.extend(scope.spans.into_iter().map(|span| Received { instance: instance.clone(), span }));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

fn string_attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes.iter().find(|a| a.key == key).and_then(|a| match a.value.as_ref()?.value.as_ref()? {
        Value::StringValue(s) => Some(s.clone()),
        Value::IntValue(i) => Some(i.to_string()),
        _ => None,
    })
}

/// The spans, by name, of the trace of a `publish` span with `request_id` whose whole
/// path is there (a publish forwarded to the primary has a `publish` span on both nodes;
/// the primary's holds the path).
fn path_of(received: &[Received], request_id: &str) -> Option<HashMap<String, Received>> {
    let publishes = received.iter().filter(|r| {
        r.span.name == "publish" && string_attribute(&r.span.attributes, "request_id").as_deref() == Some(request_id)
    });
    publishes.into_iter().find_map(|publish| {
        let trace: HashMap<String, Received> = received
            .iter()
            .filter(|r| r.span.trace_id == publish.span.trace_id)
            .map(|r| (r.span.name.clone(), r.clone()))
            .collect();
        let names = ["publish", "append", "queue", "write", "fsync", "replicate"];
        names.iter().all(|n| trace.contains_key(*n)).then_some(trace)
    })
}

#[test]
fn a_publishs_path_is_exported_as_one_trace_over_otlp() {
    let received = Receiver::default();
    let collector = received.clone();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let listener = rt.block_on(tokio::net::TcpListener::bind(RECEIVER)).expect("bind the receiver");
    rt.spawn(async move {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });

    let tmp = test_dir("otlp");
    let endpoint = format!("http://{RECEIVER}");
    let _nodes: Vec<Broker> = HOSTS
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let join = if i == 0 { vec![] } else { vec![format!("{}:{PORT}", HOSTS[0])] };
            let mut b = Broker {
                child: None,
                host: h.to_string(),
                port: PORT,
                dir: tmp.join(format!("n{i}")),
                join,
                extra: vec!["--otlp-endpoint".into(), endpoint.clone()],
            };
            b.spawn();
            b
        })
        .collect();
    create_topic_and_group(HOSTS, PORT);

    // A unary publish with a known request id, through a node that may forward it to
    // the segment's primary: the primary's trace has the whole path.
    let request_id = "otlp-test-1";
    let published = rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}:{PORT}", HOSTS[1]))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = eventtermq_proto::v1::messaging_client::MessagingClient::new(channel);
        let message = eventtermq_proto::v1::Message { data: b"traced".to_vec().into(), ..Default::default() };
        let mut request = tonic::Request::new(eventtermq_proto::v1::PublishRequest {
            topic: "t".into(),
            messages: vec![message],
            ..Default::default()
        });
        request.metadata_mut().insert("eventter-request-id", request_id.parse().unwrap());
        client.publish(request).await
    });
    assert!(published.is_ok(), "{published:?}");

    // The batch exporter sends every 5 s.
    let mut path = None;
    eventually(Duration::from_secs(30), "the publish's path exported", || {
        path = path_of(&received.0.lock().unwrap(), request_id);
        path.is_some()
    });
    let path = path.unwrap();
    let id = |name: &str| path[name].span.span_id.clone();
    let parent = |name: &str| path[name].span.parent_span_id.clone();
    for child in ["queue", "write", "fsync", "replicate"] {
        assert_eq!(parent(child), id("append"), "{child}: {path:?}");
    }
    assert_eq!(parent("append"), id("publish"));
    let publish = &path["publish"].span;
    assert_eq!(string_attribute(&publish.attributes, "topic").as_deref(), Some("t"));
    // All on one node (the primary), which is one of ours.
    let instance = &path["publish"].instance;
    assert!(HOSTS.iter().any(|h| *instance == format!("{h}:{PORT}")), "{instance}");
    assert!(path.values().all(|r| r.instance == *instance));
    // RF 3: confirmed once one other replica has it durable too.
    assert_eq!(string_attribute(&path["replicate"].span.attributes, "replicas").as_deref(), Some("1"));
    let append = &path["append"].span;
    assert!(append.events.iter().any(|e| e.name == "confirmed"), "{append:?}");
    // Each stage lies within its parent.
    for child in ["queue", "write", "fsync", "replicate"] {
        let c = &path[child].span;
        assert!(c.start_time_unix_nano >= append.start_time_unix_nano, "{child}");
        assert!(c.end_time_unix_nano <= append.end_time_unix_nano, "{child}");
    }
    assert!(append.start_time_unix_nano >= publish.start_time_unix_nano);
}
