//! Contact data at rest: AEAD encryption (AES-256-GCM, fresh 96-bit nonce per value, the lead id
//! and field as associated data), keyed lookup hashes (HMAC-SHA-256 of the normalised value),
//! and masking for logs. This is the only module that decrypts; the API, the (later) mail
//! dispatcher and `keys rotate` all go through [`Vault`].

pub mod rotate;

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use anyhow::{anyhow, bail, Context};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use uuid::Uuid;

use crate::config::PiiSettings;
use crate::territory::Territory;

const NONCE_LEN: usize = 12;

/// Which contact field a value belongs to (part of the associated data, so a value cannot be
/// moved between fields either).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PiiField {
    ContactPerson,
    Email,
    Phone,
    /// A rendered follow-up mail with its recipient (the mail outbox).
    Mail,
}

impl PiiField {
    fn tag(self) -> &'static [u8] {
        match self {
            PiiField::ContactPerson => b"contact_person",
            PiiField::Email => b"email",
            PiiField::Phone => b"phone",
            PiiField::Mail => b"mail",
        }
    }
}

/// A value that failed to decrypt: wrong row, tampered, or encrypted under an unknown key.
#[derive(Debug, thiserror::Error)]
pub enum PiiError {
    #[error(
        "contact data of lead {lead} is encrypted under key `{key_id}`, which is not configured"
    )]
    UnknownKey { lead: Uuid, key_id: String },
    #[error(
        "contact data of lead {lead} failed authentication (tampered or copied from another row)"
    )]
    Tampered { lead: Uuid },
}

/// Keys for encryption and lookup hashes.
pub struct Vault {
    keys: HashMap<String, Aes256Gcm>,
    active: String,
    lookup: Vec<u8>,
}

impl fmt::Debug for Vault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vault")
            .field("active", &self.active)
            .field("keys", &self.keys.len())
            .finish()
    }
}

fn decode_key(what: &str, b64: &str) -> anyhow::Result<Vec<u8>> {
    let bytes = B64
        .decode(b64.trim())
        .with_context(|| format!("{what}: not base64"))?;
    if bytes.len() != 32 {
        bail!(
            "{what}: must be 32 bytes (base64 of 32 random bytes), got {}",
            bytes.len()
        );
    }
    Ok(bytes)
}

/// A key file: `active = "id"`, `lookup-key = "base64"`, `[keys] id = "base64"`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    active: String,
    #[serde(rename = "lookup-key")]
    lookup_key: String,
    keys: HashMap<String, String>,
}

impl Vault {
    /// Builds a vault from explicit keys (id, 32 bytes); the last is the active one.
    pub fn new(
        keys: Vec<(String, Vec<u8>)>,
        active: &str,
        lookup: Vec<u8>,
    ) -> anyhow::Result<Self> {
        let mut map = HashMap::new();
        for (id, key) in keys {
            if id.is_empty() || id.len() > 32 {
                bail!("PII key id `{id}` must be 1 to 32 characters");
            }
            let cipher = Aes256Gcm::new_from_slice(&key)
                .map_err(|_| anyhow!("PII key `{id}` must be 32 bytes"))?;
            if map.insert(id.clone(), cipher).is_some() {
                bail!("PII key id `{id}` is configured twice; every key needs its own id");
            }
        }
        if !map.contains_key(active) {
            bail!("the active PII key `{active}` is not among the configured keys");
        }
        if lookup.len() != 32 {
            bail!("freshplan.pii.lookup-key must be 32 bytes");
        }
        Ok(Vault {
            keys: map,
            active: active.to_string(),
            lookup,
        })
    }

    /// Loads keys from `freshplan.pii.key-file` or `freshplan.pii.keys` + `lookup-key`.
    /// Returns `None` when nothing is configured (the caller decides whether that is fatal).
    pub fn from_settings(s: &PiiSettings) -> anyhow::Result<Option<Self>> {
        if let Some(path) = &s.key_file {
            if !s.keys.trim().is_empty() {
                bail!("set either freshplan.pii.key-file or freshplan.pii.keys, not both");
            }
            return Self::from_file(path).map(Some);
        }
        if s.keys.trim().is_empty() {
            return Ok(None);
        }
        let mut keys = Vec::new();
        for part in s.keys.split(',').filter(|p| !p.trim().is_empty()) {
            let (id, b64) = part.split_once(':').ok_or_else(|| {
                anyhow!("freshplan.pii.keys: expected id:base64, got an entry without `:`")
            })?;
            keys.push((
                id.trim().to_string(),
                decode_key("freshplan.pii.keys", b64)?,
            ));
        }
        let active = keys.last().map(|(id, _)| id.clone()).unwrap_or_default();
        if s.lookup_key.is_empty() {
            bail!("freshplan.pii.lookup-key is required with freshplan.pii.keys");
        }
        let lookup = decode_key("freshplan.pii.lookup-key", &s.lookup_key)?;
        Self::new(keys, &active, lookup).map(Some)
    }

