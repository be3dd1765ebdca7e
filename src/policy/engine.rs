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

/// What writing the managed document made: the policy's ARN (when created) and its new
/// default version.
struct WrittenPolicy {
    arn: Option<String>,
    version_id: String,
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
        let mut sync = Sync {
            engine: self,
            input,
            protection,
            deleting,
            journal,
            reads: 0,
            document: input.document.as_ref().map(canonical_json),
            pools: BTreeMap::new(),
        };
        match sync.run(mode).await {
            Ok(report) => report,
            Err(error) => {
                let mut r = SyncReport::new(input, SyncOutcome::Failed(error));
                r.reads = sync.reads;
                r
            }
        }
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
    ) -> Result<Option<WrittenPolicy>, AwsError> {
        if plan.create_policy {
            *writes += 1;
            return match self.api.create_policy(name, doc).await {
                Ok((arn, version_id)) => Ok(Some(WrittenPolicy {
                    arn: Some(arn),
                    version_id,
                })),
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
            let version_id = self.api.create_policy_version(name, doc).await?;
            return Ok(Some(WrittenPolicy {
                arn: None,
                version_id,
            }));
        }
        Ok(None)
    }
}

/// One sync of one binding, step by step: observe, plan, record, apply, remember. Counts its
/// reads as it goes (a failed call counts too), so that a failure still reports them.
struct Sync<'a, A, J> {
    engine: &'a PolicyEngine<A>,
    input: &'a BindingInput,
    protection: &'a Protection,
    deleting: bool,
    journal: &'a J,
    reads: u32,
    /// The managed document, canonical.
    document: Option<String>,
    /// The identities of every pool listed so far.
    pools: BTreeMap<String, BTreeSet<String>>,
}

/// What the sync saw, and what follows from it.
struct Observation {
    observed: Observed,
    /// Targets the binding wants now (pools expanded; none when deleting).
    desired: BTreeSet<String>,
    /// Targets the binding attached before (remembered pools expanded).
    applied: BTreeSet<String>,
    /// Pools that do not exist (they count as empty).
    missing_pools: Vec<TargetError>,
}

/// What the AWS writes of a sync left undone.
struct Outcome {
    failed_detach: BTreeSet<String>,
    interrupted: bool,
}

