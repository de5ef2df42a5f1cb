"""The neonize backend against the real neonize/whatsmeow library, offline.

WhatsApp is unreachable here: clients are created, their stores written, their
dials fail (or stall on a loopback proxy); events are real neonize protobufs
pushed through the very ctypes callbacks the Go side calls.
"""

from __future__ import annotations

import dataclasses

import asyncio
import ctypes
import sqlite3
import stat
import threading
import time
from pathlib import Path

import pytest

from tests.neonize_helpers import (
    ForwardingProxy,
    Recorder,
    StalledProxy,
    go_threads,
    jid,
    message_event,
    push_event,
    push_string,
    wait_no_go_threads,
)
from wa_worker.backends.base import (
    BackendError,
    Connected,
    Disconnected,
    InboundMessage,
    LoggedOut,
    NotConnectedError,
    QrCode,
    SendError,
)
from wa_worker.backends.neonize import DB_NAME, NeonizeBackend
from wa_worker.backends.neonize import events as ne
from wa_worker.backends.neonize.connect_relay import ConnectRelay
from wa_worker.backends.neonize.gate import GoMapGate
from wa_worker.backends.neonize.session import EVENT_BUFFER
from wa_worker.backends.neonize.threads import CallPool, CallTimeout

pytestmark = [pytest.mark.neonize, pytest.mark.timeout(60)]

# neonize event codes (neonize.events.EVENT_TO_INT)
DEVICE, QR, PAIR, CONNECTED, LOGGED_OUT, STREAM_REPLACED, TEMP_BAN, CONNECT_FAILURE = 0, 1, 2, 3, 6, 7, 8, 9
DISCONNECTED, MESSAGE = 12, 17


def _pb():
    from neonize.proto import Neonize_pb2
    from neonize.proto.waE2E import WAWebProtobufsE2E_pb2 as e2e

    return Neonize_pb2, e2e


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root.parent)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


# --------------------------------------------------------------------------- store, has_session, dial failure


def test_store_layout_modes_and_dial_failure_retry(tmp_path: Path) -> None:
    auth = tmp_path / "auth"

    async def main() -> None:
        backend = NeonizeBackend(auth, connect_timeout_s=10)
        async with backend:
            assert not backend.has_session("acme")  # nothing stored
            rec = Recorder()
            session = await backend.open_session("acme", rec)
            baseline = threading.active_count()
            for _attempt in range(3):
                t0 = time.monotonic()
                await session.connect()
                assert time.monotonic() - t0 < 1.0, "connect() must return promptly"
                ev = await rec.wait_for(lambda e: isinstance(e, Disconnected), timeout_s=5)
                # offline: the relay cannot resolve web.whatsapp.com -> 502 -> Neonize() returns
                assert ev.reason == "connect_failure", ev
                assert "web.whatsapp.com" in (ev.detail or "")
                assert rec.times[-1] - t0 < 3.0
                rec.events.clear()
                await wait_no_go_threads(5)
                await session.disconnect()  # what the runner does before retrying
            info = session.info()
            assert info.extra["attempts"] == 3 and info.extra["thread_alive"] is False
            assert backend.stats()["relay_tickets"] == 0
            # no thread leak: only the short-call pool may have grown (bounded)
            assert threading.active_count() <= baseline + backend.pool.max_workers
            await session.close()
            await session.close()  # idempotent

            modes = _modes(auth)
            assert modes["auth"] == 0o700 and modes["auth/acme"] == 0o700
            assert modes[f"auth/acme/{DB_NAME}"] == 0o600
            assert all(m == 0o600 for name, m in modes.items() if name.count("/") == 2), modes
            # a fresh store (whatsmeow created its schema, dial failed) is not a session
            with sqlite3.connect(auth / "acme" / DB_NAME) as db:
                tables = {r[0] for r in db.execute("select name from sqlite_master")}
            assert "whatsmeow_device" in tables
            assert not backend.has_session("acme")
            assert backend.stored_instances() == []
            await backend.aclose()

    asyncio.run(main())


