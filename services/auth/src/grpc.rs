//! `auth.v1.AuthService`: translates between protobuf and the domain; holds no SQL.

use std::{net::SocketAddr, sync::Arc};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use platform::access_token::{AccessClaims, AccessTokenVerifier};
use proto::auth::v1::{self as pb, auth_service_server::AuthService};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::{
    changes::{ChangeFeed, ChangeStream},
    config::{ServiceClients, TokenConfig},
    domain::{DisplayName, Email, FieldViolation, Password, label},
    error::AuthError,
    password::{PasswordHasher, VerifyOutcome},
    store::{BulkOutcome, ClientInfo, RevokeOutcome, RoleChange, Store},
    throttle::{LoginThrottle, Verdict},
    tokens::{RefreshTokens, TokenIssuer},
};

/// Everything the RPCs share.
#[derive(Debug, Clone)]
pub struct AuthApi {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Store,
    hasher: PasswordHasher,
    issuer: TokenIssuer,
    verifier: AccessTokenVerifier,
    refresh: RefreshTokens,
    throttle: LoginThrottle,
    config: TokenConfig,
    changes: ChangeFeed,
    service_clients: ServiceClients,
}

/// What the RPCs are built from.
#[derive(Debug)]
pub struct Parts {
    pub store: Store,
    pub hasher: PasswordHasher,
    pub issuer: TokenIssuer,
    pub refresh: RefreshTokens,
    pub throttle: LoginThrottle,
    pub config: TokenConfig,
    pub changes: ChangeFeed,
    pub service_clients: ServiceClients,
}

impl AuthApi {
    pub fn new(parts: Parts) -> Result<Self, platform::access_token::TokenError> {
        let verifier = parts.issuer.verifier()?;
        Ok(Self {
            inner: Arc::new(Inner {
                store: parts.store,
                hasher: parts.hasher,
                issuer: parts.issuer,
                verifier,
                refresh: parts.refresh,
                throttle: parts.throttle,
                config: parts.config,
                changes: parts.changes,
                service_clients: parts.service_clients,
            }),
        })
    }
}

/// A signed-in caller: verified token whose session is still live.
struct Caller {
    user_id: Uuid,
    session_id: Uuid,
}

/// Who is calling: a signed-in user, or an internal service with a service token.
enum Principal {
    User(Caller),
    Service,
}

const DEVICE_NAME_MAX: usize = 100;
const USER_AGENT_MAX: usize = 256;
const SESSIONS_PAGE_DEFAULT: i64 = 50;
const SESSIONS_PAGE_MAX: i64 = 100;
const BULK_ASSIGN_MAX: usize = 1000;
const BATCH_GET_USERS_MAX: usize = 100;
/// The role that administers users and roles.
pub const ADMIN_ROLE: &str = "admin";

impl Inner {
    fn idle_seconds(&self) -> f64 {
        self.config.session_idle_timeout.as_secs_f64()
    }

    /// A signed-in user: verifies the bearer token and, since auth owns the sessions, that
    /// its session is live. Service tokens are refused.
    async fn caller<T>(&self, request: &Request<T>) -> Result<Caller, AuthError> {
        match self.principal(request).await? {
            Principal::User(caller) => Ok(caller),
            Principal::Service => Err(AuthError::Unauthenticated),
        }
    }

    async fn principal<T>(&self, request: &Request<T>) -> Result<Principal, AuthError> {
        let token =
            platform::access_token::bearer(request.metadata()).ok_or(AuthError::Unauthenticated)?;
        let claims = self.verified(token).await?;
        if claims.service_name().is_some() {
            return Ok(Principal::Service);
        }
        Ok(Principal::User(self.live_session(&claims).await?))
    }

    /// The claims of a valid token; for a user's token, also that its session is live.
    async fn verified(&self, token: &str) -> Result<AccessClaims, AuthError> {
        let claims = self
            .verifier
            .verify(token)
            .map_err(|_| AuthError::Unauthenticated)?;
        if claims.service_name().is_none() {
            self.live_session(&claims).await?;
        }
        Ok(claims)
    }

