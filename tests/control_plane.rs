//! The operator on a real control plane: etcd and kube-apiserver started by the tests
//! (tests/support/control_plane.rs), the real binary (`iot-operator run`, its own process, TLS to
//! the API server, leader election on, the chart's RBAC through a ServiceAccount token), moto's
//! server for AWS and Mosquitto for MQTT.
//!
//! Skipped, with a loud notice, where no kube-apiserver is installed (README, "Tests on a real
//! control plane"). The tests share one control plane and run one at a time (each in its own
//! namespaces, with its own Lease).

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use iot_operator::api::{IotPolicyBinding, TopicBridge};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, Client};
use rumqttc::QoS;
use serde_json::{Value, json};
use support::admission::ID;
use support::control_plane::{
    self, ControlPlane, Install, LOOPBACK_SINKS, Operator, as_refs, get_json, moto_env, ready_of,
    wait_ready, wait_ready_reason, wait_until,
};
use support::mqtt::Received;
use support::mqtt::{Collector, publish_all};
use support::{Mosquitto, Moto};

/// One test at a time: they share the control plane, and each runs several processes on a
/// 2-core machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---------------------------------------------------------------------------------------------
// Admission: the CRDs on the API server accept the examples and reject invalid objects, naming
// the field.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crds_accept_the_examples_and_reject_invalid_objects_naming_the_field() {
    let _serial = SERIAL.lock().await;
    let Some(cp) = control_plane::with_crds().await else {
        return;
    };
    // The CRDs' CEL rules need 1.28 (README): 1.25's cost estimator refuses them, and before
    // 1.25 they sit behind a feature gate, off by default, so nothing would be rejected.
    let minor = control_plane::binaries()
        .ok()
        .and_then(|b| control_plane::minor_version(&b.kube_apiserver));
    if minor.is_some_and(|m| m < 28) {
        eprintln!(
            "\n*** SKIPPED: admission test: the kube-apiserver is 1.{} and the CRDs' CEL rules need 1.28 or later.\n",
            minor.unwrap_or_default()
        );
        return;
    }
    cp.namespace("admission").await;
    cp.namespace("default").await;

    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut examples = 0;
    for entry in std::fs::read_dir(dir).expect("examples/") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("example");
        let mut obj: Value = serde_yaml::from_str(&text).expect("YAML");
        obj["metadata"]["namespace"] = json!("admission");
        // Dry run: admission in full, nothing stored (the examples name hosts outside this
        // machine, which a later test's operator would otherwise try to reach).
        cp.create_dry_run(&obj)
            .await
            .unwrap_or_else(|e| panic!("{} rejected: {e}", path.display()));
        examples += 1;
    }
    assert!(examples >= 5, "only {examples} examples");

    let mut rejected = 0;
    for (obj, wanted) in support::admission::invalid_objects("admission") {
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        match cp.create_dry_run(&obj).await {
            Ok(_) => panic!("{name} was accepted: {obj}"),
            Err(kube::Error::Api(s)) => {
                assert_eq!(s.code, 422, "{name}: {s:?}");
                for w in &wanted {
                    assert!(
                        s.message.contains(w),
                        "{name}: the message does not say {w:?}: {}",
                        s.message
                    );
                }
                rejected += 1;
            }
            Err(e) => panic!("{name}: {e}"),
        }
    }
    eprintln!("admission: {examples} examples accepted, {rejected} invalid objects rejected");
}

// ---------------------------------------------------------------------------------------------
// IotPolicyBinding: the operator process with the chart's cluster-wide RBAC and default tenancy
// rules, against moto.

async fn targets(iot: &aws_sdk_iot::Client, policy: &str) -> BTreeSet<String> {
    iot.list_targets_for_policy()
        .policy_name(policy)
        .send()
        .await
        .map(|r| r.targets().iter().cloned().collect())
        .unwrap_or_default()
}

fn binding_in(ns: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "iot.operator.dev/v1alpha1", "kind": "IotPolicyBinding",
           "metadata": {"name": name, "namespace": ns}, "spec": spec})
}

/// The Events (events.k8s.io) of a namespace.
async fn events(client: &Client, ns: &str) -> Vec<k8s_openapi::api::events::v1::Event> {
    let api: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), ns);
    api.list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
}

fn regarding(e: &k8s_openapi::api::events::v1::Event) -> Option<&str> {
    e.regarding.as_ref().and_then(|r| r.name.as_deref())
}

/// Reasons of the Events about one object.
async fn event_reasons(client: &Client, ns: &str, name: &str) -> Vec<String> {
    events(client, ns)
        .await
        .into_iter()
        .filter(|e| regarding(e) == Some(name))
        .filter_map(|e| e.reason)
        .collect()
}

/// Waits up to 15 s for an Event with `reason` about object `name`.
async fn wait_event(client: &Client, ns: &str, name: &str, reason: &str) {
    wait_until(
        &format!("a {reason} Event"),
        Duration::from_secs(15),
        || async {
            event_reasons(client, ns, name)
                .await
                .iter()
                .any(|r| r == reason)
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_bindings_attach_change_detach_and_retain_in_moto() {
    let _serial = SERIAL.lock().await;
    let Some(cp) = control_plane::with_crds().await else {
        return;
    };
    let moto = Moto::start();
    let iot = aws_sdk_iot::Client::new(&support::test_sdk_config(&moto.url()));
    let cognito = aws_sdk_cognitoidentity::Client::new(&support::test_sdk_config(&moto.url()));
    let ids = support::cognito_identities(&cognito, 3).await;
    // The chart's default tenancy: namespace `ipb` may attach policies named `ipb-*`.
    support::create_connect_policy(&iot, "ipb-app").await;
    support::create_connect_policy(&iot, "ipb-keep").await;
    support::create_connect_policy(&iot, "someone-else").await;

    let install = cp
        .install_chart("iot-operator", &["leaderElection.leaseName=ipb"])
        .await;
    let env = moto_env(&moto);
    let op = install.spawn("iot-operator-ipb-0", &as_refs(&env));
    wait_ready(&op, "leader", Duration::from_secs(60)).await;
    cp.namespace("ipb").await;
    let admin = cp.admin().await;
    let api: Api<IotPolicyBinding> = Api::namespaced(admin.clone(), "ipb");

    // Tenancy first, while nothing else calls AWS: NotAllowed, and not one AWS call.
    cp.create(&binding_in(
        "ipb",
        "foreign",
        json!({"policy": {"name": "someone-else"}, "principals": {"cognitoIdentityIds": [ids[0]]}}),
    ))
    .await
    .expect("created");
    wait_ready_reason(
        &api,
        "foreign",
        ("False", "NotAllowed"),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        op.metric("iot_operator_aws_api_calls_total", ""),
        0.0,
        "a binding outside the tenancy rules made AWS calls"
    );
    assert!(targets(&iot, "someone-else").await.is_empty());
    assert!(
        event_reasons(&admin, "ipb", "foreign")
            .await
            .contains(&"NotAllowed".to_owned())
    );

    // Create -> Ready, attached in moto.
    cp.create(&binding_in(
        "ipb",
        "app",
        json!({"policy": {"name": "ipb-app"}, "principals": {"cognitoIdentityIds": [ids[0], ids[1]]}}),
    ))
    .await
    .expect("created");
    wait_ready_reason(&api, "app", ("True", "Attached"), Duration::from_secs(30)).await;
    assert_eq!(
        targets(&iot, "ipb-app").await,
        BTreeSet::from([ids[0].clone(), ids[1].clone()])
    );
    let events = event_reasons(&admin, "ipb", "app").await;
    for reason in ["Attached", "TargetsAttached"] {
        assert_eq!(
            events.iter().filter(|r| *r == reason).count(),
            1,
            "one {reason} Event: {events:?}"
        );
    }

    // Spec change: one identity out, one in.
    api.patch(
        "app",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"principals": {"cognitoIdentityIds": [ids[1], ids[2]]}}})),
    )
    .await
    .expect("patched");
    let want = BTreeSet::from([ids[1].clone(), ids[2].clone()]);
    wait_until(
        "the changed targets in moto",
        Duration::from_secs(30),
        || {
            let (iot, want) = (iot.clone(), want.clone());
            async move { targets(&iot, "ipb-app").await == want }
        },
    )
    .await;
    wait_until("observedGeneration 2", Duration::from_secs(30), || {
        let api = api.clone();
        async move {
            get_json(&api, "app").await.is_some_and(|o| {
                o["status"]["observedGeneration"] == 2
                    && ready_of(&o) == Some(("True".into(), "Attached".into()))
            })
        }
    })
    .await;

    // Retain: deleting keeps the attachment.
    cp.create(&binding_in(
        "ipb",
        "kept",
        json!({"policy": {"name": "ipb-keep"}, "principals": {"cognitoIdentityIds": [ids[0]]}, "deletionPolicy": "Retain"}),
    ))
    .await
    .expect("created");
    wait_ready_reason(&api, "kept", ("True", "Attached"), Duration::from_secs(30)).await;

    for name in ["app", "kept", "foreign"] {
        api.delete(name, &DeleteParams::default())
            .await
            .expect("deleted");
    }
    wait_until("the bindings are gone", Duration::from_secs(30), || {
        let api = api.clone();
        async move {
            api.list(&ListParams::default())
                .await
                .is_ok_and(|l| l.items.is_empty())
        }
    })
    .await;
    assert!(
        targets(&iot, "ipb-app").await.is_empty(),
        "Detach: the policy is detached"
    );
    assert_eq!(
        targets(&iot, "ipb-keep").await,
        BTreeSet::from([ids[0].clone()]),
        "Retain: the attachment stays"
    );
    let logs = op.logs();
    assert!(!logs.contains("panicked"), "{logs}");
    assert!(
        !logs.to_lowercase().contains("forbidden"),
        "a call the chart's RBAC forbids:\n{logs}"
    );
}

// ---------------------------------------------------------------------------------------------
// TopicBridge: the operator process with the chart's namespaced RBAC (`watchNamespace`), between
// two Mosquitto brokers that log every connection.

/// The test brokers listen on 127.0.0.1, which the chart's default tenancy rules refuse as a
/// sink (sinks default to the bridge namespace's own Services): the tests that relay use the
/// chart's default rule with that one sink added.
fn mqtt_bridge(ns: &str, name: &str, source: &Mosquitto, sink: &Mosquitto, to: &str) -> Value {
    json!({"apiVersion": "iot.operator.dev/v1alpha1", "kind": "TopicBridge",
           "metadata": {"name": name, "namespace": ns},
           "spec": {"source": {"mqtt": {"url": source.tcp_url()}, "persistentSession": true},
                    "sink": {"url": sink.tcp_url()},
                    "routes": [{"from": "dev/#", "to": to, "qos": 1}]}})
}

/// `n` QoS 1 messages `<prefix>/<i>`, payload `<i>`, each acknowledged by the broker.
async fn publish_numbered(
    broker: &Mosquitto,
    client: &str,
    prefix: &str,
    range: std::ops::Range<usize>,
) {
    publish_range(broker.tcp_port, client, prefix, range).await;
}

async fn publish_range(port: u16, client: &str, prefix: &str, range: std::ops::Range<usize>) {
    let messages = range
        .map(|i| (format!("{prefix}/{i}"), i.to_string().into_bytes(), false))
        .collect();
    publish_all(port, client, messages, QoS::AtLeastOnce).await;
}

/// The chart installed with `watchNamespace=<ns>` (and the loopback sinks allowed), its
/// operator process started and leading, an admin client and the TopicBridge API of `ns`. The
/// install is returned to be kept alive.
async fn bridge_operator(
    cp: &ControlPlane,
    ns: &str,
) -> (Install, Operator, Client, Api<TopicBridge>) {
    bridge_operator_with(cp, ns, &[]).await
}

/// [`bridge_operator`] with more chart values (`key=value`).
async fn bridge_operator_with(
    cp: &ControlPlane,
    ns: &str,
    values: &[&str],
) -> (Install, Operator, Client, Api<TopicBridge>) {
    let lease = format!("leaderElection.leaseName={ns}");
    let watch = format!("watchNamespace={ns}");
    let mut all = vec![lease.as_str(), watch.as_str(), LOOPBACK_SINKS];
    all.extend_from_slice(values);
    let install = cp.install_chart("iot-operator", &all).await;
    let op = install.spawn(&format!("iot-operator-{ns}-0"), &[]);
    wait_ready(&op, "leader", Duration::from_secs(60)).await;
    let admin = cp.admin().await;
    let api = Api::namespaced(admin.clone(), ns);
    (install, op, admin, api)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_bridge_relays_changes_and_stops_when_deleted() {
    let _serial = SERIAL.lock().await;
    let Some(cp) = control_plane::with_crds().await else {
        return;
    };
    let (source, sink) = (Mosquitto::start_logged(), Mosquitto::start_logged());
    let (_install, op, admin, api) = bridge_operator(cp, "tb").await;
    let first = Collector::start(sink.tcp_port, "collector-first", "cluster/#", false).await;

    cp.create(&mqtt_bridge(
        "tb",
        "feed",
        &source,
        &sink,
        "cluster/{topic}",
    ))
    .await
    .expect("created");
    wait_ready_reason(&api, "feed", ("True", "Connected"), Duration::from_secs(30)).await;
    publish_numbered(&source, "pub-a", "dev/a", 0..200).await;
    assert!(
        first.wait_for_distinct(200, Duration::from_secs(30)).await,
        "relayed {} of 200",
        first.distinct()
    );

    // A spec change: the relay is replaced (after draining), with the same client ids.
    let second = Collector::start(sink.tcp_port, "collector-second", "moved/#", false).await;
    api.patch(
        "feed",
        &PatchParams::default(),
        &Patch::Merge(
            json!({"spec": {"sink": {"maxMessageBytes": 65536}, "routes": [{"from": "dev/#", "to": "moved/{topic}", "qos": 1}]}}),
        ),
    )
    .await
    .expect("patched");
    wait_until(
        "the changed bridge is Ready",
        Duration::from_secs(30),
        || {
            let api = api.clone();
            async move {
                get_json(&api, "feed").await.is_some_and(|o| {
                    o["status"]["observedGeneration"] == 2
                        && ready_of(&o) == Some(("True".into(), "Connected".into()))
                })
            }
        },
    )
    .await;
    publish_numbered(&source, "pub-b", "dev/b", 0..200).await;
    assert!(
        second.wait_for_distinct(200, Duration::from_secs(30)).await,
        "relayed {} of 200 after the change",
        second.distinct()
    );
    assert!(
        first.snapshot().iter().all(|m| !m.topic.contains("dev/b")),
        "the old route still relayed"
    );
    // A message over the sink's maxMessageBytes: dropped, told, and the stream goes on.
    publish_all(
        source.tcp_port,
        "pub-big",
        vec![("dev/big".to_owned(), vec![b'x'; 204_800], false)],
        QoS::AtLeastOnce,
    )
    .await;
    publish_numbered(&source, "pub-b", "dev/b", 200..210).await;
    assert!(
        second.wait_for_distinct(210, Duration::from_secs(30)).await,
        "relayed {} of 210 after the large message",
        second.distinct()
    );
    assert!(second.snapshot().iter().all(|m| m.topic != "moved/dev/big"));
    wait_until(
        "a MessageDropped Event and status.lastDropped",
        Duration::from_secs(30),
        || {
            let (api, admin) = (api.clone(), admin.clone());
            async move {
                let status = get_json(&api, "feed").await.map(|o| o["status"].clone());
                status.is_some_and(|s| {
                    s["lastDropped"]
                        .as_str()
                        .is_some_and(|m| m.contains("204800 bytes") && m.contains("routes[0] (in)"))
                        && s["messagesDropped"] == 1
                }) && event_reasons(&admin, "tb", "feed")
                    .await
                    .contains(&"MessageDropped".to_owned())
            }
        },
    )
    .await;
    assert_eq!(
        op.metric(
            "iot_operator_bridge_messages_too_large_total",
            "direction=\"in\""
        ),
        1.0
    );
    assert!(
        event_reasons(&admin, "tb", "feed")
            .await
            .contains(&"Connected".to_owned())
    );

    // Delete: both connections close within 5 s, and nothing more is relayed. First the brokers'
    // logs must show the current connections, so that an older disconnect cannot pass for it.
    wait_until(
        "both brokers log the bridge's current connections",
        Duration::from_secs(10),
        || {
            let up =
                !source.disconnected("iotop-tb-feed") && !sink.disconnected("iotop-tb-feed-sink");
            async move { up }
        },
    )
    .await;
    api.delete("feed", &DeleteParams::default())
        .await
        .expect("deleted");
    let deleted = Instant::now();
    wait_until(
        "both brokers see the bridge's clients gone",
        Duration::from_secs(5),
        || {
            let done =
                source.disconnected("iotop-tb-feed") && sink.disconnected("iotop-tb-feed-sink");
            async move { done }
        },
    )
    .await;
    eprintln!(
        "deleted TopicBridge: connections closed after {:.2} s",
        deleted.elapsed().as_secs_f64()
    );
    let before = second.count();
    publish_numbered(&source, "pub-c", "dev/c", 0..10).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(second.count(), before, "a deleted bridge relayed");
    assert_eq!(source.takeovers("iotop-tb-feed"), 0, "{}", source.log());
    let logs = op.logs();
    assert!(!logs.contains("panicked"), "{logs}");
    assert!(
        !logs.to_lowercase().contains("forbidden"),
        "a call the chart's RBAC forbids:\n{logs}"
    );
}

/// Two TopicBridges that give the same sink URL and client id share one sink connection: both
/// become Ready and relay, the sink broker sees one connection and no takeover, deleting one
/// leaves the other relaying, and deleting the last closes the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_bridges_with_one_sink_client_id_share_the_connection() {
    let _serial = SERIAL.lock().await;
    let Some(cp) = control_plane::with_crds().await else {
        return;
    };
    let (source, sink) = (Mosquitto::start_logged(), Mosquitto::start_logged());
    let (_install, op, _admin, api) = bridge_operator(cp, "tbshare").await;
    let collector = Collector::start(sink.tcp_port, "collector-tbshare", "cluster/#", false).await;
    let shared_id = "tbshare-sink";
    for (name, from) in [("left", "left/#"), ("right", "right/#")] {
        let mut bridge = mqtt_bridge("tbshare", name, &source, &sink, "cluster/{topic}");
        bridge["spec"]["sink"]["clientId"] = json!(shared_id);
        bridge["spec"]["routes"][0]["from"] = json!(from);
        cp.create(&bridge).await.expect("created");
    }
    for name in ["left", "right"] {
        wait_ready_reason(&api, name, ("True", "Connected"), Duration::from_secs(30)).await;
    }
    publish_numbered(&source, "pub-left", "left", 0..100).await;
    publish_numbered(&source, "pub-right", "right", 0..100).await;
    assert!(
        collector
            .wait_for_distinct(200, Duration::from_secs(30))
            .await,
        "relayed {} of 200",
        collector.distinct()
    );
    assert_eq!(sink.connections(shared_id), 1, "{}", sink.log());

    api.delete("left", &DeleteParams::default())
        .await
        .expect("deleted");
    wait_until("left is gone", Duration::from_secs(30), || {
        let api = api.clone();
        async move { get_json(&api, "left").await.is_none() }
    })
    .await;
    publish_numbered(&source, "pub-right", "right", 100..150).await;
    assert!(
        collector
            .wait_for_distinct(250, Duration::from_secs(30))
            .await,
        "right relayed {} of 250 after left was deleted",
        collector.distinct()
    );
    assert_eq!(sink.connections(shared_id), 1, "{}", sink.log());
    assert!(!sink.disconnected(shared_id), "{}", sink.log());

    api.delete("right", &DeleteParams::default())
        .await
        .expect("deleted");
    wait_until(
        "the shared connection closes with its last bridge",
        Duration::from_secs(10),
        || {
            let done = sink.disconnected(shared_id);
            async move { done }
        },
    )
    .await;
    assert_eq!(sink.takeovers(shared_id), 0, "{}", sink.log());
    let logs = op.logs();
    assert!(!logs.contains("panicked"), "{logs}");
    assert!(
        !logs.to_lowercase().contains("forbidden"),
        "a call the chart's RBAC forbids:\n{logs}"
    );
}

