"""Typed boundary with the edge proxy.

Tolerant reader: every response shape the proxy family uses is accepted,
unknown fields are ignored, and each bad record is rejected on its own
(logged and counted) without losing the good ones. Strict writer: status
and acknowledgement requests are built from models with every contract field
present. The ``/inbound`` body is built by ``relays.inbound.inbound_payload``
and stored in the journal as it is posted.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

from ..config import WORKER_ID_RE, check_public_url
from ..ids import InvalidRecipient, is_valid_instance_id, normalize_recipient
from ..messages import Content, ContentError, Kind, parse_content
from ..upstream import ProxyChoice, proxy_choice


class Status(str, enum.Enum):
    CONNECTING = "CONNECTING"
    CONNECTED = "CONNECTED"
    DISCONNECTED = "DISCONNECTED"


# ----------------------------------------------------------------- what we read


@dataclass(frozen=True, slots=True)
class InstanceRef:
    """A discovery item. ``settings``: the instance's own settings (pacing, calls;
    docs/proxy-contract.md); ``pair_phone``: digits of the phone to pair with a code
    instead of a QR; ``proxy``: its ``proxy_url`` (None: the item did not say)."""

    id: str
    priority: int = 0
    settings: dict[str, Any] | None = None
    pair_phone: str | None = None
    proxy: ProxyChoice | None = None
    settings_cleared: bool = False  # "settings": null (back to the worker's defaults)


@dataclass(frozen=True, slots=True)
class InstanceSettings:
    """One item of ``/instance-settings``: ``settings`` None and ``proxy`` None
    leave what the worker has; ``settings_cleared``: back to the defaults."""

    id: str
    settings: dict[str, Any] | None = None
    proxy: ProxyChoice | None = None
    settings_cleared: bool = False


def _settings_and_proxy(item: dict[str, Any], rejected: list[str]
                        ) -> tuple[dict[str, Any] | None, bool, ProxyChoice | None]:
    """An item's ``settings`` (an object; ``null`` clears) and ``proxy_url`` (absent: unchanged)."""
    raw = item.get("settings")
    settings = raw if isinstance(raw, dict) else None
    if raw is not None and settings is None:
        rejected.append("invalid_settings")
    if settings is not None and len(settings) > MAX_SETTINGS_KEYS:
        rejected.append("invalid_settings")
        settings = None
    cleared = "settings" in item and raw is None
    proxy = proxy_choice(item["proxy_url"]) if "proxy_url" in item else None
    if proxy is not None and proxy.problem is not None:
        rejected.append("invalid_proxy_url")
    return settings, cleared, proxy


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    """A message from ``/queued-messages``.

    ``jid`` is the normalized recipient and ``content`` what to send (``None``:
    the text ``body``); when the record cannot be sent, ``problem`` says why and
    ``error_code`` names it (the relay reports both with ``/mark-failed``).
    ``type_given``: the record named its ``type`` (otherwise a media kind is
    inferred from the file's sniffed type).
    """

    id: str
    to: str
    body: str
    jid: str | None
    problem: str | None = None
    instance_id: str | None = None
    content: Content | None = None
    error_code: str | None = None
    type_given: bool = False
    # leases (docs/proxy-contract.md): the lease token it was claimed under (None: no leases) and
    # whether another token claimed it before without an acknowledgement (its send may have happened)
    lease_token: int | None = None
    prior_claim: bool = False


def _list_from(payload: Any, key: str) -> list[Any] | None:
    if isinstance(payload, list):
        return payload
    if isinstance(payload, dict):
        inner = payload.get(key)
        if isinstance(inner, list):
            return inner
        # {"data": [...]} is what supabase-js hands back; accept it too
        inner = payload.get("data")
        if isinstance(inner, list):
            return inner
    return None


MAX_MESSAGE_ID_CHARS = 256
# WhatsApp's own limit on a text message
MAX_BODY_CHARS = 65536
MAX_PRIORITY = 1_000_000_000


def _utf8(value: str) -> bool:
    """False for strings with lone surrogates (JSON ``"\\ud800"``): SQLite and
    every encoder downstream refuse them."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _priority(value: Any) -> int | None:
    """An integral priority within +/-1e9 (``10``, ``10.0``, ``"10"``); None if it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and len(value) <= 12:
        try:
            value = int(value.strip())
        except ValueError:
            return None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and -MAX_PRIORITY <= value <= MAX_PRIORITY:
        return value
    return None


