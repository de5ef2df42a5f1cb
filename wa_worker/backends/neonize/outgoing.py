"""Build the ``waE2E.Message`` of an :class:`OutgoingMessage` on a neonize client
(docs/neonize.md, "Sending"). Media goes to WhatsApp through ``client.upload``
(the builders call it); sending the built message is the session's job.

neonize's builders are used where they only do what we want (image, document,
sticker, replies); video, audio/voice, location, contact and reaction messages
are built here from the upload response, because neonize's builders run ffmpeg
(video thumbnail, duration), re-sniff the voice mimetype, or need Go for work
we can do exactly ourselves.
"""

from __future__ import annotations

import time
from typing import Any

from ...messages import Kind
from ..base import MessageRef, OutgoingMessage, SendError
from .loading import NeonizeLib, jid_proto
from .threads import CallTimeout

#: WhatsApp plays a voice note (PTT) only as Ogg/Opus, labelled exactly so
VOICE_MIMETYPE = "audio/ogg; codecs=opus"
_GROUP_SERVER = "g.us"
#: a sticker must be a WebP (sent as is) or a still image neonize converts
_STICKER_CONVERTIBLE = ("image/png", "image/jpeg", "image/gif", "image/webp")


#: whatsmeow send errors that no retry can cure (the recipient cannot receive this)
_PERMANENT_SEND = ("unknown server", "ad jid", "broadcast list", "invalid jid", "not on whatsapp")


def is_permanent_send_error(text: str) -> bool:
    low = text.lower()
    return any(marker in low for marker in _PERMANENT_SEND)


class MediaRefused(SendError):
    """The media or the message cannot be sent as given (never worth retrying).
    ``code`` is the /mark-failed ``error_code`` it deserves (docs/proxy-contract.md)."""

    def __init__(self, message: str, code: str = "invalid_message") -> None:
        super().__init__(message, permanent=True, code=code)


def _server(jid: str) -> str:
    return jid.rpartition("@")[2]


def _same_chat(a: str, b: str) -> bool:
    def norm(j: str) -> str:
        user, _, server = j.strip().rpartition("@")
        return f"{user.split(':', 1)[0]}@{server}"

    return norm(a) == norm(b)


def quoted_author(ref: MessageRef, own_jid: str | None) -> str:
    """The JID of the quoted/reacted message's author, as ``participant`` needs it."""
    if ref.sender_jid:
        return ref.sender_jid
    if ref.from_me and own_jid:
        return own_jid
    if not ref.from_me and _server(ref.chat_jid) != _GROUP_SERVER:
        return ref.chat_jid  # in a one-to-one chat the other side wrote it
    raise MediaRefused(f"the author of message {ref.wa_message_id} is unknown: cannot quote or react to it",
                       code="reply_target_unknown")


def quoted_event(ref: MessageRef, own_jid: str | None) -> Any:
    """A neonize ``Message`` event standing for the message ``ref`` names, for the
    library's ``quoted=`` parameters. Its content is an empty text: we do not keep
    the bodies of old messages, and WhatsApp clients show the original they hold
    (docs/neonize.md, "Sending")."""
    nz = NeonizeLib.get()
    try:
        chat = jid_proto(ref.chat_jid)
        sender = jid_proto(quoted_author(ref, own_jid))
    except ValueError as exc:
        raise MediaRefused(f"cannot quote message {ref.wa_message_id}: {exc}", code="reply_target_unknown") from None
    return nz.pb.Message(
        Info=nz.pb.MessageInfo(
            ID=ref.wa_message_id,
            MessageSource=nz.pb.MessageSource(Chat=chat, Sender=sender, IsFromMe=ref.from_me,
                                              IsGroup=_server(ref.chat_jid) == _GROUP_SERVER),
        ),
        Message=nz.WAMessage(conversation=""),
    )


def reply_context(client: Any, message: OutgoingMessage, own_jid: str | None) -> Any | None:
    """The ``ContextInfo`` making ``message`` a reply (``remoteJID`` set when the
    quoted message is in another chat), or None."""
    ref = message.reply_to
    if ref is None:
        return None
    private = not _same_chat(ref.chat_jid, message.to_jid)
    return client._make_quoted_message(quoted_event(ref, own_jid), reply_privately=private)


def reaction_message(ref: MessageRef, emoji: str, own_jid: str | None, now_ms: int | None = None) -> Any:
    """A ``reactionMessage`` on ``ref`` (whatsmeow's ``BuildReaction`` key rules:
    ``participant`` only for someone else's message in a group)."""
    nz = NeonizeLib.get()
    # neonize's modules load its Go library: imported on first use, like NeonizeLib (docs/neonize.md)
    from neonize.proto.waCommon.WACommon_pb2 import MessageKey
    from neonize.proto.waE2E.WAWebProtobufsE2E_pb2 import ReactionMessage

    key = MessageKey(remoteJID=ref.chat_jid, fromMe=ref.from_me, ID=ref.wa_message_id)
    if not ref.from_me and _server(ref.chat_jid) == _GROUP_SERVER:
        key.participant = quoted_author(ref, own_jid)
    stamp = now_ms if now_ms is not None else int(time.time() * 1000)
    return nz.WAMessage(reactionMessage=ReactionMessage(key=key, text=emoji, senderTimestampMS=stamp))


