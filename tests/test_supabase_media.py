"""The Supabase kit and issue #11: message types both ways, media through Storage.

The migration and the worker-proxy function run for real (PostgreSQL 15, the
function under Deno, tests/pg_helpers.py). Supabase Storage cannot run here:
its object endpoints are served on loopback by **a faithful fake**
(tests/fake_storage.py: upload with ``x-upsert``, ``object/sign`` →
``{"signedURL"}`` relative to ``/storage/v1``, ``GET`` of the signed URL), so
these tests check the function's Storage calls against that fake, not against
the real Storage API.
"""

from __future__ import annotations

import hashlib
import uuid

import httpx
import pytest

from tests.fake_storage import FakeStorage, StoredObject
from tests.pg_helpers import (
    SUPABASE_DIR,
    EdgeFunction,
    PgServer,
    WaDb,
    clean_wa_db,
    migration_files,
    pg_server,
    wa_db,
)

pytestmark = [pytest.mark.postgres, pytest.mark.slow]
deno = pytest.mark.deno
FIXTURES = (clean_wa_db, pg_server, wa_db)  # requested by name below

FIRST = SUPABASE_DIR / "migrations" / "20261123000000_wa_worker.sql"
TYPES = SUPABASE_DIR / "migrations" / "20261125000000_wa_worker_message_types.sql"
RECEIPTS = SUPABASE_DIR / "migrations" / "20261126000000_wa_worker_receipts_calls.sql"
MAX_MEDIA = 4096  # WORKER_MEDIA_MAX_BYTES for these tests
PNG = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489"
                    "0000000d49444154789c6364f8cf000000040001a2f1d1bb0000000049454e44ae426082")


# ------------------------------------------------------------------ migration


def test_message_types_migration_runs_on_a_database_with_rows(pg_server: PgServer) -> None:
    assert migration_files()[:3] == [FIRST, TYPES, RECEIPTS]  # later: tests/test_supabase_settings.py
    name = f"wa_types_{uuid.uuid4().hex[:10]}"
    pg_server.create_database(name)
    db = WaDb(pg_server, name)
    try:
        db.psql(FIRST.read_text())
        db.insert_instance("acme", "CONNECTED")
        mid = db.insert_outbound("acme", "5511999990000", "old text")
        db.psql("insert into wa_inbound (instance_id, wa_message_id, \"from\", body) "
                "values ('acme', 'OLD1', '1@s.whatsapp.net', 'old inbound')")
        db.psql(TYPES.read_text())
        db.psql(TYPES.read_text())  # idempotent
        row = db.outbound(mid)
        assert row["body"] == "old text" and row["type"] is None and row["error_code"] is None
        [inb] = db.inbound_rows()
        assert inb["body"] == "old inbound" and inb["type"] == "text" and inb["view_once"] is False
        # new rows: a captionless image has body '' by default
        db.psql("insert into wa_outbound (instance_id, \"to\", type, media_path) "
                "values ('acme', '1', 'image', 'out/a.png')")
        bad = db.psql("insert into wa_outbound (instance_id, \"to\", type) values ('acme', '1', 'edit')", check=False)
        assert "wa_outbound_type_check" in bad.stderr
        bad = db.psql("insert into wa_inbound (instance_id, wa_message_id, \"from\", body, media_error) "
                      "values ('acme', 'X', '1', '', 'lost')", check=False)
        assert "wa_inbound_media_error_check" in bad.stderr
        # no storage schema in a plain PostgreSQL: the bucket step is skipped, not an error
        assert db.scalar("select to_regclass('storage.buckets') is null") is True
        # issue #12's step keeps every row, twice over; its new inbound types are accepted
        db.psql(RECEIPTS.read_text())
        db.psql(RECEIPTS.read_text())
        assert db.outbound(mid)["receipt_status"] is None and len(db.inbound_rows()) == 1
        db.psql("insert into wa_inbound (instance_id, wa_message_id, \"from\", body, type, call_video, call_rejected) "
                "values ('acme', 'CALL1', '1', '', 'call', true, false)")
        bad = db.psql(f"update wa_outbound set receipt_status = 'seen' where id = '{mid}'", check=False)
        assert "wa_outbound_receipt_status_check" in bad.stderr
    finally:
        pg_server.psql(f"drop database if exists {name} with (force);")


def test_migration_creates_the_private_bucket_where_storage_exists(pg_server: PgServer) -> None:
    name = f"wa_bucket_{uuid.uuid4().hex[:10]}"
    pg_server.create_database(name)
    db = WaDb(pg_server, name)
    try:
        # the columns of Supabase's storage.buckets that the migration writes
        db.psql("create schema storage; create table storage.buckets (id text primary key, name text not null, "
                "public boolean default false);")
        db.apply_migrations()
        db.apply_migrations()
        assert db.query("select id, name, public from storage.buckets") == [
            {"id": "wa-media", "name": "wa-media", "public": False}]
    finally:
        pg_server.psql(f"drop database if exists {name} with (force);")


