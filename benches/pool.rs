//! A Cognito identity pool of 100,000 and 1,000,000 identities through the policy engine, against
//! the in-memory AWS (`iot_operator::policy::fake`): 60 identities a ListIdentities page, 250
//! targets a ListTargetsForPolicy page, each API throttling above its quota, the operator's
//! client-side rate limit in front. The clock is tokio's paused clock, so "AWS time" is what the
//! calls would take at those rates; "CPU" is what the sync cost this process. Each case runs in
//! its own process so that its peak RSS is its own.
//!
//! Cases: `fresh` (no identity has the policy: attach them all), `resync` (all attached by the
//! binding, nothing to do), `adopt` (all had the policy before the binding: recorded as found,
//! never detached). For each: AWS time, calls by API, throttled calls, CPU time, peak RSS, the
//! binding's record (ConfigMaps, largest one) and its status, against what status held before
//! records moved to ConfigMaps (every applied and found target listed in status).
//!
//! `cargo bench --bench pool`. Environment: BENCH_POOL_SIZES (`100000,1000000`),
//! BENCH_AWS_RATE (10 requests/s, the operator's default `--aws-rate-limit`), BENCH_AWS_QUOTA (15
//! requests/s per API), BENCH_AWS_LATENCY_MS (40).

#[path = "support/usage.rs"]
mod usage;

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use iot_operator::api::{
    Condition, ConditionStatus, IotPolicyBindingStatus, RecordStatus, TargetFailure,
};
use iot_operator::controller::ledger::{Written, layout};
use iot_operator::policy::fake::FakeAws;
use iot_operator::policy::{
    BindingInput, Journal, JournalError, Memory, PolicyEngine, Protection, SyncMode, SyncOutcome,
};

/// The fake's quotas where they differ from BENCH_AWS_QUOTA: AWS's defaults for these calls.
const AWS_QUOTAS: &[(&str, f64)] = &[("ListIdentities", 5.0), ("ListTargetsForPolicy", 10.0)];

fn env_f64(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Lays each record out as the controller's ledger would and keeps the largest.
#[derive(Default)]
struct SizeJournal {
    records: Mutex<(usize, Written)>,
}

impl Journal for SizeJournal {
    async fn record(&self, memory: &Memory) -> Result<(), JournalError> {
        let w = layout(memory);
        let mut r = self.records.lock().unwrap_or_else(|p| p.into_inner());
        r.0 += 1;
        if w.largest_bytes > r.1.largest_bytes {
            r.1 = w;
        }
        Ok(())
    }
}

/// The status the controller writes for this report, and the one written before records moved
/// out of status (every applied and found target listed).
fn status_bytes(memory: &Memory, desired: usize, attached: usize) -> (usize, usize) {
    let mut status = IotPolicyBindingStatus {
        observed_generation: Some(7),
        conditions: vec![Condition::new(
            "Ready",
            ConditionStatus::True,
            "Attached",
            format!("The policy is attached to all {desired} target(s). AWS IoT takes 6-8 minutes to apply policy changes to connected clients."),
            Some(7),
        )],
        policy_arn: Some("arn:aws:iot:eu-west-1:123456789012:policy/app-users".into()),
        policy_version_id: Some("3".into()),
        desired_targets: desired as i64,
        attached_targets: attached as i64,
        failed_targets: 20,
        // The most status lists.
        failures: (0..20)
            .map(|i| TargetFailure {
                target: format!("eu-west-1:{i:08x}-0000-4000-8000-000000000000"),
                reason: "InvalidRequest".into(),
                message: "AttachPolicy failed (InvalidRequest): the target is not a valid Cognito identity in this account and region".into(),
            })
            .collect(),
        last_sync_time: Some("2026-11-26T18:00:00Z".into()),
        record: Some(RecordStatus {
            config_map: "iot-operator/iot-operator-record-0b6f1c3e-2f4a-4c55-9a51-2f0c2d1d7e11".into(),
            targets: memory.targets.len() as i64,
            pools: memory.pools.len() as i64,
            foreign_targets: memory.foreign.len() as i64,
        }),
        ..Default::default()
    };
    let now = serde_json::to_vec(&status).map_or(0, |v| v.len());
    status.record = None;
    status.applied_targets = memory.targets.iter().cloned().collect();
    status.applied_pools = memory.pools.iter().cloned().collect();
    status.foreign_targets = memory.foreign.iter().cloned().collect();
    let before = serde_json::to_vec(&status).map_or(0, |v| v.len());
    (now, before)
}

fn identity(i: usize) -> String {
    // Cognito identity ids: region, colon, UUID.
    format!(
        "eu-west-1:{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        fastrand::u32(..),
        fastrand::u16(..),
        i % 4096,
        (i >> 12) % 4096,
        i
    )
}

/// A runtime on tokio's paused clock: "AWS time" passes only as the calls wait.
fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime")
}

