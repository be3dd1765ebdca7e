//! The CRD schemas: the committed YAML is what `iot-operator crd` prints, the CEL rules accept
//! valid objects and reject invalid ones (evaluated offline with kube's CEL evaluator), and every
//! example manifest passes the schema and the operator's own validation.

use std::path::Path;

use iot_operator::api::{IotPolicyBinding, TopicBridge, crd};
use kube::core::cel::Validator;
use serde_json::{Value, json};

fn crd_schema(kind: &str) -> Value {
    let crd = crd::crds()
        .into_iter()
        .find(|c| c.spec.names.kind == kind)
        .expect("kind exists");
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("schema");
    serde_json::to_value(schema).expect("schema serialises")
}

/// The structural subset of OpenAPI v3 validation the API server applies before CEL: types,
/// required fields, enums, patterns, lengths, item counts, numeric bounds, list-type set.
fn structural_errors(schema: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    if value.is_null() {
        if schema.get("nullable") != Some(&Value::Bool(true)) {
            errors.push(format!("{path}: null"));
        }
        return;
    }
    let ty = schema.get("type").and_then(Value::as_str);
    let ok = match (ty, value) {
        (Some("object"), Value::Object(_))
        | (Some("array"), Value::Array(_))
        | (Some("string"), Value::String(_)) => true,
        (Some("integer"), Value::Number(n)) => n.is_i64() || n.is_u64(),
        (Some("number"), Value::Number(_)) | (Some("boolean"), Value::Bool(_)) => true,
        (None, _) => true,
        _ => false,
    };
    if !ok {
        errors.push(format!("{path}: expected {}", ty.unwrap_or("?")));
        return;
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        errors.push(format!("{path}: {value} not in enum"));
    }
    match value {
        Value::String(s) => {
            if let Some(p) = schema.get("pattern").and_then(Value::as_str)
                && !regex::Regex::new(p).expect("pattern compiles").is_match(s)
            {
                errors.push(format!("{path}: '{s}' does not match {p}"));
            }
            let len = s.chars().count() as u64;
            if schema
                .get("maxLength")
                .and_then(Value::as_u64)
                .is_some_and(|m| len > m)
            {
                errors.push(format!("{path}: too long"));
            }
            if schema
                .get("minLength")
                .and_then(Value::as_u64)
                .is_some_and(|m| len < m)
            {
                errors.push(format!("{path}: too short"));
            }
        }
        Value::Number(n) => {
            let v = n.as_f64().unwrap_or_default();
            if schema
                .get("maximum")
                .and_then(Value::as_f64)
                .is_some_and(|m| v > m)
            {
                errors.push(format!("{path}: above maximum"));
            }
            if schema
                .get("minimum")
                .and_then(Value::as_f64)
                .is_some_and(|m| v < m)
            {
                errors.push(format!("{path}: below minimum"));
            }
        }
        Value::Array(items) => {
            let n = items.len() as u64;
            if schema
                .get("maxItems")
                .and_then(Value::as_u64)
                .is_some_and(|m| n > m)
            {
                errors.push(format!("{path}: too many items"));
            }
            if schema
                .get("minItems")
                .and_then(Value::as_u64)
                .is_some_and(|m| n < m)
            {
                errors.push(format!("{path}: too few items"));
            }
            if schema.get("x-kubernetes-list-type").and_then(Value::as_str) == Some("set") {
                for (i, a) in items.iter().enumerate() {
                    if items[..i].contains(a) {
                        errors.push(format!("{path}[{i}]: duplicate in a set"));
                    }
                }
            }
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    structural_errors(item_schema, item, &format!("{path}[{i}]"), errors);
                }
            }
        }
        Value::Object(map) => {
            if let Some(required) = schema.get("required").and_then(Value::as_array) {
                for r in required.iter().filter_map(Value::as_str) {
                    if !map.contains_key(r) {
                        errors.push(format!("{path}.{r}: required"));
                    }
                }
            }
            let preserve =
                schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
            let props = schema.get("properties").and_then(Value::as_object);
            for (k, v) in map {
                match props.and_then(|p| p.get(k)) {
                    Some(s) => structural_errors(s, v, &format!("{path}.{k}"), errors),
                    None if preserve || props.is_none() || path.is_empty() && k == "metadata" => {}
                    None if path.is_empty()
                        && (k == "apiVersion" || k == "kind" || k == "status") => {}
                    None => errors.push(format!("{path}.{k}: unknown field")),
                }
            }
        }
        _ => {}
    }
}

