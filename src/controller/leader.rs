//! Leader election over a Kubernetes Lease, so that of several replicas only one reconciles and
//! runs relays.
//!
//! Timing uses each replica's monotonic clock only, so clock skew between nodes does not matter:
//! - a follower takes the lease over only after it has seen the lease record unchanged for a
//!   whole `duration` (measured from when it observed the record);
//! - the leader steps down when `duration - margin` has passed since the *start* of its last
//!   successful renewal.
//!
//! The leader's last renewal was written after that start, so a follower cannot have observed it
//! earlier, and cannot take over before `start + duration`; the leader has stopped by
//! `start + duration - margin`. Relays of a replica that lost the lease are therefore gone before
//! another replica can connect with the same client ids.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::sync::watch;
use tokio::time::Instant;

/// The lease as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRecord {
    /// Identity of the holder; empty when released.
    pub holder: String,
    /// Opaque version for optimistic concurrency.
    pub version: String,
    /// Bumped on every renewal so followers see progress.
    pub renewals: i32,
}

/// Why a lease write failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    #[error("the lease changed concurrently")]
    Conflict,
    #[error("lease store: {0}")]
    Store(String),
}

pub type LeaseFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, LeaseError>> + Send + 'a>>;

/// Where the lease lives: a Kubernetes Lease, or an in-memory fake in tests.
pub trait LeaseStore: Send + Sync {
    fn get(&self) -> LeaseFuture<'_, Option<LeaseRecord>>;
    /// Creates the lease held by `holder`; `Conflict` if it exists.
    fn create(&self, holder: &str) -> LeaseFuture<'_, LeaseRecord>;
    /// Replaces the record if its version is still `version`; `Conflict` otherwise.
    fn replace(&self, version: &str, holder: &str, renewals: i32) -> LeaseFuture<'_, LeaseRecord>;
}

/// Election timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How long a lease is valid without renewal.
    pub duration: Duration,
    /// How often the leader renews (and followers look).
    pub retry: Duration,
    /// How long before the lease could be taken over the leader steps down.
    pub margin: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(15),
            retry: Duration::from_secs(4),
            margin: Duration::from_secs(3),
        }
    }
}

/// Runs the election until `stop` is true; publishes leadership on the returned channel. On
/// stop, a held lease is released so that another replica takes over at once.
pub fn spawn_elector(
    store: std::sync::Arc<dyn LeaseStore>,
    identity: String,
    timing: Timing,
    mut stop: watch::Receiver<bool>,
) -> (watch::Receiver<bool>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        let mut leading_until: Option<Instant> = None;
        // (record, when this replica first saw it) for followers.
        let mut observed: Option<(LeaseRecord, Instant)> = None;
        loop {
            let attempt_start = Instant::now();
            let outcome = step(store.as_ref(), &identity, timing, &mut observed).await;
            match outcome {
                Step::Leading => {
                    leading_until = Some(attempt_start + timing.duration - timing.margin)
                }
                Step::Following => leading_until = None,
                Step::Unknown(e) => {
                    tracing::warn!(error = %e, "lease renewal failed");
                }
            }
            let leader = leading_until.is_some_and(|t| Instant::now() < t);
            if *tx.borrow() != leader {
                tracing::info!(identity = %identity, leader, "leadership changed");
                let _ = tx.send(leader);
            }
            // Wake for the next renewal, or exactly when leadership would lapse.
            let mut wake = Instant::now() + timing.retry;
            if let Some(t) = leading_until
                && leader
            {
                wake = wake.min(t);
            }
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
        }
        if *tx.borrow() {
            let _ = tx.send(false);
            release(store.as_ref(), &identity).await;
        }
    });
    (rx, task)
}

enum Step {
    Leading,
    Following,
    Unknown(LeaseError),
}

async fn step(
    store: &dyn LeaseStore,
    identity: &str,
    timing: Timing,
    observed: &mut Option<(LeaseRecord, Instant)>,
) -> Step {
    let current = match store.get().await {
        Ok(c) => c,
        Err(e) => return Step::Unknown(e),
    };
    let Some(record) = current else {
        return match store.create(identity).await {
            Ok(_) => Step::Leading,
            Err(LeaseError::Conflict) => Step::Following,
            Err(e) => Step::Unknown(e),
        };
    };
    if record.holder == identity {
        return match store
            .replace(&record.version, identity, record.renewals.wrapping_add(1))
            .await
        {
            Ok(_) => Step::Leading,
            Err(LeaseError::Conflict) => Step::Following,
            Err(e) => Step::Unknown(e),
        };
    }
    let now = Instant::now();
    let seen_since = match observed {
        Some((r, since)) if *r == record => *since,
        _ => {
            *observed = Some((record.clone(), now));
            now
        }
    };
    let free = record.holder.is_empty() || now.duration_since(seen_since) >= timing.duration;
    if !free {
        return Step::Following;
    }
    match store
        .replace(&record.version, identity, record.renewals.wrapping_add(1))
        .await
    {
        Ok(_) => {
            tracing::info!(previous = %record.holder, "took over the lease");
            Step::Leading
        }
        Err(LeaseError::Conflict) => Step::Following,
        Err(e) => Step::Unknown(e),
    }
}

