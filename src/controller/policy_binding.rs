//! IotPolicyBinding controller: validate -> engine sync -> status and Events. Deletion detaches
//! through the finalizer.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::{Api, ResourceExt};

use super::events::publish;
use super::ledger::{BindingJournal, ProgressBoard, RecordKey};
use super::{Context, Error, MANAGER, ReconcileTimer, object_key};
use crate::api::SyncProgressStatus;
use crate::api::common::now_rfc3339;
use crate::api::policy_binding::MAX_STATUS_FAILURES;
use crate::api::{
    Condition, ConditionStatus, DeletionPolicy, FINALIZER, IotPolicyBinding,
    IotPolicyBindingStatus, RecordStatus, SpecError, TargetFailure,
};
use crate::policy::SyncProgress;
use crate::policy::canonical::canonical_json;
use crate::policy::conflict::{DocumentClaim, earlier_conflict};
use crate::policy::{
    Memory, PolicyEngine, PolicyRemoval, Protection, SyncMode, SyncOutcome, SyncReport,
};
use crate::tenancy::NotAllowed;

pub const CONTROLLER: &str = "iotpolicybinding";
/// How soon a binding whose policy is missing is looked at again.
const POLICY_NOT_FOUND_RETRY: Duration = Duration::from_secs(60);
const PROPAGATION_NOTE: &str =
    "AWS IoT takes 6-8 minutes to apply policy changes to connected clients.";

/// The controller's entry point: malformed objects are reported, the others reconciled.
pub async fn reconcile_guarded(
    obj: Arc<DeserializeGuard<IotPolicyBinding>>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    if !ctx.gate.is_open() {
        // The lease is not valid now. Deposed, this controller is about to stop (the new leader
        // reconciles); lapsed, the same term may carry on: look again then, so that a change
        // seen meanwhile is not dropped.
        return Ok(Action::requeue(super::GATE_SHUT_RETRY));
    }
    match &obj.0 {
        Ok(b) => reconcile(Arc::new(b.clone()), ctx).await,
        Err(invalid) => {
            super::malformed::report::<IotPolicyBinding>(&obj, invalid, &ctx, CONTROLLER).await
        }
    }
}

