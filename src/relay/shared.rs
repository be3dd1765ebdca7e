//! Connections shared by relays. Relays that reach the same broker under the same identity
//! (URL, client id, credentials, TLS trust, MQTT 3.1.1, unsigned) and only publish to it (a
//! sink), or only read from it (a source), use one connection: a broker takes one connection
//! per client id, so two relays with the same identity would otherwise take the connection from
//! each other in turn, and every connection costs memory, and system calls per message, on both
//! ends.
//!
//! On a sink, each relay stays a tenant with its own publisher and outbox. The connection tags
//! every publish with its tenant ([`Tenant`]), so that what is written and acknowledged goes back
//! to the publisher it came from; a tenant that joins while the connection is up is told at
//! once.
//!
//! On a source, the connection subscribes what every tenant's routes read, and routes each
//! message through every tenant's routes; the original is acknowledged once every copy is done.
//! A tenant that joins while the connection is up subscribes at once (and alone hears of what
//! the broker refuses of it). A tenant that leaves holds
//! back what its routes match until the connection reconnects (at once when another tenant
//! joins after it, its successor after a change; else after a second), so that the broker
//! delivers that again, to the tenants present then. One tenant whose sink cannot keep up
//! stops the reading for all of them, as on a connection of its own.
//!
//! A new connection starts only once the relay that opened it is a tenant, and a connection
//! with no tenant acknowledges nothing: a persistent session's queue is never read with nobody
//! to take it.
//!
//! The last tenant to leave closes the connection; a connection opened afterwards with the
//! same identity waits until the old one has closed, so the broker never sees a takeover.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::Context;
use super::config::{ConnectPermit, Endpoint, Protocol, RelayConfig};
use super::connection::{Connection, Routing, subscribe_in_chunks};
use super::mqtt::Tenant;
use super::peers::{ConnEvent, JoinSubscribe, Member, Peers, Tenants, position};
use super::routing::{Router, subscriptions};
use super::status::{RelayObserver, RelayStats, RelayStatus, Reporter, Side, SideState};
use super::tls::TlsTrust;

/// What makes two endpoints one connection. Never printed (it holds the password).
#[derive(Clone, PartialEq, Eq, Hash)]
pub(super) struct Key {
    /// Sinks are shared with sinks, sources with sources.
    side: Side,
    url: String,
    client_id: String,
    username: Option<String>,
    password: Option<String>,
    /// The trust's kind, and for a CA bundle the prepared configuration's address (bundles are
    /// prepared once per Secret version and shared).
    tls: (u8, usize),
    keep_alive: Duration,
    clean_session: bool,
    max_message_bytes: usize,
    window: usize,
    read_linger: Duration,
}

impl Key {
    /// The sharing key of `config`'s sink, if the sink can be shared: MQTT 3.1.1, not signed
    /// (a signed URL belongs to one bridge's credentials), written to and never read from.
    pub fn of_sink(config: &RelayConfig) -> Option<Key> {
        let sink = &config.sink;
        let reads_sink = config.reading(Side::Sink).next().is_some();
        if sink.protocol != Protocol::V311
            || sink.signer.is_some()
            || reads_sink
            || !config.writes(Side::Sink)
        {
            return None;
        }
        Some(Key::new(Side::Sink, sink, config.window))
    }

    /// The sharing key of `config`'s source, if the source can be shared: MQTT 3.1.1, not
    /// signed, read from (without shared subscriptions, which a relay leaves on its own) and
    /// never written to.
    pub fn of_source(config: &RelayConfig) -> Option<Key> {
        let source = &config.source;
        let mut reads = config.reading(Side::Source);
        let reads_source = reads.clone().next().is_some();
        let shares = reads.any(|r| r.share.is_some());
        if source.protocol != Protocol::V311
            || source.signer.is_some()
            || config.writes(Side::Source)
            || !reads_source
            || shares
        {
            return None;
        }
        Some(Key::new(Side::Source, source, 0))
    }

