"""WhatsApp sessions in PostgreSQL (DATABASE_URL): the real neonize/whatsmeow
Go library, offline, against a real PostgreSQL 15 (docs/fleet.md).

What Go loaded is read back from Go itself (``GetMe`` on the attempt's client)
and from whatsmeow's own tables (a contact written through that client)."""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.neonize_helpers import Recorder, StalledProxy, jid, push_event, wait_no_go_threads
from tests.pg_helpers import PgBouncer, PgServer, pg_server  # noqa: F401 - the fixture
from tests.proc import start_worker, worker_env
from wa_worker.backends.base import Disconnected
from wa_worker.backends.neonize import NeonizeBackend
from wa_worker.backends.neonize.loading import NeonizeLib
from wa_worker.backends.neonize.pgstore import SessionStoreUnavailable, store_urls
from wa_worker.config import ConfigError, load_settings
from wa_worker.doctor import FAIL, OK, local_checks

pytestmark = [pytest.mark.neonize, pytest.mark.postgres, pytest.mark.slow, pytest.mark.timeout(120)]

PAIR = 2  # neonize event code of PairStatus
_db_seq = itertools.count()

FIRST = "5511999990001:7@s.whatsapp.net"  # stored first: what "the first device" would return
ACME = "5511999990002:3@s.whatsapp.net"


@pytest.fixture
def sessions_db(pg_server: PgServer) -> tuple[PgServer, str, str]:  # noqa: F811 - the fixture
    """(server, database name, DATABASE_URL) of a fresh database."""
    name = f"wa_sessions_{os.getpid()}_{next(_db_seq)}"
    pg_server.create_database(name)
    return pg_server, name, pg_server.dsn(name) + "?sslmode=disable"


def fabricate_device(server: PgServer, db: str, device_jid: str) -> None:
    """A paired device row as whatsmeow writes it on PairSuccess (random keys of the right sizes)."""

    def key(n: int) -> str:
        return f"'\\x{secrets.token_hex(n)}'::bytea"

    server.psql(
        "insert into whatsmeow_device (jid, registration_id, noise_key, identity_key, signed_pre_key, "
        "signed_pre_key_id, signed_pre_key_sig, adv_key, adv_details, adv_account_sig, adv_account_sig_key, "
        f"adv_device_sig, platform, business_name, push_name) values ('{device_jid}', 1234, {key(32)}, "
        f"{key(32)}, {key(32)}, 1, {key(64)}, {key(32)}, {key(20)}, {key(64)}, {key(32)}, {key(64)}, "
        "'android', '', 'me')", db)


async def put_push_name(session: Any, phone: str, name: bytes) -> None:
    """One of whatsmeow's own store writes (a contact's push name), through the session's Go client."""
    nz = NeonizeLib.get()
    contact = jid(phone).SerializeToString()
    att = session._attempt
    await session._go_call("PutPushName", lambda: nz.gocode.PutPushName(att.uuid, contact, len(contact), name),
                           timeout_s=10)


async def dialing(backend: NeonizeBackend, iid: str, rec: Recorder) -> Any:
    """A session whose Go client is up and stuck dialing (a silent upstream proxy)."""
    session = await backend.open_session(iid, rec)
    await session.connect()
    att = session._attempt
    deadline = time.monotonic() + 10
    while att.ticket.connections == 0:
        assert time.monotonic() < deadline, "the Go client never reached the relay"
        await asyncio.sleep(0.02)
    return session


async def loaded_device(session: Any) -> str:
    """The device JID Go's client of this attempt holds ("" for a new, unpaired device)."""
    nz = NeonizeLib.get()
    att = session._attempt
    raw = await session._go_call("GetMe", lambda: nz.gocode.GetMe(att.uuid), timeout_s=10)
    me = nz.pb.Device.FromString(raw)
    if not me.HasField("JID") or not me.JID.User:
        return ""
    return f"{me.JID.User}:{me.JID.Device}@{me.JID.Server}"


