//! TLS (rustls, ring) on the node's listeners and on its calls to other nodes.
//!
//! - The certificate and key are read from files and read again when either file
//!   changes ([`ReloadingKey`], polled every `reload_interval_ms`): cert-manager
//!   rotates them in place (a Secret volume swaps a symlink), and a node must not
//!   need a restart for it. New handshakes get the new pair; open connections keep
//!   theirs. A pair that does not load (half written, key and certificate not
//!   matching) is logged and the previous one kept.
//! - TLS 1.2 and 1.3 only, with rustls's cipher suites (AEAD with forward secrecy
//!   only: no CBC, no RC4, no static RSA key exchange).
//! - With a client CA (`--tls-client-ca-file`) the listeners require a client
//!   certificate it signed; nodes present their own certificate as client certificate
//!   to each other, so a node certificate should allow both server and client use.
//!   A certificate that has expired, but chained to the CA while it was valid, passes
//!   the handshake ([`ExpiredToo`]) so that the client hears why in words: every
//!   request on such a connection is refused by `api/` (gRPC) and `amqp/` (its login)
//!   naming the certificate's user and expiry, and counted as `certificate_expired`.
//! - Calls to other nodes verify the peer's certificate against `--tls-ca-file` and
//!   the host name (or IP) of its advertised address.
//!
//! The handshake runs in a task of its own with a deadline, so a client that opens a
//! connection and sends nothing (or plaintext) holds up no one else's.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::UnixTime;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig, SignatureScheme};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};

use super::{Conn, Incoming};

/// TLS files and limits of a node (`--tls-*`).
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// PEM certificate chain the node serves (and presents to other nodes).
    pub cert_file: PathBuf,
    /// PEM private key of `cert_file` (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM CA certificates the other nodes' certificates are verified against.
    pub ca_file: PathBuf,
    /// PEM CA certificates client certificates must chain to; `None`: no client
    /// certificate is asked for.
    pub client_ca_file: Option<PathBuf>,
    /// How often the certificate and key files are checked for changes.
    pub reload_interval_ms: u64,
    /// How long a connection may take to complete its handshake.
    pub handshake_timeout_ms: u64,
    /// Handshakes in progress at most per listener; further connections wait to be
    /// accepted (the kernel's backlog holds them).
    pub handshakes_in_flight_max: usize,
}

impl TlsSettings {
    pub const DEFAULT_RELOAD_INTERVAL_MS: u64 = 5_000;
    pub const DEFAULT_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
    pub const DEFAULT_HANDSHAKES_IN_FLIGHT_MAX: usize = 256;
}

/// The one crypto provider: ring (already used by the operator's Kubernetes client).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

const VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];

fn read_file(flag: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{flag}: cannot read {}: {e}", path.display()))
}

/// The certificates of a PEM file (at least one).
pub fn load_certs(flag: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read_file(flag, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{flag}: {} is not a PEM certificate file: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{flag}: {} holds no PEM certificate (BEGIN CERTIFICATE)", path.display()));
    }
    Ok(certs)
}

/// A root store of the CA certificates in `path`.
pub fn load_roots(flag: &str, path: &Path) -> Result<Arc<RootCertStore>, String> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(flag, path)? {
        roots.add(cert).map_err(|e| format!("{flag}: {}: not a usable CA certificate: {e}", path.display()))?;
    }
    Ok(Arc::new(roots))
}

/// The certificate chain of `cert_file` with the key of `key_file`, checked to match.
fn load_pair(cert_file: &Path, key_file: &Path) -> Result<Arc<CertifiedKey>, String> {
    let certs = load_certs("--tls-cert-file", cert_file)?;
    let pem = read_file("--tls-key-file", key_file)?;
    // The error of a key parse is about the format, never the key's bytes.
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        format!("--tls-key-file: {} holds no PEM private key (PKCS#8, PKCS#1 or SEC1): {e}", key_file.display())
    })?;
    let pair = CertifiedKey::from_der(certs, key, &provider()).map_err(|e| {
        format!(
            "--tls-key-file: {} does not go with the certificate of {}: {e}",
            key_file.display(),
            cert_file.display()
        )
    })?;
    Ok(Arc::new(pair))
}

/// What identifies a file's version: modification time, size and inode.
type Stamp = Option<(SystemTime, u64, u64)>;

fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// A certificate and key read again from their files when either changes.
#[derive(Debug)]
pub struct ReloadingKey {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: RwLock<(Arc<CertifiedKey>, [Stamp; 2])>,
}

