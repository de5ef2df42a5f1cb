"""The Supabase kit as a fleet's proxy (issue #13): the leases migration, ``POST /leases``,
fencing tokens on instance-scoped calls, ``prior_claim`` re-offers and the ``GET /events``
long poll (LISTEN/NOTIFY), against the real function under Deno on a real PostgreSQL 15
(tests/pg_helpers.py), over HTTP. docs/proxy-contract.md, "Leases and fencing"."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import threading
import time
import uuid
from typing import Any

import pytest

from tests.fake_storage import FakeStorage
from tests.pg_helpers import (
    SUPABASE_DIR,
    EdgeFunction,
    PgServer,
    WaDb,
    _clean_env,
    clean_wa_db,
    edge_function,
    migration_files,
    pg_server,
    sql_literal,
    wa_db,
)

pytestmark = [pytest.mark.postgres, pytest.mark.slow]
deno = pytest.mark.deno
FIXTURES = (clean_wa_db, edge_function, pg_server, wa_db)  # requested by name below

LEASES_MIGRATION = SUPABASE_DIR / "migrations" / "20261128000000_wa_worker_leases.sql"
TTL = 20  # WORKER_LEASE_TTL_SECONDS of this module's function
MAX_WAIT = 4  # WORKER_EVENTS_MAX_WAIT_SECONDS of this module's function
LOST = {"error": "lease_lost"}


# ------------------------------------------------------------------ migration


def test_leases_migration_on_a_database_with_rows(pg_server: PgServer) -> None:
    assert migration_files()[-1] == LEASES_MIGRATION
    name = f"wa_leases_{uuid.uuid4().hex[:10]}"
    pg_server.create_database(name)
    db = WaDb(pg_server, name)
    try:
        for path in migration_files()[:-1]:
            db.psql(path.read_text())
        db.insert_instance("acme", "CONNECTED", 3)
        mid = db.insert_outbound("acme", "5511999990000", "before the fleet", status="sending", claimed_ago_s=5)
        db.psql(LEASES_MIGRATION.read_text())
        db.psql(LEASES_MIGRATION.read_text())  # idempotent, keeps rows
        row = db.instance("acme")
        assert row is not None and row["priority"] == 3
        assert (row["lease_worker"], row["lease_token"], row["lease_released"], row["lease_revoked"]) == (
            None, 0, False, False)
        out = db.outbound(mid)
        assert out is not None and out["claim_token"] is None and out["queued_xact"] is None
        assert db.scalar("select count(*) from wa_fleet_state") == 1
        rls = {r["relname"]: r["relrowsecurity"] for r in db.query(
            "select relname, relrowsecurity from pg_class where relname in ('wa_workers', 'wa_fleet_state')")}
        assert rls == {"wa_workers": True, "wa_fleet_state": True}
        # a queued row records the transaction that queued it; a requeue does again
        mid2 = db.insert_outbound("acme", "5511999990000", "new")
        first = db.outbound(mid2)["queued_xact"]
        assert first is not None
        db.psql(f"update wa_outbound set status = 'sending' where id = '{mid2}'")
        db.psql(f"update wa_outbound set status = 'queued' where id = '{mid2}'")
        assert int(db.outbound(mid2)["queued_xact"]) > int(first)
        # nobody but the owner runs the lease function (PostgREST's /rpc would expose it)
        db.psql("drop role if exists wa_nobody; create role wa_nobody")
        denied = db.psql("set role wa_nobody; select * from public.wa_lease_call('w', 1, '[]', '[]', 30, 5)",
                         check=False)
        assert "permission denied" in denied.stderr
        denied = db.psql("set role wa_nobody; select public.wa_lease_changed()", check=False)
        assert "permission denied" in denied.stderr
        denied = db.psql("set role wa_nobody; select * from public.wa_lease_hand_back('w', '[]')", check=False)
        assert "permission denied" in denied.stderr
        # where Supabase's roles exist, they lose the EXECUTE Supabase grants them by default
        db.psql("drop role if exists anon; create role anon; "
                "grant execute on function public.wa_lease_changed() to anon")
        db.psql(LEASES_MIGRATION.read_text())
        assert db.scalar("select has_function_privilege('anon', 'public.wa_lease_changed()', 'execute')") is False
        for bad in ("insert into wa_workers (id, capacity) values ('-bad', 1)",
                    "update wa_instances set lease_worker = 'has space'",
                    "insert into wa_fleet_state (id) values (2)"):
            assert db.psql(bad, check=False).returncode != 0, bad
    finally:
        pg_server.psql(f"drop database if exists {name} with (force);")
        pg_server.psql("drop role if exists wa_nobody; drop role if exists anon;")


@deno
def test_function_on_a_schema_without_leases(pg_server: PgServer) -> None:
    """Deployed before `supabase db push`: everything without lease fields works as before, and
    /leases says what is missing with a 500 (a 501 would send a fleet into single-worker mode)."""
    name = f"wa_noleases_{uuid.uuid4().hex[:10]}"
    pg_server.create_database(name)
    db = WaDb(pg_server, name)
    fn = EdgeFunction(db.dsn)
    try:
        for path in migration_files()[:-1]:
            db.psql(path.read_text())
        db.insert_instance("acme", "DISCONNECTED")
        fn.start()
        assert fn.request("GET", "disconnected-instances").json()["instances"] == [{"id": "acme", "priority": 0}]
        assert fn.request("POST", "update-status", json={"instanceId": "acme", "status": "CONNECTED"}).status_code == 200
        one, two = (db.insert_outbound("acme", "5511999990001", b) for b in ("one", "two"))
        r = fn.request("GET", "queued-messages", params={"instanceId": "acme", "limit": 1})
        assert [m["id"] for m in r.json()["messages"]] == [one]
        assert [m["id"] for m in fn.request("GET", "queued-messages").json()["messages"]] == [two]
        assert fn.request("POST", "mark-sent", json={"messageId": one, "wa_message_id": "W1"}).json()["status"] == "sent"
        assert fn.request("POST", "mark-failed", json={"messageId": two, "error": "x"}).json()["status"] == "failed"
        for method, endpoint, body in (("POST", "leases", {"worker_id": "w-a", "capacity": 1}),
                                       ("GET", "events", None)):
            r = fn.request(method, endpoint, json=body, params={"wait": 0} if method == "GET" else None)
            assert r.status_code == 500 and "apply supabase/migrations/" in r.json()["error"], r.text
    finally:
        fn.stop()
        pg_server.psql(f"drop database if exists {name} with (force);")


# ------------------------------------------------------------------ function


@pytest.fixture(scope="module")
def storage():
    with FakeStorage() as fake:
        yield fake


@pytest.fixture(scope="module")
def fleet_fn(wa_db: WaDb, storage: FakeStorage):
    fn = EdgeFunction(wa_db.dsn, extra_env={
        "WORKER_LEASE_TTL_SECONDS": str(TTL), "WORKER_EVENTS_MAX_WAIT_SECONDS": str(MAX_WAIT),
        "SUPABASE_URL": storage.url, "SUPABASE_SERVICE_ROLE_KEY": storage.service_key})
    fn.start()
    yield fn
    fn.stop()


@pytest.fixture
def fn(fleet_fn: EdgeFunction, clean_wa_db: WaDb) -> EdgeFunction:
    return fleet_fn


def lease(fn: EdgeFunction, worker: str, *, capacity: int = 500, held: list | None = None,
          release: list | None = None) -> dict[str, Any]:
    r = fn.request("POST", "leases", json={"worker_id": worker, "capacity": capacity,
                                           "held": held or [], "release": release or []})
    assert r.status_code == 200, r.text
    return r.json()


def held(answer: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"instanceId": item["instanceId"], "token": item["token"]} for item in answer["leases"]]


def ids(answer: dict[str, Any]) -> set[str]:
    return {item["instanceId"] for item in answer["leases"]}


def token_of(answer: dict[str, Any], instance: str) -> int:
    return next(item["token"] for item in answer["leases"] if item["instanceId"] == instance)


def expire(db: WaDb, instance: str, ago_s: float) -> None:
    """Backdate a lease's expiry (the function's TTL is TTL s; free after expiry + TTL)."""
    db.psql(f"update wa_instances set lease_expires_at = now() - make_interval(secs => {ago_s}) "
            f"where id = '{instance}'")


@deno
def test_default_ttl_is_30_seconds(edge_function: EdgeFunction, clean_wa_db: WaDb) -> None:
    clean_wa_db.insert_instance("acme")
    answer = lease(edge_function, "w-default")
    assert answer["ttl_s"] == 30
    left = clean_wa_db.scalar("select extract(epoch from lease_expires_at - now()) from wa_instances")
    assert 25 < left <= 30


@deno
def test_grant_renew_lose_release(fn: EdgeFunction, wa_db: WaDb) -> None:
    for i, prio in enumerate((1, 9, 5, 0, 7, 3, 8)):
        wa_db.insert_instance(f"i{i}", priority=prio)
    wa_db.insert_instance("paired", priority=6, pair_phone="5511999990000", settings={"call_reject": True},
                          proxy_url="socks5://127.0.0.1:1080")
    first = lease(fn, "w-a")
    assert first["ttl_s"] == TTL  # from WORKER_LEASE_TTL_SECONDS
    # at most 5 grants per call, highest priority first, each with the discovery fields
    assert [i["instanceId"] for i in sorted(first["leases"], key=lambda i: -i["priority"])] == [
        "i1", "i6", "i4", "paired", "i2"]
    paired = next(i for i in first["leases"] if i["instanceId"] == "paired")
    assert paired == {"instanceId": "paired", "token": 1, "priority": 6, "settings": {"call_reject": True},
                      "proxy_url": "socks5://127.0.0.1:1080", "pair_phone": "5511999990000"}
    assert next(i for i in first["leases"] if i["instanceId"] == "i1") == {
        "instanceId": "i1", "token": 1, "priority": 9, "settings": None, "proxy_url": None, "pair_phone": None}
    row = wa_db.instance("i1")
    assert row["lease_worker"] == "w-a" and row["lease_token"] == 1 and not row["lease_released"]
    # renewal: the held ones come back bare (and renewed), the rest is granted
    wa_db.psql("update wa_instances set lease_expires_at = now() + interval '1 second'")
    second = lease(fn, "w-a", held=held(first))
    renewed = [i for i in second["leases"] if i["instanceId"] in ids(first)]
    assert sorted(renewed, key=lambda i: i["instanceId"]) == sorted(held(first), key=lambda i: i["instanceId"])
    assert ids(second) == {f"i{i}" for i in range(7)} | {"paired"}
    assert wa_db.scalar("select min(extract(epoch from lease_expires_at - now())) from wa_instances") > TTL - 5
    # a held lease with a wrong token is lost: absent from the answer
    wrong = [dict(i, token=i["token"] + 1) if i["instanceId"] == "i3" else i for i in held(second)]
    third = lease(fn, "w-a", held=wrong)
    assert "i3" not in ids(third) and len(third["leases"]) == 7
    # a release with an old token is ignored, with the current one frees the lease at once
    fourth = lease(fn, "w-a", held=[i for i in held(third) if i["instanceId"] != "i1"],
                   release=[{"instanceId": "i1", "token": 7}])
    assert wa_db.instance("i1")["lease_released"] is False
    assert "i1" not in ids(fourth)  # not renewed: no longer held in the worker's view
    lease(fn, "w-a", held=held(fourth), release=[{"instanceId": "i1", "token": 1}])
    assert wa_db.instance("i1")["lease_released"] is True
    # another worker gets it (the grace applies to expired leases, not released ones), token 2
    other = lease(fn, "w-b")
    assert token_of(other, "i1") == 2
    assert wa_db.query("select id, capacity, leases from wa_workers order by id") == [
        {"id": "w-a", "capacity": 500, "leases": 7}, {"id": "w-b", "capacity": 500, "leases": 1}]


@deno
def test_fair_share_revokes_lowest_priority_gradually(fn: EdgeFunction, wa_db: WaDb) -> None:
    for i in range(12):
        wa_db.insert_instance(f"n{i:02d}", priority=i)
    a: dict[str, Any] = {"leases": []}
    for _ in range(3):
        a = lease(fn, "w-a", held=held(a))
    assert len(a["leases"]) == 12  # alone: 5 + 5 + 2
    b = lease(fn, "w-b")
    assert b["leases"] == []  # nothing is free: no reconnect storm, no stealing
    # two live workers: target 6; w-a holds 12 > 7, so 5 of its lowest-priority leases are left out
    a2 = lease(fn, "w-a", held=held(a))
    assert ids(a) - ids(a2) == {"n00", "n01", "n02", "n03", "n04"}
    revoked = wa_db.query("select id from wa_instances where lease_revoked order by id")
    assert [r["id"] for r in revoked] == ["n00", "n01", "n02", "n03", "n04"]
    assert lease(fn, "w-b")["leases"] == []  # revoked, not yet free: w-a may still be stopping them
    # w-a stopped them and releases four: free at once, granted to w-b
    gone = [i for i in held(a) if i["instanceId"] not in ids(a2)]
    a3 = lease(fn, "w-a", held=held(a2), release=[i for i in gone if i["instanceId"] != "n04"])
    assert len(a3["leases"]) == 7  # 7 = target + 1: kept
    b2 = lease(fn, "w-b")
    assert ids(b2) == {"n00", "n01", "n02", "n03"} and {i["token"] for i in b2["leases"]} == {2}
    # a revoked lease its holder never releases is free one TTL after the revocation
    assert ids(lease(fn, "w-b", held=held(b2))) == ids(b2)
    expire(wa_db, "n04", TTL + 1)
    b3 = lease(fn, "w-b", held=held(b2))
    assert ids(b3) == ids(b2) | {"n04"} and token_of(b3, "n04") == 2
    assert ids(lease(fn, "w-a", held=held(a3))) == ids(a3)


@deno
def test_expired_lease_moves_only_after_a_grace_of_one_ttl(fn: EdgeFunction, wa_db: WaDb) -> None:
    wa_db.insert_instance("acme", "CONNECTED")
    a = lease(fn, "w-a")
    assert held(a) == [{"instanceId": "acme", "token": 1}]
    expire(wa_db, "acme", TTL - 2)  # expired, but w-a may not have fenced itself yet
    assert lease(fn, "w-b")["leases"] == []
    # expired and not taken: its holder may renew it (nobody else ran it)
    assert held(lease(fn, "w-a", held=held(a))) == [{"instanceId": "acme", "token": 1}]
    expire(wa_db, "acme", TTL + 1)
    b = lease(fn, "w-b")
    assert held(b) == [{"instanceId": "acme", "token": 2}]
    assert lease(fn, "w-a", held=held(a))["leases"] == []  # lost
    row = wa_db.instance("acme")
    assert row["lease_worker"] == "w-b" and row["lease_token"] == 2


@deno
def test_capacity_leaving_and_unequal_capacities(fn: EdgeFunction, wa_db: WaDb) -> None:
    for i in range(10):
        wa_db.insert_instance(f"c{i}", priority=i)
    small = lease(fn, "w-small", capacity=2)
    assert len(small["leases"]) == 2
    assert len(lease(fn, "w-small", capacity=2, held=held(small))["leases"]) == 2  # never past its capacity
    # a big worker beside it takes the rest: its target is 8, not ceil(10 / 2) = 5
    big: dict[str, Any] = {"leases": []}
    for _ in range(2):
        big = lease(fn, "w-big", held=held(big))
    assert len(big["leases"]) == 8
    # capacity 0: granted nothing, no longer live
    assert lease(fn, "w-zero", capacity=0)["leases"] == []
    assert wa_db.scalar("select count(*) from wa_workers where id = 'w-zero'") == 0
    # the last call on SIGTERM (held empty, everything released): freed, granted nothing, not live
    last = lease(fn, "w-small", capacity=2, release=held(small))
    assert last["leases"] == []
    assert wa_db.scalar("select count(*) from wa_instances where lease_released") == 2
    assert wa_db.scalar("select count(*) from wa_workers where id = 'w-small'") == 0


@deno
def test_concurrent_lease_calls_never_share_an_instance(fn: EdgeFunction, wa_db: WaDb) -> None:
    wa_db.psql("insert into wa_instances (id, priority) select 'x' || g, g % 4 from generate_series(1, 40) g")
    workers = [f"w-{n}" for n in range(8)]
    answers: dict[str, dict[str, Any]] = {w: {"leases": []} for w in workers}
    barrier = threading.Barrier(len(workers))

    def call(worker: str) -> dict[str, Any]:
        barrier.wait(timeout=20)
        return lease(fn, worker, held=held(answers[worker]))

    with concurrent.futures.ThreadPoolExecutor(len(workers)) as pool:
        for _round in range(3):
            results = dict(zip(workers, pool.map(call, workers), strict=True))
            answers.update(results)
            owned: dict[str, str] = {}
            for worker, answer in results.items():
                for instance in ids(answer):
                    assert instance not in owned, f"{instance} leased to {owned[instance]} and {worker}"
                    owned[instance] = worker
    # every instance granted at most once: no token above 1, and the table agrees with the answers
    assert wa_db.scalar("select max(lease_token) from wa_instances") == 1
    total = sum(len(a["leases"]) for a in answers.values())
    assert total == wa_db.scalar("select count(*) from wa_instances where lease_token = 1") == 40


@deno
def test_a_grant_skips_a_row_another_transaction_holds(fn: EdgeFunction, wa_db: WaDb, pg_server: PgServer) -> None:
    wa_db.insert_instance("busy", priority=9)
    wa_db.insert_instance("idle", priority=1)
    with held_row_lock(pg_server, wa_db.dbname, "select 1 from wa_instances where id = 'busy' for update"):
        assert ids(lease(fn, "w-a")) == {"idle"}  # SKIP LOCKED: no wait, no double grant
    assert ids(lease(fn, "w-b")) == {"busy"}


class held_row_lock:
    """A psql session holding an open transaction (a lock or an uncommitted insert) until exit
    (commit) or ``.rollback()``."""

    def __init__(self, server: PgServer, dbname: str, statement: str) -> None:
        self.proc = subprocess.Popen(server._psql_argv(dbname), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=_clean_env())
        self.server, self.dbname = server, dbname
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"begin;\n{statement};\nselect 'ready-' || pg_backend_pid();\n")
        self.proc.stdin.flush()
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        while line and not line.startswith("ready-"):
            line = self.proc.stdout.readline()
        assert line.startswith("ready-"), self.proc.stderr.read() if self.proc.stderr else ""

    def __enter__(self) -> held_row_lock:
        return self

    def finish(self, how: str = "commit") -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(f"{how};\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=20)

    def __exit__(self, *exc: object) -> None:
        self.finish()


@deno
def test_leases_bad_input_is_400(fn: EdgeFunction, wa_db: WaDb) -> None:
    wa_db.insert_instance("acme")
    ok = {"worker_id": "w-a", "capacity": 5, "held": [], "release": []}
    for bad in ({"worker_id": "-x"}, {"worker_id": None}, {"capacity": -1}, {"capacity": "5"},
                {"capacity": None}, {"held": {}}, {"held": [{"instanceId": "acme", "token": 0}]},
                {"held": [{"instanceId": "../x", "token": 1}]}, {"release": [{"instanceId": "acme"}]},
                {"release": [1]}):
        r = fn.request("POST", "leases", json={**ok, **bad})
        assert r.status_code == 400, (bad, r.text)
    assert fn.request("GET", "leases").status_code == 405
    assert wa_db.scalar("select count(*) from wa_workers") == 0


# ------------------------------------------------------------------ fencing


@deno
def test_update_status_is_fenced(fn: EdgeFunction, wa_db: WaDb) -> None:
    wa_db.insert_instance("acme")
    status = {"instanceId": "acme", "status": "CONNECTING"}
    assert fn.request("POST", "update-status", json=status).status_code == 200  # no token: as before
    # token 0 is no lease (the first grant is 1)
    assert fn.request("POST", "update-status", json={**status, "lease_token": 0}).status_code == 409
    lease(fn, "w-a")
    r = fn.request("POST", "update-status", json={**status, "status": "CONNECTED", "lease_token": 1})
    assert r.status_code == 200, r.text
    expire(wa_db, "acme", TTL + 1)
    assert token_of(lease(fn, "w-b"), "acme") == 2
    r = fn.request("POST", "update-status", json={**status, "status": "DISCONNECTED", "lease_token": 1})
    assert (r.status_code, r.json()) == (409, LOST)
    assert wa_db.instance("acme")["status"] == "CONNECTED"  # the stale write changed nothing
    assert fn.request("POST", "update-status", json={**status, "lease_token": 2}).status_code == 200
    # released: the old holder's late write is refused too
    lease(fn, "w-b", release=[{"instanceId": "acme", "token": 2}])
    r = fn.request("POST", "update-status", json={**status, "lease_token": 2})
    assert r.status_code == 409
    r = fn.request("POST", "update-status", json={"instanceId": "nope", "status": "CONNECTED", "lease_token": 1})
    assert r.status_code == 404
    for bad in (-1, "x", 1.5, True):
        assert fn.request("POST", "update-status", json={**status, "lease_token": bad}).status_code == 400


@deno
def test_claims_are_fenced_and_carry_their_token(fn: EdgeFunction, wa_db: WaDb) -> None:
    wa_db.insert_instance("acme", "CONNECTED")
    lease(fn, "w-a")
    first = wa_db.insert_outbound("acme", "5511999990001", "one")
    r = fn.request("GET", "queued-messages", params={"instanceId": "acme", "lease_token": 1})
    assert r.status_code == 200, r.text
    assert [(m["id"], m["lease_token"]) for m in r.json()["messages"]] == [(first, 1)]
    assert "prior_claim" not in r.json()["messages"][0]
    assert wa_db.outbound(first)["claim_token"] == 1
    # the lease moves: a claim with the old token claims nothing
    second = wa_db.insert_outbound("acme", "5511999990001", "two")
    expire(wa_db, "acme", TTL + 1)
    lease(fn, "w-b")
    r = fn.request("GET", "queued-messages", params={"instanceId": "acme", "lease_token": 1})
    assert (r.status_code, r.json()) == (409, LOST)
    assert wa_db.outbound(second)["status"] == "queued"
    # an expired lease (self-fencing time) claims nothing either, even before anyone took it
    expire(wa_db, "acme", 1)
    assert fn.request("GET", "queued-messages", params={"instanceId": "acme", "lease_token": 2}).status_code == 409
    assert fn.request("GET", "queued-messages", params={"instanceId": "nope", "lease_token": 2}).status_code == 404
    assert fn.request("GET", "queued-messages", params={"instanceId": "acme", "lease_token": "x"}).status_code == 400
    # without a token: exactly as before (no lease fields)
    r = fn.request("GET", "queued-messages", params={"instanceId": "acme"})
    assert [set(m) for m in r.json()["messages"]] == [{"id", "instanceId", "to", "body"}]


@deno
def test_batch_claims_only_the_callers_leases(fn: EdgeFunction, wa_db: WaDb) -> None:
    for name in ("mine", "theirs", "free"):
        wa_db.insert_instance(name, "CONNECTED")
    wa_db.psql("update wa_instances set priority = 1 where id = 'mine'")
    lease(fn, "w-a", capacity=1)  # "mine" (priority 1)
    assert ids(lease(fn, "w-b", capacity=1)) == {"free"}
    msgs = {name: wa_db.insert_outbound(name, "5511999990001", f"to {name}") for name in ("mine", "theirs", "free")}
    r = fn.request("GET", "queued-messages", headers={"X-Worker-Id": "w-a"})
    assert r.status_code == 200, r.text
    assert [(m["id"], m["instanceId"], m["lease_token"]) for m in r.json()["messages"]] == [(msgs["mine"], "mine", 1)]
    assert fn.request("GET", "queued-messages", headers={"X-Worker-Id": "w-zzz"}).json()["messages"] == []
    assert fn.request("GET", "queued-messages", headers={"X-Worker-Id": "bad id"}).status_code == 400
    r = fn.request("GET", "queued-messages", headers={"X-Worker-Id": "w-b"})
    assert [(m["id"], m["lease_token"]) for m in r.json()["messages"]] == [(msgs["free"], 1)]
    # without the header: every CONNECTED instance, as before
    r = fn.request("GET", "queued-messages")
    assert {m["instanceId"] for m in r.json()["messages"]} == {"theirs"}
    assert all("lease_token" not in m for m in r.json()["messages"])


@deno
def test_acks_need_the_claim_token_even_after_the_lease_moved(fn: EdgeFunction, wa_db: WaDb) -> None:
    wa_db.insert_instance("acme", "CONNECTED")
    lease(fn, "w-a")
    one, two, three = (wa_db.insert_outbound("acme", "5511999990001", b) for b in ("one", "two", "three"))
    claimed = fn.request("GET", "queued-messages", params={"instanceId": "acme", "lease_token": 1}).json()
    assert len(claimed["messages"]) == 3
    expire(wa_db, "acme", TTL + 1)
    lease(fn, "w-b")  # token 2
    # the truth about one's own send is never refused
    r = fn.request("POST", "mark-sent", json={"messageId": one, "wa_message_id": "WA1", "lease_token": 1})
    assert r.status_code == 200 and wa_db.outbound(one)["status"] == "sent"
    r = fn.request("POST", "mark-failed", json={"messageId": two, "error": "boom", "lease_token": 1})
    assert r.status_code == 200 and wa_db.outbound(two)["status"] == "failed"
    # any other token: 409, nothing changes
    r = fn.request("POST", "mark-sent", json={"messageId": three, "wa_message_id": "WA3", "lease_token": 2})
    assert (r.status_code, r.json()) == (409, LOST)
    r = fn.request("POST", "mark-failed", json={"messageId": three, "error": "x", "lease_token": 7})
    assert (r.status_code, r.json()) == (409, LOST)
    assert wa_db.outbound(three)["status"] == "sending"
    # a sent row stays sent (mark-failed ignored, not refused); unknown ids stay 200
    r = fn.request("POST", "mark-failed", json={"messageId": one, "error": "late", "lease_token": 2})
    assert r.status_code == 200 and r.json()["ignored"] is True
    unknown = str(uuid.uuid4())
    assert fn.request("POST", "mark-sent", json={"messageId": unknown, "lease_token": 1}).json()["found"] is False
    assert fn.request("POST", "mark-failed", json={"messageId": unknown, "lease_token": 1}).json()["found"] is False
    # without a token: as before
    assert fn.request("POST", "mark-sent", json={"messageId": three, "wa_message_id": "WA3"}).status_code == 200


@deno
def test_stale_claims_are_offered_again_with_prior_claim(fn: EdgeFunction, wa_db: WaDb) -> None:
    wa_db.insert_instance("acme", "CONNECTED")
    lease(fn, "w-a")
    moved = wa_db.insert_outbound("acme", "5511999990001", "claimed by w-a, never acknowledged")
    fn.request("GET", "queued-messages", params={"instanceId": "acme", "lease_token": 1})
    # claimed before leases, older than CLAIM_LEASE_SECONDS (300 s): offered again, as always
    old = wa_db.insert_outbound("acme", "5511999990001", "old claim", status="sending", claimed_ago_s=400)
    # claimed before leases, fresh: not yet
    fresh = wa_db.insert_outbound("acme", "5511999990001", "fresh claim", status="sending", claimed_ago_s=5)
    # w-a's own claim under its current token is not offered again to itself
    r = fn.request("GET", "queued-messages", params={"instanceId": "acme", "lease_token": 1})
    assert [(m["id"], m.get("prior_claim")) for m in r.json()["messages"]] == [(old, True)]
    expire(wa_db, "acme", TTL + 1)
    lease(fn, "w-b")  # token 2: the lease moved, w-a's claims are offered again at once
    r = fn.request("GET", "queued-messages", params={"instanceId": "acme", "lease_token": 2})
    got = {m["id"]: m for m in r.json()["messages"]}
    assert set(got) == {moved, old}
    assert got[moved]["prior_claim"] is True and got[moved]["lease_token"] == 2
    row = wa_db.outbound(moved)
    assert (row["claim_token"], row["prior_claim_token"], row["attempts"]) == (2, 1, 2)
    assert wa_db.outbound(fresh)["status"] == "sending" and wa_db.outbound(fresh)["claim_token"] is None
    # w-a did send it after all: its acknowledgement (token 1) is still the truth
    r = fn.request("POST", "mark-sent", json={"messageId": moved, "wa_message_id": "WA-late", "lease_token": 1})
    assert r.status_code == 200 and wa_db.outbound(moved)["status"] == "sent"
    # a message w-b claimed itself and a queued one are not prior claims
    new = wa_db.insert_outbound("acme", "5511999990001", "new")
    r = fn.request("GET", "queued-messages", params={"instanceId": "acme", "lease_token": 2})
    assert [(m["id"], "prior_claim" in m) for m in r.json()["messages"]] == [(new, False)]


@deno
def test_facts_are_never_refused_for_their_token(fn: EdgeFunction, wa_db: WaDb, storage: FakeStorage) -> None:
    wa_db.insert_instance("acme", "CONNECTED")
    lease(fn, "w-a")
    expire(wa_db, "acme", TTL + 1)
    lease(fn, "w-b")  # token 2: w-a's token 1 is stale
    r = fn.request("POST", "inbound", json={"instanceId": "acme", "wa_message_id": "IN1", "from": "1@s.whatsapp.net",
                                           "body": "journaled by w-a", "lease_token": 1})
    assert r.status_code == 200, r.text
    assert [row["wa_message_id"] for row in wa_db.inbound_rows("acme")] == ["IN1"]
    sent = wa_db.insert_outbound("acme", "5511999990001", "x", status="sent", wa_message_id="WA9")
    r = fn.request("POST", "message-status", json={"lease_token": 1, "statuses": [
        {"instanceId": "acme", "messageId": sent, "wa_message_id": "WA9", "status": "read", "lease_token": 1}]})
    assert r.status_code == 200 and r.json()["changed"] == 1
    r = fn.request("POST", "upload-media", params={"instanceId": "acme", "wa_message_id": "IN2", "lease_token": 1},
                   content=b"\x89PNG", headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    assert r.json() == {"path": "acme/IN2"}


# ------------------------------------------------------------------ events


def poll_events(fn: EdgeFunction, worker: str | None, wait: float, cursor: str | None = None) -> tuple[dict, float]:
    params: dict[str, Any] = {"wait": wait}
    if cursor is not None:
        params["cursor"] = cursor
    started = time.monotonic()
    r = fn.request("GET", "events", params=params, headers={"X-Worker-Id": worker} if worker else None,
                   timeout=wait + 15)
    assert r.status_code == 200, r.text
    return r.json(), time.monotonic() - started


def in_background(call):
    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(call)
    pool.shutdown(wait=False)
    return future


@deno
def test_events_idle_poll_returns_after_wait(fn: EdgeFunction, wa_db: WaDb) -> None:
    wa_db.insert_instance("acme", "CONNECTED")
    lease(fn, "w-a")
    body, took = poll_events(fn, "w-a", 1)
    assert body["events"] == [] and 0.9 <= took < 4
    again, took = poll_events(fn, "w-a", 1, body["cursor"])
    assert again["events"] == [] and 0.9 <= took < 4
    # the wait is capped (WORKER_EVENTS_MAX_WAIT_SECONDS), never beyond the edge runtime's limit
    _, took = poll_events(fn, "w-a", 30, again["cursor"])
    assert MAX_WAIT - 0.2 <= took < MAX_WAIT + 4
    for bad in ({"wait": "x"}, {"wait": -1}, {"cursor": "garbage"}, {"cursor": "1.2"}):
        assert fn.request("GET", "events", params={"wait": 0, **bad}).status_code == 400, bad
    assert fn.request("POST", "events").status_code == 405


@deno
def test_events_return_early_on_a_queued_row_of_the_workers_instance(fn: EdgeFunction, wa_db: WaDb) -> None:
    wa_db.insert_instance("acme", "CONNECTED")
    wa_db.insert_instance("other", "CONNECTED")
    lease(fn, "w-a", capacity=1)
    assert wa_db.instance("acme")["lease_worker"] == "w-a"
    start, _ = poll_events(fn, "w-a", 0)
    # a row for an instance w-a does not hold does not wake it
    waiting = in_background(lambda: poll_events(fn, "w-a", 3, start["cursor"]))
    time.sleep(0.5)
    wa_db.insert_outbound("other", "5511999990001", "not yours")
    body, took = waiting.result(timeout=20)
    assert body["events"] == [] and took >= 2.8
    waiting = in_background(lambda: poll_events(fn, "w-a", 10, body["cursor"]))
    time.sleep(0.5)
    wa_db.insert_outbound("acme", "5511999990001", "yours")
    body, took = waiting.result(timeout=20)
    assert body["events"] == [{"type": "queued", "instanceId": "acme"}] and took < 5
    # without X-Worker-Id (no leases): every instance's rows
    waiting = in_background(lambda: poll_events(fn, None, 10, body["cursor"]))
    time.sleep(0.5)
    wa_db.insert_outbound("other", "5511999990001", "anyone's")
    body, took = waiting.result(timeout=20)
    assert {"type": "queued", "instanceId": "other"} in body["events"] and took < 5


@deno
def test_events_return_early_on_a_lease_change(fn: EdgeFunction, wa_db: WaDb) -> None:
    wa_db.insert_instance("acme", "CONNECTED")
    b = lease(fn, "w-b")
    start, _ = poll_events(fn, "w-a", 0)
    waiting = in_background(lambda: poll_events(fn, "w-a", 10, start["cursor"]))
    time.sleep(0.5)
    lease(fn, "w-b", release=held(b), held=[])  # w-b leaves: w-a should take over now
    body, took = waiting.result(timeout=20)
    assert body["events"] == [{"type": "leases"}] and took < 5
    # a new instance needs a worker: a lease change too
    waiting = in_background(lambda: poll_events(fn, "w-a", 10, body["cursor"]))
    time.sleep(0.5)
    wa_db.insert_instance("newcomer")
    body, took = waiting.result(timeout=20)
    assert body["events"] == [{"type": "leases"}] and took < 5
    # a plain renewal is not a change (else every renewal would wake every worker)
    a = lease(fn, "w-a")
    waiting = in_background(lambda: poll_events(fn, "w-a", 2, body["cursor"]))
    time.sleep(0.3)
    lease(fn, "w-a", held=held(a))
    body, took = waiting.result(timeout=20)
    assert body["events"] == [] and took >= 1.8


@deno
def test_events_between_polls_are_not_missed(fn: EdgeFunction, wa_db: WaDb, pg_server: PgServer) -> None:
    wa_db.insert_instance("acme", "CONNECTED")
    lease(fn, "w-a")
    first, _ = poll_events(fn, "w-a", 1)
    wa_db.insert_outbound("acme", "5511999990001", "while nobody listened")
    second, took = poll_events(fn, "w-a", 10, first["cursor"])
    assert second["events"] == [{"type": "queued", "instanceId": "acme"}] and took < 3
    third, took = poll_events(fn, "w-a", 1, second["cursor"])
    assert third["events"] == [] and took >= 0.9  # reported once
    # a row inserted by a transaction still open during a poll, committed after it (its seq and
    # xid are older than rows the poll saw): found by the next poll all the same
    with held_row_lock(pg_server, wa_db.dbname, "insert into wa_outbound (instance_id, \"to\", body) "
                       "values ('acme', '5511999990001', 'slow transaction')") as slow:
        wa_db.insert_outbound("acme", "5511999990002", "fast")
        fourth, _ = poll_events(fn, "w-a", 0, third["cursor"])
        assert fourth["events"] == [{"type": "queued", "instanceId": "acme"}]
        wa_db.psql("update wa_outbound set status = 'sending' where body = 'fast'")
        fifth, _ = poll_events(fn, "w-a", 0, fourth["cursor"])
        assert fifth["events"] == []
        slow.finish("commit")
    sixth, took = poll_events(fn, "w-a", 5, fifth["cursor"])
    assert sixth["events"] == [{"type": "queued", "instanceId": "acme"}] and took < 3
    # a lease change between polls, too
    wa_db.insert_instance("another")
    seventh, took = poll_events(fn, "w-a", 5, sixth["cursor"])
    assert {"type": "leases"} in seventh["events"] and took < 3


@deno
def test_events_without_notifications_still_answer(wa_db: WaDb) -> None:
    """LISTEN impossible (here: nothing listens on its port; on Supabase: a transaction-mode
    pooler): polls still find the rows, by reading the tables again every few seconds."""
    wa_db.reset()
    wa_db.insert_instance("acme", "CONNECTED")
    deaf = EdgeFunction(wa_db.dsn, extra_env={"WORKER_PROXY_LISTEN_DB_URL": "postgresql://postgres@127.0.0.1:1/none"})
    deaf.start()
    try:
        lease(deaf, "w-a")
        start, _ = poll_events(deaf, "w-a", 0)
        waiting = in_background(lambda: poll_events(deaf, "w-a", 20, start["cursor"]))
        time.sleep(0.5)
        wa_db.insert_outbound("acme", "5511999990001", "found without a notification")
        body, took = waiting.result(timeout=40)
        assert body["events"] == [{"type": "queued", "instanceId": "acme"}] and 1 < took < 8
        assert "LISTEN failed" in deaf.log_tail()
    finally:
        deaf.stop()


@deno
def test_handoff_on_sigterm_through_events(fn: EdgeFunction, wa_db: WaDb) -> None:
    """Two workers as HTTP clients: w-b waits on /events, w-a stops (SIGTERM: one last call
    releasing everything); w-b is woken, takes the instance with a new token and gets w-a's
    unacknowledged claim again as a prior claim, while w-a's late writes are fenced."""
    wa_db.insert_instance("acme", "CONNECTED")
    a = lease(fn, "w-a")
    assert lease(fn, "w-b")["leases"] == []
    unacked = wa_db.insert_outbound("acme", "5511999990001", "claimed by w-a before it stopped")
    fn.request("GET", "queued-messages", headers={"X-Worker-Id": "w-a"})
    start, _ = poll_events(fn, "w-b", 0)
    waiting = in_background(lambda: poll_events(fn, "w-b", 20, start["cursor"]))
    time.sleep(0.5)
    began = time.monotonic()
    assert lease(fn, "w-a", held=[], release=held(a))["leases"] == []
    body, _ = waiting.result(timeout=30)
    assert body["events"] == [{"type": "leases"}]
    b = lease(fn, "w-b")
    handoff = time.monotonic() - began
    assert held(b) == [{"instanceId": "acme", "token": 2}] and handoff < 3
    r = fn.request("GET", "queued-messages", headers={"X-Worker-Id": "w-b"})
    assert [(m["id"], m["lease_token"], m.get("prior_claim")) for m in r.json()["messages"]] == [(unacked, 2, True)]
    r = fn.request("POST", "update-status", json={"instanceId": "acme", "status": "DISCONNECTED", "lease_token": 1})
    assert r.status_code == 409
    assert fn.request("GET", "queued-messages", headers={"X-Worker-Id": "w-a"}).json()["messages"] == []


