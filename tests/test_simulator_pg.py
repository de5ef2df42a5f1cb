"""The simulator's sessions in PostgreSQL (issue #13): with ``DATABASE_URL`` a
simulated instance paired on one worker resumes on another one reading the same
database, and a logout removes it for all. Against a real PostgreSQL 15."""

from __future__ import annotations

import itertools
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.conftest import connect, make_settings, running_worker, wait_until
from tests.fakeproxy import FakeProxy
from tests.pg_helpers import PgServer, pg_server  # noqa: F401 - the fixture
from tests.proc import start_worker, worker_env
from wa_worker.backends import make_backend
from wa_worker.backends.base import Connected, LoggedOut, QrCode
from wa_worker.backends.simstore import SimulatorPgStore, SimulatorStoreUnavailable
from wa_worker.backends.simulator import SimulatorBackend

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

_names = itertools.count()


@pytest.fixture
def db(pg_server: PgServer) -> str:  # noqa: F811 - the fixture
    return pg_server.create_database(f"sim_{next(_names)}")


class Events:
    def __init__(self) -> None:
        self.seen: list[Any] = []

    async def __call__(self, event: Any) -> None:
        self.seen.append(event)

    def kinds(self) -> list[type]:
        return [type(e) for e in self.seen]


async def test_two_simulator_backends_on_one_database_see_one_session(tmp_path: Path, db: str, pg_server):  # noqa: F811
    a = SimulatorBackend(tmp_path / "a", database_url=db, connect_delay_s=0.01)
    b = SimulatorBackend(tmp_path / "b", database_url=db, connect_delay_s=0.01)
    async with a, b:  # both running before the pairing: b learns of it when it opens the instance
        assert a.stored_instances() == [] and b.stored_instances() == []
        ev_a = Events()
        sa = await a.open_session("acme", ev_a)
        await sa.connect()
        await wait_until(lambda: sa.state == "qr", what="QR on worker a")
        sa.scan()
        first = await wait_until(lambda: next((e for e in ev_a.seen if isinstance(e, Connected)), None),
                                 what="paired on a")
        assert a.has_session("acme") and not (tmp_path / "a" / "acme" / "simulator-session.json").exists()
        await sa.disconnect()

        ev_b = Events()
        sb = await b.open_session("acme", ev_b)
        await sb.connect()
        moved = await wait_until(lambda: next((e for e in ev_b.seen if isinstance(e, Connected)), None),
                                 what="resumed on b")
        assert moved.jid == first.jid and QrCode not in ev_b.kinds(), "the same phone, no QR"
        assert b.has_session("acme")

        # logout (the phone unlinks the device, seen on b): gone for every worker
        await sb.logout()
        assert LoggedOut in ev_b.kinds()
        assert pg_server.scalar("select count(*) from wa_worker_simulator_sessions",
                                dbname=db.rsplit("/", 1)[1]) == 0
        ev_a2 = Events()
        sa2 = await a.open_session("acme", ev_a2)
        await sa2.connect()
        await wait_until(lambda: QrCode in ev_a2.kinds(), what="a fresh QR on a")
        assert not a.has_session("acme") and Connected not in ev_a2.kinds()
        await sa2.close()

    c = SimulatorBackend(tmp_path / "c", database_url=db)
    async with c:
        assert c.stored_instances() == []


async def test_a_simulated_instance_moves_to_another_worker(tmp_path: Path, db: str):
    proxy = await FakeProxy().start()
    try:
        proxy.add_instance("acme")
        seen = 0
        for n, pair in ((1, True), (2, False)):
            settings = make_settings(tmp_path / f"w{n}", proxy.url, DATABASE_URL=db)
            backend = make_backend(settings)
            assert isinstance(backend, SimulatorBackend) and backend.pg is not None
            backend.connect_delay_s = 0.01
            async with running_worker(settings, backend=backend) as w:
                if pair:
                    await connect(w, proxy)
                else:  # worker 2 never saw it pair: it resumes the stored session at start, no QR
                    assert backend.stored_instances() == ["acme"]
                    await wait_until(lambda: proxy.status_of("acme") == "CONNECTED", what="resumed on worker 2")
                    assert not any(s["qr_code"] for s in proxy.statuses[seen:])
                    assert not (tmp_path / "w1" / "auth" / "acme" / "simulator-session.json").exists()
            seen = len(proxy.statuses)
            await wait_until(lambda: proxy.status_of("acme") == "DISCONNECTED", what="stopped")
    finally:
        await proxy.stop()


def test_the_worker_process_keeps_simulated_sessions_in_the_database_or_refuses_to_start(db: str, tmp_path: Path):
    """``wa-worker`` (simulator) with an unreachable DATABASE_URL: one line without the password,
    exit 2; with a reachable one it creates its table and serves."""
    env = worker_env(tmp_path, "http://127.0.0.1:9", WA_BACKEND="simulator",
                     DATABASE_URL="postgres://wa:s3cret-pass@127.0.0.1:9/wa?sslmode=disable")
    res = subprocess.run([sys.executable, "-m", "wa_worker"], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("wa-worker: DATABASE_URL: simulator session store (postgres://***@127.0.0.1:9/wa")
    assert "s3cret-pass" not in res.stderr + res.stdout and len(res.stderr.strip().splitlines()) == 1

    env["DATABASE_URL"] = db
    proc = start_worker(env, tmp_path, tmp_path / "worker.log")
    try:
        deadline = time.monotonic() + 30
        while "simulator sessions in PostgreSQL" not in (tmp_path / "worker.log").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0, (tmp_path / "worker.log").read_text()


async def test_an_unreachable_database_fails_without_the_password():
    store = SimulatorPgStore("postgres://wa:s3cret-pw@127.0.0.1:1/wa", connect_timeout_s=1)
    with anyio.fail_after(10):
        with pytest.raises(SimulatorStoreUnavailable) as err:
            await store.open()
    assert "s3cret-pw" not in str(err.value) and "***" in str(err.value)
    backend = SimulatorBackend(Path("/nonexistent"), database_url="postgres://wa:s3cret-pw@127.0.0.1:1/wa")
    backend.pg = store
    with anyio.fail_after(10), pytest.raises(OSError):
        async with backend:
            pass
