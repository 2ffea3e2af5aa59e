//! Retention of the event tables: outbox rows older than
//! `freshplan.events.outbox-retention-hours` that the durable consumer has passed, and inbox rows
//! older than `freshplan.events.inbox-retention-hours` (validated ≥ the outbox's, so a re-read
//! event still finds its inbox row). Runs hourly as the system principal.

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
        "DELETE FROM outbox WHERE created_at < now() - make_interval(hours => $1) \
           AND (txid, position) <= \
             (SELECT txid, position FROM event_cursors ORDER BY txid, position LIMIT 1)",
    )
    .bind(i32::try_from(settings.outbox_retention_hours).unwrap_or(i32::MAX))
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let inbox =
        sqlx::query("DELETE FROM inbox WHERE processed_at < now() - make_interval(hours => $1)")
            .bind(i32::try_from(settings.inbox_retention_hours).unwrap_or(i32::MAX))
            .execute(&mut *tx)
            .await?
            .rows_affected();
    tx.commit().await?;
    Ok(Pruned { outbox, inbox })
}

/// Prunes every hour until `stop` turns true.
pub async fn run(pool: PgPool, settings: EventSettings, mut stop: watch::Receiver<bool>) {
    let mut hourly = tokio::time::interval(Duration::from_secs(3600));
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
            Err(e) => tracing::warn!(error = %e, "event retention failed; retrying next hour"),
        }
    }
}
