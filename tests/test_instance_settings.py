"""Per-instance settings for connected instances (issue #12): ``GET /instance-settings``
polled by one loop per worker, applied to pacing, calls and ``proxy_url``; a proxy
without it changes nothing. End to end on the simulator with the real worker."""

from __future__ import annotations

import json
import logging
import signal

import anyio
import httpx
import pytest

from tests.conftest import AUTH, connect, make_settings, running_worker, wait_until
from tests.proc import ROOT, start_worker, worker_env
from wa_worker.daemon import Worker
from wa_worker.edge.models import parse_instance_settings, parse_instances
from wa_worker.instances import settings as settings_mod
from wa_worker.storage.journal import Journal
from wa_worker.upstream import ProxyChoice, ProxyProblem, parse_proxy_url, proxy_choice

pytestmark = pytest.mark.anyio

ALICE = "5511988887777@s.whatsapp.net"
SECRET_PW = "pr0xy-pa55word"


@pytest.fixture
def fast_settings_poll(monkeypatch):
    monkeypatch.setattr(settings_mod, "SETTINGS_POLL_S", 0.3)


def _base(w: Worker, iid: str = "acme") -> str:
    return f"http://127.0.0.1:{w.port}/simulator/instances/{iid}"


async def _call(w: Worker, proxy) -> dict:
    async with httpx.AsyncClient() as http:
        r = await http.post(_base(w) + "/call", headers=AUTH, json={"from": "5511988887777", "video": False})
        assert r.status_code == 200, r.text
    call_id = r.json()["call_id"]
    await wait_until(lambda: call_id in proxy.inbound_ids(), what="call posted")
    return next(p for p in proxy.inbound if p["wa_message_id"] == call_id)


# long: one connected instance taking three kinds of change from one poll, each checked where it acts
async def test_settings_reach_a_connected_instance_within_a_poll(proxy, tmp_path, fast_settings_poll, caplog):
    caplog.set_level(logging.DEBUG)
    proxy.add_instance("acme")
    proxy.instance_settings = {}  # the endpoint exists, nothing set yet
    settings = make_settings(tmp_path, proxy.url, CALL_REJECT=False)
    async with running_worker(settings) as w:
        await connect(w, proxy)
        assert w.backend.connect_proxies["acme"] == ["direct"]
        first = await _call(w, proxy)
        assert first["rejected"] is False

        proxy.set_settings("acme", settings={"call_reject": True, "call_reject_message": "No calls, text us",
                                             "send_max_per_minute": 1},
                           proxy_url=f"http://ops:{SECRET_PW}@127.0.0.1:3128")
        await wait_until(lambda: w.manager.instance_settings.settings("acme"), timeout=3,
                         what="settings picked up by the poll")
        # calls: rejected now, with the instance's own reply text
        second = await _call(w, proxy)
        assert second["rejected"] is True
        await wait_until(lambda: w.backend.sent("acme"), what="reply text")
        assert [(s["to"], s["body"]) for s in w.backend.sent("acme")] == [(ALICE, "No calls, text us")]
        # pacing: one send a minute for this instance now (the reply text above was not a queued message)
        proxy.enqueue("acme", "m1", "5511988887777", "one")
        proxy.enqueue("acme", "m2", "5511988887777", "two")
        await wait_until(lambda: "m1" in proxy.sent_marks, what="m1 sent")
        await anyio.sleep(0.5)
        assert "m2" not in proxy.sent_marks
        assert "1" in proxy.limits_seen
        # proxy_url: at the next connect (a network drop here), never before
        assert w.backend.connect_proxies["acme"] == ["direct"]
        async with httpx.AsyncClient() as http:
            assert (await http.post(_base(w) + "/drop", headers=AUTH)).status_code == 200
            await wait_until(lambda: len(w.backend.connect_proxies["acme"]) == 2, what="reconnect")
            health = (await http.get(f"http://127.0.0.1:{w.port}/health")).text
        assert w.backend.connect_proxies["acme"] == ["direct", "http://***@127.0.0.1:3128"]
        # changes only: the first call had no cursor, later ones the proxy's cursor
        assert proxy.settings_since[0] is None and "1" in proxy.settings_since
        assert w.manager.settings_poller.health.finished is False
        assert "instance settings" in json.loads(health)["loops"]
    assert SECRET_PW not in caplog.text and SECRET_PW not in health
    assert "upstream proxy http://***@127.0.0.1:3128 (applies at the instance's next connect)" in caplog.text


