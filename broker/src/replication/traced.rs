//! Publish traces on a primary (`--otlp-endpoint`): after its write, a traced publish's
//! `fsync` span lasts until this node's fsync covers its records, and its `replicate`
//! span until as many other replicas as its durability needs have them durable. Both
//! are children of the publish's `append` span (see `primary.rs`).
//!
//! Spans are `tracing` spans of [`PUBLISH_TRACE_TARGET`] at TRACE level. Without a
//! subscriber for that target (the default: no `--otlp-endpoint`) every such span is
//! `Span::none()` after one comparison of levels, no publish is kept here, and the
//! primary's only cost is checking that this list is empty.

use std::collections::VecDeque;

use tracing::Span;

pub use crate::metrics::PUBLISH_TRACE_TARGET;

/// A traced publish written and not yet durable everywhere its spans wait for.
struct Pending {
    /// Offset after its last record.
    end: u64,
    /// Other replicas that must hold it durably before `replicate` ends.
    others_needed: usize,
    fsync: Span,
    replicate: Span,
}

/// The traced publishes of one primary still waiting for an fsync or replicas.
#[derive(Default)]
pub(super) struct Traces {
    pending: VecDeque<Pending>,
}

impl Traces {
    pub(super) fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// A traced publish (`parent`, its `append` span) was written up to `end`; it waits
    /// for this node's fsync and for `others_needed` other replicas (0: none).
    pub(super) fn written(&mut self, parent: &Span, end: u64, others_needed: usize) {
        if parent.is_disabled() {
            return;
        }
        let fsync = tracing::trace_span!(target: PUBLISH_TRACE_TARGET, parent: parent, "fsync");
        let replicate = if others_needed > 0 {
            tracing::trace_span!(target: PUBLISH_TRACE_TARGET, parent: parent, "replicate", replicas = others_needed)
        } else {
            Span::none()
        };
        self.pending.push_back(Pending { end, others_needed, fsync, replicate });
    }

    /// Ends the spans whose wait is over: `durable_here` is this node's durable offset,
    /// `others_durable(end)` how many other replicas hold everything below `end`.
    pub(super) fn progress(&mut self, durable_here: u64, others_durable: impl Fn(u64) -> usize) {
        self.pending.retain_mut(|p| {
            if p.end <= durable_here {
                p.fsync = Span::none();
            }
            if !p.replicate.is_disabled() && others_durable(p.end) >= p.others_needed {
                p.replicate = Span::none();
            }
            !(p.fsync.is_disabled() && p.replicate.is_disabled())
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    /// Records the name of every span that closes, in order.
    #[derive(Clone, Default)]
    struct Closed(Arc<Mutex<Vec<String>>>);

    impl<S> tracing_subscriber::Layer<S> for Closed
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        fn on_close(&self, id: tracing::span::Id, ctx: tracing_subscriber::layer::Context<'_, S>) {
            let name = ctx.span(&id).map(|s| s.name().to_string()).unwrap_or_default();
            self.0.lock().unwrap().push(name);
        }
    }

    #[test]
    fn fsync_and_replicate_end_when_their_offsets_are_durable_and_nothing_is_kept_untraced() {
        let closed = Closed::default();
        let subscriber = tracing_subscriber::registry().with(closed.clone());
        tracing::subscriber::with_default(subscriber, || {
            let mut traces = Traces::default();
            // Not traced: nothing kept.
            traces.written(&Span::none(), 10, 1);
            assert!(traces.is_empty());

            let a = tracing::trace_span!(target: PUBLISH_TRACE_TARGET, "append");
            let b = tracing::trace_span!(target: PUBLISH_TRACE_TARGET, "append");
            traces.written(&a, 10, 1);
            traces.written(&b, 20, 0);
            drop((a, b));
            traces.progress(10, |_| 0);
            assert_eq!(*closed.0.lock().unwrap(), ["fsync"]);
            // One replica holds up to 15: a's replicate ends; b waits only for its fsync.
            traces.progress(15, |end| usize::from(end <= 15));
            assert_eq!(*closed.0.lock().unwrap(), ["fsync", "replicate", "append"]);
            assert!(!traces.is_empty());
            traces.progress(20, |_| 0);
            assert_eq!(*closed.0.lock().unwrap(), ["fsync", "replicate", "append", "fsync", "append"]);
            assert!(traces.is_empty());
        });
    }
}
