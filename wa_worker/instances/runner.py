"""One instance's life: connect, show QR, stay connected, reconnect, stop (the
state machine: docs/architecture.md, "An instance's state machine").

A runner owns three loops in its own task group: the lifecycle (backend events),
the status reporter (latest status wins, retried) and, while connected, the
outbound poller (never two polls at once). The last two run under
:func:`~wa_worker.supervise.forever`; a crash of the lifecycle ends the runner
and the manager starts a new one. Stop and "gone" are flags plus a cancelled
wait, never queued messages, so no burst of events can hide them.
"""

from __future__ import annotations

import enum
import logging
import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from ..backends.base import (
    BackendError,
    Backend,
    BackendEvent,
    Call,
    Connected,
    Disconnected,
    InboundMessage,
    LoggedOut,
    QrCode,
    Receipt,
    Session,
    SendError,
)
from ..backends.qr import qr_png_data_url
from ..edge.client import EdgeClient, EdgeError, InstanceGone, LeaseLost
from ..edge.models import QueuedMessage, Status, StatusUpdate
from ..events import NO_EVENTS, EventSink
from ..storage.journal import JournalUnavailable, JournalWriteError
from ..supervise import LoopHealth, forever, report_failure
from ..timing import AdaptiveInterval, Backoff, Clock
from .pacing import StartPacer

if TYPE_CHECKING:
    from ..relays.inbound import InboundRelay
    from ..relays.outbound import OutboundRelay
    from ..relays.receipts import ReceiptsRelay

log = logging.getLogger("wa_worker.instance")

CLOSE_TIMEOUT_S = 10.0
# A burst of wake-ups costs at most one poll per WAKE_MIN_GAP_S per instance: the
# first wake polls at once, the ones arriving meanwhile merge into one more poll.
WAKE_MIN_GAP_S = 0.1
STATUS_RETRY_BASE_S = 1.0
STATUS_RETRY_CAP_S = 60.0
# status pushes of instances still connecting (QR codes) in flight at once, worker-wide:
# the others wait, and whatever they push once admitted is their latest status
CONNECTING_PUSHES = 8
# what a QR code holds at most (version 40, 8-bit bytes, error correction L)
QR_MAX_BYTES = 2953
# a pairing code is asked for again at the first QR after this long (the phone refuses old codes)
PAIR_CODE_TTL_S = 180.0
PAIR_CODE_TIMEOUT_S = 20.0

# an incoming call's reject + reply + journaling, at most (survives a disconnect meanwhile)
CALL_HANDLING_S = 30.0


@dataclass(frozen=True, slots=True)
class CallPolicy:
    """What to do with an incoming call: reject it, and then send ``message`` (if not empty)."""

    reject: bool = False
    message: str = ""


async def _wake_gap(clock: Clock, last_start: float) -> None:
    gap = clock.monotonic() - last_start
    if gap < WAKE_MIN_GAP_S:
        await clock.sleep(WAKE_MIN_GAP_S - gap)


class State(str, enum.Enum):
    STARTING = "starting"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    STOPPED = "stopped"


class Outcome(str, enum.Enum):
    RETRY = "retry"
    LOGGED_OUT = "logged_out"
    GONE = "gone"
    STOPPED = "stopped"


class _Timeout:
    """What :meth:`InstanceRunner._next` returns when its timeout passed."""


_TIMEOUT = _Timeout()


@dataclass
class ConnectionStats:
    """What every runner counts, worker-wide (``/metrics`` reads it at scrape time)."""

    connects: int = 0
    reconnects: int = 0
    qr_codes: int = 0
    disconnects: Counter[str] = field(default_factory=Counter)  # by reason (logged_out, connect_failure…)


