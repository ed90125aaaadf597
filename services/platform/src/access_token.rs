//! Access tokens as every verifier sees them: the claims, and local verification against
//! the published key set. Auth signs; the gateway and every service verify with this, no
//! call per request.
//!
//! Only EdDSA is accepted, whatever the token's header says: `alg: none`, an HMAC token
//! "signed" with the public key, or any other algorithm never reaches a key.

use std::collections::HashMap;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

/// The issuer auth signs with unless configured otherwise (`iss`).
pub const DEFAULT_ISSUER: &str = "svcset-auth";
/// The audience of user access tokens unless configured otherwise (`aud`).
pub const DEFAULT_AUDIENCE: &str = "svcset";
/// The longest access-token lifetime auth may be configured with; verifiers forget a role
/// change once no token issued before it can still be unexpired.
pub const MAX_LIFETIME: std::time::Duration = std::time::Duration::from_secs(3600);
/// Prefix of a service token's subject: `service:<name>`.
pub const SERVICE_SUBJECT_PREFIX: &str = "service:";

/// The audience of service tokens: derived from the user audience, so the gateway, which
/// accepts only the user audience, refuses a service token at the edge.
pub fn service_audience(audience: &str) -> String {
    format!("{audience}/internal")
}

/// The claims of an access token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessClaims {
    /// The user id (UUID), or `service:<name>` for a service token.
    pub sub: String,
    /// Session id (UUID); absent for service tokens.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sid: String,
    #[serde(default)]
    pub roles: Vec<String>,
    pub iss: String,
    pub aud: String,
    pub iat: i64,
    pub exp: i64,
    /// Token id (UUIDv7).
    pub jti: String,
}

impl AccessClaims {
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }

    /// The service name of a service token; `None` for a user's token.
    pub fn service_name(&self) -> Option<&str> {
        self.sub.strip_prefix(SERVICE_SUBJECT_PREFIX)
    }
}

/// A public key as published in the JWKS (`kty: OKP`, `crv: Ed25519`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    pub kid: String,
    /// The raw 32-byte public key, base64url without padding.
    pub x: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token")]
    Malformed,
    #[error("unknown signing key")]
    UnknownKey,
    #[error("expired token")]
    Expired,
    #[error("invalid token")]
    Invalid,
    #[error("revoked token")]
    Revoked,
}

/// Verifies access tokens against a set of public keys.
#[derive(Clone)]
pub struct AccessTokenVerifier {
    keys: HashMap<String, DecodingKey>,
    validation: Validation,
    audience: String,
    /// Set where service tokens are accepted (services, not the gateway's edge).
    service_audience: Option<String>,
}

impl std::fmt::Debug for AccessTokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessTokenVerifier")
            .field("kids", &self.keys.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl AccessTokenVerifier {
    /// Clock skew tolerated between signer and verifier.
    pub const LEEWAY_SECONDS: u64 = 30;

    /// A verifier of user tokens for `audience`, and of service tokens too when
    /// `accept_service_tokens` (their audience is [`service_audience`] of it). A token's
    /// audience must match its kind: a user token with the service audience, or the reverse,
    /// is refused.
    pub fn new(
        keys: &[PublicKey],
        issuer: &str,
        audience: &str,
        accept_service_tokens: bool,
    ) -> Result<Self, TokenError> {
        let keys = keys
            .iter()
            .map(|key| {
                DecodingKey::from_ed_components(&key.x)
                    .map(|decoding| (key.kid.clone(), decoding))
                    .map_err(|_| TokenError::Malformed)
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            keys,
            ..Self::without_keys(issuer, audience, accept_service_tokens)
        })
    }

    /// A verifier that knows no key yet: every token names an unknown key.
    pub fn without_keys(issuer: &str, audience: &str, accept_service_tokens: bool) -> Self {
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.algorithms = vec![Algorithm::EdDSA];
        validation.leeway = Self::LEEWAY_SECONDS;
        validation.set_issuer(&[issuer]);
        let service_audience = accept_service_tokens.then(|| service_audience(audience));
        let mut audiences = vec![audience.to_owned()];
        audiences.extend(service_audience.clone());
        validation.set_audience(&audiences);
        validation.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub"]);
        Self {
            keys: HashMap::new(),
            validation,
            audience: audience.to_owned(),
            service_audience,
        }
    }

    /// Whether a token signed with `kid` can be checked here.
    pub fn knows_key(&self, kid: &str) -> bool {
        self.keys.contains_key(kid)
    }

    pub fn verify(&self, token: &str) -> Result<AccessClaims, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        if header.alg != Algorithm::EdDSA {
            return Err(TokenError::Invalid);
        }
        let kid = header.kid.ok_or(TokenError::UnknownKey)?;
        let key = self.keys.get(&kid).ok_or(TokenError::UnknownKey)?;
        let claims = jsonwebtoken::decode::<AccessClaims>(token, key, &self.validation)
            .map(|data| data.claims)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
                _ => TokenError::Invalid,
            })?;
        let audience_fits = match claims.service_name() {
            Some(name) => {
                !name.is_empty()
                    && claims.sid.is_empty()
                    && self.service_audience.as_deref() == Some(claims.aud.as_str())
            }
            None => claims.aud == self.audience,
        };
        if audience_fits {
            Ok(claims)
        } else {
            Err(TokenError::Invalid)
        }
    }
}

/// The bearer token of `authorization: Bearer <token>` in gRPC metadata, if any.
pub fn bearer(metadata: &tonic::metadata::MetadataMap) -> Option<&str> {
    bearer_token(metadata.get("authorization")?.to_str().ok()?)
}

/// The bearer token of an HTTP `Authorization: Bearer <token>` header, if any.
pub fn bearer_header(headers: &http::HeaderMap) -> Option<&str> {
    bearer_token(headers.get(http::header::AUTHORIZATION)?.to_str().ok()?)
}

fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty()).then(|| token.trim())
}
