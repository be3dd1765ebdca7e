//! The operator installed the way users install it, on a real node (tests/support/node.rs: a
//! kubelet on containerd and runc, with kube-controller-manager, kube-scheduler and kube-proxy):
//! the image built from the Dockerfile and loaded into the node's runtime, README's "Install"
//! commands run as written (only the image name and region substituted), then a TopicBridge
//! relaying a QoS 1 stream through the pod while the Deployment is upgraded, its pod deleted and
//! its container killed, and the PodDisruptionBudget refusing the eviction of the last ready pod.
//!
//! Skipped loudly where a component is missing (root, containerd, the Kubernetes binaries,
//! podman): see README, "Tests of the image and on a node".

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{EvictParams, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use rumqttc::QoS;
use serde_json::{Value, json};
use support::mqtt::{Collector, publish_all};
use support::node::{BRIDGE_IP, Cluster};
use support::{Mosquitto, free_port};

const RELEASE_NS: &str = "iot-operator";
const APP_NS: &str = "apps";
const IMAGE_REPO: &str = "localhost/iot-operator";
const IMAGE_TAG: &str = "test";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn helm_bin() -> PathBuf {
    std::env::var_os("IOT_OPERATOR_TEST_HELM")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".cache/bin/helm"))
}

/// A broker reachable from the pods: its TCP listener on loopback for the test's clients, and
/// another on the bridge's address for the bridge. Returns the broker and the bridge-side URL.
fn broker() -> (Mosquitto, String) {
    let port = free_port();
    let m = Mosquitto::start_logged_with(&format!("listener {port} {BRIDGE_IP}\n"));
    (m, format!("mqtt://{BRIDGE_IP}:{port}"))
}

/// Runs a shell command line from README (with `$KUBECONFIG` set to the cluster's), printing it
/// and what it printed; panics when it fails.
fn readme_command(cluster: &Cluster, line: &str) -> String {
    let started = Instant::now();
    let helm_dir = helm_bin()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let path = format!(
        "{}:{}",
        helm_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("bash")
        .args(["-c", line])
        .current_dir(root())
        .env("KUBECONFIG", &cluster.kubeconfig)
        .env("PATH", path)
        .output()
        .expect("bash");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "$ {line}\n{}(exit {}, {:.1} s)\n",
        text,
        out.status.code().unwrap_or(-1),
        started.elapsed().as_secs_f64()
    );
    assert!(
        out.status.success(),
        "README command failed: {line}\n{text}"
    );
    text
}

/// README's "Install" section: the shell blocks of steps 2 and 3, as written, with the image
/// name and region substituted (and the IRSA annotation dropped: there is no AWS here).
fn readme_install_commands() -> Vec<String> {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let install = readme
        .split("\n## Install\n")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("README has an Install section");
    let blocks: Vec<&str> = install
        .split("```sh\n")
        .skip(1)
        .filter_map(|b| b.split("\n```").next())
        .collect();
    assert!(blocks.len() >= 3, "README Install has its three steps");
    let mut lines = Vec::new();
    for block in &blocks[1..3] {
        // Join continuation lines, drop comments.
        let joined = block.replace("\\\n", " ");
        for line in joined.lines() {
            let line = line.split("   #").next().unwrap_or(line).trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            lines.push(line.to_owned());
        }
    }
    lines
        .into_iter()
        .map(|l| {
            let mut parts: Vec<String> = Vec::new();
            let mut words = l.split_whitespace().peekable();
            while let Some(w) = words.next() {
                // The IRSA role: no AWS on this machine.
                if w == "--set"
                    && words
                        .peek()
                        .is_some_and(|n| n.starts_with("serviceAccount.annotations"))
                {
                    words.next();
                    continue;
                }
                parts.push(
                    w.replace("<your-registry>/iot-operator", IMAGE_REPO)
                        .replace("image.tag=0.1.0", &format!("image.tag={IMAGE_TAG}"))
                        .replace("aws.region=eu-west-1", "aws.region=us-east-1"),
                );
            }
            if parts.first().map(String::as_str) == Some("helm") && parts.get(1).map(String::as_str) == Some("install") {
                // Loaded, not pushed: README says so for clusters without a registry.
                parts.push("--set image.pullPolicy=Never".into());
                // The test brokers listen on the node's address, which the default tenancy
                // rules do not allow as a sink.
                parts.push(format!(
                    "--set-json 'tenancy.rules=[{{\"namespaces\":[\"*\"],\"bindPolicies\":[\"{{namespace}}-*\"],\"managePolicies\":[],\"roles\":[],\"endpoints\":[\"*\"],\"operatorCredentials\":false,\"sinkEndpoints\":[\"*.{{namespace}}.svc\",\"{BRIDGE_IP}\"]}}]'"
                ));
                parts.push("--set leaderElection.leaseDurationSeconds=15".into());
            }
            parts.join(" ")
        })
        .collect()
}

