"""Outbound messages of every type (issue #11), end to end: the real daemon code, the simulator
backend, the loopback proxy (tests/fakeproxy.py, which re-offers a message until it is marked),
media served by a loopback aiohttp server or inlined as base64, real files and ffmpeg."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from aiohttp import web
from PIL import Image

from tests.conftest import make_settings, running_worker, wait_until
from tests.fakeproxy import SECRET, FakeProxy
from tests.proc import ROOT, start_worker, worker_env
from wa_worker.backends.simulator import SimulatorBackend
from wa_worker.edge.models import parse_messages
from wa_worker.messages import Kind
from wa_worker.storage.journal import JOURNAL_RETENTION_S, Journal
from wa_worker.storage.migrations import WORKER_MIGRATIONS, migrate, user_version
from wa_worker.storage.db import open_db

pytestmark = pytest.mark.anyio

TO = "5511988887777"
TO_JID = "5511988887777@s.whatsapp.net"
needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None,
                                  reason="ffmpeg/ffprobe not installed")


# --------------------------------------------------------------------------- real media files


def image_bytes(fmt: str, size: int = 16, noise: bool = False) -> bytes:
    buf = io.BytesIO()
    if noise:  # incompressible: the file is about 3 bytes per pixel
        Image.frombytes("RGB", (size, size), os.urandom(size * size * 3)).save(buf, fmt)
    else:
        Image.new("RGB", (size, size), (200, 30, 30)).save(buf, fmt)
    return buf.getvalue()


PDF = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"
MP3_FRAMES = (b"\xff\xfb\x90\x64" + bytes(413)) * 4  # MPEG-1 layer III frames (silence): sniffed audio/mpeg


def ffmpeg_file(tmp_path: Path, name: str, *args: str) -> bytes:
    out = tmp_path / name
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args, str(out)], check=True, timeout=60)
    return out.read_bytes()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --------------------------------------------------------------------------- a loopback media server


@dataclass
class Served:
    data: bytes
    content_type: str | None = None
    chunked: bool = False  # no Content-Length
    delay_s: float = 0.0
    status: int = 200


@dataclass
class MediaServer:
    files: dict[str, Served] = field(default_factory=dict)
    hits: Counter[str] = field(default_factory=Counter)
    started: Counter[str] = field(default_factory=Counter)
    url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self) -> "MediaServer":
        app = web.Application()
        app.router.add_get("/m/{name}", self._get)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)  # a stalled download ends with the test
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    def add(self, name: str, served: Served) -> str:
        self.files[name] = served
        return f"{self.url}/m/{name}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _get(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        self.started[name] += 1
        served = self.files.get(name)
        if served is None:
            return web.Response(status=404, text="no such file")
        if served.delay_s:
            await asyncio.sleep(served.delay_s)
        self.hits[name] += 1
        if served.status != 200:
            return web.Response(status=served.status)
        headers = {"Content-Type": served.content_type} if served.content_type else {}
        if not served.chunked:
            resp = web.Response(body=served.data, headers=headers)
            if not served.content_type:
                resp.headers.pop("Content-Type", None)
            return resp
        stream = web.StreamResponse(headers=headers)
        stream.enable_chunked_encoding()
        await stream.prepare(request)
        for i in range(0, len(served.data), 1024):
            await stream.write(served.data[i:i + 1024])
        await stream.write_eof()
        return stream


class ConnectionCounter:
    """A loopback TCP server that only counts the connections made to it."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> "ConnectionCounter":
        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            writer.close()

        self.server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def media() -> Any:
    server = await MediaServer().start()
    try:
        yield server
    finally:
        await server.stop()


def staging(tmp_path: Path) -> Path:
    return tmp_path / "state" / "media-tmp"


def settings_for(tmp_path: Path, proxy: FakeProxy, **extra: Any) -> Any:
    values: dict[str, Any] = dict(SIMULATOR_AUTO_SCAN_MS=20, MEDIA_ALLOW_PRIVATE=True)
    values.update(extra)
    return make_settings(tmp_path, proxy.url, **values)


def sent_by_body(w: Any) -> dict[str, dict[str, Any]]:
    return {r["body"]: r for r in w.backend.sent("acme")}


# --------------------------------------------------------------------------- every type


