from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.fakeproxy import SECRET, FakeProxy
from wa_worker.backends.simulator import SimulatorBackend
from wa_worker.config import Settings
from wa_worker.daemon import Worker


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


async def wait_until(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await anyio.sleep(0.02)


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
                await worker._done.wait()
