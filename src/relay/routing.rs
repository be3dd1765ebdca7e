//! Routing: which routes take a message read on one side, under which topic it goes to the
//! other side, and what must happen before the original is acknowledged.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rumqttc::QoS;

use super::Context;
use super::backlog::Backlog;
use super::config::RouteConfig;
use super::mqtt::{Client, Message, Properties, Topic};
use super::queue;
use super::status::{DropReason, Side};
use crate::topic::TopicFilter;
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
    /// The read topic itself for an identity route (no copy), else the rendered one.
    pub topic: Topic,
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

/// How long a copy is remembered, to know it when it comes back.
const ECHO_WINDOW: Duration = Duration::from_secs(30);
/// Copies remembered at most (the oldest are forgotten first).
const ECHO_MAX: usize = 65_536;

/// The copies a relay published recently, kept only where a route could read its own output
/// back (its source and sink may be one broker under two names, which `validate()` cannot
/// see). A message read that is one of them is an echo: dropped and counted, so that such a
/// loop makes one copy of a message, never a storm.
///
/// A copy published under its original's own topic (an identity route) looks exactly like the
/// next message a device sends with the same payload, so it is remembered only once source and
/// sink are found to be one address ([`one_address`]): otherwise every second reading of a
/// device that repeats itself would be dropped.
#[derive(Default)]
struct EchoGuard {
    /// Set once source and sink resolved to one address.
    one_address: Arc<AtomicBool>,
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

/// Routes what one side reads to the other side's publisher. Never blocks.
pub(super) struct Router {
    side: Side,
    /// The routes whose messages this side reads.
    routes: Vec<RouteConfig>,
    to_publisher: queue::Sender<Forward>,
    pub backlog: Arc<Backlog>,
    /// Reused for each rendered destination topic.
    destination: String,
    /// Where rendered destination topics are kept ([`Topic::copied_into`]).
    rendered: BytesMut,
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
        let routes: Vec<RouteConfig> = ctx.config.reading(side).cloned().collect();
        let loop_routes: Vec<crate::topic::LoopRoute<'_>> = routes
            .iter()
            .map(|r| crate::topic::LoopRoute {
                inbound: true,
                filter: &r.filter,
                template: &r.template,
            })
            .collect();
        let echoes = crate::topic::find_self_feed(&loop_routes).map(|_| EchoGuard {
            one_address: one_address_flag(ctx),
            ..EchoGuard::default()
        });
        if echoes.is_some() {
            tracing::debug!(bridge = %ctx.report.name, side = side.as_str(), "a route could read its own output back: echoes are dropped");
        }
        Self {
            side,
            routes,
            to_publisher,
            backlog,
            destination: String::new(),
            rendered: BytesMut::new(),
            echoes,
        }
    }

    /// Routes one incoming publish to the other side, when this relay is the only one to read
    /// the connection. `received`: when its batch was read; `hold`: as for [`Router::take`].
    pub fn route(
        &mut self,
        ctx: &Context,
        client: &Client,
        p: &Message,
        received: Instant,
        hold: bool,
    ) {
        match self.take(ctx, p, received, hold) {
            // Nothing wants it (a leftover subscription of a persistent session, a skipped
            // retained message, or one dropped and reported): acknowledged so that it does not
            // clog the session.
            Take::Nothing => {
                if p.qos != QoS::AtMostOnce {
                    client.try_ack(p.pkid);
                }
            }
            // Not acknowledged: the broker delivers it again to the next relay (persistent
            // session).
            Take::Withhold => {}
            Take::Routes(wanted) => {
                let origins = Origins::new(client, p, wanted.count_ones() as usize);
                let properties = p.properties.clone().map(Arc::new);
                self.forward(p, wanted, &properties, &origins, received);
            }
        }
    }

    /// Which of this side's routes take `p`. A message dropped here (an echo, or too large) is
    /// reported and taken by none. `hold`: the relay may not take messages from the connection
    /// `p` came on (it has left it, or waits for it to reconnect).
    pub fn take(&mut self, ctx: &Context, p: &Message, received: Instant, hold: bool) -> Take {
        let direction = self.side.reads();
        let topic = p.topic.as_str();
        // One pass over the routes: which ones take this message (routes are at most 50, so a
        // bit each in a u64).
        let mut wanted = 0u64;
        for (i, r) in self.routes.iter().enumerate().take(64) {
            if r.filter.matches(topic) && !(p.retain && r.retain == RetainHandling::SkipRetained) {
                wanted |= 1 << i;
            }
        }
        if wanted == 0 {
            return Take::Nothing;
        }
        if hold || ctx.draining.load(Ordering::Acquire) {
            return Take::Withhold;
        }
        if let Some(echoes) = self.echoes.as_mut()
            && echoes.take(EchoGuard::fingerprint(topic, &p.payload), received)
        {
            ctx.report.dropped(direction, DropReason::Loop, |count| {
                format!(
                    "{topic} ({}) is a copy this bridge published, read back: source and sink are one broker and a route reads its own output; dropped and acknowledged ({count} so far)",
                    direction.as_str()
                )
            });
            return Take::Nothing;
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
            return Take::Nothing;
        }
        Take::Routes(wanted)
    }

