//! Row-level security holds in the database itself: the isolation matrix through the API, a
//! raw application-role connection without identity, and the start-up check that refuses a
//! runtime role able to bypass RLS.

mod common;

use common::{wait_until, TestApp, TestDb, PATIENCE};
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

/// Every table of `freshplan::db::RLS_TABLES` (the list the start-up check enforces), seen from
/// `app` without identity: no row visible; INSERT of a copy of an existing row refused by
/// row-level security; UPDATE and DELETE touch nothing. `su` (superuser) shows the rows exist.
async fn assert_no_identity_sees_and_writes_nothing(
    app: &mut PgConnection,
    su: &mut PgConnection,
    how: &str,
) {
    for table in freshplan::db::RLS_TABLES {
        let rows: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&mut *su)
            .await
            .unwrap();
        assert!(
            rows > 0,
            "{table} is empty, so this test proves nothing for it: make the scenario above write a row to it"
        );
        let seen: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&mut *app)
            .await
            .unwrap();
        assert_eq!(seen, 0, "{table} must show no rows {how}");

        // A copy of a real row: RLS (checked before constraints) must refuse it, so neither
        // success nor a unique violation is acceptable.
        let (columns, first): (String, String) = sqlx::query_as(
            "SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum), \
                    (array_agg(quote_ident(attname) ORDER BY attnum) FILTER (WHERE attidentity = ''))[1] \
             FROM pg_attribute WHERE attrelid = $1::regclass AND attnum > 0 \
               AND NOT attisdropped AND attgenerated = ''",
        )
        .bind(table)
        .fetch_one(&mut *su)
        .await
        .unwrap();
        let row: serde_json::Value =
            sqlx::query_scalar(&format!("SELECT to_jsonb(t) FROM {table} t LIMIT 1"))
                .fetch_one(&mut *su)
                .await
                .unwrap();
        let insert = sqlx::query(&format!(
            "INSERT INTO {table} ({columns}) OVERRIDING SYSTEM VALUE \
             SELECT {columns} FROM jsonb_populate_record(NULL::{table}, $1)"
        ))
        .bind(&row)
        .execute(&mut *app)
        .await;
        match insert {
            Err(e) => assert!(
                e.to_string().contains("row-level security"),
                "INSERT into {table} {how} must be refused by row-level security, got: {e}"
            ),
            Ok(_) => panic!("INSERT into {table} {how} was accepted"),
        }
        // UPDATE and DELETE touch no row; on a table where the application role lacks the
        // privilege altogether (users, see migration 0003) they are refused outright.
        for sql in [
            format!("UPDATE {table} SET {first} = {first}"),
            format!("DELETE FROM {table}"),
        ] {
            match app.execute(sql.as_str()).await {
                Ok(done) => assert_eq!(done.rows_affected(), 0, "{sql} {how}"),
                Err(e) => assert!(
                    e.to_string().contains("permission denied for table"),
                    "{sql} {how}: {e}"
                ),
            }
        }
        let after: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&mut *su)
            .await
            .unwrap();
        assert_eq!(after, rows, "{table} unchanged {how}");
    }
}

