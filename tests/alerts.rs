//! The alert rules (`charts/iot-operator/files/prometheus-rules.yaml`) checked by Prometheus's
//! own tool: `promtool check rules`, and `promtool test rules` on `tests/alerts/rules.test.yaml`
//! at the rules' real durations. Each alert's tests are shown able to fail: with its expression
//! made never to fire, or its `for` dropped, `promtool test rules` must fail. Each alert has a
//! severity, a summary, and a runbook that exists in `docs/operations.md`.
//!
//! `tests/observability.rs` runs the same rules on a live Prometheus scraping the operator.
//! Skipped, loudly, without promtool (`tests/run.sh` installs Debian's `prometheus`).

#[path = "support/markdown.rs"]
mod markdown;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml::Value;

const RULES: &str = "charts/iot-operator/files/prometheus-rules.yaml";
const TESTS: &str = "tests/alerts/rules.test.yaml";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn promtool() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("IOT_OPERATOR_TEST_PROMTOOL") {
        return Some(PathBuf::from(p));
    }
    let p = Path::new("/usr/bin/promtool");
    if p.exists() {
        return Some(p.to_path_buf());
    }
    eprintln!(
        "SKIPPED: no promtool (tests/run.sh installs Debian's `prometheus`; or set IOT_OPERATOR_TEST_PROMTOOL)"
    );
    None
}

fn rules() -> Value {
    serde_yaml::from_str(&std::fs::read_to_string(root().join(RULES)).expect("rules file"))
        .expect("rules YAML")
}

fn alert_rules(doc: &Value) -> Vec<Value> {
    doc["groups"]
        .as_sequence()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_sequence().cloned().unwrap_or_default())
        .collect()
}

/// `promtool test rules` on the test file, with the rule file replaced by `rules` when given.
fn test_rules(promtool: &Path, rules: Option<&Value>) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut tests: Value =
        serde_yaml::from_str(&std::fs::read_to_string(root().join(TESTS)).expect("tests"))
            .expect("tests YAML");
    let rule_file = match rules {
        Some(r) => {
            let p = dir.path().join("rules.yaml");
            std::fs::write(&p, serde_yaml::to_string(r).expect("YAML")).expect("write");
            p
        }
        None => root().join(RULES),
    };
    tests["rule_files"] = Value::Sequence(vec![rule_file.display().to_string().into()]);
    let test_file = dir.path().join("tests.yaml");
    std::fs::write(&test_file, serde_yaml::to_string(&tests).expect("YAML")).expect("write");
    let out = Command::new(promtool)
        .args(["test", "rules"])
        .arg(&test_file)
        .output()
        .expect("promtool runs");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn promtool_checks_and_unit_tests_the_rules() {
    let Some(promtool) = promtool() else { return };
    let out = Command::new(&promtool)
        .args(["check", "rules"])
        .arg(root().join(RULES))
        .output()
        .expect("promtool runs");
    let text = String::from_utf8_lossy(&out.stdout);
    println!("promtool check rules: {text}");
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ok, text) = test_rules(&promtool, None);
    println!("promtool test rules: {text}");
    assert!(ok, "{text}");
}

#[test]
fn each_alert_has_tests_that_can_fail() {
    let Some(promtool) = promtool() else { return };
    let doc = rules();
    let names: Vec<String> = alert_rules(&doc)
        .iter()
        .map(|r| r["alert"].as_str().expect("alert").to_owned())
        .collect();
    assert!(names.len() >= 12, "{names:?}");
    for name in &names {
        // Never fires: the tests that expect it to fire must fail.
        let mut never = doc.clone();
        let mut has_for = false;
        for group in never["groups"].as_sequence_mut().expect("groups") {
            for rule in group["rules"].as_sequence_mut().expect("rules") {
                if rule["alert"].as_str() == Some(name) {
                    rule["expr"] = "vector(1) > 2".into();
                }
            }
        }
        let (ok, _) = test_rules(&promtool, Some(&never));
        assert!(!ok, "{name}: its tests pass even when it never fires");
        // Fires at once: the tests that expect nothing before `for` has passed must fail.
        let mut eager = doc.clone();
        for group in eager["groups"].as_sequence_mut().expect("groups") {
            for rule in group["rules"].as_sequence_mut().expect("rules") {
                if rule["alert"].as_str() == Some(name)
                    && let Some(m) = rule.as_mapping_mut()
                {
                    has_for = m.remove("for").is_some();
                }
            }
        }
        if has_for {
            let (ok, _) = test_rules(&promtool, Some(&eager));
            assert!(!ok, "{name}: its tests pass even without its `for`");
        }
        println!(
            "{name}: its tests fail when it never fires{}",
            if has_for {
                " and when it fires without waiting its `for`"
            } else {
                ""
            }
        );
    }
}

#[test]
fn each_alert_has_a_severity_a_summary_and_a_runbook() {
    let doc = rules();
    let anchors = markdown::anchors(&root().join("docs/operations.md"));
    assert!(!anchors.is_empty(), "docs/operations.md has headings");
    for rule in alert_rules(&doc) {
        let name = rule["alert"].as_str().expect("alert");
        let severity = rule["labels"]["severity"].as_str().unwrap_or_default();
        assert!(
            matches!(severity, "critical" | "warning"),
            "{name}: severity {severity:?}"
        );
        for key in ["summary", "description"] {
            assert!(
                !rule["annotations"][key]
                    .as_str()
                    .unwrap_or_default()
                    .is_empty(),
                "{name}: no {key}"
            );
        }
        let runbook = rule["annotations"]["runbook_url"]
            .as_str()
            .unwrap_or_default();
        let want = format!("docs/operations.md#{}", name.to_lowercase());
        assert_eq!(runbook, want, "{name}: runbook_url");
        assert!(
            anchors.contains(&name.to_lowercase()),
            "{name}: docs/operations.md has no section {name}"
        );
    }
}
