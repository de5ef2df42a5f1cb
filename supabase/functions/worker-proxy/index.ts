// worker-proxy: the edge proxy wa-worker talks to (docs/proxy-contract.md).
//
// A Supabase Edge Function (Deno) speaking SQL to the project's database
// through postgres.js and SUPABASE_DB_URL (provided by Supabase). Schema:
// supabase/migrations/ (20261123000000_wa_worker.sql, then
// 20261125000000_wa_worker_message_types.sql: message types and media).
//
// Every request must carry `Authorization: Bearer $WORKER_SECRET`; the
// function is deployed with JWT verification off (see supabase/README.md).
//
// Routes (the endpoint is the last path segment, so both
// /functions/v1/worker-proxy/<endpoint> and /<endpoint> work):
//   GET  /disconnected-instances
//   POST /update-status
//   GET  /queued-messages[?instanceId=<id>][&limit=<n>]
//   POST /mark-sent
//   POST /mark-failed
//   POST /inbound
//   POST /upload-media?instanceId=<id>&wa_message_id=<wa id>   (raw bytes)
//   POST /message-status
//   GET  /instance-settings[?since=<cursor>]   (settings / proxy_url changes; 20261127000000_…)
//   POST /leases                               (a fleet: 20261128000000_wa_worker_leases.sql)
//   GET  /lease-holder?instanceId=<id>         (who holds it, and its api_url: the direct API's 307)
//   GET  /events?wait=<s>[&cursor=<c>]         (long poll: LISTEN/NOTIFY)
//
// Leases and fencing (docs/proxy-contract.md, "Leases and fencing"): POST /leases grants,
// renews, revokes and releases instances in one transaction (public.wa_lease_call). Calls
// carrying a `lease_token` are checked against it: /update-status and claims need the
// instance's current token, /mark-sent and /mark-failed the token the message was claimed
// under; a stale one is a 409 {"error":"lease_lost"}. /inbound, /message-status and
// /upload-media are facts and never refused for it. Without lease fields nothing changes.
//
// Media (issue #11) lives in a private Storage bucket (WORKER_MEDIA_BUCKET):
// an outbound row's media_path is handed to the worker as a short-lived
// signed URL (media_url); /upload-media puts received media at
// <instanceId>/<wa_message_id> (upsert: a retried upload overwrites the same
// object) and answers {"path": ...}, which the worker sends back as
// media.url in /inbound and is stored in wa_inbound.media_path. Storage is
// called over its HTTP API with the service role key.
//
// Bad input is a 400 with {"error": ...}, never a 500: NUL characters are
// removed from every string, a lone UTF-16 surrogate is refused, and a
// PostgreSQL data error (SQLSTATE class 22 or 23) is answered 400, so that
// the worker sets a poisoned record aside instead of retrying it (inbound
// messages are delivered in order per chat: a 5xx would block the chat).
//
// Environment:
//   WORKER_SECRET          required, shared with the worker
//   SUPABASE_DB_URL        required (set by Supabase)
//   CLAIM_LEASE_SECONDS    re-offer 'sending' claims older than this (300)
//   WORKER_PROXY_DB_POOL   connections per isolate (5)
//   SUPABASE_URL, SUPABASE_SERVICE_ROLE_KEY   Storage (set by Supabase; media only)
//   WORKER_MEDIA_BUCKET    the private bucket for media ("wa-media")
//   MEDIA_SIGNED_URL_SECONDS  lifetime of the signed URLs handed to the worker (600)
//   WORKER_MEDIA_MAX_BYTES largest /upload-media body (67108864)
//   WORKER_LEASE_TTL_SECONDS  lease TTL handed to the workers (30); free one TTL after expiry
//   WORKER_EVENTS_MAX_WAIT_SECONDS  cap of GET /events?wait (25; the edge runtime's wall clock
//                          limit is 150 s per request on the free plan, 400 s on paid plans)
//   WORKER_PROXY_LISTEN_DB_URL  a session connection for LISTEN (default SUPABASE_DB_URL; set it
//                          when SUPABASE_DB_URL goes through a transaction-mode pooler)
//   WORKER_PROXY_PORT      local runs only: listen on this port (0 = any)
//   WORKER_PROXY_HOSTNAME  local runs only: listen address (127.0.0.1)

import postgres from "postgres";

const INSTANCE_ID_RE = /^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$/;
const WORKER_ID_RE = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$/;
const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
const INSTANCE_STATUSES = ["CONNECTING", "CONNECTED", "DISCONNECTED"];

const DEFAULT_LIMIT = 50; // messages per instance per poll
const MAX_LIMIT = 500;
const MAX_BATCH = 500; // messages per batch poll, all instances together
const MAX_BODY_BYTES = 2_000_000; // a QR data URL is ~10 KB; inbound text is small
const MAX_TEXT = 65_536; // message bodies
const MAX_SHORT = 512; // ids, JIDs, names, reasons
const MAX_ERROR = 4_000;
const MAX_QR = 1_000_000;
const END_OF_9999 = 253_402_300_800; // 10000-01-01T00:00:00Z in Unix seconds

function envInt(name: string, fallback: number): number {
  const raw = Deno.env.get(name);
  const n = raw === undefined ? NaN : Number(raw);
  return Number.isInteger(n) && n > 0 ? n : fallback;
}

const LEASE_SECONDS = envInt("CLAIM_LEASE_SECONDS", 300);
const LEASE_TTL_S = envInt("WORKER_LEASE_TTL_SECONDS", 30);
const LEASE_GRANTS_PER_CALL = 5;
const MAX_LEASE_ITEMS = 10_000; // held / release entries per call
const MAX_UNSENT_PER_ITEM = 1_000; // handed-back claims per held / release entry (the worker sends at most 1,000)
const MAX_MESSAGE_ID = 256;
const MAX_CAPACITY = 100_000;
const EVENTS_MAX_WAIT_S = envInt("WORKER_EVENTS_MAX_WAIT_SECONDS", 25);
const EVENTS_CHANNEL = "wa_worker_events";
const MEDIA_BUCKET = Deno.env.get("WORKER_MEDIA_BUCKET") || "wa-media";
const SIGNED_URL_SECONDS = envInt("MEDIA_SIGNED_URL_SECONDS", 600);
const MEDIA_MAX_BYTES = envInt("WORKER_MEDIA_MAX_BYTES", 64 * 1024 * 1024);
const STORAGE_TIMEOUT_MS = 30_000;
const SIGN_CONCURRENCY = 8;

const WA_ID_RE = /^[A-Za-z0-9._:-]{1,128}$/;
const ERROR_CODE_RE = /^[a-z][a-z0-9_]{0,63}$/;
const OUT_TYPES = ["text", "image", "video", "audio", "voice", "document", "sticker", "location", "contact",
  "reaction"];
const IN_TYPES = [...OUT_TYPES, "edit", "revoke", "unknown", "undecryptable", "call"];
const RECEIPT_STATUSES = ["delivered", "read", "played"];
const MAX_STATUSES = 100;
const MEDIA_ERRORS = ["upload_unsupported", "too_large", "download_failed"];

// ------------------------------------------------------------------ errors

class HttpError extends Error {
  constructor(public status: number, message: string) {
    super(message);
  }
}

const bad = (message: string) => new HttpError(400, message);

function json(status: number, data: unknown, headers: Record<string, string> = {}): Response {
  return new Response(JSON.stringify(data), {
    status,
    headers: { "content-type": "application/json; charset=utf-8", "cache-control": "no-store", ...headers },
  });
}

// -------------------------------------------------------------------- db

type Sql = ReturnType<typeof postgres>;
let pool: Sql | null = null;

