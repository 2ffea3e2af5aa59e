//! Lead HTTP handlers. Each reads as a story: authenticate, open a transaction as the caller
//! (row-level security applies), call the domain, write change + activity + audit + outbox,
//! commit, wake the consumers, answer.

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use super::domain::{ActivityType, LeadStatus};
use super::model::*;
use crate::app::AppState;
use crate::auth::{MaybePrincipal, Principal, Role};
use crate::db::{self, Tx};
use crate::error::{ApiError, ApiResult, AppJson};
use crate::events::envelope::{self, Audience, EventType, NewEvent};
use crate::pii::{self, Masked, PiiField, Vault};
use crate::territory::Territory;

// `System` never comes from a token: it is the principal of background jobs and of commands
// published with `freshplan.security.allow-unauthenticated-publisher` (tests only).
const WRITERS: &[Role] = &[Role::Sales, Role::Manager, Role::Admin, Role::System];

fn uuid_path(raw: &str) -> ApiResult<Uuid> {
    raw.parse().map_err(|_| ApiError::NotFound("lead"))
}

fn etag(version: i64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\"")).expect("digits are a valid header value")
}

/// A value that does not decrypt answers `contact-data-unreadable` (never garbage, never the
/// ciphertext); the reason (tampered or unknown key id) is logged, it names no contact data.
fn pii_error(e: pii::PiiError) -> ApiError {
    let lead = match &e {
        pii::PiiError::UnknownKey { lead, .. } | pii::PiiError::Tampered { lead } => *lead,
    };
    ApiError::ContactDataUnreadable {
        lead,
        reason: e.to_string(),
    }
}

fn no_viewer(p: &Principal, action: &str) -> ApiResult<()> {
    p.require(WRITERS, action)
}

fn text(field: &str, value: Option<String>, max: usize) -> ApiResult<Option<String>> {
    match value.map(|v| v.trim().to_string()) {
        Some(v) if v.is_empty() => Ok(None),
        Some(v) if v.chars().count() > max => Err(ApiError::field(format!(
            "{field} must be at most {max} characters"
        ))),
        other => Ok(other),
    }
}

/// Sealed contact columns and lookup hashes for a lead.
struct SealedContact {
    contact_person: Option<Vec<u8>>,
    email: Option<Vec<u8>>,
    phone: Option<Vec<u8>>,
    email_hash: Option<Vec<u8>>,
    phone_hash: Option<Vec<u8>>,
    key_id: Option<String>,
}

/// Validates, normalises and encrypts contact fields. Clear text stays in this function.
fn seal_contact(
    vault: &Vault,
    lead: Uuid,
    territory: Territory,
    contact_person: Option<String>,
    email: Option<String>,
    phone: Option<String>,
) -> ApiResult<SealedContact> {
    let contact_person = text("contactPerson", contact_person, 200)?;
    let email = text("email", email, 254)?
        .map(|e| pii::normalize_email(&e).map_err(ApiError::field))
        .transpose()?;
    let phone = text("phone", phone, 40)?;
    let phone_norm = phone
        .as_deref()
        .map(|p| pii::normalize_phone(p, territory).map_err(ApiError::field))
        .transpose()?;
    let any = contact_person.is_some() || email.is_some() || phone.is_some();
    Ok(SealedContact {
        contact_person: contact_person.map(|v| vault.seal(lead, PiiField::ContactPerson, &v)),
        email_hash: email
            .as_deref()
            .map(|e| vault.lookup_hash(PiiField::Email, e)),
        email: email.map(|v| vault.seal(lead, PiiField::Email, &v)),
        phone_hash: phone_norm.map(|p| vault.lookup_hash(PiiField::Phone, &p)),
        phone: phone.map(|v| vault.seal(lead, PiiField::Phone, &v)),
        key_id: any.then(|| vault.active_key_id().to_string()),
    })
}

async fn validate_users(tx: &mut Tx, ids: &[String], territory: Territory) -> ApiResult<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let known: Vec<String> =
        sqlx::query_scalar("SELECT id FROM users WHERE id = ANY($1) AND territory = $2")
            .bind(ids)
            .bind(territory.code())
            .fetch_all(&mut **tx)
            .await?;
    if let Some(unknown) = ids.iter().find(|id| !known.contains(id)) {
        return Err(ApiError::field(format!(
            "user `{unknown}` is not a FreshPlan user of territory {territory}"
        )));
    }
    Ok(())
}