def parse_instances(payload: Any, rejected: list[str]) -> list[InstanceRef] | None:
    """``[{"id"}]``, ``{"instances": [{"id","priority"}]}`` or ``["id"]``.
    Returns ``None`` when the payload has no list at all. A priority that is not
    an integer (``Infinity``, ``1.5``, ``true``, 5000 digits) counts as 0
    (``invalid_priority``)."""
    items = _list_from(payload, "instances")
    if items is None:
        return None
    out: list[InstanceRef] = []
    seen: set[str] = set()
    for item in items:
        raw_id: Any = item.get("id", item.get("instanceId")) if isinstance(item, dict) else item
        if isinstance(raw_id, int) and not isinstance(raw_id, bool):
            raw_id = str(raw_id)
        if not is_valid_instance_id(raw_id):
            rejected.append("invalid_instance_id")
            continue
        prio = 0
        if isinstance(item, dict) and item.get("priority") is not None:
            valid = _priority(item["priority"])
            if valid is None:
                rejected.append("invalid_priority")
            else:
                prio = valid
        if raw_id in seen:
            continue
        seen.add(raw_id)
        settings, cleared, proxy = _settings_and_proxy(item, rejected) if isinstance(item, dict) else (None, False, None)
        pair_phone = item.get("pair_phone") if isinstance(item, dict) else None
        if isinstance(pair_phone, int) and not isinstance(pair_phone, bool):
            pair_phone = str(pair_phone)
        if pair_phone is not None and not (isinstance(pair_phone, str) and pair_phone.isdigit()
                                           and 8 <= len(pair_phone) <= 15):
            rejected.append("invalid_pair_phone")
            pair_phone = None
        out.append(InstanceRef(raw_id, prio, settings, pair_phone, proxy, cleared))
    return out


MAX_SETTINGS_KEYS = 64
MAX_CURSOR_CHARS = 512


def parse_instance_settings(payload: Any, rejected: list[str]) -> tuple[list[InstanceSettings], str | None] | None:
    """``{"instances": [{"id", "settings", "proxy_url"}], "cursor"}`` (or a bare list).
    ``None``: no list at all. A bad item is skipped (counted); a bad cursor is
    dropped (the next call asks for everything again)."""
    items = _list_from(payload, "instances")
    if items is None:
        return None
    out: list[InstanceSettings] = []
    for item in items:
        if not isinstance(item, dict):
            rejected.append("settings_not_object")
            continue
        raw_id = item.get("id", item.get("instanceId"))
        if isinstance(raw_id, int) and not isinstance(raw_id, bool):
            raw_id = str(raw_id)
        if not isinstance(raw_id, str) or not is_valid_instance_id(raw_id):
            rejected.append("invalid_instance_id")
            continue
        settings, cleared, proxy = _settings_and_proxy(item, rejected)
        out.append(InstanceSettings(raw_id, settings, proxy, cleared))
    cursor = payload.get("cursor") if isinstance(payload, dict) else None
    if isinstance(cursor, int) and not isinstance(cursor, bool):
        cursor = str(cursor)
    if cursor is not None and not (isinstance(cursor, str) and 0 < len(cursor) <= MAX_CURSOR_CHARS
                                   and cursor.isprintable() and _utf8(cursor)):
        rejected.append("invalid_cursor")
        cursor = None
    return out, cursor


# the optional content fields of a record (docs/proxy-contract.md, "Message types")
_CONTENT_STRINGS = ("type", "mimetype", "filename", "reply_to", "reaction", "name", "address", "vcard", "media_url")


def _not_unicode(item: dict[str, Any]) -> str | None:
    """The first content field holding a string that is not valid Unicode (a lone surrogate)."""
    for key in _CONTENT_STRINGS:
        value = item.get(key)
        if isinstance(value, str) and not _utf8(value):
            return key
    contact = item.get("contact")
    if isinstance(contact, dict):
        for key, value in contact.items():
            if isinstance(value, str) and not _utf8(value):
                return f"contact.{key}"
    return None


