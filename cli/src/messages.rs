//! `publish` and `subscribe`.

use std::collections::VecDeque;
use std::io::{BufRead, Write};
use std::time::Duration;

use base64::Engine as _;
use eventtermq_proto::v1 as pb;
use eventtermq_proto::v1::messaging_client::MessagingClient;
use serde_json::json;
use tokio::sync::mpsc;
use tonic::Streaming;

use super::args::{PersistenceArg, PublishArgs, SubscribeArgs};
use super::CliError;
use super::Ctx;
use eventtermq_broker::cluster_state::validate;

fn message(args: &PublishArgs, data: Vec<u8>) -> Result<pb::Message, CliError> {
    let mut headers = std::collections::HashMap::new();
    for h in &args.headers {
        let (k, v) = h
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| CliError::Usage(format!("--header: {h:?} must look like key=value")))?;
        headers.insert(k.to_string(), v.to_string());
    }
    let properties =
        args.content_type.as_ref().map(|c| pb::Properties { content_type: c.clone(), ..Default::default() });
    Ok(pb::Message {
        routing_key: args.routing_key.clone(),
        properties,
        headers,
        data: data.into(),
        ..Default::default()
    })
}

pub(super) fn persistence(p: Option<PersistenceArg>) -> pb::Persistence {
    match p {
        None => pb::Persistence::Default,
        Some(PersistenceArg::None) => pb::Persistence::None,
        Some(PersistenceArg::Primary) => pb::Persistence::Primary,
        Some(PersistenceArg::Replicated) => pb::Persistence::Replicated,
    }
}

/// Pauses before sending again a request whose outcome is unknown (doubling).
const RETRY_PAUSE_MIN: Duration = Duration::from_millis(100);
const RETRY_PAUSE_MAX: Duration = Duration::from_secs(2);
/// Requests of a publish stream sent and not answered yet. Each is kept until its
/// answer comes, to be sent again after a failure; the broker works on this many at
/// once (more would wait there).
const STREAM_IN_FLIGHT_MAX: usize = 64;

pub async fn publish(ctx: &Ctx, args: PublishArgs) -> Result<(), CliError> {
    match args.count {
        Some(0) => return Err(CliError::Usage("--count: must be at least 1".into())),
        Some(_) if args.data == "-" => {
            return Err(CliError::Usage("--count: publishes DATA; it cannot be combined with `-` (stdin)".into()))
        }
        _ => {}
    }
    let retry_for = validate::duration_ms("--retry-for", &args.retry_for).map_err(|e| CliError::Usage(e.message))?;
    // Exactly once: every request carries this producer id and its own number, so a
    // request sent again after an unknown outcome is stored once (0 would mean none).
    let producer_id = match args.producer_id {
        Some(0) => return Err(CliError::Usage("--producer-id: must not be 0 (0 means no producer id)".into())),
        Some(id) => id,
        None => rand::random::<u64>().max(1),
    };
    let client = crate::messaging_client_as(&ctx.addr, ctx.tls.as_ref(), &ctx.credentials)?;
    if args.batch_messages_max == 0 {
        return Err(CliError::Usage("--batch-messages-max: must be at least 1".into()));
    }
    let template = message(&args, Vec::new())?;
    // Every request of this publish, without its messages and number.
    let request = pb::PublishRequest {
        namespace: ctx.namespace.clone(),
        topic: args.topic.clone(),
        messages: Vec::new(),
        persistence: persistence(args.persistence) as i32,
        producer_id,
        sequence: 0,
    };
    let retries = Retries::new(Duration::from_millis(retry_for), ctx);
    if args.data != "-" && args.count.is_none() {
        let one = pb::Message { data: args.data.clone().into_bytes().into(), ..template };
        let request = pb::PublishRequest { messages: vec![one], sequence: 1, ..request };
        return publish_one(client, ctx, request, retries).await;
    }
    publish_stream(client, ctx, &args, request, template, retries).await
}

