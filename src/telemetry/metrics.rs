//! The Prometheus registry and every metric the operator exports.
//!
//! Metric handles (`Counter`, `Gauge`, `Histogram`) are cheap clones of shared atomics: hot paths
//! look a labelled handle up once and keep it.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::relay::{DropReason, ObserverSource, RelayObserver, SessionEnd, Side};
use crate::vocab::Direction;

/// Labels naming a controller.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: &'static str,
}

/// Labels of a failed reconciliation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub controller: &'static str,
    pub reason: String,
}

/// Labels of an AWS API call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AwsCallLabels {
    pub operation: String,
    pub outcome: &'static str,
}

/// Labels of an AWS operation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AwsOperationLabels {
    pub operation: String,
}

/// Labels of a session end: how it came out.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

/// Labels of a bridge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BridgeLabels {
    pub bridge: String,
}

/// Labels of a bridge and a direction.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BridgeDirectionLabels {
    pub bridge: String,
    pub direction: &'static str,
}

/// The `state` values of `policy_sync_targets`.
pub const SYNC_STATES: [&str; 3] = ["seen", "attached", "remaining"];

/// One count of a binding's sync.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SyncStateLabels {
    pub binding: String,
    pub state: &'static str,
}

/// Why a bridge Lease changed hands.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandoverLabels {
    pub reason: &'static str,
}

/// Labels of a binding.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BindingLabels {
    pub binding: String,
}

/// Labels of one side of a bridge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BridgeSideLabels {
    pub bridge: String,
    pub side: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn reconcile_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

fn latency_histogram() -> Histogram {
    // 50 us to ~3.3 s
    Histogram::new(exponential_buckets(0.000_05, 2.0, 17))
}

