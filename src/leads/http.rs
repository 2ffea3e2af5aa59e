//! Lead HTTP handlers: extract, call the service, map the result to a response. No SQL here.

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use uuid::Uuid;

use super::model::*;
use super::service::{self, LeadService, Written};
use super::LeadsState;
use crate::auth::{MaybePrincipal, Principal};
use crate::error::{ApiError, ApiResult, AppJson};
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
    responses((status = 201, body = Lead), (status = 401), (status = 403), (status = 409, description = "duplicate-contact"), (status = 422)))]
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
    /// Filter by status.
    pub status: Option<String>,
    /// Filter by owner user id.
    pub owner: Option<String>,
    /// Substring of company name or city (case-insensitive).
    pub q: Option<String>,
    /// Exact contact email (any spelling; matched by keyed hash, never decrypted for search).
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
    responses((status = 200, body = LeadPage), (status = 401), (status = 403), (status = 422)))]
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
#[utoipa::path(get, path = "/api/leads/{id}", tag = "leads", params(("id" = Uuid, Path)),
    responses((status = 200, body = Lead), (status = 404)))]
pub async fn get_lead(
    State(service): State<LeadService>,
    caller: Principal,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let lead = service.get(&caller, uuid_path(&id)?).await?;
    Ok(([(header::ETAG, etag(lead.version))], AppJson(lead)).into_response())
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
    responses((status = 200, body = Lead), (status = 204, description = "changed; the caller no longer sees the lead"), (status = 404), (status = 409, description = "invalid-transition"), (status = 412), (status = 428)))]
pub async fn patch_lead(
    State(state): State<LeadsState>,
    caller: MaybePrincipal,
    Path(id): Path<String>,
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
#[utoipa::path(post, path = "/api/leads/{id}/activities", tag = "leads", request_body = NewActivity, params(("id" = Uuid, Path)),
    responses((status = 201, body = Activity), (status = 404), (status = 422)))]
pub async fn add_activity(
    State(state): State<LeadsState>,
    caller: MaybePrincipal,
    Path(id): Path<String>,
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
#[utoipa::path(get, path = "/api/leads/{id}/activities", tag = "leads", params(("id" = Uuid, Path)),
    responses((status = 200, body = [Activity]), (status = 404)))]
pub async fn list_activities(
    State(service): State<LeadService>,
    caller: Principal,
    Path(id): Path<String>,
) -> ApiResult<AppJson<Vec<Activity>>> {
    Ok(AppJson(service.activities(&caller, uuid_path(&id)?).await?))
}