async fn audit(
    tx: &mut Tx,
    p: &Principal,
    action: &str,
    lead: Uuid,
    territory: Territory,
    details: serde_json::Value,
) -> ApiResult<()> {
    sqlx::query(
        "INSERT INTO audit_log (actor_user_id, actor_role, action, entity_type, entity_id, territory, details) \
         VALUES ($1, $2, $3, 'lead', $4, $5, $6)",
    )
    .bind(&p.user_id)
    .bind(p.role.as_str())
    .bind(action)
    .bind(lead.to_string())
    .bind(territory.code())
    .bind(details)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn insert_activity(
    tx: &mut Tx,
    p: &Principal,
    lead: Uuid,
    kind: ActivityType,
    description: Option<&str>,
    outcome: Option<&str>,
    occurred_at: chrono::DateTime<Utc>,
) -> ApiResult<Uuid> {
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO lead_activities (id, lead_id, activity_type, meaningful, description, outcome, occurred_at, user_id) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(id)
    .bind(lead)
    .bind(kind.as_str())
    .bind(kind.is_meaningful())
    .bind(description)
    .bind(outcome)
    .bind(occurred_at)
    .bind(&p.user_id)
    .execute(&mut **tx)
    .await?;
    Ok(id)
}

fn audience(row_territory: Territory, owner: &str, collaborators: &[String]) -> Audience {
    Audience {
        territory: row_territory,
        owner: Some(owner.to_string()),
        collaborators: collaborators.to_vec(),
    }
}

async fn find_duplicate(
    state: &AppState,
    caller: &Principal,
    territory: Territory,
    hash: &[u8],
) -> ApiResult<Option<Uuid>> {
    let mut tx = db::begin_as(&state.pool, caller).await?;
    let id = sqlx::query_scalar(
        "SELECT id FROM leads WHERE territory = $1 AND email_hash = $2 AND status <> 'DELETED'",
    )
    .bind(territory.code())
    .bind(hash)
    .fetch_optional(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(id)
}

fn is_unique_violation(e: &sqlx::Error, constraint: &str) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.code().as_deref() == Some("23505") && d.constraint() == Some(constraint))
}

/// Creates a lead; the creator becomes its owner.
#[utoipa::path(post, path = "/api/leads", tag = "leads", request_body = CreateLead,
    responses((status = 201, body = Lead), (status = 401), (status = 403), (status = 409, description = "duplicate-contact"), (status = 422)))]
