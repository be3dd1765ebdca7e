//! The relay end to end, against real Mosquitto processes started by the tests: an AWS IoT
//! source (Mosquitto's websockets listener behind a proxy that checks the SigV4 signature with
//! botocore), third-party ws:// and mqtt:// sources, and Mosquitto TCP sinks.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use iot_operator::api::TopicBridgeSpec;
use iot_operator::aws::{AwsClients, AwsSettings};
use iot_operator::convert::topic_bridge::{
    BuiltRelay, RelaySettings, SecretError, SecretFuture, SecretSource, build_relay,
    connection_client_id,
};
use iot_operator::relay::manager::RelayView;
use iot_operator::relay::{ConnectionKey, RelayManager, SideState};
use rumqttc::QoS;
use serde_json::{Value, json};
use support::mqtt::{Collector, publish_all};
use support::tls::{TlsCerts, tls_certs};
use support::{Mosquitto, Proc, logs, start_python, test_sdk_config};

// ---------- peers and helpers ----------

#[derive(Default)]
struct MapSecrets(Mutex<HashMap<(String, String), Vec<u8>>>);

impl MapSecrets {
    fn set(&self, name: &str, key: &str, value: &str) {
        self.0
            .lock()
            .unwrap()
            .insert((name.into(), key.into()), value.as_bytes().to_vec());
    }
}

impl SecretSource for MapSecrets {
    fn get<'a>(&'a self, name: &'a str, key: &'a str) -> SecretFuture<'a> {
        let v = self
            .0
            .lock()
            .unwrap()
            .get(&(name.to_owned(), key.to_owned()))
            .cloned();
        Box::pin(async move {
            v.ok_or_else(|| SecretError::MissingKey {
                name: name.to_owned(),
                key: key.to_owned(),
            })
        })
    }
}

/// The SigV4-checking proxy in front of a websockets listener.
struct SigV4Proxy {
    port: u16,
    creds: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
    _proc: Proc,
}

