"""The direct API's routes (issue #15): instances, QR codes, idempotent sends and the
OpenAPI document, against the real ``wa-worker`` process (tests/proc.py) and the
real daemon in-process, with the simulator backend and the loopback proxy."""

from __future__ import annotations

import base64
import io
import json
import signal
import sqlite3
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from openapi_spec_validator import validate
from PIL import Image

from tests.conftest import FakeClock, connect, make_settings, running_worker, wait_until
from tests.fakeproxy import SECRET, FakeProxy
from tests.proc import ROOT, start_worker, worker_env
from tests.test_outbound_types import PDF, MediaServer, Served, b64, ffmpeg_file, image_bytes, needs_ffmpeg, sha
from wa_worker.api.models import SendMessage
from wa_worker.backends.base import ReceiptStatus
from wa_worker.daemon import Worker
from wa_worker.storage.journal import JOURNAL_RETENTION_S, Journal
from wa_worker.storage.migrations import WORKER_MIGRATIONS, migrate

pytestmark = pytest.mark.anyio

TOKEN = "api-token-0123456789abcdef"
API = {"Authorization": f"Bearer {TOKEN}"}
TO = "5511988887777"
TO_JID = f"{TO}@s.whatsapp.net"


@pytest.fixture
async def media() -> Any:
    server = await MediaServer().start()
    try:
        yield server
    finally:
        await server.stop()


class Proc:
    """A real wa-worker process with the API on, and its HTTP client."""

    def __init__(self, tmp_path: Path, proxy: FakeProxy, **env: Any) -> None:
        self.tmp_path = tmp_path
        self.env = worker_env(tmp_path, proxy.url, API_TOKEN=TOKEN, MEDIA_ALLOW_PRIVATE="true", **env)
        self.base = f"http://127.0.0.1:{self.env['PORT']}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        self.proc = start_worker(self.env, ROOT, self.tmp_path / f"w{self.starts}.log")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.tmp_path.glob("w*.log")))

    def sent(self, iid: str = "acme") -> list[dict[str, Any]]:
        path = self.tmp_path / "auth" / iid / "simulator-sent.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@asynccontextmanager
async def api_process(tmp_path: Path, proxy: FakeProxy, *, connected: bool = True,
                      **env: Any) -> AsyncIterator[tuple[Proc, httpx.AsyncClient]]:
    """A real process (:class:`Proc`, ``env`` added) serving instance acme, added on ``proxy``, and an
    HTTP client; ``connected``: once the API says acme is connected. The process stops at the end."""
    proxy.add_instance("acme")
    worker = Proc(tmp_path, proxy, **env)
    worker.start()
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            if connected:
                await until_connected(http, worker.base)
            yield worker, http
    finally:
        # in a thread: the fake proxy (this loop) answers the worker's goodbyes (else each waits EDGE_TIMEOUT_S)
        await anyio.to_thread.run_sync(worker.stop)


@asynccontextmanager
async def api_worker(tmp_path: Path, *, instance: str | None = "acme", scan: bool = True, **env: Any
                     ) -> AsyncIterator[tuple[Worker, FakeProxy, httpx.AsyncClient, str]]:
    """The daemon in-process with the API on (``env`` added to its settings) against a fake proxy of
    its own: the worker, the proxy, an HTTP client and the API's base URL. ``instance`` is added on
    the proxy and, with ``scan``, connected (its QR scanned) before the body runs."""
    proxy = await FakeProxy().start()
    try:
        if instance is not None:
            proxy.add_instance(instance)
        async with running_worker(make_settings(tmp_path, proxy.url, API_TOKEN=TOKEN, **env)) as w, \
                httpx.AsyncClient(timeout=30) as http:
            if instance is not None and scan:
                await connect(w, proxy, instance)
            yield w, proxy, http, f"http://127.0.0.1:{w.port}"
    finally:
        await proxy.stop()


async def polled(fetch: Any, what: str, limit_s: float = 20.0, every_s: float = 0.05) -> Any:
    """Await ``fetch()`` until it returns something truthy (bounded: ``limit_s``)."""
    for _ in range(int(limit_s / every_s)):
        if found := await fetch():
            return found
        await anyio.sleep(every_s)
    raise AssertionError(f"timed out after {limit_s}s waiting for {what}")


async def until_connected(http: httpx.AsyncClient, base: str, iid: str = "acme") -> dict[str, Any]:
    async def status() -> dict[str, Any] | None:
        try:
            r = await http.get(f"{base}/api/instances/{iid}", headers=API)
        except httpx.TransportError:
            return None
        return r.json() if r.status_code == 200 and r.json()["state"] == "connected" else None

    found: dict[str, Any] = await polled(status, f"{iid} connected")
    return found


