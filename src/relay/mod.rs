//! The relay engine: takes plain configuration, holds the MQTT connections, reports plain
//! state. No Kubernetes, AWS SDK or metrics-library types (`tests/layers.rs` checks).
//!
//! A relay runs four tasks, two per side:
//! - [`connection`]: polls the side's event loop, reconnects, subscribes, and hands each
//!   message it reads to the [`routing`] of that side, which forwards it to the other side's
//!   publisher (or drops it, reported, when a side cannot take it);
//! - [`publisher`]: publishes what it is forwarded, at most `window` at a time ([`outbox`]),
//!   and acknowledges each original to its source once every copy has arrived.
//!
//! A sink that a relay only writes to, or a source it only reads, can be one connection that
//! several relays share ([`shared`], through a [`RelayManager`]): on a sink each relay keeps its
//! own publisher, and the connection hands each one the progress of its own publishes; on a
//! source each keeps its own routes, and the connection routes every message through them all.
//!
//! Between the two sides a [`backlog`] bounds what waits: above it the reading side stops
//! reading. [`status`] is what the relay reports; [`options`] turns an endpoint into rumqttc
//! options; [`refusal`] spots a message a broker refuses by closing the connection.

pub mod backlog;
pub mod config;
mod connection;
mod key;
pub mod manager;
pub mod mqtt;
pub mod options;
pub mod outbox;
mod peers;
mod publisher;
mod queue;
pub mod refusal;
mod routing;
pub mod session;
mod shared;
pub mod status;
pub mod tls;
mod wire;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

pub use crate::vocab::Secret;
pub use config::{Endpoint, Protocol, RelayConfig, RouteConfig, SignError, SignedUrl, UrlSigner};
pub use key::ConnectionKey;
pub use manager::{RelayManager, subscribed};
pub use options::{OptionsError, mqtt_options, redact};
pub use shared::ConnectionPool;
pub use status::{
    DropReason, Dropped, ObserverSource, RelayError, RelayErrorKind, RelayObserver, RelayStats,
    RelayStatus, SessionEnd, Side, SideState, Stall,
};

use backlog::Backlog;
use connection::{Connection, Routing};
use peers::Peers;
use publisher::Publisher;
use routing::Router;
use status::Reporter;

/// What the four tasks of one relay share.
struct Context {
    config: RelayConfig,
    /// Set once the relay stops taking new messages.
    draining: Arc<AtomicBool>,
    report: Reporter,
    /// Whether source and sink resolve to one address (see [`routing::one_address`]): looked
    /// up once, for the first echo guard that needs it.
    one_address: OnceLock<Arc<AtomicBool>>,
}

impl Context {
    /// How long to wait before reconnect attempt number `attempt` (0-based).
    fn reconnect_delay(&self, attempt: u32) -> Duration {
        crate::backoff::delay(
            self.config.reconnect_min,
            self.config.reconnect_max,
            attempt,
        )
    }
}

