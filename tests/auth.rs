//! Authentication as deployed: RS256 tokens from a PEM public key or a JWKS file (Keycloak),
//! and the development login's HttpOnly session cookie (off unless enabled).

mod common;

use std::process::Command;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use common::TestApp;
use freshplan::auth::jwt::Authenticator;
use freshplan::auth::Role;
use freshplan::config::JwtSettings;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

/// An RSA key pair made with the openssl CLI: (private PEM, public PEM, modulus hex).
fn rsa_keys(dir: &std::path::Path) -> (Vec<u8>, std::path::PathBuf, String) {
    let private = dir.join("private.pem");
    let public = dir.join("public.pem");
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl is installed");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    run(&["genrsa", "-out", private.to_str().unwrap(), "2048"]);
    run(&[
        "rsa",
        "-in",
        private.to_str().unwrap(),
        "-pubout",
        "-out",
        public.to_str().unwrap(),
    ]);
    let modulus = String::from_utf8(run(&[
        "rsa",
        "-in",
        private.to_str().unwrap(),
        "-noout",
        "-modulus",
    ]))
    .unwrap();
    let modulus = modulus.trim().trim_start_matches("Modulus=").to_string();
    (std::fs::read(&private).unwrap(), public, modulus)
}

const ISSUER: &str = "https://keycloak.example/realms/freshplan";

fn keycloak_token(private_pem: &[u8], kid: Option<&str>) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = kid.map(str::to_string);
    let claims = json!({
        "sub": "k-user-1", "name": "Keycloak User", "territory": "CH",
        "exp": jsonwebtoken::get_current_timestamp() + 300, "iss": ISSUER,
        "realm_access": {"roles": ["offline_access", "Sales"]}
    });
    jsonwebtoken::encode(
        &header,
        &claims,
        &EncodingKey::from_rsa_pem(private_pem).unwrap(),
    )
    .unwrap()
}

#[test]
fn rs256_tokens_verify_with_a_pem_public_key_or_a_jwks_file() {
    let dir = tempfile::tempdir().unwrap();
    let (private, public, modulus_hex) = rsa_keys(dir.path());

    let pem = Authenticator::from_settings(
        &JwtSettings {
            public_key_file: Some(public),
            issuer: Some(ISSUER.into()),
            ..Default::default()
        },
        false,
    )
    .unwrap();
    let p = pem.verify(&keycloak_token(&private, None)).unwrap();
    assert_eq!(
        (p.user_id.as_str(), p.role, p.territory.code()),
        ("k-user-1", Role::Sales, "CH")
    );

    let modulus: Vec<u8> = (0..modulus_hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&modulus_hex[i..i + 2], 16).unwrap())
        .collect();
    let jwks = json!({"keys": [{"kty": "RSA", "kid": "kc-1", "use": "sig", "alg": "RS256",
        "n": URL_SAFE_NO_PAD.encode(&modulus), "e": "AQAB"}]});
    let jwks_file = dir.path().join("jwks.json");
    std::fs::write(&jwks_file, jwks.to_string()).unwrap();
    let by_jwks = Authenticator::from_settings(
        &JwtSettings {
            jwks_file: Some(jwks_file),
            issuer: Some(ISSUER.into()),
            ..Default::default()
        },
        false,
    )
    .unwrap();
    assert_eq!(
        by_jwks
            .verify(&keycloak_token(&private, Some("kc-1")))
            .unwrap()
            .user_id,
        "k-user-1"
    );

    // A token signed by another key, or an HS256 token against an RS256-only verifier, fails.
    let other = tempfile::tempdir().unwrap();
    let (other_private, _, _) = rsa_keys(other.path());
    assert!(by_jwks
        .verify(&keycloak_token(&other_private, Some("kc-1")))
        .is_err());
    let hs = Authenticator::from_settings(
        &JwtSettings {
            secret: "s".repeat(32),
            ..Default::default()
        },
        false,
    )
    .unwrap();
    let p = freshplan::auth::Principal::system();
    let hs_token = hs
        .mint(
            &freshplan::auth::Principal {
                role: Role::Admin,
                ..p
            },
            60,
        )
        .unwrap();
    assert!(by_jwks.verify(&hs_token).is_err(), "no algorithm confusion");
}

#[tokio::test]
async fn the_development_login_sets_an_httponly_session_cookie_the_api_accepts() {
    let app = TestApp::spawn_with(&[("FRESHPLAN_AUTH_DEV_LOGIN_ENABLED", "true")]).await;
    let page = app
        .client
        .get(format!("{}/login", app.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("sales-de-1") && page.contains("viewer-de"));
    let r = app
        .client
        .post(format!("{}/api/dev/login", app.url))
        .json(&json!({"userId": "manager-at"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.starts_with("freshplan_session="),
        "{cookie}"
    );
    let session = cookie.split(';').next().unwrap().to_string();
    app.create_lead("sales-at-1", TestApp::lead_body("AT via cookie"))
        .await;
    let page: serde_json::Value = app
        .client
        .get(format!("{}/api/leads", app.url))
        .header("Cookie", &session)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["total"], 1, "the cookie acts as manager-at");
    let r = app
        .client
        .post(format!("{}/api/dev/login", app.url))
        .json(&json!({"userId": "mallory"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let forged = app
        .client
        .get(format!("{}/api/leads", app.url))
        .header("Cookie", "freshplan_session=forged")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 401);
}

#[tokio::test]
async fn the_development_login_is_off_by_default() {
    let app = TestApp::spawn().await;
    assert_eq!(
        app.client
            .get(format!("{}/login", app.url))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    let r = app
        .client
        .post(format!("{}/api/dev/login", app.url))
        .json(&json!({"userId": "admin"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

async fn login_cookie(app: &TestApp) -> String {
    let r = app
        .client
        .post(format!("{}/api/dev/login", app.url))
        .json(&json!({"userId": "sales-de-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    r.headers()["set-cookie"].to_str().unwrap().to_string()
}

#[tokio::test]
async fn the_session_cookie_is_secure_unless_configured_off_as_the_demo_does() {
    let default = TestApp::spawn_with(&[("FRESHPLAN_AUTH_DEV_LOGIN_ENABLED", "true")]).await;
    let cookie = login_cookie(&default).await;
    assert!(cookie.ends_with("; Secure"), "{cookie}");
    let off = TestApp::spawn_with(&[
        ("FRESHPLAN_AUTH_DEV_LOGIN_ENABLED", "true"),
        ("FRESHPLAN_AUTH_COOKIE_SECURE", "false"),
    ])
    .await;
    let cookie = login_cookie(&off).await;
    assert!(!cookie.contains("Secure"), "{cookie}");
    // `auto` is off only for `serve --demo`, which serves plain HTTP on loopback.
    let mut demo = default.db.settings(&[]);
    assert!(demo.secure_cookies());
    demo.demo = true;
    assert!(!demo.secure_cookies());
    demo.cookie_secure = Some(true);
    assert!(demo.secure_cookies());
}
