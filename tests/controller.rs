//! Controller behaviour without a cluster: each scenario drives `reconcile` against a mocked
//! API server (`tower_test`) and asserts the exact sequence of API calls. A mock is used because
//! no API server can run on this machine; AWS is never reached in these scenarios.

mod support;

use std::sync::Arc;

use iot_operator::api::{FINALIZER, IotPolicyBinding, TopicBridge};
use iot_operator::controller::{policy_binding, topic_bridge};
use kube::Resource;
use kube::runtime::controller::Action;
use serde_json::{Value, json};
use support::apiserver::{CONFIGMAPS, Expect, context, no_configmaps, not_found, serve, within};

fn context_offline() -> (
    Arc<iot_operator::controller::Context>,
    support::apiserver::ApiHandle,
) {
    context(
        aws_config::SdkConfig::builder()
            .region(aws_config::Region::new("eu-west-1"))
            .behavior_version(aws_config::BehaviorVersion::latest())
            .build(),
    )
}

const ID: &str = "eu-west-1:0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
const BINDINGS: &str = "/apis/iot.operator.dev/v1alpha1/namespaces/team-a/iotpolicybindings/app";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/team-a/events";

fn binding_json(spec: Value, finalizers: &[&str], deleting: bool) -> Value {
    let mut meta = json!({"name": "app", "namespace": "team-a", "uid": "u-1", "generation": 3, "resourceVersion": "7", "creationTimestamp": "2026-11-01T00:00:00Z"});
    if !finalizers.is_empty() {
        meta["finalizers"] = json!(finalizers);
    }
    if deleting {
        meta["deletionTimestamp"] = json!("2026-11-02T00:00:00Z");
    }
    json!({"apiVersion": "iot.operator.dev/v1alpha1", "kind": "IotPolicyBinding", "metadata": meta, "spec": spec})
}

fn event_response() -> Value {
    json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e", "namespace": "team-a"}, "eventTime": "2026-11-02T00:00:00.000000Z"})
}

#[tokio::test]
async fn a_new_binding_gets_the_finalizer_first() {
    let (ctx, handle) = context_offline();
    let obj = binding_json(
        json!({"policy": {"name": "p"}, "principals": {"cognitoIdentityIds": [ID]}}),
        &[],
        false,
    );
    let with_finalizer = binding_json(
        json!({"policy": {"name": "p"}, "principals": {"cognitoIdentityIds": [ID]}}),
        &[FINALIZER],
        false,
    );
    let server = serve(
        handle,
        vec![Expect {
            method: "PATCH",
            path: BINDINGS.into(),
            body_contains: vec![FINALIZER.into(), "\"op\":\"add\"".into()],
            respond: with_finalizer,
        }],
    );
    let b: IotPolicyBinding = serde_json::from_value(obj).unwrap();
    let action = within(policy_binding::reconcile(Arc::new(b), ctx))
        .await
        .expect("reconcile");
    assert_eq!(action, Action::await_change());
    server.await.expect("script completed");
}

#[tokio::test]
async fn an_invalid_binding_reports_invalid_spec_and_waits_for_a_change() {
    let (ctx, handle) = context_offline();
    // Passes the schema (the document is free-form) but not the operator's validation.
    let spec = json!({"policy": {"name": "p", "document": {"Version": "2012-10-17"}}, "principals": {"cognitoIdentityIds": [ID]}});
    let obj = binding_json(spec, &[FINALIZER], false);
    let server = serve(
        handle,
        vec![
            Expect {
                method: "PATCH",
                path: format!("{BINDINGS}/status?&force=true&fieldManager=iot-operator"),
                body_contains: vec![
                    "\"reason\":\"InvalidSpec\"".into(),
                    "spec.policy.document".into(),
                    "\"observedGeneration\":3".into(),
                ],
                respond: obj.clone(),
            },
            Expect {
                method: "POST",
                path: EVENTS.into(),
                body_contains: vec!["InvalidSpec".into(), "Warning".into()],
                respond: event_response(),
            },
        ],
    );
    let b: IotPolicyBinding = serde_json::from_value(obj).unwrap();
    let action = within(policy_binding::reconcile(Arc::new(b), ctx.clone()))
        .await
        .expect("reconcile");
    assert_eq!(
        action,
        Action::await_change(),
        "an invalid spec must not be retried until it changes"
    );
    let bodies = server.await.expect("script completed");
    let status = &bodies[0]["status"];
    assert_eq!(status["conditions"][0]["type"], "Ready");
    assert_eq!(status["conditions"][0]["status"], "False");
    assert_eq!(status["conditions"][0]["observedGeneration"], 3);
}

