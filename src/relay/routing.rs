//! Routing: which routes take a message read on one side, under which topic it goes to the
//! other side, and what must happen before the original is acknowledged.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::QoS;

use super::Context;
use super::backlog::Backlog;
use super::config::RouteConfig;
use super::mqtt::{Client, Message, Properties};
use super::queue;
use super::status::{DropReason, Side};
use crate::vocab::RetainHandling;

/// The original QoS 1 message, to acknowledge once every copy has reached its destination.
pub(super) enum Origin {
    /// The only copy (one route took the message): no shared count to keep.
    Alone(Ack),
    /// One of several copies.
    Shared(Arc<SharedOrigin>),
}

/// How to acknowledge an original: the client of the connection it arrived on (acking through
/// a client whose connection is gone fails harmlessly: the broker sends the message again) and
/// its packet id.
pub(super) struct Ack {
    client: Client,
    pkid: u16,
}

impl Ack {
    /// Acknowledges the message to the broker it came from (never waits).
    fn send(&self) {
        self.client.try_ack(self.pkid);
    }
}

/// An original routed to several destinations.
pub(super) struct SharedOrigin {
    ack: Ack,
    remaining: AtomicUsize,
}

impl SharedOrigin {
    /// One copy is done (delivered or given up on); true when it was the last.
    fn copy_done(&self) -> bool {
        self.remaining.fetch_sub(1, Ordering::AcqRel) == 1
    }
}

/// One message on its way to the other side.
pub(super) struct Forward {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// MQTT 5 properties, passed on to a side that speaks 5.
    pub properties: Option<Arc<Properties>>,
    pub origin: Option<Origin>,
    pub received: Instant,
}

impl Forward {
    /// One copy of the original is done (delivered or given up on): acknowledges the original
    /// to its source once this was its last copy.
    pub fn settle(self) {
        match self.origin {
            Some(Origin::Alone(ack)) => ack.send(),
            Some(Origin::Shared(origin)) if origin.copy_done() => origin.ack.send(),
            _ => {}
        }
    }
}

/// Routes what one side reads to the other side's publisher. Never blocks.
/// How long a copy is remembered, to know it when it comes back.
const ECHO_WINDOW: Duration = Duration::from_secs(30);
/// Copies remembered at most (the oldest are forgotten first).
const ECHO_MAX: usize = 65_536;

/// The copies a relay published recently, kept only where a route could read its own output
/// back (its source and sink may be one broker under two names, which `validate()` cannot
/// see). A message read that is one of them is an echo: dropped and counted, so that such a
/// loop makes one copy of a message, never a storm.
#[derive(Default)]
struct EchoGuard {
    /// Per fingerprint of topic and payload, when each copy still out was published (oldest
    /// first).
    recent: HashMap<u64, VecDeque<Instant>>,
    /// Every copy remembered, oldest first, to forget them in time.
    order: VecDeque<(u64, Instant)>,
}

impl EchoGuard {
    fn fingerprint(topic: &str, payload: &[u8]) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        topic.hash(&mut h);
        payload.hash(&mut h);
        h.finish()
    }

    /// Forgets the copies older than the window (or over the bound). A copy already taken
    /// leaves its entry in `order`; forgetting it removes only copies as old or older, of
    /// which there are none left.
    fn expire(&mut self, now: Instant) {
        while let Some(&(fp, at)) = self.order.front() {
            if now.saturating_duration_since(at) < ECHO_WINDOW && self.order.len() <= ECHO_MAX {
                break;
            }
            self.order.pop_front();
            if let Some(times) = self.recent.get_mut(&fp) {
                while times.front().is_some_and(|t| *t <= at) {
                    times.pop_front();
                }
                if times.is_empty() {
                    self.recent.remove(&fp);
                }
            }
        }
    }

    /// Whether `fp` is a copy out there; if so its oldest is taken off (one echo per copy).
    fn take(&mut self, fp: u64, now: Instant) -> bool {
        self.expire(now);
        let Some(times) = self.recent.get_mut(&fp) else {
            return false;
        };
        times.pop_front();
        if times.is_empty() {
            self.recent.remove(&fp);
        }
        true
    }

    fn remember(&mut self, fp: u64, now: Instant) {
        self.recent.entry(fp).or_default().push_back(now);
        self.order.push_back((fp, now));
    }
}

pub(super) struct Router {
    side: Side,
    /// The routes whose messages this side reads.
    routes: Vec<RouteConfig>,
    to_publisher: queue::Sender<Forward>,
    pub backlog: Arc<Backlog>,
    /// Reused for each destination topic.
    destination: String,
    /// Only where a route's output could be read back by a route of this side.
    echoes: Option<EchoGuard>,
}

impl Router {
    pub fn new(
        ctx: &Context,
        side: Side,
        to_publisher: queue::Sender<Forward>,
        backlog: Arc<Backlog>,
    ) -> Self {
        let routes: Vec<RouteConfig> = ctx
            .config
            .routes
            .iter()
            .filter(|r| r.direction == side.reads())
            .cloned()
            .collect();
        let loop_routes: Vec<crate::topic::LoopRoute<'_>> = routes
            .iter()
            .map(|r| crate::topic::LoopRoute {
                inbound: true,
                filter: &r.filter,
                template: &r.template,
            })
            .collect();
        let echoes = crate::topic::find_self_feed(&loop_routes).map(|_| EchoGuard::default());
        if echoes.is_some() {
            tracing::debug!(bridge = %ctx.report.name, side = side.as_str(), "a route could read its own output back: echoes are dropped");
        }
        Self {
            side,
            routes,
            to_publisher,
            backlog,
            destination: String::new(),
            echoes,
        }
    }

