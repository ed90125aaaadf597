//! `/api/v1/auth/profile*`, the catalogs, plans and the admin routes of
//! `profile.v1.ProfileService`. HTTP bodies are their own types, converted here. Every route
//! verifies the token at the edge ([`SignedIn`], [`Admin`]) and forwards it: profile verifies
//! it again.

use axum::{
    extract::{Path, Query, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::IntoResponse,
};
use proto::profile::v1::{self as pb, profile_service_client::ProfileServiceClient};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::{forward as call, rfc3339};
use crate::{
    AppState,
    context::{Admin, Deadline, RequestContext, SignedIn},
    error::{ApiError, ErrorCode, FieldError},
    extract::ApiJson,
};

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(get_profile, update_profile))
        .routes(routes!(profile_data))
        .routes(routes!(profession_types))
        .routes(routes!(business_categories))
        .routes(routes!(plans))
        .routes(routes!(set_subscription))
        .routes(routes!(admin_plans, create_plan))
        .routes(routes!(delete_plan, update_plan))
        .routes(routes!(admin_profession_types, create_profession_type))
        .routes(routes!(delete_profession_type, update_profession_type))
        .routes(routes!(admin_business_categories, create_business_category))
        .routes(routes!(delete_business_category, update_business_category))
        .routes(routes!(warm_cache))
}

type Client = ProfileServiceClient<platform::grpc::TracedChannel>;

fn client(state: &AppState) -> Client {
    ProfileServiceClient::new(state.upstreams.profile.channel.clone())
}

// ---------------------------------------------------------------------------
// The caller's profile
// ---------------------------------------------------------------------------

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct CatalogRefBody {
    id: String,
    name: String,
}

impl From<pb::CatalogRef> for CatalogRefBody {
    fn from(r: pb::CatalogRef) -> Self {
        Self {
            id: r.id,
            name: r.name,
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct SubscriptionBody {
    plan_id: String,
    status: &'static str,
    plan_name: String,
    features: Vec<String>,
    ai_daily_limit: i32,
    end_date: Option<String>,
    is_customer: bool,
    is_expired: bool,
}

fn status_name(status: i32) -> &'static str {
    match pb::SubscriptionStatus::try_from(status) {
        Ok(pb::SubscriptionStatus::Active) => "active",
        Ok(pb::SubscriptionStatus::Trialing) => "trialing",
        Ok(pb::SubscriptionStatus::PastDue) => "past_due",
        Ok(pb::SubscriptionStatus::Canceled) => "canceled",
        Ok(pb::SubscriptionStatus::Expired) => "expired",
        _ => "unspecified",
    }
}

impl From<pb::Subscription> for SubscriptionBody {
    fn from(s: pb::Subscription) -> Self {
        Self {
            plan_id: s.plan_id,
            status: status_name(s.status),
            plan_name: s.plan_name,
            features: s.features,
            ai_daily_limit: s.ai_daily_limit,
            end_date: rfc3339(s.end_date),
            is_customer: s.is_customer,
            is_expired: s.is_expired,
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct ProfileBody {
    user_id: String,
    email: String,
    display_name: String,
    bio: String,
    avatar_url: String,
    profession_type: Option<CatalogRefBody>,
    business_category: Option<CatalogRefBody>,
    locale: String,
    created_at: Option<String>,
    updated_at: Option<String>,
    subscription: Option<SubscriptionBody>,
    roles: Vec<String>,
    etag: String,
}

impl From<pb::Profile> for ProfileBody {
    fn from(p: pb::Profile) -> Self {
        Self {
            user_id: p.user_id,
            email: p.email,
            display_name: p.display_name,
            bio: p.bio,
            avatar_url: p.avatar_url,
            profession_type: p.profession_type.map(Into::into),
            business_category: p.business_category.map(Into::into),
            locale: p.locale,
            created_at: rfc3339(p.created_at),
            updated_at: rfc3339(p.updated_at),
            subscription: p.subscription.map(Into::into),
            roles: p.roles,
            etag: p.etag,
        }
    }
}

/// The profile with its `ETag` (quoted, strong). Per-user data: no shared cache may keep it.
fn profile_response(profile: Option<pb::Profile>) -> Result<impl IntoResponse, ApiError> {
    let profile = profile.ok_or_else(|| ApiError::internal("profile missing in the answer"))?;
    let etag = HeaderValue::from_str(&format!("\"{}\"", profile.etag))
        .map_err(|e| ApiError::internal(format!("etag is not a header value: {e}")))?;
    Ok((
        [
            (header::ETAG, etag),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("private, no-cache"),
            ),
        ],
        ApiJson(ProfileBody::from(profile)),
    ))
}

#[utoipa::path(
    get, path = "/api/v1/auth/profile", tag = "profile",
    responses((status = 200, description = "The caller's profile, with its `ETag`", body = ProfileBody,
        headers(("ETag" = String, description = "The profile's version")))),
    security(("bearer" = []))
)]
async fn get_profile(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _signed_in: SignedIn,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    let request = call(&context, deadline, &headers, pb::GetMyProfileRequest {})?;
    let reply = client(&state).get_my_profile(request).await?.into_inner();
    profile_response(reply.profile)
}

/// The editable fields, as a PATCH body names them.
const EDITABLE: [&str; 6] = [
    "display_name",
    "bio",
    "avatar_url",
    "profession_type_id",
    "business_category_id",
    "locale",
];

/// `If-Match`: one strong entity tag (its opaque part), `*` (no condition), or absent.
fn expected_etag(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| ApiError::new(ErrorCode::BadRequest, "If-Match is not readable text"))?
        .trim();
    if value == "*" {
        return Ok(None);
    }
    if value.contains(',') {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            "If-Match takes one entity tag here",
        ));
    }
    // A weak tag never matches under If-Match's strong comparison: keep it whole, so the
    // service answers 412.
    let opaque = value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value);
    Ok(Some(opaque.to_owned()))
}

