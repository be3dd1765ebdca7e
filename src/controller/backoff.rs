//! Per-object failure counts for retried reconciliations, reset on success (kube-runtime has
//! none built in); the wait itself is [`crate::backoff::delay`].

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// Failure counts per object key.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    failures: Mutex<HashMap<String, u32>>,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Duration::from_secs(2), Duration::from_secs(300))
    }
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Records a failure and returns how long to wait: [`crate::backoff::delay`] for the
    /// object's failure count.
    pub fn failed(&self, key: &str) -> Duration {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(key.to_owned()).or_insert(0);
        *n = n.saturating_add(1);
        crate::backoff::delay(self.base, self.cap, *n - 1)
    }

    /// Forgets the failures of an object.
    pub fn reset(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    /// Current failure count (tests and diagnostics).
    pub fn failures(&self, key: &str) -> u32 {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .copied()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_caps_and_resets() {
        let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(5));
        let within = |d: Duration, ceiling: u64| {
            d >= Duration::from_millis(ceiling * 500) && d <= Duration::from_secs(ceiling)
        };
        assert!(within(b.failed("a"), 1));
        assert!(within(b.failed("a"), 2));
        assert!(within(b.failed("a"), 4));
        assert!(within(b.failed("a"), 5));
        assert_eq!(b.failures("a"), 4);
        assert_eq!(b.failures("b"), 0);
        b.reset("a");
        assert_eq!(b.failures("a"), 0);
        assert!(within(b.failed("a"), 1));
    }
}
