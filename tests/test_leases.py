"""Leases and fencing, worker side (issue #13; docs/proxy-contract.md, "Leases and fencing").

The real daemon code and simulator against FakeProxy's lease mode (tests/fakeleases.py), and
real ``wa-worker`` processes for SIGTERM hand-over."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import time
from typing import Any

import anyio
import pytest

from tests.conftest import connect, make_settings, running_worker, wait_until
from tests.fakeleases import LeaseBook, LeaseRow
from tests.fakeproxy import SECRET, FakeProxy
from tests.proc import ROOT, start_worker, worker_env
from wa_worker.backends.base import SessionState
from wa_worker.edge.client import EdgeClient, LeaseLost
from wa_worker.edge.models import Status, StatusUpdate

pytestmark = pytest.mark.anyio


def book(proxy: FakeProxy) -> LeaseBook:
    assert proxy.lease_book is not None
    return proxy.lease_book


def lease_settings(tmp_path: Any, proxy: FakeProxy, worker_id: str = "w-a", **extra: Any) -> Any:
    return make_settings(tmp_path, proxy.url, WORKER_ID=worker_id, **extra)


async def claim_one_never_begun(w: Any, proxy: FakeProxy, iid: str) -> None:
    """``m1`` sent and ``m2`` claimed but never begun: the worker's settings allow one number lookup
    a minute (``NUMBER_LOOKUPS_PER_MINUTE=1``), which m1 spent, so m2's waits."""
    proxy.enqueue(iid, "m1", "5511988880001", "first")
    proxy.enqueue(iid, "m2", "5511988880002", "second: its lookup waits")
    w.wake(iid)
    await wait_until(lambda: "m1" in proxy.sent_marks and w.journal.claimed_here("m2"), what="m1 sent, m2 claimed")


async def test_a_granted_lease_starts_a_runner_and_every_call_says_who_is_calling(fleet, tmp_path):
    fleet.add_instance("acme", priority=3)
    async with running_worker(lease_settings(tmp_path, fleet)) as w:
        await connect(w, fleet)
        assert book(fleet).current("acme") == ("w-a", 1)
        assert w.manager.leases.held == {"acme": 1}
        assert w.manager.leases.priority == {"acme": 3}
        # discovery is off with leases; every call carries X-Worker-Id, status pushes the token
        assert fleet.calls["disconnected-instances"] == 0
        assert {s.get("lease_token") for s in fleet.statuses_of("acme")} == {1}
        first = fleet.lease_calls[0]
        assert first == {"worker_id": "w-a", "capacity": 500, "held": [], "release": []}
        fleet.enqueue("acme", "m1", "5511988887777", "hello")
        w.wake("acme")
        await wait_until(lambda: "m1" in fleet.sent_marks, what="m1 acknowledged")
        assert fleet.tokens_seen["queued-messages"][-1] == "1"
        assert fleet.tokens_seen["mark-sent"] == [1]  # the claim token, journaled with the row
        assert w.journal.outbound_get("m1").claim_token == 1
        await w.backend.session("acme").receive("5511977776666", "hi there")
        await wait_until(lambda: fleet.inbound, what="inbound posted")
        assert fleet.tokens_seen["inbound"] == [1]
        assert {"leases", "update-status", "queued-messages", "mark-sent", "inbound"} <= set(fleet.worker_ids)
        for endpoint, ids in fleet.worker_ids.items():
            assert ids == {"w-a"}, endpoint
        assert w.health()["leases"]["mode"] == "leases"


async def test_stored_sessions_resume_only_when_leased(fleet, tmp_path):
    fleet.add_instance("acme")
    fleet.add_instance("beta")
    # both sessions stored on this worker's disk (a run against a proxy without leases)
    plain = FakeProxy()
    plain.add_instance("acme")
    plain.add_instance("beta")
    await plain.start()
    try:
        async with running_worker(make_settings(tmp_path, plain.url)) as w:
            await connect(w, plain, "acme")
            await connect(w, plain, "beta")
    finally:
        await plain.stop()
    # "beta" is leased to another worker: this one resumes only "acme"
    book(fleet).rows["beta"] = LeaseRow(token=7, holder="w-b", expires_at=time.monotonic() + 60)
    book(fleet).workers["w-b"] = time.monotonic()
    async with running_worker(lease_settings(tmp_path, fleet)) as w:
        await wait_until(lambda: fleet.status_of("acme") == "CONNECTED", what="acme resumed")
        await anyio.sleep(0.5)
        assert set(w.manager.runners) == {"acme"}
        assert "beta" not in w.backend.sessions
        assert w.backend.has_session("beta")  # kept on disk, untouched


