//! The shape the rest of the code relies on: a module graph without cycles through `app`, lead
//! logic callable without HTTP, a listener that requests cannot starve, an instance that never
//! silently skips events after a reconnect, and database errors answered by their cause.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use freshplan::db;
use freshplan::error::ApiError;
use freshplan::events::outbox;
use freshplan::territory::Territory;
use rand::SeedableRng;
use serde_json::json;
use uuid::Uuid;

const PATIENCE: Duration = Duration::from_secs(10);

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `crate::<module>` paths a file names (in `use` lines and inline paths).
fn crate_modules(text: &str) -> HashSet<String> {
    let mut found = HashSet::new();
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '{')
            .collect();
        if let Some(group) = name.strip_prefix('{') {
            // `use crate::{a, b::c}`: every name of the group.
            let end = rest.find('}').unwrap_or(rest.len());
            for part in rest[1..end].split(',') {
                let m = part.trim().split("::").next().unwrap_or("").trim();
                if !m.is_empty() {
                    found.insert(m.to_string());
                }
            }
            let _ = group;
        } else if !name.is_empty() {
            found.insert(name);
        }
    }
    found
}

#[test]
fn no_module_below_app_imports_the_composition_root() {
    let mut files = Vec::new();
    rust_files(Path::new("src"), &mut files);
    assert!(files.len() > 20, "found the sources");
    let offenders: Vec<String> = files
        .iter()
        .filter(|p| !p.ends_with("app.rs") && !p.ends_with("main.rs"))
        .filter(|p| crate_modules(&std::fs::read_to_string(p).unwrap()).contains("app"))
        .map(|p| p.display().to_string())
        .collect();
    assert!(
        offenders.is_empty(),
        "only app.rs wires the application together; these import it: {offenders:?}"
    );
}

#[test]
fn lower_layers_import_nothing_from_higher_ones() {
    // module file or folder → the crate modules it may use.
    let rules: &[(&str, &[&str])] = &[
        ("src/error.rs", &[]),
        ("src/territory.rs", &["text_column"]),
        ("src/identity.rs", &["error", "territory", "text_column"]),
        ("src/leads/domain.rs", &["identity", "text_column"]),
        ("src/db", &["identity", "db", "config"]),
    ];
    for (place, allowed) in rules {
        let mut files = Vec::new();
        let path = Path::new(place);
        if path.is_dir() {
            rust_files(path, &mut files);
        } else {
            files.push(path.to_path_buf());
        }
        for f in files {
            let used = crate_modules(&std::fs::read_to_string(&f).unwrap());
            let extra: Vec<&String> = used
                .iter()
                .filter(|m| !allowed.contains(&m.as_str()))
                .collect();
            assert!(
                extra.is_empty(),
                "{} may use only {allowed:?} of the crate, but uses {extra:?}",
                f.display()
            );
        }
    }
}

#[test]
fn the_module_graph_check_sees_grouped_and_inline_imports() {
    let text = "use crate::{auth::Role, db};\nfn f() { crate::app::router(); }";
    let found = crate_modules(text);
    assert!(found.contains("auth") && found.contains("db") && found.contains("app"));
}

#[tokio::test]
async fn the_demo_live_step_changes_a_lead_through_the_leads_service_and_publishes_its_event() {
    let app = TestApp::spawn().await;
    freshplan::demo::seed(&app.state().pool, &app.vault(), 60)
        .await
        .unwrap();
    let before = app.count("SELECT count(*) FROM outbox").await;
    let acts_before = app
        .count("SELECT count(*) FROM lead_activities WHERE activity_type NOT IN ('CREATED')")
        .await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut done = None;
    for _ in 0..50 {
        if let Some(what) = freshplan::demo::live_step(&app.state().leads, &mut rng)
            .await
            .unwrap()
        {
            done = Some(what);
            break;
        }
    }
    let what = done.expect("a demo sales user with an open lead acted");
    assert_eq!(
        app.count("SELECT count(*) FROM outbox").await,
        before + 1,
        "one event for one step ({what})"
    );
    let acts_after = app
        .count("SELECT count(*) FROM lead_activities WHERE activity_type NOT IN ('CREATED')")
        .await;
    assert_eq!(acts_after, acts_before + 1, "one activity for one step");
    let kind = if what == "status" {
        "dashboard.lead_status_changed"
    } else {
        "dashboard.activity_logged"
    };
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM outbox WHERE event_type = '{kind}'"
        ))
        .await,
        1
    );
}