def test_a_worker_restarted_with_its_id_gets_its_leases_back_at_once(fn: EdgeFunction, wa_db: WaDb) -> None:
    """A worker that crashed and came back with the same WORKER_ID (it is remembered in its journal)
    does not know its leases: a call that does not list them gives them back at once, under a new
    token (the old process's writes are fenced); another worker still waits for the expiry."""
    for i in range(3):
        wa_db.insert_instance(f"i{i}")
    first = lease(fn, "w-a")
    assert ids(first) == {"i0", "i1", "i2"}
    again = lease(fn, "w-a")  # the restarted process: held [], release []
    assert ids(again) == {"i0", "i1", "i2"}
    assert all(token_of(again, i) == token_of(first, i) + 1 for i in ("i0", "i1", "i2"))
    assert ids(lease(fn, "w-b")) == set()  # held by w-a, unexpired: another worker waits
    # a listed lease with a wrong token is still lost, not given back
    wrong = [dict(i, token=i["token"] + 5) if i["instanceId"] == "i0" else i for i in held(again)]
    assert ids(lease(fn, "w-a", held=wrong)) == {"i1", "i2"}


# ------------------------------------------------------------------ lease holder (the direct API's 307)


@deno
def test_lease_holder_names_the_live_holder_and_its_api_url(fn: EdgeFunction, wa_db: WaDb) -> None:
    wa_db.insert_instance("acme", priority=2)
    wa_db.insert_instance("beta", priority=1)

    def holder(iid: str) -> Any:
        return fn.request("GET", "lease-holder", params={"instanceId": iid})

    r = holder("acme")
    assert r.status_code == 404 and r.json() == {"error": "no holder"}
    r = fn.request("POST", "leases", json={"worker_id": "w-a", "capacity": 1, "held": [], "release": [],
                                           "api_url": "http://10.0.0.5:3000/"})
    assert r.status_code == 200 and ids(r.json()) == {"acme"}
    a_token = token_of(r.json(), "acme")
    assert holder("acme").json() == {"instanceId": "acme", "worker_id": "w-a", "api_url": "http://10.0.0.5:3000"}
    b = lease(fn, "w-b", capacity=1)  # no api_url
    assert holder("beta").json() == {"instanceId": "beta", "worker_id": "w-b", "api_url": None}
    # a renewal without the field forgets it; with it again, remembered again
    lease(fn, "w-a", capacity=1, held=[{"instanceId": "acme", "token": a_token}])
    assert holder("acme").json()["api_url"] is None
    r = fn.request("POST", "leases", json={"worker_id": "w-a", "capacity": 1, "release": [],
                                           "held": [{"instanceId": "acme", "token": a_token}],
                                           "api_url": "https://w-a.internal"})
    assert r.status_code == 200 and holder("acme").json()["api_url"] == "https://w-a.internal"
    # released, revoked or expired → no holder
    lease(fn, "w-b", capacity=0, release=held(b))
    assert holder("beta").status_code == 404
    expire(wa_db, "acme", 1)
    assert holder("acme").status_code == 404
    wa_db.psql("update wa_instances set lease_expires_at = now() + interval '1 minute', lease_revoked = true "
               "where id = 'acme'")
    assert holder("acme").status_code == 404
    # bad input is a 400 (nothing stored); the route is bearer-authenticated like every other
    assert fn.request("GET", "lease-holder").status_code == 400
    assert fn.request("GET", "lease-holder", params={"instanceId": "../x"}).status_code == 400
    for bad in ("ftp://x", "http://u:p@x", "http://x/?q=1", "http://x/#f", "not a url", 5, "http://" + "x" * 600):
        r = fn.request("POST", "leases", json={"worker_id": "w-c", "capacity": 1, "held": [], "release": [],
                                               "api_url": bad})
        assert r.status_code == 400 and "api_url" in r.json()["error"], (bad, r.text)
    assert wa_db.scalar("select count(*) from wa_workers where id = 'w-c'") == 0
    assert fn.request("GET", "lease-holder", params={"instanceId": "acme"},
                      secret="wrong-secret").status_code == 401
    # the column is in the leases migration (idempotent: applying it again keeps the value)
    wa_db.psql(LEASES_MIGRATION.read_text())
    assert wa_db.scalar("select api_url from wa_workers where id = 'w-a'") == "https://w-a.internal"


