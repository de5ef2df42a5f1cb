"""The dev page: instances with status and live QR, recent messages, a form to queue one.

Server-rendered HTML plus a little vanilla JS (``static/app.js``) that polls
``GET /ui/state`` every second. No build step.

The page has **no login**. It is only answered to loopback clients that use a
loopback host name (``127.0.0.1``, ``localhost``, ``[::1]``): the peer address
check keeps other machines out if the proxy is bound to a public interface, the
``Host`` check defeats DNS rebinding. The two write endpoints (``POST /ui/queue``,
``POST /ui/instances``) additionally need a JSON body, the header
``X-WA-Dev: 1`` (which a cross-site form cannot send and a cross-site
``fetch`` cannot send without a CORS preflight we never approve) and, when the
browser sends them, a same-origin ``Origin`` / ``Sec-Fetch-Site``.
"""

from __future__ import annotations

import html
import ipaddress
import time
from pathlib import Path
from typing import Any

from aiohttp import web

STATIC_DIR = Path(__file__).with_name("static")
CSRF_HEADER = "X-WA-Dev"
RECENT = 30
POLL_MS = 1000

_LOCAL_HOSTNAMES = {"localhost", "127.0.0.1", "::1"}

_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
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
    from .proxy import PROXY_KEY, _public_instance

    store = request.app[PROXY_KEY].store
    return {
        "instances": [_public_instance(i, with_qr=True) for i in store.list_instances()],
        "outbound": store.list_outbound(limit=RECENT),
        "inbound": store.list_inbound(limit=RECENT),
        "server_time": time.time(),
    }


# ---------------------------------------------------------------------------- rendering

_e = html.escape


def _clock(ts: float | None) -> str:
    if not ts:
        return ""
    return time.strftime("%H:%M:%S", time.localtime(ts))


def _instance_detail(inst: dict[str, Any]) -> str:
    if inst["status"] == "CONNECTED" and inst.get("phone_number"):
        return "+" + inst["phone_number"]
    if inst["status"] == "DISCONNECTED" and inst.get("reason"):
        return "reason: " + inst["reason"]
    if inst["status"] == "CONNECTING" and inst.get("qr_code"):
        return "scan the QR code: WhatsApp › Linked devices › Link a device"
    if inst["status"] == "CONNECTING":
        return "connecting…"
    return "waiting for the worker…"


def _render_instance(inst: dict[str, Any]) -> str:
    qr = inst.get("qr_code")
    qr_html = (
        f'<img class="qr" data-field="qr" alt="QR code to link {_e(inst["id"])}" src="{_e(qr)}">'
        if qr
        else '<img class="qr" data-field="qr" alt="" hidden>'
    )
    return (
        f'<article class="instance" data-instance-id="{_e(inst["id"])}">'
        f'<header><h3>{_e(inst["id"])}</h3>'
        f'<span class="status status-{_e(inst["status"])}" data-field="status">{_e(inst["status"])}</span>'
        "</header>"
        f'<p class="detail" data-field="detail">{_e(_instance_detail(inst))}</p>'
        f"{qr_html}</article>"
    )


def _render_outbound_row(m: dict[str, Any]) -> str:
    note = m.get("error") or m.get("wa_message_id") or ""
    return (
        f'<tr data-message-id="{_e(m["id"])}"><td>{_e(_clock(m["created_at"]))}</td>'
        f'<td>{_e(m["instanceId"])}</td><td>{_e(m["to"])}</td><td class="body">{_e(m["body"])}</td>'
        f'<td><span class="mstatus mstatus-{_e(m["status"])}">{_e(m["status"])}</span></td>'
        f'<td class="note">{_e(note)}</td></tr>'
    )


def _render_inbound_row(m: dict[str, Any]) -> str:
    sender = m.get("push_name") or ""
    who = m["from"] + (f" ({sender})" if sender else "")
    return (
        f'<tr data-wa-message-id="{_e(m["wa_message_id"])}"><td>{_e(_clock(m["received_at"]))}</td>'
        f'<td>{_e(m["instanceId"])}</td><td>{_e(who)}</td><td class="body">{_e(m["body"])}</td></tr>'
    )


