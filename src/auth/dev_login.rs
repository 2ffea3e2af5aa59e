//! Development login (`--demo`; `freshplan.auth.dev-login.enabled` is refused by `serve` without
//! it and honoured only by tests): pick an active user in the browser, get an HttpOnly session
//! cookie carrying a signed token. Off by default. Everything from the user table is
//! HTML-escaped on the page.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;

use std::sync::Arc;

use axum::extract::FromRef;
use sqlx::PgPool;

use super::jwt::Authenticator;
use super::{Principal, Role, SESSION_COOKIE};
use crate::db;
use crate::error::{ApiError, ApiResult, AppJson};

/// Session lifetime.
const SESSION_SECONDS: u64 = 8 * 3600;

/// Routes, mounted only when the development login is on.
pub fn router<S: Clone + Send + Sync + 'static>(state: DevLoginState) -> Router<S> {
    Router::new()
        .route("/login", get(page))
        .route("/api/dev/login", post(login))
        .with_state(state)
}

/// What the development login needs.
#[derive(Clone, FromRef)]
pub struct DevLoginState {
    pub pool: PgPool,
    pub auth: Arc<Authenticator>,
    /// Mark the session cookie `Secure` (`freshplan.auth.cookie-secure`).
    #[from_ref(skip)]
    pub secure_cookie: bool,
}

async fn users(state: &DevLoginState) -> ApiResult<Vec<(String, String, String, String)>> {
    let mut tx = db::begin_as(&state.pool, &Principal::system()).await?;
    let rows = sqlx::query_as(
        "SELECT id, name, role, territory FROM users WHERE active ORDER BY territory, role, id",
    )
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(rows)
}

pub use crate::html::escape_html;

async fn page(State(state): State<DevLoginState>) -> ApiResult<Html<String>> {
    let mut items = String::new();
    for (id, name, role, territory) in users(&state).await? {
        let (id, name, role, territory) = (
            escape_html(&id),
            escape_html(&name),
            escape_html(&role),
            escape_html(&territory),
        );
        items.push_str(&format!(
            "<li><button data-user=\"{id}\">{name}</button> <small>{role} · {territory}</small></li>"
        ));
    }
    Ok(Html(format!(
        "<!doctype html><meta charset=utf-8><title>FreshPlan – Demo login</title>\
         <h1>Demo login</h1><p>Development only: choose a demo user.</p><ul id=users>{items}</ul>\
         <script>document.querySelectorAll('button[data-user]').forEach(b=>b.onclick=async()=>{{\
         const r=await fetch('/api/dev/login',{{method:'POST',headers:{{'content-type':'application/json'}},\
         body:JSON.stringify({{userId:b.dataset.user}})}});if(r.ok)location.href='/';}});</script>"
    )))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LoginRequest {
    user_id: String,
}

async fn login(
    State(state): State<DevLoginState>,
    AppJson(body): AppJson<LoginRequest>,
) -> ApiResult<Response> {
    let user = users(&state)
        .await?
        .into_iter()
        .find(|u| u.0 == body.user_id)
        .ok_or_else(|| ApiError::field("unknown or deactivated user"))?;
    let principal = Principal {
        user_id: user.0,
        name: user.1,
        role: user
            .2
            .parse::<Role>()
            .map_err(|e| ApiError::Internal(anyhow::anyhow!(e)))?,
        territory: user
            .3
            .parse()
            .map_err(|e: String| ApiError::Internal(anyhow::anyhow!(e)))?,
    };
    let seconds = SESSION_SECONDS.min(state.auth.max_lifetime_seconds());
    let token = state.auth.mint(&principal, seconds)?;
    let secure = if state.secure_cookie { "; Secure" } else { "" };
    let cookie = format!(
        "{SESSION_COOKIE}={token}; HttpOnly; SameSite=Lax; Path=/; Max-Age={seconds}{secure}"
    );
    Ok((StatusCode::NO_CONTENT, [(header::SET_COOKIE, cookie)]).into_response())
}

#[cfg(test)]
mod tests {
    #[test]
    fn html_special_characters_are_escaped() {
        assert_eq!(
            super::escape_html(r#"<img src=x onerror="a('b')">&"#),
            "&lt;img src=x onerror=&quot;a(&#39;b&#39;)&quot;&gt;&amp;"
        );
    }
}
