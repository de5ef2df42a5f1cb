"""The simulated phone's controls, mounted by the daemon under ``/simulator/``
only with the simulator backend (the parent app's bearer check covers them).

    GET  /simulator/instances                     every simulated session
    POST /simulator/instances/{id}/scan           scan the current QR code
    POST /simulator/instances/{id}/enter-code     {"code"}: enter the pairing code on the phone (409: wrong)
    POST /simulator/instances/{id}/inbound        {"from", "body", "chat_id"?, "push_name"?, "is_group"?, "from_me"?,
                                                   "type"?, "media_base64"?, "mimetype"?, "filename"?, "caption"?,
                                                   "reply_to"?, "latitude"?, "longitude"?, "name"?, "address"?,
                                                   "reaction"? + "target_id"?, "contact"? | "vcard"?, "view_once"?,
                                                   "sender_pn"? (the phone number of a "…@lid" sender)}
    GET  /simulator/instances/{id}/sent           what the worker sent through it (every field of the sent log)
    POST /simulator/instances/{id}/drop           drop the connection
    POST /simulator/instances/{id}/logout         unlink the phone
    POST /simulator/instances/{id}/fail-sends     {"count"}: the next sends fail
    POST /simulator/instances/{id}/fail-connects  {"count"}: the next connects fail
    POST /simulator/instances/{id}/stall-connects {"count"}: the next connects hang
    POST /simulator/instances/{id}/receipt        {"wa_message_id", "status"}: delivered | read | played
    POST /simulator/instances/{id}/call           {"from", "video"?}: an incoming call (rejects: GET /instances)
    POST /simulator/instances/{id}/ban            {"code"?, "expire_s"}: a temporary ban (connects refused until then)
    POST /simulator/crash-after-next-send         the process dies right after the next send
    POST /simulator/numbers                       {"registered": ["5511…", …] | null}: the numbers on WhatsApp
    GET  /simulator/numbers                       {"registered", "lookups": {instance: calls}}

``type: "undecryptable"`` on ``/inbound`` is a message that arrived but could not be decrypted.

A control that does not fit the instance's state is a 409.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from ..backends.base import ReceiptStatus
from ..backends.simulator import SimulatorBackend, SimulatorError, SimulatorSession
from ..ids import is_valid_instance_id
from ..messages import MEDIA_KINDS, WA_MESSAGE_ID_RE, ContentError, Kind, parse_content
from .common import http_error, json_response, read_json_object

MOUNT_AT = "/simulator/"
MAX_BODY = 64 * 1024
MAX_INBOUND_BODY = 24 * 1024 * 1024  # a received message with its media, base64 in JSON
MAX_MEDIA_BYTES = 16 * 1024 * 1024
MAX_TEXT_CHARS = 65536


class _BadInbound(ValueError):
    """A simulated received message that does not make sense (HTTP 400)."""


def _opt_text(data: dict[str, Any], key: str, max_chars: int = 1024) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > max_chars:
        raise _BadInbound(f"'{key}' must be a string of at most {max_chars} characters")
    return value


def _wa_id(data: dict[str, Any], key: str) -> str | None:
    value = _opt_text(data, key, 128)
    if value is not None and not WA_MESSAGE_ID_RE.fullmatch(value):
        raise _BadInbound(f"'{key}' is not a WhatsApp message id")
    return value


_NOT_INBOUND = frozenset({Kind.UNKNOWN, Kind.CALL})  # a call has its own route


def inbound_fields(data: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of :meth:`SimulatorSession.receive` for a simulated
    received message; raises :class:`_BadInbound` saying what is wrong."""
    raw_kind = data.get("type", "text")
    try:
        kind = Kind(raw_kind) if isinstance(raw_kind, str) else None
    except ValueError:
        kind = None
    if kind is None or kind in _NOT_INBOUND:
        raise _BadInbound(f"'type' must be one of: {', '.join(k.value for k in Kind if k not in _NOT_INBOUND)}")
    body = _opt_text(data, "body", MAX_TEXT_CHARS)
    caption = _opt_text(data, "caption", MAX_TEXT_CHARS)
    pn = _opt_text(data, "sender_pn", 32)
    if pn is not None and not pn.isdigit():
        raise _BadInbound("'sender_pn' must be the digits of a phone number")
    fields: dict[str, Any] = {"sender_pn": pn, "kind": kind, "reply_to": _wa_id(data, "reply_to"),
                              "view_once": data.get("view_once") is True}
    if kind in (Kind.TEXT, Kind.EDIT):
        if not body:
            raise _BadInbound("a non-empty 'body' string is required")
        fields["body"] = body
    else:
        fields["body"] = caption or body or ""
    if kind in (Kind.EDIT, Kind.REVOKE, Kind.REACTION):
        fields["target_id"] = _wa_id(data, "target_id")
        if fields["target_id"] is None:
            raise _BadInbound(f"a {kind.value} needs 'target_id': the id of the message it refers to")
    if kind in MEDIA_KINDS:
        encoded = _opt_text(data, "media_base64", MAX_INBOUND_BODY)
        if not encoded:
            raise _BadInbound(f"a {kind.value} needs 'media_base64'")
        try:
            media = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise _BadInbound("'media_base64' is not base64") from None
        if len(media) > MAX_MEDIA_BYTES:
            raise _BadInbound(f"'media_base64' decodes to more than {MAX_MEDIA_BYTES} bytes")
        fields.update(media=media, mimetype=_opt_text(data, "mimetype", 255), filename=_opt_text(data, "filename", 255))
    elif kind is Kind.REACTION:
        emoji = _opt_text(data, "reaction", 32)
        if emoji is None:
            raise _BadInbound("a reaction needs 'reaction' (an emoji, or \"\" when removed)")
        fields["reaction"] = emoji
    elif kind in (Kind.LOCATION, Kind.CONTACT):
        try:
            content = parse_content({k: v for k, v in data.items() if k not in ("body", "caption", "reply_to")})
        except ContentError as exc:
            raise _BadInbound(str(exc)) from None
        fields.update(location=content.location, contact=content.contact)
    return fields
