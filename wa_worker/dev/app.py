"""The dev proxy's aiohttp application: the contract and dev API (:mod:`.proxy`)
plus the page (:mod:`.page`), behind one access check.

* page paths (``/``, ``/ui/…``, ``/static/…``): loopback only, no bearer
  (:func:`~wa_worker.dev.page.check_local`);
* everything else: ``Authorization: Bearer <secret>``.

Imports go one way: ``app → page → proxy → store`` (and ``page → worker_link``,
``app → fleet → proxy``).
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from .fleet import add_fleet_routes
from .page import add_page_routes, check_local, is_page_path
from .proxy import (
    DEFAULT_LEASE_TTL_S,
    PROXY_KEY,
    ApiError,
    DevProxy,
    ProxyEventCallback,
    add_api_routes,
    error_response,
)
from .store import DevStore
from .worker_link import WORKER_LINK_KEY, WorkerLink


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    if is_page_path(request.path):
        denied = check_local(request)
        if denied is not None:
            return denied
    elif not request.app[PROXY_KEY].check_bearer(request):
        return error_response(401, "missing or wrong bearer token")
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.message)


def create_app(
    store: DevStore,
    secret: str,
    *,
    wake_url: str | None = None,
    on_event: ProxyEventCallback | None = None,
    lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
) -> web.Application:
    """Build the proxy app. ``wake_url`` is the worker's base URL (``http://127.0.0.1:3000``);
    whoever serves the app runs ``app[PROXY_KEY].run_waker()`` in its task group."""
    app = web.Application(middlewares=[_guard], client_max_size=1024 * 1024)
    app[PROXY_KEY] = DevProxy(store, secret, wake_url=wake_url, on_event=on_event, lease_ttl_s=lease_ttl_s)
    if wake_url:  # the page shows the worker's health and drives its simulator through this
        app[WORKER_LINK_KEY] = WorkerLink(wake_url.rstrip("/"), secret)
    add_api_routes(app)
    add_fleet_routes(app)
    add_page_routes(app)
    return app