async def test_a_lost_lease_stops_the_runner_without_logout_and_is_released(tmp_path):
    proxy = FakeProxy(lease_book=LeaseBook(ttl_s=3.0))  # renewals every second
    await proxy.start()
    try:
        proxy.add_instance("acme")
        async with running_worker(lease_settings(tmp_path, proxy)) as w:
            await connect(w, proxy)
            pushes = len(proxy.statuses_of("acme"))
            runner = w.manager.runners["acme"]
            book(proxy).rows["acme"].revoked = True  # the next renewal leaves it out
            await wait_until(lambda: runner.state.value == "stopped", what="runner stopped")
            assert w.backend.has_session("acme")  # disconnected, never logged out
            assert len(proxy.statuses_of("acme")) == pushes  # no status pushed for an instance not ours
            await wait_until(lambda: any(c["release"] == [{"instanceId": "acme", "token": 1}]
                                         for c in proxy.lease_calls), what="released on the next call")
            assert ("release", "acme", "w-a", 1) in [e[1:] for e in book(proxy).events]
            assert w.manager.leases.counts["lost"] == 1
            # free again, and this worker is the only one: granted back (token 2), the stored session resumes
            await wait_until(lambda: w.manager.leases.held == {"acme": 2} and proxy.status_of("acme") == "CONNECTED"
                             and proxy.statuses_of("acme")[-1].get("lease_token") == 2, what="granted back")
            assert not any(s["qr_code"] for s in proxy.statuses_of("acme")[pushes:])
    finally:
        await proxy.stop()


async def test_409_on_a_claim_loses_the_lease_and_claims_nothing(fleet, tmp_path):
    fleet.add_instance("acme")
    async with running_worker(lease_settings(tmp_path, fleet)) as w:
        await connect(w, fleet)
        # the lease moved (another worker, a newer token) before this worker's next renewal (ttl 30 s)
        book(fleet).rows["acme"] = LeaseRow(token=2, holder="w-b", expires_at=time.monotonic() + 60)
        fleet.enqueue("acme", "m1", "5511988887777", "not for a stale worker")
        w.wake("acme")
        await wait_until(lambda: "acme" not in w.manager.runners, what="runner stopped on 409")
        assert book(fleet).refused["queued-messages"] >= 1
        assert w.backend.sent("acme") == []
        assert w.journal.outbound_get("m1") is None
        assert w.backend.has_session("acme")
        assert w.manager.leases.counts["revoked_409"] == 1
        await wait_until(lambda: any(c["release"] == [{"instanceId": "acme", "token": 1}] for c in fleet.lease_calls),
                         what="released once stopped")
        assert "acme" not in w.manager.leases.held


async def test_409_on_a_status_push_loses_the_lease(fleet, tmp_path):
    fleet.add_instance("acme")
    async with running_worker(lease_settings(tmp_path, fleet)) as w:
        await connect(w, fleet)
        book(fleet).rows["acme"] = LeaseRow(token=2, holder="w-b", expires_at=time.monotonic() + 60)
        await w.backend.session("acme").drop()  # a network loss: DISCONNECTED pushed with token 1
        await wait_until(lambda: "acme" not in w.manager.runners, what="runner stopped on 409")
        assert book(fleet).refused["update-status"] >= 1
        assert fleet.status_of("acme") == "CONNECTED"  # the refused push changed nothing at the proxy


async def test_an_ack_under_another_claim_token_is_refused_and_dead_lettered(fleet, tmp_path):
    fleet.add_instance("acme")
    async with running_worker(lease_settings(tmp_path, fleet), retry_cap_s=0.2) as w:
        await connect(w, fleet)
        fleet.fail["mark-sent"] = 1000
        fleet.enqueue("acme", "m1", "5511988887777", "hello")
        w.wake("acme")
        await wait_until(lambda: len(w.backend.sent("acme")) == 1, what="sent")
        # lease 1 ended, m1 was claimed under token 5 elsewhere; this worker holds the instance again (6)
        book(fleet).claim_token["m1"] = 5
        fleet.queue["acme"].clear()  # in flight elsewhere: not offered here again
        row = book(fleet).rows["acme"]
        row.token, row.expires_at = 6, time.monotonic() + 60
        w.manager.leases.held["acme"] = 6
        fleet.fail["mark-sent"] = 0
        await wait_until(lambda: book(fleet).refused["mark-sent"] >= 1, what="ack refused")
        await wait_until(lambda: w.journal.dead_letters("mark-sent"), what="dead-lettered")
        assert "m1" not in fleet.sent_marks
        # an old claim token refused is not this worker's current lease: it keeps it
        assert "acme" in w.manager.runners and w.manager.leases.held == {"acme": 6}


async def test_an_ack_with_the_claim_token_is_accepted_after_the_lease_moved(fleet, tmp_path):
    fleet.add_instance("acme")
    async with running_worker(lease_settings(tmp_path, fleet), retry_cap_s=0.2) as w:
        await connect(w, fleet)
        fleet.fail["mark-sent"] = 1000
        fleet.enqueue("acme", "m1", "5511988887777", "hello")
        w.wake("acme")
        await wait_until(lambda: len(w.backend.sent("acme")) == 1, what="sent")
        # the lease moves to another worker; this one learns it through a 409 on its status
        book(fleet).rows["acme"] = LeaseRow(token=2, holder="w-b", expires_at=time.monotonic() + 60)
        await w.backend.session("acme").drop()
        await wait_until(lambda: "acme" not in w.manager.runners, what="runner stopped")
        fleet.fail["mark-sent"] = 0
        await wait_until(lambda: "m1" in fleet.sent_marks, what="the truth about the send accepted")
        assert fleet.tokens_seen["mark-sent"][-1] == 1
        assert book(fleet).refused["mark-sent"] == 0


