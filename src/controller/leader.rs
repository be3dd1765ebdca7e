//! Leader election over a Kubernetes Lease, so that of several replicas only one reconciles and
//! runs relays.
//!
//! Timing uses each replica's monotonic clock only, so clock skew between nodes does not matter:
//! - a follower takes the lease over only after it has seen the lease record unchanged for a
//!   whole `duration` (measured from when it observed the record);
//! - the leader's [`WriteGate`] shuts when `duration - margin` has passed since the *start* of
//!   its last successful renewal, whatever its pending requests are doing.
//!
//! The leader's last renewal was written after that start, so a follower cannot have observed it
//! earlier, and cannot take over before `start + duration`; the old leader's gate shut at
//! `start + duration - margin`. What the gate guards (status, Events, AWS writes through the
//! record journal, and every new broker connection) therefore never overlaps between two
//! replicas.
//!
//! A leader that cannot renew (the API server is down, or it is cut off) is [`Leadership::Lapsed`]
//! rather than deposed: its relays keep the connections they have (static stability), but make
//! no new one. Only when it sees another holder, or a new term of its own, does it stop them.
//! The brokers fence the rest: they allow one connection per client id, so a new leader's
//! connection replaces the lapsed one's, which cannot reconnect.
//!
//! Every call to the lease store has a deadline ([`Timing::deadline`]), so a hung request never
//! holds the elector.

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
    /// Opaque version for optimistic concurrency; changes on every write, so followers see
    /// renewals as new versions.
    pub version: String,
    /// How many times the lease changed holders (`leaseTransitions`).
    pub transitions: i32,
    /// When the current holder took the lease (`acquireTime`).
    pub acquired: Option<jiff::Timestamp>,
}

impl LeaseRecord {
    /// The record after `holder` writes it over `self`: a renewal keeps the acquisition time
    /// and the transition count, a change of holder sets the first and counts one more. An
    /// empty `holder` releases the lease (not a transition: nobody acquired it).
    pub fn next(&self, holder: &str, now: jiff::Timestamp) -> LeaseRecord {
        let mut next = self.clone();
        if holder != self.holder {
            next.holder = holder.to_owned();
            if !holder.is_empty() {
                next.acquired = Some(now);
                next.transitions = self.transitions.wrapping_add(1);
            }
        }
        next
    }
}

/// Why a lease write failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    #[error("the lease changed concurrently")]
    Conflict,
    #[error("lease store: {0}")]
    Store(#[source] crate::error::Source),
}

pub type LeaseFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, LeaseError>> + Send + 'a>>;

/// Where the lease lives: a Kubernetes Lease, or an in-memory fake in tests.
pub trait LeaseStore: Send + Sync {
    fn get(&self) -> LeaseFuture<'_, Option<LeaseRecord>>;
    /// Creates the lease held by `holder`; `Conflict` if it exists.
    fn create(&self, holder: &str) -> LeaseFuture<'_, LeaseRecord>;
    /// Writes `current.next(holder)` if the stored version is still `current.version`
    /// (renewal, takeover or release, with the fields set as [`LeaseRecord::next`] says);
    /// `Conflict` otherwise.
    fn replace(&self, current: &LeaseRecord, holder: &str) -> LeaseFuture<'_, LeaseRecord>;
}

/// Election timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How long a lease is valid without renewal.
    pub duration: Duration,
    /// How often the leader renews (and followers look).
    pub retry: Duration,
    /// How long before the lease could be taken over the leader's gate shuts.
    pub margin: Duration,
    /// How long one attempt (a read and a write of the lease) may take before it counts as
    /// failed.
    pub deadline: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self::for_duration(Duration::from_secs(15))
    }
}

impl Timing {
    /// The operator's timing for a lease of `duration`: renew every `duration / 4` (at most
    /// 2 s, as client-go), shut the gate `duration / 5` before a takeover is possible, and give
    /// each attempt `duration / 3`.
    pub fn for_duration(duration: Duration) -> Self {
        Self {
            duration,
            retry: (duration / 4).min(Duration::from_secs(2)),
            margin: duration / 5,
            deadline: duration / 3,
        }
    }
}

