//! The Helm chart, rendered with the helm binary that tests/run.sh installs: least-privilege
//! RBAC, restricted security context, probes, flags passed through, values rejected by the
//! schema, CRDs identical to crds/, and the plain manifest in deploy/ kept in sync.

use std::path::{Path, PathBuf};
use std::process::Command;

use iot_operator::tenancy::TenancyConfig;
use serde_json::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn helm() -> PathBuf {
    std::env::var_os("IOT_OPERATOR_TEST_HELM")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".cache/bin/helm"))
}

fn helm_output(args: &[&str]) -> std::process::Output {
    Command::new(helm())
        .args(args)
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "running {} (tests/run.sh installs it): {e}",
                helm().display()
            )
        })
}

/// `helm template` with `--set` pairs; every document parsed.
fn render(sets: &[&str]) -> Vec<Value> {
    let mut args = vec![
        "template",
        "iot-operator",
        "charts/iot-operator",
        "--namespace",
        "iot-operator",
    ];
    for s in sets {
        args.push("--set");
        args.push(s);
    }
    let out = helm_output(&args);
    assert!(
        out.status.success(),
        "helm template failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .filter_map(|d| {
            let v: Value = serde::Deserialize::deserialize(d).ok()?;
            (!v.is_null()).then_some(v)
        })
        .collect()
}

fn kinds<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn deployment(docs: &[Value]) -> &Value {
    kinds(docs, "Deployment")[0]
}