async def test_self_fencing_when_leases_stop_answering_then_back(tmp_path):
    proxy = FakeProxy(lease_book=LeaseBook(ttl_s=6.0))  # renewals every 2 s, fencing at 3 s
    await proxy.start()
    try:
        proxy.add_instance("acme")
        async with running_worker(lease_settings(tmp_path, proxy)) as w:
            await connect(w, proxy)
            last_ok = w.manager.leases.last_ok
            proxy.fail["leases"] = 1000
            t0 = time.monotonic()
            await wait_until(lambda: w.manager.leases.fenced, timeout=6, what="fenced")
            fenced_after = w.clock.monotonic() - (last_ok or 0)
            await wait_until(lambda: "acme" not in w.manager.runners, what="runner stopped")
            assert 2.9 <= fenced_after <= 4.0, fenced_after  # ttl/2 after the last good renewal began
            assert "self-fenced: no lease renewal for 3s" in w.not_ready_reasons()
            assert time.monotonic() - t0 < 4.5
            assert w.backend.has_session("acme")  # no logout
            assert w.manager.leases.may_claim("acme") is False
            proxy.fail["leases"] = 0
            w.manager.leases.wake()
            await wait_until(lambda: not w.manager.leases.fenced, what="renewal succeeds again")
            # the lease was still ours (fencing at ttl/2, expiry at ttl): the session resumes here
            await wait_until(lambda: "acme" in w.manager.runners and proxy.status_of("acme") == "CONNECTED"
                             and w.manager.runners["acme"].state.value == "connected", what="resumed")
            assert book(proxy).current("acme") == ("w-a", 1)
    finally:
        await proxy.stop()


@pytest.mark.parametrize("policy", ["at_most_once", "at_least_once"])
async def test_prior_claim_follows_unknown_send_policy(fleet, tmp_path, policy):
    fleet.add_instance("acme")
    # a worker that held lease 1 claimed m1 and vanished without acknowledging it
    book(fleet).rows["acme"] = LeaseRow(token=1, holder=None, free_at=0.0)
    book(fleet).claim_token["m1"] = 1
    fleet.enqueue("acme", "m1", "5511988887777", "maybe sent already")
    async with running_worker(lease_settings(tmp_path, fleet, UNKNOWN_SEND_POLICY=policy)) as w:
        await connect(w, fleet)
        assert w.manager.leases.held == {"acme": 2}
        w.wake("acme")
        if policy == "at_most_once":
            await wait_until(lambda: "m1" in fleet.failed_marks, what="reported")
            assert fleet.failed_codes["m1"] == ["delivery_unknown"]
            assert fleet.tokens_seen["mark-failed"] == [2]
            assert w.backend.sent("acme") == []
            assert w.outbound.prior_claims["reported"] == 1
        else:
            await wait_until(lambda: "m1" in fleet.sent_marks, what="sent")
            assert [m["body"] for m in w.backend.sent("acme")] == ["maybe sent already"]
            assert w.outbound.prior_claims["sent_again"] == 1


async def test_prior_claim_of_a_journaled_message_is_never_sent_again(fleet, tmp_path):
    """A message this worker's journal has (it sent it under lease 1, then lost and regained the
    lease) is re-acknowledged with the new claim token, whatever the policy."""
    fleet.add_instance("acme")
    async with running_worker(lease_settings(tmp_path, fleet, UNKNOWN_SEND_POLICY="at_least_once"),
                              retry_cap_s=0.2) as w:
        await connect(w, fleet)
        fleet.fail["mark-sent"] = 1000
        fleet.enqueue("acme", "m1", "5511988887777", "once")
        w.wake("acme")
        await wait_until(lambda: len(w.backend.sent("acme")) == 1, what="sent")
        # lease 1 ends; lease 2 goes to the same worker: m1 is offered again with prior_claim
        row = book(fleet).rows["acme"]
        row.token, row.expires_at = 2, time.monotonic() + 60
        w.manager.leases.held["acme"] = 2
        fleet.fail["mark-sent"] = 0
        w.wake("acme")
        await wait_until(lambda: "m1" in fleet.sent_marks, what="acknowledged")
        assert len(w.backend.sent("acme")) == 1
        assert w.journal.outbound_get("m1").claim_token == 2


