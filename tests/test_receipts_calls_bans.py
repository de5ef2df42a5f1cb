"""Issue #12 end to end on the simulator: receipts (journaled, coalesced, batched,
optional), undecryptable messages, calls (auto-reject with a reply) and temporary
bans (no poll while banned, the DISCONNECTED status names the ban)."""

from __future__ import annotations

import time

import anyio
import httpx
import pytest

from tests.conftest import AUTH, connect, make_settings, running_worker, wait_until
from wa_worker.backends.base import InboundMessage, Receipt, ReceiptStatus
from wa_worker.daemon import Worker
from wa_worker.storage.journal import Journal

pytestmark = pytest.mark.anyio

ALICE = "5511988887777@s.whatsapp.net"


def _base(w: Worker) -> str:
    return f"http://127.0.0.1:{w.port}/simulator/instances/acme"


async def _send_one(w: Worker, proxy, mid: str = "m1") -> str:
    proxy.enqueue("acme", mid, "5511988887777", f"hello {mid}")
    await wait_until(lambda: mid in proxy.sent_marks, what=f"{mid} sent")
    return proxy.sent_marks[mid][0]


async def _receipt(http: httpx.AsyncClient, w: Worker, wa_id: str, status: str) -> None:
    r = await http.post(_base(w) + "/receipt", headers=AUTH, json={"wa_message_id": wa_id, "status": status})
    assert r.status_code == 200, r.text


def _posted(proxy, wa_id: str) -> list[str]:
    return [s["status"] for batch in proxy.message_status_posts for s in batch if s["wa_message_id"] == wa_id]


async def test_receipts_survive_a_proxy_outage_and_a_restart(proxy, tmp_path):
    proxy.add_instance("acme")
    settings = make_settings(tmp_path, proxy.url)
    async with running_worker(settings, retry_cap_s=0.3) as w:
        await connect(w, proxy)
        wa_id = await _send_one(w, proxy)
        proxy.fixed_status["message-status"] = 503
        async with httpx.AsyncClient() as http:
            await _receipt(http, w, wa_id, "delivered")
        await wait_until(lambda: proxy.calls["message-status"] >= 2, what="failed posts")
        assert w.health()["receipts"]["pending"] == 1
    assert proxy.message_status == {}
    async with running_worker(settings, retry_cap_s=0.3) as w:
        assert w.health()["receipts"]["pending"] == 1  # journaled, not in memory
        del proxy.fixed_status["message-status"]
        await wait_until(lambda: ("acme", wa_id) in proxy.message_status, what="status posted after restart")
        st = proxy.message_status[("acme", wa_id)]
        assert st["messageId"] == "m1" and st["status"] == "delivered" and st["recipient"] == ALICE
        assert isinstance(st["timestamp"], int) and abs(st["timestamp"] - time.time()) < 60
        await wait_until(lambda: w.health()["receipts"]["pending"] == 0, what="marked posted")


async def test_receipts_coalesce_and_never_go_back(proxy, tmp_path):
    proxy.add_instance("acme")
    async with running_worker(make_settings(tmp_path, proxy.url), retry_cap_s=0.3) as w:
        await connect(w, proxy)
        wa_id = await _send_one(w, proxy)
        proxy.fixed_status["message-status"] = 503
        async with httpx.AsyncClient() as http:
            await _receipt(http, w, wa_id, "delivered")
            await _receipt(http, w, wa_id, "read")
            await wait_until(lambda: proxy.calls["message-status"] >= 1, what="a failed post")
            del proxy.fixed_status["message-status"]
            await wait_until(lambda: _posted(proxy, wa_id), what="posted")
            # a late "delivered" after "read" changes nothing; "played" goes
            await _receipt(http, w, wa_id, "delivered")
            await _receipt(http, w, wa_id, "played")
            await wait_until(lambda: len(_posted(proxy, wa_id)) == 2, what="played posted")
            await _receipt(http, w, wa_id, "read")
            calls = proxy.calls["message-status"]
            assert w.journal.receipts_pending() == 0  # nothing due: "read" is below what was posted
            await anyio.sleep(1.2)  # longer than the relay's gathering delay
        assert _posted(proxy, wa_id) == ["read", "played"]
        assert proxy.calls["message-status"] == calls


