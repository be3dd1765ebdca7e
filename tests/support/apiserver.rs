//! A mocked Kubernetes API server (`tower_test`) that serves a script of expected calls. Used
//! because no API server runs on this machine; it asserts the exact call sequence.

use std::sync::Arc;

use http::{Request, Response};
use iot_operator::aws::{AwsClients, AwsSettings};
use iot_operator::controller::events::GatedRecorder;
use iot_operator::controller::leader::WriteGate;
use iot_operator::controller::{Context, Settings, backoff::Backoff};
use iot_operator::relay::RelayManager;
use iot_operator::telemetry::Metrics;
use iot_operator::tenancy::TenancyConfig;
use kube::Client;
use kube::client::Body;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector;
use serde_json::Value;
use tower_test::mock::{self, Handle};

pub type ApiHandle = Handle<Request<Body>, Response<Body>>;

/// A controller context whose Kubernetes client talks to the returned mock handle and whose
/// AWS clients use `sdk`. Every namespace may use everything (single-tenant rules).
pub fn context(sdk: aws_config::SdkConfig) -> (Arc<Context>, ApiHandle) {
    context_with(sdk, TenancyConfig::allow_all())
}

/// [`context`] with the given tenancy rules.
pub fn context_with(
    sdk: aws_config::SdkConfig,
    tenancy: TenancyConfig,
) -> (Arc<Context>, ApiHandle) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let client_for_ledger = client.clone();
    let (bindings, _writer) = reflector::store();
    let metrics = Arc::new(Metrics::new());
    let ctx = Context {
        client: client.clone(),
        recorder: GatedRecorder::new(
            Recorder::new(
                client,
                Reporter {
                    controller: "iot-operator".into(),
                    instance: None,
                },
            ),
            WriteGate::always(),
        ),
        gate: WriteGate::always(),
        metrics: metrics.clone(),
        backoff: Backoff::default(),
        settings: Settings {
            tenancy: Arc::new(tenancy),
            ..Settings::default()
        },
        aws: Arc::new(AwsClients::from_config(sdk, AwsSettings::default(), None)),
        bindings,
        // Empty: a multi-connection bridge's Ready is its first connection's here.
        bridges: kube::runtime::reflector::store().0,
        relays: Arc::new(RelayManager::new(None)),
        status_writers: Default::default(),
        ledger: Arc::new(iot_operator::controller::ledger::Ledger::new(
            client_for_ledger,
            RECORDS_NAMESPACE,
        )),
        shards: None,
        identity: "test-replica".into(),
        role_checks: Default::default(),
    };
    (Arc::new(ctx), handle)
}

/// Namespace of the bindings' records in these scripts.
pub const RECORDS_NAMESPACE: &str = "iot-operator";

/// Path of the bindings' record ConfigMaps in these scripts.
pub const CONFIGMAPS: &str = "/api/v1/namespaces/iot-operator/configmaps";

/// The API server's answer for an object that does not exist.
pub fn not_found() -> Value {
    serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"})
}