async def test_a_proxy_without_leases_sees_exactly_what_it_saw_before(proxy, tmp_path):
    proxy.add_instance("acme")
    async with running_worker(make_settings(tmp_path, proxy.url, WORKER_ID="w-a")) as w:
        await connect(w, proxy)
        proxy.enqueue("acme", "m1", "5511988887777", "hello")
        proxy.enqueue("acme", "m2", "not a number", "bad")
        w.wake("acme")
        await wait_until(lambda: "m1" in proxy.sent_marks and "m2" in proxy.failed_marks, what="acknowledged")
        assert proxy.calls["leases"] == 1  # the probe, a 404
        assert proxy.calls["disconnected-instances"] >= 1
        assert w.manager.leases.mode is False and w.health()["leases"]["mode"] == "single-worker"
        # no header, no token field anywhere: a text-only proxy sees the first contract
        for endpoint, ids in proxy.worker_ids.items():
            assert ids == {None}, endpoint
        assert all(s.keys() <= {"instanceId", "status", "qr_code", "phone_number", "reason"} for s in proxy.statuses)
        assert set(proxy.tokens_seen["mark-sent"]) == {None} and set(proxy.tokens_seen["mark-failed"]) == {None}
        assert w.journal.outbound_get("m1").claim_token is None


async def test_the_edge_client_maps_409_lease_lost_to_its_own_error(fleet):
    fleet.add_instance("acme")
    book(fleet).rows["acme"] = LeaseRow(token=3, holder="w-b", expires_at=time.monotonic() + 60)
    edge = EdgeClient(fleet.url, SECRET, timeout_s=2)
    lost: list[tuple[str, int]] = []
    edge.enable_leases("w-a", lambda iid: 2)
    edge.on_lease_lost = lambda iid, token: lost.append((iid, token))
    try:
        with pytest.raises(LeaseLost) as err:
            await edge.update_status(StatusUpdate(instanceId="acme", status=Status.CONNECTED, qr_code=None))
        assert err.value.status == 409 and not err.value.transient
        with pytest.raises(LeaseLost):
            await edge.queued_messages("acme")
        assert lost == [("acme", 2), ("acme", 2)]
        # the current token passes
        edge.lease_token_of = lambda iid: 3
        await edge.update_status(StatusUpdate(instanceId="acme", status=Status.CONNECTED, qr_code=None))
    finally:
        await edge.aclose()


async def _wait_exit(proc: Any, timeout_s: float) -> None:
    try:
        await anyio.to_thread.run_sync(proc.wait, timeout_s)
    except subprocess.TimeoutExpired:
        pass  # the caller's assertions report it


async def test_sigterm_releases_leases_and_a_second_real_worker_takes_over_within_seconds(tmp_path):
    proxy = FakeProxy(lease_book=LeaseBook(ttl_s=3.0))
    await proxy.start()
    procs = []
    try:
        proxy.add_instance("acme")
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        env_a = worker_env(tmp_path / "a", proxy.url, WORKER_ID="w-a")
        env_b = worker_env(tmp_path / "b", proxy.url, WORKER_ID="w-b")
        procs.append(start_worker(env_a, ROOT, tmp_path / "a.log"))
        await wait_until(lambda: proxy.status_of("acme") == "CONNECTED", timeout=20, what="connected on w-a")
        assert book(proxy).current("acme") == ("w-a", 1)
        procs.append(start_worker(env_b, ROOT, tmp_path / "b.log"))
        await wait_until(lambda: "w-b" in book(proxy).workers, timeout=20, what="w-b calling /leases")
        await anyio.sleep(1.5)
        assert book(proxy).current("acme") == ("w-a", 1)  # never granted while held
        t0 = time.monotonic()
        procs[0].send_signal(signal.SIGTERM)
        await wait_until(lambda: book(proxy).holder_of("acme") == "w-b" and fleet_connected(proxy, "w-b"),
                         timeout=10, what="taken over by w-b")
        handoff_s = time.monotonic() - t0
        await _wait_exit(procs[0], 10)
        assert procs[0].returncode == 0, (tmp_path / "a.log").read_text()
        events = [(kind, iid, wid, tok) for _, kind, iid, wid, tok in book(proxy).events]
        assert events.index(("release", "acme", "w-a", 1)) < events.index(("grant", "acme", "w-b", 2))
        assert ("expire", "acme", "w-a", 1) not in events  # released, not left to expire
        final = [c for c in proxy.lease_calls if c["worker_id"] == "w-a"][-1]
        assert final == {"worker_id": "w-a", "capacity": 0, "held": [], "release": [{"instanceId": "acme", "token": 1}]}
        assert handoff_s < 5, handoff_s
        # w-a reported its shutdown under its own lease, before giving it back
        pushes = proxy.statuses_of("acme")
        shutdown = [i for i, s in enumerate(pushes) if s.get("reason") == "shutdown"]
        assert shutdown and pushes[shutdown[0]]["lease_token"] == 1
        assert pushes[-1]["status"] == "CONNECTED" and pushes[-1]["lease_token"] == 2
        assert "released 1 lease(s) at shutdown" in (tmp_path / "a.log").read_text()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        await proxy.stop()


def fleet_connected(proxy: FakeProxy, worker: str) -> bool:
    pushes = proxy.statuses_of("acme")
    token = book(proxy).current("acme")
    return bool(pushes) and token is not None and token[0] == worker and pushes[-1]["status"] == "CONNECTED" \
        and pushes[-1].get("lease_token") == token[1]


