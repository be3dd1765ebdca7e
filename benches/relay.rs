//! The relay side by side with Mosquitto's own bridge, on the same brokers, in one run:
//!   (a) publisher -> Mosquitto A -> iot-operator relay (its own process) -> Mosquitto B -> subscriber
//!   (b) publisher -> Mosquitto A -> Mosquitto A's built-in bridge -> Mosquitto B -> subscriber
//!   (c) publisher -> Mosquitto B -> subscriber (the ceiling no relay can beat)
//! Prints Markdown tables: throughput (QoS 0/1, 100 B/4 KiB), latency at a fixed rate, the relay
//! process's peak RSS and CPU time, and the memory of idle bridges.
//!
//! `cargo bench --bench relay` (Mosquitto from `bash tests/run.sh`). Environment:
//! BENCH_MESSAGES (100000), BENCH_RATE (2000 msg/s), BENCH_LATENCY_SECONDS (10),
//! BENCH_IDLE_BRIDGES (1000), BENCH_SECTIONS (`idle,throughput,cclients,latency`; `many` adds
//! BENCH_MANY_BRIDGES (500) bridges in one relay process against Mosquitto with as many
//! `connection` sections, at BENCH_MANY_RATE (20) msg/s each for BENCH_MANY_SECONDS (20), the
//! relay on each of BENCH_MANY_THREADS (`1,2`) worker threads (with BENCH_BASELINE_BIN, that
//! build too, with 1 bridge and with all sharing their connections; BENCH_MANY_ROUNDS (1) runs
//! those rows that many times, the two builds alternating, and prints the medians); `idle-shared`
//! in place of `idle` measures idle bridges that share one sink connection; `instructions` adds
//! the relay's instructions per message under callgrind, which needs valgrind; `shared` adds
//! one bridge with 1, 2 and 4 connections on a shared subscription), BENCH_CASES (all of
//! `0/100,0/4096,1/100,1/4096`: QoS/payload), BENCH_RELAY_THREADS (the relay process's
//! `--worker-threads`; default: one per CPU), BENCH_BASELINE_BIN (another `iot-operator` binary,
//! say a build of the previous commit: its relay runs beside this one on the same brokers, the
//! two taking turns, and a table gives this one's throughput over the baseline's),
//! BENCH_RELAY_BIN (measure this binary instead of the bench's own build),
//! BENCH_CALLGRIND_DIR (keep the callgrind profiles there). Section `cclients` drives the
//! topologies with Mosquitto's C clients instead (`mosquitto_pub -l`, 100 in flight, and
//! `mosquitto_sub`), BENCH_C_RUNS (3) runs each, medians, each run's rate and relay CPU on
//! stderr; BENCH_C_CASES (`1/100/50000,1/4096/50000,
//! 0/100/100000`: QoS/payload/messages; the last is the QoS 0 burst).

#[path = "../tests/support/mod.rs"]
mod support;
#[path = "support/usage.rs"]
mod usage;

use std::sync::Arc;
use std::time::{Duration, Instant};

use iot_operator::api::{Direction, RetainHandling};
use iot_operator::relay::{Endpoint, RelayConfig, RelayManager, RouteConfig, SideState};
use iot_operator::topic::{TopicFilter, TopicTemplate};
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, Outgoing, QoS};
use support::{Mosquitto, Proc};
use usage::{process_times, process_times_with_children, process_usage, status_kib};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn options(port: u16, role: &str) -> MqttOptions {
    let mut o = MqttOptions::new(
        format!("bench-{role}-{}", fastrand::u32(..)),
        "127.0.0.1",
        port,
    );
    o.set_max_packet_size(1 << 20, 1 << 20);
    o.set_inflight(100);
    o.set_keep_alive(Duration::from_secs(60));
    o
}

/// Result of one run.
struct Outcome {
    delivered: usize,
    rate: f64,
    latencies_us: Vec<u64>,
}

/// One measured case.
struct Case<'a> {
    pub_port: u16,
    sub_port: u16,
    /// Published to `<prefix>/<k>`.
    prefix: &'a str,
    /// What the subscriber reads.
    filter: &'a str,
    qos: QoS,
    messages: usize,
    payload: usize,
    /// Paced at this many msg/s (and latency recorded), or as fast as possible.
    rate: Option<u64>,
    /// Published round-robin to `<prefix>/<i>/x` for i below this (one topic per bridge of
    /// the `many` section), instead of `<prefix>/<k mod 8>`.
    topics: Option<usize>,
}