    /// Routes one incoming publish to the other side. `received`: when its batch was read.
    pub fn route(&mut self, ctx: &Context, client: &Client, p: Message, received: Instant) {
        let direction = self.side.reads();
        if ctx.draining.load(Ordering::Acquire) {
            // Not acknowledged: the broker delivers it again to the next relay (persistent
            // session).
            return;
        }
        let topic = p.topic.as_str();
        // One pass over the routes: which ones take this message (routes are at most 50, so a
        // bit each in a u64).
        let mut wanted = 0u64;
        for (i, r) in self.routes.iter().enumerate().take(64) {
            if r.filter.matches(topic) && !(p.retain && r.retain == RetainHandling::SkipRetained) {
                wanted |= 1 << i;
            }
        }
        let matching = wanted.count_ones() as usize;
        let qos1 = p.qos != QoS::AtMostOnce;
        if matching > 0
            && let Some(echoes) = self.echoes.as_mut()
            && echoes.take(EchoGuard::fingerprint(topic, &p.payload), received)
        {
            ctx.report.dropped(direction, DropReason::Loop, |count| {
                format!(
                    "{topic} ({}) is a copy this bridge published, read back: source and sink are one broker and a route reads its own output; dropped and acknowledged ({count} so far)",
                    direction.as_str()
                )
            });
            if qos1 {
                client.try_ack(p.pkid);
            }
            return;
        }
        if matching == 0 {
            // Nothing wants it (a leftover subscription of a persistent session, or a skipped
            // retained message): acknowledge so it does not clog the session.
            if qos1 {
                client.try_ack(p.pkid);
            }
            return;
        }
        // Too large for the side it came from or the side it goes to: counted, reported, then
        // acknowledged, so that it does not hold up every message behind it.
        let (own, other) = match self.side {
            Side::Source => (&ctx.config.source, &ctx.config.sink),
            Side::Sink => (&ctx.config.sink, &ctx.config.source),
        };
        let size = p.payload.len();
        let over = if size > other.max_message_bytes {
            Some((self.side.other(), other.max_message_bytes))
        } else if size > own.max_message_bytes {
            Some((self.side, own.max_message_bytes))
        } else {
            None
        };
        if let Some((limited, limit)) = over {
            let route = wanted.trailing_zeros() as usize;
            let route = self.routes.get(route).map_or("", |r| r.name.as_str());
            ctx.report.dropped(direction, DropReason::TooLarge, |count| {
                format!(
                    "route {route} ({}): a message of {size} bytes is over the {}'s maxMessageBytes ({limit}); dropped and acknowledged ({count} so far)",
                    direction.as_str(),
                    limited.as_str()
                )
            });
            if qos1 {
                client.try_ack(p.pkid);
            }
            return;
        }
        let properties = p.properties.map(Arc::new);
        let shared = (qos1 && matching > 1).then(|| {
            Arc::new(SharedOrigin {
                ack: Ack {
                    client: client.clone(),
                    pkid: p.pkid,
                },
                remaining: AtomicUsize::new(matching),
            })
        });
        for (i, route) in self.routes.iter().enumerate().take(64) {
            if wanted & (1 << i) == 0 {
                continue;
            }
            if route.template.is_identity() {
                self.destination.clear();
                self.destination.push_str(topic);
            } else {
                route.template.render_into(topic, &mut self.destination);
            }
            let qos = if qos1 && route.qos == 1 {
                QoS::AtLeastOnce
            } else {
                QoS::AtMostOnce
            };
            let retain = p.retain && route.retain == RetainHandling::Preserve;
            if let Some(echoes) = self.echoes.as_mut() {
                echoes.remember(
                    EchoGuard::fingerprint(&self.destination, &p.payload),
                    received,
                );
            }
            self.backlog.add(size);
            let forward = Forward {
                topic: self.destination.clone(),
                payload: p.payload.clone(),
                qos,
                retain,
                properties: properties.clone(),
                origin: match &shared {
                    Some(shared) => Some(Origin::Shared(shared.clone())),
                    None => qos1.then(|| {
                        Origin::Alone(Ack {
                            client: client.clone(),
                            pkid: p.pkid,
                        })
                    }),
                },
                received,
            };
            if self.to_publisher.send(forward).is_err() {
                self.backlog.take(size);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_echo_is_known_once_within_its_window() {
        let t0 = Instant::now();
        let mut g = EchoGuard::default();
        let copy = EchoGuard::fingerprint("a/copy/a/x", b"p");
        g.remember(copy, t0);
        assert!(!g.take(EchoGuard::fingerprint("a/copy/a/x", b"other"), t0));
        assert!(!g.take(EchoGuard::fingerprint("a/x", b"p"), t0));
        assert!(g.take(copy, t0 + Duration::from_secs(1)));
        // One echo per copy: the same message again is new.
        assert!(!g.take(copy, t0 + Duration::from_secs(1)));
        // Two copies, two echoes; a copy older than the window is forgotten.
        g.remember(copy, t0);
        g.remember(copy, t0 + Duration::from_secs(20));
        assert!(g.take(copy, t0 + Duration::from_secs(25)));
        assert!(g.take(copy, t0 + Duration::from_secs(25)));
        // A copy taken, then the same again: the first's expiry leaves the second alone.
        let t1 = t0 + Duration::from_secs(40);
        g.remember(copy, t1);
        assert!(g.take(copy, t1));
        g.remember(copy, t1 + Duration::from_secs(10));
        assert!(g.take(copy, t1 + ECHO_WINDOW + Duration::from_secs(1)));
        // Older than the window: forgotten.
        g.remember(copy, t1);
        assert!(!g.take(copy, t1 + ECHO_WINDOW * 3));
        assert!(g.recent.is_empty() && g.order.is_empty());
    }
}