    async fn live_session(&self, claims: &AccessClaims) -> Result<Caller, AuthError> {
        let (Ok(user_id), Ok(session_id)) =
            (Uuid::parse_str(&claims.sub), Uuid::parse_str(&claims.sid))
        else {
            return Err(AuthError::Unauthenticated);
        };
        if !self
            .store
            .session_is_live(session_id, self.idle_seconds())
            .await?
        {
            return Err(AuthError::Unauthenticated);
        }
        Ok(Caller {
            user_id,
            session_id,
        })
    }

    /// An internal caller: a service token, or a user who holds `admin` now.
    async fn internal<T>(&self, request: &Request<T>) -> Result<(), AuthError> {
        match self.principal(request).await? {
            Principal::Service => Ok(()),
            Principal::User(caller) => {
                if self.store.has_role(caller.user_id, ADMIN_ROLE).await? {
                    Ok(())
                } else {
                    Err(AuthError::Forbidden)
                }
            }
        }
    }

    fn token_response(
        &self,
        user_id: Uuid,
        session_id: Uuid,
        roles: Vec<String>,
        refresh_token: String,
    ) -> Result<pb::LoginResponse, AuthError> {
        let access_token = self.issuer.issue(user_id, session_id, roles)?;
        Ok(pb::LoginResponse {
            access_token,
            refresh_token,
            token_type: "Bearer".to_owned(),
            expires_in: i32::try_from(self.issuer.ttl().as_secs()).unwrap_or(i32::MAX),
            user_id: user_id.to_string(),
        })
    }

    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<pb::RegisterResponse, AuthError> {
        let client = client_info(&request);
        let body = request.into_inner();
        let mut violations = Vec::new();
        let email = collect(Email::parse("email", &body.email), &mut violations);
        let password = collect(
            Password::parse_new("password", &body.password),
            &mut violations,
        );
        let display_name = collect(
            DisplayName::parse("display_name", &body.display_name),
            &mut violations,
        );
        let (Some(email), Some(password), Some(display_name)) = (email, password, display_name)
        else {
            return Err(AuthError::Invalid(violations));
        };
        // Hash before looking at the email, so a taken email costs the same time as a new one.
        let password_hash = self.hasher.hash(password).await?;
        let user_id = Uuid::now_v7();
        let created = self
            .store
            .create_user(
                user_id,
                email.as_str(),
                &password_hash,
                display_name.as_str(),
                &client,
            )
            .await?;
        if !created {
            return Err(AuthError::EmailTaken);
        }
        tracing::info!(%user_id, "user registered");
        Ok(pb::RegisterResponse {
            user_id: user_id.to_string(),
        })
    }

