"""The one interface every WhatsApp backend implements.

A *backend* creates one *session* per instance. A session connects to WhatsApp,
reports what happens through an :class:`EventSink` (plain dataclass events, never
library objects), sends text, and disconnects. The instance runner
(:mod:`wa_worker.instances.runner`) owns the lifecycle; the backend only
translates between its library and these types.

Rules every backend follows:

* ``connect()`` returns once the attempt has *started*; the outcome arrives as
  events (:class:`QrCode`, :class:`Connected`, :class:`Disconnected`,
  :class:`LoggedOut`).
* The sink is called on the worker's event loop. It never blocks on the
  network (the runner only queues or journals), so a backend may await it
  directly from its library callback.
* ``send_text`` / ``send`` return the WhatsApp message id or raise
  :class:`SendError`; ``download_media`` fetches received media described by the
  JSON-able handle the backend put in the event (it survives restarts in the
  journal) or raises :class:`MediaUnavailable`.
* ``disconnect()`` closes the connection and keeps the stored session; only
  ``LoggedOut`` (from the phone) makes the runner wipe the auth folder.
* ``close()`` releases everything the session holds (threads, files); it is
  idempotent and bounded in time.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..fsutil import wipe_dir
from ..ids import is_valid_instance_id
from ..messages import ContactCard, InboundContent, Kind, Location


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class QrCode:
    """A new pairing QR string (the text to encode, not an image)."""

    code: str


@dataclass(frozen=True, slots=True)
class Connected:
    """Logged in and online. ``jid`` is our own JID when the backend knows it."""

    jid: str | None = None
    push_name: str | None = None

    @property
    def phone_number(self) -> str | None:
        if not self.jid:
            return None
        user = self.jid.split("@", 1)[0]
        return user.split(":", 1)[0].split(".", 1)[0] or None


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The connection ended; the runner reconnects with backoff.

    ``reason`` is a short machine word (``network``, ``connect_failure``,
    ``stream_replaced``, ``temporary_ban``, ``connect_timeout`` ...).
    ``retry_after_s`` lets a backend demand a minimum wait (e.g. a temporary
    ban's expiry); ``None`` means "use the normal backoff".
    """

    reason: str = "network"
    detail: str | None = None
    retry_after_s: float | None = None
    # a temporary ban: its code (e.g. ``blocked_by_users``) and when it ends (epoch seconds), when known
    ban_code: str | None = None
    ban_expires_at: float | None = None


@dataclass(frozen=True, slots=True)
class LoggedOut:
    """The phone unlinked this device: the session is dead and must be wiped."""

    reason: str = "logged_out"
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """A received message with a non-empty text body.

    ``chat_jid`` is the conversation (a user JID, or a group ``…@g.us``);
    ``sender_jid`` the author (in groups the participant, otherwise equal to
    ``chat_jid`` for incoming messages or our own JID when ``from_me``).
    ``timestamp`` is seconds since the epoch.
    """

    wa_message_id: str
    chat_jid: str
    sender_jid: str
    body: str
    from_me: bool = False
    is_group: bool = False
    push_name: str | None = None
    timestamp: float = 0.0
    own_jid: str | None = None
    # what it carries besides text (kind, caption, media, reply, reaction ...);
    # None: a plain text message whose text is ``body``
    content: InboundContent | None = None
    # a LID contact's other address, when WhatsApp says it: the sender's phone JID and LID,
    # and the chat's phone JID (issue #12)
    sender_pn: str | None = None
    sender_lid: str | None = None
    chat_pn: str | None = None


class ReceiptStatus(enum.StrEnum):
    """How far a sent message got, in order: a later one never goes back to an earlier one."""

    DELIVERED = "delivered"
    READ = "read"
    PLAYED = "played"

    @property
    def rank(self) -> int:
        return _RECEIPT_RANK[self]


_RECEIPT_RANK = {ReceiptStatus.DELIVERED: 1, ReceiptStatus.READ: 2, ReceiptStatus.PLAYED: 3}


@dataclass(frozen=True, slots=True)
class Receipt:
    """The recipient's device got, read or played messages we sent (one receipt names
    one or more ids). ``recipient`` is who sent the receipt (in groups: the participant)."""

    wa_message_ids: tuple[str, ...]
    chat_jid: str
    recipient: str
    status: ReceiptStatus
    timestamp: float = 0.0


@dataclass(frozen=True, slots=True)
class Call:
    """An incoming call offer (voice or video); the runner may reject it."""

    call_id: str
    from_jid: str
    video: bool = False
    timestamp: float = 0.0


# --------------------------------------------------------------------------- outgoing


@dataclass(frozen=True, slots=True)
class MediaFile:
    """Media bytes on local disk, ready to hand to WhatsApp (the caller owns and removes the file)."""

    path: Path
    mimetype: str
    size: int
    sha256: str  # hex
    filename: str | None = None
    seconds: int | None = None  # audio/video length, when known


@dataclass(frozen=True, slots=True)
class MessageRef:
    """A message this instance sent or received, as a reply or a reaction must name it."""

    wa_message_id: str
    chat_jid: str
    sender_jid: str | None = None  # the author (needed in groups); None: unknown
    from_me: bool = False


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """One message to send. ``kind`` decides which fields matter (see wa_worker.messages)."""

    to_jid: str
    kind: Kind = Kind.TEXT
    body: str = ""  # the text, or the caption of an image/video/document
    media: MediaFile | None = None
    reply_to: MessageRef | None = None
    reaction: str | None = None  # emoji, '' removes; the target is reply_to
    location: Location | None = None
    contact: ContactCard | None = None


