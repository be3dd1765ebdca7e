//! The operator on a real control plane: etcd and kube-apiserver started by the tests
//! (tests/support/control_plane.rs), the real binary (`iot-operator run`, its own process, TLS to
//! the API server, leader election on, the chart's RBAC through a ServiceAccount token), moto's
//! server for AWS and Mosquitto for MQTT.
//!
//! Skipped, with a loud notice, where no kube-apiserver is installed (README, "Tests on a real
//! control plane"). The tests share one control plane and run one at a time (each in its own
//! namespaces, with its own Lease).

mod support;

use std::collections::BTreeSet;
use std::future::Future;
use std::time::{Duration, Instant};

use iot_operator::api::{IotPolicyBinding, TopicBridge};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, Client};
use rumqttc::QoS;
use serde_json::{Value, json};
use support::control_plane::{self, ControlPlane, Install, Operator};
use support::mqtt::{Collector, publish_all};
use support::{Mosquitto, Moto};

/// One test at a time: they share the control plane, and each runs several processes on a
/// 2-core machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The control plane with the CRDs from `crds/` installed and established; `None` (skipped,
/// said loudly) without a kube-apiserver.
async fn plane() -> Option<&'static ControlPlane> {
    let cp = control_plane::shared()?;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
    for entry in std::fs::read_dir(dir).expect("crds/") {
        let text = std::fs::read_to_string(entry.expect("entry").path()).expect("CRD file");
        let crd: Value = serde_yaml::from_str(&text).expect("CRD YAML");
        cp.apply(&crd).await.expect("CRD applied");
    }
    let crds: Api<CustomResourceDefinition> = Api::all(cp.admin().await);
    wait_until("the CRDs are established", Duration::from_secs(30), || {
        let crds = crds.clone();
        async move {
            let mut established = 0;
            for name in [
                "iotpolicybindings.iot.operator.dev",
                "topicbridges.iot.operator.dev",
            ] {
                let crd = crds.get(name).await.ok();
                if crd
                    .and_then(|c| c.status)
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
                {
                    established += 1;
                }
            }
            established == 2
        }
    })
    .await;
    Some(cp)
}

async fn wait_until<F, Fut>(what: &str, timeout: Duration, f: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Environment that points the operator's AWS clients at moto.
fn moto_env(moto: &Moto) -> Vec<(&'static str, String)> {
    vec![
        ("IOT_OPERATOR_AWS_ENDPOINT_URL", moto.url()),
        ("AWS_REGION", "eu-west-1".into()),
        ("AWS_ACCESS_KEY_ID", "testing".into()),
        ("AWS_SECRET_ACCESS_KEY", "testing-secret".into()),
    ]
}

fn as_refs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// Ready condition (status, reason) of a custom object as JSON.
fn ready_of(obj: &Value) -> Option<(String, String)> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Ready")
        .map(|c| {
            (
                c["status"].as_str().unwrap_or_default().to_owned(),
                c["reason"].as_str().unwrap_or_default().to_owned(),
            )
        })
}

async fn get_json<K>(api: &Api<K>, name: &str) -> Option<Value>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    api.get_opt(name)
        .await
        .ok()
        .flatten()
        .and_then(|o| serde_json::to_value(o).ok())
}

// ---------------------------------------------------------------------------------------------
// Admission: the CRDs on the API server accept the examples and reject invalid objects, naming
// the field.

fn binding(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "iot.operator.dev/v1alpha1", "kind": "IotPolicyBinding",
           "metadata": {"name": name, "namespace": "admission"}, "spec": spec})
}

fn bridge(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "iot.operator.dev/v1alpha1", "kind": "TopicBridge",
           "metadata": {"name": name, "namespace": "admission"}, "spec": spec})
}

const ID: &str = "eu-west-1:0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";

