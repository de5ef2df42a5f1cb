"""The real daemon with the real neonize backend, offline: a dial that cannot reach
WhatsApp surfaces as DISCONNECTED and is retried with backoff, never hangs."""

from __future__ import annotations

import os
import stat

import httpx
import pytest

from tests.conftest import make_settings, running_worker, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.neonize, pytest.mark.slow]


async def test_worker_with_neonize_reports_dial_failures_and_retries(proxy, tmp_path):
    proxy.add_instance("acme")
    settings = make_settings(tmp_path, proxy.url, WA_BACKEND="neonize", CONNECT_TIMEOUT_S=5)
    async with running_worker(settings) as w:
        assert w.backend.name == "neonize"
        await wait_until(lambda: any(s["status"] == "DISCONNECTED" for s in proxy.statuses_of("acme")),
                         timeout=20, what="DISCONNECTED after a failed dial")
        runner = w.manager.runners["acme"]
        await wait_until(lambda: runner.reconnects >= 2, timeout=20, what="retried with backoff")
        reasons = {s.get("reason") for s in proxy.statuses_of("acme") if s["status"] == "DISCONNECTED"}
        assert reasons <= {"connect_failure", "connect_timeout", "network"}, reasons
        assert not any(s["status"] == "CONNECTED" for s in proxy.statuses_of("acme"))
        # the session store is where it belongs, private
        folder = tmp_path / "auth" / "acme"
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
        for f in folder.iterdir():
            assert stat.S_IMODE(os.stat(f).st_mode) == 0o600, f
        # an unpaired store is not a session to resume
        assert w.backend.stored_instances() == []
        async with httpx.AsyncClient() as http:
            r = await http.get(f"http://127.0.0.1:{w.port}/health", timeout=2)
        assert r.status_code == 200
    assert proxy.statuses_of("acme")[-1]["status"] == "DISCONNECTED"