/// A JSON merge-style PATCH: each key present is a field to change (`null` clears it). Keys
/// that are not editable are passed on in the field mask, so the service names them.
fn profile_update(body: Map<String, Value>) -> Result<pb::UpdateMyProfileRequest, ApiError> {
    let mut update = pb::ProfileUpdate::default();
    let mut paths = Vec::with_capacity(body.len());
    let mut errors = Vec::new();
    for (key, value) in body {
        if EDITABLE.contains(&key.as_str()) {
            let text = match value {
                Value::Null => None,
                Value::String(s) => Some(s),
                _ => {
                    errors.push(FieldError::new(
                        key.as_str(),
                        "INVALID_TYPE",
                        "expected a string or null",
                    ));
                    continue;
                }
            };
            match key.as_str() {
                "display_name" => update.display_name = text,
                "bio" => update.bio = text,
                "avatar_url" => update.avatar_url = text,
                "profession_type_id" => update.profession_type_id = text,
                "business_category_id" => update.business_category_id = text,
                _ => update.locale = text,
            }
        }
        paths.push(key);
    }
    if !errors.is_empty() {
        return Err(ApiError::from_code(ErrorCode::ValidationFailed).with_field_errors(errors));
    }
    if paths.is_empty() {
        return Err(ApiError::new(
            ErrorCode::ValidationFailed,
            "name at least one field to change",
        )
        .with_field_errors(vec![FieldError::new("", "EMPTY", "no field to change")]));
    }
    Ok(pb::UpdateMyProfileRequest {
        profile: Some(update),
        update_mask: Some(prost_types::FieldMask { paths }),
        expected_etag: None,
    })
}

