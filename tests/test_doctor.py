"""``wa-worker doctor`` against real loopback proxies, through the real command."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import anyio
import pytest
from aiohttp import web

from tests.fakeproxy import SECRET, FakeProxy
from wa_worker.config import load_settings
from wa_worker.doctor import FAIL, OK, WARN, proxy_checks

pytestmark = pytest.mark.anyio


async def _doctor(tmp_path: Path, url: str, secret: str = SECRET, *args: str) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("EDGE_BASE_URL", "WORKER_SECRET")}
    env.update(EDGE_BASE_URL=url, WORKER_SECRET=secret, AUTH_DIR=str(tmp_path / "auth"),
               STATE_DB=str(tmp_path / "state" / "wa.db"), PYTHONIOENCODING="utf-8")
    with anyio.fail_after(60):
        done = await anyio.run_process([sys.executable, "-m", "wa_worker", "doctor", *args], env=env,
                                       cwd=tmp_path, check=False)
    return done.returncode, done.stdout.decode()


def _line(out: str, name: str) -> str:
    return next(line for line in out.splitlines() if line[2:].startswith(name))


async def test_a_good_proxy_passes_every_line_and_changes_nothing(proxy: FakeProxy, tmp_path: Path) -> None:
    proxy.add_instance("acme")
    proxy.enqueue("acme", "m-1", "5511999990000", "hi")
    proxy.set_settings("acme", settings={"call_reject": True})
    code, out = await _doctor(tmp_path, proxy.url)
    assert code == 0, out
    for name in ("configuration", "AUTH_DIR", "STATE_DB", "descriptor limit", "proxy reachable", "clock skew",
                 "secret", "GET /disconnected-instances", "GET /queued-messages", "POST /mark-sent",
                 "POST /update-status", "POST /inbound", "POST /mark-failed", "POST /upload-media",
                 "GET /instance-settings"):
        assert _line(out, name).startswith(OK), out
    assert "1 instance(s)" in _line(out, "GET /disconnected-instances")
    assert "supported" in _line(out, "POST /mark-failed")
    assert out.strip().endswith("ready to deploy")
    # nothing real was touched: the queued message is still queued, no status or inbound was written
    assert [m["id"] for m in proxy.queue["acme"]] == ["m-1"]
    assert proxy.statuses == [] and proxy.inbound == [] and proxy.uploads == {}
    assert "m-1" not in proxy.sent_marks and "m-1" not in proxy.failed_marks
    assert proxy.calls["queued-messages"] == 1  # the per-instance probe only: batch is not probed by default
    assert (tmp_path / "auth").is_dir() and (tmp_path / "state").is_dir()


class _MinimalProxy(FakeProxy):
    """A proxy of the first contract: no /mark-failed, no /upload-media routes at all."""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/disconnected-instances", self._disconnected)
        app.router.add_post("/update-status", self._update_status)
        app.router.add_get("/queued-messages", self._queued)
        app.router.add_post("/mark-sent", self._mark_sent)
        app.router.add_post("/inbound", self._inbound)
        return app


async def test_optional_endpoints_and_batch_are_detected(tmp_path: Path) -> None:
    proxy = await _MinimalProxy(batch=True).start()
    try:
        code, out = await _doctor(tmp_path, proxy.url, SECRET, "--probe-batch")
    finally:
        await proxy.stop()
    assert code == 0, out  # optional endpoints missing are warnings
    assert _line(out, "POST /mark-failed").startswith(WARN)
    assert _line(out, "POST /upload-media").startswith(WARN)
    assert _line(out, "GET /instance-settings").startswith(WARN)
    assert _line(out, "batch /queued-messages").startswith(OK)
    assert "supported: one call" in _line(out, "batch /queued-messages")


async def test_the_push_channel_is_detected(tmp_path: Path) -> None:
    proxy = await FakeProxy(events=True).start()
    try:
        proxy.add_instance("acme")
        proxy.enqueue("acme", "m-1", "5511999990000", "hi")
        code, out = await _doctor(tmp_path, proxy.url)
    finally:
        await proxy.stop()
    assert code == 0, out
    assert _line(out, "GET /events").startswith(OK) and "pushed" in _line(out, "GET /events")
    assert proxy.events_queries == [{"wait": "1", "worker_id": ""}]
    assert [m["id"] for m in proxy.queue["acme"]] == ["m-1"]  # a read: nothing claimed
    minimal = await _MinimalProxy().start()  # a proxy of the first contract
    try:
        code, out = await _doctor(tmp_path, minimal.url)
    finally:
        await minimal.stop()
    assert code == 0 and _line(out, "GET /events").startswith(WARN), out
    assert "not supported (HTTP 404)" in _line(out, "GET /events")


async def test_a_wrong_secret_is_a_secret_mismatch(proxy: FakeProxy, tmp_path: Path) -> None:
    code, out = await _doctor(tmp_path, proxy.url, "not-the-proxy-secret")
    assert code == 1
    assert _line(out, "secret").startswith(FAIL) and "secret mismatch" in out
    assert "not-the-proxy-secret" not in out


async def test_a_wrong_path_names_edge_base_url(proxy: FakeProxy, tmp_path: Path) -> None:
    code, out = await _doctor(tmp_path, proxy.url + "/functions/v1/wrong")
    assert code == 1
    for name in ("GET /disconnected-instances", "GET /queued-messages", "POST /mark-sent", "POST /update-status",
                 "POST /inbound"):
        line = _line(out, name)
        assert line.startswith(FAIL) and "check the path of EDGE_BASE_URL" in line, out


async def test_a_dead_host_is_unreachable(tmp_path: Path) -> None:
    with anyio.fail_after(10):
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        await listener.aclose()  # nothing listens there now
    code, out = await _doctor(tmp_path, f"http://127.0.0.1:{port}")
    assert code == 1
    assert _line(out, "proxy reachable").startswith(FAIL) and "connection failed" in out


async def test_an_invalid_configuration_gives_the_start_message(proxy: FakeProxy, tmp_path: Path) -> None:
    code, out = await _doctor(tmp_path, proxy.url, "short")
    assert code == 1
    assert _line(out, "configuration").startswith(FAIL)
    assert "WORKER_SECRET: must be at least 8 characters" in out


async def test_clock_skew_is_measured_from_the_date_header(proxy: FakeProxy, tmp_path: Path) -> None:
    settings = load_settings(EDGE_BASE_URL=proxy.url, WORKER_SECRET=SECRET, AUTH_DIR=tmp_path / "a",
                             STATE_DB=tmp_path / "s.db")
    checks = await proxy_checks(settings, now=lambda: time.time() + 3600)
    skew = next(c for c in checks if c.name == "clock skew")
    assert skew.mark == WARN
    assert -3602 <= int(skew.detail.split(" s ")[0]) <= -3598, skew.detail  # Date has a one-second resolution


try:  # tests/ as a plain directory (default) or as a package
    from pg_helpers import (  # noqa: F401  (fixtures are used by name)
        EdgeFunction, WaDb, clean_wa_db, edge_function, pg_server, wa_db,
    )
except ImportError:  # pragma: no cover
    from tests.pg_helpers import (  # type: ignore[no-redef]  # noqa: F401
        EdgeFunction, WaDb, clean_wa_db, edge_function, pg_server, wa_db,
    )


@pytest.mark.postgres
@pytest.mark.deno
@pytest.mark.slow
async def test_the_supabase_kit_passes_and_keeps_its_rows(edge_function: EdgeFunction, clean_wa_db: WaDb,
                                                          tmp_path: Path) -> None:
    """The reference proxy: its 404 "unknown instance" is told from its 404 "unknown endpoint",
    its UUID message ids are respected, and nothing is claimed, marked or stored."""
    db = clean_wa_db
    db.insert_instance("acme", status="CONNECTED")
    mid = db.insert_outbound("acme", "5511999990000", "hi")
    code, out = await _doctor(tmp_path, edge_function.base_url, edge_function.secret)
    assert code == 0, out
    for name in ("secret", "GET /disconnected-instances", "GET /queued-messages", "POST /mark-sent",
                 "POST /update-status", "POST /inbound", "POST /mark-failed", "POST /upload-media"):
        assert _line(out, name).startswith(OK), out
    row = db.outbound(mid)
    assert row is not None and row["status"] == "queued" and row["attempts"] == 0
    assert [i["id"] for i in db.instances()] == ["acme"] and db.inbound_rows() == []
