//! The metrics and health endpoints over real HTTP on a free loopback port.

use std::io::{Read, Write};
use std::sync::Arc;

use iot_operator::telemetry::Metrics;
use iot_operator::telemetry::http::{self, Readiness};

fn get(port: u16, path: &str) -> (u16, String) {
    get_accepting(port, path, "*/*")
}

fn get_accepting(port: u16, path: &str, accept: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let code = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics() {
    let metrics = Arc::new(Metrics::new());
    let readiness = Arc::new(Readiness::default());
    let listener = http::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(http::serve(
        listener,
        metrics.clone(),
        readiness.clone(),
        async {
            let _ = rx.await;
        },
    ));
    let check = move || {
        let (h, _) = get(port, "/healthz");
        let (r, _) = get(port, "/readyz");
        (h, r)
    };
    assert_eq!(
        tokio::task::spawn_blocking(check).await.unwrap(),
        (200, 503),
        "not ready before the watches sync"
    );
    readiness.set_synced();
    assert_eq!(
        tokio::task::spawn_blocking(check).await.unwrap(),
        (200, 200)
    );
    metrics.drift_repairs.inc();
    let (code, text) = tokio::task::spawn_blocking(move || get(port, "/metrics"))
        .await
        .unwrap();
    assert_eq!(code, 200);
    assert!(
        text.contains("iot_operator_policy_drift_repairs_total 1"),
        "{text}"
    );
    assert!(text.contains("# TYPE iot_operator_leader gauge"), "{text}");
    // Without asking for OpenMetrics: text format 0.0.4, counters named by their samples.
    assert!(
        text.contains("Content-Type: text/plain; version=0.0.4")
            || text.contains("content-type: text/plain; version=0.0.4"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE iot_operator_policy_drift_repairs_total counter"),
        "{text}"
    );
    assert!(!text.contains("# EOF"), "{text}");
    // Prometheus asks for OpenMetrics and gets it.
    let (code, om) = tokio::task::spawn_blocking(move || {
        get_accepting(
            port,
            "/metrics",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        )
    })
    .await
    .unwrap();
    assert_eq!(code, 200);
    assert!(om.contains("application/openmetrics-text"), "{om}");
    assert!(
        om.contains("# TYPE iot_operator_policy_drift_repairs counter"),
        "{om}"
    );
    assert!(om.ends_with("# EOF\n"), "{om}");
    let (code, _) = tokio::task::spawn_blocking(move || get(port, "/nope"))
        .await
        .unwrap();
    assert_eq!(code, 404);
    let _ = tx.send(());
    server.await.unwrap();
}