# ------------------------------------------------------------------ the hand-back of unsent claims


def lease_raw(fn: EdgeFunction, worker: str, *, capacity: int = 500, held: list | None = None,
              release: list | None = None) -> dict[str, Any]:
    r = fn.request("POST", "leases", json={"worker_id": worker, "capacity": capacity,
                                           "held": held or [], "release": release or []})
    assert r.status_code == 200, r.text
    return r.json()


def claim_ids(fn: EdgeFunction, instance: str, token: int) -> list[tuple[str, int, bool | None]]:
    r = fn.request("GET", "queued-messages", params={"instanceId": instance, "lease_token": token})
    assert r.status_code == 200, r.text
    return [(m["id"], m["lease_token"], m.get("prior_claim")) for m in r.json()["messages"]]


@deno
def test_released_unsent_claims_go_back_to_queued_and_the_next_claim_is_clean(fn: EdgeFunction, wa_db: WaDb) -> None:
    wa_db.insert_instance("acme", "CONNECTED", priority=1)
    wa_db.insert_instance("beta", "CONNECTED")
    lease(fn, "w-a")
    one = wa_db.insert_outbound("acme", "5511999990001", "one", created_ago_s=3)
    two = wa_db.insert_outbound("acme", "5511999990001", "two", created_ago_s=2)
    other = wa_db.insert_outbound("beta", "5511999990001", "beta's")
    assert [c[0] for c in claim_ids(fn, "acme", 1)] == [one, two]
    assert [c[0] for c in claim_ids(fn, "beta", 1)] == [other]
    # w-a leaves: one never begun (handed back), two in flight (not listed); an unknown id, a non-uuid
    # and another instance's claim are ignored and counted
    answer = lease_raw(fn, "w-a", capacity=0, release=[
        {"instanceId": "acme", "token": 1, "unsent": [one, str(uuid.uuid4()), "not-a-uuid", other]},
        {"instanceId": "beta", "token": 1}])
    assert answer["leases"] == [] and answer["requeued"] == [one] and answer["unsent_ignored"] == 3
    row = wa_db.outbound(one)
    assert (row["status"], row["claim_token"], row["claimed_at"]) == ("queued", None, None)
    assert wa_db.outbound(other)["status"] == "sending" and wa_db.outbound(other)["claim_token"] == 1
    assert wa_db.instance("acme")["lease_released"] is True
    # the next holder: one clean, two (still w-a's claim) with prior_claim
    assert token_of(lease(fn, "w-b"), "acme") == 2
    assert claim_ids(fn, "acme", 2) == [(one, 2, None), (two, 2, True)]
    # a call without unsent answers as before
    assert set(lease_raw(fn, "w-b", held=[{"instanceId": "acme", "token": 2}])) == {"ttl_s", "leases"}


