"""``wa-worker dev``: the reference proxy and the worker in one process and one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from aiohttp import web

from .proxy import create_app
from .state import DevPaths, DevStateError, FolderLock, resolve_secret
from .store import Store
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
    print_qr: bool = True
    with_worker: bool = True
    secret: str | None = None


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


class DevRun:
    """Start/stop the pieces; :func:`run` wires them to the signals."""

    def __init__(self, opts: DevOptions, out: TextIO | None = None) -> None:
        self.opts = opts
        self.out = out if out is not None else sys.stdout
        self.paths = DevPaths(opts.dir.resolve()).prepare()
        self.secret = resolve_secret(self.paths, opts.secret, create=True)
        self.store: Store | None = None
        self.runner: web.AppRunner | None = None
        self.proxy_url = ""
        self.printer: TerminalPrinter | None = None
        self.created_instance: str | None = None

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    async def start_proxy(self) -> None:
        o = self.opts
        self.store = Store(self.paths.proxy_db)
        self.printer = TerminalPrinter(self.out, print_qr=o.print_qr)
        app = create_app(
            self.store,
            self.secret,
            wake_url=f"http://127.0.0.1:{o.port}",
            on_event=self.printer.proxy_event,
        )
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, o.proxy_host, o.proxy_port)
        try:
            await site.start()
        except OSError as exc:
            await self.runner.cleanup()
            self.runner = None
            self.store.close()
            self.store = None
            raise DevRunError(
                f"cannot listen on {o.proxy_host}:{o.proxy_port} ({exc.strerror or exc}); "
                "is another `wa-worker dev` running? (use --proxy-port)"
            ) from None
        port = o.proxy_port
        server = getattr(site, "_server", None)
        if server is not None and server.sockets:
            port = server.sockets[0].getsockname()[1]
        self.proxy_url = f"http://{_url_host(o.proxy_host)}:{port}"
        self.printer.page_url = self.proxy_url + "/"
        from .state import write_private

        write_private(self.paths.proxy_url_file, self.proxy_url + "\n")
        if o.create_instance and self.store.count_instances() == 0:
            self.store.add_instance(o.instance)
            self.created_instance = o.instance

    def banner(self) -> None:
        o = self.opts
        backend = "simulator (auto-scan)" if o.simulator else "neonize"
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
                f"PORT={o.port} wa-worker",
            ]
        first = (self.store.list_instances()[0]["id"] if self.store and self.store.count_instances() else "NAME")
        lines += [
            f"  try           wa-worker dev send {first} +5511999990000 \"hello\"",
            "                wa-worker dev messages      wa-worker dev instance add NAME",
            "  Ctrl-C stops everything",
        ]
        self.say("\n".join(lines))
        if self.created_instance and self.printer is not None:
            self.printer.line(self.created_instance, "instance created (first run)")

    def worker_settings(self) -> Any:
        from ..config import load_settings

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
        )
        if o.simulator:
            overrides["SIMULATOR_AUTO_SCAN_MS"] = 1500
        return load_settings(**overrides)

    async def stop_proxy(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        if self.store is not None:
            self.store.close()
            self.store = None
        with contextlib.suppress(OSError):
            self.paths.proxy_url_file.unlink()


class DevRunError(Exception):
    """One line for the user."""


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _describe(exc: BaseException) -> str:
    leaf = _leaf(exc)
    return f"{type(leaf).__name__}: {leaf}"


def _setup_logging(level: str, secret: str) -> None:
    try:
        from ..logutil import setup_logging
    except ImportError:  # pragma: no cover - logutil ships with the package
        logging.basicConfig(level=level, stream=sys.stderr)
        return
    setup_logging(level, [secret])


async def _serve(run: DevRun) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)

    worker_task: asyncio.Task[None] | None = None
    worker: Any = None
    code = 0
    try:
        if run.opts.with_worker:
            from ..config import ConfigError

            try:
                from ..daemon import Worker
            except ImportError as exc:
                raise DevRunError(f"the worker is not available in this build ({exc})") from None
            try:
                settings = run.worker_settings()
            except ConfigError as exc:
                raise DevRunError(str(exc)) from None
            assert run.printer is not None
            # loopback only: the worker's /wake and simulator controls are for this machine
            from ..preflight import StartupError, check_paths

            try:
                check_paths(settings.AUTH_DIR, settings.STATE_DB)
                worker = Worker(settings, on_event=run.printer.worker_event, host="127.0.0.1")
            except StartupError as exc:  # an unusable auth folder or journal: one line, like the daemon
                raise DevRunError(str(exc)) from None
            except ImportError as exc:
                hint = "" if run.opts.simulator else " (try --simulator)"
                raise DevRunError(f"the {settings.WA_BACKEND.value} backend is not available: {exc}{hint}") from None
        run.banner()
        if worker is not None:
            worker_task = asyncio.create_task(worker.run(), name="wa-worker")
            stop_task = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait({worker_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
            stop_task.cancel()
            if worker_task in done:
                failure = worker_task.exception() if not worker_task.cancelled() else None
                if failure is not None:
                    run.say(f"wa-worker dev: the worker stopped: {_describe(failure)}")
                    if isinstance(_leaf(failure), OSError):
                        run.say(f"  (is port {run.opts.port} busy? choose another with --port)")
                else:
                    run.say("wa-worker dev: the worker stopped")
                code = 1
                worker_task = None
        else:
            await stop.wait()
    finally:
        if worker_task is not None:
            run.say("wa-worker dev: stopping (the worker reports its instances DISCONNECTED)…")
            worker.request_stop()
            try:
                await asyncio.wait_for(asyncio.shield(worker_task), SHUTDOWN_TIMEOUT_S)
            except asyncio.CancelledError:
                pass
            except asyncio.TimeoutError:
                run.say("wa-worker dev: the worker did not stop in time")
                worker_task.cancel()
                code = 1
            except Exception as exc:  # noqa: BLE001 - report and exit non-zero
                run.say(f"wa-worker dev: the worker failed while stopping: {_describe(exc)}")
                code = 1
        await run.stop_proxy()
        for signum in installed:
            loop.remove_signal_handler(signum)
    return code


def run(opts: DevOptions, out: TextIO | None = None) -> int:
    """Run until SIGINT/SIGTERM; 0 on a clean stop."""
    try:
        dev = DevRun(opts, out)
        lock = FolderLock(dev.paths).acquire()
    except DevStateError as exc:
        print(f"wa-worker dev: {exc}", file=sys.stderr)
        return 1
    try:
        return _run(dev)
    finally:
        lock.release()


def _run(dev: DevRun) -> int:
    opts = dev.opts
    _setup_logging(opts.log_level, dev.secret)

    async def main() -> int:
        await dev.start_proxy()
        return await _serve(dev)

    try:
        return asyncio.run(main())
    except DevRunError as exc:
        print(f"wa-worker dev: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a signal before the handlers were installed
        return 0
