//! Keeps one relay per bridge: starts, restarts on a changed configuration (after draining),
//! stops. Each relay is one connection of one bridge ([`ConnectionKey`]).

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{Mutex, watch};

use super::config::RelayConfig;
use super::key::ConnectionKey;
use super::routing::subscriptions;
use super::session::{END_SESSION_LIMIT, KeptSessions, end_for_good};
use super::shared::ConnectionPool;
use super::status::{ObserverSource, Side, SideState};
use super::{RelayHandle, RelayStats, RelayStatus, start_in};

struct Running {
    fingerprint: u64,
    handle: RelayHandle,
    /// Whether retiring it ends its kept sessions (the latest configuration's say).
    end_sessions: bool,
    /// What it subscribes on the source and on the sink, for the relay that replaces it.
    subscribed: [Subscribed; 2],
}

/// What a relay subscribes on one side, with which client id on which broker.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Subscribed {
    url: String,
    client_id: String,
    persistent: bool,
    filters: Vec<String>,
    /// What it was given to unsubscribe from a kept session (its own predecessor's).
    unsubscribe: Vec<String>,
}

impl Subscribed {
    fn of(config: &RelayConfig, side: Side) -> Self {
        let e = config.endpoint(side);
        Self {
            url: e.url.clone(),
            client_id: e.client_id.clone(),
            persistent: !e.clean_session,
            filters: subscribed(config, side),
            unsubscribe: e.unsubscribe.clone(),
        }
    }
}

/// The topic filters a relay of `config` subscribes on `side`, folded as its connection
/// subscribes them (a filter within another is left out).
pub fn subscribed(config: &RelayConfig, side: Side) -> Vec<String> {
    subscriptions(config.reading(side))
        .into_iter()
        .map(|(f, _)| f)
        .collect()
}

/// What the relay about to start (`new`) should unsubscribe from a session the broker kept,
/// less what it subscribes itself. With a relay it replaces here (`old`, and whether that one
/// connected): what `old` subscribed with the same client id on the same broker, and what `old`
/// had been given to unsubscribe unless it connected (then it did). Without one (the first
/// relay of this process): what `new` was given (`Endpoint::unsubscribe`: the last relay's
/// subscriptions, as the bridge's status recorded them).
fn to_unsubscribe(old: Option<(&Subscribed, bool)>, new: &Subscribed) -> Vec<String> {
    let candidates: Vec<&String> = match old {
        None => new.unsubscribe.iter().collect(),
        Some((old, _))
            if old.url != new.url || old.client_id != new.client_id || !old.persistent =>
        {
            Vec::new()
        }
        Some((old, connected)) => {
            let pending = if connected {
                &[][..]
            } else {
                &old.unsubscribe[..]
            };
            old.filters.iter().chain(pending).collect()
        }
    };
    let mut gone: Vec<String> = candidates
        .into_iter()
        .filter(|f| !new.filters.contains(f))
        .cloned()
        .collect();
    gone.sort();
    gone.dedup();
    gone
}

/// How long a relay starting again, or the shutdown, waits for sessions being ended.
const SESSIONS_END_WAIT: std::time::Duration = END_SESSION_LIMIT.saturating_mul(3);

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How [`RelayManager::end_where`] ends relays.
#[derive(Clone, Copy)]
enum End {
    /// Drain, then disconnect.
    Stop,
    /// Leave the shared subscriptions, then as `Stop`.
    Retire,
    /// At once.
    Abort,
}

/// A running relay as the caller sees it.
pub struct RelayView {
    pub status: watch::Receiver<RelayStatus>,
    pub stats: Arc<RelayStats>,
    /// Whether this call (re)started the relay.
    pub started: bool,
}

