//! The durable generation-job queue in notes' Postgres, and the workers that run it.
//!
//! A job is a row. Workers (inside every notes replica) claim one with
//! `FOR UPDATE SKIP LOCKED`, which stamps it with a fresh lease id and `lease_until`; a
//! heartbeat and every progress step push `lease_until` forward. A queued job due now, or a
//! running one whose lease has expired (its worker died), can be claimed. Every write a worker
//! makes is conditional on its lease id and `status = 'running'`, so a worker that lost its
//! lease writes nothing, and the result is written exactly once: by the claim that finishes
//! first. Failures are retried with exponential backoff until `max_attempts`, then the job
//! fails with the error kept. A cancel of a running job sets `cancel_requested`, which the
//! worker sees at the job's next progress step. Finishing a job writes its notification in
//! the same transaction.

use std::{sync::Arc, time::Duration};

use chrono::{DateTime, NaiveDate, Utc};
use platform::config::Env;
use serde_json::{Value, json};
use sqlx::{PgPool, Postgres, Transaction};
use tokio::sync::{Notify, mpsc, watch};
use uuid::Uuid;

use crate::{
    error::NotesError,
    generator::{self, GenerateError, Generator, Output, Progress, QuizQuestion},
    notifications::Hub,
    store::Store,
};

/// Job settings (`NOTES_JOB_*`, `NOTES_GENERATOR_*`).
#[derive(Debug, Clone)]
pub struct JobConfig {
    /// `NOTES_JOB_WORKERS` (default 1): workers in this replica; 0 runs none (and no queue
    /// sampling or pruning: an API-only replica).
    pub workers: usize,
    /// `NOTES_JOB_LEASE` (default 30s): how long a claim holds a job without a heartbeat.
    pub lease: Duration,
    /// `NOTES_JOB_MAX_ATTEMPTS` (default 3): attempts before a job fails for good.
    pub max_attempts: i32,
    /// `NOTES_JOB_RETRY_BASE_DELAY` (default 2s): the first retry's wait, doubled per retry.
    pub retry_base_delay: Duration,
    /// `NOTES_JOB_POLL_INTERVAL` (default 1s): how often an idle worker looks for work that
    /// another replica queued (jobs queued here wake a worker at once).
    pub poll_interval: Duration,
    /// `NOTES_GENERATOR_STEP_DELAY` (default 0): a pause after each progress step, to watch
    /// progress in demonstrations and tests.
    pub step_delay: Duration,
    /// `NOTES_JOB_RETENTION` (default 30 days): finished jobs older than this are deleted.
    pub retention: Duration,
}

impl JobConfig {
    pub fn from_env(env: &Env) -> Self {
        let config = Self {
            workers: env.or("JOB_WORKERS", 1),
            lease: env.duration_or("JOB_LEASE", Duration::from_secs(30)),
            max_attempts: env.or("JOB_MAX_ATTEMPTS", 3),
            retry_base_delay: env.duration_or("JOB_RETRY_BASE_DELAY", Duration::from_secs(2)),
            poll_interval: env.duration_or("JOB_POLL_INTERVAL", Duration::from_secs(1)),
            step_delay: env.duration_or("GENERATOR_STEP_DELAY", Duration::ZERO),
            retention: env.duration_or("JOB_RETENTION", Duration::from_secs(30 * 24 * 3600)),
        };
        if config.lease < Duration::from_millis(100) {
            env.problem(&env.name("JOB_LEASE"), "must be at least 100ms".to_owned());
        }
        if !(1..=20).contains(&config.max_attempts) {
            env.problem(&env.name("JOB_MAX_ATTEMPTS"), "must be 1–20".to_owned());
        }
        if config.poll_interval < Duration::from_millis(10) {
            env.problem(
                &env.name("JOB_POLL_INTERVAL"),
                "must be at least 10ms".to_owned(),
            );
        }
        config
    }
}

/// The kinds of generation, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Summary,
    Explanation,
    Quiz,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Summary => "summary",
            Self::Explanation => "explanation",
            Self::Quiz => "quiz",
        }
    }

    pub fn parse(stored: &str) -> Option<Self> {
        match stored {
            "summary" => Some(Self::Summary),
            "explanation" => Some(Self::Explanation),
            "quiz" => Some(Self::Quiz),
            _ => None,
        }
    }
}

/// A validated generation request with defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobSpec {
    pub kind: Kind,
    /// SUMMARY's max_sentences, EXPLANATION's max_terms or QUIZ's question_count.
    pub count: i32,
    pub language: Option<String>,
}