async def test_a_hanging_renewal_does_not_delay_self_fencing(tmp_path):
    """EDGE_TIMEOUT_S (10 s) is longer than ttl/2 (3 s): the renewal in flight is cut at the
    fencing deadline, so the runner stops on time."""
    proxy = FakeProxy(lease_book=LeaseBook(ttl_s=6.0), hang_s=8.0)
    await proxy.start()
    try:
        proxy.add_instance("acme")
        async with running_worker(lease_settings(tmp_path, proxy, EDGE_TIMEOUT_S=10)) as w:
            await connect(w, proxy)
            last_ok = w.manager.leases.last_ok or 0.0
            proxy.hang["leases"] = 1000
            await wait_until(lambda: w.manager.leases.fenced, timeout=8, what="fenced")
            assert w.clock.monotonic() - last_ok < 4.0
            await wait_until(lambda: "acme" not in w.manager.runners, what="runner stopped")
            assert w.backend.has_session("acme")
            proxy.hang["leases"] = 0
    finally:
        await proxy.stop()


async def test_a_proxy_outage_at_start_resumes_as_before_when_the_proxy_had_no_leases(tmp_path):
    """The journal remembers that the proxy had no leases: a restart during a proxy outage resumes the
    stored sessions at once, as always; a proxy that answers with leases later restarts the worker (75)."""
    plain = FakeProxy()
    plain.add_instance("acme")
    await plain.start()
    settings = make_settings(tmp_path, plain.url)
    try:
        async with running_worker(settings) as w:
            await connect(w, plain)
            assert w.journal.meta("leases") == "off"
    finally:
        await plain.stop()
    port = int(plain.url.rsplit(":", 1)[1])
    async with running_worker(settings) as w:
        await wait_until(lambda: "acme" in w.manager.runners and w.manager.runners["acme"].state.value == "connected",
                         what="resumed during the outage")
        assert w.manager.leases.unconfirmed and w.manager.leases.mode is False
        fleet = FakeProxy(lease_book=LeaseBook(ttl_s=30.0))
        fleet.add_instance("acme")
        await fleet.start(port=port)
        try:
            await wait_until(lambda: w.exit_code == 75, timeout=40, what="restart into lease mode")
            assert fleet.lease_calls[-1]["capacity"] == 0 and fleet.lease_answers[-1]["leases"] == []
        finally:
            await fleet.stop()
    with sqlite3.connect(settings.STATE_DB) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'leases'").fetchone() == ("on",)


async def test_a_second_worker_gets_a_fair_share_gradually_and_no_session_is_ever_open_twice(tmp_path):
    """Six instances on w-a; w-b joins: w-a's lowest-priority leases above target + 1 are revoked,
    stopped (no logout), released, and only then granted to w-b. A watcher checks every 5 ms that no
    instance is connected on both workers."""
    proxy = FakeProxy(lease_book=LeaseBook(ttl_s=3.0))
    await proxy.start()
    ids = [f"i{n}" for n in range(6)]
    for n, iid in enumerate(ids):
        proxy.add_instance(iid, priority=n)
    both: list[str] = []
    try:
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        async with running_worker(lease_settings(tmp_path / "a", proxy, "w-a", SIMULATOR_AUTO_SCAN_MS=20)) as wa:
            await wait_until(lambda: sum(1 for r in wa.manager.runners.values() if r.state.value == "connected") == 6,
                             what="six connected on w-a")
            async with running_worker(lease_settings(tmp_path / "b", proxy, "w-b", SIMULATOR_AUTO_SCAN_MS=20)) as wb:

                def connected(w: Any) -> set[str]:
                    return {i for i, r in w.manager.runners.items() if r.connected_session is not None}

                def open_(w: Any) -> set[str]:  # the backend's view: from connect until disconnect
                    return {i for i, s in w.backend.sessions.items()
                            if s.state in (SessionState.CONNECTING, SessionState.QR, SessionState.CONNECTED)}

                async def watch() -> None:
                    while True:
                        both.extend(open_(wa) & open_(wb))
                        await anyio.sleep(0.005)

                async with anyio.create_task_group() as tg:
                    tg.start_soon(watch)
                    await wait_until(lambda: len(connected(wb)) == 3 and len(connected(wa)) == 3, timeout=20,
                                     what="three each")
                    tg.cancel_scope.cancel()
                assert connected(wa) == {"i3", "i4", "i5"}  # the highest priorities stay
                assert wa.manager.leases.counts["lost"] == 3
                assert all(wa.backend.has_session(i) for i in ids)  # revoked: disconnected, never logged out
    finally:
        await proxy.stop()
    assert both == []
    events = [(kind, iid, wid) for _, kind, iid, wid, _t in book(proxy).events]
    for iid in ("i0", "i1", "i2"):
        assert events.index(("release", iid, "w-a")) < events.index(("grant", iid, "w-b"))


