//! `/api/v1/auth/*`, `/api/v1/admin/*` (roles) and `/.well-known/jwks.json`, onto
//! `auth.v1.AuthService`. HTTP bodies are their own types, converted here. Routes for a
//! signed-in caller verify the token at the edge ([`SignedIn`], [`Admin`]) and forward it:
//! auth verifies it again.

use axum::{
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode, header},
    response::IntoResponse,
};
use proto::auth::v1::{self as pb, auth_service_client::AuthServiceClient};
use serde::{Deserialize, Serialize};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::{call, rfc3339};
use crate::{
    AppState,
    context::{Admin, ClientAddr, Deadline, RequestContext, SignedIn},
    error::{ApiError, ErrorCode},
    extract::ApiJson,
    upstream::Upstreams,
};

/// Routes a client may call without a token: the API edge still guards them.
pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(register))
        .routes(routes!(login))
        .routes(routes!(refresh))
        .routes(routes!(logout))
        .routes(routes!(logout_all))
        .routes(routes!(list_sessions))
        .routes(routes!(revoke_session))
        .routes(routes!(change_password))
        .routes(routes!(jwks))
        .routes(routes!(list_roles))
        .routes(routes!(assign_role, revoke_role))
}

fn client(upstreams: &Upstreams) -> AuthServiceClient<platform::grpc::TracedChannel> {
    AuthServiceClient::new(upstreams.auth.channel.clone())
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
struct RegisterBody {
    email: String,
    password: String,
    display_name: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct RegisterReply {
    user_id: String,
}

#[utoipa::path(
    post, path = "/api/v1/auth/register", tag = "auth",
    request_body = RegisterBody,
    responses((status = 201, description = "The account exists", body = RegisterReply))
)]
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

#[derive(Debug, Deserialize, utoipa::ToSchema)]
struct LoginBody {
    email: String,
    password: String,
    #[serde(default)]
    device_name: Option<String>,
}

/// The login and refresh answer: minimal, the rest loads from the profile on demand.
#[derive(Debug, Serialize, utoipa::ToSchema)]
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

#[utoipa::path(
    post, path = "/api/v1/auth/login", tag = "auth",
    request_body = LoginBody,
    responses((status = 200, description = "A new session's tokens (`Cache-Control: no-store`)", body = TokenReply))
)]
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

#[derive(Debug, Deserialize, utoipa::ToSchema)]
struct RefreshBody {
    refresh_token: String,
}

#[utoipa::path(
    post, path = "/api/v1/auth/refresh", tag = "auth",
    request_body = RefreshBody,
    responses((status = 200, description = "Rotated tokens (`Cache-Control: no-store`)", body = TokenReply))
)]
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

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
struct LogoutBody {
    #[serde(default)]
    refresh_token: Option<String>,
}

/// Ends this session: by the access token, or by a refresh token in the body when the access
/// token has expired. The body is optional.
#[utoipa::path(
    post, path = "/api/v1/auth/logout", tag = "auth",
    request_body(content = Option<LogoutBody>, description = "Optional: the refresh token, when the access token has expired"),
    responses((status = 204, description = "The session is over")),
    security((), ("bearer" = []))
)]
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

#[utoipa::path(
    post, path = "/api/v1/auth/logout-all", tag = "auth",
    responses((status = 204, description = "Every session of the caller is over")),
    security(("bearer" = []))
)]
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

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct ListSessionsQuery {
    #[serde(default)]
    limit: Option<i32>,
    #[serde(default)]
    cursor: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
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

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct SessionsReply {
    sessions: Vec<SessionItem>,
    next_cursor: Option<String>,
}

#[utoipa::path(
    get, path = "/api/v1/auth/sessions", tag = "auth",
    params(ListSessionsQuery),
    responses((status = 200, description = "The caller's sessions, a page", body = SessionsReply)),
    security(("bearer" = []))
)]
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

#[utoipa::path(
    delete, path = "/api/v1/auth/sessions/{id}", tag = "auth",
    params(("id" = String, Path, description = "The session id")),
    responses((status = 204, description = "The session is over")),
    security(("bearer" = []))
)]
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

#[derive(Debug, Deserialize, utoipa::ToSchema)]
struct ChangePasswordBody {
    current_password: String,
    new_password: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct ChangePasswordReply {
    /// Other sessions ended by the change.
    revoked_sessions: i32,
}

#[utoipa::path(
    post, path = "/api/v1/auth/password", tag = "auth",
    request_body = ChangePasswordBody,
    responses((status = 200, description = "Changed; the other sessions are ended", body = ChangePasswordReply)),
    security(("bearer" = []))
)]
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

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct JwkItem {
    kty: String,
    crv: String,
    x: String,
    kid: String,
    alg: String,
    #[serde(rename = "use")]
    use_: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct JwksReply {
    keys: Vec<JwkItem>,
}

#[utoipa::path(
    get, path = "/.well-known/jwks.json", tag = "auth",
    responses((status = 200, description = "The public keys that verify access tokens", body = JwksReply))
)]
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

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct RoleItem {
    name: String,
    description: String,
    permissions: Vec<String>,
    created_at: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct RolesReply {
    roles: Vec<RoleItem>,
}

#[utoipa::path(
    get, path = "/api/v1/admin/roles", tag = "admin",
    responses((status = 200, description = "Every role", body = RolesReply)),
    security(("bearer" = []))
)]
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
#[utoipa::path(
    put, path = "/api/v1/admin/users/{id}/roles/{role}", tag = "admin",
    params(("id" = String, Path, description = "The user id"), ("role" = String, Path, description = "The role name")),
    responses((status = 204, description = "The user has the role")),
    security(("bearer" = []))
)]
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

#[utoipa::path(
    delete, path = "/api/v1/admin/users/{id}/roles/{role}", tag = "admin",
    params(("id" = String, Path, description = "The user id"), ("role" = String, Path, description = "The role name")),
    responses((status = 204, description = "The user no longer has the role")),
    security(("bearer" = []))
)]
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
