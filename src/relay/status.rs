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
pub fn wall_clock_ms() -> i64 {
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
}
