"""``wa-worker dev --no-auto-scan``, ``dev scan``, ``dev inbound``: the real CLI in subprocesses,
the helpers run from a subdirectory (they find the state folder upward)."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.proc import free_port
from tests.test_dev_cli import wa, wait_until
from wa_worker.dev.cli import _command_name, build_parser
from wa_worker.dev.run import DevOptions, DevRun
from wa_worker.dev.state import DEFAULT_DIR, find_state_dir


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORKER_SECRET", "WA_DEV_PROXY_URL",
                                                            "SIMULATOR_AUTO_SCAN_MS")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


# long: one session through the real CLI, step by step
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_no_auto_scan_then_scan_and_inbound_from_a_subdirectory(tmp_path: Path) -> None:
    proxy_port, worker_port = free_port(), free_port()
    env = _env()
    sub = tmp_path / "src" / "deep"
    sub.mkdir(parents=True)
    out_path = tmp_path / "stdout.txt"
    with open(out_path, "w") as out_f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "wa_worker", "dev", "--simulator", "--no-auto-scan",
             "--proxy-port", str(proxy_port), "--port", str(worker_port)],
            cwd=tmp_path, env=env, stdout=out_f, stderr=subprocess.STDOUT,
        )
    try:
        state = tmp_path / ".wa-worker"
        wait_until(lambda: (state / "worker-url").exists(), 30, "the worker to start")
        assert (state / "worker-url").read_text().strip() == f"http://127.0.0.1:{worker_port}"

        def listed() -> str:
            r = wa("instance", "list", cwd=sub, env=env)
            assert r.returncode == 0, r.stderr
            return r.stdout

        wait_until(lambda: "waiting for a QR scan" in listed(), 30, "the QR code")
        time.sleep(2.5)  # longer than the default auto-scan (1.5 s): nobody scans
        assert re.search(r"^default\s+CONNECTING", listed(), re.M), listed()

        r = wa("scan", "default", cwd=sub, env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        wait_until(lambda: re.search(r"^default\s+CONNECTED", listed(), re.M), 30, "CONNECTED after the scan")

        r = wa("inbound", "default", "+55 11 98888-7777", "hello from the helper", cwd=sub, env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        wait_until(lambda: re.search(r"in   default  ← 5511988887777@s\.whatsapp\.net\S*  hello from the helper$",
                                     wa("messages", cwd=sub, env=env).stdout, re.M), 30, "the inbound message")

        r = wa("inbound", "nobody", "5511988887777", "x", cwd=sub, env=env)
        assert r.returncode == 1 and "no instance nobody" in r.stderr, r.stderr
        r = wa("inbound", "default", "not a number", "x", cwd=sub, env=env)
        assert r.returncode == 1 and "FROM must be a phone number" in r.stderr, r.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(45)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    out = out_path.read_text()
    assert code == 0, out
    assert "no auto-scan" in out
    assert not (state / "worker-url").exists()
    # once stopped, the helper says so in one line
    r = wa("inbound", "default", "5511988887777", "x", cwd=sub, env=env)
    assert r.returncode == 1 and "no worker is running" in r.stderr, r.stderr


def test_inbound_refuses_a_worker_without_the_simulator(tmp_path: Path) -> None:
    """`wa-worker dev proxy` runs no worker: `inbound` says so; a neonize worker: says that."""
    proxy_port = free_port()
    env = _env()
    proc = subprocess.Popen(
        [sys.executable, "-m", "wa_worker", "dev", "proxy", "--proxy-port", str(proxy_port)],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: (tmp_path / ".wa-worker" / "proxy-url").exists(), 30, "the proxy")
        r = wa("inbound", "default", "5511988887777", "x", cwd=tmp_path, env=env)
        assert r.returncode == 1 and "no worker is running" in r.stderr, r.stderr
        # the proxy answers /health without a "backend": as if a worker without the simulator
        r = wa("inbound", "default", "5511988887777", "x", "--worker-url", f"http://127.0.0.1:{proxy_port}",
               cwd=tmp_path, env=env)
        assert r.returncode == 1 and "not the simulator" in r.stderr, r.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)


def test_auto_scan_options(tmp_path: Path) -> None:
    p = build_parser()
    assert p.parse_args(["--simulator"]).auto_scan_ms == 1500
    assert p.parse_args(["--simulator", "--auto-scan-ms", "200"]).auto_scan_ms == 200
    assert p.parse_args(["--simulator", "--no-auto-scan"]).auto_scan_ms is None
    for opts, want in ((DevOptions(dir=tmp_path / "a", simulator=True, auto_scan_ms=None), None),
                       (DevOptions(dir=tmp_path / "b", simulator=True, auto_scan_ms=200), 200)):
        dev = DevRun(opts)
        dev.proxy_url = "http://127.0.0.1:8787"
        assert dev.worker_settings().SIMULATOR_AUTO_SCAN_MS == want


def test_state_folder_found_upward(tmp_path: Path) -> None:
    (tmp_path / ".wa-worker").mkdir()
    (tmp_path / ".wa-worker" / "secret").write_text("s" * 20)
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    assert find_state_dir(DEFAULT_DIR, deep) == tmp_path.resolve() / ".wa-worker"
    assert find_state_dir(Path("elsewhere"), deep) == Path("elsewhere")  # --dir wins


def test_banner_hints_are_copy_pasteable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))
    assert _command_name(".venv/bin/wa-worker") == ".venv/bin/wa-worker"  # through scripts/dev.sh
    assert _command_name("/x/y/__main__.py") == "python -m wa_worker"
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    dev = DevRun(DevOptions(dir=Path("my state"), simulator=True, command=".venv/bin/wa-worker"), out)
    dev.proxy_url = "http://127.0.0.1:8787"
    dev.banner()
    text = out.getvalue()
    assert ".venv/bin/wa-worker dev --dir 'my state' send NAME +5511999990000" in text
    assert ".venv/bin/wa-worker dev --dir 'my state' inbound NAME +5511988887777" in text
    out = io.StringIO()
    dev = DevRun(DevOptions(dir=DEFAULT_DIR, simulator=False), out)
    dev.proxy_url = "http://127.0.0.1:8787"
    dev.banner()
    assert "  try           wa-worker dev send NAME" in out.getvalue() and "--dir" not in out.getvalue()
    assert "inbound" not in out.getvalue()  # real phones: no simulated contacts