# long: one scenario: every outbound kind through one worker, checked field by field
@needs_ffmpeg
async def test_every_type_is_sent_once_with_its_fields(proxy, media, tmp_path):
    png, jpeg, webp = image_bytes("PNG"), image_bytes("JPEG"), image_bytes("WEBP")
    mp3 = ffmpeg_file(tmp_path, "x.mp3", "-f", "lavfi", "-i", "sine=d=1")
    mp4 = ffmpeg_file(tmp_path, "x.mp4", "-f", "lavfi", "-i", "testsrc=d=1:s=64x64:r=10", "-pix_fmt", "yuv420p")
    proxy.add_instance("acme")
    proxy.enqueue("acme", "t", TO, "plain text")
    proxy.enqueue("acme", "img", TO, "a caption", type="image",
                  media_url=media.add("photo.jpg", Served(jpeg, "image/jpeg")))
    proxy.enqueue("acme", "vid", TO, None, media_base64=b64(mp4), mimetype="video/mp4")  # type inferred
    proxy.enqueue("acme", "aud", TO, None, type="audio", media_url=media.add("song.mp3", Served(mp3, "audio/mpeg")))
    proxy.enqueue("acme", "voice", TO, None, type="voice", media_url=media.add("note.mp3", Served(mp3, "audio/mpeg")))
    proxy.enqueue("acme", "doc", TO, "the contract", type="document", media_base64=b64(PDF),
                  mimetype="application/pdf", filename="contract.pdf")
    proxy.enqueue("acme", "stk", TO, None, type="sticker", media_base64="data:image/webp;base64," + b64(webp))
    proxy.enqueue("acme", "loc", TO, None, type="location", latitude=-23.55, longitude=-46.63, name="Paulista",
                  address="Av. Paulista, 1000")
    proxy.enqueue("acme", "card", TO, None, type="contact", contact={"name": "Ana Souza", "phone": "+55 11 91234-5678"})
    proxy.enqueue("acme", "png-sniffed", TO, None, media_url=media.add("blob", Served(png)))  # no type, no mimetype
    async with running_worker(settings_for(tmp_path, proxy)) as w:
        await wait_until(lambda: len(proxy.sent_marks) == 10, timeout=30, what="10 mark-sent")
        assert not proxy.failed_marks
        log = w.backend.sent("acme")
        by_type = {r["type"]: r for r in log}
        assert [r["type"] for r in log] == ["text", "image", "video", "audio", "voice", "document", "sticker",
                                            "location", "contact", "image"]  # the proxy's order
        assert by_type["text"]["body"] == "plain text"
        img = log[1]
        assert (img["body"], img["mimetype"], img["size"], img["sha256"]) == ("a caption", "image/jpeg", len(jpeg),
                                                                             sha(jpeg))
        assert (by_type["video"]["mimetype"], by_type["video"]["sha256"]) == ("video/mp4", sha(mp4))
        assert by_type["video"]["seconds"] == 1
        assert (by_type["audio"]["mimetype"], by_type["audio"]["sha256"]) == ("audio/mpeg", sha(mp3))
        voice = by_type["voice"]
        assert voice["mimetype"] == "audio/ogg; codecs=opus" and voice["sha256"] != sha(mp3)
        assert voice["seconds"] == 1 and 0 < voice["size"] < len(mp3)
        doc = by_type["document"]
        assert (doc["filename"], doc["mimetype"], doc["sha256"], doc["body"]) == ("contract.pdf", "application/pdf",
                                                                                  sha(PDF), "the contract")
        assert (by_type["sticker"]["mimetype"], by_type["sticker"]["sha256"]) == ("image/webp", sha(webp))
        loc = by_type["location"]
        assert (loc["latitude"], loc["longitude"], loc["name"], loc["address"]) == (-23.55, -46.63, "Paulista",
                                                                                    "Av. Paulista, 1000")
        card = by_type["contact"]["contact"]
        assert card["name"] == "Ana Souza" and "waid=5511912345678" in card["vcard"]
        assert (log[9]["mimetype"], log[9]["sha256"]) == ("image/png", sha(png))  # sniffed
        assert all(r["to"] == TO_JID for r in log)
        assert [proxy.sent_marks[m][0] for m in ("t", "img")] == [log[0]["wa_message_id"], log[1]["wa_message_id"]]
        assert media.hits == Counter({"photo.jpg": 1, "song.mp3": 1, "note.mp3": 1, "blob": 1})

        # replies and reactions name messages this instance sent or received
        incoming = await w.backend.session("acme").receive(TO, "a question")
        await wait_until(lambda: incoming in proxy.inbound_ids(), what="inbound posted")
        proxy.enqueue("acme", "re-in", TO, "an answer", reply_to=incoming)
        proxy.enqueue("acme", "re-out", TO, "about that photo", reply_to=img["wa_message_id"])
        proxy.enqueue("acme", "like", TO, None, type="reaction", reaction="👍", reply_to=img["wa_message_id"])
        await wait_until(lambda: len(proxy.sent_marks) == 13, timeout=15, what="replies and reaction")
        later = sent_by_body(w)
        assert (later["an answer"]["type"], later["an answer"]["reply_to"]) == ("text", incoming)
        assert later["an answer"]["reply_to_chat"] == TO_JID
        assert later["about that photo"]["reply_to"] == img["wa_message_id"]
        reaction = w.backend.sent("acme")[-1]
        assert (reaction["type"], reaction["reaction"], reaction["reply_to"]) == ("reaction", "👍",
                                                                                  img["wa_message_id"])
        assert list(staging(tmp_path).iterdir()) == []  # every staged file removed
    assert staging(tmp_path).stat().st_mode & 0o777 == 0o700


