#!/usr/bin/env python3
"""Scale benchmark: proxy calls at idle, queued->sent latency, RSS/CPU per idle
instance and resume time, on the simulator backend against a loopback proxy.

Every worker is a real ``python -m wa_worker`` subprocess (so its RSS and CPU
are its own); the proxies (one per worker, ``_bench_common.BenchProxy``) run in
this process. See docs/performance.md for the method and the figures.

Per size N the run builds three workers on the same N paired sessions:

* ``adaptive`` - defaults (MSG_POLL 2 s -> 30 s, INSTANCE_POLL 10 s -> 60 s), BATCH_POLL=false
* ``batch``    - defaults, the proxy supports batch ``GET /queued-messages``
* ``node``     - the Node worker's fixed cadence (MSG_POLL 2 s, INSTANCE_POLL 10 s, no batch)

plus one ``baseline`` worker with 0 instances (RSS/CPU reference).

Timeline: pair (auto-scan) -> stop -> restart (resume time) -> start the batch
and node copies -> warm-up -> idle window (calls, CPU, RSS) -> polling-only
latency (adaptive, node) -> wake-up latency (adaptive, batch).

Usage: /work/venv/bin/python scripts/bench_scale.py [--sizes 10,100,500] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wa_worker.config import Settings  # noqa: E402
from _bench_common import (
    SECRET,
    BenchProxy,
    LoopLag,
    WorkerProc,
    cpu_seconds,
    fmt,
    pct,
    read_sent_log,
    rss_kib,
    table,
    worker_env,
)

# the shipped defaults, read from the settings model so the benchmark follows them
_D = {name: f.default for name, f in Settings.model_fields.items()}
CAP_S = _D["MSG_POLL_MAX_MS"] / 1000  # --msg-poll-max-ms changes it for the adaptive and batch workers
FLOOR_S = _D["MSG_POLL_MS"] / 1000
NODE_MSG_S = 2.0
NODE_INSTANCE_S = 10.0
DISCOVERY_CAP_S = _D["INSTANCE_POLL_MAX_MS"] / 1000
_SHIPPED = dict(MSG_POLL_MS=_D["MSG_POLL_MS"], MSG_POLL_MAX_MS=_D["MSG_POLL_MAX_MS"],
                INSTANCE_POLL_MS=_D["INSTANCE_POLL_MS"], INSTANCE_POLL_MAX_MS=_D["INSTANCE_POLL_MAX_MS"])

MODES = {
    "adaptive": dict(_SHIPPED, BATCH_POLL="false"),
    "batch": dict(_SHIPPED, BATCH_POLL="true"),
    "node": dict(MSG_POLL_MS=2000, MSG_POLL_MAX_MS=2000, INSTANCE_POLL_MS=10000, INSTANCE_POLL_MAX_MS=10000,
                 BATCH_POLL="false"),
}
MODES["baseline"] = MODES["adaptive"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Scenario:
    mode: str
    n: int
    base: Path
    proxy: BenchProxy = field(init=False)
    worker: WorkerProc = field(init=False)
    ids: list[str] = field(init=False)
    out: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ids = [f"n{self.n}-{k:04d}" for k in range(self.n)]
        self.proxy = BenchProxy(batch=self.mode == "batch")
        for iid in self.ids:
            self.proxy.add_instance(iid)

    @property
    def key(self) -> str:
        return f"{self.mode}-{self.n}"

    async def start_proxy(self, extra_path: str | None = None, auto_scan_ms: int = 0) -> None:
        await self.proxy.start()
        env = worker_env(self.base, self.proxy.url, SIMULATOR_AUTO_SCAN_MS=auto_scan_ms, **MODES[self.mode])
        if extra_path:
            env["PYTHONPATH"] = extra_path + os.pathsep + env["PYTHONPATH"]
        self.worker = WorkerProc(self.base, env)


async def wait_for(cond: Any, limit_s: float, what: str, tick: float = 0.02) -> None:
    deadline = time.monotonic() + limit_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {limit_s:.0f}s waiting for {what}")
        await asyncio.sleep(tick)


async def connect_all(sc: Scenario, what: str, limit_s: float = 300.0, probe: bool = False) -> dict[str, Any]:
    """(Re)start the worker and time it until the proxy has CONNECTED for every instance.
    ``probe``: meanwhile, time ``GET /health`` and ``POST /wake`` against the worker."""
    sc.proxy.reset_connected()
    sc.worker.start()
    t0 = sc.worker.started_mono
    await wait_for(lambda: sc.proxy.first_call_mono is not None or not sc.worker.alive(), 60, f"{sc.key} up")
    if not sc.worker.alive():
        raise RuntimeError(f"{sc.key}: worker exited, see {sc.base / 'worker.log'}")
    prober = asyncio.get_running_loop().create_task(probe_http(sc)) if probe else None
    try:
        await wait_for(sc.proxy.all_connected, limit_s, f"{sc.key} {what}")
    finally:
        probes = await stop_probe(prober)
    cpu = cpu_seconds(sc.worker.pid)
    last = max(sc.proxy.connected_at.values()) if sc.proxy.connected_at else t0
    first_call = sc.proxy.first_call_mono or t0
    out: dict[str, Any] = {"process_to_first_call_s": first_call - t0, "all_connected_s": last - t0,
                           "connect_phase_s": last - first_call, "worker_cpu_s": cpu}
    if probes is not None:
        out["probes"] = probes
    return out


async def probe_http(sc: Scenario, gap_s: float = 0.01) -> dict[str, list[float]]:
    """``GET /health`` and ``POST /wake`` (bearer), each in its own loop every ``gap_s``
    after the previous answer, until cancelled; latencies in ms."""
    got: dict[str, list[float]] = {"health": [], "wake": [], "errors": []}
    base = f"http://127.0.0.1:{sc.worker.port}"
    headers = {"Authorization": f"Bearer {SECRET}"}

    async def one(http: aiohttp.ClientSession, kind: str) -> None:
        k = 0
        while True:
            k += 1
            t = time.perf_counter()
            try:
                if kind == "health":
                    async with http.get(f"{base}/health") as resp:
                        await resp.read()
                else:
                    async with http.post(f"{base}/wake", json={"instanceId": sc.ids[k % len(sc.ids)]},
                                         headers=headers) as resp:
                        await resp.read()
                got[kind].append((time.perf_counter() - t) * 1000)
            except (aiohttp.ClientError, TimeoutError):
                got["errors"].append((time.perf_counter() - t) * 1000)
            await asyncio.sleep(gap_s)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        try:
            await asyncio.gather(one(http, "health"), one(http, "wake"))
        except asyncio.CancelledError:
            return got
    return got


async def stop_probe(task: "asyncio.Task[dict[str, list[float]]] | None") -> dict[str, Any] | None:
    if task is None:
        return None
    task.cancel()
    got = await task
    return {k: {"n": len(v), "p50": pct(v, 50), "p99": pct(v, 99), "max": max(v, default=None)}
            for k, v in got.items()}


# ---------------------------------------------------------------------- idle window


def snapshot(sc: Scenario) -> dict[str, Any]:
    return {"calls": dict(sc.proxy.calls), "cpu": cpu_seconds(sc.worker.pid), "t": time.monotonic()}


async def idle_window(scs: list[Scenario], window_s: float) -> dict[str, Any]:
    lag = LoopLag()
    for sc in scs:
        sc.proxy.poll_times.clear()
        sc.proxy.record_polls = True
    before = {sc.key: snapshot(sc) for sc in scs}
    self_cpu0, t0 = cpu_seconds(os.getpid()), time.monotonic()
    rss: dict[str, list[int]] = {sc.key: [] for sc in scs}
    lag.start()
    while time.monotonic() - t0 < window_s:
        for sc in scs:
            rss[sc.key].append(rss_kib(sc.worker.pid))
        await asyncio.sleep(min(5.0, max(0.0, window_s - (time.monotonic() - t0))))
    after = {sc.key: snapshot(sc) for sc in scs}
    elapsed = time.monotonic() - t0
    lagged = lag.stop()
    for sc in scs:
        rss[sc.key].append(rss_kib(sc.worker.pid))
        b, a = before[sc.key], after[sc.key]
        dt = a["t"] - b["t"]
        calls = {k: a["calls"].get(k, 0) - b["calls"].get(k, 0) for k in set(a["calls"]) | set(b["calls"])}
        calls = {k: v for k, v in calls.items() if v}
        total = sum(calls.values())
        # cross-check from the poll timestamps: the mean gap between one poller's consecutive polls
        gaps = []
        for ts in sc.proxy.poll_times.values():
            if len(ts) >= 2:
                gaps.append((ts[-1] - ts[0]) / (len(ts) - 1))
        sc.out["idle"] = {
            "window_s": round(dt, 2),
            "calls": calls,
            "total": total,
            "per_instance_hour": (total / dt * 3600 / sc.n) if sc.n else None,
            "mean_poll_gap_s": (sum(gaps) / len(gaps)) if gaps else None,
            "cpu_pct_core": (a["cpu"] - b["cpu"]) / dt * 100,
            "rss_kib_mean": sum(rss[sc.key]) / len(rss[sc.key]),
            "rss_kib_max": max(rss[sc.key]),
        }
    return {"window_s": elapsed, "proxy_process_cpu_pct": (cpu_seconds(os.getpid()) - self_cpu0) / elapsed * 100,
            "proxy_loop_lag": lagged}


def model_per_instance_hour(mode: str, n: int) -> float:
    """Steady-state idle calls per instance-hour, from the configured intervals."""
    if mode == "adaptive":
        return 3600 / CAP_S + 3600 / DISCOVERY_CAP_S / n
    if mode == "batch":
        return (3600 / CAP_S + 3600 / DISCOVERY_CAP_S) / n
    return 3600 / NODE_MSG_S + 3600 / NODE_INSTANCE_S / n


# ---------------------------------------------------------------------- latency


def plan_polling(sc: Scenario, spread_s: float, target: int, rng: random.Random) -> list[tuple[float, str, str]]:
    """(enqueue time (monotonic), instance, message id) for polling-only samples.

    adaptive: each chosen instance gets k messages at uniformly random moments
    of ONE of its idle 30 s periods (between two consecutive cap polls, known
    from the recorded poll times), so all k are served by the same idle poll
    and none is enqueued after the interval snapped back to the floor.
    node: the cadence is fixed; k random moments over ``spread_s``.
    """
    chosen = rng.sample(sc.ids, min(len(sc.ids), target))
    k = max(1, round(target / len(chosen)))
    now = time.monotonic() + 1.0
    plan = []
    for iid in chosen:
        if sc.mode == "adaptive":
            ts = sc.proxy.poll_times.get(iid, [])
            if not ts:
                continue
            period = max(CAP_S, ts[-1] - ts[-2]) if len(ts) >= 2 else CAP_S + 0.005
            start = ts[-1]
            while start < now:
                start += period
            lo, hi = start + 0.25, start + period - 0.25
        else:
            lo, hi = now, now + spread_s
        for j in range(k):
            plan.append((rng.uniform(lo, hi), iid, f"{sc.key}-poll-{iid}-{j}"))
    plan.sort()
    return plan


async def run_polling(sc: Scenario, spread_s: float, target: int, rng: random.Random) -> None:
    plan = plan_polling(sc, spread_s, target, rng)
    for at, iid, mid in plan:
        delay = at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        sc.proxy.enqueue(iid, mid)
    mids = [m for _, _, m in plan]
    await wait_for(lambda: all(m in sc.proxy.sent_mono for m in mids), CAP_S * 2 + 30, f"{sc.key} polling samples",
                   tick=0.2)
    sc.out["polling_mids"] = mids


async def run_wake(sc: Scenario, samples: int, rng: random.Random, http: aiohttp.ClientSession) -> None:
    lag = LoopLag()
    lag.start()
    order = list(sc.ids)
    rng.shuffle(order)
    url = f"http://127.0.0.1:{sc.worker.port}/wake"
    headers = {"Authorization": f"Bearer {SECRET}"}
    mids = []
    for k in range(samples):
        iid = order[k % len(order)]
        mid = f"{sc.key}-wake-{k}"
        ev = sc.proxy.waiter(mid)
        sc.proxy.enqueue(iid, mid)
        async with http.post(url, json={"instanceId": iid}, headers=headers) as resp:
            if resp.status != 202:
                raise RuntimeError(f"/wake answered {resp.status}")
        await asyncio.wait_for(ev.wait(), 30)
        mids.append(mid)
        # >= WAKE_MIN_GAP_S (0.1 s) apart: isolated wake-ups, not a coalesced burst
        await asyncio.sleep(rng.uniform(0.12, 0.2))
    sc.out["wake_mids"] = mids
    sc.out["wake_proxy_loop_lag"] = lag.stop()


def latency_stats(sc: Scenario, mids: list[str], sent_wall: dict[str, float]) -> dict[str, Any]:
    p = sc.proxy
    send = [(sent_wall[m] - p.enqueued_wall[m]) * 1000 for m in mids if m in sent_wall]
    ack = [(p.sent_mono[m] - p.enqueued_mono[m]) * 1000 for m in mids if m in p.sent_mono]
    return {"samples": len(mids), "send_ms": {"p50": pct(send, 50), "p99": pct(send, 99), "max": max(send, default=None)},
            "mark_sent_ms": {"p50": pct(ack, 50), "p99": pct(ack, 99), "max": max(ack, default=None)},
            "raw_send_ms": [round(x, 2) for x in send], "raw_mark_sent_ms": [round(x, 2) for x in ack]}


def check_idle_served(sc: Scenario, mids: list[str]) -> int:
    """Polling samples NOT served by a poll that came >= 29 s after the previous one (should be 0)."""
    bad = 0
    for m in mids:
        iid = m.split("-poll-")[1].rsplit("-", 1)[0]
        ts = sc.proxy.poll_times.get(iid, [])
        t = sc.proxy.enqueued_mono[m]
        after = [x for x in ts if x > t]
        before = [x for x in ts if x <= t]
        if not after or not before or after[0] - before[-1] < CAP_S - 1:
            bad += 1
    return bad


# ---------------------------------------------------------------------- main


async def main(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    modes = [m for m in args.modes.split(",") if m]
    root = Path(tempfile.mkdtemp(prefix="wa-bench-scale-", dir=args.tmp))
    log(f"work folder {root} (disk: {args.tmp or tempfile.gettempdir()})")
    result: dict[str, Any] = {"sizes": sizes, "cpus": os.cpu_count(), "window_s": args.window,
                              "msg_poll_max_ms": args.msg_poll_max_ms, "pythonpath": args.pythonpath,
                              "warmup_s": args.warmup, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "modes": modes, "auto_scan_ms": args.auto_scan_ms, "loadavg_start": os.getloadavg()}
    t_start = time.monotonic()
    base = Scenario("baseline", 0, root / "baseline")
    adaptive = {n: Scenario("adaptive", n, root / f"adaptive-{n}") for n in sizes}
    batch = {n: Scenario("batch", n, root / f"batch-{n}") for n in sizes if "batch" in modes}
    node = {n: Scenario("node", n, root / f"node-{n}") for n in sizes if "node" in modes}
    every = [base, *adaptive.values(), *batch.values(), *node.values()]
    for sc in every:
        await sc.start_proxy(args.pythonpath, args.auto_scan_ms)
    try:
        base.worker.start()
        await wait_for(lambda: base.proxy.first_call_mono is not None, 60, "baseline worker up")

        # 1. pair every session (auto-scan), then stop: sessions now live under AUTH_DIR
        for n in sizes:
            sc = adaptive[n]
            t = await connect_all(sc, "pairing", probe=True)
            sc.out["pairing"] = t
            log(f"{sc.key}: paired {n} in {t['all_connected_s']:.1f}s")
            # SIGTERM right after the last CONNECTED: every instance connected, the worker still busy
            await sc.worker.stop()
            sc.out["sigterm_busy_s"] = sc.worker.last_stop_s
            log(f"{sc.key}: SIGTERM -> exit {sc.worker.last_stop_s}s")

        # 2. resume: restart and time until CONNECTED for all (nothing else busy meanwhile)
        for n in sizes:
            sc = adaptive[n]
            sc.out["resume"] = await connect_all(sc, "resume")
            log(f"{sc.key}: resumed {n} in {sc.out['resume']['all_connected_s']:.2f}s")

        # 3. the batch and node-cadence copies of the same sessions
        for n in sizes:
            for sc in [x[n] for x in (batch, node) if n in x]:
                shutil.copytree(adaptive[n].base / "auth", sc.base / "auth")
                sc.out["resume"] = await connect_all(sc, "resume")
                log(f"{sc.key}: resumed {n} in {sc.out['resume']['all_connected_s']:.2f}s")

        # 4. warm-up: the adaptive intervals reach their caps (msg 2+4+8+16 = 30 s; discovery 10+20+40 = 70 s)
        last = max(max(sc.proxy.connected_at.values()) for sc in every if sc.n)
        wait = last + args.warmup - time.monotonic()
        log(f"warm-up {max(0.0, wait):.0f}s, then a {args.window:.0f}s idle window")
        await asyncio.sleep(max(0.0, wait))
        for sc in every:
            if not sc.worker.alive():
                raise RuntimeError(f"{sc.key}: worker died, see {sc.base / 'worker.log'}")

        # 5. idle window: proxy calls, worker CPU and RSS
        result["window"] = await idle_window(every, args.window)
        log(f"idle window done (proxy process {result['window']['proxy_process_cpu_pct']:.1f}% of a core)")

        # 6. polling-only latency (adaptive at cap, node cadence), concurrently: seconds-scale, not CPU-bound
        if not args.no_poll:
            await asyncio.gather(*(run_polling(sc, args.poll_spread, args.poll_samples, rng)
                                   for sc in [*adaptive.values(), *node.values()]))
            log("polling-only latency done")
        for sc in node.values():
            await sc.worker.stop()

        # 7. wake-up latency, one worker at a time (ms-scale: keep the machine quiet). This process
        # (the proxies) holds many objects by now: freeze them and pause its GC so that a collection
        # here does not delay the /mark-sent timestamps.
        gc.collect()
        gc.freeze()
        gc.disable()
        async with aiohttp.ClientSession() as http:
            for n in sizes if not args.no_wake else []:
                for sc in [x[n] for x in (adaptive, batch) if n in x]:
                    await run_wake(sc, args.wake_samples if n < 500 else max(20, args.wake_samples // 2), rng, http)
                    log(f"{sc.key}: wake-up latency done")
        # SIGTERM at idle, every instance connected
        for sc in adaptive.values():
            await sc.worker.stop()
            sc.out["sigterm_idle_s"] = sc.worker.last_stop_s
    finally:
        gc.enable()
        for sc in every:
            if hasattr(sc, "worker"):
                await sc.worker.stop()
            await sc.proxy.stop()
    result["loadavg_end"] = os.getloadavg()

    for sc in [*adaptive.values(), *batch.values(), *node.values()]:
        sent_wall = read_sent_log(sc.base / "auth")
        if "polling_mids" in sc.out:
            sc.out["polling"] = latency_stats(sc, sc.out.pop("polling_mids"), sent_wall)
            if sc.mode == "adaptive":
                sc.out["polling"]["not_served_at_cap"] = check_idle_served(
                    sc, [m for m in sc.proxy.enqueued_mono if "-poll-" in m])
        if "wake_mids" in sc.out:
            sc.out["wake"] = latency_stats(sc, sc.out.pop("wake_mids"), sent_wall)
    result["scenarios"] = {sc.key: sc.out for sc in every}
    result["elapsed_s"] = time.monotonic() - t_start
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return result


def report(r: dict[str, Any]) -> str:
    S = r["scenarios"]
    sizes = r["sizes"]
    lines = [f"wa-worker scale benchmark ({r['cpus']} CPUs, {r['started']}, {r['elapsed_s']:.0f}s; "
             f"MSG_POLL_MAX_MS={r['msg_poll_max_ms']} for adaptive/batch"
             + (f"; workers' PYTHONPATH += {r['pythonpath']}" if r.get("pythonpath") else "") + ")", ""]
    w = r["window"]
    lines.append(f"A. Idle proxy calls: measured over a {w['window_s']:.0f}s window starting >= {r['warmup_s']:.0f}s "
                 "after the last CONNECTED; calls/instance-hour = count / window x 3600 / N (extrapolated)")
    rows = []
    for n in sizes:
        node_meas = node_per_instance_hour(r, n)
        for mode in run_modes(r):
            i = S[f"{mode}-{n}"]["idle"]
            model = model_per_instance_hour(mode, n)
            c = i["calls"]
            rows.append([mode, n, c.get("queued-messages", 0), c.get("disconnected-instances", 0),
                         sum(v for k, v in c.items() if k not in ("queued-messages", "disconnected-instances")),
                         fmt(i["mean_poll_gap_s"], 2), fmt(i["per_instance_hour"], 1), fmt(model, 1),
                         fmt(i["per_instance_hour"] / node_meas * 100, 2) + "%"])
    lines.append(table(["mode", "N", "queued-messages", "disconnected-inst.", "other", "mean poll gap s",
                        "calls/inst-h (meas.)", "calls/inst-h (model)", "% of node"], rows))
    lines.append(f"proxy process during the window: {w['proxy_process_cpu_pct']:.1f}% of a core, event-loop lag "
                 f"p99 {w['proxy_loop_lag']['p99_ms']:.1f} ms, max {w['proxy_loop_lag']['max_ms']:.1f} ms")
    lines.append("")
    lines.append("B. queued->sent latency (ms). send = proxy enqueue -> simulator send (wall clock, same host); "
                 "ack = enqueue -> /mark-sent arrival at the proxy")
    rows = []
    for n in sizes:
        for key, kind in ((f"adaptive-{n}", "polling"), (f"node-{n}", "polling"), (f"adaptive-{n}", "wake"),
                          (f"batch-{n}", "wake")):
            x = S.get(key, {}).get(kind)
            if not x:
                continue
            label = f"{key.split('-')[0]} {kind}" + (" (node cadence)" if key.startswith("node") else "")
            rows.append([label, n, x["samples"], fmt(x["send_ms"]["p50"]), fmt(x["send_ms"]["p99"]),
                         fmt(x["send_ms"]["max"]), fmt(x["mark_sent_ms"]["p50"]), fmt(x["mark_sent_ms"]["p99"]),
                         x.get("not_served_at_cap", "")])
    lines.append(table(["mode", "N", "samples", "send p50", "send p99", "send max", "ack p50", "ack p99",
                        "not at cap"], rows))
    lags = [S[k]["wake_proxy_loop_lag"]["max_ms"] for k in S if "wake_proxy_loop_lag" in S[k]]
    if lags:
        lines.append(f"proxy process event-loop lag during the wake-up phases: max {max(lags):.1f} ms")
    lines.append("")
    base_rss = S["baseline-0"]["idle"]["rss_kib_mean"]
    base_cpu = S["baseline-0"]["idle"]["cpu_pct_core"]
    lines.append(f"C. Worker process at idle (same window). baseline (0 instances): RSS {base_rss / 1024:.1f} MiB, "
                 f"CPU {base_cpu:.2f}% of a core")
    rows = []
    for n in sizes:
        for mode in run_modes(r):
            i = S[f"{mode}-{n}"]["idle"]
            rows.append([mode, n, fmt(i["rss_kib_mean"] / 1024, 1), fmt((i["rss_kib_mean"] - base_rss) / n, 1),
                         fmt(i["cpu_pct_core"], 2), fmt((i["cpu_pct_core"] - base_cpu) / n * 1000, 2)])
    lines.append(table(["mode", "N", "RSS MiB", "RSS growth KiB/inst", "CPU % core", "CPU m% core/inst"], rows))
    lines.append("")
    lines.append("D. Start-up: process start -> first proxy call; -> CONNECTED received for all N")
    rows = []
    for n in sizes:
        p = S[f"adaptive-{n}"]["pairing"]
        for mode in run_modes(r):
            x = S[f"{mode}-{n}"]["resume"]
            rows.append([mode, n, fmt(x["process_to_first_call_s"], 2), fmt(x["all_connected_s"], 2),
                         fmt(x.get("worker_cpu_s"), 2), fmt(p["all_connected_s"], 2) if mode == "adaptive" else ""])
    lines.append(table(["mode", "N", "first call s", "all resumed s", "worker CPU s until then", "first pairing s"],
                       rows))
    lines.append("(node and batch workers were started while the adaptive ones ran; the adaptive resume ran alone)")
    lines.append("")
    lines.append(f"E. Scale (adaptive, no batch; SIMULATOR_AUTO_SCAN_MS={r.get('auto_scan_ms', 0)}): "
                 "pairing = first proxy call -> last CONNECTED; /health and /wake probed (each 10 ms after its last answer) "
                 "while pairing; "
                 "SIGTERM -> exit right after pairing (busy) and at the end (idle)")
    lines.append(scale_table(r))
    la0, la1 = r.get("loadavg_start"), r.get("loadavg_end")
    if la0 and la1:
        lines.append(f"load average (1, 5, 15 min) at start {la0[0]:.2f} {la0[1]:.2f} {la0[2]:.2f}, "
                     f"at end {la1[0]:.2f} {la1[1]:.2f} {la1[2]:.2f}")
    lines.append("")
    lines.append("Targets")
    for t in targets(r):
        lines.append(f"  [{'PASS' if t['pass'] else 'FAIL'}] {t['name']}: {t['value']}")
    return "\n".join(lines)


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    S = r["scenarios"]
    out = []
    for n in r["sizes"]:
        node_meas = node_per_instance_hour(r, n)
        for mode in [m for m in run_modes(r) if m != "node"]:
            v = S[f"{mode}-{n}"]["idle"]["per_instance_hour"] / node_meas * 100
            out.append({"name": f"idle proxy calls <= 5% of node cadence ({mode}, N={n})", "value": f"{v:.2f}%",
                        "pass": v <= 5})
    for n in r["sizes"]:
        for mode in [m for m in run_modes(r) if m != "node"]:
            x = S[f"{mode}-{n}"].get("wake")
            if x:
                v = x["send_ms"]["p99"]
                out.append({"name": f"wake-up p99 queued->sent < 100 ms ({mode}, N={n})",
                            "value": f"{v:.1f} ms (to mark-sent: {x['mark_sent_ms']['p99']:.1f} ms)", "pass": v < 100})
    if 500 in r["sizes"]:
        base_rss = S["baseline-0"]["idle"]["rss_kib_mean"]
        for mode in [m for m in run_modes(r) if m != "node"]:
            i = S[f"{mode}-500"]["idle"]
            out.append({"name": f"500 idle instances: worker CPU < 5% of a core ({mode})",
                        "value": f"{i['cpu_pct_core']:.2f}%", "pass": i["cpu_pct_core"] < 5})
            g = (i["rss_kib_mean"] - base_rss) / 500
            out.append({"name": f"500 idle instances: RSS growth < 1 MiB/instance ({mode})", "value": f"{g:.0f} KiB",
                        "pass": g < 1024})
    big = max(r["sizes"])
    if big >= 1000:
        x = S[f"adaptive-{big}"]
        i = x["idle"]
        out.append({"name": f"{big} idle instances: worker CPU < 5% of a core (adaptive, no batch)",
                    "value": f"{i['cpu_pct_core']:.2f}%", "pass": i["cpu_pct_core"] < 5})
        for kind in ("health", "wake"):
            p99 = x["pairing"].get("probes", {}).get(kind, {}).get("p99")
            out.append({"name": f"/{kind} p99 < 50 ms while {big} instances pair",
                        "value": f"{p99:.1f} ms" if p99 is not None else "-", "pass": p99 is not None and p99 < 50})
        for key in ("sigterm_busy_s", "sigterm_idle_s"):
            v = x.get(key)
            out.append({"name": f"SIGTERM exits within 10 s with {big} connected ({key.split('_')[1]})",
                        "value": f"{v:.2f} s" if v is not None else "did not exit in 30 s",
                        "pass": v is not None and v < 10})
    return out


def run_modes(r: dict[str, Any]) -> list[str]:
    return [m for m in ("adaptive", "batch", "node") if m == "adaptive" or m in r.get("modes", [m])]


def node_per_instance_hour(r: dict[str, Any], n: int) -> float:
    """The node cadence's idle calls per instance-hour: measured if that worker ran, else the model."""
    x = r["scenarios"].get(f"node-{n}")
    return x["idle"]["per_instance_hour"] if x else model_per_instance_hour("node", n)


