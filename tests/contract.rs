//! The contract as `/q/openapi` states it, checked against what the service sends and accepts:
//! enum spellings as on the wire, every error status of every operation documented as
//! `application/problem+json`, parameter bounds and headers, and hostile input (NUL and other
//! control characters, numbers out of range, undecodable paths) answered with a problem, never a
//! 5xx. `scripts/api-fuzz.sh` fuzzes the same document with schemathesis.

mod common;

use common::TestApp;
use freshplan::leads::domain::{ActivityType, BusinessType, LeadSource, LeadStatus};
use serde_json::{json, Value};

async fn problem(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = r.text().await.unwrap();
    assert_eq!(
        ct, "application/problem+json",
        "status {status}: not a problem: {body}"
    );
    (status, serde_json::from_str(&body).unwrap())
}

fn slug(p: &Value) -> &str {
    p["type"].as_str().unwrap().rsplit('/').next().unwrap()
}

/// Validates `value` against a schema of the served document (`#/components/schemas/<name>`).
fn valid_as(doc: &Value, name: &str, value: &Value) -> bool {
    let mut root = doc.clone();
    root["$ref"] = json!(format!("#/components/schemas/{name}"));
    jsonschema::validator_for(&root)
        .expect("the document compiles as a JSON schema")
        .is_valid(value)
}