def _insert_fake_device(db_path: Path, jid_str: str) -> None:
    import re

    with sqlite3.connect(db_path) as db:
        cols = [r for r in db.execute("pragma table_info(whatsmeow_device)")]
        ddl = db.execute("select sql from sqlite_master where name='whatsmeow_device'").fetchone()[0]
        lengths = {m[0]: int(m[1]) for m in re.findall(r"length\((\w+)\)\s*=\s*(\d+)", ddl)}
        values = []
        for _cid, name, typ, _notnull, _default, _pk in cols:
            if name == "jid":
                values.append(jid_str)
            elif typ.upper() in ("BIGINT", "INTEGER"):
                values.append(1)
            elif typ.lower() == "bytea":
                values.append(b"\x01" * lengths.get(name, 32))
            else:
                values.append("")
        db.execute(
            f"insert into whatsmeow_device ({','.join(c[1] for c in cols)}) values ({','.join('?' * len(cols))})",
            values,
        )


def test_has_session_only_for_paired_store(tmp_path: Path) -> None:
    auth = tmp_path / "auth"

    async def main() -> None:
        backend = NeonizeBackend(auth, connect_timeout_s=10)
        async with backend:
            rec = Recorder()
            s = await backend.open_session("paired1", rec)
            await s.connect()
            await rec.wait_for(lambda e: isinstance(e, Disconnected))
            await s.close()
            await backend.aclose()

    asyncio.run(main())
    backend = NeonizeBackend(auth)
    db = auth / "paired1" / DB_NAME
    assert not backend.has_session("paired1")
    _insert_fake_device(db, "5511999990000:7@s.whatsapp.net")
    assert backend.has_session("paired1")
    assert backend.stored_instances() == ["paired1"]
    # agrees with neonize's own reader
    from neonize.aioze.client import ClientFactory

    devices = ClientFactory.get_all_devices_from_db(str(db))
    # (neonize leaves the ":device" in User: it splits the stored JID naively)
    assert [d.JID.User.split(":")[0] for d in devices] == ["5511999990000"]
    assert not backend.has_session("../paired1") and not backend.has_session("missing")


# --------------------------------------------------------------------------- events through the Go callbacks


async def _stalled_session(backend: NeonizeBackend, iid: str, rec: Recorder):
    session = await backend.open_session(iid, rec)
    await session.connect()
    att = session._attempt
    deadline = time.monotonic() + 5
    while att.ticket.connections == 0:  # the Go client reached the relay: the dial is pending
        assert time.monotonic() < deadline, "client never reached the relay"
        await asyncio.sleep(0.02)
    return session, att