#[tokio::test]
async fn with_the_request_pool_exhausted_by_slow_requests_the_listener_keeps_delivering_and_readiness_stays_up(
) {
    let app = TestApp::spawn_with(&[("FRESHPLAN_DATABASE_POOL_SIZE", "2")]).await;
    wait_until(PATIENCE, "ready", || async {
        app.get("admin", "/q/health/ready").await.status() == 200
    })
    .await;
    let lead = app
        .create_lead("sales-de-1", TestApp::lead_body("Gasthof Langsam"))
        .await;
    let lead_id = lead["id"].as_str().unwrap().to_string();
    let mut stream = app.sse("admin", None).await;

    // A row lock held elsewhere makes every PATCH of that lead wait while holding a pooled
    // connection: four slow requests for a pool of two.
    let mut su = app.db.superuser().await;
    sqlx::query("BEGIN").execute(&mut su).await.unwrap();
    sqlx::query(&format!(
        "SELECT 1 FROM leads WHERE id = '{lead_id}' FOR UPDATE"
    ))
    .execute(&mut su)
    .await
    .unwrap();
    let mut slow = Vec::new();
    for _ in 0..4 {
        let client = app.client.clone();
        let url = format!("{}/api/leads/{lead_id}", app.url);
        let auth = app.bearer("sales-de-1");
        slow.push(tokio::spawn(async move {
            client
                .patch(url)
                .header("Authorization", auth)
                .header("If-Match", "\"1\"")
                .json(&json!({"status": "ACTIVE"}))
                .send()
                .await
                .unwrap()
                .status()
        }));
    }
    wait_until(
        PATIENCE,
        "both pooled connections wait on the lock",
        || async {
            app.count(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'freshplan' \
             AND wait_event_type = 'Lock' AND datname = current_database()",
            )
            .await
                == 2
        },
    )
    .await;
    assert_eq!(
        app.state().pool.num_idle(),
        0,
        "the request pool is exhausted"
    );

    // Events written meanwhile (by another writer on the same database) still reach this
    // instance's stream, and this instance stays ready.
    let writer = app.db.app_pool().await;
    let p = freshplan::demo::principal("sales-de-2").unwrap();
    let mut keys = HashSet::new();
    for _ in 0..20 {
        let ev = activity_event("sales-de-2", Territory::DE);
        keys.insert(ev.key.to_string());
        let mut tx = db::begin_as(&writer, &p).await.unwrap();
        outbox::append(&mut tx, &ev).await.unwrap();
        tx.commit().await.unwrap();
    }
    let (seen, _) = collect_keys(&mut stream, &keys).await;
    assert!(
        keys.iter().all(|k| seen.get(k) == Some(&1)),
        "every event written while the pool was exhausted reached the stream once: {} of 20",
        seen.len()
    );
    let ready = app.get("admin", "/q/health/ready").await;
    assert_eq!(
        ready.status(),
        200,
        "readiness stays UP with the pool exhausted"
    );
    assert_eq!(
        app.state().pool.num_idle(),
        0,
        "still exhausted while checked"
    );

    sqlx::query("ROLLBACK").execute(&mut su).await.unwrap();
    for s in slow {
        let status = s.await.unwrap();
        assert!(
            [200, 412, 503].contains(&status.as_u16()),
            "a slow request ends in a clear answer, got {status}"
        );
    }
}

/// Reads frames until every key in `keys` was seen; returns how often each key arrived and the
/// names of any non-CloudEvents frames.
async fn collect_keys(
    stream: &mut Sse,
    keys: &HashSet<String>,
) -> (HashMap<String, usize>, Vec<String>) {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut named = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !keys.iter().all(|k| seen.contains_key(k)) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(ev) = stream.next(left).await else {
            break;
        };
        if ev.event.starts_with("dashboard.") {
            let env = sse_json(&ev);
            *seen
                .entry(env["idempotencykey"].as_str().unwrap().to_string())
                .or_default() += 1;
        } else {
            named.push(ev.event.clone());
        }
    }
    // Anything arriving shortly after the last key would be a repeat: drain what is queued.
    while let Some(ev) = stream.next(Duration::from_millis(300)).await {
        if ev.event.starts_with("dashboard.") {
            let env = sse_json(&ev);
            *seen
                .entry(env["idempotencykey"].as_str().unwrap().to_string())
                .or_default() += 1;
        } else {
            named.push(ev.event.clone());
        }
    }
    (seen, named)
}