/// All metrics, registered in one registry.
pub struct Metrics {
    registry: Registry,
    pub reconciliations: Family<ControllerLabels, Counter>,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub reconcile_duration: HistogramFamily<ControllerLabels>,
    pub aws_calls: Family<AwsCallLabels, Counter>,
    pub aws_throttles: Family<AwsOperationLabels, Counter>,
    pub aws_retries: Family<AwsOperationLabels, Counter>,
    pub aws_call_duration: HistogramFamily<AwsOperationLabels>,
    pub drift_repairs: Counter,
    pub bridge_messages: Family<BridgeDirectionLabels, Counter>,
    pub bridge_bytes: Family<BridgeDirectionLabels, Counter>,
    pub bridge_dropped: Family<BridgeDirectionLabels, Counter>,
    pub bridge_too_large: Family<BridgeDirectionLabels, Counter>,
    pub bridge_refused: Family<BridgeDirectionLabels, Counter>,
    pub bridge_reconnects: Family<BridgeSideLabels, Counter>,
    pub bridge_connected: Family<BridgeSideLabels, Gauge>,
    pub bridge_subscriptions_refused: Family<BridgeSideLabels, Gauge>,
    pub bridge_stalled: Family<BridgeLabels, Gauge>,
    pub bridge_latency: HistogramFamily<BridgeLabels>,
    /// Kept sessions of retired bridge connections, ended or not (no bridge label: the bridge
    /// is gone).
    pub bridge_session_ends: Family<OutcomeLabels, Counter>,
    pub bridge_connections: Gauge,
    pub binding_ready: Family<BindingLabels, Gauge>,
    /// Relays running per bridge in this process: a bridge's series go when its last one stops.
    relays: Arc<Mutex<HashMap<String, usize>>>,
    pub leader: Gauge,
    pub lease_lapsed: Gauge,
    pub bridges_held: Gauge,
    pub sync_targets: Family<SyncStateLabels, Gauge>,
    pub bridge_handovers: Family<HandoverLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("iot_operator");
        let m = Self {
            reconciliations: Family::default(),
            reconcile_errors: Family::default(),
            reconcile_duration: Family::new_with_constructor(reconcile_histogram),
            aws_calls: Family::default(),
            aws_throttles: Family::default(),
            aws_retries: Family::default(),
            aws_call_duration: Family::new_with_constructor(reconcile_histogram),
            drift_repairs: Counter::default(),
            bridge_messages: Family::default(),
            bridge_bytes: Family::default(),
            bridge_dropped: Family::default(),
            bridge_too_large: Family::default(),
            bridge_refused: Family::default(),
            bridge_reconnects: Family::default(),
            bridge_connected: Family::default(),
            bridge_subscriptions_refused: Family::default(),
            bridge_stalled: Family::default(),
            bridge_latency: Family::new_with_constructor(latency_histogram),
            bridge_session_ends: Family::default(),
            bridge_connections: Gauge::default(),
            binding_ready: Family::default(),
            relays: Arc::default(),
            leader: Gauge::default(),
            lease_lapsed: Gauge::default(),
            bridges_held: Gauge::default(),
            sync_targets: Family::default(),
            bridge_handovers: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "reconciliations",
            "Reconciliations run",
            m.reconciliations.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconciliations that failed, by reason",
            m.reconcile_errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time a reconciliation took",
            m.reconcile_duration.clone(),
        );
        registry.register(
            "aws_api_calls",
            "Attempts of AWS API calls, by operation and outcome (ok, or the error class)",
            m.aws_calls.clone(),
        );
        registry.register(
            "aws_api_throttles",
            "Attempts of AWS API calls throttled by AWS, by operation",
            m.aws_throttles.clone(),
        );
        registry.register(
            "aws_api_retries",
            "Retried attempts of AWS API calls (the SDK's retries), by operation",
            m.aws_retries.clone(),
        );
        registry.register(
            "aws_api_call_duration_seconds",
            "Time an AWS API call took, retries included",
            m.aws_call_duration.clone(),
        );
        registry.register(
            "policy_drift_repairs",
            "Policy attachments removed out of band and attached again",
            m.drift_repairs.clone(),
        );
        registry.register(
            "bridge_messages_relayed",
            "Messages relayed, by bridge and direction",
            m.bridge_messages.clone(),
        );
        registry.register(
            "bridge_bytes_relayed",
            "Payload bytes relayed, by bridge and direction",
            m.bridge_bytes.clone(),
        );
        registry.register(
            "bridge_messages_dropped",
            "Messages dropped, by bridge and direction",
            m.bridge_dropped.clone(),
        );
        registry.register(
            "bridge_messages_too_large",
            "Messages dropped because the side they go to or come from does not take messages that large (also in bridge_messages_dropped), by bridge and direction",
            m.bridge_too_large.clone(),
        );
        registry.register(
            "bridge_messages_refused",
            "Messages dropped because the broker closed the connection each time they were sent (also in bridge_messages_dropped), by bridge and direction",
            m.bridge_refused.clone(),
        );
        registry.register(
            "bridge_reconnects",
            "Reconnects, by bridge and side",
            m.bridge_reconnects.clone(),
        );
        registry.register(
            "bridge_connected",
            "1 when a side of a bridge is connected",
            m.bridge_connected.clone(),
        );
        registry.register(
            "bridge_subscriptions_refused",
            "Topic filters the broker refused at the last subscribe of a bridge's side (0 when all were granted)",
            m.bridge_subscriptions_refused.clone(),
        );
        registry.register(
            "bridge_stalled_connections",
            "Connections of a bridge whose brokers are connected but whose destination has taken none of the messages waiting for it for --stall-seconds (Ready=False reason Stalled)",
            m.bridge_stalled.clone(),
        );
        registry.register(
            "bridge_session_ends",
            "Kept sessions of bridge connections gone for good (a deleted bridge, a lowered connections) by outcome: ended at the broker, failed (the broker did not answer in 3 tries; left to expire), not_permitted (this replica's lease had lapsed)",
            m.bridge_session_ends.clone(),
        );
        registry.register(
            "bridge_connections",
            "Bridge connections the replicas are to run between them, as this replica sees the TopicBridges (with --shard-bridges)",
            m.bridge_connections.clone(),
        );
        registry.register(
            "binding_ready",
            "1 when an IotPolicyBinding's Ready condition is True, 0 when False (exported by the leader)",
            m.binding_ready.clone(),
        );
        registry.register(
            "bridge_relay_latency_seconds",
            "Time from receiving a message to the destination's acknowledgement",
            m.bridge_latency.clone(),
        );
        registry.register(
            "leader",
            "1 when this replica holds the leader lease",
            m.leader.clone(),
        );
        registry.register(
            "lease_lapsed",
            "1 while this replica runs relays on a lease (leader or member) it could not renew in time: the API server did not answer. Connected relays keep running; nothing reconnects or is written",
            m.lease_lapsed.clone(),
        );
        registry.register(
            "policy_sync_targets",
            "Per binding, its sync's identities seen, desired targets attached, and targets remaining to attach (updated as the sync runs)",
            m.sync_targets.clone(),
        );
        registry.register(
            "bridges_held",
            "TopicBridges this replica holds the Lease of and runs (with --shard-bridges)",
            m.bridges_held.clone(),
        );
        registry.register(
            "bridge_handovers",
            "Bridge Leases this replica acquired, released, lost or retired (with --shard-bridges)",
            m.bridge_handovers.clone(),
        );
        Self { registry, ..m }
    }

    /// Records whether a binding is Ready (only the leader writes status, so only it calls this).
    pub fn binding_ready(&self, binding: &str, ready: bool) {
        self.binding_ready
            .get_or_create(&BindingLabels {
                binding: binding.to_owned(),
            })
            .set(i64::from(ready));
    }

    /// Drops a deleted binding's series.
    pub fn forget_binding(&self, binding: &str) {
        self.binding_ready.remove(&BindingLabels {
            binding: binding.to_owned(),
        });
        for state in SYNC_STATES {
            self.sync_targets.remove(&SyncStateLabels {
                binding: binding.to_owned(),
                state,
            });
        }
    }

    /// Drops every binding's series: this replica stopped leading, and the next leader exports
    /// them (a stale 0 here would keep an alert firing).
    pub fn forget_bindings(&self) {
        self.binding_ready.clear();
        self.sync_targets.clear();
    }

    /// The registry in OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The registry in Prometheus text format 0.0.4, for scrapers that do not ask for
    /// OpenMetrics (`promtool check metrics`, `curl`, older agents).
    pub fn encode_prometheus_text(&self) -> String {
        openmetrics_to_text(&self.encode())
    }
}

