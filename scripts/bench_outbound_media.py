"""Outbound media throughput and peak RSS on the simulator backend (issue #11).

The real ``wa-worker`` (subprocess, simulator backend) sends documents of 10 MiB and 64 MiB
that a loopback aiohttp server serves (``media_url``); each figure is the time from queueing
the message (plus ``/wake``) to its ``/mark-sent``: fetch to disk, sniff, journal, the
simulator reading and hashing the file, the acknowledgement. Peak RSS is the worker's
``VmHWM`` before and after the 64 MiB send (the file is streamed, never held in memory).

    python scripts/bench_outbound_media.py [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts._bench_common import WorkerProc, free_port  # noqa: E402
from tests.fakeproxy import SECRET, FakeProxy  # noqa: E402

MiB = 1024 * 1024


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def handled(proxy: FakeProxy, mid: str) -> bool:
    return mid in proxy.sent_marks or mid in proxy.failed_marks


async def until(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    for _ in range(int(timeout_s / 0.005) + 1):
        if cond() or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.005)
    if not cond():
        raise SystemExit(f"timed out waiting for {what}")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-media-"))
    blobs = {"10": b"%PDF-1.4\n" + os.urandom(10 * MiB - 9), "64": b"%PDF-1.4\n" + os.urandom(64 * MiB - 9)}

    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=blobs[request.match_info["size"]], content_type="application/pdf")

    app = web.Application()
    app.router.add_get("/doc/{size}/{n}.pdf", serve)
    media_runner = web.AppRunner(app, access_log=None)
    await media_runner.setup()
    await web.TCPSite(media_runner, "127.0.0.1", 0).start()
    media_url = f"http://127.0.0.1:{media_runner.addresses[0][1]}"
    proxy = await FakeProxy().start()
    proxy.add_instance("bench")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGE_", "WORKER_", "WA_", "SIMULATOR_"))}
    env.update(EDGE_BASE_URL=proxy.url, WORKER_SECRET=SECRET, PORT=str(free_port()), AUTH_DIR=str(tmp / "auth"),
               STATE_DB=str(tmp / "state" / "wa.db"), WA_BACKEND="simulator", SIMULATOR_AUTO_SCAN_MS="20",
               INSTANCE_POLL_MS="200", MSG_POLL_MS="50", MEDIA_ALLOW_PRIVATE="true", LOG_LEVEL="WARNING",
               PYTHONPATH=str(ROOT))
    worker = WorkerProc(tmp / "worker", env)
    worker.start()
    try:
        await until(lambda: proxy.status_of("bench") == "CONNECTED", 30, "CONNECTED")
        async with httpx.AsyncClient() as http:
            rss_before = vm_hwm_kib(worker.pid)
            n = 0
            for size in ("10", "64"):
                secs = []
                for _ in range(args.runs):
                    n += 1
                    mid = f"d{n}"
                    proxy.enqueue("bench", mid, "5511988887777", None, type="document",
                                  media_url=f"{media_url}/doc/{size}/{n}.pdf", filename="doc.pdf")
                    t0 = time.monotonic()
                    await http.post(f"http://127.0.0.1:{worker.port}/wake",
                                    headers={"Authorization": f"Bearer {SECRET}"})
                    await until(functools.partial(handled, proxy, mid), 120, mid)
                    if mid in proxy.failed_marks:
                        raise SystemExit(f"{mid} failed: {proxy.failed_marks[mid]}")
                    secs.append(time.monotonic() - t0)
                med = statistics.median(secs)
                print(f"{size} MiB document via media_url: median {med:.3f} s over {len(secs)} "
                      f"({int(size) / med:.0f} MiB/s end to end)")
            rss_after = vm_hwm_kib(worker.pid)
            print(f"worker peak RSS (VmHWM): {rss_before / 1024:.0f} MiB connected and idle, "
                  f"{rss_after / 1024:.0f} MiB after the 64 MiB sends")
    finally:
        await worker.stop()
        await proxy.stop()
        await media_runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
