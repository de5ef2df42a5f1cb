"""Outbound relay: ``/queued-messages`` → journal → WhatsApp → ``/mark-sent``.

The invariant is *never sent twice*: a message id is journaled as ``sending``
before WhatsApp sees it, and a journaled id is never handed to WhatsApp again,
whatever the proxy returns later. Acknowledgements (``mark-sent`` /
``mark-failed``) are rows of their own, retried by :class:`Acknowledger` until
the proxy answers 2xx, across restarts.

A send's outcome that cannot be journaled (disk full) is kept in memory by the
:class:`Acknowledger` and written again until it lands; it is acknowledged
once journaled. Nothing new is sent while the store is unwritable.

Recipients and pacing (issue #12): a phone-number recipient is resolved to the
JID WhatsApp has for it (:mod:`.numbers`; not on WhatsApp: ``not_on_whatsapp``)
and sends are paced per instance (:mod:`.send_pacing`). A message that must
wait (caps reached, lookup rate-limited or impossible now) stops the batch
unjournaled: the proxy offers it again on a later poll, in order.

Every kind of message (issue #11): media is staged *before* the ``sending``
row (:mod:`.outbound_media`) and removed after the send; a ``reply_to`` must
name a message in the journal's index. Every failure is journaled with an
``error_code`` that ``/mark-failed`` carries.

The direct API (issue #15) sends through :meth:`OutboundRelay.send_one`: the
same checks, resolution, pacing, media staging and journal, under the same
per-instance lock as a poll's messages (one message at a time per instance,
so pacing gaps hold across both paths); its rows have ``origin`` ``api`` and
are never acknowledged to the proxy.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio

from ..backends.base import BackendError, MessageRef, OutgoingMessage, SendError, Session
from ..edge.client import EdgeClient, EdgeError
from ..edge.models import QueuedMessage
from ..events import NO_EVENTS, EventSink
from ..media import MediaError, StorageError
from ..messages import Content, ContentError, Kind
from ..storage.journal import JOURNAL_RETENTION_S, Journal, JournalUnavailable, JournalWriteError, OutboundRow
from .numbers import NumberResolver, Outcome
from .outbound_media import MediaLimits, MediaStager, staging_dir
from .send_pacing import DAY_S, SendLimits, SendPacer
from ..supervise import LoopHealth, report_failure
from ..timing import Clock, MinGap, backoff_delay

log = logging.getLogger("wa_worker.outbound")

SEND_TIMEOUT_S = 60.0
# a media send also uploads the file: allow it this slow an upload on top of SEND_TIMEOUT_S
MIN_UPLOAD_BYTES_PER_S = 1024 * 1024
ACK_RETRY_BASE_S = 1.0
ACK_RETRY_CAP_S = 300.0
QUERY_GAP_S = 0.002
MAX_HANDED_BACK = 100_000  # handed-back claims remembered in memory (see withhold_claims)


@dataclass(frozen=True, slots=True)
class Deferred:
    """A message :meth:`OutboundRelay.send_one` could not handle now (nothing journaled, nothing sent):
    ``code`` says why (``send_caps_reached``, ``number_lookup_unavailable``, ``storage_unavailable``),
    ``retry_after_s`` when it may go (0: unknown, soon)."""

    code: str
    message: str
    retry_after_s: float = 0.0


def send_timeout_s(message: OutgoingMessage) -> float:
    """How long a send may take: 60 s, plus the upload of its media at 1 MiB/s (64 MiB: about 2 min)."""
    size = message.media.size if message.media is not None else 0
    return SEND_TIMEOUT_S + size / MIN_UPLOAD_BYTES_PER_S


class OutboundRelay:
    """Sends one instance's queued messages, in the proxy's order."""

    def __init__(self, journal: Journal, acks: "Acknowledger", media: MediaLimits | None = None,
                 media_dir: Path | None = None, *, clock: Clock | None = None, limits: SendLimits | None = None,
                 resolver: NumberResolver | None = None, rng: random.Random | None = None,
                 at_least_once: bool = False) -> None:
        self.journal = journal
        # UNKNOWN_SEND_POLICY for a prior_claim message this journal has no row of (leases)
        self.at_least_once = at_least_once
        self.prior_claims: Counter[str] = Counter()  # "reported" (delivery_unknown) | "sent_again" | "own_claim"
        # claims handed back to the proxy (leases): never counted as this worker's own, whatever the journal says
        self._handed_back: set[str] = set()
        self._to_forget: set[str] = set()  # put back to queued by the proxy; journal rows not deleted yet
        self.acks = acks
        self.clock = clock or Clock()
        self.rng = rng or random.Random()
        self.limits = limits or SendLimits()
        self.resolver = resolver or NumberResolver(journal, self.clock)
        self._pacers: dict[str, SendPacer] = {}
        self._locks: dict[str, anyio.Lock] = {}  # one message at a time per instance (polls and the API)
        self.foreign_ids = 0  # proxy ids that name an API request's journal row: never sent nor acknowledged
        self._foreign_logged: set[str] = set()
        self.waiting = 0  # messages left queued by pacing or number lookups
        # with leases, the longest a send may take (None: no cap); past it the outcome is delivery_unknown
        self.send_cap_s: Callable[[], float | None] = lambda: None
        self.stager = MediaStager(media_dir or staging_dir(journal.path), media or MediaLimits())
        self.sent = 0
        self.failed = 0
        self.failed_by_code: Counter[str] = Counter()  # /metrics: wa_worker_messages_failed_total{error_code}
        self.duplicates_suppressed = 0
        self.media_storage_errors = 0
        # the worker's disk could not stage media: media messages wait (in order) until then
        self._media_paused_until = 0.0
        self._media_pause_s = 0.0
        self.events: EventSink = NO_EVENTS  # the live event log (GET /api/events), with API_TOKEN

    def pacer(self, instance_id: str) -> SendPacer:
        pacer = self._pacers.get(instance_id)
        if pacer is None:
            # seeded with the day's sends the journal knows: a restart does not reset the caps
            try:
                earlier = self.journal.send_times(instance_id, self.clock.time() - DAY_S)
            except JournalUnavailable:
                earlier = []
            pacer = self._pacers[instance_id] = SendPacer(self.limits, self.clock, self.rng, sent_at=earlier)
        return pacer

    def lock(self, instance_id: str) -> anyio.Lock:
        """The instance's send lock: held for each message from its checks to its journaled outcome."""
        lock = self._locks.get(instance_id)
        if lock is None:
            lock = self._locks[instance_id] = anyio.Lock()
        return lock

    def configure(self, instance_id: str, settings: dict[str, Any] | None) -> None:
        """Apply an instance's own settings (from its discovery item) over the global limits."""
        self.pacer(instance_id).limits = self.limits.overridden(settings) if settings else self.limits

    def allowance(self, instance_id: str) -> int | None:
        """How many messages ``instance_id`` may send now (None: no cap): what a poll may claim."""
        return self.pacer(instance_id).allowance()

    def note_claims(self, messages: list[QueuedMessage], instance_id: str | None = None) -> None:
        """A poll's answer, before anything else: the messages claimed under a lease token are
        remembered, so a later ``prior_claim`` re-offer of one of them is known to be this worker's
        own claim (a restart, a lease lost and won back) and sent if it was never begun."""
        claims = [(m.id, instance_id or m.instance_id or "") for m in messages
                  if m.lease_token is not None and not m.prior_claim and m.problem is None]
        for mid, _ in claims:  # claimed here again: this worker's own claim
            self._handed_back.discard(mid)
            self._to_forget.discard(mid)
        try:
            self.journal.note_claimed(claims)
        except (JournalUnavailable, JournalWriteError) as exc:  # nothing is sent while it is unwritable
            log.debug("claims not remembered (%s)", exc)

    def unsent_claims(self, instance_ids: list[str], limit_each: int) -> dict[str, list[str]]:
        """Leases: the messages claimed here for these instances (their runners stopped) and never
        begun (no journal row); empty when the journal cannot say."""
        try:
            return self.journal.unsent_claims(instance_ids, limit_each)
        except (JournalUnavailable, JournalWriteError) as exc:
            log.debug("unsent claims not read (%s)", exc)
            return {}

    def withhold_claims(self, message_ids: list[str]) -> None:
        """About to hand these claims back to the proxy: from now on they are not counted as this
        worker's own (a ``prior_claim`` re-offer of one follows UNKNOWN_SEND_POLICY), whatever
        becomes of the call, until :meth:`settle_claims` says the proxy kept them."""
        if len(self._handed_back) + len(message_ids) > MAX_HANDED_BACK:
            self._handed_back.clear()  # bounded: the journal rows stay (this worker's claims, as before)
        self._handed_back.update(message_ids)

    def settle_claims(self, requeued: list[str], kept: list[str]) -> None:
        """The proxy's answer: ``requeued`` went back to queued (their journal rows deleted: not this
        worker's claims any more), ``kept`` were not taken back (still this worker's claims). Ids of
        a call that got no answer stay withheld in memory only (the journal keeps them)."""
        self._handed_back.difference_update(kept)
        gone = sorted(self._to_forget.union(requeued))
        try:
            self.journal.forget_claims(gone)
        except (JournalUnavailable, JournalWriteError) as exc:
            # withheld in memory meanwhile; deleted at the next hand-back
            log.warning("%d handed-back claim(s) not forgotten in the journal yet (%s)", len(gone), exc)
            if len(self._to_forget) + len(requeued) <= MAX_HANDED_BACK:
                self._to_forget.update(requeued)
            return
        self._to_forget.clear()
        self._handed_back.difference_update(gone)

    def clear_media_leftovers(self) -> int:
        """Empty the staging folder (at start: files a killed process left)."""
        return self.stager.clear()

    async def process(self, instance_id: str, session: Session, messages: list[QueuedMessage], *,
                      stopping: Callable[[], bool] = lambda: False) -> int:
        """Handle a poll's messages in order; returns how many were new.
        ``stopping`` is checked before each message (and after staging its
        media): on a stop the rest stays queued at the proxy for the next run
        (never journaled, never sent). A message whose media the worker's own
        disk cannot stage stops the batch (order kept; retried on a later
        poll, after a pause). Raises :class:`JournalUnavailable` (nothing is
        sent without a journal, nor while the store is unwritable)."""
        new = 0
        for msg in messages:
            if stopping():
                break
            try:
                async with self.lock(instance_id):
                    if stopping():  # asked while an API send held the lock
                        break
                    handled = await self._handle_message(instance_id, session, msg, stopping)
            except StorageError as exc:
                self._storage_trouble(instance_id, msg.id, exc)
                break
            except (_MediaPaused, _Waiting):
                break
            if handled:
                new += 1
        return new

    async def send_one(self, instance_id: str, session_of: Callable[[], Session | None], msg: QueuedMessage, *,
                       origin: str = "api") -> Deferred | None:
        """One message outside a poll (the direct API), with everything a polled one goes
        through, under the instance's lock; ``session_of`` gives the instance's connected
        session once the lock is held. None: handled (its outcome is in the journal under
        ``msg.id``, or it was there already); a :class:`Deferred` when it cannot go now
        (nothing journaled). Raises :class:`JournalUnavailable`."""
        try:
            async with self.lock(instance_id):
                session = session_of()
                if session is None:
                    return Deferred("instance_not_connected", "the instance is not connected to WhatsApp")
                await self._handle_message(instance_id, session, msg, lambda: False, origin)
        except StorageError as exc:
            self._storage_trouble(instance_id, msg.id, exc)
            return Deferred("storage_unavailable", "the worker could not stage the media on its own disk",
                            self._media_pause_s)
        except _MediaPaused:
            return Deferred("storage_unavailable", "media sends are paused while the worker's disk recovers",
                            max(0.0, self._media_paused_until - time.monotonic()))
        except _Waiting as wait:
            return Deferred(wait.code, wait.message, wait.retry_after_s)
        return None

    def _storage_trouble(self, instance_id: str, message_id: str, exc: StorageError) -> None:
        self.media_storage_errors += 1
        self._media_pause_s = min(60.0, max(5.0, self._media_pause_s * 2))
        self._media_paused_until = time.monotonic() + self._media_pause_s
        log.error("%s: the worker could not stage the media of message %s on its own disk (%s): it stays "
                  "queued and is tried again in %.0f s", instance_id, message_id, exc, self._media_pause_s)

    def instance_connected(self, instance_id: str) -> None:
        """A shared journal: this worker now serves ``instance_id``; take over what the worker that
        served it before left (unacknowledged outcomes; sends it left ``sending``, by the policy)."""
        if not self.journal.shared:
            return
        try:
            ids = self.journal.adopt_instance(instance_id, self.at_least_once)
        except JournalUnavailable as exc:
            log.warning("%s: could not take over the journal rows another worker left (%s): they wait for the "
                        "next connection", instance_id, exc, extra={"instance_id": instance_id})
            return
        for message_id in ids:
            row = self.journal.outbound_get(message_id)
            if row is not None and row.state == "failing":
                self.prior_claims["reported"] += 1
                self.publish_failed(instance_id, message_id, "delivery_unknown", "delivery_unknown")
        if ids:
            log.warning("%s: %d send(s) another worker left unfinished: %s", instance_id, len(ids),
                        "sent again if offered (UNKNOWN_SEND_POLICY=at_least_once)" if self.at_least_once
                        else "reported delivery_unknown (UNKNOWN_SEND_POLICY=at_most_once)",
                        extra={"instance_id": instance_id})
        self.acks.wake()

    def _claimed_here(self, message_id: str) -> bool:
        if message_id in self._handed_back:
            return False
        try:
            return self.journal.claimed_here(message_id)
        except JournalUnavailable:
            return False

    def _fail(self, message_id: str, instance_id: str, error: str, code: str, origin: str = "proxy",
              claim_token: int | None = None) -> bool:
        self.journal.record_failure(message_id, instance_id, error, code, origin, claim_token)
        self.failed += 1
        self.failed_by_code[code] += 1
        self.publish_failed(instance_id, message_id, error, code)
        log.warning("message %s for %s rejected (%s): %s", message_id, instance_id, code, error,
                    extra={"instance_id": instance_id})
        self.acks.wake()
        return True

    # long: every check a message passes before its send, in order, each with its journaled outcome
    async def _handle_message(self, instance_id: str, session: Session, msg: QueuedMessage,
                              stopping: Callable[[], bool], origin: str = "proxy") -> bool:
        known = self.journal.outbound_get(msg.id)
        if known is not None:
            if known.origin != origin:
                # a proxy id equal to an API request's journal id (api:<instance>:<key>), or the reverse:
                # that row is not this message's; never sent, never acknowledged
                self.foreign_ids += 1
                if msg.id not in self._foreign_logged:  # once per id: the proxy offers it at every poll
                    if len(self._foreign_logged) >= 10_000:
                        self._foreign_logged.clear()
                    self._foreign_logged.add(msg.id)
                    log.warning("%s: message id %r is already an %s message's journal id: not sent (ids starting "
                                "with 'api:' are reserved for the direct API)", instance_id, msg.id[:80],
                                known.origin)
                return False
            if known.state != "sending" and origin == "proxy":
                # handled before: its acknowledgement was lost or is still pending
                self.duplicates_suppressed += 1
                self.journal.reack(msg.id, msg.lease_token)
                self.acks.wake()
            return False
        token = msg.lease_token
        if msg.problem is not None or msg.jid is None:
            return self._fail(msg.id, instance_id, msg.problem or "invalid message", msg.error_code or "invalid_message",
                              origin, token)
        if msg.prior_claim and origin == "proxy" and self._claimed_here(msg.id):
            # this worker's own earlier claim (a restart, a lease lost and won back), never begun: the
            # journal would hold its row otherwise. Sent as any message
            self.prior_claims["own_claim"] += 1
        elif msg.prior_claim and origin == "proxy":
            # claimed before by a worker that lost its lease (maybe this one, before a restart) and
            # never acknowledged: it may have reached WhatsApp. UNKNOWN_SEND_POLICY decides
            if not self.at_least_once:
                self.prior_claims["reported"] += 1
                return self._fail(msg.id, instance_id, "delivery_unknown: claimed before by a worker that lost its "
                                  "lease, which may have sent it; not sent again (UNKNOWN_SEND_POLICY=at_most_once)",
                                  "delivery_unknown", origin, token)
            self.prior_claims["sent_again"] += 1
            log.warning("%s: message %s was claimed before by a worker that lost its lease: sending it "
                        "(UNKNOWN_SEND_POLICY=at_least_once)", instance_id, msg.id[:80])
        if not self.journal.writable:
            # its outcome could not be journaled: leave it queued at the proxy
            raise JournalUnavailable("the state store is not writable")
        if self.pacer(instance_id).allowance() == 0:
            self.waiting += 1
            # the caps are reached: it stays queued at the proxy
            raise _Waiting("send_caps_reached", "this instance's send caps are reached (SEND_MAX_PER_MINUTE, "
                           "SEND_MAX_PER_DAY)", self.pacer(instance_id).wait_until_allowed_s())
        resolved = await self.resolver.resolve(instance_id, session, msg.jid)
        if resolved.outcome is Outcome.WAIT:
            self.waiting += 1
            raise _Waiting("number_lookup_unavailable", "WhatsApp cannot be asked about this number now "
                           "(NUMBER_LOOKUPS_PER_MINUTE, or no answer)", 0.0)
        if resolved.outcome is Outcome.NOT_ON_WHATSAPP or resolved.jid is None:
            return self._fail(msg.id, instance_id, f"{msg.to} is not on WhatsApp", "not_on_whatsapp", origin, token)
        content = msg.content or Content(Kind.TEXT, body=msg.body)
        reply_to: MessageRef | None = None
        if content.reply_to is not None:
            target = self.journal.find_message(instance_id, content.reply_to)
            if target is None:
                days = JOURNAL_RETENTION_S // 86400
                return self._fail(
                    msg.id, instance_id,
                    f"reply_to {content.reply_to!r} is not a message this instance sent or received in the last "
                    f"{days} days (the worker only knows those): check the id, or send without reply_to",
                    "reply_target_unknown", origin, token)
            reply_to = MessageRef(target.wa_message_id, target.chat_jid, target.sender_jid, target.from_me)
        out = OutgoingMessage(to_jid=resolved.jid, kind=content.kind or Kind.DOCUMENT, body=content.body,
                              reply_to=reply_to, reaction=content.reaction, location=content.location,
                              contact=content.contact)
        if content.media is None:
            return await self._send(instance_id, session, msg.id, out, origin, token)
        if time.monotonic() < self._media_paused_until:
            raise _MediaPaused()
        try:
            # not shielded: a stop cancels a fetch (nothing is journaled yet)
            async with self.stager.staged(content, type_given=msg.type_given) as (kind, media):
                self._media_pause_s = 0.0
                if stopping():
                    raise _MediaPaused()  # left queued for the next run
                return await self._send(instance_id, session, msg.id, replace(out, kind=kind, media=media), origin,
                                        token)
        except (MediaError, ContentError) as exc:
            return self._fail(msg.id, instance_id, str(exc), exc.code, origin, token)

    async def _send(self, instance_id: str, session: Session, message_id: str, out: OutgoingMessage,
                    origin: str = "proxy", claim_token: int | None = None) -> bool:
        pacer = self.pacer(instance_id)
        await pacer.gap()
        typing_s = pacer.limits.typing_s(out.body) if out.kind is Kind.TEXT else 0.0
        if typing_s > 0:
            try:
                await session.send_typing(out.to_jid, typing_s)
            except BackendError as exc:
                log.debug("%s: typing indicator not shown (%s)", instance_id, exc)
            else:
                await self.clock.sleep(typing_s)
        if not self.journal.begin_send(message_id, instance_id, out.to_jid, origin, claim_token):
            return False
        pacer.sent()
        # Once WhatsApp may have the message, the outcome must be journaled even
        # if the worker is shutting down: shield the send and its record.
        with anyio.CancelScope(shield=True):
            cap = self.send_cap_s()
            try:
                with anyio.fail_after(send_timeout_s(out) if cap is None else min(cap, send_timeout_s(out))):
                    wa_id = await session.send(out)
            except (SendError, TimeoutError) as exc:
                # a timed-out send may still reach WhatsApp: its outcome is unknown, never retried
                reason = "send timed out" if isinstance(exc, TimeoutError) else str(exc)
                code = "delivery_unknown" if isinstance(exc, TimeoutError) else exc.code
                self._record_failure(instance_id, message_id, f"send failed: {reason}", code, origin)
                log.warning("send of %s for %s failed: %s", message_id, instance_id, reason,
                            extra={"instance_id": instance_id})
            except Exception as exc:
                # a backend bug: WhatsApp may or may not have it; never sent again, reported now
                log.exception("send of %s for %s raised unexpectedly", message_id, instance_id,
                              extra={"instance_id": instance_id})
                self._record_failure(instance_id, message_id, f"delivery_unknown: the send raised "
                                     f"{type(exc).__name__}; check the chat before sending again",
                                     "delivery_unknown", origin)
            else:
                self.acks.record_outcome(message_id, self.journal.record_sent, message_id, wa_id)
                self.sent += 1
                self.events.publish("send", instance_id, {"messageId": message_id, "status": "sent",
                                                          "wa_message_id": wa_id, "to": out.to_jid})
        self.acks.wake()
        return True

    def _record_failure(self, instance_id: str, message_id: str, error: str, code: str, origin: str) -> None:
        self.acks.record_outcome(message_id, self.journal.record_failure, message_id, instance_id, error, code,
                                 origin)
        self.failed += 1
        self.failed_by_code[code] += 1
        self.publish_failed(instance_id, message_id, error, code)

    def publish_failed(self, instance_id: str, message_id: str, error: str, code: str) -> None:
        """A send's failure, for the live event stream (the same ``error_code`` as ``/mark-failed``)."""
        self.events.publish("send", instance_id, {"messageId": message_id, "status": "failed",
                                                  "error_code": code, "error": error})


class _Waiting(Exception):
    """Stop the batch here: pacing or a number lookup makes the message wait (it stays queued)."""

    def __init__(self, code: str, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


class _MediaPaused(Exception):
    """Stop the batch here: the message stays queued at the proxy (order kept)."""


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
        query_gap = MinGap(QUERY_GAP_S)
        async with anyio.create_task_group() as tg:
            while True:
                await query_gap.wait()  # wake-ups come in bursts: one look per gap
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
        if row.origin != "proxy":  # the journal never offers one; the proxy must never hear of it
            return
        try:
            # with leases, the token the message was claimed under: accepted even after the lease moved
            if row.state == "sent":
                await self.edge.mark_sent(row.message_id, row.wa_message_id or "", lease_token=row.claim_token,
                                          instance_id=row.instance_id)
            elif not await self.edge.mark_failed(row.message_id, row.error or "failed", row.error_code,
                                                 lease_token=row.claim_token, instance_id=row.instance_id):
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
