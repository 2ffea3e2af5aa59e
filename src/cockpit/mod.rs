//! The Sales Cockpit: the lead widget (SQL over roll-ups kept exact by triggers, see
//! docs/cockpit-sql.md), its per-instance cache that events invalidate, the projection the
//! durable consumer keeps (`cockpit_daily_events`), and the page.

pub mod cache;
pub mod http;
pub mod projection;
pub mod widget;

use axum::routing::get;
use axum::Router;

pub use http::CockpitState;

/// Routes of this context.
pub fn router<S: Clone + Send + Sync + 'static>(state: CockpitState) -> Router<S> {
    Router::new()
        .route("/api/cockpit/lead-widget", get(http::lead_widget))
        .route("/api/me", get(http::me))
        .route("/", get(http::page))
        .route("/assets/app.js", get(http::app_js))
        .route("/assets/app.css", get(http::app_css))
        .route("/assets/vendor/uPlot.min.js", get(http::uplot_js))
        .route("/assets/vendor/uPlot.min.css", get(http::uplot_css))
        .route("/favicon.ico", get(http::favicon))
        .with_state(state)
}