function db(): Sql {
  if (pool === null) {
    const url = Deno.env.get("SUPABASE_DB_URL");
    if (!url) throw new HttpError(500, "SUPABASE_DB_URL is not set");
    pool = postgres(url, {
      // Supabase's pooler (transaction mode) does not support prepared statements.
      prepare: false,
      max: envInt("WORKER_PROXY_DB_POOL", 5),
      idle_timeout: 20,
      connect_timeout: 10,
      onnotice: () => {},
    });
  }
  return pool;
}

// ------------------------------------------------------------------ auth

const encoder = new TextEncoder();

// Compares SHA-256 digests byte by byte without early exit: the time taken
// depends on neither the secret's length nor the position of a mismatch.
async function constantTimeEqual(a: string, b: string): Promise<boolean> {
  const [da, dbb] = await Promise.all([
    crypto.subtle.digest("SHA-256", encoder.encode(a)),
    crypto.subtle.digest("SHA-256", encoder.encode(b)),
  ]);
  const x = new Uint8Array(da);
  const y = new Uint8Array(dbb);
  let diff = 0;
  for (let i = 0; i < x.length; i++) diff |= x[i] ^ y[i];
  return diff === 0;
}

async function authorized(req: Request): Promise<boolean> {
  const secret = Deno.env.get("WORKER_SECRET");
  if (!secret) throw new HttpError(500, "WORKER_SECRET is not set");
  const match = /^Bearer[ \t]+(\S.*)$/i.exec((req.headers.get("authorization") ?? "").trim());
  const given = match ? match[1].trim() : "";
  const same = await constantTimeEqual(given, secret);
  return match !== null && same;
}

// ------------------------------------------------------------ validation

type Json = Record<string, unknown>;

// Reads the JSON object body and makes every string in it storable:
// NUL (U+0000) is removed (PostgreSQL text and jsonb cannot hold it), and a
// lone UTF-16 surrogate (e.g. "\ud800", not a character) is a 400, except in
// the top-level fields listed in `repair`, where it becomes U+FFFD.
async function readJson(req: Request, repair: readonly string[] = []): Promise<Json> {
  const text = await req.text();
  if (encoder.encode(text).length > MAX_BODY_BYTES) throw new HttpError(413, "request body too large");
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch {
    throw bad("body must be JSON");
  }
  if (value === null || typeof value !== "object" || Array.isArray(value)) {
    throw bad("body must be a JSON object");
  }
  // Object.fromEntries defines own properties: a "__proto__" key stays data.
  return Object.fromEntries(Object.entries(value as Json).map(([key, item]) => {
    const field = storable(key, "a field name", false);
    return [field, clean(item, field, repair.includes(field))];
  }));
}

const NUL_RE = /\u0000/g;

function storable(text: string, where: string, repairSurrogates: boolean): string {
  const out = text.includes("\u0000") ? text.replace(NUL_RE, "") : text;
  if (out.isWellFormed()) return out;
  if (repairSurrogates) return out.toWellFormed();
  throw bad(`${where} contains a lone UTF-16 surrogate (not a character; it cannot be stored)`);
}

function clean(value: unknown, path: string, repairSurrogates: boolean): unknown {
  if (typeof value === "string") return storable(value, path, repairSurrogates);
  if (Array.isArray(value)) return value.map((v, i) => clean(v, `${path}[${i}]`, repairSurrogates));
  if (value !== null && typeof value === "object") {
    return Object.fromEntries(Object.entries(value as Json).map(([k, v]) => {
      const key = storable(k, `a field name in ${path}`, repairSurrogates);
      return [key, clean(v, `${path}.${key}`, repairSurrogates)];
    }));
  }
  return value;
}

function instanceId(value: unknown, field = "instanceId"): string {
  if (value === undefined || value === null || value === "") throw bad(`${field} is required`);
  if (typeof value !== "string" || !INSTANCE_ID_RE.test(value)) {
    throw bad(`${field} must match ^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$`);
  }
  return value;
}

function messageId(value: unknown): string {
  if (value === undefined || value === null || value === "") throw bad("messageId is required");
  if (typeof value !== "string" || !UUID_RE.test(value)) throw bad("messageId must be a UUID");
  return value.toLowerCase();
}

function requiredString(body: Json, field: string, max: number, allowEmpty = false): string {
  const value = body[field];
  if (value === undefined || value === null) throw bad(`${field} is required`);
  if (typeof value !== "string") throw bad(`${field} must be a string`);
  if (!allowEmpty && value === "") throw bad(`${field} must not be empty`);
  if (value.length > max) throw bad(`${field} is longer than ${max} characters`);
  return value;
}

function optionalString(body: Json, field: string, max: number): string | null {
  const value = body[field];
  if (value === undefined || value === null) return null;
  if (typeof value !== "string") throw bad(`${field} must be a string or null`);
  if (value.length > max) throw bad(`${field} is longer than ${max} characters`);
  return value;
}

function optionalBoolean(body: Json, field: string): boolean {
  const value = body[field];
  if (value === undefined || value === null) return false;
  if (typeof value !== "boolean") throw bad(`${field} must be a boolean`);
  return value;
}

// Unix time in seconds (milliseconds accepted too: anything above 1e11);
// null when absent. Negative, non-numeric or after 9999-12-31 → 400.
function optionalTimestamp(body: Json, field: string): number | null {
  const value = body[field];
  if (value === undefined || value === null) return null;
  const n = typeof value === "string" && value.trim() !== "" ? Number(value) : value;
  if (typeof n !== "number" || !Number.isFinite(n) || n < 0) throw bad(`${field} must be a Unix time in seconds`);
  const seconds = n > 1e11 ? n / 1000 : n;
  if (seconds >= END_OF_9999) throw bad(`${field} is out of range (after 9999-12-31)`);
  return seconds;
}

function limitParam(url: URL): number {
  const raw = url.searchParams.get("limit");
  if (raw === null || raw === "") return DEFAULT_LIMIT;
  const n = Number(raw);
  if (!Number.isInteger(n) || n < 1) throw bad("limit must be a positive integer");
  return Math.min(n, MAX_LIMIT);
}

// The fencing token of an instance-scoped call (a body field or a query parameter); null
// when absent: the call is then not checked (a worker without leases).
function leaseToken(value: unknown): number | null {
  if (value === undefined || value === null || value === "") return null;
  const n = typeof value === "string" && /^[0-9]{1,16}$/.test(value) ? Number(value) : value;
  if (typeof n !== "number" || !Number.isSafeInteger(n) || n < 0) {
    throw bad("lease_token must be a non-negative integer");
  }
  return n;
}

// X-Worker-Id (sent by a worker with leases on); null when absent.
function workerIdHeader(req: Request): string | null {
  const raw = (req.headers.get("x-worker-id") ?? "").trim();
  if (raw === "") return null;
  if (!WORKER_ID_RE.test(raw)) throw bad("X-Worker-Id must match ^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$");
  return raw;
}

// A stale fencing token: the worker no longer holds the instance (or never claimed the message).
const leaseLost = () => new HttpError(409, "lease_lost");

// --------------------------------------------------------------- storage
// Supabase Storage's object API (what supabase-js calls):
//   POST {SUPABASE_URL}/storage/v1/object/<bucket>/<path>       upload (x-upsert: true overwrites)
//   POST {SUPABASE_URL}/storage/v1/object/sign/<bucket>/<path>  {"expiresIn": s} → {"signedURL": "/object/sign/...?token=..."}
// The signed URL it returns is relative to /storage/v1.

class StorageError extends Error {
  constructor(public status: number, message: string) {
    super(message);
  }
}

