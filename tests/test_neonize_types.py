"""Every kind of message on the neonize backend, offline, with the real library.

* Sending: neonize's real builders (and ours) run on a real ``NewAClient``; only
  the Go calls that would reach WhatsApp (``Upload``, ``SendMessage``) are
  replaced, by :class:`FakeGo`, which answers with real neonize protobufs. The
  message we would send is asserted field by field.
* Receiving: real neonize ``Message`` event protobufs, pushed through the ctypes
  callback Go calls, mapped to ``InboundMessage``/``InboundContent``.
* Downloads: garbage handles, a session that is not connected, and a real Go
  ``DownloadAny`` on a client that never connected.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from tests.neonize_helpers import Recorder, StalledProxy, jid, message_event, push_event
from wa_worker.backends.base import (
    Disconnected,
    InboundMessage,
    MediaFile,
    MediaUnavailable,
    MessageRef,
    NotConnectedError,
    OutgoingMessage,
    SendError,
)
from wa_worker.backends.neonize import NeonizeBackend
from wa_worker.backends.neonize import events as ne
from wa_worker.backends.neonize.loading import NeonizeLib
from wa_worker.backends.neonize.media import message_from_handle
from wa_worker.backends.neonize.outgoing import VOICE_MIMETYPE, build_message
from wa_worker.messages import ContactCard, InboundContent, Kind, Location, MediaInfo, build_vcard

pytestmark = [pytest.mark.neonize, pytest.mark.timeout(60)]

MESSAGE = 17  # neonize event code of Message
ME = "5511999990000@s.whatsapp.net"
ALICE = "5511888880000@s.whatsapp.net"
BOB = "5511777770000@s.whatsapp.net"
GROUP = "120363012345678901@g.us"
MEDIA_KEY = bytes(range(32))
ENC_SHA = hashlib.sha256(b"encrypted").digest()


def _e2e() -> Any:
    from neonize.proto.waE2E import WAWebProtobufsE2E_pb2 as e2e

    return e2e


def _pb() -> Any:
    from neonize.proto import Neonize_pb2

    return Neonize_pb2


class FakeGo:
    """Stands in for goneonize's network calls: records what neonize hands to Go
    and answers with the real protobufs Go would return."""

    def __init__(self, send_error: str = "") -> None:
        self.uploads: list[tuple[bytes, int]] = []
        self.sent: list[tuple[Any, Any]] = []  # (to JID, waE2E.Message)
        self.send_error = send_error
        self.upload_error = ""

    def upload_response(self, data: bytes) -> Any:
        return _pb().UploadResponse(
            url="https://mmg.whatsapp.net/v/t62.7118-24/abc?ccb=11", DirectPath="/v/t62.7118-24/abc",
            MediaKey=MEDIA_KEY, FileEncSHA256=ENC_SHA, FileSHA256=hashlib.sha256(data).digest(),
            FileLength=len(data), Handle="")

    async def Upload(self, uuid: bytes, binary: bytes, size: int, media_type: int) -> bytes:  # noqa: N802 - Go's name
        data = bytes(binary[:size])
        self.uploads.append((data, media_type))
        if self.upload_error:
            return _pb().UploadReturnFunction(Error=self.upload_error).SerializeToString()
        return _pb().UploadReturnFunction(UploadResponse=self.upload_response(data)).SerializeToString()

    async def SendMessage(self, uuid: bytes, to: bytes, to_len: int, msg: bytes, msg_len: int) -> bytes:  # noqa: N802
        pb = _pb()
        self.sent.append((pb.JID.FromString(bytes(to[:to_len])), _e2e().Message.FromString(bytes(msg[:msg_len]))))
        if self.send_error:
            return pb.SendMessageReturnFunction(Error=self.send_error).SerializeToString()
        timings = pb.MessageDebugTimings(Queue=0, Marshal=0, GetParticipants=0, GetDevices=0, GroupEncrypt=0,
                                         PeerEncrypt=0, Send=0, Resp=0, Retry=0)
        resp = pb.SendResponse(ID="3EB0SENT0001", Timestamp=1_700_000_000, ServerID=0, DebugTimings=timings)
        return pb.SendMessageReturnFunction(SendResponse=resp).SerializeToString()


def _client(tmp_path: Path, fake: FakeGo) -> Any:
    client = NeonizeLib.get().NewAClient(str(tmp_path / "types.db"), uuid="types-test")
    client._stop_finalizer.detach()
    client._NewAClient__client = fake
    return client


def _media_file(tmp_path: Path, name: str, data: bytes, mimetype: str, **kw: Any) -> MediaFile:
    path = tmp_path / name
    path.write_bytes(data)
    return MediaFile(path=path, mimetype=mimetype, size=len(data), sha256=hashlib.sha256(data).hexdigest(), **kw)


def _image(fmt: str = "JPEG", size: tuple[int, int] = (640, 480), mode: str = "RGB") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, (200, 30, 30) if mode == "RGB" else (200, 30, 30, 128)).save(buf, format=fmt)
    return buf.getvalue()


def _assert_uploaded(sub: Any, data: bytes) -> None:
    assert sub.URL.startswith("https://mmg.whatsapp.net/") and sub.directPath == "/v/t62.7118-24/abc"
    assert sub.mediaKey == MEDIA_KEY and sub.fileEncSHA256 == ENC_SHA
    assert sub.fileSHA256 == hashlib.sha256(data).digest() and sub.fileLength == len(data)


async def _build(tmp_path: Path, message: OutgoingMessage, data: bytes | None = None,
                 fake: FakeGo | None = None) -> tuple[Any, FakeGo]:
    fake = fake or FakeGo()
    built = await build_message(_client(tmp_path, fake), message, data, ME)
    return built, fake


# --------------------------------------------------------------------------- building


def test_text_and_replies(tmp_path: Path) -> None:
    async def main() -> None:
        built, _ = await _build(tmp_path, OutgoingMessage(ALICE, Kind.TEXT, "hi"))
        assert built == _e2e().Message(conversation="hi")

        # a reply to Alice's message in our chat with her: participant = Alice, no remoteJID
        ref = MessageRef("3EB0ALICE1", ALICE, ALICE, False)
        built, _ = await _build(tmp_path, OutgoingMessage(ALICE, Kind.TEXT, "answer", reply_to=ref))
        ext = built.extendedTextMessage
        assert ext.text == "answer"
        ctx = ext.contextInfo
        assert (ctx.stanzaID, ctx.participant, ctx.remoteJID) == ("3EB0ALICE1", ALICE, "")
        assert ctx.HasField("quotedMessage")

        # our own message (sender unknown): participant = our JID
        mine = MessageRef("3EB0MINE01", ALICE, None, True)
        built, _ = await _build(tmp_path, OutgoingMessage(ALICE, Kind.TEXT, "again", reply_to=mine))
        assert built.extendedTextMessage.contextInfo.participant == ME

        # in a group: participant = the author (device suffix dropped)
        in_group = MessageRef("3EB0GROUP1", GROUP, "5511777770000:12@s.whatsapp.net", False)
        built, _ = await _build(tmp_path, OutgoingMessage(GROUP, Kind.TEXT, "+1", reply_to=in_group))
        ctx = built.extendedTextMessage.contextInfo
        assert (ctx.stanzaID, ctx.participant, ctx.remoteJID) == ("3EB0GROUP1", BOB, "")

        # replying privately to a group message: remoteJID names the group
        built, _ = await _build(tmp_path, OutgoingMessage(BOB, Kind.TEXT, "dm", reply_to=in_group))
        assert built.extendedTextMessage.contextInfo.remoteJID == GROUP

        # a group message whose author we do not know cannot be quoted
        with pytest.raises(SendError) as err:
            await _build(tmp_path, OutgoingMessage(GROUP, Kind.TEXT, "?", reply_to=MessageRef("X1", GROUP)))
        assert err.value.permanent and "author" in str(err.value) and err.value.code == "reply_target_unknown"

    asyncio.run(main())


def test_image_video_document(tmp_path: Path) -> None:
    async def main() -> None:
        jpeg = _image()
        media = _media_file(tmp_path, "p.jpg", jpeg, "image/jpeg")
        ref = MessageRef("3EB0Q1", ALICE, ALICE, False)
        built, fake = await _build(tmp_path, OutgoingMessage(ALICE, Kind.IMAGE, "a photo", media, reply_to=ref), jpeg)
        img = built.imageMessage
        assert img.mimetype == "image/jpeg" and img.caption == "a photo"
        _assert_uploaded(img, jpeg)
        assert img.JPEGThumbnail[:2] == b"\xff\xd8"  # neonize's builder made a JPEG thumbnail
        assert img.contextInfo.stanzaID == "3EB0Q1" and img.contextInfo.participant == ALICE
        assert fake.uploads == [(jpeg, 0)]  # MediaImage

        video = b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 2000
        media = _media_file(tmp_path, "v.mp4", video, "video/mp4", seconds=12)
        built, fake = await _build(tmp_path, OutgoingMessage(ALICE, Kind.VIDEO, "clip", media), video)
        vid = built.videoMessage
        assert (vid.mimetype, vid.caption, vid.seconds) == ("video/mp4", "clip", 12)
        _assert_uploaded(vid, video)
        assert not vid.HasField("JPEGThumbnail") and not vid.HasField("contextInfo")  # no ffmpeg, no reply
        assert fake.uploads == [(video, 1)]  # MediaVideo

        pdf = b"%PDF-1.4\n" + b"x" * 3000
        media = _media_file(tmp_path, "r.pdf", pdf, "application/pdf", filename="report.pdf")
        built, fake = await _build(tmp_path, OutgoingMessage(ALICE, Kind.DOCUMENT, "the report", media), pdf)
        doc = built.documentMessage
        assert (doc.mimetype, doc.fileName, doc.caption) == ("application/pdf", "report.pdf", "the report")
        _assert_uploaded(doc, pdf)
        assert fake.uploads == [(pdf, 3)]  # MediaDocument

        # a document without a name still gets one (WhatsApp shows it)
        media = _media_file(tmp_path, "n.pdf", pdf, "application/pdf")
        built, _ = await _build(tmp_path, OutgoingMessage(ALICE, Kind.DOCUMENT, "", media), pdf)
        assert built.documentMessage.fileName == "document" and not built.documentMessage.HasField("caption")

        # bytes PIL cannot read are refused for good, before any upload
        media = _media_file(tmp_path, "bad.jpg", b"not an image", "image/jpeg")
        with pytest.raises(SendError) as err:
            await _build(tmp_path, OutgoingMessage(ALICE, Kind.IMAGE, "", media), b"not an image", fake=(f := FakeGo()))
        assert err.value.permanent and err.value.code == "media_invalid" and f.uploads == []

    asyncio.run(main())


def test_audio_voice_sticker(tmp_path: Path) -> None:
    async def main() -> None:
        mp3 = b"ID3\x03\x00\x00\x00" + b"\x11" * 4000
        media = _media_file(tmp_path, "a.mp3", mp3, "audio/mpeg", seconds=95)
        built, fake = await _build(tmp_path, OutgoingMessage(ALICE, Kind.AUDIO, "", media), mp3)
        aud = built.audioMessage
        assert (aud.mimetype, aud.PTT, aud.seconds) == ("audio/mpeg", False, 95)
        _assert_uploaded(aud, mp3)
        assert fake.uploads == [(mp3, 2)]  # MediaAudio

        ogg = b"OggS\x00\x02" + b"\x00" * 22 + b"OpusHead" + b"\x01" * 3000
        media = _media_file(tmp_path, "v.ogg", ogg, "audio/ogg", seconds=7)
        ref = MessageRef("3EB0Q2", GROUP, ALICE, False)
        built, fake = await _build(tmp_path, OutgoingMessage(GROUP, Kind.VOICE, "", media, reply_to=ref), ogg)
        voice = built.audioMessage
        assert (voice.mimetype, voice.PTT, voice.seconds) == (VOICE_MIMETYPE, True, 7)
        assert voice.mimetype == "audio/ogg; codecs=opus"
        assert voice.contextInfo.stanzaID == "3EB0Q2" and voice.contextInfo.participant == ALICE
        _assert_uploaded(voice, ogg)

        media = _media_file(tmp_path, "v.mp3", mp3, "audio/mpeg")
        with pytest.raises(SendError) as err:
            await _build(tmp_path, OutgoingMessage(ALICE, Kind.VOICE, "", media), mp3)
        assert err.value.permanent and "OGG/Opus" in str(err.value) and err.value.code == "media_invalid"

        webp = _image("WEBP", (512, 512), "RGBA")
        media = _media_file(tmp_path, "s.webp", webp, "image/webp")
        built, fake = await _build(tmp_path, OutgoingMessage(ALICE, Kind.STICKER, "", media), webp)
        stk = built.stickerMessage
        assert stk.mimetype == "image/webp" and stk.isAnimated is False
        assert fake.uploads[0][0] == webp  # a WebP goes as is
        _assert_uploaded(stk, webp)

        png = _image("PNG", (300, 200), "RGBA")
        media = _media_file(tmp_path, "s.png", png, "image/png")
        built, fake = await _build(tmp_path, OutgoingMessage(ALICE, Kind.STICKER, "", media), png)
        converted = fake.uploads[0][0]
        assert converted[:4] == b"RIFF" and converted[8:12] == b"WEBP"  # neonize converted it
        assert built.stickerMessage.mimetype == "image/webp"
        _assert_uploaded(built.stickerMessage, converted)

        media = _media_file(tmp_path, "s.mp4", b"\x00" * 100, "video/mp4")
        with pytest.raises(SendError) as err:
            await _build(tmp_path, OutgoingMessage(ALICE, Kind.STICKER, "", media), b"\x00" * 100)
        assert err.value.permanent

    asyncio.run(main())


def test_location_contact_reaction(tmp_path: Path) -> None:
    async def main() -> None:
        loc = Location(-23.5505, -46.6333, "Praça da Sé", "São Paulo, SP")
        built, fake = await _build(tmp_path, OutgoingMessage(ALICE, Kind.LOCATION, location=loc))
        lm = built.locationMessage
        assert (lm.degreesLatitude, lm.degreesLongitude, lm.name, lm.address) == (
            -23.5505, -46.6333, "Praça da Sé", "São Paulo, SP")
        assert fake.uploads == []

        bare = Location(1.5, 2.25)
        built, _ = await _build(tmp_path, OutgoingMessage(ALICE, Kind.LOCATION, location=bare,
                                                          reply_to=MessageRef("3EB0Q3", ALICE)))
        assert not built.locationMessage.HasField("name") and not built.locationMessage.HasField("address")
        assert built.locationMessage.contextInfo.stanzaID == "3EB0Q3"

        vcard = build_vcard("Maria Silva", "+55 11 98888-7777")
        built, _ = await _build(tmp_path, OutgoingMessage(ALICE, Kind.CONTACT, contact=ContactCard("Maria Silva", vcard)))
        assert (built.contactMessage.displayName, built.contactMessage.vcard) == ("Maria Silva", vcard)
        assert "waid=5511988887777" in built.contactMessage.vcard

        # reacting to Alice's message in a one-to-one chat: no participant
        ref = MessageRef("3EB0R1", ALICE, ALICE, False)
        t0 = int(time.time() * 1000)
        built, _ = await _build(tmp_path, OutgoingMessage(ALICE, Kind.REACTION, reaction="👍", reply_to=ref))
        rm = built.reactionMessage
        assert rm.text == "👍" and rm.senderTimestampMS >= t0
        assert (rm.key.remoteJID, rm.key.fromMe, rm.key.ID, rm.key.HasField("participant")) == (
            ALICE, False, "3EB0R1", False)
        # in a group, someone else's message: participant is its author
        ref = MessageRef("3EB0R2", GROUP, BOB, False)
        built, _ = await _build(tmp_path, OutgoingMessage(GROUP, Kind.REACTION, reaction="", reply_to=ref))
        rm = built.reactionMessage
        assert (rm.key.remoteJID, rm.key.fromMe, rm.key.ID, rm.key.participant, rm.text) == (
            GROUP, False, "3EB0R2", BOB, "")
        assert rm.HasField("text")  # "" removes the reaction: present, empty
        # our own message in a group: fromMe, no participant
        ref = MessageRef("3EB0R3", GROUP, ME, True)
        built, _ = await _build(tmp_path, OutgoingMessage(GROUP, Kind.REACTION, reaction="❤️", reply_to=ref))
        assert built.reactionMessage.key.fromMe and not built.reactionMessage.key.HasField("participant")

    asyncio.run(main())


# --------------------------------------------------------------------------- sending through a session


async def _stalled(backend: NeonizeBackend, iid: str, rec: Recorder) -> tuple[Any, Any]:
    session = await backend.open_session(iid, rec)
    await session.connect()
    att = session._attempt
    deadline = time.monotonic() + 5
    while att.ticket.connections == 0:
        assert time.monotonic() < deadline, "client never reached the relay"
        await asyncio.sleep(0.02)
    return session, att


class GoProxy:
    """goneonize with its network calls replaced by :class:`FakeGo` (the rest is
    the real library); installed for the pool's calls, restored afterwards."""

    def __init__(self, fake: FakeGo) -> None:
        self.fake = fake
        self.real = NeonizeLib.get().gocode

    def __getattr__(self, name: str) -> Any:
        fake_fn = getattr(self.fake, name, None)
        if fake_fn is None:
            return getattr(self.real, name)

        def call(*args: Any) -> Any:  # the pool runs this in a thread: run the fake there
            return asyncio.run(fake_fn(*args))

        return call