def whatsmeow_conns(server: PgServer, db: str) -> int:
    """Connections the Go side holds to ``db`` (lib/pq sets no application_name)."""
    return int(server.scalar(f"select count(*) from pg_stat_activity where datname = '{db}' "
                             "and coalesce(application_name, '') = ''"))


@pytest.mark.parametrize("via", ["direct", "pgbouncer"])
def test_pairing_maps_the_instance_and_a_restart_reopens_its_own_device(sessions_db, tmp_path: Path, via) -> None:
    """Also through PgBouncer in transaction mode (``binary_parameters=yes`` for lib/pq,
    ``DATABASE_IDLE_TIMEOUT_S=0``): whatsmeow's schema, device load by JID, writes, cascade."""
    server, db, url = sessions_db
    bouncer = None
    if via == "pgbouncer":
        bouncer = PgBouncer(server, db, pool_size=2)
        bouncer.start()
        url = bouncer.url()
    try:
        asyncio.run(_pairing_story(server, db, url, tmp_path, idle_s=0.0 if bouncer else 60.0))
    finally:
        if bouncer is not None:
            log = bouncer.log_tail()
            bouncer.stop()
            assert " ERROR " not in log, log


# long: one story across a restart, each step checked against the database and Go
async def _pairing_story(server: PgServer, db: str, url: str, tmp_path: Path, idle_s: float) -> None:
    async with StalledProxy() as stalled:
        def make() -> NeonizeBackend:
            return NeonizeBackend(tmp_path / "auth", connect_timeout_s=30, upstream_proxy=stalled.url,
                                  database_url=url, database_idle_timeout_s=idle_s)

        backend = make()
        async with backend:
            assert not backend.has_session("acme") and backend.stored_instances() == []
            seed = await dialing(backend, "seed", Recorder())  # its Go start creates whatsmeow's tables
            await seed.close()
            fabricate_device(server, db, FIRST)  # another account, stored first

            rec = Recorder()
            session = await dialing(backend, "acme", rec)
            # a new device, never "the first stored" (that would be somebody else's account)
            assert await loaded_device(session) == ""
            # the phone scanned: whatsmeow stored the device, then told us
            fabricate_device(server, db, ACME)
            att = session._attempt
            await push_event(att.callbacks, att.uuid, PAIR,
                             NeonizeLib.get().pb.PairStatus(Status=2, ID=jid("5511999990002", device=3)))
            rows = server.query("select instance_id, jid from wa_worker_sessions", db)
            assert rows == [{"instance_id": "acme", "jid": ACME}]
            assert backend.has_session("acme") and backend.stored_instances() == ["acme"]
            assert not (tmp_path / "auth" / "acme").exists()  # nothing on disk
            await session.close()
        await wait_no_go_threads(10)

        backend = make()  # a restart (or another worker on the same database)
        async with backend:
            assert backend.stored_instances() == ["acme"]
            session = await dialing(backend, "acme", Recorder())
            assert await loaded_device(session) == ACME
            # whatsmeow's own store writes land under that device
            await put_push_name(session, "5511888880000", b"Alice")
            assert server.query("select our_jid, push_name from whatsmeow_contacts", db) == [
                {"our_jid": ACME, "push_name": "Alice"}]
            await session.close()

            # the phone logged the device out: the runner forgets the session
            await backend.forget_session("acme")
            assert server.query("select * from wa_worker_sessions", db) == []
            assert server.query("select jid from whatsmeow_device order by jid", db) == [{"jid": FIRST}]
            assert server.query("select * from whatsmeow_contacts", db) == []  # cascaded
            assert not backend.has_session("acme") and backend.stored_instances() == []
        await wait_no_go_threads(10)