    /// Hands a copy of `p` to the other side's publisher for each route in `wanted` (from
    /// [`Router::take`]), each carrying its share of `origins`.
    pub fn forward(
        &mut self,
        p: &Message,
        wanted: u64,
        properties: &Option<Arc<Properties>>,
        origins: &Origins,
        received: Instant,
    ) {
        let topic = p.topic.as_str();
        let qos1 = p.qos != QoS::AtMostOnce;
        let size = p.payload.len();
        for (i, route) in self.routes.iter().enumerate().take(64) {
            if wanted & (1 << i) == 0 {
                continue;
            }
            // An identity route's copy shares the topic as read; another is rendered, then
            // kept in the shared buffer.
            let destination = if route.template.is_identity() {
                p.topic.clone()
            } else {
                route.template.render_into(topic, &mut self.destination);
                Topic::copied_into(&mut self.rendered, &self.destination)
            };
            let qos = if qos1 && route.qos == 1 {
                QoS::AtLeastOnce
            } else {
                QoS::AtMostOnce
            };
            let retain = p.retain && route.retain == RetainHandling::Preserve;
            if let Some(echoes) = self.echoes.as_mut()
                && (destination.as_str() != topic || echoes.one_address.load(Ordering::Relaxed))
            {
                echoes.remember(EchoGuard::fingerprint(&destination, &p.payload), received);
            }
            self.backlog.add(size);
            let forward = Forward {
                topic: destination,
                payload: p.payload.clone(),
                qos,
                retain,
                properties: properties.clone(),
                origin: origins.copy(),
                received,
            };
            if self.to_publisher.send(forward).is_err() {
                self.backlog.take(size);
            }
        }
    }

    /// The routes this side reads.
    pub fn routes(&self) -> &[RouteConfig] {
        &self.routes
    }
}

/// The relay's flag of whether its source and sink resolve to one address, looked up once per
/// relay (by the first of its routers with an echo guard) while the connections are being made;
/// outside a runtime, as in unit tests, not at all.
fn one_address_flag(ctx: &Context) -> Arc<AtomicBool> {
    ctx.one_address
        .get_or_init(|| {
            let flag = Arc::new(AtomicBool::new(false));
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let set = flag.clone();
                let (source, sink) = (ctx.config.source.url.clone(), ctx.config.sink.url.clone());
                let bridge = ctx.report.name.clone();
                runtime.spawn(async move {
                    if one_address(&source, &sink).await {
                        set.store(true, Ordering::Relaxed);
                        tracing::info!(%bridge, "source and sink resolve to one address: copies under their original's topic are remembered too, and dropped when read back");
                    }
                });
            }
            flag
        })
        .clone()
}

/// Whether broker URLs `a` and `b` reach one address: their hosts, resolved, share an IP
/// address and port (the scheme's default port filled in). `localhost` and `127.0.0.1`, or a
/// Service's name and its cluster IP, are one address; a broker reached through two different
/// addresses (a pod IP and its Service's IP, its TCP and its WebSocket listener) is not. A URL
/// that does not parse or resolve counts as another address.
pub(super) async fn one_address(a: &str, b: &str) -> bool {
    let (Some(a), Some(b)) = (host_port(a), host_port(b)) else {
        return false;
    };
    let (Ok(a), Ok(b)) = (
        tokio::net::lookup_host(a).await,
        tokio::net::lookup_host(b).await,
    ) else {
        return false;
    };
    let a: HashSet<SocketAddr> = a.collect();
    b.into_iter().any(|addr| a.contains(&addr))
}

/// A broker URL's host and port, the scheme's default port filled in.
fn host_port(raw: &str) -> Option<(String, u16)> {
    let url = url::Url::parse(raw).ok()?;
    let port = url
        .port()
        .or_else(|| crate::vocab::default_port(url.scheme()))?;
    // `Url` keeps IPv6 hosts in brackets, which the resolver does not take.
    let host = url
        .host_str()?
        .trim_start_matches('[')
        .trim_end_matches(']');
    Some((host.to_owned(), port))
}

/// What a router makes of a message.
pub(super) enum Take {
    /// No route takes it, or it was dropped (and reported): nothing to wait for.
    Nothing,
    /// A route would take it, but the relay is draining or has left the connection: it must not
    /// be acknowledged, so that the broker delivers it again (to the relay's successor).
    Withhold,
    /// These routes take it (a bit per route).
    Routes(u64),
}

/// The acknowledgement of one original, split among its copies: a QoS 1 original is
/// acknowledged once each of `copies` is done. A copy that is never made (a relay that withholds
/// the message) keeps it unacknowledged.
pub(super) struct Origins {
    ack: Option<Ack>,
    shared: Option<Arc<SharedOrigin>>,
}