#[tokio::test]
async fn a_second_instance_whose_listener_is_killed_still_streams_every_event_exactly_once() {
    let a = TestApp::spawn().await;
    let b = a.second_instance().await;
    for app in [&a, &b] {
        wait_until(PATIENCE, "ready", || async {
            app.get("admin", "/q/health/ready").await.status() == 200
        })
        .await;
    }
    let mut stream = b.sse("admin", None).await;
    // A keeps writing until B's listener was killed four times (each time after it had
    // reconnected), so A's durable consumer moves the shared cursor on while B is away.
    const KILLS: usize = 4;
    let kills = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for w in 0..3 {
        let client = a.client.clone();
        let url = a.url.clone();
        let auth = a.bearer("sales-de-1");
        let kills = kills.clone();
        writers.push(tokio::spawn(async move {
            let mut i = 0;
            while kills.load(Ordering::SeqCst) < KILLS && i < 1000 {
                let r = client
                    .post(format!("{url}/api/leads"))
                    .header("Authorization", &auth)
                    .json(&TestApp::lead_body(&format!("Writer {w} lead {i}")))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 201);
                i += 1;
            }
        }));
    }
    let killer = {
        let kills = kills.clone();
        let health = b.state().listener_health.clone();
        let mut su = b.db.superuser().await;
        tokio::spawn(async move {
            let mut last = 0;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while kills.load(Ordering::SeqCst) < KILLS && tokio::time::Instant::now() < deadline {
                let pid = health.backend_pid();
                if pid != 0 && pid != last {
                    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
                        .bind(pid)
                        .fetch_one(&mut su)
                        .await
                        .unwrap();
                    if killed {
                        kills.fetch_add(1, Ordering::SeqCst);
                    }
                    last = pid;
                }
                // Pacing of the poll for B's next connection, not a wait for an outcome.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    killer.await.unwrap();
    for w in writers {
        w.await.unwrap();
    }
    assert_eq!(
        kills.load(Ordering::SeqCst),
        KILLS,
        "B's listener was killed repeatedly"
    );

    let mut su = a.db.superuser().await;
    let keys: HashSet<String> = sqlx::query_scalar::<_, Uuid>("SELECT idempotency_key FROM outbox")
        .fetch_all(&mut su)
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.to_string())
        .collect();
    assert!(
        keys.len() > 20,
        "A wrote while B was away ({} events)",
        keys.len()
    );
    let (seen, named) = collect_keys(&mut stream, &keys).await;
    if named.iter().any(|n| n == "resync") {
        // Allowed by the contract: the client is told to fetch state again.
        return;
    }
    let missing: Vec<&String> = keys.iter().filter(|k| !seen.contains_key(*k)).collect();
    assert!(
        missing.is_empty(),
        "B's subscriber silently missed {} of {} events",
        missing.len(),
        keys.len()
    );
    let repeated: Vec<(&String, &usize)> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(repeated.is_empty(), "delivered twice: {repeated:?}");
}

#[tokio::test]
async fn a_manager_creating_a_lead_in_another_territory_gets_403_not_500() {
    let app = TestApp::spawn().await;
    let mut body = TestApp::lead_body("Wiener Beisl");
    body["territory"] = json!("AT");
    let r = app
        .client
        .post(format!("{}/api/leads", app.url))
        .header("Authorization", app.bearer("manager-de"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let problem: serde_json::Value = r.json().await.unwrap();
    assert_eq!(problem["type"], "https://freshplan.de/problems/forbidden");
    assert_eq!(app.count("SELECT count(*) FROM leads").await, 0);
}

async fn db_error(app: &TestApp, user: &str, sql: &str) -> ApiError {
    let pool = app.db.app_pool().await;
    let p = freshplan::demo::principal(user).unwrap();
    let mut tx = db::begin_as(&pool, &p).await.unwrap();
    let err = sqlx::query(sql).execute(&mut *tx).await.unwrap_err();
    ApiError::from(err)
}

#[tokio::test]
async fn database_refusals_are_answered_by_their_cause_not_with_500() {
    let app = TestApp::spawn().await;
    // Row-level security refuses a sales user's row for someone else: 403.
    let rls = db_error(
        &app,
        "sales-de-1",
        "INSERT INTO leads (id, company_name, territory, business_type, source, owner_user_id, status, \
           registered_at, created_at, updated_at, created_by, updated_by) \
         VALUES (gen_random_uuid(), 'X', 'DE', 'HOTEL', 'MESSE', 'sales-de-2', 'REGISTERED', now(), now(), now(), 'x', 'x')",
    )
    .await;
    assert_eq!(rls.parts().0, 403, "{rls:?}");
    // A CHECK constraint: 422 invalid-field naming the constraint, not the value.
    let check = db_error(
        &app,
        "admin",
        "INSERT INTO leads (id, company_name, territory, business_type, source, owner_user_id, status, \
           registered_at, created_at, updated_at, created_by, updated_by) \
         VALUES (gen_random_uuid(), '', 'DE', 'HOTEL', 'MESSE', 'admin', 'REGISTERED', now(), now(), now(), 'admin', 'admin')",
    )
    .await;
    assert_eq!(check.parts().1, "invalid-field", "{check:?}");
    assert!(check.to_string().contains("leads_company_name_check"));
    // A serialization failure: the retryable contention error, 503.
    let ser = db_error(
        &app,
        "admin",
        "DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$",
    )
    .await;
    assert!(ser.is_retryable());
    assert_eq!(ser.parts().0, 503);
}

/// Makes the first `times` lead inserts fail with a serialization failure (a sequence, because
/// it does not roll back with the failing transaction).
async fn fail_inserts_with_serialization_failure(app: &TestApp, times: i64) {
    let mut su = app.db.superuser().await;
    for sql in [
        "CREATE SEQUENCE fail_seq".to_string(),
        format!(
            "CREATE FUNCTION fail_first() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$ \
             BEGIN IF nextval('fail_seq') <= {times} THEN \
               RAISE EXCEPTION 'simulated' USING ERRCODE = '40001'; END IF; RETURN NEW; END $$"
        ),
        "CREATE TRIGGER fail_first BEFORE INSERT ON leads FOR EACH ROW EXECUTE FUNCTION fail_first()"
            .to_string(),
    ] {
        sqlx::query(&sql).execute(&mut su).await.unwrap();
    }
}

#[tokio::test]
async fn a_serialization_failure_is_retried_once_and_the_change_is_written_once() {
    let app = TestApp::spawn().await;
    fail_inserts_with_serialization_failure(&app, 1).await;
    let lead = app
        .create_lead("sales-de-1", TestApp::lead_body("Zweiter Versuch"))
        .await;
    assert_eq!(lead["companyName"], "Zweiter Versuch");
    assert_eq!(app.count("SELECT count(*) FROM leads").await, 1);
    assert_eq!(app.count("SELECT count(*) FROM outbox").await, 1);
    assert_eq!(
        app.count("SELECT count(*) FROM audit_log WHERE action = 'LEAD_CREATED'")
            .await,
        1
    );
}

#[tokio::test]
async fn a_serialization_failure_that_persists_answers_503_with_retry_after_and_writes_nothing() {
    let app = TestApp::spawn().await;
    fail_inserts_with_serialization_failure(&app, 2).await;
    let r = app
        .client
        .post(format!("{}/api/leads", app.url))
        .header("Authorization", app.bearer("sales-de-1"))
        .json(&TestApp::lead_body("Kein Glück"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let problem: serde_json::Value = r.json().await.unwrap();
    assert_eq!(problem["type"], "https://freshplan.de/problems/contention");
    assert_eq!(app.count("SELECT count(*) FROM leads").await, 0);
    assert_eq!(app.count("SELECT count(*) FROM outbox").await, 0);
}

#[tokio::test]
async fn every_write_answers_with_the_outbox_position_of_its_event() {
    let app = TestApp::spawn().await;
    let r = app
        .client
        .post(format!("{}/api/leads", app.url))
        .header("Authorization", app.bearer("sales-de-1"))
        .json(&TestApp::lead_body("Position Eins"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let created: i64 = r.headers()["freshplan-position"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let id = r.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = app
        .client
        .post(format!("{}/api/leads/{id}/activities", app.url))
        .header("Authorization", app.bearer("sales-de-1"))
        .json(&json!({"type": "CALL"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let logged: i64 = r.headers()["freshplan-position"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(logged > created);
    assert_eq!(
        app.count(
            "SELECT max(position) FROM outbox WHERE event_type = 'dashboard.activity_logged'"
        )
        .await,
        logged
    );
}
