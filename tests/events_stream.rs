//! The SSE stream `/api/cockpit/stream`: audience isolation, `Last-Event-ID` resume, the 8 KB
//! truncation stub with fetch by reference, CloudEvents conformance, overflow resync, 401.

mod common;

use chrono::Utc;
use common::*;
use freshplan::auth::Principal;
use freshplan::db;
use freshplan::events::envelope::{self, Audience, EventType, NewEvent, MAX_FRAME_BYTES};
use freshplan::events::outbox;
use freshplan::territory::Territory;
use serde_json::{json, Value};
use uuid::Uuid;

fn company(ev: &eventsource_stream::Event) -> String {
    sse_json(ev)["data"]["companyName"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Checks the frame's CloudEvents form and that `id:` is its position.
fn checked(ev: &eventsource_stream::Event) -> Value {
    let env = sse_json(ev);
    assert_cloudevent(&env);
    assert_eq!(ev.id, env["position"].to_string());
    assert_eq!(ev.event, env["type"].as_str().unwrap());
    env
}

#[tokio::test]
async fn each_stream_carries_exactly_the_events_of_its_audience() {
    let app = TestApp::spawn().await;
    let users = [
        "sales-de-1",
        "sales-de-2",
        "manager-de",
        "viewer-de",
        "manager-at",
        "admin",
    ];
    let mut streams = Vec::new();
    for u in users {
        streams.push(app.sse(u, None).await);
    }
    app.create_lead("sales-de-1", TestApp::lead_body("E1 own"))
        .await;
    app.create_lead("sales-de-2", json!({"companyName": "E2 shared", "businessType": "HOTEL", "source": "MESSE", "collaborators": ["sales-de-1"]}))
        .await;
    app.create_lead("sales-de-2", TestApp::lead_body("E3 other"))
        .await;
    app.create_lead("sales-at-1", TestApp::lead_body("E4 austria"))
        .await;
    // The last event of each audience, so every stream knows when it has seen everything.
    app.create_lead("sales-de-1", TestApp::lead_body("M sales-de-1"))
        .await;
    app.create_lead("sales-de-2", TestApp::lead_body("M sales-de-2"))
        .await;
    app.create_lead("sales-at-1", TestApp::lead_body("M sales-at-1"))
        .await;

    let de_all = vec![
        "E1 own",
        "E2 shared",
        "E3 other",
        "M sales-de-1",
        "M sales-de-2",
    ];
    let expected: Vec<Vec<&str>> = vec![
        vec!["E1 own", "E2 shared", "M sales-de-1"], // owner or collaborator only
        vec!["E2 shared", "E3 other", "M sales-de-2"],
        de_all.clone(), // the whole territory, never AT
        de_all,
        vec!["E4 austria", "M sales-at-1"],
        vec![
            "E1 own",
            "E2 shared",
            "E3 other",
            "E4 austria",
            "M sales-de-1",
            "M sales-de-2",
            "M sales-at-1",
        ],
    ];
    let mut manager_positions = Vec::new();
    for ((user, stream), want) in users.iter().zip(streams.iter_mut()).zip(expected) {
        if *user == "viewer-de" {
            // Aggregate frames: the DE manager's events, without company name or lead id.
            let mut positions = Vec::new();
            for _ in 0..want.len() {
                let e = stream.next(PATIENCE).await.expect("viewer frame");
                let env = checked(&e);
                assert!(env.get("subject").is_none(), "{env}");
                assert!(env["data"].get("companyName").is_none(), "{env}");
                assert!(env["data"].get("leadId").is_none(), "{env}");
                assert_eq!(env["data"]["territory"], "DE");
                positions.push(e.id.parse::<i64>().unwrap());
            }
            assert_eq!(positions, manager_positions, "stream of {user}");
            continue;
        }
        let last = *want.last().unwrap();
        let got = stream.until(last, |e| company(e) == last).await;
        got.iter().for_each(|e| {
            checked(e);
        });
        let names: Vec<String> = got.iter().map(company).collect();
        assert_eq!(names, want, "stream of {user}");
        let positions: Vec<i64> = got.iter().map(|e| e.id.parse().unwrap()).collect();
        assert!(
            positions.windows(2).all(|w| w[0] < w[1]),
            "in order, no duplicates: {positions:?}"
        );
        if *user == "manager-de" {
            manager_positions = positions;
        }
    }
    assert_eq!(
        app.metric("freshplan_dashboard_active_widgets{type=\"sse\"}")
            .await,
        6.0
    );
    drop(streams);
    wait_until(PATIENCE, "closed streams unregister", || async {
        app.metric("freshplan_dashboard_active_widgets{type=\"sse\"}")
            .await
            == 0.0
    })
    .await;
}

#[tokio::test]
async fn resuming_with_last_event_id_misses_nothing_and_repeats_nothing() {
    let app = TestApp::spawn().await;
    let mut stream = app.sse("sales-de-1", None).await;
    app.create_lead("sales-de-1", TestApp::lead_body("A")).await;
    app.create_lead("sales-de-1", TestApp::lead_body("B")).await;
    let got = stream.until("B", |e| company(e) == "B").await;
    let last: i64 = got.last().unwrap().id.parse().unwrap();
    drop(stream);

    // Written while the client is away, one of them outside its audience.
    for name in ["C", "D"] {
        app.create_lead("sales-de-1", TestApp::lead_body(name))
            .await;
    }
    app.create_lead("sales-de-2", TestApp::lead_body("not mine"))
        .await;
    app.create_lead("sales-de-1", TestApp::lead_body("E")).await;
    wait_until(PATIENCE, "written events consumed", || async {
        app.projected_events().await == 6
    })
    .await;

    let mut resumed = app.sse("sales-de-1", Some(last)).await;
    let replayed = resumed.until("E", |e| company(e) == "E").await;
    assert_eq!(
        replayed.iter().map(company).collect::<Vec<_>>(),
        ["C", "D", "E"]
    );
    replayed.iter().for_each(|e| {
        checked(e);
    });
    // Then live, with nothing repeated in between.
    app.create_lead("sales-de-1", TestApp::lead_body("F")).await;
    let live = resumed
        .next(PATIENCE)
        .await
        .expect("live event after replay");
    assert_eq!(company(&live), "F");
    let ids: Vec<i64> = replayed
        .iter()
        .chain([&live])
        .map(|e| e.id.parse().unwrap())
        .collect();
    assert!(
        ids[0] > last && ids.windows(2).all(|w| w[0] < w[1]),
        "{ids:?}"
    );
}

#[tokio::test]
async fn an_oversized_event_arrives_as_a_stub_and_is_fetched_by_reference_by_its_audience_only() {
    let app = TestApp::spawn().await;
    let mut owner = app.sse("sales-de-1", None).await;
    let mut admin = app.sse("admin", None).await;

    let lead = Uuid::now_v7();
    let now = envelope::micros(Utc::now());
    let big = NewEvent::new(
        EventType::ActivityLogged,
        Some(lead),
        now,
        envelope::key_activity(Uuid::now_v7()),
        json!({"leadId": lead, "activityType": "NOTE", "ownerUserId": "sales-de-1", "territory": "DE",
               "userId": "sales-de-1", "occurredAt": envelope::ts(now), "note": "x".repeat(9000)}),
        Audience {
            territory: Territory::DE,
            owner: Some("sales-de-1".into()),
            collaborators: vec![],
        },
    );
    let tx = db::begin_as(
        &app.state().pool,
        &freshplan::demo::principal("sales-de-1").unwrap(),
    )
    .await
    .unwrap();
    app.state()
        .publisher
        .commit(tx, std::slice::from_ref(&big))
        .await
        .unwrap();

    for stream in [&mut owner, &mut admin] {
        let ev = stream.next(PATIENCE).await.expect("the stub");
        assert!(
            ev.data.len() <= MAX_FRAME_BYTES,
            "frame is {} bytes",
            ev.data.len()
        );
        let stub = checked(&ev);
        assert_eq!(stub["data"]["truncated"], true);
        assert_eq!(stub["data"]["reference"], big.key.to_string());
        assert!(stub["data"]["original_size_bytes"].as_u64().unwrap() > MAX_FRAME_BYTES as u64);
        assert_eq!(stub["idempotencykey"], big.key.to_string());
        assert_eq!(stub["type"], "dashboard.activity_logged");
    }

    let path = format!("/api/events/{}", big.key);
    for user in ["sales-de-1", "manager-de", "admin"] {
        let r = app.get(user, &path).await;
        assert_eq!(r.status(), 200, "{user} is in the audience");
        let full: Value = r.json().await.unwrap();
        assert_cloudevent(&full);
        assert_eq!(full["data"]["note"].as_str().unwrap().len(), 9000);
        assert!(full["position"].as_i64().unwrap() > 0);
    }
    for user in ["sales-de-2", "manager-at"] {
        let r = app.get(user, &path).await;
        assert_eq!(r.status(), 404, "{user} is outside the audience");
        assert_eq!(r.headers()["content-type"], "application/problem+json");
    }
}

#[tokio::test]
async fn a_subscriber_that_falls_behind_gets_one_resync_instead_of_an_unbounded_queue() {
    let app = TestApp::spawn_with(&[("FRESHPLAN_EVENTS_SSE_QUEUE_SIZE", "2")]).await;
    let mut stream = app.sse("admin", None).await;
    // 200 events in one transaction reach the hub in one batch, far faster than the stream drains.
    let mut tx = db::begin_as(&app.state().pool, &Principal::system())
        .await
        .unwrap();
    for i in 0..200 {
        let lead = Uuid::now_v7();
        let now = envelope::micros(Utc::now());
        let ev = NewEvent::new(
            EventType::LeadCreated,
            Some(lead),
            now,
            envelope::key_created(lead, now),
            json!({"leadId": lead, "companyName": format!("Bulk {i}"), "status": "REGISTERED",
                   "ownerUserId": "sales-de-1", "territory": "DE", "createdAt": envelope::ts(now)}),
            Audience {
                territory: Territory::DE,
                owner: Some("sales-de-1".into()),
                collaborators: vec![],
            },
        );
        outbox::append(&mut tx, &ev).await.unwrap();
    }
    tx.commit().await.unwrap();
    let got = stream.until("resync", |e| e.event == "resync").await;
    assert!(
        got.len() < 200,
        "the backlog was dropped, not buffered ({} events before resync)",
        got.len()
    );
    // The stream stays usable afterwards.
    app.create_lead("sales-de-1", TestApp::lead_body("Danach"))
        .await;
    stream
        .until("the next live event", |e| company(e) == "Danach")
        .await;
}

#[tokio::test]
async fn the_stream_requires_an_identity() {
    let app = TestApp::spawn().await;
    let r = app
        .client
        .get(format!("{}/api/cockpit/stream", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let openapi: Value = app.public_json("/q/openapi").await;
    assert!(
        openapi["paths"]["/api/cockpit/stream"]["get"].is_object(),
        "documented in OpenAPI"
    );
}
