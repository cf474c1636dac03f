//! The `eventtermq` binary's library: flag definitions ([`args`]), running the broker
//! over real sockets ([`run`]), the admin commands ([`commands`]), publishing and
//! subscribing ([`messages`]), the text/JSON rendering of the cluster state
//! ([`render`]), the benchmarks ([`bench`]) and the load generator and checker of the
//! disruption tests ([`load`]). It talks to nodes as any client does,
//! through the gRPC API; only `run` and the benchmarks' floors use the broker and
//! storage libraries directly.

pub mod args;
pub mod bench;
pub mod commands;
pub mod load;
pub mod messages;
pub mod otlp;
pub mod render;
pub mod run;

use std::time::Duration;

use eventtermq_api::error::ErrorCode;
use eventtermq_proto::v1::admin_client::AdminClient;

/// What the CLI knows about where and how to talk.
pub struct Ctx {
    pub addr: String,
    pub namespace: String,
    pub output: args::Output,
    /// TLS to the node (`--tls-ca-file`), with a client certificate when given.
    pub tls: Option<eventtermq_broker::transport::tls::ClientTls>,
    /// `--user` and `--password-file`, sent with every request.
    pub credentials: Credentials,
}

/// The user name and password a request carries (`authorization: Basic ...`), from
/// `--user` and `--password-file`; none: the cluster must have no users yet.
#[derive(Clone, Default)]
pub struct Credentials(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Credentials {
    pub fn load(user: Option<&str>, password_file: Option<&std::path::Path>) -> Result<Self, CliError> {
        use base64::Engine;
        let (user, file) = match (user, password_file) {
            (None, None) => return Ok(Credentials(None)),
            (Some(u), Some(f)) => (u, f),
            (Some(_), None) => return Err(CliError::Usage("--user: needs --password-file (its password)".into())),
            (None, Some(_)) => {
                return Err(CliError::Usage("--password-file: needs --user (the user it is for)".into()))
            }
        };
        eventtermq_broker::cluster_state::validate::user_name("--user", user)
            .map_err(|e| CliError::Usage(e.message))?;
        let password = eventtermq_broker::auth::read_password_file("--password-file", file).map_err(CliError::Usage)?;
        let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        let mut value: tonic::metadata::MetadataValue<tonic::metadata::Ascii> = format!("Basic {encoded}")
            .parse()
            .map_err(|_| CliError::Usage("--user: cannot be sent as a header".into()))?;
        value.set_sensitive(true);
        Ok(Credentials(Some(value)))
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Credentials(..)" } else { "Credentials(none)" })
    }
}

impl tonic::service::Interceptor for Credentials {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A channel that sends [`Credentials`] with every request.
pub type Authed = tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Credentials>;

/// The CLI's TLS from its flags (`None`: plaintext). Call within the runtime.
pub fn client_tls(files: &run::TlsFiles) -> Result<Option<eventtermq_broker::transport::tls::ClientTls>, CliError> {
    use eventtermq_broker::transport::tls::{ClientTls, ReloadingKey};
    let identity = match (&files.cert, &files.key) {
        (Some(c), Some(k)) => Some(ReloadingKey::load(c, k, Duration::from_secs(3600)).map_err(CliError::Usage)?),
        (None, None) => None,
        (Some(_), None) => {
            return Err(CliError::Usage("--tls-cert-file: needs --tls-key-file (its private key)".into()))
        }
        (None, Some(_)) => {
            return Err(CliError::Usage("--tls-key-file: needs --tls-cert-file (the certificate it goes with)".into()))
        }
    };
    match &files.ca {
        Some(ca) => Ok(Some(ClientTls::new(ca, identity).map_err(CliError::Usage)?)),
        None if identity.is_some() => Err(CliError::Usage(
            "--tls-cert-file: a client certificate is sent over TLS only: give --tls-ca-file (the CA of the \
             node's certificate) too"
                .into(),
        )),
        None => Ok(None),
    }
}

/// How long the CLI waits to connect to a node.
pub const CONNECT_TIMEOUT_MS: u64 = 3_000;

/// The CLI's exit statuses (README, `--help`): what a script may conclude about its
/// request without reading the message.
pub mod exit_status {
    /// Done: the broker confirmed the request.
    pub const DONE: u8 = 0;
    /// Rejected, nothing changed: the broker refused the request, or it was never sent
    /// (the node could not be reached).
    pub const REJECTED: u8 = 1;
    /// Usage error: bad flags or values, found before anything was sent.
    pub const USAGE: u8 = 2;
    /// Outcome unknown: the request was sent, but no answer says what happened (no
    /// answer in time, the connection was lost, or the broker itself does not know):
    /// it may still take effect. Check before retrying what is not idempotent.
    pub const OUTCOME_UNKNOWN: u8 = 3;
    /// The broker (no subcommand) refused to start because its data directory has a
    /// format this release does not read: written by a newer release (a downgrade) or
    /// by one too old. Nothing in the directory was changed.
    pub const DATA_FORMAT_REFUSED: u8 = eventtermq_broker::node::format::REFUSED_EXIT_STATUS;
}

/// A CLI error: printed on stderr; its exit status says whether anything may have
/// changed ([`exit_status`]).
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad flags or values, before anything was sent.
    #[error("{0}")]
    Usage(String),
    /// Nothing was sent: the node could not be reached, or the connection closed before
    /// the request was written to it ([`never_sent`]).
    #[error("cannot reach node at {addr}: {message} (nothing was sent)")]
    Connect { addr: String, message: String },
    /// The port does not speak plaintext gRPC (a TLS port, most likely): nothing was
    /// done, and trying again without TLS will not help.
    #[error(
        "cannot reach node at {addr}: the port does not speak plaintext gRPC: if it is a TLS port, pass \
         --tls-ca-file (nothing was sent)"
    )]
    NotPlaintext { addr: String },
    /// The broker refused the request; nothing was changed.
    #[error("rejected: {code}: {message}")]
    Rejected { code: String, message: String },
    /// Sent, but nobody knows whether it took effect.
    #[error("outcome unknown: {code}: {message}; the request may still take effect")]
    OutcomeUnknown { code: String, message: String },
    /// The command could not do its own part (a benchmark, reading stdin); what it
    /// sent before is reported with the error.
    #[error("{0}")]
    Failed(String),
}