# ------------------------------------------------------------------ function + fake Storage


@pytest.fixture(scope="module")
def storage():
    with FakeStorage() as fake:
        yield fake


@pytest.fixture(scope="module")
def media_fn(wa_db: WaDb, storage: FakeStorage):
    fn = EdgeFunction(wa_db.dsn, extra_env={
        "SUPABASE_URL": storage.url, "SUPABASE_SERVICE_ROLE_KEY": storage.service_key,
        "WORKER_MEDIA_MAX_BYTES": str(MAX_MEDIA), "MEDIA_SIGNED_URL_SECONDS": "120"})
    fn.start()
    yield fn
    fn.stop()


@pytest.fixture
def fn(media_fn: EdgeFunction, clean_wa_db: WaDb, storage: FakeStorage) -> EdgeFunction:
    storage.objects.clear()
    storage.calls.clear()
    storage.fail_next = 0
    clean_wa_db.insert_instance("acme", "CONNECTED")
    return media_fn


def claim(fn: EdgeFunction) -> httpx.Response:
    return fn.request("GET", "queued-messages", params={"instanceId": "acme"})


def upload(fn: EdgeFunction, data, wa_id: str = "WA1", **headers) -> httpx.Response:
    return fn.request("POST", "upload-media", params={"instanceId": "acme", "wa_message_id": wa_id},
                      content=data, headers={"Content-Type": "image/png", **headers})


@deno
def test_outbound_storage_object_gets_a_signed_url(fn: EdgeFunction, wa_db: WaDb, storage: FakeStorage) -> None:
    storage.objects[("wa-media", "out/invoice 1.pdf")] = StoredObject(b"%PDF-1.4 test", "application/pdf")
    mid = wa_db.insert_outbound("acme", "5511999990000", "your invoice", type="document",
                                media_path="out/invoice 1.pdf", filename="invoice.pdf", mimetype="application/pdf")
    r = claim(fn)
    assert r.status_code == 200, r.text
    [msg] = r.json()["messages"]
    assert msg["id"] == mid and msg["type"] == "document" and msg["filename"] == "invoice.pdf"
    assert msg["body"] == "your invoice" and msg["mimetype"] == "application/pdf"
    assert msg["media_url"].startswith(f"{storage.url}/storage/v1/object/sign/wa-media/out/invoice%201.pdf?token=")
    assert "media_path" not in msg
    # the worker GETs it without credentials
    got = httpx.get(msg["media_url"], timeout=10)
    assert got.status_code == 200 and got.content == b"%PDF-1.4 test"
    assert ("POST", "/storage/v1/object/sign/wa-media/out/invoice 1.pdf") in storage.calls


@deno
def test_outbound_every_type_passes_through(fn: EdgeFunction, wa_db: WaDb) -> None:
    vcard = "BEGIN:VCARD\nVERSION:3.0\nFN:Ana\nEND:VCARD"
    rows = [
        dict(body="", type="voice", media_url="https://cdn.example/n.mp3"),
        dict(body="", type="location", latitude=-23.55, longitude=-46.63, location_name="Paulista",
             location_address="Av. Paulista, 1000"),
        dict(body="", type="contact", contact_name="Ana", contact_phone="+5511977776666"),
        dict(body="", type="contact", vcard=vcard),
        dict(body="", type="reaction", reaction="👍", reply_to="3EB0AAA"),
        dict(body="", type="reaction", reaction="", reply_to="3EB0AAA"),
        dict(body="a reply", reply_to="3EB0BBB"),
        dict(body="plain"),
    ]
    for i, row in enumerate(rows):
        wa_db.insert_outbound("acme", "5511999990000", row.pop("body"), created_ago_s=100 - i, **row)
    got = claim(fn).json()["messages"]
    strip = [{k: v for k, v in m.items() if k not in ("id", "instanceId", "to")} for m in got]
    assert strip == [
        {"body": "", "type": "voice", "media_url": "https://cdn.example/n.mp3"},
        {"body": "", "type": "location", "latitude": -23.55, "longitude": -46.63, "name": "Paulista",
         "address": "Av. Paulista, 1000"},
        {"body": "", "type": "contact", "contact": {"name": "Ana", "phone": "+5511977776666"}},
        {"body": "", "type": "contact", "vcard": vcard},
        {"body": "", "type": "reaction", "reaction": "👍", "reply_to": "3EB0AAA"},
        {"body": "", "type": "reaction", "reaction": "", "reply_to": "3EB0AAA"},
        {"body": "a reply", "reply_to": "3EB0BBB"},
        {"body": "plain"},  # a text row is exactly the first contract's record
    ]