/// Sending a request again after its outcome was unknown, with the same producer id
/// and number: the broker answers a repeat as it answered (or would have answered)
/// the first attempt, so nothing is stored twice.
struct Retries {
    retry_for: Duration,
    /// The node asked, and whether over TLS ([`CliError::diagnosed`]).
    addr: String,
    tls_used: bool,
    /// End of the current run of failures (`None` while requests are answered).
    deadline: Option<tokio::time::Instant>,
    pause: Duration,
    /// Why an earlier attempt's outcome is unknown: a later refusal does not mean
    /// nothing changed.
    unknown: Option<String>,
    /// The node has answered a request: it speaks plaintext gRPC (or TLS, as asked),
    /// and a later failure is the node's or the network's, never the port's protocol.
    answered: bool,
}

impl Retries {
    fn new(retry_for: Duration, ctx: &Ctx) -> Self {
        let (addr, tls_used) = (ctx.addr.clone(), ctx.tls.is_some());
        Retries { retry_for, addr, tls_used, deadline: None, pause: RETRY_PAUSE_MIN, unknown: None, answered: false }
    }

    /// An answer came: the next failure gets the whole `--retry-for` again.
    fn progress(&mut self) {
        self.answered = true;
        self.deadline = None;
        self.pause = RETRY_PAUSE_MIN;
    }

    /// After a pause, `Ok` when the failed attempt is worth repeating: its outcome is
    /// unknown, or the node could not be reached (it may be restarting), and the time
    /// for retries is not over. Otherwise the error to exit with. A refusal (every
    /// other broker answer; the broker itself retries its 5xxx conditions for
    /// --request-timeout-ms) is final.
    async fn after(&mut self, e: CliError) -> Result<(), CliError> {
        // A port that does not speak plaintext gRPC never will: said once, not retried.
        // A node that has answered does speak it (a node killed or restarting closes
        // connections much as a TLS port does, so it is not asked again).
        let e = if self.answered {
            e
        } else {
            let (addr, tls_used) = (self.addr.clone(), self.tls_used);
            match tokio::task::spawn_blocking(move || e.diagnosed(&addr, tls_used)).await {
                Ok(e) => e,
                Err(join) => CliError::Failed(format!("checking the node's port failed: {join}")),
            }
        };
        if let CliError::OutcomeUnknown { message, .. } = &e {
            self.unknown = Some(message.clone());
        }
        let worth = matches!(e, CliError::OutcomeUnknown { .. } | CliError::Connect { .. });
        let now = tokio::time::Instant::now();
        let deadline = *self.deadline.get_or_insert(now + self.retry_for);
        if !worth || now + self.pause > deadline {
            return Err(self.final_error(e));
        }
        eprintln!("retrying with the same producer id and request numbers: {e}");
        tokio::time::sleep(self.pause).await;
        self.pause = (self.pause * 2).min(RETRY_PAUSE_MAX);
        Ok(())
    }

    /// `e`, unless an earlier attempt's outcome was unknown: then it may have taken
    /// effect, whatever the last attempt heard.
    fn final_error(&self, e: CliError) -> CliError {
        let Some(first) = &self.unknown else { return e };
        match e {
            CliError::Rejected { code, message } => CliError::OutcomeUnknown {
                code,
                message: format!("{message} (after an earlier attempt whose outcome is unknown: {first})"),
            },
            e @ CliError::Connect { .. } => CliError::OutcomeUnknown {
                code: "Unavailable".into(),
                message: format!("{e} (after an earlier attempt whose outcome is unknown: {first})"),
            },
            e => e,
        }
    }
}

/// Publishes DATA once, with one call (sent again while its outcome is unknown).
async fn publish_one(
    mut client: MessagingClient<crate::Authed>,
    ctx: &Ctx,
    request: pb::PublishRequest,
    mut retries: Retries,
) -> Result<(), CliError> {
    let r = loop {
        match client.publish(request.clone()).await {
            Ok(r) => break r.into_inner(),
            Err(s) => retries.after(CliError::from_status(s, &ctx.addr)).await?,
        }
    };
    let duplicate = if r.duplicate { ", \"duplicate\": true" } else { "" };
    println!(
        "{{\"ok\": true, \"published\": {}, \"segment_id\": {}, \"offset\": {}{duplicate}}}",
        r.count + r.stored_before,
        r.segment_id,
        r.first_offset
    );
    Ok(())
}

