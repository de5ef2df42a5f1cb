#!/usr/bin/env python3
"""The live event stream (``GET /api/events``, issue #15) under load: events per second through SSE
to 10 clients, and the latency from a WhatsApp (simulator) event to a client, p50/p99.

* The worker runs as ``python -m wa_worker`` (simulator backend, ``API_TOKEN`` set), the edge proxy
  (``_bench_common.BenchProxy``) in its own process; this process drives the simulated phone over
  the worker's ``/simulator`` routes and runs the SSE clients (aiohttp), so the three share the
  machine's cores like they would share a small host.
* Flood: ``--events`` inbound messages, ``--posters`` at once, while ``--clients`` streams read
  (``?types=inbound``); events/s = events / (first receive → the last client has them all).
* Latency: ``--rate`` events/s for ``--seconds``; for each event, the time from the simulator call
  (the WhatsApp event: the message is received, journaled and published inside that call) to its
  arrival at each client; p50/p99 over every (event, client).
* Replay: one client resumes with ``since=0`` and reads everything kept, from the journal.
* Cost: the same simulator calls against a worker without ``API_TOKEN`` (no event log) and with it
  but no stream open: what recording every event costs the path it observes.

Usage: /work/main/.venv/bin/python scripts/bench_sse.py [--events 5000] [--clients 10] [--rate 100] [--json out]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import SECRET, ProxyProc, WorkerProc, fmt, pct, rss_kib, worker_env

TOKEN = "bench-api-token-0123456789"
API = {"Authorization": f"Bearer {TOKEN}"}
INSTANCES = ("bench-a", "bench-b")
NO_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_read=None)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Client:
    """One SSE stream: when each ``bench-<n>`` body arrived (monotonic), and how many events."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        self.count = 0
        self.first: float | None = None
        self.opened = asyncio.Event()

    async def run(self, http: aiohttp.ClientSession, url: str, until: int) -> None:
        async with http.get(url, headers=API) as resp:
            assert resp.status == 200, resp.status
            self.opened.set()
            async for raw in resp.content:
                if not raw.startswith(b"data: "):
                    continue
                now = time.monotonic()
                self.first = self.first or now
                self.count += 1
                body = json.loads(raw[6:])["payload"].get("body", "")
                self.arrived[body] = now
                if self.count >= until:
                    return


async def _inbound(http: aiohttp.ClientSession, base: str, iid: str, body: str) -> None:
    async with http.post(f"{base}/simulator/instances/{iid}/inbound", json={"from": "5511988887777", "body": body},
                         headers={"Authorization": f"Bearer {SECRET}"}) as resp:
        if resp.status >= 300:
            raise RuntimeError(f"simulator inbound: {resp.status} {await resp.text()}")


