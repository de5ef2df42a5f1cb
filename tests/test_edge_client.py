"""The edge client against respx: headers, both shapes, timeouts, 5xx, malformed JSON, bad ids."""

from __future__ import annotations

import json

import httpx
import pytest
import respx

from wa_worker.edge.client import EdgeClient, EdgeError, EndpointMissing, InstanceGone, Unauthorized
from wa_worker.edge.models import Status, StatusUpdate

pytestmark = pytest.mark.anyio

BASE = "https://proj.supabase.co/functions/v1/worker-proxy"
SECRET = "s3cret-value-xyz"


@pytest.fixture
async def edge():
    c = EdgeClient(BASE + "/", SECRET, timeout_s=0.5)
    yield c
    await c.aclose()


@respx.mock
async def test_headers_and_trailing_slash(edge):
    route = respx.get(f"{BASE}/disconnected-instances").respond(json=[{"id": "a"}])
    assert [r.id for r in await edge.disconnected_instances()] == ["a"]
    req = route.calls.last.request
    assert req.headers["Authorization"] == f"Bearer {SECRET}"
    assert req.url.path.endswith("/worker-proxy/disconnected-instances")


@respx.mock
@pytest.mark.parametrize("payload", [
    [{"id": "a"}, {"id": "b"}],
    {"instances": [{"id": "a", "priority": 1}, {"id": "b", "priority": 5}]},
    ["a", "b"],
    {"data": [{"id": "a"}, {"id": "b"}]},
])
async def test_instances_every_shape(edge, payload):
    respx.get(f"{BASE}/disconnected-instances").respond(json=payload)
    assert sorted(r.id for r in await edge.disconnected_instances()) == ["a", "b"]


@respx.mock
async def test_bad_instance_ids_rejected_and_counted(edge, caplog):
    respx.get(f"{BASE}/disconnected-instances").respond(json={"instances": [
        {"id": "../../etc"}, {"id": ""}, {"id": "a" * 129}, {"id": None}, {"nope": 1}, "x y", {"id": "ok_1"},
        {"id": 42}, {"id": "ok_1"},
    ]})
    refs = await edge.disconnected_instances()
    assert [r.id for r in refs] == ["ok_1", "42"]
    assert edge.rejected["invalid_instance_id"] == 6
    assert "malformed" in caplog.text


@respx.mock
@pytest.mark.parametrize("payload", [
    [{"id": "m1", "to": "+55 11 98888-7777", "body": "a"}],
    {"messages": [{"id": "m1", "to": "5511988887777@s.whatsapp.net", "body": "a"}]},
])
async def test_queued_both_shapes(edge, payload):
    route = respx.get(f"{BASE}/queued-messages").respond(json=payload)
    msgs = await edge.queued_messages("inst-1")
    assert route.calls.last.request.url.params["instanceId"] == "inst-1"
    assert [(m.id, m.jid, m.problem) for m in msgs] == [("m1", "5511988887777@s.whatsapp.net", None)]


@respx.mock
async def test_queued_malformed_records(edge):
    respx.get(f"{BASE}/queued-messages").respond(json=[
        {"to": "5511988887777", "body": "no id"},
        "not an object",
        {"id": 7, "to": "5511988887777", "body": "int id ok"},
        {"id": "bad-to", "to": "abc", "body": "x"},
        {"id": "no-body", "to": "5511988887777"},
        {"id": "num-body", "to": "5511988887777", "body": 3},
    ])
    msgs = {m.id: m for m in await edge.queued_messages("i")}
    assert set(msgs) == {"7", "bad-to", "no-body", "num-body"}
    assert msgs["7"].problem is None
    assert msgs["bad-to"].problem.startswith("invalid recipient")
    assert msgs["no-body"].problem == "empty body"
    assert msgs["num-body"].problem == "body is not text"
    assert edge.rejected["message_without_id"] == 1 and edge.rejected["message_not_object"] == 1


@respx.mock
async def test_not_json_and_wrong_type(edge):
    respx.get(f"{BASE}/queued-messages").respond(text="<html>oops</html>", headers={"content-type": "text/html"})
    with pytest.raises(EdgeError, match="not JSON"):
        await edge.queued_messages("i")
    respx.get(f"{BASE}/disconnected-instances").respond(json={"instances": "nope"})
    with pytest.raises(EdgeError, match="not a list"):
        await edge.disconnected_instances()


