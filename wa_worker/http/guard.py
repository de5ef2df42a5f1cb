"""Connection guard for a public aiohttp server: whoever can reach the port must
not be able to exhaust the process's descriptors or hold connections forever.

* at most ``max_connections`` open at once; one more is closed at once (it
  never reaches aiohttp), as is any connection while :attr:`ConnectionGuard.refusing`
  is set (the descriptor guard sets it when sockets fill the budget) or while
  the accepted socket's descriptor number is past ``fd_ceiling``. A few more
  (``reserve``) are kept for loopback peers — the container's own HEALTHCHECK —
  so a flood from outside does not make the worker look dead;
* a connection that has not delivered a complete request within
  ``request_timeout_s`` of opening (or of its previous response) is closed —
  idle connections and slowloris that drip header bytes alike. A request
  whose handler is running is not timed here: handlers read bodies with
  :func:`wa_worker.http.common.read_body`, which has its own deadline.

Use :class:`GuardedSite` instead of ``web.TCPSite`` and put
:attr:`ConnectionGuard.middleware` first in the app's middlewares (it tells the
guard when a request's handler runs).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

log = logging.getLogger("wa_worker.http")

REQUEST_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 256
LOOPBACK_RESERVE = 8
LOG_EVERY_S = 60.0


def max_connections_for(fd_limit: int) -> int:
    """A quarter of the descriptor budget, between 16 and :data:`MAX_CONNECTIONS`."""
    if fd_limit <= 0:
        return MAX_CONNECTIONS
    return max(16, min(MAX_CONNECTIONS, fd_limit // 4))


class ConnectionGuard:
    def __init__(
        self,
        *,
        max_connections: int = MAX_CONNECTIONS,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
        fd_ceiling: int | None = None,
        reserve: int = LOOPBACK_RESERVE,
        reserved_for: Callable[[str], bool] | None = None,
    ) -> None:
        self.max_connections = max_connections
        self.request_timeout_s = request_timeout_s
        self.fd_ceiling = fd_ceiling
        self.reserve = reserve
        self._reserved_for = reserved_for or is_loopback
        self.refusing = False
        self.accepted = 0
        self.refused = 0
        self.timed_out = 0
        self.idle_closed = 0  # keep-alive connections closed after their last answer: normal, not logged
        self._open: dict[asyncio.BaseTransport, _GuardedConnection] = {}
        self._unlogged: dict[str, int] = {}
        self._logged_at = -LOG_EVERY_S

    @classmethod
    def for_fd_limit(cls, fd_limit: int, *, fd_share: float = 0.8) -> ConnectionGuard:
        """Sized from the descriptor limit; refuses past ``fd_share`` of it."""
        ceiling = int(fd_limit * fd_share) if fd_limit > 0 else None
        return cls(max_connections=max_connections_for(fd_limit), fd_ceiling=ceiling)

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def stats(self) -> dict[str, int]:
        return {
            "connections": len(self._open),
            "max_connections": self.max_connections,
            "accepted": self.accepted,
            "refused": self.refused,
            "timed_out": self.timed_out,
            "idle_closed": self.idle_closed,
        }

    def wrap(self, factory: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """A protocol factory for ``loop.create_server`` that guards ``factory``'s protocols."""
        return lambda: _GuardedConnection(self, factory)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        conn = self._open.get(request.transport) if request.transport is not None else None
        if conn is None:
            return await handler(request)
        conn.request_started()
        try:
            return await handler(request)
        finally:
            conn.request_finished()

    # -------------------------------------------------------------- internals

    def _admit(self, conn: _GuardedConnection, transport: asyncio.BaseTransport) -> bool:
        reason = None
        if self._reserved_for(_peer_host(transport)):
            if len(self._open) >= self.max_connections + self.reserve:
                reason = f"{self.max_connections} connections open and the reserve in use"
        elif self.refusing:
            reason = "descriptors nearly exhausted"
        elif len(self._open) >= self.max_connections:
            reason = f"{self.max_connections} connections open"
        elif self.fd_ceiling is not None and _fileno(transport) >= self.fd_ceiling:
            reason = "descriptors nearly exhausted"
        if reason is not None:
            self.refused += 1
            self._note(f"refused ({reason})")
            return False
        self.accepted += 1
        self._open[transport] = conn
        return True

    def _release(self, transport: asyncio.BaseTransport) -> None:
        self._open.pop(transport, None)

    def _expired(self) -> None:
        self.timed_out += 1
        self._note(f"closed: no complete request within {self.request_timeout_s:g} s")

    def _note(self, what: str) -> None:
        """Count an event; log the counts at most once a minute (a flood must not flood the log)."""
        self._unlogged[what] = self._unlogged.get(what, 0) + 1
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY_S:
            self._logged_at = now
            summary = ", ".join(f"{n} {w}" for w, n in self._unlogged.items())
            self._unlogged.clear()
            log.warning("HTTP connections: %s; %d open (limit %d)", summary, len(self._open), self.max_connections)


