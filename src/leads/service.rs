//! The leads use cases, callable without HTTP: by the handlers, the demo, background jobs and
//! tests.
//!
//! Two levels. The `*_in` functions run inside a transaction the caller opened as a principal
//! (row-level security applies) and return the result and the events to publish; a job that must
//! write more in the same transaction (a follow-up mail, say) composes them. [`LeadService`]
//! wraps each in one unit of work — open the transaction as the caller, run the use case, append
//! the events to the outbox, commit — retried once on a serialization failure or deadlock.

use std::future::Future;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use super::domain::{ActivityType, LeadStatus};
use super::model::{rules, Activity, CreateLead, Lead, LeadPage, NewActivity, PatchLead};
use super::repo::{self, LeadRow, SealedContact};
use crate::db::{self, Tx};
use crate::error::{ApiError, ApiResult};
use crate::events::envelope::{self, Audience, EventType, NewEvent};
use crate::events::outbox::AuditRow;
use crate::events::Publisher;
use crate::identity::{Principal, Role};
use crate::pii::{self, Masked, PiiField, Vault};
use crate::territory::Territory;

/// Roles that may change leads. `System` never comes from a token: it is the principal of
/// background jobs.
pub const WRITERS: &[Role] = &[Role::Sales, Role::Manager, Role::Admin, Role::System];

/// Bulk reads above this many decrypted leads are audited.
const BULK_READ_AUDIT: usize = 100;

/// A committed write: its value and the outbox position of its last event (0 without events).
#[derive(Debug)]
pub struct Written<T> {
    pub value: T,
    pub position: i64,
}

/// What a use case hands back to be committed: its value, its events and its audit row (both
/// written by the publisher in the use case's transaction, just before the commit).
pub struct Outcome<T> {
    pub value: T,
    pub events: Vec<NewEvent>,
    pub audit: Option<AuditRow>,
}

/// A value that does not decrypt answers `contact-data-unreadable` (never garbage, never the
/// ciphertext); the reason (tampered or unknown key id) is logged, it names no contact data.
pub fn pii_error(e: pii::PiiError) -> ApiError {
    let lead = match &e {
        pii::PiiError::UnknownKey { lead, .. } | pii::PiiError::Tampered { lead } => *lead,
    };
    ApiError::ContactDataUnreadable {
        lead,
        reason: e.to_string(),
    }
}

/// Checks a text value against `model::rules` (no control characters — free text may hold tab and
/// line breaks —, at most `max` characters as sent) and trims it; blank is absent.
fn checked(
    field: &str,
    value: Option<String>,
    max: usize,
    free_text: bool,
) -> ApiResult<Option<String>> {
    let Some(v) = value else {
        return Ok(None);
    };
    let allowed = |c: char| free_text && matches!(c, '\t' | '\n' | '\r');
    if let Some(c) = v.chars().find(|c| c.is_control() && !allowed(*c)) {
        return Err(ApiError::field(format!(
            "{field} must not contain control characters (found U+{:04X})",
            c as u32
        )));
    }
    if v.chars().count() > max {
        return Err(ApiError::field(format!(
            "{field} must be at most {max} characters"
        )));
    }
    let trimmed = v.trim();
    Ok((!trimmed.is_empty()).then(|| trimmed.to_string()))
}

/// One line of stored text (see [`checked`]).
fn text(field: &str, value: Option<String>, max: usize) -> ApiResult<Option<String>> {
    checked(field, value, max, false)
}

/// A user id as the API accepts it: 1 to 128 characters, no control characters. Whether the user
/// exists is the database's to say.
fn user_id(field: &str, id: &str) -> ApiResult<()> {
    let n = id.chars().count();
    if id.chars().any(char::is_control) || n == 0 || n > rules::USER_ID_MAX {
        return Err(ApiError::field(format!(
            "{field} must be a user id: 1 to {} characters without control characters",
            rules::USER_ID_MAX
        )));
    }
    Ok(())
}