async def post(http: httpx.AsyncClient, base: str, key: str | None, body: Any, iid: str = "acme",
               **headers: str) -> httpx.Response:
    h = {**API, **headers}
    if key is not None:
        h["Idempotency-Key"] = key
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return await http.post(f"{base}/api/instances/{iid}/messages", content=content,
                           headers={"Content-Type": "application/json", **h})


def error_of(r: httpx.Response) -> dict[str, Any]:
    body = r.json()
    assert set(body) == {"error"} and {"code", "message"} <= set(body["error"]), body
    return body["error"]


# --------------------------------------------------------------------------- every type, real process


# long: one scenario: every outbound kind through the API of one real process, checked in the sent log
@needs_ffmpeg
async def test_every_message_type_through_the_api_of_the_real_process(proxy, media, tmp_path):
    png, jpeg, webp = image_bytes("PNG"), image_bytes("JPEG"), image_bytes("WEBP")
    mp3 = ffmpeg_file(tmp_path, "x.mp3", "-f", "lavfi", "-i", "sine=d=1")
    mp4 = ffmpeg_file(tmp_path, "x.mp4", "-f", "lavfi", "-i", "testsrc=d=1:s=64x64:r=10", "-pix_fmt", "yuv420p")
    bodies: list[tuple[str, dict[str, Any]]] = [
        ("t", {"to": "+55 11 98888-7777", "body": "plain text"}),
        ("img", {"to": TO, "type": "image", "body": "a caption",
                 "media_url": media.add("photo.jpg", Served(jpeg, "image/jpeg"))}),
        ("vid", {"to": TO, "media_base64": b64(mp4), "mimetype": "video/mp4"}),
        ("aud", {"to": TO, "type": "audio", "media_url": media.add("song.mp3", Served(mp3, "audio/mpeg"))}),
        ("voice", {"to": TO, "type": "voice", "media_base64": b64(mp3), "mimetype": "audio/mpeg"}),
        ("doc", {"to": TO, "type": "document", "body": "the contract", "media_base64": b64(PDF),
                 "mimetype": "application/pdf", "filename": "contract.pdf"}),
        ("stk", {"to": TO, "type": "sticker", "media_base64": "data:image/webp;base64," + b64(webp)}),
        ("loc", {"to": TO, "type": "location", "latitude": -23.55, "longitude": -46.63, "name": "Paulista",
                 "address": "Av. Paulista, 1000"}),
        ("card", {"to": TO, "type": "contact", "contact": {"name": "Ana Souza", "phone": "+55 11 91234-5678"}}),
        ("vcard", {"to": TO, "type": "contact", "vcard": "BEGIN:VCARD\nVERSION:3.0\nFN:Suporte\n"
                                                         "TEL;waid=551140000000:+551140000000\nEND:VCARD"}),
        ("sniffed", {"to": TO, "media_url": media.add("blob", Served(png))}),
    ]
    async with api_process(tmp_path, proxy) as (worker, http):
        wa_ids: dict[str, str] = {}
        for key, body in bodies:
            r = await post(http, worker.base, key, body)
            assert r.status_code == 200, (key, r.text)
            assert r.json()["state"] == "sent" and r.json()["id"] == key, r.text
            assert r.headers["Location"] == f"/api/instances/acme/messages/{key}"
            wa_ids[key] = r.json()["wa_message_id"]
        # a reply to a received message, a reply to a sent one, a reaction
        r = await http.post(f"{worker.base}/simulator/instances/acme/inbound", json={"from": TO, "body": "hi?"},
                            headers={"Authorization": f"Bearer {SECRET}"})
        incoming = r.json()["wa_message_id"]
        await wait_until(lambda: incoming in proxy.inbound_ids(), what="inbound posted")
        for key, body in [("re-in", {"to": TO, "body": "an answer", "reply_to": incoming}),
                          ("re-out", {"to": TO, "body": "about that photo", "reply_to": wa_ids["img"]}),
                          ("like", {"to": TO, "type": "reaction", "reaction": "👍", "reply_to": wa_ids["img"]})]:
            r = await post(http, worker.base, key, body)
            assert (r.status_code, r.json()["state"]) == (200, "sent"), r.text
            wa_ids[key] = r.json()["wa_message_id"]
        log = worker.sent()
        assert [r["wa_message_id"] for r in log] == list(wa_ids.values())  # once each, in order
        by = dict(zip(wa_ids, log, strict=True))
        assert all(r["to"] == TO_JID for r in log)
        assert (by["t"]["type"], by["t"]["body"]) == ("text", "plain text")
        assert (by["img"]["type"], by["img"]["body"], by["img"]["sha256"]) == ("image", "a caption", sha(jpeg))
        assert (by["vid"]["type"], by["vid"]["sha256"], by["vid"]["seconds"]) == ("video", sha(mp4), 1)
        assert (by["aud"]["type"], by["aud"]["sha256"]) == ("audio", sha(mp3))
        assert by["voice"]["type"] == "voice" and by["voice"]["mimetype"] == "audio/ogg; codecs=opus"
        assert (by["doc"]["filename"], by["doc"]["sha256"], by["doc"]["body"]) == ("contract.pdf", sha(PDF),
                                                                                   "the contract")
        assert (by["stk"]["type"], by["stk"]["sha256"]) == ("sticker", sha(webp))
        assert (by["loc"]["latitude"], by["loc"]["longitude"], by["loc"]["name"]) == (-23.55, -46.63, "Paulista")
        assert "waid=5511912345678" in by["card"]["contact"]["vcard"]
        assert by["vcard"]["contact"]["name"] == "Suporte"
        assert (by["sniffed"]["type"], by["sniffed"]["sha256"]) == ("image", sha(png))
        assert (by["re-in"]["reply_to"], by["re-out"]["reply_to"]) == (incoming, wa_ids["img"])
        assert (by["like"]["type"], by["like"]["reaction"], by["like"]["reply_to"]) == ("reaction", "👍",
                                                                                      wa_ids["img"])
        # every outcome readable later; none of them ever reaches the proxy's acknowledgements
        for key, wa_id in wa_ids.items():
            r = await http.get(f"{worker.base}/api/instances/acme/messages/{key}", headers=API)
            assert r.json() == {"id": key, "instance_id": "acme", "state": "sent", "wa_message_id": wa_id}
        await anyio.sleep(1.0)
        assert not proxy.sent_marks and not proxy.failed_marks
        assert proxy.calls["mark-sent"] == 0 and proxy.calls["mark-failed"] == 0


