//! What a relay reports: connection state per side, counters, dropped messages, and the
//! [`RelayObserver`] through which the process's metrics hear of them.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use crate::vocab::Direction;

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
    pub fn other(self) -> Side {
        match self {
            Side::Source => Side::Sink,
            Side::Sink => Side::Source,
        }
    }

    /// The direction of the messages this side reads (from its broker).
    pub fn reads(self) -> Direction {
        match self {
            Side::Source => Direction::In,
            Side::Sink => Direction::Out,
        }
    }

    /// The direction of the messages this side publishes (to its broker).
    pub fn writes(self) -> Direction {
        self.other().reads()
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
    pub last_error: Option<RelayError>,
    /// The last message dropped because a side could not take it.
    pub last_dropped: Option<Dropped>,
    /// Set while both sides are connected but a destination has taken none of the messages
    /// waiting for it for the relay's `stall_after`.
    pub stalled: Option<Stall>,
}

impl RelayStatus {
    /// Both sides connecting, nothing told yet.
    pub fn starting() -> Self {
        Self {
            source: SideState::Connecting,
            sink: SideState::Connecting,
            last_error: None,
            last_dropped: None,
            stalled: None,
        }
    }
}

/// Messages wait for a connected destination that takes none of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stall {
    /// Which messages wait: `in` for the sink, `out` for the source.
    pub direction: Direction,
    /// Milliseconds since the epoch since when none was taken.
    pub since_ms: i64,
}

impl Stall {
    /// The side that takes nothing.
    pub fn side(&self) -> Side {
        match self.direction {
            Direction::In => Side::Sink,
            Direction::Out => Side::Source,
        }
    }

    /// For status and Events: the side, the direction and since when (a time, not a
    /// duration, so that it does not change while the stall lasts).
    pub fn message(&self) -> String {
        let since = jiff::Timestamp::from_millisecond(self.since_ms)
            .map(|t| t.round(jiff::Unit::Second).unwrap_or(t).to_string())
            .unwrap_or_default();
        format!(
            "the {} is connected but has taken none of the messages waiting for it (direction \
             {}) since {since}; they are kept and sent on once it takes them",
            self.side().as_str(),
            self.direction.as_str(),
        )
    }
}

/// The stall of a relay in `status` with `stats` at wall-clock time `now_ms`, if any: the
/// direction whose messages have waited longest, when that is at least `after` (zero: never)
/// and both sides are connected (a side that is down is told as such).
pub fn stall(
    status: &RelayStatus,
    stats: &RelayStats,
    now_ms: i64,
    after: Duration,
) -> Option<Stall> {
    let connected = status.source == SideState::Connected && status.sink == SideState::Connected;
    if after.is_zero() || !connected {
        return None;
    }
    [Direction::In, Direction::Out]
        .into_iter()
        .filter_map(|direction| {
            let since_ms = stats.waiting_since(direction)?;
            (now_ms.saturating_sub(since_ms) >= after.as_millis() as i64).then_some(Stall {
                direction,
                since_ms,
            })
        })
        .min_by_key(|s| s.since_ms)
}

/// How often a relay looks for a stall: a quarter of `after`, within 1 to 5 seconds.
pub(super) fn stall_check_interval(after: Duration) -> Duration {
    (after / 4).clamp(Duration::from_secs(1), Duration::from_secs(5))
}

/// What went wrong, for a caller to act on without reading the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayErrorKind {
    /// A side could not connect, or lost its connection.
    Connection,
    /// A broker refused topic filters of a subscribe; the connection stays up.
    SubscriptionRefused,
}

/// An error the relay reports in its status, without secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayError {
    pub kind: RelayErrorKind,
    pub message: String,
}

