"""What the cluster test (tests/test_cluster.py) found, each pinned down on its own (issue #13)."""

from __future__ import annotations

import anyio
import pytest

from tests.conftest import connect, make_settings, running_worker, wait_until
from tests.fakeleases import LeaseBook
from tests.fakeproxy import SECRET, FakeProxy
from tests.pg_helpers import pg_server  # noqa: F401 - the fixture
from wa_worker.backends.neonize.pgstore import PgSessionStore
from wa_worker.backends.simstore import SimulatorPgStore
from wa_worker.dev.background import BackgroundProxy
from wa_worker.dev.store import DevStore

pytestmark = pytest.mark.anyio


async def test_a_batch_claim_for_an_instance_still_connecting_is_sent_once_it_connects(tmp_path):
    """A batch poll may claim messages of an instance whose session is (re)connecting here: a proxy
    counts it as connected from the last status it heard (a lease that just moved here, the old
    holder's CONNECTED still standing). They were dropped, left ``sending`` at the proxy until its
    re-offer minutes later; they are sent once the session is up."""
    proxy = FakeProxy(batch=True, claim=True)  # claim: each message handed out once
    proxy.add_instance("a")
    proxy.add_instance("b")
    await proxy.start()
    try:
        async with running_worker(make_settings(tmp_path, proxy.url)) as w:
            await connect(w, proxy, "a")
            await connect(w, proxy, "b")
            w.backend.fail_connects["b"] = 2  # b's next dials fail: it reconnects with a backoff (1-2 s, then 2-4 s)
            await w.backend.session("b").drop()
            await wait_until(lambda: w.manager.runners["b"].state.value != "connected", what="b reconnecting")
            proxy.enqueue("b", "m1", "5511988887777", "while b reconnects")
            await wait_until(lambda: not proxy.queue["b"], what="m1 claimed by the batch poll")
            assert w.manager.runners["b"].state.value != "connected"  # claimed while b was not connected
            await wait_until(lambda: "m1" in proxy.sent_marks, timeout=20, what="m1 sent once b is back")
            assert [r["body"] for r in w.backend.sent("b")] == ["while b reconnects"]
    finally:
        await proxy.stop()


async def test_a_worker_past_its_fencing_deadline_claims_nothing_before_a_renewal(tmp_path):
    """Self-fencing is decided by the clock, not only by the renewal loop: a process frozen past
    ttl/2 (SIGSTOP, a VM pause) whose batch poll runs first on resume must not claim (the contract:
    "claims nothing until a renewal succeeds again"); its leased runners stop."""
    proxy = FakeProxy(batch=True, lease_book=LeaseBook(ttl_s=30.0))  # renewals every 10 s
    proxy.add_instance("acme")
    await proxy.start()
    try:
        async with running_worker(make_settings(tmp_path, proxy.url, WORKER_ID="w-a")) as w:
            await connect(w, proxy)
            keeper = w.manager.leases
            await wait_until(lambda: keeper.last_ok is not None and proxy.calls["queued-messages"] > 0,
                             what="renewed and polling")
            renewals = len(proxy.lease_calls)
            keeper.last_ok -= 20.0  # as if frozen for 20 s since the last renewal (> ttl/2)
            assert keeper.may_claim("acme") is False
            assert keeper.fenced
            seen: list[int] = []  # each claim after the freeze: how many renewals had been made by then
            proxy.on_queue_call = lambda _iid: seen.append(len(proxy.lease_calls))
            proxy.enqueue("acme", "m1", "5511988887777", "after the freeze")
            w.wake("acme")
            await wait_until(lambda: "m1" in proxy.sent_marks, timeout=25, what="m1 sent after a renewal")
            assert seen and min(seen) > renewals, (seen, renewals)  # no claim before a renewal succeeded
            assert w.backend.has_session("acme")  # stopped without logout, resumed after the renewal
    finally:
        await proxy.stop()


@pytest.mark.postgres
async def test_workers_starting_together_on_a_new_database_all_start(pg_server):  # noqa: F811
    """Several workers started at once on a fresh database each create the session tables "if not
    exists": concurrently, PostgreSQL answers all but one with a unique violation (in pg_type), and
    those workers exited 2 (the cluster test's first run on the Supabase kit lost one of three)."""
    for rnd in range(4):
        url = pg_server.create_database(f"race_{rnd}")
        sim = [SimulatorPgStore(url) for _ in range(6)]
        neo = [PgSessionStore(url + "?sslmode=disable", idle_timeout_s=0) for _ in range(6)]
        try:
            async with anyio.create_task_group() as tg:
                for s in sim:
                    tg.start_soon(s.open)
                for n in neo:
                    tg.start_soon(anyio.to_thread.run_sync, n.open)
        finally:
            for s in sim:
                await s.close()
            for n in neo:
                n.close()


async def test_a_planned_move_on_the_dev_proxy_hands_unsent_claims_to_the_next_holder(tmp_path):
    """The cluster test's 0-8 ``delivery_unknown`` per run: a worker stopped (SIGTERM's path) with a
    message claimed and never begun. Against the real dev proxy its release hands the claim back, and
    the next holder sends it once, as a clean claim."""
    store = DevStore(tmp_path / "proxy.db")
    try:
        with BackgroundProxy(store, SECRET, lease_ttl_s=6.0) as bp:
            store.add_instance("acme")
            first = make_settings(tmp_path / "a", bp.url, WORKER_ID="w-a", NUMBER_LOOKUPS_PER_MINUTE=1,
                                  SIMULATOR_AUTO_SCAN_MS=20)
            async with running_worker(first) as wa:
                await wait_until(lambda: store.get_instance("acme")["status"] == "CONNECTED", what="on w-a")
                one = store.queue_message("acme", "5511988880001", "first", {})["id"]
                two = store.queue_message("acme", "5511988880002", "second: its lookup waits", {})["id"]
                wa.wake("acme")
                await wait_until(lambda: store.get_message(one)["status"] == "sent" and wa.journal.claimed_here(two),
                                 what="one sent, two claimed")
                assert wa.journal.outbound_get(two) is None
            assert store.get_message(two)["status"] == "queued"  # handed back at the release
            assert bp.proxy.unsent == {"requeued": 1, "ignored": 0}
            second = make_settings(tmp_path / "b", bp.url, WORKER_ID="w-b", NUMBER_LOOKUPS_PER_MINUTE=0,
                                   SIMULATOR_AUTO_SCAN_MS=20)
            async with running_worker(second) as wb:
                await wait_until(lambda: store.get_message(two)["status"] == "sent", what="two sent by w-b")
                assert wb.outbound.prior_claims == {}
                assert [m["body"] for m in wb.backend.sent("acme")] == ["second: its lookup waits"]
            assert [m["body"] for m in wa.backend.sent("acme")] == ["first"]
    finally:
        store.close()
