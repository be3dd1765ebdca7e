//! The one backoff formula: capped exponential growth with jitter. Reconnects, retried
//! reconciliations and retried calls all wait by it.

use std::time::Duration;

/// Upper bound of the wait before retry number `retry` (0-based): `base * 2^retry`, at most `cap`.
pub fn ceiling(base: Duration, cap: Duration, retry: u32) -> Duration {
    let factor = 1u32.checked_shl(retry.min(20)).unwrap_or(u32::MAX);
    base.saturating_mul(factor).min(cap)
}

/// A random wait in `[ceiling / 2, ceiling]` before retry number `retry` (0-based). Half of it is
/// jitter, so that many clients failing together do not come back together.
pub fn delay(base: Duration, cap: Duration, retry: u32) -> Duration {
    let ceiling = ceiling(base, cap, retry);
    ceiling / 2 + ceiling.mul_f64(fastrand::f64()) / 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_caps_and_jitters_within_bounds() {
        let (base, cap) = (Duration::from_millis(200), Duration::from_secs(10));
        assert_eq!(ceiling(base, cap, 0), Duration::from_millis(200));
        assert_eq!(ceiling(base, cap, 3), Duration::from_millis(1600));
        assert_eq!(ceiling(base, cap, 10), cap);
        assert_eq!(ceiling(base, cap, u32::MAX), cap);
        for retry in 0..12 {
            let d = delay(base, cap, retry);
            let c = ceiling(base, cap, retry);
            assert!(d >= c / 2 && d <= c, "retry {retry}: {d:?}");
        }
    }
}
