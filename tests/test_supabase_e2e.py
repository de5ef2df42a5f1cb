"""The Python worker (simulator backend) end to end against the Supabase kit:
the real edge function under Deno, on a real PostgreSQL 15."""

from __future__ import annotations

import anyio
import pytest

from tests.conftest import make_settings, running_worker, wait_until
from tests.pg_helpers import (
    EdgeFunction,
    WaDb,
    clean_wa_db,
    edge_function,
    pg_server,
    wa_db,
)
from wa_worker.relays.inbound import inbound_payload

pytestmark = [pytest.mark.anyio, pytest.mark.postgres, pytest.mark.deno, pytest.mark.slow]
# fixtures, requested by name below
FIXTURES = (clean_wa_db, edge_function, pg_server, wa_db)


# long: the whole contract against the real function, one step after the other
async def test_worker_against_the_supabase_function(clean_wa_db: WaDb, edge_function: EdgeFunction, tmp_path):
    db = clean_wa_db
    db.insert_instance("acme")
    settings = make_settings(tmp_path, edge_function.base_url, WORKER_SECRET=edge_function.secret,
                             EDGE_TIMEOUT_S=10)

    def row(iid: str = "acme") -> dict:
        return db.instance(iid) or {}

    async def poll(cond, within: float = 20.0, what: str = "condition"):
        # psql round trips are blocking: run the check in a thread
        async def check():
            return await anyio.to_thread.run_sync(cond)

        deadline = anyio.current_time() + within
        while True:
            if await check():
                return
            if anyio.current_time() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await anyio.sleep(0.1)

    async with running_worker(settings) as w:
        # QR → connected
        await poll(lambda: row()["status"] == "CONNECTING" and (row()["qr_code"] or "").startswith(
            "data:image/png;base64,"), what="QR stored")
        w.backend.session("acme").scan()
        await poll(lambda: row()["status"] == "CONNECTED" and row()["qr_code"] is None, what="CONNECTED")
        assert row()["phone_number"] == w.backend.session("acme").jid.split("@")[0]
        # the kit serves every instance in one call
        await wait_until(lambda: w.manager.batch_supported is True, what="batch mode detected")

        # queued → sent → marked, in order; an invalid recipient → failed
        ids = [db.insert_outbound("acme", "+55 11 98888-7777", f"olá {i}") for i in range(3)]
        bad = db.insert_outbound("acme", "12", "nope")
        w.wake("acme")
        await poll(lambda: all(db.outbound(i)["status"] == "sent" for i in ids), what="sent")
        await poll(lambda: db.outbound(bad)["status"] == "failed", what="failed")
        sent = w.backend.sent("acme")
        assert [s["body"] for s in sent] == ["olá 0", "olá 1", "olá 2"]
        assert [db.outbound(i)["wa_message_id"] for i in ids] == [s["wa_message_id"] for s in sent]
        assert db.outbound(bad)["error"].startswith("invalid recipient")

        # inbound stored once, even when replayed
        s = w.backend.session("acme")
        wa_id = await s.receive("5511977776666", "chegou?", push_name="Ana")
        await poll(lambda: len(db.inbound_rows("acme")) == 1, what="inbound stored")
        stored = db.inbound_rows("acme")[0]
        assert stored["wa_message_id"] == wa_id and stored["body"] == "chegou?"
        # a replay: the same message delivered again (as after a lost response)
        from wa_worker.backends.base import InboundMessage

        replay = inbound_payload("acme", InboundMessage(wa_message_id=wa_id, chat_jid="5511977776666@s.whatsapp.net",
                                                        sender_jid="5511977776666@s.whatsapp.net", body="chegou?",
                                                        own_jid=s.jid))
        await w.edge.inbound(replay)
        await w.edge.inbound(replay)
        assert len(db.inbound_rows("acme")) == 1

        # a drop is reported and healed
        await s.drop()
        await poll(lambda: row()["status"] == "DISCONNECTED", what="DISCONNECTED")
        await poll(lambda: row()["status"] == "CONNECTED", what="reconnected")
    # graceful stop reports DISCONNECTED
    assert row()["status"] == "DISCONNECTED"
    # nothing was sent twice
    assert len(w.backend.sent("acme")) == 3


async def test_poisoned_inbound_does_not_block_its_chat(clean_wa_db: WaDb, edge_function: EdgeFunction, tmp_path):
    """A message with NUL characters used to be a 500, retried forever, holding back its whole chat."""
    db = clean_wa_db
    db.insert_instance("acme")
    settings = make_settings(tmp_path, edge_function.base_url, WORKER_SECRET=edge_function.secret,
                             EDGE_TIMEOUT_S=10)

    async def poll(cond, within: float = 20.0, what: str = "condition"):
        deadline = anyio.current_time() + within
        while not await anyio.to_thread.run_sync(cond):
            if anyio.current_time() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {db.inbound_rows('acme')}")
            await anyio.sleep(0.1)

    async with running_worker(settings) as w:
        await poll(lambda: (db.instance("acme") or {}).get("status") == "CONNECTING", what="QR")
        w.backend.session("acme").scan()
        await poll(lambda: (db.instance("acme") or {}).get("status") == "CONNECTED", what="CONNECTED")
        s = w.backend.session("acme")
        poisoned = await s.receive("5511977776666", "zero\x00byte", push_name="A\x00na")
        normal = await s.receive("5511977776666", "depois")
        await poll(lambda: len(db.inbound_rows("acme")) == 2, what="both messages stored")
        rows = db.inbound_rows("acme")
        assert [(r["wa_message_id"], r["body"], r["push_name"]) for r in rows] == [
            (poisoned, "zerobyte", "Ana"), (normal, "depois", None)]
