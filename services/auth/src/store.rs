//! All of auth's SQL, as small named functions. Queries are checked at compile time against
//! the `auth` schema (offline data in `.sqlx/`; `./dev sqlx-prepare` refreshes it).
//!
//! State changes and their audit rows are written by one statement each, so an audit trail
//! never misses a change nor records one that did not happen.

use chrono::{DateTime, Utc};
use platform::postgres::StatementSpan as _;
use sqlx::PgPool;
use uuid::Uuid;

use crate::tokens::TokenHash;

#[derive(Debug, Clone)]
pub struct Store {
    db: PgPool,
}

/// What login needs about an account.
#[derive(Debug)]
pub struct Credentials {
    pub user_id: Uuid,
    pub password_hash: String,
    pub active: bool,
    pub roles: Vec<String>,
}

/// Where a request came from, for sessions and audit rows.
#[derive(Debug, Clone, Default)]
pub struct ClientInfo {
    pub ip_address: String,
    pub user_agent: String,
}

/// A session that a rotation (or a duplicate within the grace window) continues.
#[derive(Debug)]
pub struct LiveSession {
    pub session_id: Uuid,
    pub user_id: Uuid,
    pub roles: Vec<String>,
}

/// What the database knows about a presented refresh token that did not rotate.
#[derive(Debug)]
pub struct PresentedToken {
    pub session_id: Uuid,
    pub user_id: Uuid,
    pub rotated_at: Option<DateTime<Utc>>,
    pub session_live: bool,
    pub roles: Vec<String>,
}

#[derive(Debug)]
pub struct SessionRow {
    pub id: Uuid,
    pub device_name: String,
    pub ip_address: String,
    pub user_agent: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum RevokeOutcome {
    Revoked,
    AlreadyEnded,
    NotFound,
}

impl Store {
    pub fn new(db: PgPool) -> Self {
        Self { db }
    }

