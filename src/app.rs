//! The composition root: application state, the router that mounts every context, and the
//! server lifecycle. No other module imports this one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::{DefaultBodyLimit, FromRef};
use axum::routing::get;
use axum::Router;
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tower_http::catch_panic::CatchPanicLayer;
use utoipa::OpenApi;

use crate::auth::jwt::Authenticator;
use crate::auth::users::Users;
use crate::cockpit::cache::WidgetCache;
use crate::cockpit::projection::DailyEvents;
use crate::cockpit::widget::{Statements, Widget};
use crate::cockpit::CockpitState;
use crate::config::Settings;
use crate::error::ApiError;
use crate::events::consumer::Dispatcher;
use crate::events::dedupe::DedupeCache;
use crate::events::hub::Hub;
use crate::events::relay::{Relay, RelayHealth};
use crate::events::{EventsState, Publisher};
use crate::followups::clock::Clock;
use crate::followups::job::{Job, UNSUBSCRIBE_KEY_PURPOSE};
use crate::followups::mailer::{self, Dispatcher as MailDispatcher};
use crate::followups::token::TokenSigner;
use crate::followups::unsubscribe::Unsubscribe;
use crate::followups::FollowupsState;
use crate::http_security;
use crate::http_server::{self, Limits};
use crate::leads::service::LeadService;
use crate::leads::LeadsState;
use crate::pii::Vault;
use crate::telemetry::health::{ListenerHealth, ProbePool, RelayCheck};
use crate::telemetry::metrics::{self, Metrics};
use crate::{auth, cockpit, db, events, followups, leads, telemetry};

/// How long a lead-widget answer may be served from the cache when no event invalidated it.
pub const WIDGET_CACHE_TTL: Duration = Duration::from_secs(60);

/// Everything of one instance; cheap to clone. Only this module knows the whole of it: each
/// context gets the parts it needs (its own state type, or single parts through `FromRef`).
#[derive(Clone, FromRef)]
pub struct AppState {
    pub settings: Arc<Settings>,
    /// The request pool (as the application role).
    pub pool: PgPool,
    /// The readiness probe's own connection.
    pub probe: ProbePool,
    pub auth: Arc<Authenticator>,
    pub vault: Arc<Vault>,
    pub metrics: Arc<Metrics>,
    pub publisher: Publisher,
    pub listener_health: Arc<ListenerHealth>,
    /// Open SSE subscribers of this instance.
    pub hub: Arc<Hub>,
    /// Keys this instance recently saw processed (in front of the inboxes).
    pub dedupe: Arc<DedupeCache>,
    /// The lead-widget cache of this instance, invalidated by every consumed event.
    pub widget_cache: Arc<WidgetCache>,
    /// The lead widget.
    pub widget: Arc<Widget>,
    /// The leads use cases.
    pub leads: LeadService,
    /// The follow-up job's clock (tests and the demo move it).
    pub clock: Arc<Clock>,
    /// The T+3/T+7 job.
    pub followups: Arc<Job>,
    /// The mail outbox's dispatcher.
    pub mail: Arc<MailDispatcher>,
    /// Unsubscribe links.
    pub unsubscribe: Arc<Unsubscribe>,
    /// The NATS relay's state, when `freshplan.relay.enabled` runs it in this instance.
    pub relay: RelayCheck,
}