#[utoipa::path(
    patch, path = "/api/v1/auth/profile", tag = "profile",
    params(("If-Match" = Option<String>, Header, description = "The profile's ETag: the change applies only to that version (412 otherwise)")),
    request_body(content = Object, description = "The fields to change, each a string or `null` to clear it: `display_name`, `bio`, `avatar_url`, `profession_type_id`, `business_category_id`, `locale`"),
    responses((status = 200, description = "The changed profile, with its new `ETag`", body = ProfileBody,
        headers(("ETag" = String, description = "The profile's version")))),
    security(("bearer" = []))
)]
async fn update_profile(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _signed_in: SignedIn,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Map<String, Value>>,
) -> Result<impl IntoResponse, ApiError> {
    let mut message = profile_update(body)?;
    message.expected_etag = expected_etag(&headers)?;
    let request = call(&context, deadline, &headers, message)?;
    let reply = client(&state)
        .update_my_profile(request)
        .await?
        .into_inner();
    profile_response(reply.profile)
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct FrameBody {
    id: String,
    name: String,
    image_url: String,
    business_category: Option<CatalogRefBody>,
    sort_order: i32,
    created_at: Option<String>,
    updated_at: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct ProfileDataBody {
    customer_frames: Vec<FrameBody>,
}

#[utoipa::path(
    get, path = "/api/v1/auth/profile-data", tag = "profile",
    responses((status = 200, description = "What the caller's profile screens show", body = ProfileDataBody)),
    security(("bearer" = []))
)]
async fn profile_data(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _signed_in: SignedIn,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    let request = call(&context, deadline, &headers, pb::GetProfileDataRequest {})?;
    let reply = client(&state).get_profile_data(request).await?.into_inner();
    Ok((
        [(header::CACHE_CONTROL, "private, no-cache")],
        ApiJson(ProfileDataBody {
            customer_frames: reply
                .customer_frames
                .into_iter()
                .map(|f| FrameBody {
                    id: f.frame_id,
                    name: f.name,
                    image_url: f.image_url,
                    business_category: f.business_category.map(Into::into),
                    sort_order: f.sort_order,
                    created_at: rfc3339(f.created_at),
                    updated_at: rfc3339(f.updated_at),
                })
                .collect(),
        }),
    ))
}

// ---------------------------------------------------------------------------
// Catalogs and plans
// ---------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct ListQuery {
    #[serde(default)]
    limit: Option<i32>,
    #[serde(default)]
    cursor: Option<String>,
}

