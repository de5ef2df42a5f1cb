"""The worker: wires settings, backend, edge client, store, relays, instance
manager and HTTP server, and owns their lifetimes.

Task tree (anyio, structured; every loop has this one owner)::

    Worker.run
    └── services (shielded from outside cancellation; stopped gracefully)
        ├── HTTP server (health, ready, wake, simulator)
        ├── InboundRelay.run         store → POST /inbound
        ├── Acknowledger.run         journal → /mark-sent, /mark-failed
        ├── housekeeping             prune, TTL, store probe
        └── InstanceManager.run
            ├── discovery loop       GET /disconnected-instances
            ├── batch poller         GET /queued-messages (all instances), optional
            └── InstanceRunner × N   lifecycle + status reporter + outbound poller
"""

from __future__ import annotations

import logging
import random
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import anyio
from aiohttp import web

from .backends import make_backend
from .backends.base import Backend, BackendEvent
from .config import ConfigError, Settings, UnknownSendPolicy, load_settings
from .edge.client import EdgeClient
from .fdguard import EXIT_FD_EXHAUSTED, FdBudget, raise_fd_limit
from .instances.manager import InstanceManager
from .instances.runner import RunnerContext
from .logutil import setup_logging
from .relays.inbound import InboundRelay
from .relays.outbound import Acknowledger, OutboundRelay
from .storage.store import Store, StoreUnavailable
from .timing import Clock

log = logging.getLogger("wa_worker")

SHUTDOWN_GRACE_S = 8.0
HOUSEKEEPING_EVERY_S = 600.0
STORE_PROBE_EVERY_S = 5.0