impl SigV4Proxy {
    fn start(upstream_ws: u16, creds: Value) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let creds_path = dir.path().join("creds.json");
        let log = dir.path().join("log.jsonl");
        std::fs::write(&creds_path, creds.to_string()).unwrap();
        std::fs::write(&log, "").unwrap();
        let (proc, port) = start_python(
            "sigv4_proxy.py",
            &[
                &upstream_ws.to_string(),
                creds_path.to_str().unwrap(),
                log.to_str().unwrap(),
            ],
        );
        Self {
            port: port.parse().expect("proxy port"),
            creds: creds_path,
            log,
            _dir: dir,
            _proc: proc,
        }
    }

    fn set_creds(&self, creds: Value) {
        std::fs::write(&self.creds, creds.to_string()).unwrap();
    }

    fn decisions(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

fn spec(value: Value) -> TopicBridgeSpec {
    serde_json::from_value(value).expect("spec")
}

/// The relay of bridge `test/<name>`, as the controller builds it (AWS unreachable).
async fn build(name: &str, spec: &TopicBridgeSpec, secrets: Arc<MapSecrets>) -> BuiltRelay {
    let routes = spec.validate().expect("valid spec");
    let aws = AwsClients::from_config(
        test_sdk_config("http://127.0.0.1:9"),
        AwsSettings::default(),
        None,
    );
    let settings = RelaySettings {
        window: 100,
        drain_timeout: Duration::from_secs(5),
        aws_iot_scheme: "ws".into(),
        ..RelaySettings::default()
    };
    build_relay("test", name, spec, routes, secrets, &aws, &settings)
        .await
        .expect("built")
}

async fn start_relay(
    manager: &RelayManager,
    name: &str,
    spec: &TopicBridgeSpec,
    secrets: Arc<MapSecrets>,
) -> RelayView {
    let mut built = build(name, spec, secrets).await;
    built.config.reconnect_min = Duration::from_millis(100);
    built.config.reconnect_max = Duration::from_millis(500);
    manager
        .ensure(
            &ConnectionKey::new(format!("test/{name}"), 0),
            built.fingerprint,
            built.config,
        )
        .await
        .expect("the manager is not paused")
}

async fn wait_connected(view: &mut RelayView, timeout: Duration) {
    let ok = tokio::time::timeout(
        timeout,
        view.status
            .wait_for(|s| s.source == SideState::Connected && s.sink == SideState::Connected),
    )
    .await
    .is_ok();
    assert!(ok, "relay not connected: {:?}", *view.status.borrow());
}

/// Per topic: every sequence number 0..per_topic arrived, and first arrivals are in order.
fn check_stream(
    received: &[support::mqtt::Received],
    topics: &[String],
    per_topic: usize,
) -> (usize, usize) {
    count_stream(received, topics, per_topic, true)
}

/// Per topic: (lost, duplicates); with `in_order`, asserts that first arrivals are in order.
fn count_stream(
    received: &[support::mqtt::Received],
    topics: &[String],
    per_topic: usize,
    in_order: bool,
) -> (usize, usize) {
    let mut by_topic: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for r in received {
        let n: usize = std::str::from_utf8(&r.payload).unwrap().parse().unwrap();
        by_topic.entry(r.topic.as_str()).or_default().push(n);
    }
    let mut lost = 0;
    let mut dups = 0;
    for t in topics {
        let seen = by_topic.get(t.as_str()).cloned().unwrap_or_default();
        let mut first = Vec::new();
        let mut set = HashSet::new();
        for n in &seen {
            if set.insert(*n) {
                first.push(*n);
            } else {
                dups += 1;
            }
        }
        assert!(
            !in_order || first.windows(2).all(|w| w[0] < w[1]),
            "{t}: out of order"
        );
        lost += per_topic - set.len();
    }
    (lost, dups)
}

fn stream(
    prefix: &str,
    topics: usize,
    per_topic: usize,
) -> (Vec<support::mqtt::Outgoing>, Vec<String>) {
    let mut msgs = Vec::new();
    for seq in 0..per_topic {
        for t in 0..topics {
            msgs.push((
                format!("{prefix}/d{t}/telemetry"),
                seq.to_string().into_bytes(),
                false,
            ));
        }
    }
    (msgs, (0..topics).map(|t| format!("d{t}")).collect())
}

const AKID: &str = "AKIATESTBRIDGE000001";
const SECRET: &str = "s3cr3t/Key+Value0123456789abcdefghijKLMN";
const TOKEN: &str = "SessionToken//ZZ+unique-token-value==";

fn aws_spec(proxy_port: u16, sink_url: &str, routes: Value) -> TopicBridgeSpec {
    spec(json!({
        "source": {"awsIot": {"endpoint": format!("127.0.0.1:{proxy_port}"), "region": "eu-west-1",
                   "credentials": {"secret": {"name": "aws"}}}},
        "sink": {"url": sink_url, "credentialsSecret": {"name": "sink"}},
        "routes": routes,
    }))
}

fn aws_secrets(akid: &str, secret: &str, token: &str) -> Arc<MapSecrets> {
    let s = Arc::new(MapSecrets::default());
    s.set("aws", "AWS_ACCESS_KEY_ID", akid);
    s.set("aws", "AWS_SECRET_ACCESS_KEY", secret);
    s.set("aws", "AWS_SESSION_TOKEN", token);
    s.set("sink", "username", "relay");
    s.set("sink", "password", "sink-password-Quokka-42");
    s
}

// ---------- tests ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_aws_source_relays_10000_qos1_messages_in_order() {
    logs();
    let source = Mosquitto::start(true);
    let sink = Mosquitto::start(false);
    let proxy = SigV4Proxy::start(
        source.ws_port.unwrap(),
        json!({AKID: {"secret": SECRET, "token": TOKEN}}),
    );
    let collector = Collector::start(sink.tcp_port, "collector-10k", "cluster/#", true).await;
    let metrics = Arc::new(iot_operator::telemetry::Metrics::new());
    let manager = RelayManager::new(Some(metrics.clone()));
    let s = aws_spec(
        proxy.port,
        &sink.tcp_url(),
        json!([{"from": "devices/+/telemetry", "to": "cluster/{2}/telemetry", "qos": 1}]),
    );
    let mut view = start_relay(&manager, "tenk", &s, aws_secrets(AKID, SECRET, TOKEN)).await;
    wait_connected(&mut view, Duration::from_secs(15)).await;

    let (msgs, ids) = stream("devices", 5, 2000);
    let topics: Vec<String> = ids
        .iter()
        .map(|d| format!("cluster/{d}/telemetry"))
        .collect();
    let start = Instant::now();
    publish_all(source.tcp_port, "publisher-10k", msgs, QoS::AtLeastOnce).await;
    assert!(
        collector.wait_for(10_000, Duration::from_secs(90)).await,
        "only {} arrived",
        collector.count()
    );
    let elapsed = start.elapsed();
    let (lost, dups) = check_stream(&collector.snapshot(), &topics, 2000);
    assert_eq!(lost, 0);
    println!(
        "FIGURES e2e_signed qos1 messages=10000 seconds={:.2} rate={:.0}/s duplicates={dups}",
        elapsed.as_secs_f64(),
        10_000.0 / elapsed.as_secs_f64()
    );
    let decisions = proxy.decisions();
    assert!(
        decisions
            .iter()
            .any(|d| d["ok"] == true && d["akid"] == AKID),
        "{decisions:?}"
    );
    assert!(decisions.iter().all(|d| d["ok"] == true), "{decisions:?}");
    // The relay counts a message when the sink acknowledges it, which can trail the delivery.
    let start = Instant::now();
    while view.stats.relayed() < 10_000 && start.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(view.stats.relayed(), 10_000 + dups as u64);
    let text = metrics.encode();
    let line = format!(
        "iot_operator_bridge_messages_relayed_total{{bridge=\"test/tenk\",direction=\"in\"}} {}",
        10_000 + dups
    );
    assert!(text.contains(&line), "{text}");
    assert!(
        text.contains("iot_operator_bridge_connected{bridge=\"test/tenk\",side=\"source\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("iot_operator_bridge_relay_latency_seconds_count{bridge=\"test/tenk\"}"),
        "{text}"
    );
    manager.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn third_party_ws_source_templates_out_route_and_retained_messages() {
    logs();
    let source = Mosquitto::start(true);
    let sink = Mosquitto::start(false);
    // Retained messages waiting on the source before the bridge starts.
    publish_all(
        source.tcp_port,
        "retainer",
        vec![
            ("keep/r1".into(), b"kept".to_vec(), true),
            ("skip/r2".into(), b"skipped".to_vec(), true),
        ],
        QoS::AtLeastOnce,
    )
    .await;
    let s = spec(json!({
        "source": {"mqtt": {"url": source.ws_url()}},
        "sink": {"url": sink.tcp_url()},
        "routes": [
            {"from": "a/+/b", "to": "x/{2}/{topic}"},
            {"from": "keep/#", "retain": "Preserve"},
            {"from": "skip/#", "to": "skipped/{topic}", "retain": "SkipRetained"},
            {"from": "cmd/#", "to": "remote/{topic}", "direction": "out"}
        ]
    }));
    let sink_all = Collector::start(sink.tcp_port, "sink-all", "#", false).await;
    let source_remote = Collector::start(source.tcp_port, "source-remote", "remote/#", false).await;
    let manager = RelayManager::new(None);
    let mut view = start_relay(&manager, "plain", &s, Arc::new(MapSecrets::default())).await;
    wait_connected(&mut view, Duration::from_secs(15)).await;

    publish_all(
        source.tcp_port,
        "p1",
        vec![("a/7/b".into(), b"\x00\x01binary\xff".to_vec(), false)],
        QoS::AtLeastOnce,
    )
    .await;
    publish_all(
        sink.tcp_port,
        "p2",
        vec![("cmd/go".into(), b"go".to_vec(), false)],
        QoS::AtLeastOnce,
    )
    .await;
    assert!(
        sink_all.wait_for(2, Duration::from_secs(10)).await,
        "{:?}",
        sink_all.snapshot()
    );
    assert!(source_remote.wait_for(1, Duration::from_secs(10)).await);
    let got = sink_all.snapshot();
    let templated = got
        .iter()
        .find(|m| m.topic == "x/7/a/7/b")
        .expect("templated topic");
    assert_eq!(
        &templated.payload[..],
        b"\x00\x01binary\xff",
        "payload passes byte for byte"
    );
    assert!(got.iter().any(|m| m.topic == "keep/r1"));
    assert!(
        !got.iter().any(|m| m.topic.starts_with("skipped/")),
        "SkipRetained relayed a retained message"
    );
    assert_eq!(source_remote.snapshot()[0].topic, "remote/cmd/go");
    // A new subscriber on the sink gets the relayed message as retained.
    let late = Collector::start(sink.tcp_port, "late", "keep/#", false).await;
    assert!(late.wait_for(1, Duration::from_secs(5)).await);
    assert!(late.snapshot()[0].retain, "retain flag preserved");
    manager.stop_all().await;
}

/// 5,000 QoS 1 messages with the sink broker restarted in the middle: none lost. `version` is
/// the MQTT version the relay speaks on both sides.
async fn sink_restart_loses_nothing(version: &str) {
    logs();
    let source = Mosquitto::start(false);
    let mut sink = Mosquitto::start(false);
    let name = format!("restart-v{}", version.replace('.', ""));
    let collector = Collector::start(
        sink.tcp_port,
        &format!("collector-{name}"),
        "cluster/#",
        true,
    )
    .await;
    let s = spec(json!({
        "source": {"mqtt": {"url": source.tcp_url()}, "protocolVersion": version},
        "sink": {"url": sink.tcp_url(), "protocolVersion": version},
        "routes": [{"from": "devices/+/telemetry", "to": "cluster/{2}/telemetry"}]
    }));
    let manager = RelayManager::new(None);
    let mut view = start_relay(&manager, &name, &s, Arc::new(MapSecrets::default())).await;
    wait_connected(&mut view, Duration::from_secs(15)).await;

    let (msgs, ids) = stream("devices", 4, 1250);
    let topics: Vec<String> = ids
        .iter()
        .map(|d| format!("cluster/{d}/telemetry"))
        .collect();
    let port = source.tcp_port;
    let publisher_id = format!("publisher-{name}");
    let publisher =
        tokio::spawn(async move { publish_all(port, &publisher_id, msgs, QoS::AtLeastOnce).await });
    assert!(collector.wait_for(1000, Duration::from_secs(30)).await);
    sink.terminate();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    sink.restart();
    publisher.await.unwrap();
    let arrived = collector
        .wait_for_distinct(5000, Duration::from_secs(60))
        .await;
    let (lost, dups) = check_stream(&collector.snapshot(), &topics, 1250);
    let reconnects = view
        .stats
        .reconnects
        .load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "FIGURES sink_restart mqtt {version} qos1 messages=5000 lost={lost} duplicates={dups} reconnects={reconnects}"
    );
    assert!(arrived, "only {} arrived", collector.count());
    assert_eq!(lost, 0, "messages lost across the sink restart");
    assert!(reconnects >= 1);
    manager.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_restart_mid_stream_loses_nothing() {
    sink_restart_loses_nothing("3.1.1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_restart_without_session_resubscribes() {
    logs();
    // No persistence: the restarted source has no session, so the relay must subscribe again.
    let mut source = Mosquitto::start_with(false, "persistence false\n");
    let sink = Mosquitto::start(false);
    let collector = Collector::start(sink.tcp_port, "collector-src", "#", false).await;
    let s = spec(
        json!({"source": {"mqtt": {"url": source.tcp_url()}, "persistentSession": false}, "sink": {"url": sink.tcp_url()},
        "routes": [{"from": "up/#"}]}),
    );
    let manager = RelayManager::new(None);
    let mut view = start_relay(&manager, "srcrestart", &s, Arc::new(MapSecrets::default())).await;
    wait_connected(&mut view, Duration::from_secs(15)).await;
    publish_all(
        source.tcp_port,
        "before",
        vec![("up/1".into(), b"1".to_vec(), false)],
        QoS::AtLeastOnce,
    )
    .await;
    assert!(collector.wait_for(1, Duration::from_secs(10)).await);

    source.terminate();
    source.restart();
    // Publish probes until the relay's new subscription is in place.
    let start = Instant::now();
    while collector.count() < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the relay did not resubscribe: {:?}",
            *view.status.borrow()
        );
        publish_all(
            source.tcp_port,
            "after",
            vec![("up/2".into(), b"2".to_vec(), false)],
            QoS::AtLeastOnce,
        )
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(collector.snapshot().iter().any(|m| m.topic == "up/2"));
    assert!(
        view.stats
            .reconnects
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    manager.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_credentials_sign_the_next_connection() {
    logs();
    let mut source = Mosquitto::start(true);
    let sink = Mosquitto::start(false);
    let proxy = SigV4Proxy::start(
        source.ws_port.unwrap(),
        json!({AKID: {"secret": SECRET, "token": TOKEN}}),
    );
    let collector = Collector::start(sink.tcp_port, "collector-rot", "#", false).await;
    let secrets = aws_secrets(AKID, SECRET, TOKEN);
    let s = aws_spec(proxy.port, &sink.tcp_url(), json!([{"from": "t/#"}]));
    let manager = RelayManager::new(None);
    let mut view = start_relay(&manager, "rotate", &s, secrets.clone()).await;
    wait_connected(&mut view, Duration::from_secs(15)).await;

    // Rotate: only the new key is accepted from now on.
    const NEW: &str = "AKIATESTBRIDGE000002";
    secrets.set("aws", "AWS_ACCESS_KEY_ID", NEW);
    secrets.set("aws", "AWS_SECRET_ACCESS_KEY", "another/secret+key");
    secrets.set("aws", "AWS_SESSION_TOKEN", "token-two");
    proxy.set_creds(json!({NEW: {"secret": "another/secret+key", "token": "token-two"}}));
    source.terminate();
    source.restart();
    let start = Instant::now();
    while collector.count() < 1 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no relay after rotation: {:?} {:?}",
            *view.status.borrow(),
            proxy.decisions()
        );
        publish_all(
            source.tcp_port,
            "rot-pub",
            vec![("t/x".into(), b"x".to_vec(), false)],
            QoS::AtLeastOnce,
        )
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let decisions = proxy.decisions();
    let last_ok = decisions
        .iter()
        .rev()
        .find(|d| d["ok"] == true)
        .expect("an accepted connection");
    assert_eq!(last_ok["akid"], NEW, "{decisions:?}");
    manager.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_signature_is_rejected_and_reported_without_secrets() {
    logs();
    let source = Mosquitto::start(true);
    let sink = Mosquitto::start(false);
    let proxy = SigV4Proxy::start(
        source.ws_port.unwrap(),
        json!({AKID: {"secret": SECRET, "token": TOKEN}}),
    );
    let wrong = "WRONG/secret+value-Platypus-77";
    let s = aws_spec(proxy.port, &sink.tcp_url(), json!([{"from": "t/#"}]));
    let manager = RelayManager::new(None);
    let mut view = start_relay(&manager, "wrong", &s, aws_secrets(AKID, wrong, TOKEN)).await;
    let waited = tokio::time::timeout(
        Duration::from_secs(10),
        view.status.wait_for(|s| {
            s.last_error
                .as_ref()
                .is_some_and(|e| e.message.contains("source"))
        }),
    )
    .await
    .is_ok();
    assert!(waited, "no error reported");
    let status = view.status.borrow().clone();
    assert_ne!(status.source, SideState::Connected);
    let err = status.last_error.expect("an error").message;
    assert!(
        err.contains("403") && err.contains("check the credentials, the region"),
        "{err}"
    );
    for secret in [wrong, TOKEN, "X-Amz-Signature"] {
        assert!(!err.contains(secret), "status error leaks {secret}: {err}");
    }
    assert!(proxy.decisions().iter().any(|d| d["reason"] == "signature"));
    manager.stop_all().await;
}

#[test]
fn an_expired_signature_is_rejected() {
    let source = Mosquitto::start(true);
    let proxy = SigV4Proxy::start(
        source.ws_port.unwrap(),
        json!({AKID: {"secret": SECRET, "token": null}}),
    );
    let creds = aws_credential_types::Credentials::new(AKID, SECRET, None, None, "t");
    let host = format!("127.0.0.1:{}", proxy.port);
    let status_of = |time: SystemTime| {
        let url = iot_operator::aws::sigv4::presign_iot_url(
            &host,
            "eu-west-1",
            &creds,
            time,
            Duration::from_secs(300),
        )
        .unwrap();
        let path = &url[url.find("/mqtt").unwrap()..];
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(conn, "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n").unwrap();
        let mut buf = [0u8; 64];
        let n = conn.read(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n])
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned()
    };
    assert!(
        status_of(SystemTime::now()).contains("101"),
        "a fresh signature is accepted"
    );
    assert!(
        status_of(SystemTime::now() - Duration::from_secs(3600)).contains("403"),
        "an expired one is not"
    );
    let decisions = proxy.decisions();
    assert_eq!(decisions.last().unwrap()["reason"], "expired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_values_never_reach_the_logs() {
    let buffer = logs();
    let source = Mosquitto::start(true);
    let sink = Mosquitto::start(false);
    let proxy = SigV4Proxy::start(
        source.ws_port.unwrap(),
        json!({AKID: {"secret": SECRET, "token": TOKEN}}),
    );
    let collector = Collector::start(sink.tcp_port, "collector-scan", "#", false).await;
    let s = aws_spec(proxy.port, &sink.tcp_url(), json!([{"from": "scan/#"}]));
    let manager = RelayManager::new(None);
    let mut view = start_relay(&manager, "scan", &s, aws_secrets(AKID, SECRET, TOKEN)).await;
    wait_connected(&mut view, Duration::from_secs(15)).await;
    publish_all(
        source.tcp_port,
        "scan-pub",
        vec![("scan/1".into(), b"1".to_vec(), false)],
        QoS::AtLeastOnce,
    )
    .await;
    assert!(collector.wait_for(1, Duration::from_secs(10)).await);
    manager.stop_all().await;
    let text = String::from_utf8_lossy(&buffer.0.lock().unwrap()).to_string();
    assert!(
        text.contains("connected"),
        "the capture works: {}",
        &text[..text.len().min(500)]
    );
    let encoded_token: String = url::form_urlencoded::byte_serialize(TOKEN.as_bytes()).collect();
    for secret in [
        SECRET,
        TOKEN,
        encoded_token.as_str(),
        "sink-password-Quokka-42",
        "X-Amz-Signature=",
    ] {
        assert!(!text.contains(secret), "the logs contain {secret}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_spec_restarts_the_relay_after_draining_without_loss() {
    logs();
    let source = Mosquitto::start(false);
    let sink = Mosquitto::start(false);
    let collector = Collector::start(sink.tcp_port, "collector-change", "#", true).await;
    let manager = RelayManager::new(None);
    let old = spec(
        json!({"source": {"mqtt": {"url": source.tcp_url()}}, "sink": {"url": sink.tcp_url()},
        "routes": [{"from": "devices/+/telemetry", "to": "old/{2}"}]}),
    );
    let mut view = start_relay(&manager, "change", &old, Arc::new(MapSecrets::default())).await;
    wait_connected(&mut view, Duration::from_secs(15)).await;
    let (msgs, _) = stream("devices", 2, 1500);
    let port = source.tcp_port;
    let publisher =
        tokio::spawn(
            async move { publish_all(port, "publisher-change", msgs, QoS::AtLeastOnce).await },
        );
    assert!(collector.wait_for(500, Duration::from_secs(30)).await);
    // The new spec renames the destination; the old relay drains, the new one takes over the
    // same persistent session.
    let new = spec(
        json!({"source": {"mqtt": {"url": source.tcp_url()}}, "sink": {"url": sink.tcp_url()},
        "routes": [{"from": "devices/+/telemetry", "to": "new/{2}"}]}),
    );
    let mut view2 = start_relay(&manager, "change", &new, Arc::new(MapSecrets::default())).await;
    assert!(view2.started, "a changed spec restarts the relay");
    wait_connected(&mut view2, Duration::from_secs(15)).await;
    publisher.await.unwrap();
    // One message surely after the change (the stream may have ended before it on a fast run).
    publish_all(
        port,
        "publisher-late",
        vec![("devices/late/telemetry".into(), b"late".to_vec(), false)],
        QoS::AtLeastOnce,
    )
    .await;
    // Every (device, sequence) arrives under the old or the new name.
    let start = Instant::now();
    let covered = |c: &Collector| {
        c.snapshot()
            .iter()
            .filter_map(|m| {
                Some((
                    m.topic.split('/').nth(1)?.to_owned(),
                    String::from_utf8_lossy(&m.payload).to_string(),
                ))
            })
            .collect::<HashSet<_>>()
            .len()
    };
    while covered(&collector) < 3001 && start.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = collector.snapshot();
    assert_eq!(
        covered(&collector),
        3001,
        "messages lost across the restart"
    );
    assert!(
        got.iter().any(|m| m.topic.starts_with("old/"))
            && got.iter().any(|m| m.topic.starts_with("new/"))
    );
    let again = start_relay(&manager, "change", &new, Arc::new(MapSecrets::default())).await;
    assert!(!again.started, "an unchanged spec keeps the running relay");
    manager.stop_all().await;
    assert!(manager.keys().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_command_relays_every_bridge_of_a_manifest_and_drains_on_sigterm() {
    let source = Mosquitto::start(true);
    let sink = Mosquitto::start(false);
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("secrets/sink-creds")).unwrap();
    std::fs::write(dir.path().join("secrets/sink-creds/username"), "relay").unwrap();
    std::fs::write(
        dir.path().join("secrets/sink-creds/password"),
        "cli-password-Wombat-9",
    )
    .unwrap();
    let manifest = json!({"apiVersion": "iot.operator.dev/v1alpha1", "kind": "TopicBridge",
        "metadata": {"name": "cli", "namespace": "default"},
        "spec": {"source": {"mqtt": {"url": source.ws_url()}}, "sink": {"url": sink.tcp_url(), "credentialsSecret": {"name": "sink-creds"}},
                 "routes": [{"from": "cli/#", "to": "relayed/{topic}"}]}});
    // A second bridge in the same manifest, as its own YAML document.
    let second = json!({"apiVersion": "iot.operator.dev/v1alpha1", "kind": "TopicBridge",
        "metadata": {"name": "cli-two", "namespace": "default"},
        "spec": {"source": {"mqtt": {"url": source.tcp_url()}}, "sink": {"url": sink.tcp_url()},
                 "routes": [{"from": "two/#", "to": "relayed/{topic}"}]}});
    let file = dir.path().join("bridge.yaml");
    std::fs::write(
        &file,
        format!(
            "{}---\n{}",
            serde_yaml::to_string(&manifest).unwrap(),
            serde_yaml::to_string(&second).unwrap()
        ),
    )
    .unwrap();
    let collector = Collector::start(sink.tcp_port, "collector-cli", "relayed/#", false).await;
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_iot-operator"))
        .args([
            "bridge",
            "-f",
            file.to_str().unwrap(),
            "--secrets-dir",
            dir.path().join("secrets").to_str().unwrap(),
        ])
        .env("AWS_REGION", "eu-west-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Proc::from_child(child, "iot-operator bridge");
    let start = Instant::now();
    let topics = || {
        collector
            .snapshot()
            .into_iter()
            .map(|m| m.topic)
            .collect::<HashSet<_>>()
    };
    while topics().len() < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the bridge command relayed {:?}, not both bridges' messages",
            topics()
        );
        publish_all(
            source.tcp_port,
            "cli-pub",
            vec![
                ("cli/a".into(), b"a".to_vec(), false),
                ("two/b".into(), b"b".to_vec(), false),
            ],
            QoS::AtLeastOnce,
        )
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        topics(),
        HashSet::from(["relayed/cli/a".to_owned(), "relayed/two/b".to_owned()])
    );
    let status = child.terminate_and_wait(Duration::from_secs(15));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "exits cleanly after SIGTERM"
    );
    let stderr = child.stderr_text();
    // Into the test run's output, which tests/run.sh scans for the test secrets.
    eprintln!("{stderr}");
    assert!(stderr.contains("draining"), "{stderr}");
    assert!(!stderr.contains("cli-password-Wombat-9"));
}

// ---------- TLS ----------

/// A broker with plain TCP (for the test's own clients) plus a TLS and a secure websockets
/// listener; returns it with the TLS and WSS ports.
fn tls_broker(certs: &TlsCerts) -> (Mosquitto, u16, u16) {
    let (tls, wss) = (support::free_port(), support::free_port());
    let d = certs.dir.path().display();
    let extra = format!(
        "listener {tls} 127.0.0.1\ncertfile {d}/server.crt\nkeyfile {d}/server.key\nlistener {wss} 127.0.0.1\nprotocol websockets\ncertfile {d}/server.crt\nkeyfile {d}/server.key\n"
    );
    let broker = Mosquitto::start_with(false, &extra);
    for p in [tls, wss] {
        assert!(
            support::wait_for_port(p, Duration::from_secs(10)),
            "TLS listener {p}"
        );
    }
    (broker, tls, wss)
}

/// Both TLS transports with a CA from a Secret: a wss:// source and an mqtts:// sink.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_source_and_sink_verified_against_a_ca_secret() {
    let certs = tls_certs();
    let (source, _, source_wss) = tls_broker(&certs);
    let (sink, sink_tls, _) = tls_broker(&certs);
    let secrets = Arc::new(MapSecrets::default());
    secrets.set("ca", "ca.crt", &certs.ca_pem);
    let ca = json!({"name": "ca", "key": "ca.crt"});
    let s = spec(json!({
        "source": {"mqtt": {"url": format!("wss://127.0.0.1:{source_wss}/mqtt"), "caSecret": ca}},
        "sink": {"url": format!("mqtts://127.0.0.1:{sink_tls}"), "caSecret": ca},
        "routes": [{"from": "t/#", "qos": 1}]
    }));
    let collector = Collector::start(sink.tcp_port, "tls-collector", "t/#", false).await;
    let manager = RelayManager::new(None);
    let mut view = start_relay(&manager, "tls-ok", &s, secrets).await;
    wait_connected(&mut view, Duration::from_secs(15)).await;
    let messages = (0..500)
        .map(|i| ("t/a".to_string(), i.to_string().into_bytes(), false))
        .collect();
    publish_all(source.tcp_port, "tls-pub", messages, QoS::AtLeastOnce).await;
    assert!(
        collector
            .wait_for_distinct(500, Duration::from_secs(20))
            .await,
        "{} of 500 arrived over TLS",
        collector.distinct()
    );
    manager.stop_all().await;
}

/// Without a CA the system trust store is used, which does not know the test CA: the sink never
/// connects and the status names the certificate problem (no panic, no silent acceptance).
/// With `insecureSkipTlsVerify` it connects, and every connection logs a warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_verification_is_on_unless_explicitly_turned_off() {
    let logs = logs();
    let certs = tls_certs();
    let source = Mosquitto::start(false);
    let (_sink, sink_tls, _) = tls_broker(&certs);
    let manager = RelayManager::new(None);
    let verified = spec(json!({
        "source": {"mqtt": {"url": source.tcp_url()}},
        "sink": {"url": format!("mqtts://127.0.0.1:{sink_tls}")},
        "routes": [{"from": "t/#"}]
    }));
    let view = start_relay(&manager, "tls-system", &verified, Arc::default()).await;
    let mut status = view.status.clone();
    let reported = tokio::time::timeout(
        Duration::from_secs(15),
        status.wait_for(|s| s.last_error.is_some()),
    )
    .await
    .is_ok();
    assert!(
        reported,
        "an error is reported: {:?}",
        *view.status.borrow()
    );
    let s = view.status.borrow().clone();
    assert_ne!(s.sink, SideState::Connected);
    let err = s
        .last_error
        .map(|e| e.message)
        .unwrap_or_default()
        .to_lowercase();
    assert!(
        err.contains("certificate") || err.contains("issuer"),
        "{err}"
    );
    manager.stop_all().await;

    let insecure = spec(json!({
        "source": {"mqtt": {"url": source.tcp_url()}},
        "sink": {"url": format!("mqtts://127.0.0.1:{sink_tls}"), "insecureSkipTlsVerify": true},
        "routes": [{"from": "t/#"}]
    }));
    let mut view = start_relay(&manager, "tls-insecure", &insecure, Arc::default()).await;
    wait_connected(&mut view, Duration::from_secs(15)).await;
    manager.stop_all().await;
    let text = String::from_utf8_lossy(&logs.0.lock().unwrap()).to_string();
    let warning = text
        .lines()
        .find(|l| l.contains("TLS certificate verification is OFF"))
        .unwrap_or_else(|| panic!("no warning logged"));
    assert!(warning.contains("WARN"), "{warning}");
}

/// Poison messages: a message over the sink's `maxMessageBytes`, and one over the source's,
/// are each dropped, counted and reported with their route and size, and acknowledged; the
/// stream behind them goes on, and the source broker never delivers them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_too_large_for_a_side_are_dropped_counted_and_the_stream_goes_on() {
    use std::sync::atomic::Ordering::Relaxed;
    logs();
    let source = Mosquitto::start(false);
    let sink = Mosquitto::start(false);
    let collector = Collector::start(sink.tcp_port, "collector-poison", "cluster/#", true).await;
    let bridge = |source_limit: u64, sink_limit: u64| {
        spec(json!({
            "source": {"mqtt": {"url": source.tcp_url()}, "maxMessageBytes": source_limit},
            "sink": {"url": sink.tcp_url(), "maxMessageBytes": sink_limit},
            "routes": [{"name": "telemetry", "from": "devices/+/telemetry", "to": "cluster/{2}/telemetry"}]}))
    };
    let small = |range: std::ops::Range<usize>| -> Vec<support::mqtt::Outgoing> {
        range
            .map(|n| {
                (
                    "devices/d0/telemetry".to_owned(),
                    n.to_string().into_bytes(),
                    false,
                )
            })
            .collect()
    };
    let big = |bytes: usize| ("devices/big/telemetry".to_owned(), vec![b'x'; bytes], false);
    let topics = vec!["cluster/d0/telemetry".to_owned()];

    // 1. Over the sink's limit (64 KiB): two 200 KiB messages amid 40 small ones.
    let manager = RelayManager::new(None);
    let mut view = start_relay(
        &manager,
        "poison",
        &bridge(1 << 20, 65_536),
        Arc::new(MapSecrets::default()),
    )
    .await;
    wait_connected(&mut view, Duration::from_secs(15)).await;
    let mut msgs = small(0..20);
    msgs.push(big(204_800));
    msgs.push(big(204_800));
    msgs.extend(small(20..40));
    publish_all(source.tcp_port, "publisher-poison", msgs, QoS::AtLeastOnce).await;
    assert!(
        collector
            .wait_for_distinct(40, Duration::from_secs(30))
            .await,
        "the stream behind the large messages stopped: {} arrived",
        collector.count()
    );
    let (lost, _) = check_stream(&collector.snapshot(), &topics, 40);
    assert_eq!(lost, 0);
    assert!(
        collector
            .snapshot()
            .iter()
            .all(|r| r.topic != "cluster/big/telemetry"),
        "a message over the sink's limit reached it"
    );
    assert_eq!(view.stats.too_large.load(Relaxed), 2);
    assert_eq!(
        view.stats.reconnects.load(Relaxed),
        0,
        "no reconnect for a large message"
    );
    let dropped = view.status.borrow().last_dropped.clone().expect("reported");
    for needle in [
        "route telemetry (in)",
        "204800 bytes",
        "sink's maxMessageBytes (65536)",
    ] {
        assert!(
            dropped.message.contains(needle),
            "{needle}: {}",
            dropped.message
        );
    }

    // 2. Over the source's limit (8 KiB: rumqttc would refuse to read a 100 KiB packet and the
    // broker would send it again on every connection): taken in once, dropped, acknowledged.
    manager.stop_all().await;
    let manager = RelayManager::new(None);
    let mut view = start_relay(
        &manager,
        "poison",
        &bridge(8_192, 1 << 20),
        Arc::new(MapSecrets::default()),
    )
    .await;
    wait_connected(&mut view, Duration::from_secs(15)).await;
    let mut msgs = vec![big(102_400)];
    msgs.extend(small(40..60));
    publish_all(source.tcp_port, "publisher-poison", msgs, QoS::AtLeastOnce).await;
    assert!(
        collector
            .wait_for_distinct(60, Duration::from_secs(30))
            .await,
        "the stream behind the large message stopped: {} arrived",
        collector.count()
    );
    assert_eq!(view.stats.too_large.load(Relaxed), 1);
    let source_reconnects = view.stats.reconnects.load(Relaxed);
    assert!(source_reconnects <= 1, "{source_reconnects} reconnects");
    let dropped = view.status.borrow().last_dropped.clone().expect("reported");
    assert!(
        dropped.message.contains("source's maxMessageBytes (8192)"),
        "{}",
        dropped.message
    );

    // 3. Acknowledged means gone: a new relay on the same persistent session gets none of them.
    manager.stop_all().await;
    let manager = RelayManager::new(None);
    let mut view = start_relay(
        &manager,
        "poison",
        &bridge(8_192, 65_536),
        Arc::new(MapSecrets::default()),
    )
    .await;
    wait_connected(&mut view, Duration::from_secs(15)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        view.stats.too_large.load(Relaxed),
        0,
        "a dropped message came back"
    );
    let (lost, _) = check_stream(&collector.snapshot(), &topics, 60);
    println!(
        "FIGURES poison: 3 large messages dropped and acknowledged, 60 small ones relayed, lost={lost}, source reconnects {source_reconnects}"
    );
    assert_eq!(lost, 0);
    manager.stop_all().await;
}

/// A source and a sink broker, a proxy in front of the sink that closes the connection on a
/// publish to `cluster/denied/...`, and a persistent collector of `cluster/#` on the sink.
async fn refusing_sink(collector_id: &str) -> (Mosquitto, Mosquitto, Proc, String, Collector) {
    let source = Mosquitto::start(false);
    let sink = Mosquitto::start(false);
    let port = sink.tcp_port.to_string();
    let (proxy, proxy_port) = start_python("tcp_proxy.py", &[&port, "--refuse", "cluster/denied/"]);
    let collector = Collector::start(sink.tcp_port, collector_id, "cluster/#", true).await;
    (source, sink, proxy, proxy_port, collector)
}

/// A publish the broker refuses by closing the connection (as AWS IoT Core does for a topic its
/// policy denies; a proxy in front of Mosquitto plays that part, since Mosquitto acknowledges a
/// denied publish): the message is sent alone, then dropped, counted and reported; every other
/// message arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_broker_refuses_is_isolated_dropped_and_the_stream_goes_on() {
    use std::sync::atomic::Ordering::Relaxed;
    logs();
    let (source, _sink, _proxy, proxy_port, collector) = refusing_sink("collector-refused").await;
    let s = spec(json!({
        "source": {"mqtt": {"url": source.tcp_url()}},
        "sink": {"url": format!("mqtt://127.0.0.1:{proxy_port}")},
        "routes": [{"from": "devices/+/telemetry", "to": "cluster/{2}/telemetry"}]}));
    let manager = RelayManager::new(None);
    let mut view = start_relay(&manager, "refused", &s, Arc::new(MapSecrets::default())).await;
    wait_connected(&mut view, Duration::from_secs(15)).await;
    let mut msgs: Vec<support::mqtt::Outgoing> = (0..30)
        .map(|n| {
            (
                "devices/d0/telemetry".to_owned(),
                n.to_string().into_bytes(),
                false,
            )
        })
        .collect();
    msgs.insert(
        15,
        (
            "devices/denied/telemetry".to_owned(),
            b"refused".to_vec(),
            false,
        ),
    );
    let started = Instant::now();
    publish_all(source.tcp_port, "publisher-refused", msgs, QoS::AtLeastOnce).await;
    assert!(
        collector
            .wait_for_distinct(30, Duration::from_secs(60))
            .await,
        "the stream behind the refused message stopped: {} arrived",
        collector.distinct()
    );
    let (lost, _) = check_stream(
        &collector.snapshot(),
        &["cluster/d0/telemetry".to_owned()],
        30,
    );
    assert_eq!(lost, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while view.stats.refused.load(Relaxed) == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(view.stats.refused.load(Relaxed), 1);
    let dropped = view.status.borrow().last_dropped.clone().expect("reported");
    assert!(
        dropped.message.contains("cluster/denied/telemetry") && dropped.message.contains("refused"),
        "{}",
        dropped.message
    );
    println!(
        "FIGURES refused: dropped after {:.1} s and {} sink reconnects; 30 other messages relayed, lost={lost}",
        started.elapsed().as_secs_f64(),
        view.stats.reconnects.load(Relaxed)
    );
    // Acknowledged to the source: a new relay on the same session does not get it again.
    manager.stop_all().await;
    let manager = RelayManager::new(None);
    let mut view = start_relay(&manager, "refused", &s, Arc::new(MapSecrets::default())).await;
    wait_connected(&mut view, Duration::from_secs(15)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        view.stats.reconnects.load(Relaxed),
        0,
        "the refused message came back"
    );
    manager.stop_all().await;
}

/// A QoS 0 burst into a sink slower than the source: the relay stops reading from the source
/// while the sink catches up (TCP backpressure) instead of dropping; every message arrives.
/// Before, messages beyond 10,000 waiting for the sink were dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos0_burst_into_a_slow_sink_loses_nothing() {
    use std::sync::atomic::Ordering::Relaxed;
    logs();
    let source = Mosquitto::start(false);
    let sink = Mosquitto::start(false);
    let port = sink.tcp_port.to_string();
    // About 1 MB/s into the sink, a fraction of what the source delivers. The burst (13 MB) is
    // well over what the kernel's socket buffers absorb (the relay's send buffer grows to 4 MiB
    // here), so the relay must hold the rest back.
    let (_proxy, proxy_port) = start_python("tcp_proxy.py", &[&port, "--rate", "1000000"]);
    let collector = Collector::start(sink.tcp_port, "collector-burst", "cluster/#", true).await;
    let s = spec(json!({
        "source": {"mqtt": {"url": source.tcp_url()}, "keepAliveSeconds": 5},
        "sink": {"url": format!("mqtt://127.0.0.1:{proxy_port}")},
        "routes": [{"from": "devices/+/telemetry", "to": "cluster/{2}/telemetry", "qos": 0}]}));
    let manager = RelayManager::new(None);
    let mut view = start_relay(&manager, "burst", &s, Arc::new(MapSecrets::default())).await;
    wait_connected(&mut view, Duration::from_secs(15)).await;
    let n = 100_000;
    let msgs: Vec<support::mqtt::Outgoing> = (0..n)
        .map(|i| {
            (
                "devices/d0/telemetry".to_owned(),
                format!("{i:0>96}").into_bytes(),
                false,
            )
        })
        .collect();
    let started = Instant::now();
    publish_all(source.tcp_port, "publisher-burst", msgs, QoS::AtMostOnce).await;
    let published = started.elapsed();
    // Mosquitto keeps the QoS 0 messages it queued for a subscriber that stopped reading until
    // the next message for that subscriber arrives: a trickle of other messages, as live traffic
    // would be, lets the tail through.
    let burst = |c: &Collector| {
        c.snapshot()
            .iter()
            .filter(|r| r.topic == "cluster/d0/telemetry")
            .map(|r| r.payload.clone())
            .collect::<HashSet<_>>()
            .len()
    };
    // The claim is "nothing lost", not a speed: wait while the tail keeps arriving (about 13 s
    // on an idle machine, several times that on a loaded one), and stop when nothing more has
    // arrived for 15 s, or at 5 minutes.
    let hard_deadline = Instant::now() + Duration::from_secs(300);
    let (mut last_count, mut last_progress) = (0, Instant::now());
    while burst(&collector) < n && Instant::now() < hard_deadline {
        let count = burst(&collector);
        if count > last_count {
            (last_count, last_progress) = (count, Instant::now());
        } else if last_progress.elapsed() > Duration::from_secs(15) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        publish_all(
            source.tcp_port,
            "publisher-trickle",
            vec![("devices/trickle/telemetry".to_owned(), b"t".to_vec(), false)],
            QoS::AtLeastOnce,
        )
        .await;
    }
    let arrived = burst(&collector) == n;
    println!(
        "FIGURES qos0_burst messages={n} published_in={:.2}s relayed_in={:.2}s arrived={} dropped_by_relay={} reading_paused={}",
        published.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        burst(&collector),
        view.stats.dropped.load(Relaxed),
        view.stats.paused.load(Relaxed)
    );
    assert!(
        view.stats.paused.load(Relaxed) > 0,
        "the sink never fell behind: the test proves nothing"
    );
    assert_eq!(view.stats.dropped.load(Relaxed), 0);
    assert!(arrived, "{} of {n} arrived", burst(&collector));
    manager.stop_all().await;
}

// ---------- Several connections on one shared subscription ----------

/// A shared subscription on a persistent session, and the source broker restarts: Mosquitto
/// 2.0.11 keeps the session but restores no shared subscription from its persistence file, so
/// a relay that trusted the session (as it does for plain subscriptions) would read nothing
/// from then on, and the broker would drop every message for want of a subscriber. The relay
/// makes its shared subscriptions again on every connection: all 300 published after the
/// restart arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_subscription_is_made_again_after_the_broker_restarts_with_the_session() {
    logs();
    let mut source = Mosquitto::start_logged();
    let sink = Mosquitto::start(false);
    let collector =
        Collector::start(sink.tcp_port, "collector-share-restart", "cluster/#", true).await;
    let s = spec(json!({
        "source": {"mqtt": {"url": source.tcp_url()}, "persistentSession": true},
        "sink": {"url": sink.tcp_url()},
        "routes": [{"from": "dev/#", "to": "cluster/{topic}", "qos": 1, "shareGroup": "relay"}]}));
    let manager = RelayManager::new(None);
    let mut view = start_relay(
        &manager,
        "share-restart",
        &s,
        Arc::new(MapSecrets::default()),
    )
    .await;
    wait_connected(&mut view, Duration::from_secs(15)).await;
    publish_all(
        source.tcp_port,
        "publisher-share-restart",
        vec![("dev/before".to_owned(), b"0".to_vec(), false)],
        QoS::AtLeastOnce,
    )
    .await;
    assert!(
        collector
            .wait_for_distinct(1, Duration::from_secs(20))
            .await
    );

    // SIGTERM: Mosquitto saves its sessions, then starts again from them.
    source.terminate();
    source.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(view
        .stats
        .reconnects
        .load(std::sync::atomic::Ordering::Relaxed)
        >= 1
        && view.status.borrow().source == SideState::Connected)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(view.status.borrow().source, SideState::Connected);
    assert!(
        source.log().contains("iotop-test-share-restart"),
        "{}",
        source.log()
    );
    let n = 300;
    let msgs = (0..n)
        .map(|i| (format!("dev/after/{i}"), i.to_string().into_bytes(), false))
        .collect();
    publish_all(
        source.tcp_port,
        "publisher-share-restart",
        msgs,
        QoS::AtLeastOnce,
    )
    .await;
    let arrived = collector
        .wait_for_distinct(n + 1, Duration::from_secs(30))
        .await;
    assert!(
        arrived,
        "{} of {} arrived after the broker restarted",
        collector.distinct() - 1,
        n
    );
    manager.stop_all().await;
}

