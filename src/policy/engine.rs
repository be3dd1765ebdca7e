//! The engine: observe, plan, apply, report. Talks to AWS only through [`IotApi`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::StreamExt;

use super::canonical::{canonical_from_str, canonical_json};
use super::iot_api::{AwsError, AwsErrorKind, IotApi, Listing};
use super::memory::{Journal, JournalError, Memory, NoJournal, SyncProgress};
use super::plan::{Observed, ObservedPolicy, Plan, PlanInput, plan};

/// One binding, as plain data: what it wants and what it remembers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BindingInput {
    pub policy_name: String,
    /// The managed document, if any.
    pub document: Option<serde_json::Value>,
    /// Explicit targets: identity ids, certificate ARNs, thing-group ARNs.
    pub targets: Vec<String>,
    /// Cognito identity-pool ids: every identity of each.
    pub pools: Vec<String>,
    /// What earlier syncs recorded.
    pub memory: Memory,
}

/// What other bindings want for the same policy: never detached.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Protection {
    pub targets: BTreeSet<String>,
    pub pools: BTreeSet<String>,
}

/// Whether to change anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    Apply,
    /// Observe and plan only.
    DryRun,
}

/// How a sync ended.
#[derive(Debug, Clone, PartialEq)]
pub enum SyncOutcome {
    /// Every desired target has the policy.
    Synced,
    /// Some targets failed; see `failures` and `detach_failures`.
    PartiallyAttached,
    /// The policy does not exist and the binding does not manage its document.
    PolicyNotFound,
    /// A call the whole sync depends on failed.
    Failed(AwsError),
    /// Stopped between calls (a signal): `memory` covers everything that may have changed.
    Interrupted,
    /// What the binding was about to attach could not be recorded, so nothing was attached; or
    /// the record after the sync failed, and the earlier, larger record stands.
    NotRecorded(JournalError),
}

/// A target AWS refused.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetError {
    pub target: String,
    pub error: AwsError,
}

/// The result of one sync.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncReport {
    pub plan: Plan,
    pub outcome: SyncOutcome,
    pub policy_arn: Option<String>,
    pub policy_version_id: Option<String>,
    /// Desired targets (pools expanded).
    pub desired: usize,
    /// Desired targets that have the policy after the sync.
    pub attached: usize,
    /// Targets that could not be attached.
    pub failures: Vec<TargetError>,
    /// Targets that could not be detached (they stay remembered and are retried).
    pub detach_failures: Vec<TargetError>,
    /// What to remember for the next sync.
    pub memory: Memory,
    /// Calls made: reads (pages counted) and writes.
    pub reads: u32,
    pub writes: u32,
}

impl SyncReport {
    fn new(input: &BindingInput, outcome: SyncOutcome) -> Self {
        Self {
            plan: Plan::default(),
            outcome,
            policy_arn: None,
            policy_version_id: None,
            desired: 0,
            attached: 0,
            failures: Vec::new(),
            detach_failures: Vec::new(),
            memory: input.memory.clone(),
            reads: 0,
            writes: 0,
        }
    }

    /// Whether any failure is throttling that outlasted the retries.
    pub fn throttled(&self) -> bool {
        matches!(&self.outcome, SyncOutcome::Failed(e) if e.kind == AwsErrorKind::Throttled)
            || self
                .failures
                .iter()
                .chain(&self.detach_failures)
                .any(|f| f.error.kind == AwsErrorKind::Throttled)
    }
}

/// What became of a managed policy when its last binding went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyRemoval {
    /// Deleted, after this many non-default versions.
    Deleted { versions: usize },
    /// Kept: still attached to `total` targets, the first of which are named.
    InUse { targets: Vec<String>, total: usize },
    /// It did not exist (any more).
    Gone,
}

/// Targets named when a policy is kept because it is still attached.
const IN_USE_NAMED: usize = 5;

/// What [`PolicyEngine::apply_all`] did.
#[derive(Default)]
struct Applied {
    /// Calls made.
    calls: u32,
    /// Targets AWS refused.
    failures: Vec<TargetError>,
    /// Targets not tried because the journal reported an interruption.
    skipped: Vec<String>,
}

#[derive(Clone, Copy)]
enum Op {
    Attach,
    Detach,
}

