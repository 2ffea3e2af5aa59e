//! Row-level security holds in the database itself: the isolation matrix through the API, a
//! raw application-role connection without identity, and the start-up check that refuses a
//! runtime role able to bypass RLS.

mod common;

use common::{TestApp, TestDb};
use serde_json::{json, Value};
use sqlx::{Connection, Executor, PgConnection};

async fn ids(app: &TestApp, user: &str) -> Vec<String> {
    let r = app.get(user, "/api/leads?size=500").await;
    assert_eq!(r.status(), 200);
    let page: Value = r.json().await.unwrap();
    let mut ids: Vec<String> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

fn sorted(v: &[&Value]) -> Vec<String> {
    let mut ids: Vec<String> = v
        .iter()
        .map(|l| l["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn each_role_sees_exactly_the_leads_of_its_data_space() {
    let app = TestApp::spawn().await;
    let own = app
        .create_lead("sales-de-1", TestApp::lead_body("Own DE-1"))
        .await;
    let mut shared_body = TestApp::lead_body("DE-2 with DE-1 collaborating");
    shared_body["collaborators"] = json!(["sales-de-1"]);
    let shared = app.create_lead("sales-de-2", shared_body).await;
    let other = app
        .create_lead("sales-de-2", TestApp::lead_body("DE-2 alone"))
        .await;
    let at = app
        .create_lead("sales-at-1", TestApp::lead_body("AT lead"))
        .await;
    let ch = app
        .create_lead("manager-ch", TestApp::lead_body("CH lead"))
        .await;

    assert_eq!(
        ids(&app, "sales-de-1").await,
        sorted(&[&own, &shared]),
        "sales sees own and collaborated"
    );
    assert_eq!(ids(&app, "sales-de-2").await, sorted(&[&shared, &other]));
    assert_eq!(
        ids(&app, "manager-de").await,
        sorted(&[&own, &shared, &other]),
        "manager sees all DE, no AT"
    );
    assert_eq!(ids(&app, "manager-at").await, sorted(&[&at]));
    assert_eq!(
        ids(&app, "admin").await,
        sorted(&[&own, &shared, &other, &at, &ch]),
        "admin sees all"
    );

    // Outside the view is 404, not 403: the lead's existence is not revealed.
    let other_id = other["id"].as_str().unwrap();
    assert_eq!(
        app.get("sales-de-1", &format!("/api/leads/{other_id}"))
            .await
            .status(),
        404
    );
    assert_eq!(
        app.get("manager-at", &format!("/api/leads/{other_id}"))
            .await
            .status(),
        404
    );
    assert_eq!(
        app.get("manager-de", &format!("/api/leads/{other_id}"))
            .await
            .status(),
        200
    );
    assert_eq!(
        app.get("sales-de-1", &format!("/api/leads/{other_id}/activities"))
            .await
            .status(),
        404
    );
}

#[tokio::test]
async fn a_sales_user_cannot_change_or_log_on_leads_outside_their_view() {
    let app = TestApp::spawn().await;
    let lead = app
        .create_lead("sales-de-2", TestApp::lead_body("Not yours"))
        .await;
    let id = lead["id"].as_str().unwrap();
    let r = app
        .patch("sales-de-1", id, 1, json!({"status": "ACTIVE"}))
        .await;
    assert_eq!(r.status(), 404);
    let r = app
        .client
        .post(format!("{}/api/leads/{id}/activities", app.url))
        .header("Authorization", app.bearer("sales-at-1"))
        .json(&json!({"type": "CALL"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // A collaborator may log activities but not edit the lead.
    let mut body = TestApp::lead_body("Shared");
    body["collaborators"] = json!(["sales-de-1"]);
    let shared = app.create_lead("sales-de-2", body).await;
    let sid = shared["id"].as_str().unwrap();
    let r = app
        .client
        .post(format!("{}/api/leads/{sid}/activities", app.url))
        .header("Authorization", app.bearer("sales-de-1"))
        .json(&json!({"type": "CALL", "outcome": "SUCCESSFUL"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(
        app.patch("sales-de-1", sid, 1, json!({"status": "ACTIVE"}))
            .await
            .status(),
        403
    );
}

#[tokio::test]
async fn without_identity_the_application_role_sees_nothing_and_writes_nothing() {
    let app = TestApp::spawn().await;
    app.create_lead("sales-de-1", TestApp::lead_body("Hidden"))
        .await;
    let mut conn = PgConnection::connect(&app.db.app_url()).await.unwrap();
    for table in [
        "leads",
        "lead_activities",
        "audit_log",
        "outbox",
        "users",
        "territories",
    ] {
        let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(n, 0, "{table} must show no rows without identity");
    }
    let insert = conn
        .execute(
            "INSERT INTO leads (id, company_name, territory, business_type, source, owner_user_id, status, \
             registered_at, created_at, updated_at, created_by, updated_by) VALUES (gen_random_uuid(), 'x', 'DE', \
             'HOTEL', 'MESSE', 'sales-de-1', 'REGISTERED', now(), now(), now(), 'x', 'x')",
        )
        .await;
    assert!(insert
        .unwrap_err()
        .to_string()
        .contains("row-level security"));
    let updated = conn
        .execute("UPDATE leads SET company_name = 'hacked'")
        .await
        .unwrap();
    assert_eq!(updated.rows_affected(), 0);
    let audit = conn
        .execute("INSERT INTO audit_log (actor_user_id, actor_role, action, entity_type, entity_id) VALUES ('x','admin','X','lead','1')")
        .await;
    assert!(audit.is_err(), "audit rows need an identity");
    // An empty setting is no identity either.
    conn.execute("SELECT set_config('app.role', '', false), set_config('app.user_id', '', false)")
        .await
        .unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM leads")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(n, 0);
    // The identity set inside a transaction is gone after it.
    let mut tx = conn.begin().await.unwrap();
    tx.execute("SELECT set_config('app.role', 'admin', true)")
        .await
        .unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM leads")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(n, 1);
    tx.commit().await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM leads")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(n, 0, "transaction-local identity must not leak");
}

#[tokio::test]
async fn a_viewer_cannot_change_anything_even_directly_in_the_database() {
    let app = TestApp::spawn().await;
    let lead = app
        .create_lead("sales-de-1", TestApp::lead_body("Viewer target"))
        .await;
    let mut conn = PgConnection::connect(&app.db.app_url()).await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    tx.execute("SELECT set_config('app.role', 'viewer', true), set_config('app.user_id', 'viewer-de', true), set_config('app.territory', 'DE', true)")
        .await
        .unwrap();
    let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM leads")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(
        seen, 1,
        "viewers read their territory (the API only gives them aggregates)"
    );
    let changed = sqlx::query("UPDATE leads SET company_name = 'x' WHERE id = $1")
        .bind(uuid::Uuid::parse_str(lead["id"].as_str().unwrap()).unwrap())
        .execute(&mut *tx)
        .await
        .unwrap();
    assert_eq!(changed.rows_affected(), 0);
}

async fn refused(url: &str) -> String {
    let pool = freshplan::db::connect(url, 1, "freshplan-check")
        .await
        .unwrap();
    let err = freshplan::db::check_runtime_role(&pool)
        .await
        .unwrap_err()
        .to_string();
    pool.close().await;
    err
}

#[tokio::test]
async fn the_service_refuses_to_start_as_a_role_that_could_bypass_rls() {
    let db = TestDb::create().await;
    let superuser = db.app_url().replace("freshplan_app@", "postgres@");
    assert!(refused(&superuser).await.contains("superuser"));

    // A role that owns the tables (here: a login member of the owner role).
    let mut admin = db.superuser().await;
    admin
        .execute("DO $$ BEGIN CREATE ROLE fp_test_owner_login LOGIN; EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$")
        .await
        .unwrap();
    admin
        .execute("GRANT freshplan_owner TO fp_test_owner_login")
        .await
        .unwrap();
    let owner_url = db
        .app_url()
        .replace("freshplan_app@", "fp_test_owner_login@");
    assert!(refused(&owner_url).await.contains("owns the schema"));

    // A BYPASSRLS role.
    admin
        .execute("DO $$ BEGIN CREATE ROLE fp_test_bypass LOGIN BYPASSRLS; EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$")
        .await
        .unwrap();
    let bypass_url = db.app_url().replace("freshplan_app@", "fp_test_bypass@");
    assert!(refused(&bypass_url).await.contains("BYPASSRLS"));

    // Tables without FORCE ROW LEVEL SECURITY.
    admin
        .execute("ALTER TABLE leads NO FORCE ROW LEVEL SECURITY")
        .await
        .unwrap();
    assert!(refused(&db.app_url()).await.contains("leads"));
    admin
        .execute("ALTER TABLE leads FORCE ROW LEVEL SECURITY")
        .await
        .unwrap();

    // The application role passes.
    let pool = freshplan::db::connect(&db.app_url(), 1, "freshplan-check")
        .await
        .unwrap();
    let check = freshplan::db::check_runtime_role(&pool).await.unwrap();
    assert!(!check.superuser && !check.bypass_rls && check.owned_relations == 0);
}