/// Every problem the API server would report for `object`: structural, then CEL.
fn admission_errors(kind: &str, object: &Value) -> Vec<String> {
    let schema = crd_schema(kind);
    let mut errors = Vec::new();
    structural_errors(&schema, object, "", &mut errors);
    if errors.is_empty()
        && let Err(e) = Validator::new().validate(&schema, object, None)
    {
        errors.push(e.to_string());
    }
    errors
}

fn binding(spec: Value) -> Value {
    json!({"apiVersion": "iot.operator.dev/v1alpha1", "kind": "IotPolicyBinding", "metadata": {"name": "b", "namespace": "ns"}, "spec": spec})
}

fn bridge(spec: Value) -> Value {
    json!({"apiVersion": "iot.operator.dev/v1alpha1", "kind": "TopicBridge", "metadata": {"name": "t", "namespace": "ns"}, "spec": spec})
}

const ID: &str = "eu-west-1:0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";

#[test]
fn committed_crds_match_generated() {
    for (name, yaml) in crd::crd_files().expect("crds render") {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("crds")
            .join(&name);
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == yaml,
            "{} is stale: run `cargo run -- crd --output-dir crds` and commit the result",
            path.display()
        );
    }
}

#[test]
fn crds_are_namespaced_in_the_iot_category_without_unsigned_formats() {
    for c in crd::crds() {
        assert_eq!(c.spec.group, "iot.operator.dev");
        assert_eq!(c.spec.scope, "Namespaced");
        assert_eq!(
            c.spec.names.categories.as_deref(),
            Some(&["iot".to_string()][..])
        );
        assert_eq!(c.spec.versions[0].name, "v1alpha1");
        assert!(
            c.spec.versions[0]
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some()
        );
        let text = serde_json::to_string(&c).unwrap();
        assert!(!text.contains("uint32") && !text.contains("uint64"));
    }
    let short: Vec<_> = crd::crds()
        .iter()
        .map(|c| c.spec.names.short_names.clone().unwrap_or_default())
        .collect();
    assert_eq!(short, vec![vec!["ipb".to_string()], vec!["tb".to_string()]]);
}

/// Every `x-kubernetes-validations` rule with the schema node it is attached to.
fn rules_with_nodes(schema: &Value, out: &mut Vec<(Value, String)>) {
    if let Some(rules) = schema
        .get("x-kubernetes-validations")
        .and_then(Value::as_array)
    {
        for r in rules {
            out.push((
                schema.clone(),
                r["rule"].as_str().unwrap_or_default().to_owned(),
            ));
        }
    }
    for key in ["properties"] {
        if let Some(props) = schema.get(key).and_then(Value::as_object) {
            props.values().for_each(|v| rules_with_nodes(v, out));
        }
    }
    if let Some(items) = schema.get("items") {
        rules_with_nodes(items, out);
    }
}

#[test]
fn every_rule_compiles_in_scope_and_fits_the_cost_budget() {
    use kube::core::cel::{ScopeContext, analyze_rule, compile_schema, estimate_rule_cost};
    let mut count = 0;
    for kind in ["IotPolicyBinding", "TopicBridge"] {
        let schema = crd_schema(kind);
        let compiled = compile_schema(&schema);
        assert!(
            compiled.compilation_errors().is_empty(),
            "{kind}: {:?}",
            compiled.compilation_errors()
        );
        let mut rules = Vec::new();
        rules_with_nodes(&schema, &mut rules);
        for (node, rule) in rules {
            let node_compiled = compile_schema(&node);
            let mut warnings = analyze_rule(&rule, &node_compiled, ScopeContext::CrdValidation);
            warnings.extend(estimate_rule_cost(&rule, &node_compiled));
            assert!(warnings.is_empty(), "{kind}: {rule}: {warnings:?}");
            count += 1;
        }
    }
    // principals, source one-of, credentials one-of, url (source and sink), from, to
    assert!(count >= 7, "only {count} rules found");

    // The analysis does flag an unbounded rule, so the assertion above can fail.
    let unbounded = json!({"type": "array", "items": {"type": "string"}});
    let rule = "self.all(x, x.matches('^a+$'))";
    let c = compile_schema(&unbounded);
    let mut w = analyze_rule(rule, &c, ScopeContext::CrdValidation);
    w.extend(estimate_rule_cost(rule, &c));
    assert!(!w.is_empty(), "an unbounded list rule should be flagged");
}