fn list_query(
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<ListQuery, ApiError> {
    query.map(|Query(q)| q).map_err(|e| {
        ApiError::new(ErrorCode::BadRequest, "the query string is malformed")
            .with_internal(e.body_text())
    })
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct CatalogEntryBody {
    id: String,
    name: String,
    sort_order: i32,
    archived: bool,
    created_at: Option<String>,
    updated_at: Option<String>,
}

impl From<pb::ProfessionType> for CatalogEntryBody {
    fn from(e: pb::ProfessionType) -> Self {
        Self {
            id: e.profession_type_id,
            name: e.name,
            sort_order: e.sort_order,
            archived: e.archived,
            created_at: rfc3339(e.created_at),
            updated_at: rfc3339(e.updated_at),
        }
    }
}

impl From<pb::BusinessCategory> for CatalogEntryBody {
    fn from(e: pb::BusinessCategory) -> Self {
        Self {
            id: e.business_category_id,
            name: e.name,
            sort_order: e.sort_order,
            archived: e.archived,
            created_at: rfc3339(e.created_at),
            updated_at: rfc3339(e.updated_at),
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct ProfessionTypesBody {
    profession_types: Vec<CatalogEntryBody>,
    next_cursor: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct BusinessCategoriesBody {
    business_categories: Vec<CatalogEntryBody>,
    next_cursor: Option<String>,
}

fn cursor(token: String) -> Option<String> {
    Some(token).filter(|t| !t.is_empty())
}

async fn list_profession_types(
    state: &AppState,
    context: &RequestContext,
    deadline: Deadline,
    headers: &HeaderMap,
    query: ListQuery,
    show_archived: bool,
) -> Result<ApiJson<ProfessionTypesBody>, ApiError> {
    let request = call(
        context,
        deadline,
        headers,
        pb::ListProfessionTypesRequest {
            page_size: query.limit.unwrap_or(0),
            page_token: query.cursor.unwrap_or_default(),
            show_archived,
        },
    )?;
    let reply = client(state)
        .list_profession_types(request)
        .await?
        .into_inner();
    Ok(ApiJson(ProfessionTypesBody {
        profession_types: reply.profession_types.into_iter().map(Into::into).collect(),
        next_cursor: cursor(reply.next_page_token),
    }))
}

async fn list_business_categories(
    state: &AppState,
    context: &RequestContext,
    deadline: Deadline,
    headers: &HeaderMap,
    query: ListQuery,
    show_archived: bool,
) -> Result<ApiJson<BusinessCategoriesBody>, ApiError> {
    let request = call(
        context,
        deadline,
        headers,
        pb::ListBusinessCategoriesRequest {
            page_size: query.limit.unwrap_or(0),
            page_token: query.cursor.unwrap_or_default(),
            show_archived,
        },
    )?;
    let reply = client(state)
        .list_business_categories(request)
        .await?
        .into_inner();
    Ok(ApiJson(BusinessCategoriesBody {
        business_categories: reply
            .business_categories
            .into_iter()
            .map(Into::into)
            .collect(),
        next_cursor: cursor(reply.next_page_token),
    }))
}

/// Catalogs change rarely and are the same for everyone signed in: clients may keep them
/// briefly.
const CATALOG_CACHE_CONTROL: &str = "private, max-age=300";

#[utoipa::path(
    get, path = "/api/v1/auth/profession-types", tag = "profile",
    params(ListQuery),
    responses((status = 200, description = "The profession types, a page", body = ProfessionTypesBody)),
    security(("bearer" = []))
)]
async fn profession_types(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _signed_in: SignedIn,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let list = list_profession_types(
        &state,
        &context,
        deadline,
        &headers,
        list_query(query)?,
        false,
    )
    .await?;
    Ok(([(header::CACHE_CONTROL, CATALOG_CACHE_CONTROL)], list))
}

#[utoipa::path(
    get, path = "/api/v1/auth/business-categories", tag = "profile",
    params(ListQuery),
    responses((status = 200, description = "The business categories, a page", body = BusinessCategoriesBody)),
    security(("bearer" = []))
)]
async fn business_categories(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _signed_in: SignedIn,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let list = list_business_categories(
        &state,
        &context,
        deadline,
        &headers,
        list_query(query)?,
        false,
    )
    .await?;
    Ok(([(header::CACHE_CONTROL, CATALOG_CACHE_CONTROL)], list))
}

#[utoipa::path(
    get, path = "/api/v1/admin/profession-types", tag = "admin",
    params(ListQuery),
    responses((status = 200, description = "Every profession type, archived ones included, a page", body = ProfessionTypesBody)),
    security(("bearer" = []))
)]
async fn admin_profession_types(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _admin: Admin,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<ApiJson<ProfessionTypesBody>, ApiError> {
    list_profession_types(
        &state,
        &context,
        deadline,
        &headers,
        list_query(query)?,
        true,
    )
    .await
}

#[utoipa::path(
    get, path = "/api/v1/admin/business-categories", tag = "admin",
    params(ListQuery),
    responses((status = 200, description = "Every business category, archived ones included, a page", body = BusinessCategoriesBody)),
    security(("bearer" = []))
)]
async fn admin_business_categories(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _admin: Admin,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<ApiJson<BusinessCategoriesBody>, ApiError> {
    list_business_categories(
        &state,
        &context,
        deadline,
        &headers,
        list_query(query)?,
        true,
    )
    .await
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct PlanBody {
    id: String,
    name: String,
    description: String,
    features: Vec<String>,
    ai_daily_limit: i32,
    is_paid: bool,
    sort_order: i32,
    archived: bool,
    created_at: Option<String>,
    updated_at: Option<String>,
}

impl From<pb::Plan> for PlanBody {
    fn from(p: pb::Plan) -> Self {
        Self {
            id: p.plan_id,
            name: p.name,
            description: p.description,
            features: p.features,
            ai_daily_limit: p.ai_daily_limit,
            is_paid: p.is_paid,
            sort_order: p.sort_order,
            archived: p.archived,
            created_at: rfc3339(p.created_at),
            updated_at: rfc3339(p.updated_at),
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct PlansBody {
    plans: Vec<PlanBody>,
    next_cursor: Option<String>,
}

async fn list_plans(
    state: &AppState,
    context: &RequestContext,
    deadline: Deadline,
    headers: &HeaderMap,
    query: ListQuery,
    show_archived: bool,
) -> Result<ApiJson<PlansBody>, ApiError> {
    let request = call(
        context,
        deadline,
        headers,
        pb::ListPlansRequest {
            page_size: query.limit.unwrap_or(0),
            page_token: query.cursor.unwrap_or_default(),
            show_archived,
        },
    )?;
    let reply = client(state).list_plans(request).await?.into_inner();
    Ok(ApiJson(PlansBody {
        plans: reply.plans.into_iter().map(Into::into).collect(),
        next_cursor: cursor(reply.next_page_token),
    }))
}

#[utoipa::path(
    get, path = "/api/v1/plans", tag = "profile",
    params(ListQuery),
    responses((status = 200, description = "The plans on offer, a page", body = PlansBody)),
    security(("bearer" = []))
)]
async fn plans(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _signed_in: SignedIn,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let list = list_plans(
        &state,
        &context,
        deadline,
        &headers,
        list_query(query)?,
        false,
    )
    .await?;
    Ok(([(header::CACHE_CONTROL, CATALOG_CACHE_CONTROL)], list))
}

#[utoipa::path(
    get, path = "/api/v1/admin/plans", tag = "admin",
    params(ListQuery),
    responses((status = 200, description = "Every plan, archived ones included, a page", body = PlansBody)),
    security(("bearer" = []))
)]
async fn admin_plans(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _admin: Admin,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<ApiJson<PlansBody>, ApiError> {
    list_plans(
        &state,
        &context,
        deadline,
        &headers,
        list_query(query)?,
        true,
    )
    .await
}

// ---------------------------------------------------------------------------
// Admin writes
// ---------------------------------------------------------------------------

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct SubscriptionRequestBody {
    plan_id: String,
    /// `active` (default), `trialing`, `past_due`, `canceled`, `expired`.
    #[serde(default)]
    status: Option<String>,
    /// RFC 3339; absent or null = open-ended.
    #[serde(default)]
    end_date: Option<String>,
}

fn parse_status(status: Option<&str>) -> Result<pb::SubscriptionStatus, ApiError> {
    Ok(match status {
        None | Some("active") => pb::SubscriptionStatus::Active,
        Some("trialing") => pb::SubscriptionStatus::Trialing,
        Some("past_due") => pb::SubscriptionStatus::PastDue,
        Some("canceled") => pb::SubscriptionStatus::Canceled,
        Some("expired") => pb::SubscriptionStatus::Expired,
        Some(_) => {
            return Err(
                ApiError::from_code(ErrorCode::ValidationFailed).with_field_errors(vec![
                    FieldError::new(
                        "status",
                        "INVALID_VALUE",
                        "one of active, trialing, past_due, canceled, expired",
                    ),
                ]),
            );
        }
    })
}

fn parse_timestamp(field: &str, text: &str) -> Result<prost_types::Timestamp, ApiError> {
    let at = chrono::DateTime::parse_from_rfc3339(text).map_err(|_| {
        ApiError::from_code(ErrorCode::ValidationFailed).with_field_errors(vec![FieldError::new(
            field,
            "INVALID_VALUE",
            "an RFC 3339 timestamp, e.g. 2027-01-31T00:00:00Z",
        )])
    })?;
    Ok(prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: i32::try_from(at.timestamp_subsec_nanos()).unwrap_or(0),
    })
}

#[utoipa::path(
    put, path = "/api/v1/admin/users/{id}/subscription", tag = "admin",
    params(("id" = String, Path, description = "The user id")),
    request_body = SubscriptionRequestBody,
    responses((status = 200, description = "The user's subscription now", body = SubscriptionBody)),
    security(("bearer" = []))
)]
async fn set_subscription(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _admin: Admin,
    headers: HeaderMap,
    Path(user_id): Path<String>,
    ApiJson(body): ApiJson<SubscriptionRequestBody>,
) -> Result<ApiJson<SubscriptionBody>, ApiError> {
    let end_date = body
        .end_date
        .as_deref()
        .map(|t| parse_timestamp("end_date", t))
        .transpose()?;
    let request = call(
        &context,
        deadline,
        &headers,
        pb::SetSubscriptionRequest {
            user_id,
            plan_id: body.plan_id,
            status: parse_status(body.status.as_deref())?.into(),
            end_date,
        },
    )?;
    let reply = client(&state).set_subscription(request).await?.into_inner();
    let subscription = reply
        .subscription
        .ok_or_else(|| ApiError::internal("subscription missing in the answer"))?;
    Ok(ApiJson(subscription.into()))
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct PlanRequestBody {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    features: Option<Vec<String>>,
    #[serde(default)]
    ai_daily_limit: Option<i32>,
    #[serde(default)]
    is_paid: Option<bool>,
    #[serde(default)]
    sort_order: Option<i32>,
}

impl PlanRequestBody {
    /// The plan message and the mask of the fields given.
    fn into_plan(self, id: String) -> (pb::Plan, Vec<String>) {
        let mut paths = Vec::new();
        let mut mark = |name: &str, given: bool| {
            if given {
                paths.push(name.to_owned());
            }
        };
        mark("name", self.name.is_some());
        mark("description", self.description.is_some());
        mark("features", self.features.is_some());
        mark("ai_daily_limit", self.ai_daily_limit.is_some());
        mark("is_paid", self.is_paid.is_some());
        mark("sort_order", self.sort_order.is_some());
        let plan = pb::Plan {
            plan_id: id,
            name: self.name.unwrap_or_default(),
            description: self.description.unwrap_or_default(),
            features: self.features.unwrap_or_default(),
            ai_daily_limit: self.ai_daily_limit.unwrap_or_default(),
            is_paid: self.is_paid.unwrap_or_default(),
            sort_order: self.sort_order.unwrap_or_default(),
            ..Default::default()
        };
        (plan, paths)
    }
}

#[utoipa::path(
    post, path = "/api/v1/admin/plans", tag = "admin",
    request_body = PlanRequestBody,
    responses((status = 201, description = "The new plan", body = PlanBody)),
    security(("bearer" = []))
)]
async fn create_plan(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _admin: Admin,
    headers: HeaderMap,
    ApiJson(mut body): ApiJson<PlanRequestBody>,
) -> Result<impl IntoResponse, ApiError> {
    let id = body.id.take().unwrap_or_default();
    let (plan, _) = body.into_plan(id);
    let request = call(
        &context,
        deadline,
        &headers,
        pb::CreatePlanRequest { plan: Some(plan) },
    )?;
    let reply = client(&state).create_plan(request).await?.into_inner();
    let plan = reply
        .plan
        .ok_or_else(|| ApiError::internal("plan missing in the answer"))?;
    Ok((StatusCode::CREATED, ApiJson(PlanBody::from(plan))))
}