    /// Creates the account; `false` when the email is taken.
    pub async fn create_user(
        &self,
        user_id: Uuid,
        email: &str,
        password_hash: &str,
        display_name: &str,
        client: &ClientInfo,
    ) -> Result<bool, sqlx::Error> {
        let done = sqlx::query!(
            r#"
            with created as (
                insert into users (id, email, password_hash, display_name)
                values ($1, $2, $3, $4)
                on conflict do nothing
                returning id
            )
            insert into audit_events (kind, user_id, ip_address)
            select 'user_registered', id, $5 from created
            "#,
            user_id,
            email,
            password_hash,
            display_name,
            client.ip_address,
        )
        .execute(&self.db)
        .statement("auth.create_user")
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Bulk seeding for load tests: accounts `user{i}@example.com` ("User {i}") for the
    /// numbers `first..first + ids.len()`, all with one precomputed hash. Existing emails are
    /// left alone, so seeding again is harmless; returns how many were new.
    pub async fn seed_users(
        &self,
        first: i64,
        ids: &[Uuid],
        password_hash: &str,
    ) -> Result<u64, sqlx::Error> {
        let done = sqlx::query!(
            r#"
            insert into users (id, email, password_hash, display_name)
            select id, format('user%s@example.com', $2 + ord - 1), $3, format('User %s', $2 + ord - 1)
            from unnest($1::uuid[]) with ordinality as seeded(id, ord)
            on conflict do nothing
            "#,
            ids,
            first,
            password_hash,
        )
        .execute(&self.db)
        .statement("auth.seed_users")
        .await?;
        Ok(done.rows_affected())
    }

    pub async fn credentials(&self, email: &str) -> Result<Option<Credentials>, sqlx::Error> {
        let row = sqlx::query!(
            r#"
            select u.id, u.password_hash, u.status,
                   array(select role_name from user_roles r where r.user_id = u.id order by role_name)
                       as "roles!"
            from users u
            where lower(u.email) = lower($1)
            "#,
            email,
        )
        .fetch_optional(&self.db)
        .statement("auth.credentials")
        .await?;
        Ok(row.map(|r| Credentials {
            user_id: r.id,
            password_hash: r.password_hash,
            active: r.status == "active",
            roles: r.roles,
        }))
    }

    /// Records a failed login without saying whether the account exists.
    pub async fn record_login_failure(
        &self,
        user_id: Option<Uuid>,
        client: &ClientInfo,
    ) -> Result<(), sqlx::Error> {
        sqlx::query!(
            "insert into audit_events (kind, user_id, ip_address) values ('login_failed', $1, $2)",
            user_id,
            client.ip_address,
        )
        .execute(&self.db)
        .statement("auth.record_login_failure")
        .await?;
        Ok(())
    }

    /// Records a login refused by throttling (no account is named: the key may not be one).
    pub async fn record_login_throttled(&self, client: &ClientInfo) -> Result<(), sqlx::Error> {
        sqlx::query!(
            "insert into audit_events (kind, ip_address) values ('login_throttled', $1)",
            client.ip_address,
        )
        .execute(&self.db)
        .statement("auth.record_login_throttled")
        .await?;
        Ok(())
    }

    /// Opens a session with its first refresh token, and audits the login.
    #[allow(clippy::too_many_arguments)]
    pub async fn open_session(
        &self,
        session_id: Uuid,
        user_id: Uuid,
        device_name: &str,
        client: &ClientInfo,
        lifetime_seconds: f64,
        refresh_hash: &TokenHash,
    ) -> Result<(), sqlx::Error> {
        sqlx::query!(
            r#"
            with session as (
                insert into sessions (id, user_id, device_name, user_agent, ip_address, expires_at)
                values ($1, $2, $3, $4, $5, now() + make_interval(secs => $6))
                returning id, user_id
            ), token as (
                insert into refresh_tokens (token_hash, session_id)
                select $7, id from session
            )
            insert into audit_events (kind, user_id, session_id, ip_address)
            select 'login_succeeded', user_id, id, $5 from session
            "#,
            session_id,
            user_id,
            device_name,
            client.user_agent,
            client.ip_address,
            lifetime_seconds,
            refresh_hash.as_slice(),
        )
        .execute(&self.db)
        .statement("auth.open_session")
        .await?;
        Ok(())
    }

    /// Replaces a stored hash after a login with old parameters, unless it changed meanwhile.
    pub async fn rehash(&self, user_id: Uuid, old: &str, new: &str) -> Result<(), sqlx::Error> {
        sqlx::query!(
            "update users set password_hash = $3, updated_at = now() where id = $1 and password_hash = $2",
            user_id,
            old,
            new,
        )
        .execute(&self.db)
        .statement("auth.rehash")
        .await?;
        Ok(())
    }

    /// The one rotation of `presented`: marks it rotated and stores its successor, in one
    /// statement. Of concurrent calls with the same token exactly one gets `Some`; the others
    /// wait on the row lock, then find it rotated.
    pub async fn rotate(
        &self,
        presented: &TokenHash,
        successor: &TokenHash,
        idle_timeout_seconds: f64,
        client: &ClientInfo,
    ) -> Result<Option<LiveSession>, sqlx::Error> {
        let row = sqlx::query!(
            r#"
            with rotated as (
                update refresh_tokens t
                set rotated_at = now()
                from sessions s
                where t.token_hash = $1
                  and t.rotated_at is null
                  and s.id = t.session_id
                  and s.revoked_at is null
                  and s.expires_at > now()
                  and s.last_used_at > now() - make_interval(secs => $3)
                returning t.session_id, s.user_id
            ), successor as (
                insert into refresh_tokens (token_hash, session_id)
                select $2, session_id from rotated
            ), touched as (
                update sessions set last_used_at = now(), ip_address = $4
                where id in (select session_id from rotated)
            )
            select r.session_id, r.user_id,
                   array(select role_name from user_roles u where u.user_id = r.user_id order by role_name)
                       as "roles!"
            from rotated r
            "#,
            presented.as_slice(),
            successor.as_slice(),
            idle_timeout_seconds,
            client.ip_address,
        )
        .fetch_optional(&self.db)
        .statement("auth.rotate")
        .await?;
        Ok(row.map(|r| LiveSession {
            session_id: r.session_id,
            user_id: r.user_id,
            roles: r.roles,
        }))
    }

    /// Looks up a refresh token that did not rotate: already rotated, expired, or unknown.
    pub async fn presented(
        &self,
        presented: &TokenHash,
        idle_timeout_seconds: f64,
    ) -> Result<Option<PresentedToken>, sqlx::Error> {
        let row = sqlx::query!(
            r#"
            select t.session_id, s.user_id, t.rotated_at,
                   (s.revoked_at is null and s.expires_at > now()
                    and s.last_used_at > now() - make_interval(secs => $2)) as "session_live!",
                   array(select role_name from user_roles u where u.user_id = s.user_id order by role_name)
                       as "roles!"
            from refresh_tokens t
            join sessions s on s.id = t.session_id
            where t.token_hash = $1
            "#,
            presented.as_slice(),
            idle_timeout_seconds,
        )
        .fetch_optional(&self.db)
        .statement("auth.presented")
        .await?;
        Ok(row.map(|r| PresentedToken {
            session_id: r.session_id,
            user_id: r.user_id,
            rotated_at: r.rotated_at,
            session_live: r.session_live,
            roles: r.roles,
        }))
    }

    /// Whether `token` was issued to `session_id`, rotated since or not: a duplicate within
    /// the grace window is answered with the successor even if that has moved on, and then
    /// its own duplicate gets the next one.
    pub async fn was_issued_to(
        &self,
        session_id: Uuid,
        token: &TokenHash,
    ) -> Result<bool, sqlx::Error> {
        let found = sqlx::query_scalar!(
            r#"select exists (select 1 from refresh_tokens where token_hash = $1 and session_id = $2) as "found!""#,
            token.as_slice(),
            session_id,
        )
        .fetch_one(&self.db)
        .statement("auth.was_issued_to")
        .await?;
        Ok(found)
    }

    /// Ends one session (if still live) and audits why.
    pub async fn revoke_session(
        &self,
        user_id: Uuid,
        session_id: Uuid,
        reason: &str,
    ) -> Result<RevokeOutcome, sqlx::Error> {
        let row = sqlx::query!(
            r#"
            with target as (
                select id, revoked_at is not null as ended
                from sessions where id = $1 and user_id = $2
            ), ended as (
                update sessions set revoked_at = now(), revoked_reason = $3
                where id in (select id from target where not ended)
                returning id
            ), audited as (
                insert into audit_events (kind, user_id, session_id, detail)
                select 'session_revoked', $2, id, jsonb_build_object('reason', $3::text) from ended
            )
            select (select count(*) from target) as "found!", (select count(*) from ended) as "revoked!"
            "#,
            session_id,
            user_id,
            reason,
        )
        .fetch_one(&self.db)
        .statement("auth.revoke_session")
        .await?;
        Ok(match (row.found, row.revoked) {
            (0, _) => RevokeOutcome::NotFound,
            (_, 0) => RevokeOutcome::AlreadyEnded,
            _ => RevokeOutcome::Revoked,
        })
    }

    /// Ends every live session of the user except `keep`, and audits each.
    pub async fn revoke_all_sessions(
        &self,
        user_id: Uuid,
        keep: Option<Uuid>,
        reason: &str,
    ) -> Result<u64, sqlx::Error> {
        let revoked = sqlx::query_scalar!(
            r#"
            with ended as (
                update sessions set revoked_at = now(), revoked_reason = $3
                where user_id = $1 and revoked_at is null and id is distinct from $2
                returning id
            ), audited as (
                insert into audit_events (kind, user_id, session_id, detail)
                select 'session_revoked', $1, id, jsonb_build_object('reason', $3::text) from ended
            )
            select count(*) as "revoked!" from ended
            "#,
            user_id,
            keep,
            reason,
        )
        .fetch_one(&self.db)
        .statement("auth.revoke_all_sessions")
        .await?;
        Ok(u64::try_from(revoked).unwrap_or_default())
    }

    /// A refresh token was reused after the grace window: treat it as theft and end the
    /// whole family.
    pub async fn revoke_for_reuse(
        &self,
        user_id: Uuid,
        session_id: Uuid,
        client: &ClientInfo,
    ) -> Result<(), sqlx::Error> {
        sqlx::query!(
            r#"
            with ended as (
                update sessions set revoked_at = now(), revoked_reason = 'refresh_token_reuse'
                where id = $1 and revoked_at is null
                returning id
            )
            insert into audit_events (kind, user_id, session_id, ip_address, detail)
            values ('refresh_token_reuse', $2, $1, $3,
                    jsonb_build_object('family_revoked', (select count(*) from ended) > 0))
            "#,
            session_id,
            user_id,
            client.ip_address,
        )
        .execute(&self.db)
        .statement("auth.revoke_for_reuse")
        .await?;
        Ok(())
    }

    /// Whether the session exists and is live (auth checks its own callers with it).
    pub async fn session_is_live(
        &self,
        session_id: Uuid,
        idle_timeout_seconds: f64,
    ) -> Result<bool, sqlx::Error> {
        let live = sqlx::query_scalar!(
            r#"
            select exists (
                select 1 from sessions
                where id = $1 and revoked_at is null and expires_at > now()
                  and last_used_at > now() - make_interval(secs => $2)
            ) as "live!"
            "#,
            session_id,
            idle_timeout_seconds,
        )
        .fetch_one(&self.db)
        .statement("auth.session_is_live")
        .await?;
        Ok(live)
    }

    /// The user's live sessions, most recently used first, after the keyset `after`.
    pub async fn list_sessions(
        &self,
        user_id: Uuid,
        idle_timeout_seconds: f64,
        after: Option<(DateTime<Utc>, Uuid)>,
        limit: i64,
    ) -> Result<Vec<SessionRow>, sqlx::Error> {
        let (after_used, after_id) = after.unzip();
        sqlx::query_as!(
            SessionRow,
            r#"
            select id, device_name, ip_address, user_agent, created_at, last_used_at, expires_at
            from sessions
            where user_id = $1 and revoked_at is null and expires_at > now()
              and last_used_at > now() - make_interval(secs => $2)
              and ($3::timestamptz is null or (last_used_at, id) < ($3, $4::uuid))
            order by last_used_at desc, id desc
            limit $5
            "#,
            user_id,
            idle_timeout_seconds,
            after_used,
            after_id,
            limit,
        )
        .fetch_all(&self.db)
        .statement("auth.list_sessions")
        .await
    }

    pub async fn password_hash(&self, user_id: Uuid) -> Result<Option<String>, sqlx::Error> {
        sqlx::query_scalar!("select password_hash from users where id = $1", user_id)
            .fetch_optional(&self.db)
            .statement("auth.password_hash")
            .await
    }

    /// Sets the new hash and ends every other session, in one statement; returns how many
    /// sessions ended.
    pub async fn change_password(
        &self,
        user_id: Uuid,
        new_hash: &str,
        keep: Uuid,
    ) -> Result<u64, sqlx::Error> {
        let revoked = sqlx::query_scalar!(
            r#"
            with changed as (
                update users set password_hash = $2, updated_at = now() where id = $1 returning id
            ), ended as (
                update sessions set revoked_at = now(), revoked_reason = 'password_changed'
                where user_id in (select id from changed) and revoked_at is null and id <> $3
                returning id
            ), audited as (
                insert into audit_events (kind, user_id, session_id, detail)
                select 'password_changed', id, $3, jsonb_build_object('sessions_revoked', (select count(*) from ended))
                from changed
            )
            select count(*) as "revoked!" from ended
            "#,
            user_id,
            new_hash,
            keep,
        )
        .fetch_one(&self.db)
        .statement("auth.change_password")
        .await?;
        Ok(u64::try_from(revoked).unwrap_or_default())
    }

    /// Whether the user holds `role` now (admin checks read the database, not the token, so
    /// a revoked admin cannot act for the rest of a token's lifetime).
    pub async fn has_role(&self, user_id: Uuid, role: &str) -> Result<bool, sqlx::Error> {
        let held = sqlx::query_scalar!(
            r#"select exists (select 1 from user_roles where user_id = $1 and role_name = $2) as "held!""#,
            user_id,
            role,
        )
        .fetch_one(&self.db)
        .statement("auth.has_role")
        .await?;
        Ok(held)
    }

    /// Every role with its permissions, by name.
    pub async fn roles(&self) -> Result<Vec<RoleRow>, sqlx::Error> {
        sqlx::query_as!(
            RoleRow,
            r#"
            select r.name, r.description, r.created_at,
                   coalesce(array_agg(p.permission_name order by p.permission_name)
                            filter (where p.permission_name is not null), '{}') as "permissions!"
            from roles r
            left join role_permissions p on p.role_name = r.name
            group by r.name
            order by r.name
            "#
        )
        .fetch_all(&self.db)
        .statement("auth.roles")
        .await
    }

    /// A user's roles and the union of their permissions; `None` for an unknown user.
    pub async fn user_roles(&self, user_id: Uuid) -> Result<Option<UserRolesRow>, sqlx::Error> {
        sqlx::query_as!(
            UserRolesRow,
            r#"
            select array(select role_name from user_roles where user_id = u.id order by role_name)
                       as "roles!",
                   array(select distinct p.permission_name
                         from user_roles r join role_permissions p on p.role_name = r.role_name
                         where r.user_id = u.id order by 1) as "permissions!"
            from users u where u.id = $1
            "#,
            user_id,
        )
        .fetch_optional(&self.db)
        .statement("auth.user_roles")
        .await
    }

    /// Gives or takes a role, auditing real changes. Distinguishes an unknown user or role.
    pub async fn set_role(
        &self,
        user_id: Uuid,
        role: &str,
        grant: bool,
        actor: Option<Uuid>,
    ) -> Result<RoleChange, sqlx::Error> {
        let row = sqlx::query!(
            r#"
            with target as (
                select (select exists (select 1 from users where id = $1)) as user_found,
                       (select exists (select 1 from roles where name = $2)) as role_found
            ), granted as (
                insert into user_roles (user_id, role_name)
                select $1, $2 from target where $3 and user_found and role_found
                on conflict do nothing
                returning user_id
            ), revoked as (
                delete from user_roles
                where not $3 and user_id = $1 and role_name = $2
                returning user_id
            ), audited as (
                insert into audit_events (kind, user_id, detail)
                select case when $3 then 'role_assigned' else 'role_revoked' end, $1,
                       jsonb_build_object('role', $2::text, 'actor', $4::uuid)
                where exists (select 1 from granted) or exists (select 1 from revoked)
            )
            select user_found as "user_found!", role_found as "role_found!",
                   (exists (select 1 from granted) or exists (select 1 from revoked)) as "changed!"
            from target
            "#,
            user_id,
            role,
            grant,
            actor,
        )
        .fetch_one(&self.db)
        .statement("auth.set_role")
        .await?;
        Ok(match (row.user_found, row.role_found, row.changed) {
            (false, _, _) => RoleChange::UserNotFound,
            (_, false, _) => RoleChange::RoleNotFound,
            (true, true, true) => RoleChange::Changed,
            (true, true, false) => RoleChange::Unchanged,
        })
    }

    /// Assigns many (user, role) pairs in one transaction, all or nothing. Returns the
    /// indexes of pairs naming an unknown user or role (then nothing is written), else how
    /// many were new.
    pub async fn bulk_assign(
        &self,
        user_ids: &[Uuid],
        roles: &[String],
        actor: Option<Uuid>,
    ) -> Result<BulkOutcome, sqlx::Error> {
        let mut tx = self.db.begin().await?;
        let unknown = sqlx::query_scalar!(
            r#"
            select (pair.ordinality - 1)::int as "index!"
            from unnest($1::uuid[], $2::text[]) with ordinality as pair(user_id, role_name, ordinality)
            where not exists (select 1 from users u where u.id = pair.user_id)
               or not exists (select 1 from roles r where r.name = pair.role_name)
            order by 1
            "#,
            user_ids,
            roles,
        )
        .fetch_all(&mut *tx)
        .statement("auth.bulk_assign")
        .await?;
        if !unknown.is_empty() {
            return Ok(BulkOutcome::Unknown(unknown));
        }
        let assigned = sqlx::query_scalar!(
            r#"
            with granted as (
                insert into user_roles (user_id, role_name)
                select distinct * from unnest($1::uuid[], $2::text[])
                on conflict do nothing
                returning user_id, role_name
            ), audited as (
                insert into audit_events (kind, user_id, detail)
                select 'role_assigned', user_id,
                       jsonb_build_object('role', role_name, 'actor', $3::uuid, 'bulk', true)
                from granted
            )
            select count(*) as "assigned!" from granted
            "#,
            user_ids,
            roles,
            actor,
        )
        .fetch_one(&mut *tx)
        .statement("auth.bulk_assign")
        .await?;
        tx.commit().await?;
        Ok(BulkOutcome::Assigned(
            u64::try_from(assigned).unwrap_or_default(),
        ))
    }

    /// The id of the account with this email (for the `grant-role` command).
    pub async fn user_id_by_email(&self, email: &str) -> Result<Option<Uuid>, sqlx::Error> {
        sqlx::query_scalar!("select id from users where lower(email) = lower($1)", email)
            .fetch_optional(&self.db)
            .statement("auth.user_id_by_email")
            .await
    }

    /// Accounts by id, in no particular order; unknown ids are skipped.
    pub async fn users(&self, ids: &[Uuid]) -> Result<Vec<UserRow>, sqlx::Error> {
        sqlx::query_as!(
            UserRow,
            r#"
            select u.id, u.email, u.display_name, u.status, u.created_at, u.updated_at,
                   array(select role_name from user_roles r where r.user_id = u.id order by role_name)
                       as "roles!"
            from users u where u.id = any($1)
            "#,
            ids,
        )
        .fetch_all(&self.db)
        .statement("auth.users")
        .await
    }
}

/// One entry of the change log with the data its event carries: for `user` and `roles`
/// entries, the user's current row and roles (so a consumer lands on the latest state).
#[derive(Debug)]
pub struct ChangeRow {
    pub sequence: i64,
    pub kind: String,
    pub user_id: Option<Uuid>,
    pub session_id: Option<Uuid>,
    pub detail: serde_json::Value,
    pub occurred_at: DateTime<Utc>,
    pub email: Option<String>,
    pub display_name: Option<String>,
    pub status: Option<String>,
    pub created_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
    pub roles: Option<Vec<String>>,
}

/// The retained range of the change log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChangeLogBounds {
    /// Every sequence up to this one has been pruned (0: nothing yet).
    pub pruned_through: i64,
    /// The highest committed sequence (0: empty log).
    pub latest: i64,
}

impl Store {
    /// Up to `limit` change-log entries after `after`, in sequence (= commit) order.
    pub async fn changes_after(
        &self,
        after: i64,
        limit: i64,
    ) -> Result<Vec<ChangeRow>, sqlx::Error> {
        sqlx::query_as!(
            ChangeRow,
            r#"
            select e.sequence, e.kind, e.user_id, e.session_id, e.detail, e.occurred_at,
                   u.email as "email?", u.display_name as "display_name?", u.status as "status?",
                   u.created_at as "created_at?", u.updated_at as "updated_at?",
                   case when e.kind in ('user', 'roles') then
                       array(select role_name from user_roles r where r.user_id = e.user_id
                             order by role_name)
                   end as "roles?"
            from change_events e
            left join users u on u.id = e.user_id and e.kind in ('user', 'roles')
            where e.sequence > $1
            order by e.sequence
            limit $2
            "#,
            after,
            limit,
        )
        .fetch_all(&self.db)
        .statement("auth.changes_after")
        .await
    }

