"""The push channel (issue #13): one ``GET /events`` long poll per worker wakes the
instance that has queued work, so queued → sent takes one round trip without
``/wake``; a proxy without ``/events`` keeps today's polling; a hostile answer
(huge, malformed, endless, instant) never hurts the worker. End to end on the
simulator with the real worker and a real loopback proxy."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from typing import Any

import anyio
import pytest
from aiohttp import web

from tests.conftest import connect, make_settings, running_worker, serving, stream_endlessly, wait_until
from tests.fakeproxy import SECRET, FakeProxy
from wa_worker.edge.client import EdgeClient, EdgeError
from wa_worker.edge.events import MAX_CURSOR_CHARS, MAX_EVENTS, parse_events
from wa_worker.instances import push as push_mod

pytestmark = pytest.mark.anyio

ALICE = "5511988887777"
# polls so slow that only a push (or a /wake) can explain a prompt send
SLOW_POLLS = dict(MSG_POLL_MS=60_000, MSG_POLL_MAX_MS=60_000)


async def _events_proxy(**kw: Any) -> FakeProxy:
    return await FakeProxy(events=True, events_wait_cap_s=2.0, **kw).start()


@pytest.mark.parametrize("batch", [False, True], ids=["per-instance", "batch"])
async def test_queued_is_sent_in_one_round_trip_without_wake(tmp_path, batch):
    proxy = await _events_proxy(batch=batch)
    try:
        proxy.add_instance("acme")
        settings = make_settings(tmp_path, proxy.url, BATCH_POLL=batch, **SLOW_POLLS)
        async with running_worker(settings) as w:
            await connect(w, proxy)
            await wait_until(lambda: w.push.live, what="push channel live")
            polls_before = proxy.calls["queued-messages"]
            proxy.enqueue("acme", "m1", ALICE, "hello")
            await wait_until(lambda: "m1" in proxy.sent_marks, timeout=3, what="m1 sent after its push")
            latency = proxy.sent_at["m1"] - proxy.enqueued_at["m1"]
            assert latency < 1.0, latency
            # one poll fetched it: the push woke exactly the poll that was needed
            assert proxy.calls["queued-messages"] - polls_before <= 2
            assert [r["to"] for r in w.backend.sent("acme")] == [f"{ALICE}@s.whatsapp.net"]
            assert w.push.events["queued"] >= 1
        queries = proxy.events_queries
        assert all(q["worker_id"] == w.worker_id and q["wait"] == "25" for q in queries)
        assert any("cursor" in q for q in queries[1:]), "the next call carries the previous answer's cursor"
    finally:
        await proxy.stop()


async def test_a_leases_event_asks_for_a_renewal_now(tmp_path):
    proxy = await _events_proxy()
    try:
        settings = make_settings(tmp_path, proxy.url)
        renewals: list[float] = []
        async with running_worker(settings) as w:
            w.push.on_leases = lambda: renewals.append(time.monotonic())
            await wait_until(lambda: w.push.live, what="push channel live")
            proxy.push_event({"type": "leases"})
            await wait_until(lambda: renewals, timeout=2, what="a lease renewal asked for")
    finally:
        await proxy.stop()


async def test_idle_polls_back_off_further_while_push_is_live_and_not_after(tmp_path):
    proxy = await _events_proxy()
    try:
        proxy.add_instance("acme")
        settings = make_settings(tmp_path, proxy.url, BATCH_POLL=False, MSG_POLL_MS=50, MSG_POLL_MAX_MS=200)
        async with running_worker(settings) as w:
            w.push.idle_poll_max_s = 1.6  # PUSH_IDLE_POLL_MAX_S, scaled down
            await connect(w, proxy)
            runner = w.manager.runners["acme"]
            # past MSG_POLL_MAX_MS (0.2 s): the push channel stands for the missing polls
            await wait_until(lambda: runner.poll_interval.current_s > 0.5, timeout=5, what="idle polls back off")
            proxy.fail["events"] = 10_000  # the channel stops answering
            await wait_until(lambda: not w.push.live, timeout=5, what="push lost")
            await wait_until(lambda: runner.poll_interval.current_s <= 0.2, timeout=3,
                             what="polls back at their usual cap")
            proxy.enqueue("acme", "m1", ALICE, "polled")
            await wait_until(lambda: "m1" in proxy.sent_marks, timeout=3, what="m1 sent by polling")
    finally:
        await proxy.stop()


async def test_a_proxy_without_events_keeps_todays_polling(proxy, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    proxy.add_instance("acme")
    settings = make_settings(tmp_path, proxy.url, BATCH_POLL=False)
    async with running_worker(settings) as w:
        await connect(w, proxy)
        await wait_until(lambda: w.push.supported is False, what="push switched off")
        proxy.enqueue("acme", "m1", ALICE, "polled")
        await wait_until(lambda: "m1" in proxy.sent_marks, timeout=3, what="m1 sent by polling")
        assert w.push.health.finished and not w.push.live and w.push.idle_cap() is None
        assert w.health()["edge"]["push"] is False
    infos = [r for r in caplog.records if r.levelno >= logging.INFO and "events" in r.getMessage()]
    assert len(infos) == 1 and "has no GET /events" in infos[0].getMessage(), [r.getMessage() for r in infos]


# ---------------------------------------------------------------------- hostile answers


def _hostile_app(proxy: FakeProxy, mode: str) -> web.Application:
    app = proxy.app()
    calls: Counter[str] = proxy.calls

    async def events(request: web.Request) -> web.StreamResponse:
        calls["events"] += 1
        if mode == "huge":
            return web.Response(body=b'{"events": [' + b'{"type": "queued", "instanceId": "acme"},' * 200_000
                                + b'{}]}', content_type="application/json")
        if mode == "not-json":
            return web.Response(body=[b"not json", b'{"events": "x"}', b"[1, 2]"][calls["events"] % 3],
                                content_type="application/json")
        if mode == "garbage-events":
            bodies = [json.dumps({"events": [1, None, {"type": 7}, {"type": "queued", "instanceId": "../etc"}],
                                  "cursor": "c" * 100_000}).encode(),
                      b'{"events": [{"type": "queued", "instanceId": []}], "cursor": 1e999}']
            return web.Response(body=bodies[calls["events"] % 2], content_type="application/json")
        if mode == "endless":
            return await stream_endlessly(request, 200, pause_s=0.05, chunk=b'{"events": [' * 64, limit_s=8)
        if mode == "instant-events":
            return web.json_response({"events": [{"type": "queued", "instanceId": "acme"}, {"type": "leases"}]})
        return web.json_response({"events": []})  # instant-empty: ignores ?wait=

    app.router.add_get("/events", events)
    return app


@pytest.mark.parametrize("mode", ["huge", "not-json", "garbage-events", "endless", "instant-events",
                                  "instant-empty"])
async def test_a_hostile_events_answer_never_hurts_the_worker(tmp_path, mode):
    proxy = FakeProxy()
    proxy.add_instance("acme")
    async with serving(_hostile_app(proxy, mode)) as url:
        proxy.url = url
        settings = make_settings(tmp_path, url, BATCH_POLL=False)
        async with running_worker(settings) as w:
            await connect(w, proxy)
            t0 = time.monotonic()
            proxy.enqueue("acme", "m1", ALICE, "still polled")
            await wait_until(lambda: "m1" in proxy.sent_marks, timeout=3, what="m1 sent by polling")
            await anyio.sleep(max(0.0, 3.0 - (time.monotonic() - t0)))
            elapsed = time.monotonic() - t0
            # the worker stays ready and its push loop never crashed
            assert not w.push.health.failing(w.clock.monotonic()), w.push.health.describe(w.clock.monotonic())
            assert w.push.health.failures == 0
            assert not [r for r in w.not_ready_reasons() if "push" in r]
            assert w.health()["status"] == "ok"
            calls = proxy.calls["events"]
            if mode in ("instant-events",):
                # events come back without waiting: never more than one call per EVENTS_MIN_GAP_S
                assert calls <= (elapsed + 1) / push_mod.EVENTS_MIN_GAP_S + 2, calls
            else:
                # errors and empty answers that do not wait back off from 1 s
                assert calls <= 4, calls
            if mode == "instant-events":
                assert w.push.live and w.push.events["leases"] >= 1
            elif mode in ("huge", "not-json", "endless"):
                assert not w.push.live and w.push.idle_cap() is None
            else:  # well-formed envelopes of nothing usable: answered, no instance woken, no cursor kept
                assert w.push.events["queued"] == 0 and w.push.cursor is None


async def test_the_events_call_deadline_is_wait_plus_the_edge_timeout():
    async def endless(request: web.Request) -> web.StreamResponse:
        return await stream_endlessly(request, 200, pause_s=0.05, chunk=b" ", limit_s=10)

    app = web.Application()
    app.router.add_get("/events", endless)
    async with serving(app) as url:
        edge = EdgeClient(url, SECRET, timeout_s=1.0)
        try:
            t0 = time.monotonic()
            with pytest.raises(EdgeError, match="timed out"):
                await edge.events(wait_s=1.0, cursor=None, worker_id="w-1")
            assert 1.8 < time.monotonic() - t0 < 4.0
        finally:
            await edge.aclose()


def test_the_events_reader_is_tolerant_and_bounded():
    rejected: list[str] = []
    answer = parse_events({"events": [{"type": "queued", "instanceId": "a"}, {"type": "queued", "instanceId": "a"},
                                      {"type": "queued"}, {"type": "future-kind", "x": 1}, "junk",
                                      {"type": "leases"}], "cursor": 42, "extra": True}, rejected)
    assert answer is not None
    assert answer.queued == {"a"} and answer.leases and answer.cursor == "42"
    assert sorted(rejected) == ["invalid_event", "invalid_instance_id"]
    rejected = []
    many = parse_events({"events": [{"type": "queued", "instanceId": f"i{n}"} for n in range(MAX_EVENTS + 5)],
                         "cursor": "x" * (MAX_CURSOR_CHARS + 1)}, rejected)
    assert many is not None and len(many.queued) == MAX_EVENTS and many.cursor is None
    assert sorted(rejected) == ["invalid_cursor", "too_many_events"]
    assert parse_events([], []) is None and parse_events({"events": {}}, []) is None
    empty = parse_events({"events": []}, [])
    assert empty is not None and empty.empty
