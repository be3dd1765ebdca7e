//! The relay: two MQTT connections and the tasks that move messages between them.
//!
//! Per side there are two tasks:
//! - the *connection task* polls rumqttc's event loop, reconnects with backoff (a fresh event
//!   loop per connection, a freshly signed URL where there is a signer), routes incoming
//!   publishes to the other side, and reports connection events. It never blocks on the other
//!   side, so neither direction can stall the other.
//! - the *publisher task* owns the side's [`Outbox`]: it publishes what the other side forwards,
//!   at most `window` at a time, matches PUBACKs, and on completion acknowledges the original
//!   message to the broker it came from (manual acks). A QoS 1 message is therefore acknowledged
//!   to its source only after the destination broker has it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, Incoming, MqttOptions, Outgoing, Publish, QoS,
    StateError, SubscribeFilter, SubscribeReasonCode, TlsConfiguration, Transport,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::config::{Endpoint, RelayConfig, RouteConfig};
use super::outbox::Outbox;
use super::refusal::{RefusalWatch, STRIKES as REFUSAL_STRIKES, Verdict};
use super::tls::TlsTrust;
use crate::api::{Direction, RetainHandling};
use crate::telemetry::Metrics;
use crate::telemetry::metrics::{BridgeDirectionLabels, BridgeLabels, BridgeSideLabels};
use prometheus_client::metrics::family::Family;

/// AWS IoT Core accepts at most this many filters in one SUBSCRIBE.
const AWS_FILTERS_PER_SUBSCRIBE: usize = 8;
/// A connection that ends this soon after it started, with nothing acknowledged, counts
/// against the oldest message written on it (a broker refusing a publish closes at once).
const REFUSAL_WINDOW: Duration = Duration::from_secs(10);
/// Messages read from one side and waiting for the other side's publisher: above either
/// bound, the reading side stops reading (TCP backpressure to its broker) instead of dropping,
/// and resumes below half of both.
const BACKLOG_MESSAGES: usize = 2_000;
const BACKLOG_BYTES: usize = 16 * 1024 * 1024;

/// Messages between the side that read them and the other side's publisher.
#[derive(Debug, Default)]
struct Backlog {
    messages: AtomicUsize,
    bytes: AtomicUsize,
    /// Signalled when the backlog falls to half its bounds.
    drained: tokio::sync::Notify,
}

impl Backlog {
    fn add(&self, bytes: usize) {
        self.messages.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    fn take(&self, bytes: usize) {
        let before = self.messages.fetch_sub(1, Ordering::Relaxed);
        let before_bytes = self.bytes.fetch_sub(bytes, Ordering::Relaxed);
        if before == BACKLOG_MESSAGES / 2 + 1
            || (before_bytes > BACKLOG_BYTES / 2 && before_bytes - bytes <= BACKLOG_BYTES / 2)
        {
            self.drained.notify_waiters();
        }
    }

    fn len(&self) -> usize {
        self.messages.load(Ordering::Relaxed)
    }

    fn full(&self) -> bool {
        self.messages.load(Ordering::Relaxed) >= BACKLOG_MESSAGES
            || self.bytes.load(Ordering::Relaxed) >= BACKLOG_BYTES
    }

    fn low(&self) -> bool {
        self.messages.load(Ordering::Relaxed) <= BACKLOG_MESSAGES / 2
            && self.bytes.load(Ordering::Relaxed) <= BACKLOG_BYTES / 2
    }
}

/// Which connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The remote broker (AWS IoT Core or a third-party broker).
    Source,
    /// The in-cluster broker.
    Sink,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Source => "source",
            Side::Sink => "sink",
        }
    }

    /// The other side.
    fn other(self) -> Side {
        match self {
            Side::Source => Side::Sink,
            Side::Sink => Side::Source,
        }
    }

    /// The routes whose messages this side reads.
    fn reads(self) -> Direction {
        match self {
            Side::Source => Direction::In,
            Side::Sink => Direction::Out,
        }
    }
}

/// Connection state of one side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SideState {
    /// Never connected yet.
    Connecting,
    Connected,
    /// Was connected, lost it, reconnecting.
    Disrupted,
    Stopped,
}

/// What the relay reports on every connection change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayStatus {
    pub source: SideState,
    pub sink: SideState,
    /// The last connection or subscription error, without secrets.
    pub last_error: Option<String>,
    /// The last message dropped because a side could not take it.
    pub last_dropped: Option<Dropped>,
}

/// Why the relay gave up on a message.
#[derive(Debug, Clone, Copy)]
enum DropReason {
    /// Over a side's `maxMessageBytes`.
    TooLarge,
    /// The broker closed the connection every time it was sent.
    Refused,
}

/// "in" for messages to the sink, "out" for messages to the source.
fn direction_name(dir: usize) -> &'static str {
    if dir == 0 { "in" } else { "out" }
}

/// A message the relay dropped because a side could not take it (too large, or refused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    /// What was dropped and why: route or topic, direction, size, the limit or the refusal.
    pub message: String,
    /// Messages dropped for the same reason so far by this relay.
    pub count: u64,
}

/// Counters, updated on the message path with relaxed atomics.
#[derive(Debug, Default)]
pub struct RelayStats {
    pub relayed_in: AtomicU64,
    pub relayed_out: AtomicU64,
    /// Dropped for any reason (QoS 0 backlog, too large).
    pub dropped: AtomicU64,
    /// Dropped because a side could not take them.
    pub too_large: AtomicU64,
    /// Dropped because the broker refused them (closed the connection on each).
    pub refused: AtomicU64,
    /// Times a side stopped reading until the other side caught up (backpressure).
    pub paused: AtomicU64,
    pub bytes: AtomicU64,
    /// Milliseconds since the epoch of the last relayed message (0: none yet).
    pub last_message_ms: AtomicI64,
    pub reconnects: AtomicU64,
}

