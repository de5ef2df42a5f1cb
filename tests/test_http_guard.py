"""The pieces behind the worker's HTTP hardening, on real aiohttp servers on loopback:
the connection guard, the shared bearer check and JSON reader (worker and dev
proxy), the descriptor budget by kind, and the server's independence from the daemon."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from tests.conftest import AUTH, closed_within, make_settings, running_worker, wait_until
from tests.fakeproxy import SECRET
from tests.proc import ROOT
from wa_worker.dev.background import BackgroundProxy
from wa_worker.dev.store import DevStore
from wa_worker.fdguard import FdBudget, FdUsage, fd_usage
from wa_worker.http.common import bearer_matches, decode_json_object, json_depth, read_json_object
from wa_worker.http.guard import SERVER_OPTIONS, ConnectionGuard, GuardedSite, is_loopback, max_connections_for
from wa_worker.http.server import build_app


@asynccontextmanager
async def guarded_server(guard: ConnectionGuard, app: web.Application | None = None) -> AsyncIterator[int]:
    if app is None:
        app = web.Application(middlewares=[guard.middleware])

        async def slow(request: web.Request) -> web.Response:
            await anyio.sleep(float(request.query.get("s", "0")))
            return web.json_response({"ok": True})

        async def echo(request: web.Request) -> web.Response:
            return web.json_response(await read_json_object(request, max_bytes=1024, read_timeout_s=0.4))

        app.router.add_get("/", slow)
        app.router.add_post("/echo", echo)
    runner = web.AppRunner(app, handle_signals=False, **SERVER_OPTIONS)
    await runner.setup()
    try:
        await GuardedSite(runner, "127.0.0.1", 0, guard).start()
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


GET = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"


# ---------------------------------------------------------------------------- connection guard


def only_from(host: str) -> Any:
    """Stands in for "is loopback" (every test peer is): only ``host`` gets the reserve."""
    return lambda peer: peer == host


@pytest.mark.anyio
async def test_connections_over_the_cap_are_closed_at_once():
    guard = ConnectionGuard(max_connections=3, request_timeout_s=5, reserved_for=only_from("127.0.0.2"))
    async with guarded_server(guard) as port:
        held = [await anyio.connect_tcp("127.0.0.1", port) for _ in range(3)]
        await anyio.sleep(0.1)
        assert guard.open_connections == 3
        extra = await anyio.connect_tcp("127.0.0.1", port)
        elapsed, data = await closed_within(extra, 1)
        assert elapsed is not None and elapsed < 0.5 and data == b""
        assert guard.stats()["refused"] == 1
        for s in held:  # the admitted ones still work
            await s.send(GET)
            assert b"200 OK" in await s.receive()
        await held[0].aclose()
        await anyio.sleep(0.1)
        fresh = await anyio.connect_tcp("127.0.0.1", port)  # room again
        await fresh.send(GET)
        assert b"200 OK" in await fresh.receive()
        for s in [*held[1:], extra, fresh]:
            await s.aclose()


@pytest.mark.anyio
async def test_a_reserve_for_the_local_health_check():
    guard = ConnectionGuard(max_connections=2, request_timeout_s=5, reserve=1, reserved_for=only_from("127.0.0.2"))
    async with guarded_server(guard) as port:
        flood = [await anyio.connect_tcp("127.0.0.1", port) for _ in range(2)]
        guard.refusing = True  # even while descriptors run short
        local = await anyio.connect_tcp("127.0.0.1", port, local_host="127.0.0.2")
        await local.send(GET)
        with anyio.fail_after(2):
            assert b"200 OK" in await local.receive()
        second = await anyio.connect_tcp("127.0.0.1", port, local_host="127.0.0.2")  # the reserve is full
        assert (await closed_within(second, 1))[0] is not None
        assert guard.stats()["refused"] == 1
        for s in [*flood, local, second]:
            await s.aclose()


def test_loopback_peers():
    assert is_loopback("127.0.0.1") and is_loopback("127.8.0.2") and is_loopback("::1")
    assert is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("192.0.2.7") and not is_loopback("10.0.0.1") and not is_loopback("")


@pytest.mark.anyio
async def test_no_complete_request_in_time_means_closed():
    guard = ConnectionGuard(max_connections=50, request_timeout_s=0.5)
    async with guarded_server(guard) as port:
        idle = await anyio.connect_tcp("127.0.0.1", port)
        elapsed, _ = await closed_within(idle, 2)
        assert elapsed is not None and 0.4 < elapsed < 1.0

        drip = await anyio.connect_tcp("127.0.0.1", port)  # a byte every 0.1 s: progress, never a request
        await drip.send(b"GET / HTTP/1.1\r\nX-Drip: ")
        t0 = time.monotonic()
        with anyio.move_on_after(2):
            while True:
                try:
                    await drip.send(b"a")
                except (anyio.BrokenResourceError, OSError):
                    break
                await anyio.sleep(0.1)
        assert time.monotonic() - t0 < 1.2

        keep = await anyio.connect_tcp("127.0.0.1", port)  # the deadline restarts after each response
        for _ in range(3):
            await keep.send(GET)
            assert b"200 OK" in await keep.receive()
            await anyio.sleep(0.3)
        elapsed, _ = await closed_within(keep, 2)
        assert elapsed is not None and elapsed < 0.5

        # after an answer, a request that starts and never completes is cut like any other
        stall = await anyio.connect_tcp("127.0.0.1", port)
        await stall.send(GET)
        assert b"200 OK" in await stall.receive()
        await stall.send(b"GET / HTTP/1.1\r\nX-Stall: ")
        elapsed, _ = await closed_within(stall, 2)
        assert elapsed is not None and elapsed < 0.7

        slow = await anyio.connect_tcp("127.0.0.1", port)  # a running handler is not cut
        await slow.send(b"GET /?s=1.2 HTTP/1.1\r\nHost: t\r\n\r\n")
        with anyio.fail_after(3):
            assert b"200 OK" in await slow.receive()
        # the idle keep-alive connection was closed as routine, the others as incomplete requests
        assert (guard.stats()["timed_out"], guard.stats()["idle_closed"]) == (3, 1)
        for s in (idle, drip, keep, stall, slow):
            await s.aclose()


@pytest.mark.anyio
async def test_a_dripped_body_is_a_408():
    guard = ConnectionGuard(max_connections=50, request_timeout_s=5)
    async with guarded_server(guard) as port:
        s = await anyio.connect_tcp("127.0.0.1", port)
        await s.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 20\r\n\r\n{")
        with anyio.fail_after(2):
            assert b" 408 " in await s.receive()
        await s.aclose()
        async with httpx.AsyncClient(trust_env=False) as http:
            r = await http.post(f"http://127.0.0.1:{port}/echo", json={"a": 1})
            assert r.json() == {"a": 1}
            r = await http.post(f"http://127.0.0.1:{port}/echo", content=b"x" * 2000)
            assert r.status_code == 413


@pytest.mark.anyio
async def test_refusing_and_the_descriptor_ceiling():
    guard = ConnectionGuard(max_connections=50, request_timeout_s=5, reserved_for=only_from("none"))
    async with guarded_server(guard) as port:
        guard.refusing = True
        s = await anyio.connect_tcp("127.0.0.1", port)
        assert (await closed_within(s, 1))[0] is not None
        await s.aclose()
        guard.refusing = False
        guard.fd_ceiling = 3  # every accepted socket's descriptor is past it
        s = await anyio.connect_tcp("127.0.0.1", port)
        assert (await closed_within(s, 1))[0] is not None
        await s.aclose()
        guard.fd_ceiling = None
        async with httpx.AsyncClient(trust_env=False) as http:
            assert (await http.get(f"http://127.0.0.1:{port}/")).status_code == 200
        assert guard.stats()["refused"] == 2


def test_cap_follows_the_descriptor_limit():
    assert max_connections_for(256) == 64
    assert max_connections_for(1 << 20) == 256
    assert max_connections_for(40) == 16
    guard = ConnectionGuard.for_fd_limit(1000)
    assert guard.max_connections == 250 and guard.fd_ceiling == 800


# ---------------------------------------------------------------------------- the worker's app


class View:
    def __init__(self) -> None:
        self.woken: list[str | None] = []

    def health(self) -> dict[str, Any]:
        return {"status": "ok"}

    def not_ready_reasons(self) -> list[str]:
        return []

    def loop_ages(self) -> dict[str, Any]:
        return {}

    def wake(self, instance_id: str | None = None) -> int:
        self.woken.append(instance_id)
        return 1


@pytest.mark.anyio
async def test_worker_app_needs_only_the_view():
    view, guard = View(), ConnectionGuard()
    async with guarded_server(guard, build_app(view, SECRET, guard=guard)) as port:
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(trust_env=False) as http:
            r = await http.get(base + "/health")
            assert r.json()["http"]["connections"] == 1
            assert (await http.get(base + "/ready")).json() == {"status": "ready", "loops": {}}
            assert (await http.post(base + "/wake", json={"instanceId": "acme"})).status_code == 401
            assert (await http.post(base + "/wake", headers=AUTH, json={"instanceId": "acme"})).status_code == 202
            assert view.woken == ["acme"]
            # no simulator controls unless the daemon mounts them
            assert (await http.get(base + "/simulator/instances", headers=AUTH)).status_code == 404


def test_http_package_does_not_import_the_daemon():
    code = ("import sys, wa_worker.http.server, wa_worker.http.simulator_routes, wa_worker.http.guard;"
            "assert 'wa_worker.daemon' not in sys.modules, 'daemon imported'")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


# ---------------------------------------------------------------------------- shared helpers


def test_bearer_check():
    secret = SECRET.encode()

    def ok(value: str | None) -> bool:
        headers = {"Authorization": value} if value is not None else {}
        return bearer_matches(make_mocked_request("GET", "/", headers=headers), secret)

    assert ok(f"Bearer {SECRET}") and ok(f"bearer  {SECRET} ")
    assert not ok(None) and not ok("Bearer") and not ok(f"Basic {SECRET}") and not ok(f"Bearer {SECRET}x")


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b"[" * 30000 + b"]" * 30000, "nested deeper than 32"),
        (b'{"a": "' + b"[" * 100 + b'"}', None),  # brackets in strings do not count
        (b'{"a": "\\"[[["}', None),
        (b'{"a": "\xff"}', "not UTF-8"),
        (b'{"a": 1' + b"0" * 5000 + b"}", "number too large"),
        (b'{"a": NaN}', "NaN"),
        (b'{"a": -Infinity}', "NaN"),
        (b"{not json", "Expecting property name"),
        (b"[]", "must be a JSON object"),
        (b"  ", "required"),
    ],
)
def test_decode_json_object(raw: bytes, needle: str | None):
    if needle is None:
        assert isinstance(decode_json_object(raw), dict)
        return
    with pytest.raises(web.HTTPException) as info:
        decode_json_object(raw)
    assert info.value.status == 400
    assert info.value.text is not None and needle in info.value.text


def test_json_depth():
    assert json_depth('{"a": [1, {"b": []}]}') == 4
    assert json_depth('"[[[["') == 0
    assert json_depth("[" * 33 + "]" * 33) == 33
    assert decode_json_object(b"  ", allow_empty=True) == {}


@pytest.fixture
def dev_proxy(tmp_path: Path):
    store = DevStore(tmp_path / "proxy.db")
    store.add_instance("a")
    with BackgroundProxy(store, SECRET) as bp:
        yield bp
    store.close()


def test_dev_proxy_uses_the_shared_reader_and_bearer(dev_proxy: BackgroundProxy):
    with httpx.Client(base_url=dev_proxy.url, timeout=5, trust_env=False) as http:
        for path in ("/update-status", "/mark-sent", "/inbound", "/dev/messages", "/dev/instances"):
            r = http.post(path, headers=AUTH, content=b"[" * 30000 + b"]" * 30000)
            assert r.status_code == 400, (path, r.text)
            assert "nested" in r.json()["error"]
        # /dev/messages may carry media_base64: its cap is 1 MiB + 4/3 of the media cap
        dev_proxy.proxy.media_max_bytes = 0
        for path in ("/dev/messages", "/mark-sent"):
            r = http.post(path, headers=AUTH, content=b" " * (1024 * 1024 + 1))
            assert r.status_code == 413, path
        r = http.get("/dev/instances", headers={"Authorization": b"Bearer \xff\xfe"})
        assert r.status_code == 401
        assert http.get("/dev/instances", headers=AUTH).status_code == 200


# ---------------------------------------------------------------------------- descriptor budget


def test_descriptors_are_counted_by_kind(tmp_path: Path):
    before = fd_usage()
    pairs = [socket.socketpair() for _ in range(5)]
    files = [open(tmp_path / f"f{i}", "w") for i in range(7)]  # held open on purpose
    try:
        during = fd_usage()
        assert during.sockets - before.sockets == 10
        assert during.files - before.files == 7
        assert during.open == during.sockets + during.files
        assert during.as_health()["socket_fds"] == during.sockets
    finally:
        for a, b in pairs:
            a.close()
            b.close()
        for f in files:
            f.close()
    assert fd_usage().open == before.open


def test_only_the_descriptor_leak_restarts():
    budget = FdBudget()
    assert budget.level(FdUsage(open=100, sockets=50, limit=1000)) == "ok"
    assert budget.level(FdUsage(open=850, sockets=50, limit=1000)) == "warn"
    # the budget is full of sockets (connections): refuse new ones, never restart
    assert budget.level(FdUsage(open=980, sockets=900, limit=1000)) == "refuse"
    assert budget.level(FdUsage(open=256, sockets=230, limit=256)) == "refuse"
    # the neonize leak (files) makes up at least half of the restart level: restart
    assert budget.level(FdUsage(open=980, sockets=300, limit=1000)) == "restart"
    assert budget.level(FdUsage(open=980, sockets=20, limit=1000)) == "restart"
    # at EMFILE the kinds are unknown: refuse, do not restart blind
    assert budget.level(FdUsage(open=1000, sockets=-1, limit=1000)) == "refuse"
    assert budget.level(FdUsage(open=-1, sockets=-1, limit=1000)) == "ok"


def test_fd_usage_at_emfile(tmp_path: Path):
    code = (
        "import resource, os\n"
        "from wa_worker.fdguard import fd_usage\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))\n"
        "held = []\n"
        "try:\n"
        "    while True: held.append(os.open(os.devnull, os.O_RDONLY))\n"
        "except OSError: pass\n"
        "u = fd_usage(); print(u.open, u.sockets, u.limit)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.stdout.split() == ["64", "-1", "64"], res.stderr


@pytest.mark.anyio
async def test_sockets_filling_the_budget_refuse_connections_instead_of_restarting(proxy, tmp_path: Path,
                                                                                    fast_housekeeping):
    proxy.add_instance("acme")
    async with running_worker(make_settings(tmp_path, proxy.url, SIMULATOR_AUTO_SCAN_MS=0)) as w:
        await wait_until(lambda: proxy.status_of("acme") == "CONNECTED")
        usage = w.fds.usage()
        w.fds.restart_ratio = usage.open / usage.limit / 2  # over the restart level ...
        w.fds.leak_share = 10.0  # ... but the non-socket descriptors are not the cause
        await wait_until(lambda: w.http_guard.refusing, timeout=8, what="refusing (next housekeeping round)")
        assert not w._stop.is_set() and w.exit_code == 0
        assert "file descriptors nearly exhausted" in w.not_ready_reasons()
        assert proxy.status_of("acme") == "CONNECTED"


def test_sockets_closed_by_their_peer_count_as_the_leak():
    """goneonize's abandoned PostgreSQL pools (DATABASE_URL): the server closes their idle
    connections, the Go side never does; CLOSE_WAIT sockets are told apart and count
    toward a restart like leaked files."""
    budget = FdBudget()
    assert budget.level(FdUsage(open=980, sockets=900, limit=1000, stale=700)) == "restart"
    assert budget.level(FdUsage(open=980, sockets=900, limit=1000, stale=100)) == "refuse"

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    clients, before = [], fd_usage()
    try:
        for _ in range(3):
            c = socket.create_connection(server.getsockname())
            peer, _ = server.accept()
            peer.close()  # the peer hangs up; nobody closes the client: CLOSE_WAIT
            clients.append(c)
        deadline = time.monotonic() + 5
        while fd_usage().stale < before.stale + 3:
            assert time.monotonic() < deadline, fd_usage()
            time.sleep(0.01)
        assert fd_usage().as_health()["stale_socket_fds"] >= 3
    finally:
        for c in clients:
            c.close()
        server.close()
    assert fd_usage().stale == before.stale
