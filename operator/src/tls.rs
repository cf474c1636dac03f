//! The operator's TLS client to brokers of a cluster with `spec.tls`: rustls (ring),
//! TLS 1.2 and 1.3, the cluster's CA as the only root, the broker's host name
//! verified. No client certificate: the operator authenticates with its password.

use std::io;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;

const VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];

/// A TLS client trusting one cluster's CA. Shows nothing of it in `Debug`.
#[derive(Clone)]
pub struct ClusterTls {
    config: Arc<ClientConfig>,
}

impl std::fmt::Debug for ClusterTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterTls")
    }
}

impl ClusterTls {
    /// Trusts the CA certificates of the PEM text `ca_pem` (at least one), or says why
    /// it cannot (about the text's form, never its content).
    pub fn from_ca_pem(ca_pem: &[u8]) -> Result<Self, String> {
        let certs = CertificateDer::pem_slice_iter(ca_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("not PEM certificates: {e}"))?;
        if certs.is_empty() {
            return Err("holds no PEM certificate".to_string());
        }
        let mut roots = RootCertStore::empty();
        for cert in certs {
            roots.add(cert).map_err(|e| format!("not a usable CA certificate: {e}"))?;
        }
        let mut config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(VERSIONS)
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self { config: Arc::new(config) })
    }

    /// Connects to `host:port` and completes a handshake verifying `host`.
    pub async fn connect(&self, host: &str, port: u16) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let name = ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']').to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{host}: not a host name: {e}")))?;
        let tcp = TcpStream::connect((host.trim_start_matches('[').trim_end_matches(']'), port)).await?;
        tcp.set_nodelay(true)?;
        tokio_rustls::TlsConnector::from(self.config.clone()).connect(name, tcp).await
    }

    /// A gRPC channel to the endpoint's host over TLS, connected now.
    pub async fn channel(
        &self,
        endpoint: tonic::transport::Endpoint,
    ) -> Result<tonic::transport::Channel, tonic::transport::Error> {
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
        endpoint.connect_with_connector(connector).await
    }
}