    async fn login(
        &self,
        request: Request<pb::LoginRequest>,
    ) -> Result<pb::LoginResponse, AuthError> {
        let client = client_info(&request);
        let body = request.into_inner();
        // A malformed email cannot match an account; it still costs a hash, so the answer
        // and its timing say nothing about which part was wrong.
        let email = Email::parse("email", &body.email).ok();
        let password = Password::parse_presented("password", &body.password)?;
        // Keyed on what was submitted, account or not, so a block reveals nothing.
        let account = LoginThrottle::account_key(
            email
                .as_ref()
                .map_or(body.email.trim().to_lowercase().as_str(), |e| e.as_str()),
        );
        let earlier_failures = match self.throttle.check(&account, &client.ip_address).await {
            Verdict::Allowed { account_failures } => account_failures,
            Verdict::Blocked { scope, retry_after } => {
                tracing::warn!(?scope, ?retry_after, "login throttled");
                self.store.record_login_throttled(&client).await?;
                return Err(AuthError::LoginThrottled { retry_after });
            }
        };
        let credentials = match &email {
            Some(email) => self.store.credentials(email.as_str()).await?,
            None => None,
        };
        let stored_hash = credentials.as_ref().map(|c| c.password_hash.clone());
        let outcome = self.hasher.verify(password.clone(), stored_hash).await?;
        let (credentials, needs_rehash) = match (credentials, outcome) {
            (Some(credentials), VerifyOutcome::Match { needs_rehash }) => {
                (credentials, needs_rehash)
            }
            (credentials, _) => {
                self.throttle
                    .record_failure(&account, &client.ip_address)
                    .await;
                self.store
                    .record_login_failure(credentials.map(|c| c.user_id), &client)
                    .await?;
                return Err(AuthError::InvalidCredentials);
            }
        };
        if earlier_failures > 0 {
            self.throttle.record_success(&account).await;
        }
        if !credentials.active {
            return Err(AuthError::AccountDisabled);
        }

        let session_id = Uuid::now_v7();
        let refresh_token = self.refresh.generate();
        let device_name = body
            .device_name
            .as_deref()
            .map(|d| label(d, DEVICE_NAME_MAX))
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| label(&client.user_agent, DEVICE_NAME_MAX));
        self.store
            .open_session(
                session_id,
                credentials.user_id,
                &device_name,
                &client,
                self.config.session_lifetime.as_secs_f64(),
                &RefreshTokens::hash(&refresh_token),
            )
            .await?;
        if needs_rehash {
            self.rehash_later(credentials.user_id, credentials.password_hash, password);
        }
        self.token_response(
            credentials.user_id,
            session_id,
            credentials.roles,
            refresh_token,
        )
    }

    /// Re-encodes a hash made with old parameters, off the request path. Best effort: the
    /// next login tries again if this one fails or the pool is busy.
    fn rehash_later(&self, user_id: Uuid, old_hash: String, password: Password) {
        let hasher = self.hasher.clone();
        let store = self.store.clone();
        tokio::spawn(async move {
            match hasher.hash(password).await {
                Ok(new_hash) => {
                    if let Err(e) = store.rehash(user_id, &old_hash, &new_hash).await {
                        tracing::warn!(%user_id, error = %e, "rehash not stored");
                    }
                }
                Err(e) => tracing::debug!(%user_id, error = %e, "rehash skipped"),
            }
        });
    }

    async fn refresh(
        &self,
        request: Request<pb::RefreshRequest>,
    ) -> Result<pb::LoginResponse, AuthError> {
        let client = client_info(&request);
        let presented = request.into_inner().refresh_token;
        if !RefreshTokens::well_formed(&presented) {
            return Err(AuthError::RefreshTokenInvalid);
        }
        let presented_hash = RefreshTokens::hash(&presented);
        let successor = self.refresh.successor(&presented);
        let successor_hash = RefreshTokens::hash(&successor);
        let idle = self.idle_seconds();

        if let Some(session) = self
            .store
            .rotate(&presented_hash, &successor_hash, idle, &client)
            .await?
        {
            return self.token_response(
                session.user_id,
                session.session_id,
                session.roles,
                successor,
            );
        }

        // Not rotated: a duplicate within the grace window, a reuse after it, or junk.
        let Some(token) = self.store.presented(&presented_hash, idle).await? else {
            return Err(AuthError::RefreshTokenInvalid);
        };
        let Some(rotated_at) = token.rotated_at else {
            // Never rotated yet not rotatable now: its session ended or went idle.
            return Err(AuthError::RefreshTokenInvalid);
        };
        let within_grace = Utc::now().signed_duration_since(rotated_at)
            <= chrono::Duration::from_std(self.config.refresh_grace).unwrap_or_default();
        if within_grace
            && token.session_live
            && self
                .store
                .was_issued_to(token.session_id, &successor_hash)
                .await?
        {
            // The same successor the first caller got: a client that lost that response
            // carries on without being logged out.
            return self.token_response(token.user_id, token.session_id, token.roles, successor);
        }
        if token.session_live {
            tracing::warn!(session_id = %token.session_id, "refresh token reused: revoking the session");
            self.store
                .revoke_for_reuse(token.user_id, token.session_id, &client)
                .await?;
        }
        Err(AuthError::RefreshTokenInvalid)
    }

    async fn logout(&self, request: Request<pb::LogoutRequest>) -> Result<(), AuthError> {
        // The access token names the session; when it has expired, the refresh token does.
        let by_token = platform::access_token::bearer(request.metadata())
            .and_then(|token| self.verifier.verify(token).ok());
        let refresh_token = request.into_inner().refresh_token;
        let (user_id, session_id) = match (by_token, refresh_token) {
            (Some(claims), _) => (parse_uuid(&claims.sub), parse_uuid(&claims.sid)),
            (None, Some(refresh)) if RefreshTokens::well_formed(&refresh) => {
                match self
                    .store
                    .presented(&RefreshTokens::hash(&refresh), self.idle_seconds())
                    .await?
                {
                    Some(token) => (Some(token.user_id), Some(token.session_id)),
                    None => (None, None),
                }
            }
            _ => (None, None),
        };
        let (Some(user_id), Some(session_id)) = (user_id, session_id) else {
            return Err(AuthError::Unauthenticated);
        };
        // Idempotent: an already ended session is fine.
        self.store
            .revoke_session(user_id, session_id, "logout")
            .await?;
        Ok(())
    }

    async fn list_sessions(
        &self,
        request: Request<pb::ListSessionsRequest>,
    ) -> Result<pb::ListSessionsResponse, AuthError> {
        let caller = self.caller(&request).await?;
        let body = request.into_inner();
        let limit = match body.page_size {
            0 => SESSIONS_PAGE_DEFAULT,
            n if n < 0 => {
                return Err(FieldViolation::new(
                    "page_size",
                    "OUT_OF_RANGE",
                    "must not be negative",
                )
                .into());
            }
            n => i64::from(n).min(SESSIONS_PAGE_MAX),
        };
        let after = if body.page_token.is_empty() {
            None
        } else {
            Some(decode_page_token(&body.page_token)?)
        };
        // One row more than asked tells whether another page exists.
        let mut rows = self
            .store
            .list_sessions(caller.user_id, self.idle_seconds(), after, limit + 1)
            .await?;
        let next_page_token = if rows.len() > usize::try_from(limit).unwrap_or(usize::MAX) {
            rows.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
            rows.last()
                .map(|last| encode_page_token(last.last_used_at, last.id))
                .unwrap_or_default()
        } else {
            String::new()
        };
        let sessions = rows
            .into_iter()
            .map(|row| pb::Session {
                current: row.id == caller.session_id,
                session_id: row.id.to_string(),
                device_name: row.device_name,
                ip_address: row.ip_address,
                user_agent: row.user_agent,
                created_at: Some(timestamp(row.created_at)),
                last_used_at: Some(timestamp(row.last_used_at)),
                expires_at: Some(timestamp(row.expires_at)),
            })
            .collect();
        Ok(pb::ListSessionsResponse {
            sessions,
            next_page_token,
        })
    }

    async fn revoke_session(
        &self,
        request: Request<pb::RevokeSessionRequest>,
    ) -> Result<(), AuthError> {
        let caller = self.caller(&request).await?;
        let session_id = parse_id("session_id", &request.get_ref().session_id)?;
        match self
            .store
            .revoke_session(caller.user_id, session_id, "revoked_by_user")
            .await?
        {
            RevokeOutcome::Revoked | RevokeOutcome::AlreadyEnded => Ok(()),
            // Another user's session looks exactly like a missing one.
            RevokeOutcome::NotFound => Err(AuthError::SessionNotFound),
        }
    }

    async fn change_password(
        &self,
        request: Request<pb::ChangePasswordRequest>,
    ) -> Result<pb::ChangePasswordResponse, AuthError> {
        let caller = self.caller(&request).await?;
        let body = request.into_inner();
        let current = Password::parse_presented("current_password", &body.current_password)?;
        let new = Password::parse_new("new_password", &body.new_password)?;
        let stored = self
            .store
            .password_hash(caller.user_id)
            .await?
            .ok_or(AuthError::Unauthenticated)?;
        if self.hasher.verify(current, Some(stored)).await? == VerifyOutcome::Mismatch {
            return Err(AuthError::WrongPassword);
        }
        let new_hash = self.hasher.hash(new).await?;
        let revoked = self
            .store
            .change_password(caller.user_id, &new_hash, caller.session_id)
            .await?;
        Ok(pb::ChangePasswordResponse {
            revoked_session_count: i32::try_from(revoked).unwrap_or(i32::MAX),
        })
    }
}

