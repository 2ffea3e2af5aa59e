//! Limits and browser protections: idle and half-sent connections are closed after the header
//! timeout while others are answered, connections beyond the cap are refused at once, a request
//! not answered within the request time limit ends with 408, slow SQL is cut off by the
//! statement timeout, cross-site cookie writes are refused, and every response carries the
//! security headers.

mod common;

use std::time::{Duration, Instant};

use common::*;
use freshplan::auth::jwt::Authenticator;
use freshplan::db;
use freshplan::error::ApiError;
use freshplan::http_server::Limits;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// True once the server closed `conn` (a read returns end of file), within `within`.
async fn closed_within(conn: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, conn.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // A 408 or similar before closing is fine; keep reading until EOF.
            Ok(Ok(_)) => continue,
        }
    }
}

async fn app_with(limits: Limits) -> (TestDb, freshplan::app::Server) {
    let db = TestDb::create().await;
    let server = start_with_limits(&db, &[], limits).await;
    (db, server)
}

#[tokio::test]
async fn two_hundred_idle_connections_and_a_half_sent_request_are_closed_after_the_header_timeout_while_others_are_answered(
) {
    let limits = Limits {
        header_read_timeout: Duration::from_secs(1),
        ..Limits::default()
    };
    let (_db, server) = app_with(limits).await;
    let addr = server.addr;
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    let mut half = TcpStream::connect(addr).await.unwrap();
    half.write_all(b"GET /q/health/live HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();

    // Others are answered promptly meanwhile.
    let client = reqwest::Client::new();
    let started = Instant::now();
    let r = client
        .get(format!("{}/q/health/live", server.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "answered in {:?} with 201 connections held",
        started.elapsed()
    );

    assert!(
        closed_within(&mut half, Duration::from_secs(5)).await,
        "the half-sent request is closed after the header timeout"
    );
    for (i, conn) in idle.iter_mut().enumerate() {
        assert!(
            closed_within(conn, Duration::from_secs(5)).await,
            "idle connection {i} is closed after the timeout"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn a_connection_beyond_the_cap_is_closed_at_once_and_served_again_when_one_is_free() {
    let limits = Limits {
        max_connections: 3,
        header_read_timeout: Duration::from_secs(30),
        ..Limits::default()
    };
    let (_db, server) = app_with(limits).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = TcpStream::connect(server.addr).await.unwrap();
        // A complete request on each, so each is surely accepted and counted.
        c.write_all(b"GET /q/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = c.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        held.push(c);
    }
    let mut extra = TcpStream::connect(server.addr).await.unwrap();
    assert!(
        closed_within(&mut extra, Duration::from_secs(2)).await,
        "the fourth connection is closed"
    );
    drop(held.pop());
    let client = reqwest::Client::new();
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        client.get(format!("{}/q/health/live", server.url())).send(),
    )
    .await
    .expect("answered once a connection is free")
    .unwrap();
    assert_eq!(r.status(), 200);
    server.stop().await;
}

/// An instance with `limits` on a fresh database with the demo users, and a bearer token of
/// `sales-de-1`.
async fn seeded_app_with(limits: Limits) -> (TestDb, freshplan::app::Server, String) {
    let (db, server) = app_with(limits).await;
    let settings = db.settings(&[]);
    freshplan::demo::seed(&server.state.pool, &vault_from(&settings), 0)
        .await
        .expect("seed users");
    let auth = Authenticator::from_settings(&settings.jwt, false).unwrap();
    let token = auth
        .mint(&freshplan::demo::principal("sales-de-1").unwrap(), 3600)
        .unwrap();
    (db, server, token)
}

/// Reads one HTTP/1.1 response with a `Content-Length` body from `conn` within `within`:
/// status, lower-cased headers and body.
async fn read_response(
    conn: &mut TcpStream,
    within: Duration,
) -> (u16, Vec<(String, String)>, String) {
    let deadline = tokio::time::Instant::now() + within;
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&data[..end]).to_string();
            let mut lines = head.split("\r\n");
            let status: u16 = lines
                .next()
                .unwrap()
                .split(' ')
                .nth(1)
                .unwrap()
                .parse()
                .unwrap();
            let headers: Vec<(String, String)> = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect();
            let length: usize = headers
                .iter()
                .find(|(k, _)| k == "content-length")
                .map(|(_, v)| v.parse().unwrap())
                .expect("a Content-Length body");
            if data.len() >= end + 4 + length {
                let body = String::from_utf8_lossy(&data[end + 4..end + 4 + length]).to_string();
                return (status, headers, body);
            }
        }
        match tokio::time::timeout_at(deadline, conn.read(&mut buf)).await {
            Err(_) => panic!("no complete response within {within:?}"),
            Ok(Ok(0)) => panic!("connection closed before a complete response"),
            Ok(Ok(n)) => data.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => panic!("read failed: {e}"),
        }
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn assert_request_timeout_problem(content_type: Option<&str>, body: &str) {
    assert_eq!(content_type, Some("application/problem+json"), "{body}");
    let p: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(p["status"], 408, "{p}");
    assert!(
        p["type"].as_str().unwrap().ends_with("/request-timeout"),
        "{p}"
    );
}

/// A client that sends the head of a POST and only part of the announced body: the request is
/// answered 408 `request-timeout` once the configured limit (1 s here, far below the 30 s
/// default) has passed.
#[tokio::test]
async fn a_request_whose_body_is_not_sent_within_the_request_time_limit_is_answered_408_problem_json(
) {
    let limit = Duration::from_secs(1);
    let (_db, server, token) = seeded_app_with(Limits {
        request_timeout: limit,
        ..Limits::default()
    })
    .await;
    let mut conn = TcpStream::connect(server.addr).await.unwrap();
    let started = Instant::now();
    conn.write_all(
        format!(
            "POST /api/leads HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nContent-Length: 200\r\n\r\n{{\"companyName\": "
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let (status, headers, body) = read_response(&mut conn, Duration::from_secs(10)).await;
    let elapsed = started.elapsed();
    assert_eq!(status, 408, "{body}");
    assert_request_timeout_problem(header(&headers, "content-type"), &body);
    assert!(
        elapsed >= limit,
        "answered after {elapsed:?}, before the limit of {limit:?}"
    );
    server.stop().await;
}

/// A handler that waits for a row another transaction holds is answered 408 once the request
/// time limit (1 s) has passed, before the statement timeout (5 s, which would answer 503).
#[tokio::test]
async fn a_handler_waiting_on_a_locked_row_longer_than_the_request_time_limit_is_answered_408_problem_json(
) {
    let limit = Duration::from_secs(1);
    let (db, server, token) = seeded_app_with(Limits {
        request_timeout: limit,
        ..Limits::default()
    })
    .await;
    let client = reqwest::Client::new();
    let r = client
        .post(format!("{}/api/leads", server.url()))
        .bearer_auth(&token)
        .json(&TestApp::lead_body("Locked GmbH"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let lead: serde_json::Value = r.json().await.unwrap();
    let id = lead["id"].as_str().unwrap().to_string();

    let mut su = db.superuser().await;
    let mut lock = sqlx::Connection::begin(&mut su).await.unwrap();
    sqlx::query("SELECT 1 FROM leads WHERE id = $1::uuid FOR UPDATE")
        .bind(&id)
        .execute(&mut *lock)
        .await
        .unwrap();
    let started = Instant::now();
    let r = client
        .patch(format!("{}/api/leads/{id}", server.url()))
        .bearer_auth(&token)
        .header("If-Match", "\"1\"")
        .json(&serde_json::json!({"emailConsent": true}))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    let elapsed = started.elapsed();
    let status = r.status().as_u16();
    let content_type = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string());
    let body = r.text().await.unwrap();
    assert_eq!(status, 408, "after {elapsed:?}: {body}");
    assert_request_timeout_problem(content_type.as_deref(), &body);
    assert!(
        elapsed >= limit && elapsed < Duration::from_secs(5),
        "answered after {elapsed:?}: the limit is {limit:?}, the statement timeout 5 s"
    );
    lock.rollback().await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn a_callers_statement_that_runs_too_long_is_cancelled_and_answered_503() {
    let app = TestApp::spawn().await;
    let pool = app.db.app_pool().await;
    let p = freshplan::demo::principal("sales-de-1").unwrap();
    let mut tx = db::begin_as(&pool, &p).await.unwrap();
    let started = Instant::now();
    let err = sqlx::query("SELECT pg_sleep(30)")
        .execute(&mut *tx)
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10));
    let api = ApiError::from(err);
    assert_eq!(api.parts().0, 503, "{api:?}");
}

#[tokio::test]
async fn a_cookie_authenticated_write_from_another_site_is_refused_and_from_this_site_accepted() {
    let app = TestApp::spawn().await;
    let cookie = format!("freshplan_session={}", app.token_for("sales-de-1"));
    let post = |origin: &'static str| {
        app.client
            .post(format!("{}/api/leads", app.url))
            .header("Cookie", &cookie)
            .header("Origin", origin)
            .json(&TestApp::lead_body("Cross Site GmbH"))
    };
    let r = post("http://evil.example").send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(app.count("SELECT count(*) FROM leads").await, 0);
    let own = app.url.clone();
    let r = app
        .client
        .post(format!("{}/api/leads", app.url))
        .header("Cookie", &cookie)
        .header("Origin", own)
        .json(&TestApp::lead_body("Same Site GmbH"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    // A bearer token is never sent by a browser on its own: no Origin needed.
    let r = app
        .client
        .post(format!("{}/api/leads", app.url))
        .header("Authorization", app.bearer("sales-de-1"))
        .json(&TestApp::lead_body("Bearer GmbH"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
}

#[tokio::test]
async fn every_response_carries_the_security_headers_and_api_answers_are_not_stored() {
    let app = TestApp::spawn().await;
    let lead = app
        .create_lead("sales-de-1", TestApp::lead_body("Header GmbH"))
        .await;
    for (path, api) in [
        ("/", false),
        ("/q/health/live", false),
        (
            &*format!("/api/leads/{}", lead["id"].as_str().unwrap()),
            true,
        ),
        ("/api/nothing-here", true),
    ] {
        let r = app.get("sales-de-1", path).await;
        let h = r.headers();
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(h["x-frame-options"], "DENY", "{path}");
        assert!(
            h["content-security-policy"]
                .to_str()
                .unwrap()
                .contains("frame-ancestors 'none'"),
            "{path}"
        );
        if api {
            assert_eq!(h["cache-control"], "no-store", "{path}");
        }
    }
}
