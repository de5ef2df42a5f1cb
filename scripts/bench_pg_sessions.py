#!/usr/bin/env python3
"""PostgreSQL connections held by N neonize sessions kept in PostgreSQL (DATABASE_URL),
offline (loopback only), through the real NeonizeBackend and goneonize; plus RSS/CPU.

It starts its own PostgreSQL 15 (initdb in a temp folder, max_connections 2000) and,
for each N and mode, a fresh subprocess that opens N sessions and makes every one
connect twice. Offline, each attempt builds a Go client (its database/sql pool,
whatsmeow's device lookup) and fails its dial at once (the upstream proxy is a
closed loopback port): exactly the database work of a start and of a reconnect.

Modes:
* ``direct``    - DATABASE_IDLE_TIMEOUT_S=0: goneonize as it is (a pool per attempt, never closed);
* ``idle``      - DATABASE_IDLE_TIMEOUT_S=5: the server closes idle connections;
* ``pgbouncer`` - through PgBouncer (transaction mode, default_pool_size 10, client_idle_timeout 5,
                  ``binary_parameters=yes``), if the ``pgbouncer`` binary is installed;
* ``sqlite``    - the baseline: no DATABASE_URL, session files in a temp AUTH_DIR (RSS/CPU only).

Columns: connections to PostgreSQL (pg_stat_activity, client backends of the
sessions' database, the worker's own psycopg connection aside except behind PgBouncer) at their peak (sampled every 0.5 s) and at the end of each
round, then after 8 s idle; for PgBouncer also the client connections it holds
(SHOW POOLS); the worker process's RSS, CPU seconds, threads and descriptors.

Usage: python scripts/bench_pg_sessions.py [--modes direct,idle,pgbouncer,sqlite] [N ...]  (default: 100 500)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.pg_helpers import PgBouncer, PgServer, find_pg_bindir, pgbouncer_client_connections  # (after the path change)

IDLE_S = 5.0
POOL = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return round(ru.ru_utime + ru.ru_stime, 1)


# ------------------------------------------------------------------ one run (a subprocess)


def pgbouncer_errors(log: str) -> list[str]:
    """Its ERROR/WARNING lines, but client_idle_timeout closing a leaked pool's connection (the point)."""
    return [ln for ln in log.splitlines()
            if (" ERROR " in ln or " WARNING " in ln) and "client_idle_timeout" not in ln][:5]


def conns(server: PgServer, dbname: str, *, own: bool = False) -> int:
    """Connections to the sessions' database: the Go side's (lib/pq sets no application_name),
    plus the worker's own one (``wa-worker``) when ``own`` (behind PgBouncer they are shared)."""
    skip = "('psql')" if own else "('wa-worker', 'psql')"
    return int(server.scalar(f"select count(*) from pg_stat_activity where datname = '{dbname}' "
                             f"and coalesce(application_name, '') not in {skip}"))


class Sampler:
    """The peak of :func:`conns`, sampled every 0.5 s on a thread."""

    def __init__(self, server: PgServer, dbname: str, own: bool) -> None:
        self.server, self.dbname, self.own, self.peak = server, dbname, own, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self.peak = max(self.peak, conns(self.server, self.dbname, own=self.own))
            except (RuntimeError, subprocess.SubprocessError):
                pass

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


async def run_once(n: int, url: str | None, idle_s: float, server: PgServer, dbname: str,
                   bouncer_port: int | None) -> dict[str, Any]:
    from wa_worker.backends.base import Disconnected
    from wa_worker.backends.neonize import NeonizeBackend

    own = bouncer_port is not None
    closed = free_port()  # nothing listens: every dial fails at once, loopback only
    out: dict[str, Any] = {"n": n}
    auth = Path(tempfile.mkdtemp(prefix="wa-bench-auth-"))
    backend = NeonizeBackend(auth, connect_timeout_s=60, upstream_proxy=f"http://127.0.0.1:{closed}",
                             database_url=url, database_idle_timeout_s=idle_s)
    t_cpu0 = cpu_s()
    async with backend:
        events: dict[str, asyncio.Event] = {}
        reasons: dict[str, str] = {}
        sessions = []
        for i in range(n):
            iid = f"bench{i}"
            ev = asyncio.Event()
            events[iid] = ev

            async def sink(e: Any, ev: asyncio.Event = ev, iid: str = iid) -> None:
                if isinstance(e, Disconnected):
                    reasons[iid] = e.reason
                    ev.set()

            sessions.append(await backend.open_session(iid, sink))
        for rnd in (1, 2):
            for ev in events.values():
                ev.clear()
            t0 = time.monotonic()
            with Sampler(server, dbname, own) as sampler:
                for s in sessions:
                    await s.connect()
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events.values())), 900)
                await asyncio.sleep(1.0)
            out[f"round{rnd}"] = {"s": round(time.monotonic() - t0, 1), "peak": sampler.peak,
                                  "end": conns(server, dbname, own=own),
                                  "failures": sorted(set(reasons.values()))}
            if bouncer_port is not None:
                out[f"round{rnd}"]["bouncer_clients"] = pgbouncer_client_connections(server, bouncer_port, dbname)
        await asyncio.sleep(8.0)
        out["idle_8s"] = {"conns": conns(server, dbname, own=own)}
        if bouncer_port is not None:
            out["idle_8s"]["bouncer_clients"] = pgbouncer_client_connections(server, bouncer_port, dbname)
        out["process"] = {"rss_mb": round(rss_kb() / 1024, 1), "cpu_s": round(cpu_s() - t_cpu0, 1),
                          "threads": len(os.listdir("/proc/self/task")), "fds": len(os.listdir("/proc/self/fd"))}
        for s in sessions:
            await s.close()
    shutil.rmtree(auth, ignore_errors=True)
    return out