# long: one Go client driven through each callback in turn, checked in order
def test_events_from_go_callbacks_map_to_dataclasses(tmp_path: Path) -> None:
    pb, e2e = _pb()

    async def main() -> None:
        async with StalledProxy() as stalled:
            backend = NeonizeBackend(tmp_path / "auth", connect_timeout_s=30, upstream_proxy=stalled.url)
            async with backend:
                rec = Recorder()
                session, att = await _stalled_session(backend, "ev1", rec)
                cb, uuid = att.callbacks, att.uuid

                # own identity (code 0, sent by goneonize before any other event), then Connected
                me = pb.Device(JID=jid("5511999990000", device=7), PushName="Acme Sales", Initialized=True)
                await push_event(cb, uuid, DEVICE, me)
                await push_event(cb, uuid, CONNECTED, pb.Connected(status=True))
                ev = await rec.wait_for(lambda e: isinstance(e, Connected))
                assert ev == Connected(jid="5511999990000@s.whatsapp.net", push_name="Acme Sales")
                assert ev.phone_number == "5511999990000"
                assert session.state == "connected"

                alice = jid("5511888880000")
                group = jid("120363012345678901", "g.us")
                cases = [
                    (e2e.Message(conversation="hello"), dict(chat=alice, sender=jid("5511888880000", device=3))),
                    (e2e.Message(extendedTextMessage=e2e.ExtendedTextMessage(text="with link https://x.y")),
                     dict(chat=group, sender=alice, is_group=True, msg_id="G1")),
                    (e2e.Message(imageMessage=e2e.ImageMessage(caption="a photo")), dict(chat=alice, sender=alice, msg_id="I1")),
                    (e2e.Message(conversation="status!"), dict(chat=jid("status", "broadcast"), sender=alice, msg_id="S1")),
                    (e2e.Message(protocolMessage=e2e.ProtocolMessage(type=0)), dict(chat=alice, sender=alice, msg_id="P1")),
                    (e2e.Message(reactionMessage=e2e.ReactionMessage(text="👍")), dict(chat=alice, sender=alice, msg_id="R1")),
                    (e2e.Message(conversation="sent from my phone"),
                     dict(chat=alice, sender=jid("5511999990000", device=0), from_me=True, msg_id="M1", timestamp=1_700_000_123)),
                ]
                for wa_msg, kw in cases:
                    await push_event(cb, uuid, MESSAGE, message_event(wa_msg, **kw))
                await rec.wait_for(lambda e: isinstance(e, InboundMessage) and e.wa_message_id == "M1")
                inbound = rec.of_type(InboundMessage)
                assert [m.body for m in inbound] == ["hello", "with link https://x.y", "a photo", "sent from my phone"]
                first = inbound[0]
                assert first == InboundMessage(
                    wa_message_id="3EB0AAAA",
                    chat_jid="5511888880000@s.whatsapp.net",
                    sender_jid="5511888880000@s.whatsapp.net",  # device suffix dropped
                    body="hello",
                    from_me=False,
                    is_group=False,
                    push_name="Alice",
                    timestamp=1_700_000_000.0,  # neonize sends milliseconds
                    own_jid="5511999990000@s.whatsapp.net",
                )
                assert inbound[1].is_group and inbound[1].chat_jid == "120363012345678901@g.us"
                assert inbound[1].sender_jid == "5511888880000@s.whatsapp.net"
                assert inbound[3].from_me and inbound[3].timestamp == 1_700_000_123.0

                # the phone unlinks us: LoggedOut, and the attempt is torn down
                await push_event(cb, uuid, LOGGED_OUT, pb.LoggedOut(OnConnect=False, Reason=ne.CF_LOGGED_OUT))
                lo = await rec.wait_for(lambda e: isinstance(e, LoggedOut))
                assert lo.reason == "logged_out"
                assert session.state == "logged_out"
                await wait_no_go_threads(5)  # revoking the relay ticket freed the stalled dial
                # events of an abandoned attempt are ignored (except messages)
                n = len(rec.events)
                await push_event(cb, uuid, STREAM_REPLACED, pb.StreamReplaced())
                await asyncio.sleep(0.1)
                assert len(rec.events) == n
                await session.close()
                await backend.aclose()

    asyncio.run(main())


@pytest.mark.parametrize(
    "code,build,expected",
    [
        (STREAM_REPLACED, lambda pb: pb.StreamReplaced(), Disconnected("stream_replaced")),
        (DISCONNECTED, lambda pb: pb.Disconnected(status=True), Disconnected("network")),
        (TEMP_BAN, lambda pb: pb.TemporaryBan(Code=2, Expire=3600),
         Disconnected("temporary_ban", "blocked_by_users", 3600.0, ban_code="blocked_by_users",
                      ban_expires_at=3600.0)),  # (the test compares ban_expires_at as a delay from now)
        (CONNECT_FAILURE, lambda pb: pb.ConnectFailure(Reason=ne.CF_SERVICE_UNAVAILABLE, Message="try later"),
         Disconnected("connect_failure", "service_unavailable: try later")),
        (CONNECT_FAILURE, lambda pb: pb.ConnectFailure(Reason=ne.CF_MAIN_DEVICE_GONE),
         LoggedOut("logged_out", "main_device_gone")),
        (PAIR, lambda pb: pb.PairStatus(Status=pb.PairStatus.ERROR, Error="bad signature"),
         Disconnected("pair_failure", "bad signature")),
    ],
)
def test_terminal_events_end_the_attempt(tmp_path: Path, code, build, expected) -> None:
    pb, _ = _pb()

    async def main() -> None:
        async with StalledProxy() as stalled:
            backend = NeonizeBackend(tmp_path / "auth", connect_timeout_s=30, upstream_proxy=stalled.url)
            async with backend:
                rec = Recorder()
                session, att = await _stalled_session(backend, "term1", rec)
                await push_event(att.callbacks, att.uuid, code, build(pb))
                ev = await rec.wait_for(lambda e: isinstance(e, (Disconnected, LoggedOut)))
                assert rec.events == [ev]  # exactly one terminal event, nothing else
                if isinstance(ev, Disconnected) and ev.ban_expires_at is not None:  # a date: made a delay
                    assert abs(ev.ban_expires_at - time.time() - 3600) < 60
                    ev = dataclasses.replace(ev, ban_expires_at=3600.0)
                assert ev == expected
                await wait_no_go_threads(5)
                # retry works: a new attempt, a new Go client
                await session.connect()
                assert session._attempt is not att and session.state == "connecting"
                await session.close()
                await backend.aclose()
                await wait_no_go_threads(5)

    asyncio.run(main())