/// Syncs bindings against one AWS account and region.
pub struct PolicyEngine<A> {
    api: A,
    concurrency: usize,
}

impl<A: IotApi> PolicyEngine<A> {
    /// `concurrency` bounds the attach and detach calls in flight (the API client rate-limits
    /// them as well).
    pub fn new(api: A, concurrency: usize) -> Self {
        Self {
            api,
            concurrency: concurrency.max(1),
        }
    }

    pub fn api(&self) -> &A {
        &self.api
    }

    /// Lists each pool once; a pool that does not exist counts as empty and is reported.
    /// Each page's identities count as seen in `journal`'s progress.
    async fn list_pools<J: Journal>(
        &self,
        pools: Vec<String>,
        cache: &mut BTreeMap<String, BTreeSet<String>>,
        reads: &mut u32,
        missing: &mut Vec<TargetError>,
        journal: &J,
    ) -> Result<(), AwsError> {
        let seen = AtomicUsize::new(0);
        let on_page = |n: usize| {
            let total = seen.fetch_add(n, Ordering::Relaxed) + n;
            journal.progress(&SyncProgress {
                seen: total,
                ..SyncProgress::default()
            });
        };
        for pool in pools {
            if cache.contains_key(&pool) {
                continue;
            }
            match self.api.list_identities(&pool, &on_page).await {
                Ok(Listing { items, pages }) => {
                    *reads += pages;
                    cache.insert(pool, items);
                }
                Err(e) if e.kind == AwsErrorKind::NotFound => {
                    *reads += 1;
                    missing.push(TargetError {
                        target: pool.clone(),
                        error: e,
                    });
                    cache.insert(pool, BTreeSet::new());
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// One sync of a binding: observe, plan and (in `Apply` mode) apply. With `deleting`, detach
    /// what the binding applied and attach nothing. Keeps no record: the caller stores
    /// `report.memory` (see [`PolicyEngine::sync_recorded`] for the crash-safe form).
    pub async fn sync(
        &self,
        input: &BindingInput,
        protection: &Protection,
        mode: SyncMode,
        deleting: bool,
    ) -> SyncReport {
        self.sync_recorded(input, protection, mode, deleting, &NoJournal)
            .await
    }

    /// [`PolicyEngine::sync`] that records through `journal`: before the first attach, the
    /// union of what was remembered and what is about to be applied; after the last write, what
    /// the binding answers for now. A crash at any point leaves a record that covers every pair
    /// the binding attached. Stops between calls when the journal reports an interruption.
    #[tracing::instrument(name = "sync", skip_all, fields(policy = %input.policy_name, deleting, mode = ?mode))]
    pub async fn sync_recorded<J: Journal>(
        &self,
        input: &BindingInput,
        protection: &Protection,
        mode: SyncMode,
        deleting: bool,
        journal: &J,
    ) -> SyncReport {
        match self
            .sync_inner(input, protection, mode, deleting, journal)
            .await
        {
            Ok(report) => report,
            Err((error, reads)) => {
                let mut r = SyncReport::new(input, SyncOutcome::Failed(error));
                r.reads = reads;
                r
            }
        }
    }

    async fn sync_inner<J: Journal>(
        &self,
        input: &BindingInput,
        protection: &Protection,
        mode: SyncMode,
        deleting: bool,
        journal: &J,
    ) -> Result<SyncReport, (AwsError, u32)> {
        let mut reads = 0u32;
        let name = input.policy_name.as_str();
        let document = input.document.as_ref().map(canonical_json);

        // Observe the policy.
        let info = self
            .api
            .get_policy(name)
            .await
            .map_err(|e| (e, reads + 1))?;
        reads += 1;
        if info.is_none() && (document.is_none() || deleting) {
            // Nothing can be attached to a policy that does not exist.
            let outcome = if deleting {
                SyncOutcome::Synced
            } else {
                SyncOutcome::PolicyNotFound
            };
            let mut r = SyncReport::new(input, outcome);
            r.reads = reads;
            if deleting && mode == SyncMode::Apply {
                // No policy, no pair: nothing is left to answer for.
                r.memory = Memory::default();
                if let Err(e) = journal.record(&r.memory).await {
                    r.memory = input.memory.clone();
                    r.outcome = SyncOutcome::NotRecorded(e);
                }
            }
            return Ok(r);
        }
        let mut observed = Observed::default();
        if let Some(info) = &info {
            let canonical = canonical_from_str(&info.document);
            let versions = match &document {
                Some(doc) if !deleting && canonical.as_deref() != Some(doc.as_str()) => {
                    reads += 1;
                    self.api
                        .list_policy_versions(name)
                        .await
                        .map_err(|e| (e, reads))?
                }
                _ => Vec::new(),
            };
            observed.policy = Some(ObservedPolicy {
                arn: info.arn.clone(),
                default_version_id: info.default_version_id.clone(),
                canonical_document: canonical,
                versions,
            });
            let targets = self
                .api
                .list_targets(name)
                .await
                .map_err(|e| (e, reads + 1))?;
            reads += targets.pages;
            observed.attached = targets.items;
        }

        // Desired and previously applied sets.
        let mut pools: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut missing_pools = Vec::new();
        let wanted_pools: &[String] = if deleting { &[] } else { &input.pools };
        let to_list: Vec<String> = wanted_pools
            .iter()
            .chain(&input.memory.pools)
            .cloned()
            .collect();
        self.list_pools(to_list, &mut pools, &mut reads, &mut missing_pools, journal)
            .await
            .map_err(|e| (e, reads))?;
        let mut desired: BTreeSet<String> = BTreeSet::new();
        if !deleting {
            desired.extend(input.targets.iter().cloned());
            for pool in &input.pools {
                desired.extend(pools[pool].iter().cloned());
            }
        }
        let mut applied: BTreeSet<String> = input.memory.targets.clone();
        for pool in &input.memory.pools {
            applied.extend(pools[pool].iter().cloned());
        }
        let foreign = &input.memory.foreign;

        let base = PlanInput {
            desired: &desired,
            previously_applied: &applied,
            foreign,
            protected: &protection.targets,
            document: document.as_deref(),
            deleting,
        };
        let mut the_plan = plan(base, &observed);
        let widened: BTreeSet<String>;
        if !the_plan.detach.is_empty() && !protection.pools.is_empty() {
            // Only now is it worth listing the other bindings' pools.
            let others: Vec<String> = protection.pools.iter().cloned().collect();
            self.list_pools(others, &mut pools, &mut reads, &mut Vec::new(), &NoJournal)
                .await
                .map_err(|e| (e, reads))?;
            widened = protection
                .targets
                .iter()
                .chain(protection.pools.iter().flat_map(|p| pools[p].iter()))
                .cloned()
                .collect();
            the_plan = plan(
                PlanInput {
                    protected: &widened,
                    ..base
                },
                &observed,
            );
        }

        let mut report = SyncReport::new(input, SyncOutcome::Synced);
        report.reads = reads;
        report.desired = desired.len();
        report.policy_arn = observed.policy.as_ref().map(|p| p.arn.clone());
        report.policy_version_id = observed
            .policy
            .as_ref()
            .map(|p| p.default_version_id.clone());
        report.failures = missing_pools;

        if mode == SyncMode::DryRun {
            report.attached = desired.intersection(&observed.attached).count();
            report.plan = the_plan;
            return Ok(report);
        }

        // Record before attaching: a crash from here on leaves every pair this sync may
        // attach covered by the record.
        let mut intent = input.memory.clone();
        if !the_plan.attach.is_empty() {
            let wanted = Memory {
                targets: if deleting {
                    BTreeSet::new()
                } else {
                    input.targets.iter().cloned().collect()
                },
                pools: if deleting {
                    BTreeSet::new()
                } else {
                    input.pools.iter().cloned().collect()
                },
                foreign: the_plan.foreign.clone(),
            };
            intent = input.memory.union(&wanted);
            // What this sync attaches is the binding's, whatever it was before.
            for t in &the_plan.attach {
                intent.foreign.remove(t);
            }
            if intent != input.memory
                && let Err(e) = journal.record(&intent).await
            {
                report.plan = the_plan;
                report.outcome = SyncOutcome::NotRecorded(e);
                return Ok(report);
            }
        }
        report.memory = intent;

        // Apply: the policy first, then attachments.
        if let Some(doc) = &document {
            let mut writes = 0;
            let result = self.apply_policy(name, doc, &the_plan, &mut writes).await;
            report.writes += writes;
            match result {
                Ok(Some((arn, version))) => {
                    if let Some(arn) = arn {
                        report.policy_arn = Some(arn);
                    }
                    report.policy_version_id = Some(version);
                }
                Ok(None) => {}
                Err(e) => {
                    report.plan = the_plan;
                    report.outcome = SyncOutcome::Failed(e);
                    return Ok(report);
                }
            }
        }

        let mut progress = SyncProgress {
            seen: desired.len(),
            attached: desired.intersection(&observed.attached).count(),
            remaining: the_plan.attach.len(),
        };
        journal.progress(&progress);
        let attached = self
            .apply_all(
                name,
                &the_plan.attach,
                Op::Attach,
                journal,
                Some(&mut progress),
            )
            .await;
        let detached = self
            .apply_all(name, &the_plan.detach, Op::Detach, journal, None)
            .await;
        let interrupted = !attached.skipped.is_empty() || !detached.skipped.is_empty();
        report.writes += attached.calls + detached.calls;
        let mut failed_attach: BTreeSet<String> =
            attached.failures.iter().map(|f| f.target.clone()).collect();
        failed_attach.extend(attached.skipped);
        report.failures.extend(attached.failures);
        let failed_detach: BTreeSet<String> =
            detached.failures.iter().map(|f| f.target.clone()).collect();
        report.detach_failures = detached.failures;
        report.failures.sort_by(|a, b| a.target.cmp(&b.target));
        report
            .detach_failures
            .sort_by(|a, b| a.target.cmp(&b.target));
        report.attached = desired
            .iter()
            .filter(|t| observed.attached.contains(*t) || !failed_attach.contains(*t))
            .count();

        // Remember what this binding now answers for. Targets whose detach failed stay
        // remembered so the next sync tries again.
        let mut next_targets: BTreeSet<String> = if deleting {
            BTreeSet::new()
        } else {
            input.targets.iter().cloned().collect()
        };
        let mut next_pools: BTreeSet<String> = if deleting {
            BTreeSet::new()
        } else {
            input.pools.iter().cloned().collect()
        };
        for t in &failed_detach {
            if input.memory.targets.contains(t) {
                next_targets.insert(t.clone());
            }
            for pool in &input.memory.pools {
                if pools[pool].contains(t) {
                    next_pools.insert(pool.clone());
                }
            }
        }
        if !report.failures.is_empty() || !report.detach_failures.is_empty() {
            report.outcome = SyncOutcome::PartiallyAttached;
        }
        if interrupted {
            // The record written before the attaches (or the one read) covers what changed.
            report.outcome = SyncOutcome::Interrupted;
            report.plan = the_plan;
            return Ok(report);
        }
        let next = Memory {
            targets: next_targets,
            pools: next_pools,
            foreign: the_plan.foreign.clone(),
        };
        if next != report.memory {
            match journal.record(&next).await {
                Ok(()) => report.memory = next,
                Err(e) => report.outcome = SyncOutcome::NotRecorded(e),
            }
        }
        report.plan = the_plan;
        Ok(report)
    }

    /// Attaches (or detaches) each target, `concurrency` at a time, weighted by their number for
    /// the rate limiter. Already attached counts as
    /// success for an attach, not attached for a detach. Targets are taken one by one as calls
    /// finish (nothing is built per target up front: a pool can hold a million), and with
    /// `progress` each finished attach is told to the journal.
    async fn apply_all<J: Journal>(
        &self,
        policy: &str,
        targets: &[String],
        op: Op,
        journal: &J,
        mut progress: Option<&mut SyncProgress>,
    ) -> Applied {
        // Calls of a sync with much to do wait while smaller syncs' calls are served (see
        // `crate::ratelimit`), so a first sync of a large pool does not hold up other bindings.
        let weight = targets.len() as u64;
        let mut pending = futures::stream::FuturesUnordered::new();
        let mut queue = targets.iter();
        let mut applied = Applied::default();
        loop {
            while pending.len() < self.concurrency {
                match queue.next() {
                    Some(t) => pending.push(crate::ratelimit::with_weight(
                        weight,
                        self.apply_one(policy, t, op, journal),
                    )),
                    None => break,
                }
            }
            let Some((target, r)) = pending.next().await else {
                break;
            };
            let ok = matches!(r, Some(Ok(())));
            match r {
                Some(Ok(())) => applied.calls += 1,
                Some(Err(error)) => {
                    applied.calls += 1;
                    applied.failures.push(TargetError {
                        target: target.clone(),
                        error,
                    });
                }
                None => applied.skipped.push(target.clone()),
            }
            if let Some(p) = progress.as_deref_mut() {
                p.remaining = p.remaining.saturating_sub(1);
                if ok {
                    p.attached += 1;
                }
                journal.progress(p);
            }
        }
        applied
    }

    /// One attach or detach; `None` when the journal reported an interruption first.
    async fn apply_one<'t, J: Journal>(
        &self,
        policy: &str,
        target: &'t String,
        op: Op,
        journal: &J,
    ) -> (&'t String, Option<Result<(), AwsError>>) {
        if journal.interrupted() {
            return (target, None);
        }
        let r = match op {
            Op::Attach => match self.api.attach(policy, target).await {
                Err(e) if e.kind == AwsErrorKind::AlreadyExists => Ok(()),
                r => r,
            },
            Op::Detach => match self.api.detach(policy, target).await {
                Err(e) if e.kind == AwsErrorKind::NotFound => Ok(()),
                r => r,
            },
        };
        (target, Some(r))
    }

    /// Deletes the policy if no target has it: its non-default versions first (AWS refuses to
    /// delete a policy that has any), then the policy. A policy still attached is kept and
    /// reported with who has it. AWS may refuse with `Conflict` for a few minutes after the last
    /// detach; the caller retries.
    pub async fn delete_policy_if_unused(&self, name: &str) -> Result<PolicyRemoval, AwsError> {
        if self.api.get_policy(name).await?.is_none() {
            return Ok(PolicyRemoval::Gone);
        }
        let targets = self.api.list_targets(name).await?.items;
        if !targets.is_empty() {
            return Ok(PolicyRemoval::InUse {
                total: targets.len(),
                targets: targets.into_iter().take(IN_USE_NAMED).collect(),
            });
        }
        let mut versions = 0;
        for v in self.api.list_policy_versions(name).await? {
            if v.is_default {
                continue;
            }
            match self.api.delete_policy_version(name, &v.version_id).await {
                Ok(()) => versions += 1,
                Err(e) if e.kind == AwsErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        match self.api.delete_policy(name).await {
            Ok(()) => Ok(PolicyRemoval::Deleted { versions }),
            Err(e) if e.kind == AwsErrorKind::NotFound => Ok(PolicyRemoval::Gone),
            Err(e) => Err(e),
        }
    }

    /// Creates the policy or a new default version; returns (new arn, default version id) when
    /// something changed.
    async fn apply_policy(
        &self,
        name: &str,
        doc: &str,
        plan: &Plan,
        writes: &mut u32,
    ) -> Result<Option<(Option<String>, String)>, AwsError> {
        if plan.create_policy {
            *writes += 1;
            return match self.api.create_policy(name, doc).await {
                Ok((arn, version)) => Ok(Some((Some(arn), version))),
                // Created concurrently: the next sync compares documents.
                Err(e) if e.kind == AwsErrorKind::AlreadyExists => Ok(None),
                Err(e) => Err(e),
            };
        }
        if plan.create_version {
            for version in &plan.prune_versions {
                *writes += 1;
                match self.api.delete_policy_version(name, version).await {
                    Ok(()) => {}
                    Err(e) if e.kind == AwsErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
            *writes += 1;
            let version = self.api.create_policy_version(name, doc).await?;
            return Ok(Some((None, version)));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    //! The journal's order against an in-memory AWS (`FakeAws`): exact call sequences, which no
    //! real peer reports.
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::policy::fake::FakeAws;

    /// Keeps the last record like a durable store would, logs each write into the fake's log,
    /// and reports an interruption once `stop_after` AWS writes were made.
    struct TestJournal {
        durable: Mutex<Memory>,
        log: Arc<Mutex<Vec<String>>>,
        fail: bool,
        stop_after: Option<usize>,
    }

    impl TestJournal {
        fn new(fake: &FakeAws, memory: Memory) -> Self {
            Self {
                durable: Mutex::new(memory),
                log: fake.log(),
                fail: false,
                stop_after: None,
            }
        }

        fn durable(&self) -> Memory {
            self.durable.lock().unwrap().clone()
        }
    }

    impl Journal for TestJournal {
        async fn record(&self, memory: &Memory) -> Result<(), JournalError> {
            if self.fail {
                return Err(JournalError::Write {
                    place: "test journal".into(),
                    source: crate::error::Source::message("disk full"),
                });
            }
            *self.durable.lock().unwrap() = memory.clone();
            self.log.lock().unwrap().push(format!(
                "record targets={} pools={} foreign={}",
                memory.targets.len(),
                memory.pools.len(),
                memory.foreign.len()
            ));
            Ok(())
        }

        fn interrupted(&self) -> bool {
            let writes = self
                .log
                .lock()
                .unwrap()
                .iter()
                .filter(|l| !l.starts_with("record"))
                .count();
            self.stop_after.is_some_and(|n| writes >= n)
        }
    }

    fn ids(prefix: &str, n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("us-east-1:{prefix}{i:07}-0000-4000-8000-000000000000"))
            .collect()
    }

    /// One applying sync of `targets` and `pools` with what `journal` holds, no peers.
    async fn apply(
        engine: &PolicyEngine<FakeAws>,
        targets: &[String],
        pools: &[&str],
        journal: &TestJournal,
    ) -> SyncReport {
        engine
            .sync_recorded(
                &input(targets, pools, journal.durable()),
                &Protection::default(),
                SyncMode::Apply,
                false,
                journal,
            )
            .await
    }

    fn input(targets: &[String], pools: &[&str], memory: Memory) -> BindingInput {
        BindingInput {
            policy_name: "p".into(),
            targets: targets.to_vec(),
            pools: pools.iter().map(|p| p.to_string()).collect(),
            memory,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn the_record_is_written_before_the_first_attach() {
        let fake = FakeAws::default();
        fake.create_policy_now("p");
        let pool = ids("a", 5);
        fake.add_identities("pool", pool.clone());
        fake.attach_now("p", &pool[0]); // had it before: foreign
        let engine = PolicyEngine::new(fake.clone(), 1);
        let journal = TestJournal::new(&fake, Memory::default());
        let report = apply(&engine, &[], &["pool"], &journal).await;
        assert_eq!(report.outcome, SyncOutcome::Synced);
        let log = fake.log().lock().unwrap().clone();
        assert_eq!(log[0], "record targets=0 pools=1 foreign=1", "{log:?}");
        assert_eq!(log.len(), 5, "one record, then four attaches: {log:?}");
        assert!(log[1..].iter().all(|l| l.starts_with("AttachPolicy")));
        assert_eq!(journal.durable(), report.memory);
    }

    /// Progress as a watcher sees it: identities counted page by page while the pool is
    /// listed, then every desired target with what is attached and what remains, down to 0.
    #[tokio::test]
    async fn progress_counts_pages_then_attaches() {
        struct Watch(Mutex<Vec<SyncProgress>>);
        impl Journal for Watch {
            async fn record(&self, _memory: &Memory) -> Result<(), JournalError> {
                Ok(())
            }
            fn progress(&self, p: &SyncProgress) {
                self.0.lock().unwrap().push(*p);
            }
        }
        let fake = FakeAws::default();
        fake.create_policy_now("p");
        let pool = ids("g", 150); // three pages of 60, 60 and 30
        fake.add_identities("pool", pool.clone());
        for id in &pool[..50] {
            fake.attach_now("p", id);
        }
        let engine = PolicyEngine::new(fake.clone(), 4);
        let watch = Watch(Mutex::new(Vec::new()));
        let report = engine
            .sync_recorded(
                &input(&[], &["pool"], Memory::default()),
                &Protection::default(),
                SyncMode::Apply,
                false,
                &watch,
            )
            .await;
        assert_eq!(report.outcome, SyncOutcome::Synced);
        let seen = watch.0.lock().unwrap().clone();
        let listing: Vec<usize> = seen.iter().take(3).map(|p| p.seen).collect();
        assert_eq!(listing, [60, 120, 150], "page by page");
        assert_eq!(
            seen[3],
            SyncProgress {
                seen: 150,
                attached: 50,
                remaining: 100
            },
            "planned"
        );
        assert_eq!(seen.len(), 4 + 100, "one report per attach");
        assert!(seen[3..].windows(2).all(|w| w[1].attached == w[0].attached + 1
            && w[1].remaining + 1 == w[0].remaining));
        assert_eq!(
            *seen.last().unwrap(),
            SyncProgress {
                seen: 150,
                attached: 150,
                remaining: 0
            }
        );
    }

    #[tokio::test]
    async fn nothing_is_attached_when_the_record_fails() {
        let fake = FakeAws::default();
        fake.create_policy_now("p");
        let engine = PolicyEngine::new(fake.clone(), 4);
        let mut journal = TestJournal::new(&fake, Memory::default());
        journal.fail = true;
        let report = apply(&engine, &ids("b", 3), &[], &journal).await;
        assert!(
            matches!(report.outcome, SyncOutcome::NotRecorded(_)),
            "{:?}",
            report.outcome
        );
        assert!(fake.attached("p").is_empty());
        assert_eq!(report.memory, Memory::default());
    }

    #[tokio::test]
    async fn an_interruption_stops_between_calls_and_keeps_the_record_that_covers_them() {
        let fake = FakeAws::default();
        fake.create_policy_now("p");
        let engine = PolicyEngine::new(fake.clone(), 1);
        let mut journal = TestJournal::new(&fake, Memory::default());
        journal.stop_after = Some(2);
        let targets = ids("c", 6);
        let report = apply(&engine, &targets, &[], &journal).await;
        assert_eq!(report.outcome, SyncOutcome::Interrupted);
        assert_eq!(fake.attached("p").len(), 2);
        let durable = journal.durable();
        assert!(
            fake.attached("p")
                .iter()
                .all(|t| durable.targets.contains(t))
        );
        assert_eq!(report.memory, durable);
    }

    /// Crashes a sync after every possible number of AWS writes (only the durable record
    /// survives), then removes every target: each pair the binding attached is gone and each
    /// pair it found is still there.
    #[tokio::test]
    async fn a_crash_after_any_call_leaves_no_pair_behind_and_takes_no_foreign_pair() {
        let pool = ids("d", 7);
        let explicit = ids("e", 4);
        let foreign = [pool[2].clone(), explicit[1].clone()];
        // Steps a binding goes through; each is crashed at every point.
        let steps: Vec<(Vec<String>, Vec<&str>)> = vec![
            (explicit[..2].to_vec(), vec!["pool"]),
            (explicit[1..].to_vec(), vec![]),
            (explicit[..1].to_vec(), vec!["pool"]),
        ];
        for (step, _) in steps.iter().enumerate() {
            for crash_after in 0..=12 {
                let fake = FakeAws::default();
                fake.create_policy_now("p");
                fake.add_identities("pool", pool.clone());
                for f in &foreign {
                    fake.attach_now("p", f);
                }
                let engine = PolicyEngine::new(fake.clone(), 1);
                let mut memory = Memory::default();
                // The steps before this one ran to completion.
                for (targets, pools) in &steps[..step] {
                    let j = TestJournal::new(&fake, memory.clone());
                    let r = apply(&engine, targets, pools, &j).await;
                    assert_eq!(r.outcome, SyncOutcome::Synced);
                    memory = j.durable();
                }
                // This one crashes.
                let (targets, pools) = &steps[step];
                let mut j = TestJournal::new(&fake, memory.clone());
                let earlier_writes = fake
                    .log()
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|l| !l.starts_with("record"))
                    .count();
                j.stop_after = Some(earlier_writes + crash_after);
                apply(&engine, targets, pools, &j).await;
                // A new process removes every target.
                let last = TestJournal::new(&fake, j.durable());
                let r = apply(&engine, &[], &[], &last).await;
                assert_eq!(
                    r.outcome,
                    SyncOutcome::Synced,
                    "step {step}, crash after {crash_after}"
                );
                let left: BTreeSet<String> = fake.attached("p");
                let want: BTreeSet<String> = foreign.iter().cloned().collect();
                assert_eq!(
                    left, want,
                    "step {step}, crash after {crash_after} AWS write(s)"
                );
                assert!(last.durable().targets.is_empty() && last.durable().pools.is_empty());
            }
        }
    }
}