/// Reconciles one binding; every log line inside names it (`binding`, from this span).
#[tracing::instrument(name = "reconcile", skip_all, fields(binding = %object_key(obj.as_ref())))]
pub async fn reconcile(obj: Arc<IotPolicyBinding>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ReconcileTimer::start(&ctx.metrics, CONTROLLER);
    let ns = obj.namespace().unwrap_or_default();
    let api: Api<IotPolicyBinding> = Api::namespaced(ctx.client.clone(), &ns);
    let key = object_key(obj.as_ref());
    let result = finalizer(&api, FINALIZER, obj, |event| async {
        match event {
            FinalizerEvent::Apply(o) => apply(&o, &api, &ctx).await,
            FinalizerEvent::Cleanup(o) => {
                let done = cleanup(&o, &ctx).await;
                if done.is_ok() {
                    ctx.metrics.forget_binding(&metric_key(o.as_ref()));
                    ctx.role_checks.forget(&metric_key(o.as_ref()));
                }
                done
            }
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    if result.is_ok() {
        ctx.backoff.reset(&key);
    }
    result
}

/// A binding's `binding` label in metrics: `namespace/name`, as a bridge's `bridge` label.
fn metric_key(obj: &IotPolicyBinding) -> String {
    format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())
}

fn ready(
    status: ConditionStatus,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
) -> Condition {
    Condition::new("Ready", status, reason, message, generation)
}

/// Writes the whole status with server-side apply; emits an Event when `Ready` changes.
async fn write_status(
    api: &Api<IotPolicyBinding>,
    obj: &IotPolicyBinding,
    ctx: &Context,
    status: IotPolicyBindingStatus,
    ready_condition: Condition,
) -> Result<(), Error> {
    write_status_with(api, obj, ctx, status, ready_condition, RoleCondition::Keep).await
}

/// How often a running sync's progress is written to status at most.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(10);
/// The field manager of `status.progress`: the main manager's applies leave it alone.
const PROGRESS_MANAGER: &str = "iot-operator-progress";

/// Runs `sync`, writing its progress to `status.progress` every [`PROGRESS_INTERVAL`] while it
/// runs (a sync that ends sooner writes none), and removing it at the end.
async fn with_progress<F: std::future::Future<Output = SyncReport>>(
    sync: F,
    board: &ProgressBoard,
    api: &Api<IotPolicyBinding>,
    obj: &IotPolicyBinding,
    ctx: &Context,
) -> SyncReport {
    tokio::pin!(sync);
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + PROGRESS_INTERVAL,
        PROGRESS_INTERVAL,
    );
    let mut written: Option<SyncProgress> = None;
    let report = loop {
        tokio::select! {
            report = &mut sync => break report,
            _ = tick.tick() => {
                let latest = board.latest();
                if latest.is_some() && latest != written {
                    match write_progress(api, obj, ctx, latest.as_ref()).await {
                        Ok(()) => written = latest,
                        Err(e) => tracing::debug!(error = %e, "writing progress failed"),
                    }
                }
            }
        }
    };
    if written.is_some()
        && let Err(e) = write_progress(api, obj, ctx, None).await
    {
        tracing::debug!(error = %e, "removing progress failed");
    }
    report
}

/// Applies `status.progress` (`None`: removes it) with its own field manager.
async fn write_progress(
    api: &Api<IotPolicyBinding>,
    obj: &IotPolicyBinding,
    ctx: &Context,
    progress: Option<&SyncProgress>,
) -> Result<(), kube::Error> {
    if !ctx.gate.is_open() {
        return Ok(());
    }
    let status = match progress {
        Some(p) => serde_json::json!({ "progress": SyncProgressStatus {
            seen: p.seen as i64,
            attached: p.attached as i64,
            remaining: p.remaining as i64,
            updated: now_rfc3339(),
        }}),
        None => serde_json::json!({}),
    };
    super::apply_status(api, &obj.name_any(), PROGRESS_MANAGER, &status)
        .await
        .map(|_| ())
}

/// What a status write does with the `RoleAllowsIot` condition.
enum RoleCondition {
    /// Leave it as it is (the check did not run).
    Keep,
    Set(Condition),
    /// The binding has no pools: the check does not apply.
    Clear,
}

/// [`write_status`], also setting or clearing `RoleAllowsIot` (with an Event when it changes).
async fn write_status_with(
    api: &Api<IotPolicyBinding>,
    obj: &IotPolicyBinding,
    ctx: &Context,
    mut status: IotPolicyBindingStatus,
    ready_condition: Condition,
    role: RoleCondition,
) -> Result<(), Error> {
    let previous = obj
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let before = Condition::find(&previous, "Ready").map(|c| (c.status, c.reason.clone()));
    let role_before =
        Condition::find(&previous, ROLE_CONDITION).map(|c| (c.status, c.message.clone()));
    status.conditions = previous;
    Condition::upsert(&mut status.conditions, ready_condition.clone());
    let role_event = match role {
        RoleCondition::Keep => None,
        RoleCondition::Clear => {
            status.conditions.retain(|c| c.type_ != ROLE_CONDITION);
            None
        }
        RoleCondition::Set(c) => {
            let changed = role_before != Some((c.status, c.message.clone()));
            Condition::upsert(&mut status.conditions, c.clone());
            changed.then_some(c)
        }
    };
    status.observed_generation = obj.metadata.generation;
    // Progress has a field manager of its own (see `write_progress`).
    status.progress = None;
    if !ctx.gate.is_open() {
        tracing::debug!("not leading: status not written");
        return Ok(());
    }
    super::apply_status(api, &obj.name_any(), MANAGER, &status).await?;
    ctx.metrics.binding_ready(
        &metric_key(obj),
        ready_condition.status == ConditionStatus::True,
    );
    if before != Some((ready_condition.status, ready_condition.reason.clone())) {
        let type_ = if ready_condition.status == ConditionStatus::True {
            EventType::Normal
        } else {
            EventType::Warning
        };
        publish(
            &ctx.recorder,
            obj,
            type_,
            &ready_condition.reason,
            "Sync",
            &ready_condition.message,
        )
        .await;
    }
    if let Some(c) = role_event {
        let type_ = if c.status == ConditionStatus::False {
            EventType::Warning
        } else {
            EventType::Normal
        };
        publish(
            &ctx.recorder,
            obj,
            type_,
            &c.reason,
            "CheckRoles",
            &c.message,
        )
        .await;
    }
    Ok(())
}

/// When each pool binding's Cognito roles were last checked, and for which generation. Roles
/// change rarely: a binding's are checked when its spec changes (or its condition is missing),
/// then at most once per [`Settings::role_check`](super::Settings::role_check). Kept in memory:
/// a new leader checks each binding once.
#[derive(Default)]
pub struct RoleChecks(std::sync::Mutex<std::collections::HashMap<String, RoleCheck>>);

/// One binding's last role check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoleCheck {
    pub generation: Option<i64>,
    pub at: std::time::Instant,
}

