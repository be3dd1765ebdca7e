//! The policy-sync engine against moto's server (AWS IoT and Cognito Identity), started by the
//! test on a free loopback port. Throttling and 5xx, which moto does not emulate, are injected by
//! an SDK interceptor that replaces real responses with AWS error responses before the SDK reads
//! them (a fault layer, since no peer here can throttle).

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use iot_operator::api::IotPolicyBinding;
use iot_operator::aws::SdkIot;
use iot_operator::aws::retry::{CallMeter, QuotaIsFinal, RetrySettings};
use iot_operator::policy::iot_api::IotApi;
use iot_operator::policy::{
    AwsErrorKind, BindingInput, PolicyEngine, PolicyRemoval, Protection, SyncMode, SyncOutcome,
    SyncReport,
};
use iot_operator::ratelimit::RateLimiter;
use iot_operator::telemetry::Metrics;
use support::faults::{Faults, Which};
use support::{Moto, test_sdk_config};

const DOC: &str = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"iot:Connect","Resource":"*"}]}"#;

struct Env {
    moto: Moto,
    iot: aws_sdk_iot::Client,
    cognito: aws_sdk_cognitoidentity::Client,
}

impl Env {
    fn new() -> Self {
        let moto = Moto::start();
        let config = test_sdk_config(&moto.url());
        Self {
            iot: aws_sdk_iot::Client::new(&config),
            cognito: aws_sdk_cognitoidentity::Client::new(&config),
            moto,
        }
    }

    fn api_with(
        &self,
        legacy: bool,
        faults: Option<Faults>,
        metrics: Option<Arc<Metrics>>,
    ) -> SdkIot {
        let config = test_sdk_config(&self.moto.url());
        let retry = RetrySettings {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(200),
        };
        // Without jitter, so that a test can time the waits: the SDK's standard mode otherwise
        // waits a random share (0 to 1) of each ceiling, and three waits can add up to nothing.
        let mut iot = aws_sdk_iot::config::Builder::from(&config)
            .retry_config(retry.config().with_use_static_exponential_base(true))
            .retry_classifier(QuotaIsFinal);
        if let Some(m) = &metrics {
            iot = iot.interceptor(CallMeter::new(m.clone()));
        }
        if let Some(f) = faults {
            iot = iot.interceptor(f);
        }
        SdkIot::new(
            aws_sdk_iot::Client::from_conf(iot.build()),
            aws_sdk_cognitoidentity::Client::new(&config),
            Arc::new(RateLimiter::new(0.0)),
            legacy,
            metrics,
        )
    }

    fn api(&self) -> SdkIot {
        self.api_with(false, None, None)
    }

    async fn create_policy(&self, name: &str) {
        self.iot
            .create_policy()
            .policy_name(name)
            .policy_document(DOC)
            .send()
            .await
            .expect("create policy");
    }

    async fn pool(&self) -> String {
        let out = self
            .cognito
            .create_identity_pool()
            .identity_pool_name("pool")
            .allow_unauthenticated_identities(true)
            .send()
            .await
            .expect("pool");
        out.identity_pool_id().to_owned()
    }

    async fn identity(&self, pool: &str) -> String {
        let out = self
            .cognito
            .get_id()
            .identity_pool_id(pool)
            .send()
            .await
            .expect("get id");
        out.identity_id().expect("id").to_owned()
    }

    async fn identities(&self, n: usize) -> Vec<String> {
        let pool = self.pool().await;
        let mut ids = Vec::new();
        for _ in 0..n {
            ids.push(self.identity(&pool).await);
        }
        ids
    }

    async fn targets(&self, policy: &str) -> BTreeSet<String> {
        self.api().list_targets(policy).await.expect("list").items
    }

    async fn certificate(&self) -> String {
        let out = self
            .iot
            .create_keys_and_certificate()
            .set_as_active(true)
            .send()
            .await
            .expect("cert");
        out.certificate_arn().expect("arn").to_owned()
    }
}

fn input(policy: &str, targets: &[String]) -> BindingInput {
    BindingInput {
        policy_name: policy.into(),
        targets: targets.to_vec(),
        ..Default::default()
    }
}

/// Carries what a sync remembered into the next input, like the controller's status does.
fn remember(mut next: BindingInput, report: &SyncReport) -> BindingInput {
    next.memory = report.memory.clone();
    next
}