impl RelayStats {
    pub fn relayed(&self) -> u64 {
        self.relayed_in.load(Ordering::Relaxed) + self.relayed_out.load(Ordering::Relaxed)
    }
}

/// The original message, to acknowledge once every copy has reached its destination.
struct Origin {
    /// Client of the connection the message arrived on; acking through a client whose
    /// connection is gone fails harmlessly (the broker sends the message again).
    client: AsyncClient,
    pkid: u16,
    remaining: AtomicUsize,
}

/// One message on its way to the other side.
struct Forward {
    topic: String,
    payload: Bytes,
    qos: QoS,
    retain: bool,
    origin: Option<Arc<Origin>>,
    received: Instant,
}

/// Connection events, from a connection task to its publisher task.
enum ConnEvent {
    Connected { client: AsyncClient },
    Outgoing(u16),
    PubAck(u16),
    Disconnected,
}

/// A running relay.
pub struct RelayHandle {
    draining: Arc<AtomicBool>,
    drain: watch::Sender<bool>,
    stop: watch::Sender<bool>,
    status: watch::Receiver<RelayStatus>,
    stats: Arc<RelayStats>,
    tasks: Vec<JoinHandle<()>>,
    drain_timeout: Duration,
}

impl RelayHandle {
    pub fn status(&self) -> watch::Receiver<RelayStatus> {
        self.status.clone()
    }

    pub fn stats(&self) -> Arc<RelayStats> {
        self.stats.clone()
    }

    /// Stops taking new messages, waits up to the drain timeout for in-flight ones, then
    /// disconnects. Messages not acknowledged by then are not acknowledged to their source
    /// either, so a persistent session delivers them again.
    pub async fn stop(mut self) {
        self.draining.store(true, Ordering::Release);
        let _ = self.drain.send(true);
        let publishers: Vec<JoinHandle<()>> = self.tasks.drain(2..).collect();
        let all_drained = futures::future::join_all(publishers);
        if tokio::time::timeout(self.drain_timeout, all_drained)
            .await
            .is_err()
        {
            tracing::warn!(
                "relay did not drain in time; unacknowledged messages will be redelivered"
            );
        }
        let _ = self.stop.send(true);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }
}

impl RelayHandle {
    /// Stops at once, without draining, and returns when every task is gone (its connections
    /// closed). Unacknowledged messages are redelivered to whoever connects next.
    pub async fn abort(mut self) {
        let tasks: Vec<JoinHandle<()>> = self.tasks.drain(..).collect();
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
    }
}

impl Drop for RelayHandle {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Metric handles of one relay, looked up once.
#[derive(Clone)]
struct RelayMetrics {
    messages: [prometheus_client::metrics::counter::Counter; 2],
    bytes: [prometheus_client::metrics::counter::Counter; 2],
    dropped: [prometheus_client::metrics::counter::Counter; 2],
    too_large: [prometheus_client::metrics::counter::Counter; 2],
    refused: [prometheus_client::metrics::counter::Counter; 2],
    reconnects: [prometheus_client::metrics::counter::Counter; 2],
    connected: [prometheus_client::metrics::gauge::Gauge; 2],
    latency: prometheus_client::metrics::histogram::Histogram,
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

impl RelayMetrics {
    fn new(m: &Metrics, bridge: &str) -> Self {
        let dir = |d: &'static str| BridgeDirectionLabels {
            bridge: bridge.to_owned(),
            direction: d,
        };
        let side = |s: &'static str| BridgeSideLabels {
            bridge: bridge.to_owned(),
            side: s,
        };
        let messages = [
            handle(&m.bridge_messages, &dir("in")),
            handle(&m.bridge_messages, &dir("out")),
        ];
        let bytes = [
            handle(&m.bridge_bytes, &dir("in")),
            handle(&m.bridge_bytes, &dir("out")),
        ];
        let dropped = [
            handle(&m.bridge_dropped, &dir("in")),
            handle(&m.bridge_dropped, &dir("out")),
        ];
        let too_large = [
            handle(&m.bridge_too_large, &dir("in")),
            handle(&m.bridge_too_large, &dir("out")),
        ];
        let refused = [
            handle(&m.bridge_refused, &dir("in")),
            handle(&m.bridge_refused, &dir("out")),
        ];
        let reconnects = [
            handle(&m.bridge_reconnects, &side("source")),
            handle(&m.bridge_reconnects, &side("sink")),
        ];
        let connected = [
            handle(&m.bridge_connected, &side("source")),
            handle(&m.bridge_connected, &side("sink")),
        ];
        let latency = handle(
            &m.bridge_latency,
            &BridgeLabels {
                bridge: bridge.to_owned(),
            },
        );
        Self {
            messages,
            bytes,
            dropped,
            too_large,
            refused,
            reconnects,
            connected,
            latency,
        }
    }
}

fn side_index(side: Side) -> usize {
    match side {
        Side::Source => 0,
        Side::Sink => 1,
    }
}

/// Shared by the four tasks of a relay.
struct Shared {
    name: String,
    routes: Vec<RouteConfig>,
    stats: Arc<RelayStats>,
    metrics: Option<RelayMetrics>,
    status: watch::Sender<RelayStatus>,
    draining: Arc<AtomicBool>,
    config: RelayConfig,
}