impl std::fmt::Display for RelayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Why the relay gave up on a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Over a side's `maxMessageBytes`.
    TooLarge,
    /// The broker refused it: closed the connection every time it was sent (MQTT 3.1.1), or
    /// answered with a failure reason code (MQTT 5).
    Refused,
    /// Its MQTT 5 message expiry passed before it could be sent.
    Expired,
    /// It is a copy this relay published, read back: source and sink are one broker (under two
    /// names) and a route reads its own output. Dropped so that a loop makes one copy, never a
    /// storm.
    Loop,
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
    /// Dropped for any reason.
    pub dropped: AtomicU64,
    /// Dropped because a side could not take them.
    pub too_large: AtomicU64,
    /// Dropped because the broker refused them (closed the connection on each).
    pub refused: AtomicU64,
    /// Dropped because their MQTT 5 message expiry passed in the relay.
    pub expired: AtomicU64,
    /// Dropped because they were this relay's own copies read back (a loop).
    pub looped: AtomicU64,
    /// Times a side stopped reading until the other side caught up (backpressure).
    pub paused: AtomicU64,
    pub bytes: AtomicU64,
    /// Milliseconds since the epoch of the last relayed message (0: none yet).
    pub last_message_ms: AtomicI64,
    pub reconnects: AtomicU64,
    /// By direction (in, out): milliseconds since the epoch since when messages have waited
    /// for the side that writes them with none of them delivered; 0 while none waits. See
    /// [`RelayStats::waiting_since`].
    waiting_since_ms: [AtomicI64; 2],
}

impl RelayStats {
    pub fn relayed(&self) -> u64 {
        self.relayed_in.load(Ordering::Relaxed) + self.relayed_out.load(Ordering::Relaxed)
    }

    /// Since when (milliseconds since the epoch) messages of `direction` have waited for their
    /// destination without one of them delivered, dropped or expired: `None` while none waits
    /// or they move. A destination that is connected but takes nothing (a paused or overloaded
    /// broker) shows here as a time that grows old.
    pub fn waiting_since(&self, direction: Direction) -> Option<i64> {
        match self.waiting_since_ms[slot(direction)].load(Ordering::Relaxed) {
            0 => None,
            ms => Some(ms),
        }
    }

    /// Called by the publisher of `direction`: `waiting`, whether messages wait for it now;
    /// `moved`, whether one was just delivered, dropped or expired; `now` reads the wall clock
    /// (only when the clock starts or restarts).
    pub fn note_waiting(
        &self,
        direction: Direction,
        waiting: bool,
        moved: bool,
        now: impl FnOnce() -> i64,
    ) {
        let clock = &self.waiting_since_ms[slot(direction)];
        let running = clock.load(Ordering::Relaxed) != 0;
        if !waiting {
            if running {
                clock.store(0, Ordering::Relaxed);
            }
        } else if moved || !running {
            clock.store(now().max(1), Ordering::Relaxed);
        }
    }
}

/// Index of `direction` in per-direction arrays.
fn slot(direction: Direction) -> usize {
    match direction {
        Direction::In => 0,
        Direction::Out => 1,
    }
}

/// Hears what one relay does, for metrics. Called on the message path: keep it cheap.
pub trait RelayObserver: Send + Sync {
    /// A message reached its destination `latency` after it was read.
    fn relayed(&self, direction: Direction, bytes: usize, latency: Duration);
    /// The relay gave up on a message.
    fn dropped(&self, direction: Direction, reason: DropReason);
    /// A connection that had been up was made again.
    fn reconnected(&self, side: Side);
    /// A side's connection went up or down.
    fn connected(&self, side: Side, up: bool);
    /// A side's subscribe was answered: the broker refused `filters` of its topic filters.
    fn subscriptions_refused(&self, side: Side, filters: usize);
    /// The relay stalled (`true`) or moves again (`false`); see [`RelayStatus::stalled`].
    fn stalled(&self, on: bool);
    /// The relay retired and the kept session of one of its connections was ended, or not.
    fn session_end(&self, _outcome: SessionEnd) {}
}

/// How ending a retired connection's kept session came out (the metric's `outcome`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// The broker discarded the session.
    Ended,
    /// The broker could not be reached, or refused, in every attempt: the session stays until
    /// it expires.
    Failed,
    /// Not permitted to connect (leadership lapsed): the session stays until it expires.
    NotPermitted,
}

