//! The `eventtermq` binary's library: flag definitions ([`args`]), running the broker
//! over real sockets ([`run`]), the admin commands ([`commands`]), publishing and
//! subscribing ([`messages`]), the text/JSON rendering of the cluster state
//! ([`render`]) and the benchmarks ([`bench`]). It talks to nodes as any client does,
//! through the gRPC API; only `run` and the benchmarks' floors use the broker and
//! storage libraries directly.

pub mod args;
pub mod bench;
pub mod commands;
pub mod messages;
pub mod render;
pub mod run;

use std::time::Duration;

use eventtermq_proto::v1::admin_client::AdminClient;

/// What the CLI knows about where and how to talk.
pub struct Ctx {
    pub addr: String,
    pub namespace: String,
    pub output: args::Output,
}

/// How long the CLI waits to connect to a node.
pub const CONNECT_TIMEOUT_MS: u64 = 3_000;

/// A CLI error: printed on stderr, exit status 1.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot reach node at {addr}: {message}")]
    Connect { addr: String, message: String },
    #[error("{code}: {message}")]
    Rpc { code: String, message: String },
}

impl CliError {
    pub fn from_status(s: tonic::Status, addr: &str) -> Self {
        // Errors from a broker carry a numeric code; Unavailable without one comes
        // from the client's own transport: the node could not be reached.
        let from_broker = s.metadata().contains_key(eventtermq_broker::error::ERROR_CODE_METADATA);
        if s.code() == tonic::Code::Unavailable && !from_broker {
            return CliError::Connect { addr: addr.to_string(), message: s.message().to_string() };
        }
        CliError::Rpc { code: format!("{:?}", s.code()), message: s.message().to_string() }
    }
}

/// Target node of CLI commands.
pub fn target_addr(host: &Option<String>, port: u16) -> String {
    format!("{}:{port}", host.as_deref().unwrap_or("localhost"))
}

/// A lazily connected channel to a node; the first call connects.
pub fn channel(addr: &str) -> Result<tonic::transport::Channel, CliError> {
    eventtermq_broker::transport::tcp::connect_lazy(addr, Duration::from_millis(CONNECT_TIMEOUT_MS))
        .map_err(|e| CliError::Connect { addr: addr.to_string(), message: e.to_string() })
}

pub fn messaging_client(
    addr: &str,
) -> Result<eventtermq_proto::v1::messaging_client::MessagingClient<tonic::transport::Channel>, CliError> {
    let channel = channel(addr)?;
    Ok(eventtermq_proto::v1::messaging_client::MessagingClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX))
}

pub fn admin_client(addr: &str) -> Result<AdminClient<tonic::transport::Channel>, CliError> {
    let channel = channel(addr)?;
    Ok(AdminClient::new(channel))
}