def _content(item: dict[str, Any], body: Any) -> tuple[Content | None, str | None, str | None]:
    """(content, problem, error_code) of a record whose id and recipient are fine."""
    try:
        content = parse_content(item)
    except ContentError as exc:
        return None, str(exc), exc.code
    if isinstance(body, str):
        if len(body) > MAX_BODY_CHARS:
            return None, f"body longer than {MAX_BODY_CHARS} characters", "invalid_message"
        if not _utf8(body):
            return None, "body is not valid Unicode", "invalid_message"
    bad = _not_unicode(item)
    if bad is not None:
        return None, f"'{bad}' is not valid Unicode", "invalid_message"
    return content, None, None


# long: the tolerant reader of one record, field by field, each rejection with its reason
def parse_messages(payload: Any, rejected: list[str], *, batch: bool = False) -> list[QueuedMessage] | None:
    """``[{"id","to","body"}]`` or ``{"messages": [...]}``; in batch mode each
    record must also carry a valid ``instanceId``. ``None``: no list at all.
    A record without a usable id is skipped (it cannot be reported); any other
    defect (too long an id, bad ``to``, empty or oversized body, content that
    :func:`~wa_worker.messages.parse_content` refuses) becomes its ``problem``
    and ``error_code``, reported with ``/mark-failed``."""
    items = _list_from(payload, "messages")
    if items is None:
        return None
    out: list[QueuedMessage] = []
    for item in items:
        if not isinstance(item, dict):
            rejected.append("message_not_object")
            continue
        raw_id = item.get("id", item.get("messageId"))
        if isinstance(raw_id, int) and not isinstance(raw_id, bool):
            raw_id = str(raw_id)
        if not isinstance(raw_id, str) or not raw_id.strip():
            rejected.append("message_without_id")
            continue
        if not _utf8(raw_id):
            rejected.append("message_id_not_unicode")
            continue
        instance_id = item.get("instanceId", item.get("instance_id"))
        if batch and not is_valid_instance_id(instance_id):
            rejected.append("message_invalid_instance_id")
            continue
        to = item.get("to")
        body = item.get("body", item.get("text"))
        problem: str | None = None
        code: str | None = None
        jid: str | None = None
        content: Content | None = None
        if len(raw_id) > MAX_MESSAGE_ID_CHARS:
            problem, code = f"message id longer than {MAX_MESSAGE_ID_CHARS} characters", "invalid_message"
        elif not isinstance(to, str):
            problem, code = "invalid recipient: recipient is not a string", "invalid_recipient"
        else:
            try:
                jid = normalize_recipient(to)
            except InvalidRecipient as exc:
                problem, code = f"invalid recipient: {exc}", "invalid_recipient"
        if problem is None:
            content, problem, code = _content(item, body)
        if problem is not None:
            jid = None
            content = None
        out.append(
            QueuedMessage(
                id=raw_id,
                to=to[:320] if isinstance(to, str) and _utf8(to) else type(to).__name__,
                body=body if isinstance(body, str) and problem is None else "",
                jid=jid,
                problem=problem,
                instance_id=instance_id if is_valid_instance_id(instance_id) else None,
                # a plain text message stays as the first contract had it: content None
                content=None if content is None or _plain_text(content) else content,
                error_code=code,
                type_given=item.get("type") is not None,
                lease_token=lease_token_of(item.get("lease_token")),
                prior_claim=item.get("prior_claim") is True,
            )
        )
    return out


MAX_LEASE_TOKEN = 2**63 - 1


def lease_token_of(value: Any) -> int | None:
    """A lease token: a non-negative integer (``17``, ``"17"``); None for anything else."""
    if isinstance(value, str) and value.isdigit() and len(value) <= 19:
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_LEASE_TOKEN:
        return value
    return None


@dataclass(frozen=True, slots=True)
class Lease:
    """One item of ``POST /leases``'s ``leases``: the instance, its token and, when the item
    carries the discovery fields (a new grant), ``ref`` (priority, settings, proxy_url, pair_phone)."""

    instance_id: str
    token: int
    ref: InstanceRef | None = None


@dataclass(frozen=True, slots=True)
class LeaseHolder:
    """``GET /lease-holder``'s answer: the worker holding an instance's lease and, when that worker
    said it (``API_PUBLIC_URL``), where API clients reach it."""

    instance_id: str
    worker_id: str
    api_url: str | None = None


