"""Supervision: loops survive their own bugs, crashed runners come back, stop is
never lost, /ready tells which loop is failing, batch messages for instances
this worker does not hold, and a stop in the middle of a batch."""

from __future__ import annotations

import logging
import random
import sqlite3
import time
from pathlib import Path

import anyio
import httpx
import pytest

from tests.conftest import FakeClock, make_settings, running_worker, wait_until
from wa_worker.backends.base import QrCode
from wa_worker.backends.simulator import SimulatorBackend, _Phone
from wa_worker.edge.client import EdgeClient, EdgeError
from wa_worker.edge.models import Status, StatusUpdate
from wa_worker.instances.runner import StatusReporter
from wa_worker.supervise import LoopHealth, forever
from wa_worker.timing import Backoff

pytestmark = pytest.mark.anyio


# ---------------------------------------------------------------------------- forever


async def test_forever_restarts_a_failing_loop_logs_the_traceback_once_and_counts(caplog):
    clock = FakeClock(1000.0)
    health = LoopHealth("demo", clock, stale_after_s=10.0)
    calls = 0

    async def body() -> None:
        nonlocal calls
        calls += 1
        if calls <= 3:
            raise ValueError("bad record")  # the same error three times
        if calls == 4:
            raise KeyError("other")
        health.ok()

    with caplog.at_level(logging.ERROR, logger="wa_worker.supervise"):
        await forever("demo", body, clock=clock, backoff=Backoff(1.0, 4.0), health=health)
    assert calls == 5 and health.failures == 4 and health.finished
    lines = [r for r in caplog.records if "demo loop failed" in r.getMessage()]
    assert len(lines) == 4
    assert "ValueError: bad record" in lines[0].getMessage()
    # a traceback for each distinct error, not for its repetitions
    assert [r.exc_info is not None for r in lines] == [True, False, False, True]
    # clamped backoff with jitter: 1, 2, 4, 4 (each in [d/2, d])
    for d, cap in zip(clock.sleeps, (1, 2, 4, 4), strict=True):
        assert cap / 2 <= d <= cap


async def test_forever_lets_cancellation_through():
    clock = FakeClock(1000.0)
    health = LoopHealth("sleepy", clock)

    async def body() -> None:
        await anyio.sleep(10)

    with anyio.move_on_after(0.05) as scope:
        await forever("sleepy", body, clock=clock, backoff=Backoff(), health=health)
    assert scope.cancelled_caught
    assert health.failures == 0 and not health.finished


def test_loop_health_failing_until_the_next_success_and_stale_after_its_bound():
    clock = FakeClock(1000.0)
    h = LoopHealth("discovery", clock, stale_after_s=180.0, started_at=clock.now)
    assert h.not_ready_reason(clock.now) is None
    clock.now += 181
    assert h.not_ready_reason(clock.now) == "discovery loop has not succeeded for 181s"
    h.ok()
    assert h.not_ready_reason(clock.now) is None
    h.failures, h.last_failure_at, h.last_error = 1, clock.now + 1, "RuntimeError"
    clock.now += 2
    assert h.not_ready_reason(clock.now) == "discovery loop failing: RuntimeError"
    h.ok()
    assert not h.failing(clock.now)
    assert h.describe(clock.now)["last_ok_age_s"] == 0.0


# ---------------------------------------------------------------------------- the status reporter


class RateLimitedEdge(EdgeClient):
    """The real client, whose /update-status answers 429 with Retry-After: 30 twice."""

    def __init__(self) -> None:
        super().__init__("http://127.0.0.1:9", "x" * 16)
        self.attempts = 0

    async def update_status(self, update: StatusUpdate) -> None:
        self.attempts += 1
        if self.attempts <= 2:
            raise EdgeError("update-status", "HTTP 429", status=429, retry_after_s=30.0)


async def test_status_retry_honours_retry_after():
    clock = FakeClock(1000.0)
    edge = RateLimitedEdge()
    reporter = StatusReporter("acme", edge, lambda: None, random.Random(1), clock)
    reporter.set(Status.CONNECTING)
    async with anyio.create_task_group() as tg:
        tg.start_soon(reporter.run)
        assert await reporter.flush(5.0)
        tg.cancel_scope.cancel()
    await edge.aclose()
    assert edge.attempts == 3
    assert [s for s in clock.sleeps if s >= 1.0][:2] == [30.0, 30.0]


# ---------------------------------------------------------------------------- runners