impl JobSpec {
    fn count_field(&self) -> &'static str {
        match self.kind {
            Kind::Summary => "max_sentences",
            Kind::Explanation => "max_terms",
            Kind::Quiz => "question_count",
        }
    }

    pub fn options_json(&self) -> Value {
        let mut options = serde_json::Map::new();
        options.insert(self.count_field().to_owned(), json!(self.count));
        if let Some(language) = &self.language {
            options.insert("language".to_owned(), json!(language));
        }
        Value::Object(options)
    }

    /// Kind and options in one canonical text: equal for identical requests.
    pub fn dedupe_key(&self) -> String {
        format!(
            "{}:{}={}:language={}",
            self.kind.as_str(),
            self.count_field(),
            self.count,
            self.language.as_deref().unwrap_or("")
        )
    }

    /// The spec of a stored job (`None` if the row cannot be read).
    pub(crate) fn from_stored(kind: &str, options: &Value) -> Option<Self> {
        let kind = Kind::parse(kind)?;
        let spec = Self {
            kind,
            count: 0,
            language: options
                .get("language")
                .and_then(Value::as_str)
                .map(str::to_owned),
        };
        let count = options.get(spec.count_field())?.as_i64()?;
        Some(Self {
            count: i32::try_from(count).ok()?,
            ..spec
        })
    }

    fn request(&self) -> generator::Request {
        let count = usize::try_from(self.count).unwrap_or(1);
        match self.kind {
            Kind::Summary => generator::Request::Summary {
                max_sentences: count,
            },
            Kind::Explanation => generator::Request::Explanation { max_terms: count },
            Kind::Quiz => generator::Request::Quiz {
                question_count: count,
            },
        }
    }
}

/// A job as stored.
#[derive(Debug, Clone)]
pub struct JobRow {
    pub id: Uuid,
    pub note_id: Uuid,
    pub kind: String,
    pub options: Value,
    pub status: String,
    pub progress: i32,
    pub message: String,
    pub result: Option<Value>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub attempts: i32,
    pub max_attempts: i32,
    pub cancel_requested: bool,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl JobRow {
    pub fn spec(&self) -> Option<JobSpec> {
        JobSpec::from_stored(&self.kind, &self.options)
    }
}

/// A notification as stored.
#[derive(Debug, Clone)]
pub struct NotificationRow {
    pub id: Uuid,
    pub sequence: i64,
    pub kind: String,
    pub title: String,
    pub body: String,
    pub job_id: Option<Uuid>,
    pub note_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub read_at: Option<DateTime<Utc>>,
}

/// How StartGeneration ended.
#[derive(Debug)]
pub enum Started {
    /// A new job was queued and one unit of quota taken.
    Created(JobRow),
    /// An identical queued or running job: no quota taken.
    Existing(JobRow),
    /// The day's quota is used up.
    QuotaExceeded,
}

/// How a cancel ended.
#[derive(Debug)]
pub enum Cancelled {
    /// The job now, and the sequence of its notification when it was cancelled at once.
    Done(Box<JobRow>, Option<i64>),
    /// Succeeded or failed already.
    Finished,
    NotFound,
}

/// The queue's SQL.
#[derive(Debug, Clone)]
pub struct Jobs {
    db: PgPool,
}

/// A job as a worker claimed it.
#[derive(Debug)]
struct Claimed {
    id: Uuid,
    owner_id: Uuid,
    note_id: Uuid,
    kind: String,
    options: Value,
    attempts: i32,
    max_attempts: i32,
    lease_id: Uuid,
}

/// Finishing outcomes, as stored.
#[derive(Debug, Clone)]
enum Finish {
    Succeeded(Value),
    Failed { code: String, message: String },
    Cancelled,
}

/// The UTC day a quota unit counts against.
pub fn quota_day(now: DateTime<Utc>) -> NaiveDate {
    now.date_naive()
}

fn interval(duration: Duration) -> sqlx::postgres::types::PgInterval {
    sqlx::postgres::types::PgInterval {
        months: 0,
        days: 0,
        microseconds: i64::try_from(duration.as_micros()).unwrap_or(i64::MAX),
    }
}

impl Jobs {
    pub fn new(db: PgPool) -> Self {
        Self { db }
    }