function storageBase(): { url: string; key: string } {
  const url = Deno.env.get("SUPABASE_URL");
  const key = Deno.env.get("SUPABASE_SERVICE_ROLE_KEY");
  if (!url || !key) throw new HttpError(500, "SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY are needed for media");
  return { url: url.replace(/\/+$/, ""), key };
}

function objectPath(path: string): string {
  return path.split("/").map(encodeURIComponent).join("/");
}

async function storageCall(path: string, init: RequestInit): Promise<Response> {
  const { url, key } = storageBase();
  const headers = new Headers(init.headers);
  headers.set("authorization", `Bearer ${key}`);
  headers.set("apikey", key);
  let resp: Response;
  try {
    resp = await fetch(`${url}/storage/v1/${path}`, {
      ...init, headers, redirect: "error", signal: AbortSignal.timeout(STORAGE_TIMEOUT_MS),
    });
  } catch (e) {
    throw new StorageError(503, `storage unreachable: ${(e as Error).name}`);
  }
  if (!resp.ok) {
    const detail = (await resp.text().catch(() => "")).slice(0, 300);
    throw new StorageError(resp.status, `storage answered ${resp.status}: ${detail}`);
  }
  return resp;
}

// A short-lived URL the worker can GET without credentials.
async function signedUrl(path: string): Promise<string> {
  const resp = await storageCall(`object/sign/${encodeURIComponent(MEDIA_BUCKET)}/${objectPath(path)}`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ expiresIn: SIGNED_URL_SECONDS }),
  });
  const data = await resp.json().catch(() => ({})) as { signedURL?: unknown; signedUrl?: unknown };
  const signed = data.signedURL ?? data.signedUrl;
  if (typeof signed !== "string" || signed === "") throw new StorageError(502, "storage returned no signedURL");
  if (/^https?:\/\//i.test(signed)) return signed;
  return `${storageBase().url}/storage/v1${signed.startsWith("/") ? "" : "/"}${signed}`;
}

// Counts the bytes going through; errors past the cap (the upload to Storage is aborted).
function capped(max: number): { stream: TransformStream<Uint8Array, Uint8Array>; over: () => boolean } {
  let seen = 0;
  const stream = new TransformStream<Uint8Array, Uint8Array>({
    transform(chunk, controller) {
      seen += chunk.byteLength;
      if (seen > max) controller.error(new HttpError(413, `media larger than ${max} bytes`));
      else controller.enqueue(chunk);
    },
  });
  return { stream, over: () => seen > max };
}

// ------------------------------------------------------------- endpoints

type Handler = (req: Request, url: URL) => Promise<Response>;

// GET /disconnected-instances → {"instances":[{id,priority}]}, highest priority first.
// An item also carries pair_phone (when set), and settings + proxy_url once either was
// ever set (null then means "back to the worker's defaults" / "dial directly").
async function disconnectedInstances(): Promise<Response> {
  const rows = await db()`
    select id, priority, pair_phone, settings, proxy_url, settings_updated_at
    from public.wa_instances
    where status in ('DISCONNECTED', 'CONNECTING')
    order by priority desc, id`;
  return json(200, {
    instances: rows.map((r) => ({
      id: r.id,
      priority: r.priority,
      ...(r.pair_phone ? { pair_phone: r.pair_phone } : {}),
      ...(r.settings_updated_at ? { settings: r.settings ?? null, proxy_url: r.proxy_url ?? null } : {}),
    })),
  });
}

// GET /instance-settings[?since=<cursor>] → {"instances":[{id,settings,proxy_url}],"cursor"}:
// the instances whose settings or proxy_url changed since the cursor (every instance that
// has any without one). The cursor is this read's time (epoch microseconds); rows are
// matched from 60 s before it, because a transaction still open while we read commits
// later with an earlier settings_updated_at. An item may so come twice: harmless.
const SETTINGS_OVERLAP_S = 60;

async function instanceSettings(_req: Request, url: URL): Promise<Response> {
  const raw = url.searchParams.get("since");
  if (raw !== null && !/^[0-9]{1,17}$/.test(raw)) throw bad("since must be a cursor this function gave");
  const since = raw === null ? null : Number(raw);
  const sql = db();
  const [{ now }] = await sql`select (extract(epoch from statement_timestamp()) * 1000000)::bigint::text as now`;
  const rows = since === null
    ? await sql`
        select id, settings, proxy_url from public.wa_instances
        where settings_updated_at is not null
        order by settings_updated_at, id`
    : await sql`
        select id, settings, proxy_url from public.wa_instances
        where settings_updated_at > to_timestamp(${since}::float8 / 1000000) - make_interval(secs => ${SETTINGS_OVERLAP_S})
        order by settings_updated_at, id`;
  return json(200, {
    instances: rows.map((r) => ({ id: r.id, settings: r.settings ?? null, proxy_url: r.proxy_url ?? null })),
    cursor: now,
  });
}

// POST /update-status {instanceId, status, qr_code?, phone_number?, reason?}
async function updateStatus(req: Request): Promise<Response> {
  const body = await readJson(req);
  const id = instanceId(body.instanceId);
  const status = body.status;
  if (typeof status !== "string" || !INSTANCE_STATUSES.includes(status)) {
    throw bad(`status must be one of ${INSTANCE_STATUSES.join(", ")}`);
  }
  // qr_code: set when the key is present (null clears it); when absent the
  // QR is kept while CONNECTING and cleared otherwise.
  const hasQr = Object.prototype.hasOwnProperty.call(body, "qr_code");
  const qr = optionalString(body, "qr_code", MAX_QR);
  const phone = optionalString(body, "phone_number", 64);
  const hasReason = Object.prototype.hasOwnProperty.call(body, "reason") && body.reason !== null;
  const reason = optionalString(body, "reason", MAX_SHORT);
  // a temporary ban (with DISCONNECTED): kept until the next status
  const banCode = optionalString(body, "ban_code", MAX_SHORT);
  const banExpires = optionalTimestamp(body, "ban_expires_at");
  // a pairing code (with CONNECTING, when the row has pair_phone): kept while CONNECTING
  const pairCode = optionalString(body, "pair_code", 64);
  const token = leaseToken(body.lease_token);

  const sql = db();
  const rows = await sql`
    update public.wa_instances set
      status = ${status},
      qr_code = case
        when ${hasQr}::boolean then ${qr}::text
        when ${status}::text = 'CONNECTING' then qr_code
        else null end,
      phone_number = coalesce(${phone}::text, phone_number),
      last_reason = case when ${hasReason}::boolean then ${reason}::text else last_reason end,
      ban_code = ${banCode}::text,
      pair_code = case when ${status}::text = 'CONNECTING' then coalesce(${pairCode}::text, pair_code) else null end,
      ban_expires_at = case when ${banExpires}::float8 is null then null else to_timestamp(${banExpires}::float8) end
    where id = ${id} ${
    token === null ? sql`` : sql`and lease_token = ${token}::bigint and lease_worker is not null and not lease_released`}
    returning id, status`;
  if (rows.length === 0) {
    const found = await sql`select 1 from public.wa_instances where id = ${id}`;
    throw found.length === 0 ? new HttpError(404, "unknown instance") : leaseLost();
  }
  return json(200, { ok: true, id: rows[0].id, status: rows[0].status });
}

