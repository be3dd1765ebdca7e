//! End to end against a real cluster: the one in `KUBECONFIG`. Not part of the default suite
//! (this machine has no cluster); run with `cargo test --test cluster -- --ignored`.
//!
//! Applies the CRDs, runs both controllers in this process (AWS is moto's server, started here),
//! creates objects in a fresh namespace and waits for their conditions, then cleans up.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use iot_operator::api::{IotPolicyBinding, TopicBridge, crd};
use iot_operator::aws::{AwsClients, AwsSettings};
use iot_operator::controller::{self, Settings};
use iot_operator::relay::RelayManager;
use iot_operator::telemetry::Metrics;
use iot_operator::telemetry::http::Readiness;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

async fn wait_for<F: Fn() -> Fut, Fut: Future<Output = bool>>(what: &str, f: F) {
    let start = Instant::now();
    while !f().await {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn ready_reason(
    conditions: Option<&Vec<iot_operator::api::Condition>>,
) -> Option<(String, String)> {
    conditions?
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| (format!("{:?}", c.status), c.reason.clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kubernetes cluster in KUBECONFIG"]
async fn operator_against_a_real_cluster() {
    let client = Client::try_default()
        .await
        .expect("a cluster in KUBECONFIG");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for c in crd::crds() {
        let name = c.metadata.name.clone().unwrap();
        crds.patch(
            &name,
            &PatchParams::apply("iot-operator-e2e").force(),
            &Patch::Apply(&c),
        )
        .await
        .expect("apply CRD");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ns_name = format!("iot-operator-e2e-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns_name}})).unwrap(),
        )
        .await
        .expect("namespace");

    // AWS: moto, with one identity.
    let moto = support::Moto::start();
    let sdk = support::test_sdk_config(&moto.url());
    let cognito = aws_sdk_cognitoidentity::Client::new(&sdk);
    let pool = cognito
        .create_identity_pool()
        .identity_pool_name("e2e")
        .allow_unauthenticated_identities(true)
        .send()
        .await
        .unwrap();
    let id = cognito
        .get_id()
        .identity_pool_id(pool.identity_pool_id())
        .send()
        .await
        .unwrap()
        .identity_id()
        .unwrap()
        .to_owned();

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let run = tokio::spawn(controller::run(
        controller::Deps {
            client: client.clone(),
            watch_client: client.clone(),
            settings: Settings {
                namespace: Some(ns_name.clone()),
                resync: Duration::from_secs(30),
                tenancy: Arc::new(iot_operator::tenancy::TenancyConfig::allow_all()),
                ..Default::default()
            },
            metrics: Arc::new(Metrics::new()),
            readiness: Arc::new(Readiness::default()),
            aws: Arc::new(AwsClients::from_config(
                sdk.clone(),
                AwsSettings::default(),
                None,
            )),
            relays: Arc::new(RelayManager::new(None)),
            gate: iot_operator::controller::leader::WriteGate::always(),
            shards: None,
        },
        stop_rx,
    ));

    let bindings: Api<IotPolicyBinding> = Api::namespaced(client.clone(), &ns_name);
    let binding: IotPolicyBinding = serde_json::from_value(json!({
        "apiVersion": "iot.operator.dev/v1alpha1", "kind": "IotPolicyBinding", "metadata": {"name": "app"},
        "spec": {"region": "eu-west-1", "policy": {"name": "e2e-policy", "document": {"Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"}]}},
            "principals": {"cognitoIdentityIds": [id]}}
    }))
    .unwrap();
    bindings
        .create(&PostParams::default(), &binding)
        .await
        .expect("create binding");
    wait_for("the binding to be Ready", || async {
        let b = bindings.get("app").await.unwrap();
        ready_reason(b.status.as_ref().map(|s| &s.conditions))
            == Some(("True".into(), "Attached".into()))
    })
    .await;

    let bridges: Api<TopicBridge> = Api::namespaced(client.clone(), &ns_name);
    let looped: TopicBridge = serde_json::from_value(json!({
        "apiVersion": "iot.operator.dev/v1alpha1", "kind": "TopicBridge", "metadata": {"name": "loop"},
        "spec": {"source": {"mqtt": {"url": "ws://127.0.0.1:9/mqtt"}}, "sink": {"url": "mqtt://127.0.0.1:9"},
            "routes": [{"from": "a/#", "to": "b/{topic}"}, {"from": "b/#", "to": "a/{topic}", "direction": "out"}]}
    }))
    .unwrap();
    bridges
        .create(&PostParams::default(), &looped)
        .await
        .expect("create bridge");
    wait_for("the bridge to report InvalidSpec", || async {
        let t = bridges.get("loop").await.unwrap();
        ready_reason(t.status.as_ref().map(|s| &s.conditions))
            .is_some_and(|(_, r)| r == "InvalidSpec")
    })
    .await;

    // The API server itself rejects what the schema forbids.
    let bad: Result<TopicBridge, _> = bridges
        .create(&PostParams::default(), &serde_json::from_value(json!({
            "apiVersion": "iot.operator.dev/v1alpha1", "kind": "TopicBridge", "metadata": {"name": "bad"},
            "spec": {"source": {}, "sink": {"url": "mqtt://x"}, "routes": [{"from": "a/#/b"}]}})).unwrap())
        .await;
    assert!(bad.is_err(), "admission should reject the object");

    // Deleting the binding detaches through the finalizer.
    bindings
        .delete("app", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("the binding to be gone", || async {
        bindings.get_opt("app").await.unwrap().is_none()
    })
    .await;
    let iot = aws_sdk_iot::Client::new(&sdk);
    let targets = iot
        .list_targets_for_policy()
        .policy_name("e2e-policy")
        .send()
        .await
        .unwrap();
    assert!(targets.targets().is_empty());

    let _ = stop_tx.send(true);
    let _ = run.await;
    namespaces
        .delete(&ns_name, &DeleteParams::default())
        .await
        .ok();
}
