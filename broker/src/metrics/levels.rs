//! Levels: figures read from the node's state when Prometheus scrapes (consumer lag,
//! Raft, disk), gathered into a [`Snapshot`] of plain numbers and encoded after the
//! event metrics. Nothing on the data path keeps them up to date, and a segment or
//! group that is gone leaves no series behind.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// A sample's labels. Prometheus counts in float64: ids above 2^53 do not survive as
/// values, so node ids travel as labels.
pub type Labels = Vec<(&'static str, String)>;

/// Whether a sample is a gauge or a counter (a level read from the state that only
/// grows, such as CPU seconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Gauge,
    Counter,
}

/// One family of levels read at a scrape.
#[derive(Debug)]
pub struct Levels {
    /// Without the `eventtermq_` prefix, which [`Snapshot::prefixed`] says whether to add.
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    pub prefixed: bool,
    pub samples: Vec<(Labels, f64)>,
}

/// The levels read from the node's state at one scrape, ready to encode.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub families: Vec<Levels>,
}

impl Snapshot {
    /// Adds a family of `eventtermq_`-prefixed gauges.
    pub fn gauge(&mut self, name: &'static str, help: &'static str, samples: Vec<(Labels, f64)>) {
        self.families.push(Levels { name, help, kind: Kind::Gauge, prefixed: true, samples });
    }

    /// Adds one family without the prefix (the conventional `process_*` names).
    pub fn unprefixed(&mut self, name: &'static str, help: &'static str, kind: Kind, value: f64) {
        self.families.push(Levels { name, help, kind, prefixed: false, samples: vec![(Vec::new(), value)] });
    }

    pub(super) fn registry(&self) -> Registry {
        let mut root = Registry::default();
        for f in &self.families {
            let registry = if f.prefixed { root.sub_registry_with_prefix("eventtermq") } else { &mut root };
            match f.kind {
                Kind::Gauge => {
                    let family = Family::<Labels, Gauge<f64, AtomicU64>>::default();
                    for (labels, v) in &f.samples {
                        family.get_or_create(labels).set(*v);
                    }
                    registry.register(f.name, f.help, family);
                }
                Kind::Counter => {
                    let family = Family::<Labels, Counter<f64, AtomicU64>>::default();
                    for (labels, v) in &f.samples {
                        family.get_or_create(labels).inc_by(*v);
                    }
                    registry.register(f.name, f.help, family);
                }
            }
        }
        root
    }
}

/// Sums samples whose labels became equal after folding (`fold` maps a sample's labels
/// to their folded form), keeping the first order; `max` instead of the sum when
/// `keep_max` (an age, where adding is meaningless).
pub fn fold_samples(
    samples: Vec<(Labels, f64)>,
    keep_max: bool,
    fold: impl Fn(Labels) -> Labels,
) -> Vec<(Labels, f64)> {
    let mut out: Vec<(Labels, f64)> = Vec::with_capacity(samples.len());
    let mut index: HashMap<Labels, usize> = HashMap::new();
    for (labels, v) in samples {
        let labels = fold(labels);
        match index.get(&labels) {
            Some(&i) => {
                let acc = &mut out[i].1;
                *acc = if keep_max { acc.max(v) } else { *acc + v };
            }
            None => {
                index.insert(labels.clone(), out.len());
                out.push((labels, v));
            }
        }
    }
    out
}
