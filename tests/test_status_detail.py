"""A DISCONNECTED status says what went wrong (``detail``), and the dev proxy and its page
show it next to the reason (issue #14: "the connect-failure detail, today only connect_failure")."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.conftest import AUTH, make_settings, running_worker, wait_until
from tests.fakeproxy import SECRET
from tests.proc import free_port
from wa_worker.dev.background import BackgroundProxy
from wa_worker.dev.store import DevStore
from wa_worker.edge.models import Status, StatusUpdate

pytestmark = pytest.mark.anyio


def test_detail_is_written_only_when_known() -> None:
    plain = StatusUpdate(instanceId="a", status=Status.DISCONNECTED, qr_code=None, reason="network").to_json()
    assert "detail" not in plain  # a v1 proxy sees exactly the fields it knew
    told = StatusUpdate(instanceId="a", status=Status.DISCONNECTED, qr_code=None, reason="connect_failure",
                        detail="simulated dial failure").to_json()
    assert told["detail"] == "simulated dial failure"


async def test_a_connect_failure_reaches_the_dev_page_with_its_cause(tmp_path: Path) -> None:
    store = DevStore(tmp_path / "proxy.db")
    store.add_instance("sales")
    worker_port = free_port()
    with BackgroundProxy(store, SECRET, wake_url=f"http://127.0.0.1:{worker_port}") as bp:
        settings = make_settings(tmp_path, bp.url, PORT=worker_port, SIMULATOR_AUTO_SCAN_MS=None)
        async with running_worker(settings) as w, httpx.AsyncClient(trust_env=False) as http:
            w.backend.fail_connects["sales"] = 100  # every dial fails, as a dead network would
            await wait_until(lambda: store.get_instance("sales")["reason"] == "connect_failure", 10,
                             "the failure reported")
            r = await http.get(bp.url + "/dev/instances", headers=AUTH)
            (inst,) = [i for i in r.json()["instances"] if i["id"] == "sales"]
            assert inst["reason_detail"] == "simulated dial failure"
            state = (await http.get(bp.url + "/ui/state")).json()
            assert any(i.get("reason_detail") == "simulated dial failure" for i in state["instances"])
    store.close()
