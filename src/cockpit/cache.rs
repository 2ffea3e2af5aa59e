//! The lead-widget cache of one instance.
//!
//! One entry per (scope, user or territory), fresh for a TTL (60 s by default) and made stale by
//! the events that change it: every consumed event invalidates the `all` entry, the `territory`
//! entry of its territory and the `own` entries of its owner and collaborators (an assignment
//! event carries the previous owner among them). Concurrent misses for the same key compute once:
//! the first takes the key's lock, the others wait for it and read its entry.
//!
//! Coalescing (`freshplan.cockpit.widget-max-staleness-ms`, default 1 s): a stale entry still
//! answers while it is younger than the staleness bound, measured from the moment its computation
//! *started* (its snapshot is taken after that, so it includes every event committed before).
//! An answer without `minPosition` therefore misses at most the events of the last second, and
//! under a steady stream of writes each key is recomputed at most once per bound instead of once
//! per event (at 100 events/s three in four widget reads were misses before). A read that needs
//! its own write passes `minPosition`, which a stale entry serves only when its snapshot provably
//! saw that write (see `widget.rs`). With 0 an event drops the entries at once.
//!
//! An entry whose computation was overtaken by an invalidation of its key is stored as stale
//! (each key has an epoch, bumped by every invalidation, checked when storing): it never passes
//! for fresh, and with a bound of 0 it is not stored at all.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::events::consumer::{Event, LocalEffect};
use crate::telemetry::metrics::Metrics;
use crate::territory::Territory;

/// Widget label of the cache-invalidation metric.
pub const LEAD_WIDGET: &str = "lead-widget";

/// Which numbers: a user's own leads, a territory's, or every territory's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    Own,
    Territory,
    All,
}

impl Scope {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Own => "own",
            Scope::Territory => "territory",
            Scope::All => "all",
        }
    }

    /// Parses the wire name.
    pub fn parse(s: &str) -> Option<Scope> {
        match s {
            "own" => Some(Scope::Own),
            "territory" => Some(Scope::Territory),
            "all" => Some(Scope::All),
            _ => None,
        }
    }
}

/// A cache key: the scope and whose numbers (user id for `own`, territory code for
/// `territory`, `*` for `all`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub scope: Scope,
    pub subject: String,
}

impl Key {
    /// The key of `scope` for a caller.
    pub fn of(scope: Scope, user: &str, territory: Territory) -> Key {
        let subject = match scope {
            Scope::Own => user.to_string(),
            Scope::Territory => territory.code().to_string(),
            Scope::All => "*".to_string(),
        };
        Key { scope, subject }
    }

    fn affected_by(&self, territory: &str, people: &[&str]) -> bool {
        match self.scope {
            Scope::All => true,
            Scope::Territory => self.subject == territory,
            Scope::Own => people.contains(&self.subject.as_str()),
        }
    }
}

/// A computed widget with what it includes.
#[derive(Debug)]
pub struct Computed {
    /// The widget JSON as the database built it (before per-caller redaction).
    pub widget: serde_json::Value,
    /// The highest outbox position visible to the computation.
    pub position: i64,
    /// The computation's snapshot (`pg_current_snapshot()`), to tell later whether a given
    /// event's transaction was visible to it.
    pub snapshot: String,
}

struct Entry {
    value: Arc<Computed>,
    /// When its computation started.
    at: Instant,
    /// An event changed its numbers after `at`.
    stale: bool,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<Key, Entry>,
    epochs: HashMap<Key, u64>,
    locks: HashMap<Key, Arc<tokio::sync::Mutex<()>>>,
}

/// The widget cache of one instance.
pub struct WidgetCache {
    ttl: Duration,
    max_staleness: Duration,
    inner: Mutex<Inner>,
    metrics: Arc<Metrics>,
    /// Signalled after every consumed event (read-your-writes waits on it).
    pub changed: Notify,
}

/// Whether an answer came from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Hit,
    Miss,
}

impl Source {
    /// The `cache` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Hit => "hit",
            Source::Miss => "miss",
        }
    }
}

