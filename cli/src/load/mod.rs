//! `eventtermq load`: steady traffic for disruption tests. [`publish`] sends one
//! message per request at a fixed rate, retrying each the way README tells clients to
//! (same producer id and request number while its outcome is unknown, the node could
//! not be reached, or a retryable 5xxx code came back), and logs every confirmation and
//! every error it sees; [`consume`] logs every delivery; [`check`] compares the two
//! logs. Every loop ends at its `--duration-s` (and the publisher after `--rate-per-s`
//! x `--duration-s` messages), or at SIGTERM/Ctrl-C.

pub mod check;
mod report;

use std::time::Duration;

use eventtermq_proto::v1 as pb;
use eventtermq_proto::v1::messaging_client::MessagingClient;
use tokio_util::sync::CancellationToken;

use super::args::{LoadCheckArgs, LoadCommand, LoadConsumeArgs, LoadPublishArgs, Output};
use super::{CliError, Ctx};
use report::Report;

/// The first words of every message the publisher sends: `eventtermq-load RUN ID`.
const DATA_TAG: &str = "eventtermq-load";
/// Pauses between retries (publish) and between subscriptions (consume), doubling.
const PAUSE_MIN: Duration = Duration::from_millis(100);
const PAUSE_MAX: Duration = Duration::from_millis(1_000);
/// Acknowledgements sent together at most.
const ACK_BATCH_MAX: usize = 256;

pub async fn run(ctx: &Ctx, cmd: LoadCommand) -> Result<(), CliError> {
    match cmd {
        LoadCommand::Publish(args) => publish(ctx, args).await,
        LoadCommand::Consume(args) => consume(ctx, args).await,
        LoadCommand::Check(args) => run_check(ctx, args),
    }
}

/// Cancelled at SIGTERM (a pod being deleted) or Ctrl-C.
fn stop_on_signal() -> Result<CancellationToken, CliError> {
    let token = CancellationToken::new();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| CliError::Failed(format!("listening for SIGTERM: {e}")))?;
    let t = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        t.cancel();
    });
    Ok(token)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// The message with id `id` of run `run`: the tag, run and id, padded to `bytes`.
fn message_data(run: &str, id: u64, bytes: usize) -> Vec<u8> {
    let mut data = format!("{DATA_TAG} {run} {id} ").into_bytes();
    if data.len() < bytes {
        data.resize(bytes, b'.');
    }
    data
}

/// The run and id of a message [`message_data`] made; `None` for any other message.
fn parse_message(data: &[u8]) -> Option<(String, u64)> {
    let text = std::str::from_utf8(data).ok()?;
    let mut words = text.split(' ');
    if words.next()? != DATA_TAG {
        return None;
    }
    let run = words.next()?.to_string();
    let id = words.next()?.parse().ok()?;
    Some((run, id))
}

/// The broker's numeric error code of a failed call, if it sent one.
fn broker_code(s: &tonic::Status) -> Option<u32> {
    s.metadata().get(eventtermq_broker::error::ERROR_CODE_METADATA).and_then(|v| v.to_str().ok()?.parse::<u32>().ok())
}

/// Whether README's client rules say to send a failed publish again with the same ids:
/// its outcome is unknown, it never reached a node, or the broker refused it with a
/// 5xxx code ("retry": refused before anything was done).
fn worth_retrying(e: &CliError, code: Option<u32>) -> bool {
    match e {
        CliError::OutcomeUnknown { .. } | CliError::Connect { .. } => true,
        CliError::Rejected { .. } => code.is_some_and(|c| c / 1000 == 5),
        CliError::Usage(_) | CliError::Failed(_) | CliError::NotPlaintext { .. } => false,
    }
}

fn client(ctx: &Ctx) -> Result<MessagingClient<crate::Authed>, CliError> {
    crate::messaging_client_as(&ctx.addr, ctx.tls.as_ref(), &ctx.credentials)
}

