"""Last-resort handling for long-running loops: no single bad response or bug
ends the process.

:func:`forever` runs a loop function; when it raises, the error is logged once
with its context (the traceback only the first time that error is seen), counted,
and the loop is started again after a clamped, jittered backoff. A loop that
returns has finished on purpose. Cancellation always passes straight through.

Each supervised loop has a :class:`LoopHealth`: the loop calls :meth:`LoopHealth.ok`
after every successful iteration, which is what ``/ready`` and ``/health`` report.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .timing import Backoff, Clock

log = logging.getLogger("wa_worker.supervise")

# a restarted loop without heartbeats counts as healthy again after this long without a new crash
SETTLE_S = 30.0
_SEEN_MAX = 512


@dataclass
class LoopHealth:
    """What readiness knows about one loop.

    ``stale_after_s``: the loop is not ready when its last success is older
    (``None``: the loop has no heartbeat; only its crashes count)."""

    name: str
    clock: Clock
    stale_after_s: float | None = None
    started_at: float | None = None
    last_ok: float | None = None
    last_failure_at: float | None = None
    last_error: str | None = None  # the exception's type name
    failures: int = 0
    finished: bool = False

    def ok(self) -> None:
        """One successful iteration."""
        self.last_ok = self.clock.monotonic()

    def record_failure(self, exc: BaseException) -> bool:
        """One failed iteration; True when it starts a failing episode (worth an ERROR line)."""
        news = not self.failing(self.clock.monotonic())
        self.failures += 1
        self.last_failure_at = self.clock.monotonic()
        # the type only: /ready and /health are unauthenticated, the message may name an instance
        self.last_error = type(exc).__name__
        return news

    def failing(self, now: float) -> bool:
        """Failed and not yet succeeded since."""
        if self.last_failure_at is None or self.finished:
            return False
        if self.last_ok is not None and self.last_ok > self.last_failure_at:
            return False
        if self.stale_after_s is None:  # no heartbeat: healthy once it has run a while without failing
            return now - self.last_failure_at < SETTLE_S
        return True

    def stale(self, now: float) -> bool:
        if self.stale_after_s is None or self.finished or self.started_at is None:
            return False
        since = self.last_ok if self.last_ok is not None else self.started_at
        return now - since > self.stale_after_s

    def not_ready_reason(self, now: float) -> str | None:
        if self.failing(now):
            return f"{self.name} loop failing: {self.last_error}"
        if self.stale(now):
            since = self.last_ok if self.last_ok is not None else self.started_at
            assert since is not None
            return f"{self.name} loop has not succeeded for {now - since:.0f}s"
        return None

    def describe(self, now: float) -> dict[str, Any]:
        return {
            "last_ok_age_s": None if self.last_ok is None else round(now - self.last_ok, 1),
            "failing": self.failing(now),
            "failures": self.failures,
            "finished": self.finished,
            **({"last_error": self.last_error} if self.last_error else {}),
        }


@dataclass
class _Seen:
    keys: set[tuple[str, ...]] = field(default_factory=set)

    def first(self, key: tuple[str, ...]) -> bool:
        if key in self.keys:
            return False
        if len(self.keys) >= _SEEN_MAX:
            self.keys.clear()
        self.keys.add(key)
        return True


_seen = _Seen()


def traceback_once(exc: BaseException) -> BaseException | None:
    """``exc`` the first time this error is seen (for ``exc_info``), else None.
    The same error is the same type raised from the same place, whichever loop
    or instance hit it (a bug shared by 1 000 instances logs one traceback)."""
    tb = traceback.extract_tb(exc.__traceback__)
    where = f"{tb[-1].filename}:{tb[-1].lineno}" if tb else "?"
    return exc if _seen.first((type(exc).__qualname__, where)) else None


def describe_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:200] if text else type(exc).__name__


def report_failure(health: LoopHealth | None, name: str, exc: BaseException, logger: logging.Logger) -> None:
    """A loop that handles its own failure (and retries) still tells readiness:
    one ERROR line when a failing episode starts, DEBUG while it lasts."""
    news = health.record_failure(exc) if health is not None else True
    logger.log(logging.ERROR if news else logging.DEBUG, "%s failing (%s); retrying", name, describe_error(exc))


def _recovered(health: LoopHealth | None, ran_s: float) -> bool:
    if ran_s >= SETTLE_S:
        return True
    return (health is not None and health.last_failure_at is not None and health.last_ok is not None
            and health.last_ok > health.last_failure_at)


async def forever(name: str, fn: Callable[[], Awaitable[None]], *, clock: Clock, backoff: Backoff,
                  health: LoopHealth | None = None, log_to: logging.Logger | None = None) -> None:
    """Run ``fn`` until it returns; restart it (after ``backoff``) whenever it raises.

    Only :class:`Exception` is caught: cancellation and ``KeyboardInterrupt``
    pass through untouched."""
    logger = log_to or log
    while True:
        started = clock.monotonic()
        if health is not None:
            health.started_at = started
        try:
            await fn()
        except Exception as exc:
            if _recovered(health, clock.monotonic() - started):
                backoff.reset()  # it had worked since the last crash: this is a new episode
            delay = backoff.next_delay()
            what = describe_error(exc)
            if health is not None:
                health.record_failure(exc)
            # one line with context every time; the traceback once per distinct error
            logger.error("%s loop failed (%s); restarting it in %.1fs", name, what, delay,
                         exc_info=traceback_once(exc))
            await clock.sleep(delay)
            continue
        if health is not None:
            health.finished = True
        return