class Worker:
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
    ) -> None:
        self.settings = settings
        self.clock = clock or Clock()
        self.rng = rng or random.Random()
        self.backend = backend or make_backend(settings)
        self.edge = edge or EdgeClient(settings.edge_base_url, settings.WORKER_SECRET.get_secret_value(),
                                       timeout_s=settings.EDGE_TIMEOUT_S)
        self.store = Store(settings.STATE_DB, clock=self.clock)
        self.inbound = InboundRelay(self.store, self.edge, ttl_s=settings.INBOUND_TTL_HOURS * 3600,
                                    clock=self.clock, rng=self.rng, retry_cap_s=retry_cap_s,
                                    max_attempts=settings.INBOUND_MAX_ATTEMPTS)
        self.acks = Acknowledger(self.store, self.edge, clock=self.clock, rng=self.rng, retry_cap_s=retry_cap_s)
        self.outbound = OutboundRelay(self.store, self.acks)
        self.host = host
        self.port: int | None = None  # the bound port, once serving
        self.started_at = time.time()
        self._stop = anyio.Event()
        self._done = anyio.Event()
        self.fds = FdBudget()
        self.exit_code = 0
        self.manager = InstanceManager(
            RunnerContext(
                backend=self.backend,
                edge=self.edge,
                outbound=self.outbound,
                inbound=self.inbound,
                clock=self.clock,
                msg_poll_s=settings.MSG_POLL_MS / 1000,
                msg_poll_max_s=settings.MSG_POLL_MAX_MS / 1000,
                connect_timeout_s=settings.CONNECT_TIMEOUT_S,
                start_limiter=anyio.CapacityLimiter(settings.START_CONCURRENCY),
                store_writable=lambda: self.store.writable,
                batch_mode=lambda: self.manager.batch_mode(),
                on_event=on_event,
                rng=self.rng,
            ),
            self.edge,
            instance_poll_s=settings.INSTANCE_POLL_MS / 1000,
            instance_poll_max_s=settings.INSTANCE_POLL_MAX_MS / 1000,
            batch_poll=settings.BATCH_POLL,
        )

    # ------------------------------------------------------------------ queries

    def health(self) -> dict[str, Any]:
        try:
            counts = self.store.counts()
        except StoreUnavailable:
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
            },
            "store": {"writable": self.store.writable},
            "process": dict(zip(("open_fds", "fd_limit"), self.fds.usage(), strict=True)),
            "edge": {
                "calls": sum(self.edge.calls.values()),
                "failures": sum(self.edge.failures.values()),
                "rejected_records": sum(self.edge.rejected.values()),
                "batch_mode": self.manager.batch_mode(),
            },
        }

    def not_ready_reasons(self) -> list[str]:
        reasons = []
        last = self.edge.last_ok_monotonic
        if last is None:
            reasons.append("edge proxy not reached yet")
        elif time.monotonic() - last > self.settings.READY_MAX_PROXY_SILENCE_S:
            reasons.append(f"edge proxy unreachable for {time.monotonic() - last:.0f}s")
        if not self.store.writable:
            reasons.append("state store not writable")
        if self.fds.level() != "ok":
            reasons.append("file descriptors nearly exhausted")
        if self._stop.is_set():
            reasons.append("shutting down")
        return reasons

    def wake(self, instance_id: str | None = None) -> int:
        return self.manager.wake(instance_id)

    # ------------------------------------------------------------------ lifetime

    def request_stop(self) -> None:
        self._stop.set()

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
        runner = web.AppRunner(self._app(), access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.settings.PORT, reuse_address=True)
            await site.start()
            sockets = getattr(site._server, "sockets", None) or []
            self.port = sockets[0].getsockname()[1] if sockets else self.settings.PORT
            log.info("wa-worker up: backend=%s, proxy=%s, http=%s:%s", self.backend.name,
                     self.settings.edge_base_url, self.host, self.port)
            async with self.backend:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self.inbound.run)
                    tg.start_soon(self.acks.run)
                    tg.start_soon(self._housekeeping)
                    tg.start_soon(self.manager.run)
                    task_status.started(self)
                    await self._stop.wait()
                    log.info("stopping: finishing in-flight sends, reporting DISCONNECTED")
                    await self.manager.stop(SHUTDOWN_GRACE_S)
                    await self.acks.flush(1.0)
                    tg.cancel_scope.cancel()
        finally:
            with anyio.move_on_after(3):
                await runner.cleanup()
            await self.edge.aclose()
            self.store.close()
            log.info("wa-worker stopped")

    def _app(self) -> web.Application:
        from .http.server import build_app

        return build_app(self)

    def _recover_journal(self) -> None:
        at_least_once = self.settings.UNKNOWN_SEND_POLICY is UnknownSendPolicy.AT_LEAST_ONCE
        try:
            # a restart is the moment to retry everything pending, not hours later
            self.store.retry_all_now()
            ids = self.store.recover_unknown_sends(at_least_once)
        except StoreUnavailable as exc:
            log.error("could not recover the journal at start (%s): interrupted sends stay unreported until a "
                      "restart with a writable store", exc)
            return
        if ids:
            if at_least_once:
                log.warning("%d send(s) interrupted by a crash will be sent again if the proxy offers them "
                            "(UNKNOWN_SEND_POLICY=at_least_once)", len(ids))
            else:
                log.warning("%d send(s) interrupted by a crash are reported as delivery_unknown "
                            "(UNKNOWN_SEND_POLICY=at_most_once)", len(ids))

    async def _housekeeping(self) -> None:
        last_prune = 0.0
        while True:
            now = self.clock.monotonic()
            if not self.store.writable and self.store.probe_writable():
                self.acks.wake()
                self.inbound.wake()
            if self.fds.level() == "restart" and not self._stop.is_set():
                used, limit = self.fds.usage()
                log.error("file descriptors nearly exhausted (%d of %d): restarting gracefully (exit %d) "
                          "for a fresh budget; sessions resume from disk", used, limit, EXIT_FD_EXHAUSTED)
                self.exit_code = EXIT_FD_EXHAUSTED
                self.request_stop()
            if now - last_prune > HOUSEKEEPING_EVERY_S:
                last_prune = now
                try:
                    self.store.prune()
                except StoreUnavailable:
                    pass
            await self.clock.sleep(STORE_PROBE_EVERY_S)


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
    setup_logging(settings.LOG_LEVEL.value, [settings.WORKER_SECRET.get_secret_value()])
    raise_fd_limit()
    try:
        return anyio.run(_serve, settings)
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
