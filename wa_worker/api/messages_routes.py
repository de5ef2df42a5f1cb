"""``POST /api/instances/{id}/messages`` and ``GET /api/instances/{id}/messages/{key}``.

A POST needs an ``Idempotency-Key`` header (the message's id, per instance). It is
validated completely before anything is recorded (the model: types, sizes,
unknown fields; then the same content rules as a polled message): a refused body
is a 4xx naming the field, and its key stays unused. The answer is the message's
outcome (:class:`~.models.MessageOutcome`): ``200`` once known (``sent``,
``failed`` or ``not_sent``), ``202`` with ``Location`` while still ``pending``
after the short wait. A repeat of a key returns what became of it
(``Idempotent-Replayed: true``), never a second send; a repeat with another
body is ``409 idempotency_conflict``.
"""

from __future__ import annotations

import re

import anyio
from aiohttp import web
from pydantic import ValidationError

from ..http.common import read_json_object
from ..ids import is_valid_instance_id
from ..storage.journal import JournalUnavailable
from .errors import api_error
from .elsewhere import HolderFinder, elsewhere
from .instances_routes import ELSEWHERE, INSTANCE_ID, NOT_HERE, held
from .models import IDEMPOTENCY_KEY_PATTERN, ErrorBody, MessageOutcome, SendMessage
from .openapi import Answer, Operation, Param
from .sender import ApiSender, Refused, check_message

IDEMPOTENCY_KEY = Param("Idempotency-Key", "header", "the message's id for this instance (1-100 of A-Z a-z 0-9 "
                        "._:~+=-; a UUID fits): the same key is never sent twice", pattern=IDEMPOTENCY_KEY_PATTERN)
KEY = Param("key", "path", "the Idempotency-Key the message was sent with", pattern=IDEMPOTENCY_KEY_PATTERN)
_KEY_RE = re.compile(IDEMPOTENCY_KEY_PATTERN)
# bodies being read at once: a media_base64 body may be large
BODY_READERS = 4
_QUOTED_FIELD = re.compile(r"'([a-z_]+(?:\.[a-z_]+)?)'")


def max_body_bytes(media_max_bytes: int) -> int:
    """A request carrying ``media_base64`` of ``MEDIA_MAX_BYTES`` (base64: 4/3) and the rest of its fields."""
    return media_max_bytes * 4 // 3 + 256 * 1024


def _field_of(reason: str, code: str) -> str | None:
    """The field a content rule's reason is about (they quote it), when it says."""
    if code == "invalid_recipient":
        return "to"
    found = _QUOTED_FIELD.search(reason)
    if found is not None:
        return found.group(1)
    return "body" if "body" in reason or "caption" in reason else None


def _validation_error(exc: ValidationError) -> web.HTTPException:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or None
    kind = first.get("type", "")
    message = "unknown field" if kind == "extra_forbidden" else first.get("msg", "invalid value")
    return api_error(422, "invalid_request", f"{where}: {message}" if where else message, field=where)


def _key(request: web.Request, name: str) -> str:
    """The ``Idempotency-Key`` header, or the ``key`` path segment; a 400 naming it when unusable."""
    value = request.headers.get(name) if name == "Idempotency-Key" else request.match_info.get(name)
    if value is None or not value.strip():
        raise api_error(400, "idempotency_key_required", "send an Idempotency-Key header: the message's id (a "
                                                         "UUID fits); the same key is never sent twice", field=name)
    if not _KEY_RE.fullmatch(value.strip()):
        raise api_error(400, "invalid_idempotency_key", "an Idempotency-Key is 1-100 of A-Z a-z 0-9 ._:~+=-",
                        field=name)
    return value.strip()


def _answer(outcome: MessageOutcome, *, replayed: bool, location: str) -> web.Response:
    headers = {"Location": location}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    if outcome.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, int(outcome.retry_after_s + 0.999)))
    status = 202 if outcome.state == "pending" else 200
    return web.json_response(outcome.model_dump(mode="json", exclude_none=True), status=status, headers=headers)


def _refused(exc: Refused) -> web.HTTPException:
    headers = None
    if exc.retry_after_s is not None:
        headers = {"Retry-After": str(max(1, int(exc.retry_after_s + 0.999)))}
    return api_error(exc.status, exc.code, exc.message, headers=headers)


