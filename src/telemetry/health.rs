//! `/q/health/live` and `/q/health/ready` (MicroProfile-style JSON).

use std::sync::atomic::{AtomicU8, Ordering};

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use crate::app::AppState;

/// State of the event listener, shared with the `lead-event-handler` check.
#[derive(Debug, Default)]
pub struct ListenerHealth(AtomicU8);

/// What the listener is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerState {
    Disconnected = 0,
    CatchingUp = 1,
    Live = 2,
    /// `features.events.cross-module.enabled = false`: nothing to be ready for.
    Disabled = 3,
}

impl ListenerHealth {
    /// Records a new state.
    pub fn set(&self, s: ListenerState) {
        self.0.store(s as u8, Ordering::SeqCst);
    }

    /// The current state.
    pub fn get(&self) -> ListenerState {
        match self.0.load(Ordering::SeqCst) {
            1 => ListenerState::CatchingUp,
            2 => ListenerState::Live,
            3 => ListenerState::Disabled,
            _ => ListenerState::Disconnected,
        }
    }
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/q/health/live", tag = "operations", security(()),
    responses((status = 200, description = "`{\"status\":\"UP\",\"checks\":[]}`")))]
pub async fn live() -> Json<Value> {
    Json(json!({"status": "UP", "checks": []}))
}

/// Readiness: database reachable and the listener live (or deliberately disabled).
#[utoipa::path(get, path = "/q/health/ready", tag = "operations", security(()),
    responses((status = 200, description = "UP: checks `database` and `lead-event-handler`"),
        (status = 503, description = "DOWN: database unreachable, or the listener disconnected or catching up")))]
pub async fn ready(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let db_up = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&state.pool),
    )
    .await
    .map(|r| r.is_ok())
    .unwrap_or(false);
    let listener = state.listener_health.get();
    let listener_up = matches!(listener, ListenerState::Live | ListenerState::Disabled);
    let word = |up: bool| if up { "UP" } else { "DOWN" };
    let state_name = match listener {
        ListenerState::Disconnected => "disconnected",
        ListenerState::CatchingUp => "catching-up",
        ListenerState::Live => "live",
        ListenerState::Disabled => "disabled",
    };
    let up = db_up && listener_up;
    let body = json!({
        "status": word(up),
        "checks": [
            {"name": "database", "status": word(db_up)},
            {"name": "lead-event-handler", "status": word(listener_up), "data": {"state": state_name}},
        ]
    });
    (
        if up {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        Json(body),
    )
}