#[tokio::test]
async fn without_identity_the_application_role_sees_nothing_and_writes_nothing_in_any_rls_table() {
    let app = TestApp::spawn().await;
    let lead = app
        .create_lead("sales-de-1", TestApp::lead_body("Hidden"))
        .await;
    let id = lead["id"].as_str().unwrap();
    // A meaningful activity fills the daily roll-up; a follow-up row as the job would queue it.
    let r = app
        .client
        .post(format!("{}/api/leads/{id}/activities", app.url))
        .header("Authorization", app.bearer("sales-de-1"))
        .json(&serde_json::json!({"type": "CALL"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    app.count(&format!(
        "WITH f AS (INSERT INTO followups (id, lead_id, followup_type, status, territory, owner_user_id, queued_at, sent_at) \
         VALUES (gen_random_uuid(), '{id}', 'T3', 'SENT', 'DE', 'sales-de-1', now(), now()) RETURNING id), \
         m AS (INSERT INTO mail_outbox (id, followup_id, lead_id, followup_type, territory, template, status, \
                                        next_attempt_at, key_id, message, created_at, sent_at) \
               SELECT gen_random_uuid(), f.id, '{id}', 'T3', 'DE', 'T3/RESTAURANT/WINTER', 'SENT', now(), 'k1', '\\x00', now(), now() \
               FROM f RETURNING 1), \
         u AS (INSERT INTO unsubscribe_redemptions (token_id, lead_id, redeemed_at) \
               VALUES (gen_random_uuid(), '{id}', now()) RETURNING 1) \
         SELECT (SELECT count(*) FROM m) + (SELECT count(*) FROM u)"
    ))
    .await;
    // Every RLS table holds a row before the check: the event path fills inbox, cursor and
    // projection (the cursor moves once the writing transaction is older than every running one).
    for table in freshplan::db::RLS_TABLES {
        wait_until(PATIENCE, &format!("a row in {table}"), || async {
            app.count(&format!("SELECT count(*) FROM {table}")).await > 0
        })
        .await;
    }
    let mut su = app.db.superuser().await;
    let mut conn = PgConnection::connect(&app.db.app_url()).await.unwrap();
    assert_no_identity_sees_and_writes_nothing(&mut conn, &mut su, "without identity").await;

    // An empty setting is no identity either.
    conn.execute("SELECT set_config('app.role', '', false), set_config('app.user_id', '', false), set_config('app.territory', '', false)")
        .await
        .unwrap();
    assert_no_identity_sees_and_writes_nothing(&mut conn, &mut su, "with an empty identity").await;

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
    assert_no_identity_sees_and_writes_nothing(
        &mut conn,
        &mut su,
        "after a transaction-local identity ended",
    )
    .await;
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
    // The schema exists (TestDb::create migrated it), so the check gets past "schema is missing"
    // to the role itself.
    let superuser = db.app_url().replace("freshplan_app@", "postgres@");
    let err = refused(&superuser).await;
    assert!(
        err.contains("runtime role `postgres` is a superuser, which bypasses row-level security"),
        "{err}"
    );

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
    // Only the application role may connect (migration 0003): let this one in to be refused.
    admin
        .execute(
            format!(
                "GRANT CONNECT ON DATABASE \"{}\" TO fp_test_bypass",
                db.name
            )
            .as_str(),
        )
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

/// The identity a transaction runs under, as the database sees it.
async fn identity_in(tx: &mut freshplan::db::Tx) -> (String, String, String, String) {
    sqlx::query_as(
        "SELECT current_setting('app.user_id'), current_setting('app.role'), \
                current_setting('app.territory'), current_setting('statement_timeout')",
    )
    .fetch_one(&mut **tx)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_transaction_runs_as_exactly_its_principal_whatever_the_user_id_holds_and_the_identity_ends_with_it(
) {
    use freshplan::identity::{Principal, Role};
    use freshplan::territory::Territory;
    let db = TestDb::create().await;
    // One connection, so every transaction below reuses the same session.
    let pool = freshplan::db::connect(&db.app_url(), 1, "freshplan-test")
        .await
        .unwrap();
    let server_default: String = sqlx::query_scalar("SELECT current_setting('statement_timeout')")
        .fetch_one(&pool)
        .await
        .unwrap();
    let principal = |user: &str, role: Role, territory: Territory| Principal {
        user_id: user.into(),
        name: "test".into(),
        role,
        territory,
    };
    for p in [
        principal("sales-de-1", Role::Sales, Territory::DE),
        // Quotes and backslashes are data, never SQL.
        principal(
            "o'brien'; SET LOCAL app.role = 'admin",
            Role::Sales,
            Territory::AT,
        ),
        principal(r"mgr\'; x", Role::Manager, Territory::CH),
        principal("", Role::Viewer, Territory::DE),
    ] {
        let mut tx = freshplan::db::begin_as(&pool, &p).await.unwrap();
        assert_eq!(
            identity_in(&mut tx).await,
            (
                p.user_id.clone(),
                p.role.as_str().to_string(),
                p.territory.code().to_string(),
                freshplan::db::REQUEST_STATEMENT_TIMEOUT.to_string()
            ),
            "identity inside the transaction of {:?}",
            p.user_id
        );
        tx.commit().await.unwrap();
        let after: (Option<String>, Option<String>, String) = sqlx::query_as(
            "SELECT nullif(current_setting('app.user_id', true), ''), \
                    nullif(current_setting('app.role', true), ''), current_setting('statement_timeout')",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(
            after,
            (None, None, server_default.clone()),
            "after the transaction of {:?} the session has no identity and the server's timeout",
            p.user_id
        );
    }
    // The system principal keeps the server's statement timeout.
    let mut tx = freshplan::db::begin_as(&pool, &Principal::system())
        .await
        .unwrap();
    let (user, role, _, timeout) = identity_in(&mut tx).await;
    assert_eq!((user.as_str(), role.as_str()), ("system", "system"));
    assert_eq!(timeout, server_default);
    tx.rollback().await.unwrap();
}