    fn new(side: Side, e: &Endpoint, window: usize) -> Key {
        Key {
            side,
            url: e.url.clone(),
            client_id: e.client_id.clone(),
            username: e.username.clone(),
            password: e.password.as_ref().map(|p| p.expose().to_owned()),
            tls: match &e.tls {
                TlsTrust::System => (0, 0),
                TlsTrust::Custom(c) => (1, Arc::as_ptr(c) as usize),
                TlsTrust::InsecureSkipVerify => (2, 0),
            },
            keep_alive: e.keep_alive,
            clean_session: e.clean_session,
            max_message_bytes: e.max_message_bytes,
            window,
            read_linger: e.read_linger,
        }
    }
}

/// One shared connection.
struct Shared {
    tenants: Arc<Tenants>,
    stop: watch::Sender<bool>,
    /// Never set: a shared connection has no shared subscriptions to leave.
    _retire: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
    /// Set when the last relay leaves for good: the connection, once closed, ends the session
    /// the broker keeps for it, and tells that relay's observer how it went.
    end_session: Arc<Mutex<Option<EndRequest>>>,
    /// Whether a relay left without retiring since the last one joined (its successor may
    /// still come for the session).
    kept: AtomicBool,
    /// Lets the connection start, once its first relay is in the table.
    go: Option<oneshot::Sender<()>>,
}

type Pool = Mutex<HashMap<Key, Shared>>;

fn lock(pool: &Pool) -> MutexGuard<'_, HashMap<Key, Shared>> {
    pool.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What ending a closed shared connection's session needs from the relay that left it last.
struct EndRequest {
    observer: Option<Arc<dyn RelayObserver>>,
}

/// The shared sink connections of one process.
#[derive(Clone, Default)]
pub struct ConnectionPool {
    connections: Arc<Pool>,
    /// The process's connect permit, asked before a session is ended (a relay's own permit may
    /// be its shard's, let go once its bridge is deleted).
    permit: Option<ConnectPermit>,
}

impl ConnectionPool {
    /// A pool whose connections ask `permit` before ending a session.
    pub fn with_permit(permit: ConnectPermit) -> Self {
        Self {
            connections: Arc::default(),
            permit: Some(permit),
        }
    }

