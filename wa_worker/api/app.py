"""The direct API (issue #15), mounted under ``/api/`` only when ``API_TOKEN`` is set.

The sub-app has its own middlewares: the API token and its rate limit
(:mod:`.auth`), then one error shape for everything it answers, including
aiohttp's own 404/405 and the shared body reader's 400/408/413
(:mod:`.errors`). The parent app's ``WORKER_SECRET`` check does not apply here:
the proxy's secret is not a client credential.

Routes: docs/api.md.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from ..timing import Clock
from .auth import RateLimiter, TokenSet, presented_token
from .errors import api_error_body

log = logging.getLogger("wa_worker.api")

MOUNT_AT = "/api/"

_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
          408: "request_timeout", 409: "conflict", 413: "too_large", 415: "unsupported_media_type",
          422: "invalid", 429: "rate_limited", 503: "unavailable"}


def _as_api_error(exc: web.HTTPException) -> web.HTTPException:
    """``exc`` with the API's error body (an exception that already has it is returned as is)."""
    try:
        body: Any = json.loads(exc.text or "")
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return exc
    message = body["error"] if isinstance(body, dict) and isinstance(body.get("error"), str) else exc.reason
    code = _CODES.get(exc.status, "error")
    exc.text = json.dumps(api_error_body(code, message), ensure_ascii=False)
    exc.content_type = "application/json"
    return exc


@dataclass
class ApiStats:
    """What the door saw: requests let in, refusals by reason (``/health`` and ``/metrics``)."""

    allowed: int = 0
    refused: Counter[str] = field(default_factory=Counter)  # unauthorized | rate_limited

    def as_dict(self) -> dict[str, Any]:
        return {"allowed": self.allowed, "refused": dict(self.refused)}


STATS = web.AppKey("api_stats", ApiStats)


def _json(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(api_error_body(code, message), status=status, headers=headers)


def build_api_app(tokens: tuple[str, ...], *, per_minute: int, clock: Clock | None = None,
                  max_body: int = 64 * 1024 * 1024, stats: ApiStats | None = None) -> web.Application:
    """The ``/api/`` sub-app with auth, rate limit and error shape (its counters: ``app[STATS]``);
    routes are added by their modules."""
    known = TokenSet(tokens)
    limiter = RateLimiter(per_minute, clock or Clock())
    stats = stats if stats is not None else ApiStats()

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        who = known.match(presented_token(request))
        if who is None:
            stats.refused["unauthorized"] += 1
            return _json(401, "unauthorized", "send Authorization: Bearer <API_TOKEN> or x-api-key: <API_TOKEN>",
                         {"WWW-Authenticate": 'Bearer realm="wa-worker"'})
        wait_s = limiter.take(who)
        if wait_s > 0:
            stats.refused["rate_limited"] += 1
            return _json(429, "rate_limited", f"more than {per_minute} requests a minute for this token",
                         {"Retry-After": str(max(1, int(wait_s + 0.999)))})
        stats.allowed += 1
        return await handler(request)

    @web.middleware
    async def error_shape(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status >= 400:
                raise _as_api_error(exc) from None
            raise

    app = web.Application(client_max_size=max_body, middlewares=[error_shape, authenticate])
    app[STATS] = stats
    return app
