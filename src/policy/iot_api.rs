//! What the engine needs from AWS, as a trait over plain types. `crate::aws::iot` implements it
//! with the AWS SDK; tests wrap that implementation to inject faults.

use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;

/// The class of an AWS error, as far as the engine cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AwsErrorKind {
    /// `ResourceNotFoundException`.
    NotFound,
    /// `ResourceAlreadyExistsException`.
    AlreadyExists,
    /// `LimitExceededException`, `VersionsLimitExceededException`.
    LimitExceeded,
    /// `InvalidRequestException`, `MalformedPolicyException`.
    InvalidRequest,
    /// `UnauthorizedException`, `AccessDeniedException`, `NotAuthorizedException`.
    AccessDenied,
    /// `ThrottlingException`, `TooManyRequestsException`.
    Throttled,
    /// `DeleteConflictException`, `ConflictingResourceUpdateException`.
    Conflict,
    /// 5xx: `ServiceUnavailableException`, `InternalFailureException`.
    Unavailable,
    /// The request did not reach AWS or the answer could not be read.
    Transport,
    /// Anything else.
    Other,
}

impl AwsErrorKind {
    /// Worth retrying with backoff.
    pub fn is_transient(self) -> bool {
        matches!(self, Self::Throttled | Self::Unavailable | Self::Transport)
    }

    /// The Ready condition's reason for a sync that failed with this kind: the kinds a user
    /// acts on are named, the rest are `AwsError` (the message says more).
    pub fn condition_reason(self) -> &'static str {
        match self {
            Self::AccessDenied | Self::Throttled => self.reason(),
            _ => "AwsError",
        }
    }

    /// CamelCase reason for status and metrics.
    pub fn reason(self) -> &'static str {
        match self {
            Self::NotFound => "NotFound",
            Self::AlreadyExists => "AlreadyExists",
            Self::LimitExceeded => "LimitExceeded",
            Self::InvalidRequest => "InvalidRequest",
            Self::AccessDenied => "AccessDenied",
            Self::Throttled => "Throttled",
            Self::Conflict => "Conflict",
            Self::Unavailable => "ServiceUnavailable",
            Self::Transport => "TransportError",
            Self::Other => "AwsError",
        }
    }
}

/// An error from one AWS call. `message` is what AWS said; it never holds credentials.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct AwsError {
    pub kind: AwsErrorKind,
    /// The API operation, e.g. `AttachPolicy`.
    pub operation: &'static str,
    /// The IAM action the operation needs, e.g. `iot:AttachPolicy`.
    pub action: &'static str,
    pub message: String,
}

impl fmt::Display for AwsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            AwsErrorKind::AccessDenied => write!(
                f,
                "{} was denied: the operator's IAM identity needs {} ({})",
                self.operation, self.action, self.message
            ),
            _ => write!(
                f,
                "{} failed ({}): {}",
                self.operation,
                self.kind.reason(),
                self.message
            ),
        }
    }
}

impl AwsError {
    pub fn new(
        kind: AwsErrorKind,
        operation: &'static str,
        action: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            kind,
            operation,
            action,
            message: message.into(),
        }
    }
}

/// A policy as AWS IoT reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyInfo {
    pub arn: String,
    pub default_version_id: String,
    /// The default version's document as AWS returns it.
    pub document: String,
}

/// One version of a policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyVersion {
    pub version_id: String,
    pub is_default: bool,
    /// Creation time in seconds since the epoch (ordering only).
    pub created: i64,
}

/// A set read page by page, with the number of pages it took.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    pub items: BTreeSet<String>,
    pub pages: u32,
}

