//! Lead HTTP handlers: extract, call the service, map the result to a response. No SQL here.

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use uuid::Uuid;

use super::domain::LeadStatus;
use super::model::*;
use super::service::{self, LeadService, Written};
use super::LeadsState;
use crate::auth::{MaybePrincipal, Principal};
use crate::error::{ApiError, ApiResult, AppJson, AppPath};
use crate::events::envelope::EventType;

/// Header carrying the outbox position of a write's event (read-your-writes).
pub const POSITION_HEADER: HeaderName = HeaderName::from_static("freshplan-position");

fn uuid_path(raw: &str) -> ApiResult<Uuid> {
    raw.parse().map_err(|_| ApiError::NotFound("lead"))
}

fn etag(version: i64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\"")).expect("digits are a valid header value")
}

fn position(p: i64) -> HeaderValue {
    HeaderValue::from_str(&p.to_string()).expect("digits are a valid header value")
}

/// The principal a change is made as. Without one the change is refused (401, counted
/// `unauthenticated`), unless unauthenticated publishing is allowed (tests and `--demo` only), in
/// which case it acts as [`Principal::anonymous_publisher`], an ordinary sales user — never as
/// the system principal.
fn writer(state: &LeadsState, caller: MaybePrincipal, event: EventType) -> ApiResult<Principal> {
    match caller.0 {
        Some(p) => Ok(p),
        None if state.allow_unauthenticated => Ok(Principal::anonymous_publisher()),
        None => {
            state
                .service
                .publisher
                .count(event.as_str(), "unauthenticated");
            Err(ApiError::Unauthenticated)
        }
    }
}

/// Creates a lead; the creator becomes its owner.
#[utoipa::path(post, path = "/api/leads", tag = "leads", request_body = CreateLead,
    responses(
        (status = 201, description = "created", body = Lead, headers(
            ("ETag" = String, description = "the lead's version, quoted"),
            ("Location" = String, description = "`/api/leads/{id}`"),
            ("FreshPlan-Position" = String, description = "outbox position of the write's event"))),
        (status = 400, description = "malformed-json"),
        (status = 401, description = "unauthenticated"),
        (status = 403, description = "forbidden: viewers; a territory other than the caller's (sales, manager)"),
        (status = 409, description = "duplicate-contact: a live lead with this email exists in the territory (`existingLeadId` when the caller sees it)"),
        (status = 413, description = "payload-too-large"),
        (status = 415, description = "unsupported-media-type: the body is not `application/json`"),
        (status = 422, description = "invalid-field: the detail names the field (schema rules, unknown collaborator)"),
        (status = 503, description = "unavailable or contention: retry (Retry-After)")))]
pub async fn create_lead(
    State(state): State<LeadsState>,
    caller: MaybePrincipal,
    AppJson(body): AppJson<CreateLead>,
) -> ApiResult<Response> {
    let caller = writer(&state, caller, EventType::LeadCreated)?;
    let Written {
        value: lead,
        position: pos,
    } = state.service.create(&caller, body).await?;
    let location = HeaderValue::from_str(&format!("/api/leads/{}", lead.id))
        .expect("uuid is a valid header value");
    Ok((
        StatusCode::CREATED,
        [
            (header::ETAG, etag(lead.version)),
            (header::LOCATION, location),
            (POSITION_HEADER, position(pos)),
        ],
        AppJson(lead),
    )
        .into_response())
}

/// Query of `GET /api/leads`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Filter by status (the wire spelling; case-insensitive).
    #[param(value_type = Option<LeadStatus>)]
    pub status: Option<String>,
    /// Filter by owner user id.
    #[param(schema_with = rules::user_id)]
    pub owner: Option<String>,
    /// Substring of company name or city (case-insensitive; one line, at most 200 characters;
    /// blank matches every lead).
    #[param(value_type = Option<String>, max_length = 200, pattern = r"^[^\u0000-\u001f\u007f-\u009f]*$")]
    pub q: Option<String>,
    /// Exact contact email (any spelling; matched by keyed hash, never decrypted for search);
    /// blank is no filter.
    #[param(schema_with = rules::email_filter)]
    pub email: Option<String>,
    /// Page number, from 0.
    #[param(minimum = 0, maximum = 100000)]
    pub page: Option<i64>,
    /// Page size, 1..=500 (default 20).
    #[param(minimum = 1, maximum = 500)]
    pub size: Option<i64>,
}

