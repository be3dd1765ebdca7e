//! Keeps one relay per bridge: starts, restarts on a changed configuration (after draining),
//! stops. Keys are opaque strings (`namespace/name` from the controller).

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{Mutex, watch};

use super::config::RelayConfig;
use super::relay::{self, RelayHandle, RelayStats, RelayStatus};
use crate::telemetry::Metrics;

struct Running {
    fingerprint: u64,
    handle: RelayHandle,
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
    running: Mutex<HashMap<String, Running>>,
    metrics: Option<Arc<Metrics>>,
}

impl RelayManager {
    pub fn new(metrics: Option<Arc<Metrics>>) -> Self {
        Self {
            running: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// Makes sure the relay for `key` runs with the configuration identified by `fingerprint`;
    /// a relay with another fingerprint is drained and replaced by one built from `config`.
    pub async fn ensure(&self, key: &str, fingerprint: u64, config: RelayConfig) -> RelayView {
        let old = {
            let mut running = self.running.lock().await;
            match running.get(key) {
                Some(r) if r.fingerprint == fingerprint => {
                    return RelayView {
                        status: r.handle.status(),
                        stats: r.handle.stats(),
                        started: false,
                    };
                }
                _ => running.remove(key),
            }
        };
        if let Some(old) = old {
            tracing::info!(
                bridge = key,
                "configuration changed: draining the old relay"
            );
            old.handle.stop().await;
        }
        let handle = relay::start(config, self.metrics.clone());
        let view = RelayView {
            status: handle.status(),
            stats: handle.stats(),
            started: true,
        };
        let replaced = self.running.lock().await.insert(
            key.to_owned(),
            Running {
                fingerprint,
                handle,
            },
        );
        if let Some(r) = replaced {
            // A concurrent ensure for the same key won the race; stop the loser.
            r.handle.stop().await;
        }
        view
    }

    /// Stops the relay of `key`, draining it. Returns whether one was running.
    pub async fn stop(&self, key: &str) -> bool {
        let old = self.running.lock().await.remove(key);
        match old {
            Some(r) => {
                r.handle.stop().await;
                true
            }
            None => false,
        }
    }

    /// Stops every relay whose key `keep` rejects.
    pub async fn retain(&self, keep: impl Fn(&str) -> bool) -> Vec<String> {
        let gone: Vec<(String, Running)> = {
            let mut running = self.running.lock().await;
            let keys: Vec<String> = running.keys().filter(|k| !keep(k)).cloned().collect();
            keys.into_iter()
                .filter_map(|k| running.remove(&k).map(|r| (k, r)))
                .collect()
        };
        let names: Vec<String> = gone.iter().map(|(k, _)| k.clone()).collect();
        futures::future::join_all(gone.into_iter().map(|(_, r)| r.handle.stop())).await;
        names
    }

    /// Stops every relay (shutdown).
    pub async fn stop_all(&self) {
        self.retain(|_| false).await;
    }

    /// Keys of the running relays.
    pub async fn keys(&self) -> Vec<String> {
        self.running.lock().await.keys().cloned().collect()
    }

    /// The relay of `key`, if it runs.
    pub async fn view(&self, key: &str) -> Option<RelayView> {
        self.running.lock().await.get(key).map(|r| RelayView {
            status: r.handle.status(),
            stats: r.handle.stats(),
            started: false,
        })
    }
}
