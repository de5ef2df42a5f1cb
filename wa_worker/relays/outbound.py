"""Outbound relay: ``/queued-messages`` → journal → WhatsApp → ``/mark-sent``.

The invariant is *never sent twice*: a message id is journaled as ``sending``
before WhatsApp sees it, and a journaled id is never handed to WhatsApp again,
whatever the proxy returns later. Acknowledgements (``mark-sent`` /
``mark-failed``) are rows of their own, retried by :class:`Acknowledger` until
the proxy answers 2xx, across restarts.

A send's outcome that cannot be journaled (disk full) is kept in memory by the
:class:`Acknowledger` and written again until it lands; it is acknowledged
once journaled. Nothing new is sent while the store is unwritable.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any

import anyio

from ..backends.base import SendError, Session
from ..edge.client import EdgeClient, EdgeError
from ..edge.models import QueuedMessage
from ..storage.journal import OutboundRow, Journal, JournalUnavailable, JournalWriteError
from ..supervise import LoopHealth, report_failure
from ..timing import Clock, backoff_delay

log = logging.getLogger("wa_worker.outbound")

SEND_TIMEOUT_S = 60.0
ACK_RETRY_BASE_S = 1.0
ACK_RETRY_CAP_S = 300.0
QUERY_GAP_S = 0.002


class OutboundRelay:
    """Sends one instance's queued messages, in the proxy's order."""

    def __init__(self, journal: Journal, acks: "Acknowledger") -> None:
        self.journal = journal
        self.acks = acks
        self.sent = 0
        self.failed = 0
        self.duplicates_suppressed = 0

    async def process(self, instance_id: str, session: Session, messages: list[QueuedMessage], *,
                      stopping: Callable[[], bool] = lambda: False) -> int:
        """Handle a poll's messages in order; returns how many were new.
        ``stopping`` is checked before each message: on a stop the rest stays
        queued at the proxy for the next run (never journaled, never sent).
        Raises :class:`JournalUnavailable` (nothing is sent without a journal,
        nor while the store is unwritable)."""
        new = 0
        for msg in messages:
            if stopping():
                break
            if await self._handle_message(instance_id, session, msg):
                new += 1
        return new

    async def _handle_message(self, instance_id: str, session: Session, msg: QueuedMessage) -> bool:
        known = self.journal.outbound_get(msg.id)
        if known is not None:
            if known.state != "sending":
                # handled before: its acknowledgement was lost or is still pending
                self.duplicates_suppressed += 1
                self.journal.reack(msg.id)
                self.acks.wake()
            return False
        if msg.problem is not None or msg.jid is None:
            self.journal.record_failure(msg.id, instance_id, msg.problem or "invalid message")
            self.failed += 1
            log.warning("message %s for %s rejected: %s", msg.id, instance_id, msg.problem)
            self.acks.wake()
            return True
        if not self.journal.writable:
            # its outcome could not be journaled: leave it queued at the proxy
            raise JournalUnavailable("the state store is not writable")
        if not self.journal.begin_send(msg.id, instance_id, msg.jid):
            return False
        # Once WhatsApp may have the message, the outcome must be journaled even
        # if the worker is shutting down: shield the send and its record.
        with anyio.CancelScope(shield=True):
            try:
                with anyio.fail_after(SEND_TIMEOUT_S):
                    wa_id = await session.send_text(msg.jid, msg.body)
            except (SendError, TimeoutError) as exc:
                reason = "send timed out" if isinstance(exc, TimeoutError) else str(exc)
                self.acks.record_outcome(msg.id, self.journal.record_failure, msg.id, instance_id, f"send failed: {reason}")
                self.failed += 1
                log.warning("send of %s for %s failed: %s", msg.id, instance_id, reason)
            else:
                self.acks.record_outcome(msg.id, self.journal.record_sent, msg.id, wa_id)
                self.sent += 1
        self.acks.wake()
        return True


class Acknowledger:
    """Retries ``mark-sent`` / ``mark-failed`` for journal rows until acknowledged.
    One task per row in flight (bounded), so a slow answer never holds the others."""

    def __init__(self, journal: Journal, edge: EdgeClient, *, clock: Clock | None = None, concurrency: int = 8,
                 rng: random.Random | None = None, retry_base_s: float = ACK_RETRY_BASE_S,
                 retry_cap_s: float = ACK_RETRY_CAP_S, health: LoopHealth | None = None) -> None:
        self.journal = journal
        self.health = health  # told about every round: store reads that fail make /ready say so
        self.retry_base_s = retry_base_s
        self.retry_cap_s = retry_cap_s
        self.edge = edge
        self.clock = clock or Clock()
        self.rng = rng or random.Random()
        self.concurrency = concurrency
        self._wake = anyio.Event()
        self._in_flight: set[str] = set()
        # send outcomes the journal did not take yet (disk full): message id → the write
        self._unrecorded: dict[str, Callable[[], None]] = {}
        self.acknowledged = 0
        self.rejected = 0

    def wake(self) -> None:
        self._wake.set()

    @property
    def unrecorded(self) -> int:
        """Send outcomes known only in memory (waiting for the journal)."""
        return len(self._unrecorded)

    def record_outcome(self, message_id: str, write: Callable[..., None], *args: Any) -> None:
        """Journal a send's outcome now, or keep it and retry until it lands
        (the row stays ``sending`` meanwhile: never sent again, and never
        reported as delivery_unknown while this process lives)."""
        def attempt() -> None:
            write(*args)

        try:
            attempt()
        except JournalUnavailable as exc:
            self._unrecorded[message_id] = attempt
            log.error("could not journal the outcome of %s (%s): kept in memory, written as soon as the "
                      "store takes it", message_id, exc)
        self._wake.set()

    def _land_unrecorded(self) -> None:
        for message_id, attempt in list(self._unrecorded.items()):
            try:
                attempt()
            except JournalUnavailable:
                return
            del self._unrecorded[message_id]
            log.warning("outcome of %s journaled after the store recovered", message_id)

    async def run(self) -> None:
        last_query = -1e18
        async with anyio.create_task_group() as tg:
            while True:
                # wake-ups (every send, every finished acknowledgement) come in
                # bursts: look at the journal at most every QUERY_GAP_S
                gap = last_query + QUERY_GAP_S - time.monotonic()
                if gap > 0:
                    await anyio.sleep(gap)
                last_query = time.monotonic()
                self._wake = anyio.Event()
                try:
                    self._land_unrecorded()
                    free = self.concurrency - len(self._in_flight)
                    if free > 0:
                        for row in self.journal.due_acks(free, skip=self._in_flight):
                            self._in_flight.add(row.message_id)
                            tg.start_soon(self._ack_task, row)
                    next_due = self.journal.next_ack_due_at(skip=self._in_flight)
                except JournalUnavailable as exc:
                    if isinstance(exc, JournalWriteError):  # a full disk: /ready says "store not writable"
                        log.debug("acknowledger: store not writable (%s), backing off", exc)
                    else:
                        report_failure(self.health, "acknowledger", exc, log)
                    timeout = 5.0
                else:
                    if self.health is not None:
                        self.health.ok()
                    timeout = 60.0 if next_due is None else max(0.0, next_due - self.clock.time())
                    if len(self._in_flight) >= self.concurrency:
                        timeout = 60.0  # every slot busy: a finishing task wakes us
                if self._unrecorded:
                    timeout = min(timeout, 1.0)
                # a zero timeout still yields once: due rows beyond the ones just started
                with anyio.move_on_after(timeout):
                    await self._wake.wait()

    async def flush(self, timeout_s: float) -> None:
        """Best effort at shutdown: journal what memory holds, acknowledge what
        is due now, within a bound."""
        with anyio.move_on_after(timeout_s):
            try:
                self._land_unrecorded()
                rows = self.journal.due_acks(256, skip=self._in_flight)
            except JournalUnavailable:
                return
            async with anyio.create_task_group() as tg:
                for row in rows:
                    tg.start_soon(self._ack, row)
        if self._unrecorded:
            log.error("%d send outcome(s) could not be journaled before exit: they will be reported as "
                      "delivery_unknown", len(self._unrecorded))

    async def _ack_task(self, row: OutboundRow) -> None:
        try:
            await self._ack(row)
        finally:
            self._in_flight.discard(row.message_id)
            self._wake.set()

    async def _ack(self, row: OutboundRow) -> None:
        try:
            if row.state == "sent":
                await self.edge.mark_sent(row.message_id, row.wa_message_id or "")
            elif not await self.edge.mark_failed(row.message_id, row.error or "failed"):
                # the proxy has no /mark-failed (404): not acknowledged. The row
                # stays pending, retried rarely and at every restart (the proxy
                # may gain the endpoint)
                await self._retry_later(row, self.retry_cap_s)
                return
        except EdgeError as exc:
            if exc.transient:
                delay = backoff_delay(row.ack_attempts, self.retry_base_s, self.retry_cap_s, self.rng)
                await self._retry_later(row, max(delay, exc.retry_after_s or 0.0))
                return
            try:
                self.journal.ack_rejected(row, "rejected by proxy", exc.status, exc.body)
                self.rejected += 1
                log.error("acknowledgement of %s rejected permanently: %s", row.message_id, exc)
            except JournalUnavailable:
                await self.clock.sleep(1.0)  # results cannot be recorded: do not spin
            return
        try:
            self.journal.ack_done(row.message_id)
            self.acknowledged += 1
        except JournalUnavailable:
            await self.clock.sleep(1.0)  # re-acknowledged later; the proxy takes a repeat

    async def _retry_later(self, row: OutboundRow, delay_s: float) -> None:
        try:
            self.journal.ack_retry_later(row.message_id, delay_s)
        except JournalUnavailable:
            await self.clock.sleep(1.0)  # still due: retried on a later round, without spinning