#[utoipa::path(
    patch, path = "/api/v1/admin/plans/{id}", tag = "admin",
    params(("id" = String, Path, description = "The plan id")),
    request_body = PlanRequestBody,
    responses((status = 200, description = "The changed plan", body = PlanBody)),
    security(("bearer" = []))
)]
async fn update_plan(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _admin: Admin,
    headers: HeaderMap,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<PlanRequestBody>,
) -> Result<ApiJson<PlanBody>, ApiError> {
    if body.id.is_some() {
        return Err(
            ApiError::from_code(ErrorCode::ValidationFailed).with_field_errors(vec![
                FieldError::new("id", "READ_ONLY", "a plan's id cannot change"),
            ]),
        );
    }
    let (plan, paths) = body.into_plan(id);
    let request = call(
        &context,
        deadline,
        &headers,
        pb::UpdatePlanRequest {
            plan: Some(plan),
            update_mask: Some(prost_types::FieldMask { paths }),
        },
    )?;
    let reply = client(&state).update_plan(request).await?.into_inner();
    let plan = reply
        .plan
        .ok_or_else(|| ApiError::internal("plan missing in the answer"))?;
    Ok(ApiJson(plan.into()))
}

#[utoipa::path(
    delete, path = "/api/v1/admin/plans/{id}", tag = "admin",
    params(("id" = String, Path, description = "The plan id")),
    responses((status = 204, description = "The plan is archived")),
    security(("bearer" = []))
)]
async fn delete_plan(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _admin: Admin,
    headers: HeaderMap,
    Path(plan_id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let request = call(
        &context,
        deadline,
        &headers,
        pb::DeletePlanRequest { plan_id },
    )?;
    client(&state).delete_plan(request).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct CatalogEntryRequestBody {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    sort_order: Option<i32>,
}

impl CatalogEntryRequestBody {
    fn paths(&self) -> Vec<String> {
        let mut paths = Vec::new();
        if self.name.is_some() {
            paths.push("name".to_owned());
        }
        if self.sort_order.is_some() {
            paths.push("sort_order".to_owned());
        }
        paths
    }
}

#[utoipa::path(
    post, path = "/api/v1/admin/profession-types", tag = "admin",
    request_body = CatalogEntryRequestBody,
    responses((status = 201, description = "The new profession type", body = CatalogEntryBody)),
    security(("bearer" = []))
)]
async fn create_profession_type(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _admin: Admin,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CatalogEntryRequestBody>,
) -> Result<impl IntoResponse, ApiError> {
    let request = call(
        &context,
        deadline,
        &headers,
        pb::CreateProfessionTypeRequest {
            profession_type: Some(pb::ProfessionType {
                name: body.name.unwrap_or_default(),
                sort_order: body.sort_order.unwrap_or_default(),
                ..Default::default()
            }),
        },
    )?;
    let reply = client(&state)
        .create_profession_type(request)
        .await?
        .into_inner();
    let entry = reply
        .profession_type
        .ok_or_else(|| ApiError::internal("entry missing in the answer"))?;
    Ok((StatusCode::CREATED, ApiJson(CatalogEntryBody::from(entry))))
}