@deno
def test_a_stale_or_foreign_hand_back_is_ignored(fn: EdgeFunction, wa_db: WaDb) -> None:
    wa_db.insert_instance("acme", "CONNECTED")
    lease(fn, "w-a")
    mid = wa_db.insert_outbound("acme", "5511999990001", "w-a's claim")
    assert [c[0] for c in claim_ids(fn, "acme", 1)] == [mid]
    expire(wa_db, "acme", TTL + 1)
    assert token_of(lease(fn, "w-b"), "acme") == 2
    # w-a back from a pause: its lease moved, its hand-back under token 1 is ignored
    stale = lease_raw(fn, "w-a", release=[{"instanceId": "acme", "token": 1, "unsent": [mid]}])
    assert stale["requeued"] == [] and stale["unsent_ignored"] == 1
    # another worker naming the holder's token hands back nothing either
    foreign = lease_raw(fn, "w-c", held=[{"instanceId": "acme", "token": 2, "unsent": [mid]}])
    assert foreign["requeued"] == [] and foreign["unsent_ignored"] == 1
    assert wa_db.outbound(mid)["status"] == "sending" and wa_db.outbound(mid)["claim_token"] == 1
    assert claim_ids(fn, "acme", 2) == [(mid, 2, True)]  # still w-a's claim: a prior_claim
    # w-b's own claim is not w-a's to hand back under any token
    stale = lease_raw(fn, "w-a", release=[{"instanceId": "acme", "token": 2, "unsent": [mid]}])
    assert stale["requeued"] == [] and wa_db.outbound(mid)["claim_token"] == 2
    # malformed lists are a 400
    for bad in ("x", [1], [""], ["m"] * 1001):
        r = fn.request("POST", "leases", json={"worker_id": "w-a", "capacity": 1,
                                               "release": [{"instanceId": "acme", "token": 1, "unsent": bad}]})
        assert r.status_code == 400 and "unsent" in r.json()["error"], r.text


