"""The simulator's sessions in PostgreSQL (``DATABASE_URL``): one row per paired
instance in ``wa_worker_simulator_sessions``, so a simulated instance paired on
one worker resumes on any other worker reading the same database (issue #13).

Async psycopg (the event loop never waits on a socket); one connection, opened
lazily, reopened once when it drops. Every method raises
:class:`SimulatorStoreUnavailable` (an ``OSError``) whose text never holds the
URL's credentials.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import psycopg

from ..config import check_database_url
from ..logutil import redact_url, scrubbed, url_secrets

T = TypeVar("T")

DDL = """
create table if not exists wa_worker_simulator_sessions (
    instance_id text primary key,
    jid         text not null,
    push_name   text not null default '',
    paired_at   timestamptz not null default now()
)
"""


# workers starting together on a new database would race on "create table if not exists" (all but
# one get a unique violation in pg_type): the creation is serialized by a transaction-level lock
DDL_LOCK = "select pg_advisory_xact_lock(hashtext('wa_worker_simulator_sessions'))"


class SimulatorStoreUnavailable(OSError):
    """PostgreSQL could not be reached or refused the query (no credentials in the text)."""


class SimulatorPgStore:
    def __init__(self, url: str, *, connect_timeout_s: float = 10.0) -> None:
        check_database_url(url)
        self.url = url
        self.connect_timeout_s = connect_timeout_s
        self._secrets = url_secrets(url, user_alone_is_secret=False)
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._lock = anyio.Lock()

    @property
    def display(self) -> str:
        return redact_url(self.url)

    def _clean(self, exc: BaseException) -> str:
        return scrubbed(exc, self._secrets)

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed:
            # prepare_threshold=None: no named prepared statements (PgBouncer in transaction mode)
            self._conn = await psycopg.AsyncConnection.connect(
                self.url, autocommit=True, prepare_threshold=None,
                connect_timeout=max(1, int(self.connect_timeout_s)), application_name="wa-worker-simulator")
        return self._conn

    async def _run(self, what: str, fn: Callable[[psycopg.AsyncCursor[Any]], Awaitable[T]]) -> T:
        """``fn`` in one transaction; idempotent steps only (a dropped connection is retried once)."""
        async with self._lock:
            for attempt in (1, 2):
                try:
                    conn = await self._connect()
                    async with conn.transaction(), conn.cursor() as cur:
                        return await fn(cur)
                except psycopg.OperationalError as exc:
                    await self._drop()
                    if attempt == 2:
                        raise SimulatorStoreUnavailable(f"simulator session store ({self.display}): {what}: "
                                                        f"{self._clean(exc)}") from None
                except psycopg.Error as exc:
                    raise SimulatorStoreUnavailable(f"simulator session store ({self.display}): {what}: "
                                                    f"{self._clean(exc)}") from None
        raise AssertionError("unreachable")

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.close()
            except psycopg.Error:
                pass

    async def open(self) -> None:
        """Connect and create the table if missing."""
        async def step(cur: psycopg.AsyncCursor[Any]) -> None:
            await cur.execute(DDL_LOCK)
            await cur.execute(DDL)
        await self._run("create wa_worker_simulator_sessions", step)

    async def close(self) -> None:
        async with self._lock:
            await self._drop()

    async def load(self, instance_id: str) -> tuple[str, str] | None:
        """(jid, push name) of the instance's paired phone, or None."""
        async def step(cur: psycopg.AsyncCursor[Any]) -> tuple[str, str] | None:
            await cur.execute("select jid, push_name from wa_worker_simulator_sessions where instance_id = %s",
                              (instance_id,))
            row = await cur.fetchone()
            return (str(row[0]), str(row[1])) if row is not None else None
        return await self._run("load a session", step)

    async def save(self, instance_id: str, jid: str, push_name: str) -> None:
        async def step(cur: psycopg.AsyncCursor[Any]) -> None:
            await cur.execute(
                "insert into wa_worker_simulator_sessions (instance_id, jid, push_name) values (%s, %s, %s) "
                "on conflict (instance_id) do update set jid = excluded.jid, push_name = excluded.push_name, "
                "paired_at = now()", (instance_id, jid, push_name))
        await self._run("save a session", step)

    async def delete(self, instance_id: str) -> None:
        async def step(cur: psycopg.AsyncCursor[Any]) -> None:
            await cur.execute("delete from wa_worker_simulator_sessions where instance_id = %s", (instance_id,))
        await self._run("delete a session", step)

    async def instances(self) -> list[str]:
        async def step(cur: psycopg.AsyncCursor[Any]) -> list[str]:
            await cur.execute("select instance_id from wa_worker_simulator_sessions order by instance_id")
            return [str(r[0]) for r in await cur.fetchall()]
        return await self._run("list the sessions", step)
