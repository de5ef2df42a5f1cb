#!/usr/bin/env python3
"""Push channel benchmark (issue #13): queued -> sent latency with ``GET /events``
and no ``/wake``, and idle proxy calls per instance-hour with and without push.

The worker (``wa_worker.daemon.Worker``, simulator backend) and the loopback proxy
(``tests/fakeproxy.FakeProxy`` in claim mode, with its faithful ``/events`` long
poll) run in this one process and event loop.

* **latency**: N connected, idle instances with the default poll settings
  (MSG_POLL 2 s -> 60 s); M messages enqueued one at a time, each at a random
  instance, after a random pause of 0.25-0.5 s (the long poll is held again); latency = the proxy's ``/mark-sent`` time minus
  its enqueue time (one push, one poll, the send, the acknowledgement). Run with
  push, per-instance polling and batch polling.
* **idle calls**: every interval scaled down by ``--scale`` (40: 90 real seconds
  stands for one hour): MSG_POLL 2 s -> 60 s, INSTANCE_POLL 10 s -> 60 s, the push
  channel's wait 25 s and its idle cap 300 s. After a warm-up of two idle caps,
  the proxy calls of a window are counted by endpoint and reported per
  instance-hour (window x scale = the hours; scale <= 40 keeps MSG_POLL_MS >= 50).

    python scripts/bench_push.py                       # N = 20, M = 100, window 45 s (~5 min)
    python scripts/bench_push.py --instances 50 --window 120 --json out.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.conftest import make_settings  # (after the path change above)
from tests.fakeproxy import FakeProxy
from wa_worker.backends.simulator import SimulatorBackend
from wa_worker.daemon import Worker
from wa_worker.instances.push import PUSH_IDLE_POLL_MAX_S, PUSH_WAIT_S

from _bench_common import fmt, pct, table

ALICE = "5511988887777"


async def _connected(proxy: FakeProxy, ids: list[str], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(proxy.status_of(i) == "CONNECTED" for i in ids):
        if time.monotonic() > deadline:
            raise SystemExit("instances did not connect")
        await anyio.sleep(0.05)


async def _run_worker(tmp: Path, proxy: FakeProxy, n: int, *, batch: bool, push: bool, scale: float,
                      body: Any) -> Any:
    """A worker on ``n`` auto-paired simulator instances; ``body(worker)`` runs while it serves."""
    def s(seconds: float) -> int:
        return max(1, round(seconds * 1000 / scale))

    proxy.events = push
    proxy.batch = batch
    ids = [f"inst-{k:03d}" for k in range(n)]
    for iid in ids:
        proxy.add_instance(iid)
    await proxy.start()
    settings = make_settings(tmp, proxy.url, BATCH_POLL=batch, MSG_POLL_MS=s(2), MSG_POLL_MAX_MS=s(60),
                             INSTANCE_POLL_MS=s(10), INSTANCE_POLL_MAX_MS=s(60), EDGE_TIMEOUT_S=10,
                             SIMULATOR_AUTO_SCAN_MS=0, START_CONCURRENCY=32, LOG_LEVEL="WARNING")
    backend = SimulatorBackend(tmp / "auth", auto_scan_ms=0, connect_delay_s=0.01)
    worker = Worker(settings, backend=backend, host="127.0.0.1")
    worker.push.wait_s = PUSH_WAIT_S / scale
    worker.push.idle_poll_max_s = PUSH_IDLE_POLL_MAX_S / scale
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            try:
                await _connected(proxy, ids)
                return await body(worker, ids)
            finally:
                worker.request_stop()
                with anyio.fail_after(30):
                    await worker.wait_stopped()
    finally:
        await proxy.stop()


async def latency(n: int, m: int, *, batch: bool, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)

    async def body(worker: Worker, ids: list[str]) -> dict[str, Any]:
        await anyio.sleep(3.0)  # idle: the polls have moved past their floor
        lat: list[float] = []
        for k in range(m):
            await anyio.sleep(0.25 + rng.random() * 0.25)  # one message at a time, the channel held again
            mid = f"m{k}"
            proxy.enqueue(rng.choice(ids), mid, ALICE, f"message {k}")
            deadline = time.monotonic() + 30
            while mid not in proxy.sent_at:
                if time.monotonic() > deadline:
                    raise SystemExit(f"{mid} not sent within 30 s")
                await anyio.sleep(0.001)
            lat.append((proxy.sent_at[mid] - proxy.enqueued_at[mid]) * 1000)
        return {"mode": "batch" if batch else "per-instance", "n": n, "messages": m,
                "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "max_ms": max(lat),
                "wake_calls": 0, "events_calls": proxy.calls["events"]}

    proxy = FakeProxy(claim=True)
    with tempfile.TemporaryDirectory() as tmp:
        return dict(await _run_worker(Path(tmp), proxy, n, batch=batch, push=True, scale=1.0, body=body))


async def idle_calls(n: int, *, batch: bool, push: bool, scale: float, window_s: float) -> dict[str, Any]:
    async def body(worker: Worker, ids: list[str]) -> dict[str, Any]:
        await anyio.sleep(2 * max(60, PUSH_IDLE_POLL_MAX_S if push else 60) / scale)  # warm-up: caps reached
        before = Counter(proxy.calls)
        await anyio.sleep(window_s)
        calls = Counter(proxy.calls)
        calls.subtract(before)
        hours = window_s * scale / 3600
        per = {ep: c / hours / n for ep, c in calls.items() if c}
        return {"mode": ("batch" if batch else "per-instance") + (" + push" if push else ""), "n": n,
                "push_live": worker.push.live, "per_instance_hour": per,
                "total_per_instance_hour": sum(per.values())}

    proxy = FakeProxy(claim=True)
    with tempfile.TemporaryDirectory() as tmp:
        return dict(await _run_worker(Path(tmp), proxy, n, batch=batch, push=push, scale=scale, body=body))


async def main(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"latency": [], "idle": []}
    for batch in (False, True):
        r = await latency(args.instances, args.messages, batch=batch, seed=args.seed)
        out["latency"].append(r)
        print(f"latency {r['mode']}: p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms", flush=True)
    for batch in (False, True):
        for push in (False, True):
            r = await idle_calls(args.instances, batch=batch, push=push, scale=args.scale, window_s=args.window)
            out["idle"].append(r)
            print(f"idle {r['mode']}: {r['total_per_instance_hour']:.1f} calls/instance-hour", flush=True)
    print()
    print(table(["mode", "N", "messages", "p50 ms", "p99 ms", "max ms", "/wake calls"],
                [[r["mode"], r["n"], r["messages"], fmt(r["p50_ms"]), fmt(r["p99_ms"]), fmt(r["max_ms"]),
                  r["wake_calls"]] for r in out["latency"]]))
    print()
    eps = ["queued-messages", "events", "disconnected-instances"]
    print(table(["mode", "N", *eps, "total"],
                [[r["mode"], r["n"], *(fmt(r["per_instance_hour"].get(ep, 0.0)) for ep in eps),
                  fmt(r["total_per_instance_hour"])] for r in out["idle"]]))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instances", type=int, default=20)
    ap.add_argument("--messages", type=int, default=100)
    ap.add_argument("--scale", type=float, default=40.0, help="time scale of the idle-calls runs (<= 40: MSG_POLL_MS >= 50)")
    ap.add_argument("--window", type=float, default=45.0, help="idle window, real seconds")
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--json", type=Path)
    return ap.parse_args(argv)


if __name__ == "__main__":
    a = parse_args()
    result = anyio.run(main, a)
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))