// ---------------------------------------------------------------------------------------------
// Two replicas (leader election through the Lease, the chart's RBAC), a bridge between two
// logging brokers, and a QoS 1 stream through every failure.

/// A running pair of replicas with one bridge `feed` in `ns`.
struct Pair {
    install: Install,
    source: Mosquitto,
    sink: Mosquitto,
    collector: Collector,
    ns: String,
}

impl Pair {
    const CLIENT: &'static str = "feed";

    fn source_client(&self) -> String {
        format!("iotop-{}-{}", self.ns, Self::CLIENT)
    }

    fn sink_client(&self) -> String {
        format!("{}-sink", self.source_client())
    }

    async fn start(cp: &ControlPlane, ns: &str, sets: &[&str]) -> Pair {
        let (source, sink) = (Mosquitto::start_logged(), Mosquitto::start_logged());
        let lease = format!("leaderElection.leaseName={ns}");
        let watch = format!("watchNamespace={ns}");
        let mut all = vec![lease.as_str(), watch.as_str(), LOOPBACK_SINKS];
        all.extend_from_slice(sets);
        let install = cp.install_chart("iot-operator", &all).await;
        // Persistent: what the sink receives while the collector is away is kept for it.
        let collector =
            Collector::start(sink.tcp_port, &format!("collector-{ns}"), "cluster/#", true).await;
        Pair {
            install,
            source,
            sink,
            collector,
            ns: ns.to_owned(),
        }
    }

    async fn create_bridge(&self, cp: &ControlPlane) {
        cp.create(&mqtt_bridge(
            &self.ns,
            Self::CLIENT,
            &self.source,
            &self.sink,
            "cluster/{topic}",
        ))
        .await
        .expect("bridge created");
        let api: Api<TopicBridge> = Api::namespaced(cp.admin().await, &self.ns);
        wait_ready_reason(
            &api,
            Self::CLIENT,
            ("True", "Connected"),
            Duration::from_secs(30),
        )
        .await;
    }

    /// Deletes the bridge, so that no later test's operator finds it.
    async fn finish(&self, cp: &ControlPlane) {
        let api: Api<TopicBridge> = Api::namespaced(cp.admin().await, &self.ns);
        let _ = api.delete(Self::CLIENT, &DeleteParams::default()).await;
    }

