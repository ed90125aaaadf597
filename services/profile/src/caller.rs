//! Who is calling: the one place the service learns identity. Tokens are verified locally
//! with auth's published key set (fetched from auth, refetched on an unknown `kid`).
//!
//! Calls to auth on a request's behalf carry the caller's own token (auth lets a user read
//! themself and an admin read anyone).

use std::{sync::Arc, time::Duration};

use platform::{
    access_token::{AccessTokenVerifier, PublicKey, TokenError},
    grpc::TracedChannel,
};
use proto::auth::v1::{self as auth_pb, auth_service_client::AuthServiceClient};
use tokio::{sync::Mutex, time::Instant};
use tonic::{Request, Status, metadata::MetadataMap};
use uuid::Uuid;

/// The role that administers the set.
pub const ADMIN_ROLE: &str = "admin";

/// Token issuer and audience auth uses by default.
const ISSUER: &str = "svcset-auth";
const AUDIENCE: &str = "svcset";
/// An unknown `kid` refetches the key set at most this often.
const REFETCH_INTERVAL: Duration = Duration::from_secs(1);

/// A verified caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    User {
        user_id: Uuid,
        session_id: Uuid,
        roles: Vec<String>,
    },
    Service {
        name: String,
    },
}

impl Caller {
    pub fn is_admin(&self) -> bool {
        matches!(self, Self::User { roles, .. } if roles.iter().any(|r| r == ADMIN_ROLE))
    }

    pub fn user_id(&self) -> Option<Uuid> {
        match self {
            Self::User { user_id, .. } => Some(*user_id),
            Self::Service { .. } => None,
        }
    }
}

/// Local token verification against auth's key set.
#[derive(Debug, Clone)]
pub struct Identity {
    channel: TracedChannel,
    keys: Arc<Mutex<Keys>>,
}

#[derive(Debug, Default)]
struct Keys {
    verifier: Option<Arc<AccessTokenVerifier>>,
    fetched_at: Option<Instant>,
}

impl Identity {
    pub fn new(channel: TracedChannel) -> Self {
        Self {
            channel,
            keys: Arc::new(Mutex::new(Keys::default())),
        }
    }

    /// The caller named by the request's bearer token: UNAUTHENTICATED when it is missing,
    /// invalid or expired; UNAVAILABLE when auth's key set cannot be had.
    pub async fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, Status> {
        let token = platform::access_token::bearer(metadata)
            .ok_or_else(|| Status::unauthenticated("a bearer access token is required"))?;
        let verifier = self.verifier(false).await?;
        let claims = match verifier.verify(token) {
            Err(TokenError::UnknownKey) => self.verifier(true).await?.verify(token),
            verified => verified,
        }
        .map_err(|_| Status::unauthenticated("the access token is invalid or expired"))?;
        if let Some(name) = claims.sub.strip_prefix("service:") {
            return Ok(Caller::Service {
                name: name.to_owned(),
            });
        }
        match (Uuid::parse_str(&claims.sub), Uuid::parse_str(&claims.sid)) {
            (Ok(user_id), Ok(session_id)) => Ok(Caller::User {
                user_id,
                session_id,
                roles: claims.roles,
            }),
            _ => Err(Status::unauthenticated("the access token is invalid")),
        }
    }

    /// The channel to auth.
    pub fn auth_channel(&self) -> TracedChannel {
        self.channel.clone()
    }

    /// Puts the credentials of the request being served (`incoming`) on a call to auth.
    pub fn authorize<T>(&self, request: &mut Request<T>, incoming: &MetadataMap) {
        if let Some(value) = incoming.get("authorization") {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
    }

    async fn verifier(&self, refetch: bool) -> Result<Arc<AccessTokenVerifier>, Status> {
        let mut keys = self.keys.lock().await;
        let recent = keys
            .fetched_at
            .is_some_and(|at| at.elapsed() < REFETCH_INTERVAL);
        match &keys.verifier {
            Some(verifier) if !refetch || recent => return Ok(verifier.clone()),
            _ => {}
        }
        let mut client = AuthServiceClient::new(self.channel.clone());
        let jwks = client
            .get_jwks(auth_pb::GetJwksRequest {})
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "cannot fetch auth's key set");
                Status::unavailable("cannot verify tokens right now, retry later")
            })?
            .into_inner();
        let public: Vec<PublicKey> = jwks
            .keys
            .into_iter()
            .map(|k| PublicKey { kid: k.kid, x: k.x })
            .collect();
        let verifier = Arc::new(AccessTokenVerifier::new(&public, ISSUER, AUDIENCE).map_err(
            |e| {
                tracing::error!(error = %e, "auth published a key that does not parse");
                Status::unavailable("cannot verify tokens right now, retry later")
            },
        )?);
        keys.verifier = Some(verifier.clone());
        keys.fetched_at = Some(Instant::now());
        Ok(verifier)
    }
}
