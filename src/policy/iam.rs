//! Whether an IAM role may use AWS IoT: setup step 3 of Amplify PubSub ("let the Cognito
//! authenticated role use AWS IoT"), which, when forgotten, shows only as a closed socket in the
//! browser. Evaluates the role's policy documents (attached and inline) for the IoT actions a
//! client needs, the way IAM does for one principal: an explicit Deny wins, then an Allow, else
//! denied. Statements with conditions, or limited to some resources, make the answer uncertain
//! rather than yes. Pure: the documents come from the caller.

use std::fmt;
use std::future::Future;

use super::iot_api::AwsError;

/// The IoT actions a PubSub client needs.
pub const IOT_ACTIONS: [&str; 4] = ["iot:Connect", "iot:Publish", "iot:Subscribe", "iot:Receive"];

/// One statement, as far as the check needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Statement {
    allow: bool,
    /// `Action` patterns, or `NotAction` patterns when `not_action`.
    actions: Vec<String>,
    not_action: bool,
    /// Every resource (`*`), as opposed to some.
    all_resources: bool,
    conditional: bool,
}

/// A named policy document of the role.
#[derive(Debug, Clone)]
pub struct RolePolicy {
    /// Policy ARN (attached) or name (inline), for messages.
    pub name: String,
    pub document: serde_json::Value,
}

/// The verdict for one action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Allowed,
    /// Allowed only under conditions, or only for some resources: cannot be known from here.
    Uncertain,
    /// Explicitly denied.
    Denied,
    /// No statement allows it.
    NotAllowed,
}

/// What a role may do of [`IOT_ACTIONS`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleVerdict {
    pub role: String,
    /// Per action, in the order of [`IOT_ACTIONS`].
    pub actions: Vec<(&'static str, Access)>,
}

impl RoleVerdict {
    /// Actions the role may not use.
    pub fn missing(&self) -> Vec<&'static str> {
        self.actions
            .iter()
            .filter(|(_, a)| matches!(a, Access::Denied | Access::NotAllowed))
            .map(|(n, _)| *n)
            .collect()
    }

    /// Actions allowed only under conditions or for some resources.
    pub fn uncertain(&self) -> Vec<&'static str> {
        self.actions
            .iter()
            .filter(|(_, a)| *a == Access::Uncertain)
            .map(|(n, _)| *n)
            .collect()
    }
}

impl fmt::Display for RoleVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (missing, uncertain) = (self.missing(), self.uncertain());
        if missing.is_empty() && uncertain.is_empty() {
            return write!(f, "role {} may use {}", self.role, IOT_ACTIONS.join(", "));
        }
        write!(f, "role {}", self.role)?;
        if !missing.is_empty() {
            write!(f, " may not use {}", missing.join(", "))?;
        }
        if !uncertain.is_empty() {
            if !missing.is_empty() {
                write!(f, ";")?;
            }
            write!(
                f,
                " may use {} only under conditions or for some resources (not checked)",
                uncertain.join(", ")
            )?;
        }
        Ok(())
    }
}

/// The roles of a Cognito identity pool.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolRoles {
    pub authenticated: Option<String>,
    pub unauthenticated: Option<String>,
    /// Whether the pool lets guests in (then the unauthenticated role matters too).
    pub allows_guests: bool,
}

/// The Cognito and IAM reads the check makes. Read only: the operator never changes IAM.
pub trait RoleSource: Send + Sync {
    /// `GetIdentityPoolRoles` and `DescribeIdentityPool`.
    fn pool_roles(&self, pool: &str) -> impl Future<Output = Result<PoolRoles, AwsError>> + Send;
    /// Every policy of a role: the default version of each attached managed policy
    /// (`ListAttachedRolePolicies`, `GetPolicy`, `GetPolicyVersion`) and each inline one
    /// (`ListRolePolicies`, `GetRolePolicy`).
    fn role_policies(
        &self,
        role_arn: &str,
    ) -> impl Future<Output = Result<Vec<RolePolicy>, AwsError>> + Send;
}

/// The finding for one pool role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolFinding {
    pub pool: String,
    /// `authenticated` or `unauthenticated`.
    pub kind: &'static str,
    /// `None`: the pool has no such role, so its identities get no AWS credentials at all.
    pub verdict: Option<RoleVerdict>,
}