# long: one scenario through the real Go send path
def test_session_send_goes_through_the_pool_to_go(tmp_path: Path) -> None:
    """``session.send`` of each kind reaches Go's ``SendMessage`` (through the pool
    and gate) with the message built above; errors keep their meaning."""

    async def main() -> None:
        lib = NeonizeLib.get()
        async with StalledProxy() as stalled:
            backend = NeonizeBackend(tmp_path / "auth", connect_timeout_s=30, upstream_proxy=stalled.url,
                                     send_timeout_s=5)
            async with backend:
                session, att = await _stalled(backend, "types1", Recorder())
                jpeg = _image()
                media = _media_file(tmp_path, "p.jpg", jpeg, "image/jpeg")
                with pytest.raises(NotConnectedError):
                    await session.send(OutgoingMessage(ALICE, Kind.IMAGE, "x", media))
                att.connected = True  # pretend it is online: Go's network calls are faked below
                fake = FakeGo()
                real = lib.gocode
                lib.gocode = GoProxy(fake)
                try:
                    wa_id = await session.send(OutgoingMessage(ALICE, Kind.IMAGE, "x", media))
                    assert wa_id == "3EB0SENT0001"
                    to, sent = fake.sent[-1]
                    assert (to.User, to.Server) == ("5511888880000", "s.whatsapp.net")
                    assert sent.imageMessage.caption == "x" and sent.imageMessage.fileLength == len(jpeg)
                    assert fake.uploads == [(jpeg, 0)]

                    # a reaction goes to the chat of its target
                    ref = MessageRef("3EB0R9", GROUP, BOB, False)
                    await session.send(OutgoingMessage(ALICE, Kind.REACTION, reaction="🙏", reply_to=ref))
                    to, sent = fake.sent[-1]
                    assert (to.User, to.Server) == ("120363012345678901", "g.us")
                    assert sent.reactionMessage.key.participant == BOB

                    await session.send(OutgoingMessage(ALICE, Kind.TEXT, "plain"))
                    assert fake.sent[-1][1] == lib.WAMessage(conversation="plain")

                    fake.send_error = "can't send message to unknown server"
                    with pytest.raises(SendError) as err:
                        await session.send(OutgoingMessage("123@bogus.example", Kind.TEXT, "x"))
                    assert err.value.permanent
                    fake.send_error = "failed to get device list: websocket disconnected"
                    with pytest.raises(SendError) as err:
                        await session.send(OutgoingMessage(ALICE, Kind.LOCATION, location=Location(1, 2)))
                    assert not err.value.permanent

                    # upload failures: nothing sent; offline -> not connected; 413 -> never
                    fake.send_error = ""
                    n = len(fake.sent)
                    for error, expected, permanent in [
                        ("failed to refresh media connections: websocket not connected", NotConnectedError, False),
                        ("upload failed with status code 413", SendError, True),
                        ("upload failed with status code 500", SendError, False),
                    ]:
                        fake.upload_error = error
                        with pytest.raises(expected) as err:
                            await session.send(OutgoingMessage(ALICE, Kind.IMAGE, "x", media))
                        assert err.value.permanent is permanent and error in str(err.value)
                    fake.upload_error = ""
                    assert len(fake.sent) == n

                    # the media file vanished: a clear, not permanent failure, nothing sent
                    n = len(fake.sent)
                    gone = MediaFile(tmp_path / "gone.jpg", "image/jpeg", 1, "00")
                    with pytest.raises(SendError, match="cannot read the media file"):
                        await session.send(OutgoingMessage(ALICE, Kind.IMAGE, "", gone))
                    assert len(fake.sent) == n
                finally:
                    lib.gocode = real
                await session.close()

    asyncio.run(main())