    /// Publishes `n` numbered QoS 1 messages at about 200 per second, in the background.
    fn stream(&self, n: usize) -> tokio::task::JoinHandle<()> {
        let port = self.source.tcp_port;
        let client = format!("stream-{}", self.ns);
        tokio::spawn(async move {
            let mut i = 0;
            while i < n {
                let end = (i + 20).min(n);
                publish_range(port, &client, "dev/s", i..end).await;
                i = end;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    }

    /// Waits for every message of `0..n` at the sink; returns how many never came.
    async fn lost(&self, n: usize, timeout: Duration) -> usize {
        self.collector.wait_for_distinct(n, timeout).await;
        let got: BTreeSet<String> = self
            .collector
            .snapshot()
            .into_iter()
            .map(|m: Received| m.topic)
            .collect();
        (0..n)
            .filter(|i| !got.contains(&format!("cluster/dev/s/{i}")))
            .count()
    }
}

/// Events written by one replica (`reportingInstance`), counting repeats of a series.
async fn events_by(client: &Client, ns: &str, pod: &str) -> i64 {
    events(client, ns)
        .await
        .iter()
        .filter(|e| e.reporting_instance.as_deref() == Some(pod))
        .map(|e| 1 + e.series.as_ref().map_or(0, |s| i64::from(s.count)))
        .sum()
}

const FAST_LEASE: &str = "leaderElection.leaseDurationSeconds=6";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_failover_and_a_deposed_leader_writes_nothing() {
    let _serial = SERIAL.lock().await;
    let Some(cp) = control_plane::with_crds().await else {
        return;
    };
    let pair = Pair::start(cp, "ha-stop", &["replicaCount=2", FAST_LEASE]).await;
    let a = pair.install.spawn("iot-operator-ha-stop-a", &[]);
    wait_ready(&a, "leader", Duration::from_secs(60)).await;
    let b = pair.install.spawn("iot-operator-ha-stop-b", &[]);
    wait_ready(&b, "standby", Duration::from_secs(60)).await;
    pair.create_bridge(cp).await;
    let admin = cp.admin().await;
    let api: Api<TopicBridge> = Api::namespaced(admin.clone(), &pair.ns);

    // The Lease as coordination.k8s.io means it: renewals move renewTime only.
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(admin.clone(), "iot-operator");
    let lease = |l: k8s_openapi::api::coordination::v1::Lease| {
        let s = l.spec.unwrap_or_default();
        (
            s.holder_identity.unwrap_or_default(),
            s.lease_transitions.unwrap_or_default(),
            s.acquire_time.map(|t| t.0),
            s.renew_time.map(|t| t.0),
        )
    };
    let before = lease(leases.get(&pair.ns).await.expect("lease"));

    let n = 3000;
    let stream = pair.stream(n);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let renewed = lease(leases.get(&pair.ns).await.expect("lease"));
    assert_eq!(before.0, a.pod);
    assert_eq!(
        (&renewed.0, renewed.1, renewed.2),
        (&before.0, before.1, before.2),
        "a renewal"
    );
    assert!(
        renewed.3 > before.3,
        "renewTime moves: {before:?} -> {renewed:?}"
    );
    a.signal("STOP");
    let stopped = Instant::now();
    wait_ready(&b, "leader", Duration::from_secs(30)).await;
    eprintln!(
        "SIGSTOP: the standby leads after {:.1} s",
        stopped.elapsed().as_secs_f64()
    );
    // The new leader's own relay is connected (its metrics), and its status writer has had
    // time to write that: the status read before is still the frozen leader's.
    wait_until(
        "the new leader's relay connected",
        Duration::from_secs(30),
        || {
            let connected = b.metric("iot_operator_bridge_connected", "") >= 2.0;
            async move { connected }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    wait_ready_reason(
        &api,
        Pair::CLIENT,
        ("True", "Connected"),
        Duration::from_secs(30),
    )
    .await;
    let taken = lease(leases.get(&pair.ns).await.expect("lease"));
    assert_eq!(taken.0, b.pod);
    assert_eq!(taken.1, before.1 + 1, "one more transition");
    assert!(taken.2 > before.2, "a new acquireTime");
    let a_events = events_by(&admin, &pair.ns, &a.pod).await;
    a.signal("CONT");
    // For 15 s after waking, the deposed leader writes nothing: the bridge stays Connected at
    // every look, and no Event of its instance appears.
    let woke = Instant::now();
    while woke.elapsed() < Duration::from_secs(15) {
        let obj = get_json(&api, Pair::CLIENT).await.expect("bridge");
        assert_eq!(
            ready_of(&obj),
            Some(("True".into(), "Connected".into())),
            "{:.1} s after SIGCONT: {}",
            woke.elapsed().as_secs_f64(),
            obj["status"]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        events_by(&admin, &pair.ns, &a.pod).await,
        a_events,
        "the deposed leader published Events"
    );
    stream.await.expect("stream");
    let lost = pair.lost(n, Duration::from_secs(60)).await;
    eprintln!(
        "SIGSTOP failover: {lost} of {n} QoS 1 messages lost; source takeovers {} (the frozen \
         leader's socket, expected), after SIGCONT none",
        pair.source.takeovers(&pair.source_client())
    );
    assert_eq!(lost, 0);
    // The woken replica never connected again: one takeover (the new leader replacing the frozen
    // socket) at most.
    assert!(
        pair.source.takeovers(&pair.source_client()) <= 1,
        "{}",
        pair.source.log()
    );
    // Woken, it knew its lease had lapsed, then saw the new holder and stopped.
    let logs = a.logs();
    assert!(logs.contains("lease not renewed in time"), "{logs}");
    assert!(logs.contains("another replica holds the lease"), "{logs}");
    pair.finish(cp).await;
}

/// SIGTERM and waits for the exit, off the async workers.
fn terminate(op: &mut Operator) -> Option<std::process::ExitStatus> {
    tokio::task::block_in_place(|| op.terminate(Duration::from_secs(60)))
}

fn signal_pid(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{sig} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_stalled_sink_hands_over_without_overlap_or_loss() {
    let _serial = SERIAL.lock().await;
    let Some(cp) = control_plane::with_crds().await else {
        return;
    };
    let pair = Pair::start(cp, "ha-term", &["replicaCount=2", FAST_LEASE]).await;
    let mut a = pair.install.spawn("iot-operator-ha-term-a", &[]);
    wait_ready(&a, "leader", Duration::from_secs(60)).await;
    let b = pair.install.spawn("iot-operator-ha-term-b", &[]);
    wait_ready(&b, "standby", Duration::from_secs(60)).await;
    pair.create_bridge(cp).await;

    publish_range(pair.source.tcp_port, "pub-term", "dev/s", 0..300).await;
    assert_eq!(pair.lost(300, Duration::from_secs(30)).await, 0);
    // The sink stalls (a hung broker: its sockets stay open, nothing is read or acknowledged);
    // 300 more messages reach the leader's relay and wait there.
    let sink_pid = pair.sink.pid().expect("sink");
    signal_pid(sink_pid, "STOP");
    publish_range(pair.source.tcp_port, "pub-term", "dev/s", 300..600).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let term = Instant::now();
    let status = terminate(&mut a);
    let exited = term.elapsed();
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", a.logs());
    wait_ready(&b, "leader", Duration::from_secs(30)).await;
    eprintln!(
        "SIGTERM with a stalled sink: the leader exited after {:.1} s (drain), the standby led {:.1} s after the signal",
        exited.as_secs_f64(),
        term.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    signal_pid(sink_pid, "CONT");
    let lost = pair.lost(600, Duration::from_secs(60)).await;
    let (source_overlaps, sink_overlaps) = (
        pair.source.takeovers(&pair.source_client()),
        pair.sink.takeovers(&pair.sink_client()),
    );
    eprintln!(
        "SIGTERM with a stalled sink: {lost} of 600 lost; client-id takeovers: source {source_overlaps}, sink {sink_overlaps}"
    );
    assert_eq!(source_overlaps, 0, "{}", pair.source.log());
    assert_eq!(lost, 0);
    pair.finish(cp).await;
}

/// A sink that stays connected but takes nothing (SIGSTOP: its sockets stay open) is told as
/// `Ready=False` reason `Stalled` with a Warning Event, after the chart's `stallSeconds`; once
/// it takes messages again, Ready returns with a `Resumed` Event, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_sink_is_reported_and_cleared_without_loss() {
    let _serial = SERIAL.lock().await;
    let Some(cp) = control_plane::with_crds().await else {
        return;
    };
    let pair = Pair::start(cp, "stall", &["stallSeconds=5"]).await;
    let a = pair.install.spawn("iot-operator-stall-a", &[]);
    wait_ready(&a, "leader", Duration::from_secs(60)).await;
    pair.create_bridge(cp).await;
    let api: Api<TopicBridge> = Api::namespaced(cp.admin().await, &pair.ns);
    publish_range(pair.source.tcp_port, "pub-stall", "dev/s", 0..100).await;
    assert_eq!(pair.lost(100, Duration::from_secs(30)).await, 0);

    let sink_pid = pair.sink.pid().expect("sink");
    signal_pid(sink_pid, "STOP");
    let stopped = Instant::now();
    publish_range(pair.source.tcp_port, "pub-stall", "dev/s", 100..200).await;
    // 5 s of stall, then up to one status interval (5 s) before it is written.
    wait_ready_reason(
        &api,
        Pair::CLIENT,
        ("False", "Stalled"),
        Duration::from_secs(30),
    )
    .await;
    let told = stopped.elapsed();
    let obj = get_json(&api, Pair::CLIENT).await.expect("bridge");
    let ready = obj["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
        .cloned()
        .unwrap_or_default();
    let message = ready["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with("the sink is connected but has taken none of the messages"),
        "{ready}"
    );
    assert_eq!(obj["status"]["connectionState"], "Connected", "{obj}");
    eprintln!(
        "stall: Ready=False reason Stalled {:.1} s after the sink stopped (stallSeconds=5)",
        told.as_secs_f64()
    );
    // Not before the threshold.
    assert!(told >= Duration::from_secs(5), "{told:?}");
    let stalled = r#"bridge="stall/feed""#;
    assert_eq!(
        a.metric("iot_operator_bridge_stalled_connections", stalled),
        1.0
    );
    let client = cp.admin().await;
    wait_event(&client, &pair.ns, Pair::CLIENT, "Stalled").await;

    signal_pid(sink_pid, "CONT");
    wait_ready_reason(
        &api,
        Pair::CLIENT,
        ("True", "Connected"),
        Duration::from_secs(30),
    )
    .await;
    wait_event(&client, &pair.ns, Pair::CLIENT, "Resumed").await;
    assert_eq!(
        a.metric("iot_operator_bridge_stalled_connections", stalled),
        0.0
    );
    assert_eq!(pair.lost(200, Duration::from_secs(60)).await, 0);
    drop(a);
    pair.finish(cp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_and_a_new_pod_lose_nothing() {
    let _serial = SERIAL.lock().await;
    let Some(cp) = control_plane::with_crds().await else {
        return;
    };
    let pair = Pair::start(cp, "ha-kill", &[FAST_LEASE]).await;
    let mut a = pair.install.spawn("iot-operator-ha-kill-a", &[]);
    wait_ready(&a, "leader", Duration::from_secs(60)).await;
    pair.create_bridge(cp).await;
    let n = 2000;
    let stream = pair.stream(n);
    tokio::time::sleep(Duration::from_secs(3)).await;
    a.kill();
    let killed = Instant::now();
    let a2 = pair.install.spawn("iot-operator-ha-kill-a2", &[]);
    wait_ready(&a2, "leader", Duration::from_secs(30)).await;
    eprintln!(
        "kill -9: the new pod leads after {:.1} s (the lease must expire first)",
        killed.elapsed().as_secs_f64()
    );
    stream.await.expect("stream");
    let lost = pair.lost(n, Duration::from_secs(60)).await;
    eprintln!("kill -9 and a new pod: {lost} of {n} QoS 1 messages lost");
    assert_eq!(lost, 0);
    assert_eq!(pair.source.takeovers(&pair.source_client()), 0);
    pair.finish(cp).await;
}

/// What a rolling update of the chart's default Deployment does: the new pod starts and becomes
/// ready (standing by), then the old pod gets SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_update_of_the_default_chart_hands_over_without_overlap() {
    let _serial = SERIAL.lock().await;
    let Some(cp) = control_plane::with_crds().await else {
        return;
    };
    // The chart's defaults, but for the Lease's name and the watched namespace, which keep this
    // test apart from the others, and the loopback sink the tenancy rules must allow.
    let pair = Pair::start(cp, "roll", &[]).await;
    assert!(
        pair.install
            .env
            .contains(&("IOT_OPERATOR_LEADER_ELECTION".into(), "true".into())),
        "the chart's default elects a leader"
    );
    let mut old = pair.install.spawn("iot-operator-roll-old", &[]);
    wait_ready(&old, "leader", Duration::from_secs(60)).await;
    pair.create_bridge(cp).await;
    let n = 3000;
    let stream = pair.stream(n);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let new = pair.install.spawn("iot-operator-roll-new", &[]);
    wait_ready(&new, "standby", Duration::from_secs(60)).await;
    let term = Instant::now();
    let status = terminate(&mut old);
    let exited = term.elapsed();
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", old.logs());
    wait_ready(&new, "leader", Duration::from_secs(30)).await;
    eprintln!(
        "rolling update: the old pod exited {:.1} s after SIGTERM, the new one led {:.1} s after it",
        exited.as_secs_f64(),
        term.elapsed().as_secs_f64()
    );
    stream.await.expect("stream");
    let lost = pair.lost(n, Duration::from_secs(60)).await;
    let (source_overlaps, sink_overlaps) = (
        pair.source.takeovers(&pair.source_client()),
        pair.sink.takeovers(&pair.sink_client()),
    );
    eprintln!(
        "rolling update: {lost} of {n} lost; client-id takeovers: source {source_overlaps}, sink {sink_overlaps}"
    );
    assert_eq!((source_overlaps, sink_overlaps), (0, 0));
    assert_eq!(lost, 0);
    pair.finish(cp).await;
}

// ---------------------------------------------------------------------------------------------
// Bridges spread over replicas (`bridgeSharding.enabled`): each replica runs a share, a killed
// replica's bridges move, a new one takes a share, and no client id ever connects twice.

const SHARD_NS: &str = "shard";
const SHARD_BRIDGES: usize = 12;

fn shard_bridge(i: usize, source: &Mosquitto, sink: &Mosquitto) -> Value {
    shard_bridge_in(SHARD_NS, i, source, sink)
}

fn shard_bridge_in(ns: &str, i: usize, source: &Mosquitto, sink: &Mosquitto) -> Value {
    json!({"apiVersion": "iot.operator.dev/v1alpha1", "kind": "TopicBridge",
           "metadata": {"name": format!("b{i}"), "namespace": ns},
           "spec": {"source": {"mqtt": {"url": source.tcp_url()}, "persistentSession": true},
                    "sink": {"url": sink.tcp_url()},
                    "routes": [{"from": format!("dev/{i}/#"), "to": "cluster/{topic}", "qos": 1}]}})
}

/// The chart with bridge sharding on, watching `ns` (its Leases named after it), loopback sinks
/// allowed, and `sets`.
async fn install_sharded(cp: &ControlPlane, ns: &str, sets: &[&str]) -> Install {
    let lease = format!("leaderElection.leaseName={ns}");
    let watch = format!("watchNamespace={ns}");
    let mut all = vec![
        lease.as_str(),
        watch.as_str(),
        LOOPBACK_SINKS,
        "bridgeSharding.enabled=true",
    ];
    all.extend_from_slice(sets);
    cp.install_chart("iot-operator", &all).await
}

/// QoS 1 traffic on every bridge until `stop`: step n publishes dev/<i>/s/<n> for every bridge
/// i; returns the number of steps.
fn shard_stream(
    port: u16,
    client: &str,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<usize> {
    let client = client.to_owned();
    tokio::spawn(async move {
        let mut n = 0usize;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            let messages = (n..n + 5)
                .flat_map(|step| {
                    (0..SHARD_BRIDGES).map(move |i| {
                        (
                            format!("dev/{i}/s/{step}"),
                            step.to_string().into_bytes(),
                            false,
                        )
                    })
                })
                .collect();
            publish_all(port, &client, messages, QoS::AtLeastOnce).await;
            n += 5;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        n
    })
}

/// Which replica each bridge's status names, for bridges that are Ready.
async fn replicas(api: &Api<TopicBridge>) -> std::collections::BTreeMap<String, String> {
    api.list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|tb| {
            let status = tb.status?;
            let ready = status.conditions.iter().any(|c| {
                c.type_ == "Ready" && c.status == iot_operator::api::ConditionStatus::True
            });
            let replica = status.replica?;
            ready.then(|| (tb.metadata.name.unwrap_or_default(), replica))
        })
        .collect()
}

/// Bridges each replica holds, from its metrics.
fn held(ops: &[&Operator]) -> Vec<f64> {
    ops.iter()
        .map(|o| o.metric("iot_operator_bridges_held", ""))
        .collect()
}

/// Until every bridge is held by one of `ops`, each of whose relays has both sides connected,
/// and their statuses name those replicas; returns how long that took.
async fn settled(api: &Api<TopicBridge>, ops: &[&Operator], timeout: Duration) -> Duration {
    let start = Instant::now();
    let pods: BTreeSet<String> = ops.iter().map(|o| o.pod.clone()).collect();
    loop {
        let h = held(ops);
        let connected: f64 = ops
            .iter()
            .map(|o| o.metric("iot_operator_bridge_connected", ""))
            .sum();
        let total: f64 = h.iter().sum();
        let statuses = replicas(api).await;
        // Every status names the replica whose metrics say it holds the bridge (a status not yet
        // rewritten by a bridge's new replica still names the old one).
        let named = statuses.len() == SHARD_BRIDGES
            && statuses.values().all(|r| pods.contains(r))
            && ops
                .iter()
                .zip(&h)
                .all(|(o, &n)| statuses.values().filter(|r| **r == o.pod).count() as f64 == n);
        if total == SHARD_BRIDGES as f64
            && connected == 2.0 * SHARD_BRIDGES as f64
            && h.iter().all(|&n| n >= 1.0)
            && named
        {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "not settled after {timeout:?}: held {h:?}, connected sides {connected}, statuses \
             {statuses:?}\n{}",
            ops.iter()
                .map(|o| format!("--- {}\n{}", o.pod, o.logs()))
                .collect::<String>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridges_spread_over_replicas_move_on_kill_and_rebalance_without_overlap_or_loss() {
    let _serial = SERIAL.lock().await;
    let Some(cp) = control_plane::with_crds().await else {
        return;
    };
    let (source, sink) = (Mosquitto::start_logged(), Mosquitto::start_logged());
    let install = cp
        .install_chart(
            "iot-operator",
            &[
                &format!("leaderElection.leaseName={SHARD_NS}"),
                &format!("watchNamespace={SHARD_NS}"),
                LOOPBACK_SINKS,
                "bridgeSharding.enabled=true",
                "replicaCount=3",
                FAST_LEASE,
            ],
        )
        .await;
    assert!(
        install
            .env
            .contains(&("IOT_OPERATOR_SHARD_BRIDGES".into(), "true".into())),
        "the chart turns sharding on"
    );
    let mut a = install.spawn("iot-operator-shard-a", &[]);
    let b = install.spawn("iot-operator-shard-b", &[]);
    let c = install.spawn("iot-operator-shard-c", &[]);
    for op in [&a, &b, &c] {
        wait_ready(op, "ready", Duration::from_secs(60)).await;
    }
    let admin = cp.admin().await;
    let api: Api<TopicBridge> = Api::namespaced(admin.clone(), SHARD_NS);
    let collector = Collector::start(sink.tcp_port, "collector-shard", "cluster/#", true).await;
    for i in 0..SHARD_BRIDGES {
        cp.create(&shard_bridge(i, &source, &sink))
            .await
            .expect("bridge created");
    }
    let took = settled(&api, &[&a, &b, &c], Duration::from_secs(60)).await;
    let spread = held(&[&a, &b, &c]);
    eprintln!(
        "sharding: 12 bridges over 3 replicas {spread:?}, all connected {:.1} s after creation",
        took.as_secs_f64()
    );

    // QoS 1 traffic on every bridge until told to stop: step n publishes dev/<i>/s/<n> for
    // every bridge i.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stream = shard_stream(source.tcp_port, "stream-shard", stop.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;

    // kill -9 one replica: its bridges resume on the other two.
    let a_had = a.metric("iot_operator_bridges_held", "");
    a.kill();
    let killed = Instant::now();
    settled(&api, &[&b, &c], Duration::from_secs(40)).await;
    let failover = killed.elapsed();
    eprintln!(
        "sharding: kill -9 of a replica holding {a_had} bridges; all 12 connected on the other \
         two {:.1} s later (lease duration 6 s), held {:?}",
        failover.as_secs_f64(),
        held(&[&b, &c])
    );
    // A bridge may pass only once the dead replica's member Lease has gone a whole lease
    // duration (6 s) without renewal, counted from its last renewal, which came before the
    // kill; then a round (250 ms) and a connection.
    assert!(
        failover < Duration::from_secs(7),
        "failover took {failover:?}"
    );
    let before = replicas(&api).await;

    // A fourth replica joins: it takes a share, and only bridges that must move do.
    let handovers_before: f64 = [&b, &c]
        .iter()
        .map(|o| o.metric("iot_operator_bridge_handovers_total", "reason=\"released\""))
        .sum();
    let d = install.spawn("iot-operator-shard-d", &[]);
    wait_ready(&d, "ready", Duration::from_secs(60)).await;
    let joined = Instant::now();
    settled(&api, &[&b, &c, &d], Duration::from_secs(40)).await;
    let rebalance = joined.elapsed();
    let after = replicas(&api).await;
    let moved = before
        .iter()
        .filter(|(k, r)| after.get(*k) != Some(*r))
        .count();
    let released: f64 = [&b, &c]
        .iter()
        .map(|o| o.metric("iot_operator_bridge_handovers_total", "reason=\"released\""))
        .sum::<f64>()
        - handovers_before;
    eprintln!(
        "sharding: a fourth replica took {} bridges {:.1} s after it was ready; {moved} of 12 \
         bridges changed replica ({released} released by the others), held {:?}",
        d.metric("iot_operator_bridges_held", ""),
        rebalance.as_secs_f64(),
        held(&[&b, &c, &d])
    );
    assert_eq!(moved as f64, released, "every move is a release and a take");
    assert!(moved <= SHARD_BRIDGES / 2, "{moved} bridges moved");
    tokio::time::sleep(Duration::from_secs(2)).await;

    // SIGTERM (a rollout, a scale-down): the replica drains its relays and releases their
    // Leases, so the others take them on their next round instead of after a lease duration.
    let mut b = b;
    let term = Instant::now();
    let status = terminate(&mut b);
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", b.logs());
    settled(&api, &[&c, &d], Duration::from_secs(40)).await;
    let handed = term.elapsed();
    eprintln!(
        "sharding: SIGTERM of a replica; its bridges connected on the other two {:.1} s after \
         the signal, held {:?}",
        handed.as_secs_f64(),
        held(&[&c, &d])
    );
    assert!(handed < Duration::from_secs(5), "hand-over took {handed:?}");

    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let steps = stream.await.expect("stream");
    let sent = steps * SHARD_BRIDGES;
    collector
        .wait_for_distinct(sent, Duration::from_secs(60))
        .await;
    let got: BTreeSet<String> = collector.snapshot().into_iter().map(|m| m.topic).collect();
    let lost = (0..SHARD_BRIDGES)
        .flat_map(|i| (0..steps).map(move |n| format!("cluster/dev/{i}/s/{n}")))
        .filter(|t| !got.contains(t))
        .count();
    let overlaps: usize = (0..SHARD_BRIDGES)
        .map(|i| {
            let id = format!("iotop-{SHARD_NS}-b{i}");
            source.takeovers(&id) + sink.takeovers(&format!("{id}-sink"))
        })
        .sum();
    eprintln!(
        "sharding: {lost} of {sent} QoS 1 messages lost over the kill and the rebalance; \
         client ids connected twice at once: {overlaps}"
    );
    assert_eq!(overlaps, 0, "{}", source.log());
    assert_eq!(lost, 0);
    for op in [&b, &c, &d] {
        let logs = op.logs();
        assert!(!logs.contains("panicked"), "{logs}");
        assert!(
            !logs.contains("another replica holds this bridge"),
            "{logs}"
        );
        assert!(
            !logs.to_lowercase().contains("forbidden"),
            "a call the chart's RBAC forbids:\n{logs}"
        );
    }
    // Events say which replica runs a bridge: one `Running` per start, naming the replica
    // that wrote it. Every bridge started at least once; the moved ones more.
    let pods = [&a.pod, &b.pod, &c.pod, &d.pod];
    let running: Vec<_> = events(&admin, SHARD_NS)
        .await
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("Running"))
        .collect();
    for e in &running {
        let note = e.note.clone().unwrap_or_default();
        let by = e.reporting_instance.clone().unwrap_or_default();
        assert!(
            pods.iter().any(|p| **p == by) && note.contains(&by),
            "{by}: {note}"
        );
    }
    for i in 0..SHARD_BRIDGES {
        let name = format!("b{i}");
        assert!(
            running.iter().any(|e| regarding(e) == Some(name.as_str())),
            "no Running Event for {name}"
        );
    }
    for i in 0..SHARD_BRIDGES {
        let _ = api.delete(&format!("b{i}"), &DeleteParams::default()).await;
    }
}

/// A bridge with `connections: 3` and a shared subscription, on two sharded replicas: its
/// connections are spread over both, `status.connections` names each one's replica, a QoS 1
/// stream arrives whole, and going back to one connection stops the others and removes their
/// entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridge_with_three_connections_is_spread_over_replicas() {
    let _serial = SERIAL.lock().await;
    let Some(cp) = control_plane::with_crds().await else {
        return;
    };
    let ns = "conns";
    let (source, sink) = (Mosquitto::start_logged(), Mosquitto::start_logged());
    let install = install_sharded(cp, ns, &["replicaCount=2", FAST_LEASE]).await;
    let a = install.spawn("iot-operator-conns-a", &[]);
    let b = install.spawn("iot-operator-conns-b", &[]);
    for op in [&a, &b] {
        wait_ready(op, "ready", Duration::from_secs(60)).await;
    }
    let admin = cp.admin().await;
    let api: Api<TopicBridge> = Api::namespaced(admin.clone(), ns);
    let collector = Collector::start(sink.tcp_port, "collector-conns", "cluster/#", true).await;
    let mut bridge = mqtt_bridge(ns, "feed", &source, &sink, "cluster/{topic}");
    bridge["spec"]["connections"] = json!(3);
    bridge["spec"]["routes"][0]["shareGroup"] = json!("relay");
    cp.create(&bridge).await.expect("bridge created");

    // Each connection's entry, once all three are connected.
    let entries = || {
        let api = api.clone();
        async move {
            api.get_status("feed")
                .await
                .ok()
                .and_then(|tb| tb.status)
                .map(|s| s.connections)
                .unwrap_or_default()
        }
    };
    wait_until(
        "three connections connected",
        Duration::from_secs(60),
        || {
            let entries = entries();
            async move {
                let e = entries.await;
                e.len() == 3
                    && e.iter().all(|c| {
                        c.connection_state == Some(iot_operator::api::ConnectionState::Connected)
                    })
            }
        },
    )
    .await;
    let replicas: BTreeSet<String> = entries()
        .await
        .into_iter()
        .filter_map(|c| c.replica)
        .collect();
    let held = (
        a.metric("iot_operator_bridges_held", ""),
        b.metric("iot_operator_bridges_held", ""),
    );
    eprintln!("connections: 3 connections of one bridge, held {held:?}, replicas {replicas:?}");
    assert_eq!(replicas.len(), 2, "spread over both replicas");
    assert_eq!(held.0 + held.1, 3.0);

    let n = 3000;
    publish_range(source.tcp_port, "pub-conns", "dev/s", 0..n).await;
    assert!(
        collector
            .wait_for_distinct(n, Duration::from_secs(60))
            .await,
        "{} of {n} arrived",
        collector.distinct()
    );
    // Each connection relayed a share.
    wait_until(
        "every connection reports a share",
        Duration::from_secs(20),
        || {
            let entries = entries();
            async move { entries.await.iter().all(|c| c.messages_relayed > 0) }
        },
    )
    .await;

    // Back to one connection: the other two stop and their entries go.
    api.patch(
        "feed",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"connections": 1}})),
    )
    .await
    .expect("patched");
    wait_until("one connection left", Duration::from_secs(30), || {
        let (entries, source) = (entries(), &source);
        let gone =
            source.disconnected("iotop-conns-feed-1") && source.disconnected("iotop-conns-feed-2");
        async move { gone && entries.await.is_empty() }
    })
    .await;
    publish_range(source.tcp_port, "pub-conns", "dev/s", n..n + 200).await;
    assert!(
        collector
            .wait_for_distinct(n + 200, Duration::from_secs(30))
            .await,
        "{} of {} arrived after going back to one connection",
        collector.distinct(),
        n + 200
    );
    for i in ["", "-1", "-2"] {
        let id = format!("iotop-conns-feed{i}");
        assert_eq!(source.takeovers(&id), 0, "{}", source.log());
    }
    let _ = api.delete("feed", &DeleteParams::default()).await;
}

/// A bridge with two connections whose second one the source broker refuses (its one client
/// is bound to the first connection's client id): `Ready=False` reason `Connecting` (it never
/// connected), naming connection 1 and the broker's answer, while the first connection relays
/// the whole stream; once the broker lets both in, `Ready=True` for all of them; when the
/// broker refuses connection 1 again after a restart (a connection lost), reason `Degraded`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridge_with_a_connection_down_is_not_ready_until_every_connection_is_up() {
    let _serial = SERIAL.lock().await;
    let Some(cp) = control_plane::with_crds().await else {
        return;
    };
    let ns = "degraded";
    let first = "iotop-degraded-feed";
    let mut source = Mosquitto::with_one_client("relay", "relay-password-Wombat-7", Some(first));
    let sink = Mosquitto::start_logged();
    let (_install, op, _admin, api) = bridge_operator(cp, ns).await;
    cp.apply(&json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "source-creds", "namespace": ns,
                     "annotations": {"iot.operator.dev/topic-bridges": "feed"}},
        "stringData": {"username": "relay", "password": "relay-password-Wombat-7"}}))
        .await
        .expect("secret");
    let collector = Collector::start(sink.tcp_port, "collector-degraded", "cluster/#", true).await;
    let mut bridge = mqtt_bridge(ns, "feed", &source, &sink, "cluster/{topic}");
    bridge["spec"]["source"]["mqtt"]["credentialsSecret"] = json!({"name": "source-creds"});
    bridge["spec"]["connections"] = json!(2);
    bridge["spec"]["routes"][0]["shareGroup"] = json!("relay");
    cp.create(&bridge).await.expect("bridge created");

    // Connection 0 up, connection 1 refused (first "has not reported yet", then its state and
    // error once its writer has written them).
    let told = |reason: &'static str, state: &'static str| {
        let api = api.clone();
        async move {
            get_json(&api, "feed").await.is_some_and(|o| {
                let message = ready_message(&o);
                ready_of(&o) == Some(("False".into(), reason.into()))
                    && message.starts_with("1 of 2 connections are connected; connection 1 on ")
                    && message.contains(&format!(" is {state} ("))
                    && message.contains("NotAuthorized")
            })
        }
    };
    wait_until(
        "Ready=False Connecting naming connection 1",
        Duration::from_secs(60),
        || told("Connecting", "Connecting"),
    )
    .await;
    let obj = get_json(&api, "feed").await.expect("bridge");
    let message = ready_message(&obj);
    assert!(!message.contains("Wombat"), "{message}");
    eprintln!("connections: one refused at start: Ready=False reason Connecting: {message}");
    // The top-level state is still the first connection's, which relays the whole stream.
    assert_eq!(obj["status"]["connectionState"], "Connected", "{obj}");
    let n = 500;
    publish_range(source.tcp_port, "pub-degraded", "dev/s", 0..n).await;
    assert!(
        collector
            .wait_for_distinct(n, Duration::from_secs(60))
            .await,
        "{} of {n} arrived with one connection of two",
        collector.distinct()
    );

    // The broker lets both connections in: Ready for all of them.
    source.bind_client_id(None);
    wait_ready_reason(&api, "feed", ("True", "Connected"), Duration::from_secs(60)).await;
    let obj = get_json(&api, "feed").await.expect("bridge");
    assert_eq!(
        ready_message(&obj),
        "all 2 connections have both brokers connected; messages are relayed",
        "{obj}"
    );
    let entries = obj["status"]["connections"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(entries.len(), 2, "{obj}");
    assert!(
        entries.iter().all(|e| e["connectionState"] == "Connected"),
        "{obj}"
    );

    // Restarted refusing connection 1 again: connection 0 comes back, connection 1 was lost.
    source.bind_client_id(Some(first));
    wait_until(
        "Ready=False Degraded naming connection 1",
        Duration::from_secs(60),
        || told("Degraded", "ConnectionDisrupted"),
    )
    .await;
    eprintln!(
        "connections: one lost: Ready=False reason Degraded: {}",
        ready_message(&get_json(&api, "feed").await.expect("bridge"))
    );
    publish_range(source.tcp_port, "pub-degraded", "dev/s", n..n + 200).await;
    assert!(
        collector
            .wait_for_distinct(n + 200, Duration::from_secs(60))
            .await,
        "{} of {} arrived while degraded",
        collector.distinct(),
        n + 200
    );
    let logs = op.logs();
    assert!(
        !logs.contains("Wombat") && !logs.contains("panicked"),
        "{logs}"
    );
    let _ = api.delete("feed", &DeleteParams::default()).await;
}

/// A bridge with two connections whose second one stalls (the sink, through a proxy, stops
/// serving that connection alone; its socket stays open): `Ready=False` reason `Stalled`,
/// naming connection 1 and its stall, its entry in `status.connections` says so, and once the
/// sink answers it again `Ready=True`, with nothing lost. Before, only an Event told it and
/// the bridge read `Ready=True` throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stall_of_one_connection_of_several_makes_the_bridge_not_ready() {
    let _serial = SERIAL.lock().await;
    let Some(cp) = control_plane::with_crds().await else {
        return;
    };
    let ns = "stalled-conn";
    let source = Mosquitto::start_logged();
    let sink = Mosquitto::start_logged();
    // The sink's answers to connection 1 (its sink client id) are held on SIGUSR1.
    let sink_port = sink.tcp_port.to_string();
    let held = format!("iotop-{ns}-feed-sink-1");
    let (proxy, proxy_port) = support::start_python("tcp_proxy.py", &[&sink_port, "--hold", &held]);
    let (_install, op, admin, api) = bridge_operator_with(cp, ns, &["stallSeconds=5"]).await;
    let collector = Collector::start(sink.tcp_port, "collector-stalled", "cluster/#", true).await;
    let mut bridge = mqtt_bridge(ns, "feed", &source, &sink, "cluster/{topic}");
    bridge["spec"]["sink"]["url"] = json!(format!("mqtt://127.0.0.1:{proxy_port}"));
    bridge["spec"]["connections"] = json!(2);
    bridge["spec"]["routes"][0]["shareGroup"] = json!("relay");
    cp.create(&bridge).await.expect("bridge created");
    wait_ready_reason(&api, "feed", ("True", "Connected"), Duration::from_secs(60)).await;
    assert_eq!(
        ready_message(&get_json(&api, "feed").await.expect("bridge")),
        "all 2 connections have both brokers connected; messages are relayed"
    );
    let n = 200;
    publish_range(source.tcp_port, "pub-stalled", "dev/s", 0..n).await;
    assert!(
        collector
            .wait_for_distinct(n, Duration::from_secs(60))
            .await,
        "{} of {n} arrived before the stall",
        collector.distinct()
    );

    signal_pid(proxy.pid(), "USR1");
    let held_at = Instant::now();
    // The broker hands connection 1 its share of these: they wait for the sink.
    publish_range(source.tcp_port, "pub-stalled", "dev/s", n..2 * n).await;
    let stalled = || {
        let api = api.clone();
        async move {
            get_json(&api, "feed").await.is_some_and(|o| {
                ready_of(&o) == Some(("False".into(), "Stalled".into()))
                    && ready_message(&o).starts_with(&format!(
                        "1 of 2 connections are connected and moving messages; connection 1 on \
                         iot-operator-{ns}-0 is Stalled: the sink is connected but has taken none"
                    ))
            })
        }
    };
    wait_until(
        "Ready=False Stalled naming connection 1",
        Duration::from_secs(40),
        stalled,
    )
    .await;
    let told = held_at.elapsed();
    let obj = get_json(&api, "feed").await.expect("bridge");
    let entries = obj["status"]["connections"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let entry = |i: i64| {
        entries
            .iter()
            .find(|e| e["index"] == i)
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(entry(1)["connectionState"], "Connected", "{obj}");
    assert!(
        entry(1)["stalled"]
            .as_str()
            .is_some_and(|s| s.starts_with("the sink is connected")),
        "{obj}"
    );
    assert!(entry(0).get("stalled").is_none(), "{obj}");
    // The first connection moves its share meanwhile; connection 1's waits.
    let meanwhile = collector.distinct();
    assert!(
        meanwhile > n && meanwhile < 2 * n,
        "{meanwhile} of {} arrived with connection 1 stalled",
        2 * n
    );
    eprintln!(
        "connections: one stalled: Ready=False reason Stalled {:.1} s after the sink stopped \
         answering it (stallSeconds=5), {} of {} relayed meanwhile: {}",
        told.as_secs_f64(),
        meanwhile,
        2 * n,
        ready_message(&obj)
    );
    assert!(told >= Duration::from_secs(5), "{told:?}");
    wait_event(&admin, ns, "feed", "Stalled").await;

    signal_pid(proxy.pid(), "USR2");
    wait_ready_reason(&api, "feed", ("True", "Connected"), Duration::from_secs(30)).await;
    assert!(
        collector
            .wait_for_distinct(2 * n, Duration::from_secs(60))
            .await,
        "{} of {} arrived after the stall",
        collector.distinct(),
        2 * n
    );
    let obj = get_json(&api, "feed").await.expect("bridge");
    assert!(
        obj["status"]["connections"]
            .as_array()
            .is_some_and(|e| e.len() == 2 && e.iter().all(|e| e.get("stalled").is_none())),
        "{obj}"
    );
    let logs = op.logs();
    assert!(!logs.contains("panicked"), "{logs}");
    let _ = api.delete("feed", &DeleteParams::default()).await;
}

/// Routes removed from a bridge by editing it leave the source's persistent session, so the
/// broker no longer queues for the bridge what no route reads: one removed while the operator
/// runs (its new relay unsubscribes what the old one read), one removed while no operator runs
/// (the next operator's relay unsubscribes what `status.subscriptions` recorded). Checked on
/// the session itself after the bridge is deleted (a deleted bridge's session stays at the
/// broker): a client with the bridge's client id finds queued only what the remaining route
/// reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_removed_from_a_bridge_leave_its_persistent_session() {
    let _serial = SERIAL.lock().await;
    let Some(cp) = control_plane::with_crds().await else {
        return;
    };
    let ns = "removed";
    let (source, sink) = (Mosquitto::start_logged(), Mosquitto::start_logged());
    let (install, mut op, _admin, api) = bridge_operator(cp, ns).await;
    let collector = Collector::start(sink.tcp_port, "collector-removed", "cluster/#", true).await;
    let routes = |froms: &[&str]| {
        froms
            .iter()
            .map(|f| json!({"from": f, "to": "cluster/{topic}", "qos": 1}))
            .collect::<Vec<_>>()
    };
    let mut bridge = mqtt_bridge(ns, "feed", &source, &sink, "cluster/{topic}");
    bridge["spec"]["routes"] = json!(routes(&["dev/#", "alerts/#", "jobs/#"]));
    // The session is looked at after the bridge is deleted.
    bridge["spec"]["deletionPolicy"] = json!("RetainSessions");
    cp.create(&bridge).await.expect("created");
    // Ready at `generation`, with `recorded` in status.subscriptions.source.
    let ready_at = |generation: i64, recorded: &'static [&'static str]| {
        let api = api.clone();
        async move {
            get_json(&api, "feed").await.is_some_and(|o| {
                let mut source: Vec<String> = o["status"]["subscriptions"]["source"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|f| f.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                source.sort();
                o["status"]["observedGeneration"] == generation
                    && ready_of(&o) == Some(("True".into(), "Connected".into()))
                    && source == recorded
            })
        }
    };
    wait_until(
        "Ready, recording 3 filters",
        Duration::from_secs(30),
        || ready_at(1, &["alerts/#", "dev/#", "jobs/#"]),
    )
    .await;
    let all = |n: usize| {
        ["dev", "alerts", "jobs"]
            .iter()
            .map(|t| (format!("{t}/{n}"), n.to_string().into_bytes(), false))
            .collect::<Vec<_>>()
    };
    publish_all(source.tcp_port, "pub-removed", all(1), QoS::AtLeastOnce).await;
    assert!(
        collector
            .wait_for_distinct(3, Duration::from_secs(30))
            .await,
        "relayed {} of 3",
        collector.distinct()
    );

    // alerts/# is removed while the operator runs.
    let patch = |froms: &[&str]| Patch::Merge(json!({"spec": {"routes": routes(froms)}}));
    api.patch(
        "feed",
        &PatchParams::default(),
        &patch(&["dev/#", "jobs/#"]),
    )
    .await
    .expect("patched");
    wait_until("Ready at generation 2", Duration::from_secs(30), || {
        ready_at(2, &["dev/#", "jobs/#"])
    })
    .await;

    // jobs/# is removed while no operator runs; the next one starts from the record.
    assert!(
        op.terminate(Duration::from_secs(30)).is_some(),
        "{}",
        op.logs()
    );
    api.patch("feed", &PatchParams::default(), &patch(&["dev/#"]))
        .await
        .expect("patched");
    let op = install.spawn(&format!("iot-operator-{ns}-1"), &[]);
    wait_ready(&op, "leader", Duration::from_secs(60)).await;
    wait_until("Ready at generation 3", Duration::from_secs(30), || {
        ready_at(3, &["dev/#"])
    })
    .await;
    publish_all(source.tcp_port, "pub-removed", all(2), QoS::AtLeastOnce).await;
    assert!(
        collector
            .wait_for_distinct(4, Duration::from_secs(30))
            .await,
        "relayed {} of 4 after the changes",
        collector.distinct()
    );

    let client_id = format!("iotop-{ns}-feed");
    api.delete("feed", &DeleteParams::default())
        .await
        .expect("deleted");
    wait_until(
        "the bridge's source connection closed",
        Duration::from_secs(30),
        || {
            let done = source.disconnected(&client_id);
            async move { done }
        },
    )
    .await;
    publish_all(source.tcp_port, "pub-removed", all(3), QoS::AtLeastOnce).await;
    let topics = support::mqtt::queued_topics(source.tcp_port, &client_id).await;
    assert!(
        !topics.is_empty(),
        "the session kept nothing: {}",
        source.log()
    );
    assert_eq!(topics, vec!["dev/3".to_owned()], "{}", op.logs());
}

/// Waits until the operator has logged the end of the session of `client_id`.
async fn wait_session_ended(op: &control_plane::Operator, client_id: &str) {
    let field = format!("client_id={client_id}");
    let names = |l: &str| {
        l.split_whitespace().any(|w| w == field)
            || l.contains(&format!("\"client_id\":\"{client_id}\""))
    };
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        let logs = op.logs();
        if logs
            .lines()
            .any(|l| l.contains("ended the session the broker kept") && names(l))
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let logs = op.logs();
    let told: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("session") || l.contains("relay stopped") || l.contains("retired"))
        .collect();
    panic!(
        "the operator did not end the session of {client_id} within 60 s; it logged:\n{}",
        told.join("\n")
    );
}

/// A connection the bridge no longer has (`connections` lowered), and then the bridge itself
/// deleted, end the sessions the brokers kept for them (`deletionPolicy: EndSessions`, the
/// default), on the source (the connection's own) and on the sink (shared in the operator
/// process), while the connection that stays keeps relaying. The operator binary, the chart's
/// RBAC. Checked at the brokers: a client with each client id finds no session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_bridge_ends_its_sessions_at_the_brokers() {
    use support::mqtt::session_present;
    let _serial = SERIAL.lock().await;
    let Some(cp) = control_plane::with_crds().await else {
        return;
    };
    let ns = "ended";
    let (source, sink) = (Mosquitto::start_logged(), Mosquitto::start_logged());
    let (_install, op, _admin, api) = bridge_operator(cp, ns).await;
    let collector = Collector::start(sink.tcp_port, "collector-ended", "cluster/#", true).await;
    let mut bridge = mqtt_bridge(ns, "feed", &source, &sink, "cluster/{topic}");
    bridge["spec"]["connections"] = json!(2);
    bridge["spec"]["routes"][0]["shareGroup"] = json!("relay");
    cp.create(&bridge).await.expect("bridge created");
    wait_ready_reason(&api, "feed", ("True", "Connected"), Duration::from_secs(60)).await;
    let (src, snk) = (format!("iotop-{ns}-feed"), format!("iotop-{ns}-feed-sink"));

    api.patch(
        "feed",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"connections": 1}})),
    )
    .await
    .expect("patched");
    for id in [format!("{src}-1"), format!("{snk}-1")] {
        wait_session_ended(&op, &id).await;
    }
    assert!(
        !session_present(source.tcp_port, &format!("{src}-1")).await,
        "{}",
        op.logs()
    );
    assert!(
        !session_present(sink.tcp_port, &format!("{snk}-1")).await,
        "{}",
        op.logs()
    );
    // Connection 0 relays on.
    publish_range(source.tcp_port, "pub-ended", "dev/e", 0..20).await;
    assert!(
        collector
            .wait_for_distinct(20, Duration::from_secs(30))
            .await,
        "{} of 20 relayed by the remaining connection",
        collector.distinct()
    );

    api.delete("feed", &DeleteParams::default())
        .await
        .expect("deleted");
    for id in [src.clone(), snk.clone()] {
        wait_session_ended(&op, &id).await;
    }
    assert!(
        !session_present(source.tcp_port, &src).await,
        "{}",
        op.logs()
    );
    assert!(!session_present(sink.tcp_port, &snk).await, "{}", op.logs());
}

