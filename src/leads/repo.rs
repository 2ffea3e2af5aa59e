//! Every SQL statement of the leads context, with typed rows. Each function runs in the caller's
//! transaction (row-level security applies as whoever the transaction was opened for); enum
//! columns decode into their types and a value outside them is an error, never a default.

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use super::domain::{ActivityType, BusinessType, LeadSource, LeadStatus};
use super::model::{Activity, Lead};
use crate::db::Tx;
use crate::events::outbox::{self, AuditRow};
use crate::identity::Principal;
use crate::pii::{PiiError, PiiField, Vault};
use crate::territory::Territory;

/// A lead as stored: contact data still sealed.
#[derive(Debug, sqlx::FromRow)]
pub struct LeadRow {
    pub id: Uuid,
    pub company_name: String,
    pub contact_person_ct: Option<Vec<u8>>,
    pub email_ct: Option<Vec<u8>>,
    pub phone_ct: Option<Vec<u8>>,
    pub pii_key_id: Option<String>,
    pub city: Option<String>,
    pub territory: Territory,
    pub business_type: BusinessType,
    pub source: LeadSource,
    pub owner_user_id: String,
    pub collaborators: Vec<String>,
    pub status: LeadStatus,
    pub email_consent: bool,
    pub contact_blocked: bool,
    pub clock_stopped: bool,
    pub registered_at: DateTime<Utc>,
    pub last_activity_at: Option<DateTime<Utc>>,
    pub t3_sent_at: Option<DateTime<Utc>>,
    pub t7_sent_at: Option<DateTime<Utc>>,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The select list matching [`LeadRow`].
pub const LEAD_COLUMNS: &str =
    "id, company_name, contact_person_ct, email_ct, phone_ct, pii_key_id, \
    city, territory, business_type, source, owner_user_id, collaborators, status, email_consent, \
    contact_blocked, clock_stopped, registered_at, last_activity_at, t3_sent_at, t7_sent_at, \
    version, created_at, updated_at";

impl LeadRow {
    /// Decrypts one contact field.
    pub fn open(&self, vault: &Vault, field: PiiField) -> Result<Option<String>, PiiError> {
        let blob = match field {
            PiiField::ContactPerson => &self.contact_person_ct,
            PiiField::Email => &self.email_ct,
            PiiField::Phone => &self.phone_ct,
            PiiField::Mail => return Ok(None),
        };
        match (blob, &self.pii_key_id) {
            (Some(b), Some(k)) => vault.open(self.id, field, k, b).map(Some),
            (Some(_), None) => Err(PiiError::UnknownKey {
                lead: self.id,
                key_id: String::new(),
            }),
            _ => Ok(None),
        }
    }

