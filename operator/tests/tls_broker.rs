//! The operator's TLS client (`spec.tls`) against a real in-process broker serving
//! TLS with a certificate the operator's own CA code issued (127.0.0.67:28450, metrics
//! on 28451): the operator's calls verify the broker against the cluster's CA (and
//! its address, here an IP the certificate names); plaintext and another CA fail; the metrics port's plain-HTTP health answers
//! the probes use (`/readyz`, `/livez`) work while the gRPC port speaks only TLS.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use eventter_operator::broker::BrokerConnector;
use eventter_operator::certificates::Ca;
use eventter_operator::credentials::{BrokerCredentials, OPERATOR_USER};
use eventter_operator::tls::ClusterTls;
use eventtermq_broker::config::NodeConfig;
use eventtermq_broker::transport::tls::{NodeTls, TlsSettings};
use tokio_util::sync::CancellationToken;

const ADDR: &str = "127.0.0.67:28450";
const METRICS_ADDR: &str = "127.0.0.67:28451";

fn http_get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_reaches_a_tls_broker_only_with_its_clusters_ca() {
    let now = SystemTime::now();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("EventterMQ cluster CA test/emq", now, Duration::from_secs(3600)).unwrap();
    let (cert, key) =
        ca.issue(&["127.0.0.67".to_string(), "localhost".to_string()], now, Duration::from_secs(3600)).unwrap();
    let path = |name: &str| dir.path().join(name);
    std::fs::write(path("ca.crt"), ca.cert_pem()).unwrap();
    std::fs::write(path("node.crt"), cert).unwrap();
    std::fs::write(path("node.key"), key).unwrap();
    let settings = TlsSettings {
        cert_file: path("node.crt"),
        key_file: path("node.key"),
        ca_file: path("ca.crt"),
        client_ca_file: None,
        reload_interval_ms: TlsSettings::DEFAULT_RELOAD_INTERVAL_MS,
        handshake_timeout_ms: TlsSettings::DEFAULT_HANDSHAKE_TIMEOUT_MS,
        handshakes_in_flight_max: TlsSettings::DEFAULT_HANDSHAKES_IN_FLIGHT_MAX,
    };
    let node_tls = NodeTls::load(&settings).unwrap();

    let addr: SocketAddr = ADDR.parse().unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut config = NodeConfig::new(data.path(), addr.to_string(), addr.to_string());
    config.raft.election_timeout_min_ms = 200;
    config.raft.election_timeout_max_ms = 300;
    config.bootstrap_admin = Some(eventtermq_broker::config::BootstrapAdmin {
        name: OPERATOR_USER.into(),
        password_hash: eventtermq_broker::auth::password::hash(common::OPERATOR_PASSWORD).unwrap(),
    });
    let (network, listeners) =
        eventtermq_broker::transport::tcp::bind(addr, Duration::from_secs(1), Some(&node_tls)).await.unwrap();
    let shutdown = CancellationToken::new();
    let node = eventtermq_broker::node::start(config, network, listeners, shutdown.clone()).await.unwrap();
    let metrics = tokio::net::TcpListener::bind(METRICS_ADDR).await.unwrap();
    tokio::spawn(eventtermq_broker::api::metrics::serve(metrics, node.observer.clone(), shutdown.clone()));

    let password = BrokerCredentials::new(OPERATOR_USER, common::OPERATOR_PASSWORD).unwrap();
    let with_ca = password.clone().with_tls(Some(ClusterTls::from_ca_pem(ca.cert_pem().as_bytes()).unwrap()));
    let connector = BrokerConnector::default();
    // The node answers once it leads: the operator's Dump over TLS.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let answer = match connector.connect(ADDR, &with_ca).await {
            Ok(mut admin) => admin.dump().await,
            Err(error) => Err(error),
        };
        match answer {
            Ok(dump) if dump.leader_id != 0 => break,
            other if tokio::time::Instant::now() > deadline => panic!("no Dump over TLS: {other:?}"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }

    // Plaintext to the TLS port: no answer.
    let plain = match connector.connect(ADDR, &password).await {
        Ok(mut admin) => admin.dump().await.map(|_| ()),
        Err(error) => Err(error),
    };
    assert!(plain.is_err(), "plaintext must not reach a TLS port");
    // Another CA: the handshake fails on the broker's certificate.
    let other = Ca::generate("other", now, Duration::from_secs(3600)).unwrap();
    let other_ca = password.clone().with_tls(Some(ClusterTls::from_ca_pem(other.cert_pem().as_bytes()).unwrap()));
    let error = connector.connect(ADDR, &other_ca).await.err().expect("another CA's client must fail");
    assert!(format!("{error}").contains("UnknownIssuer") || format!("{error}").contains("certificate"), "{error}");
    // What the CA cannot be.
    assert_eq!(ClusterTls::from_ca_pem(b"nothing").unwrap_err(), "holds no PEM certificate");

    // The probes' endpoints, plain HTTP on the metrics port: ready once the node leads
    // and caught up after its start (`catching up …` until then).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let ready = http_get(METRICS_ADDR, "/readyz");
        if ready.starts_with("HTTP/1.0 200") || ready.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(ready.contains("catching up") && tokio::time::Instant::now() < deadline, "{ready}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let live = http_get(METRICS_ADDR, "/livez");
    assert!(live.contains(" 200 "), "{live}");
    assert!(http_get(METRICS_ADDR, "/nothing").contains(" 404 "));

    shutdown.cancel();
    node.wait().await;
}
