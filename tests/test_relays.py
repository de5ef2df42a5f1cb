"""The relays never block, never lose, never lie: a slow chat holds no other chat,
a poisoned message is dead-lettered after INBOUND_MAX_ATTEMPTS server errors,
failures stay pending while the proxy has no /mark-failed, a send outcome the
journal cannot take is kept until it can, and store errors are survived."""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from aiohttp import web

from tests.conftest import make_settings, running_worker, serving, wait_until
from tests.fakeproxy import SECRET
from wa_worker.backends import make_backend
from wa_worker.edge.client import EdgeClient
from wa_worker.edge.models import QueuedMessage
from wa_worker.relays.inbound import InboundRelay
from wa_worker.relays.outbound import Acknowledger, OutboundRelay
from wa_worker.storage.journal import Journal, JournalUnavailable

pytestmark = pytest.mark.anyio


@dataclass
class InboundProxy:
    """A loopback ``/inbound`` whose answer is chosen per message by ``decide``:
    an int status, or an ``anyio.Event`` to wait for before answering 200."""

    decide: Callable[[dict[str, Any]], Any] = lambda body: 200
    accepted: list[dict[str, Any]] = field(default_factory=list)
    answers: list[tuple[str, int]] = field(default_factory=list)
    url: str = ""

    async def _inbound(self, request: web.Request) -> web.Response:
        assert request.headers.get("Authorization") == f"Bearer {SECRET}"
        body = json.loads(await request.read())
        verdict = self.decide(body)
        if isinstance(verdict, anyio.Event):
            await verdict.wait()
            verdict = 200
        self.answers.append((body["wa_message_id"], verdict))
        if verdict == 200:
            self.accepted.append(body)
            return web.json_response({"ok": True})
        return web.json_response({"error": "nope"}, status=verdict)

    def accepted_ids(self, chat: str | None = None) -> list[str]:
        return [b["wa_message_id"] for b in self.accepted if chat is None or b["chat_id"] == chat]


@pytest.fixture
async def inbound_proxy() -> AsyncIterator[InboundProxy]:
    p = InboundProxy()
    app = web.Application()
    app.router.add_post("/inbound", p._inbound)
    async with serving(app) as p.url:
        yield p


def add(store: Journal, chat: str, wa_id: str) -> None:
    store.add_inbound("acme", chat, wa_id, {"instanceId": "acme", "chat_id": chat, "wa_message_id": wa_id,
                                            "body": wa_id})


async def test_a_slow_chat_never_holds_another(inbound_proxy, tmp_path):
    release_a = anyio.Event()
    inbound_proxy.decide = lambda body: release_a if body["chat_id"] == "A" else 200
    store = Journal(tmp_path / "db")
    add(store, "A", "a1")
    add(store, "A", "a2")
    for i in range(5):
        add(store, "B", f"b{i}")
    edge = EdgeClient(inbound_proxy.url, SECRET, timeout_s=30)
    relay = InboundRelay(store, edge, ttl_s=3600)
    async with anyio.create_task_group() as tg:
        tg.start_soon(relay.run)
        # chat A's reply is stalled; chat B goes on, in order, meanwhile
        await wait_until(lambda: inbound_proxy.accepted_ids("B") == [f"b{i}" for i in range(5)], timeout=5,
                         what="chat B delivered while chat A stalls")
        assert inbound_proxy.accepted_ids("A") == [] and relay.in_flight == 1
        add(store, "C", "c0")  # a chat that appears while A is in flight is picked up too
        relay.wake()
        await wait_until(lambda: inbound_proxy.accepted_ids("C") == ["c0"], timeout=5, what="chat C")
        release_a.set()
        await wait_until(lambda: inbound_proxy.accepted_ids("A") == ["a1", "a2"], timeout=5, what="chat A")
        assert store.counts()["inbound_pending"] == 0 and relay.delivered == 8
        tg.cancel_scope.cancel()
    await edge.aclose()


async def test_a_poisoned_message_is_dead_lettered_and_its_chat_moves_on(inbound_proxy, tmp_path, caplog):
    outage_left = {"n": 6}

    def decide(body: dict[str, Any]) -> int:
        if body["wa_message_id"] == "poison":
            return 500
        if body["chat_id"] == "B" and outage_left["n"] > 0:
            outage_left["n"] -= 1
            return 503  # an outage, not the message's fault: never dead-letters it
        return 200

    inbound_proxy.decide = decide
    store = Journal(tmp_path / "db")
    add(store, "A", "poison")
    add(store, "A", "after")
    add(store, "B", "b0")
    edge = EdgeClient(inbound_proxy.url, SECRET)
    relay = InboundRelay(store, edge, ttl_s=3600, retry_base_s=0.005, retry_cap_s=0.02, max_attempts=3)
    caplog.set_level(logging.ERROR, "wa_worker.inbound")
    async with anyio.create_task_group() as tg:
        tg.start_soon(relay.run)
        await wait_until(lambda: inbound_proxy.accepted_ids() and set(inbound_proxy.accepted_ids()) ==
                         {"after", "b0"}, timeout=5, what="the rest of both chats")
        tg.cancel_scope.cancel()
    await edge.aclose()
    assert [a for a in inbound_proxy.answers if a[0] == "poison"] == [("poison", 500)] * 3
    assert [a for a in inbound_proxy.answers if a[0] == "b0"] == [("b0", 503)] * 6 + [("b0", 200)]
    dead = store.dead_letters("inbound")
    assert [(d["ref"], d["status_code"], d["reason"]) for d in dead] == [("poison", 500, "server error 3 times")]
    assert json.loads(dead[0]["payload"])["body"] == "poison"
    assert relay.dead_lettered == 1 and store.counts()["inbound_dead_letter"] == 1
    assert store.counts()["inbound_pending"] == 0
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(lines) == 1 and "acme/poison" in lines[0] and "3 server errors" in lines[0]


