//! Writing events into the outbox (inside the business transaction) and reading them back.

use serde_json::Value;
use uuid::Uuid;

use super::envelope::NewEvent;
use crate::db::Tx;

/// Inserts the event in the caller's transaction. Returns false when an event with the same
/// idempotency key already exists (the same fact published twice is one event).
pub async fn append(tx: &mut Tx, ev: &NewEvent) -> Result<bool, sqlx::Error> {
    let inserted = sqlx::query(
        "INSERT INTO outbox (event_id, idempotency_key, event_type, subject, territory, \
           owner_user_id, collaborators, envelope) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (idempotency_key) DO NOTHING",
    )
    .bind(ev.id)
    .bind(ev.key)
    .bind(ev.event_type.as_str())
    .bind(ev.subject.map(|s| s.to_string()))
    .bind(ev.audience.territory.code())
    .bind(&ev.audience.owner)
    .bind(&ev.audience.collaborators)
    .bind(ev.envelope())
    .execute(&mut **tx)
    .await?
    .rows_affected();
    Ok(inserted == 1)
}

/// SQL expression of the full envelope including its outbox position.
pub const ENVELOPE_SQL: &str = "envelope || jsonb_build_object('position', position)";

/// The full envelope behind a key, if the transaction's principal is in its audience
/// (row-level security on the outbox applies the audience rule).
pub async fn fetch_by_key(tx: &mut Tx, key: Uuid) -> Result<Option<Value>, sqlx::Error> {
    sqlx::query_scalar(&format!(
        "SELECT {ENVELOPE_SQL} FROM outbox WHERE idempotency_key = $1"
    ))
    .bind(key)
    .fetch_optional(&mut **tx)
    .await
}
