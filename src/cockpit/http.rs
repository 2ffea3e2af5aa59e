//! Cockpit HTTP: the lead widget, the caller's identity for the page, and the page itself
//! (served from the binary; `web/` holds its files).

use std::sync::Arc;

use axum::extract::{FromRef, Query, State};
use axum::http::header;
use axum::response::{Html, IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::cache::Scope;
use super::widget::{scope_for, Widget};
use crate::auth::jwt::Authenticator;
use crate::auth::Principal;
use crate::error::{ApiError, ApiResult, AppJson};

/// What the cockpit handlers need.
#[derive(Clone, FromRef)]
pub struct CockpitState {
    pub auth: Arc<Authenticator>,
    pub widget: Arc<Widget>,
    /// `features.dashboard.lead-widget.enabled`.
    #[from_ref(skip)]
    pub widget_enabled: bool,
}

/// Query of `GET /api/cockpit/lead-widget`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct WidgetParams {
    /// `own`, `territory` or `all`; default by role (sales own, manager and viewer territory,
    /// admin all).
    #[param(value_type = Option<WidgetScope>)]
    pub scope: Option<String>,
    /// Answer only once the numbers include this outbox position (the `FreshPlan-Position` of
    /// the caller's write); waits up to 2 s, then 503 `not-yet-consistent`.
    #[param(minimum = 1, maximum = 9223372036854775807i64)]
    pub min_position: Option<i64>,
}

/// Scope of the lead widget: `own` (sales, manager, admin), `territory` (manager, viewer, admin),
/// `all` (admin).
#[derive(utoipa::ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)]
pub enum WidgetScope {
    Own,
    Territory,
    All,
}

/// The lead widget (CONTRACT.md "Lead widget"); documentation of the JSON the widget statement
/// builds.
#[derive(utoipa::ToSchema)]
#[schema(as = LeadWidget)]
#[allow(dead_code)]
#[schema(rename_all = "camelCase")]
pub struct LeadWidgetDoc {
    scope: WidgetScope,
    /// True for the territory and all scopes.
    is_manager_view: bool,
    /// The caller.
    user_id: String,
    /// The caller's territory.
    territory: crate::territory::Territory,
    lead_stats: LeadStatsDoc,
    #[schema(minimum = 0)]
    pending_t3_count: i64,
    #[schema(minimum = 0)]
    pending_t7_count: i64,
    #[schema(minimum = 0)]
    completed_t3_today: i64,
    #[schema(minimum = 0)]
    completed_t7_today: i64,
    #[schema(minimum = 0.0, maximum = 1.0)]
    t3_conversion_rate: f64,
    #[schema(minimum = 0.0, maximum = 1.0)]
    t7_conversion_rate: f64,
    #[schema(minimum = 0.0, maximum = 1.0)]
    t3_response_rate: f64,
    #[schema(minimum = 0.0, maximum = 1.0)]
    t7_response_rate: f64,
    /// T+3 and T+7 combined, this week against the week before.
    conversion_trend: TrendDoc,
    /// T+3 and T+7 combined, this week against the week before.
    response_trend: TrendDoc,
    /// The 14 days (Europe/Berlin) ending today, oldest first.
    daily: Vec<DailyDoc>,
    /// Newest first, at most 10; viewers get them without `leadId` and `companyName`.
    recent_activities: Vec<RecentActivityDoc>,
    /// Newest first, at most 10; viewers get them without `leadId` and `companyName`.
    recent_follow_ups: Vec<RecentFollowUpDoc>,
    /// When the numbers were computed.
    as_of: chrono::DateTime<chrono::Utc>,
    /// The outbox position the numbers include.
    #[schema(minimum = 0)]
    position: i64,
}

/// Leads by status (deleted leads count nowhere).
#[derive(utoipa::ToSchema)]
#[schema(as = LeadStats)]
#[allow(dead_code)]
#[schema(rename_all = "camelCase")]
pub struct LeadStatsDoc {
    #[schema(minimum = 0)]
    total: i64,
    #[schema(minimum = 0)]
    registered: i64,
    #[schema(minimum = 0)]
    active: i64,
    #[schema(minimum = 0)]
    reminder: i64,
    #[schema(minimum = 0)]
    grace_period: i64,
    #[schema(minimum = 0)]
    qualified: i64,
    #[schema(minimum = 0)]
    converted: i64,
    #[schema(minimum = 0)]
    lost: i64,
    #[schema(minimum = 0)]
    expired: i64,
}

/// A rate this week against the week before.
#[derive(utoipa::ToSchema)]
#[schema(as = Trend)]
#[allow(dead_code)]
#[schema(rename_all = "camelCase")]
pub struct TrendDoc {
    current: f64,
    previous: f64,
    change_percent: f64,
    direction: TrendDirection,
}

/// Direction of a trend (a change below 0.0005 is STABLE).
#[derive(utoipa::ToSchema)]
#[schema(rename_all = "UPPERCASE")]
#[allow(dead_code)]
pub enum TrendDirection {
    Up,
    Down,
    Stable,
}

/// One day of follow-ups and responses.
#[derive(utoipa::ToSchema)]
#[schema(as = WidgetDay)]
#[allow(dead_code)]
#[schema(rename_all = "camelCase")]
pub struct DailyDoc {
    date: chrono::NaiveDate,
    #[schema(minimum = 0)]
    t3_sent: i64,
    #[schema(minimum = 0)]
    t7_sent: i64,
    #[schema(minimum = 0)]
    responses: i64,
    #[schema(minimum = 0)]
    conversions: i64,
}

