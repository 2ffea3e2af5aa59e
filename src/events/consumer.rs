//! The consumer of outbox rows: authorisation, the durable consumer `lead-event-handler`
//! (exactly once in effect through the inbox), the bounded dedupe cache in front of the inbox,
//! and the per-instance effects (SSE hub, widget-cache invalidation, metrics).
//!
//! Delivery is at least once (the listener may read a row on two paths, two instances read the
//! same rows, a restart re-reads rows after the durable cursor). The durable effect is made
//! idempotent by the inbox: a whole batch is applied in ONE transaction that inserts the inbox
//! rows (`ON CONFLICT DO NOTHING RETURNING`), increments `cockpit_daily_events` only for the keys
//! that were new, and advances the durable cursor — one statement, no per-event round trips.
//! Per-instance effects happen on every instance for every event, whichever instance won the
//! inbox race: each instance has its own SSE subscribers and its own widget cache.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use chrono::{DateTime, NaiveDate, Utc};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use super::envelope::{self, Audience, EventType};
use super::hub::{Hub, HubEvent};
use super::MODULE;
use crate::auth::Principal;
use crate::db;
use crate::telemetry::metrics::Metrics;
use crate::territory::Territory;

/// Name of the durable consumer (inbox and cursor key).
pub const CONSUMER: &str = "lead-event-handler";

/// Widget of the cache-invalidation metric.
const LEAD_WIDGET: &str = "lead-widget";

/// One outbox row as the consumer reads it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OutboxRow {
    pub position: i64,
    /// Transaction id (`xid8`, as a number) of the writing transaction.
    pub txid: i64,
    pub idempotency_key: Uuid,
    pub event_type: String,
    pub territory: String,
    pub owner_user_id: Option<String>,
    pub collaborators: Vec<String>,
    /// The envelope including `position`.
    pub envelope: Value,
    pub created_at: DateTime<Utc>,
}

/// Columns of [`OutboxRow`] in a `SELECT … FROM outbox`.
pub const ROW_COLUMNS: &str = "position, txid::text::bigint AS txid, idempotency_key, event_type, territory, \
     owner_user_id, collaborators, envelope || jsonb_build_object('position', position) AS envelope, created_at";

/// What happened to one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The effect was applied by this call.
    Success,
    /// Already processed (dedupe cache or inbox): no effect.
    Duplicate,
    /// Not a valid event of this module: not processed.
    Denied,
    /// The batch failed; it will be read again.
    Failure,
}

impl Outcome {
    /// The `result` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Duplicate => "duplicate",
            Outcome::Denied => "denied",
            Outcome::Failure => "failure",
        }
    }
}

/// A position of the durable cursor: rows are ordered by (txid, position).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cursor {
    pub txid: i64,
    pub position: i64,
}

impl Cursor {
    /// The cursor just at `row`.
    pub fn at(row: &OutboxRow) -> Self {
        Cursor {
            txid: row.txid,
            position: row.position,
        }
    }
}

/// Hook the consumer calls for every event so widget caches drop stale entries. The lead widget
/// (and its real cache) plugs in here; until then [`CockpitCache`] only counts.
pub trait CacheInvalidation: Send + Sync {
    /// Entries of a territory and (if any) an owner are stale.
    fn invalidate(&self, territory: Territory, owner: Option<&str>);
}

/// Placeholder widget cache: counts invalidations so the path is observable end to end.
pub struct CockpitCache {
    metrics: Arc<Metrics>,
}

impl CockpitCache {
    /// A cache counting into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        CockpitCache { metrics }
    }
}

impl CacheInvalidation for CockpitCache {
    fn invalidate(&self, _territory: Territory, _owner: Option<&str>) {
        self.metrics
            .cache_invalidations
            .with_label_values(&[LEAD_WIDGET, "event"])
            .inc();
    }
}

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

/// A row that passed authorisation.
struct Checked<'a> {
    row: &'a OutboxRow,
    event_type: EventType,
    territory: Territory,
    day: NaiveDate,
}