// GET /queued-messages?instanceId=<id> → claims the instance's queued
// messages (and 'sending' claims older than the lease), oldest first.
// Without instanceId (batch mode): the same over every CONNECTED instance.
//
// With leases: `lease_token=<n>` must be the instance's current token (else 409
// lease_lost, nothing claimed); batch mode with X-Worker-Id claims only for the
// instances leased to that worker. Each claim records its token (claim_token) and
// each message then carries lease_token; a 'sending' claim made under another
// token is offered again at once (the lease moved: its holder stopped) with
// "prior_claim": true, as is one under no token once older than CLAIM_LEASE_SECONDS.
async function queuedMessages(req: Request, url: URL): Promise<Response> {
  const limit = limitParam(url);
  const raw = url.searchParams.get("instanceId");
  const token = leaseToken(url.searchParams.get("lease_token"));
  const worker = raw === null ? workerIdHeader(req) : null;
  const sql = db();
  const leased = token !== null || worker !== null; // claims under lease tokens
  let rows;
  if (raw === null && worker === null) {
    rows = await sql`
      with picked as (
        select m.id
        from public.wa_instances i
        cross join lateral (
          select o.id, o.created_at, o.seq
          from public.wa_outbound o
          where o.instance_id = i.id
            and (o.status = 'queued'
                 or (o.status = 'sending'
                     and o.claimed_at < now() - make_interval(secs => ${LEASE_SECONDS})))
          order by o.created_at, o.seq
          limit ${limit}
          for update of o skip locked
        ) m
        where i.status = 'CONNECTED'
        order by m.created_at, m.seq
        limit ${MAX_BATCH}
      ), claimed as (
        update public.wa_outbound o
        set status = 'sending', claimed_at = now(), attempts = o.attempts + 1
        from picked
        where o.id = picked.id
        returning o.*
      )
      select * from claimed order by created_at, seq`;
  } else if (raw === null) {
    // batch mode with leases: this worker's live leases only, each claim under its token
    rows = await sql`
      with picked as (
        select m.id, m.prev_status, m.prev_claim, i.lease_token as tok
        from public.wa_instances i
        cross join lateral (
          select o.id, o.created_at, o.seq, o.status as prev_status, o.claim_token as prev_claim
          from public.wa_outbound o
          where o.instance_id = i.id
            and (o.status = 'queued'
                 or (o.status = 'sending'
                     and (o.claimed_at < now() - make_interval(secs => ${LEASE_SECONDS})
                          or o.claim_token <> i.lease_token)))
          order by o.created_at, o.seq
          limit ${limit}
          for update of o skip locked
        ) m
        where i.status = 'CONNECTED' and i.lease_worker = ${worker}
          and not i.lease_released and not i.lease_revoked and i.lease_expires_at > now()
        order by m.created_at, m.seq
        limit ${MAX_BATCH}
      ), claimed as (
        update public.wa_outbound o
        set status = 'sending', claimed_at = now(), attempts = o.attempts + 1, claim_token = picked.tok,
            prior_claim_token = case when picked.prev_status = 'sending' then picked.prev_claim
                                     else o.prior_claim_token end
        from picked
        where o.id = picked.id
        returning o.*, picked.prev_status = 'sending' and picked.prev_claim is distinct from picked.tok as prior_claim
      )
      select * from claimed order by created_at, seq`;
  } else {
    const id = instanceId(raw);
    rows = await sql.begin(async (tx) => {
      if (token === null) { // without leases: exactly as before
        const found = await tx`select 1 from public.wa_instances where id = ${id}`;
        if (found.length === 0) throw new HttpError(404, "unknown instance");
        return await tx`
          with picked as (
            select id from public.wa_outbound
            where instance_id = ${id}
              and (status = 'queued'
                   or (status = 'sending'
                       and claimed_at < now() - make_interval(secs => ${LEASE_SECONDS})))
            order by created_at, seq
            limit ${limit}
            for update skip locked
          ), claimed as (
            update public.wa_outbound o
            set status = 'sending', claimed_at = now(), attempts = o.attempts + 1
            from picked
            where o.id = picked.id
            returning o.*
          )
          select * from claimed order by created_at, seq`;
      }
      // the lease is checked and the claim made in one transaction; FOR SHARE holds off a grant meanwhile
      const found = await tx`
        select lease_token = ${token}::bigint and not lease_released and not lease_revoked
               and lease_expires_at > now() as current
        from public.wa_instances where id = ${id} for share`;
      if (found.length === 0) throw new HttpError(404, "unknown instance");
      if (found[0].current !== true) throw leaseLost();
      return await tx`
        with picked as (
          select id, status as prev_status, claim_token as prev_claim from public.wa_outbound
          where instance_id = ${id}
            and (status = 'queued'
                 or (status = 'sending'
                     and (claimed_at < now() - make_interval(secs => ${LEASE_SECONDS})
                          or claim_token <> ${token}::bigint)))
          order by created_at, seq
          limit ${limit}
          for update skip locked
        ), claimed as (
          update public.wa_outbound o
          set status = 'sending', claimed_at = now(), attempts = o.attempts + 1, claim_token = ${token}::bigint,
              prior_claim_token = case when picked.prev_status = 'sending' then picked.prev_claim
                                       else o.prior_claim_token end
          from picked
          where o.id = picked.id
          returning o.*, picked.prev_status = 'sending' and picked.prev_claim is distinct from ${token}::bigint
                         as prior_claim
        )
        select * from claimed order by created_at, seq`;
    });
  }
  // signed in small parallel groups: a batch may hold many media rows
  const messages: Json[] = [];
  for (let i = 0; i < rows.length; i += SIGN_CONCURRENCY) {
    const group = await Promise.all(rows.slice(i, i + SIGN_CONCURRENCY).map((r) => queuedMessage(sql, r, leased)));
    for (const message of group) if (message !== null) messages.push(message);
  }
  return json(200, { messages });
}

// A claimed row as the worker reads it: the first contract's four fields, plus
// only the content fields the row has (a text row is exactly a v1 record).
// Claimed under a lease token (`leased`), it also carries lease_token and prior_claim.
async function queuedMessage(sql: Sql, r: postgres.Row, leased: boolean): Promise<Json | null> {
  const m: Json = { id: r.id, instanceId: r.instance_id, to: r.to, body: r.body };
  if (leased && r.claim_token !== null && r.claim_token !== undefined) {
    m.lease_token = Number(r.claim_token);
    if (r.prior_claim === true) m.prior_claim = true;
  }
  const copy: [string, string][] = [
    ["type", "type"], ["media_url", "media_url"], ["mimetype", "mimetype"], ["filename", "filename"],
    ["reply_to", "reply_to"], ["reaction", "reaction"], ["latitude", "latitude"], ["longitude", "longitude"],
    ["location_name", "name"], ["location_address", "address"], ["vcard", "vcard"],
  ];
  for (const [column, field] of copy) if (r[column] !== null && r[column] !== undefined) m[field] = r[column];
  if (r.contact_name !== null || r.contact_phone !== null) {
    m.contact = { name: r.contact_name, phone: r.contact_phone };
  }
  if (r.media_path && !r.media_url) {
    try {
      m.media_url = await signedUrl(r.media_path);
    } catch (e) {
      if (!(e instanceof StorageError)) throw e;
      if (e.status >= 500 || e.status === 429) {
        // Storage is down: give the claim back (the next poll tries again) and let the
        // other messages go out; the attempt is not counted
        console.error(`worker-proxy queued-messages: ${e.message}`);
        await sql`
          update public.wa_outbound set status = 'queued', claimed_at = null, attempts = greatest(attempts - 1, 0)
          where id = ${r.id}::uuid and status = 'sending'`;
        return null;
      }
      // the object is missing (or not allowed): the SaaS must fix the row, the worker can do nothing
      await sql`
        update public.wa_outbound set status = 'failed', error_code = 'media_fetch_failed',
          error = ${`media_path ${String(r.media_path).slice(0, 200)} cannot be signed in bucket ${MEDIA_BUCKET}: ${e.message}`.slice(0, MAX_ERROR)}
        where id = ${r.id}::uuid and status = 'sending'`;
      return null;
    }
  }
  return m;
}

