"""``wa-worker dev``: the reference proxy and the worker in one process and one event loop.

Structured like the daemon (anyio): :func:`_main` holds an ``AsyncExitStack``
(signal receiver, proxy, task group: closed in reverse order, whatever
happened); :func:`_supervise` owns the worker's task group and starts the
worker with ``await tg.start(...)`` (the banner comes once it serves).
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import anyio
from aiohttp import web
from anyio.abc import TaskStatus

from ..config import ConfigError, Settings, load_settings
from ..daemon import Worker
from ..fsutil import write_private
from ..logutil import setup_logging
from ..preflight import StartupError, check_paths
from .app import create_app
from .proxy import PROXY_KEY, DevProxy
from .state import DEFAULT_DIR, DevPaths, DevStateError, FolderLock, resolve_secret
from .store import DevStore
from .terminal import TerminalPrinter

log = logging.getLogger("wa_worker.dev")

SHUTDOWN_TIMEOUT_S = 30.0

@dataclass(slots=True)
class DevOptions:
    dir: Path
    simulator: bool = False
    proxy_host: str = "127.0.0.1"
    proxy_port: int = 8787
    port: int = 3000
    instance: str = "default"
    create_instance: bool = True
    log_level: str = "WARNING"
    log_format: str = "text"  # json: every line (the dev mode's own too) is a JSON object on stderr
    print_qr: bool = True
    with_worker: bool = True
    secret: str | None = None
    auto_scan_ms: int | None = 1500  # simulator: the phone scans each QR after this delay; None: never
    command: str = "wa-worker"  # how the user runs wa-worker, for copy-pasteable hints
    lease_ttl_s: float = 30.0  # a fleet: the TTL of the leases the proxy grants


def _json_log(opts: DevOptions) -> logging.Logger | None:
    """With ``LOG_FORMAT=json``: the logger the terminal printer writes through (INFO
    whatever ``--log-level`` says: these lines are the dev mode's output, not chatter)."""
    if opts.log_format != "json":
        return None
    log = logging.getLogger("wa_worker.dev")
    log.setLevel(logging.INFO)
    return log


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


class DevRun:
    """The pieces of one ``wa-worker dev`` run; :func:`run` drives them."""

    def __init__(self, opts: DevOptions, out: TextIO | None = None) -> None:
        self.opts = opts
        self.out = out if out is not None else sys.stdout
        self.paths = DevPaths(opts.dir.resolve()).prepare()
        self.secret = resolve_secret(self.paths, opts.secret, create=True)
        self.store: DevStore | None = None
        self.proxy_url = ""
        self.printer = TerminalPrinter(self.out, print_qr=opts.print_qr, log=_json_log(opts))
        self.created_instance: str | None = None

    def say(self, text: str) -> None:
        if self.printer.log is not None:
            self.printer.log.info("%s", text)
            return
        self.out.write(text + "\n")
        self.out.flush()

    @contextlib.asynccontextmanager
    async def serving_proxy(self) -> AsyncIterator[DevProxy]:
        """The proxy listening, its URL in the state folder, for the duration of the block
        (the caller runs the yielded proxy's ``run_waker``)."""
        o = self.opts
        async with contextlib.AsyncExitStack() as stack:
            store = self.store = DevStore(self.paths.proxy_db)
            stack.callback(store.close)
            app = create_app(store, self.secret, wake_url=f"http://127.0.0.1:{o.port}",
                             on_event=self.printer.proxy_event, lease_ttl_s=o.lease_ttl_s)
            web_runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await web_runner.setup()
            stack.push_async_callback(web_runner.cleanup)
            site = web.TCPSite(web_runner, o.proxy_host, o.proxy_port)
            try:
                await site.start()
            except OSError as exc:
                raise DevRunError(
                    f"cannot listen on {o.proxy_host}:{o.proxy_port} ({exc.strerror or exc}); "
                    "is another `wa-worker dev` running? (use --proxy-port)"
                ) from None
            addresses = web_runner.addresses
            port = addresses[0][1] if addresses else o.proxy_port
            self.proxy_url = f"http://{_url_host(o.proxy_host)}:{port}"
            self.printer.page_url = self.proxy_url + "/"
            write_private(self.paths.proxy_url_file, self.proxy_url + "\n")
            stack.callback(self._forget_proxy_url)
            if o.create_instance and store.count_instances() == 0:
                store.add_instance(o.instance)
                self.created_instance = o.instance
            yield app[PROXY_KEY]

    def _forget_proxy_url(self) -> None:
        with contextlib.suppress(OSError):
            self.paths.proxy_url_file.unlink()

    @contextlib.contextmanager
    def worker_url_recorded(self) -> Iterator[None]:
        """The worker's URL in the state folder (for ``inbound``/``scan``) for the block."""
        write_private(self.paths.worker_url_file, f"http://127.0.0.1:{self.opts.port}\n")
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                self.paths.worker_url_file.unlink()

    def helper_command(self) -> str:
        """``wa-worker dev`` as the user must type it for the helpers (``--dir`` when not the default)."""
        cmd = f"{self.opts.command} dev"
        if self.opts.dir != DEFAULT_DIR:
            cmd += f" --dir {shlex.quote(str(self.opts.dir))}"
        return cmd

    def banner(self) -> None:
        o = self.opts
        if not o.simulator:
            backend = "neonize"
        elif o.auto_scan_ms is None:
            backend = "simulator (no auto-scan: scan from the page or with `dev scan`)"
        else:
            backend = f"simulator (auto-scan after {o.auto_scan_ms} ms)"
        lines = [
            f"wa-worker dev: reference proxy on {self.proxy_url}/  <- open this page in a browser",
            f"  state folder  {self.paths.root} (the secret is in {self.paths.secret_file}, never printed)",
        ]
        if o.with_worker:
            lines.append(f"  worker        {backend} backend, health on http://127.0.0.1:{o.port}/health")
        else:
            lines += [
                "  worker        not started: run one with",
                f"                EDGE_BASE_URL={self.proxy_url} WORKER_SECRET=\"$(cat {self.paths.secret_file})\" "
                f"PORT={o.port} {o.command}",
                f"  a fleet       several workers share the instances: leases of {o.lease_ttl_s:g} s "
                "(POST /leases; --lease-ttl), GET /dev/fleet",
            ]
        first = (self.store.list_instances()[0]["id"] if self.store and self.store.count_instances() else "NAME")
        cmd = self.helper_command()
        lines += [
            f"  try           {cmd} send {first} +5511999990000 \"hello\"",
            f"                {cmd} messages",
            f"                {cmd} instance add NAME",
        ]
        if o.simulator and o.with_worker:
            lines.append(f"                {cmd} inbound {first} +5511988887777 \"hi\"   (a contact writes)")
        lines.append("  Ctrl-C stops everything")
        self.say("\n".join(lines))
        if self.created_instance:
            self.printer.line(self.created_instance, "instance created (first run)")

    def worker_settings(self) -> Settings:
        o = self.opts
        overrides: dict[str, Any] = dict(
            EDGE_BASE_URL=self.proxy_url,
            WORKER_SECRET=self.secret,
            AUTH_DIR=self.paths.auth_dir,
            STATE_DB=self.paths.state_db,
            PORT=o.port,
            WA_BACKEND="simulator" if o.simulator else "neonize",
            MSG_POLL_MS=1000,
            INSTANCE_POLL_MS=2000,
            LOG_LEVEL=o.log_level,
            LOG_FORMAT=o.log_format,
            # the proxy hands queued media to the worker as a URL on itself (loopback)
            MEDIA_ALLOW_PRIVATE=True,
        )
        if o.simulator and o.auto_scan_ms is not None:
            overrides["SIMULATOR_AUTO_SCAN_MS"] = o.auto_scan_ms
        return load_settings(**overrides)

    def make_worker(self) -> Worker:
        """The worker wired to this run's proxy; :class:`DevRunError` if it cannot be built."""
        try:
            settings = self.worker_settings()
        except ConfigError as exc:
            raise DevRunError(str(exc)) from None
        # loopback only: the worker's /wake and simulator controls are for this machine
        try:
            check_paths(settings.AUTH_DIR, settings.STATE_DB)
            return Worker(settings, on_event=self.printer.worker_event, host="127.0.0.1")
        except StartupError as exc:  # an unusable auth folder or journal: one line, like the daemon
            raise DevRunError(str(exc)) from None
        except ImportError as exc:
            hint = "" if self.opts.simulator else " (try --simulator)"
            raise DevRunError(f"the {settings.WA_BACKEND.value} backend is not available: {exc}{hint}") from None


class DevRunError(Exception):
    """One line for the user."""


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _describe(exc: BaseException) -> str:
    leaf = _leaf(exc)
    return f"{type(leaf).__name__}: {leaf}"


# ---------------------------------------------------------------------- tasks


async def _relay_signals(signals: AsyncIterator[int], stop: anyio.Event) -> None:
    async for _ in signals:
        stop.set()


@dataclass(slots=True)
class _WorkerOutcome:
    ended: anyio.Event = field(default_factory=anyio.Event)
    error: Exception | None = None


class _StartedOnce:
    """Forwards the worker's ``task_status.started()`` and remembers that it came."""

    def __init__(self, task_status: TaskStatus[None]) -> None:
        self._task_status = task_status
        self.done = False

    def started(self, value: object = None) -> None:
        self.done = True
        self._task_status.started()


async def _run_worker(
    worker: Worker, outcome: _WorkerOutcome, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Run the worker; "started" once it serves, or once it failed to start (``outcome`` says so)."""
    status = _StartedOnce(task_status)
    try:
        await worker.run(task_status=status)
    except Exception as exc:  # any failure is reported by _supervise, the run exits 1
        log.debug("the worker failed", exc_info=True)
        outcome.error = exc
    finally:
        outcome.ended.set()
        if not status.done:
            task_status.started()


async def _first_of(*events: anyio.Event) -> None:
    """Return as soon as one of ``events`` is set."""
    async with anyio.create_task_group() as tg:

        async def wait(event: anyio.Event) -> None:
            await event.wait()
            tg.cancel_scope.cancel()

        for event in events:
            tg.start_soon(wait, event)


def _report_end(dev: DevRun, error: Exception | None) -> None:
    if error is None:
        dev.say("wa-worker dev: the worker stopped")
        return
    dev.say(f"wa-worker dev: the worker stopped: {_describe(error)}")
    if isinstance(_leaf(error), OSError):
        dev.say(f"  (is port {dev.opts.port} busy? choose another with --port)")


async def _supervise(dev: DevRun, worker: Worker, stop: anyio.Event) -> int:
    """Run the worker until it ends by itself (exit code 1) or ``stop`` asks for a graceful stop (0)."""
    outcome = _WorkerOutcome()
    with dev.worker_url_recorded():
        return await _supervised(dev, worker, stop, outcome)


async def _supervised(dev: DevRun, worker: Worker, stop: anyio.Event, outcome: _WorkerOutcome) -> int:
    async with anyio.create_task_group() as tg:
        await tg.start(_run_worker, worker, outcome)
        if not outcome.ended.is_set():
            dev.banner()
            await _first_of(stop, outcome.ended)
        if outcome.ended.is_set():
            _report_end(dev, outcome.error)
            return 1
        dev.say("wa-worker dev: stopping (the worker reports its instances DISCONNECTED)…")
        worker.request_stop()
        with anyio.move_on_after(SHUTDOWN_TIMEOUT_S):
            await outcome.ended.wait()
        if not outcome.ended.is_set():
            dev.say("wa-worker dev: the worker did not stop in time")
            tg.cancel_scope.cancel()
            return 1
    if outcome.error is not None:
        dev.say(f"wa-worker dev: the worker failed while stopping: {_describe(outcome.error)}")
        return 1
    return 0


async def _main(dev: DevRun) -> int:
    async with contextlib.AsyncExitStack() as stack:
        # installed first and removed last: a second Ctrl-C while everything
        # shuts down is absorbed instead of killing the process half-way
        signals = stack.enter_context(anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM))
        proxy = await stack.enter_async_context(dev.serving_proxy())
        worker = dev.make_worker() if dev.opts.with_worker else None
        stop = anyio.Event()
        tg = await stack.enter_async_context(anyio.create_task_group())
        tg.start_soon(_relay_signals, signals, stop)
        tg.start_soon(proxy.run_waker)
        if worker is None:
            dev.banner()
            await stop.wait()
            code = 0
        else:
            code = await _supervise(dev, worker, stop)
        tg.cancel_scope.cancel()
    return code


# ---------------------------------------------------------------------- entry point


def run(opts: DevOptions, out: TextIO | None = None) -> int:
    """Run until SIGINT/SIGTERM; 0 on a clean stop."""
    try:
        dev = DevRun(opts, out)
        lock = FolderLock(dev.paths).acquire()
    except DevStateError as exc:
        print(f"wa-worker dev: {exc}", file=sys.stderr)
        return 1
    try:
        setup_logging(opts.log_level, [dev.secret], opts.log_format)
        return anyio.run(_main, dev)
    except DevRunError as exc:
        print(f"wa-worker dev: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a signal before the receiver was installed
        return 0
    finally:
        lock.release()