# --------------------------------------------------------------------------- idempotency across kill -9


@pytest.mark.parametrize("policy", ["at_most_once", "at_least_once"])
async def test_a_key_is_never_sent_twice_across_kill_9_mid_send(proxy, tmp_path, policy):
    """The process dies after WhatsApp has the message and before the journal records it:
    after the restart the key answers delivery_unknown (whatever UNKNOWN_SEND_POLICY says:
    an Idempotency-Key is never sent twice), and a repeat sends nothing."""
    body = {"to": TO, "body": "fate unknown"}
    async with api_process(tmp_path, proxy, UNKNOWN_SEND_POLICY=policy) as (worker, http):
        r = await http.post(f"{worker.base}/simulator/crash-after-next-send",
                            headers={"Authorization": f"Bearer {SECRET}"})
        assert r.status_code == 200
        with pytest.raises(httpx.TransportError):
            await post(http, worker.base, "order-42", body)
        assert worker.proc is not None and worker.proc.wait(15) == -signal.SIGKILL
        assert len(worker.sent()) == 1  # WhatsApp got it; the journal says 'sending'
        worker.start()
        await until_connected(http, worker.base)
        r = await post(http, worker.base, "order-42", body)
        assert r.status_code == 200 and r.headers["Idempotent-Replayed"] == "true"
        assert r.json()["state"] == "failed" and r.json()["error_code"] == "delivery_unknown", r.text
        r = await http.get(f"{worker.base}/api/instances/acme/messages/order-42", headers=API)
        assert r.json()["error_code"] == "delivery_unknown"
        await anyio.sleep(0.5)
        assert len(worker.sent()) == 1
        assert not proxy.failed_marks and not proxy.sent_marks  # the proxy never hears of it


async def test_a_sent_key_answers_the_same_after_kill_9_and_an_interrupted_one_runs_again(proxy, media, tmp_path):
    """Killed right after a send was recorded: the repeat returns the same wa_message_id.
    Killed while its media was still downloading (nothing sent): the key reads not_sent
    'interrupted', and the same request sends it, once."""
    slow = media.add("slow.png", Served(image_bytes("PNG"), "image/png", delay_s=30))
    async with api_process(tmp_path, proxy) as (worker, http):
        r = await post(http, worker.base, "a", {"to": TO, "body": "recorded"})
        first = r.json()
        assert first["state"] == "sent"
        async with anyio.create_task_group() as tg:
            async def hanging() -> None:
                with pytest.raises(httpx.TransportError):
                    await post(http, worker.base, "b", {"to": TO, "type": "image", "media_url": slow})

            tg.start_soon(hanging)
            await wait_until(lambda: media.started["slow.png"] == 1, what="the download started")
            worker.kill9()
        worker.start()
        await until_connected(http, worker.base)
        r = await post(http, worker.base, "a", {"to": TO, "body": "recorded"})
        assert r.json() == first and r.headers["Idempotent-Replayed"] == "true"
        r = await http.get(f"{worker.base}/api/instances/acme/messages/b", headers=API)
        assert (r.json()["state"], r.json()["error_code"]) == ("not_sent", "interrupted")
        media.files["slow.png"].delay_s = 0
        r = await post(http, worker.base, "b", {"to": TO, "type": "image", "media_url": slow})
        assert (r.status_code, r.json()["state"]) == (200, "sent"), r.text
        r2 = await post(http, worker.base, "b", {"to": TO, "type": "image", "media_url": slow})
        assert r2.json() == r.json()
        assert [s["body"] for s in worker.sent()] == ["recorded", ""]
        assert media.hits["slow.png"] == 1