async def test_a_send_never_outlives_the_lease_margin(tmp_path):
    """With leases a send (upload included) is cut at 1.5 × ttl minus the stop budget (at least 5 s),
    so a worker that self-fences mid-send has closed the session before the lease can move
    (2 × ttl); the cut send is delivery_unknown, never sent again. Without leases it may take 60 s."""
    proxy = FakeProxy(lease_book=LeaseBook(ttl_s=6.0))
    await proxy.start()
    try:
        proxy.add_instance("acme")
        async with running_worker(lease_settings(tmp_path, proxy)) as w:
            await connect(w, proxy)
            assert w.outbound.send_cap_s() == 5.0  # max(5, 1.5 × 6 − 15)
            w.backend.send_delay_s = 7.0
            t0 = time.monotonic()
            proxy.enqueue("acme", "m1", "5511988887777", "hello")
            w.wake("acme")
            await wait_until(lambda: "m1" in proxy.failed_marks, timeout=15, what="m1 reported")
            assert proxy.failed_codes["m1"] == ["delivery_unknown"]
            assert 4.9 <= time.monotonic() - t0 < 7.0
            assert w.journal.outbound_get("m1").state != "sending"  # type: ignore[union-attr]
    finally:
        await proxy.stop()
    plain = FakeProxy()
    await plain.start()
    try:
        plain.add_instance("acme")
        async with running_worker(make_settings(tmp_path / "plain", plain.url)) as w:
            await connect(w, plain)
            assert w.outbound.send_cap_s() is None
    finally:
        await plain.stop()


async def test_a_worker_keeps_asking_while_the_proxy_keeps_granting(tmp_path):
    """A proxy grants a few leases per call; while it does, the next call comes after 1 s instead
    of ttl/3, so 12 instances at 2 per call are all held within seconds (at ttl 60: 20 s between
    renewals, 2 minutes for the six calls), and once nothing new comes the pace is ttl/3 again."""
    proxy = FakeProxy(lease_book=LeaseBook(ttl_s=60.0, grants_per_call=2))
    await proxy.start()
    try:
        for n in range(12):
            proxy.add_instance(f"i{n}")
        async with running_worker(lease_settings(tmp_path, proxy, SIMULATOR_AUTO_SCAN_MS=20)) as w:
            t0 = time.monotonic()
            await wait_until(lambda: len(w.manager.leases.held) == 12, timeout=15, what="twelve leases")
            assert time.monotonic() - t0 < 10
            await wait_until(lambda: w.manager.leases.last_granted == 0, timeout=5, what="a call with no grant")
            calls = len(proxy.lease_calls)
            await anyio.sleep(2.5)
            assert len(proxy.lease_calls) == calls  # back to every 20 s
    finally:
        await proxy.stop()


async def test_with_leases_the_push_channel_says_who_calls_and_a_leases_event_renews_at_once(tmp_path):
    """Once the probe turns leases on, GET /events carries X-Worker-Id (the proxy pushes this
    worker's leased instances) and a ``leases`` event is a renewal now, not after ttl/3."""
    proxy = FakeProxy(lease_book=LeaseBook(ttl_s=60.0), events=True, events_wait_cap_s=2.0)
    await proxy.start()
    try:
        proxy.add_instance("acme")
        async with running_worker(lease_settings(tmp_path, proxy, "w-push")) as w:
            await connect(w, proxy)
            await wait_until(lambda: w.push.live, what="push channel live")
            calls = len(proxy.lease_calls)
            await wait_until(lambda: any(q["worker_id"] == "w-push" for q in proxy.events_queries),
                             what="an /events call with X-Worker-Id")
            proxy.push_event({"type": "leases"})
            await wait_until(lambda: len(proxy.lease_calls) > calls, timeout=3, what="a renewal at once")
    finally:
        await proxy.stop()


async def test_a_worker_killed_and_restarted_on_its_journal_gets_its_leases_back_at_once(tmp_path):
    """Without WORKER_ID the worker remembers the id it chose in its journal: after a kill -9 the
    restarted process asks under the same id and its unexpired lease comes back at once (the one
    machine case: a crash costs a restart, not two TTLs), under a new token."""
    proxy = FakeProxy(lease_book=LeaseBook(ttl_s=60.0))
    await proxy.start()
    procs = []
    try:
        proxy.add_instance("acme")
        env = worker_env(tmp_path, proxy.url)
        assert "WORKER_ID" not in env
        procs.append(start_worker(env, ROOT, tmp_path / "1.log"))
        await wait_until(lambda: proxy.status_of("acme") == "CONNECTED", timeout=20, what="connected")
        first = book(proxy).current("acme")
        assert first is not None and first[1] == 1
        procs[0].kill()
        procs[0].wait(10)
        t0 = time.monotonic()
        procs.append(start_worker(env, ROOT, tmp_path / "2.log"))
        await wait_until(lambda: book(proxy).current("acme") == (first[0], 2) and fleet_connected(proxy, first[0]),
                         timeout=20, what="the same worker id holds acme again")
        assert time.monotonic() - t0 < 15  # not the 120 s of expiry + grace
        assert {c["worker_id"] for c in proxy.lease_calls} == {first[0]}
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        await proxy.stop()