// POST /mark-sent {messageId, wa_message_id, lease_token?}. Idempotent; 'sent' is terminal
// (it also overrides an earlier 'failed': the worker knows best). With lease_token: accepted
// when it is the token the message was claimed under, even if the lease moved since (or the
// one of the claim a re-offer replaced: the truth about a send is never refused), else 409.
async function markSent(req: Request): Promise<Response> {
  const body = await readJson(req);
  const id = messageId(body.messageId);
  const waId = optionalString(body, "wa_message_id", MAX_SHORT);
  const token = leaseToken(body.lease_token);
  const sql = db();
  const rows = await sql`
    update public.wa_outbound set
      status = 'sent',
      wa_message_id = coalesce(${waId}::text, wa_message_id),
      sent_at = coalesce(sent_at, now()),
      error = null,
      error_code = null
    where id = ${id}::uuid ${
    token === null ? sql`` : sql`and (claim_token = ${token}::bigint or prior_claim_token = ${token}::bigint)`}
    returning status`;
  // An unknown id is answered 200 (nothing left to do) so that the worker
  // stops retrying a row the SaaS deleted.
  if (rows.length === 0) {
    const found = token === null ? [] : await sql`select 1 from public.wa_outbound where id = ${id}::uuid`;
    if (found.length > 0) throw leaseLost();
    return json(200, { ok: true, found: false });
  }
  return json(200, { ok: true, found: true, status: "sent" });
}

// POST /mark-failed {messageId, error, error_code?, lease_token?}. Never overrides 'sent'.
// With lease_token: only the token the message was claimed under (else 409).
async function markFailed(req: Request): Promise<Response> {
  const body = await readJson(req, ["error"]); // a diagnostic: repaired rather than refused
  const id = messageId(body.messageId);
  let error = optionalString(body, "error", Number.MAX_SAFE_INTEGER) ?? "failed";
  if (error.length > MAX_ERROR) error = error.slice(0, MAX_ERROR).toWellFormed(); // never half a pair
  const errorCode = optionalString(body, "error_code", 64);
  if (errorCode !== null && !ERROR_CODE_RE.test(errorCode)) throw bad("error_code must be a lower_snake_case code");
  const token = leaseToken(body.lease_token);
  const sql = db();
  const rows = await sql`
    update public.wa_outbound set status = 'failed', error = ${error}, error_code = ${errorCode}::text
    where id = ${id}::uuid and status <> 'sent' ${token === null ? sql`` : sql`and claim_token = ${token}::bigint`}
    returning status`;
  if (rows.length > 0) return json(200, { ok: true, found: true, status: "failed" });
  const existing = await sql`select status from public.wa_outbound where id = ${id}::uuid`;
  // Never 404 here: the worker reads a 404 from /mark-failed as "endpoint
  // not implemented" and stops calling it.
  if (existing.length === 0) return json(200, { ok: true, found: false });
  if (token !== null && existing[0].status !== "sent") throw leaseLost();
  return json(200, { ok: true, found: true, status: existing[0].status, ignored: true });
}

// ------------------------------------------------- message types (inbound)

function optionalObject(body: Json, field: string): Json | null {
  const value = body[field];
  if (value === undefined || value === null) return null;
  if (typeof value !== "object" || Array.isArray(value)) throw bad(`${field} must be an object`);
  return value as Json;
}

function optionalCount(body: Json, field: string, where: string): number | null {
  const value = body[field];
  if (value === undefined || value === null) return null;
  if (typeof value !== "number" || !Number.isSafeInteger(value) || value < 0) {
    throw bad(`${where} must be a non-negative integer`);
  }
  return value;
}

function optionalCoordinate(body: Json, field: string, limit: number): number | null {
  const value = body[field];
  if (value === undefined || value === null) return null;
  if (typeof value !== "number" || !Number.isFinite(value) || Math.abs(value) > limit) {
    throw bad(`${field} must be a number between -${limit} and ${limit}`);
  }
  return value;
}

function prefixed(obj: Json | null, field: string, max: number, parent: string): string | null {
  if (obj === null) return null;
  try {
    return optionalString(obj, field, max);
  } catch (e) {
    if (e instanceof HttpError) throw bad(`${parent}.${e.message}`);
    throw e;
  }
}

// The issue #11 fields of an /inbound body (docs/proxy-contract.md, "Message types").
function inboundContent(body: Json) {
  const type = body.type ?? "text";
  if (typeof type !== "string" || !IN_TYPES.includes(type)) throw bad(`type must be one of ${IN_TYPES.join(", ")}`);
  const media = optionalObject(body, "media");
  const url = prefixed(media, "url", 4096, "media");
  const mediaError = optionalString(body, "media_error", 64);
  if (mediaError !== null && !MEDIA_ERRORS.includes(mediaError)) {
    throw bad(`media_error must be one of ${MEDIA_ERRORS.join(", ")}`);
  }
  const reaction = optionalObject(body, "reaction");
  const contact = optionalObject(body, "contact");
  const viewOnce = optionalBoolean(body, "view_once");
  return {
    type,
    // an http(s) URL, or the Storage path /upload-media answered
    mediaUrl: url !== null && /^https?:\/\//i.test(url) ? url : null,
    mediaPath: url !== null && !/^https?:\/\//i.test(url) ? url : null,
    mimetype: prefixed(media, "mimetype", MAX_SHORT, "media"),
    filename: prefixed(media, "filename", MAX_SHORT, "media"),
    size: media === null ? null : optionalCount(media, "size", "media.size"),
    sha256: prefixed(media, "sha256", 128, "media"),
    seconds: media === null ? null : optionalCount(media, "seconds", "media.seconds"),
    mediaError,
    quotedId: optionalString(body, "quoted_id", MAX_SHORT),
    reaction: prefixed(reaction, "emoji", 64, "reaction"),
    targetId: prefixed(reaction, "target_id", MAX_SHORT, "reaction") ?? optionalString(body, "target_id", MAX_SHORT),
    latitude: optionalCoordinate(body, "latitude", 90),
    longitude: optionalCoordinate(body, "longitude", 180),
    locationName: optionalString(body, "name", MAX_TEXT),
    locationAddress: optionalString(body, "address", MAX_TEXT),
    contactName: prefixed(contact, "name", MAX_TEXT, "contact"),
    contactPhone: prefixed(contact, "phone", 64, "contact"),
    vcard: prefixed(contact, "vcard", MAX_TEXT, "contact"),
    viewOnce,
    // type call: a video call or not, declined by the worker or not (null for other types)
    callVideo: type === "call" ? optionalBoolean(body, "video") : null,
    callRejected: type === "call" ? optionalBoolean(body, "rejected") : null,
  };
}