#[utoipa::path(
    patch, path = "/api/v1/admin/profession-types/{id}", tag = "admin",
    params(("id" = String, Path, description = "The profession type id")),
    request_body = CatalogEntryRequestBody,
    responses((status = 200, description = "The changed profession type", body = CatalogEntryBody)),
    security(("bearer" = []))
)]
async fn update_profession_type(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _admin: Admin,
    headers: HeaderMap,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<CatalogEntryRequestBody>,
) -> Result<ApiJson<CatalogEntryBody>, ApiError> {
    let paths = body.paths();
    let request = call(
        &context,
        deadline,
        &headers,
        pb::UpdateProfessionTypeRequest {
            profession_type: Some(pb::ProfessionType {
                profession_type_id: id,
                name: body.name.unwrap_or_default(),
                sort_order: body.sort_order.unwrap_or_default(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask { paths }),
        },
    )?;
    let reply = client(&state)
        .update_profession_type(request)
        .await?
        .into_inner();
    let entry = reply
        .profession_type
        .ok_or_else(|| ApiError::internal("entry missing in the answer"))?;
    Ok(ApiJson(entry.into()))
}

#[utoipa::path(
    delete, path = "/api/v1/admin/profession-types/{id}", tag = "admin",
    params(("id" = String, Path, description = "The profession type id")),
    responses((status = 204, description = "The profession type is archived")),
    security(("bearer" = []))
)]
async fn delete_profession_type(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _admin: Admin,
    headers: HeaderMap,
    Path(profession_type_id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let request = call(
        &context,
        deadline,
        &headers,
        pb::DeleteProfessionTypeRequest { profession_type_id },
    )?;
    client(&state).delete_profession_type(request).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    post, path = "/api/v1/admin/business-categories", tag = "admin",
    request_body = CatalogEntryRequestBody,
    responses((status = 201, description = "The new business category", body = CatalogEntryBody)),
    security(("bearer" = []))
)]
async fn create_business_category(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _admin: Admin,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CatalogEntryRequestBody>,
) -> Result<impl IntoResponse, ApiError> {
    let request = call(
        &context,
        deadline,
        &headers,
        pb::CreateBusinessCategoryRequest {
            business_category: Some(pb::BusinessCategory {
                name: body.name.unwrap_or_default(),
                sort_order: body.sort_order.unwrap_or_default(),
                ..Default::default()
            }),
        },
    )?;
    let reply = client(&state)
        .create_business_category(request)
        .await?
        .into_inner();
    let entry = reply
        .business_category
        .ok_or_else(|| ApiError::internal("entry missing in the answer"))?;
    Ok((StatusCode::CREATED, ApiJson(CatalogEntryBody::from(entry))))
}

