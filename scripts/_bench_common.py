"""Shared pieces of the benchmarks (``bench_scale.py``, ``bench_journal.py``).

* :class:`BenchProxy` - the tests' loopback proxy (``tests/fakeproxy.FakeProxy``)
  in claim mode: it hands each message out once, like the Supabase kit's
  ``queued -> sending`` update, so a benchmark measures the worker, not
  re-offers. It adds timestamps of every enqueue / poll / mark-sent /
  CONNECTED, and runs inside the benchmark's event loop or as its own process
  (``python scripts/_bench_common.py proxy``, with ``/_bench/*`` control routes).
* :class:`WorkerProc` - ``python -m wa_worker`` in a subprocess, with
  ``/proc`` readers for its CPU time and RSS.
* small statistics helpers and an event-loop lag monitor (to show whether the
  benchmark process - the proxy - was saturated).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.fakeproxy import FakeProxy  # (after the path change above)
SECRET = "bench-secret-0123456789"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------------- statistics


def pct(values: list[float], p: float) -> float | None:
    """Percentile with linear interpolation (p in 0..100)."""
    if not values:
        return None
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    k = (len(xs) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = []
    for k, r in enumerate(cells):
        out.append("| " + " | ".join(c.rjust(widths[i]) if k else c.ljust(widths[i]) for i, c in enumerate(r)) + " |")
        if k == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


# ---------------------------------------------------------------------- /proc


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------- the proxy


class BenchProxy(FakeProxy):
    """tests/fakeproxy.py's proxy in claim mode, timing what a benchmark measures."""

    def __init__(self, *, batch: bool = False, secret: str = SECRET, poll_limit: int = 100) -> None:
        super().__init__(secret=secret, batch=batch, claim=True, poll_limit=poll_limit)
        self.enqueued_wall: dict[str, float] = {}
        self.enqueued_mono = self.enqueued_at  # first enqueue, monotonic
        self.sent_mono = self.sent_at  # first /mark-sent, monotonic
        self.sent_waiters: dict[str, asyncio.Event] = {}
        self.inbound_last_mono: float | None = None
        self.connected_at: dict[str, float] = {}  # first CONNECTED since reset_connected()
        self.first_call_mono: float | None = None
        self.record_polls = False
        self.poll_times: dict[str | None, list[float]] = defaultdict(list)
        self.on_queue_call = self._record_poll

    # ------------------------------------------------------------------ driving

    def enqueue(self, iid: str, mid: str, to: str = "5511988887777", body: str | None = None) -> None:
        super().enqueue(iid, mid, to, body or mid)
        self.enqueued_wall[mid] = time.time()

    def waiter(self, mid: str) -> asyncio.Event:
        ev = self.sent_waiters.get(mid)
        if ev is None:
            ev = self.sent_waiters[mid] = asyncio.Event()
            if mid in self.sent_mono:
                ev.set()
        return ev

    def reset_connected(self) -> None:
        self.connected_at.clear()
        self.first_call_mono = None
        for inst in self.instances.values():
            inst["status"] = "DISCONNECTED"

    def all_connected(self) -> bool:
        return len(self.connected_at) >= len(self.instances)

    def stats(self) -> dict[str, Any]:
        return {"calls": dict(self.calls), "sent": len(self.sent_mono), "failed": len(self.failed_marks),
                "inbound": len(self.inbound), "inbound_last_mono": self.inbound_last_mono,
                "connected": len(self.connected_at), "queued": sum(len(q) for q in self.queue.values())}

    # ------------------------------------------------------------------ server: the fake proxy's, timed

    def app(self) -> web.Application:
        app = super().app()
        app.router.add_post("/_bench/setup", self._ctl_setup)
        app.router.add_post("/_bench/enqueue", self._ctl_enqueue)
        app.router.add_get("/_bench/stats", self._ctl_stats)
        return app

    def _record_poll(self, iid: str | None) -> None:
        if self.record_polls:
            self.poll_times[iid].append(time.monotonic())

    async def _gate(self, request: web.Request, endpoint: str) -> web.Response | None:
        if self.first_call_mono is None:
            self.first_call_mono = time.monotonic()
        return await super()._gate(request, endpoint)

    async def _update_status(self, request: web.Request) -> web.Response:
        resp = await super()._update_status(request)
        body = await request.json()  # aiohttp keeps the body: read again
        if resp.status == 200 and body.get("status") == "CONNECTED":
            self.connected_at.setdefault(body["instanceId"], time.monotonic())
        return resp

    async def _mark_sent(self, request: web.Request) -> web.Response:
        resp = await super()._mark_sent(request)
        ev = self.sent_waiters.get((await request.json())["messageId"])
        if ev is not None:
            ev.set()
        return resp

    async def _inbound(self, request: web.Request) -> web.Response:
        resp = await super()._inbound(request)
        self.inbound_last_mono = time.monotonic()
        return resp

    # ------------------------------------------------------------------ control (subprocess mode)

    async def _ctl_setup(self, request: web.Request) -> web.Response:
        body = await request.json()
        for iid in body.get("instances", []):
            self.add_instance(iid)
        return web.json_response({"ok": True})

    async def _ctl_enqueue(self, request: web.Request) -> web.Response:
        body = await request.json()
        ids = body["instances"]
        prefix = body.get("prefix", "m")
        n = int(body["count"])
        for k in range(n):
            self.enqueue(ids[k % len(ids)], f"{prefix}{k}")
        return web.json_response({"ok": True, "enqueued": n})

    async def _ctl_stats(self, request: web.Request) -> web.Response:
        s = self.stats()
        s["cpu_s"] = cpu_seconds(os.getpid())
        s["last_sent_mono"] = max(self.sent_mono.values()) if self.sent_mono else None
        return web.json_response(s)


