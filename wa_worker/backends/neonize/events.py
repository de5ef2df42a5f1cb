"""Pure mapping of neonize (whatsmeow) protobuf events to backend dataclasses,
like mautrix's msgconv: no client, thread or loop here, and no neonize import
(events are recognised by protobuf message name, enums by number, pinned by the
tests). JIDs, timestamps and skipped messages: docs/neonize.md, "Events"."""

from __future__ import annotations

import base64
import re
import time
from typing import Any

from ...messages import ContactCard, InboundContent, Kind, Location, MediaInfo
from ..base import (
    BackendEvent,
    Call,
    Connected,
    Disconnected,
    InboundMessage,
    LoggedOut,
    QrCode,
    Receipt,
    ReceiptStatus,
)

# neonize Neonize.proto ConnectFailureReason (1-based, unlike whatsmeow's HTTP-like codes)
CF_GENERIC = 1
CF_LOGGED_OUT = 2
CF_TEMP_BANNED = 3
CF_MAIN_DEVICE_GONE = 4
CF_UNKNOWN_LOGOUT = 5
CF_CLIENT_OUTDATED = 6
CF_BAD_USER_AGENT = 7
CF_INTERNAL_SERVER_ERROR = 8
CF_EXPERIMENTAL = 9
CF_SERVICE_UNAVAILABLE = 10

CONNECT_FAILURE_NAMES = {
    CF_GENERIC: "generic",
    CF_LOGGED_OUT: "logged_out",
    CF_TEMP_BANNED: "temp_banned",
    CF_MAIN_DEVICE_GONE: "main_device_gone",
    CF_UNKNOWN_LOGOUT: "unknown_logout",
    CF_CLIENT_OUTDATED: "client_outdated",
    CF_BAD_USER_AGENT: "bad_user_agent",
    CF_INTERNAL_SERVER_ERROR: "internal_server_error",
    CF_EXPERIMENTAL: "experimental",
    CF_SERVICE_UNAVAILABLE: "service_unavailable",
}
#: reasons whatsmeow's ``ConnectFailureReason.IsLoggedOut()`` treats as "unpaired"
LOGGED_OUT_REASONS = frozenset({CF_LOGGED_OUT, CF_MAIN_DEVICE_GONE, CF_UNKNOWN_LOGOUT})

TEMP_BAN_NAMES = {
    1: "send_to_too_many_people",
    2: "blocked_by_users",
    3: "created_too_many_groups",
    4: "sent_too_many_same_message",
    5: "broadcast_list",
}

# neonize Neonize.proto Receipt.ReceiptType: the ones a sender reports (READ_SELF, PLAYED_SELF,
# RETRY, SERVER_ERROR, ... are our own devices' or the protocol's business)
RECEIPT_STATUSES = {1: ReceiptStatus.DELIVERED, 4: ReceiptStatus.READ, 6: ReceiptStatus.PLAYED}

PAIR_STATUS_ERROR = 1
PAIR_STATUS_SUCCESS = 2

STATUS_BROADCAST = "status@broadcast"
_SKIPPED_SERVERS = frozenset({"newsletter"})
_MS_THRESHOLD = 10**11


# --------------------------------------------------------------------------- helpers


def _has(msg: Any, field: str) -> bool:
    try:
        return bool(msg.HasField(field))
    except ValueError:  # not a singular field of this message
        return False


def jid_to_str(jid: Any) -> str | None:
    """``user@server`` of a neonize ``JID`` (device/agent dropped); None if empty."""
    if jid is None:
        return None
    user = getattr(jid, "User", "") or ""
    server = getattr(jid, "Server", "") or ""
    if not user and not server:
        return None
    if not user:
        return server
    return f"{user}@{server}"


_DEVICE_JID = re.compile(r"^(?P<user>[^@.:]+)(?:\.(?P<agent>\d+))?(?::(?P<device>\d+))?@(?P<server>[^@:]+)$")


