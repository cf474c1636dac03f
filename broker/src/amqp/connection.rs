//! One AMQP connection: the handshake (protocol header, SASL, tuning, virtual host),
//! then one loop that owns every channel's state and reads frames, events of its
//! consumers and publishers, and heartbeat ticks. Channel methods are in
//! `channel.rs`; the cluster is reached only through [`Backend`].

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use amq_protocol::frame::AMQPFrame;
use amq_protocol::protocol::{connection, AMQPClass};
use amq_protocol::types::{AMQPValue, FieldTable, LongString};
use eventtermq_proto::v1 as pb;
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use super::backend::{namespace_of_vhost, vhost_missing, Backend};
use super::codec::{self, FrameCodec, PROTOCOL_HEADER};
use super::error::{
    AmqpError, Scope, ACCESS_REFUSED, CHANNEL_ERROR, COMMAND_INVALID, CONNECTION_FORCED, NOT_ALLOWED, UNEXPECTED_FRAME,
};
use super::state::Channel;
use super::AmqpSettings;
use crate::auth::{Caller, Failure, Refused};
use crate::client_cert::{ClientCert, UserFrom};

/// Events queued to a connection by its consumers and publishers; beyond this they
/// wait (a client that does not read slows its own consumers, no one else).
const EVENT_QUEUE_MAX: usize = 1024;
/// The smallest `frame_max` a client may ask for (AMQP's `frame-min-size`).
const FRAME_MIN_BYTES: u32 = 4096;
/// How long a closing side waits for the peer's `close-ok`.
const CLOSE_OK_WAIT: Duration = Duration::from_secs(1);
/// The `connection.blocked` reason, as RabbitMQ words its disk alarm.
const BLOCKED_REASON: &str = "low on disk";

/// What the connection's tasks tell it.
pub(super) enum Event {
    /// Publishes of a channel in confirm mode are stored (`ok`) or failed: `tag`, and
    /// with `multiple` every tag below it not confirmed before.
    Confirmed { channel: u16, tag: u64, multiple: bool, ok: bool },
    /// A message for a consumer.
    Delivery { channel: u16, consumer: String, message: Box<pb::SubscribeResponse> },
    /// A consumer's subscription ended on the broker's side (its queue was deleted).
    ConsumerEnded { channel: u16, consumer: String },
}

pub(super) type Reader<S> = FramedRead<ReadHalf<S>, FrameCodec>;

/// A connection after the handshake.
pub(super) struct Conn<S> {
    pub backend: Backend,
    pub settings: AmqpSettings,
    pub namespace: String,
    pub frame_max_bytes: u32,
    pub channel_max: u16,
    pub channels: HashMap<u16, Channel>,
    pub events: mpsc::Sender<Event>,
    /// Exclusive queues this connection declared: deleted when it ends.
    pub exclusive: BTreeSet<String>,
    /// Auto-delete queues this connection declared: deleted with its last consumer.
    pub auto_delete: BTreeSet<String>,
    /// Frames to write before the next read.
    pub out: Vec<u8>,
    /// The client announced the `connection.blocked` capability: it is told when the
    /// node's disk goes below its watermark and back.
    blocked_capable: bool,
    /// `connection.blocked` was sent last (not `unblocked`).
    blocked: bool,
    writer: WriteHalf<S>,
    /// Cancelled when the connection ends: stops its consumers.
    pub stop: CancellationToken,
    /// The node's: publishers finish what the client sent before it went away (as
    /// RabbitMQ routes every message it received), unless the node stops.
    pub node_stop: CancellationToken,
    /// Who logged in ([`Caller::Open`] while the cluster has no users): every method
    /// is checked against it, and the connection's tasks run as it
    /// (`peers::CALLER`), so what they forward to other nodes is checked there too.
    pub caller: Caller,
    /// The client's address (the login's failure delay and `guest`'s loopback rule).
    from: Option<SocketAddr>,
    /// The client certificate AMQPS verified (SASL EXTERNAL logs in by it).
    cert: Option<std::sync::Arc<ClientCert>>,
}

