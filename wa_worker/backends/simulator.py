"""An in-process fake WhatsApp network.

It behaves like the real backend where the worker can tell: sessions are stored
under ``AUTH_DIR/<id>/`` (so a restarted worker resumes them without a QR) or, with
``DATABASE_URL``, in PostgreSQL (``simstore``: any worker on the database resumes them), an
unpaired session shows rotating QR codes until the phone "scans", events arrive
asynchronously, sends can fail, the network can drop and the phone can unlink
the device. Every delivered message (any kind) is appended to
``AUTH_DIR/<id>/simulator-sent.jsonl`` so tests can count deliveries across
restarts and crashes: ``to``, ``type``, ``body``, ``wa_message_id``, ``ts``, and
as the kind has them ``mimetype``, ``size`` and ``sha256`` of the bytes it read,
``filename``, ``seconds``, ``reply_to`` (+ ``reply_to_chat``), ``reaction``,
``latitude``/``longitude``/``name``/``address``, ``contact: {name, vcard}``, and
``typing_s`` when "typing…" was shown first. ``to`` is the JID the worker resolved.
Each session's time online is appended to ``AUTH_DIR/<id>/simulator-sessions.jsonl``
(``{"event": "up"|"down", "ts", "pid"}``: "up" written before the session can send,
"down" after it no longer can), so a fleet test can check that an instance was
never online on two workers at once.
The numbers that exist can be set (:meth:`SimulatorBackend.set_registered`; none
set: every number exists); a Brazilian mobile registered without its 9th digit
is found when looked up with it, as on WhatsApp. Lookups are counted. Received media is kept under
``AUTH_DIR/<id>/simulator-media/<sha256>`` (what WhatsApp's servers would hold)
and downloaded from there, only while the session is connected. Each connect
records the upstream proxy it would dial through (``connect_proxies``: "direct"
or the redacted ``proxy_url``; an unusable one fails the connect as on neonize). The phone's side can
also report receipts of sent messages, call (rejects are recorded in
``rejected_calls``) and ban the account for a while (connects are refused until then).

It is driven through the worker's HTTP server (``/simulator/...``, see
``wa_worker.http.simulator_routes``) or directly from tests.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import signal
import tempfile
import time
from dataclasses import dataclass
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import anyio

from ..fsutil import FILE_MODE, append_private, ensure_private_dir, write_private
from ..ids import LID_SERVER, USER_SERVER, is_group_jid, is_valid_instance_id, normalize_recipient
from ..messages import MEDIA_KINDS, ContactCard, InboundContent, Kind, Location, MediaInfo
from ..upstream import parse_proxy_url
from .simstore import SimulatorPgStore, SimulatorStoreUnavailable
from .base import (
    Backend,
    BackendError,
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
    ReceiptStatus,
    SendError,
    Session,
    SessionState,
)

log = logging.getLogger("wa_worker.simulator")

SESSION_FILE = "simulator-session.json"
SENT_FILE = "simulator-sent.jsonl"
SESSIONS_FILE = "simulator-sessions.jsonl"
MEDIA_DIR = "simulator-media"
_SHA256_HEX = frozenset("0123456789abcdef")


class SimulatorError(Exception):
    """A control request that does not fit the instance's state (HTTP 409)."""


@dataclass
class _Phone:
    """What the simulated WhatsApp servers know about one linked device."""

    jid: str
    push_name: str


def _fake_phone(instance_id: str) -> str:
    digest = int(hashlib.sha256(instance_id.encode()).hexdigest(), 16)
    return "55119" + str(digest % 10**8).zfill(8)


