//! Who is calling, for every binary that is not auth: access tokens verified locally, with
//! auth's key set and auth's revocations held in memory, so a request costs no call to auth.
//!
//! One background task per process follows auth's change stream (`WatchChanges`): it
//! fetches the key set at start and again on `KeySetChanged`, remembers revoked sessions
//! until their tokens have expired, and remembers each user's roles after a change, so a
//! token issued before the change with other roles is refused — the client refreshes and
//! gets the new roles. Every event is also passed on to [`Identity::subscribe`]rs (caches
//! of auth-owned data). Calls to auth carry a service token, obtained with this service's
//! client secret and renewed before it expires.
//!
//! When the stream is down, the last known revocations keep applying and verification
//! goes on (auth being down must not take every signed-in request down with it); the gap
//! is bounded by the access-token lifetime, shown by `identity_change_stream_connected`,
//! and closed on reconnect, which resumes after the last sequence seen.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::Duration,
};

use proto::auth::v1::{
    self as pb, auth_service_client::AuthServiceClient, watch_changes_response::Event,
};
use tokio::{
    sync::{Mutex, broadcast, watch},
    time::Instant,
};
use tonic::{Request, Status, metadata::MetadataValue};
use uuid::Uuid;

use crate::{
    access_token::{self, AccessClaims, AccessTokenVerifier, PublicKey, TokenError},
    config::{Env, Secret},
    grpc::TracedChannel,
};

/// Settings read with the binary's prefix (`GATEWAY_`, `PROFILE_`, `NOTES_`).
#[derive(Debug, Clone)]
pub struct IdentityConfig {
    /// `<P>_AUTH_URL`, default `http://127.0.0.1:50051`.
    pub auth_url: String,
    /// `<P>_AUTH_CLIENT_SECRET` or `<P>_AUTH_CLIENT_SECRET_FILE` (required): this service's
    /// secret for `IssueServiceToken`; auth holds its SHA-256 in `AUTH_SERVICE_CLIENTS`.
    pub client_secret: Secret,
    /// `<P>_TOKEN_ISSUER`, default `svcset-auth`: must match auth's `AUTH_TOKEN_ISSUER`.
    pub issuer: String,
    /// `<P>_TOKEN_AUDIENCE`, default `svcset`: must match auth's `AUTH_TOKEN_AUDIENCE`.
    pub audience: String,
}

impl IdentityConfig {
    pub const DEFAULT_AUTH_URL: &str = "http://127.0.0.1:50051";

    pub fn from_env(env: &Env) -> Self {
        Self {
            auth_url: env.or("AUTH_URL", Self::DEFAULT_AUTH_URL.to_owned()),
            client_secret: env.secret("AUTH_CLIENT_SECRET"),
            issuer: env.or("TOKEN_ISSUER", access_token::DEFAULT_ISSUER.to_owned()),
            audience: env.or("TOKEN_AUDIENCE", access_token::DEFAULT_AUDIENCE.to_owned()),
        }
    }
}

/// A verified caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A signed-in person; `roles` as the token carries them (current within about a
    /// second: older tokens with other roles are refused).
    User {
        user_id: Uuid,
        session_id: Uuid,
        roles: Vec<String>,
    },
    /// An internal service with a service token.
    Service { name: String },
}

/// The role that administers the set.
pub const ADMIN_ROLE: &str = "admin";

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

    fn from_claims(claims: AccessClaims) -> Result<Self, TokenError> {
        if let Some(name) = claims.service_name() {
            return Ok(Self::Service {
                name: name.to_owned(),
            });
        }
        match (Uuid::parse_str(&claims.sub), Uuid::parse_str(&claims.sid)) {
            (Ok(user_id), Ok(session_id)) => Ok(Self::User {
                user_id,
                session_id,
                roles: claims.roles,
            }),
            _ => Err(TokenError::Invalid),
        }
    }
}

/// Local verification with auth's keys and revocations; service tokens for calls to auth.
#[derive(Debug, Clone)]
pub struct Identity {
    shared: Arc<Shared>,
    /// Stops the follower when the last handle goes.
    _follower: Arc<AbortOnDrop>,
}

#[derive(Debug)]
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Where the follower stands, for the first requests after start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamState {
    /// The first connection is being made: requests wait for it briefly.
    Starting,
    /// Caught up, and receiving live changes.
    Live,
    /// Not connected; the last known state applies.
    Disconnected,
}

