"""Inbound relay: WhatsApp → store → ``POST /inbound``.

A received message is written to the store first (the event handler never
waits on the proxy), then one delivery task posts it. Rows leave the outbox
only after a 2xx; transient failures back off per row; a permanent 4xx (or
the TTL, or ``INBOUND_MAX_ATTEMPTS`` server errors) moves the row to the
dead-letter table. Only the oldest pending row of each chat is in flight, so
every chat is delivered in arrival order; chats proceed independently (one
task per chat in flight, bounded): a slow reply for one chat never holds
another.

Media (issue #11): the row is journaled with the backend's download handle
(a private ``_media_handle`` key, never posted). Before its post, the chat's
task downloads the bytes through the instance's connected session into a
private temp folder, streams them to ``POST /upload-media``, writes the row
back with ``media.url`` set and the handle dropped (a restart never fetches
them again), then posts. Not connected, a transient download failure or a
transient upload failure: the row backs off like a failed post. Media over
``MEDIA_MAX_BYTES``, a permanent download failure or a proxy without
``/upload-media`` (remembered until restart): posted with ``media.url: null``
and a ``media_error``. Temp files are removed whatever happens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import re
import shutil
import tempfile
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from ..backends.base import Call, InboundMessage, MediaUnavailable, Session
from ..edge.client import EdgeClient, EdgeError, EndpointMissing
from ..events import NO_EVENTS, EventSink
from ..fsutil import ensure_private_dir
from ..messages import MEDIA_KINDS, InboundContent, Kind
from ..storage.journal import InboundRow, Journal, JournalUnavailable, JournalWriteError
from ..supervise import LoopHealth, report_failure
from ..timing import Clock, MinGap, backoff_delay

log = logging.getLogger("wa_worker.inbound")

RETRY_BASE_S = 1.0
RETRY_CAP_S = 300.0
MAX_ATTEMPTS = 20
MEMORY_FALLBACK_MAX = 10_000
STORE_BACKOFF_S = 1.0
EXPIRE_EVERY_S = 60.0
QUERY_GAP_S = 0.002
MEDIA_MAX_BYTES = 64 * 1024 * 1024
# the backend's download handle, kept in the journaled row until the media is uploaded
MEDIA_HANDLE = "_media_handle"
# the wa_message_id of an "undecryptable" notice: the message's own id plus this
UNDECRYPTABLE_SUFFIX = "-undecryptable"


def counts_as_server_error(exc: EdgeError) -> bool:
    """An answer that blames this message, counted toward ``INBOUND_MAX_ATTEMPTS``:
    a 5xx the proxy's own code produced (500, 501, 505…), or a 404 (the proxy does
    not know its instance; a wrong path also answers 404, which ``/ready`` reports
    at once). Timeouts, connection failures, 429 and the gateway/outage answers
    502/503/504 are not the message's fault: they are retried until the TTL and
    never dead-letter a message early."""
    if exc.status == 404:
        return True
    return exc.status is not None and exc.status >= 500 and exc.status not in (502, 503, 504)


def inbound_payload(instance_id: str, msg: InboundMessage, *,
                    media_max_bytes: int | None = None) -> dict[str, Any]:
    """The ``/inbound`` body (see docs/proxy-contract.md): ``from`` is the chat,
    ``to`` the group participant or our own JID, as the Node worker sent them;
    ``body`` the text or caption (never null), ``type`` and the fields of the
    message's kind. Keys starting with ``_`` are private (journaled, never posted)."""
    to = msg.sender_jid if msg.is_group else (msg.own_jid or msg.sender_jid)
    content = msg.content
    payload: dict[str, Any] = {
        "instanceId": instance_id,
        "from": msg.chat_jid,
        "to": to,
        "body": (msg.body if content is None else content.body) or "",
        "wa_message_id": msg.wa_message_id,
        "chat_id": msg.chat_jid,
        "sender_id": msg.sender_jid,
        "from_me": msg.from_me,
        "is_group": msg.is_group,
        "push_name": msg.push_name,
        "timestamp": int(msg.timestamp),
        "type": Kind.TEXT.value,
    }
    # the other address of a LID contact, when WhatsApp told it (issue #12)
    for key in ("sender_pn", "sender_lid", "chat_pn"):
        value = getattr(msg, key)
        if value:
            payload[key] = value
    if content is not None:
        payload.update(_content_fields(content, media_max_bytes))
        if content.kind is Kind.UNDECRYPTABLE:
            # WhatsApp may deliver the real message later under the same id: this notice gets
            # an id of its own (so neither the journal nor the proxy takes the message for a
            # replay of it) and names the message in target_id
            payload["wa_message_id"] = msg.wa_message_id + UNDECRYPTABLE_SUFFIX
            payload["target_id"] = msg.wa_message_id
    return payload