/// Who connected: the address and the verified client certificate, if any.
pub(super) struct Client {
    pub from: Option<SocketAddr>,
    pub cert: Option<std::sync::Arc<ClientCert>>,
}

/// Serves one client until it closes, breaks the protocol, or the node stops.
pub(super) async fn run<S>(io: S, client: Client, backend: Backend, settings: AmqpSettings, stop: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (read, writer) = tokio::io::split(io);
    let mut reader = FramedRead::new(read, FrameCodec { frame_max_bytes: settings.frame_max_bytes });
    let (events, mut rx) = mpsc::channel(EVENT_QUEUE_MAX);
    let mut conn = Conn {
        backend,
        settings: settings.clone(),
        namespace: String::new(),
        frame_max_bytes: settings.frame_max_bytes,
        channel_max: settings.channel_max,
        channels: HashMap::new(),
        events,
        exclusive: BTreeSet::new(),
        auto_delete: BTreeSet::new(),
        out: Vec::new(),
        blocked_capable: false,
        blocked: false,
        writer,
        stop: stop.child_token(),
        node_stop: stop,
        caller: Caller::Open,
        from: client.from,
        cert: client.cert,
    };
    let handshake = tokio::time::timeout(settings.handshake_timeout, conn.handshake(&mut reader));
    let heartbeat = match handshake.await {
        Ok(Ok(h)) => h,
        Ok(Err(Some(e))) => return conn.close_with(&mut reader, e).await,
        Ok(Err(None)) | Err(_) => return conn.end().await,
    };
    let caller = conn.caller.clone();
    let outcome = crate::peers::CALLER.scope(caller, conn.serve(&mut reader, &mut rx, heartbeat)).await;
    match outcome {
        Err(e) => conn.close_with(&mut reader, e).await,
        Ok(()) => conn.end().await,
    }
}

