"""WhatsApp sessions in PostgreSQL (``DATABASE_URL``, docs/fleet.md).

whatsmeow keeps every device in its own tables (``whatsmeow_device`` and the
tables keyed by ``our_jid``), which hold many devices at once. goneonize opens
a device in one of three ways: by JID, as a brand-new device, or "the first
one stored"; in a shared database the last would hand instance X somebody
else's account. So the worker keeps ``wa_worker_sessions`` (instance id →
device JID) beside whatsmeow's tables: a paired instance is opened by its JID,
any other one as a new device, never as "the first one".

goneonize opens a ``database/sql`` pool per Go client and never closes it
(one PostgreSQL connection per connection attempt, for the life of the
process). The bound we can set from here is ``idle_session_timeout``, passed
in the DSN's ``options``: the server ends a connection idle that long, and the
Go driver (lib/pq) replaces it on its next query (measured, docs/fleet.md).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import psycopg

from ...config import check_database_url, libpq_url
from ...logutil import redact_url, scrubbed, url_secrets

T = TypeVar("T")

SESSIONS_DDL = """
create table if not exists wa_worker_sessions (
    instance_id text primary key,
    jid         text not null,
    paired_at   timestamptz not null default now(),
    updated_at  timestamptz not null default now()
)
"""

# workers starting together on a new database would race on "create table if not exists" (all but
# one get a unique violation in pg_type): the creation is serialized by a transaction-level lock
# (transaction-level: it works through PgBouncer in transaction mode too)
SESSIONS_DDL_LOCK = "select pg_advisory_xact_lock(hashtext('wa_worker_sessions'))"


class SessionStoreUnavailable(OSError):
    """PostgreSQL could not be reached or refused the query (no credentials in the text)."""


def _with_params(url: str, extra: dict[str, str]) -> str:
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    pairs += list(extra.items())
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(pairs, quote_via=quote), parts.fragment))


def store_urls(url: str, idle_timeout_s: float) -> tuple[str, str]:
    """(the URL our own connection uses, the DSN handed to goneonize).

    * no ``sslmode`` → ``require`` on both sides: lib/pq 1.12 (inside goneonize)
      defaults to it and libpq to ``prefer``; one rule for both;
    * ``idle_timeout_s`` > 0 → goneonize's DSN gets
      ``options=-c idle_session_timeout=<ms>`` (unless ``options`` is set: then it is left alone);
    * lib/pq-only parameters (``binary_parameters=yes``, which PgBouncer's transaction
      mode needs) stay out of our own URL.
    """
    query = dict(parse_qsl(urlsplit(url).query))
    go = url if "sslmode" in query else _with_params(url, {"sslmode": "require"})
    own = libpq_url(go)
    if idle_timeout_s > 0 and "options" not in query:
        go = _with_params(go, {"options": f"-c idle_session_timeout={int(idle_timeout_s * 1000)}"})
    return own, go


class PgSessionStore:
    """The instance → device map next to whatsmeow's tables. Blocking (call it
    from a worker thread); one connection, opened lazily, reopened once on a
    connection error. Every method raises :class:`SessionStoreUnavailable`."""

    def __init__(self, url: str, *, idle_timeout_s: float = 60.0, connect_timeout_s: float = 10.0) -> None:
        check_database_url(url)
        self.url, self.go_dsn = store_urls(url, idle_timeout_s)
        self.connect_timeout_s = connect_timeout_s
        self._secrets = url_secrets(url, user_alone_is_secret=False)
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()

    @property
    def display(self) -> str:
        """The URL fit for a log line (credentials as ``***``)."""
        return redact_url(self.url)

    # ------------------------------------------------------------------ plumbing

    def _clean(self, exc: BaseException) -> str:
        return scrubbed(exc, self._secrets)

    def _connect(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            # prepare_threshold=None: no named prepared statements (PgBouncer in transaction mode)
            self._conn = psycopg.connect(self.url, autocommit=True, prepare_threshold=None,
                                         connect_timeout=max(1, int(self.connect_timeout_s)),
                                         application_name="wa-worker")
        return self._conn

    def _run(self, what: str, fn: Callable[[psycopg.Cursor[Any]], T]) -> T:
        """``fn`` in one transaction. Only idempotent statements go through here:
        a dropped connection is reopened and the whole step tried once more."""
        with self._lock:
            for attempt in (1, 2):
                try:
                    conn = self._connect()
                    with conn.transaction(), conn.cursor() as cur:
                        return fn(cur)
                except psycopg.OperationalError as exc:
                    self._drop()
                    if attempt == 2:
                        raise SessionStoreUnavailable(f"session store ({self.display}): {what}: "
                                                      f"{self._clean(exc)}") from None
                except psycopg.Error as exc:
                    raise SessionStoreUnavailable(f"session store ({self.display}): {what}: "
                                                  f"{self._clean(exc)}") from None
        raise AssertionError("unreachable")

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error:
                pass

    @staticmethod
    def _has_devices(cur: psycopg.Cursor[Any]) -> bool:
        """whatsmeow creates its tables on its first start: before that, no device exists."""
        cur.execute("select to_regclass('whatsmeow_device') is not null")
        row = cur.fetchone()
        return bool(row and row[0])

    # ------------------------------------------------------------------ API

    def open(self) -> None:
        """Connect and create ``wa_worker_sessions`` if missing."""
        def step(cur: psycopg.Cursor[Any]) -> None:
            cur.execute(SESSIONS_DDL_LOCK)
            cur.execute(SESSIONS_DDL)
        self._run("create wa_worker_sessions", step)

    def close(self) -> None:
        with self._lock:
            self._drop()

    def device_for(self, instance_id: str) -> str | None:
        """The JID of the instance's stored device; None (and a stale mapping
        removed) when whatsmeow no longer has that device."""

        def step(cur: psycopg.Cursor[Any]) -> str | None:
            cur.execute("select jid from wa_worker_sessions where instance_id = %s", (instance_id,))
            row = cur.fetchone()
            if row is None:
                return None
            jid = str(row[0])
            if self._has_devices(cur):
                cur.execute("select 1 from whatsmeow_device where jid = %s", (jid,))
                if cur.fetchone() is not None:
                    return jid
            # goneonize would crash on a JID it cannot load: forget it, pair again
            cur.execute("delete from wa_worker_sessions where instance_id = %s and jid = %s", (instance_id, jid))
            return None

        return self._run("look up the device", step)

    def remember(self, instance_id: str, jid: str) -> None:
        """Instance ``instance_id`` is (now) device ``jid``."""
        self._run("remember the device", lambda cur: cur.execute(
            "insert into wa_worker_sessions (instance_id, jid) values (%s, %s) "
            "on conflict (instance_id) do update set jid = excluded.jid, updated_at = now(), "
            "paired_at = case when wa_worker_sessions.jid = excluded.jid then wa_worker_sessions.paired_at "
            "else now() end", (instance_id, jid)))

    def forget(self, instance_id: str) -> str | None:
        """Remove the instance's mapping and its whatsmeow device (whose rows
        cascade); the JID it had, if any."""

        def step(cur: psycopg.Cursor[Any]) -> str | None:
            cur.execute("delete from wa_worker_sessions where instance_id = %s returning jid", (instance_id,))
            row = cur.fetchone()
            if row is None:
                return None
            jid = str(row[0])
            if self._has_devices(cur):
                cur.execute("delete from whatsmeow_device where jid = %s", (jid,))
            return jid

        return self._run("forget the device", step)

    def paired_instances(self) -> list[str]:
        def step(cur: psycopg.Cursor[Any]) -> list[str]:
            if not self._has_devices(cur):
                return []
            cur.execute("select s.instance_id from wa_worker_sessions s join whatsmeow_device d on d.jid = s.jid "
                        "order by s.instance_id")
            return [str(r[0]) for r in cur.fetchall()]

        return self._run("list the devices", step)
