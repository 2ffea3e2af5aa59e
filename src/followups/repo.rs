//! All SQL of the follow-ups context. Every function runs in a transaction opened as the
//! `system` principal (row-level security lets only system write follow-ups and mails).

use chrono::{DateTime, Utc};
use sqlx::FromRow;
use uuid::Uuid;

use super::templates::Kind;
use crate::db::Tx;
use crate::leads::domain::BusinessType;
use crate::territory::Territory;

/// A lead due for a follow-up, locked for this run.
#[derive(Debug, FromRow)]
pub struct DueLead {
    pub id: Uuid,
    pub territory: Territory,
    pub owner_user_id: String,
    pub collaborators: Vec<String>,
    pub owner_name: Option<String>,
    pub business_type: BusinessType,
    pub company_name: String,
    pub contact_person_ct: Option<Vec<u8>>,
    pub email_ct: Option<Vec<u8>>,
    pub pii_key_id: Option<String>,
}

/// Locks up to `limit` leads due for `kind` at `now` (DESIGN.md "Follow-ups"), oldest first,
/// skipping leads another run holds. A lead whose follow-up of this kind is queued or sent is
/// not due; one whose follow-up failed is due again — in a later run (`queued_at` before this
/// run's `now`), so a mail that cannot be composed is tried once per run, not in a loop.
pub async fn lock_due(
    tx: &mut Tx,
    kind: Kind,
    now: DateTime<Utc>,
    territory: Option<Territory>,
    limit: i64,
) -> Result<Vec<DueLead>, sqlx::Error> {
    let (age, sent) = match kind {
        Kind::T3 => ("3 days", "l.t3_sent_at IS NULL"),
        Kind::T7 => (
            "7 days",
            "l.t3_sent_at IS NOT NULL AND l.t7_sent_at IS NULL",
        ),
    };
    sqlx::query_as(&format!(
        "SELECT l.id, l.territory, l.owner_user_id, l.collaborators, u.name AS owner_name, l.business_type, \
                l.company_name, l.contact_person_ct, l.email_ct, l.pii_key_id \
         FROM leads l LEFT JOIN users u ON u.id = l.owner_user_id \
         WHERE l.status = 'ACTIVE' AND NOT l.clock_stopped AND l.email_consent \
           AND NOT l.contact_blocked AND l.email_ct IS NOT NULL AND {sent} \
           AND l.registered_at <= $1 - interval '{age}' \
           AND ($2::text IS NULL OR l.territory = $2) \
           AND NOT EXISTS (SELECT 1 FROM followups f WHERE f.lead_id = l.id \
                           AND f.followup_type = $3 \
                           AND (f.status <> 'FAILED' OR f.queued_at >= $1)) \
         ORDER BY l.registered_at, l.id \
         LIMIT $4 \
         FOR UPDATE OF l SKIP LOCKED"
    ))
    .bind(now)
    .bind(territory.map(Territory::code))
    .bind(kind.as_str())
    .bind(limit)
    .fetch_all(&mut **tx)
    .await
}

/// Claims the follow-up of `kind` for a lead: inserts it QUEUED, or takes a FAILED one up
/// again. `None` when another run already holds or sent it — the unique (lead, type) row makes
/// two runs, on one instance or two, never queue the same mail twice.
pub async fn claim(
    tx: &mut Tx,
    lead: &DueLead,
    kind: Kind,
    template: &str,
    now: DateTime<Utc>,
) -> Result<Option<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO followups (id, lead_id, followup_type, status, territory, owner_user_id, \
                                attempts, queued_at, template) \
         VALUES ($1, $2, $3, 'QUEUED', $4, $5, 0, $6, $7) \
         ON CONFLICT (lead_id, followup_type) DO UPDATE \
           SET status = 'QUEUED', queued_at = EXCLUDED.queued_at, failed_at = NULL, \
               last_error = NULL, template = EXCLUDED.template \
           WHERE followups.status = 'FAILED' \
         RETURNING id",
    )
    .bind(Uuid::now_v7())
    .bind(lead.id)
    .bind(kind.as_str())
    .bind(lead.territory.code())
    .bind(&lead.owner_user_id)
    .bind(now)
    .bind(template)
    .fetch_optional(&mut **tx)
    .await
}

/// A mail to queue.
pub struct NewMail<'a> {
    pub id: Uuid,
    pub followup_id: Uuid,
    pub lead_id: Uuid,
    pub kind: Kind,
    pub territory: Territory,
    pub template: &'a str,
    pub key_id: &'a str,
    pub sealed: &'a [u8],
    pub created_at: DateTime<Utc>,
}