/// Publishes the lines of stdin, or DATA `--count` times, over one stream; fails
/// unless every message was confirmed. After a failure whose outcome is unknown the
/// requests not answered yet are sent again (same numbers) on a new stream.
async fn publish_stream(
    mut client: MessagingClient<crate::Authed>,
    ctx: &Ctx,
    args: &PublishArgs,
    request: pb::PublishRequest,
    template: pb::Message,
    mut retries: Retries,
) -> Result<(), CliError> {
    // Messages (lines of stdin, or generated) are made on a blocking thread in
    // numbered requests; the server confirms each request in order.
    let (tx, rx) = mpsc::channel::<pb::PublishRequest>(16);
    let batch_max = args.batch_messages_max;
    let generate = args.count.map(|count| (args.data.clone(), count));
    let reader =
        tokio::task::spawn_blocking(move || send_batches(message_data(generate), &request, &template, batch_max, &tx));
    let mut stream = Stream { source: rx, exhausted: false, pending: VecDeque::new(), published: 0 };
    loop {
        match stream.once(&mut client, ctx, &mut retries).await {
            Ok(()) => break,
            Err(e) => {
                if let Err(e) = retries.after(e).await {
                    eprintln!("{{\"ok\": false, \"published\": {}}}", stream.published);
                    return Err(e);
                }
            }
        }
    }
    let published = stream.published;
    let sent = reader
        .await
        .map_err(|e| CliError::Failed(e.to_string()))?
        .map_err(|e| CliError::Failed(format!("{e}; {published} messages were published before")))?;
    if published != sent {
        return Err(CliError::OutcomeUnknown {
            code: "Unknown".into(),
            message: format!("the stream ended after {published} of {sent} messages were confirmed"),
        });
    }
    println!("{{\"ok\": true, \"published\": {published}}}");
    Ok(())
}

/// The requests of a publish stream: made by the reader, sent, answered.
struct Stream {
    source: mpsc::Receiver<pb::PublishRequest>,
    /// The reader made its last request.
    exhausted: bool,
    /// Sent (or about to be) and not answered yet, oldest first.
    pending: VecDeque<pb::PublishRequest>,
    /// Messages confirmed.
    published: u64,
}

impl Stream {
    /// One gRPC stream: the pending requests again, then new ones as answers make room.
    /// `Ok` once every request is answered.
    async fn once(
        &mut self,
        client: &mut MessagingClient<crate::Authed>,
        ctx: &Ctx,
        retries: &mut Retries,
    ) -> Result<(), CliError> {
        // The broker answers the call once it has the first request.
        if self.pending.is_empty() {
            match self.source.recv().await {
                Some(r) => self.pending.push_back(r),
                None => return Ok(()),
            }
        }
        let (tx, rx) = mpsc::channel::<pb::PublishRequest>(STREAM_IN_FLIGHT_MAX);
        for r in &self.pending {
            tx.try_send(r.clone()).map_err(|e| CliError::Failed(format!("queueing a request: {e}")))?;
        }
        let mut tx = Some(tx);
        let failed = |s: tonic::Status, me: &Self| {
            let messages: u64 = me.pending.iter().map(|r| r.messages.len() as u64).sum();
            CliError::from_status(s, &ctx.addr).publish_stream_failed(me.published, me.pending.len() as u64, messages)
        };
        let mut answers = match client.publish_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await {
            Ok(a) => a.into_inner(),
            Err(s) => return Err(failed(s, self)),
        };
        loop {
            let room = tx.is_some() && self.pending.len() < STREAM_IN_FLIGHT_MAX;
            tokio::select! {
                next = self.source.recv(), if room && !self.exhausted => match next {
                    Some(r) => {
                        self.pending.push_back(r.clone());
                        if let Some(t) = &tx {
                            // Never full: it holds at most the pending requests.
                            let _ = t.try_send(r);
                        }
                    }
                    // Nothing more to send: the broker ends the stream after the last answer.
                    None => {
                        self.exhausted = true;
                        tx = None;
                    }
                },
                answer = answers.message() => match answer {
                    Ok(Some(r)) => {
                        self.pending.pop_front();
                        self.published += u64::from(r.count) + u64::from(r.stored_before);
                        retries.progress();
                        if self.exhausted && self.pending.is_empty() {
                            return Ok(());
                        }
                    }
                    Ok(None) if self.exhausted && self.pending.is_empty() => return Ok(()),
                    Ok(None) => {
                        return Err(CliError::OutcomeUnknown {
                            code: "Unknown".into(),
                            message: format!("the stream ended with {} requests unanswered", self.pending.len()),
                        })
                    }
                    Err(s) => return Err(failed(s, self)),
                },
            }
        }
    }
}

