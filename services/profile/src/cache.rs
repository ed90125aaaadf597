//! The profile service's caches in one place: names, key scheme, TTLs and encoded shapes.
//!
//! | cache | key | value | L1 TTL | L2 TTL | invalidated by |
//! |---|---|---|---|---|---|
//! | `profile` | user id | [`CachedProfile`] | `PROFILE_CACHE_L1_TTL` | `PROFILE_CACHE_L2_TTL` | PATCH, SetSubscription (the key); plan or catalog changes (all) |
//! | `auth_user` | user id | `auth.v1.User` (email, roles) | `PROFILE_AUTH_CACHE_TTL` | same | auth's change events |
//! | `catalog` | `profession_types`, `business_categories`, `plans` | [`CatalogList`] | `PROFILE_CATALOG_CACHE_TTL` | same | admin writes (the key) |
//!
//! Redis keys are `<PROFILE_REDIS_KEY_PREFIX><cache>:v<schema>:<key>`; values are protobuf.
//! Bump a cache's schema version whenever its value's shape changes.

use chrono::{DateTime, Utc};
use platform::cache::{CacheBus, CacheSpec, TwoLevelCache};
use proto::{auth::v1 as auth_pb, profile::v1 as pb};
use sha2::{Digest as _, Sha256};

use crate::{config::CacheConfig, store::ProfileRow};

/// What the `profile` cache holds for a user: the profile as the database has it (email and
/// roles empty: auth owns them) and what entitlements fall back to when it is expired.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CachedProfile {
    #[prost(message, optional, tag = "1")]
    pub profile: Option<pb::Profile>,
    /// The default plan's features and daily limit: what an expired subscription grants.
    #[prost(string, repeated, tag = "2")]
    pub default_features: Vec<String>,
    #[prost(int32, tag = "3")]
    pub default_ai_daily_limit: i32,
}

/// What the `catalog` cache holds under each key (only the list the key names is set).
#[derive(Clone, PartialEq, prost::Message)]
pub struct CatalogList {
    #[prost(message, repeated, tag = "1")]
    pub profession_types: Vec<pb::ProfessionType>,
    #[prost(message, repeated, tag = "2")]
    pub business_categories: Vec<pb::BusinessCategory>,
    #[prost(message, repeated, tag = "3")]
    pub plans: Vec<pb::Plan>,
}

pub const PROFESSION_TYPES_KEY: &str = "profession_types";
pub const BUSINESS_CATEGORIES_KEY: &str = "business_categories";
pub const PLANS_KEY: &str = "plans";

/// Values bigger than this stay out of L1 (a profile encodes to a few hundred bytes).
const PROFILE_L1_MAX_VALUE_BYTES: usize = 16 * 1024;
/// Catalogs are a handful of lists: a few entries of up to 1 MiB each.
const CATALOG_L1_MAX_VALUE_BYTES: usize = 1024 * 1024;
const CATALOG_L1_MAX_ENTRIES: u64 = 8;

/// Every cache of the service.
#[derive(Debug, Clone)]
pub struct Caches {
    pub bus: CacheBus,
    pub profiles: TwoLevelCache<CachedProfile>,
    pub auth_users: TwoLevelCache<auth_pb::User>,
    pub catalogs: TwoLevelCache<CatalogList>,
}

impl Caches {
    pub fn new(bus: CacheBus, config: &CacheConfig) -> Self {
        let profiles = bus.cache(CacheSpec {
            name: "profile",
            schema_version: 1,
            l1_ttl: config.l1_ttl,
            l1_max_entries: config.l1_max_entries,
            l1_max_value_bytes: PROFILE_L1_MAX_VALUE_BYTES,
            l2_ttl: config.l2_ttl,
        });
        let auth_users = bus.cache(CacheSpec {
            name: "auth_user",
            schema_version: 1,
            l1_ttl: config.auth_ttl.min(config.l1_ttl),
            l1_max_entries: config.l1_max_entries,
            l1_max_value_bytes: PROFILE_L1_MAX_VALUE_BYTES,
            l2_ttl: config.auth_ttl,
        });
        let catalogs = bus.cache(CacheSpec {
            name: "catalog",
            schema_version: 1,
            l1_ttl: config.catalog_ttl,
            l1_max_entries: CATALOG_L1_MAX_ENTRIES,
            l1_max_value_bytes: CATALOG_L1_MAX_VALUE_BYTES,
            l2_ttl: config.catalog_ttl,
        });
        Self {
            bus,
            profiles,
            auth_users,
            catalogs,
        }
    }
}

pub fn timestamp(at: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: i32::try_from(at.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

/// The subscription status as the contract spells it.
pub fn status_from_db(status: &str) -> pb::SubscriptionStatus {
    match status {
        "active" => pb::SubscriptionStatus::Active,
        "trialing" => pb::SubscriptionStatus::Trialing,
        "past_due" => pb::SubscriptionStatus::PastDue,
        "canceled" => pb::SubscriptionStatus::Canceled,
        "expired" => pb::SubscriptionStatus::Expired,
        _ => pb::SubscriptionStatus::Unspecified,
    }
}

/// The ETag of a profile row: its version (bumped by every write to the profile or its
/// subscription) and a digest of what it shows from shared data (its plan and catalog
/// entries, by their last change), so a renamed plan changes it too.
pub fn etag(row: &ProfileRow) -> String {
    let mut digest = Sha256::new();
    digest.update(row.plan_id.as_bytes());
    for at in [
        Some(row.plan_updated_at),
        row.profession_type_updated_at,
        row.business_category_updated_at,
    ] {
        digest.update(at.map_or(0, |at| at.timestamp_micros()).to_be_bytes());
    }
    let digest = digest.finalize();
    let short: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{short}", row.version)
}

impl CachedProfile {
    pub fn from_row(row: ProfileRow) -> Self {
        let etag = etag(&row);
        let catalog_ref = |id: Option<uuid::Uuid>, name: Option<String>| {
            id.map(|id| pb::CatalogRef {
                id: id.to_string(),
                name: name.unwrap_or_default(),
            })
        };
        let profile = pb::Profile {
            user_id: row.user_id.to_string(),
            email: String::new(),
            display_name: row.display_name,
            bio: row.bio,
            avatar_url: row.avatar_url,
            profession_type: catalog_ref(row.profession_type_id, row.profession_type_name),
            business_category: catalog_ref(row.business_category_id, row.business_category_name),
            locale: row.locale,
            created_at: Some(timestamp(row.created_at)),
            updated_at: Some(timestamp(row.updated_at)),
            subscription: Some(pb::Subscription {
                plan_id: row.plan_id,
                status: status_from_db(&row.status).into(),
                plan_name: row.plan_name,
                features: row.plan_features,
                ai_daily_limit: row.plan_ai_daily_limit,
                end_date: row.end_date.map(timestamp),
                is_customer: row.plan_is_paid,
                // Computed at read time: see `with_expiry`.
                is_expired: false,
            }),
            roles: Vec::new(),
            etag,
        };
        Self {
            profile: Some(profile),
            default_features: row.default_features,
            default_ai_daily_limit: row.default_ai_daily_limit,
        }
    }
}

/// Whether a subscription is over at `now`: its end date passed, or it was marked expired.
pub fn is_expired(subscription: &pb::Subscription, now: DateTime<Utc>) -> bool {
    subscription.status == i32::from(pb::SubscriptionStatus::Expired)
        || subscription
            .end_date
            .as_ref()
            .is_some_and(|end| end.seconds < now.timestamp())
}