/// A running relay.
pub struct RelayHandle {
    draining: Arc<AtomicBool>,
    drain: watch::Sender<bool>,
    stop: watch::Sender<bool>,
    status: watch::Receiver<RelayStatus>,
    stats: Arc<RelayStats>,
    /// Stopped last: they hold the connections the publishers' acknowledgements go through.
    connections: Vec<JoinHandle<()>>,
    /// Waited for while draining.
    publishers: Vec<JoinHandle<()>>,
    drain_timeout: Duration,
    retire: watch::Sender<bool>,
    /// One message from each side with shared subscriptions once it has left them.
    retired: mpsc::UnboundedReceiver<()>,
    /// How many sides read through shared subscriptions (0: retiring is stopping).
    shared_sides: usize,
    /// The relay's places on connections it shares with other relays; left last.
    shared: Vec<shared::Membership>,
    /// Its own connections with a kept session, which retiring may end.
    sessions: Vec<Endpoint>,
    /// Told how ending them came out.
    observer: Option<Arc<dyn RelayObserver>>,
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
        let publishers = futures::future::join_all(std::mem::take(&mut self.publishers));
        if tokio::time::timeout(self.drain_timeout, publishers)
            .await
            .is_err()
        {
            tracing::warn!(
                "relay did not drain in time; unacknowledged messages will be redelivered"
            );
        }
        let _ = self.stop.send(true);
        for t in std::mem::take(&mut self.connections) {
            let _ = t.await;
        }
        self.shared.clear();
    }

    /// Stops for good: first leaves the shared subscriptions on both sides (so the broker
    /// hands their messages to the group's other members, instead of queueing them for a
    /// session that will not come back), relaying what arrives meanwhile, then drains and
    /// disconnects as [`RelayHandle::stop`]. A side that is not connected cannot leave; after
    /// the drain timeout the relay stops anyway.
    ///
    /// With `end_sessions` ([`RelayConfig::end_sessions`]), returns the kept sessions of its
    /// own connections, to be ended (see [`session::end_session`]); a connection it shared ends
    /// its session itself once the last relay on it has left.
    pub async fn retire(mut self, end_sessions: bool) -> session::KeptSessions {
        for m in &mut self.shared {
            m.ends_session = end_sessions;
        }
        let sessions = session::KeptSessions {
            endpoints: if end_sessions {
                std::mem::take(&mut self.sessions)
            } else {
                Vec::new()
            },
            observer: self.observer.clone(),
        };
        if self.shared_sides == 0 {
            self.stop().await;
            return sessions;
        }
        let _ = self.retire.send(true);
        let sides = self.shared_sides;
        let left = async {
            for _ in 0..sides {
                if self.retired.recv().await.is_none() {
                    break;
                }
            }
        };
        if tokio::time::timeout(self.drain_timeout, left)
            .await
            .is_err()
        {
            tracing::warn!("relay could not leave its shared subscriptions in time");
        }
        self.stop().await;
        sessions
    }

    /// Stops at once, without draining, and returns when every task is gone (its connections
    /// closed). Unacknowledged messages are redelivered to whoever connects next.
    pub async fn abort(mut self) {
        let mut tasks = std::mem::take(&mut self.publishers);
        tasks.append(&mut self.connections);
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
        self.shared.clear();
    }
}

impl Drop for RelayHandle {
    fn drop(&mut self) {
        for t in self.publishers.iter().chain(&self.connections) {
            t.abort();
        }
    }
}

/// Starts a relay. It runs until [`RelayHandle::stop`]. `observer` hears what it does (for
/// metrics).
pub fn start(config: RelayConfig, observer: Option<Arc<dyn RelayObserver>>) -> RelayHandle {
    start_in(config, observer, None)
}

/// Looks for a stall every [`status::stall_check_interval`] until the relay stops.
async fn watch_stalls(ctx: Arc<Context>, mut stop: watch::Receiver<bool>) {
    let after = ctx.config.stall_after;
    let mut tick = tokio::time::interval(status::stall_check_interval(after));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            _ = tick.tick() => ctx.report.check_stall(after),
        }
    }
}

/// The span that names a relay task's log lines: the bridge (`namespace/name`, `#<i>` for
/// connection i > 0) and the side. Events name it as their parent; it is never entered.
fn task_span(task: Task, ctx: &Context, side: Side) -> tracing::Span {
    // A span's name is fixed where it is made: one macro call per task.
    match task {
        Task::Publisher => {
            tracing::info_span!("publisher", bridge = %ctx.report.name, side = side.as_str())
        }
        Task::Connection => {
            tracing::info_span!("connection", bridge = %ctx.report.name, side = side.as_str())
        }
    }
}

/// The tasks of one side of a relay.
#[derive(Clone, Copy)]
enum Task {
    Connection,
    Publisher,
}

