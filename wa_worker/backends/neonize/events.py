"""Pure mapping of neonize (whatsmeow) protobuf events to backend dataclasses,
like mautrix's msgconv: no client, thread or loop here, and no neonize import
(events are recognised by protobuf message name, enums by number, pinned by the
tests). JIDs, timestamps and skipped messages: docs/neonize.md, "Events"."""

from __future__ import annotations

from typing import Any

from ..base import BackendEvent, Connected, Disconnected, InboundMessage, LoggedOut, QrCode

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


def timestamp_seconds(raw: int | float | None) -> float:
    """Seconds since the epoch from a neonize timestamp in seconds *or* milliseconds."""
    if not raw or raw < 0:
        return 0.0
    value = float(raw)
    if value > _MS_THRESHOLD:
        value /= 1000.0
    return value


def _unwrap(msg: Any) -> Any:
    """Strip the wrappers whatsmeow may leave around the real content."""
    for _ in range(4):  # wrappers nest at most a couple of levels
        for wrapper in (
            "ephemeralMessage",
            "viewOnceMessage",
            "viewOnceMessageV2",
            "viewOnceMessageV2Extension",
            "documentWithCaptionMessage",
        ):
            if _has(msg, wrapper) and _has(getattr(msg, wrapper), "message"):
                msg = getattr(msg, wrapper).message
                break
        else:
            return msg
    return msg


def extract_text(message: Any) -> str | None:
    """The text body of a ``waE2E.Message`` or None (no text, protocol message...)."""
    if message is None:
        return None
    msg = _unwrap(message)
    if _has(msg, "protocolMessage") or _has(msg, "editedMessage"):
        return None
    if _has(msg, "conversation") and msg.conversation:
        return msg.conversation
    if _has(msg, "extendedTextMessage") and msg.extendedTextMessage.text:
        return msg.extendedTextMessage.text
    for media in ("imageMessage", "videoMessage", "documentMessage"):
        if _has(msg, media) and getattr(msg, media).caption:
            return getattr(msg, media).caption
    return None


def map_message(ev: Any, own_jid: str | None = None) -> InboundMessage | None:
    """Map a neonize ``Message`` event to :class:`InboundMessage` (or None to skip)."""
    info = ev.Info
    src = info.MessageSource
    chat = jid_to_str(src.Chat)
    if not chat or chat == STATUS_BROADCAST or src.Chat.Server in _SKIPPED_SERVERS:
        return None
    if getattr(ev, "IsEdit", False):
        return None
    body = extract_text(ev.Message) if _has(ev, "Message") else None
    if body is None and _has(ev, "Raw"):
        body = extract_text(ev.Raw)
    if body is None or not body.strip():
        return None
    from_me = bool(src.IsFromMe)
    sender = jid_to_str(src.Sender) or (own_jid if from_me else None) or chat
    return InboundMessage(
        wa_message_id=info.ID,
        chat_jid=chat,
        sender_jid=sender,
        body=body,
        from_me=from_me,
        is_group=bool(src.IsGroup),
        push_name=info.Pushname or None,
        timestamp=timestamp_seconds(info.Timestamp),
        own_jid=own_jid,
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
    ev: Any, *, own_jid: str | None = None, push_name: str | None = None
) -> BackendEvent | None:
    """Map one neonize event protobuf to a backend event (None: nothing to report)."""
    name = ev.DESCRIPTOR.name
    if name == "Message":
        return map_message(ev, own_jid)
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
        return Disconnected(
            reason="temporary_ban",
            detail=TEMP_BAN_NAMES.get(ev.Code, f"code {ev.Code}"),
            retry_after_s=expire,
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
    return None  # KeepAlive*, receipts, presence, history sync, ...


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