impl CliError {
    /// How the process exits with this error.
    pub fn exit_status(&self) -> u8 {
        match self {
            CliError::Usage(_) => exit_status::USAGE,
            CliError::Connect { .. }
            | CliError::NotPlaintext { .. }
            | CliError::Rejected { .. }
            | CliError::Failed(_) => exit_status::REJECTED,
            CliError::OutcomeUnknown { .. } => exit_status::OUTCOME_UNKNOWN,
        }
    }

    /// Classifies a failed call. A broker's own error carries a numeric code, which
    /// says whether the request may still take effect. Without one the error is the
    /// client's transport's: a connection that could not be made sent nothing; a
    /// deadline, a cancelled call or a connection lost after sending leaves the outcome
    /// unknown; the rest (e.g. a method an older broker lacks) is a refusal.
    pub fn from_status(s: tonic::Status, addr: &str) -> Self {
        let number = s
            .metadata()
            .get(eventtermq_broker::error::ERROR_CODE_METADATA)
            .and_then(|v| v.to_str().ok()?.parse::<u32>().ok());
        let message = match number {
            Some(_) => s.message().to_string(),
            // The transport's own message is terse ("http2 error"); its causes say what
            // happened ("keep-alive timed out", "connection refused").
            None => with_causes(&s),
        };
        let unknown = match number {
            Some(n) => ErrorCode::number_outcome_unknown(n),
            None if connect_failed(&s) || never_sent(&s) => {
                return CliError::Connect { addr: addr.to_string(), message }
            }
            None => matches!(
                s.code(),
                tonic::Code::DeadlineExceeded
                    | tonic::Code::Cancelled
                    | tonic::Code::Unknown
                    | tonic::Code::Unavailable
                    | tonic::Code::Internal
                    | tonic::Code::DataLoss
            ),
        };
        let code = match number {
            Some(n) => format!("{:?} ({n})", s.code()),
            None => format!("{:?}", s.code()),
        };
        if unknown {
            CliError::OutcomeUnknown { code, message }
        } else {
            CliError::Rejected { code, message }
        }
    }