/// The in-memory AWS with the bench's limits, quotas and latency.
fn fake_aws() -> FakeAws {
    let rate = env_f64("BENCH_AWS_RATE", 10.0);
    let quota = env_f64("BENCH_AWS_QUOTA", 15.0);
    let latency = Duration::from_millis(env_f64("BENCH_AWS_LATENCY_MS", 40.0) as u64);
    FakeAws::new(rate, quota, latency).with_api_quotas(AWS_QUOTAS)
}

/// One case in this process; prints one Markdown row.
fn run_case(case: &str, n: usize) {
    paused_runtime().block_on(async {
        let fake = fake_aws();
        fake.create_policy_now("app-users");
        let ids: Vec<String> = (0..n).map(identity).collect();
        fake.add_identities("eu-west-1:pool", ids.iter().cloned());
        let mut memory = Memory::default();
        match case {
            "resync" => {
                for id in &ids {
                    fake.attach_now("app-users", id);
                }
                memory.pools = BTreeSet::from(["eu-west-1:pool".to_owned()]);
            }
            "adopt" => {
                for id in &ids {
                    fake.attach_now("app-users", id);
                }
            }
            _ => {}
        }
        drop(ids);
        let input = BindingInput {
            policy_name: "app-users".into(),
            pools: vec!["eu-west-1:pool".into()],
            memory,
            ..Default::default()
        };
        let engine = PolicyEngine::new(fake.clone(), 4);
        let journal = SizeJournal::default();
        let cpu_seconds = || usage::process_usage(std::process::id()).1;
        let (cpu0, wall0, aws0) = (cpu_seconds(), Instant::now(), tokio::time::Instant::now());
        let report = engine
            .sync_recorded(&input, &Protection::default(), SyncMode::Apply, false, &journal)
            .await;
        let aws_time = aws0.elapsed();
        let (cpu, wall) = (cpu_seconds() - cpu0, wall0.elapsed());
        assert_eq!(report.outcome, SyncOutcome::Synced, "{:?}", report.outcome);
        assert_eq!(report.attached, n);
        let calls = fake.calls();
        let throttled: u64 = fake.throttled().values().sum();
        let (records, record) = *journal.records.lock().unwrap_or_else(|p| p.into_inner());
        let record = if records == 0 { layout(&report.memory) } else { record };
        let (status_now, status_before) = status_bytes(&report.memory, report.desired, report.attached);
        let call = |api: &str| calls.get(api).copied().unwrap_or(0);
        println!(
            "| {case} | {n} | {:.0} s ({:.1} h) | {} | {} | {} | {} | {throttled} | {:.1} s ({:.1} s wall) | {:.0} MiB | {} x ConfigMap, largest {:.0} KiB | {:.1} KiB | {:.0} KiB ({:.0}x) |",
            aws_time.as_secs_f64(),
            aws_time.as_secs_f64() / 3600.0,
            call("ListIdentities"),
            call("ListTargetsForPolicy"),
            call("AttachPolicy"),
            call("GetPolicy"),
            cpu,
            wall.as_secs_f64(),
            usage::process_usage(std::process::id()).0 as f64 / 1024.0,
            record.objects,
            record.largest_bytes as f64 / 1024.0,
            status_now as f64 / 1024.0,
            status_before as f64 / 1024.0,
            status_before as f64 / status_now.max(1) as f64,
        );
    });
}