async def test_receipts_are_batched_by_100(proxy, tmp_path):
    proxy.add_instance("acme")
    async with running_worker(make_settings(tmp_path, proxy.url)) as w:
        await connect(w, proxy)
        ids = tuple(f"3EB0{i:06d}" for i in range(250))
        t0 = time.monotonic()
        # one receipt may name many messages (WhatsApp groups them): through the runner's real sink
        await w.backend.session("acme").sink(Receipt(ids, ALICE, ALICE, ReceiptStatus.READ, time.time()))
        await wait_until(lambda: len(proxy.message_status) == 250, what="250 statuses")
        elapsed = time.monotonic() - t0
        sizes = [len(b) for b in proxy.message_status_posts]
        assert max(sizes) <= 100 and sum(sizes) == 250 and len(sizes) == 3, sizes
        assert all(s["messageId"] is None and s["status"] == "read" for s in proxy.message_status.values())
        assert elapsed < 1.5, elapsed  # within the 1 s delay (plus the posts)


async def test_a_proxy_without_message_status_switches_receipts_off(proxy, tmp_path, caplog):
    proxy.add_instance("acme")
    proxy.fixed_status["message-status"] = 404
    async with running_worker(make_settings(tmp_path, proxy.url)) as w:
        await connect(w, proxy)
        wa_id = await _send_one(w, proxy)
        async with httpx.AsyncClient() as http:
            await _receipt(http, w, wa_id, "delivered")
            await wait_until(lambda: not w.receipts.supported, what="switched off")
            pending = w.journal.receipts_pending()
            await _receipt(http, w, wa_id, "read")
            await _receipt(http, w, wa_id, "played")
        await wait_until(lambda: w.receipts.dropped == 2, what="receipts dropped")
        assert proxy.calls["message-status"] == 1
        assert w.journal.receipts_pending() == pending  # not journaled any more
        assert w.health()["receipts"]["enabled"] is False
        assert sum("no /message-status" in r.getMessage() for r in caplog.records) == 1


async def test_undecryptable_reaches_inbound(proxy, tmp_path):
    proxy.add_instance("acme")
    async with running_worker(make_settings(tmp_path, proxy.url)) as w:
        await connect(w, proxy)
        async with httpx.AsyncClient() as http:
            r = await http.post(_base(w) + "/inbound", headers=AUTH,
                                json={"from": "5511988887777", "type": "undecryptable"})
            assert r.status_code == 200, r.text
        wa_id = r.json()["wa_message_id"]
        await wait_until(lambda: f"{wa_id}-undecryptable" in proxy.inbound_ids(), what="undecryptable posted")
        p = proxy.inbound[-1]
        assert p["type"] == "undecryptable" and p["body"] == "" and p["from"] == ALICE and p["target_id"] == wa_id
        # WhatsApp decrypts it later: the real message, same id, is a message of its own (not a replay)
        session = w.backend.session("acme")
        real = InboundMessage(wa_id, ALICE, ALICE, "the real text", timestamp=time.time(), own_jid=session.jid)
        await session.sink(real)
        await wait_until(lambda: wa_id in proxy.inbound_ids(), what="the real message posted")
        assert proxy.inbound[-1]["body"] == "the real text" and proxy.inbound[-1]["type"] == "text"


@pytest.mark.parametrize("reject", [False, True])
async def test_calls_are_posted_and_optionally_rejected_with_a_reply(proxy, tmp_path, reject):
    proxy.add_instance("acme")
    settings = make_settings(tmp_path, proxy.url, CALL_REJECT=reject, CALL_REJECT_MESSAGE="Calls are not answered here")
    async with running_worker(settings) as w:
        await connect(w, proxy)
        async with httpx.AsyncClient() as http:
            r = await http.post(_base(w) + "/call", headers=AUTH, json={"from": "5511988887777", "video": True})
            assert r.status_code == 200, r.text
            bad = await http.post(_base(w) + "/call", headers=AUTH, json={"from": "5511988887777", "video": "y"})
            assert bad.status_code == 400
        call_id = r.json()["call_id"]
        await wait_until(lambda: call_id in proxy.inbound_ids(), what="call posted")
        p = next(p for p in proxy.inbound if p["wa_message_id"] == call_id)
        assert (p["type"], p["caller"], p["video"], p["rejected"]) == ("call", ALICE, True, reject)
        rejects = w.backend.rejected_calls["acme"]
        if reject:
            assert rejects == [{"call_id": call_id, "from": ALICE, "video": True}]
            await wait_until(lambda: w.backend.sent("acme"), what="reply text")
            assert [(s["to"], s["body"]) for s in w.backend.sent("acme")] == [(ALICE, "Calls are not answered here")]
        else:
            assert rejects == [] and w.backend.sent("acme") == []


