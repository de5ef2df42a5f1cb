"""Adding an instance on the dev proxy starts it at once: the proxy posts the worker's
``/wake`` and a wake for an instance the worker does not run renews its leases (the dev proxy
has them) or, on a proxy without leases, runs its discovery."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import httpx
import pytest

from tests.conftest import AUTH, make_settings, running_worker, wait_until
from tests.fakeproxy import SECRET
from tests.proc import free_port
from wa_worker.dev.background import BackgroundProxy
from wa_worker.dev.store import DevStore

pytestmark = pytest.mark.anyio


async def test_an_added_instance_is_connecting_within_a_second(tmp_path: Path) -> None:
    store = DevStore(tmp_path / "proxy.db")
    worker_port = free_port()
    with BackgroundProxy(store, SECRET, wake_url=f"http://127.0.0.1:{worker_port}") as bp:
        # discovery every 5 s at best: without the wake, a new instance waits seconds
        settings = make_settings(tmp_path, bp.url, PORT=worker_port, INSTANCE_POLL_MS=5000,
                                 INSTANCE_POLL_MAX_MS=30000, SIMULATOR_AUTO_SCAN_MS=None)
        async with running_worker(settings) as w, httpx.AsyncClient(base_url=bp.url, headers=AUTH,
                                                                     trust_env=False) as http:
            # the dev proxy has leases (issue #13): the worker asks POST /leases instead of discovering;
            # either way it first learns what to run, then waits (a discovery poll, a lease renewal)
            await wait_until(lambda: w.manager.discovery_health.last_ok is not None or w.manager.leases.mode,
                             5, "the first discovery or lease call")
            await anyio.sleep(0.5)  # now in its 5 s wait (or its renewal interval)

            async def status() -> str | None:
                found = [i for i in (await http.get("/dev/instances")).json()["instances"] if i["id"] == "sales"]
                return found[0]["status"] if found else None

            t0 = time.monotonic()
            assert (await http.post("/dev/instances", json={"id": "sales"})).status_code == 201
            deadline = t0 + 1.0
            while (await status()) != "CONNECTING":
                assert time.monotonic() < deadline, "the new instance is not CONNECTING within 1 s"
                await anyio.sleep(0.05)
    store.close()

