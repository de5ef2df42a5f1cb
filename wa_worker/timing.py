"""Time, backoff and adaptive intervals — injected so tests run the real code fast."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import anyio


class Clock:
    """Real time. Tests pass a subclass that advances instantly."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(max(0.0, seconds))

    async def wait(self, event: anyio.Event, seconds: float) -> bool:
        """Wait for ``event`` at most ``seconds``; True if it was set."""
        with anyio.move_on_after(max(0.0, seconds)):
            await event.wait()
            return True
        return False


def backoff_raw(attempt: int, base_s: float, cap_s: float, factor: float = 2.0) -> float:
    """``min(cap, base * factor**attempt)`` without ever overflowing: past the
    attempt that reaches the cap the exponent is not computed at all."""
    if base_s <= 0 or cap_s <= 0:
        return 0.0
    if base_s >= cap_s:
        return cap_s
    if factor <= 1.0:
        return base_s
    if attempt >= math.log(cap_s / base_s, factor):
        return cap_s
    return min(cap_s, base_s * factor ** max(0, attempt))


def _jitter(raw: float, rng: random.Random | None) -> float:
    return raw / 2 + (rng or random).random() * raw / 2


@dataclass(slots=True)
class Backoff:
    """Exponential backoff with full jitter in [delay/2, delay], reset on success.
    Clamped: any number of attempts gives at most ``cap_s``."""

    base_s: float = 1.0
    cap_s: float = 60.0
    factor: float = 2.0
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def next_delay(self) -> float:
        raw = backoff_raw(self.attempt, self.base_s, self.cap_s, self.factor)
        self.attempt += 1
        return _jitter(raw, self.rng)

    def reset(self) -> None:
        self.attempt = 0


def backoff_delay(attempt: int, base_s: float, cap_s: float, rng: random.Random | None = None) -> float:
    """Stateless form for rows in a table: the delay before retry number ``attempt`` (0-based)."""
    return _jitter(backoff_raw(attempt, base_s, cap_s), rng)


@dataclass(slots=True)
class AdaptiveInterval:
    """A poll interval that doubles after each idle poll, up to a cap, and
    snaps back to the floor on any sign of activity."""

    floor_s: float
    cap_s: float
    current_s: float = 0.0

    def __post_init__(self) -> None:
        self.current_s = self.floor_s

    def idle(self, cap_s: float | None = None) -> float:
        """An empty poll: return the wait before the next one, then grow (up to
        ``cap_s`` when given, e.g. longer while work is pushed, else ``self.cap_s``)."""
        cap = self.cap_s if cap_s is None else cap_s
        wait = min(self.current_s, cap)
        self.current_s = min(cap, self.current_s * 2)
        return wait

    def activity(self) -> None:
        self.current_s = self.floor_s

    def busy(self) -> float:
        """A non-empty poll: poll again at the floor."""
        self.activity()
        return self.floor_s


class MinGap:
    """At most one pass every ``gap_s`` of real time: a loop woken by bursts
    (every received message, every finished post) looks at its table once per
    gap instead of once per wake-up."""

    def __init__(self, gap_s: float) -> None:
        self.gap_s = gap_s
        self._last = -math.inf

    async def wait(self) -> None:
        gap = self._last + self.gap_s - time.monotonic()
        if gap > 0:
            await anyio.sleep(gap)
        self._last = time.monotonic()