/// The message of an object's `Ready` condition ("" without one).
fn ready_message(obj: &Value) -> String {
    obj["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
        .and_then(|c| c["message"].as_str())
        .unwrap_or_default()
        .to_owned()
}

// ---------------------------------------------------------------------------------------------
// Malformed objects: stored before the schema tightened, they no longer deserialize.

fn crd_file(name: &str) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("crds")
        .join(format!("{name}.yaml"));
    serde_yaml::from_str(&std::fs::read_to_string(path).expect("CRD")).expect("CRD YAML")
}

/// Notes of the Malformed Events about one object.
async fn malformed_notes(client: &Client, ns: &str, name: &str) -> Vec<String> {
    events(client, ns)
        .await
        .into_iter()
        .filter(|e| regarding(e) == Some(name) && e.reason.as_deref() == Some("Malformed"))
        .filter_map(|e| e.note)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_object_is_reported_and_its_deletion_completes_once_corrected() {
    let _serial = SERIAL.lock().await;
    let Some(cp) = control_plane::with_crds().await else {
        return;
    };
    let ns = "malformed";
    cp.namespace(ns).await;
    // Stored under a looser schema: `policy.name` a number, a finalizer already set.
    let real = crd_file("iotpolicybindings.iot.operator.dev");
    let mut loose = real.clone();
    for version in loose["spec"]["versions"].as_array_mut().expect("versions") {
        let schema = &mut version["schema"]["openAPIV3Schema"];
        schema["properties"]["spec"] =
            json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true});
        if let Some(o) = schema.as_object_mut() {
            o.remove("x-kubernetes-validations");
        }
    }
    cp.apply(&loose).await.expect("loose CRD");
    let mut broken = binding_in(
        ns,
        "broken",
        json!({"policy": {"name": 42}, "principals": {"cognitoIdentityIds": [ID]}}),
    );
    broken["metadata"]["finalizers"] = json!(["iot.operator.dev/cleanup"]);
    wait_until("the loose schema serves", Duration::from_secs(30), || {
        let broken = broken.clone();
        async move { cp.create(&broken).await.is_ok() }
    })
    .await;
    cp.apply(&real).await.expect("real CRD again");

    let install = cp
        .install_chart(
            "iot-operator",
            &[
                "leaderElection.leaseName=malformed",
                "watchNamespace=malformed",
            ],
        )
        .await;
    let op = install.spawn("iot-operator-malformed-0", &[]);
    wait_ready(&op, "leader", Duration::from_secs(60)).await;
    let admin = cp.admin().await;
    let api: Api<IotPolicyBinding> = Api::namespaced(admin.clone(), ns);
    // The other objects go on being reconciled (this one is refused by the tenancy rules,
    // which needs no AWS).
    cp.create(&binding_in(
        ns,
        "fine",
        json!({"policy": {"name": "someone-else"}, "principals": {"cognitoIdentityIds": [ID]}}),
    ))
    .await
    .expect("created");
    wait_ready_reason(
        &api,
        "fine",
        ("False", "NotAllowed"),
        Duration::from_secs(30),
    )
    .await;
    wait_until(
        "a Malformed Event naming the field",
        Duration::from_secs(30),
        || {
            let admin = admin.clone();
            async move {
                malformed_notes(&admin, ns, "broken")
                    .await
                    .iter()
                    .any(|n| n.contains("spec.policy.name"))
            }
        },
    )
    .await;

    // Deleting it waits for the finalizer; removing the finalizer alone is refused by the API
    // server (the object fails the current schema), as the Event says.
    // Typed reads of this object fail by design: go through untyped objects.
    let raw: Api<kube::api::DynamicObject> = Api::namespaced_with(
        admin.clone(),
        ns,
        &kube::api::ApiResource::erase::<IotPolicyBinding>(&()),
    );
    raw.delete("broken", &DeleteParams::default())
        .await
        .expect("deletion requested");
    wait_until(
        "the Event about the waiting deletion",
        Duration::from_secs(30),
        || {
            let admin = admin.clone();
            async move {
                malformed_notes(&admin, ns, "broken").await.iter().any(|n| {
                    n.contains("deletion waits") && n.contains("finalizer removal included")
                })
            }
        },
    )
    .await;
    let unfinalize = raw
        .patch(
            "broken",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await;
    assert!(
        matches!(&unfinalize, Err(kube::Error::Api(s)) if s.code == 422),
        "removing only the finalizer: {unfinalize:?}"
    );
    // The fix the message asks for: correct the field; the operator then finishes the deletion.
    raw.patch(
        "broken",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"policy": {"name": "malformed-app"}}})),
    )
    .await
    .expect("corrected");
    wait_until(
        "the corrected object's deletion completes",
        Duration::from_secs(30),
        || {
            let raw = raw.clone();
            async move { raw.get_opt("broken").await.is_ok_and(|o| o.is_none()) }
        },
    )
    .await;
    let logs = op.logs();
    assert!(!logs.contains("panicked"), "{logs}");
    let _ = api.delete("fine", &DeleteParams::default()).await;
}

