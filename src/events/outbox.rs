//! All SQL of the outbox, the inbox and the durable cursors: appending events (and a change's
//! audit row with its first event) in the business transaction, the listener's two scans, loading
//! cursors, and recording a consumer's batch (inbox rows + cursor) in the consumer's own
//! transaction.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::postgres::PgArguments;
use sqlx::query::QueryScalar;
use sqlx::{PgPool, Postgres};
use uuid::Uuid;

use super::envelope::NewEvent;
use crate::db::{self, SystemPool, Tx};
use crate::identity::{Principal, Role};
use crate::territory::Territory;

/// The audit row of a change (field names and non-PII values only in `details`), written in the
/// change's transaction; [`append_audited`] writes it in the same statement as the change's first
/// event.
#[derive(Debug, Clone)]
pub struct AuditRow {
    pub actor_user_id: String,
    pub actor_role: Role,
    pub action: &'static str,
    pub entity_type: &'static str,
    pub entity_id: String,
    pub territory: Option<Territory>,
    pub details: Value,
}

impl AuditRow {
    /// An audit row of `p` about the entity `entity_type`/`entity_id`.
    pub fn new(
        p: &Principal,
        action: &'static str,
        entity_type: &'static str,
        entity_id: String,
        territory: Option<Territory>,
        details: Value,
    ) -> Self {
        AuditRow {
            actor_user_id: p.user_id.clone(),
            actor_role: p.role,
            action,
            entity_type,
            entity_id,
            territory,
            details,
        }
    }
}

const AUDIT_COLUMNS: &str =
    "audit_log (actor_user_id, actor_role, action, entity_type, entity_id, territory, details)";
const OUTBOX_COLUMNS: &str = "outbox (event_id, idempotency_key, event_type, subject, territory, \
     owner_user_id, collaborators, envelope)";

/// Writes an audit row in the caller's transaction.
pub async fn audit(tx: &mut Tx, a: &AuditRow) -> Result<(), sqlx::Error> {
    let sql = format!("INSERT INTO {AUDIT_COLUMNS} VALUES ($1, $2, $3, $4, $5, $6, $7)");
    bind_audit(sqlx::query_scalar(&sql), a)
        .fetch_optional(&mut **tx)
        .await?;
    Ok(())
}

/// Binds the audit columns of `a` as the next seven parameters.
fn bind_audit<'q>(
    q: QueryScalar<'q, Postgres, i64, PgArguments>,
    a: &'q AuditRow,
) -> QueryScalar<'q, Postgres, i64, PgArguments> {
    q.bind(&a.actor_user_id)
        .bind(a.actor_role)
        .bind(a.action)
        .bind(a.entity_type)
        .bind(&a.entity_id)
        .bind(a.territory)
        .bind(&a.details)
}

/// Inserts the event in the caller's transaction. Returns its outbox position, or `None` when an
/// event with the same idempotency key already exists (the same fact published twice is one
/// event).
pub async fn append(tx: &mut Tx, ev: &NewEvent) -> Result<Option<i64>, sqlx::Error> {
    let sql = format!(
        "INSERT INTO {OUTBOX_COLUMNS} \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (idempotency_key) DO NOTHING \
         RETURNING position"
    );
    bind_event(sqlx::query_scalar(&sql), ev)
        .fetch_optional(&mut **tx)
        .await
}

/// Binds the outbox columns of `ev` as `$1` … `$8`.
fn bind_event<'q>(
    q: QueryScalar<'q, Postgres, i64, PgArguments>,
    ev: &'q NewEvent,
) -> QueryScalar<'q, Postgres, i64, PgArguments> {
    q.bind(ev.id)
        .bind(ev.key)
        .bind(ev.event_type.as_str())
        .bind(ev.subject.map(|s| s.to_string()))
        .bind(ev.audience.territory.code())
        .bind(&ev.audience.owner)
        .bind(&ev.audience.collaborators)
        .bind(ev.envelope())
}

/// [`append`] and [`audit`] in one statement (one round trip): the audit row is written whether
/// or not the event was new, as the two statements would.
pub async fn append_audited(
    tx: &mut Tx,
    ev: &NewEvent,
    a: &AuditRow,
) -> Result<Option<i64>, sqlx::Error> {
    let sql = format!(
        "WITH audit AS (INSERT INTO {AUDIT_COLUMNS} VALUES ($9, $10, $11, $12, $13, $14, $15)) \
         INSERT INTO {OUTBOX_COLUMNS} \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (idempotency_key) DO NOTHING \
         RETURNING position"
    );
    bind_audit(bind_event(sqlx::query_scalar(&sql), ev), a)
        .fetch_optional(&mut **tx)
        .await
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

/// Up to `limit` events after `position` that the transaction's principal may see (row-level
/// security applies the audience rule): (position, type, envelope), in position order.
pub async fn replay_after(
    tx: &mut Tx,
    position: i64,
    limit: i64,
) -> Result<Vec<(i64, String, Value)>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT position, event_type, {ENVELOPE_SQL} FROM outbox WHERE position > $1 ORDER BY position LIMIT $2"
    ))
    .bind(position)
    .bind(limit)
    .fetch_all(&mut **tx)
    .await
}

