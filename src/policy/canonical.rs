//! Canonical JSON for comparing policy documents: keys sorted at every depth, no whitespace.

use serde_json::Value;

/// The canonical form of a JSON value.
pub fn canonical_json(v: &Value) -> String {
    let mut out = String::new();
    write_canonical(v, &mut out);
    out
}

fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                // Serialising a string cannot fail.
                out.push_str(&serde_json::to_string(k).unwrap_or_default());
                out.push(':');
                write_canonical(&map[k.as_str()], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// Canonical form of a document given as text (what AWS returns), or `None` if it is not JSON.
pub fn canonical_from_str(doc: &str) -> Option<String> {
    serde_json::from_str::<Value>(doc)
        .ok()
        .map(|v| canonical_json(&v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_order_and_whitespace_do_not_matter() {
        let a = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":["iot:Connect"],"Resource":"*"}]}"#;
        let b = "{\n  \"Statement\": [ {\"Resource\": \"*\", \"Action\": [\"iot:Connect\"], \"Effect\": \"Allow\"} ],\n  \"Version\": \"2012-10-17\"\n}";
        assert_eq!(canonical_from_str(a), canonical_from_str(b));
        assert_eq!(
            canonical_from_str(a).unwrap(),
            r#"{"Statement":[{"Action":["iot:Connect"],"Effect":"Allow","Resource":"*"}],"Version":"2012-10-17"}"#
        );
    }

    #[test]
    fn array_order_matters() {
        assert_ne!(canonical_from_str("[1,2]"), canonical_from_str("[2,1]"));
        assert_eq!(canonical_from_str("not json"), None);
    }

    #[test]
    fn escapes_strings() {
        let v = serde_json::json!({"a\"b": "c\nd"});
        assert_eq!(canonical_json(&v), r#"{"a\"b":"c\nd"}"#);
    }

    /// Found by fuzzing: without correctly rounded float parsing, a number changed between
    /// two parses, so an unchanged document looked changed on every sync.
    #[test]
    fn numbers_survive_a_round_trip() {
        let doc = "[1333333333333333333333333333333333,2.333333,2.3333331]";
        let once = canonical_from_str(doc).unwrap();
        assert_eq!(canonical_from_str(&once).unwrap(), once);
    }
}
