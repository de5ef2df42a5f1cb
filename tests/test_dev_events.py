"""The reference proxy's ``GET /events`` long poll (issue #13), over real HTTP (loopback)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import AUTH, FakeClock
from tests.fakeproxy import SECRET
from wa_worker.dev.background import BackgroundProxy
from wa_worker.dev.fleet import _wait
from wa_worker.dev.store import DevStore


@pytest.fixture
def store(tmp_path: Path) -> Iterator[DevStore]:
    s = DevStore(tmp_path / "proxy.db", clock=FakeClock(1_800_000_000.0))
    yield s
    s.close()


@pytest.fixture
def bp(store: DevStore) -> Iterator[BackgroundProxy]:
    with BackgroundProxy(store, SECRET, lease_ttl_s=30) as proxy:
        yield proxy


@pytest.fixture
def http(bp: BackgroundProxy) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=bp.url, headers=AUTH, timeout=40, trust_env=False) as client:
        yield client


def add(http: httpx.Client, iid: str) -> None:
    assert http.post("/dev/instances", json={"id": iid}).status_code == 201


def queue(http: httpx.Client, iid: str) -> None:
    r = http.post("/dev/messages", json={"instanceId": iid, "to": "5511999990000", "body": "hi"})
    assert r.status_code == 201, r.text


def lease(http: httpx.Client, worker: str, **body: Any) -> dict:
    r = http.post("/leases", headers={"X-Worker-Id": worker}, json={"worker_id": worker, **body})
    assert r.status_code == 200, r.text
    return r.json()


def poll(http: httpx.Client, worker: str | None, wait: float, cursor: str | None = None) -> tuple[dict, float]:
    """One ``GET /events``: (answer, seconds it took)."""
    params: dict[str, Any] = {"wait": wait}
    if cursor is not None:
        params["cursor"] = cursor
    headers = {"X-Worker-Id": worker} if worker else {}
    start = time.monotonic()
    r = http.get("/events", params=params, headers=headers)
    assert r.status_code == 200, r.text
    return r.json(), time.monotonic() - start


class Poll(threading.Thread):
    """A long poll on its own thread, so the test can act while it waits."""

    def __init__(self, bp: BackgroundProxy, worker: str | None, wait: float, cursor: str | None) -> None:
        super().__init__(daemon=True)
        self.args_ = (worker, wait, cursor)
        self.url = bp.url
        self.result: tuple[dict, float] | None = None

    def run(self) -> None:
        with httpx.Client(base_url=self.url, headers=AUTH, timeout=40, trust_env=False) as client:
            self.result = poll(client, *self.args_)

    def answer(self) -> tuple[dict, float]:
        self.join(30)
        assert self.result is not None
        return self.result


def waiting(bp: BackgroundProxy, n: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while bp.proxy.events.waiters != n:
        assert time.monotonic() < deadline, f"waiters {bp.proxy.events.waiters}, expected {n}"
        time.sleep(0.02)


def cursor_now(http: httpx.Client, worker: str | None) -> str:
    answer, _ = poll(http, worker, 0)
    return str(answer["cursor"])


def test_a_queued_message_ends_the_wait_of_its_lease_holder_at_once(http: httpx.Client, bp: BackgroundProxy) -> None:
    add(http, "acme")
    add(http, "other")
    lease(http, "w-a", capacity=1)
    lease(http, "w-b", capacity=1)
    holder = bp.store.lease_holder("acme")
    stranger = "w-b" if holder == "w-a" else "w-a"
    mine = Poll(bp, holder, 10, cursor_now(http, holder))
    theirs = Poll(bp, stranger, 1.5, cursor_now(http, stranger))
    mine.start()
    theirs.start()
    waiting(bp, 2)
    queue(http, "acme")
    answer, took = mine.answer()
    assert answer["events"] == [{"type": "queued", "instanceId": "acme"}]
    assert took < 3
    answer, took = theirs.answer()  # acme is not its instance: nothing, after the whole wait
    assert answer["events"] == [] and took >= 1.4


def test_an_event_between_two_polls_is_not_missed(http: httpx.Client) -> None:
    add(http, "acme")
    lease(http, "w-a")
    cursor = cursor_now(http, "w-a")
    queue(http, "acme")
    answer, took = poll(http, "w-a", 10, cursor)
    assert answer["events"] == [{"type": "queued", "instanceId": "acme"}] and took < 2
    answer, took = poll(http, "w-a", 0.5, answer["cursor"])  # consumed: not again
    assert answer["events"] == []


def test_without_a_worker_id_every_instance_is_watched(http: httpx.Client) -> None:
    add(http, "acme")
    add(http, "beta")
    lease(http, "w-a", capacity=1)  # leases in use by someone: a single worker still sees everything
    cursor = cursor_now(http, None)
    queue(http, "acme")
    queue(http, "beta")
    queue(http, "beta")
    answer, _ = poll(http, None, 5, cursor)
    assert answer["events"] == [{"type": "queued", "instanceId": "acme"}, {"type": "queued", "instanceId": "beta"}]


def test_a_lease_change_wakes_the_worker_it_concerns(http: httpx.Client, bp: BackgroundProxy) -> None:
    for n in range(6):
        add(http, f"i{n}")
    held = {}
    for _ in range(2):
        held = {i["instanceId"]: i["token"] for i in lease(http, "w-a", held=[
            {"instanceId": k, "token": v} for k, v in held.items()])["leases"]}
    assert len(held) == 6
    a = Poll(bp, "w-a", 10, cursor_now(http, "w-a"))
    a.start()
    waiting(bp, 1)
    assert lease(http, "w-b")["leases"] == []  # nothing free; w-a holds 6 > target 3 + 1
    answer, took = a.answer()
    assert answer["events"] == [{"type": "leases"}] and took < 3
    kept = lease(http, "w-a", held=[{"instanceId": k, "token": v} for k, v in held.items()])["leases"]
    revoked = {k: v for k, v in held.items() if k not in {i["instanceId"] for i in kept}}
    assert len(revoked) == 3
    b = Poll(bp, "w-b", 10, cursor_now(http, "w-b"))
    b.start()
    waiting(bp, 1)
    lease(http, "w-a", held=[{"instanceId": i["instanceId"], "token": i["token"]} for i in kept],
          release=[{"instanceId": k, "token": v} for k, v in revoked.items()])
    answer, took = b.answer()  # released: w-b has room for them
    assert answer["events"] == [{"type": "leases"}] and took < 3
    assert len(lease(http, "w-b")["leases"]) == 3


def test_an_added_instance_wakes_a_live_worker_with_room(http: httpx.Client, bp: BackgroundProxy) -> None:
    lease(http, "w-a")
    a = Poll(bp, "w-a", 10, cursor_now(http, "w-a"))
    a.start()
    waiting(bp, 1)
    add(http, "acme")
    answer, took = a.answer()
    assert answer["events"] == [{"type": "leases"}] and took < 3


def test_with_nothing_to_say_the_poll_answers_after_the_wait(http: httpx.Client) -> None:
    answer, took = poll(http, "w-a", 1)
    assert answer["events"] == [] and isinstance(answer["cursor"], str)
    assert 0.9 <= took < 3
    assert _wait("1000") == 25  # the longest wait: 25 s
    assert _wait(None) == 25


def test_a_client_that_goes_away_frees_its_waiter(bp: BackgroundProxy) -> None:
    with socket.create_connection((bp.host, bp.port), timeout=5) as sock:
        sock.sendall(f"GET /events?wait=25 HTTP/1.1\r\nHost: {bp.host}\r\nAuthorization: Bearer {SECRET}\r\n"
                     "X-Worker-Id: w-a\r\n\r\n".encode())
        waiting(bp, 1)
    start = time.monotonic()
    waiting(bp, 0, timeout=5)
    assert time.monotonic() - start < 3


def test_too_many_waiters_get_a_503_with_retry_after(http: httpx.Client, bp: BackgroundProxy) -> None:
    bp.proxy.events.max_waiters = 1
    first = Poll(bp, "w-a", 2, None)
    first.start()
    waiting(bp, 1)
    r = http.get("/events", params={"wait": 2}, headers={"X-Worker-Id": "w-b"})
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"
    first.answer()


def test_a_cursor_from_another_proxy_run_resyncs_at_once(http: httpx.Client) -> None:
    add(http, "acme")
    lease(http, "w-a")
    queue(http, "acme")
    answer, took = poll(http, "w-a", 10, "0badc0de-12")
    assert answer["events"] == [{"type": "leases"}, {"type": "queued", "instanceId": "acme"}] and took < 2


def test_a_long_answer_is_cut_and_the_rest_comes_next(http: httpx.Client, bp: BackgroundProxy) -> None:
    bp.proxy.events.max_events = 3
    for n in range(5):
        add(http, f"i{n}")
    cursor = cursor_now(http, None)
    for n in range(5):
        queue(http, f"i{n}")
    first, _ = poll(http, None, 5, cursor)
    second, took = poll(http, None, 5, first["cursor"])
    assert [e["instanceId"] for e in first["events"] + second["events"]] == [f"i{n}" for n in range(5)]
    assert len(first["events"]) == 3 and took < 2


@pytest.mark.parametrize("params,headers,why", [
    ({"wait": "soon"}, {}, "wait"),
    ({"wait": "-1"}, {}, "wait"),
    ({"wait": "nan"}, {}, "wait"),
    ({"cursor": "nope"}, {}, "cursor"),
    ({}, {"X-Worker-Id": "no spaces"}, "X-Worker-Id"),
])
def test_bad_event_parameters_are_a_400(http: httpx.Client, params: dict, headers: dict, why: str) -> None:
    r = http.get("/events", params=params, headers=headers)
    assert r.status_code == 400 and why in r.json()["error"]


def test_a_plain_renewal_wakes_nobody(http: httpx.Client, bp: BackgroundProxy) -> None:
    for n in range(20):
        add(http, f"i{n}")
    lease(http, "w-a")
    lease(http, "w-b")
    b = Poll(bp, "w-b", 1, cursor_now(http, "w-b"))
    b.start()
    waiting(bp, 1)
    held = lease(http, "w-a")["leases"]  # more grants for w-a, no release, no new worker
    assert len(held) == 10
    answer, _ = b.answer()
    assert answer["events"] == []


def test_a_waiting_poll_does_not_hold_up_the_proxy_s_stop(tmp_path: Path) -> None:
    store = DevStore(tmp_path / "p.db")
    try:
        bp = BackgroundProxy(store, SECRET).start()
        pending = Poll(bp, "w-a", 25, None)
        pending.start()
        waiting(bp, 1)
        start = time.monotonic()
        bp.stop(timeout=30)
        assert time.monotonic() - start < 5
        answer, took = pending.answer()
        assert answer["events"] == [] and took < 6
    finally:
        store.close()
