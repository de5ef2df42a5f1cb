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
        while proc.poll() is None and time.monotonic() - t0 < 12:
            await anyio.sleep(0.05)
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