#[tokio::test]
async fn deleting_a_retain_binding_forgets_its_record_and_only_removes_the_finalizer() {
    let (ctx, handle) = context_offline();
    let spec = json!({"policy": {"name": "p"}, "principals": {"cognitoIdentityIds": [ID]}, "deletionPolicy": "Retain"});
    let mut obj = binding_json(spec, &[FINALIZER], true);
    obj["status"] = json!({"appliedTargets": [ID]});
    let server = serve(
        handle,
        vec![
            // The record goes (head, then any parts); AWS is not called.
            Expect {
                method: "DELETE",
                path: format!("{CONFIGMAPS}/iot-operator-record-"),
                body_contains: vec![],
                respond: not_found(),
            },
            Expect {
                method: "GET",
                path: format!("{CONFIGMAPS}?&labelSelector=iot.operator.dev%2Frecord%3D"),
                body_contains: vec![],
                respond: no_configmaps(),
            },
            Expect {
                method: "PATCH",
                path: BINDINGS.into(),
                body_contains: vec!["\"op\":\"remove\"".into(), "/metadata/finalizers".into()],
                respond: binding_json(
                    json!({"policy": {"name": "p"}, "principals": {"cognitoIdentityIds": [ID]}}),
                    &[],
                    true,
                ),
            },
        ],
    );
    let b: IotPolicyBinding = serde_json::from_value(obj).unwrap();
    within(policy_binding::reconcile(Arc::new(b), ctx))
        .await
        .expect("reconcile");
    server.await.expect("script completed");
}

#[tokio::test]
async fn an_invalid_bridge_reports_the_loop() {
    let (ctx, handle) = context_offline();
    let spec = json!({
        "source": {"mqtt": {"url": "ws://broker:8080/mqtt"}},
        "sink": {"url": "mqtt://sink:1883"},
        "routes": [
            {"name": "up", "from": "devices/#", "to": "cluster/{topic}"},
            {"name": "down", "from": "cluster/#", "to": "devices/{topic}", "direction": "out"}
        ]
    });
    let obj = json!({"apiVersion": "iot.operator.dev/v1alpha1", "kind": "TopicBridge",
        "metadata": {"name": "loop", "namespace": "team-a", "uid": "u-2", "generation": 1, "resourceVersion": "1"}, "spec": spec});
    let server = serve(
        handle,
        vec![
            Expect {
                method: "PATCH",
                path: "/apis/iot.operator.dev/v1alpha1/namespaces/team-a/topicbridges/loop/status?&force=true&fieldManager=iot-operator".into(),
                body_contains: vec!["InvalidSpec".into(), "routes[0] (up)".into(), "routes[1] (down)".into(), "\"connectionState\":\"Disconnected\"".into()],
                respond: obj.clone(),
            },
            Expect {
                method: "POST",
                path: EVENTS.into(),
                body_contains: vec!["InvalidSpec".into()],
                respond: event_response(),
            },
        ],
    );
    let tb: TopicBridge = serde_json::from_value(obj).unwrap();
    let action = within(topic_bridge::reconcile(Arc::new(tb), ctx.clone()))
        .await
        .expect("reconcile");
    assert_eq!(action, Action::await_change());
    server.await.expect("script completed");
    assert!(
        ctx.relays.keys().await.is_empty(),
        "no relay may run for an invalid bridge"
    );
}

#[tokio::test]
async fn errors_back_off_per_object() {
    let (ctx, _handle) = context_offline();
    let obj: IotPolicyBinding = serde_json::from_value(binding_json(
        json!({"policy": {"name": "p"}, "principals": {"cognitoIdentityIds": [ID]}}),
        &[],
        false,
    ))
    .unwrap();
    let policy = iot_operator::controller::error_policy::<IotPolicyBinding>("iotpolicybinding");
    let err = iot_operator::controller::Error::DetachIncomplete { count: 1 };
    let obj = Arc::new(obj);
    let a1 = policy(obj.clone(), &err, ctx.clone());
    let a2 = policy(obj.clone(), &err, ctx.clone());
    let key = iot_operator::controller::object_key(obj.as_ref());
    assert_eq!(ctx.backoff.failures(&key), 2);
    assert_ne!(a1, a2, "the second delay is longer");
    let text = ctx.metrics.encode();
    assert!(text.contains("iot_operator_reconcile_errors_total{controller=\"iotpolicybinding\",reason=\"DetachIncomplete\"} 2"), "{text}");
    assert_eq!(obj.meta().name.as_deref(), Some("app"));
}
