//! JWT verification (HS256 secret; RS256 public key or JWKS file) and development tokens.

use std::collections::HashSet;

use anyhow::{anyhow, bail, Context};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::{Principal, Role};
use crate::config::JwtSettings;
use crate::territory::Territory;

/// Built-in HS256 secret used only by `serve --demo` and `freshplan token` when no secret is
/// configured. It is public knowledge: never use it outside development.
pub const DEVELOPMENT_SECRET: &str = "freshplan-development-secret-not-for-production-use";

#[derive(Debug, Default, Serialize, Deserialize)]
struct RealmAccess {
    #[serde(default)]
    roles: Vec<String>,
}

/// Claims FreshPlan reads (and writes into development tokens).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    realm_access: Option<RealmAccess>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub territory: Option<String>,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
}

/// Verifies tokens and mints development tokens and session cookies.
pub struct Authenticator {
    keys: Vec<(Option<String>, DecodingKey, Algorithm)>,
    signing: Option<EncodingKey>,
    issuer: Option<String>,
}

impl Authenticator {
    /// Builds the verifier from settings. `allow_development_secret` lets `--demo` and the
    /// `token` command fall back to [`DEVELOPMENT_SECRET`]; otherwise a key must be configured.
    pub fn from_settings(s: &JwtSettings, allow_development_secret: bool) -> anyhow::Result<Self> {
        let mut keys = Vec::new();
        let mut signing = None;
        let secret = if !s.secret.is_empty() {
            Some(s.secret.clone())
        } else if allow_development_secret && s.public_key_file.is_none() && s.jwks_file.is_none() {
            tracing::warn!("using the built-in development JWT secret (development only)");
            Some(DEVELOPMENT_SECRET.to_string())
        } else {
            None
        };
        if let Some(secret) = secret {
            keys.push((
                None,
                DecodingKey::from_secret(secret.as_bytes()),
                Algorithm::HS256,
            ));
            signing = Some(EncodingKey::from_secret(secret.as_bytes()));
        }
        if let Some(path) = &s.public_key_file {
            let pem = std::fs::read(path).with_context(|| {
                format!(
                    "freshplan.auth.jwt.public-key-file: cannot read {}",
                    path.display()
                )
            })?;
            let key = DecodingKey::from_rsa_pem(&pem)
                .context("freshplan.auth.jwt.public-key-file: not an RSA public key in PEM")?;
            keys.push((None, key, Algorithm::RS256));
        }
        if let Some(path) = &s.jwks_file {
            let text = std::fs::read_to_string(path).with_context(|| {
                format!(
                    "freshplan.auth.jwt.jwks-file: cannot read {}",
                    path.display()
                )
            })?;
            let set: JwkSet = serde_json::from_str(&text)
                .context("freshplan.auth.jwt.jwks-file: not a JWKS document")?;
            for jwk in &set.keys {
                let key = DecodingKey::from_jwk(jwk)
                    .context("freshplan.auth.jwt.jwks-file: unusable key")?;
                keys.push((jwk.common.key_id.clone(), key, Algorithm::RS256));
            }
        }
        if keys.is_empty() {
            bail!(
                "no token key configured: set freshplan.auth.jwt.secret (HS256, ≥32 bytes), \
                 freshplan.auth.jwt.public-key-file or freshplan.auth.jwt.jwks-file (RS256)"
            );
        }
        Ok(Authenticator {
            keys,
            signing,
            issuer: s.issuer.clone(),
        })
    }

    /// Verifies a token and turns it into a principal.
    pub fn verify(&self, token: &str) -> anyhow::Result<Principal> {
        let header = jsonwebtoken::decode_header(token).context("malformed token")?;
        let mut last_err = anyhow!("no key accepts this token");
        for (kid, key, alg) in &self.keys {
            if *alg != header.alg || (kid.is_some() && header.kid.is_some() && *kid != header.kid) {
                continue;
            }
            let mut validation = Validation::new(*alg);
            validation.validate_aud = false;
            if let Some(iss) = &self.issuer {
                validation.set_issuer(&[iss]);
            }
            match jsonwebtoken::decode::<Claims>(token, key, &validation) {
                Ok(data) => return principal_from(data.claims),
                Err(e) => last_err = e.into(),
            }
        }
        Err(last_err)
    }

