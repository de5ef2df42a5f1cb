"""The dev page in a real headless Chromium (Debian's ``chromium`` package).

* the DOM after the page's JS ran (read over DevTools): status, QR image, messages;
* the DevTools protocol (aiohttp websocket client, no Playwright): type into
  the form, click "Queue", check the proxy's database; watch a live status
  change; take a screenshot and decode the QR code off it with zxing-cpp.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import time
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import qrcode

from tests.proc import stop_process
from wa_worker.dev.background import BackgroundProxy
from wa_worker.dev.leasing import LeaseRequest
from wa_worker.dev.store import DevStore

# a real 2x2 red PNG and a real 0.1 s WAV: the page must show the first as an <img>
# (decoded by Chromium) and the second in an <audio> player
PNG_2X2 = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAFklEQVR4nGP8z8DAwMDAxMDAwMDAAAANHQEDasKb6QAAAABJRU5ErkJggg=="
)


def _wav_bytes() -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\x00\x00" * 800)
    return buf.getvalue()


def keep_media(store: DevStore, data: bytes, mimetype: str) -> str:
    """Put ``data`` in the store's media folder as an upload would; returns its sha256."""
    import hashlib

    sha = hashlib.sha256(data).hexdigest()
    tmp = store.media_dir / f"media-{sha[:8]}"
    tmp.write_bytes(data)
    store.add_media(tmp, sha, mimetype, None)
    return sha

pytestmark = [pytest.mark.browser, pytest.mark.slow]

SECRET = "browser-test-secret-123"
QR_TEXT = "2@dev-page-test,AbCdEfGh0123456789=,IjKlMnOp=,QrStUvWx="
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--no-proxy-server",
    "--hide-scrollbars",
    "--window-size=1280,1500",
]


def _chromium() -> str:
    path = shutil.which("chromium") or (os.path.exists("/usr/bin/chromium") and "/usr/bin/chromium") or None
    if not path:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is required in CI (Debian package `chromium`)")
        pytest.skip("chromium is not installed (apt-get install chromium); CI runs this test")
    return path


def qr_data_url(text: str) -> str:
    img = qrcode.make(text, box_size=6, border=4)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture
