//! The doorbell: after a local commit wrote events, ring `dashboard_updates` so the listeners of
//! the other instances look at the outbox.
//!
//! The ring carries only the newest outbox position (never an event) and is sent from one
//! connection of its own, never from the business transaction: a transaction that issues NOTIFY
//! takes a cluster-wide lock at commit and holds it through the WAL flush, which serialises
//! writers (DESIGN.md). Commits that happen while a ring is in flight are coalesced into the next
//! ring by `Notify`'s single permit. The connection runs with `synchronous_commit = off`: a lost
//! ring is harmless, the listeners' periodic poll covers it.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, PgConnection};
use tokio::sync::{watch, Notify};

use super::listener::CHANNEL;

/// `application_name` of the doorbell connection.
pub const APPLICATION_NAME: &str = "freshplan-doorbell";

async fn connect(url: &str) -> anyhow::Result<PgConnection> {
    PgConnectOptions::from_str(url)
        .context("invalid database URL")?
        .application_name(APPLICATION_NAME)
        .options([("synchronous_commit", "off")])
        .connect()
        .await
        .context("connecting the doorbell")
}

/// Rings once: `pg_notify` with the newest position of the outbox sequence.
pub async fn ring(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify($1, (SELECT last_value FROM outbox_position_seq)::text)")
        .bind(CHANNEL)
        .execute(conn)
        .await?;
    Ok(())
}

/// Rings after every signal of `committed` until `stop` turns true; reconnects with backoff.
pub async fn run(database_url: String, committed: Arc<Notify>, mut stop: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(250);
    let mut conn: Option<PgConnection> = None;
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            _ = committed.notified() => {}
        }
        if conn.is_none() {
            match connect(&database_url).await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "doorbell cannot connect; the listeners' poll covers the ring");
                    // Ring again later: keep the signal and wait before retrying.
                    committed.notify_one();
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            }
        }
        if let Some(c) = conn.as_mut() {
            match ring(c).await {
                Ok(()) => backoff = Duration::from_millis(250),
                Err(e) => {
                    tracing::warn!(error = %e, "doorbell ring failed; reconnecting");
                    conn = None;
                    committed.notify_one();
                }
            }
        }
    }
    if let Some(c) = conn {
        let _ = sqlx::Connection::close(c).await;
    }
}
