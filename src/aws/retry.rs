//! Retries are the AWS SDK's own (standard mode: exponential backoff with jitter and a retry
//! quota), configured here; [`CallMeter`], an SDK interceptor, counts each attempt, throttle and
//! retry for the metrics. STS AssumeRole and the Cognito credential calls, which aws-config
//! builds from the same configuration, retry the same way.

use std::sync::Arc;
use std::time::Duration;

use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::interceptors::context::{
    BeforeTransmitInterceptorContextRef, FinalizerInterceptorContextRef, InterceptorContext,
};
use aws_smithy_runtime_api::client::orchestrator::{HttpResponse, Metadata};
use aws_smithy_runtime_api::client::retries::RequestAttempts;
use aws_smithy_runtime_api::client::retries::classifiers::{
    ClassifyRetry, RetryAction, RetryClassifierPriority,
};
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;
use aws_smithy_types::retry::RetryConfig;

use super::iot::kind_from;
use crate::policy::AwsErrorKind;
use crate::telemetry::Metrics;
use crate::telemetry::metrics::{AwsCallLabels, AwsOperationLabels};

/// How often and how long AWS calls are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetrySettings {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// Upper bound of the first wait; it doubles per retry up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self {
            max_attempts: 6,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
        }
    }
}

impl RetrySettings {
    /// The SDK's retry configuration for these settings.
    pub fn config(&self) -> RetryConfig {
        RetryConfig::standard()
            .with_max_attempts(self.max_attempts.max(1))
            .with_initial_backoff(self.initial_backoff)
            .with_max_backoff(self.max_backoff)
    }
}

/// Counts every attempt of an AWS call by outcome, every throttled attempt and every retry, by
/// operation. Add it to each SDK client's configuration.
#[derive(Clone)]
pub struct CallMeter {
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for CallMeter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CallMeter")
    }
}

impl CallMeter {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

/// The operation name the SDK put in the config bag (`GetPolicy`, `ListIdentities`, ...).
fn operation(cfg: &ConfigBag) -> String {
    cfg.load::<Metadata>()
        .map_or_else(|| "unknown".to_owned(), |m| m.name().to_owned())
}

/// The AWS error code of a response: the `x-amzn-ErrorType` header (restJson1 and awsJson
/// protocols), else `__type` or `code` in a JSON body; without a namespace prefix or suffix.
fn error_code(response: &HttpResponse) -> Option<String> {
    let raw = response
        .headers()
        .get("x-amzn-errortype")
        .map(str::to_owned)
        .or_else(|| {
            let body: serde_json::Value = serde_json::from_slice(response.body().bytes()?).ok()?;
            body.get("__type")
                .or_else(|| body.get("code"))
                .and_then(|v| v.as_str())
                .map(str::to_owned)
        })?;
    // "ThrottlingException:http://internal.amazon.com/..." or "aws.iot#ThrottlingException".
    let code = raw.split(':').next().unwrap_or(&raw);
    let code = code.rsplit('#').next().unwrap_or(code);
    Some(code.to_owned())
}

/// The outcome label of one attempt and whether it was throttled.
pub fn attempt_outcome(response: &HttpResponse) -> (&'static str, bool) {
    let status = response.status().as_u16();
    if (200..300).contains(&status) {
        return ("ok", false);
    }
    let kind = kind_from(error_code(response).as_deref(), Some(status));
    (kind.reason(), kind == AwsErrorKind::Throttled)
}

impl Intercept for CallMeter {
    fn name(&self) -> &'static str {
        "iot-operator-call-meter"
    }

    fn read_before_attempt(
        &self,
        _context: &BeforeTransmitInterceptorContextRef<'_>,
        _rc: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let attempts = cfg.load::<RequestAttempts>().map_or(1, |a| a.attempts());
        if attempts > 1 {
            let operation = operation(cfg);
            tracing::debug!(%operation, attempt = attempts, "retrying AWS call");
            self.metrics
                .aws_retries
                .get_or_create(&AwsOperationLabels { operation })
                .inc();
        }
        Ok(())
    }

