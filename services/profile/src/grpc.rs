//! `profile.v1.ProfileService`: translates between protobuf and the domain; holds no SQL.

use std::{sync::Arc, time::Duration};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use platform::{
    cache::Miss,
    identity::{Caller, Identity},
    metrics::{PoolFigures, Pools},
};
use proto::profile::v1::{self as pb, profile_service_server::ProfileService};
use tonic::{Request, Response, Status, metadata::MetadataMap};
use uuid::Uuid;

use crate::{
    auth_users::AuthUsers,
    cache::{
        self, BUSINESS_CATEGORIES_KEY, CachedProfile, Caches, CatalogList, PLANS_KEY,
        PROFESSION_TYPES_KEY, timestamp,
    },
    config::WarmingConfig,
    domain::{self, FieldViolation, Violations},
    error::ProfileError,
    store::{Catalog, CatalogRow, PlanFields, PlanRow, ProfileFields, Store, WriteOutcome},
    warming::{self, Activity},
};

/// Everything the RPCs share.
#[derive(Debug, Clone)]
pub struct ProfileApi {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Store,
    caches: Caches,
    identity: Identity,
    auth_users: AuthUsers,
    activity: Activity,
    warming: WarmingConfig,
    pools: Pools,
    instance: String,
}

/// The editable fields of a profile (`UpdateMyProfileRequest.update_mask` paths).
const EDITABLE: &[&str] = &[
    "display_name",
    "bio",
    "avatar_url",
    "profession_type_id",
    "business_category_id",
    "locale",
];
/// Fields of a profile that exist but are not the caller's to write here.
const READ_ONLY: &[&str] = &[
    "user_id",
    "email",
    "profession_type",
    "business_category",
    "created_at",
    "updated_at",
    "subscription",
    "roles",
    "etag",
];
const CATALOG_EDITABLE: &[&str] = &["name", "sort_order"];
const CATALOG_READ_ONLY: &[&str] = &[
    "profession_type_id",
    "business_category_id",
    "archived",
    "created_at",
    "updated_at",
];
const PLAN_EDITABLE: &[&str] = &[
    "name",
    "description",
    "features",
    "ai_daily_limit",
    "is_paid",
    "sort_order",
];
const PLAN_READ_ONLY: &[&str] = &["plan_id", "archived", "created_at", "updated_at"];

const CATALOG_PAGE_MAX: usize = 1000;
const PLANS_PAGE_MAX: usize = 100;
const BATCH_GET_MAX: usize = 100;
/// WarmCache bounds.
const WARM_WINDOW_MAX: Duration = Duration::from_secs(30 * 24 * 3600);
const WARM_RATE_MAX: i32 = 10_000;

impl ProfileApi {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Store,
        caches: Caches,
        identity: Identity,
        auth_users: AuthUsers,
        activity: Activity,
        warming: WarmingConfig,
        pools: Pools,
        instance: String,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                caches,
                identity,
                auth_users,
                activity,
                warming,
                pools,
                instance,
            }),
        }
    }
}

impl Inner {
    async fn caller(&self, metadata: &MetadataMap) -> Result<Caller, ProfileError> {
        self.identity
            .authenticate(metadata)
            .await
            .map_err(ProfileError::Upstream)
    }

    /// A signed-in user (not a service).
    async fn user(&self, metadata: &MetadataMap) -> Result<Uuid, ProfileError> {
        self.caller(metadata)
            .await?
            .user_id()
            .ok_or(ProfileError::Forbidden)
    }

    async fn admin(&self, metadata: &MetadataMap) -> Result<Caller, ProfileError> {
        let caller = self.caller(metadata).await?;
        if caller.is_admin() {
            Ok(caller)
        } else {
            Err(ProfileError::Forbidden)
        }
    }

    /// An admin or a service.
    async fn operator(&self, metadata: &MetadataMap) -> Result<Caller, ProfileError> {
        let caller = self.caller(metadata).await?;
        if caller.is_admin() || matches!(caller, Caller::Service { .. }) {
            Ok(caller)
        } else {
            Err(ProfileError::Forbidden)
        }
    }

    /// The caller, allowed to read `user_id`'s data: a service, an admin, or the user. Anyone
    /// else gets NOT_FOUND, as if the user did not exist.
    async fn reader_of(&self, metadata: &MetadataMap, user_id: Uuid) -> Result<(), ProfileError> {
        let caller = self.caller(metadata).await?;
        let allowed = match &caller {
            Caller::Service { .. } => true,
            Caller::User { user_id: own, .. } => *own == user_id || caller.is_admin(),
        };
        if allowed {
            Ok(())
        } else {
            Err(ProfileError::UserNotFound)
        }
    }

    /// The cached profile record of a user auth knows, created on first read.
    async fn record(
        &self,
        user_id: Uuid,
    ) -> Result<(Arc<CachedProfile>, Arc<proto::auth::v1::User>), ProfileError> {
        let user = self
            .auth_users
            .get(user_id)
            .await?
            .ok_or(ProfileError::UserNotFound)?;
        let key = user_id.to_string();
        let display_name = initial_display_name(&user.display_name);
        let record = self
            .caches
            .profiles
            .get_or_load(&key, || async {
                self.activity.record(user_id);
                // Two attempts: a first read racing another's creation finds nothing in its
                // snapshot; the second statement sees the committed row.
                for _ in 0..2 {
                    match self
                        .store
                        .load_or_create_profile(user_id, &display_name)
                        .await
                    {
                        Ok(Some(row)) => return Ok(Some(CachedProfile::from_row(row))),
                        Ok(None) => continue,
                        Err(e) => return Err(platform::error::from_sqlx(&e)),
                    }
                }
                Err(Status::unavailable("the profile is being created, retry"))
            })
            .await
            .map_err(|miss| match miss {
                Miss::Absent => ProfileError::UserNotFound,
                Miss::Failed(status) => ProfileError::Upstream(status),
            })?;
        Ok((record, user))
    }

