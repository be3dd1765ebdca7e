//! `IotPolicyBinding`: attaches one AWS IoT policy to a set of principals.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{Condition, SpecError, conditions_schema, free_form_object};

/// Longest policy document AWS IoT accepts, counted without whitespace.
pub const MAX_POLICY_DOCUMENT_CHARS: usize = 2048;
/// How many failures `status.failures` lists at most.
pub const MAX_STATUS_FAILURES: usize = 20;

/// Attaches one AWS IoT policy to Cognito identities, whole Cognito identity pools, certificates
/// and thing groups, and optionally manages the policy document itself.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "iot.operator.dev",
    version = "v1alpha1",
    kind = "IotPolicyBinding",
    namespaced,
    shortname = "ipb",
    category = "iot",
    status = "IotPolicyBindingStatus",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Policy","type":"string","jsonPath":".spec.policy.name"}"#,
    printcolumn = r#"{"name":"Desired","type":"integer","jsonPath":".status.desiredTargets"}"#,
    printcolumn = r#"{"name":"Attached","type":"integer","jsonPath":".status.attachedTargets"}"#,
    printcolumn = r#"{"name":"Failed","type":"integer","jsonPath":".status.failedTargets"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("!has(self.deletionPolicy) || self.deletionPolicy != 'DeletePolicy' || has(self.policy.document)").message("deletionPolicy DeletePolicy needs spec.policy.document: only a policy the binding manages is deleted"))]
pub struct IotPolicyBindingSpec {
    /// The AWS IoT policy to attach.
    pub policy: PolicySpec,
    /// The principals that get the policy. At least one entry overall.
    pub principals: Principals,
    /// AWS region of the policy and its targets, e.g. `eu-west-1`. Default: the region of the
    /// operator's AWS configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z]{2}(-[a-z]+)+-[0-9]+$"))]
    pub region: Option<String>,
    /// IAM role to assume (STS AssumeRole) before calling AWS IoT, for a policy in another
    /// account. Default: the operator's own credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(
        pattern = r"^arn:aws[a-z-]*:iam::[0-9]{12}:role/[A-Za-z0-9_+=,.@/-]{1,512}$"
    ))]
    pub role_arn: Option<String>,
    /// What deleting this binding does in AWS: `Detach` (default) detaches every pair this
    /// binding attached; `Retain` leaves them attached; `DeletePolicy` (only with
    /// `policy.document`) detaches them and then deletes the policy with its old versions,
    /// unless another binding or another target still uses it (an Event says which).
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// The policy to attach, and optionally its document.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicySpec {
    /// Name of the AWS IoT policy: 1-128 characters of letters, digits and `_+=,.@-`.
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[A-Za-z0-9_+=,.@-]+$"))]
    pub name: String,
    /// The policy document (an IAM-style JSON policy, written here as YAML or JSON). When set,
    /// the operator creates the policy if it is missing and keeps its default version equal to
    /// this document, pruning old versions. When absent, the policy must already exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_object")]
    pub document: Option<serde_json::Value>,
}

/// The principals that get the policy.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "(has(self.cognitoIdentityIds) ? size(self.cognitoIdentityIds) : 0) + (has(self.certificateArns) ? size(self.certificateArns) : 0) + (has(self.thingGroupArns) ? size(self.thingGroupArns) : 0) + (has(self.cognitoIdentityPools) ? size(self.cognitoIdentityPools) : 0) > 0"
).message("principals must list at least one cognitoIdentityId, certificateArn, thingGroupArn or cognitoIdentityPool"))]
pub struct Principals {
    /// Cognito identity ids (`<region>:<uuid>`, as returned by Cognito GetId). Not identity-pool
    /// ids, which look the same: list pools under `cognitoIdentityPools`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 1000),
        inner(regex(pattern = r"^[a-z]{2}(-[a-z]+)+-[0-9]+:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")),
        extend("x-kubernetes-list-type" = "set")
    )]
    pub cognito_identity_ids: Vec<String>,
    /// X.509 certificate ARNs (`arn:aws:iot:<region>:<account>:cert/<64 hex digits>`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 1000),
        inner(regex(pattern = r"^arn:aws[a-z-]*:iot:[a-z0-9-]+:[0-9]{12}:cert/[0-9a-f]{64}$")),
        extend("x-kubernetes-list-type" = "set")
    )]
    pub certificate_arns: Vec<String>,
    /// Thing-group ARNs (`arn:aws:iot:<region>:<account>:thinggroup/<name>`): every thing in the
    /// group gets the policy through the group.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 100),
        inner(regex(pattern = r"^arn:aws[a-z-]*:iot:[a-z0-9-]+:[0-9]{12}:thinggroup/[a-zA-Z0-9:_-]{1,128}$")),
        extend("x-kubernetes-list-type" = "set")
    )]
    pub thing_group_arns: Vec<String>,
    /// Cognito identity-pool ids (`<region>:<uuid>`). Every identity of each pool gets the
    /// policy; the pool is listed again on every sync, so new identities are picked up without
    /// any backend call.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 10),
        inner(regex(pattern = r"^[a-z]{2}(-[a-z]+)+-[0-9]+:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")),
        extend("x-kubernetes-list-type" = "set")
    )]
    pub cognito_identity_pools: Vec<String>,
}

