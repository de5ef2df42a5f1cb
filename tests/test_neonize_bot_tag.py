"""WhatsApp's "AI" badge: goneonize appends ``<bot biz_bot="1"/>`` to every 1:1
message unless ``NEONIZE_BOT_TAG=off`` is in the environment the process
*started* with (the Go runtime copies that block at load; ``os.environ`` set
later is invisible to it). The real ``wa-worker`` and ``wa-worker dev`` must load
neonize with the value ``WA_BOT_BADGE`` asks for (default: off).

A ``sitecustomize`` hook (on PYTHONPATH) records, in every process started, the
launch environment (``/proc/self/environ``) at start and at the moment the
top-level ``neonize`` package is first imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.proc import ROOT, free_port, start_worker, stop_process, worker_env

pytestmark = [pytest.mark.neonize, pytest.mark.timeout(90)]

HOOK = '''
import json, os, sys

_OUT = os.environ.get("BOT_TAG_PROBE_OUT")


def _launch():
    try:
        block = open("/proc/self/environ", "rb").read()
    except OSError:
        return "unreadable"
    for entry in block.split(b"\\0"):
        if entry.startswith(b"NEONIZE_BOT_TAG="):
            return entry.split(b"=", 1)[1].decode()
    return None


def _record(kind):
    with open(_OUT, "a") as f:
        f.write(json.dumps({"kind": kind, "pid": os.getpid(), "launch": _launch(),
                            "os_environ": os.environ.get("NEONIZE_BOT_TAG")}) + "\\n")


class _Probe:
    def find_spec(self, name, path=None, target=None):
        if name == "neonize":
            sys.meta_path.remove(self)
            _record("import")
        return None


if _OUT:
    _record("start")
    sys.meta_path.insert(0, _Probe())
'''


def _probe_env(tmp_path: Path, base: dict[str, str], **extra: str) -> tuple[dict[str, str], Path]:
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir(exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(HOOK)
    out = tmp_path / "probe.jsonl"
    env = {k: v for k, v in base.items() if k not in ("NEONIZE_BOT_TAG", "WA_BOT_BADGE")}
    paths = [str(hook_dir), str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env.update(PYTHONPATH=os.pathsep.join(paths), BOT_TAG_PROBE_OUT=str(out), PYTHONUNBUFFERED="1")
    env.update(extra)
    return env, out


def _tail(log: Path) -> str:
    return log.read_text()[-2000:] if log.exists() else ""


def _launch_tag(pid: int) -> str:
    """``NEONIZE_BOT_TAG=...`` in a running process's launch environment ("" if absent)."""
    with open(f"/proc/{pid}/environ", "rb") as f:
        tag = [e.decode() for e in f.read().split(b"\0") if e.startswith(b"NEONIZE_BOT_TAG=")]
    return tag[0] if tag else ""


def _records(out: Path) -> list[dict[str, Any]]:
    if not out.exists():
        return []
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