    /// The profile as clients see it: the cached record with auth's email and roles, and the
    /// expiry computed now.
    async fn profile(&self, user_id: Uuid) -> Result<pb::Profile, ProfileError> {
        let (record, user) = self.record(user_id).await?;
        Ok(present(&record, &user, Utc::now()))
    }

    async fn update_my_profile(
        &self,
        request: Request<pb::UpdateMyProfileRequest>,
    ) -> Result<pb::UpdateMyProfileResponse, ProfileError> {
        let user_id = self.user(request.metadata()).await?;
        let body = request.into_inner();
        let update = body.profile.unwrap_or_default();
        let mut violations = Violations::default();
        let paths: Vec<String> = match &body.update_mask {
            Some(mask) if !mask.paths.is_empty() => mask.paths.clone(),
            // No mask: every field that is set.
            _ => set_fields(&update),
        };
        let accepted = domain::mask_paths(&paths, EDITABLE, READ_ONLY, &mut violations);
        let changes = validate_update(&update, &accepted, &mut violations);
        if !violations.is_empty() {
            return Err(ProfileError::Invalid(violations.0));
        }
        // The profile exists from here on (created on first read, like GET).
        self.record(user_id).await?;
        let expected = body.expected_etag;
        let outcome = self
            .store
            .update_profile(user_id, |current| {
                if let Some(expected) = &expected
                    && *expected != cache::etag(current)
                {
                    return Err(ProfileError::EtagMismatch);
                }
                Ok(changes.apply(current))
            })
            .await?;
        match outcome {
            None => return Err(ProfileError::UserNotFound),
            Some(Err(e)) => return Err(e),
            Some(Ok(())) => {}
        }
        self.caches.profiles.invalidate(&user_id.to_string()).await;
        Ok(pb::UpdateMyProfileResponse {
            profile: Some(self.profile(user_id).await?),
        })
    }

    async fn profile_data(
        &self,
        request: Request<pb::GetProfileDataRequest>,
    ) -> Result<pb::GetProfileDataResponse, ProfileError> {
        let user_id = self.user(request.metadata()).await?;
        let frames = self.store.customer_frames(user_id).await?;
        Ok(pb::GetProfileDataResponse {
            customer_frames: frames
                .into_iter()
                .map(|f| pb::CustomerFrame {
                    frame_id: f.id.to_string(),
                    name: f.name,
                    image_url: f.image_url,
                    business_category: Some(pb::CatalogRef {
                        id: f.business_category_id.to_string(),
                        name: f.business_category_name,
                    }),
                    sort_order: f.sort_order,
                    created_at: Some(timestamp(f.created_at)),
                    updated_at: Some(timestamp(f.updated_at)),
                })
                .collect(),
        })
    }

    /// A catalog list, live entries from the cache; archived ones too (admins) from the
    /// database.
    async fn catalog_list(
        &self,
        metadata: &MetadataMap,
        key: &'static str,
        show_archived: bool,
    ) -> Result<Arc<CatalogList>, ProfileError> {
        if show_archived {
            self.admin(metadata).await?;
            return Ok(Arc::new(self.load_catalog(key, true).await?));
        }
        self.caller(metadata).await?;
        self.caches
            .catalogs
            .get_or_load(key, || async {
                self.load_catalog(key, false)
                    .await
                    .map(Some)
                    .map_err(Status::from)
            })
            .await
            .map_err(|miss| match miss {
                Miss::Absent => ProfileError::EntryNotFound,
                Miss::Failed(status) => ProfileError::Upstream(status),
            })
    }

    async fn load_catalog(
        &self,
        key: &'static str,
        with_archived: bool,
    ) -> Result<CatalogList, ProfileError> {
        let mut list = CatalogList::default();
        match key {
            PROFESSION_TYPES_KEY => {
                list.profession_types = self
                    .store
                    .catalog(Catalog::ProfessionTypes)
                    .await?
                    .into_iter()
                    .filter(|r| with_archived || !r.archived)
                    .map(profession_type)
                    .collect();
            }
            BUSINESS_CATEGORIES_KEY => {
                list.business_categories = self
                    .store
                    .catalog(Catalog::BusinessCategories)
                    .await?
                    .into_iter()
                    .filter(|r| with_archived || !r.archived)
                    .map(business_category)
                    .collect();
            }
            _ => {
                list.plans = self
                    .store
                    .plans()
                    .await?
                    .into_iter()
                    .filter(|r| with_archived || !r.archived)
                    .map(plan)
                    .collect();
            }
        }
        Ok(list)
    }