    /// A call without TLS (`tls_used` false) whose outcome is unknown, made to a port
    /// that does not answer plaintext HTTP/2 (a TLS port closes the connection on the
    /// first bytes): nothing could have been done there, so it is
    /// [`CliError::NotPlaintext`]. Anything else is kept as it is.
    pub fn diagnosed(self, addr: &str, tls_used: bool) -> Self {
        match self {
            CliError::OutcomeUnknown { .. } if !tls_used && answers_plaintext_http2(addr) == Some(false) => {
                CliError::NotPlaintext { addr: addr.to_string() }
            }
            other => other,
        }
    }

    /// A publish stream failed with `self` after `published` messages were confirmed,
    /// while `unconfirmed_batches` requests holding `unconfirmed_messages` had been
    /// sent without an answer. The broker publishes a stream's requests concurrently
    /// and answers in order, so a rejection speaks for the first unconfirmed request
    /// only: any later one already sent may have been published.
    pub fn publish_stream_failed(self, published: u64, unconfirmed_batches: u64, unconfirmed_messages: u64) -> Self {
        let confirmed = format!("{published} messages were published before");
        match self {
            CliError::Rejected { code, message } if unconfirmed_batches > 1 => CliError::OutcomeUnknown {
                code,
                message: format!(
                    "{message}; {confirmed}, and {unconfirmed_messages} were sent without an answer (the first \
                     request of them was rejected, later ones may have been published)"
                ),
            },
            CliError::Rejected { code, message } => {
                CliError::Rejected { code, message: format!("{message}; {confirmed}, none after them") }
            }
            CliError::OutcomeUnknown { code, message } => CliError::OutcomeUnknown {
                code,
                message: format!("{message}; {confirmed}, {unconfirmed_messages} were sent without an answer"),
            },
            other => other,
        }
    }
}

/// The status's message followed by those of its causes that add something.
fn with_causes(s: &tonic::Status) -> String {
    let mut message = s.message().to_string();
    let mut cause = std::error::Error::source(s);
    while let Some(e) = cause {
        let text = e.to_string();
        if !message.contains(&text) {
            message = format!("{message}: {text}");
        }
        cause = e.source();
    }
    message
}

/// Whether `addr` answers the HTTP/2 connection preface as a plaintext gRPC server
/// does, with a SETTINGS frame first. `None`: cannot tell (unreachable, no answer in
/// time). A connection closed before any byte is asked about again twice, 300 ms
/// apart: a TLS port closes every one, a node being killed or starting only some.
fn answers_plaintext_http2(addr: &str) -> Option<bool> {
    const PROBES: usize = 3;
    for probe in 1..=PROBES {
        match probe_http2_preface(addr)? {
            Preface::Settings => return Some(true),
            Preface::OtherBytes => return Some(false),
            Preface::Closed if probe == PROBES => return Some(false),
            Preface::Closed => std::thread::sleep(Duration::from_millis(300)),
        }
    }
    None
}

/// What a port answered to the HTTP/2 connection preface.
enum Preface {
    /// A frame header of a SETTINGS frame: plaintext HTTP/2.
    Settings,
    /// Bytes, but not a SETTINGS frame.
    OtherBytes,
    /// The connection closed (or was reset) before 9 bytes came.
    Closed,
}

fn probe_http2_preface(addr: &str) -> Option<Preface> {
    use std::io::{ErrorKind, Read, Write};
    let timeout = Duration::from_millis(CONNECT_TIMEOUT_MS);
    let to = std::net::ToSocketAddrs::to_socket_addrs(addr).ok()?.next()?;
    let mut socket = std::net::TcpStream::connect_timeout(&to, timeout).ok()?;
    socket.set_read_timeout(Some(timeout)).ok()?;
    socket.set_write_timeout(Some(timeout)).ok()?;
    // The preface, then an empty SETTINGS frame (length 0, type 4, no flags, stream 0).
    socket.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").ok()?;
    let mut frame_head = [0u8; 9];
    let mut got = 0;
    while got < frame_head.len() {
        match socket.read(&mut frame_head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => match e.kind() {
                ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => break,
                _ => return None,
            },
        }
    }
    Some(match got {
        9 if frame_head[3] == 4 => Preface::Settings,
        0 => Preface::Closed,
        _ => Preface::OtherBytes,
    })
}

