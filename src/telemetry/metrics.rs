//! Prometheus metrics: the names of CONTRACT.md, HTTP request metrics labelled by matched route
//! (never the raw URI, which would explode cardinality and could carry ids).

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::error::ApiError;

/// Latency buckets of CONTRACT.md (milliseconds): the event path is expected well under 10 ms
/// on one machine, the upper buckets catch catch-up after an outage.
pub const EVENT_LATENCY_BUCKETS_MS: &[f64] =
    &[1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0];

/// Widget answer buckets (milliseconds): a hit is expected well under 1 ms, a miss under 15 ms
/// at 100,000 leads; the upper buckets show a database under pressure or a read-your-writes wait.
pub const WIDGET_BUCKETS_MS: &[f64] = &[
    0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 25.0, 50.0, 100.0, 250.0, 1000.0, 2500.0,
];

/// Every collector of one instance.
pub struct Metrics {
    pub registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub events_published: IntCounterVec,
    pub events_consumed: IntCounterVec,
    pub event_latency: HistogramVec,
    pub cache_invalidations: IntCounterVec,
    pub active_widgets: IntGaugeVec,
    pub dashboard_updates: IntCounterVec,
    pub dedupe_entries: Gauge,
    pub dedupe_hit_rate: Gauge,
    pub outbox_lag: GaugeVec,
    pub widget_query: HistogramVec,
    pub listener_connected: Gauge,
    pub notify_queue_usage: Gauge,
    /// `leads_followup_sent_total{type,territory,result}`: final outcome of each follow-up mail.
    pub followup_sent: IntCounterVec,
    /// `freshplan_followup_automated_total{type}`: follow-ups the job queued (`t3`, `t7`).
    pub followup_automated: IntCounterVec,
    /// `freshplan_followup_batch_duration_ms{type}`: one run's claiming of one type.
    pub followup_batch_duration: HistogramVec,
    /// `freshplan_followup_queue_size{type}`: mails `pending` (queued, waiting or backing off)
    /// and `processing` (being delivered).
    pub followup_queue: IntGaugeVec,
    /// `freshplan_relay_state`: 1 active, 0 standby, -1 down (NATS or database unreachable).
    pub relay_state: IntGauge,
    /// `freshplan_relay_lag_seconds`: age of the oldest committed event not yet in the stream.
    pub relay_lag_seconds: Gauge,
    /// `freshplan_relay_lag_events`: committed events not yet in the stream.
    pub relay_lag_events: IntGauge,
    /// `freshplan_relay_published_total{result}`: `published`, `duplicate` (JetStream already
    /// had the id), `denied` (not a valid event, skipped), `failure` (no ack; retried).
    pub relay_published: IntCounterVec,
    /// `freshplan_relay_publish_latency_seconds`: publish sent → ack received.
    pub relay_publish_latency: Histogram,
    /// `freshplan_relay_retries_total`: relay sessions that ended in an error and were retried.
    pub relay_retries: IntCounter,
}

/// `freshplan_relay_state` of a relay that cannot reach NATS or the database.
const RELAY_DOWN: i64 = -1;

/// Publish → ack buckets (seconds; a new metric, so base units as promtool wants): a local
/// JetStream acks in well under 5 ms; the upper buckets show a slow or replicated stream, the
/// last ones an ack timeout.
pub const RELAY_PUBLISH_BUCKETS_SECONDS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
];

/// Follow-up batch duration buckets (milliseconds).
pub const FOLLOWUP_BATCH_BUCKETS_MS: &[f64] = &[
    5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
];