def proxy(tmp_path: Path):
    store = DevStore(tmp_path / "proxy.db")
    store.add_instance("acme-sales")
    store.update_status("acme-sales", "CONNECTING", qr_code=qr_data_url(QR_TEXT))
    store.add_instance("acme-support", priority=1)
    store.update_status("acme-support", "CONNECTED", qr_code=None, phone_number="5511999990000")
    store.set_instance_settings("acme-support", settings={"call_reject": True, "send_max_per_minute": 10},
                                proxy_url="socks5://ops:pr0xy-pw@127.0.0.1:1080")
    sent = store.queue_message("acme-support", "+55 11 98888-7777", "Your order has shipped")
    store.claim_messages("acme-support")
    store.mark_sent(sent["id"], "3EB0C767D71D9A4B21F4")
    store.record_receipt("acme-support", sent["id"], "3EB0C767D71D9A4B21F4", "read", 1_800_000_000, None)
    store.add_inbound("acme-support", {"wa_message_id": "CALL1", "from": "5511977776666@s.whatsapp.net", "body": "",
                                       "type": "call", "video": True, "rejected": True})
    store.add_inbound(
        "acme-support",
        {
            "wa_message_id": "3A1B2C3D4E5F",
            "from": "5511988887777@s.whatsapp.net",
            "to": "5511999990000@s.whatsapp.net",
            "body": "Oi, tudo bem?",
            "push_name": "Maria",
            "timestamp": time.time(),
        },
    )
    # media both ways (issue #11): an inbound photo and voice note kept by /upload-media
    img_sha = keep_media(store, PNG_2X2, "image/png")
    wav_sha = keep_media(store, _wav_bytes(), "audio/wav")
    base_url = "http://127.0.0.1:8787/media/"  # the worker's view of the proxy: the page embeds the path
    store.add_inbound("acme-support", {
        "wa_message_id": "IMG1", "from": "5511988887777@s.whatsapp.net", "body": "a red square",
        "type": "image", "media": {"url": base_url + img_sha, "mimetype": "image/png", "size": len(PNG_2X2),
                                   "sha256": img_sha}})
    store.add_inbound("acme-support", {
        "wa_message_id": "VOX1", "from": "5511988887777@s.whatsapp.net", "body": "", "type": "voice",
        "quoted_id": "IMG1",
        "media": {"url": base_url + wav_sha, "mimetype": "audio/wav", "sha256": wav_sha, "seconds": 1}})
    store.add_inbound("acme-support", {
        "wa_message_id": "LOC1", "from": "5511988887777@s.whatsapp.net", "body": "", "type": "location",
        "latitude": -23.5614, "longitude": -46.6559, "name": "MASP"})
    store.add_inbound("acme-support", {
        "wa_message_id": "R1", "from": "5511988887777@s.whatsapp.net", "body": "", "type": "reaction",
        "reaction": {"emoji": "\u2764", "target_id": "IMG1"}})
    store.add_inbound("acme-support", {
        "wa_message_id": "DOC1", "from": "5511988887777@s.whatsapp.net", "body": "", "type": "document",
        "media": {"url": None, "mimetype": "application/pdf", "filename": "big.pdf"}, "media_error": "too_large"})
    failed = store.queue_message("acme-support", "5511988887777", "", {"type": "image",
                                                                         "media_url": "https://x.example/a.png"})
    store.mark_failed(failed["id"], "the media is larger than the 67108864-byte limit", "media_too_large")
    # user text that must be shown as text, never run as markup
    store.queue_message("acme-support", "<b>to</b>", "<script>alert(1)</script>")
    store.add_inbound("acme-support", {"wa_message_id": "XSS1", "from": "5511977776666@s.whatsapp.net",
                                       "body": "<img src=x onerror=alert(1)>", "push_name": "<i>x</i>"})
    # a fleet: the highest-priority instance leased to one worker
    assert store.lease(LeaseRequest("w-page1", 1), 30).granted == ["acme-support"]
    with BackgroundProxy(store, SECRET) as bp:
        yield bp
    store.close()


async def _dom_after_scripts(port: int, url: str) -> str:
    async with page_at(port, url) as b:  # page_at waits for the page's first render
        return str(await b.eval("document.documentElement.outerHTML"))


def test_dump_dom_after_scripts(proxy: BackgroundProxy, chromium_devtools: int) -> None:
    # the DOM read over DevTools once the page's script rendered (``--dump-dom --virtual-time-budget``
    # never returns now: virtual time does not advance while the page's event stream is open)
    dom = asyncio.run(asyncio.wait_for(_dom_after_scripts(chromium_devtools, proxy.url + "/"), 60))
    assert 'data-refreshed="' in dom, "the page's script did not refresh the state"
    assert 'class="live ok"' in dom
    assert 'data-instance-id="acme-sales"' in dom and 'data-instance-id="acme-support"' in dom
    assert 'class="status status-CONNECTING"' in dom and 'class="status status-CONNECTED"' in dom
    assert 'src="data:image/png;base64,' in dom
    assert "+5511999990000" in dom
    assert "Your order has shipped" in dom and "mstatus-sent" in dom
    assert "Oi, tudo bem?" in dom and "Maria" in dom
    assert SECRET not in dom
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom and "<script>alert(1)</script>" not in dom
    assert "&lt;img src=x onerror=alert(1)&gt;" in dom and "<img src=x" not in dom
    assert "&lt;b&gt;to&lt;/b&gt;" in dom and "(&lt;i&gt;x&lt;/i&gt;)" in dom and "<i>x</i>" not in dom
    # message types: media inline, reply snippet, location link, reaction, media error, error code
    assert '<img class="media" src="/media/' in dom and '<audio class="media" src="/media/' in dom
    assert "\u201ca red square\u201d" in dom  # the voice note quotes the photo, the reaction names it
    assert "openstreetmap.org/?mlat=-23.5614&amp;mlon=-46.6559" in dom and "MASP" in dom
    assert "\u2764 on \u201ca red square\u201d" in dom
    assert "media not kept: too_large" in dom
    assert "[media_too_large] the media is larger" in dom
    # issue #12: a sent message's receipt, a rejected call
    assert "\u2713 read" in dom and "video call, rejected" in dom
    # the instance's own settings and upstream proxy, its password never on the page
    assert "upstream proxy socks5://***@127.0.0.1:1080" in dom and "pr0xy-pw" not in dom
    assert "settings: call_reject=true, send_max_per_minute=10" in dom
    assert "lease: w-page1 #1" in dom  # issue #13: who holds the instance


