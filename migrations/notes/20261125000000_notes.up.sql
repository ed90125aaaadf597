-- A user's notes. owner_id is the auth user id; no foreign key crosses the service boundary.
create table notes (
    id uuid primary key,
    owner_id uuid not null,
    title text not null,
    body text not null default '',
    status text not null default 'draft' check (status in ('draft', 'published', 'archived')),
    tags text[] not null default '{}',
    -- Bumped on every write; the ETag is derived from it.
    version bigint not null default 1,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);

-- The list query: a user's notes, newest first, paged by keyset on (created_at, id).
create index notes_owner_created_idx on notes (owner_id, created_at desc, id desc);
