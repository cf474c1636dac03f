//! The /healthz, /readyz and /metrics endpoints over a real socket.

use std::sync::Arc;

use eventter_operator::metrics::Metrics;
use eventter_operator::server::{self, Health};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn get(address: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let code = response.split(' ').nth(1).unwrap().parse().unwrap();
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
    (code, body)
}

#[tokio::test]
async fn endpoints_report_health_readiness_and_metrics() {
    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(Health::new(metrics.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server::serve(listener, health.clone(), async move {
        let _ = stopped.await;
    }));

    assert_eq!(get(address, "/healthz").await.0, 200);
    assert_eq!(get(address, "/readyz").await.0, 503);
    health.set_ready(true);
    assert_eq!(get(address, "/readyz").await.0, 200);

    drop(metrics.reconcile_started("topic"));
    let (code, body) = get(address, "/metrics").await;
    assert_eq!(code, 200);
    assert!(body.contains("eventter_operator_reconciles_total{controller=\"topic\"} 1"), "{body}");
    assert!(body.contains("eventter_operator_reconcile_duration_seconds_count{controller=\"topic\"} 1"), "{body}");

    stop.send(()).unwrap();
    serving.await.unwrap().unwrap();
}
