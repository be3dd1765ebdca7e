//! A queue between two tasks of one relay on the message path: a list behind a lock that the
//! receiver takes whole (the two lists trade places, so neither side allocates once they have
//! grown), and the receiver's waker. tokio's unbounded channel allocated a block of slots every
//! 32 messages and took several atomic operations per message. Unbounded: what is in it is
//! bounded by its users (the window, the backlog).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::Poll;

use futures::task::AtomicWaker;

struct Shared<T> {
    state: Mutex<State<T>>,
    waker: AtomicWaker,
}

struct State<T> {
    items: Vec<T>,
    /// The receiver is gone (sends fail), or every sender is (the receiver sees the end).
    receiver_gone: bool,
    senders: usize,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // Nothing panics while holding it; a poisoned queue is still a queue.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The sending side; cloning adds a sender.
pub struct Sender<T>(Arc<Shared<T>>);

/// The receiving side.
pub struct Receiver<T>(Arc<Shared<T>>);

/// A new queue.
pub fn queue<T>() -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: Vec::new(),
            receiver_gone: false,
            senders: 1,
        }),
        waker: AtomicWaker::new(),
    });
    (Sender(shared.clone()), Receiver(shared))
}

impl<T> Sender<T> {
    /// Queues `item`; gives it back if the receiver is gone.
    pub fn send(&self, item: T) -> Result<(), T> {
        let mut state = self.0.lock();
        if state.receiver_gone {
            return Err(item);
        }
        state.items.push(item);
        drop(state);
        self.0.waker.wake();
        Ok(())
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.0.lock().senders += 1;
        Sender(self.0.clone())
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let last = {
            let mut state = self.0.lock();
            state.senders -= 1;
            state.senders == 0
        };
        if last {
            self.0.waker.wake();
        }
    }
}

impl<T> Receiver<T> {
    /// Waits until something is queued and moves all of it, in order, to the end of `into`
    /// (pass it empty to trade lists without copying). `false` once every sender is gone and
    /// nothing is left.
    pub async fn take(&self, into: &mut Vec<T>) -> bool {
        std::future::poll_fn(|cx| {
            self.0.waker.register(cx.waker());
            let mut state = self.0.lock();
            if !state.items.is_empty() {
                if into.is_empty() {
                    std::mem::swap(&mut state.items, into);
                } else {
                    into.append(&mut state.items);
                }
                return Poll::Ready(true);
            }
            if state.senders == 0 {
                return Poll::Ready(false);
            }
            Poll::Pending
        })
        .await
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        // Later sends fail instead of piling up; what is queued is dropped.
        let items = {
            let mut state = self.0.lock();
            state.receiver_gone = true;
            std::mem::take(&mut state.items)
        };
        drop(items);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn items_arrive_in_order_and_the_end_is_seen() {
        let (tx, rx) = queue();
        let tx2 = tx.clone();
        tx.send(1).unwrap();
        tx2.send(2).unwrap();
        let mut got = Vec::new();
        assert!(rx.take(&mut got).await);
        tx.send(3).unwrap();
        assert!(rx.take(&mut got).await);
        assert_eq!(got, vec![1, 2, 3]);
        drop(tx);
        drop(tx2);
        assert!(!rx.take(&mut Vec::new()).await, "every sender is gone");
    }

    #[tokio::test]
    async fn a_waiting_receiver_is_woken_and_a_gone_receiver_refuses() {
        let (tx, rx) = queue::<u32>();
        let waiter = tokio::spawn(async move {
            let mut got = Vec::new();
            rx.take(&mut got).await;
            got
        });
        tokio::task::yield_now().await;
        tx.send(7).unwrap();
        assert_eq!(waiter.await.unwrap(), vec![7]);
        assert_eq!(tx.send(8), Err(8), "the receiver was dropped with the task");
    }
}
