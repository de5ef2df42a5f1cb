"""The journal in PostgreSQL (issue #13): the same answers as the SQLite journal, a fleet's
workers kept to their own rows, a lost connection that fails fast and comes back, and a
container without a volume delivering what a killed one journaled. Against a real PostgreSQL 15."""

from __future__ import annotations

import itertools
import json
import logging
import signal
import subprocess
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import httpx
import psycopg
import pytest

from tests.conftest import AUTH, FakeClock, make_settings, wait_until
from tests.fakeproxy import FakeProxy
from tests.pg_helpers import PgBouncer, PgServer, pg_server  # noqa: F401 - the fixture
from tests.proc import ROOT, start_worker, worker_env
from wa_worker.daemon import _open_journal
from wa_worker.doctor import FAIL, OK, local_checks
from wa_worker.preflight import StartupError
from wa_worker.storage.db import StoreOpenError
from wa_worker.timing import Clock
from wa_worker.storage.journal import EventRow, Journal, JournalUnavailable, ReceiptRow
from wa_worker.storage.pgjournal import KEEPALIVE_S, PgJournal, to_pg

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

_names = itertools.count()


@pytest.fixture
def db(pg_server: PgServer) -> str:  # noqa: F811 - the fixture
    return pg_server.create_database(f"journal_{next(_names)}")