impl Shared {
    /// Counts a message the relay gave up on and says why in the status (the controller turns
    /// it into a Warning Event). `describe` gets the running count of this kind of drop.
    fn report_dropped(&self, dir: usize, why: DropReason, describe: impl FnOnce(u64) -> String) {
        self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        let counter = match why {
            DropReason::TooLarge => &self.stats.too_large,
            DropReason::Refused => &self.stats.refused,
        };
        let count = counter.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(m) = &self.metrics {
            m.dropped[dir].inc();
            match why {
                DropReason::TooLarge => m.too_large[dir].inc(),
                DropReason::Refused => m.refused[dir].inc(),
            };
        }
        let message = describe(count);
        tracing::warn!(bridge = %self.name, direction = direction_name(dir), reason = ?why, %message, "message dropped");
        self.status
            .send_modify(|s| s.last_dropped = Some(Dropped { message, count }));
    }

    /// Counts a reconnect of a connection that had been up.
    fn count_reconnect(&self, side: Side) {
        self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
        if let Some(m) = &self.metrics {
            m.reconnects[side_index(side)].inc();
        }
    }

    fn set_state(&self, side: Side, state: SideState, error: Option<String>) {
        if let Some(m) = &self.metrics {
            m.connected[side_index(side)].set((state == SideState::Connected) as i64);
        }
        self.status.send_modify(|s| {
            match side {
                Side::Source => s.source = state,
                Side::Sink => s.sink = state,
            }
            if error.is_some() {
                s.last_error = error;
            }
        });
    }
}

/// Starts a relay. It runs until [`RelayHandle::stop`].
pub fn start(config: RelayConfig, metrics: Option<Arc<Metrics>>) -> RelayHandle {
    let stats = Arc::new(RelayStats::default());
    let (status_tx, status_rx) = watch::channel(RelayStatus {
        source: SideState::Connecting,
        sink: SideState::Connecting,
        last_error: None,
        last_dropped: None,
    });
    let draining = Arc::new(AtomicBool::new(false));
    let (drain_tx, drain_rx) = watch::channel(false);
    let (stop_tx, stop_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        name: config.name.clone(),
        routes: config.routes.clone(),
        stats: stats.clone(),
        metrics: metrics
            .as_deref()
            .map(|m| RelayMetrics::new(m, &config.name)),
        status: status_tx,
        draining: draining.clone(),
        config: config.clone(),
    });

    // Forwards into each side's publisher; events from each connection task.
    let (to_source_tx, to_source_rx) = mpsc::unbounded_channel::<Forward>();
    let (to_sink_tx, to_sink_rx) = mpsc::unbounded_channel::<Forward>();
    let (source_ev_tx, source_ev_rx) = mpsc::unbounded_channel::<ConnEvent>();
    let (sink_ev_tx, sink_ev_rx) = mpsc::unbounded_channel::<ConnEvent>();
    let backlog_to_source = Arc::new(Backlog::default());
    let backlog_to_sink = Arc::new(Backlog::default());

    // A side that no route writes to never publishes: no packet-id table for it.
    let writes_to = |side: Side| config.routes.iter().any(|r| r.direction != side.reads());
    let mut source = config.source.clone();
    let mut sink = config.sink.clone();
    if !writes_to(Side::Source) {
        source.window = 0;
    }
    if !writes_to(Side::Sink) {
        sink.window = 0;
    }
    let tasks = vec![
        tokio::spawn(connection_task(
            shared.clone(),
            Side::Source,
            source,
            source_ev_tx,
            to_sink_tx,
            backlog_to_sink.clone(),
            stop_rx.clone(),
        )),
        tokio::spawn(connection_task(
            shared.clone(),
            Side::Sink,
            sink,
            sink_ev_tx,
            to_source_tx,
            backlog_to_source.clone(),
            stop_rx.clone(),
        )),
        tokio::spawn(publisher_task(
            shared.clone(),
            Side::Source,
            source_ev_rx,
            to_source_rx,
            backlog_to_source,
            drain_rx.clone(),
        )),
        tokio::spawn(publisher_task(
            shared,
            Side::Sink,
            sink_ev_rx,
            to_sink_rx,
            backlog_to_sink,
            drain_rx,
        )),
    ];
    RelayHandle {
        draining,
        drain: drain_tx,
        stop: stop_tx,
        status: status_rx,
        stats,
        tasks,
        drain_timeout: config.drain_timeout,
    }
}

