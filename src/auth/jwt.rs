//! JWT verification (HS256 secret; RS256 public key or JWKS file) and development tokens.
//!
//! What a token must satisfy: a key we trust (no algorithm confusion), `exp` in the future and at
//! most `freshplan.auth.jwt.max-lifetime-seconds` ahead, `nbf` (if present) not in the future,
//! `iss` equal to `freshplan.auth.jwt.issuer` (required, and the key is required with a public key
//! or JWKS), `aud` containing `freshplan.auth.jwt.audience` when that is set (required then), a
//! `sub`, a FreshPlan role and a territory. No clock leeway: a token stops working at its `exp`,
//! on REST and on the event stream alike. Whether the user exists, is active and has that role
//! and territory is decided by the user table afterwards (`super::users`).

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::users::Users;
use super::{Principal, Role};
use crate::config::JwtSettings;
use crate::territory::Territory;

/// Name of the file holding the random development secret in a `--demo` data folder.
pub const DEMO_SECRET_FILE: &str = "dev-jwt-secret";

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
    pub iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// Written into development tokens; read (a string or a list) by the validation itself.
    #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
}

/// A verified token: who it says the caller is and until when it is valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub principal: Principal,
    /// `exp`, seconds since the Unix epoch.
    pub expires_at: u64,
}

/// Verifies tokens and mints development tokens and session cookies. With a user directory
/// attached ([`Authenticator::with_users`]) it also admits callers (see `super::Caller`).
pub struct Authenticator {
    keys: Vec<(Option<String>, DecodingKey, Algorithm)>,
    signing: Option<EncodingKey>,
    issuer: Option<String>,
    audience: Option<String>,
    max_lifetime: u64,
    users: Option<Arc<Users>>,
}

/// Creates the random development secret of a `--demo` data folder unless it exists (mode 0600).
pub fn ensure_demo_secret(path: &Path) -> anyhow::Result<()> {
    use rand::RngCore;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if path.exists() {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the data folder {}", dir.display()))?;
    }
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(mut f) => {
            f.write_all(secret.as_bytes())?;
            f.write_all(b"\n")?;
            tracing::warn!(path = %path.display(), "generated a development JWT secret for this data folder (demo only)");
            Ok(())
        }
        // Another process created it first: theirs counts.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot write {}", path.display())),
    }
}

fn read_demo_secret(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        anyhow!(
            "no token key configured and no development secret in {} ({e}): set \
             freshplan.auth.jwt.secret, or start `freshplan serve --demo` with the same data folder \
             (FRESHPLAN_DATA_DIR) first",
            path.display()
        )
    })?;
    let secret = text.trim().to_string();
    if secret.len() < 32 {
        bail!("the development secret in {} is too short", path.display());
    }
    Ok(secret)
}

impl Authenticator {
    /// Builds the verifier from settings. `allow_development_secret` lets `--demo` and the
    /// `token` command fall back to the random secret of the data folder
    /// (`JwtSettings::demo_secret_file`); otherwise a key must be configured.
    pub fn from_settings(s: &JwtSettings, allow_development_secret: bool) -> anyhow::Result<Self> {
        let mut keys = Vec::new();
        let mut signing = None;
        let secret = if !s.secret.is_empty() {
            Some(s.secret.clone())
        } else if allow_development_secret && s.public_key_file.is_none() && s.jwks_file.is_none() {
            match &s.demo_secret_file {
                Some(path) => Some(read_demo_secret(path)?),
                None => None,
            }
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
        if (s.public_key_file.is_some() || s.jwks_file.is_some()) && s.issuer.is_none() {
            bail!(
                "freshplan.auth.jwt.issuer is required with freshplan.auth.jwt.public-key-file or \
                 freshplan.auth.jwt.jwks-file: tokens of an identity provider are accepted only \
                 with its issuer"
            );
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
            audience: s.audience.clone(),
            max_lifetime: s.max_lifetime_seconds,
            users: None,
        })
    }

    /// Attaches the user directory that admits verified callers.
    pub fn with_users(mut self, users: Arc<Users>) -> Self {
        self.users = Some(users);
        self
    }

    /// The user directory, if attached.
    pub fn users(&self) -> Option<&Arc<Users>> {
        self.users.as_ref()
    }

    /// `freshplan.auth.jwt.max-lifetime-seconds`.
    pub fn max_lifetime_seconds(&self) -> u64 {
        self.max_lifetime
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut validation = Validation::new(alg);
        validation.leeway = 0;
        // RFC 7519: valid only while now < exp (the library accepts now == exp otherwise), the
        // instant the event stream ends with `reauth`.
        validation.reject_tokens_expiring_in_less_than = 1;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        if let Some(iss) = &self.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        match &self.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        validation
    }

    /// Verifies a token's signature and claims; the principal it names is not yet admitted by
    /// the user table.
    pub fn verify_token(&self, token: &str) -> anyhow::Result<Verified> {
        let header = jsonwebtoken::decode_header(token).context("malformed token")?;
        let mut last_err = anyhow!("no key accepts this token");
        for (kid, key, alg) in &self.keys {
            if *alg != header.alg || (kid.is_some() && header.kid.is_some() && *kid != header.kid) {
                continue;
            }
            match jsonwebtoken::decode::<Claims>(token, key, &self.validation(*alg)) {
                Ok(data) => {
                    let now = jsonwebtoken::get_current_timestamp();
                    let exp = data.claims.exp;
                    if exp > now.saturating_add(self.max_lifetime) {
                        bail!(
                            "token expires in {} s, beyond freshplan.auth.jwt.max-lifetime-seconds ({})",
                            exp - now,
                            self.max_lifetime
                        );
                    }
                    return Ok(Verified {
                        principal: principal_from(data.claims)?,
                        expires_at: exp,
                    });
                }
                Err(e) => last_err = e.into(),
            }
        }
        Err(last_err)
    }

