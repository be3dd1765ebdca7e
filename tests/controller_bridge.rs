//! The TopicBridge controller with a real relay: the API server is a `tower_test` mock (no API
//! server runs here), the brokers are real Mosquitto processes.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use iot_operator::api::TopicBridge;
use iot_operator::controller::bridge;
use kube::runtime::controller::Action;
use serde_json::json;
use support::Mosquitto;
use support::apiserver::{context, serve_any};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_bridge_runs_a_relay_and_reports_connected() {
    let source = Mosquitto::start(true);
    let sink = Mosquitto::start(false);
    let (ctx, handle) = context(
        aws_config::SdkConfig::builder()
            .behavior_version(aws_config::BehaviorVersion::latest())
            .build(),
    );
    let calls = serve_any(handle);
    let tb: TopicBridge = serde_json::from_value(json!({
        "apiVersion": "iot.operator.dev/v1alpha1", "kind": "TopicBridge",
        "metadata": {"name": "ok", "namespace": "team-a", "uid": "u-3", "generation": 4, "resourceVersion": "1"},
        "spec": {"source": {"mqtt": {"url": source.ws_url()}}, "sink": {"url": sink.tcp_url()}, "routes": [{"from": "a/#"}]}
    }))
    .unwrap();
    let action = bridge::reconcile(Arc::new(tb.clone()), ctx.clone())
        .await
        .expect("reconcile");
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
    assert_eq!(ctx.relays.keys().await, vec!["team-a/ok".to_string()]);

    // The status writer reports the connection as it comes up.
    let start = Instant::now();
    let connected = loop {
        let found = calls.lock().unwrap().iter().any(|c| {
            c.method == "PATCH"
                && c.uri.starts_with(
                    "/apis/iot.operator.dev/v1alpha1/namespaces/team-a/topicbridges/ok/status",
                )
                && c.body.contains("\"connectionState\":\"Connected\"")
                && c.body.contains("\"observedGeneration\":4")
        });
        if found || start.elapsed() > Duration::from_secs(15) {
            break found;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(connected, "{:#?}", calls.lock().unwrap());
    let body = calls
        .lock()
        .unwrap()
        .iter()
        .rev()
        .find(|c| c.method == "PATCH" && c.body.contains("\"connectionState\":\"Connected\""))
        .unwrap()
        .body
        .clone();
    assert!(
        body.contains("SourceConnected") && body.contains("SinkConnected"),
        "{body}"
    );
    assert!(
        calls
            .lock()
            .unwrap()
            .iter()
            .any(|c| c.method == "POST" && c.body.contains("\"reason\":\"Connected\"")),
        "an Event on the transition to Connected"
    );

    // Reconciling the same spec again keeps the relay; a new spec replaces it.
    bridge::reconcile(Arc::new(tb.clone()), ctx.clone())
        .await
        .expect("reconcile");
    let mut changed = tb.clone();
    changed.spec.routes[0].from = "b/#".into();
    changed.metadata.generation = Some(5);
    let t = Instant::now();
    bridge::reconcile(Arc::new(changed), ctx.clone())
        .await
        .expect("reconcile");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "an idle relay drains at once ({:?})",
        t.elapsed()
    );
    assert_eq!(ctx.relays.keys().await.len(), 1);
    ctx.relays.stop_all().await;
}
