//! Messages read from one side and waiting for the other side's publisher. Above either bound
//! the reading side stops reading (TCP backpressure to its broker) instead of dropping, and
//! resumes below half of both.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Messages waiting above which reading pauses.
pub const BACKLOG_MESSAGES: usize = 2_000;
/// Bytes waiting above which reading pauses.
pub const BACKLOG_BYTES: usize = 16 * 1024 * 1024;

/// Messages between the side that read them and the other side's publisher.
#[derive(Debug, Default)]
pub struct Backlog {
    messages: AtomicUsize,
    bytes: AtomicUsize,
    /// Signalled when the backlog falls to half its bounds.
    drained: tokio::sync::Notify,
}

impl Backlog {
    pub fn add(&self, bytes: usize) {
        self.messages.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn take(&self, bytes: usize) {
        let before = self.messages.fetch_sub(1, Ordering::Relaxed);
        let before_bytes = self.bytes.fetch_sub(bytes, Ordering::Relaxed);
        if before == BACKLOG_MESSAGES / 2 + 1
            || (before_bytes > BACKLOG_BYTES / 2 && before_bytes - bytes <= BACKLOG_BYTES / 2)
        {
            self.drained.notify_waiters();
        }
    }

    pub fn len(&self) -> usize {
        self.messages.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// At or above a bound: stop reading.
    pub fn full(&self) -> bool {
        self.messages.load(Ordering::Relaxed) >= BACKLOG_MESSAGES
            || self.bytes.load(Ordering::Relaxed) >= BACKLOG_BYTES
    }

    /// At or below half of both bounds: read again.
    pub fn low(&self) -> bool {
        self.messages.load(Ordering::Relaxed) <= BACKLOG_MESSAGES / 2
            && self.bytes.load(Ordering::Relaxed) <= BACKLOG_BYTES / 2
    }

    /// Waits until the backlog drains to half (or a short while passes); `false` if `stopped`
    /// completed first.
    pub async fn wait_for_room(
        &self,
        stopped: &mut std::pin::Pin<&mut impl std::future::Future>,
    ) -> bool {
        let drained = self.drained.notified();
        tokio::pin!(drained);
        drained.as_mut().enable();
        if self.low() {
            return true;
        }
        tokio::select! {
            biased;
            _ = stopped.as_mut() => false,
            _ = drained => true,
            // A missed wake-up costs at most this.
            _ = tokio::time::sleep(Duration::from_millis(50)) => true,
        }
    }
}
