//! The signed unsubscribe token carried by the link in every follow-up mail.
//!
//! Format: `base64url(payload) "." base64url(hmac)`, both without padding, so the token needs no
//! escaping in a URL query or a form field. The payload is 41 bytes:
//!
//! | bytes | content                                   |
//! |-------|-------------------------------------------|
//! | 1     | version (`1`)                             |
//! | 16    | token id (UUID; lets the link be used once) |
//! | 16    | lead id (UUID)                            |
//! | 8     | expiry, Unix seconds, big-endian `i64`    |
//!
//! The MAC is HMAC-SHA256 over a fixed context label followed by the raw payload bytes; the label
//! keeps a MAC made with the same key for another purpose from ever being accepted here. The MAC is
//! compared in constant time (`verify_slice`), and only after it matches is the payload trusted —
//! version and expiry included. Tokens longer than [`MAX_TOKEN_LEN`] are refused before decoding.
//!
//! The expiry is kept to the second: `verify` returns it truncated to whole seconds.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use uuid::Uuid;

type HmacSha256 = Hmac<Sha256>;

/// Longest token accepted; a genuine one is 99 characters.
pub const MAX_TOKEN_LEN: usize = 512;

const VERSION: u8 = 1;
const PAYLOAD_LEN: usize = 1 + 16 + 16 + 8;
const MAC_LEN: usize = 32;
/// Domain separation: what this MAC is for.
const CONTEXT: &[u8] = b"freshplan/unsubscribe/v1\0";

/// What an unsubscribe token says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnsubscribeClaims {
    /// Identifies this link, so it can be recognised as already used.
    pub token_id: Uuid,
    pub lead_id: Uuid,
    /// After this instant the token is refused as [`TokenError::Expired`].
    pub expires_at: DateTime<Utc>,
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("the unsubscribe token is malformed")]
    Malformed,
    #[error("the unsubscribe token's signature does not match")]
    BadSignature,
    #[error("the unsubscribe token has expired")]
    Expired,
}

/// Signs and verifies unsubscribe tokens with a 32-byte secret key.
#[derive(Clone)]
pub struct TokenSigner {
    key: [u8; 32],
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSigner")
            .field("key", &"<redacted>")
            .finish()
    }
}

