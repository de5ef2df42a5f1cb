"""Every received type reaches /inbound (issue #11): end to end on the simulator
(through its HTTP control route), the real relay and journal, a real proxy on loopback."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import signal
import subprocess
from typing import Any

import anyio
import httpx
import pytest
from aiohttp import web

from tests.conftest import make_settings, running_worker, serving, wait_until
from tests.fakeproxy import SECRET
from tests.proc import ROOT, start_worker, worker_env
from wa_worker.backends.simulator import MEDIA_DIR

pytestmark = pytest.mark.anyio

AUTH = {"Authorization": f"Bearer {SECRET}"}
PEER = "5511988887777"
PEER_JID = f"{PEER}@s.whatsapp.net"
V1_KEYS = {"instanceId", "from", "to", "body", "wa_message_id", "chat_id", "sender_id", "from_me", "is_group",
           "push_name", "timestamp"}


def blob(n: int, seed: bytes = b"x") -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(seed + counter.to_bytes(8, "big")).digest()
        counter += 1
    return bytes(out[:n])


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def receive(port: int, iid: str = "acme", **fields: object) -> str:
    """A message arrives from the simulated phone (the simulator's HTTP route)."""
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.post(f"http://127.0.0.1:{port}/simulator/instances/{iid}/inbound", headers=AUTH,
                            json={"from": PEER, **fields})
    assert r.status_code == 200, r.text
    return str(r.json()["wa_message_id"])


async def connected(w, proxy, iid: str = "acme") -> None:
    await wait_until(lambda: proxy.status_of(iid) == "CONNECTED", what="CONNECTED")
    await wait_until(lambda: w.manager.session(iid) is not None, what="session connected")


def by_id(proxy, wa_id: str) -> dict:
    return next(p for p in proxy.inbound if p["wa_message_id"] == wa_id)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# long: one scenario: every inbound kind through one worker, checked field by field
async def test_every_type_reaches_inbound_with_its_fields_and_bytes(proxy, tmp_path):
    proxy.add_instance("acme")
    jpeg, mp4, mp3, ogg, pdf, webp = (blob(n, k) for n, k in
                                      ((3000, b"j"), (5000, b"v"), (4000, b"a"), (2000, b"o"), (7000, b"p"),
                                       (1500, b"s")))
    vcard = "BEGIN:VCARD\nVERSION:3.0\nFN:Ana Souza\nTEL;type=CELL;waid=5511912345678:+55 11 91234-5678\nEND:VCARD"
    async with running_worker(make_settings(tmp_path, proxy.url, SIMULATOR_AUTO_SCAN_MS=30)) as w:
        await connected(w, proxy)
        port = w.port
        ids = {
            "text": await receive(port, body="oi"),
            "image_caption": await receive(port, type="image", media_base64=b64(jpeg), mimetype="image/jpeg",
                                           caption="look at this"),
            "image_bare": await receive(port, type="image", media_base64=b64(jpeg[:1000]), mimetype="image/jpeg"),
            "video": await receive(port, type="video", media_base64=b64(mp4), mimetype="video/mp4", caption="vid"),
            "audio": await receive(port, type="audio", media_base64=b64(mp3), mimetype="audio/mpeg"),
            "voice": await receive(port, type="voice", media_base64=b64(ogg), mimetype="audio/ogg; codecs=opus"),
            "document": await receive(port, type="document", media_base64=b64(pdf), mimetype="application/pdf",
                                      filename="relatório 2024.pdf", caption="the report"),
            "sticker": await receive(port, type="sticker", media_base64=b64(webp), mimetype="image/webp"),
            "location": await receive(port, type="location", latitude=-23.5505, longitude=-46.6333,
                                      name="Sé", address="Praça da Sé, São Paulo"),
            "contact": await receive(port, type="contact", vcard=vcard),
            "contact_simple": await receive(port, type="contact", contact={"name": "Bob", "phone": "+1 555 0100"}),
        }
        ids["reply"] = await receive(port, body="answering you", reply_to=ids["text"])
        ids["reaction"] = await receive(port, type="reaction", reaction="👍", target_id=ids["text"])
        ids["unreact"] = await receive(port, type="reaction", reaction="", target_id=ids["text"])
        ids["edit"] = await receive(port, type="edit", body="oi, corrected", target_id=ids["text"])
        ids["revoke"] = await receive(port, type="revoke", target_id=ids["reply"])
        ids["view_once"] = await receive(port, type="image", media_base64=b64(jpeg[:500]), mimetype="image/jpeg",
                                         view_once=True)
        await wait_until(lambda: len(proxy.inbound) == len(ids), timeout=20, what="every message posted")
        # one chat: posted in arrival order, media included
        assert proxy.inbound_ids() == list(ids.values())
        p = {name: by_id(proxy, wa_id) for name, wa_id in ids.items()}
        for name, body in p.items():
            assert V1_KEYS <= set(body), name
            assert isinstance(body["body"], str), name
            assert body["from"] == PEER_JID and body["instanceId"] == "acme"
            assert not [k for k in body if k.startswith("_")], name  # the download handle is never posted
        assert p["text"]["type"] == "text" and p["text"]["body"] == "oi" and "media" not in p["text"]

        def media_ok(name: str, data: bytes, kind: str, mimetype: str, body: str = "",
                     filename: str | None = None) -> None:
            got = p[name]
            assert got["type"] == kind and got["body"] == body, got
            m = got["media"]
            assert m["mimetype"] == mimetype and m["size"] == len(data) and m["sha256"] == sha(data)
            assert m["filename"] == filename
            assert "media_error" not in got
            key = ("acme", ids[name])
            assert m["url"] == f"{proxy.url}/media/acme/{ids[name]}"
            assert sha(proxy.uploads[key]) == sha(data)  # the bytes uploaded are the bytes received
            headers = proxy.upload_headers[key]
            assert headers["Content-Type"] == mimetype and headers["X-Sha256"] == sha(data)

        media_ok("image_caption", jpeg, "image", "image/jpeg", body="look at this")
        media_ok("image_bare", jpeg[:1000], "image", "image/jpeg")
        media_ok("video", mp4, "video", "video/mp4", body="vid")
        media_ok("audio", mp3, "audio", "audio/mpeg")
        media_ok("voice", ogg, "voice", "audio/ogg; codecs=opus")
        media_ok("document", pdf, "document", "application/pdf", body="the report", filename="relatório 2024.pdf")
        assert proxy.upload_headers[("acme", ids["document"])]["X-Filename"] == "relat%C3%B3rio 2024.pdf"
        media_ok("sticker", webp, "sticker", "image/webp")
        media_ok("view_once", jpeg[:500], "image", "image/jpeg")
        assert p["view_once"]["view_once"] is True and "view_once" not in p["image_bare"]
        loc = p["location"]
        assert (loc["type"], loc["latitude"], loc["longitude"], loc["name"], loc["address"], loc["body"]) == (
            "location", -23.5505, -46.6333, "Sé", "Praça da Sé, São Paulo", "")
        assert p["contact"]["contact"] == {"name": "Ana Souza", "vcard": vcard, "phone": "5511912345678"}
        simple = p["contact_simple"]["contact"]
        assert simple["name"] == "Bob" and simple["phone"] == "15550100" and "BEGIN:VCARD" in simple["vcard"]
        assert p["reply"]["type"] == "text" and p["reply"]["quoted_id"] == ids["text"]
        assert p["reply"]["body"] == "answering you"
        assert p["reaction"]["type"] == "reaction" and p["reaction"]["body"] == ""
        assert p["reaction"]["reaction"] == {"emoji": "👍", "target_id": ids["text"]}
        assert p["unreact"]["reaction"] == {"emoji": "", "target_id": ids["text"]}
        assert (p["edit"]["type"], p["edit"]["target_id"], p["edit"]["body"]) == ("edit", ids["text"], "oi, corrected")
        assert (p["revoke"]["type"], p["revoke"]["target_id"], p["revoke"]["body"]) == ("revoke", ids["reply"], "")
        assert proxy.upload_posts == 8  # each media message uploaded once
        # the proxy has each one before the worker reads its 2xx and drops the row: wait for that
        await wait_until(lambda: w.health()["inbound"]["pending"] == 0, what="outbox empty")
        # no download left behind
        leftovers = tmp_path / "state" / "media-tmp" / "inbound"
        assert not leftovers.exists() or not any(leftovers.iterdir())
        # the simulator keeps received media private
        media_dir = tmp_path / "auth" / "acme" / MEDIA_DIR
        assert all(oct(f.stat().st_mode & 0o777) == "0o600" for f in media_dir.iterdir())


async def test_simulator_route_says_what_is_wrong(proxy, tmp_path):
    proxy.add_instance("acme")
    async with running_worker(make_settings(tmp_path, proxy.url, SIMULATOR_AUTO_SCAN_MS=30)) as w:
        await connected(w, proxy)
        url = f"http://127.0.0.1:{w.port}/simulator/instances/acme/inbound"
        cases = [
            ({"type": "gif"}, "'type' must be one of"),
            ({"type": "image"}, "needs 'media_base64'"),
            ({"type": "image", "media_base64": "not base64!"}, "not base64"),
            ({"type": "reaction", "reaction": "👍"}, "needs 'target_id'"),
            ({"type": "reaction", "target_id": "ABC"}, "needs 'reaction'"),
            ({"type": "edit", "target_id": "ABC"}, "non-empty 'body'"),
            ({"type": "revoke", "target_id": "bad id with spaces"}, "not a WhatsApp message id"),
            ({"type": "location", "latitude": 91, "longitude": 0}, "'latitude' must be between"),
            ({"type": "contact"}, "a contact needs"),
            ({"body": "hi", "reply_to": 5}, "'reply_to' must be a string"),
        ]
        async with httpx.AsyncClient(timeout=10) as http:
            for fields, needle in cases:
                r = await http.post(url, headers=AUTH, json={"from": PEER, **fields})
                assert r.status_code == 400, (fields, r.text)
                assert needle in r.json()["error"], (fields, r.text)
        assert proxy.inbound == []


async def test_upload_retried_after_proxy_faults(proxy, tmp_path):
    proxy.add_instance("acme")
    proxy.fail["upload-media"] = 2  # 500, 500, then 200
    data = blob(9000, b"retry")
    async with running_worker(make_settings(tmp_path, proxy.url, SIMULATOR_AUTO_SCAN_MS=30),
                              retry_cap_s=0.3) as w:
        await connected(w, proxy)
        wa_id = await receive(w.port, type="document", media_base64=b64(data), mimetype="application/pdf",
                              filename="a.pdf")
        await wait_until(lambda: len(proxy.inbound) == 1, timeout=15, what="posted after upload faults")
        assert proxy.calls["upload-media"] == 3
        got = proxy.inbound[0]
        assert got["wa_message_id"] == wa_id and got["media"]["url"].endswith(f"/media/acme/{wa_id}")
        assert sha(proxy.uploads[("acme", wa_id)]) == sha(data) == got["media"]["sha256"]
        assert proxy.inbound_posts == 1


async def test_proxy_without_upload_media_gets_metadata_and_one_log_line(proxy, tmp_path, caplog):
    proxy.add_instance("acme")
    proxy.upload_media_status = 404
    caplog.set_level(logging.INFO)
    async with running_worker(make_settings(tmp_path, proxy.url, SIMULATOR_AUTO_SCAN_MS=30)) as w:
        await connected(w, proxy)
        first = await receive(w.port, type="image", media_base64=b64(blob(2000)), mimetype="image/jpeg",
                              caption="c1")
        second = await receive(w.port, type="voice", media_base64=b64(blob(3000)), mimetype="audio/ogg")
        await wait_until(lambda: len(proxy.inbound) == 2, timeout=15, what="both posted")
        for wa_id in (first, second):
            got = by_id(proxy, wa_id)
            assert got["media"]["url"] is None and got["media_error"] == "upload_unsupported"
            assert got["media"]["sha256"] and got["media"]["size"]
        assert by_id(proxy, first)["body"] == "c1"
        assert proxy.calls["upload-media"] == 1  # remembered: asked once
        lines = [r for r in caplog.records if "no /upload-media" in r.getMessage()]
        assert len(lines) == 1


@pytest.mark.parametrize(("status", "error"), [(400, "upload_failed"), (413, "too_large")])
async def test_upload_refused_for_good_posts_the_metadata(proxy, tmp_path, status, error):
    proxy.add_instance("acme")
    proxy.fixed_status["upload-media"] = status
    async with running_worker(make_settings(tmp_path, proxy.url, SIMULATOR_AUTO_SCAN_MS=30)) as w:
        await connected(w, proxy)
        first = await receive(w.port, type="audio", media_base64=b64(blob(2000)), mimetype="audio/mpeg")
        second = await receive(w.port, type="audio", media_base64=b64(blob(2100)), mimetype="audio/mpeg")
        await wait_until(lambda: len(proxy.inbound) == 2, timeout=15, what="posted")
        for wa_id in (first, second):
            got = by_id(proxy, wa_id)
            assert got["media"]["url"] is None and got["media_error"] == error
        assert proxy.calls["upload-media"] == 2  # a refusal is about that file, not the endpoint


async def test_over_media_max_bytes_is_not_downloaded(proxy, tmp_path):
    proxy.add_instance("acme")
    async with running_worker(make_settings(tmp_path, proxy.url, SIMULATOR_AUTO_SCAN_MS=30,
                                            MEDIA_MAX_BYTES=1024)) as w:
        await connected(w, proxy)
        big = blob(2048)
        wa_id = await receive(w.port, type="video", media_base64=b64(big), mimetype="video/mp4")
        small = await receive(w.port, type="image", media_base64=b64(big[:1000]), mimetype="image/png")
        await wait_until(lambda: len(proxy.inbound) == 2, timeout=15, what="posted")
        got = by_id(proxy, wa_id)
        assert got["media_error"] == "too_large" and got["media"]["url"] is None
        assert got["media"]["size"] == 2048 and got["media"]["sha256"] == sha(big)
        assert w.backend.downloads["acme"] == 1  # only the small one
        assert list(proxy.uploads) == [("acme", small)]


async def test_disconnected_at_download_time_is_retried_and_delivered_after_reconnect(proxy, tmp_path, caplog):
    proxy.add_instance("acme")
    caplog.set_level(logging.INFO)
    data = blob(4096, b"later")
    async with running_worker(make_settings(tmp_path, proxy.url, SIMULATOR_AUTO_SCAN_MS=30),
                              retry_cap_s=0.5) as w:
        await connected(w, proxy)
        w.inbound.retry_base_s = w.inbound.retry_cap_s = 120.0  # the deferred row would wait 2 minutes...
        s = w.backend.session("acme")
        wa_id = await s.receive(PEER, "", kind=_kind("image"), media=data, mimetype="image/jpeg")
        await s.drop()  # before the relay's first look: the download finds no connected session
        await wait_until(lambda: "waits for the instance to be connected" in caplog.text
                         or "media download failed" in caplog.text, what="download deferred")
        assert proxy.inbound == []
        # ...but the reconnect (runner backoff ~1 s) makes it due at once
        await wait_until(lambda: len(proxy.inbound) == 1, timeout=10, what="delivered after the reconnect")
        got = proxy.inbound[0]
        assert got["wa_message_id"] == wa_id and got["media"]["url"] and "media_error" not in got
        assert sha(proxy.uploads[("acme", wa_id)]) == sha(data)


async def test_media_gone_for_good_is_posted_with_download_failed(proxy, tmp_path):
    proxy.add_instance("acme")
    async with running_worker(make_settings(tmp_path, proxy.url, SIMULATOR_AUTO_SCAN_MS=30),
                              retry_cap_s=0.5) as w:
        await connected(w, proxy)
        s = w.backend.session("acme")
        data = blob(3000, b"gone")
        wa_id = await s.receive(PEER, "cap", kind=_kind("image"), media=data, mimetype="image/jpeg")
        await s.drop()
        (tmp_path / "auth" / "acme" / MEDIA_DIR / sha(data)).unlink()  # expired on the servers
        await wait_until(lambda: len(proxy.inbound) == 1, timeout=20, what="posted without the media")
        got = proxy.inbound[0]
        assert got["wa_message_id"] == wa_id and got["media_error"] == "download_failed"
        assert got["media"]["url"] is None and got["body"] == "cap"
        assert proxy.uploads == {}


def _kind(name: str):
    from wa_worker.messages import Kind

    return Kind(name)


async def _wait_exit(proc: subprocess.Popen[bytes], timeout_s: float) -> int | None:
    try:
        return await anyio.to_thread.run_sync(proc.wait, timeout_s)
    except subprocess.TimeoutExpired:
        return None


@pytest.mark.parametrize("kill_at", ["upload", "inbound"])
async def test_kill_9_between_download_and_post_delivers_exactly_once(proxy, tmp_path, kill_at):
    """The real process dies (SIGKILL) while the proxy holds the upload (answer not
    yet sent) or the /inbound post: after a restart the message is posted once, and
    once its url is journaled the media is never fetched or uploaded again."""
    proxy.add_instance("acme")
    env = worker_env(tmp_path, proxy.url)
    log_path = tmp_path / "worker.log"
    data = blob(200_000, b"kill")
    procs: list[subprocess.Popen[bytes]] = []
    killed: list[int] = []

    def kill_once(*_: object) -> None:
        if not killed:
            killed.append(procs[-1].pid)
            os.kill(procs[-1].pid, signal.SIGKILL)

    if kill_at == "upload":
        proxy.on_upload = kill_once
    else:
        proxy.on_inbound = kill_once
    procs.append(start_worker(env, ROOT, log_path))
    try:
        await wait_until(lambda: proxy.status_of("acme") == "CONNECTED", timeout=20, what="CONNECTED")
        port = int(env["PORT"])
        wa_id = await receive(port, type="document", media_base64=b64(data), mimetype="application/pdf",
                              filename="k.pdf")
        assert await _wait_exit(procs[0], 15) == -signal.SIGKILL
        assert killed
        uploads_before = proxy.upload_posts
        procs.append(start_worker(env, ROOT, log_path))
        await wait_until(lambda: proxy.inbound_posts >= (1 if kill_at == "upload" else 2), timeout=30,
                         what="posted after the restart")
        await anyio.sleep(1.0)  # nothing more arrives
        assert proxy.inbound_ids() == [wa_id]
        got = proxy.inbound[0]
        assert got["media"]["url"].endswith(f"/media/acme/{wa_id}") and "media_error" not in got
        assert sha(proxy.uploads[("acme", wa_id)]) == sha(data)
        if kill_at == "upload":
            assert proxy.upload_posts == 2  # the repeat is idempotent by contract
            assert proxy.inbound_posts == 1
        else:
            # the url was journaled before the post: the restart only posts again
            assert proxy.upload_posts == uploads_before == 1
            assert proxy.inbound_posts == 2
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                if await _wait_exit(p, 15) is None:
                    p.kill()
                    p.wait(5)


# --------------------------------------------------------------------------- EdgeClient.upload_media

class UploadEndpoint:
    """A loopback /upload-media that answers as scripted and records what it got."""

    def __init__(self) -> None:
        self.status = 200
        self.answer: Any = {"url": "https://cdn/x.pdf"}
        self.requests: list[tuple[Any, dict[str, str], bytes]] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append((request.rel_url.query, dict(request.headers), body))
        return web.json_response(self.answer, status=self.status)


@pytest.fixture
async def upload():
    from wa_worker.edge.client import EdgeClient

    endpoint = UploadEndpoint()
    app = web.Application(client_max_size=8 * 1024 * 1024)
    app.router.add_post("/fn/upload-media", endpoint.handle)
    async with serving(app) as base:
        client = EdgeClient(base + "/fn", SECRET, timeout_s=2)
        try:
            yield endpoint, client
        finally:
            await client.aclose()


@pytest.fixture
def media_file(tmp_path):
    path = tmp_path / "m.bin"
    path.write_bytes(blob(600_000, b"up"))
    return path


async def _upload(edge, path, filename="nota fiscal ção.pdf"):
    data = path.read_bytes()
    return await edge.upload_media("acme", "WAID1", path, mimetype="application/pdf", filename=filename,
                                   sha256=sha(data), size=len(data))


@pytest.mark.parametrize(("answer", "url"), [({"url": "https://cdn/x.pdf"}, "https://cdn/x.pdf"),
                                             ({"path": "media/acme/WAID1"}, "media/acme/WAID1")])
async def test_upload_media_streams_the_file_with_its_headers(upload, media_file, answer, url):
    endpoint, edge = upload
    endpoint.answer = answer
    assert await _upload(edge, media_file) == url
    (query, headers, body), = endpoint.requests
    assert query["instanceId"] == "acme" and query["wa_message_id"] == "WAID1"
    assert headers["Authorization"] == f"Bearer {SECRET}"
    assert headers["Content-Type"] == "application/pdf"
    assert headers["X-Sha256"] == sha(media_file.read_bytes())
    assert headers["X-Filename"] == "nota fiscal %C3%A7%C3%A3o.pdf"
    assert headers["Content-Length"] == str(600_000)
    assert sha(body) == sha(media_file.read_bytes())


@pytest.mark.parametrize(("status", "missing", "transient"), [
    (404, True, False), (405, True, False), (501, True, False),
    (400, False, False), (413, False, False), (500, False, True), (503, False, True),
])
async def test_upload_media_errors(upload, media_file, status, missing, transient):
    from wa_worker.edge.client import EdgeError, EndpointMissing

    endpoint, edge = upload
    endpoint.status, endpoint.answer = status, {"error": "x"}
    with pytest.raises(EdgeError) as info:
        await _upload(edge, media_file)
    assert isinstance(info.value, EndpointMissing) is missing
    assert info.value.transient is transient and info.value.status == status


@pytest.mark.parametrize("answer", [{}, {"url": ""}, {"url": 5}, ["x"], {"url": "x" * 5000}])
async def test_upload_media_answer_without_a_url_is_a_permanent_error(upload, media_file, answer):
    from wa_worker.edge.client import EdgeError

    endpoint, edge = upload
    endpoint.answer = answer
    with pytest.raises(EdgeError) as info:
        await _upload(edge, media_file)
    assert not info.value.transient and "url" in str(info.value)


async def test_media_is_delivered_from_memory_while_the_store_is_unwritable(proxy, tmp_path):
    """The journal cannot take the row: the relay delivers from its memory buffer,
    media step included (download, upload, post without the private handle)."""
    import sqlite3

    from wa_worker.backends.simulator import SimulatorBackend
    from wa_worker.edge.client import EdgeClient
    from wa_worker.messages import Kind
    from wa_worker.relays.inbound import InboundRelay
    from wa_worker.storage.journal import Journal

    path = tmp_path / "state" / "db"
    path.parent.mkdir()
    journal = Journal(path)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("ALTER TABLE inbound RENAME TO inbound_away")  # every inbound write fails
    edge = EdgeClient(proxy.url, SECRET)
    backend = SimulatorBackend(tmp_path / "auth", auto_scan_ms=0, connect_delay_s=0.0)
    relay = InboundRelay(journal, edge, ttl_s=3600, media_dir=tmp_path / "state" / "media-tmp" / "inbound")
    data = blob(5000, b"mem")
    async with backend:
        async def sink(event) -> None:
            if hasattr(event, "wa_message_id"):
                relay.accept("acme", event)

        session = await backend.open_session("acme", sink)
        relay.sessions = lambda iid: session if iid == "acme" else None
        await session.connect()
        await wait_until(lambda: session.state == "connected")
        async with anyio.create_task_group() as tg:
            tg.start_soon(relay.run)
            wa_id = await session.receive(PEER, "in memory", kind=Kind.IMAGE, media=data, mimetype="image/png")
            assert relay.memory_pending == 1
            await wait_until(lambda: len(proxy.inbound) == 1, timeout=10, what="delivered from memory")
            tg.cancel_scope.cancel()
    got = proxy.inbound[0]
    assert got["wa_message_id"] == wa_id and got["body"] == "in memory" and got["type"] == "image"
    assert got["media"]["url"] and not [k for k in got if k.startswith("_")]
    assert sha(proxy.uploads[("acme", wa_id)]) == sha(data)
    other.close()
    journal.close()
    await edge.aclose()
