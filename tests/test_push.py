"""The push channel (issue #13): one ``GET /events`` long poll per worker wakes the
instance that has queued work, so queued → sent takes one round trip without
``/wake``; a proxy without ``/events`` keeps today's polling; a hostile answer
(huge, malformed, endless, instant) never hurts the worker. End to end on the
simulator with the real worker and a real loopback proxy."""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections import Counter
from typing import Any

import anyio
import pytest
from aiohttp import web

from tests.conftest import (FakeClock, connect, make_settings, running_worker, serving, stream_endlessly,
                            wait_until)
from tests.fakeproxy import SECRET, FakeProxy
from wa_worker.edge.client import EdgeClient, EdgeError
from wa_worker.edge.events import MAX_CURSOR_CHARS, MAX_EVENTS, parse_events
from wa_worker.instances import push as push_mod
from wa_worker.timing import Clock

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
        async with running_worker(settings, worker_id="w-a1b2c3d4") as w:
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
        assert all(q["worker_id"] == "w-a1b2c3d4" and q["wait"] == "25" for q in queries)
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
        # no worker id (leases off): no X-Worker-Id, the proxy answers for every instance
        assert proxy.events_queries and all(q["worker_id"] == "" for q in proxy.events_queries)
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
            if mode == "instant-events":
                # events that keep coming at once: calls spaced 0.1, 0.2, 0.4 … 2 s apart
                assert calls <= 3 + elapsed / 0.5, calls
                assert push_mod.EVENTS_MAX_GAP_S <= 2.0
            else:
                # errors and empty answers that do not wait back off from 1 s
                assert calls <= 4, calls
            if mode == "instant-events":
                assert w.push.live and w.push.events["leases"] >= 1
            elif mode in ("huge", "not-json", "endless"):
                assert not w.push.live and w.push.idle_cap() is None
            else:  # well-formed envelopes of nothing usable: answered, no instance woken, no cursor kept
                assert w.push.events["queued"] == 0 and w.push.cursor is None


async def test_a_cursor_the_proxy_refuses_is_dropped():
    seen: list[str | None] = []

    async def events(request: web.Request) -> web.Response:
        cursor = request.query.get("cursor")
        seen.append(cursor)
        if cursor is not None:
            return web.json_response({"error": "cursor must be one this proxy gave"}, status=400)
        await anyio.sleep(0.2)
        return web.json_response({"events": [{"type": "leases"}], "cursor": "from-another-proxy"})

    app = web.Application()
    app.router.add_get("/events", events)
    async with serving(app) as url:
        edge = EdgeClient(url, SECRET, timeout_s=1.0)
        renewals: list[int] = []
        channel = push_mod.PushChannel(edge, worker_id="w-1", clock=Clock(), on_queued=lambda _iid: None,
                                       on_leases=lambda: renewals.append(1), wait_s=1.0)
        try:
            with anyio.move_on_after(3.5):
                await channel.run()
        finally:
            await edge.aclose()
    # refused once, then asked again without it (a resync), never twice in a row with it
    assert seen[:3] == [None, "from-another-proxy", None], seen
    assert all(not (a and b) for a, b in zip(seen, seen[1:], strict=False)), seen
    assert len(renewals) >= 2 and channel.supported is True


async def _channel_against(handler: Any, clock: FakeClock, run_s: float, **kw: Any) -> push_mod.PushChannel:
    app = web.Application()
    app.router.add_get("/events", handler)
    async with serving(app) as url:
        edge = EdgeClient(url, SECRET, timeout_s=1.0)
        channel = push_mod.PushChannel(edge, worker_id=None, clock=clock, on_queued=lambda _iid: None, **kw)
        try:
            with anyio.move_on_after(run_s):
                await channel.run()
        finally:
            await edge.aclose()
    return channel


async def test_a_long_retry_after_never_makes_the_worker_unready():
    async def busy(request: web.Request) -> web.Response:
        return web.json_response({"error": "busy"}, status=503, headers={"Retry-After": "300"})

    clock = FakeClock()
    channel = await _channel_against(busy, clock, 0.5)
    assert clock.sleeps and max(clock.sleeps) == 60.0  # Retry-After honoured up to the backoff's cap
    assert channel.health.stale_after_s is not None and channel.health.stale_after_s >= 3 * 26
    assert not channel.health.stale(clock.monotonic()) and not channel.health.failing(clock.monotonic())


async def test_a_flapping_channel_wakes_every_instance_at_most_once_per_idle_cap():
    answers = itertools.count()

    async def flapping(request: web.Request) -> web.Response:
        if next(answers) % 2:
            return web.json_response({"error": "flap"}, status=500)
        return web.json_response({"events": [{"type": "leases"}], "cursor": "1"})

    clock = FakeClock()
    woken: list[float] = []
    channel = await _channel_against(flapping, clock, 1.0, on_lost=lambda: woken.append(clock.monotonic()),
                                     idle_poll_max_s=300.0)
    losses = next(answers) // 2
    elapsed = clock.monotonic() - 1_000_000.0  # fake seconds
    assert losses >= 10 and 1 <= len(woken) <= 1 + elapsed / 300, (losses, elapsed, woken)
    assert all(b - a >= 300 for a, b in zip(woken, woken[1:], strict=False)), woken
    assert channel.events["leases"] >= 10


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
