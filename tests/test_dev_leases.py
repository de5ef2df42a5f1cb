"""The reference proxy's fleet side (issue #13): POST /leases, fencing with lease_token,
claims that outlive their lease, over real HTTP against the real dev proxy (loopback)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import AUTH, FakeClock
from tests.fakeproxy import SECRET
from wa_worker.dev.background import BackgroundProxy
from wa_worker.dev.store import DevStore

TTL = 30.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_800_000_000.0)


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock) -> Iterator[DevStore]:
    s = DevStore(tmp_path / "proxy.db", clock=clock)
    yield s
    s.close()


@pytest.fixture
def bp(store: DevStore) -> Iterator[BackgroundProxy]:
    with BackgroundProxy(store, SECRET, lease_ttl_s=TTL) as proxy:
        yield proxy


@pytest.fixture
def http(bp: BackgroundProxy) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=bp.url, headers=AUTH, timeout=10, trust_env=False) as client:
        yield client


def add(http: httpx.Client, iid: str, priority: int = 0, **extra: Any) -> None:
    r = http.post("/dev/instances", json={"id": iid, "priority": priority, **extra})
    assert r.status_code == 201, r.text


def call(http: httpx.Client, worker: str, held: Any = (), release: Any = (), capacity: int = 500) -> dict:
    """One POST /leases; ``held`` / ``release``: {instanceId: token} or (instanceId, token) pairs."""
    def items(pairs: Any) -> list[dict]:
        pairs = pairs.items() if isinstance(pairs, dict) else pairs
        return [{"instanceId": i, "token": t} for i, t in pairs]

    r = http.post("/leases", headers={"X-Worker-Id": worker},
                  json={"worker_id": worker, "capacity": capacity, "held": items(held), "release": items(release)})
    assert r.status_code == 200, r.text
    return r.json()


def tokens(answer: dict) -> dict[str, int]:
    return {item["instanceId"]: item["token"] for item in answer["leases"]}


class Fleet:
    """Workers that behave as the contract says: hold what they were answered, release what they lost."""

    def __init__(self, http: httpx.Client) -> None:
        self.http = http
        self.held: dict[str, dict[str, int]] = {}
        self.to_release: dict[str, dict[str, int]] = {}

    def call(self, worker: str, capacity: int = 500) -> dict:
        held = self.held.get(worker, {})
        answer = call(self.http, worker, held, self.to_release.pop(worker, {}), capacity)
        now = tokens(answer)
        self.to_release[worker] = {i: t for i, t in held.items() if now.get(i) != t}
        self.held[worker] = now
        return answer

    def counts(self) -> dict[str, int]:
        return {w: len(h) for w, h in self.held.items()}


def holders(store: DevStore) -> dict[str, str | None]:
    return {i["id"]: i["lease_holder"] for i in store.list_instances()}


def race(target: Callable[..., None], args: list[tuple[Any, ...]]) -> None:
    """``target(*a, barrier)`` for each ``a``, each in its thread, released together; joined."""
    barrier = threading.Barrier(len(args))
    threads = [threading.Thread(target=target, args=(*a, barrier)) for a in args]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)


def assert_granted_once(answers: dict[str, dict[str, int]], owned: dict[str, str | None], n: int) -> None:
    """Every one of ``n`` instances granted to exactly one worker, the one the store names."""
    granted = [i for held in answers.values() for i in held]
    assert len(granted) == len(set(granted)) == n
    assert all(owned[i] == w for w, held in answers.items() for i in held)


# ---------------------------------------------------------------------------- grants and renewals


def test_a_grant_carries_the_discovery_fields_and_tokens_never_repeat(http: httpx.Client, clock: FakeClock) -> None:
    add(http, "acme", priority=7, pair_phone="5511999990000")
    r = http.post("/dev/instances/acme/settings", json={"settings": {"call_reject": True},
                                                        "proxy_url": "socks5://u:p@127.0.0.1:1080"})
    assert r.status_code == 200
    first = call(http, "w-a")
    assert first["ttl_s"] == 30
    assert first["leases"] == [{"instanceId": "acme", "token": 1, "priority": 7, "settings": {"call_reject": True},
                                "proxy_url": "socks5://u:p@127.0.0.1:1080", "pair_phone": "5511999990000"}]
    # renewed: the same token, no fields
    assert call(http, "w-a", held={"acme": 1})["leases"] == [{"instanceId": "acme", "token": 1}]
    # released, then granted elsewhere: a new token
    assert call(http, "w-a", release={"acme": 1})["leases"] == []
    assert tokens(call(http, "w-b")) == {"acme": 2}
    assert tokens(call(http, "w-b", release={"acme": 2})) == {}
    assert tokens(call(http, "w-a")) == {"acme": 3}


def test_renewals_keep_the_lease_and_nobody_else_gets_it(http: httpx.Client, clock: FakeClock) -> None:
    add(http, "acme")
    assert tokens(call(http, "w-a")) == {"acme": 1}
    for _ in range(5):  # 100 s of renewals every 20 s: never expires
        clock.now += 20
        assert tokens(call(http, "w-a", held={"acme": 1})) == {"acme": 1}
        assert tokens(call(http, "w-b")) == {}


def test_at_most_five_grants_per_call_highest_priority_first(http: httpx.Client, store: DevStore) -> None:
    for n in range(12):
        add(http, f"i{n:02d}", priority=n % 4)
    fleet = Fleet(http)
    first = fleet.call("w-a")
    assert len(first["leases"]) == 5
    assert [item["priority"] for item in first["leases"]] == [3, 3, 3, 2, 2]
    assert len(fleet.call("w-a")["leases"]) == 10
    assert len(fleet.call("w-a")["leases"]) == 12
    assert set(holders(store).values()) == {"w-a"}


def test_capacity_bounds_what_a_worker_gets_and_the_others_share_the_rest(http: httpx.Client) -> None:
    for n in range(6):
        add(http, f"i{n}")
    fleet = Fleet(http)
    for _ in range(3):
        fleet.call("w-a", capacity=2)
    assert fleet.counts() == {"w-a": 2}
    fleet.call("w-b")
    fleet.call("w-b")
    assert fleet.counts() == {"w-a": 2, "w-b": 4}


# ---------------------------------------------------------------------------- fair share, revocation


def test_fair_share_across_three_workers(http: httpx.Client, store: DevStore) -> None:
    for n in range(15):
        add(http, f"i{n:02d}")
    fleet = Fleet(http)
    for w in ("w-a", "w-b", "w-c"):  # all three live first (capacity 0: nothing granted yet)
        fleet.call(w, capacity=0)
    for _ in range(2):
        for w in ("w-a", "w-b", "w-c"):
            fleet.call(w)
    assert fleet.counts() == {"w-a": 5, "w-b": 5, "w-c": 5}
    owned = holders(store)
    assert all(owned[i] == w for w, held in fleet.held.items() for i in held)


def test_a_new_worker_gets_its_share_gradually_through_revocations(http: httpx.Client, store: DevStore) -> None:
    for n in range(15):
        add(http, f"i{n:02d}", priority=n)
    fleet = Fleet(http)
    for _ in range(3):
        fleet.call("w-a")
    assert fleet.counts() == {"w-a": 15}
    assert tokens(fleet.call("w-b")) == {}  # target 8: nothing is free, nothing is taken from w-a yet
    answer = fleet.call("w-a")  # 15 > target + 1: its 5 lowest-priority leases are left out
    assert len(answer["leases"]) == 10
    assert set(fleet.to_release["w-a"]) == {"i00", "i01", "i02", "i03", "i04"}
    assert tokens(fleet.call("w-b")) == {}  # revoked but not released yet: not granted elsewhere
    fleet.call("w-a")  # releases them
    assert set(tokens(fleet.call("w-b"))) == {"i00", "i01", "i02", "i03", "i04"}
    fleet.call("w-a")  # 10 > 9: two more are left out (down to the target, 8)
    assert fleet.counts()["w-a"] == 8
    fleet.call("w-a")
    fleet.call("w-b")
    assert fleet.counts() == {"w-a": 8, "w-b": 7}
    # never one instance on two workers
    assert not set(fleet.held["w-a"]) & set(fleet.held["w-b"])


def test_a_revoked_lease_is_not_renewed_even_if_still_held(http: httpx.Client, clock: FakeClock) -> None:
    for n in range(4):
        add(http, f"i{n}", priority=n)
    held = tokens(call(http, "w-a"))
    assert len(held) == 4
    assert tokens(call(http, "w-b")) == {}  # target 2: w-a holds 4 > 3
    kept = tokens(call(http, "w-a", held=held))
    assert set(kept) == {"i3", "i2"}
    # a worker that keeps listing them in held: still left out, never renewed
    assert set(tokens(call(http, "w-a", held=held))) == {"i3", "i2"}
    clock.now += TTL + 1  # they expired ...
    assert tokens(call(http, "w-b")) == {}  # ... within the grace
    clock.now += TTL
    call(http, "w-a", held=kept)
    assert tokens(call(http, "w-b")) == {"i1": 2, "i0": 2}  # expired + one TTL: granted, new tokens


# ---------------------------------------------------------------------------- expiry, release


def test_an_expired_lease_is_granted_elsewhere_only_after_a_grace_of_one_ttl(
        http: httpx.Client, clock: FakeClock) -> None:
    add(http, "acme")
    assert tokens(call(http, "w-a")) == {"acme": 1}
    clock.now += TTL + 1  # expired: w-a should have fenced itself at ttl/2
    assert tokens(call(http, "w-b")) == {}
    clock.now += TTL - 2  # still within the grace
    assert tokens(call(http, "w-b")) == {}
    clock.now += 2  # expires_at + ttl < now
    assert tokens(call(http, "w-b")) == {"acme": 2}
    # the old holder's renewal: lost (absent from leases), and its fenced calls are refused
    assert tokens(call(http, "w-a", held={"acme": 1})) == {}
    r = http.post("/update-status", json={"instanceId": "acme", "status": "CONNECTED", "qr_code": None,
                                          "lease_token": 1})
    assert r.status_code == 409 and r.json() == {"error": "lease_lost"}


def test_an_expired_lease_nobody_took_is_renewed_with_its_token(http: httpx.Client, clock: FakeClock) -> None:
    add(http, "acme")
    call(http, "w-a")
    clock.now += TTL * 1.5
    assert tokens(call(http, "w-a", held={"acme": 1})) == {"acme": 1}


def test_a_release_frees_at_once_and_an_old_token_is_ignored(http: httpx.Client) -> None:
    add(http, "acme")
    call(http, "w-a")
    call(http, "w-b", capacity=0)
    assert tokens(call(http, "w-a", held={}, release={"acme": 0})) == {"acme": 1}  # an old token: ignored
    assert tokens(call(http, "w-b")) == {}
    assert tokens(call(http, "w-a", release={"acme": 1})) == {}
    assert tokens(call(http, "w-b")) == {"acme": 2}


def test_a_leaving_worker_is_not_counted_so_the_others_take_over_at_once(http: httpx.Client) -> None:
    for n in range(10):
        add(http, f"i{n}")
    fleet = Fleet(http)
    for w in ("w-a", "w-b"):
        fleet.call(w, capacity=0)
    for w in ("w-a", "w-b"):
        fleet.call(w)
    assert fleet.counts() == {"w-a": 5, "w-b": 5}
    # SIGTERM: the last call releases everything and holds nothing
    assert call(http, "w-a", held={}, release=fleet.held.pop("w-a"))["leases"] == []
    assert len(fleet.call("w-b")["leases"]) == 10  # the target is 10 again, not 5


def test_two_workers_calling_at_once_never_both_get_one_instance(http: httpx.Client, bp: BackgroundProxy,
                                                                 store: DevStore) -> None:
    for n in range(40):
        add(http, f"i{n:02d}")
    workers = [f"w-{n}" for n in range(8)]
    answers: dict[str, dict[str, int]] = {w: {} for w in workers}
    errors: list[BaseException] = []

    def run(worker: str, barrier: threading.Barrier) -> None:
        try:
            with httpx.Client(base_url=bp.url, headers=AUTH, timeout=10, trust_env=False) as client:
                for _ in range(4):
                    barrier.wait(10)
                    answers[worker] = tokens(call(client, worker, held=answers[worker]))
        except (AssertionError, httpx.HTTPError, threading.BrokenBarrierError) as exc:  # the main thread reports it
            errors.append(exc)

    race(run, [(w,) for w in workers])
    assert not errors
    assert_granted_once(answers, holders(store), 40)


@pytest.mark.parametrize("body,why", [
    ({"capacity": 5}, "worker_id"),
    ({"worker_id": "bad id", "capacity": 5}, "worker_id"),
    ({"worker_id": "w-a", "capacity": -1}, "capacity"),
    ({"worker_id": "w-a", "capacity": True}, "capacity"),
    ({"worker_id": "w-a", "held": [{"instanceId": "acme"}]}, "token"),
    ({"worker_id": "w-a", "release": [{"instanceId": "../x", "token": 1}]}, "instanceId"),
    ({"worker_id": "w-a", "held": "acme"}, "held"),
])
def test_a_malformed_leases_call_is_a_400(http: httpx.Client, body: dict, why: str) -> None:
    r = http.post("/leases", json=body)
    assert r.status_code == 400 and why in r.json()["error"]


@pytest.mark.parametrize("method,path", [("POST", "/leases"), ("GET", "/events?wait=0"), ("GET", "/dev/fleet")])
def test_the_fleet_routes_need_the_bearer(bp: BackgroundProxy, method: str, path: str) -> None:
    r = httpx.request(method, bp.url + path, json={"worker_id": "w-a"} if method == "POST" else None,
                      headers={"Authorization": "Bearer wrong-secret-value"}, trust_env=False)
    assert r.status_code == 401
    assert httpx.request(method, bp.url + path, trust_env=False).status_code == 401


# ---------------------------------------------------------------------------- fencing


def connected(http: httpx.Client, iid: str, token: int | None = None) -> httpx.Response:
    body: dict[str, Any] = {"instanceId": iid, "status": "CONNECTED", "qr_code": None}
    if token is not None:
        body["lease_token"] = token
    return http.post("/update-status", json=body)


def queue(http: httpx.Client, iid: str, body: str = "hi") -> str:
    r = http.post("/dev/messages", json={"instanceId": iid, "to": "5511999990000", "body": body})
    assert r.status_code == 201, r.text
    return str(r.json()["message"]["id"])


def move(http: httpx.Client, clock: FakeClock, iid: str, old: str, new: str) -> int:
    """The lease of ``iid`` expires on ``old`` and is granted to ``new``; returns the new token."""
    clock.now += 2 * TTL + 1
    granted = tokens(call(http, new))
    assert iid in granted
    return granted[iid]


def test_status_reports_are_fenced_by_the_lease_token(http: httpx.Client, clock: FakeClock) -> None:
    add(http, "acme")
    call(http, "w-a")
    assert connected(http, "acme", 1).status_code == 200
    assert connected(http, "acme", 0).status_code == 409
    assert connected(http, "acme").status_code == 200  # no lease fields: single-worker mode
    assert move(http, clock, "acme", "w-a", "w-b") == 2
    r = connected(http, "acme", 1)
    assert r.status_code == 409 and r.json() == {"error": "lease_lost"}
    assert connected(http, "acme", 2).status_code == 200
    assert http.post("/update-status", json={"instanceId": "acme", "status": "CONNECTED",
                                             "lease_token": "x"}).status_code == 400


def test_a_stale_claim_is_refused_and_claims_nothing(http: httpx.Client, clock: FakeClock) -> None:
    add(http, "acme")
    call(http, "w-a")
    move(http, clock, "acme", "w-a", "w-b")
    mid = queue(http, "acme")
    r = http.get("/queued-messages", params={"instanceId": "acme", "lease_token": 1})
    assert r.status_code == 409 and r.json() == {"error": "lease_lost"}
    assert [m["status"] for m in http.get("/dev/messages").json()["outbound"]] == ["queued"]
    r = http.get("/queued-messages", params={"instanceId": "acme", "lease_token": 2})
    assert r.status_code == 200
    assert [(m["id"], m["lease_token"]) for m in r.json()["messages"]] == [(mid, 2)]
    assert "prior_claim" not in r.json()["messages"][0]


def test_a_claim_on_a_released_or_revoked_lease_is_refused(http: httpx.Client) -> None:
    add(http, "acme")
    call(http, "w-a")
    queue(http, "acme")
    call(http, "w-a", release={"acme": 1})
    assert http.get("/queued-messages", params={"instanceId": "acme", "lease_token": 1}).status_code == 409


def test_batch_claims_with_a_worker_id_only_return_its_instances(http: httpx.Client) -> None:
    for iid in ("a1", "a2", "b1", "free"):
        add(http, iid)
    r = http.post("/leases", headers={"X-Worker-Id": "w-a"}, json={"worker_id": "w-a", "capacity": 2})
    mine = tokens(r.json())
    assert set(mine) == {"a1", "a2"}
    call(http, "w-b", capacity=1)
    for iid in ("a1", "a2", "b1", "free"):
        assert connected(http, iid).status_code == 200
        queue(http, iid)
    r = http.get("/queued-messages", headers={"X-Worker-Id": "w-a"})
    assert r.status_code == 200
    got = {(m["instanceId"], m["lease_token"]) for m in r.json()["messages"]}
    assert got == {("a1", mine["a1"]), ("a2", mine["a2"])}
    # without X-Worker-Id: single-worker batch mode, as today (every connected instance)
    rest = http.get("/queued-messages").json()["messages"]
    assert {m["instanceId"] for m in rest} == {"b1", "free"}
    assert all("lease_token" not in m for m in rest)


def test_an_ack_with_the_claim_token_is_accepted_after_the_lease_moved(
        http: httpx.Client, clock: FakeClock) -> None:
    add(http, "acme")
    call(http, "w-a")
    connected(http, "acme", 1)
    sent_id, failed_id, other_id = queue(http, "acme", "one"), queue(http, "acme", "two"), queue(http, "acme", "3")
    claimed = http.get("/queued-messages", params={"instanceId": "acme", "lease_token": 1}).json()["messages"]
    assert [m["lease_token"] for m in claimed] == [1, 1, 1]
    move(http, clock, "acme", "w-a", "w-b")
    # the truth about its own send is never refused, even though the lease is w-b's now
    r = http.post("/mark-sent", json={"messageId": sent_id, "wa_message_id": "WA1", "lease_token": 1})
    assert r.status_code == 200 and r.json()["status"] == "sent"
    r = http.post("/mark-failed", json={"messageId": failed_id, "error": "x", "lease_token": 1})
    assert r.status_code == 200 and r.json()["status"] == "failed"
    # a token it was never claimed under: refused
    r = http.post("/mark-sent", json={"messageId": other_id, "wa_message_id": "WA3", "lease_token": 2})
    assert r.status_code == 409 and r.json() == {"error": "lease_lost"}
    r = http.post("/mark-failed", json={"messageId": other_id, "error": "x", "lease_token": 7})
    assert r.status_code == 409
    # no lease fields: as today
    assert http.post("/mark-sent", json={"messageId": other_id, "wa_message_id": "WA3"}).status_code == 200


def test_facts_are_never_refused_for_their_token(http: httpx.Client, clock: FakeClock) -> None:
    add(http, "acme")
    call(http, "w-a")
    move(http, clock, "acme", "w-a", "w-b")
    r = http.post("/inbound", json={"instanceId": "acme", "wa_message_id": "IN1", "from": "5511988887777",
                                    "body": "oi", "lease_token": 1})
    assert r.status_code == 200 and r.json()["duplicate"] is False
    r = http.post("/message-status", json={"statuses": [{"instanceId": "acme", "wa_message_id": "X",
                                                         "status": "read"}], "lease_token": 1})
    assert r.status_code == 200
    r = http.post("/upload-media", params={"instanceId": "acme", "wa_message_id": "IN1", "lease_token": "1"},
                  content=b"\x89PNG\r\n\x1a\n" + b"0" * 64, headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------------------- claims that outlive their lease


def test_a_claim_left_by_a_lost_lease_is_offered_again_with_prior_claim(
        http: httpx.Client, clock: FakeClock) -> None:
    add(http, "acme")
    call(http, "w-a")
    connected(http, "acme", 1)
    mid = queue(http, "acme")
    assert [m["id"] for m in http.get("/queued-messages", params={"instanceId": "acme", "lease_token": 1})
            .json()["messages"]] == [mid]
    # the same holder asks again: not offered twice
    assert http.get("/queued-messages", params={"instanceId": "acme", "lease_token": 1}).json()["messages"] == []
    move(http, clock, "acme", "w-a", "w-b")
    again = http.get("/queued-messages", params={"instanceId": "acme", "lease_token": 2}).json()["messages"]
    assert [(m["id"], m["lease_token"], m.get("prior_claim")) for m in again] == [(mid, 2, True)]
    # the dead holder's late acknowledgement is still the truth about its send
    r = http.post("/mark-sent", json={"messageId": mid, "wa_message_id": "WA1", "lease_token": 1})
    assert r.status_code == 200 and r.json()["status"] == "sent"
    r = http.post("/mark-failed", json={"messageId": mid, "error": "delivery unknown",
                                        "error_code": "delivery_unknown", "lease_token": 2})
    assert r.status_code == 200 and r.json()["status"] == "sent"  # never overrides sent


def test_a_batch_claim_after_a_move_carries_prior_claim(http: httpx.Client, clock: FakeClock) -> None:
    add(http, "acme")
    call(http, "w-a")
    connected(http, "acme", 1)
    mid = queue(http, "acme")
    assert len(http.get("/queued-messages", headers={"X-Worker-Id": "w-a"}).json()["messages"]) == 1
    move(http, clock, "acme", "w-a", "w-b")
    assert http.get("/queued-messages", headers={"X-Worker-Id": "w-a"}).json()["messages"] == []
    again = http.get("/queued-messages", headers={"X-Worker-Id": "w-b"}).json()["messages"]
    assert [(m["id"], m["lease_token"], m.get("prior_claim")) for m in again] == [(mid, 2, True)]


def test_the_dev_store_migrates_to_version_8(tmp_path: Path, clock: FakeClock) -> None:
    s = DevStore(tmp_path / "p.db", clock=clock)
    s.close()
    raw = sqlite3.connect(tmp_path / "p.db")
    try:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == 8
        cols = {r[1] for r in raw.execute("PRAGMA table_info(instances)")}
        assert {"lease_token", "lease_holder", "lease_expires_at", "lease_revoked"} <= cols
        assert "api_url" in {r[1] for r in raw.execute("PRAGMA table_info(workers)")}
    finally:
        raw.close()


def test_the_dev_api_shows_the_lease_holder(http: httpx.Client) -> None:
    add(http, "acme")
    add(http, "never")
    call(http, "w-a", capacity=1)
    shown = {i["id"]: i["lease"] for i in http.get("/dev/instances").json()["instances"]}
    assert shown["never"] is None
    assert shown["acme"]["holder"] == "w-a" and shown["acme"]["token"] == 1 and shown["acme"]["revoked"] is False


def test_two_proxies_on_one_database_never_grant_one_instance_twice(tmp_path: Path, clock: FakeClock) -> None:
    """Each call is one SQLite transaction: two proxy processes' connections to one file serialize."""
    stores = [DevStore(tmp_path / "shared.db", clock=clock) for _ in range(2)]
    for n in range(40):
        stores[0].add_instance(f"i{n:02d}")
    workers = [f"w-{n}" for n in range(8)]
    answers: dict[str, dict[str, int]] = {w: {} for w in workers}
    errors: list[BaseException] = []
    try:
        with BackgroundProxy(stores[0], SECRET) as one, BackgroundProxy(stores[1], SECRET) as two:
            urls = [one.url, two.url]

            def run(n: int, worker: str, barrier: threading.Barrier) -> None:
                try:
                    for r in range(4):
                        with httpx.Client(base_url=urls[(n + r) % 2], headers=AUTH, timeout=10,
                                          trust_env=False) as client:
                            barrier.wait(10)
                            answers[worker] = tokens(call(client, worker, held=answers[worker]))
                except (AssertionError, httpx.HTTPError, threading.BrokenBarrierError) as exc:
                    errors.append(exc)

            race(run, list(enumerate(workers)))
        assert not errors
        assert_granted_once(answers, holders(stores[0]), 40)
    finally:
        for s in stores:
            s.close()