# --------------------------------------------------------------------------- receiving


# long: a table of real event protobufs, one entry per inbound kind
def _inbound_cases() -> list[tuple[str, Any, dict[str, Any], InboundContent | None, str]]:
    """(id, waE2E.Message, event kwargs, expected content, expected body)."""
    e2e = _e2e()
    from neonize.proto.waCommon.WACommon_pb2 import MessageKey

    sha = hashlib.sha256(b"bytes").digest()
    img = e2e.ImageMessage(URL="https://mmg.whatsapp.net/i", directPath="/i", mediaKey=MEDIA_KEY,
                           fileEncSHA256=ENC_SHA, fileSHA256=sha, fileLength=12345, mimetype="image/jpeg",
                           caption="look", JPEGThumbnail=b"\xff\xd8thumb",
                           contextInfo=e2e.ContextInfo(stanzaID="3EB0ORIG", participant=ALICE))
    voice = e2e.AudioMessage(URL="https://mmg.whatsapp.net/a", directPath="/a", mediaKey=MEDIA_KEY,
                             fileSHA256=sha, fileLength=4321, mimetype="audio/ogg; codecs=opus", seconds=9, PTT=True)
    song = e2e.AudioMessage(directPath="/s", mediaKey=MEDIA_KEY, fileLength=99, mimetype="audio/mpeg", seconds=180)
    video = e2e.VideoMessage(directPath="/v", mediaKey=MEDIA_KEY, fileLength=5_000_000, mimetype="video/mp4",
                             seconds=31)
    doc = e2e.DocumentMessage(directPath="/d", mediaKey=MEDIA_KEY, fileLength=777, mimetype="application/pdf",
                              fileName="boleto.pdf", fileSHA256=sha)
    sticker = e2e.StickerMessage(directPath="/st", mediaKey=MEDIA_KEY, fileLength=20_000, mimetype="image/webp")
    vcard = build_vcard("Maria", "+5511988887777")
    hexsha = sha.hex()

    def fp(**kw: Any) -> Any:
        return e2e.FutureProofMessage(message=e2e.Message(**kw))

    return [
        ("T1", e2e.Message(conversation="hello"), {}, None, "hello"),
        ("T2", e2e.Message(extendedTextMessage=e2e.ExtendedTextMessage(
            text="yes!", contextInfo=e2e.ContextInfo(stanzaID="3EB0ASKED", participant=ME))), {},
         InboundContent(Kind.TEXT, "yes!", quoted_id="3EB0ASKED"), "yes!"),
        ("I1", e2e.Message(imageMessage=img), {},
         InboundContent(Kind.IMAGE, "look", MediaInfo("image/jpeg", None, 12345, hexsha), quoted_id="3EB0ORIG"),
         "look"),
        ("V1", e2e.Message(audioMessage=voice), {},
         InboundContent(Kind.VOICE, "", MediaInfo("audio/ogg; codecs=opus", None, 4321, hexsha, 9, True)), ""),
        ("A1", e2e.Message(audioMessage=song), {},
         InboundContent(Kind.AUDIO, "", MediaInfo("audio/mpeg", None, 99, None, 180)), ""),
        ("VD1", e2e.Message(videoMessage=video), {},
         InboundContent(Kind.VIDEO, "", MediaInfo("video/mp4", None, 5_000_000, None, 31)), ""),
        ("PTV1", e2e.Message(ptvMessage=video), {},
         InboundContent(Kind.VIDEO, "", MediaInfo("video/mp4", None, 5_000_000, None, 31)), ""),
        ("D1", e2e.Message(documentWithCaptionMessage=fp(documentMessage=e2e.DocumentMessage(
            directPath="/d", mediaKey=MEDIA_KEY, fileLength=777, mimetype="application/pdf", fileName="boleto.pdf",
            fileSHA256=sha, caption="pay me"))), {},
         InboundContent(Kind.DOCUMENT, "pay me", MediaInfo("application/pdf", "boleto.pdf", 777, hexsha)), "pay me"),
        ("D2", e2e.Message(documentMessage=doc), {},
         InboundContent(Kind.DOCUMENT, "", MediaInfo("application/pdf", "boleto.pdf", 777, hexsha)), ""),
        ("S1", e2e.Message(stickerMessage=sticker), {},
         InboundContent(Kind.STICKER, "", MediaInfo("image/webp", None, 20_000)), ""),
        ("L1", e2e.Message(locationMessage=e2e.LocationMessage(
            degreesLatitude=-23.55, degreesLongitude=-46.63, name="Sé", address="São Paulo")), {},
         InboundContent(Kind.LOCATION, location=Location(-23.55, -46.63, "Sé", "São Paulo")), ""),
        ("L2", e2e.Message(liveLocationMessage=e2e.LiveLocationMessage(
            degreesLatitude=1.0, degreesLongitude=2.0, caption="on my way")), {},
         InboundContent(Kind.LOCATION, "on my way", location=Location(1.0, 2.0)), "on my way"),
        ("C1", e2e.Message(contactMessage=e2e.ContactMessage(displayName="Maria", vcard=vcard)), {},
         InboundContent(Kind.CONTACT, contact=ContactCard("Maria", vcard)), ""),
        ("C2", e2e.Message(contactsArrayMessage=e2e.ContactsArrayMessage(displayName="2 contacts", contacts=[
            e2e.ContactMessage(displayName="Maria", vcard=vcard), e2e.ContactMessage(displayName="Jo", vcard="V2")])),
         {}, InboundContent(Kind.CONTACT, contact=ContactCard("2 contacts", vcard + "\nV2")), ""),
        ("R1", e2e.Message(reactionMessage=e2e.ReactionMessage(
            key=MessageKey(remoteJID=ALICE, fromMe=True, ID="3EB0MINE"), text="❤️")), {},
         InboundContent(Kind.REACTION, reaction="❤️", target_id="3EB0MINE"), ""),
        ("R2", e2e.Message(reactionMessage=e2e.ReactionMessage(key=MessageKey(ID="3EB0MINE"), text="")), {},
         InboundContent(Kind.REACTION, reaction="", target_id="3EB0MINE"), ""),
        # whatsmeow unwraps editedMessage and flags IsEdit; older clients send the bare protocol message
        ("E1", e2e.Message(protocolMessage=e2e.ProtocolMessage(
            type=ne.PROTOCOL_MESSAGE_EDIT, key=MessageKey(ID="3EB0TYPO"),
            editedMessage=e2e.Message(conversation="fixed text"))), {"is_edit": True},
         InboundContent(Kind.EDIT, "fixed text", target_id="3EB0TYPO"), "fixed text"),
        ("E2", e2e.Message(editedMessage=fp(protocolMessage=e2e.ProtocolMessage(
            type=ne.PROTOCOL_MESSAGE_EDIT, key=MessageKey(ID="3EB0CAP"),
            editedMessage=e2e.Message(imageMessage=e2e.ImageMessage(caption="new caption"))))), {},
         InboundContent(Kind.EDIT, "new caption", target_id="3EB0CAP"), "new caption"),
        ("X1", e2e.Message(protocolMessage=e2e.ProtocolMessage(type=ne.PROTOCOL_REVOKE, key=MessageKey(ID="3EB0GONE"))),
         {}, InboundContent(Kind.REVOKE, target_id="3EB0GONE"), ""),
        ("O1", e2e.Message(viewOnceMessageV2=fp(imageMessage=e2e.ImageMessage(
            directPath="/o", mediaKey=MEDIA_KEY, mimetype="image/jpeg", fileLength=10, viewOnce=True))),
         {"is_view_once": True},
         InboundContent(Kind.IMAGE, "", MediaInfo("image/jpeg", None, 10), view_once=True), ""),
        ("O2", e2e.Message(ephemeralMessage=fp(viewOnceMessage=fp(conversation="psst"))), {},
         InboundContent(Kind.TEXT, "psst", view_once=True), "psst"),
        ("U1", e2e.Message(pollCreationMessage=e2e.PollCreationMessage(
            name="Lunch?", options=[e2e.PollCreationMessage.Option(optionName="yes")])), {},
         InboundContent(Kind.UNKNOWN, "Lunch?"), "Lunch?"),
        ("U2", e2e.Message(groupInviteMessage=e2e.GroupInviteMessage(groupName="Team", caption="join us")), {},
         InboundContent(Kind.UNKNOWN, "join us"), "join us"),
    ]