/// The operator pods' logs, the Lease and the brokers' logs, for a failure.
fn dump(cluster: &Cluster, source: &Mosquitto, sink: &Mosquitto) {
    for args in [
        &["-n", RELEASE_NS, "get", "pods,lease", "-o", "wide"][..],
        &[
            "-n",
            RELEASE_NS,
            "logs",
            "-l",
            "app.kubernetes.io/name=iot-operator",
            "--tail=60",
            "--prefix",
        ],
        &["-n", APP_NS, "get", "tb", "-o", "yaml"],
    ] {
        eprintln!(
            "$ kubectl {}\n{}",
            args.join(" "),
            cluster.kubectl(args).unwrap_or_else(|e| e)
        );
    }
    eprintln!(
        "source broker:\n{}\nsink broker:\n{}",
        source.log(),
        sink.log()
    );
}

/// `helm upgrade` of the release with its values kept and one changed, waiting for the rollout.
fn helm_upgrade(cluster: &Cluster, set: &str) {
    let out = Command::new(helm_bin())
        .args([
            "upgrade",
            "iot-operator",
            "charts/iot-operator",
            "--namespace",
            RELEASE_NS,
            "--reuse-values",
            "--set",
            set,
            "--wait",
            "--timeout",
            "180s",
        ])
        .current_dir(root())
        .env("KUBECONFIG", &cluster.kubeconfig)
        .output()
        .expect("helm upgrade");
    assert!(
        out.status.success(),
        "helm upgrade --set {set}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn client(cluster: &Cluster) -> Client {
    iot_operator::install_crypto_provider();
    let kc = Kubeconfig::read_from(&cluster.kubeconfig).expect("kubeconfig");
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("config");
    Client::try_from(config).expect("client")
}

/// The operator's pods, with whether each is Ready.
async fn pods(client: &Client) -> Vec<(String, bool, i32)> {
    let api: Api<Pod> = Api::namespaced(client.clone(), RELEASE_NS);
    let list = api
        .list(&ListParams::default().labels("app.kubernetes.io/name=iot-operator"))
        .await
        .expect("pods");
    list.items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| {
            let status = p.status.unwrap_or_default();
            let ready = status
                .conditions
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            let restarts = status
                .container_statuses
                .unwrap_or_default()
                .first()
                .map_or(0, |c| c.restart_count);
            (p.metadata.name.unwrap_or_default(), ready, restarts)
        })
        .collect()
}