def test_dev_fleet_shows_the_workers_and_counts_the_refused_calls(http: httpx.Client, clock: FakeClock) -> None:
    add(http, "acme")
    add(http, "beta")
    call(http, "w-a", capacity=1)
    mid = queue(http, "acme")
    move(http, clock, "acme", "w-a", "w-b")
    assert connected(http, "acme", 1).status_code == 409
    assert http.get("/queued-messages", params={"instanceId": "acme", "lease_token": 1}).status_code == 409
    http.get("/queued-messages", params={"instanceId": "acme", "lease_token": 2})
    assert http.post("/mark-sent", json={"messageId": mid, "lease_token": 1}).status_code == 409
    fleet = http.get("/dev/fleet").json()
    assert fleet["refused"] == {"update_status": 1, "claim": 1, "ack": 1}
    assert fleet["ttl_s"] == 30 and fleet["events_waiting"] == 0
    # w-a's last call was 2 TTLs ago: no longer live, pruned at w-b's call
    assert [(w["id"], w["live"], w["held"], w["capacity"]) for w in fleet["workers"]] == [("w-b", True, 2, 500)]


def test_an_expired_lease_claims_nothing_until_it_is_renewed(http: httpx.Client, clock: FakeClock) -> None:
    add(http, "acme")
    call(http, "w-a")
    connected(http, "acme", 1)
    queue(http, "acme")
    clock.now += TTL + 1  # w-a should have fenced itself at TTL/2
    assert http.get("/queued-messages", params={"instanceId": "acme", "lease_token": 1}).status_code == 409
    assert http.get("/queued-messages", headers={"X-Worker-Id": "w-a"}).json()["messages"] == []
    assert tokens(call(http, "w-a", held={"acme": 1})) == {"acme": 1}  # nobody took it: renewed
    r = http.get("/queued-messages", params={"instanceId": "acme", "lease_token": 1})
    assert r.status_code == 200 and len(r.json()["messages"]) == 1


