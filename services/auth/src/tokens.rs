//! The tokens auth hands out: signed access tokens (Ed25519 JWTs) and opaque refresh tokens.
//!
//! Refresh tokens are 256 random bits, stored only as their SHA-256. A rotation's successor
//! is *derived* — HMAC-SHA256 of the presented token under a server secret — so a duplicate
//! of the same refresh within the grace window is answered with the same successor without
//! the database ever holding a usable token.

use std::time::Duration;

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use ed25519_dalek::pkcs8::{DecodePrivateKey as _, EncodePrivateKey as _};
use hmac::{KeyInit as _, Mac as _};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use platform::{
    access_token::{AccessClaims, AccessTokenVerifier, PublicKey},
    config::Secret,
};
use sha2::{Digest as _, Sha256};
use uuid::Uuid;

/// One signing key: the private half for signing, the public half for the key set.
struct SigningKey {
    kid: String,
    encoding: EncodingKey,
    public: PublicKey,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("no signing key configured")]
    None,
    #[error("signing key {index} is not an Ed25519 PKCS#8 PEM key")]
    NotEd25519 { index: usize },
    #[error("cannot encode signing key {index}")]
    Encode { index: usize },
}

/// Signs access tokens with the newest key; publishes every key still accepted.
pub struct TokenIssuer {
    /// Newest first.
    keys: Vec<SigningKey>,
    issuer: String,
    audience: String,
    ttl: Duration,
}

impl std::fmt::Debug for TokenIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenIssuer")
            .field(
                "kids",
                &self.keys.iter().map(|k| &k.kid).collect::<Vec<_>>(),
            )
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl TokenIssuer {
    /// `pems`: Ed25519 private keys in PKCS#8 PEM, newest first. New tokens use the first;
    /// the others stay in the key set until they are removed, so rotation needs no downtime.
    pub fn from_pems(
        pems: &[Secret],
        issuer: &str,
        audience: &str,
        ttl: Duration,
    ) -> Result<Self, KeyError> {
        if pems.is_empty() {
            return Err(KeyError::None);
        }
        let keys = pems
            .iter()
            .enumerate()
            .map(|(index, pem)| {
                let key = ed25519_dalek::SigningKey::from_pkcs8_pem(pem.expose())
                    .map_err(|_| KeyError::NotEd25519 { index })?;
                let der = key.to_pkcs8_der().map_err(|_| KeyError::Encode { index })?;
                let x = URL_SAFE_NO_PAD.encode(key.verifying_key().as_bytes());
                let kid = thumbprint(&x);
                Ok(SigningKey {
                    encoding: EncodingKey::from_ed_der(der.as_bytes()),
                    public: PublicKey {
                        kid: kid.clone(),
                        x,
                    },
                    kid,
                })
            })
            .collect::<Result<_, KeyError>>()?;
        Ok(Self {
            keys,
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            ttl,
        })
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// An access token for `user_id` in session `session_id` carrying `roles`.
    pub fn issue(
        &self,
        user_id: Uuid,
        session_id: Uuid,
        roles: Vec<String>,
    ) -> Result<String, jsonwebtoken::errors::Error> {
        let newest = self.keys.first().ok_or_else(|| {
            jsonwebtoken::errors::Error::from(jsonwebtoken::errors::ErrorKind::InvalidKeyFormat)
        })?;
        let now = chrono::Utc::now().timestamp();
        let claims = AccessClaims {
            sub: user_id.to_string(),
            sid: session_id.to_string(),
            roles,
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            iat: now,
            exp: now + i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX / 2),
            jti: Uuid::now_v7().to_string(),
        };
        self.sign(newest, &claims)
    }

    /// A service token for the internal service `name`: subject `service:<name>`, no session,
    /// the service audience, the access-token lifetime.
    pub fn issue_service(&self, name: &str) -> Result<String, jsonwebtoken::errors::Error> {
        let newest = self.keys.first().ok_or_else(|| {
            jsonwebtoken::errors::Error::from(jsonwebtoken::errors::ErrorKind::InvalidKeyFormat)
        })?;
        let now = chrono::Utc::now().timestamp();
        let claims = AccessClaims {
            sub: format!("{}{name}", platform::access_token::SERVICE_SUBJECT_PREFIX),
            sid: String::new(),
            roles: Vec::new(),
            iss: self.issuer.clone(),
            aud: platform::access_token::service_audience(&self.audience),
            iat: now,
            exp: now + i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX / 2),
            jti: Uuid::now_v7().to_string(),
        };
        self.sign(newest, &claims)
    }

    fn sign(
        &self,
        key: &SigningKey,
        claims: &AccessClaims,
    ) -> Result<String, jsonwebtoken::errors::Error> {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(key.kid.clone());
        jsonwebtoken::encode(&header, claims, &key.encoding)
    }

    /// Every public key still accepted, newest first.
    pub fn public_keys(&self) -> Vec<PublicKey> {
        self.keys.iter().map(|k| k.public.clone()).collect()
    }

    /// A verifier for the tokens this issuer signs, user and service tokens alike (auth
    /// checks its own callers with it).
    pub fn verifier(&self) -> Result<AccessTokenVerifier, platform::access_token::TokenError> {
        AccessTokenVerifier::new(&self.public_keys(), &self.issuer, &self.audience, true)
    }
}

