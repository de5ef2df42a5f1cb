"""The journal in PostgreSQL (``DATABASE_URL``), shared by a fleet (issue #13).

The same :class:`~.journal.Journal` methods and SQL, on one synchronous psycopg connection in
autocommit mode (a transaction is an explicit ``BEGIN``/``COMMIT``), in the schema
``wa_worker_journal``. What changes with a shared store:

- ``owner`` (this worker's id) marks the outbound rows it writes: it recovers and acknowledges
  only its own, and takes over another worker's when it starts serving their instance
  (:meth:`~.journal.Journal.adopt_instance`);
- ``scope`` (the instances it holds a lease on) limits the inbound and receipt outboxes it
  delivers: inbound journaled by a dead worker is delivered by the instance's next holder;
- the event log and the small remembered values (``meta``) are per worker;
- a message offered again as ``prior_claim`` with no outbound row was provably never begun by
  any worker (each writes ``sending`` here before WhatsApp sees a byte), so it is sent.

Each call is a network round trip on the event loop's thread: keep the database near the
workers (docs/fleet.md has the figures). A lost connection is never re-dialled inside a call
(that would stall the loop): calls fail fast with :class:`~.journal.JournalUnavailable`, the
store is marked unwritable, and :meth:`PgJournal.reconnect` (run by the daemon in a thread)
brings it back. Errors never carry the URL's credentials.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import psycopg
from psycopg.pq import TransactionStatus

from ..config import check_database_url, libpq_url
from ..logutil import redact_url, scrubbed, url_secrets
from .db import StoreOpenError
from .journal import EventRow, Journal, JournalUnavailable
from .migrations import JournalTooNew

log = logging.getLogger("wa_worker.store")

SCHEMA = "wa_worker_journal"
PREPARE_AFTER = 2  # a statement run this often is prepared on the server
PREPARED_MAX = 256  # more than the journal's distinct statements
KEEPALIVE_S = 30.0  # an idle connection is used at least this often (docs/fleet.md: client_idle_timeout ≥ 60)
TABLES = ("inbound", "outbound", "dead_letter", "meta", "message_index", "number_cache", "receipts", "events",
          "api_requests", "instance_settings", "claimed")
_TABLE_REF = re.compile(rf"\b(FROM|INTO|UPDATE|JOIN)\s+({'|'.join(TABLES)})\b")

# version 1: the SQLite journal's schema at its version 11, plus the per-worker keys
PG_SCHEMA_V1 = f"""
CREATE TABLE IF NOT EXISTS {SCHEMA}.inbound (
    seq             BIGSERIAL PRIMARY KEY,
    instance_id     TEXT NOT NULL,
    chat_id         TEXT NOT NULL,
    wa_message_id   TEXT NOT NULL,
    payload         TEXT NOT NULL,
    created_at      DOUBLE PRECISION NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    server_errors   INTEGER NOT NULL DEFAULT 0,
    next_attempt_at DOUBLE PRECISION NOT NULL,
    last_error      TEXT,
    UNIQUE (instance_id, wa_message_id)
);
CREATE INDEX IF NOT EXISTS inbound_chat ON {SCHEMA}.inbound (instance_id, chat_id, seq);
CREATE INDEX IF NOT EXISTS inbound_due ON {SCHEMA}.inbound (next_attempt_at);
CREATE TABLE IF NOT EXISTS {SCHEMA}.outbound (
    message_id      TEXT PRIMARY KEY,
    instance_id     TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('sending','sent','marked','failing','failed')),
    to_jid          TEXT,
    wa_message_id   TEXT,
    error           TEXT,
    error_code      TEXT,
    created_at      DOUBLE PRECISION NOT NULL,
    updated_at      DOUBLE PRECISION NOT NULL,
    ack_attempts    INTEGER NOT NULL DEFAULT 0,
    next_ack_at     DOUBLE PRECISION,
    origin          TEXT NOT NULL DEFAULT 'proxy',
    claim_token     BIGINT,
    worker_id       TEXT
);
CREATE INDEX IF NOT EXISTS outbound_ack ON {SCHEMA}.outbound (worker_id, next_ack_at) WHERE state IN ('sent','failing');
CREATE INDEX IF NOT EXISTS outbound_updated ON {SCHEMA}.outbound (updated_at);
CREATE INDEX IF NOT EXISTS outbound_instance_created ON {SCHEMA}.outbound (instance_id, created_at);
CREATE INDEX IF NOT EXISTS outbound_wa_id ON {SCHEMA}.outbound (instance_id, wa_message_id)
    WHERE wa_message_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS outbound_sending ON {SCHEMA}.outbound (instance_id) WHERE state = 'sending';
