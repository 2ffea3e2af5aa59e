//! The `freshplan` command line as an operator uses it: migrate (idempotent), seed, token,
//! configuration refusals, and `serve --demo` starting a private cluster where no server runs.

mod common;

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{admin_url, TestDb, KEY_1, LOOKUP_KEY};
use serde_json::Value;

fn freshplan() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_freshplan"));
    cmd.env_remove("DATABASE_URL").env("RUST_LOG", "warn");
    cmd
}

fn db_env(cmd: &mut Command, db_name: &str) {
    let app_url = admin_url().replace("postgres@", "freshplan_app@");
    let app_url = format!("{}/{db_name}", app_url.rsplit_once('/').unwrap().0);
    cmd.env("DATABASE_URL", app_url)
        .env("FRESHPLAN_ADMIN_DATABASE_URL", admin_url())
        .env("FRESHPLAN_PII_KEYS", KEY_1)
        .env("FRESHPLAN_PII_LOOKUP_KEY", LOOKUP_KEY);
}

#[tokio::test]
async fn migrate_creates_roles_and_schema_and_is_idempotent_then_seed_loads_demo_data_once() {
    let name = format!(
        "fp_test_cli_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let run = |args: &[&str]| {
        let mut cmd = freshplan();
        db_env(&mut cmd, &name);
        let out = cmd.args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    for _ in 0..2 {
        assert!(run(&["migrate"]).contains("is migrated"));
    }
    assert!(run(&["seed", "--demo", "--leads", "1200"]).contains("1200 leads"));
    assert!(
        run(&["seed", "--demo", "--leads", "1200"]).contains("0 leads"),
        "seeding twice adds nothing"
    );

    let db = TestDb { name };
    let mut conn = db.superuser().await;
    let (statuses, types, territories, oldest_days): (i64, i64, i64, f64) = sqlx::query_as(
        "SELECT count(DISTINCT status), count(DISTINCT business_type), count(DISTINCT territory), \
         (extract(epoch FROM now() - min(registered_at)) / 86400)::float8 FROM leads",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(statuses, 9);
    assert_eq!(types, 9);
    assert_eq!(territories, 3);
    assert!(oldest_days > 30.0 && oldest_days <= 60.0);
    let due_t3: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM leads WHERE status = 'ACTIVE' AND registered_at <= now() - interval '3 days' \
         AND email_consent AND NOT contact_blocked AND NOT clock_stopped AND t3_sent_at IS NULL",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert!(due_t3 > 10, "demo data has T+3 follow-ups due ({due_t3})");
    let users: i64 = sqlx::query_scalar("SELECT count(*) FROM users")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(users, 11);
    let roles: (bool, bool) = sqlx::query_as(
        "SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = 'freshplan_app'",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(roles, (false, false));
}

#[test]
fn token_prints_a_verifiable_development_token() {
    let out = freshplan()
        .args([
            "token",
            "--user",
            "sales-de-1",
            "--role",
            "SALES",
            "--territory",
            "de",
        ])
        .env("FRESHPLAN_AUTH_JWT_SECRET", common::JWT_SECRET)
        .output()
        .unwrap();
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let settings = TestDb { name: "x".into() }.settings(&[]);
    let auth = freshplan::auth::jwt::Authenticator::from_settings(&settings.jwt, false).unwrap();
    let p = auth.verify(&token).unwrap();
    assert_eq!(
        (p.user_id.as_str(), p.role.as_str(), p.territory.code()),
        ("sales-de-1", "sales", "DE")
    );
    let out = freshplan()
        .args([
            "token",
            "--user",
            "x",
            "--role",
            "system",
            "--territory",
            "DE",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success(), "no tokens for the system principal");
}

#[test]
fn serve_refuses_to_run_with_rls_disabled_or_a_misspelt_key_naming_the_key() {
    let out = freshplan()
        .args(["serve"])
        .env("FRESHPLAN_SECURITY_RLS_ENABLED", "false")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("freshplan.security.rls.enabled") && err.contains("cannot be turned off"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("freshplan.toml");
    std::fs::write(&file, "features.dashboard.lead-widget.enabeld = true\n").unwrap();
    let out = freshplan()
        .args(["serve", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("lead-widget.enabeld"));
}

#[tokio::test]
async fn serve_refuses_a_superuser_database_url_naming_the_superuser() {
    // A migrated database, so the start-up check gets past "schema is missing" to the role.
    let db = TestDb::create().await;
    let superuser_url = db.app_url().replace("freshplan_app@", "postgres@");
    let mut child = freshplan()
        .args(["serve", "--bind", "127.0.0.1:0"])
        .env("DATABASE_URL", &superuser_url)
        .env("FRESHPLAN_AUTH_JWT_SECRET", common::JWT_SECRET)
        .env("FRESHPLAN_PII_KEYS", KEY_1)
        .env("FRESHPLAN_PII_LOOKUP_KEY", LOOKUP_KEY)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A service that wrongly accepts the superuser would run on: stop it and fail, not hang.
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("serve kept running with a superuser DATABASE_URL");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("runtime role `postgres` is a superuser, which bypasses row-level security"),
        "{err}"
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn serve_demo_starts_a_private_cluster_when_nothing_answers_and_stops_it_on_shutdown() {
    let pg_port = free_port();
    let http_port = free_port();
    let dir = std::env::temp_dir().join(format!(
        "freshplan-embedded-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut child = freshplan()
        .args([
            "serve",
            "--demo",
            "--bind",
            &format!("127.0.0.1:{http_port}"),
        ])
        .env(
            "FRESHPLAN_ADMIN_DATABASE_URL",
            format!("postgres://postgres@127.0.0.1:{pg_port}/postgres"),
        )
        .env(
            "DATABASE_URL",
            format!("postgres://freshplan_app@127.0.0.1:{pg_port}/freshplan"),
        )
        .env("FRESHPLAN_DATA_DIR", &dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{http_port}");
    let started = Instant::now();
    let mut up = false;
    while started.elapsed() < Duration::from_secs(90) {
        if let Ok(r) = client.get(format!("{base}/q/health/live")).send().await {
            up = r.status() == 200;
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("serve --demo exited early ({status}): {err}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(up, "serve --demo came up on a private cluster");
    // The demo token (the data folder's development secret) works against it, with demo data.
    let out = freshplan()
        .args([
            "token",
            "--user",
            "manager-de",
            "--role",
            "manager",
            "--territory",
            "DE",
        ])
        .env("FRESHPLAN_DATA_DIR", &dir)
        .output()
        .unwrap();
    let token = String::from_utf8(out.stdout).unwrap();
    let page: Value = client
        .get(format!("{base}/api/leads?size=1"))
        .bearer_auth(token.trim())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        page["total"].as_i64().unwrap() > 500,
        "demo leads of DE: {page}"
    );
    assert!(client
        .get(format!("{base}/login"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
        .contains("sales-de-1"));

    // SIGTERM: the service shuts down and stops its cluster.
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", pg_port)).is_err(),
        "private cluster stopped"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
