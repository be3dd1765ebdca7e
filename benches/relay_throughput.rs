//! Relay throughput on loopback, compared in the same run with the single-broker ceiling:
//!   (relay)   publisher -> Mosquitto A -> iot-operator relay -> Mosquitto B -> subscriber
//!   (ceiling) publisher -> Mosquitto B -> subscriber
//! for QoS 0 and QoS 1 with 100-byte payloads. Prints a table; run with
//! `cargo bench --bench relay_throughput` (after `bash tests/run.sh` has installed Mosquitto).
//! Environment: BENCH_MESSAGES (default 50000).

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use iot_operator::api::{Direction, RetainHandling};
use iot_operator::bridge::topic::{TopicFilter, TopicTemplate};
use iot_operator::bridge::{Endpoint, RelayConfig, RelayManager, RouteConfig, SideState};
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, Outgoing, QoS};
use support::Mosquitto;

/// Publishes `n` messages as fast as the broker takes them and counts what the subscriber gets.
/// `prefix` is the topic prefix published to; the subscriber reads `out/#`.
async fn run_case(
    pub_port: u16,
    sub_port: u16,
    prefix: &str,
    qos: QoS,
    n: usize,
    payload: usize,
) -> (f64, usize) {
    let mut so = MqttOptions::new(
        format!("bench-sub-{}", fastrand::u32(..)),
        "127.0.0.1",
        sub_port,
    );
    so.set_max_packet_size(1 << 20, 1 << 20);
    so.set_inflight(1000);
    let (sub, mut sub_loop) = AsyncClient::new(so, 10_000);
    sub.subscribe("out/#", qos).await.unwrap();
    loop {
        if let Ok(Event::Incoming(Incoming::SubAck(_))) = sub_loop.poll().await {
            break;
        }
    }
    let counter = tokio::spawn(async move {
        let mut got = 0usize;
        let mut last = Instant::now();
        loop {
            match tokio::time::timeout(Duration::from_secs(3), sub_loop.poll()).await {
                Ok(Ok(Event::Incoming(Incoming::Publish(_)))) => {
                    got += 1;
                    last = Instant::now();
                    if got >= n {
                        break;
                    }
                }
                Ok(Ok(_)) => {}
                _ => break,
            }
        }
        (got, last)
    });
    let mut po = MqttOptions::new(
        format!("bench-pub-{}", fastrand::u32(..)),
        "127.0.0.1",
        pub_port,
    );
    po.set_inflight(100);
    po.set_max_packet_size(1 << 20, 1 << 20);
    let (publisher, mut pub_loop) = AsyncClient::new(po, 10_000);
    let body = vec![b'x'; payload];
    let start = Instant::now();
    let prefix = prefix.to_owned();
    let feeder = tokio::spawn(async move {
        for i in 0..n {
            publisher
                .publish(format!("{prefix}/{}", i % 8), qos, false, body.clone())
                .await
                .unwrap();
        }
        publisher
    });
    let mut done = 0;
    while done < n {
        match pub_loop.poll().await {
            Ok(Event::Incoming(Incoming::PubAck(_))) if qos == QoS::AtLeastOnce => done += 1,
            Ok(Event::Outgoing(Outgoing::Publish(_))) if qos == QoS::AtMostOnce => done += 1,
            Ok(_) => {}
            Err(e) => panic!("publisher: {e}"),
        }
    }
    let _publisher = feeder.await.unwrap();
    // Keep the publisher's connection serviced while the tail drains.
    let drain = tokio::spawn(async move { while pub_loop.poll().await.is_ok() {} });
    let (got, last) = counter.await.unwrap();
    drain.abort();
    let secs = last.duration_since(start).as_secs_f64();
    (got as f64 / secs, got)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::var("BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let a = Mosquitto::start(false);
    let b = Mosquitto::start(false);
    let routes = vec![RouteConfig {
        name: "bench".into(),
        filter: TopicFilter::parse("in/#").unwrap(),
        template: TopicTemplate::parse("out/{topic}", &TopicFilter::parse("in/#").unwrap())
            .unwrap(),
        qos: 1,
        retain: RetainHandling::Preserve,
        direction: Direction::In,
    }];
    let mut cfg = RelayConfig::new(
        "bench/relay",
        Endpoint::new(a.tcp_url(), "bench-relay-src"),
        Endpoint::new(b.tcp_url(), "bench-relay-snk"),
        routes,
    );
    cfg.reconnect_min = Duration::from_millis(100);
    let manager = Arc::new(RelayManager::new(Some(Arc::new(
        iot_operator::telemetry::Metrics::new(),
    ))));
    let mut view = manager.ensure("bench/relay", 1, cfg).await.unwrap();
    view.status
        .wait_for(|s| s.source == SideState::Connected && s.sink == SideState::Connected)
        .await
        .unwrap();

    println!("| case | path | delivered msg/s | delivered | lost |");
    println!("|---|---|---:|---:|---:|");
    for (name, qos) in [
        ("QoS 0, 100 B", QoS::AtMostOnce),
        ("QoS 1, 100 B", QoS::AtLeastOnce),
    ] {
        // The ceiling publishes straight to B on the topics the subscriber reads.
        let (ceiling, c_got) = run_case(b.tcp_port, b.tcp_port, "out/in", qos, n, 100).await;
        let (relay, r_got) = run_case(a.tcp_port, b.tcp_port, "in", qos, n, 100).await;
        println!(
            "| {name} | single broker (ceiling) | {ceiling:.0} | {c_got} | {} |",
            n - c_got
        );
        println!("| {name} | relay | {relay:.0} | {r_got} | {} |", n - r_got);
        println!("| {name} | relay / ceiling | {:.2} | | |", relay / ceiling);
    }
    manager.stop_all().await;
}
