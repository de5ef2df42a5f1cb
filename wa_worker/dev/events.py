"""``GET /events`` of the dev proxy: a bounded in-memory change log that long polls wait on.

Each change has a number; the cursor a caller gets back is ``<boot>-<number>``
(``boot`` changes with each proxy start). A caller sees:

* ``{"type": "queued", "instanceId": …}`` for a message queued on an instance it
  holds the lease of (a caller without ``X-Worker-Id``: on every instance);
* ``{"type": "leases"}`` when its next ``POST /leases`` would get a grant or a
  revocation.

A cursor from another boot, or older than the log keeps, gets a resync answer
at once (``leases`` and every instance of the caller with queued messages).
Waiting uses one broadcast :class:`anyio.Event` (set on each change, never
polled); the waiter also checks every :data:`LIVENESS_TICK_S` that its client
is still connected, so a client that went away frees its place. When the proxy
stops (:meth:`EventHub.close`, on the app's shutdown), every waiter answers at once.
"""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio

MAX_EVENT_WAIT_S = 25.0
MAX_EVENT_WAITERS = 200
MAX_EVENTS_PER_ANSWER = 500
EVENT_LOG_SIZE = 10_000
LIVENESS_TICK_S = 1.0


@dataclass(frozen=True, slots=True)
class FleetEvent:
    seq: int
    type: str  # "queued" | "leases"
    instance_id: str | None
    worker_id: str | None  # queued: the instance's lease holder (None: none); leases: whom it concerns


class TooManyWaiters(Exception):
    pass


class BadCursor(ValueError):
    pass


Resync = Callable[[str | None, int], list[dict[str, Any]]]


class EventHub:
    """The change log and its waiters (one per proxy; used from the proxy's event loop only)."""

    def __init__(self, *, log_size: int = EVENT_LOG_SIZE, max_waiters: int = MAX_EVENT_WAITERS,
                 max_events: int = MAX_EVENTS_PER_ANSWER) -> None:
        self._boot = secrets.token_hex(4)
        self._log: deque[FleetEvent] = deque(maxlen=log_size)
        self._seq = 0
        self._changed: anyio.Event | None = None
        self.max_waiters = max_waiters
        self.max_events = max_events
        self.waiters = 0
        self._closed = False

    @property
    def cursor(self) -> str:
        return f"{self._boot}-{self._seq}"

    def publish(self, kind: str, instance_id: str | None = None, worker_id: str | None = None) -> None:
        self._seq += 1
        self._log.append(FleetEvent(self._seq, kind, instance_id, worker_id))
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def close(self) -> None:
        """The proxy stops: every waiter answers now (a long poll never holds up the stop)."""
        self._closed = True
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def _position(self, cursor: str | None) -> int | None:
        """The change number after which to look; None: the cursor is from another boot or too old."""
        if cursor is None:
            return self._seq
        boot, sep, raw = cursor.partition("-")
        if not sep or not raw.isdigit() or len(raw) > 18 or len(boot) > 32:
            raise BadCursor("cursor must be one this proxy gave")
        seq = int(raw)
        oldest = self._log[0].seq if self._log else self._seq + 1
        if boot != self._boot or seq > self._seq or seq < oldest - 1:
            return None
        return seq

    def _collect(self, worker: str | None, after: int) -> tuple[list[dict[str, Any]], int]:
        """The events after ``after`` for ``worker`` (at most ``max_events``), and the position reached."""
        out: list[dict[str, Any]] = []
        seen: set[tuple[str, str | None]] = set()
        pos = after
        fresh: list[FleetEvent] = []
        for ev in reversed(self._log):  # the new ones are at the end: cost of the news, not of the log
            if ev.seq <= after:
                break
            fresh.append(ev)
        for ev in reversed(fresh):
            if len(out) >= self.max_events:
                return out, pos  # the rest in the next answer
            pos = ev.seq
            mine = ev.worker_id == worker if ev.type == "leases" else worker is None or ev.worker_id == worker
            key = (ev.type, ev.instance_id)
            if mine and key not in seen:
                seen.add(key)
                out.append({"type": ev.type, "instanceId": ev.instance_id} if ev.instance_id else {"type": ev.type})
        return out, max(pos, self._seq)

    async def wait(self, worker: str | None, cursor: str | None, wait_s: float, *,
                   alive: Callable[[], bool], resync: Resync) -> dict[str, Any]:
        """``{"events": […], "cursor": …}`` as soon as there is something for ``worker``, else after
        ``wait_s`` (or when ``alive()`` turns false). Raises :class:`BadCursor`, :class:`TooManyWaiters`."""
        after = self._position(cursor)
        if after is None:
            after = self._seq
            found = resync(worker, self.max_events)
            if found:
                return {"events": found, "cursor": self.cursor}
        if self.waiters >= self.max_waiters:
            raise TooManyWaiters(f"{self.waiters} calls are waiting already")
        self.waiters += 1
        events: list[dict[str, Any]] = []
        try:
            with anyio.move_on_after(min(wait_s, MAX_EVENT_WAIT_S)):
                while True:
                    events, after = self._collect(worker, after)
                    if events or self._closed or not alive():
                        break
                    if self._changed is None:
                        self._changed = anyio.Event()
                    changed = self._changed
                    with anyio.move_on_after(LIVENESS_TICK_S):
                        await changed.wait()
            if not events:
                events, after = self._collect(worker, after)
            return {"events": events, "cursor": f"{self._boot}-{after}"}
        finally:
            self.waiters -= 1