impl RoleChecks {
    fn last(&self, key: &str) -> Option<RoleCheck> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .copied()
    }

    fn done(&self, key: &str, check: RoleCheck) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_owned(), check);
    }

    fn forget(&self, key: &str) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }
}

/// Whether a binding's roles are checked on this sync: never checked here, its spec changed
/// since, its condition is missing, or `period` has passed.
pub fn role_check_due(
    last: Option<RoleCheck>,
    now: RoleCheck,
    has_condition: bool,
    period: Duration,
) -> bool {
    match last {
        None => true,
        Some(l) => {
            l.generation != now.generation
                || !has_condition
                || now.at.saturating_duration_since(l.at) >= period
        }
    }
}

/// The condition that says whether the pools' Cognito roles may use AWS IoT.
pub const ROLE_CONDITION: &str = "RoleAllowsIot";

/// Setup step 3 for the binding's identity pools (it has some): may their Cognito roles use
/// AWS IoT? Reads Cognito and IAM, never changes them. A failed check is `Unknown`, never an
/// error of the sync.
async fn check_roles(obj: &IotPolicyBinding, ctx: &Context, region: &str) -> Condition {
    let pools = &obj.spec.principals.cognito_identity_pools;
    let g = obj.metadata.generation;
    match ctx
        .aws
        .roles(Some(region), obj.spec.role_arn.as_deref())
        .await
    {
        Err(e) => Condition::new(
            ROLE_CONDITION,
            ConditionStatus::Unknown,
            "CheckFailed",
            e.to_string(),
            g,
        ),
        Ok(source) => match crate::policy::iam::check_pools(&source, pools).await {
            Err(e) => Condition::new(
                ROLE_CONDITION,
                ConditionStatus::Unknown,
                "CheckFailed",
                format!("the Cognito roles could not be read: {e}"),
                g,
            ),
            Ok(findings) => match crate::policy::iam::summarize(&findings) {
                (Some(true), m) => {
                    Condition::new(ROLE_CONDITION, ConditionStatus::True, "RolesAllowIot", m, g)
                }
                (Some(false), m) => {
                    Condition::new(ROLE_CONDITION, ConditionStatus::False, "RoleLacksIot", m, g)
                }
                (None, m) => Condition::new(
                    ROLE_CONDITION,
                    ConditionStatus::Unknown,
                    "RoleConditional",
                    m,
                    g,
                ),
            },
        },
    }
}

/// Status that keeps what the previous sync remembered (when nothing was synced).
fn carried_status(obj: &IotPolicyBinding) -> IotPolicyBindingStatus {
    let mut s = obj.status.clone().unwrap_or_default();
    s.conditions.clear();
    s
}