/// MQTT 5: a relay started again on the session the broker kept subscribes again (its first
/// connection always does) and asks for retained messages only for subscriptions that are new:
/// a retained message at the source is relayed once, not once per start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_a_relay_started_again_on_a_kept_session_brings_no_retained_message_twice() {
    logs();
    let source = Mosquitto::start(false);
    let sink = Mosquitto::start(false);
    let collector = Collector::start(sink.tcp_port, "collector-retained", "cluster/#", true).await;
    publish_all(
        source.tcp_port,
        "publisher-retained",
        vec![("dev/state".to_owned(), b"on".to_vec(), true)],
        QoS::AtLeastOnce,
    )
    .await;
    let s = spec(json!({
        "source": {"mqtt": {"url": source.tcp_url()}, "protocolVersion": "5",
                   "persistentSession": true},
        "sink": {"url": sink.tcp_url()},
        "routes": [{"from": "dev/#", "to": "cluster/{topic}", "qos": 1}]}));
    let manager = RelayManager::new(None);
    let key = ConnectionKey::new("test/retained", 0);
    for start in 1..=3 {
        let mut view = start_relay(&manager, "retained", &s, Arc::new(MapSecrets::default())).await;
        wait_connected(&mut view, Duration::from_secs(15)).await;
        assert!(
            collector
                .wait_for_distinct(1, Duration::from_secs(20))
                .await
        );
        // Time for a retained copy to come again, had it been asked for.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(manager.stop(&key).await);
        let copies = collector
            .snapshot()
            .iter()
            .filter(|r| r.topic == "cluster/dev/state")
            .count();
        assert_eq!(copies, 1, "after start {start}");
    }
    manager.stop_all().await;
}

