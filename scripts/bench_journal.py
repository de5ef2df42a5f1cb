#!/usr/bin/env python3
"""What the durable journal costs: messages per second through the worker with
the state store on a real disk file vs on tmpfs, and raw store operations/s.

* The worker runs in THIS process (so the simulated phone can be driven
  directly, with no HTTP hop into the worker); the edge proxy
  (``_bench_common.BenchProxy``, which claims what it hands out) runs in its own
  process, so the two do not share a core.
* Outbound: M messages are queued at the proxy for K instances, then one wake-up;
  time until M ``/mark-sent`` are acknowledged (proxy queue -> journal
  ``sending`` -> simulator send -> journal ``sent`` -> POST /mark-sent -> ``marked``).
* Inbound: M simulated receives spread over K instances x C chats, yielding to
  the event loop after each; time until M ``POST /inbound`` are acknowledged
  (receive -> journal row -> POST /inbound -> row deleted).
* Baseline: the SAME worker and code with ``STATE_DB`` on tmpfs (/dev/shm): the
  SQLite work (statements, WAL, checkpoints) is identical, only the medium
  changes, so the difference is what durability on a real disk costs
  (``write``/``fsync`` to the device). ``synchronous=OFF`` would instead change
  what SQLite does and keep the disk writes, so it isolates less. The
  simulator's own sent log (fsynced per send) lives on tmpfs in both modes.
* Raw store: ``Journal`` called directly, per message ``begin_send + record_sent
  + ack_done`` (outbound) and ``add_inbound + inbound_delivered`` (inbound), on
  disk / tmpfs / ``:memory:`` and disk with ``synchronous=OFF`` / ``FULL``.

Usage: /work/venv/bin/python scripts/bench_journal.py [--messages 2000] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import anyio
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import ROOT, SECRET, ProxyProc, cpu_seconds, fmt, table

sys.path.insert(0, str(ROOT))
from wa_worker.backends.simulator import SimulatorBackend
from wa_worker.config import Settings
from wa_worker.daemon import Worker
from wa_worker.storage.journal import Journal

ROUND_LIMIT_S = 600.0  # one measured round; far above what the slowest round takes


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- raw store


def raw_store(path: Path | str, m: int, synchronous: str | None = None) -> dict[str, float]:
    store = Journal(Path(path) if path != ":memory:" else Path(":memory:"))
    if synchronous:
        store._db.execute(f"PRAGMA synchronous={synchronous}")
    per_msg: list[float] = []
    t = time.perf_counter()
    for k in range(m):
        mid = f"m{k}"
        t1 = time.perf_counter()
        store.begin_send(mid, "inst", "5511988887777@s.whatsapp.net")
        store.record_sent(mid, f"WA{k}")
        store.ack_done(mid)
        per_msg.append(time.perf_counter() - t1)
    out_s = time.perf_counter() - t
    payload = {"instanceId": "inst", "from": "5511988887777@s.whatsapp.net", "body": "x" * 60}
    t = time.perf_counter()
    for k in range(m):
        store.add_inbound("inst", f"chat{k % 50}", f"W{k}", payload)
    seqs = [r[0] for r in store._db.execute("SELECT seq FROM inbound ORDER BY seq")]
    for seq in seqs:
        store.inbound_delivered(seq)
    in_s = time.perf_counter() - t
    store.close()
    per_msg.sort()
    return {"outbound_msgs_per_s": m / out_s, "outbound_us_per_msg": out_s / m * 1e6,
            "outbound_p99_us": per_msg[int(len(per_msg) * 0.99)] * 1e6, "outbound_max_us": per_msg[-1] * 1e6,
            "inbound_msgs_per_s": m / in_s, "inbound_us_per_msg": in_s / m * 1e6}


# ---------------------------------------------------------------------- through the worker


async def proxy_stats(http: httpx.AsyncClient, proxy: ProxyProc) -> dict[str, Any]:
    return (await http.get(proxy.url + "/_bench/stats")).json()


async def run_mode(mode: str, state_dir: Path, auth_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    proxy = ProxyProc(state_dir / "proxy.log")
    ids = [f"j{k}" for k in range(args.instances)]
    out: dict[str, Any] = {"mode": mode, "state_db": str(state_dir / "wa-worker.db"), "outbound": [], "inbound": []}
    async with httpx.AsyncClient(timeout=10) as http:
        for _ in range(100):
            try:
                await http.post(proxy.url + "/_bench/setup", json={"instances": ids})
                break
            except httpx.HTTPError:
                await asyncio.sleep(0.05)
        settings = Settings(_env_file=None, EDGE_BASE_URL=proxy.url, WORKER_SECRET=SECRET, PORT=0,  # type: ignore[call-arg]
                            AUTH_DIR=auth_dir, STATE_DB=state_dir / "wa-worker.db", WA_BACKEND="simulator",
                            SIMULATOR_AUTO_SCAN_MS=0, BATCH_POLL=False, LOG_LEVEL="WARNING")
        backend = SimulatorBackend(auth_dir, auto_scan_ms=0, connect_delay_s=0.01)
        worker = Worker(settings, backend=backend, host="127.0.0.1")
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            try:
                t = time.monotonic()
                while (await proxy_stats(http, proxy))["connected"] < len(ids):
                    if time.monotonic() - t > 60:
                        raise TimeoutError("instances did not connect")
                    await asyncio.sleep(0.05)
                sessions = [backend.session(i) for i in ids]
                for r in range(args.rounds + 1):  # round 0 warms up and is discarded
                    m = args.messages if r else 200
                    res = await outbound_round(http, proxy, worker, ids, m, f"r{r}-")
                    if r:
                        out["outbound"].append(res)
                    res = await inbound_round(worker, sessions, m, args.chats)
                    if r:
                        out["inbound"].append(res)
                    log(f"{mode} round {r}: outbound {out['outbound'][-1]['msgs_per_s'] if r else 0:.0f}/s, "
                        f"inbound {out['inbound'][-1]['msgs_per_s'] if r else 0:.0f}/s")
                out["proxy_calls"] = (await proxy_stats(http, proxy))["calls"]
            finally:
                worker.request_stop()
                with anyio.fail_after(30):
                    await worker.wait_stopped()
    proxy.stop()
    return out


async def until(cond: Callable[[], bool], what: str, limit_s: float = ROUND_LIMIT_S) -> None:
    """Poll ``cond`` every 2 ms; a stuck round fails with a message instead of hanging."""
    deadline = time.monotonic() + limit_s
    while True:
        if cond():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {limit_s:g} s")
        await asyncio.sleep(0.002)


async def outbound_round(http: httpx.AsyncClient, proxy: ProxyProc, worker: Worker, ids: list[str], m: int,
                         prefix: str) -> dict[str, Any]:
    target = worker.acks.acknowledged + m
    s0 = await proxy_stats(http, proxy)
    await http.post(proxy.url + "/_bench/enqueue", json={"instances": ids, "count": m, "prefix": prefix})
    cpu0, pcpu0, t0 = cpu_seconds(os.getpid()), s0["cpu_s"], time.monotonic()
    worker.wake()  # what POST /wake does (all instances)
    await until(lambda: worker.acks.acknowledged >= target, f"{m} acknowledgements")
    dt = time.monotonic() - t0
    s1 = await proxy_stats(http, proxy)
    return {"messages": m, "seconds": dt, "msgs_per_s": m / dt,
            "worker_cpu_pct": (cpu_seconds(os.getpid()) - cpu0) / dt * 100,
            "proxy_cpu_pct": (s1["cpu_s"] - pcpu0) / dt * 100}


async def inbound_round(worker: Worker, sessions: list[Any], m: int, chats: int) -> dict[str, Any]:
    target = worker.inbound.delivered + m
    cpu0, t0 = cpu_seconds(os.getpid()), time.monotonic()
    for k in range(m):
        s = sessions[k % len(sessions)]
        await s.receive(f"55119{(k // len(sessions)) % chats:08d}", f"inbound message {k}")
        await asyncio.sleep(0)  # a real backend delivers events one by one, interleaved with the relay
    t_ingest = time.monotonic() - t0
    await until(lambda: worker.inbound.delivered >= target, f"{m} inbound deliveries")
    dt = time.monotonic() - t0
    return {"messages": m, "seconds": dt, "msgs_per_s": m / dt, "ingest_s": t_ingest,
            "worker_cpu_pct": (cpu_seconds(os.getpid()) - cpu0) / dt * 100}


def med(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    disk_root = Path(tempfile.mkdtemp(prefix="wa-bench-journal-", dir=args.disk))
    shm_root = Path(tempfile.mkdtemp(prefix="wa-bench-journal-", dir="/dev/shm"))
    result: dict[str, Any] = {"cpus": os.cpu_count(), "messages": args.messages, "rounds": args.rounds,
                              "instances": args.instances, "chats_per_instance": args.chats,
                              "disk_dir": str(disk_root), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "pythonpath": args.pythonpath}
    try:
        # raw store first (quiet machine)
        raw = {}
        for label, path, sync in (("disk (WAL, synchronous=NORMAL: as shipped)", disk_root / "raw1.db", None),
                                  ("tmpfs (WAL, NORMAL)", shm_root / "raw.db", None),
                                  ("disk, synchronous=OFF", disk_root / "raw2.db", "OFF"),
                                  ("disk, synchronous=FULL", disk_root / "raw3.db", "FULL"),
                                  (":memory:", ":memory:", None)):
            runs = [raw_store(path if path == ":memory:" else Path(str(path) + f".{k}"), args.raw_messages, sync)
                    for k in range(3)]
            raw[label] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            raw[label]["outbound_max_us"] = max(r["outbound_max_us"] for r in runs)
            log(f"raw store {label}: {raw[label]['outbound_msgs_per_s']:.0f} out/s, "
                f"{raw[label]['inbound_msgs_per_s']:.0f} in/s")
        result["raw_store"] = raw
        result["worker"] = {}
        for mode, state_dir in (("disk", disk_root / "state"), ("tmpfs", shm_root / "state")):
            state_dir.mkdir(parents=True, exist_ok=True)
            auth = shm_root / f"auth-{mode}"
            result["worker"][mode] = await run_mode(mode, state_dir, auth, args)
    finally:
        shutil.rmtree(disk_root, ignore_errors=True)
        shutil.rmtree(shm_root, ignore_errors=True)
    return result


def report(r: dict[str, Any]) -> str:
    lines = [f"wa-worker journal benchmark ({r['cpus']} CPUs, {r['started']}; {r['instances']} instances, "
             f"{r['messages']} messages x {r['rounds']} rounds per direction, median shown"
             + (f"; sys.path += {r['pythonpath']}" if r.get("pythonpath") else "") + ")", ""]
    rows = []
    W = r["worker"]
    for direction in ("outbound", "inbound"):
        base = med(W["tmpfs"][direction], "msgs_per_s")
        for mode in ("disk", "tmpfs"):
            rs = W[mode][direction]
            v = med(rs, "msgs_per_s")
            rows.append([direction, mode, fmt(v, 0), f"{fmt(min(x['msgs_per_s'] for x in rs), 0)}-"
                         f"{fmt(max(x['msgs_per_s'] for x in rs), 0)}", fmt(med(rs, "worker_cpu_pct"), 0),
                         fmt(med(rs, "proxy_cpu_pct"), 0) if "proxy_cpu_pct" in rs[0] else "-",
                         fmt((1 - v / base) * 100, 1) + "%" if mode == "disk" else "baseline"])
    lines.append("Through the worker (in-process worker, proxy in its own process)")
    lines.append(table(["direction", "STATE_DB on", "msgs/s", "range", "worker CPU %", "proxy CPU %",
                        "cost vs tmpfs"], rows))
    lines.append("")
    lines.append(f"Raw Journal operations ({r.get('raw_messages', '')} messages, median of 3)")
    rows = [[label, fmt(x["outbound_msgs_per_s"], 0), fmt(x["outbound_us_per_msg"], 1), fmt(x["outbound_p99_us"], 0),
             fmt(x["outbound_max_us"] / 1000, 1), fmt(x["inbound_msgs_per_s"], 0), fmt(x["inbound_us_per_msg"], 1)]
            for label, x in r["raw_store"].items()]
    lines.append(table(["store", "outbound msgs/s", "us/msg (3 commits)", "p99 us/msg", "max ms/msg", "inbound msgs/s",
                        "us/msg (2 commits)"], rows))
    lines.append("(max: the longest single message, i.e. the longest the event loop is blocked by the journal; "
                 "on disk it is a WAL checkpoint's fsync)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=3000, help="messages per round and direction (default 3000)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--instances", type=int, default=10)
    ap.add_argument("--chats", type=int, default=10, help="distinct chats per instance for inbound (default 10)")
    ap.add_argument("--raw-messages", type=int, default=5000)
    ap.add_argument("--disk", default=None, help="folder on a real disk for the file store (default: system temp)")
    ap.add_argument("--pythonpath", default=None, help="prepended to sys.path before the run (experiments)")
    ap.add_argument("--json", type=Path)
    return ap.parse_args(argv)


if __name__ == "__main__":
    a = parse_args()
    if a.pythonpath:
        sys.path.insert(0, a.pythonpath)
    res = anyio.run(main, a)
    res["raw_messages"] = a.raw_messages
    print(report(res))
    if a.json:
        a.json.write_text(json.dumps(res, indent=2, default=str))