fn set(items: &[String]) -> BTreeSet<String> {
    items.iter().cloned().collect()
}

#[tokio::test]
async fn explicit_identities_attach_and_detach() {
    let env = Env::new();
    env.create_policy("p").await;
    let ids = env.identities(3).await;
    // Someone else attached the policy to a certificate: the binding never touches it.
    let cert = env.certificate().await;
    env.iot
        .attach_policy()
        .policy_name("p")
        .target(&cert)
        .send()
        .await
        .unwrap();

    let engine = PolicyEngine::new(env.api(), 4);
    let first = engine
        .sync(
            &input("p", &ids),
            &Protection::default(),
            SyncMode::Apply,
            false,
        )
        .await;
    assert_eq!(first.outcome, SyncOutcome::Synced);
    assert_eq!(first.plan.attach.len(), 3);
    assert_eq!((first.desired, first.attached), (3, 3));
    let mut want = set(&ids);
    want.insert(cert.clone());
    assert_eq!(env.targets("p").await, want);

    // Remove two identities from the spec.
    let next = remember(input("p", &ids[..1]), &first);
    let second = engine
        .sync(&next, &Protection::default(), SyncMode::Apply, false)
        .await;
    assert_eq!(second.outcome, SyncOutcome::Synced);
    assert_eq!(set(&second.plan.detach), set(&ids[1..]));
    assert_eq!(
        env.targets("p").await,
        BTreeSet::from([ids[0].clone(), cert.clone()])
    );

    // Deleting the binding detaches what it attached and nothing else.
    let last = remember(input("p", &ids[..1]), &second);
    let gone = engine
        .sync(&last, &Protection::default(), SyncMode::Apply, true)
        .await;
    assert_eq!(gone.plan.detach, vec![ids[0].clone()]);
    assert_eq!(env.targets("p").await, BTreeSet::from([cert]));
}

#[tokio::test]
async fn a_pool_picks_up_new_identities_and_resyncs_without_writes() {
    let env = Env::new();
    env.create_policy("p").await;
    let pool = env.pool().await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(env.identity(&pool).await);
    }
    let engine = PolicyEngine::new(env.api(), 4);
    let spec = BindingInput {
        policy_name: "p".into(),
        pools: vec![pool.clone()],
        ..Default::default()
    };
    let first = engine
        .sync(&spec, &Protection::default(), SyncMode::Apply, false)
        .await;
    assert_eq!(
        (first.outcome.clone(), first.attached),
        (SyncOutcome::Synced, 3)
    );
    for _ in 0..2 {
        ids.push(env.identity(&pool).await);
    }
    let second = engine
        .sync(
            &remember(spec.clone(), &first),
            &Protection::default(),
            SyncMode::Apply,
            false,
        )
        .await;
    assert_eq!(
        second.plan.attach.len(),
        2,
        "new identities are attached on the next sync"
    );
    assert_eq!(env.targets("p").await, set(&ids));
    let steady = engine
        .sync(
            &remember(spec.clone(), &second),
            &Protection::default(),
            SyncMode::Apply,
            false,
        )
        .await;
    assert_eq!(steady.writes, 0, "a steady-state resync writes nothing");
    assert_eq!(
        steady.reads, 3,
        "GetPolicy, one ListTargetsForPolicy page, one ListIdentities page"
    );
    assert_eq!((steady.desired, steady.attached), (5, 5));

    // Removing the pool from the spec detaches its identities.
    let without = remember(input("p", &[]), &steady);
    let after = engine
        .sync(&without, &Protection::default(), SyncMode::Apply, false)
        .await;
    assert_eq!(after.plan.detach.len(), 5);
    assert!(env.targets("p").await.is_empty());
}