# ---------------------------------------------------------------------------- DevTools protocol


class Browser:
    """Just enough of the DevTools protocol over aiohttp's websocket client."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._id = 0

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        my_id = self._id
        await self.ws.send_str(json.dumps({"id": my_id, "method": method, "params": params}))
        while True:
            msg = await asyncio.wait_for(self.ws.receive(), 30)
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise RuntimeError(f"devtools websocket closed: {msg.type}")
            data = json.loads(msg.data)
            if data.get("id") == my_id:
                if "error" in data:
                    raise RuntimeError(f"{method}: {data['error']}")
                return data.get("result", {})

    async def eval(self, expression: str) -> Any:
        res = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"JS error in {expression!r}: {res['exceptionDetails']}")
        return res["result"].get("value")

    async def wait_for(self, expression: str, within: float = 10.0) -> Any:
        deadline = time.monotonic() + within
        while True:
            value = await self.eval(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {expression}")
            await asyncio.sleep(0.1)

    async def type_into(self, selector: str, text: str) -> None:
        await self.click(selector)
        await self.send("Input.insertText", text=text)

    async def click(self, selector: str) -> None:
        box = await self.eval(
            f"(() => {{ const el = document.querySelector({json.dumps(selector)});"
            " el.scrollIntoView({block: 'center'}); const r = el.getBoundingClientRect();"
            " return {x: r.x + r.width / 2, y: r.y + r.height / 2}; })()"
        )
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            await self.send(
                "Input.dispatchMouseEvent", type=kind, x=box["x"], y=box["y"], button="left", clickCount=1
            )


def _devtools_port(profile: Path, proc: subprocess.Popen, timeout: float = 30.0) -> int:
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited with {proc.returncode}")
        try:
            first = marker.read_text().splitlines()[0]
            return int(first)
        except (OSError, IndexError, ValueError):
            time.sleep(0.1)
    raise TimeoutError("chromium did not open its DevTools port")


@pytest.fixture
def chromium_devtools(tmp_path: Path):
    chromium = _chromium()
    profile = tmp_path / "profile-cdp"
    log = open(tmp_path / "chromium.log", "wb")
    proc = subprocess.Popen(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield _devtools_port(profile, proc)
    finally:
        stop_process(proc, 10)
        log.close()


@contextlib.asynccontextmanager
async def page_at(port: int, url: str) -> AsyncIterator[Browser]:
    """The headless browser's page (DevTools on ``port``) navigated to ``url`` and rendered once."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/json/list") as resp:
            targets = await resp.json(content_type=None)
        page = next(t for t in targets if t.get("type") == "page")
        async with session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=64 * 1024 * 1024) as ws:
            b = Browser(ws)
            await b.send("Page.enable")
            await b.send("Runtime.enable")
            await b.send("Page.navigate", url=url)
            await b.wait_for("document.body && document.body.dataset.refreshed >= 1")
            yield b


