"""Pacing of new connection attempts by what the process and the proxy take.

``START_CONCURRENCY`` bounds how many sessions *connect* at once; it says
nothing about what each connection then costs (a status push, a QR to render,
polls). :class:`StartPacer` admits the next attempt only while the event loop
keeps up (its lag, sampled every ``tick_s``, is under ``lag_limit_s``) and the
proxy keeps up (fewer than ``backlog_limit`` calls waiting for a connection).
Without its monitor running it admits everything (tests, small workers).
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable

import anyio

log = logging.getLogger("wa_worker.manager")

LAG_LIMIT_S = 0.02
TICK_S = 0.05
# how long an overload keeps the gate shut after its last sample (decay of the peak)
HOLD_S = 0.2


class StartPacer:
    def __init__(self, *, lag_limit_s: float = LAG_LIMIT_S, tick_s: float = TICK_S,
                 backlog: Callable[[], int] | None = None, backlog_limit: int = 64,
                 gc_freezer: GcFreezer | None = None) -> None:
        self.gc = gc_freezer or GcFreezer()
        self.lag_limit_s = lag_limit_s
        self.tick_s = tick_s
        self.backlog = backlog
        self.backlog_limit = backlog_limit
        self.lag_s = 0.0
        self.held = 0  # admissions that had to wait (counted once each)
        self._busy_until = 0.0
        self._open = anyio.Event()
        self._open.set()

    def overloaded(self) -> bool:
        return not self._open.is_set()

    async def run(self) -> None:
        """The monitor: sample the loop's lag and the proxy backlog until cancelled."""
        try:
            await self._monitor()
        finally:
            self.gc.release()
            self._open.set()  # nobody waits on a gate nobody opens

    async def _monitor(self) -> None:
        while True:
            t0 = time.monotonic()
            await anyio.sleep(self.tick_s)
            now = time.monotonic()
            self.lag_s = max(0.0, now - t0 - self.tick_s)
            self.gc.tick()
            busy = self.lag_s > self.lag_limit_s or (
                self.backlog is not None and self.backlog() > self.backlog_limit)
            if busy:
                self._busy_until = now + HOLD_S
            if now < self._busy_until:
                if self._open.is_set():
                    self._open = anyio.Event()
            elif not self._open.is_set():
                self._open.set()

    async def admit(self, interrupt: anyio.Event) -> None:
        """Return once the process and the proxy can take one more connection, or
        as soon as ``interrupt`` is set (a stop)."""
        if self._open.is_set():
            return
        self.held += 1
        while not self._open.is_set() and not interrupt.is_set():
            with anyio.move_on_after(self.tick_s):
                await self._open.wait()


FREEZE_EVERY_S = 1.0
UNFREEZE_EVERY_S = 3600.0


class GcFreezer:
    """Keeps garbage collections short with thousands of instances.

    A full (generation 2) collection scans every tracked object: with 2,000
    runners (~450,000 objects) it stalled the event loop for 40-250 ms, several
    times while they paired. So while objects keep surviving young collections
    (at most every ``FREEZE_EVERY_S``), the young generations are collected and
    every survivor is frozen (``gc.freeze``): full collections then scan only
    what came later, which stays small. Every ``UNFREEZE_EVERY_S`` everything is
    unfrozen, so objects that died since they were frozen (an ended runner) are
    still collected, by one full collection an hour.
    """

    def __init__(self, *, freeze_every_s: float = FREEZE_EVERY_S,
                 unfreeze_every_s: float = UNFREEZE_EVERY_S) -> None:
        self.freeze_every_s = freeze_every_s
        self.unfreeze_every_s = unfreeze_every_s
        self.freezes = 0
        self._last_freeze = 0.0
        self._gen1_seen = 0
        self._frozen_since: float | None = None

    def tick(self) -> None:
        now = time.monotonic()
        if self._frozen_since is not None and now - self._frozen_since > self.unfreeze_every_s:
            gc.unfreeze()
            self._frozen_since = None
            return
        gen1 = gc.get_stats()[1]["collections"]
        if gen1 == self._gen1_seen or now - self._last_freeze < self.freeze_every_s:
            return
        self._gen1_seen = gen1  # young survivors moved on to generation 2 since the last look
        gc.collect(1)
        gc.freeze()
        self.freezes += 1
        self._last_freeze = now
        if self._frozen_since is None:
            self._frozen_since = now

    def release(self) -> None:
        if self._frozen_since is not None:
            gc.unfreeze()
            self._frozen_since = None
