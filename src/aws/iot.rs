//! [`IotApi`] over the AWS SDK: AWS IoT for policies and attachments, Cognito Identity for pool
//! listings. Every call is rate-limited and timed; the SDK retries throttling and 5xx answers
//! (see [`super::retry`]).

use std::sync::Arc;
use std::time::Instant;

use aws_sdk_iot::error::ProvideErrorMetadata;
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;

use crate::policy::iot_api::{AwsError, AwsErrorKind, IotApi, Listing, PolicyInfo, PolicyVersion};
use crate::ratelimit::RateLimiter;
use crate::telemetry::Metrics;
use crate::telemetry::metrics::AwsOperationLabels;

/// Page size for ListTargetsForPolicy / ListPolicyPrincipals (the API's maximum).
const TARGETS_PAGE: i32 = 250;
/// Page size for Cognito ListIdentities (the API's maximum).
const IDENTITIES_PAGE: i32 = 60;

/// Maps an SDK error to the engine's error classes.
pub fn classify<E>(
    operation: &'static str,
    action: &'static str,
    err: SdkError<E, HttpResponse>,
) -> AwsError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let status = match &err {
        SdkError::ServiceError(se) => Some(se.raw().status().as_u16()),
        SdkError::ResponseError(re) => Some(re.raw().status().as_u16()),
        _ => None,
    };
    let kind = match &err {
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => AwsErrorKind::Transport,
        _ => kind_from(err.code(), status),
    };
    let mut message = err
        .message()
        .map(str::to_owned)
        .unwrap_or_else(|| crate::error::chain(&err));
    if let Some(hint) = hint(err.code(), status) {
        message = format!("{message} ({hint})");
    }
    AwsError::new(kind, operation, action, message)
}

/// What to check, for the answers whose text alone does not say it.
fn hint(code: Option<&str>, status: Option<u16>) -> Option<&'static str> {
    match (code, status) {
        (
            Some(
                "InvalidSignatureException"
                | "SignatureDoesNotMatch"
                | "UnrecognizedClientException"
                | "InvalidClientTokenId"
                | "IncompleteSignature",
            ),
            _,
        ) => Some(
            "the request signature was refused: check the access key and secret, the region and \
             the machine's clock",
        ),
        (Some("ExpiredTokenException"), _) => {
            Some("the session token has expired: refresh the credentials")
        }
        (None, Some(404)) => Some(
            "HTTP 404 without an AWS error code: this does not look like an AWS IoT endpoint; \
             check the region and --aws-endpoint-url",
        ),
        (None, Some(401 | 403)) => Some(
            "refused without an AWS error code: check the credentials, the region, the \
             machine's clock and --aws-endpoint-url",
        ),
        _ => None,
    }
}

/// Error class from an AWS error code and HTTP status. The codes that mean something to the
/// engine (not found, already exists, a quota, ...) come first; throttling and transient codes
/// are the SDK's own lists (`aws_runtime::retries::classifiers`), which its retries also use.
pub fn kind_from(code: Option<&str>, status: Option<u16>) -> AwsErrorKind {
    use aws_runtime::retries::classifiers::{THROTTLING_ERRORS, TRANSIENT_ERRORS};
    match code {
        Some("ResourceNotFoundException") => AwsErrorKind::NotFound,
        Some("ResourceAlreadyExistsException") => AwsErrorKind::AlreadyExists,
        // AWS IoT's quotas (10 policies per target, 5 versions per policy), though the SDK's
        // list counts LimitExceededException as throttling.
        Some("LimitExceededException" | "VersionsLimitExceededException") => {
            AwsErrorKind::LimitExceeded
        }
        Some(
            "InvalidRequestException" | "MalformedPolicyException" | "InvalidParameterException",
        ) => AwsErrorKind::InvalidRequest,
        Some(
            "UnauthorizedException"
            | "AccessDeniedException"
            | "NotAuthorizedException"
            | "UnrecognizedClientException"
            | "InvalidClientTokenId"
            | "ExpiredTokenException",
        ) => AwsErrorKind::AccessDenied,
        Some("DeleteConflictException" | "ConflictingResourceUpdateException") => {
            AwsErrorKind::Conflict
        }
        Some(c) if THROTTLING_ERRORS.contains(&c) => AwsErrorKind::Throttled,
        Some(c)
            if TRANSIENT_ERRORS.contains(&c)
                || matches!(
                    c,
                    "ServiceUnavailableException"
                        | "InternalFailureException"
                        | "InternalErrorException"
                ) =>
        {
            AwsErrorKind::Unavailable
        }
        _ => match status {
            Some(429) => AwsErrorKind::Throttled,
            Some(s) if s >= 500 => AwsErrorKind::Unavailable,
            // A 404 without an AWS error code is not AWS saying "no such resource" (a wrong
            // endpoint, say): it must not read as a missing policy.
            Some(401 | 403) => AwsErrorKind::AccessDenied,
            _ => AwsErrorKind::Other,
        },
    }
}

