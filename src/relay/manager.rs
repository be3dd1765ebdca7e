//! Keeps one relay per bridge: starts, restarts on a changed configuration (after draining),
//! stops. Each relay is one connection of one bridge ([`ConnectionKey`]).

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{Mutex, watch};

use super::config::RelayConfig;
use super::key::ConnectionKey;
use super::shared::ConnectionPool;
use super::status::ObserverSource;
use super::{RelayHandle, RelayStats, RelayStatus, start_in};

struct Running {
    fingerprint: u64,
    handle: RelayHandle,
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
}

impl RelayManager {
    pub fn new(observers: Option<Arc<dyn ObserverSource>>) -> Self {
        Self {
            running: Mutex::new(HashMap::new()),
            observers,
            paused: std::sync::atomic::AtomicBool::new(false),
            permit: None,
            pool: ConnectionPool::default(),
        }
    }

    /// Every relay started here asks `permit` before each connection attempt.
    pub fn with_permit(mut self, permit: super::config::ConnectPermit) -> Self {
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
            match running.get(key) {
                Some(r) if r.fingerprint == fingerprint => {
                    return Some(RelayView {
                        status: r.handle.status(),
                        stats: r.handle.stats(),
                        started: false,
                    });
                }
                _ => running.remove(key),
            }
        };
        if let Some(old) = old {
            tracing::info!(
                bridge = %key,
                "configuration changed: draining the old relay"
            );
            old.handle.stop().await;
        }
        let mut running = self.running.lock().await;
        // Checked again under the lock: pause() may have run while the old relay drained.
        if self.is_paused() {
            return None;
        }
        let mut config = config;
        if config.connect_permit.is_none() {
            config.connect_permit = self.permit.clone();
        }
        let observer = self.observers.as_ref().map(|o| o.observer(&config.name));
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
    /// subscriptions, then drain); returns their keys.
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
        futures::future::join_all(gone.into_iter().map(|(_, r)| async move {
            match how {
                End::Stop => r.handle.stop().await,
                End::Retire => r.handle.retire().await,
                End::Abort => r.handle.abort().await,
            }
        }))
        .await;
        names
    }

    /// Stops every relay (shutdown), and returns once their connections are closed.
    pub async fn stop_all(&self) {
        self.retain(|_| false).await;
        self.pool.closed().await;
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
