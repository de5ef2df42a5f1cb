"""Time, backoff and adaptive intervals — injected so tests run the real code fast."""

from __future__ import annotations

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

    async def wait(self, event: anyio.Event, timeout: float) -> bool:
        """Wait for ``event`` at most ``timeout`` seconds; True if it was set."""
        with anyio.move_on_after(max(0.0, timeout)):
            await event.wait()
            return True
        return False


@dataclass(slots=True)
class Backoff:
    """Exponential backoff with full jitter in [delay/2, delay], reset on success."""

    base_s: float = 1.0
    cap_s: float = 60.0
    factor: float = 2.0
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def next_delay(self) -> float:
        raw = min(self.cap_s, self.base_s * (self.factor**self.attempt))
        self.attempt += 1
        return raw / 2 + self.rng.random() * raw / 2

    def reset(self) -> None:
        self.attempt = 0


def backoff_delay(attempt: int, base_s: float, cap_s: float, rng: random.Random | None = None) -> float:
    """Stateless form for rows in a table: the delay before retry number ``attempt`` (0-based)."""
    raw = min(cap_s, base_s * (2 ** min(attempt, 30)))
    r = (rng or random).random()
    return raw / 2 + r * raw / 2


@dataclass(slots=True)
class AdaptiveInterval:
    """A poll interval that doubles after each idle poll, up to a cap, and
    snaps back to the floor on any sign of activity."""

    floor_s: float
    cap_s: float
    current_s: float = 0.0

    def __post_init__(self) -> None:
        self.current_s = self.floor_s

    def idle(self) -> float:
        """An empty poll: return the wait before the next one, then grow."""
        wait = self.current_s
        self.current_s = min(self.cap_s, self.current_s * 2)
        return wait

    def activity(self) -> None:
        self.current_s = self.floor_s

    def busy(self) -> float:
        """A non-empty poll: poll again at the floor."""
        self.activity()
        return self.floor_s