fn env(docs: &[Value], name: &str) -> Option<String> {
    deployment(docs)["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
        .and_then(|e| e["value"].as_str().map(str::to_owned))
}

/// The strings of a JSON list (`verbs`, `resources`).
fn strings(list: &Value) -> Vec<&str> {
    list.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn assert_no_wildcards(docs: &[Value]) {
    for role in docs
        .iter()
        .filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "Role")
    {
        for rule in role["rules"].as_array().unwrap() {
            for key in ["apiGroups", "resources", "verbs", "resourceNames"] {
                if let Some(items) = rule[key].as_array() {
                    assert!(!items.iter().any(|i| i == "*"), "wildcard in {key}: {rule}");
                }
            }
            let verbs = strings(&rule["verbs"]);
            if rule["resources"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r == "secrets")
            {
                assert_eq!(
                    verbs,
                    vec!["get"],
                    "Secrets are read one by one, never listed or written"
                );
            }
            // It deletes nothing but the records and the Leases (bridge sharding) it wrote
            // itself, in its own namespace.
            let own_records = role["metadata"]["name"] == "iot-operator-records"
                && strings(&rule["resources"]) == ["configmaps"];
            let own_leases = role["metadata"]["name"] == "iot-operator-leader-election"
                && strings(&rule["resources"]) == ["leases"];
            assert!(
                !verbs.contains(&"delete") || own_records || own_leases,
                "the operator deletes nothing of its users': {rule}"
            );
        }
    }
}

#[test]
fn default_install_is_least_privilege_and_restricted() {
    let docs = render(&[]);
    assert_no_wildcards(&docs);
    assert_eq!(kinds(&docs, "ClusterRole").len(), 1);
    assert!(
        kinds(&docs, "PodDisruptionBudget").is_empty(),
        "no PDB for one replica"
    );
    assert!(kinds(&docs, "ServiceMonitor").is_empty());
    let pod = &deployment(&docs)["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let c = &pod["containers"][0];
    let sc = &c["securityContext"];
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert!(
        c["resources"]["requests"]["memory"].is_string()
            && c["resources"]["limits"]["memory"].is_string()
    );
    assert_eq!(c["args"], serde_json::json!(["run"]));
    // One replica still elects itself: a rolling update's new pod stands by until the old one
    // has released the lease (no two relays with one client id).
    assert_eq!(
        env(&docs, "IOT_OPERATOR_LEADER_ELECTION").as_deref(),
        Some("true")
    );
    assert!(
        deployment(&docs)["spec"]["strategy"].is_null(),
        "RollingUpdate"
    );
    assert_eq!(env(&docs, "IOT_OPERATOR_NAMESPACE"), None);
}

/// Without leader election, nothing but the Deployment strategy keeps an old and a new pod from
/// running the same bridges at once.
#[test]
fn without_leader_election_the_old_pod_stops_first() {
    let docs = render(&["leaderElection.enabled=false"]);
    assert_eq!(env(&docs, "IOT_OPERATOR_LEADER_ELECTION"), None);
    assert_eq!(deployment(&docs)["spec"]["strategy"]["type"], "Recreate");
    assert!(
        !kinds(&docs, "Role")
            .iter()
            .any(|r| r["metadata"]["name"] == "iot-operator-leader-election"),
        "no lease rights without election"
    );
}

/// The verbs granted on the operator's own kinds are the ones its calls need, no more.
#[test]
fn rbac_grants_exactly_the_verbs_used() {
    let docs = render(&[]);
    let role = kinds(&docs, "ClusterRole")[0];
    let mut grants: Vec<(String, String)> = Vec::new();
    for rule in role["rules"].as_array().unwrap() {
        for r in strings(&rule["resources"]) {
            grants.push((r.to_owned(), strings(&rule["verbs"]).join(",")));
        }
    }
    grants.sort();
    let want: Vec<(String, String)> = [
        ("events", "create,patch"),
        ("iotpolicybindings", "get,list,watch,patch"),
        ("iotpolicybindings/status", "patch"),
        ("secrets", "get"),
        ("topicbridges", "get,list,watch"),
        ("topicbridges/status", "patch"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(grants, want);
}

/// One controller at a time: the other's kinds, and what only it needs (Secrets for bridges;
/// ConfigMaps for the policy records), are not granted, and the process is told which to run.
#[test]
fn one_controller_gets_only_its_own_rights() {
    let grants = |docs: &[Value]| -> Vec<String> {
        let mut all: Vec<String> = kinds(docs, "ClusterRole")
            .into_iter()
            .chain(kinds(docs, "Role"))
            .flat_map(|r| r["rules"].as_array().cloned().unwrap_or_default())
            .flat_map(|rule| {
                strings(&rule["resources"])
                    .into_iter()
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect();
        all.sort();
        all.dedup();
        all
    };
    let bridge_only = render(&["controllers={bridge}"]);
    assert_eq!(
        env(&bridge_only, "IOT_OPERATOR_CONTROLLERS").as_deref(),
        Some("bridge")
    );
    assert_eq!(
        grants(&bridge_only),
        vec![
            "events",
            "leases",
            "secrets",
            "topicbridges",
            "topicbridges/status"
        ]
    );
    let policy_only = render(&["controllers={policy}"]);
    assert_eq!(
        env(&policy_only, "IOT_OPERATOR_CONTROLLERS").as_deref(),
        Some("policy")
    );
    assert_eq!(
        grants(&policy_only),
        vec![
            "configmaps",
            "events",
            "iotpolicybindings",
            "iotpolicybindings/status",
            "leases"
        ]
    );
    assert_eq!(
        env(&render(&[]), "IOT_OPERATOR_CONTROLLERS").as_deref(),
        Some("policy,bridge")
    );
}

/// Secrets for bridges in listed namespaces only: no cluster-wide Secret access left.
#[test]
fn bridge_secrets_can_be_limited_to_listed_namespaces() {
    let docs = render(&["bridgeSecretNamespaces={team-a,team-b}"]);
    let cluster = kinds(&docs, "ClusterRole")[0];
    assert!(
        !cluster["rules"].to_string().contains("secrets"),
        "cluster-wide Secret access left: {}",
        cluster["rules"]
    );
    let mut namespaces: Vec<&str> = kinds(&docs, "Role")
        .into_iter()
        .filter(|r| r["rules"].to_string().contains("secrets"))
        .map(|r| {
            assert_eq!(strings(&r["rules"][0]["verbs"]), vec!["get"]);
            r["metadata"]["namespace"].as_str().unwrap_or_default()
        })
        .collect();
    namespaces.sort();
    assert_eq!(namespaces, vec!["team-a", "team-b"]);
    let bound = kinds(&docs, "RoleBinding")
        .into_iter()
        .filter(|b| b["metadata"]["name"] == "iot-operator-bridge-secrets")
        .count();
    assert_eq!(bound, 2);
    assert_no_wildcards(&docs);
    // The default keeps the cluster-wide `get` (pinned in rbac_grants_exactly_the_verbs_used).
}

/// The bindings' records: ConfigMaps in the operator's own namespace only, with the verbs the
/// ledger calls.
#[test]
fn records_are_kept_only_in_the_operators_namespace() {
    for values in [&[][..], &["watchNamespace=team-a"][..]] {
        let docs = render(values);
        let records = kinds(&docs, "Role")
            .into_iter()
            .find(|r| r["metadata"]["name"] == "iot-operator-records")
            .expect("records role");
        assert_eq!(records["metadata"]["namespace"], "iot-operator");
        let rules = records["rules"].as_array().unwrap();
        assert_eq!(rules.len(), 1);
        assert_eq!(strings(&rules[0]["resources"]), vec!["configmaps"]);
        assert_eq!(
            strings(&rules[0]["verbs"]),
            vec!["get", "list", "create", "update", "delete"]
        );
        let binding = kinds(&docs, "RoleBinding")
            .into_iter()
            .find(|r| r["metadata"]["name"] == "iot-operator-records")
            .expect("records role binding");
        assert_eq!(binding["subjects"][0]["namespace"], "iot-operator");
        // No other rule anywhere grants ConfigMaps.
        let elsewhere = kinds(&docs, "ClusterRole")
            .into_iter()
            .chain(kinds(&docs, "Role"))
            .filter(|r| r["metadata"]["name"] != "iot-operator-records")
            .any(|r| r["rules"].to_string().contains("configmaps"));
        assert!(!elsewhere, "configmaps granted outside the records role");
    }
}

#[test]
fn flags_and_service_account_annotations_pass_through() {
    let docs = render(&[
        "logLevel=debug",
        "logFormat=text",
        "aws.region=eu-west-1",
        "aws.rateLimit=5",
        "aws.legacyAttachApi=true",
        "relay.window=50",
        "relay.readLingerMs=2",
        "resyncSeconds=60",
        "serviceAccount.annotations.eks\\.amazonaws\\.com/role-arn=arn:aws:iam::123456789012:role/iot",
        "metrics.serviceMonitor.enabled=true",
        "networkPolicy.enabled=true",
    ]);
    assert_eq!(
        env(&docs, "IOT_OPERATOR_LOG_LEVEL").as_deref(),
        Some("debug")
    );
    assert_eq!(
        env(&docs, "IOT_OPERATOR_LOG_FORMAT").as_deref(),
        Some("text")
    );
    assert_eq!(env(&docs, "AWS_REGION").as_deref(), Some("eu-west-1"));
    assert_eq!(
        env(&docs, "IOT_OPERATOR_AWS_RATE_LIMIT").as_deref(),
        Some("5")
    );
    assert_eq!(
        env(&docs, "IOT_OPERATOR_LEGACY_ATTACH_API").as_deref(),
        Some("true")
    );
    assert_eq!(
        env(&docs, "IOT_OPERATOR_RELAY_WINDOW").as_deref(),
        Some("50")
    );
    assert_eq!(
        env(&docs, "IOT_OPERATOR_READ_LINGER_MS").as_deref(),
        Some("2")
    );
    assert_eq!(
        env(&docs, "IOT_OPERATOR_RESYNC_SECONDS").as_deref(),
        Some("60")
    );
    let sa = kinds(&docs, "ServiceAccount")[0];
    assert_eq!(
        sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"],
        "arn:aws:iam::123456789012:role/iot"
    );
    assert_eq!(kinds(&docs, "ServiceMonitor").len(), 1);
    assert_eq!(kinds(&docs, "NetworkPolicy").len(), 1);
}

#[test]
fn single_namespace_install_uses_namespaced_rbac_only() {
    let docs = render(&["watchNamespace=team-a"]);
    assert!(
        kinds(&docs, "ClusterRole").is_empty() && kinds(&docs, "ClusterRoleBinding").is_empty()
    );
    let role = kinds(&docs, "Role")[0];
    assert_eq!(role["metadata"]["namespace"], "team-a");
    assert_eq!(
        kinds(&docs, "RoleBinding")[0]["subjects"][0]["namespace"],
        "iot-operator"
    );
    assert_eq!(
        env(&docs, "IOT_OPERATOR_NAMESPACE").as_deref(),
        Some("team-a")
    );
    assert_no_wildcards(&docs);
}

#[test]
fn two_replicas_elect_a_leader_with_a_pdb() {
    let docs = render(&["replicaCount=2"]);
    assert_eq!(deployment(&docs)["spec"]["replicas"], 2);
    assert_eq!(
        env(&docs, "IOT_OPERATOR_LEADER_ELECTION").as_deref(),
        Some("true")
    );
    assert_eq!(kinds(&docs, "PodDisruptionBudget").len(), 1);
    let lease_role = kinds(&docs, "Role")
        .into_iter()
        .find(|r| r["metadata"]["name"] == "iot-operator-leader-election")
        .expect("lease role");
    assert_eq!(
        lease_role["metadata"]["namespace"], "iot-operator",
        "leases only in the operator's namespace"
    );
    assert!(lease_role["rules"].to_string().contains("leases"));
    assert_no_wildcards(&docs);
}

/// Bridges spread over replicas: sharding turns leader election on, and only then are Leases
/// listed, watched and deleted, and only in the operator's namespace.
#[test]
fn bridge_sharding_adds_lease_rights_in_the_operators_namespace_only() {
    let lease_rules = |docs: &[Value]| -> Vec<String> {
        kinds(docs, "Role")
            .into_iter()
            .filter(|r| r["metadata"]["name"] == "iot-operator-leader-election")
            .flat_map(|r| r["rules"].as_array().cloned().unwrap_or_default())
            .filter(|rule| rule.get("resourceNames").is_none())
            .map(|rule| strings(&rule["verbs"]).join(","))
            .collect()
    };
    let plain = render(&[]);
    assert_eq!(env(&plain, "IOT_OPERATOR_SHARD_BRIDGES"), None);
    assert_eq!(lease_rules(&plain), vec!["create"]);
    let docs = render(&[
        "bridgeSharding.enabled=true",
        "leaderElection.enabled=false",
    ]);
    assert_eq!(
        env(&docs, "IOT_OPERATOR_SHARD_BRIDGES").as_deref(),
        Some("true")
    );
    assert_eq!(
        env(&docs, "IOT_OPERATOR_LEADER_ELECTION").as_deref(),
        Some("true"),
        "sharding needs the Leases"
    );
    assert_eq!(
        lease_rules(&docs),
        vec!["create", "list,watch,get,update,delete"]
    );
    // Nothing cluster-wide about Leases.
    for role in kinds(&docs, "ClusterRole") {
        assert!(!role["rules"].to_string().contains("leases"), "{role}");
    }
    assert_no_wildcards(&docs);
}

/// The rules in the rendered tenancy ConfigMap, read by the operator's own parser.
fn tenancy_rules(docs: &[Value]) -> TenancyConfig {
    let cm = kinds(docs, "ConfigMap")
        .into_iter()
        .find(|c| c["metadata"]["name"] == "iot-operator-tenancy")
        .expect("tenancy ConfigMap");
    let text = cm["data"]["tenancy.yaml"].as_str().expect("tenancy.yaml");
    serde_yaml::from_str(text).expect("the operator parses the file")
}

/// The chart's tenancy ConfigMap is read by the operator's own parser, the default values equal
/// the built-in default rules, and the pod mounts the file the flag names.
#[test]
fn tenancy_rules_reach_the_operator() {
    let docs = render(&[]);
    let rules = tenancy_rules(&docs);
    rules.validate().expect("valid rules");
    assert_eq!(
        rules,
        TenancyConfig::default(),
        "chart default = built-in default"
    );
    assert_eq!(
        env(&docs, "IOT_OPERATOR_TENANCY_CONFIG").as_deref(),
        Some("/etc/iot-operator/tenancy.yaml")
    );
    let pod = &deployment(&docs)["spec"]["template"]["spec"];
    assert_eq!(
        pod["volumes"][0]["configMap"]["name"],
        "iot-operator-tenancy"
    );
    assert_eq!(
        pod["containers"][0]["volumeMounts"][0]["mountPath"],
        "/etc/iot-operator"
    );
    let before =
        deployment(&docs)["spec"]["template"]["metadata"]["annotations"]["checksum/tenancy"]
            .clone();

    let open =
        render(&["tenancy.rules[0].namespaces[0]=ops,tenancy.rules[0].operatorCredentials=true"]);
    let rules = tenancy_rules(&open);
    assert_eq!(rules.rules[0].namespaces, vec!["ops".to_string()]);
    assert!(rules.rules[0].operator_credentials);
    let after =
        deployment(&open)["spec"]["template"]["metadata"]["annotations"]["checksum/tenancy"]
            .clone();
    assert_ne!(before, after, "changed rules roll the pods");
}

#[test]
fn the_values_schema_rejects_wrong_values() {
    for bad in [
        "replicaCount=0",
        "logFormat=xml",
        "relay.window=0",
        "relay.readLingerMs=500",
        "aws.region=Europe",
        "unknownKey=1",
        "image.pullPolicy=Sometimes",
        "tenancy.rules[0].namespaces=null",
        "tenancy.rules[0].bindPolicy[0]=x",
    ] {
        let out = helm_output(&["template", "x", "charts/iot-operator", "--set", bad]);
        assert!(!out.status.success(), "{bad} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("schema") || err.contains("values"),
            "{bad}: {err}"
        );
    }
}

#[test]
fn chart_crds_are_the_generated_ones() {
    for entry in std::fs::read_dir(root().join("crds")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap();
        let chart = root().join("charts/iot-operator/crds").join(name);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            std::fs::read_to_string(&chart).unwrap_or_default(),
            "{} differs from crds/: copy crds/*.yaml into the chart",
            chart.display()
        );
    }
}

#[test]
fn the_plain_manifest_is_rendered_from_the_chart() {
    let out = helm_output(&[
        "template",
        "iot-operator",
        "charts/iot-operator",
        "--namespace",
        "iot-operator",
        "--include-crds",
    ]);
    assert!(out.status.success());
    let want = format!(
        "# Rendered from charts/iot-operator with default values: `bash deploy/render.sh`.\n---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: iot-operator\n{}",
        String::from_utf8(out.stdout).unwrap()
    );
    let have = std::fs::read_to_string(root().join("deploy/iot-operator.yaml")).unwrap_or_default();
    assert!(
        have == want,
        "deploy/iot-operator.yaml is stale: run `bash deploy/render.sh`"
    );
}

#[test]
fn alert_rules_and_dashboard_are_the_files_and_off_by_default() {
    let docs = render(&[]);
    assert!(kinds(&docs, "PrometheusRule").is_empty());
    assert!(
        !docs
            .iter()
            .any(|d| d["kind"] == "ConfigMap" && d["data"]["iot-operator.json"].is_string()),
        "no dashboard unless asked for"
    );
    // Release `monitoring`: its metrics Service, hence the ServiceMonitor's job, is
    // `monitoring-iot-operator-metrics`.
    let out = helm_output(&[
        "template",
        "monitoring",
        "charts/iot-operator",
        "--namespace",
        "ops",
        "--set",
        "metrics.prometheusRule.enabled=true",
        "--set",
        "metrics.prometheusRule.labels.release=prometheus",
        "--set",
        "metrics.prometheusRule.runbookBaseUrl=https://runbooks.example/iot",
        "--set",
        "metrics.grafanaDashboard.enabled=true",
        "--set",
        "metrics.grafanaDashboard.namespace=grafana",
        "--set",
        "metrics.serviceMonitor.enabled=true",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs: Vec<Value> =
        serde_yaml::Deserializer::from_str(&String::from_utf8_lossy(&out.stdout))
            .filter_map(|d| serde::Deserialize::deserialize(d).ok())
            .filter(|v: &Value| !v.is_null())
            .collect();
    let service = kinds(&docs, "Service")[0]["metadata"]["name"]
        .as_str()
        .expect("service name")
        .to_owned();
    assert_eq!(service, "monitoring-iot-operator-metrics");
    let rule = kinds(&docs, "PrometheusRule")[0];
    assert_eq!(rule["metadata"]["labels"]["release"], "prometheus");
    let file =
        std::fs::read_to_string(root().join("charts/iot-operator/files/prometheus-rules.yaml"))
            .expect("rules file")
            .replace(
                "job=\"iot-operator-metrics\"",
                &format!("job=\"{service}\""),
            )
            .replace("docs/operations.md", "https://runbooks.example/iot");
    let want: Value = serde_yaml::from_str(&file).expect("rules YAML");
    assert_eq!(rule["spec"], want, "the PrometheusRule is the rule file");
    assert!(
        rule["spec"]
            .to_string()
            .contains(&format!("up{{job=\\\"{service}\\\"}}")),
        "IotOperatorAbsent names the ServiceMonitor's job"
    );
    let dashboard = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["data"]["iot-operator.json"].is_string())
        .expect("dashboard ConfigMap");
    assert_eq!(dashboard["metadata"]["namespace"], "grafana");
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
    let json: Value =
        serde_json::from_str(dashboard["data"]["iot-operator.json"].as_str().unwrap()).unwrap();
    let file: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("charts/iot-operator/files/grafana-dashboard.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(json, file, "the ConfigMap holds the dashboard file");
}

#[test]
fn install_notes_name_what_the_chart_made() {
    let out = helm_output(&[
        "install",
        "--dry-run",
        "shop",
        "charts/iot-operator",
        "--namespace",
        "ops",
        "--set",
        "aws.region=eu-west-1",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let notes = text.split("NOTES:").nth(1).expect("NOTES");
    for want in [
        "kubectl -n ops rollout status deployment/shop-iot-operator",
        "kubectl -n ops logs deployment/shop-iot-operator",
        "kubectl get iot --all-namespaces",
        "port-forward service/shop-iot-operator-metrics 8080",
        "metrics.prometheusRule.enabled=true",
        "docs/operations.md#runbooks",
    ] {
        assert!(notes.contains(want), "NOTES lack {want:?}:\n{notes}");
    }
    assert!(!notes.contains("aws.region is not set"), "{notes}");
    // The names it gives are the chart's own.
    let manifest = text.split("NOTES:").next().unwrap_or_default();
    assert!(
        manifest.contains("name: shop-iot-operator-metrics"),
        "{manifest}"
    );
    assert!(
        manifest.contains("kind: Deployment\nmetadata:\n  name: shop-iot-operator\n"),
        "{manifest}"
    );
}
