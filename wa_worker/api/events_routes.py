"""``GET /api/events``: the live event stream as Server-Sent Events (docs/api.md, "Live events").

A stream subscribes first, then replays from the journal what the client missed
(``Last-Event-ID``, or ``?since=`` for clients that cannot set headers), page by
page, then goes live: every event published after the subscription is in its
queue, every one before is in the journal, and a cursor (the last number sent)
drops the overlap, so the seam has no gap and no repeat. A position the journal
no longer covers starts with an ``event: reset``. Comments keep the connection
alive; a client that falls :data:`~wa_worker.events.CLIENT_BUFFER` events behind
is disconnected (its queue is emptied, its blocked write cancelled). The worker's
stop ends every stream (the sub-app's ``on_shutdown``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Protocol

import anyio
from aiohttp import web

from ..events import EVENT_TYPES, EventLog, Subscription, sse_frame
from ..ids import is_valid_instance_id
from ..storage.journal import JournalUnavailable
from .errors import api_error
from .models import ErrorBody, EventOut
from .openapi import Answer, Operation, Param

log = logging.getLogger("wa_worker.api")

KEEPALIVE_S = 15.0
GONE_CHECK_S = 1.0  # how often an idle stream looks whether its client hung up (aiohttp does not say)
REPLAY_PAGE = 200  # journal rows read at once by a replay ...
WRITE_CHUNK = 256 * 1024  # ... and written in chunks of about this many bytes
RETRY_MS = 2000  # what EventSource waits before reconnecting
MAX_FILTER_INSTANCES = 1000


def _listed(values: Iterable[str]) -> list[str]:
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def _instances(request: web.Request) -> frozenset[str] | None:
    ids = _listed(request.query.getall("instance", []))
    if not ids:
        return None
    bad = next((i for i in ids if not is_valid_instance_id(i)), None)
    if bad is not None or len(ids) > MAX_FILTER_INSTANCES:
        raise api_error(400, "bad_request", "instance: ids of letters, digits, '-', '_' "
                        f"(at most {MAX_FILTER_INSTANCES}), repeated or comma-separated")
    return frozenset(ids)


def _types(request: web.Request) -> frozenset[str] | None:
    types = _listed(request.query.getall("types", []))
    if not types:
        return None
    unknown = sorted(set(types) - set(EVENT_TYPES))
    if unknown:
        raise api_error(400, "bad_request", f"types: unknown {', '.join(unknown)!s:.100} "
                        f"(known: {', '.join(EVENT_TYPES)})")
    return frozenset(types)


def _resume_after(request: web.Request) -> int | None:
    """The last number the client has: ``Last-Event-ID`` (EventSource's reconnect) before ``?since=``."""
    raw = request.headers.get("Last-Event-ID")
    if raw is None or not raw.strip():
        raw = request.query.get("since")
    if raw is None or not raw.strip():
        return None
    raw = raw.strip()
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        raise api_error(400, "bad_request", "Last-Event-ID / since: a sequence number (digits)")
    return int(raw)


def reset_frame(requested: int, oldest: int, reason: str) -> bytes:
    """The first frame when ``requested`` cannot be resumed exactly (no ``id:``: the client's
    position only moves with the events that follow)."""
    data = json.dumps({"reason": reason, "requested": requested, "oldest": oldest})
    return f"event: reset\ndata: {data}\n\n".encode()


class Writer(Protocol):
    """Where a stream's bytes go (an aiohttp ``StreamResponse``)."""

    async def write(self, data: bytes) -> None: ...


async def _replay(resp: Writer, events: EventLog, sub: Subscription, after: int) -> int:
    """Send what the journal holds after ``after``; returns the cursor the live part starts from."""
    cursor = after
    while True:
        # checked before every page, with no await until the page is read: a prune while the
        # previous page was being written is said (reset), never skipped in silence
        start, reason = events.resume_point(cursor)
        if reason is not None:
            await resp.write(reset_frame(cursor, start + 1, reason))
            cursor = start
            continue
        last = events.last_seq  # all up to it is in the journal (or the memory list) now
        rows = events.replay(cursor, REPLAY_PAGE, sub.instances, sub.types)
        chunk: list[bytes] = []
        size = 0
        for r in rows:
            chunk.append(sse_frame(r))
            size += len(chunk[-1])
            if size >= WRITE_CHUNK or r is rows[-1]:
                await resp.write(b"".join(chunk))
                chunk, size = [], 0
        if rows:
            cursor = rows[-1].seq
        if len(rows) < REPLAY_PAGE:
            return max(cursor, last)


async def _stream(request: web.Request, resp: web.StreamResponse, events: EventLog, sub: Subscription,
                  after: int | None, keepalive_s: float) -> None:
    await resp.write(f"retry: {RETRY_MS}\n: wa-worker events\n\n".encode())
    cursor = events.last_seq if after is None else await _replay(resp, events, sub, after)
    quiet_since = anyio.current_time()
    while not sub.overflowed:
        batch = await sub.next_batch(min(keepalive_s, GONE_CHECK_S))
        fresh = [e.frame for e in batch if e.seq > cursor]
        if fresh:
            await resp.write(b"".join(fresh))
            cursor = batch[-1].seq
            quiet_since = anyio.current_time()
        if sub.closed:  # the worker stops: what it held is sent (its last statuses)
            return
        if request.transport is None or request.transport.is_closing():
            return  # the client hung up: free its place now, not at the next write
        if anyio.current_time() - quiet_since >= keepalive_s:
            await resp.write(b": keep-alive\n\n")
            quiet_since = anyio.current_time()


def add_event_routes(api: web.Application, events: EventLog, *, max_streams: int,
                     keepalive_s: float | None = None) -> list[Operation]:
    """``GET /api/events`` on the API sub-app; at most ``max_streams`` open at once; a comment
    after ``keepalive_s`` (default :data:`KEEPALIVE_S`) without an event. Returns its
    :class:`Operation` for the OpenAPI document (the route itself is added here)."""

    async def stream(request: web.Request) -> web.StreamResponse:
        instances, types, after = _instances(request), _types(request), _resume_after(request)
        if events.closed:
            raise api_error(503, "unavailable", "the worker is stopping", headers={"Retry-After": "2"})
        if events.streams >= max_streams:
            raise api_error(503, "too_many_streams", f"{max_streams} event streams are open on this worker",
                            headers={"Retry-After": "5"})
        with events.subscribe(instances, types) as sub:  # before the replay: nothing published is missed
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                               "X-Accel-Buffering": "no"})
            await resp.prepare(request)
            try:
                with anyio.CancelScope() as scope:
                    sub.scope = scope
                    if not sub.ended:
                        await _stream(request, resp, events, sub, after, keepalive_s or KEEPALIVE_S)
            except ConnectionError:  # the client went away: it resumes with Last-Event-ID
                return resp
            except JournalUnavailable as exc:  # the replay could not be read: the client resumes later
                log.warning("event stream ended: the journal could not be read (%s)", exc)
                return resp
            if scope.cancelled_caught and request.transport is not None:
                # cut (it was not reading) or out of time at the stop: no goodbye it would not read either
                request.transport.abort()
        return resp

    async def close_streams(_: web.Application) -> None:
        events.close()

    api.router.add_get("/events", stream, allow_head=False)
    api.on_shutdown.append(close_streams)
    return [Operation(
        "get", "/events", stream, "streamEvents",
        "the live event stream (Server-Sent Events): statuses, inbound messages, send outcomes, receipts",
        params=(Param("Last-Event-ID", "header", "resume after this sequence number (sent by EventSource)",
                      required=False, pattern=r"^[0-9]{1,18}$"),
                Param("since", "query", "resume after this sequence number (clients that cannot set headers)",
                      required=False, pattern=r"^[0-9]{1,18}$"),
                Param("instance", "query", "only these instances (repeated or comma-separated)", required=False),
                Param("types", "query", f"only these types, comma-separated: {', '.join(EVENT_TYPES)}",
                      required=False)),
        answers={200: Answer("a stream of events, each frame's data line one EventOut; a first `event: reset` "
                             "when the asked position is no longer kept", EventOut, stream=True),
                 400: Answer("a bad filter or resume position", ErrorBody),
                 503: Answer("the worker is stopping, or too many streams are open", ErrorBody,
                             headers=("Retry-After",))})]