@dataclass
class RunnerContext:
    """What every runner shares (built once by the worker)."""

    backend: Backend
    edge: EdgeClient
    outbound: "OutboundRelay"
    inbound: "InboundRelay"
    clock: Clock
    msg_poll_s: float
    msg_poll_max_s: float
    connect_timeout_s: float
    start_limiter: anyio.CapacityLimiter
    journal_writable: Callable[[], bool]
    batch_mode: Callable[[], bool]
    on_event: Callable[[str, BackendEvent], None] | None = None
    receipts: "ReceiptsRelay | None" = None
    # the call policy of an instance (CALL_REJECT / CALL_REJECT_MESSAGE; the seam for per-instance settings)
    call_policy: Callable[[str], CallPolicy] = lambda _iid: CallPolicy()
    rng: random.Random = random.Random()
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 60.0
    # paces new connection attempts by event-loop lag and proxy backlog (its monitor runs in the manager)
    pacer: StartPacer = field(default_factory=StartPacer)
    connecting_pushes: anyio.CapacityLimiter = field(
        default_factory=lambda: anyio.CapacityLimiter(CONNECTING_PUSHES))
    # QR renders run in threads, one at a time: more would take the GIL from the event loop
    # for one switch interval (5 ms) each, in turn (health and /wake would wait for all of them)
    qr_render: anyio.CapacityLimiter = field(default_factory=lambda: anyio.CapacityLimiter(1))
    # the phone to pair with a code (a discovery item's pair_phone), per instance
    pair_phone: Callable[[str], str | None] = lambda _iid: None
    # leases: whether the instance's queue may be claimed now (held, not fenced); always without leases
    may_claim: Callable[[str], bool] = lambda _iid: True
    stats: ConnectionStats = field(default_factory=ConnectionStats)
    events: EventSink = NO_EVENTS  # the live event log (GET /api/events), with API_TOKEN
    # the cap of idle polls now (None: msg_poll_max_s); longer while the push channel answers
    idle_poll_max_s: Callable[[], float | None] = lambda: None


@dataclass(frozen=True, slots=True)
class InstanceSnapshot:
    """A read-only copy of what a runner knows of its instance (the direct API shows it).

    ``status`` is the latest status set for the proxy (None before the first), ``since`` when
    it began (epoch seconds); ``reason``/``detail``/``reason_at``: the latest DISCONNECTED
    reason, kept after a reconnect; ``qr`` (the raw QR string) and ``pair_code`` only while
    a QR waits to be scanned."""

    instance_id: str
    state: str
    status: str | None
    since: float | None
    jid: str | None
    phone_number: str | None
    push_name: str | None
    reason: str | None
    detail: str | None
    reason_at: float | None
    qr: str | None
    pair_code: str | None
    ban_code: str | None
    ban_expires_at: int | None


@dataclass(frozen=True, slots=True)
class _Desired:
    status: Status
    qr_code: str | None
    qr_raw: str | None
    phone_number: str | None
    reason: str | None
    pair_code: str | None = None
    ban_code: str | None = None
    ban_expires_at: int | None = None
    detail: str | None = None


