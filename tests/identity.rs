//! Identity: the user table is the authority on who a token's `sub` is (unknown, deactivated,
//! role or territory disagreeing → 401), the token's own claims (aud, nbf, iss, maximum
//! lifetime), streams that end at `exp`, on deactivation and beyond the per-user limit, viewers'
//! aggregate frames, a demo that is safe by construction and the login page's escaping.
//! One test per finding of the trust issue, each named for its rule.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use freshplan::auth::jwt::Authenticator;
use freshplan::config::JwtSettings;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// An HS256 token with the test secret and exactly these claims.
fn sign(claims: Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap()
}

/// Claims of a well-formed token for `sales-de-1` valid for an hour.
fn sales_de_1() -> Value {
    json!({"sub": "sales-de-1", "roles": ["sales"], "territory": "DE", "exp": now() + 3600})
}

fn with(mut claims: Value, key: &str, value: Value) -> String {
    claims[key] = value;
    sign(claims)
}

async fn get_leads(app: &TestApp, token: &str) -> reqwest::Response {
    app.client
        .get(format!("{}/api/leads", app.url))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

async fn post_lead(app: &TestApp, token: &str, body: Value) -> reqwest::Response {
    app.client
        .post(format!("{}/api/leads", app.url))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// A 401 problem that does not tell the caller why.
async fn assert_refused(r: reqwest::Response, what: &str) {
    assert_eq!(r.status(), 401, "{what}");
    let body = r.text().await.unwrap().to_lowercase();
    for reason in [
        "deactivated",
        "unknown user",
        "disagrees",
        "audience",
        "issuer",
    ] {
        assert!(
            !body.contains(reason),
            "the answer names the reason: {body}"
        );
    }
}

fn freshplan() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_freshplan"));
    cmd.env_remove("DATABASE_URL")
        .env_remove("FRESHPLAN_AUTH_JWT_SECRET")
        .env("RUST_LOG", "warn");
    cmd
}

/// `freshplan users …` against the test database; panics unless it succeeds.
fn users_cli(db: &TestDb, args: &[&str]) -> String {
    let out = freshplan()
        .arg("users")
        .args(args)
        .env("DATABASE_URL", db.app_url())
        .env("FRESHPLAN_ADMIN_DATABASE_URL", admin_url())
        .env("LOGNAME", "ops-anna")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "users {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

// ---- The user table is the authority ------------------------------------------------------

#[tokio::test]
async fn a_role_claim_that_disagrees_with_the_user_row_is_refused() {
    let app = TestApp::spawn().await;
    app.create_lead("sales-at-1", TestApp::lead_body("Wiener Beisl"))
        .await;
    // A token for sales-de-1 carrying role admin would read every territory.
    let forged = with(sales_de_1(), "roles", json!(["sales", "admin"]));
    assert_refused(
        get_leads(&app, &forged).await,
        "role admin for a sales user",
    )
    .await;
    let lower = with(sales_de_1(), "roles", json!(["viewer"]));
    assert_refused(
        get_leads(&app, &lower).await,
        "role viewer for a sales user",
    )
    .await;
    assert_eq!(get_leads(&app, &sign(sales_de_1())).await.status(), 200);
}

#[tokio::test]
async fn an_unknown_sub_is_refused_and_creates_nothing() {
    let app = TestApp::spawn().await;
    let ghost = with(sales_de_1(), "sub", json!("ghost-1"));
    assert_refused(
        post_lead(&app, &ghost, TestApp::lead_body("Geisterhaus")).await,
        "unknown sub",
    )
    .await;
    assert_refused(get_leads(&app, &ghost).await, "unknown sub reads").await;
    assert_eq!(app.count("SELECT count(*) FROM leads").await, 0);
    assert_eq!(app.count("SELECT count(*) FROM outbox").await, 0);
}

#[tokio::test]
async fn a_territory_claim_that_disagrees_with_the_user_row_is_refused() {
    let app = TestApp::spawn().await;
    let at = with(sales_de_1(), "territory", json!("AT"));
    assert_refused(
        post_lead(&app, &at, TestApp::lead_body("Alpenhof")).await,
        "DE user claiming AT",
    )
    .await;
    assert_eq!(
        app.count("SELECT count(*) FROM leads WHERE territory = 'AT'")
            .await,
        0
    );
    // The same user with the territory of their row creates a DE lead.
    let r = post_lead(&app, &sign(sales_de_1()), TestApp::lead_body("Gasthof")).await;
    assert_eq!(r.status(), 201);
    assert_eq!(r.json::<Value>().await.unwrap()["territory"], "DE");
}

#[tokio::test]
async fn a_deactivated_user_is_refused_and_their_open_stream_ends() {
    let app = TestApp::spawn_with(&[("FRESHPLAN_AUTH_USERS_REFRESH_SECONDS", "1")]).await;
    let token = app.token_for("sales-de-2");
    let mut stream = app.sse_with_token(&token, None).await;
    let mut other = app.sse("sales-de-1", None).await;
    assert_eq!(get_leads(&app, &token).await.status(), 200);

    let out = users_cli(&app.db, &["deactivate", "sales-de-2"]);
    assert!(out.contains("deactivated"), "{out}");

    // The stream ends with reauth (the service learns it from the database within the interval).
    let got = stream.until("reauth", |e| e.event == "reauth").await;
    assert_eq!(got.len(), 1, "nothing but the end: {got:?}");
    assert!(stream.next(PATIENCE).await.is_none(), "the stream ended");
    let r = get_leads(&app, &token).await;
    assert_refused(r, "deactivated user").await;
    // Other users' streams go on.
    app.create_lead("sales-de-1", TestApp::lead_body("Weiter"))
        .await;
    assert_eq!(
        other.next(PATIENCE).await.expect("still open").event,
        "dashboard.lead_created"
    );
    // The change is audited with the operator's name.
    assert_eq!(
        app.count(
            "SELECT count(*) FROM audit_log WHERE action = 'user.deactivated' \
             AND entity_type = 'user' AND entity_id = 'sales-de-2' AND actor_user_id = 'cli:ops-anna'"
        )
        .await,
        1
    );
}

#[tokio::test]
async fn users_are_added_changed_and_listed_through_the_admin_url_and_audited() {
    let app = TestApp::spawn_with(&[("FRESHPLAN_AUTH_USERS_REFRESH_SECONDS", "1")]).await;
    let claims =
        json!({"sub": "k-user-1", "roles": ["Sales"], "territory": "CH", "exp": now() + 3600});
    assert_refused(
        get_leads(&app, &sign(claims.clone())).await,
        "not yet a user",
    )
    .await;
    let out = users_cli(
        &app.db,
        &[
            "add",
            "k-user-1",
            "--name",
            "Kim Keller",
            "--role",
            "sales",
            "--territory",
            "ch",
        ],
    );
    assert!(out.contains("added user k-user-1"), "{out}");
    assert_eq!(
        get_leads(&app, &sign(claims.clone())).await.status(),
        200,
        "an added user is admitted at once"
    );
    let list = users_cli(&app.db, &["list"]);
    assert!(
        list.contains("k-user-1\tKim Keller\tsales\tCH\ttrue"),
        "{list}"
    );
    users_cli(&app.db, &["set", "k-user-1", "--role", "viewer"]);
    wait_until(PATIENCE, "the old role is refused", || async {
        get_leads(&app, &sign(claims.clone())).await.status() == 401
    })
    .await;
    let viewer = with(claims.clone(), "roles", json!(["viewer"]));
    let r = app
        .client
        .get(format!("{}/api/me", app.url))
        .bearer_auth(&viewer)
        .send()
        .await
        .unwrap();
    let me: Value = r.json().await.unwrap();
    assert_eq!(
        (me["role"].as_str(), me["name"].as_str()),
        (Some("viewer"), Some("Kim Keller"))
    );
    assert_eq!(
        app.count(
            "SELECT count(*) FROM audit_log WHERE entity_type = 'user' AND entity_id = 'k-user-1'"
        )
        .await,
        2
    );
    // Duplicates, the system role and unknown users are refused.
    let fails = |args: &[&str]| {
        !freshplan()
            .arg("users")
            .args(args)
            .env("DATABASE_URL", app.db.app_url())
            .env("FRESHPLAN_ADMIN_DATABASE_URL", admin_url())
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(fails(&[
        "add",
        "k-user-1",
        "--name",
        "x",
        "--role",
        "sales",
        "--territory",
        "DE"
    ]));
    assert!(fails(&[
        "add",
        "k-2",
        "--name",
        "x",
        "--role",
        "system",
        "--territory",
        "DE"
    ]));
    assert!(fails(&["deactivate", "nobody"]));
}

// ---- The token's own claims -----------------------------------------------------------------

#[tokio::test]
async fn a_configured_audience_is_required() {
    let app = TestApp::spawn_with(&[("FRESHPLAN_AUTH_JWT_AUDIENCE", "freshplan-leads")]).await;
    assert_refused(get_leads(&app, &sign(sales_de_1())).await, "no aud").await;
    let other = with(sales_de_1(), "aud", json!("other-client"));
    assert_refused(get_leads(&app, &other).await, "other aud").await;
    let ok = with(sales_de_1(), "aud", json!(["account", "freshplan-leads"]));
    assert_eq!(get_leads(&app, &ok).await.status(), 200);
}

#[tokio::test]
async fn a_token_not_yet_valid_by_nbf_is_refused() {
    let app = TestApp::spawn().await;
    let early = with(sales_de_1(), "nbf", json!(now() + 600));
    assert_refused(get_leads(&app, &early).await, "nbf in the future").await;
    let valid = with(sales_de_1(), "nbf", json!(now() - 5));
    assert_eq!(get_leads(&app, &valid).await.status(), 200);
}

#[tokio::test]
async fn an_issuer_is_required_with_a_public_key_or_jwks_and_then_in_every_token() {
    // Configuration: a public key or JWKS without an issuer is refused, naming the key.
    let db = TestDb {
        name: "unused".into(),
    };
    for key in [
        "FRESHPLAN_AUTH_JWT_PUBLIC_KEY_FILE",
        "FRESHPLAN_AUTH_JWT_JWKS_FILE",
    ] {
        let vars = [
            ("DATABASE_URL", db.app_url()),
            (key, "/etc/freshplan/idp.pem".to_string()),
        ];
        let err = freshplan::config::Settings::load_with(None, |k| {
            vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
        })
        .expect_err("a key without an issuer");
        assert!(
            err.to_string().contains("freshplan.auth.jwt.issuer"),
            "{err}"
        );
        let settings = JwtSettings {
            public_key_file: Some("/etc/freshplan/idp.pem".into()),
            ..Default::default()
        };
        let err = Authenticator::from_settings(&settings, false)
            .err()
            .expect("library refuses too");
        assert!(err.to_string().contains("issuer"), "{err}");
    }
    // A configured issuer is required in the token, not only checked when present.
    let app =
        TestApp::spawn_with(&[("FRESHPLAN_AUTH_JWT_ISSUER", "https://idp.example/realms/fp")])
            .await;
    assert_refused(get_leads(&app, &sign(sales_de_1())).await, "no iss").await;
    let wrong = with(sales_de_1(), "iss", json!("https://evil.example"));
    assert_refused(get_leads(&app, &wrong).await, "wrong iss").await;
    let ok = with(sales_de_1(), "iss", json!("https://idp.example/realms/fp"));
    assert_eq!(get_leads(&app, &ok).await.status(), 200);
}

#[tokio::test]
async fn a_token_expiring_beyond_the_maximum_lifetime_is_refused() {
    let app = TestApp::spawn_with(&[("FRESHPLAN_AUTH_JWT_MAX_LIFETIME_SECONDS", "3600")]).await;
    // Year 9999.
    let forever = with(sales_de_1(), "exp", json!(253_402_300_799u64));
    assert_refused(get_leads(&app, &forever).await, "exp in year 9999").await;
    let too_long = with(sales_de_1(), "exp", json!(now() + 3600 + 120));
    assert_refused(get_leads(&app, &too_long).await, "beyond the maximum").await;
    let fine = with(sales_de_1(), "exp", json!(now() + 3000));
    assert_eq!(get_leads(&app, &fine).await.status(), 200);
}

// ---- Streams ----------------------------------------------------------------------------------

#[tokio::test]
async fn the_stream_ends_with_reauth_at_the_tokens_expiry() {
    let app = TestApp::spawn().await;
    let exp = now() + 4;
    let token = with(sales_de_1(), "exp", json!(exp));
    let mut stream = app.sse_with_token(&token, None).await;
    // Live until then.
    app.create_lead("sales-de-1", TestApp::lead_body("Noch gültig"))
        .await;
    let got = stream.until("reauth", |e| e.event == "reauth").await;
    let at = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    assert_eq!(got.first().unwrap().event, "dashboard.lead_created");
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(
        at >= Duration::from_secs(exp) - Duration::from_millis(50),
        "reauth came {:?} before exp",
        Duration::from_secs(exp).saturating_sub(at)
    );
    assert!(
        at <= Duration::from_secs(exp + 3),
        "reauth came {:?} after exp",
        at.saturating_sub(Duration::from_secs(exp))
    );
    assert_eq!(sse_json(got.last().unwrap())["reason"], "token expired");
    assert!(stream.next(PATIENCE).await.is_none(), "the stream ended");
    // REST agrees at the same moment.
    assert_refused(get_leads(&app, &token).await, "expired").await;
}

#[tokio::test]
async fn a_sixth_stream_of_one_user_closes_the_oldest_with_replaced() {
    let app = TestApp::spawn().await;
    let mut streams = Vec::new();
    for _ in 0..5 {
        streams.push(app.sse("sales-de-1", None).await);
    }
    let mut neighbour = app.sse("sales-de-2", None).await;
    streams.push(app.sse("sales-de-1", None).await);
    let oldest = &mut streams[0];
    let got = oldest.until("replaced", |e| e.event == "replaced").await;
    assert_eq!(got.len(), 1);
    assert!(oldest.next(PATIENCE).await.is_none(), "the oldest ended");
    assert_eq!(
        app.metric("freshplan_dashboard_active_widgets{type=\"sse\"}")
            .await,
        6.0,
        "five of sales-de-1, one of sales-de-2"
    );
    app.create_lead("sales-de-1", TestApp::lead_body("Für alle fünf"))
        .await;
    for s in streams.iter_mut().skip(1) {
        let ev = s.next(PATIENCE).await.expect("the five newest stay open");
        assert_eq!(sse_json(&ev)["data"]["companyName"], "Für alle fünf");
    }
    app.create_lead("sales-de-2", TestApp::lead_body("Nachbar"))
        .await;
    assert_eq!(
        sse_json(&neighbour.next(PATIENCE).await.unwrap())["data"]["companyName"],
        "Nachbar",
        "another user's stream is untouched"
    );
}

#[tokio::test]
async fn viewer_frames_and_event_fetches_carry_no_company_name_or_lead_id() {
    let app = TestApp::spawn().await;
    let mut viewer = app.sse("viewer-de", None).await;
    let lead = app
        .create_lead("sales-de-1", TestApp::lead_body("Geheimrezept GmbH"))
        .await;
    let id = lead["id"].as_str().unwrap().to_string();
    let version = lead["version"].as_i64().unwrap();
    let r = app
        .patch("sales-de-1", &id, version, json!({"status": "ACTIVE"}))
        .await;
    assert_eq!(r.status(), 200);
    let frames = viewer
        .until("the status change", |e| {
            e.event == "dashboard.lead_status_changed"
        })
        .await;
    assert_eq!(frames.len(), 2);
    for f in &frames {
        assert!(!f.data.contains("Geheimrezept"), "{}", f.data);
        assert!(!f.data.contains(&id), "{}", f.data);
        assert!(!f.data.contains("sales-de-1"), "{}", f.data);
        let env = sse_json(f);
        assert_cloudevent(&env);
        assert_eq!(env["data"]["territory"], "DE");
    }
    let changed = sse_json(&frames[1]);
    assert_eq!(
        (
            changed["data"]["oldStatus"].as_str(),
            changed["data"]["newStatus"].as_str()
        ),
        (Some("REGISTERED"), Some("ACTIVE"))
    );
    // Fetching the event by reference: aggregate for the viewer, full for the manager.
    let path = format!(
        "/api/events/{}",
        changed["idempotencykey"].as_str().unwrap()
    );
    let r = app.get("viewer-de", &path).await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(
        !text.contains("Geheimrezept") && !text.contains(&id),
        "{text}"
    );
    let full = app.get_json("manager-de", &path).await;
    assert_eq!(full["data"]["companyName"], "Geheimrezept GmbH");
    assert_eq!(full["subject"], id.as_str());
    // Replay after Last-Event-ID is aggregate too.
    let mut resumed = app.sse("viewer-de", Some(0)).await;
    let replayed = resumed
        .until("replayed change", |e| {
            e.event == "dashboard.lead_status_changed"
        })
        .await;
    assert!(replayed
        .iter()
        .all(|f| !f.data.contains("Geheimrezept") && !f.data.contains(&id)));
}

// ---- Demo safe by construction -------------------------------------------------------------

/// Runs `freshplan serve …` with `env`; it must exit (not serve) within 60 s. Returns stderr.
fn serve_must_refuse(args: &[&str], env: &[(&str, &str)], dir: &std::path::Path) -> String {
    let mut cmd = freshplan();
    cmd.arg("serve")
        .args(args)
        .env("FRESHPLAN_DATA_DIR", dir)
        // Nowhere to connect: a service that does not refuse fails later, never serves.
        .env(
            "DATABASE_URL",
            "postgres://freshplan_app@127.0.0.1:1/freshplan",
        )
        .env(
            "FRESHPLAN_ADMIN_DATABASE_URL",
            "postgres://postgres@127.0.0.1:1/postgres",
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("serve {args:?} kept running");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn serve_without_demo_refuses_dev_login_and_unauthenticated_publishers_and_demo_refuses_remote_binds(
) {
    let dir = tempfile::tempdir().unwrap();
    let keys = [
        ("FRESHPLAN_AUTH_JWT_SECRET", JWT_SECRET),
        ("FRESHPLAN_PII_KEYS", KEY_1),
        ("FRESHPLAN_PII_LOOKUP_KEY", LOOKUP_KEY),
    ];
    for (key, named) in [
        (
            "FRESHPLAN_AUTH_DEV_LOGIN_ENABLED",
            "freshplan.auth.dev-login.enabled",
        ),
        (
            "FRESHPLAN_SECURITY_ALLOW_UNAUTHENTICATED_PUBLISHER",
            "freshplan.security.allow-unauthenticated-publisher",
        ),
    ] {
        let mut env = keys.to_vec();
        env.push((key, "true"));
        let err = serve_must_refuse(&["--bind", "127.0.0.1:0"], &env, dir.path());
        assert!(err.contains(named) && err.contains("--demo"), "{err}");
    }
    let err = serve_must_refuse(&["--demo", "--bind", "0.0.0.0:0"], &[], dir.path());
    assert!(err.contains("not a loopback address"), "{err}");
    assert!(
        !dir.path().join("pgdata").exists(),
        "refused before starting anything"
    );
}

#[test]
fn the_demo_secret_is_random_per_data_folder_and_token_uses_it() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let token = |dir: &std::path::Path| {
        let out = freshplan()
            .args([
                "token",
                "--user",
                "admin",
                "--role",
                "admin",
                "--territory",
                "DE",
            ])
            .env("FRESHPLAN_DATA_DIR", dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let (ta, tb) = (token(a.path()), token(b.path()));
    let secret = |dir: &std::path::Path| {
        let path = dir.join(freshplan::auth::jwt::DEMO_SECRET_FILE);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path)
                .expect("the data folder has its secret")
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        std::fs::read_to_string(path).unwrap().trim().to_string()
    };
    let (sa, sb) = (secret(a.path()), secret(b.path()));
    assert_ne!(sa, sb, "random per data folder");
    assert!(sa.len() >= 32);
    let verifier = |s: &str| {
        Authenticator::from_settings(
            &JwtSettings {
                secret: s.to_string(),
                ..Default::default()
            },
            false,
        )
        .unwrap()
    };
    assert!(
        verifier(&sa).verify(&ta).is_ok(),
        "token signs with its folder's secret"
    );
    assert!(verifier(&sb).verify(&ta).is_err());
    assert!(verifier(&sb).verify(&tb).is_ok());
    assert_eq!(secret(a.path()), sa, "the secret stays");
    assert!(verifier(&sa).verify(&token(a.path())).is_ok());
    // No constant secret anywhere in the source.
    let jwt_rs = include_str!("../src/auth/jwt.rs");
    assert!(!jwt_rs.contains("freshplan-development-secret"));
}

// ---- Login page -------------------------------------------------------------------------------

#[tokio::test]
async fn the_login_page_escapes_html_from_the_user_table() {
    let app = TestApp::spawn_with(&[("FRESHPLAN_AUTH_DEV_LOGIN_ENABLED", "true")]).await;
    users_cli(
        &app.db,
        &[
            "add",
            "x\"><img src=x onerror=alert(1)>",
            "--name",
            "<script>alert('pwned')</script> & Co",
            "--role",
            "viewer",
            "--territory",
            "DE",
        ],
    );
    users_cli(
        &app.db,
        &[
            "add",
            "gone",
            "--name",
            "Gone Gerda",
            "--role",
            "viewer",
            "--territory",
            "DE",
        ],
    );
    users_cli(&app.db, &["deactivate", "gone"]);
    let page = app
        .client
        .get(format!("{}/login", app.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!page.contains("<script>alert"), "{page}");
    assert!(!page.contains("<img src=x"), "{page}");
    assert!(
        page.contains("&lt;script&gt;alert(&#39;pwned&#39;)&lt;/script&gt; &amp; Co"),
        "{page}"
    );
    assert!(
        page.contains("data-user=\"x&quot;&gt;&lt;img src=x onerror=alert(1)&gt;\""),
        "{page}"
    );
    assert!(
        !page.contains("Gone Gerda"),
        "deactivated users are not offered"
    );
    let r = app
        .client
        .post(format!("{}/api/dev/login", app.url))
        .json(&json!({"userId": "gone"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422, "nor logged in");
}
