//! Recovery of the event path: a killed listener connection and a stopped service lose nothing and
//! duplicate nothing; readiness tells the truth while the listener is disconnected.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use common::*;
use freshplan::db;
use freshplan::events::envelope::{self, Audience, EventType, NewEvent};
use freshplan::events::outbox;
use freshplan::territory::Territory;
use serde_json::json;
use sqlx::PgConnection;
use uuid::Uuid;

const KILL_LISTENER: &str = "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
     WHERE application_name = 'freshplan-listener' AND datname = current_database()";

async fn kill_listener(su: &mut PgConnection) -> i64 {
    sqlx::query_scalar(KILL_LISTENER)
        .fetch_one(su)
        .await
        .unwrap()
}

/// Sum of `freshplan_events_consumed_total{result="success"}` over every event type.
async fn successes(app: &TestApp) -> f64 {
    let text = app.metrics_text().await;
    EventType::ALL
        .iter()
        .map(|t| metric_in(&text, &consumed(t.as_str(), "success")))
        .sum()
}

#[tokio::test]
async fn a_thousand_events_survive_a_killed_listener_and_a_stopped_service() {
    let mut app = TestApp::spawn().await;
    wait_until(PATIENCE, "listener live", || async {
        app.get("admin", "/q/health/ready").await.status() == 200
    })
    .await;

    // Phase 1: 500 leads over HTTP (4 writers) while the listener's backend is killed again and
    // again.
    let writing = Arc::new(AtomicBool::new(true));
    let mut writers = Vec::new();
    for w in 0..4 {
        let (client, url, token) = (
            app.client.clone(),
            app.url.clone(),
            app.bearer("sales-de-1"),
        );
        writers.push(tokio::spawn(async move {
            for i in 0..125 {
                let r = client
                    .post(format!("{url}/api/leads"))
                    .header("Authorization", &token)
                    .json(&TestApp::lead_body(&format!("Writer {w} lead {i}")))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 201);
            }
        }));
    }
    let killer = {
        let writing = writing.clone();
        let mut su = app.db.superuser().await;
        tokio::spawn(async move {
            let mut kills = 0;
            while writing.load(Ordering::SeqCst) {
                kills += kill_listener(&mut su).await;
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            kills
        })
    };
    for w in writers {
        w.await.unwrap();
    }
    writing.store(false, Ordering::SeqCst);
    let kills = killer.await.unwrap();
    assert!(
        kills >= 2,
        "the listener connection was killed ({kills} times)"
    );
    // Read after the stop, from the instance's own registry: the listener may still be
    // catching up when the writers finish.
    let first_life = app.state().metrics.clone();

    // Phase 2: the service is stopped; 500 more events are written directly through the library
    // (as another module or a second instance would).
    app.stop().await;
    let before_stop_success: f64 = EventType::ALL
        .iter()
        .map(|t| {
            first_life
                .events_consumed
                .with_label_values(&[t.as_str(), "lead-management", "success"])
                .get() as f64
        })
        .sum();
    let pool = app.db.app_pool().await;
    let p = freshplan::demo::principal("sales-de-2").unwrap();
    for _ in 0..5 {
        let mut tx = db::begin_as(&pool, &p).await.unwrap();
        for _ in 0..100 {
            let lead = Uuid::now_v7();
            let now = envelope::micros(Utc::now());
            let ev = NewEvent::new(
                EventType::ActivityLogged,
                Some(lead),
                now,
                envelope::key_activity(Uuid::now_v7()),
                json!({"leadId": lead, "activityType": "NOTE", "ownerUserId": "sales-de-2", "territory": "DE",
                       "userId": "sales-de-2", "occurredAt": envelope::ts(now)}),
                Audience {
                    territory: Territory::DE,
                    owner: Some("sales-de-2".into()),
                    collaborators: vec![],
                },
            );
            assert!(outbox::append(&mut tx, &ev).await.unwrap().is_some());
        }
        tx.commit().await.unwrap();
    }
    assert_eq!(app.count("SELECT count(*) FROM outbox").await, 1000);

    let backlog = 1000 - app.count("SELECT count(*) FROM inbox").await;
    let started = Instant::now();
    app.restart(None).await;
    wait_until(
        Duration::from_secs(30),
        "all 1000 events projected",
        || async { app.projected_events().await >= 1000 },
    )
    .await;
    let recovery = started.elapsed();
    eprintln!("recovery: {kills} listener kills; restart + catch-up of {backlog} pending events took {recovery:?}");

    assert_eq!(
        app.projected_events().await,
        1000,
        "each event counted exactly once"
    );
    assert_eq!(app.count("SELECT count(*) FROM inbox").await, 1000);
    wait_until(PATIENCE, "cursor past every row", || async {
        app.count("SELECT count(*) FROM outbox o, event_cursors c WHERE (o.txid, o.position) > (c.txid, c.position)").await == 0
    })
    .await;
    let total_success = before_stop_success + successes(&app).await;
    assert_eq!(
        total_success, 1000.0,
        "success count over both lives of the instance"
    );
}

#[tokio::test]
async fn readiness_is_down_while_the_listener_is_disconnected_and_up_once_live() {
    let app = TestApp::spawn().await;
    wait_until(PATIENCE, "ready", || async {
        app.get("admin", "/q/health/ready").await.status() == 200
    })
    .await;
    let mut su = app.db.superuser().await;
    // Exactly one kill of the live listener's connection and no more: every state seen after it
    // belongs to the reconnect (a second kill could hit a fresh connection that reports Live
    // for a moment before it notices).
    assert_eq!(
        kill_listener(&mut su).await,
        1,
        "one live listener connection"
    );
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let body = loop {
        let r = app.get("admin", "/q/health/ready").await;
        if r.status() == 503 {
            break r.json::<serde_json::Value>().await.unwrap();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "readiness went DOWN after the listener's connection was killed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(body["status"], "DOWN");
    let handler = body["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "lead-event-handler")
        .unwrap();
    assert_eq!(handler["status"], "DOWN");
    assert!(["disconnected", "catching-up"].contains(&handler["data"]["state"].as_str().unwrap()));

    wait_until(PATIENCE, "ready again after reconnect", || async {
        app.get("admin", "/q/health/ready").await.status() == 200
    })
    .await;
    let body: serde_json::Value = app.get_json("admin", "/q/health/ready").await;
    assert_eq!(body["checks"][1]["data"]["state"], "live");
    // And the reconnected listener still delivers.
    app.create_lead("sales-de-1", TestApp::lead_body("Nach dem Ausfall"))
        .await;
    wait_until(PATIENCE, "event after reconnect consumed", || async {
        app.projected_events().await == 1
    })
    .await;
}
