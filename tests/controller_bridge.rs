//! The TopicBridge controller with a real relay: the API server is a `tower_test` mock (no API
//! server runs here), the brokers are real Mosquitto processes.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use iot_operator::api::TopicBridge;
use iot_operator::controller::topic_bridge;
use iot_operator::tenancy::TenancyConfig;
use kube::runtime::controller::Action;
use serde_json::json;
use support::Mosquitto;
use support::apiserver::{context, context_with, serve_any, serve_any_as, serve_any_with};

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
    let action = topic_bridge::reconcile(Arc::new(tb.clone()), ctx.clone())
        .await
        .expect("reconcile");
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
    assert_eq!(
        ctx.relays.keys().await,
        vec![iot_operator::relay::ConnectionKey::new("team-a/ok", 0)]
    );

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
    topic_bridge::reconcile(Arc::new(tb.clone()), ctx.clone())
        .await
        .expect("reconcile");
    let mut changed = tb.clone();
    changed.spec.routes[0].from = "b/#".into();
    changed.metadata.generation = Some(5);
    let t = Instant::now();
    topic_bridge::reconcile(Arc::new(changed), ctx.clone())
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

/// Tenancy rules: a bridge that would sign with the operator's own AWS identity, or connect its
/// source or sink to an endpoint outside its namespace's lists, gets NotAllowed and no relay; the
/// same bridge with allowed endpoints runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridge_outside_the_tenancy_rules_gets_no_relay() {
    let sink = Mosquitto::start(false);
    let source = Mosquitto::start(true);
    let sdk = aws_config::SdkConfig::builder()
        .behavior_version(aws_config::BehaviorVersion::latest())
        .build();
    let bridge_json = |source: serde_json::Value| {
        json!({
            "apiVersion": "iot.operator.dev/v1alpha1", "kind": "TopicBridge",
            "metadata": {"name": "tb", "namespace": "team-a", "uid": "u-4", "generation": 1, "resourceVersion": "1"},
            "spec": {"source": source, "sink": {"url": sink.tcp_url()}, "routes": [{"from": "a/#"}]}
        })
    };
    let bridge =
        |v: &serde_json::Value| -> TopicBridge { serde_json::from_value(v.clone()).unwrap() };
    let status_patch = |calls: &[support::apiserver::Call]| {
        calls
            .iter()
            .find(|c| c.method == "PATCH" && c.uri.contains("/topicbridges/tb/status"))
            .map(|c| c.body.clone())
            .unwrap_or_default()
    };

    // Default rules: the operator's own credentials are not for tenants.
    let (ctx, handle) = context_with(sdk.clone(), TenancyConfig::default());
    let aws_json = bridge_json(
        json!({"awsIot": {"endpoint": "abc-ats.iot.eu-west-1.amazonaws.com", "region": "eu-west-1"}}),
    );
    let calls = serve_any_as(handle, aws_json.clone());
    let aws = bridge(&aws_json);
    let action = topic_bridge::reconcile(Arc::new(aws), ctx.clone())
        .await
        .expect("reconcile");
    assert_eq!(action, Action::await_change());
    assert!(
        ctx.relays.keys().await.is_empty(),
        "no relay for a refused bridge"
    );
    let body = status_patch(&calls.lock().unwrap());
    assert!(body.contains("\"reason\":\"NotAllowed\""), "{body}");
    assert!(body.contains("spec.source.awsIot.credentials"), "{body}");

    // Rules that list one endpoint: the loopback broker is not it.
    let rules: TenancyConfig = serde_yaml::from_str(
        "rules:\n  - namespaces: [team-a]\n    endpoints: [broker.example.com]\n",
    )
    .unwrap();
    let mqtt_json = bridge_json(json!({"mqtt": {"url": source.ws_url()}}));
    let mqtt = bridge(&mqtt_json);
    let body = refused(&sdk, rules, &mqtt_json, &status_patch).await;
    assert!(
        body.contains("spec.source.mqtt.url") && body.contains("127.0.0.1"),
        "{body}"
    );

    // Default rules: sinks only among the Services of the bridge's own namespace; a loopback
    // sink (a host of the author's choosing) is refused before anything connects.
    let body = refused(&sdk, TenancyConfig::default(), &mqtt_json, &status_patch).await;
    assert!(
        body.contains("\"reason\":\"NotAllowed\"")
            && body.contains("spec.sink.url")
            && body.contains("*.team-a.svc"),
        "{body}"
    );

    // The control: rules that allow this sink run the bridge.
    let rules: TenancyConfig = serde_yaml::from_str(
        "rules:\n  - namespaces: [team-a]\n    endpoints: ['*']\n    sinkEndpoints: [127.0.0.1]\n",
    )
    .unwrap();
    let (ctx, handle) = context_with(sdk, rules);
    let _calls = serve_any_as(handle, mqtt_json);
    let action = topic_bridge::reconcile(Arc::new(mqtt), ctx.clone())
        .await
        .expect("reconcile");
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
    assert_eq!(
        ctx.relays.keys().await,
        vec![iot_operator::relay::ConnectionKey::new("team-a/tb", 0)]
    );
    ctx.relays.stop_all().await;
}

