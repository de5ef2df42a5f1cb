"""Outbound relay: ``/queued-messages`` → journal → WhatsApp → ``/mark-sent``.

The invariant is *never sent twice*: a message id is journaled as ``sending``
before WhatsApp sees it, and a journaled id is never handed to WhatsApp again,
whatever the proxy returns later. Acknowledgements (``mark-sent`` /
``mark-failed``) are rows of their own, retried by :class:`Acknowledger` until
the proxy answers 2xx, across restarts.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import anyio

from ..backends.base import SendError, Session
from ..edge.client import EdgeClient, EdgeError
from ..edge.models import QueuedMessage
from ..storage.store import OutboundRow, Store, StoreUnavailable
from ..timing import Clock, backoff_delay

log = logging.getLogger("wa_worker.outbound")

SEND_TIMEOUT_S = 60.0
ACK_RETRY_BASE_S = 1.0
ACK_RETRY_CAP_S = 300.0


class OutboundRelay:
    """Sends one instance's queued messages, in the proxy's order."""

    def __init__(self, store: Store, acks: "Acknowledger") -> None:
        self.store = store
        self.acks = acks
        self.sent = 0
        self.failed = 0
        self.duplicates_suppressed = 0

    async def process(self, instance_id: str, session: Session, messages: list[QueuedMessage], *,
                      stopping: Callable[[], bool] = lambda: False) -> int:
        """Handle a poll's messages in order; returns how many were new.
        ``stopping`` is checked before each message: on a stop the rest stays
        queued at the proxy for the next run (never journaled, never sent).
        Raises :class:`StoreUnavailable` (nothing is sent without a journal)."""
        new = 0
        for msg in messages:
            if stopping():
                break
            if await self._one(instance_id, session, msg):
                new += 1
        return new

    async def _one(self, instance_id: str, session: Session, msg: QueuedMessage) -> bool:
        known = self.store.outbound_get(msg.id)
        if known is not None:
            if known.state != "sending":
                # handled before: its acknowledgement was lost or is still pending
                self.duplicates_suppressed += 1
                self.store.reack(msg.id)
                self.acks.wake()
            return False
        if msg.problem is not None or msg.jid is None:
            self.store.record_failure(msg.id, instance_id, msg.problem or "invalid message")
            self.failed += 1
            log.warning("message %s for %s rejected: %s", msg.id, instance_id, msg.problem)
            self.acks.wake()
            return True
        if not self.store.begin_send(msg.id, instance_id, msg.jid):
            return False
        # Once WhatsApp may have the message, the outcome must be journaled even
        # if the worker is shutting down: shield the send and its record.
        with anyio.CancelScope(shield=True):
            try:
                with anyio.fail_after(SEND_TIMEOUT_S):
                    wa_id = await session.send_text(msg.jid, msg.body)
            except (SendError, TimeoutError) as exc:
                reason = "send timed out" if isinstance(exc, TimeoutError) else str(exc)
                self._journal(lambda: self.store.record_failure(msg.id, instance_id, f"send failed: {reason}"))
                self.failed += 1
                log.warning("send of %s for %s failed: %s", msg.id, instance_id, reason)
            else:
                self._journal(lambda: self.store.record_sent(msg.id, wa_id))
                self.sent += 1
        self.acks.wake()
        return True

    @staticmethod
    def _journal(write: "callable[[], None]") -> None:  # type: ignore[valid-type]
        try:
            write()
        except StoreUnavailable:
            # the row stays 'sending': on restart it is handled as an unknown
            # outcome, which never re-sends under the default policy
            log.error("could not journal the outcome of a send; it will be treated as delivery_unknown")


class Acknowledger:
    """Retries ``mark-sent`` / ``mark-failed`` for journal rows until acknowledged."""

    def __init__(self, store: Store, edge: EdgeClient, *, clock: Clock | None = None, concurrency: int = 8,
                 rng: random.Random | None = None, retry_base_s: float = ACK_RETRY_BASE_S,
                 retry_cap_s: float = ACK_RETRY_CAP_S) -> None:
        self.store = store
        self.retry_base_s = retry_base_s
        self.retry_cap_s = retry_cap_s
        self.edge = edge
        self.clock = clock or Clock()
        self.rng = rng or random.Random()
        self._limiter = anyio.CapacityLimiter(concurrency)
        self._wake = anyio.Event()
        self.acknowledged = 0
        self.rejected = 0

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            self._wake = anyio.Event()
            try:
                rows = self.store.due_acks(64)
            except StoreUnavailable:
                rows = []
            if rows:
                async with anyio.create_task_group() as tg:
                    for row in rows:
                        tg.start_soon(self._ack, row)
                if not self.store.writable:
                    await self.clock.sleep(1.0)  # results cannot be recorded: do not spin
                continue
            next_due = self.store.next_ack_due_at()
            timeout = 60.0 if next_due is None else max(0.0, next_due - self.clock.time())
            with anyio.move_on_after(timeout):
                await self._wake.wait()

    async def flush(self, timeout_s: float) -> None:
        """Best effort at shutdown: acknowledge what is due now, within a bound."""
        with anyio.move_on_after(timeout_s):
            rows = self.store.due_acks(256)
            async with anyio.create_task_group() as tg:
                for row in rows:
                    tg.start_soon(self._ack, row)

    async def _ack(self, row: OutboundRow) -> None:
        async with self._limiter:
            try:
                if row.state == "sent":
                    await self.edge.mark_sent(row.message_id, row.wa_message_id or "")
                else:
                    await self.edge.mark_failed(row.message_id, row.error or "failed")
            except EdgeError as exc:
                try:
                    if exc.transient:
                        delay = backoff_delay(row.ack_attempts, self.retry_base_s, self.retry_cap_s, self.rng)
                        self.store.ack_retry_later(row.message_id, delay, str(exc))
                    else:
                        self.store.ack_rejected(row, "rejected by proxy", exc.status, exc.body)
                        self.rejected += 1
                        log.error("acknowledgement of %s rejected permanently: %s", row.message_id, exc)
                except StoreUnavailable:
                    pass
                return
            try:
                self.store.ack_done(row.message_id)
                self.acknowledged += 1
            except StoreUnavailable:
                pass