@pytest.mark.parametrize("batch", [False, True])
async def test_a_temporary_ban_stops_polling_until_it_ends(proxy, tmp_path, batch):
    """Per-instance polling: no poll at all while banned. Batch mode (one poll for every
    instance): the banned instance's messages are left at the proxy, never sent."""
    proxy.batch = batch
    proxy.add_instance("acme")
    polls: list[float] = []
    proxy.on_queue_call = lambda iid: polls.append(time.time()) if iid == ("acme" if not batch else None) else None
    async with running_worker(make_settings(tmp_path, proxy.url)) as w:
        await connect(w, proxy)
        await wait_until(lambda: polls, what="polling while connected")
        async with httpx.AsyncClient() as http:
            r = await http.post(_base(w) + "/ban", headers=AUTH, json={"code": "blocked_by_users", "expire_s": 2})
            assert r.status_code == 200, r.text
        banned_at, banned_mono = time.time(), time.monotonic()
        await wait_until(lambda: proxy.status_of("acme") == "DISCONNECTED", what="DISCONNECTED")
        st = proxy.statuses_of("acme")[-1]
        assert st["reason"] == "temporary_ban" and st["ban_code"] == "blocked_by_users"
        assert abs(st["ban_expires_at"] - (banned_at + 2)) <= 1
        proxy.enqueue("acme", "during-ban", "5511988887777", "waits for the ban to end")
        await wait_until(lambda: proxy.status_of("acme") == "CONNECTED", timeout=15, what="reconnected after ban")
        reconnected_at = time.time()
        assert reconnected_at >= banned_at + 1.9
        await wait_until(lambda: "during-ban" in proxy.sent_marks, what="sent after the ban")
        assert proxy.sent_at["during-ban"] >= banned_mono + 1.9  # nothing sent while banned
        assert len(w.backend.sent("acme")) == 1
        during = [t for t in polls if banned_at + 0.2 < t < banned_at + 1.9]
        if not batch:  # (a batch poll serves every instance: only the sends matter there)
            assert during == [], during  # nothing polled while banned
        # statuses other than the ban's carry no ban fields
        assert "ban_code" not in proxy.statuses_of("acme")[-1]


def test_the_receipts_outbox_keeps_the_latest_and_never_goes_back(tmp_path):
    """A real journal file: a newer status that arrives while an older one is being posted
    stays due; a lower or equal one never becomes due; the proxy's id is found by wa id;
    rows survive reopening."""
    path = tmp_path / "j.db"
    j = Journal(path)
    j.begin_send("m1", "acme", ALICE)
    j.record_sent("m1", "3EB0AA")
    assert j.add_receipt("acme", "3EB0AA", ALICE, ALICE, "delivered", 1, 100.0)
    (row,) = j.receipts_due(100)
    assert (row.message_id, row.status) == ("m1", "delivered")
    assert j.add_receipt("acme", "3EB0AA", ALICE, ALICE, "read", 2, 101.0)  # arrives during the post
    j.receipts_posted([row])  # the post of "delivered" succeeds
    (row,) = j.receipts_due(100)
    assert row.status == "read" and row.timestamp == 101.0
    j.receipts_posted([row])
    assert j.receipts_due(100) == []
    assert not j.add_receipt("acme", "3EB0AA", ALICE, ALICE, "delivered", 1, 102.0)
    assert not j.add_receipt("acme", "3EB0AA", ALICE, ALICE, "read", 2, 103.0)
    assert j.receipts_due(100) == [] and j.receipts_pending() == 0
    assert j.add_receipt("acme", "3EB0ZZ", ALICE, ALICE, "played", 3, 104.0)  # not ours: no messageId
    j.close()
    j = Journal(path)
    (row,) = j.receipts_due(100)
    assert (row.wa_message_id, row.message_id, row.status) == ("3EB0ZZ", None, "played")
    j.close()