class SimulatorSession(Session):
    def __init__(self, backend: "SimulatorBackend", instance_id: str, sink: EventSink) -> None:
        self.backend = backend
        self.instance_id = instance_id
        self.sink = sink
        self.state = SessionState.IDLE
        self.qr: str | None = None
        self.qr_count = 0
        self.jid: str | None = None
        self._cancel: anyio.CancelScope | None = None
        self._scanned = anyio.Event()
        self.pair_code: str | None = None  # the latest code pair_phone gave (entered on the phone)
        self._typing: dict[str, float] = {}  # chat → seconds of "typing…" shown before its next message

    # ---------------------------------------------------------------- Session API

    can_lookup_numbers = True

    async def lookup_numbers(self, phones: list[str]) -> dict[str, str | None]:
        if self.state != SessionState.CONNECTED:
            raise NotConnectedError(f"simulator session {self.instance_id} is {self.state}")
        self.backend.lookups[self.instance_id] += 1
        return {p: self.backend.registered_jid(p) for p in phones}

    async def pair_phone(self, phone: str) -> str:
        if self.state != SessionState.QR:
            raise NotConnectedError(f"no pairing in progress: instance is {self.state}")
        self.backend.pair_requests[self.instance_id] += 1
        raw = secrets.token_hex(4).upper()
        self.pair_code = f"{raw[:4]}-{raw[4:]}"
        return self.pair_code

    async def send_typing(self, to_jid: str, seconds: float) -> None:
        if self.state != SessionState.CONNECTED:
            raise NotConnectedError(f"simulator session {self.instance_id} is {self.state}")
        self._typing[to_jid] = seconds

    async def connect(self) -> None:
        if self.state == SessionState.CLOSED:
            raise SendError("session closed")
        try:  # the upstream proxy this connect would dial through (recorded redacted)
            proxy = self.backend.instance_proxy(self.instance_id)
        except ValueError as exc:
            raise BackendError(f"instance {self.instance_id}: bad upstream proxy: {exc}") from None
        self.backend.connect_proxies[self.instance_id].append(
            parse_proxy_url(proxy).redacted if proxy is not None else "direct")
        self._scanned = anyio.Event()
        self.state = SessionState.CONNECTING
        self.backend._spawn(self._connect_flow)

    async def _connect_flow(self) -> None:
        await anyio.sleep(self.backend.connect_delay_s)
        if self.state != SessionState.CONNECTING:
            return
        if self.backend.stall_connects.get(self.instance_id, 0) > 0:
            self.backend.stall_connects[self.instance_id] -= 1
            return  # a dial that never completes: no QR, no connection, no error
        banned_for = self.backend.banned_until.get(self.instance_id, 0.0) - time.time()
        if banned_for > 0:  # WhatsApp refuses the connection until the ban ends
            self.state = SessionState.DISCONNECTED
            await self.sink(self.backend._ban_event(self.instance_id, banned_for))
            return
        if self.backend.fail_connects.get(self.instance_id, 0) > 0:
            self.backend.fail_connects[self.instance_id] -= 1
            self.state = SessionState.DISCONNECTED
            await self.sink(Disconnected("connect_failure", "simulated dial failure"))
            return
        try:
            phone = await self.backend.load_phone(self.instance_id)
        except SimulatorStoreUnavailable as exc:  # like a store neonize cannot open: this attempt fails
            self.state = SessionState.DISCONNECTED
            await self.sink(Disconnected("connect_failure", str(exc)))
            return
        if self.state != SessionState.CONNECTING:
            return  # disconnected while the store answered
        if phone is not None:
            await self._go_online(phone)
            return
        self.state = SessionState.QR
        with anyio.CancelScope() as scope:
            self._cancel = scope
            auto = self.backend.auto_scan_ms
            while self.state == SessionState.QR:
                self.qr_count += 1
                self.qr = f"2@sim-{self.instance_id}-{self.qr_count}-{secrets.token_urlsafe(24)},simkey,{self.qr_count}"
                await self.sink(QrCode(self.qr))
                with anyio.move_on_after(auto / 1000 if auto is not None else self.backend.qr_rotate_s):
                    await self._scanned.wait()
                if self._scanned.is_set() or (auto is not None and self.state == SessionState.QR):
                    self._scanned = anyio.Event()
                    await self._pair()
                    return

    async def _pair(self) -> None:
        phone = _Phone(jid=f"{_fake_phone(self.instance_id)}@{USER_SERVER}", push_name=f"Sim {self.instance_id}")
        try:
            await self.backend.save_phone(self.instance_id, phone)
        except SimulatorStoreUnavailable as exc:
            self.state = SessionState.DISCONNECTED
            await self.sink(Disconnected("connect_failure", str(exc)))
            return
        await self._go_online(phone)

    async def _go_online(self, phone: _Phone) -> None:
        self.backend._record_session(self.instance_id, "up")
        self.state = SessionState.CONNECTED
        self.qr = None
        self.pair_code = None
        self.jid = phone.jid
        await self.sink(Connected(jid=phone.jid, push_name=phone.push_name))

    async def send_text(self, to_jid: str, body: str) -> str:
        return await self.send(OutgoingMessage(to_jid=to_jid, body=body))

    async def send(self, message: OutgoingMessage) -> str:
        """Every kind; the sent log records what WhatsApp would get (the media's bytes are read:
        ``size`` and ``sha256`` are of the file as handed over)."""
        if self.state != SessionState.CONNECTED:
            raise NotConnectedError(f"simulator session {self.instance_id} is {self.state}")
        await anyio.sleep(self.backend.send_delay_s)
        if self.backend.fail_sends.get(self.instance_id, 0) > 0:
            self.backend.fail_sends[self.instance_id] -= 1
            raise SendError("simulated send failure")
        if self.state != SessionState.CONNECTED:
            raise NotConnectedError(f"simulator session {self.instance_id} is {self.state}")
        record = await _describe_outgoing(message)
        typing_s = self._typing.pop(message.to_jid, None)
        if typing_s is not None:
            record["typing_s"] = typing_s
        if self.state != SessionState.CONNECTED:
            raise NotConnectedError(f"simulator session {self.instance_id} is {self.state}")
        wa_id = "SIM" + secrets.token_hex(8).upper()
        record.update(wa_message_id=wa_id, ts=time.time())
        self.backend._record_sent(self.instance_id, record)
        if self.backend.crash_after_send:
            # fault injection for the journal's crash tests: die like kill -9,
            # after WhatsApp has the message and before the worker records it
            os.kill(os.getpid(), signal.SIGKILL)
        return wa_id

    async def reject_call(self, call: Call) -> None:
        """Decline a call; recorded in :attr:`SimulatorBackend.rejected_calls`."""
        if self.state != SessionState.CONNECTED:
            raise NotConnectedError(f"simulator session {self.instance_id} is {self.state}")
        self.backend.rejected_calls[self.instance_id].append(
            {"call_id": call.call_id, "from": call.from_jid, "video": call.video})

    async def disconnect(self) -> None:
        if self.state in (SessionState.CONNECTING, SessionState.QR, SessionState.CONNECTED):
            was_online = self.state == SessionState.CONNECTED
            self.state = SessionState.DISCONNECTED
            if was_online:
                self.backend._record_session(self.instance_id, "down")
            if self._cancel is not None:
                self._cancel.cancel()

    async def close(self) -> None:
        await self.disconnect()
        self.state = SessionState.CLOSED  # stays listed in /simulator/instances until replaced

    # ---------------------------------------------------------------- the phone's side

    def scan(self) -> None:
        if self.state != SessionState.QR:
            raise SimulatorError(f"no QR to scan: instance is {self.state}")
        self._scanned.set()

    def enter_code(self, code: str) -> None:
        """The phone's owner types the pairing code: it links the device when it is the latest one."""
        if self.state != SessionState.QR or self.pair_code is None:
            raise SimulatorError(f"no pairing code to enter: instance is {self.state}")
        if code.replace("-", "").upper() != self.pair_code.replace("-", ""):
            raise SimulatorError("wrong pairing code")
        self._scanned.set()

    async def drop(self) -> None:
        if self.state not in (SessionState.CONNECTED, SessionState.QR, SessionState.CONNECTING):
            raise SimulatorError(f"nothing to drop: instance is {self.state}")
        await self.disconnect()
        await self.sink(Disconnected("network", "simulated network loss"))

    async def logout(self) -> None:
        if self.state != SessionState.CONNECTED:
            raise SimulatorError(f"not linked: instance is {self.state}")
        self.state = SessionState.LOGGED_OUT
        self.backend._record_session(self.instance_id, "down")
        try:
            await self.backend.delete_phone(self.instance_id)
        except SimulatorStoreUnavailable as exc:  # the worker's forget_session tries again
            log.warning("%s: %s", self.instance_id, exc)
        await self.sink(LoggedOut("logged_out", "device removed from the phone"))

    async def receipt(self, wa_message_id: str, status: ReceiptStatus) -> None:
        """The recipient's phone reports a message we sent as delivered, read or played."""
        if self.state != SessionState.CONNECTED:
            raise SimulatorError(f"not connected: instance is {self.state}")
        sent = next((r for r in self.backend.sent(self.instance_id) if r.get("wa_message_id") == wa_message_id), None)
        if sent is None:
            raise SimulatorError(f"no message {wa_message_id} was sent through this instance")
        to = str(sent["to"])
        await self.sink(Receipt((wa_message_id,), to, to, status, time.time()))

    async def call(self, from_: str, video: bool = False) -> str:
        """Someone calls this account; returns the call id."""
        if self.state != SessionState.CONNECTED:
            raise SimulatorError(f"not connected: instance is {self.state}")
        call_id = "SIMCALL" + secrets.token_hex(8).upper()
        await self.sink(Call(call_id, normalize_recipient(from_), video, time.time()))
        return call_id

    async def ban(self, code: str, expire_s: float) -> None:
        """WhatsApp bans the account temporarily: the connection ends, and connects are
        refused until ``expire_s`` seconds from now."""
        if self.state != SessionState.CONNECTED:
            raise SimulatorError(f"not connected: instance is {self.state}")
        self.backend.banned_until[self.instance_id] = time.time() + expire_s
        self.backend.ban_codes[self.instance_id] = code
        await self.disconnect()
        await self.sink(self.backend._ban_event(self.instance_id, expire_s))

    async def receive(self, from_: str, body: str, chat_id: str | None = None, push_name: str | None = None,
                      is_group: bool = False, from_me: bool = False, *, kind: Kind = Kind.TEXT,
                      media: bytes | None = None, mimetype: str | None = None, filename: str | None = None,
                      reply_to: str | None = None, reaction: str | None = None, target_id: str | None = None,
                      location: Location | None = None, contact: ContactCard | None = None,
                      view_once: bool = False, sender_pn: str | None = None) -> str:
        """A message arrives from the phone's side. ``body`` is the text, the
        caption or an edit's new text; media bytes are stored like WhatsApp's
        servers hold them and downloaded later through :meth:`download_media`.
        ``sender_pn``: the phone number of a ``…@lid`` sender (WhatsApp tells it when known)."""
        if self.state != SessionState.CONNECTED:
            raise SimulatorError(f"not connected: instance is {self.state}")
        sender = normalize_recipient(from_)
        chat = normalize_recipient(chat_id) if chat_id else sender
        group = is_group or is_group_jid(chat)
        if group and not is_group_jid(chat):
            raise SimulatorError("is_group needs a chat_id ending in @g.us")
        content: InboundContent | None = None
        if kind is not Kind.TEXT or reply_to or view_once:
            info: MediaInfo | None = None
            handle: dict[str, Any] | None = None
            if kind in MEDIA_KINDS:
                if media is None:
                    raise ValueError(f"a {kind.value} message needs media bytes")
                sha = self.backend._store_media(self.instance_id, media)
                info = MediaInfo(mimetype=mimetype, filename=filename, size=len(media), sha256=sha,
                                 ptt=kind is Kind.VOICE)
                handle = {"sim": sha, "mimetype": mimetype, "filename": filename}
            content = InboundContent(kind=kind, body=body, media=info, media_handle=handle, quoted_id=reply_to,
                                     reaction=reaction, target_id=target_id, location=location, contact=contact,
                                     view_once=view_once)
        wa_id = "SIMIN" + secrets.token_hex(8).upper()
        await self.sink(InboundMessage(
            wa_message_id=wa_id,
            chat_jid=chat,
            sender_jid=self.jid if from_me and self.jid else sender,
            body=body,
            from_me=from_me,
            is_group=group,
            push_name=push_name,
            timestamp=time.time(),
            own_jid=self.jid,
            content=content,
            **_lid_fields(sender, chat, sender_pn),
        ))
        return wa_id

    async def download_media(self, handle: dict[str, object], dest_dir: Path) -> MediaFile:
        """Copy stored media into a new 0600 file under ``dest_dir``."""
        if self.state != SessionState.CONNECTED:
            raise MediaUnavailable(f"simulator session {self.instance_id} is {self.state}")
        sha = handle.get("sim")
        if not isinstance(sha, str) or len(sha) != 64 or not set(sha) <= _SHA256_HEX:
            raise MediaUnavailable("not a simulator media handle", permanent=True)
        self.backend.downloads[self.instance_id] += 1
        try:
            data = (self.backend.auth_dir(self.instance_id) / MEDIA_DIR / sha).read_bytes()
        except FileNotFoundError:
            raise MediaUnavailable("the media is no longer on the (simulated) servers", permanent=True) from None
        fd, name = tempfile.mkstemp(prefix="download-", dir=dest_dir)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), FILE_MODE)
            f.write(data)
        mimetype = handle.get("mimetype")
        filename = handle.get("filename")
        return MediaFile(path=Path(name), mimetype=mimetype if isinstance(mimetype, str) else
                         "application/octet-stream", size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                         filename=filename if isinstance(filename, str) else None)

    def describe(self) -> dict[str, Any]:
        return {"id": self.instance_id, "state": self.state, "jid": self.jid, "qr": self.qr,
                "qr_count": self.qr_count, "pair_code": self.pair_code, "fail_sends": self.backend.fail_sends.get(self.instance_id, 0),
                "rejected_calls": self.backend.rejected_calls.get(self.instance_id, []),
                "banned_until": self.backend.banned_until.get(self.instance_id),
                "connect_proxies": self.backend.connect_proxies.get(self.instance_id, [])[-10:]}