// POST /upload-media?instanceId=&wa_message_id= (raw bytes; Content-Type, X-Filename, X-Sha256)
// → the object <instanceId>/<wa_message_id> in the media bucket, upserted (a retried
// upload overwrites the same object: idempotent). Answers {"path": ...}.
async function uploadMedia(req: Request, url: URL): Promise<Response> {
  const id = instanceId(url.searchParams.get("instanceId"));
  const waId = url.searchParams.get("wa_message_id") ?? "";
  if (!WA_ID_RE.test(waId)) throw bad("wa_message_id is missing or invalid");
  const declared = Number(req.headers.get("content-length") ?? "NaN");
  if (Number.isFinite(declared) && declared > MEDIA_MAX_BYTES) {
    throw new HttpError(413, `media larger than ${MEDIA_MAX_BYTES} bytes`);
  }
  if (req.body === null || declared === 0) throw bad("the media body is empty");
  const found = await db()`select 1 from public.wa_instances where id = ${id}`;
  if (found.length === 0) throw new HttpError(404, "unknown instance");
  const path = `${id}/${waId}`;
  const contentType = req.headers.get("content-type") || "application/octet-stream";
  const limit = capped(MEDIA_MAX_BYTES);
  try {
    await storageCall(`object/${encodeURIComponent(MEDIA_BUCKET)}/${objectPath(path)}`, {
      method: "POST",
      headers: { "content-type": contentType, "x-upsert": "true", "cache-control": "max-age=3600" },
      body: req.body.pipeThrough(limit.stream),
      // a streamed request body (Deno / fetch standard)
      ...({ duplex: "half" } as Record<string, string>),
    });
  } catch (e) {
    if (limit.over()) throw new HttpError(413, `media larger than ${MEDIA_MAX_BYTES} bytes`);
    if (e instanceof StorageError) {
      // the worker retries a 5xx like /inbound; Storage's own size limit (413) is permanent
      if (e.status === 413) throw new HttpError(413, "media too large for Storage");
      console.error(`worker-proxy upload-media: ${e.message}`);
      throw new HttpError(503, "storage unavailable");
    }
    throw e;
  }
  return json(200, { path });
}

// POST /inbound {...}: stored once per (instanceId, wa_message_id); replays → 200.
async function inbound(req: Request): Promise<Response> {
  const body = await readJson(req);
  const id = instanceId(body.instanceId);
  const waId = requiredString(body, "wa_message_id", MAX_SHORT);
  const from = requiredString(body, "from", MAX_SHORT);
  const text = requiredString(body, "body", MAX_TEXT, true);
  const to = optionalString(body, "to", MAX_SHORT);
  const chatId = optionalString(body, "chat_id", MAX_SHORT);
  const senderId = optionalString(body, "sender_id", MAX_SHORT);
  const pushName = optionalString(body, "push_name", MAX_SHORT);
  const fromMe = optionalBoolean(body, "from_me");
  const isGroup = optionalBoolean(body, "is_group");
  const ts = optionalTimestamp(body, "timestamp");
  const c = inboundContent(body);
  const sql = db();
  let rows;
  try {
    rows = await sql`
      insert into public.wa_inbound
        (instance_id, wa_message_id, "from", "to", chat_id, sender_id,
         from_me, is_group, push_name, body, "timestamp", raw,
         type, media_url, media_path, mimetype, filename, media_size, media_sha256, media_seconds,
         media_error, quoted_id, reaction, target_id, latitude, longitude, location_name,
         location_address, contact_name, contact_phone, vcard, view_once, call_video, call_rejected)
      values
        (${id}, ${waId}, ${from}, ${to}::text, ${chatId}::text, ${senderId}::text,
         ${fromMe}::boolean, ${isGroup}::boolean, ${pushName}::text, ${text},
         case when ${ts}::float8 is null then null else to_timestamp(${ts}::float8) end,
         ${sql.json(body as postgres.JSONValue)},
         ${c.type}, ${c.mediaUrl}::text, ${c.mediaPath}::text, ${c.mimetype}::text, ${c.filename}::text,
         ${c.size}::bigint, ${c.sha256}::text, ${c.seconds}::integer, ${c.mediaError}::text,
         ${c.quotedId}::text, ${c.reaction}::text, ${c.targetId}::text, ${c.latitude}::float8,
         ${c.longitude}::float8, ${c.locationName}::text, ${c.locationAddress}::text,
         ${c.contactName}::text, ${c.contactPhone}::text, ${c.vcard}::text, ${c.viewOnce}::boolean,
         ${c.callVideo}::boolean, ${c.callRejected}::boolean)
      on conflict (instance_id, wa_message_id) do nothing
      returning id`;
  } catch (e) {
    // 23503: foreign_key_violation → the instance does not exist
    if ((e as { code?: string }).code === "23503") throw new HttpError(404, "unknown instance");
    throw e;
  }
  return json(200, { ok: true, duplicate: rows.length === 0 });
}

// POST /message-status {"statuses": [{instanceId, messageId, wa_message_id, status, timestamp, recipient}]}:
// each sent message keeps its latest receipt, never moving backwards; unknown messages are ignored.
async function messageStatus(req: Request): Promise<Response> {
  const body = await readJson(req);
  const statuses = body.statuses;
  if (!Array.isArray(statuses) || statuses.length > MAX_STATUSES) {
    throw bad(`statuses must be a list of at most ${MAX_STATUSES}`);
  }
  const checked = statuses.map((st) => {
    if (typeof st !== "object" || st === null || Array.isArray(st)) throw bad("each status must be an object");
    const s = st as Json;
    const status = s.status;
    if (typeof status !== "string" || !RECEIPT_STATUSES.includes(status)) {
      throw bad(`status must be one of ${RECEIPT_STATUSES.join(", ")}`);
    }
    const messageId = optionalString(s, "messageId", MAX_SHORT);
    return {
      id: instanceId(s.instanceId),
      messageId: messageId !== null && UUID_RE.test(messageId) ? messageId : null,
      waId: requiredString(s, "wa_message_id", MAX_SHORT),
      status,
      rank: RECEIPT_STATUSES.indexOf(status) + 1,
      ts: optionalTimestamp(s, "timestamp"),
      by: optionalString(s, "recipient", MAX_SHORT),
    };
  });
  const sql = db();
  let changed = 0;
  for (const c of checked) {
    const rows = await sql`
      update public.wa_outbound set
        receipt_status = ${c.status},
        receipt_at = case when ${c.ts}::float8 is null then now() else to_timestamp(${c.ts}::float8) end,
        receipt_by = ${c.by}::text
      where instance_id = ${c.id}
        and (id = ${c.messageId}::uuid or wa_message_id = ${c.waId})
        and coalesce(array_position(array['delivered', 'read', 'played'], receipt_status), 0) < ${c.rank}
      returning id`;
    changed += rows.length;
  }
  return json(200, { ok: true, changed });
}

// ------------------------------------------------------------------ leases

type LeaseItem = { instanceId: string; token: number; unsent?: string[] };

// An item's optional `unsent`: the ids of claims its worker never began (handed back).
function unsentIds(value: unknown, where: string): string[] | undefined {
  if (value === undefined || value === null) return undefined;
  if (
    !Array.isArray(value) || value.length > MAX_UNSENT_PER_ITEM ||
    !value.every((m) => typeof m === "string" && m.length > 0 && m.length <= MAX_MESSAGE_ID)
  ) {
    throw bad(`${where}.unsent must be a list of at most ${MAX_UNSENT_PER_ITEM} message ids`);
  }
  return value as string[];
}

function leaseItems(body: Json, field: string): LeaseItem[] {
  const value = body[field];
  if (value === undefined || value === null) return [];
  if (!Array.isArray(value) || value.length > MAX_LEASE_ITEMS) {
    throw bad(`${field} must be a list of at most ${MAX_LEASE_ITEMS} {instanceId, token}`);
  }
  return value.map((item, i) => {
    if (typeof item !== "object" || item === null || Array.isArray(item)) throw bad(`${field}[${i}] must be an object`);
    const it = item as Json;
    const token = it.token;
    if (typeof token !== "number" || !Number.isSafeInteger(token) || token < 1) {
      throw bad(`${field}[${i}].token must be a positive integer`);
    }
    const id = instanceId(it.instanceId, `${field}[${i}].instanceId`);
    const unsent = unsentIds(it.unsent, `${field}[${i}]`);
    return unsent && unsent.length > 0 ? { instanceId: id, token, unsent } : { instanceId: id, token };
  });
}

