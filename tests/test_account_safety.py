"""Issue #12, "Recipients that exist" and pacing: number resolution (Brazil's 9th digit both
ways, not on WhatsApp, the journal's cache, the lookup rate limit), per-instance send pacing
(caps on a fake clock, ``limit=`` on ``/queued-messages``, typing shown), LID fields on
inbound, and the neonize wiring offline. The real daemon, the simulator and the loopback proxy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tests.conftest import FakeClock, make_settings, running_worker, wait_until
from tests.fakeproxy import SECRET, FakeProxy
from wa_worker.backends.simulator import SimulatorBackend
from wa_worker.edge.client import EdgeClient
from wa_worker.edge.models import QueuedMessage, parse_instances
from wa_worker.instances import runner as runner_module
from wa_worker.relays.numbers import NumberResolver, br_forms
from wa_worker.relays.outbound import Acknowledger, OutboundRelay
from wa_worker.relays.send_pacing import SendLimits
from wa_worker.storage.journal import Journal

pytestmark = pytest.mark.anyio

AUTH = {"Authorization": f"Bearer {SECRET}"}
OLD_BR = "551188887777"  # an account registered before the 9th digit
NEW_BR = "5511988887777"


def settings_for(tmp_path: Path, proxy: FakeProxy, **extra: Any) -> Any:
    values: dict[str, Any] = dict(SIMULATOR_AUTO_SCAN_MS=20)
    values.update(extra)
    return make_settings(tmp_path, proxy.url, **values)


async def sim_post(w: Any, path: str, body: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.post(f"http://127.0.0.1:{w.port}/simulator{path}", json=body, headers=AUTH)


def test_br_forms_both_ways():
    assert br_forms(NEW_BR) == [NEW_BR, OLD_BR]
    assert br_forms(OLD_BR) == [OLD_BR, NEW_BR]
    assert br_forms("551133334444") == ["551133334444"]  # a landline: no 9th digit
    assert br_forms("14155550100") == ["14155550100"]


async def test_br_ninth_digit_both_ways_and_not_on_whatsapp(proxy, tmp_path):
    proxy.add_instance("acme")
    async with running_worker(settings_for(tmp_path, proxy)) as w:
        await wait_until(lambda: w.manager.session("acme") is not None and proxy.instances["acme"]["status"]
                         == "CONNECTED", what="connected")
        r = await sim_post(w, "/numbers", {"registered": [OLD_BR, "5521977776666"]})
        assert r.status_code == 200
        proxy.enqueue("acme", "with9", NEW_BR, "sent with the 9")  # registered without it
        proxy.enqueue("acme", "without9", "552177776666", "sent without the 9")  # registered with it
        proxy.enqueue("acme", "nobody", "5531911112222", "not on WhatsApp")
        proxy.enqueue("acme", "group", "120363000000000000@g.us", "groups are not looked up")
        await wait_until(lambda: {"with9", "without9", "group"} <= set(proxy.sent_marks)
                         and "nobody" in proxy.failed_marks, what="all handled")
        to = {r["body"]: r["to"] for r in w.backend.sent("acme")}
        assert to == {"sent with the 9": f"{OLD_BR}@s.whatsapp.net",
                      "sent without the 9": "5521977776666@s.whatsapp.net",
                      "groups are not looked up": "120363000000000000@g.us"}
        assert proxy.failed_codes["nobody"] == ["not_on_whatsapp"]
        assert w.backend.lookups["acme"] == 3  # one call per number, both forms together


async def test_cached_answers_need_no_second_lookup_across_a_restart(proxy, tmp_path):
    proxy.add_instance("acme")
    settings = settings_for(tmp_path, proxy)
    async with running_worker(settings) as w:
        w.backend.set_registered([OLD_BR])
        proxy.enqueue("acme", "a", NEW_BR, "one")
        proxy.enqueue("acme", "x", "5531911112222", "nobody")
        await wait_until(lambda: "a" in proxy.sent_marks and "x" in proxy.failed_marks)
        assert w.backend.lookups["acme"] == 2
        proxy.enqueue("acme", "b", NEW_BR, "two")
        proxy.enqueue("acme", "y", "5531911112222", "nobody again")
        await wait_until(lambda: "b" in proxy.sent_marks and "y" in proxy.failed_marks)
        assert w.backend.lookups["acme"] == 2  # answers (the negative one too) came from the cache
    async with running_worker(settings) as w:
        w.backend.set_registered([OLD_BR])
        proxy.enqueue("acme", "c", NEW_BR, "three")
        await wait_until(lambda: "c" in proxy.sent_marks)
        assert w.backend.lookups["acme"] == 0  # the cache is in the journal
        assert [r["to"] for r in w.backend.sent("acme")][-1] == f"{OLD_BR}@s.whatsapp.net"


async def test_lookups_are_rate_limited_and_the_message_waits(proxy, tmp_path):
    proxy.add_instance("acme")
    async with running_worker(settings_for(tmp_path, proxy, NUMBER_LOOKUPS_PER_MINUTE=2)) as w:
        for i in range(4):
            proxy.enqueue("acme", f"m{i}", f"55119{i:08d}", f"to {i}")
        await wait_until(lambda: len(proxy.sent_marks) == 2, what="two sends")
        await wait_until(lambda: w.outbound.resolver.rate_limited >= 3, what="more polls")
        assert set(proxy.sent_marks) == {"m0", "m1"} and w.backend.lookups["acme"] == 2
        assert w.journal.outbound_get("m2") is None  # waiting: neither journaled nor failed
        assert not proxy.failed_marks


async def test_pacing_caps_on_a_fake_clock(tmp_path):
    """The relay with a simulator session: per-minute and per-day caps, a gap with jitter, typing."""
    sim = SimulatorBackend(tmp_path / "auth", auto_scan_ms=0, connect_delay_s=0)
    clock = FakeClock()
    journal = Journal(tmp_path / "state" / "db", clock=clock)
    edge = EdgeClient("http://127.0.0.1:9", SECRET)
    limits = SendLimits(min_gap_ms=2000, jitter_ms=1000, max_per_minute=2, max_per_day=3, typing=True)
    relay = OutboundRelay(journal, Acknowledger(journal, edge), clock=clock, limits=limits)
    async with sim:
        events: list[Any] = []

        async def sink(ev: Any) -> None:
            events.append(ev)

        session = await sim.open_session("acme", sink)
        await session.connect()
        await wait_until(lambda: session.state == "connected")
        msgs = [QueuedMessage(id=f"m{i}", to="x", body="hello " * i or "hi", jid=f"55119{i:08d}@s.whatsapp.net")
                for i in range(5)]
        assert relay.allowance("acme") == 2
        t0 = clock.now
        assert await relay.process("acme", session, msgs) == 2  # the minute's cap: the rest waits
        assert journal.outbound_get("m2") is None
        typing_first, gap, typing_second = clock.sleeps
        assert typing_first == typing_second == 1.0  # short texts: the shortest typing
        assert 2.0 <= gap <= 3.0  # the minimum gap plus jitter, after the first send
        assert relay.allowance("acme") == 0 and relay.pacer("acme").wait_until_allowed_s() > 50
        clock.now = t0 + 61
        assert relay.allowance("acme") == 1  # the day's cap (3) is nearer than the minute's
        assert await relay.process("acme", session, msgs[2:]) == 1
        clock.now += 3600
        assert relay.allowance("acme") == 0 and await relay.process("acme", session, msgs[3:]) == 0
        clock.now = t0 + 86400 + 62
        assert relay.allowance("acme") == 2
        sent = sim.sent("acme")
        assert [r["body"] for r in sent] == ["hi", "hello ", "hello hello "]
        assert all(1.0 <= r["typing_s"] <= 5.0 for r in sent)
        relay.configure("acme", {"send_max_per_minute": 1, "typing_indicator": False})
        assert relay.allowance("acme") == 1
        assert await relay.process("acme", session, msgs[3:]) == 1
        assert "typing_s" not in sim.sent("acme")[-1]
        await session.close()
    await edge.aclose()
    journal.close()


@pytest.mark.parametrize("honor", [True, False], ids=["proxy-honours-limit", "proxy-ignores-limit"])
async def test_the_worker_claims_no_more_than_it_may_send(tmp_path, honor):
    proxy = await FakeProxy(honor_limit=honor).start()
    try:
        proxy.add_instance("acme")
        async with running_worker(settings_for(tmp_path, proxy, SEND_MAX_PER_MINUTE=3, BATCH_POLL=False)) as w:
            for i in range(5):
                proxy.enqueue("acme", f"m{i}", "5511988887777", f"n{i}")
            await wait_until(lambda: len(proxy.sent_marks) == 3, what="three sends")
            await anyio.sleep(0.5)  # several poll intervals: the cap holds
            assert proxy.limits_seen[0] == "3" and set(proxy.sent_marks) == {"m0", "m1", "m2"}
            assert w.journal.outbound_get("m3") is None  # a surplus answer is left unjournaled
            assert "3" not in proxy.limits_seen[1:] and "0" not in proxy.limits_seen  # no poll once capped
    finally:
        await proxy.stop()


async def test_inbound_from_a_lid_sender_carries_both_addresses(proxy, tmp_path):
    proxy.add_instance("acme")
    async with running_worker(settings_for(tmp_path, proxy)) as w:
        await wait_until(lambda: proxy.instances["acme"].get("status") == "CONNECTED")
        r = await sim_post(w, "/instances/acme/inbound", {"from": "12345@lid", "sender_pn": "5511988887777",
                                                          "body": "hello from a LID"})
        assert r.status_code == 200, r.text
        await wait_until(lambda: proxy.inbound)
        got = proxy.inbound[0]
        assert (got["from"], got["sender_lid"], got["sender_pn"], got["chat_pn"]) == (
            "12345@lid", "12345@lid", "5511988887777@s.whatsapp.net", "5511988887777@s.whatsapp.net")
        proxy.enqueue("acme", "reply", "12345@lid", "a reply to the LID chat")
        await wait_until(lambda: "reply" in proxy.sent_marks)
        assert w.backend.sent("acme")[-1]["to"] == "12345@lid"
        assert w.backend.lookups["acme"] == 0  # a LID is never looked up
        bad = await sim_post(w, "/instances/acme/inbound", {"from": "1@lid", "sender_pn": "+55x", "body": "x"})
        assert bad.status_code == 400


async def test_the_day_cap_survives_a_restart(proxy, tmp_path):
    proxy.add_instance("acme")
    settings = settings_for(tmp_path, proxy, SEND_MAX_PER_DAY=2)
    for i in range(3):
        proxy.enqueue("acme", f"m{i}", "5511988887777", f"n{i}")
    async with running_worker(settings):
        await wait_until(lambda: len(proxy.sent_marks) == 2, what="two sends")
    async with running_worker(settings) as w:
        await wait_until(lambda: proxy.instances["acme"]["status"] == "CONNECTED")
        await anyio.sleep(0.4)  # several poll intervals
        assert "m2" not in proxy.sent_marks and w.outbound.allowance("acme") == 0


def test_instance_settings_override_within_bounds():
    base = SendLimits(min_gap_ms=1000, max_per_minute=20)
    mine = base.overridden({"send_min_gap_ms": 5000, "send_max_per_day": 300, "typing_indicator": True,
                            "send_max_per_minute": "lots", "send_jitter_ms": 10**12, "typing_max_s": 3})
    assert (mine.min_gap_ms, mine.max_per_minute, mine.max_per_day, mine.typing, mine.jitter_ms) == (
        5000, 20, 300, True, 0)  # bad values keep the defaults
    assert mine.typing_s("x" * 10_000) == 3.0 and mine.typing_s("hi") == 1.0 and base.typing_s("hi") == 0.0


def test_discovery_items_carry_settings_and_pair_phone():
    rejected: list[str] = []
    refs = parse_instances([{"id": "a", "settings": {"send_max_per_day": 10}, "pair_phone": "5511988887777"},
                            {"id": "b", "pair_phone": "not digits", "settings": "nope"}], rejected)
    assert refs is not None
    assert (refs[0].settings, refs[0].pair_phone) == ({"send_max_per_day": 10}, "5511988887777")
    assert (refs[1].settings, refs[1].pair_phone) == (None, None)
    assert sorted(rejected) == ["invalid_pair_phone", "invalid_settings"]  # both ignored, each counted


async def test_a_lookup_that_fails_is_unknown_never_a_no(tmp_path):
    """A session that cannot ask (disconnected) leaves the message waiting, nothing cached."""
    sim = SimulatorBackend(tmp_path / "auth", auto_scan_ms=0, connect_delay_s=0)
    journal = Journal(tmp_path / "db")
    resolver = NumberResolver(journal, FakeClock())
    async with sim:
        async def sink(_: Any) -> None:
            return None

        session = await sim.open_session("acme", sink)  # never connected
        res = await resolver.resolve("acme", session, f"{NEW_BR}@s.whatsapp.net")
        assert res.outcome.value == "wait" and resolver.lookup_errors == 1
        assert journal.cached_number(NEW_BR, 86400) is None
    journal.close()


async def test_a_pairing_code_is_pushed_with_the_qr_and_entered_on_the_phone(proxy, tmp_path):
    proxy.add_instance("acme", pair_phone="5511988887777")
    proxy.add_instance("plain")
    async with running_worker(settings_for(tmp_path, proxy, SIMULATOR_AUTO_SCAN_MS=None)) as w:
        await wait_until(lambda: any(s.get("pair_code") for s in proxy.statuses if s["instanceId"] == "acme"),
                         what="a pairing code pushed")
        pushed = next(s for s in proxy.statuses if s.get("pair_code"))
        assert pushed["status"] == "CONNECTING" and pushed["qr_code"]  # next to the QR
        code = pushed["pair_code"]
        assert w.backend.pair_requests["acme"] == 1 and w.backend.pair_requests["plain"] == 0
        assert all("pair_code" not in s for s in proxy.statuses if s["instanceId"] == "plain")
        wrong = await sim_post(w, "/instances/acme/enter-code", {"code": "0000-0000"})
        assert wrong.status_code == 409
        ok = await sim_post(w, "/instances/acme/enter-code", {"code": code})
        assert ok.status_code == 200, ok.text
        await wait_until(lambda: proxy.instances["acme"]["status"] == "CONNECTED", what="paired by code")
        assert "pair_code" not in proxy.statuses[-1] or proxy.statuses[-1]["status"] != "CONNECTED"


async def test_a_pairing_code_is_refreshed_when_it_expires(proxy, tmp_path, monkeypatch):
    monkeypatch.setattr(runner_module, "PAIR_CODE_TTL_S", 0.5)
    proxy.add_instance("acme", pair_phone="5511988887777")
    async with running_worker(settings_for(tmp_path, proxy, SIMULATOR_AUTO_SCAN_MS=None), qr_rotate_s=0.05) as w:
        await wait_until(lambda: w.backend.sessions.get("acme") and w.backend.session("acme").qr_count >= 4)
        assert w.backend.pair_requests["acme"] == 1  # QRs rotate; the code stays while young
        await wait_until(lambda: w.backend.pair_requests["acme"] == 2, what="a new code")
        await wait_until(lambda: [s["pair_code"] for s in proxy.statuses if s.get("pair_code")][-1]
                         == w.backend.session("acme").pair_code, what="the new code pushed")