class StatusReporter:
    """Pushes the instance's latest status to the proxy; a newer status replaces
    an unsent older one (a stale QR is never worth retrying). A raw QR is
    rendered only when its push is due, so a QR replaced first costs nothing;
    pushes of a CONNECTING status share a worker-wide gate (``connecting``), and
    whatever waited there pushes its latest status once admitted."""

    def __init__(self, instance_id: str, edge: EdgeClient, on_gone: Callable[[], None],
                 rng: random.Random, clock: Clock | None = None,
                 connecting: anyio.CapacityLimiter | None = None,
                 render: anyio.CapacityLimiter | None = None, events: EventSink = NO_EVENTS) -> None:
        self.instance_id = instance_id
        self.events = events
        self._published: StatusUpdate | None = None  # the last status given to the event log
        self._render_limiter = render
        self._connecting_gate = connecting
        self._rendered: tuple[str, str] | None = None  # (raw QR, its PNG data URL)
        self.edge = edge
        self.on_gone = on_gone
        self.rng = rng
        self.clock = clock or Clock()
        self.health = LoopHealth("status", self.clock)
        self._backoff = Backoff(STATUS_RETRY_BASE_S, STATUS_RETRY_CAP_S, rng=rng)
        self._desired: _Desired | None = None
        self.since: float | None = None  # when the current status began (epoch seconds)
        self.last_reason: tuple[str, str | None, float] | None = None  # the latest DISCONNECTED (reason, detail, at)
        self._version = 0
        self._pushed_version = 0
        self._changed = anyio.Event()
        self._pushed = anyio.Event()

    def set(self, status: Status, qr_code: str | None = None, *, phone_number: str | None = None,
            reason: str | None = None, qr_raw: str | None = None, pair_code: str | None = None,
            ban_code: str | None = None, ban_expires_at: float | None = None, detail: str | None = None) -> None:
        """``qr_raw``: a QR string, rendered to a PNG data URL when pushed (instead of ``qr_code``).
        ``detail``: what went wrong, for a person (the proxy shows it next to the reason)."""
        update = _Desired(status, qr_code, qr_raw, phone_number, reason, pair_code, ban_code,
                          None if ban_expires_at is None else int(ban_expires_at),
                          None if detail is None else detail[:200])
        if update == self._desired and self._pushed_version == self._version:
            return  # the proxy already has exactly this (e.g. every failed reconnect attempt)
        if self._desired is None or self._desired.status is not status:
            self.since = self.clock.time()
        if reason is not None:
            self.last_reason = (reason, update.detail, self.clock.time())
        self._desired = update
        self._version += 1
        self._pushed = anyio.Event()
        self._changed.set()

    @property
    def latest(self) -> _Desired | None:
        """The latest status set (pushed or not)."""
        return self._desired

    def reassert(self) -> None:
        """Push the current status again: the proxy evidently lost or overwrote it."""
        if self._desired is not None and self._pushed_version == self._version:
            self._version += 1
            self._pushed = anyio.Event()
            self._changed.set()

    async def run(self) -> None:
        """Supervised: a bug restarts the loop, whose state (the latest status) survives."""
        await forever(f"{self.instance_id}: status", self._run, clock=self.clock,
                      backoff=Backoff(STATUS_RETRY_BASE_S, STATUS_RETRY_CAP_S, rng=self.rng),
                      health=self.health, log_to=log)

    async def _run(self) -> None:
        backoff = self._backoff
        while True:
            if self._pushed_version == self._version:
                self.health.ok()
                self._changed = anyio.Event()
                await self._changed.wait()
                continue
            try:
                if self._connecting_gate is not None and self._desired is not None \
                        and self._desired.status is Status.CONNECTING:
                    async with self._connecting_gate:
                        version = await self._push_latest()
                else:
                    version = await self._push_latest()
            except InstanceGone:
                self.on_gone()
                self._pushed_version = self._version
                self._pushed.set()
                return
            except LeaseLost:
                # fenced: another worker holds the instance; its status is no longer ours to tell
                # (the lease keeper, told by the edge client, stops this runner)
                self.drop()
                continue
            except EdgeError as exc:
                # the proxy's Retry-After (429/503) is the least we wait
                delay = max(backoff.next_delay(), exc.retry_after_s or 0.0)
                self._changed = anyio.Event()
                await self.clock.wait(self._changed, delay)  # a newer status cuts the wait short
                continue
            backoff.reset()
            self.health.ok()
            self._pushed_version = version
            if version == self._version:
                self._pushed.set()

    async def _push_latest(self) -> int:
        """Push the latest status; returns its version."""
        version, desired = self._version, self._desired
        assert desired is not None
        qr_code = desired.qr_code
        if desired.qr_raw is not None:
            try:
                qr_code = await self._render(desired.qr_raw)
            except ValueError as exc:  # unencodable: CONNECTING without a QR beats a loop failing forever
                log.error("%s: cannot render the QR code (%s): reporting CONNECTING without it",
                          self.instance_id, exc)
                self._rendered = None
                qr_code = None
            if self._version != version:
                return await self._push_latest()  # replaced while rendering
        update = StatusUpdate(
            instanceId=self.instance_id, status=desired.status, qr_code=qr_code,
            phone_number=desired.phone_number, reason=desired.reason, pair_code=desired.pair_code,
            ban_code=desired.ban_code, ban_expires_at=desired.ban_expires_at, detail=desired.detail)
        if self.events.enabled and update != self._published:  # once per change, whether or not the proxy takes it
            self._published = update
            self.events.publish("status", self.instance_id, update.to_json())
        await self.edge.update_status(update)
        return version

    async def _render(self, raw: str) -> str:
        if self._rendered is None or self._rendered[0] != raw:
            # ~5-10 ms of CPU: in a thread, so the event loop (health, /wake) keeps answering
            self._rendered = (raw, await anyio.to_thread.run_sync(qr_png_data_url, raw,
                                                                  limiter=self._render_limiter))
        return self._rendered[1]

    def drop(self) -> None:
        """Forget what is not pushed yet (the lease is lost: the status is no longer ours to tell)."""
        self._pushed_version = self._version
        self._pushed.set()

    async def flush(self, timeout_s: float) -> bool:
        """Wait until the latest status is pushed (bounded)."""
        if self._pushed_version == self._version:
            return True
        with anyio.move_on_after(timeout_s):
            await self._pushed.wait()
            return True
        return False