/// A route removed from a bridge with a persistent session: the relay that replaces the old
/// one removes the subscription from the session the broker kept, so the session stops reading
/// it. Before, it stayed: the broker delivered (and queued while the relay was away) what no
/// route reads any more. Checked on the session itself: once the relay has stopped, a client
/// with its client id finds queued only what the remaining route reads. Both kinds of source
/// connection: shared between bridges (MQTT 3.1.1) and the relay's own (MQTT 5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_removed_from_a_persistent_session_is_unsubscribed_by_the_next_relay() {
    logs();
    for version in ["3.1.1", "5"] {
        let source = Mosquitto::start(false);
        let sink = Mosquitto::start(false);
        let collector =
            Collector::start(sink.tcp_port, "collector-removed", "cluster/#", true).await;
        let routes = |froms: &[&str]| {
            spec(json!({
                "source": {"mqtt": {"url": source.tcp_url()}, "protocolVersion": version,
                           "persistentSession": true},
                "sink": {"url": sink.tcp_url()},
                "routes": froms.iter().map(|f| json!({"from": f, "to": "cluster/{topic}", "qos": 1}))
                    .collect::<Vec<_>>()}))
        };
        let manager = RelayManager::new(None);
        let key = ConnectionKey::new("test/removed", 0);
        let mut view = start_relay(
            &manager,
            "removed",
            &routes(&["keep/#", "gone/#"]),
            Arc::new(MapSecrets::default()),
        )
        .await;
        wait_connected(&mut view, Duration::from_secs(15)).await;
        let both = vec![
            ("keep/1".to_owned(), b"1".to_vec(), false),
            ("gone/1".to_owned(), b"1".to_vec(), false),
        ];
        publish_all(source.tcp_port, "publisher-removed", both, QoS::AtLeastOnce).await;
        assert!(
            collector
                .wait_for_distinct(2, Duration::from_secs(20))
                .await,
            "{version}: both routes relay"
        );

        // The route `gone/#` is removed: the relay is replaced.
        let mut view = start_relay(
            &manager,
            "removed",
            &routes(&["keep/#"]),
            Arc::new(MapSecrets::default()),
        )
        .await;
        assert!(view.started, "{version}: the relay was not replaced");
        wait_connected(&mut view, Duration::from_secs(15)).await;
        let one = vec![("keep/2".to_owned(), b"2".to_vec(), false)];
        publish_all(source.tcp_port, "publisher-removed", one, QoS::AtLeastOnce).await;
        assert!(
            collector
                .wait_for_distinct(3, Duration::from_secs(20))
                .await,
            "{version}: the remaining route relays"
        );
        assert!(manager.stop(&key).await);

        // Away: the broker queues in the session what it still subscribes.
        let away = vec![
            ("keep/3".to_owned(), b"3".to_vec(), false),
            ("gone/3".to_owned(), b"3".to_vec(), false),
        ];
        publish_all(source.tcp_port, "publisher-removed", away, QoS::AtLeastOnce).await;
        let topics = support::mqtt::queued_topics(source.tcp_port, "iotop-test-removed").await;
        assert!(
            !topics.is_empty(),
            "{version}: the session kept nothing: {}",
            source.log()
        );
        assert_eq!(topics, vec!["keep/3".to_owned()], "{version}");
        assert!(
            !collector
                .snapshot()
                .iter()
                .any(|r| r.topic == "cluster/gone/3"),
            "{version}"
        );
        manager.stop_all().await;
    }
}

/// A relay retired for good (its bridge deleted, or its connection no longer asked for) ends
/// the sessions the brokers kept for it (`deletionPolicy: EndSessions`, the default), on the
/// source and on the sink, so that the brokers stop queueing messages for it; one only stopped
/// (a changed spec, a restart, a move to another replica) keeps them, and so does a retired one
/// with `RetainSessions`. Both kinds of connection: shared in the process (MQTT 3.1.1) and the
/// relay's own (MQTT 5). Checked on the brokers: the CONNACK of a client with the relay's client
/// id says whether a session was kept, and a retained session queued what its route reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retired_relay_ends_its_kept_sessions_unless_told_to_retain_them() {
    use support::mqtt::{queued_topics, session_present};
    logs();
    for version in ["3.1.1", "5"] {
        let source = Mosquitto::start_logged();
        let sink = Mosquitto::start_logged();
        let collector = Collector::start(sink.tcp_port, "collector-ended", "cluster/#", true).await;
        let bridge = |policy: &str| {
            spec(json!({
                "source": {"mqtt": {"url": source.tcp_url()}, "protocolVersion": version,
                           "persistentSession": true},
                "sink": {"url": sink.tcp_url(), "protocolVersion": version},
                "routes": [{"from": "dev/#", "to": "cluster/{topic}", "qos": 1}],
                "deletionPolicy": policy}))
        };
        use iot_operator::relay::ObserverSource;
        use iot_operator::telemetry::metrics::Metrics;
        let metrics = Arc::new(Metrics::new());
        let manager = RelayManager::new(Some(metrics.clone() as Arc<dyn ObserverSource>));
        let relay = |name: &'static str, spec: TopicBridgeSpec| {
            let manager = &manager;
            async move {
                let mut view =
                    start_relay(manager, name, &spec, Arc::new(MapSecrets::default())).await;
                wait_connected(&mut view, Duration::from_secs(15)).await;
            }
        };
        let key = |name: &str| ConnectionKey::new(format!("test/{name}"), 0);
        let (src_id, sink_id) = ("iotop-test-ended", "iotop-test-ended-sink");

        // Stopped, not retired: both sessions stay.
        relay("ended", bridge("EndSessions")).await;
        let first = vec![("dev/1".to_owned(), b"1".to_vec(), false)];
        publish_all(source.tcp_port, "publisher-ended", first, QoS::AtLeastOnce).await;
        assert!(
            collector
                .wait_for_distinct(1, Duration::from_secs(20))
                .await,
            "{version}"
        );
        assert!(manager.stop(&key("ended")).await);
        manager.stop_all().await;
        assert!(
            session_present(source.tcp_port, src_id).await,
            "{version}: stop kept the source session"
        );
        assert!(
            session_present(sink.tcp_port, sink_id).await,
            "{version}: stop kept the sink session"
        );

        // Retired and made again at once (a bridge deleted and created again): the new relay
        // waits until the old sessions have ended, so that neither connection takes the other
        // over at the broker, and it relays.
        relay("ended", bridge("EndSessions")).await;
        assert_eq!(manager.retire_where(|k| *k == key("ended")).await.len(), 1);
        relay("ended", bridge("EndSessions")).await;
        let again = vec![("dev/2".to_owned(), b"2".to_vec(), false)];
        publish_all(source.tcp_port, "publisher-ended", again, QoS::AtLeastOnce).await;
        assert!(
            collector
                .wait_for_distinct(2, Duration::from_secs(20))
                .await,
            "{version}: the bridge made again relays"
        );
        assert_eq!(
            (source.takeovers(src_id), sink.takeovers(sink_id)),
            (0, 0),
            "{version}: {}",
            source.log()
        );
        // Retired: both end.
        assert_eq!(manager.retire_where(|k| *k == key("ended")).await.len(), 1);
        manager.stop_all().await;
        let text = metrics.encode();
        assert!(
            text.lines()
                .any(|l| l == "iot_operator_bridge_session_ends_total{outcome=\"ended\"} 4"),
            "{version}: two retirements ended 2 sessions each: {text}"
        );
        assert!(
            !session_present(source.tcp_port, src_id).await,
            "{version}: the source session was not ended"
        );
        assert!(
            !session_present(sink.tcp_port, sink_id).await,
            "{version}: the sink session was not ended"
        );

        // Retired with RetainSessions: both stay, and the source's queues what its route reads.
        // The policy changed on the running relay, which it does not restart.
        relay("kept", bridge("EndSessions")).await;
        let view = start_relay(
            &manager,
            "kept",
            &bridge("RetainSessions"),
            Arc::new(MapSecrets::default()),
        )
        .await;
        assert!(
            !view.started,
            "{version}: a changed deletionPolicy restarted the relay"
        );
        assert_eq!(manager.retire_where(|k| *k == key("kept")).await.len(), 1);
        manager.stop_all().await;
        let away = vec![("dev/3".to_owned(), b"3".to_vec(), false)];
        publish_all(source.tcp_port, "publisher-ended", away, QoS::AtLeastOnce).await;
        assert_eq!(
            queued_topics(source.tcp_port, "iotop-test-kept").await,
            vec!["dev/3".to_owned()],
            "{version}"
        );
        assert!(
            session_present(sink.tcp_port, "iotop-test-kept-sink").await,
            "{version}"
        );
    }
}

/// The session of an AWS IoT source (SigV4-signed WebSocket; the proxy checks each signature
/// as AWS IoT would, with botocore) is ended by a signed connection too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retired_signed_source_ends_its_session_with_a_signed_connection() {
    use iot_operator::relay::ObserverSource;
    logs();
    let source = Mosquitto::start(true);
    let sink = Mosquitto::start(false);
    let proxy = SigV4Proxy::start(
        source.ws_port.expect("websockets listener"),
        json!({AKID: {"secret": SECRET, "token": TOKEN}}),
    );
    let metrics = Arc::new(iot_operator::telemetry::Metrics::new());
    let manager = RelayManager::new(Some(metrics.clone() as Arc<dyn ObserverSource>));
    let s = aws_spec(
        proxy.port,
        &sink.tcp_url(),
        json!([{"from": "t/#", "qos": 1}]),
    );
    let mut view = start_relay(&manager, "signed-end", &s, aws_secrets(AKID, SECRET, TOKEN)).await;
    wait_connected(&mut view, Duration::from_secs(15)).await;
    assert_eq!(manager.retire_where(|_| true).await.len(), 1);
    manager.stop_all().await;
    let text = metrics.encode();
    assert!(
        text.lines()
            .any(|l| l == "iot_operator_bridge_session_ends_total{outcome=\"ended\"} 2"),
        "source and sink sessions ended: {text}"
    );
    assert!(
        !support::mqtt::session_present(source.tcp_port, "iotop-test-signed-end").await,
        "the signed source's session stayed"
    );
}

/// A replica not permitted to connect (its leadership lapsed: another replica may hold the
/// client ids now) does not connect to end a retired relay's sessions either; they stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_is_not_ended_without_the_permit_to_connect() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use support::mqtt::session_present;
    logs();
    for version in ["3.1.1", "5"] {
        let source = Mosquitto::start(false);
        let sink = Mosquitto::start(false);
        let permitted = Arc::new(AtomicBool::new(true));
        let allow = permitted.clone();
        let metrics = Arc::new(iot_operator::telemetry::metrics::Metrics::new());
        let observers = metrics.clone() as Arc<dyn iot_operator::relay::ObserverSource>;
        let manager = RelayManager::new(Some(observers)).with_permit(
            iot_operator::relay::config::ConnectPermit(Arc::new(move || {
                allow.load(Ordering::SeqCst)
            })),
        );
        let s = spec(json!({
            "source": {"mqtt": {"url": source.tcp_url()}, "protocolVersion": version,
                       "persistentSession": true},
            "sink": {"url": sink.tcp_url(), "protocolVersion": version},
            "routes": [{"from": "dev/#", "to": "cluster/{topic}", "qos": 1}]}));
        let mut view = start_relay(&manager, "lapsed", &s, Arc::new(MapSecrets::default())).await;
        wait_connected(&mut view, Duration::from_secs(15)).await;
        permitted.store(false, Ordering::SeqCst);
        assert_eq!(manager.retire_where(|_| true).await.len(), 1);
        manager.stop_all().await;
        assert!(
            session_present(source.tcp_port, "iotop-test-lapsed").await,
            "{version}: ended the source session without the permit"
        );
        assert!(
            session_present(sink.tcp_port, "iotop-test-lapsed-sink").await,
            "{version}: ended the sink session without the permit"
        );
        let text = metrics.encode();
        assert!(
            text.lines().any(
                |l| l == "iot_operator_bridge_session_ends_total{outcome=\"not_permitted\"} 2"
            ),
            "{version}: {text}"
        );
    }
}

/// Bridges that share one source connection (MQTT 3.1.1, one client id): the session that
/// connection kept ends only once the last of them has retired, and stays while one that left
/// only stopped may come back for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_connection_ends_its_session_when_the_last_bridge_on_it_retires() {
    use support::mqtt::session_present;
    logs();
    let source = Mosquitto::start(false);
    let sink = Mosquitto::start(false);
    let bridge = |from: &str| {
        spec(json!({
            "source": {"mqtt": {"url": source.tcp_url()}, "clientId": "pooled-source",
                       "persistentSession": true},
            "sink": {"url": sink.tcp_url()},
            "routes": [{"from": from, "to": "cluster/{topic}", "qos": 1}]}))
    };
    let manager = RelayManager::new(None);
    let key = |name: &str| ConnectionKey::new(format!("test/{name}"), 0);
    let start = |name: &'static str, from: &'static str| {
        let (manager, spec) = (&manager, bridge(from));
        async move {
            let mut view = start_relay(manager, name, &spec, Arc::new(MapSecrets::default())).await;
            wait_connected(&mut view, Duration::from_secs(15)).await;
        }
    };
    start("pool-a", "a/#").await;
    start("pool-b", "b/#").await;
    // b only stops (as for a change; its successor has not joined yet), then a leaves for good,
    // the last on the connection: the session stays for b's successor.
    assert!(manager.stop(&key("pool-b")).await);
    let mut a = manager.view(&key("pool-a")).await.expect("a runs");
    wait_connected(&mut a, Duration::from_secs(15)).await;
    manager.retire_where(|k| *k == key("pool-a")).await;
    manager.stop_all().await;
    assert!(
        session_present(source.tcp_port, "pooled-source").await,
        "a session b may come back for was ended"
    );
    // b comes back, then retires, the last on the connection: the session ends.
    start("pool-b", "b/#").await;
    manager.retire_where(|k| *k == key("pool-b")).await;
    manager.stop_all().await;
    assert!(
        !session_present(source.tcp_port, "pooled-source").await,
        "the last bridge retired and the session stayed"
    );
}