fn enum_values(doc: &Value, name: &str) -> Vec<String> {
    doc["components"]["schemas"][name]["enum"]
        .as_array()
        .unwrap_or_else(|| panic!("{name} is documented as an enum"))
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

fn wire<T: serde::Serialize>(values: &[T]) -> Vec<String> {
    values
        .iter()
        .map(|v| {
            serde_json::to_value(v)
                .unwrap()
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

#[tokio::test]
async fn openapi_enum_spellings_equal_the_wire() {
    let app = TestApp::spawn().await;
    let doc = app.public_json("/q/openapi").await;
    assert_eq!(enum_values(&doc, "LeadStatus"), wire(LeadStatus::ALL));
    assert_eq!(enum_values(&doc, "BusinessType"), wire(BusinessType::ALL));
    assert_eq!(enum_values(&doc, "LeadSource"), wire(LeadSource::ALL));
    assert_eq!(enum_values(&doc, "ActivityType"), wire(ActivityType::ALL));
    assert!(enum_values(&doc, "LeadSource").contains(&"MESSE".to_string()));

    // What the API sends validates against the document, and what it documents it accepts.
    let lead = app
        .create_lead(
            "sales-de-1",
            json!({"companyName": "Sonne GmbH", "businessType": "RESTAURANT", "source": "WEB_FORMULAR"}),
        )
        .await;
    assert_eq!(lead["status"], "REGISTERED");
    assert!(valid_as(&doc, "Lead", &lead), "lead off its schema: {lead}");
    // The activity types a user may log are documented as exactly those the API accepts.
    let manual = doc["components"]["schemas"]["NewActivity"]["properties"]["type"]["enum"]
        .as_array()
        .unwrap()
        .clone();
    let id = lead["id"].as_str().unwrap();
    for t in ActivityType::ALL {
        let spelled = serde_json::to_value(t).unwrap();
        let r = app
            .client
            .post(format!("{}/api/leads/{id}/activities", app.url))
            .header("Authorization", app.bearer("sales-de-1"))
            .json(&json!({"type": spelled}))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status() == 201,
            manual.contains(&spelled),
            "activity type {spelled}: {}",
            r.status()
        );
    }
}

/// Error statuses each operation can answer (CONTRACT.md and the handlers).
const ERRORS: &[(&str, &str, &[&str])] = &[
    (
        "post",
        "/api/leads",
        &["400", "401", "403", "409", "413", "415", "422", "503"],
    ),
    ("get", "/api/leads", &["401", "403", "422", "503"]),
    ("get", "/api/leads/{id}", &["401", "403", "404", "503"]),
    (
        "patch",
        "/api/leads/{id}",
        &[
            "400", "401", "403", "404", "409", "412", "413", "415", "422", "428", "503",
        ],
    ),
    (
        "post",
        "/api/leads/{id}/activities",
        &["400", "401", "403", "404", "413", "415", "422", "503"],
    ),
    (
        "get",
        "/api/leads/{id}/activities",
        &["401", "403", "404", "503"],
    ),
    (
        "get",
        "/api/cockpit/lead-widget",
        &["401", "403", "404", "422", "503"],
    ),
    ("get", "/api/cockpit/stream", &["401", "422"]),
    ("get", "/api/events/{key}", &["401", "404", "422", "503"]),
    ("get", "/api/me", &["401"]),
    ("get", "/q/metrics", &["404"]),
];

#[tokio::test]
async fn every_operation_documents_its_error_statuses_as_problem_json() {
    let app = TestApp::spawn().await;
    let doc = app.public_json("/q/openapi").await;
    let problem_schema = &doc["components"]["schemas"]["Problem"];
    for field in ["type", "title", "status", "detail"] {
        assert!(
            problem_schema["required"]
                .as_array()
                .unwrap()
                .contains(&json!(field)),
            "Problem requires {field}"
        );
    }
    for key in ["existingLeadId", "currentVersion"] {
        assert!(problem_schema["properties"][key].is_object(), "{key}");
    }
    for (method, path, statuses) in ERRORS {
        let responses = &doc["paths"][path][method]["responses"];
        for status in *statuses {
            assert_eq!(
                responses[status]["content"]["application/problem+json"]["schema"]["$ref"],
                "#/components/schemas/Problem",
                "{method} {path} {status} is not documented as problem+json"
            );
        }
    }
    // Every error answer in the document is a problem, but readiness's DOWN (its health JSON)
    // and the unsubscribe link's pages for an invalid (400) or expired (410) link: people open
    // those in a browser from a mail, so they get a page.
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            for (status, response) in op["responses"].as_object().unwrap() {
                let code: u16 = status.parse().unwrap();
                if code < 400
                    || (path == "/q/health/ready" && code == 503)
                    || (path == "/unsubscribe" && matches!(code, 400 | 410))
                {
                    if path == "/unsubscribe" && code >= 400 {
                        assert!(
                            response["content"]["text/html"].is_object(),
                            "{method} {path} {status}"
                        );
                    }
                    continue;
                }
                let content = response["content"].as_object().unwrap();
                assert_eq!(
                    content.keys().collect::<Vec<_>>(),
                    ["application/problem+json"],
                    "{method} {path} {status}"
                );
            }
        }
    }
    // Content types besides JSON.
    assert!(doc["paths"]["/"]["get"]["responses"]["200"]["content"]["text/html"].is_object());
    assert!(
        doc["paths"]["/api/cockpit/stream"]["get"]["responses"]["200"]["content"]
            ["text/event-stream"]
            .is_object()
    );
    assert!(
        doc["paths"]["/q/metrics"]["get"]["responses"]["200"]["content"]["text/plain"].is_object()
    );
    // The widget answer has its schema, and a real answer validates against it.
    assert_eq!(
        doc["paths"]["/api/cockpit/lead-widget"]["get"]["responses"]["200"]["content"]
            ["application/json"]["schema"]["$ref"],
        "#/components/schemas/LeadWidget"
    );
    for user in ["sales-de-1", "manager-de", "viewer-de", "admin"] {
        let widget = app.get_json(user, "/api/cockpit/lead-widget").await;
        assert!(
            valid_as(&doc, "LeadWidget", &widget),
            "{user}: widget off its schema: {widget}"
        );
    }
    // Real problems validate against the schema.
    let lead = app
        .create_lead("sales-de-1", TestApp::lead_body("Problem GmbH"))
        .await;
    let id = lead["id"].as_str().unwrap();
    let r = app
        .client
        .patch(format!("{}/api/leads/{id}", app.url))
        .header("Authorization", app.bearer("sales-de-1"))
        .json(&json!({"emailConsent": true}))
        .send()
        .await
        .unwrap();
    let (status, body) = problem(r).await;
    assert_eq!((status, slug(&body)), (428, "precondition-required"));
    assert!(valid_as(&doc, "Problem", &body), "{body}");
    let (status, body) = problem(
        app.patch("sales-de-1", id, 7, json!({"emailConsent": true}))
            .await,
    )
    .await;
    assert_eq!((status, slug(&body)), (412, "stale-version"));
    assert_eq!(body["currentVersion"], 1);
    assert!(valid_as(&doc, "Problem", &body), "{body}");
}

#[tokio::test]
async fn parameter_bounds_and_headers_are_documented() {
    let app = TestApp::spawn().await;
    let doc = app.public_json("/q/openapi").await;
    let param = |path: &str, method: &str, name: &str| -> Value {
        doc["paths"][path][method]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("{method} {path} documents {name}"))
            .clone()
    };
    let page = param("/api/leads", "get", "page");
    assert_eq!(
        (&page["schema"]["minimum"], &page["schema"]["maximum"]),
        (&json!(0), &json!(100000))
    );
    let size = param("/api/leads", "get", "size");
    assert_eq!(
        (&size["schema"]["minimum"], &size["schema"]["maximum"]),
        (&json!(1), &json!(500))
    );
    let min_position = param("/api/cockpit/lead-widget", "get", "minPosition");
    assert_eq!(min_position["schema"]["minimum"], 1);
    let if_match = param("/api/leads/{id}", "patch", "If-Match");
    assert_eq!(
        (&if_match["in"], &if_match["required"]),
        (&json!("header"), &json!(true))
    );
    let last_event_id = param("/api/cockpit/stream", "get", "Last-Event-ID");
    assert_eq!(last_event_id["in"], "header");
    assert_eq!(last_event_id["schema"]["type"], "integer");
    let headers = |path: &str, method: &str, status: &str| -> Vec<String> {
        doc["paths"][path][method]["responses"][status]["headers"]
            .as_object()
            .map(|h| h.keys().cloned().collect())
            .unwrap_or_default()
    };
    assert_eq!(
        headers("/api/leads", "post", "201"),
        ["ETag", "FreshPlan-Position", "Location"]
    );
    assert_eq!(headers("/api/leads/{id}", "get", "200"), ["ETag"]);
    assert_eq!(
        headers("/api/leads/{id}", "patch", "200"),
        ["ETag", "FreshPlan-Position"]
    );
    assert_eq!(
        headers("/api/leads/{id}/activities", "post", "201"),
        ["FreshPlan-Position"]
    );
    assert_eq!(
        headers("/api/cockpit/lead-widget", "get", "503"),
        ["Retry-After"]
    );
}

