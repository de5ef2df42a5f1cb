"""The reference proxy of ``wa-worker dev`` against docs/proxy-contract.md (loopback only)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from aiohttp.test_utils import make_mocked_request

from tests.conftest import AUTH, FakeClock
from tests.fakeproxy import SECRET
from wa_worker.dev.background import BackgroundProxy
from wa_worker.dev.page import check_local
from wa_worker.dev.store import CLAIM_LEASE_S, DevStore


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_800_000_000.0)


@pytest.fixture
def events() -> list:
    return []


@pytest.fixture
def proxy(tmp_path: Path, clock: FakeClock, events: list):
    store = DevStore(tmp_path / "proxy.db", clock=clock)
    with BackgroundProxy(store, SECRET, on_event=events.append) as bp:
        yield bp
    store.close()


@pytest.fixture
def http(proxy: BackgroundProxy):
    with httpx.Client(base_url=proxy.url, headers=AUTH, timeout=5, trust_env=False) as client:
        yield client


def add(proxy: BackgroundProxy, iid: str, priority: int = 0) -> None:
    proxy.store.add_instance(iid, priority=priority)


def queue(http: httpx.Client, iid: str, to: str = "5511999990000", body: str = "hi") -> dict:
    r = http.post("/dev/messages", json={"instanceId": iid, "to": to, "body": body})
    assert r.status_code == 201, r.text
    return r.json()["message"]


def status(http: httpx.Client, iid: str, st: str, **extra) -> httpx.Response:
    return http.post("/update-status", json={"instanceId": iid, "status": st, "qr_code": None, **extra})


# ---------------------------------------------------------------------------- auth


@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/disconnected-instances"),
        ("POST", "/update-status"),
        ("GET", "/queued-messages"),
        ("GET", "/queued-messages?instanceId=a"),
        ("POST", "/mark-sent"),
        ("POST", "/mark-failed"),
        ("POST", "/inbound"),
        ("GET", "/dev/instances"),
        ("POST", "/dev/instances"),
        ("GET", "/dev/messages"),
        ("POST", "/dev/messages"),
        ("GET", "/no-such-route"),
    ],
)
@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-secret-0000"}, {"Authorization": f"Basic {SECRET}"},
     {"Authorization": f"Bearer {SECRET}x"}, {"Authorization": "Bearer"}],
)
def test_bearer_required(proxy: BackgroundProxy, method: str, path: str, headers: dict) -> None:
    r = httpx.request(method, proxy.url + path, headers=headers, json={}, trust_env=False)
    assert r.status_code == 401
    assert SECRET not in r.text


def test_bearer_accepted_case_insensitive_scheme(proxy: BackgroundProxy) -> None:
    r = httpx.get(proxy.url + "/disconnected-instances", headers={"Authorization": f"bearer {SECRET}"}, trust_env=False)
    assert r.status_code == 200


def test_unknown_route_with_bearer_is_404(http: httpx.Client) -> None:
    assert http.get("/nope").status_code == 404


# ---------------------------------------------------------------------------- instances and status


def test_disconnected_instances_shape_and_order(proxy: BackgroundProxy, http: httpx.Client) -> None:
    r = http.get("/disconnected-instances")
    assert r.status_code == 200 and r.json() == {"instances": []}
    add(proxy, "low")
    add(proxy, "high", 10)
    add(proxy, "online")
    assert status(http, "online", "CONNECTED", phone_number="5511999990000").status_code == 200
    assert http.get("/disconnected-instances").json() == {
        "instances": [{"id": "high", "priority": 10}, {"id": "low", "priority": 0}]
    }
    # CONNECTING is still "to connect" (as the Node worker's proxy)
    assert status(http, "high", "CONNECTING").status_code == 200
    assert [i["id"] for i in http.get("/disconnected-instances").json()["instances"]] == ["high", "low"]
    assert status(http, "online", "DISCONNECTED", reason="network").status_code == 200
    assert "online" in [i["id"] for i in http.get("/disconnected-instances").json()["instances"]]


def test_update_status_stores_fields(proxy: BackgroundProxy, http: httpx.Client, events: list) -> None:
    add(proxy, "a")
    qr = "data:image/png;base64,iVBORw0KGgo="
    assert http.post("/update-status", json={"instanceId": "a", "status": "CONNECTING", "qr_code": qr}).json() == {
        "ok": True
    }
    inst = proxy.store.get_instance("a")
    assert inst["status"] == "CONNECTING" and inst["qr_code"] == qr
    status(http, "a", "CONNECTED", phone_number="5511999990000")
    inst = proxy.store.get_instance("a")
    assert (inst["status"], inst["qr_code"], inst["phone_number"], inst["reason"]) == (
        "CONNECTED", None, "5511999990000", None,
    )
    status(http, "a", "DISCONNECTED", reason="logged_out")
    inst = proxy.store.get_instance("a")
    assert (inst["status"], inst["reason"], inst["phone_number"]) == ("DISCONNECTED", "logged_out", "5511999990000")
    kinds = [(e.kind, e.data.get("status")) for e in events if e.kind == "status"]
    assert kinds == [("status", "CONNECTING"), ("status", "CONNECTED"), ("status", "DISCONNECTED")]
    # the same report again is not a change
    status(http, "a", "DISCONNECTED", reason="logged_out")
    assert len([e for e in events if e.kind == "status"]) == 3
    # dev API shows it, without the QR payload
    listed = http.get("/dev/instances").json()["instances"]
    assert listed[0]["id"] == "a" and listed[0]["status"] == "DISCONNECTED" and "qr_code" not in listed[0]


@pytest.mark.parametrize(
    "body,code",
    [
        ({"instanceId": "ghost", "status": "CONNECTED", "qr_code": None}, 404),
        ({"instanceId": "a", "status": "ONLINE", "qr_code": None}, 400),
        ({"instanceId": "a", "qr_code": None}, 400),
        ({"instanceId": "a", "status": "CONNECTING", "qr_code": 12}, 400),
        ({"instanceId": "a", "status": "CONNECTED", "qr_code": None, "phone_number": 5511}, 400),
        ({"instanceId": "../etc", "status": "CONNECTED", "qr_code": None}, 400),
        ({"status": "CONNECTED", "qr_code": None}, 400),
        ([1, 2], 400),
    ],
)
def test_update_status_rejects(proxy: BackgroundProxy, http: httpx.Client, body: object, code: int) -> None:
    add(proxy, "a")
    r = http.post("/update-status", json=body)
    assert r.status_code == code, r.text
    assert "error" in r.json()


def test_non_json_body_is_400(proxy: BackgroundProxy, http: httpx.Client) -> None:
    add(proxy, "a")
    for path in ("/update-status", "/mark-sent", "/mark-failed", "/inbound", "/dev/messages", "/dev/instances"):
        r = http.post(path, content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 400, path
        r = http.post(path, content=b"\xff\xfe", headers={"Content-Type": "application/json"})
        assert r.status_code == 400, path


# ---------------------------------------------------------------------------- queue


def test_claim_and_reoffer_after_lease(proxy: BackgroundProxy, http: httpx.Client, clock: FakeClock) -> None:
    add(proxy, "a")
    add(proxy, "b")
    m1 = queue(http, "a", body="one")
    clock.now += 1
    m2 = queue(http, "a", to="+55 (11) 98888-7777", body="two")
    queue(http, "b", body="other instance")
    r = http.get("/queued-messages", params={"instanceId": "a"})
    assert r.status_code == 200
    assert r.json() == {
        "messages": [
            {"id": m1["id"], "instanceId": "a", "to": "5511999990000", "body": "one"},
            {"id": m2["id"], "instanceId": "a", "to": "+55 (11) 98888-7777", "body": "two"},
        ]
    }
    assert proxy.store.get_message(m1["id"])["status"] == "sending"
    # claimed: not offered again within the lease
    assert http.get("/queued-messages", params={"instanceId": "a"}).json() == {"messages": []}
    clock.now += CLAIM_LEASE_S - 5
    assert http.get("/queued-messages", params={"instanceId": "a"}).json() == {"messages": []}
    # one sent, the other's claim goes stale and is re-offered
    assert http.post("/mark-sent", json={"messageId": m1["id"], "wa_message_id": "W1"}).status_code == 200
    clock.now += 10
    again = http.get("/queued-messages", params={"instanceId": "a"}).json()["messages"]
    assert [m["id"] for m in again] == [m2["id"]]
    assert proxy.store.get_message(m2["id"])["claims"] == 2


def test_ids_are_unique_and_random(proxy: BackgroundProxy, http: httpx.Client) -> None:
    add(proxy, "a")
    ids = {queue(http, "a")["id"] for _ in range(20)}
    assert len(ids) == 20 and all(i.startswith("m-") and len(i) > 10 for i in ids)


def test_queued_messages_errors(proxy: BackgroundProxy, http: httpx.Client) -> None:
    assert http.get("/queued-messages", params={"instanceId": "ghost"}).status_code == 404
    assert http.get("/queued-messages", params={"instanceId": "bad id!"}).status_code == 400
    assert http.get("/queued-messages", params={"instanceId": ""}).status_code == 400
    assert http.get("/queued-messages", params={"limit": "x"}).status_code == 400
    assert http.get("/queued-messages", params={"limit": "0"}).status_code == 400


def test_limit(proxy: BackgroundProxy, http: httpx.Client) -> None:
    add(proxy, "a")
    for i in range(5):
        queue(http, "a", body=f"m{i}")
    first = http.get("/queued-messages", params={"instanceId": "a", "limit": "2"}).json()["messages"]
    rest = http.get("/queued-messages", params={"instanceId": "a"}).json()["messages"]
    assert [m["body"] for m in first] == ["m0", "m1"]
    assert [m["body"] for m in rest] == ["m2", "m3", "m4"]


def test_batch_mode(proxy: BackgroundProxy, http: httpx.Client) -> None:
    add(proxy, "a")
    add(proxy, "b")
    add(proxy, "offline")
    status(http, "a", "CONNECTED")
    status(http, "b", "CONNECTED")
    ma = queue(http, "a", body="for a")
    mb = queue(http, "b", body="for b")
    mo = queue(http, "offline", body="waits")
    r = http.get("/queued-messages")
    assert r.status_code == 200
    msgs = r.json()["messages"]
    assert [(m["id"], m["instanceId"]) for m in msgs] == [(ma["id"], "a"), (mb["id"], "b")]
    assert http.get("/queued-messages").json() == {"messages": []}
    # the offline instance's message waits (unclaimed) until it connects
    assert proxy.store.get_message(mo["id"])["status"] == "queued"
    status(http, "offline", "CONNECTED")
    assert [m["id"] for m in http.get("/queued-messages").json()["messages"]] == [mo["id"]]


# ---------------------------------------------------------------------------- results


def test_mark_sent_idempotent_and_terminal(proxy: BackgroundProxy, http: httpx.Client, events: list) -> None:
    add(proxy, "a")
    m = queue(http, "a")
    http.get("/queued-messages", params={"instanceId": "a"})
    for _ in range(3):
        r = http.post("/mark-sent", json={"messageId": m["id"], "wa_message_id": "3EB0AAA"})
        assert r.status_code == 200 and r.json() == {"ok": True, "status": "sent"}
    stored = proxy.store.get_message(m["id"])
    assert stored["status"] == "sent" and stored["wa_message_id"] == "3EB0AAA"
    # a replay with another wa id keeps the first; a failure report never overrides sent
    http.post("/mark-sent", json={"messageId": m["id"], "wa_message_id": "OTHER"})
    r = http.post("/mark-failed", json={"messageId": m["id"], "error": "delivery_unknown"})
    assert r.status_code == 200 and r.json()["status"] == "sent"
    stored = proxy.store.get_message(m["id"])
    assert stored["status"] == "sent" and stored["wa_message_id"] == "3EB0AAA" and stored["error"] is None
    assert [e.kind for e in events if e.kind in ("sent", "failed")] == ["sent"]
    # never re-offered
    assert http.get("/queued-messages", params={"instanceId": "a"}).json() == {"messages": []}


def test_mark_failed(proxy: BackgroundProxy, http: httpx.Client, clock: FakeClock, events: list) -> None:
    add(proxy, "a")
    m = queue(http, "a", to="123")
    http.get("/queued-messages", params={"instanceId": "a"})
    err = "invalid recipient: phone number must have 5-20 digits, got 3"
    r = http.post("/mark-failed", json={"messageId": m["id"], "error": err})
    assert r.status_code == 200 and r.json() == {"ok": True, "status": "failed"}
    assert http.post("/mark-failed", json={"messageId": m["id"], "error": "again"}).status_code == 200
    stored = proxy.store.get_message(m["id"])
    assert stored["status"] == "failed" and stored["error"] == err
    clock.now += CLAIM_LEASE_S * 2
    assert http.get("/queued-messages", params={"instanceId": "a"}).json() == {"messages": []}
    # the worker's later word that it was sent after all wins
    assert http.post("/mark-sent", json={"messageId": m["id"], "wa_message_id": "W"}).json()["status"] == "sent"
    assert [e.kind for e in events if e.kind in ("sent", "failed")] == ["failed", "sent"]


@pytest.mark.parametrize("path", ["/mark-sent", "/mark-failed"])
def test_mark_errors(proxy: BackgroundProxy, http: httpx.Client, path: str) -> None:
    # an unknown id is answered 200 (found: false): a 404 would switch the worker's /mark-failed off
    r = http.post(path, json={"messageId": "m-nope", "wa_message_id": "x", "error": "e"})
    assert r.status_code == 200 and r.json()["found"] is False
    assert http.post(path, json={"wa_message_id": "x", "error": "e"}).status_code == 400
    assert http.post(path, json={"messageId": 5}).status_code == 400
    assert http.post(path, json={"messageId": ""}).status_code == 400


# ---------------------------------------------------------------------------- inbound


def inbound_body(**over) -> dict:
    body = {
        "instanceId": "a",
        "from": "5511988887777@s.whatsapp.net",
        "to": "5511999990000@s.whatsapp.net",
        "body": "Oi, tudo bem?",
        "wa_message_id": "3A1B2C3D4E5F",
        "chat_id": "5511988887777@s.whatsapp.net",
        "sender_id": "5511988887777@s.whatsapp.net",
        "from_me": False,
        "is_group": False,
        "push_name": "Maria",
        "timestamp": 1763900000,
    }
    body.update(over)
    return body


def test_inbound_unique_and_replay(proxy: BackgroundProxy, http: httpx.Client, events: list) -> None:
    add(proxy, "a")
    add(proxy, "b")
    r = http.post("/inbound", json=inbound_body())
    assert r.status_code == 200 and r.json() == {"ok": True, "duplicate": False}
    r = http.post("/inbound", json=inbound_body(body="changed on replay"))
    assert r.status_code == 200 and r.json() == {"ok": True, "duplicate": True}
    # same wa id on another instance is another message
    assert http.post("/inbound", json=inbound_body(instanceId="b")).json()["duplicate"] is False
    rows = proxy.store.list_inbound("a")
    assert len(rows) == 1 and rows[0]["body"] == "Oi, tudo bem?" and rows[0]["push_name"] == "Maria"
    assert rows[0]["from"] == "5511988887777@s.whatsapp.net" and rows[0]["timestamp"] == 1763900000
    assert len([e for e in events if e.kind == "inbound"]) == 2
    listed = http.get("/dev/messages", params={"instanceId": "a"}).json()
    assert [m["wa_message_id"] for m in listed["inbound"]] == ["3A1B2C3D4E5F"]


def test_inbound_poisoned_text(proxy: BackgroundProxy, http: httpx.Client) -> None:
    """As the Supabase kit: NUL removed and stored; a lone surrogate is a 400, never a 500
    (a 5xx would be retried and hold back the chat); the page's JSON stays valid."""
    add(proxy, "a")
    r = http.post("/inbound", json=inbound_body(wa_message_id="N1", body="a\x00b", push_name="Ma\x00ria"))
    assert r.status_code == 200, r.text
    stored = proxy.store.list_inbound("a")[0]
    assert (stored["body"], stored["push_name"]) == ("ab", "Maria")
    for field in ("body", "push_name", "from"):
        raw = json.dumps(inbound_body(wa_message_id=f"S-{field}")).replace(
            f'"{field}": "', f'"{field}": "\\ud800', 1)
        r = http.post("/inbound", content=raw.encode(), headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and "surrogate" in r.json()["error"], (field, r.status_code, r.text)
    for ts in ("NaN", "Infinity"):
        raw = json.dumps(inbound_body(wa_message_id="T")).replace("1763900000", ts)
        r = http.post("/inbound", content=raw.encode(), headers={"Content-Type": "application/json"})
        assert r.status_code == 400, (ts, r.text)
    assert len(proxy.store.list_inbound("a")) == 1
    json.loads(httpx.get(proxy.url + "/ui/state", trust_env=False).text)  # strict JSON, no NaN/Infinity
    # mark-failed's error is a diagnostic: repaired, not refused
    mid = queue(http, "a")["id"]
    http.get("/queued-messages", params={"instanceId": "a"})
    raw = '{"messageId": "%s", "error": "send failed: \\u0000x\\ud800"}' % mid
    r = http.post("/mark-failed", content=raw.encode(), headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    assert proxy.store.list_outbound("a")[0]["error"] == "send failed: x\ufffd"
    raw = '{"instanceId": "a", "to": "5511999990000", "body": "\\udfff"}'
    r = http.post("/dev/messages", content=raw.encode(), headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "surrogate" in r.json()["error"]


def test_inbound_minimal_fields(proxy: BackgroundProxy, http: httpx.Client) -> None:
    add(proxy, "a")
    body = {"instanceId": "a", "from": "120363@g.us", "body": "x", "wa_message_id": "W2"}
    assert http.post("/inbound", json=body).status_code == 200


@pytest.mark.parametrize(
    "over,code",
    [
        ({"instanceId": "ghost"}, 404),
        ({"instanceId": "bad/id"}, 400),
        ({"wa_message_id": ""}, 400),
        ({"wa_message_id": None}, 400),
        ({"body": ""}, 400),
        ({"from": 5511}, 400),
        ({"from_me": "yes"}, 400),
        ({"timestamp": "today"}, 400),
        ({"timestamp": -1}, 400),
        ({"timestamp": 1e30}, 400),
        ({"timestamp": 253402300800000}, 400),
        ({"push_name": 3}, 400),
    ],
)
def test_inbound_rejects(proxy: BackgroundProxy, http: httpx.Client, over: dict, code: int) -> None:
    add(proxy, "a")
    assert http.post("/inbound", json=inbound_body(**over)).status_code == code


# ---------------------------------------------------------------------------- dev API


def test_pair_phone_in_discovery_and_pair_code_shown(proxy: BackgroundProxy, http: httpx.Client) -> None:
    """Issue #12: an instance added with a phone is listed with ``pair_phone``; the code the
    worker pushes on CONNECTING is shown by the dev API until the status moves on."""
    assert http.post("/dev/instances", json={"id": "p", "pair_phone": "5511988887777"}).status_code == 201
    assert http.post("/dev/instances", json={"id": "q", "pair_phone": "+55 11"}).status_code == 400
    add(proxy, "plain")
    assert http.get("/disconnected-instances").json()["instances"] == [
        {"id": "p", "priority": 0, "pair_phone": "5511988887777"}, {"id": "plain", "priority": 0}]
    qr = "data:image/png;base64,iVBORw0KGgo="
    body = {"instanceId": "p", "status": "CONNECTING", "qr_code": qr, "pair_code": "K3F9-2ZQ1"}
    assert http.post("/update-status", json=body).status_code == 200
    [shown] = [i for i in http.get("/dev/instances").json()["instances"] if i["id"] == "p"]
    assert (shown["pair_code"], shown["pair_phone"]) == ("K3F9-2ZQ1", "5511988887777")
    status(http, "p", "CONNECTED", phone_number="5511988887777")
    assert proxy.store.get_instance("p")["pair_code"] is None


def test_dev_api(proxy: BackgroundProxy, http: httpx.Client, events: list) -> None:
    r = http.post("/dev/instances", json={"id": "acme", "priority": 3})
    assert r.status_code == 201 and r.json()["instance"]["status"] == "DISCONNECTED"
    assert http.post("/dev/instances", json={"id": "acme"}).status_code == 409
    assert http.post("/dev/instances", json={"id": "no spaces"}).status_code == 400
    assert http.post("/dev/instances", json={"id": "x", "priority": "high"}).status_code == 400
    assert http.post("/dev/messages", json={"instanceId": "ghost", "to": "1", "body": "x"}).status_code == 404
    assert http.post("/dev/messages", json={"instanceId": "acme", "to": "", "body": "x"}).status_code == 400
    assert http.post("/dev/messages", json={"instanceId": "acme", "to": "55119", "body": "  "}).status_code == 400
    assert http.get("/dev/messages", params={"instanceId": "ghost"}).status_code == 404
    m = queue(http, "acme", body="hello")
    assert m["status"] == "queued" and m["instanceId"] == "acme"
    listed = http.get("/dev/messages").json()
    assert listed["outbound"][0]["id"] == m["id"] and listed["inbound"] == []
    assert [e.kind for e in events] == ["instance_added", "queued"]


# ---------------------------------------------------------------------------- wake forwarding


class _WakeRecorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict, str | None]] = []
        self.got = threading.Event()
        rec = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                rec.calls.append((self.path, json.loads(raw or b"{}"), self.headers.get("Authorization")))
                self.send_response(202)
                self.send_header("Content-Length", "0")
                self.end_headers()
                rec.got.set()

            def log_message(self, *a: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "_WakeRecorder":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_queueing_wakes_the_worker(tmp_path: Path) -> None:
    store = DevStore(tmp_path / "p.db")
    store.add_instance("acme")
    with _WakeRecorder() as worker, BackgroundProxy(store, SECRET, wake_url=worker.url) as bp:
        r = httpx.post(bp.url + "/dev/messages", headers=AUTH, json={"instanceId": "acme", "to": "5511999990000",
                                                                      "body": "now"}, trust_env=False)
        assert r.status_code == 201
        assert worker.got.wait(5)
        assert worker.calls == [("/wake", {"instanceId": "acme"}, f"Bearer {SECRET}")]
        # from the page too
        worker.got.clear()
        r = httpx.post(bp.url + "/ui/queue", headers={"X-WA-Dev": "1"},
                       json={"instanceId": "acme", "to": "5511999990000", "body": "page"}, trust_env=False)
        assert r.status_code == 201
        assert worker.got.wait(5)
        assert len(worker.calls) == 2
    store.close()


def test_wake_errors_are_ignored(tmp_path: Path) -> None:
    store = DevStore(tmp_path / "p.db")
    store.add_instance("acme")
    with _WakeRecorder() as dead:
        url = dead.url
    # nothing listens there any more
    with BackgroundProxy(store, SECRET, wake_url=url) as bp:
        for _ in range(3):
            r = httpx.post(bp.url + "/dev/messages", headers=AUTH,
                           json={"instanceId": "acme", "to": "5511999990000", "body": "x"}, trust_env=False)
            assert r.status_code == 201
        time.sleep(0.3)
        assert httpx.get(bp.url + "/dev/messages", headers=AUTH, trust_env=False).status_code == 200
    store.close()


# ---------------------------------------------------------------------------- page access


def test_page_needs_no_bearer_but_a_local_host(proxy: BackgroundProxy) -> None:
    add(proxy, "acme")
    r = httpx.get(proxy.url + "/", trust_env=False)  # the static shell; app.js renders /ui/state into it
    assert r.status_code == 200 and '<script src="/static/app.js"' in r.text and SECRET not in r.text
    assert "default-src 'none'" in r.headers["Content-Security-Policy"]
    r = httpx.get(proxy.url + "/ui/state", trust_env=False)
    assert r.json()["instances"][0]["id"] == "acme" and SECRET not in r.text
    assert httpx.get(proxy.url + "/static/app.js", trust_env=False).status_code == 200
    # DNS rebinding: a foreign Host name is refused
    r = httpx.get(proxy.url + "/ui/state", headers={"Host": "evil.example:8787"}, trust_env=False)
    assert r.status_code == 403
    r = httpx.get(proxy.url + "/", headers={"Host": "localhost:1234"}, trust_env=False)
    assert r.status_code == 200


def test_page_writes_need_csrf_header_and_same_origin(proxy: BackgroundProxy) -> None:
    add(proxy, "acme")
    body = {"instanceId": "acme", "to": "5511999990000", "body": "x"}
    u = proxy.url + "/ui/queue"
    # a plain cross-site form post
    r = httpx.post(u, data={"instanceId": "acme", "to": "1", "body": "x"}, trust_env=False)
    assert r.status_code == 403
    assert httpx.post(u, json=body, trust_env=False).status_code == 403
    assert httpx.post(u, json=body, headers={"X-WA-Dev": "1", "Origin": "http://evil.example"},
                      trust_env=False).status_code == 403
    assert httpx.post(u, json=body, headers={"X-WA-Dev": "1", "Sec-Fetch-Site": "cross-site"},
                      trust_env=False).status_code == 403
    assert httpx.post(u, content=b"instanceId=acme", headers={"X-WA-Dev": "1", "Content-Type": "text/plain"},
                      trust_env=False).status_code == 415
    assert proxy.store.list_outbound() == []
    r = httpx.post(u, json=body, headers={"X-WA-Dev": "1", "Origin": proxy.url, "Sec-Fetch-Site": "same-origin"},
                   trust_env=False)
    assert r.status_code == 201
    r = httpx.post(proxy.url + "/ui/instances", json={"id": "second"}, headers={"X-WA-Dev": "1"}, trust_env=False)
    assert r.status_code == 201 and proxy.store.has_instance("second")
    r = httpx.post(proxy.url + "/ui/instances", json={"id": "second"}, headers={"X-WA-Dev": "1"}, trust_env=False)
    assert r.status_code == 409


def test_page_refuses_remote_peers() -> None:
    def req(peer: str, host: str = "127.0.0.1:8787"):
        class T:
            def get_extra_info(self, name: str, default: object = None) -> object:
                return (peer, 5555) if name == "peername" else default

        return make_mocked_request("GET", "/ui/state", headers={"Host": host}, transport=T())

    assert check_local(req("127.0.0.1")) is None
    assert check_local(req("127.8.9.10")) is None
    assert check_local(req("::1", "[::1]:8787")) is None
    assert check_local(req("192.168.1.20")).status == 403
    assert check_local(req("10.0.0.1", "localhost:8787")).status == 403
    assert check_local(req("127.0.0.1", "attacker.example")).status == 403


def test_page_qr_only_png_data_urls(proxy: BackgroundProxy, http: httpx.Client) -> None:
    add(proxy, "a")
    http.post("/update-status", json={"instanceId": "a", "status": "CONNECTING", "qr_code": "javascript:alert(1)"})
    state = httpx.get(proxy.url + "/ui/state", trust_env=False).json()
    assert state["instances"][0]["qr_code"] is None
    assert "javascript:" not in httpx.get(proxy.url + "/", trust_env=False).text


def test_page_escapes_html(proxy: BackgroundProxy, http: httpx.Client) -> None:
    """User text never reaches the page as markup: the HTML is a static shell, the data is JSON,
    and app.js renders it as text (in Chromium: test_dev_page_browser::test_dump_dom_after_scripts)."""
    add(proxy, "a")
    queue(http, "a", to="<b>to</b>", body="<script>alert(1)</script>")
    http.post("/inbound", json=inbound_body(body="<img src=x onerror=alert(1)>", push_name="<i>x</i>"))
    page = httpx.get(proxy.url + "/", trust_env=False).text
    assert "alert(1)" not in page and "<b>to</b>" not in page and "<i>x</i>" not in page
    r = httpx.get(proxy.url + "/ui/state", trust_env=False)
    assert r.headers["Content-Type"].startswith("application/json")
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    state = r.json()
    assert state["outbound"][0]["body"] == "<script>alert(1)</script>"
    assert state["inbound"][0]["push_name"] == "<i>x</i>"


# ---------------------------------------------------------------------------- issue #12


def test_message_status_keeps_the_latest_receipt_per_message(proxy: BackgroundProxy, http: httpx.Client,
                                                              events: list) -> None:
    add(proxy, "acme")
    m1, m2 = queue(http, "acme")["id"], queue(http, "acme")["id"]
    http.get("/queued-messages", params={"instanceId": "acme"})
    http.post("/mark-sent", json={"messageId": m1, "wa_message_id": "3EB0AA"})
    http.post("/mark-sent", json={"messageId": m2, "wa_message_id": "3EB0BB"})

    def st(mid: str | None, wa: str, status: str) -> dict:
        return {"instanceId": "acme", "messageId": mid, "wa_message_id": wa, "status": status,
                "timestamp": 1_800_000_100, "recipient": "5511999990000@s.whatsapp.net"}

    r = http.post("/message-status", json={"statuses": [st(m1, "3EB0AA", "read"), st(None, "3EB0BB", "delivered"),
                                                        st(None, "3EB0ZZ", "read")]})
    assert r.status_code == 200 and r.json()["changed"] == 2  # the unknown message is ignored
    r = http.post("/message-status", json={"statuses": [st(m1, "3EB0AA", "delivered")]})  # never backwards
    assert r.json()["changed"] == 0
    msgs = {m["id"]: m for m in http.get("/dev/messages").json()["outbound"]}
    assert msgs[m1]["receipt"] == {"status": "read", "at": 1_800_000_100.0, "by": "5511999990000@s.whatsapp.net"}
    assert msgs[m2]["receipt"]["status"] == "delivered"
    assert [e.kind for e in events].count("receipt") == 2
    for bad in ({"statuses": [st(m1, "3EB0AA", "seen")]}, {"statuses": [st(m1, "", "read")]},
                {"statuses": [st(m1, "3EB0AA", "read")] * 101}, {"statuses": "x"}):
        assert http.post("/message-status", json=bad).status_code == 400


def test_calls_undecryptable_and_bans_are_stored(proxy: BackgroundProxy, http: httpx.Client) -> None:
    add(proxy, "acme")
    base = {"instanceId": "acme", "from": "5511988887777@s.whatsapp.net", "body": "", "timestamp": 1_800_000_000}
    assert http.post("/inbound", json={**base, "wa_message_id": "CALL1", "type": "call", "video": True,
                                       "rejected": True, "caller": base["from"]}).status_code == 200
    assert http.post("/inbound", json={**base, "wa_message_id": "3EB0UN", "type": "undecryptable"}).status_code == 200
    inbound = {m["wa_message_id"]: m for m in http.get("/dev/messages").json()["inbound"]}
    assert inbound["CALL1"]["type"] == "call" and inbound["CALL1"]["call"] == {"video": True, "rejected": True}
    assert inbound["3EB0UN"]["type"] == "undecryptable" and inbound["3EB0UN"]["call"] is None
    r = status(http, "acme", "DISCONNECTED", reason="temporary_ban", ban_code="blocked_by_users",
               ban_expires_at=1_800_003_600)
    assert r.status_code == 200
    inst = next(i for i in http.get("/dev/instances").json()["instances"] if i["id"] == "acme")
    assert (inst["ban_code"], inst["ban_expires_at"]) == ("blocked_by_users", 1_800_003_600.0)
    status(http, "acme", "CONNECTED")
    inst = next(i for i in http.get("/dev/instances").json()["instances"] if i["id"] == "acme")
    assert inst["ban_code"] is None
