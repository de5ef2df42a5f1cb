// worker-proxy: the edge proxy wa-worker talks to (docs/proxy-contract.md).
//
// A Supabase Edge Function (Deno) speaking SQL to the project's database
// through postgres.js and SUPABASE_DB_URL (provided by Supabase). Schema:
// supabase/migrations/20261123000000_wa_worker.sql.
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
//   WORKER_PROXY_PORT      local runs only: listen on this port (0 = any)
//   WORKER_PROXY_HOSTNAME  local runs only: listen address (127.0.0.1)

import postgres from "postgres";

const INSTANCE_ID_RE = /^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$/;
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

// ------------------------------------------------------------- endpoints

type Handler = (req: Request, url: URL) => Promise<Response>;

// GET /disconnected-instances → {"instances":[{id,priority}]}, highest priority first.
async function disconnectedInstances(): Promise<Response> {
  const rows = await db()`
    select id, priority from public.wa_instances
    where status in ('DISCONNECTED', 'CONNECTING')
    order by priority desc, id`;
  return json(200, { instances: rows.map((r) => ({ id: r.id, priority: r.priority })) });
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

  const rows = await db()`
    update public.wa_instances set
      status = ${status},
      qr_code = case
        when ${hasQr}::boolean then ${qr}::text
        when ${status}::text = 'CONNECTING' then qr_code
        else null end,
      phone_number = coalesce(${phone}::text, phone_number),
      last_reason = case when ${hasReason}::boolean then ${reason}::text else last_reason end
    where id = ${id}
    returning id, status`;
  if (rows.length === 0) throw new HttpError(404, "unknown instance");
  return json(200, { ok: true, id: rows[0].id, status: rows[0].status });
}

// GET /queued-messages?instanceId=<id> → claims the instance's queued
// messages (and 'sending' claims older than the lease), oldest first.
// Without instanceId (batch mode): the same over every CONNECTED instance.
async function queuedMessages(_req: Request, url: URL): Promise<Response> {
  const limit = limitParam(url);
  const raw = url.searchParams.get("instanceId");
  const sql = db();
  let rows;
  if (raw === null) {
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
        returning o.id, o.instance_id, o."to", o.body, o.created_at, o.seq
      )
      select id, instance_id, "to", body from claimed order by created_at, seq`;
  } else {
    const id = instanceId(raw);
    rows = await sql.begin(async (tx) => {
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
          returning o.id, o.instance_id, o."to", o.body, o.created_at, o.seq
        )
        select id, instance_id, "to", body from claimed order by created_at, seq`;
    });
  }
  return json(200, {
    messages: rows.map((r) => ({ id: r.id, instanceId: r.instance_id, to: r.to, body: r.body })),
  });
}

// POST /mark-sent {messageId, wa_message_id}. Idempotent; 'sent' is terminal
// (it also overrides an earlier 'failed': the worker knows best).
async function markSent(req: Request): Promise<Response> {
  const body = await readJson(req);
  const id = messageId(body.messageId);
  const waId = optionalString(body, "wa_message_id", MAX_SHORT);
  const rows = await db()`
    update public.wa_outbound set
      status = 'sent',
      wa_message_id = coalesce(${waId}::text, wa_message_id),
      sent_at = coalesce(sent_at, now()),
      error = null
    where id = ${id}::uuid
    returning status`;
  // An unknown id is answered 200 (nothing left to do) so that the worker
  // stops retrying a row the SaaS deleted.
  if (rows.length === 0) return json(200, { ok: true, found: false });
  return json(200, { ok: true, found: true, status: "sent" });
}

// POST /mark-failed {messageId, error}. Never overrides 'sent'.
async function markFailed(req: Request): Promise<Response> {
  const body = await readJson(req, ["error"]); // a diagnostic: repaired rather than refused
  const id = messageId(body.messageId);
  let error = optionalString(body, "error", Number.MAX_SAFE_INTEGER) ?? "failed";
  if (error.length > MAX_ERROR) error = error.slice(0, MAX_ERROR).toWellFormed(); // never half a pair
  const sql = db();
  const rows = await sql`
    update public.wa_outbound set status = 'failed', error = ${error}
    where id = ${id}::uuid and status <> 'sent'
    returning status`;
  if (rows.length > 0) return json(200, { ok: true, found: true, status: "failed" });
  const existing = await sql`select status from public.wa_outbound where id = ${id}::uuid`;
  // Never 404 here: the worker reads a 404 from /mark-failed as "endpoint
  // not implemented" and stops calling it.
  if (existing.length === 0) return json(200, { ok: true, found: false });
  return json(200, { ok: true, found: true, status: existing[0].status, ignored: true });
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
  const sql = db();
  let rows;
  try {
    rows = await sql`
      insert into public.wa_inbound
        (instance_id, wa_message_id, "from", "to", chat_id, sender_id,
         from_me, is_group, push_name, body, "timestamp", raw)
      values
        (${id}, ${waId}, ${from}, ${to}::text, ${chatId}::text, ${senderId}::text,
         ${fromMe}::boolean, ${isGroup}::boolean, ${pushName}::text, ${text},
         case when ${ts}::float8 is null then null else to_timestamp(${ts}::float8) end,
         ${sql.json(body as postgres.JSONValue)})
      on conflict (instance_id, wa_message_id) do nothing
      returning id`;
  } catch (e) {
    // 23503: foreign_key_violation → the instance does not exist
    if ((e as { code?: string }).code === "23503") throw new HttpError(404, "unknown instance");
    throw e;
  }
  return json(200, { ok: true, duplicate: rows.length === 0 });
}

const ROUTES: Record<string, Record<string, Handler>> = {
  "disconnected-instances": { GET: disconnectedInstances },
  "update-status": { POST: updateStatus },
  "queued-messages": { GET: queuedMessages },
  "mark-sent": { POST: markSent },
  "mark-failed": { POST: markFailed },
  "inbound": { POST: inbound },
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