impl Inner {
    /// A signed-in caller who holds `admin` now (read from the database, not the token).
    async fn admin<T>(&self, request: &Request<T>) -> Result<Caller, AuthError> {
        let caller = self.caller(request).await?;
        if self.store.has_role(caller.user_id, ADMIN_ROLE).await? {
            Ok(caller)
        } else {
            Err(AuthError::Forbidden)
        }
    }

    /// The caller, allowed to read `user_id`'s data: themself, a service, or an admin.
    /// Another user gets NOT_FOUND, as if the user did not exist.
    async fn reader_of<T>(&self, request: &Request<T>, user_id: Uuid) -> Result<(), AuthError> {
        let caller = match self.principal(request).await? {
            Principal::Service => return Ok(()),
            Principal::User(caller) => caller,
        };
        if caller.user_id == user_id || self.store.has_role(caller.user_id, ADMIN_ROLE).await? {
            Ok(())
        } else {
            Err(AuthError::UserNotFound)
        }
    }

    async fn get_user_roles(
        &self,
        request: Request<pb::GetUserRolesRequest>,
    ) -> Result<pb::GetUserRolesResponse, AuthError> {
        let user_id = parse_id("user_id", &request.get_ref().user_id)?;
        self.reader_of(&request, user_id).await?;
        let row = self
            .store
            .user_roles(user_id)
            .await?
            .ok_or(AuthError::UserNotFound)?;
        Ok(pb::GetUserRolesResponse {
            user_id: user_id.to_string(),
            roles: row.roles,
            permissions: row.permissions,
        })
    }

