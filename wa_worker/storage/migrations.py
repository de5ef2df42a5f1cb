"""The journal's schema, versioned with ``PRAGMA user_version``.

Each :class:`Migration` moves the schema from ``version - 1`` to ``version``
in one transaction (its SQL and the new ``user_version`` commit together, or
nothing does). Append new steps; never edit a released one.

Version 1 is the schema every worker shipped before versioning existed (with
``user_version`` 0): such a file is recognised by its tables and adopted as
version 1 without touching its rows. A file newer than the code is refused.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from .db import StoreOpenError


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


V1_INITIAL = """
CREATE TABLE IF NOT EXISTS inbound (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    instance_id     TEXT NOT NULL,
    chat_id         TEXT NOT NULL,
    wa_message_id   TEXT NOT NULL,
    payload         TEXT NOT NULL,
    created_at      REAL NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error      TEXT,
    UNIQUE (instance_id, wa_message_id)
);
CREATE INDEX IF NOT EXISTS inbound_chat ON inbound (instance_id, chat_id, seq);
CREATE INDEX IF NOT EXISTS inbound_due ON inbound (next_attempt_at);

CREATE TABLE IF NOT EXISTS outbound (
    message_id      TEXT PRIMARY KEY,
    instance_id     TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('sending','sent','marked','failing','failed')),
    to_jid          TEXT,
    wa_message_id   TEXT,
    error           TEXT,
    created_at      REAL NOT NULL,
    updated_at      REAL NOT NULL,
    ack_attempts    INTEGER NOT NULL DEFAULT 0,
    next_ack_at     REAL
);
CREATE INDEX IF NOT EXISTS outbound_ack ON outbound (next_ack_at) WHERE state IN ('sent','failing');
CREATE INDEX IF NOT EXISTS outbound_updated ON outbound (updated_at);

