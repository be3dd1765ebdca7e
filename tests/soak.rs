//! A bounded fault soak on loopback (default 45 s; `SOAK_SECS` sets it): a steady QoS 1 stream
//! runs through the relay (the `iot-operator bridge` command, its own process) while the source
//! and sink Mosquitto brokers are stopped and restarted at random moments; meanwhile the
//! policy-sync engine keeps changing a binding against moto's server while an SDK interceptor
//! throttles a third of the calls (a fault layer: moto cannot throttle). At the end every message
//! must have arrived at least once, the binding must match AWS, and the relay's memory must be
//! flat. Figures are printed (`--nocapture`).
//!
//! A second test SIGKILLs the relay process itself twice in the middle of a QoS 1 stream.
//!
//! Brokers are stopped with SIGTERM, which saves their persistence file. A SIGKILLed broker
//! loses what it acknowledged since its last save, and no client can recover that.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use iot_operator::aws::SdkIot;
use iot_operator::aws::retry::RetrySettings;
use iot_operator::policy::iot_api::IotApi;
use iot_operator::policy::{BindingInput, PolicyEngine, Protection, SyncMode, SyncOutcome};
use iot_operator::ratelimit::RateLimiter;
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use serde_json::json;
use support::faults::{Faults, Which};
use support::mqtt::Collector;
use support::{Mosquitto, Moto, Proc, cognito_identities, create_connect_policy, test_sdk_config};

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn block<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_and_policy_sync_survive_broker_restarts_and_throttling() {
    let secs: u64 = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(45);
    let duration = Duration::from_secs(secs);
    let rate_per_sec: u64 = 300;

    // ---- the relay, as its own process ----
    let mut source = Mosquitto::start(false);
    let mut sink = Mosquitto::start(false);
    let dir = tempfile::tempdir().unwrap();
    let manifest = json!({"apiVersion": "iot.operator.dev/v1alpha1", "kind": "TopicBridge",
        "metadata": {"name": "soak", "namespace": "default"},
        "spec": {"source": {"mqtt": {"url": source.tcp_url()}}, "sink": {"url": sink.tcp_url()},
                 "routes": [{"from": "soak/#", "qos": 1}]}});
    let file = dir.path().join("bridge.yaml");
    std::fs::write(&file, serde_yaml::to_string(&manifest).unwrap()).unwrap();
    let mut relay = spawn_relay(&file, &dir.path().join("relay.log"), 0);
    let pid = relay.pid();

    let collector = Collector::start(sink.tcp_port, "soak-collector", "soak/#", true).await;
    wait_for_relay(source.tcp_port, &collector, "soak/probe").await;

    // ---- the publisher: a persistent session that rumqttc resends after reconnects ----
    let mut opts = MqttOptions::new("soak-publisher", "127.0.0.1", source.tcp_port);
    opts.set_clean_session(false);
    opts.set_keep_alive(Duration::from_secs(10));
    opts.set_inflight(100);
    let (client, mut eventloop) = AsyncClient::new(opts, 100);
    let acked = Arc::new(AtomicU64::new(0));
    let stop_loop = Arc::new(AtomicBool::new(false));
    let poller = {
        let (acked, stop) = (acked.clone(), stop_loop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Incoming::PubAck(_))) => {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        })
    };
    let start = Instant::now();
    let publisher = tokio::spawn(async move {
        let mut sent = 0u64;
        let tick = Duration::from_millis(10);
        let per_tick = rate_per_sec / 100;
        while start.elapsed() < duration {
            for _ in 0..per_tick {
                client
                    .publish(
                        format!("soak/t{}", sent % 4),
                        QoS::AtLeastOnce,
                        false,
                        sent.to_string(),
                    )
                    .await
                    .expect("queued");
                sent += 1;
            }
            tokio::time::sleep(tick).await;
        }
        (client, sent)
    });

    // ---- AWS: the binding changes every round while a third of the calls are throttled ----
    let moto = Moto::start();
    let config = test_sdk_config(&moto.url());
    let iot_plain = aws_sdk_iot::Client::new(&config);
    let cognito = aws_sdk_cognitoidentity::Client::new(&config);
    create_connect_policy(&iot_plain, "soak").await;
    let ids = cognito_identities(&cognito, 12).await;
    let faults = Faults::throttling(Which::Percent(33));
    let injected = faults.injected.clone();
    let retry = RetrySettings {
        max_attempts: 4,
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
    };
    let throttled_iot = aws_sdk_iot::config::Builder::from(&config)
        .retry_config(retry.config())
        .interceptor(faults)
        .build();
    let api = SdkIot::new(
        aws_sdk_iot::Client::from_conf(throttled_iot),
        cognito.clone(),
        Arc::new(RateLimiter::new(0.0)),
        false,
        None,
    );
    let checker = SdkIot::new(
        iot_plain.clone(),
        cognito.clone(),
        Arc::new(RateLimiter::new(0.0)),
        false,
        None,
    );
    let engine = PolicyEngine::new(&api, 4);
    let mut applied = BindingInput::default();
    let (mut rounds, mut synced, mut not_synced) = (0, 0, 0);
    let mut restarts: HashMap<&str, usize> = HashMap::new();
    let mut rss = Vec::new();
    let mut next_fault = Instant::now() + Duration::from_millis(fastrand::u64(2000..5000));
    while start.elapsed() < duration {
        // A random desired set; the previous sync's memory carried over like status does.
        let desired: Vec<String> = ids.iter().filter(|_| fastrand::bool()).cloned().collect();
        let input = BindingInput {
            policy_name: "soak".into(),
            targets: desired.clone(),
            memory: applied.memory.clone(),
            ..Default::default()
        };
        let report = engine
            .sync(&input, &Protection::default(), SyncMode::Apply, false)
            .await;
        rounds += 1;
        if report.outcome == SyncOutcome::Synced {
            synced += 1;
            let now: BTreeSet<String> = checker.list_targets("soak").await.unwrap().items;
            assert_eq!(
                now,
                desired.iter().cloned().collect::<BTreeSet<_>>(),
                "round {rounds}"
            );
        } else {
            not_synced += 1;
        }
        applied.memory = report.memory.clone();

        if Instant::now() >= next_fault {
            let (name, broker) = if fastrand::bool() {
                ("source", &mut source)
            } else {
                ("sink", &mut sink)
            };
            block(|| broker.terminate());
            tokio::time::sleep(Duration::from_millis(fastrand::u64(200..2000))).await;
            block(|| broker.restart());
            *restarts.entry(name).or_default() += 1;
            next_fault = Instant::now() + Duration::from_millis(fastrand::u64(2000..6000));
        }
        if let Some(kib) = rss_kib(pid) {
            rss.push((start.elapsed(), kib));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // ---- the end: every message arrives ----
    let (client, sent) = publisher.await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    while acked.load(Ordering::Relaxed) < sent && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        acked.load(Ordering::Relaxed),
        sent,
        "the source acknowledged every message"
    );
    let received = wait_for_sequence(&collector, sent, deadline).await;
    stop_loop.store(true, Ordering::Relaxed);
    let _ = client.disconnect().await;
    poller.abort();
    let lost: Vec<u64> = (0..sent).filter(|n| !received.contains_key(n)).collect();
    let dups: usize = received.values().map(|c| c - 1).sum();
    if let Some(kib) = rss_kib(pid) {
        rss.push((start.elapsed(), kib));
    }
    let alive = rss_kib(pid).is_some();
    let _ = relay.terminate_and_wait(Duration::from_secs(15));
    // The relay's own log, into the test run's output (scanned for secrets by tests/run.sh).
    eprintln!(
        "{}",
        std::fs::read_to_string(dir.path().join("relay.log")).unwrap_or_default()
    );

    // Memory: the peak of the last third against the peak of the first third after warm-up.
    let third = rss.len() / 3;
    let early = rss[1..third.max(2)].iter().map(|r| r.1).max().unwrap_or(0);
    let late = rss[rss.len() - third.max(1)..]
        .iter()
        .map(|r| r.1)
        .max()
        .unwrap_or(0);
    println!(
        "soak: {secs} s, {sent} messages ({} msg/s), restarts source={} sink={}, lost={}, duplicated={dups}, relay RSS early peak {early} KiB, late peak {late} KiB; AWS: {rounds} syncs, {synced} synced, {not_synced} not (throttled), {} throttles injected",
        sent / secs.max(1),
        restarts.get("source").unwrap_or(&0),
        restarts.get("sink").unwrap_or(&0),
        lost.len(),
        injected.load(Ordering::Relaxed),
    );
    assert!(alive, "the relay process survived");
    assert!(
        lost.is_empty(),
        "{} lost, first {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    assert!(
        restarts.values().sum::<usize>() >= (secs as usize / 12).max(2),
        "too few restarts: {restarts:?}"
    );
    assert!(injected.load(Ordering::Relaxed) > 0 && synced > 0);
    assert!(
        late <= early + 8 * 1024,
        "relay memory grew from {early} KiB to {late} KiB"
    );
}

