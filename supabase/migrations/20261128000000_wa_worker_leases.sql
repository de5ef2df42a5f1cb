-- wa-worker issue #13: a fleet of workers. Leases (which worker runs which instance, with a
-- fencing token), the live workers, the claim token of each claimed message, and the
-- NOTIFY channel behind GET /events. Idempotent, like the others: every statement can run
-- again on an up-to-date schema. docs/proxy-contract.md, "Leases and fencing".
--
--   wa_instances.lease_worker      the worker (WORKER_ID) the instance was last granted to
--   wa_instances.lease_token       fencing token: +1 on every grant, never reused (0 = never granted)
--   wa_instances.lease_expires_at  renewed by every POST /leases of its holder (now + TTL)
--   wa_instances.lease_released    the holder gave it back (or it was never held)
--   wa_instances.lease_revoked     left out of its holder's answer (fair share): it must stop it
--   wa_workers                     one row per worker that called POST /leases (live: seen within TTL)
--   wa_workers.api_url             where API clients reach that worker (its API_PUBLIC_URL; GET /lease-holder)
--   wa_outbound.claim_token        the lease token under which the message was claimed
--   wa_outbound.prior_claim_token  the token of the claim a re-offer replaced (its mark-sent still counts)
--   wa_outbound.queued_xact        the transaction that made the row 'queued' (GET /events' cursor)
--   wa_fleet_state.lease_version   +1 when instances appear, disappear or are released
--   wa_lease_hand_back()           a POST /leases item's `unsent` claims back to 'queued' (before wa_lease_call)
--
-- A lease is free (grantable) when never granted, released, or expired for at least one
-- more TTL (lease_expires_at + TTL < now()): a worker that cannot renew stops its sessions
-- at TTL/2, so a session is never open on two workers at once.

-- ---------------------------------------------------------------- columns

alter table public.wa_instances add column if not exists lease_worker text;
alter table public.wa_instances add column if not exists lease_token bigint not null default 0;
alter table public.wa_instances add column if not exists lease_expires_at timestamptz;
alter table public.wa_instances add column if not exists lease_released boolean not null default false;
alter table public.wa_instances add column if not exists lease_revoked boolean not null default false;
alter table public.wa_instances add column if not exists lease_granted_at timestamptz;

comment on column public.wa_instances.lease_worker is
    'The worker (WORKER_ID) this instance was last granted to; see lease_expires_at / lease_released.';
comment on column public.wa_instances.lease_token is
    'Fencing token, +1 on every grant: calls carrying an older one are refused (409 lease_lost).';

alter table public.wa_outbound add column if not exists claim_token bigint;
alter table public.wa_outbound add column if not exists prior_claim_token bigint;
alter table public.wa_outbound add column if not exists queued_xact xid8;

comment on column public.wa_outbound.claim_token is
    'The lease token under which the message was claimed (null: claimed without leases).';

create table if not exists public.wa_workers (
    id          text        primary key,
    capacity    integer     not null,
    leases      integer     not null default 0,
    first_seen  timestamptz not null default now(),
    last_seen   timestamptz not null default now()
);

comment on table public.wa_workers is
    'Workers of the fleet (one row per WORKER_ID that called POST /leases). Live: last_seen within the lease TTL. leases: how many it held after its last call.';

create table if not exists public.wa_fleet_state (
    id            integer primary key default 1,
    lease_version bigint  not null default 0,
    constraint wa_fleet_state_one_row check (id = 1)
);

insert into public.wa_fleet_state (id) values (1) on conflict (id) do nothing;

alter table public.wa_workers add column if not exists api_url text;

comment on column public.wa_workers.api_url is
    'Where API clients reach this worker (its API_PUBLIC_URL, sent in POST /leases; null: none). GET /lease-holder answers it.';

do $$
begin
    if not exists (select 1 from pg_constraint where conname = 'wa_workers_id_format'
                   and conrelid = 'public.wa_workers'::regclass) then
        alter table public.wa_workers add constraint wa_workers_id_format
            check (id ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$');
    end if;
    if not exists (select 1 from pg_constraint where conname = 'wa_instances_lease_worker_format'
                   and conrelid = 'public.wa_instances'::regclass) then
        alter table public.wa_instances add constraint wa_instances_lease_worker_format
            check (lease_worker is null or lease_worker ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$');
    end if;
    if not exists (select 1 from pg_constraint where conname = 'wa_workers_api_url_format'
                   and conrelid = 'public.wa_workers'::regclass) then
        alter table public.wa_workers add constraint wa_workers_api_url_format
            check (api_url is null or (api_url ~ '^https?://[^\s?#@/]+' and length(api_url) <= 512));
    end if;
end
$$;

-- grants: the free instances, highest priority first; batch claims: a worker's leases
create index if not exists wa_instances_lease_idx
    on public.wa_instances (lease_worker, lease_expires_at);

alter table public.wa_workers     enable row level security;
alter table public.wa_fleet_state enable row level security;

-- ---------------------------------------------------------------- events
-- One channel, two payloads: 'q:<instance id>' (a row became queued) and 'l' (lease_version
-- moved). GET /events only wakes on them; what it answers comes from the tables (queued_xact
-- against the previous poll's snapshot, lease_version), so a missed notification is found
-- at the next poll.

create or replace function public.wa_mark_queued()
returns trigger
language plpgsql
set search_path = ''
as $$
begin
    if new.status = 'queued' and (tg_op = 'INSERT' or old.status is distinct from 'queued') then
        new.queued_xact := pg_current_xact_id();
    end if;
    return new;
end
$$;

drop trigger if exists wa_outbound_mark_queued on public.wa_outbound;
create trigger wa_outbound_mark_queued
    before insert or update of status on public.wa_outbound
    for each row execute function public.wa_mark_queued();

create or replace function public.wa_notify_queued()
returns trigger
language plpgsql
set search_path = ''
as $$
begin
    perform pg_notify('wa_worker_events', 'q:' || new.instance_id);
    return null;
end
$$;

drop trigger if exists wa_outbound_notify_insert on public.wa_outbound;
create trigger wa_outbound_notify_insert
    after insert on public.wa_outbound
    for each row when (new.status = 'queued') execute function public.wa_notify_queued();

drop trigger if exists wa_outbound_notify_requeue on public.wa_outbound;
create trigger wa_outbound_notify_requeue
    after update of status on public.wa_outbound
    for each row when (new.status = 'queued' and old.status is distinct from 'queued')
    execute function public.wa_notify_queued();

create or replace function public.wa_lease_changed()
returns void
language sql
set search_path = ''
as $$
    update public.wa_fleet_state set lease_version = lease_version + 1 where id = 1;
    select pg_notify('wa_worker_events', 'l');
$$;

create or replace function public.wa_instances_changed()
returns trigger
language plpgsql
set search_path = ''
as $$
begin
    perform public.wa_lease_changed();
    return null;
end
$$;

-- an instance to run appeared or went away: every worker may have to renew its leases
drop trigger if exists wa_instances_lease_changed on public.wa_instances;
create trigger wa_instances_lease_changed
    after insert or delete on public.wa_instances
    for each statement execute function public.wa_instances_changed();

-- ---------------------------------------------------------------- leases
-- One POST /leases in one transaction: releases, renewals, revocations and grants. Grants
-- take the free rows with FOR UPDATE SKIP LOCKED and re-check them under the lock, so two
-- workers calling at once never both get one instance.
--
-- Fair share: target = the smallest t with sum(min(capacity, t)) over the live workers >=
-- the instances (with equal capacities: ceil(instances / live workers)); a worker gets at
-- most min(capacity, target) - held, and at most p_max_grants per call; holding more than
-- target + 1, it loses up to p_max_grants of its lowest-priority leases (revoked: they
-- expire now and are free one TTL later, or at once when it releases them).
--
-- A call with capacity 0, or with held empty and something in release (a worker's last call
-- on SIGTERM), is a worker leaving: it is granted nothing and no longer counts as live.

create or replace function public.wa_lease_call(
    p_worker text, p_capacity integer, p_held jsonb, p_release jsonb,
    p_ttl_s integer, p_max_grants integer default 5)
returns table (instance_id text, token bigint, granted boolean, priority integer,
               settings jsonb, proxy_url text, pair_phone text)
language plpgsql
set search_path = ''
as $$
#variable_conflict use_column
declare
    v_ttl      interval := make_interval(secs => p_ttl_s);
    v_leaving  boolean := p_capacity = 0
                          or (jsonb_array_length(p_held) = 0 and jsonb_array_length(p_release) > 0);
    v_released text[];
    v_renewed  text[];  -- lowest priority first
    v_needing  integer;
    v_left     integer;
    v_workers  integer;
    v_target   integer;
    v_cap      integer;
    v_revoke   integer;
    v_room     integer;
begin
    -- 1. releases with the current token free the lease at once (an old token is ignored)
    with r as (
        select x->>'instanceId' as id, (x->>'token')::bigint as tok
        from jsonb_array_elements(p_release) as x
    ), freed as (
        update public.wa_instances as i
        set lease_released = true, lease_revoked = false, lease_expires_at = least(i.lease_expires_at, now())
        from r
        where i.id = r.id and r.tok > 0 and i.lease_token = r.tok and not i.lease_released
        returning i.id
    )
    select coalesce(array_agg(freed.id), '{}') into v_released from freed;
    if cardinality(v_released) > 0 then
        perform public.wa_lease_changed();
    end if;

    -- 2. the worker's own row (live workers: seen within the TTL)
    if v_leaving then
        delete from public.wa_workers as w where w.id = p_worker;
    else
        insert into public.wa_workers as w (id, capacity, last_seen)
        values (p_worker, p_capacity, now())
        on conflict (id) do update set capacity = excluded.capacity, last_seen = excluded.last_seen;
    end if;
    delete from public.wa_workers as w where w.last_seen < now() - interval '1 day';

    -- 3. renewals: the current token, still this worker's, neither released nor revoked
    with h as (
        select x->>'instanceId' as id, (x->>'token')::bigint as tok
        from jsonb_array_elements(p_held) as x
    ), renewed as (
        update public.wa_instances as i
        set lease_expires_at = now() + v_ttl
        from h
        where i.id = h.id and i.lease_token = h.tok and i.lease_worker = p_worker
          and not i.lease_released and not i.lease_revoked
        returning i.id, i.priority
    )
    select coalesce(array_agg(renewed.id order by renewed.priority, renewed.id desc), '{}')
    into v_renewed from renewed;

    -- 4. the fair share (water-filling over the live workers' capacities)
    select count(*) into v_needing from public.wa_instances;
    v_left := v_needing;
    v_target := v_needing;
    select count(*) into v_workers from public.wa_workers as w where w.last_seen > now() - v_ttl;
    for v_cap in
        select w.capacity from public.wa_workers as w where w.last_seen > now() - v_ttl order by w.capacity
    loop
        if v_cap::bigint * v_workers >= v_left then
            v_target := ceil(v_left::numeric / v_workers);
            exit;
        end if;
        v_left := v_left - v_cap;
        v_workers := v_workers - 1;
        v_target := v_cap;  -- every live worker is full: nobody takes more than its capacity
    end loop;

    -- 5. revocations: holding more than target + 1, the lowest-priority ones are left out
    if cardinality(v_renewed) > v_target + 1 then
        v_revoke := least(p_max_grants, cardinality(v_renewed) - v_target);
        update public.wa_instances as i
        set lease_revoked = true, lease_expires_at = now()
        where i.id = any(v_renewed[1:v_revoke]);
        v_renewed := v_renewed[v_revoke + 1:];
    end if;

    return query
        select i.id, i.lease_token, false, i.priority, i.settings, i.proxy_url, i.pair_phone
        from public.wa_instances as i where i.id = any(v_renewed);

    -- 6. grants: free instances, highest priority first, never one released in this call
    v_room := case when v_leaving then 0
                   else least(p_max_grants, least(p_capacity, v_target) - cardinality(v_renewed)) end;
    if v_room > 0 then
        return query
            with free as (
                select i.id from public.wa_instances as i
                where (i.lease_worker is null or i.lease_released or i.lease_expires_at + v_ttl < now()
                       -- this worker's own lease it neither holds nor releases in this call (it restarted
                       -- with the same WORKER_ID without knowing it): given back at once, under a new token
                       or (i.lease_worker = p_worker and not i.lease_revoked and not i.lease_released
                           and not exists (select 1 from jsonb_array_elements(p_held || p_release) as x
                                           where x->>'instanceId' = i.id)))
                  and not (i.id = any(v_released))
                order by i.priority desc, i.id
                limit v_room
                for update skip locked
            ), got as (
                update public.wa_instances as i
                set lease_worker = p_worker, lease_token = i.lease_token + 1, lease_expires_at = now() + v_ttl,
                    lease_released = false, lease_revoked = false, lease_granted_at = now()
                from free where i.id = free.id
                returning i.id, i.lease_token, i.priority, i.settings, i.proxy_url, i.pair_phone
            )
            select g.id, g.lease_token, true, g.priority, g.settings, g.proxy_url, g.pair_phone from got as g;
    end if;

    update public.wa_workers as w
    set leases = (select count(*) from public.wa_instances as i
                  where i.lease_worker = p_worker and not i.lease_released and not i.lease_revoked)
    where w.id = p_worker;
end
$$;

-- ---------------------------------------------------------------- hand-back
-- The `unsent` ids of POST /leases items (held or release: [{instanceId, token, unsent: [...]}]):
-- claims the worker made under that token and never began. Called in the same transaction as
-- wa_lease_call, before it (the releases in it end the caller's hold on the token). A message
-- goes back to 'queued' with its claim cleared (the next claim is not a prior_claim) only when
-- the item's token is the instance's current lease token, granted to the caller and not
-- released, and the message is still 'sending' under that token for that instance; any other
-- id (unknown, not a uuid, another instance's, claimed under another token) is ignored. Returns
-- the ids put back; prior_claim_token is kept (an earlier claimer's late mark-sent still counts).

create or replace function public.wa_lease_hand_back(p_worker text, p_items jsonb)
returns table (message_id text, instance_id text)
language plpgsql
set search_path = ''
as $$
#variable_conflict use_column
begin
    return query
        with items as (
            select x->>'instanceId' as iid, (x->>'token')::bigint as tok, x->'unsent' as unsent
            from jsonb_array_elements(p_items) as x
            where jsonb_typeof(x->'unsent') = 'array'
        ), ours as (
            select it.iid, it.tok, it.unsent
            from items as it join public.wa_instances as i on i.id = it.iid
            where i.lease_token = it.tok and i.lease_worker = p_worker and not i.lease_released
            order by i.id
            for update of i  -- a claim of the instance (FOR SHARE) waits, or went first
        ), ids as (
            select o.iid, o.tok,
                   case when u.value ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
                        then u.value::uuid end as mid
            from ours as o cross join lateral jsonb_array_elements_text(o.unsent) as u(value)
        ), back as (
            update public.wa_outbound as m
            set status = 'queued', claimed_at = null, claim_token = null
            from ids
            where m.id = ids.mid and m.instance_id = ids.iid and m.status = 'sending' and m.claim_token = ids.tok
            returning m.id::text, m.instance_id
        )
        select back.id, back.instance_id from back;
end
$$;

-- Only the table owner (the edge function) and the triggers call these: not through
-- PostgREST's /rpc (Supabase grants EXECUTE on new public functions to anon and authenticated).
revoke all on function public.wa_lease_call(text, integer, jsonb, jsonb, integer, integer) from public;
revoke all on function public.wa_lease_hand_back(text, jsonb) from public;
revoke all on function public.wa_lease_changed() from public;
do $$
declare
    r text;
begin
    foreach r in array array['anon', 'authenticated'] loop
        if exists (select 1 from pg_roles where rolname = r) then
            execute format('revoke all on function public.wa_lease_call(text, integer, jsonb, jsonb, integer, integer) from %I', r);
            execute format('revoke all on function public.wa_lease_hand_back(text, jsonb) from %I', r);
            execute format('revoke all on function public.wa_lease_changed() from %I', r);
        end if;
    end loop;
end
$$;