impl ReloadingKey {
    /// Loads the pair (an error stops the start: a node must not run without it) and
    /// starts checking the files every `interval`, for as long as the key is in use.
    pub fn load(cert_file: &Path, key_file: &Path, interval: Duration) -> Result<Arc<Self>, String> {
        let stamps = [stamp(cert_file), stamp(key_file)];
        let pair = load_pair(cert_file, key_file)?;
        let key = Arc::new(Self {
            cert_file: cert_file.into(),
            key_file: key_file.into(),
            current: RwLock::new((pair, stamps)),
        });
        let weak = Arc::downgrade(&key);
        tokio::spawn(watch(weak, interval.max(Duration::from_millis(10))));
        Ok(key)
    }

    /// The pair served now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).0.clone()
    }

    /// Reads the files again if either changed since the last load; `Ok(true)` when a
    /// new pair is now served.
    pub fn reload_if_changed(&self) -> Result<bool, String> {
        let stamps = [stamp(&self.cert_file), stamp(&self.key_file)];
        if self.current.read().unwrap_or_else(|e| e.into_inner()).1 == stamps {
            return Ok(false);
        }
        let pair = load_pair(&self.cert_file, &self.key_file)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = (pair, stamps);
        Ok(true)
    }
}

/// Checks the files of `key` every `interval` until the key is no longer used.
async fn watch(key: Weak<ReloadingKey>, interval: Duration) {
    let mut last_error = None;
    loop {
        tokio::time::sleep(interval).await;
        let Some(key) = key.upgrade() else { return };
        match key.reload_if_changed() {
            Ok(true) => {
                tracing::info!(cert = %key.cert_file.display(), "TLS certificate and key reloaded");
                last_error = None;
            }
            Ok(false) => {}
            // Once per distinct error: a file half replaced is read again next time.
            Err(e) if last_error.as_ref() != Some(&e) => {
                tracing::warn!(error = %e, "TLS certificate or key changed but cannot be loaded; serving the previous pair");
                last_error = Some(e);
            }
            Err(_) => {}
        }
    }
}

impl ResolvesServerCert for ReloadingKey {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl ResolvesClientCert for ReloadingKey {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A node's TLS: its listeners' and its calls to other nodes', sharing one reloading
/// certificate and key.
#[derive(Clone)]
pub struct NodeTls {
    pub server: ServerTls,
    pub client: ClientTls,
}

impl NodeTls {
    /// Loads every file of `settings` (an error names the flag and the file) and starts
    /// watching the certificate and key. Call within the runtime.
    pub fn load(settings: &TlsSettings) -> Result<Self, String> {
        let interval = Duration::from_millis(settings.reload_interval_ms);
        let key = ReloadingKey::load(&settings.cert_file, &settings.key_file, interval)?;
        let server = ServerTls::new(settings, key.clone())?;
        let client = ClientTls::new(&settings.ca_file, Some(key))?;
        Ok(Self { server, client })
    }
}

/// The server side: one configuration per protocol (gRPC offers HTTP/2 by ALPN).
#[derive(Clone)]
pub struct ServerTls {
    key: Arc<ReloadingKey>,
    verifier: Option<Arc<dyn ClientCertVerifier>>,
    handshake_timeout: Duration,
    handshakes_in_flight_max: usize,
}

impl ServerTls {
    pub fn new(settings: &TlsSettings, key: Arc<ReloadingKey>) -> Result<Self, String> {
        let verifier = match &settings.client_ca_file {
            Some(path) => {
                let roots = load_roots("--tls-client-ca-file", path)?;
                let v = WebPkiClientVerifier::builder_with_provider(roots, provider())
                    .build()
                    .map_err(|e| format!("--tls-client-ca-file: {}: {e}", path.display()))?;
                Some(Arc::new(ExpiredToo { inner: v }) as Arc<dyn ClientCertVerifier>)
            }
            None => None,
        };
        Ok(Self {
            key,
            verifier,
            handshake_timeout: Duration::from_millis(settings.handshake_timeout_ms.max(1)),
            handshakes_in_flight_max: settings.handshakes_in_flight_max.max(1),
        })
    }

