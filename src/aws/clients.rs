//! SDK configuration and a cache of clients per (region, role), with one rate limiter per
//! (region, role).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_credential_types::provider::SharedCredentialsProvider;

use super::iot::SdkIot;
use super::retry::{CallMeter, QuotaIsFinal, RetrySettings};
use crate::ratelimit::RateLimiter;
use crate::telemetry::Metrics;

/// Operator-wide AWS settings.
#[derive(Debug, Clone)]
pub struct AwsSettings {
    /// Send every AWS call to this URL instead of AWS (a local emulator such as moto).
    pub endpoint_url: Option<String>,
    /// Client-side limit on AWS IoT requests per second, per region and role.
    pub rate_limit: f64,
    /// Lower limits for single operations (requests per second, per region and role), each
    /// kept at or under that API's default AWS quota.
    pub api_rate_limits: Vec<(String, f64)>,
    /// Use the deprecated AttachPrincipalPolicy family.
    pub legacy_attach: bool,
    /// Retries of every AWS call (the SDK's standard retry mode).
    pub retry: RetrySettings,
    /// Attach/detach calls in flight per binding.
    pub concurrency: usize,
}

impl Default for AwsSettings {
    fn default() -> Self {
        Self {
            endpoint_url: None,
            rate_limit: 10.0,
            api_rate_limits: DEFAULT_API_RATE_LIMITS
                .iter()
                .map(|(op, r)| ((*op).to_owned(), *r))
                .collect(),
            legacy_attach: false,
            retry: RetrySettings::default(),
            concurrency: 4,
        }
    }
}

/// Per-operation limits by default: AWS's default quotas of the calls a pool sync makes most.
/// The overall `rate_limit` applies as well.
pub use crate::ratelimit::AWS_DEFAULT_API_LIMITS as DEFAULT_API_RATE_LIMITS;

/// The limiters of one region and role: overall, and per operation.
struct Limits {
    shared: Arc<RateLimiter>,
    per_api: HashMap<String, Arc<RateLimiter>>,
}

/// Why a client could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("no AWS region: set spec.region or configure one for the operator (AWS_REGION)")]
    NoRegion,
}

type Key = (String, Option<String>);

/// Builds and caches AWS clients.
pub struct AwsClients {
    base: SdkConfig,
    settings: AwsSettings,
    metrics: Option<Arc<Metrics>>,
    clients: Mutex<HashMap<Key, Arc<SdkIot>>>,
    limiters: Mutex<HashMap<Key, Arc<Limits>>>,
}

impl AwsClients {
    /// Loads the default credential chain and region (environment, IRSA web identity, EKS Pod
    /// Identity, profile, IMDS), with the SDK's retries set from `settings.retry` (the
    /// credential providers built from it retry the same way).
    pub async fn load(settings: AwsSettings, metrics: Option<Arc<Metrics>>) -> Self {
        let mut loader =
            aws_config::defaults(BehaviorVersion::latest()).retry_config(settings.retry.config());
        if let Some(url) = &settings.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        Self::from_config(loader.load().await, settings, metrics)
    }

    /// Clients that never reach AWS (no credentials, no region): for relays without an AWS
    /// source, so that nothing probes the instance metadata service.
    pub fn offline(settings: AwsSettings) -> Self {
        let config = SdkConfig::builder()
            .behavior_version(BehaviorVersion::latest())
            .build();
        Self::from_config(config, settings, None)
    }

    /// Uses an SDK configuration as it is (tests pass static credentials and an endpoint).
    pub fn from_config(
        base: SdkConfig,
        settings: AwsSettings,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        Self {
            base,
            settings,
            metrics,
            clients: Mutex::new(HashMap::new()),
            limiters: Mutex::new(HashMap::new()),
        }
    }

    pub fn settings(&self) -> &AwsSettings {
        &self.settings
    }

    pub fn base_config(&self) -> &SdkConfig {
        &self.base
    }

    /// The region a request for `region` goes to: the given one, else the configured default.
    pub fn resolve_region(&self, region: Option<&str>) -> Result<String, ClientError> {
        region
            .map(str::to_owned)
            .or_else(|| self.base.region().map(|r| r.to_string()))
            .ok_or(ClientError::NoRegion)
    }

    /// An SDK configuration for a region, optionally assuming a role.
    pub async fn config_for(&self, region: &str, role_arn: Option<&str>) -> SdkConfig {
        let mut builder = self
            .base
            .to_builder()
            .region(Region::new(region.to_owned()));
        if let Some(role) = role_arn {
            let provider = aws_config::sts::AssumeRoleProvider::builder(role)
                .session_name("iot-operator")
                .region(Region::new(region.to_owned()))
                .configure(&self.base)
                .build()
                .await;
            builder = builder.credentials_provider(SharedCredentialsProvider::new(provider));
        }
        builder.build()
    }

    /// Cognito Identity and IAM readers for the pool roles check (not cached: used once a
    /// resync per binding with pools).
    pub async fn roles(
        &self,
        region: Option<&str>,
        role_arn: Option<&str>,
    ) -> Result<super::roles::SdkRoles, ClientError> {
        let region = self.resolve_region(region)?;
        let config = self.config_for(&region, role_arn).await;
        let mut cognito = aws_sdk_cognitoidentity::config::Builder::from(&config);
        let mut iam = aws_sdk_iam::config::Builder::from(&config);
        if let Some(m) = &self.metrics {
            cognito = cognito.interceptor(CallMeter::new(m.clone()));
            iam = iam.interceptor(CallMeter::new(m.clone()));
        }
        Ok(super::roles::SdkRoles::new(
            aws_sdk_cognitoidentity::Client::from_conf(cognito.build()),
            aws_sdk_iam::Client::from_conf(iam.build()),
        ))
    }

    /// The IoT/Cognito client for a region and optional role (cached).
    pub async fn iot(
        &self,
        region: Option<&str>,
        role_arn: Option<&str>,
    ) -> Result<Arc<SdkIot>, ClientError> {
        let region = self.resolve_region(region)?;
        let key: Key = (region.clone(), role_arn.map(str::to_owned));
        if let Some(c) = self
            .clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return Ok(c.clone());
        }
        let config = self.config_for(&region, role_arn).await;
        let limiter = self
            .limiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_insert_with(|| {
                Arc::new(Limits {
                    shared: Arc::new(RateLimiter::new(self.settings.rate_limit)),
                    per_api: self
                        .settings
                        .api_rate_limits
                        .iter()
                        .map(|(op, r)| (op.clone(), Arc::new(RateLimiter::new(*r))))
                        .collect(),
                })
            })
            .clone();
        let mut iot = aws_sdk_iot::config::Builder::from(&config).retry_classifier(QuotaIsFinal);
        let mut cognito = aws_sdk_cognitoidentity::config::Builder::from(&config);
        if let Some(m) = &self.metrics {
            iot = iot.interceptor(CallMeter::new(m.clone()));
            cognito = cognito.interceptor(CallMeter::new(m.clone()));
        }
        let client = Arc::new(
            SdkIot::new(
                aws_sdk_iot::Client::from_conf(iot.build()),
                aws_sdk_cognitoidentity::Client::from_conf(cognito.build()),
                limiter.shared.clone(),
                self.settings.legacy_attach,
                self.metrics.clone(),
            )
            .with_api_limits(limiter.per_api.clone()),
        );
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, client.clone());
        Ok(client)
    }
}
