-- wa-worker: every kind of message, both ways (issue #11; docs/proxy-contract.md, "Message types").
--
-- Adds to wa_outbound and wa_inbound the columns for the message type, media,
-- replies, reactions, locations and contacts, and error_code to wa_outbound.
-- Every column is nullable or has a default: existing rows stay valid (they are
-- text messages) and a v1 worker keeps working. Idempotent, like the first
-- migration: every statement can run again.
--
-- Media lives in a private Storage bucket, "wa-media" by default (the function's
-- WORKER_MEDIA_BUCKET):
--   * outbound: put the file in the bucket and set media_path (the object's path
--     in the bucket); the function hands the worker a short-lived signed URL.
--     Or set media_url to any public http(s) URL the worker may fetch.
--   * inbound: the worker uploads received media through POST /upload-media;
--     the function stores it at <instance_id>/<wa_message_id> and the row's
--     media_path names it (media_url is null). Sign it when you show it.

-- ------------------------------------------------------------- outbound

alter table public.wa_outbound
    add column if not exists type             text,
    add column if not exists media_url        text,
    add column if not exists media_path       text,
    add column if not exists mimetype         text,
    add column if not exists filename         text,
    add column if not exists reply_to         text,
    add column if not exists reaction         text,
    add column if not exists latitude         double precision,
    add column if not exists longitude        double precision,
    add column if not exists location_name    text,
    add column if not exists location_address text,
    add column if not exists contact_name     text,
    add column if not exists contact_phone    text,
    add column if not exists vcard            text,
    add column if not exists error_code       text;

comment on column public.wa_outbound.type is
    'text (null means text) | image | video | audio | voice | document | sticker | location | contact | reaction';
comment on column public.wa_outbound.media_path is
    'Path of the file in the media Storage bucket (WORKER_MEDIA_BUCKET, default wa-media); the function signs it for the worker.';
comment on column public.wa_outbound.error_code is
    'Machine-readable failure reason from the worker (invalid_message, media_too_large, reply_target_unknown, ...); error says what to fix.';

-- body stays NOT NULL: a captionless media message, a location, a contact or a
-- reaction has body ''.
alter table public.wa_outbound alter column body set default '';

-- ------------------------------------------------------------- inbound

alter table public.wa_inbound
    add column if not exists type             text not null default 'text',
    add column if not exists media_url        text,
    add column if not exists media_path       text,
    add column if not exists mimetype         text,
    add column if not exists filename         text,
    add column if not exists media_size       bigint,
    add column if not exists media_sha256     text,
    add column if not exists media_seconds    integer,
    add column if not exists media_error      text,
    add column if not exists quoted_id        text,
    add column if not exists reaction         text,
    add column if not exists target_id        text,
    add column if not exists latitude         double precision,
    add column if not exists longitude        double precision,
    add column if not exists location_name    text,
    add column if not exists location_address text,
    add column if not exists contact_name     text,
    add column if not exists contact_phone    text,
    add column if not exists vcard            text,
    add column if not exists view_once        boolean not null default false;

comment on column public.wa_inbound.media_path is
    'Path of the received media in the media Storage bucket (<instance_id>/<wa_message_id>), uploaded by the worker; null with media_error when the bytes could not be kept.';
comment on column public.wa_inbound.target_id is
    'The message a reaction, an edit (body is the new text) or a revoke (deletion) refers to.';

-- ----------------------------------------------------------- constraints

do $$
begin
    if not exists (select 1 from pg_constraint
                   where conname = 'wa_outbound_type_check'
                     and conrelid = 'public.wa_outbound'::regclass) then
        alter table public.wa_outbound
            add constraint wa_outbound_type_check
            check (type is null or type in ('text', 'image', 'video', 'audio', 'voice', 'document',
                                            'sticker', 'location', 'contact', 'reaction'));
    end if;

    if not exists (select 1 from pg_constraint
                   where conname = 'wa_inbound_type_check'
                     and conrelid = 'public.wa_inbound'::regclass) then
        alter table public.wa_inbound
            add constraint wa_inbound_type_check
            check (type in ('text', 'image', 'video', 'audio', 'voice', 'document', 'sticker', 'location',
                            'contact', 'reaction', 'edit', 'revoke', 'unknown'));
    end if;

    if not exists (select 1 from pg_constraint
                   where conname = 'wa_inbound_media_error_check'
                     and conrelid = 'public.wa_inbound'::regclass) then
        alter table public.wa_inbound
            add constraint wa_inbound_media_error_check
            check (media_error is null or media_error in ('upload_unsupported', 'too_large', 'download_failed'));
    end if;
end
$$;

-- Replies, reactions, edits and revokes are looked up by the message they name.
create index if not exists wa_inbound_target_idx
    on public.wa_inbound (instance_id, target_id) where target_id is not null;

-- ------------------------------------------------------- Storage bucket
-- A private bucket for media both ways. Created only where Supabase Storage
-- exists (a plain PostgreSQL has no storage schema); its name must match the
-- function's WORKER_MEDIA_BUCKET.

do $$
begin
    if to_regclass('storage.buckets') is not null then
        insert into storage.buckets (id, name, public)
        values ('wa-media', 'wa-media', false)
        on conflict (id) do nothing;
    end if;
end
$$;
