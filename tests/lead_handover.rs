//! Handing a lead to a new owner (`ownerUserId` in PATCH): only the owner, a manager of the
//! territory or an admin may do it (a collaborator may not), and the new owner must be an active
//! sales user or manager of the lead's territory — checked by the service, whose 422 names the
//! field and the user, before the database's own rule (migration 0003) would refuse it. A sales
//! owner who hands a lead over stays one of its collaborators.

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

/// The lead as its owner's manager sees it (every field, the version included).
async fn lead_of(app: &TestApp, id: &str) -> Value {
    let r = app.get("manager-de", &format!("/api/leads/{id}")).await;
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

async fn assignments(app: &TestApp, id: &str) -> (i64, i64) {
    let updates = app
        .count(&format!(
            "SELECT count(*) FROM audit_log WHERE entity_id = '{id}' AND action = 'LEAD_UPDATED'"
        ))
        .await;
    let assigned = app
        .count(&format!(
            "SELECT count(*) FROM lead_activities WHERE lead_id = '{id}' \
             AND activity_type = 'LEAD_ASSIGNED'"
        ))
        .await;
    (updates, assigned)
}

#[tokio::test]
async fn a_new_owner_who_is_not_an_active_sales_user_or_manager_of_the_territory_gets_422_naming_the_field_and_the_lead_is_unchanged(
) {
    let app = TestApp::spawn().await;
    let lead = app
        .create_lead("sales-de-1", TestApp::lead_body("Übergabe GmbH"))
        .await;
    let id = lead["id"].as_str().unwrap();
    // A sales user of the territory who is no longer active (the database's rule does not
    // know `active`: only the service refuses this one).
    sqlx::query("UPDATE users SET active = false WHERE id = 'sales-de-2'")
        .execute(&mut app.db.superuser().await)
        .await
        .unwrap();
    let before = lead_of(&app, id).await;

    for caller in ["sales-de-1", "manager-de", "admin"] {
        for candidate in [
            "viewer-de",  // a viewer of the territory
            "admin",      // an admin
            "nobody",     // unknown
            "sales-at-1", // sales of another territory
            "manager-at", // manager of another territory
            "sales-de-2", // deactivated
        ] {
            let (status, p) = problem(
                app.patch(caller, id, 1, json!({"ownerUserId": candidate}))
                    .await,
            )
            .await;
            assert_eq!(
                (status, slug(&p)),
                (422, "invalid-field"),
                "{caller} → {candidate}: {p}"
            );
            let detail = p["detail"].as_str().unwrap();
            assert!(
                detail.starts_with("ownerUserId ") && detail.contains(&format!("`{candidate}`")),
                "{caller} → {candidate}: the detail names the field and the user: {detail}"
            );
            assert_eq!(
                lead_of(&app, id).await,
                before,
                "{caller} → {candidate}: lead unchanged"
            );
        }
    }
    assert_eq!(
        assignments(&app, id).await,
        (0, 0),
        "no update audited, no assignment logged"
    );

    // An active manager of the territory may own it.
    let r = app
        .patch("sales-de-1", id, 1, json!({"ownerUserId": "manager-de"}))
        .await;
    let status = r.status();
    assert_eq!(status, 200, "{}", r.text().await.unwrap());
    let after = lead_of(&app, id).await;
    assert_eq!(
        (after["ownerUserId"].as_str(), after["version"].as_i64()),
        (Some("manager-de"), Some(2))
    );
    assert_eq!(assignments(&app, id).await, (1, 1));
}

#[tokio::test]
async fn a_collaborator_cannot_hand_the_lead_over_and_gets_403_while_the_owner_can() {
    let app = TestApp::spawn().await;
    let mut body = TestApp::lead_body("Mitarbeit GmbH");
    body["collaborators"] = json!(["sales-de-2"]);
    let lead = app.create_lead("sales-de-1", body).await;
    let id = lead["id"].as_str().unwrap();
    assert_eq!(
        app.get("sales-de-2", &format!("/api/leads/{id}"))
            .await
            .status(),
        200,
        "the collaborator sees the lead"
    );
    let before = lead_of(&app, id).await;

    for new_owner in ["sales-de-2", "manager-de"] {
        let (status, p) = problem(
            app.patch("sales-de-2", id, 1, json!({"ownerUserId": new_owner}))
                .await,
        )
        .await;
        assert_eq!(
            (status, slug(&p)),
            (403, "forbidden"),
            "collaborator → {new_owner}: {p}"
        );
        assert_eq!(lead_of(&app, id).await, before, "lead unchanged");
    }
    assert_eq!(assignments(&app, id).await, (0, 0));

    let r = app
        .patch("sales-de-1", id, 1, json!({"ownerUserId": "sales-de-2"}))
        .await;
    let status = r.status();
    assert_eq!(
        status,
        200,
        "the owner hands the lead over: {}",
        r.text().await.unwrap()
    );
    let after = lead_of(&app, id).await;
    assert_eq!(after["ownerUserId"], "sales-de-2");
    assert_eq!(after["version"], 2);
    // The former owner stays a collaborator (row-level security lets no salesperson write a
    // row they could not see); the new owner is no longer listed as one.
    assert_eq!(after["collaborators"], json!(["sales-de-1"]));
    assert_eq!(assignments(&app, id).await, (1, 1));
}