#[tokio::test]
async fn nul_and_control_characters_in_json_strings_are_422_naming_the_field() {
    let app = TestApp::spawn().await;
    let post = |path: String, body: Value| {
        app.client
            .post(format!("{}{path}", app.url))
            .header("Authorization", app.bearer("sales-de-1"))
            .json(&body)
            .send()
    };
    for (field, value) in [
        ("companyName", "Sonne\u{0}GmbH"),
        ("city", "M\u{0}nchen"),
        ("contactPerson", "Anna\u{1b}[31m"),
        ("email", "anna\u{0}@sonne.de"),
        ("phone", "089\u{0}123456"),
    ] {
        let mut body = TestApp::lead_body("Sonne GmbH");
        body[field] = json!(value);
        let (status, p) = problem(post("/api/leads".into(), body).await.unwrap()).await;
        assert_eq!((status, slug(&p)), (422, "invalid-field"), "{field}: {p}");
        assert!(
            p["detail"].as_str().unwrap().contains(field),
            "the detail names {field}: {p}"
        );
    }
    let lead = app
        .create_lead("sales-de-1", TestApp::lead_body("Sonne GmbH"))
        .await;
    let id = lead["id"].as_str().unwrap();
    for (field, value) in [("description", "line\u{0}"), ("outcome", "ok\u{7}")] {
        let mut body = json!({"type": "CALL"});
        body[field] = json!(value);
        let (status, p) = problem(
            post(format!("/api/leads/{id}/activities"), body)
                .await
                .unwrap(),
        )
        .await;
        assert_eq!((status, slug(&p)), (422, "invalid-field"), "{field}: {p}");
        assert!(p["detail"].as_str().unwrap().contains(field), "{p}");
    }
    // Free text keeps its line breaks.
    let r = post(
        format!("/api/leads/{id}/activities"),
        json!({"type": "NOTE", "description": "first line\nsecond line\twith a tab"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
    for (field, value) in [
        ("reason", json!("because\u{0}")),
        ("contactPerson", json!("Anna\u{0}")),
        ("ownerUserId", json!("sales-de-2\u{0}")),
        ("collaborators", json!(["sales-de-2\u{0}"])),
    ] {
        let mut body = json!({"status": "ACTIVE"});
        body[field] = value;
        let (status, p) = problem(app.patch("sales-de-1", id, 2, body).await).await;
        assert_eq!((status, slug(&p)), (422, "invalid-field"), "{field}: {p}");
        assert!(p["detail"].as_str().unwrap().contains(field), "{p}");
    }
}

#[tokio::test]
async fn nul_in_a_query_parameter_is_422() {
    let app = TestApp::spawn().await;
    for query in [
        "q=%00",
        "q=Sonne%00",
        "owner=sales-de-1%00",
        "email=a%00@b.de",
    ] {
        let (status, p) =
            problem(app.get("sales-de-1", &format!("/api/leads?{query}")).await).await;
        assert_eq!((status, slug(&p)), (422, "invalid-field"), "{query}: {p}");
    }
    let (status, p) = problem(
        app.get("sales-de-1", "/api/cockpit/lead-widget?scope=own%00")
            .await,
    )
    .await;
    assert_eq!((status, slug(&p)), (422, "invalid-field"), "{p}");
}

#[tokio::test]
async fn invalid_utf8_in_a_path_answers_a_problem() {
    let app = TestApp::spawn().await;
    for path in [
        "/api/leads/%FF",
        "/api/leads/%C3%28/activities",
        "/api/events/%FF%FE",
    ] {
        let (status, p) = problem(app.get("sales-de-1", path).await).await;
        assert_eq!((status, slug(&p)), (404, "not-found"), "{path}: {p}");
    }
}

#[tokio::test]
async fn page_numbers_out_of_range_are_422() {
    let app = TestApp::spawn().await;
    for query in [
        "page=99999999999999999999",
        "page=9223372036854775807",
        "page=100001",
        "page=-1",
        "size=0",
        "size=501",
        "size=9223372036854775807&page=100000",
    ] {
        let (status, p) =
            problem(app.get("sales-de-1", &format!("/api/leads?{query}")).await).await;
        assert_eq!((status, slug(&p)), (422, "invalid-field"), "{query}: {p}");
    }
    let r = app
        .get("sales-de-1", "/api/leads?page=100000&size=500")
        .await;
    assert_eq!(r.status(), 200);
}

/// The documented patterns and the validation agree: what the schema calls valid is created, what
/// it calls invalid answers 422 (the edge cases of the hand-written rules).
#[tokio::test]
async fn documented_text_rules_agree_with_the_validation() {
    let app = TestApp::spawn().await;
    let doc = app.public_json("/q/openapi").await;
    let cases: &[(&str, &str)] = &[
        ("companyName", "   "),
        ("companyName", "\u{3000}Sonne\u{3000}"),
        ("companyName", &"x".repeat(200)),
        ("companyName", &"x".repeat(201)),
        ("city", ""),
        ("city", "Köln\u{85}"),
        ("email", ""),
        ("email", " anna@sonne.de "),
        ("email", "anna@sonne"),
        ("email", "anna@.sonne.de"),
        ("email", "an na@sonne.de"),
        ("email", "@sonne.de"),
        ("email", "anna@sonne.de@x.de"),
        ("phone", "+49 89 1234567"),
        ("phone", "089 1234567"),
        ("phone", "0049 (89) 123-456"),
        ("phone", "0123456"),
        ("phone", "012345"),
        ("phone", "1234567"),
        ("phone", "+1234567"),
        ("phone", "+1234567890123456"),
        ("phone", "089 12x4567"),
        ("phone", " "),
        ("phone", "(089) 1234567-"),
    ];
    for (n, (field, value)) in cases.iter().enumerate() {
        let mut body = TestApp::lead_body(&format!("Rules {n}"));
        body[*field] = json!(value);
        let documented = valid_as(&doc, "CreateLead", &body);
        let r = app
            .client
            .post(format!("{}/api/leads", app.url))
            .header("Authorization", app.bearer("sales-de-1"))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        assert_eq!(
            status,
            if documented { 201 } else { 422 },
            "{field} = {value:?}: the document says {}, the API answered {text}",
            if documented { "valid" } else { "invalid" }
        );
    }
}

/// The database's own assignment rule (migration 0003: a lead is owned by a sales user or manager
/// of its territory) is a net behind the service's check (tests/lead_handover.rs): when it
/// refuses an UPDATE, the error maps to the API's problem for the field, not the constraint's
/// name.
#[tokio::test]
async fn an_assignment_the_database_refuses_names_the_field() {
    let app = TestApp::spawn().await;
    let lead = app
        .create_lead("sales-de-1", TestApp::lead_body("Owner GmbH"))
        .await;
    let id = lead["id"].as_str().unwrap();
    let pool = app.db.app_pool().await;
    let admin = freshplan::demo::principal("admin").unwrap();
    let mut tx = freshplan::db::begin_as(&pool, &admin).await.unwrap();
    let err = sqlx::query("UPDATE leads SET owner_user_id = 'admin' WHERE id = $1::uuid")
        .bind(id)
        .execute(&mut *tx)
        .await
        .expect_err("the database refuses an admin as owner");
    let api = freshplan::error::ApiError::from(err);
    let (status, slug, _) = api.parts();
    assert_eq!((status.as_u16(), slug), (422, "invalid-field"), "{api:?}");
    assert_eq!(
        api.to_string(),
        "ownerUserId must be a sales user or manager of the lead's territory"
    );
}