class InstanceRunner:
    def __init__(self, instance_id: str, ctx: RunnerContext, *, initial_delay_s: float = 0.0) -> None:
        self.instance_id = instance_id
        self.ctx = ctx
        self.state = State.STARTING
        self.initial_delay_s = initial_delay_s
        self.reconnects = 0
        self._stop_requested = False
        self._silent_stop = False  # the lease is lost: stop without reporting any status
        self._receive_scope: anyio.CancelScope | None = None  # the lifecycle's current wait for an event
        self._wake = anyio.Event()
        self._inbox_tx, self._inbox_rx = anyio.create_memory_object_stream[list[QueuedMessage]](64)
        self.poll_interval = AdaptiveInterval(ctx.msg_poll_s, ctx.msg_poll_max_s)
        self.status = StatusReporter(instance_id, ctx.edge, self._gone, ctx.rng, ctx.clock,
                                     connecting=ctx.connecting_pushes, render=ctx.qr_render, events=ctx.events)
        self.outbound_health = LoopHealth("outbound", ctx.clock)
        self._stopped_event = anyio.Event()
        self._gone_flag = False
        self._interrupt = anyio.Event()  # cuts backoff waits short on stop/gone
        self._pair: tuple[Session, float, str] | None = None  # (session, asked at, code)
        # the session while it is connected (the inbound relay downloads media through it)
        self.connected_session: Session | None = None
        self.own_jid: str | None = None  # our JID, once a connection said it
        self.push_name: str | None = None  # our WhatsApp profile name, once a connection said it

    # ------------------------------------------------------------------ control

    def stop(self, *, report: bool = True) -> None:
        """Ask for a graceful stop (report, disconnect, keep the session).
        Cannot be lost: a flag, and the lifecycle's wait is cut short.
        ``report=False`` (a lost lease): no status is pushed any more, pending ones are dropped."""
        self._stop_requested = True
        if not report:
            self._silent_stop = True
            self.status.drop()
        self._interrupt_lifecycle()

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested

    def wake(self) -> None:
        """Poll the queue now (coalesced: many wakes, one poll)."""
        self.poll_interval.activity()
        self._wake.set()

    def offer(self, messages: list[QueuedMessage]) -> bool:
        """Batch mode: messages fetched (claimed) for this instance by the batch poller. Kept
        while the session is still connecting too (sent once it is connected): a proxy may hand
        them out as soon as it counts the instance as connected (e.g. a lease that just moved here
        while the old holder's CONNECTED still stands), and a claim dropped here would sit
        ``sending`` at the proxy until its re-offer, minutes later."""
        if self.state == State.STOPPED or self._stop_requested:
            return False
        try:
            self._inbox_tx.send_nowait(messages)
        except anyio.WouldBlock:
            return False
        return True

    def _gone(self) -> None:
        self._gone_flag = True
        self._interrupt_lifecycle()

    def _interrupt_lifecycle(self) -> None:
        self._interrupt.set()
        if self._receive_scope is not None:
            self._receive_scope.cancel()

    async def _next(self, rx: MemoryObjectReceiveStream[Any], timeout_s: float = math.inf) -> Any:
        """The next backend event; ``None`` once stop or gone is requested (checked
        first, and it cuts the wait short); ``_TIMEOUT`` after ``timeout_s``."""
        if self._stop_requested or self._gone_flag:
            return None
        with anyio.CancelScope() as scope:
            self._receive_scope = scope
            try:
                with anyio.move_on_after(timeout_s):
                    return await rx.receive()
                return _TIMEOUT
            finally:
                self._receive_scope = None
        return None  # cancelled by stop() or _gone()

    def snapshot(self) -> InstanceSnapshot:
        """What the runner knows of its instance now (a copy: nothing here changes the runner)."""
        desired = self.status.latest
        waiting_qr = desired is not None and desired.status is Status.CONNECTING and desired.qr_raw is not None
        reason = self.status.last_reason
        phone = desired.phone_number if desired is not None and desired.phone_number else None
        if phone is None and self.own_jid:
            phone = Connected(jid=self.own_jid).phone_number
        return InstanceSnapshot(
            instance_id=self.instance_id, state=self.state.value,
            status=desired.status.value if desired is not None else None, since=self.status.since,
            jid=self.own_jid, phone_number=phone, push_name=self.push_name,
            reason=reason[0] if reason else None, detail=reason[1] if reason else None,
            reason_at=reason[2] if reason else None,
            qr=desired.qr_raw if waiting_qr and desired is not None else None,
            pair_code=desired.pair_code if waiting_qr and desired is not None else None,
            ban_code=desired.ban_code if desired is not None else None,
            ban_expires_at=desired.ban_expires_at if desired is not None else None)

    async def wait_stopped(self) -> None:
        await self._stopped_event.wait()

    # ------------------------------------------------------------------ main

    async def run(self) -> Outcome:
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.status.run)
                outcome = await self._lifecycle()
                if self._silent_stop:
                    self.status.drop()
                # let the last status reach the proxy, then end the reporter
                await self.status.flush(5.0)
                tg.cancel_scope.cancel()
            return outcome
        finally:
            self.state = State.STOPPED
            self._stopped_event.set()

    async def _lifecycle(self) -> Outcome:
        backoff = Backoff(self.ctx.backoff_base_s, self.ctx.backoff_cap_s, rng=self.ctx.rng)
        if self.initial_delay_s > 0:
            await self.ctx.clock.wait(self._interrupt, self.initial_delay_s)
        while True:
            if self._gone_flag:
                return Outcome.GONE
            if self._stop_requested:
                return Outcome.STOPPED
            outcome, retry_after = await self._connection_once(backoff)
            if outcome is not Outcome.RETRY:
                return outcome
            self.state = State.RECONNECTING
            self.reconnects += 1
            self.ctx.stats.reconnects += 1
            delay = backoff.next_delay()
            if retry_after is not None:
                delay = max(delay, retry_after)
            log.info("%s: reconnecting in %.1fs", self.instance_id, delay, extra={"instance_id": self.instance_id})
            await self.ctx.clock.wait(self._interrupt, delay)

    async def _connection_once(self, backoff: Backoff) -> tuple[Outcome, float | None]:
        """One session from open to close. Returns the outcome and an optional
        minimum wait before the next attempt."""
        tx, rx = anyio.create_memory_object_stream[Any](128)
        iid = self.instance_id

        async def sink(event: BackendEvent) -> None:
            if isinstance(event, InboundMessage):
                self.ctx.inbound.accept(iid, event)
                self.wake()  # a conversation is active: look for replies sooner
            elif isinstance(event, Receipt):
                if self.ctx.receipts is not None:
                    self.ctx.receipts.accept(iid, event)
            else:
                try:
                    await tx.send(event)
                except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                    pass  # the session outlived its connection attempt: ignore
            if self.ctx.on_event is not None:
                try:
                    self.ctx.on_event(iid, event)
                except Exception:  # a hook must never break the runner
                    log.exception("on_event hook failed")

        self.state = State.CONNECTING
        session: Session | None = None
        try:
            async with anyio.create_task_group() as tg:
                async with self.ctx.start_limiter:
                    # beyond START_CONCURRENCY: no new session while the loop or the proxy lags
                    await self.ctx.pacer.admit(self._interrupt)
                    if self._stop_requested or self._gone_flag:
                        return (Outcome.GONE if self._gone_flag else Outcome.STOPPED), None
                    try:
                        session = await self.ctx.backend.open_session(iid, sink)
                        await session.connect()
                    except Exception as exc:  # a library error is a failed attempt, not a dead runner
                        log.exception("%s: could not start a connection", iid, extra={"instance_id": iid})
                        first: Any = Disconnected("connect_failure", f"{type(exc).__name__}: {exc}"[:200])
                    else:
                        first = await self._first_event(rx)
                if session is None:
                    self.ctx.stats.disconnects["connect_failure"] += 1
                    self.status.set(Status.DISCONNECTED, None, reason="connect_failure", detail=first.detail)
                    return Outcome.RETRY, None
                result = await self._handle_events(first, rx, session, tg, backoff)
                tg.cancel_scope.cancel()
            return result
        finally:
            tx.close()
            self.connected_session = None
            if session is not None:
                with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT_S):
                    try:
                        await session.disconnect()
                        await session.close()
                    except Exception:
                        log.exception("%s: closing the session failed", iid)

    async def _first_event(self, rx: MemoryObjectReceiveStream[Any]) -> Any:
        event = await self._next(rx, self.ctx.connect_timeout_s)
        if event is _TIMEOUT:
            return Disconnected("connect_timeout", f"no QR and no connection within {self.ctx.connect_timeout_s:g}s")
        return event

    async def _handle_events(self, event: Any, rx: MemoryObjectReceiveStream[Any], session: Session,
                             tg: anyio.abc.TaskGroup, backoff: Backoff) -> tuple[Outcome, float | None]:
        iid = self.instance_id
        connected = False
        while True:
            if event is None:  # stop or gone requested
                if self._gone_flag:
                    log.warning("%s: the proxy no longer knows this instance: stopping (auth files kept)", iid,
                                extra={"instance_id": iid})
                    return Outcome.GONE, None
                if connected and not self._silent_stop:
                    self.ctx.stats.disconnects["shutdown"] += 1
                    self.status.set(Status.DISCONNECTED, None, reason="shutdown")
                return Outcome.STOPPED, None
            if isinstance(event, QrCode):
                self.state = State.CONNECTING
                self.ctx.stats.qr_codes += 1
                log.info("%s: new QR code (scan it in WhatsApp > Linked devices)", iid, extra={"instance_id": iid})
                if len(event.code.encode("utf-8", "surrogatepass")) > QR_MAX_BYTES:
                    # rendered later (lazily), so refuse here what no QR can hold: a backend bug
                    raise ValueError(f"QR data of {len(event.code)} characters cannot be encoded")
                self.status.set(Status.CONNECTING, qr_raw=event.code, pair_code=await self._pair_code(session))
            elif isinstance(event, Connected):
                backoff.reset()
                connected = True
                self._connected(event, session)
                tg.start_soon(self._supervised_outbound, session)
            elif isinstance(event, Call):
                tg.start_soon(self._on_call, session, event)
            elif isinstance(event, Disconnected):
                self.connected_session = None
                self.ctx.stats.disconnects[event.reason] += 1
                log.warning("%s: disconnected (%s%s)", iid, event.reason, f": {event.detail}" if event.detail else "",
                            extra={"instance_id": iid})
                self.status.set(Status.DISCONNECTED, None, reason=event.reason, ban_code=event.ban_code,
                                ban_expires_at=event.ban_expires_at, detail=event.detail)
                return Outcome.RETRY, event.retry_after_s
            elif isinstance(event, LoggedOut):
                self.ctx.stats.disconnects["logged_out"] += 1
                log.warning("%s: logged out from the phone: wiping its session; a new QR on next discovery", iid,
                            extra={"instance_id": iid})
                self.status.set(Status.DISCONNECTED, None, reason="logged_out")
                with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT_S):
                    await session.close()
                try:
                    with anyio.CancelScope(shield=True):
                        await self.ctx.backend.forget_session(iid)
                except (OSError, BackendError) as exc:
                    log.error("%s: the logged-out session could not be removed: %s", iid, exc,
                              extra={"instance_id": iid})
                return Outcome.LOGGED_OUT, None
            event = await self._next(rx)

    def _connected(self, event: Connected, session: Session) -> None:
        iid = self.instance_id
        self.state = State.CONNECTED
        self.connected_session = session
        self.ctx.stats.connects += 1
        self.own_jid = event.jid or self.own_jid
        self.push_name = event.push_name or self.push_name
        log.info("%s: connected", iid, extra={"instance_id": iid})
        self.ctx.inbound.instance_connected(iid)  # media downloads waiting for the connection
        self.ctx.outbound.instance_connected(iid)  # a shared journal: what another worker left
        if self.ctx.receipts is not None:
            self.ctx.receipts.wake()
        self.status.set(Status.CONNECTED, None, phone_number=event.phone_number)
        self.poll_interval.activity()

    async def _pair_code(self, session: Session) -> str | None:
        """The pairing code to show next to the QR when discovery gave a ``pair_phone``: asked for
        at the first QR of a connection, again once it is ``PAIR_CODE_TTL_S`` old."""
        phone = self.ctx.pair_phone(self.instance_id)
        if phone is None:
            return None
        now = self.ctx.clock.monotonic()
        if self._pair is not None and self._pair[0] is session and now - self._pair[1] < PAIR_CODE_TTL_S:
            return self._pair[2]
        try:
            with anyio.fail_after(PAIR_CODE_TIMEOUT_S):
                code = await session.pair_phone(phone)
        except (BackendError, TimeoutError) as exc:
            log.warning("%s: no pairing code (%s): the QR still works", self.instance_id, exc)
            self._pair = None
            return None
        log.info("%s: new pairing code (enter it on the phone: Linked devices > Link with phone number)",
                 self.instance_id)
        self._pair = (session, now, code)
        return code

    async def _on_call(self, session: Session, call: Call) -> None:
        """Reject the call if the policy says so (then send its reply text), and journal
        it for ``/inbound`` either way. Shielded and bounded: a disconnect meanwhile
        never loses the record."""
        iid = self.instance_id
        policy = self.ctx.call_policy(iid)
        rejected = False
        with anyio.CancelScope(shield=True), anyio.move_on_after(CALL_HANDLING_S):
            try:
                if policy.reject:
                    try:
                        await session.reject_call(call)
                        rejected = True
                        log.info("%s: rejected a %s call", iid, "video" if call.video else "voice")
                    except SendError as exc:
                        log.warning("%s: could not reject a call (%s)", iid, exc)
            finally:
                self.ctx.inbound.accept_call(iid, call, rejected=rejected,
                                             own_jid=self.own_jid)
            if rejected and policy.message:
                try:
                    await session.send_text(call.from_jid, policy.message)
                except SendError as exc:
                    log.warning("%s: could not send the call reply text (%s)", iid, exc)

    # ------------------------------------------------------------------ outbound

    async def _supervised_outbound(self, session: Session) -> None:
        await forever(f"{self.instance_id}: outbound", lambda: self._outbound_loop(session), clock=self.ctx.clock,
                      backoff=Backoff(self.ctx.backoff_base_s, self.ctx.backoff_cap_s, rng=self.ctx.rng),
                      health=self.outbound_health, log_to=log)

    async def _outbound_loop(self, session: Session) -> None:
        """Poll while connected; one poll at a time; adaptive interval.

        No lockstep after a mass connect: the first poll comes at a random moment
        of the first interval (a /wake still polls at once), so instances that
        connected together keep their polls that far apart at every interval."""
        iid = self.instance_id
        first = self.ctx.rng.random() * self.ctx.msg_poll_s
        if first > 0:
            await self.ctx.clock.wait(self._wake, first)
        while True:
            self._wake = anyio.Event()
            last_start = self.ctx.clock.monotonic()
            if not self.ctx.journal_writable():
                wait = 5.0  # pull no new work we could not journal
                self.outbound_health.ok()
            elif not self.ctx.may_claim(iid):
                wait = self.ctx.msg_poll_s  # the lease is lost or fenced: claim nothing (the runner is stopping)
                self.outbound_health.ok()
            elif self.ctx.batch_mode():
                wait = await self._drain_inbox(session)
            elif (allowed := self.ctx.outbound.allowance(iid)) == 0:
                # pacing caps reached: claim nothing until one more send is allowed
                wait = min(self.ctx.msg_poll_max_s, max(self.ctx.msg_poll_s,
                                                        self.ctx.outbound.pacer(iid).wait_until_allowed_s()))
                self.outbound_health.ok()
            else:
                try:
                    messages = await self.ctx.edge.queued_messages(iid, limit=allowed)
                    self.ctx.outbound.note_claims(messages, iid)
                except InstanceGone:
                    self._gone()
                    return
                except EdgeError:
                    wait = self.poll_interval.idle()
                    self.outbound_health.ok()
                else:
                    wait = await self._process(session, messages)
            if wait > 0 and await self.ctx.clock.wait(self._wake, wait):
                await _wake_gap(self.ctx.clock, last_start)

    async def _drain_inbox(self, session: Session) -> float:
        with anyio.move_on_after(self.ctx.msg_poll_max_s):
            messages = await self._inbox_rx.receive()
            return await self._process(session, messages)
        return 0.0

    async def _process(self, session: Session, messages: list[QueuedMessage]) -> float:
        """Send what a poll returned; returns the wait before the next poll."""
        if not messages:
            self.outbound_health.ok()
            return self.poll_interval.idle(self.ctx.idle_poll_max_s())
        try:
            new = await self.ctx.outbound.process(self.instance_id, session, messages,
                                                  stopping=lambda: self._stop_requested)
        except JournalUnavailable as exc:
            if not isinstance(exc, JournalWriteError):  # a full disk has its own readiness reason
                report_failure(self.outbound_health, f"{self.instance_id}: outbound", exc, log)
            return 5.0
        self.outbound_health.ok()
        self.poll_interval.activity()
        # more may be queued behind what we just sent: ask again at once, but never
        # spin on a proxy that keeps re-offering messages we already handled
        return 0.0 if new else self.poll_interval.floor_s

    def failing_loops(self) -> list[str]:
        """Names of this runner's loops currently in their last-resort handler."""
        now = self.ctx.clock.monotonic()
        return [h.name for h in (self.status.health, self.outbound_health) if h.failing(now)]