async fn release(store: &dyn LeaseStore, identity: &str) {
    if let Ok(Some(r)) = store.get().await
        && r.holder == identity
    {
        match store
            .replace(&r.version, "", r.renewals.wrapping_add(1))
            .await
        {
            Ok(_) => tracing::info!("lease released"),
            Err(e) => tracing::warn!(error = %e, "releasing the lease failed"),
        }
    }
}

/// A Lease object in the operator's namespace.
pub struct KubeLeaseStore {
    api: Api<Lease>,
    name: String,
    duration_seconds: i32,
}

impl KubeLeaseStore {
    pub fn new(client: Client, namespace: &str, name: &str, duration: Duration) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            duration_seconds: i32::try_from(duration.as_secs()).unwrap_or(i32::MAX),
        }
    }

    fn lease(&self, holder: &str, renewals: i32, version: Option<&str>) -> Lease {
        let now = MicroTime(jiff::Timestamp::now());
        Lease {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                resource_version: version.map(str::to_owned),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.to_owned()),
                lease_duration_seconds: Some(self.duration_seconds),
                lease_transitions: Some(renewals),
                renew_time: Some(now.clone()),
                acquire_time: Some(now),
                ..Default::default()
            }),
        }
    }
}

fn record(l: &Lease) -> LeaseRecord {
    let spec = l.spec.clone().unwrap_or_default();
    LeaseRecord {
        holder: spec.holder_identity.unwrap_or_default(),
        version: l.metadata.resource_version.clone().unwrap_or_default(),
        renewals: spec.lease_transitions.unwrap_or_default(),
    }
}

fn store_error(e: kube::Error) -> LeaseError {
    match e {
        kube::Error::Api(s) if s.code == 409 => LeaseError::Conflict,
        other => LeaseError::Store(other.to_string()),
    }
}

impl LeaseStore for KubeLeaseStore {
    fn get(&self) -> LeaseFuture<'_, Option<LeaseRecord>> {
        Box::pin(async move {
            self.api
                .get_opt(&self.name)
                .await
                .map(|l| l.as_ref().map(record))
                .map_err(store_error)
        })
    }

    fn create(&self, holder: &str) -> LeaseFuture<'_, LeaseRecord> {
        let lease = self.lease(holder, 0, None);
        Box::pin(async move {
            self.api
                .create(&PostParams::default(), &lease)
                .await
                .map(|l| record(&l))
                .map_err(store_error)
        })
    }

    fn replace(&self, version: &str, holder: &str, renewals: i32) -> LeaseFuture<'_, LeaseRecord> {
        let lease = self.lease(holder, renewals, Some(version));
        Box::pin(async move {
            self.api
                .replace(&self.name, &PostParams::default(), &lease)
                .await
                .map(|l| record(&l))
                .map_err(store_error)
        })
    }
}

/// An in-memory lease store (tests).
#[derive(Default)]
pub struct MemoryLeaseStore {
    inner: std::sync::Mutex<Option<LeaseRecord>>,
    /// When set, every call fails (a network partition from the API server).
    pub unreachable: std::sync::atomic::AtomicBool,
}

impl MemoryLeaseStore {
    fn check(&self) -> Result<(), LeaseError> {
        if self.unreachable.load(std::sync::atomic::Ordering::SeqCst) {
            Err(LeaseError::Store("unreachable".into()))
        } else {
            Ok(())
        }
    }

    pub fn holder(&self) -> Option<String> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|r| r.holder.clone())
    }
}

impl LeaseStore for MemoryLeaseStore {
    fn get(&self) -> LeaseFuture<'_, Option<LeaseRecord>> {
        let r = self
            .check()
            .map(|_| self.inner.lock().unwrap_or_else(|p| p.into_inner()).clone());
        Box::pin(async move { r })
    }

    fn create(&self, holder: &str) -> LeaseFuture<'_, LeaseRecord> {
        let r = self.check().and_then(|_| {
            let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            if inner.is_some() {
                return Err(LeaseError::Conflict);
            }
            let rec = LeaseRecord {
                holder: holder.to_owned(),
                version: "1".into(),
                renewals: 0,
            };
            *inner = Some(rec.clone());
            Ok(rec)
        });
        Box::pin(async move { r })
    }

    fn replace(&self, version: &str, holder: &str, renewals: i32) -> LeaseFuture<'_, LeaseRecord> {
        let r = self.check().and_then(|_| {
            let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            match inner.as_ref() {
                Some(cur) if cur.version == version => {
                    let next: u64 = cur.version.parse().unwrap_or(0) + 1;
                    let rec = LeaseRecord {
                        holder: holder.to_owned(),
                        version: next.to_string(),
                        renewals,
                    };
                    *inner = Some(rec.clone());
                    Ok(rec)
                }
                _ => Err(LeaseError::Conflict),
            }
        });
        Box::pin(async move { r })
    }
}
