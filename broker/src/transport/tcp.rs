//! Real sockets: gRPC over TCP (TLS when configured, see [`super::tls`]) and gossip
//! over UDP, both on the node's `--port`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

use prometheus_client::metrics::counter::Counter;

use super::tls::{ClientTls, NodeTls, ServerTls};
use super::{Conn, Listeners, Network, DATAGRAM_QUEUE_MAX, DATAGRAM_SIZE_MAX_BYTES};

pub struct TcpNetwork {
    udp: Arc<UdpSocket>,
    channels: Mutex<HashMap<String, Channel>>,
    connect_timeout: Duration,
    /// TLS for calls to other nodes (`None`: plaintext).
    tls: Option<ClientTls>,
}

/// ALPN of gRPC (HTTP/2) on the TLS listener.
const ALPN_H2: &[u8] = b"h2";

/// Binds TCP and UDP on `addr` and returns the node's network and listeners. With
/// `tls`, the gRPC listener takes only TLS and calls to other nodes use it too.
pub async fn bind(
    addr: SocketAddr,
    connect_timeout: Duration,
    tls: Option<&NodeTls>,
) -> std::io::Result<(Arc<TcpNetwork>, Listeners)> {
    let tcp = TcpListener::bind(addr).await?;
    let udp = Arc::new(UdpSocket::bind(addr).await?);
    let (tx, rx) = mpsc::channel(DATAGRAM_QUEUE_MAX);
    let recv_sock = udp.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match recv_sock.recv_from(&mut buf).await {
                Ok((n, _from)) => {
                    if n > DATAGRAM_SIZE_MAX_BYTES {
                        tracing::debug!(n, "dropping oversized gossip datagram");
                        continue;
                    }
                    // Full queue: drop, as a full socket buffer would.
                    if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(Bytes::copy_from_slice(&buf[..n])) {
                        return;
                    }
                }
                // ICMP port unreachable from an earlier send shows up here on Linux; ignore.
                Err(e) => tracing::trace!(error = %e, "udp recv"),
            }
        }
    });
    let failures = Counter::default();
    let incoming = incoming(tcp, tls.map(|t| &t.server), &[ALPN_H2], &failures)?;
    let tls = tls.map(|t| t.client.clone());
    let net = Arc::new(TcpNetwork { udp, channels: Mutex::new(HashMap::new()), connect_timeout, tls });
    Ok((net, Listeners { incoming, amqp: None, datagrams: rx, tls_handshakes_failed: failures }))
}

/// Binds the AMQP listener on `addr` (AMQPS with `tls`: the same certificate, no
/// ALPN); failed handshakes are counted in `failures`.
pub async fn bind_amqp(
    addr: SocketAddr,
    tls: Option<&ServerTls>,
    failures: &Counter,
) -> std::io::Result<super::Incoming> {
    let tcp = TcpListener::bind(addr).await?;
    incoming(tcp, tls, &[], failures)
}

/// The connections accepted on `tcp`: plain, or after a TLS handshake.
fn incoming(
    tcp: TcpListener,
    tls: Option<&ServerTls>,
    alpn: &[&[u8]],
    failures: &Counter,
) -> std::io::Result<super::Incoming> {
    if let Some(tls) = tls {
        let config = tls.config(alpn).map_err(std::io::Error::other)?;
        return Ok(tls.incoming(tcp, config, failures.clone()));
    }
    Ok(Box::pin(tokio_stream::wrappers::TcpListenerStream::new(tcp).map(|r| {
        r.map(|s| {
            let _ = s.set_nodelay(true);
            Conn::Tcp(s)
        })
    })))
}

impl TcpNetwork {
    pub fn local_udp_addr(&self) -> std::io::Result<SocketAddr> {
        self.udp.local_addr()
    }

    /// The channel cached under `key`, connecting to `addr` on first use.
    fn cached_channel(&self, key: &str, addr: &str) -> Channel {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = channels.get(key) {
            return c.clone();
        }
        let channel = match connect_lazy(addr, self.connect_timeout, self.tls.as_ref()) {
            Ok(c) => c,
            Err(e) => {
                // An address that is not even a valid URI: hand out a channel that
                // fails every call, so the caller sees an error per request.
                tracing::warn!(addr, error = %e, "invalid peer address");
                Endpoint::from_static("http://invalid.invalid:1").connect_lazy()
            }
        };
        channels.insert(key.to_string(), channel.clone());
        channel
    }
}

/// A lazily connected channel to `addr`, for clients (CLI) and nodes alike; over TLS
/// with `tls` (the server's certificate verified for the host of `addr`).
pub fn connect_lazy(
    addr: &str,
    connect_timeout: Duration,
    tls: Option<&ClientTls>,
) -> Result<Channel, tonic::transport::Error> {
    // The scheme stays http: TLS is the connector's, below tonic.
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(super::HTTP2_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(super::HTTP2_KEEPALIVE_TIMEOUT);
    Ok(match tls {
        Some(tls) => tls.channel(endpoint),
        None => endpoint.connect_lazy(),
    })
}

impl Network for TcpNetwork {
    fn channel(&self, addr: &str) -> Channel {
        self.cached_channel(addr, addr)
    }

    fn data_channel(&self, addr: &str) -> Channel {
        self.cached_channel(&format!("{addr}#data"), addr)
    }

    fn send_datagram(&self, addr: &str, data: Bytes) {
        let sock = self.udp.clone();
        let addr = addr.to_string();
        // Host names (e.g. Kubernetes pod DNS names) are resolved at send time, so an
        // address that changes IP after a pod restart keeps working.
        tokio::spawn(async move {
            if let Err(e) = sock.send_to(&data, addr.as_str()).await {
                tracing::trace!(addr, error = %e, "gossip send failed");
            }
        });
    }
}