/// AWS IoT and Cognito Identity for one account and region.
pub struct SdkIot {
    iot: aws_sdk_iot::Client,
    cognito: aws_sdk_cognitoidentity::Client,
    limiter: Arc<RateLimiter>,
    /// Limits of single operations, taken after the overall one.
    api_limits: std::collections::HashMap<String, Arc<RateLimiter>>,
    legacy: bool,
    metrics: Option<Arc<Metrics>>,
}

impl SdkIot {
    /// `legacy` selects the deprecated principal-policy calls (AttachPrincipalPolicy family) for
    /// identities and certificates; thing groups always use AttachPolicy.
    pub fn new(
        iot: aws_sdk_iot::Client,
        cognito: aws_sdk_cognitoidentity::Client,
        limiter: Arc<RateLimiter>,
        legacy: bool,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        Self {
            iot,
            cognito,
            limiter,
            api_limits: Default::default(),
            legacy,
            metrics,
        }
    }

    /// Also limits single operations (by name, e.g. `ListIdentities`).
    pub fn with_api_limits(
        mut self,
        limits: std::collections::HashMap<String, Arc<RateLimiter>>,
    ) -> Self {
        self.api_limits = limits;
        self
    }

    pub fn iot_client(&self) -> &aws_sdk_iot::Client {
        &self.iot
    }

    /// Runs one AWS call: rate-limited, timed for the metrics. The SDK retries inside it (see
    /// [`super::retry`]), and its [`CallMeter`](super::retry::CallMeter) counts each attempt.
    async fn call<T, F, Fut>(&self, operation: &'static str, f: F) -> Result<T, AwsError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, AwsError>>,
    {
        let start = Instant::now();
        // The operation's own limit last, so that AWS sees this operation's calls spaced by it
        // exactly (the overall wait before it would otherwise bunch them).
        self.limiter.acquire().await;
        if let Some(l) = self.api_limits.get(operation) {
            l.acquire().await;
        }
        let result = f().await;
        if let Some(m) = &self.metrics {
            m.aws_call_duration
                .get_or_create(&AwsOperationLabels {
                    operation: operation.to_owned(),
                })
                .observe(start.elapsed().as_secs_f64());
        }
        result
    }

    fn uses_legacy(&self, target: &str) -> bool {
        self.legacy && !target.contains(":thinggroup/")
    }

    /// `DescribeEndpoint` for `iot:Data-ATS`: the MQTT endpoint host of the account.
    pub async fn describe_endpoint(&self) -> Result<String, AwsError> {
        const OP: &str = "DescribeEndpoint";
        self.call(OP, || async {
            let out = self
                .iot
                .describe_endpoint()
                .endpoint_type("iot:Data-ATS")
                .send()
                .await
                .map_err(|e| classify(OP, "iot:DescribeEndpoint", e))?;
            out.endpoint_address().map(str::to_owned).ok_or_else(|| {
                AwsError::new(
                    AwsErrorKind::Other,
                    OP,
                    "iot:DescribeEndpoint",
                    "no endpoint address returned",
                )
            })
        })
        .await
    }
}

impl IotApi for SdkIot {
    async fn get_policy(&self, name: &str) -> Result<Option<PolicyInfo>, AwsError> {
        const OP: &str = "GetPolicy";
        let result = self
            .call(OP, || async {
                let out = self
                    .iot
                    .get_policy()
                    .policy_name(name)
                    .send()
                    .await
                    .map_err(|e| classify(OP, "iot:GetPolicy", e))?;
                Ok(PolicyInfo {
                    arn: out.policy_arn().unwrap_or_default().to_owned(),
                    default_version_id: out.default_version_id().unwrap_or_default().to_owned(),
                    document: out.policy_document().unwrap_or_default().to_owned(),
                })
            })
            .await;
        match result {
            Ok(info) => Ok(Some(info)),
            Err(e) if e.kind == AwsErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn list_policy_versions(&self, name: &str) -> Result<Vec<PolicyVersion>, AwsError> {
        const OP: &str = "ListPolicyVersions";
        self.call(OP, || async {
            let out = self
                .iot
                .list_policy_versions()
                .policy_name(name)
                .send()
                .await
                .map_err(|e| classify(OP, "iot:ListPolicyVersions", e))?;
            Ok(out
                .policy_versions()
                .iter()
                .map(|v| PolicyVersion {
                    version_id: v.version_id().unwrap_or_default().to_owned(),
                    is_default: v.is_default_version(),
                    created: v.create_date().map_or(0, |d| d.secs()),
                })
                .collect())
        })
        .await
    }

    async fn create_policy(
        &self,
        name: &str,
        document: &str,
    ) -> Result<(String, String), AwsError> {
        const OP: &str = "CreatePolicy";
        self.call(OP, || async {
            let out = self
                .iot
                .create_policy()
                .policy_name(name)
                .policy_document(document)
                .send()
                .await
                .map_err(|e| classify(OP, "iot:CreatePolicy", e))?;
            Ok((
                out.policy_arn().unwrap_or_default().to_owned(),
                out.policy_version_id().unwrap_or_default().to_owned(),
            ))
        })
        .await
    }

    async fn create_policy_version(&self, name: &str, document: &str) -> Result<String, AwsError> {
        const OP: &str = "CreatePolicyVersion";
        self.call(OP, || async {
            let out = self
                .iot
                .create_policy_version()
                .policy_name(name)
                .policy_document(document)
                .set_as_default(true)
                .send()
                .await
                .map_err(|e| classify(OP, "iot:CreatePolicyVersion", e))?;
            Ok(out.policy_version_id().unwrap_or_default().to_owned())
        })
        .await
    }

    async fn delete_policy_version(&self, name: &str, version_id: &str) -> Result<(), AwsError> {
        const OP: &str = "DeletePolicyVersion";
        self.call(OP, || async {
            self.iot
                .delete_policy_version()
                .policy_name(name)
                .policy_version_id(version_id)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| classify(OP, "iot:DeletePolicyVersion", e))
        })
        .await
    }

    async fn delete_policy(&self, name: &str) -> Result<(), AwsError> {
        const OP: &str = "DeletePolicy";
        self.call(OP, || async {
            self.iot
                .delete_policy()
                .policy_name(name)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| classify(OP, "iot:DeletePolicy", e))
        })
        .await
    }

