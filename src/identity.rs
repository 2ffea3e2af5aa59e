//! Who acts: the effective [`Role`] and the [`Principal`] set into every transaction for
//! row-level security. A leaf module: the domain, the database layer and the HTTP layer all use
//! it, and it uses none of them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

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

    /// Who an anonymous change acts as where `freshplan.security.allow-unauthenticated-publisher`
    /// is on (tests and `--demo` only): an ordinary sales user of DE that owns what it creates,
    /// sees only that and is in no user's audience but its own, admins' and DE's managers'.
    /// Never the system principal.
    pub fn anonymous_publisher() -> Self {
        Principal {
            user_id: "anonymous-publisher".into(),
            name: "Anonymous publisher (tests only)".into(),
            role: Role::Sales,
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

crate::text_column!(Role, as_str);

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
