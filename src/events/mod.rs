//! Event distribution: envelope and keys, the transactional outbox, the publisher that wakes
//! consumers after commit, the background work of an instance (doorbell, listener, retention),
//! and the endpoints: full envelopes by reference and the SSE stream.

pub mod consumer;
pub mod doorbell;
pub mod envelope;
pub mod hub;
pub mod listener;
pub mod outbox;
pub mod retention;
pub mod sse;

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::routing::get;
use axum::Router;
use serde_json::Value;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::app::AppState;
use crate::auth::{MaybePrincipal, Principal, Role};
use crate::db::{self, Tx};
use crate::error::{ApiError, ApiResult, AppJson};
use crate::telemetry::metrics::Metrics;
use envelope::{EventType, NewEvent};

/// Module label of this service's metrics.
pub const MODULE: &str = "lead-management";

/// Publishes events: checks the publisher, appends to the outbox in the caller's transaction and,
/// after commit, wakes in-process consumers (the doorbell for other instances rings from there).
#[derive(Clone)]
pub struct Publisher {
    allow_unauthenticated: bool,
    metrics: Arc<Metrics>,
    /// Signalled after every commit that wrote events; the doorbell waits on it (`Notify`
    /// coalesces bursts into one ring).
    pub committed: Arc<Notify>,
    /// Signalled at the same time for this instance's listener, which therefore never waits for
    /// the doorbell's round trip.
    pub wake_local: Arc<Notify>,
}

impl Publisher {
    /// A publisher; `allow_unauthenticated` is `freshplan.security.allow-unauthenticated-publisher`.
    pub fn new(allow_unauthenticated: bool, metrics: Arc<Metrics>) -> Self {
        Publisher {
            allow_unauthenticated,
            metrics,
            committed: Arc::new(Notify::new()),
            wake_local: Arc::new(Notify::new()),
        }
    }

    fn count(&self, event_type: &str, result: &str) {
        self.metrics
            .events_published
            .with_label_values(&[event_type, MODULE, result])
            .inc();
    }

    /// The principal a change publishes as, if it may make the change at all. Without a principal
    /// the change is refused (401) and counted `unauthenticated`, unless unauthenticated
    /// publishing is allowed (tests only), in which case it acts as the system principal. A role
    /// outside `allowed` is refused (403) and counted `denied`.
    pub fn authorize(
        &self,
        caller: MaybePrincipal,
        event_type: EventType,
        allowed: &[Role],
        action: &str,
    ) -> ApiResult<Principal> {
        let principal = match caller.0 {
            Some(p) => p,
            None if self.allow_unauthenticated => Principal::system(),
            None => {
                self.count(event_type.as_str(), "unauthenticated");
                return Err(ApiError::Unauthenticated);
            }
        };
        principal.require(allowed, action).inspect_err(|_| {
            self.count(event_type.as_str(), "denied");
        })?;
        Ok(principal)
    }

    /// Appends the events to the outbox in the business transaction and commits it; then counts
    /// them and wakes the consumers. If the append or the commit fails, nothing was published
    /// (the transaction rolled back) and the events are counted `failure`.
    pub async fn commit(&self, mut tx: Tx, events: &[NewEvent]) -> Result<(), sqlx::Error> {
        let written = async {
            for ev in events {
                outbox::append(&mut tx, ev).await?;
            }
            tx.commit().await
        }
        .await;
        match written {
            Ok(()) => {
                self.committed(events);
                Ok(())
            }
            Err(e) => {
                for ev in events {
                    self.count(ev.event_type.as_str(), "failure");
                }
                Err(e)
            }
        }
    }

    /// After commit: counts and wakes the consumers.
    fn committed(&self, events: &[NewEvent]) {
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
            self.count(ev.event_type.as_str(), result);
        }
        self.committed.notify_one();
        self.wake_local.notify_one();
    }
}

/// Routes of this context.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/events/{key}", get(get_event))
        .route("/api/cockpit/stream", get(sse::stream))
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

/// Background work of the event path of one instance: the doorbell, the listener (unless
/// `features.events.cross-module.enabled` is false, in which case consumers do nothing, the
/// cursor stays where it is and health reports `Disabled`) and the retention job.
pub struct Background {
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    hub: Arc<hub::Hub>,
}

impl Background {
    /// Starts the background tasks of one instance.
    pub async fn start(state: &AppState) -> anyhow::Result<Self> {
        use crate::telemetry::health::ListenerState;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let settings = &state.settings;
        let mut tasks = vec![
            tokio::spawn(doorbell::run(
                settings.database_url.clone(),
                state.publisher.committed.clone(),
                stopped.clone(),
            )),
            tokio::spawn(retention::run(
                state.pool.clone(),
                settings.events.clone(),
                stopped.clone(),
            )),
        ];
        if settings.features.cross_module_events {
            state.listener_health.set(ListenerState::Disconnected);
            let listener = listener::Listener {
                database_url: settings.database_url.clone(),
                consumer: consumer::Consumer::new(state),
                health: state.listener_health.clone(),
                wake: state.publisher.wake_local.clone(),
                poll_interval: std::time::Duration::from_millis(settings.events.poll_interval_ms),
            };
            tasks.push(tokio::spawn(listener.run(stopped)));
        } else {
            tracing::info!(
                "features.events.cross-module.enabled is false: event consumers are off"
            );
            state.listener_health.set(ListenerState::Disabled);
        }
        Ok(Background {
            stop,
            tasks,
            hub: state.hub.clone(),
        })
    }

    /// Stops every task (each finishes the batch it is in; a task that does not finish within
    /// 5 s is aborted, which is safe: an unfinished batch rolls back and is read again) and ends
    /// the open SSE streams.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        self.hub.close();
        for mut t in self.tasks {
            if tokio::time::timeout(std::time::Duration::from_secs(5), &mut t)
                .await
                .is_err()
            {
                tracing::warn!("event background task did not stop in time; aborting it");
                t.abort();
            }
        }
    }
}
