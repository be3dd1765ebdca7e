//! The CRDs' OpenAPI schemas applied to a manifest outside Kubernetes (the `attach` and
//! `bridge` commands), the way the API server applies them before anything else: `apiVersion`
//! and `kind`, unknown fields (named with the closest known one), types, required fields, enums,
//! patterns, lengths, item counts, numeric bounds and sets, in the API server's words. A
//! manifest the API server would refuse is refused here too, instead of a misspelled field being
//! dropped in silence. The CEL
//! rules are the operator's own validation (`validate()` on each spec), which both paths run.

use std::fmt;

use kube::Resource;
use serde_json::Value;

use super::crd;

/// One thing wrong in a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where, as the API server writes it: `spec.routes[0].direction`.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Why a manifest is refused.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("apiVersion: expected {expected}, found {found:?}")]
    ApiVersion { expected: String, found: String },
    #[error("kind: expected {expected}, found {found:?}")]
    Kind { expected: String, found: String },
    #[error("{}", problems.iter().map(Problem::to_string).collect::<Vec<_>>().join("; "))]
    Invalid { problems: Vec<Problem> },
}

/// Checks a manifest of kind `K` against its CRD: apiVersion, kind, then the schema.
pub fn check<K: Resource<DynamicType = ()>>(manifest: &Value) -> Result<(), ManifestError> {
    let expected_version = K::api_version(&());
    let found = manifest["apiVersion"].as_str().unwrap_or_default();
    if found != expected_version {
        return Err(ManifestError::ApiVersion {
            expected: expected_version.into_owned(),
            found: found.to_owned(),
        });
    }
    let expected_kind = K::kind(&());
    let found = manifest["kind"].as_str().unwrap_or_default();
    if found != expected_kind {
        return Err(ManifestError::Kind {
            expected: expected_kind.into_owned(),
            found: found.to_owned(),
        });
    }
    let schema = schema_of(&expected_kind).ok_or_else(|| ManifestError::Invalid {
        problems: vec![Problem {
            path: "kind".into(),
            message: "no schema".into(),
        }],
    })?;
    let mut problems = Vec::new();
    check_value(&schema, manifest, "", &mut problems);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ManifestError::Invalid { problems })
    }
}

/// The OpenAPI v3 schema of one of the operator's kinds.
pub fn schema_of(kind: &str) -> Option<Value> {
    let crd = crd::crds()
        .into_iter()
        .find(|c| c.spec.names.kind == kind)?;
    let schema = crd
        .spec
        .versions
        .first()?
        .schema
        .as_ref()?
        .open_api_v3_schema
        .as_ref()?;
    serde_json::to_value(schema).ok()
}

fn problem(problems: &mut Vec<Problem>, path: &str, message: impl Into<String>) {
    problems.push(Problem {
        path: path.trim_start_matches('.').to_owned(),
        message: message.into(),
    });
}

/// The schema's structural rules on `value` at `path`, problems appended.
pub fn check_value(schema: &Value, value: &Value, path: &str, problems: &mut Vec<Problem>) {
    if value.is_null() {
        if schema.get("nullable") != Some(&Value::Bool(true)) {
            problem(problems, path, "Invalid value: must not be null");
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
        problem(
            problems,
            path,
            format!("Invalid value: must be of type {}", ty.unwrap_or("?")),
        );
        return;
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        let allowed: Vec<String> = allowed.iter().map(Value::to_string).collect();
        problem(
            problems,
            path,
            format!(
                "Unsupported value: {value}: supported values: {}",
                allowed.join(", ")
            ),
        );
    }
    let bound = |key: &str| schema.get(key).and_then(Value::as_f64);
    match value {
        Value::String(s) => {
            if let Some(p) = schema.get("pattern").and_then(Value::as_str) {
                match regex::Regex::new(p) {
                    Ok(re) if !re.is_match(s) => problem(
                        problems,
                        path,
                        format!("Invalid value: {s:?}: should match '{p}'"),
                    ),
                    Ok(_) => {}
                    Err(e) => problem(problems, path, format!("pattern '{p}' unusable: {e}")),
                }
            }
            let len = s.chars().count() as f64;
            if let Some(m) = bound("maxLength").filter(|m| len > *m) {
                problem(
                    problems,
                    path,
                    format!("Too long: may not be longer than {m}"),
                );
            }
            if let Some(m) = bound("minLength").filter(|m| len < *m) {
                problem(
                    problems,
                    path,
                    format!("Invalid value: should be at least {m} chars long"),
                );
            }
        }
        Value::Number(n) => {
            let v = n.as_f64().unwrap_or_default();
            if let Some(m) = bound("maximum").filter(|m| v > *m) {
                problem(
                    problems,
                    path,
                    format!("Invalid value: should be less than or equal to {m}"),
                );
            }
            if let Some(m) = bound("minimum").filter(|m| v < *m) {
                problem(
                    problems,
                    path,
                    format!("Invalid value: should be greater than or equal to {m}"),
                );
            }
        }
        Value::Array(items) => {
            let n = items.len() as f64;
            if let Some(m) = bound("maxItems").filter(|m| n > *m) {
                problem(
                    problems,
                    path,
                    format!("Too many: must have at most {m} items"),
                );
            }
            if let Some(m) = bound("minItems").filter(|m| n < *m) {
                problem(
                    problems,
                    path,
                    format!("Invalid value: should have at least {m} items"),
                );
            }
            if schema.get("x-kubernetes-list-type").and_then(Value::as_str) == Some("set") {
                for (i, a) in items.iter().enumerate() {
                    if items[..i].contains(a) {
                        problem(
                            problems,
                            &format!("{path}[{i}]"),
                            format!("Duplicate value: {a}"),
                        );
                    }
                }
            }
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    check_value(item_schema, item, &format!("{path}[{i}]"), problems);
                }
            }
        }
        Value::Object(map) => check_object(schema, map, path, problems),
        _ => {}
    }
}