impl WidgetCache {
    /// A cache whose entries live at most `ttl`, and once stale at most `max_staleness` after
    /// their computation started.
    pub fn new(ttl: Duration, max_staleness: Duration, metrics: Arc<Metrics>) -> Self {
        WidgetCache {
            ttl,
            max_staleness,
            inner: Mutex::new(Inner::default()),
            metrics,
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn count(&self, trigger: &str) {
        self.metrics
            .cache_invalidations
            .with_label_values(&[LEAD_WIDGET, trigger])
            .inc();
    }

    /// The usable entry of `key`, if any: younger than the TTL and, once stale, younger than the
    /// staleness bound (an expired one is dropped and counted `ttl`; a stale one past the bound
    /// is dropped, its invalidation was counted when the event arrived).
    pub fn fresh(&self, key: &Key) -> Option<Arc<Computed>> {
        let mut inner = self.lock();
        let (expired, outdated) = match inner.entries.get(key) {
            Some(e) => {
                let age = e.at.elapsed();
                if age >= self.ttl {
                    (true, false)
                } else if e.stale && age >= self.max_staleness {
                    (false, true)
                } else {
                    return Some(e.value.clone());
                }
            }
            None => return None,
        };
        if expired || outdated {
            inner.entries.remove(key);
        }
        drop(inner);
        if expired {
            self.count("ttl");
        }
        None
    }

    /// The entry of `key`, computing it with `compute` when there is no fresh one; concurrent
    /// callers for the same key compute once. `accept` can refuse a fresh entry (e.g. one that
    /// does not include a position the caller needs); a refused entry is recomputed.
    pub async fn get_or_compute<F, Fut, E>(
        &self,
        key: &Key,
        accept: impl Fn(&Computed) -> bool,
        compute: F,
    ) -> Result<(Arc<Computed>, Source), E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Computed, E>>,
    {
        if let Some(v) = self.fresh(key).filter(|v| accept(v)) {
            return Ok((v, Source::Hit));
        }
        let lock = self
            .lock()
            .locks
            .entry(key.clone())
            .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(())))
            .clone();
        let _guard = lock.lock().await;
        // Whoever held the lock may have just computed it.
        if let Some(v) = self.fresh(key).filter(|v| accept(v)) {
            return Ok((v, Source::Hit));
        }
        // Registering the key here makes every later invalidation bump its epoch.
        let epoch = *self.lock().epochs.entry(key.clone()).or_insert(0);
        let started = Instant::now();
        let value = Arc::new(compute().await?);
        let mut inner = self.lock();
        let overtaken = inner.epochs.get(key).copied().unwrap_or(0) != epoch;
        if !overtaken || !self.max_staleness.is_zero() {
            inner.entries.insert(
                key.clone(),
                Entry {
                    value: value.clone(),
                    at: started,
                    stale: overtaken,
                },
            );
        }
        Ok((value, Source::Miss))
    }

    /// Drops the entries an event in `territory` about leads of `people` changes.
    pub fn invalidate(&self, territory: Territory, people: &[&str]) {
        {
            let mut inner = self.lock();
            let code = territory.code();
            let Inner {
                entries, epochs, ..
            } = &mut *inner;
            if self.max_staleness.is_zero() {
                entries.retain(|k, _| !k.affected_by(code, people));
            } else {
                for (k, e) in entries.iter_mut() {
                    if k.affected_by(code, people) {
                        e.stale = true;
                    }
                }
            }
            for (k, epoch) in epochs.iter_mut() {
                if k.affected_by(code, people) {
                    *epoch += 1;
                }
            }
        }
        self.count("event");
        self.changed.notify_waiters();
    }

    /// Drops every entry at once, whatever the staleness bound (e.g. after the follow-up job ran).
    pub fn clear(&self) {
        let mut inner = self.lock();
        inner.entries.clear();
        for epoch in inner.epochs.values_mut() {
            *epoch += 1;
        }
        drop(inner);
        self.count("manual");
        self.changed.notify_waiters();
    }
}

impl LocalEffect for WidgetCache {
    fn on_event(&self, event: &Event<'_>) {
        let row = event.row;
        let mut people: Vec<&str> = row.collaborators.iter().map(String::as_str).collect();
        if let Some(owner) = row.owner_user_id.as_deref() {
            people.push(owner);
        }
        self.invalidate(event.territory, &people);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn computed(position: i64) -> Computed {
        Computed {
            widget: serde_json::json!({}),
            position,
            snapshot: String::new(),
        }
    }

    #[tokio::test]
    async fn an_event_drops_the_entries_of_its_territory_owner_and_all_but_not_others() {
        let cache = WidgetCache::new(
            Duration::from_secs(60),
            Duration::ZERO,
            Arc::new(Metrics::new()),
        );
        let keys = [
            Key::of(Scope::Own, "sales-de-1", Territory::DE),
            Key::of(Scope::Own, "sales-de-2", Territory::DE),
            Key::of(Scope::Territory, "manager-de", Territory::DE),
            Key::of(Scope::Territory, "manager-at", Territory::AT),
            Key::of(Scope::All, "admin", Territory::DE),
        ];
        for k in &keys {
            cache
                .get_or_compute(k, |_| true, || async { Ok::<_, ()>(computed(1)) })
                .await
                .unwrap();
        }
        cache.invalidate(Territory::DE, &["sales-de-1"]);
        let left: Vec<bool> = keys.iter().map(|k| cache.fresh(k).is_some()).collect();
        assert_eq!(left, vec![false, true, false, true, false]);
    }

    #[tokio::test]
    async fn a_computation_overtaken_by_an_invalidation_is_answered_but_not_stored() {
        let cache = Arc::new(WidgetCache::new(
            Duration::from_secs(60),
            Duration::ZERO,
            Arc::new(Metrics::new()),
        ));
        let key = Key::of(Scope::Own, "sales-de-1", Territory::DE);
        let c = cache.clone();
        let (v, source) = cache
            .get_or_compute(
                &key,
                |_| true,
                || async move {
                    c.invalidate(Territory::DE, &["sales-de-1"]);
                    Ok::<_, ()>(computed(7))
                },
            )
            .await
            .unwrap();
        assert_eq!((v.position, source), (7, Source::Miss));
        assert!(cache.fresh(&key).is_none(), "stale result not cached");
    }

    #[tokio::test]
    async fn concurrent_misses_for_one_key_compute_once() {
        let cache = Arc::new(WidgetCache::new(
            Duration::from_secs(60),
            Duration::ZERO,
            Arc::new(Metrics::new()),
        ));
        let key = Key::of(Scope::All, "admin", Territory::DE);
        let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (cache, key, runs) = (cache.clone(), key.clone(), runs.clone());
            tasks.push(tokio::spawn(async move {
                cache
                    .get_or_compute(
                        &key,
                        |_| true,
                        || async {
                            runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            tokio::task::yield_now().await;
                            Ok::<_, ()>(computed(3))
                        },
                    )
                    .await
                    .unwrap()
                    .1
            }));
        }
        let mut misses = 0;
        for t in tasks {
            if t.await.unwrap() == Source::Miss {
                misses += 1;
            }
        }
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(misses, 1);
    }