    /// Signs a development token (HS256) valid for `ttl_seconds`.
    pub fn mint(&self, p: &Principal, ttl_seconds: u64) -> anyhow::Result<String> {
        let key = self
            .signing
            .as_ref()
            .ok_or_else(|| anyhow!("minting needs an HS256 secret (freshplan.auth.jwt.secret)"))?;
        let claims = Claims {
            sub: p.user_id.clone(),
            name: Some(p.name.clone()),
            roles: vec![p.role.as_str().to_string()],
            realm_access: None,
            territory: Some(p.territory.code().to_string()),
            exp: jsonwebtoken::get_current_timestamp() + ttl_seconds,
            iss: self.issuer.clone(),
        };
        Ok(jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            key,
        )?)
    }
}

fn principal_from(c: Claims) -> anyhow::Result<Principal> {
    if c.sub.trim().is_empty() || c.sub.len() > 128 {
        bail!("token has no usable sub claim");
    }
    let mut names: HashSet<&str> = c.roles.iter().map(String::as_str).collect();
    if let Some(realm) = &c.realm_access {
        names.extend(realm.roles.iter().map(String::as_str));
    }
    let role = Role::effective(names).ok_or_else(|| anyhow!("token carries no FreshPlan role"))?;
    let territory: Territory = c
        .territory
        .as_deref()
        .ok_or_else(|| anyhow!("token has no territory claim"))?
        .parse()
        .map_err(|e: String| anyhow!(e))?;
    Ok(Principal {
        name: c.name.unwrap_or_else(|| c.sub.clone()),
        user_id: c.sub,
        role,
        territory,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Authenticator {
        let s = JwtSettings {
            secret: "x".repeat(32),
            ..Default::default()
        };
        Authenticator::from_settings(&s, false).unwrap()
    }

    #[test]
    fn a_minted_token_verifies_to_the_same_principal() {
        let p = Principal {
            user_id: "sales-de-1".into(),
            name: "Sales DE 1".into(),
            role: Role::Sales,
            territory: Territory::DE,
        };
        let a = auth();
        assert_eq!(a.verify(&a.mint(&p, 60).unwrap()).unwrap(), p);
    }

    #[test]
    fn keycloak_realm_roles_are_read_and_normalised() {
        let a = auth();
        let claims = serde_json::json!({
            "sub": "m1", "territory": "at", "exp": jsonwebtoken::get_current_timestamp() + 60,
            "realm_access": {"roles": ["SALES", "Manager", "offline_access"]}
        });
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret("x".repeat(32).as_bytes()),
        )
        .unwrap();
        let p = a.verify(&token).unwrap();
        assert_eq!((p.role, p.territory), (Role::Manager, Territory::AT));
    }

    #[test]
    fn tokens_with_a_wrong_key_no_role_or_expired_are_rejected() {
        let a = auth();
        let other = Authenticator::from_settings(
            &JwtSettings {
                secret: "y".repeat(32),
                ..Default::default()
            },
            false,
        )
        .unwrap();
        let p = Principal::system();
        let p = Principal {
            role: Role::Admin,
            ..p
        };
        assert!(a.verify(&other.mint(&p, 60).unwrap()).is_err());
        let no_role = serde_json::json!({"sub": "x", "territory": "DE", "roles": ["guest"],
            "exp": jsonwebtoken::get_current_timestamp() + 60});
        let key = EncodingKey::from_secret("x".repeat(32).as_bytes());
        let t = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &no_role, &key).unwrap();
        assert!(a.verify(&t).is_err());
        let expired =
            serde_json::json!({"sub": "x", "territory": "DE", "roles": ["admin"], "exp": 1000});
        let t = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &expired, &key).unwrap();
        assert!(a.verify(&t).is_err());
        assert!(Authenticator::from_settings(&JwtSettings::default(), false).is_err());
    }
}
