//! `/q/health/live` and `/q/health/ready` (MicroProfile-style JSON).

use std::sync::atomic::{AtomicI32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;

use axum::extract::{FromRef, State};
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};
use sqlx::PgPool;

use crate::events::relay::{RelayHealth, RelayState};

/// State of this instance's event listener, shared with the `lead-event-handler` check and
/// mirrored in the `freshplan_listener_connected` gauge.
#[derive(Debug)]
pub struct ListenerHealth {
    state: AtomicU8,
    backend_pid: AtomicI32,
    connected: prometheus::Gauge,
    /// Rows handled ahead of the durable cursor (held back by a long transaction).
    unsettled: AtomicUsize,
    /// Age of the oldest of them, in milliseconds.
    lag_ms: AtomicU64,
}

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
        self.state.store(s as u8, Ordering::SeqCst);
        let connected = matches!(s, ListenerState::CatchingUp | ListenerState::Live);
        self.connected.set(if connected { 1.0 } else { 0.0 });
    }

    /// A health state reported into `connected` (the registered gauge).
    pub fn new(connected: prometheus::Gauge) -> Self {
        ListenerHealth {
            state: AtomicU8::new(ListenerState::Disconnected as u8),
            backend_pid: AtomicI32::new(0),
            connected,
            unsettled: AtomicUsize::new(0),
            lag_ms: AtomicU64::new(0),
        }
    }

    /// Records how many rows the listener handled ahead of the durable cursor and the age of the
    /// oldest (`freshplan_outbox_lag_seconds`, in seconds).
    pub fn set_backlog(&self, unsettled: usize, lag_seconds: f64) {
        self.unsettled.store(unsettled, Ordering::SeqCst);
        self.lag_ms
            .store((lag_seconds * 1000.0) as u64, Ordering::SeqCst);
    }

    /// Rows handled ahead of the durable cursor, as last recorded.
    pub fn unsettled(&self) -> usize {
        self.unsettled.load(Ordering::SeqCst)
    }

    /// Records the PostgreSQL backend pid of the current LISTEN connection.
    pub fn set_backend_pid(&self, pid: i32) {
        self.backend_pid.store(pid, Ordering::SeqCst);
    }

    /// The PostgreSQL backend pid of the current (or last) LISTEN connection; 0 before the first
    /// connection. Operators find this instance's listener in `pg_stat_activity` by it.
    pub fn backend_pid(&self) -> i32 {
        self.backend_pid.load(Ordering::SeqCst)
    }

    /// The current state.
    pub fn get(&self) -> ListenerState {
        match self.state.load(Ordering::SeqCst) {
            1 => ListenerState::CatchingUp,
            2 => ListenerState::Live,
            3 => ListenerState::Disabled,
            _ => ListenerState::Disconnected,
        }
    }
}

/// What readiness looks at: a probe connection of its own (never the request pool, so a busy
/// pool does not make every instance unready at once) and this instance's listener.
#[derive(Clone)]
pub struct HealthState {
    pub probe: PgPool,
    pub listener: Arc<ListenerHealth>,
    pub relay: RelayCheck,
}

/// The NATS relay's state when it runs in this process (`freshplan.relay.enabled`); readiness
/// then has a `relay` check, DOWN while the relay can reach neither NATS nor the database.
#[derive(Clone, Default)]
pub struct RelayCheck(pub Option<Arc<RelayHealth>>);

impl<S> FromRef<S> for HealthState
where
    S: Send + Sync,
    Arc<ListenerHealth>: FromRef<S>,
    ProbePool: FromRef<S>,
    RelayCheck: FromRef<S>,
{
    fn from_ref(state: &S) -> Self {
        HealthState {
            probe: ProbePool::from_ref(state).0,
            listener: Arc::<ListenerHealth>::from_ref(state),
            relay: RelayCheck::from_ref(state),
        }
    }
}

/// The readiness probe's own one-connection pool.
#[derive(Clone)]
pub struct ProbePool(pub PgPool);

/// Health answer (MicroProfile style), documentation of the JSON `live` and `ready` build.
#[derive(utoipa::ToSchema)]
#[schema(as = Health)]
#[allow(dead_code)]
pub struct HealthDoc {
    status: UpDown,
    /// `database` and `lead-event-handler` (readiness), and `relay` when the NATS relay runs in
    /// the instance (`freshplan.relay.enabled`); none for liveness.
    checks: Vec<HealthCheckDoc>,
}

/// One check of a health answer.
#[derive(utoipa::ToSchema)]
#[schema(as = HealthCheck)]
#[allow(dead_code)]
pub struct HealthCheckDoc {
    name: String,
    status: UpDown,
    /// `lead-event-handler`: `{"state": "disconnected" | "catching-up" | "live" | "disabled",
    /// "outboxLagSeconds": "<age of the oldest event the durable cursor has not passed>",
    /// "unsettledRows": "<rows handled ahead of the cursor>"}`; a lag alone (a long transaction
    /// holds the cursor back) does not make the check DOWN.
    /// `relay`: `{"state": "active" | "standby" | "down"}` (DOWN only when `down`).
    #[schema(required = false)]
    data: std::collections::HashMap<String, String>,
}

/// Up or down.
#[derive(utoipa::ToSchema)]
#[schema(rename_all = "UPPERCASE")]
#[allow(dead_code)]
pub enum UpDown {
    Up,
    Down,
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/q/health/live", tag = "operations", security(()),
    responses((status = 200, description = "`{\"status\":\"UP\",\"checks\":[]}`", body = HealthDoc)))]
pub async fn live() -> Json<Value> {
    Json(json!({"status": "UP", "checks": []}))
}

/// Readiness: database reachable and the listener live (or deliberately disabled).
#[utoipa::path(get, path = "/q/health/ready", tag = "operations", security(()),
    responses((status = 200, description = "UP: checks `database` and `lead-event-handler`", body = HealthDoc),
        (status = 503, description = "DOWN: database unreachable, the listener disconnected or catching up, or the enabled NATS relay down", body = HealthDoc)))]
pub async fn ready(State(health): State<HealthState>) -> (StatusCode, Json<Value>) {
    let db_up = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&health.probe),
    )
    .await
    .map(|r| r.is_ok())
    .unwrap_or(false);
    let listener = health.listener.get();
    let listener_up = matches!(listener, ListenerState::Live | ListenerState::Disabled);
    let word = |up: bool| if up { "UP" } else { "DOWN" };
    let state_name = match listener {
        ListenerState::Disconnected => "disconnected",
        ListenerState::CatchingUp => "catching-up",
        ListenerState::Live => "live",
        ListenerState::Disabled => "disabled",
    };
    let mut up = db_up && listener_up;
    let mut checks = vec![
        json!({"name": "database", "status": word(db_up)}),
        json!({"name": "lead-event-handler", "status": word(listener_up), "data": {
            "state": state_name,
            "outboxLagSeconds": format!("{:.1}", health.listener.lag_ms.load(Ordering::SeqCst) as f64 / 1000.0),
            "unsettledRows": health.listener.unsettled().to_string(),
        }}),
    ];
    if let Some(relay) = &health.relay.0 {
        // A standby is ready: it can reach NATS and takes over when the active relay goes.
        let state = relay.get();
        let relay_up = state != RelayState::Down;
        up &= relay_up;
        checks.push(
            json!({"name": "relay", "status": word(relay_up), "data": {"state": state.as_str()}}),
        );
    }
    let body = json!({"status": word(up), "checks": checks});
    (
        if up {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        Json(body),
    )
}