impl Principals {
    /// Number of entries over all lists.
    pub fn len(&self) -> usize {
        self.cognito_identity_ids.len()
            + self.certificate_arns.len()
            + self.thing_group_arns.len()
            + self.cognito_identity_pools.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What deleting a binding does in AWS.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum DeletionPolicy {
    /// Detach every pair this binding attached (pairs another binding still wants stay).
    #[default]
    Detach,
    /// Leave every attachment in place.
    Retain,
    /// Detach, then delete the managed policy if nothing else uses it.
    DeletePolicy,
}

/// Observed state of an IotPolicyBinding.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IotPolicyBindingStatus {
    /// The `metadata.generation` the status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` is `True` when every desired target has the policy. Reasons when not:
    /// `InvalidSpec`, `PolicyNotFound`, `PolicyConflict`, `PartiallyAttached`, `Throttled`,
    /// `AccessDenied`, `AwsError`, `RecordFailed`. With identity pools, `RoleAllowsIot` says
    /// whether the pools' Cognito roles may use AWS IoT (iot:Connect, Publish, Subscribe,
    /// Receive): `False` names the role and the missing actions, `Unknown` means conditions or
    /// resource limits make it uncertain, or the roles could not be read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// ARN of the policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_arn: Option<String>,
    /// Default version of the policy, when the operator manages the document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_version_id: Option<String>,
    /// Targets the spec asks for (identity pools expanded to their identities).
    #[serde(default)]
    pub desired_targets: i64,
    /// Desired targets that have the policy attached.
    #[serde(default)]
    pub attached_targets: i64,
    /// Desired targets that AWS refused.
    #[serde(default)]
    pub failed_targets: i64,
    /// Up to 20 targets that failed, with the reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub failures: Vec<TargetFailure>,
    /// When the binding was last synchronised with AWS (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_time: Option<String>,
    /// While a sync runs: how far it has got, written every 10 seconds at most (a first sync
    /// of a large pool takes hours at AWS's rates). Removed when the sync ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<SyncProgressStatus>,
    /// What the binding answers for in AWS: the size of its record and where it is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<RecordStatus>,
    /// Deprecated: explicit targets applied, as earlier versions kept them. Read once, then
    /// moved to the record.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub applied_targets: Vec<String>,
    /// Deprecated: identity pools applied, as earlier versions kept them. Read once, then moved
    /// to the record.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub applied_pools: Vec<String>,
    /// Deprecated: targets that had the policy before the binding wanted them, as earlier
    /// versions kept them. Read once, then moved to the record.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub foreign_targets: Vec<String>,
}

/// The binding's record: what it applied (detached when it leaves the spec) and what it found
/// attached (never detached). Kept in ConfigMaps of the operator's namespace, written before
/// anything is attached, so that no attachment is ever untracked.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecordStatus {
    /// The ConfigMap that holds the record (`<namespace>/<name>`); a large record continues in
    /// ConfigMaps named after it.
    pub config_map: String,
    /// Explicit targets (identity ids and ARNs) the binding applied.
    pub targets: i64,
    /// Cognito identity pools the binding applied.
    pub pools: i64,
    /// Targets that had the policy before the binding wanted them; never detached by it.
    pub foreign_targets: i64,
}

/// A target that AWS refused.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetFailure {
    /// The target (identity id or ARN).
    pub target: String,
    /// Machine-readable reason, e.g. `NotFound`, `LimitExceeded`, `InvalidRequest`, `AccessDenied`.
    pub reason: String,
    /// What AWS said.
    pub message: String,
}

fn is_region(s: &str) -> bool {
    // <2 letters>(-<letters>)+-<digits>, e.g. eu-west-1, us-gov-west-1
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() >= 3
        && parts[0].len() == 2
        && parts[0].bytes().all(|b| b.is_ascii_lowercase())
        && parts[1..parts.len() - 1]
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase()))
        && parts
            .last()
            .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

/// Whether `s` has the shape `<region>:<uuid>` of a Cognito identity or identity-pool id.
pub fn is_cognito_id(s: &str) -> bool {
    s.split_once(':')
        .is_some_and(|(region, uuid)| is_region(region) && is_uuid(uuid))
}