/// Requests never sent (see [`crate::never_sent`]) sent again in a row before the next
/// failure counts as an error.
const RESENDS_MAX: u32 = 3;

/// Bounds of `--rate-per-s` (one request at a time: far above what one connection
/// confirms) and `--duration-s` (a week).
const RATE_PER_S_MAX: u64 = 10_000;
const DURATION_S_MAX: u64 = 7 * 24 * 3600;
/// Bound of `--message-bytes` (the memory of one message made per request).
const MESSAGE_BYTES_MAX: usize = 64 << 20;

fn validate_range(field: &str, value: u64, max: u64) -> Result<(), CliError> {
    if !(1..=max).contains(&value) {
        return Err(CliError::Usage(format!("{field}: {value} is out of range (must be 1-{max})")));
    }
    Ok(())
}

async fn publish(ctx: &Ctx, args: LoadPublishArgs) -> Result<(), CliError> {
    validate_range("--rate-per-s", u64::from(args.rate_per_s), RATE_PER_S_MAX)?;
    validate_range("--duration-s", args.duration_s, DURATION_S_MAX)?;
    validate_range("--request-timeout-ms", args.request_timeout_ms, DURATION_S_MAX * 1000)?;
    validate_range("--retry-for-ms", args.retry_for_ms.max(1), DURATION_S_MAX * 1000)?;
    if args.message_bytes > MESSAGE_BYTES_MAX {
        return Err(CliError::Usage(format!(
            "--message-bytes: {} is out of range (must be at most {MESSAGE_BYTES_MAX})",
            args.message_bytes
        )));
    }
    eventtermq_broker::cluster_state::validate::name("--topic", &args.topic).map_err(|e| CliError::Usage(e.message))?;
    let mut report = Report::open(&args.report)?;
    let stop = stop_on_signal()?;
    let producer_id = rand::random::<u64>().max(1);
    let run = format!("{producer_id:016x}");
    let count_max = u64::from(args.rate_per_s).saturating_mul(args.duration_s);
    let request_timeout = Duration::from_millis(args.request_timeout_ms);
    let retry_for = Duration::from_millis(args.retry_for_ms);
    let end = tokio::time::Instant::now() + Duration::from_secs(args.duration_s);
    let mut client = client(ctx)?;
    report.line(serde_json::json!({
        "ev": "start", "t_ms": now_ms(), "run": run, "topic": args.topic, "rate_per_s": args.rate_per_s,
        "addr": ctx.addr,
    }))?;
    let mut ticks = tokio::time::interval(Duration::from_secs(1) / args.rate_per_s);
    // After a stall (a message retried for seconds) the rate resumes; no burst.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let (mut sent, mut confirmed, mut errors, mut gave_up) = (0u64, 0u64, 0u64, 0u64);
    for id in 1..=count_max {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.cancelled() => break,
        }
        if tokio::time::Instant::now() >= end || stop.is_cancelled() {
            break;
        }
        sent += 1;
        let request = pb::PublishRequest {
            namespace: ctx.namespace.clone(),
            topic: args.topic.clone(),
            messages: vec![pb::Message {
                data: message_data(&run, id, args.message_bytes).into(),
                ..Default::default()
            }],
            persistence: pb::Persistence::Default as i32,
            producer_id,
            sequence: id,
        };
        let first = tokio::time::Instant::now();
        let mut pause = PAUSE_MIN;
        let mut attempts = 0u32;
        let mut resent = 0u32;
        loop {
            attempts += 1;
            let outcome = tokio::time::timeout(request_timeout, client.publish(request.clone())).await;
            // Never sent (its connection closed first, e.g. on a broker's GOAWAY): sent
            // again at once on a new connection, as gRPC's own clients do ("transparent
            // retry"); not an error the client sees, a few times in a row at most.
            if let Ok(Err(s)) = &outcome {
                if crate::never_sent(s) && resent < RESENDS_MAX && first.elapsed() < retry_for {
                    resent += 1;
                    report.line(serde_json::json!({
                        "ev": "resent", "t_ms": now_ms(), "run": run, "id": id, "attempt": attempts,
                        "why": crate::CliError::from_status(s.clone(), &ctx.addr).to_string(),
                    }))?;
                    client = self::client(ctx)?;
                    continue;
                }
            }
            let (e, code) = match outcome {
                Ok(Ok(r)) => {
                    let r = r.into_inner();
                    confirmed += 1;
                    report.line(serde_json::json!({
                        "ev": "confirmed", "t_ms": now_ms(), "run": run, "id": id, "attempts": attempts,
                        "latency_ms": first.elapsed().as_millis() as u64, "segment_id": r.segment_id,
                        "offset": r.first_offset, "duplicate": r.duplicate,
                    }))?;
                    break;
                }
                Ok(Err(s)) => {
                    let code = broker_code(&s);
                    (CliError::from_status(s, &ctx.addr), code)
                }
                Err(_) => (
                    CliError::OutcomeUnknown {
                        code: "DeadlineExceeded".into(),
                        message: format!("no answer within --request-timeout-ms {}", args.request_timeout_ms),
                    },
                    None,
                ),
            };
            errors += 1;
            let retry = worth_retrying(&e, code) && first.elapsed() + pause < retry_for && !stop.is_cancelled();
            report.line(serde_json::json!({
                "ev": "error", "t_ms": now_ms(), "run": run, "id": id, "attempt": attempts, "retry": retry,
                "error": e.to_string(),
            }))?;
            if !retry {
                gave_up += 1;
                report.line(serde_json::json!({"ev": "gave_up", "t_ms": now_ms(), "run": run, "id": id}))?;
                break;
            }
            // A new connection: the old one may lead to a pod that is gone (no answer
            // until a keep-alive fails); through a Service the next goes to a live one.
            if matches!(e, CliError::OutcomeUnknown { .. } | CliError::Connect { .. }) {
                client = self::client(ctx)?;
            }
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.cancelled() => {}
            }
            pause = (pause * 2).min(PAUSE_MAX);
        }
    }
    report.line(serde_json::json!({
        "ev": "end", "t_ms": now_ms(), "run": run, "sent": sent, "confirmed": confirmed, "errors": errors,
        "gave_up": gave_up,
    }))?;
    Ok(())
}

