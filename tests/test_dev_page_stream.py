"""The dev page's change stream (``GET /ui/events``): a ``changed`` event after every write the page
shows, from any thread; nothing for an empty claim; loopback only; ended by the proxy's stop."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx

from wa_worker.dev.background import BackgroundProxy
from wa_worker.dev.store import DevStore

SECRET = "stream-test-secret-0123"


def _changed(lines: list[str]) -> list[int]:
    return [int(line.split(":")[-1].strip(" }")) for line in lines if line.startswith("data:")]


def test_changes_stream_to_the_page(tmp_path: Path) -> None:
    store = DevStore(tmp_path / "proxy.db")
    with BackgroundProxy(store, SECRET) as bp:
        refused = httpx.get(bp.url + "/ui/events", headers={"Host": "example.com"})
        assert refused.status_code == 403
        lines: list[str] = []
        ended = threading.Event()

        def read() -> None:
            with httpx.stream("GET", bp.url + "/ui/events", timeout=httpx.Timeout(10, read=None)) as resp:
                assert resp.headers["content-type"].startswith("text/event-stream")
                for line in resp.iter_lines():
                    lines.append(line)
            ended.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        deadline = time.monotonic() + 5
        while not _changed(lines) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _changed(lines) == [0]  # the current version, at once
        assert store.claim_messages("nobody") == []  # the worker's empty polls change nothing
        store.add_instance("acme")  # from this thread, not the proxy's
        store.update_status("acme", "CONNECTED", qr_code=None, phone_number="5511999990000")
        while len(_changed(lines)) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
        versions = _changed(lines)
        assert versions[-1] == 2 and versions == sorted(set(versions))
        assert "event: changed" in lines
        t0 = time.monotonic()
    assert ended.wait(5), "the proxy's stop did not end the stream"
    assert time.monotonic() - t0 < 5
    store.close()