/// Starts a relay as [`start`]; with a `pool`, a sink it only writes to, or a source it only
/// reads (MQTT 3.1.1, unsigned), is shared with the pool's other relays that name the same
/// broker, client id and credentials.
pub fn start_in(
    config: RelayConfig,
    observer: Option<Arc<dyn RelayObserver>>,
    pool: Option<&ConnectionPool>,
) -> RelayHandle {
    let stats = Arc::new(RelayStats::default());
    let (status_tx, status_rx) = watch::channel(RelayStatus::starting());
    let draining = Arc::new(AtomicBool::new(false));
    let (drain_tx, drain_rx) = watch::channel(false);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (retire_tx, retire_rx) = watch::channel(false);
    let (retired_tx, retired_rx) = mpsc::unbounded_channel();
    let drain_timeout = config.drain_timeout;
    let shared_sides = [Side::Source, Side::Sink]
        .into_iter()
        .filter(|side| config.reading(*side).any(|r| r.share.is_some()))
        .count();

    // A side that no route writes to never publishes: no packet-id table for it.
    let mut source = config.source.clone();
    let mut sink = config.sink.clone();
    if !config.writes(Side::Source) {
        source.window = 0;
    }
    if !config.writes(Side::Sink) {
        sink.window = 0;
    }
    let ctx = Arc::new(Context {
        report: Reporter {
            name: config.name.clone(),
            stats: stats.clone(),
            observer,
            status: status_tx,
        },
        config,
        draining: draining.clone(),
        one_address: OnceLock::new(),
    });

    // What each side reads goes to the other side's publisher, through a bounded backlog.
    let (to_source, for_source) = queue::queue();
    let (to_sink, for_sink) = queue::queue();
    let (source_events, source_events_rx) = mpsc::unbounded_channel();
    let (sink_events, sink_events_rx) = mpsc::unbounded_channel();
    let backlog_to_source = Arc::new(Backlog::default());
    let backlog_to_sink = Arc::new(Backlog::default());
    let mut connections = Vec::new();
    let mut shared = Vec::new();
    // Each side's place on a shared connection, if it takes one.
    let source_shared = pool.and_then(|pool| Some((pool, shared::Key::of_source(&ctx.config)?)));
    let sink_shared = pool.and_then(|pool| Some((pool, shared::Key::of_sink(&ctx.config)?)));
    // Own connections with a kept session, which retiring may end.
    let sessions: Vec<Endpoint> = [
        (Side::Source, source_shared.is_none()),
        (Side::Sink, sink_shared.is_none()),
    ]
    .into_iter()
    .map(|(side, own)| (ctx.config.endpoint(side), own))
    .filter(|(e, own)| *own && !e.clean_session)
    .map(|(e, _)| e.clone())
    .collect();
    let session_observer = ctx.report.observer.clone();
    let source_router = Router::new(&ctx, Side::Source, to_sink, backlog_to_sink.clone());
    match source_shared {
        Some((pool, key)) => {
            shared.push(pool.join(key, source, ctx.clone(), source_events, Some(source_router)))
        }
        None => connections.push(tokio::spawn(
            Connection {
                ctx: ctx.clone(),
                side: Side::Source,
                endpoint: source,
                peers: Peers::Own(source_events),
                routing: Routing::Own(source_router),
                stop: stop_rx.clone(),
                retire: retire_rx.clone(),
                retired: retired_tx.clone(),
                span: task_span(Task::Connection, &ctx, Side::Source),
            }
            .run(),
        )),
    }
    if !ctx.config.stall_after.is_zero() {
        connections.push(tokio::spawn(watch_stalls(ctx.clone(), stop_rx.clone())));
    }
    match sink_shared {
        Some((pool, key)) => shared.push(pool.join(key, sink, ctx.clone(), sink_events, None)),
        None => connections.push(tokio::spawn(
            Connection {
                ctx: ctx.clone(),
                side: Side::Sink,
                endpoint: sink,
                peers: Peers::Own(sink_events),
                routing: Routing::Own(Router::new(
                    &ctx,
                    Side::Sink,
                    to_source,
                    backlog_to_source.clone(),
                )),
                stop: stop_rx,
                retire: retire_rx,
                retired: retired_tx,
                span: task_span(Task::Connection, &ctx, Side::Sink),
            }
            .run(),
        )),
    }
    let publishers = vec![
        tokio::spawn(
            Publisher {
                span: task_span(Task::Publisher, &ctx, Side::Source),
                ctx: ctx.clone(),
                side: Side::Source,
                events: source_events_rx,
                forwards: for_source,
                backlog: backlog_to_source,
                drain: drain_rx.clone(),
            }
            .run(),
        ),
        tokio::spawn(
            Publisher {
                span: task_span(Task::Publisher, &ctx, Side::Sink),
                ctx,
                side: Side::Sink,
                events: sink_events_rx,
                forwards: for_sink,
                backlog: backlog_to_sink,
                drain: drain_rx,
            }
            .run(),
        ),
    ];
    RelayHandle {
        draining,
        drain: drain_tx,
        stop: stop_tx,
        status: status_rx,
        stats,
        connections,
        publishers,
        drain_timeout,
        retire: retire_tx,
        retired: retired_rx,
        shared_sides,
        shared,
        sessions,
        observer: session_observer,
    }
}