@deno
def test_missing_storage_object_fails_the_row_not_the_poll(fn: EdgeFunction, wa_db: WaDb) -> None:
    gone = wa_db.insert_outbound("acme", "1", "", type="image", media_path="out/deleted.png", created_ago_s=10)
    fine = wa_db.insert_outbound("acme", "1", "still sent")
    r = claim(fn)
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["messages"]] == [fine]
    row = wa_db.outbound(gone)
    assert row["status"] == "failed" and row["error_code"] == "media_fetch_failed"
    assert "out/deleted.png" in row["error"]


@deno
def test_storage_outage_gives_the_claim_back_and_text_still_goes(fn: EdgeFunction, wa_db: WaDb,
                                                                  storage: FakeStorage) -> None:
    storage.objects[("wa-media", "out/a.png")] = StoredObject(PNG, "image/png")
    mid = wa_db.insert_outbound("acme", "1", "", type="image", media_path="out/a.png", created_ago_s=10)
    text = wa_db.insert_outbound("acme", "1", "not held back by Storage")
    storage.fail_next = 1
    r = claim(fn)
    assert r.status_code == 200 and [m["id"] for m in r.json()["messages"]] == [text]
    row = wa_db.outbound(mid)
    assert (row["status"], row["claimed_at"], row["attempts"], row["error_code"]) == ("queued", None, 0, None)
    # Storage is back: the next poll hands it out
    [msg] = claim(fn).json()["messages"]
    assert msg["id"] == mid and httpx.get(msg["media_url"], timeout=10).content == PNG


@deno
def test_upload_media_puts_bytes_in_the_private_bucket_idempotently(fn: EdgeFunction,
                                                                     storage: FakeStorage) -> None:
    sha = hashlib.sha256(PNG).hexdigest()
    r = upload(fn, PNG, **{"X-Sha256": sha, "X-Filename": "photo.png"})
    assert r.status_code == 200, r.text
    assert r.json() == {"path": "acme/WA1"}
    obj = storage.objects[("wa-media", "acme/WA1")]
    assert obj.data == PNG and obj.content_type == "image/png"
    # a retried upload (lost answer) lands on the same object: x-upsert
    again = upload(fn, PNG)
    assert again.status_code == 200 and again.json() == {"path": "acme/WA1"}
    assert len(storage.objects) == 1

    def chunks():  # no Content-Length: streamed through to Storage
        yield PNG[:20]
        yield PNG[20:]

    assert upload(fn, chunks(), wa_id="WA2").json() == {"path": "acme/WA2"}
    assert storage.objects[("wa-media", "acme/WA2")].data == PNG


@deno
def test_upload_media_refusals(fn: EdgeFunction, storage: FakeStorage) -> None:
    r = fn.request("POST", "upload-media", params={"instanceId": "acme", "wa_message_id": "W"}, content=PNG,
                   secret="wrong")
    assert r.status_code == 401
    r = fn.request("POST", "upload-media", params={"instanceId": "ghost", "wa_message_id": "W"}, content=PNG)
    assert r.status_code == 404
    r = fn.request("POST", "upload-media", params={"instanceId": "acme", "wa_message_id": "../x"}, content=PNG)
    assert r.status_code == 400
    assert upload(fn, b"", wa_id="EMPTY").status_code == 400
    assert upload(fn, b"x" * (MAX_MEDIA + 1), wa_id="BIG").status_code == 413

    def chunks():  # the cap holds without a Content-Length too
        for _ in range(8):
            yield b"y" * 1024

    assert upload(fn, chunks(), wa_id="BIG2").status_code == 413
    assert ("wa-media", "acme/BIG") not in storage.objects and ("wa-media", "acme/BIG2") not in storage.objects
    storage.fail_next = 1
    assert upload(fn, PNG, wa_id="DOWN").status_code == 503  # retried by the worker like /inbound
    assert fn.request("GET", "upload-media").status_code == 405