@respx.mock
async def test_5xx_is_transient_4xx_not(edge):
    respx.post(f"{BASE}/inbound").mock(side_effect=[httpx.Response(503), httpx.Response(422, text="bad"),
                                                    httpx.Response(429)])
    with pytest.raises(EdgeError) as e1:
        await edge.inbound({"x": 1})
    assert e1.value.transient and e1.value.status == 503
    with pytest.raises(EdgeError) as e2:
        await edge.inbound({"x": 1})
    assert not e2.value.transient and e2.value.body == "bad"
    with pytest.raises(EdgeError) as e3:
        await edge.inbound({"x": 1})
    assert e3.value.transient


@respx.mock
async def test_timeout_and_connection_error(edge):
    respx.get(f"{BASE}/disconnected-instances").mock(side_effect=httpx.ReadTimeout("slow"))
    with pytest.raises(EdgeError, match="timed out") as e:
        await edge.disconnected_instances()
    assert e.value.transient
    respx.get(f"{BASE}/queued-messages").mock(side_effect=httpx.ConnectError("refused"))
    with pytest.raises(EdgeError, match="connection failed"):
        await edge.queued_messages("i")
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


@respx.mock
async def test_instance_gone_and_unauthorized(edge, caplog):
    respx.post(f"{BASE}/update-status").mock(side_effect=[httpx.Response(404), httpx.Response(410),
                                                          httpx.Response(401)])
    upd = StatusUpdate(instanceId="i", status=Status.CONNECTED, qr_code=None)
    with pytest.raises(InstanceGone):
        await edge.update_status(upd)
    with pytest.raises(InstanceGone):
        await edge.update_status(upd)
    with pytest.raises(Unauthorized):
        await edge.update_status(upd)
    assert SECRET not in caplog.text


@respx.mock
async def test_strict_writer_payloads(edge):
    st = respx.post(f"{BASE}/update-status").respond(json={})
    await edge.update_status(StatusUpdate(instanceId="i", status=Status.CONNECTING, qr_code="data:image/png;base64,AA"))
    await edge.update_status(StatusUpdate(instanceId="i", status=Status.DISCONNECTED, qr_code=None, reason="network"))
    bodies = [json.loads(c.request.content) for c in st.calls]
    assert bodies[0] == {"instanceId": "i", "status": "CONNECTING", "qr_code": "data:image/png;base64,AA"}
    assert bodies[1] == {"instanceId": "i", "status": "DISCONNECTED", "qr_code": None, "reason": "network"}
    ms = respx.post(f"{BASE}/mark-sent").respond(status_code=204)
    await edge.mark_sent("m1", "WA1")
    assert json.loads(ms.calls.last.request.content) == {"messageId": "m1", "wa_message_id": "WA1"}
    assert ms.calls.last.request.headers["content-type"] == "application/json"


@respx.mock
async def test_mark_failed_404_disables_it(edge):
    route = respx.post(f"{BASE}/mark-failed").respond(status_code=404)
    assert await edge.mark_failed("m1", "boom") is False
    assert await edge.mark_failed("m2", "boom") is False
    assert route.call_count == 1


@respx.mock
async def test_batch_detection(edge):
    respx.get(f"{BASE}/queued-messages").mock(side_effect=[
        httpx.Response(400), httpx.Response(200, json=[]),
        httpx.Response(200, json={"messages": [{"id": "m", "instanceId": "a", "to": "5511988887777", "body": "x"},
                                               {"id": "n", "to": "5511988887777", "body": "no instance"}]}),
    ])
    with pytest.raises(EndpointMissing):
        await edge.queued_messages_batch()
    with pytest.raises(EndpointMissing):  # a bare list is a per-instance proxy ignoring us
        await edge.queued_messages_batch()
    msgs = await edge.queued_messages_batch()
    assert [(m.id, m.instance_id) for m in msgs] == [("m", "a")]
    assert edge.rejected["message_invalid_instance_id"] == 1
