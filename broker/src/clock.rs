//! Time, injected into the node.
//!
//! Two kinds of time matter here: durations (timeouts, intervals, "DEAD for how long")
//! and wall-clock timestamps (a record's `timestamp_ms`, when a segment was opened or
//! closed, a group's `since`). Every timer and every "now" of a duration in the node
//! is tokio's (`tokio::time::{sleep, interval, timeout, Instant}`), never
//! `std::time::Instant` or a thread sleep, so a test that pauses tokio's clock
//! (`#[tokio::test(start_paused = true)]`, `tokio::time::advance`) moves all of them
//! at once, and an idle runtime jumps straight to its next timer instead of sleeping.
//! Wall-clock timestamps come from a [`Clock`]: the system's by default, or in tests a
//! manual one that follows tokio's clock from a fixed start, so timestamps move with
//! the paused clock too and a run can be replayed. A gossip identity's start (its
//! `bump`) comes from it as well. Two reads of the system clock stay outside on
//! purpose: a Raft snapshot's name and the storage crate's file nonce and quarantine
//! suffix use it only to be unique, never as a time anyone compares.
//!
//! tokio pauses its clock only on a current-thread runtime, so a paused test runs
//! whole nodes on one thread. That works because nothing here waits on a thread tokio
//! does not know of: disk IO that blocks goes to the blocking pool (`spawn_blocking`),
//! and a paused runtime does not move its clock while such a task runs, so a slow fsync
//! cannot make a timeout fire; `block_in_place`, which a current-thread runtime refuses,
//! is used only on a multi-threaded one ([`can_block_in_place`]: the fsyncs of
//! `replication/replica.rs` and `replication/primary.rs`).
//!
//! A deterministic simulation (`broker/tests/simulation.rs`) goes one step further: its
//! disks are in memory, and a blocking-pool thread would finish its IO at a moment
//! the runtime's thread does not control. So disk IO is started with this module's
//! [`spawn_blocking`], which on a thread the simulation marked
//! ([`run_blocking_io_inline`]) runs it as an ordinary task of the current-thread
//! runtime instead: it completes at a point of the schedule that only the seed decides.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Whether this task's thread may block on disk IO (`tokio::task::block_in_place`): only
/// on a multi-threaded runtime, which hands the thread's other tasks to another thread
/// meanwhile; a current-thread runtime (paused-clock tests, the simulation) refuses it.
pub fn can_block_in_place() -> bool {
    tokio::runtime::Handle::current().runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
}

/// Source of wall-clock timestamps. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub enum Clock {
    /// The system clock.
    #[default]
    System,
    /// `start_unix_ms` at `start`, then advancing with tokio's clock. `last_unique_us`
    /// is the last value [`Clock::next_unique_us`] handed out (shared by clones).
    Manual { start_unix_ms: i64, start: Instant, last_unique_us: Arc<AtomicU64> },
}

/// The last value [`Clock::next_unique_us`] handed out for the system clock.
static LAST_SYSTEM_UNIQUE_US: AtomicU64 = AtomicU64::new(0);

impl Clock {
    /// Timestamps that start at `start_unix_ms` now and follow tokio's clock: with
    /// tokio's clock paused, they only move when the test advances it.
    pub fn manual(start_unix_ms: i64) -> Self {
        Clock::Manual { start_unix_ms, start: Instant::now(), last_unique_us: Arc::default() }
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_unix_ms(&self) -> i64 {
        match self {
            Clock::System => system_unix_ms(),
            Clock::Manual { start_unix_ms, start, .. } => start_unix_ms + start.elapsed().as_millis() as i64,
        }
    }

    /// Microseconds since the Unix epoch (0 before 1970), for what must differ between
    /// two moments a millisecond apart (a gossip identity's start).
    pub fn now_unix_us(&self) -> u64 {
        match self {
            Clock::System => SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_micros() as u64,
            Clock::Manual { start_unix_ms, start, .. } => {
                (*start_unix_ms).max(0) as u64 * 1_000 + start.elapsed().as_micros() as u64
            }
        }
    }

    /// [`Clock::now_unix_us`], or more: strictly more than any value handed out before
    /// by this clock and its clones (by any system clock in this process), for what
    /// must grow from one life of a node to the next (a gossip identity's start) even
    /// when a test restarts a node at the same instant of a paused clock. Per manual
    /// clock rather than per process, so that a simulation's values do not depend on
    /// the runs before it in the same process.
    pub fn next_unique_us(&self) -> u64 {
        let now = self.now_unix_us();
        let last = match self {
            Clock::System => &LAST_SYSTEM_UNIQUE_US,
            Clock::Manual { last_unique_us, .. } => &**last_unique_us,
        };
        let next = |l: u64| now.max(l.saturating_add(1));
        next(last.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| Some(next(l))).unwrap_or_else(|l| l))
    }
}

thread_local! {
    /// Set on a simulation's thread: blocking IO runs inline (see the module comment).
    static INLINE_BLOCKING_IO: Cell<bool> = const { Cell::new(false) };
}

/// Runs blocking disk IO `f`: on tokio's blocking pool, or as an ordinary task when
/// this thread runs a simulation ([`run_blocking_io_inline`]). Same contract as
/// `tokio::task::spawn_blocking`.
pub fn spawn_blocking<F, R>(f: F) -> JoinHandle<R>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    if INLINE_BLOCKING_IO.with(Cell::get) {
        tokio::spawn(async move { f() })
    } else {
        tokio::task::spawn_blocking(f)
    }
}

/// Makes [`spawn_blocking`] on this thread run its work as an ordinary task. Only for a
/// current-thread runtime over an in-memory disk (a simulation): real disk IO would
/// stall every task of the runtime.
pub fn run_blocking_io_inline(inline: bool) {
    INLINE_BLOCKING_IO.with(|c| c.set(inline));
}

/// Milliseconds since the Unix epoch by the system clock (0 before 1970).
pub fn system_unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_millis() as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_manual_clock_moves_only_with_tokio_time() {
        let clock = Clock::manual(1_000);
        assert_eq!(clock.now_unix_ms(), 1_000);
        tokio::time::advance(Duration::from_millis(250)).await;
        assert_eq!(clock.now_unix_ms(), 1_250);
        tokio::time::sleep(Duration::from_secs(60)).await; // returns at once: time is paused
        assert_eq!(clock.now_unix_ms(), 61_250);
        assert_eq!(clock.now_unix_us(), 61_250_000);
        tokio::time::advance(Duration::from_micros(7)).await;
        assert_eq!(clock.now_unix_us(), 61_250_007);
    }

    #[test]
    fn the_system_clock_is_past_2020() {
        assert!(Clock::System.now_unix_ms() > 1_577_836_800_000);
        assert!(Clock::System.now_unix_us() > 1_577_836_800_000_000);
    }
}