impl SessionEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionEnd::Ended => "ended",
            SessionEnd::Failed => "failed",
            SessionEnd::NotPermitted => "not_permitted",
        }
    }
}

/// Makes the observer of each relay (the process's metrics registry implements it).
pub trait ObserverSource: Send + Sync {
    /// The observer of the relay called `bridge` (`namespace/name`).
    fn observer(&self, bridge: &str) -> Arc<dyn RelayObserver>;
}

/// Where the tasks of one relay report: counters, the status channel, the observer.
pub(super) struct Reporter {
    pub name: String,
    pub stats: Arc<RelayStats>,
    pub observer: Option<Arc<dyn RelayObserver>>,
    pub status: watch::Sender<RelayStatus>,
}

impl Reporter {
    /// Counts a message the relay gave up on and says why in the status (the controller turns
    /// it into a Warning Event). `describe` gets the running count of this kind of drop.
    pub fn dropped(
        &self,
        direction: Direction,
        why: DropReason,
        describe: impl FnOnce(u64) -> String,
    ) {
        self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        let counter = match why {
            DropReason::TooLarge => &self.stats.too_large,
            DropReason::Refused => &self.stats.refused,
            DropReason::Expired => &self.stats.expired,
            DropReason::Loop => &self.stats.looped,
        };
        let count = counter.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(o) = &self.observer {
            o.dropped(direction, why);
        }
        let message = describe(count);
        tracing::warn!(bridge = %self.name, direction = direction.as_str(), reason = ?why, %message, "message dropped");
        self.status
            .send_modify(|s| s.last_dropped = Some(Dropped { message, count }));
    }

    /// Counts a message that reached its destination.
    /// A message reached its destination `latency` after it was read. `at`: the wall clock,
    /// read once for a batch of deliveries ([`wall_clock_ms`]).
    pub fn relayed(&self, direction: Direction, bytes: usize, latency: Duration, at: i64) {
        let stats = &self.stats;
        match direction {
            Direction::In => stats.relayed_in.fetch_add(1, Ordering::Relaxed),
            Direction::Out => stats.relayed_out.fetch_add(1, Ordering::Relaxed),
        };
        stats.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        stats.last_message_ms.store(at, Ordering::Relaxed);
        if let Some(o) = &self.observer {
            o.relayed(direction, bytes, latency);
        }
    }

    /// Counts a reconnect of a connection that had been up.
    pub fn reconnected(&self, side: Side) {
        self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
        if let Some(o) = &self.observer {
            o.reconnected(side);
        }
    }

    /// Records a side's state, and the error that brought it there.
    pub fn state(&self, side: Side, state: SideState, error: Option<String>) {
        if let Some(o) = &self.observer {
            o.connected(side, state == SideState::Connected);
        }
        self.status.send_modify(|s| {
            match side {
                Side::Source => s.source = state,
                Side::Sink => s.sink = state,
            }
            if let Some(message) = error {
                s.last_error = Some(RelayError {
                    kind: RelayErrorKind::Connection,
                    message,
                });
            }
        });
    }

    /// Reports how many topic filters a side's subscribe had refused (0: all granted).
    pub fn subscriptions_refused(&self, side: Side, filters: usize) {
        if let Some(o) = &self.observer {
            o.subscriptions_refused(side, filters);
        }
    }

    /// Looks for a stall (see [`stall`]) and records a change: in the status, for the
    /// observer and in the log.
    pub fn check_stall(&self, after: Duration) {
        let current = self.status.borrow().clone();
        let next = stall(&current, &self.stats, wall_clock_ms(), after);
        if next == current.stalled {
            return;
        }
        match &next {
            Some(s) => tracing::warn!(bridge = %self.name, why = %s.message(), "relay stalled"),
            None => tracing::info!(bridge = %self.name, "relay no longer stalled"),
        }
        if next.is_some() != current.stalled.is_some()
            && let Some(o) = &self.observer
        {
            o.stalled(next.is_some());
        }
        self.status.send_modify(|s| s.stalled = next);
    }