def _lid_fields(sender: str, chat: str, sender_pn: str | None) -> dict[str, str | None]:
    """The LID / phone-number pairs of a received message (issue #12)."""
    if not sender.endswith("@" + LID_SERVER):
        return {}
    pn = f"{sender_pn}@{USER_SERVER}" if sender_pn else None
    return {"sender_lid": sender, "sender_pn": pn, "chat_pn": pn if chat == sender else None}


def _hash_file(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1024 * 1024):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


async def _describe_outgoing(message: OutgoingMessage) -> dict[str, Any]:
    """The sent log's record of ``message`` (JSON-able)."""
    record: dict[str, Any] = {"to": message.to_jid, "type": message.kind.value, "body": message.body}
    if message.kind in MEDIA_KINDS:
        media = message.media
        if media is None:
            raise SendError(f"a {message.kind.value} message without its media", permanent=True)
        try:
            size, sha256 = await anyio.to_thread.run_sync(_hash_file, media.path)
        except OSError as exc:
            raise SendError(f"cannot read the media file: {exc.strerror or exc}", permanent=True) from None
        record.update(mimetype=media.mimetype, size=size, sha256=sha256, filename=media.filename,
                      seconds=media.seconds)
    if message.reply_to is not None:
        record["reply_to"] = message.reply_to.wa_message_id
        record["reply_to_chat"] = message.reply_to.chat_jid
    if message.kind is Kind.REACTION:
        if message.reply_to is None or message.reaction is None:
            raise SendError("a reaction needs its emoji and its target", permanent=True)
        record["reaction"] = message.reaction
    if message.kind is Kind.LOCATION:
        loc = message.location
        if loc is None:
            raise SendError("a location message without coordinates", permanent=True)
        record.update(latitude=loc.latitude, longitude=loc.longitude, name=loc.name, address=loc.address)
    if message.kind is Kind.CONTACT:
        if message.contact is None:
            raise SendError("a contact message without its card", permanent=True)
        record["contact"] = {"name": message.contact.name, "vcard": message.contact.vcard}
    if message.kind is Kind.TEXT and not message.body:
        raise SendError("an empty text message", permanent=True)
    return record


