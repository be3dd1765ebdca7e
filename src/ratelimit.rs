//! A client-side rate limiter that spaces requests evenly (no bursts), shared by every client of
//! one region and role (see `aws::clients`).
//!
//! Waiting requests are served smallest job first: a request made inside [`with_weight`] carries
//! that weight (a policy sync's remaining attaches), and of the requests waiting for a slot the
//! one with the least weight goes first (ties in arrival order; requests without a weight count
//! as 0). A binding of 20 targets is then not held up by the hours-long first sync of a pool of
//! a million, which waits only while smaller work does.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// AWS's default quotas (requests per second, per account and region) of the calls a pool sync
/// makes most, used as per-operation client limits by default (see the README, "AWS quotas";
/// AWS marks them adjustable, and they may differ by region).
pub const AWS_DEFAULT_API_LIMITS: &[(&str, f64)] = &[
    ("ListIdentities", 5.0),
    ("ListTargetsForPolicy", 10.0),
    ("ListPolicyPrincipals", 10.0),
    ("AttachPolicy", 15.0),
    ("DetachPolicy", 15.0),
    ("AttachPrincipalPolicy", 15.0),
    ("DetachPrincipalPolicy", 15.0),
];

tokio::task_local! {
    static WEIGHT: u64;
}

/// Runs `fut` with every rate-limited request it makes weighted `weight` (see the module docs).
pub async fn with_weight<F: Future>(weight: u64, fut: F) -> F::Output {
    WEIGHT.scope(weight, fut).await
}

fn current_weight() -> u64 {
    WEIGHT.try_with(|w| *w).unwrap_or(0)
}

/// Spaces calls `1/rate` seconds apart.
#[derive(Debug)]
pub struct RateLimiter {
    interval: Duration,
    state: Mutex<State>,
    /// Woken when a slot is taken or a waiter leaves, so that the next in line looks again.
    turn: Notify,
}

#[derive(Debug, Default)]
struct State {
    /// When the next slot opens.
    next: Option<Instant>,
    /// Waiting requests: (weight, arrival).
    waiting: BTreeSet<(u64, u64)>,
    arrivals: u64,
}

/// Removes a waiter that gave up (its future was dropped) from the line.
struct Ticket<'a> {
    limiter: &'a RateLimiter,
    key: Option<(u64, u64)>,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.limiter.lock().waiting.remove(&key);
            self.limiter.turn.notify_waiters();
        }
    }
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
            state: Mutex::new(State::default()),
            turn: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for this caller's slot: the first free one once no lighter request waits.
    pub async fn acquire(&self) {
        if self.interval.is_zero() {
            return;
        }
        let key = {
            let mut s = self.lock();
            s.arrivals += 1;
            let key = (current_weight(), s.arrivals);
            s.waiting.insert(key);
            key
        };
        let mut ticket = Ticket {
            limiter: self,
            key: Some(key),
        };
        loop {
            // Registered before looking, so that a wake-up between the look and the wait is
            // not lost.
            let turn = self.turn.notified();
            tokio::pin!(turn);
            turn.as_mut().enable();
            let slot = {
                let mut s = self.lock();
                let now = Instant::now();
                let slot = s.next.map_or(now, |n| n.max(now));
                let first = s.waiting.first() == Some(&key);
                if first && slot <= now {
                    s.waiting.remove(&key);
                    s.next = Some(slot + self.interval);
                    ticket.key = None;
                    drop(s);
                    self.turn.notify_waiters();
                    return;
                }
                first.then_some(slot)
            };
            match slot {
                // First in line: wait for the slot (a lighter request arriving meanwhile takes
                // the line over and wakes everyone).
                Some(slot) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(slot) => {}
                        _ = turn => {}
                    }
                }
                None => turn.await,
            }
        }
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

    /// Four heavy requests wait; a light one arriving after them goes next, and every request
    /// still gets one slot each, 100 ms apart.
    #[tokio::test(start_paused = true)]
    async fn the_lightest_waiting_request_goes_first() {
        let limiter = std::sync::Arc::new(RateLimiter::new(10.0));
        limiter.acquire().await; // the slot at 0 is taken: the next opens at 100 ms
        let start = Instant::now();
        let order = std::sync::Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (name, weight, delay_ms) in [
            ("heavy-1", 1000, 0),
            ("heavy-2", 1000, 1),
            ("heavy-3", 1000, 2),
            ("light", 20, 50),
            ("unweighted", 0, 60),
        ] {
            let (limiter, order) = (limiter.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                with_weight(weight, limiter.acquire()).await;
                order
                    .lock()
                    .unwrap()
                    .push((name, start.elapsed().as_millis()));
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let order = order.lock().unwrap().clone();
        assert_eq!(
            order,
            vec![
                ("unweighted", 100),
                ("light", 200),
                ("heavy-1", 300),
                ("heavy-2", 400),
                ("heavy-3", 500)
            ]
        );
    }

    /// A waiter that gives up leaves the line: the one behind it is not stuck.
    #[tokio::test(start_paused = true)]
    async fn a_cancelled_waiter_leaves_the_line() {
        let limiter = std::sync::Arc::new(RateLimiter::new(10.0));
        limiter.acquire().await;
        let start = Instant::now();
        let first = {
            let limiter = limiter.clone();
            tokio::spawn(async move { with_weight(1, limiter.acquire()).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        let second = {
            let limiter = limiter.clone();
            tokio::spawn(async move { with_weight(2, limiter.acquire()).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        first.abort();
        second.await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(100));
    }
}