/// One outbox row as the listener reads it.
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
const ROW_COLUMNS: &str = "position, txid::text::bigint AS txid, idempotency_key, event_type, territory, \
     owner_user_id, collaborators, envelope || jsonb_build_object('position', position) AS envelope, created_at";

/// A position of a durable cursor: rows are ordered by (txid, position).
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

/// Rows after `after` with a position above `high`, matching `condition`, in `order`. The two
/// scans differ only in those three: see [`fetch_stable`] and [`fetch_fresh`].
async fn fetch_after(
    pool: &SystemPool,
    after: Cursor,
    high: i64,
    condition: &str,
    order: &str,
    limit: i64,
) -> Result<Vec<OutboxRow>, sqlx::Error> {
    // One statement: the connection is the system principal for its whole session.
    sqlx::query_as(&format!(
        "SELECT {ROW_COLUMNS} FROM outbox \
         WHERE (txid, position) > ($1::bigint::text::xid8, $2) AND position > $3 AND {condition} \
         ORDER BY {order} LIMIT $4"
    ))
    .bind(after.txid)
    .bind(after.position)
    .bind(high)
    .bind(limit)
    .fetch_all(pool.pool())
    .await
}

/// Reads up to `limit` rows after the cursor that belong to finished transactions, in cursor
/// order (see `listener` for why this bound makes the cursor safe).
pub async fn fetch_stable(
    pool: &SystemPool,
    after: Cursor,
    limit: i64,
) -> Result<Vec<OutboxRow>, sqlx::Error> {
    // Positions start at 1, so `position > 0` holds for every row.
    let finished = "txid < pg_snapshot_xmin(pg_current_snapshot())";
    fetch_after(pool, after, 0, finished, "txid, position", limit).await
}

/// Reads up to `limit` committed rows with a position above `high` that lie beyond the cursor,
/// in position order: the low-latency path, which never moves a durable cursor.
pub async fn fetch_fresh(
    pool: &SystemPool,
    high: i64,
    after: Cursor,
    limit: i64,
) -> Result<Vec<OutboxRow>, sqlx::Error> {
    fetch_after(pool, after, high, "true", "position", limit).await
}

/// The lowest durable cursor among `consumers` (the start for a consumer that never ran), which
/// is where an instance that starts has to read from so that no consumer misses a row.
pub async fn load_min_cursor(pool: &PgPool, consumers: &[&str]) -> Result<Cursor, sqlx::Error> {
    let mut tx = db::begin_as(pool, &Principal::system()).await?;
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT consumer, txid::text::bigint, position FROM event_cursors WHERE consumer = ANY($1)",
    )
    .bind(consumers)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(consumers
        .iter()
        .map(|c| {
            rows.iter()
                .find(|r| r.0 == *c)
                .map(|r| Cursor {
                    txid: r.1,
                    position: r.2,
                })
                .unwrap_or_default()
        })
        .min()
        .unwrap_or_default())
}

/// In a consumer's transaction: inserts its inbox rows for `keys` (in key order, so instances
/// racing on overlapping batches take their locks in the same order), advances its cursor to
/// `advance_to` (never backwards) and returns the keys that were new to it. One statement.
pub async fn record_batch(
    tx: &mut Tx,
    consumer: &str,
    keys: &[Uuid],
    advance_to: Option<Cursor>,
) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "WITH fresh AS ( \
           INSERT INTO inbox (consumer, idempotency_key) \
           SELECT $1, key FROM unnest($2::uuid[]) AS key ORDER BY key \
           ON CONFLICT DO NOTHING RETURNING idempotency_key), \
         cursor AS ( \
           INSERT INTO event_cursors (consumer, txid, position, updated_at) \
           SELECT $1, $3::bigint::text::xid8, $4, now() WHERE $3::bigint IS NOT NULL \
           ON CONFLICT (consumer) DO UPDATE \
             SET txid = EXCLUDED.txid, position = EXCLUDED.position, updated_at = now() \
             WHERE (event_cursors.txid, event_cursors.position) < (EXCLUDED.txid, EXCLUDED.position) \
           RETURNING 1) \
         SELECT idempotency_key FROM fresh",
    )
    .bind(consumer)
    .bind(keys)
    .bind(advance_to.map(|c| c.txid))
    .bind(advance_to.map(|c| c.position))
    .fetch_all(&mut **tx)
    .await
}