# long: one scenario crossing every journal call's rules, read top to bottom like the journal itself
def scenario(j: Journal, clock: FakeClock) -> list[Any]:
    """Every kind of journal call, in an order that crosses their rules; what each answered."""
    seen: list[Any] = []
    note = seen.append
    # inbound outbox: per-chat heads, retries, media rows, dead letters, expiry
    note(j.add_inbound("acme", "c1", "w1", {"n": 1, "_media_handle": {"k": "v"}}))
    note(j.add_inbound("acme", "c1", "w1", {"n": 1}))  # a replay
    note(j.add_inbound("acme", "c1", "w2", {"n": 2, "text": "100% ção ? ok"}))
    note(j.add_inbound("acme", "c2", "w3", {"n": 3}))
    note(j.add_inbound("beta", "c1", "w4", {"n": 4}))
    heads = j.due_inbound_heads(10)
    note([(h.instance_id, h.chat_id, h.wa_message_id, h.payload) for h in heads])
    first = heads[0]
    j.inbound_retry_later(first.seq, 30, "HTTP 503", server_error=True)
    note([h.wa_message_id for h in j.due_inbound_heads(10)])
    note([h.wa_message_id for h in j.due_inbound_heads(10, skip={("acme", "c2")})])
    note([h.wa_message_id for h in j.inbound_heads(10)])
    note(j.next_inbound_due_at() == clock.now)
    note(j.next_inbound_due_at(skip={("acme", "c2"), ("beta", "c1")}) == clock.now + 30)
    note(j.inbound_media_due_now("acme"))
    j.inbound_update_payload(first.seq, {"n": 1, "url": "https://x"})
    note(j.inbound_media_due_now("acme"))
    row = j.due_inbound_heads(10)[0]
    note((row.wa_message_id, row.payload, row.attempts, row.server_errors))
    j.inbound_delivered(row.seq)
    j.inbound_dead_letter(j.due_inbound_heads(10)[0], "refused", 422, "nope")
    clock.now += 100
    note(j.expire_inbound(50))
    note([(d["kind"], d["ref"], d["reason"], d["status_code"]) for d in j.dead_letters()])
    note(j.dead_letters("inbound")[0]["payload"] is not None)
    # outbound journal: never twice, outcomes, acknowledgements, unknown sends
    note(j.begin_send("m1", "acme", "551199@s.whatsapp.net", claim_token=7))
    note(j.begin_send("m1", "acme", "551199@s.whatsapp.net"))
    j.record_sent("m1", "WA1")
    note(j.begin_send("m2", "acme", "551198@s.whatsapp.net"))
    j.record_failure("m3", "acme", "bad", "invalid_message")
    note(j.begin_send("api:acme:k1", "acme", "5511@s.whatsapp.net", origin="api"))
    note(sorted((r.message_id, r.state, r.wa_message_id, r.claim_token) for r in j.due_acks(10)))
    note(j.next_ack_due_at() == clock.now)
    j.ack_done("m1")
    j.ack_retry_later("m3", 60)
    note([r.message_id for r in j.due_acks(10)])
    j.reack("m1", 9)
    note([(r.message_id, r.state, r.claim_token) for r in j.due_acks(10)])
    j.ack_rejected(j.outbound_get("m1"), "rejected by proxy", 400, "bad")  # type: ignore[arg-type]
    note(sorted(j.recover_unknown_sends(at_least_once=False)))
    note(sorted((r.message_id, r.state, r.error_code, r.origin) for r in
                (j.outbound_get(m) for m in ("m1", "m2", "m3", "api:acme:k1")) if r is not None))
    note(j.send_times("acme", 0) == [clock.now])
    # message index, numbers, settings, claims, API requests, meta
    j.remember_message("acme", "WAin", "c1@s.whatsapp.net", "s@s.whatsapp.net", False)
    j.remember_message("acme", "WAin", "other", None, True)
    note(j.find_message("acme", "WA1"))
    note(j.find_message("acme", "WAin"))
    note(j.find_message("acme", "nope"))
    j.cache_number("5511", "5511@s.whatsapp.net")
    j.cache_number("5511", None)
    note(j.cached_number("5511", 60))
    note(j.cached_number("5599", 60))
    j.save_instance_settings([("acme", {"a": 1}, "socks5://h:1", None), ("beta", None, None, "bad url")])
    j.save_instance_settings([("acme", {"a": 2}, None, None)])
    note(sorted(j.instance_settings()))
    j.note_claimed([("q1", "acme"), ("q1", "acme")])
    note(j.claimed_here("q1"))
    clock.now += 1
    j.note_claimed([("q2", "acme"), ("q,3", "beta"), ("m2", "acme")])  # m2 was begun: never "unsent"
    note(j.unsent_claims(["acme", "beta", "gamma"], 10))
    note(j.unsent_claims(["acme"], 1))
    note(j.forget_claims(["q1", "q,3", "unknown"]))
    note(j.unsent_claims(["acme", "beta"], 10))
    note(j.api_request_add("api:acme:k1", "acme", "k1", "h" * 64))
    note(j.api_request_add("api:acme:k1", "acme", "k1", "h" * 64))
    j.api_request_not_sent("api:acme:k1", "send_caps_reached", "caps")
    r = j.api_request("api:acme:k1")
    note((r.idem_key, r.not_sent_code, r.not_sent_error) if r else None)
    j.set_meta("leases", "on")
    j.set_meta("leases", "off")
    note(j.meta("leases"))
    note(j.meta("absent"))
    # receipts: coalesced by rank, never a lower one after a higher one
    note(j.add_receipt("acme", "WA1", "c1", "r1", "delivered", 1, 5.0))
    note(j.add_receipt("acme", "WA1", "c1", "r1", "delivered", 1, 6.0))
    note(j.add_receipts("acme", ["WA1", "WA2"], "c1", "r1", "read", 2, 7.0))
    due = j.receipts_due(10)
    note(sorted((d.wa_message_id, d.status, d.rank, d.message_id) for d in due))
    j.receipts_retry_later(due[:1], 10, "HTTP 503")
    note(len(j.receipts_due(10)))
    j.receipts_posted(due)
    note(j.add_receipt("acme", "WA1", "c1", "r1", "delivered", 1, 8.0))
    note(j.receipts_pending())
    j.add_receipt("acme", "WA3", "c1", "r1", "played", 3, 9.0)
    j.receipts_rejected([ReceiptRow("acme", "WA3", "c1", "r1", "played", 3, 9.0, 0, 0.0)], "bad", 400, None)
    note(j.receipts_pending())
    note(j.next_receipt_due_at())
    # event log
    note(j.event_seq_bounds())
    j.add_events([EventRow(1, clock.now, "acme", "status", "{}")])
    j.add_events([EventRow(n, clock.now + n, "beta" if n % 2 else "acme", "inbound", "{}") for n in range(2, 8)])
    note([e.seq for e in j.events_after(2, 10)])
    note([e.seq for e in j.events_after(0, 3, instances=["beta"])])
    note([e.seq for e in j.events_after(0, 10, types=["status"])])
    note(j.event_seq_bounds())
    note(j.prune_events(clock.now + 3, 3))
    note(j.event_seq_bounds())
    # housekeeping
    note(j.counts())
    note(j.oldest_pending_age_s())
    j.retry_all_now()
    clock.now += 8 * 24 * 3600
    note(j.prune())
    note(j.counts())
    note(j.event_seq_bounds())
    return seen