def _without_handle(content: InboundContent | None) -> InboundContent | None:
    if content is None or content.media_handle is None:
        return content
    from dataclasses import replace

    return replace(content, media_handle=None)


def test_every_inbound_kind_through_the_go_callback(tmp_path: Path) -> None:
    cases = _inbound_cases()
    skipped = _skipped_cases()

    async def main() -> None:
        async with StalledProxy() as stalled:
            backend = NeonizeBackend(tmp_path / "auth", connect_timeout_s=30, upstream_proxy=stalled.url)
            async with backend:
                rec = Recorder()
                session, att = await _stalled(backend, "types2", rec)
                alice = jid("5511888880000")
                for msg_id, wa, kw, _, _ in cases:
                    ev = message_event(wa, chat=alice, sender=alice, msg_id=msg_id, is_edit=kw.get("is_edit", False))
                    if kw.get("is_view_once"):
                        ev.IsViewOnce = ev.IsViewOnceV2 = True
                    await push_event(att.callbacks, att.uuid, MESSAGE, ev)
                for msg_id, wa, kw in skipped:
                    chat = kw.get("chat", alice)
                    await push_event(att.callbacks, att.uuid, MESSAGE,
                                     message_event(wa, chat=chat, sender=alice, msg_id=msg_id))
                await push_event(att.callbacks, att.uuid, MESSAGE,
                                 message_event(_e2e().Message(conversation="end"), chat=alice, sender=alice,
                                               msg_id="END"))
                await rec.wait_for(lambda e: isinstance(e, InboundMessage) and e.wa_message_id == "END")
                got = {m.wa_message_id: m for m in rec.of_type(InboundMessage)}
                assert sorted(got) == sorted([c[0] for c in cases] + ["END"])  # every kind, none of the skipped
                for msg_id, _, _, content, body in cases:
                    m = got[msg_id]
                    assert (m.body, _without_handle(m.content)) == (body, content), msg_id
                    assert m.chat_jid == ALICE and m.sender_jid == ALICE and m.timestamp == 1_700_000_000.0
                    if content is not None and content.media is not None:
                        assert m.content is not None and m.content.media_handle is not None, msg_id
                    elif m.content is not None:
                        assert m.content.media_handle is None, msg_id
                await session.close()

    asyncio.run(main())


