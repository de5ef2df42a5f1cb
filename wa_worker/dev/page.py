"""The dev page: instances with status and live QR, recent messages, a form to queue one.

``GET /`` is a static shell (``static/index.html``); ``static/app.js`` fetches
``GET /ui/state`` (JSON) and renders everything, the first paint included,
then again whenever ``GET /ui/events`` (Server-Sent Events: ``event: changed``
after every write to the store, :mod:`.changes`) says something changed; it
polls every second only while that stream is down, and every 15 s anyway (the
worker's health is not in the store). The forms post to ``/ui/queue`` and
``/ui/instances``, which are the dev API's handlers. No build step.
``/ui/state`` carries the worker's health too, and ``POST /ui/simulator/{id}/scan``
/ ``…/inbound`` drive the worker's simulator (:mod:`.worker_link`): the page
talks to its own origin only.

Media files (``GET /media/<sha256>``, :mod:`.proxy`) get the same loopback-only
access as the page, so ``<img>`` / ``<audio>`` tags can show them.

The page has **no login**. It is only answered to loopback clients that use a
loopback host name (``127.0.0.1``, ``localhost``, ``[::1]``): the peer address
check keeps other machines out if the proxy is bound to a public interface, the
``Host`` check defeats DNS rebinding. The two write endpoints (``POST /ui/queue``,
``POST /ui/instances``, ``POST /ui/simulator/…``) additionally need a JSON body, the header
``X-WA-Dev: 1`` (which a cross-site form cannot send and a cross-site
``fetch`` cannot send without a CORS preflight we never approve) and, when the
browser sends them, a same-origin ``Origin`` / ``Sec-Fetch-Site``.
"""

from __future__ import annotations

import ipaddress
import json
import time
from pathlib import Path
from typing import Any

import anyio
from aiohttp import web
from aiohttp.typedefs import Handler

from ..ids import is_valid_instance_id
from .proxy import PROXY_KEY, dev_add_instance, dev_queue_message, public_instance
from .worker_link import SIMULATOR_ACTIONS, WORKER_LINK_KEY

STATIC_DIR = Path(__file__).with_name("static")
CSRF_HEADER = "X-WA-Dev"
INDEX_HTML = STATIC_DIR / "index.html"
RECENT = 30
KEEPALIVE_S = 15.0
STREAMS_KEY: web.AppKey[set[anyio.CancelScope]] = web.AppKey("page_streams")

_LOCAL_HOSTNAMES = {"localhost", "127.0.0.1", "::1"}

_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; media-src 'self'; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


# ---------------------------------------------------------------------------- access checks


