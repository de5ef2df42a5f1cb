"""The worker: wires settings, backend, edge client, journal, relays, instance
manager and HTTP server, and owns every task they run (the task tree, the
supervision rule and ``/ready``: docs/architecture.md, "Task tree")."""

from __future__ import annotations

import logging
import random
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
from aiohttp import web

from .api.app import MOUNT_AT as API_MOUNT_AT
from .api.app import ApiStats, build_api_app
from .api.elsewhere import HolderFinder
from .api.routes import mount_api_routes
from .api.sender import ApiSender
from .api.events_routes import add_event_routes
from .backends import make_backend
from .backends.base import Backend, BackendEvent
from .backends.simulator import SimulatorBackend
from .config import WORKER_ID_RE, ConfigError, Settings, UnknownSendPolicy, load_settings, placeholder_warnings
from .edge.client import EdgeClient
from .events import NO_EVENTS, EventLog, EventSink
from .fdguard import EXIT_FD_EXHAUSTED, FdBudget, fd_limit, raise_fd_limit
from .http.guard import SERVER_OPTIONS, ConnectionGuard, GuardedSite
from .http.server import build_app, build_metrics_app
from .http.simulator_routes import mount_simulator_routes
from .instances.manager import InstanceManager
from .instances.push import PushChannel
from .instances.runner import CallPolicy, RunnerContext
from .logutil import redact_url, setup_logging, url_secrets
from .metrics import MetricSources, WorkerMetrics, package_version
from .preflight import StartupError, check_paths, check_session_store, check_simulator_store
from .relays.inbound import InboundRelay
from .relays.outbound import Acknowledger, OutboundRelay
from .relays.numbers import NumberResolver
from .relays.outbound_media import MediaLimits
from .relays.send_pacing import SendLimits
from .relays.receipts import ReceiptsRelay
from .storage.db import StoreOpenError
from .storage.journal import Journal, JournalUnavailable, JournalWriteError
from .storage.pgjournal import PgJournal
from .supervise import LoopHealth, forever
from .timing import Backoff, Clock

log = logging.getLogger("wa_worker")

SHUTDOWN_GRACE_S = 8.0
LEASE_RELEASE_TIMEOUT_S = 3.0
EXIT_RESTART = EXIT_FD_EXHAUSTED  # 75 (EX_TEMPFAIL): "start me again", like the descriptor guard's restart
HOUSEKEEPING_EVERY_S = 600.0
STORE_PROBE_EVERY_S = 5.0


