//! The lead API as a client sees it: creation, optimistic locking, the status machine, errors
//! as problem+json, pagination and filters, and the audit trail every write leaves.

mod common;

use common::TestApp;
use serde_json::{json, Value};

async fn problem(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    assert_eq!(
        r.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/problem+json"),
        "errors are problem+json"
    );
    (status, r.json().await.unwrap())
}

fn slug(p: &Value) -> &str {
    p["type"].as_str().unwrap().rsplit('/').next().unwrap()
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

#[tokio::test]
async fn creating_a_lead_answers_201_with_location_etag_and_the_creator_as_owner() {
    let app = TestApp::spawn().await;
    let r = app
        .client
        .post(format!("{}/api/leads", app.url))
        .header("Authorization", app.bearer("sales-de-1"))
        .json(&json!({"companyName": "Restaurant Sonne GmbH", "city": "München", "businessType": "RESTAURANT",
                      "source": "MESSE", "emailConsent": true, "collaborators": ["sales-de-2"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["etag"], "\"1\"");
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let lead: Value = r.json().await.unwrap();
    assert_eq!(
        location,
        format!("/api/leads/{}", lead["id"].as_str().unwrap())
    );
    assert_eq!(lead["ownerUserId"], "sales-de-1");
    assert_eq!(lead["territory"], "DE");
    assert_eq!(lead["status"], "REGISTERED");
    assert_eq!(lead["collaborators"], json!(["sales-de-2"]));
    assert_eq!(lead["version"], 1);
    let got = app.get("sales-de-2", &location).await;
    assert_eq!(got.status(), 200, "collaborator sees it");
    // CREATED activity written with it.
    let acts: Value = app
        .get_json("sales-de-1", &format!("{location}/activities"))
        .await;
    assert_eq!(acts[0]["type"], "CREATED");
}

#[tokio::test]
async fn territory_is_the_creators_own_for_sales_and_managers_and_only_an_admin_chooses_another() {
    let app = TestApp::spawn().await;
    let mut elsewhere = TestApp::lead_body("Elsewhere");
    elsewhere["territory"] = json!("AT");

    // Neither a sales user nor a manager creates a lead in another territory.
    for user in ["sales-de-1", "manager-de"] {
        let (status, p) = problem(post_lead(&app, user, &elsewhere).await).await;
        assert_eq!((status, slug(&p)), (403, "forbidden"), "{user}: {p}");
    }
    assert_eq!(
        app.get_json("admin", "/api/leads?size=10").await["total"],
        0,
        "a refused create leaves no lead behind"
    );

    // A manager's lead is in the manager's territory, named or not.
    let mut own = TestApp::lead_body("Manager named DE");
    own["territory"] = json!("DE");
    let named = app.create_lead("manager-de", own).await;
    let unnamed = app
        .create_lead("manager-de", TestApp::lead_body("Manager default"))
        .await;
    for lead in [&named, &unnamed] {
        assert_eq!(lead["territory"], "DE");
        assert_eq!(lead["ownerUserId"], "manager-de");
    }

    // An admin chooses another territory; that territory's manager then sees the lead.
    let lead = app.create_lead("admin", elsewhere).await;
    assert_eq!(lead["territory"], "AT");
    assert_eq!(
        app.get(
            "manager-at",
            &format!("/api/leads/{}", lead["id"].as_str().unwrap())
        )
        .await
        .status(),
        200
    );
}

#[tokio::test]
async fn patch_needs_if_match_and_refuses_a_stale_version() {
    let app = TestApp::spawn().await;
    let lead = app
        .create_lead("sales-de-1", TestApp::lead_body("Locking"))
        .await;
    let id = lead["id"].as_str().unwrap();
    let url = format!("{}/api/leads/{id}", app.url);

    let r = app
        .client
        .patch(&url)
        .header("Authorization", app.bearer("sales-de-1"))
        .json(&json!({"status": "ACTIVE"}))
        .send()
        .await
        .unwrap();
    let (status, p) = problem(r).await;
    assert_eq!((status, slug(&p)), (428, "precondition-required"));

    let r = app
        .patch("sales-de-1", id, 1, json!({"status": "ACTIVE"}))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["etag"], "\"2\"");
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        (body["status"].as_str(), body["version"].as_i64()),
        (Some("ACTIVE"), Some(2))
    );

    let (status, p) = problem(
        app.patch("sales-de-1", id, 1, json!({"emailConsent": true}))
            .await,
    )
    .await;
    assert_eq!((status, slug(&p)), (412, "stale-version"));
    assert_eq!(p["currentVersion"], 2);
    let got: Value = app
        .get_json("sales-de-1", &format!("/api/leads/{id}"))
        .await;
    assert_eq!(
        got["emailConsent"], false,
        "a refused change leaves nothing behind"
    );
}

#[tokio::test]
async fn the_status_machine_is_enforced_with_409_invalid_transition() {
    let app = TestApp::spawn().await;
    let lead = app
        .create_lead("sales-de-1", TestApp::lead_body("Machine"))
        .await;
    let id = lead["id"].as_str().unwrap();
    let (status, p) = problem(
        app.patch("sales-de-1", id, 1, json!({"status": "CONVERTED"}))
            .await,
    )
    .await;
    assert_eq!((status, slug(&p)), (409, "invalid-transition"));
    assert!(p["detail"]
        .as_str()
        .unwrap()
        .contains("REGISTERED → CONVERTED"));

    // REGISTERED → EXPIRED; a sales user may not reactivate, a manager may.
    assert_eq!(
        app.patch(
            "sales-de-1",
            id,
            1,
            json!({"status": "EXPIRED", "reason": "no answer"})
        )
        .await
        .status(),
        200
    );
    let (status, _) = problem(
        app.patch("sales-de-1", id, 2, json!({"status": "ACTIVE"}))
            .await,
    )
    .await;
    assert_eq!(status, 409);
    assert_eq!(
        app.patch("manager-de", id, 2, json!({"status": "ACTIVE"}))
            .await
            .status(),
        200
    );

    // A stopped clock allows only deletion.
    assert_eq!(
        app.patch("sales-de-1", id, 3, json!({"clockStopped": true}))
            .await
            .status(),
        200
    );
    let (status, p) = problem(
        app.patch("sales-de-1", id, 4, json!({"status": "QUALIFIED"}))
            .await,
    )
    .await;
    assert_eq!(status, 409);
    assert!(p["detail"].as_str().unwrap().contains("clock"));
    assert_eq!(
        app.patch("sales-de-1", id, 4, json!({"status": "DELETED"}))
            .await
            .status(),
        200
    );
    // Deleted leads are terminal and gone from the default list.
    let (status, _) = problem(
        app.patch("manager-de", id, 5, json!({"status": "ACTIVE"}))
            .await,
    )
    .await;
    assert_eq!(status, 409);
    let list: Value = app.get_json("sales-de-1", "/api/leads").await;
    assert_eq!(list["total"], 0);
    let deleted: Value = app
        .get_json("sales-de-1", "/api/leads?status=DELETED")
        .await;
    assert_eq!(deleted["total"], 1);

    // Every change wrote a STATUS_CHANGE activity.
    let acts: Value = app
        .get_json("manager-de", &format!("/api/leads/{id}/activities"))
        .await;
    let changes = acts
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["type"] == "STATUS_CHANGE")
        .count();
    assert_eq!(changes, 3);
}

#[tokio::test]
async fn requests_without_identity_get_401_and_viewers_get_403_for_writes_and_details() {
    let app = TestApp::spawn().await;
    let r = app
        .client
        .get(format!("{}/api/leads", app.url))
        .send()
        .await
        .unwrap();
    let (status, p) = problem(r).await;
    assert_eq!((status, slug(&p)), (401, "unauthenticated"));
    let r = app
        .client
        .get(format!("{}/api/leads", app.url))
        .header("Authorization", "Bearer not.a.token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = app
        .client
        .post(format!("{}/api/leads", app.url))
        .json(&TestApp::lead_body("x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    let lead = app
        .create_lead("sales-de-1", TestApp::lead_body("Viewer"))
        .await;
    let id = lead["id"].as_str().unwrap();
    let r = app
        .client
        .post(format!("{}/api/leads", app.url))
        .header("Authorization", app.bearer("viewer-de"))
        .json(&TestApp::lead_body("x"))
        .send()
        .await
        .unwrap();
    let (status, p) = problem(r).await;
    assert_eq!((status, slug(&p)), (403, "forbidden"));
    assert_eq!(
        app.patch("viewer-de", id, 1, json!({"status": "ACTIVE"}))
            .await
            .status(),
        403
    );
    assert_eq!(app.get("viewer-de", "/api/leads").await.status(), 403);
    assert_eq!(
        app.get("viewer-de", &format!("/api/leads/{id}"))
            .await
            .status(),
        403
    );
}

#[tokio::test]
async fn bad_input_gets_a_clear_4xx_problem_never_a_500() {
    let app = TestApp::spawn().await;
    let post = |body: String, ct: &'static str| {
        app.client
            .post(format!("{}/api/leads", app.url))
            .header("Authorization", app.bearer("sales-de-1"))
            .header("content-type", ct)
            .body(body)
            .send()
    };
    let (s, p) = problem(
        post("{\"companyName\": ".into(), "application/json")
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((s, slug(&p)), (400, "malformed-json"));
    let (s, p) = problem(
        post(
            json!({"companyName": "x", "businessType": "HOTEL", "source": "MESSE", "hacker": 1})
                .to_string(),
            "application/json",
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!((s, slug(&p)), (422, "invalid-field"));
    assert!(
        p["detail"].as_str().unwrap().contains("hacker"),
        "names the unknown field: {p}"
    );
    let (s, p) = problem(
        post(
            json!({"companyName": "x", "businessType": "SPACESHIP", "source": "MESSE"}).to_string(),
            "application/json",
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!((s, slug(&p)), (422, "invalid-field"));
    assert!(p["detail"].as_str().unwrap().contains("SPACESHIP"));
    let (s, _) = problem(
        post(
            json!({"businessType": "HOTEL", "source": "MESSE"}).to_string(),
            "application/json",
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(s, 422, "companyName is required");
    let (s, _) = problem(
        post(
            json!({"companyName": "  ", "businessType": "HOTEL", "source": "MESSE"}).to_string(),
            "application/json",
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(s, 422);
    let (s, p) = problem(post(json!({"companyName": "x", "businessType": "HOTEL", "source": "MESSE", "email": "nope"}).to_string(), "application/json").await.unwrap()).await;
    assert_eq!((s, slug(&p)), (422, "invalid-field"));
    assert!(
        !p["detail"].as_str().unwrap().contains("nope"),
        "contact values are not echoed"
    );
    let (s, p) = problem(post("{}".into(), "text/plain").await.unwrap()).await;
    assert_eq!((s, slug(&p)), (415, "unsupported-media-type"));
    let huge =
        json!({"companyName": "x".repeat(100_000), "businessType": "HOTEL", "source": "MESSE"})
            .to_string();
    let (s, p) = problem(post(huge, "application/json").await.unwrap()).await;
    assert_eq!((s, slug(&p)), (413, "payload-too-large"));
    let (s, _) = problem(post(json!({"companyName": "x", "businessType": "HOTEL", "source": "MESSE", "collaborators": ["nobody"]}).to_string(), "application/json").await.unwrap()).await;
    assert_eq!(s, 422, "collaborators must be users of the territory");

    assert_eq!(
        app.get("sales-de-1", "/api/leads/not-a-uuid")
            .await
            .status(),
        404
    );
    assert_eq!(
        app.get("sales-de-1", "/api/leads?size=0").await.status(),
        422
    );
    assert_eq!(
        app.get("sales-de-1", "/api/leads?status=NOPE")
            .await
            .status(),
        422
    );
    assert_eq!(
        app.get("sales-de-1", "/api/leads?page=x").await.status(),
        422
    );
    let lead = app
        .create_lead("sales-de-1", TestApp::lead_body("Bad patch"))
        .await;
    let id = lead["id"].as_str().unwrap();
    let (s, _) = problem(
        app.patch("sales-de-1", id, 1, json!({"status": "WHATEVER"}))
            .await,
    )
    .await;
    assert_eq!(s, 422);
    let r = app
        .client
        .patch(format!("{}/api/leads/{id}", app.url))
        .header("Authorization", app.bearer("sales-de-1"))
        .header("If-Match", "garbage")
        .json(&json!({"status": "ACTIVE"}))
        .send()
        .await
        .unwrap();
    assert_eq!(problem(r).await.0, 422);
    let r = app
        .client
        .post(format!("{}/api/leads/{id}/activities", app.url))
        .header("Authorization", app.bearer("sales-de-1"))
        .json(&json!({"type": "STATUS_CHANGE"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        problem(r).await.0,
        422,
        "system activity types cannot be logged by hand"
    );
    let unknown = app.get("sales-de-1", "/api/nothing-here").await;
    assert_eq!(problem(unknown).await.0, 404);
}

#[tokio::test]
async fn lists_filter_and_paginate_what_the_caller_may_see() {
    let app = TestApp::spawn().await;
    for i in 0..7 {
        let mut body = TestApp::lead_body(&format!("Hotel Alpenblick {i}"));
        body["city"] = json!(if i % 2 == 0 { "Berlin" } else { "Köln" });
        app.create_lead("sales-de-1", body).await;
    }
    app.create_lead("sales-de-2", TestApp::lead_body("Kantine Nord"))
        .await;
    let page: Value = app.get_json("manager-de", "/api/leads?size=3&page=2").await;
    assert_eq!(
        (
            page["total"].as_i64(),
            page["items"].as_array().unwrap().len()
        ),
        (Some(8), 2)
    );
    let page: Value = app
        .get_json("manager-de", "/api/leads?owner=sales-de-2")
        .await;
    assert_eq!(page["total"], 1);
    let page: Value = app.get_json("manager-de", "/api/leads?q=k%C3%B6ln").await;
    assert_eq!(page["total"], 3, "q matches city case-insensitively");
    let page: Value = app
        .get_json("manager-de", "/api/leads?q=alpenblick%205")
        .await;
    assert_eq!(page["total"], 1);
    let page: Value = app
        .get_json("manager-de", "/api/leads?status=registered")
        .await;
    assert_eq!(page["total"], 8);
    let page: Value = app.get_json("sales-de-2", "/api/leads?q=Hotel").await;
    assert_eq!(page["total"], 0, "filters never widen the view");
}

#[tokio::test]
async fn owner_reassignment_and_activities_leave_activities_and_audit_rows() {
    let app = TestApp::spawn().await;
    let lead = app
        .create_lead("sales-de-1", TestApp::lead_body("Audit me"))
        .await;
    let id = lead["id"].as_str().unwrap();
    let r = app
        .client
        .post(format!("{}/api/leads/{id}/activities", app.url))
        .header("Authorization", app.bearer("sales-de-1"))
        .json(&json!({"type": "MEETING", "description": "Kitchen tour", "outcome": "SUCCESSFUL"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let act: Value = r.json().await.unwrap();
    assert_eq!(
        (act["type"].as_str(), act["meaningful"].as_bool()),
        (Some("MEETING"), Some(true))
    );
    let got: Value = app
        .get_json("sales-de-1", &format!("/api/leads/{id}"))
        .await;
    assert_eq!(got["lastActivityAt"], act["occurredAt"]);

    let (s, _) = (
        app.patch("manager-de", id, 1, json!({"ownerUserId": "sales-at-1"}))
            .await
            .status(),
        (),
    );
    assert_eq!(s, 422, "owner must belong to the lead's territory");
    let r = app
        .patch("manager-de", id, 1, json!({"ownerUserId": "sales-de-2"}))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        app.get("sales-de-1", &format!("/api/leads/{id}"))
            .await
            .status(),
        404,
        "old owner loses the lead"
    );
    assert_eq!(
        app.get("sales-de-2", &format!("/api/leads/{id}"))
            .await
            .status(),
        200
    );

    let mut db = app.db.superuser().await;
    let actions: Vec<String> =
        sqlx::query_scalar("SELECT action FROM audit_log WHERE entity_id = $1 ORDER BY id")
            .bind(id)
            .fetch_all(&mut db)
            .await
            .unwrap();
    assert_eq!(actions, ["LEAD_CREATED", "ACTIVITY_LOGGED", "LEAD_UPDATED"]);
    let kinds: Vec<String> = sqlx::query_scalar("SELECT activity_type FROM lead_activities WHERE lead_id = $1::uuid ORDER BY created_at, id")
        .bind(id)
        .fetch_all(&mut db)
        .await
        .unwrap();
    assert_eq!(kinds, ["CREATED", "MEETING", "LEAD_ASSIGNED"]);
}

#[tokio::test]
async fn health_metrics_and_openapi_are_served_and_metrics_can_be_switched_off() {
    let app = TestApp::spawn().await;
    let live: Value = app.public_json("/q/health/live").await;
    assert_eq!(live["status"], "UP");
    let ready = app
        .client
        .get(format!("{}/q/health/ready", app.url))
        .send()
        .await
        .unwrap();
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["checks"][0]["name"], "database");
    assert_eq!(body["checks"][0]["status"], "UP");
    assert_eq!(body["checks"][1]["name"], "lead-event-handler");

    app.create_lead("sales-de-1", TestApp::lead_body("Counted"))
        .await;
    let metrics = app.metrics_text().await;
    assert!(
        metrics.contains(
            r#"freshplan_http_requests_total{method="POST",route="/api/leads",status="201"} 1"#
        ),
        "{metrics}"
    );
    assert!(metrics.contains(r#"freshplan_events_published_total{event_type="dashboard.lead_created",module="lead-management",result="success"} 1"#));

    let doc: Value = app.public_json("/q/openapi").await;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    for path in [
        "/api/leads",
        "/api/leads/{id}",
        "/api/leads/{id}/activities",
        "/api/events/{key}",
    ] {
        assert!(doc["paths"].get(path).is_some(), "OpenAPI documents {path}");
    }

    let mut off = TestApp::spawn_with(&[("FEATURES_METRICS_PROMETHEUS_ENABLED", "false")]).await;
    let (s, p) = problem(
        off.client
            .get(format!("{}/q/metrics", off.url))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((s, slug(&p)), (404, "feature-disabled"));
    off.stop().await;
}

#[tokio::test]
async fn http_metrics_label_requests_by_route_template_never_by_raw_id() {
    let app = TestApp::spawn().await;
    let lead = app
        .create_lead("sales-de-1", TestApp::lead_body("Labelled"))
        .await;
    let id = lead["id"].as_str().unwrap();
    let unknown = uuid::Uuid::new_v4().to_string();
    let unmatched = uuid::Uuid::new_v4().to_string();
    let requests = [
        (format!("/api/leads/{id}"), 200),
        (format!("/api/leads/{id}/activities"), 200),
        (format!("/api/leads/{unknown}"), 404),
        (format!("/no-such-route/{unmatched}"), 404),
    ];
    for (path, status) in &requests {
        assert_eq!(
            app.get("sales-de-1", path).await.status(),
            *status,
            "{path}"
        );
    }

    let metrics = app.metrics_text().await;
    for sample in [
        r#"freshplan_http_requests_total{method="GET",route="/api/leads/{id}",status="200"} 1"#,
        r#"freshplan_http_requests_total{method="GET",route="/api/leads/{id}",status="404"} 1"#,
        r#"freshplan_http_requests_total{method="GET",route="/api/leads/{id}/activities",status="200"} 1"#,
        r#"freshplan_http_requests_total{method="GET",route="unmatched",status="404"} 1"#,
        r#"freshplan_http_request_duration_ms_count{method="GET",route="/api/leads/{id}"} 2"#,
    ] {
        assert!(
            metrics.contains(sample),
            "missing `{sample}` in:\n{metrics}"
        );
    }
    for raw in [id, unknown.as_str(), unmatched.as_str()] {
        assert!(
            !metrics.contains(raw),
            "raw id {raw} in a metric label (routes are labelled by template):\n{metrics}"
        );
    }
}

/// The API's contract is reviewed as a file: `docs/openapi.json` must equal what the service
/// serves. After an intended change: `UPDATE_OPENAPI=1 cargo test --test leads_api openapi`.
#[tokio::test]
async fn the_served_openapi_document_matches_the_committed_one() {
    let app = TestApp::spawn().await;
    let served: Value = app.public_json("/q/openapi").await;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.json");
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, serde_json::to_string_pretty(&served).unwrap() + "\n").unwrap();
    }
    let committed: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(
        served, committed,
        "docs/openapi.json is out of date: run UPDATE_OPENAPI=1 cargo test --test leads_api openapi"
    );
}

#[tokio::test]
async fn a_change_that_publishes_no_event_still_leaves_exactly_one_audit_row_and_no_outbox_row() {
    let app = TestApp::spawn().await;
    let lead = app
        .create_lead("sales-de-1", TestApp::lead_body("Audit ohne Ereignis GmbH"))
        .await;
    let id = lead["id"].as_str().unwrap().to_string();
    let version = lead["version"].as_i64().unwrap();
    let mut db = app.db.superuser().await;
    let outbox_before: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&mut db)
        .await
        .unwrap();
    // Consent only: no status or owner change, so no event, but a change all the same.
    let r = app
        .patch(
            "sales-de-1",
            &id,
            version,
            json!({"emailConsent": !lead["emailConsent"].as_bool().unwrap()}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let updated: Vec<Value> = sqlx::query_scalar(
        "SELECT details FROM audit_log WHERE entity_id = $1 AND action = 'LEAD_UPDATED'",
    )
    .bind(&id)
    .fetch_all(&mut db)
    .await
    .unwrap();
    assert_eq!(updated.len(), 1, "one audit row for the change");
    assert_eq!(updated[0]["fields"], json!(["emailConsent"]));
    let outbox_after: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(outbox_after, outbox_before, "no event for a consent change");
}