pub async fn create_lead(
    State(state): State<AppState>,
    caller: MaybePrincipal,
    AppJson(body): AppJson<CreateLead>,
) -> ApiResult<Response> {
    let caller =
        state
            .publisher
            .authorize(caller, EventType::LeadCreated, WRITERS, "create leads")?;
    let territory = match body.territory {
        Some(t) if t != caller.territory && caller.role == Role::Sales => {
            return Err(ApiError::Forbidden(
                "sales users create leads in their own territory only".into(),
            ));
        }
        Some(t) => t,
        None => caller.territory,
    };
    let company_name = text("companyName", Some(body.company_name), 200)?
        .ok_or_else(|| ApiError::field("companyName must not be empty"))?;
    let city = text("city", body.city, 120)?;
    let id = Uuid::now_v7();
    let now = envelope::micros(Utc::now());
    // Normalised first, so the log shows `***@example.com` whatever the spelling.
    let masked_email = body
        .email
        .as_deref()
        .and_then(|e| pii::normalize_email(e).ok())
        .map(Masked);
    let sealed = seal_contact(
        &state.vault,
        id,
        territory,
        body.contact_person,
        body.email,
        body.phone,
    )?;
    let mut collaborators = body.collaborators;
    collaborators.sort();
    collaborators.dedup();
    collaborators.retain(|c| *c != caller.user_id);

    let mut tx = db::begin_as(&state.pool, &caller).await?;
    validate_users(&mut tx, &collaborators, territory).await?;
    let inserted = sqlx::query(
        "INSERT INTO leads (id, company_name, contact_person_ct, email_ct, phone_ct, pii_key_id, email_hash, phone_hash, \
           city, territory, business_type, source, owner_user_id, collaborators, status, email_consent, \
           registered_at, last_activity_at, created_at, updated_at, created_by, updated_by) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, 'REGISTERED', $15, $16, $16, $16, $16, $13, $13)",
    )
    .bind(id)
    .bind(&company_name)
    .bind(&sealed.contact_person)
    .bind(&sealed.email)
    .bind(&sealed.phone)
    .bind(&sealed.key_id)
    .bind(&sealed.email_hash)
    .bind(&sealed.phone_hash)
    .bind(&city)
    .bind(territory.code())
    .bind(body.business_type.as_str())
    .bind(body.source.as_str())
    .bind(&caller.user_id)
    .bind(&collaborators)
    .bind(body.email_consent)
    .bind(now)
    .execute(&mut *tx)
    .await;
    if let Err(e) = inserted {
        if is_unique_violation(&e, "leads_email_unique") {
            drop(tx);
            let hash = sealed.email_hash.as_deref().unwrap_or_default();
            let existing = find_duplicate(&state, &caller, territory, hash).await?;
            return Err(ApiError::DuplicateContact { existing });
        }
        return Err(e.into());
    }
    insert_activity(&mut tx, &caller, id, ActivityType::Created, None, None, now).await?;
    audit(
        &mut tx,
        &caller,
        "LEAD_CREATED",
        id,
        territory,
        json!({"fields": ["companyName", "businessType", "source"]}),
    )
    .await?;
    let event = NewEvent::new(
        EventType::LeadCreated,
        Some(id),
        now,
        envelope::key_created(id, now),
        json!({
            "leadId": id, "companyName": company_name, "status": "REGISTERED",
            "ownerUserId": caller.user_id, "territory": territory, "createdAt": envelope::ts(now),
        }),
        audience(territory, &caller.user_id, &collaborators),
    );
    let events = [event];
    let row = fetch_row(&mut tx, id)
        .await?
        .ok_or(ApiError::NotFound("lead"))?;
    state.publisher.commit(tx, &events).await?;
    tracing::info!(lead_id = %id, territory = %territory, owner = %caller.user_id, contact_email = masked_email.as_ref().map(tracing::field::display), "lead created");

    let lead = row.into_lead(&state.vault).map_err(pii_error)?;
    let mut response = (StatusCode::CREATED, AppJson(lead)).into_response();
    let headers = response.headers_mut();
    headers.insert(header::ETAG, etag(1));
    headers.insert(
        header::LOCATION,
        HeaderValue::from_str(&format!("/api/leads/{id}")).expect("uuid is a valid header value"),
    );
    Ok(response)
}

async fn fetch_row(tx: &mut Tx, id: Uuid) -> Result<Option<LeadRow>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {LEAD_COLUMNS} FROM leads WHERE id = $1"))
        .bind(id)
        .fetch_optional(&mut **tx)
        .await
}

/// Query of `GET /api/leads`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Filter by status.
    pub status: Option<String>,
    /// Filter by owner user id.
    pub owner: Option<String>,
    /// Substring of company name or city (case-insensitive).
    pub q: Option<String>,
    /// Exact contact email (any spelling; matched by keyed hash, never decrypted for search).
    pub email: Option<String>,
    /// Page number, from 0.
    pub page: Option<i64>,
    /// Page size, 1..=500 (default 20).
    pub size: Option<i64>,
}

/// Filters of `GET /api/leads` ($1 status, $2 owner, $3 ILIKE pattern, $4 email hash); deleted
/// leads only when asked for by status. Row-level security narrows it to the caller's view.
const LIST_FILTER: &str = "WHERE ($1::text IS NULL AND status <> 'DELETED' OR status = $1) \
    AND ($2::text IS NULL OR owner_user_id = $2) \
    AND ($3::text IS NULL OR company_name ILIKE $3 OR city ILIKE $3) \
    AND ($4::bytea IS NULL OR email_hash = $4)";

/// Bulk reads above this many decrypted leads are audited.
const BULK_READ_AUDIT: usize = 100;

/// Lists the leads the caller may see.
#[utoipa::path(get, path = "/api/leads", tag = "leads", params(ListQuery),
    responses((status = 200, body = LeadPage), (status = 401), (status = 403)))]