    /// An identical queued or running job of the caller's, if any.
    pub async fn active_duplicate(
        &self,
        owner_id: Uuid,
        note_id: Uuid,
        dedupe_key: &str,
    ) -> Result<Option<JobRow>, sqlx::Error> {
        sqlx::query_as!(
            JobRow,
            r#"
            select id, note_id, kind, options, status, progress, message, result, error_code,
                   error_message, attempts, max_attempts, cancel_requested, created_at,
                   started_at, updated_at, finished_at
            from generation_jobs
            where owner_id = $1 and note_id = $2 and dedupe_key = $3
              and status in ('queued', 'running')
            "#,
            owner_id,
            note_id,
            dedupe_key,
        )
        .fetch_optional(&self.db)
        .await
    }

    /// Takes one unit of the day's quota and queues the job, in one transaction: the quota
    /// row's lock makes check-and-increment atomic, and a concurrent identical request that
    /// queued first rolls this one back (quota untouched) and returns its job.
    pub async fn start(
        &self,
        owner_id: Uuid,
        note_id: Uuid,
        spec: &JobSpec,
        daily_limit: i32,
        max_attempts: i32,
        day: NaiveDate,
    ) -> Result<Started, NotesError> {
        let mut tx = self.db.begin().await?;
        let note = sqlx::query_scalar!(
            "select id from notes where id = $1 and owner_id = $2",
            note_id,
            owner_id
        )
        .fetch_optional(&mut *tx)
        .await?;
        if note.is_none() {
            return Err(NotesError::NoteNotFound);
        }
        let taken = sqlx::query_scalar!(
            r#"
            insert into generation_quota as q (owner_id, day, used)
            select $1, $2, 1 where $3 > 0
            on conflict (owner_id, day) do update set used = q.used + 1 where q.used < $3
            returning used
            "#,
            owner_id,
            day,
            daily_limit,
        )
        .fetch_optional(&mut *tx)
        .await?;
        if taken.is_none() {
            return Ok(Started::QuotaExceeded);
        }
        let dedupe_key = spec.dedupe_key();
        let inserted = sqlx::query_as!(
            JobRow,
            r#"
            insert into generation_jobs
                (id, owner_id, note_id, kind, options, dedupe_key, max_attempts, message)
            values ($1, $2, $3, $4, $5, $6, $7, 'queued')
            on conflict (owner_id, note_id, dedupe_key) where status in ('queued', 'running')
                do nothing
            returning id, note_id, kind, options, status, progress, message, result, error_code,
                      error_message, attempts, max_attempts, cancel_requested, created_at,
                      started_at, updated_at, finished_at
            "#,
            Uuid::now_v7(),
            owner_id,
            note_id,
            spec.kind.as_str(),
            spec.options_json(),
            dedupe_key,
            max_attempts,
        )
        .fetch_optional(&mut *tx)
        .await?;
        match inserted {
            Some(job) => {
                tx.commit().await?;
                Ok(Started::Created(job))
            }
            None => {
                tx.rollback().await?;
                match self
                    .active_duplicate(owner_id, note_id, &dedupe_key)
                    .await?
                {
                    Some(job) => Ok(Started::Existing(job)),
                    // It finished in between: the caller may simply ask again.
                    None => Err(NotesError::Database(sqlx::Error::RowNotFound)),
                }
            }
        }
    }

    /// Units taken on `day`.
    pub async fn quota_used(&self, owner_id: Uuid, day: NaiveDate) -> Result<i32, sqlx::Error> {
        Ok(sqlx::query_scalar!(
            "select used from generation_quota where owner_id = $1 and day = $2",
            owner_id,
            day
        )
        .fetch_optional(&self.db)
        .await?
        .unwrap_or(0))
    }

    pub async fn get(&self, owner_id: Uuid, job_id: Uuid) -> Result<Option<JobRow>, sqlx::Error> {
        sqlx::query_as!(
            JobRow,
            r#"
            select id, note_id, kind, options, status, progress, message, result, error_code,
                   error_message, attempts, max_attempts, cancel_requested, created_at,
                   started_at, updated_at, finished_at
            from generation_jobs where id = $1 and owner_id = $2
            "#,
            job_id,
            owner_id,
        )
        .fetch_optional(&self.db)
        .await
    }

    /// The caller's jobs, newest first, after the keyset cursor; results left out.
    pub async fn list(
        &self,
        owner_id: Uuid,
        status: Option<&str>,
        note_id: Option<Uuid>,
        after: Option<(DateTime<Utc>, Uuid)>,
        limit: i64,
    ) -> Result<Vec<JobRow>, sqlx::Error> {
        let (after_at, after_id) = after.unzip();
        sqlx::query_as!(
            JobRow,
            r#"
            select id, note_id, kind, options, status, progress, message,
                   null::jsonb as result, error_code, error_message, attempts, max_attempts,
                   cancel_requested, created_at, started_at, updated_at, finished_at
            from generation_jobs
            where owner_id = $1
              and ($2::text is null or status = $2)
              and ($3::uuid is null or note_id = $3)
              and ($4::timestamptz is null or (created_at, id) < ($4, $5::uuid))
            order by created_at desc, id desc
            limit $6
            "#,
            owner_id,
            status,
            note_id,
            after_at,
            after_id,
            limit,
        )
        .fetch_all(&self.db)
        .await
    }

