"""The optional push channel: one ``GET /events`` long poll per worker
(docs/proxy-contract.md, "GET /events").

A ``queued`` event wakes that instance's outbound poll at once (the path
``/wake`` takes), a ``leases`` event asks for a lease renewal now. While the
channel answers, idle polls back off to :data:`PUSH_IDLE_POLL_MAX_S` instead of
``MSG_POLL_MAX_MS`` (a safety net for a missed event); when it stops answering,
every instance is woken once and polling returns to its normal cap. A proxy
without ``/events`` (404/405/501) switches it off for good: one INFO line,
polling and ``/wake`` exactly as before. A cursor the proxy refuses (a 4xx such
as 400) is dropped: the next call starts afresh (the proxy resyncs).

Whatever the proxy answers, the worker is safe: the answer is capped (1 MiB,
``wait`` + ``EDGE_TIMEOUT_S``), read tolerantly, an empty answer that comes back
at once backs off (1 s … 60 s), answers with events that keep coming at once
are spaced from :data:`EVENTS_MIN_GAP_S` up to :data:`EVENTS_MAX_GAP_S`, and
errors back off like every proxy call.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable

from ..edge.client import EdgeClient, EdgeError, EndpointMissing
from ..edge.events import PushEvents
from ..supervise import LoopHealth
from ..timing import Backoff, Clock, backoff_raw

log = logging.getLogger("wa_worker.push")

PUSH_WAIT_S = 25.0  # the contract's longest wait (a proxy may hold the call less)
# idle per-instance (and batch) polls while the channel is live: 12 an hour instead of 60
PUSH_IDLE_POLL_MAX_S = 300.0
# answers with events that come back at once: the next call waits 0.1 s, then 0.2, 0.4 … 2 s while
# they keep coming at once (a held answer resets it); at 2 s the instances poll at MSG_POLL_MS anyway
EVENTS_MIN_GAP_S = 0.1
EVENTS_MAX_GAP_S = 2.0
FAST_EMPTY_S = 1.0  # an empty answer sooner than this (or half the wait): the proxy does not hold the call


# 4xx answers that say nothing about the cursor (auth, timeouts, rate limits)
_NOT_THE_CURSOR = frozenset({401, 403, 407, 408, 425, 429})


def _nothing() -> None:
    return None


class PushChannel:
    """The ``/events`` loop. ``on_queued(instance_id)`` wakes an instance,
    ``on_leases()`` renews leases now, ``on_lost()`` wakes everything after the
    channel stopped answering (at most once per ``idle_poll_max_s``).

    ``worker_id``: sent as ``X-Worker-Id`` while leases are on (then the proxy
    answers only for the instances this worker holds); None without leases (the
    proxy answers for every instance, a single worker's view). Whoever turns leases
    on or off sets it."""

    def __init__(self, edge: EdgeClient, *, worker_id: str | None, clock: Clock, on_queued: Callable[[str], object],
                 on_leases: Callable[[], object] = _nothing, on_lost: Callable[[], object] = _nothing,
                 wait_s: float = PUSH_WAIT_S, idle_poll_max_s: float = PUSH_IDLE_POLL_MAX_S,
                 rng: random.Random | None = None) -> None:
        self.edge = edge
        self.worker_id = worker_id
        self.clock = clock
        self.on_queued = on_queued
        self.on_leases = on_leases
        self.on_lost = on_lost
        self.wait_s = wait_s
        self.idle_poll_max_s = idle_poll_max_s
        self.rng = rng or random.Random()
        self.supported: bool | None = None  # None: not asked yet
        self.live = False  # the last call was answered
        self.cursor: str | None = None
        self.events: Counter[str] = Counter()  # queued / leases events acted on
        self._last_lost: float | None = None
        self.health = LoopHealth("push", clock, stale_after_s=3 * (wait_s + edge.timeout_s))

    def idle_cap(self) -> float | None:
        """The longest idle poll interval now: longer while the channel is live (None: the usual one)."""
        return self.idle_poll_max_s if self.live else None

    async def run(self) -> None:
        errors = Backoff(1.0, 60.0, rng=self.rng)
        quick = Backoff(1.0, 60.0, rng=self.rng)  # empty answers that came back at once
        instant = 0  # answers with events in a row that came back at once
        while True:
            started = self.clock.monotonic()
            try:
                answer = await self.edge.events(wait_s=self.wait_s, cursor=self.cursor, worker_id=self.worker_id)
            except EndpointMissing as exc:
                log.info("the proxy has no GET /events (HTTP %s): push off; polling and /wake as before",
                         exc.status)
                self.supported = False
                self._set_live(False)
                self.health.finished = True
                return
            except EdgeError as exc:
                self._set_live(False)
                self.health.ok()  # the proxy's reachability is /ready's edge check, not this loop's
                if exc.status is not None and 400 <= exc.status < 500 and exc.status not in _NOT_THE_CURSOR:
                    self.cursor = None  # e.g. 400 "cursor must be one this proxy gave": start afresh
                # a Retry-After is honoured up to the backoff's cap (the loop stays fresh for /ready)
                await self.clock.sleep(min(max(errors.next_delay(), exc.retry_after_s or 0.0), errors.cap_s))
                continue
            errors.reset()
            if self.supported is None:
                log.info("push channel on: GET /events long polls (wait %gs); idle polls back off to %gs",
                         self.wait_s, self.idle_poll_max_s)
            self.supported = True
            self._set_live(True)
            self.health.ok()
            self._dispatch(answer)
            elapsed = self.clock.monotonic() - started
            if answer.empty and elapsed < min(FAST_EMPTY_S, self.wait_s / 2):
                await self.clock.sleep(quick.next_delay())
                continue
            quick.reset()
            if elapsed >= EVENTS_MIN_GAP_S:
                instant = 0  # the proxy held the call: events as they come
            else:
                await self.clock.sleep(backoff_raw(instant, EVENTS_MIN_GAP_S, EVENTS_MAX_GAP_S) - elapsed)
                instant += 1

    def _dispatch(self, answer: PushEvents) -> None:
        if answer.cursor is not None:
            self.cursor = answer.cursor
        for iid in sorted(answer.queued):
            self.events["queued"] += 1
            self.on_queued(iid)
        if answer.leases:
            self.events["leases"] += 1
            self.on_leases()

    def _set_live(self, live: bool) -> None:
        was, self.live = self.live, live
        if was and not live:
            now = self.clock.monotonic()
            if self._last_lost is None or now - self._last_lost >= self.idle_poll_max_s:
                self._last_lost = now
                log.info("push channel not answering: every instance polls now, then at its usual interval")
                self.on_lost()
