"""One connection attempt: a fresh Go client under a fresh uuid, its ctypes
callbacks, and the blocking ``Neonize()`` call run in its own thread
(docs/neonize.md, "One attempt, one Go client")."""

from __future__ import annotations

import ctypes
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio

from .connect_relay import RelayTicket
from .events import parse_device_jid
from .gate import GO_GATE, WriterHold
from .loading import NeonizeLib, log_callback

if TYPE_CHECKING:
    from .backend import NeonizeBackend

#: neonize event codes we subscribe to (0 = own Device, always sent).
#: 1 (QR list) is left out on purpose: codes arrive one by one via the QR callback.
#: 18 Receipt, 36 CallOffer, 44 UndecryptableMessage (issue #12).
SUBSCRIBED_EVENTS = bytes([2, 3, 6, 7, 8, 9, 10, 11, 12, 17, 18, 36, 44])

#: called on a Go thread with (attempt, kind: "qr" | "login" | "event", payload)
Deliver = Callable[["Attempt", str, Any], None]


@dataclass(eq=False)
class Attempt:
    seq: int
    uuid: bytes
    ticket: RelayTicket
    hold: WriterHold
    client: Any = None
    refs: tuple[Any, ...] = ()  # ctypes objects Go points at: alive until the thread ends
    callbacks: dict[str, Any] = field(default_factory=dict)  # the exact entry points Go calls
    thread: threading.Thread | None = None
    done: anyio.Event = field(default_factory=anyio.Event)  # the Neonize() thread ended
    terminal: bool = False
    seen_qr: bool = False
    connected: bool = False
    watchdog: anyio.CancelScope | None = None
    teardown: anyio.Event | None = None  # set when the teardown finished (None: not started)
    result: str | None = None


#: Go calls that move media bytes: their own timeout (``media_timeout_s``)
MEDIA_CALLS = frozenset({"Upload", "DownloadAny", "DownloadMediaWithPath"})


class PoolGoCode:
    """Stands in for neonize's ``async_gocode`` inside a ``NewAClient``: every FFI
    call runs in the backend's bounded pool, entering Go through the gate.
    Media transfers (:data:`MEDIA_CALLS`) get ``media_timeout`` instead of ``timeout``."""

    def __init__(self, go_call: Callable[..., Any], timeout: float, media_timeout: float | None = None) -> None:
        self._go_call = go_call
        self._timeout = timeout
        self._media_timeout = media_timeout if media_timeout is not None else timeout

    def __getattr__(self, name: str) -> Callable[..., Any]:
        timeout = self._media_timeout if name in MEDIA_CALLS else self._timeout

        def call(*args: Any) -> Any:
            fn = getattr(NeonizeLib.get().gocode, name)
            return self._go_call(name, lambda: fn(*args), timeout_s=timeout)

        return call


def new_attempt(
    backend: "NeonizeBackend",
    instance_id: str,
    seq: int,
    db: str,
    upstream: str | None,
    go_call: Callable[..., Any],
) -> Attempt:
    """A relay ticket and a ``NewAClient`` (kept for its API: ``send_message`` ...)
    whose Go dispatcher is the bounded pool; raises ValueError on a bad upstream."""
    assert backend.relay is not None
    nz = NeonizeLib.get()
    uuid = f"{instance_id}#{seq}-{secrets.token_hex(4)}".encode()
    hold = WriterHold(GO_GATE)
    ticket = backend.relay.issue(instance_id, upstream=upstream, on_first_request=hold.release)
    att = Attempt(seq=seq, uuid=uuid, ticket=ticket, hold=hold)
    client = nz.NewAClient(db, uuid=uuid.decode())
    client._stop_finalizer.detach()  # its GC hook calls a blocking Stop() on whatever thread
    client._NewAClient__client = PoolGoCode(go_call, backend.send_timeout_s, backend.media_timeout_s)
    att.client = client
    return att


def make_callbacks(att: Attempt, deliver: Deliver, log: Any, instance_id: str) -> dict[str, Any]:
    """The ctypes callbacks Go calls for this attempt (QR, login status, events)."""
    nz = NeonizeLib.get()

    def on_qr(_uuid: int, data: int) -> None:
        deliver(att, "qr", ctypes.string_at(data).decode("utf-8", "replace"))

    def on_login(_uuid: int, data: int) -> None:
        deliver(att, "login", ctypes.string_at(data).decode("utf-8", "replace"))

    def on_event(_uuid: bytes, buf: int, size: int, code: int) -> None:
        try:
            cls = nz.INT_TO_EVENT.get(code)
            if cls is None:
                return
            ev = cls.FromString(ctypes.string_at(buf, size))
        except Exception:  # noqa: BLE001 - never raise into Go
            log.exception("neonize %s: undecodable event %s", instance_id, code)
            return
        deliver(att, "event", ev)

    return {
        "qr": nz.func_string(on_qr),
        "login": nz.func_string(on_login),
        "event": nz.func_callback_bytes(on_event),
    }


def device_selector(device: str | None, shared: bool) -> tuple[bytes, int]:
    """How ``Neonize()`` picks the device: (serialized JID, new_device flag).

    A file of its own (``shared`` False) holds at most one device: "the first
    stored" (b"", 0). In a shared database: the instance's own device by JID,
    or a brand-new one (b"", 1), never "the first stored" (someone else's)."""
    if device is None:
        return b"", 1 if shared else 0
    user, server, dev, agent = parse_device_jid(device)
    jid = NeonizeLib.get().pb.JID(User=user, Server=server, Device=dev, RawAgent=agent, Integrator=0, IsEmpty=False)
    return jid.SerializeToString(), 0


def neonize_call(
    att: Attempt, backend: "NeonizeBackend", db: str, arm_net: Callable[[], None],
    device: str | None = None, shared: bool = False,
) -> Callable[[], str]:
    """The blocking ``Neonize()`` call of ``att`` (returns its error text, "" = clean stop).
    ``db``: a SQLite path or a postgres DSN; ``device``/``shared``: see :func:`device_selector`.

    It is a Go-map writer until its prologue ends: the first relay request or
    callback releases ``att.hold``; ``arm_net()`` (called once the hold is taken)
    releases it after ``prologue_max_s`` whatever happens."""
    nz = NeonizeLib.get()
    cb = att.callbacks
    log_cb = log_callback()
    subs = (ctypes.c_char * len(SUBSCRIBED_EVENTS)).from_buffer_copy(SUBSCRIBED_EVENTS)
    props = nz.DeviceProps(os=backend.device_name, platformType=nz.DeviceProps.SAFARI).SerializeToString()
    proxy = nz.ProxySettings(proxy_address=att.ticket.proxy_url)._to_c_struct()
    db_name = db.encode()
    jidbuf, new_device = device_selector(device, shared)
    level = backend.whatsmeow_log_level.encode()
    att.refs = (cb["qr"], cb["login"], cb["event"], log_cb, subs, props, proxy, db_name, jidbuf, level)
    gate_wait = max(30.0, backend.connect_timeout_s)

    def run() -> str:
        if not att.hold.acquire(timeout=gate_wait):
            return "go map gate busy (another client start is stuck)"
        arm_net()
        try:
            err = nz.gocode.Neonize(
                db_name, att.uuid, jidbuf, len(jidbuf), new_device, level,
                cb["qr"], cb["login"], cb["event"], log_cb,
                subs, len(SUBSCRIBED_EVENTS), props, len(props),
                b"", 0, ctypes.byref(proxy),
            )
        finally:
            att.hold.release()
        return (err or b"").decode("utf-8", "replace")

    return run