BackendEvent = QrCode | Connected | Disconnected | LoggedOut | InboundMessage | Receipt | Call

EventSink = Callable[[BackendEvent], Awaitable[None]]


# --------------------------------------------------------------------------- errors


class BackendError(Exception):
    """Base class of backend failures."""


class SendError(BackendError):
    """A send did not reach WhatsApp. ``permanent`` means retrying is pointless
    (e.g. the recipient does not exist); the relay reports it as failed either
    way (never re-sends on its own)."""

    def __init__(self, message: str, *, permanent: bool = False, code: str = "send_failed") -> None:
        super().__init__(message)
        self.permanent = permanent
        self.code = code  # the /mark-failed error_code (docs/proxy-contract.md)


class NotConnectedError(SendError):
    """The session is not connected right now."""


class MediaUnavailable(BackendError):
    """Received media cannot be downloaded. ``permanent``: never will be (expired,
    deleted, undecryptable); otherwise retry later (not connected, network)."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


# --------------------------------------------------------------------------- interface


class SessionState(enum.StrEnum):
    """Where a session is (both backends); compares equal to its value."""

    IDLE = "idle"
    CONNECTING = "connecting"
    QR = "qr"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    LOGGED_OUT = "logged_out"
    CLOSED = "closed"


@dataclass(slots=True)
class SessionInfo:
    """What the runner may show about a session (health, simulator control)."""

    instance_id: str
    state: str
    jid: str | None = None
    extra: dict[str, object] = field(default_factory=dict)


class Session(abc.ABC):
    """One instance's connection to WhatsApp."""

    instance_id: str

    @abc.abstractmethod
    async def connect(self) -> None:
        """Start connecting; outcomes arrive through the sink."""

    @abc.abstractmethod
    async def send_text(self, to_jid: str, body: str) -> str:
        """Send a text message; return the WhatsApp message id."""

    async def send(self, message: OutgoingMessage) -> str:
        """Send any kind of message; return the WhatsApp message id.
        Backends override this for the kinds they support."""
        if message.kind is Kind.TEXT and message.reply_to is None:
            return await self.send_text(message.to_jid, message.body)
        raise SendError(f"this backend cannot send a {message.kind.value} message", permanent=True)

    # a backend that can ask WhatsApp which account a phone number is sets this
    can_lookup_numbers: bool = False

    async def lookup_numbers(self, phones: list[str]) -> dict[str, str | None]:
        """For each phone (digits), the JID WhatsApp registers it under, or None when it is not on
        WhatsApp. Raises :class:`BackendError` when WhatsApp cannot be asked now (never a "no")."""
        raise BackendError("this backend cannot look numbers up")

    async def pair_phone(self, phone: str) -> str:
        """Ask WhatsApp for a pairing code for ``phone`` (digits), to enter on that phone instead of
        scanning the QR; only while a QR is shown. Raises :class:`BackendError` when it cannot."""
        raise BackendError("this backend cannot pair with a code")

    async def send_typing(self, to_jid: str, seconds: float) -> None:
        """Show "typing…" in the chat (the caller waits ``seconds``, then sends). Best effort:
        raises :class:`BackendError` when it could not (the message is sent anyway)."""
        return None

    async def reject_call(self, call: Call) -> None:
        """Decline an incoming call. Raises :class:`SendError` (not connected, refused)."""
        raise SendError("this backend cannot reject calls", permanent=True)

    async def download_media(self, handle: dict[str, object], dest_dir: Path) -> MediaFile:
        """Fetch the bytes of received media described by ``handle`` (from
        :attr:`InboundContent.media_handle`) into a new file under ``dest_dir``.
        Raises :class:`MediaUnavailable`."""
        raise MediaUnavailable("this backend cannot download media", permanent=True)

    @abc.abstractmethod
    async def disconnect(self) -> None:
        """Close the connection, keep the stored session (never log out)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release every resource the session holds. Idempotent, bounded."""


class Backend(abc.ABC):
    """A factory of sessions, one per instance, storing them under ``auth_root``."""

    name: str = "abstract"

    def __init__(self, auth_root: Path) -> None:
        self.auth_root = auth_root
        # the instance's upstream proxy URL from the edge proxy (set by the worker; None: direct).
        # Read at each connect; raises ValueError when the edge proxy gave an unusable value
        # (the instance then does not connect: never directly behind the operator's back)
        self.instance_proxy: Callable[[str], str | None] = lambda _iid: None

    def auth_dir(self, instance_id: str) -> Path:
        return self.auth_root / instance_id

    @abc.abstractmethod
    def has_session(self, instance_id: str) -> bool:
        """True when a paired session is stored for ``instance_id``."""

    def stored_instances(self) -> list[str]:
        """Instance ids with a stored session (resumed at start-up)."""
        if not self.auth_root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.auth_root.iterdir()
            if p.is_dir() and is_valid_instance_id(p.name) and self.has_session(p.name)
        )

    async def forget_session(self, instance_id: str) -> None:
        """The phone logged this device out: remove its stored session (the
        instance pairs again with a fresh QR). Raises OSError on failure."""
        wipe_dir(self.auth_dir(instance_id))

    @abc.abstractmethod
    async def open_session(self, instance_id: str, sink: EventSink) -> Session:
        """Create (not yet connect) the session of ``instance_id``."""

    async def __aenter__(self) -> "Backend":
        """Start backend-wide services (the worker enters the backend once)."""
        return self

    async def __aexit__(self, *exc: object) -> bool | None:
        """Stop what ``__aenter__`` started (nothing, by default)."""
        return None