    /// The API representation with decrypted contact data.
    pub fn into_lead(self, vault: &Vault) -> Result<Lead, PiiError> {
        let contact_person = self.open(vault, PiiField::ContactPerson)?;
        let email = self.open(vault, PiiField::Email)?;
        let phone = self.open(vault, PiiField::Phone)?;
        Ok(Lead {
            id: self.id,
            company_name: self.company_name,
            contact_person,
            email,
            phone,
            city: self.city,
            territory: self.territory,
            business_type: self.business_type,
            source: self.source,
            status: self.status,
            owner_user_id: self.owner_user_id,
            collaborators: self.collaborators,
            email_consent: self.email_consent,
            contact_blocked: self.contact_blocked,
            clock_stopped: self.clock_stopped,
            registered_at: self.registered_at,
            last_activity_at: self.last_activity_at,
            t3_sent_at: self.t3_sent_at,
            t7_sent_at: self.t7_sent_at,
            version: self.version,
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }
}

/// Sealed contact columns and lookup hashes of a lead.
#[derive(Debug, Default, Clone)]
pub struct SealedContact {
    pub contact_person: Option<Vec<u8>>,
    pub email: Option<Vec<u8>>,
    pub phone: Option<Vec<u8>>,
    pub email_hash: Option<Vec<u8>>,
    pub phone_hash: Option<Vec<u8>>,
    pub key_id: Option<String>,
}

/// A lead to insert (status REGISTERED, version 1).
pub struct NewLeadRow<'a> {
    pub id: Uuid,
    pub company_name: &'a str,
    pub contact: &'a SealedContact,
    pub city: Option<&'a str>,
    pub territory: Territory,
    pub business_type: BusinessType,
    pub source: LeadSource,
    pub owner: &'a str,
    pub collaborators: &'a [String],
    pub email_consent: bool,
    pub now: DateTime<Utc>,
}

/// Inserts a lead and returns it; `None` when a live lead of the territory already has the same
/// contact email (the unique index decides, so concurrent creates cannot both win).
pub async fn insert_lead(tx: &mut Tx, l: &NewLeadRow<'_>) -> Result<Option<LeadRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "INSERT INTO leads (id, company_name, contact_person_ct, email_ct, phone_ct, pii_key_id, email_hash, phone_hash, \
           city, territory, business_type, source, owner_user_id, collaborators, status, email_consent, \
           registered_at, last_activity_at, created_at, updated_at, created_by, updated_by) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, 'REGISTERED', $15, $16, $16, $16, $16, $13, $13) \
         ON CONFLICT (territory, email_hash) WHERE email_hash IS NOT NULL AND status <> 'DELETED' DO NOTHING \
         RETURNING {LEAD_COLUMNS}"
    ))
    .bind(l.id)
    .bind(l.company_name)
    .bind(&l.contact.contact_person)
    .bind(&l.contact.email)
    .bind(&l.contact.phone)
    .bind(&l.contact.key_id)
    .bind(&l.contact.email_hash)
    .bind(&l.contact.phone_hash)
    .bind(l.city)
    .bind(l.territory)
    .bind(l.business_type)
    .bind(l.source)
    .bind(l.owner)
    .bind(l.collaborators)
    .bind(l.email_consent)
    .bind(l.now)
    .fetch_optional(&mut **tx)
    .await
}

/// The live lead of `territory` with this email hash, other than `except`, if the caller sees it.
pub async fn find_live_by_email_hash(
    tx: &mut Tx,
    territory: Territory,
    hash: &[u8],
    except: Option<Uuid>,
) -> Result<Option<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT id FROM leads WHERE territory = $1 AND email_hash = $2 AND status <> 'DELETED' \
         AND ($3::uuid IS NULL OR id <> $3)",
    )
    .bind(territory)
    .bind(hash)
    .bind(except)
    .fetch_optional(&mut **tx)
    .await
}

/// The lead, if the caller sees it.
pub async fn fetch(tx: &mut Tx, id: Uuid) -> Result<Option<LeadRow>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {LEAD_COLUMNS} FROM leads WHERE id = $1"))
        .bind(id)
        .fetch_optional(&mut **tx)
        .await
}

/// The lead, locked for a change, if the caller sees it.
pub async fn fetch_for_update(tx: &mut Tx, id: Uuid) -> Result<Option<LeadRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {LEAD_COLUMNS} FROM leads WHERE id = $1 FOR UPDATE"
    ))
    .bind(id)
    .fetch_optional(&mut **tx)
    .await
}

/// New values of a changed lead; `contact` replaces all three sealed fields when present.
pub struct LeadUpdate<'a> {
    pub status: LeadStatus,
    pub owner: &'a str,
    pub collaborators: &'a [String],
    pub email_consent: bool,
    pub contact_blocked: bool,
    pub clock_stopped: bool,
    pub contact: Option<&'a SealedContact>,
    pub now: DateTime<Utc>,
    pub by: &'a str,
}

