//! How many unsealed segments keep their files open ([`crate::Config::open_segments_max`]).
//!
//! A writer's files stay open while it writes; a node holding 10,000 quiet topics would
//! otherwise hold 20,000 descriptors (two files per segment) for segments nobody
//! writes to. Each write marks its segment used; beyond the limit the least recently
//! written segment whose records are all synced is closed (readers that have its files
//! keep them until they are done), and opened again by its next write. A segment
//! with records not synced yet is never closed: the next fdatasync is made on the
//! descriptor the records were written through.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, PoisonError, Weak};

use crate::segment::Segment;

/// Segments looked at, oldest first, for one to close when a write goes past the
/// limit: those with unsynced records are skipped (they are being written now).
const EVICTION_SCAN_MAX: usize = 16;

pub(crate) struct OpenFiles {
    limit: usize,
    lru: Mutex<Lru>,
}

#[derive(Default)]
struct Lru {
    next_use: u64,
    /// Segments with open files by last use, oldest first.
    by_use: BTreeMap<u64, (u64, Weak<Segment>)>,
    /// Last use of each segment in `by_use`.
    uses: HashMap<u64, u64>,
}

impl OpenFiles {
    /// At most `limit` segments' files kept open (0: no limit).
    pub fn new(limit: usize) -> Self {
        OpenFiles { limit, lru: Mutex::default() }
    }

    /// Segments whose files are open now.
    #[cfg(test)]
    pub fn open_count(&self) -> usize {
        self.lru.lock().unwrap_or_else(PoisonError::into_inner).uses.len()
    }

    /// `seg`'s files are open and it was just written: the most recently used now. If
    /// that makes one too many, the least recently used idle segment is closed.
    pub fn used(&self, id: u64, seg: Weak<Segment>) {
        let evict = {
            let mut lru = self.lru.lock().unwrap_or_else(PoisonError::into_inner);
            let use_no = lru.next_use;
            lru.next_use += 1;
            if let Some(old) = lru.uses.insert(id, use_no) {
                lru.by_use.remove(&old);
            }
            lru.by_use.insert(use_no, (id, seg));
            if self.limit == 0 || lru.uses.len() <= self.limit {
                return;
            }
            // Candidates, oldest first; closed outside the lock (a segment's own locks
            // are taken there).
            lru.by_use.iter().take(EVICTION_SCAN_MAX).map(|(u, (id, s))| (*u, *id, s.clone())).collect::<Vec<_>>()
        };
        for (use_no, id, seg) in evict {
            let Some(seg) = seg.upgrade() else {
                self.forget_use(id, use_no);
                continue;
            };
            if seg.close_if_idle() {
                self.forget_use(id, use_no);
                return;
            }
        }
        // Every candidate has records being written: over the limit for a moment.
    }

    /// The segment's files are no longer held open (sealed, deleted, closed).
    pub fn forget(&self, id: u64) {
        let mut lru = self.lru.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(u) = lru.uses.remove(&id) {
            lru.by_use.remove(&u);
        }
    }

    /// Forgets `id` if its last use is still `use_no` (it was not written meanwhile).
    fn forget_use(&self, id: u64, use_no: u64) {
        let mut lru = self.lru.lock().unwrap_or_else(PoisonError::into_inner);
        if lru.uses.get(&id) == Some(&use_no) {
            lru.uses.remove(&id);
            lru.by_use.remove(&use_no);
        }
    }
}