/// What this replica knows about its leadership.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leadership {
    /// Another replica holds the lease, or this one has not (yet) taken it.
    Following,
    /// This replica holds the lease and renewed it in time. `term` counts the times it took
    /// the lease: renewals keep it, a new acquisition makes a new one.
    Leading { term: u64 },
    /// This replica held the lease in `term` but could not renew it in time (the API server
    /// did not answer), and has seen no other holder. Its gate is shut: connections it has
    /// keep relaying, nothing new connects, nothing is written. `since` is when the lease's
    /// validity ended.
    Lapsed { term: u64, since: Instant },
}

impl Leadership {
    /// Whether this replica holds a valid lease.
    pub fn is_leading(&self) -> bool {
        matches!(self, Leadership::Leading { .. })
    }

    /// Whether this replica runs what it ran under the lease (leading, or lapsed and not
    /// deposed).
    pub fn is_running(&self) -> bool {
        !matches!(self, Leadership::Following)
    }

    /// The term this replica runs under, if any.
    pub fn term(&self) -> Option<u64> {
        match self {
            Leadership::Following => None,
            Leadership::Leading { term } | Leadership::Lapsed { term, .. } => Some(*term),
        }
    }
}

/// Whether this replica may write to the cluster (status, Events) on behalf of the controllers.
///
/// Without leader election it is always open. With it, it is open until the instant the
/// replica's leadership lapses, read from the monotonic clock at each check: a replica that was
/// frozen (SIGSTOP, a long GC-like pause) and wakes after its lease passed finds the gate shut
/// before its elector has even run again.
#[derive(Clone, Debug)]
pub struct WriteGate(Option<std::sync::Arc<std::sync::Mutex<Option<Instant>>>>);

impl WriteGate {
    /// Always open: no leader election.
    pub fn always() -> Self {
        Self(None)
    }

    /// Shut until an elector opens it.
    pub fn leased() -> Self {
        Self(Some(Default::default()))
    }

    /// Whether writes are allowed now.
    pub fn is_open(&self) -> bool {
        match &self.0 {
            None => true,
            Some(until) => until
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some_and(|t| Instant::now() < t),
        }
    }

    fn set(&self, until: Option<Instant>) {
        if let Some(cell) = &self.0 {
            *cell.lock().unwrap_or_else(|p| p.into_inner()) = until;
        }
    }
}

