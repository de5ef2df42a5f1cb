"""Cost and latency: adaptive polling on a fake clock, reconnect backoff, wake-ups,
batch polling detection, bounded connect, fair start-up."""

from __future__ import annotations

import itertools
import time

import anyio
import httpx
import pytest

from tests.conftest import AUTH, FakeClock, make_settings, running_worker, wait_until
from tests.fakeproxy import FakeProxy

pytestmark = pytest.mark.anyio



async def test_outbound_poll_interval_doubles_to_cap_and_snaps_back(proxy, tmp_path):
    proxy.add_instance("acme")
    polls: list[float] = []
    clock = FakeClock(tick_s=0.002)
    proxy.on_queue_call = lambda iid: polls.append(clock.now)
    settings = make_settings(tmp_path, proxy.url, MSG_POLL_MS=2000, MSG_POLL_MAX_MS=30000,
                             INSTANCE_POLL_MS=10_000, INSTANCE_POLL_MAX_MS=10_000, SIMULATOR_AUTO_SCAN_MS=0,
                             BATCH_POLL=False)
    async with running_worker(settings, clock=clock) as w:
        await wait_until(lambda: len(polls) >= 9, what="9 polls")
        gaps = [round(b - a, 1) for a, b in itertools.pairwise(polls[:9])]
        # each gap is the interval chosen after an empty poll (other owners' waits interleave in fake time,
        # so compare the runner's own interval history)
        runner = w.manager.runners["acme"]
        assert runner.poll_interval.current_s == 30.0
        intervals = [x for x in clock.waits if x in (2.0, 4.0, 8.0, 16.0, 30.0)]
        first = intervals.index(2.0)
        assert intervals[first:first + 6] == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0], clock.waits[:40]
        # in fake time a gap is the runner's own wait plus whatever other loops waited meanwhile, so it is
        # never shorter than the interval chosen: the runner never polls early
        for gap, interval in zip(gaps, [2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0], strict=True):
            assert gap >= interval, (gaps, polls[:9])
        # an inbound message is activity: the next poll interval is the floor again
        await w.backend.session("acme").receive("5511988887777", "oi")
        await wait_until(lambda: runner.poll_interval.current_s <= 4.0, what="snap back")
        n = len(clock.waits)
        await wait_until(lambda: len(clock.waits) > n + 3)
        assert 2.0 in clock.waits[n:]
        # a non-empty poll is activity too
        await wait_until(lambda: runner.poll_interval.current_s == 30.0)
        n = len(clock.waits)
        proxy.enqueue("acme", "m1", "5511988887777", "x")
        await wait_until(lambda: "m1" in proxy.sent_marks, timeout=10)
        await wait_until(lambda: 2.0 in clock.waits[n:], what="floor after a non-empty poll")


async def test_discovery_interval_grows_when_nothing_changes(proxy, tmp_path):
    clock = FakeClock(tick_s=0.002)
    settings = make_settings(tmp_path, proxy.url, INSTANCE_POLL_MS=10_000, INSTANCE_POLL_MAX_MS=60_000)
    async with running_worker(settings, clock=clock) as w:
        await wait_until(lambda: proxy.calls["disconnected-instances"] >= 6)
        assert w.manager.discovery_interval.current_s == 60.0
        assert [x for x in clock.waits if x >= 10][:4] == [10.0, 20.0, 40.0, 60.0]
        n = len(clock.waits)
        proxy.add_instance("new-one")
        await wait_until(lambda: "new-one" in w.manager.runners)
        await wait_until(lambda: 10.0 in clock.waits[n:], what="discovery snapped back to its floor")


async def test_reconnect_backoff_grows_then_resets(proxy, tmp_path):
    clock = FakeClock(tick_s=0.002)
    proxy.add_instance("acme")
    settings = make_settings(tmp_path, proxy.url, SIMULATOR_AUTO_SCAN_MS=0)
    async with running_worker(settings, clock=clock) as w:
        await wait_until(lambda: proxy.status_of("acme") == "CONNECTED")
        runner = w.manager.runners["acme"]
        w.backend.fail_connects["acme"] = 6
        n = len(clock.waits)
        await w.backend.session("acme").drop()
        # other loops wait at most 0.4 s in this configuration; backoff waits are >= 0.5 s
        await wait_until(lambda: runner.state.value == "connected" and runner.reconnects == 7, timeout=15)
        seen = [x for x in clock.waits[n:] if x >= 0.5]
        assert len(seen) == 7, seen
        for i, d in enumerate(seen):
            raw = min(60.0, 2.0**i)
            assert raw / 2 <= d <= raw, (i, seen)
        assert [s["reason"] for s in proxy.statuses_of("acme") if s["status"] == "DISCONNECTED"][:2] == [
            "network", "connect_failure"]
        # success resets the backoff: the next drop waits about a second
        n = len(clock.waits)
        await w.backend.session("acme").drop()
        await wait_until(lambda: runner.reconnects == 8 and runner.state.value == "connected")
        again = [x for x in clock.waits[n:] if x >= 0.5]
        assert len(again) == 1 and 0.5 <= again[0] <= 1.0