#[tokio::test]
async fn a_managed_document_is_created_and_changed_seven_times_within_the_version_limit() {
    let env = Env::new();
    let ids = env.identities(1).await;
    let engine = PolicyEngine::new(env.api(), 4);
    let mut spec = input("managed", &ids);
    spec.document = Some(serde_json::from_str(DOC).unwrap());
    let mut report = engine
        .sync(&spec, &Protection::default(), SyncMode::Apply, false)
        .await;
    assert_eq!(report.outcome, SyncOutcome::Synced);
    assert!(report.plan.create_policy);
    for i in 0..7 {
        let doc = format!(
            r#"{{"Version":"2012-10-17","Statement":[{{"Effect":"Allow","Action":"iot:Connect","Resource":"arn:aws:iot:eu-west-1:123456789012:client/c{i}"}}]}}"#
        );
        spec = remember(spec, &report);
        spec.document = Some(serde_json::from_str(&doc).unwrap());
        report = engine
            .sync(&spec, &Protection::default(), SyncMode::Apply, false)
            .await;
        assert_eq!(
            report.outcome,
            SyncOutcome::Synced,
            "change {i}: {:?}",
            report.outcome
        );
        assert!(report.plan.create_version, "change {i}");
        let versions = env.api().list_policy_versions("managed").await.unwrap();
        assert!(
            versions.len() <= 5,
            "change {i}: {} versions",
            versions.len()
        );
        let policy = env.api().get_policy("managed").await.unwrap().unwrap();
        assert_eq!(
            iot_operator::policy::canonical::canonical_from_str(&policy.document),
            iot_operator::policy::canonical::canonical_from_str(&doc),
            "change {i}: the default version is the new document"
        );
        assert_eq!(
            report.policy_version_id.as_deref(),
            Some(policy.default_version_id.as_str())
        );
    }
    // Same document again: nothing to do.
    let again = engine
        .sync(
            &remember(spec, &report),
            &Protection::default(),
            SyncMode::Apply,
            false,
        )
        .await;
    assert!(
        again.plan.is_empty() && again.writes == 0,
        "{:?}",
        again.plan
    );
}

#[tokio::test]
async fn a_missing_unmanaged_policy_is_reported() {
    let env = Env::new();
    let ids = env.identities(1).await;
    let engine = PolicyEngine::new(env.api(), 4);
    let report = engine
        .sync(
            &input("absent", &ids),
            &Protection::default(),
            SyncMode::Apply,
            false,
        )
        .await;
    assert_eq!(report.outcome, SyncOutcome::PolicyNotFound);
    assert_eq!(report.writes, 0);
}

#[tokio::test]
async fn a_pair_another_binding_wants_survives_deletion() {
    let env = Env::new();
    env.create_policy("p").await;
    let ids = env.identities(2).await;
    let engine = PolicyEngine::new(env.api(), 4);
    let a = engine
        .sync(
            &input("p", &ids),
            &Protection::default(),
            SyncMode::Apply,
            false,
        )
        .await;
    // Binding B wants ids[1] too; deleting A must leave it.
    let protection = Protection {
        targets: BTreeSet::from([ids[1].clone()]),
        ..Default::default()
    };
    let gone = engine
        .sync(
            &remember(input("p", &ids), &a),
            &protection,
            SyncMode::Apply,
            true,
        )
        .await;
    assert_eq!(gone.plan.detach, vec![ids[0].clone()]);
    assert_eq!(env.targets("p").await, BTreeSet::from([ids[1].clone()]));
}

#[tokio::test]
async fn an_out_of_band_detach_is_repaired_and_counted_as_drift() {
    let env = Env::new();
    env.create_policy("p").await;
    let ids = env.identities(2).await;
    let engine = PolicyEngine::new(env.api(), 4);
    let first = engine
        .sync(
            &input("p", &ids),
            &Protection::default(),
            SyncMode::Apply,
            false,
        )
        .await;
    env.iot
        .detach_policy()
        .policy_name("p")
        .target(&ids[0])
        .send()
        .await
        .unwrap();
    let repaired = engine
        .sync(
            &remember(input("p", &ids), &first),
            &Protection::default(),
            SyncMode::Apply,
            false,
        )
        .await;
    assert_eq!(repaired.plan.drift, vec![ids[0].clone()]);
    assert_eq!(env.targets("p").await, set(&ids));
}

#[tokio::test]
async fn an_unknown_identity_fails_alone() {
    let env = Env::new();
    env.create_policy("p").await;
    let mut ids = env.identities(2).await;
    let unknown = "eu-west-1:00000000-0000-4000-8000-000000000000".to_owned();
    ids.push(unknown.clone());
    let engine = PolicyEngine::new(env.api(), 4);
    let report = engine
        .sync(
            &input("p", &ids),
            &Protection::default(),
            SyncMode::Apply,
            false,
        )
        .await;
    assert_eq!(report.outcome, SyncOutcome::PartiallyAttached);
    assert_eq!(report.failures.len(), 1);
    assert_eq!(report.failures[0].target, unknown);
    assert_eq!(report.failures[0].error.kind, AwsErrorKind::NotFound);
    assert_eq!((report.desired, report.attached), (3, 2));
    assert_eq!(env.targets("p").await, set(&ids[..2]));
}

