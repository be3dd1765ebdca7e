//! Tenancy rules: which AWS IoT policies, roles and endpoints each namespace may use.
//!
//! An IotPolicyBinding can hand any IoT permission to any principal, and a TopicBridge can sign
//! with the operator's own AWS identity, so on a shared cluster both are privilege-escalation
//! paths. The operator is started with a list of rules (`--tenancy-config`); an object that asks
//! for something no rule for its namespace allows is refused with `NotAllowed` before any AWS
//! call. Plain data in, plain verdict out: no Kubernetes types.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::api::{IotPolicyBindingSpec, TopicBridgeSpec};

/// Stands for the object's namespace inside a pattern, e.g. `{namespace}-*`.
pub const NAMESPACE_PLACEHOLDER: &str = "{namespace}";
/// How a TopicBridge source that leaves the AWS IoT endpoint to DescribeEndpoint is written in
/// `endpoints` patterns.
pub const DISCOVERED_ENDPOINT: &str = "iot:Data-ATS";

/// The whole tenancy configuration (the YAML file given with `--tenancy-config`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TenancyConfig {
    /// Rules; a request is allowed when any rule whose `namespaces` match allows it.
    pub rules: Vec<TenancyRule>,
}

/// What the namespaces matching `namespaces` may use. Patterns are globs (`*` any run of
/// characters, `?` one character) in which `{namespace}` stands for the object's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TenancyRule {
    /// Namespace names (globs) this rule applies to.
    pub namespaces: Vec<String>,
    /// Policy names an IotPolicyBinding may attach.
    #[serde(default)]
    pub bind_policies: Vec<String>,
    /// Policy names whose document an IotPolicyBinding may create and change (`policy.document`).
    #[serde(default)]
    pub manage_policies: Vec<String>,
    /// IAM role ARNs an IotPolicyBinding or TopicBridge may assume with the operator's identity.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Source endpoints a TopicBridge may connect to: the host of an `mqtt` URL or of an
    /// `awsIot.endpoint`, or `iot:Data-ATS` for an endpoint left to DescribeEndpoint.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// Sink endpoints a TopicBridge may connect to (the host of `sink.url`): where the operator
    /// sends the relayed messages and the sink's credentials. Left out: services of the bridge's
    /// own namespace only (`*.{namespace}.svc`, `*.{namespace}.svc.cluster.local`).
    #[serde(default = "own_namespace_services")]
    pub sink_endpoints: Vec<String>,
    /// Whether a TopicBridge may sign its AWS IoT connection with the operator's own AWS identity
    /// (`credentials` left empty).
    #[serde(default)]
    pub operator_credentials: bool,
}

/// The sinks a rule allows when it names none: Services of the object's own namespace.
pub fn own_namespace_services() -> Vec<String> {
    vec![
        format!("*.{NAMESPACE_PLACEHOLDER}.svc"),
        format!("*.{NAMESPACE_PLACEHOLDER}.svc.cluster.local"),
    ]
}

/// One thing an object asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    BindPolicy(String),
    ManagePolicy(String),
    Role(String),
    Endpoint(String),
    SinkEndpoint(String),
    OperatorCredentials,
}

impl Request {
    fn describe(&self) -> String {
        match self {
            Request::BindPolicy(p) => format!("bind policy {p:?}"),
            Request::ManagePolicy(p) => format!("manage the document of policy {p:?}"),
            Request::Role(r) => format!("assume role {r:?}"),
            Request::Endpoint(e) => format!("connect to endpoint {e:?}"),
            Request::SinkEndpoint(e) => format!("send to sink endpoint {e:?}"),
            Request::OperatorCredentials => "sign with the operator's own AWS credentials".into(),
        }
    }
}

/// Why a request was refused; `field` names the spec field that asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct NotAllowed {
    pub field: String,
    pub message: String,
}

/// The tenancy file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TenancyError {
    #[error("reading tenancy config {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing tenancy config {path}: {source}")]
    Parse {
        path: String,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("tenancy config: rules[{index}].{field}: {message}")]
    Invalid {
        index: usize,
        field: &'static str,
        message: String,
    },
}

impl Default for TenancyConfig {
    /// The rules of a fresh install: every namespace may attach the policies named after it
    /// (`<namespace>-*`) and connect bridge sources to any endpoint with credentials of its own,
    /// and sinks to Services of its own namespace. No namespace may manage policy documents,
    /// assume roles, or sign with the operator's identity.
    fn default() -> Self {
        Self {
            rules: vec![TenancyRule {
                namespaces: vec!["*".into()],
                bind_policies: vec![format!("{NAMESPACE_PLACEHOLDER}-*")],
                manage_policies: vec![],
                roles: vec![],
                endpoints: vec!["*".into()],
                sink_endpoints: own_namespace_services(),
                operator_credentials: false,
            }],
        }
    }
}