/// Writes a change, bumps the version and returns the row as written (`None` only when no row
/// with that id is visible; a written row the caller may not see is refused by row-level
/// security). Triggers on `leads` and on the rows written after it in the same change never
/// modify the lead row, so this is the row a read at the end of the transaction would return.
pub async fn update_lead(
    tx: &mut Tx,
    id: Uuid,
    u: &LeadUpdate<'_>,
) -> Result<Option<LeadRow>, sqlx::Error> {
    let c = u.contact.cloned().unwrap_or_default();
    sqlx::query_as(&format!(
        "UPDATE leads SET status = $2, owner_user_id = $3, collaborators = $4, email_consent = $5, \
           contact_blocked = $6, clock_stopped = $7, \
           contact_person_ct = CASE WHEN $8 THEN $9 ELSE contact_person_ct END, \
           email_ct = CASE WHEN $8 THEN $10 ELSE email_ct END, \
           phone_ct = CASE WHEN $8 THEN $11 ELSE phone_ct END, \
           pii_key_id = CASE WHEN $8 THEN $12 ELSE pii_key_id END, \
           email_hash = CASE WHEN $8 THEN $13 ELSE email_hash END, \
           phone_hash = CASE WHEN $8 THEN $14 ELSE phone_hash END, \
           version = version + 1, updated_at = $15, updated_by = $16 \
         WHERE id = $1 RETURNING {LEAD_COLUMNS}"
    ))
    .bind(id)
    .bind(u.status)
    .bind(u.owner)
    .bind(u.collaborators)
    .bind(u.email_consent)
    .bind(u.contact_blocked)
    .bind(u.clock_stopped)
    .bind(u.contact.is_some())
    .bind(c.contact_person)
    .bind(c.email)
    .bind(c.phone)
    .bind(c.key_id)
    .bind(c.email_hash)
    .bind(c.phone_hash)
    .bind(u.now)
    .bind(u.by)
    .fetch_optional(&mut **tx)
    .await
}

/// The ids among `ids` that are users of `territory`.
pub async fn users_of_territory(
    tx: &mut Tx,
    ids: &[String],
    territory: Territory,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT id FROM users WHERE id = ANY($1) AND territory = $2")
        .bind(ids)
        .bind(territory)
        .fetch_all(&mut **tx)
        .await
}

/// True when `id` may own a lead of `territory`: an active sales user or manager there (the
/// database's `lead_owner_eligible` of migration 0003, plus `active`).
pub async fn eligible_owner(
    tx: &mut Tx,
    id: &str,
    territory: Territory,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM users WHERE id = $1 AND territory = $2 \
         AND role IN ('sales', 'manager') AND active)",
    )
    .bind(id)
    .bind(territory)
    .fetch_one(&mut **tx)
    .await
}

/// An activity to insert.
pub struct NewActivityRow<'a> {
    pub lead: Uuid,
    pub kind: ActivityType,
    pub description: Option<&'a str>,
    pub outcome: Option<&'a str>,
    pub occurred_at: DateTime<Utc>,
    pub user: &'a str,
    /// The new status of a STATUS_CHANGE (the widget's conversions count it).
    pub new_status: Option<LeadStatus>,
}

/// Inserts an activity; returns its id. Triggers of migration 0002 copy the lead's audience
/// onto it and keep the cockpit roll-ups exact.
pub async fn insert_activity(tx: &mut Tx, a: &NewActivityRow<'_>) -> Result<Uuid, sqlx::Error> {
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO lead_activities (id, lead_id, activity_type, meaningful, description, outcome, occurred_at, user_id, new_status) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(id)
    .bind(a.lead)
    .bind(a.kind)
    .bind(a.kind.is_meaningful())
    .bind(a.description)
    .bind(a.outcome)
    .bind(a.occurred_at)
    .bind(a.user)
    .bind(a.new_status)
    .execute(&mut **tx)
    .await?;
    Ok(id)
}

/// The audience of a lead (for events) and its status.
#[derive(Debug, sqlx::FromRow)]
pub struct LeadAudience {
    pub territory: Territory,
    pub owner_user_id: String,
    pub collaborators: Vec<String>,
    pub status: LeadStatus,
}