/// The data of the messages to publish: DATA `count` times with `{n}` replaced by
/// 1..=count, or else the lines of stdin.
fn message_data(generate: Option<(String, u64)>) -> Box<dyn Iterator<Item = Result<Vec<u8>, String>>> {
    match generate {
        Some((data, count)) => Box::new((1..=count).map(move |n| Ok(data.replace("{n}", &n.to_string()).into_bytes()))),
        None => Box::new(std::io::stdin().lock().split(b'\n').map(|line| {
            let mut line = line.map_err(|e| format!("reading stdin: {e}"))?;
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            Ok(line)
        })),
    }
}

/// Sends messages with `data` in requests of at most `batch_max`, numbered 1, 2, ...
/// (blocking); returns how many were sent before the stream went away. The numbering
/// only depends on the input and `batch_max`, so a run repeated with the same
/// --producer-id numbers its requests the same way.
fn send_batches(
    data: impl Iterator<Item = Result<Vec<u8>, String>>,
    request: &pb::PublishRequest,
    template: &pb::Message,
    batch_max: usize,
    tx: &mpsc::Sender<pb::PublishRequest>,
) -> Result<u64, String> {
    let mut batch = Vec::with_capacity(batch_max);
    let mut sent = 0u64;
    let mut sequence = 0u64;
    for data in data {
        batch.push(pb::Message { data: data?.into(), ..template.clone() });
        if batch.len() >= batch_max {
            sent += batch.len() as u64;
            sequence += 1;
            let messages = std::mem::take(&mut batch);
            if tx.blocking_send(pb::PublishRequest { messages, sequence, ..request.clone() }).is_err() {
                return Ok(sent);
            }
        }
    }
    if !batch.is_empty() {
        sent += batch.len() as u64;
        sequence += 1;
        let _ = tx.blocking_send(pb::PublishRequest { messages: batch, sequence, ..request.clone() });
    }
    Ok(sent)
}