    /// Reads a key file.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("freshplan.pii.key-file: cannot read {}", path.display()))?;
        let file: KeyFile = toml_from_str(&text)
            .with_context(|| format!("freshplan.pii.key-file {}: invalid", path.display()))?;
        let mut keys = Vec::new();
        for (id, b64) in &file.keys {
            keys.push((id.clone(), decode_key(&format!("key `{id}`"), b64)?));
        }
        Self::new(
            keys,
            &file.active,
            decode_key("lookup-key", &file.lookup_key)?,
        )
    }

    /// Writes a fresh development key file (for `--demo`) unless one exists, and loads it.
    pub fn development(path: &Path) -> anyhow::Result<Self> {
        if !path.exists() {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            write_private(path, &new_key_file("dev-1"))?;
            tracing::warn!(path = %path.display(), "generated a development PII key (demo only; never use it for real data)");
        }
        Self::from_file(path)
    }

    /// Id of the key new values are encrypted with.
    pub fn active_key_id(&self) -> &str {
        &self.active
    }

    /// Encrypts a value for a lead's field under the active key: nonce || ciphertext || tag.
    pub fn seal(&self, lead: Uuid, field: PiiField, plain: &str) -> Vec<u8> {
        let cipher = &self.keys[&self.active];
        let mut nonce = [0u8; NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        let aad = aad(lead, field);
        let ct = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plain.as_bytes(),
                    aad: &aad,
                },
            )
            .expect("AES-GCM encryption of an in-memory buffer cannot fail");
        let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    /// Decrypts a value sealed for this lead and field under `key_id`.
    pub fn open(
        &self,
        lead: Uuid,
        field: PiiField,
        key_id: &str,
        blob: &[u8],
    ) -> Result<String, PiiError> {
        let cipher = self.keys.get(key_id).ok_or_else(|| PiiError::UnknownKey {
            lead,
            key_id: key_id.to_string(),
        })?;
        if blob.len() < NONCE_LEN + 16 {
            return Err(PiiError::Tampered { lead });
        }
        let (nonce, ct) = blob.split_at(NONCE_LEN);
        let aad = aad(lead, field);
        let plain = cipher
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad: &aad })
            .map_err(|_| PiiError::Tampered { lead })?;
        String::from_utf8(plain).map_err(|_| PiiError::Tampered { lead })
    }

    /// A 32-byte key for `purpose` derived from the lookup key (HMAC domain `derive:`, apart from
    /// every field tag), so a signing key needs no configuration of its own and changes with it.
    pub fn derived_key(&self, purpose: &str) -> [u8; 32] {
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.lookup).expect("HMAC takes any key length");
        mac.update(b"derive:");
        mac.update(purpose.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// Keyed hash of an already normalised value (see [`normalize_email`], [`normalize_phone`]).
    pub fn lookup_hash(&self, field: PiiField, normalised: &str) -> Vec<u8> {
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.lookup).expect("HMAC takes any key length");
        mac.update(field.tag());
        mac.update(b"\0");
        mac.update(normalised.as_bytes());
        mac.finalize().into_bytes().to_vec()
    }
}

/// Writes a new file readable by its owner only (a key file must not be world-readable).
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

fn aad(lead: Uuid, field: PiiField) -> Vec<u8> {
    let mut aad = lead.as_bytes().to_vec();
    aad.extend_from_slice(field.tag());
    aad
}

fn toml_from_str<T: serde::de::DeserializeOwned>(text: &str) -> anyhow::Result<T> {
    use figment::providers::{Format, Toml};
    figment::Figment::from(Toml::string(text))
        .extract::<T>()
        .map_err(|e| anyhow!(e.to_string()))
}

/// Text of a new key file with one random key `id` and a random lookup key.
pub fn new_key_file(id: &str) -> String {
    let mut key = [0u8; 32];
    let mut lookup = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut key);
    rand::thread_rng().fill_bytes(&mut lookup);
    format!(
        "# FreshPlan PII keys. Keep out of the repository and the database.\nactive = \"{id}\"\nlookup-key = \"{}\"\n\n[keys]\n\"{id}\" = \"{}\"\n",
        B64.encode(lookup),
        B64.encode(key)
    )
}

/// Lower-cased, trimmed email; a clear message when it is not an address.
pub fn normalize_email(raw: &str) -> Result<String, String> {
    let email = raw.trim().to_lowercase();
    let valid = email.len() <= 254
        && !email.contains(char::is_whitespace)
        && email.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty()
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && !domain.contains('@')
        });
    if valid {
        Ok(email)
    } else {
        Err("email is not a valid address".into())
    }
}

