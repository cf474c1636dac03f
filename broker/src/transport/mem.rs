//! In-process network for tests: every node is a named host; gRPC connections are
//! in-memory pipes and datagrams are channel messages. Faults can be injected between
//! any two hosts: partitions (connections refused and broken, datagrams dropped),
//! random datagram loss, delay, and taking a host off the network entirely.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper_util::rt::TokioIo;
use rand::RngExt;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

use super::{Conn, Listeners, Network, DATAGRAM_QUEUE_MAX};

const PIPE_BUFFER_BYTES: usize = 256 * 1024;

struct Inner {
    hosts: HashMap<String, Host>,
    /// Unordered pairs of hosts that cannot talk.
    cut: HashSet<(String, String)>,
    /// (from, to): `from` cannot reach `to`, while `to` reaches `from`.
    one_way: HashSet<(String, String)>,
    drop_rate: f64,
    delay: Duration,
    /// Decides which datagrams are lost (seeded in a simulation).
    rng: rand::rngs::SmallRng,
}

impl Inner {
    fn new(seed: u64) -> Self {
        Inner {
            hosts: HashMap::new(),
            cut: HashSet::new(),
            one_way: HashSet::new(),
            drop_rate: 0.0,
            delay: Duration::ZERO,
            rng: <rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(seed),
        }
    }
}

struct Host {
    conns: mpsc::UnboundedSender<std::io::Result<Conn>>,
    datagrams: mpsc::Sender<Bytes>,
}

fn pair(a: &str, b: &str) -> (String, String) {
    if a <= b {
        (a.to_string(), b.to_string())
    } else {
        (b.to_string(), a.to_string())
    }
}

impl Inner {
    fn linked(&self, a: &str, b: &str) -> bool {
        self.hosts.contains_key(a) && self.hosts.contains_key(b) && !self.cut.contains(&pair(a, b))
    }

    /// Whether `from` reaches `to` with a connection it opens (or a datagram).
    fn reaches(&self, from: &str, to: &str) -> bool {
        self.linked(from, to) && !self.one_way.contains(&(from.to_string(), to.to_string()))
    }
}

/// The shared fabric. Clone freely.
#[derive(Clone)]
pub struct MemNetwork {
    inner: Arc<Mutex<Inner>>,
}

impl Default for MemNetwork {
    fn default() -> Self {
        Self::with_seed(rand::random())
    }
}

impl MemNetwork {
    pub fn new() -> Self {
        Self::default()
    }