async fn apply(
    obj: &IotPolicyBinding,
    api: &Api<IotPolicyBinding>,
    ctx: &Context,
) -> Result<Action, Error> {
    let generation = obj.metadata.generation;
    if let Err(e) = obj.spec.validate() {
        return invalid(obj, api, ctx, e).await;
    }
    if let Err(e) = allowed(obj, ctx) {
        tracing::warn!(reason = %e, "not allowed by the tenancy rules");
        let cond = ready(
            ConditionStatus::False,
            "NotAllowed",
            e.to_string(),
            generation,
        );
        write_status(api, obj, ctx, carried_status(obj), cond).await?;
        // The rules change only with a restart, which reconciles everything again.
        return Ok(Action::await_change());
    }
    let region = match ctx.aws.resolve_region(obj.spec.region.as_deref()) {
        Ok(r) => r,
        Err(e) => {
            return invalid(obj, api, ctx, SpecError::new("spec.region", e.to_string())).await;
        }
    };
    let role = obj.spec.role_arn.as_deref();
    let peers = peers(ctx, obj, &region);

    if let Some(doc) = &obj.spec.policy.document {
        let mine = claim(obj, canonical_json(doc));
        let others: Vec<DocumentClaim> = peers
            .iter()
            .filter_map(|p| {
                p.spec
                    .policy
                    .document
                    .as_ref()
                    .map(|d| claim(p, canonical_json(d)))
            })
            .collect();
        if let Some(winner) = earlier_conflict(&mine, &others) {
            let msg = format!(
                "IotPolicyBinding {} already manages policy '{}' with a different document; this binding changes nothing until the documents agree or that binding is deleted",
                winner.key, obj.spec.policy.name
            );
            write_status(
                api,
                obj,
                ctx,
                carried_status(obj),
                ready(ConditionStatus::False, "PolicyConflict", msg, generation),
            )
            .await?;
            return Ok(Action::requeue(ctx.settings.resync));
        }
    }

    let client = ctx.aws.iot(Some(&region), role).await?;
    let engine = PolicyEngine::new(client.as_ref(), ctx.aws.settings().concurrency);
    let key = record_key(obj);
    let input =
        crate::convert::policy_binding::engine_input(&obj.spec, memory_of(obj, ctx, &key).await?);
    let board = ProgressBoard::new(ctx.metrics.clone(), metric_key(obj));
    let journal = BindingJournal::new(&ctx.ledger, key.clone(), &ctx.gate).with_progress(&board);
    let peers_protection = protection(&peers);
    let sync = engine.sync_recorded(&input, &peers_protection, SyncMode::Apply, false, &journal);
    let report = with_progress(sync, &board, api, obj, ctx).await;
    // The metrics keep where the sync ended.
    board.set(&SyncProgress {
        seen: report.desired,
        attached: report.attached,
        remaining: report.desired.saturating_sub(report.attached),
    });
    tracing::info!(
        policy = %obj.spec.policy.name,
        attach = report.plan.attach.len(),
        detach = report.plan.detach.len(),
        failures = report.failures.len(),
        reads = report.reads,
        writes = report.writes,
        "synced"
    );
    announce(obj, ctx, &report).await;
    let (condition, action) = outcome(&report, ctx, generation, &obj.spec.policy.name, &region);
    let record = RecordStatus {
        config_map: format!("{}/{}", ctx.ledger.namespace(), key.head()),
        targets: report.memory.targets.len() as i64,
        pools: report.memory.pools.len() as i64,
        foreign_targets: report.memory.foreign.len() as i64,
    };
    let now = RoleCheck {
        generation,
        at: std::time::Instant::now(),
    };
    let has_condition = obj
        .status
        .as_ref()
        .is_some_and(|s| Condition::find(&s.conditions, ROLE_CONDITION).is_some());
    let role = if matches!(report.outcome, SyncOutcome::Failed(_)) {
        RoleCondition::Keep
    } else if obj.spec.principals.cognito_identity_pools.is_empty() {
        RoleCondition::Clear
    } else if !role_check_due(
        ctx.role_checks.last(&metric_key(obj)),
        now,
        has_condition,
        ctx.settings.role_check,
    ) {
        RoleCondition::Keep
    } else {
        ctx.role_checks.done(&metric_key(obj), now);
        RoleCondition::Set(check_roles(obj, ctx, &region).await)
    };
    write_status_with(
        api,
        obj,
        ctx,
        status_from(&report, obj, record),
        condition,
        role,
    )
    .await?;
    match (&report.outcome, report.throttled()) {
        (SyncOutcome::Failed(e), _) => Err(Error::Aws(e.clone())),
        (SyncOutcome::NotRecorded(e), _) => Err(Error::Record(e.clone())),
        (_, true) => Err(Error::Aws(
            report
                .failures
                .iter()
                .chain(&report.detach_failures)
                .map(|f| f.error.clone())
                .next()
                .unwrap_or_else(|| {
                    crate::policy::AwsError::new(
                        crate::policy::AwsErrorKind::Throttled,
                        "Sync",
                        "",
                        "throttled",
                    )
                }),
        )),
        _ => Ok(action),
    }
}