// ---------------------------------------------------------------------------------------------
// No confused deputy: what the operator sends on a bridge author's behalf.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridge_cannot_send_a_secret_to_a_sink_of_its_choosing() {
    let _serial = SERIAL.lock().await;
    let Some(cp) = control_plane::with_crds().await else {
        return;
    };
    let ns = "exfil";
    let source = Mosquitto::start_logged();
    // The author's own listener, which must never see a connection with the password.
    let listener = Mosquitto::start_logged();
    cp.namespace(ns).await;
    cp.apply(&json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "platform-creds", "namespace": ns},
        "stringData": {"username": "platform", "password": "platform-password-Quokka-3"}}))
        .await
        .expect("secret");
    let mut tb = mqtt_bridge(ns, "steal", &source, &listener, "x/{topic}");
    tb["spec"]["sink"]["credentialsSecret"] = json!({"name": "platform-creds"});
    let admin = cp.admin().await;
    let api: Api<TopicBridge> = Api::namespaced(admin.clone(), ns);

    // The chart's default rules: a sink outside the namespace's Services is refused.
    let install = cp
        .install_chart(
            "iot-operator",
            &["leaderElection.leaseName=exfil", "watchNamespace=exfil"],
        )
        .await;
    let mut op = install.spawn("iot-operator-exfil-0", &[]);
    wait_ready(&op, "leader", Duration::from_secs(60)).await;
    cp.create(&tb).await.expect("created");
    wait_ready_reason(
        &api,
        "steal",
        ("False", "NotAllowed"),
        Duration::from_secs(30),
    )
    .await;
    let status = get_json(&api, "steal").await.expect("bridge");
    assert!(
        status.to_string().contains("spec.sink.url"),
        "{}",
        status["status"]
    );
    assert!(
        event_reasons(&admin, ns, "steal")
            .await
            .contains(&"NotAllowed".to_owned())
    );
    op.kill();
    drop(op);

    // Rules that allow the sink: the Secret itself has not agreed to be used by this bridge.
    let install = cp
        .install_chart(
            "iot-operator",
            &[
                "leaderElection.leaseName=exfil-2",
                "watchNamespace=exfil",
                LOOPBACK_SINKS,
            ],
        )
        .await;
    let op = install.spawn("iot-operator-exfil-1", &[]);
    wait_ready(&op, "leader", Duration::from_secs(60)).await;
    wait_until(
        "NotAllowed naming the Secret",
        Duration::from_secs(30),
        || {
            let api = api.clone();
            async move {
                get_json(&api, "steal").await.is_some_and(|o| {
                    let text = o["status"].to_string();
                    ready_of(&o) == Some(("False".into(), "NotAllowed".into()))
                        && text.contains("platform-creds")
                        && text.contains("iot.operator.dev/topic-bridges")
                })
            }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !listener.log().contains("New client connected"),
        "the listener was contacted:\n{}",
        listener.log()
    );

    // The control: once the Secret names the bridge, the same bridge connects there.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(admin.clone(), ns);
    secrets
        .patch(
            "platform-creds",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {"iot.operator.dev/topic-bridges": "steal"}}}),
            ),
        )
        .await
        .expect("annotated");
    wait_ready_reason(
        &api,
        "steal",
        ("True", "Connected"),
        Duration::from_secs(60),
    )
    .await;
    assert!(listener.log().contains("New client connected"));
    let _ = api.delete("steal", &DeleteParams::default()).await;
}

// ---------------------------------------------------------------------------------------------
// IotPolicyBinding records: the operator killed in the middle of syncs.