MAX_COUNT = 1_000_000


@web.middleware
async def _conflicts(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except SimulatorError as exc:  # a control request that does not fit the instance's state
        return json_response({"error": str(exc)}, 409)


# long: one short closure per route over the same backend, read as a table
def simulator_app(sim: SimulatorBackend) -> web.Application:
    """A sub-application to mount at :data:`MOUNT_AT`."""
    app = web.Application(middlewares=[_conflicts])

    def session_of(request: web.Request) -> SimulatorSession:
        iid = request.match_info["id"]
        if not is_valid_instance_id(iid) or iid not in sim.sessions:
            raise http_error(404, "no such simulated instance")
        return sim.sessions[iid]

    async def instances(_: web.Request) -> web.Response:
        return json_response([s.describe() for s in sim.sessions.values()])

    async def scan(request: web.Request) -> web.Response:
        session_of(request).scan()
        return json_response({"ok": True})

    async def enter_code(request: web.Request) -> web.Response:
        s = session_of(request)
        code = (await read_json_object(request, max_bytes=MAX_BODY)).get("code")
        if not isinstance(code, str) or len(code) > 32:
            return json_response({"error": "'code' is a required string"}, 400)
        s.enter_code(code)
        return json_response({"ok": True})

    async def inbound(request: web.Request) -> web.Response:
        s = session_of(request)
        data = await read_json_object(request, max_bytes=MAX_INBOUND_BODY)
        frm = data.get("from")
        if not isinstance(frm, str):
            return json_response({"error": "'from' is a required string"}, 400)
        chat_id = data.get("chat_id")
        push_name = data.get("push_name")
        try:
            fields = inbound_fields(data)
            body = fields.pop("body")
            wa_id = await s.receive(frm, body, chat_id=chat_id if isinstance(chat_id, str) else None,
                                    push_name=push_name if isinstance(push_name, str) else None,
                                    is_group=bool(data.get("is_group", False)),
                                    from_me=bool(data.get("from_me", False)), **fields)
        except ValueError as exc:  # an unusable 'from' / 'chat_id', or content that makes no sense
            return json_response({"error": str(exc)}, 400)
        return json_response({"wa_message_id": wa_id})

    async def sent(request: web.Request) -> web.Response:
        return json_response(sim.sent(session_of(request).instance_id))

    async def drop(request: web.Request) -> web.Response:
        await session_of(request).drop()
        return json_response({"ok": True})

    async def logout(request: web.Request) -> web.Response:
        await session_of(request).logout()
        return json_response({"ok": True})

    def counter(table: dict[str, int]) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            iid = request.match_info["id"]
            if not is_valid_instance_id(iid):
                return json_response({"error": "invalid instance id"}, 400)
            data = await read_json_object(request, max_bytes=MAX_BODY)
            count = data.get("count")
            if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= MAX_COUNT:
                return json_response({"error": "'count' must be an integer >= 0"}, 400)
            table[iid] = count
            return json_response({"ok": True, "count": count})

        return handler

    async def receipt(request: web.Request) -> web.Response:
        s = session_of(request)
        data = await read_json_object(request, max_bytes=MAX_BODY)
        wa_id, raw = data.get("wa_message_id"), data.get("status")
        if not isinstance(wa_id, str) or not WA_MESSAGE_ID_RE.fullmatch(wa_id):
            return json_response({"error": "'wa_message_id' must be a WhatsApp message id"}, 400)
        if raw not in tuple(ReceiptStatus):
            return json_response({"error": "'status' must be one of: delivered, read, played"}, 400)
        await s.receipt(wa_id, ReceiptStatus(raw))
        return json_response({"ok": True})

    async def call(request: web.Request) -> web.Response:
        s = session_of(request)
        data = await read_json_object(request, max_bytes=MAX_BODY)
        frm, video = data.get("from"), data.get("video", False)
        if not isinstance(frm, str) or not isinstance(video, bool):
            return json_response({"error": "'from' is a required string, 'video' a boolean"}, 400)
        try:
            call_id = await s.call(frm, video)
        except ValueError as exc:  # an unusable 'from'
            return json_response({"error": str(exc)}, 400)
        return json_response({"call_id": call_id})

    async def ban(request: web.Request) -> web.Response:
        s = session_of(request)
        data = await read_json_object(request, max_bytes=MAX_BODY)
        code, expire = data.get("code", "unknown"), data.get("expire_s")
        if not isinstance(code, str) or not 0 < len(code) <= 64:
            return json_response({"error": "'code' must be a short string"}, 400)
        if not isinstance(expire, (int, float)) or isinstance(expire, bool) or not 0 < expire <= 30 * 86400:
            return json_response({"error": "'expire_s' must be a number of seconds > 0 (at most 30 days)"}, 400)
        await s.ban(code, float(expire))
        return json_response({"ok": True})

    async def crash_after_send(_: web.Request) -> web.Response:
        sim.crash_after_send = True
        return json_response({"ok": True})

    async def set_numbers(request: web.Request) -> web.Response:
        data = await read_json_object(request, max_bytes=MAX_BODY * 16)
        numbers = data.get("registered")
        if numbers is not None and not (isinstance(numbers, list) and all(
                isinstance(n, str) and n.isdigit() and len(n) <= 20 for n in numbers)):
            return json_response({"error": "'registered' must be a list of digit strings, or null"}, 400)
        sim.set_registered(numbers)
        return json_response({"ok": True})

    async def numbers(_: web.Request) -> web.Response:
        registered = None if sim.registered is None else sorted(sim.registered)
        return json_response({"registered": registered, "lookups": dict(sim.lookups)})

    app.router.add_get("/instances", instances)
    app.router.add_post("/numbers", set_numbers)
    app.router.add_get("/numbers", numbers)
    app.router.add_post("/instances/{id}/scan", scan)
    app.router.add_post("/instances/{id}/enter-code", enter_code)
    app.router.add_post("/instances/{id}/inbound", inbound)
    app.router.add_get("/instances/{id}/sent", sent)
    app.router.add_post("/instances/{id}/drop", drop)
    app.router.add_post("/instances/{id}/logout", logout)
    app.router.add_post("/instances/{id}/fail-sends", counter(sim.fail_sends))
    app.router.add_post("/instances/{id}/fail-connects", counter(sim.fail_connects))
    app.router.add_post("/instances/{id}/stall-connects", counter(sim.stall_connects))
    app.router.add_post("/instances/{id}/receipt", receipt)
    app.router.add_post("/instances/{id}/call", call)
    app.router.add_post("/instances/{id}/ban", ban)
    app.router.add_post("/crash-after-next-send", crash_after_send)
    return app


def mount_simulator_routes(app: web.Application, sim: SimulatorBackend) -> None:
    app.add_subapp(MOUNT_AT, simulator_app(sim))
