//! CustomResourceDefinition generation (`iot-operator crd`).

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use super::{IotPolicyBinding, TopicBridge};

/// Both CRDs, as served to the API server.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![IotPolicyBinding::crd(), TopicBridge::crd()]
}

/// Removes `format: uint32/uint64` (and the like) that schemars emits for unsigned integers and
/// that Kubernetes warns about.
fn strip_unsigned_formats(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            if map
                .get("format")
                .and_then(|f| f.as_str())
                .is_some_and(|f| f.starts_with("uint"))
            {
                map.remove("format");
            }
            map.values_mut().for_each(strip_unsigned_formats);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(strip_unsigned_formats),
        _ => {}
    }
}

/// One CRD as YAML.
pub fn crd_yaml(crd: &CustomResourceDefinition) -> Result<String, serde_yaml::Error> {
    let mut value =
        serde_json::to_value(crd).map_err(<serde_yaml::Error as serde::de::Error>::custom)?;
    strip_unsigned_formats(&mut value);
    serde_yaml::to_string(&value)
}

/// Both CRDs as one multi-document YAML stream, what `iot-operator crd` prints.
pub fn all_crds_yaml() -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&crd_yaml(&crd)?);
    }
    Ok(out)
}

/// File name under `crds/` for each CRD, with its YAML.
pub fn crd_files() -> Result<Vec<(String, String)>, serde_yaml::Error> {
    crds()
        .iter()
        .map(|crd| {
            let name = crd.metadata.name.clone().unwrap_or_default();
            Ok((format!("{name}.yaml"), crd_yaml(crd)?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_unsigned_formats_remain() {
        let yaml = all_crds_yaml().unwrap();
        assert!(!yaml.contains("uint32") && !yaml.contains("uint64"));
    }

    #[test]
    fn strips_nested_formats() {
        let mut v = serde_json::json!({"a": {"type": "integer", "format": "uint32"}, "b": [{"format": "uint64"}], "c": {"format": "int64"}});
        strip_unsigned_formats(&mut v);
        assert_eq!(
            v,
            serde_json::json!({"a": {"type": "integer"}, "b": [{}], "c": {"format": "int64"}})
        );
    }
}
