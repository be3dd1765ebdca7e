//! Per-object exponential backoff for failed reconciliations, reset on success (kube-runtime
//! has none built in).

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

    /// Records a failure and returns how long to wait: base * 2^(failures-1), capped, with up to
    /// 10% jitter.
    pub fn failed(&self, key: &str) -> Duration {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(key.to_owned()).or_insert(0);
        *n = n.saturating_add(1);
        let exp = (*n - 1).min(16);
        let delay = self.base.saturating_mul(1 << exp).min(self.cap);
        delay + delay.mul_f64(fastrand::f64() * 0.1)
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
        let d1 = b.failed("a");
        let d2 = b.failed("a");
        let d3 = b.failed("a");
        let d4 = b.failed("a");
        assert!(d1 >= Duration::from_secs(1) && d1 < Duration::from_millis(1101));
        assert!(d2 >= Duration::from_secs(2) && d2 < Duration::from_millis(2201));
        assert!(d3 >= Duration::from_secs(4));
        assert!(d4 >= Duration::from_secs(5) && d4 <= Duration::from_millis(5500));
        assert_eq!(b.failures("b"), 0);
        b.reset("a");
        assert_eq!(b.failures("a"), 0);
        assert!(b.failed("a") < Duration::from_millis(1101));
    }
}