/// Why building connection options failed.
#[derive(Debug, thiserror::Error)]
pub enum OptionsError {
    #[error("invalid broker URL: {0}")]
    Url(String),
    #[error("unsupported URL scheme '{0}'")]
    Scheme(String),
    #[error("{0}")]
    Tls(#[from] super::tls::TlsError),
}

/// What an MQTT PUBLISH adds to its payload at most: topic length, a topic of up to 65,535
/// bytes, packet id.
const PUBLISH_OVERHEAD: usize = 2 + 65_535 + 2;
/// The largest remaining length MQTT can express.
const MQTT_MAX_REMAINING: usize = 268_435_455;

/// rumqttc options for one connection attempt. `url` may be a freshly signed one.
pub fn mqtt_options(endpoint: &Endpoint, url: &str) -> Result<MqttOptions, OptionsError> {
    mqtt_options_reading(endpoint, url, endpoint.max_message_bytes)
}

/// [`mqtt_options`] taking in messages of up to `read_limit` payload bytes (raised for one
/// connection to take in, and drop, a message over the side's limit).
fn mqtt_options_reading(
    endpoint: &Endpoint,
    url: &str,
    read_limit: usize,
) -> Result<MqttOptions, OptionsError> {
    let parsed = url::Url::parse(url).map_err(|e| OptionsError::Url(e.to_string()))?;
    let host = parsed
        .host_str()
        .ok_or_else(|| OptionsError::Url("no host".into()))?
        .to_owned();
    let scheme = parsed.scheme();
    let default_port = match scheme {
        "mqtt" => 1883,
        "mqtts" => 8883,
        "ws" => 80,
        "wss" => 443,
        other => return Err(OptionsError::Scheme(other.to_owned())),
    };
    let port = parsed.port().unwrap_or(default_port);
    let mut opts = match scheme {
        // rumqttc takes the whole URL as the address of a WebSocket broker.
        "ws" | "wss" => MqttOptions::new(endpoint.client_id.clone(), url, port),
        _ => MqttOptions::new(endpoint.client_id.clone(), host.clone(), port),
    };
    let transport = match scheme {
        "mqtt" => Transport::tcp(),
        "ws" => Transport::ws(),
        _ => {
            if matches!(endpoint.tls, TlsTrust::InsecureSkipVerify) {
                tracing::warn!(
                    client_id = %endpoint.client_id,
                    host = %host,
                    "TLS certificate verification is OFF for this connection (insecureSkipTlsVerify): the broker is not authenticated"
                );
            }
            let config = TlsConfiguration::Rustls(super::tls::client_config(&endpoint.tls)?);
            if scheme == "mqtts" {
                Transport::tls_with_config(config)
            } else {
                Transport::wss_with_config(config)
            }
        }
    };
    opts.set_transport(transport);
    opts.set_keep_alive(endpoint.keep_alive);
    opts.set_clean_session(endpoint.clean_session);
    opts.set_manual_acks(true);
    // Every packet within the limits passes; the relay drops larger messages before rumqttc
    // would refuse them (which would break the connection and bring the message back forever).
    opts.set_max_packet_size(
        read_limit
            .saturating_add(PUBLISH_OVERHEAD)
            .min(MQTT_MAX_REMAINING),
        endpoint
            .max_message_bytes
            .saturating_add(PUBLISH_OVERHEAD + 5)
            .min(MQTT_MAX_REMAINING + 5),
    );
    // Our own window bounds what is in flight. rumqttc keeps a slot per packet id up to its
    // inflight setting, so it is kept just above the window rather than at the maximum.
    opts.set_inflight(window_slots(endpoint));
    if let (Some(user), Some(pass)) = (&endpoint.username, &endpoint.password) {
        opts.set_credentials(user.clone(), pass.expose().to_owned());
    } else if let Some(user) = &endpoint.username {
        opts.set_credentials(user.clone(), "");
    }
    Ok(opts)
}

/// Packet-id slots for rumqttc: the relay window plus headroom.
/// A connection that never publishes (no route writes to its side) gets a single slot.
fn window_slots(endpoint: &Endpoint) -> u16 {
    if endpoint.window == 0 {
        return 1;
    }
    u16::try_from(endpoint.window + 16)
        .unwrap_or(u16::MAX / 2)
        .min(u16::MAX / 2)
}

/// Error text with anything secret cut out: query strings of URLs (presigned signatures and
/// tokens) and the password.
pub fn redact(text: &str, endpoint: &Endpoint) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(q) = rest.find('?') {
        out.push_str(&rest[..q]);
        out.push_str("?<redacted>");
        let end = rest[q..]
            .find(|c: char| c.is_whitespace() || c == '"' || c == '\'' || c == ')')
            .map_or(rest.len(), |e| q + e);
        rest = &rest[end..];
    }
    out.push_str(rest);
    if let Some(p) = &endpoint.password
        && !p.expose().is_empty()
    {
        out = out.replace(p.expose(), "<redacted>");
    }
    out
}

