"""The live event log behind ``GET /api/events`` (issue #15; docs/api.md, "Live events").

Every event the worker sees — an instance's status, a received message, a send's
outcome, a receipt — is published here with one call from the code that observed
it. :class:`EventLog` gives it the next sequence number, records it in the journal
(``events`` table) and only then hands it to the open streams, so a client never
sees an event a resume could not give again. Each stream has a
:class:`Subscription`: a bounded queue of frames (each encoded once, shared by
every stream: memory stays flat); one that overflows ends its stream (the client
was not reading; it resumes with ``Last-Event-ID``).

Publishing never blocks and never raises: a journal that cannot take an event
keeps it in a bounded memory list, written before the next one (resumes read it
from there meanwhile); an event that cannot be kept at all is counted and logged
(the first of a run of failures). Without ``API_TOKEN`` the worker publishes to
:data:`NO_EVENTS`, which does nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import deque
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import anyio

from .storage.journal import EventRow, Journal, JournalUnavailable, JournalWriteError
from .timing import Clock

log = logging.getLogger("wa_worker.events")

EVENT_TYPES = ("status", "inbound", "send", "receipt")
RETENTION_S = 24 * 3600.0  # events older than this are pruned (housekeeping) ...
MAX_ROWS = 100_000  # ... and so is everything but the newest MAX_ROWS
PENDING_MAX = 10_000  # events kept in memory while the journal refuses them
CLIENT_BUFFER = 1_000  # frames a stream may hold for a client that is behind; one more ends it ...
CLIENT_BUFFER_BYTES = 4 * 1024 * 1024  # ... and so does holding more bytes than this
PRUNE_EVERY = 1_000  # publishes between two prunes (the row cap holds between housekeeping rounds)
CLOSE_GRACE_S = 1.0  # at the worker's stop, a stream has this long to send what it holds


class EventSink(Protocol):
    """What the relays and runners publish to (``enabled``: False when nobody records; skip building
    a payload then)."""

    enabled: bool

    def publish(self, type: str, instance_id: str, data: dict[str, Any]) -> None: ...


class NoEvents:
    """The sink without ``API_TOKEN``: nothing is encoded, recorded or kept."""

    enabled = False

    def publish(self, type: str, instance_id: str, data: dict[str, Any]) -> None:
        return None


NO_EVENTS = NoEvents()


@dataclass(frozen=True, slots=True)
class Event:
    seq: int
    type: str
    instance_id: str
    frame: bytes  # the SSE frame, encoded once for every stream


def sse_frame(row: EventRow) -> bytes:
    """``id:`` the sequence number, ``event:`` the type, ``data:`` one JSON line (the envelope)."""
    envelope = (f'{{"seq":{row.seq},"type":{json.dumps(row.type)},"instanceId":{json.dumps(row.instance_id)},'
                f'"at":{round(row.at, 3)!r},"payload":{row.data}}}')
    return f"id: {row.seq}\nevent: {row.type}\ndata: {envelope}\n\n".encode()


class Subscription:
    """One stream's view of the live events: the ones it asked for, at most ``capacity`` waiting."""

    def __init__(self, instances: frozenset[str] | None, types: frozenset[str] | None, capacity: int,
                 max_bytes: int = CLIENT_BUFFER_BYTES) -> None:
        self.instances = instances
        self.types = types
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._bytes = 0
        self.overflowed = False  # the client fell ``capacity`` events (or ``max_bytes``) behind: its stream ends
        self.closed = False  # the worker is stopping
        self.scope: anyio.CancelScope | None = None  # the stream's writes, cancelled when it must end
        self._queue: deque[Event] = deque()
        self._ready: anyio.Event | None = None

    @property
    def ended(self) -> bool:
        return self.overflowed or self.closed

    def wants(self, instance_id: str, type: str) -> bool:
        return ((self.instances is None or instance_id in self.instances)
                and (self.types is None or type in self.types))

    def offer(self, event: Event) -> None:
        if self.ended or not self.wants(event.instance_id, event.type):
            return
        if len(self._queue) >= self.capacity or (self._queue and self._bytes + len(event.frame) > self.max_bytes):
            self.overflowed = True
            self._queue.clear()
            self._bytes = 0
            self._end()
            return
        self._queue.append(event)
        self._bytes += len(event.frame)
        if self._ready is not None:
            self._ready.set()

    def close(self) -> None:
        """The worker stops: the stream sends what it holds (at most :data:`CLOSE_GRACE_S`), then ends."""
        self.closed = True
        if self._ready is not None:
            self._ready.set()
        if self.scope is not None:
            self.scope.deadline = min(self.scope.deadline, anyio.current_time() + CLOSE_GRACE_S)

    def _end(self) -> None:
        if self._ready is not None:
            self._ready.set()
        if self.scope is not None:
            self.scope.cancel()  # a write blocked on a client that does not read ends now

    async def next_batch(self, timeout_s: float) -> list[Event]:
        """What arrived since the last call (waits up to ``timeout_s`` for something; [] if nothing)."""
        if not self._queue and not self.ended:
            self._ready = anyio.Event()
            with anyio.move_on_after(timeout_s):
                await self._ready.wait()
        batch = list(self._queue)
        self._queue.clear()
        self._bytes = 0
        return batch


