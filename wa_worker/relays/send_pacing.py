"""Per-instance send pacing (issue #12): a minimum gap between sends with
jitter, per-minute and per-day caps, and how long to show "typing…" before a
text. Global defaults come from the environment; an instance's discovery item
may override them (its ``settings`` object, docs/proxy-contract.md). Time comes
from the injected clock, so tests run on a fake one.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..timing import Clock

MINUTE_S = 60.0
DAY_S = 86400.0
TYPING_CHARS_PER_S = 20.0
TYPING_MIN_S = 1.0
TYPING_CAP_S = 25.0  # whatever typing_max_s says (WhatsApp hides "typing…" after ~25 s anyway)
# the largest value an instance's settings may give each field (larger: ignored)
_MAXIMA = {"min_gap_ms": 3_600_000, "jitter_ms": 3_600_000, "max_per_minute": 10**6, "max_per_day": 10**8,
           "typing_max_s": TYPING_CAP_S}


@dataclass(frozen=True, slots=True)
class SendLimits:
    """0 in a cap means "no cap"."""

    min_gap_ms: int = 0
    jitter_ms: int = 0
    max_per_minute: int = 0
    max_per_day: int = 0
    typing: bool = False
    typing_max_s: float = 5.0

    # the discovery item's ``settings`` keys and the fields they set
    KEYS = {"send_min_gap_ms": "min_gap_ms", "send_jitter_ms": "jitter_ms", "send_max_per_minute": "max_per_minute",
            "send_max_per_day": "max_per_day", "typing_indicator": "typing", "typing_max_s": "typing_max_s"}

    def overridden(self, settings: dict[str, Any]) -> "SendLimits":
        """These limits with an instance's own settings applied (unknown keys and bad values ignored)."""
        changes: dict[str, Any] = {}
        for key, name in self.KEYS.items():
            value = settings.get(key)
            if name == "typing":
                if isinstance(value, bool):
                    changes[name] = value
            elif isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= _MAXIMA[name]:
                changes[name] = float(value) if name == "typing_max_s" else int(value)
        return replace(self, **changes)

    def typing_s(self, text: str) -> float:
        """How long to show typing before ``text`` (0: not at all)."""
        if not self.typing or not text:
            return 0.0
        longest = min(self.typing_max_s, TYPING_CAP_S)
        return round(min(longest, max(TYPING_MIN_S, len(text) / TYPING_CHARS_PER_S)), 2)


class SendPacer:
    """One instance's sends: what may go now, and how long to wait before the next."""

    def __init__(self, limits: SendLimits, clock: Clock, rng: random.Random | None = None, *,
                 sent_at: Sequence[float] = ()) -> None:
        self.limits = limits
        self.clock = clock
        self.rng = rng or random.Random()
        # send times (monotonic) within the last day; ``sent_at``: earlier ones, wall-clock (from the journal)
        offset = clock.monotonic() - clock.time()
        self._sent: deque[float] = deque(t + offset for t in sent_at)
        self._last: float | None = self._sent[-1] if self._sent else None

    def _prune(self, now: float) -> None:
        while self._sent and self._sent[0] <= now - DAY_S:
            self._sent.popleft()

    def allowance(self) -> int | None:
        """How many messages the caps allow now (None: no cap)."""
        now = self.clock.monotonic()
        self._prune(now)
        room: list[int] = []
        if self.limits.max_per_day > 0:
            room.append(self.limits.max_per_day - len(self._sent))
        if self.limits.max_per_minute > 0:
            room.append(self.limits.max_per_minute - sum(1 for t in self._sent if t > now - MINUTE_S))
        return max(0, min(room)) if room else None

    def wait_until_allowed_s(self) -> float:
        """Seconds until the caps allow one more send (0 when they do now)."""
        if self.allowance() != 0:
            return 0.0
        now = self.clock.monotonic()
        waits = []
        if self.limits.max_per_minute > 0:
            recent = [t for t in self._sent if t > now - MINUTE_S]
            if len(recent) >= self.limits.max_per_minute:
                waits.append(recent[-self.limits.max_per_minute] + MINUTE_S - now)
        if self.limits.max_per_day > 0 and len(self._sent) >= self.limits.max_per_day:
            waits.append(self._sent[-self.limits.max_per_day] + DAY_S - now)
        return max(0.0, max(waits, default=0.0))

    async def gap(self) -> None:
        """Wait out the minimum gap (plus jitter) since the last send."""
        if self._last is None or self.limits.min_gap_ms <= 0 and self.limits.jitter_ms <= 0:
            return
        gap_s = (self.limits.min_gap_ms + self.rng.uniform(0, self.limits.jitter_ms)) / 1000
        left = self._last + gap_s - self.clock.monotonic()
        if left > 0:
            await self.clock.sleep(left)

    def sent(self) -> None:
        now = self.clock.monotonic()
        self._sent.append(now)
        self._last = now
