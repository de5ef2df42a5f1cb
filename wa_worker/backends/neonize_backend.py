"""The real WhatsApp backend: neonize 0.5.2 (Python over Go whatsmeow).

One session per instance, its whatsmeow SQLite store at
``AUTH_DIR/<instanceId>/session.db`` (folder 0700, files 0600: the file is
created 0600 before Go opens it, SQLite gives its journal files the same mode,
and the tree is re-tightened after each connection attempt).

Design (measured offline against goneonize 0.5.2; see ``threads.py`` and
``connect_relay.py`` for the pieces):

* **Own connect, not** ``NewAClient.connect()``. neonize runs ``Neonize()`` —
  which blocks for the *whole life* of a connection — through
  ``asyncio.to_thread``, i.e. the loop's default executor (6 threads on 2
  cores): a handful of clients dialing through a stalled proxy starve every
  other ``to_thread`` user. Each attempt here runs ``Neonize()`` in a dedicated
  daemon thread with our own ctypes callbacks; short calls (send, stop) go to a
  bounded pool with timeouts and a per-session cap. The per-attempt
  ``NewAClient`` is kept for its API (``send_message`` ...) with its Go
  dispatcher swapped for that pool and its GC finalizer (a blocking
  ``Stop()``) detached.
* **Loopback CONNECT relay.** Every client's proxy is the backend's relay with
  a per-attempt ticket. A stuck Go dial ignores ``Stop``/``Disconnect`` but
  fails within milliseconds once its socket closes, so abandoning an attempt
  (connect timeout, disconnect, close) = revoke its ticket: sockets aborted,
  the thread comes back, and whatsmeow's background auto-reconnect of an
  abandoned client can never reach WhatsApp again. The relay also bounds the
  upstream dial, chains to an optional per-instance upstream HTTP proxy and
  counts bytes per attempt.
* **Bounded connect**: an attempt that shows neither a QR nor ``Connected``
  within ``connect_timeout_s`` reports ``Disconnected("connect_timeout")`` and
  is abandoned as above. Dial failures (the relay answers 502) come back from
  ``Neonize()`` at once and report ``Disconnected("connect_failure")``.
* **One attempt, one Go client.** Each ``connect()`` after a terminal event
  creates a fresh Go client under a fresh uuid (goneonize keys its Go maps by
  uuid; reusing one while an old call lingers would let the old attempt's
  cleanup stop the new client). Every terminal event (``Disconnected``,
  ``LoggedOut``) abandons the attempt; the runner's next ``connect()`` starts a
  new one. ``disconnect()``/``close()`` abandon it silently (no event) and
  never log out.
* **Event loop**: callbacks arrive on Go threads and are handed to the loop
  that started the backend with ``call_soon_threadsafe``; a per-session pump
  awaits the sink in order. neonize's own dispatch uses the module global
  ``neonize.aioze.events.event_global_loop``, which it sets only once per
  process (``set_event_loop`` ignores later loops), so any neonize code path
  used after a loop restart (tests, in-process restart) would post to a dead
  loop; the backend points that global at its running loop when it starts.

Traps found in goneonize 0.5.2 (kept here so nobody rediscovers them):

* unlocked Go maps: a call racing a client start crashes the process
  (``fatal error: concurrent map read and map write``) -> ``GoMapGate``;
* each ``Neonize()`` and each ``GetAllDevices()`` leaks one SQLite file
  descriptor (the Go store is never closed): ``has_session`` reads the store
  with Python's ``sqlite3`` instead, and every reconnect costs one fd;
* ``NewAClient.is_connected`` is a *property returning a coroutine* (always
  truthy unless awaited) that runs in the default executor;
* importing neonize calls ``logging.basicConfig``, inserts its proto folder
  into ``sys.path`` and starts a log thread: imported lazily here;
* ``Neonize()`` prints to stdout ("Press Ctrl+C to exit", login events).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import secrets
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..fsutil import FILE_MODE, ensure_private_dir, tighten_tree
from ..ids import is_valid_instance_id
from .base import (
    Backend,
    BackendError,
    BackendEvent,
    Connected,
    Disconnected,
    EventSink,
    InboundMessage,
    LoggedOut,
    NotConnectedError,
    QrCode,
    SendError,
    Session,
    SessionInfo,
)
from .connect_relay import ConnectRelay, RelayTicket
from .neonize_events import identity_from_event, is_terminal, map_event, map_login_status
from .threads import (
    CallNotStarted,
    CallPool,
    CallTimeout,
    GoMapGate,
    WriterHold,
    default_pool_size,
    run_in_dedicated_thread,
)

DB_NAME = "session.db"
#: neonize event codes we subscribe to (0 = own Device, always sent).
#: 1 (QR list) is left out on purpose: codes arrive one by one via the QR callback.
SUBSCRIBED_EVENTS = bytes([2, 3, 6, 7, 8, 9, 10, 11, 12, 17])

#: Go maps are process-wide, so the gate is too (shared by every backend).
GO_GATE = GoMapGate()

UpstreamProxy = str | Callable[[str], str | None] | None


class _Neonize:
    """neonize, imported on first use (its import has process-wide side effects)."""

    _mod: "_Neonize | None" = None

    def __init__(self) -> None:
        from neonize import _binder
        from neonize.aioze import events as aio_events
        from neonize.aioze.client import NewAClient
        from neonize.events import INT_TO_EVENT
        from neonize.exc import SendMessageError
        from neonize.proto import Neonize_pb2
        from neonize.proto.waCompanionReg.WAWebProtobufsCompanionReg_pb2 import DeviceProps
        from neonize.proto.waE2E.WAWebProtobufsE2E_pb2 import Message as WAMessage
        from neonize.utils.jid import build_jid

        self.binder = _binder
        self.gocode = _binder.gocode
        self.ProxySettings = _binder.ProxySettings
        self.func_string = _binder.func_string
        self.func_callback_bytes = _binder.func_callback_bytes
        self.func_callback_bytes2 = _binder.func_callback_bytes2
        self.aio_events = aio_events
        self.NewAClient = NewAClient
        self.INT_TO_EVENT = INT_TO_EVENT
        self.SendMessageError = SendMessageError
        self.pb = Neonize_pb2
        self.DeviceProps = DeviceProps
        self.WAMessage = WAMessage
        self.build_jid = build_jid
        self.log_cb: Any = None

    @classmethod
    def get(cls) -> "_Neonize":
        if cls._mod is None:
            cls._mod = cls()
        return cls._mod


_WHATSMEOW_LOG = logging.getLogger("wa_worker.whatsmeow")
_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARN": logging.WARNING, "ERROR": logging.ERROR}


def _go_log(buf: int, size: int) -> None:
    """whatsmeow log callback (Go thread). Only WARN+ is asked for by default."""
    try:
        nz = _Neonize.get()
        entry = nz.pb.LogEntry.FromString(ctypes.string_at(buf, size))
        _WHATSMEOW_LOG.log(_LEVELS.get(entry.Level, logging.INFO), "[%s] %s", entry.Name, entry.Message)
    except Exception:  # noqa: BLE001 - never raise into Go
        pass


def _log_callback() -> Any:
    nz = _Neonize.get()
    if nz.log_cb is None:  # one per process, alive forever: zombie goroutines may log
        nz.log_cb = nz.func_callback_bytes2(_go_log)
    return nz.log_cb


class _PoolGoCode:
    """Stands in for neonize's ``async_gocode`` inside a ``NewAClient``: every
    FFI call runs in the backend's bounded pool, entering Go through the gate."""

    def __init__(self, session: "NeonizeSession") -> None:
        self._session = session

    def __getattr__(self, name: str) -> Callable[..., Any]:
        session = self._session

        def call(*args: Any) -> Any:
            fn = getattr(_Neonize.get().gocode, name)
            return session._go_call(name, lambda: fn(*args), timeout=session.backend.send_timeout_s)

        return call