class Worker:
    """The whole worker; :meth:`run` serves until :meth:`request_stop`.

    ``backend``, ``edge``, ``clock`` and ``rng`` replace the real ones (tests);
    ``on_event`` sees every backend event (``wa-worker dev`` prints QR codes);
    ``host`` is the HTTP bind address; ``retry_cap_s`` caps the relays' backoff.
    """

    # the direct API's sends (only with API_TOKEN): built with the app, run in the services task group
    api_sender: ApiSender | None = None

    # long: builds and wires every part of the worker (relays, manager, push channel, event log, metrics)
    def __init__(
        self,
        settings: Settings,
        *,
        backend: Backend | None = None,
        edge: EdgeClient | None = None,
        clock: Clock | None = None,
        on_event: Callable[[str, BackendEvent], None] | None = None,
        rng: random.Random | None = None,
        host: str = "0.0.0.0",
        retry_cap_s: float = 300.0,
        worker_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock or Clock()
        self.rng = rng or random.Random()
        self.backend = backend or make_backend(settings)
        self.edge = edge or EdgeClient(settings.edge_base_url, settings.WORKER_SECRET.get_secret_value(),
                                       timeout_s=settings.EDGE_TIMEOUT_S,
                                       max_response_bytes=settings.EDGE_MAX_RESPONSE_BYTES)
        self.journal = _open_journal(settings, self.clock)
        self.worker_id = _worker_id(settings, self.journal)
        # the relays report each round (and store trouble) to these; their crashes count too
        self.inbound_health = LoopHealth("inbound relay", self.clock)
        self.acks_health = LoopHealth("acknowledger", self.clock)
        self.inbound = InboundRelay(self.journal, self.edge, ttl_s=settings.inbound_ttl_s,
                                    clock=self.clock, rng=self.rng, retry_cap_s=retry_cap_s,
                                    max_attempts=settings.INBOUND_MAX_ATTEMPTS, health=self.inbound_health,
                                    media_max_bytes=settings.MEDIA_MAX_BYTES,
                                    media_dir=settings.STATE_DB.parent / "media-tmp" / "inbound")
        self.acks = Acknowledger(self.journal, self.edge, clock=self.clock, rng=self.rng, retry_cap_s=retry_cap_s,
                                 health=self.acks_health)
        self.outbound = self._build_outbound()
        self.receipts_health = LoopHealth("receipts relay", self.clock)
        self.receipts = ReceiptsRelay(self.journal, self.edge, clock=self.clock, rng=self.rng, retry_cap_s=retry_cap_s,
                                      health=self.receipts_health)
        self._wire_events()
        self.host = host
        self.port: int | None = None  # the bound port, once serving
        self.started_at = time.time()
        self._stop = anyio.Event()
        self._done = anyio.Event()
        self.fds = FdBudget()
        self.http_guard = ConnectionGuard.for_fd_limit(fd_limit())
        self.exit_code = 0
        self.manager = self._build_manager(on_event)
        self.push = self._build_push(worker_id)
        self.journal.scope = self._journal_scope
        self.manager.on_restart_needed = self._restart_into_leases
        self.inbound.sessions = self.manager.session  # received media is downloaded through the live session
        self.housekeeping_health = LoopHealth("housekeeping", self.clock)
        self._set_staleness()
        self.metrics = WorkerMetrics(MetricSources(
            backend=self.backend, edge=self.edge, journal=self.journal, inbound=self.inbound, outbound=self.outbound,
            manager=self.manager, fds=self.fds, guard=self.http_guard, loops=self.loops,
            ready=lambda: not self.not_ready_reasons(), clock=self.clock, version=package_version(),
            events=self.event_log, api=self.api_stats))
        self.metrics_port: int | None = None  # the bound METRICS_PORT, once serving
        self._metrics_runner: web.AppRunner | None = None

    def _build_outbound(self) -> OutboundRelay:
        settings = self.settings
        return OutboundRelay(
            self.journal, self.acks, MediaLimits.from_settings(settings), clock=self.clock, rng=self.rng,
            limits=SendLimits(min_gap_ms=settings.SEND_MIN_GAP_MS, jitter_ms=settings.SEND_JITTER_MS,
                              max_per_minute=settings.SEND_MAX_PER_MINUTE, max_per_day=settings.SEND_MAX_PER_DAY,
                              typing=settings.TYPING_INDICATOR),
            resolver=NumberResolver(self.journal, self.clock, cache_days=settings.NUMBER_CACHE_DAYS,
                                    lookups_per_minute=settings.NUMBER_LOOKUPS_PER_MINUTE),
            at_least_once=settings.UNKNOWN_SEND_POLICY is UnknownSendPolicy.AT_LEAST_ONCE)

    def _wire_events(self) -> None:
        """The live event stream (GET /api/events): recorded only when the API is on; so are the
        counters of the API's door."""
        self.api_stats = ApiStats() if self.settings.api_tokens else None
        self.event_log = EventLog(self.journal, self.clock) if self.settings.api_tokens else None
        self.events: EventSink = self.event_log or NO_EVENTS
        self.inbound.events = self.outbound.events = self.receipts.events = self.events

    def _build_manager(self, on_event: Callable[[str, BackendEvent], None] | None) -> InstanceManager:
        settings = self.settings
        manager = InstanceManager(
            RunnerContext(
                backend=self.backend,
                edge=self.edge,
                outbound=self.outbound,
                inbound=self.inbound,
                clock=self.clock,
                msg_poll_s=settings.msg_poll_s,
                msg_poll_max_s=settings.msg_poll_max_s,
                connect_timeout_s=settings.CONNECT_TIMEOUT_S,
                start_limiter=anyio.CapacityLimiter(settings.START_CONCURRENCY),
                journal_writable=lambda: self.journal.writable,
                batch_mode=lambda: self.manager.batch_mode(),
                on_event=on_event,
                receipts=self.receipts,
                call_policy=self.call_policy,
                rng=self.rng,
                events=self.events,
                idle_poll_max_s=lambda: self.push.idle_cap(),
            ),
            self.edge,
            instance_poll_s=settings.instance_poll_s,
            instance_poll_max_s=settings.instance_poll_max_s,
            batch_poll=settings.BATCH_POLL,
            worker_id=self.worker_id,
            capacity=settings.MAX_INSTANCES,
        )
        # in a fleet: where other workers send API clients for this worker's instances (only with an API)
        manager.leases.api_url = settings.API_PUBLIC_URL if settings.api_tokens else None
        return manager

    def _build_push(self, worker_id: str | None) -> PushChannel:
        """The ``GET /events`` loop: ``queued`` wakes an instance the way ``/wake`` does."""
        # X-Worker-Id: once leases are on, the edge client sends WORKER_ID on every call (enable_leases),
        # so the proxy pushes this worker's leased instances; without leases none (every instance's events).
        # A ``leases`` event renews leases at once.
        return PushChannel(self.edge, worker_id=worker_id, clock=self.clock, rng=self.rng,
                           on_queued=self.manager.wake, on_lost=self.manager.wake,
                           on_leases=self.manager.leases.wake)

    def _journal_scope(self) -> set[str] | None:
        """A shared journal's rows this worker delivers: its leased instances', all without leases
        (one worker), none until the proxy said which."""
        keeper = self.manager.leases
        return set(keeper.held) if keeper.mode else (None if keeper.mode is False else set())

    def _restart_into_leases(self) -> None:
        """The proxy gained leases while this worker ran without them: stop gracefully (sessions
        disconnected, never logged out) and exit 75, so the orchestrator starts it into lease mode."""
        self.exit_code = EXIT_RESTART
        self.request_stop()

    def call_policy(self, instance_id: str) -> CallPolicy:
        """What to do with ``instance_id``'s incoming calls: CALL_REJECT / CALL_REJECT_MESSAGE,
        overridden by the instance's own ``call_reject`` / ``call_reject_message`` settings."""
        base = CallPolicy(reject=self.settings.CALL_REJECT, message=self.settings.CALL_REJECT_MESSAGE)
        return self.manager.instance_settings.call_policy(instance_id, base)

    def _set_staleness(self) -> None:
        settings = self.settings
        # a loop is stale after three of its longest iterations (its longest wait plus a proxy call that
        # times out), and never sooner than the proxy silence /ready tolerates (that is the edge check's business)
        call_s = settings.EDGE_TIMEOUT_S
        for h, longest_s in ((self.housekeeping_health, STORE_PROBE_EVERY_S),
                             (self.manager.discovery_health, settings.instance_poll_max_s + call_s),
                             (self.manager.batch_health, settings.msg_poll_max_s + call_s),
                             (self.push.health, self.push.wait_s + call_s)):
            h.stale_after_s = max(3 * longest_s, settings.READY_MAX_PROXY_SILENCE_S)

    # ------------------------------------------------------------------ queries

    def health(self) -> dict[str, Any]:
        try:
            counts = self.journal.counts()
        except JournalUnavailable:
            counts = {}
        return {
            "status": "ok",
            "backend": self.backend.name,
            "uptime_s": round(time.time() - self.started_at, 1),
            "instances": self.manager.counts(),
            "inbound": {
                "pending": counts.get("inbound_pending", 0) + self.inbound.memory_pending,
                "dead_lettered": counts.get("inbound_dead_letter", 0),
                "delivered": self.inbound.delivered,
            },
            "outbound": {
                "pending_acks": counts.get("outbound_pending_acks", 0),
                "sent": self.outbound.sent,
                "failed": self.outbound.failed,
                "duplicates_suppressed": self.outbound.duplicates_suppressed,
                "media_storage_errors": self.outbound.media_storage_errors,
            },
            "receipts": {
                "pending": counts.get("receipts_pending", 0),
                "posted": self.receipts.posted,
                "dropped": self.receipts.dropped,
                "enabled": self.receipts.supported,
            },
            "store": {"writable": self.journal.writable},
            "process": self.fds.usage().as_health(),
            "edge": {
                "calls": sum(self.edge.calls.values()),
                "failures": sum(self.edge.failures.values()),
                "rejected_records": sum(self.edge.rejected.values()),
                "batch_mode": self.manager.batch_mode(),
                "push": self.push.live,
            },
            "leases": self.manager.leases.describe(),
            "loops": self.loop_ages(),
            **({"events": self.event_log.stats()} if self.event_log is not None else {}),
            **({"api": self.api_stats.as_dict()} if self.api_stats is not None else {}),
        }

    def not_ready_reasons(self) -> list[str]:
        reasons = []
        last = self.edge.last_ok_monotonic
        if last is None:
            reasons.append("edge proxy not reached yet")
        elif time.monotonic() - last > self.settings.READY_MAX_PROXY_SILENCE_S:
            reasons.append(f"edge proxy unreachable for {time.monotonic() - last:.0f}s")
        problem = self.edge.config_problem
        if problem is not None:
            reasons.append(problem)
        if not self.journal.writable:
            reasons.append("state store not writable")
        if self.fds.level() != "ok":
            reasons.append("file descriptors nearly exhausted")
        if self.manager.leases.fenced:
            reasons.append(f"self-fenced: no lease renewal for {self.manager.leases.ttl_s / 2:g}s")
        if self._stop.is_set():
            reasons.append("shutting down")
        reasons.extend(self.loop_problems())
        return reasons

    def loops(self) -> list[LoopHealth]:
        return [self.housekeeping_health, self.inbound_health, self.acks_health, self.receipts_health,
                *self.manager.loops(), self.push.health]

    def loop_ages(self) -> dict[str, Any]:
        """Each supervised loop: last success age, failing, failure count."""
        now = self.clock.monotonic()
        return {h.name: h.describe(now) for h in self.loops()}

    def loop_problems(self) -> list[str]:
        now = self.clock.monotonic()
        return [r for h in self.loops() if (r := h.not_ready_reason(now)) is not None]

    def wake(self, instance_id: str | None = None) -> int:
        return self.manager.wake(instance_id)

    # ------------------------------------------------------------------ lifetime

    def request_stop(self) -> None:
        self._stop.set()

    async def wait_stopped(self) -> None:
        """Return once :meth:`run`'s services have all ended (journal closed)."""
        await self._done.wait()

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until :meth:`request_stop` (or cancellation, which stops gracefully too)."""
        try:
            async with anyio.create_task_group() as outer:
                outer.start_soon(self._services, task_status)
                await self._done.wait()
        except anyio.get_cancelled_exc_class():
            self.request_stop()
            with anyio.CancelScope(shield=True), anyio.move_on_after(SHUTDOWN_GRACE_S + 5):
                await self._done.wait()
            raise

    async def _services(self, task_status: Any) -> None:
        # shielded: an outside cancellation becomes a graceful stop (see run())
        with anyio.CancelScope(shield=True):
            try:
                await self._services_inner(task_status)
            finally:
                self._done.set()

    async def _services_inner(self, task_status: Any) -> None:
        self._recover_journal()
        web_runner = web.AppRunner(self._app(), handle_signals=False, **SERVER_OPTIONS)
        await web_runner.setup()
        try:
            await GuardedSite(web_runner, self.host, self.settings.PORT, self.http_guard).start()
            self.port = web_runner.addresses[0][1] if web_runner.addresses else self.settings.PORT
            log.info("wa-worker up: backend=%s, proxy=%s, http=%s:%s", self.backend.name,
                     redact_url(self.settings.edge_base_url), self.host, self.port)
            await self._serve_metrics_port()
            for warning in placeholder_warnings(self.settings):
                log.warning("%s", warning)
            async with self.backend:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._supervised, self.inbound.run, self.inbound_health)
                    tg.start_soon(self._supervised, self.acks.run, self.acks_health)
                    tg.start_soon(self._supervised, self.receipts.run, self.receipts_health)
                    tg.start_soon(self._supervised, self._housekeeping, self.housekeeping_health)
                    tg.start_soon(self.manager.run)
                    tg.start_soon(self._supervised, self.push.run, self.push.health)
                    if self.api_sender is not None:
                        tg.start_soon(self.api_sender.run)
                    task_status.started(self)
                    await self._stop.wait()
                    log.info("stopping: finishing in-flight sends, reporting DISCONNECTED")
                    await self.manager.stop(SHUTDOWN_GRACE_S)
                    # leases: every stopped instance given back at once, so another worker takes it over
                    await self.manager.leases.release_all(min(self.settings.EDGE_TIMEOUT_S, LEASE_RELEASE_TIMEOUT_S))
                    await self.acks.flush(1.0)
                    tg.cancel_scope.cancel()
        finally:
            with anyio.move_on_after(3):
                await web_runner.cleanup()
                if self._metrics_runner is not None:
                    await self._metrics_runner.cleanup()
            await self.edge.aclose()
            if self.event_log is not None:
                self.event_log.close()  # the streams ended with the server; this writes what memory held
            self.journal.close()
            log.info("wa-worker stopped")

    async def _serve_metrics_port(self) -> None:
        """``METRICS_PORT``: /metrics without auth on ``METRICS_HOST``; cleaned up with the main server."""
        port = self.settings.METRICS_PORT
        if port is None:
            return
        metrics_runner = web.AppRunner(build_metrics_app((self.metrics.render, self.metrics.content_type)),
                                       handle_signals=False, **SERVER_OPTIONS)
        await metrics_runner.setup()
        self._metrics_runner = metrics_runner
        await GuardedSite(metrics_runner, self.settings.METRICS_HOST, port, self.http_guard).start()
        self.metrics_port = metrics_runner.addresses[0][1] if metrics_runner.addresses else port
        log.info("metrics without auth on http://%s:%s/metrics", self.settings.METRICS_HOST, self.metrics_port)

    def _app(self) -> web.Application:
        tokens = self.settings.api_tokens
        api = build_api_app(tokens, per_minute=self.settings.API_RATE_PER_MINUTE, clock=self.clock,
                                  stats=self.api_stats) if tokens else None
        if api is not None:
            # event streams may hold at most half the connections the guard allows
            streams = (add_event_routes(api, self.event_log, max_streams=max(1, self.http_guard.max_connections // 2))
                       if self.event_log is not None else [])
            self.api_sender = ApiSender(self.manager, self.outbound, self.journal, clock=self.clock,
                                        wait_s=self.settings.API_SEND_WAIT_S)
            keeper = self.manager.leases
            finder = HolderFinder(self.edge.lease_holder, leases_on=lambda: keeper.mode is True,
                                  worker_id=self.worker_id, api_url=keeper.api_url, clock=self.clock)
            mount_api_routes(api, self.api_sender, media_max_bytes=self.settings.MEDIA_MAX_BYTES,
                             version=package_version(), extra=streams, finder=finder)
        app = build_app(self, self.settings.WORKER_SECRET.get_secret_value(), guard=self.http_guard,
                        metrics=(self.metrics.render, self.metrics.content_type),
                        api=(API_MOUNT_AT, api) if api is not None else None)
        if isinstance(self.backend, SimulatorBackend):
            mount_simulator_routes(app, self.backend)
        return app

    def _recover_journal(self) -> None:
        self.outbound.clear_media_leftovers()  # staged media of a killed process: never sent from there
        at_least_once = self.settings.UNKNOWN_SEND_POLICY is UnknownSendPolicy.AT_LEAST_ONCE
        try:
            # a restart is the moment to retry everything pending, not hours later
            self.journal.retry_all_now()
            ids = self.journal.recover_unknown_sends(at_least_once)
        except JournalUnavailable as exc:
            log.error("could not recover the journal at start (%s): interrupted sends stay unreported until a "
                      "restart with a writable store", exc)
            return
        if ids and not at_least_once:
            for message_id in ids:
                row = self.journal.outbound_get(message_id)
                if row is not None:
                    self.outbound.publish_failed(row.instance_id, message_id, "delivery_unknown", "delivery_unknown")
        if ids:
            if at_least_once:
                log.warning("%d send(s) interrupted by a crash will be sent again if the proxy offers them "
                            "(UNKNOWN_SEND_POLICY=at_least_once)", len(ids))
            else:
                log.warning("%d send(s) interrupted by a crash are reported as delivery_unknown "
                            "(UNKNOWN_SEND_POLICY=at_most_once)", len(ids))

    async def _supervised(self, fn: Callable[[], Any], health: LoopHealth) -> None:
        await forever(health.name, fn, clock=self.clock, health=health, log_to=log,
                      backoff=Backoff(1.0, 60.0, rng=self.rng))

    async def _housekeeping(self) -> None:
        last_prune = 0.0
        while True:
            now = self.clock.monotonic()
            self.journal.keepalive()  # a shared journal's idle connection
            if not self.journal.writable:
                await anyio.to_thread.run_sync(self.journal.reconnect)  # a shared journal's lost connection
            if not self.journal.writable and self.journal.probe_writable():
                self.manager.wake()  # the instances' polls paused while nothing could be journaled
                self.acks.wake()
                self.inbound.wake()
                self.receipts.wake()
                if self.event_log is not None:
                    self.event_log.flush()  # events kept in memory meanwhile
            fds = self.fds.usage()
            level = self.fds.level(fds)
            if (level == "refuse") != self.http_guard.refusing:
                self.http_guard.refusing = level == "refuse"
                if self.http_guard.refusing:
                    log.warning("file descriptors nearly exhausted by sockets (%d of %d, %d sockets): refusing "
                                "new HTTP connections; no restart", fds.open, fds.limit, fds.sockets)
                else:
                    log.info("file descriptors back to %d of %d: accepting HTTP connections", fds.open, fds.limit)
            if level == "restart" and not self._stop.is_set():
                log.error("file descriptors nearly exhausted (%d of %d, %d not sockets): restarting gracefully "
                          "(exit %d) for a fresh budget; sessions resume from disk", fds.open, fds.limit,
                          fds.files, EXIT_FD_EXHAUSTED)
                self.exit_code = EXIT_FD_EXHAUSTED
                self.request_stop()
            if now - last_prune > HOUSEKEEPING_EVERY_S:
                last_prune = now
                try:
                    self.journal.prune()
                except JournalUnavailable:
                    pass
                if self.event_log is not None:
                    self.event_log.prune()  # its own window (RETENTION_S, MAX_ROWS)
            self.housekeeping_health.ok()
            await self.clock.sleep(STORE_PROBE_EVERY_S)


def _worker_id(settings: Settings, journal: Journal) -> str:
    """WORKER_ID, else the one this journal remembers (a restart, even after a crash, asks for its
    leases under the same id and the proxy gives them back at once), else a new one, remembered."""
    if settings.WORKER_ID or journal.shared:  # a shared journal remembers nothing per machine
        return settings.worker_id
    try:
        known = journal.meta("worker_id")
        if known is not None and WORKER_ID_RE.fullmatch(known):
            return known
        journal.set_meta("worker_id", settings.worker_id)
    except (JournalUnavailable, JournalWriteError) as exc:
        log.warning("the worker id could not be remembered in the journal (%s): %s for this run only",
                    exc, settings.worker_id)
    return settings.worker_id


def _open_journal(settings: Settings, clock: Clock) -> Journal:
    """Open the journal (in PostgreSQL with DATABASE_URL, unless JOURNAL_IN_DATABASE=false); a store
    that cannot be used is a start-up error, never repaired or replaced."""
    url = settings.database_url
    if url and settings.JOURNAL_IN_DATABASE:
        try:
            journal: Journal = PgJournal(url, worker_id=settings.worker_id, clock=clock)
        except StoreOpenError as exc:  # unreachable, refused, a newer schema ... (no credentials in the text)
            raise StartupError(f"the journal in DATABASE_URL ({exc.path}) cannot be used: {exc.cause}") from None
        _warn_left_in_file(settings.STATE_DB)
        return journal
    path = settings.STATE_DB
    try:
        return Journal(path, clock=clock)
    except StoreOpenError as exc:  # a folder, a foreign or newer database, a read-only file system ...
        raise StartupError(f"STATE_DB {path} cannot be used: {exc.cause} (file kept untouched)") from None


def _warn_left_in_file(path: Path) -> None:
    """The journal moved to PostgreSQL: say what an older STATE_DB file still holds (never read again)."""
    if not path.is_file():
        return
    try:
        old = Journal(path)
    except StoreOpenError:
        return
    try:
        counts = old.counts()
    except JournalUnavailable:
        return
    finally:
        old.close()
    waiting = counts["inbound_pending"] + counts["outbound_pending_acks"] + counts["outbound_in_flight"]
    if waiting:
        log.warning("STATE_DB %s still holds %d inbound message(s) and %d outcome(s) not yet delivered to the "
                    "proxy, which the journal in DATABASE_URL does not have: run once with "
                    "JOURNAL_IN_DATABASE=false to deliver them, then switch", path, counts["inbound_pending"],
                    counts["outbound_pending_acks"] + counts["outbound_in_flight"])


# ---------------------------------------------------------------------- entry point


async def _serve(settings: Settings) -> int:
    worker = Worker(settings)
    async with anyio.create_task_group() as tg:

        async def on_signals() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("received %s", signal.Signals(signum).name)
                    worker.request_stop()

        tg.start_soon(on_signals)
        await worker.run()
        tg.cancel_scope.cancel()
    return worker.exit_code


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"wa-worker: {exc}", file=sys.stderr)
        return 2
    try:
        check_paths(settings.AUTH_DIR, settings.STATE_DB)
    except StartupError as exc:
        print(f"wa-worker: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.LOG_LEVEL.value,
                  [settings.WORKER_SECRET.get_secret_value(), *url_secrets(settings.edge_base_url),
                   *url_secrets(settings.database_url or "", user_alone_is_secret=False)],
                  settings.LOG_FORMAT.value)
    if settings.WA_BACKEND.value == "neonize":
        from .backends.neonize.loading import ensure_bot_tag  # the simulator never loads neonize code

        ensure_bot_tag(settings.WA_BOT_BADGE)  # may restart this process (same pid) once
        if settings.database_url:
            try:
                check_session_store(settings.database_url, settings.DATABASE_IDLE_TIMEOUT_S)
            except StartupError as exc:
                print(f"wa-worker: {exc}", file=sys.stderr)
                return 2
    elif settings.database_url:  # the simulator's sessions in PostgreSQL
        try:
            check_simulator_store(settings.database_url)
        except StartupError as exc:
            print(f"wa-worker: {exc}", file=sys.stderr)
            return 2
    raise_fd_limit()
    try:
        return anyio.run(_serve, settings)
    except StartupError as exc:
        print(f"wa-worker: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