def _skipped_cases() -> list[tuple[str, Any, dict[str, Any]]]:
    e2e = _e2e()
    from neonize.proto.waCommon.WACommon_pb2 import MessageKey

    return [
        ("K1", e2e.Message(protocolMessage=e2e.ProtocolMessage(type=5)), {}),  # HISTORY_SYNC_NOTIFICATION
        ("K2", e2e.Message(protocolMessage=e2e.ProtocolMessage(type=6)), {}),  # APP_STATE_SYNC_KEY_SHARE
        ("K3", e2e.Message(protocolMessage=e2e.ProtocolMessage(type=3)), {}),  # EPHEMERAL_SETTING
        ("K4", e2e.Message(protocolMessage=e2e.ProtocolMessage(type=ne.PROTOCOL_REVOKE)), {}),  # revoke of nothing
        ("K5", e2e.Message(senderKeyDistributionMessage=e2e.SenderKeyDistributionMessage(groupID="g")), {}),
        ("K6", e2e.Message(pollUpdateMessage=e2e.PollUpdateMessage(pollCreationMessageKey=MessageKey(ID="P"))), {}),
        ("K7", e2e.Message(keepInChatMessage=e2e.KeepInChatMessage(key=MessageKey(ID="P"))), {}),
        ("K8", e2e.Message(reactionMessage=e2e.ReactionMessage(text="👍")), {}),  # no target
        ("K9", e2e.Message(imageMessage=e2e.ImageMessage(mimetype="image/jpeg")), {"chat": jid("status", "broadcast")}),
        ("K10", e2e.Message(conversation="news"), {"chat": jid("1203630", "newsletter")}),
        ("K11", e2e.Message(), {}),
        ("K12", e2e.Message(conversation="  \n"), {}),
    ]


