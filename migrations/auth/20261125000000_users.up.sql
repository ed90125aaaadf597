-- Accounts. Ids are UUIDv7 made by the service: time-ordered, so inserts land at the right
-- edge of the primary-key index instead of scattering across it.
create table users (
    id uuid primary key,
    -- Stored normalised (trimmed, lower case) by the service.
    email text not null,
    -- argon2id PHC string; its parameters travel with it, so they can be raised later.
    password_hash text not null,
    status text not null default 'active' check (status in ('active', 'disabled')),
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);

-- Uniqueness is case-insensitive even if a writer forgets to normalise.
create unique index users_email_lower_key on users (lower(email));
