//! One side's publisher: owns the side's [`Outbox`], publishes what the other side's router
//! forwards (at most `window` at a time), matches PUBACKs, and on completion acknowledges the
//! original message to the broker it came from (manual acks). A QoS 1 message is therefore
//! acknowledged to its source only after the destination broker has it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::QoS;
use tokio::sync::{mpsc, watch};

use super::Context;
use super::backlog::Backlog;
use super::mqtt::{Client, ToSend};
use super::outbox::Outbox;
use super::peers::{ConnEvent, Progress};
use super::queue;
use super::refusal::{RefusalWatch, STRIKES as REFUSAL_STRIKES, Verdict};
use super::routing::Forward;
use super::status::{DropReason, Side, wall_clock_ms};

/// A connection that ends this soon after it started, with nothing acknowledged, counts
/// against the oldest message written on it (a broker refusing a publish closes at once).
const REFUSAL_WINDOW: Duration = Duration::from_secs(10);

/// Connection events handled in one go.
const EVENT_BATCH: usize = 64;

/// One side's publisher.
pub(super) struct Publisher {
    pub ctx: Arc<Context>,
    pub side: Side,
    pub events: mpsc::UnboundedReceiver<ConnEvent>,
    pub forwards: queue::Receiver<Forward>,
    pub backlog: Arc<Backlog>,
    pub drain: watch::Receiver<bool>,
    /// Names the bridge and side on every log line (as their parent; see `Connection::span`).
    pub span: tracing::Span,
}

/// What the publisher knows of its side's current connection.
#[derive(Default)]
struct Link {
    client: Option<Client>,
    connected_at: Option<Instant>,
    /// Something was acknowledged on this connection.
    acknowledged: bool,
}

impl Publisher {
    /// Publishes until the relay stops, or, once draining, until nothing is left in flight.
    pub async fn run(mut self) {
        let ctx = self.ctx.clone();
        let side = self.side;
        let mut outbox: Outbox<Forward> = Outbox::new(ctx.config.window);
        // Grows on first use: an idle relay should not hold it (seen with massif).
        let mut batch = Vec::new();
        let mut events = Vec::new();
        // Forwarded messages taken from the queue and not yet in the outbox, the next one last.
        let mut staged = Vec::new();
        let mut draining = false;
        let mut link = Link::default();
        // A message the broker refuses by closing the connection (see `refusal`).
        let mut refusal = RefusalWatch::default();
        // Made once, not per event: a `changed()` future per loop registered and dropped a
        // waiter under the watch's lock for every message (8% of the relay's instructions
        // under callgrind).
        let mut drain = self.drain.clone();
        let drain_started = async move {
            let _ = drain.wait_for(|d| *d).await;
        };
        tokio::pin!(drain_started);
        let direction = side.writes();
        loop {
            if draining && outbox.is_empty() && self.backlog.is_empty() {
                break;
            }
            // When the destination took a message (or a new connection to it was made) in this
            // turn, if it did: restarts the clock of messages waiting for it.
            let mut moved: Option<i64> = None;
            if !staged.is_empty() && outbox.has_room() {
                self.intake_staged(&mut outbox, &mut staged);
                pump(&mut outbox, link.client.as_ref(), &mut batch).await;
            }
            tokio::select! {
                // Every event already queued is handled before publishing again (one pump, one
                // batch of requests, for many acknowledgements).
                n = self.events.recv_many(&mut events, EVENT_BATCH) => {
                    if n == 0 {
                        break;
                    }
                    let mut more = false;
                    for ev in events.drain(..) {
                        match ev {
                            ConnEvent::Connected { client } => {
                                outbox.on_disconnect();
                                outbox.isolate(refusal.isolated());
                                link = Link {
                                    client: Some(client),
                                    connected_at: Some(Instant::now()),
                                    acknowledged: false,
                                };
                                more = true;
                                moved = Some(wall_clock_ms());
                            }
                            ConnEvent::Progress(steps) => {
                                let (acked, settled) = self.on_progress(steps, &mut outbox, &mut link, &mut refusal);
                                more |= acked;
                                moved = settled.or(moved);
                            }
                            ConnEvent::Disconnected { suspect } => {
                                link.client = None;
                                let quick = link.connected_at.take().is_some_and(|t| t.elapsed() < REFUSAL_WINDOW);
                                let oldest = outbox.oldest_written();
                                // On a shared connection, an end that another relay's publish
                                // may have caused neither strikes nor clears this side's suspect.
                                let verdict = if suspect {
                                    refusal.on_connection_end(oldest, link.acknowledged, quick)
                                } else {
                                    refusal.current()
                                };
                                tracing::debug!(parent: &self.span, ?oldest, acknowledged = link.acknowledged, quick, ?verdict, "connection ended");
                                outbox.on_disconnect();
                                if let Verdict::Drop(seq) = verdict
                                    && let Some(done) = outbox.remove_oldest(seq)
                                {
                                    let how = format!(
                                        "the {} closed the connection every time it was sent ({} times, the last {} alone, nothing acknowledged)",
                                        side.as_str(),
                                        2 * REFUSAL_STRIKES,
                                        REFUSAL_STRIKES,
                                    );
                                    self.refused(done, &how);
                                }
                            }
                        }
                    }
                    if more {
                        pump(&mut outbox, link.client.as_ref(), &mut batch).await;
                    }
                }
                // Everything waiting is taken at once; what the outbox has no room for yet
                // stays staged (and counted in the backlog).
                open = self.forwards.take(&mut staged), if outbox.has_room() && staged.is_empty() => {
                    if !open {
                        break;
                    }
                    staged.reverse();
                    self.intake_staged(&mut outbox, &mut staged);
                    pump(&mut outbox, link.client.as_ref(), &mut batch).await;
                }
                // A dropped handle also means stop.
                () = &mut drain_started, if !draining => draining = true,
            }
            let waiting = !outbox.is_empty() || !staged.is_empty();
            ctx.report
                .stats
                .note_waiting(direction, waiting, moved.is_some(), || {
                    moved.unwrap_or_else(wall_clock_ms)
                });
        }
        ctx.report
            .stats
            .note_waiting(direction, false, false, wall_clock_ms);
        // Unfinished messages are not acknowledged to their source.
        let left = outbox.drain_all().len();
        if left > 0 {
            tracing::info!(
                parent: &self.span, left,
                "relay stopped with messages in flight; they will be redelivered"
            );
        }
    }

