-- One profile per auth user, keyed by the auth user id. Profile owns no account data
-- (email and roles stay in auth), so there is no foreign key across the boundary.
create table profiles (
    user_id uuid primary key,
    display_name text not null default '',
    bio text not null default '',
    avatar_url text,
    locale text not null default 'en',
    -- Bumped on every write; the ETag is derived from it.
    version bigint not null default 1,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
