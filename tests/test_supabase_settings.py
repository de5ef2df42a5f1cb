"""The Supabase kit's per-instance settings (issue #12): the migration (settings,
proxy_url, settings_updated_at, pair_phone, pair_code), ``GET /instance-settings``
and the discovery items of the real function under Deno on PostgreSQL 15, and
the Python worker picking a change up while connected."""

from __future__ import annotations

import uuid

import anyio
import httpx
import pytest

from tests.conftest import make_settings, running_worker
from tests.pg_helpers import (
    SUPABASE_DIR,
    EdgeFunction,
    PgServer,
    WaDb,
    clean_wa_db,
    edge_function,
    migration_files,
    pg_server,
    wa_db,
)
from wa_worker.instances import settings as settings_mod

pytestmark = [pytest.mark.postgres, pytest.mark.slow]
deno = pytest.mark.deno
FIXTURES = (clean_wa_db, edge_function, pg_server, wa_db)  # requested by name below

SETTINGS_MIGRATION = SUPABASE_DIR / "migrations" / "20261127000000_wa_worker_instance_settings.sql"
PW = "kit-pr0xy-pw"


def test_settings_migration_on_a_database_with_rows(pg_server: PgServer) -> None:
    assert migration_files()[3] == SETTINGS_MIGRATION  # later: tests/test_supabase_leases.py
    name = f"wa_settings_{uuid.uuid4().hex[:10]}"
    pg_server.create_database(name)
    db = WaDb(pg_server, name)
    try:
        for path in migration_files()[:3]:
            db.psql(path.read_text())
        db.insert_instance("acme", "CONNECTED", 3)
        db.psql(SETTINGS_MIGRATION.read_text())
        db.psql(SETTINGS_MIGRATION.read_text())  # idempotent, keeps rows
        row = db.instance("acme")
        assert row is not None and row["priority"] == 3 and row["settings"] is None
        assert row["settings_updated_at"] is None and row["pair_code"] is None
        # the trigger: a change of settings or proxy_url is dated, a status change is not
        db.psql("update wa_instances set status = 'DISCONNECTED' where id = 'acme'")
        assert db.instance("acme")["settings_updated_at"] is None
        db.psql("""update wa_instances set settings = '{"call_reject": true}' where id = 'acme'""")
        first = db.instance("acme")["settings_updated_at"]
        assert first is not None
        db.psql("update wa_instances set status = 'CONNECTED' where id = 'acme'")
        assert db.instance("acme")["settings_updated_at"] == first
        db.psql("update wa_instances set proxy_url = 'socks5://127.0.0.1:1080' where id = 'acme'")
        assert db.instance("acme")["settings_updated_at"] > first
        db.insert_instance("born-with", settings={"send_max_per_day": 5})
        assert db.instance("born-with")["settings_updated_at"] is not None
        for bad, constraint in (("settings = '[1]'", "wa_instances_settings_check"),
                                ("proxy_url = 'ftp://h:21'", "wa_instances_proxy_url_check"),
                                ("proxy_url = 'http://h'", "wa_instances_proxy_url_check"),
                                ("pair_phone = '+5511'", "wa_instances_pair_phone_check")):
            out = db.psql(f"update wa_instances set {bad} where id = 'acme'", check=False)
            assert constraint in out.stderr, (bad, out.stderr)
    finally:
        pg_server.psql(f"drop database if exists {name} with (force);")


@pytest.fixture
def fn(edge_function: EdgeFunction, clean_wa_db: WaDb) -> EdgeFunction:
    return edge_function


def _items(fn: EdgeFunction, since: str | None = None) -> tuple[list[dict], str]:
    r = fn.request("GET", "instance-settings", params={"since": since} if since is not None else None)
    assert r.status_code == 200, r.text
    body = r.json()
    return body["instances"], body["cursor"]


