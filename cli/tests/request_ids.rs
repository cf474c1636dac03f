//! Process-level test of request ids in errors that end a stream (issue 16, item 5):
//! the real binary on 127.0.0.211-213, a gRPC client in the test. The id in the
//! error's message is the one in the answer's metadata, and it finds the broker's log
//! line of the failed request on the node the client talked to.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use eventtermq_proto::v1 as pb;
use eventtermq_proto::v1::messaging_client::MessagingClient;

const HOSTS: [&str; 3] = ["127.0.0.211", "127.0.0.212", "127.0.0.213"];
const PORT: u16 = 27500;
/// `--port` + 2, the default.
const METRICS_PORT: u16 = PORT + 2;
const REQUEST_ID: &str = "eventter-request-id";
/// Longest wait for one answer of a stream.
const ANSWER_WAIT: Duration = Duration::from_secs(30);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

async fn client(host: &str) -> MessagingClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{host}:{PORT}"))
        .unwrap()
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect {host}: {e}"));
    MessagingClient::new(channel)
}

/// The next answer of `stream`, waiting at most [`ANSWER_WAIT`].
async fn next<T>(stream: &mut tonic::Streaming<T>, what: &str) -> Result<Option<T>, tonic::Status> {
    tokio::time::timeout(ANSWER_WAIT, stream.message()).await.unwrap_or_else(|_| panic!("no answer: {what}"))
}

/// The id in `[request id: ...]` at the end of `status`'s message (exactly once).
fn id_in(status: &tonic::Status) -> String {
    let message = status.message();
    assert_eq!(message.matches("[request id: ").count(), 1, "{message:?}");
    let id = message.rsplit_once("[request id: ").and_then(|(_, rest)| rest.strip_suffix(']'));
    id.unwrap_or_else(|| panic!("no request id at the end of {message:?}")).to_string()
}

/// The log line of `broker` for the failed request `id`.
fn failure_line(broker: &Broker, id: &str) -> String {
    let log = broker.log();
    log.lines()
        .find(|l| l.contains(&format!("id={id} ")) && l.contains("request failed"))
        .unwrap_or_else(|| panic!("no log line of request {id} on {}:\n{log}", broker.host))
        .to_string()
}

fn message(data: &str) -> pb::Message {
    pb::Message { data: data.as_bytes().to_vec().into(), ..Default::default() }
}

fn publish(topic: &str, data: &str) -> pb::PublishRequest {
    pb::PublishRequest { topic: topic.into(), messages: vec![message(data)], ..Default::default() }
}

fn scrape(host: &str) -> String {
    let mut s = TcpStream::connect((host, METRICS_PORT)).unwrap_or_else(|e| panic!("connect {host}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {host}\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    raw
}

/// The number of subscribers of group `g` a node's scrape reports, if it runs it.
fn subscribers(host: &str) -> Option<f64> {
    scrape(host).lines().find_map(|l| {
        let rest = l.strip_prefix("eventtermq_consumer_group_subscribers{")?;
        rest.contains("group=\"g\"").then(|| rest.rsplit_once(' ')?.1.parse().ok()).flatten()
    })
}

#[test]
fn errors_that_end_streams_carry_the_request_id_of_the_log_lines() {
    let tmp = test_dir("request_ids");
    let mut nodes = three_nodes(&tmp, HOSTS, PORT);
    create_topic_and_group(HOSTS, PORT);
    let o = cli(HOSTS[0], PORT, &["create-topic", "u", "--replication-factor", "3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rt = runtime();

    // A publish stream whose second request names another topic: the first is
    // confirmed, then the stream ends with the refusal. Through every node, so both a
    // stream published where it arrives (the topic's primary) and one relayed to the
    // primary are covered; the id is the one the node the client talks to gave.
    for (i, host) in HOSTS.iter().enumerate() {
        let (answers, headers_id) = rt.block_on(async {
            let requests = futures::stream::iter([publish("t", "first"), publish("u", "second")]);
            let response = client(host).await.publish_stream(requests).await.expect("stream opened");
            let headers_id = response.metadata().get(REQUEST_ID).unwrap().to_str().unwrap().to_string();
            let mut stream = response.into_inner();
            let first = next(&mut stream, "first publish").await;
            let second = next(&mut stream, "second publish").await;
            ((first, second), headers_id)
        });
        assert!(matches!(answers.0, Ok(Some(_))), "{host}: {:?}", answers.0);
        let status = answers.1.expect_err("the second request names another topic");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{host}: {status:?}");
        assert!(status.message().starts_with("topic: a publish stream goes to one topic"), "{status:?}");
        let id = id_in(&status);
        assert_eq!(id, headers_id, "{host}");
        let line = failure_line(&nodes[i], &id);
        assert!(line.contains("PublishStream") && line.contains("topic=t"), "{line}");
    }

    // A subscription through a node that relays it to the group's node, which is
    // killed: the relaying node ends the stream with an error naming the request.
    let group_node = {
        let mut found = None;
        eventually(Duration::from_secs(20), "one node running g", || {
            let running: Vec<usize> = (0..HOSTS.len()).filter(|i| subscribers(HOSTS[*i]).is_some()).collect();
            found = running.first().copied().filter(|_| running.len() == 1);
            found.is_some()
        });
        found.unwrap()
    };
    let relay = (group_node + 1) % HOSTS.len();
    let (status, headers_id) = rt.block_on(async {
        let request = pb::SubscribeRequest { consumer_group: "g".into(), ..Default::default() };
        let response = client(HOSTS[relay]).await.subscribe(request).await.expect("subscribed");
        let headers_id = response.metadata().get(REQUEST_ID).unwrap().to_str().unwrap().to_string();
        let mut stream = response.into_inner();
        // The messages published above (one per stream; the refused ones never stored).
        for n in 0..HOSTS.len() {
            assert!(matches!(next(&mut stream, "a delivery").await, Ok(Some(_))), "delivery {n}");
        }
        let host = HOSTS[group_node];
        let subscribed = tokio::task::spawn_blocking(move || {
            eventually(Duration::from_secs(20), "the subscriber on the group's node", || subscribers(host) == Some(1.0))
        });
        subscribed.await.unwrap();
        nodes[group_node].kill9();
        match next(&mut stream, "the end of the subscription").await {
            Ok(answer) => panic!("the subscription went on or ended without an error: {answer:?}"),
            Err(status) => (status, headers_id),
        }
    });
    let id = id_in(&status);
    assert_eq!(id, headers_id);
    let line = failure_line(&nodes[relay], &id);
    assert!(line.contains("Subscribe") && line.contains("group=g"), "{line}");
}