/// `connections: 3` with a shared subscription: the broker splits one stream over the three
/// connections (each its own client id), each takes a share, and a connection that stops mid
/// stream and comes back (as when it moves to another replica) loses nothing: its persistent
/// session kept what the broker had handed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_on_a_shared_subscription_split_a_stream_and_lose_nothing() {
    logs();
    let source = Mosquitto::start_logged();
    let sink = Mosquitto::start(false);
    let collector = Collector::start(sink.tcp_port, "collector-shared", "cluster/#", true).await;
    let s = spec(json!({
        "source": {"mqtt": {"url": source.tcp_url()}, "persistentSession": true},
        "sink": {"url": sink.tcp_url()},
        "connections": 3,
        "routes": [{"from": "devices/+/telemetry", "to": "cluster/{2}/telemetry",
                    "shareGroup": "relay"}]}));
    let built = build("shared", &s, Arc::new(MapSecrets::default())).await;
    let manager = RelayManager::new(None);
    let start = |index: usize| {
        let mut unit = built.connection(index);
        unit.config.reconnect_min = Duration::from_millis(100);
        unit.config.reconnect_max = Duration::from_millis(500);
        let manager = &manager;
        async move {
            let mut view = manager
                .ensure(
                    &ConnectionKey::new("test/shared", index),
                    unit.fingerprint,
                    unit.config,
                )
                .await
                .expect("the manager is not paused");
            wait_connected(&mut view, Duration::from_secs(15)).await;
            view
        }
    };
    let mut views = Vec::new();
    for index in 0..3 {
        views.push(start(index).await);
    }
    let ids: Vec<String> = (0..3)
        .map(|i| connection_client_id("iotop-test-shared", i))
        .collect();
    assert_eq!(
        ids,
        [
            "iotop-test-shared",
            "iotop-test-shared-1",
            "iotop-test-shared-2"
        ]
    );

    let (msgs, topics) = stream("devices", 4, 1500);
    let n = msgs.len();
    let port = source.tcp_port;
    let publisher =
        tokio::spawn(
            async move { publish_all(port, "publisher-shared", msgs, QoS::AtLeastOnce).await },
        );
    assert!(collector.wait_for(1000, Duration::from_secs(30)).await);
    // Connection 1 stops mid-stream without draining and comes back a second later.
    manager.abort(&ConnectionKey::new("test/shared", 1)).await;
    // Read once it has stopped: what it relayed while stopping counts too.
    let relayed_before = views[1].stats.relayed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    views[1] = start(1).await;
    publisher.await.expect("publisher");
    let arrived = collector
        .wait_for_distinct(n, Duration::from_secs(60))
        .await;
    let got: HashSet<(String, Vec<u8>)> = collector
        .snapshot()
        .into_iter()
        .map(|r| (r.topic, r.payload.to_vec()))
        .collect();
    let lost = topics
        .iter()
        .flat_map(|d| {
            (0..1500).map(move |i| (format!("cluster/{d}/telemetry"), i.to_string().into_bytes()))
        })
        .filter(|m| !got.contains(m))
        .count();
    let shares: Vec<u64> = views.iter().map(|v| v.stats.relayed()).collect();
    println!(
        "FIGURES shared_subscription connections=3 messages={n} lost={lost} relayed_per_connection={shares:?} (connection 1 restarted after {relayed_before})"
    );
    assert!(arrived, "{} of {n} arrived", got.len());
    assert_eq!(lost, 0);
    assert!(
        shares.iter().all(|&r| r > 0) && relayed_before > 0,
        "every connection takes a share: {shares:?}"
    );
    // Split, not copied: together they relayed each message about once, not three times.
    // About: what connection 1 had taken but not acknowledged when it stopped may come again
    // (more), and what the sink had but had not acknowledged to it is counted nowhere when the
    // broker does not hand it out again (less; the collector above saw every message).
    let total = shares.iter().sum::<u64>() + relayed_before;
    assert!(
        total + 100 >= n as u64 && total <= n as u64 + n as u64 / 10,
        "{total} relayed for {n} messages: {shares:?}"
    );
    // The broker saw three client ids, never one twice at once.
    for id in &ids {
        assert_eq!(source.takeovers(id), 0, "{}", source.log());
    }

    // Connection 2 retires (the bridge went back to two connections): it leaves the group, so
    // the broker stops handing its persistent session a share nobody would read.
    let retired = manager
        .retire_where(|k| *k == ConnectionKey::new("test/shared", 2))
        .await;
    assert_eq!(retired.len(), 1);
    let more: Vec<support::mqtt::Outgoing> = (0..600)
        .map(|i| {
            (
                "devices/after/telemetry".to_owned(),
                i.to_string().into_bytes(),
                false,
            )
        })
        .collect();
    publish_all(source.tcp_port, "publisher-shared", more, QoS::AtLeastOnce).await;
    let after = |c: &Collector| {
        c.snapshot()
            .iter()
            .filter(|r| r.topic == "cluster/after/telemetry")
            .map(|r| r.payload.clone())
            .collect::<HashSet<_>>()
            .len()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while after(&collector) < 600 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "FIGURES shared_subscription after_retiring_one: {} of 600 arrived",
        after(&collector)
    );
    assert_eq!(after(&collector), 600, "a retired connection kept a share");
    manager.stop_all().await;
}

/// Deleting a bridge without shared subscriptions whose source is unreachable does not wait
/// for a side to leave subscriptions it does not have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retiring_a_relay_without_shared_subscriptions_does_not_wait() {
    logs();
    let sink = Mosquitto::start(false);
    let closed = support::free_port();
    let s = spec(json!({
        "source": {"mqtt": {"url": format!("mqtt://127.0.0.1:{closed}")}},
        "sink": {"url": sink.tcp_url()},
        "routes": [{"from": "devices/#"}]}));
    let manager = RelayManager::new(None);
    let _view = start_relay(&manager, "unreachable", &s, Arc::new(MapSecrets::default())).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let retired = manager.retire_where(|_| true).await;
    let took = started.elapsed();
    assert_eq!(retired, vec![ConnectionKey::new("test/unreachable", 0)]);
    // The drain timeout in these tests is 5 s.
    assert!(took < Duration::from_secs(2), "retiring took {took:?}");
}

/// Two routes take the same message: each copy arrives, and the original is acknowledged once
/// both have (a relay started afterwards on the same persistent session gets nothing again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_two_routes_take_arrives_twice_and_is_acknowledged_once() {
    logs();
    let source = Mosquitto::start(false);
    let sink = Mosquitto::start(false);
    let collector = Collector::start(sink.tcp_port, "collector-fan", "#", false).await;
    let s = spec(json!({
        "source": {"mqtt": {"url": source.tcp_url()}, "persistentSession": true},
        "sink": {"url": sink.tcp_url()},
        "routes": [{"from": "fan/#", "to": "a/{topic}", "qos": 1},
                   {"from": "fan/#", "to": "b/{topic}", "qos": 1}]}));
    let manager = RelayManager::new(None);
    let mut view = start_relay(&manager, "fan", &s, Arc::new(MapSecrets::default())).await;
    wait_connected(&mut view, Duration::from_secs(15)).await;
    let n = 200;
    let msgs = (0..n)
        .map(|i| ("fan/d".to_owned(), format!("{i}").into_bytes(), false))
        .collect();
    publish_all(source.tcp_port, "publisher-fan", msgs, QoS::AtLeastOnce).await;
    assert!(collector.wait_for(2 * n, Duration::from_secs(20)).await);
    manager.stop_all().await;
    let copies = |prefix: &str| {
        collector
            .snapshot()
            .iter()
            .filter(|r| r.topic.starts_with(prefix))
            .map(|r| r.payload.clone())
            .collect::<HashSet<_>>()
            .len()
    };
    assert_eq!((copies("a/fan/"), copies("b/fan/")), (n, n));
    // Same client ids, same session: anything not acknowledged would come again.
    let before = collector.count();
    let manager = RelayManager::new(None);
    let mut view = start_relay(&manager, "fan", &s, Arc::new(MapSecrets::default())).await;
    wait_connected(&mut view, Duration::from_secs(15)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(collector.count(), before, "originals were redelivered");
    manager.stop_all().await;
}

/// The 3.1.1 loop pings on its own: with a keep-alive of 1 s, Mosquitto closes a connection
/// that sends nothing for 1.5 s (or a little more). Idle for 8 s, neither side may have
/// reconnected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_pings_and_stays_up() {
    logs();
    let source = Mosquitto::start(false);
    let sink = Mosquitto::start(false);
    let collector = Collector::start(sink.tcp_port, "collector-idle", "#", false).await;
    let s = spec(json!({
        "source": {"mqtt": {"url": source.tcp_url()}}, "sink": {"url": sink.tcp_url()},
        "routes": [{"from": "idle/#"}]}));
    let mut built = build("idle", &s, Arc::new(MapSecrets::default())).await;
    built.config.source.keep_alive = Duration::from_secs(1);
    built.config.sink.keep_alive = Duration::from_secs(1);
    let manager = RelayManager::new(None);
    let mut view = manager
        .ensure(
            &ConnectionKey::new("test/idle", 0),
            built.fingerprint,
            built.config,
        )
        .await
        .expect("the manager is not paused");
    wait_connected(&mut view, Duration::from_secs(15)).await;
    // Without pings Mosquitto 2.0.11 closed the connection after 5.6 s (it checks keep-alives
    // coarsely, not at exactly 1.5 s).
    tokio::time::sleep(Duration::from_secs(8)).await;
    let reconnects = view
        .stats
        .reconnects
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(reconnects, 0, "status: {:?}", *view.status.borrow());
    publish_all(
        source.tcp_port,
        "idle-pub",
        vec![("idle/1".into(), b"1".to_vec(), false)],
        QoS::AtLeastOnce,
    )
    .await;
    assert!(collector.wait_for(1, Duration::from_secs(10)).await);
    manager.stop_all().await;
}

// ---------- MQTT 5 ----------

/// An MQTT 5 message as a subscriber sees it.
#[derive(Debug, Clone)]
struct Received5 {
    topic: String,
    payload: bytes::Bytes,
    properties: Option<rumqttc::v5::mqttbytes::v5::PublishProperties>,
}

/// An MQTT 5 subscriber that collects what it receives; with a persistent session (kept an
/// hour) it survives broker restarts.
async fn collect5(
    port: u16,
    id: &str,
    filter: &str,
    persistent: bool,
) -> Arc<Mutex<Vec<Received5>>> {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let mut options = MqttOptions::new(id, "127.0.0.1", port);
    if persistent {
        options.set_clean_start(false);
        options.set_session_expiry_interval(Some(3600));
    }
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    let got = Arc::new(Mutex::new(Vec::new()));
    let sink = got.clone();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let mut ready_tx = Some(ready_tx);
    let filter = filter.to_owned();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    if ack.session_present {
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(());
                        }
                    } else {
                        let _ = client
                            .subscribe(filter.clone(), rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
                            .await;
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(tx) = ready_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    sink.lock().unwrap().push(Received5 {
                        topic: String::from_utf8_lossy(&p.topic).into_owned(),
                        payload: p.payload.clone(),
                        properties: p.properties.clone(),
                    });
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), ready_rx)
        .await
        .expect("subscribed")
        .expect("subscribed");
    got
}

/// Publishes with an MQTT 5 client at QoS 1 and waits for every PUBACK.
async fn publish5(
    port: u16,
    id: &str,
    messages: Vec<(
        String,
        Vec<u8>,
        Option<rumqttc::v5::mqttbytes::v5::PublishProperties>,
    )>,
) {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let (client, mut eventloop) = AsyncClient::new(MqttOptions::new(id, "127.0.0.1", port), 1000);
    let n = messages.len();
    tokio::spawn(async move {
        for (topic, payload, props) in messages {
            let qos = rumqttc::v5::mqttbytes::QoS::AtLeastOnce;
            match props {
                Some(p) => client
                    .publish_with_properties(topic, qos, false, payload, p)
                    .await
                    .unwrap(),
                None => client.publish(topic, qos, false, payload).await.unwrap(),
            }
        }
    });
    let mut acked = 0;
    let done = tokio::time::timeout(Duration::from_secs(30), async {
        while acked < n {
            if let Ok(Event::Incoming(Packet::PubAck(_))) = eventloop.poll().await {
                acked += 1;
            }
        }
    })
    .await;
    assert!(done.is_ok(), "only {acked} of {n} acknowledged");
}