/// Reconciles `tb` under `rules` against a mock API server, checks that no relay runs, and
/// returns the status the controller wrote (found by `status`).
async fn refused(
    sdk: &aws_config::SdkConfig,
    rules: TenancyConfig,
    tb: &serde_json::Value,
    status: &dyn Fn(&[support::apiserver::Call]) -> String,
) -> String {
    let (ctx, handle) = context_with(sdk.clone(), rules);
    let calls = serve_any_as(handle, tb.clone());
    let bridge: TopicBridge = serde_json::from_value(tb.clone()).unwrap();
    topic_bridge::reconcile(Arc::new(bridge), ctx.clone())
        .await
        .expect("reconcile");
    assert!(
        ctx.relays.keys().await.is_empty(),
        "no relay for a refused bridge"
    );
    status(&calls.lock().unwrap())
}

/// The body of the first status write among the calls a mock API server saw.
fn first_status(calls: &std::sync::Mutex<Vec<support::apiserver::Call>>) -> String {
    calls
        .lock()
        .unwrap()
        .iter()
        .find(|c| c.uri.contains("/status"))
        .map(|c| c.body.clone())
        .unwrap_or_default()
}

const SINK_PASSWORD: &str = "controller-password-Numbat-7";
/// `SINK_PASSWORD` as the API server returns it (base64).
const SINK_PASSWORD_B64: &str = "Y29udHJvbGxlci1wYXNzd29yZC1OdW1iYXQtNw==";

/// A Secret read through the API server reaches the relay, and its value appears in no status
/// and no Event the controller writes: not when connected, not when a key is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_values_stay_out_of_status_and_events() {
    let source = Mosquitto::start(true);
    let sink = Mosquitto::start(false);
    let bridge_json = |key: &str| {
        json!({
            "apiVersion": "iot.operator.dev/v1alpha1", "kind": "TopicBridge",
            "metadata": {"name": "creds", "namespace": "team-a", "uid": "u-5", "generation": 1, "resourceVersion": "1"},
            "spec": {"source": {"mqtt": {"url": source.ws_url()}},
                     "sink": {"url": sink.tcp_url(), "credentialsSecret": {"name": "sink-creds", "passwordKey": key}},
                     "routes": [{"from": "a/#"}]}
        })
    };
    let secret = json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "sink-creds", "namespace": "team-a",
                     "annotations": {"iot.operator.dev/topic-bridges": "other, cre*"}},
        "data": {"username": "cmVsYXk=", "password": SINK_PASSWORD_B64}});
    let sdk = aws_config::SdkConfig::builder()
        .behavior_version(aws_config::BehaviorVersion::latest())
        .build();

    let ok = bridge_json("password");
    let ok_json = ok.clone();
    let (ctx, handle) = context(sdk.clone());
    let calls = serve_any_with(handle, ok.clone(), secret.clone());
    let tb: TopicBridge = serde_json::from_value(ok).unwrap();
    topic_bridge::reconcile(Arc::new(tb), ctx.clone())
        .await
        .expect("reconcile");
    let start = Instant::now();
    while !calls
        .lock()
        .unwrap()
        .iter()
        .any(|c| c.body.contains("\"connectionState\":\"Connected\""))
    {
        assert!(start.elapsed() < Duration::from_secs(15), "never connected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ctx.relays.stop_all().await;

    let missing = bridge_json("no-such-key");
    let (ctx, handle) = context(sdk);
    let calls2 = serve_any_with(handle, missing.clone(), secret.clone());
    let tb: TopicBridge = serde_json::from_value(missing).unwrap();
    assert!(
        topic_bridge::reconcile(Arc::new(tb), ctx.clone())
            .await
            .is_err()
    );
    let status = first_status(&calls2);
    assert!(
        status.contains("SecretNotFound") && status.contains("no-such-key"),
        "{status}"
    );

    // A Secret that does not name this bridge in its consent annotation is not used.
    let mut unconsenting = secret.clone();
    unconsenting["metadata"]["annotations"] = json!({"iot.operator.dev/topic-bridges": "other"});
    let (ctx, handle) = context(
        aws_config::SdkConfig::builder()
            .behavior_version(aws_config::BehaviorVersion::latest())
            .build(),
    );
    let calls3 = serve_any_with(handle, ok_json.clone(), unconsenting);
    let tb: TopicBridge = serde_json::from_value(ok_json).unwrap();
    assert!(
        topic_bridge::reconcile(Arc::new(tb), ctx.clone())
            .await
            .is_err()
    );
    assert!(
        ctx.relays.keys().await.is_empty(),
        "no relay without consent"
    );
    let status = first_status(&calls3);
    assert!(
        status.contains("\"reason\":\"NotAllowed\"")
            && status.contains("spec.sink.credentialsSecret")
            && status.contains("iot.operator.dev/topic-bridges"),
        "{status}"
    );

    let all: Vec<support::apiserver::Call> = calls
        .lock()
        .unwrap()
        .iter()
        .chain(calls2.lock().unwrap().iter())
        .chain(calls3.lock().unwrap().iter())
        .cloned()
        .collect();
    assert!(
        all.iter().any(|c| c.uri.contains("/secrets/sink-creds")),
        "the Secret was read"
    );
    let writes: Vec<_> = all.iter().filter(|c| c.method != "GET").collect();
    assert!(
        writes.len() >= 3,
        "status and Events were written: {writes:#?}"
    );
    for c in writes {
        assert!(
            !c.body.contains(SINK_PASSWORD) && !c.body.contains(SINK_PASSWORD_B64),
            "{} {} leaks the password",
            c.method,
            c.uri
        );
    }
}