#[test]
fn binding_rules() {
    let ok = binding(json!({"policy": {"name": "p"}, "principals": {"cognitoIdentityIds": [ID]}}));
    assert_eq!(
        admission_errors("IotPolicyBinding", &ok),
        Vec::<String>::new()
    );

    let cases = [
        (
            json!({"policy": {"name": "p"}, "principals": {}}),
            "at least one",
        ),
        (
            json!({"policy": {"name": "p"}, "principals": {"cognitoIdentityIds": []}}),
            "at least one",
        ),
        (
            json!({"policy": {"name": "bad name"}, "principals": {"cognitoIdentityIds": [ID]}}),
            "does not match",
        ),
        (
            json!({"policy": {"name": ""}, "principals": {"cognitoIdentityIds": [ID]}}),
            "too short",
        ),
        (
            json!({"policy": {"name": "p"}, "principals": {"cognitoIdentityIds": ["nope"]}}),
            "does not match",
        ),
        (
            json!({"policy": {"name": "p"}, "principals": {"cognitoIdentityIds": [ID, ID]}}),
            "duplicate",
        ),
        (
            json!({"policy": {"name": "p"}, "principals": {"certificateArns": ["arn:aws:iot:eu-west-1:123456789012:cert/xyz"]}}),
            "does not match",
        ),
        (
            json!({"policy": {"name": "p"}, "principals": {"cognitoIdentityIds": [ID]}, "deletionPolicy": "Delete"}),
            "enum",
        ),
        (
            json!({"policy": {"name": "p"}, "principals": {"cognitoIdentityIds": [ID]}, "region": "Europe"}),
            "does not match",
        ),
        (
            json!({"policy": {"name": "p"}, "principals": {"cognitoIdentityIds": [ID]}, "roleArn": "arn:aws:iam::1:user/x"}),
            "does not match",
        ),
        (
            json!({"principals": {"cognitoIdentityIds": [ID]}}),
            "required",
        ),
    ];
    for (spec, want) in cases {
        let errors = admission_errors("IotPolicyBinding", &binding(spec.clone()));
        assert!(
            errors.iter().any(|e| e.contains(want)),
            "{spec}: {errors:?}"
        );
    }
}