impl TokenSigner {
    /// A signer with the given secret key.
    pub fn new(key: [u8; 32]) -> Self {
        Self { key }
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC takes keys of any length; a 32-byte key cannot be refused.
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&self.key)
            .expect("HMAC-SHA256 accepts a 32-byte key");
        mac.update(CONTEXT);
        mac
    }

    /// The URL-safe token for `c`.
    pub fn sign(&self, c: &UnsubscribeClaims) -> String {
        let mut payload = [0u8; PAYLOAD_LEN];
        payload[0] = VERSION;
        payload[1..17].copy_from_slice(c.token_id.as_bytes());
        payload[17..33].copy_from_slice(c.lead_id.as_bytes());
        payload[33..41].copy_from_slice(&c.expires_at.timestamp().to_be_bytes());
        let mut mac = self.mac();
        mac.update(&payload);
        let tag = mac.finalize().into_bytes();
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(payload),
            URL_SAFE_NO_PAD.encode(tag)
        )
    }

    /// Checks the signature, then the expiry against `now`, and returns the claims.
    pub fn verify(&self, token: &str, now: DateTime<Utc>) -> Result<UnsubscribeClaims, TokenError> {
        if token.is_empty() || token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        let (payload_b64, tag_b64) = token.split_once('.').ok_or(TokenError::Malformed)?;
        let payload = URL_SAFE_NO_PAD
            .decode(payload_b64)
            .map_err(|_| TokenError::Malformed)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag_b64)
            .map_err(|_| TokenError::Malformed)?;
        if payload.len() != PAYLOAD_LEN || tag.len() != MAC_LEN {
            return Err(TokenError::Malformed);
        }
        let mut mac = self.mac();
        mac.update(&payload);
        mac.verify_slice(&tag)
            .map_err(|_| TokenError::BadSignature)?;

        // Signed by us from here on; a different version would be a key shared with a newer format.
        if payload[0] != VERSION {
            return Err(TokenError::Malformed);
        }
        let uuid_at = |from: usize| {
            let mut b = [0u8; 16];
            b.copy_from_slice(&payload[from..from + 16]);
            Uuid::from_bytes(b)
        };
        let mut secs = [0u8; 8];
        secs.copy_from_slice(&payload[33..41]);
        let expires_at =
            DateTime::from_timestamp(i64::from_be_bytes(secs), 0).ok_or(TokenError::Malformed)?;
        if now >= expires_at {
            return Err(TokenError::Expired);
        }
        Ok(UnsubscribeClaims {
            token_id: uuid_at(1),
            lead_id: uuid_at(17),
            expires_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration, TimeZone};

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2025, 3, 14, 9, 0, 0)
            .single()
            .expect("valid test time")
    }

    fn claims() -> UnsubscribeClaims {
        UnsubscribeClaims {
            token_id: Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef),
            lead_id: Uuid::from_u128(0xfedc_ba98_7654_3210_fedc_ba98_7654_3210),
            expires_at: now() + Duration::days(90),
        }
    }

    fn signer() -> TokenSigner {
        TokenSigner::new([7u8; 32])
    }

    #[test]
    fn a_signed_token_verifies_to_the_same_claims() {
        let token = signer().sign(&claims());
        assert_eq!(signer().verify(&token, now()), Ok(claims()));
    }

    #[test]
    fn a_token_is_url_safe_and_well_under_the_length_limit() {
        let token = signer().sign(&claims());
        assert!(token
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')));
        assert_eq!(token.matches('.').count(), 1);
        assert!(token.len() <= 128, "{}", token.len());
    }

    #[test]
    fn the_expiry_is_kept_to_the_second() {
        let mut c = claims();
        c.expires_at += Duration::milliseconds(750);
        let got = signer()
            .verify(&signer().sign(&c), now())
            .expect("valid token");
        assert_eq!(got.expires_at, claims().expires_at);
    }

    #[test]
    fn any_single_changed_character_is_refused_as_bad_signature_or_malformed() {
        let token = signer().sign(&claims());
        for (i, original) in token.char_indices() {
            for replacement in ['A', 'B', 'z', '0', '-', '_', '.'] {
                if replacement == original {
                    continue;
                }
                let mut tampered = token.clone();
                tampered.replace_range(i..i + 1, &replacement.to_string());
                let err = signer()
                    .verify(&tampered, now())
                    .expect_err("a tampered token must not verify");
                assert!(
                    matches!(err, TokenError::BadSignature | TokenError::Malformed),
                    "position {i}: {err:?}"
                );
            }
        }
    }

    #[test]
    fn a_token_signed_with_another_key_has_a_bad_signature() {
        let token = TokenSigner::new([8u8; 32]).sign(&claims());
        assert_eq!(
            signer().verify(&token, now()),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn an_expired_token_is_refused_from_its_expiry_on() {
        let token = signer().sign(&claims());
        let expiry = claims().expires_at;
        assert!(signer()
            .verify(&token, expiry - Duration::seconds(1))
            .is_ok());
        assert_eq!(signer().verify(&token, expiry), Err(TokenError::Expired));
        assert_eq!(
            signer().verify(&token, expiry + Duration::days(1)),
            Err(TokenError::Expired)
        );
    }

    #[test]
    fn an_expired_token_with_a_bad_signature_reports_the_signature() {
        let token = TokenSigner::new([8u8; 32]).sign(&claims());
        assert_eq!(
            signer().verify(&token, claims().expires_at + Duration::days(1)),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn garbage_empty_and_oversized_tokens_are_malformed() {
        let valid = signer().sign(&claims());
        let (payload, tag) = valid.split_once('.').expect("two parts");
        let huge = "A".repeat(100_000);
        let padded = format!("{valid}{}", "A".repeat(MAX_TOKEN_LEN));
        let cases = [
            "",
            ".",
            "..",
            "abc",
            "not a token",
            "äöü.ß",
            "%%%.%%%",
            payload,
            &format!("{payload}."),
            &format!(".{tag}"),
            &format!("{payload}.{tag}.{tag}"),
            &format!("{payload}=.{tag}"),
            &format!("{payload}AAAA.{tag}"),
            &format!("{payload}.{tag}AAAA"),
            &huge,
            &padded,
        ];
        for case in cases {
            assert_eq!(
                signer().verify(case, now()),
                Err(TokenError::Malformed),
                "{:?}",
                &case[..case.len().min(40)]
            );
        }
    }

    #[test]
    fn a_signed_payload_of_another_version_is_malformed() {
        let mut payload = [0u8; PAYLOAD_LEN];
        payload[0] = 2;
        payload[33..41].copy_from_slice(&claims().expires_at.timestamp().to_be_bytes());
        let mut mac = signer().mac();
        mac.update(&payload);
        let token = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(payload),
            URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
        );
        assert_eq!(signer().verify(&token, now()), Err(TokenError::Malformed));
    }

    #[test]
    fn error_messages_name_the_problem_without_the_token() {
        for e in [
            TokenError::Malformed,
            TokenError::BadSignature,
            TokenError::Expired,
        ] {
            let msg = e.to_string();
            assert!(msg.starts_with("the unsubscribe token"), "{msg}");
        }
        assert!(!format!("{:?}", signer()).contains("7, 7"));
    }
}