def test_a_mapping_whose_device_is_gone_pairs_again_instead_of_crashing_go(sessions_db, tmp_path: Path) -> None:
    server, db, url = sessions_db

    async def main() -> None:
        async with StalledProxy() as stalled:
            backend = NeonizeBackend(tmp_path / "auth", connect_timeout_s=30, upstream_proxy=stalled.url,
                                     database_url=url)
            async with backend:
                seed = await dialing(backend, "seed", Recorder())
                await seed.close()
                # whatsmeow deleted the device (a logout seen while this worker was down)
                server.psql(f"insert into wa_worker_sessions (instance_id, jid) values ('acme', '{ACME}')", db)
                assert not backend.has_session("acme")
                session = await dialing(backend, "acme", Recorder())
                assert await loaded_device(session) == ""  # a fresh device: a new QR
                assert server.query("select * from wa_worker_sessions", db) == []
                await session.close()
            await wait_no_go_threads(10)

    asyncio.run(main())


def test_idle_session_connections_are_closed_and_go_reconnects_on_its_next_query(sessions_db, tmp_path) -> None:
    """goneonize opens a pool per attempt and never closes it; DATABASE_IDLE_TIMEOUT_S
    makes the server end idle connections, and lib/pq opens a new one when needed."""
    server, db, url = sessions_db

    async def main() -> None:
        async with StalledProxy() as stalled:
            backend = NeonizeBackend(tmp_path / "auth", connect_timeout_s=30, upstream_proxy=stalled.url,
                                     database_url=url, database_idle_timeout_s=1.0)
            async with backend:
                seed = await dialing(backend, "seed", Recorder())
                await seed.close()
                fabricate_device(server, db, ACME)
                server.psql(f"insert into wa_worker_sessions (instance_id, jid) values ('acme', '{ACME}')", db)
                # three attempts that failed at once (no relay ticket works without the proxy) …
                for i in range(3):
                    rec = Recorder()
                    s = await backend.open_session(f"offline{i}", rec)
                    s.upstream_proxy = "http://127.0.0.1:9"  # nothing listens: the dial fails at once
                    await s.connect()
                    await rec.wait_for(lambda e: isinstance(e, Disconnected))
                    await s.close()
                session = await dialing(backend, "acme", Recorder())
                assert whatsmeow_conns(server, db) >= 4  # one pool per Go client, never closed by goneonize
                deadline = time.monotonic() + 10
                while whatsmeow_conns(server, db) > 0:
                    assert time.monotonic() < deadline, "idle connections were not closed"
                    await asyncio.sleep(0.2)
                # the live client's pool lost its connection: its next write still lands
                await put_push_name(session, "5511888880000", b"Bob")
                assert server.query("select our_jid, push_name from whatsmeow_contacts", db) == [
                    {"our_jid": ACME, "push_name": "Bob"}]
                await session.close()
            await wait_no_go_threads(10)

    asyncio.run(main())


def test_an_unreachable_database_fails_the_start_without_the_password(tmp_path: Path) -> None:
    async def main() -> None:
        backend = NeonizeBackend(tmp_path / "auth", database_url="postgres://wa:s3cret-pass@127.0.0.1:9/wa?sslmode=disable")
        with pytest.raises(SessionStoreUnavailable) as info:
            async with backend:
                pass
        text = str(info.value)
        assert "s3cret-pass" not in text and "postgres://***@127.0.0.1:9/wa" in text

    asyncio.run(main())


