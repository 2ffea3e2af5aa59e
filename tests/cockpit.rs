//! The lead widget: true numbers (equal to an independent SQL recomputation on random data, for
//! every role and scope), role-based views, freshness after a change, read-your-writes, the
//! toggle, and its metric.

mod common;

use chrono::{DateTime, Duration as ChronoDuration, Utc};
use common::*;
use freshplan::db;
use freshplan::identity::Principal;
use freshplan::leads::domain::{ActivityType, BusinessType, LeadSource, LeadStatus};
use freshplan::leads::model::{CreateLead, NewActivity, PatchLead};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use uuid::Uuid;

/// The independent recomputation: straight from leads, activities and follow-ups, no roll-ups.
const REFERENCE_SQL: &str = include_str!("fixtures/widget_reference.sql");

fn who(id: &str) -> Principal {
    freshplan::demo::principal(id).unwrap()
}

/// The widget as the reference SQL computes it for `caller`, `scope` at `now`.
async fn reference(app: &TestApp, caller: &Principal, scope: &str, now: DateTime<Utc>) -> Value {
    let pool = app.db.app_pool().await;
    let mut tx = db::begin_as(&pool, caller).await.unwrap();
    let v: Value = sqlx::query_scalar(REFERENCE_SQL)
        .bind(scope)
        .bind(&caller.user_id)
        .bind(caller.territory.code())
        .bind(now)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    v
}

async fn widget(app: &TestApp, user: &str, query: &str) -> reqwest::Response {
    app.get(user, &format!("/api/cockpit/lead-widget{query}"))
        .await
}

async fn widget_json(app: &TestApp, user: &str, query: &str) -> Value {
    let r = widget(app, user, query).await;
    assert_eq!(r.status(), 200, "widget for {user}{query}");
    r.json().await.unwrap()
}

fn strip_names(v: &mut Value) {
    for list in ["recentActivities", "recentFollowUps"] {
        for item in v[list].as_array_mut().unwrap() {
            let o = item.as_object_mut().unwrap();
            o.remove("leadId");
            o.remove("companyName");
        }
    }
}

