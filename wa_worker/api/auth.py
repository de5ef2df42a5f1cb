"""Who may call the direct API, and how often.

A client sends ``Authorization: Bearer <API_TOKEN>`` or ``x-api-key: <API_TOKEN>``.
Every configured token is compared in constant time (both sides hashed first, so
neither content nor length leaks), and every token has its own token bucket:
``API_RATE_PER_MINUTE`` a minute, bursts of a sixth of it; beyond, ``429`` with
``Retry-After``. ``WORKER_SECRET`` is never accepted here (the settings refuse
an API token equal to it).
"""

from __future__ import annotations

import hashlib
import hmac
import math
from dataclasses import dataclass, field

from aiohttp import web

from ..timing import Clock


def presented_token(request: web.BaseRequest) -> bytes | None:
    """The credential the request carries (bearer first, then ``x-api-key``), or None."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip().encode("utf-8", "surrogateescape")
    key = request.headers.get("x-api-key", "").strip()
    return key.encode("utf-8", "surrogateescape") if key else None


class TokenSet:
    """The configured tokens; :meth:`match` names the one presented (its index), in constant time."""

    def __init__(self, tokens: tuple[str, ...]) -> None:
        self._digests = [hashlib.sha256(t.encode()).digest() for t in tokens]

    def match(self, given: bytes | None) -> int | None:
        if given is None:
            return None
        digest = hashlib.sha256(given).digest()
        found = None
        for i, known in enumerate(self._digests):  # every token compared: no early exit to time
            if hmac.compare_digest(digest, known):
                found = i
        return found


@dataclass
class _Bucket:
    tokens: float
    at: float


@dataclass
class RateLimiter:
    """A token bucket per API token: ``per_minute`` a minute, holding at most ``burst``."""

    per_minute: int
    clock: Clock = field(default_factory=Clock)
    _buckets: dict[int, _Bucket] = field(default_factory=dict)

    @property
    def burst(self) -> int:
        return max(1, math.ceil(self.per_minute / 6))

    def take(self, who: int) -> float:
        """0 when ``who`` may go now (one request is counted), else the seconds until it may."""
        now = self.clock.monotonic()
        rate = self.per_minute / 60.0
        bucket = self._buckets.setdefault(who, _Bucket(float(self.burst), now))
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.at) * rate)
        bucket.at = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / rate
