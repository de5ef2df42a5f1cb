"""The Supabase kit: migration, worker-proxy edge function, wake-up snippet.

Runs a real PostgreSQL 15 and the real function under Deno (npm package),
see tests/pg_helpers.py for the fixtures.
"""

from __future__ import annotations

import concurrent.futures
import threading
import uuid

import pytest

try:  # tests/ as a plain directory (default) or as a package
    from pg_helpers import (  # noqa: F401  (fixtures are used by name)
        SUPABASE_DIR, EdgeFunction, PgServer, WaDb, clean_wa_db, edge_function,
        ensure_deno_toolchain, deno_env, migration_files, pg_server, stage_function, wa_db,
    )
except ImportError:  # pragma: no cover
    from tests.pg_helpers import (  # type: ignore[no-redef]  # noqa: F401
        SUPABASE_DIR, EdgeFunction, PgServer, WaDb, clean_wa_db, edge_function,
        ensure_deno_toolchain, deno_env, migration_files, pg_server, stage_function, wa_db,
    )

pytestmark = [pytest.mark.postgres, pytest.mark.slow]
deno = pytest.mark.deno

MIGRATION = SUPABASE_DIR / "migrations" / "20261123000000_wa_worker.sql"
WAKE_SNIPPET = SUPABASE_DIR / "snippets" / "wake_worker_webhook.sql"


# ------------------------------------------------------------------ schema


@pytest.fixture
def fresh_db(pg_server: PgServer):
    name = f"wa_fresh_{uuid.uuid4().hex[:10]}"
    pg_server.create_database(name)
    yield WaDb(pg_server, name)
    pg_server.psql(f"drop database if exists {name} with (force);")


def test_first_migration_applies_twice(fresh_db: WaDb) -> None:
    assert migration_files()[0] == MIGRATION  # later ones: tests/test_supabase_media.py
    fresh_db.psql(MIGRATION.read_text())
    fresh_db.insert_instance("keep-me", "CONNECTED", 3)
    fresh_db.psql(MIGRATION.read_text())  # idempotent, keeps data
    assert fresh_db.instance("keep-me")["priority"] == 3
    tables = fresh_db.query("select tablename from pg_tables where schemaname = 'public' order by 1")
    assert [t["tablename"] for t in tables] == ["wa_inbound", "wa_instances", "wa_outbound"]
    constraints = {r["conname"] for r in fresh_db.query(
        "select conname from pg_constraint where conrelid::regclass::text like 'wa_%'")}
    assert {"wa_instances_id_format", "wa_instances_status_check", "wa_outbound_status_check",
            "wa_outbound_instance_id_fkey", "wa_inbound_instance_id_fkey",
            "wa_inbound_instance_message_key"} <= constraints
    # each DO block added its constraint once
    assert fresh_db.scalar("select count(*) from pg_constraint where conname = 'wa_inbound_instance_message_key'") == 1


def test_rls_enabled_without_policies(wa_db: WaDb) -> None:
    rows = wa_db.query("select relname, relrowsecurity, relforcerowsecurity from pg_class "
                       "where relname in ('wa_instances', 'wa_outbound', 'wa_inbound') order by relname")
    assert [(r["relname"], r["relrowsecurity"]) for r in rows] == [
        ("wa_inbound", True), ("wa_instances", True), ("wa_outbound", True)]
    assert wa_db.scalar("select count(*) from pg_policies where tablename like 'wa\\_%'") == 0


def test_indexes_for_worker_queries(wa_db: WaDb) -> None:
    idx = {r["indexname"]: r["indexdef"] for r in wa_db.query(
        "select indexname, indexdef from pg_indexes where tablename like 'wa\\_%'")}
    assert "WHERE (status = ANY" in idx["wa_outbound_claimable_idx"]
    assert "(instance_id, created_at, seq)" in idx["wa_outbound_claimable_idx"]
    assert "(status, priority DESC, id)" in idx["wa_instances_status_priority_idx"]
    assert "UNIQUE" in idx["wa_inbound_instance_message_key"]


def test_constraints_reject_bad_rows(clean_wa_db: WaDb) -> None:
    db = clean_wa_db
    for bad_id in ("-leading-dash", "has space", "a" * 129, "ünicode", "../x", ""):
        result = db.psql(f"insert into wa_instances (id) values ('{bad_id}')", check=False)
        assert result.returncode != 0 and "wa_instances_id_format" in result.stderr, bad_id
    db.insert_instance("a" * 128)
    result = db.psql("insert into wa_instances (id, status) values ('x', 'ONLINE')", check=False)
    assert "wa_instances_status_check" in result.stderr
    db.insert_instance("acme")
    result = db.psql("insert into wa_outbound (instance_id, \"to\", body, status) values ('acme', '1', 'b', 'done')",
                     check=False)
    assert "wa_outbound_status_check" in result.stderr
    result = db.psql("insert into wa_outbound (instance_id, \"to\", body) values ('ghost', '1', 'b')", check=False)
    assert "wa_outbound_instance_id_fkey" in result.stderr


