from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from aiohttp import web
from anyio.abc import SocketStream

from tests.fakeleases import LeaseBook
from tests.fakeproxy import SECRET, FakeProxy
from wa_worker.backends.base import SessionState
from wa_worker.backends.simulator import SimulatorBackend
from wa_worker.config import Settings
from wa_worker import daemon as daemon_mod
from wa_worker.daemon import Worker
from wa_worker.dev.background import BackgroundProxy
from wa_worker.dev.cli import main as dev_main
from wa_worker.dev.state import DevPaths
from wa_worker.dev.store import DevStore
from wa_worker.timing import Clock

#: the bearer header every worker and proxy in the tests accepts
AUTH = {"Authorization": f"Bearer {SECRET}"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def proxy() -> AsyncIterator[FakeProxy]:
    p = await FakeProxy().start()
    try:
        yield p
    finally:
        await p.stop()


@pytest.fixture
async def fleet() -> AsyncIterator[FakeProxy]:
    """A fake proxy with leases (a fleet's proxy), TTL 30 s."""
    p = await FakeProxy(lease_book=LeaseBook(ttl_s=30.0)).start()
    try:
        yield p
    finally:
        await p.stop()


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A prepared ``wa-worker dev`` state folder holding SECRET (none in the environment)."""
    monkeypatch.delenv("WORKER_SECRET", raising=False)
    monkeypatch.delenv("WA_DEV_PROXY_URL", raising=False)
    d = tmp_path / ".wa-worker"
    DevPaths(d).prepare()
    (d / "secret").write_text(SECRET + "\n")
    return d


@pytest.fixture
def dev_proxy(state_dir: Path) -> Iterator[BackgroundProxy]:
    """The dev proxy on its own thread, its URL written into ``state_dir``."""
    store = DevStore(state_dir / "proxy.db")
    with BackgroundProxy(store, SECRET) as bp:
        (state_dir / "proxy-url").write_text(bp.url + "\n")
        yield bp
    store.close()


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``wa-worker dev`` in this process: its exit code, stdout and stderr."""
    code = dev_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def fast_housekeeping(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process workers run their housekeeping (descriptor budget, store probe) every 0.2 s, not 5 s."""
    monkeypatch.setattr(daemon_mod, "STORE_PROBE_EVERY_S", 0.2)


def make_settings(tmp_path: Path, proxy_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        EDGE_BASE_URL=proxy_url,
        WORKER_SECRET=SECRET,
        PORT=0,
        AUTH_DIR=tmp_path / "auth",
        STATE_DB=tmp_path / "state" / "wa-worker.db",
        INSTANCE_POLL_MS=100,
        INSTANCE_POLL_MAX_MS=400,
        MSG_POLL_MS=50,
        MSG_POLL_MAX_MS=200,
        WA_BACKEND="simulator",
        EDGE_TIMEOUT_S=2,
        CONNECT_TIMEOUT_S=5,
    )
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def wait_until(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Awaitable[Any]:
    """Await ``cond()`` becoming truthy (checked every 20 ms) and return its value;
    an AssertionError naming ``what`` once ``timeout`` seconds have passed."""
    return _poll(cond, time.monotonic() + timeout, f"timed out after {timeout}s waiting for {what}")


async def _poll(cond: Callable[[], Any], deadline: float, failure: str) -> Any:
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(failure)
        await anyio.sleep(0.02)


async def connect(w: Worker, proxy: FakeProxy, iid: str = "acme") -> None:
    """Scan the simulator's QR for ``iid`` once it is shown and pushed; wait for CONNECTED."""
    await wait_until(lambda: iid in w.backend.sessions and w.backend.session(iid).state == SessionState.QR
                     and any(s["qr_code"] for s in proxy.statuses_of(iid)), what=f"QR of {iid}")
    w.backend.session(iid).scan()
    await wait_until(lambda: proxy.status_of(iid) == "CONNECTED", what=f"{iid} CONNECTED")


class FakeClock(Clock):
    """Fake time for the daemon's and the stores' clocks: ``now`` moves only when
    a test or a wait moves it. Sleeps and waits advance it at once (after a real
    ``tick_s`` yield, or when a wait's event is set within it); ``sleeps`` records
    both, ``waits`` the waits (rounded to the ms). Callable, for the dev store."""

    def __init__(self, now: float = 1_000_000.0, *, tick_s: float = 0.001) -> None:
        self.now = now
        self.tick_s = tick_s
        self.sleeps: list[float] = []
        self.waits: list[float] = []

    def __call__(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await anyio.sleep(self.tick_s)

    async def wait(self, event: anyio.Event, seconds: float) -> bool:
        self.sleeps.append(seconds)
        self.waits.append(round(seconds, 3))
        with anyio.move_on_after(self.tick_s):
            await event.wait()
            return True
        self.now += seconds
        return False


async def closed_within(stream: SocketStream, limit_s: float) -> tuple[float | None, bytes]:
    """(seconds until the server closed or answered, what it sent); (None, b"") if still open."""
    t0 = time.monotonic()
    with anyio.move_on_after(limit_s):
        try:
            data = await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            data = b""
        return time.monotonic() - t0, data
    return None, b""


async def stream_endlessly(request: web.Request, status: int, *, pause_s: float, chunk: bytes,
                           limit_s: float) -> web.StreamResponse:
    """A JSON answer whose body never ends (or drips, with ``pause_s``), for at most ``limit_s``."""
    resp = web.StreamResponse(status=status, headers={"Content-Type": "application/json"})
    await resp.prepare(request)
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < limit_s:
            await resp.write(chunk)
            await anyio.sleep(pause_s)
    except (ConnectionError, RuntimeError):
        pass
    return resp


@asynccontextmanager
async def serving(app: web.Application, **runner_options: Any) -> AsyncIterator[str]:
    """``app`` on a free loopback port for the block; yields its base URL."""
    runner = web.AppRunner(app, access_log=None, **runner_options)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        with anyio.move_on_after(2, shield=True):
            await runner.cleanup()


@asynccontextmanager
async def running_worker(settings: Settings, **kwargs: Any) -> AsyncIterator[Worker]:
    backend = kwargs.pop("backend", None)
    if backend is None and settings.WA_BACKEND.value == "simulator":
        backend = SimulatorBackend(Path(settings.AUTH_DIR), auto_scan_ms=settings.SIMULATOR_AUTO_SCAN_MS,
                                   connect_delay_s=0.01, qr_rotate_s=kwargs.pop("qr_rotate_s", 20.0))
    worker = Worker(settings, backend=backend, host="127.0.0.1", **kwargs)
    async with anyio.create_task_group() as tg:
        await tg.start(worker.run)
        try:
            yield worker
        finally:
            worker.request_stop()
            with anyio.fail_after(20):
                await worker.wait_stopped()
