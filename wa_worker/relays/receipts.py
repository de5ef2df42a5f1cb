"""Receipts relay: WhatsApp delivery/read/played receipts → store → ``POST /message-status``.

A receipt is written to the receipts outbox first (the event handler never waits
on the proxy). The outbox keeps one row per sent message holding only its latest
status (read beats delivered, played beats read; never downgraded, even after a
post), so a burst of receipts for one message costs one post. The loop waits up to
``flush_delay_s`` after the first new receipt, then posts everything due in
batches of at most ``BATCH_MAX``, each status with the proxy's ``messageId``
found through the outbound journal. Rows are marked posted only after a 2xx;
failures back off (and survive restarts, like ``/inbound``); a permanent refusal
is dead-lettered. The endpoint is optional: a 404/405/501 switches receipts off
with one log line until restart, and new receipts are then not journaled at all
(rows already pending wait for a restart, or are pruned with the journal).
"""

from __future__ import annotations

import logging
import random
from typing import Any

import anyio

from ..backends.base import Receipt
from ..edge.client import EdgeClient, EdgeError, EndpointMissing
from ..events import NO_EVENTS, EventSink
from ..storage.journal import Journal, JournalUnavailable, JournalWriteError, ReceiptRow
from ..supervise import LoopHealth, report_failure
from ..timing import Clock, backoff_delay

log = logging.getLogger("wa_worker.receipts")

BATCH_MAX = 100
FLUSH_DELAY_S = 0.5
RETRY_BASE_S = 1.0
RETRY_CAP_S = 300.0
STORE_BACKOFF_S = 5.0
IDLE_S = 60.0


def status_record(row: ReceiptRow) -> dict[str, Any]:
    """One entry of ``/message-status``'s ``statuses`` (docs/proxy-contract.md)."""
    return {"instanceId": row.instance_id, "messageId": row.message_id, "wa_message_id": row.wa_message_id,
            "status": row.status, "timestamp": int(row.timestamp), "recipient": row.recipient}


class ReceiptsRelay:
    def __init__(self, journal: Journal, edge: EdgeClient, *, clock: Clock | None = None,
                 rng: random.Random | None = None, flush_delay_s: float = FLUSH_DELAY_S,
                 retry_base_s: float = RETRY_BASE_S, retry_cap_s: float = RETRY_CAP_S,
                 health: LoopHealth | None = None) -> None:
        self.journal = journal
        self.edge = edge
        self.clock = clock or Clock()
        self.rng = rng or random.Random()
        self.flush_delay_s = flush_delay_s
        self.retry_base_s = retry_base_s
        self.retry_cap_s = retry_cap_s
        self.health = health
        self.supported = True  # False after a 404/405/501 on /message-status, until restart
        self._wake = anyio.Event()
        self._store_trouble = False  # this round could not record an outcome
        self.posted = 0  # statuses the proxy accepted
        self.dropped = 0  # receipts not journaled (switched off, or the store unwritable)
        self.events: EventSink = NO_EVENTS  # the live event log (GET /api/events), with API_TOKEN

    # called from the WhatsApp event handler: never touches the network
    def accept(self, instance_id: str, receipt: Receipt) -> None:
        for wa_id in receipt.wa_message_ids if self.events.enabled else ():  # every one seen, whatever the proxy supports
            self.events.publish("receipt", instance_id, {
                "wa_message_id": wa_id, "status": receipt.status.value, "timestamp": int(receipt.timestamp),
                "recipient": receipt.recipient, "chat_id": receipt.chat_jid})
        if not self.supported:
            self.dropped += len(receipt.wa_message_ids)
            return
        try:
            changed = self.journal.add_receipts(instance_id, receipt.wa_message_ids, receipt.chat_jid,
                                                receipt.recipient, receipt.status.value, receipt.status.rank,
                                                receipt.timestamp)
        except JournalUnavailable as exc:
            # a receipt is a hint, not a message: not buffered in memory (a later one supersedes it)
            self.dropped += len(receipt.wa_message_ids)
            log.debug("receipt of %d message(s) of %s not journaled (%s)", len(receipt.wa_message_ids),
                      instance_id, exc)
            return
        if changed:
            self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            timeout = await self._round()
            if self.health is not None and not self._store_trouble:
                self.health.ok()
            self._wake = anyio.Event()
            if timeout > 0:
                # real time, like the inbound relay (the clock only dates rows): a fake
                # clock in tests is never advanced by an idle relay
                with anyio.move_on_after(timeout):
                    await self._wake.wait()
                if self._wake.is_set() and self.flush_delay_s > 0:
                    await anyio.sleep(self.flush_delay_s)  # let the burst gather into one batch

    async def _round(self) -> float:
        """Post every due batch; returns how long until the next row is due."""
        if not self.supported:
            return IDLE_S
        self._store_trouble = False
        while True:
            try:
                rows = self.journal.receipts_due(BATCH_MAX)
            except JournalUnavailable as exc:
                self._store_trouble = True
                report_failure(self.health, "receipts relay", exc, log)
                return STORE_BACKOFF_S
            if not rows:
                break
            if not await self._post(rows):
                break
        if self._store_trouble:  # rows posted (or failed) but not recorded: never a hot loop
            return STORE_BACKOFF_S
        try:
            due = self.journal.next_receipt_due_at()
        except JournalUnavailable:
            return STORE_BACKOFF_S
        return IDLE_S if due is None else max(0.0, min(IDLE_S, due - self.clock.time()))

    async def _post(self, rows: list[ReceiptRow]) -> bool:
        """One batch; True when the next batch may follow at once."""
        try:
            await self.edge.message_status([status_record(r) for r in rows])
        except EndpointMissing as exc:
            self.supported = False
            log.warning("the proxy has no /message-status (HTTP %s): receipts are switched off and no longer "
                        "journaled until the worker restarts", exc.status)
            return False
        except EdgeError as exc:
            try:
                if exc.transient:
                    attempts = max(r.attempts for r in rows)
                    delay = max(backoff_delay(attempts, self.retry_base_s, self.retry_cap_s, self.rng),
                                exc.retry_after_s or 0.0)
                    self.journal.receipts_retry_later(rows, delay, str(exc))
                else:
                    self.journal.receipts_rejected(rows, "rejected by proxy", exc.status, exc.body)
                    log.error("%d receipt(s) dead-lettered: the proxy refused them (%s)", len(rows), exc)
                    return True
            except JournalWriteError as store_exc:
                self._store_trouble = True
                log.debug("receipts relay: store not writable (%s)", store_exc)
            except JournalUnavailable as store_exc:
                self._store_trouble = True
                report_failure(self.health, "receipts relay", store_exc, log)
            return False
        self.posted += len(rows)
        try:
            self.journal.receipts_posted(rows)
        except JournalUnavailable as exc:
            # posted, not marked: posted again later, which the contract makes idempotent
            self._store_trouble = True
            log.debug("receipts relay: cannot mark %d receipt(s) posted (%s)", len(rows), exc)
            return False
        return True
