"""The edge client against real loopback servers (a scripted one for the contract, hostile
ones for issue #8): headers, both shapes, timeouts, 5xx, malformed JSON, bad ids; undecodable
bodies, endless and dripping bodies, redirects, Retry-After, wrong secret/path, credentials in
the URL."""

from __future__ import annotations

import email.utils
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy, MultiDictProxy

from tests.conftest import make_settings, running_worker, serving, stream_endlessly, wait_until
from wa_worker.config import ConfigError, load_settings, placeholder_warnings
from wa_worker.edge.client import (
    NOT_FOUND_HINT,
    SECRET_HINT,
    EdgeClient,
    EdgeError,
    EndpointMissing,
    InstanceGone,
    Unauthorized,
    decode_json,
    parse_retry_after,
)
from wa_worker.edge.models import Status, StatusUpdate
from wa_worker.logutil import RedactFilter, redact_url, url_secrets

pytestmark = pytest.mark.anyio

PREFIX = "/functions/v1/worker-proxy"
SECRET = "s3cret-value-xyz"


@dataclass
class R:
    """One scripted answer."""

    status: int = 200
    json: Any = None
    body: bytes | None = None
    text: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0

    def build(self) -> web.Response:
        if self.body is not None:
            return web.Response(status=self.status, body=self.body, headers=self.headers)
        if self.text is not None:
            return web.Response(status=self.status, text=self.text, headers=self.headers)
        if self.json is not None:
            return web.Response(status=self.status, body=json.dumps(self.json).encode(),
                                headers={"Content-Type": "application/json", **self.headers})
        return web.Response(status=self.status, headers=self.headers)


@dataclass
class Seen:
    method: str
    path: str
    query: MultiDictProxy[str]
    headers: CIMultiDictProxy[str]
    content: bytes


@dataclass
class Route:
    replies: list[R]
    calls: list[Seen] = field(default_factory=list)

    @property
    def call_count(self) -> int:
        return len(self.calls)

    @property
    def last(self) -> Seen:
        return self.calls[-1]