    async fn list_roles(
        &self,
        request: Request<pb::ListRolesRequest>,
    ) -> Result<pb::ListRolesResponse, AuthError> {
        self.admin(&request).await?;
        // Roles are few (a handful per deployment): one page holds them all.
        let roles = self
            .store
            .roles()
            .await?
            .into_iter()
            .map(|r| pb::Role {
                name: r.name,
                description: r.description,
                permissions: r.permissions,
                created_at: Some(timestamp(r.created_at)),
            })
            .collect();
        Ok(pb::ListRolesResponse {
            roles,
            next_page_token: String::new(),
        })
    }

    async fn set_role(
        &self,
        user_id: &str,
        role: &str,
        grant: bool,
        actor: Uuid,
    ) -> Result<(), AuthError> {
        let user_id = parse_id("user_id", user_id)?;
        match self
            .store
            .set_role(user_id, role, grant, Some(actor))
            .await?
        {
            RoleChange::Changed | RoleChange::Unchanged => Ok(()),
            RoleChange::UserNotFound => Err(AuthError::UserNotFound),
            RoleChange::RoleNotFound => Err(AuthError::RoleNotFound),
        }
    }

    async fn bulk_assign_roles(
        &self,
        request: Request<pb::BulkAssignRolesRequest>,
    ) -> Result<pb::BulkAssignRolesResponse, AuthError> {
        let caller = self.admin(&request).await?;
        let assignments = request.into_inner().assignments;
        if assignments.len() > BULK_ASSIGN_MAX {
            return Err(FieldViolation::new(
                "assignments",
                "TOO_MANY",
                format!("at most {BULK_ASSIGN_MAX} pairs per request"),
            )
            .into());
        }
        let mut violations = Vec::new();
        let mut user_ids = Vec::with_capacity(assignments.len());
        let mut roles = Vec::with_capacity(assignments.len());
        for (i, pair) in assignments.into_iter().enumerate() {
            match parse_id(format!("assignments[{i}].user_id"), &pair.user_id) {
                Ok(id) => user_ids.push(id),
                Err(v) => violations.push(v),
            }
            roles.push(pair.role);
        }
        if !violations.is_empty() {
            return Err(AuthError::Invalid(violations));
        }
        let requested = user_ids.len();
        match self
            .store
            .bulk_assign(&user_ids, &roles, Some(caller.user_id))
            .await?
        {
            BulkOutcome::Assigned(assigned) => {
                let assigned = usize::try_from(assigned).unwrap_or(requested);
                Ok(pb::BulkAssignRolesResponse {
                    assigned_count: i32::try_from(assigned).unwrap_or(i32::MAX),
                    unchanged_count: i32::try_from(requested.saturating_sub(assigned))
                        .unwrap_or(i32::MAX),
                })
            }
            BulkOutcome::Unknown(indexes) => Err(AuthError::UnknownItems(
                indexes
                    .into_iter()
                    .map(|i| {
                        FieldViolation::new(
                            format!("assignments[{i}]"),
                            "NOT_FOUND",
                            "unknown user or role",
                        )
                    })
                    .collect(),
            )),
        }
    }

    async fn users(&self, ids: &[Uuid]) -> Result<Vec<pb::User>, AuthError> {
        Ok(self
            .store
            .users(ids)
            .await?
            .into_iter()
            .map(|u| pb::User {
                user_id: u.id.to_string(),
                email: u.email,
                display_name: u.display_name,
                status: match u.status.as_str() {
                    "active" => pb::UserStatus::Active,
                    "disabled" => pb::UserStatus::Disabled,
                    _ => pb::UserStatus::Unspecified,
                }
                .into(),
                roles: u.roles,
                created_at: Some(timestamp(u.created_at)),
                updated_at: Some(timestamp(u.updated_at)),
            })
            .collect())
    }
}

