"""The direct API's bodies, both ways: the pydantic models that validate requests and
describe answers. ``/api/openapi.json`` is generated from these same models
(:mod:`.openapi`), so the document cannot drift from what the routes accept.

A message body is a queued message's record (docs/proxy-contract.md, "Message
types") without its ``id``: the ``Idempotency-Key`` header is the id. The model
checks types and sizes (an error names the field); what a message *means*
(a caption on a voice note, a reaction without ``reply_to``...) is checked by
the same :func:`~wa_worker.edge.models.parse_messages` as a polled message.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..edge.models import MAX_BODY_CHARS
from ..messages import MAX_BASE64_CHARS, MAX_FILENAME_CHARS, MAX_REACTION_CHARS, MAX_SHORT_CHARS, MAX_URL_CHARS, \
    MAX_VCARD_CHARS

# the journal id api:<instance (128)>:<key> stays within a message id's 256 characters
IDEMPOTENCY_KEY_PATTERN = r"^[A-Za-z0-9._:~+=-]{1,100}$"

MessageType = Literal["text", "image", "video", "audio", "voice", "document", "sticker", "location", "contact",
                      "reaction"]


class _Request(BaseModel):
    # unknown fields are refused (a typo is an error, not a silently ignored field); no coercion
    model_config = ConfigDict(extra="forbid", strict=True)


class _Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ContactIn(_Request):
    """A contact card from a name and a phone number (or your own ``vcard``)."""

    name: str | None = Field(default=None, max_length=MAX_SHORT_CHARS)
    phone: str | None = Field(default=None, max_length=64)
    vcard: str | None = Field(default=None, max_length=MAX_VCARD_CHARS)


class SendMessage(_Request):
    """A message to send: a queued message's fields (docs/proxy-contract.md, "Message types")."""

    to: str = Field(max_length=320, description="a phone number (digits, optional +, spaces, dashes), or a JID "
                                                "ending in @s.whatsapp.net, @g.us or @lid")
    type: MessageType | None = Field(default=None, description="text by default; with media and no type, inferred from "
                                                       "the media type")
    body: str | None = Field(default=None, max_length=MAX_BODY_CHARS, description="the text, or the caption (image, "
                                                                          "video, document)")
    media_url: str | None = Field(default=None, max_length=MAX_URL_CHARS, description="http(s) URL the worker downloads")
    media_base64: str | None = Field(default=None, max_length=MAX_BASE64_CHARS,
                                     description="the bytes, base64 or a data: URL (exactly one of media_url, "
                                                 "media_base64)")
    mimetype: str | None = Field(default=None, max_length=255)
    filename: str | None = Field(default=None, max_length=MAX_FILENAME_CHARS)
    reply_to: str | None = Field(default=None, max_length=128, description="the wa_message_id of a message this instance "
                                                                   "sent or received: quoted (or reacted to)")
    reaction: str | None = Field(default=None, max_length=MAX_REACTION_CHARS, description="an emoji; \"\" removes ours")
    latitude: float | None = Field(default=None, ge=-90, le=90)
    longitude: float | None = Field(default=None, ge=-180, le=180)
    name: str | None = Field(default=None, max_length=MAX_SHORT_CHARS)
    address: str | None = Field(default=None, max_length=MAX_SHORT_CHARS)
    contact: ContactIn | None = None
    vcard: str | None = Field(default=None, max_length=MAX_VCARD_CHARS)


class ErrorDetail(_Answer):
    code: str = Field(description="machine-readable: unauthorized, rate_limited, not_found, instance_not_here, "
                                  "instance_elsewhere, invalid_request, idempotency_conflict, ...")
    message: str = Field(description="for people; never echoes the request")
    field: str | None = Field(default=None, description="the request field at fault (validation errors)")
    worker_id: str | None = Field(default=None, description="in a fleet: the worker that holds the instance "
                                                            "(instance_elsewhere, instance_not_here when known)")
    location: str | None = Field(default=None, description="instance_elsewhere: the same request at that worker "
                                                           "(as the Location header)")


class ErrorBody(_Answer):
    error: ErrorDetail


class Instance(_Answer):
    id: str
    status: Literal["CONNECTING", "CONNECTED", "DISCONNECTED"] | None = Field(
        description="what the worker last reported to the proxy (null before the first report)")
    state: Literal["starting", "connecting", "connected", "reconnecting", "stopped"] = Field(
        description="the worker's own view: reconnecting = waiting before the next attempt")
    since: float | None = Field(description="when the status began, epoch seconds")
    phone_number: str | None = None
    jid: str | None = None
    push_name: str | None = None
    qr_available: bool = Field(description="a QR code waits to be scanned: GET .../qr")
    reason: str | None = Field(default=None, description="the latest DISCONNECTED reason (kept after a reconnect)")
    detail: str | None = Field(default=None, description="what went wrong, for people, when known")
    reason_at: float | None = Field(default=None, description="when that reason was reported, epoch seconds")
    ban_code: str | None = None
    ban_expires_at: int | None = None


class InstanceList(_Answer):
    instances: list[Instance]


class Qr(_Answer):
    qr: str = Field(description="data:image/png;base64,... (ask with Accept: image/png for the bytes)")
    pair_code: str | None = Field(default=None, description="when pairing by phone number: the code to type on the phone")


class MessageOutcome(_Answer):
    id: str = Field(description="the Idempotency-Key")
    instance_id: str
    state: Literal["pending", "sent", "failed", "not_sent"] = Field(
        description="pending: being handled; sent; failed (final: error_code); not_sent: ended before reaching "
                    "WhatsApp (error_code says why): the same request with the same key may be sent again")
    wa_message_id: str | None = None
    error_code: str | None = None
    error: str | None = None
    retry_after_s: float | None = Field(default=None, description="not_sent: when trying again makes sense")


class EventOut(_Answer):
    """One event of ``GET /api/events`` (the ``data:`` line of its SSE frame)."""

    seq: int = Field(description="the stream's sequence number (also the frame's id: resume with Last-Event-ID)")
    type: Literal["status", "inbound", "send", "receipt"]
    instanceId: str
    at: float = Field(description="when the worker saw it, epoch seconds")
    payload: dict[str, Any] = Field(description="by type: docs/api.md, Live events")