pub async fn list_leads(
    State(state): State<AppState>,
    caller: Principal,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<AppJson<LeadPage>> {
    let Query(q) = query.map_err(|e| ApiError::field(e.body_text()))?;
    no_viewer(&caller, "list lead details (viewers see aggregates only)")?;
    let page = q.page.unwrap_or(0);
    let size = q.size.unwrap_or(20);
    if page < 0 || !(1..=500).contains(&size) {
        return Err(ApiError::field(
            "page must be ≥ 0 and size between 1 and 500",
        ));
    }
    let status = q
        .status
        .as_deref()
        .map(|s| {
            LeadStatus::parse(&s.to_ascii_uppercase())
                .ok_or_else(|| ApiError::field(format!("unknown status `{s}`")))
        })
        .transpose()?;
    let email_hash = q
        .email
        .as_deref()
        .map(|e| {
            pii::normalize_email(e)
                .map(|n| state.vault.lookup_hash(PiiField::Email, &n))
                .map_err(ApiError::field)
        })
        .transpose()?;
    let pattern = q.q.as_deref().map(|s| {
        format!(
            "%{}%",
            s.replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_")
        )
    });

    let mut tx = db::begin_as(&state.pool, &caller).await?;
    let rows: Vec<LeadRow> = sqlx::query_as(&format!(
        "SELECT {LEAD_COLUMNS} FROM leads {LIST_FILTER} ORDER BY updated_at DESC, id LIMIT $5 OFFSET $6"
    ))
    .bind(status.map(|s| s.as_str()))
    .bind(&q.owner)
    .bind(&pattern)
    .bind(&email_hash)
    .bind(size)
    .bind(page * size)
    .fetch_all(&mut *tx)
    .await?;
    let total: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM leads {LIST_FILTER}"))
        .bind(status.map(|s| s.as_str()))
        .bind(&q.owner)
        .bind(&pattern)
        .bind(&email_hash)
        .fetch_one(&mut *tx)
        .await?;
    if rows.len() > BULK_READ_AUDIT {
        sqlx::query(
            "INSERT INTO audit_log (actor_user_id, actor_role, action, entity_type, entity_id, territory, details) \
             VALUES ($1, $2, 'PII_BULK_READ', 'lead', 'list', $3, jsonb_build_object('leads', $4::bigint))",
        )
        .bind(&caller.user_id)
        .bind(caller.role.as_str())
        .bind(caller.territory.code())
        .bind(rows.len() as i64)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    let items = rows
        .into_iter()
        .map(|r| r.into_lead(&state.vault))
        .collect::<Result<Vec<_>, _>>()
        .map_err(pii_error)?;
    Ok(AppJson(LeadPage {
        items,
        page,
        size,
        total,
    }))
}

/// One lead; 404 when it is outside the caller's view.
#[utoipa::path(get, path = "/api/leads/{id}", tag = "leads", params(("id" = Uuid, Path)),
    responses((status = 200, body = Lead), (status = 404)))]
pub async fn get_lead(
    State(state): State<AppState>,
    caller: Principal,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    no_viewer(&caller, "read lead details (viewers see aggregates only)")?;
    let id = uuid_path(&id)?;
    let mut tx = db::begin_as(&state.pool, &caller).await?;
    let row = fetch_row(&mut tx, id)
        .await?
        .ok_or(ApiError::NotFound("lead"))?;
    tx.commit().await?;
    let version = row.version;
    let lead = row.into_lead(&state.vault).map_err(pii_error)?;
    Ok(([(header::ETAG, etag(version))], AppJson(lead)).into_response())
}

fn if_match(headers: &HeaderMap) -> ApiResult<i64> {
    let raw = headers
        .get(header::IF_MATCH)
        .ok_or(ApiError::PreconditionRequired)?;
    let raw = raw
        .to_str()
        .map_err(|_| ApiError::field("If-Match must be the lead's ETag, e.g. \"3\""))?;
    raw.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .parse()
        .map_err(|_| ApiError::field("If-Match must be the lead's ETag, e.g. \"3\""))
}

/// Changes a lead: status (status machine), owner, collaborators, contact and flags.
#[utoipa::path(patch, path = "/api/leads/{id}", tag = "leads", request_body = PatchLead, params(("id" = Uuid, Path),
    ("If-Match" = String, Header, description = "the lead's ETag")),
    responses((status = 200, body = Lead), (status = 404), (status = 409, description = "invalid-transition"), (status = 412), (status = 428)))]