impl<S: AsyncRead + AsyncWrite + Send + 'static> Conn<S> {
    /// The handshake; the heartbeat interval agreed on. `Err(None)`: the client went
    /// away or spoke another protocol (answered with our header, as the spec says).
    async fn handshake(&mut self, reader: &mut Reader<S>) -> Result<u16, Option<AmqpError>> {
        let mut header = [0u8; 8];
        reader.get_mut().read_exact(&mut header).await.map_err(|_| None)?;
        if header != PROTOCOL_HEADER {
            self.out.extend_from_slice(&PROTOCOL_HEADER);
            let _ = self.flush().await;
            return Err(None);
        }
        // EXTERNAL only where there is a verified certificate to log in by, as RabbitMQ.
        let external = self.cert.is_some() && self.backend.auth.cert_user_from() != UserFrom::Off;
        self.send(0, AMQPClass::Connection(connection::AMQPMethod::Start(start(external))));
        self.flush().await.map_err(|_| None)?;
        match next_method(reader).await? {
            AMQPClass::Connection(connection::AMQPMethod::StartOk(ok)) => {
                self.caller = self.login(&ok).await.map_err(Some)?;
                self.blocked_capable = announces(&ok.client_properties, "connection.blocked");
            }
            other => return Err(Some(unexpected(&other))),
        }
        let tune = connection::Tune {
            channel_max: self.settings.channel_max,
            frame_max: self.settings.frame_max_bytes,
            heartbeat: self.settings.heartbeat_s,
        };
        self.send(0, AMQPClass::Connection(connection::AMQPMethod::Tune(tune)));
        self.flush().await.map_err(|_| None)?;
        let heartbeat = match next_method(reader).await? {
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(ok)) => self.tuned(&ok, reader).map_err(Some)?,
            other => return Err(Some(unexpected(&other))),
        };
        match next_method(reader).await? {
            AMQPClass::Connection(connection::AMQPMethod::Open(open)) => {
                let vhost = open.virtual_host.as_str();
                self.namespace = namespace_of_vhost(vhost);
                if !self.backend.vhost_exists(&self.namespace).await {
                    return Err(Some(vhost_missing(vhost, &self.namespace)));
                }
                let member = crate::auth::Need::Member { namespace: &self.namespace };
                if let Err(e) = self.backend.auth.authorize(&self.caller, &member) {
                    return Err(Some(AmqpError::connection(
                        NOT_ALLOWED,
                        format!("access to vhost '{vhost}' refused: {}", e.message),
                    )));
                }
            }
            other => return Err(Some(unexpected(&other))),
        }
        self.send(0, AMQPClass::Connection(connection::AMQPMethod::OpenOk(connection::OpenOk {})));
        self.flush().await.map_err(|_| None)?;
        Ok(heartbeat)
    }

    /// Takes the client's limits where they are lower than ours (0: none of its own).
    fn tuned(&mut self, ok: &connection::TuneOk, reader: &mut Reader<S>) -> Result<u16, AmqpError> {
        if ok.frame_max != 0 && ok.frame_max < FRAME_MIN_BYTES {
            return Err(AmqpError::connection(
                NOT_ALLOWED,
                format!("frame_max {} is below the minimum of {FRAME_MIN_BYTES} bytes", ok.frame_max),
            ));
        }
        let lower = |ours: u32, theirs: u32| if theirs == 0 { ours } else { ours.min(theirs) };
        self.frame_max_bytes = lower(self.settings.frame_max_bytes, ok.frame_max);
        self.channel_max = lower(u32::from(self.settings.channel_max), u32::from(ok.channel_max)) as u16;
        reader.decoder_mut().frame_max_bytes = self.frame_max_bytes;
        Ok(ok.heartbeat)
    }

    /// The connection's life after the handshake.
    async fn serve(
        &mut self,
        reader: &mut Reader<S>,
        rx: &mut mpsc::Receiver<Event>,
        heartbeat_s: u16,
    ) -> Result<(), AmqpError> {
        let beat = Duration::from_secs(u64::from(heartbeat_s.max(1))) / 2;
        let mut tick = tokio::time::interval(beat);
        // Crossings of the node's disk watermark (an event, not a look on a timer: a
        // thousand idle connections cost nothing); the level now is told at once.
        let mut disk_changes = self.backend.segments.disk().level_changes();
        if self.blocked_capable {
            self.disk_alarm();
        }
        let mut last_read = Instant::now();
        loop {
            // Not `biased`, unlike the broker's other loops: a client publishing
            // without pause would keep its frames always ready and starve its own
            // deliveries and confirms (and the other way round); tokio's random start
            // shares the loop between them. AMQP is not part of the simulation.
            tokio::select! {
                _ = self.stop.cancelled() => {
                    return Err(AmqpError::connection(CONNECTION_FORCED, "the node is shutting down"));
                }
                frame = reader.next() => {
                    last_read = Instant::now();
                    match frame {
                        None => return Ok(()),
                        Some(Err(e)) => return Err(e),
                        Some(Ok(frame)) => if !self.frame(frame).await? { return Ok(()) },
                    }
                }
                Some(event) = rx.recv() => self.event(event),
                _ = tick.tick(), if heartbeat_s > 0 => {
                    if last_read.elapsed() > beat * 4 {
                        tracing::info!(namespace = %self.namespace, "AMQP client missed its heartbeats; closing");
                        return Ok(());
                    }
                    codec::encode(&AMQPFrame::Heartbeat(0), &mut self.out);
                }
                r = disk_changes.changed(), if self.blocked_capable => match r {
                    Ok(()) => self.disk_alarm(),
                    // The node is stopping: `stop` ends the loop.
                    Err(_) => self.blocked_capable = false,
                },
            }
            if self.flush().await.is_err() {
                return Ok(());
            }
        }
    }

    /// One frame from the client; `false` once the connection is closed by it.
    async fn frame(&mut self, frame: AMQPFrame) -> Result<bool, AmqpError> {
        match frame {
            AMQPFrame::Heartbeat(_) => Ok(true),
            AMQPFrame::ProtocolHeader(_) => Err(AmqpError::connection(COMMAND_INVALID, "a second protocol header")),
            AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Close(_))) => {
                self.send(0, AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})));
                Ok(false)
            }
            AMQPFrame::Method(0, other) => Err(unexpected(&other)),
            AMQPFrame::Method(id, method) => {
                self.channel_method(id, method).await?;
                Ok(true)
            }
            AMQPFrame::Header(id, _, header) => self.content_header(id, *header).await.map(|_| true),
            AMQPFrame::Body(id, body) => self.content_body(id, body).await.map(|_| true),
        }
    }

    /// A channel-level exception closes that channel (its further frames are dropped
    /// until the client's `close-ok`); a connection-level one goes up.
    pub(super) fn fail_channel(&mut self, id: u16, e: AmqpError) -> Result<(), AmqpError> {
        if e.scope == Scope::Connection {
            return Err(e);
        }
        let request_id = crate::peers::new_request_id();
        tracing::info!(id = %request_id, channel = id, code = e.code, text = %e.text, "AMQP channel exception");
        if let Some(ch) = self.channels.get_mut(&id) {
            ch.closing = true;
            ch.stop_all();
        }
        let close = amq_protocol::protocol::channel::Close {
            reply_code: e.code,
            reply_text: e.reply_text(&request_id).into(),
            class_id: e.class_id,
            method_id: e.method_id,
        };
        self.send(id, AMQPClass::Channel(amq_protocol::protocol::channel::AMQPMethod::Close(close)));
        Ok(())
    }

    /// The channel a frame names: it must be open.
    pub(super) fn open_channel(&mut self, id: u16) -> Result<&mut Channel, AmqpError> {
        self.channels
            .get_mut(&id)
            .ok_or_else(|| AmqpError::connection(CHANNEL_ERROR, format!("channel {id} is not open")))
    }

    fn event(&mut self, event: Event) {
        match event {
            Event::Confirmed { channel, tag, multiple, ok } => self.confirmed(channel, tag, multiple, ok),
            Event::Delivery { channel, consumer, message } => self.deliver(channel, &consumer, *message),
            Event::ConsumerEnded { channel, consumer } => self.consumer_ended(channel, &consumer),
        }
    }

    /// `connection.blocked` when the node's disk went below its watermark (it refuses
    /// segment data: confirms are nacked), `connection.unblocked` once it is back
    /// above. Publishing is not held back meanwhile: what is published is refused
    /// (or stored on other nodes) as it would be without the notice.
    fn disk_alarm(&mut self) {
        let below = self.backend.segments.disk().status().below;
        if below == self.blocked {
            return;
        }
        self.blocked = below;
        let method = if below {
            connection::AMQPMethod::Blocked(connection::Blocked { reason: BLOCKED_REASON.into() })
        } else {
            connection::AMQPMethod::Unblocked(connection::Unblocked {})
        };
        tracing::info!(namespace = %self.namespace, blocked = below, "AMQP connection told of the disk watermark");
        self.send(0, AMQPClass::Connection(method));
    }

    pub(super) fn send(&mut self, channel: u16, method: AMQPClass) {
        codec::method(channel, method, &mut self.out);
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let r = self.writer.write_all(&self.out).await;
        self.out.clear();
        r?;
        self.writer.flush().await
    }

    /// Sends `connection.close` for `e`, waits briefly for `close-ok`, and ends.
    async fn close_with(mut self, reader: &mut Reader<S>, e: AmqpError) {
        let request_id = crate::peers::new_request_id();
        tracing::info!(id = %request_id, namespace = %self.namespace, code = e.code, text = %e.text,
            "AMQP connection exception");
        let close = connection::Close {
            reply_code: e.code,
            reply_text: e.reply_text(&request_id).into(),
            class_id: e.class_id,
            method_id: e.method_id,
        };
        self.send(0, AMQPClass::Connection(connection::AMQPMethod::Close(close)));
        if self.flush().await.is_ok() {
            let wait_close_ok = async {
                while let Some(Ok(f)) = reader.next().await {
                    if matches!(f, AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::CloseOk(_)))) {
                        return;
                    }
                }
            };
            let _ = tokio::time::timeout(CLOSE_OK_WAIT, wait_close_ok).await;
        }
        self.end().await;
    }

    /// Stops consumers (their unacknowledged messages go back to their queues) and
    /// deletes the exclusive queues.
    async fn end(mut self) {
        let _ = self.flush().await;
        let _ = self.writer.shutdown().await;
        // Acks the client sent before it went are applied before its subscriptions
        // end (bounded by the request timeout), so those messages do not come again.
        let wait = self.backend.cluster.request_timeout();
        for ch in self.channels.values_mut() {
            if let Some(s) = ch.settler.take() {
                drop(s.tx);
                let _ = tokio::time::timeout(wait, s.drained).await;
            }
        }
        self.stop.cancel();
        for ch in self.channels.values_mut() {
            ch.stop_all();
        }
        for queue in std::mem::take(&mut self.exclusive) {
            if let Err(e) = self.backend.delete_queue(&self.namespace, &queue).await {
                tracing::warn!(namespace = %self.namespace, queue, error = %e.text, "cannot delete an exclusive queue");
            }
        }
    }
}