def device_jid_text(jid: Any) -> str | None:
    """The full device JID of a neonize ``JID``, as whatsmeow writes it in
    ``whatsmeow_device.jid`` (``JID.String()``: ``user[.agent]:device@server``); None if no user."""
    user = getattr(jid, "User", "") or ""
    server = getattr(jid, "Server", "") or ""
    if not user or not server:
        return None
    agent, device = int(getattr(jid, "RawAgent", 0) or 0), int(getattr(jid, "Device", 0) or 0)
    if agent > 0:
        return f"{user}.{agent}:{device}@{server}"
    return f"{user}:{device}@{server}" if device > 0 else f"{user}@{server}"


def parse_device_jid(text: str) -> tuple[str, str, int, int]:
    """``user[.agent][:device]@server`` → (user, server, device, agent); ValueError otherwise."""
    m = _DEVICE_JID.match(text)
    if m is None:
        raise ValueError(f"not a device JID: {text!r}")
    return m["user"], m["server"], int(m["device"] or 0), int(m["agent"] or 0)


def own_device_jid(ev: Any) -> str | None:
    """The full device JID of our own account carried by a ``Device`` event or a
    successful ``PairStatus`` (None for any other event)."""
    name = ev.DESCRIPTOR.name
    if name == "Device" and _has(ev, "JID"):
        return device_jid_text(ev.JID)
    if name == "PairStatus" and ev.Status == PAIR_STATUS_SUCCESS and _has(ev, "ID"):
        return device_jid_text(ev.ID)
    return None


def timestamp_seconds(raw: int | float | None) -> float:
    """Seconds since the epoch from a neonize timestamp in seconds *or* milliseconds."""
    if not raw or raw < 0:
        return 0.0
    value = float(raw)
    if value > _MS_THRESHOLD:
        value /= 1000.0
    return value


# waE2E.Message fields that only wrap another Message (``FutureProofMessage``/``DeviceSentMessage``)
_WRAPPERS = (
    "deviceSentMessage",
    "ephemeralMessage",
    "viewOnceMessage",
    "viewOnceMessageV2",
    "viewOnceMessageV2Extension",
    "documentWithCaptionMessage",
    "lottieStickerMessage",
    "botInvokeMessage",
    "groupMentionedMessage",
    "editedMessage",
)
_VIEW_ONCE_WRAPPERS = frozenset({"viewOnceMessage", "viewOnceMessageV2", "viewOnceMessageV2Extension"})

#: media sub-messages -> (kind, the field a handle names for ``download_any``)
MEDIA_FIELDS: dict[str, tuple[Kind, str]] = {
    "imageMessage": (Kind.IMAGE, "imageMessage"),
    "videoMessage": (Kind.VIDEO, "videoMessage"),
    "ptvMessage": (Kind.VIDEO, "videoMessage"),  # a round video note: a VideoMessage
    "audioMessage": (Kind.AUDIO, "audioMessage"),
    "documentMessage": (Kind.DOCUMENT, "documentMessage"),
    "stickerMessage": (Kind.STICKER, "stickerMessage"),
}
#: fields carrying no user content (key distribution, metadata)
_NOT_CONTENT = frozenset({
    "senderKeyDistributionMessage", "fastRatchetKeySenderKeyDistributionMessage", "messageContextInfo",
})
#: chat actions that are not messages, or content we cannot read (docs/neonize.md, "Events")
SKIPPED_FIELDS = frozenset({
    "pollUpdateMessage",  # a vote (encrypted to the poll's creator)
    "encReactionMessage",  # a reaction in a community announcement group (encrypted)
    "encEventResponseMessage",
    "encCommentMessage",
    "keepInChatMessage",
    "pinInChatMessage",
    "stickerSyncRmrMessage",
    "call",
    "chat",
})
PROTOCOL_REVOKE = 0
PROTOCOL_MESSAGE_EDIT = 14
HANDLE_VERSION = 1
#: text-like fields of unknown sub-messages, tried in order for a body
_TEXT_ATTRS = ("text", "caption", "name", "title", "selectedDisplayText", "displayName", "contentText",
               "description")


