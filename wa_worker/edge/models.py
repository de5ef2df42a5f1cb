"""Typed boundary with the edge proxy.

Tolerant reader: every response shape the proxy family uses is accepted,
unknown fields are ignored, and each bad record is rejected on its own
(logged and counted) without losing the good ones. Strict writer: requests
are built from models with every contract field present.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

from ..ids import InvalidRecipient, is_valid_instance_id, normalize_recipient


class Status(str, enum.Enum):
    CONNECTING = "CONNECTING"
    CONNECTED = "CONNECTED"
    DISCONNECTED = "DISCONNECTED"


# ----------------------------------------------------------------- what we read


@dataclass(frozen=True, slots=True)
class InstanceRef:
    id: str
    priority: int = 0


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    """A message from ``/queued-messages``.

    ``jid`` is the normalized recipient; when the record cannot be sent,
    ``problem`` says why (and the relay reports it with ``/mark-failed``).
    """

    id: str
    to: str
    body: str
    jid: str | None
    problem: str | None = None
    instance_id: str | None = None


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


def parse_instances(payload: Any, rejected: list[str]) -> list[InstanceRef] | None:
    """``[{"id"}]``, ``{"instances": [{"id","priority"}]}`` or ``["id"]``.
    Returns ``None`` when the payload has no list at all."""
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
        prio = item.get("priority", 0) if isinstance(item, dict) else 0
        if not isinstance(prio, int) or isinstance(prio, bool):
            try:
                prio = int(prio)
            except (TypeError, ValueError):
                prio = 0
        if raw_id in seen:
            continue
        seen.add(raw_id)
        out.append(InstanceRef(raw_id, prio))
    return out


def parse_messages(payload: Any, rejected: list[str], *, batch: bool = False) -> list[QueuedMessage] | None:
    """``[{"id","to","body"}]`` or ``{"messages": [...]}``; in batch mode each
    record must also carry a valid ``instanceId``. ``None``: no list at all."""
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
        if not isinstance(raw_id, str) or not raw_id.strip() or len(raw_id) > 256:
            rejected.append("message_without_id")
            continue
        instance_id = item.get("instanceId", item.get("instance_id"))
        if batch and not is_valid_instance_id(instance_id):
            rejected.append("message_invalid_instance_id")
            continue
        to = item.get("to")
        body = item.get("body", item.get("text"))
        problem: str | None = None
        jid: str | None = None
        try:
            jid = normalize_recipient(to)  # type: ignore[arg-type]
        except InvalidRecipient as exc:
            problem = f"invalid recipient: {exc}"
        if problem is None and (not isinstance(body, str) or not body.strip()):
            problem = "empty body" if body in (None, "") or isinstance(body, str) else "body is not text"
        out.append(
            QueuedMessage(
                id=raw_id,
                to=to if isinstance(to, str) else repr(to),
                body=body if isinstance(body, str) else "",
                jid=jid,
                problem=problem,
                instance_id=instance_id if is_valid_instance_id(instance_id) else None,
            )
        )
    return out


# ----------------------------------------------------------------- what we write


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StatusUpdate(_Strict):
    instanceId: str
    status: Status
    qr_code: str | None
    phone_number: str | None = None
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        # the three contract fields always go; the extras only when known
        for extra in ("phone_number", "reason"):
            if data[extra] is None:
                del data[extra]
        return data


class MarkSent(_Strict):
    messageId: str
    wa_message_id: str


class MarkFailed(_Strict):
    messageId: str
    error: str


class InboundPayload(_Strict):
    instanceId: str
    # "from"/"to" are Python keywords-ish; keep the wire names via aliases
    from_: str
    to: str
    body: str
    wa_message_id: str
    chat_id: str
    sender_id: str
    from_me: bool
    is_group: bool
    push_name: str | None
    timestamp: int

    def to_json(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        data["from"] = data.pop("from_")
        return data