/// Runs the election until `stop` is true; publishes what this replica knows of its leadership
/// on the returned channel and keeps `gate` open exactly while the lease is valid. On stop, a
/// held lease is released so that another replica takes over at once: stop only once
/// everything this replica ran under the lease (relays, above all) has ended.
pub fn spawn_elector(
    store: std::sync::Arc<dyn LeaseStore>,
    identity: String,
    timing: Timing,
    gate: WriteGate,
    mut stop: watch::Receiver<bool>,
) -> (watch::Receiver<Leadership>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(Leadership::Following);
    let task = tokio::spawn(async move {
        let mut leading_until: Option<Instant> = None;
        let mut terms = 0u64;
        // (record, when this replica first saw it) for followers.
        let mut observed: Option<(LeaseRecord, Instant)> = None;
        loop {
            let attempt_start = Instant::now();
            // A replica that wakes after its lease's validity ended (it was frozen, say) says so
            // before it waits on the API server.
            lapse_if_due(&tx, leading_until, &identity);
            let outcome = {
                let attempt = tokio::time::timeout(
                    timing.deadline,
                    step(store.as_ref(), &identity, timing, &mut observed),
                );
                tokio::pin!(attempt);
                // Leadership lapses exactly when it ends, even while a request is out.
                loop {
                    let lapse_at = leading_until.filter(|_| tx.borrow().is_leading());
                    tokio::select! {
                        r = &mut attempt => break r.unwrap_or_else(|_| Step::Unknown(LeaseError::Store(crate::error::Source::message(format!(
                            "no answer within {:?}", timing.deadline
                        ))))),
                        _ = sleep_until_opt(lapse_at) => lapse_if_due(&tx, leading_until, &identity),
                    }
                }
            };
            if let Step::Unknown(_) = outcome {
                // A follower takes over only a record it watched unchanged for a whole duration
                // without a gap: after an outage of the API server the holder gets the time to
                // renew before anyone may take its lease.
                observed = None;
            }
            let current = *tx.borrow();
            let next = match outcome {
                Step::Leading { took } => {
                    leading_until = Some(attempt_start + timing.duration - timing.margin);
                    match current {
                        // A renewal of the term this replica runs: nothing restarts.
                        Leadership::Leading { term } | Leadership::Lapsed { term, .. } if !took => {
                            Leadership::Leading { term }
                        }
                        _ => {
                            terms += 1;
                            Leadership::Leading { term: terms }
                        }
                    }
                }
                Step::Following => {
                    leading_until = None;
                    Leadership::Following
                }
                Step::Unknown(e) => {
                    tracing::warn!(error = %e, "lease renewal failed");
                    current
                }
            };
            gate.set(leading_until);
            // A renewal that answered after the validity ended does not make it valid again:
            // the next one (from its own start) does.
            let next = match next {
                Leadership::Leading { term }
                    if leading_until.is_none_or(|t| Instant::now() >= t) =>
                {
                    match current {
                        Leadership::Lapsed { term: t, since } if t == term => {
                            Leadership::Lapsed { term, since }
                        }
                        _ => Leadership::Lapsed {
                            term,
                            since: Instant::now(),
                        },
                    }
                }
                other => other,
            };
            if next != current {
                announce(&tx, current, next, &identity);
            }
            // Wake for the next renewal, or exactly when leadership would lapse.
            let mut wake = Instant::now() + timing.retry;
            if let Some(t) = leading_until
                && tx.borrow().is_leading()
            {
                wake = wake.min(t);
            }
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
        }
        gate.set(None);
        if tx.borrow().is_running() {
            let _ = tx.send(Leadership::Following);
            match tokio::time::timeout(timing.deadline, release(store.as_ref(), &identity)).await {
                Ok(()) => {}
                Err(_) => {
                    tracing::warn!("releasing the lease: no answer in time; it expires instead")
                }
            }
        }
    });
    (rx, task)
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Moves `Leading` to `Lapsed` once the lease's validity has ended.
fn lapse_if_due(tx: &watch::Sender<Leadership>, leading_until: Option<Instant>, identity: &str) {
    let current = *tx.borrow();
    if let Leadership::Leading { term } = current {
        let now = Instant::now();
        if leading_until.is_none_or(|t| now >= t) {
            let since = leading_until.unwrap_or(now);
            announce(tx, current, Leadership::Lapsed { term, since }, identity);
        }
    }
}

fn announce(tx: &watch::Sender<Leadership>, from: Leadership, to: Leadership, identity: &str) {
    match (from, to) {
        (Leadership::Leading { term }, Leadership::Lapsed { .. }) => tracing::warn!(
            identity,
            term,
            "lease not renewed in time: connected relays keep running on their last spec; \
             nothing new connects and nothing is written until it is renewed"
        ),
        (Leadership::Lapsed { term, since }, Leadership::Leading { term: t }) if term == t => {
            tracing::info!(
                identity,
                term,
                lapsed_for = ?since.elapsed(),
                "lease renewed: the same term carries on, nothing restarts"
            )
        }
        (_, Leadership::Following) => {
            tracing::info!(identity, leader = false, "another replica holds the lease")
        }
        (_, Leadership::Leading { term }) => {
            tracing::info!(identity, leader = true, term, "took the lease: leading")
        }
        _ => {}
    }
    let _ = tx.send(to);
}

enum Step {
    /// Holds the lease; `took`: by a new acquisition (create or takeover), not a renewal.
    Leading {
        took: bool,
    },
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
            Ok(_) => Step::Leading { took: true },
            Err(LeaseError::Conflict) => Step::Following,
            Err(e) => Step::Unknown(e),
        };
    };
    if record.holder == identity {
        return match store.replace(&record, identity).await {
            Ok(_) => Step::Leading { took: false },
            // Someone wrote in between (a takeover, or a write of this replica's own that
            // timed out here but landed): the next attempt reads which.
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
    match store.replace(&record, identity).await {
        Ok(_) => {
            tracing::info!(previous = %record.holder, "took over the lease");
            Step::Leading { took: true }
        }
        Err(LeaseError::Conflict) => Step::Following,
        Err(e) => Step::Unknown(e),
    }
}

async fn release(store: &dyn LeaseStore, identity: &str) {
    if let Ok(Some(r)) = store.get().await
        && r.holder == identity
    {
        match store.replace(&r, "").await {
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
    labels: Option<std::collections::BTreeMap<String, String>>,
}

impl KubeLeaseStore {
    pub fn new(client: Client, namespace: &str, name: &str, duration: Duration) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            duration_seconds: i32::try_from(duration.as_secs()).unwrap_or(i32::MAX),
            labels: None,
        }
    }

    /// Labels the Lease carries (so that a list by label finds it).
    pub fn with_labels(mut self, labels: std::collections::BTreeMap<String, String>) -> Self {
        self.labels = Some(labels);
        self
    }

    /// The Lease object for `record`, renewed now.
    fn lease(&self, record: &LeaseRecord) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                labels: self.labels.clone(),
                resource_version: (!record.version.is_empty()).then(|| record.version.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: (!record.holder.is_empty()).then(|| record.holder.clone()),
                lease_duration_seconds: Some(self.duration_seconds),
                lease_transitions: Some(record.transitions),
                renew_time: Some(MicroTime(jiff::Timestamp::now())),
                acquire_time: record.acquired.map(MicroTime),
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
        transitions: spec.lease_transitions.unwrap_or_default(),
        acquired: spec.acquire_time.map(|t| t.0),
    }
}

fn store_error(e: kube::Error) -> LeaseError {
    match e {
        kube::Error::Api(s) if s.code == 409 => LeaseError::Conflict,
        other => LeaseError::Store(crate::error::Source::new(other)),
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
        let lease = self.lease(&LeaseRecord {
            holder: holder.to_owned(),
            version: String::new(),
            transitions: 0,
            acquired: Some(jiff::Timestamp::now()),
        });
        Box::pin(async move {
            self.api
                .create(&PostParams::default(), &lease)
                .await
                .map(|l| record(&l))
                .map_err(store_error)
        })
    }

    fn replace(&self, current: &LeaseRecord, holder: &str) -> LeaseFuture<'_, LeaseRecord> {
        let lease = self.lease(&current.next(holder, jiff::Timestamp::now()));
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
            Err(LeaseError::Store(crate::error::Source::message(
                "unreachable",
            )))
        } else {
            Ok(())
        }
    }

    pub fn holder(&self) -> Option<String> {
        self.record().map(|r| r.holder)
    }

    /// The stored record.
    pub fn record(&self) -> Option<LeaseRecord> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).clone()
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
                transitions: 0,
                acquired: Some(jiff::Timestamp::now()),
            };
            *inner = Some(rec.clone());
            Ok(rec)
        });
        Box::pin(async move { r })
    }

    fn replace(&self, current: &LeaseRecord, holder: &str) -> LeaseFuture<'_, LeaseRecord> {
        let r = self.check().and_then(|_| {
            let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            match inner.as_ref() {
                Some(cur) if cur.version == current.version => {
                    let version: u64 = cur.version.parse().unwrap_or(0) + 1;
                    let rec = LeaseRecord {
                        version: version.to_string(),
                        ..cur.next(holder, jiff::Timestamp::now())
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

#[cfg(test)]
mod tests {
    use super::LeaseRecord;

    fn at(s: i64) -> jiff::Timestamp {
        jiff::Timestamp::from_second(s).expect("timestamp")
    }

    /// coordination.k8s.io: `acquireTime` is when the holder took the lease, `leaseTransitions`
    /// counts changes of holder; renewals change neither.
    #[test]
    fn renewals_keep_the_acquisition_and_transitions_count_holder_changes() {
        let first = LeaseRecord {
            holder: "a".into(),
            version: "1".into(),
            transitions: 0,
            acquired: Some(at(100)),
        };
        let renewed = first.next("a", at(105)).next("a", at(110));
        assert_eq!((renewed.transitions, renewed.acquired), (0, Some(at(100))));
        let taken = renewed.next("b", at(130));
        assert_eq!(taken.holder, "b");
        assert_eq!((taken.transitions, taken.acquired), (1, Some(at(130))));
        // A release empties the holder but is no transition; the next holder is one.
        let released = taken.next("", at(140));
        assert_eq!((released.holder.as_str(), released.transitions), ("", 1));
        let again = released.next("a", at(150));
        assert_eq!((again.transitions, again.acquired), (2, Some(at(150))));
    }
}