fn collaborator_ids(ids: &[String]) -> ApiResult<()> {
    if ids.len() > rules::COLLABORATORS_MAX {
        return Err(ApiError::field(format!(
            "collaborators must list at most {} users",
            rules::COLLABORATORS_MAX
        )));
    }
    ids.iter().try_for_each(|id| user_id("collaborators", id))
}

/// Checks the contact fields of a request without sealing them (`None`: not sent or cleared).
fn check_contact(
    contact_person: Option<&str>,
    email: Option<&str>,
    phone: Option<&str>,
) -> ApiResult<()> {
    text(
        "contactPerson",
        contact_person.map(str::to_string),
        rules::CONTACT_PERSON_MAX,
    )?;
    if let Some(e) = text("email", email.map(str::to_string), rules::EMAIL_MAX)? {
        pii::normalize_email(&e).map_err(ApiError::field)?;
    }
    if let Some(p) = text("phone", phone.map(str::to_string), rules::PHONE_MAX)? {
        // Validity does not depend on the territory: every calling code has two digits.
        pii::normalize_phone(&p, Territory::DE).map_err(ApiError::field)?;
    }
    Ok(())
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
    let contact_person = text("contactPerson", contact_person, rules::CONTACT_PERSON_MAX)?;
    let email = text("email", email, rules::EMAIL_MAX)?
        .map(|e| pii::normalize_email(&e).map_err(ApiError::field))
        .transpose()?;
    let phone = text("phone", phone, rules::PHONE_MAX)?;
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
    let known = repo::users_of_territory(tx, ids, territory).await?;
    if let Some(unknown) = ids.iter().find(|id| !known.contains(id)) {
        return Err(ApiError::field(format!(
            "user `{unknown}` is not a FreshPlan user of territory {territory}"
        )));
    }
    Ok(())
}

/// A lead's new owner is an active sales user or manager of the lead's territory. Checked here,
/// before the update, so the answer names the field and the user; the database refuses the same
/// assignment (migration 0003) as a net behind it, but does not know `active`.
async fn validate_owner(tx: &mut Tx, owner: &str, territory: Territory) -> ApiResult<()> {
    if repo::eligible_owner(tx, owner, territory).await? {
        return Ok(());
    }
    Err(ApiError::field(format!(
        "ownerUserId must be an active sales user or manager of territory {territory}: `{owner}` is not"
    )))
}

fn audience(territory: Territory, owner: &str, collaborators: &[String]) -> Audience {
    Audience {
        territory,
        owner: Some(owner.to_string()),
        collaborators: collaborators.to_vec(),
    }
}

fn no_viewer(p: &Principal, action: &str) -> ApiResult<()> {
    p.require(WRITERS, action)
}

