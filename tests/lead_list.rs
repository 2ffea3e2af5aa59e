//! The lead list (`GET /api/leads`) picks its pages through `lead_list_page()` (migration
//! 0006), which writes each role's visibility as index-friendly predicates instead of leaving it
//! to row-level security. These tests hold it to row-level security itself: for every kind of
//! caller and filter, every page and the total equal what a plain `SELECT … ORDER BY updated_at
//! DESC, id` returns under the caller's RLS.

mod common;

use common::TestApp;
use freshplan::db;
use serde_json::{json, Value};

/// A mixed data set: every territory, owners, collaborators, statuses, deleted leads, names and
/// cities to search.
async fn data_set(app: &TestApp) {
    let sales = [
        ("sales-de-1", "sales-de-2"),
        ("sales-de-2", "sales-de-1"),
        ("sales-at-1", "sales-at-2"),
        ("sales-ch-1", "sales-ch-2"),
    ];
    let names = [
        "Gasthof Sonne",
        "Hotel Krone",
        "Kantine Nord",
        "Bistro Sonnenhof",
        "Mensa Süd",
    ];
    let cities = ["München", "Wien", "Zürich", "Sonnenberg", "Graz"];
    for i in 0..48usize {
        let (owner, other) = sales[i % sales.len()];
        let mut body = json!({
            "companyName": format!("{} {i}", names[i % names.len()]),
            "city": cities[(i / 2) % cities.len()],
            "businessType": "RESTAURANT", "source": "MESSE",
        });
        if i % 3 == 0 {
            body["collaborators"] = json!([other]);
        }
        let lead = app.create_lead(owner, body).await;
        let id = lead["id"].as_str().unwrap();
        let change = match i % 6 {
            1 => Some(json!({"status": "ACTIVE"})),
            2 => Some(json!({"status": "QUALIFIED"})),
            4 => Some(json!({"status": "DELETED"})),
            _ => None,
        };
        if let Some(body) = change {
            let r = app.patch(owner, id, 1, body).await;
            assert!(r.status().is_success(), "{}", r.text().await.unwrap());
        }
    }
}

/// The ids and total row-level security gives for the filter, in list order.
async fn expected(
    app: &TestApp,
    user: &str,
    status: Option<&str>,
    owner: Option<&str>,
    q: Option<&str>,
) -> Vec<String> {
    let p = freshplan::demo::principal(user).unwrap();
    let mut tx = db::begin_as(&app.state().pool, &p).await.unwrap();
    let pattern = q.map(|q| format!("%{q}%"));
    let ids: Vec<(uuid::Uuid,)> = sqlx::query_as(
        "SELECT id FROM leads \
         WHERE ($1::text IS NULL AND status <> 'DELETED' OR status = $1) \
           AND ($2::text IS NULL OR owner_user_id = $2) \
           AND ($3::text IS NULL OR company_name ILIKE $3 OR city ILIKE $3) \
         ORDER BY updated_at DESC, id",
    )
    .bind(status)
    .bind(owner)
    .bind(pattern)
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    ids.into_iter().map(|r| r.0.to_string()).collect()
}

/// Every page of the API's list (size 7), concatenated, and the totals it reported.
async fn listed(app: &TestApp, user: &str, query: &str) -> (Vec<String>, Vec<i64>) {
    let (mut ids, mut totals) = (Vec::new(), Vec::new());
    for page in 0.. {
        let r = app
            .get(user, &format!("/api/leads?size=7&page={page}{query}"))
            .await;
        assert_eq!(r.status(), 200, "{user} {query}");
        let body: Value = r.json().await.unwrap();
        totals.push(body["total"].as_i64().unwrap());
        let items = body["items"].as_array().unwrap();
        ids.extend(items.iter().map(|l| l["id"].as_str().unwrap().to_string()));
        if items.len() < 7 {
            break;
        }
    }
    (ids, totals)
}

#[tokio::test]
async fn every_page_and_total_equal_row_level_security_for_each_role_and_filter() {
    let app = TestApp::spawn().await;
    data_set(&app).await;
    let filters: [(Option<&str>, Option<&str>, Option<&str>); 8] = [
        (None, None, None),
        (Some("ACTIVE"), None, None),
        (Some("DELETED"), None, None),
        (None, Some("sales-de-1"), None),
        (None, None, Some("sonne")),
        (None, None, Some("KRONE")),
        (Some("QUALIFIED"), None, Some("n")),
        (None, Some("sales-de-2"), Some("süd")),
    ];
    let mut compared = 0;
    for user in [
        "sales-de-1",
        "sales-de-2",
        "sales-at-2",
        "manager-de",
        "manager-ch",
        "admin",
    ] {
        for (status, owner, q) in filters {
            let mut query = String::new();
            if let Some(s) = status {
                query.push_str(&format!("&status={s}"));
            }
            if let Some(o) = owner {
                query.push_str(&format!("&owner={o}"));
            }
            if let Some(q) = q {
                query.push_str(&format!("&q={}", urlencode(q)));
            }
            let want = expected(&app, user, status, owner, q).await;
            let (got, totals) = listed(&app, user, &query).await;
            assert_eq!(got, want, "{user} {query}: pages");
            assert!(
                totals.iter().all(|t| *t == want.len() as i64),
                "{user} {query}: totals {totals:?}, expected {}",
                want.len()
            );
            compared += 1;
        }
    }
    assert_eq!(compared, 48);
    // The data set is not trivial for the roles: a salesperson sees collaborations, a manager
    // only a territory, the admin everything but deleted leads.
    assert!(expected(&app, "sales-de-2", None, None, None).await.len() > 12);
    assert_eq!(expected(&app, "admin", None, None, None).await.len(), 40);
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