    /// Applies one batch of progress to the outbox: delivered and refused messages are
    /// counted and their originals acknowledged. Returns whether something was acknowledged
    /// (room to publish more), and the wall-clock time if a message was settled (delivered or
    /// refused).
    fn on_progress(
        &self,
        steps: Vec<Progress>,
        outbox: &mut Outbox<Forward>,
        link: &mut Link,
        refusal: &mut RefusalWatch,
    ) -> (bool, Option<i64>) {
        // The clocks are read once for the batch.
        let now = (Instant::now(), wall_clock_ms());
        let mut acked = false;
        let mut settled = false;
        for step in steps {
            match step {
                Progress::Sent { pkid, .. } => {
                    if let Some(done) = outbox.on_outgoing(pkid) {
                        self.delivered(done, now);
                        settled = true;
                    }
                }
                Progress::Acked { pkid, refused, .. } => {
                    match (outbox.on_puback(pkid), refused) {
                        (Some(done), None) => self.delivered(done, now),
                        (Some(done), Some(reason)) => {
                            let how = format!("the {} answered {reason}", self.side.as_str());
                            self.refused(done, &how);
                        }
                        (None, _) => {}
                    }
                    settled = true;
                    link.acknowledged = true;
                    if refusal.isolated() {
                        // The suspect, sent alone, went through.
                        outbox.isolate(false);
                        refusal.on_progress();
                    }
                    acked = true;
                }
            }
        }
        (acked, settled.then_some(now.1))
    }

    /// Takes staged messages (the next one last) into the outbox while it has room.
    fn intake_staged(&self, outbox: &mut Outbox<Forward>, staged: &mut Vec<Forward>) {
        while outbox.has_room()
            && let Some(fwd) = staged.pop()
        {
            self.intake(outbox, fwd);
        }
    }

    /// Takes a forwarded message into the outbox, unless its MQTT 5 expiry has passed.
    fn intake(&self, outbox: &mut Outbox<Forward>, fwd: Forward) {
        self.backlog.take(fwd.payload.len());
        // Only a message with an MQTT 5 expiry reads the clock.
        let expires = fwd
            .properties
            .as_ref()
            .is_some_and(|p| p.message_expiry_interval.is_some());
        let waited = if expires {
            fwd.received.elapsed()
        } else {
            Duration::ZERO
        };
        if expires && fwd.properties.as_ref().is_some_and(|p| p.expired(waited)) {
            let direction = self.side.writes();
            self.ctx
                .report
                .dropped(direction, DropReason::Expired, |count| {
                    format!(
                        "a message ({}) to topic {} expired after {} s waiting for the {} (its MQTT 5 message expiry); dropped ({count} so far)",
                        direction.as_str(),
                        fwd.topic,
                        waited.as_secs(),
                        self.side.as_str(),
                    )
                });
            fwd.settle();
            return;
        }
        let qos1 = fwd.qos != QoS::AtMostOnce;
        outbox.push(fwd, qos1);
    }

    /// A message reached its destination: count it, and acknowledge the original once every
    /// copy has arrived.
    fn delivered(&self, done: Forward, (now, wall_ms): (Instant, i64)) {
        self.ctx.report.relayed(
            self.side.writes(),
            done.payload.len(),
            now.saturating_duration_since(done.received),
            wall_ms,
        );
        done.settle();
    }

    /// A message the broker refused (`how`: with which reason code, or by closing the
    /// connection each time): count and report it, and acknowledge the original once every
    /// copy is done.
    fn refused(&self, done: Forward, how: &str) {
        let direction = self.side.writes();
        self.ctx
            .report
            .dropped(direction, DropReason::Refused, |count| {
                format!(
                    "a message ({}) of {} bytes to topic {} was refused: {how}; dropped and acknowledged ({count} so far). Check that the broker lets this client publish there",
                    direction.as_str(),
                    done.payload.len(),
                    done.topic,
                )
            });
        done.settle();
    }
}

/// Hands every sendable message to the connection. `batch` is a reused buffer.
async fn pump(outbox: &mut Outbox<Forward>, client: Option<&Client>, batch: &mut Vec<ToSend>) {
    let Some(client) = client else { return };
    batch.clear();
    outbox.for_each_sendable(|f| {
        batch.push(ToSend {
            topic: f.topic.clone(),
            qos: f.qos,
            retain: f.retain,
            payload: f.payload.clone(),
            properties: f.properties.clone(),
            read_at: f.received,
        })
    });
    // The channel holds more than the window, so this does not wait; if the connection is gone
    // the requests are lost and the outbox sends them again after reconnecting.
    client.publish_all(batch.drain(..)).await;
}