/// The JSON line printed for one received message.
pub fn message_json(r: &pb::SubscribeResponse) -> serde_json::Value {
    let m = r.message.clone().unwrap_or_default();
    let mut properties = serde_json::Map::new();
    if let Some(p) = &m.properties {
        let strings = [
            ("content_type", &p.content_type),
            ("content_encoding", &p.content_encoding),
            ("correlation_id", &p.correlation_id),
            ("reply_to", &p.reply_to),
            ("expiration", &p.expiration),
            ("message_id", &p.message_id),
            ("type", &p.r#type),
            ("user_id", &p.user_id),
            ("app_id", &p.app_id),
        ];
        for (k, v) in strings {
            if !v.is_empty() {
                properties.insert(k.into(), json!(v));
            }
        }
        if p.delivery_mode != 0 {
            properties.insert("delivery_mode".into(), json!(p.delivery_mode));
        }
        if p.priority != 0 {
            properties.insert("priority".into(), json!(p.priority));
        }
        if let Some(t) = &p.timestamp {
            properties.insert("timestamp".into(), json!(eventtermq_broker::api::convert::timestamp_to_ms(t)));
        }
    }
    let headers: serde_json::Map<String, serde_json::Value> =
        m.headers.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
    json!({
        "topic": r.topic,
        "segment_id": r.segment_id,
        "offset": r.offset,
        "delivery_count": r.delivery_count,
        "redelivered": r.redelivered,
        "timestamp_ms": r.timestamp.as_ref().map(eventtermq_broker::api::convert::timestamp_to_ms),
        "message": {
            "routing_key": m.routing_key,
            "headers": headers,
            "properties": properties,
            "data": base64::engine::general_purpose::STANDARD.encode(&m.data),
        }
    })
}

/// How many times `subscribe` re-subscribes after the group moved or its node went
/// away, before it gives up.
const RESUBSCRIBE_MAX: u32 = 50;
/// How long `subscribe --max-messages` waits for the broker to end the stream once
/// everything is acked (the broker waits 5 s at most for the acks to be recorded).
const STREAM_END_WAIT_MAX: Duration = Duration::from_secs(10);

pub async fn subscribe(ctx: &Ctx, args: SubscribeArgs) -> Result<(), CliError> {
    let wait = match &args.wait {
        Some(w) => {
            Some(Duration::from_millis(validate::duration_ms("--wait", w).map_err(|e| CliError::Usage(e.message))?))
        }
        None => None,
    };
    let client = crate::messaging_client_as(&ctx.addr, ctx.tls.as_ref(), &ctx.credentials)?;
    let mut subscriber = Subscriber {
        client,
        ctx,
        args: &args,
        wait,
        received: 0,
        retries: 0,
        last_message: tokio::time::Instant::now(),
    };
    loop {
        let Some(stream) = subscriber.open().await? else { continue };
        if subscriber.receive(stream).await? == Receive::Done {
            return Ok(());
        }
    }
}

/// A subscription that follows its group across nodes: it subscribes again when the
/// stream ends or fails while the group moves.
struct Subscriber<'a> {
    client: MessagingClient<crate::Authed>,
    ctx: &'a Ctx,
    args: &'a SubscribeArgs,
    wait: Option<Duration>,
    received: u64,
    retries: u32,
    last_message: tokio::time::Instant,
}

/// How a subscription's stream ended.
#[derive(PartialEq)]
enum Receive {
    /// `--max-messages` were received, or nothing came for `--wait`.
    Done,
    Resubscribe,
}

