"""Inbound relay: WhatsApp → store → ``POST /inbound``.

A received message is written to the store first (the event handler never
waits on the proxy), then one delivery task posts it. Rows leave the outbox
only after a 2xx; transient failures back off per row; a permanent 4xx (or
the TTL, or ``INBOUND_MAX_ATTEMPTS`` server errors) moves the row to the
dead-letter table. Only the oldest pending row of each chat is in flight, so
every chat is delivered in arrival order; chats proceed independently (one
task per chat in flight, bounded): a slow reply for one chat never holds
another.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from typing import Any

import anyio
import anyio.abc

from ..backends.base import InboundMessage
from ..edge.client import EdgeClient, EdgeError
from ..storage.journal import InboundRow, Journal, JournalUnavailable, JournalWriteError
from ..supervise import LoopHealth, report_failure
from ..timing import Clock, backoff_delay

log = logging.getLogger("wa_worker.inbound")

RETRY_BASE_S = 1.0
RETRY_CAP_S = 300.0
MAX_ATTEMPTS = 20
MEMORY_FALLBACK_MAX = 10_000
STORE_BACKOFF_S = 1.0
EXPIRE_EVERY_S = 60.0
QUERY_GAP_S = 0.002


def counts_as_server_error(exc: EdgeError) -> bool:
    """A 5xx the proxy's own code produced (500, 501, 505…): counted toward
    ``INBOUND_MAX_ATTEMPTS``. Timeouts, connection failures, 429 and the
    gateway/outage answers 502/503/504 are not the message's fault: they are
    retried until the TTL and never dead-letter a message early."""
    return exc.status is not None and exc.status >= 500 and exc.status not in (502, 503, 504)


def inbound_payload(instance_id: str, msg: InboundMessage) -> dict[str, Any]:
    """The ``/inbound`` body (see docs/proxy-contract.md): ``from`` is the chat,
    ``to`` the group participant or our own JID, as the Node worker sent them."""
    to = msg.sender_jid if msg.is_group else (msg.own_jid or msg.sender_jid)
    return {
        "instanceId": instance_id,
        "from": msg.chat_jid,
        "to": to,
        "body": msg.body,
        "wa_message_id": msg.wa_message_id,
        "chat_id": msg.chat_jid,
        "sender_id": msg.sender_jid,
        "from_me": msg.from_me,
        "is_group": msg.is_group,
        "push_name": msg.push_name,
        "timestamp": int(msg.timestamp),
    }


class InboundRelay:
    def __init__(self, journal: Journal, edge: EdgeClient, *, ttl_s: float, clock: Clock | None = None,
                 concurrency: int = 16, rng: random.Random | None = None, retry_base_s: float = RETRY_BASE_S,
                 retry_cap_s: float = RETRY_CAP_S, max_attempts: int = MAX_ATTEMPTS,
                 max_chats_in_flight: int = 64, health: LoopHealth | None = None) -> None:
        self.journal = journal
        self.health = health  # told about every round: store reads that fail make /ready say so
        self.retry_base_s = retry_base_s
        self.retry_cap_s = retry_cap_s
        self.max_attempts = max_attempts
        self.edge = edge
        self.ttl_s = ttl_s
        self.clock = clock or Clock()
        self.rng = rng or random.Random()
        # `concurrency` posts at once; up to `max_chats_in_flight` chats hold a row
        # (waiting for a post slot or posting), refilled `concurrency` at a time
        # while the posts are busy, so a backlog costs one heads query per
        # `concurrency` deliveries rather than one per delivery
        self.concurrency = concurrency
        self.max_chats_in_flight = max(max_chats_in_flight, concurrency)
        self._limiter = anyio.CapacityLimiter(concurrency)
        self._wake = anyio.Event()
        # chats with a delivery in flight: at most one row per chat
        self._in_flight: set[tuple[str, str]] = set()
        self._memory_task = False
        # when the store cannot be written, messages wait here (bounded) instead of being lost
        self._memory: deque[dict[str, Any]] = deque(maxlen=MEMORY_FALLBACK_MAX)
        self.delivered = 0
        self.dead_lettered = 0
        self.memory_dropped = 0

    # called from the WhatsApp event handler: never touches the network
    def accept(self, instance_id: str, msg: InboundMessage) -> None:
        payload = inbound_payload(instance_id, msg)
        try:
            self.journal.add_inbound(instance_id, msg.chat_jid, msg.wa_message_id, payload)
        except JournalUnavailable:
            if len(self._memory) == self._memory.maxlen:
                self.memory_dropped += 1
                log.error("inbound memory buffer full while the store is unwritable: oldest message dropped")
            self._memory.append(payload)
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    @property
    def memory_pending(self) -> int:
        return len(self._memory)

    @property
    def in_flight(self) -> int:
        """Chats holding a row now (posting or waiting for a slot)."""
        return len(self._in_flight)

    async def run(self) -> None:
        """Start a delivery task for each due chat head as slots free up; each
        task wakes this loop when it ends, so the chat's next row (or another
        chat) follows at once."""
        last_expiry = -1e18
        last_query = -1e18
        async with anyio.create_task_group() as tg:
            while True:
                # wake-ups (every received message, every finished post) come in
                # bursts: look at the table at most every QUERY_GAP_S
                gap = last_query + QUERY_GAP_S - time.monotonic()
                if gap > 0:
                    await anyio.sleep(gap)
                last_query = time.monotonic()
                self._wake = anyio.Event()
                now = self.clock.time()
                if now - last_expiry > EXPIRE_EVERY_S:
                    last_expiry = now
                    self._expire()
                try:
                    self._memory_to_store()
                    if self._memory and not self._memory_task:
                        self._memory_task = True
                        tg.start_soon(self._deliver_memory)
                    free = self.max_chats_in_flight - len(self._in_flight)
                    if len(self._in_flight) >= self.concurrency and free < self.concurrency:
                        # the posts are busy and few chats could be added: a finishing task wakes us
                        timeout = 60.0
                    else:
                        timeout = self._start_due(tg, free)
                except JournalUnavailable as exc:
                    if isinstance(exc, JournalWriteError):  # a full disk: /ready says "store not writable"
                        log.debug("inbound relay: store not writable (%s), backing off", exc)
                    else:
                        report_failure(self.health, "inbound relay", exc, log)
                    timeout = STORE_BACKOFF_S * 5
                else:
                    if self.health is not None:
                        self.health.ok()
                if self._memory:
                    timeout = min(timeout, 5.0)
                # a zero timeout still yields once: due rows beyond the ones just started
                with anyio.move_on_after(timeout):
                    await self._wake.wait()

    def _start_due(self, tg: anyio.abc.TaskGroup, free: int) -> float:
        """Start the due heads (earliest due first) of chats not in flight;
        returns how long until the next head is due."""
        now = self.clock.time()
        for row in self.journal.inbound_heads(free + 1, skip=self._in_flight):
            if row.next_attempt_at > now:
                return row.next_attempt_at - now
            if len(self._in_flight) >= self.max_chats_in_flight:
                return 60.0  # more is due: a finishing task wakes us
            self._in_flight.add(row.chat_key)
            tg.start_soon(self._deliver, row)
        return 60.0

    def _expire(self) -> None:
        try:
            n = self.journal.expire_inbound(self.ttl_s)
        except JournalUnavailable as exc:
            log.debug("inbound relay: cannot expire old rows now (%s)", exc)
            return
        if n:
            self.dead_lettered += n
            log.error("%d inbound message(s) older than INBOUND_TTL_HOURS moved to dead-letter", n)

    async def _deliver(self, row: InboundRow) -> None:
        try:
            async with self._limiter:
                await self._deliver_row(row)
        finally:
            self._in_flight.discard(row.chat_key)
            self._wake.set()

    async def _deliver_row(self, row: InboundRow) -> None:
        try:
            await self.edge.inbound(row.payload)
        except EdgeError as exc:
            try:
                self._failed(row, exc)
            except JournalUnavailable:
                await self.clock.sleep(STORE_BACKOFF_S)
            return
        try:
            self.journal.inbound_delivered(row.seq)
            self.delivered += 1
        except JournalUnavailable:
            # delivered but not yet deleted: it will be posted again, which the
            # contract makes idempotent ((instanceId, wa_message_id) is unique)
            await self.clock.sleep(STORE_BACKOFF_S)

    def _failed(self, row: InboundRow, exc: EdgeError) -> None:
        if not exc.transient:
            self.journal.inbound_dead_letter(row, "rejected by proxy", exc.status, exc.body)
            self.dead_lettered += 1
            log.error("inbound %s/%s dead-lettered: %s", row.instance_id, row.wa_message_id, exc)
            return
        server_error = counts_as_server_error(exc)
        if server_error and row.server_errors + 1 >= self.max_attempts:
            self.journal.inbound_dead_letter(row, f"server error {self.max_attempts} times", exc.status, exc.body)
            self.dead_lettered += 1
            log.error("inbound %s/%s dead-lettered after %d server errors from the proxy (last: %s); the rest "
                      "of chat %s goes on", row.instance_id, row.wa_message_id, self.max_attempts, exc,
                      row.chat_id)
            return
        delay = backoff_delay(row.attempts, self.retry_base_s, self.retry_cap_s, self.rng)
        delay = max(delay, exc.retry_after_s or 0.0)
        self.journal.inbound_retry_later(row.seq, delay, str(exc), server_error=server_error)

    def _memory_to_store(self) -> None:
        """Move memory-buffered messages into the store, oldest first, while it takes them."""
        while self._memory:
            payload = self._memory[0]
            try:
                self.journal.add_inbound(payload["instanceId"], payload["chat_id"], payload["wa_message_id"], payload)
            except JournalUnavailable:
                return
            self._memory.popleft()

    async def _deliver_memory(self) -> None:
        """The store is unwritable: deliver straight from memory, oldest first,
        until it is empty or the proxy fails transiently."""
        try:
            while self._memory:
                payload = self._memory[0]
                try:
                    await self.edge.inbound(payload)
                    self.delivered += 1
                except EdgeError as exc:
                    if exc.transient:
                        return
                    self.dead_lettered += 1
                    log.error("inbound %s dropped (store unwritable, proxy rejected it): %s",
                              payload.get("wa_message_id"), exc)
                if self._memory and self._memory[0] is payload:
                    self._memory.popleft()
        finally:
            self._memory_task = False