struct Shared {
    service_name: String,
    client_secret: Secret,
    issuer: String,
    audience: String,
    accept_service_tokens: bool,
    channel: TracedChannel,
    verifier: RwLock<Arc<AccessTokenVerifier>>,
    /// When the key set was last fetched (single flight; at most one fetch per interval).
    keys_fetched: Mutex<Option<Instant>>,
    revocations: RwLock<Revocations>,
    service_token: Mutex<Option<ServiceToken>>,
    events: broadcast::Sender<Arc<pb::WatchChangesResponse>>,
    sync: watch::Sender<StreamState>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("service_name", &self.service_name)
            .field("sync", &*self.sync.borrow())
            .finish_non_exhaustive()
    }
}

struct ServiceToken {
    header: MetadataValue<tonic::metadata::Ascii>,
    renew_at: Instant,
}

/// How long the first requests wait for the first catch-up with auth's changes.
const FIRST_SYNC_WAIT: Duration = Duration::from_secs(2);
/// The least time between two key-set fetches triggered by unknown key ids.
const KEY_FETCH_INTERVAL: Duration = Duration::from_secs(1);
/// Auth sends a heartbeat every 10 s; silence for this long means a dead stream.
const STREAM_SILENCE_LIMIT: Duration = Duration::from_secs(35);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// Events buffered for a slow subscriber before it is told it lagged.
const SUBSCRIBER_BUFFER: usize = 4096;
/// Deadline for the unary calls made here (key set, service token).
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

impl Identity {
    /// Starts following auth over `channel` as the service `service_name`.
    /// `accept_service_tokens`: false at the gateway's edge (only people call it).
    pub fn start(
        config: &IdentityConfig,
        service_name: &str,
        channel: TracedChannel,
        accept_service_tokens: bool,
    ) -> Self {
        // Until the key set arrives every token names an unknown key, which fetches it.
        let verifier = AccessTokenVerifier::without_keys(
            &config.issuer,
            &config.audience,
            accept_service_tokens,
        );
        let shared = Arc::new(Shared {
            service_name: service_name.to_owned(),
            client_secret: config.client_secret.clone(),
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            accept_service_tokens,
            channel,
            verifier: RwLock::new(Arc::new(verifier)),
            keys_fetched: Mutex::new(None),
            revocations: RwLock::new(Revocations::default()),
            service_token: Mutex::new(None),
            events: broadcast::channel(SUBSCRIBER_BUFFER).0,
            sync: watch::channel(StreamState::Starting).0,
        });
        let follower = tokio::spawn(follow(shared.clone()));
        Self {
            shared,
            _follower: Arc::new(AbortOnDrop(follower.abort_handle())),
        }
    }

    /// The caller named by the request's bearer token: UNAUTHENTICATED when it is missing,
    /// invalid, expired or revoked; UNAVAILABLE when auth's key set cannot be had.
    pub async fn authenticate(
        &self,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<Caller, Status> {
        let token = access_token::bearer(metadata)
            .ok_or_else(|| Status::unauthenticated("a bearer access token is required"))?;
        self.verify(token).await.map_err(|e| e.into_status())
    }

    /// Verifies `token` (signature, issuer, audience, expiry, revocation).
    pub async fn verify(&self, token: &str) -> Result<Caller, VerifyError> {
        self.shared.wait_for_first_sync().await;
        let claims = match self.shared.verifier().verify(token) {
            Err(TokenError::UnknownKey) => {
                self.shared.fetch_keys_after_unknown_kid().await?;
                self.shared.verifier().verify(token)?
            }
            verified => verified?,
        };
        self.shared.revocations_read().check(&claims)?;
        let caller = Caller::from_claims(claims)?;
        Ok(caller)
    }

    /// The channel to auth, for calls made with [`Identity::authorize`].
    pub fn auth_channel(&self) -> TracedChannel {
        self.shared.channel.clone()
    }

    /// Puts this service's token on a request to auth (or to another service).
    pub async fn authorize<T>(&self, request: &mut Request<T>) -> Result<(), Status> {
        self.shared.authorize(request).await
    }

    /// Every event of auth's change stream as it arrives. A subscriber that falls more than
    /// a few thousand events behind gets `RecvError::Lagged`: treat that like a `Reset`.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<pb::WatchChangesResponse>> {
        self.shared.events.subscribe()
    }

    /// Whether the change stream is caught up and live (for readiness detail).
    pub fn is_live(&self) -> bool {
        *self.shared.sync.borrow() == StreamState::Live
    }
}