/// Moves `last_activity_at` forward to `occurred_at` (never back) and returns the lead's audience;
/// `None` when the caller cannot change the lead.
pub async fn touch_activity(
    tx: &mut Tx,
    id: Uuid,
    occurred_at: DateTime<Utc>,
) -> Result<Option<LeadAudience>, sqlx::Error> {
    sqlx::query_as(
        "UPDATE leads SET last_activity_at = GREATEST(last_activity_at, $2) WHERE id = $1 \
         RETURNING territory, owner_user_id, collaborators, status",
    )
    .bind(id)
    .bind(occurred_at)
    .fetch_optional(&mut **tx)
    .await
}

/// The audit row of a change of a lead (field names and non-PII values only in `details`).
pub fn audit_row(
    p: &Principal,
    action: &'static str,
    entity_id: &str,
    territory: Option<Territory>,
    details: Value,
) -> AuditRow {
    AuditRow::new(p, action, "lead", entity_id.to_string(), territory, details)
}

/// Writes an audit row about a lead.
pub async fn audit(
    tx: &mut Tx,
    p: &Principal,
    action: &'static str,
    entity_id: &str,
    territory: Option<Territory>,
    details: Value,
) -> Result<(), sqlx::Error> {
    outbox::audit(tx, &audit_row(p, action, entity_id, territory, details)).await
}

/// Filters of the lead list. Deleted leads only when asked for by status.
pub struct ListFilter<'a> {
    pub status: Option<LeadStatus>,
    pub owner: Option<&'a str>,
    /// An ILIKE pattern matched against company name and city.
    pub pattern: Option<&'a str>,
    pub email_hash: Option<&'a [u8]>,
}

/// One page of the leads the caller sees, most recently changed first, and the total.
///
/// `lead_list_page()` (migration 0006) picks the page's ids with index-friendly predicates
/// per role (row-level security would keep the planner from using an index for the search
/// and the collaborator test); the rows are then read by id under the caller's row-level
/// security, so that function can never widen what the caller sees.
pub async fn list(
    tx: &mut Tx,
    f: &ListFilter<'_>,
    limit: i64,
    offset: i64,
) -> Result<(Vec<LeadRow>, i64), sqlx::Error> {
    let page: Vec<(Option<Uuid>, i64)> =
        sqlx::query_as("SELECT id, total FROM lead_list_page($1, $2, $3, $4, $5, $6)")
            .bind(f.status)
            .bind(f.owner)
            .bind(f.pattern)
            .bind(f.email_hash)
            .bind(i32::try_from(limit).unwrap_or(i32::MAX))
            .bind(offset)
            .fetch_all(&mut **tx)
            .await?;
    let total = page.first().map_or(0, |r| r.1);
    let ids: Vec<Uuid> = page.iter().filter_map(|r| r.0).collect();
    if ids.is_empty() {
        return Ok((Vec::new(), total));
    }
    let mut rows: Vec<LeadRow> = sqlx::query_as(&format!(
        "SELECT {LEAD_COLUMNS} FROM leads WHERE id = ANY($1)"
    ))
    .bind(&ids)
    .fetch_all(&mut **tx)
    .await?;
    let order: std::collections::HashMap<Uuid, usize> =
        ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    rows.sort_by_key(|r| order.get(&r.id).copied().unwrap_or(usize::MAX));
    Ok((rows, total))
}

/// True when the caller sees the lead.
pub async fn visible(tx: &mut Tx, id: Uuid) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM leads WHERE id = $1)")
        .bind(id)
        .fetch_one(&mut **tx)
        .await
}

/// The newest 500 activities of a lead.
pub async fn activities(tx: &mut Tx, lead: Uuid) -> Result<Vec<Activity>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, lead_id, activity_type, meaningful, description, outcome, occurred_at, user_id \
         FROM lead_activities WHERE lead_id = $1 ORDER BY occurred_at DESC, id DESC LIMIT 500",
    )
    .bind(lead)
    .fetch_all(&mut **tx)
    .await
}