# long: one browser session, the page's steps in the order a user takes them
async def _drive(port: int, proxy: BackgroundProxy, upload_file: Path) -> dict[str, Any]:
    async with page_at(port, proxy.url + "/") as b:
        seen: dict[str, Any] = {}
        seen["statuses"] = await b.eval(
            "Object.fromEntries([...document.querySelectorAll('article.instance')].map("
            "a => [a.dataset.instanceId, a.querySelector('[data-field=status]').textContent]))"
        )
        seen["qr_visible"] = await b.eval(
            "(() => { const i = document.querySelector('[data-instance-id=\"acme-sales\"] img.qr');"
            " return !i.hidden && i.complete && i.naturalWidth > 0 && i.src.startsWith('data:image/png'); })()"
        )

        # inbound media is shown: the photo decoded in an <img>, the voice note in an <audio>
        seen["inbound_img"] = await b.wait_for(
            "(() => { const i = document.querySelector('tr[data-wa-message-id=\"IMG1\"] img.media');"
            " return i && i.complete && i.naturalWidth === 2 ? i.getAttribute('src') : ''; })()"
        )
        seen["inbound_audio"] = await b.eval(
            "(() => { const a = document.querySelector('tr[data-wa-message-id=\"VOX1\"] audio.media');"
            " return a ? a.getAttribute('src') : null; })()"
        )
        seen["audio_fetch"] = await b.eval(
            f"fetch({json.dumps(proxy.url)} + document.querySelector('tr[data-wa-message-id=\"VOX1\"] audio')"
            ".getAttribute('src')).then(r => r.status + ' ' + r.headers.get('content-type'))"
        )

        # screenshot with the QR code on it
        png = await b.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        seen["screenshot"] = base64.b64decode(png["data"])

        # a real user: pick the instance, type, click
        await b.eval("document.querySelector('#queue-form select').value = 'acme-support'")
        await b.type_into("#queue-form input[name=to]", "+55 11 97777-6666")
        await b.type_into("#queue-form textarea[name=body]", "Hello from Chromium")
        await b.click("#queue-form button[type=submit]")
        seen["result"] = await b.wait_for(
            "(() => { const t = document.querySelector('#queue-form [data-field=result]').textContent;"
            " return t.startsWith('queued') ? t : ''; })()"
        )
        seen["row_status"] = await b.wait_for(
            "(() => { const r = [...document.querySelectorAll('#outbound-rows tr')].find("
            "tr => tr.textContent.includes('Hello from Chromium'));"
            " return r && r.querySelector('.mstatus').textContent; })()"
        )
        seen["body_cleared"] = await b.eval("document.querySelector('#queue-form textarea').value === ''")

        # an error from the proxy is shown, not swallowed
        await b.type_into("#queue-form textarea[name=body]", "x")
        await b.eval("document.querySelector('#queue-form input[name=to]').value = '   '")
        await b.eval("document.querySelector('#queue-form input[name=to]').removeAttribute('required')")
        await b.click("#queue-form button[type=submit]")
        seen["error"] = await b.wait_for(
            "(() => { const e = document.querySelector('#queue-form .result.error'); return e && e.textContent; })()"
        )

        # send a photo from the form: type image, a file, a reply-to
        await b.eval("document.querySelector('#queue-form select[name=type]').value = 'image'")
        await b.eval("document.querySelector('#queue-form select[name=type]')"
                     ".dispatchEvent(new Event('change'))")
        doc = await b.send("DOM.getDocument")
        node = await b.send("DOM.querySelector", nodeId=doc["root"]["nodeId"],
                            selector="#queue-form input[name=media]")
        await b.send("DOM.setFileInputFiles", files=[str(upload_file)], nodeId=node["nodeId"])
        await b.eval("document.querySelector('#queue-form input[name=to]').setAttribute('required', '')")
        await b.eval("document.querySelector('#queue-form input[name=to]').value = '5511966665555'")
        await b.eval("document.querySelector('#queue-form textarea').value = 'a photo caption'")
        await b.eval("document.querySelector('#queue-form input[name=reply_to]').value = 'IMG1'")
        await b.click("#queue-form button[type=submit]")
        seen["photo_result"] = await b.wait_for(
            "(() => { const t = document.querySelector('#queue-form [data-field=result]');"
            " return t.textContent.startsWith('queued') || t.classList.contains('error') ? t.textContent : ''; })()"
        )
        seen["photo_row"] = await b.wait_for(
            "(() => { const r = [...document.querySelectorAll('#outbound-rows tr')].find("
            "tr => tr.textContent.includes('a photo caption')); const i = r && r.querySelector('img.media');"
            " return i && i.complete && i.naturalWidth === 2 ? r.dataset.type : ''; })()"
        )

        # live update: the worker reports CONNECTED, the QR disappears without a reload
        proxy.store.update_status("acme-sales", "CONNECTED", qr_code=None, phone_number="5511911112222")
        await b.wait_for(
            "document.querySelector('[data-instance-id=\"acme-sales\"] [data-field=status]').textContent"
            " === 'CONNECTED'"
        )
        seen["qr_hidden"] = await b.eval(
            "document.querySelector('[data-instance-id=\"acme-sales\"] img.qr').hidden"
        )
        seen["detail"] = await b.eval(
            "document.querySelector('[data-instance-id=\"acme-sales\"] [data-field=detail]').textContent"
        )

        # add an instance from the page
        await b.type_into("#instance-form input[name=id]", "acme-new")
        await b.click("#instance-form button[type=submit]")
        await b.wait_for("!!document.querySelector('[data-instance-id=\"acme-new\"]')")
        seen["options"] = await b.eval(
            "[...document.querySelectorAll('#queue-form select[name=instanceId] option')].map(o => o.value)"
        )
        return seen