def _unwrap(msg: Any) -> tuple[Any, bool]:
    """(the real content, seen a view-once wrapper) of a possibly wrapped ``waE2E.Message``."""
    view_once = False
    for _ in range(6):  # wrappers nest at most a few levels
        for wrapper in _WRAPPERS:
            if _has(msg, wrapper) and _has(getattr(msg, wrapper), "message"):
                view_once = view_once or wrapper in _VIEW_ONCE_WRAPPERS
                msg = getattr(msg, wrapper).message
                break
        else:
            return msg, view_once
    return msg, view_once


def _text_of(msg: Any) -> str:
    """The text or caption of an unwrapped message ("" when none)."""
    if _has(msg, "conversation"):
        return str(msg.conversation)
    if _has(msg, "extendedTextMessage"):
        return str(msg.extendedTextMessage.text)
    for media in ("imageMessage", "videoMessage", "documentMessage", "ptvMessage"):
        if _has(msg, media):
            return str(getattr(msg, media).caption)
    return ""


def extract_text(message: Any) -> str | None:
    """The text body of a ``waE2E.Message`` or None (no text, protocol message...)."""
    if message is None:
        return None
    msg, _ = _unwrap(message)
    if _has(msg, "protocolMessage"):
        return None
    return _text_of(msg) or None


def _content_fields(msg: Any) -> list[str]:
    return [fd.name for fd, _ in msg.ListFields() if fd.name not in _NOT_CONTENT]


def _quoted_id(sub: Any) -> str | None:
    fields = sub.DESCRIPTOR.fields_by_name
    if "contextInfo" in fields and _has(sub, "contextInfo") and sub.contextInfo.stanzaID:
        return str(sub.contextInfo.stanzaID)
    return None


def media_handle(handle_kind: str, sub: Any) -> dict[str, Any]:
    """A JSON-able handle from which :func:`..media.message_from_handle` rebuilds the
    ``Message`` for ``download_any``: the media sub-message without its context
    (quoted message) and thumbnail, which a download does not need."""
    copy = type(sub)()
    copy.CopyFrom(sub)
    for field in ("contextInfo", "JPEGThumbnail", "pngThumbnail"):
        if field in copy.DESCRIPTOR.fields_by_name:
            copy.ClearField(field)
    return {"v": HANDLE_VERSION, "kind": handle_kind,
            "proto": base64.b64encode(copy.SerializeToString()).decode("ascii")}


def _media_content(field: str, sub: Any, view_once: bool) -> InboundContent:
    kind, handle_kind = MEDIA_FIELDS[field]
    names = sub.DESCRIPTOR.fields_by_name
    ptt = bool(getattr(sub, "PTT", False))
    if kind is Kind.AUDIO and ptt:
        kind = Kind.VOICE
    seconds = int(sub.seconds) if "seconds" in names and sub.seconds else None
    info = MediaInfo(
        mimetype=sub.mimetype or None,
        filename=(sub.fileName or None) if "fileName" in names else None,
        size=int(sub.fileLength) if sub.fileLength else None,
        sha256=bytes(sub.fileSHA256).hex() or None,
        seconds=seconds,
        ptt=ptt,
    )
    return InboundContent(
        kind=kind,
        body=str(sub.caption) if "caption" in names else "",
        media=info,
        media_handle=media_handle(handle_kind, sub),
        quoted_id=_quoted_id(sub),
        view_once=view_once or bool(getattr(sub, "viewOnce", False)),
    )


def _protocol_content(proto: Any) -> InboundContent | None:
    target = str(proto.key.ID) if _has(proto, "key") and proto.key.ID else None
    if proto.type == PROTOCOL_REVOKE and target:
        return InboundContent(kind=Kind.REVOKE, target_id=target)
    if proto.type == PROTOCOL_MESSAGE_EDIT and target:
        edited, _ = _unwrap(proto.editedMessage) if _has(proto, "editedMessage") else (None, False)
        return InboundContent(kind=Kind.EDIT, body=_text_of(edited) if edited is not None else "", target_id=target)
    return None  # history sync, key shares, ephemeral settings, ... (or no target)


