//! PII protection at rest, end to end against real PostgreSQL: no clear text in any row,
//! tampering answers a clear error, search and duplicate detection by keyed hash, viewers see no
//! contact data, online key rotation (library and the `freshplan keys rotate` binary), and the
//! refusal to start without a key.

mod common;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{wait_until, TestApp, TestDb, KEY_1, KEY_2, LOOKUP_KEY, PATIENCE};
use serde_json::{json, Value};
use sqlx::{Connection, Row};

const NAME: &str = "Max Mustermann";
const EMAIL: &str = "max.mustermann@example.com";
const PHONE: &str = "+49 89 1234567";

fn max_lead(company: &str) -> Value {
    let mut body = TestApp::lead_body(company);
    body["contactPerson"] = json!(NAME);
    body["email"] = json!(EMAIL);
    body["phone"] = json!(PHONE);
    body
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

async fn post_lead(app: &TestApp, user: &str, body: &Value) -> reqwest::Response {
    app.client
        .post(format!("{}/api/leads", app.url))
        .header("Authorization", app.bearer(user))
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn search(app: &TestApp, user: &str, email: &str) -> reqwest::Response {
    app.client
        .get(format!("{}/api/leads", app.url))
        .query(&[("email", email)])
        .header("Authorization", app.bearer(user))
        .send()
        .await
        .unwrap()
}

/// Every lead, deleted ones included (id → contactPerson, email, phone), as the admin sees
/// them through the API.
async fn contacts_as_admin(app: &TestApp) -> HashMap<String, (Value, Value, Value)> {
    let mut all = HashMap::new();
    for path in ["/api/leads?size=500", "/api/leads?size=500&status=DELETED"] {
        let r = app.get("admin", path).await;
        assert_eq!(r.status(), 200);
        let page: Value = r.json().await.unwrap();
        for l in page["items"].as_array().unwrap() {
            let contact = (
                l["contactPerson"].clone(),
                l["email"].clone(),
                l["phone"].clone(),
            );
            all.insert(l["id"].as_str().unwrap().to_string(), contact);
        }
    }
    all
}

#[tokio::test]
async fn no_table_holds_contact_data_in_clear_text() {
    let app = TestApp::spawn().await;
    let a = app
        .create_lead("sales-de-1", max_lead("Gasthaus Sonne"))
        .await;
    let mut other = max_lead("Hotel Adler");
    other["email"] = json!("Erika.Musterfrau@Example.com");
    other["contactPerson"] = json!("Erika Musterfrau");
    other["phone"] = json!("089 7654321");
    app.create_lead("sales-de-1", other).await;
    assert_eq!(a["email"], EMAIL, "the owner reads the clear text back");

    let id = a["id"].as_str().unwrap();
    let r = app
        .patch(
            "sales-de-1",
            id,
            1,
            json!({"status": "ACTIVE", "phone": "089 / 123 4567"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let patched: Value = r.json().await.unwrap();
    assert_eq!(patched["phone"], "089 / 123 4567");
    assert_eq!(patched["contactPerson"], NAME);
    let r = app
        .client
        .post(format!("{}/api/leads/{id}/activities", app.url))
        .header("Authorization", app.bearer("sales-de-1"))
        .json(&json!({"type": "CALL", "description": "Rückruf vereinbart", "outcome": "REACHED"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);

    let mut db = app.db.superuser().await;
    let (ct, key, hash): (Option<Vec<u8>>, Option<String>, Option<Vec<u8>>) =
        sqlx::query_as("SELECT email_ct, pii_key_id, email_hash FROM leads WHERE id = $1::uuid")
            .bind(id)
            .fetch_one(&mut db)
            .await
            .unwrap();
    assert!(
        ct.is_some_and(|c| c.len() >= 12 + 16 + EMAIL.len()),
        "nonce, ciphertext and tag are stored"
    );
    assert_eq!(key.as_deref(), Some("k1"));
    assert_eq!(hash.map(|h| h.len()), Some(32), "HMAC-SHA-256 lookup hash");

    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY 1",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    for required in ["leads", "audit_log", "outbox", "lead_activities"] {
        assert!(
            tables.iter().any(|t| t == required),
            "table {required} is dumped"
        );
    }
    let forbidden = [
        "mustermann".to_string(),
        "musterfrau".to_string(),
        "max.mustermann@example.com".to_string(),
        "1234567".to_string(),
        "7654321".to_string(),
        "123 4567".to_string(),
        "891234567".to_string(),
        hex(NAME),
        hex(EMAIL),
        hex(PHONE),
        hex("1234567"),
    ];
    let mut dumped = HashMap::new();
    for table in &tables {
        let rows: Vec<String> = sqlx::query_scalar(&format!("SELECT t::text FROM {table} t"))
            .fetch_all(&mut db)
            .await
            .unwrap();
        dumped.insert(table.clone(), rows.len());
        for row in rows {
            let row = row.to_lowercase();
            for needle in &forbidden {
                assert!(
                    !row.contains(needle.as_str()),
                    "table {table} holds `{needle}` in clear text: {row}"
                );
            }
        }
    }
    for (table, at_least) in [
        ("leads", 2),
        ("audit_log", 4),
        ("outbox", 4),
        ("lead_activities", 4),
    ] {
        assert!(
            dumped[table] >= at_least,
            "{table} has {} rows, expected at least {at_least}",
            dumped[table]
        );
    }
}

#[tokio::test]
async fn a_ciphertext_copied_to_another_lead_answers_contact_data_unreadable() {
    let app = TestApp::spawn().await;
    let a = app
        .create_lead("sales-de-1", max_lead("Gasthaus Sonne"))
        .await;
    let mut other = TestApp::lead_body("Hotel Adler");
    other["email"] = json!("info@hotel-adler.example");
    let b = app.create_lead("sales-de-1", other).await;
    let (a_id, b_id) = (a["id"].as_str().unwrap(), b["id"].as_str().unwrap());

    let mut db = app.db.superuser().await;
    let moved = sqlx::query("UPDATE leads SET email_ct = (SELECT email_ct FROM leads WHERE id = $1::uuid) WHERE id = $2::uuid")
        .bind(a_id)
        .bind(b_id)
        .execute(&mut db)
        .await
        .unwrap();
    assert_eq!(moved.rows_affected(), 1);

    let r = app.get("sales-de-1", &format!("/api/leads/{b_id}")).await;
    assert_eq!(r.status(), 500);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let text = r.text().await.unwrap();
    let problem: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        problem["type"],
        "https://freshplan.de/problems/contact-data-unreadable"
    );
    assert!(
        problem["detail"].as_str().unwrap().contains(b_id),
        "the detail names the lead: {problem}"
    );
    assert!(
        !text.to_lowercase().contains("mustermann") && !text.contains("hotel-adler"),
        "no clear text: {text}"
    );

    let r = app.get("sales-de-1", &format!("/api/leads/{a_id}")).await;
    assert_eq!(r.status(), 200);
    let a_again: Value = r.json().await.unwrap();
    assert_eq!(a_again["email"], EMAIL, "the original row still decrypts");

    let r = app.get("sales-de-1", "/api/leads").await;
    assert_eq!(
        r.status(),
        500,
        "a list with the broken lead answers the same clear error, never garbage"
    );
    let problem: Value = r.json().await.unwrap();
    assert_eq!(
        problem["type"],
        "https://freshplan.de/problems/contact-data-unreadable"
    );

    // Re-entering all contact fields repairs the lead without reading the broken value.
    let r = app
        .patch(
            "sales-de-1",
            b_id,
            1,
            json!({"contactPerson": null, "email": "info@hotel-adler.example", "phone": null}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let repaired: Value = r.json().await.unwrap();
    assert_eq!(repaired["email"], "info@hotel-adler.example");
    assert_eq!(app.get("sales-de-1", "/api/leads").await.status(), 200);
}

#[tokio::test]
async fn search_by_email_finds_the_lead_only_for_those_who_may_see_it() {
    let app = TestApp::spawn().await;
    let lead = app
        .create_lead("sales-de-1", max_lead("Gasthaus Sonne"))
        .await;
    app.create_lead("sales-de-1", TestApp::lead_body("Hotel Adler"))
        .await;

    for spelling in [
        EMAIL,
        "  MAX.Mustermann@Example.COM ",
        "Max.Mustermann@example.com",
    ] {
        for user in ["sales-de-1", "manager-de", "admin"] {
            let r = search(&app, user, spelling).await;
            assert_eq!(r.status(), 200);
            let page: Value = r.json().await.unwrap();
            assert_eq!(page["total"], 1, "{user} searching `{spelling}`: {page}");
            assert_eq!(page["items"][0]["id"], lead["id"]);
            assert_eq!(page["items"][0]["email"], EMAIL);
        }
    }
    for user in ["sales-de-2", "manager-at"] {
        let r = search(&app, user, EMAIL).await;
        assert_eq!(r.status(), 200);
        let page: Value = r.json().await.unwrap();
        assert_eq!(page["total"], 0, "{user} must not find the lead: {page}");
        assert_eq!(page["items"], json!([]));
    }
    let r = search(&app, "sales-de-1", "moritz@example.com").await;
    let page: Value = r.json().await.unwrap();
    assert_eq!(page["total"], 0, "another address finds nothing");
    let r = search(&app, "sales-de-1", "not an address").await;
    assert_eq!(r.status(), 422);
    assert!(
        !r.text().await.unwrap().contains("not an address"),
        "the error does not echo the value"
    );
}

#[tokio::test]
async fn a_second_lead_with_the_same_email_in_any_spelling_is_a_duplicate_contact() {
    let app = TestApp::spawn().await;
    let first = app
        .create_lead("sales-de-1", max_lead("Gasthaus Sonne"))
        .await;

    let mut same = TestApp::lead_body("Gasthaus Sonne Filiale");
    same["email"] = json!("  MAX.MUSTERMANN@example.COM ");
    let r = post_lead(&app, "sales-de-1", &same).await;
    assert_eq!(r.status(), 409);
    let text = r.text().await.unwrap();
    let problem: Value = serde_json::from_str(&text).unwrap();
    assert!(
        problem["type"]
            .as_str()
            .unwrap()
            .ends_with("/duplicate-contact"),
        "{problem}"
    );
    assert_eq!(
        problem["existingLeadId"], first["id"],
        "the owner learns which lead it is"
    );
    assert!(
        !text.to_lowercase().contains("mustermann"),
        "no contact data in the problem: {text}"
    );

    let r = post_lead(&app, "sales-de-2", &same).await;
    assert_eq!(r.status(), 409);
    let problem: Value = r.json().await.unwrap();
    assert!(
        problem["type"]
            .as_str()
            .unwrap()
            .ends_with("/duplicate-contact"),
        "{problem}"
    );
    assert!(
        problem.get("existingLeadId").is_none(),
        "a user who may not see the lead learns no id: {problem}"
    );

    let r = post_lead(&app, "sales-at-1", &same).await;
    assert_eq!(
        r.status(),
        201,
        "the same email in another territory is another lead"
    );

    // Changing another lead's email to the same address is a duplicate too.
    let other = app
        .create_lead("sales-de-1", TestApp::lead_body("Hotel Adler"))
        .await;
    let r = app
        .patch(
            "sales-de-1",
            other["id"].as_str().unwrap(),
            1,
            json!({"email": "Max.Mustermann@Example.com"}),
        )
        .await;
    assert_eq!(r.status(), 409);
    let problem: Value = r.json().await.unwrap();
    assert_eq!(problem["existingLeadId"], first["id"]);
}

#[tokio::test]
async fn viewers_get_no_contact_data_from_lead_endpoints() {
    let app = TestApp::spawn().await;
    let lead = app
        .create_lead("sales-de-1", max_lead("Gasthaus Sonne"))
        .await;
    let id = lead["id"].as_str().unwrap();
    for path in [
        "/api/leads".to_string(),
        format!("/api/leads/{id}"),
        format!("/api/leads/{id}/activities"),
        format!("/api/leads?email={EMAIL}"),
    ] {
        let r = app.get("viewer-de", &path).await;
        assert_eq!(r.status(), 403, "{path}");
        let text = r.text().await.unwrap();
        assert!(
            !text.to_lowercase().contains("mustermann") && !text.contains("1234567"),
            "{path}: {text}"
        );
    }
}

#[tokio::test]
async fn keys_rotate_re_encrypts_every_row_while_the_service_keeps_answering() {
    let mut app = TestApp::spawn().await;
    freshplan::demo::seed(&app.state().pool, &app.vault(), 300)
        .await
        .unwrap();
    let before = contacts_as_admin(&app).await;
    assert_eq!(before.len(), 300);
    let mut db = app.db.superuser().await;
    let k1: i64 = sqlx::query_scalar("SELECT count(*) FROM leads WHERE pii_key_id = 'k1'")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(k1, 300);

    // New key configured as the last (active) one; the old one stays readable.
    let keys = format!("{KEY_1},{KEY_2}");
    let env = [("FRESHPLAN_PII_KEYS", keys.as_str())];
    app.restart(Some(&env)).await;
    let vault = Arc::new(common::vault_from(&app.db.settings(&env)));
    assert_eq!(vault.active_key_id(), "k2");

    // An edit in flight: one lead stays locked until the rest is rotated.
    let held: String =
        sqlx::query_scalar("SELECT id::text FROM leads ORDER BY id LIMIT 1 OFFSET 17")
            .fetch_one(&mut db)
            .await
            .unwrap();
    let mut locker = app.db.superuser().await;
    let locker_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut locker)
        .await
        .unwrap();
    let lock_tx = lock_lead(&mut locker, &held).await;

    let pool = app.db.app_pool().await;
    let rotation = {
        let vault = vault.clone();
        tokio::spawn(async move { freshplan::pii::rotate::rotate(&pool, &vault, 50).await })
    };

    // The live instance answers throughout, with decrypted data under either key.
    let ok = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (ok, stop) = (ok.clone(), stop.clone());
        let (url, client, bearer) = (app.url.clone(), app.client.clone(), app.bearer("admin"));
        tokio::spawn(async move {
            let mut answered = 0;
            while !stop.load(Ordering::SeqCst) {
                let r = client
                    .get(format!("{url}/api/leads?size=50"))
                    .header("Authorization", &bearer)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200, "the service answers during rotation");
                let page: Value = r.json().await.unwrap();
                let items = page["items"].as_array().unwrap();
                assert_eq!(items.len(), 50);
                assert!(items.iter().all(|l| l["email"]
                    .as_str()
                    .is_some_and(|e| e.ends_with("@example.com"))));
                answered += 1;
                ok.store(answered, Ordering::SeqCst);
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM leads WHERE pii_key_id <> 'k2'")
            .fetch_one(&mut db)
            .await
            .unwrap();
        if left == 1 && ok.load(Ordering::SeqCst) >= 5 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rotation stalled with {left} rows left"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Everything else is rotated; now rotation either waits for the locked lead (the sign:
    // its backend is blocked by the locker) or, wrongly, finishes without it.
    wait_until(
        PATIENCE,
        "rotation blocked by the locked lead, or finished",
        || async { rotation.is_finished() || waits_for(&app, "freshplan-test", locker_pid).await },
    )
    .await;
    assert!(
        !rotation.is_finished(),
        "rotation waits for the locked lead instead of leaving it behind"
    );
    let r = app.get("admin", &format!("/api/leads/{held}")).await;
    assert_eq!(r.status(), 200, "a lead still under the old key reads fine");
    lock_tx.commit().await.unwrap();
    let report = tokio::time::timeout(Duration::from_secs(30), rotation)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    stop.store(true, Ordering::SeqCst);
    reader.await.unwrap();
    assert_eq!(report.rows, 300);
    assert!(
        report.batches >= 6 && report.unreadable.is_empty(),
        "{report:?}"
    );

    let keys: Vec<(String, i64)> =
        sqlx::query_as("SELECT pii_key_id, count(*) FROM leads GROUP BY 1")
            .fetch_all(&mut db)
            .await
            .unwrap();
    assert_eq!(keys, vec![("k2".to_string(), 300)]);
    assert_eq!(
        contacts_as_admin(&app).await,
        before,
        "every value decrypts to what it was"
    );

    // Lookup hashes use their own key: search still finds a rotated lead.
    // A lead the default list shows (not DELETED) and that has an e-mail address.
    let listed: Value = app
        .get("admin", "/api/leads?size=500")
        .await
        .json()
        .await
        .unwrap();
    let (id, email) = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|l| {
            let id = l["id"].as_str()?.to_string();
            let email = before[&id].1.as_str()?.to_string();
            Some((id, email))
        })
        .unwrap();
    let r = search(&app, "admin", &email.to_uppercase()).await;
    let page: Value = r.json().await.unwrap();
    assert!(
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["id"] == json!(id)),
        "searching the rotated lead's e-mail finds it: {page}"
    );

    let again = freshplan::pii::rotate::rotate(&app.db.app_pool().await, &vault, 50)
        .await
        .unwrap();
    assert_eq!(
        (again.rows, again.batches),
        (0, 0),
        "a second run has nothing to do"
    );
}

#[tokio::test]
async fn a_patch_during_rotation_is_not_lost() {
    let mut app = TestApp::spawn().await;
    let lead = app
        .create_lead("sales-de-1", max_lead("Gasthaus Sonne"))
        .await;
    let id = lead["id"].as_str().unwrap().to_string();
    let keys = format!("{KEY_1},{KEY_2}");
    let env = [("FRESHPLAN_PII_KEYS", keys.as_str())];
    app.restart(Some(&env)).await;
    let vault = common::vault_from(&app.db.settings(&env));

    // The PATCH holds the row (as its transaction would); rotation must wait, then re-read it.
    let mut db = app.db.superuser().await;
    let editor_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut db)
        .await
        .unwrap();
    let mut edit = lock_lead(&mut db, &id).await;
    let pool = app.db.app_pool().await;
    let rotation =
        tokio::spawn(async move { freshplan::pii::rotate::rotate(&pool, &vault, 10).await });
    wait_until(
        PATIENCE,
        "rotation blocked by the edit's row lock, or finished",
        || async { rotation.is_finished() || waits_for(&app, "freshplan-test", editor_pid).await },
    )
    .await;
    assert!(
        !rotation.is_finished(),
        "rotation waits for the edited lead instead of passing it by"
    );
    let sealed = app.state().vault.seal(
        uuid::Uuid::parse_str(&id).unwrap(),
        freshplan::pii::PiiField::ContactPerson,
        "Erika Musterfrau",
    );
    sqlx::query("UPDATE leads SET contact_person_ct = $2, pii_key_id = 'k2', email_ct = NULL, phone_ct = NULL, version = version + 1 WHERE id = $1::uuid")
        .bind(&id)
        .bind(sealed)
        .execute(&mut *edit)
        .await
        .unwrap();
    edit.commit().await.unwrap();
    let report = tokio::time::timeout(Duration::from_secs(30), rotation)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        report.rows, 0,
        "the edited row is already under the new key"
    );

    let r = app.get("sales-de-1", &format!("/api/leads/{id}")).await;
    let lead: Value = r.json().await.unwrap();
    assert_eq!(
        lead["contactPerson"], "Erika Musterfrau",
        "the edit survives the rotation"
    );
}

fn binary(db: &TestDb, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_freshplan"));
    cmd.args(args)
        .env_clear()
        .env("DATABASE_URL", db.app_url())
        .env("RUST_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null());
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run freshplan");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("freshplan {args:?} did not exit within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

#[tokio::test]
async fn the_keys_rotate_command_re_encrypts_and_a_second_run_is_a_no_op() {
    let app = TestApp::spawn().await;
    freshplan::demo::seed(&app.state().pool, &app.vault(), 40)
        .await
        .unwrap();
    let before = contacts_as_admin(&app).await;
    let keys = format!("{KEY_1},{KEY_2}");
    let env = [
        ("FRESHPLAN_PII_KEYS", keys.as_str()),
        ("FRESHPLAN_PII_LOOKUP_KEY", LOOKUP_KEY),
    ];

    let out = binary(&app.db, &["keys", "rotate", "--batch", "15"], &env);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.trim(),
        "re-encrypted 40 leads in 3 batches under key `k2`"
    );
    let mut db = app.db.superuser().await;
    let keys_in_use: Vec<String> = sqlx::query("SELECT DISTINCT pii_key_id FROM leads")
        .fetch_all(&mut db)
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(keys_in_use, vec!["k2".to_string()]);

    let out = binary(&app.db, &["keys", "rotate"], &env);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "re-encrypted 0 leads in 0 batches under key `k2`"
    );

    // The running instance (k1 active) still reads k2 only after it is configured: restart it.
    let mut app = app;
    app.restart(Some(&[("FRESHPLAN_PII_KEYS", keys.as_str())]))
        .await;
    assert_eq!(contacts_as_admin(&app).await, before);

    // Without the old key, a rotation refuses and says what to do.
    sqlx::query("UPDATE leads SET pii_key_id = 'k0' WHERE id = (SELECT id FROM leads LIMIT 1)")
        .execute(&mut db)
        .await
        .unwrap();
    let out = binary(&app.db, &["keys", "rotate"], &env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("`k0`, which is not configured"), "{stderr}");
}

#[tokio::test]
async fn serve_refuses_to_start_without_a_pii_key() {
    let db = TestDb::create().await;
    let started = Instant::now();
    let out = binary(
        &db,
        &["serve", "--bind", "127.0.0.1:0"],
        &[("FRESHPLAN_AUTH_JWT_SECRET", common::JWT_SECRET)],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "serve must not start: {stderr}");
    assert!(
        stderr.contains("freshplan.pii.key-file"),
        "the message names the key: {stderr}"
    );
    assert!(
        stderr.contains("freshplan keys generate"),
        "and says how to make one: {stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "it refuses at once"
    );
}

/// Decrypting more than 100 leads in one read is audited (who, how many); smaller pages are not.
#[tokio::test]
async fn bulk_reads_of_more_than_100_decrypted_leads_are_audited() {
    let app = TestApp::spawn().await;
    freshplan::demo::seed(&app.state().pool, &app.vault(), 150)
        .await
        .unwrap();
    let audited = |app: &TestApp| {
        let db = app.db.clone();
        async move {
            let mut su = db.superuser().await;
            sqlx::query_as::<_, (String, String, i64)>(
                "SELECT actor_user_id, actor_role, (details->>'leads')::bigint FROM audit_log \
                 WHERE action = 'PII_BULK_READ' ORDER BY id",
            )
            .fetch_all(&mut su)
            .await
            .unwrap()
        }
    };
    let page = app.get_json("admin", "/api/leads?size=50").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 50);
    assert!(
        audited(&app).await.is_empty(),
        "a page of 50 is not a bulk read"
    );
    let page = app.get_json("admin", "/api/leads?size=500").await;
    let n = page["items"].as_array().unwrap().len() as i64;
    assert!(n > 100, "{n} leads listed");
    assert_eq!(
        audited(&app).await,
        vec![("admin".to_string(), "admin".to_string(), n)]
    );
}

/// Whether a backend of the connection pool named `application_name` waits for a lock that the
/// backend `holder` holds (`pg_blocking_pids`): the positive sign that rotation reached a row
/// locked by `holder` and is waiting for it.
async fn waits_for(app: &TestApp, application_name: &str, holder: i32) -> bool {
    app.count(&format!(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE application_name = '{application_name}' AND {holder} = ANY(pg_blocking_pids(pid))"
    ))
    .await
        > 0
}

/// Holds a lead's row lock as an edit in flight would, until the returned transaction ends.
async fn lock_lead<'c>(
    conn: &'c mut sqlx::PgConnection,
    id: &str,
) -> sqlx::Transaction<'c, sqlx::Postgres> {
    let mut tx = conn.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM leads WHERE id = $1::uuid FOR UPDATE")
        .bind(id)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx
}
