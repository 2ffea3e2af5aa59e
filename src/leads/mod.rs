//! Leads: the status machine (`domain`), the JSON shapes (`model`), the SQL (`repo`), the use
//! cases callable without HTTP (`service`) and the thin HTTP layer (`http`).

pub mod domain;
pub mod http;
pub mod model;
pub mod repo;
pub mod service;

use std::sync::Arc;

use axum::extract::FromRef;
use axum::routing::get;
use axum::Router;

use crate::auth::jwt::Authenticator;
use service::LeadService;

/// What the lead handlers need.
#[derive(Clone, FromRef)]
pub struct LeadsState {
    pub auth: Arc<Authenticator>,
    pub service: LeadService,
    /// `freshplan.security.allow-unauthenticated-publisher` (tests only).
    #[from_ref(skip)]
    pub allow_unauthenticated: bool,
}

/// Routes of this context.
pub fn router<S: Clone + Send + Sync + 'static>(state: LeadsState) -> Router<S> {
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
        .with_state(state)
}