/// The operator's container restarted (kill -9, the same pod) at random points of pool syncs,
/// with the spec changed between restarts; then every target is removed and the binding deleted.
/// AWS must end with no pair the binding attached and every pair that was there before it; the
/// binding's record ConfigMaps are gone with it.
/// A pool sync slow enough to watch (60 identities at 4 AWS requests a second): while it runs,
/// `status.progress` and the metric show identities seen, attached and remaining; when it ends,
/// the progress is gone and the binding is Ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_pool_sync_shows_its_progress_and_clears_it() {
    let _serial = SERIAL.lock().await;
    let Some(cp) = control_plane::with_crds().await else {
        return;
    };
    let moto = Moto::start();
    let sdk = support::test_sdk_config(&moto.url());
    let iot = aws_sdk_iot::Client::new(&sdk);
    let cognito = aws_sdk_cognitoidentity::Client::new(&sdk);
    support::create_connect_policy(&iot, "progress-p").await;
    let (pool, _members) = support::identity_pool(&cognito, "progress", 60).await;
    let install = cp
        .install_chart("iot-operator", &["leaderElection.leaseName=progress"])
        .await;
    let mut env = moto_env(&moto);
    env.push(("IOT_OPERATOR_AWS_RATE_LIMIT", "4".into()));
    let op = install.spawn("iot-operator-progress-0", &as_refs(&env));
    wait_ready(&op, "leader", Duration::from_secs(60)).await;
    cp.namespace("progress").await;
    let admin = cp.admin().await;
    let api: Api<IotPolicyBinding> = Api::namespaced(admin.clone(), "progress");
    cp.create(&binding_in(
        "progress",
        "pool",
        json!({"policy": {"name": "progress-p"}, "principals": {"cognitoIdentityPools": [&pool]}}),
    ))
    .await
    .expect("created");
    let started = Instant::now();
    let mut seen_progress = Vec::new();
    let mut metric_remaining = 0.0f64;
    loop {
        let obj = get_json(&api, "pool").await.expect("binding");
        let p = &obj["status"]["progress"];
        if !p.is_null() {
            seen_progress.push((
                p["seen"].as_i64().unwrap_or(-1),
                p["attached"].as_i64().unwrap_or(-1),
                p["remaining"].as_i64().unwrap_or(-1),
            ));
        }
        metric_remaining = metric_remaining
            .max(op.metric("iot_operator_policy_sync_targets", "state=\"remaining\""));
        if ready_of(&obj) == Some(("True".into(), "Attached".into())) {
            assert!(p.is_null(), "progress left behind: {}", obj["status"]);
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "not synced: {}\n{}",
            obj["status"],
            op.logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!(
        "progress: synced after {:.1} s; status.progress seen as {:?}; the metric's remaining peaked at {metric_remaining}",
        started.elapsed().as_secs_f64(),
        seen_progress.iter().collect::<BTreeSet<_>>()
    );
    assert!(!seen_progress.is_empty(), "no progress while the sync ran");
    assert!(
        seen_progress
            .iter()
            .all(|&(seen, attached, remaining)| seen == 60
                && attached + remaining == 60
                && remaining > 0),
        "{seen_progress:?}"
    );
    assert!(metric_remaining > 0.0);
    assert_eq!(
        op.metric("iot_operator_policy_sync_targets", "state=\"attached\""),
        60.0
    );
    assert_eq!(
        op.metric("iot_operator_policy_sync_targets", "state=\"remaining\""),
        0.0
    );
    // Gone before this operator stops (its finalizer detaches), so that no later test's
    // operator, watching every namespace, finds it or its record.
    api.delete("pool", &DeleteParams::default())
        .await
        .expect("deleted");
    wait_until("the binding is gone", Duration::from_secs(120), || {
        let api = api.clone();
        async move { get_json(&api, "pool").await.is_none() }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_killed_mid_sync_leaves_no_pair_behind_and_takes_no_foreign_pair() {
    let _serial = SERIAL.lock().await;
    let Some(cp) = control_plane::with_crds().await else {
        return;
    };
    let moto = Moto::start();
    let sdk = support::test_sdk_config(&moto.url());
    let iot = aws_sdk_iot::Client::new(&sdk);
    let cognito = aws_sdk_cognitoidentity::Client::new(&sdk);
    support::create_connect_policy(&iot, "crash-p").await;
    let (pool, members) = support::identity_pool(&cognito, "crash", 40).await;
    let (_, explicit) = support::identity_pool(&cognito, "explicit", 10).await;
    let foreign: BTreeSet<String> = [&members[5], &members[11], &explicit[1]]
        .into_iter()
        .cloned()
        .collect();
    for t in &foreign {
        iot.attach_policy()
            .policy_name("crash-p")
            .target(t)
            .send()
            .await
            .expect("attached");
    }
    let install = cp
        .install_chart("iot-operator", &["leaderElection.leaseName=crash"])
        .await;
    let mut env = moto_env(&moto);
    // Slow enough that a kill lands in the middle of the attaches.
    env.push(("IOT_OPERATOR_AWS_RATE_LIMIT", "25".into()));
    let pod = "iot-operator-crash-0";
    let mut op = install.spawn(pod, &as_refs(&env));
    wait_ready(&op, "leader", Duration::from_secs(60)).await;
    cp.namespace("crash").await;
    let admin = cp.admin().await;
    let api: Api<IotPolicyBinding> = Api::namespaced(admin.clone(), "crash");
    let variants = [
        json!({"cognitoIdentityIds": &explicit[..4], "cognitoIdentityPools": [&pool]}),
        json!({"cognitoIdentityIds": &explicit[2..9], "cognitoIdentityPools": null}),
        json!({"cognitoIdentityIds": &explicit[4..], "cognitoIdentityPools": [&pool]}),
    ];
    cp.create(&binding_in(
        "crash",
        "pool",
        json!({"policy": {"name": "crash-p"}, "principals": variants[0]}),
    ))
    .await
    .expect("created");
    // Each change moves the pool in or out: dozens of calls for a kill to land among.
    let order = [1, 2, 1, 0, 1, 2, 1, 0];
    let (rounds, mut mid_sync) = (order.len(), 0);
    for next in order {
        // Once this process writes to AWS, kill it a random moment later.
        let writes = |op: &control_plane::Operator| {
            op.metric("iot_operator_aws_api_calls_total", "AttachPolicy")
                + op.metric("iot_operator_aws_api_calls_total", "DetachPolicy")
        };
        let start = Instant::now();
        while writes(&op) == 0.0 && start.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..1200))).await;
        let writes = writes(&op);
        let settled = get_json(&api, "pool").await.is_some_and(|o| {
            o["status"]["observedGeneration"] == o["metadata"]["generation"]
                && ready_of(&o) == Some(("True".into(), "Attached".into()))
        });
        op.kill();
        if writes > 0.0 && !settled {
            mid_sync += 1;
        }
        let next = &variants[next];
        api.patch(
            "pool",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"principals": next}})),
        )
        .await
        .expect("patched");
        // The container restarts in the same pod: the same identity takes the lease at once.
        op = install.spawn(pod, &as_refs(&env));
    }
    // Remove every target but one that no variant used.
    let sentinel = explicit[0].clone();
    let last = api
        .patch(
            "pool",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"principals": {"cognitoIdentityIds": [&sentinel], "cognitoIdentityPools": null}}})),
        )
        .await
        .expect("patched");
    let generation = last.metadata.generation;
    wait_until("the last spec synced", Duration::from_secs(90), || {
        let api = api.clone();
        async move {
            get_json(&api, "pool").await.is_some_and(|o| {
                o["status"]["observedGeneration"].as_i64() == generation
                    && ready_of(&o) == Some(("True".into(), "Attached".into()))
            })
        }
    })
    .await;
    let mut want = foreign.clone();
    want.insert(sentinel.clone());
    let left = targets(&iot, "crash-p").await;
    eprintln!(
        "{rounds} kills, {mid_sync} while a sync was writing; pairs left {} (want {})",
        left.len(),
        want.len()
    );
    support::assert_pairs_left(&left, &want);
    let status = get_json(&api, "pool").await.expect("binding")["status"].clone();
    assert_eq!(status["record"]["targets"], 1, "{status}");
    assert_eq!(status["record"]["foreignTargets"], 0, "{status}");
    assert!(status.get("appliedTargets").is_none(), "{status}");
    assert!(
        mid_sync >= rounds / 2,
        "only {mid_sync} kill(s) landed while a sync was writing: the test proves little"
    );

    // Deleting detaches the sentinel, keeps the foreign pairs, and drops the record.
    let configmaps: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(admin.clone(), "iot-operator");
    let records = ListParams::default().labels("iot.operator.dev/record");
    assert!(
        !configmaps
            .list(&records)
            .await
            .expect("listed")
            .items
            .is_empty(),
        "the binding's record is kept in the operator's namespace"
    );
    api.delete("pool", &DeleteParams::default())
        .await
        .expect("deleted");
    wait_until("the binding is gone", Duration::from_secs(60), || {
        let api = api.clone();
        async move { get_json(&api, "pool").await.is_none() }
    })
    .await;
    assert_eq!(targets(&iot, "crash-p").await, foreign);
    assert!(
        configmaps
            .list(&records)
            .await
            .expect("listed")
            .items
            .is_empty(),
        "the record went with the binding"
    );
    let logs = op.logs();
    assert!(!logs.contains("panicked"), "{logs}");
    assert!(
        !logs.to_lowercase().contains("forbidden"),
        "a call the chart's RBAC forbids:\n{logs}"
    );
    op.kill();
}

/// A record too large for one ConfigMap (100,000 found targets, as a pool migration leaves)
/// written to and read from the real API server: split into parts under the ConfigMap limit,
/// read back whole by a replica with nothing cached, replaced by a new generation whose old parts
/// are deleted, and removed without a trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_of_100000_targets_is_kept_in_parts_and_replaced_whole() {
    use iot_operator::controller::ledger::{Ledger, RECORD_LABEL, RecordKey};
    use iot_operator::policy::Memory;
    let _serial = SERIAL.lock().await;
    let Some(cp) = control_plane::with_crds().await else {
        return;
    };
    cp.namespace("records").await;
    let admin = cp.admin().await;
    let key = RecordKey {
        uid: "0b6f1c3e-2f4a-4c55-9a51-2f0c2d1d7e11".into(),
        namespace: "team-a".into(),
        name: "users".into(),
    };
    let foreign: BTreeSet<String> = (0..100_000)
        .map(|i| format!("eu-west-1:{i:08x}-0000-4000-8000-{:012x}", i * 7))
        .collect();
    let memory = Memory {
        targets: BTreeSet::from([ID.to_owned()]),
        pools: BTreeSet::from(["eu-west-1:11111111-2222-4333-8444-555555555555".to_owned()]),
        foreign,
    };
    let ledger = Ledger::new(admin.clone(), "records");
    let start = Instant::now();
    let written = ledger.store(&key, &memory).await.expect("stored");
    let stored_in = start.elapsed();
    let configmaps: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(admin.clone(), "records");
    let params = ListParams::default().labels(&format!("{RECORD_LABEL}={}", key.uid));
    let count = || async {
        configmaps
            .list_metadata(&params)
            .await
            .expect("listed")
            .items
            .len()
    };
    assert!(written.objects > 1, "{written:?}");
    assert!(written.largest_bytes < 1024 * 1024, "{written:?}");
    assert_eq!(count().await, written.objects);

    // Another replica, nothing cached.
    let start = Instant::now();
    let read = Ledger::new(admin.clone(), "records")
        .load(&key)
        .await
        .expect("loaded")
        .expect("a record");
    let read_in = start.elapsed();
    assert!(read == memory, "the record read back differs");

    // A new generation: the old parts go.
    let mut smaller = memory.clone();
    let dropped: Vec<String> = smaller.foreign.iter().take(30_000).cloned().collect();
    for t in &dropped {
        smaller.foreign.remove(t);
    }
    let second = ledger.store(&key, &smaller).await.expect("replaced");
    assert_eq!(count().await, second.objects, "old parts deleted");
    let read = Ledger::new(admin.clone(), "records")
        .load(&key)
        .await
        .expect("loaded")
        .expect("a record");
    assert!(read == smaller, "the replaced record read back differs");

    // A writer that read the head before the replacement is refused: no lost update.
    let stale = Ledger::new(admin.clone(), "records");
    stale.load(&key).await.expect("loaded");
    ledger.store(&key, &memory).await.expect("replaced again");
    let refused = stale.store(&key, &smaller).await;
    assert!(
        matches!(&refused, Err(kube::Error::Api(s)) if s.code == 409),
        "{refused:?}"
    );
    let read = Ledger::new(admin.clone(), "records")
        .load(&key)
        .await
        .expect("loaded")
        .expect("a record");
    assert!(read == memory, "the refused writer changed the record");
    assert_eq!(
        count().await,
        written.objects,
        "the refused writer's parts are gone"
    );

    ledger.remove(&key).await.expect("removed");
    assert_eq!(count().await, 0);
    assert!(
        Ledger::new(admin, "records")
            .load(&key)
            .await
            .expect("loaded")
            .is_none()
    );
    eprintln!(
        "record of 100,000 found targets: {} ConfigMaps, largest {} KiB; written in {:.2} s, read by a fresh replica in {:.2} s",
        written.objects,
        written.largest_bytes / 1024,
        stored_in.as_secs_f64(),
        read_in.as_secs_f64()
    );
}

/// `controllers: [bridge]` and `controllers: [policy]`, each with the chart's RBAC for that one
/// controller only: each runs its own kind, leaves the other kind alone, and never hits a call
/// its RBAC forbids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_controller_per_install_runs_with_only_its_own_rights() {
    let _serial = SERIAL.lock().await;
    let Some(cp) = control_plane::with_crds().await else {
        return;
    };
    let moto = Moto::start();
    let iot = aws_sdk_iot::Client::new(&support::test_sdk_config(&moto.url()));
    let cognito = aws_sdk_cognitoidentity::Client::new(&support::test_sdk_config(&moto.url()));
    let ids = support::cognito_identities(&cognito, 2).await;
    support::create_connect_policy(&iot, "cb-p").await;
    support::create_connect_policy(&iot, "cp-p").await;
    let (source, sink) = (Mosquitto::start_logged(), Mosquitto::start_logged());
    let env = moto_env(&moto);
    let admin = cp.admin().await;

    // Bridges only.
    let bridges = cp
        .install_chart(
            "ops-b",
            &[
                "controllers={bridge}",
                "leaderElection.leaseName=only-bridge",
                "watchNamespace=cb",
                LOOPBACK_SINKS,
            ],
        )
        .await;
    let op_b = bridges.spawn("iot-operator-only-bridge", &as_refs(&env));
    wait_ready(&op_b, "leader", Duration::from_secs(60)).await;
    // Policies only.
    let policies = cp
        .install_chart(
            "ops-p",
            &[
                "controllers={policy}",
                "leaderElection.leaseName=only-policy",
                "watchNamespace=cp",
            ],
        )
        .await;
    let op_p = policies.spawn("iot-operator-only-policy", &as_refs(&env));
    wait_ready(&op_p, "leader", Duration::from_secs(60)).await;
    cp.namespace("cb").await;
    cp.namespace("cp").await;

    // In each namespace a bridge and a binding; only the kind the install runs is handled.
    let collector = Collector::start(sink.tcp_port, "collector-only", "cluster/#", false).await;
    for ns in ["cb", "cp"] {
        cp.create(&mqtt_bridge(ns, "feed", &source, &sink, "cluster/{topic}"))
            .await
            .expect("bridge created");
        cp.create(&binding_in(
            ns,
            "app",
            json!({"policy": {"name": format!("{ns}-p")}, "principals": {"cognitoIdentityIds": [ids[0]]}}),
        ))
        .await
        .expect("binding created");
    }
    let cb_bridges: Api<TopicBridge> = Api::namespaced(admin.clone(), "cb");
    wait_ready_reason(
        &cb_bridges,
        "feed",
        ("True", "Connected"),
        Duration::from_secs(30),
    )
    .await;
    publish_numbered(&source, "pub-only", "dev/x", 0..50).await;
    assert!(
        collector
            .wait_for_distinct(50, Duration::from_secs(30))
            .await,
        "relayed {} of 50",
        collector.distinct()
    );
    let cp_bindings: Api<IotPolicyBinding> = Api::namespaced(admin.clone(), "cp");
    wait_ready_reason(
        &cp_bindings,
        "app",
        ("True", "Attached"),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        targets(&iot, "cp-p").await,
        BTreeSet::from([ids[0].clone()])
    );

    // The kinds nobody runs stay untouched: no finalizer, no status, nothing in AWS, no
    // connection.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cb_binding = get_json(
        &Api::<IotPolicyBinding>::namespaced(admin.clone(), "cb"),
        "app",
    )
    .await
    .expect("binding");
    assert!(
        cb_binding["metadata"]["finalizers"].is_null() && cb_binding["status"].is_null(),
        "the bridge-only operator touched a binding: {cb_binding}"
    );
    assert!(targets(&iot, "cb-p").await.is_empty());
    let cp_bridge = get_json(&Api::<TopicBridge>::namespaced(admin.clone(), "cp"), "feed")
        .await
        .expect("bridge");
    assert!(
        cp_bridge["status"].is_null(),
        "the policy-only operator touched a bridge: {cp_bridge}"
    );
    assert!(
        !source.log().contains("iotop-cp-feed"),
        "the policy-only operator connected a bridge"
    );
    for op in [&op_b, &op_p] {
        let logs = op.logs();
        assert!(!logs.contains("panicked"), "{logs}");
        assert!(
            !logs.to_lowercase().contains("forbidden"),
            "a call the chart's RBAC for one controller forbids:\n{logs}"
        );
    }
    for ns in ["cb", "cp"] {
        let b: Api<TopicBridge> = Api::namespaced(admin.clone(), ns);
        let _ = b.delete("feed", &DeleteParams::default()).await;
    }
    let _ = Api::<IotPolicyBinding>::namespaced(admin.clone(), "cb")
        .delete("app", &DeleteParams::default())
        .await;
    cp_bindings
        .delete("app", &DeleteParams::default())
        .await
        .expect("deleted");
    wait_until(
        "the binding is detached and gone",
        Duration::from_secs(30),
        || {
            let api = cp_bindings.clone();
            async move { get_json(&api, "app").await.is_none() }
        },
    )
    .await;
    assert!(targets(&iot, "cp-p").await.is_empty());
}