    /// A rustls server configuration offering `alpn` (empty: no ALPN).
    pub fn config(&self, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, String> {
        let builder = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)
            .map_err(|e| format!("TLS: {e}"))?;
        let builder = match &self.verifier {
            Some(v) => builder.with_client_cert_verifier(v.clone()),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(self.key.clone());
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }

    /// Accepts connections on `listener` and yields those that completed a TLS
    /// handshake. Failed handshakes (plaintext on the TLS port, a certificate of
    /// another CA, no client certificate where one is required, a timeout) are
    /// counted in `failures` and logged at most once per [`FAILURE_LOG_INTERVAL`].
    pub fn incoming(&self, listener: TcpListener, config: Arc<ServerConfig>, failures: Counter) -> Incoming {
        let (tx, rx) = mpsc::channel(self.handshakes_in_flight_max);
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let slots = Arc::new(Semaphore::new(self.handshakes_in_flight_max));
        let timeout = self.handshake_timeout;
        tokio::spawn(async move {
            let log = crate::security::LogLimiter::new(FAILURE_LOG_INTERVAL);
            let log = Arc::new(log);
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else { return };
                let (stream, peer) = tokio::select! {
                    biased;
                    _ = tx.closed() => return,
                    r = listener.accept() => match r {
                        Ok(s) => s,
                        Err(e) => {
                            // Out of file descriptors and the like: the same as without TLS.
                            if tx.send(Err(e)).await.is_err() { return }
                            continue;
                        }
                    },
                };
                let _ = stream.set_nodelay(true);
                let (acceptor, tx, failures, log) = (acceptor.clone(), tx.clone(), failures.clone(), log.clone());
                tokio::spawn(async move {
                    let _slot = slot;
                    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send(Ok(Conn::Tls(Box::new(tls)))).await;
                        }
                        outcome => {
                            failures.inc();
                            let why = match outcome {
                                Ok(Err(e)) => e.to_string(),
                                _ => format!("no handshake within {timeout:?}"),
                            };
                            if let Some(suppressed) = log.admit() {
                                tracing::warn!(%peer, error = %why, suppressed,
                                    "TLS handshake failed (plaintext on a TLS port, an unknown CA, no client certificate?)");
                            }
                        }
                    }
                });
            }
        });
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
    }
}

/// The client certificate verifier of the listeners: the CA's (webpki), except that a
/// certificate that has expired is taken when its chain verifies as of the last second
/// it was valid (so: the CA signed it, and it was revoked by nothing but time). The
/// connection then carries it, and `api/` and `amqp/` refuse every request on it with
/// a message naming its user and expiry (`client_cert::ClientCert::expired`), rather
/// than the client seeing only a TLS alert. Not-yet-valid certificates, other CAs and
/// bad signatures fail the handshake as before.
#[derive(Debug)]
pub struct ExpiredToo {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for ExpiredToo {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        use rustls::CertificateError::{Expired, ExpiredContext};
        match self.inner.verify_client_cert(end_entity, intermediates, now) {
            Err(rustls::Error::InvalidCertificate(Expired | ExpiredContext { .. })) => {
                let not_after = crate::client_cert::not_after_unix_s(end_entity)
                    .and_then(|s| u64::try_from(s).ok())
                    .filter(|s| *s < now.as_secs())
                    .ok_or(rustls::Error::InvalidCertificate(Expired))?;
                let then = UnixTime::since_unix_epoch(Duration::from_secs(not_after));
                self.inner.verify_client_cert(end_entity, intermediates, then)
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Failed handshakes are logged at most once per this interval (with the count of
/// those not logged): a scan of the port must not flood the log.
pub const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The client side: verifies servers against a CA and presents a certificate when it
/// has one (a node always does; the CLI when given `--tls-cert-file`).
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<ClientConfig>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientTls")
    }
}

impl ClientTls {
    /// Servers are verified against the CA certificates of `ca_file`; `identity`: the
    /// client certificate to present.
    pub fn new(ca_file: &Path, identity: Option<Arc<ReloadingKey>>) -> Result<Self, String> {
        let roots = load_roots("--tls-ca-file", ca_file)?;
        let builder = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(roots);
        let mut config = match identity {
            Some(key) => builder.with_client_cert_resolver(key),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self { config: Arc::new(config) })
    }

    /// Connects to `host:port` and completes a handshake verifying `host`.
    pub async fn connect(&self, host: &str, port: u16) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let name = ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']').to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{host}: not a host name: {e}")))?;
        let tcp = TcpStream::connect((host, port)).await?;
        tcp.set_nodelay(true)?;
        tokio_rustls::TlsConnector::from(self.config.clone()).connect(name, tcp).await
    }

