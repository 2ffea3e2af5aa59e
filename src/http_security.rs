//! Browser-facing protections every response gets, and the per-request time limit.
//!
//! - Security headers: `X-Content-Type-Options: nosniff`, `X-Frame-Options: DENY` and a CSP with
//!   `frame-ancestors 'none'`, `Referrer-Policy: no-referrer`, and `Cache-Control: no-store` on
//!   every `/api/` answer (they may carry contact data; the page's static assets keep their own
//!   caching).
//! - Cross-site writes: a write authenticated by the session cookie (no `Authorization` header)
//!   must come from this site — `Sec-Fetch-Site: same-origin`, or an `Origin` whose host is the
//!   request's `Host`. A bearer token is not sent by browsers on their own, so it needs no check.
//! - A request that has not been answered within its time limit (slow body upload, stuck
//!   handler) ends with 408 `request-timeout`; the SSE stream is exempt (it is meant to last).
//!   The limit is `Limits::request_timeout` of the connection loop (`http_server`), handed to the
//!   middleware as a request extension; [`REQUEST_TIMEOUT`] without one.

use std::time::Duration;

use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::auth::SESSION_COOKIE;
use crate::error::ApiError;

/// Longest time a request may take (the SSE stream excepted), unless the connection loop sets
/// another limit.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The request time limit, put into each request's extensions by the connection loop.
#[derive(Debug, Clone, Copy)]
pub struct RequestTimeLimit(pub Duration);

/// The page and API: scripts and styles from this origin only; uPlot sets styles through the
/// DOM, its legend markers are inline styles, so `style-src` allows them.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
    img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";
/// The development login page carries its small script inline.
const CSP_LOGIN: &str = "default-src 'self'; script-src 'self' 'unsafe-inline'; \
    style-src 'self' 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

fn cookie_authenticated(headers: &HeaderMap) -> bool {
    if headers.contains_key(header::AUTHORIZATION) {
        return false;
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .any(|c| {
            c.trim()
                .split_once('=')
                .is_some_and(|(k, _)| k == SESSION_COOKIE)
        })
}

/// True when a browser says the request comes from this site.
fn same_site(headers: &HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        return site == "same-origin";
    }
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    match (origin, host) {
        (Some(origin), Some(host)) => origin
            .split_once("://")
            .is_some_and(|(_, authority)| authority == host),
        _ => false,
    }
}

/// Middleware: refuses cross-site cookie writes and adds the security headers.
pub async fn protect(req: Request, next: Next) -> Response {
    let safe = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if !safe && cookie_authenticated(req.headers()) && !same_site(req.headers()) {
        return ApiError::Forbidden(
            "a write with the session cookie must come from this site (Origin or Sec-Fetch-Site)"
                .into(),
        )
        .into_response();
    }
    let path = req.uri().path().to_string();
    let mut response = next.run(req).await;
    let headers = response.headers_mut();
    let csp = if path == "/login" { CSP_LOGIN } else { CSP };
    for (name, value) in [
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CONTENT_SECURITY_POLICY, csp),
    ] {
        headers
            .entry(name)
            .or_insert(HeaderValue::from_static(value));
    }
    if path.starts_with("/api/") {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

/// Middleware: ends a request that takes longer than its [`RequestTimeLimit`] (default
/// [`REQUEST_TIMEOUT`]) with 408.
pub async fn time_limit(req: Request, next: Next) -> Response {
    if req.uri().path() == "/api/cockpit/stream" {
        return next.run(req).await;
    }
    let limit = req
        .extensions()
        .get::<RequestTimeLimit>()
        .map_or(REQUEST_TIMEOUT, |l| l.0);
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => ApiError::RequestTimeout.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn only_the_session_cookie_without_a_bearer_token_counts_as_cookie_authentication() {
        let cookie = format!("a=1; {SESSION_COOKIE}=x");
        assert!(cookie_authenticated(&headers(&[("cookie", &cookie)])));
        assert!(!cookie_authenticated(&headers(&[
            ("cookie", &cookie),
            ("authorization", "Bearer t")
        ])));
        assert!(!cookie_authenticated(&headers(&[("cookie", "other=1")])));
    }

    #[test]
    fn a_request_is_same_site_by_sec_fetch_site_or_by_an_origin_matching_the_host() {
        assert!(same_site(&headers(&[("sec-fetch-site", "same-origin")])));
        assert!(!same_site(&headers(&[("sec-fetch-site", "cross-site")])));
        assert!(same_site(&headers(&[
            ("origin", "http://127.0.0.1:8080"),
            ("host", "127.0.0.1:8080")
        ])));
        assert!(!same_site(&headers(&[
            ("origin", "http://evil.example"),
            ("host", "127.0.0.1:8080")
        ])));
        assert!(!same_site(&headers(&[("host", "127.0.0.1:8080")])));
    }
}