    /// A network whose random datagram loss comes from `seed`, so that a simulation
    /// replays.
    pub fn with_seed(seed: u64) -> Self {
        MemNetwork { inner: Arc::new(Mutex::new(Inner::new(seed))) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts a host named `addr` on the network (replacing an earlier one of that name,
    /// e.g. a restarted node) and returns its outbound handle and listeners.
    pub fn attach(&self, addr: &str) -> (Arc<dyn Network>, Listeners) {
        let (ctx, crx) = mpsc::unbounded_channel();
        let (dtx, drx) = mpsc::channel(DATAGRAM_QUEUE_MAX);
        self.lock().hosts.insert(addr.to_string(), Host { conns: ctx, datagrams: dtx });
        let net =
            Arc::new(MemHostNetwork { me: addr.to_string(), net: self.clone(), channels: Mutex::new(HashMap::new()) });
        let incoming = tokio_stream::wrappers::UnboundedReceiverStream::new(crx);
        (
            net,
            Listeners {
                incoming: Box::pin(incoming),
                amqp: None,
                datagrams: drx,
                tls_handshakes_failed: Default::default(),
            },
        )
    }

    /// Takes a host off the network: all its links break (like a crashed machine).
    pub fn detach(&self, addr: &str) {
        self.lock().hosts.remove(addr);
    }

    /// Cuts every link between a host of `a` and a host of `b`.
    pub fn partition(&self, a: &[&str], b: &[&str]) {
        let mut inner = self.lock();
        for x in a {
            for y in b {
                inner.cut.insert(pair(x, y));
            }
        }
    }

    /// Cuts `addr` off from every other host it currently knows.
    pub fn isolate(&self, addr: &str) {
        let others: Vec<String> = self.lock().hosts.keys().filter(|h| *h != addr).cloned().collect();
        let others: Vec<&str> = others.iter().map(String::as_str).collect();
        self.partition(&[addr], &others);
    }

    /// `from` can no longer reach `to` (new connections, the ones it opened before,
    /// datagrams), while `to` still reaches `from`: as when `to` restarted with a new
    /// address and `from`'s DNS answers still give the old one.
    pub fn cut_one_way(&self, from: &str, to: &str) {
        self.lock().one_way.insert((from.to_string(), to.to_string()));
    }

    /// Removes every partition.
    pub fn heal(&self) {
        let mut inner = self.lock();
        inner.cut.clear();
        inner.one_way.clear();
    }

    /// Probability in [0, 1] that a datagram is lost.
    pub fn set_drop_rate(&self, rate: f64) {
        self.lock().drop_rate = rate.clamp(0.0, 1.0);
    }

    /// Delay added to every datagram and every new connection.
    pub fn set_delay(&self, delay: Duration) {
        self.lock().delay = delay;
    }
}

struct MemHostNetwork {
    me: String,
    net: MemNetwork,
    channels: Mutex<HashMap<String, Channel>>,
}

impl Network for MemHostNetwork {
    fn channel(&self, addr: &str) -> Channel {
        self.cached_channel(addr, addr)
    }

    fn data_channel(&self, addr: &str) -> Channel {
        self.cached_channel(&format!("{addr}#data"), addr)
    }

    fn send_datagram(&self, addr: &str, data: Bytes) {
        self.send_datagram_inner(addr, data)
    }
}

impl MemHostNetwork {
    /// The channel cached under `key`, connecting to `addr` on first use.
    fn cached_channel(&self, key: &str, addr: &str) -> Channel {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = channels.get(key) {
            return c.clone();
        }
        let net = self.net.clone();
        let me = self.me.clone();
        let to = addr.to_string();
        let connector = tower::service_fn(move |_uri: tonic::transport::Uri| {
            let net = net.clone();
            let me = me.clone();
            let to = to.clone();
            async move {
                let delay = net.lock().delay;
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let inner = net.lock();
                if !inner.reaches(&me, &to) {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionRefused,
                        format!("{me} cannot reach {to}"),
                    ));
                }
                let host = inner.hosts.get(&to).expect("linked implies attached");
                let (client, server) = tokio::io::duplex(PIPE_BUFFER_BYTES);
                let server =
                    MemStream { inner: server, net: net.clone(), a: to.clone(), b: me.clone(), dialer: me.clone() };
                host.conns
                    .send(Ok(Conn::Mem(server)))
                    .map_err(|_| std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "listener closed"))?;
                drop(inner);
                let dialer = me.clone();
                Ok::<_, std::io::Error>(TokioIo::new(MemStream { inner: client, net, a: me, b: to, dialer }))
            }
        });
        let channel = Endpoint::from_static("http://mem.invalid")
            .connect_timeout(Duration::from_secs(1))
            // Pings notice a partition on an idle connection (a pending read is not
            // woken by the cut itself).
            .http2_keep_alive_interval(Duration::from_millis(500))
            .keep_alive_timeout(Duration::from_millis(500))
            .keep_alive_while_idle(true)
            .connect_with_connector_lazy(connector);
        channels.insert(key.to_string(), channel.clone());
        channel
    }

    fn send_datagram_inner(&self, addr: &str, data: Bytes) {
        let mut inner = self.net.lock();
        let drop_rate = inner.drop_rate;
        if !inner.reaches(&self.me, addr) || (drop_rate > 0.0 && inner.rng.random_bool(drop_rate)) {
            return;
        }
        let tx = inner.hosts.get(addr).map(|h| h.datagrams.clone());
        let delay = inner.delay;
        drop(inner);
        if let Some(tx) = tx {
            if delay.is_zero() {
                let _ = tx.try_send(data);
            } else {
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = tx.try_send(data);
                });
            }
        }
    }
}

/// One end of an in-memory connection between hosts `a` (this end) and `b`. Reads and
/// writes fail once the two are partitioned or either leaves the network.
pub struct MemStream {
    inner: DuplexStream,
    net: MemNetwork,
    a: String,
    b: String,
    /// The host that opened the connection (`a` or `b`).
    dialer: String,
}

impl MemStream {
    fn check(&self) -> std::io::Result<()> {
        let listener = if self.dialer == self.a { &self.b } else { &self.a };
        if self.net.lock().reaches(&self.dialer, listener) {
            Ok(())
        } else {
            Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "link cut"))
        }
    }
}

impl AsyncRead for MemStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        this.check()?;
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for MemStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        this.check()?;
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