def test_qr_callback_pair_success_and_qr_timeout(tmp_path: Path) -> None:
    pb, _ = _pb()

    async def main() -> None:
        async with StalledProxy() as stalled:
            # (the relay's own dial timeout stays long: in real life a QR means the dial succeeded)
            backend = NeonizeBackend(tmp_path / "auth", connect_timeout_s=1.0, dial_timeout_s=30,
                                     upstream_proxy=stalled.url)
            async with backend:
                rec = Recorder()
                session, att = await _stalled_session(backend, "qr1", rec)
                await push_string(att.callbacks, "qr", att.uuid, "2@first-code,abc")
                await push_string(att.callbacks, "qr", att.uuid, "2@second-code,abc")
                await rec.wait_for(lambda e: e == QrCode("2@second-code,abc"))
                assert rec.events == [QrCode("2@first-code,abc"), QrCode("2@second-code,abc")]
                assert session.state == "qr"
                # a shown QR disarms the connect watchdog (1 s here)
                await asyncio.sleep(1.5)
                assert len(rec.events) == 2
                # pairing succeeded: no event by itself, but the JID is learnt
                await push_string(att.callbacks, "login", att.uuid, "success")
                await push_event(att.callbacks, att.uuid, PAIR,
                           pb.PairStatus(Status=pb.PairStatus.SUCCESS, ID=jid("5511777770000", device=5)))
                await asyncio.sleep(0.1)
                assert len(rec.events) == 2 and session.own_jid == "5511777770000@s.whatsapp.net"
                # nobody scanned in time (whatsmeow's QR channel says "timeout")
                await push_string(att.callbacks, "login", att.uuid, "timeout")
                ev = await rec.wait_for(lambda e: isinstance(e, Disconnected))
                assert ev == Disconnected("connect_timeout", "qr_timeout")
                await session.close()
                await backend.aclose()
                await wait_no_go_threads(5)

    asyncio.run(main())


def test_go_callbacks_wait_for_a_slow_sink_bounded_and_in_order(tmp_path: Path) -> None:
    """A Go thread hands each event to the loop and waits while the session's event
    buffer is full: memory stays bounded, nothing is dropped, order is kept."""
    _, e2e = _pb()
    n = EVENT_BUFFER + 150

    async def main() -> None:
        async with StalledProxy() as stalled:
            backend = NeonizeBackend(tmp_path / "auth", connect_timeout_s=30, upstream_proxy=stalled.url)
            async with backend:
                release = asyncio.Event()
                got: list[str] = []

                async def slow_sink(ev) -> None:
                    if isinstance(ev, InboundMessage):
                        got.append(ev.wa_message_id)
                        await release.wait()

                session, att = await _stalled_session(backend, "slow1", slow_sink)
                alice = jid("5511888880000")
                payloads = [
                    message_event(e2e.Message(conversation=f"m{i}"), chat=alice, sender=alice,
                                  msg_id=f"ID{i}").SerializePartialToString()
                    for i in range(n)
                ]
                pushed = 0

                def go_side() -> None:  # like whatsmeow's event goroutine: one event after another
                    nonlocal pushed
                    for data in payloads:
                        buf = ctypes.create_string_buffer(data, len(data))
                        att.callbacks["event"](att.uuid, ctypes.cast(buf, ctypes.c_void_p), len(data), MESSAGE)
                        pushed += 1

                thread = threading.Thread(target=go_side, daemon=True)
                thread.start()
                await asyncio.sleep(1.0)
                assert thread.is_alive(), "the Go thread must wait while the buffer is full"
                # one event in the sink, EVENT_BUFFER buffered, the next one waiting
                assert EVENT_BUFFER <= pushed <= EVENT_BUFFER + 1, pushed
                release.set()
                for _ in range(200):
                    if not thread.is_alive() and len(got) == n:
                        break
                    await asyncio.sleep(0.05)
                assert got == [f"ID{i}" for i in range(n)]
                await session.close()

    asyncio.run(main())