# --------------------------------------------------------------------------- 202, repeats while pending


async def test_a_slow_send_answers_202_with_location_and_a_repeat_never_sends_twice(proxy, tmp_path):
    async with api_process(tmp_path, proxy, SIMULATOR_SEND_DELAY_MS=2500, API_SEND_WAIT_S=0.3) as (worker, http):
        body = {"to": TO, "body": "slow one"}
        r = await post(http, worker.base, "slow-1", body)
        assert r.status_code == 202 and r.json() == {"id": "slow-1", "instance_id": "acme", "state": "pending"}
        location = r.headers["Location"]
        assert location == "/api/instances/acme/messages/slow-1"
        again = await post(http, worker.base, "slow-1", body)  # while it is in flight
        assert again.status_code == 202 and again.headers["Idempotent-Replayed"] == "true"
        conflict = await post(http, worker.base, "slow-1", {**body, "body": "another"})
        assert conflict.status_code == 409 and error_of(conflict)["code"] == "idempotency_conflict"
        r = await http.get(worker.base + location, headers=API)
        assert r.json()["state"] == "pending" and r.headers["Retry-After"] == "1"

        async def done() -> bool:
            got = (await http.get(worker.base + location, headers=API)).json()
            return got["state"] == "sent"

        await polled(done, "the slow send's outcome", 10.0, 0.1)
        assert [s["body"] for s in worker.sent()] == ["slow one"]


# --------------------------------------------------------------------------- bad requests, real process


# long: one table of refused requests against one process, each checked for the error shape
async def test_bad_requests_get_the_error_shape_and_record_nothing(proxy, tmp_path):
    async with api_process(tmp_path, proxy, MEDIA_MAX_BYTES=3000) as (worker, http):
        b = worker.base
        cases: list[tuple[httpx.Response, int, str, str | None]] = [
            (await post(http, b, "k", b"{not json"), 400, "bad_request", None),
            (await post(http, b, "k", b"[1, 2]"), 400, "bad_request", None),
            (await post(http, b, "k", b"\xff\xfe"), 400, "bad_request", None),
            (await post(http, b, "k", b"x" * 400_000), 413, "too_large", None),
            (await post(http, b, None, {"to": TO, "body": "x"}), 400, "idempotency_key_required",
             "Idempotency-Key"),
            (await post(http, b, "has space", {"to": TO, "body": "x"}), 400, "invalid_idempotency_key",
             "Idempotency-Key"),
            (await post(http, b, "k" * 101, {"to": TO, "body": "x"}), 400, "invalid_idempotency_key",
             "Idempotency-Key"),
            (await post(http, b, "k", {"to": 5511, "body": "x"}), 422, "invalid_request", "to"),
            (await post(http, b, "k", {"body": "x"}), 422, "invalid_request", "to"),
            (await post(http, b, "k", {"to": TO, "body": 7}), 422, "invalid_request", "body"),
            (await post(http, b, "k", {"to": TO, "type": "location", "latitude": "1"}), 422, "invalid_request",
             "latitude"),
            (await post(http, b, "k", {"to": TO, "type": "location", "latitude": 91, "longitude": 0}), 422,
             "invalid_request", "latitude"),
            (await post(http, b, "k", {"to": TO, "contact": {"name": 1}}), 422, "invalid_request",
             "contact.name"),
            (await post(http, b, "k", {"to": TO, "boddy": "typo"}), 422, "invalid_request", "boddy"),
            (await post(http, b, "k", {"to": TO, "type": "gif", "body": "x"}), 422, "invalid_request", "type"),
            (await post(http, b, "k", {"to": "12", "body": "x"}), 422, "invalid_recipient", "to"),
            (await post(http, b, "k", {"to": TO, "body": "  "}), 422, "invalid_message", "body"),
            (await post(http, b, "k", {"to": TO, "type": "voice", "body": "caption",
                                       "media_url": "https://example.com/a.ogg"}), 422, "invalid_message",
             "body"),
            (await post(http, b, "k", {"to": TO, "type": "reaction", "reaction": "👍"}), 422,
             "invalid_message", "reply_to"),
            (await post(http, b, "k", {"to": TO, "type": "image", "media_url": "ftp://x/y"}), 422,
             "media_refused", "media_url"),
            (await post(http, b, "k", {"to": TO, "body": "x"}, iid="not-mine"), 404, "instance_not_here", None),
            (await post(http, b, "k", {"to": TO, "body": "x"}, iid="bad%20id"), 404, "instance_not_here", None),
            (await http.get(f"{b}/api/instances/acme/messages/never-sent", headers=API), 404,
             "message_not_found", None),
            (await http.get(f"{b}/api/instances/acme/messages/bad%20key", headers=API), 400,
             "invalid_idempotency_key", "key"),
            (await http.get(f"{b}/api/instances/not-mine", headers=API), 404, "instance_not_here", None),
            (await http.get(f"{b}/api/instances/not-mine/qr", headers=API), 404, "instance_not_here", None),
            (await http.get(f"{b}/api/instances/acme/qr", headers=API), 409, "already_connected", None),
            (await http.delete(f"{b}/api/instances/acme", headers=API), 405, "method_not_allowed", None),
        ]
        for r, status, code, fld in cases:
            err = error_of(r)
            assert (r.status_code, err["code"]) == (status, code), (status, code, r.text)
            assert err.get("field") == fld, (code, r.text)
        # the media cap is the proxy path's: a 3000-byte MEDIA_MAX_BYTES refuses a bigger file once fetched
        r = await post(http, b, "big", {"to": TO, "type": "document", "media_base64": b64(b"%PDF" + bytes(4000))})
        assert (r.status_code, r.json()["state"], r.json()["error_code"]) == (200, "failed", "media_too_large")
        # nothing was recorded for the refused ones: "k" is still free
        r = await post(http, b, "k", {"to": TO, "body": "finally"})
        assert (r.status_code, r.json()["state"]) == (200, "sent")
        assert [s["body"] for s in worker.sent()] == ["finally"]
        assert worker.proc is not None and worker.proc.poll() is None
        await anyio.sleep(0.5)
        assert not proxy.failed_marks and not proxy.sent_marks


