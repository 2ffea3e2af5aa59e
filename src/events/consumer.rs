//! Applying outbox rows: authorisation, the durable consumers (exactly once in effect through
//! the inbox), the bounded dedupe cache in front of the inbox, and the per-instance effects (SSE
//! hub, local caches, metrics).
//!
//! Delivery is at least once (the listener may read a row on two paths, two instances read the
//! same rows, a restart re-reads rows after the durable cursor). Each [`DurableConsumer`] is made
//! idempotent by its inbox: a whole batch is applied in ONE transaction per consumer that inserts
//! its inbox rows (`ON CONFLICT DO NOTHING RETURNING`), advances its cursor, and hands only the
//! events that were new to [`DurableConsumer::apply`]. Adding a consumer is one file implementing
//! the trait, registered in `app.rs`.
//!
//! Per-instance effects happen on every instance for every event, whichever instance won the
//! inbox race: each instance has its own SSE subscribers and its own caches.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use super::dedupe::DedupeCache;
use super::envelope::{self, Audience, EventType};
use super::hub::{Hub, HubEvent};
use super::outbox::{self, Cursor, OutboxRow};
use super::MODULE;
use crate::db::{self, Tx};
use crate::identity::Principal;
use crate::telemetry::metrics::Metrics;
use crate::territory::Territory;

/// An outbox row that passed authorisation.
pub struct Event<'a> {
    pub row: &'a OutboxRow,
    pub event_type: EventType,
    pub territory: Territory,
    /// The CloudEvents `time`.
    pub time: DateTime<Utc>,
}

/// A consumer with a durable effect: its own inbox rows and cursor (keyed by [`name`]) are written
/// in the same transaction as its effect.
///
/// [`name`]: DurableConsumer::name
pub trait DurableConsumer: Send + Sync {
    /// Inbox and cursor key; stable forever (renaming it replays the retained outbox).
    fn name(&self) -> &'static str;

    /// Applies the events that are new to this consumer, in its transaction (run as the system
    /// principal). An error rolls back the batch, inbox rows included; it is read again.
    fn apply<'a>(
        &'a self,
        tx: &'a mut Tx,
        events: &'a [&'a Event<'a>],
    ) -> BoxFuture<'a, Result<(), sqlx::Error>>;
}

/// An effect of this instance only (a cache, a gauge), run for every authorised event after the
/// durable consumers committed.
pub trait LocalEffect: Send + Sync {
    /// Reacts to one event.
    fn on_event(&self, event: &Event<'_>);
}

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

/// Authorises a row before anything marks it processed: a known type, this module as source,
/// the attributes CloudEvents and CONTRACT.md require, and a key matching its row. `None` for
/// anything else, whatever the envelope holds (tests/fuzz.rs feeds it arbitrary JSON).
pub fn authorize(row: &OutboxRow) -> Option<Event<'_>> {
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
    Some(Event {
        row,
        event_type,
        territory,
        time,
    })
}

fn ms_since(t: DateTime<Utc>) -> f64 {
    ((Utc::now() - t).num_microseconds().unwrap_or(0) as f64 / 1000.0).max(0.0)
}

/// Applies outbox rows: the durable consumers plus this instance's effects.
#[derive(Clone)]
pub struct Dispatcher {
    durable: Vec<Arc<dyn DurableConsumer>>,
    local: Vec<Arc<dyn LocalEffect>>,
    hub: Arc<Hub>,
    dedupe: Arc<DedupeCache>,
    metrics: Arc<Metrics>,
}

impl Dispatcher {
    /// A dispatcher for these consumers and effects.
    pub fn new(
        durable: Vec<Arc<dyn DurableConsumer>>,
        local: Vec<Arc<dyn LocalEffect>>,
        hub: Arc<Hub>,
        dedupe: Arc<DedupeCache>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Dispatcher {
            durable,
            local,
            hub,
            dedupe,
            metrics,
        }
    }

    /// Names of the durable consumers (their cursors decide where an instance starts reading).
    pub fn consumer_names(&self) -> Vec<&'static str> {
        self.durable.iter().map(|c| c.name()).collect()
    }

    /// Processes a batch read at `received` with `pool` (the listener's own connections):
    /// authorises every row, applies the durable effects of the authorised ones (one transaction
    /// per consumer, which also advances its cursor to `advance_to`, if given), then runs the
    /// per-instance effects. Returns one outcome per row. On a database error the rows are
    /// counted as `failure` and will be read again.
    pub async fn process(
        &self,
        pool: &PgPool,
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
        // The dedupe cache first; the inboxes decide for everything the cache does not know.
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
        let mut fresh = HashSet::new();
        for consumer in &self.durable {
            match self
                .apply_durable(pool, consumer.as_ref(), &to_apply, advance_to)
                .await
            {
                Ok(keys) => fresh.extend(keys),
                Err(e) => {
                    for (_, c) in &checked {
                        self.metrics
                            .events_consumed
                            .with_label_values(&[c.event_type.as_str(), MODULE, "failure"])
                            .inc();
                    }
                    return Err(e);
                }
            }
        }
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

    /// One consumer's transaction: inbox rows, cursor, effect of the new events.
    async fn apply_durable(
        &self,
        pool: &PgPool,
        consumer: &dyn DurableConsumer,
        rows: &[(usize, &Event<'_>)],
        advance_to: Option<Cursor>,
    ) -> Result<Vec<Uuid>, sqlx::Error> {
        if rows.is_empty() && advance_to.is_none() {
            return Ok(Vec::new());
        }
        let keys: Vec<Uuid> = rows.iter().map(|(_, c)| c.row.idempotency_key).collect();
        let mut tx = db::begin_as(pool, &Principal::system()).await?;
        let fresh = outbox::record_batch(&mut tx, consumer.name(), &keys, advance_to).await?;
        if !fresh.is_empty() {
            let new: HashSet<&Uuid> = fresh.iter().collect();
            let events: Vec<&Event<'_>> = rows
                .iter()
                .map(|(_, c)| *c)
                .filter(|c| new.contains(&c.row.idempotency_key))
                .collect();
            consumer.apply(&mut tx, &events).await?;
        }
        tx.commit().await?;
        Ok(fresh)
    }

    /// Effects every instance applies for every event: local effects, SSE hub, metrics.
    fn instance_effects(&self, c: &Event<'_>) {
        let row = c.row;
        let t = c.event_type.as_str();
        for effect in &self.local {
            effect.on_event(c);
        }
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

    /// Samples PostgreSQL's notification queue (`freshplan_notify_queue_usage`): a full queue
    /// makes every NOTIFY fail, so operators are warned long before.
    pub async fn sample_notify_queue(&self, pool: &PgPool) -> Result<(), sqlx::Error> {
        let usage: f64 = sqlx::query_scalar("SELECT pg_notification_queue_usage()")
            .fetch_one(pool)
            .await?;
        self.metrics.notify_queue_usage.set(usage);
        Ok(())
    }

    /// Sets `freshplan_outbox_lag_seconds` for every durable consumer.
    pub fn set_lag(&self, oldest_unconsumed: Option<DateTime<Utc>>) {
        let lag = oldest_unconsumed
            .map(|t| ms_since(t) / 1000.0)
            .unwrap_or(0.0);
        for c in &self.durable {
            self.metrics
                .outbox_lag
                .with_label_values(&[c.name()])
                .set(lag);
        }
    }
}

/// Metric label of an event type: known types as they are, anything else as `unknown` (a forged
/// row must not create label values at will).
fn label_type(t: &str) -> &'static str {
    EventType::parse(t)
        .map(EventType::as_str)
        .unwrap_or("unknown")
}
