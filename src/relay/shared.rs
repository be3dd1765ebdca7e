//! Sink connections shared by relays. Relays that publish to the same broker under the same
//! identity (URL, client id, credentials, TLS trust, MQTT 3.1.1) and read nothing from it use
//! one connection: a broker takes one connection per client id, so two relays with the same
//! identity would otherwise take the connection from each other in turn, and every idle
//! connection costs memory on both ends.
//!
//! Each relay stays a tenant with its own publisher and outbox. The connection tags every
//! publish with its tenant ([`Tenant`]), so that what is written and acknowledged goes back
//! to the publisher it came from; a tenant that joins while the connection is up is told at
//! once. The last tenant to leave closes the connection; a connection opened afterwards with the
//! same identity waits until the old one has closed, so the broker never sees a takeover.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::backlog::Backlog;
use super::config::{Endpoint, Protocol, RelayConfig};
use super::connection::Connection;
use super::mqtt::Tenant;
use super::peers::{ConnEvent, Member, Peers, Tenants};
use super::routing::Router;
use super::status::{RelayStats, RelayStatus, Reporter, Side, SideState};
use super::tls::TlsTrust;
use super::{Context, queue};

/// What makes two sink endpoints one connection. Never printed (it holds the password).
#[derive(Clone, PartialEq, Eq, Hash)]
pub(super) struct Key {
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
}

impl Key {
    /// The sharing key of `config`'s sink, if the sink can be shared: MQTT 3.1.1, not signed
    /// (a signed URL belongs to one bridge's credentials), written to and never read from.
    pub fn of_sink(config: &RelayConfig) -> Option<Key> {
        let sink = &config.sink;
        let reads_sink = config
            .routes
            .iter()
            .any(|r| r.direction == Side::Sink.reads());
        let writes_sink = config
            .routes
            .iter()
            .any(|r| r.direction == Side::Sink.writes());
        if sink.protocol != Protocol::V311 || sink.signer.is_some() || reads_sink || !writes_sink {
            return None;
        }
        Some(Key {
            url: sink.url.clone(),
            client_id: sink.client_id.clone(),
            username: sink.username.clone(),
            password: sink.password.as_ref().map(|p| p.expose().to_owned()),
            tls: match &sink.tls {
                TlsTrust::System => (0, 0),
                TlsTrust::Custom(c) => (1, Arc::as_ptr(c) as usize),
                TlsTrust::InsecureSkipVerify => (2, 0),
            },
            keep_alive: sink.keep_alive,
            clean_session: sink.clean_session,
            max_message_bytes: sink.max_message_bytes,
            window: config.window,
        })
    }
}

/// One shared connection.
struct Shared {
    tenants: Arc<Tenants>,
    stop: watch::Sender<bool>,
    /// Never set: a sink connection has no shared subscriptions to leave.
    _retire: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

type Pool = Mutex<HashMap<Key, Shared>>;

fn lock(pool: &Pool) -> MutexGuard<'_, HashMap<Key, Shared>> {
    pool.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The shared sink connections of one process.
#[derive(Clone, Default)]
pub struct ConnectionPool(Arc<Pool>);

impl ConnectionPool {
    /// Joins `ctx`'s relay to the shared connection for `key` (opening it if there is none),
    /// with `events` going to the relay's sink publisher. Must run inside a Tokio runtime.
    pub(super) fn join(
        &self,
        key: Key,
        endpoint: Endpoint,
        ctx: Arc<Context>,
        events: mpsc::UnboundedSender<ConnEvent>,
    ) -> Membership {
        let mut pool = lock(&self.0);
        // Connections closed for good and not reopened are forgotten.
        pool.retain(|_, s| {
            !(s.tenants.is_empty() && s.task.as_ref().is_none_or(|t| t.is_finished()))
        });
        let shared = match pool.entry(key.clone()) {
            Entry::Occupied(o) if !o.get().tenants.is_empty() => o.into_mut(),
            Entry::Occupied(mut o) => {
                // The last one with this identity is closing: the new one waits for it.
                let previous = o.get_mut().task.take();
                *o.get_mut() = open(&ctx, endpoint, previous);
                o.into_mut()
            }
            Entry::Vacant(v) => v.insert(open(&ctx, endpoint, None)),
        };
        let mut t = shared.tenants.lock();
        let id = t.next;
        t.next += 1;
        if let Some(client) = &t.client {
            let _ = events.send(ConnEvent::Connected {
                client: client.for_tenant(id),
            });
        }
        if let Some((state, error)) = &t.state {
            ctx.report.state(Side::Sink, *state, error.clone());
        }
        tracing::debug!(bridge = %ctx.report.name, tenant = id, tenants = t.members.len() + 1, "sharing the sink connection");
        t.members.push(Member {
            id,
            events,
            ctx: ctx.clone(),
        });
        drop(t);
        Membership {
            pool: self.clone(),
            key,
            id,
            ctx,
        }
    }

