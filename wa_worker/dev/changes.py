"""Change notifications of the dev store: what lets the dev page update from a stream instead of
polling (``GET /ui/events``, :mod:`.page`).

Every write to the :class:`~wa_worker.dev.store.DevStore` bumps :attr:`ChangeFeed.version`,
from whatever thread wrote (the proxy's loop, a test, a CLI helper); streams wait for the
version to move past the one they last sent, on their own event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

import anyio


class ChangeFeed:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.version = 0
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    def bump(self) -> None:
        """Something changed (any thread)."""
        with self._lock:
            self.version += 1
            waiters = list(self._waiters)
        for loop, event in waiters:
            with contextlib.suppress(RuntimeError):  # that loop has closed: its stream is gone
                loop.call_soon_threadsafe(event.set)

    async def wait_past(self, version: int, timeout_s: float) -> int:
        """The version once it is past ``version``, or after ``timeout_s`` whatever it is."""
        event = asyncio.Event()
        waiter = (asyncio.get_running_loop(), event)
        with self._lock:
            if self.version > version:
                return self.version
            self._waiters.add(waiter)
        try:
            with anyio.move_on_after(timeout_s):
                await event.wait()
        finally:
            with self._lock:
                self._waiters.discard(waiter)
        return self.version