@pytest.mark.parametrize("via", ["direct", "pgbouncer"])
def test_same_answers_on_sqlite_and_postgresql(tmp_path: Path, db: str, pg_server: PgServer,  # noqa: F811
                                               via: str) -> None:
    """Also through PgBouncer in transaction mode, with the URL docs/fleet.md gives for it (its
    lib/pq-only ``binary_parameters=yes`` is for goneonize; libpq would refuse it)."""
    sqlite_clock, pg_clock = FakeClock(), FakeClock()
    bouncer = None
    if via == "pgbouncer":
        bouncer = PgBouncer(pg_server, db.rsplit("/", 1)[1], pool_size=2)
        bouncer.start()
        db = bouncer.url()
        assert "binary_parameters=yes" in db
    lite = Journal(tmp_path / "j.db", clock=sqlite_clock)
    pg = PgJournal(db, worker_id="w-a", clock=pg_clock)
    try:
        expected = scenario(lite, sqlite_clock)
        got = scenario(pg, pg_clock)
    finally:
        lite.close()
        pg.close()
        if bouncer is not None:
            log = bouncer.log_tail()
            bouncer.stop()
            assert " ERROR " not in log, log
    assert len(got) == len(expected)
    for n, (a, b) in enumerate(zip(expected, got, strict=True)):
        assert b == a, f"step {n}: SQLite {a!r}, PostgreSQL {b!r}"


def test_the_sql_is_qualified_and_placeholders_translated() -> None:
    assert to_pg("SELECT i.* FROM inbound i JOIN (SELECT MIN(seq) FROM inbound) h WHERE x LIKE '%a' AND y = ?") == (
        "SELECT i.* FROM wa_worker_journal.inbound i JOIN (SELECT MIN(seq) FROM wa_worker_journal.inbound) h "
        "WHERE x LIKE '%%a' AND y = %s")
    # a kind named like a table in a literal, a column named like one: untouched
    assert to_pg("INSERT INTO dead_letter (kind) VALUES ('inbound')") == (
        "INSERT INTO wa_worker_journal.dead_letter (kind) VALUES ('inbound')")
    assert to_pg("UPDATE outbound SET state = 'x' WHERE outbound.state = ?") == (
        "UPDATE wa_worker_journal.outbound SET state = 'x' WHERE outbound.state = %s")