async def test_a_prior_claim_of_this_workers_own_unbegun_claim_is_sent_not_reported(fleet, tmp_path):
    """The one-machine restart: a message claimed under lease 1 and not begun (its number lookup
    had to wait) is offered again under lease 2 with prior_claim after the worker restarts on its
    journal. The journal remembers the claim was this worker's and has no send row for it: it is
    sent (once), not reported delivery_unknown, even with UNKNOWN_SEND_POLICY=at_most_once."""
    fleet.add_instance("acme")
    first = lease_settings(tmp_path, fleet, NUMBER_LOOKUPS_PER_MINUTE=1, SIMULATOR_AUTO_SCAN_MS=20)
    async with running_worker(first) as w:
        await wait_until(lambda: fleet.status_of("acme") == "CONNECTED", what="connected")
        await claim_one_never_begun(w, fleet, "acme")
        assert w.journal.outbound_get("m2") is None  # claimed, never begun
        fleet.fail["leases"] = 1000  # no hand-back at the stop (as after a crash): the claim stays under lease 1
    fleet.fail["leases"] = 0
    again = lease_settings(tmp_path, fleet, NUMBER_LOOKUPS_PER_MINUTE=0, SIMULATOR_AUTO_SCAN_MS=20)
    async with running_worker(again) as w:
        await wait_until(lambda: "m2" in fleet.sent_marks, what="m2 sent after the restart")
        assert book(fleet).current("acme")[1] == 2  # type: ignore[index]
        assert w.outbound.prior_claims == {"own_claim": 1}
        assert "m2" not in fleet.failed_marks
        assert [m["body"] for m in w.backend.sent("acme")] == ["first", "second: its lookup waits"]  # each once


async def test_sigterm_hands_unsent_claims_back_and_the_next_holder_sends_them_once(fleet, tmp_path):
    """A message w-a claimed under lease 1 and never began (its number lookup had to wait) is listed in
    the final release's ``unsent``; the proxy puts it back to queued, so w-b, the next holder, claims it
    cleanly (no prior_claim) and sends it: not reported delivery_unknown, sent exactly once."""
    fleet.add_instance("acme")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = lease_settings(tmp_path / "a", fleet, "w-a", NUMBER_LOOKUPS_PER_MINUTE=1, SIMULATOR_AUTO_SCAN_MS=20)
    async with running_worker(first) as wa:
        await wait_until(lambda: fleet.status_of("acme") == "CONNECTED", what="connected on w-a")
        await claim_one_never_begun(wa, fleet, "acme")
        assert wa.journal.outbound_get("m2") is None  # claimed, never begun
    final = [c for c in fleet.lease_calls if c["worker_id"] == "w-a"][-1]
    assert final["capacity"] == 0
    assert final["release"] == [{"instanceId": "acme", "token": 1, "unsent": ["m2"]}]
    assert fleet.lease_answers[-1]["requeued"] == ["m2"]
    assert book(fleet).requeued == [("m2", "w-a", 1)]
    second = lease_settings(tmp_path / "b", fleet, "w-b", NUMBER_LOOKUPS_PER_MINUTE=0, SIMULATOR_AUTO_SCAN_MS=20)
    async with running_worker(second) as wb:
        await wait_until(lambda: "m2" in fleet.sent_marks, what="m2 sent by w-b")
        assert book(fleet).current("acme") == ("w-b", 2)
        assert wb.outbound.prior_claims == {}  # a clean claim, not a prior_claim
        assert "m2" not in fleet.failed_marks
        assert [m["body"] for m in wb.backend.sent("acme")] == ["second: its lookup waits"]
    assert len(fleet.sent_marks["m1"]) == 1 and len(fleet.sent_marks["m2"]) == 1
    assert fleet.tokens_seen["mark-sent"] == [1, 2]