async fn wait_until<F: Fn() -> bool>(what: &str, timeout: Duration, f: F) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_properties_pass_through() {
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    logs();
    let source = Mosquitto::start(false);
    let sink = Mosquitto::start(false);
    let s = spec(json!({
        "source": {"mqtt": {"url": source.tcp_url()}, "protocolVersion": "5"},
        "sink": {"url": sink.tcp_url(), "protocolVersion": "5"},
        "routes": [{"from": "app/#", "to": "cluster/{topic}"}]
    }));
    let got = collect5(sink.tcp_port, "props-sub", "cluster/#", false).await;
    let manager = RelayManager::new(None);
    let mut view = start_relay(&manager, "props", &s, Arc::new(MapSecrets::default())).await;
    wait_connected(&mut view, Duration::from_secs(15)).await;

    let props = PublishProperties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(120),
        response_topic: Some("app/replies/42".into()),
        correlation_data: Some(bytes::Bytes::from_static(b"corr-42")),
        user_properties: vec![
            ("trace".into(), "abc".into()),
            ("tenant".into(), "t1".into()),
        ],
        content_type: Some("application/json".into()),
        ..Default::default()
    };
    publish5(
        source.tcp_port,
        "props-pub",
        vec![
            ("app/a".into(), br#"{"n":1}"#.to_vec(), Some(props.clone())),
            ("app/b".into(), b"plain".to_vec(), None),
        ],
    )
    .await;
    wait_until("both messages at the sink", Duration::from_secs(15), || {
        got.lock().unwrap().len() >= 2
    })
    .await;
    let got = got.lock().unwrap().clone();
    let a = got
        .iter()
        .find(|m| m.topic == "cluster/app/a")
        .expect("app/a");
    let p = a.properties.clone().expect("properties of app/a");
    assert_eq!(a.payload.as_ref(), br#"{"n":1}"#);
    assert_eq!(p.payload_format_indicator, Some(1));
    assert_eq!(p.content_type.as_deref(), Some("application/json"));
    assert_eq!(p.response_topic.as_deref(), Some("app/replies/42"));
    assert_eq!(p.correlation_data.as_deref(), Some(&b"corr-42"[..]));
    assert_eq!(p.user_properties, props.user_properties);
    let expiry = p.message_expiry_interval.expect("an expiry");
    assert!(
        (1..=120).contains(&expiry),
        "expiry {expiry} not reduced from 120"
    );
    let b = got
        .iter()
        .find(|m| m.topic == "cluster/app/b")
        .expect("app/b");
    assert!(
        b.properties
            .as_ref()
            .is_none_or(|p| p.user_properties.is_empty() && p.message_expiry_interval.is_none()),
        "{:?}",
        b.properties
    );
    println!("FIGURES mqtt5_properties expiry_in=120 expiry_out={expiry}");
    manager.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_to_a_3_1_1_sink_carries_the_payload_without_properties() {
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    logs();
    let source = Mosquitto::start(false);
    let sink = Mosquitto::start(false);
    let s = spec(json!({
        "source": {"mqtt": {"url": source.tcp_url()}, "protocolVersion": "5"},
        "sink": {"url": sink.tcp_url()},
        "routes": [{"from": "app/#"}]
    }));
    let got = collect5(sink.tcp_port, "mixed-sub", "app/#", false).await;
    let manager = RelayManager::new(None);
    let mut view = start_relay(&manager, "mixed", &s, Arc::new(MapSecrets::default())).await;
    wait_connected(&mut view, Duration::from_secs(15)).await;
    let props = PublishProperties {
        user_properties: vec![("k".into(), "v".into())],
        ..Default::default()
    };
    publish5(
        source.tcp_port,
        "mixed-pub",
        vec![("app/x".into(), b"payload".to_vec(), Some(props))],
    )
    .await;
    wait_until("the message at the sink", Duration::from_secs(15), || {
        !got.lock().unwrap().is_empty()
    })
    .await;
    let m = got.lock().unwrap()[0].clone();
    assert_eq!(m.payload.as_ref(), b"payload");
    assert!(
        m.properties
            .as_ref()
            .is_none_or(|p| p.user_properties.is_empty()),
        "a 3.1.1 sink cannot carry properties: {:?}",
        m.properties
    );
    manager.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_sink_restart_mid_stream_loses_nothing() {
    sink_restart_loses_nothing("5").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_reason_codes_drop_a_refused_message_without_breaking_the_connection() {
    logs();
    let source = Mosquitto::start(false);
    // The sink lets anyone read everything but write only under cluster/ok/.
    let acl_dir = tempfile::tempdir().unwrap();
    let acl = acl_dir.path().join("acl");
    std::fs::write(&acl, "topic read #\ntopic write cluster/ok/#\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(acl_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&acl, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let sink = Mosquitto::start_with(false, &format!("acl_file {}\n", acl.display()));
    let collector = Collector::start(sink.tcp_port, "collector-acl", "cluster/#", false).await;
    let s = spec(json!({
        "source": {"mqtt": {"url": source.tcp_url()}},
        "sink": {"url": sink.tcp_url(), "protocolVersion": "5"},
        "routes": [{"from": "ok/#", "to": "cluster/{topic}"}, {"from": "no/#", "to": "cluster/{topic}"}]
    }));
    let manager = RelayManager::new(None);
    let mut view = start_relay(&manager, "acl", &s, Arc::new(MapSecrets::default())).await;
    wait_connected(&mut view, Duration::from_secs(15)).await;
    let mut msgs = Vec::new();
    for i in 0..20 {
        msgs.push((format!("ok/{i}"), i.to_string().into_bytes(), false));
        if i % 10 == 5 {
            msgs.push((format!("no/{i}"), b"denied".to_vec(), false));
        }
    }
    publish_all(source.tcp_port, "publisher-acl", msgs, QoS::AtLeastOnce).await;
    assert!(
        collector.wait_for(20, Duration::from_secs(20)).await,
        "only {} of 20 allowed messages arrived",
        collector.count()
    );
    let stats = view.stats.clone();
    wait_until("both refusals counted", Duration::from_secs(20), || {
        stats.refused.load(std::sync::atomic::Ordering::Relaxed) == 2
    })
    .await;
    let status = view.status.borrow().clone();
    let dropped = status.last_dropped.expect("a refused message is reported");
    println!("FIGURES mqtt5_refused {}", dropped.message);
    assert!(
        dropped.message.contains("NotAuthorized"),
        "{}",
        dropped.message
    );
    assert!(
        dropped.message.contains("cluster/no/"),
        "{}",
        dropped.message
    );
    assert_eq!(
        stats.reconnects.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "a reason code needs no reconnect"
    );
    assert!(
        collector
            .snapshot()
            .iter()
            .all(|m| m.topic.starts_with("cluster/ok/")),
    );
    manager.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_no_local_lets_a_topic_be_bridged_both_ways_without_a_loop() {
    logs();
    let source = Mosquitto::start(false);
    let sink = Mosquitto::start(false);
    let both_ways = |version: &str| {
        spec(json!({
            "source": {"mqtt": {"url": source.tcp_url()}, "protocolVersion": version},
            "sink": {"url": sink.tcp_url(), "protocolVersion": version},
            "routes": [{"name": "down", "from": "sync/#"}, {"name": "up", "from": "sync/#", "direction": "out"}]
        }))
    };
    // Under 3.1.1 the relay would read back what it publishes: refused.
    let err = both_ways("3.1.1").validate().unwrap_err();
    assert!(err.message.contains("loop"), "{err:?}");
    let s = both_ways("5");
    s.validate()
        .expect("MQTT 5 subscriptions are noLocal: no loop");

    let at_source = Collector::start(source.tcp_port, "nl-src", "sync/#", false).await;
    let at_sink = Collector::start(sink.tcp_port, "nl-snk", "sync/#", false).await;
    let manager = RelayManager::new(None);
    let mut view = start_relay(&manager, "nolocal", &s, Arc::new(MapSecrets::default())).await;
    wait_connected(&mut view, Duration::from_secs(15)).await;
    publish_all(
        source.tcp_port,
        "nl-pub-src",
        vec![("sync/from-source".into(), b"1".to_vec(), false)],
        QoS::AtLeastOnce,
    )
    .await;
    publish_all(
        sink.tcp_port,
        "nl-pub-snk",
        vec![("sync/from-sink".into(), b"2".to_vec(), false)],
        QoS::AtLeastOnce,
    )
    .await;
    // Each side sees each message exactly once: its own publisher's, and the relayed one.
    assert!(at_source.wait_for(2, Duration::from_secs(10)).await);
    assert!(at_sink.wait_for(2, Duration::from_secs(10)).await);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let relayed = view.stats.relayed();
    println!(
        "FIGURES mqtt5_no_local at_source={} at_sink={} relayed={relayed}",
        at_source.count(),
        at_sink.count()
    );
    assert_eq!(at_source.count(), 2, "{:?}", at_source.snapshot());
    assert_eq!(at_sink.count(), 2, "{:?}", at_sink.snapshot());
    assert_eq!(relayed, 2);
    manager.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_expiry_counts_the_time_in_the_relay_and_expired_messages_are_dropped() {
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    logs();
    // The source sends the relay all 250 at once (not 100 at a time), so that 50 wait in the
    // relay rather than in the source broker, which would expire them itself.
    let source = Mosquitto::start_with(false, "max_inflight_messages 1000\n");
    let mut sink = Mosquitto::start(false);
    let got = collect5(sink.tcp_port, "expiry-sub", "cluster/#", true).await;
    let s = spec(json!({
        "source": {"mqtt": {"url": source.tcp_url()}, "protocolVersion": "5"},
        "sink": {"url": sink.tcp_url(), "protocolVersion": "5"},
        "routes": [{"from": "app/#", "to": "cluster/{topic}"}]
    }));
    let manager = RelayManager::new(None);
    let mut view = start_relay(&manager, "expiry", &s, Arc::new(MapSecrets::default())).await;
    wait_connected(&mut view, Duration::from_secs(15)).await;

    // With the sink down, 200 messages (twice the relay's window of 100) wait in its outbox and
    // 50 more behind them; those 50 live 2 seconds.
    sink.terminate();
    let expiring = |secs| PublishProperties {
        message_expiry_interval: Some(secs),
        ..Default::default()
    };
    let mut msgs = Vec::new();
    for i in 0..200 {
        msgs.push((format!("app/long/{i}"), vec![b'x'], Some(expiring(600))));
    }
    for i in 0..50 {
        msgs.push((format!("app/short/{i}"), vec![b'y'], Some(expiring(2))));
    }
    publish5(source.tcp_port, "expiry-pub", msgs).await;
    tokio::time::sleep(Duration::from_millis(3500)).await;
    sink.restart();

    wait_until(
        "the long-lived messages at the sink",
        Duration::from_secs(30),
        || got.lock().unwrap().len() >= 200,
    )
    .await;
    let stats = view.stats.clone();
    wait_until(
        "the expired messages counted",
        Duration::from_secs(10),
        || stats.expired.load(std::sync::atomic::Ordering::Relaxed) == 50,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = got.lock().unwrap().clone();
    let max_expiry = got
        .iter()
        .filter_map(|m| m.properties.as_ref()?.message_expiry_interval)
        .max()
        .expect("expiries");
    println!(
        "FIGURES mqtt5_expiry delivered={} expired={} max_expiry_out={max_expiry} (in: 600)",
        got.len(),
        stats.expired.load(std::sync::atomic::Ordering::Relaxed)
    );
    assert_eq!(got.len(), 200, "only the long-lived messages arrive");
    assert!(got.iter().all(|m| m.topic.starts_with("cluster/app/long/")));
    assert!(
        max_expiry <= 597,
        "the expiry was not reduced by the 3 s in the relay: {max_expiry}"
    );
    let dropped = view.status.borrow().last_dropped.clone().expect("reported");
    assert!(dropped.message.contains("expired"), "{}", dropped.message);
    manager.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_over_a_sigv4_signed_websocket() {
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    logs();
    let source = Mosquitto::start(true);
    let sink = Mosquitto::start(false);
    let proxy = SigV4Proxy::start(
        source.ws_port.unwrap(),
        json!({AKID: {"secret": SECRET, "token": TOKEN}}),
    );
    let mut s = aws_spec(
        proxy.port,
        &sink.tcp_url(),
        json!([{"from": "devices/#", "to": "cluster/{topic}", "qos": 1}]),
    );
    s.source.protocol_version = iot_operator::api::MqttVersion::V5;
    s.sink.protocol_version = iot_operator::api::MqttVersion::V5;
    let got = collect5(sink.tcp_port, "signed5-sub", "cluster/#", false).await;
    let manager = RelayManager::new(None);
    let mut view = start_relay(&manager, "signed5", &s, aws_secrets(AKID, SECRET, TOKEN)).await;
    wait_connected(&mut view, Duration::from_secs(15)).await;
    let props = PublishProperties {
        user_properties: vec![("device".into(), "d1".into())],
        ..Default::default()
    };
    let msgs = (0..200)
        .map(|i| {
            (
                format!("devices/d1/{i}"),
                i.to_string().into_bytes(),
                Some(props.clone()),
            )
        })
        .collect();
    publish5(source.tcp_port, "signed5-pub", msgs).await;
    wait_until("200 messages at the sink", Duration::from_secs(30), || {
        got.lock().unwrap().len() >= 200
    })
    .await;
    let got = got.lock().unwrap().clone();
    assert!(got.iter().all(|m| {
        m.properties
            .as_ref()
            .is_some_and(|p| p.user_properties == props.user_properties)
    }));
    let decisions = proxy.decisions();
    assert!(
        !decisions.is_empty() && decisions.iter().all(|d| d["ok"] == true),
        "{decisions:?}"
    );
    manager.stop_all().await;
}

/// Two bridges name the same sink broker with the same client id: they share one connection
/// (two connections with one client id would take it from each other in turn, and each
/// takeover shows as a reconnect). 2 x 1,500 QoS 1 messages with the sink restarted mid-stream
/// all arrive; stopping one bridge leaves the other's connection up; a bridge started after
/// both stopped opens a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridges_with_the_same_sink_identity_share_one_connection_and_lose_nothing() {
    use std::sync::atomic::Ordering::Relaxed;
    logs();
    let source = Mosquitto::start(false);
    let mut sink = Mosquitto::start_logged();
    let collector = Collector::start(sink.tcp_port, "collector-shared", "cluster/#", true).await;
    let bridge = |prefix: &str, to: &str| {
        spec(json!({
            "source": {"mqtt": {"url": source.tcp_url()}, "persistentSession": true},
            "sink": {"url": sink.tcp_url(), "clientId": "shared-sink"},
            "routes": [{"from": format!("{prefix}/+/telemetry"), "to": format!("cluster/{to}/{{2}}"), "qos": 1}]}))
    };
    let (spec_a, spec_b) = (bridge("devices", "a"), bridge("things", "b"));
    let manager = RelayManager::new(None);
    let no_secrets = || Arc::new(MapSecrets::default());
    let mut a = start_relay(&manager, "shared-a", &spec_a, no_secrets()).await;
    let mut b = start_relay(&manager, "shared-b", &spec_b, no_secrets()).await;
    wait_connected(&mut a, Duration::from_secs(15)).await;
    wait_connected(&mut b, Duration::from_secs(15)).await;
    // Reconnects back off 100-500 ms here: two connections fighting over the client id would
    // have reconnected several times by now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let reconnects = |v: &RelayView| v.stats.reconnects.load(Relaxed);
    assert_eq!(
        (reconnects(&a), reconnects(&b)),
        (0, 0),
        "the bridges took the sink connection from each other"
    );
    assert_eq!(sink.connections("shared-sink"), 1, "{}", sink.log());

    let per_topic = 500;
    let (msgs_a, ids) = stream("devices", 3, per_topic);
    let (msgs_b, _) = stream("things", 3, per_topic);
    let topics: Vec<String> = ["a", "b"]
        .iter()
        .flat_map(|to| ids.iter().map(move |d| format!("cluster/{to}/{d}")))
        .collect();
    let port = source.tcp_port;
    let publishers = [
        ("publisher-shared-a", msgs_a),
        ("publisher-shared-b", msgs_b),
    ]
    .map(|(id, msgs)| {
        tokio::spawn(async move { publish_all(port, id, msgs, QoS::AtLeastOnce).await })
    });
    assert!(collector.wait_for(1000, Duration::from_secs(30)).await);
    sink.terminate();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    sink.restart();
    for p in publishers {
        p.await.unwrap();
    }
    let total = 2 * 3 * per_topic;
    let arrived = collector
        .wait_for_distinct(total, Duration::from_secs(60))
        .await;
    let (lost, dups) = check_stream(&collector.snapshot(), &topics, per_topic);
    println!(
        "FIGURES shared sink: 2 bridges, {total} qos1 messages, sink restarted: lost={lost} duplicates={dups} reconnects a={} b={}",
        reconnects(&a),
        reconnects(&b)
    );
    assert!(arrived, "only {} of {total} arrived", collector.distinct());
    assert_eq!(lost, 0);
    // Each bridge saw the one shared connection come back once.
    assert_eq!((reconnects(&a), reconnects(&b)), (1, 1));
    assert_eq!(sink.connections("shared-sink"), 2, "{}", sink.log());

    // Bridge a leaves; b's connection stays up and carries on.
    assert!(manager.stop(&ConnectionKey::new("test/shared-a", 0)).await);
    assert_eq!(a.status.borrow().sink, SideState::Stopped);
    let more = numbered("things/d9/telemetry", 100);
    publish_all(port, "publisher-shared-b", more, QoS::AtLeastOnce).await;
    assert!(
        collector
            .wait_for_distinct(total + 100, Duration::from_secs(20))
            .await,
        "bridge b stopped relaying when a left"
    );
    assert_eq!(reconnects(&b), 1, "a leaving broke b's connection");
    assert_eq!(sink.connections("shared-sink"), 2, "{}", sink.log());
    assert_eq!(b.status.borrow().sink, SideState::Connected);

    // The last one out closes the connection; a new bridge opens its own.
    manager.stop_all().await;
    let mut a = start_relay(&manager, "shared-a", &spec_a, no_secrets()).await;
    wait_connected(&mut a, Duration::from_secs(15)).await;
    publish_all(
        port,
        "publisher-shared-a",
        vec![("devices/d9/telemetry".to_owned(), b"after".to_vec(), false)],
        QoS::AtLeastOnce,
    )
    .await;
    assert!(
        collector
            .wait_for_distinct(total + 101, Duration::from_secs(20))
            .await
    );
    manager.stop_all().await;
    assert!(sink.disconnected("shared-sink"), "{}", sink.log());
    assert_eq!(sink.takeovers("shared-sink"), 0, "{}", sink.log());
}

/// A sink that stays connected but takes nothing (SIGSTOP) is a stall once messages have
/// waited `stall_after` for it: the relay's status names it (direction `in`, since when) and
/// `iot_operator_bridge_stalled_connections` counts it; once the sink takes messages again the
/// stall ends, the gauge returns to 0, and nothing is lost. The engine does this itself, so
/// `iot-operator bridge` reports it as the operator does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_that_takes_nothing_is_a_stall_until_it_takes_messages_again() {
    use iot_operator::api::Direction;
    use iot_operator::relay::ObserverSource;
    use iot_operator::telemetry::metrics::Metrics;
    logs();
    let source = Mosquitto::start(false);
    let sink = Mosquitto::start(false);
    let collector = Collector::start(sink.tcp_port, "collector-stall", "cluster/#", true).await;
    let s = spec(json!({
        "source": {"mqtt": {"url": source.tcp_url()}, "persistentSession": true},
        "sink": {"url": sink.tcp_url()},
        "routes": [{"from": "devices/#", "to": "cluster/{topic}", "qos": 1}]}));
    let metrics = Arc::new(Metrics::new());
    let manager = RelayManager::new(Some(metrics.clone() as Arc<dyn ObserverSource>));
    let mut built = build("stall", &s, Arc::new(MapSecrets::default())).await;
    built.config.stall_after = Duration::from_secs(2);
    let mut view = manager
        .ensure(
            &ConnectionKey::new("test/stall", 0),
            built.fingerprint,
            built.config,
        )
        .await
        .expect("the manager is not paused");
    wait_connected(&mut view, Duration::from_secs(15)).await;
    let gauge = || {
        metrics
            .encode_prometheus_text()
            .lines()
            .find(|l| l.starts_with("iot_operator_bridge_stalled_connections{"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    assert_eq!(gauge(), Some(0.0));
    publish_all(
        source.tcp_port,
        "publisher-stall",
        numbered("devices/d1/t", 10),
        QoS::AtLeastOnce,
    )
    .await;
    assert!(
        collector
            .wait_for_distinct(10, Duration::from_secs(20))
            .await
    );
    assert_eq!(view.status.borrow().stalled, None);

    let pid = sink.pid().expect("sink pid").to_string();
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {pid}");
    };
    signal("-STOP");
    let stopped = Instant::now();
    publish_all(
        source.tcp_port,
        "publisher-stall",
        numbered("devices/d2/t", 10),
        QoS::AtLeastOnce,
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while view.status.borrow().stalled.is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let told = stopped.elapsed();
    let stall = view.status.borrow().stalled.expect("a stall");
    assert_eq!(stall.direction, Direction::In);
    assert_eq!(view.status.borrow().sink, SideState::Connected);
    // Not before 2 s of waiting; within one check (1 s) after.
    assert!(told >= Duration::from_secs(2), "{told:?}");
    assert_eq!(gauge(), Some(1.0));
    eprintln!(
        "FIGURES stall: told {:.1} s after the sink stopped (stall_after 2 s)",
        told.as_secs_f64()
    );

    signal("-CONT");
    let deadline = Instant::now() + Duration::from_secs(15);
    while view.status.borrow().stalled.is_some() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(view.status.borrow().stalled, None, "the stall did not end");
    assert_eq!(gauge(), Some(0.0));
    assert!(
        collector
            .wait_for_distinct(20, Duration::from_secs(20))
            .await,
        "messages were lost in the stall"
    );
    manager.stop_all().await;
}

/// Two bridges share one source connection to a broker that refuses subscriptions to
/// `secret/#`; only the bridge that asked for it is told (its status names the filter) and
/// counts it in `iot_operator_bridge_subscriptions_refused`. The other bridge relays on, with
/// no refusal of its own: before, every bridge of the connection was told and counted it, and
/// would have fired IotBridgeSubscriptionRefused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_subscription_on_a_shared_source_is_told_only_to_the_bridge_that_asked() {
    use iot_operator::relay::{ObserverSource, RelayErrorKind};
    use iot_operator::telemetry::metrics::Metrics;
    logs();
    let (mut source, _dynsec) = Mosquitto::refusing_secrets();
    let sink = Mosquitto::start(false);
    let collector = Collector::start(sink.tcp_port, "collector-refusal", "cluster/#", true).await;
    let source_side = json!({"mqtt": {"url": source.tcp_url()}, "persistentSession": true,
                             "clientId": "shared-refusal"});
    let spec_a = spec(json!({
        "source": source_side, "sink": {"url": sink.tcp_url()},
        "routes": [{"from": "secret/#", "to": "cluster/a/{topic}", "qos": 1}]}));
    let spec_b = spec(json!({
        "source": source_side, "sink": {"url": sink.tcp_url()},
        "routes": [{"from": "devices/+/telemetry", "to": "cluster/b/{2}", "qos": 1}]}));
    let metrics = Arc::new(Metrics::new());
    let manager = RelayManager::new(Some(metrics.clone() as Arc<dyn ObserverSource>));
    let no_secrets = || Arc::new(MapSecrets::default());
    let mut a = start_relay(&manager, "refusal-a", &spec_a, no_secrets()).await;
    let mut b = start_relay(&manager, "refusal-b", &spec_b, no_secrets()).await;
    wait_connected(&mut a, Duration::from_secs(15)).await;
    wait_connected(&mut b, Duration::from_secs(15)).await;
    // The broker restarts: the connection subscribes both bridges' filters in one go.
    source.restart();
    let refused = |bridge: &str| source_subscriptions_refused(&metrics, bridge);
    // Connected again once every SUBACK of the new connection is in.
    let deadline = Instant::now() + Duration::from_secs(20);
    let again = |v: &RelayView| {
        v.stats
            .reconnects
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
            && v.status.borrow().source == SideState::Connected
    };
    while !(again(&a) && again(&b)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        again(&a) && again(&b),
        "the shared source did not reconnect"
    );
    assert_eq!(
        refused("refusal-a"),
        Some(1.0),
        "{}",
        metrics.encode_prometheus_text()
    );
    assert_eq!(
        refused("refusal-b"),
        Some(0.0),
        "{}",
        metrics.encode_prometheus_text()
    );
    let told_a = a.status.borrow().last_error.clone().expect("a is told");
    assert_eq!(told_a.kind, RelayErrorKind::SubscriptionRefused);
    assert!(
        told_a
            .message
            .contains("refused a subscription to secret/#"),
        "{}",
        told_a.message
    );
    let told_b = b.status.borrow().last_error.clone();
    assert!(
        told_b
            .as_ref()
            .is_none_or(|e| e.kind != RelayErrorKind::SubscriptionRefused),
        "b was told of a's refusal: {told_b:?}"
    );
    // b relays on.
    publish_all(
        source.tcp_port,
        "publisher-refusal",
        vec![("devices/d1/telemetry".to_owned(), b"on".to_vec(), false)],
        QoS::AtLeastOnce,
    )
    .await;
    assert!(
        collector
            .wait_for_distinct(1, Duration::from_secs(20))
            .await,
        "b stopped relaying"
    );
    manager.stop_all().await;
}

/// Bridge `bridge`'s `iot_operator_bridge_subscriptions_refused` on its source side (the
/// sink's series is there too, in any order).
fn source_subscriptions_refused(
    metrics: &iot_operator::telemetry::metrics::Metrics,
    bridge: &str,
) -> Option<f64> {
    let text = metrics.encode_prometheus_text();
    text.lines()
        .find(|l| {
            l.starts_with("iot_operator_bridge_subscriptions_refused{")
                && l.contains(&format!("bridge=\"test/{bridge}\",side=\"source\""))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
}

/// As above, but the bridge whose subscription is refused joins the shared source connection
/// while it is up (it subscribes its filters itself): it alone is told, naming the filter, and
/// counts it at once, without waiting for a reconnect. Before, a refusal on this path named no
/// filter, was told to every bridge on the connection and counted by none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_subscription_of_a_bridge_joining_a_live_shared_source_is_told_to_it_alone() {
    use iot_operator::relay::{ObserverSource, RelayErrorKind};
    use iot_operator::telemetry::metrics::Metrics;
    logs();
    let (source, _dynsec) = Mosquitto::refusing_secrets();
    let sink = Mosquitto::start(false);
    let collector = Collector::start(sink.tcp_port, "collector-join", "cluster/#", true).await;
    let source_side = json!({"mqtt": {"url": source.tcp_url()}, "persistentSession": true,
                             "clientId": "shared-join"});
    let spec_good = spec(json!({
        "source": source_side, "sink": {"url": sink.tcp_url()},
        "routes": [{"from": "devices/+/telemetry", "to": "cluster/b/{2}", "qos": 1}]}));
    let spec_secret = spec(json!({
        "source": source_side, "sink": {"url": sink.tcp_url()},
        "routes": [{"from": "secret/#", "to": "cluster/a/{topic}", "qos": 1}]}));
    let metrics = Arc::new(Metrics::new());
    let manager = RelayManager::new(Some(metrics.clone() as Arc<dyn ObserverSource>));
    let no_secrets = || Arc::new(MapSecrets::default());
    let mut good = start_relay(&manager, "join-good", &spec_good, no_secrets()).await;
    wait_connected(&mut good, Duration::from_secs(15)).await;
    let secret = start_relay(&manager, "join-secret", &spec_secret, no_secrets()).await;
    let refused = |bridge: &str| source_subscriptions_refused(&metrics, bridge);
    let deadline = Instant::now() + Duration::from_secs(20);
    let told = |v: &RelayView| {
        v.status
            .borrow()
            .last_error
            .clone()
            .filter(|e| e.kind == RelayErrorKind::SubscriptionRefused)
    };
    while (told(&secret).is_none() || refused("join-secret") != Some(1.0))
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let told_secret = told(&secret).expect("the joining bridge is told");
    assert!(
        told_secret
            .message
            .contains("refused a subscription to secret/#"),
        "{}",
        told_secret.message
    );
    assert_eq!(
        refused("join-secret"),
        Some(1.0),
        "{}",
        metrics.encode_prometheus_text()
    );
    // No reconnect was needed for that.
    assert_eq!(
        secret
            .stats
            .reconnects
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    assert_eq!(told(&good), None, "the other bridge was told");
    assert_eq!(
        refused("join-good"),
        Some(0.0),
        "{}",
        metrics.encode_prometheus_text()
    );
    publish_all(
        source.tcp_port,
        "publisher-join",
        vec![("devices/d1/telemetry".to_owned(), b"on".to_vec(), false)],
        QoS::AtLeastOnce,
    )
    .await;
    assert!(
        collector
            .wait_for_distinct(1, Duration::from_secs(20))
            .await,
        "the other bridge stopped relaying"
    );
    manager.stop_all().await;
}

/// Two bridges name the same source broker with the same client id: they read through one
/// connection, each with its own routes. A message both bridges' routes match reaches both
/// sinks' topics, and is acknowledged to the source once both copies are done. Bridge b's
/// configuration changes mid-stream (it drains and leaves; its successor joins; the connection
/// reconnects so that the broker delivers again what b held back): of 2 x 3 x 1,000 QoS 1
/// messages none is lost on any of the three output topics. Deleting b leaves a relaying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridges_with_the_same_source_identity_share_one_connection_and_lose_nothing() {
    use std::sync::atomic::Ordering::Relaxed;
    logs();
    let source = Mosquitto::start_logged();
    let sink = Mosquitto::start(false);
    let collector =
        Collector::start(sink.tcp_port, "collector-shared-source", "cluster/#", true).await;
    let source_side = json!({"mqtt": {"url": source.tcp_url()}, "persistentSession": true,
                             "clientId": "shared-source"});
    let spec_a = spec(json!({
        "source": source_side, "sink": {"url": sink.tcp_url()},
        "routes": [{"from": "devices/+/telemetry", "to": "cluster/a/{2}", "qos": 1}]}));
    // b also takes every message a takes.
    let b_routes = json!([{"from": "+/+/telemetry", "to": "cluster/b/{1}/{2}", "qos": 1}]);
    let spec_b = spec(json!({
        "source": source_side, "sink": {"url": sink.tcp_url()}, "routes": b_routes}));
    let manager = RelayManager::new(None);
    let no_secrets = || Arc::new(MapSecrets::default());
    let mut a = start_relay(&manager, "source-a", &spec_a, no_secrets()).await;
    let mut b = start_relay(&manager, "source-b", &spec_b, no_secrets()).await;
    wait_connected(&mut a, Duration::from_secs(15)).await;
    wait_connected(&mut b, Duration::from_secs(15)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let reconnects = |v: &RelayView| v.stats.reconnects.load(Relaxed);
    assert_eq!((reconnects(&a), reconnects(&b)), (0, 0));
    assert_eq!(source.connections("shared-source"), 1, "{}", source.log());

    let per_topic = 1000;
    let (msgs_a, ids) = stream("devices", 3, per_topic);
    let (msgs_b, _) = stream("things", 3, per_topic);
    let mut topics = Vec::new();
    for d in &ids {
        topics.push(format!("cluster/a/{d}"));
        topics.push(format!("cluster/b/devices/{d}"));
        topics.push(format!("cluster/b/things/{d}"));
    }
    let port = source.tcp_port;
    let publishers = [
        ("publisher-source-a", msgs_a),
        ("publisher-source-b", msgs_b),
    ]
    .map(|(id, msgs)| {
        tokio::spawn(async move { publish_all(port, id, msgs, QoS::AtLeastOnce).await })
    });
    assert!(collector.wait_for(1500, Duration::from_secs(30)).await);
    // A change of b's configuration that leaves its output as it was.
    let mut changed = b_routes.clone();
    changed
        .as_array_mut()
        .expect("routes")
        .push(json!({"from": "never/#", "to": "never/{topic}", "qos": 1}));
    let spec_b2 = spec(json!({
        "source": source_side, "sink": {"url": sink.tcp_url()}, "routes": changed}));
    let changed_at = collector.distinct();
    let b2 = start_relay(&manager, "source-b", &spec_b2, no_secrets()).await;
    assert!(b2.started);
    for p in publishers {
        p.await.unwrap();
    }
    let total = 3 * 3 * per_topic;
    let arrived = collector
        .wait_for_distinct(total, Duration::from_secs(60))
        .await;
    // Not checked for order: what b held back, Mosquitto 2.0.11 queues past its in-flight
    // window, and after the reconnect it sends some of that queue after newer messages (its own
    // log shows message ids out of order).
    let (lost, dups) = count_stream(&collector.snapshot(), &topics, per_topic, false);
    println!(
        "FIGURES shared source: 2 bridges, 6000 qos1 messages in, {total} out, b changed after {changed_at}: lost={lost} duplicates={dups} source connections={}",
        source.connections("shared-source")
    );
    assert!(arrived, "only {} of {total} arrived", collector.distinct());
    assert_eq!(lost, 0);
    // One connection for both, and one more after b changed: never two at once.
    assert_eq!(source.connections("shared-source"), 2, "{}", source.log());
    assert_eq!(source.takeovers("shared-source"), 0, "{}", source.log());

    // b is deleted: after b's grace the connection reconnects, subscribes what a reads, and
    // unsubscribes what only b read (which covered a's filter); a carries on.
    assert!(manager.stop(&ConnectionKey::new("test/source-b", 0)).await);
    assert_eq!(b2.status.borrow().source, SideState::Stopped);
    let reconnected = Instant::now();
    while !source
        .log()
        .contains("Received UNSUBSCRIBE from shared-source")
        && reconnected.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = source.log();
    let last_session = &log[log.rfind("as shared-source").unwrap_or(0)..];
    assert!(
        last_session.contains("shared-source 1 devices/+/telemetry")
            && last_session.contains("Received UNSUBSCRIBE from shared-source")
            && last_session.contains("shared-source +/+/telemetry"),
        "{last_session}"
    );
    assert_eq!(source.connections("shared-source"), 3, "{}", source.log());
    let more = numbered("devices/d9/telemetry", 100);
    publish_all(port, "publisher-source-a", more, QoS::AtLeastOnce).await;
    let arrived = collector
        .wait_for_distinct(total + 100, Duration::from_secs(20))
        .await;
    assert!(arrived, "bridge a stopped relaying when b left");
    assert_eq!(a.status.borrow().source, SideState::Connected);
    manager.stop_all().await;
    assert!(source.disconnected("shared-source"), "{}", source.log());
    assert_eq!(source.takeovers("shared-source"), 0, "{}", source.log());
}

/// On a shared sink connection, a message the broker refuses by closing the connection (the
/// proxy plays AWS IoT's part, as above) costs only the bridge that sent it: that message is
/// isolated and dropped, the other bridge drops nothing, and every other message arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_message_on_a_shared_connection_is_dropped_by_its_own_bridge_only() {
    use std::sync::atomic::Ordering::Relaxed;
    logs();
    let (source, _sink, _proxy, proxy_port, collector) =
        refusing_sink("collector-shared-refused").await;
    let bridge = |prefix: &str| {
        spec(json!({
            "source": {"mqtt": {"url": source.tcp_url()}},
            "sink": {"url": format!("mqtt://127.0.0.1:{proxy_port}"), "clientId": "shared-refused"},
            "routes": [{"from": format!("{prefix}/+/telemetry"), "to": "cluster/{2}/telemetry", "qos": 1}]}))
    };
    let manager = RelayManager::new(None);
    let no_secrets = || Arc::new(MapSecrets::default());
    let mut a = start_relay(&manager, "refused-a", &bridge("devices"), no_secrets()).await;
    let mut b = start_relay(&manager, "refused-b", &bridge("things"), no_secrets()).await;
    wait_connected(&mut a, Duration::from_secs(15)).await;
    wait_connected(&mut b, Duration::from_secs(15)).await;
    let mut msgs_a = numbered("devices/da/telemetry", 30);
    msgs_a.insert(
        15,
        (
            "devices/denied/telemetry".to_owned(),
            b"refused".to_vec(),
            false,
        ),
    );
    // b keeps publishing while a's message is refused, so that b has messages in flight
    // whenever the connection is closed.
    let msgs_b = numbered("things/db/telemetry", 300);
    let src = source.tcp_port;
    let publisher_b = tokio::spawn(async move {
        for chunk in msgs_b.chunks(10) {
            publish_all(src, "publisher-refused-b", chunk.to_vec(), QoS::AtLeastOnce).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    publish_all(src, "publisher-refused-a", msgs_a, QoS::AtLeastOnce).await;
    publisher_b.await.unwrap();
    assert!(
        collector
            .wait_for_distinct(330, Duration::from_secs(60))
            .await,
        "the streams behind the refused message stopped: {} arrived",
        collector.distinct()
    );
    let topics = [
        "cluster/da/telemetry".to_owned(),
        "cluster/db/telemetry".to_owned(),
    ];
    let (lost, _) = check_stream(&collector.snapshot(), &topics[..1], 30);
    let (lost_b, _) = check_stream(&collector.snapshot(), &topics[1..], 300);
    assert_eq!((lost, lost_b), (0, 0));
    let deadline = Instant::now() + Duration::from_secs(30);
    while a.stats.refused.load(Relaxed) == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "FIGURES shared refused: refused a={} b={}, sink reconnects {}",
        a.stats.refused.load(Relaxed),
        b.stats.refused.load(Relaxed),
        b.stats.reconnects.load(Relaxed)
    );
    assert_eq!(a.stats.refused.load(Relaxed), 1);
    assert_eq!(
        b.stats.dropped.load(Relaxed),
        0,
        "an innocent bridge dropped a message"
    );
    manager.stop_all().await;
}

/// `n` messages to `topic`, numbered from 0.
fn numbered(topic: &str, n: usize) -> Vec<support::mqtt::Outgoing> {
    (0..n)
        .map(|i| (topic.to_owned(), i.to_string().into_bytes(), false))
        .collect()
}

/// Source and sink are one Mosquitto, reached as `127.0.0.1` and as `localhost`, which
/// `validate()` cannot tell apart; the route `a/#` -> `a/copy/{topic}` reads its own output.
/// One message in makes one copy: the copy read back is dropped as an echo, counted, and said
/// in status. Without the guard one message became a hundred within 3 s, and topics grew until
/// the broker dropped the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridge_on_one_broker_under_two_names_makes_one_copy_not_a_storm() {
    logs();
    let broker = Mosquitto::start(false);
    let collector = Collector::start(broker.tcp_port, "collector-echo", "a/#", false).await;
    for qos in [1, 0] {
        let s = spec(json!({
            "source": {"mqtt": {"url": broker.tcp_url()}},
            "sink": {"url": format!("mqtt://localhost:{}", broker.tcp_port)},
            "routes": [{"from": "a/#", "to": "a/copy/{topic}", "qos": qos}]
        }));
        let manager = RelayManager::new(None);
        let mut view = start_relay(
            &manager,
            &format!("echo-{qos}"),
            &s,
            Arc::new(MapSecrets::default()),
        )
        .await;
        wait_connected(&mut view, Duration::from_secs(15)).await;
        let before = collector.count();
        let q = if qos == 1 {
            QoS::AtLeastOnce
        } else {
            QoS::AtMostOnce
        };
        publish_all(
            broker.tcp_port,
            &format!("publisher-echo-{qos}"),
            vec![(format!("a/{qos}"), b"once".to_vec(), false)],
            q,
        )
        .await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let arrived: Vec<String> = collector
            .snapshot()
            .iter()
            .skip(before)
            .map(|r| r.topic.clone())
            .collect();
        let looped = view.stats.looped.load(std::sync::atomic::Ordering::Relaxed);
        let last = view.status.borrow().last_dropped.clone();
        println!(
            "echo guard, QoS {qos}: one message in, {} out ({arrived:?}); {looped} echo dropped; {last:?}",
            arrived.len()
        );
        assert_eq!(
            arrived,
            vec![format!("a/{qos}"), format!("a/copy/a/{qos}")],
            "the original and exactly one copy"
        );
        assert_eq!(looped, 1, "the copy read back is dropped once");
        assert!(
            last.is_some_and(|d| d.message.contains("read back")),
            "status says why"
        );
        manager.stop_all().await;
    }
}

/// An identity route (`from: a/#`, no `to`) on one broker under two names: the copy is the
/// original's twin, and is dropped as an echo only because the relay found that `127.0.0.1`
/// and `localhost` resolve to one address. Without that, one message became a storm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_route_on_one_broker_under_two_names_makes_one_copy() {
    logs();
    let broker = Mosquitto::start(false);
    let collector = Collector::start(broker.tcp_port, "collector-twin", "a/#", false).await;
    let s = spec(json!({
        "source": {"mqtt": {"url": broker.tcp_url()}},
        "sink": {"url": format!("mqtt://localhost:{}", broker.tcp_port)},
        "routes": [{"from": "a/#", "qos": 1}]
    }));
    let manager = RelayManager::new(None);
    let mut view = start_relay(&manager, "twin", &s, Arc::new(MapSecrets::default())).await;
    wait_connected(&mut view, Duration::from_secs(15)).await;
    publish_all(
        broker.tcp_port,
        "publisher-twin",
        vec![("a/x".to_owned(), b"once".to_vec(), false)],
        QoS::AtLeastOnce,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let arrived = collector.count();
    let looped = view.stats.looped.load(std::sync::atomic::Ordering::Relaxed);
    println!("identity route on one broker: one message in, {arrived} out; {looped} echo dropped");
    assert_eq!(arrived, 2, "the original and exactly one copy");
    assert_eq!(looped, 1, "the copy read back is dropped once");
    manager.stop_all().await;
}

/// The echo guard never takes a device's repeated message for an echo: source and sink are
/// two brokers, the route is an identity route (which could read its own output if they were
/// one), and a device sends the same message on the same topic six times. All six arrive.
/// Before, every second one was dropped as "a copy this bridge published".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_repeats_itself_loses_nothing_on_an_identity_route() {
    logs();
    let source = Mosquitto::start(false);
    let sink = Mosquitto::start(false);
    let collector = Collector::start(sink.tcp_port, "collector-repeat", "r/#", false).await;
    let s = spec(json!({
        "source": {"mqtt": {"url": source.tcp_url()}},
        "sink": {"url": sink.tcp_url()},
        "routes": [{"from": "r/#", "qos": 1}]
    }));
    let manager = RelayManager::new(None);
    let mut view = start_relay(&manager, "repeat", &s, Arc::new(MapSecrets::default())).await;
    wait_connected(&mut view, Duration::from_secs(15)).await;
    for round in 0..6 {
        publish_all(
            source.tcp_port,
            "publisher-repeat",
            vec![("r/door".to_owned(), b"open".to_vec(), false)],
            QoS::AtLeastOnce,
        )
        .await;
        assert!(
            collector.wait_for(round + 1, Duration::from_secs(10)).await,
            "reading {} of the same message arrived ({} did)",
            round + 1,
            collector.count()
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let looped = view.stats.looped.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(collector.count(), 6, "six readings in, six out");
    assert_eq!(looped, 0, "nothing taken for an echo");
    manager.stop_all().await;
}

/// `--read-linger-ms`: after a read that emptied the socket, the next read waits for the end of
/// the linger (a message that arrives meanwhile waits with it); a stream larger than the
/// broker's in-flight limit still arrives whole and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_linger_holds_the_next_read_and_loses_nothing() {
    logs();
    let source = Mosquitto::start(false);
    let sink = Mosquitto::start(false);
    let collector = Collector::start(sink.tcp_port, "collector-linger", "out/#", true).await;
    let s = spec(json!({
        "source": {"mqtt": {"url": source.tcp_url()}},
        "sink": {"url": sink.tcp_url()},
        "routes": [{"from": "in/#", "to": "out/{topic}", "qos": 1}]
    }));
    let linger = Duration::from_millis(300);
    let mut built = build("linger", &s, Arc::new(MapSecrets::default())).await;
    built.config.source.read_linger = linger;
    built.config.sink.read_linger = linger;
    let manager = RelayManager::new(None);
    let mut view = manager
        .ensure(
            &ConnectionKey::new("test/linger", 0),
            built.fingerprint,
            built.config,
        )
        .await
        .expect("the manager is not paused");
    wait_connected(&mut view, Duration::from_secs(15)).await;

    // The first message is read at once (nothing was read for a while); the second, published
    // as soon as the first has arrived, waits for the rest of the linger that read started.
    let one = |n: &str| vec![("in/a".to_owned(), n.as_bytes().to_vec(), false)];
    tokio::time::sleep(linger).await;
    let first = Instant::now();
    publish_all(source.tcp_port, "linger-1", one("0"), QoS::AtLeastOnce).await;
    assert!(collector.wait_for(1, Duration::from_secs(10)).await);
    let first_took = first.elapsed();
    let second = Instant::now();
    publish_all(source.tcp_port, "linger-2", one("1"), QoS::AtLeastOnce).await;
    assert!(collector.wait_for(2, Duration::from_secs(10)).await);
    let second_took = second.elapsed();
    println!(
        "FIGURES e2e_read_linger linger_ms={} first_ms={} second_ms={}",
        linger.as_millis(),
        first_took.as_millis(),
        second_took.as_millis()
    );
    assert!(
        second_took + first_took >= linger,
        "the second message took {second_took:?} after the first's {first_took:?}: it did not wait for the linger of {linger:?}"
    );
    assert!(
        second_took < linger * 5,
        "the second message took {second_took:?}, far beyond the linger of {linger:?}"
    );

    // 2,000 messages, 20 times the broker's in-flight limit: whole and in order.
    let (msgs, ids) = stream("in", 5, 400);
    let topics: Vec<String> = ids
        .iter()
        .map(|d| format!("out/in/{d}/telemetry"))
        .collect();
    publish_all(source.tcp_port, "linger-3", msgs, QoS::AtLeastOnce).await;
    assert!(
        collector.wait_for(2 + 2000, Duration::from_secs(60)).await,
        "only {} arrived",
        collector.count()
    );
    let (lost, _dups) = check_stream(&collector.snapshot(), &topics, 400);
    assert_eq!(lost, 0);
    manager.stop_all().await;
}

/// Plain-TCP connections read and write with the relay's own buffers (a read takes in up to
/// 256 KiB): messages of every size from 1 B to 20 KiB, so that packets straddle reads at every
/// offset, arrive whole, byte for byte, and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_of_every_size_cross_read_boundaries_whole_and_in_order() {
    logs();
    let source = Mosquitto::start(false);
    let sink = Mosquitto::start(false);
    let collector = Collector::start(sink.tcp_port, "collector-sizes", "out/#", true).await;
    let s = spec(json!({
        "source": {"mqtt": {"url": source.tcp_url()}},
        "sink": {"url": sink.tcp_url()},
        "routes": [{"from": "in/#", "to": "out/{topic}", "qos": 1}]
    }));
    let manager = RelayManager::new(None);
    let mut view = start_relay(&manager, "sizes", &s, Arc::new(MapSecrets::default())).await;
    wait_connected(&mut view, Duration::from_secs(15)).await;

    let n: usize = 1_500;
    let payload = |i: usize| -> Vec<u8> {
        let len = 8 + (i * 7_919) % 20_000;
        let mut p = (i as u64).to_be_bytes().to_vec();
        p.resize(len, (i % 251) as u8);
        p
    };
    let msgs = (0..n)
        .map(|i| ("in/sizes".to_owned(), payload(i), false))
        .collect();
    publish_all(source.tcp_port, "publisher-sizes", msgs, QoS::AtLeastOnce).await;
    assert!(
        collector
            .wait_for_distinct(n, Duration::from_secs(60))
            .await,
        "only {} of {n} arrived",
        collector.distinct()
    );
    let mut last = None;
    for r in collector.snapshot() {
        assert_eq!(r.topic, "out/in/sizes");
        let i = u64::from_be_bytes(r.payload[..8].try_into().expect("8 bytes")) as usize;
        assert_eq!(
            r.payload.as_ref(),
            payload(i).as_slice(),
            "message {i} changed"
        );
        if let Some(prev) = last {
            assert!(i > prev, "message {i} arrived after {prev}");
        }
        last = Some(i);
    }
    manager.stop_all().await;
}

/// A burst larger than the sockets hold (600 messages of 16 KiB) into a TLS sink, on the
/// relay's own wire: its writes fill the socket, and every message still arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_into_a_tls_sink_arrives_whole() {
    let certs = tls_certs();
    let source = Mosquitto::start(false);
    let (sink, sink_tls, _) = tls_broker(&certs);
    let secrets = Arc::new(MapSecrets::default());
    secrets.set("ca", "ca.crt", &certs.ca_pem);
    let s = spec(json!({
        "source": {"mqtt": {"url": source.tcp_url()}},
        "sink": {"url": format!("mqtts://127.0.0.1:{sink_tls}"), "caSecret": {"name": "ca", "key": "ca.crt"}},
        "routes": [{"from": "t/#", "qos": 1}]
    }));
    let collector = Collector::start(sink.tcp_port, "tls-burst-collector", "t/#", false).await;
    let manager = RelayManager::new(None);
    let mut view = start_relay(&manager, "tls-burst", &s, secrets).await;
    wait_connected(&mut view, Duration::from_secs(15)).await;
    let started = Instant::now();
    let big = (0..600)
        .map(|i| {
            (
                "t/b".to_string(),
                format!("{i:016}").repeat(1024).into_bytes(),
                false,
            )
        })
        .collect();
    publish_all(source.tcp_port, "tls-burst-pub", big, QoS::AtLeastOnce).await;
    let arrived = collector
        .wait_for_distinct(600, Duration::from_secs(60))
        .await;
    println!(
        "FIGURES e2e_tls_burst messages=600 bytes=16384 ms={}",
        started.elapsed().as_millis()
    );
    assert!(arrived, "{} of 600 arrived over TLS", collector.distinct());
    manager.stop_all().await;
}