async fn next_method<S: AsyncRead>(reader: &mut Reader<S>) -> Result<AMQPClass, Option<AmqpError>> {
    loop {
        match reader.next().await {
            Some(Ok(AMQPFrame::Method(0, m))) => return Ok(m),
            Some(Ok(AMQPFrame::Heartbeat(_))) => continue,
            Some(Ok(_)) => {
                return Err(Some(AmqpError::connection(
                    UNEXPECTED_FRAME,
                    "only connection methods during the handshake",
                )))
            }
            Some(Err(e)) => return Err(Some(e)),
            None => return Err(None),
        }
    }
}

fn unexpected(method: &AMQPClass) -> AmqpError {
    AmqpError::connection(COMMAND_INVALID, "method not expected here").on(method)
}

/// The server's `connection.start`; `external`: SASL EXTERNAL is offered (AMQPS with a
/// verified client certificate).
fn start(external: bool) -> connection::Start {
    let mut capabilities = FieldTable::default();
    for c in [
        "publisher_confirms",
        "basic.nack",
        "consumer_cancel_notify",
        "per_consumer_qos",
        "authentication_failure_close",
        "connection.blocked",
    ] {
        capabilities.insert(c.into(), AMQPValue::Boolean(true));
    }
    let mut props = FieldTable::default();
    let text = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes()));
    props.insert("product".into(), text("EventterMQ"));
    props.insert("version".into(), text(env!("CARGO_PKG_VERSION")));
    props.insert("platform".into(), text("Rust"));
    props.insert("capabilities".into(), AMQPValue::FieldTable(capabilities));
    connection::Start {
        version_major: 0,
        version_minor: 9,
        server_properties: props,
        mechanisms: if external { "PLAIN AMQPLAIN EXTERNAL" } else { "PLAIN AMQPLAIN" }.into(),
        locales: "en_US".into(),
    }
}