/// Whether `s` is a valid AWS IoT policy name.
pub fn is_policy_name(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || "+=,.@-".contains(c))
}

/// Splits an AWS IoT ARN into (region, account, resource) when it has the expected shape.
fn parse_iot_arn(arn: &str) -> Option<(&str, &str, &str)> {
    let mut parts = arn.splitn(6, ':');
    let (arn_lit, partition, service) = (parts.next()?, parts.next()?, parts.next()?);
    let (region, account, resource) = (parts.next()?, parts.next()?, parts.next()?);
    let ok = arn_lit == "arn"
        && partition.starts_with("aws")
        && service == "iot"
        && is_region(region)
        && account.len() == 12
        && account.bytes().all(|b| b.is_ascii_digit());
    ok.then_some((region, account, resource))
}

/// The region an IoT ARN names, if it is one.
pub fn arn_region(arn: &str) -> Option<&str> {
    parse_iot_arn(arn).map(|(region, _, _)| region)
}

/// Counts the characters of a policy document the way AWS's 2048-character limit does:
/// whitespace excluded.
pub fn policy_document_chars(doc: &serde_json::Value) -> usize {
    serde_json::to_string(doc)
        .map(|s| s.chars().filter(|c| !c.is_whitespace()).count())
        .unwrap_or(usize::MAX)
}

