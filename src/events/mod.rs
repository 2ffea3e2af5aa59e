//! Event distribution: envelope and keys, the transactional outbox, the publisher that wakes
//! consumers after commit, the consumer trait and dispatcher, the background work of an instance
//! (doorbell, listener, retention), and the endpoints: full envelopes by reference and the SSE
//! stream.

pub mod consumer;
pub mod dedupe;
pub mod doorbell;
pub mod envelope;
pub mod hub;
pub mod listener;
pub mod outbox;
pub mod relay;
pub mod retention;
pub mod sse;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRef, State};
use axum::routing::get;
use axum::Router;
use serde_json::Value;
use sqlx::PgPool;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::auth::jwt::Authenticator;
use crate::config::Settings;
use crate::db::{self, Tx};
use crate::error::{ApiError, ApiResult, AppJson, AppPath};
use crate::identity::Principal;
use crate::telemetry::health::{ListenerHealth, ListenerState};
use crate::telemetry::metrics::Metrics;
use envelope::NewEvent;

/// Module label of this service's metrics.
pub const MODULE: &str = "lead-management";

/// Publishes events: appends them to the outbox in the caller's transaction and, after commit,
/// wakes in-process consumers (the doorbell for other instances rings from there). Who may make
/// a change is decided before, by the context's service; the publisher only counts refusals.
#[derive(Clone)]
pub struct Publisher {
    metrics: Arc<Metrics>,
    /// Signalled after every commit that wrote events; the doorbell waits on it (`Notify`
    /// coalesces bursts into one ring).
    pub committed: Arc<Notify>,
    /// Signalled at the same time for this instance's listener, which therefore never waits for
    /// the doorbell's round trip.
    pub wake_local: Arc<Notify>,
}

impl Publisher {
    /// A publisher counting into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Publisher {
            metrics,
            committed: Arc::new(Notify::new()),
            wake_local: Arc::new(Notify::new()),
        }
    }

    /// Counts one publish attempt of `event_type` with `result` (e.g. `denied`,
    /// `unauthenticated` for a change refused before it reached the outbox).
    pub fn count(&self, event_type: &str, result: &str) {
        self.metrics
            .events_published
            .with_label_values(&[event_type, MODULE, result])
            .inc();
    }

    /// Appends the events to the outbox in the business transaction and commits it; then counts
    /// them and wakes the consumers. Returns the highest outbox position written (0 when there
    /// were no events), which read-your-writes clients wait for. If the append or the commit
    /// fails, nothing was published (the transaction rolled back) and the events are counted
    /// `failure`.
    pub async fn commit(&self, tx: Tx, events: &[NewEvent]) -> Result<i64, sqlx::Error> {
        self.commit_audited(tx, None, events).await
    }

    /// [`Publisher::commit`] that also writes the change's audit row, in the same statement as
    /// its first event (one round trip fewer per command than two inserts).
    pub async fn commit_audited(
        &self,
        mut tx: Tx,
        audit: Option<&outbox::AuditRow>,
        events: &[NewEvent],
    ) -> Result<i64, sqlx::Error> {
        let written = async {
            let mut position = 0;
            let mut rest = events;
            if let Some(a) = audit {
                match events.split_first() {
                    Some((first, tail)) => {
                        if let Some(p) = outbox::append_audited(&mut tx, first, a).await? {
                            position = p;
                        }
                        rest = tail;
                    }
                    None => outbox::audit(&mut tx, a).await?,
                }
            }
            for ev in rest {
                if let Some(p) = outbox::append(&mut tx, ev).await? {
                    position = position.max(p);
                }
            }
            tx.commit().await?;
            Ok(position)
        }
        .await;
        match written {
            Ok(position) => {
                self.committed(events);
                Ok(position)
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

/// What the event endpoints need.
#[derive(Clone, FromRef)]
pub struct EventsState {
    pub auth: Arc<Authenticator>,
    pub pool: PgPool,
    pub hub: Arc<hub::Hub>,
    /// Interval of SSE keep-alive comments.
    pub keepalive: Duration,
}

/// Routes of this context.
pub fn router<S: Clone + Send + Sync + 'static>(state: EventsState) -> Router<S> {
    Router::new()
        .route("/api/events/{key}", get(get_event))
        .route("/api/cockpit/stream", get(sse::stream))
        .with_state(state)
}

/// The full envelope behind a truncation stub; 404 outside the event's audience. Viewers get
/// its aggregate form (no lead id, company name or user ids).
#[utoipa::path(get, path = "/api/events/{key}", tag = "events",
    params(("key" = Uuid, Path, description = "idempotency key of the event")),
    responses(
        (status = 200, description = "CloudEvents 1.0 envelope (aggregate form for viewers)", body = CloudEventDoc),
        (status = 401, description = "unauthenticated"),
        (status = 404, description = "not-found: unknown or not in the caller's audience"),
        (status = 422, description = "invalid-field: the key is not a UUID"),
        (status = 503, description = "unavailable: retry (Retry-After)")))]