# --------------------------------------------------------------------------- instances and QR, real process


async def test_instances_and_their_qr_as_json_and_png(proxy, tmp_path):
    # nobody scans: the QR stays
    async with api_process(tmp_path, proxy, SIMULATOR_AUTO_SCAN_MS="", connected=False) as (worker, http):
        async def qr_shown() -> dict[str, Any] | None:
            try:
                r = await http.get(f"{worker.base}/api/instances", headers=API)
            except httpx.TransportError:
                return None
            found = r.json()["instances"] if r.status_code == 200 else []
            return found[0] if found and found[0]["qr_available"] else None

        inst = await polled(qr_shown, "a QR code")
        assert (inst["id"], inst["status"], inst["state"]) == ("acme", "CONNECTING", "connecting")
        assert inst["since"] > 1.7e9 and inst["phone_number"] is None
        r = await http.get(f"{worker.base}/api/instances/acme/qr", headers=API)
        assert r.status_code == 200 and r.headers["Cache-Control"] == "no-store"
        url = r.json()["qr"]
        assert url.startswith("data:image/png;base64,") and "pair_code" not in r.json()
        png = base64.b64decode(url.split(",", 1)[1])
        r = await http.get(f"{worker.base}/api/instances/acme/qr", headers={**API, "Accept": "image/png"})
        assert r.status_code == 200 and r.headers["Content-Type"] == "image/png"
        assert r.content[:8] == b"\x89PNG\r\n\x1a\n" and r.content[12:16] == b"IHDR"
        assert r.content == png
        assert Image.open(io.BytesIO(r.content)).size[0] >= 21 * 6  # a QR code's modules, 6 px each
        sim = (await http.get(f"{worker.base}/simulator/instances",
                              headers={"Authorization": f"Bearer {SECRET}"})).json()[0]
        zxing = pytest.importorskip("zxingcpp")
        decoded = zxing.read_barcodes(Image.open(io.BytesIO(r.content)))
        assert [d.text for d in decoded] == [sim["qr"]]  # the code the simulated phone would scan
        await http.post(f"{worker.base}/simulator/instances/acme/scan", headers={"Authorization": f"Bearer {SECRET}"})
        inst = await until_connected(http, worker.base)
        assert inst["status"] == "CONNECTED"
        assert inst["phone_number"] and inst["jid"].startswith(inst["phone_number"])
        assert inst["push_name"] == "Sim acme" and inst["qr_available"] is False
        r = await http.get(f"{worker.base}/api/instances/acme/qr", headers=API)
        assert r.status_code == 409 and error_of(r)["code"] == "already_connected"
        # a dropped connection: the reason stays readable after the reconnect
        await http.post(f"{worker.base}/simulator/instances/acme/drop", headers={"Authorization": f"Bearer {SECRET}"})
        await wait_until(lambda: any(s.get("reason") == "network" for s in proxy.statuses_of("acme")),
                         what="DISCONNECTED network")
        inst = await until_connected(http, worker.base)
        assert (inst["reason"], inst["detail"]) == ("network", "simulated network loss")
        assert inst["reason_at"] <= inst["since"]


# --------------------------------------------------------------------------- in-process: order, caps, acks