impl Metrics {
    /// Creates and registers every collector.
    pub fn new() -> Self {
        let registry = Registry::new();
        macro_rules! reg {
            ($c:expr) => {{
                let c = $c.expect("metric definitions are static and valid");
                registry
                    .register(Box::new(c.clone()))
                    .expect("metric names are unique");
                c
            }};
        }
        let http_requests = reg!(IntCounterVec::new(
            Opts::new(
                "freshplan_http_requests_total",
                "HTTP requests by matched route"
            ),
            &["method", "route", "status"]
        ));
        let http_duration = reg!(HistogramVec::new(
            HistogramOpts::new(
                "freshplan_http_request_duration_ms",
                "HTTP request latency by matched route"
            )
            .buckets(vec![
                0.5, 1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 1000.0
            ]),
            &["method", "route"]
        ));
        let events_published = reg!(IntCounterVec::new(
            Opts::new(
                "freshplan_events_published_total",
                "Events written to the outbox"
            ),
            &["event_type", "module", "result"]
        ));
        let events_consumed = reg!(IntCounterVec::new(
            Opts::new(
                "freshplan_events_consumed_total",
                "Events processed by consumers"
            ),
            &["event_type", "module", "result"]
        ));
        let event_latency = reg!(HistogramVec::new(
            HistogramOpts::new("freshplan_event_latency_ms", "Event path latency")
                .buckets(EVENT_LATENCY_BUCKETS_MS.to_vec()),
            &["event_type", "path"]
        ));
        let cache_invalidations = reg!(IntCounterVec::new(
            Opts::new(
                "freshplan_dashboard_cache_invalidations_total",
                "Widget cache invalidations"
            ),
            &["widget", "trigger"]
        ));
        let active_widgets = reg!(IntGaugeVec::new(
            Opts::new("freshplan_dashboard_active_widgets", "Open SSE streams"),
            &["type"]
        ));
        let dashboard_updates = reg!(IntCounterVec::new(
            Opts::new(
                "freshplan_dashboard_updates_total",
                "Updates pushed to dashboards"
            ),
            &["update_type"]
        ));
        let listener_connected = reg!(Gauge::new(
            "freshplan_listener_connected",
            "1 while this instance's event listener holds its LISTEN connection, else 0"
        ));
        let notify_queue_usage = reg!(Gauge::new(
            "freshplan_notify_queue_usage",
            "PostgreSQL's pg_notification_queue_usage() (0..1), sampled by the listener"
        ));
        let dedupe_entries = reg!(Gauge::new(
            "freshplan_dedupe_cache_entries",
            "Entries in the in-memory dedupe cache"
        ));
        let dedupe_hit_rate = reg!(Gauge::new(
            "freshplan_dedupe_cache_hit_rate",
            "Share of dedupe lookups that found a duplicate"
        ));
        let outbox_lag = reg!(GaugeVec::new(
            Opts::new(
                "freshplan_outbox_lag_seconds",
                "Age of the oldest event not yet consumed"
            ),
            &["consumer"]
        ));
        let widget_query = reg!(HistogramVec::new(
            HistogramOpts::new(
                "freshplan_widget_query_ms",
                "Lead widget answer time by scope and cache hit/miss"
            )
            .buckets(WIDGET_BUCKETS_MS.to_vec()),
            &["scope", "cache"]
        ));
        let followup_sent = reg!(IntCounterVec::new(
            Opts::new(
                "leads_followup_sent_total",
                "Follow-up mails by final outcome: success once delivered, failure after the last retry"
            ),
            &["type", "territory", "result"]
        ));
        let followup_automated = reg!(IntCounterVec::new(
            Opts::new(
                "freshplan_followup_automated_total",
                "Follow-ups queued by the T+3/T+7 job"
            ),
            &["type"]
        ));
        let followup_batch_duration = reg!(HistogramVec::new(
            HistogramOpts::new(
                "freshplan_followup_batch_duration_ms",
                "Time one job run took to claim and queue the follow-ups of one type"
            )
            .buckets(FOLLOWUP_BATCH_BUCKETS_MS.to_vec()),
            &["type"]
        ));
        let followup_queue = reg!(IntGaugeVec::new(
            Opts::new(
                "freshplan_followup_queue_size",
                "Follow-up mails in the mail outbox: pending (queued or backing off) and processing"
            ),
            &["type"]
        ));
        // Registered only by a process that runs the relay (`expose_relay_state`): an instance
        // without it exports no state, so "no relay active" alerts only where a relay runs.
        let relay_state = IntGauge::new(
            "freshplan_relay_state",
            "NATS relay of this process: 1 active (holds the relay lock), 0 standby, -1 down (NATS or database unreachable)",
        )
        .expect("metric definitions are static and valid");
        let relay_lag_seconds = reg!(Gauge::new(
            "freshplan_relay_lag_seconds",
            "Age of the oldest committed outbox event not yet acknowledged by JetStream (set by the active relay)"
        ));
        let relay_lag_events = reg!(IntGauge::new(
            "freshplan_relay_lag_events",
            "Committed outbox events not yet acknowledged by JetStream (set by the active relay)"
        ));
        let relay_published = reg!(IntCounterVec::new(
            Opts::new(
                "freshplan_relay_published_total",
                "Outbox events sent to JetStream by result: published, duplicate (already in the stream), denied (invalid row, skipped), failure (retried)"
            ),
            &["result"]
        ));
        let relay_publish_latency = reg!(Histogram::with_opts(
            HistogramOpts::new(
                "freshplan_relay_publish_latency_seconds",
                "Time from sending a publish to JetStream until its ack"
            )
            .buckets(RELAY_PUBLISH_BUCKETS_SECONDS.to_vec())
        ));
        let relay_retries = reg!(IntCounter::new(
            "freshplan_relay_retries_total",
            "Relay sessions that failed (NATS or database error) and were retried after a backoff"
        ));
        for result in ["published", "duplicate", "denied", "failure"] {
            relay_published.with_label_values(&[result]).inc_by(0);
        }
        relay_state.set(RELAY_DOWN);
        // Exported from the start, so dashboards and alerts see 0 rather than no series (and a
        // rate() over the first increase is not lost).
        active_widgets.with_label_values(&["sse"]).set(0);
        for kind in ["t3", "t7"] {
            followup_automated.with_label_values(&[kind]).inc_by(0);
        }
        for kind in ["pending", "processing"] {
            followup_queue.with_label_values(&[kind]).set(0);
        }
        for kind in ["T3", "T7"] {
            for territory in crate::territory::Territory::ALL {
                for result in ["success", "failure"] {
                    followup_sent
                        .with_label_values(&[kind, territory.code(), result])
                        .inc_by(0);
                }
            }
        }
        Metrics {
            relay_state,
            relay_lag_seconds,
            relay_lag_events,
            relay_published,
            relay_publish_latency,
            relay_retries,
            followup_sent,
            followup_automated,
            followup_batch_duration,
            followup_queue,
            registry,
            widget_query,
            listener_connected,
            notify_queue_usage,
            http_requests,
            http_duration,
            events_published,
            events_consumed,
            event_latency,
            cache_invalidations,
            active_widgets,
            dashboard_updates,
            dedupe_entries,
            dedupe_hit_rate,
            outbox_lag,
        }
    }