async def test_crashed_runner_is_reported_and_restarted(proxy, tmp_path, caplog):
    proxy.add_instance("acme")
    settings = make_settings(tmp_path, proxy.url, SIMULATOR_AUTO_SCAN_MS=0)
    async with running_worker(settings) as w:
        await wait_until(lambda: proxy.status_of("acme") == "CONNECTED", what="connected")
        first = w.manager.runners["acme"]
        # a QR too large to encode: a bug in the lifecycle, which ends this runner
        await w.backend.session("acme").sink(QrCode("x" * 8000))
        await wait_until(lambda: any(s.get("reason") == "crashed" for s in proxy.statuses_of("acme")),
                         what="DISCONNECTED crashed")
        assert w.manager.crashes["acme"] == 1 and w.health()["instances"]["crashes"] == 1
        # restarted (after about a second) without the proxy listing it: the session resumes from disk
        await wait_until(lambda: proxy.status_of("acme") == "CONNECTED" and w.manager.runners.get("acme")
                         not in (None, first), timeout=10, what="restarted")
        assert w.manager.runners["acme"].state.value == "connected"
        assert w.health()["instances"]["restarting_after_crash"] == 0
    assert sum("runner crashed" in r.getMessage() for r in caplog.records) == 1


async def test_stop_is_not_lost_behind_a_burst_of_backend_events(proxy, tmp_path):
    proxy.add_instance("acme")
    settings = make_settings(tmp_path, proxy.url, SIMULATOR_AUTO_SCAN_MS=0)
    async with running_worker(settings) as w:
        await wait_until(lambda: proxy.status_of("acme") == "CONNECTED", what="connected")
        runner = w.manager.runners["acme"]
        sink = w.backend.session("acme").sink
        async with anyio.create_task_group() as tg:
            for k in range(300):  # more than the runner's event buffer holds
                tg.start_soon(sink, QrCode(f"2@burst-{k}"))
            await anyio.sleep(0.05)
            t0 = time.monotonic()
            runner.stop()
            with anyio.fail_after(5):
                await runner.wait_stopped()
            assert time.monotonic() - t0 < 1.0
        # a graceful stop, not a crash (discovery may start a new runner afterwards: the proxy lists it again)
        assert runner.state.value == "stopped"
        await wait_until(lambda: w.manager.outcomes["stopped"] == 1, what="stop counted")
        assert w.manager.crashes["acme"] == 0


# ---------------------------------------------------------------------------- /ready


async def test_a_crashing_relay_does_not_end_the_worker_and_ready_says_which(proxy, tmp_path):
    settings = make_settings(tmp_path, proxy.url)
    async with running_worker(settings) as w:
        base = f"http://127.0.0.1:{w.port}"
        async with httpx.AsyncClient() as http:
            await wait_until(lambda: w.edge.last_ok_monotonic is not None, what="proxy reached")
            r = await http.get(base + "/ready")
            assert r.status_code == 200 and r.json()["loops"]["discovery"]["last_ok_age_s"] < 5
            # a real SQLite fault the relay does not expect: its table is gone
            w.journal._db.execute("DROP TABLE inbound")
            w.inbound.wake()
            await wait_until(lambda: w.inbound_health.failures >= 1, what="relay failure caught")
            r = await http.get(base + "/ready")
            assert r.status_code == 503
            assert "inbound relay loop failing: JournalUnavailable" in r.json()["reasons"], r.json()
            loops = (await http.get(base + "/health")).json()["loops"]
            assert loops["inbound relay"]["failing"] is True and loops["discovery"]["last_ok_age_s"] < 5
            # everything else carries on
            await wait_until(lambda: w.manager.discovery_health.last_ok is not None)
            n = proxy.calls["disconnected-instances"]
            await wait_until(lambda: proxy.calls["disconnected-instances"] > n + 2, what="discovery goes on")


# ---------------------------------------------------------------------------- batch mode


async def test_batch_messages_for_an_instance_not_held_here(proxy, tmp_path, caplog):
    proxy.batch = True
    proxy.add_instance("acme")
    proxy.add_instance("stored", status="CONNECTED")  # stale CONNECTED: discovery never lists it
    settings = make_settings(tmp_path, proxy.url, SIMULATOR_AUTO_SCAN_MS=0, MSG_POLL_MS=50, MSG_POLL_MAX_MS=50)
    with caplog.at_level(logging.INFO, logger="wa_worker.manager"):
        async with running_worker(settings) as w:
            await wait_until(lambda: w.manager.batch_supported is True and proxy.status_of("acme") == "CONNECTED")
            # a session of this worker appears on disk (e.g. restored from a backup) and has queued work
            w.backend._save_phone("stored", _Phone(jid="5511900000001@s.whatsapp.net", push_name="x"))
            proxy.enqueue("stored", "m-stored", "5511988887777", "for stored")
            proxy.enqueue("elsewhere", "m-else", "5511988887777", "not ours")
            await wait_until(lambda: "m-stored" in proxy.sent_marks, what="stored instance started and sent")
            n = proxy.calls["queued-messages"]
            await wait_until(lambda: proxy.calls["queued-messages"] > n + 5, what="more batch polls")
            assert [m["body"] for m in w.backend.sent("stored")] == ["for stored"]
            assert "m-else" not in proxy.sent_marks and "elsewhere" not in w.manager.runners
            assert [m["id"] for m in proxy.queue["elsewhere"]] == ["m-else"]  # left for the proxy
    warnings = [r.getMessage() for r in caplog.records if "elsewhere" in r.getMessage()]
    assert len(warnings) == 1 and "does not hold" in warnings[0]
    assert any("stored" in r.getMessage() and "starting it" in r.getMessage() for r in caplog.records)