@dataclass(eq=False)
class _Attempt:
    seq: int
    uuid: bytes
    ticket: RelayTicket
    hold: WriterHold
    client: Any = None
    refs: tuple[Any, ...] = ()  # ctypes objects Go points at: alive until the thread ends
    callbacks: dict[str, Any] = field(default_factory=dict)  # the exact entry points Go calls
    thread: threading.Thread | None = None
    done: asyncio.Future[Any] | None = None
    terminal: bool = False
    seen_qr: bool = False
    connected: bool = False
    watchdog: asyncio.TimerHandle | None = None
    teardown: asyncio.Task[None] | None = None
    result: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class NeonizeSession(Session):
    """One instance's neonize connection (see module doc for the lifecycle)."""

    def __init__(self, backend: "NeonizeBackend", instance_id: str, sink: EventSink) -> None:
        self.backend = backend
        self.instance_id = instance_id
        self._sink = sink
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[BackendEvent] = asyncio.Queue()
        self._pump = self._loop.create_task(self._run_pump(), name=f"neonize-sink-{instance_id}")
        self._lock = asyncio.Lock()
        self._attempt: _Attempt | None = None
        self._seq = 0
        self._closed = False
        self.state = "idle"
        self.own_jid: str | None = None
        self.push_name: str | None = None
        self.upstream_proxy: str | None = None  # overrides the backend's choice when set
        self.log = backend.log

    # ------------------------------------------------------------------ paths

    @property
    def auth_dir(self) -> Path:
        return self.backend.auth_dir(self.instance_id)

    @property
    def db_path(self) -> Path:
        return self.auth_dir / DB_NAME

    def _prepare_store(self) -> None:
        ensure_private_dir(self.backend.auth_root)
        ensure_private_dir(self.auth_dir)
        if not self.db_path.exists():
            # created 0600 before Go opens it: SQLite gives -journal/-wal/-shm the same mode
            os.close(os.open(self.db_path, os.O_RDWR | os.O_CREAT, FILE_MODE))
        tighten_tree(self.auth_dir)

    # ------------------------------------------------------------------ public API

    async def connect(self) -> None:
        async with self._lock:
            if self._closed:
                raise BackendError(f"session {self.instance_id} is closed")
            att = self._attempt
            if att is not None and not att.terminal:
                return  # already connecting / waiting for a scan / connected
            if att is not None and att.teardown is not None:
                await self._wait(att.teardown, self.backend.close_timeout_s)
            await self.backend._ensure_started()
            if self._closed:  # closed while we waited
                raise BackendError(f"session {self.instance_id} is closed")
            self._prepare_store()
            self._start_attempt()

    async def send_text(self, to_jid: str, body: str) -> str:
        att = self._attempt
        if self._closed or att is None or att.terminal or not att.connected:
            raise NotConnectedError(f"instance {self.instance_id} is not connected")
        nz = _Neonize.get()
        try:
            jid = _jid_proto(to_jid)
        except ValueError as exc:
            raise SendError(str(exc), permanent=True) from None
        try:
            resp = await att.client.send_message(jid, nz.WAMessage(conversation=body))
        except nz.SendMessageError as exc:
            text = str(exc)
            if "not connected" in text.lower() or "client is nil" in text.lower():
                raise NotConnectedError(text) from None
            raise SendError(text) from None
        except CallNotStarted as exc:
            raise SendError(f"not sent: {exc}") from None
        except RuntimeError as exc:  # backend closed under us
            raise NotConnectedError(f"not sent: {exc}") from None
        except CallTimeout as exc:
            raise SendError(f"send outcome unknown: {exc}") from None
        if not resp.ID:
            raise SendError("WhatsApp returned no message id")
        return resp.ID

    async def is_connected(self) -> bool:
        """whatsmeow's own view (a Go call in the pool); False when no client."""
        att = self._attempt
        if att is None or att.terminal:
            return False
        nz = _Neonize.get()
        try:
            return bool(
                await self._go_call("IsConnected", lambda: nz.gocode.IsConnected(att.uuid), timeout=5.0)
            )
        except CallTimeout:
            return False

    async def disconnect(self) -> None:
        async with self._lock:
            att = self._attempt
            if att is not None and not att.terminal:
                self._mark_terminal(att)
            if self.state not in ("closed", "logged_out"):
                self.state = "disconnected"
            if att is not None:
                self._retire(att)
                await self._wait(att.teardown, self.backend.close_timeout_s)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await asyncio.wait_for(self._close_inner(), self.backend.close_timeout_s + 1.0)
        except asyncio.TimeoutError:
            self.log.warning("neonize %s: close timed out, abandoning its thread", self.instance_id)
        finally:
            self.state = "closed"
            self._pump.cancel()
            self.backend._forget(self)

    async def _close_inner(self) -> None:
        att = self._attempt
        if att is not None and not att.terminal:
            self._mark_terminal(att)
        if att is not None:
            self._retire(att)
            await self._wait(att.teardown, self.backend.close_timeout_s)

    def info(self) -> SessionInfo:
        att = self._attempt
        extra: dict[str, object] = {"attempts": self._seq}
        if att is not None:
            t = att.ticket
            extra.update(
                relay_connections=t.connections,
                bytes_up=t.bytes_up,
                bytes_down=t.bytes_down,
                relay_error=t.last_error,
                thread_alive=bool(att.thread and att.thread.is_alive()),
            )
        return SessionInfo(self.instance_id, self.state, self.own_jid, extra)

    # ------------------------------------------------------------------ attempts

    def _start_attempt(self) -> None:
        nz = _Neonize.get()
        backend = self.backend
        assert backend.relay is not None
        self._seq += 1
        seq = self._seq
        uuid = f"{self.instance_id}#{seq}-{secrets.token_hex(4)}".encode()
        hold = WriterHold(GO_GATE)
        upstream = self.upstream_proxy or backend.upstream_for(self.instance_id)
        try:
            ticket = backend.relay.issue(self.instance_id, upstream=upstream, on_first_request=hold.release)
        except ValueError as exc:
            raise BackendError(f"instance {self.instance_id}: bad upstream proxy: {exc}") from None
        att = _Attempt(seq=seq, uuid=uuid, ticket=ticket, hold=hold)

        client = nz.NewAClient(str(self.db_path), uuid=uuid.decode())
        client._stop_finalizer.detach()  # its GC hook calls a blocking Stop() on whatever thread
        client._NewAClient__client = _PoolGoCode(self)
        att.client = client

        def on_qr(_uuid: int, data: int) -> None:
            self._from_go(att, "qr", ctypes.string_at(data).decode("utf-8", "replace"))

        def on_login(_uuid: int, data: int) -> None:
            self._from_go(att, "login", ctypes.string_at(data).decode("utf-8", "replace"))

        def on_event(_uuid: bytes, buf: int, size: int, code: int) -> None:
            try:
                cls = nz.INT_TO_EVENT.get(code)
                if cls is None:
                    return
                ev = cls.FromString(ctypes.string_at(buf, size))
            except Exception:  # noqa: BLE001 - never raise into Go
                self.log.exception("neonize %s: undecodable event %s", self.instance_id, code)
                return
            self._from_go(att, "event", ev)

        qr_cb = nz.func_string(on_qr)
        login_cb = nz.func_string(on_login)
        event_cb = nz.func_callback_bytes(on_event)
        log_cb = _log_callback()
        subs = (ctypes.c_char * len(SUBSCRIBED_EVENTS)).from_buffer_copy(SUBSCRIBED_EVENTS)
        props = nz.DeviceProps(os=backend.device_name, platformType=nz.DeviceProps.SAFARI).SerializeToString()
        proxy = nz.ProxySettings(proxy_address=ticket.proxy_url)._to_c_struct()
        db = str(self.db_path).encode()
        level = backend.whatsmeow_log_level.encode()
        att.refs = (qr_cb, login_cb, event_cb, log_cb, subs, props, proxy, db, level)
        att.callbacks = {"qr": qr_cb, "login": login_cb, "event": event_cb}
        loop = self._loop
        gate_wait = max(30.0, backend.connect_timeout_s)

        def run() -> str:
            if not hold.acquire(timeout=gate_wait):
                return "go map gate busy (another client start is stuck)"
            # safety net: the prologue normally ends within ms (relay sees the CONNECT)
            try:
                loop.call_soon_threadsafe(loop.call_later, backend.prologue_max_s, hold.release)
            except RuntimeError:
                pass
            try:
                err = nz.gocode.Neonize(
                    db, uuid, b"", 0, 0, level,
                    qr_cb, login_cb, event_cb, log_cb,
                    subs, len(SUBSCRIBED_EVENTS), props, len(props),
                    b"", 0, ctypes.byref(proxy),
                )
            finally:
                hold.release()
            return (err or b"").decode("utf-8", "replace")

        thread, done = run_in_dedicated_thread(run, name=f"neonize-{self.instance_id}-{seq}", loop=loop)
        att.thread, att.done = thread, done
        backend._live.add(att)
        done.add_done_callback(lambda fut: self._on_thread_done(att, fut))
        att.watchdog = loop.call_later(backend.connect_timeout_s, self._on_watchdog, att)
        self._attempt = att
        self.state = "connecting"

    def _from_go(self, att: _Attempt, kind: str, payload: Any) -> None:
        """Called on a Go thread: any callback proves the Go prologue is over."""
        att.hold.release()
        try:
            self._loop.call_soon_threadsafe(self._on_go, att, kind, payload)
        except RuntimeError:  # loop closed
            pass

    def _on_go(self, att: _Attempt, kind: str, payload: Any) -> None:
        if self._closed:
            return
        if kind == "event":
            jid, push_name = identity_from_event(payload)
            if jid and att is self._attempt:
                self.own_jid = jid
            if push_name and att is self._attempt:
                self.push_name = push_name
            event = map_event(payload, own_jid=self.own_jid, push_name=self.push_name)
        elif kind == "qr":
            event = QrCode(code=payload) if payload else None
        else:
            event = map_login_status(payload)
        if event is None:
            return
        if isinstance(event, InboundMessage):
            # whatsmeow already acknowledged it: deliver even from an abandoned attempt
            self._emit(event)
            return
        if att is not self._attempt or att.terminal:
            return
        if isinstance(event, QrCode):
            att.seen_qr = True
            self._cancel_watchdog(att)
            self.state = "qr"
            self._emit(event)
        elif isinstance(event, Connected):
            att.connected = True
            self._cancel_watchdog(att)
            self.state = "connected"
            self._tighten()
            self._emit(event)
        elif is_terminal(event):
            self._finish(att, event)
        else:
            self._emit(event)

    def _on_watchdog(self, att: _Attempt) -> None:
        att.watchdog = None
        if att is not self._attempt or att.terminal or att.seen_qr or att.connected or self._closed:
            return
        detail = f"no QR and no connection within {self.backend.connect_timeout_s:g} s"
        if att.ticket.last_error:
            detail += f" ({att.ticket.last_error})"
        self._finish(att, Disconnected(reason="connect_timeout", detail=detail))

    def _on_thread_done(self, att: _Attempt, fut: asyncio.Future[Any]) -> None:
        self.backend._live.discard(att)
        if fut.cancelled():
            att.result = "cancelled"
        elif fut.exception() is not None:
            att.result = f"{fut.exception()!r}"
        else:
            att.result = fut.result()
        if att is self._attempt and not att.terminal and not self._closed:
            if att.result:
                detail = att.ticket.last_error or att.result
                self._finish(att, Disconnected(reason="connect_failure", detail=detail[:500]))
            else:
                self._finish(att, Disconnected(reason="network", detail="client stopped"))
        else:
            self._retire(att)

    def _finish(self, att: _Attempt, event: Disconnected | LoggedOut) -> None:
        self._mark_terminal(att)
        self.state = "logged_out" if isinstance(event, LoggedOut) else "disconnected"
        self._emit(event)
        self._retire(att)

    def _mark_terminal(self, att: _Attempt) -> None:
        att.terminal = True
        self._cancel_watchdog(att)

    @staticmethod
    def _cancel_watchdog(att: _Attempt) -> None:
        if att.watchdog is not None:
            att.watchdog.cancel()
            att.watchdog = None

    def _retire(self, att: _Attempt) -> None:
        if att.teardown is None:
            att.teardown = self._loop.create_task(self._teardown(att), name=f"neonize-teardown-{self.instance_id}")

    async def _teardown(self, att: _Attempt) -> None:
        """Abandon an attempt: cut its sockets, stop its Go client, free its thread."""
        backend = self.backend
        nz = _Neonize.get()
        if backend.relay is not None:
            backend.relay.revoke(att.ticket)  # a dial stuck in Go now fails within ms
        assert att.done is not None
        if not att.connected and not att.seen_qr:
            await self._wait(att.done, 1.0)  # the dial returns by itself once its socket is gone
        try:
            # Stop() also removes the client from goneonize's maps: a writer.
            await self._go_call("Stop", lambda: nz.gocode.Stop(att.uuid), timeout=backend.close_timeout_s, writer=True)
        except (CallTimeout, RuntimeError) as exc:
            self.log.warning("neonize %s: Stop failed: %s", self.instance_id, exc)
        if not await self._wait(att.done, backend.close_timeout_s):
            self.log.warning("neonize %s: Go thread %s still blocked after Stop", self.instance_id, att.thread and att.thread.name)
        self._tighten()

    # ------------------------------------------------------------------ helpers

    async def _go_call(self, name: str, fn: Callable[[], Any], *, timeout: float, writer: bool = False) -> Any:
        """Run a short Go call in the bounded pool, through the map gate."""
        backend = self.backend
        pool = backend.pool
        if pool is None:
            raise RuntimeError("backend not started")
        gate_timeout = backend.gate_timeout_s

        def gated() -> Any:
            if writer:
                hold = WriterHold(GO_GATE)
                if not hold.acquire(timeout=gate_timeout):
                    raise CallNotStarted(f"{name}: go map gate busy")
                try:
                    return fn()
                finally:
                    hold.release()
            if not GO_GATE.enter_reader(timeout=gate_timeout):
                raise CallNotStarted(f"{name}: go map gate busy")
            return fn()

        key = f"{self.instance_id}/{'ctl' if writer or name == 'IsConnected' else 'send'}"
        return await pool.call(key, gated, timeout=timeout)

    def _emit(self, event: BackendEvent) -> None:
        self._queue.put_nowait(event)

    async def _run_pump(self) -> None:
        while True:
            event = await self._queue.get()
            try:
                await self._sink(event)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001
                self.log.exception("neonize %s: event sink failed on %r", self.instance_id, event)

    def _tighten(self) -> None:
        try:
            tighten_tree(self.auth_dir)
        except OSError as exc:
            self.log.warning("neonize %s: cannot tighten %s: %s", self.instance_id, self.auth_dir, exc)

    @staticmethod
    async def _wait(aw: "asyncio.Future[Any] | asyncio.Task[Any] | None", timeout: float) -> bool:
        if aw is None:
            return True
        if aw.done():
            return True
        done, _ = await asyncio.wait([aw], timeout=timeout)
        return bool(done)