async def test_a_message_for_an_instance_the_proxy_does_not_know_is_dead_lettered(inbound_proxy, tmp_path):
    """404 blames the message (a deleted instance): after INBOUND_MAX_ATTEMPTS it is
    dead-lettered and the chat moves on, instead of waiting out INBOUND_TTL_HOURS."""
    inbound_proxy.decide = lambda body: 404 if body["wa_message_id"] == "orphan" else 200
    store = Journal(tmp_path / "db")
    add(store, "A", "orphan")
    add(store, "A", "next")
    edge = EdgeClient(inbound_proxy.url, SECRET)
    relay = InboundRelay(store, edge, ttl_s=3600, retry_base_s=0.005, retry_cap_s=0.02, max_attempts=3)
    async with anyio.create_task_group() as tg:
        tg.start_soon(relay.run)
        await wait_until(lambda: inbound_proxy.accepted_ids() == ["next"], timeout=5, what="the chat moved on")
        tg.cancel_scope.cancel()
    await edge.aclose()
    assert [a for a in inbound_proxy.answers if a[0] == "orphan"] == [("orphan", 404)] * 3
    assert [(d["ref"], d["status_code"]) for d in store.dead_letters("inbound")] == [("orphan", 404)]


async def test_the_relays_survive_store_errors_and_resume(inbound_proxy, tmp_path):
    path = tmp_path / "db"
    store = Journal(path)
    add(store, "A", "a0")
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("ALTER TABLE inbound RENAME TO inbound_away")
    edge = EdgeClient(inbound_proxy.url, SECRET)
    relay = InboundRelay(store, edge, ttl_s=3600)
    async with anyio.create_task_group() as tg:
        tg.start_soon(relay.run)
        await anyio.sleep(0.3)  # every read fails meanwhile: the relay backs off, it does not die
        other.execute("ALTER TABLE inbound_away RENAME TO inbound")
        relay.wake()
        await wait_until(lambda: inbound_proxy.accepted_ids() == ["a0"], timeout=5, what="delivery after recovery")
        tg.cancel_scope.cancel()
    other.close()
    await edge.aclose()


async def test_a_slow_acknowledgement_never_holds_the_others(tmp_path):
    release = anyio.Event()
    marked: list[str] = []

    async def mark_sent(request: web.Request) -> web.Response:
        body = await request.json()
        if body["messageId"] == "slow":
            await release.wait()
        marked.append(body["messageId"])
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/mark-sent", mark_sent)
    store = Journal(tmp_path / "db")
    store.begin_send("slow", "acme", "j")
    store.record_sent("slow", "WA-slow")
    async with serving(app) as url:
        edge = EdgeClient(url, SECRET, timeout_s=30)
        acks = Acknowledger(store, edge)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(acks.run)
                await anyio.sleep(0.2)
                for k in range(3):  # sent while the first acknowledgement hangs
                    store.begin_send(f"m{k}", "acme", "j")
                    store.record_sent(f"m{k}", f"WA{k}")
                    acks.wake()
                await wait_until(lambda: marked == ["m0", "m1", "m2"], timeout=5, what="the others acknowledged")
                release.set()
                await wait_until(lambda: len(marked) == 4, timeout=5)
                await wait_until(lambda: store.counts()["outbound_pending_acks"] == 0)
                tg.cancel_scope.cancel()
        finally:
            await edge.aclose()


# ------------------------------------------------------------------------- outbound side, whole worker


async def test_worker_dead_letters_after_inbound_max_attempts(proxy, tmp_path):
    proxy.add_instance("acme")
    settings = make_settings(tmp_path, proxy.url, SIMULATOR_AUTO_SCAN_MS=0, INBOUND_MAX_ATTEMPTS=2)
    async with running_worker(settings, retry_cap_s=0.05) as w:
        await wait_until(lambda: proxy.status_of("acme") == "CONNECTED", what="CONNECTED")
        s = w.backend.session("acme")
        proxy.fail["inbound"] = 2  # the next two posts answer 500
        poison = await s.receive("5511900000001", "poison")
        after = await s.receive("5511900000001", "after")
        await wait_until(lambda: proxy.inbound_ids() == [after], what="the chat moves on")
        assert w.health()["inbound"]["dead_lettered"] == 1
        assert [d["ref"] for d in w.journal.dead_letters("inbound")] == [poison]