class Member:
    """A worker as the contract describes it: renews every TTL/3, believes in its leases for TTL/2
    after its last successful call (self-fencing), renews at once on a ``leases`` event."""

    def __init__(self, name: str, http: httpx.Client) -> None:
        self.name = name
        self.http = http
        self.held: dict[str, int] = {}
        self.release: dict[str, int] = {}
        self.at = -1e18
        self.cursor = str(http.get("/events", params={"wait": 0}, headers={"X-Worker-Id": name}).json()["cursor"])

    def renew(self, now: float, *, leaving: bool = False) -> None:
        held = {} if leaving else self.held
        release = {**self.release, **(self.held if leaving else {})}
        answer = tokens(call(self.http, self.name, held, release))
        self.release = {i: t for i, t in self.held.items() if answer.get(i) != t and not leaving}
        self.held, self.at = answer, now

    def told(self) -> bool:
        r = self.http.get("/events", params={"wait": 0, "cursor": self.cursor}, headers={"X-Worker-Id": self.name})
        self.cursor = r.json()["cursor"]
        return {"type": "leases"} in r.json()["events"]

    def believes(self, now: float) -> set[str]:
        return set(self.held) if now - self.at < TTL / 2 else set()


# long: one scenario (start, SIGTERM, kill -9, scale out) with its invariant checked after every call
def test_a_fleet_never_runs_an_instance_twice_and_takes_over_on_sigterm_kill_and_scale_out(
        http: httpx.Client, clock: FakeClock, store: DevStore) -> None:
    for n in range(60):
        add(http, f"i{n:02d}", priority=n % 3)
    start = clock.now
    members = {n: Member(n, http) for n in ("w1", "w2", "w3")}
    running = dict(members)

    def check() -> None:  # never two workers that both believe they hold one instance
        seen: dict[str, str] = {}
        for m in running.values():
            for iid in m.believes(clock.now):
                assert iid not in seen, f"{iid} on {seen.get(iid)} and {m.name} at +{clock.now - start:.0f} s"
                seen[iid] = m.name

    def served() -> int:
        return len(set().union(*(m.believes(clock.now) for m in running.values())))

    def step() -> None:
        """TTL/3 of time: every running member renews, then those told to renew again."""
        clock.now += TTL / 3
        for m in sorted(running.values(), key=lambda m: m.name):
            m.renew(clock.now)
            check()
        for _ in range(10):
            told = [m for m in running.values() if m.told()]
            if not told:
                break
            for m in told:
                m.renew(clock.now)
                check()

    def until_served(count: int = 60, limit_steps: int = 30) -> float:
        t0 = clock.now
        for _ in range(limit_steps):
            if served() >= count:
                return clock.now - t0
            step()
        raise AssertionError(f"only {served()} of {count} instances served")

    until_served()
    assert sorted(len(m.held) for m in running.values()) == [20, 20, 20]
    # SIGTERM w2: its last call releases everything; the others are told at once
    w2 = running.pop("w2")
    w2.renew(clock.now, leaving=True)
    for _ in range(10):
        told = [m for m in running.values() if m.told()]
        for m in told:
            m.renew(clock.now)
            check()
        if not told:
            break
    assert served() == 50  # at once: 5 more for each of the two left (told by a leases event)
    assert until_served() == TTL / 3  # the rest at their next renewal (5 per call: no reconnect storm)
    # kill -9 w3 (30 leases): it stops calling; its leases are free one TTL after they expire
    running.pop("w3")
    first = until_served(31)
    assert 2 * TTL < first <= 2 * TTL + TTL / 3
    assert until_served() == 5 * TTL / 3  # then 5 per renewal of the one worker left
    # a fourth worker gets its share gradually (revocations of w1's lowest-priority leases)
    running["w4"] = Member("w4", http)
    for _ in range(20):
        step()
    assert served() == 60
    assert sorted(len(m.held) for m in running.values()) == [30, 30]
    owned = holders(store)
    assert all(owned[i] == m.name for m in running.values() for i in m.held)


