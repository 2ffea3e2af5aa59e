//! The caller's identity: roles, principals, token verification and the request extractor.
//!
//! A request is authenticated by `Authorization: Bearer <JWT>` or by the development session
//! cookie; there is no default user. Background work acts as the explicit [`Principal::system`].

pub mod dev_login;
pub mod jwt;

use std::fmt;
use std::str::FromStr;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use serde::{Deserialize, Serialize};

use crate::app::AppState;
use crate::error::ApiError;
use crate::territory::Territory;

/// Effective role, ordered from least to most privileged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Sales,
    Manager,
    Admin,
    /// Background jobs; never granted by a token.
    System,
}

impl Role {
    /// Name as stored in the RLS setting `app.role`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Sales => "sales",
            Role::Manager => "manager",
            Role::Admin => "admin",
            Role::System => "system",
        }
    }

    /// The most privileged FreshPlan role among token role names (case-insensitive);
    /// unknown names are ignored and `system` can never come from a token.
    pub fn effective<'a>(names: impl IntoIterator<Item = &'a str>) -> Option<Role> {
        names
            .into_iter()
            .filter_map(|n| n.parse::<Role>().ok())
            .filter(|r| *r != Role::System)
            .max()
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "viewer" => Ok(Role::Viewer),
            "sales" => Ok(Role::Sales),
            "manager" => Ok(Role::Manager),
            "admin" => Ok(Role::Admin),
            "system" => Ok(Role::System),
            other => Err(format!(
                "unknown role `{other}` (expected admin, manager, sales or viewer)"
            )),
        }
    }
}

/// Who is acting: set into every transaction for row-level security.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user_id: String,
    pub name: String,
    pub role: Role,
    pub territory: Territory,
}

impl Principal {
    /// The explicit principal of background jobs (listener, follow-ups, retention, rotation).
    pub fn system() -> Self {
        Principal {
            user_id: "system".into(),
            name: "FreshPlan system".into(),
            role: Role::System,
            territory: Territory::DE,
        }
    }

    /// Admin or system: sees every territory.
    pub fn is_global(&self) -> bool {
        matches!(self.role, Role::Admin | Role::System)
    }

    /// Fails with 403 unless the role is one of `allowed`.
    pub fn require(&self, allowed: &[Role], action: &str) -> Result<(), ApiError> {
        if allowed.contains(&self.role) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "role {} may not {action}",
                self.role
            )))
        }
    }
}

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

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer_or_cookie(parts).ok_or(ApiError::Unauthenticated)?;
        state.auth.verify(&token).map_err(|e| {
            tracing::debug!(error = %e, "rejected token");
            ApiError::Unauthenticated
        })
    }
}

/// A principal if the request carries one; `None` otherwise (used where an anonymous
/// attempt must be counted, not just refused).
pub struct MaybePrincipal(pub Option<Principal>);

impl FromRequestParts<AppState> for MaybePrincipal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        match bearer_or_cookie(parts) {
            None => Ok(MaybePrincipal(None)),
            Some(token) => state
                .auth
                .verify(&token)
                .map(|p| MaybePrincipal(Some(p)))
                .map_err(|_| ApiError::Unauthenticated),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_role_is_the_most_privileged_known_one_case_insensitively() {
        assert_eq!(
            Role::effective(["SALES", "offline_access", "Manager"]),
            Some(Role::Manager)
        );
        assert_eq!(Role::effective(["viewer"]), Some(Role::Viewer));
        assert_eq!(Role::effective(["uma_authorization"]), None);
        assert_eq!(
            Role::effective(["system"]),
            None,
            "system never comes from a token"
        );
    }
}