    async fn set_subscription(
        &self,
        request: Request<pb::SetSubscriptionRequest>,
    ) -> Result<pb::SetSubscriptionResponse, ProfileError> {
        self.admin(request.metadata()).await?;
        let body = request.into_inner();
        let mut violations = Violations::default();
        let user_id = violations.check(domain::id("user_id", &body.user_id));
        let plan_id = violations.check(domain::plan_slug("plan_id", &body.plan_id));
        let status = match pb::SubscriptionStatus::try_from(body.status) {
            Ok(pb::SubscriptionStatus::Unspecified | pb::SubscriptionStatus::Active) => {
                Some("active")
            }
            Ok(pb::SubscriptionStatus::Trialing) => Some("trialing"),
            Ok(pb::SubscriptionStatus::PastDue) => Some("past_due"),
            Ok(pb::SubscriptionStatus::Canceled) => Some("canceled"),
            Ok(pb::SubscriptionStatus::Expired) => Some("expired"),
            Err(_) => {
                violations.push(FieldViolation::new(
                    "status",
                    "INVALID_VALUE",
                    "not a subscription status",
                ));
                None
            }
        };
        let end_date = match body.end_date {
            None => Some(None),
            Some(t) => match u32::try_from(t.nanos)
                .ok()
                .and_then(|nanos| DateTime::from_timestamp(t.seconds, nanos))
            {
                Some(at) => Some(Some(at)),
                None => {
                    violations.push(FieldViolation::new(
                        "end_date",
                        "INVALID_VALUE",
                        "not a valid timestamp",
                    ));
                    None
                }
            },
        };
        let (Some(user_id), Some(plan_id), Some(status), Some(end_date)) =
            (user_id, plan_id, status, end_date)
        else {
            return Err(ProfileError::Invalid(violations.0));
        };
        // The user must exist in auth; their profile row is created if it is not yet.
        self.record(user_id).await?;
        match self
            .store
            .set_subscription(user_id, &plan_id, status, end_date)
            .await?
        {
            WriteOutcome::Done(()) => {}
            WriteOutcome::NotFound => return Err(ProfileError::PlanNotFound),
            WriteOutcome::Archived | WriteOutcome::NameTaken => {
                return Err(ProfileError::PlanArchived);
            }
        }
        self.caches.profiles.invalidate(&user_id.to_string()).await;
        let profile = self.profile(user_id).await?;
        tracing::info!(%user_id, plan_id, status, "subscription set");
        Ok(pb::SetSubscriptionResponse {
            subscription: profile.subscription,
        })
    }

    async fn create_plan(
        &self,
        request: Request<pb::CreatePlanRequest>,
    ) -> Result<pb::CreatePlanResponse, ProfileError> {
        self.admin(request.metadata()).await?;
        let plan = request.into_inner().plan.unwrap_or_default();
        let mut violations = Violations::default();
        let id = violations.check(domain::plan_slug("plan.plan_id", &plan.plan_id));
        let fields = plan_fields(&plan, PLAN_EDITABLE, None, &mut violations);
        let (Some(id), Some(fields)) = (id, fields) else {
            return Err(ProfileError::Invalid(violations.0));
        };
        match self.store.create_plan(&id, &fields).await? {
            WriteOutcome::Done(row) => {
                self.caches.catalogs.invalidate(PLANS_KEY).await;
                Ok(pb::CreatePlanResponse {
                    plan: Some(self::plan(row)),
                })
            }
            _ => Err(ProfileError::PlanExists),
        }
    }

    async fn update_plan(
        &self,
        request: Request<pb::UpdatePlanRequest>,
    ) -> Result<pb::UpdatePlanResponse, ProfileError> {
        self.admin(request.metadata()).await?;
        let body = request.into_inner();
        let plan = body.plan.unwrap_or_default();
        let mut violations = Violations::default();
        let paths = body.update_mask.map(|m| m.paths).unwrap_or_default();
        if paths.is_empty() {
            violations.push(FieldViolation::new(
                "update_mask",
                "REQUIRED",
                "name the fields to change",
            ));
        }
        let accepted = domain::mask_paths(&paths, PLAN_EDITABLE, PLAN_READ_ONLY, &mut violations);
        let id = violations.check(domain::plan_slug("plan.plan_id", &plan.plan_id));
        let current = match &id {
            Some(id) => self.store.plans().await?.into_iter().find(|p| p.id == *id),
            None => None,
        };
        if id.is_some() && current.is_none() && violations.is_empty() {
            return Err(ProfileError::PlanNotFound);
        }
        let fields = plan_fields(&plan, &accepted, current.as_ref(), &mut violations);
        let (Some(id), Some(fields)) = (id, fields) else {
            return Err(ProfileError::Invalid(violations.0));
        };
        match self.store.update_plan(&id, &fields).await? {
            WriteOutcome::Done(row) => {
                self.caches.catalogs.invalidate(PLANS_KEY).await;
                // Every subscriber's cached profile shows the plan.
                self.caches.profiles.invalidate_all().await;
                Ok(pb::UpdatePlanResponse {
                    plan: Some(self::plan(row)),
                })
            }
            _ => Err(ProfileError::PlanNotFound),
        }
    }

    async fn delete_plan(
        &self,
        request: Request<pb::DeletePlanRequest>,
    ) -> Result<pb::DeletePlanResponse, ProfileError> {
        self.admin(request.metadata()).await?;
        let id = domain::plan_slug("plan_id", &request.get_ref().plan_id)?;
        match self.store.archive_plan(&id).await? {
            WriteOutcome::Done(()) => {
                self.caches.catalogs.invalidate(PLANS_KEY).await;
                Ok(pb::DeletePlanResponse {})
            }
            WriteOutcome::Archived => Err(ProfileError::DefaultPlan),
            _ => Err(ProfileError::PlanNotFound),
        }
    }

