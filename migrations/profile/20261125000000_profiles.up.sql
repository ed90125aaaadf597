-- The profile service's data: plans and the catalogs first (profiles refer to them), then
-- profiles, subscriptions and customer frames. Profile owns no account data (email and
-- roles stay in auth), so no foreign key crosses the service boundary: user_id is auth's id.

-- Plans, by slug. Exactly one is the default: every user without a subscription row is on
-- it, and an expired subscription falls back to it for entitlements.
create table plans (
    id text primary key check (id ~ '^[a-z0-9_-]{1,40}$'),
    name text not null check (char_length(name) between 1 and 100),
    description text not null default '' check (char_length(description) <= 1000),
    features text[] not null default '{}',
    ai_daily_limit integer not null default 0 check (ai_daily_limit >= 0),
    is_paid boolean not null default false,
    is_default boolean not null default false,
    sort_order integer not null default 0,
    archived_at timestamptz,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    -- The default plan is where everyone lands: it cannot be archived.
    check (not (is_default and archived_at is not null))
);
create unique index plans_one_default on plans ((true)) where is_default;

-- Catalogs. Names are unique case-insensitively among live entries; archived entries stay
-- for the profiles and frames that still refer to them.
create table profession_types (
    id uuid primary key,
    name text not null check (char_length(name) between 1 and 100),
    sort_order integer not null default 0,
    archived_at timestamptz,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
create unique index profession_types_live_name on profession_types (lower(name))
    where archived_at is null;

create table business_categories (
    id uuid primary key,
    name text not null check (char_length(name) between 1 and 100),
    sort_order integer not null default 0,
    archived_at timestamptz,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
create unique index business_categories_live_name on business_categories (lower(name))
    where archived_at is null;

-- One profile per auth user, created on the user's first read.
create table profiles (
    user_id uuid primary key,
    display_name text not null check (char_length(display_name) <= 100),
    bio text not null default '' check (char_length(bio) <= 1000),
    avatar_url text not null default '' check (char_length(avatar_url) <= 2048),
    profession_type_id uuid references profession_types (id),
    business_category_id uuid references business_categories (id),
    locale text not null default '' check (char_length(locale) <= 35),
    -- Bumped by every write to the profile or its subscription; part of the ETag.
    version bigint not null default 1,
    -- Last time the user read their profile (coarse: at most hourly); cache warming loads
    -- the recently active.
    last_active_at timestamptz not null default now(),
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
create index profiles_last_active on profiles (last_active_at);

-- A user's plan when it is not the default one. No row = the default plan, active,
-- open-ended: a new user needs no subscription row.
create table subscriptions (
    user_id uuid primary key references profiles (user_id) on delete cascade,
    plan_id text not null references plans (id),
    status text not null check (status in ('active', 'trialing', 'past_due', 'canceled', 'expired')),
    end_date timestamptz,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
-- Plan changes find (and count) their subscribers.
create index subscriptions_plan on subscriptions (plan_id);

-- Branded frames a user has, each for one business category (the second screen's data).
create table customer_frames (
    id uuid primary key,
    user_id uuid not null references profiles (user_id) on delete cascade,
    business_category_id uuid not null references business_categories (id),
    name text not null check (char_length(name) between 1 and 100),
    image_url text not null check (char_length(image_url) <= 2048),
    sort_order integer not null default 0,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
-- The one read: a user's frames in order.
create index customer_frames_user_order on customer_frames (user_id, sort_order, id);