impl<A: IotApi, J: Journal> Sync<'_, A, J> {
    async fn run(&mut self, mode: SyncMode) -> Result<SyncReport, AwsError> {
        let Some(observation) = self.observe().await? else {
            return Ok(self.no_policy(mode).await);
        };
        let the_plan = self.plan(&observation).await?;
        let Observation {
            observed,
            desired,
            missing_pools,
            ..
        } = observation;
        let mut report = SyncReport::new(self.input, SyncOutcome::Synced);
        report.reads = self.reads;
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
        match self.record_intent(&the_plan).await {
            Ok(intent) => report.memory = intent,
            Err(e) => {
                report.plan = the_plan;
                report.outcome = SyncOutcome::NotRecorded(e);
                return Ok(report);
            }
        }
        let done = self
            .apply(&the_plan, &observed, &desired, &mut report)
            .await;
        report.plan = the_plan;
        let Some(done) = done else {
            return Ok(report);
        };
        if !report.failures.is_empty() || !report.detach_failures.is_empty() {
            report.outcome = SyncOutcome::PartiallyAttached;
        }
        if done.interrupted {
            // The record written before the attaches (or the one read) covers what changed.
            report.outcome = SyncOutcome::Interrupted;
            return Ok(report);
        }
        self.remember(&done, &mut report).await;
        Ok(report)
    }

    /// Reads the policy, its targets and the pools involved. `None`: the policy does not exist
    /// and this sync will not create it.
    async fn observe(&mut self) -> Result<Option<Observation>, AwsError> {
        let (api, input, deleting) = (&self.engine.api, self.input, self.deleting);
        let name = input.policy_name.as_str();
        self.reads += 1;
        let info = api.get_policy(name).await?;
        if info.is_none() && (self.document.is_none() || deleting) {
            return Ok(None);
        }
        let mut observed = Observed::default();
        if let Some(info) = &info {
            let canonical = canonical_from_str(&info.document);
            let versions = match &self.document {
                Some(doc) if !deleting && canonical.as_deref() != Some(doc.as_str()) => {
                    self.reads += 1;
                    api.list_policy_versions(name).await?
                }
                _ => Vec::new(),
            };
            observed.policy = Some(ObservedPolicy {
                arn: info.arn.clone(),
                default_version_id: info.default_version_id.clone(),
                canonical_document: canonical,
                versions,
            });
            let targets = api
                .list_targets(name)
                .await
                .inspect_err(|_| self.reads += 1)?;
            self.reads += targets.pages;
            observed.attached = targets.items;
        }
        let mut missing_pools = Vec::new();
        let wanted_pools: &[String] = if deleting { &[] } else { &input.pools };
        let to_list: Vec<String> = wanted_pools
            .iter()
            .chain(&input.memory.pools)
            .cloned()
            .collect();
        self.engine
            .list_pools(
                to_list,
                &mut self.pools,
                &mut self.reads,
                &mut missing_pools,
                self.journal,
            )
            .await?;
        let mut desired: BTreeSet<String> = BTreeSet::new();
        if !deleting {
            desired.extend(input.targets.iter().cloned());
            for pool in &input.pools {
                desired.extend(self.pools[pool].iter().cloned());
            }
        }
        let mut applied: BTreeSet<String> = input.memory.targets.clone();
        for pool in &input.memory.pools {
            applied.extend(self.pools[pool].iter().cloned());
        }
        Ok(Some(Observation {
            observed,
            desired,
            applied,
            missing_pools,
        }))
    }

    /// No policy, and none to create: nothing can be attached. Deleting, nothing is left to
    /// answer for either.
    async fn no_policy(&self, mode: SyncMode) -> SyncReport {
        let outcome = if self.deleting {
            SyncOutcome::Synced
        } else {
            SyncOutcome::PolicyNotFound
        };
        let mut r = SyncReport::new(self.input, outcome);
        r.reads = self.reads;
        if self.deleting && mode == SyncMode::Apply {
            r.memory = Memory::default();
            if let Err(e) = self.journal.record(&r.memory).await {
                r.memory = self.input.memory.clone();
                r.outcome = SyncOutcome::NotRecorded(e);
            }
        }
        r
    }

    /// The plan; when it detaches and other bindings protect pools, those pools are listed
    /// (only then is it worth it) and the plan made again with them protected.
    async fn plan(&mut self, o: &Observation) -> Result<Plan, AwsError> {
        let base = PlanInput {
            desired: &o.desired,
            previously_applied: &o.applied,
            foreign: &self.input.memory.foreign,
            protected: &self.protection.targets,
            document: self.document.as_deref(),
            deleting: self.deleting,
        };
        let first = plan(base, &o.observed);
        if first.detach.is_empty() || self.protection.pools.is_empty() {
            return Ok(first);
        }
        let others: Vec<String> = self.protection.pools.iter().cloned().collect();
        self.engine
            .list_pools(
                others,
                &mut self.pools,
                &mut self.reads,
                &mut Vec::new(),
                &NoJournal,
            )
            .await?;
        let widened: BTreeSet<String> = self
            .protection
            .targets
            .iter()
            .chain(
                self.protection
                    .pools
                    .iter()
                    .flat_map(|p| self.pools[p].iter()),
            )
            .cloned()
            .collect();
        Ok(plan(
            PlanInput {
                protected: &widened,
                ..base
            },
            &o.observed,
        ))
    }

    /// Records, before anything is attached, the union of what was remembered and what this
    /// sync may attach: a crash from here on leaves every such pair covered by the record.
    /// Returns what the binding answers for from now on.
    async fn record_intent(&self, the_plan: &Plan) -> Result<Memory, JournalError> {
        let input = self.input;
        if the_plan.attach.is_empty() {
            return Ok(input.memory.clone());
        }
        let wanted = Memory {
            targets: if self.deleting {
                BTreeSet::new()
            } else {
                input.targets.iter().cloned().collect()
            },
            pools: if self.deleting {
                BTreeSet::new()
            } else {
                input.pools.iter().cloned().collect()
            },
            foreign: the_plan.foreign.clone(),
        };
        let mut intent = input.memory.union(&wanted);
        // What this sync attaches is the binding's, whatever it was before.
        for t in &the_plan.attach {
            intent.foreign.remove(t);
        }
        if intent != input.memory {
            self.journal.record(&intent).await?;
        }
        Ok(intent)
    }

    /// The AWS writes: the policy first, then attachments and detachments, into `report`.
    /// `None` when writing the policy failed (`report` says so).
    async fn apply(
        &self,
        the_plan: &Plan,
        observed: &Observed,
        desired: &BTreeSet<String>,
        report: &mut SyncReport,
    ) -> Option<Outcome> {
        let (engine, name) = (self.engine, self.input.policy_name.as_str());
        if let Some(doc) = &self.document {
            let mut writes = 0;
            let result = engine.apply_policy(name, doc, the_plan, &mut writes).await;
            report.writes += writes;
            match result {
                Ok(Some(written)) => {
                    if let Some(arn) = written.arn {
                        report.policy_arn = Some(arn);
                    }
                    report.policy_version_id = Some(written.version_id);
                }
                Ok(None) => {}
                Err(e) => {
                    report.outcome = SyncOutcome::Failed(e);
                    return None;
                }
            }
        }
        let mut progress = SyncProgress {
            seen: desired.len(),
            attached: desired.intersection(&observed.attached).count(),
            remaining: the_plan.attach.len(),
        };
        self.journal.progress(&progress);
        let attached = engine
            .apply_all(
                name,
                &the_plan.attach,
                Op::Attach,
                self.journal,
                Some(&mut progress),
            )
            .await;
        let detached = engine
            .apply_all(name, &the_plan.detach, Op::Detach, self.journal, None)
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
        Some(Outcome {
            failed_detach,
            interrupted,
        })
    }

    /// Records what the binding answers for now. Targets whose detach failed stay remembered
    /// (with their pools) so that the next sync tries again.
    async fn remember(&self, done: &Outcome, report: &mut SyncReport) {
        let input = self.input;
        let (mut targets, mut pools): (BTreeSet<String>, BTreeSet<String>) = if self.deleting {
            Default::default()
        } else {
            (
                input.targets.iter().cloned().collect(),
                input.pools.iter().cloned().collect(),
            )
        };
        for t in &done.failed_detach {
            if input.memory.targets.contains(t) {
                targets.insert(t.clone());
            }
            for pool in &input.memory.pools {
                if self.pools[pool].contains(t) {
                    pools.insert(pool.clone());
                }
            }
        }
        let next = Memory {
            targets,
            pools,
            foreign: report.plan.foreign.clone(),
        };
        if next != report.memory {
            match self.journal.record(&next).await {
                Ok(()) => report.memory = next,
                Err(e) => report.outcome = SyncOutcome::NotRecorded(e),
            }
        }
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
