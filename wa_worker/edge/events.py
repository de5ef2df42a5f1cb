"""``GET /events`` answers (the optional push channel, docs/proxy-contract.md).

Tolerant reader: ``{"events": [...], "cursor": "…"}``; unknown event types and
fields are ignored, a malformed event is rejected on its own (counted), the
good ones are kept. Bounded: at most :data:`MAX_EVENTS` events are read of one
answer (the rest are counted as rejected: the safety poll finds their work),
and a cursor longer than :data:`MAX_CURSOR_CHARS` is not kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..ids import is_valid_instance_id

MAX_EVENTS = 10_000
MAX_CURSOR_CHARS = 512


@dataclass(frozen=True, slots=True)
class PushEvents:
    """One answer: instances with queued work, whether this worker's leases changed, the next cursor."""

    queued: frozenset[str] = frozenset()
    leases: bool = False
    cursor: str | None = None

    @property
    def empty(self) -> bool:
        return not self.queued and not self.leases


def parse_events(payload: Any, rejected: list[str]) -> PushEvents | None:
    """The answer's events, or None when it is not ``{"events": [...]}``."""
    if not isinstance(payload, dict) or not isinstance(payload.get("events"), list):
        return None
    raw_events: list[Any] = payload["events"]
    if len(raw_events) > MAX_EVENTS:
        rejected.append("too_many_events")
        raw_events = raw_events[:MAX_EVENTS]
    queued: set[str] = set()
    leases = False
    for event in raw_events:
        kind = event.get("type") if isinstance(event, dict) else None
        if kind == "queued":
            iid = event.get("instanceId")
            if isinstance(iid, str) and is_valid_instance_id(iid):
                queued.add(iid)
            else:
                rejected.append("invalid_instance_id")
        elif kind == "leases":
            leases = True
        elif not isinstance(kind, str):
            rejected.append("invalid_event")
        # another type: a newer proxy's event this worker does not know (ignored, not an error)
    cursor = payload.get("cursor")
    if isinstance(cursor, int) and not isinstance(cursor, bool):
        cursor = str(cursor)
    if cursor is not None and not (isinstance(cursor, str) and 0 < len(cursor) <= MAX_CURSOR_CHARS):
        rejected.append("invalid_cursor")
        cursor = None
    return PushEvents(frozenset(queued), leases, cursor)