async fn invalid(
    obj: &IotPolicyBinding,
    api: &Api<IotPolicyBinding>,
    ctx: &Context,
    e: SpecError,
) -> Result<Action, Error> {
    tracing::info!(error = %e, "invalid spec");
    let cond = ready(
        ConditionStatus::False,
        "InvalidSpec",
        e.to_string(),
        obj.metadata.generation,
    );
    write_status(api, obj, ctx, carried_status(obj), cond).await?;
    // Not retried until the spec changes.
    Ok(Action::await_change())
}

fn claim(obj: &IotPolicyBinding, document: String) -> DocumentClaim {
    DocumentClaim {
        key: format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any()),
        created: obj
            .metadata
            .creation_timestamp
            .as_ref()
            .map_or(i64::MAX, |t| t.0.as_second()),
        document,
    }
}

/// Other live bindings for the same policy in the same region and account (role).
/// Malformed bindings are not peers: what they want cannot be known.
fn peers(ctx: &Context, obj: &IotPolicyBinding, region: &str) -> Vec<Arc<IotPolicyBinding>> {
    let me = (obj.namespace(), obj.name_any());
    let wanted = |o: &IotPolicyBinding| {
        (o.namespace(), o.name_any()) != me
            && o.metadata.deletion_timestamp.is_none()
            && o.spec.policy.name == obj.spec.policy.name
            && o.spec.role_arn == obj.spec.role_arn
            && ctx
                .aws
                .resolve_region(o.spec.region.as_deref())
                .ok()
                .as_deref()
                == Some(region)
    };
    ctx.bindings
        .state()
        .iter()
        .filter_map(|g| g.0.as_ref().ok())
        .filter(|o| wanted(o))
        .map(|o| Arc::new(o.clone()))
        .collect()
}

/// What the peers want: the engine never detaches it.
fn protection(peers: &[Arc<IotPolicyBinding>]) -> Protection {
    let mut p = Protection::default();
    for peer in peers {
        p.targets.extend(peer.spec.explicit_targets());
        p.pools
            .extend(peer.spec.principals.cognito_identity_pools.iter().cloned());
    }
    p
}

