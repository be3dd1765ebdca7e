//! A client-side rate limiter that spaces requests evenly (no bursts), shared by every client of
//! one region and role (see `aws::clients`).

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Spaces calls `1/rate` seconds apart.
#[derive(Debug)]
pub struct RateLimiter {
    interval: Duration,
    next: Mutex<Option<Instant>>,
}

impl RateLimiter {
    /// `per_second` requests per second; values at or below zero disable limiting.
    pub fn new(per_second: f64) -> Self {
        let interval = if per_second > 0.0 {
            Duration::from_secs_f64(1.0 / per_second)
        } else {
            Duration::ZERO
        };
        Self {
            interval,
            next: Mutex::new(None),
        }
    }

    /// Waits for this caller's slot.
    pub async fn acquire(&self) {
        if self.interval.is_zero() {
            return;
        }
        let slot = {
            let now = Instant::now();
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            let slot = next.map_or(now, |n| n.max(now));
            *next = Some(slot + self.interval);
            slot
        };
        tokio::time::sleep_until(slot).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn spaces_calls_evenly() {
        let limiter = RateLimiter::new(10.0);
        let start = Instant::now();
        for _ in 0..11 {
            limiter.acquire().await;
        }
        // The first call goes at once, the next ten 100 ms apart.
        assert_eq!(start.elapsed(), Duration::from_millis(1000));
    }

    #[tokio::test(start_paused = true)]
    async fn zero_disables() {
        let limiter = RateLimiter::new(0.0);
        let start = Instant::now();
        for _ in 0..100 {
            limiter.acquire().await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