/// Publishes the case's messages and counts what the subscriber receives. The first 8 payload
/// bytes carry the send time for latency.
async fn run(case: Case<'_>) -> Outcome {
    let Case {
        pub_port,
        sub_port,
        prefix,
        filter,
        qos,
        messages: n,
        payload,
        rate,
        topics,
    } = case;
    let (sub, mut sub_loop) = AsyncClient::new(options(sub_port, "sub"), 10_000);
    sub.subscribe(filter, qos).await.unwrap();
    loop {
        if let Ok(Event::Incoming(Incoming::SubAck(_))) = sub_loop.poll().await {
            break;
        }
    }
    let base = Instant::now();
    let measure = rate.is_some();
    let counter = tokio::spawn(async move {
        let (mut got, mut last, mut lat) = (0usize, Instant::now(), Vec::new());
        loop {
            match tokio::time::timeout(Duration::from_secs(3), sub_loop.poll()).await {
                Ok(Ok(Event::Incoming(Incoming::Publish(p)))) => {
                    got += 1;
                    last = Instant::now();
                    if measure && p.payload.len() >= 8 {
                        let sent = u64::from_le_bytes(p.payload[..8].try_into().unwrap());
                        lat.push(
                            (last.duration_since(base).as_nanos() as u64).saturating_sub(sent)
                                / 1000,
                        );
                    }
                    if got >= n {
                        break;
                    }
                }
                Ok(Ok(_)) => {}
                _ => break,
            }
        }
        (got, last, lat)
    });
    let (publisher, mut pub_loop) = AsyncClient::new(options(pub_port, "pub"), 10_000);
    let prefix = prefix.to_owned();
    let start = Instant::now();
    let feeder = tokio::spawn(async move {
        let mut tick = rate.map(|r| {
            let mut i = tokio::time::interval(Duration::from_nanos(1_000_000_000 / r.max(1)));
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            i
        });
        for k in 0..n {
            if let Some(t) = tick.as_mut() {
                t.tick().await;
            }
            let mut body = vec![b'x'; payload.max(8)];
            let sent = base.elapsed().as_nanos() as u64;
            body[..8].copy_from_slice(&sent.to_le_bytes());
            let topic = match topics {
                Some(m) => format!("{prefix}/{}/x", k % m),
                None => format!("{prefix}/{}", k % 8),
            };
            publisher.publish(topic, qos, false, body).await.unwrap();
        }
        publisher
    });
    let mut done = 0;
    while done < n {
        match pub_loop.poll().await {
            Ok(Event::Incoming(Incoming::PubAck(_))) if qos == QoS::AtLeastOnce => done += 1,
            Ok(Event::Outgoing(Outgoing::Publish(_))) if qos == QoS::AtMostOnce => done += 1,
            Ok(_) => {}
            Err(e) => panic!("publisher: {e}"),
        }
    }
    let _publisher = feeder.await.unwrap();
    let drain = tokio::spawn(async move { while pub_loop.poll().await.is_ok() {} });
    let (got, last, latencies_us) = counter.await.unwrap();
    drain.abort();
    Outcome {
        delivered: got,
        rate: got as f64 / last.duration_since(start).as_secs_f64(),
        latencies_us,
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// The relay binary measured: this build, or `BENCH_RELAY_BIN` (a build with symbols, say, for
/// `callgrind_annotate`).
fn this_relay() -> String {
    std::env::var("BENCH_RELAY_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_iot-operator").into())
}

/// The relay as its own process: `<bin> bridge -f <manifest>`, relaying `<prefix>/#` to
/// `out/<prefix>/...`.
fn start_relay_process(
    bin: &str,
    prefix: &str,
    a: &Mosquitto,
    b: &Mosquitto,
    dir: &std::path::Path,
) -> Proc {
    start_relay_under(&[bin], prefix, a, b, dir)
}

/// [`start_relay_process`] with the command line prefixed (`valgrind ... <bin>`).
fn start_relay_under(
    command: &[&str],
    prefix: &str,
    a: &Mosquitto,
    b: &Mosquitto,
    dir: &std::path::Path,
) -> Proc {
    start_relay_from(command, prefix, &a.tcp_url(), b, dir, 1)
}

/// [`start_relay_under`] reading from the broker at `source_url`, with `connections` connections
/// on one shared subscription (more than one: each its own client ids, the broker splitting the
/// stream between them).
fn start_relay_from(
    command: &[&str],
    prefix: &str,
    source_url: &str,
    b: &Mosquitto,
    dir: &std::path::Path,
    connections: usize,
) -> Proc {
    let mut manifest = serde_json::json!({
        "apiVersion": "iot.operator.dev/v1alpha1", "kind": "TopicBridge",
        "metadata": {"name": format!("bench-{prefix}"), "namespace": "bench"},
        "spec": {"source": {"mqtt": {"url": source_url}}, "sink": {"url": b.tcp_url()},
                 "routes": [{"from": format!("{prefix}/#"), "to": "out/{topic}", "qos": 1}]}
    });
    if connections > 1 {
        manifest["spec"]["connections"] = serde_json::json!(connections);
        manifest["spec"]["routes"][0]["shareGroup"] = serde_json::json!("bench");
    }
    let threads = std::env::var("BENCH_RELAY_THREADS").unwrap_or_else(|_| "0".into());
    spawn_bridge_command(
        command,
        &dir.join(format!("bridge-{prefix}.yaml")),
        &serde_yaml::to_string(&manifest).unwrap(),
        &threads,
    )
}

/// `<command> --log-level warn bridge -f <file>` with `manifest` written to `file`, on
/// `threads` worker threads (0: one per CPU).
fn spawn_bridge_command(
    command: &[&str],
    file: &std::path::Path,
    manifest: &str,
    threads: &str,
) -> Proc {
    std::fs::write(file, manifest).unwrap();
    let child = std::process::Command::new(command[0])
        .args(&command[1..])
        .args([
            "--log-level",
            "warn",
            "bridge",
            "-f",
            file.to_str().unwrap(),
        ])
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("IOT_OPERATOR_WORKER_THREADS", threads)
        .spawn()
        .expect("relay process");
    Proc::from_child(child, "iot-operator")
}

/// Instructions the relay process executes per relayed message, counted by callgrind (which,
/// unlike time, does not move with the machine's load): the difference between a run relaying
/// `many` messages and one relaying `few`, so start-up and idle costs cancel out.
async fn instructions_per_message(
    bin: &str,
    a: &Mosquitto,
    b: &Mosquitto,
    dir: &std::path::Path,
    qos: QoS,
    payload: usize,
) -> Option<f64> {
    let (few, many) = (2_000usize, 22_000usize);
    let mut totals = Vec::new();
    for (round, count) in [few, many].into_iter().enumerate() {
        // A topic prefix and client id of its own per run: no session, and no message left
        // over from an earlier run, reaches this one.
        let prefix = format!("i{}", fastrand::u32(..));
        let filter = format!("out/{prefix}/#");
        // BENCH_CALLGRIND_DIR keeps the profiles (for callgrind_annotate).
        let keep = std::env::var("BENCH_CALLGRIND_DIR").ok();
        let out = keep
            .as_deref()
            .map_or(dir, std::path::Path::new)
            .join(format!(
                "callgrind-{}-q{}-{payload}-{round}.out",
                if bin == this_relay() {
                    "this"
                } else {
                    "baseline"
                },
                qos as u8
            ));
        let out_arg = format!("--callgrind-out-file={}", out.display());
        let mut relay = start_relay_under(
            &["valgrind", "--tool=callgrind", "--quiet", &out_arg, bin],
            &prefix,
            a,
            b,
            dir,
        );
        let case = |messages| Case {
            pub_port: a.tcp_port,
            sub_port: b.tcp_port,
            prefix: &prefix,
            filter: &filter,
            qos,
            messages,
            payload,
            rate: None,
            topics: None,
        };
        // Until one message goes through: the relay under callgrind starts slowly.
        let up = Instant::now();
        while run(case(1)).await.delivered == 0 {
            if up.elapsed() > Duration::from_secs(120) {
                eprintln!("the relay under callgrind did not start");
                return None;
            }
        }
        let done = run(case(count)).await;
        if done.delivered < count {
            eprintln!(
                "callgrind run delivered {} of {count} messages",
                done.delivered
            );
        }
        relay.terminate_and_wait(Duration::from_secs(60))?;
        let text = std::fs::read_to_string(&out).ok()?;
        let total: u64 = text
            .lines()
            .find_map(|l| {
                l.strip_prefix("summary:")
                    .or_else(|| l.strip_prefix("totals:"))
            })
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())?;
        totals.push(total);
    }
    Some((totals[1] as f64 - totals[0] as f64) / (many - few) as f64)
}