pub async fn get_event(
    State(pool): State<PgPool>,
    caller: Principal,
    AppPath(key): AppPath<String>,
) -> ApiResult<AppJson<Value>> {
    let key: Uuid = key
        .parse()
        .map_err(|_| ApiError::field("idempotency key must be a UUID"))?;
    let mut tx = db::begin_as(&pool, &caller).await?;
    let env = outbox::fetch_by_key(&mut tx, key).await?;
    tx.commit().await?;
    let env = env.ok_or(ApiError::NotFound("event"))?;
    Ok(AppJson(if caller.role == crate::identity::Role::Viewer {
        hub::aggregate(&env)
    } else {
        env
    }))
}

/// A CloudEvents 1.0 envelope in JSON structured mode (docs/events.md); documentation only.
#[derive(utoipa::ToSchema)]
#[schema(as = CloudEvent)]
#[allow(dead_code)]
pub struct CloudEventDoc {
    /// `1.0`.
    specversion: String,
    /// Unique per event, stable across redelivery.
    id: String,
    /// `lead-management`.
    source: String,
    /// `dashboard.lead_created`, `dashboard.lead_status_changed`, `dashboard.lead_assigned`,
    /// `dashboard.activity_logged`, `dashboard.followup_completed`.
    #[schema(rename = "type")]
    event_type: String,
    /// The lead id (absent for batch events and for viewers).
    #[schema(required = false)]
    subject: String,
    time: chrono::DateTime<chrono::Utc>,
    /// `application/json`.
    datacontenttype: String,
    /// UUID v5 over the event's canonical string.
    idempotencykey: Uuid,
    /// Outbox position.
    #[schema(required = false, minimum = 1)]
    position: i64,
    /// The payload of the event type; viewers get only its aggregate fields.
    #[schema(value_type = Object)]
    data: Value,
}

/// Background work of the event path of one instance: the doorbell, the listener (unless
/// `features.events.cross-module.enabled` is false, in which case consumers do nothing, the
/// cursor stays where it is and health reports `Disabled`), the retention job and the check
/// that ends the streams of users the user table no longer admits.
pub struct Background {
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    hub: Arc<hub::Hub>,
}

impl Background {
    /// Starts the background tasks of one instance: the doorbell rings after `publisher`'s
    /// commits, the listener hands rows to `dispatcher` on connections of its own, retention
    /// prunes with `pool`.
    pub async fn start(
        settings: &Settings,
        pool: &PgPool,
        publisher: &Publisher,
        dispatcher: consumer::Dispatcher,
        health: Arc<ListenerHealth>,
        hub: Arc<hub::Hub>,
        auth: &Authenticator,
    ) -> anyhow::Result<Self> {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut tasks = vec![
            tokio::spawn(doorbell::run(
                settings.database_url.clone(),
                publisher.committed.clone(),
                stopped.clone(),
            )),
            tokio::spawn(retention::run(
                pool.clone(),
                settings.events.clone(),
                stopped.clone(),
            )),
        ];
        if let Some(users) = auth.users() {
            tasks.push(tokio::spawn(hub::watch_users(
                hub.clone(),
                users.clone(),
                users.ttl(),
                stopped.clone(),
            )));
        }
        if settings.features.cross_module_events {
            health.set(ListenerState::Disconnected);
            let listener = listener::Listener {
                database_url: settings.database_url.clone(),
                dispatcher,
                health,
                wake: publisher.wake_local.clone(),
                poll_interval: Duration::from_millis(settings.events.poll_interval_ms),
                max_unsettled: settings.events.max_unsettled_rows,
            };
            tasks.push(tokio::spawn(listener.run(stopped)));
        } else {
            tracing::info!(
                "features.events.cross-module.enabled is false: event consumers are off"
            );
            health.set(ListenerState::Disabled);
        }
        Ok(Background { stop, tasks, hub })
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