def _unknown_body(sub: Any) -> str:
    if not hasattr(sub, "DESCRIPTOR"):
        return str(sub) if isinstance(sub, str) else ""
    names = sub.DESCRIPTOR.fields_by_name
    for attr in _TEXT_ATTRS:
        if attr in names:
            value = getattr(sub, attr)
            if isinstance(value, str) and value.strip():
                return value
    if "body" in names and _has(sub, "body") and isinstance(getattr(sub.body, "text", None), str):
        return str(sub.body.text)
    return ""


def map_content(message: Any, *, view_once: bool = False) -> InboundContent | None:
    """What a ``waE2E.Message`` carries (None: nothing to deliver; see docs/neonize.md)."""
    msg, wrapped_view_once = _unwrap(message)
    view_once = view_once or wrapped_view_once
    if _has(msg, "protocolMessage"):
        return _protocol_content(msg.protocolMessage)
    fields = _content_fields(msg)
    if not fields:
        return None
    if "conversation" in fields or "extendedTextMessage" in fields:
        body = _text_of(msg)
        if not body.strip():
            return None
        quoted = _quoted_id(msg.extendedTextMessage) if "extendedTextMessage" in fields else None
        return InboundContent(kind=Kind.TEXT, body=body, quoted_id=quoted, view_once=view_once)
    for field in fields:
        if field in MEDIA_FIELDS:
            return _media_content(field, getattr(msg, field), view_once)
    if "locationMessage" in fields or "liveLocationMessage" in fields:
        live = "liveLocationMessage" in fields
        loc = msg.liveLocationMessage if live else msg.locationMessage
        return InboundContent(
            kind=Kind.LOCATION,
            body=str(loc.caption if live else loc.comment),
            location=Location(float(loc.degreesLatitude), float(loc.degreesLongitude),
                              None if live else (loc.name or None), None if live else (loc.address or None)),
            quoted_id=_quoted_id(loc),
        )
    if "contactMessage" in fields:
        card = msg.contactMessage
        return InboundContent(kind=Kind.CONTACT, contact=ContactCard(name=card.displayName, vcard=card.vcard),
                              quoted_id=_quoted_id(card))
    if "contactsArrayMessage" in fields:
        cards = msg.contactsArrayMessage
        vcards = "\n".join(c.vcard for c in cards.contacts if c.vcard)  # one .vcf may hold many cards
        name = cards.displayName or ", ".join(c.displayName for c in cards.contacts if c.displayName)
        return InboundContent(kind=Kind.CONTACT, contact=ContactCard(name=name, vcard=vcards),
                              quoted_id=_quoted_id(cards))
    if "reactionMessage" in fields:
        reaction = msg.reactionMessage
        if not reaction.key.ID:
            return None  # a reaction to nothing
        return InboundContent(kind=Kind.REACTION, reaction=reaction.text, target_id=str(reaction.key.ID))
    if any(f in SKIPPED_FIELDS for f in fields):
        return None
    sub = getattr(msg, fields[0])
    return InboundContent(kind=Kind.UNKNOWN, body=_unknown_body(sub),
                          quoted_id=_quoted_id(sub) if hasattr(sub, "DESCRIPTOR") else None, view_once=view_once)


def map_message(ev: Any, own_jid: str | None = None) -> InboundMessage | None:
    """Map a neonize ``Message`` event to :class:`InboundMessage` (or None to skip)."""
    info = ev.Info
    src = info.MessageSource
    chat = jid_to_str(src.Chat)
    if not chat or chat == STATUS_BROADCAST or src.Chat.Server in _SKIPPED_SERVERS:
        return None
    view_once = any(bool(getattr(ev, f, False)) for f in ("IsViewOnce", "IsViewOnceV2", "IsViewOnceV2Extension"))
    content = map_content(ev.Message, view_once=view_once) if _has(ev, "Message") else None
    if content is None and _has(ev, "Raw"):
        content = map_content(ev.Raw, view_once=view_once)
    if content is None:
        return None
    from_me = bool(src.IsFromMe)
    sender = jid_to_str(src.Sender) or (own_jid if from_me else None) or chat
    plain = content.kind is Kind.TEXT and content.quoted_id is None and not content.view_once
    return InboundMessage(
        wa_message_id=info.ID,
        chat_jid=chat,
        sender_jid=sender,
        body=content.body,
        from_me=from_me,
        is_group=bool(src.IsGroup),
        push_name=info.Pushname or None,
        timestamp=timestamp_seconds(info.Timestamp),
        own_jid=own_jid,
        content=None if plain else content,
        **lid_fields(src, chat, sender),
    )