def test_a_fleet_shares_one_journal_each_worker_to_its_rows(db: str) -> None:
    clock = FakeClock()
    a = PgJournal(db, worker_id="w-a", clock=clock)
    b = PgJournal(db, worker_id="w-b", clock=clock)
    try:
        held_a: set[str] = {"acme"}
        held_b: set[str] = {"beta"}
        a.scope, b.scope = (lambda: held_a), (lambda: held_b)
        # inbound: each delivers the instances it holds; a moved instance's rows go with it
        assert a.add_inbound("acme", "c1", "in1", {"n": 1}) and b.add_inbound("beta", "c1", "in2", {"n": 2})
        assert not b.add_inbound("acme", "c1", "in1", {"n": 1})  # one row per message, whoever saw it
        assert [h.wa_message_id for h in a.due_inbound_heads(10)] == ["in1"]
        assert [h.wa_message_id for h in b.inbound_heads(10)] == ["in2"]
        # outbound: never begun twice across the fleet
        assert a.begin_send("m1", "acme", "to", claim_token=3)
        assert not b.begin_send("m1", "acme", "to")
        a.record_sent("m1", "WA1")
        assert a.begin_send("m2", "acme", "to", claim_token=3)  # a dies here, with m2 `sending`
        assert [r.message_id for r in a.due_acks(10)] == ["m1"] and b.due_acks(10) == []
        assert b.recover_unknown_sends(at_least_once=False) == []  # b's start touches nothing of a's
        assert a.outbound_get("m2").state == "sending"  # type: ignore[union-attr]
        # acme moves to b: its inbound, its unacknowledged outcome and its interrupted send follow
        held_a.clear()
        held_b.add("acme")
        assert a.due_inbound_heads(10) == []
        assert sorted(h.wa_message_id for h in b.due_inbound_heads(10)) == ["in1", "in2"]
        # each worker's health counts its own (not the fleet's, which a dashboard would sum up)
        assert (a.counts()["inbound_pending"], b.counts()["inbound_pending"]) == (0, 2)
        assert (a.counts()["outbound_in_flight"], b.counts()["outbound_in_flight"]) == (1, 0)
        assert b.adopt_instance("acme", at_least_once=False) == ["m2"]
        m2 = b.outbound_get("m2")
        assert m2 is not None and (m2.state, m2.error_code, m2.worker_id, m2.claim_token) == (
            "failing", "delivery_unknown", "w-b", 3)  # acknowledged under the token it was claimed with
        assert sorted((r.message_id, r.claim_token) for r in b.due_acks(10)) == [("m1", 3), ("m2", 3)]
        assert a.due_acks(10) == []
        # a, frozen mid-send and resumed, cannot overwrite what b recorded
        a.record_sent("m2", "WA2-late")
        assert b.outbound_get("m2").state == "failing"  # type: ignore[union-attr]
        # a claim offered again with no row was begun by no one: sent (as its own claim)
        assert b.claimed_here("never-begun")
        # at-least-once: the interrupted send is forgotten, so its next offer sends it
        assert b.begin_send("m3", "acme", "to")
        assert a.adopt_instance("acme", at_least_once=True) == ["m3"] and a.outbound_get("m3") is None
        # per worker: events and remembered values
        a.add_events([EventRow(1, 1.0, "acme", "status", "{}")])
        b.add_events([EventRow(1, 1.0, "beta", "status", "{}"), EventRow(2, 2.0, "beta", "status", "{}")])
        assert a.event_seq_bounds() == (1, 1) and b.event_seq_bounds() == (1, 2)
        assert b.prune_events(10.0, 0) == 2 and b.event_seq_bounds() == (None, 2)  # never reused after a prune
        a.set_meta("leases", "on")
        assert a.meta("leases") == "on" and b.meta("leases") is None
    finally:
        a.close()
        b.close()


def test_workers_starting_together_on_a_new_database_create_it_once(db: str) -> None:
    errors: list[BaseException] = []
    journals: list[PgJournal] = []

    def start(n: int) -> None:
        try:
            journals.append(PgJournal(db, worker_id=f"w-{n}"))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for j in journals:
        j.close()
    assert errors == [] and len(journals) == 6
    assert {j.schema_version for j in journals} == {1}


def test_a_lost_connection_fails_fast_and_comes_back(db: str, pg_server: PgServer) -> None:  # noqa: F811
    j = PgJournal(db, worker_id="w-a")
    try:
        def terminate() -> None:
            pg_server.psql("select pg_terminate_backend(pid) from pg_stat_activity "
                           "where application_name = 'wa-worker-journal'", dbname=db.rsplit("/", 1)[1])

        assert j.add_inbound("acme", "c1", "in1", {})
        terminate()
        with pytest.raises(JournalUnavailable):
            j.add_inbound("acme", "c1", "in2", {})
        assert not j.writable
        with pytest.raises(JournalUnavailable, match="reconnecting"):  # no dial inside a call
            j.due_inbound_heads(10)
        assert not j.probe_writable()
        j.reconnect()
        assert j.probe_writable() and j.writable
        assert j.add_inbound("acme", "c1", "in2", {})
        assert [h.wa_message_id for h in j.inbound_heads(10)] == ["in1"]
        assert j.counts()["inbound_pending"] == 2
        # lost while idle (a pooler's idle timeout): the housekeeping keepalive finds it, not the next send
        j.keepalive()
        assert j.writable  # used just now: no query
        terminate()
        j._pg.last_used -= KEEPALIVE_S
        j.keepalive()
        assert not j.writable
        j.reconnect()
        assert j.probe_writable() and j.counts()["inbound_pending"] == 2
    finally:
        j.close()


