"""Throughput and CPU per MB of the neonize backend's CONNECT relay on loopback.

Every byte a neonize client exchanges with WhatsApp - media uploads and
downloads included - passes through ``ConnectRelay`` (docs/neonize.md). This
script pushes bulk data through it in both directions and compares with a
direct connection to the same endpoint.

The relay runs in this process (its CPU time is what is measured); the data
source and sink run in a child process, so their CPU is not counted.

    python scripts/bench_connect_relay.py               # 256 MB each way, 3 rounds
    python scripts/bench_connect_relay.py --mb 64 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time

from wa_worker.backends.neonize.connect_relay import ConnectRelay

CHUNK = 64 * 1024

# The endpoint process: a sink/source server, and a client that moves N MB
# through a given proxy (or directly), printing the wall time. Driven by stdin.
ENDPOINT = r"""
import asyncio, sys, time
CHUNK = 64 * 1024
BLOCK = b"\x5a" * CHUNK

async def handle(reader, writer):
    line = await reader.readline()
    verb, n = line.split()
    n = int(n)
    if verb == b"PUT":
        left = n
        while left > 0:
            data = await reader.read(min(CHUNK * 4, left))
            if not data:
                break
            left -= len(data)
        writer.write(b"ok\n")
    else:
        left = n
        while left > 0:
            writer.write(BLOCK[: min(CHUNK, left)])
            left -= min(CHUNK, left)
            await writer.drain()
    await writer.drain()
    writer.close()

async def client(host, port, proxy_token, verb, n, sink_port):
    reader, writer = await asyncio.open_connection(host, port, limit=CHUNK * 4)
    if proxy_token:
        import base64
        auth = base64.b64encode(f"{proxy_token}:x".encode()).decode()
        writer.write(f"CONNECT 127.0.0.1:{sink_port} HTTP/1.1\r\nProxy-Authorization: Basic {auth}\r\n\r\n".encode())
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert b" 200 " in head.split(b"\r\n")[0], head
    t0 = time.perf_counter()
    writer.write(f"{verb} {n}\n".encode())
    if verb == "PUT":
        left = n
        while left > 0:
            writer.write(BLOCK[: min(CHUNK, left)])
            left -= min(CHUNK, left)
            await writer.drain()
        assert (await reader.readline()) == b"ok\n"
    else:
        got = 0
        while got < n:
            data = await reader.read(CHUNK * 4)
            if not data:
                break
            got += len(data)
        assert got == n, (got, n)
    wall = time.perf_counter() - t0
    writer.close()
    return wall

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", 0, limit=CHUNK * 4)
    sink_port = server.sockets[0].getsockname()[1]
    print(sink_port, flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        host, port, token, verb, n = line.split()
        wall = await client(host, int(port), "" if token == "-" else token, verb, int(n), sink_port)
        print(f"{wall:.6f}", flush=True)

asyncio.run(main())
"""


async def ask(proc: subprocess.Popen[str], line: str) -> float:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    answer = await asyncio.get_running_loop().run_in_executor(None, proc.stdout.readline)
    return float(answer)


async def run(proc: subprocess.Popen[str], mb: int, rounds: int) -> None:
    n = mb * 1024 * 1024
    assert proc.stdout is not None
    sink_port = int(proc.stdout.readline())
    async with ConnectRelay(allowed_ports=None) as relay:
        assert relay.port is not None
        ticket = relay.issue("bench")
        rows = []
        for verb, direction in (("PUT", "upload (client -> WhatsApp)"), ("GET", "download (WhatsApp -> client)")):
            direct = [await ask(proc, f"127.0.0.1 {sink_port} - {verb} {n}") for _ in range(rounds)]
            walls, cpus = [], []
            for _ in range(rounds):
                cpu0 = time.process_time()
                walls.append(await ask(proc, f"127.0.0.1 {relay.port} {ticket.token} {verb} {n}"))
                cpus.append(time.process_time() - cpu0)
            rows.append((direction, mb / statistics.median(direct), mb / statistics.median(walls),
                         1000 * statistics.median(cpus) / mb))
        assert ticket.bytes_up >= rounds * n and ticket.bytes_down >= rounds * n
    print(f"{mb} MB per transfer, median of {rounds}; load average {os.getloadavg()[0]:.2f}")
    print(f"{'direction':<32} {'direct MB/s':>12} {'relay MB/s':>11} {'relay CPU ms/MB':>16}")
    for direction, direct_mbs, relay_mbs, cpu_ms in rows:
        print(f"{direction:<32} {direct_mbs:>12.0f} {relay_mbs:>11.0f} {cpu_ms:>16.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=256, help="megabytes per transfer")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    proc = subprocess.Popen([sys.executable, "-c", ENDPOINT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=os.environ.copy())
    try:
        asyncio.run(run(proc, args.mb, args.rounds))
    finally:
        proc.terminate()
        proc.wait(5)


if __name__ == "__main__":
    main()