async def test_api_and_proxy_sends_share_the_instance_pacing_and_lock(tmp_path):
    """Proxy messages and API messages of one instance go one at a time, SEND_MIN_GAP_MS apart."""
    async with api_worker(tmp_path, SEND_MIN_GAP_MS=300, SEND_JITTER_MS=0,
                          TYPING_INDICATOR=False) as (w, proxy, http, base):
        for i in range(3):
            proxy.enqueue("acme", f"p{i}", TO, f"proxy {i}")
        w.wake("acme")
        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(post, http, base, f"a{i}", {"to": TO, "body": f"api {i}"})
        await wait_until(lambda: len(w.backend.sent("acme")) == 6, timeout=15, what="6 sends")
        raw = (tmp_path / "auth" / "acme" / "simulator-sent.jsonl").read_text().splitlines()
        log = [json.loads(line) for line in raw]  # with "ts": when WhatsApp had it
        gaps = [b["ts"] - a["ts"] for a, b in zip(log, log[1:], strict=False)]
        assert min(gaps) >= 0.28, gaps
        await wait_until(lambda: len(proxy.sent_marks) == 3, what="the proxy's 3 marks")
        await anyio.sleep(0.3)
        assert sorted(proxy.sent_marks) == ["p0", "p1", "p2"]  # never an api id


async def test_caps_reached_answer_not_sent_and_the_key_stays_usable(tmp_path):
    async with api_worker(tmp_path, SEND_MAX_PER_DAY=1, SEND_MIN_GAP_MS=0, SEND_JITTER_MS=0) as (w, proxy, http, base):
        assert (await post(http, base, "one", {"to": TO, "body": "1"})).json()["state"] == "sent"
        r = await post(http, base, "two", {"to": TO, "body": "2"})
        assert r.status_code == 200 and r.json()["state"] == "not_sent"
        assert r.json()["error_code"] == "send_caps_reached" and int(r.headers["Retry-After"]) > 80_000
        again = await post(http, base, "two", {"to": TO, "body": "2"})  # runs again: still capped
        assert again.json()["state"] == "not_sent" and "Idempotent-Replayed" not in again.headers
        assert [s["body"] for s in w.backend.sent("acme")] == ["1"]


async def test_failures_and_receipts_of_api_messages_never_reach_the_proxy_as_its_own(tmp_path):
    async with api_worker(tmp_path) as (w, proxy, http, base):
        w.backend.set_fail_sends("acme", 1)
        r = await post(http, base, "f1", {"to": TO, "body": "refused"})
        assert (r.json()["state"], r.json()["error_code"]) == ("failed", "send_failed")
        again = await post(http, base, "f1", {"to": TO, "body": "refused"})
        assert again.json() == r.json() and again.headers["Idempotent-Replayed"] == "true"
        w.backend.set_registered(["5511977776666"])
        r = await post(http, base, "f2", {"to": "5511966665555", "body": "nobody"})
        assert r.json()["error_code"] == "not_on_whatsapp"
        r = await post(http, base, "s1", {"to": "5511977776666", "body": "delivered"})
        wa_id = r.json()["wa_message_id"]
        await w.backend.session("acme").receipt(wa_id, ReceiptStatus.READ)
        await wait_until(lambda: proxy.message_status, what="the receipt posted")
        proxy.enqueue("acme", "p1", TO, "from the proxy")  # the positive control
        w.backend.set_registered(None)
        w.wake("acme")
        await wait_until(lambda: "p1" in proxy.sent_marks, what="p1 marked")
        await anyio.sleep(1.2)  # the acknowledger's rounds
        assert list(proxy.sent_marks) == ["p1"] and not proxy.failed_marks
        posted = proxy.message_status[("acme", wa_id)]
        assert posted["messageId"] is None and posted["status"] == "read"
        assert w.health()["outbound"]["pending_acks"] == 0


# --------------------------------------------------------------------------- namespaces, journal, document


def test_a_proxy_id_equal_to_an_api_journal_id_is_neither_sent_nor_acknowledged(tmp_path):
    j = Journal(tmp_path / "j.db")
    assert j.begin_send("api:acme:k1", "acme", TO_JID, "api")
    j.record_sent("api:acme:k1", "WA1")
    assert j.due_acks() == [] and j.counts()["outbound_pending_acks"] == 0
    j.reack("api:acme:k1")
    assert j.due_acks() == []
    j.record_failure("api:acme:k2", "acme", "send failed: x", "send_failed", "api")
    assert j.due_acks() == [] and j.outbound_get("api:acme:k2").origin == "api"  # type: ignore[union-attr]
    assert j.begin_send("api:acme:k3", "acme", TO_JID, "api") and j.begin_send("m-1", "acme", TO_JID)
    assert j.recover_unknown_sends(at_least_once=True) == ["api:acme:k3", "m-1"]
    assert j.outbound_get("api:acme:k3").error_code == "delivery_unknown"  # type: ignore[union-attr]
    assert j.outbound_get("m-1") is None  # the proxy's message is offered again (at-least-once)
    j.close()


