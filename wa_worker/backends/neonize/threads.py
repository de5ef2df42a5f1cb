"""Threads for blocking Go calls: one dedicated thread per connection attempt
and a bounded pool for short calls (why: docs/neonize.md, "Threads")."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import anyio.from_thread
from anyio.lowlevel import EventLoopToken

T = TypeVar("T")


def default_pool_size(cpu_count: int | None = None) -> int:
    """Short-call pool size: 4 per core, at least 8, at most 64.

    Short calls mostly wait on the network (a send waits for the server's ack),
    so more threads than cores is right; the cap bounds memory when many
    sessions are wedged at once (each holds at most ``per_key_limit``).
    """
    cpus = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    return max(8, min(64, 4 * cpus))


class CallTimeout(Exception):
    """A blocking call did not finish in time (its thread may still be busy)."""


class CallNotStarted(CallTimeout):
    """The call was refused before reaching Go (per-key cap reached, gate busy)."""


class CallPool:
    """Bounded thread pool for short blocking calls.

    * ``call(key, fn, timeout_s=...)`` runs ``fn`` in the pool and awaits it at most
      ``timeout_s`` seconds (the thread keeps running; Go calls cannot be killed).
    * at most ``per_key_limit`` calls per key are *running or stuck* at once; the
      slot is released when the thread really finishes, not when the caller
      gives up, so a wedged session cannot eat the pool.
    """

    def __init__(self, max_workers: int, *, per_key_limit: int = 2, name: str = "wa-go") -> None:
        self.max_workers = max_workers
        self.per_key_limit = per_key_limit
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix=name
        )
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = {}
        self._closed = False

    def in_flight(self, key: str) -> int:
        with self._lock:
            return self._in_flight.get(key, 0)

    async def call(self, key: str, fn: Callable[[], T], *, timeout_s: float) -> T:
        if self._closed:
            raise RuntimeError("call pool is closed")
        with self._lock:
            if self._in_flight.get(key, 0) >= self.per_key_limit:
                raise CallNotStarted(f"{self.per_key_limit} calls of {key!r} already in flight")
            self._in_flight[key] = self._in_flight.get(key, 0) + 1

        def release(_: object) -> None:
            with self._lock:
                left = self._in_flight.get(key, 1) - 1
                if left <= 0:
                    self._in_flight.pop(key, None)
                else:
                    self._in_flight[key] = left

        try:
            cfut = self._executor.submit(fn)
        except RuntimeError:
            release(None)
            raise
        cfut.add_done_callback(release)
        afut = asyncio.wrap_future(cfut)
        afut.add_done_callback(_consume)
        try:
            return await asyncio.wait_for(asyncio.shield(afut), timeout_s)
        except asyncio.TimeoutError:
            raise CallTimeout(f"call of {key!r} took more than {timeout_s:g} s") from None

    def shutdown(self) -> None:
        """Stop accepting calls; never waits for (possibly stuck) threads."""
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)


def _consume(fut: asyncio.Future[Any]) -> None:
    # a caller that timed out no longer awaits: keep asyncio from warning later
    if not fut.cancelled():
        fut.exception()


def run_in_dedicated_thread(
    fn: Callable[[], T],
    *,
    name: str,
    on_done: Callable[[bool, Any], Coroutine[Any, Any, None]],
    token: EventLoopToken,
) -> threading.Thread:
    """Run ``fn`` in a new daemon thread; when it ends, the thread awaits
    ``on_done(ok, result or exception)`` on the event loop of ``token`` (skipped
    if that loop is gone), then exits."""

    def body() -> None:
        try:
            outcome: tuple[bool, Any] = (True, fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the loop side
            outcome = (False, exc)
        try:
            anyio.from_thread.run(on_done, *outcome, token=token)
        except Exception:  # noqa: BLE001 - loop closed or its task cancelled: end quietly
            pass

    thread = threading.Thread(target=body, name=name, daemon=True)
    thread.start()
    return thread
