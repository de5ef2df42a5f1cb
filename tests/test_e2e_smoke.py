from __future__ import annotations

import pytest

from tests.conftest import make_settings, running_worker, wait_until

pytestmark = pytest.mark.anyio


async def test_qr_scan_send(proxy, tmp_path):
    proxy.add_instance("acme")
    proxy.enqueue("acme", "m1", "+55 11 98888-7777", "hello")
    async with running_worker(make_settings(tmp_path, proxy.url)) as w:
        await wait_until(lambda: any(s["qr_code"] for s in proxy.statuses_of("acme")), what="QR")
        w.backend.session("acme").scan()
        await wait_until(lambda: proxy.status_of("acme") == "CONNECTED", what="connected")
        await wait_until(lambda: "m1" in proxy.sent_marks, what="mark-sent")
        assert [s["to"] for s in w.backend.sent("acme")] == ["5511988887777@s.whatsapp.net"]
    assert proxy.status_of("acme") == "DISCONNECTED"