CREATE TABLE IF NOT EXISTS dead_letter (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    kind            TEXT NOT NULL,
    instance_id     TEXT NOT NULL,
    ref             TEXT NOT NULL,
    payload         TEXT,
    reason          TEXT NOT NULL,
    status_code     INTEGER,
    response        TEXT,
    created_at      REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letter_created ON dead_letter (created_at);

CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

# server errors counted apart from timeouts and outages: a message the proxy
# keeps failing on is dead-lettered after INBOUND_MAX_ATTEMPTS of them
V2_INBOUND_SERVER_ERRORS = """
ALTER TABLE inbound ADD COLUMN server_errors INTEGER NOT NULL DEFAULT 0;
"""

# issue #11: /mark-failed carries a machine-readable error_code (rows failed before it get
# the code their text means); and the index of messages sent or received, so a reply or
# a reaction can name its target (wa id -> chat, author), pruned with the journal
V3_ERROR_CODES_AND_MESSAGE_INDEX = """
ALTER TABLE outbound ADD COLUMN error_code TEXT;
UPDATE outbound SET error_code = CASE
    WHEN error = 'delivery_unknown' THEN 'delivery_unknown'
    WHEN error LIKE 'invalid recipient%' THEN 'invalid_recipient'
    WHEN error LIKE 'send failed%' THEN 'send_failed'
    ELSE 'invalid_message' END
  WHERE state IN ('failing', 'failed');
CREATE TABLE message_index (
    instance_id     TEXT NOT NULL,
    wa_message_id   TEXT NOT NULL,
    chat_jid        TEXT NOT NULL,
    sender_jid      TEXT,
    from_me         INTEGER NOT NULL,
    created_at      REAL NOT NULL,
    PRIMARY KEY (instance_id, wa_message_id)
) WITHOUT ROWID;
CREATE INDEX message_index_created ON message_index (created_at);
"""

# issue #12: WhatsApp's answers about phone numbers (jid NULL: not on WhatsApp)
V4_NUMBER_CACHE = """
CREATE TABLE number_cache (
    phone       TEXT PRIMARY KEY,
    jid         TEXT,
    checked_at  REAL NOT NULL
) WITHOUT ROWID;
-- an instance's sends of the last day (its per-day cap survives a restart)
CREATE INDEX outbound_instance_created ON outbound (instance_id, created_at);
"""

# issue #12: the receipts outbox, one row per sent message (the latest status only: `rank`
# 1 delivered, 2 read, 3 played; posted up to `posted_rank`, so a late lower receipt is never
# posted after a higher one), and the outbound journal indexed by WhatsApp id (messageId lookup)
V5_RECEIPTS_OUTBOX = """
CREATE TABLE receipts (
    instance_id     TEXT NOT NULL,
    wa_message_id   TEXT NOT NULL,
    chat_jid        TEXT NOT NULL,
    recipient       TEXT NOT NULL,
    status          TEXT NOT NULL,
    rank            INTEGER NOT NULL,
    posted_rank     INTEGER NOT NULL DEFAULT 0,
    timestamp       REAL NOT NULL,
    updated_at      REAL NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error      TEXT,
    PRIMARY KEY (instance_id, wa_message_id)
) WITHOUT ROWID;
CREATE INDEX receipts_due ON receipts (next_attempt_at) WHERE rank > posted_rank;
CREATE INDEX receipts_updated ON receipts (updated_at);
CREATE INDEX outbound_wa_id ON outbound (instance_id, wa_message_id) WHERE wa_message_id IS NOT NULL;
"""

# issue #15: the live event log behind GET /api/events (status, inbound, send, receipt), one row
# per event under its stream sequence number; AUTOINCREMENT keeps the highest number ever used
# (sqlite_sequence) so a restart after pruning never reuses one. Pruned to a window (events.py)
# from the oldest end, found in seq order: no index on `at` (a quarter of every insert's cost)
V6_EVENT_LOG = """
CREATE TABLE events (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    at              REAL NOT NULL,
    instance_id     TEXT NOT NULL,
    type            TEXT NOT NULL,
    data            TEXT NOT NULL
);
"""

# issue #15, the direct API: an outbound row says where its message came from (`origin`: 'proxy',
# acknowledged with /mark-sent|/mark-failed; 'api', never acknowledged: the proxy does not know it),
# and each API request is remembered by its journal id (api:<instance>:<Idempotency-Key>) with the
# hash of its body (a repeat with another body is a conflict) and, when it ended before reaching
# WhatsApp (interrupted, caps reached), why: such a key may be sent again
V7_API_REQUESTS = """
ALTER TABLE outbound ADD COLUMN origin TEXT NOT NULL DEFAULT 'proxy';
CREATE TABLE api_requests (
    message_id      TEXT PRIMARY KEY,
    instance_id     TEXT NOT NULL,
    idem_key        TEXT NOT NULL,
    body_sha256     TEXT NOT NULL,
    created_at      REAL NOT NULL,
    updated_at      REAL NOT NULL,
    not_sent_code   TEXT,
    not_sent_error  TEXT
) WITHOUT ROWID;
CREATE INDEX api_requests_updated ON api_requests (updated_at);
"""

# issue #12: each instance's own settings and upstream proxy as the edge proxy last gave them
# (a restart while the proxy cannot be reached still resumes sessions through their proxy_url)
V8_INSTANCE_SETTINGS = """
CREATE TABLE instance_settings (
    instance_id   TEXT PRIMARY KEY,
    settings      TEXT,
    proxy_url     TEXT,
    proxy_problem TEXT,
    updated_at    REAL NOT NULL
) WITHOUT ROWID;
"""

# issue #13, leases: the lease token a proxy message was claimed under (NULL: no leases); its
# /mark-sent or /mark-failed carries it, so the proxy accepts the truth about a send after the lease moved
V9_CLAIM_TOKEN = """
ALTER TABLE outbound ADD COLUMN claim_token INTEGER;
"""

# issue #13: the messages this worker claimed under a lease token (from the poll's answer, before
# anything else): a later re-offer marked prior_claim of one it claimed but never began to send is
# this worker's own claim (its journal would have the row otherwise), so it is sent, not reported
V10_CLAIMED = """
CREATE TABLE claimed (
    message_id   TEXT PRIMARY KEY,
    instance_id  TEXT NOT NULL,
    claimed_at   REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX claimed_at ON claimed (claimed_at);
"""

# issue #13, a journal shared by a fleet (PostgreSQL, pgjournal.py, has them from its first version): the
# worker that wrote an outbound row last, and the one that made a claim. A journal of its own leaves them
# NULL (every row is its own); the SQL that writes them is the same for both
V11_OUTBOUND_WORKER = """
ALTER TABLE outbound ADD COLUMN worker_id TEXT;
ALTER TABLE claimed ADD COLUMN worker_id TEXT;
"""

WORKER_MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial", V1_INITIAL),
    Migration(2, "inbound server errors", V2_INBOUND_SERVER_ERRORS),
    Migration(3, "error codes and message index", V3_ERROR_CODES_AND_MESSAGE_INDEX),
    Migration(4, "number cache", V4_NUMBER_CACHE),
    Migration(5, "receipts outbox", V5_RECEIPTS_OUTBOX),
    Migration(6, "event log", V6_EVENT_LOG),
    Migration(7, "direct API requests", V7_API_REQUESTS),
    Migration(8, "instance settings", V8_INSTANCE_SETTINGS),
    Migration(9, "claim token", V9_CLAIM_TOKEN),
    Migration(10, "claims made here", V10_CLAIMED),
    Migration(11, "the worker of an outbound row and of a claim", V11_OUTBOUND_WORKER),
)
# the tables a pre-versioning (user_version 0) journal has
V1_TABLES = frozenset({"inbound", "outbound", "dead_letter", "meta"})