impl AppState {
    /// Connects the runtime pool, checks that it cannot bypass row-level security, and
    /// assembles the state.
    pub async fn connect(
        settings: Settings,
        auth: Authenticator,
        vault: Vault,
    ) -> anyhow::Result<Self> {
        let pool = db::connect(&settings.database_url, settings.pool_size, "freshplan").await?;
        db::check_runtime_role(&pool).await?;
        let probe = ProbePool(db::connect(&settings.database_url, 1, "freshplan-health").await?);
        let metrics = Arc::new(Metrics::new());
        let listener_health = Arc::new(ListenerHealth::new(metrics.listener_connected.clone()));
        let publisher = Publisher::new(metrics.clone());
        let hub = Hub::with_limit(
            settings.events.sse_queue_size,
            settings.stream_max_per_principal,
            metrics.clone(),
        );
        // The user table admits every token's caller (cached for users.refresh-seconds).
        let users = Arc::new(Users::new(
            pool.clone(),
            Duration::from_secs(settings.users_refresh_seconds),
        ));
        let auth = auth.with_users(users);
        let dedupe = Arc::new(DedupeCache::new(
            settings.events.dedupe_cache_size,
            metrics.clone(),
        ));
        let widget_cache = Arc::new(WidgetCache::new(
            WIDGET_CACHE_TTL,
            Duration::from_millis(settings.widget_max_staleness_ms),
            metrics.clone(),
        ));
        let widget = Arc::new(Widget {
            pool: pool.clone(),
            cache: widget_cache.clone(),
            metrics: metrics.clone(),
            statements: Statements::default(),
        });
        let vault = Arc::new(vault);
        let leads = LeadService {
            pool: pool.clone(),
            vault: vault.clone(),
            publisher: publisher.clone(),
        };
        // Every publish result of every event type exported from the start (0, not absent).
        for event_type in events::envelope::EventType::ALL {
            for result in [
                "success",
                "failure",
                "denied",
                "unauthenticated",
                "truncated",
            ] {
                metrics
                    .events_published
                    .with_label_values(&[event_type.as_str(), events::MODULE, result])
                    .inc_by(0);
            }
            for result in ["success", "duplicate", "denied", "failure"] {
                metrics
                    .events_consumed
                    .with_label_values(&[event_type.as_str(), events::MODULE, result])
                    .inc_by(0);
            }
        }
        let FollowupParts {
            clock,
            job: followups,
            mail,
            unsubscribe,
        } = FollowupParts::new(&settings, &pool, &vault, &metrics, &publisher)?;
        let relay = RelayCheck(
            settings
                .relay
                .enabled
                .then(|| Arc::new(RelayHealth::new(&metrics))),
        );
        Ok(AppState {
            relay,
            clock,
            followups,
            mail,
            unsubscribe,
            settings: Arc::new(settings),
            pool,
            probe,
            auth: Arc::new(auth),
            vault,
            metrics,
            publisher,
            listener_health,
            hub,
            dedupe,
            widget_cache,
            widget,
            leads,
        })
    }

    /// The event dispatcher of this instance: the durable consumers and the local effects.
    pub fn dispatcher(&self) -> Dispatcher {
        Dispatcher::new(
            vec![Arc::new(DailyEvents)],
            vec![self.widget_cache.clone()],
            self.hub.clone(),
            self.dedupe.clone(),
            self.metrics.clone(),
        )
    }
}

/// The follow-up job, its mail dispatcher and the unsubscribe links of one process (the
/// service, or `freshplan followups run`).
pub struct FollowupParts {
    pub clock: Arc<Clock>,
    pub job: Arc<Job>,
    pub mail: Arc<MailDispatcher>,
    pub unsubscribe: Arc<Unsubscribe>,
}

impl FollowupParts {
    /// Assembles them from the settings.
    pub fn new(
        settings: &Settings,
        pool: &PgPool,
        vault: &Arc<Vault>,
        metrics: &Arc<Metrics>,
        publisher: &Publisher,
    ) -> anyhow::Result<Self> {
        let clock = Arc::new(Clock::system());
        let signer = TokenSigner::new(vault.derived_key(UNSUBSCRIBE_KEY_PURPOSE));
        let mail = Arc::new(MailDispatcher {
            pool: pool.clone(),
            vault: vault.clone(),
            publisher: publisher.clone(),
            metrics: metrics.clone(),
            clock: clock.clone(),
            transport: mailer::Transport::from_settings(&settings.mail)?,
            settings: settings.mail.clone(),
            wake: Arc::new(tokio::sync::Notify::new()),
        });
        let job = Arc::new(Job {
            pool: pool.clone(),
            vault: vault.clone(),
            publisher: publisher.clone(),
            metrics: metrics.clone(),
            clock: clock.clone(),
            settings: settings.followup.clone(),
            mail_from: settings.mail.from.clone(),
            signer: signer.clone(),
            dispatcher: mail.clone(),
        });
        let unsubscribe = Arc::new(Unsubscribe {
            pool: pool.clone(),
            signer,
            clock: clock.clone(),
            publisher: publisher.clone(),
        });
        Ok(FollowupParts {
            clock,
            job,
            mail,
            unsubscribe,
        })
    }
}