/// A binding of 20 explicit targets synced alone, then while a fresh sync of a pool of `n`
/// runs (started n/100 seconds of AWS time earlier, an hour at most): how long the small one
/// takes each way.
fn run_alongside(n: usize) {
    paused_runtime().block_on(async {
        let fake = fake_aws();
        fake.create_policy_now("app-users");
        fake.create_policy_now("small");
        fake.add_identities("eu-west-1:pool", (0..n).map(identity));
        let small_targets: Vec<String> = (0..20).map(|i| identity(n + i)).collect();
        fake.add_identities("eu-west-1:small-ids", small_targets.iter().cloned());
        let engine = PolicyEngine::new(fake.clone(), 4);
        let small = |policy: &str| BindingInput {
            policy_name: policy.into(),
            targets: small_targets.clone(),
            ..Default::default()
        };
        let sync_small = |input: BindingInput| {
            let engine = &engine;
            async move {
                let t0 = tokio::time::Instant::now();
                let r = engine
                    .sync(&input, &Protection::default(), SyncMode::Apply, false)
                    .await;
                assert_eq!(r.outcome, SyncOutcome::Synced, "{:?}", r.outcome);
                t0.elapsed()
            }
        };
        let alone = sync_small(small("small")).await;
        fake.create_policy_now("small-2");
        let big_input = BindingInput {
            policy_name: "app-users".into(),
            pools: vec!["eu-west-1:pool".into()],
            ..Default::default()
        };
        let none = Protection::default();
        let big = engine.sync(&big_input, &none, SyncMode::Apply, false);
        tokio::pin!(big);
        // Let the big sync run (listing done, attaching) before the small one starts: n/100
        // seconds, an hour at most, well within its attaches (n/10 seconds).
        let lead = tokio::time::sleep(Duration::from_secs((n as u64 / 100).clamp(1, 3600)));
        tokio::select! {
            _ = &mut big => panic!("the big sync ended before the small one started"),
            _ = lead => {}
        }
        let small_done = sync_small(small("small-2"));
        tokio::pin!(small_done);
        let beside = tokio::select! {
            t = &mut small_done => t,
            _ = &mut big => panic!("the big sync ended first"),
        };
        println!(
            "| {n} | {:.1} s | {:.1} s | {:.2} |",
            alone.as_secs_f64(),
            beside.as_secs_f64(),
            beside.as_secs_f64() / alone.as_secs_f64()
        );
    });
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--alongside") {
        run_alongside(args[i + 1].parse().expect("pool size"));
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--case") {
        let case = &args[i + 1];
        let n: usize = args[i + 2].parse().expect("pool size");
        run_case(case, n);
        return;
    }
    let sizes: Vec<usize> = std::env::var("BENCH_POOL_SIZES")
        .unwrap_or_else(|_| "100000,1000000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    println!(
        "pool sync through the engine: client limit {} req/s overall and AWS's default quotas per API (ListIdentities 5, ListTargetsForPolicy 10, AttachPolicy 15), AWS throttling above those quotas ({} req/s for the others), {} ms a call; pages of 60 identities and 250 targets\n",
        env_f64("BENCH_AWS_RATE", 10.0),
        env_f64("BENCH_AWS_QUOTA", 15.0),
        env_f64("BENCH_AWS_LATENCY_MS", 40.0)
    );
    println!(
        "| case | identities | AWS time | ListIdentities | ListTargetsForPolicy | AttachPolicy | GetPolicy | throttled | CPU | peak RSS | record | status | status before (ratio) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|");
    let exe = std::env::current_exe().expect("own path");
    for n in sizes {
        for case in ["fresh", "resync", "adopt"] {
            let status = Command::new(&exe)
                .args(["--case", case, &n.to_string()])
                .status()
                .expect("case ran");
            assert!(status.success(), "case {case} {n} failed");
        }
    }
    println!(
        "\nA binding of 20 targets synced alone, and again while a fresh sync of the pool runs (started pool/100 s before, an hour at most; same client limits):\n"
    );
    println!("| pool | small binding alone | beside the pool's sync | ratio |");
    println!("|---:|---:|---:|---:|");
    let sizes: Vec<usize> = std::env::var("BENCH_POOL_SIZES")
        .unwrap_or_else(|_| "100000,1000000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    for n in sizes {
        let status = Command::new(&exe)
            .args(["--alongside", &n.to_string()])
            .status()
            .expect("case ran");
        assert!(status.success(), "alongside {n} failed");
    }
}
