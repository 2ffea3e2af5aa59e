//! `freshplan keys rotate`: re-encrypts every contact value under the active key, in batches of
//! short transactions (row locks held for one batch only, `SKIP LOCKED` so a lead being edited is
//! taken later instead of stalling the batch). Resumable: it selects rows not yet under the active
//! key, so an interrupted run continues where it stopped, and a second run does nothing.
//!
//! When the `SKIP LOCKED` pass finds nothing left, a sweep takes the remaining rows *waiting* for
//! their locks (bounded by a lock timeout): without it, a lead that happened to be locked by an
//! edit at the wrong moment would silently stay under the old key. A concurrent PATCH cannot be
//! lost: both sides lock the row (`FOR UPDATE`) and rotation re-reads it after the lock.
//!
//! Lookup hashes are untouched: they use the separate lookup key, so search and duplicate
//! detection work throughout. The lead's version is not bumped either: the clear text did not
//! change, and clients' If-Match must keep working during a rotation.

use anyhow::bail;
use sqlx::PgPool;
use uuid::Uuid;

use super::{PiiError, PiiField, Vault};
use crate::db::{self, Tx};
use crate::identity::Principal;

/// What a rotation did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RotationReport {
    /// Rows re-encrypted under the active key.
    pub rows: u64,
    /// Transactions that re-encrypted at least one row.
    pub batches: u64,
    /// Rows whose values failed authentication (tampered or moved): left as they are, under
    /// their old key, for an administrator to restore. Never retried within a run.
    pub unreadable: Vec<Uuid>,
}

type Row = (
    Uuid,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    String,
);

/// How long the final sweep waits for a row lock held by an edit before giving up.
const SWEEP_LOCK_TIMEOUT: &str = "30s";

async fn next_batch(
    tx: &mut Tx,
    active: &str,
    batch: i64,
    skip: &[Uuid],
    skip_locked: bool,
) -> sqlx::Result<Vec<Row>> {
    if !skip_locked {
        sqlx::query(&format!("SET LOCAL lock_timeout = '{SWEEP_LOCK_TIMEOUT}'"))
            .execute(&mut **tx)
            .await?;
    }
    let sql = format!(
        "SELECT id, contact_person_ct, email_ct, phone_ct, pii_key_id FROM leads \
         WHERE pii_key_id IS NOT NULL AND pii_key_id <> $1 AND id <> ALL($3) \
         ORDER BY id LIMIT $2 FOR UPDATE{}",
        if skip_locked { " SKIP LOCKED" } else { "" }
    );
    sqlx::query_as(&sql)
        .bind(active)
        .bind(batch)
        .bind(skip)
        .fetch_all(&mut **tx)
        .await
}

/// Re-encrypts all rows whose key is not the active one; `batch` rows per transaction.
///
/// Fails when a row is under a key the vault does not have (configure every old key until the
/// rotation is finished); rows that fail authentication are skipped and reported.
pub async fn rotate(pool: &PgPool, vault: &Vault, batch: i64) -> anyhow::Result<RotationReport> {
    let system = Principal::system();
    let active = vault.active_key_id().to_string();
    let mut report = RotationReport::default();
    loop {
        let mut tx = db::begin_as(pool, &system).await?;
        let mut rows = next_batch(&mut tx, &active, batch, &report.unreadable, true).await?;
        if rows.is_empty() {
            // Everything left is locked by someone else (or nothing is left): wait for it.
            tx.rollback().await?;
            tx = db::begin_as(pool, &system).await?;
            rows = next_batch(&mut tx, &active, batch, &report.unreadable, false).await?;
            if rows.is_empty() {
                tx.commit().await?;
                break;
            }
        }
        let mut ids = Vec::with_capacity(rows.len());
        let (mut contacts, mut emails, mut phones) = (Vec::new(), Vec::new(), Vec::new());
        for (id, contact, email, phone, key_id) in rows {
            let reseal = |field, blob: Option<Vec<u8>>| -> Result<Option<Vec<u8>>, PiiError> {
                blob.map(|b| Ok(vault.seal(id, field, &vault.open(id, field, &key_id, &b)?)))
                    .transpose()
            };
            let resealed = (|| {
                Ok::<_, PiiError>((
                    reseal(PiiField::ContactPerson, contact)?,
                    reseal(PiiField::Email, email)?,
                    reseal(PiiField::Phone, phone)?,
                ))
            })();
            match resealed {
                Ok((c, e, p)) => {
                    contacts.push(c);
                    emails.push(e);
                    phones.push(p);
                    ids.push(id);
                }
                Err(PiiError::UnknownKey { key_id, .. }) => bail!(
                    "lead {id} is encrypted under key `{key_id}`, which is not configured: keep every old key \
                     configured (freshplan.pii.keys or the key file) until the rotation has finished"
                ),
                Err(e @ PiiError::Tampered { .. }) => {
                    tracing::error!(lead_id = %id, error = %e, "left a lead whose contact data does not decrypt");
                    report.unreadable.push(id);
                }
            }
        }
        if ids.is_empty() {
            tx.commit().await?;
            continue;
        }
        let n = ids.len() as u64;
        sqlx::query(
            "UPDATE leads l SET contact_person_ct = v.c, email_ct = v.e, phone_ct = v.p, pii_key_id = $5 \
             FROM unnest($1::uuid[], $2::bytea[], $3::bytea[], $4::bytea[]) AS v(id, c, e, p) \
             WHERE l.id = v.id",
        )
        .bind(&ids)
        .bind(&contacts)
        .bind(&emails)
        .bind(&phones)
        .bind(&active)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO audit_log (actor_user_id, actor_role, action, entity_type, entity_id, details) \
             VALUES ('system', 'system', 'PII_KEY_ROTATED', 'lead', 'batch', jsonb_build_object('rows', $1::bigint, 'key', $2::text))",
        )
        .bind(n as i64)
        .bind(&active)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        report.rows += n;
        report.batches += 1;
        tracing::info!(rows = n, total = report.rows, key = %active, "re-encrypted a batch");
    }
    Ok(report)
}