/// The OpenAPI 3.1 document of the API.
#[derive(OpenApi)]
#[openapi(
    info(title = "FreshPlan Leads", description = "Lead management and Sales Cockpit"),
    paths(
        leads::http::create_lead,
        leads::http::list_leads,
        leads::http::get_lead,
        leads::http::patch_lead,
        leads::http::add_activity,
        leads::http::list_activities,
        events::get_event,
        cockpit::http::lead_widget,
        cockpit::http::me,
        cockpit::http::page,
        telemetry::health::live,
        telemetry::health::ready,
        metrics::metrics_endpoint,
        openapi,
        events::sse::stream,
        followups::http::run,
        followups::http::unsubscribe_page,
        followups::http::unsubscribe,
    ),
    components(schemas(
        leads::model::Lead,
        leads::model::CreateLead,
        leads::model::PatchLead,
        leads::model::Activity,
        leads::model::NewActivity,
        leads::model::LeadPage,
        leads::domain::LeadStatus,
        leads::domain::BusinessType,
        leads::domain::LeadSource,
        leads::domain::ActivityType,
        crate::territory::Territory,
        cockpit::http::Me,
        cockpit::http::WidgetScope,
        crate::error::Problem,
        followups::job::RunReport,
        followups::http::TokenForm,
    )),
    tags((name = "leads"), (name = "cockpit"), (name = "events"), (name = "followups"), (name = "operations")),
    modifiers(&BearerAuth, &Contract),
    security(("bearer" = []))
)]
pub struct ApiDoc;

/// Declares the bearer JWT scheme (`Authorization: Bearer <JWT>`; the development session
/// cookie is accepted too but is not part of the public contract).
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// Completes the document where one rule holds for every operation, so the annotations cannot
/// forget it: every error answer (status >= 400 without a body of its own) is
/// `application/problem+json` with the `Problem` schema, and a 503 problem carries `Retry-After`;
/// the response headers `ETag`, `FreshPlan-Position` and `Location` get their exact form; the
/// content types the annotations cannot state (the page's HTML, the event stream, this document)
/// and the stream's `Last-Event-ID` header.
struct Contract;

impl utoipa::Modify for Contract {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::header::Header;
        use utoipa::openapi::path::{Operation, ParameterIn};
        use utoipa::openapi::schema::{Object, ObjectBuilder, Type};
        use utoipa::openapi::{Content, Ref, RefOr};