async fn consume(ctx: &Ctx, args: LoadConsumeArgs) -> Result<(), CliError> {
    validate_range("--duration-s", args.duration_s, DURATION_S_MAX)?;
    validate_range("--idle-resubscribe-ms", args.idle_resubscribe_ms.max(1), DURATION_S_MAX * 1000)?;
    eventtermq_broker::cluster_state::validate::name("--group", &args.group).map_err(|e| CliError::Usage(e.message))?;
    let mut report = Report::open(&args.report)?;
    let stop = stop_on_signal()?;
    let end = tokio::time::Instant::now() + Duration::from_secs(args.duration_s);
    let idle = (args.idle_resubscribe_ms > 0).then(|| Duration::from_millis(args.idle_resubscribe_ms));
    report.line(serde_json::json!({"ev": "start", "t_ms": now_ms(), "group": args.group, "addr": ctx.addr}))?;
    let mut consumer = Consumer { ctx, group: &args.group, report, delivered: 0, foreign: 0, errors: 0 };
    let mut pause = PAUSE_MIN;
    // Bounded by --duration-s: every pass waits at least PAUSE_MIN or until a message.
    while tokio::time::Instant::now() < end && !stop.is_cancelled() {
        let client = client(ctx)?;
        let got = consumer.subscription(client, args.size, end, idle, &stop).await?;
        if got {
            pause = PAUSE_MIN;
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.cancelled() => {}
        }
        pause = (pause * 2).min(PAUSE_MAX);
    }
    let Consumer { mut report, delivered, foreign, errors, .. } = consumer;
    report.line(serde_json::json!({
        "ev": "end", "t_ms": now_ms(), "delivered": delivered, "foreign": foreign, "errors": errors,
    }))?;
    Ok(())
}

