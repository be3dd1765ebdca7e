//! The IotPolicyBinding controller end to end without a cluster: the API server is a
//! `tower_test` script (no API server runs here), AWS is moto's server.

mod support;

use iot_operator::api::{FINALIZER, IotPolicyBinding};
use iot_operator::controller::policy_binding;
use iot_operator::tenancy::TenancyConfig;
use kube::runtime::controller::Action;
use serde_json::{Value, json};
use support::apiserver::{Expect, context, context_with, record, serve, within};
use support::{Moto, cognito_identities, create_connect_policy, test_sdk_config};

const BINDINGS: &str = "/apis/iot.operator.dev/v1alpha1/namespaces/team-a/iotpolicybindings/app";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/team-a/events";

fn binding_json(ids: &[String], policy: &str, deleting: bool, status: Value) -> Value {
    let mut meta = json!({"name": "app", "namespace": "team-a", "uid": "u-1", "generation": 2, "resourceVersion": "9",
        "creationTimestamp": "2026-11-01T00:00:00Z", "finalizers": [FINALIZER]});
    if deleting {
        meta["deletionTimestamp"] = json!("2026-11-02T00:00:00Z");
    }
    json!({"apiVersion": "iot.operator.dev/v1alpha1", "kind": "IotPolicyBinding", "metadata": meta,
        "spec": {"policy": {"name": policy}, "region": "eu-west-1", "principals": {"cognitoIdentityIds": ids}},
        "status": status})
}

fn event() -> Value {
    json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e", "namespace": "team-a"}, "eventTime": "2026-11-02T00:00:00.000000Z"})
}

async fn setup() -> (Moto, aws_sdk_iot::Client, Vec<String>) {
    let moto = Moto::start();
    let config = test_sdk_config(&moto.url());
    let iot = aws_sdk_iot::Client::new(&config);
    let cognito = aws_sdk_cognitoidentity::Client::new(&config);
    create_connect_policy(&iot, "p").await;
    let ids = cognito_identities(&cognito, 2).await;
    (moto, iot, ids)
}

async fn targets(iot: &aws_sdk_iot::Client) -> Vec<String> {
    let mut t = iot
        .list_targets_for_policy()
        .policy_name("p")
        .send()
        .await
        .unwrap()
        .targets()
        .to_vec();
    t.sort();
    t
}

#[tokio::test]
async fn apply_attaches_and_reports_ready() {
    let (moto, iot, ids) = setup().await;
    let (ctx, handle) = context(test_sdk_config(&moto.url()));
    let obj = binding_json(&ids, "p", false, Value::Null);
    let mut script = vec![record::absent("u-1")];
    // Before any attach, the record names both identities.
    script.extend(record::created("u-1", ids.clone()));
    script.extend([
            Expect {
                method: "POST",
                path: EVENTS.into(),
                body_contains: vec!["attached the policy to 2 target(s)".into()],
                respond: event(),
            },
            Expect {
                method: "PATCH",
                path: format!("{BINDINGS}/status"),
                body_contains: vec![
                    "\"reason\":\"Attached\"".into(),
                    "\"status\":\"True\"".into(),
                    "\"attachedTargets\":2".into(),
                    "\"desiredTargets\":2".into(),
                    "6-8 minutes".into(),
                    "arn:aws:iot:eu-west-1".into(),
                    "\"record\":{\"configMap\":\"iot-operator/iot-operator-record-u-1\",\"foreignTargets\":0,\"pools\":0,\"targets\":2}".into(),
                ],
                respond: obj.clone(),
            },
            Expect {
                method: "POST",
                path: EVENTS.into(),
                body_contains: vec!["Normal".into()],
                respond: event(),
            },
    ]);
    let server = serve(handle, script);
    let b: IotPolicyBinding = serde_json::from_value(obj).unwrap();
    let action = within(policy_binding::reconcile(std::sync::Arc::new(b), ctx))
        .await
        .expect("reconcile");
    assert_eq!(
        action,
        Action::requeue(std::time::Duration::from_secs(300)),
        "resynced on the interval"
    );
    let bodies = server.await.expect("script");
    let mut recorded: Vec<String> = bodies[1]["data"]["targets"]
        .as_str()
        .expect("the record lists the targets")
        .lines()
        .map(str::to_owned)
        .collect();
    recorded.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(recorded, want, "the record remembers what was applied");
    assert!(
        bodies[4]["status"].get("appliedTargets").is_none(),
        "status no longer lists targets: {}",
        bodies[4]["status"]
    );
    assert_eq!(targets(&iot).await, want);
}

#[tokio::test]
async fn deleting_with_detach_detaches_then_releases_the_finalizer() {
    let (moto, iot, ids) = setup().await;
    for id in &ids {
        iot.attach_policy()
            .policy_name("p")
            .target(id)
            .send()
            .await
            .unwrap();
    }
    let (ctx, handle) = context(test_sdk_config(&moto.url()));
    // Only ids[0] was applied by this binding; ids[1] belongs to someone else.
    // Written by an earlier version: the record is still in status.
    let obj = binding_json(&ids, "p", true, json!({"appliedTargets": [ids[0]]}));
    let mut script = vec![record::absent("u-1")];
    // Moved to the record before anything else happens.
    script.extend(record::created("u-1", vec![ids[0].clone()]));
    // After the detach the binding answers for nothing.
    script.push(record::replaced(
        "u-1",
        "1",
        vec!["\"targets\":\"\"".into()],
    ));
    script.push(Expect {
        method: "POST",
        path: EVENTS.into(),
        body_contains: vec!["detached the policy from 1 target(s)".into()],
        respond: event(),
    });
    script.extend(record::deleted("u-1"));
    script.push(Expect {
        method: "PATCH",
        path: BINDINGS.into(),
        body_contains: vec!["\"op\":\"remove\"".into()],
        respond: obj.clone(),
    });
    let server = serve(handle, script);
    let b: IotPolicyBinding = serde_json::from_value(obj).unwrap();
    within(policy_binding::reconcile(std::sync::Arc::new(b), ctx))
        .await
        .expect("reconcile");
    server.await.expect("script");
    assert_eq!(targets(&iot).await, vec![ids[1].clone()]);
}