/// Creates a lead as `caller`, who becomes its owner.
pub async fn create_in(
    tx: &mut Tx,
    vault: &Vault,
    caller: &Principal,
    body: CreateLead,
    now: DateTime<Utc>,
) -> ApiResult<Outcome<LeadRow>> {
    let territory = match body.territory {
        Some(t) if t != caller.territory && !caller.is_global() => {
            return Err(ApiError::Forbidden(format!(
                "{} users create leads in their own territory only",
                caller.role
            )));
        }
        Some(t) => t,
        None => caller.territory,
    };
    let company_name = text(
        "companyName",
        Some(body.company_name),
        rules::COMPANY_NAME_MAX,
    )?
    .ok_or_else(|| ApiError::field("companyName must not be empty"))?;
    let city = text("city", body.city, rules::CITY_MAX)?;
    collaborator_ids(&body.collaborators)?;
    let id = Uuid::now_v7();
    let now = envelope::micros(now);
    let sealed = seal_contact(
        vault,
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

    validate_users(tx, &collaborators, territory).await?;
    let new = repo::NewLeadRow {
        id,
        company_name: &company_name,
        contact: &sealed,
        city: city.as_deref(),
        territory,
        business_type: body.business_type,
        source: body.source,
        owner: &caller.user_id,
        collaborators: &collaborators,
        email_consent: body.email_consent,
        now,
    };
    let Some(row) = repo::insert_lead(tx, &new).await? else {
        let hash = sealed.email_hash.as_deref().unwrap_or_default();
        let existing = repo::find_live_by_email_hash(tx, territory, hash, None).await?;
        return Err(ApiError::DuplicateContact { existing });
    };
    repo::insert_activity(
        tx,
        &repo::NewActivityRow {
            lead: id,
            kind: ActivityType::Created,
            description: None,
            outcome: None,
            occurred_at: now,
            user: &caller.user_id,
            new_status: None,
        },
    )
    .await?;
    let audit = repo::audit_row(
        caller,
        "LEAD_CREATED",
        &id.to_string(),
        Some(territory),
        json!({"fields": ["companyName", "businessType", "source"]}),
    );
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
    Ok(Outcome {
        value: row,
        events: vec![event],
        audit: Some(audit),
    })
}

/// A patched lead: the row after the change (`None` only if no row with that id was visible; a
/// change whose written row the caller could not see is refused by row-level security, which is
/// why a sales owner who hands a lead over stays one of its collaborators).
pub type Patched = Option<LeadRow>;

/// Changes a lead whose version is `expected`: status (status machine), owner, collaborators,
/// contact and flags. Returns the row unchanged (and no events) when nothing changed.
pub async fn patch_in(
    tx: &mut Tx,
    vault: &Vault,
    caller: &Principal,
    id: Uuid,
    expected: i64,
    body: PatchLead,
    now: DateTime<Utc>,
) -> ApiResult<Outcome<Patched>> {
    // The request as such first: a malformed value is refused whatever the lead's state.
    let reason = checked("reason", body.reason.clone(), rules::REASON_MAX, true)?;
    if let Some(owner) = &body.owner_user_id {
        user_id("ownerUserId", owner)?;
    }
    if let Some(c) = &body.collaborators {
        collaborator_ids(c)?;
    }
    check_contact(
        body.contact_person.as_ref().and_then(|v| v.as_deref()),
        body.email.as_ref().and_then(|v| v.as_deref()),
        body.phone.as_ref().and_then(|v| v.as_deref()),
    )?;
    let row = repo::fetch_for_update(tx, id)
        .await?
        .ok_or(ApiError::NotFound("lead"))?;
    let territory = row.territory;
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
    let now = envelope::micros(now);
    let mut changed: Vec<&str> = Vec::new();
    let old_status = row.status;
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
        validate_owner(tx, new_owner, territory).await?;
        owner = new_owner.clone();
        changed.push("ownerUserId");
    }
    let mut collaborators = row.collaborators.clone();
    let mut new_collaborators = body.collaborators.clone();
    if owner != row.owner_user_id {
        let mut c = new_collaborators.unwrap_or_else(|| row.collaborators.clone());
        // PostgreSQL checks the row an UPDATE writes against the SELECT policy, and a
        // salesperson sees only leads they own or collaborate on: a sales owner who hands a
        // lead over stays one of its collaborators (the database refuses the change otherwise).
        if caller.role == Role::Sales {
            c.push(row.owner_user_id.clone());
        }
        new_collaborators = Some(c);
    }
    if let Some(mut c) = new_collaborators {
        c.sort();
        c.dedup();
        c.retain(|u| *u != owner);
        collaborator_ids(&c)?;
        validate_users(tx, &c, territory).await?;
        if c != collaborators {
            collaborators = c;
            changed.push("collaborators");
        }
    }
    // Contact fields: any change re-seals all three under the active key.
    let contact_changed =
        body.contact_person.is_some() || body.email.is_some() || body.phone.is_some();
    let sealed = if contact_changed {
        let current = |f| row.open(vault, f).map_err(pii_error);
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
        let sealed = seal_contact(vault, id, territory, contact, email, phone)?;
        if let Some(hash) = sealed.email_hash.as_deref() {
            if let Some(existing) =
                repo::find_live_by_email_hash(tx, territory, hash, Some(id)).await?
            {
                return Err(ApiError::DuplicateContact {
                    existing: Some(existing),
                });
            }
        }
        Some(sealed)
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
        return Ok(Outcome {
            value: Some(row),
            events: Vec::new(),
            audit: None,
        });
    }

    // A live lead elsewhere with the same email that the caller cannot see still makes the
    // unique index refuse the update: that maps to duplicate-contact without an id.
    let updated = repo::update_lead(
        tx,
        id,
        &repo::LeadUpdate {
            status,
            owner: &owner,
            collaborators: &collaborators,
            email_consent,
            contact_blocked,
            clock_stopped,
            contact: sealed.as_ref(),
            now,
            by: &caller.user_id,
        },
    )
    .await?;
    let mut events = Vec::new();
    // The old owner stays in the audience of the assignment so they learn the lead left them
    // (that event only).
    let mut event_collaborators = collaborators.clone();
    if owner != row.owner_user_id {
        if !event_collaborators.contains(&row.owner_user_id) {
            event_collaborators.push(row.owner_user_id.clone());
        }
        let description = format!("{} → {}", row.owner_user_id, owner);
        repo::insert_activity(
            tx,
            &repo::NewActivityRow {
                lead: id,
                kind: ActivityType::LeadAssigned,
                description: Some(&description),
                outcome: None,
                occurred_at: now,
                user: &caller.user_id,
                new_status: None,
            },
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
        let description = format!("{old_status} → {status}");
        repo::insert_activity(
            tx,
            &repo::NewActivityRow {
                lead: id,
                kind: ActivityType::StatusChange,
                description: Some(&description),
                outcome: reason.as_deref(),
                occurred_at: now,
                user: &caller.user_id,
                new_status: Some(status),
            },
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
            // The lead's audience after the change: a former owner learns of the hand-over
            // (above), not of what happens to a lead they no longer see.
            audience(territory, &owner, &collaborators),
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
    let audit = repo::audit_row(caller, action, &id.to_string(), Some(territory), details);
    tracing::info!(lead_id = %id, fields = ?changed, "lead updated");
    Ok(Outcome {
        value: updated,
        events,
        audit: Some(audit),
    })
}

/// Logs an activity on a lead the caller may change.
pub async fn add_activity_in(
    tx: &mut Tx,
    caller: &Principal,
    id: Uuid,
    body: NewActivity,
    now: DateTime<Utc>,
) -> ApiResult<Outcome<Activity>> {
    if !body.activity_type.is_manual() {
        return Err(ApiError::field(format!(
            "activity type {} is written by the system",
            body.activity_type
        )));
    }
    let description = checked(
        "description",
        body.description,
        rules::DESCRIPTION_MAX,
        true,
    )?;
    let outcome = text("outcome", body.outcome, rules::OUTCOME_MAX)?;
    let now = envelope::micros(now);
    let occurred_at = envelope::micros(body.occurred_at.unwrap_or(now));
    if occurred_at > now + chrono::Duration::minutes(5) {
        return Err(ApiError::field("occurredAt must not be in the future"));
    }
    let lead = repo::touch_activity(tx, id, occurred_at)
        .await?
        .filter(|l| l.status != LeadStatus::Deleted)
        .ok_or(ApiError::NotFound("lead"))?;
    let activity_id = repo::insert_activity(
        tx,
        &repo::NewActivityRow {
            lead: id,
            kind: body.activity_type,
            description: description.as_deref(),
            outcome: outcome.as_deref(),
            occurred_at,
            user: &caller.user_id,
            new_status: None,
        },
    )
    .await?;
    let audit = repo::audit_row(
        caller,
        "ACTIVITY_LOGGED",
        &id.to_string(),
        Some(lead.territory),
        json!({"activityType": body.activity_type}),
    );
    let event = NewEvent::new(
        EventType::ActivityLogged,
        Some(id),
        now,
        envelope::key_activity(activity_id),
        json!({
            "leadId": id, "activityType": body.activity_type, "ownerUserId": lead.owner_user_id,
            "territory": lead.territory, "userId": caller.user_id, "occurredAt": envelope::ts(occurred_at),
        }),
        audience(lead.territory, &lead.owner_user_id, &lead.collaborators),
    );
    Ok(Outcome {
        value: Activity {
            id: activity_id,
            lead_id: id,
            activity_type: body.activity_type,
            meaningful: body.activity_type.is_meaningful(),
            description,
            outcome,
            occurred_at,
            user_id: caller.user_id.clone(),
        },
        events: vec![event],
        audit: Some(audit),
    })
}

/// Query of the lead list, as the caller typed it.
#[derive(Debug, Default, Clone)]
pub struct ListQuery {
    pub status: Option<String>,
    pub owner: Option<String>,
    pub q: Option<String>,
    pub email: Option<String>,
    pub page: Option<i64>,
    pub size: Option<i64>,
}

/// Page sizes the list accepts.
pub const PAGE_SIZES: std::ops::RangeInclusive<i64> = 1..=500;
/// Highest page number (keeps `page * size` far from overflow and the offset scan bounded).
pub const MAX_PAGE: i64 = 100_000;

/// Runs `f` once more when it failed with a serialization failure or deadlock.
async fn retry_once<T, F, Fut>(mut f: F) -> ApiResult<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ApiResult<T>>,
{
    match f().await {
        Err(e) if e.is_retryable() => {
            tracing::info!("transaction collided with a concurrent one; retrying once");
            f().await
        }
        other => other,
    }
}

/// The leads use cases as units of work (one transaction each, as the caller).
#[derive(Clone)]
pub struct LeadService {
    pub pool: PgPool,
    pub vault: Arc<Vault>,
    pub publisher: Publisher,
}

impl LeadService {
    /// Refuses (403, counted `denied` for `event`) a caller whose role may not write.
    pub fn require_writer(
        &self,
        caller: &Principal,
        event: EventType,
        action: &str,
    ) -> ApiResult<()> {
        caller.require(WRITERS, action).inspect_err(|_| {
            self.publisher.count(event.as_str(), "denied");
        })
    }

    async fn commit<T>(&self, tx: Tx, out: Outcome<T>) -> ApiResult<Written<T>> {
        let position = self
            .publisher
            .commit_audited(tx, out.audit.as_ref(), &out.events)
            .await?;
        Ok(Written {
            value: out.value,
            position,
        })
    }

    fn lead(&self, row: LeadRow) -> ApiResult<Lead> {
        row.into_lead(&self.vault).map_err(pii_error)
    }

    /// Creates a lead (see [`create_in`]).
    pub async fn create(&self, caller: &Principal, body: CreateLead) -> ApiResult<Written<Lead>> {
        self.require_writer(caller, EventType::LeadCreated, "create leads")?;
        // Normalised first, so the log shows `***@example.com` whatever the spelling.
        let masked_email = body
            .email
            .as_deref()
            .and_then(|e| pii::normalize_email(e).ok())
            .map(Masked);
        let written = retry_once(|| async {
            let mut tx = db::begin_as(&self.pool, caller).await?;
            let out = create_in(&mut tx, &self.vault, caller, body.clone(), Utc::now()).await?;
            self.commit(tx, out).await
        })
        .await?;
        let row = &written.value;
        tracing::info!(lead_id = %row.id, territory = %row.territory, owner = %caller.user_id, contact_email = masked_email.as_ref().map(tracing::field::display), "lead created");
        Ok(Written {
            position: written.position,
            value: self.lead(written.value)?,
        })
    }

    /// Changes a lead (see [`patch_in`]); `None` when the caller no longer sees it afterwards.
    pub async fn patch(
        &self,
        caller: &Principal,
        id: Uuid,
        expected: i64,
        body: PatchLead,
    ) -> ApiResult<Written<Option<Lead>>> {
        self.require_writer(caller, EventType::LeadStatusChanged, "change leads")?;
        let written = retry_once(|| async {
            let mut tx = db::begin_as(&self.pool, caller).await?;
            let out = patch_in(
                &mut tx,
                &self.vault,
                caller,
                id,
                expected,
                body.clone(),
                Utc::now(),
            )
            .await?;
            self.commit(tx, out).await
        })
        .await?;
        Ok(Written {
            position: written.position,
            value: written.value.map(|r| self.lead(r)).transpose()?,
        })
    }

    /// Logs an activity (see [`add_activity_in`]).
    pub async fn add_activity(
        &self,
        caller: &Principal,
        id: Uuid,
        body: NewActivity,
    ) -> ApiResult<Written<Activity>> {
        self.require_writer(caller, EventType::ActivityLogged, "log activities")?;
        retry_once(|| async {
            let mut tx = db::begin_as(&self.pool, caller).await?;
            let out = add_activity_in(&mut tx, caller, id, body.clone(), Utc::now()).await?;
            self.commit(tx, out).await
        })
        .await
    }

    /// One lead the caller sees.
    pub async fn get(&self, caller: &Principal, id: Uuid) -> ApiResult<Lead> {
        no_viewer(caller, "read lead details (viewers see aggregates only)")?;
        let mut tx = db::begin_as(&self.pool, caller).await?;
        let row = repo::fetch(&mut tx, id)
            .await?
            .ok_or(ApiError::NotFound("lead"))?;
        tx.commit().await?;
        self.lead(row)
    }

    /// A page of the leads the caller sees; pages over 100 leads are audited as bulk reads.
    pub async fn list(&self, caller: &Principal, q: ListQuery) -> ApiResult<LeadPage> {
        no_viewer(caller, "list lead details (viewers see aggregates only)")?;
        let page = q.page.unwrap_or(0);
        let size = q.size.unwrap_or(20);
        if !(0..=MAX_PAGE).contains(&page) || !PAGE_SIZES.contains(&size) {
            return Err(ApiError::field(format!(
                "page must be between 0 and {MAX_PAGE} and size between 1 and 500"
            )));
        }
        let owner = q
            .owner
            .map(|o| user_id("owner", &o).map(|_| o))
            .transpose()?;
        let search = checked("q", q.q, rules::SEARCH_MAX, false)?;
        // A blank email filter is no filter.
        let email = text("email", q.email, rules::EMAIL_MAX)?;
        let status = q
            .status
            .as_deref()
            .map(|s| {
                LeadStatus::parse(&s.to_ascii_uppercase())
                    .ok_or_else(|| ApiError::field(format!("unknown status `{s}`")))
            })
            .transpose()?;
        let email_hash = email
            .as_deref()
            .map(|e| {
                pii::normalize_email(e)
                    .map(|n| self.vault.lookup_hash(PiiField::Email, &n))
                    .map_err(ApiError::field)
            })
            .transpose()?;
        let pattern = search.as_deref().map(|s| {
            format!(
                "%{}%",
                s.replace('\\', "\\\\")
                    .replace('%', "\\%")
                    .replace('_', "\\_")
            )
        });
        let filter = repo::ListFilter {
            status,
            owner: owner.as_deref(),
            pattern: pattern.as_deref(),
            email_hash: email_hash.as_deref(),
        };
        let mut tx = db::begin_as(&self.pool, caller).await?;
        let (rows, total) = repo::list(&mut tx, &filter, size, page * size).await?;
        if rows.len() > BULK_READ_AUDIT {
            repo::audit(
                &mut tx,
                caller,
                "PII_BULK_READ",
                "list",
                Some(caller.territory),
                json!({"leads": rows.len()}),
            )
            .await?;
        }
        tx.commit().await?;
        let items = rows
            .into_iter()
            .map(|r| self.lead(r))
            .collect::<ApiResult<Vec<_>>>()?;
        Ok(LeadPage {
            items,
            page,
            size,
            total,
        })
    }

    /// The activities of a lead the caller sees, newest first.
    pub async fn activities(&self, caller: &Principal, id: Uuid) -> ApiResult<Vec<Activity>> {
        no_viewer(caller, "read lead activities")?;
        let mut tx = db::begin_as(&self.pool, caller).await?;
        if !repo::visible(&mut tx, id).await? {
            return Err(ApiError::NotFound("lead"));
        }
        let rows = repo::activities(&mut tx, id).await?;
        tx.commit().await?;
        Ok(rows)
    }
}