def _uploaded_fields(upload: Any) -> dict[str, Any]:
    return {
        "URL": upload.url,
        "directPath": upload.DirectPath,
        "mediaKey": upload.MediaKey,
        "fileEncSHA256": upload.FileEncSHA256,
        "fileSHA256": upload.FileSHA256,
        "fileLength": upload.FileLength,
    }


def _set_context(sub: Any, context: Any | None) -> None:
    if context is not None:
        sub.contextInfo.MergeFrom(context)


# long: one short branch per message kind; split up, the kinds would no longer read as one table
async def build_message(client: Any, message: OutgoingMessage, data: bytes | None,
                        own_jid: str | None = None) -> Any:
    """The ``waE2E.Message`` to send for ``message``; ``data`` holds the media's
    bytes (never a path or URL: neonize would open or fetch it). Uploads media
    through ``client.upload``. Raises :class:`MediaRefused` for what can never be sent."""
    # neonize's modules load its Go library: imported on first use, like NeonizeLib (docs/neonize.md)
    from neonize.proto.waE2E import WAWebProtobufsE2E_pb2 as e2e
    from neonize.utils.enum import MediaType

    nz = NeonizeLib.get()
    kind = message.kind
    media = message.media
    quoted = quoted_event(message.reply_to, own_jid) if message.reply_to is not None else None
    context = reply_context(client, message, own_jid)
    private = context is not None and context.remoteJID != ""

    if kind is Kind.TEXT:
        if not message.body.strip():
            raise MediaRefused("empty text")
        if quoted is None:
            return nz.WAMessage(conversation=message.body)
        return await client.build_reply_message(message.body, quoted, reply_privately=private)
    if kind is Kind.REACTION:
        if message.reply_to is None or message.reaction is None:
            raise MediaRefused("a reaction needs its emoji and the message it reacts to")
        return reaction_message(message.reply_to, message.reaction, own_jid)
    if kind is Kind.LOCATION:
        loc = message.location
        if loc is None:
            raise MediaRefused("a location message needs its coordinates")
        sub = e2e.LocationMessage(degreesLatitude=loc.latitude, degreesLongitude=loc.longitude,
                                  name=loc.name, address=loc.address)
        _set_context(sub, context)
        return nz.WAMessage(locationMessage=sub)
    if kind is Kind.CONTACT:
        card = message.contact
        if card is None:
            raise MediaRefused("a contact message needs its card")
        contact = e2e.ContactMessage(displayName=card.name, vcard=card.vcard)
        _set_context(contact, context)
        return nz.WAMessage(contactMessage=contact)

    if media is None or data is None:
        raise MediaRefused(f"a {kind.value} message needs its media")
    caption = message.body or None
    mimetype = media.mimetype.split(";", 1)[0].strip().lower()
    try:
        if kind is Kind.IMAGE:
            built = await client.build_image_message(data, caption=caption, quoted=quoted)
            sub = built.imageMessage
        elif kind is Kind.DOCUMENT:
            built = await client.build_document_message(
                data, caption=caption, filename=media.filename or "document", mimetype=media.mimetype,
                quoted=quoted)
            sub = built.documentMessage
        elif kind is Kind.STICKER:
            if mimetype not in _STICKER_CONVERTIBLE:
                raise MediaRefused(f"a sticker must be a WebP, PNG, JPEG or GIF image, not {mimetype}",
                                   code="media_invalid")
            built = await client.build_sticker_message(data, quoted=quoted, passthrough=mimetype == "image/webp")
            sub = built.stickerMessage
        elif kind is Kind.VIDEO:
            upload = await client.upload(data, MediaType.MediaVideo)
            sub = e2e.VideoMessage(mimetype=media.mimetype, caption=caption, seconds=media.seconds,
                                   **_uploaded_fields(upload))
            built = nz.WAMessage(videoMessage=sub)
            sub = built.videoMessage
            _set_context(sub, context)
        elif kind in (Kind.AUDIO, Kind.VOICE):
            voice = kind is Kind.VOICE
            if voice and mimetype != "audio/ogg":
                raise MediaRefused(f"a voice note must be OGG/Opus audio, not {mimetype}", code="media_invalid")
            upload = await client.upload(data, MediaType.MediaAudio)
            sub = e2e.AudioMessage(mimetype=VOICE_MIMETYPE if voice else media.mimetype, PTT=voice,
                                   seconds=media.seconds, **_uploaded_fields(upload))
            built = nz.WAMessage(audioMessage=sub)
            sub = built.audioMessage
            _set_context(sub, context)
        else:
            raise MediaRefused(f"cannot send a {kind.value} message")
    except (SendError, nz.UploadError, CallTimeout, RuntimeError):
        raise  # refused above, or the upload itself failed: the session says which
    except Exception as exc:  # neonize's builders run PIL and libmagic on the bytes
        # an image PIL cannot read (UnidentifiedImageError, DecompressionBombError), a bad sticker ...
        raise MediaRefused(f"the {kind.value} is not valid media: {type(exc).__name__}: {exc}",
                           code="media_invalid") from exc
    if private and context is not None:  # neonize's builders quote in the same chat only
        sub.contextInfo.remoteJID = context.remoteJID
    return built