fn outcome(
    report: &SyncReport,
    ctx: &Context,
    generation: Option<i64>,
    policy: &str,
    region: &str,
) -> (Condition, Action) {
    let resync = Action::requeue(ctx.settings.resync);
    match &report.outcome {
        SyncOutcome::Synced => (
            ready(
                ConditionStatus::True,
                "Attached",
                format!(
                    "The policy is attached to all {} target(s). {PROPAGATION_NOTE}",
                    report.desired
                ),
                generation,
            ),
            resync,
        ),
        SyncOutcome::PartiallyAttached => {
            let failed = report.failures.len() + report.detach_failures.len();
            let reason = if report.throttled() {
                "Throttled"
            } else {
                "PartiallyAttached"
            };
            (
                ready(
                    ConditionStatus::False,
                    reason,
                    format!(
                        "{} of {} target(s) attached; {failed} failed (see status.failures). {PROPAGATION_NOTE}",
                        report.attached, report.desired
                    ),
                    generation,
                ),
                resync,
            )
        }
        SyncOutcome::PolicyNotFound => (
            ready(
                ConditionStatus::False,
                "PolicyNotFound",
                format!(
                    "AWS IoT policy {policy:?} does not exist in {region}: create it, or set spec.policy.document to let the operator manage it"
                ),
                generation,
            ),
            Action::requeue(POLICY_NOT_FOUND_RETRY.min(ctx.settings.resync)),
        ),
        SyncOutcome::NotRecorded(e) => (
            ready(
                ConditionStatus::False,
                "RecordFailed",
                format!("{e}; nothing was attached without a record, retrying"),
                generation,
            ),
            resync,
        ),
        SyncOutcome::Interrupted => (
            ready(
                ConditionStatus::False,
                "Interrupted",
                "the sync stopped between calls; the next one finishes it",
                generation,
            ),
            resync,
        ),
        SyncOutcome::Failed(e) => (
            ready(
                ConditionStatus::False,
                e.kind.condition_reason(),
                e.to_string(),
                generation,
            ),
            resync,
        ),
    }
}

fn status_from(
    report: &SyncReport,
    obj: &IotPolicyBinding,
    record: RecordStatus,
) -> IotPolicyBindingStatus {
    let failures: Vec<TargetFailure> = report
        .failures
        .iter()
        .chain(&report.detach_failures)
        .take(MAX_STATUS_FAILURES)
        .map(|f| TargetFailure {
            target: f.target.clone(),
            reason: f.error.kind.reason().to_owned(),
            message: f.error.to_string(),
        })
        .collect();
    let synced = !matches!(report.outcome, SyncOutcome::Failed(_));
    let prev = obj.status.clone().unwrap_or_default();
    IotPolicyBindingStatus {
        observed_generation: obj.metadata.generation,
        conditions: Vec::new(),
        policy_arn: report.policy_arn.clone().or(prev.policy_arn),
        policy_version_id: report.policy_version_id.clone().or(prev.policy_version_id),
        desired_targets: report.desired as i64,
        attached_targets: report.attached as i64,
        failed_targets: (report.failures.len() + report.detach_failures.len()) as i64,
        failures,
        last_sync_time: if synced {
            Some(now_rfc3339())
        } else {
            prev.last_sync_time
        },
        record: Some(record),
        progress: None,
        // Moved to the record: written empty, so server-side apply drops them.
        applied_targets: Vec::new(),
        applied_pools: Vec::new(),
        foreign_targets: Vec::new(),
    }
}

/// Events and metrics for what a sync changed.
async fn announce(obj: &IotPolicyBinding, ctx: &Context, report: &SyncReport) {
    let plan = &report.plan;
    let failed: BTreeSet<&str> = report.failures.iter().map(|f| f.target.as_str()).collect();
    let attached = plan
        .attach
        .iter()
        .filter(|t| !failed.contains(t.as_str()))
        .count();
    if !plan.drift.is_empty() {
        ctx.metrics.drift_repairs.inc_by(plan.drift.len() as u64);
        publish(
            &ctx.recorder,
            obj,
            EventType::Warning,
            "DriftRepaired",
            "Attach",
            format!(
                "{} target(s) had lost the policy out of band and were attached again",
                plan.drift.len()
            ),
        )
        .await;
    }
    if plan.create_policy || plan.create_version {
        let what = if plan.create_policy {
            "created the policy"
        } else {
            "created a new default policy version"
        };
        publish(
            &ctx.recorder,
            obj,
            EventType::Normal,
            "PolicyUpdated",
            "UpdatePolicy",
            format!(
                "{what}; pruned {} old version(s)",
                plan.prune_versions.len()
            ),
        )
        .await;
    }
    if attached > 0 {
        publish(
            &ctx.recorder,
            obj,
            EventType::Normal,
            // Not "Attached": that is the Ready reason, whose transitions have their own Event.
            "TargetsAttached",
            "Attach",
            format!("attached the policy to {attached} target(s)"),
        )
        .await;
    }
    let detached = plan.detach.len() - report.detach_failures.len();
    if detached > 0 {
        publish(
            &ctx.recorder,
            obj,
            EventType::Normal,
            "TargetsDetached",
            "Detach",
            format!("detached the policy from {detached} target(s)"),
        )
        .await;
    }
}