def holder(http: httpx.Client, iid: str) -> httpx.Response:
    return http.get("/lease-holder", params={"instanceId": iid}, headers={"X-Worker-Id": "w-x"})


def test_lease_holder_names_the_live_holder_and_the_api_url_it_gave(http: httpx.Client, bp: BackgroundProxy,
                                                                    clock: FakeClock) -> None:
    add(http, "acme")
    add(http, "beta")
    assert holder(http, "acme").status_code == 404 and holder(http, "acme").json() == {"error": "no holder"}
    r = http.post("/leases", headers={"X-Worker-Id": "w-a"},
                  json={"worker_id": "w-a", "capacity": 1, "held": [], "release": [], "api_url": "http://10.0.0.5:3000/"})
    assert r.status_code == 200 and tokens(r.json()) == {"acme": 1}
    assert holder(http, "acme").json() == {"instanceId": "acme", "worker_id": "w-a", "api_url": "http://10.0.0.5:3000"}
    call(http, "w-b", capacity=1)  # a worker that gave no api_url
    assert holder(http, "beta").json() == {"instanceId": "beta", "worker_id": "w-b", "api_url": None}
    # a renewal without it forgets it (the field is the worker's current word)
    call(http, "w-a", held={"acme": 1}, capacity=1)
    assert holder(http, "acme").json()["api_url"] is None
    # released → no holder
    call(http, "w-b", release={"beta": 1}, capacity=0)
    assert holder(http, "beta").status_code == 404
    # expired → no holder (not renewed for a TTL)
    clock.now += TTL + 1
    assert holder(http, "acme").status_code == 404
    # bearer-authenticated like every proxy call; a bad instanceId or api_url is a 400
    assert httpx.get(f"{bp.url}/lease-holder", params={"instanceId": "acme"}).status_code == 401
    assert http.get("/lease-holder").status_code == 400
    for bad in ("ftp://x", "http://u:p@x", "http://x/?q=1", 5):
        r = http.post("/leases", headers={"X-Worker-Id": "w-c"},
                      json={"worker_id": "w-c", "capacity": 1, "held": [], "release": [], "api_url": bad})
        assert r.status_code == 400 and "api_url" in r.text, bad


