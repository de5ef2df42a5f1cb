"""Inbound relay: WhatsApp → store → ``POST /inbound``.

A received message is written to the store first (the event handler never
waits on the proxy), then one delivery task posts it. Rows leave the outbox
only after a 2xx; transient failures back off per row; a permanent 4xx (or
the TTL) moves the row to the dead-letter table. Only the oldest pending row of
each chat is in flight, so every chat is delivered in arrival order while
chats proceed in parallel.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from typing import Any

import anyio

from ..backends.base import InboundMessage
from ..edge.client import EdgeClient, EdgeError
from ..storage.store import InboundRow, Store, StoreUnavailable
from ..timing import Clock, backoff_delay

log = logging.getLogger("wa_worker.inbound")

RETRY_BASE_S = 1.0
RETRY_CAP_S = 300.0
MEMORY_FALLBACK_MAX = 10_000


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
    def __init__(self, store: Store, edge: EdgeClient, *, ttl_s: float, clock: Clock | None = None,
                 concurrency: int = 16, rng: random.Random | None = None, retry_base_s: float = RETRY_BASE_S,
                 retry_cap_s: float = RETRY_CAP_S) -> None:
        self.store = store
        self.retry_base_s = retry_base_s
        self.retry_cap_s = retry_cap_s
        self.edge = edge
        self.ttl_s = ttl_s
        self.clock = clock or Clock()
        self.rng = rng or random.Random()
        self._limiter = anyio.CapacityLimiter(concurrency)
        self._wake = anyio.Event()
        # when the store cannot be written, messages wait here (bounded) instead of being lost
        self._memory: deque[dict[str, Any]] = deque(maxlen=MEMORY_FALLBACK_MAX)
        self.delivered = 0
        self.dead_lettered = 0
        self.memory_dropped = 0

    # called from the WhatsApp event handler: never touches the network
    def accept(self, instance_id: str, msg: InboundMessage) -> None:
        payload = inbound_payload(instance_id, msg)
        try:
            self.store.add_inbound(instance_id, msg.chat_jid, msg.wa_message_id, payload)
        except StoreUnavailable:
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

    async def run(self) -> None:
        last_expiry = -1e18
        while True:
            self._wake = anyio.Event()
            now = self.clock.time()
            if now - last_expiry > 60:
                last_expiry = now
                try:
                    n = self.store.expire_inbound(self.ttl_s)
                    if n:
                        self.dead_lettered += n
                        log.error("%d inbound message(s) older than INBOUND_TTL_HOURS moved to dead-letter", n)
                except StoreUnavailable:
                    pass
            await self._drain_memory()
            heads = self.store.due_inbound_heads(64)
            if heads:
                async with anyio.create_task_group() as tg:
                    for row in heads:
                        tg.start_soon(self._deliver, row)
                continue
            next_due = self.store.next_inbound_due_at()
            timeout = 60.0 if next_due is None else max(0.0, next_due - self.clock.time())
            if self._memory:
                timeout = min(timeout, 5.0)
            with anyio.move_on_after(timeout):
                await self._wake.wait()

    async def _deliver(self, row: InboundRow) -> None:
        async with self._limiter:
            try:
                await self.edge.inbound(row.payload)
            except EdgeError as exc:
                try:
                    if exc.transient:
                        delay = backoff_delay(row.attempts, self.retry_base_s, self.retry_cap_s, self.rng)
                        self.store.inbound_retry_later(row.seq, delay, str(exc))
                    else:
                        self.store.inbound_dead_letter(row, "rejected by proxy", exc.status, exc.body)
                        self.dead_lettered += 1
                        log.error("inbound %s/%s dead-lettered: %s", row.instance_id, row.wa_message_id, exc)
                except StoreUnavailable:
                    await anyio.sleep(1.0)
                return
            try:
                self.store.inbound_delivered(row.seq)
                self.delivered += 1
            except StoreUnavailable:
                # delivered but not yet deleted: it will be posted again, which the
                # contract makes idempotent ((instanceId, wa_message_id) is unique)
                await anyio.sleep(1.0)

    async def _drain_memory(self) -> None:
        while self._memory:
            payload = self._memory[0]
            try:
                self.store.add_inbound(payload["instanceId"], payload["chat_id"], payload["wa_message_id"], payload)
            except StoreUnavailable:
                break
            self._memory.popleft()
        # still unwritable: deliver straight from memory, oldest first
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
            self._memory.popleft()