class Scripted:
    """A loopback proxy answering from a script: per (method, path) a list of answers,
    one per call, the last one repeated; it records every request it gets."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Route] = {}
        self.unrouted: list[Seen] = []
        self.url = ""

    def route(self, method: str, path: str, *replies: R) -> Route:
        r = self.routes[(method, path)] = Route(list(replies) or [R()])
        return r

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        seen = Seen(request.method, request.path, request.query, request.headers, await request.read())
        path = request.path[len(PREFIX):] if request.path.startswith(PREFIX) else request.path
        route = self.routes.get((request.method, path))
        if route is None:
            self.unrouted.append(seen)
            return web.Response(status=418)
        reply = route.replies[min(len(route.calls), len(route.replies) - 1)]
        route.calls.append(seen)
        if reply.delay_s:
            await anyio.sleep(reply.delay_s)
        return reply.build()


@pytest.fixture
async def srv() -> AsyncIterator[Scripted]:
    s = Scripted()
    async with serve(s._handle) as url:
        s.url = url
        yield s


@pytest.fixture
async def edge(srv):
    c = EdgeClient(srv.url + PREFIX + "/", SECRET, timeout_s=0.5)
    yield c
    await c.aclose()


async def test_headers_and_trailing_slash(srv, edge):
    route = srv.route("GET", "/disconnected-instances", R(json=[{"id": "a"}]))
    assert [r.id for r in await edge.disconnected_instances()] == ["a"]
    req = route.last
    assert req.headers["Authorization"] == f"Bearer {SECRET}"
    assert req.path.endswith("/worker-proxy/disconnected-instances")


@pytest.mark.parametrize("payload", [
    [{"id": "a"}, {"id": "b"}],
    {"instances": [{"id": "a", "priority": 1}, {"id": "b", "priority": 5}]},
    ["a", "b"],
    {"data": [{"id": "a"}, {"id": "b"}]},
])
async def test_instances_every_shape(srv, edge, payload):
    srv.route("GET", "/disconnected-instances", R(json=payload))
    assert sorted(r.id for r in await edge.disconnected_instances()) == ["a", "b"]


async def test_bad_instance_ids_rejected_and_counted(srv, edge, caplog):
    srv.route("GET", "/disconnected-instances", R(json={"instances": [
        {"id": "../../etc"}, {"id": ""}, {"id": "a" * 129}, {"id": None}, {"nope": 1}, "x y", {"id": "ok_1"},
        {"id": 42}, {"id": "ok_1"},
    ]}))
    refs = await edge.disconnected_instances()
    assert [r.id for r in refs] == ["ok_1", "42"]
    assert edge.rejected["invalid_instance_id"] == 6
    assert "malformed" in caplog.text


@pytest.mark.parametrize("payload", [
    [{"id": "m1", "to": "+55 11 98888-7777", "body": "a"}],
    {"messages": [{"id": "m1", "to": "5511988887777@s.whatsapp.net", "body": "a"}]},
])
async def test_queued_both_shapes(srv, edge, payload):
    route = srv.route("GET", "/queued-messages", R(json=payload))
    msgs = await edge.queued_messages("inst-1")
    assert route.last.query["instanceId"] == "inst-1"
    assert [(m.id, m.jid, m.problem) for m in msgs] == [("m1", "5511988887777@s.whatsapp.net", None)]


async def test_queued_malformed_records(srv, edge):
    srv.route("GET", "/queued-messages", R(json=[
        {"to": "5511988887777", "body": "no id"},
        "not an object",
        {"id": 7, "to": "5511988887777", "body": "int id ok"},
        {"id": "bad-to", "to": "abc", "body": "x"},
        {"id": "no-body", "to": "5511988887777"},
        {"id": "num-body", "to": "5511988887777", "body": 3},
    ]))
    msgs = {m.id: m for m in await edge.queued_messages("i")}
    assert set(msgs) == {"7", "bad-to", "no-body", "num-body"}
    assert msgs["7"].problem is None
    assert msgs["bad-to"].problem.startswith("invalid recipient")
    assert msgs["no-body"].problem == "empty body"
    assert msgs["num-body"].problem == "body is not text"
    assert edge.rejected["message_without_id"] == 1 and edge.rejected["message_not_object"] == 1


async def test_not_json_and_wrong_type(srv, edge):
    srv.route("GET", "/queued-messages", R(text="<html>oops</html>", headers={"content-type": "text/html"}))
    with pytest.raises(EdgeError, match="not JSON"):
        await edge.queued_messages("i")
    srv.route("GET", "/disconnected-instances", R(json={"instances": "nope"}))
    with pytest.raises(EdgeError, match="not a list"):
        await edge.disconnected_instances()


async def test_5xx_is_transient_4xx_not(srv, edge):
    srv.route("POST", "/inbound", R(503), R(422, text="bad"), R(429))
    with pytest.raises(EdgeError) as e1:
        await edge.inbound({"x": 1})
    assert e1.value.transient and e1.value.status == 503
    with pytest.raises(EdgeError) as e2:
        await edge.inbound({"x": 1})
    assert not e2.value.transient and e2.value.body == "bad"
    with pytest.raises(EdgeError) as e3:
        await edge.inbound({"x": 1})
    assert e3.value.transient


async def test_timeout_and_connection_error(srv, edge):
    srv.route("GET", "/disconnected-instances", R(json=[], delay_s=2))
    with pytest.raises(EdgeError, match="timed out") as e:
        await edge.disconnected_instances()
    assert e.value.transient
    refused = EdgeClient(f"http://127.0.0.1:{closed_port()}", SECRET, timeout_s=0.5)
    with pytest.raises(EdgeError, match="connection failed"):
        await refused.queued_messages("i")
    await refused.aclose()
    assert edge.failures["disconnected-instances"] == 1


async def test_real_timeout_on_a_silent_server():
    """A real socket that accepts and never answers: the client gives up at its timeout."""
    import anyio

    async def handler(stream):
        await anyio.sleep(5)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handler)
        c = EdgeClient(f"http://127.0.0.1:{port}", SECRET, timeout_s=0.3)
        with anyio.fail_after(3):
            with pytest.raises(EdgeError, match="timed out"):
                await c.disconnected_instances()
        await c.aclose()
        tg.cancel_scope.cancel()


async def test_instance_gone_and_unauthorized(srv, edge, caplog):
    srv.route("POST", "/update-status", R(404), R(410), R(401))
    upd = StatusUpdate(instanceId="i", status=Status.CONNECTED, qr_code=None)
    with pytest.raises(InstanceGone):
        await edge.update_status(upd)
    with pytest.raises(InstanceGone):
        await edge.update_status(upd)
    with pytest.raises(Unauthorized):
        await edge.update_status(upd)
    assert SECRET not in caplog.text


async def test_strict_writer_payloads(srv, edge):
    st = srv.route("POST", "/update-status", R(json={}))
    await edge.update_status(StatusUpdate(instanceId="i", status=Status.CONNECTING, qr_code="data:image/png;base64,AA"))
    await edge.update_status(StatusUpdate(instanceId="i", status=Status.DISCONNECTED, qr_code=None, reason="network"))
    bodies = [json.loads(c.content) for c in st.calls]
    assert bodies[0] == {"instanceId": "i", "status": "CONNECTING", "qr_code": "data:image/png;base64,AA"}
    assert bodies[1] == {"instanceId": "i", "status": "DISCONNECTED", "qr_code": None, "reason": "network"}
    ms = srv.route("POST", "/mark-sent", R(status=204))
    await edge.mark_sent("m1", "WA1")
    assert json.loads(ms.last.content) == {"messageId": "m1", "wa_message_id": "WA1"}
    assert ms.last.headers["content-type"] == "application/json"


async def test_mark_failed_404_disables_it(srv, edge):
    route = srv.route("POST", "/mark-failed", R(status=404))
    assert await edge.mark_failed("m1", "boom") is False
    assert await edge.mark_failed("m2", "boom") is False
    assert route.call_count == 1


async def test_batch_detection(srv, edge):
    srv.route("GET", "/queued-messages",
        R(400), R(200, json=[]),
        R(200, json={"messages": [{"id": "m", "instanceId": "a", "to": "5511988887777", "body": "x"},
                                               {"id": "n", "to": "5511988887777", "body": "no instance"}]}),
    )
    with pytest.raises(EndpointMissing):
        await edge.queued_messages_batch()
    with pytest.raises(EndpointMissing):  # a bare list is a per-instance proxy ignoring us
        await edge.queued_messages_batch()
    msgs = await edge.queued_messages_batch()
    assert [(m.id, m.instance_id) for m in msgs] == [("m", "a")]
    assert edge.rejected["message_invalid_instance_id"] == 1


# ---------------------------------------------------------------- hostile answers (issue #8)

DEEP = b"[" * 100_000 + b"]" * 100_000
HUGE_INT = b"9" * 5000


@pytest.mark.parametrize("body", [
    b'{"instances":[{"id":"a","priority":Infinity}]}',
    b'{"instances":[{"id":"a","priority":NaN}]}',
    b'[{"id":"a","priority":-Infinity}]',
    HUGE_INT,
    DEEP,
    b'{"instances": ' + DEEP + b"}",
    b'[{"id":"\xff\xfe"}]',
    b"\xff\xfe[\x00]\x00",
])
async def test_undecodable_bodies_are_edge_errors(srv, edge, body):
    """Old code: OverflowError / ValueError / RecursionError escaped and killed the worker."""
    srv.route("GET", "/disconnected-instances", R(body=body))
    srv.route("GET", "/queued-messages", R(body=body))
    for call in (edge.disconnected_instances, lambda: edge.queued_messages("i"), edge.queued_messages_batch):
        with pytest.raises(EdgeError) as e:
            await call()
        assert isinstance(e.value, EdgeError)


async def test_out_of_range_priorities_count_as_zero(srv, edge, caplog):
    """Valid JSON, unusable priority: the record stays, the priority becomes 0, logged and counted."""
    srv.route("GET", "/disconnected-instances", R(body=(
        b'{"instances":[{"id":"a","priority":1e999},{"id":"b","priority":1.5},{"id":"c","priority":true},'
        b'{"id":"d","priority":' + HUGE_INT + b'},{"id":"e","priority":"7"},{"id":"f","priority":-1e400},'
        b'{"id":"g","priority":[1]},{"id":"h","priority":4.0},{"id":' + HUGE_INT + b"}]}")))
    refs = {r.id: r.priority for r in await edge.disconnected_instances()}
    assert refs == {"a": 0, "b": 0, "c": 0, "d": 0, "e": 7, "f": 0, "g": 0, "h": 4}
    assert edge.rejected["invalid_priority"] == 6 and edge.rejected["invalid_instance_id"] == 1
    assert "invalid_priority" in caplog.text


def test_decode_json_refuses_constants_and_maps_huge_numbers_to_infinity():
    assert decode_json(b"1e999") == float("inf")
    assert decode_json(b"-" + HUGE_INT) == float("-inf")
    assert decode_json(b"[12345678901234567890]") == [12345678901234567890]
    for bad in (b"NaN", b"Infinity", DEEP, b"\xc3\x28"):
        with pytest.raises(ValueError):
            decode_json(bad)


async def test_message_record_traps(srv, edge):
    long_id = "m" * 300
    srv.route("GET", "/queued-messages", R(body=json.dumps([
        {"id": long_id, "to": "5511988887777", "body": "x"},
        {"id": "\ud800", "to": "5511988887777", "body": "lone surrogate id"},
        {"id": "sur-body", "to": "5511988887777", "body": "a\udfffb"},
        {"id": "big-body", "to": "5511988887777", "body": "x" * 70_000},
        {"id": True, "to": "5511988887777", "body": "bool id"},
        {"id": 1e300, "to": "5511988887777", "body": "float id"},
        {"id": "list-to", "to": [[["5511988887777"]]], "body": "x"},
        {"id": "ok", "to": "5511988887777", "body": "fine"},
    ]).encode()))
    msgs = {m.id: m for m in await edge.queued_messages("i")}
    assert set(msgs) == {long_id, "sur-body", "big-body", "list-to", "ok"}
    assert msgs[long_id].problem == "message id longer than 256 characters" and msgs[long_id].jid is None
    assert msgs["sur-body"].problem == "body is not valid Unicode"
    assert msgs["big-body"].problem == "body longer than 65536 characters" and msgs["big-body"].body == ""
    assert msgs["list-to"].problem == "invalid recipient: recipient is not a string" and msgs["list-to"].to == "list"
    assert msgs["ok"].problem is None
    assert edge.rejected["message_id_not_unicode"] == 1 and edge.rejected["message_without_id"] == 2


@pytest.mark.parametrize("reply", [HUGE_INT, DEEP, b"\xff<html>"])
async def test_a_2xx_to_a_write_is_success_whatever_its_body(srv, edge, reply):
    """The status is the answer; old code decoded the reply and crashed (or retried an accepted post)."""
    srv.route("POST", "/inbound", R(body=reply))
    srv.route("POST", "/mark-sent", R(body=reply))
    srv.route("POST", "/update-status", R(body=reply))
    await edge.inbound({"x": 1})
    await edge.mark_sent("m", "W")
    await edge.update_status(StatusUpdate(instanceId="i", status=Status.CONNECTED, qr_code=None))


async def test_lone_surrogates_in_a_request_are_escaped_not_fatal(srv, edge):
    route = srv.route("POST", "/mark-failed", R(json={}))
    assert await edge.mark_failed("m", "send failed: \ud800") is True
    assert json.loads(route.last.content)["error"] == "send failed: \ud800"


# -------------------------------------------------- real loopback servers: streaming, deadline, cap


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def serve(handler: Handler) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    async with serving(app, shutdown_timeout=0.1) as url:
        yield url


def endless(status: int, *, pause_s: float = 0.0, chunk: bytes = b"[" + b" " * 65535, limit_s: float = 10.0) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await stream_endlessly(request, status, pause_s=pause_s, chunk=chunk, limit_s=limit_s)
    return handler


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("status", [200, 500])
async def test_endless_body_is_capped(status):
    """Old code buffered the whole body: 5.4 GB in 27 s. Now: at most the cap, then a transient error."""
    async with serve(endless(status)) as url:
        c = EdgeClient(url, SECRET, timeout_s=5, max_response_bytes=1024 * 1024)
        t0 = time.monotonic()
        with anyio.fail_after(4):
            with pytest.raises(EdgeError) as e:
                await c.disconnected_instances()
        assert time.monotonic() - t0 < 3
        assert e.value.transient
        if status == 200:
            assert "EDGE_MAX_RESPONSE_BYTES" in str(e.value)
        else:
            assert e.value.status == 500 and len(e.value.body or "") <= 300
        await c.aclose()


async def test_declared_oversized_body_is_refused_before_reading():
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=b"[" + b" " * 4096 + b"]", content_type="application/json")
    async with serve(handler) as url:
        c = EdgeClient(url, SECRET, max_response_bytes=1024)
        with pytest.raises(EdgeError, match="EDGE_MAX_RESPONSE_BYTES"):
            await c.disconnected_instances()
        await c.aclose()


async def test_dripping_body_hits_the_total_deadline():
    """One byte every 0.1 s never trips httpx's per-read timeout; the total deadline does."""
    async with serve(endless(200, pause_s=0.1, chunk=b" ")) as url:
        c = EdgeClient(url, SECRET, timeout_s=0.6)
        t0 = time.monotonic()
        with anyio.fail_after(5):
            with pytest.raises(EdgeError, match="timed out"):
                await c.queued_messages("i")
        assert time.monotonic() - t0 < 1.5
        await c.aclose()