def render_page(state: dict[str, Any]) -> str:
    instances = state["instances"]
    cards = "".join(_render_instance(i) for i in instances) or '<p class="empty">No instances yet.</p>'
    options = "".join(f'<option value="{_e(i["id"])}">{_e(i["id"])}</option>' for i in instances)
    outbound = "".join(_render_outbound_row(m) for m in state["outbound"])
    inbound = "".join(_render_inbound_row(m) for m in state["inbound"])
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>wa-worker dev</title>
<link rel="stylesheet" href="/static/style.css">
<script src="/static/app.js" defer></script>
</head>
<body data-poll-ms="{POLL_MS}">
<header class="top">
  <h1>wa-worker dev</h1>
  <span id="live" class="live" title="page refresh">connecting…</span>
  <p class="note">Local reference proxy. This page has no login: it is only served to this
  machine (loopback). The worker's endpoints still need the bearer secret.</p>
</header>
<main>
<section id="instances">
  <h2>Instances</h2>
  <div id="instance-list">{cards}</div>
  <form id="instance-form" class="inline" autocomplete="off">
    <label>New instance <input name="id" required pattern="[A-Za-z0-9][A-Za-z0-9_\\-]{{0,127}}"
      placeholder="acme-sales"></label>
    <button type="submit">Add</button>
    <span class="result" role="status" data-field="result"></span>
  </form>
</section>
<section id="send">
  <h2>Queue a message</h2>
  <form id="queue-form" autocomplete="off">
    <label>Instance <select name="instanceId" required>{options}</select></label>
    <label>To <input name="to" required placeholder="+55 11 99999-0000 or …@g.us"></label>
    <label class="wide">Text <textarea name="body" rows="2" required placeholder="Hello!"></textarea></label>
    <button type="submit">Queue</button>
    <span class="result" role="status" data-field="result"></span>
  </form>
  <noscript><p class="note">The forms need JavaScript.</p></noscript>
</section>
<section id="outbound">
  <h2>Outbound <small>(newest first)</small></h2>
  <table><thead><tr><th>Time</th><th>Instance</th><th>To</th><th>Text</th><th>Status</th><th>Detail</th></tr></thead>
  <tbody id="outbound-rows">{outbound}</tbody></table>
</section>
<section id="inbound">
  <h2>Inbound <small>(newest first)</small></h2>
  <table><thead><tr><th>Time</th><th>Instance</th><th>From</th><th>Text</th></tr></thead>
  <tbody id="inbound-rows">{inbound}</tbody></table>
</section>
</main>
</body>
</html>
"""


# ---------------------------------------------------------------------------- handlers


async def index(request: web.Request) -> web.Response:
    return web.Response(
        text=render_page(page_state(request)), content_type="text/html", headers=_SECURITY_HEADERS
    )


async def ui_state(request: web.Request) -> web.Response:
    return web.json_response(page_state(request), headers=_SECURITY_HEADERS)


async def ui_queue(request: web.Request) -> web.Response:
    from .proxy import PROXY_KEY, _json_object

    data = await _json_object(request)
    msg = request.app[PROXY_KEY].queue_message(data.get("instanceId"), data.get("to"), data.get("body"))
    return web.json_response({"message": msg}, status=201, headers=_SECURITY_HEADERS)


async def ui_add_instance(request: web.Request) -> web.Response:
    from .proxy import PROXY_KEY, _json_object, _public_instance

    data = await _json_object(request)
    inst = request.app[PROXY_KEY].add_instance(data.get("id"), 0)
    return web.json_response({"instance": _public_instance(inst)}, status=201, headers=_SECURITY_HEADERS)


async def favicon(request: web.Request) -> web.Response:
    return web.Response(status=204)


def add_page_routes(app: web.Application) -> None:
    app.router.add_get("/", index)
    app.router.add_get("/ui/state", ui_state)
    app.router.add_post("/ui/queue", ui_queue)
    app.router.add_post("/ui/instances", ui_add_instance)
    app.router.add_get("/favicon.ico", favicon)
    app.router.add_static("/static/", STATIC_DIR)
