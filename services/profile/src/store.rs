//! All of profile's SQL, as small named functions. Queries are checked at compile time against
//! the `profile` schema (offline data in `.sqlx/`; `./dev sqlx-prepare` refreshes it).

use chrono::{DateTime, Utc};
use platform::postgres::StatementSpan as _;
use sqlx::PgPool;
use uuid::Uuid;

#[derive(Debug, Clone)]
pub struct Store {
    db: PgPool,
}

/// A profile with its subscription, plan and catalog names: what one statement reads.
#[derive(Debug, Clone)]
pub struct ProfileRow {
    pub user_id: Uuid,
    pub display_name: String,
    pub bio: String,
    pub avatar_url: String,
    pub profession_type_id: Option<Uuid>,
    pub profession_type_name: Option<String>,
    pub profession_type_updated_at: Option<DateTime<Utc>>,
    pub business_category_id: Option<Uuid>,
    pub business_category_name: Option<String>,
    pub business_category_updated_at: Option<DateTime<Utc>>,
    pub locale: String,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub plan_id: String,
    pub plan_name: String,
    pub plan_features: Vec<String>,
    pub plan_ai_daily_limit: i32,
    pub plan_is_paid: bool,
    pub plan_updated_at: DateTime<Utc>,
    pub status: String,
    pub end_date: Option<DateTime<Utc>>,
    pub default_features: Vec<String>,
    pub default_ai_daily_limit: i32,
}

/// The editable profile fields after a PATCH was applied to them.
#[derive(Debug, Clone)]
pub struct ProfileFields {
    pub display_name: String,
    pub bio: String,
    pub avatar_url: String,
    pub profession_type_id: Option<Uuid>,
    pub business_category_id: Option<Uuid>,
    pub locale: String,
}