    pub async fn change_log_bounds(&self) -> Result<ChangeLogBounds, sqlx::Error> {
        let row = sqlx::query!(
            r#"
            select (select pruned_through from change_log_horizon) as "pruned_through!",
                   coalesce((select max(sequence) from change_events),
                            (select pruned_through from change_log_horizon)) as "latest!"
            "#
        )
        .fetch_one(&self.db)
        .statement("auth.change_log_bounds")
        .await?;
        Ok(ChangeLogBounds {
            pruned_through: row.pruned_through,
            latest: row.latest,
        })
    }

    /// Records the key set this replica signs with, unless it is already the latest one
    /// recorded (replicas of one release start with the same set).
    pub async fn record_key_set(&self, kids: &[String]) -> Result<bool, sqlx::Error> {
        let recorded = sqlx::query_scalar!(
            r#"
            with latest as (
                select detail -> 'kids' as kids from change_events
                where kind = 'key_set' order by sequence desc limit 1
            ), recorded as (
                select record_change('key_set', null, null, jsonb_build_object('kids', to_jsonb($1::text[])))
                where not exists (select 1 from latest where kids = to_jsonb($1::text[]))
            )
            select count(*) as "recorded!" from recorded
            "#,
            kids,
        )
        .fetch_one(&self.db)
        .statement("auth.record_key_set")
        .await?;
        Ok(recorded > 0)
    }
}

#[derive(Debug)]
pub struct RoleRow {
    pub name: String,
    pub description: String,
    pub created_at: DateTime<Utc>,
    pub permissions: Vec<String>,
}

#[derive(Debug)]
pub struct UserRolesRow {
    pub roles: Vec<String>,
    pub permissions: Vec<String>,
}

#[derive(Debug)]
pub struct UserRow {
    pub id: Uuid,
    pub email: String,
    pub display_name: String,
    pub status: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub roles: Vec<String>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum RoleChange {
    Changed,
    Unchanged,
    UserNotFound,
    RoleNotFound,
}

#[derive(Debug, PartialEq, Eq)]
pub enum BulkOutcome {
    Assigned(u64),
    /// Zero-based indexes of the pairs naming an unknown user or role.
    Unknown(Vec<i32>),
}

/// Rows deleted by one pruning run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PruneCounts {
    pub sessions: u64,
    pub refresh_tokens: u64,
    pub audit_events: u64,
    pub change_events: u64,
}

/// Advisory-lock key that lets one replica prune at a time.
const PRUNE_LOCK: i64 = 0x6175_7468_7072_756e;

impl Store {
    /// Deletes, in batches of `batch`: sessions ended more than `ended_keep` seconds ago (their
    /// refresh tokens go with them), refresh tokens rotated more than `rotated_keep` ago,
    /// audit rows older than `audit_keep`, and change-log entries older than `change_keep`.
    /// `None` when another replica holds the lock.
    pub async fn prune(
        &self,
        ended_keep: f64,
        idle_timeout: f64,
        rotated_keep: f64,
        audit_keep: f64,
        change_keep: f64,
        batch: i64,
    ) -> Result<Option<PruneCounts>, sqlx::Error> {
        let mut conn = self.db.acquire().await?;
        let locked = sqlx::query_scalar!(
            r#"select pg_try_advisory_lock($1) as "locked!""#,
            PRUNE_LOCK
        )
        .fetch_one(&mut *conn)
        .statement("auth.prune")
        .await?;
        if !locked {
            return Ok(None);
        }
        let full = |done: u64| i64::try_from(done).unwrap_or(i64::MAX) >= batch;
        let pruned = async {
            let mut counts = PruneCounts::default();
            loop {
                let done = sqlx::query!(
                    r#"
                    delete from sessions where id in (
                        select id from sessions
                        where coalesce(revoked_at,
                                       least(expires_at, last_used_at + make_interval(secs => $2)))
                              < now() - make_interval(secs => $1)
                        limit $3
                    )
                    "#,
                    ended_keep,
                    idle_timeout,
                    batch,
                )
                .execute(&mut *conn)
                .statement("auth.prune")
                .await?
                .rows_affected();
                counts.sessions += done;
                if !full(done) {
                    break;
                }
            }
            loop {
                let done = sqlx::query!(
                    r#"
                    delete from refresh_tokens where token_hash in (
                        select token_hash from refresh_tokens
                        where rotated_at < now() - make_interval(secs => $1)
                        limit $2
                    )
                    "#,
                    rotated_keep,
                    batch,
                )
                .execute(&mut *conn)
                .statement("auth.prune")
                .await?
                .rows_affected();
                counts.refresh_tokens += done;
                if !full(done) {
                    break;
                }
            }
            loop {
                let done = sqlx::query!(
                    r#"
                    delete from audit_events where id in (
                        select id from audit_events
                        where occurred_at < now() - make_interval(secs => $1)
                        limit $2
                    )
                    "#,
                    audit_keep,
                    batch,
                )
                .execute(&mut *conn)
                .statement("auth.prune")
                .await?
                .rows_affected();
                counts.audit_events += done;
                if !full(done) {
                    break;
                }
            }
            loop {
                // Forget the oldest entries and move the horizon past them in one statement,
                // so a consumer resuming from before it is told to start over.
                let done = sqlx::query_scalar!(
                    r#"
                    with pruned as (
                        delete from change_events where sequence in (
                            select sequence from change_events
                            where occurred_at < now() - make_interval(secs => $1)
                            order by sequence
                            limit $2
                        )
                        returning sequence
                    ), horizon as (
                        update change_log_horizon
                        set pruned_through = greatest(pruned_through, (select max(sequence) from pruned))
                        where exists (select 1 from pruned)
                    )
                    select count(*) as "pruned!" from pruned
                    "#,
                    change_keep,
                    batch,
                )
                .fetch_one(&mut *conn)
                .statement("auth.prune")
                .await?;
                let done = u64::try_from(done).unwrap_or_default();
                counts.change_events += done;
                if !full(done) {
                    break;
                }
            }
            Ok::<_, sqlx::Error>(counts)
        }
        .await;
        // Session-level lock: released explicitly, whatever happened above.
        let _ = sqlx::query_scalar!(
            r#"select pg_advisory_unlock($1) as "unlocked!""#,
            PRUNE_LOCK
        )
        .fetch_one(&mut *conn)
        .statement("auth.prune")
        .await;
        pruned.map(Some)
    }
}