def _store_unavailable() -> web.HTTPException:
    return api_error(503, "store_unavailable", "the worker's journal cannot be written now (see /ready): nothing "
                                               "was sent; try again later", headers={"Retry-After": "5"})


# long: the two handlers and their OpenAPI description, read as one table
def message_operations(sender: ApiSender, *, max_body: int, finder: HolderFinder | None = None) -> list[Operation]:
    readers = anyio.CapacityLimiter(BODY_READERS)

    async def send(request: web.Request) -> web.Response:
        snap = await held(sender.instances, request, finder)  # before the body: nothing read, nothing recorded
        key = _key(request, "Idempotency-Key")
        async with readers:
            data = await read_json_object(request, max_bytes=max_body)
        try:
            message = SendMessage.model_validate(data)
        except ValidationError as exc:
            raise _validation_error(exc) from None
        problem = check_message(snap.instance_id, message)
        if problem is not None:
            code, reason = problem
            raise api_error(422, code, reason, field=_field_of(reason, code))
        try:
            outcome, started = await sender.submit(snap.instance_id, key, message)
        except Refused as exc:
            raise _refused(exc) from None
        except JournalUnavailable:
            raise _store_unavailable() from None
        return _answer(outcome, replayed=not started,
                       location=f"/api/instances/{snap.instance_id}/messages/{key}")

    async def get_outcome(request: web.Request) -> web.Response:
        iid = request.match_info["id"]
        key = _key(request, "key")
        if not is_valid_instance_id(iid):  # no ':' in an id: api:<id>:<key> names one message
            raise api_error(404, "message_not_found", "no such instance id")
        try:
            outcome = sender.outcome(iid, key)
        except Refused as exc:
            if exc.code == "message_not_found" and sender.instances.snapshot(iid) is None:
                # not sent here, and the instance is not here: its holder's journal may have it
                raise (await elsewhere(finder, request, iid)) or _refused(exc) from None
            raise _refused(exc) from None
        except JournalUnavailable:
            raise _store_unavailable() from None
        body = outcome.model_dump(mode="json", exclude_none=True)
        return web.json_response(body, headers={"Retry-After": "1"} if outcome.state == "pending" else None)

    conflict = Answer("idempotency_conflict (the key was used with another body) or instance_not_connected "
                      "(nothing recorded)", ErrorBody)
    return [
        Operation("post", "/instances/{id}/messages", send, "sendMessage",
                  "send a message once per Idempotency-Key (every type a queued message can have)",
                  body=SendMessage, params=(INSTANCE_ID, IDEMPOTENCY_KEY),
                  answers={200: Answer("the outcome: sent (wa_message_id), failed (error_code) or not_sent (nothing "
                                       "was sent: the same request may be repeated)", MessageOutcome,
                                       headers=("Location", "Retry-After")),
                           202: Answer("still pending after the short wait: read the outcome at Location",
                                       MessageOutcome, headers=("Location",)),
                           400: Answer("no or bad Idempotency-Key, or a body that is not a JSON object", ErrorBody),
                           307: ELSEWHERE, 404: NOT_HERE, 409: conflict,
                           413: Answer("body larger than MEDIA_MAX_BYTES as base64", ErrorBody),
                           422: Answer("a field is wrong (error.field names it); nothing recorded", ErrorBody),
                           503: Answer("the journal is not writable, or too many sends in progress (Retry-After)",
                                       ErrorBody, headers=("Retry-After",))}),
        Operation("get", "/instances/{id}/messages/{key}", get_outcome, "getMessage",
                  "what became of a message sent with that Idempotency-Key",
                  params=(INSTANCE_ID, KEY),
                  answers={200: Answer("its outcome (pending: ask again)", MessageOutcome),
                           307: Answer("in a fleet: not sent through this worker, and another worker holds the "
                                       "instance (instance_elsewhere): ask Location", ErrorBody, headers=("Location",)),
                           400: Answer("a key that cannot be one", ErrorBody),
                           404: Answer("message_not_found", ErrorBody)}),
    ]
