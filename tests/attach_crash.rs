//! `iot-operator attach --state` killed at random points of a sync, many times, against moto:
//! then every target is removed, and AWS must hold no pair the binding attached and every pair
//! it found. The binary runs as users run it (its own process, SIGKILL and SIGINT).

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{Moto, create_connect_policy, identity_pool, test_sdk_config};

fn manifest(path: &Path, ids: &[String], pools: &[String]) {
    let spec = serde_json::json!({
        "apiVersion": "iot.operator.dev/v1alpha1",
        "kind": "IotPolicyBinding",
        "metadata": {"name": "crash", "namespace": "default"},
        "spec": {
            "policy": {"name": "p"},
            "region": "eu-west-1",
            "principals": {"cognitoIdentityIds": ids, "cognitoIdentityPools": pools},
        },
    });
    std::fs::write(path, serde_yaml::to_string(&spec).expect("yaml")).expect("manifest written");
}

fn attach(endpoint: &str, file: &Path, state: &Path, log: &Path) -> Command {
    let mut cmd = support::operator_command();
    cmd.args(["attach", "-f"])
        .arg(file)
        .arg("--state")
        .arg(state)
        .args(["--aws-endpoint-url", endpoint])
        // Slow enough that a kill lands in the middle of the attaches.
        .args(["--aws-rate-limit", "20", "--aws-concurrency", "2"])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(log).expect("log"))
        .stderr(std::fs::File::create(log.with_extension("err")).expect("log"));
    cmd
}

async fn attached(iot: &aws_sdk_iot::Client) -> BTreeSet<String> {
    iot.list_targets_for_policy()
        .policy_name("p")
        .send()
        .await
        .expect("targets listed")
        .targets()
        .iter()
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn attach_killed_at_random_points_leaves_no_pair_behind_and_takes_no_foreign_pair() {
    let moto = Moto::start();
    let sdk = test_sdk_config(&moto.url());
    let iot = aws_sdk_iot::Client::new(&sdk);
    let cognito = aws_sdk_cognitoidentity::Client::new(&sdk);
    create_connect_policy(&iot, "p").await;
    let (pool, members) = identity_pool(&cognito, "crash", 24).await;
    let (_, explicit) = identity_pool(&cognito, "explicit", 12).await;
    // Pairs someone else made before any binding: never detached.
    let foreign: BTreeSet<String> = [&members[3], &members[7], &explicit[2]]
        .into_iter()
        .cloned()
        .collect();
    for t in &foreign {
        iot.attach_policy()
            .policy_name("p")
            .target(t)
            .send()
            .await
            .expect("attached");
    }
    let variants: Vec<(Vec<String>, Vec<String>)> = vec![
        (explicit[..6].to_vec(), vec![pool.clone()]),
        (explicit[3..10].to_vec(), vec![]),
        (explicit[5..11].to_vec(), vec![pool.clone()]),
    ];
    let dir = tempfile::tempdir().expect("tempdir");
    let (file, state) = (
        dir.path().join("binding.yaml"),
        dir.path().join("state.json"),
    );
    let endpoint = moto.url();
    let (mut killed_mid_sync, mut interrupted, rounds) = (0, 0, 24);
    for round in 0..rounds {
        let (ids, pools) = &variants[fastrand::usize(..variants.len())];
        manifest(&file, ids, pools);
        let log = dir.path().join(format!("round-{round}.log"));
        let mut child = attach(&endpoint, &file, &state, &log)
            .spawn()
            .expect("attach started");
        tokio::time::sleep(Duration::from_millis(fastrand::u64(40..900))).await;
        let sigint = round % 4 == 3;
        let running = child.try_wait().expect("wait").is_none();
        let signal = if sigint { libc::SIGINT } else { libc::SIGKILL };
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, signal) };
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = child.try_wait().expect("wait") {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "attach did not stop after a signal"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let out = std::fs::read_to_string(&log).unwrap_or_default();
        if running && sigint && out.contains("Interrupted") {
            interrupted += 1;
            assert_eq!(status.code(), Some(1), "{out}");
        } else if running && !sigint {
            killed_mid_sync += 1;
        }
        // Whatever happened, the state file is whole.
        if state.exists() {
            let text = std::fs::read_to_string(&state).expect("state read");
            serde_json::from_str::<serde_json::Value>(&text)
                .unwrap_or_else(|e| panic!("round {round}: torn state file ({e}): {text}"));
        }
    }
    // Remove every target but one that no variant used.
    let sentinel = explicit[11].clone();
    manifest(&file, std::slice::from_ref(&sentinel), &[]);
    let log = dir.path().join("last.log");
    let status = attach(&endpoint, &file, &state, &log)
        .status()
        .expect("last attach ran");
    let out = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "{out}");
    let mut want = foreign.clone();
    want.insert(sentinel);
    let left = attached(&iot).await;
    println!(
        "{rounds} rounds: {killed_mid_sync} killed (SIGKILL) while running, {interrupted} stopped by SIGINT between calls; pairs left {} (want {})",
        left.len(),
        want.len()
    );
    support::assert_pairs_left(&left, &want);
    assert!(
        killed_mid_sync >= rounds / 3,
        "too few kills landed while attach ran ({killed_mid_sync}): the test proves little"
    );
}
