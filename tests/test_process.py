"""The real command: configuration errors, SIGTERM, secrets in logs."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import anyio
import pytest

from tests.conftest import wait_until
from tests.fakeproxy import SECRET
from tests.proc import ROOT, start_worker, worker_env


async def _wait_exit(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    try:
        await anyio.to_thread.run_sync(proc.wait, timeout_s)
    except subprocess.TimeoutExpired:
        pass  # the caller's assertions report it


def run_cli(env: dict[str, str], tmp_path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "wa_worker"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=30)


@pytest.mark.parametrize(
    ("drop", "override", "needle"),
    [
        ("EDGE_BASE_URL", {}, "EDGE_BASE_URL is required"),
        ("WORKER_SECRET", {}, "WORKER_SECRET is required"),
        (None, {"EDGE_BASE_URL": "ftp://x"}, "EDGE_BASE_URL"),
        (None, {"PORT": "seventy"}, "PORT"),
        (None, {"WA_BACKEND": "baileys"}, "WA_BACKEND"),
        (None, {"MSG_POLL_MS": "10", "MSG_POLL_MAX_MS": "5"}, "MSG_POLL_MS"),
        (None, {"WORKER_SECRET": "short"}, "WORKER_SECRET"),
    ],
)
def test_bad_config_exits_2_with_one_clear_line(tmp_path, drop, override, needle):
    env = worker_env(tmp_path, "http://127.0.0.1:9", **override)
    if drop:
        del env[drop]
    res = run_cli(env, tmp_path)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert needle in lines[0]
    assert "Traceback" not in res.stderr
    assert SECRET not in res.stderr and "short" not in lines[0].split(":", 1)[1].replace("WORKER_SECRET", "")


@pytest.mark.slow
@pytest.mark.anyio
async def test_sigterm_reports_disconnected_and_exits_0(proxy, tmp_path):
    proxy.add_instance("acme")
    proxy.add_instance("beta")
    env = worker_env(tmp_path, proxy.url)
    log_path = tmp_path / "worker.log"
    proc = start_worker(env, ROOT, log_path)
    try:
        await wait_until(lambda: proxy.status_of("acme") == "CONNECTED" and proxy.status_of("beta") == "CONNECTED",
                         timeout=20, what="both connected")
        proxy.enqueue("acme", "m1", "5511988887777", "before shutdown")
        await wait_until(lambda: "m1" in proxy.sent_marks)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        await _wait_exit(proc, 12)
        elapsed = time.monotonic() - t0
        assert proc.returncode == 0, log_path.read_text()
        assert elapsed < 10
        for iid in ("acme", "beta"):
            last = proxy.statuses_of(iid)[-1]
            assert last["status"] == "DISCONNECTED" and last["reason"] == "shutdown"
        # disconnected, never logged out: the sessions are still on disk
        assert (tmp_path / "auth" / "acme" / "simulator-session.json").exists()
        log_text = log_path.read_text()
        assert SECRET not in log_text
        assert "wa-worker stopped" in log_text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _journal_states(db) -> dict[str, str]:
    import sqlite3

    with sqlite3.connect(db) as conn:
        return dict(conn.execute("SELECT message_id, state FROM outbound").fetchall())


def _sent_bodies(tmp_path, iid: str) -> list[str]:
    import json

    path = tmp_path / "auth" / iid / "simulator-sent.jsonl"
    return [json.loads(line)["body"] for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
@pytest.mark.anyio
async def test_sigterm_mid_batch_stops_within_a_second_and_the_rest_is_sent_once_next_run(proxy, tmp_path):
    proxy.add_instance("acme")
    ids = [f"m{k:03d}" for k in range(300)]
    env = worker_env(tmp_path, proxy.url, SIMULATOR_SEND_DELAY_MS="50", BATCH_POLL="false")
    log_path = tmp_path / "worker.log"
    proc = start_worker(env, ROOT, log_path)
    try:
        await wait_until(lambda: proxy.status_of("acme") == "CONNECTED", timeout=20, what="connected")
        for mid in ids:
            proxy.enqueue("acme", mid, "5511988887777", f"body {mid}")
        await wait_until(lambda: len(_sent_bodies(tmp_path, "acme")) >= 3, timeout=10, what="a few sent")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        await _wait_exit(proc, 10)
        elapsed = time.monotonic() - t0
        assert proc.returncode == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    sent = _sent_bodies(tmp_path, "acme")
    journal = _journal_states(tmp_path / "state" / "wa-worker.db")
    assert elapsed < 1.5, elapsed
    assert 3 <= len(sent) <= 30, len(sent)  # the batch stopped: only what was in flight finished
    assert sorted(journal) == sorted(b.removeprefix("body ") for b in sent)  # each send journaled, nothing else
    assert "sending" not in journal.values()
    assert len(proxy.queue["acme"]) == 300 - len(proxy.sent_marks) > 250  # the rest is still queued
    # the next run sends the rest, each exactly once
    proc = start_worker(worker_env(tmp_path, proxy.url, BATCH_POLL="false"), ROOT, log_path)
    try:
        await wait_until(lambda: len(proxy.sent_marks) == 300, timeout=30, what="all acknowledged")
        proc.send_signal(signal.SIGTERM)
        await anyio.to_thread.run_sync(proc.wait, 10)  # the fake proxy (this loop) answers its goodbyes
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    bodies = _sent_bodies(tmp_path, "acme")
    assert len(bodies) == 300 and sorted(bodies) == [f"body {mid}" for mid in ids]


def _garbage_db(tmp_path):
    db = tmp_path / "state" / "wa-worker.db"
    db.parent.mkdir()
    db.write_bytes(b"not a database, but someone's precious journal\n" * 50)
    return db


def _valid_header_garbage_db(tmp_path):
    db = tmp_path / "state" / "wa-worker.db"
    db.parent.mkdir()
    db.write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 16)
    return db


def _blocker_file(tmp_path):
    (tmp_path / "file").write_text("a regular file where a folder should be")
    return tmp_path / "file"


@pytest.mark.parametrize(
    ("setup", "needle"),
    [
        (lambda t: {"STATE_DB": str((t / "state" / "wa-worker.db").mkdir(parents=True) or
                                    t / "state" / "wa-worker.db")}, "STATE_DB {t}/state/wa-worker.db is a directory"),
        (lambda t: {"STATE_DB": str(_garbage_db(t))},
         "STATE_DB {t}/state/wa-worker.db is not a SQLite database (file kept untouched)"),
        (lambda t: {"STATE_DB": str(_valid_header_garbage_db(t))},
         "STATE_DB {t}/state/wa-worker.db cannot be used: "),
        (lambda t: {"STATE_DB": str(_blocker_file(t) / "sub" / "wa.db")},
         "STATE_DB {t}/file/sub/wa.db: its folder {t}/file/sub is not writable (Not a directory)"),
        (lambda t: {"AUTH_DIR": str(_blocker_file(t) / "auth")}, "AUTH_DIR {t}/file/auth is not writable (Not a directory)"),
        (lambda t: {"AUTH_DIR": str(_blocker_file(t))}, "AUTH_DIR {t}/file is not a directory"),
    ],
    ids=["db-is-dir", "db-corrupt", "db-corrupt-after-header", "db-folder-blocked", "auth-blocked", "auth-is-file"],
)
def test_unusable_paths_exit_2_with_one_line_and_keep_the_journal(tmp_path, setup, needle):
    overrides = setup(tmp_path)
    db = tmp_path / "state" / "wa-worker.db"
    before = db.read_bytes() if db.is_file() else None
    res = run_cli(worker_env(tmp_path, "http://127.0.0.1:9", **overrides), tmp_path)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines == [lines[0]] and lines[0].startswith("wa-worker: "), res.stderr
    assert needle.format(t=tmp_path) in lines[0], lines[0]
    assert "Traceback" not in res.stderr
    if before is not None:  # never repaired, truncated or replaced
        assert db.read_bytes() == before
        assert not (tmp_path / "state" / "wa-worker.db-wal").exists()