    #[tokio::test]
    async fn an_entry_older_than_the_ttl_is_recomputed_and_counted_as_ttl() {
        let metrics = Arc::new(Metrics::new());
        let cache = WidgetCache::new(Duration::from_millis(0), Duration::ZERO, metrics.clone());
        let key = Key::of(Scope::All, "admin", Territory::DE);
        for _ in 0..2 {
            let (_, source) = cache
                .get_or_compute(&key, |_| true, || async { Ok::<_, ()>(computed(1)) })
                .await
                .unwrap();
            assert_eq!(source, Source::Miss);
        }
        assert_eq!(
            metrics
                .cache_invalidations
                .with_label_values(&[LEAD_WIDGET, "ttl"])
                .get(),
            1
        );
    }

    #[tokio::test]
    async fn a_stale_entry_answers_only_within_the_staleness_bound_of_its_computation() {
        let bound = Duration::from_millis(300);
        let cache = WidgetCache::new(Duration::from_secs(60), bound, Arc::new(Metrics::new()));
        let own = Key::of(Scope::Own, "sales-de-1", Territory::DE);
        let other = Key::of(Scope::Own, "sales-de-2", Territory::DE);
        for k in [&own, &other] {
            cache
                .get_or_compute(k, |_| true, || async { Ok::<_, ()>(computed(1)) })
                .await
                .unwrap();
        }
        cache.invalidate(Territory::DE, &["sales-de-1"]);
        assert!(
            cache.fresh(&own).is_some(),
            "a stale entry younger than the bound still answers"
        );
        tokio::time::sleep(bound).await;
        assert!(
            cache.fresh(&own).is_none(),
            "past the bound the stale entry is gone"
        );
        assert!(
            cache.fresh(&other).is_some(),
            "an entry no event touched stays until its TTL"
        );
    }

    #[tokio::test]
    async fn under_an_event_per_millisecond_a_key_is_recomputed_at_most_once_per_bound() {
        let bound = Duration::from_millis(100);
        let cache = Arc::new(WidgetCache::new(
            Duration::from_secs(60),
            bound,
            Arc::new(Metrics::new()),
        ));
        let key = Key::of(Scope::All, "admin", Territory::DE);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let events = {
            let (cache, stop) = (cache.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    cache.invalidate(Territory::AT, &["sales-at-1"]);
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
        };
        let started = Instant::now();
        let mut misses = 0;
        while started.elapsed() < Duration::from_millis(500) {
            let (_, source) = cache
                .get_or_compute(&key, |_| true, || async { Ok::<_, ()>(computed(1)) })
                .await
                .unwrap();
            if source == Source::Miss {
                misses += 1;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        events.await.unwrap();
        // 500 ms at a bound of 100 ms: one computation per bound (plus the first), not one per
        // read (~200 reads).
        assert!((2..=7).contains(&misses), "{misses} recomputations");
    }

    #[tokio::test]
    async fn with_a_bound_of_zero_an_event_drops_the_entry_at_once() {
        let cache = WidgetCache::new(
            Duration::from_secs(60),
            Duration::ZERO,
            Arc::new(Metrics::new()),
        );
        let key = Key::of(Scope::Territory, "manager-de", Territory::DE);
        cache
            .get_or_compute(&key, |_| true, || async { Ok::<_, ()>(computed(1)) })
            .await
            .unwrap();
        cache.invalidate(Territory::DE, &[]);
        assert!(cache.fresh(&key).is_none());
    }
}