async def test_failures_stay_pending_while_the_proxy_has_no_mark_failed(proxy, tmp_path):
    proxy.mark_failed_supported = False
    proxy.add_instance("acme")
    proxy.enqueue("acme", "bad1", "12", "x")
    settings = make_settings(tmp_path, proxy.url, SIMULATOR_AUTO_SCAN_MS=0)
    async with running_worker(settings) as w:
        await wait_until(lambda: proxy.calls["mark-failed"] == 1 and w.outbound.failed == 1)
        await anyio.sleep(0.3)
        assert w.health()["outbound"]["pending_acks"] == 1  # not acknowledged: nobody heard of it
        assert w.journal.outbound_get("bad1").state == "failing"
        assert proxy.calls["mark-failed"] == 1  # and the proxy is not hammered
    # after a restart, with a proxy that learned /mark-failed, it is reported
    proxy.mark_failed_supported = True
    async with running_worker(settings) as w:
        await wait_until(lambda: "bad1" in proxy.failed_marks, what="reported after restart")
        assert proxy.failed_marks["bad1"][0].startswith("invalid recipient")
        await wait_until(lambda: w.health()["outbound"]["pending_acks"] == 0)
        assert w.journal.outbound_get("bad1").state == "failed"


async def test_a_send_outcome_the_journal_cannot_take_is_kept_and_acknowledged_later(proxy, tmp_path):
    proxy.add_instance("acme")
    settings = make_settings(tmp_path, proxy.url, SIMULATOR_AUTO_SCAN_MS=0)
    async with running_worker(settings) as w:
        await wait_until(lambda: proxy.status_of("acme") == "CONNECTED", what="CONNECTED")
        w.backend.send_delay_s = 0.5
        w.journal._db.execute("PRAGMA busy_timeout=20")  # fail fast on the lock below
        proxy.enqueue("acme", "racy", "5511988887777", "sent while the journal is locked")
        await wait_until(lambda: (r := w.journal.outbound_get("racy")) is not None and r.state == "sending",
                         what="journaled as sending")
        # another writer holds the journal: the send completes but its outcome cannot be written
        locker = sqlite3.connect(settings.STATE_DB, isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")
        try:
            await wait_until(lambda: len(w.backend.sent("acme")) == 1, what="WhatsApp has it")
            await wait_until(lambda: w.acks.unrecorded == 1, what="outcome kept in memory")
            assert not w.journal.writable
            await anyio.sleep(0.3)
            assert w.journal.outbound_get("racy").state == "sending"
            assert not proxy.sent_marks and not proxy.failed_marks
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        assert w.journal.probe_writable()
        await wait_until(lambda: "racy" in proxy.sent_marks, what="acknowledged once journaled")
        wa_id = w.backend.sent("acme")[0]["wa_message_id"]
        assert proxy.sent_marks["racy"][0] == wa_id
        assert w.acks.unrecorded == 0 and w.journal.outbound_get("racy").state == "marked"
        assert not proxy.failed_marks  # never reported as delivery_unknown
        assert len(w.backend.sent("acme")) == 1


def test_simulator_send_delay_setting_reaches_the_backend(tmp_path):
    settings = make_settings(tmp_path, "http://127.0.0.1:9", SIMULATOR_SEND_DELAY_MS=250)
    backend = make_backend(settings)
    assert backend.send_delay_s == 0.25  # type: ignore[attr-defined]
    assert make_backend(make_settings(tmp_path, "http://127.0.0.1:9")).send_delay_s == 0  # type: ignore[attr-defined]


async def test_nothing_is_sent_while_the_store_is_unwritable_until_the_probe_says_so(tmp_path):
    from wa_worker.backends.simulator import SimulatorBackend

    store = Journal(tmp_path / "state" / "db")
    store._db.execute("PRAGMA busy_timeout=20")
    acks = Acknowledger(store, EdgeClient("http://127.0.0.1:9", SECRET))
    relay = OutboundRelay(store, acks)
    backend = SimulatorBackend(tmp_path / "auth", auto_scan_ms=0, connect_delay_s=0.0)

    async def sink(_: Any) -> None:
        return None

    msg = QueuedMessage(id="m1", to="5511988887777", body="hi", jid="5511988887777@s.whatsapp.net")
    async with backend:
        session = await backend.open_session("acme", sink)
        await session.connect()
        await wait_until(lambda: session.state == "connected")
        locker = sqlite3.connect(tmp_path / "state" / "db", isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")
        with pytest.raises(JournalUnavailable):
            store.add_inbound("acme", "c", "w", {})  # a failed write: the store is unwritable
        locker.execute("ROLLBACK")
        locker.close()
        # a write would work again now, but nobody checked the headroom yet: nothing is claimed
        with pytest.raises(JournalUnavailable):
            await relay.process("acme", session, [msg])
        assert backend.sent("acme") == [] and store.outbound_get("m1") is None
        assert store.probe_writable()
        assert await relay.process("acme", session, [msg]) == 1
        assert [r["body"] for r in backend.sent("acme")] == ["hi"]
        assert store.outbound_get("m1").state == "sent"
    await acks.edge.aclose()

