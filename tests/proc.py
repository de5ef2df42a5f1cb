"""Run the real ``wa-worker`` as a subprocess (for signals, crashes, exit codes)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.fakeproxy import SECRET

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(tmp_path: Path, proxy_url: str, **extra: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGE_", "WORKER_", "WA_", "SIMULATOR_"))}
    env.update(
        EDGE_BASE_URL=proxy_url,
        WORKER_SECRET=SECRET,
        PORT=str(free_port()),
        AUTH_DIR=str(tmp_path / "auth"),
        STATE_DB=str(tmp_path / "state" / "wa-worker.db"),
        WA_BACKEND="simulator",
        SIMULATOR_AUTO_SCAN_MS="50",
        INSTANCE_POLL_MS="100",
        INSTANCE_POLL_MAX_MS="400",
        MSG_POLL_MS="50",
        MSG_POLL_MAX_MS="200",
        EDGE_TIMEOUT_S="2",
        LOG_LEVEL="INFO",
        PYTHONUNBUFFERED="1",
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


def stop_process(proc: subprocess.Popen[Any] | None, timeout: float = 10.0,
                 sig: signal.Signals = signal.SIGTERM) -> None:
    """Send ``sig`` to ``proc`` (if still running) and wait ``timeout`` s for it; then SIGKILL it and reap it."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def start_worker(env: dict[str, str], cwd: Path, log_path: Path,
                 preexec_fn: Callable[[], Any] | None = None) -> subprocess.Popen[bytes]:
    """``preexec_fn`` runs in the child before exec (e.g. to lower its RLIMIT_NOFILE)."""
    log = open(log_path, "ab")
    return subprocess.Popen([sys.executable, "-m", "wa_worker"], env=env, cwd=cwd, stdout=log, stderr=log,
                            stdin=subprocess.DEVNULL, preexec_fn=preexec_fn)