fn check_object(
    schema: &Value,
    map: &serde_json::Map<String, Value>,
    path: &str,
    problems: &mut Vec<Problem>,
) {
    if let Some(required) = schema.get("required").and_then(Value::as_array) {
        for r in required.iter().filter_map(Value::as_str) {
            if !map.contains_key(r) {
                problem(problems, &format!("{path}.{r}"), "Required value");
            }
        }
    }
    let preserve = schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    let top = path.is_empty();
    let props = schema.get("properties").and_then(Value::as_object);
    for (k, v) in map {
        match props.and_then(|p| p.get(k)) {
            Some(s) if !(top && k == "metadata") => {
                check_value(s, v, &format!("{path}.{k}"), problems)
            }
            // Metadata is the API server's; a map (no properties) takes any key.
            Some(_) => {}
            None if preserve || props.is_none() => {}
            None if top && matches!(k.as_str(), "apiVersion" | "kind" | "metadata" | "status") => {}
            None => {
                let known = props.map(|p| p.keys().map(String::as_str).collect::<Vec<_>>());
                let hint = known
                    .and_then(|names| closest(k, &names))
                    .map(|n| format!(" (did you mean {n:?}?)"))
                    .unwrap_or_default();
                problem(
                    problems,
                    &format!("{path}.{k}"),
                    format!("unknown field{hint}"),
                );
            }
        }
    }
}

/// The known name nearest to `name` by edit distance, when it is near enough to be a typo.
fn closest<'a>(name: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (edit_distance(&name.to_lowercase(), &k.to_lowercase()), *k))
        .filter(|(d, k)| *d <= (k.len() / 3).max(2))
        .min()
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::api::{IotPolicyBinding, TopicBridge};

    fn bridge(spec: Value) -> Value {
        json!({"apiVersion": "iot.operator.dev/v1alpha1", "kind": "TopicBridge",
               "metadata": {"name": "b"}, "spec": spec})
    }

    fn message(r: Result<(), ManifestError>) -> String {
        r.expect_err("refused").to_string()
    }

    #[test]
    fn misspelled_fields_are_named_with_the_closest_known_one() {
        let m = bridge(
            json!({"source": {"mqtt": {"url": "ws://b/mqtt"}, "persistentSesion": true},
                              "sink": {"url": "mqtt://s"},
                              "routes": [{"from": "a", "diretion": "out"}]}),
        );
        let text = message(check::<TopicBridge>(&m));
        assert!(
            text.contains(
                r#"spec.source.persistentSesion: unknown field (did you mean "persistentSession"?)"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"spec.routes[0].diretion: unknown field (did you mean "direction"?)"#),
            "{text}"
        );
    }

    #[test]
    fn kind_and_api_version_are_checked() {
        let m = bridge(json!({}));
        assert_eq!(
            message(check::<IotPolicyBinding>(&m)),
            r#"kind: expected IotPolicyBinding, found "TopicBridge""#
        );
        let mut old = m.clone();
        old["apiVersion"] = json!("iot.operator.dev/v1");
        assert!(message(check::<TopicBridge>(&old)).starts_with("apiVersion: expected"));
    }

    #[test]
    fn the_policy_document_and_metadata_take_any_field() {
        let m = json!({"apiVersion": "iot.operator.dev/v1alpha1", "kind": "IotPolicyBinding",
            "metadata": {"name": "b", "labels": {"x": "y"}, "annotations": {"a": "b"}},
            "spec": {"policy": {"name": "p", "document": {"Version": "2012-10-17", "Statement": [], "Anything": 1}},
                     "principals": {"cognitoIdentityIds": ["eu-west-1:0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"]}}});
        check::<IotPolicyBinding>(&m).expect("valid");
    }

    #[test]
    fn edit_distance_and_closest() {
        assert_eq!(edit_distance("documnet", "document"), 2);
        assert_eq!(
            closest("endpint", &["endpoint", "region"]),
            Some("endpoint")
        );
        assert_eq!(closest("zzzzzz", &["endpoint", "region"]), None);
    }
}