fn backoff_delay(config: &RelayConfig, attempt: u32) -> Duration {
    let exp = attempt.min(16);
    let ceiling = config
        .reconnect_min
        .saturating_mul(1 << exp)
        .min(config.reconnect_max);
    ceiling / 2 + ceiling.mul_f64(fastrand::f64()) / 2
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[allow(clippy::too_many_arguments)]
async fn connection_task(
    shared: Arc<Shared>,
    side: Side,
    endpoint: Endpoint,
    events: mpsc::UnboundedSender<ConnEvent>,
    forward: mpsc::UnboundedSender<Forward>,
    backlog: Arc<Backlog>,
    mut stop: watch::Receiver<bool>,
) {
    let mut attempt: u32 = 0;
    let mut first = true;
    let mut ever_connected = false;
    // Raised for one connection after the broker sent a message over the limit: the message is
    // taken in and dropped, instead of breaking every connection after it.
    let mut read_limit = endpoint.max_message_bytes;
    let reading: Vec<&RouteConfig> = shared
        .routes
        .iter()
        .filter(|r| r.direction == side.reads())
        .collect();
    loop {
        if *stop.borrow() {
            break;
        }
        if let Some(permit) = &shared.config.connect_permit
            && !permit.allows()
        {
            tracing::debug!(bridge = %shared.name, side = side.as_str(), "not permitted to connect now");
            if sleep_or_stop(shared.config.reconnect_min, &mut stop).await {
                break;
            }
            continue;
        }
        // A fresh signature for every attempt.
        let (url, expires) = match &endpoint.signer {
            Some(signer) => match signer.signed_url().await {
                Ok(s) => (s.url, s.credentials_expire),
                Err(e) => {
                    tracing::warn!(bridge = %shared.name, side = side.as_str(), error = %e, "signing the connection URL failed");
                    shared.set_state(
                        side,
                        if ever_connected {
                            SideState::Disrupted
                        } else {
                            SideState::Connecting
                        },
                        Some(format!("{}: {e}", side.as_str())),
                    );
                    if sleep_or_stop(backoff_delay(&shared.config, attempt), &mut stop).await {
                        break;
                    }
                    attempt += 1;
                    continue;
                }
            },
            None => (super::config::Secret::new(endpoint.url.clone()), None),
        };
        let opts = match mqtt_options_reading(&endpoint, url.expose(), read_limit) {
            Ok(o) => o,
            Err(e) => {
                let msg = redact(&e.to_string(), &endpoint);
                shared.set_state(
                    side,
                    SideState::Connecting,
                    Some(format!("{}: {msg}", side.as_str())),
                );
                if sleep_or_stop(shared.config.reconnect_max, &mut stop).await {
                    break;
                }
                continue;
            }
        };
        drop(url);
        // Publishes (at most `window`) and acknowledgements (at most one per packet id the
        // broker has in flight to us) share this queue. It is sized so that an acknowledgement
        // never waits, even while reading is paused for backpressure (which stops draining it):
        // a wait there would stall the other side's publisher, which is what unpauses reading.
        // flume allocates per queued request, not for the capacity.
        let (client, mut eventloop) =
            AsyncClient::new(opts, 2 * shared.config.window + 16 + usize::from(u16::MAX));
        let mut deadline = tokio::time::Instant::now() + shared.config.max_connection_age;
        if let Some(exp) = expires
            && let Ok(left) = exp.duration_since(SystemTime::now())
        {
            let renew_in = left
                .saturating_sub(shared.config.credential_margin)
                .max(Duration::from_secs(30));
            deadline = deadline.min(tokio::time::Instant::now() + renew_in);
        }
        let outcome = run_connection(
            &shared,
            side,
            &endpoint,
            &client,
            &mut eventloop,
            &events,
            &forward,
            &backlog,
            &reading,
            &mut stop,
            deadline,
            first,
        )
        .await;
        let connected_once = !matches!(
            outcome,
            ConnOutcome::Failed {
                was_connected: false,
                ..
            }
        );
        read_limit = endpoint.max_message_bytes;
        match outcome {
            ConnOutcome::Stopped => break,
            ConnOutcome::Renew => {
                tracing::info!(bridge = %shared.name, side = side.as_str(), "reconnecting with fresh credentials");
                let _ = events.send(ConnEvent::Disconnected);
                attempt = 0;
            }
            ConnOutcome::Failed {
                error: _,
                was_connected,
                oversized: Some(n),
            } if n <= MQTT_MAX_REMAINING && n > read_limit_packet(&endpoint) => {
                // Take it in on the next connection (at once), then drop it.
                tracing::warn!(
                    bridge = %shared.name,
                    side = side.as_str(),
                    bytes = n,
                    limit = endpoint.max_message_bytes,
                    "the broker sent a message over this side's maxMessageBytes; reconnecting to take it in and drop it"
                );
                if was_connected {
                    shared.count_reconnect(side);
                }
                let _ = events.send(ConnEvent::Disconnected);
                read_limit = n;
                if sleep_or_stop(shared.config.reconnect_min, &mut stop).await {
                    break;
                }
            }
            ConnOutcome::Failed {
                error,
                was_connected,
                ..
            } => {
                let mut error = redact(&error, &endpoint);
                if endpoint.signer.is_some() && error.contains("403") {
                    // AWS IoT answers a refused signature or policy with a bare 403.
                    error.push_str(
                        " (AWS IoT refused the signed connection: check the credentials, the \
                         region and the machine's clock, and that the identity may iot:Connect \
                         with this client id)",
                    );
                }
                if was_connected {
                    ever_connected = true;
                    attempt = 0;
                    shared.count_reconnect(side);
                }
                tracing::warn!(bridge = %shared.name, side = side.as_str(), error = %error, "connection lost");
                let _ = events.send(ConnEvent::Disconnected);
                let state = if ever_connected {
                    SideState::Disrupted
                } else {
                    SideState::Connecting
                };
                shared.set_state(side, state, Some(format!("{}: {error}", side.as_str())));
                if sleep_or_stop(backoff_delay(&shared.config, attempt), &mut stop).await {
                    break;
                }
                attempt = attempt.saturating_add(1);
            }
        }
        if connected_once {
            first = false;
        }
    }
    shared.set_state(side, SideState::Stopped, None);
}

/// The read limit of a normal connection, as a remaining length.
fn read_limit_packet(endpoint: &Endpoint) -> usize {
    endpoint.max_message_bytes.saturating_add(PUBLISH_OVERHEAD)
}

/// Sleeps, returning true if the relay is stopping.
async fn sleep_or_stop(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    let stopped = tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = stop.wait_for(|s| *s) => true,
    };
    stopped || *stop.borrow()
}

enum ConnOutcome {
    Stopped,
    Renew,
    Failed {
        error: String,
        was_connected: bool,
        /// The broker sent a packet over the read limit, of this remaining length.
        oversized: Option<usize>,
    },
}