/// Prometheus text format 0.0.4 from OpenMetrics text: a counter's HELP and TYPE name its
/// `_total` samples, `unknown` is `untyped`, and `# UNIT`, `# EOF` and `_created` samples go.
fn openmetrics_to_text(om: &str) -> String {
    let mut out = String::with_capacity(om.len());
    let mut help: Option<&str> = None;
    let mut created: Option<String> = None;
    for line in om.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (name, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "unknown" => (name.to_owned(), "untyped"),
                k => (name.to_owned(), k),
            };
            created = Some(format!("{}_created", name.trim_end_matches("_total")));
            if let Some(h) = help.take() {
                let text = h.split_once(' ').map_or("", |(_, t)| t);
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        if let Some(c) = &created
            && line.split(['{', ' ']).next() == Some(c.as_str())
        {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// A pair of handles, one per relay direction or side.
#[derive(Clone)]
struct Pair<T> {
    first: T,
    second: T,
}

impl<T> Pair<T> {
    fn by_direction(&self, d: Direction) -> &T {
        match d {
            Direction::In => &self.first,
            Direction::Out => &self.second,
        }
    }

    fn by_side(&self, s: Side) -> &T {
        match s {
            Side::Source => &self.first,
            Side::Sink => &self.second,
        }
    }
}

/// One labelled handle of a family. `get_or_create` returns a guard holding the family's read
/// lock; it must be released before the next lookup, which may need the write lock.
fn handle<L, M>(family: &Family<L, M, impl Fn() -> M>, labels: &L) -> M
where
    L: Clone + std::hash::Hash + Eq,
    M: Clone,
{
    family.get_or_create(labels).clone()
}

/// The metric handles of one relay, looked up once when it starts. Several relays of one bridge
/// (its connections) may run in one process: they share the series, and the last one to stop
/// removes them, so that a bridge deleted or handed to another replica leaves no stale value.
struct BridgeMeters {
    bridge: String,
    messages: Pair<Counter>,
    bytes: Pair<Counter>,
    dropped: Pair<Counter>,
    too_large: Pair<Counter>,
    refused: Pair<Counter>,
    reconnects: Pair<Counter>,
    /// Connections of the bridge up on each side, in this process.
    connected: Pair<Gauge>,
    /// Whether this relay's own side is up, so that it counts once in `connected`.
    up: Pair<AtomicBool>,
    subscriptions_refused: Pair<Gauge>,
    /// The bridge's stalled connections, in this process.
    stalled: Gauge,
    /// Whether this relay is stalled, so that it counts once in `stalled`.
    is_stalled: AtomicBool,
    latency: Histogram,
    session_ends: Family<OutcomeLabels, Counter>,
    families: Families,
    relays: Arc<Mutex<HashMap<String, usize>>>,
}

/// The families a bridge's series live in (cheap clones), to remove them.
struct Families {
    messages: Family<BridgeDirectionLabels, Counter>,
    bytes: Family<BridgeDirectionLabels, Counter>,
    dropped: Family<BridgeDirectionLabels, Counter>,
    too_large: Family<BridgeDirectionLabels, Counter>,
    refused: Family<BridgeDirectionLabels, Counter>,
    reconnects: Family<BridgeSideLabels, Counter>,
    connected: Family<BridgeSideLabels, Gauge>,
    subscriptions_refused: Family<BridgeSideLabels, Gauge>,
    stalled: Family<BridgeLabels, Gauge>,
    latency: HistogramFamily<BridgeLabels>,
}

fn direction_labels(bridge: &str, d: Direction) -> BridgeDirectionLabels {
    BridgeDirectionLabels {
        bridge: bridge.to_owned(),
        direction: d.as_str(),
    }
}

fn side_labels(bridge: &str, s: Side) -> BridgeSideLabels {
    BridgeSideLabels {
        bridge: bridge.to_owned(),
        side: s.as_str(),
    }
}

impl BridgeMeters {
    fn new(m: &Metrics, bridge: &str) -> Self {
        *m.relays
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(bridge.to_owned())
            .or_default() += 1;
        let per_direction = |family: &Family<BridgeDirectionLabels, Counter>| Pair {
            first: handle(family, &direction_labels(bridge, Direction::In)),
            second: handle(family, &direction_labels(bridge, Direction::Out)),
        };
        let per_side = |family: &Family<BridgeSideLabels, Gauge>| Pair {
            first: handle(family, &side_labels(bridge, Side::Source)),
            second: handle(family, &side_labels(bridge, Side::Sink)),
        };
        Self {
            bridge: bridge.to_owned(),
            messages: per_direction(&m.bridge_messages),
            bytes: per_direction(&m.bridge_bytes),
            dropped: per_direction(&m.bridge_dropped),
            too_large: per_direction(&m.bridge_too_large),
            refused: per_direction(&m.bridge_refused),
            reconnects: Pair {
                first: handle(&m.bridge_reconnects, &side_labels(bridge, Side::Source)),
                second: handle(&m.bridge_reconnects, &side_labels(bridge, Side::Sink)),
            },
            connected: per_side(&m.bridge_connected),
            up: Pair {
                first: AtomicBool::new(false),
                second: AtomicBool::new(false),
            },
            subscriptions_refused: per_side(&m.bridge_subscriptions_refused),
            stalled: handle(
                &m.bridge_stalled,
                &BridgeLabels {
                    bridge: bridge.to_owned(),
                },
            ),
            is_stalled: AtomicBool::new(false),
            latency: handle(
                &m.bridge_latency,
                &BridgeLabels {
                    bridge: bridge.to_owned(),
                },
            ),
            session_ends: m.bridge_session_ends.clone(),
            families: Families {
                messages: m.bridge_messages.clone(),
                bytes: m.bridge_bytes.clone(),
                dropped: m.bridge_dropped.clone(),
                too_large: m.bridge_too_large.clone(),
                refused: m.bridge_refused.clone(),
                reconnects: m.bridge_reconnects.clone(),
                connected: m.bridge_connected.clone(),
                subscriptions_refused: m.bridge_subscriptions_refused.clone(),
                stalled: m.bridge_stalled.clone(),
                latency: m.bridge_latency.clone(),
            },
            relays: m.relays.clone(),
        }
    }
}

impl Drop for BridgeMeters {
    fn drop(&mut self) {
        for s in [Side::Source, Side::Sink] {
            self.connected(s, false);
        }
        self.stalled(false);
        let mut relays = self.relays.lock().unwrap_or_else(|p| p.into_inner());
        let last = match relays.get_mut(&self.bridge) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            _ => true,
        };
        if !last {
            return;
        }
        relays.remove(&self.bridge);
        // Still under the lock: a relay of this bridge starting now recreates the series after.
        let f = &self.families;
        for d in [Direction::In, Direction::Out] {
            let l = direction_labels(&self.bridge, d);
            for family in [&f.messages, &f.bytes, &f.dropped, &f.too_large, &f.refused] {
                family.remove(&l);
            }
        }
        for s in [Side::Source, Side::Sink] {
            let l = side_labels(&self.bridge, s);
            f.reconnects.remove(&l);
            f.connected.remove(&l);
            f.subscriptions_refused.remove(&l);
        }
        let l = BridgeLabels {
            bridge: self.bridge.clone(),
        };
        f.latency.remove(&l);
        f.stalled.remove(&l);
    }
}

impl RelayObserver for BridgeMeters {
    fn relayed(&self, direction: Direction, bytes: usize, latency: Duration) {
        self.messages.by_direction(direction).inc();
        self.bytes.by_direction(direction).inc_by(bytes as u64);
        self.latency.observe(latency.as_secs_f64());
    }

    fn dropped(&self, direction: Direction, reason: DropReason) {
        self.dropped.by_direction(direction).inc();
        match reason {
            DropReason::TooLarge => self.too_large.by_direction(direction).inc(),
            DropReason::Refused => self.refused.by_direction(direction).inc(),
            // Counted in the dropped total only.
            DropReason::Expired | DropReason::Loop => 0,
        };
    }

    fn reconnected(&self, side: Side) {
        self.reconnects.by_side(side).inc();
    }

    fn connected(&self, side: Side, up: bool) {
        let was = self.up.by_side(side).swap(up, Ordering::Relaxed);
        match (was, up) {
            (false, true) => self.connected.by_side(side).inc(),
            (true, false) => self.connected.by_side(side).dec(),
            _ => 0,
        };
    }

    fn subscriptions_refused(&self, side: Side, filters: usize) {
        self.subscriptions_refused
            .by_side(side)
            .set(i64::try_from(filters).unwrap_or(i64::MAX));
    }

    fn stalled(&self, on: bool) {
        if self.is_stalled.swap(on, Ordering::Relaxed) != on {
            if on {
                self.stalled.inc();
            } else {
                self.stalled.dec();
            }
        }
    }

    fn session_end(&self, outcome: SessionEnd) {
        self.session_ends
            .get_or_create(&OutcomeLabels {
                outcome: outcome.as_str(),
            })
            .inc();
    }
}

impl ObserverSource for Metrics {
    fn observer(&self, bridge: &str) -> Arc<dyn RelayObserver> {
        Arc::new(BridgeMeters::new(self, bridge))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_registered_metrics() {
        let m = Metrics::new();
        m.reconciliations
            .get_or_create(&ControllerLabels {
                controller: "topicbridge",
            })
            .inc();
        m.reconcile_duration
            .get_or_create(&ControllerLabels {
                controller: "topicbridge",
            })
            .observe(0.01);
        let text = m.encode();
        assert!(
            text.contains("iot_operator_reconciliations_total{controller=\"topicbridge\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("iot_operator_reconcile_duration_seconds_bucket"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }

    #[tokio::test]
    async fn relay_observers_count_by_direction_and_side() {
        let m = Metrics::new();
        // Looking up many handles of one family must not deadlock on the family's lock.
        let o = tokio::time::timeout(Duration::from_secs(5), async { m.observer("ns/b") })
            .await
            .expect("no deadlock");
        o.relayed(Direction::Out, 10, Duration::from_millis(3));
        o.dropped(Direction::In, DropReason::Refused);
        o.connected(Side::Sink, true);
        let text = m.encode();
        for line in [
            "iot_operator_bridge_messages_relayed_total{bridge=\"ns/b\",direction=\"out\"} 1",
            "iot_operator_bridge_messages_relayed_total{bridge=\"ns/b\",direction=\"in\"} 0",
            "iot_operator_bridge_bytes_relayed_total{bridge=\"ns/b\",direction=\"out\"} 10",
            "iot_operator_bridge_messages_refused_total{bridge=\"ns/b\",direction=\"in\"} 1",
            "iot_operator_bridge_messages_too_large_total{bridge=\"ns/b\",direction=\"in\"} 0",
            "iot_operator_bridge_connected{bridge=\"ns/b\",side=\"sink\"} 1",
            "iot_operator_bridge_connected{bridge=\"ns/b\",side=\"source\"} 0",
        ] {
            assert!(text.contains(line), "missing {line}:\n{text}");
        }
    }

    #[test]
    fn a_bridge_series_go_when_its_last_relay_stops() {
        let m = Metrics::new();
        let first = m.observer("ns/b");
        let second = m.observer("ns/b");
        first.connected(Side::Source, true);
        second.connected(Side::Source, true);
        // The same state told twice counts once.
        second.connected(Side::Source, true);
        first.subscriptions_refused(Side::Source, 2);
        let up = "iot_operator_bridge_connected{bridge=\"ns/b\",side=\"source\"}";
        assert!(m.encode().contains(&format!("{up} 2")), "{}", m.encode());
        first.connected(Side::Source, false);
        assert!(m.encode().contains(&format!("{up} 1")), "{}", m.encode());
        drop(first);
        let text = m.encode();
        assert!(text.contains(&format!("{up} 1")), "{text}");
        assert!(
            text.contains(
                "iot_operator_bridge_subscriptions_refused{bridge=\"ns/b\",side=\"source\"} 2"
            ),
            "{text}"
        );
        drop(second);
        let text = m.encode();
        assert!(!text.contains("bridge=\"ns/b\""), "{text}");
        // A relay started again has its series again, from 0.
        let again = m.observer("ns/b");
        again.relayed(Direction::In, 1, Duration::from_millis(1));
        assert!(
            m.encode().contains(
                "iot_operator_bridge_messages_relayed_total{bridge=\"ns/b\",direction=\"in\"} 1"
            ),
            "{}",
            m.encode()
        );
    }

    #[test]
    fn binding_series_go_with_the_binding_and_with_leadership() {
        let m = Metrics::new();
        m.binding_ready("ns/a", false);
        m.binding_ready("ns/b", true);
        let text = m.encode();
        assert!(
            text.contains("iot_operator_binding_ready{binding=\"ns/a\"} 0"),
            "{text}"
        );
        m.forget_binding("ns/a");
        let text = m.encode();
        assert!(!text.contains("binding=\"ns/a\""), "{text}");
        assert!(
            text.contains("iot_operator_binding_ready{binding=\"ns/b\"} 1"),
            "{text}"
        );
        m.forget_bindings();
        assert!(!m.encode().contains("binding=\""), "{}", m.encode());
    }

    #[test]
    fn prometheus_text_names_counters_by_their_samples() {
        let m = Metrics::new();
        m.drift_repairs.inc();
        m.leader.set(1);
        let text = m.encode_prometheus_text();
        for line in [
            "# HELP iot_operator_policy_drift_repairs_total Policy attachments removed out of band and attached again.",
            "# TYPE iot_operator_policy_drift_repairs_total counter",
            "iot_operator_policy_drift_repairs_total 1",
            "# TYPE iot_operator_leader gauge",
            "iot_operator_leader 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}:\n{text}");
        }
        assert!(!text.contains("# EOF"), "{text}");
        assert!(!text.contains("# UNIT"), "{text}");
    }
}