/// Whether the tenancy rules let this binding's namespace use what it asks for.
fn allowed(obj: &IotPolicyBinding, ctx: &Context) -> Result<(), NotAllowed> {
    let ns = obj.namespace().unwrap_or_default();
    ctx.settings
        .tenancy
        .check_all(&ns, crate::tenancy::binding_requests(&obj.spec))
}

async fn cleanup(obj: &IotPolicyBinding, ctx: &Context) -> Result<Action, Error> {
    if obj.spec.deletion_policy == DeletionPolicy::Retain {
        ctx.ledger.remove(&record_key(obj)).await?;
        tracing::info!("deleted with deletionPolicy Retain: attachments left in place");
        return Ok(Action::await_change());
    }
    if let Err(e) = allowed(obj, ctx) {
        // Nothing changes in AWS for a binding outside its rules, not even on deletion.
        ctx.ledger.remove(&record_key(obj)).await?;
        tracing::warn!(reason = %e, "deleted while not allowed by the tenancy rules: AWS left unchanged");
        return Ok(Action::await_change());
    }
    let key = record_key(obj);
    let memory = memory_of(obj, ctx, &key).await?;
    let delete_policy = obj.spec.deletion_policy == DeletionPolicy::DeletePolicy;
    if memory.applies_nothing() && !delete_policy {
        // This binding answers for no pair: AWS is not called.
        ctx.ledger.remove(&key).await?;
        return Ok(Action::await_change());
    }
    let region = ctx.aws.resolve_region(obj.spec.region.as_deref())?;
    let peers = peers(ctx, obj, &region);
    let client = ctx
        .aws
        .iot(Some(&region), obj.spec.role_arn.as_deref())
        .await?;
    let engine = PolicyEngine::new(client.as_ref(), ctx.aws.settings().concurrency);
    // Detach what this binding answers for (if anything).
    if !memory.applies_nothing() {
        let input = crate::convert::policy_binding::engine_input(&obj.spec, memory);
        let journal = BindingJournal::new(&ctx.ledger, key.clone(), &ctx.gate);
        let report = engine
            .sync_recorded(&input, &protection(&peers), SyncMode::Apply, true, &journal)
            .await;
        announce(obj, ctx, &report).await;
        match report.outcome {
            SyncOutcome::Failed(e) => return Err(Error::Aws(e)),
            SyncOutcome::NotRecorded(e) => return Err(Error::Record(e)),
            SyncOutcome::Interrupted => {
                return Err(Error::Record(crate::policy::JournalError::NotLeading));
            }
            _ if !report.detach_failures.is_empty() => {
                return Err(Error::DetachIncomplete {
                    count: report.detach_failures.len(),
                });
            }
            _ => {
                tracing::info!(
                    detached = report.plan.detach.len(),
                    "binding deleted; attachments removed"
                )
            }
        }
    }
    if delete_policy {
        remove_policy(obj, ctx, &engine, &peers, &region).await?;
    }
    ctx.ledger.remove(&key).await?;
    Ok(Action::await_change())
}

