//! A watch channel (a value, and waiting for it to change) whose waiting receivers wake
//! in the order they began to wait.
//!
//! `tokio::sync::watch` spreads its waiters over 8 lists and picks one at random for
//! every wait (tokio's per-thread random numbers, seeded from the OS: the runtime's
//! seed is settable only with `--cfg tokio_unstable`), so the tasks that wait for one
//! value wake in a random order. Tasks that then race for something (a Raft proposal
//! and its request id, a read, a replica's next message) did so differently on every
//! run, and a simulation's seed did not replay (`broker/tests/simulation.rs`). This
//! keeps tokio's watch for the value and its versions and wakes through one `Notify`,
//! whose waiters wake first come, first served: the same cost, no randomness.
//!
//! Every watch of the broker is one of these; a watch someone else owns (openraft's
//! metrics) has one task that waits on it and passes its changes on
//! ([`crate::cluster::Cluster::raft_changes`]).

use std::sync::Arc;

use tokio::sync::{watch, Notify};

pub use tokio::sync::watch::error::{RecvError, SendError};
pub use tokio::sync::watch::Ref;

/// A new channel holding `init`.
pub fn channel<T>(init: T) -> (Sender<T>, Receiver<T>) {
    let (tx, rx) = watch::channel(init);
    let notify = Arc::new(Notify::new());
    (Sender { tx, wake_on_drop: WakeOnDrop(notify.clone()) }, Receiver { rx, notify })
}

/// Sends values; the channel is closed when the last one is dropped.
#[derive(Debug)]
pub struct Sender<T> {
    // Dropped before `wake_on_drop` (fields drop in order): woken receivers see the
    // channel closed.
    tx: watch::Sender<T>,
    wake_on_drop: WakeOnDrop,
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        Self { tx: self.tx.clone(), wake_on_drop: WakeOnDrop(self.wake_on_drop.0.clone()) }
    }
}

/// Wakes every waiting receiver when a sender is gone.
#[derive(Debug)]
struct WakeOnDrop(Arc<Notify>);

impl Drop for WakeOnDrop {
    fn drop(&mut self) {
        self.0.notify_waiters();
    }
}

impl<T> Sender<T> {
    /// Replaces the value (even with no receiver left) and wakes the waiting receivers.
    pub fn send_replace(&self, value: T) -> T {
        let old = self.tx.send_replace(value);
        self.wake();
        old
    }

    /// Replaces the value; an error (with the value) when no receiver is left.
    pub fn send(&self, value: T) -> Result<(), SendError<T>> {
        if self.tx.is_closed() {
            return Err(SendError(value));
        }
        self.send_replace(value);
        Ok(())
    }

    /// Lets `modify` change the value in place; receivers hear of it when it says it did.
    pub fn send_if_modified(&self, modify: impl FnOnce(&mut T) -> bool) -> bool {
        let modified = self.tx.send_if_modified(modify);
        if modified {
            self.wake();
        }
        modified
    }

    /// The current value.
    pub fn borrow(&self) -> Ref<'_, T> {
        self.tx.borrow()
    }

    /// A new receiver, which has seen the current value.
    pub fn subscribe(&self) -> Receiver<T> {
        Receiver { rx: self.tx.subscribe(), notify: self.wake_on_drop.0.clone() }
    }

    fn wake(&self) {
        self.wake_on_drop.0.notify_waiters();
    }
}

/// Reads the value and waits for changes. A clone has seen what the original has.
#[derive(Debug, Clone)]
pub struct Receiver<T> {
    rx: watch::Receiver<T>,
    notify: Arc<Notify>,
}

impl<T> Receiver<T> {
    /// The current value, not marking it seen.
    pub fn borrow(&self) -> Ref<'_, T> {
        self.rx.borrow()
    }

    /// The current value, marking it seen.
    pub fn borrow_and_update(&mut self) -> Ref<'_, T> {
        self.rx.borrow_and_update()
    }

    /// Waits for a value this receiver has not seen and marks it seen; an error once
    /// every sender is gone and the last value was seen.
    pub async fn changed(&mut self) -> Result<(), RecvError> {
        loop {
            let notified = self.notify.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before looking: a send from now on wakes it.
            notified.as_mut().enable();
            if self.rx.borrow().has_changed() {
                self.rx.mark_unchanged();
                return Ok(());
            }
            self.rx.has_changed()?;
            notified.await;
        }
    }

    /// Waits until the value satisfies `f` (at once if it already does) and marks it
    /// seen; an error if every sender is gone first.
    pub async fn wait_for(&mut self, mut f: impl FnMut(&T) -> bool) -> Result<(), RecvError> {
        loop {
            let notified = self.notify.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if f(&self.rx.borrow_and_update()) {
                return Ok(());
            }
            self.rx.has_changed()?;
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[tokio::test]
    async fn a_change_wakes_a_waiter_and_is_seen_once() {
        let (tx, mut rx) = channel(0);
        let waiter = tokio::spawn(async move {
            rx.changed().await.unwrap();
            let v = *rx.borrow();
            (v, rx)
        });
        tokio::task::yield_now().await;
        tx.send(1).unwrap();
        let (v, mut rx) = waiter.await.unwrap();
        assert_eq!(v, 1);
        assert!(tokio::time::timeout(std::time::Duration::from_millis(10), rx.changed()).await.is_err());
        tx.send(2).unwrap();
        rx.changed().await.unwrap();
        assert_eq!(*rx.borrow(), 2);
    }

    #[tokio::test]
    async fn a_change_before_the_wait_is_not_missed_and_closing_ends_waits() {
        let (tx, mut rx) = channel(0);
        assert!(!tx.send_if_modified(|_| false));
        assert!(tx.send_if_modified(|v| {
            *v = 5;
            true
        }));
        rx.changed().await.unwrap();
        rx.wait_for(|v| *v == 5).await.unwrap();
        let mut other = tx.subscribe();
        let waiter = tokio::spawn(async move { other.wait_for(|v| *v == 9).await });
        tokio::task::yield_now().await;
        drop(tx);
        assert!(waiter.await.unwrap().is_err());
        assert!(rx.changed().await.is_err());
    }

    /// The point of this module: waiters wake in the order they began to wait, every
    /// time (with tokio's watch the order changes from run to run).
    #[test]
    fn waiters_wake_in_the_order_they_began_to_wait() {
        for _ in 0..20 {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let order = rt.block_on(async {
                let (tx, rx) = channel(0);
                let order = Arc::new(Mutex::new(Vec::new()));
                let tasks: Vec<_> = (0..16)
                    .map(|i| {
                        let (mut rx, order) = (rx.clone(), order.clone());
                        tokio::spawn(async move {
                            rx.changed().await.unwrap();
                            order.lock().unwrap().push(i);
                        })
                    })
                    .collect();
                tokio::task::yield_now().await; // every task waits
                tx.send(1).unwrap();
                for t in tasks {
                    t.await.unwrap();
                }
                let order = order.lock().unwrap().clone();
                order
            });
            assert_eq!(order, (0..16).collect::<Vec<_>>());
        }
    }
}
