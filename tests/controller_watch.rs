//! The whole controller loop (`controller::run`) against a mocked API server (`tower_test`; no
//! API server runs here): an IotPolicyBinding that no longer deserializes is reported once, with
//! the field named, and does not stop the other binding from being reconciled.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Request, Response};
use iot_operator::aws::{AwsClients, AwsSettings};
use iot_operator::controller::{self, Settings};
use iot_operator::relay::RelayManager;
use iot_operator::telemetry::Metrics;
use iot_operator::telemetry::http::Readiness;
use iot_operator::tenancy::TenancyConfig;
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use support::apiserver::Call;
use tower_test::mock;

const ID: &str = "eu-west-1:0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";

fn binding(name: &str, principals: Value) -> Value {
    json!({"apiVersion": "iot.operator.dev/v1alpha1", "kind": "IotPolicyBinding",
        "metadata": {"name": name, "namespace": "team-a", "uid": format!("uid-{name}"), "generation": 1,
            "resourceVersion": "5", "creationTimestamp": "2026-11-01T00:00:00Z"},
        "spec": {"policy": {"name": "team-a-p"}, "principals": principals}})
}

fn list(kind: &str, items: Vec<Value>) -> Value {
    json!({"apiVersion": "iot.operator.dev/v1alpha1", "kind": format!("{kind}List"),
        "metadata": {"resourceVersion": "10"}, "items": items})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_binding_is_reported_and_the_others_are_reconciled() {
    // Written before the schema required a list: no longer an IotPolicyBinding.
    let bad = binding("bad", json!({"cognitoIdentityIds": "eu-west-1:not-a-list"}));
    let good = binding("good", json!({"cognitoIdentityIds": [ID]}));

    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let calls: Arc<Mutex<Vec<Call>>> = Arc::default();
    let record = calls.clone();
    let (bad2, good2) = (bad.clone(), good.clone());
    tokio::spawn(async move {
        // Watch requests are held open (never answered) for the whole test.
        let mut held = Vec::new();
        while let Some((req, send)) = handle.next_request().await {
            let method = req.method().to_string();
            let uri = req.uri().to_string();
            let bytes = req.into_body().collect_bytes().await.unwrap_or_default();
            let body = String::from_utf8_lossy(&bytes).to_string();
            record.lock().unwrap().push(Call {
                method: method.clone(),
                uri: uri.clone(),
                body: body.clone(),
            });
            let path = uri.split('?').next().unwrap_or_default().to_owned();
            let respond = match (method.as_str(), path.as_str()) {
                (_, _) if uri.contains("watch=") => {
                    held.push(send);
                    continue;
                }
                ("GET", "/apis/iot.operator.dev/v1alpha1/iotpolicybindings") => {
                    list("IotPolicyBinding", vec![bad2.clone(), good2.clone()])
                }
                ("GET", "/apis/iot.operator.dev/v1alpha1/topicbridges") => {
                    list("TopicBridge", vec![])
                }
                ("GET", p) if p.ends_with("/iotpolicybindings/bad") => bad2.clone(),
                ("PATCH", p) if p.ends_with("/iotpolicybindings/bad/status") => bad2.clone(),
                ("PATCH", p) if p.ends_with("/iotpolicybindings/good") => {
                    let mut g = good2.clone();
                    g["metadata"]["finalizers"] = json!([iot_operator::api::FINALIZER]);
                    g
                }
                ("POST", p) if p.ends_with("/events") => {
                    json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e"}, "eventTime": "2026-11-02T00:00:00.000000Z"})
                }
                _ => {
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404, "reason": "NotFound", "message": "unexpected call"})
                }
            };
            send.send_response(
                Response::builder()
                    .body(Body::from(serde_json::to_vec(&respond).unwrap()))
                    .unwrap(),
            );
        }
    });

    let client = Client::new(service, "default");
    let sdk = aws_config::SdkConfig::builder()
        .region(aws_config::Region::new("eu-west-1"))
        .behavior_version(aws_config::BehaviorVersion::latest())
        .build();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let readiness = Arc::new(Readiness::default());
    let run = tokio::spawn(controller::run(
        controller::Deps {
            watch_client: client.clone(),
            client,
            settings: Settings {
                tenancy: Arc::new(TenancyConfig::default()),
                ..Settings::default()
            },
            metrics: Arc::new(Metrics::new()),
            readiness: readiness.clone(),
            aws: Arc::new(AwsClients::from_config(sdk, AwsSettings::default(), None)),
            relays: Arc::new(RelayManager::new(None)),
            gate: iot_operator::controller::leader::WriteGate::always(),
            shards: None,
        },
        stop_rx,
    ));

    let seen = |pred: &dyn Fn(&Call) -> bool| calls.lock().unwrap().iter().any(pred);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(15) {
        let good_reconciled = seen(&|c| {
            c.method == "PATCH"
                && c.uri.contains("/iotpolicybindings/good")
                && c.body.contains("finalizers")
        });
        let bad_reported = seen(&|c| c.method == "POST" && c.body.contains("Malformed"));
        if good_reconciled && bad_reported {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Give a hot loop time to show itself.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), run).await;

    let calls = calls.lock().unwrap().clone();
    assert!(
        calls.iter().any(|c| c.method == "PATCH"
            && c.uri.contains("/iotpolicybindings/good")
            && c.body.contains(iot_operator::api::FINALIZER)),
        "the good binding was reconciled: {calls:#?}"
    );
    let status = calls
        .iter()
        .find(|c| c.method == "PATCH" && c.uri.contains("/iotpolicybindings/bad/status"))
        .unwrap_or_else(|| panic!("status of the malformed binding: {calls:#?}"));
    assert!(
        status.body.contains("\"reason\":\"Malformed\""),
        "{}",
        status.body
    );
    assert!(
        status.body.contains("spec.principals.cognitoIdentityIds"),
        "the field is named: {}",
        status.body
    );
    assert!(
        !status.body.contains("appliedTargets"),
        "only the conditions are patched: {}",
        status.body
    );
    let event = calls
        .iter()
        .find(|c| c.method == "POST" && c.body.contains("Malformed"))
        .expect("a Warning Event");
    assert!(event.body.contains("Warning"), "{}", event.body);
    let reports = calls
        .iter()
        .filter(|c| c.method == "GET" && c.uri.contains("/iotpolicybindings/bad"))
        .count();
    assert_eq!(reports, 1, "reported once, not in a loop");
    assert!(
        !calls
            .iter()
            .any(|c| c.method == "PATCH" && c.uri.ends_with("/iotpolicybindings/bad")),
        "no finalizer is added to an object that cannot be read"
    );
}