/// `deletionPolicy: DeletePolicy`: the managed policy goes with its last binding, unless another
/// binding wants it or another target still has it; an Event says which.
async fn remove_policy<A: crate::policy::IotApi>(
    obj: &IotPolicyBinding,
    ctx: &Context,
    engine: &PolicyEngine<A>,
    peers: &[Arc<IotPolicyBinding>],
    region: &str,
) -> Result<(), Error> {
    let name = &obj.spec.policy.name;
    if !peers.is_empty() {
        let who: Vec<String> = peers
            .iter()
            .take(5)
            .map(|p| format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any()))
            .collect();
        let note = format!(
            "kept AWS IoT policy {name:?} in {region}: IotPolicyBinding {} still use{} it",
            who.join(", "),
            if peers.len() == 1 { "s" } else { "" }
        );
        publish(
            &ctx.recorder,
            obj,
            EventType::Normal,
            "PolicyKept",
            "DeletePolicy",
            note,
        )
        .await;
        return Ok(());
    }
    match engine.delete_policy_if_unused(name).await {
        Ok(PolicyRemoval::Deleted { versions }) => {
            let note = format!(
                "deleted AWS IoT policy {name:?} in {region} and {versions} older version(s)"
            );
            tracing::info!(policy = %name, versions, "policy deleted");
            publish(
                &ctx.recorder,
                obj,
                EventType::Normal,
                "PolicyDeleted",
                "DeletePolicy",
                note,
            )
            .await;
            Ok(())
        }
        Ok(PolicyRemoval::InUse { targets, total }) => {
            let more = total.saturating_sub(targets.len());
            let note = format!(
                "kept AWS IoT policy {name:?} in {region}: still attached to {total} target(s) this binding did not attach: {}{}",
                targets.join(", "),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                }
            );
            publish(
                &ctx.recorder,
                obj,
                EventType::Warning,
                "PolicyKept",
                "DeletePolicy",
                note,
            )
            .await;
            Ok(())
        }
        Ok(PolicyRemoval::Gone) => Ok(()),
        Err(e) => {
            if e.kind == crate::policy::AwsErrorKind::Conflict {
                tracing::info!(policy = %name, "AWS IoT still counts a detached target; deleting the policy again later (this can take 5 minutes)");
            }
            Err(Error::Aws(e))
        }
    }
}

/// Where the binding's record lives.
fn record_key(obj: &IotPolicyBinding) -> RecordKey {
    RecordKey {
        uid: obj.metadata.uid.clone().unwrap_or_default(),
        namespace: obj.namespace().unwrap_or_default(),
        name: obj.name_any(),
    }
}

/// The binding's record. A binding last synced by an earlier version kept it in status: that is
/// moved to the ledger first, before status (which will no longer carry it) is written.
async fn memory_of(
    obj: &IotPolicyBinding,
    ctx: &Context,
    key: &RecordKey,
) -> Result<Memory, Error> {
    if let Some(memory) = ctx.ledger.load(key).await? {
        return Ok(memory);
    }
    let legacy = obj
        .status
        .as_ref()
        .map(crate::convert::policy_binding::legacy_memory)
        .unwrap_or_default();
    if !legacy.is_empty() {
        if !ctx.gate.is_open() {
            return Err(Error::Record(crate::policy::JournalError::NotLeading));
        }
        ctx.ledger.store(key, &legacy).await?;
        tracing::info!(
            targets = legacy.targets.len(),
            pools = legacy.pools.len(),
            foreign = legacy.foreign.len(),
            "record moved from status to the ledger"
        );
    }
    Ok(legacy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn roles_are_checked_on_a_spec_change_and_then_once_a_period() {
        let t0 = Instant::now();
        let hour = Duration::from_secs(3600);
        let at = |g: i64, after: u64| RoleCheck {
            generation: Some(g),
            at: t0 + Duration::from_secs(after),
        };
        // Never checked in this process: checked.
        assert!(role_check_due(None, at(1, 0), true, hour));
        let last = Some(at(1, 0));
        // Resyncs within the hour, spec unchanged: not checked.
        assert!(!role_check_due(last, at(1, 300), true, hour));
        assert!(!role_check_due(last, at(1, 3599), true, hour));
        // The hour has passed.
        assert!(role_check_due(last, at(1, 3600), true, hour));
        // The spec changed.
        assert!(role_check_due(last, at(2, 300), true, hour));
        // The condition went missing from status.
        assert!(role_check_due(last, at(1, 300), false, hour));
    }
}
