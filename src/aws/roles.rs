//! The Cognito and IAM reads of the pool roles check ([`RoleSource`]), with the SDK. Read only.

use aws_sdk_cognitoidentity::Client as Cognito;
use aws_sdk_iam::Client as Iam;

use super::iot::classify;
use crate::policy::AwsError;
use crate::policy::iam::{PoolRoles, RolePolicy, RoleSource};

/// Cognito Identity and IAM clients of one account.
pub struct SdkRoles {
    cognito: Cognito,
    iam: Iam,
}

impl SdkRoles {
    pub fn new(cognito: Cognito, iam: Iam) -> Self {
        Self { cognito, iam }
    }
}

/// IAM returns policy documents URL-encoded (RFC 3986); reads either form.
fn document(text: &str) -> serde_json::Value {
    if let Ok(v) = serde_json::from_str(text) {
        return v;
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    serde_json::from_slice(&out).unwrap_or(serde_json::Value::Null)
}

/// The role name of a role ARN (`arn:aws:iam::<account>:role/<path>/<name>`).
fn role_name(arn: &str) -> &str {
    arn.rsplit('/').next().unwrap_or(arn)
}

impl RoleSource for SdkRoles {
    async fn pool_roles(&self, pool: &str) -> Result<PoolRoles, AwsError> {
        const OP: &str = "GetIdentityPoolRoles";
        let roles = self
            .cognito
            .get_identity_pool_roles()
            .identity_pool_id(pool)
            .send()
            .await
            .map_err(|e| classify(OP, "cognito-identity:GetIdentityPoolRoles", e))?;
        let map = roles.roles().cloned().unwrap_or_default();
        let pool_info = self
            .cognito
            .describe_identity_pool()
            .identity_pool_id(pool)
            .send()
            .await
            .map_err(|e| {
                classify(
                    "DescribeIdentityPool",
                    "cognito-identity:DescribeIdentityPool",
                    e,
                )
            })?;
        Ok(PoolRoles {
            authenticated: map.get("authenticated").cloned(),
            unauthenticated: map.get("unauthenticated").cloned(),
            allows_guests: pool_info.allow_unauthenticated_identities(),
        })
    }

    async fn role_policies(&self, role_arn: &str) -> Result<Vec<RolePolicy>, AwsError> {
        let role = role_name(role_arn);
        let mut out = Vec::new();
        let mut marker = None;
        loop {
            let page = self
                .iam
                .list_attached_role_policies()
                .role_name(role)
                .set_marker(marker.take())
                .send()
                .await
                .map_err(|e| {
                    classify(
                        "ListAttachedRolePolicies",
                        "iam:ListAttachedRolePolicies",
                        e,
                    )
                })?;
            for p in page.attached_policies() {
                let Some(arn) = p.policy_arn() else { continue };
                let policy = self
                    .iam
                    .get_policy()
                    .policy_arn(arn)
                    .send()
                    .await
                    .map_err(|e| classify("GetPolicy", "iam:GetPolicy", e))?;
                let Some(version) = policy.policy().and_then(|p| p.default_version_id()) else {
                    continue;
                };
                let v = self
                    .iam
                    .get_policy_version()
                    .policy_arn(arn)
                    .version_id(version)
                    .send()
                    .await
                    .map_err(|e| classify("GetPolicyVersion", "iam:GetPolicyVersion", e))?;
                if let Some(doc) = v.policy_version().and_then(|v| v.document()) {
                    out.push(RolePolicy {
                        name: arn.to_owned(),
                        document: document(doc),
                    });
                }
            }
            match page.marker() {
                Some(m) if page.is_truncated() => marker = Some(m.to_owned()),
                _ => break,
            }
        }
        let mut marker = None;
        loop {
            let page = self
                .iam
                .list_role_policies()
                .role_name(role)
                .set_marker(marker.take())
                .send()
                .await
                .map_err(|e| classify("ListRolePolicies", "iam:ListRolePolicies", e))?;
            for name in page.policy_names() {
                let p = self
                    .iam
                    .get_role_policy()
                    .role_name(role)
                    .policy_name(name)
                    .send()
                    .await
                    .map_err(|e| classify("GetRolePolicy", "iam:GetRolePolicy", e))?;
                out.push(RolePolicy {
                    name: name.clone(),
                    document: document(p.policy_document()),
                });
            }
            match page.marker() {
                Some(m) if page.is_truncated() => marker = Some(m.to_owned()),
                _ => break,
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_read_encoded_or_not_and_role_names_without_path() {
        let plain = r#"{"Statement":[{"Effect":"Allow","Action":"iot:*","Resource":"*"}]}"#;
        let encoded = "%7B%22Statement%22%3A%5B%7B%22Effect%22%3A%22Allow%22%2C%22Action%22%3A%22iot%3A%2A%22%2C%22Resource%22%3A%22%2A%22%7D%5D%7D";
        assert_eq!(document(plain), document(encoded));
        assert_eq!(document(encoded)["Statement"][0]["Action"], "iot:*");
        assert_eq!(
            role_name("arn:aws:iam::123456789012:role/cognito/app_auth"),
            "app_auth"
        );
    }
}