/// Queues a mail, due at once.
pub async fn queue_mail(tx: &mut Tx, m: &NewMail<'_>) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO mail_outbox (id, followup_id, lead_id, followup_type, territory, template, \
                                  status, attempts, next_attempt_at, key_id, message, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, 'QUEUED', 0, now(), $7, $8, $9)",
    )
    .bind(m.id)
    .bind(m.followup_id)
    .bind(m.lead_id)
    .bind(m.kind.as_str())
    .bind(m.territory.code())
    .bind(m.template)
    .bind(m.key_id)
    .bind(m.sealed)
    .bind(m.created_at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// A mail taken for delivery.
#[derive(Debug, FromRow)]
pub struct ClaimedMail {
    pub id: Uuid,
    pub followup_id: Uuid,
    pub lead_id: Uuid,
    pub followup_type: String,
    pub territory: String,
    pub attempts: i32,
    pub key_id: String,
    pub message: Vec<u8>,
    /// The lead may still be mailed (active, consent, contact not blocked, clock running):
    /// checked when the mail is taken, so consent withdrawn after queueing stops it.
    pub mailable: bool,
}

/// Takes up to `limit` due mails (queued and due, or whose delivery claim expired: a crashed
/// dispatcher) and marks them SENDING until `claimed_until`. Times are real time.
pub async fn claim_mails(
    tx: &mut Tx,
    limit: i64,
    claim_seconds: i64,
) -> Result<Vec<ClaimedMail>, sqlx::Error> {
    sqlx::query_as(
        "UPDATE mail_outbox m SET status = 'SENDING', attempts = m.attempts + 1, \
                claimed_until = now() + make_interval(secs => $2) \
         FROM (SELECT id FROM mail_outbox \
               WHERE (status = 'QUEUED' AND next_attempt_at <= now()) \
                  OR (status = 'SENDING' AND claimed_until < now()) \
               ORDER BY next_attempt_at, id LIMIT $1 FOR UPDATE SKIP LOCKED) due \
         WHERE m.id = due.id \
         RETURNING m.id, m.followup_id, m.lead_id, m.followup_type, m.territory, m.attempts, \
                   m.key_id, m.message, \
                   EXISTS (SELECT 1 FROM leads l WHERE l.id = m.lead_id AND l.status = 'ACTIVE' \
                           AND l.email_consent AND NOT l.contact_blocked AND NOT l.clock_stopped) \
                   AS mailable",
    )
    .bind(limit)
    .bind(claim_seconds as f64)
    .fetch_all(&mut **tx)
    .await
}

/// Seconds until the next queued mail is due (None: nothing queued), and how many mails are
/// being delivered right now.
pub async fn next_due_in(tx: &mut Tx) -> Result<(Option<f64>, i64), sqlx::Error> {
    sqlx::query_as(
        // No GREATEST(0, …) here: it ignores a NULL (nothing queued) and would answer 0.
        "SELECT EXTRACT(EPOCH FROM min(next_attempt_at) FILTER (WHERE status = 'QUEUED') - now())::float8, \
                count(*) FILTER (WHERE status = 'SENDING') \
         FROM mail_outbox WHERE status IN ('QUEUED', 'SENDING')",
    )
    .fetch_one(&mut **tx)
    .await
    .map(|(due, sending): (Option<f64>, i64)| (due.map(|s| s.max(0.0)), sending))
}

/// Mails pending (queued) and processing (being delivered).
pub async fn queue_sizes(tx: &mut Tx) -> Result<(i64, i64), sqlx::Error> {
    sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = 'QUEUED'), count(*) FILTER (WHERE status = 'SENDING') \
         FROM mail_outbox WHERE status IN ('QUEUED', 'SENDING')",
    )
    .fetch_one(&mut **tx)
    .await
}

/// The audience of a lead.
#[derive(Debug, FromRow)]
pub struct LeadAudience {
    pub territory: Territory,
    pub owner_user_id: String,
    pub collaborators: Vec<String>,
}

/// Marks a delivered mail, its follow-up and the lead (`t3_sent_at`/`t7_sent_at`) sent, in one
/// transaction (docs/cockpit-sql.md "What every write must do"). `None` when this dispatcher's
/// claim was lost (it expired and another took the mail over): nothing is written.
pub async fn mark_sent(
    tx: &mut Tx,
    mail: &ClaimedMail,
    kind: Kind,
    at: DateTime<Utc>,
) -> Result<Option<LeadAudience>, sqlx::Error> {
    let mine = sqlx::query(
        "UPDATE mail_outbox SET status = 'SENT', sent_at = $2, claimed_until = NULL, last_error = NULL \
         WHERE id = $1 AND status = 'SENDING' AND attempts = $3",
    )
    .bind(mail.id)
    .bind(at)
    .bind(mail.attempts)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if mine == 0 {
        return Ok(None);
    }
    sqlx::query(
        "UPDATE followups SET status = 'SENT', sent_at = $2, attempts = $3, failed_at = NULL, \
                last_error = NULL WHERE id = $1",
    )
    .bind(mail.followup_id)
    .bind(at)
    .bind(mail.attempts)
    .execute(&mut **tx)
    .await?;
    let column = match kind {
        Kind::T3 => "t3_sent_at",
        Kind::T7 => "t7_sent_at",
    };
    sqlx::query_as(&format!(
        "UPDATE leads SET {column} = $2, version = version + 1, updated_at = $2, updated_by = 'system' \
         WHERE id = $1 RETURNING territory, owner_user_id, collaborators"
    ))
    .bind(mail.lead_id)
    .bind(at)
    .fetch_optional(&mut **tx)
    .await
}