    /// Records a refused subscription, which leaves the connection up.
    pub fn subscription_refused(&self, message: String) {
        self.status.send_modify(|s| {
            s.last_error = Some(RelayError {
                kind: RelayErrorKind::SubscriptionRefused,
                message,
            })
        });
    }
}

/// Milliseconds since the Unix epoch.
pub(super) fn wall_clock_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_waiting_clock_starts_with_the_first_waiting_message_and_restarts_on_progress() {
        let stats = RelayStats::default();
        let d = Direction::In;
        assert_eq!(stats.waiting_since(d), None);
        // Nothing waits: the clock stays off and the wall clock is not read.
        stats.note_waiting(d, false, false, || panic!("clock read"));
        assert_eq!(stats.waiting_since(d), None);
        // Messages wait: the clock starts, and runs on while nothing moves.
        stats.note_waiting(d, true, false, || 1_000);
        stats.note_waiting(d, true, false, || panic!("clock read"));
        assert_eq!(stats.waiting_since(d), Some(1_000));
        // One is delivered while others wait: the clock restarts.
        stats.note_waiting(d, true, true, || 5_000);
        assert_eq!(stats.waiting_since(d), Some(5_000));
        // The other direction has a clock of its own.
        assert_eq!(stats.waiting_since(Direction::Out), None);
        // All delivered: off.
        stats.note_waiting(d, false, true, || 6_000);
        assert_eq!(stats.waiting_since(d), None);
    }

    fn connected() -> RelayStatus {
        RelayStatus {
            source: SideState::Connected,
            sink: SideState::Connected,
            ..RelayStatus::starting()
        }
    }

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn messages_that_wait_the_threshold_for_a_connected_destination_are_a_stall() {
        let stats = RelayStats::default();
        stats.note_waiting(Direction::In, true, false, || 1_000);
        let at = |s: i64| stall(&connected(), &stats, 1_000 + s * 1000, MINUTE);
        assert_eq!(at(59), None);
        let stalled = Stall {
            direction: Direction::In,
            since_ms: 1_000,
        };
        assert_eq!(at(60), Some(stalled));
        assert_eq!(stalled.side(), Side::Sink);
        // The same stall while it lasts.
        assert_eq!(at(600), Some(stalled));
        // The sink takes one: over.
        stats.note_waiting(Direction::In, true, true, || 601_000);
        assert_eq!(at(601), None);
    }

    #[test]
    fn the_direction_that_waited_longest_is_the_stall_and_out_names_the_source() {
        let stats = RelayStats::default();
        stats.note_waiting(Direction::In, true, false, || 100_000);
        stats.note_waiting(Direction::Out, true, false, || 10_000);
        let s = stall(&connected(), &stats, 200_000, MINUTE).expect("stalled");
        assert_eq!((s.direction, s.side()), (Direction::Out, Side::Source));
        assert!(
            s.message().starts_with("the source is connected"),
            "{}",
            s.message()
        );
    }

    #[test]
    fn no_stall_while_a_side_is_down_or_when_disabled() {
        let stats = RelayStats::default();
        stats.note_waiting(Direction::In, true, false, || 1_000);
        // The connection conditions tell a side that is down.
        for down in [
            SideState::Disrupted,
            SideState::Connecting,
            SideState::Stopped,
        ] {
            let status = RelayStatus {
                sink: down,
                ..connected()
            };
            assert_eq!(stall(&status, &stats, 1_000_000, MINUTE), None);
        }
        // `--stall-seconds 0`: never.
        assert_eq!(stall(&connected(), &stats, 1_000_000, Duration::ZERO), None);
    }

    #[test]
    fn a_stall_is_looked_for_often_enough_and_not_too_often() {
        assert_eq!(stall_check_interval(MINUTE), Duration::from_secs(5));
        assert_eq!(
            stall_check_interval(Duration::from_secs(8)),
            Duration::from_secs(2)
        );
        assert_eq!(
            stall_check_interval(Duration::from_secs(2)),
            Duration::from_secs(1)
        );
    }
}
