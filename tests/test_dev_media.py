"""The dev proxy and issue #11: every message type both ways, media kept in its folder.

Real proxy (aiohttp on loopback, in a thread) over a real SQLite file; no mocks.
"""

from __future__ import annotations

import base64
import hashlib
import os
import sqlite3
import stat
from pathlib import Path

import httpx
import pytest

from wa_worker.dev.background import BackgroundProxy
from wa_worker.dev.store import DEV_MIGRATIONS, V1_SCHEMA, DevStore

SECRET = "test-secret-0123456789"
AUTH = {"Authorization": f"Bearer {SECRET}"}
# a real 1x1 PNG
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)
PDF = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"


@pytest.fixture
def proxy(tmp_path: Path):
    store = DevStore(tmp_path / "proxy.db")
    with BackgroundProxy(store, SECRET) as bp:
        bp.store.add_instance("a")
        yield bp
    store.close()


@pytest.fixture
def http(proxy: BackgroundProxy):
    with httpx.Client(base_url=proxy.url, headers=AUTH, timeout=10, trust_env=False) as client:
        yield client


def queue(http: httpx.Client, **fields) -> httpx.Response:
    return http.post("/dev/messages", json={"instanceId": "a", "to": "5511999990000", **fields})


def claim(http: httpx.Client) -> list[dict]:
    r = http.get("/queued-messages", params={"instanceId": "a"})
    assert r.status_code == 200, r.text
    return r.json()["messages"]


def upload(http: httpx.Client, data: bytes, wa_id: str = "WA1", ctype: str = "image/png", **headers) -> httpx.Response:
    return http.post("/upload-media", params={"instanceId": "a", "wa_message_id": wa_id}, content=data,
                     headers={"Content-Type": ctype, **headers})


# ---------------------------------------------------------------------------- outbound


def test_queue_base64_media_is_stored_and_handed_out_as_a_url(proxy: BackgroundProxy, http: httpx.Client) -> None:
    r = queue(http, type="image", media_base64=base64.b64encode(PNG).decode(), body="a caption",
              filename="dot.png")
    assert r.status_code == 201, r.text
    sha = hashlib.sha256(PNG).hexdigest()
    path = proxy.store.media_dir / sha
    assert path.read_bytes() == PNG
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(proxy.store.media_dir.stat().st_mode) == 0o700
    [msg] = claim(http)
    assert msg["type"] == "image" and msg["body"] == "a caption" and msg["filename"] == "dot.png"
    assert msg["mimetype"] == "image/png"  # sniffed
    assert msg["media_url"] == f"{proxy.url}/media/{sha}"
    assert "media_base64" not in msg and "media_sha256" not in msg
    # the worker fetches it: loopback, no bearer, the right type, never sniffed by a browser
    got = httpx.get(msg["media_url"], trust_env=False)
    assert got.status_code == 200 and got.content == PNG
    assert got.headers["content-type"] == "image/png"
    assert got.headers["x-content-type-options"] == "nosniff"