/// Authorises a row before anything marks it processed: a known type, this module as source,
/// the attributes CloudEvents and CONTRACT.md require, and a key matching its row.
fn authorize(row: &OutboxRow) -> Option<Checked<'_>> {
    let env = &row.envelope;
    let attr = |name: &str| env.get(name).and_then(Value::as_str);
    let event_type = EventType::parse(attr("type")?)?;
    if event_type.as_str() != row.event_type
        || attr("source")? != envelope::SOURCE
        || attr("specversion")? != "1.0"
        || !attr("id").is_some_and(|id| !id.is_empty())
        || attr("idempotencykey")?.parse::<Uuid>().ok()? != row.idempotency_key
        || env.get("data").is_none()
    {
        return None;
    }
    let time = DateTime::parse_from_rfc3339(attr("time")?)
        .ok()?
        .with_timezone(&Utc);
    let territory = row.territory.parse().ok()?;
    Some(Checked {
        row,
        event_type,
        territory,
        day: time.date_naive(),
    })
}

fn ms_since(t: DateTime<Utc>) -> f64 {
    ((Utc::now() - t).num_microseconds().unwrap_or(0) as f64 / 1000.0).max(0.0)
}

/// Applies outbox rows: the durable consumer plus this instance's effects.
#[derive(Clone)]
pub struct Consumer {
    pool: PgPool,
    hub: Arc<Hub>,
    dedupe: Arc<DedupeCache>,
    cache: Arc<dyn CacheInvalidation>,
    metrics: Arc<Metrics>,
}

impl Consumer {
    /// The consumer of an instance.
    pub fn new(state: &crate::app::AppState) -> Self {
        Consumer {
            pool: state.pool.clone(),
            hub: state.hub.clone(),
            dedupe: state.dedupe.clone(),
            cache: state.cockpit_cache.clone(),
            metrics: state.metrics.clone(),
        }
    }

    /// Processes a batch read at `received`: authorises every row, applies the durable effect of
    /// the authorised ones in one transaction that also advances the durable cursor to
    /// `advance_to` (if given), then runs the per-instance effects. Returns one outcome per row.
    /// On a database error nothing of the batch is marked processed (the rows are counted as
    /// `failure` and will be read again).
    pub async fn process(
        &self,
        rows: &[OutboxRow],
        received: Instant,
        advance_to: Option<Cursor>,
    ) -> Result<Vec<Outcome>, sqlx::Error> {
        let mut outcomes = vec![Outcome::Denied; rows.len()];
        let mut checked = Vec::with_capacity(rows.len());
        for (i, row) in rows.iter().enumerate() {
            match authorize(row) {
                Some(c) => checked.push((i, c)),
                None => {
                    tracing::warn!(
                        position = row.position,
                        "outbox row denied: not a valid lead-management event"
                    );
                    self.metrics
                        .events_consumed
                        .with_label_values(&[label_type(&row.event_type), MODULE, "denied"])
                        .inc();
                }
            }
        }
        // The dedupe cache first; the inbox decides for everything the cache does not know.
        let mut batch_keys = HashSet::new();
        let mut to_apply = Vec::new();
        for (i, c) in &checked {
            if self.dedupe.seen(&c.row.idempotency_key) || !batch_keys.insert(c.row.idempotency_key)
            {
                outcomes[*i] = Outcome::Duplicate;
            } else {
                to_apply.push((*i, c));
            }
        }
        let fresh = match self.apply_durable(&to_apply, advance_to).await {
            Ok(fresh) => fresh,
            Err(e) => {
                for (_, c) in &checked {
                    self.metrics
                        .events_consumed
                        .with_label_values(&[c.event_type.as_str(), MODULE, "failure"])
                        .inc();
                }
                return Err(e);
            }
        };
        for (i, c) in &to_apply {
            outcomes[*i] = if fresh.contains(&c.row.idempotency_key) {
                Outcome::Success
            } else {
                Outcome::Duplicate
            };
        }
        self.dedupe
            .remember(checked.iter().map(|(_, c)| c.row.idempotency_key));
        let committed_ms = received.elapsed().as_secs_f64() * 1000.0;
        for (i, c) in &checked {
            let t = c.event_type.as_str();
            self.metrics
                .events_consumed
                .with_label_values(&[t, MODULE, outcomes[*i].as_str()])
                .inc();
            self.metrics
                .event_latency
                .with_label_values(&[t, "notify_process"])
                .observe(committed_ms);
            self.instance_effects(c);
        }
        Ok(outcomes)
    }

