"""The direct API in a fleet (issues #15 and #13; docs/api.md, "Fleets"): a call for an instance
another worker holds is answered ``307`` to that worker's ``API_PUBLIC_URL`` (asked of the
proxy's ``GET /lease-holder``), or ``404 instance_not_here``. Two real in-process workers
against FakeProxy's lease mode (tests/fakeleases.py), over real HTTP."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from openapi_spec_validator import validate

from tests.conftest import FakeClock, connect, make_settings, running_worker, wait_until
from tests.fakeproxy import SECRET, FakeProxy
from tests.proc import free_port
from wa_worker.api.elsewhere import CACHE_S, HolderFinder
from wa_worker.config import ConfigError, load_settings
from wa_worker.daemon import Worker
from wa_worker.edge.client import EdgeClient
from wa_worker.edge.models import LeaseHolder

pytestmark = pytest.mark.anyio

TOKEN = "api-token-0123456789abcdef"
API = {"Authorization": f"Bearer {TOKEN}"}
TO = "5511988887777"


@asynccontextmanager
async def api_worker(tmp_path: Path, proxy: FakeProxy, worker_id: str,
                     public: bool = True) -> AsyncIterator[tuple[Worker, str]]:
    """A worker with the API on a port chosen beforehand, so that API_PUBLIC_URL can name it."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    extra = {"API_PUBLIC_URL": base} if public else {}
    settings = make_settings(tmp_path / worker_id, proxy.url, WORKER_ID=worker_id, API_TOKEN=TOKEN, PORT=port,
                             **extra)
    async with running_worker(settings) as w:
        yield w, base


def error_of(r: httpx.Response) -> dict[str, Any]:
    body = r.json()
    assert set(body) == {"error"}, body
    return dict(body["error"])


async def send(http: httpx.AsyncClient, url: str, key: str, body: dict[str, Any]) -> httpx.Response:
    return await http.post(url, content=json.dumps(body),
                           headers={**API, "Idempotency-Key": key, "Content-Type": "application/json"})


# long: one fleet, every answer a worker gives for an instance held elsewhere
async def test_a_call_for_an_instance_held_elsewhere_is_redirected_to_its_holder(fleet, tmp_path):
    fleet.add_instance("acme")
    async with api_worker(tmp_path, fleet, "w-b") as (b, b_url):
        await connect(b, fleet)
        assert b.manager.leases.held == {"acme": 1}
        # B said where API clients reach it, in its POST /leases body (only the field it has)
        assert fleet.lease_calls[-1]["api_url"] == b_url
        async with api_worker(tmp_path, fleet, "w-a") as (a, a_url), httpx.AsyncClient(timeout=15) as http:
            await wait_until(lambda: a.manager.leases.mode is True, what="A in lease mode")
            assert a.manager.leases.held == {}
            # GET on A → 307 to the same path and query on B; the same request there answers
            r = await http.get(f"{a_url}/api/instances/acme?x=1", headers=API)
            assert r.status_code == 307, r.text
            assert r.headers["Location"] == f"{b_url}/api/instances/acme?x=1"
            err = error_of(r)
            assert err["code"] == "instance_elsewhere" and err["worker_id"] == "w-b"
            assert err["location"] == r.headers["Location"]
            followed = await http.get(r.headers["Location"], headers=API)  # the same token, resent
            assert followed.status_code == 200 and followed.json()["state"] == "connected"
            qr = await http.get(f"{a_url}/api/instances/acme/qr", headers=API)
            assert qr.status_code == 307 and qr.headers["Location"] == f"{b_url}/api/instances/acme/qr"
            # one GET /lease-holder per instance per 2 s, however many calls
            assert fleet.calls["lease-holder"] == 1
            # the door first: without the token, a 401 and no word of where the instance lives
            r = await http.get(f"{a_url}/api/instances/acme")
            assert r.status_code == 401 and "Location" not in r.headers
            assert set(fleet.worker_ids["lease-holder"]) == {"w-a"}

            # POST on A → 307 before anything is read or recorded; following it sends exactly once, on B
            body = {"to": TO, "body": "via the fleet"}
            r = await send(http, f"{a_url}/api/instances/acme/messages", "k-1", body)
            assert r.status_code == 307 and error_of(r)["code"] == "instance_elsewhere"
            assert r.headers["Location"] == f"{b_url}/api/instances/acme/messages"
            assert a.journal.outbound_get("api:acme:k-1") is None
            done = await send(http, r.headers["Location"], "k-1", body)
            assert done.status_code == 200 and done.json()["state"] == "sent", done.text
            again = await send(http, r.headers["Location"], "k-1", body)  # a client's retry: replayed
            assert again.headers.get("Idempotent-Replayed") == "true"
            assert [m["body"] for m in b.backend.sent("acme")] == ["via the fleet"]
            assert a.backend.sent("acme") == []
            # the outcome, asked on A (which never saw it), is found at B
            r = await http.get(f"{a_url}/api/instances/acme/messages/k-1", headers=API)
            assert r.status_code == 307 and r.headers["Location"] == f"{b_url}/api/instances/acme/messages/k-1"
            assert (await http.get(r.headers["Location"], headers=API)).json()["state"] == "sent"

            # nobody holds it → 404, no worker named
            r = await http.get(f"{a_url}/api/instances/nobody", headers=API)
            assert r.status_code == 404 and error_of(r)["code"] == "instance_not_here"
            assert "worker_id" not in error_of(r)
            # a stale proxy naming A itself (even with an address) → 404, never a redirect loop
            fleet.holder_answers["stale"] = {"instanceId": "stale", "worker_id": "w-a", "api_url": b_url}
            fleet.holder_answers["loop"] = {"instanceId": "loop", "worker_id": "w-z", "api_url": a_url + "/"}
            for iid in ("stale", "loop"):
                r = await http.get(f"{a_url}/api/instances/{iid}", headers=API)
                assert r.status_code == 404 and error_of(r)["code"] == "instance_not_here", iid
            # a holder that gave no address (or an unusable one) → 404 naming it
            fleet.holder_answers["quiet"] = {"instanceId": "quiet", "worker_id": "w-q"}
            fleet.holder_answers["creds"] = {"instanceId": "creds", "worker_id": "w-c",
                                             "api_url": "http://user:pw@10.0.0.9:3000"}
            for iid, holder in (("quiet", "w-q"), ("creds", "w-c")):
                r = await http.get(f"{a_url}/api/instances/{iid}", headers=API)
                assert r.status_code == 404 and error_of(r) | {"message": ""} == {
                    "code": "instance_not_here", "message": "", "worker_id": holder}, r.text
            # an answer about another instance is not believed
            fleet.holder_answers["odd"] = {"instanceId": "acme", "worker_id": "w-b", "api_url": b_url}
            r = await http.get(f"{a_url}/api/instances/odd", headers=API)
            assert r.status_code == 404 and "worker_id" not in error_of(r)

            # the OpenAPI document says 307 with Location on the instance-scoped operations
            doc = (await http.get(f"{a_url}/api/openapi.json", headers=API)).json()
            validate(doc)
            for path, method in (("/api/instances/{id}", "get"), ("/api/instances/{id}/qr", "get"),
                                 ("/api/instances/{id}/messages", "post"),
                                 ("/api/instances/{id}/messages/{key}", "get")):
                assert "Location" in doc["paths"][path][method]["responses"]["307"]["headers"], path