def test_queue_every_type_passes_the_fields_through(http: httpx.Client) -> None:
    vcard = "BEGIN:VCARD\nVERSION:3.0\nFN:Ana\nTEL;waid=5511977776666:+5511977776666\nEND:VCARD"
    cases = [
        dict(type="voice", media_url="https://cdn.example/note.mp3"),
        dict(type="document", media_url="https://cdn.example/r.pdf", filename="r.pdf", mimetype="application/pdf",
             body="the report"),
        dict(type="sticker", media_url="https://cdn.example/s.webp"),
        dict(type="location", latitude=-23.55, longitude=-46.63, name="Paulista", address="Av. Paulista"),
        dict(type="contact", contact={"name": "Ana", "phone": "+55 11 97777-6666"}),
        dict(vcard=vcard),
        dict(type="reaction", reaction="👍", reply_to="3EB0AAA"),
        dict(type="reaction", reaction="", reply_to="3EB0AAA"),
        dict(body="replying", reply_to="3EB0BBB"),
    ]
    for case in cases:
        assert queue(http, **case).status_code == 201, case
    got = claim(http)
    assert [m.get("type") for m in got] == ["voice", "document", "sticker", "location", "contact", "contact",
                                            "reaction", "reaction", None]
    assert got[0]["media_url"] == "https://cdn.example/note.mp3" and got[0]["body"] == ""
    assert got[1]["filename"] == "r.pdf" and got[1]["mimetype"] == "application/pdf"
    assert got[1]["body"] == "the report"
    assert (got[3]["latitude"], got[3]["longitude"], got[3]["name"], got[3]["address"]) == (
        -23.55, -46.63, "Paulista", "Av. Paulista")
    assert got[4]["contact"] == {"name": "Ana", "phone": "+55 11 97777-6666"} and "vcard" not in got[4]
    assert got[5]["vcard"] == vcard and "contact" not in got[5]
    assert got[6]["reaction"] == "👍" and got[6]["reply_to"] == "3EB0AAA"
    assert got[7]["reaction"] == "" and got[7]["reply_to"] == "3EB0AAA"
    assert got[8] == {"id": got[8]["id"], "instanceId": "a", "to": "5511999990000", "body": "replying",
                      "reply_to": "3EB0BBB"}


def test_text_message_is_the_first_contract_record(http: httpx.Client) -> None:
    queue(http, body="hi")
    [msg] = claim(http)
    assert set(msg) == {"id", "instanceId", "to", "body"}


@pytest.mark.parametrize(
    "fields,fragment",
    [
        (dict(type="image"), "media_url"),
        (dict(type="image", media_url="ftp://x/y.png"), "http"),
        (dict(type="voice", media_url="https://x/y.mp3", body="caption"), "caption"),
        (dict(type="location", latitude=91, longitude=0), "latitude"),
        (dict(type="reaction", reaction="👍"), "reply_to"),
        (dict(type="contact", contact={"name": "x"}), "contact"),
        (dict(type="bogus"), "unknown type"),
        (dict(body=""), "body"),
        (dict(media_base64="not base64!!"), "base64"),
    ],
)
def test_queue_refuses_bad_content_with_the_reason(http: httpx.Client, fields: dict, fragment: str) -> None:
    r = queue(http, **fields)
    assert r.status_code == 400, r.text
    assert fragment in r.json()["error"]


def test_queue_base64_over_the_cap_is_413(proxy: BackgroundProxy, http: httpx.Client) -> None:
    proxy.proxy.media_max_bytes = 1024
    r = queue(http, type="document", media_base64=base64.b64encode(b"x" * 2048).decode())
    assert r.status_code == 413
    assert [p.name for p in proxy.store.media_dir.iterdir()] == []


def test_mark_failed_stores_error_code(proxy: BackgroundProxy, http: httpx.Client) -> None:
    msg = queue(http, type="image", media_url="https://cdn.example/big.jpg").json()["message"]
    r = http.post("/mark-failed", json={"messageId": msg["id"], "error": "media over 64 MiB: send a smaller file",
                                        "error_code": "media_too_large"})
    assert r.status_code == 200
    [row] = http.get("/dev/messages").json()["outbound"]
    assert row["status"] == "failed" and row["error_code"] == "media_too_large"
    assert row["error"] == "media over 64 MiB: send a smaller file"
    assert http.post("/mark-failed", json={"messageId": msg["id"], "error": "x",
                                           "error_code": "Not A Code!"}).status_code == 400


# ---------------------------------------------------------------------------- upload and serve