async def test_dripping_ack_after_a_2xx_is_still_success():
    async with serve(endless(200, pause_s=0.1, chunk=b" ")) as url:
        c = EdgeClient(url, SECRET, timeout_s=0.6)
        with anyio.fail_after(5):
            await c.mark_sent("m", "W")
        await c.aclose()


async def test_slow_accept_hits_the_deadline():
    """A listening socket nobody accepts from: connect 'succeeds' in the kernel, nothing answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(0)
        c = EdgeClient(f"http://127.0.0.1:{sock.getsockname()[1]}", SECRET, timeout_s=0.5)
        with anyio.fail_after(4):
            with pytest.raises(EdgeError, match="timed out"):
                await c.inbound({"x": 1})
        await c.aclose()


async def test_huge_headers_are_a_connection_error():
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(text="[]", headers={f"X-Junk-{i}": "j" * 8000 for i in range(40)})
    async with serve(handler) as url:
        c = EdgeClient(url, SECRET, timeout_s=2)
        with anyio.fail_after(4):
            with pytest.raises(EdgeError):
                await c.disconnected_instances()
        await c.aclose()


# ------------------------------------------------------------------ redirects, 429, misconfiguration


async def test_redirect_is_transient_not_followed_and_named_redacted(srv, edge, caplog):
    evil = Scripted()
    async with serve(evil._handle) as evil_url:
        elsewhere = evil.route("POST", "/x", R(200, json=[]))
        host = evil_url.removeprefix("http://")
        srv.route("POST", "/inbound", R(302, headers={"Location": f"http://bob:hunter22@{host}/x?token=abc123&v=1"}))
        for _ in range(2):
            with pytest.raises(EdgeError) as e:
                await edge.inbound({"x": 1})
            assert e.value.transient and e.value.status == 302
        assert elsewhere.call_count == 0 and evil.unrouted == []
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and f"http://***@{host}/x?token=***&v=1" in errors[0].getMessage()
    assert "hunter22" not in caplog.text and "abc123" not in caplog.text
    # /ready is public: the reason says what to fix but names no host
    assert edge.config_problem and "redirect" in edge.config_problem and host not in edge.config_problem


async def test_429_and_503_carry_retry_after(srv, edge):
    date = email_date(time.time() + 30)
    srv.route("POST", "/mark-sent",
        R(429, headers={"Retry-After": "7"}),
        R(503, headers={"Retry-After": date}),
        R(429, headers={"Retry-After": "999999"}),
        R(429, headers={"Retry-After": "soon"}),
        R(500, headers={"Retry-After": "7"}),
    )
    got = []
    for _ in range(5):
        with pytest.raises(EdgeError) as e:
            await edge.mark_sent("m", "W")
        assert e.value.transient
        got.append(e.value.retry_after_s)
    assert got[0] == 7 and 25 <= got[1] <= 30 and got[2] == 300 and got[3] is None and got[4] is None


def email_date(ts: float) -> str:
    return email.utils.formatdate(ts, usegmt=True)


def test_parse_retry_after_edges():
    assert parse_retry_after("0") == 0 and parse_retry_after("-5") == 0
    assert parse_retry_after("nan") is None and parse_retry_after("inf") is None
    assert parse_retry_after(email_date(0)) == 0
    assert parse_retry_after(None) is None and parse_retry_after("Mon, 99 Foo 2020") is None


async def test_wrong_secret_is_a_config_problem_logged_once(srv, edge, caplog):
    srv.route("GET", "/disconnected-instances", R(401), R(403), R(200, json=[]))
    for _ in range(2):
        with pytest.raises(Unauthorized):
            await edge.disconnected_instances()
    assert edge.config_problem == SECRET_HINT
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        f"edge proxy misconfigured: {SECRET_HINT} (HTTP 401 on disconnected-instances)"]
    await edge.disconnected_instances()
    assert edge.config_problem is None


async def test_404_on_a_contract_path_is_a_transient_config_problem(srv, edge, caplog):
    srv.route("GET", "/disconnected-instances", R(404))
    srv.route("POST", "/inbound", R(404))
    with pytest.raises(EdgeError) as e:
        await edge.disconnected_instances()
    assert e.value.transient and edge.config_problem == NOT_FOUND_HINT
    with pytest.raises(EdgeError) as e:
        await edge.inbound({"x": 1})
    assert e.value.transient  # old code: permanent, the message was dead-lettered
    assert sum(r.levelno == logging.ERROR for r in caplog.records) == 1


async def test_a_404_on_a_path_that_has_answered_is_about_the_record_not_the_url(srv, edge, caplog):
    """/inbound answered 2xx before: its path exists, so a 404 means the proxy does not
    know this record (a deleted instance), not a wrong EDGE_BASE_URL: /ready stays ready."""
    srv.route("POST", "/inbound", R(200), R(404))
    await edge.inbound({"x": 1})
    with pytest.raises(EdgeError) as e:
        await edge.inbound({"x": 2})
    assert e.value.transient and e.value.status == 404
    assert edge.config_problem is None
    assert not any(r.levelno >= logging.ERROR for r in caplog.records)


async def test_instance_and_optional_404s_are_not_config_problems(srv, edge):
    srv.route("POST", "/update-status", R(404))
    srv.route("GET", "/queued-messages", R(404))
    srv.route("POST", "/mark-failed", R(404))
    with pytest.raises(InstanceGone):
        await edge.update_status(StatusUpdate(instanceId="i", status=Status.CONNECTED, qr_code=None))
    with pytest.raises(InstanceGone):
        await edge.queued_messages("i")
    with pytest.raises(EndpointMissing):
        await edge.queued_messages_batch()
    assert await edge.mark_failed("m", "x") is False
    assert edge.config_problem is None


async def test_ready_reports_the_config_problem(proxy, tmp_path):
    proxy.secret = "not-the-workers-secret"
    async with running_worker(make_settings(tmp_path, proxy.url)) as w:
        await wait_until(lambda: w.edge.config_problem is not None, what="401 seen")
        assert SECRET_HINT in w.not_ready_reasons()
        async with httpx.AsyncClient() as http:
            r = await http.get(f"http://127.0.0.1:{w.port}/ready")
        assert r.status_code == 503 and SECRET_HINT in r.json()["reasons"]


# ------------------------------------------------------------------ redaction, placeholders


@pytest.mark.parametrize(("url", "shown", "hidden"), [
    ("https://user:pa55word@proj.example/fn", "https://***@proj.example/fn", ["pa55word", "user"]),
    ("https://proj.example/fn?apikey=K3Y-v4lue&region=eu", "https://proj.example/fn?apikey=***&region=eu",
     ["K3Y-v4lue"]),
    ("https://proj.example/fn?key=abcd1&Token=abcd2&client_secret=abcd3&x=1",
     "https://proj.example/fn?key=***&Token=***&client_secret=***&x=1", ["abcd1", "abcd2", "abcd3"]),
    ("https://proj.example/functions/v1/worker-proxy", "https://proj.example/functions/v1/worker-proxy", []),
])
def test_redact_url(url, shown, hidden):
    assert redact_url(url) == shown
    secrets = url_secrets(url)
    for h in hidden:
        assert h not in redact_url(url)
        if h != "user":
            assert h in secrets
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "proxy=%s", (url,), None)
    RedactFilter(["irrelevant-secret", *secrets]).filter(record)
    for h in hidden:
        if h != "user":
            assert h not in record.getMessage()


def test_placeholder_values_are_warned_about(tmp_path):
    s = make_settings(tmp_path, "https://your-project.supabase.co/functions/v1/worker-proxy",
                      WORKER_SECRET="change-me-to-a-long-random-secret")
    warnings = placeholder_warnings(s)
    assert len(warnings) == 2 and "WORKER_SECRET" in warnings[0] and "EDGE_BASE_URL" in warnings[1]
    assert placeholder_warnings(make_settings(tmp_path, "https://abc.supabase.co/x")) == []



@pytest.mark.parametrize("body", [b"1e999", b'"ok"', b"42", b"true"])
async def test_batch_garbage_is_transient_not_unsupported(srv, edge, body):
    """Old code took any non-object for "batch unsupported" and stopped batch polling for good."""
    srv.route("GET", "/queued-messages", R(body=body))
    with pytest.raises(EdgeError) as e:
        await edge.queued_messages_batch()
    assert not isinstance(e.value, EndpointMissing) and e.value.transient


async def test_credentials_in_the_base_url_never_replace_the_bearer(srv, caplog):
    """Old code: user:pw@ became Basic auth (the bearer was never sent) and ?apikey= mangled every path."""
    host = srv.url.removeprefix("http://")
    c = EdgeClient(f"http://bob:pw-xyz@{host}/fn/v1/worker-proxy/?apikey=K3Y", SECRET)
    route = srv.route("GET", "/fn/v1/worker-proxy/queued-messages", R(json=[]))
    await c.queued_messages("inst-1")
    req = route.last
    assert req.headers.getall("Authorization") == [f"Bearer {SECRET}"]
    assert dict(req.query) == {"apikey": "K3Y", "instanceId": "inst-1"}
    assert "pw-xyz" not in c.base_url and "K3Y" not in c.base_url
    assert "user:password@" in caplog.text and "pw-xyz" not in caplog.text
    await c.aclose()


@pytest.mark.parametrize("secret", ["sécret-long-enough", "with space-inside", "line\r\nInjected: x"])
def test_a_secret_that_cannot_travel_in_a_header_is_a_config_error(secret):
    """Old code: accepted, then every proxy call raised UnicodeEncodeError (or a protocol error)."""
    with pytest.raises(ConfigError) as e:
        load_settings(_env_file=None, EDGE_BASE_URL="https://p.example/x", WORKER_SECRET=secret)
    assert "WORKER_SECRET" in str(e.value) and secret not in str(e.value)


async def test_a_2xx_whose_body_breaks_is_still_success_for_a_write_and_an_error_keeps_its_status():
    """The status line is the answer; old code turned the broken body into "connection failed"
    (a needless re-post of an accepted /inbound, and a 422 that lost its status)."""
    async def handler(request: web.Request) -> web.StreamResponse:
        code = 200 if request.path.endswith("/inbound") else 422
        resp = web.StreamResponse(status=code, headers={"Content-Length": "1000"})
        await resp.prepare(request)
        await resp.write(b'{"ok": tr')
        assert request.transport is not None
        request.transport.close()
        return resp
    async with serve(handler) as url:
        c = EdgeClient(url, SECRET, timeout_s=2)
        with anyio.fail_after(4):
            await c.inbound({"x": 1})
            with pytest.raises(EdgeError) as e:
                await c.mark_sent("m", "W")
        assert e.value.status == 422 and not e.value.transient
        await c.aclose()