    async fn list_targets(&self, policy: &str) -> Result<Listing, AwsError> {
        if !self.legacy {
            return self.targets_for_policy(policy).await;
        }
        // The principal-policy family does not list thing groups; they use AttachPolicy.
        let mut listing = self.policy_principals(policy).await?;
        let groups = self.targets_for_policy(policy).await?;
        listing.pages += groups.pages;
        listing.items.extend(
            groups
                .items
                .into_iter()
                .filter(|t| t.contains(":thinggroup/")),
        );
        Ok(listing)
    }

    async fn attach(&self, policy: &str, target: &str) -> Result<(), AwsError> {
        if self.uses_legacy(target) {
            const OP: &str = "AttachPrincipalPolicy";
            self.call(OP, || async {
                #[allow(deprecated)]
                self.iot
                    .attach_principal_policy()
                    .policy_name(policy)
                    .principal(target)
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| classify(OP, "iot:AttachPrincipalPolicy", e))
            })
            .await
        } else {
            const OP: &str = "AttachPolicy";
            self.call(OP, || async {
                self.iot
                    .attach_policy()
                    .policy_name(policy)
                    .target(target)
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| classify(OP, "iot:AttachPolicy", e))
            })
            .await
        }
    }

    async fn detach(&self, policy: &str, target: &str) -> Result<(), AwsError> {
        if self.uses_legacy(target) {
            const OP: &str = "DetachPrincipalPolicy";
            self.call(OP, || async {
                #[allow(deprecated)]
                self.iot
                    .detach_principal_policy()
                    .policy_name(policy)
                    .principal(target)
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| classify(OP, "iot:DetachPrincipalPolicy", e))
            })
            .await
        } else {
            const OP: &str = "DetachPolicy";
            self.call(OP, || async {
                self.iot
                    .detach_policy()
                    .policy_name(policy)
                    .target(target)
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| classify(OP, "iot:DetachPolicy", e))
            })
            .await
        }
    }

    async fn list_identities(
        &self,
        pool_id: &str,
        on_page: &(dyn Fn(usize) + Sync),
    ) -> Result<Listing, AwsError> {
        const OP: &str = "ListIdentities";
        paginate(|token| async move {
            self.call(OP, || async {
                let out = self
                    .cognito
                    .list_identities()
                    .identity_pool_id(pool_id)
                    .max_results(IDENTITIES_PAGE)
                    .set_next_token(token.clone())
                    .send()
                    .await
                    .map_err(|e| classify(OP, "cognito-identity:ListIdentities", e))?;
                let ids: Vec<String> = out
                    .identities()
                    .iter()
                    .filter_map(|i| i.identity_id().map(str::to_owned))
                    .collect();
                on_page(ids.len());
                Ok((ids, out.next_token().map(str::to_owned)))
            })
            .await
        })
        .await
    }
}

