"""``GET /api/events`` against the real ``wa-worker`` process (issue #15): every event type on the
simulator, a dropped connection resumed with ``Last-Event-ID`` (also across a kill -9 and a
restart) with nothing missed or repeated, and a client that reads nothing cut off while the
worker's memory stays flat."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from tests.conftest import wait_until
from tests.fakeproxy import SECRET, FakeProxy
from tests.proc import ROOT, start_worker, worker_env
from tests.sse import SseEvent, collect, read_events

TOKEN = "api-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NO_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_read=None)

pytestmark = pytest.mark.anyio


@contextlib.contextmanager
def _worker(tmp_path: Path, proxy: FakeProxy, **extra: Any) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    env = worker_env(tmp_path, proxy.url, API_TOKEN=TOKEN, **extra)
    proc = start_worker(env, ROOT, tmp_path / "worker.log")
    try:
        yield proc, f"http://127.0.0.1:{env['PORT']}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


async def _up(http: aiohttp.ClientSession, base: str) -> bool:
    try:
        async with http.get(f"{base}/health") as resp:
            return resp.status == 200
    except aiohttp.ClientError:
        return False


async def _wait_up(http: aiohttp.ClientSession, base: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    with anyio.fail_after(20):
        while not await _up(http, base):
            assert proc.poll() is None, f"the worker exited; see {log}"
            await anyio.sleep(0.05)


@contextlib.asynccontextmanager
async def _stream(http: aiohttp.ClientSession, base: str, headers: dict[str, str] | None = None,
                  query: str = "") -> AsyncIterator[aiohttp.ClientResponse]:
    async with http.get(f"{base}/api/events{query}", headers={**AUTH, **(headers or {})}) as resp:
        assert resp.status == 200, await resp.text()
        yield resp


async def _inbound(http: aiohttp.ClientSession, base: str, body: str, iid: str = "acme") -> None:
    async with http.post(f"{base}/simulator/instances/{iid}/inbound", json={"from": "5511988887777", "body": body},
                         headers={"Authorization": f"Bearer {SECRET}"}) as resp:
        assert resp.status < 300, await resp.text()


async def _until(resp: aiohttp.ClientResponse, done: Any, within: float = 15) -> list[SseEvent]:
    got: list[SseEvent] = []
    with anyio.fail_after(within):
        while not done(got):
            got += await collect(resp, 1)
    return got


def _body(ev: SseEvent) -> Any:
    return ev.json["payload"].get("body")


# long: one story across a drop, a kill -9 and a restart, checked at every step
async def test_resume_with_last_event_id_across_a_drop_and_a_kill_9(proxy: FakeProxy, tmp_path: Path) -> None:
    proxy.add_instance("acme")
    async with aiohttp.ClientSession(timeout=NO_TIMEOUT) as http:
        with _worker(tmp_path, proxy) as (proc, base):
            await _wait_up(http, base, proc, tmp_path / "worker.log")
            async with http.get(f"{base}/api/events") as resp:
                assert resp.status == 401  # auth required
            async with _stream(http, base, query="?since=0") as resp:
                seen = await _until(resp, lambda g: any(e.event == "status" and e.json["payload"]["status"]
                                                        == "CONNECTED" for e in g))
                for i in range(3):
                    await _inbound(http, base, f"before drop {i}")
                seen += await _until(resp, lambda g: sum(e.event == "inbound" for e in g) == 3)
                proxy.enqueue("acme", "m-1", "5511977776666", "hello")
                seen += await _until(resp, lambda g: any(e.event == "send" for e in g))
            # the connection dropped: what happens meanwhile is waiting in the journal
            last = seen[-1].seq
            assert [e.seq for e in seen] == list(range(1, last + 1))
            for i in range(5):
                await _inbound(http, base, f"while away {i}")
            proxy.enqueue("acme", "m-2", "5511977776666", "while away")
            await wait_until(lambda: "m-2" in proxy.sent_marks and len(proxy.inbound_ids()) == 8, timeout=15,
                             what="the events while away")
            async with _stream(http, base, {"Last-Event-ID": str(last)}) as resp:
                missed = await _until(resp, lambda g: len(g) >= 6)
                inbound_ids = proxy.inbound_ids()
                proxy.enqueue("acme", "m-3", "5511977776666", "live again")
                live = await _until(resp, lambda g: any(e.event == "send" for e in g))
            assert [e.seq for e in missed + live] == list(range(last + 1, last + 1 + len(missed) + len(live)))
            assert [_body(e) for e in missed if e.event == "inbound"] == [f"while away {i}" for i in range(5)]
            assert [e.json["payload"]["messageId"] for e in missed + live if e.event == "send"] == ["m-2", "m-3"]
            assert len(inbound_ids) == 8
            last = live[-1].seq
            pushed = len(proxy.statuses_of("acme"))
            proc.kill()  # kill -9: no goodbye, no DISCONNECTED event
            proc.wait(10)

        with _worker(tmp_path, proxy) as (proc, base):
            await _wait_up(http, base, proc, tmp_path / "worker.log")
            await wait_until(lambda: proxy.status_of("acme") == "CONNECTED" and len(proxy.statuses_of("acme")) > pushed,
                             timeout=20, what="acme resumed")
            for i in range(2):
                await _inbound(http, base, f"after restart {i}")
            async with _stream(http, base, {"Last-Event-ID": str(last)}) as resp:
                after = await _until(resp, lambda g: sum(e.event == "inbound" for e in g) == 2)
                # SIGTERM: the stream gets the shutdown status, then ends; the worker exits promptly
                t0 = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                with anyio.fail_after(10):
                    final = [ev async for ev in read_events(resp)]
                await anyio.to_thread.run_sync(proc.wait, 10)
                stopped_s = time.monotonic() - t0
            assert after[0].event == "status"  # the resumed session's status came first
            assert [e.seq for e in after] == list(range(last + 1, last + 1 + len(after)))
            assert [_body(e) for e in after if e.event == "inbound"] == ["after restart 0", "after restart 1"]
            assert [(e.event, e.json["payload"]["status"], e.json["payload"].get("reason")) for e in final] == [
                ("status", "DISCONNECTED", "shutdown")]
            assert final[0].seq == after[-1].seq + 1
            assert proc.returncode == 0 and stopped_s < 8


async def test_receipts_and_filters_on_the_real_process(proxy: FakeProxy, tmp_path: Path) -> None:
    proxy.add_instance("acme")
    proxy.add_instance("beta")
    async with aiohttp.ClientSession(timeout=NO_TIMEOUT) as http:
        with _worker(tmp_path, proxy) as (proc, base):
            await _wait_up(http, base, proc, tmp_path / "worker.log")
            await wait_until(lambda: proxy.status_of("acme") == proxy.status_of("beta") == "CONNECTED", timeout=20,
                             what="both connected")
            await _inbound(http, base, "to beta", iid="beta")
            proxy.enqueue("acme", "m-1", "5511977776666", "hello")
            await wait_until(lambda: "m-1" in proxy.sent_marks, timeout=15, what="m-1 sent")
            async with _stream(http, base, query="?since=0&types=send") as resp:
                [sent] = await _until(resp, lambda g: len(g) == 1)
            wa_id = sent.json["payload"]["wa_message_id"]
            async with http.post(f"{base}/simulator/instances/acme/receipt", json={"wa_message_id": wa_id,
                                 "status": "read"}, headers={"Authorization": f"Bearer {SECRET}"}) as r:
                assert r.status < 300
            await _inbound(http, base, "to acme")
            async with _stream(http, base, query="?since=0") as resp:
                everything = await _until(resp, lambda g: any(_body(e) == "to acme" for e in g))
            async with _stream(http, base, query="?since=0&types=send,receipt&instance=acme") as resp:
                acme = await _until(resp, lambda g: len(g) == 2)
            async with _stream(http, base, query="?since=0&instance=beta") as resp:
                beta = await _until(resp, lambda g: any(e.event == "inbound" for e in g))
    assert [e.seq for e in everything] == list(range(1, len(everything) + 1))
    assert [(e.event, e.json["payload"].get("status")) for e in acme] == [("send", "sent"), ("receipt", "read")]
    assert acme[1].json["payload"]["wa_message_id"] == wa_id
    expected_beta = [e.seq for e in everything if e.json["instanceId"] == "beta"]
    assert [e.seq for e in beta] == expected_beta[:len(beta)] and beta[-1].json["payload"]["body"] == "to beta"
    assert {e.json["instanceId"] for e in beta} == {"beta"} and {e.event for e in beta} == {"status", "inbound"}


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.slow
async def test_a_client_that_reads_nothing_is_cut_and_rss_stays_flat(proxy: FakeProxy, tmp_path: Path) -> None:
    proxy.add_instance("acme")
    body = "y" * 60_000
    async with aiohttp.ClientSession(timeout=NO_TIMEOUT) as http:
        with _worker(tmp_path, proxy, LOG_LEVEL="WARNING") as (proc, base):
            await _wait_up(http, base, proc, tmp_path / "worker.log")
            await wait_until(lambda: proxy.status_of("acme") == "CONNECTED", timeout=20, what="connected")
            for i in range(100):  # warm up: every buffer and cache the path uses, at this size
                await _inbound(http, base, body + str(i))
            await wait_until(lambda: len(proxy.inbound_ids()) == 100, timeout=30, what="warm-up delivered")
            before = _rss_kib(proc.pid)

            # a client that asks and never reads; a healthy one reads everything meanwhile
            slow = await anyio.connect_tcp("127.0.0.1", int(base.rsplit(":", 1)[1]))
            await slow.send(f"GET /api/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
            got: list[SseEvent] = []
            async with _stream(http, base, query="?types=inbound") as healthy:

                async def read_all() -> None:
                    got.extend(await _until(healthy, lambda g: len(g) >= 600, within=90))

                async with anyio.create_task_group() as tg:
                    tg.start_soon(read_all)
                    for i in range(600):  # 36 MB of events: a client's queue would hold it all if unbounded
                        await _inbound(http, base, body + f"-{i}")
            assert [_body(e) for e in got] == [body + f"-{i}" for i in range(600)]
            after = _rss_kib(proc.pid)
            with anyio.fail_after(10):  # the worker closed the slow client's connection
                with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, ConnectionResetError):
                    while await slow.receive(1 << 20):
                        pass
            await slow.aclose()
            async with http.get(f"{base}/health") as resp:
                health = await resp.json()
            assert health["events"]["slow_clients_cut"] == 1 and health["events"]["published"] >= 700
            assert "event stream cut" in (tmp_path / "worker.log").read_text()
            print(f"worker RSS {before / 1024:.1f} MiB before, {after / 1024:.1f} MiB after 36 MB of events")
            assert after - before < 16 * 1024, f"RSS grew {(after - before) / 1024:.1f} MiB"
