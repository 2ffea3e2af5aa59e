//! A bounded in-memory set of idempotency keys this instance recently saw processed, in front
//! of the inbox: a hit saves the database round trip for a re-read row.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use uuid::Uuid;

use crate::telemetry::metrics::Metrics;

/// Bounded set of idempotency keys this instance recently saw processed, in front of the inbox:
/// a hit saves the database round trip for a re-read row. Oldest keys are evicted first; a miss
/// is always safe because the inbox decides.
pub struct DedupeCache {
    capacity: usize,
    inner: Mutex<(HashSet<Uuid>, VecDeque<Uuid>)>,
    lookups: AtomicU64,
    hits: AtomicU64,
    metrics: Arc<Metrics>,
}

impl DedupeCache {
    /// A cache of at most `capacity` keys (`freshplan.events.dedupe-cache-size`).
    pub fn new(capacity: usize, metrics: Arc<Metrics>) -> Self {
        DedupeCache {
            capacity,
            inner: Mutex::new((HashSet::new(), VecDeque::new())),
            lookups: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            metrics,
        }
    }

    /// True when `key` is known to be processed; counts the lookup.
    pub fn seen(&self, key: &Uuid) -> bool {
        let hit = self
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .contains(key);
        let lookups = self.lookups.fetch_add(1, Ordering::Relaxed) + 1;
        let hits = if hit {
            self.hits.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            self.hits.load(Ordering::Relaxed)
        };
        self.metrics
            .dedupe_hit_rate
            .set(hits as f64 / lookups as f64);
        hit
    }

    /// Remembers processed keys, evicting the oldest beyond capacity.
    pub fn remember(&self, keys: impl IntoIterator<Item = Uuid>) {
        if self.capacity == 0 {
            return;
        }
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (set, order) = &mut *guard;
        for key in keys {
            if set.insert(key) {
                order.push_back(key);
            }
        }
        while order.len() > self.capacity {
            if let Some(old) = order.pop_front() {
                set.remove(&old);
            }
        }
        self.metrics.dedupe_entries.set(set.len() as f64);
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).0.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
