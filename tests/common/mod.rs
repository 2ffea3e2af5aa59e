//! Test harness: every test gets its own database, migrated by the real `migrate` code, and a
//! server on 127.0.0.1:0 whose pool logs in as the application role (so row-level security
//! applies). Nothing is faked: real PostgreSQL, real HTTP.
#![allow(dead_code)]

pub mod nats;

use std::collections::HashMap;

use freshplan::app::{AppState, Server};
use freshplan::auth::jwt::Authenticator;
use freshplan::auth::{Principal, Role};
use freshplan::config::Settings;
use freshplan::db::bootstrap;
use freshplan::events::envelope;
use freshplan::pii::Vault;
use freshplan::territory::Territory;
use sqlx::{Connection, PgConnection, PgPool};

pub const JWT_SECRET: &str = "test-secret-test-secret-test-secret-0123456789";
/// Two PII keys (base64 of 32 bytes each) and a lookup key.
pub const KEY_1: &str = "k1:AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
pub const KEY_2: &str = "k2:AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=";
pub const LOOKUP_KEY: &str = "CQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk=";

/// Administrator URL of the PostgreSQL server the tests use.
pub fn admin_url() -> String {
    std::env::var("FRESHPLAN_TEST_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

fn db_url(user: &str, db: &str) -> String {
    let admin = admin_url();
    let host = admin
        .split_once('@')
        .map(|(_, h)| h)
        .unwrap_or("127.0.0.1:5432/postgres");
    let host = host.rsplit_once('/').map(|(h, _)| h).unwrap_or(host);
    format!("postgres://{user}@{host}/{db}")
}

/// A migrated database of its own.
#[derive(Clone)]
pub struct TestDb {
    pub name: String,
}

impl TestDb {
    /// Creates and migrates a fresh database.
    pub async fn create() -> TestDb {
        let name = format!(
            "fp_test_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..16]
        );
        let target =
            bootstrap::Target::from_url(&db_url("freshplan_app", &name), "freshplan_owner")
                .unwrap();
        bootstrap::migrate(&admin_url(), &target)
            .await
            .expect("migrate test database");
        TestDb { name }
    }

    /// Runtime URL (application role).
    pub fn app_url(&self) -> String {
        db_url("freshplan_app", &self.name)
    }

    /// A superuser connection to this database, for inspecting raw rows and killing backends.
    pub async fn superuser(&self) -> PgConnection {
        PgConnection::connect(&db_url("postgres", &self.name))
            .await
            .expect("superuser connection")
    }

    /// A connection of the application role acting as the system principal for its session,
    /// as the listener's scans use (`outbox::fetch_*`).
    pub async fn system_pool(&self) -> freshplan::db::SystemPool {
        let options: sqlx::postgres::PgConnectOptions = self.app_url().parse().unwrap();
        freshplan::db::SystemPool::connect(options)
            .await
            .expect("system pool")
    }

    /// A pool of the application role with no identity set.
    pub async fn app_pool(&self) -> PgPool {
        freshplan::db::connect(&self.app_url(), 4, "freshplan-test")
            .await
            .expect("app pool")
    }

    /// Settings for an instance on this database; `env` overrides keys by their env names.
    pub fn settings(&self, env: &[(&str, &str)]) -> Settings {
        let mut vars: HashMap<String, String> = HashMap::from([
            ("DATABASE_URL".into(), self.app_url()),
            ("FRESHPLAN_ADMIN_DATABASE_URL".into(), admin_url()),
            ("FRESHPLAN_AUTH_JWT_SECRET".into(), JWT_SECRET.into()),
            ("FRESHPLAN_PII_KEYS".into(), KEY_1.into()),
            ("FRESHPLAN_PII_LOOKUP_KEY".into(), LOOKUP_KEY.into()),
            ("FRESHPLAN_EVENTS_POLL_INTERVAL_MS".into(), "200".into()),
            ("FRESHPLAN_DATABASE_POOL_SIZE".into(), "8".into()),
        ]);
        for (k, v) in env {
            vars.insert(k.to_string(), v.to_string());
        }
        Settings::load_with(None, |k| vars.get(k).cloned()).expect("test settings")
    }
}

/// A running instance plus helpers to call it.
pub struct TestApp {
    pub db: TestDb,
    pub server: Option<Server>,
    pub url: String,
    pub client: reqwest::Client,
    env: Vec<(String, String)>,
}

impl TestApp {
    /// A fresh database with the demo users, and one instance on it.
    pub async fn spawn() -> TestApp {
        Self::spawn_with(&[]).await
    }

    /// Same, with configuration overrides (env names, e.g. `FEATURES_EVENTS_CROSS_MODULE_ENABLED`).
    pub async fn spawn_with(env: &[(&str, &str)]) -> TestApp {
        let db = TestDb::create().await;
        let app = Self::on(db, env).await;
        let vault = app.vault();
        freshplan::demo::seed(&app.state().pool, &vault, 0)
            .await
            .expect("seed users");
        app
    }

    /// An instance on an existing database.
    pub async fn on(db: TestDb, env: &[(&str, &str)]) -> TestApp {
        let server = start(&db, env).await;
        TestApp {
            url: server.url(),
            server: Some(server),
            db,
            client: reqwest::Client::new(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    /// Another instance sharing this database (as a second pod would).
    pub async fn second_instance(&self) -> TestApp {
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        Self::on(self.db.clone(), &env).await
    }

    /// Stops the instance (graceful) and starts a new one on the same database, optionally
    /// with other settings.
    pub async fn restart(&mut self, env: Option<&[(&str, &str)]>) {
        if let Some(s) = self.server.take() {
            s.stop().await;
        }
        if let Some(env) = env {
            self.env = env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        }
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let server = start(&self.db, &env).await;
        self.url = server.url();
        self.server = Some(server);
    }

    /// Stops the instance.
    pub async fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            s.stop().await;
        }
    }

    /// The running instance's state.
    pub fn state(&self) -> &AppState {
        &self.server.as_ref().expect("server running").state
    }

    /// A vault with the test keys.
    pub fn vault(&self) -> Vault {
        vault_from(&self.db.settings(&[]))
    }

    /// A bearer token for any principal.
    pub fn token(&self, user: &str, role: Role, territory: Territory) -> String {
        let auth = Authenticator::from_settings(&self.db.settings(&[]).jwt, false).unwrap();
        auth.mint(
            &Principal {
                user_id: user.into(),
                name: user.into(),
                role,
                territory,
            },
            3600,
        )
        .unwrap()
    }

    /// A bearer token for a demo user id (`sales-de-1`, `manager-at`, `admin`, …).
    pub fn token_for(&self, demo_user: &str) -> String {
        let p = freshplan::demo::principal(demo_user).expect("demo user");
        self.token(&p.user_id, p.role, p.territory)
    }

    /// `Authorization` header value for a demo user.
    pub fn bearer(&self, demo_user: &str) -> String {
        format!("Bearer {}", self.token_for(demo_user))
    }

    /// POST /api/leads as a demo user; returns the created lead JSON (panics unless 201).
    pub async fn create_lead(&self, user: &str, body: serde_json::Value) -> serde_json::Value {
        let r = self
            .client
            .post(format!("{}/api/leads", self.url))
            .header("Authorization", self.bearer(user))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let json: serde_json::Value = r.json().await.unwrap();
        assert_eq!(status, 201, "create lead failed: {json}");
        json
    }

    /// A minimal valid lead body.
    pub fn lead_body(company: &str) -> serde_json::Value {
        serde_json::json!({"companyName": company, "businessType": "RESTAURANT", "source": "MESSE"})
    }

    /// GET with a demo user's token.
    pub async fn get(&self, user: &str, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{}", self.url, path))
            .header("Authorization", self.bearer(user))
            .send()
            .await
            .unwrap()
    }

    /// GET as a demo user and parse the JSON body (whatever the status).
    pub async fn get_json(&self, user: &str, path: &str) -> serde_json::Value {
        self.get(user, path).await.json().await.unwrap()
    }

    /// GET without credentials (public endpoints) and parse the JSON body.
    pub async fn public_json(&self, path: &str) -> serde_json::Value {
        let r = self
            .client
            .get(format!("{}{}", self.url, path))
            .send()
            .await
            .unwrap();
        r.json().await.unwrap()
    }

    /// PATCH a lead with If-Match.
    pub async fn patch(
        &self,
        user: &str,
        id: &str,
        version: i64,
        body: serde_json::Value,
    ) -> reqwest::Response {
        self.client
            .patch(format!("{}/api/leads/{id}", self.url))
            .header("Authorization", self.bearer(user))
            .header("If-Match", format!("\"{version}\""))
            .json(&body)
            .send()
            .await
            .unwrap()
    }
}

/// Vault from settings (the test keys).
pub fn vault_from(settings: &Settings) -> Vault {
    Vault::from_settings(&settings.pii)
        .unwrap()
        .expect("test keys configured")
}

async fn start(db: &TestDb, env: &[(&str, &str)]) -> Server {
    start_with_limits(db, env, freshplan::http_server::Limits::default()).await
}

/// An instance on `db` with connection limits of its own.
pub async fn start_with_limits(
    db: &TestDb,
    env: &[(&str, &str)],
    limits: freshplan::http_server::Limits,
) -> Server {
    let settings = db.settings(env);
    let vault = vault_from(&settings);
    let auth = Authenticator::from_settings(&settings.jwt, false).unwrap();
    let state = AppState::connect(settings, auth, vault)
        .await
        .expect("connect as application role");
    Server::start_with(state, "127.0.0.1:0", limits)
        .await
        .expect("server starts")
}

// ---- Event path helpers ------------------------------------------------------------------

/// Polls `check` every 50 ms until it returns true; panics with `what` after `within`.
pub async fn wait_until<F, Fut>(within: std::time::Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {within:?} waiting for: {what}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The usual patience of event tests.
pub const PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

type SseInner = std::pin::Pin<
    Box<
        dyn futures::Stream<
                Item = Result<
                    eventsource_stream::Event,
                    eventsource_stream::EventStreamError<reqwest::Error>,
                >,
            > + Send,
    >,
>;

/// An open `GET /api/cockpit/stream`.
pub struct Sse {
    inner: SseInner,
}

impl Sse {
    /// The next event, or None when none arrives within `within` (or the stream ended).
    pub async fn next(&mut self, within: std::time::Duration) -> Option<eventsource_stream::Event> {
        use futures::StreamExt;
        match tokio::time::timeout(within, self.inner.next()).await {
            Ok(Some(Ok(ev))) => Some(ev),
            Ok(Some(Err(e))) => panic!("SSE stream failed: {e}"),
            Ok(None) | Err(_) => None,
        }
    }

    /// Reads events until one satisfies `last`; returns all read (including that one).
    pub async fn until(
        &mut self,
        what: &str,
        last: impl Fn(&eventsource_stream::Event) -> bool,
    ) -> Vec<eventsource_stream::Event> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let Some(ev) = self.next(left).await else {
                panic!(
                    "no SSE event `{what}` within {PATIENCE:?}; got {:?}",
                    seen.iter()
                        .map(|e: &eventsource_stream::Event| (&e.event, &e.id))
                        .collect::<Vec<_>>()
                );
            };
            let done = last(&ev);
            seen.push(ev);
            if done {
                return seen;
            }
        }
    }
}

/// The JSON `data` of an SSE event.
pub fn sse_json(ev: &eventsource_stream::Event) -> serde_json::Value {
    serde_json::from_str(&ev.data)
        .unwrap_or_else(|e| panic!("SSE data is not JSON ({e}): {}", ev.data))
}

/// Validates a JSON value against the CloudEvents 1.0 schema (tests/fixtures).
pub fn assert_cloudevent(envelope: &serde_json::Value) {
    static VALIDATOR: std::sync::OnceLock<jsonschema::Validator> = std::sync::OnceLock::new();
    let validator = VALIDATOR.get_or_init(|| {
        let text = include_str!("../fixtures/cloudevents-1.0.schema.json");
        let schema: serde_json::Value = serde_json::from_str(text).expect("schema is JSON");
        jsonschema::validator_for(&schema).expect("schema compiles")
    });
    if let Err(e) = validator.validate(envelope) {
        panic!("not a CloudEvents 1.0 envelope ({e}): {envelope}");
    }
    assert_eq!(envelope["specversion"], "1.0");
    assert_eq!(envelope["source"], "lead-management");
}

impl TestApp {
    /// Opens the SSE stream as a demo user, optionally resuming after `last_event_id`.
    pub async fn sse(&self, user: &str, last_event_id: Option<i64>) -> Sse {
        self.sse_with_token(&self.token_for(user), last_event_id)
            .await
    }

    /// Opens the SSE stream with a bearer token of its own.
    pub async fn sse_with_token(&self, token: &str, last_event_id: Option<i64>) -> Sse {
        use eventsource_stream::Eventsource;
        let mut req = self
            .client
            .get(format!("{}/api/cockpit/stream", self.url))
            .header("Authorization", format!("Bearer {token}"));
        if let Some(id) = last_event_id {
            req = req.header("Last-Event-ID", id.to_string());
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 200, "SSE stream refused");
        let ct = r
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        assert!(ct.starts_with("text/event-stream"), "content type {ct}");
        Sse {
            inner: Box::pin(r.bytes_stream().eventsource()),
        }
    }

    /// The text of /q/metrics.
    pub async fn metrics_text(&self) -> String {
        let r = self
            .client
            .get(format!("{}/q/metrics", self.url))
            .send()
            .await
            .unwrap();
        r.text().await.unwrap()
    }

    /// The value of one sample of /q/metrics (`name{labels}` exactly as exposed), 0 when absent.
    pub async fn metric(&self, sample: &str) -> f64 {
        let text = self.metrics_text().await;
        metric_in(&text, sample)
    }

    /// A scalar from a query run as superuser (bypasses RLS: for inspection only).
    pub async fn count(&self, sql: &str) -> i64 {
        let mut c = self.db.superuser().await;
        let n: Option<i64> = sqlx::query_scalar(sql).fetch_one(&mut c).await.unwrap();
        n.unwrap_or(0)
    }

    /// Sum of `cockpit_daily_events.events`.
    pub async fn projected_events(&self) -> i64 {
        self.count("SELECT sum(events)::bigint FROM cockpit_daily_events")
            .await
    }
}

/// Value of a sample in Prometheus text, 0 when absent.
pub fn metric_in(text: &str, sample: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            l.strip_prefix(sample)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// `freshplan_events_consumed_total` sample name.
pub fn consumed(event_type: &str, result: &str) -> String {
    format!("freshplan_events_consumed_total{{event_type=\"{event_type}\",module=\"lead-management\",result=\"{result}\"}}")
}

/// An activity event about a lead that does not exist, written straight into the outbox by a
/// test (as another writer on the same database would).
pub fn activity_event(owner: &str, territory: Territory) -> envelope::NewEvent {
    let lead = uuid::Uuid::now_v7();
    let now = envelope::micros(chrono::Utc::now());
    envelope::NewEvent::new(
        envelope::EventType::ActivityLogged,
        Some(lead),
        now,
        envelope::key_activity(uuid::Uuid::now_v7()),
        serde_json::json!({"leadId": lead, "activityType": "CALL", "ownerUserId": owner, "territory": territory,
               "userId": owner, "occurredAt": envelope::ts(now)}),
        envelope::Audience {
            territory,
            owner: Some(owner.into()),
            collaborators: vec![],
        },
    )
}

// ---- Databases on another server, or with an application role of their own (tests/faults.rs) --

/// `postgres://<user>@<host:port of admin>/<db>`.
pub fn url_on(admin: &str, user: &str, db: &str) -> String {
    let host = admin
        .split_once('@')
        .map(|(_, h)| h)
        .unwrap_or("127.0.0.1:5432/postgres");
    let host = host.rsplit_once('/').map(|(h, _)| h).unwrap_or(host);
    format!("postgres://{user}@{host}/{db}")
}

/// A migrated database on the server at `admin` whose application role is `app_role`: a private
/// cluster, or a role of its own whose connections a test may limit without touching other tests.
#[derive(Clone)]
pub struct OwnDb {
    pub admin: String,
    pub name: String,
    pub app_role: String,
}

impl OwnDb {
    /// Creates and migrates a fresh database (and the role, if missing) by the real `migrate`.
    pub async fn create(admin: &str, app_role: &str) -> OwnDb {
        let name = format!(
            "fp_test_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..16]
        );
        let target =
            bootstrap::Target::from_url(&url_on(admin, app_role, &name), "freshplan_owner")
                .unwrap();
        bootstrap::migrate(admin, &target)
            .await
            .expect("migrate own database");
        OwnDb {
            admin: admin.to_string(),
            name,
            app_role: app_role.to_string(),
        }
    }

    /// Runtime URL (the application role).
    pub fn app_url(&self) -> String {
        url_on(&self.admin, &self.app_role, &self.name)
    }

    /// A superuser connection to this database.
    pub async fn superuser(&self) -> PgConnection {
        PgConnection::connect(&url_on(&self.admin, "postgres", &self.name))
            .await
            .expect("superuser connection")
    }

    /// Settings for an instance on this database; `env` overrides keys by their env names.
    pub fn settings(&self, env: &[(&str, &str)]) -> Settings {
        let mut vars: HashMap<String, String> = HashMap::from([
            ("DATABASE_URL".into(), self.app_url()),
            ("FRESHPLAN_ADMIN_DATABASE_URL".into(), self.admin.clone()),
            ("FRESHPLAN_AUTH_JWT_SECRET".into(), JWT_SECRET.into()),
            ("FRESHPLAN_PII_KEYS".into(), KEY_1.into()),
            ("FRESHPLAN_PII_LOOKUP_KEY".into(), LOOKUP_KEY.into()),
            ("FRESHPLAN_EVENTS_POLL_INTERVAL_MS".into(), "200".into()),
            ("FRESHPLAN_DATABASE_POOL_SIZE".into(), "4".into()),
        ]);
        for (k, v) in env {
            vars.insert(k.to_string(), v.to_string());
        }
        Settings::load_with(None, |k| vars.get(k).cloned()).expect("test settings")
    }

    /// An instance on this database with the demo users seeded.
    pub async fn start(&self, env: &[(&str, &str)]) -> Server {
        let settings = self.settings(env);
        let vault = vault_from(&settings);
        let auth = Authenticator::from_settings(&settings.jwt, false).unwrap();
        let seed_vault = vault_from(&settings);
        let state = AppState::connect(settings, auth, vault)
            .await
            .expect("connect as application role");
        freshplan::demo::seed(&state.pool, &seed_vault, 0)
            .await
            .expect("seed users");
        Server::start(state, "127.0.0.1:0")
            .await
            .expect("server starts")
    }

    /// `Authorization` header value for a demo user.
    pub fn bearer(&self, demo_user: &str) -> String {
        let p = freshplan::demo::principal(demo_user).expect("demo user");
        let auth = Authenticator::from_settings(&self.settings(&[]).jwt, false).unwrap();
        format!("Bearer {}", auth.mint(&p, 3600).unwrap())
    }

    /// Drops the database and, unless it is the shared `freshplan_app`, the role (best effort).
    pub async fn drop_all(&self) {
        let Ok(mut c) = PgConnection::connect(&self.admin).await else {
            return;
        };
        let _ = sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&mut c)
        .await;
        if self.app_role != "freshplan_app" {
            let _ = sqlx::query(&format!("DROP ROLE IF EXISTS {}", self.app_role))
                .execute(&mut c)
                .await;
        }
    }
}