/// One bridge with 1, 2 and 4 connections on a shared subscription, reading from
/// `source_url` (broker A, or a proxy in front of it), `n` QoS 1 messages of 100 B each; prints
/// a table row per run with the ratio to one connection.
async fn shared_table(
    a: &Mosquitto,
    b: &Mosquitto,
    source_url: &str,
    name: &str,
    n: usize,
    dir: &std::path::Path,
) {
    println!("| connections | relay msg/s | / one connection | lost |");
    println!("|---:|---:|---:|---:|");
    let mut one = None;
    for connections in [1usize, 2, 4] {
        let prefix = format!("{name}{connections}");
        let mut relay =
            start_relay_from(&[&this_relay()], &prefix, source_url, b, dir, connections);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let filter = format!("out/{prefix}/#");
        let r = run(Case {
            pub_port: a.tcp_port,
            sub_port: b.tcp_port,
            prefix: &prefix,
            filter: &filter,
            qos: QoS::AtLeastOnce,
            messages: n,
            payload: 100,
            rate: None,
            topics: None,
        })
        .await;
        relay.terminate_and_wait(Duration::from_secs(30));
        let base = *one.get_or_insert(r.rate);
        println!(
            "| {connections} | {:.0} | {:.2} | {} |",
            r.rate,
            r.rate / base,
            n - r.delivered
        );
    }
}

/// `socat -b 262144` forwarding a free port to `to`, if socat is installed.
fn start_pump(to: u16) -> Option<(u16, std::process::Child)> {
    let port = support::free_port();
    let child = std::process::Command::new("socat")
        .args(["-b", "262144"])
        .arg(format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork"))
        .arg(format!("TCP:127.0.0.1:{to}"))
        .stdin(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            eprintln!("socat did not listen on {port}; no byte pump row");
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Some((port, child))
}

/// One run driven by Mosquitto's C clients: `mosquitto_sub -C n` on `sub_port` reading
/// `filter`, then `mosquitto_pub -l -M 100` on `pub_port` publishing each line of `input` to
/// `topic`. Returns messages received and the rate from the publisher's start to the last one.
fn run_c(
    pub_port: u16,
    sub_port: u16,
    topic: &str,
    filter: &str,
    qos: u8,
    n: usize,
    input: &std::path::Path,
) -> (usize, f64) {
    use std::io::Read;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let id = fastrand::u32(..);
    let mut sub = std::process::Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &sub_port.to_string(), "-t", filter])
        .args(["-q", &qos.to_string(), "-C", &n.to_string(), "-F", "."])
        .args(["-i", &format!("bench-csub-{id}")])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("mosquitto_sub (Debian package mosquitto-clients)");
    let mut out = sub.stdout.take().expect("piped");
    let got = Arc::new(AtomicUsize::new(0));
    let counting = got.clone();
    // Each message is one "." line.
    let counter = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        let mut last = Instant::now();
        while let Ok(k) = out.read(&mut buf) {
            if k == 0 {
                break;
            }
            let lines = buf[..k].iter().filter(|b| **b == b'\n').count();
            counting.fetch_add(lines, Ordering::Relaxed);
            last = Instant::now();
        }
        last
    });
    // mosquitto_sub says nothing once subscribed; a local SUBACK takes well under this.
    std::thread::sleep(Duration::from_millis(500));
    let start = Instant::now();
    let status = std::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &pub_port.to_string(), "-t", topic])
        .args(["-q", &qos.to_string(), "-M", "100", "-l"])
        .args(["-i", &format!("bench-cpub-{id}")])
        .stdin(std::fs::File::open(input).expect("input"))
        .status()
        .expect("mosquitto_pub (Debian package mosquitto-clients)");
    assert!(status.success(), "mosquitto_pub: {status}");
    // The subscriber exits after n messages; one that stops receiving for 5 s is stopped.
    let (mut seen, mut since) = (0, Instant::now());
    while sub.try_wait().ok().flatten().is_none() {
        std::thread::sleep(Duration::from_millis(50));
        let now = got.load(Ordering::Relaxed);
        if now != seen {
            (seen, since) = (now, Instant::now());
        } else if since.elapsed() > Duration::from_secs(5) {
            let _ = sub.kill();
            let _ = sub.wait();
            break;
        }
    }
    let last = counter.join().expect("counter");
    let got = got.load(Ordering::Relaxed);
    (got, got as f64 / last.duration_since(start).as_secs_f64())
}

/// The topic prefix group `i` of `groups` carries: all of `root/` when there is one group,
/// `root/<i>/` otherwise.
fn many_group(root: &str, groups: usize, i: usize) -> String {
    if groups == 1 {
        format!("{root}/")
    } else {
        format!("{root}/{i}/")
    }
}

/// Mosquitto configuration lines for `sections` bridge connections to the broker on `port`:
/// with one section, it carries all of `many-b/#`; with more, section i carries `many-b/<i>/#`
/// only, as one TopicBridge per device group would.
fn mosquitto_bridges(sections: usize, port: u16) -> String {
    let mut conf = String::new();
    for i in 0..sections {
        let group = many_group("many-b", sections, i);
        let topic = format!("topic # out 1 {group} out/{group}");
        // Names (and so the client ids at broker B) differ between the two brokers: one
        // name on both would have each bridge take the other's session over, again and again.
        conf.push_str(&format!(
            "connection many-{sections}-{i}\naddress 127.0.0.1:{port}\n{topic}\ncleansession false\ntry_private false\nrestart_timeout 1\nbridge_protocol_version mqttv311\n"
        ));
    }
    conf
}

/// Which connections the bridges of a relay process share.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sharing {
    None,
    Sink,
    Both,
}

/// A relay process running `bridges` TopicBridges from one manifest: bridge i relays
/// `many-r/<i>/#` (all of `many-r/#` when there is one) from `source` to `out/<topic>` on `b`.
fn start_many_relay(
    bin: &str,
    source: &Mosquitto,
    b: &Mosquitto,
    bridges: usize,
    threads: usize,
    shared: Sharing,
    dir: &std::path::Path,
) -> Proc {
    // A namespace of its own per process: client ids (and so persistent sessions, with what
    // the broker queued for them) are never those of an earlier run.
    let namespace = format!("many{}", fastrand::u32(..));
    let mut manifest = String::new();
    for i in 0..bridges {
        let from = format!("{}#", many_group("many-r", bridges, i));
        let mut doc = serde_json::json!({
            "apiVersion": "iot.operator.dev/v1alpha1", "kind": "TopicBridge",
            "metadata": {"name": format!("many-{i}"), "namespace": namespace},
            "spec": {"source": {"mqtt": {"url": source.tcp_url()}}, "sink": {"url": b.tcp_url()},
                     "routes": [{"from": from, "to": "out/{topic}", "qos": 1}]}
        });
        if shared != Sharing::None {
            // One sink connection for all the bridges (same url, client id and credentials).
            doc["spec"]["sink"]["clientId"] = serde_json::json!(format!("{namespace}-sink"));
        }
        if shared == Sharing::Both {
            // And one source connection.
            doc["spec"]["source"]["clientId"] = serde_json::json!(format!("{namespace}-source"));
        }
        manifest.push_str("---\n");
        manifest.push_str(&serde_yaml::to_string(&doc).unwrap());
    }
    spawn_bridge_command(
        &[bin],
        &dir.join(format!("{namespace}.yaml")),
        &manifest,
        &threads.to_string(),
    )
}