/// The AWS IoT and Cognito calls the engine makes. One implementation talks to one account and
/// region.
pub trait IotApi: Send + Sync {
    /// `GetPolicy`; `Ok(None)` when the policy does not exist.
    fn get_policy(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<PolicyInfo>, AwsError>> + Send;
    /// `ListPolicyVersions`.
    fn list_policy_versions(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Vec<PolicyVersion>, AwsError>> + Send;
    /// `CreatePolicy`; returns (arn, version id).
    fn create_policy(
        &self,
        name: &str,
        document: &str,
    ) -> impl Future<Output = Result<(String, String), AwsError>> + Send;
    /// `CreatePolicyVersion` as the new default; returns the version id.
    fn create_policy_version(
        &self,
        name: &str,
        document: &str,
    ) -> impl Future<Output = Result<String, AwsError>> + Send;
    /// `DeletePolicyVersion`.
    fn delete_policy_version(
        &self,
        name: &str,
        version_id: &str,
    ) -> impl Future<Output = Result<(), AwsError>> + Send;
    /// `DeletePolicy` (every non-default version must be gone, and every target detached).
    fn delete_policy(&self, name: &str) -> impl Future<Output = Result<(), AwsError>> + Send;
    /// `ListTargetsForPolicy` (or `ListPolicyPrincipals` in legacy mode), every page.
    fn list_targets(&self, policy: &str) -> impl Future<Output = Result<Listing, AwsError>> + Send;
    /// `AttachPolicy` (or `AttachPrincipalPolicy` in legacy mode).
    fn attach(
        &self,
        policy: &str,
        target: &str,
    ) -> impl Future<Output = Result<(), AwsError>> + Send;
    /// `DetachPolicy` (or `DetachPrincipalPolicy` in legacy mode).
    fn detach(
        &self,
        policy: &str,
        target: &str,
    ) -> impl Future<Output = Result<(), AwsError>> + Send;
    /// Cognito `ListIdentities`, every page; `on_page` hears how many identities each page
    /// held, as it arrives (a million-identity pool takes many minutes to list).
    fn list_identities(
        &self,
        pool_id: &str,
        on_page: &(dyn Fn(usize) + Sync),
    ) -> impl Future<Output = Result<Listing, AwsError>> + Send;
}

macro_rules! forward_iot_api {
    ($($ty:ty),*) => {$(
        impl<T: IotApi + ?Sized> IotApi for $ty {
            fn get_policy(&self, name: &str) -> impl Future<Output = Result<Option<PolicyInfo>, AwsError>> + Send {
                (**self).get_policy(name)
            }
            fn list_policy_versions(&self, name: &str) -> impl Future<Output = Result<Vec<PolicyVersion>, AwsError>> + Send {
                (**self).list_policy_versions(name)
            }
            fn create_policy(&self, name: &str, document: &str) -> impl Future<Output = Result<(String, String), AwsError>> + Send {
                (**self).create_policy(name, document)
            }
            fn create_policy_version(&self, name: &str, document: &str) -> impl Future<Output = Result<String, AwsError>> + Send {
                (**self).create_policy_version(name, document)
            }
            fn delete_policy_version(&self, name: &str, version_id: &str) -> impl Future<Output = Result<(), AwsError>> + Send {
                (**self).delete_policy_version(name, version_id)
            }
            fn delete_policy(&self, name: &str) -> impl Future<Output = Result<(), AwsError>> + Send {
                (**self).delete_policy(name)
            }
            fn list_targets(&self, policy: &str) -> impl Future<Output = Result<Listing, AwsError>> + Send {
                (**self).list_targets(policy)
            }
            fn attach(&self, policy: &str, target: &str) -> impl Future<Output = Result<(), AwsError>> + Send {
                (**self).attach(policy, target)
            }
            fn detach(&self, policy: &str, target: &str) -> impl Future<Output = Result<(), AwsError>> + Send {
                (**self).detach(policy, target)
            }
            fn list_identities(&self, pool_id: &str, on_page: &(dyn Fn(usize) + Sync)) -> impl Future<Output = Result<Listing, AwsError>> + Send {
                (**self).list_identities(pool_id, on_page)
            }
        }
    )*};
}

forward_iot_api!(&T, std::sync::Arc<T>);
