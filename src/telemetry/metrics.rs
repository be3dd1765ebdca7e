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
    pub operation: &'static str,
    pub outcome: &'static str,
}

/// Labels of an AWS operation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AwsOperationLabels {
    pub operation: &'static str,
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
    pub aws_call_duration: HistogramFamily<AwsOperationLabels>,
    pub drift_repairs: Counter,
    pub bridge_messages: Family<BridgeDirectionLabels, Counter>,
    pub bridge_bytes: Family<BridgeDirectionLabels, Counter>,
    pub bridge_dropped: Family<BridgeDirectionLabels, Counter>,
    pub bridge_too_large: Family<BridgeDirectionLabels, Counter>,
    pub bridge_refused: Family<BridgeDirectionLabels, Counter>,
    pub bridge_reconnects: Family<BridgeSideLabels, Counter>,
    pub bridge_connected: Family<BridgeSideLabels, Gauge>,
    pub bridge_latency: HistogramFamily<BridgeLabels>,
    pub leader: Gauge,
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
            aws_call_duration: Family::new_with_constructor(reconcile_histogram),
            drift_repairs: Counter::default(),
            bridge_messages: Family::default(),
            bridge_bytes: Family::default(),
            bridge_dropped: Family::default(),
            bridge_too_large: Family::default(),
            bridge_refused: Family::default(),
            bridge_reconnects: Family::default(),
            bridge_connected: Family::default(),
            bridge_latency: Family::new_with_constructor(latency_histogram),
            leader: Gauge::default(),
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
            "AWS API calls, by operation and outcome",
            m.aws_calls.clone(),
        );
        registry.register(
            "aws_api_throttles",
            "AWS API calls throttled by AWS",
            m.aws_throttles.clone(),
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
            "bridge_relay_latency_seconds",
            "Time from receiving a message to the destination's acknowledgement",
            m.bridge_latency.clone(),
        );
        registry.register(
            "leader",
            "1 when this replica holds the leader lease",
            m.leader.clone(),
        );
        Self { registry, ..m }
    }

    /// The registry in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
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
}