def test_upload_media_idempotent_and_served(proxy: BackgroundProxy, http: httpx.Client) -> None:
    sha = hashlib.sha256(PNG).hexdigest()
    r = upload(http, PNG, **{"X-Sha256": sha, "X-Filename": "photo.png"})
    assert r.status_code == 200, r.text
    url = r.json()["url"]
    assert url == f"{proxy.url}/media/{sha}"
    # a repeat (the worker retries after a lost answer) names the same file, whatever it sends
    again = upload(http, b"other bytes", ctype="text/plain")
    assert again.status_code == 200 and again.json()["url"] == url
    assert sorted(p.name for p in proxy.store.media_dir.iterdir()) == [sha]  # nothing else kept
    got = httpx.get(url, trust_env=False)
    assert got.content == PNG and got.headers["content-type"] == "image/png"
    assert "photo.png" in got.headers["content-disposition"]
    # a stranger's HTML file is never a page on the proxy's origin: a sandboxed download
    html = upload(http, b"<script>fetch('/ui/queue')</script>", wa_id="HTML1", ctype="text/html").json()["url"]
    got = httpx.get(html, trust_env=False)
    assert got.headers["content-disposition"] == "attachment"
    assert "sandbox" in got.headers["content-security-policy"]
    # a different message with the same bytes shares the file
    assert upload(http, PNG, wa_id="WA2").json()["url"] == url


def test_upload_media_refusals(proxy: BackgroundProxy, http: httpx.Client) -> None:
    assert httpx.post(proxy.url + "/upload-media?instanceId=a&wa_message_id=W", content=PNG,
                      trust_env=False).status_code == 401
    assert http.post("/upload-media", params={"instanceId": "ghost", "wa_message_id": "W"},
                     content=PNG).status_code == 404
    assert http.post("/upload-media", params={"instanceId": "a", "wa_message_id": "../x"},
                     content=PNG).status_code == 400
    assert upload(http, b"", wa_id="E").status_code == 400
    assert upload(http, PNG, wa_id="S", **{"X-Sha256": "0" * 64}).status_code == 400
    proxy.proxy.media_max_bytes = 1024
    assert upload(http, b"x" * 2048, wa_id="BIG").status_code == 413

    def chunks():  # no Content-Length: the cap is enforced while streaming
        for _ in range(4):
            yield b"y" * 512

    assert http.post("/upload-media", params={"instanceId": "a", "wa_message_id": "BIG2"},
                     content=chunks()).status_code == 413
    assert list(proxy.store.media_dir.iterdir()) == []  # no partial files left
    assert proxy.store.get_upload("a", "BIG") is None


def test_media_route_refuses_traversal_unknown_and_remote_hosts(proxy: BackgroundProxy, http: httpx.Client) -> None:
    (proxy.store.media_dir.parent / "secret.txt").write_text("nope")
    for path in ("/media/../proxy.db", "/media/%2e%2e/proxy.db", "/media/..%2fsecret.txt",
                 "/media/" + "a" * 64, "/media/" + "A" * 64, "/media/abc"):
        r = httpx.get(proxy.url + path, trust_env=False)
        assert r.status_code in (401, 403, 404), path  # 401: normalised out of /media/
        assert b"nope" not in r.content and b"SQLite" not in r.content
    sha = hashlib.sha256(PNG).hexdigest()
    upload(http, PNG)
    assert httpx.get(f"{proxy.url}/media/{sha}", headers={"Host": "evil.example"},
                     trust_env=False).status_code == 403


# ---------------------------------------------------------------------------- inbound


def base(wa_id: str, **extra) -> dict:
    return {"instanceId": "a", "from": "5511988887777@s.whatsapp.net", "wa_message_id": wa_id,
            "chat_id": "5511988887777@s.whatsapp.net", "sender_id": "5511988887777@s.whatsapp.net",
            "from_me": False, "is_group": False, "timestamp": 1763900000, **extra}


