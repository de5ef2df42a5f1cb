"""A small Server-Sent Events reader over aiohttp (tests and scripts/bench_sse.py)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass
class SseEvent:
    event: str = "message"
    id: str | None = None
    data: str = ""
    comments: list[str] = field(default_factory=list)

    @property
    def json(self) -> Any:
        return json.loads(self.data)

    @property
    def seq(self) -> int:
        assert self.id is not None, "an event without id"
        return int(self.id)


async def read_events(resp: aiohttp.ClientResponse) -> AsyncIterator[SseEvent]:
    """The events of an open ``text/event-stream`` response, as they arrive (comments
    and ``retry:`` lines are skipped; a block of only comments yields nothing)."""
    current = SseEvent()
    data: list[str] = []
    seen = False
    async for raw in resp.content:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if seen and (data or current.id is not None or current.event != "message"):
                current.data = "\n".join(data)
                yield current
            current, data, seen = SseEvent(), [], False
            continue
        if line.startswith(":"):
            current.comments.append(line[1:].strip())
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        seen = True
        if name == "data":
            data.append(value)
        elif name == "event":
            current.event = value
        elif name == "id":
            current.id = value


async def collect(resp: aiohttp.ClientResponse, n: int) -> list[SseEvent]:
    """The next ``n`` events of the stream (the caller bounds the time)."""
    out: list[SseEvent] = []
    async for ev in read_events(resp):
        out.append(ev)
        if len(out) >= n:
            break
    return out