def test_lease_holder_is_not_a_revoked_lease(http: httpx.Client) -> None:
    for iid in ("i1", "i2", "i3", "i4"):
        add(http, iid)
    first = call(http, "w-a")  # alone: up to 5 per call, all four
    assert len(tokens(first)) == 4
    assert call(http, "w-b")["leases"] == []  # a second live worker: target 2, w-a holds 4 > 3
    second = call(http, "w-a", held=tokens(first))
    revoked = set(tokens(first)) - set(tokens(second))
    assert revoked
    for iid in revoked:
        assert holder(http, iid).status_code == 404
    for iid in tokens(second):
        assert holder(http, iid).json()["worker_id"] == "w-a"


# ---------------------------------------------------------------------------- the hand-back of unsent claims


def lease_post(http: httpx.Client, worker: str, held: Sequence[dict] = (), release: Sequence[dict] = (),
               capacity: int = 500) -> dict:
    r = http.post("/leases", headers={"X-Worker-Id": worker},
                  json={"worker_id": worker, "capacity": capacity, "held": list(held), "release": list(release)})
    assert r.status_code == 200, r.text
    return r.json()


def status_of(store: DevStore, mid: str) -> str:
    msg = store.get_message(mid)
    assert msg is not None
    return str(msg["status"])


def claim(http: httpx.Client, iid: str, token: int) -> list[tuple[str, int, bool | None]]:
    r = http.get("/queued-messages", params={"instanceId": iid, "lease_token": token})
    assert r.status_code == 200, r.text
    return [(m["id"], m["lease_token"], m.get("prior_claim")) for m in r.json()["messages"]]