def call_payload(instance_id: str, call: Call, *, rejected: bool, own_jid: str | None) -> dict[str, Any]:
    """The ``/inbound`` body of an incoming call: ``type: "call"`` with ``caller``,
    ``video`` and ``rejected``; its ``wa_message_id`` is the call id."""
    return {
        "instanceId": instance_id, "from": call.from_jid, "to": own_jid or call.from_jid, "body": "",
        "wa_message_id": call.call_id, "chat_id": call.from_jid, "sender_id": call.from_jid, "from_me": False,
        "is_group": False, "push_name": None, "timestamp": int(call.timestamp), "type": Kind.CALL.value,
        "caller": call.from_jid, "video": call.video, "rejected": rejected,
    }


def _content_fields(c: InboundContent, media_max_bytes: int | None) -> dict[str, Any]:
    kind = c.kind
    if kind is Kind.AUDIO and c.media is not None and c.media.ptt:
        kind = Kind.VOICE
    out: dict[str, Any] = {"type": kind.value}
    if kind in MEDIA_KINDS:
        m = c.media
        out["media"] = {"url": None, "mimetype": m.mimetype if m else None, "filename": m.filename if m else None,
                        "size": m.size if m else None, "sha256": m.sha256 if m else None,
                        "seconds": m.seconds if m else None}
        size = m.size if m else None
        if media_max_bytes is not None and size is not None and size > media_max_bytes:
            out["media_error"] = "too_large"  # never downloaded
        elif c.media_handle is None:
            out["media_error"] = "download_failed"  # the backend could not say where the bytes are
        else:
            out[MEDIA_HANDLE] = c.media_handle
    if c.quoted_id:
        out["quoted_id"] = c.quoted_id
    if kind is Kind.REACTION:
        out["reaction"] = {"emoji": c.reaction or "", "target_id": c.target_id}
    elif kind in (Kind.EDIT, Kind.REVOKE):
        out["target_id"] = c.target_id
    if kind is Kind.LOCATION and c.location is not None:
        loc = c.location
        out.update(latitude=loc.latitude, longitude=loc.longitude, name=loc.name, address=loc.address)
    if kind is Kind.CONTACT and c.contact is not None:
        out["contact"] = {"name": c.contact.name, "vcard": c.contact.vcard, "phone": vcard_phone(c.contact.vcard)}
    if c.view_once:
        out["view_once"] = True
    return out


def vcard_phone(vcard: str) -> str | None:
    """The WhatsApp number of a vCard (its ``waid``), else its first TEL's digits."""
    found = re.search(r"waid=(\d{5,20})", vcard, re.I)
    if found:
        return found.group(1)
    tel = re.search(r"^TEL[^:\r\n]*:([+0-9 ().-]{5,40})$", vcard, re.I | re.M)
    digits = re.sub(r"\D", "", tel.group(1)) if tel else ""
    return digits or None


def public(payload: dict[str, Any]) -> dict[str, Any]:
    """The payload without its private (``_``) keys: what is posted."""
    return {k: v for k, v in payload.items() if not k.startswith("_")}