def scale_table(r: dict[str, Any]) -> str:
    S = r["scenarios"]
    base_rss = S["baseline-0"]["idle"]["rss_kib_mean"]
    rows = []
    for n in r["sizes"]:
        x = S[f"adaptive-{n}"]
        p = x["pairing"]
        pr = p.get("probes") or {}
        i = x["idle"]
        rows.append([n, fmt(p["connect_phase_s"], 1), fmt(x["resume"]["all_connected_s"], 2),
                     fmt(i["cpu_pct_core"], 2), fmt((i["rss_kib_mean"] - base_rss) / n, 1),
                     fmt(i["per_instance_hour"], 1),
                     fmt(pr.get("health", {}).get("p99")), fmt(pr.get("wake", {}).get("p99")),
                     fmt(pr.get("health", {}).get("max")),
                     "/".join(str(pr.get(k, {}).get("n", 0)) for k in ("health", "wake", "errors")),
                     fmt(x.get("sigterm_busy_s"), 2), fmt(x.get("sigterm_idle_s"), 2)])
    return table(["N", "pair from discovery s", "resume s", "idle CPU % core", "RSS KiB/inst",
                  "idle calls/inst-h", "health p99 ms", "wake p99 ms", "health max ms", "probes health/wake/err",
                  "SIGTERM busy s", "SIGTERM idle s"], rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10,100,500", help="instance counts, comma-separated (default 10,100,500)")
    ap.add_argument("--window", type=float, default=None, help="idle window in seconds (default: 2 cap periods = 60)")
    ap.add_argument("--warmup", type=float, default=None,
                    help="seconds after the last CONNECTED before the window (default: time to reach the cap + 10 = 40)")
    ap.add_argument("--msg-poll-max-ms", type=int, default=_D["MSG_POLL_MAX_MS"],
                    help=f"MSG_POLL_MAX_MS of the adaptive and batch workers (default {_D['MSG_POLL_MAX_MS']}, "
                         "the shipped default)")
    ap.add_argument("--pythonpath", default=None, help="prepended to the workers' PYTHONPATH (experiments)")
    ap.add_argument("--no-wake", action="store_true", help="skip the wake-up latency phase")
    ap.add_argument("--no-poll", action="store_true", help="skip the polling-only latency phase")
    ap.add_argument("--modes", default="adaptive,batch,node",
                    help="workers per size (default adaptive,batch,node; adaptive is always run)")
    ap.add_argument("--auto-scan-ms", type=int, default=0,
                    help="SIMULATOR_AUTO_SCAN_MS: how long a QR shows before the simulated phone scans it")
    ap.add_argument("--poll-samples", type=int, default=100, help="polling-only samples per worker (default 100)")
    ap.add_argument("--poll-spread", type=float, default=30.0, help="node cadence: enqueue moments spread (s)")
    ap.add_argument("--wake-samples", type=int, default=100, help="wake-up samples per worker (half for N>=500)")
    ap.add_argument("--json", type=Path, help="also write the raw results as JSON here")
    ap.add_argument("--tmp", default=None, help="parent folder of the work folder (default: the system temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs, journals, sessions)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    global CAP_S
    CAP_S = args.msg_poll_max_ms / 1000
    for mode in ("adaptive", "batch"):
        MODES[mode]["MSG_POLL_MAX_MS"] = args.msg_poll_max_ms
    to_cap, wait = 0.0, FLOOR_S
    while wait < CAP_S:
        to_cap, wait = to_cap + wait, wait * 2
    if args.warmup is None:
        args.warmup = to_cap + 10
    if args.window is None:
        args.window = 2 * CAP_S
    return args


if __name__ == "__main__":
    a = parse_args()
    res = asyncio.run(main(a))
    print(report(res))
    if a.json:
        res["targets"] = targets(res)
        a.json.write_text(json.dumps(res, indent=2, default=str))