/// All relays of the process.
pub struct RelayManager {
    running: Mutex<HashMap<ConnectionKey, Running>>,
    /// Makes each relay's observer (the process's metrics).
    observers: Option<Arc<dyn ObserverSource>>,
    /// While paused (this replica is not the leader) no relay may start.
    paused: std::sync::atomic::AtomicBool,
    /// Given to every relay started here.
    permit: Option<super::config::ConnectPermit>,
    /// Sink connections the relays started here share (see `relay::shared`).
    pool: ConnectionPool,
    /// Sessions being ended for relays retired here, by key (done once the value is true): a
    /// relay started again under that key waits, so that its connections are not taken over by
    /// the ending ones, nor its new session ended.
    ending: Arc<std::sync::Mutex<HashMap<ConnectionKey, watch::Receiver<bool>>>>,
}

impl RelayManager {
    pub fn new(observers: Option<Arc<dyn ObserverSource>>) -> Self {
        Self {
            running: Mutex::new(HashMap::new()),
            observers,
            paused: std::sync::atomic::AtomicBool::new(false),
            permit: None,
            pool: ConnectionPool::default(),
            ending: Arc::default(),
        }
    }

    /// Ends, in the background, the kept sessions of the retired relay `key`.
    fn end_sessions(&self, key: ConnectionKey, sessions: KeptSessions) {
        let (done, waiting) = watch::channel(false);
        lock(&self.ending).insert(key.clone(), waiting);
        let ending = self.ending.clone();
        let permit = self.permit.clone();
        tokio::spawn(async move {
            let name = key.to_string();
            let (permit, observer) = (permit.as_ref(), sessions.observer.as_ref());
            futures::future::join_all(
                sessions
                    .endpoints
                    .iter()
                    .map(|e| end_for_good(e, &name, permit, observer)),
            )
            .await;
            let _ = done.send(true);
            let mut ending = lock(&ending);
            if ending
                .get(&key)
                .is_some_and(|w| w.same_channel(&done.subscribe()))
            {
                ending.remove(&key);
            }
        });
    }

    /// Waits until no session is being ended for `key` (or for any key), at most as long as
    /// ending one may take.
    async fn sessions_ended(&self, key: Option<&ConnectionKey>) {
        let waiting: Vec<watch::Receiver<bool>> = lock(&self.ending)
            .iter()
            .filter(|(k, _)| key.is_none_or(|key| *k == key))
            .map(|(_, w)| w.clone())
            .collect();
        let all = futures::future::join_all(waiting.into_iter().map(|mut w| async move {
            let _ = w.wait_for(|done| *done).await;
        }));
        let _ = tokio::time::timeout(SESSIONS_END_WAIT, all).await;
    }

    /// Every relay started here asks `permit` before each connection attempt.
    pub fn with_permit(mut self, permit: super::config::ConnectPermit) -> Self {
        self.pool = ConnectionPool::with_permit(permit.clone());
        self.permit = Some(permit);
        self
    }

    /// Stops every relay at once, without draining, and refuses to start new ones until
    /// [`RelayManager::resume`]. Returns when every connection is closed.
    pub async fn pause(&self) {
        self.paused.store(true, std::sync::atomic::Ordering::SeqCst);
        let all: Vec<Running> = self.running.lock().await.drain().map(|(_, r)| r).collect();
        futures::future::join_all(all.into_iter().map(|r| r.handle.abort())).await;
        self.pool.closed().await;
    }

