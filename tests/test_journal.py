"""Nothing lost, nothing sent twice: proxy outages, kill -9, unknown outcomes, faults, a full disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections import Counter, defaultdict
from pathlib import Path

import anyio
import httpx
import pytest

from tests.conftest import AUTH, FakeClock, connect, make_settings, running_worker, wait_until
from tests.proc import ROOT, start_worker, worker_env
from wa_worker.storage.journal import Journal

pytestmark = pytest.mark.anyio


def sent_lines(tmp_path: Path, iid: str) -> list[dict]:
    path = tmp_path / "auth" / iid / "simulator-sent.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


# ------------------------------------------------------------------------- store unit level


def test_store_states_and_never_twice(tmp_path):
    s = Journal(tmp_path / "s" / "db.sqlite")
    assert s.begin_send("m1", "a", "1@s.whatsapp.net") is True
    assert s.begin_send("m1", "a", "1@s.whatsapp.net") is False
    s.record_sent("m1", "WA1")
    assert [r.message_id for r in s.due_acks()] == ["m1"]
    s.ack_done("m1")
    assert s.outbound_get("m1").state == "marked" and s.due_acks() == []
    s.reack("m1")
    assert s.outbound_get("m1").state == "sent"
    s.record_failure("m1", "a", "late failure must not override sent")
    assert s.outbound_get("m1").state == "sent"
    assert s.begin_send("m1", "a", "x") is False
    assert oct(os.stat(tmp_path / "s").st_mode & 0o777) == "0o700"
    assert oct(os.stat(tmp_path / "s" / "db.sqlite").st_mode & 0o777) == "0o600"
    assert s._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_unsent_claims_are_the_claims_never_begun_per_instance_oldest_first(tmp_path):
    """Leases: what a stopped runner hands back (``unsent``): claimed here, no outbound row."""
    c = FakeClock(1_000.0)
    s = Journal(tmp_path / "db", clock=c)
    s.note_claimed([("a1", "acme"), ("a2", "acme")])
    c.now += 1
    s.note_claimed([("a3", "acme"), ("b1", "beta"), ("g1", "gamma")])
    assert s.begin_send("a2", "acme", "5511@s.whatsapp.net", claim_token=1)  # begun: never handed back
    assert s.unsent_claims(["acme", "beta"], 10) == {"acme": ["a1", "a3"], "beta": ["b1"]}
    assert s.unsent_claims(["acme"], 1) == {"acme": ["a1"]}
    assert s.unsent_claims([], 10) == {} and s.unsent_claims(["nobody"], 10) == {}
    assert s.forget_claims(["a1", "b1", "unknown"]) == 2
    assert not s.claimed_here("a1") and s.claimed_here("a3") and s.claimed_here("a2")
    assert s.unsent_claims(["acme", "beta", "gamma"], 10) == {"acme": ["a3"], "gamma": ["g1"]}
    s.close()


def test_store_inbound_heads_keep_chat_order(tmp_path):
    s = Journal(tmp_path / "db")
    for i in range(3):
        for chat in ("c1", "c2"):
            s.add_inbound("a", chat, f"{chat}-{i}", {"i": i})
    assert s.add_inbound("a", "c1", "c1-0", {}) is False  # replay
    heads = s.due_inbound_heads()
    assert [h.wa_message_id for h in heads] == ["c1-0", "c2-0"]
    s.inbound_retry_later(heads[0].seq, 100, "down")
    assert [h.wa_message_id for h in s.due_inbound_heads()] == ["c2-0"]  # c1 waits, in order
    s.inbound_delivered(heads[1].seq)
    assert [h.wa_message_id for h in s.due_inbound_heads()] == ["c2-1"]


def test_store_prune_and_ttl(tmp_path):
    c = FakeClock()
    s = Journal(tmp_path / "db", clock=c)
    s.begin_send("old", "a", "j")
    s.record_sent("old", "W")
    s.ack_done("old")
    s.begin_send("pending", "a", "j")
    s.record_sent("pending", "W2")
    s.add_inbound("a", "c", "in1", {"x": 1})
    c.now += 8 * 24 * 3600
    assert s.prune() == 1
    assert s.outbound_get("old") is None and s.outbound_get("pending") is not None
    assert s.expire_inbound(7 * 24 * 3600) == 1
    assert s.counts()["inbound_dead_letter"] == 1 and s.counts()["inbound_pending"] == 0
    assert s.dead_letters("inbound")[0]["reason"] == "expired"


# ------------------------------------------------------------------------- in-process worker


async def test_inbound_outage_then_recovery_every_message_once_in_chat_order(proxy, tmp_path):
    proxy.add_instance("acme")
    async with running_worker(make_settings(tmp_path, proxy.url), retry_cap_s=0.5) as w:
        await connect(w, proxy)
        proxy.fixed_status["inbound"] = 500
        s = w.backend.session("acme")
        expected: dict[str, list[str]] = defaultdict(list)
        for i in range(30):
            chat = f"55119000000{i % 3}"
            wa = await s.receive(chat, f"msg {i}")
            expected[f"{chat}@s.whatsapp.net"].append(wa)
        await wait_until(lambda: proxy.calls["inbound"] >= 15, what="failing deliveries")
        assert proxy.inbound == []
        assert w.health()["inbound"]["pending"] == 30
        del proxy.fixed_status["inbound"]
        await wait_until(lambda: len(proxy.inbound) == 30, timeout=20, what="all inbound")
        got: dict[str, list[str]] = defaultdict(list)
        for p in proxy.inbound:
            got[p["chat_id"]].append(p["wa_message_id"])
        assert got == expected
        assert proxy.inbound_posts == 30  # nothing posted twice
        assert w.health()["inbound"] == {"pending": 0, "dead_lettered": 0, "delivered": 30}


async def test_permanent_4xx_dead_letters_and_continues(proxy, tmp_path):
    proxy.add_instance("acme")
    async with running_worker(make_settings(tmp_path, proxy.url), retry_cap_s=0.5) as w:
        await connect(w, proxy)
        s = w.backend.session("acme")
        proxy.fixed_status["inbound"] = 422
        await s.receive("5511900000001", "rejected")
        await wait_until(lambda: w.health()["inbound"]["dead_lettered"] == 1)
        del proxy.fixed_status["inbound"]
        wa = await s.receive("5511900000001", "accepted")
        await wait_until(lambda: proxy.inbound_ids() == [wa])
        dl = w.journal.dead_letters("inbound")[0]
        assert dl["status_code"] == 422 and dl["reason"] == "rejected by proxy"
        # 429 is not permanent
        proxy.fixed_status["inbound"] = 429
        wa2 = await s.receive("5511900000001", "throttled")
        await wait_until(lambda: proxy.calls["inbound"] >= 5)
        assert w.health()["inbound"]["dead_lettered"] == 1
        del proxy.fixed_status["inbound"]
        await wait_until(lambda: wa2 in proxy.inbound_ids())


async def test_ready_reflects_proxy_and_store(proxy, tmp_path):
    proxy.add_instance("acme")
    settings = make_settings(tmp_path, proxy.url, READY_MAX_PROXY_SILENCE_S=0.5)
    async with running_worker(settings) as w:
        base = f"http://127.0.0.1:{w.port}"
        async with httpx.AsyncClient() as http:
            await wait_until(lambda: w.edge.last_ok_monotonic is not None)
            r = await http.get(base + "/ready")
            assert r.status_code == 200, r.text
            proxy.fixed_status["disconnected-instances"] = 503
            proxy.fixed_status["update-status"] = 503
            proxy.fixed_status["queued-messages"] = 503
            await anyio.sleep(1.0)
            r = await http.get(base + "/ready")
            assert r.status_code == 503 and "unreachable" in r.json()["reasons"][0]
            assert (await http.get(base + "/health")).status_code == 200  # liveness unaffected
            proxy.fixed_status.clear()
            await wait_until(lambda: w.not_ready_reasons() == [], timeout=5)


# ------------------------------------------------------------------------- a full disk


def fill(path: Path) -> None:
    fh = open(path, "wb")
    try:
        while True:
            fh.write(b"\0" * 65536)
            fh.flush()
    except OSError:
        pass
    finally:
        try:
            fh.close()
        except OSError:
            pass  # the bytes still buffered did not fit either (depends on what else is on the disk): full


@pytest.fixture
def tiny_fs(tmp_path):
    mnt = tmp_path / "tinyfs"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot mount a tmpfs in CI: {res.stderr!r}")
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


async def test_disk_full_stops_pulling_stays_connected_and_recovers(proxy, tmp_path, tiny_fs, caplog):
    proxy.add_instance("acme")
    settings = make_settings(tmp_path, proxy.url, STATE_DB=tiny_fs / "state" / "wa.db")
    async with running_worker(settings, retry_cap_s=0.5) as w:
        await connect(w, proxy)
        proxy.enqueue("acme", "before", "5511988887777", "fine")
        await wait_until(lambda: "before" in proxy.sent_marks)
        # fill the disk, keeping a crumb to free first
        crumb = tiny_fs / "crumb"
        crumb.write_bytes(b"\0" * 512 * 1024)
        filler = tiny_fs / "filler"
        fill(filler)
        s = w.backend.session("acme")
        # inbound while full: kept in memory, not lost
        wa = await s.receive("5511900000001", "while full")
        proxy.enqueue("acme", "during", "5511988887777", "must wait")
        await wait_until(lambda: not w.journal.writable, what="store unwritable")
        await anyio.sleep(0.5)
        assert "during" not in proxy.sent_marks and w.backend.session("acme").state == "connected"
        assert "not writable" in " ".join(w.not_ready_reasons())
        errors = [r for r in caplog.records if "is not writable" in r.getMessage()]
        assert len(errors) == 1  # one clear error, not a flood
        # resume too early: a little space frees up, enough for the probe's write
        # but not for the work it would pull; the store stays unwritable
        crumb.unlink()
        assert w.journal.probe_writable() is False
        assert not w.journal.writable and (w.journal.free_bytes() or 0) < w.journal.min_headroom_bytes
        await anyio.sleep(0.5)
        assert "during" not in proxy.sent_marks and [m["body"] for m in w.backend.sent("acme")] == ["fine"]
        filler.unlink()
        await wait_until(lambda: w.journal.writable, timeout=10, what="recovered")
        # the recovery wakes the instances' paused polls (they looked again only every 5 s)
        await wait_until(lambda: "during" in proxy.sent_marks, timeout=3)
        await wait_until(lambda: wa in proxy.inbound_ids(), timeout=10)
        assert [m["body"] for m in w.backend.sent("acme")] == ["fine", "must wait"]


# ------------------------------------------------------------------------- fault injection


@pytest.mark.slow
async def test_random_faults_keep_the_invariants(proxy, tmp_path):
    n_out, n_in, instances = 300, 200, ("a1", "a2", "a3")
    for iid in instances:
        proxy.add_instance(iid)
    # this test is about the journal under proxy faults: 300 first-contact numbers would otherwise
    # wait for the per-instance lookup budget (NUMBER_LOOKUPS_PER_MINUTE, tested in test_account_safety)
    settings = make_settings(tmp_path, proxy.url, EDGE_TIMEOUT_S=0.3, SIMULATOR_AUTO_SCAN_MS=10,
                             NUMBER_LOOKUPS_PER_MINUTE=0)
    async with running_worker(settings, retry_cap_s=0.4) as w:
        await wait_until(lambda: all(proxy.status_of(i) == "CONNECTED" for i in instances), timeout=20)
        proxy.random_fault_rate = 0.15
        proxy.lose_response_rate = 0.1
        proxy.hang_s = 0.4
        for iid in instances:
            w.backend.set_fail_sends(iid, 5)
        expected_in: set[tuple[str, str]] = set()
        for k in range(max(n_out, n_in)):
            iid = instances[k % 3]
            if k < n_out:
                to = "12" if k % 50 == 0 else f"55119{k:08d}"
                proxy.enqueue(iid, f"m{k}", to, f"out {k}")
            if k < n_in:
                s = w.backend.session(iid)
                if s.state == "connected":
                    expected_in.add((iid, await s.receive(f"5521{k % 7:09d}", f"in {k}")))
            if k % 20 == 0:
                await anyio.sleep(0.01)

        def settled() -> bool:
            done = set(proxy.sent_marks) | set(proxy.failed_marks)
            got_in = {(p["instanceId"], p["wa_message_id"]) for p in proxy.inbound}
            dead = {(d["instance_id"], d["ref"]) for d in w.journal.dead_letters("inbound")}
            return len(done) == n_out and expected_in <= (got_in | dead)

        await wait_until(settled, timeout=120, what="every message settled")
        proxy.random_fault_rate = proxy.lose_response_rate = 0.0
        # outbound: sent at most once, every message marked sent or failed, never both
        deliveries = Counter(r["body"] for iid in instances for r in sent_lines(tmp_path, iid))
        assert max(deliveries.values()) == 1
        assert not (set(proxy.sent_marks) & set(proxy.failed_marks))
        for was in proxy.sent_marks.values():
            assert len(set(was)) == 1  # re-acknowledged maybe, always with the same WhatsApp id
        assert all(proxy.failed_marks[f"m{k}"][0].startswith("invalid recipient") for k in range(0, n_out, 50))
        assert sum(deliveries.values()) == len(proxy.sent_marks)
        # inbound: every message delivered; outages (503, timeouts) never dead-letter one
        assert len(expected_in) == n_in
        assert w.journal.dead_letters("inbound") == []
        assert expected_in <= {(p["instanceId"], p["wa_message_id"]) for p in proxy.inbound}
        assert proxy.inbound_posts >= len(proxy.inbound)


# ------------------------------------------------------------------------- kill -9


async def _http_post(url: str, **kw) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.post(url, headers=AUTH, **kw)


def _kill9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


@pytest.mark.slow
async def test_sigkill_with_pending_inbound_and_mark_sent(proxy, tmp_path):
    proxy.add_instance("acme")
    env = worker_env(tmp_path, proxy.url)
    base = f"http://127.0.0.1:{env['PORT']}"
    proc = start_worker(env, ROOT, tmp_path / "w1.log")
    try:
        await wait_until(lambda: proxy.status_of("acme") == "CONNECTED", timeout=20)
        proxy.fixed_status["inbound"] = 500
        proxy.fixed_status["mark-sent"] = 500
        wa_ids = []
        for i in range(10):
            r = await _http_post(f"{base}/simulator/instances/acme/inbound",
                                 json={"from": f"55119000000{i % 2}", "body": f"in {i}"})
            wa_ids.append(r.json()["wa_message_id"])
        for i in range(10):
            proxy.enqueue("acme", f"m{i}", "5511988887777", f"out {i}")
        await wait_until(lambda: len(sent_lines(tmp_path, "acme")) == 10, what="10 sent")
        await wait_until(lambda: proxy.calls["mark-sent"] >= 10)
        _kill9(proc)
        assert proxy.inbound == [] and not proxy.sent_marks
        proxy.fixed_status.clear()
        # the proxy still offers all 10 outbound messages: none may be sent again
        proc = start_worker(env, ROOT, tmp_path / "w2.log")
        await wait_until(lambda: len(proxy.sent_marks) == 10 and len(proxy.inbound) == 10, timeout=20,
                         what="everything delivered after restart")
        await anyio.sleep(0.5)
        bodies = Counter(r["body"] for r in sent_lines(tmp_path, "acme"))
        assert bodies == Counter(f"out {i}" for i in range(10))
        assert sorted(proxy.inbound_ids()) == sorted(wa_ids)
        assert proxy.statuses_of("acme")[-1]["status"] == "CONNECTED"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["at_most_once", "at_least_once"])
async def test_sigkill_between_send_and_journal(proxy, tmp_path, policy):
    proxy.add_instance("acme")
    env = worker_env(tmp_path, proxy.url, UNKNOWN_SEND_POLICY=policy)
    base = f"http://127.0.0.1:{env['PORT']}"
    proc = start_worker(env, ROOT, tmp_path / "w1.log")
    try:
        await wait_until(lambda: proxy.status_of("acme") == "CONNECTED", timeout=20)
        r = await _http_post(f"{base}/simulator/crash-after-next-send")
        assert r.status_code == 200
        proxy.enqueue("acme", "m1", "5511988887777", "fate unknown")
        await wait_until(lambda: proc.poll() is not None, timeout=15, what="the crash")
        assert proc.returncode == -signal.SIGKILL
        assert len(sent_lines(tmp_path, "acme")) == 1  # WhatsApp got it; the journal says 'sending'
        proc = start_worker(env, ROOT, tmp_path / "w2.log")
        if policy == "at_most_once":
            await wait_until(lambda: "m1" in proxy.failed_marks, timeout=20)
            assert proxy.failed_marks["m1"] == ["delivery_unknown"]
            await anyio.sleep(0.5)
            assert len(sent_lines(tmp_path, "acme")) == 1
        else:
            await wait_until(lambda: "m1" in proxy.sent_marks, timeout=20)
            assert len(sent_lines(tmp_path, "acme")) == 2  # the documented price of at-least-once
            assert "m1" not in proxy.failed_marks
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