pub async fn patch_lead(
    State(state): State<AppState>,
    caller: MaybePrincipal,
    Path(id): Path<String>,
    headers: HeaderMap,
    AppJson(body): AppJson<PatchLead>,
) -> ApiResult<Response> {
    let caller = state.publisher.authorize(
        caller,
        EventType::LeadStatusChanged,
        WRITERS,
        "change leads",
    )?;
    let id = uuid_path(&id)?;
    let expected = if_match(&headers)?;

    let mut tx = db::begin_as(&state.pool, &caller).await?;
    let sql = format!("SELECT {LEAD_COLUMNS} FROM leads WHERE id = $1 FOR UPDATE");
    let row: LeadRow = sqlx::query_as(&sql)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(ApiError::NotFound("lead"))?;
    let territory = row.territory();
    let is_owner = row.owner_user_id == caller.user_id;
    let may_edit = is_owner
        || caller.is_global()
        || (caller.role == Role::Manager && caller.territory == territory);
    if !may_edit {
        return Err(ApiError::Forbidden(
            "only the owner, a manager of the territory or an admin may change this lead".into(),
        ));
    }
    if row.version != expected {
        return Err(ApiError::StaleVersion {
            current: row.version,
        });
    }
    let now = envelope::micros(Utc::now());
    let mut events = Vec::new();
    let mut changed: Vec<&str> = Vec::new();
    let old_status = row.status();
    let mut status = old_status;
    let clock_stopped = body.clock_stopped.unwrap_or(row.clock_stopped);
    if let Some(to) = body.status.filter(|s| *s != old_status) {
        status = old_status
            .transition(to, caller.role, row.clock_stopped && clock_stopped)
            .map_err(|e| ApiError::InvalidTransition {
                from: e.from.to_string(),
                to: e.to.to_string(),
                reason: e.reason.into(),
            })?;
        changed.push("status");
    }
    if old_status == LeadStatus::Deleted && status == LeadStatus::Deleted {
        return Err(ApiError::InvalidTransition {
            from: "DELETED".into(),
            to: "DELETED".into(),
            reason: "the lead is deleted".into(),
        });
    }
    let mut owner = row.owner_user_id.clone();
    if let Some(new_owner) = body
        .owner_user_id
        .as_ref()
        .filter(|o| **o != row.owner_user_id)
    {
        validate_users(&mut tx, std::slice::from_ref(new_owner), territory).await?;
        owner = new_owner.clone();
        changed.push("ownerUserId");
    }
    let mut collaborators = row.collaborators.clone();
    if let Some(mut c) = body.collaborators.clone() {
        c.sort();
        c.dedup();
        c.retain(|u| *u != owner);
        validate_users(&mut tx, &c, territory).await?;
        if c != collaborators {
            collaborators = c;
            changed.push("collaborators");
        }
    }
    // Contact fields: any change re-seals all three under the active key.
    let contact_changed =
        body.contact_person.is_some() || body.email.is_some() || body.phone.is_some();
    let sealed = if contact_changed {
        let current = |f| row.open(&state.vault, f).map_err(pii_error);
        let contact = match body.contact_person.clone() {
            Some(v) => v,
            None => current(PiiField::ContactPerson)?,
        };
        let email = match body.email.clone() {
            Some(v) => v,
            None => current(PiiField::Email)?,
        };
        let phone = match body.phone.clone() {
            Some(v) => v,
            None => current(PiiField::Phone)?,
        };
        for (name, v) in [
            ("contactPerson", &body.contact_person),
            ("email", &body.email),
            ("phone", &body.phone),
        ] {
            if v.is_some() {
                changed.push(name);
            }
        }
        Some(seal_contact(
            &state.vault,
            id,
            territory,
            contact,
            email,
            phone,
        )?)
    } else {
        None
    };
    let email_consent = body.email_consent.unwrap_or(row.email_consent);
    let contact_blocked = body.contact_blocked.unwrap_or(row.contact_blocked);
    for (name, old, new) in [
        ("emailConsent", row.email_consent, email_consent),
        ("contactBlocked", row.contact_blocked, contact_blocked),
        ("clockStopped", row.clock_stopped, clock_stopped),
    ] {
        if old != new {
            changed.push(name);
        }
    }
    if changed.is_empty() {
        tx.commit().await?;
        let lead = row.into_lead(&state.vault).map_err(pii_error)?;
        return Ok(([(header::ETAG, etag(expected))], AppJson(lead)).into_response());
    }
    let reason = text("reason", body.reason.clone(), 500)?;

    let update = sqlx::query(
        "UPDATE leads SET status = $2, owner_user_id = $3, collaborators = $4, email_consent = $5, \
           contact_blocked = $6, clock_stopped = $7, \
           contact_person_ct = CASE WHEN $8 THEN $9 ELSE contact_person_ct END, \
           email_ct = CASE WHEN $8 THEN $10 ELSE email_ct END, \
           phone_ct = CASE WHEN $8 THEN $11 ELSE phone_ct END, \
           pii_key_id = CASE WHEN $8 THEN $12 ELSE pii_key_id END, \
           email_hash = CASE WHEN $8 THEN $13 ELSE email_hash END, \
           phone_hash = CASE WHEN $8 THEN $14 ELSE phone_hash END, \
           version = version + 1, updated_at = $15, updated_by = $16 \
         WHERE id = $1",
    )
    .bind(id)
    .bind(status.as_str())
    .bind(&owner)
    .bind(&collaborators)
    .bind(email_consent)
    .bind(contact_blocked)
    .bind(clock_stopped)
    .bind(sealed.is_some())
    .bind(sealed.as_ref().and_then(|s| s.contact_person.clone()))
    .bind(sealed.as_ref().and_then(|s| s.email.clone()))
    .bind(sealed.as_ref().and_then(|s| s.phone.clone()))
    .bind(sealed.as_ref().and_then(|s| s.key_id.clone()))
    .bind(sealed.as_ref().and_then(|s| s.email_hash.clone()))
    .bind(sealed.as_ref().and_then(|s| s.phone_hash.clone()))
    .bind(now)
    .bind(&caller.user_id)
    .execute(&mut *tx)
    .await;
    if let Err(e) = update {
        if is_unique_violation(&e, "leads_email_unique") {
            drop(tx);
            let hash = sealed
                .as_ref()
                .and_then(|s| s.email_hash.clone())
                .unwrap_or_default();
            let existing = find_duplicate(&state, &caller, territory, &hash).await?;
            return Err(ApiError::DuplicateContact { existing });
        }
        return Err(e.into());
    }
    // The old owner stays in the audience of the assignment so they learn the lead left them.
    let mut event_collaborators = collaborators.clone();
    if owner != row.owner_user_id {
        event_collaborators.push(row.owner_user_id.clone());
        insert_activity(
            &mut tx,
            &caller,
            id,
            ActivityType::LeadAssigned,
            Some(&format!("{} → {}", row.owner_user_id, owner)),
            None,
            now,
        )
        .await?;
        events.push(NewEvent::new(
            EventType::LeadAssigned,
            Some(id),
            now,
            envelope::key_assigned(id, &row.owner_user_id, &owner, now),
            json!({
                "leadId": id, "oldOwnerUserId": row.owner_user_id, "newOwnerUserId": owner,
                "territory": territory, "userId": caller.user_id, "changedAt": envelope::ts(now),
            }),
            audience(territory, &owner, &event_collaborators),
        ));
    }
    if status != old_status {
        insert_activity(
            &mut tx,
            &caller,
            id,
            ActivityType::StatusChange,
            Some(&format!("{old_status} → {status}")),
            reason.as_deref(),
            now,
        )
        .await?;
        events.push(NewEvent::new(
            EventType::LeadStatusChanged,
            Some(id),
            now,
            envelope::key_status_change(id, old_status.as_str(), status.as_str(), now),
            json!({
                "leadId": id, "companyName": row.company_name, "oldStatus": old_status, "newStatus": status,
                "userId": caller.user_id, "ownerUserId": owner, "territory": territory, "changedAt": envelope::ts(now),
            }),
            audience(territory, &owner, &event_collaborators),
        ));
    }
    let mut details = json!({"fields": changed, "version": expected + 1});
    if status != old_status {
        details["status"] = json!({"from": old_status, "to": status});
    }
    if owner != row.owner_user_id {
        details["owner"] = json!({"from": row.owner_user_id, "to": owner});
    }
    let action = if status == LeadStatus::Deleted {
        "LEAD_DELETED"
    } else {
        "LEAD_UPDATED"
    };
    audit(&mut tx, &caller, action, id, territory, details).await?;
    let updated = fetch_row(&mut tx, id).await?;
    state.publisher.commit(tx, &events).await?;
    tracing::info!(lead_id = %id, fields = ?changed, "lead updated");
    // A sales owner who reassigned the lead away may no longer see it.
    match updated {
        Some(r) => {
            let version = r.version;
            let lead = r.into_lead(&state.vault).map_err(pii_error)?;
            Ok(([(header::ETAG, etag(version))], AppJson(lead)).into_response())
        }
        None => Ok(StatusCode::NO_CONTENT.into_response()),
    }
}