/// Random leads, status changes, reassignments, back-dated activities and follow-ups, written
/// through the leads service (and, for follow-ups, as the system principal the job will use).
async fn random_data(app: &TestApp, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let leads_svc = &app.state().leads;
    let owners = [
        "sales-de-1",
        "sales-de-2",
        "sales-at-1",
        "sales-ch-1",
        "manager-de",
    ];
    let mut leads: Vec<(Uuid, String, i64, LeadStatus)> = Vec::new();
    for i in 0..rng.gen_range(14..26) {
        let owner = owners[rng.gen_range(0..owners.len())];
        let body = CreateLead {
            company_name: format!("Betrieb {seed}-{i}"),
            city: None,
            business_type: BusinessType::ALL[rng.gen_range(0..BusinessType::ALL.len())],
            source: LeadSource::Messe,
            contact_person: None,
            email: None,
            phone: None,
            territory: None,
            email_consent: rng.gen_bool(0.7),
            collaborators: vec![],
        };
        let lead = leads_svc.create(&who(owner), body).await.unwrap().value;
        leads.push((
            lead.id,
            owner.to_string(),
            lead.version,
            LeadStatus::Registered,
        ));
    }
    let mut su = app.db.superuser().await;
    for (id, ..) in &leads {
        let days = rng.gen_range(0..20);
        sqlx::query(&format!(
            "UPDATE leads SET registered_at = now() - interval '{days} days' WHERE id = '{id}'"
        ))
        .execute(&mut su)
        .await
        .unwrap();
    }
    let now = Utc::now();
    for (id, owner, version, status) in leads.iter_mut() {
        // Back-dated activities, some of them responses.
        for _ in 0..rng.gen_range(0..4) {
            let kinds = [
                ActivityType::Call,
                ActivityType::EmailReceived,
                ActivityType::Note,
                ActivityType::Meeting,
            ];
            let body = NewActivity {
                activity_type: kinds[rng.gen_range(0..kinds.len())],
                description: None,
                occurred_at: Some(now - ChronoDuration::hours(rng.gen_range(0..16 * 24))),
                outcome: None,
            };
            leads_svc
                .add_activity(&who(owner), *id, body)
                .await
                .unwrap();
        }
        // Follow-ups as the job would record them.
        if rng.gen_bool(0.6) {
            let system = Principal::system();
            let mut tx = db::begin_as(&app.state().pool, &system).await.unwrap();
            let t3_at = now - ChronoDuration::hours(rng.gen_range(1..15 * 24));
            let sent = rng.gen_bool(0.8);
            sqlx::query(
                "INSERT INTO followups (id, lead_id, followup_type, status, territory, owner_user_id, attempts, queued_at, sent_at, failed_at) \
                 VALUES ($1, $2, 'T3', $3, 'DE', $4, 1, $5, CASE WHEN $6 THEN $5 END, CASE WHEN $6 THEN NULL ELSE $5 END)",
            )
            .bind(Uuid::now_v7())
            .bind(*id)
            .bind(if sent { "SENT" } else { "FAILED" })
            .bind(owner.as_str())
            .bind(t3_at)
            .bind(sent)
            .execute(&mut *tx)
            .await
            .unwrap();
            if sent {
                sqlx::query("UPDATE leads SET t3_sent_at = $2 WHERE id = $1")
                    .bind(*id)
                    .bind(t3_at)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                if rng.gen_bool(0.5) {
                    let t7_at = t3_at + ChronoDuration::hours(rng.gen_range(1..6 * 24));
                    sqlx::query(
                        "INSERT INTO followups (id, lead_id, followup_type, status, territory, owner_user_id, attempts, queued_at, sent_at) \
                         VALUES ($1, $2, 'T7', 'SENT', 'DE', $3, 1, $4, $4)",
                    )
                    .bind(Uuid::now_v7())
                    .bind(*id)
                    .bind(owner.as_str())
                    .bind(t7_at.min(now))
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                }
            }
            tx.commit().await.unwrap();
        }
        // Status moves along the machine (each writes a STATUS_CHANGE activity), some deletions.
        let path = [
            LeadStatus::Active,
            LeadStatus::Qualified,
            LeadStatus::Converted,
        ];
        for next in path.iter().take(rng.gen_range(0..4)) {
            let w = leads_svc
                .patch(
                    &who(owner),
                    *id,
                    *version,
                    PatchLead {
                        status: Some(*next),
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            *version += 1;
            *status = *next;
            assert!(w.value.is_some());
        }
        if rng.gen_bool(0.1) {
            leads_svc
                .patch(
                    &who(owner),
                    *id,
                    *version,
                    PatchLead {
                        status: Some(LeadStatus::Deleted),
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            *version += 1;
            *status = LeadStatus::Deleted;
        }
    }
    // A DE manager hands a few DE leads to the other DE salesperson.
    for (id, owner, version, status) in leads.iter_mut().filter(|l| l.1 == "sales-de-1").take(2) {
        if matches!(*status, LeadStatus::Converted | LeadStatus::Deleted) {
            continue;
        }
        leads_svc
            .patch(
                &who("manager-de"),
                *id,
                *version,
                PatchLead {
                    owner_user_id: Some("sales-de-2".into()),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        *version += 1;
        *owner = "sales-de-2".into();
    }
}

/// Every (user, scope) the API allows, with an unrestricted query for the defaults.
const VIEWS: &[(&str, &str)] = &[
    ("sales-de-1", "own"),
    ("sales-de-2", "own"),
    ("sales-at-1", "own"),
    ("manager-de", "own"),
    ("manager-de", "territory"),
    ("manager-at", "territory"),
    ("viewer-de", "territory"),
    ("admin", "own"),
    ("admin", "territory"),
    ("admin", "all"),
];

async fn every_number_matches_the_reference(seed: u64) {
    let app = TestApp::spawn().await;
    random_data(&app, seed).await;
    for (user, scope) in VIEWS {
        let mut got = widget_json(&app, user, &format!("?scope={scope}")).await;
        let now: DateTime<Utc> = got["asOf"].as_str().unwrap().parse().unwrap();
        let mut expected = reference(&app, &who(user), scope, now).await;
        assert_eq!(got["isManagerView"], json!(*scope != "own"));
        assert!(got["position"].as_i64().unwrap() >= 0);
        let o = got.as_object_mut().unwrap();
        o.remove("isManagerView");
        o.remove("position");
        if *user == "viewer-de" {
            strip_names(&mut expected);
        }
        assert_eq!(
            got, expected,
            "seed {seed}: widget of {user} ({scope}) differs from the reference"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4, ..ProptestConfig::default() })]
    #[test]
    fn every_widget_number_equals_an_independent_sql_recomputation_for_each_role_and_scope(seed in any::<u64>()) {
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(every_number_matches_the_reference(seed));
    }
}

#[tokio::test]
async fn each_role_is_refused_the_scopes_it_may_not_see() {
    let app = TestApp::spawn().await;
    for (user, scope, status) in [
        ("sales-de-1", "territory", 403),
        ("sales-de-1", "all", 403),
        ("manager-de", "all", 403),
        ("viewer-de", "own", 403),
        ("viewer-de", "all", 403),
        ("sales-de-1", "everything", 422),
    ] {
        let r = widget(&app, user, &format!("?scope={scope}")).await;
        assert_eq!(r.status(), status, "{user} asking {scope}");
        assert_eq!(
            r.headers()["content-type"],
            "application/problem+json",
            "{user} asking {scope}"
        );
    }
    // The user is always the caller: there is no parameter naming someone else.
    let r = widget(&app, "sales-de-1", "?userId=sales-de-2").await;
    assert_eq!(r.status(), 422);
    let r = app
        .client
        .get(format!("{}/api/cockpit/lead-widget", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn a_de_managers_territory_view_never_counts_or_lists_an_at_lead() {
    let app = TestApp::spawn().await;
    let de = app
        .create_lead("sales-de-1", TestApp::lead_body("Gasthaus München"))
        .await;
    for i in 0..3 {
        let at = app
            .create_lead(
                "sales-at-1",
                TestApp::lead_body(&format!("Wiener Heuriger {i}")),
            )
            .await;
        let r = app
            .client
            .post(format!(
                "{}/api/leads/{}/activities",
                app.url,
                at["id"].as_str().unwrap()
            ))
            .header("Authorization", app.bearer("sales-at-1"))
            .json(&json!({"type": "MEETING"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    let w = widget_json(&app, "manager-de", "").await;
    assert_eq!(w["scope"], "territory");
    assert_eq!(w["isManagerView"], true);
    assert_eq!(w["territory"], "DE");
    assert_eq!(w["leadStats"]["total"], 1, "only the DE lead counts");
    let listed: Vec<&str> = w["recentActivities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["leadId"].as_str().unwrap())
        .collect();
    assert!(!listed.is_empty());
    assert!(
        listed.iter().all(|id| *id == de["id"].as_str().unwrap()),
        "only the DE lead is listed: {listed:?}"
    );
    assert!(!w.to_string().contains("Wiener"));
    let at = widget_json(&app, "manager-at", "").await;
    assert_eq!(at["leadStats"]["total"], 3);
}

#[tokio::test]
async fn viewers_get_territory_aggregates_without_lead_ids_or_names() {
    let app = TestApp::spawn().await;
    let lead = app
        .create_lead("sales-de-1", TestApp::lead_body("Hotel Geheim"))
        .await;
    let w = widget_json(&app, "viewer-de", "").await;
    assert_eq!(w["scope"], "territory");
    assert_eq!(w["leadStats"]["total"], 1);
    let acts = w["recentActivities"].as_array().unwrap();
    assert_eq!(acts.len(), 1, "the CREATED activity is listed");
    assert_eq!(acts[0]["type"], "CREATED");
    let text = w.to_string();
    assert!(!text.contains("Hotel Geheim"));
    assert!(!text.contains(lead["id"].as_str().unwrap()));
}

#[tokio::test]
async fn a_status_change_shows_in_the_next_widget_answer_with_a_position_at_least_the_changes() {
    let app = TestApp::spawn().await;
    let lead = app
        .create_lead("sales-de-1", TestApp::lead_body("Kantine Süd"))
        .await;
    let before = widget_json(&app, "sales-de-1", "").await;
    assert_eq!(before["leadStats"]["registered"], 1);

    let r = app
        .patch(
            "sales-de-1",
            lead["id"].as_str().unwrap(),
            1,
            json!({"status": "ACTIVE"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let position: i64 = r.headers()["freshplan-position"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // Read your writes: the answer includes the change, whatever the listener did meanwhile.
    let after = widget_json(&app, "sales-de-1", &format!("?minPosition={position}")).await;
    assert_eq!(after["leadStats"]["registered"], 0);
    assert_eq!(after["leadStats"]["active"], 1);
    assert!(after["position"].as_i64().unwrap() >= position);
    // And without minPosition once the event invalidated the cached entry.
    wait_until(PATIENCE, "plain answer reflects the change", || async {
        widget_json(&app, "sales-de-1", "").await["leadStats"]["active"] == 1
    })
    .await;
    wait_until(PATIENCE, "both events invalidated the cache", || async {
        app.metric(
            "freshplan_dashboard_cache_invalidations_total{trigger=\"event\",widget=\"lead-widget\"}",
        )
        .await
            >= 2.0
    })
    .await;
    // Nothing pending any more: the second of two answers comes from the cache.
    let hits = "freshplan_widget_query_ms_count{cache=\"hit\",scope=\"own\"}";
    widget_json(&app, "sales-de-1", "").await;
    let hits_before = app.metric(hits).await;
    widget_json(&app, "sales-de-1", "").await;
    assert_eq!(app.metric(hits).await, hits_before + 1.0);
    let text = app.metrics_text().await;
    assert!(
        metric_in(
            &text,
            "freshplan_widget_query_ms_count{cache=\"miss\",scope=\"own\"}"
        ) >= 2.0
    );
}

#[tokio::test]
async fn a_position_that_never_becomes_visible_answers_503_not_yet_consistent_after_the_bounded_wait(
) {
    let app = TestApp::spawn().await;
    let started = std::time::Instant::now();
    let r = widget(&app, "sales-de-1", "?minPosition=999999").await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let problem: Value = r.json().await.unwrap();
    assert_eq!(
        problem["type"],
        "https://freshplan.de/problems/not-yet-consistent"
    );
    let waited = started.elapsed();
    assert!(
        waited >= std::time::Duration::from_millis(1900)
            && waited < std::time::Duration::from_secs(5),
        "bounded wait of about 2 s, took {waited:?}"
    );
}

#[tokio::test]
async fn with_the_widget_switched_off_the_endpoint_answers_404_feature_disabled() {
    let app = TestApp::spawn_with(&[("FEATURES_DASHBOARD_LEAD_WIDGET_ENABLED", "false")]).await;
    let r = widget(&app, "sales-de-1", "").await;
    assert_eq!(r.status(), 404);
    let problem: Value = r.json().await.unwrap();
    assert_eq!(
        problem["type"],
        "https://freshplan.de/problems/feature-disabled"
    );
    // The page is still served (it hides the widget itself).
    let page = app
        .client
        .get(format!("{}/", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
}

#[tokio::test]
async fn the_page_and_its_assets_are_served_from_the_binary_with_their_content_types() {
    let app = TestApp::spawn().await;
    for (path, ty) in [
        ("/", "text/html"),
        ("/assets/app.js", "text/javascript"),
        ("/assets/app.css", "text/css"),
        ("/assets/vendor/uPlot.min.js", "text/javascript"),
        ("/assets/vendor/uPlot.min.css", "text/css"),
    ] {
        let r = app
            .client
            .get(format!("{}{path}", app.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let ct = r.headers()["content-type"].to_str().unwrap().to_string();
        assert!(ct.starts_with(ty), "{path}: {ct}");
        assert!(!r.text().await.unwrap().is_empty());
    }
    let me = app.get_json("manager-de", "/api/me").await;
    assert_eq!(me["userId"], "manager-de");
    assert_eq!(me["role"], "manager");
    assert_eq!(me["territory"], "DE");
}

/// Browsers fetch `/favicon.ico` on their own for every page without an icon link (the
/// development login page): it answers the page's icon, without credentials, never a 404.
#[tokio::test]
async fn the_favicon_browsers_request_on_their_own_is_an_icon_not_a_404() {
    let app = TestApp::spawn_with(&[("FRESHPLAN_AUTH_DEV_LOGIN_ENABLED", "true")]).await;
    let login = app
        .client
        .get(format!("{}/login", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(
        login.status(),
        200,
        "the login page whose icon is requested"
    );
    let r = app
        .client
        .get(format!("{}/favicon.ico", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/x-icon");
    let ico = r.bytes().await.unwrap();
    // ICONDIR: reserved 0, type 1 (icon), at least one image; each entry's image is a PNG.
    assert_eq!(&ico[..4], &[0, 0, 1, 0], "an ICO header");
    let images = u16::from_le_bytes([ico[4], ico[5]]) as usize;
    assert!(images >= 1);
    for i in 0..images {
        let entry = &ico[6 + 16 * i..6 + 16 * (i + 1)];
        let size = u32::from_le_bytes(entry[8..12].try_into().unwrap()) as usize;
        let offset = u32::from_le_bytes(entry[12..16].try_into().unwrap()) as usize;
        assert!(offset + size <= ico.len(), "image {i} lies inside the file");
        assert_eq!(&ico[offset..offset + 8], b"\x89PNG\r\n\x1a\n", "image {i}");
    }
}

#[tokio::test]
async fn pending_follow_ups_count_leads_due_by_the_design_rule() {
    let app = TestApp::spawn().await;
    let mut ids = Vec::new();
    for i in 0..4 {
        let mut body = TestApp::lead_body(&format!("Fällig {i}"));
        body["emailConsent"] = json!(true);
        let lead = app.create_lead("sales-de-1", body).await;
        let r = app
            .patch(
                "sales-de-1",
                lead["id"].as_str().unwrap(),
                1,
                json!({"status": "ACTIVE"}),
            )
            .await;
        assert_eq!(r.status(), 200);
        ids.push(lead["id"].as_str().unwrap().to_string());
    }
    let mut su = app.db.superuser().await;
    // Due for T+3: 4 days old. Not due: 2 days old. Due for T+7: 8 days, T+3 sent. Blocked.
    for (id, sql) in [
        (&ids[0], "registered_at = now() - interval '4 days'"),
        (&ids[1], "registered_at = now() - interval '2 days'"),
        (
            &ids[2],
            "registered_at = now() - interval '8 days', t3_sent_at = now() - interval '4 days'",
        ),
        (
            &ids[3],
            "registered_at = now() - interval '5 days', contact_blocked = true",
        ),
    ] {
        sqlx::query(&format!("UPDATE leads SET {sql} WHERE id = '{id}'"))
            .execute(&mut su)
            .await
            .unwrap();
    }
    let w = widget_json(&app, "sales-de-1", "").await;
    assert_eq!(w["pendingT3Count"], 1);
    assert_eq!(w["pendingT7Count"], 1);
    assert_eq!(w["daily"].as_array().unwrap().len(), 14);
}
