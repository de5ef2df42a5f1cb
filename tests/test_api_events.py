"""The live event stream (issue #15): ``GET /api/events`` over the real worker (in process, the
simulator, a loopback proxy); the process-level cases (resume across kill -9, a slow client
and the worker's RSS) are in tests/test_api_events_proc.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import anyio.lowlevel
import pytest

from wa_worker.api import events_routes
from wa_worker.events import EventLog
from wa_worker.storage.journal import EventRow, Journal, JournalWriteError

from tests.conftest import SECRET, make_settings, running_worker, serving, wait_until
from tests.fakeproxy import FakeProxy
from tests.sse import SseEvent, collect, read_events

TOKEN = "api-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
WORKER_AUTH = {"Authorization": f"Bearer {SECRET}"}

pytestmark = pytest.mark.anyio


async def _post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict[str, Any]:
    async with http.post(url, json=body, headers=WORKER_AUTH) as resp:
        data = await resp.json(content_type=None)
        assert resp.status < 300, (url, resp.status, data)
        return data  # type: ignore[no-any-return]


async def test_stream_carries_status_inbound_send_and_receipt(tmp_path: Path) -> None:
    proxy = FakeProxy()
    proxy.add_instance("acme")
    async with serving(proxy.app()) as url:
        settings = make_settings(tmp_path, url, API_TOKEN=TOKEN, SIMULATOR_AUTO_SCAN_MS=300)
        async with running_worker(settings) as worker, aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{worker.port}"
            async with http.get(f"{base}/api/events?since=0", headers=AUTH) as resp:
                assert resp.status == 200 and resp.content_type == "text/event-stream"
                got: list[SseEvent] = []
                with anyio.fail_after(10):
                    async for ev in read_events(resp):
                        got.append(ev)
                        if ev.event == "status" and ev.json["payload"]["status"] == "CONNECTED":
                            break
                qr = [e for e in got if e.json["payload"]["status"] == "CONNECTING"]
                assert qr and qr[0].json["payload"]["qr_code"].startswith("data:image/png;base64,")
                assert got[-1].json["instanceId"] == "acme" and got[-1].json["type"] == "status"

                sim = f"{base}/simulator/instances/acme"
                await _post(http, f"{sim}/inbound", {"from": "5511988887777", "body": "hello stream"})
                with anyio.fail_after(10):
                    [inbound] = await collect(resp, 1)
                assert inbound.event == "inbound"
                assert inbound.json["payload"]["body"] == "hello stream"
                assert inbound.json["payload"]["instanceId"] == "acme"
                assert not any(k.startswith("_") for k in inbound.json["payload"])

                proxy.enqueue("acme", "m-1", "5511977776666", "hi there")
                worker.wake("acme")
                with anyio.fail_after(10):
                    [sent] = await collect(resp, 1)
                assert sent.event == "send"
                wa_id = sent.json["payload"]["wa_message_id"]
                assert sent.json["payload"] == {"messageId": "m-1", "status": "sent", "wa_message_id": wa_id,
                                                "to": "5511977776666@s.whatsapp.net"}
                await _post(http, f"{sim}/receipt", {"wa_message_id": wa_id, "status": "read"})
                with anyio.fail_after(10):
                    [receipt] = await collect(resp, 1)
                assert receipt.event == "receipt"
                assert receipt.json["payload"]["wa_message_id"] == wa_id
                assert receipt.json["payload"]["status"] == "read"

                await _post(http, f"{sim}/fail-sends", {"count": 1})
                proxy.enqueue("acme", "m-2", "5511977776666", "this one fails")
                worker.wake("acme")
                with anyio.fail_after(10):
                    [failed] = await collect(resp, 1)
                assert failed.json["payload"]["status"] == "failed"
                assert failed.json["payload"]["messageId"] == "m-2" and failed.json["payload"]["error_code"]
                seqs = [e.seq for e in (*got, inbound, sent, receipt, failed)]
                assert seqs == list(range(1, len(seqs) + 1))  # since=0: every event, in order


async def _open(http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
                ) -> aiohttp.ClientResponse:
    resp = await http.get(url, headers={**AUTH, **(headers or {})})
    assert resp.status == 200, await resp.text()
    return resp


# long: one worker, the resume rules one after the other
async def test_resume_filters_reset_and_auth(tmp_path: Path) -> None:
    proxy = FakeProxy()
    async with serving(proxy.app()) as url:
        settings = make_settings(tmp_path, url, API_TOKEN=TOKEN)
        async with running_worker(settings) as worker, aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{worker.port}"
            events = worker.event_log
            assert events is not None
            # auth first: no token, the worker secret, a wrong token
            for headers in ({}, WORKER_AUTH, {"x-api-key": TOKEN + "x"}):
                async with http.get(f"{base}/api/events", headers=headers) as resp:
                    assert resp.status == 401
                    assert (await resp.json())["error"]["code"] == "unauthorized"
            for query in ("types=status,bogus", "instance=../x", "since=abc", "since=-1"):
                async with http.get(f"{base}/api/events?{query}", headers=AUTH) as resp:
                    assert resp.status == 400, query
                    assert (await resp.json())["error"]["code"] == "bad_request"

            for i in range(30):
                events.publish("inbound" if i % 2 else "status", f"i{i % 3}", {"n": i})
            # a client that had up to 10 gets 11..30, then live ones, exactly once
            resp = await _open(http, f"{base}/api/events", {"Last-Event-ID": "10"})
            with anyio.fail_after(5):
                replayed = await collect(resp, 20)
            events.publish("status", "i0", {"n": 30})
            with anyio.fail_after(5):
                [live] = await collect(resp, 1)
            assert [e.seq for e in replayed] + [live.seq] == list(range(11, 32))
            assert [e.json["payload"]["n"] for e in replayed] == list(range(10, 30))
            resp.close()
            # filters: repeated and comma-separated instances, types; replay and live alike
            resp = await _open(http, f"{base}/api/events?since=0&instance=i0&instance=i1,nope&types=inbound")
            with anyio.fail_after(5):
                got = await collect(resp, 7)  # inbound = odd n, i0/i1 = n % 3 in (0, 1)
            assert [e.json["payload"]["n"] for e in got] == [n for n in range(30) if n % 2 and n % 3 < 2][:7]
            events.publish("inbound", "i2", {"n": 100})  # filtered out
            events.publish("status", "i1", {"n": 101})  # filtered out
            events.publish("inbound", "i1", {"n": 102})
            with anyio.fail_after(5):
                rest = await collect(resp, 4)
            assert [e.json["payload"]["n"] for e in rest] == [n for n in range(30) if n % 2 and n % 3 < 2][7:] + [102]
            resp.close()
            # ?since= and Last-Event-ID: the header wins (EventSource's reconnect keeps the URL)
            resp = await _open(http, f"{base}/api/events?since=2", {"Last-Event-ID": "32"})
            with anyio.fail_after(5):
                [first] = await collect(resp, 1)
            assert first.seq == 33
            resp.close()
            # a position the journal no longer covers: reset first, then all that is kept
            worker.journal.prune_events(before=0, keep_rows=5)
            resp = await _open(http, f"{base}/api/events?since=3")
            with anyio.fail_after(5):
                got = await collect(resp, 6)
            assert got[0].event == "reset" and got[0].id is None
            assert got[0].json == {"reason": "expired", "requested": 3, "oldest": 30}
            assert [e.seq for e in got[1:]] == list(range(30, 35))
            resp.close()
            resp = await _open(http, f"{base}/api/events?since=999")
            with anyio.fail_after(5):
                [reset] = await collect(resp, 1)
            assert reset.json["reason"] == "unknown"
            resp.close()
            assert worker.health()["events"]["last_seq"] == 34


async def test_seam_between_replay_and_live_has_no_gap_nor_repeat(tmp_path: Path, monkeypatch) -> None:
    """Events keep coming while a client replays several pages: each number arrives once, in order."""
    monkeypatch.setattr(events_routes, "REPLAY_PAGE", 7)
    proxy = FakeProxy()
    async with serving(proxy.app()) as url:
        async with running_worker(make_settings(tmp_path, url, API_TOKEN=TOKEN)) as worker, \
                aiohttp.ClientSession() as http:
            events = worker.event_log
            assert events is not None
            for i in range(100):
                events.publish("inbound", "x", {"n": i})

            async def producer() -> None:
                for i in range(100, 400):
                    events.publish("inbound", "x", {"n": i})
                    if i % 5 == 0:
                        await anyio.lowlevel.checkpoint()

            resp = await _open(http, f"http://127.0.0.1:{worker.port}/api/events?since=0")
            async with anyio.create_task_group() as tg:
                tg.start_soon(producer)
                with anyio.fail_after(15):
                    got = await collect(resp, 400)
            assert [e.seq for e in got] == list(range(1, 401))
            resp.close()


async def test_slow_client_is_cut_and_shutdown_ends_streams(tmp_path: Path) -> None:
    proxy = FakeProxy()
    async with serving(proxy.app()) as url:
        async with running_worker(make_settings(tmp_path, url, API_TOKEN=TOKEN)) as worker:
            events = worker.event_log
            assert events is not None
            # a client that sends its request and never reads
            stream = await anyio.connect_tcp("127.0.0.1", worker.port)
            await stream.send(f"GET /api/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
                              .encode())
            await wait_until(lambda: events.streams == 1, what="the stream open")
            big = {"body": "x" * 8000}
            for _ in range(3000):  # ~24 MB: far beyond socket buffers and the client's 1000-event queue
                events.publish("inbound", "x", big)
                if events.streams == 0:
                    break
                await anyio.lowlevel.checkpoint()
            assert events.streams == 0 and events.slow_clients_cut == 1
            assert worker.health()["events"]["slow_clients_cut"] == 1
            assert b"wa_worker_events_slow_clients_cut_total 1.0" in worker.metrics.render()
            # its connection is closed by the worker (read what was buffered, then EOF or a reset)
            with anyio.fail_after(10):
                while True:
                    try:
                        await stream.receive(1 << 20)
                    except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionResetError):
                        break
            await stream.aclose()

            # a healthy stream is ended promptly by the worker's stop
            async with aiohttp.ClientSession() as http:
                resp = await _open(http, f"http://127.0.0.1:{worker.port}/api/events")
                await wait_until(lambda: events.streams == 1, what="the stream open")
                started = anyio.current_time()
                worker.request_stop()
                with anyio.fail_after(5):
                    async for _ in read_events(resp):
                        pass
                assert anyio.current_time() - started < 4


async def test_guard_does_not_cut_a_quiet_stream(tmp_path: Path, monkeypatch) -> None:
    """The connection guard closes connections without a complete request within its timeout; a stream is
    a request being answered: it lives on (keep-alive comments keep proxies in between from idling it out)."""
    monkeypatch.setattr(events_routes, "KEEPALIVE_S", 0.3)
    proxy = FakeProxy()
    async with serving(proxy.app()) as url:
        async with running_worker(make_settings(tmp_path, url, API_TOKEN=TOKEN)) as worker, \
                aiohttp.ClientSession() as http:
            worker.http_guard.request_timeout_s = 0.5
            events = worker.event_log
            assert events is not None
            resp = await _open(http, f"http://127.0.0.1:{worker.port}/api/events")
            comments = 0
            with anyio.fail_after(10):
                async for raw in resp.content:
                    comments += raw.startswith(b": keep-alive")
                    if comments >= 6:  # 1.8 s: more than three guard timeouts
                        break
            events.publish("status", "late", {"ok": True})
            with anyio.fail_after(5):
                [ev] = await collect(resp, 1)
            assert ev.json["payload"] == {"ok": True}
            resp.close()


class _FailingJournal(Journal):
    """A journal whose event writes fail while ``broken`` (a full disk, for the event log alone)."""

    broken = False

    def add_events(self, rows: Any) -> None:
        if self.broken:
            self.writable = False
            raise JournalWriteError("disk full")
        super().add_events(rows)


def test_event_log_keeps_events_the_journal_refuses(tmp_path: Path, caplog) -> None:
    journal = _FailingJournal(tmp_path / "j.db")
    log = EventLog(journal)
    log.publish("status", "a", {"n": 1})
    journal.broken = True
    for n in range(2, 6):
        log.publish("status", "a", {"n": n})  # never raises
    assert log.unrecorded == 4 and log.lost == 0
    assert sum("refused events" in r.message for r in caplog.records) == 1  # logged once
    # meanwhile a resume reads them from memory, in order
    assert [r.seq for r in log.replay(0, 100)] == [1, 2, 3, 4, 5]
    journal.broken = False
    journal.writable = True  # the store's probe
    log.publish("status", "a", {"n": 6})
    assert [json.loads(r.data)["n"] for r in journal.events_after(0, 100)] == [1, 2, 3, 4, 5, 6]
    assert log.stats()["pending"] == 0
    # numbers survive pruning and a restart: never given twice
    journal.prune_events(before=1e18, keep_rows=0)
    journal.close()
    again = EventLog(Journal(tmp_path / "j.db"))
    again.publish("status", "a", {"n": 7})
    assert again.last_seq == 7
    assert again.resume_point(6) == (6, None) and again.resume_point(2) == (6, "expired")


def test_event_log_bounds_memory_and_unencodable_payloads(tmp_path: Path) -> None:
    journal = _FailingJournal(tmp_path / "j.db")
    log = EventLog(journal, pending_max=3)
    journal.broken = True
    for n in range(10):
        log.publish("status", "a", {"n": n})
    assert log.stats()["pending"] == 3 and log.lost == 7
    journal.broken = False
    journal.writable = True
    log.flush()
    assert [r.seq for r in journal.events_after(0, 100)] == [8, 9, 10]
    log.publish("status", "a", {"obj": object()})  # default=str: recorded as its text
    assert log.last_seq == 11
    log.publish("status", "a", {"bad": float("nan")})  # no valid JSON for it: counted, logged, never raised
    assert log.last_seq == 11 and log.lost == 8


async def test_streams_are_capped(tmp_path: Path) -> None:
    from wa_worker.api.app import build_api_app  # the sub-app alone, served as the worker mounts it

    events = EventLog(Journal(tmp_path / "j.db"))
    api = build_api_app((TOKEN,), per_minute=600)
    events_routes.add_event_routes(api, events, max_streams=1)
    async with serving(api) as url, aiohttp.ClientSession() as http:
        first = await _open(http, f"{url}/events")
        await wait_until(lambda: events.streams == 1, what="the first stream")
        async with http.get(f"{url}/events", headers=AUTH) as resp:
            assert resp.status == 503 and resp.headers["Retry-After"] == "5"
            assert (await resp.json())["error"]["code"] == "too_many_streams"
        first.close()
        await wait_until(lambda: events.streams == 0, what="the first stream closed")
        second = await _open(http, f"{url}/events")
        second.close()


async def test_without_api_token_no_event_is_recorded(tmp_path: Path) -> None:
    proxy = FakeProxy()
    proxy.add_instance("acme")
    async with serving(proxy.app()) as url:
        settings = make_settings(tmp_path, url, SIMULATOR_AUTO_SCAN_MS=50)
        async with running_worker(settings) as worker, aiohttp.ClientSession() as http:
            assert worker.event_log is None and "events" not in worker.health()
            await wait_until(lambda: proxy.status_of("acme") == "CONNECTED", what="connected")
            await _post(http, f"http://127.0.0.1:{worker.port}/simulator/instances/acme/inbound",
                        {"from": "5511988887777", "body": "not recorded"})
            await wait_until(lambda: proxy.inbound_ids(), what="the message delivered")
            assert worker.journal.events_after(0, 10) == []
            assert worker.journal.event_seq_bounds() == (None, 0)


def test_prune_keeps_the_window_and_the_row_cap(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.db")
    journal.add_events([EventRow(seq, float(seq), "a", "status", "{}") for seq in range(1, 11)])
    assert journal.prune_events(before=4.5, keep_rows=100) == 4  # at 1..4 are older
    assert [r.seq for r in journal.events_after(0, 100)] == list(range(5, 11))
    assert journal.prune_events(before=0, keep_rows=3) == 3
    assert [r.seq for r in journal.events_after(0, 100)] == [8, 9, 10]
    assert journal.prune_events(before=1e18, keep_rows=100) == 3  # all expired
    assert journal.event_seq_bounds() == (None, 10)  # the numbering survives


async def test_a_prune_during_a_replay_is_said_not_skipped(tmp_path: Path, monkeypatch) -> None:
    """The client reads page 1 while the housekeeping prunes what page 2 would have been."""
    monkeypatch.setattr(events_routes, "REPLAY_PAGE", 5)
    events = EventLog(Journal(tmp_path / "j.db"))
    for n in range(30):
        events.publish("status", "a", {"n": n})

    class Client:  # the stream's writer: what the client received, the prune while page 1 is sent
        def __init__(self) -> None:
            self.received = b""

        async def write(self, data: bytes) -> None:
            if not self.received:
                events.journal.prune_events(before=0, keep_rows=10)  # 21..30 left
            self.received += data

    client = Client()
    with events.subscribe() as sub:
        cursor = await events_routes._replay(client, events, sub, 0)
    frames = [f for f in client.received.decode().split("\n\n") if f]
    assert [f.split("\n")[0] for f in frames] == [f"id: {n}" for n in range(1, 6)] + ["event: reset"] + [
        f"id: {n}" for n in range(21, 31)]
    assert json.loads(frames[5].split("data: ", 1)[1]) == {"reason": "expired", "requested": 5, "oldest": 21}
    assert cursor == 30
