-- Durable AI generation jobs, the per-user daily generation quota, and notifications.

create table generation_jobs (
    id uuid primary key,
    owner_id uuid not null,
    -- Deleting a note deletes its jobs; a worker still running one then finds no row to
    -- finish and drops its result.
    note_id uuid not null references notes (id) on delete cascade,
    kind text not null check (kind in ('summary', 'explanation', 'quiz')),
    -- The options with defaults applied.
    options jsonb not null default '{}',
    -- kind and options in a canonical text: equal keys on one note are identical requests.
    dedupe_key text not null,
    status text not null default 'queued'
        check (status in ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    progress integer not null default 0 check (progress between 0 and 100),
    message text not null default '',
    result jsonb,
    error_code text,
    error_message text,
    -- Attempts started; a claim increments it.
    attempts integer not null default 0,
    max_attempts integer not null check (max_attempts >= 1),
    cancel_requested boolean not null default false,
    -- The claim that holds the job (a fresh id per claim) and until when: writes by a worker
    -- are conditional on its claim id, so a worker whose lease expired writes nothing.
    lease_id uuid,
    lease_until timestamptz,
    -- Queued jobs wait until this time (retry backoff).
    run_after timestamptz not null default now(),
    created_at timestamptz not null default now(),
    started_at timestamptz,
    updated_at timestamptz not null default now(),
    finished_at timestamptz
);

-- At most one queued or running job per identical request: the deduplication.
create unique index generation_jobs_active_dedupe_idx
    on generation_jobs (owner_id, note_id, dedupe_key)
    where status in ('queued', 'running');
-- Claims: queued jobs due now, oldest first; running jobs whose lease expired.
create index generation_jobs_queued_idx on generation_jobs (run_after) where status = 'queued';
create index generation_jobs_leased_idx on generation_jobs (lease_until) where status = 'running';
-- The owner's recent jobs, newest first.
create index generation_jobs_owner_created_idx on generation_jobs (owner_id, created_at desc, id desc);
-- Pruning finished jobs.
create index generation_jobs_finished_idx on generation_jobs (finished_at) where finished_at is not null;

-- Generation requests taken per user per UTC day. A row lock per (user, day) makes the
-- check-and-increment atomic.
create table generation_quota (
    owner_id uuid not null,
    day date not null,
    used integer not null check (used >= 0),
    primary key (owner_id, day)
);

-- Each user's last notification sequence. Taking the next one locks this row until the
-- transaction ends, so a user's sequences commit in increasing order and a reader that saw
-- sequence n has already seen every smaller one.
create table notification_sequences (
    owner_id uuid primary key,
    last_sequence bigint not null
);

create table notifications (
    id uuid primary key,
    owner_id uuid not null,
    sequence bigint not null,
    kind text not null check (kind in ('job_succeeded', 'job_failed', 'job_cancelled')),
    title text not null,
    body text not null default '',
    job_id uuid,
    note_id uuid,
    created_at timestamptz not null default now(),
    read_at timestamptz,
    unique (owner_id, sequence)
);

create index notifications_owner_unread_idx on notifications (owner_id, sequence desc)
    where read_at is null;
create index notifications_read_idx on notifications (read_at) where read_at is not null;
