"""Issue #12 on the neonize backend, offline with the real library: real Receipt,
CallOffer, UndecryptableMessage and TemporaryBan event protobufs pushed through
the ctypes callback Go calls, and ``reject_call`` through the pool to Go."""

from __future__ import annotations

import asyncio
import ctypes
import time
from pathlib import Path
from typing import Any

import pytest

from tests.neonize_helpers import Recorder, StalledProxy, jid, push_event
from tests.test_neonize_types import GoProxy, _stalled
from wa_worker.backends.base import (
    Call,
    Disconnected,
    InboundMessage,
    NotConnectedError,
    Receipt,
    ReceiptStatus,
    SendError,
)
from wa_worker.backends.neonize import NeonizeBackend
from wa_worker.backends.neonize.attempt import SUBSCRIBED_EVENTS
from wa_worker.backends.neonize.loading import NeonizeLib
from wa_worker.messages import InboundContent, Kind

pytestmark = [pytest.mark.neonize, pytest.mark.timeout(60)]

ALICE = "5511888880000@s.whatsapp.net"
BOB = "5511777770000@s.whatsapp.net"
GROUP = "120363012345678901@g.us"


def _pb() -> Any:
    from neonize.proto import Neonize_pb2

    return Neonize_pb2


def _code(name: str) -> int:
    from neonize.events import EVENT_TO_INT

    return next(code for cls, code in EVENT_TO_INT.items() if cls.DESCRIPTOR.name == name)


def _source(chat: Any, sender: Any, *, from_me: bool = False, group: bool = False) -> Any:
    return _pb().MessageSource(Chat=chat, Sender=sender, IsFromMe=from_me, IsGroup=group)


def _receipt(ids: list[str], rtype: int, chat: Any, sender: Any, **kw: Any) -> Any:
    return _pb().Receipt(MessageSource=_source(chat, sender, **kw), MessageIDs=ids, Timestamp=1_700_000_000_000,
                         Type=rtype)


def _offer(call_id: str, caller: Any, media: str) -> Any:
    pb = _pb()
    meta = pb.BasicCallMeta(timestamp=1_700_000_000, callCreator=caller, callID=call_id, **{"from": caller})
    return pb.CallOffer(basicCallMeta=meta, callRemoteMeta=pb.CallRemoteMeta(remotePlatform="android",
                                                                             remoteVersion="2.24"),
                        data=pb.Node(Tag="offer", Nodes=[pb.Node(Tag=media), pb.Node(Tag="net")]))


def _undecryptable(msg_id: str, chat: Any, sender: Any) -> Any:
    pb = _pb()
    info = pb.MessageInfo(MessageSource=_source(chat, sender), ID=msg_id, Pushname="Alice",
                          Timestamp=1_700_000_000_000, Type="text")
    return pb.UndecryptableMessage(Info=info, IsUnavailable=False, DecryptFailMode=1)


def test_the_codes_are_subscribed() -> None:
    for name in ("Receipt", "CallOffer", "UndecryptableMessage", "TemporaryBan"):
        assert _code(name) in SUBSCRIBED_EVENTS, name


