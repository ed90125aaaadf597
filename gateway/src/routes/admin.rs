//! `GET /admin/db-pool-status`: each service's Postgres and Redis pools as one replica of it
//! reports them (`GetPoolStatus`), for administrators.

use axum::{Json, extract::State, http::HeaderMap};
use proto::{
    auth::v1::auth_service_client::AuthServiceClient,
    notes::v1::notes_service_client::NotesServiceClient,
    profile::v1::profile_service_client::ProfileServiceClient,
};
use serde::Serialize;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::forward;
use crate::{
    AppState,
    context::{Admin, Deadline, RequestContext},
    error::{ApiError, ErrorCode},
};

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(db_pool_status))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct PoolStatusReply {
    services: Vec<ServicePools>,
}

/// One service's answer, or the code of its failure (the others are still shown).
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct ServicePools {
    service: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    instance: Option<String>,
    pools: Vec<PoolItem>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'static str>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct PoolItem {
    /// `postgres` or `redis`.
    name: String,
    max_size: i32,
    size: i32,
    idle: i32,
    in_use: i32,
    waiters: i32,
}

/// The three contracts each have their own pool message; one shape here.
macro_rules! pool_items {
    ($pools:expr) => {
        $pools
            .into_iter()
            .map(|p| PoolItem {
                name: p.name,
                max_size: p.max_size,
                size: p.size,
                idle: p.idle,
                in_use: p.in_use,
                waiters: p.waiters,
            })
            .collect()
    };
}

#[utoipa::path(
    get, path = "/admin/db-pool-status", tag = "admin",
    responses((status = 200, description = "Each service's pools, or the code of its failure", body = PoolStatusReply)),
    security(("bearer" = []))
)]
async fn db_pool_status(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _admin: Admin,
    headers: HeaderMap,
) -> Result<Json<PoolStatusReply>, ApiError> {
    let upstreams = &state.upstreams;
    let (auth, profile, notes) = tokio::join!(
        async {
            let reply = AuthServiceClient::new(upstreams.auth.channel.clone())
                .get_pool_status(forward(&context, deadline, &headers, Default::default())?)
                .await;
            Ok::<_, ApiError>(reply.map(|r| {
                let r = r.into_inner();
                (r.instance, pool_items!(r.pools))
            }))
        },
        async {
            let reply = ProfileServiceClient::new(upstreams.profile.channel.clone())
                .get_pool_status(forward(&context, deadline, &headers, Default::default())?)
                .await;
            Ok::<_, ApiError>(reply.map(|r| {
                let r = r.into_inner();
                (r.instance, pool_items!(r.pools))
            }))
        },
        async {
            let reply = NotesServiceClient::new(upstreams.notes.channel.clone())
                .get_pool_status(forward(&context, deadline, &headers, Default::default())?)
                .await;
            Ok::<_, ApiError>(reply.map(|r| {
                let r = r.into_inner();
                (r.instance, pool_items!(r.pools))
            }))
        },
    );
    let services = [("auth", auth?), ("profile", profile?), ("notes", notes?)]
        .into_iter()
        .map(|(service, reply)| match reply {
            Ok((instance, pools)) => ServicePools {
                service,
                instance: Some(instance),
                pools,
                error: None,
            },
            Err(status) => {
                tracing::warn!(service, code = ?status.code(), "pool status unavailable");
                ServicePools {
                    service,
                    instance: None,
                    pools: Vec::new(),
                    error: Some(ErrorCode::for_grpc(status.code()).as_str()),
                }
            }
        })
        .collect();
    Ok(Json(PoolStatusReply { services }))
}