    async fn create_entry(
        &self,
        metadata: &MetadataMap,
        catalog: Catalog,
        field: &str,
        name: &str,
        sort_order: i32,
    ) -> Result<CatalogRow, ProfileError> {
        self.admin(metadata).await?;
        let name = domain::catalog_name(&format!("{field}.name"), name)?;
        match self
            .store
            .create_catalog_entry(catalog, Uuid::now_v7(), &name, sort_order)
            .await?
        {
            WriteOutcome::Done(row) => {
                self.caches.catalogs.invalidate(catalog_key(catalog)).await;
                Ok(row)
            }
            _ => Err(ProfileError::NameTaken),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn update_entry(
        &self,
        metadata: &MetadataMap,
        catalog: Catalog,
        field: &str,
        id_field: &str,
        id: &str,
        name: &str,
        sort_order: i32,
        mask: Option<prost_types::FieldMask>,
    ) -> Result<CatalogRow, ProfileError> {
        self.admin(metadata).await?;
        let mut violations = Violations::default();
        let paths = mask.map(|m| m.paths).unwrap_or_default();
        if paths.is_empty() {
            violations.push(FieldViolation::new(
                "update_mask",
                "REQUIRED",
                "name the fields to change",
            ));
        }
        let accepted =
            domain::mask_paths(&paths, CATALOG_EDITABLE, CATALOG_READ_ONLY, &mut violations);
        let id = violations.check(domain::id(&format!("{field}.{id_field}"), id));
        let name = if accepted.contains(&"name") {
            violations.check(domain::catalog_name(&format!("{field}.name"), name))
        } else {
            None
        };
        let sort_order = accepted.contains(&"sort_order").then_some(sort_order);
        let Some(id) = id.filter(|_| violations.is_empty()) else {
            return Err(ProfileError::Invalid(violations.0));
        };
        match self
            .store
            .update_catalog_entry(catalog, id, name.as_deref(), sort_order)
            .await?
        {
            WriteOutcome::Done(row) => {
                self.caches.catalogs.invalidate(catalog_key(catalog)).await;
                if name.is_some() {
                    // Profiles show the entry's name.
                    self.caches.profiles.invalidate_all().await;
                }
                Ok(row)
            }
            WriteOutcome::NameTaken => Err(ProfileError::NameTaken),
            _ => Err(ProfileError::EntryNotFound),
        }
    }

    async fn delete_entry(
        &self,
        metadata: &MetadataMap,
        catalog: Catalog,
        id_field: &str,
        id: &str,
    ) -> Result<(), ProfileError> {
        self.admin(metadata).await?;
        let id = domain::id(id_field, id)?;
        if self.store.archive_catalog_entry(catalog, id).await? {
            self.caches.catalogs.invalidate(catalog_key(catalog)).await;
            Ok(())
        } else {
            Err(ProfileError::EntryNotFound)
        }
    }

    async fn warm_cache(
        &self,
        request: Request<pb::WarmCacheRequest>,
    ) -> Result<pb::WarmCacheResponse, ProfileError> {
        self.operator(request.metadata()).await?;
        let body = request.into_inner();
        let window = match body.active_within_seconds {
            0 => self.warming.window,
            s if s < 0 || Duration::from_secs(s.unsigned_abs().into()) > WARM_WINDOW_MAX => {
                return Err(FieldViolation::new(
                    "active_within_seconds",
                    "OUT_OF_RANGE",
                    "between 1 second and 30 days",
                )
                .into());
            }
            s => Duration::from_secs(s.unsigned_abs().into()),
        };
        let rate = match body.max_per_second {
            0 => self.warming.max_per_second,
            r if !(1..=WARM_RATE_MAX).contains(&r) => {
                return Err(FieldViolation::new(
                    "max_per_second",
                    "OUT_OF_RANGE",
                    format!("between 1 and {WARM_RATE_MAX}"),
                )
                .into());
            }
            r => r.unsigned_abs(),
        };
        let scheduled = warming::warm(
            &self.store,
            &self.caches,
            window,
            rate,
            self.warming.max_profiles,
        )
        .await?;
        Ok(pb::WarmCacheResponse {
            scheduled_count: i32::try_from(scheduled).unwrap_or(i32::MAX),
        })
    }
}

/// Registration's display name, made acceptable as a profile's (auth's rules are close to
/// ours; a name that is not is cut rather than refused, since the user did not type it here).
fn initial_display_name(from_auth: &str) -> String {
    let name: String = from_auth
        .trim()
        .chars()
        .filter(|c| !c.is_control())
        .take(domain::DISPLAY_NAME_MAX)
        .collect();
    if name.is_empty() {
        "user".to_owned()
    } else {
        name
    }
}

/// The profile as clients see it.
fn present(
    record: &CachedProfile,
    user: &proto::auth::v1::User,
    now: DateTime<Utc>,
) -> pb::Profile {
    let mut profile = record.profile.clone().unwrap_or_default();
    profile.email.clone_from(&user.email);
    profile.roles.clone_from(&user.roles);
    if let Some(subscription) = profile.subscription.as_mut() {
        subscription.is_expired = cache::is_expired(subscription, now);
    }
    profile
}

/// What a user's plan grants now: the plan's, or the default plan's once it has expired.
fn entitlements(record: &CachedProfile, now: DateTime<Utc>) -> pb::GetEntitlementsResponse {
    let profile = record.profile.clone().unwrap_or_default();
    let subscription = profile.subscription.unwrap_or_default();
    let expired = cache::is_expired(&subscription, now);
    let (features, ai_daily_limit) = if expired {
        (
            record.default_features.clone(),
            record.default_ai_daily_limit,
        )
    } else {
        (subscription.features.clone(), subscription.ai_daily_limit)
    };
    pb::GetEntitlementsResponse {
        user_id: profile.user_id,
        plan_id: subscription.plan_id,
        plan_name: subscription.plan_name,
        features,
        ai_daily_limit,
        end_date: subscription.end_date,
        is_customer: subscription.is_customer,
        is_expired: expired,
        status: subscription.status,
    }
}

/// The mask paths of the fields that are set, for a PATCH without a mask.
fn set_fields(update: &pb::ProfileUpdate) -> Vec<String> {
    [
        ("display_name", update.display_name.is_some()),
        ("bio", update.bio.is_some()),
        ("avatar_url", update.avatar_url.is_some()),
        ("profession_type_id", update.profession_type_id.is_some()),
        (
            "business_category_id",
            update.business_category_id.is_some(),
        ),
        ("locale", update.locale.is_some()),
    ]
    .into_iter()
    .filter(|(_, set)| *set)
    .map(|(path, _)| path.to_owned())
    .collect()
}

/// A validated PATCH: for each accepted path, the new value (`None` inside = cleared).
#[derive(Debug, Default)]
struct Changes {
    display_name: Option<String>,
    bio: Option<String>,
    avatar_url: Option<String>,
    profession_type_id: Option<Option<Uuid>>,
    business_category_id: Option<Option<Uuid>>,
    locale: Option<String>,
}

impl Changes {
    fn apply(&self, current: &crate::store::ProfileRow) -> ProfileFields {
        ProfileFields {
            display_name: self
                .display_name
                .clone()
                .unwrap_or_else(|| current.display_name.clone()),
            bio: self.bio.clone().unwrap_or_else(|| current.bio.clone()),
            avatar_url: self
                .avatar_url
                .clone()
                .unwrap_or_else(|| current.avatar_url.clone()),
            profession_type_id: self
                .profession_type_id
                .unwrap_or(current.profession_type_id),
            business_category_id: self
                .business_category_id
                .unwrap_or(current.business_category_id),
            locale: self
                .locale
                .clone()
                .unwrap_or_else(|| current.locale.clone()),
        }
    }
}

fn validate_update(
    update: &pb::ProfileUpdate,
    paths: &[&str],
    violations: &mut Violations,
) -> Changes {
    let mut changes = Changes::default();
    let optional_id = |field: &str, value: &Option<String>, violations: &mut Violations| match value
        .as_deref()
        .map(str::trim)
    {
        None | Some("") => Some(None),
        Some(raw) => violations.check(domain::id(field, raw)).map(Some),
    };
    for path in paths {
        match *path {
            "display_name" => match &update.display_name {
                Some(raw) => {
                    changes.display_name = violations.check(domain::display_name(path, raw))
                }
                None => {
                    violations.push(FieldViolation::new(*path, "REQUIRED", "cannot be cleared"))
                }
            },
            "bio" => {
                changes.bio =
                    violations.check(domain::bio(path, update.bio.as_deref().unwrap_or_default()));
            }
            "avatar_url" => {
                changes.avatar_url = violations.check(domain::https_url(
                    path,
                    update.avatar_url.as_deref().unwrap_or_default(),
                ));
            }
            "locale" => {
                changes.locale = violations.check(domain::locale(
                    path,
                    update.locale.as_deref().unwrap_or_default(),
                ));
            }
            "profession_type_id" => {
                changes.profession_type_id =
                    optional_id(path, &update.profession_type_id, violations);
            }
            "business_category_id" => {
                changes.business_category_id =
                    optional_id(path, &update.business_category_id, violations);
            }
            _ => {}
        }
    }
    changes
}

/// A plan's fields: the mask's paths from `plan`, the rest from `current` (or defaults for a
/// new plan, where every editable path counts).
fn plan_fields(
    plan: &pb::Plan,
    paths: &[&str],
    current: Option<&PlanRow>,
    violations: &mut Violations,
) -> Option<PlanFields> {
    let has = |path: &str| paths.contains(&path);
    let before = violations.0.len();
    let mut fields = match current {
        Some(row) => PlanFields {
            name: row.name.clone(),
            description: row.description.clone(),
            features: row.features.clone(),
            ai_daily_limit: row.ai_daily_limit,
            is_paid: row.is_paid,
            sort_order: row.sort_order,
        },
        None => PlanFields {
            name: String::new(),
            description: String::new(),
            features: Vec::new(),
            ai_daily_limit: 0,
            is_paid: false,
            sort_order: 0,
        },
    };
    if has("name") {
        fields.name = violations
            .check(domain::plan_name("plan.name", &plan.name))
            .unwrap_or_default();
    }
    if has("description") {
        fields.description = violations
            .check(domain::plan_description(
                "plan.description",
                &plan.description,
            ))
            .unwrap_or_default();
    }
    if has("features") {
        fields.features = domain::features("plan.features", &plan.features, violations);
    }
    if has("ai_daily_limit") {
        fields.ai_daily_limit = violations
            .check(domain::non_negative(
                "plan.ai_daily_limit",
                plan.ai_daily_limit,
            ))
            .unwrap_or_default();
    }
    if has("is_paid") {
        fields.is_paid = plan.is_paid;
    }
    if has("sort_order") {
        fields.sort_order = plan.sort_order;
    }
    (violations.0.len() == before).then_some(fields)
}

fn catalog_key(catalog: Catalog) -> &'static str {
    match catalog {
        Catalog::ProfessionTypes => PROFESSION_TYPES_KEY,
        Catalog::BusinessCategories => BUSINESS_CATEGORIES_KEY,
    }
}

fn profession_type(row: CatalogRow) -> pb::ProfessionType {
    pb::ProfessionType {
        profession_type_id: row.id.to_string(),
        name: row.name,
        sort_order: row.sort_order,
        archived: row.archived,
        created_at: Some(timestamp(row.created_at)),
        updated_at: Some(timestamp(row.updated_at)),
    }
}

fn business_category(row: CatalogRow) -> pb::BusinessCategory {
    pb::BusinessCategory {
        business_category_id: row.id.to_string(),
        name: row.name,
        sort_order: row.sort_order,
        archived: row.archived,
        created_at: Some(timestamp(row.created_at)),
        updated_at: Some(timestamp(row.updated_at)),
    }
}

fn plan(row: PlanRow) -> pb::Plan {
    pb::Plan {
        plan_id: row.id,
        name: row.name,
        description: row.description,
        features: row.features,
        ai_daily_limit: row.ai_daily_limit,
        is_paid: row.is_paid,
        sort_order: row.sort_order,
        archived: row.archived,
        created_at: Some(timestamp(row.created_at)),
        updated_at: Some(timestamp(row.updated_at)),
    }
}

/// One page of a small in-memory list. The token is the offset, opaque to clients
/// (`o<offset>`, base64url), and tied to the list it came from by a prefix.
fn page<T: Clone>(
    items: &[T],
    list: &str,
    page_size: i32,
    page_token: &str,
    max: usize,
) -> Result<(Vec<T>, String), ProfileError> {
    let size = match page_size {
        0 => max,
        n if n < 0 => {
            return Err(
                FieldViolation::new("page_size", "OUT_OF_RANGE", "must not be negative").into(),
            );
        }
        n => usize::try_from(n).unwrap_or(max).min(max),
    };
    let offset = if page_token.is_empty() {
        0
    } else {
        URL_SAFE_NO_PAD
            .decode(page_token)
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .and_then(|text| {
                text.strip_prefix(list)
                    .and_then(|rest| rest.strip_prefix(':'))
                    .and_then(|n| n.parse::<usize>().ok())
            })
            .ok_or_else(|| {
                FieldViolation::new(
                    "page_token",
                    "INVALID_PAGE_TOKEN",
                    "not a page token from this list",
                )
            })?
    };
    let end = offset.saturating_add(size).min(items.len());
    let page = items
        .get(offset.min(items.len())..end)
        .unwrap_or_default()
        .to_vec();
    let next = if end < items.len() {
        URL_SAFE_NO_PAD.encode(format!("{list}:{end}"))
    } else {
        String::new()
    };
    Ok((page, next))
}

/// The response, or the status its error maps to (refusals logged at debug).
fn finish<T>(method: &'static str, result: Result<T, ProfileError>) -> Result<Response<T>, Status> {
    match result {
        Ok(value) => Ok(Response::new(value)),
        Err(error) => {
            let status = Status::from(error);
            tracing::debug!(method, code = ?status.code(), "profile call refused");
            Err(status)
        }
    }
}

fn pool_status(figures: PoolFigures) -> pb::PoolStatus {
    let count = |n: u32| i32::try_from(n).unwrap_or(i32::MAX);
    pb::PoolStatus {
        name: figures.name.to_owned(),
        max_size: count(figures.max_size),
        size: count(figures.size),
        idle: count(figures.idle),
        in_use: count(figures.in_use),
        waiters: count(figures.waiters),
    }
}

#[tonic::async_trait]
impl ProfileService for ProfileApi {
    async fn get_my_profile(
        &self,
        request: Request<pb::GetMyProfileRequest>,
    ) -> Result<Response<pb::GetMyProfileResponse>, Status> {
        let result = async {
            let user_id = self.inner.user(request.metadata()).await?;
            let profile = self.inner.profile(user_id).await?;
            Ok(pb::GetMyProfileResponse {
                profile: Some(profile),
            })
        }
        .await;
        finish("GetMyProfile", result)
    }