def _is_loopback_ip(value: str | None) -> bool:
    if not value:
        return False
    try:
        return ipaddress.ip_address(value.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _host_name(host_header: str) -> str:
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host


def _is_local_host(host_header: str | None) -> bool:
    if not host_header:
        return False
    name = _host_name(host_header)
    return name in _LOCAL_HOSTNAMES or _is_loopback_ip(name)


def _deny(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=_SECURITY_HEADERS)


def check_local(request: web.Request) -> web.Response | None:
    """``None`` when the request may use the page, else the refusal to send."""
    if not _is_loopback_ip(request.remote):
        return _deny(403, "the dev page is only served to this machine (loopback)")
    if not _is_local_host(request.headers.get("Host")):
        return _deny(403, "open the dev page as http://127.0.0.1:<port>/ or http://localhost:<port>/")
    if request.method not in ("GET", "HEAD"):
        if request.headers.get(CSRF_HEADER) != "1":
            return _deny(403, f"missing {CSRF_HEADER} header")
        if request.content_type != "application/json":
            return _deny(415, "expected application/json")
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"{request.scheme}://{request.host}":
            return _deny(403, "cross-origin request refused")
        site = request.headers.get("Sec-Fetch-Site")
        if site is not None and site not in ("same-origin", "none"):
            return _deny(403, "cross-site request refused")
    return None


# ---------------------------------------------------------------------------- state


def page_state(request: web.Request) -> dict[str, Any]:
    """Everything the page shows (the secret is never part of it)."""
    store = request.app[PROXY_KEY].store
    return {
        "instances": [public_instance(i, with_qr=True) for i in store.list_instances()],
        "outbound": store.list_outbound(limit=RECENT),
        "inbound": store.list_inbound(limit=RECENT),
        "server_time": time.time(),
    }


# ---------------------------------------------------------------------------- handlers


def is_page_path(path: str) -> bool:
    return (path == "/" or path.startswith(("/ui/", "/static/", "/media/")) or path == "/favicon.ico")


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(INDEX_HTML, headers=_SECURITY_HEADERS)


async def ui_state(request: web.Request) -> web.Response:
    state = page_state(request)
    link = request.app.get(WORKER_LINK_KEY)
    state["worker"] = await link.health() if link is not None else None  # None: proxy only
    return web.json_response(state, headers=_SECURITY_HEADERS)


async def ui_simulator(request: web.Request) -> web.Response:
    """The page's Scan / Simulate incoming buttons, forwarded to the worker's simulator."""
    iid, action = request.match_info["id"], request.match_info["action"]
    link = request.app.get(WORKER_LINK_KEY)
    if link is None:
        return _deny(409, "no worker runs with this proxy")
    if action not in SIMULATOR_ACTIONS or not is_valid_instance_id(iid):
        return _deny(404, "unknown simulator control")
    body: dict[str, Any] = {}
    if action == "inbound":
        try:
            data = await request.json()
        except ValueError:
            return _deny(400, "expected a JSON object")
        if not isinstance(data, dict) or not isinstance(data.get("from"), str) or not isinstance(data.get("body"), str):
            return _deny(400, "'from' and 'body' are required strings")
        digits = "".join(c for c in data["from"] if c.isdigit())
        body = {"from": data["from"].strip() if "@" in data["from"] else digits, "body": data["body"]}
    status, answer = await link.simulator(iid, action, body)
    return web.json_response(answer, status=status, headers=_SECURITY_HEADERS)


async def ui_events(request: web.Request) -> web.StreamResponse:
    """``event: changed`` (``data: {"version": n}``) now and after every change of the store;
    a comment every :data:`KEEPALIVE_S`. The page refetches ``/ui/state`` on each."""
    changes = request.app[PROXY_KEY].store.changes
    resp = web.StreamResponse(headers={**_SECURITY_HEADERS, "Content-Type": "text/event-stream"})
    await resp.prepare(request)
    streams = request.app[STREAMS_KEY]
    with anyio.CancelScope() as scope:  # cancelled when the proxy shuts down
        streams.add(scope)
        try:
            version = changes.version
            await resp.write(f"retry: 1000\nevent: changed\ndata: {json.dumps({'version': version})}\n\n".encode())
            while True:
                now = await changes.wait_past(version, KEEPALIVE_S)
                if now == version:
                    await resp.write(b": keep-alive\n\n")
                    continue
                version = now
                await resp.write(f"event: changed\ndata: {json.dumps({'version': version})}\n\n".encode())
        except ConnectionError:
            pass  # the page went away (or reloads)
        finally:
            streams.discard(scope)
    return resp


async def _end_streams(app: web.Application) -> None:
    streams: set[anyio.CancelScope] = app[STREAMS_KEY]
    for scope in list(streams):
        scope.cancel()


def _secured(handler: Handler) -> Handler:
    """``handler`` with the page's security headers on its answer."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        response = await handler(request)
        response.headers.update(_SECURITY_HEADERS)
        return response

    return wrapped


async def favicon(request: web.Request) -> web.Response:
    return web.Response(status=204)


def add_page_routes(app: web.Application) -> None:
    app.router.add_get("/", index)
    app.router.add_get("/ui/state", ui_state)
    app.router.add_get("/ui/events", ui_events, allow_head=False)
    app[STREAMS_KEY] = set()
    app.on_shutdown.append(_end_streams)
    app.router.add_post("/ui/queue", _secured(dev_queue_message))
    app.router.add_post("/ui/instances", _secured(dev_add_instance))
    app.router.add_post("/ui/simulator/{id}/{action}", ui_simulator)
    app.router.add_get("/favicon.ico", favicon)
    app.router.add_static("/static/", STATIC_DIR)