async def test_a_revoked_lease_hands_its_unsent_claims_to_the_worker_that_takes_it_over(tmp_path):
    """Fair share: w-b joins, w-a's lowest-priority leases are revoked; i0's claim that w-a never began
    goes back to queued with the release, and w-b sends it once (no delivery_unknown)."""
    proxy = FakeProxy(lease_book=LeaseBook(ttl_s=3.0))
    await proxy.start()
    ids = [f"i{n}" for n in range(4)]
    for n, iid in enumerate(ids):
        proxy.add_instance(iid, priority=n)
    try:
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        first = lease_settings(tmp_path / "a", proxy, "w-a", NUMBER_LOOKUPS_PER_MINUTE=1, SIMULATOR_AUTO_SCAN_MS=20)
        async with running_worker(first) as wa:
            await wait_until(lambda: sum(1 for r in wa.manager.runners.values() if r.state.value == "connected") == 4,
                             what="four connected on w-a")
            await claim_one_never_begun(wa, proxy, "i0")
            second = lease_settings(tmp_path / "b", proxy, "w-b", NUMBER_LOOKUPS_PER_MINUTE=0,
                                    SIMULATOR_AUTO_SCAN_MS=20)
            async with running_worker(second) as wb:
                await wait_until(lambda: "m2" in proxy.sent_marks, timeout=20, what="m2 sent by w-b")
                assert book(proxy).holder_of("i0") == "w-b"
                assert wb.outbound.prior_claims == {}
                assert [m["body"] for m in wb.backend.sent("i0")] == ["second: its lookup waits"]
                assert not wa.journal.claimed_here("m2")  # forgotten once the proxy took it back
                assert wa.manager.leases.counts["unsent_requeued"] == 1
        assert book(proxy).requeued == [("m2", "w-a", 1)]
        release = [item for c in proxy.lease_calls if c["worker_id"] == "w-a" for item in c["release"]
                   if item["instanceId"] == "i0"]
        assert release[0] == {"instanceId": "i0", "token": 1, "unsent": ["m2"]}
        assert "m2" not in proxy.failed_marks and len(proxy.sent_marks["m2"]) == 1
        assert [m["body"] for m in wa.backend.sent("i0")] == ["first"]
    finally:
        await proxy.stop()


async def test_a_self_fenced_runner_hands_its_unsent_claims_back_under_the_same_token(tmp_path):
    """Self-fencing stops the runner with the lease still held: the renewal that ends the fencing lists
    the claims it never began in its ``held`` item, the proxy puts them back to queued, and the runner,
    started again under the same token, claims and sends them at once (not after the claim lease)."""
    proxy = FakeProxy(lease_book=LeaseBook(ttl_s=6.0))  # renewals every 2 s, fencing at 3 s
    await proxy.start()
    try:
        proxy.add_instance("acme")
        settings = lease_settings(tmp_path, proxy, NUMBER_LOOKUPS_PER_MINUTE=1, SIMULATOR_AUTO_SCAN_MS=20)
        async with running_worker(settings) as w:
            await wait_until(lambda: proxy.status_of("acme") == "CONNECTED", what="connected")
            await claim_one_never_begun(w, proxy, "acme")
            proxy.fail["leases"] = 1000
            await wait_until(lambda: w.manager.leases.fenced and "acme" not in w.manager.runners, timeout=6,
                             what="fenced, runner stopped")
            w.outbound.resolver.lookups_per_minute = 0  # numbers no longer checked: m2 can go once offered
            fenced_at = w.clock.monotonic()
            proxy.fail["leases"] = 0
            w.manager.leases.wake()
            await wait_until(lambda: "m2" in proxy.sent_marks, timeout=10, what="m2 sent after the fencing")
            back = [c for c in proxy.lease_calls if any("unsent" in item for item in c["held"])]
            assert back[0]["held"] == [{"instanceId": "acme", "token": 1, "unsent": ["m2"]}]
            assert book(proxy).requeued == [("m2", "w-a", 1)]
            assert book(proxy).current("acme") == ("w-a", 1)  # the same lease throughout
            # a batch answer asked for before the hand-back is not sent from (it may name a requeued message)
            assert w.manager.leases.handed_back_since("acme", fenced_at)
            assert not w.manager.leases.handed_back_since("acme", w.clock.monotonic())
            assert w.outbound.prior_claims == {}
            assert [m["body"] for m in w.backend.sent("acme")] == ["first", "second: its lookup waits"]
            assert proxy.tokens_seen["mark-sent"] == [1, 1]
    finally:
        await proxy.stop()


async def test_a_proxy_that_ignores_unsent_leaves_the_claim_the_workers_own(tmp_path):
    """Backward compatible: a proxy that does not know ``unsent`` (no ``requeued`` in its answer) keeps
    the claim; the worker keeps it as its own too, so when its lease comes back (a new token) the
    prior_claim re-offer is sent by it, as before."""
    proxy = FakeProxy(lease_book=LeaseBook(ttl_s=3.0, hand_back=False))
    await proxy.start()
    try:
        proxy.add_instance("acme")
        settings = lease_settings(tmp_path, proxy, NUMBER_LOOKUPS_PER_MINUTE=1, SIMULATOR_AUTO_SCAN_MS=20)
        async with running_worker(settings) as w:
            await wait_until(lambda: proxy.status_of("acme") == "CONNECTED", what="connected")
            await claim_one_never_begun(w, proxy, "acme")
            w.outbound.resolver.lookups_per_minute = 0
            book(proxy).rows["acme"].revoked = True  # lost, released (listing m2), granted back under token 2
            await wait_until(lambda: "m2" in proxy.sent_marks, timeout=10, what="m2 sent under lease 2")
            assert any(item.get("unsent") == ["m2"] for c in proxy.lease_calls for item in c["release"])
            assert "requeued" not in proxy.lease_answers[-1]
            assert w.outbound.prior_claims == {"own_claim": 1}
            assert proxy.tokens_seen["mark-sent"] == [1, 2]
            assert w.manager.leases.counts["unsent_requeued"] == 0
    finally:
        await proxy.stop()