        let text = |pattern: &str| -> Object {
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some(pattern))
                .build()
        };
        let header = |schema: Object, description: &str| {
            let mut h = Header::new(schema);
            h.description = Some(description.into());
            h
        };
        let content = |schema: Object| Content::new(Some(RefOr::T(schema.into())));
        // One event of the stream, as `id:`, `event:` and `data:` lines.
        let sse_event = || -> Object {
            let mut names: Vec<&str> = crate::events::envelope::EventType::ALL
                .iter()
                .map(|t| t.as_str())
                .collect();
            names.extend(["resync", "reauth", "replaced"]);
            ObjectBuilder::new()
                .description(Some(
                    "One Server-Sent Event: `id` is the outbox position, `event` the CloudEvents \
                     type (or `resync`, `reauth`, `replaced`), `data` the JSON envelope or its \
                     truncation stub (aggregate form for viewers), or for the named events \
                     `{\"reason\": …}`",
                ))
                .property("id", text("^[0-9]+$"))
                .property(
                    "event",
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .enum_values(Some(names)),
                )
                .property("data", Object::with_type(Type::String))
                .required("data")
                .required("event")
                .build()
        };
        for (path, item) in doc.paths.paths.iter_mut() {
            let ops: [&mut Option<Operation>; 5] = [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.patch,
                &mut item.delete,
            ];
            for op in ops.into_iter().flatten() {
                for (status, response) in op.responses.responses.iter_mut() {
                    let RefOr::T(response) = response else {
                        continue;
                    };
                    let code: u16 = status.parse().unwrap_or(0);
                    if code >= 400 && response.content.is_empty() {
                        response.content.insert(
                            crate::error::PROBLEM_JSON.into(),
                            Content::new(Some(Ref::from_schema_name("Problem"))),
                        );
                        if code == 503 {
                            response.headers.insert(
                                "Retry-After".into(),
                                header(text("^[0-9]+$"), "seconds to wait before retrying"),
                            );
                        }
                    }
                    for (name, h) in response.headers.iter_mut() {
                        let pattern = match name.as_str() {
                            "ETag" => r#"^"[0-9]+"$"#,
                            "FreshPlan-Position" => "^[0-9]+$",
                            "Location" => "^/api/leads/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$",
                            _ => continue,
                        };
                        h.schema = RefOr::T(text(pattern).into());
                    }
                    let body = match (path.as_str(), code) {
                        ("/", 200) => Some(("text/html", Object::with_type(Type::String))),
                        ("/api/cockpit/stream", 200) => Some(("text/event-stream", sse_event())),
                        ("/q/openapi", 200) => {
                            Some(("application/json", Object::with_type(Type::Object)))
                        }
                        _ => None,
                    };
                    if let Some((media_type, schema)) = body {
                        response.content.clear();
                        response.content.insert(media_type.into(), content(schema));
                    }
                    let follow: &[&str] = match (op.operation_id.as_deref(), code) {
                        (Some("create_lead"), 201) => {
                            &["get_lead", "patch_lead", "add_activity", "list_activities"]
                        }
                        (Some("get_lead" | "patch_lead"), 200) => {
                            &["patch_lead", "add_activity", "list_activities"]
                        }
                        _ => &[],
                    };
                    for target in follow {
                        // utoipa 5.5 serializes `Link::operation_id` as `operation_id`; the
                        // OpenAPI name is written through the (flattened) extensions instead.
                        let mut link = utoipa::openapi::link::LinkBuilder::new()
                            .extensions(Some(utoipa::openapi::extensions::Extensions::from_iter([
                                ("operationId", *target),
                            ])))
                            .parameter("path.id", "$response.body#/id");
                        if *target == "patch_lead" {
                            link = link.parameter("header.If-Match", "$response.header.ETag");
                        }
                        response
                            .links
                            .insert(target.to_string(), RefOr::T(link.build()));
                    }
                }
                for p in op.parameters.iter_mut().flatten() {
                    if p.parameter_in == ParameterIn::Header && p.name == "Last-Event-ID" {
                        p.schema = Some(RefOr::T(
                            ObjectBuilder::new()
                                .schema_type(Type::Integer)
                                .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
                                    utoipa::openapi::KnownFormat::Int64,
                                )))
                                .into(),
                        ));
                    }
                }
            }
        }
    }
}

/// This document.
#[utoipa::path(get, path = "/q/openapi", tag = "operations", security(()), responses((status = 200, description = "OpenAPI 3.1 document")))]
async fn openapi() -> axum::Json<utoipa::openapi::OpenApi> {
    axum::Json(ApiDoc::openapi())
}

async fn not_found() -> ApiError {
    ApiError::NotFound("resource")
}

/// The router with every context mounted.
pub fn router(state: AppState) -> Router {
    let leads = LeadsState {
        auth: state.auth.clone(),
        service: state.leads.clone(),
        allow_unauthenticated: state.settings.allow_unauthenticated_publisher,
    };
    let events = EventsState {
        auth: state.auth.clone(),
        pool: state.pool.clone(),
        hub: state.hub.clone(),
        keepalive: Duration::from_secs(state.settings.events.sse_keepalive_seconds.max(1)),
    };
    let cockpit = CockpitState {
        auth: state.auth.clone(),
        widget: state.widget.clone(),
        widget_enabled: state.settings.features.lead_widget,
    };
    let followups = FollowupsState {
        auth: state.auth.clone(),
        job: state.followups.clone(),
        unsubscribe: state.unsubscribe.clone(),
        enabled: state.settings.followup.enabled,
    };
    let mut api = Router::new()
        .merge(leads::router(leads))
        .merge(followups::router(followups))
        .merge(events::router(events))
        .merge(cockpit::router(cockpit))
        .route("/q/health/live", get(telemetry::health::live))
        .route("/q/health/ready", get(telemetry::health::ready))
        .route("/q/openapi", get(openapi));
    api = if state.settings.features.prometheus {
        api.route("/q/metrics", get(metrics::metrics_endpoint))
    } else {
        api.route("/q/metrics", get(metrics::metrics_disabled))
    };
    if state.settings.dev_login {
        api = api.merge(auth::dev_login::router(auth::dev_login::DevLoginState {
            secure_cookie: state.settings.secure_cookies(),
            pool: state.pool.clone(),
            auth: state.auth.clone(),
        }));
    }
    api.fallback(not_found)
        .layer(axum::middleware::from_fn(http_security::time_limit))
        .layer(axum::middleware::from_fn(http_security::protect))
        .layer(axum::middleware::from_fn_with_state(
            state.metrics.clone(),
            metrics::track_http,
        ))
        .layer(DefaultBodyLimit::max(state.settings.max_body_bytes))
        .layer(CatchPanicLayer::custom(|_| {
            axum::response::IntoResponse::into_response(ApiError::Internal(anyhow::anyhow!(
                "handler panicked"
            )))
        }))
        .with_state(state)
}