class ProxyProc:
    """A :class:`BenchProxy` in its own process (so it does not share a core with an in-process worker)."""

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "proxy", str(self.port)],
                                     stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# ---------------------------------------------------------------------- the worker


def worker_env(base: Path, proxy_url: str, **extra: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("EDGE_", "WORKER_", "WA_", "SIMULATOR_", "MSG_", "INSTANCE_", "BATCH_", "STATE_",
                                "AUTH_"))}
    env.update(
        EDGE_BASE_URL=proxy_url,
        WORKER_SECRET=SECRET,
        PORT=str(free_port()),
        AUTH_DIR=str(base / "auth"),
        STATE_DB=str(base / "state" / "wa-worker.db"),
        WA_BACKEND="simulator",
        LOG_LEVEL="INFO",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(ROOT),
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


class WorkerProc:
    """``python -m wa_worker`` in a subprocess (cwd = its own folder, so no stray ``.env`` is read)."""

    def __init__(self, base: Path, env: dict[str, str]) -> None:
        self.base = base
        self.env = env
        self.port = int(env["PORT"])
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_mono = 0.0
        self.last_stop_s: float | None = None  # SIGTERM -> exit of the last stop()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, **extra: Any) -> None:
        env = dict(self.env)
        env.update({k: str(v) for k, v in extra.items()})
        env["PORT"] = str(free_port())
        self.port = int(env["PORT"])
        self.base.mkdir(parents=True, exist_ok=True)
        log = open(self.base / "worker.log", "ab")
        self.started_mono = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "wa_worker"], env=env, cwd=self.base, stdout=log,
                                     stderr=log, stdin=subprocess.DEVNULL)
        log.close()

    async def stop(self, limit_s: float = 30.0) -> int:
        """SIGTERM, then SIGKILL after ``limit_s``; the exit code (``last_stop_s``: how long it took)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        try:
            await asyncio.to_thread(self.proc.wait, limit_s)
            self.last_stop_s = time.monotonic() - t0
        except subprocess.TimeoutExpired:
            self.last_stop_s = None
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class LoopLag:
    """How late a 50 ms ticker wakes up: a saturated event loop (proxy) shows here."""

    def __init__(self, tick_s: float = 0.05) -> None:
        self.tick_s = tick_s
        self.lags: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            t = time.monotonic()
            await asyncio.sleep(self.tick_s)
            self.lags.append(time.monotonic() - t - self.tick_s)

    def start(self) -> None:
        self.lags.clear()
        self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> dict[str, float | None]:
        if self._task is not None:
            self._task.cancel()
        return {"p99_ms": (pct(self.lags, 99) or 0) * 1000, "max_ms": max(self.lags, default=0) * 1000}


def read_sent_log(auth_dir: Path) -> dict[str, float]:
    """body (= message id in these benchmarks) -> simulator send time (wall clock)."""
    out: dict[str, float] = {}
    if not auth_dir.exists():
        return out
    for d in auth_dir.iterdir():
        f = d / "simulator-sent.jsonl"
        if not f.exists():
            continue
        for line in f.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            out[rec["body"]] = rec["ts"]
    return out


async def _serve_proxy(port: int) -> None:
    proxy = await BenchProxy().start(port)
    print(f"bench proxy on {proxy.url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    await proxy.stop()


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "proxy":
        asyncio.run(_serve_proxy(int(sys.argv[2])))
    else:
        print("usage: _bench_common.py proxy PORT", file=sys.stderr)
        sys.exit(2)