impl Subscriber<'_> {
    fn status(&self, s: tonic::Status) -> CliError {
        CliError::from_status(s, &self.ctx.addr)
    }

    fn received_all(&self) -> bool {
        self.args.max_messages.is_some_and(|m| self.received >= m)
    }

    /// Subscribes for the messages still to receive; `None` after a failure worth
    /// retrying (and a pause).
    async fn open(&mut self) -> Result<Option<Streaming<pb::SubscribeResponse>>, CliError> {
        let remaining = self.args.max_messages.map(|m| m - self.received);
        let req = pb::SubscribeRequest {
            namespace: self.ctx.namespace.clone(),
            consumer_group: self.args.group.clone(),
            size: self.args.size,
            auto_ack: false,
            do_not_block: false,
            max_messages: remaining.unwrap_or(0),
            exclusive: false,
        };
        match self.client.subscribe(req).await {
            Ok(s) => Ok(Some(s.into_inner())),
            Err(s) => self.back_off(s).await.map(|()| None),
        }
    }

    /// Prints the stream's messages and acknowledges them, until it ends.
    async fn receive(&mut self, mut stream: Streaming<pb::SubscribeResponse>) -> Result<Receive, CliError> {
        let mut acks: Vec<pb::Delivery> = Vec::new();
        loop {
            if self.received_all() {
                self.flush(&mut acks).await?;
                self.await_end(&mut stream).await;
                return Ok(Receive::Done);
            }
            // Acks go out whenever nothing more is waiting, so they never hold up a
            // quiet stream.
            let next = match futures::FutureExt::now_or_never(stream.message()) {
                Some(r) => r,
                None => {
                    self.flush(&mut acks).await?;
                    match self.wait_for(&mut stream).await {
                        Some(r) => r,
                        None => return Ok(Receive::Done),
                    }
                }
            };
            match next {
                Ok(Some(r)) => {
                    if let Err(e) = writeln!(std::io::stdout(), "{}", message_json(&r)) {
                        // Whoever reads our output is gone (`| head`): what it got is
                        // acknowledged, this one is not (it comes again), and the
                        // command ends quietly as other Unix tools do.
                        self.flush(&mut acks).await?;
                        if e.kind() == std::io::ErrorKind::BrokenPipe {
                            return Ok(Receive::Done);
                        }
                        return Err(CliError::Failed(format!("writing a message to standard output: {e}")));
                    }
                    self.received += 1;
                    self.retries = 0;
                    self.last_message = tokio::time::Instant::now();
                    acks.push(pb::Delivery { segment_id: r.segment_id, offset: r.offset });
                    if acks.len() >= 256 {
                        self.flush(&mut acks).await?;
                    }
                }
                Ok(None) => {
                    self.flush(&mut acks).await?;
                    return Ok(if self.received_all() { Receive::Done } else { Receive::Resubscribe });
                }
                // Unacknowledged messages (`acks`, dropped) come again from the group's
                // new node.
                Err(s) => return self.back_off(s).await.map(|()| Receive::Resubscribe),
            }
        }
    }

    /// Waits (bounded) for the stream to end after the last acks: the broker ends a
    /// complete subscription once its acks are recorded, so a restart right after this
    /// command does not deliver them again. Without acks there is nothing to wait for.
    async fn await_end(&self, stream: &mut Streaming<pb::SubscribeResponse>) {
        if self.args.no_auto_ack {
            return;
        }
        let end = async { while let Ok(Some(_)) = stream.message().await {} };
        let _ = tokio::time::timeout(STREAM_END_WAIT_MAX, end).await;
    }

    /// The next message once one comes; `None` when `--wait` passed since the last.
    async fn wait_for(
        &self,
        stream: &mut Streaming<pb::SubscribeResponse>,
    ) -> Option<Result<Option<pb::SubscribeResponse>, tonic::Status>> {
        match self.wait {
            Some(w) => tokio::time::timeout_at(self.last_message + w, stream.message()).await.ok(),
            None => Some(stream.message().await),
        }
    }

    /// Pauses before subscribing again when `s` is worth retrying and retries are
    /// left; otherwise `s` as the error.
    async fn back_off(&mut self, s: tonic::Status) -> Result<(), CliError> {
        if !(retryable(&s) && self.retries < RESUBSCRIBE_MAX) {
            return Err(self.status(s));
        }
        self.retries += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(())
    }

    async fn flush(&mut self, acks: &mut Vec<pb::Delivery>) -> Result<(), CliError> {
        if acks.is_empty() || self.args.no_auto_ack {
            acks.clear();
            return Ok(());
        }
        let deliveries = std::mem::take(acks);
        let req = pb::AckRequest {
            namespace: self.ctx.namespace.clone(),
            consumer_group: self.args.group.clone(),
            deliveries,
        };
        let r = self.client.ack(req).await;
        r.map(|_| ()).map_err(|s| self.status(s))
    }
}

/// The group may be back in a moment: its node is starting it, moving it, or could not
/// be reached (every 5xxx code, or a connection that failed before an answer).
fn retryable(s: &tonic::Status) -> bool {
    let code = s
        .metadata()
        .get(eventtermq_broker::error::ERROR_CODE_METADATA)
        .and_then(|v| v.to_str().ok()?.parse::<u32>().ok());
    matches!(code, Some(c) if c / 1000 == 5)
        || (s.code() == tonic::Code::Unavailable && code.is_none())
        || s.code() == tonic::Code::Unknown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_printed_message_says_its_attempt_and_when_it_was_stored() {
        let r = pb::SubscribeResponse {
            topic: "t".into(),
            segment_id: 3,
            offset: 7,
            message: Some(pb::Message { data: b"1".to_vec().into(), ..Default::default() }),
            delivery_count: 2,
            redelivered: true,
            timestamp: Some(prost_types::Timestamp { seconds: 1_700_000_000, nanos: 250_000_000 }),
        };
        let j = message_json(&r);
        assert_eq!((j["delivery_count"].as_u64(), j["redelivered"].as_bool()), (Some(2), Some(true)), "{j}");
        assert_eq!(j["timestamp_ms"].as_i64(), Some(1_700_000_000_250), "{j}");
        assert_eq!(
            (j["segment_id"].as_u64(), j["offset"].as_u64(), j["message"]["data"].as_str()),
            (Some(3), Some(7), Some("MQ=="))
        );
    }
}
