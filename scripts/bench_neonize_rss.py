#!/usr/bin/env python3
"""Memory per real neonize client, offline (loopback only), through NeonizeBackend.

For each N (a fresh subprocess each, so numbers do not mix) it measures:

* ``created``  - N sessions that each built a Go client and its SQLite store,
                 dialed once (offline: the relay answers 502) and were torn
                 down: what a client leaves behind (goneonize never closes its
                 store, so this includes one leaked SQLite handle each);
* ``dialing``  - N sessions stuck dialing through a silent loopback proxy
                 (live Go client + dedicated thread + relay sockets);
* ``released`` - the same after ``connect_timeout_s`` abandoned them.

Usage: /work/venv/bin/python scripts/bench_neonize_rss.py [N ...]   (default: 10 50)
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def snapshot() -> dict[str, int]:
    return {
        "rss_kb": rss_kb(),
        "threads": threading.active_count(),
        "os_threads": len(os.listdir("/proc/self/task")),
        "fds": len(os.listdir("/proc/self/fd")),
    }


async def measure(n: int, auth: Path) -> dict[str, dict[str, int]]:
    sys.path.insert(0, str(ROOT))
    from wa_worker.backends.base import Disconnected
    from wa_worker.backends.neonize import NeonizeBackend

    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        try:
            while await reader.read(4096):
                pass
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()  # so the fd column only counts the worker's own descriptors

    proxy = await asyncio.start_server(silent, "127.0.0.1", 0)
    proxy_url = f"http://127.0.0.1:{proxy.sockets[0].getsockname()[1]}"
    out: dict[str, dict[str, int]] = {}

    async def run_phase(backend: NeonizeBackend, prefix: str, want: str, count: int) -> tuple[list, dict]:
        seen: dict[str, asyncio.Event] = {}
        sessions = []
        for i in range(count):
            ev = asyncio.Event()
            seen[f"{prefix}{i}"] = ev

            async def sink(e, ev=ev) -> None:
                if isinstance(e, Disconnected) and e.reason == want:
                    ev.set()

            s = await backend.open_session(f"{prefix}{i}", sink)
            sessions.append(s)
        await asyncio.gather(*(s.connect() for s in sessions))
        return sessions, seen

    # one backend: "d*" instances dial through the silent proxy, others go direct
    backend = NeonizeBackend(
        auth,
        connect_timeout_s=6,
        dial_timeout_s=60,
        upstream_proxy=lambda iid: proxy_url if iid.startswith("d") else None,
    )

    async def phase(prefix: str, want: str, count: int) -> tuple[list, list[asyncio.Event]]:
        sessions, events = await run_phase(backend, prefix, want, count)
        return sessions, list(events.values())

    async with backend:
        # warm-up: import neonize, start the relay and pool, one client
        sessions, evs = await phase("warm", "connect_failure", 1)
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in evs)), 10)
        for s in sessions:
            await s.close()
        await asyncio.sleep(0.5)
        out["baseline"] = snapshot()

        # created: build N Go clients + stores; each dial fails offline and is torn down
        sessions, evs = await phase("c", "connect_failure", n)
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in evs)), 20)
        for s in sessions:
            await s.close()
        await asyncio.sleep(0.5)
        out["created"] = snapshot()

        # dialing: N clients stuck on a silent proxy
        sessions, evs = await phase("d", "connect_timeout", n)
        for _ in range(100):  # at most 5 s for every dial to reach the silent proxy
            if len(held) >= n:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        out["dialing"] = snapshot()
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in evs)), 20)
        for s in sessions:
            await s.close()
        await asyncio.sleep(0.5)
        out["released"] = snapshot()
        await backend.aclose()
    proxy.close()
    return out


def child(n: int) -> None:
    with tempfile.TemporaryDirectory(prefix="neonize-bench-") as tmp:
        result = asyncio.run(measure(n, Path(tmp) / "auth"))
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(int(sys.argv[2]))
        return
    ns = [int(a) for a in sys.argv[1:]] or [10, 50]
    rows = []
    for n in ns:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", str(n)],
            capture_output=True, text=True, timeout=120, cwd=ROOT,
        )
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(proc.stdout[-2000:], proc.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"child for N={n} failed")
        rows.append((n, json.loads(line[7:])))

    print("KB/client = RSS change since the previous phase / N (cumulative: 'dialing' adds N more clients)")
    print(f"{'N':>4} {'phase':<9} {'RSS MB':>8} {'KB/client':>10} {'py thr':>7} {'OS thr':>7} {'fds':>5}")
    for n, r in rows:
        prev = None
        for phase in ("baseline", "created", "dialing", "released"):
            s = r[phase]
            per = "" if prev is None else f"{(s['rss_kb'] - prev['rss_kb']) / n:+10.0f}"
            prev = s
            print(
                f"{n:>4} {phase:<9} {s['rss_kb'] / 1024:8.1f} {per:>10} "
                f"{s['threads']:>7} {s['os_threads']:>7} {s['fds']:>5}"
            )


if __name__ == "__main__":
    main()