/// Why a token was refused, or could not be checked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Token(#[from] TokenError),
    /// No key set could be fetched from auth: the token may well be valid.
    #[error("auth's key set is unavailable")]
    KeysUnavailable,
}

impl VerifyError {
    pub fn into_status(self) -> Status {
        match self {
            Self::Token(TokenError::Expired) => Status::unauthenticated("access token expired"),
            Self::Token(TokenError::Revoked) => Status::unauthenticated("access token revoked"),
            Self::Token(_) => Status::unauthenticated("access token invalid"),
            Self::KeysUnavailable => {
                Status::unavailable("cannot verify access tokens right now, retry later")
            }
        }
    }
}

impl Shared {
    fn verifier(&self) -> Arc<AccessTokenVerifier> {
        match self.verifier.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn revocations_read(&self) -> std::sync::RwLockReadGuard<'_, Revocations> {
        self.revocations
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn revocations_write(&self) -> std::sync::RwLockWriteGuard<'_, Revocations> {
        self.revocations
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn wait_for_first_sync(&self) {
        if *self.sync.borrow() != StreamState::Starting {
            return;
        }
        let mut sync = self.sync.subscribe();
        let _ = tokio::time::timeout(
            FIRST_SYNC_WAIT,
            sync.wait_for(|state| *state != StreamState::Starting),
        )
        .await;
    }

    /// A token named a key we do not know: fetch the key set, unless it was fetched very
    /// recently (a flood of forged `kid`s must not become a flood of calls to auth).
    async fn fetch_keys_after_unknown_kid(&self) -> Result<(), VerifyError> {
        let mut fetched = self.keys_fetched.lock().await;
        let recent = fetched.is_some_and(|at| at.elapsed() < KEY_FETCH_INTERVAL);
        if !recent {
            match self.fetch_keys().await {
                Ok(()) => *fetched = Some(Instant::now()),
                Err(status) => {
                    tracing::warn!(code = ?status.code(), message = status.message(), "cannot fetch auth's key set");
                }
            }
        }
        if fetched.is_none() {
            // Never had a key set: the token may be fine; say so rather than 401.
            return Err(VerifyError::KeysUnavailable);
        }
        Ok(())
    }

    async fn fetch_keys(&self) -> Result<(), Status> {
        let mut request = Request::new(pb::GetJwksRequest {});
        request.set_timeout(CALL_TIMEOUT);
        let keys: Vec<PublicKey> = AuthServiceClient::new(self.channel.clone())
            .get_jwks(request)
            .await?
            .into_inner()
            .keys
            .into_iter()
            .filter(|key| key.kty == "OKP" && key.crv == "Ed25519")
            .map(|key| PublicKey {
                kid: key.kid,
                x: key.x,
            })
            .collect();
        let verifier = AccessTokenVerifier::new(
            &keys,
            &self.issuer,
            &self.audience,
            self.accept_service_tokens,
        )
        .map_err(|_| Status::internal("auth published a malformed key"))?;
        let kids: Vec<&str> = keys.iter().map(|k| k.kid.as_str()).collect();
        tracing::info!(?kids, "key set loaded");
        *self
            .verifier
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(verifier);
        Ok(())
    }

    async fn authorize<T>(&self, request: &mut Request<T>) -> Result<(), Status> {
        let mut cached = self.service_token.lock().await;
        let header = match cached.as_ref() {
            Some(token) if Instant::now() < token.renew_at => token.header.clone(),
            _ => {
                let token = self.issue_service_token().await?;
                let header = token.header.clone();
                *cached = Some(token);
                header
            }
        };
        drop(cached);
        request.metadata_mut().insert("authorization", header);
        Ok(())
    }

    async fn issue_service_token(&self) -> Result<ServiceToken, Status> {
        let mut request = Request::new(pb::IssueServiceTokenRequest {
            service_name: self.service_name.clone(),
            client_secret: self.client_secret.expose().to_owned(),
            audience: String::new(),
        });
        request.set_timeout(CALL_TIMEOUT);
        let issued = AuthServiceClient::new(self.channel.clone())
            .issue_service_token(request)
            .await
            .inspect_err(|status| {
                tracing::warn!(code = ?status.code(), message = status.message(), "cannot obtain a service token from auth");
            })?
            .into_inner();
        let header = MetadataValue::try_from(format!("Bearer {}", issued.access_token))
            .map_err(|_| Status::internal("auth issued a token that is not a header value"))?;
        // Renew at two thirds of the lifetime: a token in use never expires mid-call.
        let lifetime = Duration::from_secs(u64::try_from(issued.expires_in).unwrap_or(0));
        Ok(ServiceToken {
            header,
            renew_at: Instant::now() + lifetime * 2 / 3,
        })
    }

    /// Applies one event of the change stream to the revocations.
    fn apply(&self, message: &pb::WatchChangesResponse) {
        let mut revocations = self.revocations_write();
        match &message.event {
            Some(Event::Reset(_)) => *revocations = Revocations::default(),
            Some(Event::SessionRevoked(revoked)) => {
                if let Ok(session_id) = Uuid::parse_str(&revoked.session_id) {
                    let forget_after = revoked.forget_after.as_ref().map_or(0, |t| t.seconds);
                    revocations.sessions.insert(session_id, forget_after);
                }
            }
            Some(Event::RolesChanged(changed)) => {
                if let Ok(user_id) = Uuid::parse_str(&changed.user_id) {
                    let changed_at = changed.tokens_not_before.as_ref().map_or(0, |t| {
                        // Tokens carry whole seconds: a token issued in the second of the
                        // change counts as issued before it, unless its roles are current.
                        t.seconds + i64::from(t.nanos > 0)
                    });
                    let mut roles = changed.roles.clone();
                    roles.sort();
                    revocations.roles.insert(
                        user_id,
                        RoleFence {
                            roles,
                            not_before: changed_at,
                        },
                    );
                }
            }
            Some(Event::Heartbeat(_)) => revocations.forget_expired(unix_now()),
            Some(Event::UserChanged(_) | Event::KeySetChanged(_)) | None => {}
        }
        metrics::gauge!("identity_revoked_sessions").set(revocations.sessions.len() as f64);
        metrics::gauge!("identity_role_fences").set(revocations.roles.len() as f64);
    }
}

/// Revoked sessions and role changes recent enough to matter.
#[derive(Debug, Default)]
struct Revocations {
    /// Session id → unix second after which no token of it can be unexpired.
    sessions: HashMap<Uuid, i64>,
    roles: HashMap<Uuid, RoleFence>,
}

/// A user's roles since a change: older tokens with other roles are refused.
#[derive(Debug)]
struct RoleFence {
    /// Sorted.
    roles: Vec<String>,
    /// Tokens issued at or before this unix second must carry `roles`.
    not_before: i64,
}

impl Revocations {
    fn check(&self, claims: &AccessClaims) -> Result<(), TokenError> {
        if claims.service_name().is_some() {
            return Ok(());
        }
        if let Ok(session_id) = Uuid::parse_str(&claims.sid)
            && self.sessions.contains_key(&session_id)
        {
            return Err(TokenError::Revoked);
        }
        if let Ok(user_id) = Uuid::parse_str(&claims.sub)
            && let Some(fence) = self.roles.get(&user_id)
            && claims.iat <= fence.not_before
        {
            let mut roles = claims.roles.clone();
            roles.sort();
            if roles != fence.roles {
                return Err(TokenError::Revoked);
            }
        }
        Ok(())
    }

