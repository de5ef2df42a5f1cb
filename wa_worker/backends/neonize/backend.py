"""The neonize backend: the services every session shares (CONNECT relay,
short-call pool, the task group owning pumps, watchdogs and teardowns)."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.abc
from anyio.lowlevel import EventLoopToken, current_token

from ...ids import is_valid_instance_id
from ..base import Backend, BackendError, EventSink
from .attempt import Attempt
from .connect_relay import ConnectRelay
from .loading import NeonizeLib
from .pgstore import PgSessionStore, SessionStoreUnavailable
from .session import NeonizeSession
from .store import DB_NAME, is_paired
from .threads import CallPool, default_pool_size

UpstreamProxy = str | Callable[[str], str | None] | None
T = TypeVar("T")


class NeonizeBackend(Backend):
    """Factory of :class:`NeonizeSession`; enter it (``async with``) before use.

    ``upstream_proxy``: ``http://[user:pass@]host:port`` for every instance, or a
    callable ``instance_id -> url | None``; None dials WhatsApp directly.
    ``max_threads`` sizes the short-call pool (default 4 per core, 8..64); the
    long-lived ``Neonize()`` calls each get their own thread on top of it.
    ``send_timeout_s`` bounds each short Go call (a send); ``media_timeout_s`` a
    media upload or download. ``database_url`` (postgres://…) keeps every
    session in that database instead of ``auth_root`` (docs/fleet.md).
    """

    name = "neonize"

    def __init__(
        self,
        auth_root: Path,
        *,
        connect_timeout_s: float = 30.0,
        max_threads: int | None = None,
        log: logging.Logger | logging.LoggerAdapter[Any] | None = None,
        upstream_proxy: UpstreamProxy = None,
        send_timeout_s: float = 60.0,
        media_timeout_s: float = 300.0,
        close_timeout_s: float = 5.0,
        dial_timeout_s: float | None = None,
        device_name: str = "wa-worker",
        whatsmeow_log_level: str = "WARN",
        prologue_max_s: float = 5.0,
        gate_timeout_s: float = 10.0,
        database_url: str | None = None,
        database_idle_timeout_s: float = 60.0,
    ) -> None:
        super().__init__(Path(auth_root))
        if connect_timeout_s <= 0:
            raise ValueError("connect_timeout_s must be > 0")
        self.connect_timeout_s = connect_timeout_s
        self.max_threads = max_threads
        self.log: Any = log or logging.getLogger("wa_worker.backends.neonize")
        self.upstream_proxy = upstream_proxy
        self.send_timeout_s = send_timeout_s
        self.media_timeout_s = media_timeout_s
        self.close_timeout_s = close_timeout_s
        self.dial_timeout_s = dial_timeout_s if dial_timeout_s is not None else min(connect_timeout_s, 20.0)
        self.device_name = device_name
        self.whatsmeow_log_level = whatsmeow_log_level
        self.prologue_max_s = prologue_max_s
        self.gate_timeout_s = gate_timeout_s
        # sessions in PostgreSQL instead of AUTH_DIR/<id>/session.db (docs/fleet.md)
        self.pg = (PgSessionStore(database_url, idle_timeout_s=database_idle_timeout_s)
                   if database_url else None)
        self.relay: ConnectRelay | None = None
        self.pool: CallPool | None = None
        self.live: set[Attempt] = set()  # attempts whose Neonize() thread still runs
        self._tg: anyio.abc.TaskGroup | None = None
        self._token: EventLoopToken | None = None
        self._stack: AsyncExitStack | None = None
        self._sessions: dict[str, NeonizeSession] = {}
        # DATABASE_URL: the paired instances, read at start and kept by this worker's own
        # pairings and logouts, so has_session() never waits for the database on the loop
        self._paired: set[str] = set()

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> "NeonizeBackend":
        if self._stack is not None:
            raise BackendError("neonize backend already started")
        async with AsyncExitStack() as stack:
            # neonize dispatches its own callbacks to this module global, which it
            # sets only once per process; point it at the loop we run in
            NeonizeLib.get().aio_events.event_global_loop = asyncio.get_running_loop()
            stack.callback(self._forget_services)
            if self.pg is not None:  # unreachable: SessionStoreUnavailable (an OSError) ends the start
                await anyio.to_thread.run_sync(self.pg.open)
                self._paired = set(await anyio.to_thread.run_sync(self.pg.paired_instances))
                stack.callback(self.pg.close)
                self.log.info("neonize sessions in PostgreSQL: %s", self.pg.display)
            self.relay = await stack.enter_async_context(
                ConnectRelay(dial_timeout_s=self.dial_timeout_s, log=self.log)
            )
            pool = CallPool(self.max_threads or default_pool_size(), name="wa-neonize")
            stack.callback(pool.shutdown)
            self.pool = pool
            tg = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(tg.cancel_scope.cancel)  # what the closed sessions left behind
            stack.push_async_callback(self.aclose)  # runs first: sessions end their own tasks
            self._tg, self._token = tg, current_token()
            self._stack = stack.pop_all()
        return self

    async def __aexit__(self, *exc: object) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()

    async def aclose(self) -> None:
        """Close every session (bounded); the services stop when the block exits."""
        sessions = list(self._sessions.values())
        if sessions:
            async with anyio.create_task_group() as tg:
                for s in sessions:
                    tg.start_soon(s.close)

    def _forget_services(self) -> None:
        self.relay, self.pool, self._tg, self._token = None, None, None, None
        self._sessions = {}

    def require_started(self) -> None:
        if self._tg is None or self.relay is None:
            raise BackendError("neonize backend not started (use `async with backend:`)")

    @property
    def task_group(self) -> anyio.abc.TaskGroup:
        self.require_started()
        assert self._tg is not None
        return self._tg

    @property
    def task_group_or_none(self) -> anyio.abc.TaskGroup | None:
        return self._tg

    @property
    def token(self) -> EventLoopToken:
        self.require_started()
        assert self._token is not None
        return self._token

    def forget(self, session: NeonizeSession) -> None:
        if self._sessions.get(session.instance_id) is session:
            del self._sessions[session.instance_id]

    # ------------------------------------------------------------------ Backend API

    def upstream_for(self, instance_id: str) -> str | None:
        """The instance's own ``proxy_url`` (from the edge proxy), else ``upstream_proxy``.
        Raises ValueError when the instance's value is unusable."""
        own = self.instance_proxy(instance_id)
        if own is not None:
            return own
        up = self.upstream_proxy
        return up(instance_id) if callable(up) else up

    def has_session(self, instance_id: str) -> bool:
        """True only for a *paired* store (see :func:`store.is_paired`); with
        ``database_url``, an instance mapped to a device whatsmeow held when this
        backend started or that paired since (answered from memory: one worker per
        database until leases exist, docs/fleet.md)."""
        if not is_valid_instance_id(instance_id):
            return False
        if self.pg is not None:
            return instance_id in self._paired
        return is_paired(self.auth_dir(instance_id) / DB_NAME, self.log)

    def stored_instances(self) -> list[str]:
        if self.pg is not None:
            return sorted(i for i in self._paired if is_valid_instance_id(i))
        return super().stored_instances()

    async def forget_session(self, instance_id: str) -> None:
        """After a logout: the device and its mapping leave the database (or the folder is wiped)."""
        if self.pg is None:
            await super().forget_session(instance_id)
            return
        self._paired.discard(instance_id)
        await self._pg_call(self.pg.forget, instance_id)

    async def stored_device(self, instance_id: str) -> str | None:
        """Shared database: the device JID instance ``instance_id`` must open (None: a new device)."""
        assert self.pg is not None
        device = await self._pg_call(self.pg.device_for, instance_id)
        if device is None:
            self._paired.discard(instance_id)
        else:
            self._paired.add(instance_id)
        return device

    async def remember_device(self, instance_id: str, jid: str) -> None:
        assert self.pg is not None
        await self._pg_call(self.pg.remember, instance_id, jid)
        self._paired.add(instance_id)

    async def _pg_call(self, fn: Callable[..., T], *args: Any) -> T:
        """A session-store call in a worker thread; its failure as a BackendError."""
        try:
            return await anyio.to_thread.run_sync(functools.partial(fn, *args))
        except SessionStoreUnavailable as exc:
            raise BackendError(str(exc)) from None

    async def open_session(self, instance_id: str, sink: EventSink) -> NeonizeSession:
        if not is_valid_instance_id(instance_id):
            raise ValueError(f"invalid instance id {instance_id!r}")
        tg = self.task_group
        old = self._sessions.get(instance_id)
        if old is not None and not old.closed:
            raise BackendError(f"instance {instance_id} already has an open session")
        session = NeonizeSession(self, instance_id, sink)
        await tg.start(session.run_pump, name=f"neonize-sink-{instance_id}")
        self._sessions[instance_id] = session
        return session

    # ------------------------------------------------------------------ introspection

    def stats(self) -> dict[str, Any]:
        live = [a for a in self.live if a.thread is not None and a.thread.is_alive()]
        self.live = set(live)
        return {
            "sessions": len(self._sessions),
            "go_threads": len(live),
            "pool_size": self.pool.max_workers if self.pool else 0,
            "relay_tickets": len(self.relay.tickets) if self.relay else 0,
        }

    def relay_bytes(self) -> tuple[int, int]:
        """Bytes up (to WhatsApp) and down through the CONNECT relay since it started (/metrics)."""
        return (self.relay.bytes_up, self.relay.bytes_down) if self.relay else (0, 0)
