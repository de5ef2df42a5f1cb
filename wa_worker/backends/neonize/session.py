"""One instance's neonize session: attempts, their watchdog and teardown, and
the ordered event pump to the sink (lifecycle: docs/neonize.md)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.from_thread
import anyio.to_thread

from ...fsutil import tighten_tree
from ...messages import Kind
from ..base import (
    BackendError,
    BackendEvent,
    Call,
    Connected,
    Disconnected,
    EventSink,
    InboundMessage,
    LoggedOut,
    MediaFile,
    MediaUnavailable,
    NotConnectedError,
    OutgoingMessage,
    QrCode,
    Receipt,
    SendError,
    Session,
    SessionInfo,
)
from ..base import SessionState as SessionState  # re-exported by the package
from .attempt import MEDIA_CALLS, Attempt, make_callbacks, neonize_call, new_attempt
from .events import identity_from_event, is_terminal, jid_to_str, map_event, map_login_status, own_device_jid
from .gate import gated_call
from .loading import NeonizeLib, jid_proto
from .media import classify_download_error, message_from_handle, write_media
from .outgoing import build_message, is_permanent_send_error
from .store import DB_NAME, prepare_store
from .threads import CallNotStarted, CallTimeout, run_in_dedicated_thread

if TYPE_CHECKING:
    from .backend import NeonizeBackend

#: events waiting for the sink; a full buffer makes the Go callback thread wait
EVENT_BUFFER = 256


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
        self._device: str | None = None  # shared database: the device JID this instance is mapped to
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
            attempt = self._attempt
            if attempt is not None and not attempt.terminal:
                return  # already connecting / waiting for a scan / connected
            if attempt is not None:
                await self._wait_teardown(attempt)
            self.backend.require_started()
            if self._closed:  # closed while we waited
                raise BackendError(f"session {self.instance_id} is closed")
            device: str | None = None
            if self.backend.pg is None:
                prepare_store(self.backend.auth_root, self.auth_dir)
            else:
                device = await self.backend.stored_device(self.instance_id)
                self._device = device
            self._start_attempt(device)

    def _live_attempt(self) -> Attempt:
        attempt = self._attempt
        if self._closed or attempt is None or attempt.terminal or not attempt.connected:
            raise NotConnectedError(f"instance {self.instance_id} is not connected")
        return attempt

    async def send_text(self, to_jid: str, body: str) -> str:
        attempt = self._live_attempt()
        return await self._send_built(attempt, to_jid, NeonizeLib.get().WAMessage(conversation=body))

    async def send(self, message: OutgoingMessage) -> str:
        """Any kind: the media's bytes are read from ``message.media.path`` and
        uploaded by neonize (docs/neonize.md, "Sending")."""
        attempt = self._live_attempt()
        if message.kind is Kind.TEXT and message.reply_to is None:
            return await self.send_text(message.to_jid, message.body)
        data: bytes | None = None
        if message.media is not None:
            try:
                data = await anyio.to_thread.run_sync(message.media.path.read_bytes)
            except OSError as exc:
                raise SendError(f"not sent: cannot read the media file: {exc.strerror or exc}") from None
        lib = NeonizeLib.get()
        try:
            built = await build_message(attempt.client, message, data, self.own_jid)
        except lib.UploadError as exc:
            text = str(exc)
            if "not connected" in text.lower() or "client is nil" in text.lower():
                raise NotConnectedError(f"not sent: {text}") from None
            # 413: WhatsApp's media servers refuse the size (whatsmeow "upload failed with status code 413")
            raise SendError(f"not sent: media upload failed: {text}", permanent="status code 413" in text) from None
        except CallNotStarted as exc:
            raise SendError(f"not sent: {exc}") from None
        except CallTimeout as exc:  # the upload (or a lookup) took too long: nothing was sent
            raise SendError(f"not sent: media upload timed out ({exc})") from None
        except RuntimeError as exc:  # backend closed under us
            raise NotConnectedError(f"not sent: {exc}") from None
        finally:
            data = None  # the upload has its copy: drop ours before the send
        # a reaction belongs to the chat of the message it reacts to
        to = message.reply_to.chat_jid if message.kind is Kind.REACTION and message.reply_to else message.to_jid
        return await self._send_built(self._live_attempt(), to, built)

    async def _send_built(self, attempt: Attempt, to_jid: str, built: Any) -> str:
        lib = NeonizeLib.get()
        try:
            jid = jid_proto(to_jid)
        except ValueError as exc:
            raise SendError(str(exc), permanent=True) from None
        try:
            resp = await attempt.client.send_message(jid, built)
        except lib.SendMessageError as exc:
            text = str(exc)
            if "not connected" in text.lower() or "client is nil" in text.lower():
                raise NotConnectedError(text) from None
            raise SendError(text, permanent=is_permanent_send_error(text)) from None
        except CallNotStarted as exc:
            raise SendError(f"not sent: {exc}") from None
        except RuntimeError as exc:  # backend closed under us
            raise NotConnectedError(f"not sent: {exc}") from None
        except CallTimeout as exc:
            raise SendError(f"send outcome unknown: {exc}") from None
        if not resp.ID:
            raise SendError("WhatsApp returned no message id")
        return str(resp.ID)

    can_lookup_numbers = True

    async def lookup_numbers(self, phones: list[str]) -> dict[str, str | None]:
        """whatsmeow's ``IsOnWhatsApp`` through the pool: a phone → the JID WhatsApp returns, or None
        when it says the number is not registered. Any failure (not connected, offline, timeout) is a
        :class:`BackendError`: "unknown, ask later", never "not on WhatsApp"."""
        from neonize.exc import IsOnWhatsAppError  # neonize loads lazily (an optional dependency)

        attempt = self._live_attempt()
        try:
            answers = await attempt.client.is_on_whatsapp(*[f"+{p}" for p in phones])
        except (CallTimeout, RuntimeError, IsOnWhatsAppError) as exc:  # timed out, pool gone, WhatsApp's error
            raise BackendError(f"number lookup failed: {type(exc).__name__}: {exc}"[:300]) from None
        out: dict[str, str | None] = dict.fromkeys(phones)
        for answer in answers:
            query = str(answer.Query).lstrip("+")
            if query in out and answer.IsIn:
                out[query] = jid_to_str(answer.JID) or f"{query}@s.whatsapp.net"
        return out

    async def pair_phone(self, phone: str) -> str:
        """whatsmeow's ``PairPhone`` through the pool (only while a QR is shown); any failure is a
        :class:`BackendError` (the QR still works)."""
        from neonize.exc import PairPhoneError  # neonize loads lazily (an optional dependency)

        attempt = self._attempt
        if self._closed or attempt is None or attempt.terminal or attempt.connected or attempt.client is None:
            raise BackendError(f"instance {self.instance_id} is not showing a QR")
        try:
            code = await attempt.client.PairPhone(phone, True)
        except (CallTimeout, RuntimeError, PairPhoneError) as exc:  # timed out, pool gone, WhatsApp's error
            raise BackendError(f"pairing code request failed: {type(exc).__name__}: {exc}"[:300]) from None
        return str(code)

    async def send_typing(self, to_jid: str, seconds: float) -> None:
        """``SendChatPresence(composing)`` through the pool; a failure is a :class:`BackendError`."""
        from neonize.exc import SendPresenceError  # neonize loads lazily (an optional dependency)
        from neonize.utils.enum import ChatPresence, ChatPresenceMedia  # (the same)

        attempt = self._live_attempt()
        try:
            await attempt.client.send_chat_presence(jid_proto(to_jid), ChatPresence.CHAT_PRESENCE_COMPOSING,
                                                    ChatPresenceMedia.CHAT_PRESENCE_MEDIA_TEXT)
        except (CallTimeout, RuntimeError, ValueError, SendPresenceError) as exc:  # as in lookup_numbers
            raise BackendError(f"typing indicator failed: {type(exc).__name__}: {exc}"[:300]) from None

    async def reject_call(self, call: Call) -> None:
        """whatsmeow's ``RejectCall`` through the call pool (``send_timeout_s``), on the
        connection that received the offer. Raises :class:`SendError`."""
        attempt = self._live_attempt()
        lib = NeonizeLib.get()
        try:
            jid = jid_proto(call.from_jid)
        except ValueError as exc:
            raise SendError(str(exc), permanent=True) from None
        try:
            await attempt.client.reject_call(jid, call.call_id)
        except lib.RejectCallError as exc:
            raise SendError(f"call not rejected: {exc}") from None
        except (CallNotStarted, CallTimeout) as exc:
            raise SendError(f"call not rejected: {exc}") from None
        except RuntimeError as exc:  # backend closed under us
            raise NotConnectedError(f"call not rejected: {exc}") from None

    async def download_media(self, handle: dict[str, object], dest_dir: Path) -> MediaFile:
        """``download_any`` in the pool (``media_timeout_s``), bytes to a 0600 file."""
        message, sub = message_from_handle(handle)  # a bad handle is permanent, connected or not
        attempt = self._attempt
        if self._closed or attempt is None or attempt.terminal or not attempt.connected:
            raise MediaUnavailable(f"instance {self.instance_id} is not connected", permanent=False)
        lib = NeonizeLib.get()
        try:
            data = await attempt.client.download_any(message)
        except lib.DownloadError as exc:
            raise classify_download_error(str(exc)) from None
        except (CallTimeout, RuntimeError) as exc:  # timed out, pool busy, backend closed
            raise MediaUnavailable(f"download not done: {exc}", permanent=False) from None
        if not data:
            raise MediaUnavailable("download returned no bytes", permanent=False)
        try:
            return await anyio.to_thread.run_sync(write_media, data, sub, dest_dir)
        except OSError as exc:
            raise MediaUnavailable(f"cannot store the media: {exc.strerror or exc}", permanent=False) from None

    async def disconnect(self) -> None:
        async with self._lock:
            attempt = self._attempt
            if self.state not in (SessionState.CLOSED, SessionState.LOGGED_OUT):
                self.state = SessionState.DISCONNECTED
            if attempt is not None:
                self._abandon(attempt)
                await self._wait_teardown(attempt)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            with anyio.fail_after(self.backend.close_timeout_s + 1.0):
                attempt = self._attempt
                if attempt is not None:
                    self._abandon(attempt)
                    await self._wait_teardown(attempt)
        except TimeoutError:
            self.log.warning("neonize %s: close timed out, abandoning its thread", self.instance_id)
        finally:
            self.state = SessionState.CLOSED
            self._send.close()  # the pump delivers what is buffered, then ends
            self.backend.forget(self)

    def info(self) -> SessionInfo:
        attempt = self._attempt
        extra: dict[str, object] = {"attempts": self._seq}
        if attempt is not None:
            t = attempt.ticket
            extra.update(
                relay_connections=t.connections,
                bytes_up=t.bytes_up,
                bytes_down=t.bytes_down,
                relay_error=t.last_error,
                thread_alive=bool(attempt.thread and attempt.thread.is_alive()),
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

    def _start_attempt(self, device: str | None = None) -> None:
        backend = self.backend
        self._seq += 1
        shared = backend.pg is not None
        db = backend.pg.go_dsn if backend.pg is not None else str(self.db_path)
        try:
            upstream = self.upstream_proxy or backend.upstream_for(self.instance_id)
            attempt = new_attempt(backend, self.instance_id, self._seq, db, upstream, self._go_call)
        except ValueError as exc:
            raise BackendError(f"instance {self.instance_id}: bad upstream proxy: {exc}") from None
        attempt.callbacks = make_callbacks(attempt, self._deliver, self.log, self.instance_id)
        attempt.thread = run_in_dedicated_thread(
            neonize_call(attempt, backend, db, functools.partial(self._arm_prologue_net, attempt), device, shared),
            name=f"neonize-{self.instance_id}-{attempt.seq}",
            on_done=functools.partial(self._thread_done, attempt),
            token=backend.token,
        )
        backend.live.add(attempt)
        attempt.watchdog = anyio.CancelScope()
        backend.task_group.start_soon(self._watch, attempt, attempt.watchdog, name=f"neonize-watchdog-{self.instance_id}")
        self._attempt = attempt
        self.state = SessionState.CONNECTING

    def _arm_prologue_net(self, attempt: Attempt) -> None:
        """On the attempt's thread, gate held: release it after ``prologue_max_s``."""

        async def release_later() -> None:
            await anyio.sleep(self.backend.prologue_max_s)
            attempt.hold.release()

        def arm() -> None:
            tg = self.backend.task_group_or_none
            if tg is not None:
                tg.start_soon(release_later, name=f"neonize-prologue-{self.instance_id}")

        try:
            anyio.from_thread.run_sync(arm, token=self.backend.token)
        except Exception:  # noqa: BLE001 - loop gone: the call's own end releases the hold
            pass

    def _deliver(self, attempt: Attempt, kind: str, payload: Any) -> None:
        """On a Go thread: any callback proves the Go prologue is over. Waits until
        the loop took the event (and the event buffer had room)."""
        attempt.hold.release()
        try:
            anyio.from_thread.run(self._on_go, attempt, kind, payload, token=self.backend.token)
        except Exception:  # noqa: BLE001 - never raise into Go (loop gone, session closed)
            pass

    async def _on_go(self, attempt: Attempt, kind: str, payload: Any) -> None:
        if self._closed:
            return
        if kind == "event" and self.backend.pg is not None and attempt is self._attempt:
            await self._remember_device(payload)
        event = self._map(attempt, kind, payload)
        if event is None:
            return
        if isinstance(event, (InboundMessage, Receipt, Call)):
            # whatsmeow already acknowledged it: deliver even from an abandoned attempt
            await self._emit(event)
            return
        if attempt is not self._attempt or attempt.terminal:
            return
        if isinstance(event, QrCode):
            attempt.seen_qr = True
            self._cancel_watchdog(attempt)
            self.state = SessionState.QR
        elif isinstance(event, Connected):
            attempt.connected = True
            self._cancel_watchdog(attempt)
            self.state = SessionState.CONNECTED
            self._tighten()
        elif is_terminal(event):
            assert isinstance(event, (Disconnected, LoggedOut))
            await self._finish(attempt, event)
            return
        await self._emit(event)

    def _map(self, attempt: Attempt, kind: str, payload: Any) -> BackendEvent | None:
        if kind == "qr":
            return QrCode(code=payload) if payload else None
        if kind == "login":
            return map_login_status(payload)
        jid, push_name = identity_from_event(payload)
        if jid and attempt is self._attempt:
            self.own_jid = jid
        if push_name and attempt is self._attempt:
            self.push_name = push_name
        return map_event(payload, own_jid=self.own_jid, push_name=self.push_name)

    async def _watch(self, attempt: Attempt, scope: anyio.CancelScope) -> None:
        """Abandon an attempt that shows neither a QR nor a connection in time."""
        with scope:
            await anyio.sleep(self.backend.connect_timeout_s)
        if scope.cancel_called:
            return
        attempt.watchdog = None
        if attempt is not self._attempt or attempt.terminal or attempt.seen_qr or attempt.connected or self._closed:
            return
        detail = f"no QR and no connection within {self.backend.connect_timeout_s:g} s"
        if attempt.ticket.last_error:
            detail += f" ({attempt.ticket.last_error})"
        await self._finish(attempt, Disconnected(reason="connect_timeout", detail=detail))

    async def _thread_done(self, attempt: Attempt, ok: bool, value: Any) -> None:
        """On the loop, when the attempt's ``Neonize()`` call returned."""
        self.backend.live.discard(attempt)
        attempt.result = str(value) if ok else repr(value)
        attempt.done.set()
        if attempt is not self._attempt or attempt.terminal or self._closed:
            self._retire(attempt)
        elif attempt.result:
            detail = attempt.ticket.last_error or attempt.result
            await self._finish(attempt, Disconnected(reason="connect_failure", detail=detail[:500]))
        else:
            await self._finish(attempt, Disconnected(reason="network", detail="client stopped"))

    async def _finish(self, attempt: Attempt, event: Disconnected | LoggedOut) -> None:
        self.state = SessionState.LOGGED_OUT if isinstance(event, LoggedOut) else SessionState.DISCONNECTED
        self._abandon(attempt)
        await self._emit(event)

    def _abandon(self, attempt: Attempt) -> None:
        """Make ``attempt`` terminal (no more events from it) and start its teardown."""
        attempt.terminal = True
        self._cancel_watchdog(attempt)
        self._retire(attempt)

    @staticmethod
    def _cancel_watchdog(attempt: Attempt) -> None:
        if attempt.watchdog is not None:
            attempt.watchdog.cancel()
            attempt.watchdog = None

    def _retire(self, attempt: Attempt) -> None:
        if attempt.teardown is not None:
            return
        attempt.teardown = anyio.Event()
        tg = self.backend.task_group_or_none
        if tg is None:  # the backend has stopped: its relay already cut every ticket
            attempt.teardown.set()
            return
        tg.start_soon(self._teardown, attempt, name=f"neonize-teardown-{self.instance_id}")

    async def _teardown(self, attempt: Attempt) -> None:
        """Abandon an attempt: cut its sockets, stop its Go client, free its thread."""
        backend = self.backend
        assert attempt.teardown is not None
        try:
            if backend.relay is not None:
                backend.relay.revoke(attempt.ticket)  # a dial stuck in Go now fails within ms
            if not attempt.connected and not attempt.seen_qr:
                with anyio.move_on_after(1.0):  # the dial returns by itself once its socket is gone
                    await attempt.done.wait()
            gocode = NeonizeLib.get().gocode
            try:
                # Stop() also removes the client from goneonize's maps: a writer.
                await self._go_call("Stop", lambda: gocode.Stop(attempt.uuid), timeout_s=backend.close_timeout_s,
                                    writer=True)
            except (CallTimeout, RuntimeError) as exc:
                self.log.warning("neonize %s: Stop failed: %s", self.instance_id, exc)
            with anyio.move_on_after(backend.close_timeout_s):
                await attempt.done.wait()
            if not attempt.done.is_set():
                self.log.warning("neonize %s: Go thread %s still blocked after Stop", self.instance_id,
                                 attempt.thread and attempt.thread.name)
            self._tighten()
        finally:
            attempt.teardown.set()

    async def _wait_teardown(self, attempt: Attempt) -> None:
        if attempt.teardown is not None:
            with anyio.move_on_after(self.backend.close_timeout_s):
                await attempt.teardown.wait()

    # ------------------------------------------------------------------ helpers

    async def _go_call(self, name: str, fn: Callable[[], Any], *, timeout_s: float, writer: bool = False) -> Any:
        """Run a short Go call in the bounded pool, through the map gate."""
        pool = self.backend.pool
        if pool is None:
            raise RuntimeError("backend not started")
        lane = "ctl" if writer or name == "IsConnected" else "media" if name in MEDIA_CALLS else "send"
        key = f"{self.instance_id}/{lane}"
        return await gated_call(pool, key, name, fn, timeout_s=timeout_s, gate_timeout=self.backend.gate_timeout_s,
                                writer=writer)

    async def _emit(self, event: BackendEvent) -> None:
        try:
            await self._send.send(event)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass  # the session closed: nobody listens any more

    async def _remember_device(self, ev: Any) -> None:
        """Shared database: map this instance to the device JID Go announced
        (PairStatus success, and the own-``Device`` event of every connection)."""
        jid = own_device_jid(ev)
        if jid is None or jid == self._device:
            return
        try:
            await self.backend.remember_device(self.instance_id, jid)
        except BackendError as exc:  # the next connection's Device event tries again
            self.log.error("neonize %s: the paired device is not recorded: %s", self.instance_id, exc)
            return
        self._device = jid

    def _tighten(self) -> None:
        if self.backend.pg is not None:
            return  # no session files: the session lives in PostgreSQL
        try:
            tighten_tree(self.auth_dir)
        except OSError as exc:
            self.log.warning("neonize %s: cannot tighten %s: %s", self.instance_id, self.auth_dir, exc)