def test_an_unusable_database_is_a_clear_error_without_its_password(db: str, pg_server: PgServer) -> None:  # noqa: F811
    port = pg_server.port
    wrong = f"postgresql://postgres:s3cr3t-pw@127.0.0.1:{port + 1 if port < 65535 else port - 1}/x"
    with pytest.raises(StoreOpenError) as info:
        PgJournal(wrong, worker_id="w-a", connect_timeout_s=2)
    assert "s3cr3t-pw" not in str(info.value) and "***" in str(info.value)
    with pytest.raises(StoreOpenError, match="postgres://"):
        PgJournal("mysql://u:p@h/db", worker_id="w-a")
    # a schema written by a newer wa-worker is refused, untouched
    PgJournal(db, worker_id="w-a").close()
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("INSERT INTO wa_worker_journal.schema_version VALUES (99)")
    with pytest.raises(StoreOpenError, match="newer"):
        PgJournal(db, worker_id="w-a")
    # another application's tables in the schema, with no version: refused, untouched
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("DROP SCHEMA wa_worker_journal CASCADE")
        conn.execute("CREATE SCHEMA wa_worker_journal")
        conn.execute("CREATE TABLE wa_worker_journal.inbound (id int)")
    with pytest.raises(StoreOpenError, match=r"not a wa-worker journal \(inbound\)"):
        PgJournal(db, worker_id="w-a")
    with psycopg.connect(db, autocommit=True) as conn:
        assert conn.execute("SELECT to_regclass('wa_worker_journal.schema_version')").fetchone() == (None,)


def test_doctor_and_start_say_where_the_journal_is(tmp_path: Path, db: str, caplog: pytest.LogCaptureFixture) -> None:
    # a STATE_DB left with undelivered rows from before the switch: named at start, never read again
    old = Journal(tmp_path / "state" / "wa-worker.db")
    old.add_inbound("acme", "c1", "in1", {})
    old.close()
    settings = make_settings(tmp_path, "http://127.0.0.1:9", DATABASE_URL=db)
    with caplog.at_level(logging.WARNING):
        journal = _open_journal(settings, Clock())
    try:
        assert isinstance(journal, PgJournal) and journal.counts()["inbound_pending"] == 0
        assert "still holds 1 inbound message(s)" in caplog.text and "JOURNAL_IN_DATABASE=false" in caplog.text
    finally:
        journal.close()
    file_journal = _open_journal(make_settings(tmp_path, "http://127.0.0.1:9", DATABASE_URL=db,
                                               JOURNAL_IN_DATABASE=False), Clock())
    try:
        assert not isinstance(file_journal, PgJournal) and file_journal.counts()["inbound_pending"] == 1
    finally:
        file_journal.close()
    checks = {c.name: c for c in local_checks(settings)}
    assert checks["journal"].mark == OK and "wa_worker_journal at version 1" in checks["journal"].detail
    bad = make_settings(tmp_path, "http://127.0.0.1:9", DATABASE_URL=db.rsplit("/", 1)[0] + "/no_such_db")
    with pytest.raises(StartupError, match="the journal in DATABASE_URL"):
        _open_journal(bad, Clock())
    assert {c.name: c for c in local_checks(bad)}["journal"].mark == FAIL


# ------------------------------------------------------------------------- the real process


def _sent_bodies(*homes: Path) -> Counter[str]:
    out: Counter[str] = Counter()
    for home in homes:
        for path in (home / "auth").glob("*/simulator-sent.jsonl"):
            for line in path.read_text().splitlines():
                try:
                    out[json.loads(line)["body"]] += 1
                except (ValueError, KeyError):
                    pass
    return out


