"""Many real neonize clients stuck dialing through a silent proxy must not
starve the process, and must be abandoned after ``connect_timeout_s``.

Colleague's measurement without the backend's precautions: 10 clients dialing
through a stalled proxy occupy all 6 default-executor threads (on 2 cores), an
unrelated ``asyncio.to_thread`` waits > 5 s, the dial never gives up within
30 s, and ``Stop``/``Disconnect`` block > 10 s without ending it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from tests.neonize_helpers import Recorder, StalledProxy, go_threads, wait_no_go_threads
from wa_worker.backends.base import Disconnected, NotConnectedError
from wa_worker.backends.neonize import NeonizeBackend

pytestmark = [pytest.mark.neonize, pytest.mark.slow, pytest.mark.timeout(90)]

N_SESSIONS = 16
CONNECT_TIMEOUT_S = 2.0


async def _loopback_http_server() -> tuple[asyncio.AbstractServer, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _http_get_ms(port: int) -> float:
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    data = await reader.read()
    writer.close()
    assert data.endswith(b"ok")
    return (time.monotonic() - t0) * 1000


# long: one scenario (stalled dials, then healthy ones, then the timeouts), step by step
def test_stalled_dials_do_not_starve_and_time_out(tmp_path: Path) -> None:
    async def main() -> None:
        http, http_port = await _loopback_http_server()
        async with StalledProxy() as stalled:
            backend = NeonizeBackend(
                tmp_path / "auth",
                connect_timeout_s=CONNECT_TIMEOUT_S,
                dial_timeout_s=60,  # only the session watchdog may end these dials
                upstream_proxy=stalled.url,
            )
            async with backend:
                recs = [Recorder() for _ in range(N_SESSIONS)]
                sessions = [await backend.open_session(f"stall-{i}", recs[i]) for i in range(N_SESSIONS)]
                other = await backend.open_session("bystander", Recorder())  # never connected
                t_start = time.monotonic()
                await asyncio.gather(*(s.connect() for s in sessions))
                assert time.monotonic() - t_start < 1.0, "connect() must return promptly"

                # every client really is stuck: its CONNECT reached the silent proxy
                deadline = time.monotonic() + 1.5
                while stalled.accepted < N_SESSIONS:
                    assert time.monotonic() < deadline, f"only {stalled.accepted} dials reached the proxy"
                    await asyncio.sleep(0.02)
                assert len(go_threads()) == N_SESSIONS
                assert not any(r.events for r in recs)

                # while they hang: the default executor is free ...
                t0 = time.monotonic()
                await asyncio.to_thread(lambda: None)
                to_thread_s = time.monotonic() - t0
                assert to_thread_s < 0.5, to_thread_s
                # ... several at once too (more than the default executor's 6 threads)
                t0 = time.monotonic()
                await asyncio.gather(*(asyncio.to_thread(time.sleep, 0.05) for _ in range(8)))
                assert time.monotonic() - t0 < 1.0
                # (threads other than the stuck Go calls, default executor now warmed up)
                baseline_threads = threading.active_count() - len(go_threads())
                # ... the event loop answers a loopback HTTP request quickly ...
                latencies = [await _http_get_ms(http_port) for _ in range(5)]
                assert max(latencies) < 100, latencies
                # ... and another session's send is answered at once (no Go thread needed)
                t0 = time.monotonic()
                with pytest.raises(NotConnectedError):
                    await other.send_text("5511888880000@s.whatsapp.net", "hi")
                assert time.monotonic() - t0 < 0.1

                # after connect_timeout_s every stuck session reports connect_timeout ...
                for rec in recs:
                    ev = await rec.wait_for(lambda e: isinstance(e, Disconnected), timeout_s=CONNECT_TIMEOUT_S + 3)
                    assert ev.reason == "connect_timeout", ev
                    assert len(rec.events) == 1
                slowest = max(r.times[0] for r in recs) - t_start
                assert CONNECT_TIMEOUT_S - 0.2 <= slowest < CONNECT_TIMEOUT_S + 1.5, slowest
                # ... and its thread is released (the relay cut the socket, the Go dial failed)
                released_after = await wait_no_go_threads(3.0)
                assert backend.stats()["go_threads"] == 0
                # only the bounded short-call pool (Stop calls) may have grown
                assert threading.active_count() <= baseline_threads + backend.pool.max_workers
                print(
                    f"\n{N_SESSIONS} stalled dials: to_thread {to_thread_s * 1000:.1f} ms, "
                    f"loopback HTTP max {max(latencies):.1f} ms, all timed out by {slowest:.2f} s, "
                    f"threads released {released_after:.2f} s later"
                )

                # the sessions can try again (and get stuck again, bounded again)
                await sessions[0].disconnect()
                await sessions[0].connect()
                ev = await recs[0].wait_for(
                    lambda e: isinstance(e, Disconnected) and e is not recs[0].events[0], timeout_s=CONNECT_TIMEOUT_S + 3
                )
                assert ev.reason == "connect_timeout"
                await backend.aclose()
                await wait_no_go_threads(3.0)
        http.close()

    asyncio.run(main())