async def test_the_holder_is_asked_once_per_two_seconds_and_a_proxy_failure_is_a_404(fleet, tmp_path):
    fleet.add_instance("acme")
    async with api_worker(tmp_path, fleet, "w-b") as (b, b_url):
        await connect(b, fleet)
        async with api_worker(tmp_path, fleet, "w-a") as (a, a_url), httpx.AsyncClient(timeout=15) as http:
            await wait_until(lambda: a.manager.leases.mode is True, what="A in lease mode")
            fleet.fail["lease-holder"] = 1
            r = await http.get(f"{a_url}/api/instances/acme", headers=API)
            assert r.status_code == 404 and error_of(r)["code"] == "instance_not_here"
            r = await http.get(f"{a_url}/api/instances/acme", headers=API)  # remembered for 2 s
            assert r.status_code == 404 and fleet.calls["lease-holder"] == 1
            await anyio.sleep(2.1)
            r = await http.get(f"{a_url}/api/instances/acme", headers=API)
            assert r.status_code == 307 and fleet.calls["lease-holder"] == 2


async def test_without_an_api_public_url_the_holder_is_named_and_nothing_is_sent_to_the_proxy(fleet, tmp_path):
    fleet.add_instance("acme")
    async with api_worker(tmp_path, fleet, "w-b", public=False) as (b, _b_url):
        await connect(b, fleet)
        assert all("api_url" not in c for c in fleet.lease_calls)
        async with api_worker(tmp_path, fleet, "w-a") as (a, a_url), httpx.AsyncClient(timeout=15) as http:
            await wait_until(lambda: a.manager.leases.mode is True, what="A in lease mode")
            r = await http.get(f"{a_url}/api/instances/acme", headers=API)
            assert r.status_code == 404 and error_of(r)["worker_id"] == "w-b"


async def test_without_leases_a_call_elsewhere_is_a_404_and_the_proxy_is_not_asked(tmp_path):
    plain = FakeProxy()
    await plain.start()
    try:
        async with api_worker(tmp_path, plain, "w-a") as (a, a_url), httpx.AsyncClient(timeout=15) as http:
            await wait_until(lambda: a.manager.leases.mode is False, what="single-worker mode")
            r = await http.get(f"{a_url}/api/instances/elsewhere", headers=API)
            assert r.status_code == 404 and error_of(r)["code"] == "instance_not_here"
            assert plain.calls["lease-holder"] == 0
            assert all("api_url" not in c for c in plain.lease_calls)
    finally:
        await plain.stop()