def _jid_proto(jid: str) -> Any:
    """``user@server`` (device/agent suffix dropped) -> neonize JID protobuf."""
    user, sep, server = jid.strip().rpartition("@")
    if not sep or not user or not server:
        raise ValueError(f"not a JID: {jid!r}")
    user = user.split(":", 1)[0]
    if server == "s.whatsapp.net":
        user = user.split(".", 1)[0]
    return _Neonize.get().build_jid(user, server)


class NeonizeBackend(Backend):
    """Factory of :class:`NeonizeSession` (see module doc).

    ``upstream_proxy``: ``http://[user:pass@]host:port`` for every instance, or a
    callable ``instance_id -> url | None``; None dials WhatsApp directly.
    ``max_threads`` sizes the short-call pool (default 4 per core, 8..64); the
    long-lived ``Neonize()`` calls each get their own thread on top of it.
    """

    name = "neonize"

    def __init__(
        self,
        auth_root: Path,
        *,
        connect_timeout_s: float = 30.0,
        max_threads: int | None = None,
        log: logging.Logger | logging.LoggerAdapter[Any] | None = None,
        upstream_proxy: UpstreamProxy = None,
        send_timeout_s: float = 60.0,
        close_timeout_s: float = 5.0,
        dial_timeout_s: float | None = None,
        device_name: str = "wa-worker",
        whatsmeow_log_level: str = "WARN",
        prologue_max_s: float = 5.0,
        gate_timeout_s: float = 10.0,
    ) -> None:
        super().__init__(Path(auth_root))
        if connect_timeout_s <= 0:
            raise ValueError("connect_timeout_s must be > 0")
        self.connect_timeout_s = connect_timeout_s
        self.max_threads = max_threads
        self.log: Any = log or logging.getLogger("wa_worker.backends.neonize")
        self.upstream_proxy = upstream_proxy
        self.send_timeout_s = send_timeout_s
        self.close_timeout_s = close_timeout_s
        self.dial_timeout_s = dial_timeout_s if dial_timeout_s is not None else min(connect_timeout_s, 20.0)
        self.device_name = device_name
        self.whatsmeow_log_level = whatsmeow_log_level
        self.prologue_max_s = prologue_max_s
        self.gate_timeout_s = gate_timeout_s
        self.relay: ConnectRelay | None = None
        self.pool: CallPool | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._start_lock: asyncio.Lock | None = None
        self._sessions: dict[str, NeonizeSession] = {}
        self._live: set[_Attempt] = set()

    # ------------------------------------------------------------------ lifecycle

    async def _ensure_started(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is loop and self.relay is not None:
            return
        if self._loop is not loop:
            # first start, or reuse from a new event loop: everything bound to the
            # old loop (relay server, sessions, futures) is dead with it
            if self.pool is not None:
                self.pool.shutdown()
            self.relay, self.pool, self._sessions = None, None, {}
            self._loop, self._start_lock = loop, asyncio.Lock()
        assert self._start_lock is not None
        async with self._start_lock:
            if self.relay is not None:
                return
            nz = _Neonize.get()
            # neonize dispatches its own callbacks to this module global, which it
            # sets only once per process; point it at the loop we run in
            nz.aio_events.event_global_loop = loop
            relay = ConnectRelay(dial_timeout_s=self.dial_timeout_s, log=self.log)
            await relay.start()
            self.pool = CallPool(self.max_threads or default_pool_size(), name="wa-neonize")
            self.relay = relay

    async def aclose(self) -> None:
        sessions = list(self._sessions.values())
        if sessions:
            await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
        if self.relay is not None:
            await self.relay.aclose()
            self.relay = None
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None

    def _forget(self, session: NeonizeSession) -> None:
        if self._sessions.get(session.instance_id) is session:
            del self._sessions[session.instance_id]

    # ------------------------------------------------------------------ Backend API

    def upstream_for(self, instance_id: str) -> str | None:
        up = self.upstream_proxy
        return up(instance_id) if callable(up) else up

    def has_session(self, instance_id: str) -> bool:
        """True only for a *paired* store (a device row with a JID).

        Read with Python's sqlite3, read-only: neonize's
        ``ClientFactory.get_all_devices_from_db`` leaks a file descriptor per
        call and creates the database when it is missing. A fresh store (even
        after a failed dial) holds no device row: whatsmeow writes it on
        ``PairSuccess``.
        """
        if not is_valid_instance_id(instance_id):
            return False
        db = self.auth_dir(instance_id) / DB_NAME
        try:
            if db.stat().st_size == 0:
                return False
        except OSError:
            return False
        try:
            conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=2.0)
        except sqlite3.Error:
            return self._has_session_via_neonize(db)
        try:
            row = conn.execute(
                "SELECT 1 FROM whatsmeow_device WHERE jid IS NOT NULL AND jid != '' LIMIT 1"
            ).fetchone()
            return row is not None
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return False
            return self._has_session_via_neonize(db)
        except sqlite3.Error:
            return self._has_session_via_neonize(db)
        finally:
            conn.close()

    def _has_session_via_neonize(self, db: Path) -> bool:
        from neonize.aioze.client import ClientFactory

        try:
            return any(d.JID.User for d in ClientFactory.get_all_devices_from_db(str(db)))
        except Exception:  # noqa: BLE001
            self.log.exception("has_session: cannot read %s", db)
            return False

    async def open_session(self, instance_id: str, sink: EventSink) -> NeonizeSession:
        if not is_valid_instance_id(instance_id):
            raise ValueError(f"invalid instance id {instance_id!r}")
        await self._ensure_started()
        old = self._sessions.get(instance_id)
        if old is not None and not old._closed:
            raise BackendError(f"instance {instance_id} already has an open session")
        session = NeonizeSession(self, instance_id, sink)
        self._sessions[instance_id] = session
        return session

    # ------------------------------------------------------------------ introspection

    def stats(self) -> dict[str, Any]:
        live = [a for a in self._live if a.thread is not None and a.thread.is_alive()]
        self._live = set(live)
        return {
            "sessions": len(self._sessions),
            "go_threads": len(live),
            "pool_size": self.pool.max_workers if self.pool else 0,
            "relay_tickets": len(self.relay.tickets) if self.relay else 0,
        }
