"""The gate around goneonize's unlocked Go maps: a call racing a client start
or stop kills the process (docs/neonize.md, "The Go map race")."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from .threads import CallNotStarted, CallPool


class GoMapGate:
    """Readers/writer gate around goneonize's unlocked Go maps (see module doc and docs/neonize.md)."""

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



#: Go maps are process-wide, so the gate is too (shared by every backend).
GO_GATE = GoMapGate()


async def gated_call(
    pool: CallPool,
    key: str,
    name: str,
    fn: Callable[[], Any],
    *,
    timeout_s: float,
    gate_timeout: float,
    writer: bool = False,
) -> Any:
    """Run a short Go call in ``pool`` under ``key``, entering Go through the gate
    (as a writer for calls that add or remove clients, e.g. ``Stop``)."""

    def gated() -> Any:
        if writer:
            hold = WriterHold(GO_GATE)
            if not hold.acquire(timeout=gate_timeout):
                raise CallNotStarted(f"{name}: go map gate busy")
            try:
                return fn()
            finally:
                hold.release()
        if not GO_GATE.enter_reader(timeout=gate_timeout):
            raise CallNotStarted(f"{name}: go map gate busy")
        return fn()

    return await pool.call(key, gated, timeout_s=timeout_s)