    async fn update_my_profile(
        &self,
        request: Request<pb::UpdateMyProfileRequest>,
    ) -> Result<Response<pb::UpdateMyProfileResponse>, Status> {
        finish(
            "UpdateMyProfile",
            self.inner.update_my_profile(request).await,
        )
    }

    async fn get_profile_data(
        &self,
        request: Request<pb::GetProfileDataRequest>,
    ) -> Result<Response<pb::GetProfileDataResponse>, Status> {
        finish("GetProfileData", self.inner.profile_data(request).await)
    }

    async fn list_profession_types(
        &self,
        request: Request<pb::ListProfessionTypesRequest>,
    ) -> Result<Response<pb::ListProfessionTypesResponse>, Status> {
        let result = async {
            let body = request.get_ref();
            let list = self
                .inner
                .catalog_list(request.metadata(), PROFESSION_TYPES_KEY, body.show_archived)
                .await?;
            let (profession_types, next_page_token) = page(
                &list.profession_types,
                PROFESSION_TYPES_KEY,
                body.page_size,
                &body.page_token,
                CATALOG_PAGE_MAX,
            )?;
            Ok(pb::ListProfessionTypesResponse {
                profession_types,
                next_page_token,
            })
        }
        .await;
        finish("ListProfessionTypes", result)
    }