def test_backend_owns_every_task_it_starts(tmp_path: Path) -> None:
    """Pumps, watchdogs and teardowns live in the backend's task group: none
    before ``async with``, none left after it."""

    def ours() -> list[str]:
        return sorted(t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("neonize-"))

    async def main() -> None:
        backend = NeonizeBackend(tmp_path / "auth", connect_timeout_s=30)
        with pytest.raises(BackendError, match="not started"):
            await backend.open_session("own1", Recorder())
        async with StalledProxy() as stalled:
            backend.upstream_proxy = stalled.url
            async with backend:
                await _stalled_session(backend, "own1", Recorder())
                assert "neonize-sink-own1" in ours() and "neonize-watchdog-own1" in ours()
            assert ours() == []
            await wait_no_go_threads(5)
        assert backend.stats() == {"sessions": 0, "go_threads": 0, "pool_size": 0, "relay_tickets": 0}

    asyncio.run(main())


# --------------------------------------------------------------------------- send, close, loops


def test_send_paths(tmp_path: Path) -> None:
    async def main() -> None:
        async with StalledProxy() as stalled:
            backend = NeonizeBackend(tmp_path / "auth", connect_timeout_s=30, upstream_proxy=stalled.url,
                                     send_timeout_s=3)
            async with backend:
                rec = Recorder()
                session = await backend.open_session("send1", rec)
                with pytest.raises(NotConnectedError):
                    await session.send_text("5511888880000@s.whatsapp.net", "hi")
                await session.connect()
                with pytest.raises(NotConnectedError):  # connecting is not connected
                    await session.send_text("5511888880000@s.whatsapp.net", "hi")
                session._attempt.connected = True  # pretend: the real Go client is not online
                with pytest.raises(SendError) as bad:
                    await session.send_text("not-a-jid", "hi")
                assert bad.value.permanent
                await session.close()
                with pytest.raises(NotConnectedError):
                    await session.send_text("5511888880000@s.whatsapp.net", "hi")
                with pytest.raises(BackendError):
                    await session.connect()
                await backend.aclose()

    asyncio.run(main())


def test_send_reaches_go_and_fails_cleanly_when_offline(tmp_path: Path) -> None:
    """A real SendMessage through the bounded pool on a client that never connected."""

    async def main() -> None:
        async with StalledProxy() as stalled:
            backend = NeonizeBackend(tmp_path / "auth", connect_timeout_s=30, upstream_proxy=stalled.url,
                                     send_timeout_s=5)
            async with backend:
                rec = Recorder()
                session, att = await _stalled_session(backend, "send2", rec)
                # abandon the dial through the relay so the Go client exists but is offline
                backend.relay.abort(att.ticket)
                await rec.wait_for(lambda e: isinstance(e, Disconnected))
                att.terminal, att.connected = False, True  # pretend it was online
                t0 = time.monotonic()
                with pytest.raises(SendError) as err:
                    await session.send_text("5511888880000@s.whatsapp.net", "hello")
                assert time.monotonic() - t0 < 5
                assert "not connected" in str(err.value).lower() or "nil" in str(err.value).lower()
                await session.close()
                await backend.aclose()

    asyncio.run(main())


def test_backend_survives_a_new_event_loop(tmp_path: Path) -> None:
    """neonize keeps the first loop in a module global; the backend re-points it."""
    backend = NeonizeBackend(tmp_path / "auth", connect_timeout_s=10)

    async def once(iid: str) -> None:
        from neonize.aioze import events as aio_events

        async with backend:
            rec = Recorder()
            session = await backend.open_session(iid, rec)
            assert aio_events.event_global_loop is asyncio.get_running_loop()
            await session.connect()
            ev = await rec.wait_for(lambda e: isinstance(e, Disconnected), timeout_s=5)
            assert ev.reason == "connect_failure"
            await session.close()

    asyncio.run(once("loop1"))
    asyncio.run(once("loop2"))  # a second loop: relay and pool are rebuilt
    asyncio.run(backend.aclose())


def test_close_is_bounded_with_a_stuck_dial(tmp_path: Path) -> None:
    async def main() -> None:
        async with StalledProxy() as stalled:
            backend = NeonizeBackend(tmp_path / "auth", connect_timeout_s=30, upstream_proxy=stalled.url)
            async with backend:
                sessions = []
                for i in range(3):
                    s, _ = await _stalled_session(backend, f"stuck{i}", Recorder())
                    sessions.append(s)
                assert len(go_threads()) >= 3
                t0 = time.monotonic()
                await backend.aclose()  # closes every session
                assert time.monotonic() - t0 < 3
                await wait_no_go_threads(5)
                assert backend.has_session("stuck0") is False

    asyncio.run(main())