async def test_simulator_http_sent_lists_the_fields(proxy, tmp_path):
    proxy.add_instance("acme")
    proxy.enqueue("acme", "loc", TO, None, latitude=1.5, longitude=2.5)
    async with running_worker(settings_for(tmp_path, proxy)) as w:
        await wait_until(lambda: "loc" in proxy.sent_marks)
        async with httpx.AsyncClient() as http:
            r = await http.get(f"http://127.0.0.1:{w.port}/simulator/instances/acme/sent",
                               headers={"Authorization": f"Bearer {SECRET}"})
        [rec] = r.json()
        assert (rec["type"], rec["latitude"], rec["longitude"], rec["to"]) == ("location", 1.5, 2.5, TO_JID)


# --------------------------------------------------------------------------- refusals, each with its code


async def test_refusals_are_marked_failed_with_their_codes(proxy, media, tmp_path):
    proxy.add_instance("acme")
    big = image_bytes("PNG", 64, noise=True)
    assert len(big) > 4096
    proxy.enqueue("acme", "big-len", TO, None, type="image", media_url=media.add("big.png", Served(big, "image/png")))
    proxy.enqueue("acme", "big-chunked", TO, None, type="image",
                  media_url=media.add("big-chunked.png", Served(big, "image/png", chunked=True)))
    proxy.enqueue("acme", "big-b64", TO, None, type="image", media_base64=b64(big))
    proxy.enqueue("acme", "404", TO, None, type="document", media_url=f"{media.url}/m/missing.pdf")
    proxy.enqueue("acme", "bad-b64", TO, None, type="document", media_base64="***not base64***")
    proxy.enqueue("acme", "pdf-as-image", TO, None, type="image", media_base64=b64(PDF))
    proxy.enqueue("acme", "png-sticker", TO, None, type="sticker", media_base64=b64(image_bytes("PNG")))
    proxy.enqueue("acme", "caption-on-audio", TO, "hello", media_base64=b64(MP3_FRAMES))
    proxy.enqueue("acme", "unknown-reply", TO, "re", reply_to="3EB0C0FFEE")
    proxy.enqueue("acme", "bad-to", "12", "x")
    proxy.enqueue("acme", "empty", TO, "   ")
    proxy.enqueue("acme", "bad-type", TO, "x", type="poll")
    proxy.enqueue("acme", "reaction-no-target", TO, None, type="reaction", reaction="👍")
    proxy.enqueue("acme", "ftp", TO, None, type="image", media_url="ftp://example.com/a.png")
    proxy.enqueue("acme", "boom", TO, "will fail")
    settings = settings_for(tmp_path, proxy, MEDIA_MAX_BYTES=2048)
    backend = SimulatorBackend(tmp_path / "auth", auto_scan_ms=20, connect_delay_s=0.01)
    backend.set_fail_sends("acme", 1)  # the one message that passes every check fails to send
    async with running_worker(settings, backend=backend) as w:
        await wait_until(lambda: len(proxy.failed_marks) == 15, timeout=20, what="15 mark-failed")
        codes = {m: c[0] for m, c in proxy.failed_codes.items()}
        assert codes == {
            "big-len": "media_too_large", "big-chunked": "media_too_large", "big-b64": "media_too_large",
            "404": "media_fetch_failed", "bad-b64": "media_invalid", "pdf-as-image": "media_invalid",
            "png-sticker": "media_invalid", "caption-on-audio": "invalid_message",
            "unknown-reply": "reply_target_unknown", "bad-to": "invalid_recipient", "empty": "invalid_message",
            "bad-type": "invalid_message", "reaction-no-target": "invalid_message", "ftp": "media_refused",
            "boom": "send_failed",
        }
        errors = {m: e[0] for m, e in proxy.failed_marks.items()}
        assert "2048-byte limit (MEDIA_MAX_BYTES)" in errors["big-len"]
        assert "HTTP 404" in errors["404"]
        assert "last 7 days" in errors["unknown-reply"] and "3EB0C0FFEE" in errors["unknown-reply"]
        assert errors["empty"] == "empty body" and errors["bad-to"].startswith("invalid recipient")
        assert errors["boom"].startswith("send failed")
        assert w.backend.sent("acme") == []
        assert media.hits["big.png"] == 1 and media.hits["missing.pdf"] == 0
        assert list(staging(tmp_path).iterdir()) == []
        assert w.journal.outbound_get("404").error_code == "media_fetch_failed"