# long: one scenario: handle round trip, then download on a real offline client
def test_media_handle_round_trip_and_download_offline(tmp_path: Path) -> None:
    e2e = _e2e()
    alice = jid("5511888880000")
    img = e2e.ImageMessage(URL="https://mmg.whatsapp.net/i", directPath="/v/t62/i", mediaKey=MEDIA_KEY,
                           fileEncSHA256=ENC_SHA, fileSHA256=hashlib.sha256(b"x").digest(), fileLength=1,
                           mimetype="image/jpeg", caption="c", JPEGThumbnail=b"\xff\xd8" * 500,
                           contextInfo=e2e.ContextInfo(stanzaID="Q", quotedMessage=e2e.Message(conversation="big")))
    mapped = ne.map_event(message_event(e2e.Message(imageMessage=img), chat=alice, sender=alice))
    handle = mapped.content.media_handle
    import json

    assert json.loads(json.dumps(handle)) == handle and handle["kind"] == "imageMessage"
    message, sub = message_from_handle(handle)
    expected = e2e.ImageMessage()
    expected.CopyFrom(img)
    expected.ClearField("contextInfo")  # a download needs neither the quote nor the thumbnail
    expected.ClearField("JPEGThumbnail")
    assert sub == expected and message == e2e.Message(imageMessage=expected)
    assert len(handle["proto"]) < 400
    # a round video note is downloaded as the VideoMessage it is
    ptv = e2e.VideoMessage(directPath="/v", mediaKey=MEDIA_KEY, mimetype="video/mp4")
    h2 = ne.map_event(message_event(e2e.Message(ptvMessage=ptv), chat=alice, sender=alice)).content.media_handle
    assert message_from_handle(h2)[0] == e2e.Message(videoMessage=ptv)

    garbage: list[Any] = [
        None, "x", {}, {"kind": "imageMessage"}, {"kind": "conversation", "proto": ""},
        {"kind": "imageMessage", "proto": "!!!not base64"},
        {"kind": "imageMessage", "proto": base64.b64encode(b"\xff\xff\xff\xff").decode()},
        {"kind": "imageMessage", "proto": base64.b64encode(e2e.ImageMessage(caption="no path").SerializeToString()).decode()},
        {**handle, "v": 99},
    ]

    async def main() -> None:
        async with StalledProxy() as stalled:
            backend = NeonizeBackend(tmp_path / "auth", connect_timeout_s=30, upstream_proxy=stalled.url,
                                     send_timeout_s=5, media_timeout_s=1)
            async with backend:
                rec = Recorder()
                session, att = await _stalled(backend, "types3", rec)
                dest = tmp_path / "dl"
                for bad in garbage:
                    with pytest.raises(MediaUnavailable) as err:
                        await session.download_media(bad, dest)
                    assert err.value.permanent, bad
                with pytest.raises(MediaUnavailable) as err:  # connecting is not connected
                    await session.download_media(handle, dest)
                assert not err.value.permanent
                # the real Go DownloadAny while the client is still dialing: whatsmeow waits
                # for the socket; our media timeout ends the wait -> retry later
                att.connected = True
                t0 = time.monotonic()
                with pytest.raises(MediaUnavailable) as err:
                    await session.download_media(handle, dest)
                assert not err.value.permanent and "took more than 1 s" in str(err.value), err.value
                assert time.monotonic() - t0 < 2.5
                # ... and on a client whose dial failed (offline): Go answers at once
                backend.relay.abort(att.ticket)
                await rec.wait_for(lambda e: isinstance(e, Disconnected))
                att.terminal, att.connected = False, True  # pretend it was online
                t0 = time.monotonic()
                with pytest.raises(MediaUnavailable) as err:
                    await session.download_media(handle, dest)
                assert not err.value.permanent, err.value
                assert time.monotonic() - t0 < 2.5
                assert not dest.exists() or list(dest.iterdir()) == []
                await session.close()
                with pytest.raises(MediaUnavailable) as err:
                    await session.download_media(handle, dest)
                assert not err.value.permanent

    asyncio.run(main())