/// Whether the client's properties announce `capability` (`capabilities` table).
fn announces(client_properties: &FieldTable, capability: &str) -> bool {
    match client_properties.inner().get("capabilities") {
        Some(AMQPValue::FieldTable(caps)) => matches!(caps.inner().get(capability), Some(AMQPValue::Boolean(true))),
        _ => false,
    }
}

/// SASL PLAIN (`\0user\0password`) and AMQPLAIN (a table of LOGIN and PASSWORD): the
/// user name and password, or why the response cannot be read. The password is never
/// logged or echoed.
fn credentials(ok: &connection::StartOk) -> Result<(String, String), AmqpError> {
    let response = ok.response.as_bytes();
    let (user, password) = match ok.mechanism.as_str() {
        "PLAIN" => {
            let mut parts = response.split(|b| *b == 0).skip(1);
            (parts.next().unwrap_or_default().to_vec(), parts.next().unwrap_or_default().to_vec())
        }
        "AMQPLAIN" => amqplain(response),
        other => {
            return Err(AmqpError::connection(
                ACCESS_REFUSED,
                format!(
                    "authentication mechanism '{other}' is not supported (PLAIN, AMQPLAIN; EXTERNAL over AMQPS \
                     with a client certificate)"
                ),
            ))
        }
    };
    Ok((String::from_utf8_lossy(&user).into_owned(), String::from_utf8_lossy(&password).into_owned()))
}