/// An empty list of ConfigMaps.
pub fn no_configmaps() -> Value {
    serde_json::json!({"kind": "ConfigMapList", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": []})
}

/// The calls on a binding's record (ConfigMaps in [`RECORDS_NAMESPACE`]), for scripts.
pub mod record {
    use super::{CONFIGMAPS, Expect, no_configmaps, not_found};
    use serde_json::{Value, json};

    fn head(uid: &str) -> String {
        format!("iot-operator-record-{uid}")
    }

    fn config_map(uid: &str, rv: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": head(uid), "namespace": "iot-operator", "resourceVersion": rv}})
    }

    /// The head is read and does not exist.
    pub fn absent(uid: &str) -> Expect {
        Expect {
            method: "GET",
            path: format!("{CONFIGMAPS}/{}", head(uid)),
            body_contains: vec![],
            respond: not_found(),
        }
    }

    /// The first record is created; its body holds `contains`.
    pub fn created(uid: &str, contains: Vec<String>) -> Vec<Expect> {
        vec![
            Expect {
                method: "POST",
                path: format!("{CONFIGMAPS}?"),
                body_contains: [vec![head(uid)], contains].concat(),
                respond: config_map(uid, "1"),
            },
            // Parts left by an earlier crashed write are looked for.
            parts(),
        ]
    }

    /// The record is replaced at the resourceVersion it was read at.
    pub fn replaced(uid: &str, rv: &str, contains: Vec<String>) -> Expect {
        Expect {
            method: "PUT",
            path: format!("{CONFIGMAPS}/{}", head(uid)),
            body_contains: [vec![format!("\"resourceVersion\":\"{rv}\"")], contains].concat(),
            respond: config_map(uid, &format!("{rv}1")),
        }
    }

    /// The record is deleted: the head, then its parts.
    pub fn deleted(uid: &str) -> Vec<Expect> {
        vec![
            Expect {
                method: "DELETE",
                path: format!("{CONFIGMAPS}/{}", head(uid)),
                body_contains: vec![],
                respond: config_map(uid, "9"),
            },
            parts(),
        ]
    }

    fn parts() -> Expect {
        Expect {
            method: "GET",
            path: format!("{CONFIGMAPS}?&labelSelector=iot.operator.dev%2Frecord%3D"),
            body_contains: vec![],
            respond: no_configmaps(),
        }
    }
}

/// One expected API call: method, path (and query) prefix, and the JSON response.
pub struct Expect {
    pub method: &'static str,
    pub path: String,
    pub body_contains: Vec<String>,
    pub respond: Value,
}

/// Serves the expected calls in order, asserting each request; returns the request bodies.
pub fn serve(mut handle: ApiHandle, script: Vec<Expect>) -> tokio::task::JoinHandle<Vec<Value>> {
    tokio::spawn(async move {
        let mut bodies = Vec::new();
        for e in script {
            let (req, send) = handle
                .next_request()
                .await
                .expect("an API call was expected");
            assert_eq!(req.method().as_str(), e.method, "method of {}", req.uri());
            let uri = req.uri().to_string();
            assert!(
                uri.starts_with(&e.path),
                "expected {} {}, got {uri}",
                e.method,
                e.path
            );
            let bytes = req.into_body().collect_bytes().await.expect("body");
            let text = String::from_utf8_lossy(&bytes).to_string();
            for needle in &e.body_contains {
                assert!(
                    text.contains(needle.as_str()),
                    "{} {uri}: body lacks {needle}: {text}",
                    e.method
                );
            }
            bodies.push(serde_json::from_str(&text).unwrap_or(Value::Null));
            // A `Status` object is answered with its own HTTP code, as the API server does.
            let code = match e.respond["kind"].as_str() {
                Some("Status") => e.respond["code"].as_u64().unwrap_or(200) as u16,
                _ => 200,
            };
            let resp = Response::builder()
                .status(code)
                .body(Body::from(serde_json::to_vec(&e.respond).expect("json")))
                .expect("response");
            send.send_response(resp);
        }
        bodies
    })
}

/// Fails the test instead of hanging when reconcile makes a call the script does not expect.
pub async fn within<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(std::time::Duration::from_secs(10), f)
        .await
        .expect("reconcile finished (an unexpected API call would leave it waiting)")
}

/// A recorded API call.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: String,
    pub uri: String,
    pub body: String,
}

/// Answers every call (echoing the body back as the object) and records it, for scenarios whose
/// number of calls depends on timing (status written on every connection change).
pub fn serve_any(handle: ApiHandle) -> Arc<std::sync::Mutex<Vec<Call>>> {
    serve_any_as(handle, Value::Null)
}

/// [`serve_any`], answering a patch with `object` updated by the patch's status (as the API
/// server returns the whole object).
pub fn serve_any_as(handle: ApiHandle, object: Value) -> Arc<std::sync::Mutex<Vec<Call>>> {
    serve_any_with(handle, object, Value::Null)
}

/// [`serve_any_as`], answering every GET of a Secret with `secret`. Request bodies go to stderr
/// when `IOT_OPERATOR_TEST_LOG` is set, so the scan of the test output sees every status and
/// Event the controller wrote.
pub fn serve_any_with(
    mut handle: ApiHandle,
    object: Value,
    secret: Value,
) -> Arc<std::sync::Mutex<Vec<Call>>> {
    let calls = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = calls.clone();
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            let method = req.method().to_string();
            let uri = req.uri().to_string();
            let bytes = req.into_body().collect_bytes().await.unwrap_or_default();
            let body = String::from_utf8_lossy(&bytes).to_string();
            let mut value: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            if std::env::var_os("IOT_OPERATOR_TEST_LOG").is_some() {
                eprintln!("api server mock: {method} {uri} {body}");
            }
            if uri.contains("/events") {
                value = serde_json::json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e"}, "eventTime": "2026-11-02T00:00:00.000000Z"});
            } else if uri.contains("/secrets/") && secret.is_object() {
                value = secret.clone();
            } else if object.is_object() {
                let mut whole = object.clone();
                if let Some(status) = value.get("status") {
                    whole["status"] = status.clone();
                }
                value = whole;
            }
            record.lock().unwrap().push(Call { method, uri, body });
            send.send_response(
                Response::builder()
                    .body(Body::from(serde_json::to_vec(&value).unwrap_or_default()))
                    .expect("response"),
            );
        }
    });
    calls
}
