"""The worker's own HTTP server (aiohttp): health, readiness, wake-up and ``/metrics``.

Unauthenticated output carries counts only: no instance ids, phone numbers,
QR codes or secrets. Everything else — including routes mounted later, such
as the simulator's controls (:mod:`wa_worker.http.simulator_routes`) — requires
``Authorization: Bearer $WORKER_SECRET`` (``/metrics`` too: instance counts
by state and error codes are nobody else's business; :func:`build_metrics_app`
serves it without auth on a separate, private port).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from aiohttp import web
from aiohttp.typedefs import Handler

from ..ids import is_valid_instance_id
from .common import bearer_matches, json_response, read_json_object
from .guard import ConnectionGuard

log = logging.getLogger("wa_worker.http")

MAX_BODY = 64 * 1024
PUBLIC_PATHS = frozenset({"/", "/health", "/ready"})


class WorkerView(Protocol):
    """What the server needs from the worker."""

    def health(self) -> dict[str, Any]: ...

    def not_ready_reasons(self) -> list[str]: ...

    def loop_ages(self) -> dict[str, Any]: ...

    def wake(self, instance_id: str | None = None) -> int: ...


Metrics = tuple[Callable[[], bytes], str]  # the Prometheus text and its content type


def _metrics_handler(metrics: Metrics) -> Callable[[web.Request], Any]:
    render, content_type = metrics

    async def handler(_: web.Request) -> web.Response:
        return web.Response(body=render(), headers={"Content-Type": content_type})

    return handler


def build_app(view: WorkerView, secret: str, *, guard: ConnectionGuard | None = None,
              metrics: Metrics | None = None, api: tuple[str, web.Application] | None = None) -> web.Application:
    """The app; with ``guard``, its middleware comes first and health shows its counters;
    with ``metrics``, ``GET /metrics`` (bearer) serves them; ``api`` (prefix, sub-app) is
    mounted there and its routes skip the ``WORKER_SECRET`` check: the sub-app has its own."""
    secret_bytes = secret.encode()

    @web.middleware
    async def require_bearer(request: web.Request, handler: Handler) -> web.StreamResponse:
        if (request.path in PUBLIC_PATHS or bearer_matches(request, secret_bytes)
                or (api is not None and api[1] in request.match_info.apps)):
            return await handler(request)
        return json_response({"error": "unauthorized"}, 401)

    middlewares = [guard.middleware] if guard is not None else []
    app = web.Application(client_max_size=MAX_BODY, middlewares=[*middlewares, require_bearer])

    async def health(_: web.Request) -> web.Response:
        data = view.health()
        if guard is not None:
            data["http"] = guard.stats()
        return json_response(data)

    async def ready(_: web.Request) -> web.Response:
        reasons = view.not_ready_reasons()
        loops = view.loop_ages()  # each supervised loop's last success age (names and counts only)
        if reasons:
            return json_response({"status": "not_ready", "reasons": reasons, "loops": loops}, 503)
        return json_response({"status": "ready", "loops": loops})

    async def wake(request: web.Request) -> web.Response:
        data = await read_json_object(request, max_bytes=MAX_BODY, allow_empty=True)
        iid = data.get("instanceId")
        if iid is not None and not is_valid_instance_id(iid):
            return json_response({"error": "invalid instanceId"}, 400)
        woken = view.wake(iid)
        return json_response({"ok": True, "woken": woken}, 202)

    app.router.add_get("/", health)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_post("/wake", wake)
    if metrics is not None:
        app.router.add_get("/metrics", _metrics_handler(metrics))
    if api is not None:
        app.add_subapp(*api)
    return app


def build_metrics_app(metrics: Metrics) -> web.Application:
    """``GET /metrics`` alone, without auth: for ``METRICS_PORT`` (a private address)."""
    app = web.Application(client_max_size=1024)
    app.router.add_get("/metrics", _metrics_handler(metrics))
    return app
