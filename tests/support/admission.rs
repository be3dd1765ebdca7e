//! One table of invalid objects, run through the API server's admission
//! (tests/control_plane.rs) and through the offline check the CLI uses plus the CEL rules
//! (tests/crd.rs): both must refuse each, naming the field and what is wrong.

use serde_json::{Value, json};

fn binding(ns: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "iot.operator.dev/v1alpha1", "kind": "IotPolicyBinding",
           "metadata": {"name": name, "namespace": ns}, "spec": spec})
}

fn bridge(ns: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "iot.operator.dev/v1alpha1", "kind": "TopicBridge",
           "metadata": {"name": name, "namespace": ns}, "spec": spec})
}

pub const ID: &str = "eu-west-1:0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";

/// (object, what the API server's message must contain: the field and what is wrong).
pub fn invalid_objects(ns: &str) -> Vec<(Value, Vec<&'static str>)> {
    let ids = json!({"cognitoIdentityIds": [ID]});
    let src = json!({"mqtt": {"url": "ws://b/mqtt"}});
    let sink = json!({"url": "mqtt://s"});
    let route = json!([{"from": "a"}]);
    vec![
        (
            binding(
                ns,
                "no-principals",
                json!({"policy": {"name": "p"}, "principals": {}}),
            ),
            vec!["spec.principals", "at least one"],
        ),
        (
            binding(
                ns,
                "empty-ids",
                json!({"policy": {"name": "p"}, "principals": {"cognitoIdentityIds": []}}),
            ),
            vec!["spec.principals", "at least one"],
        ),
        (
            binding(
                ns,
                "bad-policy-name",
                json!({"policy": {"name": "bad name"}, "principals": ids}),
            ),
            vec!["spec.policy.name", "should match"],
        ),
        (
            binding(
                ns,
                "empty-policy-name",
                json!({"policy": {"name": ""}, "principals": ids}),
            ),
            vec!["spec.policy.name", "at least 1 chars"],
        ),
        (
            binding(
                ns,
                "bad-identity",
                json!({"policy": {"name": "p"}, "principals": {"cognitoIdentityIds": ["nope"]}}),
            ),
            vec!["spec.principals.cognitoIdentityIds[0]", "should match"],
        ),
        (
            binding(
                ns,
                "duplicate-identity",
                json!({"policy": {"name": "p"}, "principals": {"cognitoIdentityIds": [ID, ID]}}),
            ),
            vec!["spec.principals.cognitoIdentityIds[1]", "Duplicate value"],
        ),
        (
            binding(
                ns,
                "bad-cert",
                json!({"policy": {"name": "p"}, "principals": {"certificateArns": ["arn:aws:iot:eu-west-1:123456789012:cert/xyz"]}}),
            ),
            vec!["spec.principals.certificateArns[0]", "should match"],
        ),
        (
            binding(
                ns,
                "bad-deletion-policy",
                json!({"policy": {"name": "p"}, "principals": ids, "deletionPolicy": "Delete"}),
            ),
            vec!["spec.deletionPolicy", "Unsupported value"],
        ),
        (
            binding(
                ns,
                "bad-region",
                json!({"policy": {"name": "p"}, "principals": ids, "region": "Europe"}),
            ),
            vec!["spec.region", "should match"],
        ),
        (
            binding(
                ns,
                "bad-role",
                json!({"policy": {"name": "p"}, "principals": ids, "roleArn": "arn:aws:iam::1:user/x"}),
            ),
            vec!["spec.roleArn", "should match"],
        ),
        (
            binding(ns, "no-policy", json!({"principals": ids})),
            vec!["spec.policy", "Required value"],
        ),
        (
            bridge(
                ns,
                "no-source",
                json!({"source": {}, "sink": sink, "routes": route}),
            ),
            vec!["spec.source", "exactly one"],
        ),
        (
            bridge(
                ns,
                "two-sources",
                json!({"source": {"mqtt": {"url": "ws://b"}, "awsIot": {}}, "sink": sink, "routes": route}),
            ),
            vec!["spec.source", "exactly one"],
        ),
        (
            bridge(
                ns,
                "http-source",
                json!({"source": {"mqtt": {"url": "http://b"}}, "sink": sink, "routes": route}),
            ),
            vec!["spec.source.mqtt.url", "url must start"],
        ),
        (
            bridge(
                ns,
                "tcp-sink",
                json!({"source": src, "sink": {"url": "tcp://s"}, "routes": route}),
            ),
            vec!["spec.sink.url", "url must start"],
        ),
        (
            bridge(
                ns,
                "no-routes",
                json!({"source": src, "sink": sink, "routes": []}),
            ),
            vec!["spec.routes", "at least 1 items"],
        ),
        (
            bridge(
                ns,
                "hash-inside",
                json!({"source": src, "sink": sink, "routes": [{"from": "a/#/b"}]}),
            ),
            vec!["spec.routes[0].from", "wildcards"],
        ),
        (
            bridge(
                ns,
                "plus-inside",
                json!({"source": src, "sink": sink, "routes": [{"from": "a+"}]}),
            ),
            vec!["spec.routes[0].from", "wildcards"],
        ),
        (
            bridge(
                ns,
                "wildcard-to",
                json!({"source": src, "sink": sink, "routes": [{"from": "a", "to": "x/+"}]}),
            ),
            vec!["spec.routes[0].to", "placeholders"],
        ),
        (
            bridge(
                ns,
                "named-placeholder",
                json!({"source": src, "sink": sink, "routes": [{"from": "a", "to": "x/{name}"}]}),
            ),
            vec!["spec.routes[0].to", "placeholders"],
        ),
        (
            bridge(
                ns,
                "qos-2",
                json!({"source": src, "sink": sink, "routes": [{"from": "a", "qos": 2}]}),
            ),
            vec!["spec.routes[0].qos", "less than or equal to 1"],
        ),
        (
            bridge(
                ns,
                "both-directions",
                json!({"source": src, "sink": sink, "routes": [{"from": "a", "direction": "both"}]}),
            ),
            vec!["spec.routes[0].direction", "Unsupported value"],
        ),
        (
            bridge(
                ns,
                "two-credentials",
                json!({"source": {"awsIot": {"credentials": {"roleArn": "arn:aws:iam::123456789012:role/r", "cognito": {"identityPoolId": ID}}}}, "sink": sink, "routes": route}),
            ),
            vec!["spec.source.awsIot.credentials", "at most one"],
        ),
        (
            bridge(
                ns,
                "insecure-plain",
                json!({"source": src, "sink": {"url": "mqtt://s", "insecureSkipTlsVerify": true}, "routes": route}),
            ),
            vec!["spec.sink", "insecureSkipTlsVerify applies only"],
        ),
        (
            binding(
                ns,
                "delete-unmanaged",
                json!({"policy": {"name": "p"}, "principals": ids, "deletionPolicy": "DeletePolicy"}),
            ),
            vec![
                "spec",
                "deletionPolicy DeletePolicy needs spec.policy.document",
            ],
        ),
        (
            bridge(
                ns,
                "zero-message-limit",
                json!({"source": src, "sink": {"url": "mqtt://s", "maxMessageBytes": 0}, "routes": route}),
            ),
            vec!["spec.sink.maxMessageBytes", "greater than or equal to 1"],
        ),
        (
            bridge(
                ns,
                "connections-without-share",
                json!({"source": src, "sink": sink, "routes": route, "connections": 3}),
            ),
            vec!["spec", "every route needs shareGroup"],
        ),
        (
            bridge(
                ns,
                "too-many-connections",
                json!({"source": src, "sink": sink, "routes": [{"from": "a", "shareGroup": "g"}], "connections": 17}),
            ),
            vec!["spec.connections", "less than or equal to 16"],
        ),
        (
            bridge(
                ns,
                "bad-share-group",
                json!({"source": src, "sink": sink, "routes": [{"from": "a", "shareGroup": "a/b"}]}),
            ),
            vec!["spec.routes[0].shareGroup", "should match"],
        ),
    ]
}
