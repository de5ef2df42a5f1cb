"""Issue #12 on the real neonize/whatsmeow library, offline: number lookups, the typing indicator
and pairing codes go through the bounded call pool and fail cleanly (a BackendError: "unknown,
try later", never "not on WhatsApp"); LID addresses of a real MessageSource protobuf map."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tests.conftest import FakeClock
from tests.neonize_helpers import Recorder, StalledProxy, jid, message_event
from tests.test_neonize_backend import _stalled_session
from wa_worker.backends.base import BackendError, Disconnected
from wa_worker.backends.neonize import NeonizeBackend
from wa_worker.backends.neonize import events as ne
from wa_worker.relays.numbers import NumberResolver, Outcome
from wa_worker.storage.journal import Journal

pytestmark = [pytest.mark.neonize, pytest.mark.timeout(60)]


def test_lookup_typing_and_pairing_reach_go_and_fail_cleanly_offline(tmp_path: Path) -> None:
    async def main() -> None:
        async with StalledProxy() as stalled:
            backend = NeonizeBackend(tmp_path / "auth", connect_timeout_s=30, upstream_proxy=stalled.url,
                                     send_timeout_s=5)
            async with backend:
                rec = Recorder()
                session, att = await _stalled_session(backend, "safety1", rec)
                with pytest.raises(BackendError):  # dialling, not connected: a lookup cannot be made
                    await session.lookup_numbers(["5511988887777"])
                backend.relay.abort(att.ticket)
                await rec.wait_for(lambda e: isinstance(e, Disconnected))
                att.terminal = False  # the Go client exists, offline, no QR shown
                t0 = time.monotonic()
                with pytest.raises(BackendError) as pair:
                    await session.pair_phone("5511988887777")
                assert "pairing code" in str(pair.value)
                att.connected = True  # pretend it was online
                with pytest.raises(BackendError) as lookup:
                    await session.lookup_numbers(["5511988887777", "551188887777"])
                # the errors come back from Go (through the pool: the client's only dispatcher)
                assert "IsOnWhatsAppError" in str(lookup.value) and "PairPhoneError" in str(pair.value)
                with pytest.raises(BackendError) as typing:
                    await session.send_typing("5511988887777@s.whatsapp.net", 2.0)
                assert "SendPresenceError" in str(typing.value)
                assert time.monotonic() - t0 < 10
                journal = Journal(tmp_path / "db")
                resolver = NumberResolver(journal, FakeClock())
                res = await resolver.resolve("safety1", session, "5511988887777@s.whatsapp.net")
                assert res.outcome is Outcome.WAIT and journal.cached_number("5511988887777", 86400) is None
                journal.close()
                await session.close()
                await backend.aclose()

    asyncio.run(main())


def test_lid_addresses_of_a_real_message_source_map() -> None:
    from neonize.proto.waE2E.WAWebProtobufsE2E_pb2 import Message

    ev = message_event(Message(conversation="hi"), chat=jid("12345", "lid"), sender=jid("12345", "lid"))
    ev.Info.MessageSource.SenderAlt.CopyFrom(jid("5511988887777"))
    msg = ne.map_message(ev)
    assert msg is not None
    assert (msg.sender_lid, msg.sender_pn, msg.chat_pn) == (
        "12345@lid", "5511988887777@s.whatsapp.net", "5511988887777@s.whatsapp.net")
    ev2 = message_event(Message(conversation="hi"), chat=jid("5511988887777"), sender=jid("5511988887777"))
    ev2.Info.MessageSource.SenderAlt.CopyFrom(jid("12345", "lid"))
    msg2 = ne.map_message(ev2)
    assert msg2 is not None
    assert (msg2.sender_lid, msg2.sender_pn, msg2.chat_pn) == ("12345@lid", "5511988887777@s.whatsapp.net", None)
    plain = ne.map_message(message_event(Message(conversation="x"), chat=jid("1555"), sender=jid("1555")))
    assert plain is not None and (plain.sender_lid, plain.sender_pn, plain.chat_pn) == (None, None, None)