class JournalTooNew(StoreOpenError):
    """The file was written by a newer wa-worker (its schema version is unknown here)."""


def user_version(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def migrate(db: sqlite3.Connection, path: Path | str, migrations: tuple[Migration, ...] = WORKER_MIGRATIONS,
            legacy_tables: frozenset[str] = V1_TABLES) -> int:
    """Bring the schema to the latest version; returns it. Raises
    :class:`JournalTooNew` or :class:`StoreOpenError` (a failed step leaves the
    file as it was before that step)."""
    latest = migrations[-1].version
    try:
        current = user_version(db)
        if current > latest:
            raise JournalTooNew(path, f"its schema version is {current}, newer than this wa-worker knows "
                                      f"({latest}); run a wa-worker at least as new as the one that wrote it")
        foreign = _tables(db) - legacy_tables - {"sqlite_sequence"} if current == 0 else set()
        if foreign and legacy_tables:
            names = ", ".join(sorted(foreign))
            raise StoreOpenError(path, f"it holds tables that are not a wa-worker journal ({names}); "
                                       "point STATE_DB at a file of its own")
        if current == 0 and legacy_tables and legacy_tables <= _tables(db):
            # written before versioning: version 1 by construction (its SQL is
            # idempotent, so re-running it only adds what might be missing)
            _apply(db, migrations[0])
            current = 1
        for step in migrations:
            if step.version > current:
                _apply(db, step)
                current = step.version
    except sqlite3.Error as exc:
        raise StoreOpenError(path, f"schema migration failed ({exc}); the file was left as it was") from None
    return current


def _tables(db: sqlite3.Connection) -> set[str]:
    return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def _apply(db: sqlite3.Connection, step: Migration) -> None:
    # executescript commits any open transaction first, so the transaction is
    # part of the script itself; a failing statement stops it with BEGIN open
    script = f"BEGIN IMMEDIATE;\n{step.sql}\nPRAGMA user_version = {int(step.version)};\nCOMMIT;"
    try:
        db.executescript(script)
    except sqlite3.Error:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