// POST /leases {worker_id, capacity, held: [{instanceId, token}], release: [...]} →
// {"ttl_s", "leases": [...]}: the complete set the worker holds after this call, in one
// transaction (public.wa_lease_call): releases, renewals, revocations (fair share) and at
// most LEASE_GRANTS_PER_CALL grants, highest priority first. A new grant carries the
// discovery fields (priority, settings, proxy_url, pair_phone). Items' `unsent` claims go back
// to 'queued' first, in the same transaction (public.wa_lease_hand_back): the answer then says
// which (`requeued`) and how many ids were ignored (`unsent_ignored`).
async function leases(req: Request): Promise<Response> {
  const body = await readJson(req);
  const worker = body.worker_id;
  if (typeof worker !== "string" || !WORKER_ID_RE.test(worker)) {
    throw bad("worker_id must match ^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$");
  }
  const capacity = body.capacity;
  if (typeof capacity !== "number" || !Number.isSafeInteger(capacity) || capacity < 0 || capacity > MAX_CAPACITY) {
    throw bad(`capacity must be an integer from 0 to ${MAX_CAPACITY}`);
  }
  const held = leaseItems(body, "held");
  const release = leaseItems(body, "release");
  const apiUrl = publicUrl(body.api_url);
  const sql = db();
  const handBack = [...held, ...release].filter((item) => item.unsent !== undefined);
  const listed = handBack.reduce((n, item) => n + (item.unsent?.length ?? 0), 0);
  const leaseCall = (q: Sql | postgres.TransactionSql) =>
    q`select * from public.wa_lease_call(${worker}, ${capacity}::integer,
        ${sql.json(held as postgres.JSONValue)}, ${sql.json(release as postgres.JSONValue)},
        ${LEASE_TTL_S}::integer, ${LEASE_GRANTS_PER_CALL}::integer)`;
  // a renewal is one statement; a hand-back goes first, in the same transaction
  const { requeued, rows } = handBack.length === 0
    ? { requeued: [] as postgres.Row[], rows: await leaseCall(sql) }
    : await sql.begin(async (tx) => {
      const requeued = await tx`
        select message_id from public.wa_lease_hand_back(${worker}, ${sql.json(handBack as postgres.JSONValue)})`;
      return { requeued, rows: await leaseCall(tx) };
    });
  // where API clients reach this worker (GET /lease-holder); absent: it gave none. Written only
  // when it changed (a renewal is not a write); a worker that left has no row to write to.
  try {
    await sql`
      update public.wa_workers set api_url = ${apiUrl}
      where id = ${worker} and api_url is distinct from ${apiUrl}`;
  } catch (e) {
    // wa_workers.api_url missing (the leases migration applied before it had the column): the
    // leases still work (a renewal must never fail for a hint); GET /lease-holder says what is missing
    if ((e as { code?: string }).code !== "42703") throw e;
    console.warn("worker-proxy POST /leases: wa_workers.api_url is missing: apply supabase/migrations/ again");
  }
  return json(200, {
    ttl_s: LEASE_TTL_S,
    leases: rows.map((r) =>
      r.granted
        ? {
          instanceId: r.instance_id, token: Number(r.token), priority: r.priority,
          settings: r.settings ?? null, proxy_url: r.proxy_url ?? null, pair_phone: r.pair_phone ?? null,
        }
        : { instanceId: r.instance_id, token: Number(r.token) }
    ),
    ...(handBack.length === 0 ? {} : {
      requeued: requeued.map((r) => r.message_id),
      unsent_ignored: listed - requeued.length,
    }),
  });
}

