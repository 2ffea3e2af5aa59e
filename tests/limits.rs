//! Limits and browser protections: idle and half-sent connections are closed after the header
//! timeout while others are answered, connections beyond the cap are refused at once, slow SQL
//! is cut off by the statement timeout, cross-site cookie writes are refused, and every response
//! carries the security headers.

mod common;

use std::time::{Duration, Instant};

use common::*;
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