def test_released_unsent_claims_go_back_to_queued_and_the_next_claim_is_clean(http: httpx.Client,
                                                                            store: DevStore) -> None:
    add(http, "acme")
    add(http, "beta")
    call(http, "w-a")
    connected(http, "acme", 1)
    connected(http, "beta", 1)
    m1, m2, other = queue(http, "acme", "one"), queue(http, "acme", "two"), queue(http, "beta", "b")
    assert [c[0] for c in claim(http, "acme", 1)] == [m1, m2]
    assert [c[0] for c in claim(http, "beta", 1)] == [other]
    # w-a stops acme: m1 never begun (handed back), m2 was in flight (not listed); an unknown id and
    # another instance's claim are ignored and counted
    answer = lease_post(http, "w-a", held=[{"instanceId": "beta", "token": 1}], capacity=1,
                        release=[{"instanceId": "acme", "token": 1, "unsent": [m1, "no-such-id", other]}])
    assert answer["requeued"] == [m1] and answer["unsent_ignored"] == 2
    assert status_of(store, m1) == "queued"
    granted = tokens(call(http, "w-b"))
    assert granted.get("acme") == 2
    connected(http, "acme", 2)
    # the next holder: m1 clean, m2 (still w-a's claim) with prior_claim
    assert claim(http, "acme", 2) == [(m1, 2, None), (m2, 2, True)]
    # a late acknowledgement under token 1 of m2 (in flight on w-a) is still the truth about its send
    r = http.post("/mark-sent", json={"messageId": m2, "wa_message_id": "WA2", "lease_token": 1})
    assert r.status_code == 200 and r.json()["status"] == "sent"
    assert http.get("/dev/fleet").json()["unsent"] == {"requeued": 1, "ignored": 2}
    # a call without unsent answers as before
    assert set(call(http, "w-b", {"acme": 2})) == {"ttl_s", "leases"}