#[allow(clippy::too_many_arguments)]
async fn run_connection(
    shared: &Shared,
    side: Side,
    endpoint: &Endpoint,
    client: &AsyncClient,
    eventloop: &mut EventLoop,
    events: &mpsc::UnboundedSender<ConnEvent>,
    forward: &mpsc::UnboundedSender<Forward>,
    backlog: &Backlog,
    reading: &[&RouteConfig],
    stop: &mut watch::Receiver<bool>,
    deadline: tokio::time::Instant,
    first: bool,
) -> ConnOutcome {
    let mut connected = false;
    let mut pending_subacks = 0usize;
    let mut destination = String::new();
    // Made once per connection, not once per event: on the message path their setup cost
    // (timer registration, watch subscription) showed up in the profile.
    let stopped = stop.wait_for(|s| *s);
    let renew = tokio::time::sleep_until(deadline);
    tokio::pin!(stopped, renew);
    loop {
        // The other side is behind: stop reading (the broker's socket fills and it holds its
        // messages) until it has caught up, instead of dropping or buffering without bound.
        if backlog.full() {
            let paused = Instant::now();
            shared.stats.paused.fetch_add(1, Ordering::Relaxed);
            loop {
                if !wait_for_room(backlog, &mut stopped).await {
                    let _ = client.try_disconnect();
                    return ConnOutcome::Stopped;
                }
                if backlog.low() {
                    break;
                }
            }
            tracing::debug!(bridge = %shared.name, side = side.as_str(), paused_ms = paused.elapsed().as_millis() as u64, "reading paused while the other side caught up");
        }
        let event = tokio::select! {
            biased;
            _ = &mut stopped => {
                let _ = client.try_disconnect();
                return ConnOutcome::Stopped;
            }
            _ = &mut renew => {
                let _ = client.try_disconnect();
                return ConnOutcome::Renew;
            }
            e = eventloop.poll() => e,
        };
        match event {
            Ok(Event::Incoming(Incoming::ConnAck(ack))) => {
                connected = true;
                tracing::info!(bridge = %shared.name, side = side.as_str(), session_present = ack.session_present, "connected");
                // The channel of a fresh event loop is empty, so these requests cannot block.
                pending_subacks = if !ack.session_present || first {
                    subscribe(shared, side, endpoint, client)
                } else {
                    0
                };
                let _ = events.send(ConnEvent::Connected {
                    client: client.clone(),
                });
                if pending_subacks == 0 {
                    shared.set_state(side, SideState::Connected, None);
                }
            }
            Ok(Event::Incoming(Incoming::Publish(p))) => {
                route_incoming(
                    shared,
                    side,
                    client,
                    p,
                    forward,
                    backlog,
                    reading,
                    &mut destination,
                );
            }
            Ok(Event::Incoming(Incoming::PubAck(ack))) => {
                let _ = events.send(ConnEvent::PubAck(ack.pkid));
            }
            Ok(Event::Incoming(Incoming::SubAck(ack))) => {
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, SubscribeReasonCode::Failure))
                {
                    let msg = format!(
                        "{}: the broker refused a subscription (check the policy's iot:Subscribe/iot:Receive permissions)",
                        side.as_str()
                    );
                    tracing::warn!(bridge = %shared.name, "{msg}");
                    shared.status.send_modify(|s| s.last_error = Some(msg));
                }
                if pending_subacks > 0 {
                    pending_subacks -= 1;
                    if pending_subacks == 0 {
                        shared.set_state(side, SideState::Connected, None);
                    }
                }
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                let _ = events.send(ConnEvent::Outgoing(pkid));
            }
            Ok(_) => {}
            Err(e) => {
                let oversized = match &e {
                    ConnectionError::MqttState(StateError::Deserialization(
                        rumqttc::Error::PayloadSizeLimitExceeded(n),
                    )) => Some(*n),
                    _ => None,
                };
                let error = match &e {
                    ConnectionError::ConnectionRefused(code) => {
                        format!("connection refused: {code:?}")
                    }
                    other => other.to_string(),
                };
                return ConnOutcome::Failed {
                    error,
                    was_connected: connected,
                    oversized,
                };
            }
        }
    }
}

/// Waits until the backlog drains (or a short while passes); `false` if the relay is stopping.
async fn wait_for_room(
    backlog: &Backlog,
    stopped: &mut std::pin::Pin<&mut impl std::future::Future>,
) -> bool {
    let drained = backlog.drained.notified();
    tokio::pin!(drained);
    drained.as_mut().enable();
    if backlog.low() {
        return true;
    }
    tokio::select! {
        biased;
        _ = stopped.as_mut() => false,
        _ = drained => true,
        // A missed wake-up costs at most this.
        _ = tokio::time::sleep(Duration::from_millis(50)) => true,
    }
}

/// Routes one incoming publish to the other side (never blocks).
#[allow(clippy::too_many_arguments)]
fn route_incoming(
    shared: &Shared,
    side: Side,
    client: &AsyncClient,
    p: Publish,
    forward: &mpsc::UnboundedSender<Forward>,
    backlog: &Backlog,
    reading: &[&RouteConfig],
    destination: &mut String,
) {
    let received = Instant::now();
    let dir = side_index(side);
    if shared.draining.load(Ordering::Acquire) {
        // Not acknowledged: the broker delivers it again to the next relay (persistent session).
        return;
    }
    let topic = p.topic.as_str();
    // One pass over the routes: which ones take this message (routes are at most 50, so a bit
    // each in a u64).
    let mut wanted = 0u64;
    for (i, r) in reading.iter().enumerate().take(64) {
        if r.filter.matches(topic) && !(p.retain && r.retain == RetainHandling::SkipRetained) {
            wanted |= 1 << i;
        }
    }
    let matching = wanted.count_ones() as usize;
    let qos1 = p.qos != QoS::AtMostOnce;
    if matching == 0 {
        // Nothing wants it (a leftover subscription of a persistent session, or a skipped
        // retained message): acknowledge so it does not clog the session.
        if qos1 {
            let mut ack = Publish::new("", QoS::AtLeastOnce, Vec::new());
            ack.pkid = p.pkid;
            let _ = client.try_ack(&ack);
        }
        return;
    }
    // Too large for the side it came from or the side it goes to: counted, reported, then
    // acknowledged, so that it does not hold up every message behind it.
    let (own, other) = match side {
        Side::Source => (&shared.config.source, &shared.config.sink),
        Side::Sink => (&shared.config.sink, &shared.config.source),
    };
    let size = p.payload.len();
    let over = if size > other.max_message_bytes {
        Some((side.other(), other.max_message_bytes))
    } else if size > own.max_message_bytes {
        Some((side, own.max_message_bytes))
    } else {
        None
    };
    if let Some((limited, limit)) = over {
        let route = wanted.trailing_zeros() as usize;
        let route = reading.get(route).map_or("", |r| r.name.as_str());
        shared.report_dropped(dir, DropReason::TooLarge, |count| {
            format!(
                "route {route} ({}): a message of {size} bytes is over the {}'s maxMessageBytes ({limit}); dropped and acknowledged ({count} so far)",
                direction_name(dir),
                limited.as_str()
            )
        });
        if qos1 {
            let mut ack = Publish::new("", QoS::AtLeastOnce, Vec::new());
            ack.pkid = p.pkid;
            let _ = client.try_ack(&ack);
        }
        return;
    }
    let origin = qos1.then(|| {
        Arc::new(Origin {
            client: client.clone(),
            pkid: p.pkid,
            remaining: AtomicUsize::new(matching),
        })
    });
    for (i, route) in reading.iter().enumerate().take(64) {
        if wanted & (1 << i) == 0 {
            continue;
        }
        if route.template.is_identity() {
            destination.clear();
            destination.push_str(topic);
        } else {
            route.template.render_into(topic, destination);
        }
        let qos = if qos1 && route.qos == 1 {
            QoS::AtLeastOnce
        } else {
            QoS::AtMostOnce
        };
        let retain = p.retain && route.retain == RetainHandling::Preserve;
        backlog.add(size);
        let fwd = Forward {
            topic: destination.clone(),
            payload: p.payload.clone(),
            qos,
            retain,
            origin: origin.clone(),
            received,
        };
        if forward.send(fwd).is_err() {
            backlog.take(size);
        }
    }
}