/// Whether the call failed to connect, so nothing was sent: tonic reports that as
/// `Unavailable` with a [`tonic::ConnectError`] among the causes, while `Unavailable`
/// without it (a keep-alive that timed out, a connection reset) may come after sending.
fn connect_failed(s: &tonic::Status) -> bool {
    let mut cause = std::error::Error::source(s);
    while let Some(e) = cause {
        if e.is::<tonic::ConnectError>() {
            return true;
        }
        cause = e.source();
    }
    false
}

/// Whether the call was never sent: its connection closed (an HTTP/2 GOAWAY from a
/// broker that stops, a connection lost) while the request still waited to be written
/// to it. hyper says so with a cancelled error (`is_canceled`), which it makes only for
/// a request it never handed to the connection, so sending it again cannot store it
/// twice. gRPC's own clients retry these by themselves ("transparent retry").
pub fn never_sent(s: &tonic::Status) -> bool {
    let mut cause = std::error::Error::source(s);
    while let Some(e) = cause {
        if e.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_canceled) {
            return true;
        }
        cause = e.source();
    }
    false
}

/// Target node of CLI commands.
pub fn target_addr(host: &Option<String>, port: u16) -> String {
    format!("{}:{port}", host.as_deref().unwrap_or("localhost"))
}

/// TLS of a client connection (`None`: plaintext).
pub type Tls<'a> = Option<&'a eventtermq_broker::transport::tls::ClientTls>;

/// A lazily connected channel to a node; the first call connects.
pub fn channel(addr: &str, tls: Tls<'_>) -> Result<tonic::transport::Channel, CliError> {
    eventtermq_broker::transport::tcp::connect_lazy(addr, Duration::from_millis(CONNECT_TIMEOUT_MS), tls)
        .map_err(|e| CliError::Connect { addr: addr.to_string(), message: e.to_string() })
}

pub fn messaging_client(
    addr: &str,
    tls: Tls<'_>,
) -> Result<eventtermq_proto::v1::messaging_client::MessagingClient<tonic::transport::Channel>, CliError> {
    let channel = channel(addr, tls)?;
    Ok(eventtermq_proto::v1::messaging_client::MessagingClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX))
}

/// [`messaging_client`] sending `credentials` with every request.
pub fn messaging_client_as(
    addr: &str,
    tls: Tls<'_>,
    credentials: &Credentials,
) -> Result<eventtermq_proto::v1::messaging_client::MessagingClient<Authed>, CliError> {
    let channel = channel(addr, tls)?;
    Ok(eventtermq_proto::v1::messaging_client::MessagingClient::with_interceptor(channel, credentials.clone())
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX))
}

/// [`admin_client`] sending `credentials` with every request.
pub fn admin_client_as(addr: &str, tls: Tls<'_>, credentials: &Credentials) -> Result<AdminClient<Authed>, CliError> {
    Ok(AdminClient::with_interceptor(channel(addr, tls)?, credentials.clone()))
}

