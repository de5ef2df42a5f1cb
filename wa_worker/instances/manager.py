"""All instances of this worker: discovery, resume, exactly one runner each,
the optional batch poller, wake-ups and graceful stop.

With a proxy that has leases (:mod:`.leases`), the leases decide which instances run
here: no discovery loop and no resume of stored sessions at start; a granted lease
starts its runner (a stored session resumes, else QR or pairing code), a lost one
stops it without logout.

Runners are supervised: one that crashes is reported DISCONNECTED (reason
``crashed``), counted, and started again after a per-instance clamped backoff;
its id keeps its place in ``runners`` meanwhile, so there is never a second one.
The discovery and batch loops run under :func:`~wa_worker.supervise.forever`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import anyio

from ..backends.base import Session
from ..edge.client import EdgeClient, EdgeError, EndpointMissing
from ..edge.models import InstanceRef, QueuedMessage, Status, StatusUpdate
from ..ids import is_valid_instance_id
from ..storage.journal import JournalUnavailable
from ..supervise import LoopHealth, describe_error, forever, traceback_once
from ..timing import AdaptiveInterval, Backoff
from .leases import LeaseKeeper
from .runner import InstanceRunner, InstanceSnapshot, Outcome, RunnerContext, State, _wake_gap
from .settings import InstanceSettingsBook, SettingsPoller

log = logging.getLogger("wa_worker.manager")

CRASH_REPORT_TIMEOUT_S = 10.0


class InstanceManager:
    def __init__(self, ctx: RunnerContext, edge: EdgeClient, *, instance_poll_s: float, instance_poll_max_s: float,
                 batch_poll: bool, resume_jitter_s: float = 2.0, worker_id: str = "wa-worker",
                 capacity: int = 500) -> None:
        self.ctx = ctx
        self.edge = edge
        self.runners: dict[str, InstanceRunner] = {}
        self.discovery_interval = AdaptiveInterval(instance_poll_s, instance_poll_max_s)
        self.batch_poll = batch_poll
        self.batch_supported: bool | None = None  # None: not probed yet
        self.batch_interval = AdaptiveInterval(ctx.msg_poll_s, ctx.msg_poll_max_s)
        self.resume_jitter_s = resume_jitter_s
        self.outcomes: Counter[str] = Counter()
        self._tg: anyio.abc.TaskGroup | None = None
        self._discovery_wake = anyio.Event()
        self._batch_wake = anyio.Event()
        self._stop_event = anyio.Event()
        self._last_discovered: frozenset[str] = frozenset()
        self.crashes: Counter[str] = Counter()  # per instance id
        self.restarting: set[str] = set()  # crashed runners waiting for their restart
        self._unheld_logged: set[str] = set()  # batch: instances with messages but no session here
        self._gone_ids: set[str] = set()  # ended by a proxy 404/410: batch messages never restart them
        self.pair_phones: dict[str, str] = {}  # discovery items' pair_phone (a pairing code next to the QR)
        ctx.pair_phone = self.pair_phones.get
        # each instance's own settings (discovery items, /instance-settings): pacing, calls, proxy_url
        self.instance_settings = InstanceSettingsBook(ctx.outbound.configure, ctx.outbound.journal)
        self.settings_poller = SettingsPoller(edge, self.instance_settings, ctx.clock)
        ctx.backend.instance_proxy = self.instance_settings.proxy_for
        clock = ctx.clock
        # stale after 3 of its longest waits; the worker widens these (proxy call time, READY_MAX_PROXY_SILENCE_S)
        self.discovery_health = LoopHealth("discovery", clock, stale_after_s=3 * instance_poll_max_s)
        self.batch_health = LoopHealth("batch poller", clock, stale_after_s=3 * ctx.msg_poll_max_s)
        # leases (a fleet): probed first in run(); without them (mode False) everything is as it always was
        self.leases = LeaseKeeper(edge, self, worker_id=worker_id, capacity=capacity, clock=clock, rng=ctx.rng,
                                  backoff_base_s=ctx.backoff_base_s)
        ctx.may_claim = self.leases.may_claim
        ctx.outbound.send_cap_s = self.leases.send_cap_s  # a send never outlives this worker's lease margin
        self.foreign_token_messages = 0  # batch messages under a token that is not this worker's current one
        # the worker's graceful restart (exit 75): a proxy that gained leases while this worker ran without
        self.on_restart_needed: Callable[[], None] = lambda: None

    # ------------------------------------------------------------------ queries

    def batch_mode(self) -> bool:
        return self.batch_supported is True

    def session(self, instance_id: str) -> Session | None:
        """The instance's session while it is connected, else None."""
        runner = self.runners.get(instance_id)
        return runner.connected_session if runner is not None else None

    def snapshot(self, instance_id: str) -> InstanceSnapshot | None:
        """A read-only copy of what this worker knows of ``instance_id``; None when it does not hold it."""
        runner = self.runners.get(instance_id)
        return runner.snapshot() if runner is not None else None

    def snapshots(self) -> list[InstanceSnapshot]:
        """Every instance this worker holds, by id."""
        return [self.runners[iid].snapshot() for iid in sorted(self.runners)]

    def counts(self) -> dict[str, int]:
        c = Counter(r.state.value for r in self.runners.values())
        return {
            "total": len(self.runners),
            "connected": c[State.CONNECTED.value],
            "connecting": c[State.CONNECTING.value] + c[State.STARTING.value],
            "reconnecting": c[State.RECONNECTING.value],
            "restarting_after_crash": len(self.restarting),
            "crashes": sum(self.crashes.values()),
            "failing_loops": sum(len(r.failing_loops()) for r in self.runners.values()),
        }

    # ------------------------------------------------------------------ control

    def wake(self, instance_id: str | None = None) -> int:
        """Poll now: one instance or all. Coalesced. Returns how many were woken.

        A wake for all instances, or for one this worker does not run (e.g. just
        added on the proxy), also runs discovery now (with leases: a renewal)."""
        if instance_id is None or instance_id not in self.runners:
            if self.leases.mode:
                self.leases.wake()
            else:
                self._discovery_wake.set()
        if self.batch_mode():
            self.batch_interval.activity()
            self._batch_wake.set()
            return 1 if instance_id is None or instance_id in self.runners else 0
        if instance_id is not None:
            r = self.runners.get(instance_id)
            if r is None:
                return 0
            r.wake()
            return 1
        for r in self.runners.values():
            r.wake()
        return len(self.runners)

    def ensure(self, instance_id: str, *, initial_delay_s: float = 0.0) -> bool:
        """Start a runner unless one is already running. True if started."""
        if self._stop_event.is_set() or self._tg is None or not is_valid_instance_id(instance_id):
            return False
        if instance_id in self.runners:
            return False
        runner = InstanceRunner(instance_id, self.ctx, initial_delay_s=initial_delay_s)
        self.runners[instance_id] = runner
        self._tg.start_soon(self._run_runner, runner)
        return True

    async def _run_runner(self, runner: InstanceRunner) -> None:
        """Run one instance's runner; restart it (same id, same slot) whenever it crashes."""
        iid = runner.instance_id
        backoff = Backoff(self.ctx.backoff_base_s, self.ctx.backoff_cap_s, rng=self.ctx.rng)
        gone = False
        try:
            while True:
                started = self.ctx.clock.monotonic()
                try:
                    outcome = await runner.run()
                except Exception as exc:
                    if self.ctx.clock.monotonic() - started > self.ctx.backoff_cap_s:
                        backoff.reset()  # it had run fine for a while: a new episode
                    self.outcomes["crashed"] += 1
                    self.crashes[iid] += 1
                    delay = backoff.next_delay()
                    # one line each time; the traceback the first time this error is seen
                    log.error("%s: runner crashed (%s); reporting DISCONNECTED (crashed), restarting in %.1fs",
                              iid, describe_error(exc), delay, exc_info=traceback_once(exc))
                    fresh = await self._restart_after(runner, delay)
                    if fresh is None:
                        return
                    runner = fresh
                    continue
                self.outcomes[outcome.value] += 1
                if outcome is Outcome.GONE:
                    self._gone_ids.add(iid)
                    gone = True
                if outcome is Outcome.LOGGED_OUT:
                    # the proxy now lists it as DISCONNECTED: look now, for a fresh QR
                    self.discovery_interval.activity()
                    self._discovery_wake.set()
                return
        finally:
            self.restarting.discard(iid)
            if self.runners.get(iid) is runner:
                del self.runners[iid]
                self.leases.runner_ended(iid, gone=gone)  # a lost lease is released; a held one restarts

    async def _restart_after(self, runner: InstanceRunner, delay: float) -> InstanceRunner | None:
        """Report a crashed runner, wait ``delay``; its successor (None when stopping)."""
        iid = runner.instance_id
        self.restarting.add(iid)
        await self._report_crashed(iid)
        await self.ctx.clock.wait(self._stop_event, delay)
        self.restarting.discard(iid)
        if self._stop_event.is_set() or self.runners.get(iid) is not runner or runner.stop_requested:
            return None  # stopping, replaced, or (leases) the lease was lost meanwhile
        fresh = InstanceRunner(iid, self.ctx)
        self.runners[iid] = fresh
        return fresh

    async def _report_crashed(self, iid: str) -> None:
        update = StatusUpdate(instanceId=iid, status=Status.DISCONNECTED, qr_code=None, reason="crashed")
        with anyio.move_on_after(CRASH_REPORT_TIMEOUT_S):
            try:
                await self.edge.update_status(update)
            except EdgeError:
                pass  # best effort: the restarted runner reports its own status

    # ------------------------------------------------------------------ LeaseHost (the keeper's view)

    def apply_grant(self, ref: InstanceRef) -> None:
        """A new lease's discovery fields: settings, proxy_url and pair_phone, as for a discovered item."""
        self.instance_settings.apply_all([(ref.id, ref.settings, ref.settings_cleared, ref.proxy)])
        self._remember_item(ref)

    def start_leased(self, instance_id: str) -> bool:
        started = self.ensure(instance_id, initial_delay_s=self.ctx.rng.random() * 0.05)
        if started:
            log.info("%s: leased here: starting", instance_id, extra={"instance_id": instance_id})
        return started

    def stop_unleased(self, instance_id: str) -> None:
        runner = self.runners.get(instance_id)
        if runner is not None:
            runner.stop(report=False)

    def running(self, instance_id: str) -> bool:
        return instance_id in self.runners

    def unsent_claims(self, instance_ids: list[str], limit_each: int) -> dict[str, list[str]]:
        return self.ctx.outbound.unsent_claims(instance_ids, limit_each)

    def withhold_claims(self, message_ids: list[str]) -> None:
        self.ctx.outbound.withhold_claims(message_ids)

    def settle_claims(self, requeued: list[str], kept: list[str]) -> None:
        self.ctx.outbound.settle_claims(requeued, kept)

    def request_stop(self) -> None:
        self._stop_event.set()
        self._discovery_wake.set()
        self._batch_wake.set()
        for r in list(self.runners.values()):
            r.stop()

    async def stop(self, grace_s: float) -> None:
        """Stop every runner gracefully within ``grace_s``; whatever is left is cancelled."""
        self.request_stop()
        with anyio.move_on_after(grace_s):
            for r in list(self.runners.values()):
                await r.wait_stopped()

    # ------------------------------------------------------------------ loops

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            pacer = self.ctx.pacer
            if pacer.backlog is None:
                pacer.backlog = lambda: self.edge.backlog
            tg.start_soon(pacer.run)
            # before resuming: a stored session connects through its proxy_url from the first attempt
            # (what the journal kept, then the proxy's answer if it gives one in time)
            self.instance_settings.load()
            # a fleet or one worker? Asked first (with leases every call says who calls). Until the proxy
            # answers, nothing is resumed (two workers must never open one session); with leases, only
            # what is leased runs here (its grant carries its proxy_url), no discovery, no resume
            leased = await self.leases.probe(self._stop_event, known_without=self._remembered_leases() == "off")
            await self.settings_poller.first(self.edge.timeout_s)
            if leased:
                self._remember_leases("on")
                self.discovery_health.finished = True
                tg.start_soon(self._supervised, "leases", self.leases.run, self.leases.health)
            else:
                if self.leases.unconfirmed:
                    tg.start_soon(self._confirm_no_leases)
                elif self.leases.mode is False:
                    self._remember_leases("off")
                self._resume_stored()
                tg.start_soon(self._supervised, "discovery", self._discovery_loop, self.discovery_health)
            if self.settings_poller.supported is not False:
                tg.start_soon(self._supervised, "instance settings", self.settings_poller.run,
                              self.settings_poller.health)
            if self.batch_poll:
                tg.start_soon(self._supervised, "batch poller", self._batch_loop, self.batch_health)
            else:
                self.batch_health.finished = True
            # runners are children of this task group; it ends when stop() is done
            await self._stop_event.wait()
            await self._wait_runners()
            tg.cancel_scope.cancel()

    async def _supervised(self, name: str, fn: Any, health: LoopHealth) -> None:
        await forever(name, fn, clock=self.ctx.clock, health=health, log_to=log,
                      backoff=Backoff(self.ctx.backoff_base_s, self.ctx.backoff_cap_s, rng=self.ctx.rng))

    def loops(self) -> list[LoopHealth]:
        return [self.discovery_health, self.batch_health, self.settings_poller.health, self.leases.health]

    async def _wait_runners(self) -> None:
        for r in list(self.runners.values()):
            await r.wait_stopped()

    def _remembered_leases(self) -> str | None:
        try:
            return self.ctx.outbound.journal.meta("leases")
        except JournalUnavailable:
            return None

    def _remember_leases(self, mode: str) -> None:
        try:
            self.ctx.outbound.journal.set_meta("leases", mode)
        except JournalUnavailable:
            pass  # only a proxy outage at the next start depends on it

    async def _confirm_no_leases(self) -> None:
        """Started without an answer to the lease probe: once the proxy answers, a proxy that has
        leases now makes this worker restart gracefully into lease mode (exit 75)."""
        if await self.leases.confirm(self._stop_event):
            self._remember_leases("on")
            self.on_restart_needed()
        elif self.leases.mode is False and not self._stop_event.is_set():
            self._remember_leases("off")

    def _resume_stored(self) -> None:
        """Sessions on disk are resumed even if the proxy thinks they are
        CONNECTED (a crash left it stale). Spread over a few seconds."""
        try:
            stored = self.ctx.backend.stored_instances()
        except OSError as exc:
            log.error("cannot list the stored sessions in AUTH_DIR (%s): none resumed; discovery goes on", exc)
            return
        if stored:
            log.info("resuming %d stored session(s)", len(stored))
        spread = min(self.resume_jitter_s, 0.01 * len(stored))
        for iid in stored:
            self.ensure(iid, initial_delay_s=self.ctx.rng.random() * spread)

    async def _discovery_loop(self) -> None:
        while not self._stop_event.is_set():
            self._discovery_wake = anyio.Event()
            try:
                refs = await self.edge.disconnected_instances()
            except EdgeError:
                wait = self.discovery_interval.idle()
            else:
                started = self._start_discovered(refs)
                ids = frozenset(r.id for r in refs)
                if started or ids != self._last_discovered:
                    self.discovery_interval.activity()
                    wait = self.discovery_interval.floor_s
                else:
                    wait = self.discovery_interval.idle()
                self._last_discovered = ids
            self.discovery_health.ok()
            await self.ctx.clock.wait(self._discovery_wake, wait)

    def _start_discovered(self, refs: list[InstanceRef]) -> int:
        started = 0
        self.instance_settings.apply_all((r.id, r.settings, r.settings_cleared, r.proxy) for r in refs)
        for ref in sorted(refs, key=lambda r: -r.priority):
            self._remember_item(ref)
            running = self.runners.get(ref.id)
            if running is not None:
                if running.state is State.CONNECTED:
                    # listed as needing a connection while we hold it: the proxy is stale
                    running.status.reassert()
                continue
            if self.ensure(ref.id, initial_delay_s=self.ctx.rng.random() * 0.05 if started else 0.0):
                started += 1
        if started:
            log.info("discovery started %d instance(s)", started)
        return started

    def _remember_item(self, ref: InstanceRef) -> None:
        self._gone_ids.discard(ref.id)  # the proxy knows it again
        if ref.pair_phone is not None:
            self.pair_phones[ref.id] = ref.pair_phone
        else:
            self.pair_phones.pop(ref.id, None)

    async def _batch_loop(self) -> None:
        """One ``GET /queued-messages`` for every instance, if the proxy supports it."""
        while not self._stop_event.is_set():
            self._batch_wake = anyio.Event()
            last_start = self.ctx.clock.monotonic()
            connected = [r for r in self.runners.values() if r.state is State.CONNECTED]
            wait: float
            if not connected or self.leases.check_fence():  # fenced: claim nothing until a renewal
                wait = self.batch_interval.floor_s
            else:
                try:
                    messages = await self.edge.queued_messages_batch()
                    self.ctx.outbound.note_claims(messages)
                except EndpointMissing:
                    log.info("the proxy does not support batch polling: polling per instance")
                    self.batch_supported = False
                    self.batch_health.finished = True
                    return
                except EdgeError:
                    wait = self.batch_interval.idle()
                else:
                    if self.batch_supported is None:
                        log.info("the proxy supports batch polling: one call serves every instance")
                        self.batch_supported = True
                    wait = self._dispatch(messages, last_start)
            self.batch_health.ok()
            if await self.ctx.clock.wait(self._batch_wake, wait):
                await _wake_gap(self.ctx.clock, last_start)

    def _dispatch(self, messages: list[QueuedMessage], asked_at: float = 0.0) -> float:
        if not messages:
            return self.batch_interval.idle(self.ctx.idle_poll_max_s())
        by_instance: dict[str, list[QueuedMessage]] = {}
        for m in messages:
            mid_iid = m.instance_id
            if mid_iid is None:
                continue
            if self.leases.mode:
                # only what this worker's current lease claimed: a message under another token is not ours
                token = self.leases.held.get(mid_iid)
                if token is None or (m.lease_token is not None and m.lease_token != token):
                    self.foreign_token_messages += 1
                    continue
                if self.leases.handed_back_since(mid_iid, asked_at):
                    # asked before this instance's claims were handed back under the same token: the proxy may
                    # have put this one back to queued meanwhile; left (it comes back through a new claim)
                    continue
                if m.lease_token is None:
                    m = replace(m, lease_token=token)
            by_instance.setdefault(mid_iid, []).append(m)
        for iid, batch in by_instance.items():
            r = self.runners.get(iid)
            if r is None:
                self._unheld(iid, len(batch))
            elif not r.offer(batch):
                log.debug("batch: %d message(s) for %s, which is stopping: left for the proxy", len(batch), iid)
        self.batch_interval.activity()
        return self.batch_interval.floor_s

    def _unheld(self, iid: str, count: int) -> None:
        """Batch messages for an instance without a runner here: start it if its
        session is on this worker's disk; otherwise leave them (the proxy's lease
        expires and re-offers them) and say so once per instance."""
        if not is_valid_instance_id(iid) or iid in self._gone_ids or self.leases.mode:
            return  # with leases a session starts only when leased
        try:
            stored = self.ctx.backend.has_session(iid)
        except OSError:
            stored = False
        if stored and self.ensure(iid):
            log.info("batch: %d message(s) for %s, whose session is stored here: starting it", count, iid)
            self._unheld_logged.discard(iid)
            return
        if iid not in self._unheld_logged:
            if len(self._unheld_logged) >= 10_000:
                self._unheld_logged.clear()
            self._unheld_logged.add(iid)
            log.warning("batch: %d message(s) for %s, which this worker does not hold: left for the proxy "
                        "(they are offered again when its lease expires)", count, iid)