    /// Cancels a queued job at once (with its notification), or asks a running one to stop.
    pub async fn cancel(&self, owner_id: Uuid, job_id: Uuid) -> Result<Cancelled, NotesError> {
        let mut tx = self.db.begin().await?;
        let row = sqlx::query!(
            "select status, note_id from generation_jobs where id = $1 and owner_id = $2 for update",
            job_id,
            owner_id
        )
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(Cancelled::NotFound);
        };
        let mut notified = None;
        match row.status.as_str() {
            "succeeded" | "failed" => return Ok(Cancelled::Finished),
            "queued" => {
                sqlx::query!(
                    r#"
                    update generation_jobs
                    set status = 'cancelled', cancel_requested = true, message = 'cancelled',
                        finished_at = now(), updated_at = now(), lease_id = null,
                        lease_until = null
                    where id = $1
                    "#,
                    job_id
                )
                .execute(&mut *tx)
                .await?;
                notified =
                    Some(notify(&mut tx, owner_id, job_id, row.note_id, &Finish::Cancelled).await?);
            }
            "running" => {
                sqlx::query!(
                    "update generation_jobs set cancel_requested = true, updated_at = now() where id = $1",
                    job_id
                )
                .execute(&mut *tx)
                .await?;
            }
            _ => {}
        }
        tx.commit().await?;
        if notified.is_some() {
            record_outcome("cancelled");
        }
        match self.get(owner_id, job_id).await? {
            Some(job) => Ok(Cancelled::Done(Box::new(job), notified)),
            None => Ok(Cancelled::NotFound),
        }
    }

    /// Claims the next due job, or one whose lease expired.
    async fn claim(&self, lease: Duration) -> Result<Option<Claimed>, sqlx::Error> {
        sqlx::query_as!(
            Claimed,
            r#"
            update generation_jobs j
            set status = 'running', attempts = j.attempts + 1, lease_id = $1,
                lease_until = now() + $2::interval, started_at = coalesce(j.started_at, now()),
                updated_at = now(), message = 'started'
            where j.id = (
                select id from generation_jobs
                where (status = 'queued' and run_after <= now())
                   or (status = 'running' and lease_until < now())
                order by run_after
                limit 1
                for update skip locked
            )
            returning j.id, j.owner_id, j.note_id, j.kind, j.options, j.attempts,
                      j.max_attempts, j.lease_id as "lease_id!"
            "#,
            Uuid::new_v4(),
            interval(lease),
        )
        .fetch_optional(&self.db)
        .await
    }

    /// Records a progress step and extends the lease; `None` when the lease is lost (the
    /// job was re-claimed, finished or deleted), else whether a cancel was requested.
    async fn step(
        &self,
        job: &Claimed,
        progress: i32,
        message: &str,
        lease: Duration,
    ) -> Result<Option<bool>, sqlx::Error> {
        sqlx::query_scalar!(
            r#"
            update generation_jobs
            set progress = greatest(progress, $3), message = $4,
                lease_until = now() + $5::interval, updated_at = now()
            where id = $1 and lease_id = $2 and status = 'running'
            returning cancel_requested
            "#,
            job.id,
            job.lease_id,
            progress,
            message,
            interval(lease),
        )
        .fetch_optional(&self.db)
        .await
    }

    /// Extends the lease; false when it is lost.
    async fn heartbeat(&self, job: &Claimed, lease: Duration) -> Result<bool, sqlx::Error> {
        let rows = sqlx::query!(
            r#"
            update generation_jobs set lease_until = now() + $3::interval
            where id = $1 and lease_id = $2 and status = 'running'
            "#,
            job.id,
            job.lease_id,
            interval(lease),
        )
        .execute(&self.db)
        .await?;
        Ok(rows.rows_affected() == 1)
    }

