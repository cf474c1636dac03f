//! The bytes of publishes a node holds at once for its clients, gRPC and AMQP alike
//! (`--publish-in-flight-max-bytes`). Each gRPC request from a client takes its share
//! once read, before the next one is read off its stream; each AMQP message before it
//! goes to its channel's publisher, before the connection is read further. A share is
//! given back once answered (stored or failed; relayed to another node: once the
//! answer is back). While none is left the node reads no more publishes, and HTTP/2
//! flow control (TCP for AMQP) holds the publishers back. Only the node a client sent
//! to counts a publish: a node taking shares for what others forward to it could wait
//! on a budget held by publishes it forwarded there, both ways at once (a deadlock);
//! so a node holds at most its own budget plus what the other nodes' budgets let
//! through to it. Without it every `PublishStream` kept up to 64 requests in flight,
//! so 100 pipelining publishers held 400 MiB and more on one node, queued for seconds
//! (`bench clients`, bench/scale.md). The semaphore is fair (first come, first
//! served), so publishers share the budget evenly.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Unit of the budget's semaphore.
const UNIT_BYTES: usize = 1024;
/// Most units (a budget above 4 TiB counts as that).
const UNITS_MAX: usize = u32::MAX as usize;

/// A node's budget of publish bytes in flight; clones share it.
#[derive(Clone)]
pub struct PublishBudget {
    units: Arc<Semaphore>,
    max_units: u32,
}

/// A request's share of the budget, given back when dropped.
pub struct Share(#[allow(dead_code)] OwnedSemaphorePermit);

impl PublishBudget {
    /// A budget of `max_bytes` (at least one unit).
    pub fn new(max_bytes: usize) -> PublishBudget {
        let units = max_bytes.div_ceil(UNIT_BYTES).clamp(1, UNITS_MAX);
        PublishBudget { units: Arc::new(Semaphore::new(units)), max_units: units as u32 }
    }

    /// Waits for the share of a request of `bytes`. A request larger than the whole
    /// budget takes all of it, so it waits until it is alone, but never forever.
    /// (The future borrows nothing, so it can be made in one task and awaited in another.)
    pub fn take(&self, bytes: usize) -> impl std::future::Future<Output = Share> + Send + 'static {
        let units = bytes.div_ceil(UNIT_BYTES).clamp(1, self.max_units as usize) as u32;
        let semaphore = self.units.clone();
        async move { Share(semaphore.acquire_many_owned(units).await.expect("the budget's semaphore is never closed")) }
    }

    /// Bytes not taken at the moment (in units, rounded down to them).
    pub fn available_bytes(&self) -> usize {
        self.units.available_permits() * UNIT_BYTES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_waits_until_earlier_ones_give_their_share_back() {
        let budget = PublishBudget::new(4 * UNIT_BYTES);
        let first = budget.take(3 * UNIT_BYTES).await;
        assert_eq!(budget.available_bytes(), UNIT_BYTES);
        // Two units more do not fit until the first is answered.
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.take(2 * UNIT_BYTES).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(first);
        let second = waiting.await.expect("gets its share");
        assert_eq!(budget.available_bytes(), 2 * UNIT_BYTES);
        drop(second);
        assert_eq!(budget.available_bytes(), 4 * UNIT_BYTES);
    }

    #[tokio::test]
    async fn a_request_larger_than_the_budget_takes_all_of_it() {
        let budget = PublishBudget::new(2 * UNIT_BYTES + 1);
        let all = budget.take(100 * UNIT_BYTES).await;
        assert_eq!(budget.available_bytes(), 0);
        drop(all);
        // An empty request still takes a unit; a budget of 0 bytes is one unit.
        let one = budget.take(0).await;
        assert_eq!(budget.available_bytes(), 2 * UNIT_BYTES);
        drop(one);
        assert_eq!(PublishBudget::new(0).available_bytes(), UNIT_BYTES);
    }
}