/// Logs an activity on a lead the caller can see.
#[utoipa::path(post, path = "/api/leads/{id}/activities", tag = "leads", request_body = NewActivity, params(("id" = Uuid, Path)),
    responses((status = 201, body = Activity), (status = 404), (status = 422)))]
pub async fn add_activity(
    State(state): State<AppState>,
    caller: MaybePrincipal,
    Path(id): Path<String>,
    AppJson(body): AppJson<NewActivity>,
) -> ApiResult<Response> {
    let caller =
        state
            .publisher
            .authorize(caller, EventType::ActivityLogged, WRITERS, "log activities")?;
    let id = uuid_path(&id)?;
    if !body.activity_type.is_manual() {
        return Err(ApiError::field(format!(
            "activity type {} is written by the system",
            body.activity_type
        )));
    }
    let description = text("description", body.description, 4000)?;
    let outcome = text("outcome", body.outcome, 64)?;
    let now = envelope::micros(Utc::now());
    let occurred_at = envelope::micros(body.occurred_at.unwrap_or(now));
    if occurred_at > now + chrono::Duration::minutes(5) {
        return Err(ApiError::field("occurredAt must not be in the future"));
    }

    let mut tx = db::begin_as(&state.pool, &caller).await?;
    let lead: Option<(String, String, Vec<String>, String)> = sqlx::query_as(
        "UPDATE leads SET last_activity_at = GREATEST(last_activity_at, $2) WHERE id = $1 \
         RETURNING territory, owner_user_id, collaborators, status",
    )
    .bind(id)
    .bind(occurred_at)
    .fetch_optional(&mut *tx)
    .await?;
    let (territory, owner, collaborators, status) = lead.ok_or(ApiError::NotFound("lead"))?;
    if status == "DELETED" {
        return Err(ApiError::NotFound("lead"));
    }
    let territory: Territory = territory
        .parse()
        .map_err(|e: String| ApiError::Internal(anyhow::anyhow!(e)))?;
    let activity_id = insert_activity(
        &mut tx,
        &caller,
        id,
        body.activity_type,
        description.as_deref(),
        outcome.as_deref(),
        occurred_at,
    )
    .await?;
    audit(
        &mut tx,
        &caller,
        "ACTIVITY_LOGGED",
        id,
        territory,
        json!({"activityType": body.activity_type}),
    )
    .await?;
    let events = [NewEvent::new(
        EventType::ActivityLogged,
        Some(id),
        now,
        envelope::key_activity(activity_id),
        json!({
            "leadId": id, "activityType": body.activity_type, "ownerUserId": owner, "territory": territory,
            "userId": caller.user_id, "occurredAt": envelope::ts(occurred_at),
        }),
        audience(territory, &owner, &collaborators),
    )];
    state.publisher.commit(tx, &events).await?;

    let activity = Activity {
        id: activity_id,
        lead_id: id,
        activity_type: body.activity_type.as_str().to_string(),
        meaningful: body.activity_type.is_meaningful(),
        description,
        outcome,
        occurred_at,
        user_id: caller.user_id,
    };
    Ok((StatusCode::CREATED, AppJson(activity)).into_response())
}

/// The activities of a lead the caller can see, newest first.
#[utoipa::path(get, path = "/api/leads/{id}/activities", tag = "leads", params(("id" = Uuid, Path)),
    responses((status = 200, body = [Activity]), (status = 404)))]
pub async fn list_activities(
    State(state): State<AppState>,
    caller: Principal,
    Path(id): Path<String>,
) -> ApiResult<AppJson<Vec<Activity>>> {
    no_viewer(&caller, "read lead activities")?;
    let id = uuid_path(&id)?;
    let mut tx = db::begin_as(&state.pool, &caller).await?;
    let visible: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM leads WHERE id = $1)")
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
    if !visible {
        return Err(ApiError::NotFound("lead"));
    }
    let rows: Vec<Activity> = sqlx::query_as(
        "SELECT id, lead_id, activity_type, meaningful, description, outcome, occurred_at, user_id \
         FROM lead_activities WHERE lead_id = $1 ORDER BY occurred_at DESC, id DESC LIMIT 500",
    )
    .bind(id)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(AppJson(rows))
}