/// Current RSS of a process, KiB.
fn rss_kib(pid: u32) -> u64 {
    status_kib(&format!("/proc/{pid}/status"), "VmRSS:")
}

/// The `many` section: `BENCH_MANY_BRIDGES` (500) bridges in one relay process against one
/// bridge, and Mosquitto with as many `connection` sections against one, at
/// `BENCH_MANY_RATE` (20) QoS 1 messages of 100 B per bridge and second in all, for
/// `BENCH_MANY_SECONDS` (20), relay on each of `BENCH_MANY_THREADS` (`1,2`) worker threads;
/// with `BENCH_BASELINE_BIN`, that build too, with one bridge and with 500 sharing their
/// source and sink connections.
async fn many_bridges(b: &Mosquitto, dir: &std::path::Path) {
    let bridges = env_or("BENCH_MANY_BRIDGES", 500) as usize;
    let rate = env_or("BENCH_MANY_RATE", 20) * bridges as u64;
    let messages = (rate * env_or("BENCH_MANY_SECONDS", 20)) as usize;
    // Fresh source brokers, so that their memory compares.
    let one = Mosquitto::start_with(false, &mosquitto_bridges(1, b.tcp_port));
    let many = Mosquitto::start_with(false, &mosquitto_bridges(bridges, b.tcp_port));
    println!(
        "\n## {bridges} bridges in one process ({rate} msg/s in all: QoS 1, 100 B, {messages} messages over {bridges} topics)\n"
    );
    println!(
        "| path | bridges | relay threads | msg/s | lost | source broker µs/msg | broker B µs/msg | relay µs/msg | path µs/msg | / 1 bridge | p50 µs | p99 µs | added p50 µs | added p99 µs | RSS MiB after (relay, or Mosquitto source) | KiB per added bridge at rest |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let case = |pub_port, prefix, filter, n, rate| Case {
        pub_port,
        sub_port: b.tcp_port,
        prefix,
        filter,
        qos: QoS::AtLeastOnce,
        messages: n,
        payload: 100,
        rate,
        topics: Some(bridges),
    };
    // Until one message on every topic goes through: bridges are up.
    let warm = |pub_port, prefix: &'static str, filter: &'static str| async move {
        let up = Instant::now();
        while run(case(pub_port, prefix, filter, bridges, None))
            .await
            .delivered
            < bridges
        {
            if up.elapsed() > Duration::from_secs(120) {
                panic!("{prefix}: bridges not up after 120 s");
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let mut direct = (0i64, 0i64);
    let mut one_bridge = std::collections::HashMap::new();
    let mut one_rss = std::collections::HashMap::new();
    let this = this_relay();
    let baseline = std::env::var("BENCH_BASELINE_BIN").ok();
    const SHARED_BOTH: &str = "relay, one shared source and sink connection";
    // (path, bridges, relay threads: 0 for none, the relay's build: None for this one)
    let mut rows: Vec<(&str, usize, usize, Option<&str>)> = vec![
        ("direct", 0usize, 0usize, None),
        ("Mosquitto bridge", 1, 0, None),
        ("Mosquitto bridge", bridges, 0, None),
    ];
    let thread_counts = std::env::var("BENCH_MANY_THREADS").unwrap_or_else(|_| "1,2".into());
    // The shared rows again, this build and the baseline alternating which goes first: one
    // run of a row moves by up to 10% (three runs of one build gave 1.47 to 1.69).
    let rounds = env_or("BENCH_MANY_ROUNDS", 1).max(1) as usize;
    for threads in thread_counts
        .split(',')
        .filter_map(|t| t.trim().parse().ok())
    {
        rows.push(("relay", 1, threads, None));
        rows.push(("relay", bridges, threads, None));
        rows.push(("relay, one shared sink connection", bridges, threads, None));
        rows.push((SHARED_BOTH, bridges, threads, None));
        if let Some(bin) = baseline.as_deref() {
            // Taking turns with this build's rows of the same kind.
            rows.push(("relay", 1, threads, Some(bin)));
            rows.push((SHARED_BOTH, bridges, threads, Some(bin)));
        }
        for round in 1..rounds {
            let mut builds = vec![None];
            if let Some(bin) = baseline.as_deref() {
                builds.push(Some(bin));
                if round % 2 == 1 {
                    builds.reverse();
                }
            }
            for build in builds {
                rows.push(("relay", 1, threads, build));
                rows.push((SHARED_BOTH, bridges, threads, build));
            }
        }
    }
    // Per (relay threads, baseline or not): the relay's µs per message with one bridge, and
    // with all sharing their connections, in each round.
    let mut shared_rounds: std::collections::BTreeMap<(usize, bool), Vec<(f64, f64)>> =
        Default::default();
    for (path, count, threads, build) in rows {
        // Each relay process reads from a fresh source broker: the persistent sessions an
        // earlier process left there (its bridges' subscriptions, queuing every message
        // published since) would otherwise load it.
        let source = Mosquitto::start(false);
        let (mut relay, src, prefix, filter) = match (path, count) {
            ("direct", _) => (None, b, "out/many-c", "out/many-c/#"),
            ("Mosquitto bridge", 1) => (None, &one, "many-b", "out/many-b/#"),
            ("Mosquitto bridge", _) => (None, &many, "many-b", "out/many-b/#"),
            _ => (
                Some(start_many_relay(
                    build.unwrap_or(&this),
                    &source,
                    b,
                    count,
                    threads,
                    match path {
                        "relay" => Sharing::None,
                        "relay, one shared sink connection" => Sharing::Sink,
                        _ => Sharing::Both,
                    },
                    dir,
                )),
                &source,
                "many-r",
                "out/many-r/#",
            ),
        };
        warm(src.tcp_port, prefix, filter).await;
        let pids = [
            // Direct: the source is broker B, counted once.
            if path == "direct" {
                0
            } else {
                src.pid().unwrap_or(0)
            },
            b.pid().unwrap_or(0),
            relay.as_ref().map_or(0, |r| r.pid()),
        ];
        // Memory of the relay process, or of the source broker running Mosquitto's bridges.
        let rss_now = || match &relay {
            Some(r) => rss_kib(r.pid()),
            None => rss_kib(pids[0]),
        };
        // At rest, all bridges up.
        let at_rest = rss_now();
        let cpu = || pids.map(|pid| if pid == 0 { 0.0 } else { process_usage(pid).1 });
        let before = cpu();
        let mut o = run(case(src.tcp_port, prefix, filter, messages, Some(rate))).await;
        let after = cpu();
        o.latencies_us.sort_unstable();
        let (p50, p99) = (
            percentile(&o.latencies_us, 0.5) as i64,
            percentile(&o.latencies_us, 0.99) as i64,
        );
        if path == "direct" {
            direct = (p50, p99);
        }
        let per = |i: usize| (after[i] - before[i]) * 1e6 / o.delivered.max(1) as f64;
        let (src_cpu, b_cpu, relay_cpu) = (per(0), per(1), per(2));
        let rss = rss_now();
        let is_relay = relay.is_some();
        let key = (is_relay, threads, build.is_some());
        if is_relay && (count == 1 || path == SHARED_BOTH) {
            let runs = shared_rounds.entry((threads, build.is_some())).or_default();
            if count == 1 {
                runs.push((relay_cpu, 0.0));
            } else if let Some(last) = runs.last_mut() {
                last.1 = relay_cpu;
            }
        }
        let (ratio, per_bridge) = if count == 1 {
            one_bridge.insert(key, if is_relay { relay_cpu } else { src_cpu });
            one_rss.insert(key, at_rest);
            ("1.00".to_owned(), String::new())
        } else if count > 1 {
            let base = one_bridge.get(&key).copied().unwrap_or(0.0);
            let mine = if is_relay { relay_cpu } else { src_cpu };
            let base_rss = one_rss.get(&key).copied().unwrap_or(0);
            (
                if base > 0.0 {
                    format!("{:.2}", mine / base)
                } else {
                    "-".into()
                },
                format!(
                    "{:.1}",
                    at_rest.saturating_sub(base_rss) as f64 / (count - 1) as f64
                ),
            )
        } else {
            (String::new(), String::new())
        };
        println!(
            "| {}{path} | {} | {} | {:.0} | {} | {} | {b_cpu:.1} | {} | {:.1} | {ratio} | {p50} | {p99} | {} | {} | {} | {per_bridge} |",
            if build.is_some() { "baseline: " } else { "" },
            if count == 0 {
                "-".to_owned()
            } else {
                count.to_string()
            },
            if threads == 0 {
                "-".to_owned()
            } else {
                threads.to_string()
            },
            o.rate,
            messages - o.delivered.min(messages),
            if path == "direct" {
                "-".to_owned()
            } else {
                format!("{src_cpu:.1}")
            },
            if relay.is_some() {
                format!("{relay_cpu:.1}")
            } else {
                "-".into()
            },
            src_cpu + b_cpu + relay_cpu,
            p50 - direct.0,
            p99 - direct.1,
            if rss == 0 {
                "-".to_owned()
            } else {
                format!("{:.1}", rss as f64 / 1024.0)
            },
        );
        if let Some(r) = relay.as_mut() {
            let _ = r.terminate_and_wait(Duration::from_secs(60));
        }
    }
    if rounds > 1 {
        println!(
            "\n### {bridges} bridges sharing their source and sink connections, {rounds} rounds (this build and the baseline alternating which goes first)\n"
        );
        println!(
            "| relay | relay threads | one bridge µs/msg, each round | {bridges} bridges µs/msg, each round | {bridges} / 1, each round | median of the ratios |"
        );
        println!("|---|---:|---|---|---|---:|");
        let list = |v: &[f64], digits: usize| {
            v.iter()
                .map(|x| format!("{x:.digits$}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        for ((threads, is_baseline), runs) in &shared_rounds {
            let ones: Vec<f64> = runs.iter().map(|r| r.0).collect();
            let alls: Vec<f64> = runs.iter().map(|r| r.1).collect();
            let ratios: Vec<f64> = runs
                .iter()
                .map(|(one, all)| if *one > 0.0 { all / one } else { 0.0 })
                .collect();
            println!(
                "| {} | {threads} | {} | {} | {} | **{:.2}** |",
                if *is_baseline {
                    "baseline"
                } else {
                    "this build"
                },
                list(&ones, 1),
                list(&alls, 1),
                list(&ratios, 2),
                median(ratios.clone()),
            );
        }
    }
    println!(
        "\nCPU: user + system of each process over the measured run, in 10 ms clock ticks, per delivered message. \"/ 1 bridge\": the relay's CPU per message (Mosquitto's: its source broker's, which runs its bridges) over the same with one bridge carrying all topics, same thread count. Added latency: against direct publishing to broker B at the same rate. KiB per added bridge: RSS with all bridges up, before the run, less the one-bridge figure, over the bridges added."
    );
}

/// The middle value, or the mean of the two middle values of an even count.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 0 => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        n => v[n / 2],
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n = env_or("BENCH_MESSAGES", 100_000) as usize;
    let rate = env_or("BENCH_RATE", 2000);
    let latency_n = (rate * env_or("BENCH_LATENCY_SECONDS", 10)) as usize;
    let idle = env_or("BENCH_IDLE_BRIDGES", 1000) as usize;
    let sections =
        std::env::var("BENCH_SECTIONS").unwrap_or("idle,throughput,cclients,latency".into());
    let cases = std::env::var("BENCH_CASES").unwrap_or("0/100,0/4096,1/100,1/4096".into());

    let b = Mosquitto::start(false);
    // Mosquitto A bridges b0/# (QoS 0) and b1/# (QoS 1) to B as out/b0/#, out/b1/#. Both brokers
    // keep up to 1,000,000 queued messages per client, so the bridge is not measured dropping.
    let bridge_conf = format!(
        "connection bench-bridge\naddress 127.0.0.1:{}\ntopic # out 0 b0/ out/b0/\ntopic # out 1 b1/ out/b1/\ncleansession false\ntry_private false\nrestart_timeout 1\nbridge_protocol_version mqttv311\n",
        b.tcp_port
    );
    let a = Mosquitto::start_with(false, &bridge_conf);
    // `idle`: each bridge has a sink connection of its own; `idle-shared`: all bridges name the
    // same sink client id, so they share one sink connection. Run one per bench run: the second
    // would reuse the heap the first freed.
    let section = |name: &str| sections.split(',').any(|s| s == name);
    let idle_section = sections
        .split(',')
        .find(|s| *s == "idle" || *s == "idle-shared");
    if let Some(section) = idle_section {
        let shared = section == "idle-shared";
        println!(
            "## Idle bridges in one process (measured first, on a fresh heap; {})\n",
            if shared {
                "all share one sink connection"
            } else {
                "each with its own sink connection"
            }
        );
        println!("| bridges | RSS MiB | KiB per added bridge |");
        println!("|---:|---:|---:|");
        let manager = Arc::new(RelayManager::new(Some(Arc::new(
            iot_operator::telemetry::Metrics::new(),
        ))));
        let rss = || status_kib("/proc/self/status", "VmRSS:");
        let mut prev = (0usize, rss());
        println!("| 0 | {:.1} | |", prev.1 as f64 / 1024.0);
        let mut started = 0;
        for target in [1usize, 100, idle.max(101)] {
            while started < target {
                let route = RouteConfig {
                    name: "idle".into(),
                    filter: TopicFilter::parse(&format!("idle/{started}/#")).unwrap(),
                    template: TopicTemplate::same_topic(),
                    qos: 1,
                    retain: RetainHandling::Preserve,
                    direction: Direction::In,
                    share: None,
                };
                let cfg = RelayConfig::new(
                    format!("bench/idle-{started}"),
                    Endpoint::new(a.tcp_url(), format!("idle-src-{started}")),
                    Endpoint::new(
                        b.tcp_url(),
                        if shared {
                            "idle-snk".to_owned()
                        } else {
                            format!("idle-snk-{started}")
                        },
                    ),
                    vec![route],
                );
                let mut view = manager
                    .ensure(
                        &iot_operator::relay::ConnectionKey::new(
                            format!("bench/idle-{started}"),
                            0,
                        ),
                        1,
                        cfg,
                    )
                    .await
                    .unwrap();
                let connected = |s: &iot_operator::relay::RelayStatus| {
                    s.source == SideState::Connected && s.sink == SideState::Connected
                };
                let _ =
                    tokio::time::timeout(Duration::from_secs(10), view.status.wait_for(connected))
                        .await;
                started += 1;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = rss();
            let per = now.saturating_sub(prev.1) as f64 / (target - prev.0) as f64;
            println!("| {target} | {:.1} | {per:.1} |", now as f64 / 1024.0);
            prev = (target, now);
        }
        manager.stop_all().await;
    }

    let dir = tempfile::tempdir().unwrap();
    let mut relay = start_relay_process(&this_relay(), "r", &a, &b, dir.path());
    let baseline_bin = std::env::var("BENCH_BASELINE_BIN").ok();
    let mut baseline = baseline_bin
        .as_deref()
        .map(|bin| start_relay_process(bin, "s", &a, &b, dir.path()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!(
        "\nRelay process worker threads: {}",
        std::env::var("BENCH_RELAY_THREADS")
            .ok()
            .filter(|t| t != "0")
            .unwrap_or_else(|| "one per CPU".into())
    );

    let pids = [
        ("broker A", a.pid().unwrap_or(0)),
        ("broker B", b.pid().unwrap_or(0)),
        ("relay", relay.pid()),
        ("clients", std::process::id()),
    ];
    let cpu = || pids.map(|(_, pid)| process_usage(pid).1);
    let mut cpu_rows = Vec::new();
    let mut baseline_rows = Vec::new();
    if section("throughput") {
        println!("\n## Throughput ({n} messages offered as fast as the publisher can)\n");
        println!(
            "| QoS | payload | (c) single broker msg/s | (b) Mosquitto bridge msg/s | (a) relay msg/s | relay / bridge | relay / single | lost (c / b / a) |"
        );
        println!("|---|---|---:|---:|---:|---:|---:|---|");
        for (qos, q) in [(QoS::AtMostOnce, 0), (QoS::AtLeastOnce, 1)] {
            for payload in [100usize, 4096] {
                if !cases.split(',').any(|c| c == format!("{q}/{payload}")) {
                    continue;
                }
                let case = |pub_port, prefix, filter| Case {
                    pub_port,
                    sub_port: b.tcp_port,
                    prefix,
                    filter,
                    qos,
                    messages: n,
                    payload,
                    rate: None,
                    topics: None,
                };
                let (bp, bf) = (format!("b{q}"), format!("out/b{q}/#"));
                let c0 = cpu();
                let c = run(case(b.tcp_port, "out/c", "out/c/#")).await;
                let c1 = cpu();
                let bb = run(case(a.tcp_port, &bp, &bf)).await;
                let c2 = cpu();
                let r = run(case(a.tcp_port, "r", "out/r/#")).await;
                let c3 = cpu();
                if baseline.is_some() {
                    // Turns: baseline, this relay again, baseline again; means of two each.
                    let s1 = run(case(a.tcp_port, "s", "out/s/#")).await;
                    let r2 = run(case(a.tcp_port, "r", "out/r/#")).await;
                    let s2 = run(case(a.tcp_port, "s", "out/s/#")).await;
                    let (mine, base) = ((r.rate + r2.rate) / 2.0, (s1.rate + s2.rate) / 2.0);
                    baseline_rows.push(format!(
                        "| {q} | {payload} B | {mine:.0} | {base:.0} | {:.2} | {} / {} |",
                        mine / base,
                        2 * n - r.delivered - r2.delivered,
                        2 * n - s1.delivered - s2.delivered
                    ));
                }
                for (topology, before, after, delivered) in [
                    ("(c) single broker", c0, c1, c.delivered),
                    ("(b) Mosquitto bridge", c1, c2, bb.delivered),
                    ("(a) relay", c2, c3, r.delivered),
                ] {
                    let per = |i: usize| (after[i] - before[i]) * 1e6 / delivered.max(1) as f64;
                    cpu_rows.push(format!(
                    "| {q} | {payload} B | {topology} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
                    per(0),
                    per(1),
                    per(2),
                    per(3),
                    (0..4).map(per).sum::<f64>()
                ));
                }
                println!(
                    "| {q} | {payload} B | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} | {} / {} / {} |",
                    c.rate,
                    bb.rate,
                    r.rate,
                    r.rate / bb.rate,
                    r.rate / c.rate,
                    n - c.delivered,
                    n - bb.delivered,
                    n - r.delivered
                );
            }
        }

        if let Some(bin) = &baseline_bin {
            println!("\n## This relay against the baseline ({bin}), same brokers, taking turns\n");
            println!(
                "| QoS | payload | relay msg/s | baseline msg/s | relay / baseline | lost (relay / baseline) |"
            );
            println!("|---|---|---:|---:|---:|---|");
            for row in &baseline_rows {
                println!("{row}");
            }
        }

        println!("\n## CPU per delivered message, by process (µs; 10 ms clock ticks)\n");
        println!("| QoS | payload | topology | broker A | broker B | relay | clients | total |");
        println!("|---|---|---|---:|---:|---:|---:|---:|");
        for row in &cpu_rows {
            println!("{row}");
        }
    }

    if section("cclients") {
        // Mosquitto's C clients drive the three topologies (and the baseline relay, if any),
        // taking turns (the relay and the baseline alternate which goes first), BENCH_C_RUNS
        // runs each (3); medians.
        let cases = std::env::var("BENCH_C_CASES")
            .unwrap_or("1/100/50000,1/4096/50000,0/100/100000".into());
        let runs = env_or("BENCH_C_RUNS", 3) as usize;
        // The floor: socat moves the same bytes (publishes one way, acknowledgements back)
        // between mosquitto_pub and broker B without parsing them, its buffer as large as the
        // relay's largest read.
        let pump = start_pump(b.tcp_port);
        println!(
            "\n## Driven by Mosquitto's C clients (mosquitto_pub -l -M 100, mosquitto_sub), medians of {runs}\n"
        );
        let (base_cols, base_lost) = if baseline.is_some() {
            (" baseline relay msg/s | relay / baseline |", " / baseline")
        } else {
            ("", "")
        };
        println!(
            "| case | direct msg/s | Mosquitto bridge msg/s | relay msg/s | relay / bridge |{base_cols} lost (direct / bridge / relay{base_lost}) | relay peak RSS MiB |"
        );
        println!(
            "|---|---:|---:|---:|---:|{}---|---:|",
            if baseline.is_some() { "---:|---:|" } else { "" }
        );
        for case in cases.split(',') {
            let parts: Vec<usize> = case.split('/').filter_map(|p| p.parse().ok()).collect();
            let [q, payload, messages] = parts[..] else {
                panic!("BENCH_C_CASES: {case} is not QoS/payload/messages");
            };
            let input = dir.path().join(format!("lines-{payload}-{messages}"));
            let line = "x".repeat(payload);
            let mut text = String::with_capacity((payload + 1) * messages);
            for _ in 0..messages {
                text.push_str(&line);
                text.push('\n');
            }
            std::fs::write(&input, text).expect("input file");
            let q8 = q as u8;
            let mut topologies = vec![
                (b.tcp_port, "out/c/x".to_owned(), "out/c/#".to_owned()),
                (a.tcp_port, format!("b{q}/x"), format!("out/b{q}/#")),
                (a.tcp_port, "r/x".to_owned(), "out/r/#".to_owned()),
            ];
            if baseline.is_some() {
                topologies.push((a.tcp_port, "s/x".to_owned(), "out/s/#".to_owned()));
            }
            // Where the byte pump is among the topologies, and its process.
            let pump_at = pump.as_ref().map(|(port, socat)| {
                topologies.push((*port, "out/p/x".to_owned(), "out/p/#".to_owned()));
                (topologies.len() - 1, socat.id())
            });
            let is_pump = |i: usize| pump_at.is_some_and(|(at, _)| at == i);
            let mut rates = vec![Vec::new(); topologies.len()];
            let mut lost = vec![0usize; topologies.len()];
            // CPU seconds by process (broker A, broker B, the path's relay: user, system) and
            // messages delivered, summed over the runs of each topology.
            let mut used = vec![([0.0f64; 4], 0usize); topologies.len()];
            let relay_of = |i: usize| match i {
                2 => Some(relay.pid()),
                3 => baseline.as_ref().map(|b| b.pid()),
                _ => None,
            };
            let snapshot = |i: usize| {
                let (ru, rs) = match pump_at {
                    // socat serves each connection in a child it waits for.
                    Some((at, socat)) if at == i => process_times_with_children(socat),
                    _ => relay_of(i).map_or((0.0, 0.0), process_times),
                };
                [
                    process_usage(a.pid().unwrap_or(0)).1,
                    process_usage(b.pid().unwrap_or(0)).1,
                    ru,
                    rs,
                ]
            };
            for run in 0..runs {
                // The relay and the baseline take turns at going first: whichever runs right
                // after Mosquitto's bridge was seen to pay more, whatever its build.
                let mut order: Vec<usize> = (0..topologies.len()).collect();
                if run % 2 == 1 && baseline.is_some() {
                    order.swap(2, 3);
                }
                for i in order {
                    let (port, topic, filter) = &topologies[i];
                    let before = snapshot(i);
                    let (port, topic, filter, input, sub) = (
                        *port,
                        topic.clone(),
                        filter.clone(),
                        input.clone(),
                        b.tcp_port,
                    );
                    let (got, rate) = tokio::task::spawn_blocking(move || {
                        run_c(port, sub, &topic, &filter, q8, messages, &input)
                    })
                    .await
                    .expect("run");
                    if is_pump(i) {
                        // The child serving the connection ends with it; its time counts once
                        // socat has waited for it.
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    let after = snapshot(i);
                    for (k, total) in used[i].0.iter_mut().enumerate() {
                        *total += after[k] - before[k];
                    }
                    used[i].1 += got;
                    // The relay's (or the pump's) CPU per message in this run alone: the
                    // runs of one build spread widely, and the table gives only their sums.
                    let own =
                        (after[2] + after[3] - before[2] - before[3]) * 1e6 / got.max(1) as f64;
                    eprintln!(
                        "cclients QoS {q8} {payload} B, topology {i}: {rate:.0} msg/s, relay or pump {own:.1} µs/msg"
                    );
                    rates[i].push(rate);
                    lost[i] += messages.saturating_sub(got);
                }
            }
            // µs per delivered message of topology `i`, in the processes `ks` (indices of `used`).
            let per_message = |i: usize, ks: &[usize]| {
                let (seconds, got) = &used[i];
                ks.iter().map(|&k| seconds[k]).sum::<f64>() * 1e6 / (*got).max(1) as f64
            };
            let bridge_path = per_message(1, &[0, 1]);
            // The byte pump's own CPU per message: the floor each relay row is given against.
            let floor = pump_at.map(|(at, _)| per_message(at, &[2, 3]));
            for i in 1..used.len() {
                let per = |k: usize| per_message(i, &[k]);
                let path = per_message(i, &[0, 1, 2, 3]);
                let over_floor = match floor {
                    // At QoS 0 the pump is no floor (see the note under the table).
                    Some(f) if q == 1 && relay_of(i).is_some() && f > 0.0 => {
                        format!("{:.2}", (per(2) + per(3)) / f)
                    }
                    _ => String::new(),
                };
                cpu_rows.push(format!(
                    "| QoS {q}, {payload} B | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {over_floor} |",
                    if is_pump(i) {
                        "byte pump (socat)"
                    } else {
                        ["direct", "Mosquitto bridge", "relay", "baseline relay"][i]
                    },
                    per(0),
                    per(1),
                    per(2) + per(3),
                    per(2),
                    per(3),
                    path,
                    if i == 1 {
                        "1.00".to_owned()
                    } else {
                        format!("{:.2}", path / bridge_path)
                    }
                ));
            }
            let m: Vec<f64> = rates.into_iter().map(median).collect();
            let base = if baseline.is_some() {
                format!(" {:.0} | {:.2} |", m[3], m[2] / m[3])
            } else {
                String::new()
            };
            let lost_base = if baseline.is_some() {
                format!(" / {}", lost[3])
            } else {
                String::new()
            };
            println!(
                "| QoS {q}, {payload} B, {messages} | {:.0} | {:.0} | {:.0} | {:.2} |{base} {} / {} / {}{lost_base} | {:.1} |",
                m[0],
                m[1],
                m[2],
                m[2] / m[1],
                lost[0],
                lost[1],
                lost[2],
                process_usage(relay.pid()).0 as f64 / 1024.0
            );
        }
        println!(
            "\nLost: summed over the runs. Relay peak RSS: the relay process's high-water mark so far (VmHWM)."
        );
        println!(
            "\n### CPU per delivered message, by process (µs, 10 ms clock ticks, summed over the runs; each run's relay figure is on stderr)\n"
        );
        println!(
            "| case | path | broker A | broker B | relay | relay user | relay system | path total | path / bridge path | relay / byte pump |"
        );
        println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for row in cpu_rows.drain(..) {
            println!("{row}");
        }
        if pump.is_some() {
            println!(
                "\nByte pump: `socat -b 262144` between mosquitto_pub and broker B, in the relay column (socat and the child serving the connection). It reads and writes what the relay does per message (a publish and an acknowledgement each way) and parses nothing: the floor of a relay in its own process. `relay / byte pump` gives each relay's CPU over the pump's, from the same run, at QoS 1. At QoS 0 the pump is no floor: mosquitto_pub writes the burst in large blocks, which socat moves whole, while broker A delivers to a relay message by message."
            );
        } else {
            println!("\nNo byte pump row: socat is not installed.");
        }
        if let Some((_, mut socat)) = pump {
            let _ = socat.kill();
            let _ = socat.wait();
        }
    }

    if section("instructions") {
        println!(
            "\n## Instructions per relayed message (callgrind, relay process, marginal over 20,000 messages)\n"
        );
        println!("| QoS | payload | this relay | baseline | this / baseline |");
        println!("|---|---|---:|---:|---:|");
        for (qos, q, payload) in [
            (QoS::AtLeastOnce, 1, 100usize),
            (QoS::AtLeastOnce, 1, 4096),
            (QoS::AtMostOnce, 0, 100),
        ] {
            let mine =
                instructions_per_message(&this_relay(), &a, &b, dir.path(), qos, payload).await;
            let base = match &baseline_bin {
                Some(bin) => instructions_per_message(bin, &a, &b, dir.path(), qos, payload).await,
                None => None,
            };
            let show = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.0}"));
            let ratio = match (mine, base) {
                (Some(m), Some(b)) if b > 0.0 => format!("{:.2}", m / b),
                _ => "-".to_owned(),
            };
            println!(
                "| {q} | {payload} B | {} | {} | {ratio} |",
                show(mine),
                show(base)
            );
        }
    }

    if section("shared") {
        // One bridge with 1, 2 and 4 connections on a shared subscription ($share/bench/...),
        // each in its own relay process run, QoS 1, 100 B, against one connection.
        println!(
            "\n## Connections on a shared subscription (QoS 1, 100 B, {n} messages, one relay process)\n"
        );
        shared_table(&a, &b, &a.tcp_url(), "sh", n, dir.path()).await;

        // The same, with each connection's deliveries capped at 100 publishes a second by a
        // proxy in front of the source, as AWS IoT Core caps each connection.
        let capped = env_or("BENCH_SHARED_CAPPED_MESSAGES", 2000) as usize;
        let port = a.tcp_port.to_string();
        let (_proxy, proxy_port) =
            support::start_python("tcp_proxy.py", &[&port, "--publishes-per-second", "100"]);
        println!(
            "\n## The same with 100 publishes/s per source connection (AWS IoT Core's quota; a proxy), {capped} messages\n"
        );
        let capped_url = format!("mqtt://127.0.0.1:{proxy_port}");
        shared_table(&a, &b, &capped_url, "cap", capped, dir.path()).await;
    }

    if section("many") {
        many_bridges(&b, dir.path()).await;
    }

    if section("latency") {
        println!("\n## Latency at {rate} msg/s (QoS 1, 100 B, {latency_n} messages)\n");
        println!("| path | p50 µs | p99 µs | added p50 µs | added p99 µs | lost |");
        println!("|---|---:|---:|---:|---:|---:|");
        let mut results = Vec::new();
        for (name, pub_port, prefix, filter) in [
            ("(c) single broker", b.tcp_port, "out/c", "out/c/#"),
            ("(b) Mosquitto bridge", a.tcp_port, "b1", "out/b1/#"),
            ("(a) relay", a.tcp_port, "r", "out/r/#"),
        ] {
            let case = Case {
                pub_port,
                sub_port: b.tcp_port,
                prefix,
                filter,
                qos: QoS::AtLeastOnce,
                messages: latency_n,
                payload: 100,
                rate: Some(rate),
                topics: None,
            };
            let mut o = run(case).await;
            o.latencies_us.sort_unstable();
            results.push((
                name,
                percentile(&o.latencies_us, 0.5),
                percentile(&o.latencies_us, 0.99),
                latency_n - o.delivered,
            ));
        }
        let (c50, c99) = (results[0].1 as i64, results[0].2 as i64);
        for (name, p50, p99, lost) in &results {
            println!(
                "| {name} | {p50} | {p99} | {} | {} | {lost} |",
                *p50 as i64 - c50,
                *p99 as i64 - c99
            );
        }
    }

    let (hwm, cpu) = process_usage(relay.pid());
    println!(
        "\n## Relay process\n\nPeak RSS {:.1} MiB; CPU {cpu:.1} s (user + system) over all the runs above.",
        hwm as f64 / 1024.0
    );
    let _ = relay.terminate_and_wait(Duration::from_secs(15));
    if let Some(b) = baseline.as_mut() {
        let _ = b.terminate_and_wait(Duration::from_secs(15));
    }
}