impl TenancyConfig {
    /// Everything allowed everywhere: a single-tenant cluster, and the CLI commands that run
    /// outside Kubernetes with the caller's own credentials.
    pub fn allow_all() -> Self {
        let all = || vec!["*".to_owned()];
        Self {
            rules: vec![TenancyRule {
                namespaces: all(),
                bind_policies: all(),
                manage_policies: all(),
                roles: all(),
                endpoints: all(),
                sink_endpoints: all(),
                operator_credentials: true,
            }],
        }
    }

    /// Reads and checks a YAML file.
    pub fn load(path: &Path) -> Result<Self, TenancyError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| TenancyError::Read {
            path: p.clone(),
            source,
        })?;
        let config: Self = serde_yaml::from_str(&text)
            .map_err(|source| TenancyError::Parse { path: p, source })?;
        config.validate()?;
        Ok(config)
    }

    /// Rejects rules that can never match, so a typo does not silently deny everything.
    pub fn validate(&self) -> Result<(), TenancyError> {
        for (index, rule) in self.rules.iter().enumerate() {
            if rule.namespaces.is_empty() {
                return Err(TenancyError::Invalid {
                    index,
                    field: "namespaces",
                    message: "must list at least one namespace pattern".into(),
                });
            }
            let lists: [(&'static str, &Vec<String>); 6] = [
                ("namespaces", &rule.namespaces),
                ("bindPolicies", &rule.bind_policies),
                ("managePolicies", &rule.manage_policies),
                ("roles", &rule.roles),
                ("endpoints", &rule.endpoints),
                ("sinkEndpoints", &rule.sink_endpoints),
            ];
            for (field, patterns) in lists {
                if patterns.iter().any(|p| p.is_empty()) {
                    return Err(TenancyError::Invalid {
                        index,
                        field,
                        message: "patterns must not be empty strings".into(),
                    });
                }
            }
            if rule
                .namespaces
                .iter()
                .any(|p| p.contains(NAMESPACE_PLACEHOLDER))
            {
                return Err(TenancyError::Invalid {
                    index,
                    field: "namespaces",
                    message: format!(
                        "{NAMESPACE_PLACEHOLDER} is only meaningful in the other lists"
                    ),
                });
            }
        }
        Ok(())
    }

    /// Checks every request; the first refusal wins.
    pub fn check_all(
        &self,
        namespace: &str,
        requests: impl IntoIterator<Item = (String, Request)>,
    ) -> Result<(), NotAllowed> {
        requests
            .into_iter()
            .try_for_each(|(field, r)| self.check(namespace, &field, r))
    }

    /// Allows or refuses one request of an object in `namespace`; `field` is the spec field
    /// that made it, for the message.
    pub fn check(&self, namespace: &str, field: &str, request: Request) -> Result<(), NotAllowed> {
        let rules: Vec<&TenancyRule> = self
            .rules
            .iter()
            .filter(|r| r.namespaces.iter().any(|p| glob_match(p, namespace)))
            .collect();
        if rules.is_empty() {
            return Err(NotAllowed {
                field: field.into(),
                message: format!(
                    "no tenancy rule covers namespace {namespace:?}, so it may not {}",
                    request.describe()
                ),
            });
        }
        let (value, allowed): (&str, Vec<&String>) = match &request {
            Request::OperatorCredentials => {
                if rules.iter().any(|r| r.operator_credentials) {
                    return Ok(());
                }
                return Err(NotAllowed {
                    field: field.into(),
                    message: format!(
                        "namespace {namespace:?} may not {}; give the bridge credentials of its own (secret, cognito) or an allowed roleArn",
                        request.describe()
                    ),
                });
            }
            Request::BindPolicy(v) => (v, rules.iter().flat_map(|r| &r.bind_policies).collect()),
            Request::ManagePolicy(v) => {
                (v, rules.iter().flat_map(|r| &r.manage_policies).collect())
            }
            Request::Role(v) => (v, rules.iter().flat_map(|r| &r.roles).collect()),
            Request::Endpoint(v) => (v, rules.iter().flat_map(|r| &r.endpoints).collect()),
            Request::SinkEndpoint(v) => (v, rules.iter().flat_map(|r| &r.sink_endpoints).collect()),
        };
        let expanded: Vec<String> = allowed
            .iter()
            .map(|p| p.replace(NAMESPACE_PLACEHOLDER, namespace))
            .collect();
        if expanded.iter().any(|p| glob_match(p, value)) {
            return Ok(());
        }
        let allowed = if expanded.is_empty() {
            "none".to_owned()
        } else {
            expanded.join(", ")
        };
        Err(NotAllowed {
            field: field.into(),
            message: format!(
                "namespace {namespace:?} may not {} (allowed: {allowed})",
                request.describe()
            ),
        })
    }
}