@deno
def test_a_held_item_hands_claims_back_under_the_same_token(fn: EdgeFunction, wa_db: WaDb) -> None:
    """Self-fencing: the runner stopped, the lease is still held; its claims come back at once, not
    after CLAIM_LEASE_SECONDS, and the renewal is unchanged."""
    wa_db.insert_instance("acme", "CONNECTED")
    lease(fn, "w-a")
    mid = wa_db.insert_outbound("acme", "5511999990001", "claimed, never begun")
    assert [c[0] for c in claim_ids(fn, "acme", 1)] == [mid]
    assert claim_ids(fn, "acme", 1) == []
    answer = lease_raw(fn, "w-a", held=[{"instanceId": "acme", "token": 1, "unsent": [mid]}])
    assert held(answer) == [{"instanceId": "acme", "token": 1}] and answer["requeued"] == [mid]
    assert claim_ids(fn, "acme", 1) == [(mid, 1, None)]


def test_the_hand_back_function_alone_checks_the_token_and_the_holder(wa_db: WaDb, clean_wa_db: WaDb) -> None:
    """wa_lease_hand_back on its own (SQL): the caller's current, unreleased token only."""
    wa_db.insert_instance("acme", "CONNECTED", lease_worker="w-a", lease_token=4)
    mine = wa_db.insert_outbound("acme", "5511999990001", "mine", status="sending", claim_token=4)
    older = wa_db.insert_outbound("acme", "5511999990001", "older", status="sending", claim_token=3)

    def hand_back(worker: str, token: int, unsent: list[str]) -> list[str]:
        items = json.dumps([{"instanceId": "acme", "token": token, "unsent": unsent}])
        return [r["message_id"] for r in wa_db.query(
            f"select message_id from public.wa_lease_hand_back({sql_literal(worker)}, {sql_literal(items)}::jsonb)")]

    assert hand_back("w-b", 4, [mine]) == []
    assert hand_back("w-a", 3, [older]) == []
    assert hand_back("w-a", 4, [older, "not-a-uuid", "x'; select 1; --"]) == []
    wa_db.psql("update wa_instances set lease_released = true where id = 'acme'")
    assert hand_back("w-a", 4, [mine]) == []
    wa_db.psql("update wa_instances set lease_released = false where id = 'acme'")
    assert hand_back("w-a", 4, [mine]) == [mine]
    assert wa_db.outbound(mine)["status"] == "queued" and wa_db.outbound(older)["status"] == "sending"
