"""The dev proxy's per-instance settings (issue #12): ``wa-worker dev instance set``,
the dev API, ``GET /instance-settings?since=`` (changes only) and the discovery
items; end to end with the real worker on the simulator."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest

from tests.conftest import AUTH, make_settings, run_cli, running_worker, wait_until
from tests.fakeproxy import SECRET
from wa_worker.dev.background import BackgroundProxy
from wa_worker.dev.store import DevStore
from wa_worker.instances import settings as settings_mod

PW = "dev-pr0xy-pw"


# long: the CLI, the dev API and both contract reads checked against each other in one sequence
def test_instance_set_feeds_instance_settings_and_discovery(dev_proxy: BackgroundProxy, state_dir: Path,
                                                            capsys) -> None:
    d = str(state_dir)
    assert run_cli(capsys, "instance", "add", "acme", "--dir", d)[0] == 0
    assert run_cli(capsys, "instance", "add", "other", "--dir", d)[0] == 0
    with httpx.Client(base_url=dev_proxy.url, headers=AUTH, trust_env=False) as http:
        first = http.get("/instance-settings").json()
        assert first == {"instances": [], "cursor": "0"}
        # nothing set yet: discovery items as before (no settings keys)
        assert http.get("/disconnected-instances").json()["instances"][0].keys() == {"id", "priority"}

        code, out, _ = run_cli(capsys, "instance", "set", "acme", "--dir", d, "--setting", "call_reject=true",
                           "--setting", "call_reject_message=Sorry, text us", "--setting", "send_max_per_minute=10",
                           "--upstream-proxy", f"http://ops:{PW}@127.0.0.1:3128")
        assert code == 0 and PW not in out and "http://***@127.0.0.1:3128" in out
        changed = http.get("/instance-settings", params={"since": first["cursor"]}).json()
        assert changed["instances"] == [{"id": "acme", "proxy_url": f"http://ops:{PW}@127.0.0.1:3128", "settings": {
            "call_reject": True, "call_reject_message": "Sorry, text us", "send_max_per_minute": 10}}]
        # changes only: nothing new since that cursor
        assert http.get("/instance-settings", params={"since": changed["cursor"]}).json()["instances"] == []
        items = {i["id"]: i for i in http.get("/disconnected-instances").json()["instances"]}
        assert items["acme"]["settings"]["call_reject"] is True and items["acme"]["proxy_url"].endswith(":3128")
        assert "settings" not in items["other"]

        code, _, _ = run_cli(capsys, "instance", "set", "acme", "--dir", d, "--unset", "send_max_per_minute", "--direct")
        assert code == 0
        again = http.get("/instance-settings", params={"since": changed["cursor"]}).json()
        assert again["instances"] == [{"id": "acme", "proxy_url": None, "settings": {
            "call_reject": True, "call_reject_message": "Sorry, text us"}}]
        assert int(again["cursor"]) > int(changed["cursor"])

        # refusals: a bad proxy URL (its credentials not echoed), an unknown instance, a bad cursor
        code, _, err = run_cli(capsys, "instance", "set", "acme", "--dir", d, "--upstream-proxy", f"ftp://ops:{PW}@h:21")
        assert code == 1 and "scheme 'ftp' is not supported" in err and PW not in err
        r = http.post("/dev/instances/nobody/settings", json={"settings": {"call_reject": True}})
        assert r.status_code == 404
        r = http.post("/dev/instances/acme/settings", json={"settings": {"x": {"nested": 1}}})
        assert r.status_code == 400
        assert http.get("/instance-settings", params={"since": "abc"}).status_code == 400
        listed = {i["id"]: i for i in http.get("/dev/instances").json()["instances"]}
        assert listed["acme"]["proxy_url"] is None and listed["acme"]["settings"]["call_reject"] is True
        code, _, _ = run_cli(capsys, "instance", "set", "acme", "--dir", d, "--reset")
        assert code == 0
        assert http.get("/dev/instances").json()["instances"][0]["settings"] is None


@pytest.mark.anyio
async def test_dev_proxy_settings_reach_a_connected_worker(tmp_path: Path, monkeypatch, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setattr(settings_mod, "SETTINGS_POLL_S", 0.3)
    store = DevStore(tmp_path / "proxy.db")
    with BackgroundProxy(store, SECRET) as bp:
        store.add_instance("acme")
        settings = make_settings(tmp_path, bp.url, SIMULATOR_AUTO_SCAN_MS=50, CALL_REJECT=False)
        async with running_worker(settings) as w, httpx.AsyncClient(base_url=bp.url, headers=AUTH,
                                                                     trust_env=False) as http:
            await wait_until(lambda: store.get_instance("acme")["status"] == "CONNECTED", what="acme CONNECTED")
            assert w.backend.connect_proxies["acme"] == ["direct"]
            r = await http.post("/dev/instances/acme/settings", json={
                "settings": {"call_reject": True}, "proxy_url": f"socks5://ops:{PW}@127.0.0.1:1080"})
            assert r.status_code == 200, r.text
            await wait_until(lambda: w.manager.instance_settings.settings("acme"), timeout=3, what="picked up")
            sim = f"http://127.0.0.1:{w.port}/simulator/instances/acme"
            r = await http.post(sim + "/call", json={"from": "5511988887777", "video": True})
            assert r.status_code == 200, r.text
            await wait_until(lambda: any(m["type"] == "call" for m in store.list_inbound("acme")), what="call stored")
            call = next(m for m in store.list_inbound("acme") if m["type"] == "call")
            assert call["call"] == {"video": True, "rejected": True}
            assert (await http.post(sim + "/drop")).status_code == 200
            await wait_until(lambda: len(w.backend.connect_proxies["acme"]) == 2, what="reconnect")
            assert w.backend.connect_proxies["acme"][1] == "socks5://***@127.0.0.1:1080"
    store.close()
    assert PW not in caplog.text
