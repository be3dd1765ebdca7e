//! `iot-operator attach -f binding.yaml [--dry-run]`: one sync of an IotPolicyBinding manifest
//! against AWS, printing the plan and the result. For CI pipelines and users without a cluster.

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

use super::AwsArgs;
use crate::api::IotPolicyBinding;
use crate::aws::AwsClients;
use crate::policy::{PolicyEngine, Protection, SyncMode, SyncOutcome, SyncReport};

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
    /// manifest is detached. Created when missing. Without it nothing is ever detached.
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
}

fn outcome_text(o: &SyncOutcome) -> String {
    match o {
        SyncOutcome::Synced => "Synced".into(),
        SyncOutcome::PartiallyAttached => "PartiallyAttached".into(),
        SyncOutcome::PolicyNotFound => {
            "PolicyNotFound: the policy does not exist and spec.policy.document is not set".into()
        }
        SyncOutcome::Failed(e) => format!("Failed: {e}"),
    }
}

fn print_report(r: &SyncReport, dry_run: bool, output: Output) -> Result<(), String> {
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
            };
            println!(
                "{}",
                serde_json::to_string_pretty(&j).map_err(|e| e.to_string())?
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
        }
    }
    Ok(())
}

pub async fn attach(args: AttachArgs) -> Result<(), String> {
    let binding: IotPolicyBinding = super::read_manifest(&args.file)?;
    binding
        .spec
        .validate()
        .map_err(|e| format!("invalid IotPolicyBinding: {e}"))?;
    let state: AttachState = match &args.state {
        Some(path) if path.exists() => {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?
        }
        _ => AttachState::default(),
    };
    let aws = Arc::new(AwsClients::load(args.aws.settings(), None).await);
    let client = aws
        .iot(
            binding.spec.region.as_deref(),
            binding.spec.role_arn.as_deref(),
        )
        .await
        .map_err(|e| e.to_string())?;
    let engine = PolicyEngine::new(client.as_ref(), aws.settings().concurrency);
    let mut input = binding.spec.engine_input(None);
    input.applied_targets = state.applied_targets;
    input.applied_pools = state.applied_pools;
    input.foreign = state.foreign_targets;
    let mode = if args.dry_run {
        SyncMode::DryRun
    } else {
        SyncMode::Apply
    };
    let report = engine
        .sync(&input, &Protection::default(), mode, false)
        .await;
    print_report(&report, args.dry_run, args.output)?;
    if !args.dry_run
        && !matches!(report.outcome, SyncOutcome::Failed(_))
        && let Some(path) = &args.state
    {
        let next = AttachState {
            applied_targets: report.applied_targets.clone(),
            applied_pools: report.applied_pools.clone(),
            foreign_targets: report.foreign.clone(),
        };
        let text = serde_json::to_string_pretty(&next).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
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
        )),
        other => Err(outcome_text(&other)),
    }
}