CREATE TABLE IF NOT EXISTS {SCHEMA}.dead_letter (
    id              BIGSERIAL PRIMARY KEY,
    kind            TEXT NOT NULL,
    instance_id     TEXT NOT NULL,
    ref             TEXT NOT NULL,
    payload         TEXT,
    reason          TEXT NOT NULL,
    status_code     INTEGER,
    response        TEXT,
    created_at      DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letter_created ON {SCHEMA}.dead_letter (created_at);
CREATE TABLE IF NOT EXISTS {SCHEMA}.meta (
    worker_id       TEXT NOT NULL,
    key             TEXT NOT NULL,
    value           TEXT NOT NULL,
    PRIMARY KEY (worker_id, key)
);
CREATE TABLE IF NOT EXISTS {SCHEMA}.message_index (
    instance_id     TEXT NOT NULL,
    wa_message_id   TEXT NOT NULL,
    chat_jid        TEXT NOT NULL,
    sender_jid      TEXT,
    from_me         INTEGER NOT NULL,
    created_at      DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (instance_id, wa_message_id)
);
CREATE INDEX IF NOT EXISTS message_index_created ON {SCHEMA}.message_index (created_at);
CREATE TABLE IF NOT EXISTS {SCHEMA}.number_cache (
    phone           TEXT PRIMARY KEY,
    jid             TEXT,
    checked_at      DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS {SCHEMA}.receipts (
    instance_id     TEXT NOT NULL,
    wa_message_id   TEXT NOT NULL,
    chat_jid        TEXT NOT NULL,
    recipient       TEXT NOT NULL,
    status          TEXT NOT NULL,
    rank            INTEGER NOT NULL,
    posted_rank     INTEGER NOT NULL DEFAULT 0,
    timestamp       DOUBLE PRECISION NOT NULL,
    updated_at      DOUBLE PRECISION NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at DOUBLE PRECISION NOT NULL,
    last_error      TEXT,
    PRIMARY KEY (instance_id, wa_message_id)
);
CREATE INDEX IF NOT EXISTS receipts_due ON {SCHEMA}.receipts (next_attempt_at) WHERE rank > posted_rank;
CREATE INDEX IF NOT EXISTS receipts_updated ON {SCHEMA}.receipts (updated_at);
CREATE TABLE IF NOT EXISTS {SCHEMA}.events (
    worker_id       TEXT NOT NULL,
    seq             BIGINT NOT NULL,
    at              DOUBLE PRECISION NOT NULL,
    instance_id     TEXT NOT NULL,
    type            TEXT NOT NULL,
    data            TEXT NOT NULL,
    PRIMARY KEY (worker_id, seq)
);
CREATE TABLE IF NOT EXISTS {SCHEMA}.api_requests (
    message_id      TEXT PRIMARY KEY,
    instance_id     TEXT NOT NULL,
    idem_key        TEXT NOT NULL,
    body_sha256     TEXT NOT NULL,
    created_at      DOUBLE PRECISION NOT NULL,
    updated_at      DOUBLE PRECISION NOT NULL,
    not_sent_code   TEXT,
    not_sent_error  TEXT
);
CREATE INDEX IF NOT EXISTS api_requests_updated ON {SCHEMA}.api_requests (updated_at);
CREATE TABLE IF NOT EXISTS {SCHEMA}.instance_settings (
    instance_id     TEXT PRIMARY KEY,
    settings        TEXT,
    proxy_url       TEXT,
    proxy_problem   TEXT,
    updated_at      DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS {SCHEMA}.claimed (
    message_id      TEXT PRIMARY KEY,
    instance_id     TEXT NOT NULL,
    claimed_at      DOUBLE PRECISION NOT NULL,
    worker_id       TEXT
);
CREATE INDEX IF NOT EXISTS claimed_at ON {SCHEMA}.claimed (claimed_at);
"""

PG_MIGRATIONS: tuple[tuple[int, str], ...] = ((1, PG_SCHEMA_V1),)


@functools.lru_cache(maxsize=1024)
def to_pg(sql: str) -> str:
    """The journal's SQL for psycopg: its tables in :data:`SCHEMA`, ``?`` placeholders as ``%s``
    (and a literal ``%`` doubled). Its SQL holds no ``?`` inside a string literal."""
    sql = _TABLE_REF.sub(rf"\1 {SCHEMA}.\2", sql)
    return sql.replace("%", "%%").replace("?", "%s")


class PgRow:
    """A result row read by position or by column name (as ``sqlite3.Row``)."""

    __slots__ = ("_names", "_values")

    def __init__(self, names: dict[str, int], values: Sequence[Any]) -> None:
        self._names = names
        self._values = values

    def __getitem__(self, key: int | str) -> Any:
        return self._values[key if isinstance(key, int) else self._names[key]]

    def keys(self) -> list[str]:
        return list(self._names)


def _row_factory(cursor: Any) -> Callable[[Sequence[Any]], PgRow]:
    names = {c.name: i for i, c in enumerate(cursor.description or ())}
    return lambda values: PgRow(names, values)


class _Connection:
    """One psycopg connection in the shape the journal's plumbing uses (``execute``, ``in_transaction``,
    ``close``); never re-dialled inside a call.

    Server-side prepared statements (a call costs about half as much: docs/performance.md) unless
    ``prepared`` is False — the URL of docs/fleet.md's PgBouncer setup — or a pooler turns out not
    to keep them (a statement missing or already there): then they are off from that call on."""

    def __init__(self, url: str, connect_timeout_s: float, *, prepared: bool = True) -> None:
        self.url = url
        self.connect_timeout_s = connect_timeout_s
        self.prepared = prepared
        self._conn: psycopg.Connection[Any] | None = None
        self.last_used = time.monotonic()

    @property
    def up(self) -> bool:
        return self._conn is not None and not self._conn.closed

    def connect(self) -> psycopg.Connection[Any]:
        # prepare_threshold=None: no named prepared statements (PgBouncer in transaction mode);
        # tcp_user_timeout and keepalives: a silent network fails a call in seconds, not minutes
        conn: psycopg.Connection[Any] = psycopg.Connection.connect(
            self.url, autocommit=True, prepare_threshold=PREPARE_AFTER if self.prepared else None,
            row_factory=_row_factory,
            connect_timeout=max(1, int(self.connect_timeout_s)), application_name="wa-worker-journal",
            keepalives=1, keepalives_idle=10, keepalives_interval=5, keepalives_count=3,
            tcp_user_timeout=int(self.connect_timeout_s * 1000))
        conn.prepared_max = PREPARED_MAX  # every statement of the journal stays prepared
        old, self._conn = self._conn, conn
        if old is not None:
            old.close()
        return conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        conn = self._conn
        if conn is None or conn.closed:
            raise psycopg.OperationalError("no connection to PostgreSQL (reconnecting)")
        self.last_used = time.monotonic()
        try:
            return conn.execute(to_pg(sql), tuple(params))
        except (psycopg.errors.InvalidSqlStatementName, psycopg.errors.DuplicatePreparedStatement):
            if conn.prepare_threshold is None:
                raise
            self.prepared, conn.prepare_threshold = False, None
            log.warning("the journal's PostgreSQL connection goes through a pooler that does not keep prepared "
                        "statements (PgBouncer in transaction mode?): they are off from now on")
            if conn.info.transaction_status != TransactionStatus.IDLE:
                raise  # inside a transaction: that one fails (its caller retries), the next ones work
            return conn.execute(to_pg(sql), tuple(params))
        except psycopg.errors.FeatureNotSupported as exc:
            if "cached plan" in str(exc):  # a newer worker changed the schema under a prepared statement:
                conn.close()  # a new connection (housekeeping, within 5 s) prepares them afresh
            raise

    @property
    def in_transaction(self) -> bool:
        conn = self._conn
        return conn is not None and not conn.closed and conn.info.transaction_status != TransactionStatus.IDLE

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


class PgJournal(Journal):
    """The journal in PostgreSQL at ``url`` for worker ``worker_id``. Raises
    :class:`~.db.StoreOpenError` (credentials never in its text) when it cannot be used."""

    _BEGIN = "BEGIN"
    _integrity_errors = (psycopg.IntegrityError,)
    _errors = (psycopg.Error,)
    shared = True

    def __init__(self, url: str, *, worker_id: str, clock: Any = None, connect_timeout_s: float = 5.0) -> None:
        try:
            check_database_url(url)
        except ValueError as exc:
            raise StoreOpenError("DATABASE_URL", str(exc)) from None
        self.display = redact_url(url)
        self._secrets = url_secrets(url, user_alone_is_secret=False)
        self._init_common(self.display, clock, 0)
        self.owner = worker_id
        # the URL docs/fleet.md gives for PgBouncer (binary_parameters=yes): no prepared statements
        pooled = any(k == "binary_parameters" for k, _ in parse_qsl(urlsplit(url).query))
        self._pg = self._db = _Connection(libpq_url(url), connect_timeout_s, prepared=not pooled)
        self._down_logged = False
        try:
            self.schema_version = pg_migrate(self._pg.connect(), self.display)
        except psycopg.Error as exc:
            self._db.close()
            raise StoreOpenError(self.display, self._clean(exc)) from None
        except StoreOpenError:
            self._db.close()
            raise

    def _clean(self, exc: BaseException) -> str:
        return scrubbed(exc, self._secrets)

    def _mark_unwritable(self, exc: Exception) -> None:
        super()._mark_unwritable(Exception(self._clean(exc)))

    def reconnect(self) -> None:
        """Dial again when the connection is lost (blocking, up to the connect timeout: the
        daemon runs it in a thread); the next :meth:`probe_writable` declares the store usable."""
        if self._pg.up:
            return
        try:
            self._pg.connect()
        except psycopg.Error as exc:
            if not self._down_logged:
                log.error("the journal's PostgreSQL (%s) cannot be reached: %s (retrying)", self.display,
                          self._clean(exc))
                self._down_logged = True
            return
        self._down_logged = False
        log.warning("the journal's PostgreSQL (%s) is reachable again", self.display)

    def _in_list(self, column: str, values: Collection[str]) -> tuple[str, tuple[Any, ...]]:
        # one text parameter, whatever the count (an array of 2,000 strings costs ~1 ms to adapt);
        # instance ids are [A-Za-z0-9_-] (ids.py), so a comma separates them safely
        # (a sub-select: split once per query, not once per row under a prepared statement's generic plan)
        return f" AND {column} IN (SELECT unnest(string_to_array(?, ',')))", (",".join(values),)

    def keepalive(self) -> None:
        """One tiny query when the connection has been idle for ``KEEPALIVE_S`` (PgBouncer's
        ``client_idle_timeout``, a NAT's idle timer): a lost one is found here, not at a send."""
        if self._pg.up and time.monotonic() - self._pg.last_used >= KEEPALIVE_S:
            try:
                self._read("SELECT 1")
            except JournalUnavailable as exc:
                log.warning("the journal's PostgreSQL connection was lost while idle (%s): reconnecting", exc)

    def free_bytes(self) -> int | None:
        return None  # the server's disk: PostgreSQL refuses a write when it is full (then unwritable)

    def _wal_bytes(self) -> int:
        return 0

    def _write(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        try:
            return super()._write(sql, params)
        except JournalUnavailable as exc:
            raise type(exc)(self._clean(exc)) from None

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        try:
            return super()._read(sql, params)
        except JournalUnavailable as exc:
            if not self._pg.up:  # the connection is lost: unwritable too, until reconnect() and the probe
                self._mark_unwritable(exc)
            raise JournalUnavailable(self._clean(exc)) from None

    # ------------------------------------------------------------------ per worker

    def meta(self, key: str) -> str | None:
        return self._scalar("SELECT value FROM meta WHERE worker_id = ? AND key = ?", (self.owner, key))

    def set_meta(self, key: str, value: str) -> None:
        self._write("INSERT INTO meta (worker_id, key, value) VALUES (?, ?, ?) ON CONFLICT (worker_id, key) "
                    "DO UPDATE SET value = excluded.value", (self.owner, key, value))

    def claimed_here(self, message_id: str) -> bool:
        """Asked of a message offered again with no outbound row: none was begun anywhere (every
        worker journals ``sending`` here first), so it is as good as this worker's own claim."""
        return True

    def forget_claims(self, message_ids: list[str]) -> int:
        if not message_ids:
            return 0
        n = 0
        with self._tx():
            for start in range(0, len(message_ids), 1000):  # message ids may hold commas: one array each
                chunk = message_ids[start:start + 1000]
                n += self._write("DELETE FROM claimed WHERE message_id = ANY(?)", (chunk,)).rowcount
        return n

    def add_events(self, rows: Collection[EventRow]) -> None:
        sql = "INSERT INTO events (worker_id, seq, at, instance_id, type, data) VALUES (?, ?, ?, ?, ?, ?)"
        if len(rows) == 1:  # the usual case: one round trip, its own transaction
            [r] = rows
            self._write(sql, (self.owner, r.seq, r.at, r.instance_id, r.type, r.data))
            return
        with self._tx():
            for r in rows:
                self._write(sql, (self.owner, r.seq, r.at, r.instance_id, r.type, r.data))

    def events_after(self, seq: int, limit: int, instances: Collection[str] | None = None,
                     types: Collection[str] | None = None) -> list[EventRow]:
        sql = "SELECT seq, at, instance_id, type, data FROM events WHERE worker_id = ? AND seq > ?"
        params: list[Any] = [self.owner, seq]
        for column, values in (("instance_id", instances), ("type", types)):
            if values is not None:
                sql += f" AND {column} IN ({','.join('?' * len(values))})" if values else " AND 1 = 0"
                params.extend(values)
        rows = self._read(sql + " ORDER BY seq LIMIT ?", (*params, limit))
        return [EventRow(r["seq"], r["at"], r["instance_id"], r["type"], r["data"]) for r in rows]

    def event_seq_bounds(self) -> tuple[int | None, int]:
        low = self._scalar("SELECT MIN(seq) FROM events WHERE worker_id = ?", (self.owner,))
        high = self._scalar("SELECT MAX(seq) FROM events WHERE worker_id = ?", (self.owner,))
        kept = self.meta("events_high")  # the highest number given before the last prune
        return (None if low is None else int(low)), max(int(high or 0), int(kept or 0))

    def prune_events(self, before: float, keep_rows: int) -> int:
        high = self.event_seq_bounds()[1]
        if high:
            self.set_meta("events_high", str(high))  # a restart after pruning never reuses a number
        n = self._write("DELETE FROM events WHERE worker_id = ? AND seq < COALESCE((SELECT seq FROM events WHERE "
                        "worker_id = ? AND at >= ? ORDER BY seq LIMIT 1), 9223372036854775807)",
                        (self.owner, self.owner, before)).rowcount
        n += self._write("DELETE FROM events WHERE worker_id = ? AND seq <= ?", (self.owner, high - keep_rows)).rowcount
        return int(n)


def pg_migrate(conn: psycopg.Connection[Any], display: str) -> int:
    """Create or bring the schema to the latest version, one worker at a time (an advisory lock);
    returns the version. Raises :class:`~.migrations.JournalTooNew` for a newer schema."""
    latest = PG_MIGRATIONS[-1][0]
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('wa_worker_journal'))")
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
        conn.execute(f"CREATE TABLE IF NOT EXISTS {SCHEMA}.schema_version (version INTEGER NOT NULL)")
        row = conn.execute(f"SELECT MAX(version) FROM {SCHEMA}.schema_version").fetchone()
        current = int(row[0]) if row is not None and row[0] is not None else 0
        if current == 0:
            foreign = conn.execute(
                "SELECT string_agg(table_name, ', ' ORDER BY table_name) FROM information_schema.tables "
                "WHERE table_schema = %s AND table_name <> 'schema_version'", (SCHEMA,)).fetchone()
            if foreign is not None and foreign[0]:
                raise StoreOpenError(display, f"the schema {SCHEMA} holds tables that are not a wa-worker journal "
                                              f"({foreign[0]}); left untouched")
        if current > latest:
            raise JournalTooNew(display, f"its schema {SCHEMA} is at version {current}, newer than this "
                                         f"wa-worker knows ({latest}); run a wa-worker at least as new")
        for version, sql in PG_MIGRATIONS:
            if version > current:
                conn.execute(sql.encode())
                conn.execute(f"INSERT INTO {SCHEMA}.schema_version (version) VALUES ({int(version)})")
                current = version
    return current