#[utoipa::path(
    patch, path = "/api/v1/admin/business-categories/{id}", tag = "admin",
    params(("id" = String, Path, description = "The business category id")),
    request_body = CatalogEntryRequestBody,
    responses((status = 200, description = "The changed business category", body = CatalogEntryBody)),
    security(("bearer" = []))
)]
async fn update_business_category(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _admin: Admin,
    headers: HeaderMap,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<CatalogEntryRequestBody>,
) -> Result<ApiJson<CatalogEntryBody>, ApiError> {
    let paths = body.paths();
    let request = call(
        &context,
        deadline,
        &headers,
        pb::UpdateBusinessCategoryRequest {
            business_category: Some(pb::BusinessCategory {
                business_category_id: id,
                name: body.name.unwrap_or_default(),
                sort_order: body.sort_order.unwrap_or_default(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask { paths }),
        },
    )?;
    let reply = client(&state)
        .update_business_category(request)
        .await?
        .into_inner();
    let entry = reply
        .business_category
        .ok_or_else(|| ApiError::internal("entry missing in the answer"))?;
    Ok(ApiJson(entry.into()))
}

#[utoipa::path(
    delete, path = "/api/v1/admin/business-categories/{id}", tag = "admin",
    params(("id" = String, Path, description = "The business category id")),
    responses((status = 204, description = "The business category is archived")),
    security(("bearer" = []))
)]
async fn delete_business_category(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _admin: Admin,
    headers: HeaderMap,
    Path(business_category_id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let request = call(
        &context,
        deadline,
        &headers,
        pb::DeleteBusinessCategoryRequest {
            business_category_id,
        },
    )?;
    client(&state).delete_business_category(request).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct WarmBody {
    #[serde(default)]
    active_within_seconds: Option<i32>,
    #[serde(default)]
    max_per_second: Option<i32>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct WarmReply {
    scheduled: i32,
}

/// Starts a cache warm-up on the profile replica that takes the call (202: it runs on).
#[utoipa::path(
    post, path = "/api/v1/admin/cache/warm", tag = "admin",
    request_body(content = Option<WarmBody>, description = "Optional: which profiles to warm and how fast"),
    responses((status = 202, description = "The warm-up runs on", body = WarmReply)),
    security(("bearer" = []))
)]
async fn warm_cache(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _admin: Admin,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let body: WarmBody = if body.is_empty() {
        WarmBody::default()
    } else {
        crate::extract::parse_json(&body)?
    };
    let request = call(
        &context,
        deadline,
        &headers,
        pb::WarmCacheRequest {
            active_within_seconds: body.active_within_seconds.unwrap_or(0),
            max_per_second: body.max_per_second.unwrap_or(0),
        },
    )?;
    let reply = client(&state).warm_cache(request).await?.into_inner();
    Ok((
        StatusCode::ACCEPTED,
        ApiJson(WarmReply {
            scheduled: reply.scheduled_count,
        }),
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: fail loudly")]

    use super::*;

    #[test]
    fn if_match_takes_one_strong_tag_or_a_star() {
        let with = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::IF_MATCH, HeaderValue::from_static(value));
            expected_etag(&headers)
        };
        assert_eq!(with("\"3-abc\"").unwrap(), Some("3-abc".to_owned()));
        assert_eq!(with("*").unwrap(), None);
        assert_eq!(with("W/\"3-abc\"").unwrap(), Some("W/\"3-abc\"".to_owned()));
        assert!(with("\"a\", \"b\"").is_err());
        assert_eq!(expected_etag(&HeaderMap::new()).unwrap(), None);
    }

    #[test]
    fn a_patch_body_becomes_fields_and_a_mask_naming_every_key() {
        let body: Map<String, Value> =
            serde_json::from_str(r#"{"bio": null, "locale": "en-GB", "email": "x@y.z"}"#).unwrap();
        let request = profile_update(body).unwrap();
        let update = request.profile.unwrap();
        assert_eq!(update.bio, None);
        assert_eq!(update.locale.as_deref(), Some("en-GB"));
        let mut paths = request.update_mask.unwrap().paths;
        paths.sort();
        assert_eq!(paths, ["bio", "email", "locale"]);

        let body: Map<String, Value> = serde_json::from_str(r#"{"bio": 7}"#).unwrap();
        let error = profile_update(body).unwrap_err();
        assert_eq!(error.field_errors()[0].field, "bio");
        assert!(profile_update(Map::new()).is_err());
    }
}