# --------------------------------------------------------------------------- relay and threads units


def test_relay_tunnels_counts_revokes_and_chains(tmp_path: Path) -> None:
    async def main() -> None:
        async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while data := await r.read(1024):
                w.write(data)
                await w.drain()
            w.close()

        echo_srv = await asyncio.start_server(echo, "127.0.0.1", 0)
        echo_port = echo_srv.sockets[0].getsockname()[1]
        relay = ConnectRelay(allowed_ports=None, dial_timeout_s=2)
        port = await relay.start()

        async def tunnel(token: str | None):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            auth = ""
            if token:
                import base64

                auth = f"Proxy-Authorization: Basic {base64.b64encode(f'{token}:x'.encode()).decode()}\r\n"
            w.write(f"CONNECT 127.0.0.1:{echo_port} HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode())
            head = await r.readuntil(b"\r\n\r\n")
            return r, w, head

        _, w, head = await tunnel(None)
        assert head.startswith(b"HTTP/1.1 407")
        w.close()

        ticket = relay.issue("i1")
        r, w, head = await tunnel(ticket.token)
        assert head.startswith(b"HTTP/1.1 200")
        w.write(b"ping")
        assert await r.readexactly(4) == b"ping"
        assert ticket.bytes_up == 4 and ticket.bytes_down == 4 and ticket.open_connections == 1
        relay.revoke(ticket)
        assert await asyncio.wait_for(r.read(), 2) == b""  # cut
        _, w2, head = await tunnel(ticket.token)
        assert head.startswith(b"HTTP/1.1 407")  # refused from now on
        w2.close()

        async with ForwardingProxy() as upstream:
            t2 = relay.issue("i2", upstream=upstream.url)
            r, w, head = await tunnel(t2.token)
            assert head.startswith(b"HTTP/1.1 200")
            w.write(b"via-upstream")
            assert await r.readexactly(12) == b"via-upstream"
            assert relay.bytes_up == relay.bytes_down == 16  # every ticket's, the revoked one's too (/metrics)
            assert upstream.requests[0].startswith(f"CONNECT 127.0.0.1:{echo_port}".encode())
            assert b"Proxy-Authorization: Basic dXNlcjpzZWNyZXQ=" in upstream.requests[0]
            w.close()

        async with StalledProxy() as stalled:
            t3 = relay.issue("i3", upstream=stalled.url)
            r, w, head = await tunnel(t3.token)  # relay gives up after dial_timeout_s
            assert head.startswith(b"HTTP/1.1 504")
            assert "timed out" in (t3.last_error or "")
        await relay.aclose()
        echo_srv.close()

    asyncio.run(main())


@pytest.mark.slow
def test_concurrent_starts_and_calls_do_not_crash_go(tmp_path: Path) -> None:
    """Unguarded, 6 threads starting clients + 6 calling IsConnected die within
    seconds ("fatal error: concurrent map read and map write"); through the
    backend's gate they must not. Runs in a subprocess: a Go fatal error kills it."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "tests.neonize_helpers", "gate-stress", "6", str(tmp_path / "auth")],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parent.parent,
    )
    assert "concurrent map" not in proc.stderr, proc.stderr[-2000:]
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("OK ")][-1]
    starts, reads = (int(part.split("=")[1]) for part in line.split()[1:])
    assert starts >= 30 and reads >= 100, line


def test_go_map_gate_and_call_pool() -> None:
    gate = GoMapGate(settle_s=0.05)
    assert gate.enter_reader(0)
    t0 = time.monotonic()
    assert gate.acquire_writer(1)  # waits for the reader that just entered
    assert time.monotonic() - t0 >= 0.04
    assert not gate.enter_reader(0.05)  # readers wait while a writer is inside
    threading.Timer(0.1, gate.release_writer).start()
    assert gate.enter_reader(2)

    async def main() -> None:
        pool = CallPool(2, per_key_limit=1)
        release = threading.Event()
        with pytest.raises(CallTimeout):
            await pool.call("a", lambda: release.wait(5), timeout_s=0.1)
        with pytest.raises(CallTimeout):  # "a" still has its stuck call
            await pool.call("a", lambda: 1, timeout_s=1)
        assert await pool.call("b", lambda: 2, timeout_s=1) == 2  # other keys unaffected
        release.set()
        await asyncio.sleep(0.1)
        assert await pool.call("a", lambda: 3, timeout_s=1) == 3
        pool.shutdown()

    asyncio.run(main())


# --------------------------------------------------------------------------- pure mapping


def test_pure_mapping_details() -> None:
    pb, e2e = _pb()
    # enum numbers used by the mapper are neonize's
    assert pb.ConnectFailureReason.Value("LOGGED_OUT") == ne.CF_LOGGED_OUT
    assert pb.ConnectFailureReason.Value("MAIN_DEVICE_GONE") == ne.CF_MAIN_DEVICE_GONE
    assert pb.ConnectFailureReason.Value("UNKNOWN_LOGOUT") == ne.CF_UNKNOWN_LOGOUT
    assert pb.ConnectFailureReason.Value("TEMP_BANNED") == ne.CF_TEMP_BANNED
    assert pb.PairStatus.ERROR == ne.PAIR_STATUS_ERROR and pb.PairStatus.SUCCESS == ne.PAIR_STATUS_SUCCESS
    assert {v: k.lower() for k, v in pb.TemporaryBan.TempBanReason.items()} == ne.TEMP_BAN_NAMES
    from neonize.events import EVENT_TO_INT

    assert EVENT_TO_INT[pb.Message] == MESSAGE and EVENT_TO_INT[pb.Connected] == CONNECTED

    alice = jid("5511888880000")

    def body(m):
        ev = ne.map_event(message_event(m, chat=alice, sender=alice))
        return ev.body if ev else None

    assert body(e2e.Message(videoMessage=e2e.VideoMessage(caption="clip"))) == "clip"
    assert body(e2e.Message(documentMessage=e2e.DocumentMessage(caption="pdf"))) == "pdf"
    assert body(e2e.Message(documentWithCaptionMessage=e2e.FutureProofMessage(
        message=e2e.Message(documentMessage=e2e.DocumentMessage(caption="wrapped"))))) == "wrapped"
    assert body(e2e.Message(ephemeralMessage=e2e.FutureProofMessage(
        message=e2e.Message(extendedTextMessage=e2e.ExtendedTextMessage(text="disappearing"))))) == "disappearing"
    # media without caption is delivered (issue #11), with an empty body
    no_caption = ne.map_event(message_event(e2e.Message(imageMessage=e2e.ImageMessage()), chat=alice, sender=alice))
    assert no_caption.body == "" and no_caption.content.kind == "image"
    assert body(e2e.Message(conversation="   ")) is None
    assert body(e2e.Message()) is None
    # an edit is delivered as what it is (issue #11), not as a new text message
    edit = ne.map_event(message_event(e2e.Message(protocolMessage=e2e.ProtocolMessage(
        type=ne.PROTOCOL_MESSAGE_EDIT, key={"ID": "OLD1"}, editedMessage=e2e.Message(conversation="x"))),
        chat=alice, sender=alice, is_edit=True))
    assert (edit.content.kind, edit.content.target_id, edit.body) == ("edit", "OLD1", "x")
    assert ne.map_event(message_event(e2e.Message(conversation="x"),
                                      chat=jid("1203630", "newsletter"), sender=alice)) is None
    assert ne.map_event(pb.QR(Codes=["c1", "c2"])) == QrCode("c1")
    assert ne.map_event(pb.KeepAliveTimeout(ErrorCount=1)) is None
    assert ne.map_event(pb.ConnectFailure(Reason=ne.CF_LOGGED_OUT)) == LoggedOut("logged_out", "logged_out")
    assert ne.map_event(pb.TemporaryBan(Code=1)).retry_after_s is None
    assert ne.timestamp_seconds(1_700_000_000) == 1_700_000_000.0
    assert ne.timestamp_seconds(1_700_000_000_500) == 1_700_000_000.5
    assert ne.timestamp_seconds(0) == 0.0
    assert ne.jid_to_str(jid("5511", device=12)) == "5511@s.whatsapp.net"
    assert ne.jid_to_str(jid("", "s.whatsapp.net")) == "s.whatsapp.net"
    assert ne.jid_to_str(jid("123456789", "lid")) == "123456789@lid"
    assert ne.map_login_status("err-scanned-without-multidevice") == Disconnected(
        "pair_failure", "err-scanned-without-multidevice")
    assert ne.map_login_status("success") is None