/// A recent activity.
#[derive(utoipa::ToSchema)]
#[schema(as = RecentActivity)]
#[allow(dead_code)]
#[schema(rename_all = "camelCase")]
pub struct RecentActivityDoc {
    /// Absent for viewers.
    #[schema(required = false)]
    lead_id: uuid::Uuid,
    /// Absent for viewers.
    #[schema(required = false)]
    company_name: String,
    #[schema(rename = "type")]
    activity_type: crate::leads::domain::ActivityType,
    occurred_at: chrono::DateTime<chrono::Utc>,
    user_id: String,
}

/// A recent follow-up mail.
#[derive(utoipa::ToSchema)]
#[schema(as = RecentFollowUp)]
#[allow(dead_code)]
#[schema(rename_all = "camelCase")]
pub struct RecentFollowUpDoc {
    /// Absent for viewers.
    #[schema(required = false)]
    lead_id: uuid::Uuid,
    /// Absent for viewers.
    #[schema(required = false)]
    company_name: String,
    follow_up_type: FollowUpType,
    sent_at: chrono::DateTime<chrono::Utc>,
    /// False for a mail that failed.
    success: bool,
}

/// T+3 or T+7.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub enum FollowUpType {
    T3,
    T7,
}

/// The lead widget of the caller (CONTRACT.md "Lead widget").
#[utoipa::path(get, path = "/api/cockpit/lead-widget", tag = "cockpit", params(WidgetParams),
    responses(
        (status = 200, description = "the widget JSON of CONTRACT.md; `position` is the outbox position the numbers include. Without `minPosition` the answer may miss the events of the last `freshplan.cockpit.widget-max-staleness-ms` (default 1 s); with it, it includes that write", body = LeadWidgetDoc),
        (status = 401, description = "unauthenticated"),
        (status = 403, description = "forbidden: the scope is not open to the caller's role"),
        (status = 404, description = "feature-disabled (features.dashboard.lead-widget.enabled=false)"),
        (status = 422, description = "invalid-field: unknown scope, minPosition not a positive integer, an unknown parameter"),
        (status = 503, description = "not-yet-consistent: minPosition not reflected within 2 s; unavailable (Retry-After)")))]
pub async fn lead_widget(
    State(state): State<CockpitState>,
    caller: Principal,
    query: Result<Query<WidgetParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    if !state.widget_enabled {
        return Err(ApiError::FeatureDisabled(
            "features.dashboard.lead-widget.enabled",
        ));
    }
    let Query(q) = query.map_err(|e| ApiError::field(e.body_text()))?;
    let requested = q
        .scope
        .as_deref()
        .map(|s| {
            Scope::parse(s).ok_or_else(|| {
                ApiError::field(format!("scope must be own, territory or all, not `{s}`"))
            })
        })
        .transpose()?;
    if q.min_position.is_some_and(|p| p < 1) {
        return Err(ApiError::field(
            "minPosition must be a positive outbox position",
        ));
    }
    let scope = scope_for(&caller, requested)?;
    let answer = state.widget.answer(&caller, scope, q.min_position).await?;
    // `Cache-Control: no-store` comes from the security middleware, as for every /api answer.
    Ok(AppJson(answer.body).into_response())
}

/// The caller as the service sees them.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Me {
    pub user_id: String,
    pub name: String,
    pub role: String,
    pub territory: String,
}

/// Who the caller is (the page shows it and offers the scopes of the role).
#[utoipa::path(get, path = "/api/me", tag = "cockpit",
    responses((status = 200, description = "the caller", body = Me), (status = 401, description = "unauthenticated")))]
pub async fn me(caller: Principal) -> AppJson<Me> {
    AppJson(Me {
        user_id: caller.user_id,
        name: caller.name,
        role: caller.role.to_string(),
        territory: caller.territory.to_string(),
    })
}

/// The Sales Cockpit page.
#[utoipa::path(get, path = "/", tag = "cockpit", security(()),
    responses((status = 200, description = "the Sales Cockpit page (HTML)", content_type = "text/html")))]
pub async fn page() -> Html<&'static str> {
    Html(include_str!("../../web/index.html"))
}

macro_rules! asset {
    ($name:ident, $file:literal, $type:literal) => {
        /// A static file of the page.
        pub async fn $name() -> Response {
            (
                [
                    (header::CONTENT_TYPE, $type),
                    (header::CACHE_CONTROL, "public, max-age=300"),
                ],
                include_str!(concat!("../../web/", $file)),
            )
                .into_response()
        }
    };
}

asset!(app_js, "app.js", "text/javascript; charset=utf-8");
asset!(app_css, "app.css", "text/css; charset=utf-8");
asset!(
    uplot_js,
    "vendor/uPlot.min.js",
    "text/javascript; charset=utf-8"
);
asset!(uplot_css, "vendor/uPlot.min.css", "text/css; charset=utf-8");

/// `/favicon.ico`, which browsers fetch on their own for every page without a `<link rel=icon>`
/// (the development login page): the page's icon (web/index.html carries it inline as SVG) as a
/// PNG-in-ICO of 16 and 32 pixels, so the request is not a 404 in the browser's console.
pub async fn favicon() -> Response {
    (
        [
            (header::CONTENT_TYPE, "image/x-icon"),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        &include_bytes!("../../web/favicon.ico")[..],
    )
        .into_response()
}