class EventLog:
    """Sequence numbers, the journal's ``events`` table, and the open streams (owned by the Worker)."""

    enabled = True

    def __init__(self, journal: Journal, clock: Clock | None = None, *, retention_s: float = RETENTION_S,
                 max_rows: int = MAX_ROWS, pending_max: int = PENDING_MAX,
                 client_buffer: int = CLIENT_BUFFER) -> None:
        self.journal = journal
        self.clock = clock or Clock()
        self.retention_s = retention_s
        self.max_rows = max_rows
        self.pending_max = pending_max
        self.client_buffer = client_buffer
        _low, high = journal.event_seq_bounds()  # the highest number ever given survives pruning
        self._next = high + 1
        self._pending: deque[EventRow] = deque()  # numbered, not yet in the journal (oldest first)
        self._subs: set[Subscription] = set()
        self._failing = False
        self.closed = False
        self.published = 0
        self.unrecorded = 0  # events the journal refused when published (kept in memory)
        self.lost = 0  # events that could not be kept at all (memory list full, unencodable)
        self.slow_clients_cut = 0

    # ------------------------------------------------------------------ publishing

    def publish(self, type: str, instance_id: str, data: dict[str, Any]) -> None:
        """Record the event and hand it to the streams; never raises, never waits."""
        try:
            self._publish(type, instance_id, data)
        except Exception as exc:  # a bug here must not cost the relay that reported the event
            self.lost += 1
            log.exception("event log: a %s event of %s was lost (%s)", type, instance_id, exc)

    def _publish(self, type: str, instance_id: str, data: dict[str, Any]) -> None:
        # strict JSON for every client (no NaN); what JSON has no type for becomes its text
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), default=str, allow_nan=False)
        row = EventRow(self._next, self.clock.time(), instance_id, type, text)
        self._next += 1
        self._record(row)
        self.published += 1
        event = Event(row.seq, type, instance_id, sse_frame(row))
        for sub in list(self._subs):
            sub.offer(event)
            if sub.overflowed and sub in self._subs:
                self._subs.discard(sub)
                self.slow_clients_cut += 1
                log.warning("event stream cut: the client fell %d events or %d bytes behind (it resumes with "
                            "Last-Event-ID)", sub.capacity, sub.max_bytes)
        if self.published % PRUNE_EVERY == 0:
            self.prune()

    def _record(self, row: EventRow) -> None:
        self._pending.append(row)
        # while failing, no write until the store's probe finds it writable again
        if not (self._failing and not self.journal.writable) and self.flush():
            return
        self.unrecorded += 1
        if len(self._pending) > self.pending_max:
            self._pending.popleft()
            self.lost += 1

    def flush(self) -> bool:
        """Write the events memory holds (each publish does; housekeeping too, once the store
        recovers); False when they stay in memory."""
        if not self._pending:
            return True
        try:
            self.journal.add_events(self._pending)
        except JournalWriteError as exc:
            if not self._failing:
                self._failing = True
                log.error("event log: the journal refused events (%s): kept in memory (at most %d), written "
                          "when it recovers", exc, self.pending_max)
            return False
        except JournalUnavailable as exc:  # a constraint, not the disk: retrying would never succeed
            self.lost += len(self._pending)
            log.error("event log: %d event(s) could not be recorded (%s)", len(self._pending), exc)
        else:
            if self._failing:
                self._failing = False
                log.warning("event log: the journal takes events again (%d refused meanwhile, %d lost)",
                            self.unrecorded, self.lost)
        self._pending.clear()
        return True

    # ------------------------------------------------------------------ reading

    @property
    def last_seq(self) -> int:
        """The number of the latest event published (0 before the first)."""
        return self._next - 1

    @property
    def streams(self) -> int:
        return len(self._subs)

    def resume_point(self, after: int) -> tuple[int, str | None]:
        """Where a client that has every event up to ``after`` resumes: (the number to read after,
        None) or, when events after ``after`` are no longer kept (``"expired"``) or ``after`` was never
        given here (``"unknown"``), (just before the oldest kept, the reason)."""
        low, _high = self.journal.event_seq_bounds()
        if low is None:
            low = self._pending[0].seq if self._pending else self._next
        if after > self.last_seq:
            return low - 1, "unknown"
        if after < low - 1:
            return low - 1, "expired"
        return after, None

    def replay(self, after: int, limit: int, instances: Collection[str] | None = None,
               types: Collection[str] | None = None) -> list[EventRow]:
        """Up to ``limit`` kept events numbered above ``after``, in order (the journal, then memory)."""
        rows = self.journal.events_after(after, limit, instances, types)
        if len(rows) < limit and self._pending:
            rows += [r for r in self._pending
                     if r.seq > after and (instances is None or r.instance_id in instances)
                     and (types is None or r.type in types)][:limit - len(rows)]
        return rows

    @contextlib.contextmanager
    def subscribe(self, instances: frozenset[str] | None = None,
                  types: frozenset[str] | None = None) -> Iterator[Subscription]:
        """Every event published while the block runs (subscribe first, then replay: no gap)."""
        sub = Subscription(instances, types, self.client_buffer)
        if self.closed:
            sub.closed = True
        self._subs.add(sub)
        try:
            yield sub
        finally:
            self._subs.discard(sub)

    # ------------------------------------------------------------------ upkeep

    def prune(self) -> int:
        """Drop events older than the retention window and beyond the row cap (housekeeping)."""
        try:
            return self.journal.prune_events(self.clock.time() - self.retention_s, self.max_rows)
        except JournalUnavailable as exc:
            log.debug("event log: prune failed (%s)", exc)
            return 0

    def close(self) -> None:
        """End every stream (the worker stops; called from async code) and write what memory still holds."""
        self.closed = True
        for sub in list(self._subs):
            sub.close()
        self.flush()

    def stats(self) -> dict[str, int]:
        return {"last_seq": self.last_seq, "streams": len(self._subs), "published": self.published,
                "unrecorded": self.unrecorded, "pending": len(self._pending), "lost": self.lost,
                "slow_clients_cut": self.slow_clients_cut}
