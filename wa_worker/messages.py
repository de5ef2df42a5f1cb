"""What a message *is*, both ways, independent of the proxy's JSON and of any
WhatsApp library: the content kinds, their fields and their validation.

* Outbound: :func:`parse_content` reads the optional content fields of a queued
  message (docs/proxy-contract.md, "Message types") into :class:`Content`, or
  raises :class:`ContentError` with a reason that says what to fix. A record
  with none of those fields is text, exactly as in the first contract.
* Inbound: backends describe a received message with :class:`InboundContent`
  (kind, caption, media metadata, quoted id, reaction, location, contact,
  edit/revoke target); the inbound relay turns it into the ``/inbound`` body.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class Kind(str, enum.Enum):
    TEXT = "text"
    IMAGE = "image"
    VIDEO = "video"
    AUDIO = "audio"
    VOICE = "voice"  # an audio message shown as a voice note (push-to-talk, OGG/Opus)
    DOCUMENT = "document"
    STICKER = "sticker"
    LOCATION = "location"
    CONTACT = "contact"
    REACTION = "reaction"
    # inbound only
    EDIT = "edit"
    REVOKE = "revoke"
    UNKNOWN = "unknown"
    UNDECRYPTABLE = "undecryptable"  # arrived but could not be decrypted ("waiting for this message")
    CALL = "call"  # an incoming call (posted to /inbound as a record, never a message body)


MEDIA_KINDS = frozenset({Kind.IMAGE, Kind.VIDEO, Kind.AUDIO, Kind.VOICE, Kind.DOCUMENT, Kind.STICKER})
CAPTIONED_KINDS = frozenset({Kind.IMAGE, Kind.VIDEO, Kind.DOCUMENT})
SENDABLE_KINDS = frozenset(k for k in Kind if k not in (Kind.EDIT, Kind.REVOKE, Kind.UNKNOWN, Kind.UNDECRYPTABLE,
                                                         Kind.CALL))

MAX_URL_CHARS = 4096
MAX_BASE64_CHARS = 96 * 1024 * 1024  # ~72 MiB decoded; the byte cap (MEDIA_MAX_BYTES) is checked later
MAX_FILENAME_CHARS = 255
MAX_SHORT_CHARS = 1024
MAX_VCARD_CHARS = 64 * 1024
MAX_REACTION_CHARS = 32
WA_MESSAGE_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_PHONE_RE = re.compile(r"^\+?[0-9][0-9 \-().]{4,30}$")


class ContentError(ValueError):
    """A queued message whose content cannot be sent. ``code`` is machine-readable."""

    def __init__(self, message: str, code: str = "invalid_message") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class MediaSource:
    """Where the bytes of an outbound media message come from (exactly one of url / base64)."""

    url: str | None = None
    base64: str | None = None
    mimetype: str | None = None
    filename: str | None = None


@dataclass(frozen=True, slots=True)
class Location:
    latitude: float
    longitude: float
    name: str | None = None
    address: str | None = None


@dataclass(frozen=True, slots=True)
class ContactCard:
    name: str
    vcard: str


@dataclass(frozen=True, slots=True)
class Content:
    """An outbound message's content. ``kind`` is ``None`` only for media given
    without ``type`` and without ``mimetype``: it is inferred after sniffing."""

    kind: Kind | None
    body: str = ""
    media: MediaSource | None = None
    reply_to: str | None = None
    reaction: str | None = None
    location: Location | None = None
    contact: ContactCard | None = None


@dataclass(frozen=True, slots=True)
class MediaInfo:
    """Metadata of received media (the bytes are fetched separately)."""

    mimetype: str | None = None
    filename: str | None = None
    size: int | None = None
    sha256: str | None = None  # hex
    seconds: int | None = None  # audio/video length
    ptt: bool = False


@dataclass(frozen=True, slots=True)
class InboundContent:
    """What a received message carries besides its addressing."""

    kind: Kind = Kind.TEXT
    body: str = ""  # the text, or the caption
    media: MediaInfo | None = None
    # a backend-private, JSON-able description that lets it download the bytes later
    # (journaled with the row, never posted)
    media_handle: dict[str, Any] | None = None
    quoted_id: str | None = None
    reaction: str | None = None  # emoji ('' = removed); target in target_id
    target_id: str | None = None  # reaction, edit and revoke target
    location: Location | None = None
    contact: ContactCard | None = None
    view_once: bool = False


# --------------------------------------------------------------------------- outbound parsing


def _opt_str(item: Mapping[str, Any], key: str, max_chars: int, what: str | None = None) -> str | None:
    value = item.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ContentError(f"'{what or key}' must be a string")
    if len(value) > max_chars:
        raise ContentError(f"'{what or key}' is longer than {max_chars} characters")
    return value


def _coordinate(item: Mapping[str, Any], key: str, limit: float) -> float:
    value = item.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ContentError(f"'{key}' must be a number")
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise ContentError(f"'{key}' must be a number") from None
    if not math.isfinite(number) or not -limit <= number <= limit:
        raise ContentError(f"'{key}' must be between -{limit:g} and {limit:g}")
    return number


def _kind_of(item: Mapping[str, Any]) -> Kind | None:
    raw = item.get("type")
    if raw is not None:
        if not isinstance(raw, str):
            raise ContentError("'type' must be a string")
        try:
            kind = Kind(raw.strip().lower())
        except ValueError:
            kind = None
        if kind is None or kind not in SENDABLE_KINDS:
            names = ", ".join(sorted(k.value for k in SENDABLE_KINDS))
            raise ContentError(f"unknown type {raw[:40]!r} (one of: {names})")
        return kind
    if item.get("media_url") is not None or item.get("media_base64") is not None:
        return None  # inferred from the media type
    if item.get("latitude") is not None or item.get("longitude") is not None:
        return Kind.LOCATION
    if item.get("contact") is not None or item.get("vcard") is not None:
        return Kind.CONTACT
    if item.get("reaction") is not None:
        return Kind.REACTION
    return Kind.TEXT


def kind_for_mimetype(mimetype: str | None) -> Kind:
    """The kind a media message without ``type`` is sent as."""
    major = (mimetype or "").split("/", 1)[0].lower()
    return {"image": Kind.IMAGE, "video": Kind.VIDEO, "audio": Kind.AUDIO}.get(major, Kind.DOCUMENT)


def _media(item: Mapping[str, Any]) -> MediaSource:
    url = _opt_str(item, "media_url", MAX_URL_CHARS)
    data = _opt_str(item, "media_base64", MAX_BASE64_CHARS)
    if (url is None) == (data is None):
        raise ContentError("a media message needs exactly one of 'media_url' and 'media_base64'")
    if url is not None and not re.match(r"^https?://", url.strip(), re.I):
        raise ContentError("'media_url' must be an http:// or https:// URL", code="media_refused")
    mimetype = _opt_str(item, "mimetype", 255)
    if mimetype is not None and not re.fullmatch(r"[\w.+-]+/[\w.+-]+(;.*)?", mimetype.strip()):
        raise ContentError("'mimetype' is not a media type like image/jpeg")
    filename = _opt_str(item, "filename", MAX_FILENAME_CHARS)
    if filename is not None:
        filename = filename.replace("/", "_").replace("\\", "_").replace("\x00", "").strip() or None
    return MediaSource(url=url.strip() if url else None, base64=data,
                       mimetype=mimetype.strip().lower() if mimetype else None, filename=filename)


def _contact(item: Mapping[str, Any]) -> ContactCard:
    vcard = _opt_str(item, "vcard", MAX_VCARD_CHARS)
    raw = item.get("contact")
    name: str | None = None
    phone: str | None = None
    if raw is not None:
        if not isinstance(raw, Mapping):
            raise ContentError("'contact' must be an object {\"name\", \"phone\"}")
        name = _opt_str(raw, "name", MAX_SHORT_CHARS, "contact.name")
        phone = _opt_str(raw, "phone", 64, "contact.phone")
        vcard = vcard or _opt_str(raw, "vcard", MAX_VCARD_CHARS, "contact.vcard")
    if vcard is not None:
        if "BEGIN:VCARD" not in vcard.upper():
            raise ContentError("'vcard' is not a vCard (BEGIN:VCARD ... END:VCARD)")
        found = re.search(r"^FN(?:;[^:\r\n]*)?:(.*)$", vcard, re.M | re.I)
        return ContactCard(name=(name or (found.group(1).strip() if found else "") or "Contact"), vcard=vcard)
    if not name or not name.strip() or not phone:
        raise ContentError("a contact needs 'contact': {\"name\", \"phone\"} or a 'vcard'")
    if not _PHONE_RE.fullmatch(phone.strip()):
        raise ContentError("'contact.phone' is not a phone number")
    return ContactCard(name=name.strip(), vcard=build_vcard(name.strip(), phone))


def build_vcard(name: str, phone: str) -> str:
    """A minimal vCard 3.0 that WhatsApp shows with a "Message" button."""
    digits = re.sub(r"\D", "", phone)
    safe = re.sub(r"[\r\n;]", " ", name)
    return (f"BEGIN:VCARD\nVERSION:3.0\nFN:{safe}\nN:;{safe};;;\n"
            f"TEL;type=CELL;type=VOICE;waid={digits}:+{digits}\nEND:VCARD")


def parse_content(item: Mapping[str, Any]) -> Content:
    """The content of one queued message record; raises :class:`ContentError`."""
    kind = _kind_of(item)
    raw_body = item.get("body", item.get("text"))
    if raw_body is not None and not isinstance(raw_body, str):
        raise ContentError("body is not text")
    body = raw_body or ""
    reply_to = _opt_str(item, "reply_to", 128)
    if reply_to is not None:
        reply_to = reply_to.strip() or None
        if reply_to is not None and not WA_MESSAGE_ID_RE.fullmatch(reply_to):
            raise ContentError("'reply_to' is not a WhatsApp message id")
    if kind is Kind.TEXT:
        if not body.strip():
            raise ContentError("empty body")
        return Content(Kind.TEXT, body=body, reply_to=reply_to)
    if kind is None or kind in MEDIA_KINDS:
        media = _media(item)
        if kind is None and media.mimetype is not None:
            kind = kind_for_mimetype(media.mimetype)
        if kind is not None and kind not in CAPTIONED_KINDS and body.strip():
            raise ContentError(f"a {kind.value} message cannot carry a caption: send the text as its own message")
        return Content(kind, body=body, media=media, reply_to=reply_to)
    if kind is Kind.LOCATION:
        location = Location(_coordinate(item, "latitude", 90), _coordinate(item, "longitude", 180),
                            _opt_str(item, "name", MAX_SHORT_CHARS), _opt_str(item, "address", MAX_SHORT_CHARS))
        return Content(kind, location=location, reply_to=reply_to)
    if kind is Kind.CONTACT:
        return Content(kind, contact=_contact(item), reply_to=reply_to)
    # reaction
    emoji = _opt_str(item, "reaction", MAX_REACTION_CHARS)
    if emoji is None:
        raise ContentError("a reaction needs 'reaction' (an emoji, or \"\" to remove it)")
    if reply_to is None:
        raise ContentError("a reaction needs 'reply_to': the id of the message it reacts to")
    return Content(kind, reaction=emoji.strip(), reply_to=reply_to)