    /// Joins `ctx`'s relay to the shared connection for `key` (opening it if there is none),
    /// with `events` going to the relay's publisher of that side, and, on a source, what the
    /// connection reads going through `router`. Must run inside a Tokio runtime.
    pub(super) fn join(
        &self,
        key: Key,
        endpoint: Endpoint,
        ctx: Arc<Context>,
        events: mpsc::UnboundedSender<ConnEvent>,
        router: Option<Router>,
    ) -> Membership {
        let side = key.side;
        let mut pool = lock(&self.connections);
        // Connections closed for good and not reopened are forgotten.
        pool.retain(|_, s| {
            !(s.tenants.is_empty() && s.task.as_ref().is_none_or(|t| t.is_finished()))
        });
        let shared = match pool.entry(key.clone()) {
            Entry::Occupied(o) if !o.get().tenants.is_empty() => {
                o.get().kept.store(false, Ordering::Relaxed);
                o.into_mut()
            }
            Entry::Occupied(mut o) => {
                // The last one with this identity is closing: the new one waits for it.
                let previous = o.get_mut().task.take();
                *o.get_mut() = open(&ctx, side, endpoint.clone(), previous, &self.permit);
                o.into_mut()
            }
            Entry::Vacant(v) => v.insert(open(&ctx, side, endpoint.clone(), None, &self.permit)),
        };
        let mut t = shared.tenants.lock();
        let id = t.next;
        t.next += 1;
        // What the relay this one replaces read and this one does not: unsubscribed on the
        // connection's next CONNACK, unless a member reads it (see `Peers::take_leftover`).
        t.leftover.extend(endpoint.unsubscribe.iter().cloned());
        if let Some(client) = &t.client {
            let _ = events.send(ConnEvent::Connected {
                client: client.for_tenant(id),
            });
            // Up already: this relay's filters are subscribed now (the connection subscribes
            // every relay's again when it reconnects).
            // Its SUBACKs are matched to these SUBSCRIBEs (see `Tenants::joined_suback`).
            if let Some(router) = &router {
                let filters = subscriptions(router.routes());
                let span = tracing::debug_span!("join", bridge = %ctx.report.name);
                let sent = subscribe_in_chunks(client, &filters, &endpoint, &span);
                let n = sent.len();
                t.joins.extend(
                    sent.into_iter()
                        .enumerate()
                        .map(|(i, filters)| JoinSubscribe {
                            tenant: id,
                            filters,
                            last: i + 1 == n,
                        }),
                );
            }
        }
        if let Some((state, error)) = &t.state {
            ctx.report.state(side, *state, error.clone());
        }
        tracing::debug!(bridge = %ctx.report.name, tenant = id, tenants = t.members.len() + 1, side = side.as_str(), "sharing the connection");
        let replaces = t.members.iter().any(|m| m.departed.is_some());
        t.add(Member {
            id,
            events,
            ctx: ctx.clone(),
            router,
            departed: None,
            waiting: replaces,
            held: Vec::new(),
        });
        t.last_join = Some(Instant::now());
        drop(t);
        // A new connection starts only now: a persistent session's queue read before its first
        // relay was in the table would have had nobody to go to.
        if let Some(go) = shared.go.take() {
            let _ = go.send(());
        }
        if replaces {
            // Relays that left hold messages back: reconnect now that this one is here.
            shared.tenants.nudge.notify_one();
        }
        Membership {
            pool: self.clone(),
            key,
            id,
            ctx,
            ends_session: false,
        }
    }

