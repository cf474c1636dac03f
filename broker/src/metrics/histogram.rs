//! A histogram whose `observe` is atomic adds only (prometheus-client's own takes a
//! mutex per observation): the data path observes one per batch or request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// Cumulative-on-encode buckets of `f64` observations (seconds, records). Cheap to
/// clone: clones share the counts.
#[derive(Clone, Debug)]
pub struct AtomicHistogram {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Upper bounds, increasing; `+Inf` is implied after the last.
    bounds: Vec<f64>,
    /// One count per bound, plus the `+Inf` bucket (not cumulative).
    counts: Vec<AtomicU64>,
    count: AtomicU64,
    /// The sum's `f64` bits, added with a compare-and-swap loop.
    sum_bits: AtomicU64,
}

impl AtomicHistogram {
    /// `count` buckets, the first ending at `start`, each `factor` times the one before.
    pub fn exponential(start: f64, factor: f64, count: u16) -> Self {
        let bounds: Vec<f64> = (0..i32::from(count)).map(|i| start * factor.powi(i)).collect();
        let counts = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        let inner = Inner { bounds, counts, count: AtomicU64::new(0), sum_bits: AtomicU64::new(0f64.to_bits()) };
        Self { inner: Arc::new(inner) }
    }

    pub fn observe(&self, v: f64) {
        let i = &self.inner;
        let bucket = i.bounds.iter().position(|b| v <= *b).unwrap_or(i.bounds.len());
        i.counts[bucket].fetch_add(1, Ordering::Relaxed);
        i.count.fetch_add(1, Ordering::Relaxed);
        let add = |bits: u64| Some((f64::from_bits(bits) + v).to_bits());
        // The closure always answers Some: the update cannot fail.
        let _ = i.sum_bits.fetch_update(Ordering::Relaxed, Ordering::Relaxed, add);
    }

    /// Observations so far and their sum.
    pub fn count_and_sum(&self) -> (u64, f64) {
        let i = &self.inner;
        (i.count.load(Ordering::Relaxed), f64::from_bits(i.sum_bits.load(Ordering::Relaxed)))
    }
}

impl TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let i = &self.inner;
        let bounds = i.bounds.iter().copied().chain([f64::INFINITY]);
        let buckets: Vec<(f64, u64)> = bounds.zip(i.counts.iter().map(|c| c.load(Ordering::Relaxed))).collect();
        // Read apart from the buckets: a scrape during an observation may see a count
        // one off, which the next scrape corrects (as with any lock-free histogram).
        let count = buckets.iter().map(|(_, n)| n).sum();
        let (_, sum) = self.count_and_sum();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        let h = AtomicHistogram::exponential(1.0, 2.0, 3); // 1, 2, 4, +Inf
        for v in [0.5, 1.0, 3.0, 100.0] {
            h.observe(v);
        }
        assert_eq!(h.count_and_sum(), (4, 104.5));
        let mut r = Registry::default();
        r.register("x", "x", h);
        let mut out = String::new();
        prometheus_client::encoding::text::encode_registry(&mut out, &r).unwrap();
        assert!(out.contains("x_bucket{le=\"1.0\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"2.0\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"4.0\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 4\n"), "{out}");
        assert!(out.contains("x_count 4\n"), "{out}");
        assert!(out.contains("x_sum 104.5\n"), "{out}");
    }
}