def lid_fields(src: Any, chat: str, sender: str) -> dict[str, str]:
    """``sender_pn`` / ``sender_lid`` / ``chat_pn`` from a ``MessageSource``'s ``SenderAlt`` and
    ``RecipientAlt`` (whatsmeow: the other address of the sender, and of the DM's peer)."""
    out: dict[str, str] = {}
    sender_alt = jid_to_str(src.SenderAlt) if _has(src, "SenderAlt") else None
    for jid in (sender, sender_alt):
        if jid and jid.endswith("@lid"):
            out.setdefault("sender_lid", jid)
        elif jid and jid.endswith("@s.whatsapp.net"):
            out.setdefault("sender_pn", jid)
    if "sender_lid" not in out:
        return {}  # no LID involved: the phone JID is the sender_id already
    if chat.endswith("@lid"):
        recipient_alt = jid_to_str(src.RecipientAlt) if _has(src, "RecipientAlt") else None
        if chat == out["sender_lid"] and "sender_pn" in out:
            out["chat_pn"] = out["sender_pn"]
        elif recipient_alt and recipient_alt.endswith("@s.whatsapp.net"):
            out["chat_pn"] = recipient_alt
    return out


def map_receipt(ev: Any) -> Receipt | None:
    """A ``Receipt`` event about messages we sent (delivered, read, played), or None."""
    status = RECEIPT_STATUSES.get(ev.Type)
    src = ev.MessageSource
    chat = jid_to_str(src.Chat)
    ids = tuple(i for i in ev.MessageIDs if i)
    if status is None or not chat or not ids or src.IsFromMe or chat == STATUS_BROADCAST:
        return None
    recipient = jid_to_str(src.Sender) or chat
    return Receipt(ids, chat, recipient, status, timestamp_seconds(ev.Timestamp))


def _has_tag(node: Any, tag: str, depth: int = 0) -> bool:
    if depth > 4:
        return False
    return any(child.Tag == tag or _has_tag(child, tag, depth + 1) for child in node.Nodes)


def map_call_offer(ev: Any) -> Call | None:
    """A ``CallOffer`` event: the caller (the call's creator) and whether it is a video call
    (a ``<video>`` element in the offer)."""
    meta = ev.basicCallMeta
    caller = (jid_to_str(meta.callCreator) if _has(meta, "callCreator") else None) or jid_to_str(getattr(meta, "from"))
    if not caller or not meta.callID:
        return None
    video = _has(ev, "data") and _has_tag(ev.data, "video")
    return Call(meta.callID, caller, video, timestamp_seconds(meta.timestamp))


def map_undecryptable(ev: Any, own_jid: str | None = None) -> InboundMessage | None:
    """An ``UndecryptableMessage`` (WhatsApp shows "waiting for this message"): reported so
    the SaaS knows one arrived, with no body."""
    info = ev.Info
    src = info.MessageSource
    chat = jid_to_str(src.Chat)
    if not chat or chat == STATUS_BROADCAST or src.Chat.Server in _SKIPPED_SERVERS or not info.ID:
        return None
    from_me = bool(src.IsFromMe)
    return InboundMessage(
        wa_message_id=info.ID, chat_jid=chat, sender_jid=jid_to_str(src.Sender) or chat, body="", from_me=from_me,
        is_group=bool(src.IsGroup), push_name=info.Pushname or None, timestamp=timestamp_seconds(info.Timestamp),
        own_jid=own_jid, content=InboundContent(kind=Kind.UNDECRYPTABLE, body=""),
    )