pub fn admin_client(addr: &str, tls: Tls<'_>) -> Result<AdminClient<tonic::transport::Channel>, CliError> {
    let channel = channel(addr, tls)?;
    Ok(AdminClient::new(channel))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listener on loopback whose accepted connections are handed to `serve`, for
    /// `accepts` of them.
    fn port_that(accepts: usize, serve: fn(std::net::TcpStream)) -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        std::thread::spawn(move || listener.incoming().take(accepts).flatten().for_each(serve));
        addr
    }

    #[test]
    fn the_port_probe_tells_plaintext_http2_from_a_port_that_closes_or_answers_otherwise() {
        use std::io::{Read, Write};
        // Reads the preface and answers with an empty SETTINGS frame.
        let h2 = port_that(1, |mut c| {
            let mut preface = [0u8; 33];
            c.read_exact(&mut preface).unwrap();
            c.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).unwrap();
        });
        assert_eq!(answers_plaintext_http2(&h2), Some(true));
        // A TLS port's alert record: bytes, but no SETTINGS frame.
        let tls = port_that(1, |mut c| {
            let _ = c.write_all(&[0x15, 3, 3, 0, 2, 2, 50]);
        });
        assert_eq!(answers_plaintext_http2(&tls), Some(false));
        // Closing every connection without a byte, as a TLS port may: asked three times.
        let closes = port_that(3, drop);
        assert_eq!(answers_plaintext_http2(&closes), Some(false));
        // Closing one connection, then not listening (a node being killed): cannot tell.
        let dies = port_that(1, drop);
        assert_eq!(answers_plaintext_http2(&dies), None);
    }

    fn from_broker(code: tonic::Code, number: u32) -> tonic::Status {
        let mut s = tonic::Status::new(code, "why");
        s.metadata_mut().insert(eventtermq_broker::error::ERROR_CODE_METADATA, number.to_string().parse().unwrap());
        s
    }

    #[test]
    fn a_brokers_code_decides_whether_anything_may_have_changed() {
        for (code, number, expected) in [
            (tonic::Code::InvalidArgument, 1002, exit_status::REJECTED),
            (tonic::Code::NotFound, 2002, exit_status::REJECTED),
            (tonic::Code::AlreadyExists, 3002, exit_status::REJECTED),
            (tonic::Code::FailedPrecondition, 4008, exit_status::REJECTED),
            (tonic::Code::Unavailable, 5001, exit_status::REJECTED),
            (tonic::Code::Unavailable, 5002, exit_status::OUTCOME_UNKNOWN),
            (tonic::Code::Unavailable, 5003, exit_status::REJECTED),
            (tonic::Code::Unavailable, 5004, exit_status::REJECTED),
            (tonic::Code::Unavailable, 5005, exit_status::REJECTED),
            (tonic::Code::Internal, 9001, exit_status::OUTCOME_UNKNOWN),
            (tonic::Code::Internal, 9002, exit_status::REJECTED),
            // Codes of a newer broker, by their range.
            (tonic::Code::Unavailable, 5999, exit_status::REJECTED),
            (tonic::Code::Internal, 9999, exit_status::OUTCOME_UNKNOWN),
        ] {
            let e = CliError::from_status(from_broker(code, number), "node:1");
            assert_eq!(e.exit_status(), expected, "{number}: {e}");
            let prefix = if expected == exit_status::REJECTED { "rejected: " } else { "outcome unknown: " };
            assert!(e.to_string().starts_with(&format!("{prefix}{code:?} ({number}): why")), "{e}");
        }
    }

    #[test]
    fn without_a_code_the_transport_failure_decides() {
        for (code, expected) in [
            (tonic::Code::DeadlineExceeded, exit_status::OUTCOME_UNKNOWN),
            (tonic::Code::Cancelled, exit_status::OUTCOME_UNKNOWN),
            (tonic::Code::Unknown, exit_status::OUTCOME_UNKNOWN),
            // Not a failed connect (that carries a ConnectError): a keep-alive that
            // timed out or a connection reset, after sending.
            (tonic::Code::Unavailable, exit_status::OUTCOME_UNKNOWN),
            (tonic::Code::Internal, exit_status::OUTCOME_UNKNOWN),
            (tonic::Code::Unimplemented, exit_status::REJECTED),
            (tonic::Code::InvalidArgument, exit_status::REJECTED),
            (tonic::Code::ResourceExhausted, exit_status::REJECTED),
        ] {
            let e = CliError::from_status(tonic::Status::new(code, "why"), "node:1");
            assert_eq!(e.exit_status(), expected, "{code:?}: {e}");
        }
    }

    #[test]
    fn a_rejection_in_a_publish_stream_speaks_for_its_own_request_only() {
        let rejected = || CliError::Rejected { code: "Unavailable (5004)".into(), message: "too few".into() };
        // Only the rejected request was unanswered: the rest was confirmed.
        let e = rejected().publish_stream_failed(100, 1, 10);
        assert_eq!(e.exit_status(), exit_status::REJECTED, "{e}");
        assert!(e.to_string().contains("100 messages were published before, none after them"), "{e}");
        // Later requests were sent too and may have been published concurrently.
        let e = rejected().publish_stream_failed(100, 3, 30);
        assert_eq!(e.exit_status(), exit_status::OUTCOME_UNKNOWN, "{e}");
        assert!(e.to_string().contains("100 messages were published before, and 30 were sent without an answer"));
        let unknown = CliError::OutcomeUnknown { code: "Unknown".into(), message: "reset".into() };
        let e = unknown.publish_stream_failed(5, 2, 20);
        assert_eq!(e.exit_status(), exit_status::OUTCOME_UNKNOWN, "{e}");
        assert!(e.to_string().contains("5 messages were published before, 20 were sent without an answer"), "{e}");
    }
}
