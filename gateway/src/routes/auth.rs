//! `/api/v1/auth/*`, `/api/v1/admin/*` (roles) and `/.well-known/jwks.json`, onto
//! `auth.v1.AuthService`. HTTP bodies are their own types, converted here. Routes for a
//! signed-in caller verify the token at the edge ([`SignedIn`], [`Admin`]) and forward it:
//! auth verifies it again.

use axum::{
    Router,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode, header},
    response::IntoResponse,
    routing::{delete, get, post, put},
};
use proto::auth::v1::{self as pb, auth_service_client::AuthServiceClient};
use serde::{Deserialize, Serialize};

use super::{call, rfc3339};
use crate::{
    AppState,
    context::{Admin, ClientAddr, Deadline, RequestContext, SignedIn},
    error::{ApiError, ErrorCode},
    extract::ApiJson,
    upstream::Upstreams,
};

/// Routes a client may call without a token: the API edge still guards them.
pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/auth/register", post(register))
        .route("/api/v1/auth/login", post(login))
        .route("/api/v1/auth/refresh", post(refresh))
        .route("/api/v1/auth/logout", post(logout))
        .route("/api/v1/auth/logout-all", post(logout_all))
        .route("/api/v1/auth/sessions", get(list_sessions))
        .route("/api/v1/auth/sessions/{id}", delete(revoke_session))
        .route("/api/v1/auth/password", post(change_password))
        .route("/.well-known/jwks.json", get(jwks))
        .route("/api/v1/admin/roles", get(list_roles))
        .route(
            "/api/v1/admin/users/{id}/roles/{role}",
            put(assign_role).delete(revoke_role),
        )
}

fn client(upstreams: &Upstreams) -> AuthServiceClient<platform::grpc::TracedChannel> {
    AuthServiceClient::new(upstreams.auth.channel.clone())
}

#[derive(Debug, Deserialize)]
struct RegisterBody {
    email: String,
    password: String,
    display_name: String,
}

#[derive(Debug, Serialize)]
struct RegisterReply {
    user_id: String,
}

async fn register(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    ClientAddr(peer): ClientAddr,
    headers: HeaderMap,
    ApiJson(body): ApiJson<RegisterBody>,
) -> Result<impl IntoResponse, ApiError> {
    let request = call(
        &context,
        deadline,
        &headers,
        peer,
        pb::RegisterRequest {
            email: body.email,
            password: body.password,
            display_name: body.display_name,
        },
    )?;
    let reply = client(&state.upstreams)
        .register(request)
        .await?
        .into_inner();
    Ok((
        StatusCode::CREATED,
        ApiJson(RegisterReply {
            user_id: reply.user_id,
        }),
    ))
}

#[derive(Debug, Deserialize)]
struct LoginBody {
    email: String,
    password: String,
    #[serde(default)]
    device_name: Option<String>,
}

/// The login and refresh answer: minimal, the rest loads from the profile on demand.
#[derive(Debug, Serialize)]
struct TokenReply {
    access_token: String,
    refresh_token: String,
    token_type: String,
    expires_in: i32,
    user_id: String,
}

impl From<pb::LoginResponse> for TokenReply {
    fn from(r: pb::LoginResponse) -> Self {
        Self {
            access_token: r.access_token,
            refresh_token: r.refresh_token,
            token_type: r.token_type,
            expires_in: r.expires_in,
            user_id: r.user_id,
        }
    }
}

impl From<pb::RefreshResponse> for TokenReply {
    fn from(r: pb::RefreshResponse) -> Self {
        Self {
            access_token: r.access_token,
            refresh_token: r.refresh_token,
            token_type: r.token_type,
            expires_in: r.expires_in,
            user_id: r.user_id,
        }
    }
}

/// Credentials must never sit in a shared cache.
fn no_store(reply: TokenReply) -> impl IntoResponse {
    ([(header::CACHE_CONTROL, "no-store")], ApiJson(reply))
}

async fn login(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    ClientAddr(peer): ClientAddr,
    headers: HeaderMap,
    ApiJson(body): ApiJson<LoginBody>,
) -> Result<impl IntoResponse, ApiError> {
    let request = call(
        &context,
        deadline,
        &headers,
        peer,
        pb::LoginRequest {
            email: body.email,
            password: body.password,
            device_name: body.device_name,
        },
    )?;
    let reply = client(&state.upstreams).login(request).await?.into_inner();
    Ok(no_store(reply.into()))
}

#[derive(Debug, Deserialize)]
struct RefreshBody {
    refresh_token: String,
}

async fn refresh(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    ClientAddr(peer): ClientAddr,
    headers: HeaderMap,
    ApiJson(body): ApiJson<RefreshBody>,
) -> Result<impl IntoResponse, ApiError> {
    let request = call(
        &context,
        deadline,
        &headers,
        peer,
        pb::RefreshRequest {
            refresh_token: body.refresh_token,
        },
    )?;
    let reply = client(&state.upstreams)
        .refresh(request)
        .await?
        .into_inner();
    Ok(no_store(reply.into()))
}

#[derive(Debug, Default, Deserialize)]
struct LogoutBody {
    #[serde(default)]
    refresh_token: Option<String>,
}