async fn publisher_task(
    shared: Arc<Shared>,
    side: Side,
    mut events: mpsc::UnboundedReceiver<ConnEvent>,
    mut forwards: mpsc::UnboundedReceiver<Forward>,
    backlog: Arc<Backlog>,
    mut drain: watch::Receiver<bool>,
) {
    let mut outbox: Outbox<Forward> = Outbox::new(shared.config.window);
    // Grows on first use: an idle relay should not hold it (seen with massif).
    let mut batch = Vec::new();
    let mut draining = false;
    let mut client: Option<AsyncClient> = None;
    // Messages published on this side travel in this direction.
    let dir = match side {
        Side::Sink => 0,
        Side::Source => 1,
    };
    // A message the broker refuses by closing the connection (see `refusal`).
    let mut refusal = RefusalWatch::default();
    let mut connected_at: Option<Instant> = None;
    let mut acknowledged = false;
    loop {
        // Once draining, stop as soon as nothing is left in flight.
        if draining && outbox.is_empty() && backlog.len() == 0 {
            break;
        }
        tokio::select! {
            ev = events.recv() => {
                let Some(ev) = ev else { break };
                match ev {
                    ConnEvent::Connected { client: c } => {
                        outbox.on_disconnect();
                        outbox.isolate(refusal.isolated());
                        client = Some(c);
                        connected_at = Some(Instant::now());
                        acknowledged = false;
                        pump(&mut outbox, client.as_ref(), &mut batch).await;
                    }
                    ConnEvent::Outgoing(pkid) => {
                        if let Some(origin) = outbox.on_outgoing(pkid).and_then(|done| complete(&shared, dir, done)) {
                            acknowledge(origin).await;
                        }
                    }
                    ConnEvent::PubAck(pkid) => {
                        if let Some(origin) = outbox.on_puback(pkid).and_then(|done| complete(&shared, dir, done)) {
                            acknowledge(origin).await;
                        }
                        acknowledged = true;
                        if refusal.isolated() {
                            // The suspect, sent alone, went through.
                            outbox.isolate(false);
                            refusal.on_progress();
                        }
                        pump(&mut outbox, client.as_ref(), &mut batch).await;
                    }
                    ConnEvent::Disconnected => {
                        client = None;
                        let quick = connected_at.take().is_some_and(|t| t.elapsed() < REFUSAL_WINDOW);
                        let oldest = outbox.oldest_written();
                        let verdict = refusal.on_connection_end(oldest, acknowledged, quick);
                        tracing::debug!(bridge = %shared.name, side = side.as_str(), ?oldest, acknowledged, quick, ?verdict, "connection ended");
                        outbox.on_disconnect();
                        if let Verdict::Drop(seq) = verdict
                            && let Some(done) = outbox.remove_oldest(seq)
                            && let Some(origin) = refused(&shared, side, dir, done)
                        {
                            acknowledge(origin).await;
                        }
                    }
                }
            }
            fwd = forwards.recv(), if outbox.has_room() => {
                let Some(fwd) = fwd else { break };
                backlog.take(fwd.payload.len());
                let qos1 = fwd.qos != QoS::AtMostOnce;
                outbox.push(fwd, qos1);
                // Take whatever else is already waiting before publishing.
                while outbox.has_room() {
                    match forwards.try_recv() {
                        Ok(f) => {
                            backlog.take(f.payload.len());
                            let q = f.qos != QoS::AtMostOnce;
                            outbox.push(f, q);
                        }
                        Err(_) => break,
                    }
                }
                pump(&mut outbox, client.as_ref(), &mut batch).await;
            }
            changed = drain.changed(), if !draining => {
                // A dropped handle also means stop.
                draining = changed.is_err() || *drain.borrow();
            }
        }
    }
    // Unfinished messages are not acknowledged to their source.
    let left = outbox.drain_all().len();
    if left > 0 {
        tracing::info!(bridge = %shared.name, side = side.as_str(), left, "relay stopped with messages in flight; they will be redelivered");
    }
}