@deno
def test_upload_then_inbound_stores_the_path(fn: EdgeFunction, wa_db: WaDb) -> None:
    path = upload(fn, PNG, wa_id="IMG1").json()["path"]
    base = {"instanceId": "acme", "from": "5511988887777@s.whatsapp.net", "chat_id": "5511988887777@s.whatsapp.net",
            "timestamp": 1763900000}
    bodies = [
        dict(wa_message_id="IMG1", type="image", body="", quoted_id="Q1",
             media={"url": path, "mimetype": "image/png", "filename": None, "size": len(PNG),
                    "sha256": hashlib.sha256(PNG).hexdigest(), "seconds": None}),
        dict(wa_message_id="DOC1", type="document", body="the contract",
             media={"url": "https://files.example/c.pdf", "mimetype": "application/pdf", "filename": "c.pdf",
                    "size": 10, "sha256": "ab" * 32}),
        dict(wa_message_id="VOX1", type="voice", body="", media_error="too_large",
             media={"url": None, "mimetype": "audio/ogg; codecs=opus", "size": 99_999_999, "seconds": 600}),
        dict(wa_message_id="R1", type="reaction", body="", reaction={"emoji": "❤️", "target_id": "IMG1"}),
        dict(wa_message_id="L1", type="location", body="", latitude=-23.5, longitude=-46.6, name="Casa",
             address="Rua 1"),
        dict(wa_message_id="C1", type="contact", body="",
             contact={"name": "Ana", "vcard": "BEGIN:VCARD\nEND:VCARD", "phone": "5511977776666"}),
        dict(wa_message_id="E1", type="edit", body="fixed", target_id="T1"),
        dict(wa_message_id="X1", type="revoke", body="", target_id="T2"),
        dict(wa_message_id="O1", type="image", body="", view_once=True, media={"url": None},
             media_error="upload_unsupported"),
    ]
    for b in bodies:
        r = fn.request("POST", "inbound", json={**base, **b})
        assert r.status_code == 200, (b["wa_message_id"], r.text)
    rows = {r["wa_message_id"]: r for r in wa_db.inbound_rows("acme")}
    img = rows["IMG1"]
    assert (img["type"], img["media_path"], img["media_url"], img["media_size"], img["quoted_id"]) == (
        "image", "acme/IMG1", None, len(PNG), "Q1")
    assert rows["DOC1"]["media_url"] == "https://files.example/c.pdf" and rows["DOC1"]["media_path"] is None
    assert rows["DOC1"]["body"] == "the contract" and rows["DOC1"]["filename"] == "c.pdf"
    assert rows["VOX1"]["media_error"] == "too_large" and rows["VOX1"]["media_seconds"] == 600
    assert (rows["R1"]["reaction"], rows["R1"]["target_id"]) == ("❤️", "IMG1")
    assert (rows["L1"]["latitude"], rows["L1"]["location_name"], rows["L1"]["location_address"]) == (
        -23.5, "Casa", "Rua 1")
    assert rows["C1"]["contact_phone"] == "5511977776666" and rows["C1"]["vcard"].startswith("BEGIN:VCARD")
    assert (rows["E1"]["type"], rows["E1"]["body"], rows["E1"]["target_id"]) == ("edit", "fixed", "T1")
    assert (rows["X1"]["type"], rows["X1"]["target_id"]) == ("revoke", "T2")
    assert rows["O1"]["view_once"] is True and rows["O1"]["media_error"] == "upload_unsupported"


@deno
@pytest.mark.parametrize("extra", [
    dict(type="selfie"),
    dict(type="image", media="http://x"),
    dict(type="image", media={"size": "big"}),
    dict(type="image", media={"size": -1}),
    dict(type="image", media_error="lost"),
    dict(type="reaction", reaction="👍"),
    dict(type="location", latitude=91, longitude=0),
    dict(type="location", latitude="south"),
    dict(type="image", view_once="yes"),
    dict(type="contact", contact={"name": 3}),
])
def test_inbound_bad_type_fields_are_400(fn: EdgeFunction, wa_db: WaDb, extra: dict) -> None:
    body = {"instanceId": "acme", "from": "1@s.whatsapp.net", "wa_message_id": "Z1", "body": "", **extra}
    r = fn.request("POST", "inbound", json=body)
    assert r.status_code == 400, r.text
    assert wa_db.inbound_rows() == []


@deno
def test_mark_failed_stores_error_code(fn: EdgeFunction, wa_db: WaDb) -> None:
    mid = wa_db.insert_outbound("acme", "1", "", type="image", media_url="https://x/y.png")
    r = fn.request("POST", "mark-failed", json={"messageId": mid, "error": "the media is larger than 64 MiB",
                                                "error_code": "media_too_large"})
    assert r.status_code == 200
    row = wa_db.outbound(mid)
    assert (row["status"], row["error_code"]) == ("failed", "media_too_large")
    assert fn.request("POST", "mark-failed", json={"messageId": mid, "error": "x",
                                                   "error_code": "Not a code"}).status_code == 400
    # a v1 worker sends no error_code
    mid2 = wa_db.insert_outbound("acme", "1", "hi")
    assert fn.request("POST", "mark-failed", json={"messageId": mid2, "error": "send failed: x"}).status_code == 200
    assert wa_db.outbound(mid2)["error_code"] is None
    # the worker learns it was delivered after all: the code goes with the error
    fn.request("POST", "mark-sent", json={"messageId": mid, "wa_message_id": "W"})
    assert wa_db.outbound(mid)["error_code"] is None