    /// Allows relays to start again.
    pub fn resume(&self) {
        self.paused
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Makes sure the relay for `key` runs with the configuration identified by `fingerprint`;
    /// a relay with another fingerprint is drained and replaced by one built from `config`.
    /// Returns `None` while paused.
    pub async fn ensure(
        &self,
        key: &ConnectionKey,
        fingerprint: u64,
        config: RelayConfig,
    ) -> Option<RelayView> {
        let old = {
            let mut running = self.running.lock().await;
            if self.is_paused() {
                return None;
            }
            match running.get_mut(key) {
                Some(r) if r.fingerprint == fingerprint => {
                    r.end_sessions = config.end_sessions;
                    return Some(RelayView {
                        status: r.handle.status(),
                        stats: r.handle.stats(),
                        started: false,
                    });
                }
                _ => running.remove(key),
            }
        };
        // A route removed (or changed) leaves its subscription in a persistent session: the
        // new relay removes it when it finds the session kept.
        let mut config = config;
        let state = old.as_ref().map(|o| o.handle.status().borrow().clone());
        for (i, side) in [Side::Source, Side::Sink].into_iter().enumerate() {
            let old = old.as_ref().zip(state.as_ref()).map(|(o, s)| {
                let connected = match side {
                    Side::Source => s.source,
                    Side::Sink => s.sink,
                } == SideState::Connected;
                (&o.subscribed[i], connected)
            });
            let gone = to_unsubscribe(old, &Subscribed::of(&config, side));
            if !gone.is_empty() {
                tracing::info!(bridge = %key, side = side.as_str(), filters = ?gone, "subscriptions the configuration no longer makes are removed from a kept session");
            }
            config.endpoint_mut(side).unsubscribe = gone;
        }
        if let Some(old) = old {
            tracing::info!(
                bridge = %key,
                "configuration changed: draining the old relay"
            );
            old.handle.stop().await;
        }
        // A relay of this key that retired (its bridge deleted and made again) may still be
        // ending its sessions.
        self.sessions_ended(Some(key)).await;
        let mut running = self.running.lock().await;
        // Checked again under the lock: pause() may have run while the old relay drained.
        if self.is_paused() {
            return None;
        }
        if config.connect_permit.is_none() {
            config.connect_permit = self.permit.clone();
        }
        let observer = self.observers.as_ref().map(|o| o.observer(&config.name));
        let subscribed = [
            Subscribed::of(&config, Side::Source),
            Subscribed::of(&config, Side::Sink),
        ];
        let end_sessions = config.end_sessions;
        let handle = start_in(config, observer, Some(&self.pool));
        let view = RelayView {
            status: handle.status(),
            stats: handle.stats(),
            started: true,
        };
        let replaced = running.insert(
            key.clone(),
            Running {
                fingerprint,
                handle,
                end_sessions,
                subscribed,
            },
        );
        drop(running);
        if let Some(r) = replaced {
            // A concurrent ensure for the same key won the race; stop the loser.
            r.handle.stop().await;
        }
        Some(view)
    }

    /// Stops the relay of `key`, draining it. Returns whether one was running.
    pub async fn stop(&self, key: &ConnectionKey) -> bool {
        !self.end_where(|k| k == key, End::Stop).await.is_empty()
    }

    /// Stops the relay of `key` at once, without draining (it may no longer run here).
    pub async fn abort(&self, key: &ConnectionKey) -> bool {
        !self.end_where(|k| k == key, End::Abort).await.is_empty()
    }

    /// Stops at once, without draining, every relay whose key `which` accepts; returns their keys.
    pub async fn abort_where(&self, which: impl Fn(&ConnectionKey) -> bool) -> Vec<ConnectionKey> {
        self.end_where(which, End::Abort).await
    }

    /// Retires every relay whose key `which` accepts (gone for good: they leave their shared
    /// subscriptions, then drain, and, with [`RelayConfig::end_sessions`], the sessions the
    /// brokers kept for them are ended in the background); returns their keys.
    pub async fn retire_where(&self, which: impl Fn(&ConnectionKey) -> bool) -> Vec<ConnectionKey> {
        self.end_where(which, End::Retire).await
    }

    /// Stops every relay whose key `keep` rejects.
    pub async fn retain(&self, keep: impl Fn(&ConnectionKey) -> bool) -> Vec<ConnectionKey> {
        self.end_where(|k| !keep(k), End::Stop).await
    }

    /// Takes every relay whose key `which` accepts out of the running set, then ends them all
    /// the same way, at once; returns their keys.
    async fn end_where(
        &self,
        which: impl Fn(&ConnectionKey) -> bool,
        how: End,
    ) -> Vec<ConnectionKey> {
        let gone: Vec<(ConnectionKey, Running)> = {
            let mut running = self.running.lock().await;
            let keys: Vec<ConnectionKey> = running.keys().filter(|k| which(k)).cloned().collect();
            keys.into_iter()
                .filter_map(|k| running.remove(&k).map(|r| (k, r)))
                .collect()
        };
        let names: Vec<ConnectionKey> = gone.iter().map(|(k, _)| k.clone()).collect();
        futures::future::join_all(gone.into_iter().map(|(k, r)| async move {
            match how {
                End::Stop => r.handle.stop().await,
                End::Retire => {
                    let sessions = r.handle.retire(r.end_sessions).await;
                    if !sessions.endpoints.is_empty() {
                        self.end_sessions(k, sessions);
                    }
                }
                End::Abort => r.handle.abort().await,
            }
        }))
        .await;
        names
    }

    /// Stops every relay (shutdown), and returns once their connections are closed and the
    /// sessions of retired ones ended.
    pub async fn stop_all(&self) {
        self.retain(|_| false).await;
        self.pool.closed().await;
        self.sessions_ended(None).await;
    }

    /// Keys of the running relays.
    pub async fn keys(&self) -> Vec<ConnectionKey> {
        self.running.lock().await.keys().cloned().collect()
    }

    /// The relay of `key`, if it runs.
    pub async fn view(&self, key: &ConnectionKey) -> Option<RelayView> {
        self.running.lock().await.get(key).map(|r| RelayView {
            status: r.handle.status(),
            stats: r.handle.stats(),
            started: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(filters: &[&str], unsubscribe: &[&str]) -> Subscribed {
        Subscribed {
            url: "mqtt://broker:1883".into(),
            client_id: "iotop-ns-b".into(),
            persistent: true,
            filters: filters.iter().map(|f| f.to_string()).collect(),
            unsubscribe: unsubscribe.iter().map(|f| f.to_string()).collect(),
        }
    }

    #[test]
    fn a_replacing_relay_unsubscribes_what_only_the_old_one_read_from_the_same_session() {
        let old = side(&["a/#", "b/#", "$share/g/c/#"], &[]);
        // A route removed, one kept, one whose filter changed.
        let new = side(&["a/#", "c/+/x"], &[]);
        assert_eq!(
            to_unsubscribe(Some((&old, true)), &new),
            vec!["$share/g/c/#".to_owned(), "b/#".to_owned()]
        );
        // Nothing removed: nothing to do.
        assert!(to_unsubscribe(Some((&old, true)), &old).is_empty());
        // What the old relay was still to remove, when it never connected to do it.
        let old = side(&["a/#"], &["z/#"]);
        let new = side(&["a/#"], &[]);
        assert_eq!(
            to_unsubscribe(Some((&old, false)), &new),
            vec!["z/#".to_owned()]
        );
        assert!(to_unsubscribe(Some((&old, true)), &new).is_empty());
        // A filter the new relay subscribes again is never removed.
        let new = side(&["a/#", "z/#"], &[]);
        assert!(to_unsubscribe(Some((&old, false)), &new).is_empty());
        // Another session (client id or broker), or none kept: not the new relay's to touch.
        let other_client = Subscribed {
            client_id: "other".into(),
            ..side(&[], &[])
        };
        let a = side(&["a/#"], &[]);
        assert!(to_unsubscribe(Some((&a, true)), &other_client).is_empty());
        let other_broker = Subscribed {
            url: "mqtt://elsewhere:1883".into(),
            ..side(&[], &[])
        };
        assert!(to_unsubscribe(Some((&a, true)), &other_broker).is_empty());
        let clean = Subscribed {
            persistent: false,
            ..side(&["a/#"], &[])
        };
        assert!(to_unsubscribe(Some((&clean, true)), &side(&[], &[])).is_empty());
    }

    #[test]
    fn a_first_relay_unsubscribes_what_the_status_recorded_and_it_does_not_read() {
        // Recorded: a/#, b/#; the spec now reads a/# and c/#.
        let new = side(&["a/#", "c/#"], &["a/#", "b/#"]);
        assert_eq!(to_unsubscribe(None, &new), vec!["b/#".to_owned()]);
        // Nothing recorded (a new bridge, or one from before the record): nothing to do.
        assert!(to_unsubscribe(None, &side(&["a/#"], &[])).is_empty());
    }
}