#[tokio::test]
async fn the_legacy_principal_policy_api() {
    let env = Env::new();
    env.create_policy("p").await;
    let ids = env.identities(2).await;
    let engine = PolicyEngine::new(env.api_with(true, None, None), 4);
    let report = engine
        .sync(
            &input("p", &ids),
            &Protection::default(),
            SyncMode::Apply,
            false,
        )
        .await;
    assert_eq!(report.outcome, SyncOutcome::Synced);
    #[allow(deprecated)]
    let principals = env
        .iot
        .list_policy_principals()
        .policy_name("p")
        .send()
        .await
        .unwrap();
    assert_eq!(
        principals
            .principals()
            .iter()
            .cloned()
            .collect::<BTreeSet<_>>(),
        set(&ids)
    );
    let steady = engine
        .sync(
            &remember(input("p", &ids), &report),
            &Protection::default(),
            SyncMode::Apply,
            false,
        )
        .await;
    assert_eq!(steady.writes, 0);
    let gone = engine
        .sync(
            &remember(input("p", &[]), &steady),
            &Protection::default(),
            SyncMode::Apply,
            false,
        )
        .await;
    assert_eq!(gone.plan.detach.len(), 2);
    assert!(env.targets("p").await.is_empty());
}

#[tokio::test]
async fn throttling_and_5xx_back_off_and_succeed() {
    let env = Env::new();
    env.create_policy("p").await;
    let ids = env.identities(1).await;
    for (status, code) in [
        (400, "ThrottlingException"),
        (503, "ServiceUnavailableException"),
    ] {
        let metrics = Arc::new(Metrics::new());
        let faults = Faults::new(Which::First(3), status, code);
        let engine = PolicyEngine::new(env.api_with(false, Some(faults), Some(metrics.clone())), 1);
        let start = Instant::now();
        let report = engine
            .sync(
                &input("p", &ids),
                &Protection::default(),
                SyncMode::Apply,
                false,
            )
            .await;
        assert_eq!(
            report.outcome,
            SyncOutcome::Synced,
            "{code}: {:?}",
            report.outcome
        );
        // Three failed attempts of GetPolicy, retried after 20, 40 and 80 ms.
        assert!(
            start.elapsed() >= Duration::from_millis(20 + 40 + 80),
            "{code}: no backoff ({:?})",
            start.elapsed()
        );
        let text = metrics.encode();
        let line = format!(
            "iot_operator_aws_api_calls_total{{operation=\"GetPolicy\",outcome=\"{}\"}} 3",
            if status == 400 {
                "Throttled"
            } else {
                "ServiceUnavailable"
            }
        );
        assert!(text.contains(&line), "{text}");
        // The SDK retried each failed attempt; the interceptor saw every retry.
        assert!(
            text.contains("iot_operator_aws_api_retries_total{operation=\"GetPolicy\"} 3"),
            "{text}"
        );
        if status == 400 {
            assert!(
                text.contains("iot_operator_aws_api_throttles_total{operation=\"GetPolicy\"} 3"),
                "{text}"
            );
        }
        env.iot
            .detach_policy()
            .policy_name("p")
            .target(&ids[0])
            .send()
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn an_iot_quota_error_is_not_retried() {
    let env = Env::new();
    env.create_policy("p").await;
    let ids = env.identities(1).await;
    let metrics = Arc::new(Metrics::new());
    // The first answer (GetPolicy) says a quota is reached; the SDK's list of throttling codes
    // includes LimitExceededException, but waiting does not lift a quota.
    let faults = Faults::new(Which::First(1), 410, "LimitExceededException");
    let engine = PolicyEngine::new(env.api_with(false, Some(faults), Some(metrics.clone())), 1);
    let report = engine
        .sync(
            &input("p", &ids),
            &Protection::default(),
            SyncMode::Apply,
            false,
        )
        .await;
    assert!(
        matches!(report.outcome, SyncOutcome::Failed(ref e) if e.kind == AwsErrorKind::LimitExceeded),
        "{:?}",
        report.outcome
    );
    let text = metrics.encode();
    assert!(
        text.contains(
            "iot_operator_aws_api_calls_total{operation=\"GetPolicy\",outcome=\"LimitExceeded\"} 1"
        ),
        "{text}"
    );
    assert!(
        text.contains("iot_operator_aws_api_retries_total{operation=\"GetPolicy\"} 0"),
        "a quota error was retried: {text}"
    );
}

#[tokio::test]
async fn persistent_throttling_is_reported_as_throttled() {
    let env = Env::new();
    env.create_policy("p").await;
    let ids = env.identities(1).await;
    let faults = Faults::throttling(Which::First(usize::MAX));
    let engine = PolicyEngine::new(env.api_with(false, Some(faults), None), 1);
    let report = engine
        .sync(
            &input("p", &ids),
            &Protection::default(),
            SyncMode::Apply,
            false,
        )
        .await;
    assert!(report.throttled(), "{:?}", report.outcome);
    assert!(
        matches!(report.outcome, SyncOutcome::Failed(ref e) if e.kind == AwsErrorKind::Throttled)
    );
}

fn write_manifest(dir: &std::path::Path, ids: &[String]) -> std::path::PathBuf {
    let b: IotPolicyBinding = serde_json::from_value(serde_json::json!({
        "apiVersion": "iot.operator.dev/v1alpha1", "kind": "IotPolicyBinding",
        "metadata": {"name": "cli", "namespace": "default"},
        "spec": {"policy": {"name": "p"}, "region": "eu-west-1", "principals": {"cognitoIdentityIds": ids}}
    }))
    .unwrap();
    let path = dir.join("binding.yaml");
    std::fs::write(&path, serde_yaml::to_string(&b).unwrap()).unwrap();
    path
}

fn cli(moto: &Moto, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_iot-operator"))
        .args(args)
        .args(["--aws-endpoint-url", &moto.url()])
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing-secret")
        .env("AWS_REGION", "eu-west-1")
        .env_remove("AWS_PROFILE")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .expect("runs")
}

#[tokio::test]
async fn attach_command_dry_run_changes_nothing_then_applies() {
    let env = Env::new();
    env.create_policy("p").await;
    let ids = env.identities(2).await;
    let dir = tempfile::tempdir().unwrap();
    let file = write_manifest(dir.path(), &ids);
    let state = dir.path().join("state.json");
    let file_s = file.to_str().unwrap();
    let state_s = state.to_str().unwrap();

    let out = cli(
        &env.moto,
        &["attach", "-f", file_s, "--dry-run", "--state", state_s],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for id in &ids {
        assert!(stdout.contains(&format!("attach {id}")), "{stdout}");
    }
    assert!(stdout.contains("dry run"), "{stdout}");
    assert!(env.targets("p").await.is_empty(), "dry run changed AWS");
    assert!(!state.exists(), "dry run wrote state");

    let out = cli(
        &env.moto,
        &[
            "attach", "-f", file_s, "--state", state_s, "--output", "json",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["outcome"], "Synced");
    assert_eq!(report["attached"], 2);
    assert_eq!(env.targets("p").await, set(&ids));

    // Dropping one identity from the manifest detaches it, thanks to the state file.
    write_manifest(dir.path(), &ids[..1]);
    let out = cli(&env.moto, &["attach", "-f", file_s, "--state", state_s]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains(&format!("detach {}", ids[1])), "{stdout}");
    assert_eq!(env.targets("p").await, set(&ids[..1]));
}

/// Figures for the closing note: API calls of the first sync and of a steady-state resync over a
/// pool of 1,000 identities, and the first sync's wall time against moto.
#[tokio::test]
async fn pool_of_1000_identities_figures() {
    let env = Env::new();
    env.create_policy("p").await;
    let pool = env.pool().await;
    for _ in 0..1000 {
        env.identity(&pool).await;
    }
    let engine = PolicyEngine::new(env.api(), 8);
    let spec = BindingInput {
        policy_name: "p".into(),
        pools: vec![pool],
        ..Default::default()
    };
    let start = Instant::now();
    let first = engine
        .sync(&spec, &Protection::default(), SyncMode::Apply, false)
        .await;
    let first_time = start.elapsed();
    assert_eq!(
        (first.outcome.clone(), first.attached),
        (SyncOutcome::Synced, 1000)
    );
    let start = Instant::now();
    let steady = engine
        .sync(
            &remember(spec, &first),
            &Protection::default(),
            SyncMode::Apply,
            false,
        )
        .await;
    let steady_time = start.elapsed();
    assert_eq!(steady.writes, 0);
    println!(
        "FIGURES pool=1000 first_sync reads={} writes={} wall={:.2}s | steady_resync reads={} writes={} wall={:.3}s",
        first.reads,
        first.writes,
        first_time.as_secs_f64(),
        steady.reads,
        steady.writes,
        steady_time.as_secs_f64()
    );
}

#[tokio::test]
async fn an_identity_in_another_bindings_pool_survives_deletion() {
    let env = Env::new();
    env.create_policy("p").await;
    let pool = env.pool().await;
    let in_pool = env.identity(&pool).await;
    let outside = env.identities(1).await;
    let engine = PolicyEngine::new(env.api(), 4);
    // Binding A names both identities explicitly; binding B wants every identity of the pool.
    let targets = vec![in_pool.clone(), outside[0].clone()];
    let a = engine
        .sync(
            &input("p", &targets),
            &Protection::default(),
            SyncMode::Apply,
            false,
        )
        .await;
    let protection = Protection {
        pools: BTreeSet::from([pool]),
        ..Default::default()
    };
    let gone = engine
        .sync(
            &remember(input("p", &targets), &a),
            &protection,
            SyncMode::Apply,
            true,
        )
        .await;
    assert_eq!(
        gone.plan.detach,
        vec![outside[0].clone()],
        "only the identity outside B's pool is detached"
    );
    assert_eq!(env.targets("p").await, BTreeSet::from([in_pool]));
}

/// `deletionPolicy: DeletePolicy` against moto: a managed policy with old versions goes with
/// its last binding once detached; one still attached to a target the binding did not attach is
/// kept, naming that target (AWS itself refuses to delete it: DeleteConflict).
#[tokio::test]
async fn a_managed_policy_is_deleted_with_its_versions_unless_something_still_has_it() {
    let env = Env::new();
    let ids = env.identities(2).await;
    let engine = PolicyEngine::new(env.api(), 4);
    // Created by the binding, then changed twice: three versions.
    let mut spec = input("doomed", &ids);
    let mut report = engine
        .sync(&spec, &Protection::default(), SyncMode::Apply, false)
        .await;
    for i in 0..3 {
        let doc = format!(
            r#"{{"Version":"2012-10-17","Statement":[{{"Effect":"Allow","Action":"iot:Connect","Resource":"arn:aws:iot:eu-west-1:123456789012:client/d{i}"}}]}}"#
        );
        spec = remember(spec, &report);
        spec.document = Some(serde_json::from_str(&doc).unwrap());
        report = engine
            .sync(&spec, &Protection::default(), SyncMode::Apply, false)
            .await;
        assert_eq!(report.outcome, SyncOutcome::Synced, "{:?}", report.outcome);
    }
    assert_eq!(
        env.api()
            .list_policy_versions("doomed")
            .await
            .unwrap()
            .len(),
        3
    );
    // Still attached: kept, whatever deletes it.
    assert_eq!(
        engine.delete_policy_if_unused("doomed").await,
        Ok(PolicyRemoval::InUse {
            targets: ids
                .iter()
                .cloned()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect(),
            total: 2
        })
    );
    // The binding goes: detach, then delete.
    let gone = engine
        .sync(
            &remember(spec, &report),
            &Protection::default(),
            SyncMode::Apply,
            true,
        )
        .await;
    assert_eq!(gone.outcome, SyncOutcome::Synced);
    assert_eq!(
        engine.delete_policy_if_unused("doomed").await,
        Ok(PolicyRemoval::Deleted { versions: 2 })
    );
    assert_eq!(env.api().get_policy("doomed").await, Ok(None));
    assert_eq!(
        engine.delete_policy_if_unused("doomed").await,
        Ok(PolicyRemoval::Gone)
    );

    // A certificate someone else attached keeps it alive.
    env.create_policy("shared").await;
    let cert = env.certificate().await;
    env.iot
        .attach_policy()
        .policy_name("shared")
        .target(&cert)
        .send()
        .await
        .expect("attached");
    assert_eq!(
        engine.delete_policy_if_unused("shared").await,
        Ok(PolicyRemoval::InUse {
            targets: vec![cert.clone()],
            total: 1
        })
    );
    assert!(env.api().get_policy("shared").await.unwrap().is_some());
}

/// Setup step 3: the pool roles check reads Cognito and IAM (moto for IAM and Cognito, and a
/// stand-in for GetIdentityPoolRoles, which moto lacks) and names the role and the actions it
/// lacks; a guest role counts only where the pool lets guests in.
#[tokio::test]
async fn the_pool_roles_check_names_the_role_and_the_missing_iot_actions() {
    use iot_operator::aws::roles::SdkRoles;
    use iot_operator::policy::iam::{check_pools, summarize};
    let env = Env::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let roles_file = dir.path().join("roles.json");
    std::fs::write(&roles_file, "{}").unwrap();
    let (_stub, port) = support::start_python(
        "cognito_roles_stub.py",
        &[&env.moto.url(), roles_file.to_str().unwrap()],
    );
    let config = test_sdk_config(&format!("http://127.0.0.1:{port}"));
    let iam = aws_sdk_iam::Client::new(&config);
    let source = SdkRoles::new(aws_sdk_cognitoidentity::Client::new(&config), iam.clone());
    // AWSIoTDataAccess's statement (moto does not load AWS managed policies).
    let data_access = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":["iot:Connect","iot:Publish","iot:Subscribe","iot:Receive","iot:GetThingShadow","iot:UpdateThingShadow","iot:DeleteThingShadow","iot:ListNamedShadowsForThing"],"Resource":"*"}]}"#;
    let policy_arn = iam
        .create_policy()
        .policy_name("IoTDataAccess")
        .policy_document(data_access)
        .send()
        .await
        .expect("policy")
        .policy()
        .and_then(|p| p.arn())
        .expect("arn")
        .to_owned();
    let mut arns = Vec::new();
    for role in ["app_auth", "app_guest"] {
        arns.push(support::iam_role(&iam, role).await);
    }
    iam.attach_role_policy()
        .role_name("app_auth")
        .policy_arn(&policy_arn)
        .send()
        .await
        .expect("attached");
    iam.put_role_policy()
        .role_name("app_guest")
        .policy_name("connect-only")
        .policy_document(r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"iot:Connect","Resource":"*"}}"#)
        .send()
        .await
        .expect("inline");
    let pool = env.pool().await; // lets guests in
    std::fs::write(
        &roles_file,
        serde_json::json!({&pool: {"authenticated": arns[0], "unauthenticated": arns[1]}})
            .to_string(),
    )
    .unwrap();
    let pools = vec![pool.clone()];

    // The guest role may only connect.
    let (ok, message) = summarize(&check_pools(&source, &pools).await.expect("checked"));
    assert_eq!(ok, Some(false), "{message}");
    for needle in [
        "role arn:aws:iam::123456789012:role/app_guest may not use iot:Publish, iot:Subscribe, iot:Receive",
        "unauthenticated role of",
        "AMQJS0008I",
    ] {
        assert!(message.contains(needle), "{needle}: {message}");
    }
    assert!(!message.contains("app_auth may not"), "{message}");

    // Fixed: both roles may use AWS IoT.
    iam.attach_role_policy()
        .role_name("app_guest")
        .policy_arn(&policy_arn)
        .send()
        .await
        .expect("attached");
    let (ok, message) = summarize(&check_pools(&source, &pools).await.expect("checked"));
    assert_eq!(ok, Some(true), "{message}");

    // A Deny in an inline policy wins over the attached Allow.
    iam.put_role_policy()
        .role_name("app_auth")
        .policy_name("no-receive")
        .policy_document(r#"{"Version":"2012-10-17","Statement":[{"Effect":"Deny","Action":"iot:Receive","Resource":"*"}]}"#)
        .send()
        .await
        .expect("inline");
    let (ok, message) = summarize(&check_pools(&source, &pools).await.expect("checked"));
    assert_eq!(ok, Some(false));
    assert!(
        message.contains("app_auth may not use iot:Receive"),
        "{message}"
    );

    // A pool without an authenticated role.
    std::fs::write(
        &roles_file,
        serde_json::json!({&pool: {"unauthenticated": arns[1]}}).to_string(),
    )
    .unwrap();
    let (ok, message) = summarize(&check_pools(&source, &pools).await.expect("checked"));
    assert_eq!(ok, Some(false));
    assert!(message.contains("has no authenticated role"), "{message}");
}