async def test_wake_is_coalesced_and_fast(proxy, tmp_path):
    proxy.add_instance("acme")
    settings = make_settings(tmp_path, proxy.url, MSG_POLL_MS=5000, MSG_POLL_MAX_MS=30000, SIMULATOR_AUTO_SCAN_MS=0,
                             BATCH_POLL=False)
    async with running_worker(settings) as w:
        await wait_until(lambda: proxy.status_of("acme") == "CONNECTED")
        await anyio.sleep(0.3)  # the runner is now in a 5 s wait
        base = f"http://127.0.0.1:{w.port}"
        async with httpx.AsyncClient() as http:
            assert (await http.post(base + "/wake", json={"instanceId": "acme"})).status_code == 401
            assert (await http.post(base + "/wake", headers=AUTH, json={"instanceId": "../x"})).status_code == 400
            before = proxy.calls["queued-messages"]
            proxy.enqueue("acme", "m1", "5511988887777", "now")
            t0 = time.monotonic()
            # a burst of 50 wakes
            results = []
            async with anyio.create_task_group() as tg:
                async def one() -> None:
                    results.append((await http.post(base + "/wake", headers=AUTH,
                                                    json={"instanceId": "acme"})).status_code)
                for _ in range(50):
                    tg.start_soon(one)
            await wait_until(lambda: "m1" in proxy.sent_marks, timeout=3)
            latency = time.monotonic() - t0
            assert results == [202] * 50
            assert latency < 1.0
            await anyio.sleep(0.3)
            polls = proxy.calls["queued-messages"] - before
            assert 1 <= polls <= 4, polls  # coalesced: not one poll per wake
            r = await http.post(base + "/wake", headers=AUTH)  # empty body: all instances
            assert r.status_code == 202 and r.json()["woken"] == 1


async def test_batch_mode_one_call_for_all_instances(proxy, tmp_path):
    proxy.batch = True
    ids = [f"i{k}" for k in range(5)]
    for iid in ids:
        proxy.add_instance(iid)
    settings = make_settings(tmp_path, proxy.url, SIMULATOR_AUTO_SCAN_MS=0, MSG_POLL_MS=100, MSG_POLL_MAX_MS=100)
    per_instance: list[str | None] = []
    proxy.on_queue_call = per_instance.append
    async with running_worker(settings) as w:
        await wait_until(lambda: w.manager.batch_supported is True, what="batch detected")
        await wait_until(lambda: all(proxy.status_of(i) == "CONNECTED" for i in ids))
        for k, iid in enumerate(ids):
            proxy.enqueue(iid, f"m{k}", "5511988887777", f"to {iid}")
        await wait_until(lambda: len(proxy.sent_marks) == 5)
        for iid in ids:
            assert [m["body"] for m in w.backend.sent(iid)] == [f"to {iid}"]
        per_instance.clear()
        await anyio.sleep(0.5)
        assert per_instance and all(x is None for x in per_instance)  # only batch calls now


async def test_batch_unsupported_falls_back_to_per_instance(proxy, tmp_path):
    proxy.batch = False  # answers 400 without instanceId
    proxy.add_instance("acme")
    settings = make_settings(tmp_path, proxy.url, SIMULATOR_AUTO_SCAN_MS=0)
    seen: list[str | None] = []
    proxy.on_queue_call = seen.append
    async with running_worker(settings) as w:
        await wait_until(lambda: w.manager.batch_supported is False, what="fallback")
        proxy.enqueue("acme", "m1", "5511988887777", "x")
        await wait_until(lambda: "m1" in proxy.sent_marks)
        assert seen.count(None) == 1  # probed once
        assert "acme" in seen


async def test_stalled_connect_is_abandoned_and_retried(proxy, tmp_path):
    proxy.add_instance("acme")
    settings = make_settings(tmp_path, proxy.url, CONNECT_TIMEOUT_S=0.3, SIMULATOR_AUTO_SCAN_MS=0)
    backend_kw = {}
    async with running_worker(settings, **backend_kw) as w:
        w.backend.stall_connects["acme"] = 2
        await wait_until(lambda: proxy.status_of("acme") == "CONNECTED", timeout=10)
        reasons = [s.get("reason") for s in proxy.statuses_of("acme") if s["status"] == "DISCONNECTED"]
        assert reasons == ["connect_timeout"]  # the second, identical status is not pushed again
        assert w.manager.runners["acme"].reconnects == 2


async def test_fair_startup_bounds_concurrent_connects(proxy, tmp_path):
    n = 40
    for k in range(n):
        proxy.add_instance(f"s{k}")
    settings = make_settings(tmp_path, proxy.url, SIMULATOR_AUTO_SCAN_MS=0, START_CONCURRENCY=4)
    async with running_worker(settings) as w:
        w.backend.connect_delay_s = 0.05
        peak = 0

        def watch() -> bool:
            nonlocal peak
            connecting = sum(1 for s in w.backend.sessions.values() if s.state == "connecting")
            peak = max(peak, connecting)
            return sum(1 for k in range(n) if proxy.status_of(f"s{k}") == "CONNECTED") == n

        await wait_until(watch, timeout=20)
        assert 1 <= peak <= 4


async def test_the_fake_proxy_in_claim_mode_hands_each_message_out_once():
    """What the benchmarks run against (scripts/_bench_common.BenchProxy): the Supabase kit's claim."""
    proxy = await FakeProxy(claim=True, poll_limit=2, batch=True).start()
    try:
        proxy.add_instance("a")
        for k in range(5):
            proxy.enqueue("a", f"m{k}", "5511988887777", f"body {k}")
        async with httpx.AsyncClient(base_url=proxy.url, headers=AUTH) as http:
            first = (await http.get("/queued-messages", params={"instanceId": "a"})).json()
            batch = (await http.get("/queued-messages")).json()["messages"]
            await http.post("/mark-sent", json={"messageId": "m0", "wa_message_id": "W0"})
            rest = (await http.get("/queued-messages", params={"instanceId": "a"})).json()
        assert [m["id"] for m in first] == ["m0", "m1"]
        assert [(m["id"], m["instanceId"]) for m in batch] == [("m2", "a"), ("m3", "a")]
        assert [m["id"] for m in rest] == ["m4"] and proxy.sent_marks["m0"] == ["W0"]
    finally:
        await proxy.stop()