/// Checks each pool's authenticated role, and its unauthenticated role where the pool allows
/// guests.
pub async fn check_pools<S: RoleSource>(
    source: &S,
    pools: &[String],
) -> Result<Vec<PoolFinding>, AwsError> {
    let mut findings = Vec::new();
    for pool in pools {
        let roles = source.pool_roles(pool).await?;
        let mut wanted = vec![("authenticated", roles.authenticated.clone())];
        if roles.allows_guests {
            wanted.push(("unauthenticated", roles.unauthenticated.clone()));
        }
        for (kind, role) in wanted {
            let verdict = match role {
                Some(role) => {
                    let policies = source.role_policies(&role).await?;
                    Some(evaluate(&role, &policies))
                }
                None => None,
            };
            findings.push(PoolFinding {
                pool: pool.clone(),
                kind,
                verdict,
            });
        }
    }
    Ok(findings)
}

/// The overall answer for a binding's pools: `Some(true)` every role may use AWS IoT,
/// `Some(false)` one may not, `None` uncertain; with a message naming roles and actions.
pub fn summarize(findings: &[PoolFinding]) -> (Option<bool>, String) {
    let mut problems = Vec::new();
    let mut uncertain = Vec::new();
    for f in findings {
        match &f.verdict {
            None => problems.push(format!("identity pool {} has no {} role", f.pool, f.kind)),
            Some(v) if !v.missing().is_empty() => {
                problems.push(format!("{} ({} role of {})", v, f.kind, f.pool))
            }
            Some(v) if !v.uncertain().is_empty() => {
                uncertain.push(format!("{} ({} role of {})", v, f.kind, f.pool))
            }
            Some(_) => {}
        }
    }
    if !problems.is_empty() {
        let mut m = problems.join("; ");
        m.push_str(
            ": clients of the pool cannot use AWS IoT with it (in the browser: AMQJS0008I Socket closed); attach a policy such as AWSIoTDataAccess to the role",
        );
        return (Some(false), m);
    }
    if !uncertain.is_empty() {
        return (None, uncertain.join("; "));
    }
    let roles: Vec<String> = findings
        .iter()
        .filter_map(|f| f.verdict.as_ref().map(|v| v.role.clone()))
        .collect();
    (
        Some(true),
        format!("{} may use {}", roles.join(", "), IOT_ACTIONS.join(", ")),
    )
}

