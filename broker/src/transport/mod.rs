//! How a node reaches other nodes: gRPC channels (TCP) and gossip datagrams (UDP).
//!
//! The node never opens sockets itself: it is handed a [`Network`] to send with and
//! [`Listeners`] to receive on. Production uses [`tcp`] (real sockets on `--port`);
//! tests use [`mem`], an in-process network that can drop, delay and partition, so a
//! whole cluster runs in one test process.

pub mod mem;
pub mod tcp;
pub mod tls;

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::Stream;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tonic::transport::server::Connected;

/// Outbound side of a node's network.
pub trait Network: Send + Sync + 'static {
    /// A gRPC channel to `addr` (`host:port`), connected lazily and re-connected after
    /// failures; cheap to call repeatedly (channels are cached).
    fn channel(&self, addr: &str) -> tonic::transport::Channel;

    /// A second, separate connection to `addr` for bulk data (replication, forwarded
    /// publishes and subscriptions, segment reads). Raft and gossip keep `channel` to
    /// themselves: HTTP/2 flow control is per connection, so a data stream the peer
    /// is slow to read must not hold up the heartbeats and entries that let the peer
    /// learn, for instance, where the next segment is.
    fn data_channel(&self, addr: &str) -> tonic::transport::Channel;

    /// Sends one gossip datagram to `addr`. Best effort, like UDP: failures are dropped.
    fn send_datagram(&self, addr: &str, data: Bytes);
}

/// Accepted connections of one listener.
pub type Incoming = Pin<Box<dyn Stream<Item = std::io::Result<Conn>> + Send>>;

/// Inbound side of a node's network.
pub struct Listeners {
    /// Accepted connections for the gRPC server.
    pub incoming: Incoming,
    /// Accepted connections for the AMQP 0.9.1 listener (`None`: it is off).
    pub amqp: Option<Incoming>,
    /// Received gossip datagrams.
    pub datagrams: mpsc::Receiver<Bytes>,
    /// Failed TLS handshakes on the listeners (stays 0 without TLS); the node reports
    /// it in its metrics.
    pub tls_handshakes_failed: Counter,
}

/// A connection accepted by the gRPC server: a TCP socket, a TLS session over one, or
/// an in-memory pipe.
pub enum Conn {
    Tcp(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>),
    Mem(mem::MemStream),
}

/// What the server knows of a connection's other end (in each request's extensions).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The peer's address (`None` in the in-memory network).
    pub remote: Option<std::net::SocketAddr>,
    /// The client certificate the TLS handshake verified (`--tls-client-ca-file`),
    /// read once per connection; `None` without one.
    pub client_cert: Option<std::sync::Arc<crate::client_cert::ClientCert>>,
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        let client_cert = match self {
            Conn::Tls(s) => s
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|der| std::sync::Arc::new(crate::client_cert::ClientCert::parse(der))),
            _ => None,
        };
        ConnInfo { remote: self.remote(), client_cert }
    }
}

impl Conn {
    /// The peer's address, if a socket's.
    pub fn remote(&self) -> Option<std::net::SocketAddr> {
        match self {
            Conn::Tcp(s) => s.peer_addr().ok(),
            Conn::Tls(s) => s.get_ref().0.peer_addr().ok(),
            Conn::Mem(_) => None,
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Conn::Mem(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Conn::Mem(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Conn::Mem(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Conn::Mem(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// HTTP/2 pings on idle gRPC connections, both ways, so a peer that vanished without
/// closing its connection (power loss, a cut cable) is noticed within interval +
/// timeout rather than at the next request's deadline.
pub const HTTP2_KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
/// How long a keep-alive ping may go unanswered before the connection is dropped.
pub const HTTP2_KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Bound on buffered inbound gossip datagrams; beyond it they are dropped like a full
/// UDP receive buffer would (SWIM tolerates loss).
pub const DATAGRAM_QUEUE_MAX: usize = 1024;
/// Largest gossip datagram sent or received.
pub const DATAGRAM_SIZE_MAX_BYTES: usize = 1400;
