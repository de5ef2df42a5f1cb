"""CPU per proxy call as the number of concurrent callers grows (issue: 2,000
instances in one process).

Every runner of the worker awaits its own proxy call (a poll, a status push),
so with N instances up to N requests are queued at once in front of the HTTP
client's connection pool. This script measures, for several HTTP client set-ups,
the client process's CPU time per completed call with N concurrent callers each
making calls back to back against a loopback server (its own process, so its
CPU is not counted).

    python scripts/bench_edge_calls.py                  # N = 10, 500, 2000
    python scripts/bench_edge_calls.py --sizes 10,2000 --calls 4000

Options measured:
  * ``httpx``          - httpx.AsyncClient as the worker used it before: every
                         caller's request queued in httpcore's pool.
  * ``httpx+bound``    - the same client behind an anyio limiter that admits
                         ``--bound`` requests at a time (the worker's choice).
  * ``aiohttp``        - aiohttp.ClientSession with a connector limit.
  * ``edge``           - the worker's EdgeClient (aiohttp transport, as shipped):
                         ``queued_messages`` with everything it adds (bearer,
                         deadline, capped streamed body, strict JSON, parsing).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import aiohttp
import anyio
import httpx

from wa_worker.edge.client import EdgeClient, EdgeError

SERVER = r"""
import sys
from aiohttp import web
async def queued(_):
    return web.Response(body=b'[]', content_type='application/json')
app = web.Application()
app.router.add_get('/queued-messages', queued)
web.run_app(app, host='127.0.0.1', port=int(sys.argv[1]), print=None, access_log=None)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("the loopback server did not start")


async def drive(call: Callable[[], Awaitable[None]], callers: int, calls: int) -> tuple[float, float]:
    """``callers`` tasks share ``calls`` calls; returns (cpu s, wall s)."""
    remaining = calls

    async def caller() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call()

    cpu0, wall0 = time.process_time(), time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(callers):
            tg.start_soon(caller)
    return time.process_time() - cpu0, time.perf_counter() - wall0


async def run_option(name: str, url: str, callers: int, calls: int, bound: int) -> tuple[float, float]:
    if name.startswith("httpx"):
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=8)
        async with httpx.AsyncClient(limits=limits, timeout=30) as client:
            limiter = anyio.CapacityLimiter(bound) if name == "httpx+bound" else None

            async def call() -> None:
                if limiter is None:
                    (await client.get(url)).raise_for_status()
                    return
                async with limiter:
                    (await client.get(url)).raise_for_status()

            await drive(call, min(callers, 8), 200)  # warm up the pool
            return await drive(call, callers, calls)
    if name == "edge":
        edge = EdgeClient(url.rsplit("/", 1)[0], "bench-secret", timeout_s=30, max_connections=bound)

        async def ecall() -> None:
            await edge.queued_messages("bench")

        try:
            await drive(ecall, min(callers, 8), 200)
            return await drive(ecall, callers, calls)
        finally:
            await edge.aclose()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=bound)) as session:

        async def acall() -> None:
            async with session.get(url) as resp:
                resp.raise_for_status()
                await resp.read()

        await drive(acall, min(callers, 8), 200)
        return await drive(acall, callers, calls)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10,500,2000", help="concurrent callers, comma-separated")
    ap.add_argument("--calls", type=int, default=3000, help="calls per measurement")
    ap.add_argument("--bound", type=int, default=8, help="requests admitted at once (bounded options)")
    ap.add_argument("--options", default="httpx,httpx+bound,aiohttp,edge")
    args = ap.parse_args()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port)], env=os.environ.copy())
    try:
        wait_port(port)
        url = f"http://127.0.0.1:{port}/queued-messages"
        print(f"{'option':<12} {'callers':>7} {'calls':>6} {'CPU ms/call':>11} {'calls/s':>8}")
        for size in (int(s) for s in args.sizes.split(",")):
            for option in args.options.split(","):
                try:
                    cpu, wall = anyio.run(run_option, option, url, size, args.calls, args.bound)
                except (ExceptionGroup, httpx.HTTPError, aiohttp.ClientError, EdgeError) as exc:
                    failure = exc.exceptions[0] if isinstance(exc, ExceptionGroup) else exc
                    print(f"{option:<12} {size:>7} {args.calls:>6} failed: {type(failure).__name__}", flush=True)
                    continue
                print(f"{option:<12} {size:>7} {args.calls:>6} {1000 * cpu / args.calls:>11.3f} "
                      f"{args.calls / wall:>8.0f}", flush=True)
    finally:
        server.terminate()
        server.wait(5)


if __name__ == "__main__":
    main()
