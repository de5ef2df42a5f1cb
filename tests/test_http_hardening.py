"""The worker's HTTP server against a hostile client, on the real ``wa-worker`` process.

Issue #8 item 3: idle connections used to exhaust the descriptor budget (and the
descriptor guard then restarted the worker, dropping every WhatsApp session),
slowloris connections stayed open forever, and a deeply nested /wake body was a
500 with a traceback.
"""

from __future__ import annotations

import resource
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from anyio.abc import SocketStream

from tests.conftest import AUTH, closed_within, wait_until
from tests.fakeproxy import SECRET, FakeProxy
from tests.proc import ROOT, start_worker, worker_env

pytestmark = pytest.mark.anyio

LOW_NOFILE = 256


def _nofile(limit: int) -> Callable[[], None]:
    def apply() -> None:  # runs in the child before exec: soft and hard, so the worker cannot raise it
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    return apply


@asynccontextmanager
async def worker_process(proxy: FakeProxy, tmp_path: Path, *, nofile: int | None = None,
                         ) -> AsyncIterator[tuple[Any, int, Path]]:
    env = worker_env(tmp_path, proxy.url)
    log_path = tmp_path / "worker.log"
    proc = start_worker(env, ROOT, log_path, preexec_fn=_nofile(nofile) if nofile else None)
    port = int(env["PORT"])
    try:
        async with httpx.AsyncClient(trust_env=False) as http:
            async def up() -> bool:
                try:
                    return (await http.get(f"http://127.0.0.1:{port}/health", timeout=1)).status_code == 200
                except httpx.HTTPError:
                    return False

            deadline = time.monotonic() + 20
            while not await up():
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "worker did not come up"
                await anyio.sleep(0.1)
        yield proc, port, log_path
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:  # in a thread: the fake proxy (this loop) must keep answering the worker's goodbyes
                await anyio.to_thread.run_sync(proc.wait, 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def _fresh_get(port: int, path: str = "/health", **kw: Any) -> httpx.Response:
    # a new client each time: a fresh connection, never one from a pool
    async with httpx.AsyncClient(trust_env=False) as http:
        return await http.get(f"http://127.0.0.1:{port}{path}", timeout=3, **kw)


@pytest.mark.slow
async def test_idle_connection_flood_neither_restarts_nor_drops_sessions(proxy, tmp_path):
    proxy.add_instance("acme")
    async with worker_process(proxy, tmp_path, nofile=LOW_NOFILE) as (proc, port, log_path):
        await wait_until(lambda: proxy.status_of("acme") == "CONNECTED", timeout=20, what="connected")
        statuses_before = len(proxy.statuses_of("acme"))
        streams: list[SocketStream] = []
        try:
            # 240 (95% of the budget: the old descriptor guard restarted the worker), then 60 more
            # (past the whole budget: the old server could no longer reach the proxy)
            for count in (240, 60):
                for _ in range(count):
                    try:
                        streams.append(await anyio.connect_tcp("127.0.0.1", port))
                    except OSError:
                        pass
                # hold them past a descriptor-guard round (every 5 s); both rounds: past the 10 s request timeout
                await anyio.sleep(6)
                assert proc.poll() is None, f"worker exited {proc.returncode}:\n{log_path.read_text()}"
            # every held connection has been closed by now: refused at once (over the cap) or cut (idle)
            closed = 0
            for s in streams:
                elapsed, _ = await closed_within(s, 0.05)
                closed += elapsed is not None
            assert closed == len(streams)
        finally:
            for s in streams:
                await s.aclose()
        r = await _fresh_get(port)
        assert r.status_code == 200
        body = r.json()
        assert body["instances"]["connected"] == 1
        process = body["process"]
        assert process["fd_limit"] == LOW_NOFILE
        assert process["socket_fds"] + process["file_fds"] == process["open_fds"]
        assert body["http"]["refused"] > 0 and body["http"]["timed_out"] > 0
        # the WhatsApp session was never dropped
        assert proxy.status_of("acme") == "CONNECTED"
        assert len(proxy.statuses_of("acme")) == statuses_before
        assert proc.poll() is None
        log_text = log_path.read_text()
        assert "restarting gracefully" not in log_text
        assert "Traceback" not in log_text


@pytest.mark.slow
async def test_slowloris_headers_and_bodies_are_cut(proxy, tmp_path):
    async with worker_process(proxy, tmp_path, nofile=1024) as (proc, port, log_path):
        opened: list[float] = []
        results: list[float | None] = []

        async def loris(first: bytes) -> None:
            stream = await anyio.connect_tcp("127.0.0.1", port)
            opened.append(time.monotonic())
            try:
                await stream.send(first)
                async with anyio.create_task_group() as tg:
                    async def drip() -> None:
                        while True:
                            await anyio.sleep(1)
                            try:
                                await stream.send(b"a")
                            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                                return

                    tg.start_soon(drip)
                    elapsed, _ = await closed_within(stream, 16)
                    results.append(elapsed)
                    tg.cancel_scope.cancel()
            finally:
                await stream.aclose()

        header_drip = b"GET /health HTTP/1.1\r\nHost: w\r\nX-Drip: "
        body_drip = (b"POST /wake HTTP/1.1\r\nHost: w\r\nAuthorization: Bearer " + SECRET.encode()
                     + b"\r\nContent-Type: application/json\r\nContent-Length: 64\r\n\r\n")
        t0 = time.monotonic()
        async with anyio.create_task_group() as tg:
            for _ in range(180):
                tg.start_soon(loris, header_drip)
            for _ in range(20):
                tg.start_soon(loris, body_drip)
        assert len(results) == 200
        assert all(r is not None for r in results), f"{results.count(None)} of 200 still open after 16 s"
        closed = [r for r in results if r is not None]
        print(f"slowloris: 200 connections closed after {min(closed):.1f} to {max(closed):.1f} s")
        assert max(closed) < 15
        assert time.monotonic() - t0 < 20
        assert proc.poll() is None
        assert (await _fresh_get(port)).status_code == 200


async def test_wake_bodies_that_do_not_decode_are_400(proxy, tmp_path):
    async with worker_process(proxy, tmp_path) as (proc, port, log_path):
        base = f"http://127.0.0.1:{port}"
        bad = {
            "nested 30000 deep": b"[" * 30000 + b"]" * 30000,
            "nested object": b'{"instanceId": ' + b'{"a":' * 10000 + b"1" + b"}" * 10001,
            "not UTF-8": b'{"instanceId": "\xff\xfe"}',
            "huge number": b'{"instanceId": 1' + b"0" * 5000 + b"}",
            "NaN": b'{"instanceId": NaN}',
            "an array": b"[]",
        }
        async with httpx.AsyncClient(trust_env=False) as http:
            for what, body in bad.items():
                r = await http.post(base + "/wake", headers={**AUTH, "Content-Type": "application/json"},
                                    content=body, timeout=5)
                assert r.status_code == 400, (what, r.status_code, r.text)
                assert r.json()["error"], what
            r = await http.post(base + "/wake", headers=AUTH, content=b"[" * 30000 + b"]" * 30000)
            assert "nested" in r.json()["error"]
            r = await http.post(base + "/wake", headers=AUTH, content=b" " * (65 * 1024))
            assert r.status_code == 413
            # a bearer token that is not UTF-8 is a plain 401
            r = await http.post(base + "/wake", headers={"Authorization": b"Bearer \xff\xfe"}, json={})
            assert r.status_code == 401
            r = await http.post(base + "/wake", headers=AUTH, json={})
            assert r.status_code == 202
        assert proc.poll() is None
        log_text = log_path.read_text()
        assert "Traceback" not in log_text and "Error handling request" not in log_text
