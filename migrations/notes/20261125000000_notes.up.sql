-- Notes, their ordered chapters and the chapters' ordered topics. owner_id is the auth user
-- id; no foreign key crosses the service boundary. Ids are UUIDv7 made by the service.

-- GIN over (owner_id, …) below: one index scan that is already limited to the owner, rather
-- than every user's matches intersected with the owner's rows. btree_gin is a trusted
-- contrib extension, so the database owner may create it.
create extension if not exists btree_gin;

create table notes (
    id uuid primary key,
    owner_id uuid not null,
    -- 1–200 characters (checked by the service, which names the field; these are backstops).
    title text not null check (char_length(title) between 1 and 200),
    -- Markdown, at most 1 MiB.
    body text not null default '' check (octet_length(body) <= 1048576),
    status text not null default 'draft' check (status in ('draft', 'published', 'archived')),
    -- At most 20 distinct tags of 1–40 characters (deduplicated by the service).
    tags text[] not null default '{}' check (cardinality(tags) <= 20),
    -- Bumped by every write to the note, its chapters or its topics: the ETag.
    version bigint not null default 1,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    -- Full-text search over title and body. Only the first 100,000 characters of the body
    -- are indexed: a tsvector must stay under 1 MB, which a 1 MiB body of distinct words
    -- could exceed, failing the write.
    search tsvector generated always as (
        to_tsvector('english'::regconfig, title || ' ' || left(body, 100000))
    ) stored
);

-- The list, newest first, paged by keyset on (created_at, id); the window count of the list
-- reads the owner's rows in this order.
create index notes_owner_created_idx on notes (owner_id, created_at desc, id desc);
-- The list filtered by status, in list order.
create index notes_owner_status_created_idx on notes (owner_id, status, created_at desc, id desc);
-- The owner's recently changed notes (sync since a time).
create index notes_owner_updated_idx on notes (owner_id, updated_at desc);
-- Filters "has all of these tags" and full-text, within one owner's notes.
create index notes_owner_tags_idx on notes using gin (owner_id, tags);
create index notes_owner_search_idx on notes using gin (owner_id, search);

create table chapters (
    id uuid primary key,
    note_id uuid not null references notes (id) on delete cascade,
    -- 0-based and dense within the note. Deferred to the end of each statement, so one
    -- statement can shift or permute positions without tripping over itself.
    position integer not null check (position >= 0),
    title text not null check (char_length(title) between 1 and 200),
    body text not null default '' check (octet_length(body) <= 1048576),
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    constraint chapters_note_position_key unique (note_id, position) deferrable initially immediate
);

create table topics (
    id uuid primary key,
    chapter_id uuid not null references chapters (id) on delete cascade,
    -- 0-based and dense within the chapter, as for chapters.
    position integer not null check (position >= 0),
    title text not null check (char_length(title) between 1 and 200),
    body text not null default '' check (octet_length(body) <= 1048576),
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    constraint topics_chapter_position_key unique (chapter_id, position) deferrable initially immediate
);