/// (object, what the API server's message must contain: the field and what is wrong).
fn invalid_objects() -> Vec<(Value, Vec<&'static str>)> {
    let ids = json!({"cognitoIdentityIds": [ID]});
    let src = json!({"mqtt": {"url": "ws://b/mqtt"}});
    let sink = json!({"url": "mqtt://s"});
    let route = json!([{"from": "a"}]);
    vec![
        (
            binding(
                "no-principals",
                json!({"policy": {"name": "p"}, "principals": {}}),
            ),
            vec!["spec.principals", "at least one"],
        ),
        (
            binding(
                "empty-ids",
                json!({"policy": {"name": "p"}, "principals": {"cognitoIdentityIds": []}}),
            ),
            vec!["spec.principals", "at least one"],
        ),
        (
            binding(
                "bad-policy-name",
                json!({"policy": {"name": "bad name"}, "principals": ids}),
            ),
            vec!["spec.policy.name", "should match"],
        ),
        (
            binding(
                "empty-policy-name",
                json!({"policy": {"name": ""}, "principals": ids}),
            ),
            vec!["spec.policy.name", "at least 1 chars"],
        ),
        (
            binding(
                "bad-identity",
                json!({"policy": {"name": "p"}, "principals": {"cognitoIdentityIds": ["nope"]}}),
            ),
            vec!["spec.principals.cognitoIdentityIds[0]", "should match"],
        ),
        (
            binding(
                "duplicate-identity",
                json!({"policy": {"name": "p"}, "principals": {"cognitoIdentityIds": [ID, ID]}}),
            ),
            vec!["spec.principals.cognitoIdentityIds[1]", "Duplicate value"],
        ),
        (
            binding(
                "bad-cert",
                json!({"policy": {"name": "p"}, "principals": {"certificateArns": ["arn:aws:iot:eu-west-1:123456789012:cert/xyz"]}}),
            ),
            vec!["spec.principals.certificateArns[0]", "should match"],
        ),
        (
            binding(
                "bad-deletion-policy",
                json!({"policy": {"name": "p"}, "principals": ids, "deletionPolicy": "Delete"}),
            ),
            vec!["spec.deletionPolicy", "Unsupported value"],
        ),
        (
            binding(
                "bad-region",
                json!({"policy": {"name": "p"}, "principals": ids, "region": "Europe"}),
            ),
            vec!["spec.region", "should match"],
        ),
        (
            binding(
                "bad-role",
                json!({"policy": {"name": "p"}, "principals": ids, "roleArn": "arn:aws:iam::1:user/x"}),
            ),
            vec!["spec.roleArn", "should match"],
        ),
        (
            binding("no-policy", json!({"principals": ids})),
            vec!["spec.policy", "Required value"],
        ),
        (
            bridge(
                "no-source",
                json!({"source": {}, "sink": sink, "routes": route}),
            ),
            vec!["spec.source", "exactly one"],
        ),
        (
            bridge(
                "two-sources",
                json!({"source": {"mqtt": {"url": "ws://b"}, "awsIot": {}}, "sink": sink, "routes": route}),
            ),
            vec!["spec.source", "exactly one"],
        ),
        (
            bridge(
                "http-source",
                json!({"source": {"mqtt": {"url": "http://b"}}, "sink": sink, "routes": route}),
            ),
            vec!["spec.source.mqtt.url", "url must start"],
        ),
        (
            bridge(
                "tcp-sink",
                json!({"source": src, "sink": {"url": "tcp://s"}, "routes": route}),
            ),
            vec!["spec.sink.url", "url must start"],
        ),
        (
            bridge(
                "no-routes",
                json!({"source": src, "sink": sink, "routes": []}),
            ),
            vec!["spec.routes", "at least 1 items"],
        ),
        (
            bridge(
                "hash-inside",
                json!({"source": src, "sink": sink, "routes": [{"from": "a/#/b"}]}),
            ),
            vec!["spec.routes[0].from", "wildcards"],
        ),
        (
            bridge(
                "plus-inside",
                json!({"source": src, "sink": sink, "routes": [{"from": "a+"}]}),
            ),
            vec!["spec.routes[0].from", "wildcards"],
        ),
        (
            bridge(
                "wildcard-to",
                json!({"source": src, "sink": sink, "routes": [{"from": "a", "to": "x/+"}]}),
            ),
            vec!["spec.routes[0].to", "placeholders"],
        ),
        (
            bridge(
                "named-placeholder",
                json!({"source": src, "sink": sink, "routes": [{"from": "a", "to": "x/{name}"}]}),
            ),
            vec!["spec.routes[0].to", "placeholders"],
        ),
        (
            bridge(
                "qos-2",
                json!({"source": src, "sink": sink, "routes": [{"from": "a", "qos": 2}]}),
            ),
            vec!["spec.routes[0].qos", "less than or equal to 1"],
        ),
        (
            bridge(
                "both-directions",
                json!({"source": src, "sink": sink, "routes": [{"from": "a", "direction": "both"}]}),
            ),
            vec!["spec.routes[0].direction", "Unsupported value"],
        ),
        (
            bridge(
                "two-credentials",
                json!({"source": {"awsIot": {"credentials": {"roleArn": "arn:aws:iam::123456789012:role/r", "cognito": {"identityPoolId": ID}}}}, "sink": sink, "routes": route}),
            ),
            vec!["spec.source.awsIot.credentials", "at most one"],
        ),
        (
            bridge(
                "insecure-plain",
                json!({"source": src, "sink": {"url": "mqtt://s", "insecureSkipTlsVerify": true}, "routes": route}),
            ),
            vec!["spec.sink", "insecureSkipTlsVerify applies only"],
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crds_accept_the_examples_and_reject_invalid_objects_naming_the_field() {
    let _serial = SERIAL.lock().await;
    let Some(cp) = plane().await else { return };
    cp.namespace("admission").await;
    cp.namespace("default").await;

    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut examples = 0;
    for entry in std::fs::read_dir(dir).expect("examples/") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("example");
        let mut obj: Value = serde_yaml::from_str(&text).expect("YAML");
        obj["metadata"]["namespace"] = json!("admission");
        cp.apply(&obj)
            .await
            .unwrap_or_else(|e| panic!("{} rejected: {e}", path.display()));
        examples += 1;
    }
    assert!(examples >= 5, "only {examples} examples");

    let mut rejected = 0;
    for (obj, wanted) in invalid_objects() {
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        match cp.create(&obj).await {
            Ok(_) => panic!("{name} was accepted: {obj}"),
            Err(kube::Error::Api(s)) => {
                assert_eq!(s.code, 422, "{name}: {s:?}");
                for w in &wanted {
                    assert!(
                        s.message.contains(w),
                        "{name}: the message does not say {w:?}: {}",
                        s.message
                    );
                }
                rejected += 1;
            }
            Err(e) => panic!("{name}: {e}"),
        }
    }
    eprintln!("admission: {examples} examples accepted, {rejected} invalid objects rejected");
}
