"""Helpers for the neonize backend tests: loopback proxies, event protobufs,
and pushing events through the exact ctypes entry points Go calls."""

from __future__ import annotations

import asyncio
import ctypes
import threading
import time
from collections.abc import Callable
from typing import Any

from wa_worker.backends.base import BackendEvent


class StalledProxy:
    """Accepts TCP connections and never answers (a proxy stuck mid-CONNECT)."""

    def __init__(self) -> None:
        self.port = 0
        self.accepted = 0
        self._server: asyncio.AbstractServer | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> "StalledProxy":
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.append(writer)
        try:
            while await reader.read(4096):  # swallow the CONNECT, never reply
                pass
        except (ConnectionError, asyncio.CancelledError):
            pass

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for w in self._writers:
            w.transport.abort()
        await asyncio.sleep(0)


class ForwardingProxy:
    """A minimal real HTTP CONNECT proxy on loopback (records requests)."""

    def __init__(self) -> None:
        self.port = 0
        self.requests: list[bytes] = []
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> "ForwardingProxy":
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        self.requests.append(head)
        target = head.split(b" ")[1].decode()
        host, _, port = target.rpartition(":")
        try:
            ur, uw = await asyncio.open_connection(host, int(port))
        except OSError:
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\n\r\n")
            writer.close()
            return
        writer.write(b"HTTP/1.1 200 OK\r\n\r\n")

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(copy(reader, uw), copy(ur, writer))

    @property
    def url(self) -> str:
        return f"http://user:secret@127.0.0.1:{self.port}"

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()


class Recorder:
    """An EventSink that records events and lets tests wait for them."""

    def __init__(self) -> None:
        self.events: list[BackendEvent] = []
        self.times: list[float] = []
        self._changed = asyncio.Event()

    async def __call__(self, event: BackendEvent) -> None:
        self.events.append(event)
        self.times.append(time.monotonic())
        self._changed.set()

    async def wait_for(
        self, pred: Callable[[BackendEvent], bool], timeout_s: float = 5.0
    ) -> BackendEvent:
        deadline = time.monotonic() + timeout_s
        seen = 0
        while True:
            for ev in self.events[seen:]:
                if pred(ev):
                    return ev
            seen = len(self.events)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching event within {timeout_s} s; got {self.events!r}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except asyncio.TimeoutError:
                pass

    def of_type(self, cls: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, cls)]


def go_threads() -> list[threading.Thread]:
    """Threads blocked in (or running) a Neonize() call of the backend."""
    return [t for t in threading.enumerate() if t.name.startswith("neonize-") and t.is_alive()]


async def wait_no_go_threads(timeout_s: float = 5.0) -> float:
    start = time.monotonic()
    while go_threads():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"Go threads still alive: {[t.name for t in go_threads()]}")
        await asyncio.sleep(0.05)
    return time.monotonic() - start


async def on_foreign_thread(fn: Callable[[], None]) -> None:
    """Run ``fn`` on a non-loop thread (like Go does) and wait for it without
    blocking the loop (the backend hands Go callbacks to the loop and waits)."""
    import anyio.to_thread

    await anyio.to_thread.run_sync(fn)


async def push_event(callbacks: dict[str, Any], uuid: bytes, code: int, message: Any) -> None:
    """Serialize ``message`` and call the event callback Go calls, from a foreign thread."""
    data = message.SerializePartialToString()
    buf = ctypes.create_string_buffer(data, len(data))

    def call() -> None:
        callbacks["event"](uuid, ctypes.cast(buf, ctypes.c_void_p), len(data), code)

    await on_foreign_thread(call)


async def push_string(callbacks: dict[str, Any], kind: str, uuid: bytes, text: str) -> None:
    """Call the QR (``kind='qr'``) or login-status callback like Go does."""
    u = ctypes.create_string_buffer(uuid)
    s = ctypes.create_string_buffer(text.encode())

    def call() -> None:
        callbacks[kind](ctypes.cast(u, ctypes.c_void_p), ctypes.cast(s, ctypes.c_void_p))

    await on_foreign_thread(call)


# --------------------------------------------------------------------------- protobufs


def jid(user: str, server: str = "s.whatsapp.net", device: int = 0) -> Any:
    from neonize.proto.Neonize_pb2 import JID

    return JID(User=user, Server=server, Device=device, RawAgent=0, Integrator=0, IsEmpty=not user)


def message_event(
    wa_message: Any,
    *,
    chat: Any,
    sender: Any,
    msg_id: str = "3EB0AAAA",
    from_me: bool = False,
    is_group: bool = False,
    push_name: str = "Alice",
    timestamp: int = 1_700_000_000_000,
    is_edit: bool = False,
) -> Any:
    from neonize.proto.Neonize_pb2 import Message as MessageEv
    from neonize.proto.Neonize_pb2 import MessageInfo, MessageSource

    return MessageEv(
        Info=MessageInfo(
            MessageSource=MessageSource(Chat=chat, Sender=sender, IsFromMe=from_me, IsGroup=is_group),
            ID=msg_id,
            Pushname=push_name,
            Timestamp=timestamp,
            Type="text",
        ),
        Message=wa_message,
        IsEdit=is_edit,
    )


# --------------------------------------------------------------------------- gate stress (subprocess)


async def _gate_stress(seconds: float, root: str) -> tuple[int, int]:
    """Client starts/stops (Go map writers) racing Go calls (readers), through the backend."""
    from pathlib import Path

    from wa_worker.backends.base import Disconnected
    from wa_worker.backends.neonize import NeonizeBackend
    from wa_worker.backends.neonize.loading import NeonizeLib

    backend = NeonizeBackend(Path(root), connect_timeout_s=10)
    deadline = time.monotonic() + seconds
    counts = [0, 0]

    async def churn(i: int) -> None:
        rec = Recorder()
        session = await backend.open_session(f"churn{i}", rec)
        while time.monotonic() < deadline:
            rec.events.clear()
            await session.connect()
            await rec.wait_for(lambda e: isinstance(e, Disconnected), timeout_s=10)
            await session.disconnect()
            counts[0] += 1
        await session.close()

    async def read(i: int) -> None:
        rec = Recorder()
        session = await backend.open_session(f"reader{i}", rec)
        gocode = NeonizeLib.get().gocode
        while time.monotonic() < deadline:
            await session._go_call("IsConnected", lambda: gocode.IsConnected(b"churn0#1-x"), timeout_s=5)
            counts[1] += 1

    async with backend:
        await asyncio.gather(*(churn(i) for i in range(6)), *(read(i) for i in range(6)))
    return counts[0], counts[1]


if __name__ == "__main__":
    import sys

    if sys.argv[1] == "gate-stress":
        starts, reads = asyncio.run(_gate_stress(float(sys.argv[2]), sys.argv[3]))
        print(f"OK starts={starts} reads={reads}")
