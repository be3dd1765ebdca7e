//! `iot-operator attach -f binding.yaml [--dry-run]`: one sync of an IotPolicyBinding manifest
//! against AWS, printing the plan and the result. For CI pipelines and users without a cluster.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

use super::{AwsArgs, CliError, Context};
use crate::api::IotPolicyBinding;
use crate::aws::AwsClients;
use crate::policy::{
    Journal, JournalError, Memory, PolicyEngine, Protection, SyncMode, SyncOutcome, SyncReport,
};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Args, Debug)]
pub struct AttachArgs {
    /// IotPolicyBinding manifest, YAML or JSON (`-` for standard input).
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
    /// Observe and print the plan; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// JSON file that remembers what earlier runs attached, so that a target removed from the
    /// manifest is detached. Created when missing; rewritten before anything is attached and
    /// after the last call, so an interrupted run leaves nothing untracked. Without it nothing is
    /// ever detached.
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Print the plan and result as text or JSON.
    #[arg(long, value_enum, default_value = "text")]
    pub output: Output,
    #[command(flatten)]
    pub aws: AwsArgs,
}

/// What `--state` keeps between runs.
#[derive(Serialize, Deserialize, Default, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AttachState {
    pub applied_targets: Vec<String>,
    pub applied_pools: Vec<String>,
    pub foreign_targets: Vec<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct JsonReport<'a> {
    dry_run: bool,
    outcome: String,
    create_policy: bool,
    create_version: bool,
    prune_versions: &'a [String],
    attach: &'a [String],
    detach: &'a [String],
    drift: &'a [String],
    failures: Vec<(String, String)>,
    desired: usize,
    attached: usize,
    policy_arn: Option<&'a str>,
    policy_version_id: Option<&'a str>,
    reads: u32,
    writes: u32,
    /// Whether the identity pools' Cognito roles may use AWS IoT (`null`: no pools, or uncertain).
    #[serde(skip_serializing_if = "Option::is_none")]
    roles_allow_iot: Option<RolesFinding>,
}

/// The pool roles check as printed.
#[derive(Serialize, Clone)]
#[serde(rename_all = "camelCase")]
struct RolesFinding {
    allowed: Option<bool>,
    message: String,
}

fn outcome_text(o: &SyncOutcome) -> String {
    match o {
        SyncOutcome::Synced => "Synced".into(),
        SyncOutcome::PartiallyAttached => "PartiallyAttached".into(),
        SyncOutcome::PolicyNotFound => {
            "PolicyNotFound: the policy does not exist and spec.policy.document is not set".into()
        }
        SyncOutcome::Failed(e) => format!("Failed: {e}"),
        SyncOutcome::Interrupted => {
            "Interrupted: stopped between calls; the state file covers every pair attached, run again to finish".into()
        }
        SyncOutcome::NotRecorded(e) => format!("NotRecorded: {e}"),
    }
}

fn print_report(
    r: &SyncReport,
    dry_run: bool,
    output: Output,
    roles: Option<RolesFinding>,
) -> Result<(), CliError> {
    let p = &r.plan;
    match output {
        Output::Json => {
            let j = JsonReport {
                dry_run,
                outcome: outcome_text(&r.outcome),
                create_policy: p.create_policy,
                create_version: p.create_version,
                prune_versions: &p.prune_versions,
                attach: &p.attach,
                detach: &p.detach,
                drift: &p.drift,
                failures: r
                    .failures
                    .iter()
                    .chain(&r.detach_failures)
                    .map(|f| (f.target.clone(), f.error.to_string()))
                    .collect(),
                desired: r.desired,
                attached: r.attached,
                policy_arn: r.policy_arn.as_deref(),
                policy_version_id: r.policy_version_id.as_deref(),
                reads: r.reads,
                writes: r.writes,
                roles_allow_iot: roles,
            };
            println!(
                "{}",
                serde_json::to_string_pretty(&j).map_err(CliError::wrap)?
            );
        }
        Output::Text => {
            println!(
                "plan{}:",
                if dry_run {
                    " (dry run, nothing changed)"
                } else {
                    ""
                }
            );
            if p.create_policy {
                println!("  create policy");
            }
            for v in &p.prune_versions {
                println!("  prune version {v}");
            }
            if p.create_version {
                println!("  create default version");
            }
            for t in &p.attach {
                let drift = if p.drift.contains(t) {
                    " (drift: was detached out of band)"
                } else {
                    ""
                };
                println!("  attach {t}{drift}");
            }
            for t in &p.detach {
                println!("  detach {t}");
            }
            if p.is_empty() {
                println!("  nothing to change");
            }
            for f in r.failures.iter().chain(&r.detach_failures) {
                println!("failed {}: {}", f.target, f.error);
            }
            println!(
                "result: {}; {} of {} desired target(s) attached; {} read and {} write call(s)",
                outcome_text(&r.outcome),
                r.attached,
                r.desired,
                r.reads,
                r.writes
            );
            if let Some(f) = roles {
                let verdict = match f.allowed {
                    Some(true) => "ok",
                    Some(false) => "PROBLEM",
                    None => "uncertain",
                };
                println!("cognito roles: {verdict}: {}", f.message);
            }
        }
    }
    Ok(())
}