#[tokio::test]
async fn a_missing_policy_is_reported_as_policy_not_found() {
    let (moto, _iot, ids) = setup().await;
    let (ctx, handle) = context(test_sdk_config(&moto.url()));
    let obj = binding_json(&ids, "absent", false, Value::Null);
    let server = serve(
        handle,
        vec![
            record::absent("u-1"),
            Expect {
                method: "PATCH",
                path: format!("{BINDINGS}/status"),
                body_contains: vec![
                    "\"reason\":\"PolicyNotFound\"".into(),
                    // The message names the policy and where it was looked for.
                    "AWS IoT policy \\\"absent\\\" does not exist in eu-west-1".into(),
                ],
                respond: obj.clone(),
            },
            Expect {
                method: "POST",
                path: EVENTS.into(),
                body_contains: vec!["PolicyNotFound".into(), "Warning".into()],
                respond: event(),
            },
        ],
    );
    let b: IotPolicyBinding = serde_json::from_value(obj).unwrap();
    let action = within(policy_binding::reconcile(std::sync::Arc::new(b), ctx))
        .await
        .expect("reconcile");
    assert_eq!(action, Action::requeue(std::time::Duration::from_secs(60)));
    server.await.expect("script");
}

/// Under the default tenancy rules a namespace may only attach policies named after it: a
/// binding for another policy is refused before any AWS call, also when it is deleted, while a
/// binding for `team-a-*` goes through.
#[tokio::test]
async fn a_binding_outside_the_tenancy_rules_changes_nothing_in_aws() {
    let (moto, iot, ids) = setup().await;
    let (ctx, handle) = context_with(test_sdk_config(&moto.url()), TenancyConfig::default());
    let obj = binding_json(&ids, "p", false, Value::Null);
    let server = serve(
        handle,
        vec![
            Expect {
                method: "PATCH",
                path: format!("{BINDINGS}/status"),
                body_contains: vec![
                    "\"reason\":\"NotAllowed\"".into(),
                    "spec.policy.name".into(),
                    "allowed: team-a-*".into(),
                ],
                respond: obj.clone(),
            },
            Expect {
                method: "POST",
                path: EVENTS.into(),
                body_contains: vec!["Warning".into(), "NotAllowed".into()],
                respond: event(),
            },
        ],
    );
    let b: IotPolicyBinding = serde_json::from_value(obj).unwrap();
    let action = within(policy_binding::reconcile(std::sync::Arc::new(b), ctx))
        .await
        .expect("reconcile");
    assert_eq!(action, Action::await_change());
    server.await.expect("script");
    assert!(targets(&iot).await.is_empty(), "nothing was attached");

    // Deleting a refused binding whose status claims attachments detaches nothing.
    for id in &ids {
        iot.attach_policy()
            .policy_name("p")
            .target(id)
            .send()
            .await
            .unwrap();
    }
    let (ctx, handle) = context_with(test_sdk_config(&moto.url()), TenancyConfig::default());
    let deleting = binding_json(&ids, "p", true, json!({"appliedTargets": ids}));
    // Its record is dropped, AWS is not called.
    let mut script = record::deleted("u-1");
    script.push(Expect {
        method: "PATCH",
        path: BINDINGS.into(),
        body_contains: vec!["\"op\":\"remove\"".into()],
        respond: deleting.clone(),
    });
    let server = serve(handle, script);
    let b: IotPolicyBinding = serde_json::from_value(deleting).unwrap();
    within(policy_binding::reconcile(std::sync::Arc::new(b), ctx))
        .await
        .expect("reconcile");
    server.await.expect("script");
    let mut want = ids.clone();
    want.sort();
    assert_eq!(targets(&iot).await, want, "refused deletion left AWS alone");

    // The control: the same identities with a policy named after the namespace.
    create_connect_policy(&iot, "team-a-p").await;
    let (ctx, handle) = context_with(test_sdk_config(&moto.url()), TenancyConfig::default());
    let allowed = binding_json(&ids, "team-a-p", false, Value::Null);
    let mut script = vec![record::absent("u-1")];
    script.extend(record::created("u-1", ids.clone()));
    script.extend([
        Expect {
            method: "POST",
            path: EVENTS.into(),
            body_contains: vec!["attached the policy to 2 target(s)".into()],
            respond: event(),
        },
        Expect {
            method: "PATCH",
            path: format!("{BINDINGS}/status"),
            body_contains: vec!["\"reason\":\"Attached\"".into()],
            respond: allowed.clone(),
        },
        Expect {
            method: "POST",
            path: EVENTS.into(),
            body_contains: vec!["Normal".into()],
            respond: event(),
        },
    ]);
    let server = serve(handle, script);
    let b: IotPolicyBinding = serde_json::from_value(allowed).unwrap();
    within(policy_binding::reconcile(std::sync::Arc::new(b), ctx))
        .await
        .expect("reconcile");
    server.await.expect("script");
    let attached = iot
        .list_targets_for_policy()
        .policy_name("team-a-p")
        .send()
        .await
        .unwrap()
        .targets()
        .len();
    assert_eq!(attached, 2);
}