def test_outbound_defaults_and_inbound_uniqueness(clean_wa_db: WaDb) -> None:
    db = clean_wa_db
    db.insert_instance("acme")
    mid = db.insert_outbound("acme", "5511999990000", "Olá!")
    row = db.outbound(mid)
    assert uuid.UUID(row["id"]) and row["status"] == "queued" and row["attempts"] == 0
    assert row["claimed_at"] is None and row["sent_at"] is None
    insert = ("insert into wa_inbound (instance_id, wa_message_id, \"from\", body) "
              "values ('acme', 'WA1', '1@s.whatsapp.net', 'oi')")
    db.psql(insert)
    result = db.psql(insert, check=False)
    assert result.returncode != 0 and "wa_inbound_instance_message_key" in result.stderr
    db.psql(insert + " on conflict (instance_id, wa_message_id) do nothing")
    assert len(db.inbound_rows("acme")) == 1
    db.psql("delete from wa_instances where id = 'acme'")  # cascades
    assert db.outbound_rows() == [] and db.inbound_rows() == []


def test_updated_at_triggers(clean_wa_db: WaDb) -> None:
    db = clean_wa_db
    old = "2001-01-01T00:00:00+00:00"
    db.insert_instance("acme", created_at=old, updated_at=old)
    mid = db.insert_outbound("acme", "123456", "hi", created_at=old, updated_at=old)
    db.psql("update wa_instances set priority = 1 where id = 'acme'; "
            f"update wa_outbound set attempts = 1 where id = '{mid}';")
    for row in (db.instance("acme"), db.outbound(mid)):
        assert row["updated_at"] > row["created_at"]
        assert row["created_at"].startswith("2001-01-01")
    assert db.scalar("select count(*) from pg_trigger where tgname like 'wa\\_%set_updated_at'") == 2


def test_wake_snippet_posts_one_call_per_instance(fresh_db: WaDb) -> None:
    """The optional webhook snippet against stand-ins for pg_net and Vault."""
    db = fresh_db
    db.psql(MIGRATION.read_text())
    db.psql("""
        create schema vault;
        create table vault.decrypted_secrets (name text primary key, decrypted_secret text);
        create schema net;
        create table net.calls (n serial, url text, body jsonb, headers jsonb);
        create function net.http_post(url text, body jsonb default '{}', params jsonb default '{}',
                                      headers jsonb default '{}', timeout_milliseconds int default 2000)
        returns bigint language sql as
        $$ insert into net.calls (url, body, headers) values (url, body, headers) returning n::bigint $$;
    """)
    db.psql(WAKE_SNIPPET.read_text())
    db.psql(WAKE_SNIPPET.read_text())  # re-runnable
    db.insert_instance("acme")
    db.insert_instance("beta")
    # secrets missing: the insert still succeeds, nothing is called
    db.insert_outbound("acme", "123456", "before secrets")
    assert db.scalar("select count(*) from net.calls") == 0
    db.psql("insert into vault.decrypted_secrets values ('wa_worker_wake_url', 'http://worker:3000/wake'), "
            "('wa_worker_secret', 's3cr3t')")
    db.psql("insert into wa_outbound (instance_id, \"to\", body) values "
            "('acme', '1', 'a'), ('acme', '1', 'b'), ('beta', '1', 'c')")
    calls = db.query("select url, body, headers from net.calls order by n")
    assert [c["body"] for c in calls] == [{"instanceId": "acme"}, {"instanceId": "beta"}]
    assert all(c["url"] == "http://worker:3000/wake" for c in calls)
    assert calls[0]["headers"]["Authorization"] == "Bearer s3cr3t"
    # a failing http_post never fails the SaaS's insert
    db.psql("create or replace function net.http_post(url text, body jsonb default '{}', params jsonb default '{}',"
            " headers jsonb default '{}', timeout_milliseconds int default 2000) returns bigint"
            " language plpgsql as $$ begin raise exception 'boom'; end $$;")
    db.insert_outbound("beta", "1", "still queued")
    assert len(db.outbound_rows("beta")) == 2


# ------------------------------------------------------------ edge function


@pytest.fixture
def fn(edge_function: EdgeFunction, clean_wa_db: WaDb) -> EdgeFunction:
    return edge_function


def ids(response) -> list[str]:
    assert response.status_code == 200, response.text
    return [m["id"] for m in response.json()["messages"]]


@deno
def test_bearer_secret_required(fn: EdgeFunction) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {fn.secret}"},
                    {"Authorization": f"Bearer {fn.secret}x"}, {"Authorization": f"Bearer {fn.secret[:-1]}"},
                    {"Authorization": "Bearer"}):
        import httpx

        r = httpx.get(f"{fn.base_url}/disconnected-instances", headers=headers, timeout=10)
        assert r.status_code == 401, headers
        assert r.json() == {"error": "unauthorized"}
    # unknown endpoints do not leak either
    assert fn.request("GET", "nope", secret="wrong").status_code == 401
    assert fn.request("POST", "inbound", secret="-", json={}).status_code == 401
    r = fn.request("GET", "disconnected-instances", headers={"Authorization": f"bearer   {fn.secret}"})
    assert r.status_code == 200


@deno
def test_both_url_forms_and_unknown_routes(fn: EdgeFunction, wa_db: WaDb) -> None:
    import httpx

    wa_db.insert_instance("acme")
    for prefix in ("/functions/v1/worker-proxy", "/worker-proxy", ""):
        r = httpx.get(f"{fn.origin}{prefix}/disconnected-instances/", headers=fn.headers(), timeout=10)
        assert r.status_code == 200 and r.json() == {"instances": [{"id": "acme", "priority": 0}]}, prefix
    assert fn.request("GET", "nope").status_code == 404
    r = fn.request("GET", "mark-sent")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert fn.request("POST", "disconnected-instances", json={}).status_code == 405


