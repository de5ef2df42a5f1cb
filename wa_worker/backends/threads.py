"""Threads for blocking Go calls: dedicated connect threads, a bounded call pool,
and the gate that keeps goneonize's unlocked Go maps from crashing the process.

Why not ``asyncio.to_thread`` (what neonize's ``async_gocode`` does)? The
``Neonize()`` call blocks for the whole life of a connection, and a dial
through a stalled proxy blocks it for minutes; with the default executor
(``min(32, cpu+4)`` threads, 6 on 2 cores) six such clients starve every other
``to_thread`` user in the process. So:

* each connection attempt runs ``Neonize()`` in its **own daemon thread**
  (:func:`run_in_dedicated_thread`): N instances cost N threads, never a
  shared pool slot, and a stuck one cannot delay interpreter exit;
* short calls (send, is-connected, disconnect, stop) go to a **bounded pool**
  (:class:`CallPool`) with a per-call timeout and a per-session cap on
  in-flight calls, so one wedged instance holds at most ``per_key_limit``
  threads of the pool and its callers get a timeout instead of a hang.

:class:`GoMapGate` — goneonize 0.5.2 keeps its clients in plain Go maps
(``clients``, ``StopSignal``, ``eventChannel``) written by ``Neonize()``'s
prologue and by ``Stop()``, and read by every other exported call, without a
lock. A read racing a write kills the whole process with ``fatal error:
concurrent map read and map write`` (reproduced offline: 6 threads starting
clients + 6 threads calling ``IsConnected`` crash within seconds). The gate
serialises writers and keeps readers from *entering* Go while a writer is
inside; readers need not hold it for their whole call, because each exported
function reads the map in its first statement: a writer only waits until the
youngest reader entered at least ``settle_s`` ago.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def default_pool_size(cpu_count: int | None = None) -> int:
    """Short-call pool size: 4 per core, at least 8, at most 64.

    Short calls mostly wait on the network (a send waits for the server's ack),
    so more threads than cores is right; the cap bounds memory when many
    sessions are wedged at once (each holds at most ``per_key_limit``).
    """
    cpus = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    return max(8, min(64, 4 * cpus))


class GoMapGate:
    """Readers/writer gate around goneonize's unlocked Go maps (see module doc)."""

    def __init__(self, settle_s: float = 0.02) -> None:
        self.settle_s = settle_s
        self._cond = threading.Condition()
        self._writer = False
        self._last_reader_entry = 0.0

    def enter_reader(self, timeout: float | None = None) -> bool:
        """Wait until no writer is inside; return False on timeout."""
        with self._cond:
            if not self._cond.wait_for(lambda: not self._writer, timeout):
                return False
            self._last_reader_entry = time.monotonic()
            return True

    def acquire_writer(self, timeout: float | None = None) -> bool:
        """Become the only writer, then let readers that just entered get past
        their map read. Blocking: call from a worker thread, not the loop."""
        with self._cond:
            if not self._cond.wait_for(lambda: not self._writer, timeout):
                return False
            self._writer = True
            wait = self._last_reader_entry + self.settle_s - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        return True

    def release_writer(self) -> None:
        """Release (from any thread)."""
        with self._cond:
            self._writer = False
            self._cond.notify_all()

    @property
    def writer_inside(self) -> bool:
        return self._writer


class WriterHold:
    """One writer hold that may be released from any thread, exactly once."""

    def __init__(self, gate: GoMapGate) -> None:
        self._gate = gate
        self._lock = threading.Lock()
        self._held = False

    def acquire(self, timeout: float | None = None) -> bool:
        ok = self._gate.acquire_writer(timeout)
        with self._lock:
            self._held = ok
        return ok

    def release(self) -> bool:
        with self._lock:
            if not self._held:
                return False
            self._held = False
        self._gate.release_writer()
        return True


class CallTimeout(Exception):
    """A blocking call did not finish in time (its thread may still be busy)."""


class CallNotStarted(CallTimeout):
    """The call was refused before reaching Go (per-key cap reached, gate busy)."""


class CallPool:
    """Bounded thread pool for short blocking calls.

    * ``call(key, fn, timeout=...)`` runs ``fn`` in the pool and awaits it at most
      ``timeout`` seconds (the thread keeps running; Go calls cannot be killed).
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

    async def call(self, key: str, fn: Callable[[], T], *, timeout: float) -> T:
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
            return await asyncio.wait_for(asyncio.shield(afut), timeout)
        except asyncio.TimeoutError:
            raise CallTimeout(f"call of {key!r} took more than {timeout:g} s") from None

    def shutdown(self) -> None:
        """Stop accepting calls; never waits for (possibly stuck) threads."""
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)


def _consume(fut: asyncio.Future[Any]) -> None:
    # a caller that timed out no longer awaits: keep asyncio from warning later
    if not fut.cancelled():
        fut.exception()


def run_in_dedicated_thread(
    fn: Callable[[], T], *, name: str, loop: asyncio.AbstractEventLoop | None = None
) -> tuple[threading.Thread, asyncio.Future[T]]:
    """Run ``fn`` in a new daemon thread; return it and a loop future of its result.

    The future is resolved on ``loop`` (default: the running loop); if the loop
    is closed by then the result is dropped.
    """
    loop = loop or asyncio.get_running_loop()
    fut: asyncio.Future[Any] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if fut.done():
            return
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

    def body() -> None:
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting side
            outcome = (False, exc)
        else:
            outcome = (True, result)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:  # loop closed
            pass

    thread = threading.Thread(target=body, name=name, daemon=True)
    thread.start()
    return thread, fut
