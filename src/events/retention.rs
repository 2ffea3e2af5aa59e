//! Retention of the event tables: outbox rows older than
//! `freshplan.events.outbox-retention-hours` that the durable consumer has passed, and inbox rows
//! older than `freshplan.events.inbox-retention-hours` (validated ≥ the outbox's, so a re-read
//! event still finds its inbox row). Runs every `freshplan.events.retention-interval-seconds`
//! (hourly by default, and at start) as the system principal.
//!
//! # An inbox row stays while its event lies beyond the consumer's durable cursor
//!
//! The listener applies fresh rows at once, but the durable cursor only passes rows whose
//! transaction is older than the oldest one running: one transaction left idle (a forgotten
//! `BEGIN` in psql) holds it back for as long as it stays open. The rows applied meanwhile are
//! read again by the stable scan once it ends — by this instance after a restart, or by any other
//! instance — and only their inbox rows make that re-read a `duplicate`. Pruning them by age alone
//! would apply those events twice (tests/faults.rs, `a_transaction_idle_past_the_inbox_retention_…`),
//! so an inbox row is pruned only once its outbox row is gone or at or below the consumer's
//! cursor.

use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::watch;

use crate::config::EventSettings;
use crate::db;
use crate::identity::Principal;

/// Rows deleted by one run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub outbox: u64,
    pub inbox: u64,
}

/// Deletes expired rows once. Outbox rows beyond the lowest durable cursor of any consumer stay,
/// however old: some consumer has not applied them yet (e.g. while cross-module events are
/// switched off).
pub async fn prune(pool: &PgPool, settings: &EventSettings) -> Result<Pruned, sqlx::Error> {
    let mut tx = db::begin_as(pool, &Principal::system()).await?;
    let outbox = sqlx::query(
        "DELETE FROM outbox WHERE created_at < now() - make_interval(secs => $1) \
           AND (txid, position) <= \
             (SELECT txid, position FROM event_cursors ORDER BY txid, position LIMIT 1)",
    )
    .bind(settings.outbox_retention_hours * 3600.0)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let inbox = sqlx::query(
        "DELETE FROM inbox i WHERE i.processed_at < now() - make_interval(secs => $1) \
           AND NOT EXISTS ( \
             SELECT 1 FROM outbox o LEFT JOIN event_cursors c ON c.consumer = i.consumer \
              WHERE o.idempotency_key = i.idempotency_key \
                AND (c.consumer IS NULL OR (o.txid, o.position) > (c.txid, c.position)))",
    )
    .bind(settings.inbox_retention_hours * 3600.0)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tx.commit().await?;
    Ok(Pruned { outbox, inbox })
}

/// Prunes at start and every `retention-interval-seconds` until `stop` turns true.
pub async fn run(pool: PgPool, settings: EventSettings, mut stop: watch::Receiver<bool>) {
    let mut hourly = tokio::time::interval(Duration::from_secs(
        settings.retention_interval_seconds.max(1),
    ));
    hourly.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => return,
            _ = hourly.tick() => {}
        }
        match prune(&pool, &settings).await {
            Ok(p) if p.outbox + p.inbox > 0 => tracing::info!(
                outbox = p.outbox,
                inbox = p.inbox,
                "event retention pruned rows"
            ),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "event retention failed; retrying at the next interval")
            }
        }
    }
}