impl Origins {
    pub fn new(client: &Client, p: &Message, copies: usize) -> Self {
        let ack = (p.qos != QoS::AtMostOnce).then(|| Ack {
            client: client.clone(),
            pkid: p.pkid,
        });
        match ack {
            Some(ack) if copies > 1 => Origins {
                ack: None,
                shared: Some(Arc::new(SharedOrigin {
                    ack,
                    remaining: AtomicUsize::new(copies),
                })),
            },
            ack => Origins { ack, shared: None },
        }
    }

    /// The origin of one copy.
    fn copy(&self) -> Option<Origin> {
        match (&self.shared, &self.ack) {
            (Some(shared), _) => Some(Origin::Shared(shared.clone())),
            (None, Some(ack)) => Some(Origin::Alone(Ack {
                client: ack.client.clone(),
                pkid: ack.pkid,
            })),
            (None, None) => None,
        }
    }
}

/// The topic filters `routes` subscribe to, each once, at the highest QoS a route asks for. A
/// filter that another one covers is left out (the other one subscribes at the higher of their
/// QoS): a broker may deliver a message that two subscriptions of one session match twice, or,
/// as Mosquitto does with a full in-flight window, out of order.
pub(super) fn subscriptions<'a>(
    routes: impl IntoIterator<Item = &'a RouteConfig>,
) -> Vec<(String, QoS)> {
    // (subscription, the filter where it may be folded into another (no shared subscription),
    // QoS)
    let mut all: Vec<(String, Option<&TopicFilter>, QoS)> = Vec::new();
    for r in routes {
        let qos = if r.qos == 1 {
            QoS::AtLeastOnce
        } else {
            QoS::AtMostOnce
        };
        let subscription = r.subscription();
        match all.iter_mut().find(|(f, _, _)| *f == subscription) {
            Some((_, _, q)) if qos == QoS::AtLeastOnce => *q = qos,
            Some(_) => {}
            None => {
                let filter = r.share.is_none().then_some(&r.filter);
                all.push((subscription, filter, qos));
            }
        }
    }
    // Each filter's subscription once, identical ones merged above, so only a strictly wider
    // filter covers another; the widest ones stay.
    let covered_by = |i: usize| {
        let f = all[i].1?;
        all.iter()
            .enumerate()
            .position(|(j, (_, g, _))| j != i && g.is_some_and(|g| g.covers(f) && !f.covers(g)))
    };
    let covering: Vec<Option<usize>> = (0..all.len()).map(covered_by).collect();
    let mut qos: Vec<QoS> = all.iter().map(|(_, _, q)| *q).collect();
    for (i, by) in covering.iter().enumerate() {
        if let Some(mut top) = *by {
            // Up to a filter nothing covers (coverage is transitive).
            while let Some(next) = covering[top] {
                top = next;
            }
            if qos[i] == QoS::AtLeastOnce {
                qos[top] = QoS::AtLeastOnce;
            }
        }
    }
    all.into_iter()
        .zip(qos)
        .zip(covering)
        .filter(|(_, by)| by.is_none())
        .map(|(((subscription, _, _), q), _)| (subscription, q))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filter_another_covers_is_not_subscribed_and_the_wider_one_takes_its_qos() {
        let route = |filter: &str, qos: u8, share: Option<&str>| RouteConfig {
            name: filter.into(),
            filter: TopicFilter::parse(filter).expect("filter"),
            template: crate::topic::TopicTemplate::same_topic(),
            qos,
            retain: RetainHandling::Preserve,
            direction: crate::vocab::Direction::In,
            share: share.map(str::to_owned),
        };
        let routes = [
            route("devices/+/telemetry", 1, None),
            route("devices/d1/telemetry", 0, None),
            route("+/+/telemetry", 0, None),
            route("a/+/c", 0, None),
            route("a/b/+", 0, None),
            route("devices/#", 0, Some("g")),
            route("+/+/telemetry", 0, None),
        ];
        assert_eq!(
            subscriptions(&routes),
            vec![
                ("+/+/telemetry".to_owned(), QoS::AtLeastOnce),
                ("a/+/c".to_owned(), QoS::AtMostOnce),
                ("a/b/+".to_owned(), QoS::AtMostOnce),
                ("$share/g/devices/#".to_owned(), QoS::AtMostOnce),
            ]
        );
    }

    #[tokio::test]
    async fn two_names_that_resolve_alike_are_one_address() {
        assert!(one_address("mqtt://127.0.0.1:1884", "mqtt://localhost:1884").await);
        assert!(one_address("mqtt://127.0.0.1", "mqtt://127.0.0.1:1883").await);
        assert!(one_address("ws://[::1]:9001/mqtt", "ws://[::1]:9001").await);
        assert!(!one_address("mqtt://127.0.0.1:1884", "mqtt://127.0.0.1:1885").await);
        assert!(!one_address("mqtt://127.0.0.1:1884", "mqtt://127.0.0.2:1884").await);
        assert!(!one_address("mqtt://127.0.0.1:1884", "not a url").await);
    }

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
