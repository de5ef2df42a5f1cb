#!/usr/bin/env python3
"""What the journal costs in PostgreSQL against SQLite (issue #13, ``JOURNAL_IN_DATABASE``).

The same ``Journal`` calls, timed one by one on the event loop's thread as the worker makes them:
a SQLite file (``STATE_DB``) and a throwaway PostgreSQL 15 on loopback (``DATABASE_URL``; a
database on another host adds its round trip to every call). For each call: p50 and p99 in
microseconds; then the journal work of one outbound message (``outbound_get``, ``begin_send``,
``record_sent``, ``due_acks``, ``ack_done``) and one inbound message (``add_inbound``,
``due_inbound_heads``, ``inbound_delivered``) as messages per second of journal time, and the
inbound heads query with ``--scope`` leased instances (a fleet worker's filter).

Usage: python scripts/bench_pg_journal.py [--messages 2000] [--scope 2000] [--json FILE]
Needs PostgreSQL 15 binaries (initdb, postgres, psql), like the tests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.pg_helpers import PgServer, find_pg_bindir  # (after the path change)
from wa_worker.storage.journal import Journal  # (after the path change)
from wa_worker.storage.pgjournal import PgJournal  # (after the path change)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def run(j: Journal, n: int, scope: int) -> dict[str, Any]:
    times: dict[str, list[float]] = defaultdict(list)

    def timed(name: str, fn: Callable[..., Any], *args: Any) -> Any:
        t = time.perf_counter()
        out = fn(*args)
        times[name].append((time.perf_counter() - t) * 1e6)
        return out

    t_out = time.perf_counter()
    for i in range(n):
        mid = f"m{i}"
        timed("outbound_get", j.outbound_get, mid)
        timed("begin_send", j.begin_send, mid, "acme", "5511988887777@s.whatsapp.net", "proxy", 7)
        timed("record_sent", j.record_sent, mid, f"WA{i}")
        rows = timed("due_acks", j.due_acks, 64)
        for r in rows:
            timed("ack_done", j.ack_done, r.message_id)
    out_s = time.perf_counter() - t_out
    t_in = time.perf_counter()
    for i in range(n):
        timed("add_inbound", j.add_inbound, "acme", f"chat{i % 50}", f"in{i}", {"type": "text", "body": "x" * 200})
        for h in timed("due_inbound_heads", j.due_inbound_heads, 64):
            timed("inbound_delivered", j.inbound_delivered, h.seq)
    in_s = time.perf_counter() - t_in
    # a fleet worker's filter: the heads query with `scope` leased instances (rows of 200 instances pending)
    ids = [f"inst{k}" for k in range(scope)]
    for k in range(200):
        j.add_inbound(f"inst{k}", "c", f"pending{k}", {"type": "text"})
    j.scope = lambda: ids
    for _ in range(50):
        timed(f"due_inbound_heads (scope {scope})", j.due_inbound_heads, 64)
    return {
        "calls_us": {k: {"p50": round(statistics.median(v), 1), "p99": round(pct(v, 0.99), 1), "n": len(v)}
                     for k, v in times.items()},
        "outbound_msgs_per_s": round(n / out_s),
        "inbound_msgs_per_s": round(n / in_s),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--scope", type=int, default=2000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    bindir = find_pg_bindir()
    if bindir is None:
        print("PostgreSQL 15 binaries not found (initdb, postgres, psql)", file=sys.stderr)
        return 2
    pg = PgServer(bindir)
    pg.start()
    result: dict[str, Any] = {"messages": args.messages}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-journal-") as tmp:
            lite = Journal(Path(tmp) / "j.db")
            lite.owner = "w-a"  # the same filters as a fleet worker's (owner, scope)
            result["sqlite"] = run(lite, args.messages, args.scope)
            lite.close()
        shared = PgJournal(pg.create_database("bench_journal"), worker_id="w-a")
        result["postgresql"] = run(shared, args.messages, args.scope)
        shared.close()
    finally:
        pg.stop()
    for store in ("sqlite", "postgresql"):
        r = result[store]
        print(f"{store}: outbound {r['outbound_msgs_per_s']} msg/s, inbound {r['inbound_msgs_per_s']} msg/s "
              "of journal time")
        for name, c in r["calls_us"].items():
            print(f"  {name:<32} p50 {c['p50']:>8.1f} µs   p99 {c['p99']:>8.1f} µs   ({c['n']} calls)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