    /// Drops what no unexpired token can be affected by any more.
    fn forget_expired(&mut self, now: i64) {
        let leeway = i64::try_from(AccessTokenVerifier::LEEWAY_SECONDS).unwrap_or(0);
        self.sessions.retain(|_, forget_after| *forget_after >= now);
        let longest = i64::try_from(access_token::MAX_LIFETIME.as_secs()).unwrap_or(i64::MAX);
        self.roles
            .retain(|_, fence| fence.not_before.saturating_add(longest + leeway) >= now);
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The follower: key set, then the change stream, reconnecting with backoff for ever.
async fn follow(shared: Arc<Shared>) {
    let mut after = None;
    let mut backoff = Duration::from_millis(100);
    loop {
        {
            let mut fetched = shared.keys_fetched.lock().await;
            if fetched.is_none() {
                match shared.fetch_keys().await {
                    Ok(()) => *fetched = Some(Instant::now()),
                    Err(status) => {
                        tracing::debug!(code = ?status.code(), "key set not fetched yet");
                    }
                }
            }
        }
        let result = stream_changes(&shared, &mut after, &mut backoff).await;
        let was_live = shared.sync.send_replace(StreamState::Disconnected) == StreamState::Live;
        metrics::gauge!("identity_change_stream_connected").set(0.0);
        match result {
            Ok(()) => tracing::info!("auth's change stream ended; reconnecting"),
            Err(status) if was_live || backoff >= RECONNECT_MAX => {
                tracing::warn!(code = ?status.code(), message = status.message(), "auth's change stream is down; last known revocations apply");
            }
            Err(status) => {
                tracing::debug!(code = ?status.code(), "auth's change stream not connected yet")
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(RECONNECT_MAX);
    }
}

/// One connection of the change stream, until it fails or ends.
async fn stream_changes(
    shared: &Shared,
    after: &mut Option<i64>,
    backoff: &mut Duration,
) -> Result<(), Status> {
    let mut request = Request::new(pb::WatchChangesRequest {
        after_sequence: *after,
        kinds: Vec::new(),
    });
    shared.authorize(&mut request).await?;
    let mut stream = AuthServiceClient::new(shared.channel.clone())
        .watch_changes(request)
        .await?
        .into_inner();
    loop {
        let message = tokio::time::timeout(STREAM_SILENCE_LIMIT, stream.message())
            .await
            .map_err(|_| Status::unavailable("auth's change stream went silent"))??;
        let Some(message) = message else {
            return Ok(());
        };
        shared.apply(&message);
        match &message.event {
            Some(Event::Reset(_)) => *after = None,
            Some(Event::Heartbeat(_)) => {
                *after = Some(message.sequence);
                if *shared.sync.borrow() != StreamState::Live {
                    shared.sync.send_replace(StreamState::Live);
                    metrics::gauge!("identity_change_stream_connected").set(1.0);
                    tracing::info!(sequence = message.sequence, "caught up with auth's changes");
                    *backoff = Duration::from_millis(100);
                }
            }
            Some(Event::KeySetChanged(_)) => {
                *after = Some(message.sequence);
                if let Err(status) = shared.fetch_keys().await {
                    tracing::warn!(code = ?status.code(), "cannot fetch the new key set; unknown key ids will retry");
                }
            }
            _ => *after = Some(message.sequence),
        }
        // Nobody listening is fine: most binaries only verify.
        let _ = shared.events.send(Arc::new(message));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(user: Uuid, session: Uuid, roles: &[&str], iat: i64) -> AccessClaims {
        AccessClaims {
            sub: user.to_string(),
            sid: session.to_string(),
            roles: roles.iter().map(|r| (*r).to_owned()).collect(),
            iss: "svcset-auth".to_owned(),
            aud: "svcset".to_owned(),
            iat,
            exp: iat + 900,
            jti: Uuid::now_v7().to_string(),
        }
    }

    #[test]
    fn revoked_sessions_are_refused_until_forgotten() {
        let (user, session) = (Uuid::now_v7(), Uuid::now_v7());
        let mut revocations = Revocations::default();
        revocations.sessions.insert(session, 1_000);
        let token = claims(user, session, &[], 100);
        assert_eq!(revocations.check(&token), Err(TokenError::Revoked));
        assert_eq!(
            revocations.check(&claims(user, Uuid::now_v7(), &[], 100)),
            Ok(())
        );
        revocations.forget_expired(1_001);
        assert_eq!(revocations.check(&token), Ok(()));
    }

    #[test]
    fn tokens_from_before_a_role_change_need_the_current_roles() {
        let (user, session) = (Uuid::now_v7(), Uuid::now_v7());
        let mut revocations = Revocations::default();
        revocations.roles.insert(
            user,
            RoleFence {
                roles: vec!["admin".to_owned(), "editor".to_owned()],
                not_before: 500,
            },
        );
        // Issued before, with the old roles: refused.
        assert_eq!(
            revocations.check(&claims(user, session, &["editor"], 400)),
            Err(TokenError::Revoked)
        );
        // Issued in the same second, with the new roles (any order): fine.
        assert_eq!(
            revocations.check(&claims(user, session, &["editor", "admin"], 500)),
            Ok(())
        );
        // Issued after: fine whatever it carries (a later change would fence it).
        assert_eq!(
            revocations.check(&claims(user, session, &["editor"], 501)),
            Ok(())
        );
        // Another user is not affected.
        assert_eq!(
            revocations.check(&claims(Uuid::now_v7(), session, &[], 400)),
            Ok(())
        );
    }

    #[test]
    fn service_tokens_map_to_service_callers() {
        let mut service = claims(Uuid::now_v7(), Uuid::now_v7(), &[], 1);
        service.sub = "service:notes".to_owned();
        assert_eq!(
            Caller::from_claims(service),
            Ok(Caller::Service {
                name: "notes".to_owned()
            })
        );
        let user = claims(Uuid::now_v7(), Uuid::now_v7(), &["admin"], 1);
        assert!(Caller::from_claims(user).is_ok_and(|c| c.is_admin()));
    }
}
