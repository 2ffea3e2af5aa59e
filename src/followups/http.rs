//! Follow-up HTTP handlers: `POST /api/followups/run` (managers: their territory; admins: all)
//! and the public unsubscribe pages. No SQL here.

use std::sync::Arc;

use axum::extract::{FromRef, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use serde::Deserialize;

use super::job::{Job, RunReport};
use super::pages::{self, InvalidReason};
use super::unsubscribe::{Link, Redeemed, Unsubscribe};
use crate::auth::jwt::Authenticator;
use crate::auth::{Principal, Role};
use crate::error::{ApiError, ApiResult, AppJson};

/// What the follow-up handlers need.
#[derive(Clone, FromRef)]
pub struct FollowupsState {
    pub auth: Arc<Authenticator>,
    pub job: Arc<Job>,
    pub unsubscribe: Arc<Unsubscribe>,
    /// `freshplan.followup.enabled`
    #[from_ref(skip)]
    pub enabled: bool,
}

/// Routes of this context.
pub fn router<S: Clone + Send + Sync + 'static>(state: FollowupsState) -> Router<S> {
    Router::new()
        .route("/api/followups/run", post(run))
        .route("/unsubscribe", get(unsubscribe_page).post(unsubscribe))
        .with_state(state)
}

/// Runs the T+3/T+7 job now: a manager for the leads of their territory, an admin for all. The
/// mails are queued; the dispatcher delivers them (follow-ups become SENT or FAILED then).
#[utoipa::path(post, path = "/api/followups/run", tag = "followups",
    responses(
        (status = 200, description = "the run's counts", body = RunReport, headers(
            ("FreshPlan-Position" = String, description = "outbox position of the run's BATCH event"))),
        (status = 401, description = "unauthenticated"),
        (status = 403, description = "forbidden: only managers and admins run the job"),
        (status = 404, description = "feature-disabled (freshplan.followup.enabled = false)"),
        (status = 503, description = "unavailable or contention: retry (Retry-After)")))]
pub async fn run(State(state): State<FollowupsState>, caller: Principal) -> ApiResult<Response> {
    caller.require(&[Role::Manager, Role::Admin], "run the follow-up job")?;
    if !state.enabled {
        return Err(ApiError::FeatureDisabled("freshplan.followup.enabled"));
    }
    let territory = (caller.role == Role::Manager).then_some(caller.territory);
    let report = state.job.run(&caller, territory).await?;
    let position = HeaderValue::from_str(&report.position.to_string())
        .expect("digits are a valid header value");
    Ok((
        [(crate::leads::http::POSITION_HEADER, position)],
        AppJson(report),
    )
        .into_response())
}

/// Query of `GET /unsubscribe`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TokenQuery {
    /// The signed token of the mail's link.
    #[param(max_length = 512)]
    pub token: Option<String>,
}

/// Form of `POST /unsubscribe`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct TokenForm {
    /// The signed token of the mail's link.
    #[schema(max_length = 512)]
    pub token: Option<String>,
}

fn page(status: StatusCode, html: String) -> Response {
    (
        status,
        [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
        Html(html),
    )
        .into_response()
}

fn invalid(reason: InvalidReason) -> Response {
    let status = match reason {
        InvalidReason::Expired => StatusCode::GONE,
        InvalidReason::Tampered | InvalidReason::Unknown => StatusCode::BAD_REQUEST,
    };
    page(status, pages::invalid(reason))
}

/// The confirmation page of an unsubscribe link (changes nothing).
#[utoipa::path(get, path = "/unsubscribe", tag = "followups", security(()), params(TokenQuery),
    responses(
        (status = 200, description = "confirmation page (or: this link was already used)", body = String, content_type = "text/html"),
        (status = 400, description = "page: the link is invalid or tampered with; nothing changed", body = String, content_type = "text/html"),
        (status = 410, description = "page: the link has expired; nothing changed", body = String, content_type = "text/html"),
        (status = 503, description = "unavailable: retry (Retry-After)")))]
pub async fn unsubscribe_page(
    State(state): State<FollowupsState>,
    Query(q): Query<TokenQuery>,
) -> ApiResult<Response> {
    let token = q.token.unwrap_or_default();
    Ok(match state.unsubscribe.check(&token).await? {
        Link::Valid(company) => page(StatusCode::OK, pages::confirm(&company, &token)),
        Link::Used(company) => page(StatusCode::OK, pages::already(&company)),
        Link::Invalid(reason) => invalid(reason),
    })
}

/// Withdraws the e-mail consent of the lead an unsubscribe link names (once per link).
#[utoipa::path(post, path = "/unsubscribe", tag = "followups", security(()),
    request_body(content = TokenForm, content_type = "application/x-www-form-urlencoded"),
    responses(
        (status = 200, description = "page: consent withdrawn (or: this link was already used, nothing changed)", body = String, content_type = "text/html"),
        (status = 400, description = "page: the link is invalid or tampered with; nothing changed", body = String, content_type = "text/html"),
        (status = 410, description = "page: the link has expired; nothing changed", body = String, content_type = "text/html"),
        (status = 415, description = "unsupported-media-type: not a form"),
        (status = 503, description = "unavailable: retry (Retry-After)")))]
pub async fn unsubscribe(
    State(state): State<FollowupsState>,
    form: Result<Form<TokenForm>, axum::extract::rejection::FormRejection>,
) -> ApiResult<Response> {
    let token = match form {
        Ok(Form(f)) => f.token.unwrap_or_default(),
        Err(axum::extract::rejection::FormRejection::InvalidFormContentType(_)) => {
            return Err(ApiError::UnsupportedMediaType(
                "the body must be application/x-www-form-urlencoded".into(),
            ));
        }
        Err(_) => String::new(),
    };
    Ok(match state.unsubscribe.redeem(&token).await? {
        Redeemed::Done(company) => page(StatusCode::OK, pages::done(&company)),
        Redeemed::Used(company) => page(StatusCode::OK, pages::already(&company)),
        Redeemed::Invalid(reason) => invalid(reason),
    })
}
