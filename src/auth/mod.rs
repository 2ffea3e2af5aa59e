//! The caller's identity: roles, principals, token verification and the request extractor.
//!
//! A request is authenticated by `Authorization: Bearer <JWT>` or by the development session
//! cookie; there is no default user. Background work acts as the explicit [`Principal::system`].

pub mod dev_login;
pub mod jwt;

use std::sync::Arc;

use axum::extract::{FromRef, FromRequestParts};
use axum::http::request::Parts;

use crate::error::ApiError;
pub use crate::identity::{Principal, Role};
use jwt::Authenticator;

/// Name of the development session cookie.
pub const SESSION_COOKIE: &str = "freshplan_session";

fn bearer_or_cookie(parts: &Parts) -> Option<String> {
    if let Some(value) = parts.headers.get(axum::http::header::AUTHORIZATION) {
        let value = value.to_str().ok()?;
        let (scheme, token) = value.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim().to_string());
    }
    parts
        .headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == SESSION_COOKIE)
        .map(|(_, v)| v.to_string())
}

impl<S> FromRequestParts<S> for Principal
where
    S: Send + Sync,
    Arc<Authenticator>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let token = bearer_or_cookie(parts).ok_or(ApiError::Unauthenticated)?;
        Arc::<Authenticator>::from_ref(state)
            .verify(&token)
            .map_err(|e| {
                tracing::debug!(error = %e, "rejected token");
                ApiError::Unauthenticated
            })
    }
}

/// A principal if the request carries one; `None` otherwise (used where an anonymous
/// attempt must be counted, not just refused).
pub struct MaybePrincipal(pub Option<Principal>);

impl<S> FromRequestParts<S> for MaybePrincipal
where
    S: Send + Sync,
    Arc<Authenticator>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match bearer_or_cookie(parts) {
            None => Ok(MaybePrincipal(None)),
            Some(token) => Arc::<Authenticator>::from_ref(state)
                .verify(&token)
                .map(|p| MaybePrincipal(Some(p)))
                .map_err(|_| ApiError::Unauthenticated),
        }
    }
}