/// Subscribes the filters this side reads (at most 8 per SUBSCRIBE for AWS IoT Core) and
/// returns how many SUBACKs to expect.
fn subscribe(shared: &Shared, side: Side, endpoint: &Endpoint, client: &AsyncClient) -> usize {
    let mut filters: Vec<(String, QoS)> = Vec::new();
    for r in shared.routes.iter().filter(|r| r.direction == side.reads()) {
        let qos = if r.qos == 1 {
            QoS::AtLeastOnce
        } else {
            QoS::AtMostOnce
        };
        match filters.iter_mut().find(|(f, _)| f == r.filter.as_str()) {
            Some((_, q)) if qos == QoS::AtLeastOnce => *q = qos,
            Some(_) => {}
            None => filters.push((r.filter.as_str().to_owned(), qos)),
        }
    }
    if filters.is_empty() {
        return 0;
    }
    let chunk = if endpoint.aws_iot {
        AWS_FILTERS_PER_SUBSCRIBE
    } else {
        filters.len()
    };
    let mut requests = 0;
    for group in filters.chunks(chunk) {
        let request: Vec<SubscribeFilter> = group
            .iter()
            .map(|(f, q)| SubscribeFilter::new(f.clone(), *q))
            .collect();
        match client.try_subscribe_many(request) {
            Ok(()) => requests += 1,
            Err(e) => {
                tracing::warn!(bridge = %shared.name, side = side.as_str(), error = %e, "subscribe request failed")
            }
        }
    }
    requests
}

/// Hands every sendable message to the connection. `batch` is a reused buffer.
async fn pump(
    outbox: &mut Outbox<Forward>,
    client: Option<&AsyncClient>,
    batch: &mut Vec<(String, QoS, bool, Bytes)>,
) {
    let Some(client) = client else { return };
    batch.clear();
    outbox.for_each_sendable(|f| batch.push((f.topic.clone(), f.qos, f.retain, f.payload.clone())));
    for (topic, qos, retain, payload) in batch.drain(..) {
        // The channel holds more than the window, so this does not wait; if the connection
        // is gone the request is lost and the outbox sends it again after reconnecting.
        let _ = client.publish_bytes(topic, qos, retain, payload).await;
    }
}

/// A message the broker refused (closed the connection each time it was sent, the last times
/// alone): count and report it, and return the original to acknowledge once every copy is done.
fn refused(shared: &Shared, side: Side, dir: usize, done: Forward) -> Option<Arc<Origin>> {
    shared.report_dropped(dir, DropReason::Refused, |count| {
        format!(
            "a message ({}) of {} bytes to topic {} was refused: the {} closed the connection every time it was sent ({} times, the last {} alone, nothing acknowledged); dropped and acknowledged ({count} so far). Check that the broker lets this client publish there",
            direction_name(dir),
            done.payload.len(),
            done.topic,
            side.as_str(),
            2 * REFUSAL_STRIKES,
            REFUSAL_STRIKES,
        )
    });
    done.origin
        .filter(|origin| origin.remaining.fetch_sub(1, Ordering::AcqRel) == 1)
}

/// A message reached its destination: count it, and return the original to acknowledge once
/// every copy has arrived.
fn complete(shared: &Shared, dir: usize, done: Forward) -> Option<Arc<Origin>> {
    let stats = &shared.stats;
    match dir {
        0 => stats.relayed_in.fetch_add(1, Ordering::Relaxed),
        _ => stats.relayed_out.fetch_add(1, Ordering::Relaxed),
    };
    stats
        .bytes
        .fetch_add(done.payload.len() as u64, Ordering::Relaxed);
    stats.last_message_ms.store(now_ms(), Ordering::Relaxed);
    if let Some(m) = &shared.metrics {
        m.messages[dir].inc();
        m.bytes[dir].inc_by(done.payload.len() as u64);
        m.latency.observe(done.received.elapsed().as_secs_f64());
    }
    done.origin
        .filter(|origin| origin.remaining.fetch_sub(1, Ordering::AcqRel) == 1)
}

/// Acknowledges a message to the broker it came from. The request queue has room for one
/// acknowledgement per packet id, so this does not wait; if that connection is gone the call
/// fails at once and the broker redelivers the message.
async fn acknowledge(origin: Arc<Origin>) {
    let mut ack = Publish::new("", QoS::AtLeastOnce, Vec::new());
    ack.pkid = origin.pkid;
    let _ = origin.client.ack(&ack).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_query_strings_and_passwords() {
        let mut ep = Endpoint::new("wss://h/mqtt", "c");
        ep.password = Some(super::super::config::Secret::new("hunter2"));
        let text = "failed: wss://h/mqtt?X-Amz-Signature=abc&X-Amz-Security-Token=xyz (401) password hunter2";
        let r = redact(text, &ep);
        assert!(
            !r.contains("abc") && !r.contains("xyz") && !r.contains("hunter2"),
            "{r}"
        );
        assert!(r.contains("wss://h/mqtt?<redacted>"), "{r}");
        assert!(r.contains("(401)"), "{r}");
    }

    #[tokio::test]
    async fn metric_handles_of_one_family_do_not_deadlock() {
        let m = Metrics::new();
        let r = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            RelayMetrics::new(&m, "ns/b")
        })
        .await;
        let r = r.expect("no deadlock");
        r.messages[1].inc();
        assert!(m.encode().contains(
            "iot_operator_bridge_messages_relayed_total{bridge=\"ns/b\",direction=\"out\"} 1"
        ));
    }

    #[test]
    fn options_from_urls() {
        let ep = Endpoint::new("mqtt://broker:1884", "c1");
        let o = mqtt_options(&ep, &ep.url).unwrap();
        assert_eq!(o.broker_address(), ("broker".to_owned(), 1884));
        let o = mqtt_options(&ep, "ws://broker:8080/mqtt").unwrap();
        assert_eq!(
            o.broker_address(),
            ("ws://broker:8080/mqtt".to_owned(), 8080)
        );
        assert!(mqtt_options(&ep, "http://x").is_err());
    }
}
