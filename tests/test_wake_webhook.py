"""supabase/README.md says the dashboard's Database Webhook works with the worker's ``/wake``."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import AUTH
from tests.fakeproxy import SECRET
from tests.test_http_guard import View, guarded_server
from wa_worker.http.guard import ConnectionGuard
from wa_worker.http.server import build_app

# what Supabase's Database Webhook posts on an insert into wa_outbound
WEBHOOK_BODY = {
    "type": "INSERT", "table": "wa_outbound", "schema": "public", "old_record": None,
    "record": {"id": "6f1c2d3e-0000-4000-8000-000000000001", "instance_id": "acme-sales",
               "to": "+55 11 99999-0000", "body": "Olá!", "status": "queued"},
}


@pytest.mark.anyio
async def test_the_dashboard_webhook_payload_wakes_every_instance() -> None:
    view, guard = View(), ConnectionGuard()
    async with guarded_server(guard, build_app(view, SECRET, guard=guard)) as port:
        async with httpx.AsyncClient(trust_env=False) as http:
            r = await http.post(f"http://127.0.0.1:{port}/wake", headers=AUTH, json=WEBHOOK_BODY)
            assert r.status_code == 202, r.text
            assert view.woken == [None]  # no top-level instanceId: all instances
            big = {**WEBHOOK_BODY, "record": {**WEBHOOK_BODY["record"], "media_base64": "A" * 70_000}}
            r = await http.post(f"http://127.0.0.1:{port}/wake", headers=AUTH, json=big)
            assert r.status_code == 413  # the README's stated limit
