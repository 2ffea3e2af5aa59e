//! `freshplan keys rotate`: re-encrypts every contact value under the active key, in batches of
//! short transactions (row locks held for one batch only, `SKIP LOCKED` so a lead being edited is
//! simply taken in a later batch). Resumable: it selects rows not yet under the active key, so an
//! interrupted run continues where it stopped. The lead's version is not bumped: the clear text
//! did not change, and clients' If-Match must keep working during a rotation.

use sqlx::PgPool;
use uuid::Uuid;

use super::{PiiField, Vault};
use crate::auth::Principal;
use crate::db;

/// What a rotation did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RotationReport {
    pub rows: u64,
    pub batches: u64,
}

type Row = (
    Uuid,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    String,
);

/// Re-encrypts all rows whose key is not the active one; `batch` rows per transaction.
pub async fn rotate(pool: &PgPool, vault: &Vault, batch: i64) -> anyhow::Result<RotationReport> {
    let system = Principal::system();
    let active = vault.active_key_id().to_string();
    let mut report = RotationReport::default();
    loop {
        let mut tx = db::begin_as(pool, &system).await?;
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT id, contact_person_ct, email_ct, phone_ct, pii_key_id FROM leads \
             WHERE pii_key_id IS NOT NULL AND pii_key_id <> $1 \
             ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED",
        )
        .bind(&active)
        .bind(batch)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            tx.commit().await?;
            break;
        }
        let mut ids = Vec::with_capacity(rows.len());
        let (mut contacts, mut emails, mut phones) = (Vec::new(), Vec::new(), Vec::new());
        for (id, contact, email, phone, key_id) in rows {
            let reseal = |field, blob: Option<Vec<u8>>| -> anyhow::Result<Option<Vec<u8>>> {
                Ok(match blob {
                    Some(b) => Some(vault.seal(id, field, &vault.open(id, field, &key_id, &b)?)),
                    None => None,
                })
            };
            contacts.push(reseal(PiiField::ContactPerson, contact)?);
            emails.push(reseal(PiiField::Email, email)?);
            phones.push(reseal(PiiField::Phone, phone)?);
            ids.push(id);
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