#[test]
fn bridge_rules() {
    let route = json!({"from": "devices/+/telemetry", "to": "cluster/{2}"});
    let ok = bridge(
        json!({"source": {"mqtt": {"url": "ws://broker:8080/mqtt"}}, "sink": {"url": "mqtt://sink:1883"}, "routes": [route]}),
    );
    assert_eq!(admission_errors("TopicBridge", &ok), Vec::<String>::new());
    let insecure_ok = bridge(
        json!({"source": {"mqtt": {"url": "wss://broker/mqtt", "insecureSkipTlsVerify": true}}, "sink": {"url": "mqtts://sink", "insecureSkipTlsVerify": false, "caSecret": {"name": "ca", "key": "ca.crt"}}, "routes": [route]}),
    );
    assert_eq!(
        admission_errors("TopicBridge", &insecure_ok),
        Vec::<String>::new()
    );
    let aws_ok = bridge(
        json!({"source": {"awsIot": {"region": "eu-west-1", "credentials": {"roleArn": "arn:aws:iam::123456789012:role/iot"}}}, "sink": {"url": "mqtts://sink"}, "routes": [{"from": "#"}]}),
    );
    assert_eq!(
        admission_errors("TopicBridge", &aws_ok),
        Vec::<String>::new()
    );

    let src = json!({"mqtt": {"url": "ws://b/mqtt"}});
    let sink = json!({"url": "mqtt://s"});
    let cases = [
        (
            json!({"source": {}, "sink": sink, "routes": [{"from": "a"}]}),
            "exactly one",
        ),
        (
            json!({"source": {"mqtt": {"url": "ws://b"}, "awsIot": {}}, "sink": sink, "routes": [{"from": "a"}]}),
            "exactly one",
        ),
        (
            json!({"source": {"mqtt": {"url": "http://b"}}, "sink": sink, "routes": [{"from": "a"}]}),
            "url must start",
        ),
        (
            json!({"source": src, "sink": {"url": "tcp://s"}, "routes": [{"from": "a"}]}),
            "url must start",
        ),
        (
            json!({"source": src, "sink": sink, "routes": []}),
            "too few",
        ),
        (
            json!({"source": src, "sink": sink, "routes": [{"from": "a/#/b"}]}),
            "wildcards",
        ),
        (
            json!({"source": src, "sink": sink, "routes": [{"from": "a+"}]}),
            "wildcards",
        ),
        (
            json!({"source": src, "sink": sink, "routes": [{"from": "a", "to": "x/+"}]}),
            "placeholders",
        ),
        (
            json!({"source": src, "sink": sink, "routes": [{"from": "a", "to": "x/{name}"}]}),
            "placeholders",
        ),
        (
            json!({"source": src, "sink": sink, "routes": [{"from": "a", "qos": 2}]}),
            "maximum",
        ),
        (
            json!({"source": src, "sink": sink, "routes": [{"from": "a", "direction": "both"}]}),
            "enum",
        ),
        (
            json!({"source": {"awsIot": {"credentials": {"roleArn": "arn:aws:iam::123456789012:role/r", "cognito": {"identityPoolId": ID}}}}, "sink": sink, "routes": [{"from": "a"}]}),
            "at most one",
        ),
        (
            json!({"source": {"mqtt": {"url": "ws://b"}, "protocolVersion": "4"}, "sink": sink, "routes": [{"from": "a"}]}),
            "enum",
        ),
        (
            json!({"source": src, "sink": {"url": "mqtt://s", "insecureSkipTlsVerify": true}, "routes": [{"from": "a"}]}),
            "insecureSkipTlsVerify applies only",
        ),
        (
            json!({"source": {"mqtt": {"url": "wss://b", "insecureSkipTlsVerify": true, "caSecret": {"name": "ca", "key": "ca.crt"}}}, "sink": sink, "routes": [{"from": "a"}]}),
            "insecureSkipTlsVerify applies only",
        ),
    ];
    for (spec, want) in cases {
        let errors = admission_errors("TopicBridge", &bridge(spec.clone()));
        assert!(
            errors.iter().any(|e| e.contains(want)),
            "{spec}: {errors:?}"
        );
    }
}

#[test]
fn examples_pass_the_schema_and_validation() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("examples/") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("readable");
        let value: Value = serde_yaml::from_str(&text).expect("YAML");
        let kind = value["kind"].as_str().expect("kind").to_owned();
        let errors = admission_errors(&kind, &value);
        assert!(errors.is_empty(), "{}: {errors:?}", path.display());
        match kind.as_str() {
            "IotPolicyBinding" => {
                let b: IotPolicyBinding = serde_json::from_value(value).expect("deserialises");
                b.spec
                    .validate()
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            }
            "TopicBridge" => {
                let t: TopicBridge = serde_json::from_value(value).expect("deserialises");
                t.spec
                    .validate()
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            }
            other => panic!("unexpected kind {other}"),
        }
        seen += 1;
    }
    assert!(seen >= 4, "only {seen} examples");
}

#[test]
fn tenancy_examples_load() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/tenancy");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("examples/tenancy/") {
        let path = entry.expect("entry").path();
        let rules =
            iot_operator::tenancy::TenancyConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert!(!rules.rules.is_empty(), "{}", path.display());
        seen += 1;
    }
    assert_eq!(seen, 2);
}
