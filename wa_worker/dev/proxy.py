"""The reference edge proxy: an aiohttp app implementing docs/proxy-contract.md over SQLite.

Routes (all but the page need ``Authorization: Bearer <secret>``):

contract (called by the worker)
    GET  /disconnected-instances
    POST /update-status
    GET  /queued-messages[?instanceId=<id>]     (no instanceId: batch mode)
    POST /mark-sent
    POST /mark-failed
    POST /inbound
dev API (called by ``wa-worker dev instance|send|messages``)
    GET  /dev/instances              POST /dev/instances   {"id", "priority"?}
    GET  /dev/messages[?instanceId=&limit=]
    POST /dev/messages   {"instanceId", "to", "body"}
page (loopback only, no bearer; see :mod:`wa_worker.dev.page`)
    GET  /   GET /ui/state   POST /ui/queue   POST /ui/instances   GET /static/…

Queueing a message (dev API or page) calls the worker's ``POST /wake`` (best
effort) so it goes out at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from ..http.common import bearer_matches, read_json_object
from ..ids import is_valid_instance_id
from .store import (
    STATUSES,
    InstanceExists,
    Store,
    UnknownInstance,
    UnknownMessage,
)

log = logging.getLogger(__name__)

MAX_BODY_CHARS = 65_536
MAX_REQUEST_BYTES = 1024 * 1024
MAX_LIMIT = 500


@dataclass(frozen=True, slots=True)
class ProxyEvent:
    """Something the terminal printer may show.

    ``kind``: ``instance_added``, ``status``, ``queued``, ``sent``, ``failed``, ``inbound``.
    """

    kind: str
    instance_id: str
    data: dict[str, Any] = field(default_factory=dict)


ProxyEventCallback = Callable[[ProxyEvent], None]


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class DevProxy:
    """State shared by the handlers: store, secret, wake forwarding, event listeners."""

    def __init__(
        self,
        store: Store,
        secret: str,
        *,
        wake_url: str | None = None,
        on_event: ProxyEventCallback | None = None,
        wake_timeout_s: float = 3.0,
    ) -> None:
        if not secret:
            raise ValueError("secret must not be empty")
        self.store = store
        self._secret = secret.encode()
        self._secret_str = secret
        self.wake_url = wake_url
        self.wake_timeout_s = wake_timeout_s
        self._listeners: list[ProxyEventCallback] = [on_event] if on_event else []
        self._wake_tasks: set[asyncio.Task[None]] = set()
        self._client: aiohttp.ClientSession | None = None

    # -------------------------------------------------------------- events

    def subscribe(self, callback: ProxyEventCallback) -> None:
        self._listeners.append(callback)

    def emit(self, kind: str, instance_id: str, **data: Any) -> None:
        event = ProxyEvent(kind, instance_id, data)
        for cb in list(self._listeners):
            try:
                cb(event)
            except Exception:  # a printer bug must never fail a contract call
                log.exception("dev proxy event listener failed")

    # -------------------------------------------------------------- auth

    def check_bearer(self, request: web.Request) -> bool:
        return bearer_matches(request, self._secret)

    # -------------------------------------------------------------- wake forwarding

    def wake(self, instance_id: str | None) -> None:
        """Ask the worker to poll now (fire and forget; errors are ignored)."""
        if not self.wake_url:
            return
        task = asyncio.get_running_loop().create_task(self._wake(instance_id))
        self._wake_tasks.add(task)
        task.add_done_callback(self._wake_tasks.discard)

    async def _wake(self, instance_id: str | None) -> None:
        assert self.wake_url
        if self._client is None or self._client.closed:
            self._client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.wake_timeout_s))
        url = self.wake_url.rstrip("/") + "/wake"
        body = {"instanceId": instance_id} if instance_id else {}
        try:
            async with self._client.post(
                url, json=body, headers={"Authorization": f"Bearer {self._secret_str}"}
            ) as resp:
                await resp.read()
                log.debug("wake %s -> %s", instance_id, resp.status)
        except Exception as exc:  # best effort: the worker polls anyway
            log.debug("wake %s failed: %s", instance_id, type(exc).__name__)

    async def aclose(self) -> None:
        for task in list(self._wake_tasks):
            task.cancel()
        if self._wake_tasks:
            await asyncio.gather(*self._wake_tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.close()
            self._client = None

    # -------------------------------------------------------------- shared actions

    def add_instance(self, instance_id: Any, priority: Any = 0) -> dict[str, Any]:
        if not is_valid_instance_id(instance_id):
            raise ApiError(400, "instance id must match ^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
        if priority is None:
            priority = 0
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ApiError(400, "priority must be an integer")
        try:
            inst = self.store.add_instance(instance_id, priority=priority)
        except InstanceExists:
            raise ApiError(409, f"instance {instance_id} already exists") from None
        self.emit("instance_added", instance_id)
        return inst

    def queue_message(self, instance_id: Any, to: Any, body: Any) -> dict[str, Any]:
        if not is_valid_instance_id(instance_id):
            raise ApiError(400, "instanceId is missing or invalid")
        if not isinstance(to, str) or not to.strip():
            raise ApiError(400, "to is required")
        if not isinstance(body, str) or not body.strip():
            raise ApiError(400, "body is required")
        if len(body) > MAX_BODY_CHARS or len(to) > 256:
            raise ApiError(400, "message too long")
        try:
            msg = self.store.queue_message(instance_id, to.strip(), body)
        except UnknownInstance:
            raise ApiError(404, f"unknown instance {instance_id}") from None
        self.emit("queued", instance_id, message=msg)
        self.wake(instance_id)
        return msg


PROXY_KEY: web.AppKey[DevProxy] = web.AppKey("dev_proxy", DevProxy)


# ---------------------------------------------------------------------------- helpers


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _json_object(request: web.Request) -> dict[str, Any]:
    return await read_json_object(request, max_bytes=MAX_REQUEST_BYTES)


def _opt_str(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ApiError(400, f"{key} must be a string or null")
    return value


def _instance_param(value: Any, *, name: str = "instanceId") -> str:
    if not is_valid_instance_id(value):
        raise ApiError(400, f"{name} is missing or invalid")
    return value  # type: ignore[no-any-return]


def _limit(request: web.Request, default: int = 50) -> int:
    raw = request.query.get("limit")
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, "limit must be an integer") from None
    if not 1 <= value <= MAX_LIMIT:
        raise ApiError(400, f"limit must be between 1 and {MAX_LIMIT}")
    return value


def is_page_path(path: str) -> bool:
    return path == "/" or path.startswith("/ui/") or path.startswith("/static/") or path == "/favicon.ico"


@web.middleware
async def _middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    proxy = request.app[PROXY_KEY]
    if is_page_path(request.path):
        from .page import check_local

        denied = check_local(request)
        if denied is not None:
            return denied
    elif not proxy.check_bearer(request):
        return _error(401, "missing or wrong bearer token")
    try:
        return await handler(request)
    except ApiError as exc:
        return _error(exc.status, exc.message)


# ---------------------------------------------------------------------------- contract


async def disconnected_instances(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    return web.json_response({"instances": proxy.store.disconnected_instances()})


async def update_status(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    data = await _json_object(request)
    instance_id = _instance_param(data.get("instanceId"))
    status = data.get("status")
    if status not in STATUSES:
        raise ApiError(400, f"status must be one of {', '.join(STATUSES)}")
    qr_code = _opt_str(data, "qr_code")
    phone = _opt_str(data, "phone_number")
    reason = _opt_str(data, "reason")
    try:
        change = proxy.store.update_status(
            instance_id, status, qr_code=qr_code, phone_number=phone, reason=reason
        )
    except UnknownInstance:
        raise ApiError(404, f"unknown instance {instance_id}") from None
    if change.old_status != change.status or change.old_reason != change.reason:
        proxy.emit(
            "status",
            instance_id,
            old_status=change.old_status,
            status=change.status,
            phone_number=change.phone_number,
            reason=change.reason,
        )
    return web.json_response({"ok": True})


async def queued_messages(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    limit = _limit(request)
    if "instanceId" in request.query:
        instance_id = _instance_param(request.query["instanceId"])
        if not proxy.store.has_instance(instance_id):
            raise ApiError(404, f"unknown instance {instance_id}")
        messages = proxy.store.claim_messages(instance_id, limit=limit)
    else:
        messages = proxy.store.claim_messages(None, limit=limit)
    return web.json_response({"messages": messages})


async def mark_sent(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    data = await _json_object(request)
    message_id = data.get("messageId")
    if not isinstance(message_id, str) or not message_id:
        raise ApiError(400, "messageId is required")
    wa_id = _opt_str(data, "wa_message_id")
    try:
        msg, changed = proxy.store.mark_sent(message_id, wa_id)
    except UnknownMessage:
        # 200, not 404: the worker reads a 404 from /mark-failed as "endpoint not
        # implemented" and would stop reporting failures (the Supabase kit does the same)
        return web.json_response({"ok": False, "found": False})
    if changed:
        proxy.emit("sent", msg["instanceId"], message=msg)
    return web.json_response({"ok": True, "status": msg["status"]})


async def mark_failed(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    data = await _json_object(request)
    message_id = data.get("messageId")
    if not isinstance(message_id, str) or not message_id:
        raise ApiError(400, "messageId is required")
    error = _opt_str(data, "error") or "unknown error"
    try:
        msg, changed = proxy.store.mark_failed(message_id, error[:2000])
    except UnknownMessage:
        return web.json_response({"ok": False, "found": False})  # see mark_sent
    if changed:
        proxy.emit("failed", msg["instanceId"], message=msg)
    return web.json_response({"ok": True, "status": msg["status"]})


async def inbound(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    data = await _json_object(request)
    instance_id = _instance_param(data.get("instanceId"))
    for key in ("wa_message_id", "from", "body"):
        value = data.get(key)
        if not isinstance(value, str) or not value:
            raise ApiError(400, f"{key} is required")
    for key in ("to", "chat_id", "sender_id", "push_name"):
        _opt_str(data, key)
    for key in ("from_me", "is_group"):
        if data.get(key) is not None and not isinstance(data.get(key), bool):
            raise ApiError(400, f"{key} must be a boolean")
    ts = data.get("timestamp")
    if ts is not None and (isinstance(ts, bool) or not isinstance(ts, (int, float))):
        raise ApiError(400, "timestamp must be a number")
    try:
        msg, inserted = proxy.store.add_inbound(instance_id, data)
    except UnknownInstance:
        raise ApiError(404, f"unknown instance {instance_id}") from None
    if inserted:
        proxy.emit("inbound", instance_id, message=msg)
    return web.json_response({"ok": True, "duplicate": not inserted})


# ---------------------------------------------------------------------------- dev API


def _public_instance(inst: dict[str, Any], *, with_qr: bool = False) -> dict[str, Any]:
    out = {
        "id": inst["id"],
        "status": inst["status"],
        "phone_number": inst["phone_number"],
        "reason": inst["reason"],
        "priority": inst["priority"],
        "has_qr": bool(inst["qr_code"]),
        "created_at": inst["created_at"],
        "updated_at": inst["updated_at"],
    }
    if with_qr:
        qr = inst["qr_code"]
        out["qr_code"] = qr if isinstance(qr, str) and qr.startswith("data:image/png;base64,") else None
    return out


async def dev_list_instances(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    return web.json_response({"instances": [_public_instance(i) for i in proxy.store.list_instances()]})


async def dev_add_instance(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    data = await _json_object(request)
    inst = proxy.add_instance(data.get("id"), data.get("priority", 0))
    return web.json_response({"instance": _public_instance(inst)}, status=201)


async def dev_list_messages(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    limit = _limit(request)
    instance_id = request.query.get("instanceId")
    if instance_id is not None:
        _instance_param(instance_id)
        if not proxy.store.has_instance(instance_id):
            raise ApiError(404, f"unknown instance {instance_id}")
    return web.json_response(
        {
            "outbound": proxy.store.list_outbound(instance_id, limit=limit),
            "inbound": proxy.store.list_inbound(instance_id, limit=limit),
        }
    )


async def dev_queue_message(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    data = await _json_object(request)
    msg = proxy.queue_message(data.get("instanceId"), data.get("to"), data.get("body"))
    return web.json_response({"message": msg}, status=201)


# ---------------------------------------------------------------------------- app


def create_app(
    store: Store,
    secret: str,
    *,
    wake_url: str | None = None,
    on_event: ProxyEventCallback | None = None,
) -> web.Application:
    """Build the proxy app. ``wake_url`` is the worker's base URL (``http://127.0.0.1:3000``)."""
    from .page import add_page_routes

    proxy = DevProxy(store, secret, wake_url=wake_url, on_event=on_event)
    app = web.Application(middlewares=[_middleware], client_max_size=MAX_REQUEST_BYTES)
    app[PROXY_KEY] = proxy
    app.router.add_get("/disconnected-instances", disconnected_instances)
    app.router.add_post("/update-status", update_status)
    app.router.add_get("/queued-messages", queued_messages)
    app.router.add_post("/mark-sent", mark_sent)
    app.router.add_post("/mark-failed", mark_failed)
    app.router.add_post("/inbound", inbound)
    app.router.add_get("/dev/instances", dev_list_instances)
    app.router.add_post("/dev/instances", dev_add_instance)
    app.router.add_get("/dev/messages", dev_list_messages)
    app.router.add_post("/dev/messages", dev_queue_message)
    add_page_routes(app)

    async def _cleanup(app: web.Application) -> None:
        await app[PROXY_KEY].aclose()

    app.on_cleanup.append(_cleanup)
    return app