/// A running server and its background work.
pub struct Server {
    pub addr: SocketAddr,
    pub state: AppState,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    http: Option<JoinHandle<()>>,
    background: events::Background,
    /// The mail dispatcher and the follow-up schedule.
    followup_tasks: Vec<JoinHandle<()>>,
    followup_stop: Arc<tokio::sync::Notify>,
    /// The NATS relay (with `freshplan.relay.enabled`) and its stop signal.
    relay: Option<(tokio::sync::watch::Sender<bool>, JoinHandle<()>)>,
}

impl Server {
    /// Binds `bind` (port 0 picks a free port), starts the event runtime and serves, with the
    /// connection limits of the settings.
    pub async fn start(state: AppState, bind: &str) -> anyhow::Result<Self> {
        let limits = Limits {
            max_connections: state.settings.max_connections,
            header_read_timeout: Duration::from_secs(state.settings.header_timeout_seconds),
            ..Limits::default()
        };
        Self::start_with(state, bind, limits).await
    }

    /// Same, with connection limits of its own.
    pub async fn start_with(state: AppState, bind: &str, limits: Limits) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(bind)
            .await
            .with_context(|| format!("cannot bind {bind}"))?;
        let addr = listener.local_addr()?;
        let background = events::Background::start(
            &state.settings,
            &state.pool,
            &state.publisher,
            state.dispatcher(),
            state.listener_health.clone(),
            state.hub.clone(),
            &state.auth,
        )
        .await?;
        let followup_stop = Arc::new(tokio::sync::Notify::new());
        let mut followup_tasks = vec![tokio::spawn(state.mail.clone().run(followup_stop.clone()))];
        if state.settings.followup.enabled {
            let schedule = crate::schedule::Schedule::parse(
                &state.settings.followup.cron,
                state.settings.followup.timezone,
            )
            .map_err(|e| anyhow::anyhow!("freshplan.followup.cron: {e}"))?;
            followup_tasks.push(tokio::spawn(
                state
                    .followups
                    .clone()
                    .schedule(schedule, followup_stop.clone()),
            ));
        }
        let relay = state.relay.0.clone().map(|health| {
            let (stop, stopped) = tokio::sync::watch::channel(false);
            let relay = Relay {
                database_url: state.settings.database_url.clone(),
                settings: state.settings.relay.clone(),
                metrics: state.metrics.clone(),
                health,
            };
            (stop, tokio::spawn(relay.run(stopped)))
        });
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let app = router(state.clone());
        let http = tokio::spawn(http_server::serve(listener, app, limits, rx));
        tracing::info!(%addr, "FreshPlan Leads listening");
        Ok(Server {
            addr,
            state,
            shutdown: Some(tx),
            http: Some(http),
            background,
            followup_tasks,
            followup_stop,
            relay,
        })
    }

    /// Base URL, e.g. `http://127.0.0.1:8080`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting requests, lets open ones finish, stops background work.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        // Safe to abort at any await: an unfinished transaction rolls back, a mail whose
        // outcome was not recorded is taken up again when its claim expires.
        self.followup_stop.notify_waiters();
        for t in self.followup_tasks.drain(..) {
            t.abort();
            let _ = t.await;
        }
        if let Some((stop, task)) = self.relay.take() {
            let _ = stop.send(true);
            let _ = task.await;
        }
        self.background.stop().await;
        if let Some(h) = self.http.take() {
            // The loop itself bounds the wait for open connections (SSE streams end when the
            // hub closes them above).
            let _ = h.await;
        }
        self.state.pool.close().await;
        self.state.probe.0.close().await;
    }
}
