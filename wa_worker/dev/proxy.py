"""The reference edge proxy: docs/proxy-contract.md over SQLite, and the dev API.

Routes (all need ``Authorization: Bearer <secret>``; :mod:`wa_worker.dev.app`
checks it):

contract (called by the worker)
    GET  /disconnected-instances
    POST /update-status
    GET  /queued-messages[?instanceId=<id>]     (no instanceId: batch mode)
    POST /mark-sent
    POST /mark-failed                            ({"messageId", "error", "error_code"?})
    POST /inbound                                (every message type)
    POST /upload-media?instanceId=&wa_message_id=  (raw bytes; idempotent per message)
    POST /message-status
    GET  /instance-settings[?since=<cursor>]     (changes only; the cursor is a change number)
    POST /leases, GET /events                    (a fleet: :mod:`wa_worker.dev.fleet`)
fencing (docs/proxy-contract.md, "Leases and fencing"): ``lease_token`` on
/update-status and claims must be the instance's current lease, on /mark-sent and
/mark-failed a token the message was claimed under, else 409 ``lease_lost``;
without it, a call behaves as in single-worker mode.
media (loopback, no bearer, like the page: :mod:`wa_worker.dev.page`)
    GET  /media/<sha256>
dev API (called by ``wa-worker dev instance|send|messages``, and by the page)
    GET  /dev/instances              POST /dev/instances   {"id", "priority"?, "pair_phone"?}
    POST /dev/instances/<id>/settings  {"settings"?: {key: value | null}, "replace"?, "proxy_url"?: url | null}
    GET  /dev/messages[?instanceId=&limit=]
    POST /dev/messages   {"instanceId", "to", "body", + the content fields of a queued message}

Media: bytes uploaded by the worker, or given as ``media_base64`` to the dev
API, are kept as ``<media dir>/<sha256>`` (0600) and served back at
``/media/<sha256>``. A queued message whose media is stored here is handed to
the worker as ``media_url`` on the proxy's own address (the worker fetches it;
``wa-worker dev`` sets ``MEDIA_ALLOW_PRIVATE=true``, so the loopback fetch is
allowed), never as a large ``media_base64`` that would overflow the worker's
response cap (``EDGE_MAX_RESPONSE_BYTES``).

Public surface (what :mod:`wa_worker.dev.page` and :mod:`wa_worker.dev.app`
use): :class:`DevProxy` (stored under :data:`PROXY_KEY`), :class:`ApiError`,
:func:`error_response`, :func:`public_instance`, :func:`add_api_routes` and the
dev API handlers. This module imports neither the page nor the app.

Queueing a message (dev API or page) calls the worker's ``POST /wake`` (best
effort) so it goes out at once; :meth:`DevProxy.run_waker` does the calling and
must run in the owner's task group.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp
import anyio
from aiohttp import web

from ..http.common import bearer_matches, read_json_object
from ..ids import is_valid_instance_id
from ..media.errors import MediaError
from ..media.files import CappedFile, FetchedMedia
from ..media.inline import decode_base64_to_file
from ..media.sniff import infer_type, sniff_mimetype
from ..messages import WA_MESSAGE_ID_RE, ContentError, Kind, parse_content
from ..upstream import ProxyProblem, parse_proxy_url
from .events import EventHub
from .leasing import WORKER_ID_RE
from .store import (
    RECEIPT_RANK,
    STATUSES,
    DevStore,
    UNCHANGED,
    InstanceExists,
    LeaseLost,
    UnknownInstance,
    UnknownMessage,
)

log = logging.getLogger(__name__)

MAX_BODY_CHARS = 65_536
MAX_REQUEST_BYTES = 1024 * 1024
MAX_MEDIA_BYTES = 64 * 1024 * 1024  # as the worker's MEDIA_MAX_BYTES default
UPLOAD_READ_TIMEOUT_S = 120.0
INBOUND_TYPES = frozenset(k.value for k in Kind)
MEDIA_ERRORS = frozenset({"upload_unsupported", "too_large", "download_failed"})
ERROR_CODES = frozenset({
    "invalid_message", "invalid_recipient", "media_too_large", "media_fetch_failed", "media_refused",
    "media_invalid", "media_conversion_failed", "reply_target_unknown", "send_failed", "delivery_unknown",
})
MAX_LIMIT = 500
MAX_SETTINGS_KEYS = 64
MAX_PENDING_WAKES = 1000
DEFAULT_LEASE_TTL_S = 30.0
MAX_LEASE_NOTICES = 10_000
END_OF_9999 = 253_402_300_800  # 10000-01-01T00:00:00Z in Unix seconds


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
        store: DevStore,
        secret: str,
        *,
        wake_url: str | None = None,
        on_event: ProxyEventCallback | None = None,
        wake_timeout_s: float = 3.0,
        media_max_bytes: int = MAX_MEDIA_BYTES,
        lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
    ) -> None:
        if not secret:
            raise ValueError("secret must not be empty")
        if not 0 < lease_ttl_s <= 3600:
            raise ValueError("lease_ttl_s must be between 0 and 3600 seconds")
        self.lease_ttl_s = lease_ttl_s
        self.events = EventHub()
        self._lease_noticed: set[str] = set()  # workers told "leases" since their last /leases call
        self.refused = {"update_status": 0, "claim": 0, "ack": 0}  # fenced calls answered 409 lease_lost
        self.unsent = {"requeued": 0, "ignored": 0}  # claims handed back in POST /leases (GET /dev/fleet)
        self.store = store
        self._secret = secret.encode()
        self._secret_str = secret
        self.wake_url = wake_url
        self.wake_timeout_s = wake_timeout_s
        self.media_max_bytes = media_max_bytes
        self._listeners: list[ProxyEventCallback] = [on_event] if on_event else []
        self._wake_ids: set[str | None] = set()  # None: every instance
        self._wake_ready: anyio.Event | None = None  # exists while run_waker runs

    # -------------------------------------------------------------- events

    def emit(self, kind: str, instance_id: str, **data: Any) -> None:
        event = ProxyEvent(kind, instance_id, data)
        for cb in list(self._listeners):
            try:
                cb(event)
            except Exception:  # a printer bug must never fail a contract call
                log.exception("dev proxy event listener failed")

    def notify_leases(self, worker_ids: list[str]) -> None:
        """A ``leases`` event for each worker (once until its next ``/leases`` call)."""
        for worker_id in worker_ids:
            if worker_id in self._lease_noticed:
                continue
            if len(self._lease_noticed) >= MAX_LEASE_NOTICES:
                self._lease_noticed.clear()  # bounded: at worst a worker is told twice
            self._lease_noticed.add(worker_id)
            self.events.publish("leases", worker_id=worker_id)

    def leases_called(self, worker_id: str) -> None:
        self._lease_noticed.discard(worker_id)

    def handed_back(self, requeued: list[tuple[str, str]], ignored: int) -> None:
        """A ``POST /leases`` put handed-back claims back to queued: counted, and a ``queued`` event
        to each instance's holder (if any yet; a new holder claims at its start anyway)."""
        self.unsent["requeued"] += len(requeued)
        self.unsent["ignored"] += ignored
        if ignored:
            log.info("ignored %d handed-back message id(s): not claimed under the caller's lease token", ignored)
        for instance_id in sorted({iid for _, iid in requeued}):
            self.events.publish("queued", instance_id, self.store.lease_holder(instance_id))

    def lease_lost(self, call: str, what: str) -> ApiError:
        """The 409 of a fenced call refused for its token (counted, shown by ``GET /dev/fleet``)."""
        self.refused[call] += 1
        log.info("refused a stale %s for %s: lease_lost", call, what)
        return ApiError(409, LEASE_LOST)

    # -------------------------------------------------------------- auth

    def check_bearer(self, request: web.Request) -> bool:
        return bearer_matches(request, self._secret)

    # -------------------------------------------------------------- wake forwarding

    def wake(self, instance_id: str | None) -> None:
        """Ask the worker to poll now: recorded here, posted by :meth:`run_waker`
        (bursts coalesce; errors are ignored, the worker polls anyway)."""
        if not self.wake_url:
            return
        if len(self._wake_ids) >= MAX_PENDING_WAKES:
            self._wake_ids = {None}  # bounded: wake every instance instead
        self._wake_ids.add(instance_id)
        if self._wake_ready is not None:
            self._wake_ready.set()

    async def run_waker(self) -> None:
        """Post the recorded wake-ups to the worker's ``POST /wake`` until cancelled.

        Runs in its owner's task group (``wa-worker dev``, :class:`BackgroundProxy`)."""
        if not self.wake_url:
            await anyio.sleep_forever()
        timeout = aiohttp.ClientTimeout(total=self.wake_timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as client:
            while True:
                self._wake_ready = anyio.Event()
                if not self._wake_ids:
                    await self._wake_ready.wait()
                ids, self._wake_ids = self._wake_ids, set()
                for instance_id in [None] if None in ids else sorted(i for i in ids if i is not None):
                    await self._post_wake(client, instance_id)

    async def _post_wake(self, client: aiohttp.ClientSession, instance_id: str | None) -> None:
        assert self.wake_url
        url = self.wake_url.rstrip("/") + "/wake"
        body = {"instanceId": instance_id} if instance_id else {}
        try:
            async with client.post(url, json=body, headers={"Authorization": f"Bearer {self._secret_str}"}) as resp:
                await resp.read()
                log.debug("wake %s -> %s", instance_id, resp.status)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:  # best effort: the worker polls anyway
            log.debug("wake %s failed: %s", instance_id, type(exc).__name__)

    # -------------------------------------------------------------- shared actions

    def add_instance(self, instance_id: Any, priority: Any = 0, pair_phone: Any = None) -> dict[str, Any]:
        if not is_valid_instance_id(instance_id):
            raise ApiError(400, "instance id must match ^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
        if priority is None:
            priority = 0
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ApiError(400, "priority must be an integer")
        if pair_phone is not None and not (isinstance(pair_phone, str) and pair_phone.isdigit()
                                           and 8 <= len(pair_phone) <= 15):
            raise ApiError(400, "pair_phone must be the phone number's digits (8-15, with the country code)")
        try:
            inst = self.store.add_instance(instance_id, priority=priority, pair_phone=pair_phone)
        except InstanceExists:
            raise ApiError(409, f"instance {instance_id} already exists") from None
        self.emit("instance_added", instance_id)
        self.wake(instance_id)  # the worker does not run it yet: this runs its discovery now
        self.notify_leases(self.store.lease_notices(self.lease_ttl_s))  # a fleet: someone takes it
        return inst

    async def queue_message(
        self, instance_id: Any, to: Any, body: Any, fields: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Queue a message; ``fields`` are the optional content fields of a queued
        message (``type``, ``media_url`` | ``media_base64``, ``mimetype``, ...),
        checked by the worker's own :func:`~wa_worker.messages.parse_content`."""
        fields = fields or {}
        if not is_valid_instance_id(instance_id):
            raise ApiError(400, "instanceId is missing or invalid")
        if not isinstance(to, str) or not to.strip():
            raise ApiError(400, "to is required")
        if body is None:
            body = ""
        if not isinstance(body, str):
            raise ApiError(400, "body must be a string")
        if len(body) > MAX_BODY_CHARS or len(to) > 256:
            raise ApiError(400, "message too long")
        try:
            content = parse_content({**fields, "body": body})
        except ContentError as exc:
            raise ApiError(400, str(exc)) from None
        if not self.store.has_instance(instance_id):
            raise ApiError(404, f"unknown instance {instance_id}")
        columns: dict[str, Any] = {}
        if content.kind is not None and (content.kind is not Kind.TEXT or fields.get("type") is not None):
            columns["type"] = content.kind.value  # None: media without a type, inferred below or by the worker
        if content.media is not None:
            columns["filename"] = content.media.filename
            columns["mimetype"] = content.media.mimetype
            if content.media.url is not None:
                columns["media_url"] = content.media.url
            else:
                assert content.media.base64 is not None
                stored = await self._store_base64(content.media.base64, content.media.mimetype,
                                                  content.media.filename)
                columns["media_sha256"] = stored["sha256"]
                columns["mimetype"] = stored["mimetype"]
                if content.kind is None:  # as the worker would infer it (never a sticker nor a voice note)
                    columns["type"] = infer_type(stored["mimetype"])
        if content.reply_to is not None:
            columns["reply_to"] = content.reply_to
        if content.kind is Kind.REACTION:
            columns["reaction"] = content.reaction
        if content.location is not None:
            loc = content.location
            columns.update(latitude=loc.latitude, longitude=loc.longitude, loc_name=loc.name,
                           loc_address=loc.address)
        if content.contact is not None:
            raw = fields.get("contact")
            if isinstance(raw, dict) and raw.get("phone") and not fields.get("vcard"):
                columns.update(contact_name=content.contact.name, contact_phone=str(raw["phone"]).strip())
            else:
                columns["vcard"] = content.contact.vcard
        try:
            msg = self.store.queue_message(instance_id, to.strip(), body, columns)
        except UnknownInstance:
            raise ApiError(404, f"unknown instance {instance_id}") from None
        self._announce_queued(msg)
        return msg

    def _announce_queued(self, msg: dict[str, Any]) -> None:
        """The terminal, the worker's ``/wake``, and ``GET /events`` (to the instance's lease holder)."""
        instance_id = msg["instanceId"]
        self.emit("queued", instance_id, message=msg)
        self.wake(instance_id)
        self.events.publish("queued", instance_id, self.store.lease_holder(instance_id))

    async def _store_base64(self, data: str, mimetype: str | None, filename: str | None) -> dict[str, Any]:
        def work() -> dict[str, Any]:
            try:
                media = decode_base64_to_file(data, self.store.media_dir, max_bytes=self.media_max_bytes,
                                              filename=filename)
            except MediaError as exc:
                raise ApiError(413 if exc.code == "media_too_large" else 400, str(exc)) from None
            return self._keep(media, mimetype)

        return await anyio.to_thread.run_sync(work)

    def _keep(self, media: FetchedMedia, declared: str | None) -> dict[str, Any]:
        """The file ``media`` moved into the store, its type sniffed (blocking: call from a thread)."""
        try:
            mimetype = sniff_mimetype(media.path, declared or media.content_type, media.filename)
            return self.store.add_media(media.path, media.sha256, mimetype, media.filename)
        except BaseException:
            self.store.discard(media.path)
            raise


PROXY_KEY: web.AppKey[DevProxy] = web.AppKey("dev_proxy", DevProxy)


# ---------------------------------------------------------------------------- helpers


def error_response(status: int, message: str) -> web.Response:
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


def _storable_text(text: str, where: str, repair: bool) -> str:
    text = text.replace("\x00", "")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone UTF-16 surrogate ("\ud800" in the JSON): not a character
        if not repair:
            raise ApiError(
                400, f"{where} contains a lone UTF-16 surrogate (not a character; it cannot be stored)"
            ) from None
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def _storable(value: Any, where: str, repair: bool = False) -> Any:
    if isinstance(value, str):
        return _storable_text(value, where, repair)
    if isinstance(value, list):
        return [_storable(v, f"{where}[{i}]", repair) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {_storable_text(k, f"a field name in {where}", repair): _storable(v, f"{where}.{k}", repair)
                for k, v in value.items()}
    return value


def storable(data: dict[str, Any], *, repair: tuple[str, ...] = ()) -> dict[str, Any]:
    """``data`` as it can be stored, as the Supabase kit does: NUL characters removed
    from every string; a lone surrogate is a 400, except in the fields of ``repair``
    (diagnostics), where it becomes U+FFFD."""
    return {_storable_text(k, "a field name", False): _storable(v, k, k in repair) for k, v in data.items()}


def _timestamp(value: Any) -> float | None:
    """Unix seconds (a number above 1e11 is read as milliseconds); 400 if not a time before year 10000."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, "timestamp must be a number")
    seconds = value / 1000 if value > 1e11 else value
    if not 0 <= seconds < END_OF_9999:  # also NaN and infinities
        raise ApiError(400, "timestamp is out of range (a Unix time before the year 10000)")
    return float(value)


def _instance_param(value: Any, *, name: str = "instanceId") -> str:
    if not is_valid_instance_id(value):
        raise ApiError(400, f"{name} is missing or invalid")
    return value


def _is_code(value: str) -> bool:
    return 0 < len(value) <= 64 and value.replace("_", "").isalnum() and value.islower() and value.isascii()


def _check_type(value: Any, kinds: tuple[type, ...], where: str) -> None:
    if value is not None and (not isinstance(value, kinds) or isinstance(value, bool)):
        raise ApiError(400, f"{where} has the wrong type")


def _check_inbound_content(data: dict[str, Any]) -> None:
    """The issue #11 fields of an ``/inbound`` body (all optional). ``body`` may be
    ``""`` (captionless media, a reaction, a revoke) when a type other than text is given."""
    kind = data.get("type", "text")
    if kind is None:
        kind = "text"
    if not isinstance(kind, str) or kind not in INBOUND_TYPES:
        raise ApiError(400, f"type must be one of {', '.join(sorted(INBOUND_TYPES))}")
    body = data.get("body")
    if not isinstance(body, str):
        raise ApiError(400, "body is required (a string; \"\" for media without caption)")
    if kind == "text" and not body:
        raise ApiError(400, "body is required")
    for key in ("quoted_id", "target_id", "name", "address", "media_error"):
        _opt_str(data, key)
    if data.get("media_error") is not None and data["media_error"] not in MEDIA_ERRORS:
        raise ApiError(400, f"media_error must be one of {', '.join(sorted(MEDIA_ERRORS))}")
    for key in ("latitude", "longitude"):
        _check_type(data.get(key), (int, float), key)
    media = data.get("media")
    if media is not None:
        if not isinstance(media, dict):
            raise ApiError(400, "media must be an object")
        for key in ("url", "mimetype", "filename", "sha256"):
            _check_type(media.get(key), (str,), f"media.{key}")
        for key in ("size", "seconds"):
            _check_type(media.get(key), (int,), f"media.{key}")
    for key, subkeys in (("reaction", ("emoji", "target_id")), ("contact", ("name", "vcard", "phone"))):
        value = data.get(key)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ApiError(400, f"{key} must be an object")
        for sub in subkeys:
            _check_type(value.get(sub), (str,), f"{key}.{sub}")


def lease_token(value: Any) -> int | None:
    """A ``lease_token`` field: absent/null, or a non-negative integer (400 otherwise)."""
    if value is None:
        return None
    if isinstance(value, str) and value.isdigit() and len(value) <= 18:
        return int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
        raise ApiError(400, "lease_token must be a non-negative integer")
    return value


def worker_header(request: web.Request) -> str | None:
    """The ``X-Worker-Id`` header (None when absent; 400 when malformed)."""
    value = request.headers.get("X-Worker-Id")
    if value is None:
        return None
    if not WORKER_ID_RE.fullmatch(value):
        raise ApiError(400, "X-Worker-Id must match ^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
    return value


LEASE_LOST = "lease_lost"


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


# ---------------------------------------------------------------------------- contract


async def disconnected_instances(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    return web.json_response({"instances": proxy.store.disconnected_instances()})


async def instance_settings(request: web.Request) -> web.Response:
    """``GET /instance-settings?since=<cursor>``: instances whose settings or proxy_url changed."""
    proxy = request.app[PROXY_KEY]
    raw = request.query.get("since")
    if raw is not None and not (raw.isdigit() and len(raw) <= 18):
        raise ApiError(400, "since must be a cursor this proxy gave")
    items, cursor = proxy.store.instance_settings(int(raw) if raw is not None else 0)
    return web.json_response({"instances": items, "cursor": str(cursor)})


async def update_status(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    data = storable(await _json_object(request))
    instance_id = _instance_param(data.get("instanceId"))
    status = data.get("status")
    if status not in STATUSES:
        raise ApiError(400, f"status must be one of {', '.join(STATUSES)}")
    qr_code = _opt_str(data, "qr_code")
    phone = _opt_str(data, "phone_number")
    reason = _opt_str(data, "reason")
    pair_code = _opt_str(data, "pair_code")
    ban_code = _opt_str(data, "ban_code")
    ban_expires_at = _timestamp(data.get("ban_expires_at"))
    detail = _opt_str(data, "detail")
    token = lease_token(data.get("lease_token"))
    try:
        change = proxy.store.update_status(
            instance_id, status, qr_code=qr_code, phone_number=phone, reason=reason, pair_code=pair_code,
            ban_code=ban_code, ban_expires_at=ban_expires_at, detail=detail[:500] if detail else None,
            lease_token=token,
        )
    except UnknownInstance:
        raise ApiError(404, f"unknown instance {instance_id}") from None
    except LeaseLost:
        raise proxy.lease_lost("update_status", instance_id) from None
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
    token = lease_token(request.query.get("lease_token"))
    try:
        if "instanceId" in request.query:
            instance_id = _instance_param(request.query["instanceId"])
            if not proxy.store.has_instance(instance_id):
                raise ApiError(404, f"unknown instance {instance_id}")
            messages = proxy.store.claim_messages(instance_id, limit=limit, lease_token=token)
        else:  # with X-Worker-Id: only the instances leased to the caller
            messages = proxy.store.claim_messages(None, limit=limit, worker_id=worker_header(request))
    except LeaseLost as exc:
        raise proxy.lease_lost("claim", str(exc)) from None
    for msg in messages:
        sha = msg.pop("media_sha256", None)
        if sha is not None:
            msg["media_url"] = media_url(request, sha)
    return web.json_response({"messages": messages})


async def mark_sent(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    data = storable(await _json_object(request))
    message_id = data.get("messageId")
    if not isinstance(message_id, str) or not message_id:
        raise ApiError(400, "messageId is required")
    wa_id = _opt_str(data, "wa_message_id")
    token = lease_token(data.get("lease_token"))
    try:
        msg, changed = proxy.store.mark_sent(message_id, wa_id, token)
    except LeaseLost:
        raise proxy.lease_lost("ack", message_id) from None
    except UnknownMessage:
        # 200, not 404: the worker reads a 404 from /mark-failed as "endpoint not
        # implemented" and would stop reporting failures (the Supabase kit does the same)
        return web.json_response({"ok": False, "found": False})
    if changed:
        proxy.emit("sent", msg["instanceId"], message=msg)
    return web.json_response({"ok": True, "status": msg["status"]})


async def mark_failed(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    data = storable(await _json_object(request), repair=("error",))
    message_id = data.get("messageId")
    if not isinstance(message_id, str) or not message_id:
        raise ApiError(400, "messageId is required")
    error = _opt_str(data, "error") or "unknown error"
    error_code = _opt_str(data, "error_code")
    if error_code is not None and not _is_code(error_code):
        raise ApiError(400, "error_code must be a short lower_snake_case code")
    token = lease_token(data.get("lease_token"))
    try:
        msg, changed = proxy.store.mark_failed(message_id, error[:2000], error_code, token)
    except LeaseLost:
        raise proxy.lease_lost("ack", message_id) from None
    except UnknownMessage:
        return web.json_response({"ok": False, "found": False})  # see mark_sent
    if changed:
        proxy.emit("failed", msg["instanceId"], message=msg)
    return web.json_response({"ok": True, "status": msg["status"]})


async def inbound(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    data = storable(await _json_object(request))
    instance_id = _instance_param(data.get("instanceId"))
    for key in ("wa_message_id", "from"):
        value = data.get(key)
        if not isinstance(value, str) or not value:
            raise ApiError(400, f"{key} is required")
    for key in ("to", "chat_id", "sender_id", "push_name"):
        _opt_str(data, key)
    for key in ("from_me", "is_group", "view_once", "video", "rejected"):
        if data.get(key) is not None and not isinstance(data.get(key), bool):
            raise ApiError(400, f"{key} must be a boolean")
    _timestamp(data.get("timestamp"))
    _check_inbound_content(data)
    try:
        msg, inserted = proxy.store.add_inbound(instance_id, data)
    except UnknownInstance:
        raise ApiError(404, f"unknown instance {instance_id}") from None
    if inserted:
        proxy.emit("inbound", instance_id, message=msg)
    return web.json_response({"ok": True, "duplicate": not inserted})


MAX_STATUSES = 100


async def message_status(request: web.Request) -> web.Response:
    """Receipts: each sent message keeps its latest status (never backwards)."""
    proxy = request.app[PROXY_KEY]
    data = storable(await _json_object(request))
    statuses = data.get("statuses")
    if not isinstance(statuses, list) or len(statuses) > MAX_STATUSES:
        raise ApiError(400, f"statuses must be a list of at most {MAX_STATUSES}")
    checked = []
    for st in statuses:
        if not isinstance(st, dict):
            raise ApiError(400, "each status must be an object")
        instance_id = _instance_param(st.get("instanceId"))
        wa_id = st.get("wa_message_id")
        if not isinstance(wa_id, str) or not wa_id:
            raise ApiError(400, "wa_message_id is required")
        if st.get("status") not in RECEIPT_RANK:
            raise ApiError(400, f"status must be one of {', '.join(RECEIPT_RANK)}")
        checked.append((instance_id, _opt_str(st, "messageId"), wa_id, st["status"], _timestamp(st.get("timestamp")),
                        _opt_str(st, "recipient")))
    changed = 0
    for instance_id, message_id, wa_id, status, at, recipient in checked:
        msg = proxy.store.record_receipt(instance_id, message_id, wa_id, status, at, recipient)
        if msg is not None:
            changed += 1
            proxy.emit("receipt", instance_id, message=msg)
    return web.json_response({"ok": True, "changed": changed})


# ---------------------------------------------------------------------------- dev API


def public_instance(inst: dict[str, Any], *, with_qr: bool = False) -> dict[str, Any]:
    """An instance as the dev API shows it; ``with_qr`` adds the QR (PNG data URLs only)."""
    out = {
        "id": inst["id"],
        "status": inst["status"],
        "phone_number": inst["phone_number"],
        "reason": inst["reason"],
        "reason_detail": inst.get("reason_detail"),
        "ban_code": inst["ban_code"],
        "ban_expires_at": inst["ban_expires_at"],
        "priority": inst["priority"],
        "has_qr": bool(inst["qr_code"]),
        "pair_phone": inst.get("pair_phone"),
        "pair_code": inst.get("pair_code"),
        "settings": json.loads(inst["settings"]) if inst.get("settings") else None,
        "proxy_url": _shown_proxy(inst.get("proxy_url")),
        # a fleet: who holds the instance (None: never leased)
        "lease": ({"holder": inst.get("lease_holder"), "token": inst["lease_token"],
                   "expires_at": inst.get("lease_expires_at"), "revoked": bool(inst.get("lease_revoked"))}
                  if inst.get("lease_token") else None),
        "created_at": inst["created_at"],
        "updated_at": inst["updated_at"],
    }
    if with_qr:
        qr = inst["qr_code"]
        out["qr_code"] = qr if isinstance(qr, str) and qr.startswith("data:image/png;base64,") else None
    return out


def _shown_proxy(url: str | None) -> str | None:
    """The dev API and page show a proxy_url without its credentials."""
    if url is None:
        return None
    try:
        return parse_proxy_url(url).redacted
    except ProxyProblem:
        return "(invalid)"


async def dev_list_instances(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    return web.json_response({"instances": [public_instance(i) for i in proxy.store.list_instances()]})


async def dev_add_instance(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    data = storable(await _json_object(request))
    inst = proxy.add_instance(data.get("id"), data.get("priority", 0), data.get("pair_phone"))
    return web.json_response({"instance": public_instance(inst)}, status=201)


async def dev_set_settings(request: web.Request) -> web.Response:
    """``POST /dev/instances/<id>/settings``: merge settings keys (null removes one), set proxy_url."""
    proxy = request.app[PROXY_KEY]
    instance_id = _instance_param(request.match_info["id"], name="id")
    data = storable(await _json_object(request))
    settings = data.get("settings")
    if settings is not None and not (isinstance(settings, dict) and len(settings) <= MAX_SETTINGS_KEYS and all(
            isinstance(k, str) and 0 < len(k) <= 64 and (v is None or isinstance(v, (str, int, float, bool)))
            for k, v in settings.items())):
        raise ApiError(400, f"settings must be an object of at most {MAX_SETTINGS_KEYS} keys with scalar values")
    url: Any = UNCHANGED
    if "proxy_url" in data:
        url = data["proxy_url"] or None
        if url is not None:
            try:
                parse_proxy_url(url)
            except ProxyProblem as exc:
                raise ApiError(400, str(exc)) from None
    try:
        inst = proxy.store.set_instance_settings(instance_id, settings=settings, replace=data.get("replace") is True,
                                                 proxy_url=url)
    except UnknownInstance:
        raise ApiError(404, f"no instance {instance_id}") from None
    proxy.emit("instance_settings", instance_id)
    return web.json_response({"instance": public_instance(inst)})


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
    data = storable(await read_json_object(request, max_bytes=_queue_request_bytes(proxy)))
    fields = {k: v for k, v in data.items() if k not in ("instanceId", "to", "body")}
    msg = await proxy.queue_message(data.get("instanceId"), data.get("to"), data.get("body"), fields)
    return web.json_response({"message": msg}, status=201)


def _queue_request_bytes(proxy: DevProxy) -> int:
    """A queue request may carry ``media_base64`` (4/3 of the media cap) besides the text."""
    return proxy.media_max_bytes * 4 // 3 + MAX_REQUEST_BYTES


# ---------------------------------------------------------------------------- media


def media_url(request: web.Request, sha256: str) -> str:
    """Where this proxy serves ``sha256``, on the address the caller used to reach it."""
    return f"{request.scheme}://{request.host}/media/{sha256}"


async def upload_media(request: web.Request) -> web.Response:
    """``POST /upload-media?instanceId=&wa_message_id=``: the raw bytes of a received
    message's media. Idempotent per message: a repeat answers the first upload's URL."""
    proxy = request.app[PROXY_KEY]
    instance_id = _instance_param(request.query.get("instanceId"))
    wa_id = request.query.get("wa_message_id") or ""
    if not WA_MESSAGE_ID_RE.fullmatch(wa_id):
        raise ApiError(400, "wa_message_id is missing or invalid")
    if not proxy.store.has_instance(instance_id):
        raise ApiError(404, f"unknown instance {instance_id}")
    declared_sha = request.headers.get("X-Sha256")
    existing = proxy.store.get_upload(instance_id, wa_id)
    if existing is not None:
        return web.json_response({"url": media_url(request, existing), "duplicate": True})
    if request.content_length is not None and request.content_length > proxy.media_max_bytes:
        raise ApiError(413, f"media larger than {proxy.media_max_bytes} bytes")
    filename = request.headers.get("X-Filename")
    if filename is not None:
        filename = filename.replace("/", "_").replace("\\", "_").replace("\x00", "").strip()[:255] or None
    ctype = request.headers.get("Content-Type")
    try:
        out = CappedFile(proxy.store.media_dir, proxy.media_max_bytes, "the dev proxy's cap")
    except OSError as exc:
        raise ApiError(507, f"cannot store the media ({exc.strerror or exc})") from None
    with out:
        try:
            with anyio.fail_after(UPLOAD_READ_TIMEOUT_S):
                while chunk := await request.content.readany():
                    out.write(chunk)
        except MediaError as exc:
            raise ApiError(413, str(exc)) from None
        except TimeoutError:
            raise ApiError(408, f"media not received within {UPLOAD_READ_TIMEOUT_S:g} s") from None
        except OSError as exc:
            raise ApiError(507, f"cannot store the media ({exc.strerror or exc})") from None
        if out.size == 0:
            raise ApiError(400, "the media body is empty")
        media = out.finish(ctype, filename)
    if declared_sha is not None and declared_sha.strip().lower() != media.sha256:
        proxy.store.discard(media.path)
        raise ApiError(400, "X-Sha256 does not match the bytes received")
    record = await anyio.to_thread.run_sync(proxy._keep, media, ctype)
    bound = proxy.store.record_upload(instance_id, wa_id, record["sha256"])
    return web.json_response({"url": media_url(request, bound)})


async def serve_media(request: web.Request) -> web.StreamResponse:
    """``GET /media/<sha256>``: a stored file with its type, never a path outside the media folder."""
    proxy = request.app[PROXY_KEY]
    info = proxy.store.get_media(request.match_info["sha256"])
    if info is None:
        raise ApiError(404, "no such media")
    headers = {
        "Content-Type": info["mimetype"],
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "default-src 'none'; sandbox",
        "Cache-Control": "private, max-age=3600",
    }
    # media a browser shows by itself stays inline; anything else (HTML, PDF, ...) is a download
    inline = info["mimetype"].split("/", 1)[0] in ("image", "audio", "video")
    if info["filename"] or not inline:
        headers["Content-Disposition"] = _disposition("inline" if inline else "attachment", info["filename"])
    return web.FileResponse(proxy.store.media_path(info["sha256"]), headers=headers)


def _disposition(kind: str, filename: str | None) -> str:
    if not filename:
        return kind
    ascii_name = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "_" for c in filename)
    return f"{kind}; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(filename, safe='')}"


# ---------------------------------------------------------------------------- routes


def add_api_routes(app: web.Application) -> None:
    """The contract and the dev API (``app[PROXY_KEY]`` must be set)."""
    app.router.add_get("/disconnected-instances", disconnected_instances)
    app.router.add_post("/update-status", update_status)
    app.router.add_get("/queued-messages", queued_messages)
    app.router.add_post("/mark-sent", mark_sent)
    app.router.add_post("/mark-failed", mark_failed)
    app.router.add_post("/inbound", inbound)
    app.router.add_post("/upload-media", upload_media)
    app.router.add_post("/message-status", message_status)
    app.router.add_get("/instance-settings", instance_settings)
    app.router.add_get(r"/media/{sha256:[0-9a-f]{64}}", serve_media)
    app.router.add_get("/dev/instances", dev_list_instances)
    app.router.add_post("/dev/instances", dev_add_instance)
    app.router.add_post("/dev/instances/{id}/settings", dev_set_settings)
    app.router.add_get("/dev/messages", dev_list_messages)
    app.router.add_post("/dev/messages", dev_queue_message)