    /// Inbox, projection and cursor in one transaction; returns the keys that were new.
    async fn apply_durable(
        &self,
        rows: &[(usize, &Checked<'_>)],
        advance_to: Option<Cursor>,
    ) -> Result<HashSet<Uuid>, sqlx::Error> {
        if rows.is_empty() && advance_to.is_none() {
            return Ok(HashSet::new());
        }
        let keys: Vec<Uuid> = rows.iter().map(|(_, c)| c.row.idempotency_key).collect();
        let days: Vec<NaiveDate> = rows.iter().map(|(_, c)| c.day).collect();
        let territories: Vec<&str> = rows.iter().map(|(_, c)| c.territory.code()).collect();
        let owners: Vec<&str> = rows
            .iter()
            .map(|(_, c)| c.row.owner_user_id.as_deref().unwrap_or(""))
            .collect();
        let types: Vec<&str> = rows.iter().map(|(_, c)| c.event_type.as_str()).collect();
        let mut tx = db::begin_as(&self.pool, &Principal::system()).await?;
        // Inbox rows are inserted in key order and projection rows in group order, so two
        // instances racing on overlapping batches take their locks in the same order.
        let fresh: Vec<Uuid> = sqlx::query_scalar(
            "WITH batch AS ( \
               SELECT * FROM unnest($2::uuid[], $3::date[], $4::text[], $5::text[], $6::text[]) \
                 AS b(key, day, territory, owner, event_type)), \
             fresh AS ( \
               INSERT INTO inbox (consumer, idempotency_key) \
               SELECT $1, key FROM batch ORDER BY key \
               ON CONFLICT DO NOTHING RETURNING idempotency_key), \
             counted AS ( \
               INSERT INTO cockpit_daily_events (day, territory, owner_user_id, event_type, events) \
               SELECT b.day, b.territory, b.owner, b.event_type, count(*) \
               FROM batch b JOIN fresh f ON f.idempotency_key = b.key \
               GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4 \
               ON CONFLICT (day, territory, owner_user_id, event_type) \
               DO UPDATE SET events = cockpit_daily_events.events + EXCLUDED.events \
               RETURNING 1), \
             cursor AS ( \
               INSERT INTO event_cursors (consumer, txid, position, updated_at) \
               SELECT $1, $7::bigint::text::xid8, $8, now() WHERE $7::bigint IS NOT NULL \
               ON CONFLICT (consumer) DO UPDATE \
                 SET txid = EXCLUDED.txid, position = EXCLUDED.position, updated_at = now() \
                 WHERE (event_cursors.txid, event_cursors.position) < (EXCLUDED.txid, EXCLUDED.position) \
               RETURNING 1) \
             SELECT idempotency_key FROM fresh",
        )
        .bind(CONSUMER)
        .bind(&keys)
        .bind(&days)
        .bind(&territories)
        .bind(&owners)
        .bind(&types)
        .bind(advance_to.map(|c| c.txid))
        .bind(advance_to.map(|c| c.position))
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(fresh.into_iter().collect())
    }

    /// Effects every instance applies for every event: widget cache, SSE hub, metrics.
    fn instance_effects(&self, c: &Checked<'_>) {
        let row = c.row;
        let t = c.event_type.as_str();
        self.cache
            .invalidate(c.territory, row.owner_user_id.as_deref());
        let (frame, _) = envelope::frame(&row.envelope);
        let event = HubEvent {
            position: row.position,
            event_type: t.to_string(),
            audience: Audience {
                territory: c.territory,
                owner: row.owner_user_id.clone(),
                collaborators: row.collaborators.clone(),
            },
            data: frame.to_string(),
        };
        self.hub.publish(Arc::new(event));
        self.metrics
            .event_latency
            .with_label_values(&[t, "end_to_end"])
            .observe(ms_since(row.created_at));
        self.metrics.dashboard_updates.with_label_values(&[t]).inc();
    }

    /// Records the publish→notify latency of rows just read.
    pub fn received(&self, rows: &[OutboxRow]) {
        for row in rows {
            self.metrics
                .event_latency
                .with_label_values(&[label_type(&row.event_type), "publish_notify"])
                .observe(ms_since(row.created_at));
        }
    }

    /// Sets `freshplan_outbox_lag_seconds` for the durable consumer.
    pub fn set_lag(&self, oldest_unconsumed: Option<DateTime<Utc>>) {
        let lag = oldest_unconsumed
            .map(|t| ms_since(t) / 1000.0)
            .unwrap_or(0.0);
        self.metrics
            .outbox_lag
            .with_label_values(&[CONSUMER])
            .set(lag);
    }

    /// The pool the consumer reads and writes with.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// Metric label of an event type: known types as they are, anything else as `unknown` (a forged
/// row must not create label values at will).
fn label_type(t: &str) -> &'static str {
    EventType::parse(t)
        .map(EventType::as_str)
        .unwrap_or("unknown")
}

/// Rows after the durable cursor with a position above `high`, matching `condition`, in `order`.
/// The two scans differ only in those three: see [`fetch_stable`] and [`fetch_fresh`].
async fn fetch_after(
    pool: &PgPool,
    after: Cursor,
    high: i64,
    condition: &str,
    order: &str,
    limit: i64,
) -> Result<Vec<OutboxRow>, sqlx::Error> {
    let mut tx = db::begin_as(pool, &Principal::system()).await?;
    let rows = sqlx::query_as(&format!(
        "SELECT {ROW_COLUMNS} FROM outbox \
         WHERE (txid, position) > ($1::bigint::text::xid8, $2) AND position > $3 AND {condition} \
         ORDER BY {order} LIMIT $4"
    ))
    .bind(after.txid)
    .bind(after.position)
    .bind(high)
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(rows)
}

/// Reads up to `limit` rows after the durable cursor that belong to finished transactions, in
/// cursor order (see `listener` for why this bound makes the cursor safe).
pub async fn fetch_stable(
    pool: &PgPool,
    after: Cursor,
    limit: i64,
) -> Result<Vec<OutboxRow>, sqlx::Error> {
    // Positions start at 1, so `position > 0` holds for every row.
    let finished = "txid < pg_snapshot_xmin(pg_current_snapshot())";
    fetch_after(pool, after, 0, finished, "txid, position", limit).await
}

/// Reads up to `limit` committed rows with a position above `high` that lie beyond the durable
/// cursor, in position order: the low-latency path, which never moves the durable cursor.
pub async fn fetch_fresh(
    pool: &PgPool,
    high: i64,
    after: Cursor,
    limit: i64,
) -> Result<Vec<OutboxRow>, sqlx::Error> {
    fetch_after(pool, after, high, "true", "position", limit).await
}

/// The durable cursor of [`CONSUMER`] (the start when it never ran).
pub async fn load_cursor(pool: &PgPool) -> Result<Cursor, sqlx::Error> {
    let mut tx = db::begin_as(pool, &Principal::system()).await?;
    let row: Option<(i64, i64)> = sqlx::query_as(
        "SELECT txid::text::bigint, position FROM event_cursors WHERE consumer = $1",
    )
    .bind(CONSUMER)
    .fetch_optional(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(row
        .map(|(txid, position)| Cursor { txid, position })
        .unwrap_or_default())
}