struct Consumer<'a> {
    ctx: &'a Ctx,
    group: &'a str,
    report: Report,
    delivered: u64,
    foreign: u64,
    errors: u64,
}

impl Consumer<'_> {
    fn error(&mut self, what: &str, e: CliError) -> Result<(), CliError> {
        self.errors += 1;
        self.report.line(serde_json::json!({"ev": "error", "t_ms": now_ms(), "error": format!("{what}: {e}")}))
    }

    /// One subscription, until it fails, goes quiet for `idle`, `end` or `stop`; logs
    /// and acknowledges what it delivers. `Ok(true)` when anything came.
    async fn subscription(
        &mut self,
        mut client: MessagingClient<crate::Authed>,
        size: u32,
        end: tokio::time::Instant,
        idle: Option<Duration>,
        stop: &CancellationToken,
    ) -> Result<bool, CliError> {
        let req = pb::SubscribeRequest {
            namespace: self.ctx.namespace.clone(),
            consumer_group: self.group.to_string(),
            size,
            auto_ack: false,
            do_not_block: false,
            max_messages: 0,
            exclusive: false,
        };
        let opened = tokio::select! {
            r = client.subscribe(req) => r,
            _ = tokio::time::sleep_until(end) => return Ok(false),
            _ = stop.cancelled() => return Ok(false),
        };
        let mut stream = match opened {
            Ok(s) => s.into_inner(),
            Err(s) => {
                let e = CliError::from_status(s, &self.ctx.addr);
                self.error("subscribe", e)?;
                return Ok(false);
            }
        };
        let mut acks: Vec<pb::Delivery> = Vec::new();
        let mut got = false;
        loop {
            // Acks go out whenever nothing more is waiting.
            let next = match futures::FutureExt::now_or_never(stream.message()) {
                Some(r) => Some(r),
                None => {
                    self.flush(&mut client, &mut acks).await?;
                    let quiet = idle.map_or(end, |i| (tokio::time::Instant::now() + i).min(end));
                    tokio::select! {
                        r = stream.message() => Some(r),
                        _ = tokio::time::sleep_until(quiet) => None,
                        _ = stop.cancelled() => None,
                    }
                }
            };
            match next {
                None => {
                    self.flush(&mut client, &mut acks).await?;
                    return Ok(got);
                }
                Some(Ok(Some(r))) => {
                    got = true;
                    let data = r.message.as_ref().map(|m| &m.data[..]).unwrap_or_default();
                    match parse_message(data) {
                        Some((run, id)) => {
                            self.delivered += 1;
                            self.report.line(serde_json::json!({
                                "ev": "delivered", "t_ms": now_ms(), "run": run, "id": id,
                                "segment_id": r.segment_id, "offset": r.offset, "redelivered": r.redelivered,
                            }))?;
                        }
                        None => {
                            self.foreign += 1;
                            self.report.line(serde_json::json!({
                                "ev": "foreign", "t_ms": now_ms(), "segment_id": r.segment_id, "offset": r.offset,
                            }))?;
                        }
                    }
                    acks.push(pb::Delivery { segment_id: r.segment_id, offset: r.offset });
                    if acks.len() >= ACK_BATCH_MAX {
                        self.flush(&mut client, &mut acks).await?;
                    }
                }
                Some(Ok(None)) => {
                    self.flush(&mut client, &mut acks).await?;
                    self.error("subscribe", CliError::Failed("the stream ended".into()))?;
                    return Ok(got);
                }
                // Unacknowledged messages come again from the group's (new) node.
                Some(Err(s)) => {
                    let e = CliError::from_status(s, &self.ctx.addr);
                    self.error("subscribe", e)?;
                    return Ok(got);
                }
            }
        }
    }

    /// Acknowledges `acks`; a failure is logged (those messages come again).
    async fn flush(
        &mut self,
        client: &mut MessagingClient<crate::Authed>,
        acks: &mut Vec<pb::Delivery>,
    ) -> Result<(), CliError> {
        if acks.is_empty() {
            return Ok(());
        }
        let req = pb::AckRequest {
            namespace: self.ctx.namespace.clone(),
            consumer_group: self.group.to_string(),
            deliveries: std::mem::take(acks),
        };
        match tokio::time::timeout(Duration::from_secs(5), client.ack(req)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(s)) => {
                let e = CliError::from_status(s, &self.ctx.addr);
                self.error("ack", e)
            }
            Err(_) => self.error("ack", CliError::Failed("no answer within 5 s".into())),
        }
    }
}