/// Lists the leads the caller may see.
#[utoipa::path(get, path = "/api/leads", tag = "leads", params(ListParams),
    responses(
        (status = 200, description = "one page of the leads the caller sees", body = LeadPage),
        (status = 401, description = "unauthenticated"),
        (status = 403, description = "forbidden: viewers see aggregates only"),
        (status = 422, description = "invalid-field: a parameter out of its bounds, an unknown parameter"),
        (status = 500, description = "contact-data-unreadable: a lead's stored contact data does not decrypt"),
        (status = 503, description = "unavailable: retry (Retry-After)")))]
pub async fn list_leads(
    State(service): State<LeadService>,
    caller: Principal,
    query: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<AppJson<LeadPage>> {
    let Query(q) = query.map_err(|e| ApiError::field(e.body_text()))?;
    let query = service::ListQuery {
        status: q.status,
        owner: q.owner,
        q: q.q,
        email: q.email,
        page: q.page,
        size: q.size,
    };
    Ok(AppJson(service.list(&caller, query).await?))
}

/// One lead; 404 when it is outside the caller's view.
#[utoipa::path(get, path = "/api/leads/{id}", tag = "leads", params(("id" = Uuid, Path, description = "the lead's id")),
    responses(
        (status = 200, description = "the lead", body = Lead, headers(("ETag" = String, description = "the lead's version, quoted"))),
        (status = 401, description = "unauthenticated"),
        (status = 403, description = "forbidden: viewers see aggregates only"),
        (status = 404, description = "not-found: no such lead in the caller's view (also for an id that is not a UUID)"),
        (status = 500, description = "contact-data-unreadable: the lead's stored contact data does not decrypt"),
        (status = 503, description = "unavailable: retry (Retry-After)")))]
pub async fn get_lead(
    State(service): State<LeadService>,
    caller: Principal,
    AppPath(id): AppPath<String>,
) -> ApiResult<Response> {
    let lead = service.get(&caller, uuid_path(&id)?).await?;
    Ok(([(header::ETAG, etag(lead.version))], AppJson(lead)).into_response())
}

/// The version in `If-Match`: `"3"`, `W/"3"` or `3` (`rules::IF_MATCH`, at most 18 digits).
fn if_match(headers: &HeaderMap) -> ApiResult<i64> {
    let raw = headers
        .get(header::IF_MATCH)
        .ok_or(ApiError::PreconditionRequired)?;
    let invalid = || ApiError::field("If-Match must be the lead's ETag, e.g. \"3\"");
    let raw = raw.to_str().map_err(|_| invalid())?.trim();
    let raw = raw.strip_prefix("W/").unwrap_or(raw);
    let digits = match raw.strip_prefix('"') {
        Some(rest) => rest.strip_suffix('"').ok_or_else(invalid)?,
        None => raw,
    };
    if digits.is_empty() || digits.len() > 18 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    digits.parse().map_err(|_| invalid())
}