    async fn list_business_categories(
        &self,
        request: Request<pb::ListBusinessCategoriesRequest>,
    ) -> Result<Response<pb::ListBusinessCategoriesResponse>, Status> {
        let result = async {
            let body = request.get_ref();
            let list = self
                .inner
                .catalog_list(
                    request.metadata(),
                    BUSINESS_CATEGORIES_KEY,
                    body.show_archived,
                )
                .await?;
            let (business_categories, next_page_token) = page(
                &list.business_categories,
                BUSINESS_CATEGORIES_KEY,
                body.page_size,
                &body.page_token,
                CATALOG_PAGE_MAX,
            )?;
            Ok(pb::ListBusinessCategoriesResponse {
                business_categories,
                next_page_token,
            })
        }
        .await;
        finish("ListBusinessCategories", result)
    }

    async fn get_profile(
        &self,
        request: Request<pb::GetProfileRequest>,
    ) -> Result<Response<pb::GetProfileResponse>, Status> {
        let result = async {
            let user_id = domain::id("user_id", &request.get_ref().user_id)?;
            self.inner.reader_of(request.metadata(), user_id).await?;
            let profile = self.inner.profile(user_id).await?;
            Ok(pb::GetProfileResponse {
                profile: Some(profile),
            })
        }
        .await;
        finish("GetProfile", result)
    }