impl IotPolicyBindingSpec {
    /// Checks what the CRD schema cannot (or what must also hold without Kubernetes, for
    /// `iot-operator attach`). Returns the first problem, naming the field.
    pub fn validate(&self) -> Result<(), SpecError> {
        if !is_policy_name(&self.policy.name) {
            return Err(SpecError::new(
                "spec.policy.name",
                "must be 1-128 characters of letters, digits and _+=,.@-",
            ));
        }
        if let Some(doc) = &self.policy.document {
            validate_policy_document(doc)?;
        } else if self.deletion_policy == DeletionPolicy::DeletePolicy {
            return Err(SpecError::new(
                "spec.deletionPolicy",
                "DeletePolicy needs spec.policy.document: only a policy the binding manages is deleted",
            ));
        }
        if let Some(region) = &self.region
            && !is_region(region)
        {
            return Err(SpecError::new(
                "spec.region",
                format!("'{region}' is not an AWS region name such as eu-west-1"),
            ));
        }
        if let Some(role) = &self.role_arn {
            let ok =
                role.starts_with("arn:aws") && role.contains(":iam::") && role.contains(":role/");
            if !ok {
                return Err(SpecError::new(
                    "spec.roleArn",
                    format!("'{role}' is not an IAM role ARN (arn:aws:iam::<account>:role/<name>)"),
                ));
            }
        }
        let p = &self.principals;
        if p.is_empty() {
            return Err(SpecError::new(
                "spec.principals",
                "must list at least one cognitoIdentityId, certificateArn, thingGroupArn or cognitoIdentityPool",
            ));
        }
        for (i, id) in p.cognito_identity_ids.iter().enumerate() {
            if !is_cognito_id(id) {
                return Err(SpecError::new(
                    format!("spec.principals.cognitoIdentityIds[{i}]"),
                    format!("'{id}' is not a Cognito identity id (<region>:<uuid>)"),
                ));
            }
        }
        for (i, id) in p.cognito_identity_pools.iter().enumerate() {
            if !is_cognito_id(id) {
                return Err(SpecError::new(
                    format!("spec.principals.cognitoIdentityPools[{i}]"),
                    format!("'{id}' is not a Cognito identity-pool id (<region>:<uuid>)"),
                ));
            }
        }
        let arn_lists = [
            ("certificateArns", &p.certificate_arns, "cert/"),
            ("thingGroupArns", &p.thing_group_arns, "thinggroup/"),
        ];
        for (field, list, prefix) in arn_lists {
            for (i, arn) in list.iter().enumerate() {
                let field = format!("spec.principals.{field}[{i}]");
                match parse_iot_arn(arn) {
                    Some((_, _, resource))
                        if resource.starts_with(prefix) && resource.len() > prefix.len() => {}
                    _ => {
                        return Err(SpecError::new(
                            field,
                            format!(
                                "'{arn}' is not an AWS IoT {} ARN",
                                prefix.trim_end_matches('/')
                            ),
                        ));
                    }
                }
                if let (Some(region), Some(arn_region)) = (&self.region, arn_region(arn))
                    && region != arn_region
                {
                    return Err(SpecError::new(
                        field,
                        format!(
                            "the ARN is in region {arn_region} but spec.region is {region}: a binding works in one region"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

impl IotPolicyBindingSpec {
    /// Explicit targets in one list: identity ids, certificate ARNs, thing-group ARNs.
    pub fn explicit_targets(&self) -> Vec<String> {
        let p = &self.principals;
        p.cognito_identity_ids
            .iter()
            .chain(&p.certificate_arns)
            .chain(&p.thing_group_arns)
            .cloned()
            .collect()
    }
}

/// Checks the shape and size of a policy document.
pub fn validate_policy_document(doc: &serde_json::Value) -> Result<(), SpecError> {
    const FIELD: &str = "spec.policy.document";
    let Some(obj) = doc.as_object() else {
        return Err(SpecError::new(FIELD, "must be an object"));
    };
    match obj.get("Statement") {
        Some(serde_json::Value::Array(a)) if !a.is_empty() => {}
        Some(serde_json::Value::Object(_)) => {}
        _ => {
            return Err(SpecError::new(
                FIELD,
                "must have a non-empty 'Statement' (an object or a list of objects)",
            ));
        }
    }
    let chars = policy_document_chars(doc);
    if chars > MAX_POLICY_DOCUMENT_CHARS {
        return Err(SpecError::new(
            FIELD,
            format!(
                "is {chars} characters without whitespace; AWS IoT allows at most {MAX_POLICY_DOCUMENT_CHARS}"
            ),
        ));
    }
    Ok(())
}

/// How far a running sync has got.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SyncProgressStatus {
    /// Identities listed so far from the pools, then every desired target.
    pub seen: i64,
    /// Desired targets that have the policy.
    pub attached: i64,
    /// Desired targets this sync has yet to attach.
    pub remaining: i64,
    /// When this was written (RFC 3339).
    pub updated: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "eu-west-1:0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";

    fn spec() -> IotPolicyBindingSpec {
        IotPolicyBindingSpec {
            policy: PolicySpec {
                name: "myIoTPolicy".into(),
                document: None,
            },
            principals: Principals {
                cognito_identity_ids: vec![ID.into()],
                ..Default::default()
            },
            region: Some("eu-west-1".into()),
            role_arn: None,
            deletion_policy: DeletionPolicy::Detach,
        }
    }

    #[test]
    fn accepts_a_valid_spec() {
        assert_eq!(spec().validate(), Ok(()));
    }

    #[test]
    fn cognito_id_shape() {
        assert!(is_cognito_id(ID));
        assert!(is_cognito_id(
            "us-gov-west-1:0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
        ));
        assert!(!is_cognito_id(
            "eu-west-1:0F1E2D3C-4b5a-6978-8796-a5b4c3d2e1f0"
        ));
        assert!(!is_cognito_id("eu-west-1"));
        assert!(!is_cognito_id(
            "euwest1:0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
        ));
    }

    #[test]
    fn names_the_bad_field() {
        let mut s = spec();
        s.principals.cognito_identity_ids.push("nope".into());
        let err = s.validate().unwrap_err();
        assert_eq!(err.field, "spec.principals.cognitoIdentityIds[1]");

        let mut s = spec();
        s.principals = Principals::default();
        assert_eq!(s.validate().unwrap_err().field, "spec.principals");

        let mut s = spec();
        s.principals.certificate_arns = vec![format!(
            "arn:aws:iot:us-east-1:123456789012:cert/{}",
            "a".repeat(64)
        )];
        let err = s.validate().unwrap_err();
        assert_eq!(err.field, "spec.principals.certificateArns[0]");
        assert!(err.message.contains("us-east-1"), "{err}");

        let mut s = spec();
        s.principals.thing_group_arns = vec!["arn:aws:iot:eu-west-1:123456789012:thing/x".into()];
        assert_eq!(
            s.validate().unwrap_err().field,
            "spec.principals.thingGroupArns[0]"
        );
    }

    #[test]
    fn policy_document_limits() {
        let mut s = spec();
        s.policy.document = Some(serde_json::json!({"Version": "2012-10-17"}));
        assert_eq!(s.validate().unwrap_err().field, "spec.policy.document");
        let big = "x".repeat(3000);
        s.policy.document = Some(serde_json::json!({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "iot:Connect", "Resource": big}]
        }));
        assert!(s.validate().unwrap_err().message.contains("2048"));
        s.policy.document = Some(serde_json::json!({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"}]
        }));
        assert_eq!(s.validate(), Ok(()));
    }

    #[test]
    fn policy_names() {
        assert!(is_policy_name("my_IoT.policy@v1+x=y,z-w"));
        assert!(!is_policy_name(""));
        assert!(!is_policy_name("has space"));
        assert!(!is_policy_name(&"a".repeat(129)));
    }
}