    /// Puts the job back in the queue until `retry_at`, keeping the error; false when the
    /// lease was lost.
    async fn retry_later(
        &self,
        job: &Claimed,
        error: &GenerateError,
        delay: Duration,
    ) -> Result<bool, sqlx::Error> {
        let rows = sqlx::query!(
            r#"
            update generation_jobs
            set status = 'queued', run_after = now() + $3::interval, lease_id = null,
                lease_until = null, error_code = $4, error_message = $5,
                message = 'waiting to retry', updated_at = now()
            where id = $1 and lease_id = $2 and status = 'running'
            "#,
            job.id,
            job.lease_id,
            interval(delay),
            error.code,
            error.message,
        )
        .execute(&self.db)
        .await?;
        Ok(rows.rows_affected() == 1)
    }

    /// Finishes the job and writes its notification in one transaction; the notification's
    /// sequence, or `None` when the lease was lost (someone else owns the outcome).
    async fn finish(&self, job: &Claimed, finish: &Finish) -> Result<Option<i64>, sqlx::Error> {
        let mut tx = self.db.begin().await?;
        let (status, result, code, message) = match finish {
            Finish::Succeeded(result) => ("succeeded", Some(result.clone()), None, None),
            Finish::Failed { code, message } => {
                ("failed", None, Some(code.as_str()), Some(message.as_str()))
            }
            Finish::Cancelled => ("cancelled", None, None, None),
        };
        let rows = sqlx::query!(
            r#"
            update generation_jobs
            set status = $3, result = $4, error_code = coalesce($5, error_code),
                error_message = coalesce($6, error_message),
                progress = case when $3 = 'succeeded' then 100 else progress end,
                message = $3, finished_at = now(), updated_at = now(), lease_id = null,
                lease_until = null
            where id = $1 and lease_id = $2 and status = 'running'
            "#,
            job.id,
            job.lease_id,
            status,
            result,
            code,
            message,
        )
        .execute(&mut *tx)
        .await?;
        if rows.rows_affected() != 1 {
            return Ok(None);
        }
        let sequence = notify(&mut tx, job.owner_id, job.id, job.note_id, finish).await?;
        tx.commit().await?;
        Ok(Some(sequence))
    }

    /// Queued jobs and the age of the oldest, in seconds.
    pub async fn depth(&self) -> Result<(i64, i64), sqlx::Error> {
        let row = sqlx::query!(
            r#"
            select count(*) as "depth!",
                   coalesce(extract(epoch from now() - min(created_at))::bigint, 0) as "oldest!"
            from generation_jobs where status = 'queued'
            "#
        )
        .fetch_one(&self.db)
        .await?;
        Ok((row.depth, row.oldest))
    }

    /// Deletes finished jobs and read notifications past their retention.
    async fn prune(
        &self,
        job_retention: Duration,
        read_retention: Duration,
    ) -> Result<(u64, u64), sqlx::Error> {
        let jobs = sqlx::query!(
            "delete from generation_jobs where finished_at < now() - $1::interval",
            interval(job_retention)
        )
        .execute(&self.db)
        .await?
        .rows_affected();
        let read = sqlx::query!(
            "delete from notifications where read_at < now() - $1::interval",
            interval(read_retention)
        )
        .execute(&self.db)
        .await?
        .rows_affected();
        Ok((jobs, read))
    }

    // ---- Notifications ----

    /// The caller's notifications after `before` (a sequence), newest first.
    pub async fn notifications(
        &self,
        owner_id: Uuid,
        unread_only: bool,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<NotificationRow>, sqlx::Error> {
        sqlx::query_as!(
            NotificationRow,
            r#"
            select id, sequence, kind, title, body, job_id, note_id, created_at, read_at
            from notifications
            where owner_id = $1 and (not $2 or read_at is null)
              and ($3::bigint is null or sequence < $3)
            order by sequence desc
            limit $4
            "#,
            owner_id,
            unread_only,
            before,
            limit,
        )
        .fetch_all(&self.db)
        .await
    }

    pub async fn unread_count(&self, owner_id: Uuid) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar!(
            r#"select count(*) as "count!" from notifications where owner_id = $1 and read_at is null"#,
            owner_id
        )
        .fetch_one(&self.db)
        .await
    }

    /// The caller's notifications with a sequence above `after`, oldest first.
    pub async fn notifications_after(
        &self,
        owner_id: Uuid,
        after: i64,
        limit: i64,
    ) -> Result<Vec<NotificationRow>, sqlx::Error> {
        sqlx::query_as!(
            NotificationRow,
            r#"
            select id, sequence, kind, title, body, job_id, note_id, created_at, read_at
            from notifications where owner_id = $1 and sequence > $2
            order by sequence
            limit $3
            "#,
            owner_id,
            after,
            limit,
        )
        .fetch_all(&self.db)
        .await
    }