def map_login_status(status: str) -> BackendEvent | None:
    """Map a whatsmeow QR-channel status (neonize's *login status* callback).

    ``success`` needs nothing (``Connected`` follows); ``timeout`` means no one
    scanned the codes in time (reported as ``connect_timeout`` / ``qr_timeout``
    so the runner reconnects and shows a fresh QR); ``err-*`` is a pairing
    failure; ``error`` a connection error while waiting.
    """
    status = (status or "").strip()
    if status in ("", "code", "success"):
        return None
    if status == "timeout":
        return Disconnected(reason="connect_timeout", detail="qr_timeout")
    if status == "err-client-outdated":
        return Disconnected(reason="connect_failure", detail="client_outdated")
    if status.startswith("err"):
        return Disconnected(reason="pair_failure", detail=status)
    return Disconnected(reason="network", detail=f"qr channel: {status}")


def map_event(
    ev: Any, *, own_jid: str | None = None, push_name: str | None = None, now: float | None = None
) -> BackendEvent | None:
    """Map one neonize event protobuf to a backend event (None: nothing to report).
    ``now`` (epoch seconds, default the clock) dates a temporary ban's end."""
    name = ev.DESCRIPTOR.name
    if name == "Message":
        return map_message(ev, own_jid)
    if name == "Receipt":
        return map_receipt(ev)
    if name == "CallOffer":
        return map_call_offer(ev)
    if name == "UndecryptableMessage":
        return map_undecryptable(ev, own_jid)
    if name == "QR":
        return QrCode(code=ev.Codes[0]) if len(ev.Codes) else None
    if name == "Connected":
        return Connected(jid=own_jid, push_name=push_name or None)
    if name == "PairStatus":
        if ev.Status == PAIR_STATUS_ERROR:
            return Disconnected(reason="pair_failure", detail=ev.Error or None)
        return None  # success: whatsmeow reconnects and sends Connected
    if name == "Disconnected":
        return Disconnected(reason="network")
    if name == "LoggedOut":
        reason = CONNECT_FAILURE_NAMES.get(ev.Reason, "logged_out")
        detail = f"{reason}{' on connect' if ev.OnConnect else ''}"
        return LoggedOut(reason="logged_out", detail=detail)
    if name == "StreamReplaced":
        return Disconnected(reason="stream_replaced")
    if name == "TemporaryBan":
        expire = float(ev.Expire) if ev.Expire and ev.Expire > 0 else None
        code = TEMP_BAN_NAMES.get(ev.Code, f"code {ev.Code}")
        return Disconnected(
            reason="temporary_ban",
            detail=code,
            retry_after_s=expire,
            ban_code=code,
            ban_expires_at=None if expire is None else (time.time() if now is None else now) + expire,
        )
    if name == "ConnectFailure":
        reason_name = CONNECT_FAILURE_NAMES.get(ev.Reason, f"reason {ev.Reason}")
        detail = f"{reason_name}: {ev.Message}" if ev.Message else reason_name
        if ev.Reason in LOGGED_OUT_REASONS:
            return LoggedOut(reason="logged_out", detail=detail)
        if ev.Reason == CF_TEMP_BANNED:
            return Disconnected(reason="temporary_ban", detail=detail)
        return Disconnected(reason="connect_failure", detail=detail)
    if name == "ClientOutdated":
        return Disconnected(reason="connect_failure", detail="client_outdated")
    if name == "StreamError":
        return Disconnected(reason="network", detail=f"stream_error {ev.Code}".strip())
    return None  # KeepAlive*, presence, history sync, other call events, ...


def identity_from_event(ev: Any) -> tuple[str | None, str | None]:
    """(own JID, push name) carried by a ``Device`` or successful ``PairStatus``."""
    name = ev.DESCRIPTOR.name
    if name == "Device":
        return jid_to_str(ev.JID) if _has(ev, "JID") else None, ev.PushName or None
    if name == "PairStatus" and ev.Status == PAIR_STATUS_SUCCESS and _has(ev, "ID"):
        return jid_to_str(ev.ID), None
    return None, None


def is_terminal(event: BackendEvent | None) -> bool:
    """True for events that end a connection attempt."""
    return isinstance(event, (Disconnected, LoggedOut))
