-- The display name given at registration; profile copies it into the profile on first read.
alter table users add column display_name text not null default '';

-- One session per device login: a refresh-token family.
create table sessions (
    id uuid primary key,
    user_id uuid not null references users (id) on delete cascade,
    device_name text not null default '',
    user_agent text not null default '',
    ip_address text not null default '',
    created_at timestamptz not null default now(),
    -- Bumped by every refresh; the idle timeout counts from here.
    last_used_at timestamptz not null default now(),
    -- The absolute lifetime: no refresh extends it.
    expires_at timestamptz not null,
    revoked_at timestamptz,
    revoked_reason text
);

-- A user's live sessions, most recently used first (ListSessions, LogoutAll).
create index sessions_user_live_idx on sessions (user_id, last_used_at desc) where revoked_at is null;

-- Every refresh token a session has issued, kept only as its SHA-256: the database never
-- holds a usable token. A rotated token stays (rotated_at set) so that a late duplicate
-- within the grace window can be answered and a reuse after it detected.
create table refresh_tokens (
    token_hash bytea primary key,
    session_id uuid not null references sessions (id) on delete cascade,
    issued_at timestamptz not null default now(),
    -- Set once, by the one rotation that replaced this token.
    rotated_at timestamptz
);

create index refresh_tokens_session_idx on refresh_tokens (session_id);

-- Role-based access control.
create table roles (
    name text primary key,
    description text not null default '',
    created_at timestamptz not null default now()
);

create table permissions (
    name text primary key,
    description text not null default ''
);

create table role_permissions (
    role_name text not null references roles (name) on delete cascade,
    permission_name text not null references permissions (name) on delete cascade,
    primary key (role_name, permission_name)
);

create table user_roles (
    user_id uuid not null references users (id) on delete cascade,
    role_name text not null references roles (name) on delete cascade,
    granted_at timestamptz not null default now(),
    primary key (user_id, role_name)
);

-- Who holds a role (admin listings, bulk seeding checks).
create index user_roles_role_idx on user_roles (role_name);

insert into roles (name, description) values
    ('admin', 'Administers users, roles, plans and catalogs');

insert into permissions (name, description) values
    ('roles:manage', 'Assign and revoke roles'),
    ('users:read', 'Read any user''s account data'),
    ('plans:manage', 'Manage plans, subscriptions and catalogs');

insert into role_permissions (role_name, permission_name) values
    ('admin', 'roles:manage'),
    ('admin', 'users:read'),
    ('admin', 'plans:manage');

-- Security-relevant events, without secrets. Pruned on a schedule (see docs/auth.md).
create table audit_events (
    id bigint generated always as identity primary key,
    occurred_at timestamptz not null default now(),
    -- e.g. login_succeeded, login_failed, refresh_reuse, session_revoked, role_assigned
    kind text not null,
    user_id uuid,
    session_id uuid,
    ip_address text not null default '',
    detail jsonb not null default '{}'
);

create index audit_events_occurred_idx on audit_events (occurred_at);
create index audit_events_user_idx on audit_events (user_id, occurred_at desc) where user_id is not null;
