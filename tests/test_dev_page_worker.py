"""The page's view of the worker through the proxy (``/ui/state``'s ``worker``,
``POST /ui/simulator/…``) when there is no worker, or it is down."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.proc import free_port
from wa_worker.dev.background import BackgroundProxy
from wa_worker.dev.store import DevStore

SECRET = "page-worker-secret-123"
PAGE = {"X-WA-Dev": "1"}


def test_without_a_worker_and_with_a_dead_one(tmp_path: Path) -> None:
    store = DevStore(tmp_path / "p.db")
    store.add_instance("acme")
    with BackgroundProxy(store, SECRET) as bp:  # `wa-worker dev proxy`: no worker
        assert httpx.get(bp.url + "/ui/state", trust_env=False).json()["worker"] is None
        r = httpx.post(bp.url + "/ui/simulator/acme/scan", headers=PAGE, json={}, trust_env=False)
        assert r.status_code == 409 and "no worker" in r.json()["error"]
    with BackgroundProxy(store, SECRET, wake_url=f"http://127.0.0.1:{free_port()}") as bp:
        state = httpx.get(bp.url + "/ui/state", trust_env=False).json()
        assert state["worker"] == {"reachable": False}
        r = httpx.post(bp.url + "/ui/simulator/acme/inbound", headers=PAGE,
                       json={"from": "+55 11 98888-7777", "body": "hi"}, trust_env=False)
        assert r.status_code == 502 and r.json()["error"] == "the worker is not reachable"
        # the page's write rules hold: no X-WA-Dev header, no control; bad input is a 400
        r = httpx.post(bp.url + "/ui/simulator/acme/scan", json={}, trust_env=False)
        assert r.status_code == 403
        r = httpx.post(bp.url + "/ui/simulator/acme/inbound", headers=PAGE, json={"from": 5}, trust_env=False)
        assert r.status_code == 400
        r = httpx.post(bp.url + "/ui/simulator/acme/logout", headers=PAGE, json={}, trust_env=False)
        assert r.status_code == 404  # only scan and inbound are offered to the page
        assert SECRET not in httpx.get(bp.url + "/ui/state", trust_env=False).text
    store.close()