def test_page_in_chromium(proxy: BackgroundProxy, chromium_devtools: int, tmp_path: Path) -> None:
    shot = tmp_path / "dev-page.png"
    upload_file = tmp_path / "square.png"
    upload_file.write_bytes(PNG_2X2)
    seen = asyncio.run(asyncio.wait_for(_drive(chromium_devtools, proxy, upload_file), 90))
    shot.write_bytes(seen["screenshot"])

    assert seen["statuses"] == {"acme-sales": "CONNECTING", "acme-support": "CONNECTED"}
    assert seen["qr_visible"] is True

    rows = [m for m in proxy.store.list_outbound() if m["body"] == "Hello from Chromium"]
    assert len(rows) == 1
    assert rows[0]["instanceId"] == "acme-support" and rows[0]["to"] == "+55 11 97777-6666"
    assert rows[0]["status"] == "queued"
    assert seen["result"] == f"queued {rows[0]['id']}"
    assert seen["row_status"] == "queued" and seen["body_cleared"] is True
    assert seen["error"] == "to is required"

    assert seen["inbound_img"].startswith("/media/")
    assert seen["inbound_audio"].startswith("/media/")
    assert seen["audio_fetch"] == "200 audio/wav"
    [photo] = [m for m in proxy.store.list_outbound() if m["body"] == "a photo caption"]
    assert seen["photo_result"] == f"queued {photo['id']}"
    assert seen["photo_row"] == "image"
    assert (photo["type"], photo["mimetype"], photo["filename"], photo["reply_to"]) == (
        "image", "image/png", "square.png", "IMG1")
    assert (proxy.store.media_dir / photo["media_sha256"]).read_bytes() == PNG_2X2

    assert seen["qr_hidden"] is True and seen["detail"] == "+5511911112222"
    assert proxy.store.has_instance("acme-new")
    assert seen["options"] == ["acme-sales", "acme-support", "acme-new"]

    # the QR code on the screenshot is scannable and carries the pairing text
    zxingcpp = pytest.importorskip("zxingcpp")
    from PIL import Image

    with Image.open(shot) as img:
        assert img.width >= 1000
        codes = zxingcpp.read_barcodes(img.convert("RGB"))
    assert [c.text for c in codes] == [QR_TEXT]
    if os.environ.get("WA_DEV_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["WA_DEV_KEEP_SCREENSHOT"])


async def _drive_stream(port: int, proxy: BackgroundProxy) -> dict[str, Any]:
    async with page_at(port, proxy.url + "/") as b:
        # no poll while the stream is open (the slow one stretched to an hour): only an event can update
        await b.eval("document.body.dataset.slowPollMs = String(3600 * 1000)")
        await b.wait_for("document.body.dataset.stream === 'open'")
        refreshed = await b.eval("Number(document.body.dataset.refreshed)")
        t0 = time.monotonic()
        proxy.store.update_status("acme-sales", "CONNECTED", qr_code=None, phone_number="5511911112222")
        await b.wait_for(
            "document.querySelector('[data-instance-id=\"acme-sales\"] [data-field=status]').textContent"
            " === 'CONNECTED'", within=5)
        return {"elapsed": time.monotonic() - t0, "by": await b.eval("document.body.dataset.refreshedBy"),
                "more": await b.eval("Number(document.body.dataset.refreshed)") - refreshed}


def test_page_updates_from_the_stream_without_polling(proxy: BackgroundProxy, chromium_devtools: int) -> None:
    seen = asyncio.run(asyncio.wait_for(_drive_stream(chromium_devtools, proxy), 60))
    assert seen["by"] == "event" and seen["more"] >= 1
    assert seen["elapsed"] < 3


# ---------------------------------------------------------------------------- with a simulator worker


# long: one browser session against a real worker, the steps in the order a user takes them
async def _drive_simulator(port: int, tmp_path: Path) -> dict[str, Any]:
    from tests.conftest import make_settings, running_worker  # the worker's test helpers: only here
    from tests.fakeproxy import SECRET as WORKER_SECRET
    from tests.proc import free_port

    store = DevStore(tmp_path / "proxy.db")
    store.add_instance("default")
    worker_port = free_port()
    seen: dict[str, Any] = {}
    with BackgroundProxy(store, WORKER_SECRET, wake_url=f"http://127.0.0.1:{worker_port}") as bp:
        async with page_at(port, bp.url + "/") as b:
            # no worker yet: a neutral WAITING, the worker badge says so, empty tables say what to do
            seen["waiting"] = await b.eval(
                "document.querySelector('[data-instance-id=\"default\"] [data-field=status]').className")
            seen["badge_before"] = await b.eval("document.getElementById('worker').textContent")
            seen["empty_out"] = await b.eval("document.querySelector('#outbound-rows tr.empty').textContent")
            seen["sim_hidden_before"] = await b.eval("document.getElementById('simulate-form').hidden")

            settings = make_settings(tmp_path, bp.url, PORT=worker_port, SIMULATOR_AUTO_SCAN_MS=None)
            async with running_worker(settings):
                seen["badge"] = await b.wait_for(
                    "(() => { const t = document.getElementById('worker').textContent;"
                    " return t.includes('simulator') ? t : ''; })()")
                scan = "[data-instance-id=\"default\"] button[data-action=scan]"
                await b.wait_for(f"!document.querySelector('{scan}').hidden")
                await b.click(scan)
                await b.wait_for(
                    "document.querySelector('[data-instance-id=\"default\"] [data-field=status]').textContent"
                    " === 'CONNECTED'", within=15)
                seen["scan_hidden_after"] = await b.eval(f"document.querySelector('{scan}').hidden")
                seen["empty_in"] = await b.eval("document.querySelector('#inbound-rows tr.empty').textContent")

                await b.wait_for("!document.getElementById('simulate-form').hidden")
                await b.type_into("#simulate-form input[name=body]", "hello from the page")
                await b.click("#simulate-form button[type=submit]")
                seen["sim_result"] = await b.wait_for(
                    "(() => { const t = document.querySelector('#simulate-form [data-field=result]');"
                    " return t.textContent.startsWith('received') || t.classList.contains('error')"
                    " ? t.textContent : ''; })()")
                seen["inbound_row"] = await b.wait_for(
                    "(() => { const r = [...document.querySelectorAll('#inbound-rows tr')].find("
                    "tr => tr.textContent.includes('hello from the page'));"
                    " return r && [...r.cells].map(c => c.textContent); })()", within=15)
    store.close()
    return seen


def test_page_drives_the_simulator_and_shows_the_worker(chromium_devtools: int, tmp_path: Path) -> None:
    seen = asyncio.run(asyncio.wait_for(_drive_simulator(chromium_devtools, tmp_path), 90))
    assert seen["waiting"] == "status status-WAITING"
    assert seen["badge_before"] == "worker not reachable"
    assert "Nothing sent yet" in seen["empty_out"]
    assert seen["sim_hidden_before"] is True
    assert "worker ok" in seen["badge"] and "simulator" in seen["badge"]
    assert seen["scan_hidden_after"] is True
    assert "Simulate incoming" in seen["empty_in"]
    assert seen["sim_result"].startswith("received "), seen["sim_result"]
    when, instance, sender, _msg, _id = seen["inbound_row"]
    assert instance == "default" and sender == "+55 11 98888-7777"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", when), when