    /// The caller's last sequence (0 before any).
    pub async fn last_sequence(&self, owner_id: Uuid) -> Result<i64, sqlx::Error> {
        Ok(sqlx::query_scalar!(
            "select last_sequence from notification_sequences where owner_id = $1",
            owner_id
        )
        .fetch_optional(&self.db)
        .await?
        .unwrap_or(0))
    }

    /// Marks the given notifications read; `Err(ids)` names those that are not the caller's.
    pub async fn mark_read(
        &self,
        owner_id: Uuid,
        ids: &[Uuid],
    ) -> Result<Result<u64, Vec<Uuid>>, sqlx::Error> {
        let mut tx = self.db.begin().await?;
        let known: Vec<Uuid> = sqlx::query_scalar!(
            "select id from notifications where owner_id = $1 and id = any($2)",
            owner_id,
            ids
        )
        .fetch_all(&mut *tx)
        .await?;
        let missing: Vec<Uuid> = ids
            .iter()
            .filter(|id| !known.contains(id))
            .copied()
            .collect();
        if !missing.is_empty() {
            return Ok(Err(missing));
        }
        let marked = sqlx::query!(
            "update notifications set read_at = now() where owner_id = $1 and id = any($2) and read_at is null",
            owner_id,
            ids
        )
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(Ok(marked))
    }

    pub async fn mark_all_read(&self, owner_id: Uuid) -> Result<u64, sqlx::Error> {
        Ok(sqlx::query!(
            "update notifications set read_at = now() where owner_id = $1 and read_at is null",
            owner_id
        )
        .execute(&self.db)
        .await?
        .rows_affected())
    }
}

/// Writes the notification of a finished job inside `tx`; its sequence comes from the
/// owner's counter row, locked until commit (so sequences commit in order).
async fn notify(
    tx: &mut Transaction<'_, Postgres>,
    owner_id: Uuid,
    job_id: Uuid,
    note_id: Uuid,
    finish: &Finish,
) -> Result<i64, sqlx::Error> {
    let sequence = sqlx::query_scalar!(
        r#"
        insert into notification_sequences as s (owner_id, last_sequence) values ($1, 1)
        on conflict (owner_id) do update set last_sequence = s.last_sequence + 1
        returning last_sequence
        "#,
        owner_id
    )
    .fetch_one(&mut **tx)
    .await?;
    let (kind, title, body) = match finish {
        Finish::Succeeded(_) => (
            "job_succeeded",
            "Generation finished",
            "Your generated content is ready.".to_owned(),
        ),
        Finish::Failed { message, .. } => ("job_failed", "Generation failed", message.clone()),
        Finish::Cancelled => (
            "job_cancelled",
            "Generation cancelled",
            "The generation was cancelled.".to_owned(),
        ),
    };
    sqlx::query!(
        r#"
        insert into notifications (id, owner_id, sequence, kind, title, body, job_id, note_id)
        values ($1, $2, $3, $4, $5, $6, $7, $8)
        "#,
        Uuid::now_v7(),
        owner_id,
        sequence,
        kind,
        title,
        body,
        job_id,
        note_id,
    )
    .execute(&mut **tx)
    .await?;
    Ok(sequence)
}

fn record_outcome(outcome: &'static str) {
    metrics::counter!("notes_jobs_finished_total", "outcome" => outcome).increment(1);
}

/// A result as stored (jsonb).
fn result_json(generator: &str, output: &Output) -> Value {
    match output {
        Output::Summary(text) => json!({"generator": generator, "summary": {"text": text}}),
        Output::Explanation(terms) => json!({
            "generator": generator,
            "explanation": {"terms": terms.iter().map(|(term, explanation)| json!({
                "term": term, "explanation": explanation
            })).collect::<Vec<_>>()}
        }),
        Output::Quiz(questions) => json!({
            "generator": generator,
            "quiz": {"questions": questions.iter().map(|QuizQuestion { prompt, answer, choices }| json!({
                "prompt": prompt, "answer": answer, "choices": choices
            })).collect::<Vec<_>>()}
        }),
    }
}

/// The queue with its workers: StartGeneration wakes them, and they publish the
/// notifications of the jobs they finish.
#[derive(Debug, Clone)]
pub struct Queue {
    pub jobs: Jobs,
    pub config: JobConfig,
    wake: Arc<Notify>,
    hub: Hub,
}

