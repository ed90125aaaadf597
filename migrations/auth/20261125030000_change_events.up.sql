-- The change log other processes follow (auth.v1 WatchChanges): session revocations, role
-- changes, user changes and key-set changes. Triggers write it, so every writer (the API,
-- the CLI, a bulk seed) records its changes without having to remember to.
--
-- `sequence` must increase in commit order, so that a consumer resuming after N never
-- misses an event that committed late with a smaller number. A plain sequence does not give
-- that (numbers are taken at insert, commits happen later, in any order), so writers take a
-- transaction-scoped advisory lock before drawing the number: the lock is held until commit,
-- hence the next writer draws a larger number only after this one is visible. Only the tail
-- of a writing transaction is serialised, and only transactions that change what the log
-- records (logouts, revocations, role changes) write it; logins and refreshes do not.
create sequence change_event_sequence;

create table change_events (
    sequence bigint primary key,
    kind text not null check (kind in ('user', 'roles', 'session_revoked', 'key_set')),
    user_id uuid,
    session_id uuid,
    -- Kind-specific facts: the revocation reason, the key ids of a key set.
    detail jsonb not null default '{}',
    -- The wall-clock instant of the change (not the transaction start), for retention and
    -- for `tokens_not_before`.
    occurred_at timestamptz not null default clock_timestamp()
);

create index change_events_occurred_at_idx on change_events (occurred_at);

-- Everything up to this sequence has been pruned: a consumer resuming from before it must
-- start over (the stream sends Reset).
create table change_log_horizon (
    singleton boolean primary key default true check (singleton),
    pruned_through bigint not null default 0
);
insert into change_log_horizon default values;

create function record_change(p_kind text, p_user_id uuid, p_session_id uuid, p_detail jsonb)
returns void language plpgsql as $$
begin
    -- 0x6175746863686e67 = "authchng": serialises writers from here to commit (see above).
    perform pg_advisory_xact_lock(7022364288939585127);
    insert into change_events (sequence, kind, user_id, session_id, detail)
    values (nextval('change_event_sequence'), p_kind, p_user_id, p_session_id, p_detail);
    -- Delivered at commit, once per transaction: followers wake and read the log.
    perform pg_notify('auth_changes', '');
end;
$$;

create function sessions_record_revocation() returns trigger language plpgsql as $$
begin
    perform record_change('session_revoked', new.user_id, new.id,
                          jsonb_build_object('reason', new.revoked_reason));
    return null;
end;
$$;

create trigger sessions_revoked_change
after update of revoked_at on sessions
for each row when (old.revoked_at is null and new.revoked_at is not null)
execute function sessions_record_revocation();

create function user_roles_record_change() returns trigger language plpgsql as $$
begin
    perform record_change('roles', coalesce(new.user_id, old.user_id), null, '{}');
    return null;
end;
$$;

create trigger user_roles_change
after insert or delete on user_roles
for each row execute function user_roles_record_change();

create function users_record_change() returns trigger language plpgsql as $$
begin
    perform record_change('user', new.id, null, '{}');
    return null;
end;
$$;

-- Only what other services cache: the email, the display name, the status.
create trigger users_change
after update of email, display_name, status on users
for each row
when (old.email is distinct from new.email
      or old.display_name is distinct from new.display_name
      or old.status is distinct from new.status)
execute function users_record_change();
