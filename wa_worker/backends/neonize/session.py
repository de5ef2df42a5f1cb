"""One instance's neonize session: attempts, their watchdog and teardown, and
the ordered event pump to the sink (lifecycle: docs/neonize.md)."""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.from_thread

from ...fsutil import tighten_tree
from ..base import (
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
from .attempt import Attempt, make_callbacks, neonize_call, new_attempt
from .events import identity_from_event, is_terminal, map_event, map_login_status
from .gate import gated_call
from .loading import NeonizeLib, jid_proto
from .store import DB_NAME, prepare_store
from .threads import CallNotStarted, CallTimeout, run_in_dedicated_thread

if TYPE_CHECKING:
    from .backend import NeonizeBackend

#: events waiting for the sink; a full buffer makes the Go callback thread wait
EVENT_BUFFER = 256


class SessionState(enum.StrEnum):
    IDLE = "idle"
    CONNECTING = "connecting"
    QR = "qr"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    LOGGED_OUT = "logged_out"
    CLOSED = "closed"


class NeonizeSession(Session):
    """One instance's neonize connection; one Go client per attempt."""

    def __init__(self, backend: "NeonizeBackend", instance_id: str, sink: EventSink) -> None:
        self.backend = backend
        self.instance_id = instance_id
        self._sink = sink
        self._send, self._receive = anyio.create_memory_object_stream[BackendEvent](EVENT_BUFFER)
        self._lock = anyio.Lock()
        self._attempt: Attempt | None = None
        self._seq = 0
        self._closed = False
        self.state = SessionState.IDLE
        self.own_jid: str | None = None
        self.push_name: str | None = None
        self.upstream_proxy: str | None = None  # overrides the backend's choice when set
        self.log = backend.log

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def auth_dir(self) -> Path:
        return self.backend.auth_dir(self.instance_id)

    @property
    def db_path(self) -> Path:
        return self.auth_dir / DB_NAME

    # ------------------------------------------------------------------ public API

    async def connect(self) -> None:
        async with self._lock:
            if self._closed:
                raise BackendError(f"session {self.instance_id} is closed")
            att = self._attempt
            if att is not None and not att.terminal:
                return  # already connecting / waiting for a scan / connected
            if att is not None:
                await self._wait_teardown(att)
            self.backend.require_started()
            if self._closed:  # closed while we waited
                raise BackendError(f"session {self.instance_id} is closed")
            prepare_store(self.backend.auth_root, self.auth_dir)
            self._start_attempt()

    async def send_text(self, to_jid: str, body: str) -> str:
        att = self._attempt
        if self._closed or att is None or att.terminal or not att.connected:
            raise NotConnectedError(f"instance {self.instance_id} is not connected")
        nz = NeonizeLib.get()
        try:
            jid = jid_proto(to_jid)
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
        return str(resp.ID)

    async def is_connected(self) -> bool:
        """whatsmeow's own view (a Go call in the pool); False when no client."""
        att = self._attempt
        if att is None or att.terminal:
            return False
        gocode = NeonizeLib.get().gocode
        try:
            return bool(await self._go_call("IsConnected", lambda: gocode.IsConnected(att.uuid), timeout_s=5.0))
        except CallTimeout:
            return False

    async def disconnect(self) -> None:
        async with self._lock:
            att = self._attempt
            if self.state not in (SessionState.CLOSED, SessionState.LOGGED_OUT):
                self.state = SessionState.DISCONNECTED
            if att is not None:
                self._abandon(att)
                await self._wait_teardown(att)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            with anyio.fail_after(self.backend.close_timeout_s + 1.0):
                att = self._attempt
                if att is not None:
                    self._abandon(att)
                    await self._wait_teardown(att)
        except TimeoutError:
            self.log.warning("neonize %s: close timed out, abandoning its thread", self.instance_id)
        finally:
            self.state = SessionState.CLOSED
            self._send.close()  # the pump delivers what is buffered, then ends
            self.backend.forget(self)

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
        return SessionInfo(self.instance_id, self.state.value, self.own_jid, extra)

    async def run_pump(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Await the sink for each event, in order (a task of the backend's group)."""
        async with self._receive:
            task_status.started()
            async for event in self._receive:
                try:
                    await self._sink(event)
                except Exception:  # noqa: BLE001 - a failing sink must not stop the pump
                    self.log.exception("neonize %s: event sink failed on %r", self.instance_id, event)

    # ------------------------------------------------------------------ attempts

    def _start_attempt(self) -> None:
        backend = self.backend
        self._seq += 1
        upstream = self.upstream_proxy or backend.upstream_for(self.instance_id)
        try:
            att = new_attempt(backend, self.instance_id, self._seq, self.db_path, upstream, self._go_call)
        except ValueError as exc:
            raise BackendError(f"instance {self.instance_id}: bad upstream proxy: {exc}") from None
        att.callbacks = make_callbacks(att, self._deliver, self.log, self.instance_id)
        att.thread = run_in_dedicated_thread(
            neonize_call(att, backend, self.db_path, functools.partial(self._arm_prologue_net, att)),
            name=f"neonize-{self.instance_id}-{att.seq}",
            on_done=functools.partial(self._thread_done, att),
            token=backend.token,
        )
        backend.live.add(att)
        att.watchdog = anyio.CancelScope()
        backend.task_group.start_soon(self._watch, att, att.watchdog, name=f"neonize-watchdog-{self.instance_id}")
        self._attempt = att
        self.state = SessionState.CONNECTING

    def _arm_prologue_net(self, att: Attempt) -> None:
        """On the attempt's thread, gate held: release it after ``prologue_max_s``."""

        async def release_later() -> None:
            await anyio.sleep(self.backend.prologue_max_s)
            att.hold.release()

        def arm() -> None:
            tg = self.backend.task_group_or_none
            if tg is not None:
                tg.start_soon(release_later, name=f"neonize-prologue-{self.instance_id}")

        try:
            anyio.from_thread.run_sync(arm, token=self.backend.token)
        except Exception:  # noqa: BLE001 - loop gone: the call's own end releases the hold
            pass

    def _deliver(self, att: Attempt, kind: str, payload: Any) -> None:
        """On a Go thread: any callback proves the Go prologue is over. Waits until
        the loop took the event (and the event buffer had room)."""
        att.hold.release()
        try:
            anyio.from_thread.run(self._on_go, att, kind, payload, token=self.backend.token)
        except Exception:  # noqa: BLE001 - never raise into Go (loop gone, session closed)
            pass

    async def _on_go(self, att: Attempt, kind: str, payload: Any) -> None:
        if self._closed:
            return
        event = self._map(att, kind, payload)
        if event is None:
            return
        if isinstance(event, InboundMessage):
            # whatsmeow already acknowledged it: deliver even from an abandoned attempt
            await self._emit(event)
            return
        if att is not self._attempt or att.terminal:
            return
        if isinstance(event, QrCode):
            att.seen_qr = True
            self._cancel_watchdog(att)
            self.state = SessionState.QR
        elif isinstance(event, Connected):
            att.connected = True
            self._cancel_watchdog(att)
            self.state = SessionState.CONNECTED
            self._tighten()
        elif is_terminal(event):
            assert isinstance(event, (Disconnected, LoggedOut))
            await self._finish(att, event)
            return
        await self._emit(event)

    def _map(self, att: Attempt, kind: str, payload: Any) -> BackendEvent | None:
        if kind == "qr":
            return QrCode(code=payload) if payload else None
        if kind == "login":
            return map_login_status(payload)
        jid, push_name = identity_from_event(payload)
        if jid and att is self._attempt:
            self.own_jid = jid
        if push_name and att is self._attempt:
            self.push_name = push_name
        return map_event(payload, own_jid=self.own_jid, push_name=self.push_name)

    async def _watch(self, att: Attempt, scope: anyio.CancelScope) -> None:
        """Abandon an attempt that shows neither a QR nor a connection in time."""
        with scope:
            await anyio.sleep(self.backend.connect_timeout_s)
        if scope.cancel_called:
            return
        att.watchdog = None
        if att is not self._attempt or att.terminal or att.seen_qr or att.connected or self._closed:
            return
        detail = f"no QR and no connection within {self.backend.connect_timeout_s:g} s"
        if att.ticket.last_error:
            detail += f" ({att.ticket.last_error})"
        await self._finish(att, Disconnected(reason="connect_timeout", detail=detail))

    async def _thread_done(self, att: Attempt, ok: bool, value: Any) -> None:
        """On the loop, when the attempt's ``Neonize()`` call returned."""
        self.backend.live.discard(att)
        att.result = str(value) if ok else repr(value)
        att.done.set()
        if att is not self._attempt or att.terminal or self._closed:
            self._retire(att)
        elif att.result:
            detail = att.ticket.last_error or att.result
            await self._finish(att, Disconnected(reason="connect_failure", detail=detail[:500]))
        else:
            await self._finish(att, Disconnected(reason="network", detail="client stopped"))

    async def _finish(self, att: Attempt, event: Disconnected | LoggedOut) -> None:
        self.state = SessionState.LOGGED_OUT if isinstance(event, LoggedOut) else SessionState.DISCONNECTED
        self._abandon(att)
        await self._emit(event)

    def _abandon(self, att: Attempt) -> None:
        """Make ``att`` terminal (no more events from it) and start its teardown."""
        att.terminal = True
        self._cancel_watchdog(att)
        self._retire(att)

    @staticmethod
    def _cancel_watchdog(att: Attempt) -> None:
        if att.watchdog is not None:
            att.watchdog.cancel()
            att.watchdog = None

    def _retire(self, att: Attempt) -> None:
        if att.teardown is not None:
            return
        att.teardown = anyio.Event()
        tg = self.backend.task_group_or_none
        if tg is None:  # the backend has stopped: its relay already cut every ticket
            att.teardown.set()
            return
        tg.start_soon(self._teardown, att, name=f"neonize-teardown-{self.instance_id}")

    async def _teardown(self, att: Attempt) -> None:
        """Abandon an attempt: cut its sockets, stop its Go client, free its thread."""
        backend = self.backend
        assert att.teardown is not None
        try:
            if backend.relay is not None:
                backend.relay.revoke(att.ticket)  # a dial stuck in Go now fails within ms
            if not att.connected and not att.seen_qr:
                with anyio.move_on_after(1.0):  # the dial returns by itself once its socket is gone
                    await att.done.wait()
            gocode = NeonizeLib.get().gocode
            try:
                # Stop() also removes the client from goneonize's maps: a writer.
                await self._go_call("Stop", lambda: gocode.Stop(att.uuid), timeout_s=backend.close_timeout_s,
                                    writer=True)
            except (CallTimeout, RuntimeError) as exc:
                self.log.warning("neonize %s: Stop failed: %s", self.instance_id, exc)
            with anyio.move_on_after(backend.close_timeout_s):
                await att.done.wait()
            if not att.done.is_set():
                self.log.warning("neonize %s: Go thread %s still blocked after Stop", self.instance_id,
                                 att.thread and att.thread.name)
            self._tighten()
        finally:
            att.teardown.set()

    async def _wait_teardown(self, att: Attempt) -> None:
        if att.teardown is not None:
            with anyio.move_on_after(self.backend.close_timeout_s):
                await att.teardown.wait()

    # ------------------------------------------------------------------ helpers

    async def _go_call(self, name: str, fn: Callable[[], Any], *, timeout_s: float, writer: bool = False) -> Any:
        """Run a short Go call in the bounded pool, through the map gate."""
        pool = self.backend.pool
        if pool is None:
            raise RuntimeError("backend not started")
        key = f"{self.instance_id}/{'ctl' if writer or name == 'IsConnected' else 'send'}"
        return await gated_call(pool, key, name, fn, timeout_s=timeout_s, gate_timeout=self.backend.gate_timeout_s,
                                writer=writer)

    async def _emit(self, event: BackendEvent) -> None:
        try:
            await self._send.send(event)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass  # the session closed: nobody listens any more

    def _tighten(self) -> None:
        try:
            tighten_tree(self.auth_dir)
        except OSError as exc:
            self.log.warning("neonize %s: cannot tighten %s: %s", self.instance_id, self.auth_dir, exc)