impl SdkIot {
    /// Every page of ListTargetsForPolicy.
    async fn targets_for_policy(&self, policy: &str) -> Result<Listing, AwsError> {
        const OP: &str = "ListTargetsForPolicy";
        paginate(|marker| async move {
            self.call(OP, || async {
                let out = self
                    .iot
                    .list_targets_for_policy()
                    .policy_name(policy)
                    .page_size(TARGETS_PAGE)
                    .set_marker(marker.clone())
                    .send()
                    .await
                    .map_err(|e| classify(OP, "iot:ListTargetsForPolicy", e))?;
                Ok((out.targets().to_vec(), out.next_marker().map(str::to_owned)))
            })
            .await
        })
        .await
    }

    /// Every page of the deprecated ListPolicyPrincipals.
    async fn policy_principals(&self, policy: &str) -> Result<Listing, AwsError> {
        const OP: &str = "ListPolicyPrincipals";
        paginate(|marker| async move {
            self.call(OP, || async {
                #[allow(deprecated)]
                let out = self
                    .iot
                    .list_policy_principals()
                    .policy_name(policy)
                    .page_size(TARGETS_PAGE)
                    .set_marker(marker.clone())
                    .send()
                    .await
                    .map_err(|e| classify(OP, "iot:ListPolicyPrincipals", e))?;
                Ok((
                    out.principals().to_vec(),
                    out.next_marker().map(str::to_owned),
                ))
            })
            .await
        })
        .await
    }
}

/// Collects every page: `page(marker)` returns the items and the next marker. Stops on an empty
/// or repeated marker.
async fn paginate<F, Fut>(mut page: F) -> Result<Listing, AwsError>
where
    F: FnMut(Option<String>) -> Fut,
    Fut: Future<Output = Result<(Vec<String>, Option<String>), AwsError>>,
{
    let mut listing = Listing::default();
    let mut marker: Option<String> = None;
    loop {
        let (items, next) = page(marker.clone()).await?;
        listing.pages += 1;
        listing.items.extend(items);
        match next {
            Some(m) if !m.is_empty() && Some(&m) != marker.as_ref() => marker = Some(m),
            _ => return Ok(listing),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_map_to_kinds() {
        assert_eq!(
            kind_from(Some("ThrottlingException"), Some(400)),
            AwsErrorKind::Throttled
        );
        assert_eq!(
            kind_from(Some("ResourceNotFoundException"), Some(404)),
            AwsErrorKind::NotFound
        );
        assert_eq!(kind_from(None, Some(503)), AwsErrorKind::Unavailable);
        assert_eq!(kind_from(None, Some(429)), AwsErrorKind::Throttled);
        assert_eq!(
            kind_from(Some("UnauthorizedException"), Some(401)),
            AwsErrorKind::AccessDenied
        );
        assert_eq!(kind_from(Some("Weird"), Some(400)), AwsErrorKind::Other);
        assert_eq!(
            kind_from(None, Some(404)),
            AwsErrorKind::Other,
            "not a missing policy"
        );
        assert!(hint(None, Some(404)).is_some_and(|h| h.contains("--aws-endpoint-url")));
        assert!(
            hint(Some("InvalidSignatureException"), Some(403)).is_some_and(|h| h.contains("clock"))
        );
    }

    #[tokio::test]
    async fn paginate_follows_markers_and_stops_on_a_repeat() {
        // Served last to first: a (next m1), b (next m2), c (next m2 again: the end).
        let pages = std::sync::Mutex::new(vec![
            (vec!["c".to_string()], Some("m2".to_string())),
            (vec!["b".to_string()], Some("m2".to_string())),
            (vec!["a".to_string()], Some("m1".to_string())),
        ]);
        let seen = std::sync::Mutex::new(Vec::new());
        let listing = paginate(|marker| {
            seen.lock().unwrap().push(marker);
            let next = pages.lock().unwrap().pop().unwrap();
            async move { Ok(next) }
        })
        .await
        .unwrap();
        assert_eq!(listing.pages, 3);
        assert_eq!(listing.items.len(), 3);
        assert_eq!(
            *seen.lock().unwrap(),
            vec![None, Some("m1".into()), Some("m2".into())]
        );
    }

    #[test]
    fn access_denied_names_the_action() {
        let e = AwsError::new(
            AwsErrorKind::AccessDenied,
            "AttachPolicy",
            "iot:AttachPolicy",
            "not authorized",
        );
        assert!(e.to_string().contains("iot:AttachPolicy"), "{e}");
    }
}
