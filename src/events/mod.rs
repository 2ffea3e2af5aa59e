//! Event distribution: envelope and keys, the transactional outbox, the publisher that wakes
//! consumers after commit, and the endpoint that serves full envelopes by reference.

pub mod envelope;
pub mod outbox;

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::routing::get;
use axum::Router;
use serde_json::Value;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::app::AppState;
use crate::auth::{MaybePrincipal, Principal};
use crate::db::{self, Tx};
use crate::error::{ApiError, ApiResult, AppJson};
use crate::telemetry::metrics::Metrics;
use envelope::NewEvent;

/// Module label of this service's metrics.
pub const MODULE: &str = "lead-management";

/// Publishes events: checks the publisher, appends to the outbox in the caller's transaction and,
/// after commit, wakes in-process consumers (the doorbell for other instances rings from there).
#[derive(Clone)]
pub struct Publisher {
    allow_unauthenticated: bool,
    metrics: Arc<Metrics>,
    /// Signalled after every commit that wrote events; `Notify` coalesces bursts.
    pub committed: Arc<Notify>,
}

impl Publisher {
    /// A publisher; `allow_unauthenticated` is `freshplan.security.allow-unauthenticated-publisher`.
    pub fn new(allow_unauthenticated: bool, metrics: Arc<Metrics>) -> Self {
        Publisher {
            allow_unauthenticated,
            metrics,
            committed: Arc::new(Notify::new()),
        }
    }

    /// The principal a change publishes as. Without one the change is refused (401) and counted
    /// as `unauthenticated`, unless unauthenticated publishing is allowed (tests only), in which
    /// case it acts as the system principal.
    pub fn authorize(&self, caller: MaybePrincipal, event_type: &str) -> ApiResult<Principal> {
        match caller.0 {
            Some(p) => Ok(p),
            None if self.allow_unauthenticated => Ok(Principal::system()),
            None => {
                self.metrics
                    .events_published
                    .with_label_values(&[event_type, MODULE, "unauthenticated"])
                    .inc();
                Err(ApiError::Unauthenticated)
            }
        }
    }

    /// Appends events to the outbox in the business transaction.
    pub async fn append(&self, tx: &mut Tx, events: &[NewEvent]) -> Result<(), sqlx::Error> {
        for ev in events {
            outbox::append(tx, ev).await?;
        }
        Ok(())
    }

    /// Call after the transaction committed: counts and wakes the consumers.
    pub fn committed(&self, events: &[NewEvent]) {
        if events.is_empty() {
            return;
        }
        for ev in events {
            let size = serde_json::to_vec(&ev.envelope())
                .map(|v| v.len())
                .unwrap_or(0);
            let result = if size > envelope::MAX_FRAME_BYTES {
                "truncated"
            } else {
                "success"
            };
            self.metrics
                .events_published
                .with_label_values(&[ev.event_type.as_str(), MODULE, result])
                .inc();
        }
        self.committed.notify_one();
    }
}

/// Routes of this context.
pub fn router() -> Router<AppState> {
    Router::new().route("/api/events/{key}", get(get_event))
}

/// The full envelope behind a truncation stub; 404 outside the event's audience.
#[utoipa::path(get, path = "/api/events/{key}", tag = "events",
    params(("key" = Uuid, Path, description = "idempotency key of the event")),
    responses((status = 200, description = "CloudEvents 1.0 envelope"), (status = 404, description = "unknown or not in the caller's audience")))]
pub async fn get_event(
    State(state): State<AppState>,
    caller: Principal,
    Path(key): Path<String>,
) -> ApiResult<AppJson<Value>> {
    let key: Uuid = key
        .parse()
        .map_err(|_| ApiError::field("idempotency key must be a UUID"))?;
    let mut tx = db::begin_as(&state.pool, &caller).await?;
    let env = outbox::fetch_by_key(&mut tx, key).await?;
    tx.commit().await?;
    env.map(AppJson).ok_or(ApiError::NotFound("event"))
}

/// Background work of the event path (listener, doorbell, retention). Placeholder until the
/// listener lands: reports the handler state so readiness is truthful.
pub struct Background {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Background {
    /// Starts the background tasks of one instance.
    pub async fn start(state: &AppState) -> anyhow::Result<Self> {
        use crate::telemetry::health::ListenerState;
        state
            .listener_health
            .set(if state.settings.features.cross_module_events {
                ListenerState::Disconnected
            } else {
                ListenerState::Disabled
            });
        Ok(Background { tasks: Vec::new() })
    }

    /// Stops every task.
    pub async fn stop(self) {
        for t in self.tasks {
            t.abort();
        }
    }
}
