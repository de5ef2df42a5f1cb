-- wa-worker issue #12: each instance's own settings and upstream proxy, picked up by a
-- connected worker through GET /instance-settings?since=<cursor> (changes only), and
-- pairing with a code (pair_phone in, pair_code out). Idempotent, like the others.
--
--   settings             jsonb object: send pacing (send_min_gap_ms, send_jitter_ms,
--                        send_max_per_minute, send_max_per_day, typing_indicator, typing_max_s)
--                        and calls (call_reject, call_reject_message); null = the worker's defaults
--   proxy_url            http://[user:pass@]host:port, https://… or socks5://…; null = direct.
--                        It holds credentials: RLS stays on with no policy (service role only)
--   settings_updated_at  set by the trigger below whenever settings or proxy_url change

alter table public.wa_instances add column if not exists pair_phone text;
alter table public.wa_instances add column if not exists pair_code text;
alter table public.wa_instances add column if not exists settings jsonb;
alter table public.wa_instances add column if not exists proxy_url text;
alter table public.wa_instances add column if not exists settings_updated_at timestamptz;

comment on column public.wa_instances.settings is
    'This instance''s own settings over the worker''s defaults (pacing, call_reject, call_reject_message): a JSON object, null = defaults.';
comment on column public.wa_instances.proxy_url is
    'Upstream proxy for this instance''s WhatsApp connection (http, https or socks5; null = direct). Contains credentials: never expose it to clients.';
comment on column public.wa_instances.pair_phone is
    'Digits of the phone to pair with a code (besides the QR); the worker pushes the code into pair_code.';

do $$
begin
    if not exists (select 1 from pg_constraint where conname = 'wa_instances_pair_phone_check'
                   and conrelid = 'public.wa_instances'::regclass) then
        alter table public.wa_instances add constraint wa_instances_pair_phone_check
            check (pair_phone is null or pair_phone ~ '^[0-9]{8,15}$');
    end if;
    if not exists (select 1 from pg_constraint where conname = 'wa_instances_settings_check'
                   and conrelid = 'public.wa_instances'::regclass) then
        alter table public.wa_instances add constraint wa_instances_settings_check
            check (settings is null or jsonb_typeof(settings) = 'object');
    end if;
    if not exists (select 1 from pg_constraint where conname = 'wa_instances_proxy_url_check'
                   and conrelid = 'public.wa_instances'::regclass) then
        alter table public.wa_instances add constraint wa_instances_proxy_url_check
            check (proxy_url is null or (proxy_url ~* '^(https?|socks5h?)://[^/?#[:space:]]+:[0-9]{1,5}/?$'
                                         and length(proxy_url) <= 2048));
    end if;
end
$$;

create or replace function public.wa_touch_settings()
returns trigger
language plpgsql
as $$
begin
    if tg_op = 'INSERT' then
        if new.settings is not null or new.proxy_url is not null then
            new.settings_updated_at := clock_timestamp();
        end if;
    elsif new.settings is distinct from old.settings or new.proxy_url is distinct from old.proxy_url then
        new.settings_updated_at := clock_timestamp();
    end if;
    return new;
end;
$$;

drop trigger if exists wa_instances_touch_settings on public.wa_instances;
create trigger wa_instances_touch_settings
    before insert or update on public.wa_instances
    for each row execute function public.wa_touch_settings();

-- GET /instance-settings?since=…: the rows changed lately
create index if not exists wa_instances_settings_updated_idx
    on public.wa_instances (settings_updated_at) where settings_updated_at is not null;