    /// Returns once every connection that no relay uses any more has closed.
    pub async fn closed(&self) {
        loop {
            let closing = lock(&self.0)
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
                sink: SideState::Connecting,
                last_error: None,
                last_dropped: None,
            })
            .0,
        },
        config,
        draining: Arc::new(AtomicBool::new(false)),
    })
}

/// Opens a shared connection (after `previous` has closed).
fn open(first: &Context, endpoint: Endpoint, previous: Option<JoinHandle<()>>) -> Shared {
    let tenants = Arc::new(Tenants::new());
    let name = format!(
        "{} (sink connection {}, shared)",
        first.config.name, endpoint.client_id
    );
    let mut config = first.config.clone();
    config.name = name;
    config.routes.clear();
    let ctx = context(config);
    let (stop, stop_rx) = watch::channel(false);
    let (retire, retire_rx) = watch::channel(false);
    // Nothing is read from a shared sink, so nothing is routed (the queue has no reader).
    let (to_nowhere, _) = queue::queue();
    let (retired, _) = mpsc::unbounded_channel();
    let connection = Connection {
        span: super::task_span(super::Task::Connection, &ctx, Side::Sink),
        router: Router::new(&ctx, Side::Sink, to_nowhere, Arc::new(Backlog::default())),
        ctx,
        side: Side::Sink,
        endpoint,
        peers: Peers::Shared(tenants.clone()),
        stop: stop_rx,
        retire: retire_rx,
        retired,
    };
    let task = tokio::spawn(async move {
        if let Some(previous) = previous {
            let _ = previous.await;
        }
        connection.run().await;
    });
    Shared {
        tenants,
        stop,
        _retire: retire,
        task: Some(task),
    }
}

/// A relay's place on a shared connection; dropping it leaves (the last one out closes the
/// connection).
pub(super) struct Membership {
    pool: ConnectionPool,
    key: Key,
    id: Tenant,
    ctx: Arc<Context>,
}

impl Drop for Membership {
    fn drop(&mut self) {
        let pool = lock(&self.pool.0);
        if let Some(shared) = pool.get(&self.key) {
            let mut t = shared.tenants.lock();
            if let Ok(i) = t.members.binary_search_by_key(&self.id, |m| m.id) {
                t.members.remove(i);
            }
            if t.members.is_empty() {
                let _ = shared.stop.send(true);
            }
        }
        drop(pool);
        self.ctx.report.state(Side::Sink, SideState::Stopped, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::config::RouteConfig;
    use crate::relay::peers::Progress;
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
    fn each_tenant_hears_of_its_own_publishes_and_only_the_suspect_is_told_so() {
        let tenants = Tenants::new();
        let mut rx = Vec::new();
        for id in [3, 5] {
            let (tx, r) = mpsc::unbounded_channel();
            tenants.lock().members.push(Member {
                id,
                events: tx,
                ctx: ctx(),
            });
            rx.push(r);
        }
        let sent = |tenant, pkid| Progress::Sent { tenant, pkid };
        // Tenant 9 has left: its step goes nowhere.
        tenants.progress(vec![
            sent(3, 1),
            sent(3, 2),
            sent(5, 3),
            sent(9, 4),
            sent(3, 5),
        ]);
        let pkids = |r: &mut mpsc::UnboundedReceiver<ConnEvent>| {
            let mut runs = Vec::new();
            while let Ok(ev) = r.try_recv() {
                match ev {
                    ConnEvent::Progress(steps) => runs.push(
                        steps
                            .iter()
                            .map(|s| match s {
                                Progress::Sent { pkid, .. } | Progress::Acked { pkid, .. } => *pkid,
                            })
                            .collect::<Vec<_>>(),
                    ),
                    _ => panic!("not progress"),
                }
            }
            runs
        };
        assert_eq!(pkids(&mut rx[0]), vec![vec![1, 2], vec![5]]);
        assert_eq!(pkids(&mut rx[1]), vec![vec![3]]);
        tenants.disconnected(Some(5));
        let told = |r: &mut mpsc::UnboundedReceiver<ConnEvent>| match r.try_recv() {
            Ok(ConnEvent::Disconnected { suspect }) => suspect,
            _ => panic!("not told of the disconnect"),
        };
        assert_eq!((told(&mut rx[0]), told(&mut rx[1])), (false, true));
        tenants.state(Side::Sink, SideState::Disrupted, Some("sink: gone".into()));
        for m in &tenants.lock().members {
            assert_eq!(m.ctx.report.status.borrow().sink, SideState::Disrupted);
        }
    }
}