    /// Returns once every connection that no relay uses any more has closed.
    pub async fn closed(&self) {
        loop {
            let closing = lock(&self.connections)
                .values()
                .any(|s| s.tenants.is_empty() && s.task.as_ref().is_some_and(|t| !t.is_finished()));
            if !closing {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A context of its own, reporting to nobody (a shared connection reports to its tenants).
fn context(config: RelayConfig) -> Arc<Context> {
    Arc::new(Context {
        report: Reporter {
            name: config.name.clone(),
            stats: Arc::new(RelayStats::default()),
            observer: None,
            status: watch::channel(RelayStatus {
                source: SideState::Stopped,
                ..RelayStatus::starting()
            })
            .0,
        },
        config,
        draining: Arc::new(AtomicBool::new(false)),
        one_address: std::sync::OnceLock::new(),
    })
}

/// Opens a shared connection (after `previous` has closed).
fn open(
    first: &Context,
    side: Side,
    endpoint: Endpoint,
    previous: Option<JoinHandle<()>>,
    permit: &Option<ConnectPermit>,
) -> Shared {
    let tenants = Arc::new(Tenants::new());
    let name = format!(
        "{} ({} connection {}, shared)",
        first.config.name,
        side.as_str(),
        endpoint.client_id
    );
    let name_for_end = name.clone();
    let mut config = first.config.clone();
    config.name = name;
    config.routes.clear();
    let ctx = context(config);
    let (stop, stop_rx) = watch::channel(false);
    let (retire, retire_rx) = watch::channel(false);
    let (retired, _) = mpsc::unbounded_channel();
    let end_session: Arc<Mutex<Option<EndRequest>>> = Arc::default();
    let session =
        (!endpoint.clean_session).then(|| (endpoint.clone(), end_session.clone(), permit.clone()));
    let connection = Connection {
        span: super::task_span(super::Task::Connection, &ctx, side),
        routing: Routing::Shared(tenants.clone()),
        ctx,
        side,
        endpoint,
        peers: Peers::Shared(tenants.clone()),
        stop: stop_rx,
        retire: retire_rx,
        retired,
    };
    let (go, go_rx) = oneshot::channel();
    let task = tokio::spawn(async move {
        if let Some(previous) = previous {
            let _ = previous.await;
        }
        // Until the relay that opened it has joined (see `ConnectionPool::join`).
        let _ = go_rx.await;
        connection.run().await;
        let request = session.and_then(|(endpoint, end, permit)| {
            let request = end.lock().unwrap_or_else(PoisonError::into_inner).take()?;
            Some((endpoint, permit, request))
        });
        if let Some((endpoint, permit, request)) = request {
            super::session::end_for_good(
                &endpoint,
                &name_for_end,
                permit.as_ref(),
                request.observer.as_ref(),
            )
            .await;
        }
    });
    Shared {
        tenants,
        stop,
        _retire: retire,
        task: Some(task),
        end_session,
        kept: AtomicBool::new(false),
        go: Some(go),
    }
}

/// A relay's place on a shared connection; dropping it leaves (the last one out closes the
/// connection).
pub(super) struct Membership {
    pool: ConnectionPool,
    key: Key,
    id: Tenant,
    ctx: Arc<Context>,
    /// The relay leaves for good and its sessions are to end: see
    /// [`super::RelayConfig::end_sessions`].
    pub(super) ends_session: bool,
}

impl Drop for Membership {
    fn drop(&mut self) {
        let pool = lock(&self.pool.connections);
        if let Some(shared) = pool.get(&self.key) {
            let mut t = shared.tenants.lock();
            if let Some(i) = position(&t.members, self.id) {
                if t.members[i].router.is_some() {
                    // A source's relay stays, holding back what it would have taken, until the
                    // connection reconnects.
                    t.members[i].departed = Some(Instant::now());
                } else {
                    t.members.remove(i);
                }
            }
            let for_good = self.ends_session;
            if !for_good {
                shared.kept.store(true, Ordering::Relaxed);
            }
            if t.members.iter().all(|m| m.departed.is_some()) {
                // The last one out ends the session, unless one that left may come back.
                if for_good && !shared.kept.load(Ordering::Relaxed) {
                    *shared
                        .end_session
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner) = Some(EndRequest {
                        observer: self.ctx.report.observer.clone(),
                    });
                }
                // Those that left stay listed: until the connection has closed, what they
                // would have taken is held back, not acknowledged as unwanted.
                let _ = shared.stop.send(true);
            } else if t.members.iter().any(|m| m.departed.is_some()) {
                drop(t);
                shared.tenants.nudge.notify_one();
            }
        }
        drop(pool);
        self.ctx
            .report
            .state(self.key.side, SideState::Stopped, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::config::RouteConfig;
    use crate::relay::peers::{Progress, REJOIN_GRACE};
    use crate::relay::routing::Forward;
    use crate::topic::{TopicFilter, TopicTemplate};
    use crate::vocab::{Direction, RetainHandling};

    fn config(sink_client: &str, direction: Direction) -> RelayConfig {
        let route = RouteConfig {
            name: "r".into(),
            filter: TopicFilter::parse("a/#").expect("filter"),
            template: TopicTemplate::same_topic(),
            qos: 1,
            retain: RetainHandling::Preserve,
            direction,
            share: None,
        };
        RelayConfig::new(
            "ns/b",
            Endpoint::new("mqtt://127.0.0.1:1", "src"),
            Endpoint::new("mqtt://127.0.0.1:2", sink_client),
            vec![route],
        )
    }

    fn ctx() -> Arc<Context> {
        context(config("snk", Direction::In))
    }

    #[test]
    fn only_a_written_unsigned_3_1_1_sink_is_shared_and_the_identity_decides() {
        let a = Key::of_sink(&config("snk", Direction::In));
        assert!(a.is_some());
        assert!(a == Key::of_sink(&config("snk", Direction::In)));
        assert!(a != Key::of_sink(&config("other", Direction::In)));
        let mut with_password = config("snk", Direction::In);
        with_password.sink.password = Some(crate::vocab::Secret::new("pw"));
        assert!(a != Key::of_sink(&with_password));
        let mut v5 = config("snk", Direction::In);
        v5.sink.protocol = Protocol::V5;
        assert!(Key::of_sink(&v5).is_none(), "MQTT 5");
        assert!(
            Key::of_sink(&config("snk", Direction::Out)).is_none(),
            "read from"
        );
    }

    #[test]
    fn only_a_read_unsigned_3_1_1_source_without_shared_subscriptions_is_shared() {
        let a = Key::of_source(&config("snk", Direction::In));
        assert!(a.is_some());
        assert!(a == Key::of_source(&config("other sink", Direction::In)));
        let mut other_client = config("snk", Direction::In);
        other_client.source.client_id = "other".into();
        assert!(a != Key::of_source(&other_client), "client id");
        assert!(
            a != Key::of_sink(&config("src", Direction::In)),
            "a source is never a sink's connection"
        );
        let mut v5 = config("snk", Direction::In);
        v5.source.protocol = Protocol::V5;
        assert!(Key::of_source(&v5).is_none(), "MQTT 5");
        assert!(
            Key::of_source(&config("snk", Direction::Out)).is_none(),
            "written to"
        );
        let mut share = config("snk", Direction::In);
        share.routes[0].share = Some("g".into());
        assert!(Key::of_source(&share).is_none(), "shared subscription");
    }

    /// A member of a shared source: its routes (`filter` to the same topic) and what they forward.
    fn source_member(id: Tenant, filter: &str) -> (Member, crate::relay::queue::Receiver<Forward>) {
        let mut c = config("snk", Direction::In);
        c.routes[0].filter = TopicFilter::parse(filter).expect("filter");
        let ctx = context(c);
        let (to_sink, forwards) = crate::relay::queue::queue();
        let router = Router::new(&ctx, Side::Source, to_sink, Arc::new(Default::default()));
        let (events, _) = mpsc::unbounded_channel();
        let member = Member {
            id,
            events,
            ctx,
            router: Some(router),
            departed: None,
            waiting: false,
            held: Vec::new(),
        };
        (member, forwards)
    }

    fn forwarded(rx: &crate::relay::queue::Receiver<Forward>) -> Vec<Forward> {
        use futures::FutureExt;
        let mut got = Vec::new();
        let _ = rx.take(&mut got).now_or_never();
        got
    }

    /// The packet ids the client was asked to acknowledge.
    fn acked(
        rx: &crate::relay::queue::Receiver<(Tenant, crate::relay::mqtt::V4Request)>,
    ) -> Vec<u16> {
        use futures::FutureExt;
        let mut got = Vec::new();
        let _ = rx.take(&mut got).now_or_never();
        got.into_iter()
            .filter_map(|(_, r)| match r {
                crate::relay::mqtt::V4Request::PubAck(pkid) => Some(pkid),
                _ => None,
            })
            .collect()
    }

    fn message(topic: &str, pkid: u16) -> crate::relay::mqtt::Message {
        crate::relay::mqtt::Message {
            topic: topic.into(),
            pkid,
            qos: rumqttc::QoS::AtLeastOnce,
            retain: false,
            payload: bytes::Bytes::from_static(b"p"),
            properties: None,
        }
    }

    #[test]
    fn a_shared_source_acknowledges_once_every_relays_copy_is_done_and_never_what_a_leaver_held_back()
     {
        let tenants = Tenants::new();
        let (a, to_a) = source_member(1, "a/#");
        let (b, to_b) = source_member(2, "a/b/#");
        tenants.lock().add(a);
        tenants.lock().add(b);
        let (client, requests) = crate::relay::mqtt::Client::detached();
        let now = std::time::Instant::now();

        // Both take it: acknowledged after the second copy, not the first.
        tenants.route(&client, &message("a/b/c", 7), now);
        let (mut for_a, mut for_b) = (forwarded(&to_a), forwarded(&to_b));
        assert_eq!((for_a.len(), for_b.len()), (1, 1));
        for_a.pop().expect("a's copy").settle();
        assert!(acked(&requests).is_empty(), "acknowledged before b's copy");
        for_b.pop().expect("b's copy").settle();
        assert_eq!(acked(&requests), vec![7]);

        // Nobody takes it: acknowledged at once, so that it does not clog the session.
        tenants.route(&client, &message("x/y", 8), now);
        assert!(forwarded(&to_a).is_empty() && forwarded(&to_b).is_empty());
        assert_eq!(acked(&requests), vec![8]);

        // b has left: a's copy is done, but the original stays unacknowledged (b's successor
        // gets it when the connection reconnects); b's backlog is no longer waited for.
        tenants.lock().members[1].departed = Some(now);
        assert_eq!(tenants.rejoin_at(), Some(now + REJOIN_GRACE));
        tenants.route(&client, &message("a/b/e", 9), now);
        assert!(forwarded(&to_b).is_empty());
        forwarded(&to_a).pop().expect("a's copy").settle();
        assert!(acked(&requests).is_empty(), "acknowledged what b held back");
        // Only b would take it: held back, not acknowledged.
        tenants.lock().members[0].router = None;
        tenants.route(&client, &message("a/b/d", 10), now);
        assert!(acked(&requests).is_empty(), "acknowledged what b held back");

        // Within the grace and with no one joined since, b stays.
        tenants.forget_departed();
        assert_eq!(tenants.lock().members.len(), 2);
        // c joins after b left (b's successor): it holds back too until the connection
        // reconnects, which is due at once; then b is forgotten and c takes what it reads.
        let (mut c, to_c) = source_member(3, "a/#");
        c.waiting = true;
        tenants.lock().add(c);
        tenants.lock().last_join = Some(now + Duration::from_millis(1));
        tenants.route(&client, &message("a/b/f", 11), now);
        assert!(forwarded(&to_c).is_empty(), "took a message before b's");
        assert!(acked(&requests).is_empty());
        assert!(
            tenants
                .rejoin_at()
                .is_some_and(|at| at <= std::time::Instant::now())
        );
        tenants.forget_departed();
        assert_eq!(tenants.lock().members.len(), 2);
        assert_eq!(tenants.rejoin_at(), None);
        tenants.route(&client, &message("a/b/g", 12), now);
        forwarded(&to_c).pop().expect("c's copy").settle();
        assert_eq!(acked(&requests), vec![12]);
    }

    #[test]
    fn a_source_with_no_relay_on_it_acknowledges_nothing() {
        let tenants = Tenants::new();
        let (client, requests) = crate::relay::mqtt::Client::detached();
        tenants.route(&client, &message("a/x", 7), std::time::Instant::now());
        assert!(
            acked(&requests).is_empty(),
            "acknowledged with nobody to take it: the broker would not send it again"
        );
        // With a relay on it, a message no route wants is acknowledged as unwanted.
        let (m, _rx) = source_member(1, "b/#");
        tenants.lock().add(m);
        tenants.route(&client, &message("a/x", 8), std::time::Instant::now());
        assert_eq!(acked(&requests), vec![8]);
    }

    #[test]
    fn with_many_relays_on_a_source_each_message_reaches_only_those_whose_filters_match() {
        let tenants = Tenants::new();
        let mut queues = Vec::new();
        for i in 0..10 {
            let filter = if i == 9 {
                "+/3/x".to_owned()
            } else {
                format!("t/{i}/#")
            };
            let (m, rx) = source_member(i, &filter);
            tenants.lock().add(m);
            queues.push(rx);
        }
        let (client, requests) = crate::relay::mqtt::Client::detached();
        let now = std::time::Instant::now();
        tenants.route(&client, &message("t/3/x", 1), now);
        let got: Vec<usize> = queues.iter().map(|q| forwarded(q).len()).collect();
        assert_eq!(got, vec![0, 0, 0, 1, 0, 0, 0, 0, 0, 1]);
        assert!(
            acked(&requests).is_empty(),
            "acknowledged before the copies were done"
        );
        tenants.route(&client, &message("u/3/y", 2), now);
        assert_eq!(acked(&requests), vec![2], "nobody's: acknowledged at once");
        tenants.route(&client, &message("t/7", 3), now);
        forwarded(&queues[7])
            .pop()
            .expect("t/7/# matches t/7")
            .settle();
        assert_eq!(acked(&requests), vec![3]);
    }

    #[test]
    fn each_tenant_hears_of_its_own_publishes_and_only_the_suspect_is_told_so() {
        let tenants = Tenants::new();
        let mut rx = Vec::new();
        for id in [3, 5] {
            let (tx, r) = mpsc::unbounded_channel();
            tenants.lock().add(Member {
                id,
                events: tx,
                ctx: ctx(),
                router: None,
                departed: None,
                waiting: false,
                held: Vec::new(),
            });
            rx.push(r);
        }
        let sent = |tenant, pkid| Progress::Sent { tenant, pkid };
        let acked = |tenant, pkid| Progress::Acked {
            tenant,
            pkid,
            refused: None,
        };
        let pkids = |r: &mut mpsc::UnboundedReceiver<ConnEvent>| {
            let mut runs = Vec::new();
            while let Ok(ev) = r.try_recv() {
                match ev {
                    ConnEvent::Progress(steps) => runs.push(
                        steps
                            .iter()
                            .map(|s| match s {
                                Progress::Sent { pkid, .. } => format!("s{pkid}"),
                                Progress::Acked { pkid, .. } => format!("a{pkid}"),
                            })
                            .collect::<Vec<_>>()
                            .join(" "),
                    ),
                    ConnEvent::Disconnected { suspect } => runs.push(format!("end {suspect}")),
                    ConnEvent::Connected { .. } => runs.push("up".into()),
                }
            }
            runs
        };
        // Written QoS 1 publishes wake nobody: tenant 3's and 5's are held. Tenant 9 has
        // left: its step goes nowhere.
        tenants.progress(vec![
            sent(3, 1),
            sent(3, 2),
            sent(5, 3),
            sent(9, 4),
            sent(3, 5),
        ]);
        assert!(
            pkids(&mut rx[0]).is_empty(),
            "woken for a written QoS 1 publish"
        );
        assert!(pkids(&mut rx[1]).is_empty());
        // An acknowledgement hands over what was held before it, in order, in one event; a
        // QoS 0 publish (packet id 0) is done once written, so it is handed over at once.
        tenants.progress(vec![acked(3, 1), sent(5, 0), acked(3, 2), sent(3, 6)]);
        assert_eq!(pkids(&mut rx[0]), vec!["s1 s2 s5 a1 a2 s6"]);
        assert_eq!(pkids(&mut rx[1]), vec!["s3 s0"]);
        tenants.progress(vec![sent(5, 7)]);
        assert!(pkids(&mut rx[1]).is_empty());
        // The connection's end hands over what is held first.
        tenants.disconnected(Some(5));
        assert_eq!(pkids(&mut rx[0]), vec!["end false"]);
        assert_eq!(pkids(&mut rx[1]), vec!["s7", "end true"]);
        tenants.state(Side::Sink, SideState::Disrupted, Some("sink: gone".into()));
        for m in &tenants.lock().members {
            assert_eq!(m.ctx.report.status.borrow().sink, SideState::Disrupted);
        }
    }
}