/// Ends this session: by the access token, or by a refresh token in the body when the access
/// token has expired. The body is optional.
async fn logout(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<StatusCode, ApiError> {
    let body: LogoutBody = if body.is_empty() {
        LogoutBody::default()
    } else {
        crate::extract::parse_json(&body)?
    };
    let request = call(
        &context,
        deadline,
        &headers,
        None,
        pb::LogoutRequest {
            refresh_token: body.refresh_token,
        },
    )?;
    client(&state.upstreams).logout(request).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn logout_all(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _signed_in: SignedIn,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let request = call(&context, deadline, &headers, None, pb::LogoutAllRequest {})?;
    client(&state.upstreams).logout_all(request).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
struct ListSessionsQuery {
    #[serde(default)]
    limit: Option<i32>,
    #[serde(default)]
    cursor: Option<String>,
}

#[derive(Debug, Serialize)]
struct SessionItem {
    id: String,
    device_name: String,
    ip_address: String,
    user_agent: String,
    created_at: Option<String>,
    last_used_at: Option<String>,
    expires_at: Option<String>,
    current: bool,
}

#[derive(Debug, Serialize)]
struct SessionsReply {
    sessions: Vec<SessionItem>,
    next_cursor: Option<String>,
}

async fn list_sessions(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _signed_in: SignedIn,
    headers: HeaderMap,
    query: Result<Query<ListSessionsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<ApiJson<SessionsReply>, ApiError> {
    let Query(query) = query.map_err(|e| {
        ApiError::new(ErrorCode::BadRequest, "the query string is malformed")
            .with_internal(e.body_text())
    })?;
    let request = call(
        &context,
        deadline,
        &headers,
        None,
        pb::ListSessionsRequest {
            page_size: query.limit.unwrap_or(0),
            page_token: query.cursor.unwrap_or_default(),
        },
    )?;
    let reply = client(&state.upstreams)
        .list_sessions(request)
        .await?
        .into_inner();
    Ok(ApiJson(SessionsReply {
        sessions: reply
            .sessions
            .into_iter()
            .map(|s| SessionItem {
                id: s.session_id,
                device_name: s.device_name,
                ip_address: s.ip_address,
                user_agent: s.user_agent,
                created_at: rfc3339(s.created_at),
                last_used_at: rfc3339(s.last_used_at),
                expires_at: rfc3339(s.expires_at),
                current: s.current,
            })
            .collect(),
        next_cursor: Some(reply.next_page_token).filter(|t| !t.is_empty()),
    }))
}

async fn revoke_session(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _signed_in: SignedIn,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let request = call(
        &context,
        deadline,
        &headers,
        None,
        pb::RevokeSessionRequest { session_id: id },
    )?;
    client(&state.upstreams).revoke_session(request).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
struct ChangePasswordBody {
    current_password: String,
    new_password: String,
}

#[derive(Debug, Serialize)]
struct ChangePasswordReply {
    /// Other sessions ended by the change.
    revoked_sessions: i32,
}

async fn change_password(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _signed_in: SignedIn,
    ClientAddr(peer): ClientAddr,
    headers: HeaderMap,
    ApiJson(body): ApiJson<ChangePasswordBody>,
) -> Result<ApiJson<ChangePasswordReply>, ApiError> {
    let request = call(
        &context,
        deadline,
        &headers,
        peer,
        pb::ChangePasswordRequest {
            current_password: body.current_password,
            new_password: body.new_password,
        },
    )?;
    let reply = client(&state.upstreams)
        .change_password(request)
        .await?
        .into_inner();
    Ok(ApiJson(ChangePasswordReply {
        revoked_sessions: reply.revoked_session_count,
    }))
}

#[derive(Debug, Serialize)]
struct JwkItem {
    kty: String,
    crv: String,
    x: String,
    kid: String,
    alg: String,
    #[serde(rename = "use")]
    use_: String,
}

#[derive(Debug, Serialize)]
struct JwksReply {
    keys: Vec<JwkItem>,
}

async fn jwks(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
) -> Result<impl IntoResponse, ApiError> {
    let request = context.grpc_request(pb::GetJwksRequest {}, deadline)?;
    let reply = client(&state.upstreams)
        .get_jwks(request)
        .await?
        .into_inner();
    let keys = reply
        .keys
        .into_iter()
        .map(|k| JwkItem {
            kty: k.kty,
            crv: k.crv,
            x: k.x,
            kid: k.kid,
            alg: k.alg,
            use_: k.r#use,
        })
        .collect();
    // Verifiers may cache the set briefly; a new key is fetched on an unknown `kid`.
    Ok((
        [(header::CACHE_CONTROL, "public, max-age=300")],
        ApiJson(JwksReply { keys }),
    ))
}

#[derive(Debug, Serialize)]
struct RoleItem {
    name: String,
    description: String,
    permissions: Vec<String>,
    created_at: Option<String>,
}

#[derive(Debug, Serialize)]
struct RolesReply {
    roles: Vec<RoleItem>,
}

async fn list_roles(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _admin: Admin,
    headers: HeaderMap,
) -> Result<ApiJson<RolesReply>, ApiError> {
    let request = call(
        &context,
        deadline,
        &headers,
        None,
        pb::ListRolesRequest::default(),
    )?;
    let reply = client(&state.upstreams)
        .list_roles(request)
        .await?
        .into_inner();
    Ok(ApiJson(RolesReply {
        roles: reply
            .roles
            .into_iter()
            .map(|r| RoleItem {
                name: r.name,
                description: r.description,
                permissions: r.permissions,
                created_at: rfc3339(r.created_at),
            })
            .collect(),
    }))
}

/// `PUT` gives the role (idempotently), `DELETE` takes it.
async fn assign_role(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _admin: Admin,
    headers: HeaderMap,
    Path((user_id, role)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let request = call(
        &context,
        deadline,
        &headers,
        None,
        pb::AssignRoleRequest { user_id, role },
    )?;
    client(&state.upstreams).assign_role(request).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn revoke_role(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _admin: Admin,
    headers: HeaderMap,
    Path((user_id, role)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let request = call(
        &context,
        deadline,
        &headers,
        None,
        pb::RevokeRoleRequest { user_id, role },
    )?;
    client(&state.upstreams).revoke_role(request).await?;
    Ok(StatusCode::NO_CONTENT)
}