def test_api_rows_and_keys_are_pruned_with_the_journal(tmp_path):
    clock = FakeClock()
    j = Journal(tmp_path / "j.db", clock=clock)
    assert j.api_request_add("api:acme:k1", "acme", "k1", "h1") and not j.api_request_add("api:acme:k1", "acme", "k1", "h2")
    assert j.begin_send("api:acme:k1", "acme", TO_JID, "api")
    j.record_sent("api:acme:k1", "WA1")
    j.api_request_add("api:acme:k2", "acme", "k2", "h2")
    assert j.begin_send("api:acme:k2", "acme", TO_JID, "api")  # in flight: kept
    assert j.begin_send("m-1", "acme", TO_JID)
    j.record_sent("m-1", "WA2")  # the proxy's, not yet acknowledged: kept
    clock.now += JOURNAL_RETENTION_S + 1
    assert j.prune() == 1
    assert j.outbound_get("api:acme:k1") is None and j.api_request("api:acme:k1") is None
    assert j.api_request("api:acme:k2") is not None and j.outbound_get("m-1") is not None
    j.close()


async def test_the_relay_leaves_a_proxy_message_that_names_an_api_row(tmp_path):
    async with api_worker(tmp_path) as (w, proxy, http, base):
        assert (await post(http, base, "k1", {"to": TO, "body": "api"})).json()["state"] == "sent"
        proxy.enqueue("acme", "api:acme:k1", TO, "a proxy id in the API's namespace")
        w.wake("acme")
        await wait_until(lambda: w.outbound.foreign_ids > 0, what="the foreign id seen")
        await anyio.sleep(0.3)
        assert [s["body"] for s in w.backend.sent("acme")] == ["api"]
        assert not proxy.sent_marks and not proxy.failed_marks
        # and the reverse: a key whose journal id a proxy message already holds is refused
        proxy.queue["acme"].clear()
        proxy.enqueue("acme", "api:acme:k9", TO, "proxy first")
        w.wake("acme")
        await wait_until(lambda: "api:acme:k9" in proxy.sent_marks, what="proxy message sent")
        r = await post(http, base, "k9", {"to": TO, "body": "api second"})
        assert r.status_code == 409 and error_of(r)["code"] == "idempotency_conflict"


def test_migration_7_keeps_old_rows_as_proxy_messages(tmp_path):
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    migrate(db, path, tuple(m for m in WORKER_MIGRATIONS if m.version <= 5))
    db.execute("INSERT INTO outbound (message_id, instance_id, state, wa_message_id, created_at, updated_at, "
               "next_ack_at) VALUES ('m1', 'acme', 'sent', 'WA1', 1, 1, 1)")
    db.commit()
    db.close()
    j = Journal(path)
    assert [r.message_id for r in j.due_acks()] == ["m1"] and j.outbound_get("m1").origin == "proxy"  # type: ignore[union-attr]
    j.close()


async def test_openapi_document_is_valid_and_generated_from_the_request_models(tmp_path):
    async with api_worker(tmp_path, instance=None) as (_, _, http, base):
        r = await http.get(f"{base}/api/openapi.json")
        assert r.status_code == 401
        r = await http.get(f"{base}/api/openapi.json", headers={"x-api-key": TOKEN})
        doc = r.json()
    validate(doc)  # raises on an invalid OpenAPI 3.1 document
    assert doc["openapi"] == "3.1.0"
    assert set(doc["paths"]) == {"/api/instances", "/api/instances/{id}", "/api/instances/{id}/qr",
                                 "/api/instances/{id}/messages", "/api/instances/{id}/messages/{key}",
                                 "/api/events", "/api/openapi.json"}
    send = doc["paths"]["/api/instances/{id}/messages"]["post"]
    assert send["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/SendMessage"}
    schema = doc["components"]["schemas"]["SendMessage"]
    expected = SendMessage.model_json_schema(ref_template="#/components/schemas/{model}")
    assert schema["properties"] == expected["properties"] and schema["additionalProperties"] is False
    assert set(schema["properties"]) >= {"to", "type", "body", "media_url", "media_base64", "reply_to", "reaction",
                                         "latitude", "longitude", "contact", "vcard"}
    assert any(p["name"] == "Idempotency-Key" and p["in"] == "header" and p["required"] for p in send["parameters"])
    assert set(send["responses"]) >= {"200", "202", "400", "401", "404", "409", "422", "429"}
    qr = doc["paths"]["/api/instances/{id}/qr"]["get"]["responses"]["200"]["content"]
    assert set(qr) == {"application/json", "image/png"}
    events = doc["paths"]["/api/events"]["get"]
    sse = events["responses"]["200"]["content"]["text/event-stream"]
    assert sse["x-sse-data"] == {"$ref": "#/components/schemas/EventOut"}
    assert set(doc["components"]["schemas"]["EventOut"]["properties"]) == {"seq", "type", "instanceId", "at", "payload"}
    assert {(p["name"], p["in"]) for p in events["parameters"]} == {
        ("Last-Event-ID", "header"), ("since", "query"), ("instance", "query"), ("types", "query")}


