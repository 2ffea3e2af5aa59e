//! Event delivery: after-commit semantics, exactly-once effect across instances and restarts,
//! out-of-order commits, the cross-module toggle, retention, authorisation of publishers and of
//! consumed envelopes.

mod common;

use std::time::Instant;

use chrono::{DateTime, Utc};
use common::*;
use freshplan::auth::Principal;
use freshplan::db;
use freshplan::events::consumer::Outcome;
use freshplan::events::envelope::{self, Audience, EventType, NewEvent};
use freshplan::events::outbox::Cursor;
use freshplan::events::{outbox, retention};
use freshplan::territory::Territory;
use serde_json::json;
use uuid::Uuid;

const CREATED: &str = "dashboard.lead_created";

async fn inbox_has(app: &TestApp, key: Uuid) -> bool {
    app.count(&format!(
        "SELECT count(*) FROM inbox WHERE idempotency_key = '{key}'"
    ))
    .await
        == 1
}

#[tokio::test]
async fn a_rolled_back_write_publishes_nothing() {
    let app = TestApp::spawn().await;
    let lead = app
        .create_lead("sales-de-1", json!({"companyName": "Sonne", "businessType": "HOTEL", "source": "MESSE", "email": "a@sonne.example"}))
        .await;
    wait_until(PATIENCE, "first event projected", || async {
        app.projected_events().await == 1
    })
    .await;
    let mut stream = app.sse("sales-de-1", None).await;

    // Invalid transition: the transaction rolls back.
    let id = lead["id"].as_str().unwrap();
    let r = app
        .patch("sales-de-1", id, 1, json!({"status": "CONVERTED"}))
        .await;
    assert_eq!(r.status(), 409);
    // Duplicate contact: the INSERT fails inside the transaction.
    let r = app
        .client
        .post(format!("{}/api/leads", app.url))
        .header("Authorization", app.bearer("sales-de-1"))
        .json(&json!({"companyName": "Sonne 2", "businessType": "HOTEL", "source": "MESSE", "email": "a@sonne.example"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    assert_eq!(
        app.count("SELECT count(*) FROM outbox").await,
        1,
        "no outbox row for a failed write"
    );

    // A marker written afterwards must be the very next event on the stream.
    app.create_lead("sales-de-1", TestApp::lead_body("Marker"))
        .await;
    let ev = stream.next(PATIENCE).await.expect("marker event");
    assert_eq!(ev.event, CREATED);
    assert_eq!(sse_json(&ev)["data"]["companyName"], "Marker");
    assert_eq!(app.count("SELECT count(*) FROM outbox").await, 2);
}

#[tokio::test]
async fn a_commit_reaches_every_consumer_exactly_once_on_every_instance() {
    let a = TestApp::spawn().await;
    let b = a.second_instance().await;
    let mut on_a = a.sse("manager-de", None).await;
    let mut on_b = b.sse("manager-de", None).await;

    let lead = a
        .create_lead("sales-de-1", TestApp::lead_body("Hotel Adler"))
        .await;
    let id: Uuid = lead["id"].as_str().unwrap().parse().unwrap();
    let created_at: DateTime<Utc> = lead["createdAt"].as_str().unwrap().parse().unwrap();
    let key = envelope::key_created(id, created_at);
    for stream in [&mut on_a, &mut on_b] {
        let ev = stream
            .next(PATIENCE)
            .await
            .expect("lead_created on each instance");
        assert_eq!(ev.event, CREATED);
        let env = sse_json(&ev);
        assert_cloudevent(&env);
        assert_eq!(env["idempotencykey"], key.to_string());
        assert_eq!(env["subject"], id.to_string());
        assert_eq!(ev.id, env["position"].to_string());
    }
    // A second write through the other instance: the next event on each stream is that one,
    // so the first was not delivered twice.
    let r = b
        .client
        .post(format!("{}/api/leads/{id}/activities", b.url))
        .header("Authorization", b.bearer("sales-de-1"))
        .json(&json!({"type": "CALL"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    for stream in [&mut on_a, &mut on_b] {
        let ev = stream
            .next(PATIENCE)
            .await
            .expect("activity_logged on each instance");
        assert_eq!(ev.event, "dashboard.activity_logged");
    }

    wait_until(PATIENCE, "both instances consumed both events", || async {
        let mut done = true;
        for app in [&a, &b] {
            let text = app.metrics_text().await;
            let n: f64 = ["success", "duplicate"]
                .iter()
                .flat_map(|r| {
                    [
                        metric_in(&text, &consumed(CREATED, r)),
                        metric_in(&text, &consumed("dashboard.activity_logged", r)),
                    ]
                })
                .sum();
            done &= n == 2.0;
        }
        done
    })
    .await;
    let success = a.metric(&consumed(CREATED, "success")).await
        + b.metric(&consumed(CREATED, "success")).await;
    assert_eq!(success, 1.0, "exactly one instance applied the effect");
    assert_eq!(
        a.projected_events().await,
        2,
        "cockpit_daily_events incremented once per event in total"
    );
    assert_eq!(a.count("SELECT count(*) FROM inbox").await, 2);
    let day_owner = a
        .count("SELECT events FROM cockpit_daily_events WHERE owner_user_id = 'sales-de-1' AND event_type = 'dashboard.lead_created' AND territory = 'DE'")
        .await;
    assert_eq!(day_owner, 1);
    assert!(a.metric("freshplan_dashboard_cache_invalidations_total{trigger=\"event\",widget=\"lead-widget\"}").await >= 2.0);
    assert!(
        a.metric("freshplan_dashboard_updates_total{update_type=\"dashboard.lead_created\"}")
            .await
            >= 1.0
    );
    assert!(a.metric("freshplan_event_latency_ms_count{event_type=\"dashboard.lead_created\",path=\"end_to_end\"}").await >= 1.0);
}

#[tokio::test]
async fn two_transactions_that_commit_out_of_order_are_both_processed() {
    let app = TestApp::spawn().await;
    wait_until(PATIENCE, "listener live", || async {
        app.get("admin", "/q/health/ready").await.status() == 200
    })
    .await;
    let mut stream = app.sse("admin", None).await;
    let pool = app.db.app_pool().await;
    let p = freshplan::demo::principal("sales-de-1").unwrap();
    let (ev_a, ev_b) = (
        activity_event("sales-de-1", Territory::DE),
        activity_event("sales-de-1", Territory::DE),
    );

    let mut tx_a = db::begin_as(&pool, &p).await.unwrap();
    assert!(outbox::append(&mut tx_a, &ev_a).await.unwrap().is_some());
    let mut tx_b = db::begin_as(&pool, &p).await.unwrap();
    assert!(outbox::append(&mut tx_b, &ev_b).await.unwrap().is_some());
    tx_b.commit().await.unwrap();

    wait_until(PATIENCE, "B processed while A is open", || async {
        inbox_has(&app, ev_b.key).await
    })
    .await;
    let first = stream.next(PATIENCE).await.expect("B on the stream");
    assert_eq!(sse_json(&first)["idempotencykey"], ev_b.key.to_string());
    assert!(!inbox_has(&app, ev_a.key).await, "A is not committed yet");

    tx_a.commit().await.unwrap();
    wait_until(PATIENCE, "A processed after its late commit", || async {
        inbox_has(&app, ev_a.key).await
    })
    .await;
    let second = stream.next(PATIENCE).await.expect("A on the stream");
    let env = sse_json(&second);
    assert_eq!(env["idempotencykey"], ev_a.key.to_string());
    assert!(
        env["position"].as_i64() < sse_json(&first)["position"].as_i64(),
        "A holds the lower position"
    );
    assert_eq!(app.projected_events().await, 2);
    // The durable cursor passed both once nothing older is running.
    wait_until(PATIENCE, "cursor past both rows", || async {
        app.count("SELECT count(*) FROM outbox o, event_cursors c WHERE (o.txid, o.position) > (c.txid, c.position)").await == 0
    })
    .await;
}

#[tokio::test]
async fn the_same_envelope_delivered_twice_is_processed_once_even_across_a_restart() {
    let off = [("FEATURES_EVENTS_CROSS_MODULE_ENABLED", "false")];
    let mut app = TestApp::spawn_with(&off).await;
    app.create_lead("sales-de-1", TestApp::lead_body("Kantine Nord"))
        .await;
    let rows = outbox::fetch_fresh(&app.db.system_pool().await, 0, Cursor::default(), 100)
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    let c = app.state().dispatcher();
    assert_eq!(
        c.process(&app.state().pool, &rows, Instant::now(), None)
            .await
            .unwrap(),
        vec![Outcome::Success]
    );
    assert_eq!(
        c.process(&app.state().pool, &rows, Instant::now(), None)
            .await
            .unwrap(),
        vec![Outcome::Duplicate]
    );
    assert_eq!(app.projected_events().await, 1);
    assert_eq!(app.metric("freshplan_dedupe_cache_hit_rate").await, 0.5);
    assert_eq!(app.metric("freshplan_dedupe_cache_entries").await, 1.0);

    // A new process starts with an empty dedupe cache: the inbox alone decides for the
    // listener's catch-up, which re-reads the row because the durable cursor never moved.
    app.restart(Some(&[])).await;
    wait_until(PATIENCE, "catch-up saw the duplicate", || async {
        app.metric(&consumed(CREATED, "duplicate")).await == 1.0
    })
    .await;
    let c = app.state().dispatcher();
    assert_eq!(
        c.process(&app.state().pool, &rows, Instant::now(), None)
            .await
            .unwrap(),
        vec![Outcome::Duplicate]
    );
    assert_eq!(app.metric(&consumed(CREATED, "success")).await, 0.0);
    assert_eq!(app.projected_events().await, 1);
    assert_eq!(app.count("SELECT count(*) FROM inbox").await, 1);
}

#[tokio::test]
async fn with_cross_module_events_off_nothing_is_consumed_until_switched_on() {
    let off = [("FEATURES_EVENTS_CROSS_MODULE_ENABLED", "false")];
    let mut app = TestApp::spawn_with(&off).await;
    let ready: serde_json::Value = app.get_json("admin", "/q/health/ready").await;
    assert_eq!(ready["checks"][1]["data"]["state"], "disabled");
    // The doorbell is heard here as every listener would hear it.
    let mut bell = sqlx::postgres::PgListener::connect(&app.db.app_url())
        .await
        .unwrap();
    bell.listen(freshplan::events::listener::CHANNEL)
        .await
        .unwrap();
    for i in 0..3 {
        app.create_lead("sales-de-1", TestApp::lead_body(&format!("Lead {i}")))
            .await;
    }
    // Positive signs that a consumer had its chance: the instance rang the doorbell for the last
    // of the three events (a listener of this instance would have been woken by the same commits,
    // before the ring), and a graceful stop lets every background task finish the batch it is in.
    // Only then is the absence of any consumption evidence. (With the toggle ignored, this
    // fails: all three rows are in the inbox by then.)
    let last = app.count("SELECT max(position) FROM outbox").await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let ring = tokio::time::timeout(left, bell.recv())
            .await
            .unwrap_or_else(|_| panic!("no doorbell ring for position {last} within {PATIENCE:?}"))
            .unwrap();
        if ring.payload().parse::<i64>().unwrap() >= last {
            break;
        }
    }
    let metrics = app.state().metrics.clone();
    app.stop().await;
    assert_eq!(app.count("SELECT count(*) FROM outbox").await, 3);
    assert_eq!(app.count("SELECT count(*) FROM inbox").await, 0);
    assert_eq!(app.count("SELECT count(*) FROM event_cursors").await, 0);
    assert_eq!(app.projected_events().await, 0);
    assert_eq!(
        metrics
            .events_consumed
            .with_label_values(&[CREATED, "lead-management", "success"])
            .get(),
        0
    );

    app.restart(Some(&[])).await;
    wait_until(
        PATIENCE,
        "everything written meanwhile is consumed",
        || async { app.projected_events().await == 3 },
    )
    .await;
    assert_eq!(app.count("SELECT count(*) FROM inbox").await, 3);
    // Counters follow the commit of the effect by a moment.
    wait_until(PATIENCE, "counted as consumed", || async {
        app.metric(&consumed(CREATED, "success")).await == 3.0
    })
    .await;
}

#[tokio::test]
async fn a_forged_envelope_is_denied_and_not_marked_processed() {
    let app = TestApp::spawn().await;
    let mut su = app.db.superuser().await;
    sqlx::query(
        "INSERT INTO outbox (event_id, idempotency_key, event_type, territory, owner_user_id, envelope) \
         VALUES (gen_random_uuid(), gen_random_uuid(), 'dashboard.lead_created', 'DE', 'sales-de-1', \
           jsonb_build_object('specversion', '1.0', 'id', 'x', 'source', 'somewhere-else', \
             'type', 'dashboard.lead_created', 'time', '2026-01-01T00:00:00Z', 'data', '{}'::jsonb))",
    )
    .execute(&mut su)
    .await
    .unwrap();
    app.create_lead("sales-de-1", TestApp::lead_body("Echt"))
        .await;
    wait_until(PATIENCE, "real event consumed", || async {
        app.metric(&consumed(CREATED, "success")).await == 1.0
    })
    .await;
    wait_until(PATIENCE, "forged event denied", || async {
        app.metric(&consumed(CREATED, "denied")).await == 1.0
    })
    .await;
    assert_eq!(
        app.count("SELECT count(*) FROM inbox").await,
        1,
        "the forged event has no inbox row"
    );
    assert_eq!(app.projected_events().await, 1);
    wait_until(PATIENCE, "cursor passes the denied row", || async {
        app.count("SELECT count(*) FROM outbox o, event_cursors c WHERE (o.txid, o.position) > (c.txid, c.position)").await == 0
    })
    .await;
}

#[tokio::test]
async fn retention_prunes_consumed_outbox_rows_and_old_inbox_rows_only() {
    let mut app = TestApp::spawn().await;
    app.create_lead("sales-de-1", TestApp::lead_body("Alt"))
        .await;
    wait_until(PATIENCE, "cursor past the first event", || async {
        app.count("SELECT count(*) FROM outbox o, event_cursors c WHERE (o.txid, o.position) > (c.txid, c.position)").await == 0
            && app.count("SELECT count(*) FROM event_cursors").await == 1
    })
    .await;
    let settings = app.state().settings.events.clone();
    app.stop().await;
    // Written while no consumer runs: beyond the cursor, so never pruned however old.
    let pool = app.db.app_pool().await;
    let mut tx = db::begin_as(&pool, &Principal::system()).await.unwrap();
    let pending = activity_event("sales-de-1", Territory::DE);
    outbox::append(&mut tx, &pending).await.unwrap();
    tx.commit().await.unwrap();
    let mut su = app.db.superuser().await;
    sqlx::query("UPDATE outbox SET created_at = now() - interval '200 hours'")
        .execute(&mut su)
        .await
        .unwrap();
    sqlx::query("UPDATE inbox SET processed_at = now() - interval '400 hours'")
        .execute(&mut su)
        .await
        .unwrap();

    let pruned = retention::prune(&pool, &settings).await.unwrap();
    assert_eq!(
        pruned,
        retention::Pruned {
            outbox: 1,
            inbox: 1
        }
    );
    let left: Vec<Uuid> = sqlx::query_scalar("SELECT idempotency_key FROM outbox")
        .fetch_all(&mut su)
        .await
        .unwrap();
    assert_eq!(left, vec![pending.key]);
}

#[tokio::test]
async fn an_unauthenticated_publisher_is_refused_and_counted() {
    let app = TestApp::spawn().await;
    let r = app
        .client
        .post(format!("{}/api/leads", app.url))
        .json(&TestApp::lead_body("Anonym"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let sample = "freshplan_events_published_total{event_type=\"dashboard.lead_created\",module=\"lead-management\",result=\"unauthenticated\"}";
    assert_eq!(app.metric(sample).await, 1.0);
    assert_eq!(app.count("SELECT count(*) FROM outbox").await, 0);

    // An identified principal whose role may not make the change is counted `denied`.
    let r = app
        .client
        .post(format!("{}/api/leads", app.url))
        .header("Authorization", app.bearer("viewer-de"))
        .json(&TestApp::lead_body("Nur lesen"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let sample = "freshplan_events_published_total{event_type=\"dashboard.lead_created\",module=\"lead-management\",result=\"denied\"}";
    assert_eq!(app.metric(sample).await, 1.0);
    assert_eq!(app.count("SELECT count(*) FROM outbox").await, 0);
}

#[tokio::test]
async fn allowing_unauthenticated_publishers_acts_as_an_ordinary_anonymous_publisher_never_system()
{
    let app =
        TestApp::spawn_with(&[("FRESHPLAN_SECURITY_ALLOW_UNAUTHENTICATED_PUBLISHER", "true")])
            .await;
    let r = app
        .client
        .post(format!("{}/api/leads", app.url))
        .json(&TestApp::lead_body("Testlauf"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let lead: serde_json::Value = r.json().await.unwrap();
    assert_eq!(lead["ownerUserId"], "anonymous-publisher");
    assert_eq!(
        app.count("SELECT count(*) FROM outbox WHERE owner_user_id = 'anonymous-publisher'")
            .await,
        1
    );
    let sample = "freshplan_events_published_total{event_type=\"dashboard.lead_created\",module=\"lead-management\",result=\"success\"}";
    assert_eq!(app.metric(sample).await, 1.0);
    wait_until(PATIENCE, "consumed", || async {
        app.projected_events().await == 1
    })
    .await;
}

#[tokio::test]
async fn a_transaction_that_fails_publishes_nothing_and_counts_a_failure() {
    let app = TestApp::spawn().await;
    let sales = freshplan::demo::principal("sales-de-1").unwrap();
    let now = envelope::micros(Utc::now());
    let lead = Uuid::now_v7();
    let ev = NewEvent::new(
        EventType::ActivityLogged,
        Some(lead),
        now,
        envelope::key_activity(Uuid::now_v7()),
        json!({"leadId": lead, "activityType": "CALL", "ownerUserId": "sales-de-1", "territory": "DE",
               "userId": "sales-de-1", "occurredAt": envelope::ts(now)}),
        Audience {
            territory: Territory::DE,
            owner: Some("sales-de-1".into()),
            collaborators: vec![],
        },
    );
    let mut tx = db::begin_as(&app.state().pool, &sales).await.unwrap();
    // The business part of the transaction fails; the handler would not notice before commit.
    assert!(sqlx::query("SELECT 1 / 0").execute(&mut *tx).await.is_err());
    assert!(app
        .state()
        .publisher
        .commit(tx, std::slice::from_ref(&ev))
        .await
        .is_err());
    let sample = "freshplan_events_published_total{event_type=\"dashboard.activity_logged\",module=\"lead-management\",result=\"failure\"}";
    assert_eq!(app.metric(sample).await, 1.0);
    assert_eq!(app.count("SELECT count(*) FROM outbox").await, 0);
}
