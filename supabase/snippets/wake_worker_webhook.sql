-- Optional "instant delivery": call the worker's POST /wake when the SaaS
-- queues messages, instead of waiting for its next poll.
--
-- Not a migration on purpose (it needs pg_net, Vault and your worker's URL).
-- Prerequisites, once per project (SQL editor):
--
--   create extension if not exists pg_net;   -- Database → Extensions → pg_net
--   select vault.create_secret('https://worker.example.com/wake', 'wa_worker_wake_url');
--   select vault.create_secret('<the WORKER_SECRET value>',      'wa_worker_secret');
--
-- then run this file. One HTTP call per instance per INSERT statement (the
-- worker coalesces bursts anyway); pg_net sends it after the transaction
-- commits, asynchronously. A missing secret or any error only logs a
-- warning: queuing a message never fails because of the wake-up.
-- Safe to re-run. To remove:
--   drop trigger if exists wa_outbound_wake on public.wa_outbound;
--   drop function if exists public.wa_outbound_wake();

create or replace function public.wa_outbound_wake()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
declare
    wake_url text;
    secret   text;
    inst     text;
begin
    select decrypted_secret into wake_url from vault.decrypted_secrets where name = 'wa_worker_wake_url';
    select decrypted_secret into secret   from vault.decrypted_secrets where name = 'wa_worker_secret';
    if wake_url is null or secret is null then
        raise warning 'wa_outbound_wake: vault secrets wa_worker_wake_url / wa_worker_secret not set';
        return null;
    end if;
    for inst in select distinct instance_id from new_rows where status = 'queued' order by 1 loop
        perform net.http_post(
            url     := wake_url,
            body    := jsonb_build_object('instanceId', inst),
            headers := jsonb_build_object('Content-Type', 'application/json',
                                          'Authorization', 'Bearer ' || secret),
            timeout_milliseconds := 5000
        );
    end loop;
    return null;
exception when others then
    raise warning 'wa_outbound_wake: %', sqlerrm;
    return null;
end
$$;

revoke all on function public.wa_outbound_wake() from public;

drop trigger if exists wa_outbound_wake on public.wa_outbound;
create trigger wa_outbound_wake
    after insert on public.wa_outbound
    referencing new table as new_rows
    for each statement execute function public.wa_outbound_wake();
