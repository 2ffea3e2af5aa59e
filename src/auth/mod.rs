//! The caller's identity: roles, principals, token verification and the request extractor.
//!
//! A request is authenticated by `Authorization: Bearer <JWT>` or by the development session
//! cookie; there is no default user. Background work acts as the explicit [`Principal::system`].
//!
//! The token proves who the caller is; the user table says what that user is ([`users`]): the
//! extractors below admit a verified token only when its `sub` has an active row with the same
//! role and territory.

pub mod dev_login;
pub mod jwt;
pub mod users;

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

/// An admitted caller: the principal as the user table has it, and when its token expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub principal: Principal,
    /// The token's `exp` (seconds since the Unix epoch): long-lived responses (the event
    /// stream) end then.
    pub expires_at: u64,
}

impl Authenticator {
    /// Verifies the token and admits its principal by the user table. Every refusal is 401
    /// without a reason in the answer; the log says why.
    pub async fn authenticate(&self, token: &str) -> Result<Caller, ApiError> {
        let verified = self.verify_token(token).map_err(|e| {
            tracing::debug!(error = %e, "rejected token");
            ApiError::Unauthenticated
        })?;
        let Some(users) = self.users() else {
            tracing::error!("no user directory attached: every token is refused");
            return Err(ApiError::Unauthenticated);
        };
        let row = users.get(&verified.principal.user_id).await?;
        match users::admit(&verified.principal, row.as_ref()) {
            Ok(principal) => Ok(Caller {
                principal,
                expires_at: verified.expires_at,
            }),
            Err(reason) => {
                tracing::warn!(
                    sub = %verified.principal.user_id,
                    claimed_role = %verified.principal.role,
                    claimed_territory = %verified.principal.territory,
                    reason,
                    "token refused by the user table"
                );
                Err(ApiError::Unauthenticated)
            }
        }
    }
}

impl<S> FromRequestParts<S> for Caller
where
    S: Send + Sync,
    Arc<Authenticator>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let token = bearer_or_cookie(parts).ok_or(ApiError::Unauthenticated)?;
        Arc::<Authenticator>::from_ref(state)
            .authenticate(&token)
            .await
    }
}

impl<S> FromRequestParts<S> for Principal
where
    S: Send + Sync,
    Arc<Authenticator>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Caller::from_request_parts(parts, state)
            .await
            .map(|c| c.principal)
    }
}

/// A principal if the request carries one; `None` otherwise (used where an anonymous
/// attempt must be counted, not just refused). A token that is not admitted is 401.
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
                .authenticate(&token)
                .await
                .map(|c| MaybePrincipal(Some(c.principal))),
        }
    }
}