def test_download_writes_a_private_file(tmp_path: Path) -> None:
    """Go's DownloadAny answers with bytes (faked): a 0600 file with its metadata."""
    e2e = _e2e()
    data = b"%PDF-1.7 " + b"z" * 5000
    doc = e2e.DocumentMessage(directPath="/d", mediaKey=MEDIA_KEY, mimetype="application/pdf", fileName="a.pdf",
                              fileLength=len(data), fileSHA256=hashlib.sha256(data).digest())
    handle = ne.media_handle("documentMessage", doc)

    class DownloadGo(FakeGo):
        def __init__(self, error: str = "") -> None:
            super().__init__()
            self.error = error
            self.asked: list[Any] = []

        async def DownloadAny(self, uuid: bytes, msg: bytes, size: int) -> bytes:  # noqa: N802 - Go's name
            self.asked.append(e2e.Message.FromString(bytes(msg[:size])))
            if self.error:
                return _pb().DownloadReturnFunction(Error=self.error).SerializeToString()
            return _pb().DownloadReturnFunction(Binary=data).SerializeToString()

    async def main() -> None:
        lib = NeonizeLib.get()
        async with StalledProxy() as stalled:
            backend = NeonizeBackend(tmp_path / "auth", connect_timeout_s=30, upstream_proxy=stalled.url)
            async with backend:
                session, att = await _stalled(backend, "types4", Recorder())
                att.connected = True
                real = lib.gocode
                fake = DownloadGo()
                lib.gocode = GoProxy(fake)
                try:
                    got = await session.download_media(handle, tmp_path / "dl")
                    assert fake.asked == [e2e.Message(documentMessage=doc)]
                    assert got.path.parent == tmp_path / "dl" and got.path.read_bytes() == data
                    assert stat.S_IMODE(got.path.stat().st_mode) == 0o600
                    assert (got.mimetype, got.size, got.sha256, got.filename) == (
                        "application/pdf", len(data), hashlib.sha256(data).hexdigest(), "a.pdf")
                    assert got.path.suffix == ".pdf"
                    for error, permanent in [("download failed with status code 404", True),
                                             ("download failed with status code 410", True),
                                             ("invalid media hmac", True),
                                             ("failed to refresh media connections: context deadline exceeded", False)]:
                        lib.gocode = GoProxy(DownloadGo(error))
                        with pytest.raises(MediaUnavailable) as err:
                            await session.download_media(handle, tmp_path / "dl")
                        assert err.value.permanent is permanent, error
                finally:
                    lib.gocode = real
                await session.close()

    asyncio.run(main())