/// The `--state` file as the engine's journal: each record replaces the file atomically
/// (written beside it, flushed, renamed), so a crash leaves the old or the new record, never a
/// torn one. A first SIGINT or SIGTERM asks the engine to stop between calls.
struct StateFile {
    path: Option<PathBuf>,
    stop: Arc<AtomicBool>,
}

impl StateFile {
    fn load(&self) -> Result<Memory, CliError> {
        let Some(path) = &self.path else {
            return Ok(Memory::default());
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Memory::default()),
            Err(e) => return Err(CliError::with(path.display().to_string(), e)),
        };
        let state: AttachState =
            serde_json::from_str(&text).context(|| path.display().to_string())?;
        Ok(Memory {
            targets: state.applied_targets.into_iter().collect(),
            pools: state.applied_pools.into_iter().collect(),
            foreign: state.foreign_targets.into_iter().collect(),
        })
    }

    fn write(path: &Path, memory: &Memory) -> std::io::Result<()> {
        let state = AttachState {
            applied_targets: memory.targets.iter().cloned().collect(),
            applied_pools: memory.pools.iter().cloned().collect(),
            foreign_targets: memory.foreign.iter().cloned().collect(),
        };
        let text = serde_json::to_vec_pretty(&state).map_err(std::io::Error::other)?;
        let mut name = path.file_name().unwrap_or_default().to_owned();
        name.push(".tmp");
        let tmp = path.with_file_name(name);
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&text)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename itself survives a power loss only once the directory is flushed.
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

impl Journal for StateFile {
    async fn record(&self, memory: &Memory) -> Result<(), JournalError> {
        match &self.path {
            Some(path) => Self::write(path, memory).map_err(|e| JournalError::Write {
                place: path.display().to_string(),
                source: crate::error::Source::new(e),
            }),
            None => Ok(()),
        }
    }

    fn interrupted(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// Sets `stop` on the first SIGINT or SIGTERM; a second one ends the process at once (the state
/// file already covers every call made).
fn stop_on_signal(stop: Arc<AtomicBool>) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGTERM");
                    return;
                }
            };
        for n in 0.. {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            if n > 0 {
                eprintln!("interrupted again: stopping now");
                std::process::exit(130);
            }
            eprintln!("interrupted: stopping after the calls in flight (again to stop now)");
            stop.store(true, Ordering::SeqCst);
        }
    });
}

pub async fn attach(args: AttachArgs) -> Result<(), CliError> {
    let binding: IotPolicyBinding = super::read_manifest(&args.file)?;
    binding
        .spec
        .validate()
        .context(|| "invalid IotPolicyBinding".into())?;
    let journal = StateFile {
        path: args.state.clone(),
        stop: Arc::new(AtomicBool::new(false)),
    };
    let memory = journal.load()?;
    stop_on_signal(journal.stop.clone());
    let aws = Arc::new(AwsClients::load(args.aws.settings(), None).await);
    let client = aws
        .iot(
            binding.spec.region.as_deref(),
            binding.spec.role_arn.as_deref(),
        )
        .await
        .map_err(CliError::wrap)?;
    let engine = PolicyEngine::new(client.as_ref(), aws.settings().concurrency);
    let input = crate::convert::policy_binding::engine_input(&binding.spec, memory);
    let mode = if args.dry_run {
        SyncMode::DryRun
    } else {
        SyncMode::Apply
    };
    let report = engine
        .sync_recorded(&input, &Protection::default(), mode, false, &journal)
        .await;
    // Setup step 3: may the pools' Cognito roles use AWS IoT at all?
    let pools = &binding.spec.principals.cognito_identity_pools;
    let roles = if pools.is_empty() || matches!(report.outcome, SyncOutcome::Failed(_)) {
        None
    } else {
        let source = aws
            .roles(
                binding.spec.region.as_deref(),
                binding.spec.role_arn.as_deref(),
            )
            .await
            .map_err(CliError::wrap)?;
        Some(
            match crate::policy::iam::check_pools(&source, pools).await {
                Ok(findings) => {
                    let (allowed, message) = crate::policy::iam::summarize(&findings);
                    RolesFinding { allowed, message }
                }
                Err(e) => RolesFinding {
                    allowed: None,
                    message: format!("the Cognito roles could not be read: {e}"),
                },
            },
        )
    };
    print_report(&report, args.dry_run, args.output, roles)?;
    match report.outcome {
        SyncOutcome::Synced => Ok(()),
        _ if args.dry_run && !matches!(report.outcome, SyncOutcome::Failed(_)) => Ok(()),
        SyncOutcome::PolicyNotFound => Err(format!(
            "PolicyNotFound: AWS IoT policy {:?} does not exist{} and spec.policy.document is not set",
            binding.spec.policy.name,
            binding
                .spec
                .region
                .as_deref()
                .map(|r| format!(" in {r}"))
                .unwrap_or_default()
        )
        .into()),
        other => Err(outcome_text(&other).into()),
    }
}