def parse_lease_holder(payload: Any, instance_id: str, rejected: list[str]) -> LeaseHolder | None:
    """``{"instanceId", "worker_id", "api_url"}`` for ``instance_id``; None when it is not that
    (another instance, no usable worker id). An unusable ``api_url`` is dropped (counted): the
    holder is still named, there is only nowhere to send the client."""
    if not isinstance(payload, dict) or payload.get("instanceId") != instance_id:
        rejected.append("holder_not_this_instance")
        return None
    worker = payload.get("worker_id")
    if not isinstance(worker, str) or not WORKER_ID_RE.fullmatch(worker):
        rejected.append("holder_invalid_worker_id")
        return None
    url = payload.get("api_url")
    if url is not None:
        try:
            url = check_public_url(url) if isinstance(url, str) else None
        except ValueError:
            url = None
        if url is None:
            rejected.append("holder_invalid_api_url")
    return LeaseHolder(instance_id, worker, url)


MIN_LEASE_TTL_S = 1.0
MAX_LEASE_TTL_S = 3600.0
_GRANT_FIELDS = ("priority", "settings", "proxy_url", "pair_phone")


def parse_leases(payload: Any, rejected: list[str]) -> tuple[float, list[Lease]] | None:
    """``{"ttl_s", "leases": [{"instanceId", "token", ...}]}``; None when the answer is not that
    (no list, no usable ``ttl_s``: the renewal counts as failed). A bad item is skipped (counted)."""
    if not isinstance(payload, dict) or not isinstance(payload.get("leases"), list):
        return None
    ttl = payload.get("ttl_s")
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not math.isfinite(ttl) \
            or not MIN_LEASE_TTL_S <= ttl <= MAX_LEASE_TTL_S:
        rejected.append("invalid_ttl")
        return None
    out: list[Lease] = []
    seen: set[str] = set()
    for item in payload["leases"]:
        if not isinstance(item, dict):
            rejected.append("lease_not_object")
            continue
        token = lease_token_of(item.get("token"))
        refs = parse_instances([item], rejected)
        if token is None or not refs:
            rejected.append("invalid_lease")
            continue
        ref = refs[0]
        if ref.id in seen:
            continue
        seen.add(ref.id)
        out.append(Lease(ref.id, token, ref if any(k in item for k in _GRANT_FIELDS) else None))
    return float(ttl), out


def parse_requeued(payload: Any, rejected: list[str]) -> list[str] | None:
    """``requeued`` of a ``POST /leases`` answer: the ids of the handed-back claims the proxy put
    back to queued; None when the answer has no such field (a proxy that ignores ``unsent``)."""
    if not isinstance(payload, dict) or "requeued" not in payload:
        return None
    ids = payload["requeued"]
    if not isinstance(ids, list):
        rejected.append("invalid_requeued")
        return None
    return [i for i in ids if isinstance(i, str) and 0 < len(i) <= MAX_MESSAGE_ID_CHARS]


def _plain_text(content: Content) -> bool:
    return content.kind is Kind.TEXT and content.reply_to is None


# ----------------------------------------------------------------- what we write


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StatusUpdate(_Strict):
    instanceId: str
    status: Status
    qr_code: str | None
    phone_number: str | None = None
    reason: str | None = None
    pair_code: str | None = None  # CONNECTING with a discovery item's pair_phone (issue #12)
    ban_code: str | None = None  # a temporary ban's reason (with DISCONNECTED, reason temporary_ban)
    ban_expires_at: int | None = None  # when the ban ends, epoch seconds
    detail: str | None = None  # with DISCONNECTED: what went wrong, for a person (e.g. the connect error)
    lease_token: int | None = None  # with leases: the instance's current lease token (fencing)

    def to_json(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        # the three contract fields always go; the extras only when known
        for extra in ("phone_number", "reason", "pair_code", "ban_code", "ban_expires_at", "detail", "lease_token"):
            if data[extra] is None:
                del data[extra]
        return data


class MarkSent(_Strict):
    messageId: str
    wa_message_id: str
    lease_token: int | None = None  # with leases: the token the message was claimed under

    def to_json(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        if data["lease_token"] is None:
            del data["lease_token"]
        return data


class MarkFailed(_Strict):
    messageId: str
    error: str  # what happened and what to fix, for people
    error_code: str | None = None  # machine-readable (docs/proxy-contract.md); omitted when unknown
    lease_token: int | None = None  # with leases: the token the message was claimed under

    def to_json(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        for extra in ("error_code", "lease_token"):
            if data[extra] is None:
                del data[extra]
        return data