BAD_REQUESTS = [
    ("POST", "update-status", "not json", 400),
    ("POST", "update-status", [1, 2], 400),
    ("POST", "update-status", {"status": "CONNECTED"}, 400),
    ("POST", "update-status", {"instanceId": "../etc", "status": "CONNECTED"}, 400),
    ("POST", "update-status", {"instanceId": "-x", "status": "CONNECTED"}, 400),
    ("POST", "update-status", {"instanceId": "a" * 129, "status": "CONNECTED"}, 400),
    ("POST", "update-status", {"instanceId": 42, "status": "CONNECTED"}, 400),
    ("POST", "update-status", {"instanceId": "acme", "status": "ONLINE"}, 400),
    ("POST", "update-status", {"instanceId": "acme"}, 400),
    ("POST", "update-status", {"instanceId": "acme", "status": "CONNECTED", "qr_code": 5}, 400),
    ("GET", "queued-messages?instanceId=bad%20id", None, 400),
    ("GET", "queued-messages?instanceId=", None, 400),
    ("GET", "queued-messages?instanceId=acme&limit=0", None, 400),
    ("GET", "queued-messages?instanceId=acme&limit=x", None, 400),
    ("POST", "mark-sent", {}, 400),
    ("POST", "mark-sent", {"messageId": "m-1", "wa_message_id": "X"}, 400),
    ("POST", "mark-sent", {"messageId": str(uuid.uuid4()), "wa_message_id": 7}, 400),
    ("POST", "mark-failed", {"error": "x"}, 400),
    ("POST", "mark-failed", {"messageId": str(uuid.uuid4()), "error": ["x"]}, 400),
    ("POST", "inbound", {"instanceId": "acme", "from": "1@s.whatsapp.net", "body": "oi"}, 400),
    ("POST", "inbound", {"instanceId": "acme", "wa_message_id": "W", "body": "oi"}, 400),
    ("POST", "inbound", {"instanceId": "acme", "wa_message_id": "W", "from": "1@s.whatsapp.net"}, 400),
    ("POST", "inbound", {"instanceId": "a/b", "wa_message_id": "W", "from": "f", "body": "oi"}, 400),
    ("POST", "inbound", {"instanceId": "acme", "wa_message_id": "W", "from": "f", "body": "oi", "from_me": "no"}, 400),
    ("POST", "inbound", {"instanceId": "acme", "wa_message_id": "W", "from": "f", "body": "oi", "timestamp": "x"}, 400),
    ("POST", "inbound", {"instanceId": "acme", "wa_message_id": "W", "from": "f", "body": "x" * 70_000}, 400),
]


@deno
def test_bad_input_is_4xx(fn: EdgeFunction, wa_db: WaDb) -> None:
    wa_db.insert_instance("acme")
    mid = wa_db.insert_outbound("acme", "123456", "hi")
    for method, endpoint, body, expected in BAD_REQUESTS:
        if isinstance(body, str):
            r = fn.request(method, endpoint, content=body, headers={"Content-Type": "application/json"})
        else:
            r = fn.request(method, endpoint, json=body)
        assert r.status_code == expected, (method, endpoint, body, r.status_code, r.text)
        assert "error" in r.json()
    # nothing was changed by the rejected calls
    assert wa_db.instance("acme")["status"] == "DISCONNECTED"
    assert wa_db.outbound(mid)["status"] == "queued"
    assert wa_db.inbound_rows() == []


@deno
def test_unknown_instance_is_404(fn: EdgeFunction) -> None:
    r = fn.request("POST", "update-status", json={"instanceId": "ghost", "status": "CONNECTED", "qr_code": None})
    assert r.status_code == 404
    assert fn.request("GET", "queued-messages", params={"instanceId": "ghost"}).status_code == 404
    r = fn.request("POST", "inbound", json={"instanceId": "ghost", "wa_message_id": "W1",
                                            "from": "1@s.whatsapp.net", "body": "oi"})
    assert r.status_code == 404


@deno
def test_disconnected_instances_by_priority(fn: EdgeFunction, wa_db: WaDb) -> None:
    wa_db.insert_instance("low", "DISCONNECTED", 0)
    wa_db.insert_instance("high", "CONNECTING", 10)
    wa_db.insert_instance("mid", "DISCONNECTED", 5)
    wa_db.insert_instance("online", "CONNECTED", 99)
    wa_db.insert_instance("neg", "DISCONNECTED", -1)
    r = fn.request("GET", "disconnected-instances")
    assert r.status_code == 200
    assert r.json() == {"instances": [{"id": "high", "priority": 10}, {"id": "mid", "priority": 5},
                                      {"id": "low", "priority": 0}, {"id": "neg", "priority": -1}]}