    /// A lazily connected gRPC channel to `addr` over TLS.
    pub fn channel(&self, endpoint: tonic::transport::Endpoint) -> tonic::transport::Channel {
        let tls = self.clone();
        let connector = tower::service_fn(move |uri: tonic::codegen::http::Uri| {
            let tls = tls.clone();
            async move {
                let host = uri.host().unwrap_or_default().to_string();
                let port = uri.port_u16().unwrap_or(443);
                let stream = tls.connect(&host, port).await?;
                Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        });
        endpoint.connect_with_connector_lazy(connector)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Ca = rcgen::CertifiedIssuer<'static, rcgen::KeyPair>;

    fn ca() -> Ca {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap()
    }

    /// A certificate for `127.0.0.1` signed by `ca` and its key, as PEM files in `dir`.
    fn write_pair(dir: &Path, name: &str, ca: &Ca) -> (PathBuf, PathBuf) {
        let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        params.serial_number = Some(rcgen::SerialNumber::from(rand::random::<u64>()));
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, ca).unwrap();
        let (c, k) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    #[tokio::test]
    async fn a_replaced_pair_is_served_after_a_reload_and_a_bad_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca();
        let (c, k) = write_pair(dir.path(), "a", &ca);
        let key = ReloadingKey::load(&c, &k, Duration::from_secs(3600)).unwrap();
        let first = key.current().cert[0].clone();
        assert!(!key.reload_if_changed().unwrap());
        // A new pair written over the old files.
        let (c2, k2) = write_pair(dir.path(), "b", &ca);
        std::fs::rename(&c2, &c).unwrap();
        std::fs::rename(&k2, &k).unwrap();
        assert!(key.reload_if_changed().unwrap());
        let second = key.current().cert[0].clone();
        assert_ne!(first, second);
        // A key that does not go with the certificate: the previous pair stays.
        let (_, k3) = write_pair(dir.path(), "c", &ca);
        std::fs::rename(&k3, &k).unwrap();
        let e = key.reload_if_changed().unwrap_err();
        assert!(e.contains("does not go with the certificate"), "{e}");
        assert_eq!(key.current().cert[0], second);
        // Garbage: named, and its content not echoed.
        std::fs::write(&k, "not a key: s3cr3t").unwrap();
        let e = load_pair(&c, &k).unwrap_err();
        assert!(e.contains("--tls-key-file") && !e.contains("s3cr3t"), "{e}");
    }

    /// A client certificate signed by `issuer`, valid from `from` until `until`.
    fn client_leaf(issuer: &Ca, from: (i32, u8, u8), until: (i32, u8, u8)) -> CertificateDer<'static> {
        let mut params = rcgen::CertificateParams::new(vec!["client.example".to_string()]).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, "alice");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = rcgen::date_time_ymd(from.0, from.1, from.2);
        params.not_after = rcgen::date_time_ymd(until.0, until.1, until.2);
        let key = rcgen::KeyPair::generate().unwrap();
        params.signed_by(&key, issuer).unwrap().der().clone()
    }

    #[test]
    fn an_expired_client_certificate_of_the_ca_passes_the_handshake_and_nothing_else_new_does() {
        let (ours, theirs) = (ca(), ca());
        let mut roots = RootCertStore::empty();
        roots.add(ours.der().clone()).unwrap();
        let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider()).build().unwrap();
        let v = ExpiredToo { inner };
        let now = UnixTime::now();
        let check = |leaf: CertificateDer<'static>| v.verify_client_cert(&leaf, &[], now);
        check(client_leaf(&ours, (2020, 1, 1), (2100, 1, 1))).unwrap();
        // Expired, but the CA signed it: taken here, refused by every request (api/, amqp/).
        check(client_leaf(&ours, (2020, 1, 1), (2021, 1, 1))).unwrap();
        // Expired and of another CA; valid and of another CA; not yet valid: refused.
        for (leaf, what) in [
            (client_leaf(&theirs, (2020, 1, 1), (2021, 1, 1)), "expired, another CA"),
            (client_leaf(&theirs, (2020, 1, 1), (2100, 1, 1)), "another CA"),
            (client_leaf(&ours, (2099, 1, 1), (2100, 1, 1)), "not yet valid"),
        ] {
            assert!(check(leaf).is_err(), "{what} was taken");
        }
    }
}