async def test_a_send_waiting_behind_another_goes_once_the_instance_reconnects(tmp_path, media):
    """A message queued behind a slow one finds the instance disconnected: it waits for the
    reconnection (never 'failed' for a send WhatsApp never saw) and goes once; a 1 MB body is fine."""
    big = image_bytes("PNG", size=600, noise=True)
    assert len(big) > 1_000_000
    slow = media.add("slow.jpg", Served(image_bytes("JPEG"), "image/jpeg", delay_s=1.0))
    async with api_worker(tmp_path, scan=False, API_SEND_WAIT_S=0.2, MEDIA_ALLOW_PRIVATE=True,
                          SIMULATOR_AUTO_SCAN_MS=20) as (w, proxy, http, base):
        await wait_until(lambda: proxy.status_of("acme") == "CONNECTED", what="connected")
        first = await post(http, base, "slow", {"to": TO, "type": "image", "media_url": slow})
        second = await post(http, base, "big", {"to": TO, "type": "image", "media_base64": b64(big)})
        assert (first.status_code, second.status_code) == (202, 202)
        await wait_until(lambda: media.started["slow.jpg"] == 1, what="the slow download")
        await w.backend.session("acme").drop()
        await wait_until(lambda: proxy.statuses_of("acme")[-1].get("reason") == "network", what="dropped")

        async def outcome(key: str) -> dict[str, Any] | None:
            got = (await http.get(f"{base}/api/instances/acme/messages/{key}", headers=API)).json()
            return got if got["state"] != "pending" else None

        slow_outcome = await polled(lambda: outcome("slow"), "the slow one's outcome")
        assert (slow_outcome["state"], slow_outcome["error_code"]) == ("failed", "send_failed")
        big_outcome = await polled(lambda: outcome("big"), "the big one's outcome")
        assert big_outcome["state"] == "sent", big_outcome
        sent = w.backend.sent("acme")
        assert [(s["type"], s["sha256"]) for s in sent] == [("image", sha(big))]


async def test_concurrent_repeats_send_once_and_accepted_sends_keep_their_order(tmp_path):
    async with api_worker(tmp_path, API_SEND_WAIT_S=0, SEND_MIN_GAP_MS=50, SEND_JITTER_MS=0, TYPING_INDICATOR=False) as (w, proxy, http, base):
        answers: list[httpx.Response] = []

        async def one() -> None:
            answers.append(await post(http, base, "same", {"to": TO, "body": "only once"}))

        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(one)
        assert sum("Idempotent-Replayed" not in r.headers for r in answers) == 1
        assert all(r.status_code in (200, 202) for r in answers)
        for i in range(5):  # each answered 202 at once (API_SEND_WAIT_S=0): sent in the order accepted
            r = await post(http, base, f"o{i}", {"to": TO, "body": f"order {i}"})
            assert r.status_code in (200, 202)
        await wait_until(lambda: len(w.backend.sent("acme")) == 6, what="6 sends")
        assert [s["body"] for s in w.backend.sent("acme")] == ["only once", *(f"order {i}" for i in range(5))]
        await anyio.sleep(0.3)
        assert len(w.backend.sent("acme")) == 6


async def test_a_bug_in_a_send_job_costs_that_message_not_the_worker(tmp_path, monkeypatch):
    async with api_worker(tmp_path) as (w, proxy, http, base):

        async def broken(*_: Any) -> Any:
            raise RuntimeError("a bug")

        monkeypatch.setattr(w.outbound.resolver, "resolve", broken)
        r = await post(http, base, "bug", {"to": TO, "body": "x"})
        assert (r.status_code, r.json()["state"], r.json()["error_code"]) == (200, "not_sent", "internal_error")
        monkeypatch.undo()
        r = await post(http, base, "bug", {"to": TO, "body": "x"})  # nothing was sent: the key runs again
        assert r.json()["state"] == "sent"
        assert (await http.get(f"{base}/health")).status_code == 200


async def test_an_outcome_is_read_only_under_its_own_instance_and_key(tmp_path):
    async with api_worker(tmp_path) as (w, proxy, http, base):
        assert (await post(http, base, "b:c", {"to": TO, "body": "x"})).json()["state"] == "sent"
        assert (await http.get(f"{base}/api/instances/acme/messages/b:c", headers=API)).status_code == 200
        r = await http.get(f"{base}/api/instances/acme:b/messages/c", headers=API)  # same "api:acme:b:c"
        assert r.status_code == 404 and error_of(r)["code"] == "message_not_found"