class SimulatorBackend(Backend):
    name = "simulator"

    def __init__(self, auth_root: Path, *, auto_scan_ms: int | None = None, connect_delay_s: float = 0.02,
                 send_delay_s: float = 0.0, qr_rotate_s: float = 20.0, database_url: str | None = None) -> None:
        super().__init__(auth_root)
        # DATABASE_URL: paired sessions in PostgreSQL (any worker on the database resumes them)
        self.pg = SimulatorPgStore(database_url) if database_url else None
        self._paired: set[str] = set()  # with pg: the paired instances known here (see has_session)
        self.auto_scan_ms = auto_scan_ms
        self.connect_delay_s = connect_delay_s
        self.send_delay_s = send_delay_s
        self.qr_rotate_s = qr_rotate_s
        self.sessions: dict[str, SimulatorSession] = {}
        self.fail_sends: dict[str, int] = {}
        self.fail_connects: dict[str, int] = {}
        self.stall_connects: dict[str, int] = {}
        self.crash_after_send = False
        self.downloads: Counter[str] = Counter()  # media downloads per instance
        self.lookups: Counter[str] = Counter()  # number lookups (calls) per instance
        self.pair_requests: Counter[str] = Counter()  # pairing codes asked for, per instance
        self.registered: frozenset[str] | None = None  # the numbers that exist (None: every number)
        self.rejected_calls: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)
        self.banned_until: dict[str, float] = {}  # epoch seconds
        self.ban_codes: dict[str, str] = {}
        # per instance, each connect's upstream proxy: "direct" or the redacted proxy_url
        self.connect_proxies: defaultdict[str, list[str]] = defaultdict(list)
        self._flows: Any = None  # task group of the sessions' connect flows
        self._tg_cm: Any = None

    # the backend's own tasks (connect flows) live in a task group the worker enters
    async def __aenter__(self) -> "SimulatorBackend":
        if self.pg is not None:  # unreachable: SimulatorStoreUnavailable (an OSError) ends the start
            await self.pg.open()
            self._paired = set(await self.pg.instances())
            log.info("simulator sessions in PostgreSQL: %s", self.pg.display)
        self._tg_cm = anyio.create_task_group()
        self._flows = await self._tg_cm.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> bool | None:
        self._flows.cancel_scope.cancel()
        try:
            return await self._tg_cm.__aexit__(*exc)
        finally:
            if self.pg is not None:
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    await self.pg.close()

    def _spawn(self, fn: Any) -> None:
        if self._flows is None:
            raise RuntimeError("SimulatorBackend must be entered (async with) before sessions connect")
        self._flows.start_soon(fn)

    # ---------------------------------------------------------------- storage

    def _session_path(self, instance_id: str) -> Path:
        return self.auth_dir(instance_id) / SESSION_FILE

    def has_session(self, instance_id: str) -> bool:
        """With DATABASE_URL: answered from memory (the sessions listed at start, then
        this worker's own pairings, loads and logouts), so the event loop never waits."""
        if self.pg is not None:
            return instance_id in self._paired
        return self._load_phone(instance_id) is not None

    def stored_instances(self) -> list[str]:
        if self.pg is not None:
            return sorted(i for i in self._paired if is_valid_instance_id(i))
        return super().stored_instances()

    async def load_phone(self, instance_id: str) -> _Phone | None:
        """The instance's paired phone: from the database (DATABASE_URL) or its AUTH_DIR file."""
        if self.pg is None:
            return self._load_phone(instance_id)
        row = await self.pg.load(instance_id)
        if row is None:
            self._paired.discard(instance_id)
            return None
        self._paired.add(instance_id)
        return _Phone(jid=row[0], push_name=row[1])

    async def save_phone(self, instance_id: str, phone: _Phone) -> None:
        if self.pg is None:
            self._save_phone(instance_id, phone)
            return
        await self.pg.save(instance_id, phone.jid, phone.push_name)
        self._paired.add(instance_id)

    async def delete_phone(self, instance_id: str) -> None:
        self._paired.discard(instance_id)
        if self.pg is None:
            self._delete_phone(instance_id)
            return
        await self.pg.delete(instance_id)

    async def forget_session(self, instance_id: str) -> None:
        """After a logout: the database row (DATABASE_URL) and the instance's folder go."""
        if self.pg is not None:
            await self.delete_phone(instance_id)
        await super().forget_session(instance_id)

    def _load_phone(self, instance_id: str) -> _Phone | None:
        try:
            data = json.loads(self._session_path(instance_id).read_text())
            return _Phone(jid=str(data["jid"]), push_name=str(data.get("push_name", "")))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _save_phone(self, instance_id: str, phone: _Phone) -> None:
        folder = ensure_private_dir(self.auth_dir(instance_id))
        write_private(folder / SESSION_FILE,
                      json.dumps({"jid": phone.jid, "push_name": phone.push_name, "paired_at": time.time()}))

    def _delete_phone(self, instance_id: str) -> None:
        try:
            self._session_path(instance_id).unlink()
        except FileNotFoundError:
            pass

    def _record_sent(self, instance_id: str, record: dict[str, Any]) -> None:
        folder = ensure_private_dir(self.auth_dir(instance_id))
        append_private(folder / SENT_FILE, json.dumps(record, ensure_ascii=False) + "\n")

    def _record_session(self, instance_id: str, event: str) -> None:
        """One line of the instance's online record (see the module docstring)."""
        folder = ensure_private_dir(self.auth_dir(instance_id))
        append_private(folder / SESSIONS_FILE,
                       json.dumps({"event": event, "ts": time.time(), "pid": os.getpid()}) + "\n")

    def _store_media(self, instance_id: str, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        folder = ensure_private_dir(self.auth_dir(instance_id) / MEDIA_DIR)
        path = folder / sha
        if not path.exists():
            fd, tmp = tempfile.mkstemp(prefix=".part-", dir=folder)
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), FILE_MODE)
                f.write(data)
            os.replace(tmp, path)
        return sha

    def sent(self, instance_id: str) -> list[dict[str, Any]]:
        path = self.auth_dir(instance_id) / SENT_FILE
        try:
            lines = path.read_text().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a torn last line after a crash
            rec.pop("ts", None)
            rec.setdefault("type", "text")  # written before the log had types
            out.append(rec)
        return out

    # ---------------------------------------------------------------- sessions

    async def open_session(self, instance_id: str, sink: EventSink) -> SimulatorSession:
        ensure_private_dir(self.auth_root)
        ensure_private_dir(self.auth_dir(instance_id))
        session = SimulatorSession(self, instance_id, sink)
        old = self.sessions.get(instance_id)
        if old is not None and old.state != SessionState.CLOSED:
            await old.close()
        self.sessions[instance_id] = session
        return session

    def session(self, instance_id: str) -> SimulatorSession:
        s = self.sessions.get(instance_id)
        if s is None:
            raise KeyError(instance_id)
        return s

    def set_registered(self, numbers: list[str] | None) -> None:
        self.registered = None if numbers is None else frozenset(numbers)

    def registered_jid(self, phone: str) -> str | None:
        """The JID WhatsApp has for ``phone``: a Brazilian mobile registered without its 9th digit is
        found with it (the JID is the registered form)."""
        if self.registered is None or phone in self.registered:
            return f"{phone}@{USER_SERVER}"
        if phone.startswith("55") and len(phone) == 13 and phone[4] == "9":
            old = phone[:4] + phone[5:]
            if old in self.registered:
                return f"{old}@{USER_SERVER}"
        return None

    def _ban_event(self, instance_id: str, remaining_s: float) -> Disconnected:
        code = self.ban_codes.get(instance_id, "unknown")
        return Disconnected("temporary_ban", code, retry_after_s=remaining_s, ban_code=code,
                            ban_expires_at=self.banned_until.get(instance_id, time.time() + remaining_s))

    def set_fail_sends(self, instance_id: str, count: int) -> None:
        self.fail_sends[instance_id] = max(0, int(count))