def test_a_stale_or_foreign_hand_back_is_ignored(http: httpx.Client, clock: FakeClock, store: DevStore) -> None:
    add(http, "acme")
    call(http, "w-a")
    connected(http, "acme", 1)
    mid = queue(http, "acme")
    assert [c[0] for c in claim(http, "acme", 1)] == [mid]
    token = move(http, clock, "acme", "w-a", "w-b")
    assert token == 2
    # w-a comes back from a pause: its lease is gone, its hand-back under token 1 is ignored
    stale = lease_post(http, "w-a", release=[{"instanceId": "acme", "token": 1, "unsent": [mid]}])
    assert stale["requeued"] == [] and stale["unsent_ignored"] == 1
    # another worker naming the holder's token hands back nothing either
    foreign = lease_post(http, "w-c", held=[{"instanceId": "acme", "token": 2, "unsent": [mid]}])
    assert foreign["requeued"] == [] and foreign["unsent_ignored"] == 1
    connected(http, "acme", 2)
    assert claim(http, "acme", 2) == [(mid, 2, True)]  # still w-a's claim: prior_claim
    # the holder's own claim under token 2 is not w-a's to hand back with any token
    stale = lease_post(http, "w-a", release=[{"instanceId": "acme", "token": 2, "unsent": [mid]}])
    assert stale["requeued"] == []
    assert status_of(store, mid) == "sending"


def test_a_held_item_hands_claims_back_under_the_same_token(http: httpx.Client) -> None:
    """A runner stopped under a lease still held (self-fencing): its claims come back at once, not
    after the claim lease."""
    add(http, "acme")
    call(http, "w-a")
    connected(http, "acme", 1)
    mid = queue(http, "acme")
    assert [c[0] for c in claim(http, "acme", 1)] == [mid]
    assert claim(http, "acme", 1) == []  # claimed: not offered again under the same token
    answer = lease_post(http, "w-a", held=[{"instanceId": "acme", "token": 1, "unsent": [mid]}])
    assert tokens(answer) == {"acme": 1} and answer["requeued"] == [mid]
    assert claim(http, "acme", 1) == [(mid, 1, None)]


@pytest.mark.parametrize("unsent", ["m1", [1], [""], ["x" * 257], ["m"] * 1001])
def test_a_malformed_unsent_list_is_a_400(http: httpx.Client, unsent: Any) -> None:
    r = http.post("/leases", json={"worker_id": "w-a", "release": [{"instanceId": "acme", "token": 1,
                                                                     "unsent": unsent}]})
    assert r.status_code == 400 and "unsent" in r.json()["error"]