impl Queue {
    pub fn new(jobs: Jobs, config: JobConfig, hub: Hub) -> Self {
        Self {
            jobs,
            config,
            wake: Arc::new(Notify::new()),
            hub,
        }
    }

    /// A job was queued here: one idle worker looks now rather than at its next poll.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Tells every watcher of `owner_id`, on every replica, about `sequence`.
    pub async fn publish(&self, owner_id: Uuid, sequence: i64) {
        self.hub.publish(owner_id, sequence).await;
    }

    /// Starts the workers, the metrics sampler and the pruner; they stop (a running job is
    /// dropped where it is, its lease left to expire, as if the process died) when `stop`
    /// turns true.
    pub fn start(
        &self,
        store: Store,
        generator: Arc<dyn Generator>,
        read_retention: Duration,
        stop: watch::Receiver<bool>,
    ) {
        describe_metrics();
        // A replica without workers serves the API only: no claims, sampling or pruning.
        if self.config.workers == 0 {
            return;
        }
        for index in 0..self.config.workers {
            let worker = Worker {
                queue: self.clone(),
                store: store.clone(),
                generator: generator.clone(),
            };
            tokio::spawn(until_stopped(stop.clone(), async move {
                worker.run(index).await;
            }));
        }
        let queue = self.clone();
        tokio::spawn(until_stopped(stop, async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            let mut round: u64 = 0;
            loop {
                tick.tick().await;
                match queue.jobs.depth().await {
                    Ok((depth, oldest)) => {
                        metrics::gauge!("notes_job_queue_depth").set(depth as f64);
                        metrics::gauge!("notes_job_oldest_queued_age_seconds").set(oldest as f64);
                    }
                    Err(e) => tracing::debug!(error = %e, "cannot sample the job queue"),
                }
                // Pruning about hourly.
                if round.is_multiple_of(720) {
                    match queue
                        .jobs
                        .prune(queue.config.retention, read_retention)
                        .await
                    {
                        Ok((jobs, read)) if jobs + read > 0 => {
                            tracing::info!(
                                jobs,
                                read,
                                "pruned finished jobs and read notifications"
                            );
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "pruning failed"),
                    }
                }
                round += 1;
            }
        }));
    }
}

async fn until_stopped(mut stop: watch::Receiver<bool>, work: impl Future<Output = ()>) {
    tokio::select! {
        () = stopped(&mut stop) => {}
        () = work => {}
    }
}

/// Resolves once `stop` is true (or its sender is gone: the server is gone too).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await.map(|_| ());
}

fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge};
    describe_gauge!(
        "notes_job_queue_depth",
        "Generation jobs queued and not yet claimed."
    );
    describe_gauge!(
        "notes_job_oldest_queued_age_seconds",
        Unit::Seconds,
        "Age of the oldest queued generation job."
    );
    describe_counter!(
        "notes_jobs_finished_total",
        "Generation jobs finished, by outcome (succeeded, failed, cancelled), and retries."
    );
}

#[derive(Debug)]
struct Worker {
    queue: Queue,
    store: Store,
    generator: Arc<dyn Generator>,
}

/// What one attempt came to.
enum Attempt {
    Done(Result<Output, GenerateError>),
    Cancelled,
    LeaseLost,
}