/// E.164 form of a phone number; national numbers (leading 0) take the territory's code.
pub fn normalize_phone(raw: &str, territory: Territory) -> Result<String, String> {
    let trimmed = raw.trim();
    let digits: String = trimmed.chars().filter(|c| c.is_ascii_digit()).collect();
    if trimmed
        .chars()
        .any(|c| !(c.is_ascii_digit() || " +-()/.".contains(c)))
    {
        return Err("phone may contain only digits, spaces, + - ( ) / .".into());
    }
    let e164 = if trimmed.starts_with('+') {
        digits
    } else if let Some(rest) = digits.strip_prefix("00") {
        rest.to_string()
    } else if let Some(rest) = digits.strip_prefix('0') {
        format!("{}{}", territory.calling_code(), rest)
    } else {
        digits
    };
    if !(8..=15).contains(&e164.len()) {
        return Err("phone must have 8 to 15 digits in international form".into());
    }
    Ok(format!("+{e164}"))
}

/// Wraps contact data so `Debug` and `Display` never print it: emails show as
/// `***@example.com`, everything else as `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Masked<T>(pub T);

impl<T: AsRef<str>> fmt::Display for Masked<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.as_ref().rsplit_once('@') {
            Some((_, domain)) => write!(f, "***@{domain}"),
            None => f.write_str("***"),
        }
    }
}

impl<T: AsRef<str>> fmt::Debug for Masked<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vault() -> Vault {
        Vault::new(vec![("k1".into(), vec![7; 32])], "k1", vec![9; 32]).unwrap()
    }

    #[test]
    fn a_value_decrypts_only_for_its_own_lead_and_field() {
        let v = vault();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let blob = v.seal(a, PiiField::Email, "max@example.com");
        assert_eq!(
            v.open(a, PiiField::Email, "k1", &blob).unwrap(),
            "max@example.com"
        );
        assert!(matches!(
            v.open(b, PiiField::Email, "k1", &blob),
            Err(PiiError::Tampered { .. })
        ));
        assert!(matches!(
            v.open(a, PiiField::Phone, "k1", &blob),
            Err(PiiError::Tampered { .. })
        ));
        assert!(matches!(
            v.open(a, PiiField::Email, "k9", &blob),
            Err(PiiError::UnknownKey { .. })
        ));
        assert_ne!(
            blob,
            v.seal(a, PiiField::Email, "max@example.com"),
            "fresh nonce per value"
        );
    }

    #[test]
    fn lookup_hashes_match_across_spellings() {
        let v = vault();
        let h = |e: &str| v.lookup_hash(PiiField::Email, &normalize_email(e).unwrap());
        assert_eq!(
            h(" Max.Mustermann@Example.COM "),
            h("max.mustermann@example.com")
        );
        assert_ne!(h("max@example.com"), h("moritz@example.com"));
        assert_eq!(
            normalize_phone("089 / 123 456-7", Territory::DE).unwrap(),
            "+49891234567"
        );
        assert_eq!(
            normalize_phone("+49 89 1234567", Territory::AT).unwrap(),
            "+49891234567"
        );
        assert_eq!(
            normalize_phone("0049 89 1234567", Territory::CH).unwrap(),
            "+49891234567"
        );
        assert!(normalize_email("not-an-email").is_err());
        assert!(normalize_phone("call me", Territory::DE).is_err());
    }

    #[test]
    fn a_key_id_configured_twice_or_two_key_sources_are_refused() {
        let err = Vault::new(
            vec![("k1".into(), vec![1; 32]), ("k1".into(), vec![2; 32])],
            "k1",
            vec![9; 32],
        )
        .unwrap_err();
        assert!(err.to_string().contains("configured twice"), "{err}");
        let settings = PiiSettings {
            key_file: Some("/nonexistent/keys.toml".into()),
            keys: "k1:AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=".into(),
            lookup_key: String::new(),
        };
        let err = Vault::from_settings(&settings).unwrap_err();
        assert!(err.to_string().contains("not both"), "{err}");
    }

    #[test]
    fn the_development_key_file_is_private_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev-pii-keys.toml");
        let v = Vault::development(&path).unwrap();
        assert_eq!(v.active_key_id(), "dev-1");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        let again = Vault::development(&path).unwrap();
        let id = Uuid::now_v7();
        assert_eq!(
            again
                .open(
                    id,
                    PiiField::Email,
                    "dev-1",
                    &v.seal(id, PiiField::Email, "a@b.de")
                )
                .unwrap(),
            "a@b.de"
        );
    }

    #[test]
    fn masked_values_never_print_the_address() {
        let m = Masked("max.mustermann@example.com");
        assert_eq!(format!("{m} {m:?}"), "***@example.com ***@example.com");
        assert_eq!(Masked("Max Mustermann").to_string(), "***");
    }
}