def _journal(db: Path) -> dict[str, str]:
    with sqlite3.connect(db) as conn:
        return dict(conn.execute("SELECT message_id, state FROM outbound").fetchall())


async def test_batch_mode_stop_mid_batch_sends_nothing_more_and_resumes_exactly_once(proxy, tmp_path):
    proxy.batch = True
    proxy.add_instance("acme")
    settings = make_settings(tmp_path, proxy.url, SIMULATOR_AUTO_SCAN_MS=0, MSG_POLL_MS=50, MSG_POLL_MAX_MS=100)
    backend = SimulatorBackend(Path(settings.AUTH_DIR), auto_scan_ms=0, connect_delay_s=0.01, send_delay_s=0.05)
    ids = [f"m{k:03d}" for k in range(300)]
    async with running_worker(settings, backend=backend) as w:
        await wait_until(lambda: proxy.status_of("acme") == "CONNECTED" and w.manager.batch_supported)
        for mid in ids:
            proxy.enqueue("acme", mid, "5511988887777", f"body {mid}")
        w.wake()
        await wait_until(lambda: len(backend.sent("acme")) >= 3, what="a few sent")
        # copies of the batch wait in the runner's inbox (the poller re-fetches while the runner sends)
        inbox = w.manager.runners["acme"]._inbox_rx
        await wait_until(lambda: inbox.statistics().current_buffer_used >= 1, what="batches waiting in the inbox")
        t0 = time.monotonic()
        w.request_stop()
        with anyio.fail_after(10):
            await w.wait_stopped()
        elapsed = time.monotonic() - t0
    sent = [m["body"] for m in backend.sent("acme")]
    journal = _journal(Path(settings.STATE_DB))
    assert elapsed < 1.5, elapsed
    assert 3 <= len(sent) <= 40, len(sent)  # ~1 s at 50 ms a send at most; not the batch
    assert sorted(journal) == sorted(s.removeprefix("body ") for s in sent)
    assert "sending" not in journal.values()
    assert len(proxy.queue["acme"]) == 300 - len(proxy.sent_marks)
    # the next run sends the rest, each exactly once
    fast = SimulatorBackend(Path(settings.AUTH_DIR), auto_scan_ms=0, connect_delay_s=0.01)
    async with running_worker(settings, backend=fast):
        await wait_until(lambda: len(proxy.sent_marks) == 300, timeout=30, what="all 300 acknowledged")
    bodies = [m["body"] for m in fast.sent("acme")]
    assert sorted(bodies) == [f"body {mid}" for mid in ids] and len(bodies) == 300


async def test_a_failing_outbound_loop_is_restarted_inside_its_runner(proxy, tmp_path):
    proxy.add_instance("acme")
    settings = make_settings(tmp_path, proxy.url, SIMULATOR_AUTO_SCAN_MS=0, BATCH_POLL=False)
    async with running_worker(settings) as w:
        await wait_until(lambda: proxy.status_of("acme") == "CONNECTED", what="connected")
        runner = w.manager.runners["acme"]
        # a real SQLite fault the relay does not expect: the journal's table is gone
        schema = [r[0] for r in w.journal._db.execute(
            "SELECT sql FROM sqlite_master WHERE tbl_name = 'outbound' AND sql IS NOT NULL ORDER BY type DESC")]
        w.journal._db.execute("DROP TABLE outbound")
        proxy.enqueue("acme", "m1", "5511988887777", "after the fault")
        await wait_until(lambda: runner.outbound_health.failures >= 1, what="outbound loop failure caught")
        assert w.health()["instances"]["failing_loops"] >= 1
        assert w.manager.runners["acme"] is runner and runner.state.value == "connected"
        assert w.backend.sent("acme") == []  # nothing is sent without a journal
        w.journal._db.executescript(";".join(schema))  # the fault goes away
        await wait_until(lambda: "m1" in proxy.sent_marks, timeout=15, what="sent after the loop restarted")
        assert [m["body"] for m in w.backend.sent("acme")] == ["after the fault"]
        assert w.manager.crashes["acme"] == 0