@deno
def test_update_status_lifecycle(fn: EdgeFunction, wa_db: WaDb) -> None:
    wa_db.insert_instance("acme", last_reason="network")
    before = wa_db.instance("acme")["updated_at"]
    qr = "data:image/png;base64,iVBORw0KGgo" + "A" * 5000

    def post(**body):
        r = fn.request("POST", "update-status", json={"instanceId": "acme", **body})
        assert r.status_code == 200, r.text
        return wa_db.instance("acme")

    row = post(status="CONNECTING", qr_code=qr)
    assert (row["status"], row["qr_code"], row["last_reason"]) == ("CONNECTING", qr, "network")
    assert row["updated_at"] > before
    row = post(status="CONNECTING")  # no qr_code key: QR kept while connecting
    assert row["qr_code"] == qr
    row = post(status="CONNECTED", qr_code=None, phone_number="5511999990000")
    assert (row["status"], row["qr_code"], row["phone_number"]) == ("CONNECTED", None, "5511999990000")
    row = post(status="DISCONNECTED", qr_code=None, reason="logged_out")
    assert (row["status"], row["last_reason"], row["phone_number"]) == ("DISCONNECTED", "logged_out", "5511999990000")
    row = post(status="CONNECTING", qr_code=qr)
    row = post(status="DISCONNECTED")  # no qr_code key and not connecting: QR cleared
    assert row["qr_code"] is None and row["last_reason"] == "logged_out"


@deno
def test_queued_messages_claimed_oldest_first(fn: EdgeFunction, wa_db: WaDb) -> None:
    wa_db.insert_instance("acme", "CONNECTED")
    wa_db.insert_instance("other", "CONNECTED")
    third = wa_db.insert_outbound("acme", "5511999990000@s.whatsapp.net", "third", created_ago_s=10)
    first = wa_db.insert_outbound("acme", "+55 11 99999-0000", "Olá!", created_ago_s=30)
    second = wa_db.insert_outbound("acme", "5511999990000", "second", created_ago_s=20)
    wa_db.insert_outbound("acme", "1", "done", status="sent")
    wa_db.insert_outbound("acme", "1", "bad", status="failed")
    wa_db.insert_outbound("other", "1", "not yours")
    wa_db.psql("insert into wa_outbound (instance_id, \"to\", body) "
               "select 'acme', '1', 'same-tx-' || g from generate_series(1, 3) g")

    r = fn.request("GET", "queued-messages", params={"instanceId": "acme", "limit": 2})
    assert r.status_code == 200
    assert r.json()["messages"] == [
        {"id": first, "instanceId": "acme", "to": "+55 11 99999-0000", "body": "Olá!"},
        {"id": second, "instanceId": "acme", "to": "5511999990000", "body": "second"}]
    r = fn.request("GET", "queued-messages", params={"instanceId": "acme"})
    assert [m["body"] for m in r.json()["messages"]] == ["third", "same-tx-1", "same-tx-2", "same-tx-3"]
    assert ids(r)[0] == third
    row = wa_db.outbound(first)
    assert row["status"] == "sending" and row["attempts"] == 1 and row["claimed_at"] is not None
    # claimed rows are not handed out again within the lease
    assert ids(fn.request("GET", "queued-messages", params={"instanceId": "acme"})) == []
    assert [m["body"] for m in fn.request("GET", "queued-messages?instanceId=other").json()["messages"]] == ["not yours"]


@deno
def test_concurrent_polls_never_share_a_message(fn: EdgeFunction, wa_db: WaDb) -> None:
    wa_db.insert_instance("acme", "CONNECTED")
    wa_db.psql("insert into wa_outbound (instance_id, \"to\", body, created_at) "
               "select 'acme', '123456', 'm' || g, now() - make_interval(secs => 1000 - g) "
               "from generate_series(1, 60) g")
    barrier = threading.Barrier(6)

    def poll(batch: bool) -> list[str]:
        barrier.wait()
        got: list[str] = []
        while True:
            params = {"limit": 4} if batch else {"instanceId": "acme", "limit": 4}
            page = ids(fn.request("GET", "queued-messages", params=params))
            if not page:
                return got
            got += page

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(poll, [False, False, False, False, True, True]))
    everything = [m for r in results for m in r]
    assert len(everything) == len(set(everything)) == 60
    assert sum(1 for r in results if r) >= 2  # they really ran side by side
    assert {r["attempts"] for r in wa_db.outbound_rows()} == {1}