    /// Verifies a token and turns it into a principal (signature and claims only).
    pub fn verify(&self, token: &str) -> anyhow::Result<Principal> {
        self.verify_token(token).map(|v| v.principal)
    }

    /// Signs a development token (HS256) valid for `ttl_seconds` (at most the maximum lifetime).
    pub fn mint(&self, p: &Principal, ttl_seconds: u64) -> anyhow::Result<String> {
        let key = self
            .signing
            .as_ref()
            .ok_or_else(|| anyhow!("minting needs an HS256 secret (freshplan.auth.jwt.secret)"))?;
        if p.role == Role::System {
            bail!("the system principal is for background jobs and has no tokens");
        }
        if ttl_seconds > self.max_lifetime {
            bail!(
                "a token lifetime of {ttl_seconds} s exceeds freshplan.auth.jwt.max-lifetime-seconds ({})",
                self.max_lifetime
            );
        }
        let now = jsonwebtoken::get_current_timestamp();
        let claims = Claims {
            sub: p.user_id.clone(),
            name: Some(p.name.clone()),
            roles: vec![p.role.as_str().to_string()],
            realm_access: None,
            territory: Some(p.territory.code().to_string()),
            exp: now + ttl_seconds,
            iat: Some(now),
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
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

    fn signed(claims: serde_json::Value) -> String {
        let key = EncodingKey::from_secret("x".repeat(32).as_bytes());
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap()
    }

    #[test]
    fn audience_issuer_not_before_and_lifetime_are_enforced() {
        let now = jsonwebtoken::get_current_timestamp();
        let strict = Authenticator::from_settings(
            &JwtSettings {
                secret: "x".repeat(32),
                issuer: Some("https://idp".into()),
                audience: Some("freshplan".into()),
                max_lifetime_seconds: 600,
                ..Default::default()
            },
            false,
        )
        .unwrap();
        let base = serde_json::json!({"sub": "u", "territory": "DE", "roles": ["sales"],
            "exp": now + 60, "iss": "https://idp", "aud": ["account", "freshplan"]});
        assert!(strict.verify(&signed(base.clone())).is_ok());
        for (field, value) in [
            ("aud", serde_json::json!("other")),
            ("iss", serde_json::json!("https://evil")),
            ("nbf", serde_json::json!(now + 120)),
            ("exp", serde_json::json!(now + 601)),
        ] {
            let mut c = base.clone();
            c[field] = value;
            assert!(strict.verify(&signed(c)).is_err(), "{field}");
        }
        for missing in ["aud", "iss"] {
            let mut c = base.clone();
            c.as_object_mut().unwrap().remove(missing);
            assert!(strict.verify(&signed(c)).is_err(), "missing {missing}");
        }
        let minted = strict
            .mint(
                &Principal {
                    user_id: "u".into(),
                    name: "U".into(),
                    role: Role::Sales,
                    territory: Territory::DE,
                },
                600,
            )
            .unwrap();
        assert_eq!(strict.verify_token(&minted).unwrap().expires_at, now + 600);
        assert!(strict.mint(&Principal::system(), 60).is_err());
        assert!(strict
            .mint(
                &Principal {
                    role: Role::Admin,
                    ..Principal::system()
                },
                601
            )
            .is_err());
    }

    #[test]
    fn the_demo_secret_is_random_per_folder_private_and_stable() {
        use std::os::unix::fs::PermissionsExt;
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (fa, fb) = (
            a.path().join(DEMO_SECRET_FILE),
            b.path().join(DEMO_SECRET_FILE),
        );
        let settings = |f: &std::path::Path| JwtSettings {
            demo_secret_file: Some(f.to_path_buf()),
            ..Default::default()
        };
        assert!(
            Authenticator::from_settings(&settings(&fa), true).is_err(),
            "no secret before --demo made one"
        );
        ensure_demo_secret(&fa).unwrap();
        let first = std::fs::read_to_string(&fa).unwrap();
        ensure_demo_secret(&fa).unwrap();
        assert_eq!(std::fs::read_to_string(&fa).unwrap(), first, "stable");
        ensure_demo_secret(&fb).unwrap();
        assert_ne!(std::fs::read_to_string(&fb).unwrap(), first, "random");
        assert_eq!(
            std::fs::metadata(&fa).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let p = Principal {
            role: Role::Admin,
            ..Principal::system()
        };
        let ta = Authenticator::from_settings(&settings(&fa), true).unwrap();
        let tb = Authenticator::from_settings(&settings(&fb), true).unwrap();
        assert!(ta.verify(&ta.mint(&p, 60).unwrap()).is_ok());
        assert!(tb.verify(&ta.mint(&p, 60).unwrap()).is_err());
        assert!(
            Authenticator::from_settings(&settings(&fa), false).is_err(),
            "only where allowed"
        );
    }
}