impl Worker {
    async fn run(&self, index: usize) {
        tracing::debug!(worker = index, "generation worker started");
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.queue.jobs.claim(self.queue.config.lease).await {
                Ok(Some(job)) => {
                    backoff = Duration::from_millis(100);
                    self.process(job).await;
                }
                Ok(None) => {
                    let _ = tokio::time::timeout(
                        self.queue.config.poll_interval,
                        self.queue.wake.notified(),
                    )
                    .await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot claim generation jobs");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn process(&self, job: Claimed) {
        let config = &self.queue.config;
        let finish = if job.attempts > job.max_attempts {
            // Its last attempt's worker died: no attempts left.
            Some(Finish::Failed {
                code: "WORKER_LOST".to_owned(),
                message: "the job's last attempt did not finish".to_owned(),
            })
        } else {
            match self.attempt(&job).await {
                Attempt::LeaseLost => {
                    tracing::info!(job_id = %job.id, "lease lost: leaving the job to its new owner");
                    None
                }
                Attempt::Cancelled => Some(Finish::Cancelled),
                Attempt::Done(Ok(output)) => Some(Finish::Succeeded(result_json(
                    &self.generator.name(),
                    &output,
                ))),
                Attempt::Done(Err(error)) if error.retryable && job.attempts < job.max_attempts => {
                    let exponent = u32::try_from(job.attempts - 1).unwrap_or(0).min(16);
                    let delay = config.retry_base_delay * 2_u32.pow(exponent);
                    tracing::info!(job_id = %job.id, code = error.code, ?delay, "generation failed: retrying");
                    if let Err(e) = self.queue.jobs.retry_later(&job, &error, delay).await {
                        tracing::warn!(error = %e, "cannot requeue a job: its lease will expire");
                    }
                    record_outcome("retried");
                    None
                }
                Attempt::Done(Err(error)) => Some(Finish::Failed {
                    code: error.code.to_owned(),
                    message: error.message,
                }),
            }
        };
        let Some(finish) = finish else { return };
        let outcome = match finish {
            Finish::Succeeded(_) => "succeeded",
            Finish::Failed { .. } => "failed",
            Finish::Cancelled => "cancelled",
        };
        match self.queue.jobs.finish(&job, &finish).await {
            Ok(Some(sequence)) => {
                record_outcome(outcome);
                tracing::info!(job_id = %job.id, outcome, "generation job finished");
                self.queue.publish(job.owner_id, sequence).await;
            }
            Ok(None) => {
                tracing::info!(job_id = %job.id, "lease lost before the result was written")
            }
            Err(e) => {
                tracing::warn!(job_id = %job.id, error = %e, "cannot finish a job: its lease will expire")
            }
        }
    }

    /// Runs the generator, recording its progress steps and heartbeats; stops it at a step
    /// when the job was cancelled or the lease lost.
    async fn attempt(&self, job: &Claimed) -> Attempt {
        let config = &self.queue.config;
        let Some(spec) = JobSpec::from_stored(&job.kind, &job.options) else {
            return Attempt::Done(Err(GenerateError::permanent(
                "INVALID_JOB",
                "the job's options cannot be read",
            )));
        };
        let text = match self.store.note_detail(job.owner_id, job.note_id).await {
            Ok(Some(detail)) => note_text(&detail),
            Ok(None) => {
                return Attempt::Done(Err(GenerateError::permanent(
                    "NOTE_DELETED",
                    "the note was deleted",
                )));
            }
            Err(e) => {
                return Attempt::Done(Err(GenerateError {
                    code: "STORE_UNAVAILABLE",
                    message: "the note could not be read".to_owned(),
                    retryable: {
                        tracing::warn!(error = %e, "cannot read a job's note");
                        true
                    },
                }));
            }
        };
        let request = spec.request();
        let (steps_tx, mut steps) = mpsc::unbounded_channel();
        let progress = Progress::new(steps_tx, config.step_delay);
        let generation = self.generator.generate(&text, &request, &progress);
        tokio::pin!(generation);
        let mut heartbeat = tokio::time::interval(config.lease / 3);
        heartbeat.tick().await;
        loop {
            tokio::select! {
                biased;
                Some((percent, message)) = steps.recv() => {
                    match self.queue.jobs.step(job, percent, &message, config.lease).await {
                        Ok(Some(false)) => {}
                        Ok(Some(true)) => return Attempt::Cancelled,
                        Ok(None) => return Attempt::LeaseLost,
                        Err(e) => tracing::warn!(error = %e, "cannot record a progress step"),
                    }
                }
                output = &mut generation => {
                    // Steps reported just before the end still count (a cancel among them).
                    while let Ok((percent, message)) = steps.try_recv() {
                        match self.queue.jobs.step(job, percent, &message, config.lease).await {
                            Ok(Some(true)) => return Attempt::Cancelled,
                            Ok(None) => return Attempt::LeaseLost,
                            _ => {}
                        }
                    }
                    return Attempt::Done(output);
                }
                _ = heartbeat.tick() => {
                    match self.queue.jobs.heartbeat(job, config.lease).await {
                        Ok(true) => {}
                        Ok(false) => return Attempt::LeaseLost,
                        Err(e) => tracing::warn!(error = %e, "cannot extend a job's lease"),
                    }
                }
            }
        }
    }
}

/// The note's text as the generator reads it: title, body, then each chapter and topic.
fn note_text(detail: &crate::store::NoteDetail) -> String {
    let mut text = String::new();
    text.push_str(&detail.note.title);
    text.push('\n');
    text.push_str(&detail.note.body);
    for chapter in &detail.chapters {
        text.push('\n');
        text.push_str(&chapter.title);
        text.push('\n');
        text.push_str(&chapter.body);
        for topic in &chapter.topics {
            text.push('\n');
            text.push_str(&topic.title);
            text.push('\n');
            text.push_str(&topic.body);
        }
    }
    text
}