    async fn batch_get_profiles(
        &self,
        request: Request<pb::BatchGetProfilesRequest>,
    ) -> Result<Response<pb::BatchGetProfilesResponse>, Status> {
        let result = async {
            self.inner.operator(request.metadata()).await?;
            let raw = &request.get_ref().user_ids;
            if raw.len() > BATCH_GET_MAX {
                return Err(FieldViolation::new(
                    "user_ids",
                    "TOO_MANY",
                    format!("at most {BATCH_GET_MAX} ids"),
                )
                .into());
            }
            let mut violations = Violations::default();
            let mut ids: Vec<Uuid> = Vec::with_capacity(raw.len());
            for (i, id) in raw.iter().enumerate() {
                if let Some(id) = violations.check(domain::id(&format!("user_ids[{i}]"), id))
                    && !ids.contains(&id)
                {
                    ids.push(id);
                }
            }
            if !violations.is_empty() {
                return Err(ProfileError::Invalid(violations.0));
            }
            // Each through the cache (memory for the hot ones), concurrently.
            let found =
                futures::future::join_all(ids.iter().map(|id| self.inner.profile(*id))).await;
            let mut profiles = Vec::with_capacity(found.len());
            for result in found {
                match result {
                    Ok(profile) => profiles.push(profile),
                    Err(ProfileError::UserNotFound) => {}
                    Err(other) => return Err(other),
                }
            }
            Ok(pb::BatchGetProfilesResponse { profiles })
        }
        .await;
        finish("BatchGetProfiles", result)
    }

    async fn get_entitlements(
        &self,
        request: Request<pb::GetEntitlementsRequest>,
    ) -> Result<Response<pb::GetEntitlementsResponse>, Status> {
        let result = async {
            let user_id = domain::id("user_id", &request.get_ref().user_id)?;
            self.inner.reader_of(request.metadata(), user_id).await?;
            let (record, _) = self.inner.record(user_id).await?;
            Ok(entitlements(&record, Utc::now()))
        }
        .await;
        finish("GetEntitlements", result)
    }

    async fn set_subscription(
        &self,
        request: Request<pb::SetSubscriptionRequest>,
    ) -> Result<Response<pb::SetSubscriptionResponse>, Status> {
        finish(
            "SetSubscription",
            self.inner.set_subscription(request).await,
        )
    }

    async fn list_plans(
        &self,
        request: Request<pb::ListPlansRequest>,
    ) -> Result<Response<pb::ListPlansResponse>, Status> {
        let result = async {
            let body = request.get_ref();
            let list = self
                .inner
                .catalog_list(request.metadata(), PLANS_KEY, body.show_archived)
                .await?;
            let (plans, next_page_token) = page(
                &list.plans,
                PLANS_KEY,
                body.page_size,
                &body.page_token,
                PLANS_PAGE_MAX,
            )?;
            Ok(pb::ListPlansResponse {
                plans,
                next_page_token,
            })
        }
        .await;
        finish("ListPlans", result)
    }

    async fn create_plan(
        &self,
        request: Request<pb::CreatePlanRequest>,
    ) -> Result<Response<pb::CreatePlanResponse>, Status> {
        finish("CreatePlan", self.inner.create_plan(request).await)
    }

    async fn update_plan(
        &self,
        request: Request<pb::UpdatePlanRequest>,
    ) -> Result<Response<pb::UpdatePlanResponse>, Status> {
        finish("UpdatePlan", self.inner.update_plan(request).await)
    }

    async fn delete_plan(
        &self,
        request: Request<pb::DeletePlanRequest>,
    ) -> Result<Response<pb::DeletePlanResponse>, Status> {
        finish("DeletePlan", self.inner.delete_plan(request).await)
    }

    async fn create_profession_type(
        &self,
        request: Request<pb::CreateProfessionTypeRequest>,
    ) -> Result<Response<pb::CreateProfessionTypeResponse>, Status> {
        let result = async {
            let entry = request
                .get_ref()
                .profession_type
                .clone()
                .unwrap_or_default();
            let row = self
                .inner
                .create_entry(
                    request.metadata(),
                    Catalog::ProfessionTypes,
                    "profession_type",
                    &entry.name,
                    entry.sort_order,
                )
                .await?;
            Ok(pb::CreateProfessionTypeResponse {
                profession_type: Some(profession_type(row)),
            })
        }
        .await;
        finish("CreateProfessionType", result)
    }

    async fn update_profession_type(
        &self,
        request: Request<pb::UpdateProfessionTypeRequest>,
    ) -> Result<Response<pb::UpdateProfessionTypeResponse>, Status> {
        let result = async {
            let body = request.get_ref();
            let entry = body.profession_type.clone().unwrap_or_default();
            let row = self
                .inner
                .update_entry(
                    request.metadata(),
                    Catalog::ProfessionTypes,
                    "profession_type",
                    "profession_type_id",
                    &entry.profession_type_id,
                    &entry.name,
                    entry.sort_order,
                    body.update_mask.clone(),
                )
                .await?;
            Ok(pb::UpdateProfessionTypeResponse {
                profession_type: Some(profession_type(row)),
            })
        }
        .await;
        finish("UpdateProfessionType", result)
    }