/// `deletionPolicy: DeletePolicy`: a managed policy goes with its last binding, not before
/// (an Event names the binding that still uses it), and never while a target the bindings did
/// not attach still has it (an Event names the target).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_managed_policy_goes_with_its_last_binding_unless_still_used() {
    let _serial = SERIAL.lock().await;
    let Some(cp) = control_plane::with_crds().await else {
        return;
    };
    let moto = Moto::start();
    let iot = aws_sdk_iot::Client::new(&support::test_sdk_config(&moto.url()));
    let cognito = aws_sdk_cognitoidentity::Client::new(&support::test_sdk_config(&moto.url()));
    let ids = support::cognito_identities(&cognito, 2).await;
    let install = cp
        .install_chart(
            "iot-operator",
            &[
                "leaderElection.leaseName=dp",
                r#"tenancy.rules=[{"namespaces":["*"],"bindPolicies":["{namespace}-*"],"managePolicies":["{namespace}-*"],"roles":[],"endpoints":[],"operatorCredentials":false}]"#,
            ],
        )
        .await;
    let op = install.spawn("iot-operator-dp-0", &as_refs(&moto_env(&moto)));
    wait_ready(&op, "leader", Duration::from_secs(60)).await;
    cp.namespace("dp").await;
    let admin = cp.admin().await;
    let api: Api<IotPolicyBinding> = Api::namespaced(admin.clone(), "dp");
    let doc = json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"}]});
    let managed = |policy: &str, id: &str| json!({"policy": {"name": policy, "document": doc}, "principals": {"cognitoIdentityIds": [id]}, "deletionPolicy": "DeletePolicy"});
    for (name, policy, id) in [
        ("a", "dp-gone", &ids[0]),
        ("b", "dp-gone", &ids[1]),
        ("c", "dp-kept", &ids[0]),
    ] {
        cp.create(&binding_in("dp", name, managed(policy, id)))
            .await
            .expect("created");
        wait_ready_reason(&api, name, ("True", "Attached"), Duration::from_secs(30)).await;
    }
    let exists = |policy: &'static str| {
        let iot = iot.clone();
        async move { iot.get_policy().policy_name(policy).send().await.is_ok() }
    };
    let gone = |name: &'static str| {
        let api = api.clone();
        async move { get_json(&api, name).await.is_none() }
    };

    // Not the last binding: the policy stays, and the Event says who still uses it.
    api.delete("a", &DeleteParams::default())
        .await
        .expect("deleted");
    wait_until("a is gone", Duration::from_secs(30), || gone("a")).await;
    assert!(exists("dp-gone").await);
    assert_eq!(
        targets(&iot, "dp-gone").await,
        BTreeSet::from([ids[1].clone()])
    );
    let kept: Vec<String> = events(&admin, "dp")
        .await
        .into_iter()
        .filter(|e| regarding(e) == Some("a") && e.reason.as_deref() == Some("PolicyKept"))
        .filter_map(|e| e.note)
        .collect();
    assert!(
        kept.iter().any(|n| n.contains("IotPolicyBinding dp/b")),
        "{kept:?}"
    );

    // The last one: detached, then deleted.
    api.delete("b", &DeleteParams::default())
        .await
        .expect("deleted");
    wait_until("b is gone", Duration::from_secs(60), || gone("b")).await;
    assert!(
        !exists("dp-gone").await,
        "the policy outlived its last binding"
    );
    assert!(
        event_reasons(&admin, "dp", "b")
            .await
            .contains(&"PolicyDeleted".to_owned())
    );

    // A certificate someone else attached keeps the policy; the Event names it.
    let cert = iot
        .create_keys_and_certificate()
        .set_as_active(true)
        .send()
        .await
        .expect("cert")
        .certificate_arn()
        .expect("arn")
        .to_owned();
    iot.attach_policy()
        .policy_name("dp-kept")
        .target(&cert)
        .send()
        .await
        .expect("attached");
    api.delete("c", &DeleteParams::default())
        .await
        .expect("deleted");
    wait_until("c is gone", Duration::from_secs(30), || gone("c")).await;
    assert!(exists("dp-kept").await);
    assert_eq!(
        targets(&iot, "dp-kept").await,
        BTreeSet::from([cert.clone()])
    );
    let kept: Vec<String> = events(&admin, "dp")
        .await
        .into_iter()
        .filter(|e| regarding(e) == Some("c") && e.reason.as_deref() == Some("PolicyKept"))
        .filter_map(|e| e.note)
        .collect();
    assert!(kept.iter().any(|n| n.contains(&cert)), "{kept:?}");
    let logs = op.logs();
    assert!(!logs.contains("panicked"), "{logs}");
    assert!(
        !logs.to_lowercase().contains("forbidden"),
        "a call the chart's RBAC forbids:\n{logs}"
    );
}

/// Setup step 3 on the real control plane: a binding with an identity pool whose guest role
/// may only connect gets `RoleAllowsIot=False` naming the role and the missing actions, and a
/// Warning Event; once the role is fixed in IAM, the next resync sets it `True`. moto serves IAM
/// and Cognito; a stand-in answers GetIdentityPoolRoles, which moto lacks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_whose_role_cannot_use_iot_is_reported_until_fixed() {
    let _serial = SERIAL.lock().await;
    let Some(cp) = control_plane::with_crds().await else {
        return;
    };
    let moto = Moto::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let roles_file = dir.path().join("roles.json");
    std::fs::write(&roles_file, "{}").unwrap();
    let (_stub, port) = support::start_python(
        "cognito_roles_stub.py",
        &[&moto.url(), roles_file.to_str().unwrap()],
    );
    let aws_url = format!("http://127.0.0.1:{port}");
    let config = support::test_sdk_config(&aws_url);
    let (iot, iam) = (
        aws_sdk_iot::Client::new(&config),
        aws_sdk_iam::Client::new(&config),
    );
    let cognito = aws_sdk_cognitoidentity::Client::new(&config);
    support::create_connect_policy(&iot, "rc-p").await;
    let (pool, ids) = support::identity_pool(&cognito, "rc", 2).await;
    let mut arns = Vec::new();
    for role in ["rc_auth", "rc_guest"] {
        arns.push(support::iam_role(&iam, role).await);
        iam.put_role_policy()
            .role_name(role)
            .policy_name("connect")
            .policy_document(r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"iot:Connect","Resource":"*"}]}"#)
            .send()
            .await
            .expect("inline");
    }
    let all_iot = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":["iot:Connect","iot:Publish","iot:Subscribe","iot:Receive"],"Resource":"*"}]}"#;
    iam.put_role_policy()
        .role_name("rc_auth")
        .policy_name("pubsub")
        .policy_document(all_iot)
        .send()
        .await
        .expect("inline");
    std::fs::write(
        &roles_file,
        json!({&pool: {"authenticated": arns[0], "unauthenticated": arns[1]}}).to_string(),
    )
    .unwrap();

    let install = cp
        .install_chart(
            "iot-operator",
            &[
                "leaderElection.leaseName=rc",
                "resyncSeconds=10",
                "roleCheckSeconds=45",
            ],
        )
        .await;
    let env = vec![
        ("IOT_OPERATOR_AWS_ENDPOINT_URL", aws_url.clone()),
        ("AWS_REGION", "eu-west-1".into()),
        ("AWS_ACCESS_KEY_ID", "testing".into()),
        ("AWS_SECRET_ACCESS_KEY", "testing-secret".into()),
    ];
    let op = install.spawn("iot-operator-rc-0", &as_refs(&env));
    wait_ready(&op, "leader", Duration::from_secs(60)).await;
    cp.namespace("rc").await;
    let admin = cp.admin().await;
    let api: Api<IotPolicyBinding> = Api::namespaced(admin.clone(), "rc");
    cp.create(&binding_in(
        "rc",
        "pool",
        json!({"policy": {"name": "rc-p"}, "principals": {"cognitoIdentityPools": [&pool]}}),
    ))
    .await
    .expect("created");
    let role_condition = |api: Api<IotPolicyBinding>| async move {
        get_json(&api, "pool").await.and_then(|o| {
            o["status"]["conditions"]
                .as_array()
                .and_then(|cs| cs.iter().find(|c| c["type"] == "RoleAllowsIot").cloned())
        })
    };
    wait_until("RoleAllowsIot=False", Duration::from_secs(30), || {
        let api = api.clone();
        async move {
            role_condition(api)
                .await
                .is_some_and(|c| c["status"] == "False")
        }
    })
    .await;
    let c = role_condition(api.clone()).await.expect("condition");
    let message = c["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("rc_guest may not use iot:Publish, iot:Subscribe, iot:Receive")
            && !message.contains("rc_auth may not"),
        "{message}"
    );
    // The binding itself still works: the pool's identities have the policy.
    wait_ready_reason(&api, "pool", ("True", "Attached"), Duration::from_secs(30)).await;
    assert_eq!(
        targets(&iot, "rc-p").await,
        ids.iter().cloned().collect::<BTreeSet<_>>()
    );
    assert!(
        event_reasons(&admin, "rc", "pool")
            .await
            .contains(&"RoleLacksIot".to_owned())
    );

    // Resyncs every 10 s list the pool again but leave the roles alone until their check period
    // (45 s) has passed: two resyncs, no Cognito role or IAM call.
    let calls = |op: &Operator, operation: &str| {
        op.metric(
            "iot_operator_aws_api_calls_total",
            &format!("operation=\"{operation}\""),
        )
    };
    let checked = (
        calls(&op, "GetIdentityPoolRoles"),
        calls(&op, "ListRolePolicies"),
        calls(&op, "ListIdentities"),
    );
    tokio::time::sleep(Duration::from_secs(22)).await;
    let steady = (
        calls(&op, "GetIdentityPoolRoles") - checked.0,
        calls(&op, "ListRolePolicies") - checked.1,
        calls(&op, "ListIdentities") - checked.2,
    );
    println!(
        "role check: in 22 s of resyncs every 10 s, GetIdentityPoolRoles {}, ListRolePolicies {}, ListIdentities {} (after {} GetIdentityPoolRoles before)",
        steady.0, steady.1, steady.2, checked.0
    );
    assert!(checked.0 >= 1.0, "the roles were checked: {checked:?}");
    assert!(
        steady.2 >= 2.0,
        "the pool was listed on each resync: {steady:?}"
    );
    assert_eq!(
        (steady.0, steady.1),
        (0.0, 0.0),
        "a steady resync read the roles again"
    );

    // Fixed in IAM: the next check, within 45 s, says so.
    iam.put_role_policy()
        .role_name("rc_guest")
        .policy_name("pubsub")
        .policy_document(all_iot)
        .send()
        .await
        .expect("inline");
    wait_until("RoleAllowsIot=True", Duration::from_secs(75), || {
        let api = api.clone();
        async move {
            role_condition(api)
                .await
                .is_some_and(|c| c["status"] == "True")
        }
    })
    .await;
    api.delete("pool", &DeleteParams::default())
        .await
        .expect("deleted");
    wait_until("the binding is gone", Duration::from_secs(30), || {
        let api = api.clone();
        async move { get_json(&api, "pool").await.is_none() }
    })
    .await;
    let logs = op.logs();
    assert!(!logs.contains("panicked"), "{logs}");
    assert!(!logs.to_lowercase().contains("forbidden"), "{logs}");
}

// ---------------------------------------------------------------------------------------------
// The data plane outlives the control plane: relays keep running through API-server outages
// (static stability), the brokers fence a replica that is cut off, and status catches up.

/// A QoS 1 stream `dev/s/<i>` at about 200 messages a second until `stop`; returns how many were
/// sent (each acknowledged by the source broker).
fn stream_until(
    port: u16,
    client: &str,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<usize> {
    let client = client.to_owned();
    tokio::spawn(async move {
        let mut i = 0;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            publish_range(port, &client, "dev/s", i..i + 20).await;
            i += 20;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        i
    })
}

impl Pair {
    /// Distinct stream messages at the sink, and all of them (duplicates included).
    fn arrived(&self) -> (usize, usize) {
        let all: Vec<String> = self
            .collector
            .snapshot()
            .into_iter()
            .map(|m| m.topic)
            .filter(|t| t.starts_with("cluster/dev/s/"))
            .collect();
        let distinct = all.iter().collect::<BTreeSet<_>>().len();
        (distinct, all.len())
    }

    /// (source, sink) connections the brokers accepted for the bridge's client ids.
    fn connections(&self) -> (usize, usize) {
        (
            self.source.connections(&self.source_client()),
            self.sink.connections(&self.sink_client()),
        )
    }

    /// (source, sink) takeovers of the bridge's client ids.
    fn takeovers(&self) -> (usize, usize) {
        (
            self.source.takeovers(&self.source_client()),
            self.sink.takeovers(&self.sink_client()),
        )
    }
}

/// `status.messagesRelayed` of a bridge.
async fn status_relayed(api: &Api<TopicBridge>, name: &str) -> i64 {
    api.get(name)
        .await
        .ok()
        .and_then(|tb| tb.status)
        .map_or(-1, |s| s.messages_relayed)
}

/// The notes of the Events about one object with `reason`.
async fn event_notes(client: &Client, ns: &str, name: &str, reason: &str) -> Vec<String> {
    events(client, ns)
        .await
        .into_iter()
        .filter(|e| regarding(e) == Some(name) && e.reason.as_deref() == Some(reason))
        .filter_map(|e| e.note)
        .collect()
}

/// Whether process `pid` exists (and is not a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
    })
}

fn lease_of(l: &k8s_openapi::api::coordination::v1::Lease) -> (String, i32) {
    let s = l.spec.clone().unwrap_or_default();
    (
        s.holder_identity.unwrap_or_default(),
        s.lease_transitions.unwrap_or_default(),
    )
}

