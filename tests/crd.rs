//! The CRD schemas: the committed YAML is what `iot-operator crd` prints, the CEL rules accept
//! valid objects and reject invalid ones (evaluated offline with kube's CEL evaluator), and every
//! example manifest passes the schema and the operator's own validation.

mod support;

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

/// Every problem the API server would report for `object`: structural, then CEL.
fn admission_errors(kind: &str, object: &Value) -> Vec<String> {
    let schema = crd_schema(kind);
    // The same structural check the CLI applies to manifests.
    let mut problems = Vec::new();
    iot_operator::api::schema::check_value(&schema, object, "", &mut problems);
    let mut errors: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
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

/// Whether `message` complains about a variable that a macro in `rule` binds
/// (`.all(x, ...)`, `.exists(x, ...)`, `.filter(x, ...)`, `.map(x, ...)`).
fn bound_by_a_macro(rule: &str, message: &str) -> bool {
    let Some(var) = message
        .strip_prefix("variable '")
        .and_then(|m| m.split('\'').next())
    else {
        return false;
    };
    ["all", "exists", "exists_one", "filter", "map"]
        .iter()
        .any(|m| rule.contains(&format!(".{m}({var},")))
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
            // The analyzer does not know the variables CEL's macros bind (`all(r, ...)`); the
            // API server compiles them (tests/control_plane.rs installs these CRDs).
            warnings.retain(|w| !bound_by_a_macro(&rule, &w.message));
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
}

/// The table of invalid objects that tests/control_plane.rs sends to a real API server: the
/// offline check (the CLI's structural check, then the CEL rules) refuses each one too, in the
/// same words.
#[test]
fn the_shared_table_of_invalid_objects_is_refused_offline_in_the_api_servers_words() {
    for (obj, wanted) in support::admission::invalid_objects("ns") {
        let kind = obj["kind"].as_str().unwrap().to_owned();
        let errors = admission_errors(&kind, &obj).join("; ");
        for w in &wanted {
            assert!(
                errors.contains(w),
                "{}: {w:?} not in {errors}",
                obj["metadata"]["name"]
            );
        }
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