    async fn delete_profession_type(
        &self,
        request: Request<pb::DeleteProfessionTypeRequest>,
    ) -> Result<Response<pb::DeleteProfessionTypeResponse>, Status> {
        let result = self
            .inner
            .delete_entry(
                request.metadata(),
                Catalog::ProfessionTypes,
                "profession_type_id",
                &request.get_ref().profession_type_id,
            )
            .await
            .map(|()| pb::DeleteProfessionTypeResponse {});
        finish("DeleteProfessionType", result)
    }

    async fn create_business_category(
        &self,
        request: Request<pb::CreateBusinessCategoryRequest>,
    ) -> Result<Response<pb::CreateBusinessCategoryResponse>, Status> {
        let result = async {
            let entry = request
                .get_ref()
                .business_category
                .clone()
                .unwrap_or_default();
            let row = self
                .inner
                .create_entry(
                    request.metadata(),
                    Catalog::BusinessCategories,
                    "business_category",
                    &entry.name,
                    entry.sort_order,
                )
                .await?;
            Ok(pb::CreateBusinessCategoryResponse {
                business_category: Some(business_category(row)),
            })
        }
        .await;
        finish("CreateBusinessCategory", result)
    }

    async fn update_business_category(
        &self,
        request: Request<pb::UpdateBusinessCategoryRequest>,
    ) -> Result<Response<pb::UpdateBusinessCategoryResponse>, Status> {
        let result = async {
            let body = request.get_ref();
            let entry = body.business_category.clone().unwrap_or_default();
            let row = self
                .inner
                .update_entry(
                    request.metadata(),
                    Catalog::BusinessCategories,
                    "business_category",
                    "business_category_id",
                    &entry.business_category_id,
                    &entry.name,
                    entry.sort_order,
                    body.update_mask.clone(),
                )
                .await?;
            Ok(pb::UpdateBusinessCategoryResponse {
                business_category: Some(business_category(row)),
            })
        }
        .await;
        finish("UpdateBusinessCategory", result)
    }

    async fn delete_business_category(
        &self,
        request: Request<pb::DeleteBusinessCategoryRequest>,
    ) -> Result<Response<pb::DeleteBusinessCategoryResponse>, Status> {
        let result = self
            .inner
            .delete_entry(
                request.metadata(),
                Catalog::BusinessCategories,
                "business_category_id",
                &request.get_ref().business_category_id,
            )
            .await
            .map(|()| pb::DeleteBusinessCategoryResponse {});
        finish("DeleteBusinessCategory", result)
    }

    async fn warm_cache(
        &self,
        request: Request<pb::WarmCacheRequest>,
    ) -> Result<Response<pb::WarmCacheResponse>, Status> {
        finish("WarmCache", self.inner.warm_cache(request).await)
    }

    async fn get_pool_status(
        &self,
        request: Request<pb::GetPoolStatusRequest>,
    ) -> Result<Response<pb::GetPoolStatusResponse>, Status> {
        let result = async {
            self.inner.operator(request.metadata()).await?;
            Ok(pb::GetPoolStatusResponse {
                instance: self.inner.instance.clone(),
                pools: self
                    .inner
                    .pools
                    .figures()
                    .into_iter()
                    .map(pool_status)
                    .collect(),
            })
        }
        .await;
        finish("GetPoolStatus", result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_walk_a_list_and_refuse_foreign_tokens() {
        let items: Vec<u32> = (0..5).collect();
        let (first, next) = page(&items, "plans", 2, "", 100).unwrap_or_default();
        assert_eq!(first, [0, 1]);
        let (second, next) = page(&items, "plans", 2, &next, 100).unwrap_or_default();
        assert_eq!(second, [2, 3]);
        let (last, next) = page(&items, "plans", 2, &next, 100).unwrap_or_default();
        assert_eq!((last.as_slice(), next.as_str()), ([4].as_slice(), ""));
        let token = URL_SAFE_NO_PAD.encode("plans:2");
        assert!(page(&items, "profession_types", 2, &token, 100).is_err());
        assert!(page(&items, "plans", -1, "", 100).is_err());
    }

    #[test]
    fn expired_subscriptions_fall_back_to_the_default_plan() {
        let record = CachedProfile {
            profile: Some(pb::Profile {
                user_id: "u".to_owned(),
                subscription: Some(pb::Subscription {
                    plan_id: "pro".to_owned(),
                    features: vec!["custom_frames".to_owned()],
                    ai_daily_limit: 50,
                    end_date: Some(prost_types::Timestamp {
                        seconds: 1_000,
                        nanos: 0,
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            default_features: vec!["ai_generation".to_owned()],
            default_ai_daily_limit: 3,
        };
        let before = DateTime::from_timestamp(999, 0).unwrap_or_default();
        let after = DateTime::from_timestamp(1_001, 0).unwrap_or_default();
        let live = entitlements(&record, before);
        assert!(!live.is_expired);
        assert_eq!(live.ai_daily_limit, 50);
        let expired = entitlements(&record, after);
        assert!(expired.is_expired);
        assert_eq!(expired.plan_id, "pro");
        assert_eq!(expired.features, ["ai_generation"]);
        assert_eq!(expired.ai_daily_limit, 3);
    }
}