    /// Exports `freshplan_relay_state` (at -1, down, until the relay reports): called once the
    /// process runs the relay; later calls do nothing.
    pub fn expose_relay_state(&self) {
        // AlreadyReg on a second call is the "nothing to do" case.
        let _ = self.registry.register(Box::new(self.relay_state.clone()));
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// `GET /q/metrics`.
#[utoipa::path(get, path = "/q/metrics", tag = "operations", security(()),
    responses((status = 200, description = "Prometheus text format (version 0.0.4)", body = String, content_type = "text/plain"),
        (status = 404, description = "feature-disabled (features.metrics.prometheus.enabled=false)")))]
pub async fn metrics_endpoint(State(metrics): State<Arc<Metrics>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics.render(),
    )
        .into_response()
}

/// `GET /q/metrics` with `features.metrics.prometheus.enabled = false`.
pub async fn metrics_disabled() -> ApiError {
    ApiError::FeatureDisabled("features.metrics.prometheus.enabled")
}

/// The `method` label: the standard methods as they are, anything else `other` (a made-up
/// method must not create label values at will).
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Middleware: counts, times and logs every request by method and matched route.
pub async fn track_http(State(metrics): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = method_label(req.method());
    let started = Instant::now();
    let response = next.run(req).await;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    metrics
        .http_requests
        .with_label_values(&[method, &route, response.status().as_str()])
        .inc();
    metrics
        .http_duration
        .with_label_values(&[method, &route])
        .observe(ms);
    // Access log by route template (never the raw URI: ids and query strings may identify
    // people). Success is debug-level to keep the log quiet under load.
    let status = response.status().as_u16();
    match status {
        500.. => tracing::error!(%method, %route, status, ms, "request failed"),
        400..=499 => tracing::info!(%method, %route, status, ms, "request refused"),
        _ => tracing::debug!(%method, %route, status, ms, "request"),
    }
    response
}
