//! Leads: the status machine, the model, and the HTTP API (create, list, get, patch, activities).

pub mod domain;
pub mod http;
pub mod model;

use axum::routing::get;
use axum::Router;

use crate::app::AppState;

/// Routes of this context.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/leads", get(http::list_leads).post(http::create_lead))
        .route(
            "/api/leads/{id}",
            get(http::get_lead).patch(http::patch_lead),
        )
        .route(
            "/api/leads/{id}/activities",
            get(http::list_activities).post(http::add_activity),
        )
}
