//! AWS IoT and Cognito in memory, for engine tests and the pool benchmark: what no real peer
//! can do here (moto neither pages nor throttles, and a pool of 100,000 identities in moto takes
//! hours to create). It pages like AWS (60 identities a `ListIdentities` page, 250 targets a
//! `ListTargetsForPolicy` page), spaces calls by a client-side rate limit, throttles an API that
//! is called faster than its quota (counted, then waited out like a retry), and keeps a log of
//! write calls so that tests can check their order. Time is tokio's, so a paused clock measures
//! hours of AWS time in a moment.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::iot_api::{AwsError, AwsErrorKind, IotApi, Listing, PolicyInfo, PolicyVersion};
use crate::ratelimit::RateLimiter;

/// Identities a `ListIdentities` page holds at most.
pub const IDENTITIES_PAGE: usize = 60;
/// Targets a `ListTargetsForPolicy` page holds at most.
pub const TARGETS_PAGE: usize = 250;

#[derive(Debug, Default)]
struct State {
    policies: BTreeMap<String, String>,
    attached: BTreeMap<String, BTreeSet<String>>,
    pools: BTreeMap<String, BTreeSet<String>>,
    calls: BTreeMap<&'static str, u64>,
    throttled: BTreeMap<&'static str, u64>,
    /// Next free slot of each API under its quota.
    quota_next: BTreeMap<&'static str, Instant>,
}

/// The fake. Cheap to share: clones see the same state.
#[derive(Clone)]
pub struct FakeAws {
    state: Arc<Mutex<State>>,
    log: Arc<Mutex<Vec<String>>>,
    limiter: Arc<RateLimiter>,
    /// The client's per-operation limits, as the operator sets them by default.
    api_limiters: Arc<BTreeMap<&'static str, RateLimiter>>,
    /// Requests per second each API accepts before it throttles (0: never).
    quota: f64,
    /// APIs whose quota differs from `quota`.
    quotas: Arc<BTreeMap<&'static str, f64>>,
    /// Time each call takes.
    latency: Duration,
}

impl Default for FakeAws {
    fn default() -> Self {
        Self::new(0.0, 0.0, Duration::ZERO)
    }
}

impl FakeAws {
    /// `rate`: the client-side limit shared by all calls (0: none); `quota`: requests per second
    /// each API accepts (0: unlimited); `latency`: the time each call takes.
    pub fn new(rate: f64, quota: f64, latency: Duration) -> Self {
        Self {
            state: Arc::default(),
            log: Arc::default(),
            limiter: Arc::new(RateLimiter::new(rate)),
            api_limiters: Arc::default(),
            quota,
            quotas: Arc::default(),
            latency,
        }
    }

    /// Like AWS: each API in `quotas` accepts its own rate (the others `quota`), and the client
    /// limits each operation as the operator does by default
    /// ([`crate::ratelimit::AWS_DEFAULT_API_LIMITS`]).
    pub fn with_api_quotas(mut self, quotas: &[(&'static str, f64)]) -> Self {
        self.quotas = Arc::new(quotas.iter().copied().collect());
        self.api_limiters = Arc::new(
            crate::ratelimit::AWS_DEFAULT_API_LIMITS
                .iter()
                .map(|(op, r)| (*op, RateLimiter::new(*r)))
                .collect(),
        );
        self
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The log that write calls are appended to; a test journal may write to it too.
    pub fn log(&self) -> Arc<Mutex<Vec<String>>> {
        self.log.clone()
    }

    pub fn create_policy_now(&self, name: &str) {
        self.state()
            .policies
            .insert(name.to_owned(), "{}".to_owned());
    }

    /// Adds identities to a pool.
    pub fn add_identities(&self, pool: &str, ids: impl IntoIterator<Item = String>) {
        self.state()
            .pools
            .entry(pool.to_owned())
            .or_default()
            .extend(ids);
    }

    /// Attaches out of band (someone else's pair).
    pub fn attach_now(&self, policy: &str, target: &str) {
        self.state()
            .attached
            .entry(policy.to_owned())
            .or_default()
            .insert(target.to_owned());
    }

    /// Targets that have the policy.
    pub fn attached(&self, policy: &str) -> BTreeSet<String> {
        self.state()
            .attached
            .get(policy)
            .cloned()
            .unwrap_or_default()
    }

    /// Calls made (pages counted), by API.
    pub fn calls(&self) -> BTreeMap<&'static str, u64> {
        self.state().calls.clone()
    }

    /// Calls throttled, by API.
    pub fn throttled(&self) -> BTreeMap<&'static str, u64> {
        self.state().throttled.clone()
    }

    /// One request: the client's limiter, the API's quota (a request over it is throttled and
    /// retried when its slot comes), and the call's latency.
    async fn request(&self, api: &'static str) {
        self.limiter.acquire().await;
        if let Some(l) = self.api_limiters.get(api) {
            l.acquire().await;
        }
        let quota = self.quotas.get(api).copied().unwrap_or(self.quota);
        let wait = {
            let mut s = self.state();
            *s.calls.entry(api).or_default() += 1;
            if quota > 0.0 {
                let now = Instant::now();
                let interval = Duration::from_secs_f64(1.0 / quota);
                let next = s.quota_next.get(api).copied().unwrap_or(now);
                if next > now {
                    *s.throttled.entry(api).or_default() += 1;
                }
                let slot = next.max(now);
                s.quota_next.insert(api, slot + interval);
                slot
            } else {
                Instant::now()
            }
        };
        tokio::time::sleep_until(wait).await;
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
    }

    fn write(&self, line: String) {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(line);
    }
}

fn not_found(op: &'static str, action: &'static str, what: &str) -> AwsError {
    AwsError::new(
        AwsErrorKind::NotFound,
        op,
        action,
        format!("{what} not found"),
    )
}

impl IotApi for FakeAws {
    async fn get_policy(&self, name: &str) -> Result<Option<PolicyInfo>, AwsError> {
        self.request("GetPolicy").await;
        Ok(self.state().policies.get(name).map(|doc| PolicyInfo {
            arn: format!("arn:aws:iot:us-east-1:123456789012:policy/{name}"),
            default_version_id: "1".into(),
            document: doc.clone(),
        }))
    }