async def _wait_connected(http: aiohttp.ClientSession, base: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            async with http.get(f"{base}/health") as resp:
                if resp.status == 200 and (await resp.json())["instances"].get("connected") == len(INSTANCES):
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise TimeoutError("the instances did not connect")


async def flood(http: aiohttp.ClientSession, base: str, n: int, clients: int, posters: int,
                tag: str) -> dict[str, Any]:
    streams = [Client() for _ in range(clients)]
    tasks = [asyncio.create_task(c.run(http, f"{base}/api/events?types=inbound", n)) for c in streams]
    await asyncio.gather(*(c.opened.wait() for c in streams))
    sent: dict[str, float] = {}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for k in range(n):
        queue.put_nowait(k)

    async def poster() -> None:
        while not queue.empty():
            k = queue.get_nowait()
            body = f"{tag}-{k}"
            sent[body] = time.monotonic()
            await _inbound(http, base, INSTANCES[k % len(INSTANCES)], body)

    t0 = time.monotonic()
    await asyncio.gather(*(poster() for _ in range(posters)))
    posted_s = time.monotonic() - t0
    await asyncio.wait_for(asyncio.gather(*tasks), 300)
    done = max(max(c.arrived.values()) for c in streams)
    total_s = done - t0
    lat = [(c.arrived[b] - sent[b]) * 1000 for c in streams for b in sent if b in c.arrived]
    return {"events": n, "clients": clients, "posted_per_s": n / posted_s, "events_per_s": n / total_s,
            "frames_per_s": n * clients / total_s, "all_received": all(c.count == n for c in streams),
            "lat_p50_ms": pct(lat, 50), "lat_p99_ms": pct(lat, 99)}


async def paced(http: aiohttp.ClientSession, base: str, rate: float, seconds: float, clients: int) -> dict[str, Any]:
    n = int(rate * seconds)
    streams = [Client() for _ in range(clients)]
    tasks = [asyncio.create_task(c.run(http, f"{base}/api/events?types=inbound", n)) for c in streams]
    await asyncio.gather(*(c.opened.wait() for c in streams))
    sent: dict[str, float] = {}
    pending: set[asyncio.Task[None]] = set()
    t0 = time.monotonic()
    for k in range(n):
        delay = t0 + k / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        body = f"paced-{k}"
        sent[body] = time.monotonic()
        task = asyncio.create_task(_inbound(http, base, INSTANCES[k % len(INSTANCES)], body))
        pending.add(task)
        task.add_done_callback(pending.discard)
    await asyncio.gather(*pending)
    await asyncio.wait_for(asyncio.gather(*tasks), 120)
    lat = [(c.arrived[b] - sent[b]) * 1000 for c in streams for b in sent]
    return {"rate": rate, "events": n, "clients": clients, "lat_p50_ms": pct(lat, 50), "lat_p99_ms": pct(lat, 99),
            "lat_max_ms": max(lat)}


async def post_only(http: aiohttp.ClientSession, base: str, n: int, posters: int, tag: str) -> float:
    """Simulator calls per second (each: receive, journal, publish), nobody streaming."""
    ks = iter(range(n))

    async def poster() -> None:
        for k in ks:
            await _inbound(http, base, INSTANCES[k % len(INSTANCES)], f"{tag}-{k}")

    t0 = time.monotonic()
    await asyncio.gather(*(poster() for _ in range(posters)))
    return n / (time.monotonic() - t0)


async def cost(http: aiohttp.ClientSession, proxy: ProxyProc, base_dir: Path, n: int, posters: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label, extra in (("api_off", {}), ("api_on", {"API_TOKEN": TOKEN})):
        worker = WorkerProc(base_dir / label, worker_env(base_dir / label, proxy.url, LOG_LEVEL="WARNING",
                                                         SIMULATOR_AUTO_SCAN_MS=50, INSTANCE_POLL_MS=200, **extra))
        try:
            worker.start()
            base = f"http://127.0.0.1:{worker.port}"
            await _wait_connected(http, base)
            await post_only(http, base, 200, posters, "warm")
            out[label] = await post_only(http, base, n, posters, label)
        finally:
            await worker.stop()
    return out


async def replay(http: aiohttp.ClientSession, base: str, n: int) -> dict[str, Any]:
    c = Client()
    t0 = time.monotonic()
    await asyncio.wait_for(c.run(http, f"{base}/api/events?since=0", n), 300)
    return {"events": c.count, "events_per_s": c.count / (time.monotonic() - t0)}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=5000)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--posters", type=int, default=16)
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-sse-") as tmp:
        base_dir = Path(tmp)
        proxy = ProxyProc(base_dir / "proxy.log")
        worker = WorkerProc(base_dir / "worker", worker_env(base_dir / "worker", proxy.url, API_TOKEN=TOKEN,
                                                             LOG_LEVEL="WARNING", SIMULATOR_AUTO_SCAN_MS=50,
                                                             INSTANCE_POLL_MS=200, API_RATE_PER_MINUTE=60000))
        results: dict[str, Any] = {}
        try:
            async with aiohttp.ClientSession(timeout=NO_TIMEOUT,
                                             connector=aiohttp.TCPConnector(limit=0)) as http:
                for _ in range(100):
                    try:
                        async with http.post(f"{proxy.url}/_bench/setup", json={"instances": list(INSTANCES)}):
                            break
                    except aiohttp.ClientError:
                        await asyncio.sleep(0.1)
                worker.start()
                base = f"http://127.0.0.1:{worker.port}"
                await _wait_connected(http, base)
                log("connected; warming up")
                await flood(http, base, 200, args.clients, args.posters, "warm")
                rss0 = rss_kib(worker.pid)
                log(f"flood: {args.events} events, {args.clients} clients")
                results["flood"] = await flood(http, base, args.events, args.clients, args.posters, "flood")
                results["flood_no_clients"] = await flood(http, base, args.events, 1, args.posters, "alone")
                log(f"paced: {args.rate}/s for {args.seconds} s")
                results["paced"] = await paced(http, base, args.rate, args.seconds, args.clients)
                async with http.get(f"{base}/health") as resp:
                    kept = (await resp.json())["events"]["last_seq"]
                log(f"replay of {kept} events")
                results["replay"] = await replay(http, base, kept)
                results["rss_mib"] = {"before": rss0 / 1024, "after": rss_kib(worker.pid) / 1024}
                await worker.stop()
                log("cost: the same calls, API off and on (no stream)")
                results["cost"] = await cost(http, proxy, base_dir, args.events, args.posters)
        finally:
            await worker.stop()
            proxy.stop()

    f, a, p, r = results["flood"], results["flood_no_clients"], results["paced"], results["replay"]
    print(f"flood  {f['events']} inbound events, {f['clients']} SSE clients: {f['events_per_s']:.0f} events/s to every "
          f"client ({f['frames_per_s']:.0f} frames/s), all received: {f['all_received']}; "
          f"latency under flood p50 {fmt(f['lat_p50_ms'])} ms, p99 {fmt(f['lat_p99_ms'])} ms")
    print(f"       same flood, 1 client: {a['events_per_s']:.0f} events/s (simulator calls: {a['posted_per_s']:.0f}/s)")
    print(f"paced  {p['rate']:.0f} events/s x {p['events']}, {p['clients']} clients: WhatsApp event -> client "
          f"p50 {fmt(p['lat_p50_ms'], 2)} ms, p99 {fmt(p['lat_p99_ms'], 2)} ms, max {fmt(p['lat_max_ms'], 2)} ms")
    print(f"replay since=0: {r['events']} events at {r['events_per_s']:.0f} events/s")
    print(f"worker RSS {results['rss_mib']['before']:.1f} -> {results['rss_mib']['after']:.1f} MiB")
    c = results["cost"]
    print(f"cost   simulator inbound calls/s, nobody streaming: API off {c['api_off']:.0f}/s, "
          f"API on (every event journaled) {c['api_on']:.0f}/s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