async def test_private_addresses_are_refused_without_a_connection(proxy, tmp_path):
    counter = await ConnectionCounter().start()
    try:
        proxy.add_instance("acme")
        for i, host in enumerate(("127.0.0.1", "localhost", "2130706433")):
            proxy.enqueue("acme", f"ssrf{i}", TO, None, type="image",
                          media_url=f"http://{host}:{counter.port}/a.png")
        async with running_worker(settings_for(tmp_path, proxy, MEDIA_ALLOW_PRIVATE=False)) as w:
            await wait_until(lambda: len(proxy.failed_marks) == 3, timeout=15, what="refusals")
            assert {c[0] for c in proxy.failed_codes.values()} == {"media_refused"}
            assert all("MEDIA_ALLOW_PRIVATE" in e[0] for e in proxy.failed_marks.values())
            assert counter.connections == 0
            assert w.backend.sent("acme") == []
    finally:
        await counter.stop()


# --------------------------------------------------------------------------- the text path's guarantees


async def test_a_media_message_is_fetched_and_sent_once_while_its_mark_is_lost(proxy, media, tmp_path):
    proxy.add_instance("acme")
    png = image_bytes("PNG")
    proxy.enqueue("acme", "m1", TO, "once", type="image", media_url=media.add("once.png", Served(png, "image/png")))
    proxy.fail["mark-sent"] = 2
    async with running_worker(settings_for(tmp_path, proxy)) as w:
        await wait_until(lambda: "m1" in proxy.sent_marks, timeout=15, what="mark-sent after retries")
        await anyio.sleep(0.3)  # the proxy offered m1 again meanwhile
        assert proxy.calls["queued-messages"] >= 2 and w.outbound.duplicates_suppressed >= 1
        assert len(w.backend.sent("acme")) == 1
        assert media.hits["once.png"] == 1  # a journaled id is never fetched again
        assert list(staging(tmp_path).iterdir()) == []


async def test_stop_during_a_slow_fetch_is_prompt_and_leaves_the_message_queued(proxy, media, tmp_path):
    proxy.add_instance("acme")
    url = media.add("slow.png", Served(image_bytes("PNG"), "image/png", delay_s=30))
    proxy.enqueue("acme", "slow", TO, None, type="image", media_url=url)
    settings = settings_for(tmp_path, proxy)
    async with running_worker(settings) as w:
        await wait_until(lambda: media.started["slow.png"] == 1, what="fetch started")
        t0 = time.monotonic()
        w.request_stop()
        with anyio.fail_after(10):
            await w.wait_stopped()
        assert time.monotonic() - t0 < 3.0  # not the 30 s the server takes, nor the fetch timeout
    journal = Journal(settings.STATE_DB)
    assert journal.outbound_get("slow") is None  # unjournaled: sent by the next run
    journal.close()
    assert list(staging(tmp_path).iterdir()) == []
    assert [m["id"] for m in proxy.queue["acme"]] == ["slow"]