class _MediaLater(Exception):
    """The media step cannot finish now (not connected, a transient failure): back off."""

    def __init__(self, reason: str, edge_error: EdgeError | None = None) -> None:
        super().__init__(reason)
        self.edge_error = edge_error


SessionLookup = Callable[[str], Session | None]


class InboundRelay:
    def __init__(self, journal: Journal, edge: EdgeClient, *, ttl_s: float, clock: Clock | None = None,
                 concurrency: int = 16, rng: random.Random | None = None, retry_base_s: float = RETRY_BASE_S,
                 retry_cap_s: float = RETRY_CAP_S, max_attempts: int = MAX_ATTEMPTS,
                 max_chats_in_flight: int = 64, health: LoopHealth | None = None,
                 sessions: SessionLookup | None = None, media_max_bytes: int = MEDIA_MAX_BYTES,
                 media_dir: Path | None = None) -> None:
        self.journal = journal
        # the instance's session while it is connected (media is downloaded through it)
        self.sessions = sessions
        self.media_max_bytes = media_max_bytes
        self.media_dir = media_dir  # private temp folder for downloads (emptied at start)
        self.upload_supported = True  # False after a 404/405/501 on /upload-media, until restart
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
        self.received = 0  # messages handed over by the sessions (replays included)
        self.delivered = 0
        self.dead_lettered = 0
        self.memory_dropped = 0
        self.events: EventSink = NO_EVENTS  # the live event log (GET /api/events), with API_TOKEN

    # called from the WhatsApp event handler: never touches the network
    def accept(self, instance_id: str, msg: InboundMessage) -> None:
        self.received += 1
        payload = inbound_payload(instance_id, msg, media_max_bytes=self.media_max_bytes)
        self._journal_payload(payload)
        with contextlib.suppress(JournalUnavailable):  # only a later reply/reaction to it needs this
            self.journal.remember_message(instance_id, msg.wa_message_id, msg.chat_jid, msg.sender_jid, msg.from_me)
        self._wake.set()

    def accept_call(self, instance_id: str, call: Call, *, rejected: bool, own_jid: str | None) -> None:
        """An incoming call, journaled and posted like any received message."""
        self._journal_payload(call_payload(instance_id, call, rejected=rejected, own_jid=own_jid))
        self._wake.set()

    def _journal_payload(self, payload: dict[str, Any]) -> None:
        try:
            new = self.journal.add_inbound(payload["instanceId"], payload["chat_id"], payload["wa_message_id"],
                                           payload)
        except JournalUnavailable:
            new = True
            if len(self._memory) == self._memory.maxlen:
                self.memory_dropped += 1
                log.error("inbound memory buffer full while the store is unwritable: oldest message dropped")
            self._memory.append(payload)
        if new and self.events.enabled:  # a replay WhatsApp sends again is no new event
            self.events.publish("inbound", payload["instanceId"],
                                {k: v for k, v in payload.items() if k != MEDIA_HANDLE})

    def wake(self) -> None:
        self._wake.set()

    def instance_connected(self, instance_id: str) -> None:
        """Media downloads that waited for this instance may go now (and, in a shared journal, what
        the instance's previous worker left)."""
        try:
            if self.journal.inbound_media_due_now(instance_id) or self.journal.shared:
                self._wake.set()
        except JournalUnavailable as exc:
            log.debug("inbound relay: cannot reschedule media rows now (%s)", exc)

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
        query_gap = MinGap(QUERY_GAP_S)
        if self.media_dir is not None:  # downloads a crash left behind
            shutil.rmtree(self.media_dir, ignore_errors=True)
        async with anyio.create_task_group() as tg:
            while True:
                await query_gap.wait()  # wake-ups come in bursts: one look per gap
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
        if MEDIA_HANDLE in row.payload:
            try:
                payload = await self._media(row.instance_id, row.wa_message_id, row.payload)
            except _MediaLater as exc:
                try:
                    self._media_later(row, exc)
                except JournalUnavailable:
                    await self.clock.sleep(STORE_BACKOFF_S)
                return
            try:
                self.journal.inbound_update_payload(row.seq, payload)
            except JournalUnavailable:
                pass  # posted anyway; a row not deleted either fetches again (the upload is idempotent)
            row = dataclasses.replace(row, payload=payload)
        try:
            await self.edge.inbound(public(row.payload))
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
            log.error("inbound %s/%s dead-lettered: %s", row.instance_id, row.wa_message_id, exc,
                      extra={"instance_id": row.instance_id})
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

    def _media_later(self, row: InboundRow, exc: _MediaLater) -> None:
        if exc.edge_error is not None:  # the upload: the policy of a failed post
            self._failed(row, exc.edge_error)
            return
        log.info("inbound %s/%s: %s; retrying later", row.instance_id, row.wa_message_id, exc,
                 extra={"instance_id": row.instance_id})
        delay = backoff_delay(row.attempts, self.retry_base_s, self.retry_cap_s, self.rng)
        self.journal.inbound_retry_later(row.seq, delay, str(exc))

    async def _media(self, instance_id: str, wa_message_id: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Download and upload a row's media; returns its payload with ``media.url``
        (or a ``media_error``) and without the handle. Raises :class:`_MediaLater`."""
        out = {k: v for k, v in payload.items() if k != MEDIA_HANDLE}
        media = dict(out.get("media") or {})
        out["media"] = media
        if not self.upload_supported:
            out["media_error"] = "upload_unsupported"
            return out
        session = self.sessions(instance_id) if self.sessions is not None else None
        if session is None:
            raise _MediaLater("the media download waits for the instance to be connected")
        try:
            tmp = Path(tempfile.mkdtemp(prefix="in-", dir=ensure_private_dir(self.media_dir)
                                        if self.media_dir is not None else None))
        except OSError as exc:
            raise _MediaLater(f"cannot create a temp folder for the media ({exc.strerror})") from None
        try:
            try:
                got = await session.download_media(payload[MEDIA_HANDLE], tmp)
            except MediaUnavailable as exc:
                if not exc.permanent:
                    raise _MediaLater(f"media download failed ({exc})") from None
                log.warning("inbound %s/%s: media cannot be downloaded (%s): posted without it",
                            instance_id, wa_message_id, exc)
                out["media_error"] = "download_failed"
                return out
            except OSError as exc:  # our own disk
                raise _MediaLater(f"media download failed ({type(exc).__name__}: {exc})") from None
            if got.size > self.media_max_bytes:
                out["media_error"] = "too_large"
                return out
            media.update(mimetype=media.get("mimetype") or got.mimetype, size=got.size, sha256=got.sha256,
                         filename=media.get("filename") or got.filename, seconds=media.get("seconds") or got.seconds)
            try:
                media["url"] = await self.edge.upload_media(
                    instance_id, wa_message_id, got.path, mimetype=media["mimetype"] or "application/octet-stream",
                    filename=media["filename"], sha256=got.sha256, size=got.size)
            except EndpointMissing as exc:
                self.upload_supported = False
                log.warning("the proxy has no /upload-media (HTTP %s): received media is posted without its "
                            "bytes (media_error upload_unsupported) until the worker restarts", exc.status)
                out["media_error"] = "upload_unsupported"
            except EdgeError as exc:
                if exc.transient:
                    raise _MediaLater(str(exc), exc) from None
                log.error("inbound %s/%s: the proxy refused the media upload (%s): posted without it",
                          instance_id, wa_message_id, exc)
                out["media_error"] = "too_large" if exc.status == 413 else "upload_failed"
            return out
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

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
                payload = original = self._memory[0]
                try:
                    if MEDIA_HANDLE in payload:
                        payload = await self._media(payload["instanceId"], payload["wa_message_id"], payload)
                        if not (self._memory and self._memory[0] is original):
                            continue  # moved into the store meanwhile: delivered from there
                        self._memory[0] = payload
                    await self.edge.inbound(public(payload))
                    self.delivered += 1
                except _MediaLater:
                    return
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