    async fn list_policy_versions(&self, _name: &str) -> Result<Vec<PolicyVersion>, AwsError> {
        self.request("ListPolicyVersions").await;
        Ok(vec![PolicyVersion {
            version_id: "1".into(),
            is_default: true,
            created: 0,
        }])
    }

    async fn create_policy(
        &self,
        name: &str,
        document: &str,
    ) -> Result<(String, String), AwsError> {
        self.request("CreatePolicy").await;
        self.write(format!("CreatePolicy {name}"));
        self.state()
            .policies
            .insert(name.to_owned(), document.to_owned());
        Ok((
            format!("arn:aws:iot:us-east-1:123456789012:policy/{name}"),
            "1".into(),
        ))
    }

    async fn create_policy_version(&self, name: &str, document: &str) -> Result<String, AwsError> {
        self.request("CreatePolicyVersion").await;
        self.write(format!("CreatePolicyVersion {name}"));
        self.state()
            .policies
            .insert(name.to_owned(), document.to_owned());
        Ok("2".into())
    }

    async fn delete_policy_version(&self, _name: &str, _version_id: &str) -> Result<(), AwsError> {
        self.request("DeletePolicyVersion").await;
        Ok(())
    }

    async fn delete_policy(&self, name: &str) -> Result<(), AwsError> {
        self.request("DeletePolicy").await;
        self.write(format!("DeletePolicy {name}"));
        let mut s = self.state();
        if s.attached.get(name).is_some_and(|t| !t.is_empty()) {
            return Err(AwsError::new(
                AwsErrorKind::Conflict,
                "DeletePolicy",
                "iot:DeletePolicy",
                "the policy is attached",
            ));
        }
        match s.policies.remove(name) {
            Some(_) => Ok(()),
            None => Err(not_found("DeletePolicy", "iot:DeletePolicy", name)),
        }
    }

    async fn list_targets(&self, policy: &str) -> Result<Listing, AwsError> {
        let items = self.attached(policy);
        let pages = items.len().div_ceil(TARGETS_PAGE).max(1);
        for _ in 0..pages {
            self.request("ListTargetsForPolicy").await;
        }
        Ok(Listing {
            items,
            pages: pages as u32,
        })
    }

    async fn attach(&self, policy: &str, target: &str) -> Result<(), AwsError> {
        self.request("AttachPolicy").await;
        if !self.state().policies.contains_key(policy) {
            return Err(not_found("AttachPolicy", "iot:AttachPolicy", policy));
        }
        self.write(format!("AttachPolicy {target}"));
        self.attach_now(policy, target);
        Ok(())
    }

    async fn detach(&self, policy: &str, target: &str) -> Result<(), AwsError> {
        self.request("DetachPolicy").await;
        self.write(format!("DetachPolicy {target}"));
        let removed = self
            .state()
            .attached
            .get_mut(policy)
            .is_some_and(|s| s.remove(target));
        if removed {
            Ok(())
        } else {
            Err(not_found("DetachPolicy", "iot:DetachPolicy", target))
        }
    }

    async fn list_identities(
        &self,
        pool_id: &str,
        on_page: &(dyn Fn(usize) + Sync),
    ) -> Result<Listing, AwsError> {
        let Some(items) = self.state().pools.get(pool_id).cloned() else {
            self.request("ListIdentities").await;
            return Err(not_found(
                "ListIdentities",
                "cognito-identity:ListIdentities",
                pool_id,
            ));
        };
        let pages = items.len().div_ceil(IDENTITIES_PAGE).max(1);
        for page in 0..pages {
            self.request("ListIdentities").await;
            on_page(IDENTITIES_PAGE.min(items.len() - (page * IDENTITIES_PAGE).min(items.len())));
        }
        Ok(Listing {
            items,
            pages: pages as u32,
        })
    }
}
