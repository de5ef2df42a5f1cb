-- wa-worker issue #12: receipts (the latest status of each sent message), calls and
-- undecryptable messages received, temporary bans. Idempotent, like the others.

alter table public.wa_outbound add column if not exists receipt_status text;
alter table public.wa_outbound add column if not exists receipt_at timestamptz;
alter table public.wa_outbound add column if not exists receipt_by text;
alter table public.wa_inbound add column if not exists call_video boolean;
alter table public.wa_inbound add column if not exists call_rejected boolean;
alter table public.wa_instances add column if not exists ban_code text;
alter table public.wa_instances add column if not exists ban_expires_at timestamptz;

comment on column public.wa_outbound.receipt_status is
    'The latest receipt of a sent message: delivered, read or played (never moves backwards).';
comment on column public.wa_inbound.call_rejected is
    'type call: whether the worker declined the call (CALL_REJECT).';

do $$
begin
    if not exists (select 1 from pg_constraint
                   where conname = 'wa_outbound_receipt_status_check'
                     and conrelid = 'public.wa_outbound'::regclass) then
        alter table public.wa_outbound
            add constraint wa_outbound_receipt_status_check
            check (receipt_status is null or receipt_status in ('delivered', 'read', 'played'));
    end if;

    -- two new inbound types
    alter table public.wa_inbound drop constraint if exists wa_inbound_type_check;
    alter table public.wa_inbound
        add constraint wa_inbound_type_check
        check (type in ('text', 'image', 'video', 'audio', 'voice', 'document', 'sticker', 'location',
                        'contact', 'reaction', 'edit', 'revoke', 'unknown', 'undecryptable', 'call'));
end
$$;

-- /message-status finds a message by its WhatsApp id when the worker does not know its id
create index if not exists wa_outbound_wa_message_idx
    on public.wa_outbound (instance_id, wa_message_id) where wa_message_id is not null;