def test_the_worker_process_keeps_sessions_in_the_database_or_refuses_to_start(sessions_db, tmp_path: Path) -> None:
    """``wa-worker`` with DATABASE_URL: it creates wa_worker_sessions and serves; with an
    unreachable database it prints one line without the password and exits 2."""
    server, db, url = sessions_db
    env = worker_env(tmp_path, "http://127.0.0.1:9", WA_BACKEND="neonize", NEONIZE_BOT_TAG="off",
                     DATABASE_URL="postgres://wa:s3cret-pass@127.0.0.1:9/wa?sslmode=disable")
    res = subprocess.run([sys.executable, "-m", "wa_worker"], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    assert "DATABASE_URL: session store (postgres://***@127.0.0.1:9/wa" in res.stderr
    assert "s3cret-pass" not in res.stderr + res.stdout

    env["DATABASE_URL"] = url
    proc = start_worker(env, tmp_path, tmp_path / "worker.log")
    try:
        deadline = time.monotonic() + 30
        while server.scalar("select to_regclass('wa_worker_sessions') is not null", db) is not True:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
            time.sleep(0.1)
        while True:  # the table came first (the start-up check), the HTTP server next
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{env['PORT']}/health", timeout=5) as resp:
                    assert resp.status == 200
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
                time.sleep(0.1)
        assert not (tmp_path / "auth").exists() or not any((tmp_path / "auth").iterdir())
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    log = (tmp_path / "worker.log").read_text()
    assert "neonize sessions in PostgreSQL: postgresql://***@127.0.0.1" in log


def test_doctor_checks_the_database(sessions_db, tmp_path: Path) -> None:
    server, db, url = sessions_db
    base = {"EDGE_BASE_URL": "http://127.0.0.1:1", "WORKER_SECRET": "x" * 16, "AUTH_DIR": tmp_path / "a",
            "STATE_DB": tmp_path / "s.db"}
    row = next(c for c in local_checks(load_settings(**base, DATABASE_URL=url)) if c.name == "DATABASE_URL")
    assert row.mark == OK and "reachable" in row.detail, row
    assert server.scalar("select to_regclass('wa_worker_sessions') is not null", db) is True
    bad = "postgres://wa:s3cret-pass@127.0.0.1:9/wa?sslmode=disable"
    row = next(c for c in local_checks(load_settings(**base, DATABASE_URL=bad)) if c.name == "DATABASE_URL")
    assert row.mark == FAIL and "connection failed" in row.detail and "s3cret-pass" not in row.detail, row


def test_database_url_is_validated_without_echoing_it() -> None:
    base = {"EDGE_BASE_URL": "http://127.0.0.1:1", "WORKER_SECRET": "x" * 16}
    for bad in ("mysql://u:topsecret@h/db", "postgres://u:topsecret@/db", "postgres://u:topsecret@h",
                "postgres://u:topsecret@h:notaport/db"):
        with pytest.raises(ConfigError) as info:
            load_settings(**base, DATABASE_URL=bad)
        assert "DATABASE_URL" in str(info.value) and "topsecret" not in str(info.value)
    ok = load_settings(**base, DATABASE_URL="postgresql://u:p@db.internal:5432/wa")
    assert ok.database_url == "postgresql://u:p@db.internal:5432/wa" and "p@db" not in repr(ok)
    assert load_settings(**base, DATABASE_URL="").database_url is None


def test_the_go_dsn_gets_the_idle_bound_and_one_sslmode_rule() -> None:
    own, go = store_urls("postgres://u:p@h/db", 60)
    assert own == "postgres://u:p@h/db?sslmode=require"
    assert go == "postgres://u:p@h/db?sslmode=require&options=-c%20idle_session_timeout%3D60000"
    own, go = store_urls("postgres://u:p@h/db?sslmode=disable", 0)
    assert own == go == "postgres://u:p@h/db?sslmode=disable"
    # lib/pq-only parameters (PgBouncer's transaction mode) reach Go only: libpq refuses them
    own, go = store_urls("postgres://u:p@h:6432/db?sslmode=disable&binary_parameters=yes", 0)
    assert own == "postgres://u:p@h:6432/db?sslmode=disable"
    assert go == "postgres://u:p@h:6432/db?sslmode=disable&binary_parameters=yes"
    # an operator's own options (e.g. for a pooler) are left alone
    _, go = store_urls("postgres://u:p@h/db?sslmode=disable&options=-c%20search_path%3Dwa", 60)
    assert go == "postgres://u:p@h/db?sslmode=disable&options=-c%20search_path%3Dwa"