# long: one scenario: every event kind through the same live callback, the ban last (it ends the attempt)
def test_receipt_call_undecryptable_and_ban_events_through_the_go_callback(tmp_path: Path) -> None:
    async def main() -> None:
        async with StalledProxy() as stalled:
            backend = NeonizeBackend(tmp_path / "auth", connect_timeout_s=30, upstream_proxy=stalled.url)
            async with backend:
                rec = Recorder()
                session, att = await _stalled(backend, "rcpt", rec)
                alice, bob, group = jid("5511888880000"), jid("5511777770000"), jid("120363012345678901", "g.us")

                async def push(name: str, ev: Any) -> None:
                    await push_event(att.callbacks, att.uuid, _code(name), ev)

                await push("Receipt", _receipt(["3EB0A", "3EB0B"], 4, alice, alice))  # READ
                await push("Receipt", _receipt(["3EB0C"], 1, group, bob, group=True))  # DELIVERED, a participant
                await push("Receipt", _receipt(["3EB0D"], 6, alice, alice))  # PLAYED
                await push("Receipt", _receipt(["3EB0E"], 5, alice, alice))  # READ_SELF: ours, skipped
                await push("Receipt", _receipt(["3EB0F"], 3, alice, alice))  # RETRY: skipped
                await push("Receipt", _receipt(["3EB0G"], 4, alice, alice, from_me=True))  # own device: skipped
                await push("CallOffer", _offer("CALLV", alice, "video"))
                await push("CallOffer", _offer("CALLA", bob, "audio"))
                await push("UndecryptableMessage", _undecryptable("3EB0U", alice, alice))
                before = time.time()
                await push("TemporaryBan", _pb().TemporaryBan(Code=2, Expire=3600))
                ban = await rec.wait_for(lambda e: isinstance(e, Disconnected))
                assert rec.of_type(Receipt) == [
                    Receipt(("3EB0A", "3EB0B"), ALICE, ALICE, ReceiptStatus.READ, 1_700_000_000.0),
                    Receipt(("3EB0C",), GROUP, BOB, ReceiptStatus.DELIVERED, 1_700_000_000.0),
                    Receipt(("3EB0D",), ALICE, ALICE, ReceiptStatus.PLAYED, 1_700_000_000.0),
                ]
                assert rec.of_type(Call) == [Call("CALLV", ALICE, True, 1_700_000_000.0),
                                             Call("CALLA", BOB, False, 1_700_000_000.0)]
                (und,) = rec.of_type(InboundMessage)
                assert (und.wa_message_id, und.chat_jid, und.sender_jid, und.body, und.content) == (
                    "3EB0U", ALICE, ALICE, "", InboundContent(Kind.UNDECRYPTABLE, ""))
                assert isinstance(ban, Disconnected)
                assert (ban.reason, ban.ban_code, ban.retry_after_s) == ("temporary_ban", "blocked_by_users", 3600.0)
                assert ban.ban_expires_at is not None and before + 3600 <= ban.ban_expires_at <= time.time() + 3600
                await session.close()

    asyncio.run(main())


class FakeRejectGo:
    """goneonize's ``RejectCall``: records what neonize hands to Go, answers ``error``."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, str]] = []
        self.error = ""

    async def RejectCall(self, uuid: bytes, jid_buf: bytes, jid_len: int, call_id: Any) -> bytes:  # noqa: N802
        self.calls.append((_pb().JID.FromString(bytes(jid_buf[:jid_len])), ctypes.string_at(call_id).decode()))
        return self.error.encode()


def test_reject_call_goes_through_the_pool_and_fails_cleanly_offline(tmp_path: Path) -> None:
    async def main() -> None:
        lib = NeonizeLib.get()
        call = Call("CALL1", ALICE, False, 1_700_000_000.0)
        async with StalledProxy() as stalled:
            backend = NeonizeBackend(tmp_path / "auth", connect_timeout_s=30, upstream_proxy=stalled.url,
                                     send_timeout_s=5)
            async with backend:
                session, att = await _stalled(backend, "reject", Recorder())
                with pytest.raises(NotConnectedError):  # offline: refused before Go is asked
                    await session.reject_call(call)
                att.connected = True  # pretend it is online
                # the real Go RejectCall on a client that never connected: a clean SendError
                with pytest.raises(SendError):
                    await session.reject_call(call)
                fake = FakeRejectGo()
                real = lib.gocode
                lib.gocode = GoProxy(fake)  # duck-typed: it only needs RejectCall
                try:
                    await session.reject_call(call)
                    (to, call_id), = fake.calls
                    assert (to.User, to.Server, call_id) == ("5511888880000", "s.whatsapp.net", "CALL1")
                    fake.error = "server refused"
                    with pytest.raises(SendError, match="server refused"):
                        await session.reject_call(call)
                    with pytest.raises(SendError):
                        await session.reject_call(Call("CALL2", "not-a-jid", False))
                finally:
                    lib.gocode = real
                await session.close()

    asyncio.run(main())