fn collect<T>(
    result: Result<T, FieldViolation>,
    violations: &mut Vec<FieldViolation>,
) -> Option<T> {
    result.map_err(|v| violations.push(v)).ok()
}

fn parse_uuid(text: &str) -> Option<Uuid> {
    Uuid::parse_str(text).ok()
}

/// A UUID request field, or a violation naming it.
fn parse_id(field: impl Into<String>, text: &str) -> Result<Uuid, FieldViolation> {
    Uuid::parse_str(text).map_err(|_| FieldViolation::new(field, "INVALID_ID", "not a UUID"))
}

fn timestamp(at: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: i32::try_from(at.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

/// Keyset page token: `<last_used_at micros>.<id>`, base64url. Opaque to clients.
fn encode_page_token(last_used_at: DateTime<Utc>, id: Uuid) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}.{id}", last_used_at.timestamp_micros()))
}

fn decode_page_token(token: &str) -> Result<(DateTime<Utc>, Uuid), AuthError> {
    let invalid = || {
        FieldViolation::new(
            "page_token",
            "INVALID_PAGE_TOKEN",
            "not a page token from this list",
        )
    };
    let text = URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(invalid)?;
    let (micros, id) = text.split_once('.').ok_or_else(invalid)?;
    let at = micros
        .parse::<i64>()
        .ok()
        .and_then(DateTime::from_timestamp_micros)
        .ok_or_else(invalid)?;
    let id = Uuid::parse_str(id).map_err(|_| invalid())?;
    Ok((at, id))
}

/// Client address and agent: what the gateway forwarded, else the peer of this call.
fn client_info<T>(request: &Request<T>) -> ClientInfo {
    let metadata = request.metadata();
    let forwarded = metadata
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(str::trim)
        .filter(|v| v.parse::<std::net::IpAddr>().is_ok())
        .map(str::to_owned);
    let ip_address = forwarded
        .or_else(|| {
            request
                .remote_addr()
                .as_ref()
                .map(SocketAddr::ip)
                .map(|ip| ip.to_string())
        })
        .unwrap_or_default();
    let user_agent = metadata
        .get("user-agent")
        .and_then(|v| v.to_str().ok())
        .map(|v| label(v, USER_AGENT_MAX))
        .unwrap_or_default();
    ClientInfo {
        ip_address,
        user_agent,
    }
}

/// The response, or the status its error maps to (refusals logged at debug).
fn finish<T>(method: &'static str, result: Result<T, AuthError>) -> Result<Response<T>, Status> {
    match result {
        Ok(value) => Ok(Response::new(value)),
        Err(error) => {
            let status = Status::from(error);
            tracing::debug!(method, code = ?status.code(), "auth call refused");
            Err(status)
        }
    }
}