@deno
def test_claim_skips_rows_locked_by_another_claimer(fn: EdgeFunction, wa_db: WaDb) -> None:
    """A row being claimed in another transaction is skipped, not waited for nor taken twice."""
    import subprocess
    import time

    wa_db.insert_instance("acme", "CONNECTED")
    locked = wa_db.insert_outbound("acme", "123456", "locked", created_ago_s=20)
    free = wa_db.insert_outbound("acme", "123456", "free", created_ago_s=10)
    holder = subprocess.Popen(
        wa_db.server._psql_argv(wa_db.dbname),
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdin is not None
        holder.stdin.write(f"begin;\nselect id from wa_outbound where id = '{locked}' for update;\n"
                           "select 'lock-holder', pg_sleep(30);\n")
        holder.stdin.flush()
        deadline = time.monotonic() + 10
        while not wa_db.scalar("select count(*) from pg_stat_activity where query like '%''lock-holder''%' "
                               "and state = 'active' and pid <> pg_backend_pid()"):
            assert time.monotonic() < deadline, "lock holder did not start"
            time.sleep(0.05)
        started = time.monotonic()
        assert ids(fn.request("GET", "queued-messages", params={"instanceId": "acme"})) == [free]
        assert ids(fn.request("GET", "queued-messages")) == []
        assert time.monotonic() - started < 5
    finally:
        wa_db.psql("select pg_cancel_backend(pid) from pg_stat_activity "
                   "where query like '%''lock-holder''%' and pid <> pg_backend_pid()")
        holder.communicate(timeout=10)
    assert ids(fn.request("GET", "queued-messages", params={"instanceId": "acme"})) == [locked]


@deno
def test_stale_claim_is_offered_again(fn: EdgeFunction, wa_db: WaDb) -> None:
    wa_db.insert_instance("acme", "CONNECTED")
    stale = wa_db.insert_outbound("acme", "123456", "stale", status="sending", attempts=1,
                                  created_ago_s=900, claimed_ago_s=301)
    fresh = wa_db.insert_outbound("acme", "123456", "fresh claim", status="sending", attempts=1,
                                  created_ago_s=800, claimed_ago_s=240)
    queued = wa_db.insert_outbound("acme", "123456", "queued", created_ago_s=5)
    assert ids(fn.request("GET", "queued-messages", params={"instanceId": "acme"})) == [stale, queued]
    assert wa_db.outbound(stale)["attempts"] == 2
    assert wa_db.outbound(fresh)["attempts"] == 1
    wa_db.psql(f"update wa_outbound set claimed_at = now() - interval '6 minutes' where id = '{fresh}'")
    assert ids(fn.request("GET", "queued-messages")) == [fresh]  # batch mode too


@deno
def test_mark_sent_is_idempotent_and_terminal(fn: EdgeFunction, wa_db: WaDb) -> None:
    wa_db.insert_instance("acme", "CONNECTED")
    mid = wa_db.insert_outbound("acme", "123456", "hi")
    assert ids(fn.request("GET", "queued-messages", params={"instanceId": "acme"})) == [mid]
    body = {"messageId": mid, "wa_message_id": "3EB0C767D71D9A4B21F4"}
    r = fn.request("POST", "mark-sent", json=body)
    assert r.status_code == 200 and r.json()["found"] is True
    first = wa_db.outbound(mid)
    assert (first["status"], first["wa_message_id"]) == ("sent", "3EB0C767D71D9A4B21F4")
    assert first["sent_at"] is not None
    assert fn.request("POST", "mark-sent", json=body).status_code == 200  # retried
    assert wa_db.outbound(mid)["sent_at"] == first["sent_at"]
    r = fn.request("POST", "mark-failed", json={"messageId": mid, "error": "delivery_unknown"})
    assert r.status_code == 200 and r.json()["ignored"] is True  # late failure never overrides sent
    row = wa_db.outbound(mid)
    assert (row["status"], row["error"]) == ("sent", None)
    # a sent message is never offered again, even with an old claim
    wa_db.psql(f"update wa_outbound set claimed_at = now() - interval '1 hour' where id = '{mid}'")
    assert ids(fn.request("GET", "queued-messages", params={"instanceId": "acme"})) == []
    # upper-case uuid is the same message
    assert fn.request("POST", "mark-sent", json={**body, "messageId": mid.upper()}).json()["found"] is True


@deno
def test_mark_failed_is_idempotent_and_never_404(fn: EdgeFunction, wa_db: WaDb) -> None:
    wa_db.insert_instance("acme", "CONNECTED")
    mid = wa_db.insert_outbound("acme", "12", "hi")
    error = "invalid recipient: phone number must have 5-20 digits, got 2"
    for _ in range(2):
        r = fn.request("POST", "mark-failed", json={"messageId": mid, "error": error})
        assert r.status_code == 200 and r.json()["status"] == "failed"
    row = wa_db.outbound(mid)
    assert (row["status"], row["error"]) == ("failed", error)
    assert ids(fn.request("GET", "queued-messages", params={"instanceId": "acme"})) == []
    long = fn.request("POST", "mark-failed", json={"messageId": mid, "error": "e" * 10_000})
    assert long.status_code == 200 and len(wa_db.outbound(mid)["error"]) == 4000
    # the worker learns later that it was delivered after all
    assert fn.request("POST", "mark-sent", json={"messageId": mid, "wa_message_id": "W"}).status_code == 200
    row = wa_db.outbound(mid)
    assert (row["status"], row["error"], row["wa_message_id"]) == ("sent", None, "W")
    # unknown ids: 200 (a 404 would tell the worker /mark-failed does not exist)
    for endpoint in ("mark-failed", "mark-sent"):
        r = fn.request("POST", endpoint, json={"messageId": str(uuid.uuid4()), "error": "x", "wa_message_id": "W"})
        assert r.status_code == 200 and r.json()["found"] is False


@deno
def test_inbound_replay_is_stored_once(fn: EdgeFunction, wa_db: WaDb) -> None:
    wa_db.insert_instance("acme", "CONNECTED")
    wa_db.insert_instance("beta", "CONNECTED")
    msg = {
        "instanceId": "acme", "from": "5511988887777@s.whatsapp.net", "to": "5511999990000@s.whatsapp.net",
        "body": "Oi, tudo bem?", "wa_message_id": "3A1B2C3D4E5F", "chat_id": "5511988887777@s.whatsapp.net",
        "sender_id": "5511988887777@s.whatsapp.net", "from_me": False, "is_group": False,
        "push_name": "Maria", "timestamp": 1763900000, "future_field": {"x": 1},
    }
    first = fn.request("POST", "inbound", json=msg)
    assert first.status_code == 200 and first.json() == {"ok": True, "duplicate": False}
    replay = fn.request("POST", "inbound", json=msg)
    assert replay.status_code == 200 and replay.json() == {"ok": True, "duplicate": True}
    # same WhatsApp id on another instance is another message
    assert fn.request("POST", "inbound", json={**msg, "instanceId": "beta"}).json()["duplicate"] is False
    rows = wa_db.inbound_rows("acme")
    assert len(rows) == 1
    row = rows[0]
    assert (row["from"], row["to"], row["body"], row["push_name"]) == (
        msg["from"], msg["to"], "Oi, tudo bem?", "Maria")
    assert (row["chat_id"], row["sender_id"], row["from_me"], row["is_group"]) == (
        msg["chat_id"], msg["sender_id"], False, False)
    assert row["timestamp"].startswith("2025-11-23T")
    assert wa_db.scalar("select extract(epoch from \"timestamp\")::bigint from wa_inbound "
                        "where instance_id = 'acme'") == 1763900000
    assert row["raw"]["future_field"] == {"x": 1}
    # minimal group message: optional fields absent, timestamp in milliseconds
    group = {"instanceId": "acme", "wa_message_id": "G1", "from": "120363@g.us", "body": "",
             "is_group": True, "from_me": True, "timestamp": 1763900000123}
    assert fn.request("POST", "inbound", json=group).status_code == 200
    row = wa_db.inbound_rows("acme")[1]
    assert (row["is_group"], row["from_me"], row["to"], row["chat_id"]) == (True, True, None, None)
    assert wa_db.scalar("select extract(epoch from \"timestamp\") from wa_inbound where wa_message_id = 'G1'") \
        == pytest.approx(1763900000.123)


@deno
def test_batch_mode_covers_connected_instances(fn: EdgeFunction, wa_db: WaDb) -> None:
    wa_db.insert_instance("acme", "CONNECTED")
    wa_db.insert_instance("beta", "CONNECTED")
    wa_db.insert_instance("asleep", "DISCONNECTED")
    wa_db.insert_instance("pairing", "CONNECTING")
    a1 = wa_db.insert_outbound("acme", "111111", "a1", created_ago_s=30)
    b1 = wa_db.insert_outbound("beta", "222222", "b1", created_ago_s=20)
    a2 = wa_db.insert_outbound("acme", "111111", "a2", created_ago_s=10)
    waiting = [wa_db.insert_outbound(i, "333333", "later") for i in ("asleep", "pairing")]
    r = fn.request("GET", "queued-messages")
    assert r.status_code == 200
    assert r.json() == {"messages": [
        {"id": a1, "instanceId": "acme", "to": "111111", "body": "a1"},
        {"id": b1, "instanceId": "beta", "to": "222222", "body": "b1"},
        {"id": a2, "instanceId": "acme", "to": "111111", "body": "a2"}]}
    assert ids(fn.request("GET", "queued-messages")) == []
    assert all(wa_db.outbound(w)["status"] == "queued" for w in waiting)
    # limit applies per instance: one instance's backlog cannot starve the others
    for n in range(5):
        wa_db.insert_outbound("acme", "111111", f"backlog {n}", created_ago_s=100 - n)
    b2 = wa_db.insert_outbound("beta", "222222", "b2")
    batch = fn.request("GET", "queued-messages", params={"limit": 2}).json()["messages"]
    assert [m["body"] for m in batch] == ["backlog 0", "backlog 1", "b2"]
    assert batch[2]["id"] == b2


@deno
def test_function_typechecks(tmp_path) -> None:
    """`deno check` the function (Supabase does not type-check on deploy)."""
    import subprocess

    binary = ensure_deno_toolchain()
    staged = stage_function()
    try:
        result = subprocess.run([str(binary), "check", "--no-lock", "index.ts"], cwd=staged,
                                env=deno_env(), capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
    finally:
        import shutil

        shutil.rmtree(staged.parent, ignore_errors=True)


# ------------------------------------------------- poisoned input (issue #8)
# Inbound is delivered in order per chat: a 500 makes the worker retry the
# same message and every later message of that chat waits. Bad data is
# stored cleaned (NUL) or refused with a 400, never a 500.


def inbound_msg(wa_id: str, **extra) -> dict:
    return {"instanceId": "acme", "wa_message_id": wa_id, "from": "5511988887777@s.whatsapp.net",
            "chat_id": "5511988887777@s.whatsapp.net", "body": "oi", **extra}


def post_raw(fn: EdgeFunction, endpoint: str, raw_json: str):
    """POST a JSON text as is (Python's json module would not let us write a lone surrogate escape)."""
    return fn.request("POST", endpoint, content=raw_json.encode(), headers={"Content-Type": "application/json"})


@deno
def test_inbound_nul_is_stripped_and_stored(fn: EdgeFunction, wa_db: WaDb) -> None:
    wa_db.insert_instance("acme", "CONNECTED")
    msg = inbound_msg("NUL1", body="a\x00b\x00", push_name="Ma\x00ria", to="5511999990000@s.whatsapp.net\x00",
                      extra={"k\x00ey": ["x\x00"]})
    r = fn.request("POST", "inbound", json=msg)
    assert r.status_code == 200, r.text
    assert r.json() == {"ok": True, "duplicate": False}
    row = wa_db.inbound_rows("acme")[0]
    assert (row["body"], row["push_name"], row["to"]) == ("ab", "Maria", "5511999990000@s.whatsapp.net")
    assert row["raw"]["body"] == "ab" and row["raw"]["extra"] == {"key": ["x"]}
    # the replay is recognised as such
    assert fn.request("POST", "inbound", json=msg).json()["duplicate"] is True
    # a "__proto__" key is data like any other (cleaning the body does not turn it into a prototype)
    r = post_raw(fn, "inbound", '{"__proto__":{"body":"from the prototype"},"instanceId":"acme",'
                                '"wa_message_id":"P1","from":"1@s.whatsapp.net"}')
    assert r.status_code == 400 and "body is required" in r.json()["error"], r.text


@deno
def test_inbound_lone_surrogate_is_400(fn: EdgeFunction, wa_db: WaDb) -> None:
    wa_db.insert_instance("acme", "CONNECTED")
    for raw in ('{"instanceId":"acme","wa_message_id":"S1","from":"1@s.whatsapp.net","body":"x\\ud800y"}',
                '{"instanceId":"acme","wa_message_id":"S2","from":"1@s.whatsapp.net","body":"x\\udfff"}',
                '{"instanceId":"acme","wa_message_id":"S3","from":"1@s.whatsapp.net","body":"ok",'
                '"push_name":"\\ud83d"}',
                '{"instanceId":"acme","wa_message_id":"S4","from":"1@s.whatsapp.net","body":"ok",'
                '"future":{"deep":["\\udc00"]}}'):
        r = post_raw(fn, "inbound", raw)
        assert r.status_code == 400, (raw, r.status_code, r.text)
        assert "surrogate" in r.json()["error"]
    # a proper pair (an emoji, escaped) is a character and is stored
    r = post_raw(fn, "inbound", '{"instanceId":"acme","wa_message_id":"S5","from":"1@s.whatsapp.net",'
                                '"body":"\\ud83d\\ude00"}')
    assert r.status_code == 200, r.text
    assert [row["body"] for row in wa_db.inbound_rows("acme")] == ["\U0001F600"]


@deno
def test_inbound_bad_timestamp_is_400(fn: EdgeFunction, wa_db: WaDb) -> None:
    wa_db.insert_instance("acme", "CONNECTED")
    # above 1e11 the number is read as milliseconds; the range ends at 9999-12-31
    for i, ts in enumerate((1e30, -1, "abc", "", 1e20, 253402300800000)):
        r = fn.request("POST", "inbound", json=inbound_msg(f"T{i}", timestamp=ts))
        assert r.status_code == 400, (ts, r.status_code, r.text)
        assert "timestamp" in r.json()["error"]
    assert wa_db.inbound_rows("acme") == []
    # the edges of the range are stored
    for i, ts in enumerate((0, 1e11, 253402300799999)):
        r = fn.request("POST", "inbound", json=inbound_msg(f"OK{i}", timestamp=ts))
        assert r.status_code == 200, (ts, r.text)
    assert len(wa_db.inbound_rows("acme")) == 3


@deno
def test_writes_strip_nul_on_every_endpoint(fn: EdgeFunction, wa_db: WaDb) -> None:
    wa_db.insert_instance("acme")
    r = fn.request("POST", "update-status", json={"instanceId": "acme", "status": "CONNECTED", "qr_code": None,
                                                  "phone_number": "5511\x00999"})
    assert r.status_code == 200, r.text
    assert wa_db.instance("acme")["phone_number"] == "5511999"
    r = fn.request("POST", "update-status", json={"instanceId": "acme", "status": "DISCONNECTED",
                                                  "reason": "net\x00work"})
    assert r.status_code == 200 and wa_db.instance("acme")["last_reason"] == "network"
    sent, failed = wa_db.insert_outbound("acme", "123456", "a"), wa_db.insert_outbound("acme", "123456", "b")
    r = fn.request("POST", "mark-sent", json={"messageId": sent, "wa_message_id": "3EB\x000"})
    assert r.status_code == 200 and wa_db.outbound(sent)["wa_message_id"] == "3EB0"
    # mark-failed's error is a diagnostic: a lone surrogate is repaired, not refused
    r = post_raw(fn, "mark-failed", '{"messageId":"%s","error":"send failed: \\u0000x\\ud800"}' % failed)
    assert r.status_code == 200, r.text
    assert wa_db.outbound(failed)["error"] == "send failed: x\ufffd"
    # elsewhere a lone surrogate is a 400 and changes nothing
    r = post_raw(fn, "update-status", '{"instanceId":"acme","status":"CONNECTED","phone_number":"\\udc00"}')
    assert r.status_code == 400 and wa_db.instance("acme")["status"] == "DISCONNECTED"


@deno
def test_database_data_errors_are_400(fn: EdgeFunction, wa_db: WaDb) -> None:
    """A payload the database refuses (SQLSTATE class 22/23, e.g. a SaaS's own rule) is the caller's fault: 400."""
    wa_db.insert_instance("acme", "CONNECTED")
    mid = wa_db.insert_outbound("acme", "123456", "hi")
    wa_db.psql("""
        alter table wa_inbound add constraint saas_no_spam check (body <> 'spam');
        create function saas_reject_reason() returns trigger language plpgsql as $$
        begin
            if new.last_reason = 'weird' then raise exception 'bad reason' using errcode = '22023'; end if;
            return new;
        end $$;
        create function saas_reject_error() returns trigger language plpgsql as $$
        begin
            if new.error = 'weird' then raise exception 'bad error' using errcode = '22P02'; end if;
            return new;
        end $$;
        create trigger saas_reject_reason before update on wa_instances
            for each row execute function saas_reject_reason();
        create trigger saas_reject_error before update on wa_outbound
            for each row execute function saas_reject_error();
    """)
    try:
        r = fn.request("POST", "inbound", json=inbound_msg("SPAM", body="spam"))
        assert r.status_code == 400 and "23514" in r.json()["error"], r.text
        r = fn.request("POST", "update-status", json={"instanceId": "acme", "status": "DISCONNECTED",
                                                      "reason": "weird"})
        assert r.status_code == 400 and "22023" in r.json()["error"], r.text
        r = fn.request("POST", "mark-failed", json={"messageId": mid, "error": "weird"})
        assert r.status_code == 400 and "22P02" in r.json()["error"], r.text
        # the unknown-instance rule (a foreign key, class 23 too) still answers 404
        r = fn.request("POST", "inbound", json={**inbound_msg("G"), "instanceId": "ghost"})
        assert r.status_code == 404
    finally:
        wa_db.psql("""
            alter table wa_inbound drop constraint if exists saas_no_spam;
            drop trigger if exists saas_reject_reason on wa_instances;
            drop trigger if exists saas_reject_error on wa_outbound;
            drop function if exists saas_reject_reason();
            drop function if exists saas_reject_error();
        """)
    assert wa_db.inbound_rows("acme") == [] and wa_db.outbound(mid)["status"] == "queued"


@deno
def test_unreachable_database_is_503_not_400() -> None:
    """Server faults stay 5xx (the worker retries them)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    fn = EdgeFunction(f"postgresql://postgres@127.0.0.1:{dead_port}/nope")
    fn.start()
    try:
        r = fn.request("POST", "inbound", json=inbound_msg("X"))
        assert r.status_code == 503, r.text
        assert r.json() == {"error": "database unavailable"}
    finally:
        fn.stop()


@deno
def test_message_status_calls_undecryptable_and_bans(fn: EdgeFunction, wa_db: WaDb) -> None:
    """Issue #12: the latest receipt per sent message (never backwards, by id or by WhatsApp
    id), calls and undecryptable messages stored, a ban's code and end on the instance."""
    wa_db.insert_instance("acme", "CONNECTED")
    m1, m2 = wa_db.insert_outbound("acme", "12", "a"), wa_db.insert_outbound("acme", "12", "b")
    fn.request("GET", "queued-messages", params={"instanceId": "acme"})
    fn.request("POST", "mark-sent", json={"messageId": m1, "wa_message_id": "3EB0AA"})
    fn.request("POST", "mark-sent", json={"messageId": m2, "wa_message_id": "3EB0BB"})

    def st(mid: str | None, wa: str, status: str) -> dict:
        return {"instanceId": "acme", "messageId": mid, "wa_message_id": wa, "status": status,
                "timestamp": 1_800_000_100, "recipient": "5511988887777@s.whatsapp.net"}

    r = fn.request("POST", "message-status", json={"statuses": [st(m1, "3EB0AA", "read"),
                                                                 st(None, "3EB0BB", "delivered"),
                                                                 st(None, "3EB0ZZ", "played")]})
    assert r.status_code == 200 and r.json() == {"ok": True, "changed": 2}, r.text
    assert fn.request("POST", "message-status", json={"statuses": [st(m1, "3EB0AA", "delivered")]}).json()[
        "changed"] == 0
    assert wa_db.outbound(m1)["receipt_status"] == "read" and wa_db.outbound(m2)["receipt_status"] == "delivered"
    assert wa_db.outbound(m1)["receipt_by"] == "5511988887777@s.whatsapp.net"
    for bad in ({"statuses": [st(m1, "3EB0AA", "seen")]}, {"statuses": [st(m1, "3EB0AA", "read")] * 101}):
        assert fn.request("POST", "message-status", json=bad).status_code == 400

    base = {"instanceId": "acme", "from": "5511988887777@s.whatsapp.net", "body": "", "timestamp": 1_800_000_000}
    assert fn.request("POST", "inbound", json={**base, "wa_message_id": "CALL1", "type": "call", "video": True,
                                               "rejected": True, "caller": base["from"]}).status_code == 200
    r = fn.request("POST", "inbound", json={**base, "wa_message_id": "3EB0UN", "type": "undecryptable"})
    assert r.status_code == 200, r.text
    rows = {r["wa_message_id"]: r for r in wa_db.inbound_rows("acme")}
    assert (rows["CALL1"]["type"], rows["CALL1"]["call_video"], rows["CALL1"]["call_rejected"]) == ("call", True, True)
    assert rows["3EB0UN"]["type"] == "undecryptable" and rows["3EB0UN"]["call_video"] is None

    r = fn.request("POST", "update-status", json={"instanceId": "acme", "status": "DISCONNECTED", "qr_code": None,
                                                  "reason": "temporary_ban", "ban_code": "blocked_by_users",
                                                  "ban_expires_at": 1_800_003_600})
    assert r.status_code == 200, r.text
    inst = wa_db.instance("acme")
    assert inst is not None and inst["ban_code"] == "blocked_by_users" and inst["ban_expires_at"] is not None
    fn.request("POST", "update-status", json={"instanceId": "acme", "status": "CONNECTED", "qr_code": None})
    inst = wa_db.instance("acme")
    assert inst is not None and inst["ban_code"] is None and inst["ban_expires_at"] is None