// api_url of POST /leases: an http(s) base URL without credentials, query or fragment (the
// worker's API_PUBLIC_URL), without its trailing slash; null when absent.
function publicUrl(value: unknown): string | null {
  if (value === undefined || value === null) return null;
  const problem = "api_url must be an http(s) URL without credentials, query or fragment (at most 512 characters)";
  if (typeof value !== "string" || value.length > 512 || /[\s?#@]/.test(value)) throw bad(problem);
  let parsed: URL;
  try {
    parsed = new URL(value);
  } catch {
    throw bad(problem);
  }
  if ((parsed.protocol !== "http:" && parsed.protocol !== "https:") || parsed.hostname === "") throw bad(problem);
  return value.replace(/\/+$/, "");
}

// GET /lease-holder?instanceId=<id> → {"instanceId", "worker_id", "api_url"}: the holder of a
// live lease (granted, not released, not revoked, not expired) and the api_url its last
// POST /leases gave (null: none); 404 {"error": "no holder"} otherwise. A worker asked for an
// instance it does not hold redirects its API client there (docs/api.md, "Fleets").
async function leaseHolder(_req: Request, url: URL): Promise<Response> {
  const id = instanceId(url.searchParams.get("instanceId"));
  const rows = await db()`
    select i.id, i.lease_worker, w.api_url
    from public.wa_instances as i left join public.wa_workers as w on w.id = i.lease_worker
    where i.id = ${id} and i.lease_worker is not null and not i.lease_released and not i.lease_revoked
      and i.lease_expires_at > now()`;
  if (rows.length === 0) return json(404, { error: "no holder" });
  return json(200, { instanceId: rows[0].id, worker_id: rows[0].lease_worker, api_url: rows[0].api_url ?? null });
}

// ------------------------------------------------------------------ events
// GET /events?wait=<s>&cursor=<c> (X-Worker-Id) → {"events": [...], "cursor"}. One LISTEN
// connection per isolate wakes the waiting polls; what a poll answers is read from the tables,
// never from the notifications: queued rows made 'queued' by a transaction the cursor's
// snapshot did not see (wa_outbound.queued_xact) of the worker's instances, and "leases" when
// wa_fleet_state.lease_version moved. So a notification lost (between polls, or while the
// LISTEN connection reconnects) is found by the next poll. Cursor: "<lease_version>.<pg_snapshot>".

type Waiter = (payload: string) => void;
const waiters = new Set<Waiter>();
let listening: Promise<void> | null = null;
let listenFailedAt = -Infinity;
const LISTEN_RETRY_MS = 30_000;
// A waiting poll reads the tables again at least this often: without notifications (LISTEN
// through a transaction-mode pooler, a dropped connection) /events still works, slower.
const EVENTS_RECHECK_MS = 5_000;

// Whether notifications can arrive; never throws (a poll then relies on its rechecks).
async function listenForEvents(): Promise<boolean> {
  if (listening === null && Date.now() - listenFailedAt < LISTEN_RETRY_MS) return false;
  try {
    await startListening();
    return true;
  } catch (e) {
    listenFailedAt = Date.now();
    console.warn(`worker-proxy events: LISTEN failed (${(e as Error)?.message ?? e}); polling the tables instead`);
    return false;
  }
}

function startListening(): Promise<void> {
  if (listening === null) {
    const url = Deno.env.get("WORKER_PROXY_LISTEN_DB_URL") || Deno.env.get("SUPABASE_DB_URL");
    if (!url) throw new HttpError(500, "SUPABASE_DB_URL is not set");
    // postgres.js keeps this connection and LISTENs again after a reconnect
    const listener = postgres(url, { max: 1, prepare: false, connect_timeout: 5, onnotice: () => {} });
    listening = listener.listen(EVENTS_CHANNEL, (payload) => {
      for (const waiter of [...waiters]) waiter(payload);
    }).then(() => {}, (e) => {
      listening = null;
      listener.end({ timeout: 1 }).catch(() => {});
      throw e;
    });
  }
  return listening;
}

const CURSOR_RE = /^([0-9]{1,19})\.([0-9]{1,20}:[0-9]{1,20}:[0-9,]{0,65536})$/;

type EventsCursor = { version: string; snapshot: string };
type EventsState = { cursor: EventsCursor; held: Set<string>; events: Json[] };

// The state now, and what changed since `since` (nothing without one).
async function eventsSince(sql: Sql, worker: string | null, since: EventsCursor | null): Promise<EventsState> {
  const [row] = await sql`
    select (select lease_version from public.wa_fleet_state where id = 1)::text as version,
           pg_current_snapshot()::text as snapshot,
           coalesce((select array_agg(i.id) from public.wa_instances i
                     where i.lease_worker = ${worker}::text and not i.lease_released and not i.lease_revoked),
                    '{}') as held,
           case when ${since?.snapshot ?? null}::text is null then '{}'::text[] else coalesce((
             select array_agg(distinct o.instance_id order by o.instance_id) from public.wa_outbound o
             where o.status = 'queued' and o.queued_xact is not null
               and not pg_visible_in_snapshot(o.queued_xact, ${since?.snapshot ?? null}::text::pg_snapshot)
               and (${worker}::text is null or exists (
                 select 1 from public.wa_instances i
                 where i.id = o.instance_id and i.lease_worker = ${worker}::text
                   and not i.lease_released and not i.lease_revoked))
           ), '{}') end as queued`;
  const events: Json[] = (row.queued as string[]).map((id) => ({ type: "queued", instanceId: id }));
  const version = String(row.version ?? "0");
  if (since !== null && BigInt(version) > BigInt(since.version)) events.push({ type: "leases" });
  return { cursor: { version, snapshot: row.snapshot }, held: new Set(row.held as string[]), events };
}

function eventsAnswer(state: EventsState): Response {
  return json(200, { events: state.events, cursor: `${state.cursor.version}.${state.cursor.snapshot}` });
}

// long: the wait loop reads best in one piece
async function events(req: Request, url: URL): Promise<Response> {
  const worker = workerIdHeader(req);
  const rawWait = url.searchParams.get("wait");
  const wantWait = rawWait === null || rawWait === "" ? EVENTS_MAX_WAIT_S : Number(rawWait);
  if (!Number.isFinite(wantWait) || wantWait < 0) throw bad("wait must be a number of seconds");
  const waitMs = Math.min(wantWait, EVENTS_MAX_WAIT_S) * 1000;
  const rawCursor = url.searchParams.get("cursor");
  let since: EventsCursor | null = null;
  if (rawCursor !== null && rawCursor !== "") {
    const m = CURSOR_RE.exec(rawCursor);
    if (m === null) throw bad("cursor must be one this function gave");
    since = { version: m[1], snapshot: m[2] };
  }
  const deadline = Date.now() + waitMs;
  const sql = db();
  let held = new Set<string>();
  let woken = false;
  let wake = () => {};
  const waiter: Waiter = (payload) => {
    if (payload === "l" || (payload.startsWith("q:") && (worker === null || held.has(payload.slice(2))))) {
      woken = true;
      wake();
    }
  };
  waiters.add(waiter);
  try {
    await listenForEvents(); // listening before the first read: nothing falls in between
    const start = await eventsSince(sql, worker, since);
    if (start.events.length > 0 || waitMs === 0) return eventsAnswer(start);
    held = start.held;
    for (;;) {
      const left = deadline - Date.now();
      if (!woken && left > 0 && !req.signal.aborted) {
        await new Promise<void>((resolve) => {
          const timer = setTimeout(resolve, Math.min(left, EVENTS_RECHECK_MS));
          const done = () => {
            clearTimeout(timer);
            req.signal.removeEventListener("abort", done);
            resolve();
          };
          wake = done;
          req.signal.addEventListener("abort", done);
        });
        wake = () => {};
      }
      woken = false;
      // everything since the start of this poll: the answer's cursor covers it all
      const now = await eventsSince(sql, worker, start.cursor);
      held = now.held;
      if (now.events.length > 0 || Date.now() >= deadline || req.signal.aborted) return eventsAnswer(now);
    }
  } finally {
    waiters.delete(waiter);
  }
}

const ROUTES: Record<string, Record<string, Handler>> = {
  "disconnected-instances": { GET: disconnectedInstances },
  "update-status": { POST: updateStatus },
  "queued-messages": { GET: queuedMessages },
  "mark-sent": { POST: markSent },
  "mark-failed": { POST: markFailed },
  "inbound": { POST: inbound },
  "upload-media": { POST: uploadMedia },
  "message-status": { POST: messageStatus },
  "instance-settings": { GET: instanceSettings },
  "leases": { POST: leases },
  "lease-holder": { GET: leaseHolder },
  "events": { GET: events },
};

// ---------------------------------------------------------------- server

export async function handler(req: Request): Promise<Response> {
  const url = new URL(req.url);
  try {
    if (!(await authorized(req))) {
      return json(401, { error: "unauthorized" }, { "www-authenticate": 'Bearer realm="worker-proxy"' });
    }
    const segments = url.pathname.split("/").filter((s) => s !== "");
    const route = ROUTES[segments[segments.length - 1] ?? ""];
    if (!route) return json(404, { error: "unknown endpoint" });
    const handle = route[req.method];
    if (!handle) {
      return json(405, { error: "method not allowed" }, { allow: Object.keys(route).join(", ") });
    }
    return await handle(req, url);
  } catch (e) {
    if (e instanceof HttpError) return json(e.status, { error: e.message });
    const code = (e as { code?: string }).code ?? "";
    // SQLSTATE class 22 (data exception) and 23 (integrity constraint): the
    // caller's data cannot be stored. A 400 makes the worker set the record
    // aside instead of retrying it forever (a 500 would block its chat).
    if (/^2[23][0-9A-Z]{3}$/.test(code)) {
      console.warn(`worker-proxy ${req.method} ${url.pathname}: rejected data: ${code} ${(e as Error).message}`);
      return json(400, { error: `the database refused the data (${code}): ${(e as Error).message}` });
    }
    // 42P01 undefined_table, 42703 undefined_column, 42883 undefined_function: a migration is
    // missing. Said plainly, and a 500, never a 501: a fleet worker must not take a missing
    // leases migration for "no leases here" and run every instance beside the others.
    if (/^42(P01|703|883)$/.test(code)) {
      console.error(`worker-proxy ${req.method} ${url.pathname}: ${code} ${(e as Error).message}`);
      return json(500, { error: "the database schema is older than this function: apply supabase/migrations/" });
    }
    // Connection problems and serialization failures are transient (503 →
    // the worker backs off and retries); anything else is a 500.
    const transient = /^(08|40|53|57P)/.test(code) ||
      /ECONNREFUSED|ECONNRESET|ETIMEDOUT|CONNECT_TIMEOUT|CONNECTION_/.test(code);
    console.error(`worker-proxy ${req.method} ${url.pathname}: ${code} ${(e as Error)?.message ?? e}`);
    return json(transient ? 503 : 500, { error: transient ? "database unavailable" : "internal error" });
  }
}

const localPort = Deno.env.get("WORKER_PROXY_PORT");
if (localPort !== undefined && localPort !== "") {
  Deno.serve({
    port: Number(localPort),
    hostname: Deno.env.get("WORKER_PROXY_HOSTNAME") || "127.0.0.1",
    onListen: ({ hostname, port }) => console.log(`worker-proxy listening on http://${hostname}:${port}/`),
  }, handler);
} else {
  Deno.serve(handler);
}