/// The kube-apiserver frozen (SIGSTOP) for a minute, then etcd for a minute, under a QoS 1
/// stream, with the chart's settings (two replicas, 15 s lease). Both replicas lose the API
/// server; the leader's lease lapses. The bridge relays every second of both outages, no
/// connection is made again (0 relay restarts, 0 takeovers), the same term carries on, status
/// counts every message relayed during the outages within one status interval of recovery, and
/// a Warning Event says how long the control plane was unreachable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_and_etcd_frozen_a_minute_each_the_bridge_relays_throughout_and_nothing_restarts()
{
    let _serial = SERIAL.lock().await;
    // A control plane of its own: a pre-release kube-apiserver (v1.24.0-alpha.1) was seen to
    // exit during the etcd freeze in 2 of 5 runs on the shared one, after the other tests' load;
    // the tests that came after it then all failed.
    let Some(cp) = control_plane::private_with_crds().await else {
        return;
    };
    let pair = Pair::start(cp, "sst-freeze", &["replicaCount=2"]).await;
    let a = pair.install.spawn("iot-operator-sst-freeze-a", &[]);
    wait_ready(&a, "leader", Duration::from_secs(60)).await;
    let b = pair.install.spawn("iot-operator-sst-freeze-b", &[]);
    wait_ready(&b, "standby", Duration::from_secs(60)).await;
    pair.create_bridge(cp).await;
    let admin = cp.admin().await;
    let api: Api<TopicBridge> = Api::namespaced(admin.clone(), &pair.ns);
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(admin.clone(), "iot-operator");
    let lease_before = lease_of(&leases.get(&pair.ns).await.expect("lease"));
    assert_eq!(lease_before.0, a.pod);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stream = stream_until(pair.source.tcp_port, "stream-sst-freeze", stop.clone());
    tokio::time::sleep(Duration::from_secs(5)).await;
    let connections_before = pair.connections();
    let relayed_metric = || a.metric("iot_operator_bridge_messages_relayed_total", "");
    let mut figures = Vec::new();
    for (what, pid) in [("kube-apiserver", cp.apiserver_pid), ("etcd", cp.etcd_pid)] {
        let (d0, _) = pair.arrived();
        signal_pid(pid, "STOP");
        let frozen = Instant::now();
        // The leader's lease lapses after 12 s (15 s lease, 3 s margin); it keeps relaying.
        let mut lapsed_seen = false;
        while frozen.elapsed() < Duration::from_secs(60) {
            tokio::time::sleep(Duration::from_secs(1)).await;
            lapsed_seen |= a.metric("iot_operator_lease_lapsed", "") == 1.0;
        }
        let (d1, _) = pair.arrived();
        let rate = (d1 - d0) as f64 / frozen.elapsed().as_secs_f64();
        signal_pid(pid, "CONT");
        let healed = Instant::now();
        let at_heal = relayed_metric() as i64;
        // Until status counts every message relayed by then (30 s at most: figures first).
        let mut caught_up = None;
        while healed.elapsed() < Duration::from_secs(30) {
            if status_relayed(&api, Pair::CLIENT).await >= at_heal {
                caught_up = Some(healed.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        eprintln!(
            "static stability: {what} frozen 60 s: {rate:.0} msg/s delivered during it \
             ({} messages); the lease lapsed: {lapsed_seen}; status counted them {} after it \
             answered again (relay's count {at_heal}, status {})",
            d1 - d0,
            caught_up.map_or("not within 30 s".to_owned(), |t| format!(
                "{:.1} s",
                t.as_secs_f64()
            )),
            status_relayed(&api, Pair::CLIENT).await
        );
        figures.push((what, rate, caught_up, lapsed_seen));
        // Let the lease settle before the next outage.
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let sent = stream.await.expect("stream");
    let lost = pair.lost(sent, Duration::from_secs(60)).await;
    let (distinct, all) = pair.arrived();
    let connections_after = pair.connections();
    let restarts = (
        connections_after.0 - connections_before.0,
        connections_after.1 - connections_before.1,
    );
    let takeovers = pair.takeovers();
    // One CI run found the API server not answering here, for good (every later test failed
    // too): tell what the control plane logged.
    let lease_after = match leases.get(&pair.ns).await {
        Ok(l) => lease_of(&l),
        Err(e) => panic!(
            "the lease after both outages: {e}\n--- kube-apiserver (alive: {}); its fatal lines ---\n{}\n--- its last lines ---\n{}\n--- etcd (alive: {}) ---\n{}",
            alive(cp.apiserver_pid),
            std::fs::read_to_string(cp.dir.join("kube-apiserver.log"))
                .unwrap_or_default()
                .lines()
                .filter(|l| l.starts_with('F') || l.contains("panic") || l.contains("fatal error"))
                .take(20)
                .collect::<Vec<_>>()
                .join("\n"),
            cp.log_tail("kube-apiserver.log"),
            alive(cp.etcd_pid),
            cp.log_tail("etcd.log"),
        ),
    };
    // Exact: once the stream has ended and status has been written, status and the relay's own
    // count agree.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let (in_status, in_metric) = (
        status_relayed(&api, Pair::CLIENT).await,
        relayed_metric() as i64,
    );
    let unreachable = event_notes(&admin, &pair.ns, Pair::CLIENT, "ControlPlaneUnreachable").await;
    eprintln!(
        "static stability (freeze): {lost} of {sent} QoS 1 lost, {} duplicates; relay restarts \
         (new connections) source {} sink {}; takeovers source {} sink {}; lease holder {} -> {}, \
         transitions {} -> {}; status.messagesRelayed {in_status}, relay's count {in_metric}; \
         ControlPlaneUnreachable Events: {unreachable:?}",
        all - distinct,
        restarts.0,
        restarts.1,
        takeovers.0,
        takeovers.1,
        lease_before.0,
        lease_after.0,
        lease_before.1,
        lease_after.1
    );
    assert_eq!(lost, 0);
    for (what, rate, caught_up, lapsed) in &figures {
        assert!(
            *lapsed,
            "{what}: the lease never lapsed: the outage proved nothing"
        );
        assert!(*rate > 50.0, "{what}: {rate:.0} msg/s during the outage");
        // One status interval (5 s) after the lease is renewed (within a renewal period, 2 s,
        // plus an attempt's deadline, 5 s).
        assert!(
            caught_up.is_some_and(|t| t <= Duration::from_secs(12)),
            "{what}: status caught up after {caught_up:?}"
        );
    }
    assert_eq!(restarts, (0, 0), "the relay reconnected");
    assert_eq!(takeovers, (0, 0));
    assert_eq!(lease_after, lease_before, "the same holder, no transition");
    assert_eq!(in_status, in_metric, "status counts every relayed message");
    assert!(in_metric as usize >= sent);
    assert!(
        unreachable
            .iter()
            .any(|n| n.contains("could not be written for")),
        "no ControlPlaneUnreachable Event: {unreachable:?}"
    );
    assert!(
        b.http_get("/readyz")
            .is_some_and(|(_, body)| body.contains("standby"))
    );
    pair.finish(cp).await;
}

/// A black-holing proxy between one replica and the API server (tests/support/blackhole_proxy.py):
/// `partition` and `heal` signal it.
struct Partition {
    proc: support::Proc,
    port: u16,
}

impl Partition {
    fn start(cp: &ControlPlane) -> Partition {
        let upstream = cp.url.rsplit(':').next().expect("port").to_owned();
        let (proc, port) = support::start_python("blackhole_proxy.py", &[&upstream]);
        Partition {
            proc,
            port: port.parse().expect("proxy port"),
        }
    }

    /// A kubeconfig of the install's ServiceAccount that reaches the API server through here.
    fn kubeconfig(&self, cp: &ControlPlane, install: &Install, name: &str) -> std::path::PathBuf {
        cp.write_kubeconfig_at(
            name,
            &install.token,
            &format!("https://127.0.0.1:{}", self.port),
        )
    }

    fn partition(&self) {
        signal_pid(self.proc.pid(), "USR1");
    }

    fn heal(&self) {
        signal_pid(self.proc.pid(), "USR2");
    }
}

/// Only the leader is cut off from the API server (its packets black-holed: no reset), under a
/// QoS 1 stream, with a binding whose attachment drifts meanwhile. The standby takes the lease
/// after the lease duration and connects: each broker takes each client id over once. The old
/// leader never connects again, writes nothing to AWS (its resyncs run and are refused), and
/// stops its relay once it sees the new holder. 0 QoS 1 lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_leader_is_fenced_by_the_brokers_writes_nothing_and_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let Some(cp) = control_plane::with_crds().await else {
        return;
    };
    let moto = Moto::start();
    let iot = aws_sdk_iot::Client::new(&support::test_sdk_config(&moto.url()));
    let cognito = aws_sdk_cognitoidentity::Client::new(&support::test_sdk_config(&moto.url()));
    let ids = support::cognito_identities(&cognito, 1).await;
    support::create_connect_policy(&iot, "sst-part-app").await;
    let pair = Pair::start(cp, "sst-part", &["replicaCount=2"]).await;
    let proxy = Partition::start(cp);
    let kubeconfig = proxy.kubeconfig(cp, &pair.install, "sst-part-a-proxied");
    let mut env = moto_env(&moto);
    env.push(("IOT_OPERATOR_RESYNC_SECONDS", "10".into()));
    env.push(("KUBECONFIG", kubeconfig.display().to_string()));
    let a = pair
        .install
        .spawn("iot-operator-sst-part-a", &as_refs(&env));
    wait_ready(&a, "leader", Duration::from_secs(60)).await;
    env.pop();
    let b = pair
        .install
        .spawn("iot-operator-sst-part-b", &as_refs(&env));
    wait_ready(&b, "standby", Duration::from_secs(60)).await;
    pair.create_bridge(cp).await;
    let admin = cp.admin().await;
    let bindings: Api<IotPolicyBinding> = Api::namespaced(admin.clone(), &pair.ns);
    cp.create(&binding_in(
        &pair.ns,
        "app",
        json!({"policy": {"name": "sst-part-app"}, "principals": {"cognitoIdentityIds": [ids[0]]}}),
    ))
    .await
    .expect("binding created");
    wait_ready_reason(
        &bindings,
        "app",
        ("True", "Attached"),
        Duration::from_secs(30),
    )
    .await;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stream = stream_until(pair.source.tcp_port, "stream-sst-part", stop.clone());
    tokio::time::sleep(Duration::from_secs(5)).await;
    let connections_before = pair.connections();
    let attach = "operation=\"AttachPolicy\"";
    let a_attach_before = a.metric("iot_operator_aws_api_calls_total", attach);
    let a_reconciles_before = a.metric("iot_operator_reconciliations_total", "policy");

    proxy.partition();
    let cut = Instant::now();
    let (d0, _) = pair.arrived();
    // Drift once the cut-off leader's lease has lapsed (it may still write to AWS before that):
    // only a replica with a valid lease may repair it.
    wait_until(
        "the cut-off leader's lease lapsed",
        Duration::from_secs(30),
        || {
            let lapsed = a.metric("iot_operator_lease_lapsed", "") == 1.0;
            async move { lapsed }
        },
    )
    .await;
    let lapsed_after = cut.elapsed();
    iot.detach_policy()
        .policy_name("sst-part-app")
        .target(&ids[0])
        .send()
        .await
        .expect("detach in moto");
    wait_ready(&b, "leader", Duration::from_secs(60)).await;
    let takeover = cut.elapsed();
    wait_until(
        "the new leader's relay connected",
        Duration::from_secs(30),
        || {
            let connected = b.metric("iot_operator_bridge_connected", "") >= 2.0;
            async move { connected }
        },
    )
    .await;
    wait_until(
        "the new leader repaired the drift",
        Duration::from_secs(60),
        || {
            let iot = iot.clone();
            let id = ids[0].clone();
            async move { targets(&iot, "sst-part-app").await.contains(&id) }
        },
    )
    .await;
    // The partition goes on: the old leader's resyncs come due, and its relay, taken over,
    // would reconnect if anything let it.
    while cut.elapsed() < Duration::from_secs(50) {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (d1, _) = pair.arrived();
    let rate = (d1 - d0) as f64 / cut.elapsed().as_secs_f64();
    let during = pair.takeovers();
    let a_attach = a.metric("iot_operator_aws_api_calls_total", attach) - a_attach_before;
    let a_reconciles =
        a.metric("iot_operator_reconciliations_total", "policy") - a_reconciles_before;
    let a_lapsed = a.metric("iot_operator_lease_lapsed", "");
    proxy.heal();
    let healed = Instant::now();
    wait_until(
        "the old leader sees the new one",
        Duration::from_secs(30),
        || {
            let standby = a.metric("iot_operator_leader", "") == 0.0
                && a.metric("iot_operator_lease_lapsed", "") == 0.0;
            async move { standby }
        },
    )
    .await;
    let stepped_down = healed.elapsed();
    tokio::time::sleep(Duration::from_secs(10)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let sent = stream.await.expect("stream");
    let lost = pair.lost(sent, Duration::from_secs(60)).await;
    let (distinct, all) = pair.arrived();
    let takeovers = pair.takeovers();
    let connections = pair.connections();
    eprintln!(
        "partition of the leader: its lease lapsed {:.1} s and the standby led {:.1} s after the \
         cut; {rate:.0} msg/s \
         delivered during the 50 s partition; takeovers source {} sink {} (during the partition \
         {during:?}); new connections source {} sink {} (the new leader's); the old leader: \
         lapsed {a_lapsed}, {a_reconciles} policy reconciliations and {a_attach} AttachPolicy \
         calls while cut off, saw the new holder {:.1} s after the heal; {lost} of {sent} QoS 1 \
         lost, {} duplicates",
        lapsed_after.as_secs_f64(),
        takeover.as_secs_f64(),
        takeovers.0,
        takeovers.1,
        connections.0 - connections_before.0,
        connections.1 - connections_before.1,
        stepped_down.as_secs_f64(),
        all - distinct
    );
    assert_eq!(lost, 0);
    assert_eq!(a_lapsed, 1.0, "the old leader knew its lease had lapsed");
    assert!(
        a_reconciles >= 1.0,
        "no resync ran on the cut-off replica: nothing shown"
    );
    assert_eq!(
        a_attach, 0.0,
        "a replica without a valid lease wrote to AWS"
    );
    assert!(takeovers.0 <= 1 && takeovers.1 <= 1, "{takeovers:?}");
    assert_eq!(takeovers, during, "a takeover after the heal");
    assert_eq!(
        (
            connections.0 - connections_before.0,
            connections.1 - connections_before.1
        ),
        (1, 1),
        "only the new leader connected"
    );
    let logs = a.logs();
    assert!(logs.contains("lease not renewed in time"), "{logs}");
    assert!(!logs.contains("panicked"), "{logs}");
    let _ = bindings.delete("app", &DeleteParams::default()).await;
    pair.finish(cp).await;
}

/// Bridge sharding on three replicas (the chart's 15 s lease); one is cut off from the API
/// server. Its bridges pass to the other two after its member Lease is seen unrenewed for a lease
/// duration: each of their client ids is taken over once at most, the cut-off replica never
/// reconnects one (its relays keep what they have until a broker takes it over), and once the
/// partition heals it stops what others took, then gets a share back by hand-over, without a
/// takeover. 0 QoS 1 lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_replica_with_sharded_bridges_is_fenced_and_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let Some(cp) = control_plane::with_crds().await else {
        return;
    };
    let ns = "sst-shard";
    let (source, sink) = (Mosquitto::start_logged(), Mosquitto::start_logged());
    let install = install_sharded(cp, ns, &["replicaCount=3"]).await;
    let proxy = Partition::start(cp);
    let kubeconfig = proxy.kubeconfig(cp, &install, "sst-shard-a-proxied");
    let a = install.spawn(
        "iot-operator-sst-shard-a",
        &[("KUBECONFIG", &kubeconfig.display().to_string())],
    );
    let b = install.spawn("iot-operator-sst-shard-b", &[]);
    let c = install.spawn("iot-operator-sst-shard-c", &[]);
    for op in [&a, &b, &c] {
        wait_ready(op, "ready", Duration::from_secs(60)).await;
    }
    let admin = cp.admin().await;
    let api: Api<TopicBridge> = Api::namespaced(admin.clone(), ns);
    let collector = Collector::start(sink.tcp_port, "collector-sst-shard", "cluster/#", true).await;
    for i in 0..SHARD_BRIDGES {
        cp.create(&shard_bridge_in(ns, i, &source, &sink))
            .await
            .expect("bridge created");
    }
    settled(&api, &[&a, &b, &c], Duration::from_secs(90)).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stream = shard_stream(source.tcp_port, "stream-sst-shard", stop.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ids: Vec<(String, String)> = (0..SHARD_BRIDGES)
        .map(|i| {
            let id = format!("iotop-{ns}-b{i}");
            (id.clone(), format!("{id}-sink"))
        })
        .collect();
    let connections = || -> Vec<(usize, usize)> {
        ids.iter()
            .map(|(s, k)| (source.connections(s), sink.connections(k)))
            .collect()
    };
    let takeovers = || -> Vec<(usize, usize)> {
        ids.iter()
            .map(|(s, k)| (source.takeovers(s), sink.takeovers(k)))
            .collect()
    };
    let before = connections();
    let a_had = a.metric("iot_operator_bridges_held", "");

    proxy.partition();
    let cut = Instant::now();
    let d0 = collector.distinct();
    settled(&api, &[&b, &c], Duration::from_secs(90)).await;
    let moved = cut.elapsed();
    let after_move = connections();
    // The partition goes on: nothing of the cut-off replica may connect again.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let rate = (collector.distinct() - d0) as f64 / cut.elapsed().as_secs_f64();
    let during = takeovers();
    let still = connections();
    let a_lapsed = a.metric("iot_operator_lease_lapsed", "");
    proxy.heal();
    let healed = Instant::now();
    settled(&api, &[&a, &b, &c], Duration::from_secs(90)).await;
    let rejoined = healed.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let steps = stream.await.expect("stream");
    let sent = steps * SHARD_BRIDGES;
    collector
        .wait_for_distinct(sent, Duration::from_secs(60))
        .await;
    let got: BTreeSet<String> = collector.snapshot().into_iter().map(|m| m.topic).collect();
    let lost = (0..SHARD_BRIDGES)
        .flat_map(|i| (0..steps).map(move |n| format!("cluster/dev/{i}/s/{n}")))
        .filter(|t| !got.contains(t))
        .count();
    let total = collector
        .snapshot()
        .iter()
        .filter(|m| m.topic.starts_with("cluster/dev/"))
        .count();
    let end = takeovers();
    let most = end.iter().map(|(s, k)| *s.max(k)).max().unwrap_or(0);
    let taken: usize = end.iter().map(|(s, k)| s + k).sum();
    let reconnects_while_cut: usize = still
        .iter()
        .zip(&after_move)
        .map(|(s, m)| (s.0 - m.0) + (s.1 - m.1))
        .sum();
    eprintln!(
        "partition with sharding (3 replicas, 12 bridges): the cut-off replica held {a_had}; all \
         12 connected on the other two {:.1} s after the cut; {rate:.0} msg/s delivered during \
         the partition; takeovers {taken} in all, at most {most} per client id; connections \
         while cut off after the move: {reconnects_while_cut}; lapsed {a_lapsed}; back in the \
         spread {:.1} s after the heal, held {:?}; {lost} of {sent} QoS 1 lost, {} duplicates; \
         new connections per bridge {:?}",
        moved.as_secs_f64(),
        rejoined.as_secs_f64(),
        held(&[&a, &b, &c]),
        total - got.len(),
        connections()
            .iter()
            .zip(&before)
            .map(|(n, b)| (n.0 - b.0, n.1 - b.1))
            .collect::<Vec<_>>()
    );
    assert_eq!(lost, 0);
    assert_eq!(a_lapsed, 1.0);
    assert!(most <= 1, "a client id taken over twice: {end:?}");
    assert_eq!(end, during, "a takeover after the heal: {end:?}");
    assert_eq!(
        reconnects_while_cut, 0,
        "the cut-off replica connected again"
    );
    for op in [&a, &b, &c] {
        let logs = op.logs();
        assert!(!logs.contains("panicked"), "{logs}");
    }
    for i in 0..SHARD_BRIDGES {
        let _ = api.delete(&format!("b{i}"), &DeleteParams::default()).await;
    }
}