fn run_check(ctx: &Ctx, args: LoadCheckArgs) -> Result<(), CliError> {
    let open = |field: &str, p: &std::path::Path| {
        std::fs::File::open(p)
            .map(std::io::BufReader::new)
            .map_err(|e| CliError::Usage(format!("{field}: cannot read {}: {e}", p.display())))
    };
    let window = check::Window { from_ms: args.from_ms, to_ms: args.to_ms };
    let summary = check::check(open("--published", &args.published)?, open("--delivered", &args.delivered)?, window)
        .map_err(CliError::Failed)?;
    match ctx.output {
        Output::Json => println!("{}", summary.json()),
        Output::Text => println!("{}", summary.line()),
    }
    if summary.lost > 0 {
        return Err(CliError::Failed(format!("{} confirmed messages were never delivered", summary.lost)));
    }
    if summary.confirmed < args.confirmed_min {
        return Err(CliError::Failed(format!(
            "{} messages confirmed in the window, fewer than --confirmed-min {}",
            summary.confirmed, args.confirmed_min
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_carries_its_run_and_id_at_any_size() {
        for bytes in [0, 10, 64, 1000] {
            let d = message_data("00ab", 42, bytes);
            assert!(d.len() >= bytes.min(d.len()) && (bytes < 20 || d.len() == bytes), "{bytes}: {}", d.len());
            assert_eq!(parse_message(&d), Some(("00ab".to_string(), 42)));
        }
        assert_eq!(parse_message(b"hello 1 2"), None);
        assert_eq!(parse_message(b"eventtermq-load run x"), None);
    }

    #[test]
    fn out_of_range_flags_name_the_field_and_the_range() {
        let e = validate_range("--rate-per-s", 0, RATE_PER_S_MAX).unwrap_err();
        assert_eq!(e.to_string(), "--rate-per-s: 0 is out of range (must be 1-10000)");
        assert_eq!(e.exit_status(), crate::exit_status::USAGE);
        assert!(validate_range("--duration-s", DURATION_S_MAX + 1, DURATION_S_MAX).is_err());
        assert!(validate_range("--duration-s", DURATION_S_MAX, DURATION_S_MAX).is_ok());
    }

    #[test]
    fn retries_follow_the_readme() {
        let unknown = CliError::OutcomeUnknown { code: "Unknown".into(), message: "reset".into() };
        assert!(worth_retrying(&unknown, None));
        let connect = CliError::Connect { addr: "a:1".into(), message: "refused".into() };
        assert!(worth_retrying(&connect, None));
        let unavailable = CliError::Rejected { code: "Unavailable (5004)".into(), message: "too few".into() };
        assert!(worth_retrying(&unavailable, Some(5004)));
        let denied = CliError::Rejected { code: "PermissionDenied (7002)".into(), message: "no".into() };
        assert!(!worth_retrying(&denied, Some(7002)));
        let no_code = CliError::Rejected { code: "Unimplemented".into(), message: "old".into() };
        assert!(!worth_retrying(&no_code, None));
    }
}