def test_inbound_every_type_is_stored(http: httpx.Client) -> None:
    media = {"url": "http://127.0.0.1:1/media/" + "b" * 64, "mimetype": "image/jpeg", "filename": None,
             "size": 1234, "sha256": "b" * 64, "seconds": None}
    bodies = [
        base("I1", type="image", body="", media=media, quoted_id="Q1"),
        base("V1", type="voice", body="", media={**media, "url": None, "mimetype": "audio/ogg; codecs=opus",
                                                 "seconds": 7}, media_error="upload_unsupported"),
        base("R1", type="reaction", body="", reaction={"emoji": "❤️", "target_id": "I1"}),
        base("L1", type="location", body="", latitude=-23.5, longitude=-46.6, name="Casa", address="Rua 1"),
        base("C1", type="contact", body="", contact={"name": "Ana", "vcard": "BEGIN:VCARD\nEND:VCARD",
                                                     "phone": "5511977776666"}),
        base("E1", type="edit", body="fixed text", target_id="T1"),
        base("X1", type="revoke", body="", target_id="T2"),
        base("O1", type="image", body="once", media=media, view_once=True),
        base("U1", type="unknown", body=""),
    ]
    for b in bodies:
        r = http.post("/inbound", json=b)
        assert r.status_code == 200, (b["wa_message_id"], r.text)
    rows = {m["wa_message_id"]: m for m in http.get("/dev/messages").json()["inbound"]}
    assert rows["I1"]["type"] == "image" and rows["I1"]["media"]["size"] == 1234 and rows["I1"]["quoted_id"] == "Q1"
    assert rows["V1"]["media"]["url"] is None and rows["V1"]["media_error"] == "upload_unsupported"
    assert rows["V1"]["media"]["seconds"] == 7
    assert rows["R1"]["reaction"] == {"emoji": "❤️", "target_id": "I1"}
    assert (rows["L1"]["latitude"], rows["L1"]["name"], rows["L1"]["address"]) == (-23.5, "Casa", "Rua 1")
    assert rows["C1"]["contact"]["phone"] == "5511977776666"
    assert rows["E1"]["target_id"] == "T1" and rows["E1"]["body"] == "fixed text"
    assert rows["X1"]["type"] == "revoke" and rows["X1"]["target_id"] == "T2"
    assert rows["O1"]["view_once"] is True and rows["I1"]["view_once"] is False


@pytest.mark.parametrize(
    "extra",
    [
        dict(body=""),  # a text needs its text
        dict(type="image", body=None),
        dict(type="selfie", body="x"),
        dict(type="image", body="", media="http://x"),
        dict(type="image", body="", media={"size": "big"}),
        dict(type="image", body="", media_error="lost"),
        dict(type="reaction", body="", reaction="👍"),
        dict(type="location", body="", latitude="south"),
        dict(type="image", body="", view_once="yes"),
    ],
)
def test_inbound_rejects_bad_type_fields(http: httpx.Client, extra: dict) -> None:
    body = base("Z1", **extra)
    if body.get("body") is None:
        body.pop("body")
    assert http.post("/inbound", json=body).status_code == 400


# ---------------------------------------------------------------------------- migration


def test_existing_dev_database_is_migrated_in_place(tmp_path: Path) -> None:
    """A proxy.db written by the previous wa-worker dev (no user_version, no new columns)."""
    path = tmp_path / "proxy.db"
    db = sqlite3.connect(path)
    db.executescript(V1_SCHEMA)
    db.execute("INSERT INTO instances (id, created_at, updated_at) VALUES ('old', 1, 1)")
    db.execute("INSERT INTO outbound (id, instance_id, to_addr, body, created_at, updated_at) "
               "VALUES ('m-old', 'old', '5511', 'kept', 1, 1)")
    db.execute("INSERT INTO inbound (instance_id, wa_message_id, from_jid, body, received_at) "
               "VALUES ('old', 'W-old', '5511@s.whatsapp.net', 'hello', 1)")
    db.commit()
    db.close()
    store = DevStore(path)
    try:
        [out] = store.list_outbound()
        assert out["id"] == "m-old" and out["body"] == "kept" and out["type"] == "text"
        [inb] = store.list_inbound()
        assert inb["body"] == "hello" and inb["type"] == "text" and inb["media"] is None
        msg = store.queue_message("old", "5511", "", {"type": "image", "media_url": "https://x/y.png"})
        assert msg["type"] == "image"
        assert store.mark_failed(msg["id"], "bad", "media_refused")[0]["error_code"] == "media_refused"
    finally:
        store.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == DEV_MIGRATIONS[-1].version  # the latest
    store = DevStore(path)  # and opening it again changes nothing
    assert len(store.list_outbound()) == 2
    store.close()