def child(args: list[str]) -> None:
    spec = json.loads(args[0])
    server = PgServer(Path(spec["bindir"]))
    server.port, server.host = spec["port"], "127.0.0.1"
    result = asyncio.run(run_once(spec["n"], spec["url"], spec["idle_s"], server, spec["db"], spec.get("bouncer")))
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------ driver


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("n", nargs="*", type=int, default=[100, 500])
    ap.add_argument("--modes", default="direct,idle,pgbouncer,sqlite")
    ns = ap.parse_args()
    modes = [m for m in ns.modes.split(",") if m]
    if "pgbouncer" in modes and shutil.which("pgbouncer") is None:
        print("pgbouncer not installed (apt-get install pgbouncer): mode skipped", file=sys.stderr)
        modes.remove("pgbouncer")
    bindir = find_pg_bindir()
    if bindir is None:
        print("PostgreSQL binaries not found", file=sys.stderr)
        return 2
    server = PgServer(bindir, max_connections=2000)
    server.start()
    version = server.scalar("select current_setting('server_version')")
    limit = server.scalar("select current_setting('max_connections')")
    print(f"PostgreSQL {version} on 127.0.0.1:{server.port} (max_connections {limit}); {os.cpu_count()} CPUs")
    try:
        for n in ns.n:
            for mode in modes:
                db = f"bench_{mode}_{n}"
                server.create_database(db)
                bouncer = None
                url: str | None = server.dsn(db) + "?sslmode=disable" if mode != "sqlite" else None
                idle_s = {"direct": 0.0, "idle": IDLE_S, "pgbouncer": 0.0, "sqlite": 0.0}[mode]
                if mode == "pgbouncer":
                    bouncer = PgBouncer(server, db, pool_size=POOL, client_idle_timeout_s=int(IDLE_S))
                    bouncer.start()
                    url = bouncer.url()
                spec = {"n": n, "url": url, "idle_s": idle_s, "db": db, "bindir": str(bindir), "port": server.port,
                        "bouncer": bouncer.port if bouncer else None}
                try:
                    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                          text=True, timeout=1800, cwd=ROOT)
                finally:
                    errors = pgbouncer_errors(bouncer.log_tail(1_000_000)) if bouncer else []
                    if bouncer:
                        bouncer.stop()
                line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if line is None:
                    print(f"{mode} N={n}: failed\n{done.stderr[-3000:]}")
                    continue
                r = json.loads(line[7:])
                r1, r2, idle, proc = r["round1"], r["round2"], r["idle_8s"], r["process"]
                extra = ""
                if bouncer:
                    extra = (f"  pgbouncer clients: {r1['bouncer_clients']} / {r2['bouncer_clients']} / "
                             f"{idle['bouncer_clients']}" + (f"  log: {errors}" if errors else ""))
                print(f"{mode:<9} N={n:<4} PG conns: round 1 peak {r1['peak']:>4} end {r1['end']:>4} ({r1['s']} s)  "
                      f"round 2 peak {r2['peak']:>4} end {r2['end']:>4} ({r2['s']} s)  idle 8 s {idle['conns']:>4}  "
                      f"| RSS {proc['rss_mb']} MB  CPU {proc['cpu_s']} s  threads {proc['threads']}  fds {proc['fds']}"
                      f"  failures {r1['failures']}{extra}", flush=True)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2:])
    else:
        sys.exit(main())