def _kill9(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


@pytest.mark.slow
async def test_a_new_container_without_the_volume_delivers_what_a_killed_one_journaled(
        proxy: FakeProxy, tmp_path: Path, db: str) -> None:
    """Sessions and journal in PostgreSQL: a worker killed with inbound and outcomes it could not
    deliver (the proxy failing), replaced by one on an empty disk under another name, which
    delivers all of it and sends nothing twice."""
    proxy.add_instance("acme")
    first, second = tmp_path / "pod-1", tmp_path / "pod-2"
    env = worker_env(first, proxy.url, DATABASE_URL=db, WORKER_ID="pod-1")
    base = f"http://127.0.0.1:{env['PORT']}"
    proc = start_worker(env, ROOT, tmp_path / "w1.log")
    try:
        await wait_until(lambda: proxy.status_of("acme") == "CONNECTED", timeout=20)
        proxy.fixed_status["inbound"] = 500
        proxy.fixed_status["mark-sent"] = 500
        wa_ids = []
        async with httpx.AsyncClient() as http:
            for i in range(6):
                r = await http.post(f"{base}/simulator/instances/acme/inbound", headers=AUTH,
                                    json={"from": f"55119000000{i % 2}", "body": f"in {i}"})
                wa_ids.append(r.json()["wa_message_id"])
        for i in range(6):
            proxy.enqueue("acme", f"m{i}", "5511988887777", f"out {i}")
        await wait_until(lambda: sum(_sent_bodies(first).values()) == 6, what="6 sent")
        await wait_until(lambda: proxy.calls["mark-sent"] >= 6 and proxy.calls["inbound"] >= 6)
        _kill9(proc)
        assert proxy.inbound == [] and not proxy.sent_marks
        proxy.fixed_status.clear()
        env2 = worker_env(second, proxy.url, DATABASE_URL=db, WORKER_ID="pod-2")
        proc = start_worker(env2, ROOT, tmp_path / "w2.log")
        await wait_until(lambda: len(proxy.sent_marks) == 6 and len(proxy.inbound) == 6, timeout=30,
                         what="everything delivered by the new container")
        await anyio.sleep(0.5)
        assert _sent_bodies(first, second) == Counter(f"out {i}" for i in range(6))
        assert sorted(proxy.inbound_ids()) == sorted(wa_ids)
        assert proxy.status_of("acme") == "CONNECTED"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_prepared_statements_off_behind_a_pooler_that_does_not_keep_them(tmp_path: Path, db: str,
                                                                          pg_server: PgServer) -> None:  # noqa: F811
    """Two workers' journals through PgBouncer in transaction mode with one server connection and a
    URL without docs/fleet.md's marker: their prepared statements collide there, the journal turns
    them off and every call still answers; with the marker they are never on."""
    bouncer = PgBouncer(pg_server, db.rsplit("/", 1)[1], pool_size=1)
    bouncer.start()
    plain = bouncer.url().replace("&binary_parameters=yes", "")
    journals = [PgJournal(plain, worker_id=f"w-{n}") for n in range(2)]
    try:
        for n in range(20):
            for j in journals:
                assert j.add_inbound("acme", "c1", f"in-{j.owner}-{n}", {})
                j.outbound_get("m1")
        assert any(not j._pg.prepared for j in journals)
        assert journals[0].counts()["inbound_pending"] == 40
        marked = PgJournal(bouncer.url(), worker_id="w-m")
        assert not marked._pg.prepared
        marked.close()
    finally:
        for j in journals:
            j.close()
        bouncer.stop()


def test_a_schema_change_under_prepared_statements_costs_one_call(db: str) -> None:
    """A newer worker adding a column (a rolling upgrade): a prepared ``SELECT *`` fails once, the
    connection is dropped, and after reconnecting the same call answers."""
    j = PgJournal(db, worker_id="w-a")
    try:
        assert j.begin_send("m1", "acme", "to")
        for _ in range(3):
            assert j.outbound_get("m1") is not None  # prepared by now
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute("ALTER TABLE wa_worker_journal.outbound ADD COLUMN added_later TEXT")
        with pytest.raises(JournalUnavailable, match="cached plan"):
            j.outbound_get("m1")
        assert not j.writable
        j.reconnect()
        assert j.probe_writable() and j.outbound_get("m1") is not None
    finally:
        j.close()