async def test_edge_client_lease_holder_reads_tolerantly(fleet):
    edge = EdgeClient(fleet.url, SECRET, timeout_s=2)
    try:
        assert await edge.lease_holder("acme") is None  # 404 no holder
        fleet.holder_answers["acme"] = {"instanceId": "acme", "worker_id": "w-b", "api_url": "https://b.example/",
                                        "extra": 1}
        holder = await edge.lease_holder("acme")
        assert holder is not None and (holder.worker_id, holder.api_url) == ("w-b", "https://b.example")
        for bad in ("ftp://b.example", "http://u:p@b.example", "https://b.example/?q=1", 7):
            fleet.holder_answers["acme"]["api_url"] = bad
            holder = await edge.lease_holder("acme")
            assert holder is not None and holder.api_url is None, bad
        fleet.holder_answers["acme"] = {"instanceId": "acme", "worker_id": "bad id!"}
        assert await edge.lease_holder("acme") is None
        fleet.holder_answers["acme"] = ["not", "an", "object"]
        assert await edge.lease_holder("acme") is None
        assert edge.rejected["holder_invalid_api_url"] == 4
    finally:
        await edge.aclose()
    plain = FakeProxy()
    await plain.start()
    try:
        edge = EdgeClient(plain.url, SECRET, timeout_s=2)
        assert await edge.lease_holder("acme") is None  # a proxy without the route
        await edge.aclose()
    finally:
        await plain.stop()


def test_api_public_url_is_validated(tmp_path):
    base = dict(EDGE_BASE_URL="http://127.0.0.1:1", WORKER_SECRET=SECRET, STATE_DB=tmp_path / "s.db")
    assert load_settings(**base, API_PUBLIC_URL="https://w1.example:3000/").API_PUBLIC_URL == "https://w1.example:3000"
    assert load_settings(**base, API_PUBLIC_URL=" ").API_PUBLIC_URL is None
    for bad in ("ftp://w1", "w1.example", "http://u:p@w1", "http://w1/?a=1", "http://w1/#x", "http://"):
        with pytest.raises(ConfigError, match="API_PUBLIC_URL"):
            load_settings(**base, API_PUBLIC_URL=bad)


async def test_an_api_public_url_without_an_api_is_not_sent(fleet, tmp_path):
    fleet.add_instance("acme")
    settings = make_settings(tmp_path, fleet.url, WORKER_ID="w-a", API_PUBLIC_URL="http://10.0.0.5:3000")
    async with running_worker(settings) as w:
        await connect(w, fleet)
        assert fleet.lease_calls and all("api_url" not in c for c in fleet.lease_calls)


async def test_holder_finder_shares_one_lookup_remembers_it_and_stays_bounded():
    clock = FakeClock()
    asked: list[str] = []
    gate = anyio.Event()
    on = [True]

    async def lookup(iid: str) -> LeaseHolder | None:
        asked.append(iid)
        await gate.wait()
        return LeaseHolder(iid, "w-b", "http://b:3000")

    finder = HolderFinder(lookup, leases_on=lambda: on[0], worker_id="w-a", api_url="http://a:3000", clock=clock,
                          cache_max=3)
    found: list[Any] = []

    async def ask(iid: str) -> None:
        found.append(await finder.find(iid))

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(ask, "acme")
        await wait_until(lambda: asked, what="the lookup")
        await anyio.sleep(0.05)
        gate.set()
    assert asked == ["acme"] and len(found) == 10 and {h.worker_id for h in found} == {"w-b"}
    assert (await finder.find("acme")).api_url == "http://b:3000" and asked == ["acme"]  # remembered
    clock.now += CACHE_S
    await finder.find("acme")
    assert asked == ["acme", "acme"]  # asked again after 2 s
    # a cancelled lookup is forgotten: the next asker asks again
    gate2 = anyio.Event()

    async def slow(iid: str) -> LeaseHolder | None:
        asked.append(iid)
        await gate2.wait()
        return None

    finder.lookup = slow
    with anyio.move_on_after(0.05):
        await finder.find("beta")
    gate2.set()
    assert await finder.find("beta") is None and asked.count("beta") == 2
    # bounded: at most cache_max answers kept
    finder.lookup = lookup
    for i in range(10):
        await finder.find(f"i{i}")
    assert len(finder._cache) <= 3
    # never a redirect to itself, by id or by address; without leases nobody is asked
    assert finder.redirect(LeaseHolder("x", "w-a", "http://b:3000")) is None
    assert finder.redirect(LeaseHolder("x", "w-z", "http://a:3000")) is None
    assert finder.redirect(LeaseHolder("x", "w-b", None)) is None
    assert finder.redirect(LeaseHolder("x", "w-b", "http://b:3000")) == "http://b:3000"
    on[0] = False
    before = len(asked)
    assert await finder.find("gamma") is None and len(asked) == before