/// The refusal of a login, as RabbitMQ words it (never saying which part was wrong).
fn refused(mechanism: &str, user: &str) -> AmqpError {
    AmqpError::connection(
        ACCESS_REFUSED,
        format!("Login was refused using authentication mechanism {mechanism} (user '{user}')"),
    )
}

/// A refusal of a login by certificate, naming the mechanism and the reason (the
/// certificate's user where it names one; no secret is involved).
fn refused_because(mechanism: &str, r: Refused) -> AmqpError {
    AmqpError::connection(
        ACCESS_REFUSED,
        format!("Login was refused using authentication mechanism {mechanism}: {}", r.message),
    )
}

/// SASL EXTERNAL where no verified client certificate is, or certificates name no users.
fn external_not_offered(with_cert: bool) -> AmqpError {
    let why = if with_cert {
        "this node takes no certificate as a user (--tls-client-cert-user-from none)"
    } else {
        "it needs a client certificate the node verified: connect with AMQPS to a node started with \
         --tls-client-ca-file, presenting a certificate that CA signed"
    };
    AmqpError::connection(ACCESS_REFUSED, format!("authentication mechanism 'EXTERNAL' is not offered: {why}"))
}

impl<S: AsyncRead + AsyncWrite + Send + 'static> Conn<S> {
    /// Who the client is: while the cluster has no users, `guest`/`guest` (as before
    /// users existed), or EXTERNAL with a client certificate; then the users of the
    /// cluster state (`guest` among them only from a loopback address), by password
    /// (PLAIN, AMQPLAIN) or by certificate (EXTERNAL). A password login on a
    /// connection whose certificate is another user's is refused, naming both. A
    /// refusal of a password comes after the source's failure delay.
    async fn login(&self, ok: &connection::StartOk) -> Result<Caller, AmqpError> {
        let auth = &self.backend.auth;
        let mechanism = ok.mechanism.as_str();
        // An expired certificate is refused whatever the mechanism.
        let cert = auth
            .certificate(self.cert.as_deref(), self.from, "amqp")
            .await
            .map_err(|r| refused_because(mechanism, r))?;
        if mechanism == "EXTERNAL" {
            if self.cert.is_none() || auth.cert_user_from() == UserFrom::Off {
                auth.refuse(Failure::Malformed, None, self.from, "amqp").await;
                return Err(external_not_offered(self.cert.is_some()));
            }
            let open = auth.open_access().map_err(|e| AmqpError::connection(CONNECTION_FORCED, e.message))?;
            if open {
                return Ok(Caller::Open);
            }
            return auth.certificate_login(cert, self.from, "amqp").await.map_err(|r| refused_because(mechanism, r));
        }
        let (user, password) = match credentials(ok) {
            Ok(c) => c,
            Err(e) => {
                auth.refuse(Failure::Malformed, None, self.from, "amqp").await;
                return Err(e);
            }
        };
        let open = auth.open_access().map_err(|e| AmqpError::connection(CONNECTION_FORCED, e.message))?;
        if open {
            if user == crate::auth::GUEST && password == crate::auth::GUEST {
                return Ok(Caller::Open);
            }
            let failure = if user == crate::auth::GUEST { Failure::WrongPassword } else { Failure::UnknownUser };
            auth.refuse(failure, Some(&user), self.from, "amqp").await;
            return Err(refused(mechanism, &user));
        }
        match auth.password_login(&cert, &user, &password, self.from, "amqp").await {
            Ok(c) => Ok(c),
            Err(r) if r.failure == Failure::CertificateUserMismatch => Err(refused_because(mechanism, r)),
            Err(_) => Err(refused(mechanism, &user)),
        }
    }
}