async def _wait_for_import(out: Path, proc: subprocess.Popen[Any], log: Path, timeout_s: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        imports = [r for r in _records(out) if r["kind"] == "import"]
        if imports:
            return imports[0]
        assert proc.poll() is None, f"exited {proc.returncode}: {_tail(log)}"
        await anyio.sleep(0.1)
    raise AssertionError(f"neonize never imported; records {_records(out)}; log {_tail(log)}")


def _spawn(argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as log_f:
        return subprocess.Popen(argv, cwd=cwd, env=env, stdout=log_f, stderr=log_f, stdin=subprocess.DEVNULL)


async def _stop(proc: subprocess.Popen[Any]) -> None:
    # in a thread: the fake proxy (this loop) answers the worker's goodbyes (else each waits EDGE_TIMEOUT_S)
    await anyio.to_thread.run_sync(stop_process, proc, 15)


async def _run_worker(tmp_path: Path, proxy_url: str, **extra: str) -> tuple[dict[str, Any], list[dict[str, Any]], str]:
    base = worker_env(tmp_path, proxy_url, WA_BACKEND="neonize", CONNECT_TIMEOUT_S="5")
    env, out = _probe_env(tmp_path, base, **extra)
    log = tmp_path / "worker.log"
    proc = start_worker(env, ROOT, log)
    try:
        imported = await _wait_for_import(out, proc, log)
        tag = _launch_tag(proc.pid)
    finally:
        await _stop(proc)
    assert imported["pid"] == proc.pid  # the re-exec keeps the pid (signals, Docker PID 1)
    return imported, _records(out), tag


@pytest.mark.anyio
async def test_worker_loads_neonize_with_the_badge_off_by_default(proxy, tmp_path: Path) -> None:
    proxy.add_instance("acme")  # a session to open: the worker imports neonize for it
    imported, records, tag = await _run_worker(tmp_path, proxy.url)
    assert imported["launch"] == "off" and imported["os_environ"] == "off", records
    assert tag == "NEONIZE_BOT_TAG=off"
    starts = [r for r in records if r["kind"] == "start"]
    # started without it: wa-worker replaced itself once, with it
    assert [s["launch"] for s in starts] == [None, "off"], records


@pytest.mark.anyio
async def test_wa_bot_badge_true_keeps_the_badge_even_under_the_images_default(proxy, tmp_path: Path) -> None:
    proxy.add_instance("acme")
    imported, records, tag = await _run_worker(tmp_path, proxy.url, NEONIZE_BOT_TAG="off", WA_BOT_BADGE="true")
    assert imported["launch"] == "on" and imported["os_environ"] == "on", records
    assert tag == "NEONIZE_BOT_TAG=on"


@pytest.mark.anyio
async def test_docker_image_environment_needs_no_restart(proxy, tmp_path: Path) -> None:
    proxy.add_instance("acme")
    imported, records, _ = await _run_worker(tmp_path, proxy.url, NEONIZE_BOT_TAG="off")
    assert imported["launch"] == "off"
    assert [r["kind"] for r in records].count("start") == 1, records


@pytest.mark.anyio
async def test_simulator_worker_is_left_alone(proxy, tmp_path: Path) -> None:
    """No neonize, no restart: WA_BACKEND=simulator never touches the variable."""
    proxy.add_instance("acme")
    env, out = _probe_env(tmp_path, worker_env(tmp_path, proxy.url))
    log = tmp_path / "worker.log"
    proc = start_worker(env, ROOT, log)
    try:
        deadline = time.monotonic() + 20
        while proxy.status_of("acme") != "CONNECTED":
            assert time.monotonic() < deadline and proc.poll() is None, _tail(log)
            await anyio.sleep(0.1)
    finally:
        await _stop(proc)
    assert [r["kind"] for r in _records(out)] == ["start"], _records(out)


@pytest.mark.slow
@pytest.mark.anyio
async def test_dev_loads_neonize_with_the_badge_off(tmp_path: Path) -> None:
    """``wa-worker dev`` (real WhatsApp mode) builds its worker in-process: same rule."""

    base = {k: v for k, v in os.environ.items() if k not in ("WORKER_SECRET", "WA_DEV_PROXY_URL")}
    env, out = _probe_env(tmp_path, base)
    log = tmp_path / "dev.log"
    proc = _spawn(
        [sys.executable, "-m", "wa_worker", "dev", "--no-qr", "--proxy-port", str(free_port()), "--port",
         str(free_port())], env, tmp_path, log,
    )
    try:
        imported = await _wait_for_import(out, proc, log)
    finally:
        await _stop(proc)
    assert imported["launch"] == "off" and imported["pid"] == proc.pid, _records(out)


def test_go_reads_the_launch_environment_not_os_environ(tmp_path: Path) -> None:
    """Why the worker restarts itself: the Go runtime inside neonize sees a variable
    set in the launch environment (GODEBUG=inittrace=1 makes it print its init
    trace) but not one added to ``os.environ`` before the import."""
    code_late = "import os; os.environ['GODEBUG'] = 'inittrace=1'; import neonize._binder"
    env = {k: v for k, v in os.environ.items() if k != "GODEBUG"}
    late = subprocess.run([sys.executable, "-c", code_late], env=env, capture_output=True, text=True, timeout=60)
    launch = subprocess.run([sys.executable, "-c", "import neonize._binder"], env={**env, "GODEBUG": "inittrace=1"},
                            capture_output=True, text=True, timeout=60)
    assert late.returncode == 0 and launch.returncode == 0
    assert "init " not in late.stderr
    assert "init " in launch.stderr


def test_bot_tag_values_follow_goneonize(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wa_worker.backends.neonize.loading import bot_badge_setting, go_adds_badge, launch_environment_value

    # goneonize shouldAddBotNode: strings.ToLower(strings.TrimSpace(v)) in off/none/false/0 -> no badge
    assert not any(go_adds_badge(v) for v in ("off", "none", "false", "0", " OFF ", "False"))
    assert all(go_adds_badge(v) for v in (None, "", "on", "1", "yes"))
    environ = tmp_path / "environ"
    environ.write_bytes(b"A=1\0NEONIZE_BOT_TAG=off\0B=NEONIZE_BOT_TAG=on\0")
    assert launch_environment_value(environ) == "off"
    environ.write_bytes(b"A=1\0")
    assert launch_environment_value(environ) is None
    # wa-worker dev reads WA_BOT_BADGE before its Settings exist: env, then ./.env, like Settings
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WA_BOT_BADGE", raising=False)
    assert bot_badge_setting() is False
    (tmp_path / ".env").write_text("WA_BOT_BADGE=true\n")
    assert bot_badge_setting() is True
    monkeypatch.setenv("WA_BOT_BADGE", "no")
    assert bot_badge_setting() is False