/// After a failed attempt: back to QUEUED, due again at `retry_in_ms` from now (real time).
pub async fn reschedule(
    tx: &mut Tx,
    mail: &ClaimedMail,
    error: &str,
    retry_in_ms: u64,
) -> Result<bool, sqlx::Error> {
    let n = sqlx::query(
        "UPDATE mail_outbox SET status = 'QUEUED', claimed_until = NULL, last_error = $2, \
                next_attempt_at = now() + make_interval(secs => $3) \
         WHERE id = $1 AND status = 'SENDING' AND attempts = $4",
    )
    .bind(mail.id)
    .bind(error)
    .bind(retry_in_ms as f64 / 1000.0)
    .bind(mail.attempts)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// After the last failed attempt: the mail and its follow-up are FAILED (the lead is not marked
/// sent, a later run queues it again). `None` when the claim was lost.
pub async fn mark_failed(
    tx: &mut Tx,
    mail: &ClaimedMail,
    error: &str,
    at: DateTime<Utc>,
) -> Result<Option<LeadAudience>, sqlx::Error> {
    let mine = sqlx::query(
        "UPDATE mail_outbox SET status = 'FAILED', failed_at = $2, claimed_until = NULL, last_error = $3 \
         WHERE id = $1 AND status = 'SENDING' AND attempts = $4",
    )
    .bind(mail.id)
    .bind(at)
    .bind(error)
    .bind(mail.attempts)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if mine == 0 {
        return Ok(None);
    }
    sqlx::query(
        "UPDATE followups SET status = 'FAILED', failed_at = $2, attempts = $3, last_error = $4 \
         WHERE id = $1",
    )
    .bind(mail.followup_id)
    .bind(at)
    .bind(mail.attempts)
    .bind(error)
    .execute(&mut **tx)
    .await?;
    sqlx::query_as(
        "SELECT territory, owner_user_id, collaborators FROM leads WHERE id = $1 FOR NO KEY UPDATE",
    )
    .bind(mail.lead_id)
    .fetch_optional(&mut **tx)
    .await
}

/// The lead an unsubscribe link names, locked, with what the confirmation page shows.
#[derive(Debug, FromRow)]
pub struct UnsubscribeLead {
    pub company_name: String,
    pub email_consent: bool,
    pub territory: Territory,
    pub owner_user_id: String,
    pub collaborators: Vec<String>,
}

/// The lead of an unsubscribe link and whether the link was already used.
pub async fn unsubscribe_target(
    tx: &mut Tx,
    token_id: Uuid,
    lead: Uuid,
    lock: bool,
) -> Result<(Option<UnsubscribeLead>, bool), sqlx::Error> {
    let row: Option<UnsubscribeLead> = sqlx::query_as(&format!(
        "SELECT company_name, email_consent, territory, owner_user_id, collaborators \
         FROM leads WHERE id = $1 AND status <> 'DELETED'{}",
        if lock { " FOR NO KEY UPDATE" } else { "" }
    ))
    .bind(lead)
    .fetch_optional(&mut **tx)
    .await?;
    let used: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM unsubscribe_redemptions WHERE token_id = $1)",
    )
    .bind(token_id)
    .fetch_one(&mut **tx)
    .await?;
    Ok((row, used))
}

/// Records the use of a link and withdraws the lead's e-mail consent. False when the link was
/// used concurrently (nothing written).
pub async fn redeem(
    tx: &mut Tx,
    token_id: Uuid,
    lead: Uuid,
    at: DateTime<Utc>,
) -> Result<bool, sqlx::Error> {
    let n = sqlx::query(
        "INSERT INTO unsubscribe_redemptions (token_id, lead_id, redeemed_at) VALUES ($1, $2, $3) \
         ON CONFLICT (token_id) DO NOTHING",
    )
    .bind(token_id)
    .bind(lead)
    .bind(at)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if n == 0 {
        return Ok(false);
    }
    sqlx::query(
        "UPDATE leads SET email_consent = false, version = version + 1, updated_at = $2, \
                updated_by = 'system' WHERE id = $1 AND email_consent",
    )
    .bind(lead)
    .bind(at)
    .execute(&mut **tx)
    .await?;
    Ok(true)
}

/// A claimed follow-up whose mail cannot be composed (the address is not deliverable, the
/// contact data does not decrypt): FAILED at once, in the claim's transaction.
pub async fn fail_claimed(
    tx: &mut Tx,
    followup: Uuid,
    error: &str,
    at: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE followups SET status = 'FAILED', failed_at = $2, last_error = $3 WHERE id = $1",
    )
    .bind(followup)
    .bind(at)
    .bind(error)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