/// AMQPLAIN's response is a field table without its length.
fn amqplain(response: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut framed = (response.len() as u32).to_be_bytes().to_vec();
    framed.extend_from_slice(response);
    let Ok((_, table)) = amq_protocol::types::parsing::parse_field_table(&framed[..]) else {
        return (Vec::new(), Vec::new());
    };
    let get = |k: &str| match table.inner().get(k) {
        Some(AMQPValue::LongString(s)) => s.as_bytes().to_vec(),
        Some(AMQPValue::ShortString(s)) => s.as_str().as_bytes().to_vec(),
        _ => Vec::new(),
    };
    (get("LOGIN"), get("PASSWORD"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start_ok(mechanism: &str, response: &[u8]) -> connection::StartOk {
        connection::StartOk {
            client_properties: FieldTable::default(),
            mechanism: mechanism.into(),
            response: LongString::from(response),
            locale: "en_US".into(),
        }
    }

    #[test]
    fn external_is_offered_only_with_a_client_certificate() {
        assert_eq!(start(false).mechanisms.to_string(), "PLAIN AMQPLAIN");
        assert_eq!(start(true).mechanisms.to_string(), "PLAIN AMQPLAIN EXTERNAL");
    }

    #[test]
    fn only_a_client_that_announces_connection_blocked_is_told() {
        let mut caps = FieldTable::default();
        caps.insert("connection.blocked".into(), AMQPValue::Boolean(true));
        caps.insert("basic.nack".into(), AMQPValue::Boolean(true));
        let mut props = FieldTable::default();
        props.insert("capabilities".into(), AMQPValue::FieldTable(caps.clone()));
        assert!(announces(&props, "connection.blocked"));
        caps.insert("connection.blocked".into(), AMQPValue::Boolean(false));
        props.insert("capabilities".into(), AMQPValue::FieldTable(caps));
        assert!(!announces(&props, "connection.blocked"));
        assert!(!announces(&FieldTable::default(), "connection.blocked"));
    }

    #[test]
    fn credentials_come_from_plain_and_amqplain_and_nothing_else() {
        let guest = ("guest".to_string(), "guest".to_string());
        assert_eq!(credentials(&start_ok("PLAIN", b"\0guest\0guest")).unwrap(), guest);
        let amqplain =
            amq_protocol::auth::Credentials::default().sasl_auth_string(amq_protocol::auth::SASLMechanism::AMQPlain);
        assert_eq!(credentials(&start_ok("AMQPLAIN", amqplain.as_bytes())).unwrap(), guest);
        let e = credentials(&start_ok("CRAM-MD5", b"")).unwrap_err();
        assert_eq!((e.scope, e.code), (Scope::Connection, ACCESS_REFUSED));
        assert!(e.text.contains("'CRAM-MD5' is not supported"), "{}", e.text);
        let e = external_not_offered(false);
        assert!(e.text.contains("'EXTERNAL' is not offered") && e.text.contains("--tls-client-ca-file"), "{}", e.text);
        let e = refused("PLAIN", "bob");
        assert_eq!(e.text, "Login was refused using authentication mechanism PLAIN (user 'bob')");
    }
}