/// RFC 7638 JWK thumbprint of an Ed25519 key: a `kid` that needs no bookkeeping.
fn thumbprint(x: &str) -> String {
    let canonical = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#);
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
}

/// Makes, hashes and derives refresh tokens.
#[derive(Clone)]
pub struct RefreshTokens {
    /// Keyed once with the server secret; cloned per derivation.
    successor_mac: hmac::Hmac<Sha256>,
}

impl std::fmt::Debug for RefreshTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RefreshTokens([redacted])")
    }
}

/// SHA-256 of a refresh token: what the database stores.
pub type TokenHash = [u8; 32];

impl RefreshTokens {
    /// The secret must hold at least 32 bytes of randomness.
    pub const MIN_SECRET_LEN: usize = 32;

    pub fn new(secret: &Secret) -> Result<Self, hmac::digest::InvalidLength> {
        Ok(Self {
            successor_mac: hmac::Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes())?,
        })
    }

    /// A fresh token: 256 random bits, base64url.
    pub fn generate(&self) -> String {
        let bytes: [u8; 32] = rand::random();
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// The successor of `presented`: the same input always gives the same token.
    pub fn successor(&self, presented: &str) -> String {
        let mut mac = self.successor_mac.clone();
        mac.update(b"refresh-successor:");
        mac.update(presented.as_bytes());
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    }

    pub fn hash(token: &str) -> TokenHash {
        Sha256::digest(token.as_bytes()).into()
    }

    /// Whether `token` can be one of ours (43 base64url characters): anything else is
    /// refused without a database round trip.
    pub fn well_formed(token: &str) -> bool {
        token.len() == 43
            && token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use platform::access_token::TokenError;

    /// A fixed test key (RFC 8032 test vector 1's secret key), PKCS#8 PEM.
    pub(crate) fn test_pem() -> Secret {
        let seed = [
            0x9d, 0x61, 0xb1, 0x9d, 0xef, 0xfd, 0x5a, 0x60, 0xba, 0x84, 0x4a, 0xf4, 0x92, 0xec,
            0x2c, 0xc4, 0x44, 0x49, 0xc5, 0x69, 0x7b, 0x32, 0x69, 0x19, 0x70, 0x3b, 0xac, 0x03,
            0x1c, 0xae, 0x7f, 0x60,
        ];
        let key = ed25519_dalek::SigningKey::from_bytes(&seed);
        Secret::new(
            ed25519_dalek::pkcs8::EncodePrivateKey::to_pkcs8_pem(
                &key,
                ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF,
            )
            .unwrap()
            .to_string(),
        )
    }

    fn issuer() -> TokenIssuer {
        TokenIssuer::from_pems(
            &[test_pem()],
            "svcset-auth",
            "svcset",
            Duration::from_secs(900),
        )
        .unwrap()
    }

    #[test]
    fn issued_tokens_verify_with_the_published_keys() {
        let issuer = issuer();
        let (user, session) = (Uuid::now_v7(), Uuid::now_v7());
        let token = issuer
            .issue(user, session, vec!["admin".to_owned()])
            .unwrap();
        let claims = issuer.verifier().unwrap().verify(&token).unwrap();
        assert_eq!(claims.sub, user.to_string());
        assert_eq!(claims.sid, session.to_string());
        assert!(claims.has_role("admin"));
        assert_eq!(claims.exp - claims.iat, 900);
    }

    #[test]
    fn service_tokens_carry_the_service_audience_and_only_verify_where_accepted() {
        let issuer = issuer();
        let token = issuer.issue_service("notes").unwrap();
        let claims = issuer.verifier().unwrap().verify(&token).unwrap();
        assert_eq!(claims.service_name(), Some("notes"));
        assert_eq!(claims.aud, "svcset/internal");
        assert!(claims.sid.is_empty());
        // The gateway's edge accepts user tokens only.
        let edge = AccessTokenVerifier::new(&issuer.public_keys(), "svcset-auth", "svcset", false)
            .unwrap();
        assert_eq!(edge.verify(&token), Err(TokenError::Invalid));
        let user_token = issuer
            .issue(Uuid::now_v7(), Uuid::now_v7(), vec![])
            .unwrap();
        assert!(edge.verify(&user_token).is_ok());
    }

    #[test]
    fn forged_tokens_are_refused() {
        let issuer = issuer();
        let verifier = issuer.verifier().unwrap();
        let token = issuer
            .issue(Uuid::now_v7(), Uuid::now_v7(), vec![])
            .unwrap();
        let parts: Vec<&str> = token.split('.').collect();

        // Tampered payload: roles added after signing.
        let mut claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        claims["roles"] = serde_json::json!(["admin"]);
        let tampered = format!(
            "{}.{}.{}",
            parts[0],
            URL_SAFE_NO_PAD.encode(claims.to_string()),
            parts[2]
        );
        assert_eq!(verifier.verify(&tampered), Err(TokenError::Invalid));

        // alg: none, no signature.
        let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
        let none = format!("{header}.{}.", parts[1]);
        assert!(verifier.verify(&none).is_err());

        // HS256 "signed" with the public key as the secret.
        let public = issuer.public_keys()[0].clone();
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(public.kid.clone());
        let hmac_token = jsonwebtoken::encode(
            &header,
            &claims,
            &EncodingKey::from_secret(public.x.as_bytes()),
        )
        .unwrap();
        assert_eq!(verifier.verify(&hmac_token), Err(TokenError::Invalid));

        // Another audience.
        let other = TokenIssuer::from_pems(
            &[test_pem()],
            "svcset-auth",
            "elsewhere",
            Duration::from_secs(60),
        )
        .unwrap()
        .issue(Uuid::now_v7(), Uuid::now_v7(), vec![])
        .unwrap();
        assert_eq!(verifier.verify(&other), Err(TokenError::Invalid));

        // Expired beyond the leeway.
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(public.kid);
        let mut old = claims.clone();
        old["exp"] = serde_json::json!(chrono::Utc::now().timestamp() - 3600);
        old["roles"] = serde_json::json!([]);
        let expired = jsonwebtoken::encode(&header, &old, &issuer.keys[0].encoding).unwrap();
        assert_eq!(verifier.verify(&expired), Err(TokenError::Expired));
    }

    #[test]
    fn refresh_successors_are_stable_and_secret_bound() {
        let tokens = RefreshTokens::new(&Secret::new("k".repeat(32))).unwrap();
        let first = tokens.generate();
        assert!(RefreshTokens::well_formed(&first));
        let next = tokens.successor(&first);
        assert!(RefreshTokens::well_formed(&next));
        assert_eq!(next, tokens.successor(&first));
        assert_ne!(next, first);
        let other = RefreshTokens::new(&Secret::new("j".repeat(32))).unwrap();
        assert_ne!(other.successor(&first), next);
        assert!(!RefreshTokens::well_formed("short"));
        assert!(!RefreshTokens::well_formed(&"=".repeat(43)));
    }
}