/// Waits until messages 0..total (numbered payloads) have all arrived, or the deadline passes;
/// returns how often each number arrived.
async fn wait_for_sequence(
    collector: &Collector,
    total: u64,
    deadline: Instant,
) -> HashMap<u64, usize> {
    loop {
        let mut seen = HashMap::<u64, usize>::new();
        for m in collector.snapshot() {
            if let Ok(n) = std::str::from_utf8(&m.payload).unwrap_or("").parse::<u64>() {
                *seen.entry(n).or_default() += 1;
            }
        }
        if seen.len() as u64 >= total || Instant::now() >= deadline {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Publishes probes on `topic` until one arrives: then the relay's subscription exists, and
/// nothing published later is lost for want of it.
async fn wait_for_relay(source_port: u16, collector: &Collector, topic: &str) {
    let start = Instant::now();
    while collector.count() == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "relay never came up"
        );
        support::mqtt::publish_all(
            source_port,
            "probe",
            vec![(topic.into(), b"probe".to_vec(), false)],
            QoS::AtLeastOnce,
        )
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `iot-operator bridge -f <file> --worker-threads <threads>` as its own process, its log in
/// `log`. 1 is the chart's default (tokio's current-thread scheduler), 0 one thread per CPU.
fn spawn_relay(file: &std::path::Path, log: &std::path::Path, threads: u32) -> Proc {
    let log = std::fs::File::create(log).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_iot-operator"))
        .args(["bridge", "-f", file.to_str().unwrap()])
        .args(["--worker-threads", &threads.to_string()])
        .env("AWS_REGION", "eu-west-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Proc::from_child(child, "iot-operator bridge")
}

/// The relay process itself is killed (SIGKILL: no drain, no goodbye) twice in the middle of a
/// QoS 1 stream and started again: the source's persistent session holds what was not
/// acknowledged, so every message still arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_relay_process_loses_nothing() {
    let source = Mosquitto::start(false);
    let sink = Mosquitto::start(false);
    // A clean-session subscriber on the sink from the start: on a loss it tells whether the
    // sink ever had the missing messages (the relay dropped them) or not (they never got there).
    let witness = Collector::start(sink.tcp_port, "killed-witness", "k/#", false).await;
    let dir = tempfile::tempdir().unwrap();
    let manifest = json!({"apiVersion": "iot.operator.dev/v1alpha1", "kind": "TopicBridge",
        "metadata": {"name": "killed", "namespace": "default"},
        "spec": {"source": {"mqtt": {"url": source.tcp_url()}}, "sink": {"url": sink.tcp_url()},
                 "routes": [{"from": "k/#", "qos": 1}]}});
    let file = dir.path().join("bridge.yaml");
    std::fs::write(&file, serde_yaml::to_string(&manifest).unwrap()).unwrap();
    let mut relay = spawn_relay(&file, &dir.path().join("relay-0.log"), 1);
    let collector = Collector::start(sink.tcp_port, "killed-collector", "k/#", true).await;
    wait_for_relay(source.tcp_port, &collector, "k/probe").await;
    let total = 6000u64;
    let mut kills = 0;
    for part in 0..3u64 {
        let messages = (part * total / 3..(part + 1) * total / 3)
            .map(|n| (format!("k/{}", n % 3), n.to_string().into_bytes(), false))
            .collect();
        // Published while the relay runs (or, after a kill, while it is down).
        support::mqtt::publish_all(source.tcp_port, "killed-pub", messages, QoS::AtLeastOnce).await;
        if part < 2 {
            relay.kill();
            kills += 1;
            tokio::time::sleep(Duration::from_millis(300)).await;
            relay = spawn_relay(
                &file,
                &dir.path().join(format!("relay-{}.log", part + 1)),
                1,
            );
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let seen = wait_for_sequence(&collector, total, deadline).await;
    let _ = relay.terminate_and_wait(Duration::from_secs(10));
    let lost = (0..total).filter(|n| !seen.contains_key(n)).count();
    let dups: usize = seen.values().map(|c| c - 1).sum();
    println!(
        "relay killed {kills} times during {total} QoS 1 messages: lost={lost}, duplicated={dups}"
    );
    if lost > 0 {
        // Keep what a reader needs to find out why: the missing numbers as ranges, and the relay
        // logs, whose directory is no longer deleted.
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for n in (0..total).filter(|n| !seen.contains_key(n)) {
            match ranges.last_mut() {
                Some((_, end)) if *end + 1 == n => *end = n,
                _ => ranges.push((n, n)),
            }
        }
        let numbers = |c: &Collector| -> BTreeSet<u64> {
            c.snapshot()
                .iter()
                .filter_map(|m| std::str::from_utf8(&m.payload).ok()?.parse().ok())
                .collect()
        };
        let at_sink = numbers(&witness)
            .iter()
            .filter(|n| !seen.contains_key(n))
            .count();
        // What the brokers still hold for the relay's source session and the collector's.
        drop(collector);
        let mut held = Vec::new();
        for (port, id) in [
            (source.tcp_port, "iotop-default-killed"),
            (sink.tcp_port, "killed-collector"),
        ] {
            let session = Collector::start(port, id, "none/#", true).await;
            tokio::time::sleep(Duration::from_secs(3)).await;
            held.push(numbers(&session).len());
        }
        let kept = dir.keep();
        eprintln!(
            "missing: {ranges:?}; of them the sink's witness saw {at_sink}; queued for the relay at the source: {}, for the collector at the sink: {}; relay logs kept in {}",
            held[0],
            held[1],
            kept.display()
        );
        for i in 0..=kills {
            let log = kept.join(format!("relay-{i}.log"));
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            eprintln!("--- {} (last 40 lines)", log.display());
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
    assert_eq!(lost, 0, "messages lost across relay kills");
}