@deno
def test_instance_settings_changes_only(fn: EdgeFunction, wa_db: WaDb) -> None:
    wa_db.insert_instance("plain")
    wa_db.insert_instance("acme", settings={"call_reject": True}, proxy_url=f"http://ops:{PW}@127.0.0.1:3128")
    items, cursor = _items(fn)
    assert items == [{"id": "acme", "settings": {"call_reject": True}, "proxy_url": f"http://ops:{PW}@127.0.0.1:3128"}]
    assert cursor.isdigit()
    # a change an hour old is not news to a cursor from now; a new one is
    wa_db.psql("update wa_instances set settings_updated_at = now() - interval '1 hour'")
    assert _items(fn, cursor)[0] == []
    wa_db.psql("""update wa_instances set settings = '{"send_max_per_minute": 2}', proxy_url = null
                  where id = 'plain'""")
    items, later = _items(fn, cursor)
    assert items == [{"id": "plain", "settings": {"send_max_per_minute": 2}, "proxy_url": None}]
    assert int(later) >= int(cursor)
    for bad in ("abc", "-1", "1" * 30):
        assert fn.request("GET", "instance-settings", params={"since": bad}).status_code == 400
    assert fn.request("POST", "instance-settings", json={}).status_code == 405


@deno
def test_discovery_items_carry_settings_pair_phone_and_pair_code(fn: EdgeFunction, wa_db: WaDb) -> None:
    wa_db.insert_instance("plain")
    wa_db.insert_instance("acme", pair_phone="5511999990000", settings={"call_reject": False},
                          proxy_url="socks5://127.0.0.1:1080")
    r = fn.request("GET", "disconnected-instances")
    items = {i["id"]: i for i in r.json()["instances"]}
    assert items["plain"] == {"id": "plain", "priority": 0}  # as before: a first-version worker sees no change
    assert items["acme"] == {"id": "acme", "priority": 0, "pair_phone": "5511999990000",
                             "settings": {"call_reject": False}, "proxy_url": "socks5://127.0.0.1:1080"}
    r = fn.request("POST", "update-status", json={"instanceId": "acme", "status": "CONNECTING",
                                                  "qr_code": "data:image/png;base64,AA", "pair_code": "K3F9-2ZQ1"})
    assert r.status_code == 200, r.text
    assert wa_db.instance("acme")["pair_code"] == "K3F9-2ZQ1"
    fn.request("POST", "update-status", json={"instanceId": "acme", "status": "CONNECTED", "qr_code": None})
    assert wa_db.instance("acme")["pair_code"] is None


@deno
@pytest.mark.anyio
async def test_worker_picks_up_a_settings_change_from_the_kit(clean_wa_db: WaDb, edge_function: EdgeFunction,
                                                              tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(settings_mod, "SETTINGS_POLL_S", 0.5)
    db = clean_wa_db
    db.insert_instance("acme")
    settings = make_settings(tmp_path, edge_function.base_url, WORKER_SECRET=edge_function.secret,
                             EDGE_TIMEOUT_S=10, SIMULATOR_AUTO_SCAN_MS=50, CALL_REJECT=False)

    async def poll(cond, within: float = 20.0, what: str = "condition"):
        deadline = anyio.current_time() + within
        while not await anyio.to_thread.run_sync(cond):
            assert anyio.current_time() < deadline, f"timed out waiting for {what}"
            await anyio.sleep(0.1)

    async with running_worker(settings) as w:
        await poll(lambda: (db.instance("acme") or {}).get("status") == "CONNECTED", what="CONNECTED")
        assert w.manager.settings_poller.supported is True
        db.psql(f"""update wa_instances set settings = '{{"call_reject": true}}',
                    proxy_url = 'http://ops:{PW}@127.0.0.1:3128' where id = 'acme'""")
        await poll(lambda: w.manager.instance_settings.settings("acme") == {"call_reject": True}, within=5,
                   what="the change picked up")
        sim = f"http://127.0.0.1:{w.port}/simulator/instances/acme"
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {edge_function.secret}"}) as http:
            r = await http.post(sim + "/call", json={"from": "5511988887777", "video": False})
            assert r.status_code == 200, r.text
            await poll(lambda: any(r["type"] == "call" for r in db.inbound_rows("acme")), what="call stored")
            assert (await http.post(sim + "/drop")).status_code == 200
        call = next(r for r in db.inbound_rows("acme") if r["type"] == "call")
        assert call["call_rejected"] is True
        await poll(lambda: len(w.backend.connect_proxies["acme"]) == 2, what="reconnect")
        assert w.backend.connect_proxies["acme"] == ["direct", "http://***@127.0.0.1:3128"]