/// A catalog entry (profession type or business category).
#[derive(Debug, Clone)]
pub struct CatalogRow {
    pub id: Uuid,
    pub name: String,
    pub sort_order: i32,
    pub archived: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct PlanRow {
    pub id: String,
    pub name: String,
    pub description: String,
    pub features: Vec<String>,
    pub ai_daily_limit: i32,
    pub is_paid: bool,
    pub sort_order: i32,
    pub archived: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A plan's fields as an admin sets them.
#[derive(Debug, Clone)]
pub struct PlanFields {
    pub name: String,
    pub description: String,
    pub features: Vec<String>,
    pub ai_daily_limit: i32,
    pub is_paid: bool,
    pub sort_order: i32,
}

#[derive(Debug, Clone)]
pub struct FrameRow {
    pub id: Uuid,
    pub name: String,
    pub image_url: String,
    pub business_category_id: Uuid,
    pub business_category_name: String,
    pub sort_order: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Which catalog a statement is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Catalog {
    ProfessionTypes,
    BusinessCategories,
}

/// The outcome of a write that names catalog entries or plans by id.
#[derive(Debug, PartialEq, Eq)]
pub enum WriteOutcome<T> {
    Done(T),
    NotFound,
    /// A unique name is taken.
    NameTaken,
    /// The target is archived (plans: no new subscribers).
    Archived,
}

/// Postgres `unique_violation`.
const UNIQUE_VIOLATION: &str = "23505";

fn is_unique_violation(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code == UNIQUE_VIOLATION)
}

impl Store {
    pub fn new(db: PgPool) -> Self {
        Self { db }
    }

    /// The profile of `user_id` with its subscription, plan (and the default plan, for
    /// expired subscriptions) and catalog names, in one statement; the profile is created
    /// (with `display_name`) when it does not exist yet. `None` only when a concurrent first
    /// read created it after this statement's snapshot: the caller reads again.
    #[tracing::instrument(name = "sql.load_profile", skip_all, level = "debug")]
    pub async fn load_or_create_profile(
        &self,
        user_id: Uuid,
        display_name: &str,
    ) -> Result<Option<ProfileRow>, sqlx::Error> {
        let row = sqlx::query_as!(
            ProfileRow,
            r#"
            with existing as (
                select user_id, display_name, bio, avatar_url, profession_type_id,
                       business_category_id, locale, version, created_at, updated_at
                from profiles
                where user_id = $1
            ), created as (
                insert into profiles (user_id, display_name)
                select $1::uuid, $2::text
                where not exists (select from existing)
                on conflict (user_id) do nothing
                returning user_id, display_name, bio, avatar_url, profession_type_id,
                          business_category_id, locale, version, created_at, updated_at
            ), profile as (
                select * from existing
                union all
                select * from created
            )
            select p.user_id as "user_id!", p.display_name as "display_name!", p.bio as "bio!",
                   p.avatar_url as "avatar_url!",
                   p.profession_type_id, pt.name as "profession_type_name?",
                   pt.updated_at as "profession_type_updated_at?",
                   p.business_category_id, bc.name as "business_category_name?",
                   bc.updated_at as "business_category_updated_at?",
                   p.locale as "locale!", p.version as "version!",
                   p.created_at as "created_at!", p.updated_at as "updated_at!",
                   pl.id as plan_id, pl.name as plan_name, pl.features as plan_features,
                   pl.ai_daily_limit as plan_ai_daily_limit, pl.is_paid as plan_is_paid,
                   pl.updated_at as plan_updated_at,
                   coalesce(s.status, 'active') as "status!", s.end_date as "end_date?",
                   dp.features as default_features, dp.ai_daily_limit as default_ai_daily_limit
            from profile p
            cross join plans dp
            left join subscriptions s on s.user_id = p.user_id
            join plans pl on pl.id = coalesce(s.plan_id, dp.id)
            left join profession_types pt on pt.id = p.profession_type_id
            left join business_categories bc on bc.id = p.business_category_id
            where dp.is_default
            "#,
            user_id,
            display_name,
        )
        .fetch_optional(&self.db)
        .statement("profile.load_or_create_profile")
        .await?;
        Ok(row)
    }

    /// Several existing profiles in one statement (no creation: batch reads are for users
    /// who have used the service).
    #[tracing::instrument(name = "sql.load_profiles", skip_all, level = "debug")]
    pub async fn load_profiles(&self, user_ids: &[Uuid]) -> Result<Vec<ProfileRow>, sqlx::Error> {
        sqlx::query_as!(
            ProfileRow,
            r#"
            select p.user_id, p.display_name, p.bio, p.avatar_url,
                   p.profession_type_id, pt.name as "profession_type_name?",
                   pt.updated_at as "profession_type_updated_at?",
                   p.business_category_id, bc.name as "business_category_name?",
                   bc.updated_at as "business_category_updated_at?",
                   p.locale, p.version, p.created_at, p.updated_at,
                   pl.id as plan_id, pl.name as plan_name, pl.features as plan_features,
                   pl.ai_daily_limit as plan_ai_daily_limit, pl.is_paid as plan_is_paid,
                   pl.updated_at as plan_updated_at,
                   coalesce(s.status, 'active') as "status!", s.end_date as "end_date?",
                   dp.features as default_features, dp.ai_daily_limit as default_ai_daily_limit
            from profiles p
            cross join plans dp
            left join subscriptions s on s.user_id = p.user_id
            join plans pl on pl.id = coalesce(s.plan_id, dp.id)
            left join profession_types pt on pt.id = p.profession_type_id
            left join business_categories bc on bc.id = p.business_category_id
            where dp.is_default and p.user_id = any($1)
            "#,
            user_ids,
        )
        .fetch_all(&self.db)
        .statement("profile.load_profiles")
        .await
    }

    /// Applies a PATCH under the row lock, in one transaction: `apply` sees the current row
    /// (to check the ETag and merge the fields) and returns the new fields, or an error that
    /// aborts. Catalog ids must name live entries. Returns `None` when there is no profile.
    #[tracing::instrument(name = "sql.update_profile", skip_all, level = "debug")]
    pub async fn update_profile<E>(
        &self,
        user_id: Uuid,
        apply: impl FnOnce(&ProfileRow) -> Result<ProfileFields, E>,
    ) -> Result<Option<Result<(), E>>, UpdateError> {
        let mut tx = self.db.begin().await?;
        let current = sqlx::query_as!(
            ProfileRow,
            r#"
            select p.user_id, p.display_name, p.bio, p.avatar_url,
                   p.profession_type_id, pt.name as "profession_type_name?",
                   pt.updated_at as "profession_type_updated_at?",
                   p.business_category_id, bc.name as "business_category_name?",
                   bc.updated_at as "business_category_updated_at?",
                   p.locale, p.version, p.created_at, p.updated_at,
                   pl.id as plan_id, pl.name as plan_name, pl.features as plan_features,
                   pl.ai_daily_limit as plan_ai_daily_limit, pl.is_paid as plan_is_paid,
                   pl.updated_at as plan_updated_at,
                   coalesce(s.status, 'active') as "status!", s.end_date as "end_date?",
                   dp.features as default_features, dp.ai_daily_limit as default_ai_daily_limit
            from profiles p
            cross join plans dp
            left join subscriptions s on s.user_id = p.user_id
            join plans pl on pl.id = coalesce(s.plan_id, dp.id)
            left join profession_types pt on pt.id = p.profession_type_id
            left join business_categories bc on bc.id = p.business_category_id
            where dp.is_default and p.user_id = $1
            for update of p
            "#,
            user_id,
        )
        .fetch_optional(&mut *tx)
        .statement("profile.update_profile")
        .await?;
        let Some(current) = current else {
            return Ok(None);
        };
        let fields = match apply(&current) {
            Ok(fields) => fields,
            Err(e) => return Ok(Some(Err(e))),
        };
        // Only a changed reference must name a live entry: one archived after the user chose
        // it stays, as the contract says.
        let check_profession = fields
            .profession_type_id
            .filter(|id| Some(*id) != current.profession_type_id);
        let check_category = fields
            .business_category_id
            .filter(|id| Some(*id) != current.business_category_id);
        let live = sqlx::query!(
            r#"
            select
                ($1::uuid is null or exists (
                    select from profession_types where id = $1 and archived_at is null
                )) as "profession_ok!",
                ($2::uuid is null or exists (
                    select from business_categories where id = $2 and archived_at is null
                )) as "category_ok!"
            "#,
            check_profession,
            check_category,
        )
        .fetch_one(&mut *tx)
        .statement("profile.update_profile")
        .await?;
        if !live.profession_ok {
            return Err(UpdateError::UnknownReference("profession_type_id"));
        }
        if !live.category_ok {
            return Err(UpdateError::UnknownReference("business_category_id"));
        }
        sqlx::query!(
            r#"
            update profiles
            set display_name = $2, bio = $3, avatar_url = $4, profession_type_id = $5,
                business_category_id = $6, locale = $7, version = version + 1,
                updated_at = now()
            where user_id = $1
            "#,
            user_id,
            fields.display_name,
            fields.bio,
            fields.avatar_url,
            fields.profession_type_id,
            fields.business_category_id,
            fields.locale,
        )
        .execute(&mut *tx)
        .statement("profile.update_profile")
        .await?;
        tx.commit().await?;
        Ok(Some(Ok(())))
    }

    /// Sets a user's subscription (an upsert) and bumps the profile's version, so its ETag
    /// changes. The plan must exist and not be archived.
    #[tracing::instrument(name = "sql.set_subscription", skip_all, level = "debug")]
    pub async fn set_subscription(
        &self,
        user_id: Uuid,
        plan_id: &str,
        status: &str,
        end_date: Option<DateTime<Utc>>,
    ) -> Result<WriteOutcome<()>, sqlx::Error> {
        let row = sqlx::query!(
            r#"
            with plan as (
                select id, archived_at is not null as archived from plans where id = $2
            ), written as (
                insert into subscriptions (user_id, plan_id, status, end_date)
                select $1, id, $3, $4 from plan where not archived
                on conflict (user_id) do update
                set plan_id = excluded.plan_id, status = excluded.status,
                    end_date = excluded.end_date, updated_at = now()
                returning user_id
            ), bumped as (
                update profiles set version = version + 1, updated_at = now()
                where user_id in (select user_id from written)
            )
            select (select archived from plan) as archived,
                   exists (select from written) as "written!"
            "#,
            user_id,
            plan_id,
            status,
            end_date,
        )
        .fetch_one(&self.db)
        .statement("profile.set_subscription")
        .await?;
        Ok(match (row.archived, row.written) {
            (None, _) => WriteOutcome::NotFound,
            (Some(true), _) => WriteOutcome::Archived,
            (Some(false), true) => WriteOutcome::Done(()),
            // The profile row vanished between the caller's read and this write.
            (Some(false), false) => WriteOutcome::NotFound,
        })
    }

    /// A user's customer frames with their business category names, in order.
    #[tracing::instrument(name = "sql.customer_frames", skip_all, level = "debug")]
    pub async fn customer_frames(&self, user_id: Uuid) -> Result<Vec<FrameRow>, sqlx::Error> {
        sqlx::query_as!(
            FrameRow,
            r#"
            select f.id, f.name, f.image_url, f.business_category_id,
                   bc.name as business_category_name, f.sort_order, f.created_at, f.updated_at
            from customer_frames f
            join business_categories bc on bc.id = f.business_category_id
            where f.user_id = $1
            order by f.sort_order, f.id
            "#,
            user_id,
        )
        .fetch_all(&self.db)
        .statement("profile.customer_frames")
        .await
    }

    /// Every entry of a catalog (archived ones too: callers filter), by sort order then name.
    #[tracing::instrument(name = "sql.catalog", skip_all, level = "debug")]
    pub async fn catalog(&self, catalog: Catalog) -> Result<Vec<CatalogRow>, sqlx::Error> {
        match catalog {
            Catalog::ProfessionTypes => {
                sqlx::query_as!(
                    CatalogRow,
                    r#"
                    select id, name, sort_order, archived_at is not null as "archived!",
                           created_at, updated_at
                    from profession_types
                    order by sort_order, lower(name), id
                    "#
                )
                .fetch_all(&self.db)
                .statement("profile.catalog")
                .await
            }
            Catalog::BusinessCategories => {
                sqlx::query_as!(
                    CatalogRow,
                    r#"
                    select id, name, sort_order, archived_at is not null as "archived!",
                           created_at, updated_at
                    from business_categories
                    order by sort_order, lower(name), id
                    "#
                )
                .fetch_all(&self.db)
                .statement("profile.catalog")
                .await
            }
        }
    }

    #[tracing::instrument(name = "sql.create_catalog_entry", skip_all, level = "debug")]
    pub async fn create_catalog_entry(
        &self,
        catalog: Catalog,
        id: Uuid,
        name: &str,
        sort_order: i32,
    ) -> Result<WriteOutcome<CatalogRow>, sqlx::Error> {
        let result = match catalog {
            Catalog::ProfessionTypes => {
                sqlx::query_as!(
                    CatalogRow,
                    r#"
                    insert into profession_types (id, name, sort_order) values ($1, $2, $3)
                    returning id, name, sort_order, false as "archived!", created_at, updated_at
                    "#,
                    id,
                    name,
                    sort_order,
                )
                .fetch_one(&self.db)
                .statement("profile.create_catalog_entry")
                .await
            }
            Catalog::BusinessCategories => {
                sqlx::query_as!(
                    CatalogRow,
                    r#"
                    insert into business_categories (id, name, sort_order) values ($1, $2, $3)
                    returning id, name, sort_order, false as "archived!", created_at, updated_at
                    "#,
                    id,
                    name,
                    sort_order,
                )
                .fetch_one(&self.db)
                .statement("profile.create_catalog_entry")
                .await
            }
        };
        match result {
            Ok(row) => Ok(WriteOutcome::Done(row)),
            Err(e) if is_unique_violation(&e) => Ok(WriteOutcome::NameTaken),
            Err(e) => Err(e),
        }
    }

    /// Sets the given fields (`None` keeps the current value).
    #[tracing::instrument(name = "sql.update_catalog_entry", skip_all, level = "debug")]
    pub async fn update_catalog_entry(
        &self,
        catalog: Catalog,
        id: Uuid,
        name: Option<&str>,
        sort_order: Option<i32>,
    ) -> Result<WriteOutcome<CatalogRow>, sqlx::Error> {
        let result = match catalog {
            Catalog::ProfessionTypes => {
                sqlx::query_as!(
                    CatalogRow,
                    r#"
                    update profession_types
                    set name = coalesce($2, name), sort_order = coalesce($3, sort_order),
                        updated_at = now()
                    where id = $1
                    returning id, name, sort_order, archived_at is not null as "archived!",
                              created_at, updated_at
                    "#,
                    id,
                    name,
                    sort_order,
                )
                .fetch_optional(&self.db)
                .statement("profile.update_catalog_entry")
                .await
            }
            Catalog::BusinessCategories => {
                sqlx::query_as!(
                    CatalogRow,
                    r#"
                    update business_categories
                    set name = coalesce($2, name), sort_order = coalesce($3, sort_order),
                        updated_at = now()
                    where id = $1
                    returning id, name, sort_order, archived_at is not null as "archived!",
                              created_at, updated_at
                    "#,
                    id,
                    name,
                    sort_order,
                )
                .fetch_optional(&self.db)
                .statement("profile.update_catalog_entry")
                .await
            }
        };
        match result {
            Ok(Some(row)) => Ok(WriteOutcome::Done(row)),
            Ok(None) => Ok(WriteOutcome::NotFound),
            Err(e) if is_unique_violation(&e) => Ok(WriteOutcome::NameTaken),
            Err(e) => Err(e),
        }
    }

    /// Archives an entry (idempotent); `false` when there is no such entry.
    #[tracing::instrument(name = "sql.archive_catalog_entry", skip_all, level = "debug")]
    pub async fn archive_catalog_entry(
        &self,
        catalog: Catalog,
        id: Uuid,
    ) -> Result<bool, sqlx::Error> {
        let done = match catalog {
            Catalog::ProfessionTypes => {
                sqlx::query!(
                    r#"
                    update profession_types
                    set archived_at = coalesce(archived_at, now()), updated_at = now()
                    where id = $1
                    "#,
                    id,
                )
                .execute(&self.db)
                .statement("profile.archive_catalog_entry")
                .await?
            }
            Catalog::BusinessCategories => {
                sqlx::query!(
                    r#"
                    update business_categories
                    set archived_at = coalesce(archived_at, now()), updated_at = now()
                    where id = $1
                    "#,
                    id,
                )
                .execute(&self.db)
                .statement("profile.archive_catalog_entry")
                .await?
            }
        };
        Ok(done.rows_affected() == 1)
    }

    /// Every plan (archived ones too: callers filter), by sort order.
    #[tracing::instrument(name = "sql.plans", skip_all, level = "debug")]
    pub async fn plans(&self) -> Result<Vec<PlanRow>, sqlx::Error> {
        sqlx::query_as!(
            PlanRow,
            r#"
            select id, name, description, features, ai_daily_limit, is_paid, sort_order,
                   archived_at is not null as "archived!", created_at, updated_at
            from plans
            order by sort_order, id
            "#
        )
        .fetch_all(&self.db)
        .statement("profile.plans")
        .await
    }

    #[tracing::instrument(name = "sql.create_plan", skip_all, level = "debug")]
    pub async fn create_plan(
        &self,
        id: &str,
        fields: &PlanFields,
    ) -> Result<WriteOutcome<PlanRow>, sqlx::Error> {
        let row = sqlx::query_as!(
            PlanRow,
            r#"
            insert into plans (id, name, description, features, ai_daily_limit, is_paid, sort_order)
            values ($1, $2, $3, $4, $5, $6, $7)
            on conflict (id) do nothing
            returning id, name, description, features, ai_daily_limit, is_paid, sort_order,
                      false as "archived!", created_at, updated_at
            "#,
            id,
            fields.name,
            fields.description,
            &fields.features,
            fields.ai_daily_limit,
            fields.is_paid,
            fields.sort_order,
        )
        .fetch_optional(&self.db)
        .statement("profile.create_plan")
        .await?;
        Ok(row.map_or(WriteOutcome::NameTaken, WriteOutcome::Done))
    }

    /// Replaces a plan's editable fields (the caller merged the mask onto the current ones).
    #[tracing::instrument(name = "sql.update_plan", skip_all, level = "debug")]
    pub async fn update_plan(
        &self,
        id: &str,
        fields: &PlanFields,
    ) -> Result<WriteOutcome<PlanRow>, sqlx::Error> {
        let row = sqlx::query_as!(
            PlanRow,
            r#"
            update plans
            set name = $2, description = $3, features = $4, ai_daily_limit = $5, is_paid = $6,
                sort_order = $7, updated_at = now()
            where id = $1
            returning id, name, description, features, ai_daily_limit, is_paid, sort_order,
                      archived_at is not null as "archived!", created_at, updated_at
            "#,
            id,
            fields.name,
            fields.description,
            &fields.features,
            fields.ai_daily_limit,
            fields.is_paid,
            fields.sort_order,
        )
        .fetch_optional(&self.db)
        .statement("profile.update_plan")
        .await?;
        Ok(row.map_or(WriteOutcome::NotFound, WriteOutcome::Done))
    }

    /// Archives a plan (idempotent). The default plan cannot be archived.
    #[tracing::instrument(name = "sql.archive_plan", skip_all, level = "debug")]
    pub async fn archive_plan(&self, id: &str) -> Result<WriteOutcome<()>, sqlx::Error> {
        let row = sqlx::query!(
            r#"
            with plan as (select id, is_default from plans where id = $1), archived as (
                update plans set archived_at = coalesce(archived_at, now()), updated_at = now()
                where id in (select id from plan where not is_default)
                returning id
            )
            select (select is_default from plan) as is_default
            "#,
            id,
        )
        .fetch_one(&self.db)
        .statement("profile.archive_plan")
        .await?;
        Ok(match row.is_default {
            None => WriteOutcome::NotFound,
            // The contract's ABORTED: every user without a subscription is on it.
            Some(true) => WriteOutcome::Archived,
            Some(false) => WriteOutcome::Done(()),
        })
    }

    /// Records that these users read their profile now, for cache warming: one statement for
    /// a batch, touching only rows not touched within the last hour.
    #[tracing::instrument(name = "sql.touch_active", skip_all, level = "debug")]
    pub async fn touch_active(&self, user_ids: &[Uuid]) -> Result<u64, sqlx::Error> {
        let done = sqlx::query!(
            r#"
            update profiles set last_active_at = now()
            where user_id = any($1) and last_active_at < now() - interval '1 hour'
            "#,
            user_ids,
        )
        .execute(&self.db)
        .statement("profile.touch_active")
        .await?;
        Ok(done.rows_affected())
    }

    /// Users who read their profile within `within_seconds`, most recent first.
    #[tracing::instrument(name = "sql.recently_active", skip_all, level = "debug")]
    pub async fn recently_active(
        &self,
        within_seconds: f64,
        limit: i64,
    ) -> Result<Vec<Uuid>, sqlx::Error> {
        sqlx::query_scalar!(
            r#"
            select user_id from profiles
            where last_active_at > now() - make_interval(secs => $1)
            order by last_active_at desc
            limit $2
            "#,
            within_seconds,
            limit,
        )
        .fetch_all(&self.db)
        .statement("profile.recently_active")
        .await
    }
}

/// Why a profile update did not commit (besides the caller's own refusal).
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// A changed catalog reference that names no live entry; the field's name.
    #[error("unknown or archived {0}")]
    UnknownReference(&'static str),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}