/// Changes a lead: status (status machine), owner, collaborators, contact and flags.
#[utoipa::path(patch, path = "/api/leads/{id}", tag = "leads", request_body = PatchLead, params(("id" = Uuid, Path, description = "the lead's id"),
    ("If-Match" = String, Header, description = "the lead's `ETag` (`\"3\"`, `W/\"3\"` or `3`); without it 428, stale 412", pattern = r#"^(?:W/)?(?:"[0-9]{1,18}"|[0-9]{1,18})$"#)),
    responses(
        (status = 200, description = "changed (or nothing to change)", body = Lead, headers(
            ("ETag" = String, description = "the lead's new version, quoted"),
            ("FreshPlan-Position" = String, description = "outbox position of the write's last event (0 when nothing changed)"))),
        (status = 204, description = "changed; the caller no longer sees the lead (handed to another owner)", headers(
            ("FreshPlan-Position" = String, description = "outbox position of the write's last event"))),
        (status = 400, description = "malformed-json"),
        (status = 401, description = "unauthenticated"),
        (status = 403, description = "forbidden: viewers; neither owner, manager of the territory nor admin"),
        (status = 404, description = "not-found: no such lead in the caller's view (also for an id that is not a UUID)"),
        (status = 409, description = "invalid-transition (status machine) or duplicate-contact"),
        (status = 412, description = "stale-version: `currentVersion` is the lead's version"),
        (status = 413, description = "payload-too-large"),
        (status = 415, description = "unsupported-media-type: the body is not `application/json`"),
        (status = 422, description = "invalid-field: the detail names the field (schema rules, If-Match not an ETag, unknown user)"),
        (status = 428, description = "precondition-required: no If-Match"),
        (status = 500, description = "contact-data-unreadable: the lead's stored contact data does not decrypt"),
        (status = 503, description = "unavailable or contention: retry (Retry-After)")))]
pub async fn patch_lead(
    State(state): State<LeadsState>,
    caller: MaybePrincipal,
    AppPath(id): AppPath<String>,
    headers: HeaderMap,
    AppJson(body): AppJson<PatchLead>,
) -> ApiResult<Response> {
    let caller = writer(&state, caller, EventType::LeadStatusChanged)?;
    let id = uuid_path(&id)?;
    let expected = if_match(&headers)?;
    let written = state.service.patch(&caller, id, expected, body).await?;
    let pos = (POSITION_HEADER, position(written.position));
    Ok(match written.value {
        Some(lead) => ([(header::ETAG, etag(lead.version)), pos], AppJson(lead)).into_response(),
        None => (StatusCode::NO_CONTENT, [pos]).into_response(),
    })
}

/// Logs an activity on a lead the caller can see.
#[utoipa::path(post, path = "/api/leads/{id}/activities", tag = "leads", request_body = NewActivity, params(("id" = Uuid, Path, description = "the lead's id")),
    responses(
        (status = 201, description = "logged", body = Activity, headers(
            ("FreshPlan-Position" = String, description = "outbox position of the write's event"))),
        (status = 400, description = "malformed-json"),
        (status = 401, description = "unauthenticated"),
        (status = 403, description = "forbidden: viewers"),
        (status = 404, description = "not-found: no such lead in the caller's view, or deleted"),
        (status = 413, description = "payload-too-large"),
        (status = 415, description = "unsupported-media-type: the body is not `application/json`"),
        (status = 422, description = "invalid-field: the detail names the field (schema rules, occurredAt in the future)"),
        (status = 503, description = "unavailable or contention: retry (Retry-After)")))]
pub async fn add_activity(
    State(state): State<LeadsState>,
    caller: MaybePrincipal,
    AppPath(id): AppPath<String>,
    AppJson(body): AppJson<NewActivity>,
) -> ApiResult<Response> {
    let caller = writer(&state, caller, EventType::ActivityLogged)?;
    let id = uuid_path(&id)?;
    let written = state.service.add_activity(&caller, id, body).await?;
    Ok((
        StatusCode::CREATED,
        [(POSITION_HEADER, position(written.position))],
        AppJson(written.value),
    )
        .into_response())
}

/// The activities of a lead the caller can see, newest first.
#[utoipa::path(get, path = "/api/leads/{id}/activities", tag = "leads", params(("id" = Uuid, Path, description = "the lead's id")),
    responses(
        (status = 200, description = "the lead's activities, newest first", body = [Activity]),
        (status = 401, description = "unauthenticated"),
        (status = 403, description = "forbidden: viewers"),
        (status = 404, description = "not-found: no such lead in the caller's view"),
        (status = 503, description = "unavailable: retry (Retry-After)")))]
pub async fn list_activities(
    State(service): State<LeadService>,
    caller: Principal,
    AppPath(id): AppPath<String>,
) -> ApiResult<AppJson<Vec<Activity>>> {
    Ok(AppJson(service.activities(&caller, uuid_path(&id)?).await?))
}