async def test_a_disk_that_cannot_stage_media_leaves_the_message_queued_in_order(proxy, tmp_path, caplog):
    proxy.add_instance("acme")
    async with running_worker(settings_for(tmp_path, proxy)) as w:
        await wait_until(lambda: proxy.status_of("acme") == "CONNECTED")
        folder = staging(tmp_path)
        folder.rmdir()
        folder.write_text("not a folder")  # the worker's own disk refuses: not the sender's fault
        proxy.enqueue("acme", "doc", TO, None, type="document", media_base64=b64(PDF), filename="a.pdf")
        proxy.enqueue("acme", "after", TO, "sent after the document")
        await wait_until(lambda: w.outbound.media_storage_errors >= 1, what="storage error")
        await anyio.sleep(0.3)
        assert w.journal.outbound_get("doc") is None and w.journal.outbound_get("after") is None
        assert not proxy.failed_marks and w.backend.sent("acme") == []
        assert "could not stage the media of message doc" in caplog.text
        folder.unlink()
        await wait_until(lambda: len(proxy.sent_marks) == 2, timeout=15, what="sent after the pause")
        assert [r["type"] for r in w.backend.sent("acme")] == ["document", "text"]


@pytest.mark.slow
async def test_kill_9_after_a_media_send_reports_delivery_unknown_and_clears_staging(proxy, media, tmp_path):
    proxy.add_instance("acme")
    env = worker_env(tmp_path, proxy.url, MEDIA_ALLOW_PRIVATE="true")
    base = f"http://127.0.0.1:{env['PORT']}"
    proc = start_worker(env, ROOT, tmp_path / "w1.log")
    try:
        await wait_until(lambda: proxy.status_of("acme") == "CONNECTED", timeout=20)
        async with httpx.AsyncClient() as http:
            r = await http.post(f"{base}/simulator/crash-after-next-send", headers={"Authorization": f"Bearer {SECRET}"})
            assert r.status_code == 200
        proxy.enqueue("acme", "m1", TO, None, type="image",
                      media_url=media.add("k.png", Served(image_bytes("PNG"), "image/png")))
        await wait_until(lambda: proc.poll() is not None, timeout=15, what="the crash")
        assert proc.returncode == -signal.SIGKILL
        assert len(list(staging(tmp_path).iterdir())) == 1  # killed before its removal
        proc = start_worker(env, ROOT, tmp_path / "w2.log")
        await wait_until(lambda: "m1" in proxy.failed_marks, timeout=20)
        assert proxy.failed_codes["m1"] == ["delivery_unknown"]
        assert list(staging(tmp_path).iterdir()) == []  # leftovers cleared at start
        assert media.hits["k.png"] == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- parsing and the journal


def test_v1_records_parse_as_before_and_content_records_carry_content():
    rejected: list[str] = []
    msgs = {m.id: m for m in parse_messages([
        {"id": "v1", "to": TO, "body": "hi"},
        {"id": "img", "to": TO, "body": "cap", "media_url": "https://example.com/a.jpg", "mimetype": "image/jpeg"},
        {"id": "re", "to": TO, "body": "yes", "reply_to": "ABC123"},
        {"id": "loc", "to": TO, "latitude": "1.5", "longitude": 2},
        {"id": "bad-loc", "to": TO, "latitude": 91, "longitude": 2},
        {"id": "sur-name", "to": TO, "latitude": 1, "longitude": 2, "name": "a\udfffb"},
        {"id": "bad-to", "to": "12", "type": "image"},
        {"id": "x" * 300, "to": TO, "body": "long id"},
    ], rejected)}
    v1 = msgs["v1"]
    assert (v1.body, v1.jid, v1.problem, v1.error_code, v1.content) == ("hi", TO_JID, None, None, None)
    assert msgs["img"].content is not None and msgs["img"].content.kind is Kind.IMAGE and not msgs["img"].type_given
    assert msgs["re"].content is not None and msgs["re"].content.reply_to == "ABC123"
    assert msgs["loc"].content is not None and msgs["loc"].content.location is not None
    assert (msgs["bad-loc"].error_code, msgs["bad-loc"].jid) == ("invalid_message", None)
    assert msgs["sur-name"].problem == "'name' is not valid Unicode"
    assert msgs["bad-to"].error_code == "invalid_recipient"
    assert msgs["x" * 300].error_code == "invalid_message"
    assert rejected == []