fn strings(v: Option<&serde_json::Value>) -> Vec<String> {
    match v {
        Some(serde_json::Value::String(s)) => vec![s.clone()],
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

fn statements(doc: &serde_json::Value) -> Vec<Statement> {
    let list = match doc.get("Statement") {
        Some(serde_json::Value::Array(a)) => a.clone(),
        Some(one @ serde_json::Value::Object(_)) => vec![one.clone()],
        _ => Vec::new(),
    };
    list.iter()
        .map(|s| {
            let not_action = s.get("NotAction").is_some();
            let actions = strings(s.get(if not_action { "NotAction" } else { "Action" }));
            let resources = strings(s.get("Resource"));
            Statement {
                allow: s.get("Effect").and_then(|e| e.as_str()) == Some("Allow"),
                actions,
                not_action,
                // NotResource, or resources other than "*": only some resources.
                all_resources: s.get("NotResource").is_none() && resources.iter().any(|r| r == "*"),
                conditional: s
                    .get("Condition")
                    .is_some_and(|c| c.as_object().is_none_or(|o| !o.is_empty())),
            }
        })
        .collect()
}

/// IAM's action matching: case-insensitive, `*` any run, `?` one character.
fn matches(pattern: &str, action: &str) -> bool {
    fn go(p: &[u8], a: &[u8]) -> bool {
        match (p.first(), a.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], a) || (!a.is_empty() && go(p, &a[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &a[1..]),
            (Some(x), Some(y)) if x.eq_ignore_ascii_case(y) => go(&p[1..], &a[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), action.as_bytes())
}

fn covers(s: &Statement, action: &str) -> bool {
    let any = s.actions.iter().any(|p| matches(p, action));
    if s.not_action { !any } else { any }
}

/// Evaluates the role's policies for each of [`IOT_ACTIONS`].
pub fn evaluate(role: &str, policies: &[RolePolicy]) -> RoleVerdict {
    let all: Vec<Statement> = policies
        .iter()
        .flat_map(|p| statements(&p.document))
        .collect();
    let actions = IOT_ACTIONS
        .iter()
        .map(|action| {
            let relevant: Vec<&Statement> = all.iter().filter(|s| covers(s, action)).collect();
            // An unconditional Deny on every resource wins outright; a narrower one leaves
            // the answer open.
            let deny = relevant.iter().filter(|s| !s.allow);
            let access = if deny.clone().any(|s| !s.conditional && s.all_resources) {
                Access::Denied
            } else {
                let allows: Vec<&&Statement> = relevant.iter().filter(|s| s.allow).collect();
                let full = allows.iter().any(|s| !s.conditional && s.all_resources);
                match (full, allows.is_empty(), deny.count() > 0) {
                    (true, _, false) => Access::Allowed,
                    (_, true, _) => Access::NotAllowed,
                    _ => Access::Uncertain,
                }
            };
            (*action, access)
        })
        .collect();
    RoleVerdict {
        role: role.to_owned(),
        actions,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(doc: serde_json::Value) -> RolePolicy {
        RolePolicy {
            name: "p".into(),
            document: doc,
        }
    }

    fn verdict(docs: Vec<serde_json::Value>) -> Vec<Access> {
        let policies: Vec<RolePolicy> = docs.into_iter().map(policy).collect();
        evaluate("r", &policies)
            .actions
            .into_iter()
            .map(|(_, a)| a)
            .collect()
    }

    #[test]
    fn aws_iot_data_access_allows_everything_a_client_needs() {
        // The statement of the AWS managed policy AWSIoTDataAccess.
        let doc = json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
            "Action": ["iot:Connect", "iot:Publish", "iot:Subscribe", "iot:Receive",
                       "iot:GetThingShadow", "iot:UpdateThingShadow", "iot:DeleteThingShadow",
                       "iot:ListNamedShadowsForThing"], "Resource": "*"}]});
        assert_eq!(verdict(vec![doc]), vec![Access::Allowed; 4]);
    }

    #[test]
    fn nothing_attached_or_other_services_only_is_not_allowed() {
        assert_eq!(verdict(vec![]), vec![Access::NotAllowed; 4]);
        let s3 = json!({"Statement": {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}});
        assert_eq!(verdict(vec![s3]), vec![Access::NotAllowed; 4]);
    }

    #[test]
    fn wildcards_match_like_iam() {
        let doc = json!({"Statement": [{"Effect": "Allow", "Action": ["IOT:Conn*", "iot:?ublish", "iot:Sub*"], "Resource": ["*"]}]});
        assert_eq!(
            verdict(vec![doc]),
            vec![
                Access::Allowed,
                Access::Allowed,
                Access::Allowed,
                Access::NotAllowed
            ]
        );
        let star = json!({"Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]});
        assert_eq!(verdict(vec![star]), vec![Access::Allowed; 4]);
    }

    #[test]
    fn an_explicit_deny_wins_across_policies() {
        let allow = json!({"Statement": [{"Effect": "Allow", "Action": "iot:*", "Resource": "*"}]});
        let deny =
            json!({"Statement": [{"Effect": "Deny", "Action": "iot:Publish", "Resource": "*"}]});
        assert_eq!(
            verdict(vec![allow, deny]),
            vec![
                Access::Allowed,
                Access::Denied,
                Access::Allowed,
                Access::Allowed
            ]
        );
    }

    #[test]
    fn conditions_and_some_resources_make_it_uncertain() {
        let cond = json!({"Statement": [{"Effect": "Allow", "Action": "iot:Connect", "Resource": "*",
            "Condition": {"Bool": {"aws:SecureTransport": "true"}}}]});
        let some = json!({"Statement": [{"Effect": "Allow", "Action": "iot:Publish",
            "Resource": "arn:aws:iot:eu-west-1:123456789012:topic/a"}]});
        let v = verdict(vec![cond, some]);
        assert_eq!(
            v,
            vec![
                Access::Uncertain,
                Access::Uncertain,
                Access::NotAllowed,
                Access::NotAllowed
            ]
        );
        // A Deny on some resources leaves a full Allow uncertain.
        let allow = json!({"Statement": [{"Effect": "Allow", "Action": "iot:*", "Resource": "*"}]});
        let deny = json!({"Statement": [{"Effect": "Deny", "Action": "iot:Receive",
            "Resource": "arn:aws:iot:eu-west-1:123456789012:topic/secret"}]});
        assert_eq!(verdict(vec![allow, deny])[3], Access::Uncertain);
    }

    #[test]
    fn not_action_allows_everything_else() {
        let doc = json!({"Statement": [{"Effect": "Allow", "NotAction": "iot:Receive", "Resource": "*"}]});
        assert_eq!(
            verdict(vec![doc]),
            vec![
                Access::Allowed,
                Access::Allowed,
                Access::Allowed,
                Access::NotAllowed
            ]
        );
    }

    #[test]
    fn the_message_names_the_role_and_what_is_missing() {
        let doc = json!({"Statement": [{"Effect": "Allow", "Action": ["iot:Connect", "iot:Subscribe"], "Resource": "*"}]});
        let v = evaluate("arn:aws:iam::123456789012:role/auth", &[policy(doc)]);
        assert_eq!(
            v.to_string(),
            "role arn:aws:iam::123456789012:role/auth may not use iot:Publish, iot:Receive"
        );
        assert_eq!(v.missing(), vec!["iot:Publish", "iot:Receive"]);
    }
}