async fn wait_for(what: &str, timeout: Duration, mut ok: impl AsyncFnMut() -> bool) -> f64 {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if ok().await {
            return start.elapsed().as_secs_f64();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("{what}: not within {timeout:?}");
}

/// A QoS 1 stream of numbered messages into the source, 20 every 100 ms, until stopped.
struct Stream {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Stream {
    fn start(port: u16, prefix: &'static str) -> Stream {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicUsize::new(0));
        let (s, n) = (stop.clone(), sent.clone());
        let task = tokio::spawn(async move {
            let mut i = 0;
            while !s.load(Ordering::SeqCst) {
                let batch = (i..i + 20)
                    .map(|k| {
                        (
                            format!("dev/{prefix}/{k}"),
                            k.to_string().into_bytes(),
                            false,
                        )
                    })
                    .collect();
                publish_all(port, &format!("stream-{prefix}"), batch, QoS::AtLeastOnce).await;
                i += 20;
                n.store(i, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Stream { stop, sent, task }
    }

    /// Stops the stream; how many messages the source acknowledged.
    async fn finish(self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("stream");
        self.sent.load(Ordering::SeqCst)
    }
}

/// How many of `dev/<prefix>/0..n` never reached the sink (waiting up to `timeout`), and how
/// many arrived more than once.
async fn lost_and_duplicates(
    collector: &Collector,
    prefix: &str,
    n: usize,
    timeout: Duration,
) -> (usize, usize) {
    let want: BTreeSet<String> = (0..n)
        .map(|i| format!("cluster/dev/{prefix}/{i}"))
        .collect();
    let deadline = Instant::now() + timeout;
    loop {
        let got: Vec<String> = collector
            .snapshot()
            .into_iter()
            .map(|m| m.topic)
            .filter(|t| t.starts_with(&format!("cluster/dev/{prefix}/")))
            .collect();
        let distinct: BTreeSet<&String> = got.iter().collect();
        let lost = want.iter().filter(|t| !distinct.contains(t)).count();
        if lost == 0 || Instant::now() > deadline {
            return (lost, got.len() - distinct.len());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_runs_on_a_real_node_and_relays_through_rollouts_and_kills() {
    if let Some(why) = support::node::missing() {
        eprintln!(
            "\n*** SKIPPED: node test: {why}.\n*** See README.md, 'Tests of the image and on a node'.\n"
        );
        return;
    }
    let built = match tokio::task::spawn_blocking(support::image::image)
        .await
        .expect("build task")
    {
        Ok(Some(b)) => b,
        Ok(None) => return,
        Err(e) => panic!("{e}"),
    };
    let test_started = Instant::now();
    // On this thread, which lives as long as the test: the cluster's processes die with the
    // thread that started them (PR_SET_PDEATHSIG), and a blocking-pool thread ends when idle.
    let cluster = Cluster::start().unwrap_or_else(|e| panic!("the node did not come up: {e}"));
    let image = format!("{IMAGE_REPO}:{IMAGE_TAG}");
    let out = Command::new("podman")
        .args(support::image::PODMAN)
        .args(["tag", &built.name, &image])
        .output()
        .expect("podman tag");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    cluster
        .load_image(&image)
        .expect("image loaded into the node's containerd");
    let client = client(&cluster).await;

    // README's Install, as written.
    let started = Instant::now();
    for line in readme_install_commands() {
        readme_command(&cluster, &line);
    }
    let installed = started.elapsed().as_secs_f64();
    let ps = pods(&client).await;
    assert!(
        ps.len() == 1 && ps[0].1,
        "one Ready pod after README's commands: {ps:?}"
    );
    eprintln!(
        "README Install: pod {} Ready; the commands took {installed:.1} s",
        ps[0].0
    );

    // Its logs are JSON lines.
    let logs = readme_command(
        &cluster,
        &format!("kubectl -n {RELEASE_NS} logs deployment/iot-operator"),
    );
    let lines: Vec<&str> = logs.lines().filter(|l| l.starts_with('{')).collect();
    assert!(!lines.is_empty(), "no JSON lines in kubectl logs:\n{logs}");
    for l in &lines {
        assert!(serde_json::from_str::<Value>(l).is_ok(), "not JSON: {l}");
    }

    // A bridge between two brokers on the node's address, relaying through the pod.
    let ((source, source_url), (sink, sink_url)) = (broker(), broker());
    let collector = Collector::start(sink.tcp_port, "collector-node", "cluster/#", true).await;
    cluster
        .kubectl(&["create", "namespace", APP_NS])
        .expect("namespace");
    let bridge = json!({"apiVersion": "iot.operator.dev/v1alpha1", "kind": "TopicBridge",
        "metadata": {"name": "feed", "namespace": APP_NS},
        "spec": {"source": {"mqtt": {"url": source_url}, "persistentSession": true},
                 "sink": {"url": sink_url},
                 "routes": [{"from": "dev/#", "to": "cluster/{topic}", "qos": 1}]}});
    let file = cluster.dir.join("bridge.json");
    std::fs::write(&file, bridge.to_string()).expect("bridge file");
    cluster
        .kubectl(&["apply", "-f", file.to_str().expect("path")])
        .expect("bridge applied");
    wait_for("the bridge is Ready", Duration::from_secs(60), async || {
        cluster
            .kubectl(&[
                "-n",
                APP_NS,
                "get",
                "tb",
                "feed",
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].reason}",
            ])
            .is_ok_and(|r| r.trim() == "Connected")
    })
    .await;
    let source_id = format!("iotop-{APP_NS}-feed");
    let sink_id = format!("{source_id}-sink");

    // helm upgrade with a changed value: a rolling update under a QoS 1 stream.
    let stream = Stream::start(source.tcp_port, "upgrade");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let old = pods(&client).await;
    let started = Instant::now();
    helm_upgrade(&cluster, "logLevel=debug");
    wait_for(
        "the old pod is gone",
        Duration::from_secs(120),
        async || {
            let now = pods(&client).await;
            now.len() == 1 && now[0].1 && now[0].0 != old[0].0
        },
    )
    .await;
    let rollout = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let sent = stream.finish().await;
    let (lost, dups) =
        lost_and_duplicates(&collector, "upgrade", sent, Duration::from_secs(60)).await;
    let kicks = (source.takeovers(&source_id), sink.takeovers(&sink_id));
    eprintln!(
        "helm upgrade: rolled in {rollout:.1} s; {sent} sent, {lost} lost, {dups} duplicates; \
         takeovers source {} sink {}",
        kicks.0, kicks.1
    );
    if lost > 0 {
        dump(&cluster, &source, &sink);
    }
    assert_eq!(lost, 0, "QoS 1 messages lost during the rollout");
    assert_eq!(kicks, (0, 0), "a duplicate client id during the rollout");

    // kubectl delete pod: the Deployment makes another; nothing is lost.
    let stream = Stream::start(source.tcp_port, "delete");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let victim = pods(&client).await[0].0.clone();
    let started = Instant::now();
    cluster
        .kubectl(&["-n", RELEASE_NS, "delete", "pod", &victim, "--wait=true"])
        .expect("pod deleted");
    wait_for("a new pod is Ready", Duration::from_secs(120), async || {
        let now = pods(&client).await;
        now.len() == 1 && now[0].1 && now[0].0 != victim
    })
    .await;
    let recovered = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let sent = stream.finish().await;
    let (lost, dups) =
        lost_and_duplicates(&collector, "delete", sent, Duration::from_secs(60)).await;
    eprintln!(
        "kubectl delete pod: Ready again in {recovered:.1} s; {sent} sent, {lost} lost, {dups} duplicates; takeovers source {} sink {}",
        source.takeovers(&source_id) - kicks.0,
        sink.takeovers(&sink_id) - kicks.1
    );
    assert_eq!(lost, 0, "QoS 1 messages lost across kubectl delete pod");

    // kill -9 of the container: the kubelet restarts it; nothing is lost.
    let stream = Stream::start(source.tcp_port, "kill");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pod_name = pods(&client).await[0].0.clone();
    let pod: Value = serde_json::from_str(
        &cluster
            .kubectl(&["-n", RELEASE_NS, "get", "pod", &pod_name, "-o", "json"])
            .expect("pod"),
    )
    .expect("pod json");
    let container_id = pod["status"]["containerStatuses"][0]["containerID"]
        .as_str()
        .and_then(|s| s.strip_prefix("containerd://"))
        .expect("container id")
        .to_owned();
    let started = Instant::now();
    cluster
        .ctr(&["tasks", "kill", "--signal", "SIGKILL", &container_id])
        .expect("kill -9 of the container");
    wait_for(
        "the container restarted and Ready",
        Duration::from_secs(120),
        async || {
            let now = pods(&client).await;
            now.len() == 1 && now[0].0 == pod_name && now[0].1 && now[0].2 >= 1
        },
    )
    .await;
    let recovered = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let sent = stream.finish().await;
    let (lost, dups) = lost_and_duplicates(&collector, "kill", sent, Duration::from_secs(60)).await;
    eprintln!(
        "kill -9 of the container: restarted and Ready in {recovered:.1} s; {sent} sent, {lost} lost, {dups} duplicates"
    );
    assert_eq!(lost, 0, "QoS 1 messages lost across kill -9");

    // replicaCount 2: the PodDisruptionBudget lets one pod go, not the last ready one.
    helm_upgrade(&cluster, "replicaCount=2");
    wait_for(
        "two Ready pods, the PDB allowing one disruption",
        Duration::from_secs(120),
        async || {
            pods(&client).await.iter().filter(|p| p.1).count() == 2
                && cluster
                    .kubectl(&[
                        "-n",
                        RELEASE_NS,
                        "get",
                        "pdb",
                        "iot-operator",
                        "-o",
                        "jsonpath={.status.disruptionsAllowed}",
                    ])
                    .is_ok_and(|s| s.trim() == "1")
        },
    )
    .await;
    // As `kubectl drain` does: cordon first, so that no replacement is scheduled here and the
    // pod left after the first eviction is the last ready one.
    cluster.kubectl(&["cordon", "node0"]).expect("cordon");
    let api: Api<Pod> = Api::namespaced(client.clone(), RELEASE_NS);
    let two = pods(&client).await;
    api.evict(&two[0].0, &EvictParams::default())
        .await
        .expect("the first eviction is allowed");
    let refused = api.evict(&two[1].0, &EvictParams::default()).await;
    match refused {
        Err(kube::Error::Api(s)) if s.code == 429 => {
            eprintln!(
                "PodDisruptionBudget: the eviction of the last ready pod was refused: {}",
                s.message
            )
        }
        other => panic!("the last ready pod's eviction was not refused: {other:?}"),
    }
    cluster
        .kubectl(&["delete", "--wait=false", "-f", file.to_str().expect("path")])
        .expect("bridge deleted");
    eprintln!(
        "node test: {:.1} s in all (image build {:.1} s before it)",
        test_started.elapsed().as_secs_f64(),
        built.seconds
    );
}