def test_message_index_remembers_sent_and_received_and_is_pruned(tmp_path):
    class FakeTime:
        t = 1_000_000.0

        def time(self) -> float:
            return self.t

    clock = FakeTime()
    j = Journal(tmp_path / "db", clock=clock)
    assert j.begin_send("m1", "acme", TO_JID)
    j.record_sent("m1", "WA1")
    j.remember_message("acme", "WA2", "120363@g.us", "5511900000000@s.whatsapp.net", False)
    j.remember_message("acme", "WA2", "other@g.us", None, True)  # a repeat changes nothing
    sent, got = j.find_message("acme", "WA1"), j.find_message("acme", "WA2")
    assert sent is not None and (sent.chat_jid, sent.sender_jid, sent.from_me) == (TO_JID, None, True)
    assert got is not None and (got.chat_jid, got.sender_jid, got.from_me) == (
        "120363@g.us", "5511900000000@s.whatsapp.net", False)
    assert j.find_message("other-instance", "WA1") is None
    clock.t += JOURNAL_RETENTION_S + 1
    j.prune()
    assert j.find_message("acme", "WA1") is None and j.find_message("acme", "WA2") is None
    j.close()


def test_a_version_2_journal_with_rows_gains_error_codes_and_the_index(tmp_path):
    path = tmp_path / "state" / "wa-worker.db"
    path.parent.mkdir()
    db = open_db(path)
    assert migrate(db, path, WORKER_MIGRATIONS[:2]) == 2
    rows = [("bad", "failing", "invalid recipient: 12"), ("boom", "failed", "send failed: x"),
            ("lost", "failing", "delivery_unknown"), ("empty", "failing", "empty body"), ("ok", "marked", None)]
    for mid, state, error in rows:
        db.execute("INSERT INTO outbound (message_id, instance_id, state, to_jid, error, created_at, updated_at, "
                   "next_ack_at) VALUES (?, 'acme', ?, 'j', ?, 1.0, 1.0, 0.0)", (mid, state, error))
    db.close()
    j = Journal(path)
    assert user_version(j._db) == WORKER_MIGRATIONS[-1].version >= 3
    codes = {m: j.outbound_get(m).error_code for m, _, _ in rows}  # type: ignore[union-attr]
    assert codes == {"bad": "invalid_recipient", "boom": "send_failed", "lost": "delivery_unknown",
                     "empty": "invalid_message", "ok": None}
    assert {(r.message_id, r.error_code) for r in j.due_acks()} == {("bad", "invalid_recipient"),
                                                                     ("lost", "delivery_unknown"),
                                                                     ("empty", "invalid_message")}
    assert j.begin_send("new", "acme", TO_JID)
    j.record_sent("new", "WANEW")
    assert j.find_message("acme", "WANEW") is not None
    j.close()
    raw = sqlite3.connect(path)
    assert raw.execute("SELECT COUNT(*) FROM outbound").fetchone()[0] == 6
    raw.close()


async def test_an_unexpected_backend_exception_is_reported_delivery_unknown_not_left_sending(tmp_path):
    from wa_worker.backends.base import OutgoingMessage, Session
    from wa_worker.edge.client import EdgeClient
    from wa_worker.edge.models import QueuedMessage
    from wa_worker.relays.outbound import Acknowledger, OutboundRelay

    class BrokenSession(Session):  # a backend bug: neither a wa id nor a SendError
        instance_id = "acme"

        async def connect(self) -> None:
            return None

        async def send_text(self, to_jid: str, body: str) -> str:
            raise AssertionError("not called: the relay uses send()")

        async def send(self, message: OutgoingMessage) -> str:
            raise RuntimeError("protobuf builder exploded")

        async def disconnect(self) -> None:
            return None

        async def close(self) -> None:
            return None

    journal = Journal(tmp_path / "state" / "db")
    edge = EdgeClient("http://127.0.0.1:9", SECRET)
    relay = OutboundRelay(journal, Acknowledger(journal, edge))
    msg = QueuedMessage(id="m1", to=TO, body="hi", jid=TO_JID)
    assert await relay.process("acme", BrokenSession(), [msg]) == 1
    row = journal.outbound_get("m1")
    assert row is not None and (row.state, row.error_code) == ("failing", "delivery_unknown")
    assert "RuntimeError" in (row.error or "")
    assert await relay.process("acme", BrokenSession(), [msg]) == 0  # never handed over again
    await edge.aclose()
    journal.close()
