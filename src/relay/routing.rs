//! Routing: which routes take a message read on one side, under which topic it goes to the
//! other side, and what must happen before the original is acknowledged.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

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
pub(super) struct Router {
    side: Side,
    /// The routes whose messages this side reads.
    routes: Vec<RouteConfig>,
    to_publisher: queue::Sender<Forward>,
    pub backlog: Arc<Backlog>,
    /// Reused for each destination topic.
    destination: String,
}

impl Router {
    pub fn new(
        ctx: &Context,
        side: Side,
        to_publisher: queue::Sender<Forward>,
        backlog: Arc<Backlog>,
    ) -> Self {
        Self {
            side,
            routes: ctx
                .config
                .routes
                .iter()
                .filter(|r| r.direction == side.reads())
                .cloned()
                .collect(),
            to_publisher,
            backlog,
            destination: String::new(),
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