async def test_a_proxy_without_instance_settings_is_asked_once(proxy, tmp_path, fast_settings_poll, caplog):
    """A text-only proxy from the first version: one 404, one INFO line, nothing else changes."""
    caplog.set_level(logging.INFO)
    proxy.add_instance("acme")
    async with running_worker(make_settings(tmp_path, proxy.url)) as w:
        await connect(w, proxy)
        await anyio.sleep(1.0)  # three poll periods
        assert proxy.calls["instance-settings"] == 1
        assert w.manager.settings_poller.supported is False
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"http://127.0.0.1:{w.port}/ready")).status_code == 200
        proxy.enqueue("acme", "m1", "5511988887777", "still works")
        await wait_until(lambda: "m1" in proxy.sent_marks, what="m1 sent")
    lines = [r for r in caplog.records if "no /instance-settings" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO


async def test_at_most_one_call_per_interval_even_when_failing(proxy, tmp_path, monkeypatch):
    monkeypatch.setattr(settings_mod, "SETTINGS_POLL_S", 0.5)
    proxy.add_instance("acme")
    proxy.instance_settings = {}
    proxy.fail["instance-settings"] = 1000  # every call a 500
    async with running_worker(make_settings(tmp_path, proxy.url)) as w:
        start = anyio.current_time()
        await anyio.sleep(2.2)
        elapsed = anyio.current_time() - start
        assert 1 <= proxy.calls["instance-settings"] <= elapsed / 0.5 + 2
        assert w.manager.settings_poller.supported is None  # a 500 is not a verdict


async def test_bad_items_are_counted_and_skipped(proxy, tmp_path, fast_settings_poll, caplog):
    """A bad item never stops the good ones; an unusable proxy_url keeps the instance offline
    (never dialled directly) and says why, without the credentials."""
    caplog.set_level(logging.DEBUG)
    proxy.add_instance("good")
    proxy.add_instance("badproxy")
    proxy.instance_settings = {}
    proxy.set_settings("good", settings={"call_reject": True})
    proxy.set_settings("badproxy", proxy_url=f"ftp://ops:{SECRET_PW}@127.0.0.1:21")
    proxy.set_settings("../evil", settings={"call_reject": True})
    proxy.set_settings("oddsettings", settings="not an object")
    async with running_worker(make_settings(tmp_path, proxy.url)) as w:
        await connect(w, proxy, "good")
        await wait_until(lambda: any(s.get("reason") == "connect_failure" for s in proxy.statuses_of("badproxy")),
                         what="badproxy refused to connect")
        detail = next(s["detail"] for s in proxy.statuses_of("badproxy") if s.get("reason") == "connect_failure")
        assert "proxy_url scheme 'ftp' is not supported" in detail
        assert w.backend.connect_proxies["badproxy"] == []  # never dialled, directly or otherwise
        assert w.manager.instance_settings.call_policy("good", settings_mod.CallPolicy()).reject is True
        rejected = w.edge.rejected
        assert rejected["invalid_instance_id"] >= 1 and rejected["invalid_settings"] >= 1
        assert rejected["invalid_proxy_url"] >= 1
        # fixed at the proxy: null = dial directly, from the next attempt on
        proxy.set_settings("badproxy", proxy_url=None)
        await wait_until(lambda: w.backend.connect_proxies["badproxy"] == ["direct"], timeout=10,
                         what="badproxy dialling directly")
        statuses = json.dumps(proxy.statuses)
    assert SECRET_PW not in caplog.text and SECRET_PW not in statuses


async def test_a_discovery_item_proxy_url_reaches_the_connect(proxy, tmp_path):
    """Without /instance-settings: the discovery item's proxy_url and settings apply."""
    proxy.add_instance("acme", proxy_url=f"socks5://ops:{SECRET_PW}@127.0.0.1:1080",
                       settings={"call_reject": True, "call_reject_message": ""})
    settings = make_settings(tmp_path, proxy.url, CALL_REJECT=False, CALL_REJECT_MESSAGE="global text")
    async with running_worker(settings) as w:
        await connect(w, proxy)
        assert w.backend.connect_proxies["acme"] == ["socks5://***@127.0.0.1:1080"]
        call = await _call(w, proxy)
        assert call["rejected"] is True
        await anyio.sleep(0.2)
        assert w.backend.sent("acme") == []  # the instance's empty message: no reply text


async def test_instance_call_reject_false_overrides_the_global_true(proxy, tmp_path):
    proxy.add_instance("acme", settings={"call_reject": False})
    proxy.add_instance("other")
    settings = make_settings(tmp_path, proxy.url, CALL_REJECT=True)
    async with running_worker(settings) as w:
        await connect(w, proxy)
        await connect(w, proxy, "other")
        assert (await _call(w, proxy))["rejected"] is False
        assert w.manager.instance_settings.call_policy("other", w.call_policy("other")).reject is True


# ------------------------------------------------------------------ units: the readers


def test_proxy_url_validation_never_echoes_credentials() -> None:
    ok = parse_proxy_url("http://u:p%40ss@proxy.example:3128")
    assert (ok.scheme, ok.host, ok.port, ok.username, ok.password) == ("http", "proxy.example", 3128, "u", "p@ss")
    assert ok.redacted == "http://***@proxy.example:3128"
    assert parse_proxy_url("socks5h://[::1]:1080").redacted == "socks5://[::1]:1080"
    assert parse_proxy_url("https://proxy.example:443/").scheme == "https"
    for bad in (f"ftp://u:{SECRET_PW}@h:21", f"http://u:{SECRET_PW}@h", f"http://u:{SECRET_PW}@h:99999",
                f"http://u:{SECRET_PW}@h:80/path", f"http://u:{SECRET_PW}@:80", "http://h:80 x", 8080, None,
                f"{SECRET_PW}", "x" * 3000, f"{SECRET_PW}://h:1"):
        with pytest.raises(ProxyProblem) as info:
            parse_proxy_url(bad)
        assert SECRET_PW not in str(info.value)
    assert proxy_choice(None) == proxy_choice("") == ProxyChoice()
    assert proxy_choice("http://h:1").url == "http://h:1"
    assert proxy_choice("gopher://h:1").problem is not None and proxy_choice("gopher://h:1").shown == "invalid"


def test_settings_reader_is_tolerant() -> None:
    rejected: list[str] = []
    payload = {"instances": [
        {"id": "a", "settings": {"send_max_per_day": 5}, "proxy_url": "http://h:1"},
        {"id": "b", "settings": None, "proxy_url": None},
        {"id": "c"},
        {"id": "d", "proxy_url": "nope"},
        "not an object", {"id": "bad id!"}, {"id": "e", "settings": [1]},
        {"id": "f", "settings": {str(i): i for i in range(100)}},
    ], "cursor": 42}
    parsed = parse_instance_settings(payload, rejected)
    assert parsed is not None
    items, cursor = parsed
    assert cursor == "42"
    by_id = {i.id: i for i in items}
    assert by_id["a"].settings == {"send_max_per_day": 5} and by_id["a"].proxy == ProxyChoice("http://h:1")
    assert by_id["b"].settings_cleared and by_id["b"].proxy == ProxyChoice()
    assert by_id["c"].settings is None and by_id["c"].proxy is None and not by_id["c"].settings_cleared
    assert by_id["d"].proxy is not None and by_id["d"].proxy.problem
    assert by_id["e"].settings is None and by_id["f"].settings is None
    assert sorted(rejected) == sorted(["invalid_proxy_url", "settings_not_object", "invalid_instance_id",
                                       "invalid_settings", "invalid_settings"])
    assert parse_instance_settings({"nothing": 1}, []) is None
    bad_cursor: list[str] = []
    assert parse_instance_settings({"instances": [], "cursor": {"x": 1}}, bad_cursor) == ([], None)
    assert bad_cursor == ["invalid_cursor"]
    # discovery items carry the same two fields
    refs = parse_instances([{"id": "a", "proxy_url": "socks5://h:1080", "settings": None}, {"id": "b"}], [])
    assert refs is not None and refs[0].proxy == ProxyChoice("socks5://h:1080") and refs[0].settings_cleared
    assert refs[1].proxy is None and not refs[1].settings_cleared


async def test_a_resumed_session_dials_through_its_proxy_from_the_first_attempt(proxy, tmp_path):
    """After a restart the stored session is resumed without any discovery item: the settings
    call made before resuming gives it its proxy_url before its first connect."""
    proxy.add_instance("acme")
    settings = make_settings(tmp_path, proxy.url)
    async with running_worker(settings) as w:
        await connect(w, proxy)
        assert w.backend.connect_proxies["acme"] == ["direct"]
    proxy.set_settings("acme", proxy_url=f"http://ops:{SECRET_PW}@127.0.0.1:3128")
    proxy.settings_delay_s = 0.5  # a slow answer: the resume must wait for it, not race it
    async with running_worker(settings) as w:
        await wait_until(lambda: proxy.status_of("acme") == "CONNECTED" and w.backend.connect_proxies["acme"],
                         what="resumed")
        assert w.backend.connect_proxies["acme"] == ["http://***@127.0.0.1:3128"]
        assert proxy.settings_since == [None]  # asked once at this start, without a cursor (the first run got a 404)


async def test_settings_survive_a_restart_while_the_proxy_cannot_answer(proxy, tmp_path, fast_settings_poll):
    """The journal keeps what the proxy last said: a restart during a proxy outage still
    resumes the session through its proxy_url, with its call settings."""
    proxy.add_instance("acme")
    proxy.set_settings("acme", settings={"call_reject": True}, proxy_url=f"http://ops:{SECRET_PW}@127.0.0.1:3128")
    settings = make_settings(tmp_path, proxy.url, CALL_REJECT=False)
    async with running_worker(settings) as w:
        await connect(w, proxy)
        assert w.backend.connect_proxies["acme"] == ["http://***@127.0.0.1:3128"]
    proxy.fail["instance-settings"] = 1000
    async with running_worker(settings) as w:
        await wait_until(lambda: proxy.status_of("acme") == "CONNECTED" and w.backend.connect_proxies["acme"],
                         what="resumed")
        assert w.backend.connect_proxies["acme"] == ["http://***@127.0.0.1:3128"]
        assert w.call_policy("acme").reject is True
        # back to direct once the proxy says so; the journal forgets it too
        proxy.fail["instance-settings"] = 0
        proxy.set_settings("acme", settings=None, proxy_url=None)
        await wait_until(lambda: w.manager.instance_settings.proxy_shown("acme") == "direct", timeout=5,
                         what="cleared")
        assert w.journal.instance_settings() == []
        assert w.call_policy("acme").reject is False


@pytest.mark.slow
async def test_the_real_process_applies_instance_settings(proxy, tmp_path):
    """The ``wa-worker`` process: settings and proxy_url from /instance-settings (asked at start)
    reach the connect and the call policy; the password is in no log line."""
    proxy.add_instance("acme")
    proxy.set_settings("acme", settings={"call_reject": True, "call_reject_message": "Texts only"},
                       proxy_url=f"socks5://ops:{SECRET_PW}@127.0.0.1:1080")
    env = worker_env(tmp_path, proxy.url)
    log_path = tmp_path / "worker.log"
    proc = start_worker(env, ROOT, log_path)
    base = f"http://127.0.0.1:{env['PORT']}/simulator"
    try:
        await wait_until(lambda: proxy.status_of("acme") == "CONNECTED", timeout=20, what="connected")
        async with httpx.AsyncClient(headers=AUTH) as http:
            [inst] = (await http.get(base + "/instances")).json()
            assert inst["connect_proxies"] == ["socks5://***@127.0.0.1:1080"]
            r = await http.post(base + "/instances/acme/call", json={"from": "5511988887777", "video": False})
            assert r.status_code == 200, r.text
        call_id = r.json()["call_id"]
        await wait_until(lambda: call_id in proxy.inbound_ids(), timeout=10, what="call posted")
        assert next(p for p in proxy.inbound if p["wa_message_id"] == call_id)["rejected"] is True
        proc.send_signal(signal.SIGTERM)
        await wait_until(lambda: proc.poll() is not None, timeout=15, what="the process exits")
        assert proc.returncode == 0
        log_text = log_path.read_text()
        assert SECRET_PW not in log_text and "socks5://***@127.0.0.1:1080" in log_text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_long_list_is_one_summary_line_and_one_journal_transaction(tmp_path, caplog):
    """A start's full answer may list thousands of instances: ten lines, then one for the rest;
    all of them journaled (and read back by the next start)."""
    caplog.set_level(logging.INFO, logger="wa_worker.settings")
    journal = Journal(tmp_path / "j.db")
    configured: dict[str, object] = {}
    book = settings_mod.InstanceSettingsBook(configured.__setitem__, journal)
    changes = [(f"i{n}", {"send_max_per_day": n + 1}, False, proxy_choice(f"http://u:{SECRET_PW}@10.0.0.{n}:3128"))
               for n in range(30)]
    assert book.apply_all(changes) == 30
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 11 and "30 instance(s) changed, 30 of them their upstream proxy" in lines[-1]
    assert SECRET_PW not in caplog.text
    assert book.apply_all(changes) == 0  # the same again: nothing changes, nothing logged
    assert len(caplog.records) == 11
    again = settings_mod.InstanceSettingsBook({}.__setitem__, journal)
    assert again.load() == 30
    assert again.proxy_for("i7") == f"http://u:{SECRET_PW}@10.0.0.7:3128" and again.settings("i7") == {"send_max_per_day": 8}
    journal.close()
