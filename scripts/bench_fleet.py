#!/usr/bin/env python3
"""A fleet on this machine (issue #13): handoff and failover times, idle proxy calls,
queued → sent latency with the push channel, worker CPU/RSS per instance with DATABASE_URL.

Real processes (tests/cluster.py): the reference proxy (``wa-worker dev proxy``, lease TTL
``--ttl``), ``--workers`` ``wa-worker`` processes on the simulator with their simulated
sessions in a throwaway PostgreSQL 15 (``DATABASE_URL``), ``--instances`` instances, and a
recording pass-through proxy in this process that counts every call.

* **handoff on SIGTERM**: SIGTERM one worker; the time from the signal until the last of its
  instances is online on another worker (the simulators' ``simulator-sessions.jsonl``). Then it
  is started again and the fleet settles.
* **failover after kill -9**: the same after SIGKILL (its leases expire, plus one TTL of grace).
* **idle proxy calls**: every call the workers make over ``--idle`` seconds with no traffic, per
  instance-hour, by endpoint (after ``--quiet`` seconds without traffic).
* **queued → sent**: ``--messages`` messages queued through the dev API (no ``/wake``: the proxy
  alone has no worker URL; the workers learn of them through ``GET /events``), from just before
  the queue call to the simulator's send record.
* **CPU/RSS**: each worker's RSS and its CPU over the idle window, against a worker holding no
  instance (started alone before any instance exists).

Usage: python scripts/bench_fleet.py [--runs 5] [--ttl 10] [--instances 60] [--workers 3]
                                     [--messages 300] [--idle 120] [--quiet 30] [--json FILE]
Needs PostgreSQL 15 binaries (initdb, postgres, psql), like the tests.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.cluster import Fleet, Traffic  # (after the path change)
from tests.pg_helpers import PgServer, find_pg_bindir  # (after the path change)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def moved_after(fleet: Fleet, victim: str, held: set[str], t: float) -> float:
    """Seconds from ``t`` until the last of ``held`` was online on a worker other than ``victim``."""
    spans = fleet.session_log()
    last = 0.0
    for iid in held:
        ups = [a for a, _b, w in spans.get(iid, []) if w != victim and a >= t]
        if not ups:
            raise AssertionError(f"{iid} never came up elsewhere")
        last = max(last, min(ups) - t)
    return last


def settle(fleet: Fleet, names: set[str], timeout: float = 120) -> None:
    fleet.wait(lambda: fleet.all_connected(names), timeout, f"every instance connected on {sorted(names)}",
               every=0.25)


def balanced(fleet: Fleet, names: set[str], n: int) -> bool:
    share = Counter(fleet.holders().values())
    return set(share) == names and max(share.values()) <= -(-n // len(names)) + 1


def moves(fleet: Fleet, names: list[str], args: argparse.Namespace, log: Any) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"SIGTERM": [], "SIGKILL": []}
    rng = random.Random(13)
    for run in range(args.runs):
        for sig in (signal.SIGTERM, signal.SIGKILL):
            victim = rng.choice(names)
            held = {i for i, h in fleet.holders().items() if h == victim}
            t = fleet.signal(victim, sig)
            if sig == signal.SIGTERM:
                fleet.wait_exit(victim)
            rest = set(names) - {victim}
            settle(fleet, rest)
            took = moved_after(fleet, victim, held, t)
            out[sig.name].append(took)
            log(f"run {run + 1}: {sig.name} {victim} ({len(held)} instances): all online elsewhere after {took:.2f}s")
            fleet.start_worker(victim)
            fleet.wait(lambda: fleet.all_connected(set(names)) and balanced(fleet, set(names), args.instances),
                       180, "the fleet balanced again", every=0.5)
    return out


def idle_calls(fleet: Fleet, names: list[str], args: argparse.Namespace, log: Any) -> dict[str, Any]:
    log(f"quiet for {args.quiet}s, then counting calls for {args.idle}s")
    time.sleep(args.quiet)
    before = {n: fleet.proc_stats(n) for n in names}
    t0 = time.time()
    n0 = len(fleet.recorder.calls)
    time.sleep(args.idle)
    t1 = time.time()
    after = {n: fleet.proc_stats(n) for n in names}
    calls = [c for c in fleet.recorder.calls[n0:] if t0 <= c.t0 < t1]
    hours = (t1 - t0) / 3600
    by_path = Counter(c.path for c in calls)
    held = Counter(fleet.holders().values())
    per = {p: round(k / (args.instances * hours), 2) for p, k in sorted(by_path.items())}
    stats = {n: {"instances": held.get(n, 0), "rss_mb": round(after[n][1] / 2**20, 1),
                 "cpu_s_per_h": round((after[n][0] - before[n][0]) / hours, 1)} for n in names}
    return {"window_s": round(t1 - t0, 1), "calls": len(calls), "per_instance_hour": round(
        len(calls) / (args.instances * hours), 2), "by_endpoint_per_instance_hour": per, "workers": stats}


def latency(fleet: Fleet, ids: list[str], args: argparse.Namespace, log: Any) -> dict[str, float]:
    traffic = Traffic(fleet, ids, out_per_s=args.rate, in_per_s=0)
    traffic.start()
    time.sleep(args.messages / args.rate)
    traffic.stop()
    fleet.wait(lambda: {r["body"] for r in fleet.sent_log()} >= set(traffic.queued), 60, "every message sent")
    sent = {r["body"]: r["ts"] for r in fleet.sent_log()}
    lat = [sent[b] - t for b, (_iid, t, _mid) in traffic.queued.items()]
    log(f"{len(lat)} messages queued at {args.rate}/s")
    return {"messages": len(lat), "p50_ms": round(pct(lat, 0.5) * 1000, 1), "p99_ms": round(pct(lat, 0.99) * 1000, 1),
            "max_ms": round(max(lat) * 1000, 1)}


def main() -> int:  # long: one benchmark run, step by step
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--ttl", type=float, default=10.0)
    ap.add_argument("--instances", type=int, default=60)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--messages", type=int, default=300)
    ap.add_argument("--rate", type=float, default=10.0, help="messages queued per second")
    ap.add_argument("--idle", type=float, default=120.0)
    ap.add_argument("--quiet", type=float, default=30.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    bindir = find_pg_bindir()
    if bindir is None:
        print("PostgreSQL 15 binaries not found (initdb, postgres, psql)", file=sys.stderr)
        return 2
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:6.1f}s] {msg}", flush=True)

    pg = PgServer(bindir)
    pg.start()
    result: dict[str, Any] = {"ttl_s": args.ttl, "instances": args.instances, "workers": args.workers}
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        fleet = Fleet(Path(tmp), pg.create_database("bench_fleet"), ttl_s=args.ttl)
        try:
            fleet.start_proxy()
            fleet.start_worker("w0")  # the baseline: a worker holding nothing (no instance exists yet)
            time.sleep(15)
            c0, r0 = fleet.proc_stats("w0")
            time.sleep(30)
            c1, r1 = fleet.proc_stats("w0")
            result["baseline"] = {"rss_mb": round(r1 / 2**20, 1), "cpu_s_per_h": round((c1 - c0) * 120, 1)}
            log(f"baseline worker (no instance): {result['baseline']}")
            fleet.signal("w0", signal.SIGTERM)
            fleet.wait_exit("w0")
            del fleet.workers["w0"]
            ids = fleet.add_instances(args.instances)
            names = [f"w{k + 1}" for k in range(args.workers)]
            for n in names:
                fleet.start_worker(n)
            settle(fleet, set(names))
            fleet.wait(lambda: balanced(fleet, set(names), args.instances), 120, "a fair share")
            log(f"{args.instances} instances online on {args.workers} workers")
            result["latency"] = latency(fleet, ids, args, log)
            log(f"queued → sent: {result['latency']}")
            result["idle"] = idle_calls(fleet, names, args, log)
            log(f"idle: {json.dumps(result['idle'])}")
            m = moves(fleet, names, args, log)
            for k, v in m.items():
                result[k] = {"runs": [round(x, 2) for x in v], "p50_s": round(statistics.median(v), 2),
                             "max_s": round(max(v), 2)}
        finally:
            try:
                fleet.stop_all()
            finally:
                pg.stop()
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