/// Glob match over whole strings: `*` any run of characters (including none), `?` exactly one.
pub fn glob_match(pattern: &str, value: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let v: Vec<char> = value.chars().collect();
    // Iterative matcher with one backtrack point: linear in practice, no recursion.
    let (mut pi, mut vi) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while vi < v.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == v[vi]) {
            pi += 1;
            vi += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, vi));
            pi += 1;
        } else if let Some((sp, sv)) = star {
            pi = sp + 1;
            vi = sv + 1;
            star = Some((sp, sv + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// What this binding asks of the tenancy rules, with the field that asks.
pub fn binding_requests(spec: &IotPolicyBindingSpec) -> Vec<(String, Request)> {
    let mut r = vec![(
        "spec.policy.name".to_owned(),
        Request::BindPolicy(spec.policy.name.clone()),
    )];
    if spec.policy.document.is_some() {
        r.push((
            "spec.policy.document".to_owned(),
            Request::ManagePolicy(spec.policy.name.clone()),
        ));
    }
    if let Some(role) = &spec.role_arn {
        r.push(("spec.roleArn".to_owned(), Request::Role(role.clone())));
    }
    r
}

/// What this bridge asks of the tenancy rules, with the field that asks: the source and
/// sink endpoints, and for AWS IoT the identity that signs.
pub fn bridge_requests(spec: &TopicBridgeSpec) -> Vec<(String, Request)> {
    let mut r = Vec::new();
    if let Some(aws) = &spec.source.aws_iot {
        let endpoint = match &aws.endpoint {
            // host[:port]; the port is not part of the rule.
            Some(e) => e.split(':').next().unwrap_or(e).to_ascii_lowercase(),
            None => DISCOVERED_ENDPOINT.to_owned(),
        };
        r.push((
            "spec.source.awsIot.endpoint".to_owned(),
            Request::Endpoint(endpoint),
        ));
        let c = &aws.credentials;
        if let Some(role) = &c.role_arn {
            r.push((
                "spec.source.awsIot.credentials.roleArn".to_owned(),
                Request::Role(role.clone()),
            ));
        } else if c.secret.is_none() && c.cognito.is_none() {
            r.push((
                "spec.source.awsIot.credentials".to_owned(),
                Request::OperatorCredentials,
            ));
        }
    }
    if let Some(mqtt) = &spec.source.mqtt {
        // An unparsable URL is reported by validate(); here it asks for its raw text.
        let host = url::Url::parse(&mqtt.url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_ascii_lowercase))
            .unwrap_or_else(|| mqtt.url.clone());
        r.push(("spec.source.mqtt.url".to_owned(), Request::Endpoint(host)));
    }
    let sink = url::Url::parse(&spec.sink.endpoint.url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_ascii_lowercase))
        .unwrap_or_else(|| spec.sink.endpoint.url.clone());
    r.push(("spec.sink.url".to_owned(), Request::SinkEndpoint(sink)));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sinks_default_to_the_services_of_the_own_namespace() {
        let rules = TenancyConfig::default();
        let sink = |host: &str| {
            rules.check(
                "team-a",
                "spec.sink.url",
                Request::SinkEndpoint(host.into()),
            )
        };
        sink("mosquitto.team-a.svc").expect("own Service");
        sink("mosquitto.team-a.svc.cluster.local").expect("own Service, full name");
        let refused = sink("attacker.example.com").expect_err("a host of the author's choosing");
        assert!(refused.to_string().contains("spec.sink.url"), "{refused}");
        assert!(refused.to_string().contains("*.team-a.svc"), "{refused}");
        sink("mosquitto.team-b.svc").expect_err("another namespace's Service");
        sink("127.0.0.1").expect_err("an address");
        // A rule file that names no sinks gets the same default.
        let file: TenancyConfig =
            serde_yaml::from_str("rules:\n  - namespaces: ['*']\n    endpoints: ['*']\n").unwrap();
        assert_eq!(file.rules[0].sink_endpoints, own_namespace_services());
    }

    #[test]
    fn globs() {
        assert!(glob_match("*", ""));
        assert!(glob_match("*", "anything/at:all"));
        assert!(glob_match("team-a-*", "team-a-sensors"));
        assert!(!glob_match("team-a-*", "team-b-sensors"));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "ac"));
        assert!(glob_match(
            "*.iot.*.amazonaws.com",
            "abc-ats.iot.eu-west-1.amazonaws.com"
        ));
        assert!(!glob_match("*.iot.*.amazonaws.com", "evil.example.com"));
        assert!(glob_match("a*b*c", "aXbYbZc"));
        assert!(!glob_match("a*b*c", "aXbYbZ"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exactly"));
    }

    #[test]
    fn default_rules_allow_only_policies_named_after_the_namespace() {
        let t = TenancyConfig::default();
        assert!(
            t.check("team-a", "f", Request::BindPolicy("team-a-sensors".into()))
                .is_ok()
        );
        let e = t
            .check(
                "team-a",
                "spec.policy.name",
                Request::BindPolicy("admin".into()),
            )
            .unwrap_err();
        assert_eq!(e.field, "spec.policy.name");
        assert!(e.message.contains("\"admin\""), "{e}");
        assert!(e.message.contains("allowed: team-a-*"), "{e}");
        // Another tenant's policy.
        assert!(
            t.check("team-a", "f", Request::BindPolicy("team-b-x".into()))
                .is_err()
        );
        assert!(
            t.check("team-a", "f", Request::ManagePolicy("team-a-x".into()))
                .is_err()
        );
        assert!(
            t.check("team-a", "f", Request::Role("arn:aws:iam::1:role/r".into()))
                .is_err()
        );
        assert!(
            t.check("team-a", "f", Request::OperatorCredentials)
                .is_err()
        );
        assert!(
            t.check(
                "team-a",
                "f",
                Request::Endpoint("broker.example.com".into())
            )
            .is_ok()
        );
    }

    #[test]
    fn rules_for_a_namespace_add_up() {
        let yaml = r#"
rules:
  - namespaces: ["team-*"]
    bindPolicies: ["{namespace}-*"]
  - namespaces: ["team-ops"]
    managePolicies: ["shared-*"]
    roles: ["arn:aws:iam::123456789012:role/iot-*"]
    endpoints: ["*.iot.eu-west-1.amazonaws.com", "iot:Data-ATS"]
    operatorCredentials: true
"#;
        let t: TenancyConfig = serde_yaml::from_str(yaml).unwrap();
        t.validate().unwrap();
        assert!(
            t.check("team-ops", "f", Request::BindPolicy("team-ops-1".into()))
                .is_ok()
        );
        assert!(
            t.check("team-ops", "f", Request::ManagePolicy("shared-1".into()))
                .is_ok()
        );
        assert!(
            t.check("team-a", "f", Request::ManagePolicy("shared-1".into()))
                .is_err()
        );
        assert!(
            t.check(
                "team-ops",
                "f",
                Request::Role("arn:aws:iam::123456789012:role/iot-x".into())
            )
            .is_ok()
        );
        assert!(
            t.check(
                "team-ops",
                "f",
                Request::Endpoint(DISCOVERED_ENDPOINT.into())
            )
            .is_ok()
        );
        assert!(
            t.check("team-a", "f", Request::Endpoint(DISCOVERED_ENDPOINT.into()))
                .is_err()
        );
        assert!(
            t.check("team-ops", "f", Request::OperatorCredentials)
                .is_ok()
        );
        let e = t
            .check("kube-system", "f", Request::BindPolicy("x".into()))
            .unwrap_err();
        assert!(e.message.contains("no tenancy rule covers"), "{e}");
    }

    #[test]
    fn bad_files_are_refused_with_the_field() {
        let unknown = "rules:\n  - namespaces: [a]\n    bindPolicy: [x]\n";
        let e = serde_yaml::from_str::<TenancyConfig>(unknown).unwrap_err();
        assert!(e.to_string().contains("bindPolicy"), "{e}");
        let empty: TenancyConfig = serde_yaml::from_str("rules:\n  - namespaces: []\n").unwrap();
        let e = empty.validate().unwrap_err().to_string();
        assert!(e.contains("rules[0].namespaces"), "{e}");
        let placeholder: TenancyConfig =
            serde_yaml::from_str("rules:\n  - namespaces: ['{namespace}']\n").unwrap();
        assert!(placeholder.validate().is_err());
    }

    #[test]
    fn allow_all_allows_everything() {
        let t = TenancyConfig::allow_all();
        for r in [
            Request::BindPolicy("x".into()),
            Request::ManagePolicy("x".into()),
            Request::Role("x".into()),
            Request::Endpoint("x".into()),
            Request::OperatorCredentials,
        ] {
            assert!(t.check("any", "f", r).is_ok());
        }
    }
}
