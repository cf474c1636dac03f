//! The bound on label values (`--metrics-label-values-max`): the first `max` distinct
//! values of each kind get series of their own, later ones share [`FOLDED`].

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, PoisonError};

/// The label value every value beyond the limit is folded into.
pub const FOLDED: &str = "_other";

/// The kinds of label values bounded separately.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LabelKind {
    /// A namespace/topic pair.
    Topic,
    /// A namespace/consumer group pair.
    Group,
    /// A gRPC method path (clients may send any path).
    Method,
}

/// Admits the first `max` distinct values of each [`LabelKind`]; later ones are folded.
/// Asked when a series is made (a topic's first publish, a group's start, a scrape),
/// not per message.
#[derive(Debug)]
pub struct LabelFolder {
    max: usize,
    seen: Mutex<HashMap<LabelKind, HashSet<(String, String)>>>,
}

impl LabelFolder {
    pub fn new(max: usize) -> Self {
        Self { max, seen: Mutex::default() }
    }

    /// `(a, b)` as it appears in labels: itself while it is one of the first `max`
    /// distinct pairs of its kind, `(FOLDED, FOLDED)` beyond.
    pub fn fold(&self, kind: LabelKind, a: &str, b: &str) -> (String, String) {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let set = seen.entry(kind).or_default();
        let key = (a.to_string(), b.to_string());
        if set.contains(&key) {
            return key;
        }
        if set.len() < self.max {
            set.insert(key.clone());
            return key;
        }
        (FOLDED.to_string(), FOLDED.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_beyond_the_limit_fold_into_one() {
        let f = LabelFolder::new(2);
        assert_eq!(f.fold(LabelKind::Topic, "ns", "a"), ("ns".into(), "a".into()));
        assert_eq!(f.fold(LabelKind::Topic, "ns", "b"), ("ns".into(), "b".into()));
        assert_eq!(f.fold(LabelKind::Topic, "ns", "c"), (FOLDED.into(), FOLDED.into()));
        // Values admitted before stay; other kinds have their own room.
        assert_eq!(f.fold(LabelKind::Topic, "ns", "a"), ("ns".into(), "a".into()));
        assert_eq!(f.fold(LabelKind::Group, "ns", "c"), ("ns".into(), "c".into()));
    }
}