    fn read_after_attempt(
        &self,
        context: &FinalizerInterceptorContextRef<'_>,
        _rc: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let (outcome, throttled) = match context.response() {
            Some(response) => attempt_outcome(response),
            // No response: the request did not reach AWS or the answer did not come back.
            None => (AwsErrorKind::Transport.reason(), false),
        };
        let operation = operation(cfg);
        // Each operation called has a throttle and a retry series from its first call, at 0
        // until one happens (a dashboard shows 0, not "no data").
        let labels = AwsOperationLabels {
            operation: operation.clone(),
        };
        let throttles = self.metrics.aws_throttles.get_or_create(&labels).clone();
        let _ = self.metrics.aws_retries.get_or_create(&labels);
        if throttled {
            throttles.inc();
        }
        self.metrics
            .aws_calls
            .get_or_create(&AwsCallLabels { operation, outcome })
            .inc();
        Ok(())
    }
}

/// AWS IoT's quota errors (`LimitExceededException`: a target already has 10 policies;
/// `VersionsLimitExceededException`: a policy has 5 versions) are final: waiting does not lift
/// them. The SDK's list of throttling codes includes `LimitExceededException`, so without this
/// classifier each would be retried up to `max_attempts` times. Add it to AWS IoT clients.
#[derive(Debug, Default, Clone, Copy)]
pub struct QuotaIsFinal;

impl ClassifyRetry for QuotaIsFinal {
    fn classify_retry(&self, ctx: &InterceptorContext) -> RetryAction {
        match ctx.response().and_then(error_code).as_deref() {
            Some("LimitExceededException" | "VersionsLimitExceededException") => {
                RetryAction::RetryForbidden
            }
            _ => RetryAction::NoActionIndicated,
        }
    }

    fn name(&self) -> &'static str {
        "iot-operator-quota-is-final"
    }

    /// Runs after the SDK's classifiers, so that its verdict stands.
    fn priority(&self) -> RetryClassifierPriority {
        RetryClassifierPriority::run_after(RetryClassifierPriority::transient_error_classifier())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_smithy_types::body::SdkBody;

    fn response(status: u16, header: Option<&str>, body: &str) -> HttpResponse {
        let mut r = HttpResponse::new(
            status.try_into().expect("status"),
            SdkBody::from(body.to_owned()),
        );
        if let Some(h) = header {
            r.headers_mut().insert("x-amzn-ErrorType", h.to_owned());
        }
        r
    }

    #[test]
    fn outcomes_from_status_header_and_body() {
        assert_eq!(attempt_outcome(&response(200, None, "{}")), ("ok", false));
        assert_eq!(
            attempt_outcome(&response(
                400,
                Some("ThrottlingException:http://internal.amazon.com/coral/"),
                "{}"
            )),
            ("Throttled", true)
        );
        // awsJson 1.1 (Cognito Identity) names the error in the body.
        assert_eq!(
            attempt_outcome(&response(
                400,
                None,
                r#"{"__type":"com.amazonaws.cognito.identity#TooManyRequestsException"}"#
            )),
            ("Throttled", true)
        );
        assert_eq!(
            attempt_outcome(&response(429, None, "")),
            ("Throttled", true)
        );
        assert_eq!(
            attempt_outcome(&response(503, None, "")),
            ("ServiceUnavailable", false)
        );
        assert_eq!(
            attempt_outcome(&response(404, Some("ResourceNotFoundException"), "{}")),
            ("NotFound", false)
        );
    }

    #[test]
    fn settings_become_the_sdk_retry_config() {
        let c = RetrySettings {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(200),
        }
        .config();
        assert_eq!(c.max_attempts(), 4);
        assert_eq!(c.initial_backoff(), Duration::from_millis(20));
        assert_eq!(c.max_backoff(), Duration::from_millis(200));
    }
}