#[tonic::async_trait]
impl AuthService for AuthApi {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        finish("Register", self.inner.register(request).await)
    }

    async fn login(
        &self,
        request: Request<pb::LoginRequest>,
    ) -> Result<Response<pb::LoginResponse>, Status> {
        let result = self.inner.login(request).await;
        // Success ratio for SREs: what callers get wrong is told apart from what we fail at.
        let outcome = match &result {
            Ok(_) => "success",
            Err(
                AuthError::InvalidCredentials | AuthError::AccountDisabled | AuthError::Invalid(_),
            ) => "invalid_credentials",
            Err(AuthError::LoginThrottled { .. }) => "throttled",
            Err(AuthError::HashPoolBusy) => "hash_pool_busy",
            Err(_) => "error",
        };
        metrics::counter!("auth_logins_total", "outcome" => outcome).increment(1);
        finish("Login", result)
    }

    async fn refresh(
        &self,
        request: Request<pb::RefreshRequest>,
    ) -> Result<Response<pb::RefreshResponse>, Status> {
        let result = self
            .inner
            .refresh(request)
            .await
            .map(|r| pb::RefreshResponse {
                access_token: r.access_token,
                refresh_token: r.refresh_token,
                token_type: r.token_type,
                expires_in: r.expires_in,
                user_id: r.user_id,
            });
        finish("Refresh", result)
    }

    async fn logout(
        &self,
        request: Request<pb::LogoutRequest>,
    ) -> Result<Response<pb::LogoutResponse>, Status> {
        finish(
            "Logout",
            self.inner
                .logout(request)
                .await
                .map(|()| pb::LogoutResponse {}),
        )
    }

    async fn logout_all(
        &self,
        request: Request<pb::LogoutAllRequest>,
    ) -> Result<Response<pb::LogoutAllResponse>, Status> {
        let result = async {
            let caller = self.inner.caller(&request).await?;
            let revoked = self
                .inner
                .store
                .revoke_all_sessions(caller.user_id, None, "logout_all")
                .await?;
            Ok(pb::LogoutAllResponse {
                revoked_count: i32::try_from(revoked).unwrap_or(i32::MAX),
            })
        }
        .await;
        finish("LogoutAll", result)
    }

    async fn list_sessions(
        &self,
        request: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        finish("ListSessions", self.inner.list_sessions(request).await)
    }

    async fn revoke_session(
        &self,
        request: Request<pb::RevokeSessionRequest>,
    ) -> Result<Response<pb::RevokeSessionResponse>, Status> {
        finish(
            "RevokeSession",
            self.inner
                .revoke_session(request)
                .await
                .map(|()| pb::RevokeSessionResponse {}),
        )
    }

    async fn change_password(
        &self,
        request: Request<pb::ChangePasswordRequest>,
    ) -> Result<Response<pb::ChangePasswordResponse>, Status> {
        finish("ChangePassword", self.inner.change_password(request).await)
    }

    async fn get_user(
        &self,
        request: Request<pb::GetUserRequest>,
    ) -> Result<Response<pb::GetUserResponse>, Status> {
        let result = async {
            let user_id = parse_id("user_id", &request.get_ref().user_id)?;
            self.inner.reader_of(&request, user_id).await?;
            let user = self.inner.users(&[user_id]).await?.into_iter().next();
            Ok(pb::GetUserResponse {
                user: Some(user.ok_or(AuthError::UserNotFound)?),
            })
        }
        .await;
        finish("GetUser", result)
    }

    async fn batch_get_users(
        &self,
        request: Request<pb::BatchGetUsersRequest>,
    ) -> Result<Response<pb::BatchGetUsersResponse>, Status> {
        let result = async {
            self.inner.internal(&request).await?;
            let raw = &request.get_ref().user_ids;
            if raw.len() > BATCH_GET_USERS_MAX {
                return Err(FieldViolation::new(
                    "user_ids",
                    "TOO_MANY",
                    format!("at most {BATCH_GET_USERS_MAX} ids"),
                )
                .into());
            }
            let mut ids = Vec::with_capacity(raw.len());
            for (i, id) in raw.iter().enumerate() {
                let id = parse_id(format!("user_ids[{i}]"), id)?;
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
            let mut users = self.inner.users(&ids).await?;
            // Request order, as the contract promises.
            users.sort_by_key(|u| raw.iter().position(|id| *id == u.user_id));
            Ok(pb::BatchGetUsersResponse { users })
        }
        .await;
        finish("BatchGetUsers", result)
    }

    async fn get_user_roles(
        &self,
        request: Request<pb::GetUserRolesRequest>,
    ) -> Result<Response<pb::GetUserRolesResponse>, Status> {
        finish("GetUserRoles", self.inner.get_user_roles(request).await)
    }

    async fn list_roles(
        &self,
        request: Request<pb::ListRolesRequest>,
    ) -> Result<Response<pb::ListRolesResponse>, Status> {
        finish("ListRoles", self.inner.list_roles(request).await)
    }

    async fn assign_role(
        &self,
        request: Request<pb::AssignRoleRequest>,
    ) -> Result<Response<pb::AssignRoleResponse>, Status> {
        let result = async {
            let caller = self.inner.admin(&request).await?;
            let body = request.get_ref();
            self.inner
                .set_role(&body.user_id, &body.role, true, caller.user_id)
                .await
                .map(|()| pb::AssignRoleResponse {})
        }
        .await;
        finish("AssignRole", result)
    }

    async fn revoke_role(
        &self,
        request: Request<pb::RevokeRoleRequest>,
    ) -> Result<Response<pb::RevokeRoleResponse>, Status> {
        let result = async {
            let caller = self.inner.admin(&request).await?;
            let body = request.get_ref();
            self.inner
                .set_role(&body.user_id, &body.role, false, caller.user_id)
                .await
                .map(|()| pb::RevokeRoleResponse {})
        }
        .await;
        finish("RevokeRole", result)
    }

    async fn bulk_assign_roles(
        &self,
        request: Request<pb::BulkAssignRolesRequest>,
    ) -> Result<Response<pb::BulkAssignRolesResponse>, Status> {
        finish(
            "BulkAssignRoles",
            self.inner.bulk_assign_roles(request).await,
        )
    }

    async fn watch_changes(
        &self,
        request: Request<pb::WatchChangesRequest>,
    ) -> Result<Response<ChangeStream>, Status> {
        let result = async {
            self.inner.internal(&request).await?;
            let body = request.into_inner();
            let kinds = body.kinds().collect();
            Ok(self.inner.changes.watch(body.after_sequence, kinds))
        }
        .await;
        finish("WatchChanges", result)
    }

    async fn issue_service_token(
        &self,
        request: Request<pb::IssueServiceTokenRequest>,
    ) -> Result<Response<pb::IssueServiceTokenResponse>, Status> {
        let result = async {
            let body = request.into_inner();
            if !self
                .inner
                .service_clients
                .authenticates(&body.service_name, &body.client_secret)
            {
                tracing::warn!(service = %label(&body.service_name, 64), "service token refused");
                return Err(AuthError::Unauthenticated);
            }
            let audience = platform::access_token::service_audience(&self.inner.config.audience);
            if !body.audience.is_empty() && body.audience != audience {
                return Err(FieldViolation::new(
                    "audience",
                    "AUDIENCE_NOT_ALLOWED",
                    format!("service tokens are issued for `{audience}` only"),
                )
                .into());
            }
            let access_token = self.inner.issuer.issue_service(&body.service_name)?;
            Ok(pb::IssueServiceTokenResponse {
                access_token,
                token_type: "Bearer".to_owned(),
                expires_in: i32::try_from(self.inner.issuer.ttl().as_secs()).unwrap_or(i32::MAX),
            })
        }
        .await;
        finish("IssueServiceToken", result)
    }

    async fn validate_access_token(
        &self,
        request: Request<pb::ValidateAccessTokenRequest>,
    ) -> Result<Response<pb::ValidateAccessTokenResponse>, Status> {
        let result = async {
            self.inner.internal(&request).await?;
            let body = request.into_inner();
            if !body.audience.is_empty() && body.audience != self.inner.config.audience {
                return Err(AuthError::Unauthenticated);
            }
            let claims = self.inner.verified(&body.access_token).await?;
            let seconds = |s: i64| prost_types::Timestamp {
                seconds: s,
                nanos: 0,
            };
            Ok(pb::ValidateAccessTokenResponse {
                principal_kind: if claims.service_name().is_some() {
                    pb::PrincipalKind::Service
                } else {
                    pb::PrincipalKind::User
                }
                .into(),
                issued_at: Some(seconds(claims.iat)),
                expires_at: Some(seconds(claims.exp)),
                subject: claims.sub,
                session_id: claims.sid,
                roles: claims.roles,
                token_id: claims.jti,
            })
        }
        .await;
        finish("ValidateAccessToken", result)
    }

    async fn get_jwks(
        &self,
        _request: Request<pb::GetJwksRequest>,
    ) -> Result<Response<pb::GetJwksResponse>, Status> {
        let keys = self
            .inner
            .issuer
            .public_keys()
            .into_iter()
            .map(|key| pb::Jwk {
                kty: "OKP".to_owned(),
                crv: "Ed25519".to_owned(),
                x: key.x,
                kid: key.kid,
                alg: "EdDSA".to_owned(),
                r#use: "sig".to_owned(),
                y: String::new(),
            })
            .collect();
        Ok(Response::new(pb::GetJwksResponse { keys }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_refuse_junk() {
        let at = DateTime::from_timestamp_micros(1_764_000_000_123_456).unwrap_or_default();
        let id = Uuid::now_v7();
        let token = encode_page_token(at, id);
        assert_eq!(decode_page_token(&token).ok(), Some((at, id)));
        assert!(decode_page_token("nope").is_err());
        assert!(decode_page_token(&URL_SAFE_NO_PAD.encode("12.not-a-uuid")).is_err());
    }
}