def is_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def _peer_host(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else ""


def _fileno(transport: asyncio.BaseTransport) -> int:
    sock = transport.get_extra_info("socket")
    try:
        return int(sock.fileno()) if sock is not None else -1
    except (OSError, ValueError):
        return -1


class _GuardedConnection(asyncio.Protocol):
    """Stands between the transport and aiohttp's protocol: admission and the request deadline."""

    def __init__(self, guard: ConnectionGuard, factory: Callable[[], asyncio.Protocol]) -> None:
        self._guard = guard
        self._factory = factory
        self._inner: asyncio.Protocol | None = None  # aiohttp's protocol, made only once admitted
        self._transport: asyncio.BaseTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._busy = 0
        self._served = 0  # requests answered on this connection
        self._partial = False  # bytes of a request arrived that no handler has taken yet

    # asyncio.Protocol, delegated once admitted
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._guard._admit(self, transport):
            _abort(transport)
            return
        self._transport = transport
        self._inner = self._factory()
        self._arm()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._busy == 0:
            self._partial = True
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        transport, self._transport = self._transport, None
        inner, self._inner = self._inner, None
        self._disarm()
        if transport is not None:
            self._guard._release(transport)
        if inner is not None:
            inner.connection_lost(exc)

    # request deadline
    def request_started(self) -> None:
        self._busy += 1
        self._partial = False
        self._disarm()

    def request_finished(self) -> None:
        self._busy -= 1
        self._served += 1
        if self._busy == 0 and self._transport is not None:
            self._arm()

    def _arm(self) -> None:
        self._disarm()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._guard.request_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        if self._busy == 0 and self._transport is not None:
            if self._served and not self._partial:
                self._guard.idle_closed += 1  # an idle keep-alive connection: closing it is routine
            else:
                self._guard._expired()  # opened, or started a request, and never completed one
            _abort(self._transport)


def _abort(transport: asyncio.BaseTransport) -> None:
    if isinstance(transport, asyncio.WriteTransport):
        transport.abort()  # at once: no lingering, no flushing to a peer that does not read
    else:
        transport.close()


class GuardedSite(web.BaseSite):
    """``web.TCPSite`` whose connections go through a :class:`ConnectionGuard`."""

    def __init__(self, web_runner: web.BaseRunner, host: str, port: int, guard: ConnectionGuard, *,
                 backlog: int = 128) -> None:
        super().__init__(web_runner, backlog=backlog)
        self._host = host
        self._port = port
        self._guard = guard

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server: Any = self._runner.server
        assert server is not None, "runner.setup() first"
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._guard.wrap(server), self._host, self._port,
                                                backlog=self._backlog, reuse_address=True)


# aiohttp's own limits, for ``web.AppRunner(app, **SERVER_OPTIONS)``: its keep-alive timer
# (armed at connect in recent aiohttp) backs up the guard's deadline, a request's
# unread body is drained for 2 s at most, and fewer headers are buffered per connection
SERVER_OPTIONS: dict[str, Any] = {
    "access_log": None,
    "keepalive_timeout": REQUEST_TIMEOUT_S,
    "lingering_time": 2.0,
    "max_headers": 32,
}
